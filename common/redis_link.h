/* A Redis connection that reconnects lazily and knows its Lua scripts.
 *
 * Calls are synchronous (loopback round trips are ~0.1 ms) but pipelined: a
 * caller appends many commands, then reads all replies in one round trip.
 * Every script is SCRIPT LOADed on (re)connect and called by EVALSHA. */
#ifndef IW_REDIS_LINK_H
#define IW_REDIS_LINK_H

#include <hiredis/hiredis.h>

#include "status.h"

typedef struct redis_link redis_link;

typedef struct redis_script {
    const char *source;
    char sha[41];
} redis_script;

/* Parses redis://[[user]:password@]host[:port][/db] (user: a Redis ACL user); does not
 * connect yet. */
redis_link *redis_link_new(const char *url, long timeout_ms, iw_error *err);
void redis_link_free(redis_link *r);

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

/* One command, one reply (for the non-hot paths). */
redisReply *redis_link_command(redis_link *r, iw_error *err, const char *fmt, ...);

#endif
