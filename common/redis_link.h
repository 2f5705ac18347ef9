/* A Redis connection that reconnects lazily and knows its Lua scripts.
 *
 * Calls are synchronous (loopback round trips are ~0.1 ms) but pipelined: a
 * caller appends many commands, then reads all replies in one round trip.
 * Every script is SCRIPT LOADed on (re)connect and called by EVALSHA.
 *
 * With Sentinel (redis_link_use_sentinels) every (re)connect asks the
 * sentinels for the master's address and checks with ROLE that the node is a
 * master; a READONLY reply (a node demoted by a failover) drops the link, so
 * the next ensure finds the new master.  A failover is thus an ordinary Redis
 * outage for the caller: errors until the sentinels have promoted a replica. */
#ifndef IW_REDIS_LINK_H
#define IW_REDIS_LINK_H

#include <hiredis/hiredis.h>

#include "config.h"
#include "status.h"

#define REDIS_MAX_SENTINELS 16
#define REDIS_HOST_MAX 256

typedef struct redis_link redis_link;

typedef struct redis_script {
    const char *source;
    char sha[41];
} redis_script;

typedef struct redis_endpoint {
    char host[REDIS_HOST_MAX];
    int port;
} redis_endpoint;

/* Parses redis://[[user]:password@]host[:port][/db] (user: a Redis ACL user); does not
 * connect yet. */
redis_link *redis_link_new(const char *url, long timeout_ms, iw_error *err);
/* The link the settings describe: IW_REDIS_URL, IW_REDIS_TIMEOUT,
 * IW_REDIS_PASSWORD (overrides the URL's) and, when IW_REDIS_SENTINELS is set,
 * Sentinel discovery of IW_REDIS_MASTER.  NULL with IW_ERR_CONFIG on a bad value. */
redis_link *redis_link_from_config(const iw_config *cfg, iw_error *err);
void redis_link_free(redis_link *r);

/* Parses a comma-separated "host:port" list (IPv6 as "[addr]:port"; spaces
 * around items ignored; port 1..65535 required) into out[0..max-1], count in
 * *n.  Pure; IW_ERR_CONFIG naming IW_REDIS_SENTINELS on a bad list. */
int redis_parse_sentinels(const char *list, redis_endpoint *out, size_t max, size_t *n,
                          iw_error *err);
/* True if name is a usable Sentinel master name (1..128 of [A-Za-z0-9._-]). */
int redis_master_name_ok(const char *name);
/* Reads a SENTINEL get-master-addr-by-name reply into *out; IW_ERR_NOT_FOUND
 * when the sentinel does not know the master (nil), IW_ERR_REDIS when malformed. */
int redis_parse_master_addr(const redisReply *rep, redis_endpoint *out, iw_error *err);
/* The role name in a ROLE reply ("master", "slave", "sentinel") or NULL. */
const char *redis_parse_role(const redisReply *rep);

/* Makes every (re)connect ask the sentinels (list as above) for master_name,
 * authenticating to them with password (NULL or "": none).  Drops the link. */
int redis_link_use_sentinels(redis_link *r, const char *list, const char *master_name,
                             const char *password, iw_error *err);
/* Sets the password of the data nodes (NULL or "": keep the URL's). */
int redis_link_set_password(redis_link *r, const char *password, iw_error *err);
/* The address of the node the link is connected to (or last tried): "host:port". */
const char *redis_link_address(const redis_link *r);

/* Registers a script (borrowed, must outlive the link) to load on connect. */
void redis_link_add_script(redis_link *r, redis_script *s);

/* Connects (and loads scripts) if not connected. IW_ERR_REDIS when down. */
int redis_link_ensure(redis_link *r, iw_error *err);
int redis_link_connected(const redis_link *r);
/* Drops the connection after an error; the next ensure reconnects. */
void redis_link_drop(redis_link *r);

/* Appends EVALSHA script nkeys argv... to the pipeline. */
int redis_link_append_script(redis_link *r, const redis_script *s, int nkeys, int argc,
                             const char **argv, iw_error *err);
/* Appends any command (hiredis format string). */
int redis_link_append(redis_link *r, iw_error *err, const char *fmt, ...);
/* Reads the next pipelined reply; the caller frees it (freeReplyObject).  A
 * Redis error reply is returned as IW_ERR_REDIS_SCRIPT with the text in err
 * (and *out NULL); a connection error drops the link. */
int redis_link_read(redis_link *r, redisReply **out, iw_error *err);

/* Appends WAIT replicas timeout_ms, which answers once `replicas` replicas
 * have acknowledged every write this connection made before it (or the timeout
 * passed) with the number that did.  Returns the number of replies the caller
 * must read: 0 when replicas is 0 (nothing appended), else 1; or a negative
 * status.  Pipelined after a group of records it costs one replication round
 * trip per group, not per record (README, Scale-out: measured). */
int redis_link_append_wait(redis_link *r, long replicas, long timeout_ms, iw_error *err);
/* Checks a WAIT reply: IW_OK when at least `replicas` acknowledged,
 * IW_ERR_TIMEOUT (with the count in err) when fewer did, IW_ERR_REDIS when the
 * reply is not an integer. */
int redis_wait_check(const redisReply *rep, long replicas, iw_error *err);

/* One command, one reply (for the non-hot paths). */
redisReply *redis_link_command(redis_link *r, iw_error *err, const char *fmt, ...);

#endif
