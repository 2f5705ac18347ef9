#include "redis_link.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"

#define MAX_SCRIPTS 16
#define MASTER_NAME_MAX 128

struct redis_link {
    char host[REDIS_HOST_MAX];
    int port;
    int db;
    char user[256]; /* ACL user (Redis 6+); empty: the default user */
    char password[256];
    long timeout_ms;
    redisContext *ctx;
    redis_script *scripts[MAX_SCRIPTS];
    size_t n_scripts;
    /* Sentinel mode when n_sentinels > 0: host/port above are then only the
     * last master the sentinels named. */
    redis_endpoint sentinels[REDIS_MAX_SENTINELS];
    size_t n_sentinels;
    size_t sentinel_first; /* the one that answered last is asked first */
    char master_name[MASTER_NAME_MAX + 1];
    char sentinel_password[256];
    char address[REDIS_HOST_MAX + 16];
};

redis_link *redis_link_new(const char *url, long timeout_ms, iw_error *err)
{
    redis_link *r = calloc(1, sizeof *r);
    const char *p, *at, *slash, *colon;

    if (!r) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        return NULL;
    }
    r->port = 6379;
    r->timeout_ms = timeout_ms;
    if (strncmp(url, "redis://", 8) != 0)
        goto bad;
    p = url + 8;
    at = strchr(p, '@');
    if (at) {
        /* user:password@ or :password@ (or a bare password@, as before). The user name
         * must reach AUTH: a password alone authenticates as the default user. */
        const char *pw = memchr(p, ':', (size_t)(at - p));
        if (pw && pw > p) {
            if ((size_t)(pw - p) >= sizeof r->user)
                goto bad;
            memcpy(r->user, p, (size_t)(pw - p));
        }
        pw = pw ? pw + 1 : p;
        if ((size_t)(at - pw) >= sizeof r->password)
            goto bad;
        memcpy(r->password, pw, (size_t)(at - pw));
        p = at + 1;
    }
    slash = strchr(p, '/');
    colon = memchr(p, ':', slash ? (size_t)(slash - p) : strlen(p));
    size_t hlen = colon ? (size_t)(colon - p) : slash ? (size_t)(slash - p) : strlen(p);
    if (!hlen || hlen >= sizeof r->host)
        goto bad;
    memcpy(r->host, p, hlen);
    if (colon) {
        char *end;
        long port = strtol(colon + 1, &end, 10);
        if (port <= 0 || port > 65535 || (*end && *end != '/'))
            goto bad;
        r->port = (int)port;
    }
    if (slash && slash[1]) {
        char *end;
        long db = strtol(slash + 1, &end, 10);
        if (db < 0 || db > 1000 || *end)
            goto bad;
        r->db = (int)db;
    }
    return r;
bad:
    free(r);
    iw_error_set(err, IW_ERR_CONFIG,
                 "IW_REDIS_URL: expected redis://[[user]:password@]host[:port][/db]");
    return NULL;
}

static int copy_secret(char *dst, size_t cap, const char *src, const char *name, iw_error *err)
{
    size_t len = src ? strlen(src) : 0;

    if (len >= cap)
        return iw_error_set(err, IW_ERR_CONFIG, "%s: longer than %zu bytes", name, cap - 1);
    memcpy(dst, src ? src : "", len);
    dst[len] = '\0';
    return IW_OK;
}

int redis_parse_sentinels(const char *list, redis_endpoint *out, size_t max, size_t *n,
                          iw_error *err)
{
    const char *p = list;
    int rc = IW_OK;

    *n = 0;
    if (!list)
        return iw_error_set(err, IW_ERR_CONFIG, "IW_REDIS_SENTINELS: empty list");
    for (int more = 1; more;) {
        const char *item, *end, *host, *host_end, *port_s;
        size_t hlen;

        while (*p == ' ' || *p == '\t')
            p++;
        item = p;
        end = strchr(p, ',');
        if (!end)
            end = p + strlen(p);
        more = *end == ',';
        p = more ? end + 1 : end;
        while (end > item && (end[-1] == ' ' || end[-1] == '\t'))
            end--;
        if (end == item)
            return iw_error_set(err, IW_ERR_CONFIG, "IW_REDIS_SENTINELS: empty item");
        if (*item == '[') { /* [IPv6]:port */
            host = item + 1;
            host_end = memchr(host, ']', (size_t)(end - host));
            if (!host_end || host_end + 1 >= end || host_end[1] != ':')
                return iw_error_set(err, IW_ERR_CONFIG,
                                    "IW_REDIS_SENTINELS: expected [address]:port");
            port_s = host_end + 2;
        } else {
            host = item;
            host_end = NULL;
            for (const char *c = item; c < end; c++)
                if (*c == ':')
                    host_end = c;
            if (!host_end || memchr(item, ':', (size_t)(host_end - item)))
                return iw_error_set(err, IW_ERR_CONFIG,
                                    "IW_REDIS_SENTINELS: expected host:port items");
            port_s = host_end + 1;
        }
        hlen = (size_t)(host_end - host);
        if (!hlen || hlen >= REDIS_HOST_MAX)
            return iw_error_set(err, IW_ERR_CONFIG, "IW_REDIS_SENTINELS: bad host length");
        for (const char *c = host; c < host_end; c++)
            if (*c <= ' ' || *c == ',' || *c == '/' || *c == '@' || (unsigned char)*c >= 0x7f)
                return iw_error_set(err, IW_ERR_CONFIG,
                                    "IW_REDIS_SENTINELS: bad character in a host");
        long port = 0;
        if (port_s >= end)
            return iw_error_set(err, IW_ERR_CONFIG, "IW_REDIS_SENTINELS: missing port");
        for (const char *c = port_s; c < end; c++) {
            if (*c < '0' || *c > '9' || port > 65535)
                return iw_error_set(err, IW_ERR_CONFIG, "IW_REDIS_SENTINELS: bad port");
            port = port * 10 + (*c - '0');
        }
        if (port < 1 || port > 65535)
            return iw_error_set(err, IW_ERR_CONFIG, "IW_REDIS_SENTINELS: port outside 1..65535");
        if (*n == max)
            return iw_error_set(err, IW_ERR_CONFIG, "IW_REDIS_SENTINELS: at most %zu sentinels",
                                max);
        if (out) {
            memcpy(out[*n].host, host, hlen);
            out[*n].host[hlen] = '\0';
            out[*n].port = (int)port;
        }
        (*n)++;
    }
    if (*n == 0)
        rc = iw_error_set(err, IW_ERR_CONFIG, "IW_REDIS_SENTINELS: empty list");
    return rc;
}

int redis_master_name_ok(const char *name)
{
    size_t len = name ? strlen(name) : 0;

    if (len < 1 || len > MASTER_NAME_MAX)
        return 0;
    for (const char *c = name; *c; c++)
        if (!(*c == '-' || *c == '_' || *c == '.' || (*c >= 'a' && *c <= 'z') ||
              (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9')))
            return 0;
    return 1;
}

int redis_parse_master_addr(const redisReply *rep, redis_endpoint *out, iw_error *err)
{
    const redisReply *h, *p;
    char *end;
    long port;

    if (rep && rep->type == REDIS_REPLY_NIL)
        return iw_error_set(err, IW_ERR_NOT_FOUND, "the sentinel does not know the master");
    if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements != 2)
        return iw_error_set(err, IW_ERR_REDIS, "malformed get-master-addr-by-name reply");
    h = rep->element[0];
    p = rep->element[1];
    if (h->type != REDIS_REPLY_STRING || p->type != REDIS_REPLY_STRING || h->len == 0 ||
        h->len >= REDIS_HOST_MAX || p->len == 0 || p->len > 5 || strlen(h->str) != h->len)
        return iw_error_set(err, IW_ERR_REDIS, "malformed get-master-addr-by-name reply");
    port = strtol(p->str, &end, 10);
    if (*end || port < 1 || port > 65535)
        return iw_error_set(err, IW_ERR_REDIS, "malformed port in get-master-addr-by-name reply");
    memcpy(out->host, h->str, h->len);
    out->host[h->len] = '\0';
    out->port = (int)port;
    return IW_OK;
}

const char *redis_parse_role(const redisReply *rep)
{
    static const char *const roles[] = {"master", "slave", "sentinel", NULL};

    if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements < 1 ||
        rep->element[0]->type != REDIS_REPLY_STRING)
        return NULL;
    for (int i = 0; roles[i]; i++)
        if (strcmp(rep->element[0]->str, roles[i]) == 0)
            return roles[i];
    return NULL;
}

int redis_link_use_sentinels(redis_link *r, const char *list, const char *master_name,
                             const char *password, iw_error *err)
{
    redis_endpoint eps[REDIS_MAX_SENTINELS];
    size_t n = 0;

    if (redis_parse_sentinels(list, eps, REDIS_MAX_SENTINELS, &n, err) != IW_OK)
        return IW_ERR_CONFIG;
    if (!redis_master_name_ok(master_name))
        return iw_error_set(err, IW_ERR_CONFIG,
                            "IW_REDIS_MASTER: 1..128 letters, digits, '-', '_' or '.'");
    if (copy_secret(r->sentinel_password, sizeof r->sentinel_password, password,
                    "IW_REDIS_SENTINEL_PASSWORD", err) != IW_OK)
        return IW_ERR_CONFIG;
    redis_link_drop(r);
    memcpy(r->sentinels, eps, n * sizeof eps[0]);
    r->n_sentinels = n;
    r->sentinel_first = 0;
    snprintf(r->master_name, sizeof r->master_name, "%s", master_name);
    return IW_OK;
}

int redis_link_set_password(redis_link *r, const char *password, iw_error *err)
{
    if (!password || !*password)
        return IW_OK;
    return copy_secret(r->password, sizeof r->password, password, "IW_REDIS_PASSWORD", err);
}

redis_link *redis_link_from_config(const iw_config *cfg, iw_error *err)
{
    redis_link *r = redis_link_new(cfg->redis_url, cfg->redis_timeout_ms, err);

    if (!r)
        return NULL;
    if (redis_link_set_password(r, cfg->redis_password, err) != IW_OK)
        goto fail;
    if (cfg->redis_sentinels && *cfg->redis_sentinels &&
        redis_link_use_sentinels(r, cfg->redis_sentinels, cfg->redis_master,
                                 cfg->redis_sentinel_password, err) != IW_OK)
        goto fail;
    return r;
fail:
    redis_link_free(r);
    return NULL;
}

const char *redis_link_address(const redis_link *r)
{
    return r->address[0] ? r->address : "(not connected yet)";
}

void redis_link_free(redis_link *r)
{
    if (!r)
        return;
    if (r->ctx)
        redisFree(r->ctx);
    free(r);
}

void redis_link_add_script(redis_link *r, redis_script *s)
{
    if (r->n_scripts < MAX_SCRIPTS)
        r->scripts[r->n_scripts++] = s;
}

int redis_link_connected(const redis_link *r)
{
    return r && r->ctx != NULL;
}

void redis_link_drop(redis_link *r)
{
    if (r->ctx) {
        redisFree(r->ctx);
        r->ctx = NULL;
    }
}

static int expect_ok(redis_link *r, redisReply *rep, const char *what, iw_error *err)
{
    int rc = IW_OK;
    if (!rep) {
        rc = iw_error_set(err, IW_ERR_REDIS, "%s: %s", what,
                          r->ctx ? r->ctx->errstr : "no connection");
        redis_link_drop(r);
    } else if (rep->type == REDIS_REPLY_ERROR) {
        rc = iw_error_set(err, IW_ERR_REDIS, "%s: %s", what, rep->str);
    }
    if (rep)
        freeReplyObject(rep);
    return rc;
}

static redisContext *connect_to(const char *host, int port, long timeout_ms, iw_error *err)
{
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    redisContext *c = redisConnectWithTimeout(host, port, tv);

    if (!c || c->err) {
        iw_error_set(err, IW_ERR_REDIS, "cannot connect to Redis at %s:%d: %s", host, port,
                     c ? c->errstr : "out of memory");
        if (c)
            redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, tv);
    redisEnableKeepAlive(c);
    return c;
}

/* Asks one sentinel for the master's address. */
static int ask_sentinel(redis_link *r, const redis_endpoint *s, redis_endpoint *master,
                        iw_error *err)
{
    redisContext *c = connect_to(s->host, s->port, r->timeout_ms, err);
    redisReply *rep = NULL;
    int rc = IW_ERR_REDIS;

    if (!c)
        goto out;
    if (r->sentinel_password[0]) {
        rep = redisCommand(c, "AUTH %s", r->sentinel_password);
        if (!rep || rep->type == REDIS_REPLY_ERROR) {
            iw_error_set(err, IW_ERR_REDIS, "sentinel %s:%d: AUTH: %s", s->host, s->port,
                         rep ? rep->str : c->errstr);
            goto out;
        }
        freeReplyObject(rep);
    }
    rep = redisCommand(c, "SENTINEL get-master-addr-by-name %s", r->master_name);
    if (!rep) {
        iw_error_set(err, IW_ERR_REDIS, "sentinel %s:%d: %s", s->host, s->port, c->errstr);
        goto out;
    }
    if (rep->type == REDIS_REPLY_ERROR) {
        iw_error_set(err, IW_ERR_REDIS, "sentinel %s:%d: %s", s->host, s->port, rep->str);
        goto out;
    }
    rc = redis_parse_master_addr(rep, master, err);
    if (rc != IW_OK)
        iw_error_set(err, rc, "sentinel %s:%d: no address for master '%s'", s->host, s->port,
                     r->master_name);
out:
    if (rep)
        freeReplyObject(rep);
    if (c)
        redisFree(c);
    return rc;
}

/* Sentinel mode: the master's address from the first sentinel that knows it,
 * into r->host/r->port.  The sentinel that answered is asked first next time. */
static int discover_master(redis_link *r, iw_error *err)
{
    iw_error last = {0};

    for (size_t k = 0; k < r->n_sentinels; k++) {
        size_t i = (r->sentinel_first + k) % r->n_sentinels;
        redis_endpoint m;
        if (ask_sentinel(r, &r->sentinels[i], &m, &last) == IW_OK) {
            r->sentinel_first = i;
            memcpy(r->host, m.host, sizeof r->host);
            r->port = m.port;
            return IW_OK;
        }
    }
    return iw_error_set(err, IW_ERR_REDIS, "no sentinel named a master for '%s' (last: %s)",
                        r->master_name, last.msg);
}

int redis_link_ensure(redis_link *r, iw_error *err)
{
    if (r->ctx)
        return IW_OK;
    if (r->n_sentinels && discover_master(r, err) != IW_OK)
        return IW_ERR_REDIS;
    snprintf(r->address, sizeof r->address, "%s:%d", r->host, r->port);
    r->ctx = connect_to(r->host, r->port, r->timeout_ms, err);
    if (!r->ctx)
        return IW_ERR_REDIS;
    if (r->user[0] && expect_ok(r, redisCommand(r->ctx, "AUTH %s %s", r->user, r->password), "AUTH",
                                err) != IW_OK)
        goto fail;
    if (!r->user[0] && r->password[0] &&
        expect_ok(r, redisCommand(r->ctx, "AUTH %s", r->password), "AUTH", err) != IW_OK)
        goto fail;
    if (r->n_sentinels) {
        /* A sentinel's answer can be stale during a failover (the old master,
         * restarted, is a replica until the sentinels reconfigure it): writes
         * to it would fail or, worse, be lost, so only a master will do. */
        redisReply *rep = redisCommand(r->ctx, "ROLE");
        const char *role = redis_parse_role(rep);
        if (!role || strcmp(role, "master") != 0) {
            iw_error_set(err, IW_ERR_REDIS, "Redis at %s:%d named by the sentinels is %s%s",
                         r->host, r->port, role ? "a " : "not answering ROLE",
                         role ? (strcmp(role, "slave") == 0 ? "replica" : role) : "");
            if (rep)
                freeReplyObject(rep);
            goto fail;
        }
        freeReplyObject(rep);
    }
    if (r->db && expect_ok(r, redisCommand(r->ctx, "SELECT %d", r->db), "SELECT", err) != IW_OK)
        goto fail;
    for (size_t i = 0; i < r->n_scripts; i++) {
        redisReply *rep = redisCommand(r->ctx, "SCRIPT LOAD %s", r->scripts[i]->source);
        if (!rep || rep->type != REDIS_REPLY_STRING || rep->len != 40) {
            iw_error_set(err, IW_ERR_REDIS, "SCRIPT LOAD failed: %s",
                         rep && rep->type == REDIS_REPLY_ERROR ? rep->str : "connection error");
            if (rep)
                freeReplyObject(rep);
            goto fail;
        }
        memcpy(r->scripts[i]->sha, rep->str, 40);
        r->scripts[i]->sha[40] = '\0';
        freeReplyObject(rep);
    }
    return IW_OK;
fail:
    redis_link_drop(r);
    return IW_ERR_REDIS;
}

/* A command longer than Redis takes as one bulk string (proto-max-bulk-len). */
#define REDIS_COMMAND_MAX (512u << 20)

/* <prefix><n>\r\n: RESP's array and bulk-string headers. */
static int resp_header(iw_buf *b, char prefix, size_t n)
{
    char text[24], *p;

    text[22] = '\r';
    text[23] = '\n';
    p = uint_text(text + 22, n);
    *--p = prefix;
    return buf_add(b, p, (size_t)(text + sizeof text - p));
}

static int resp_arg(iw_buf *b, const char *s, size_t n)
{
    int rc = resp_header(b, '$', n);

    if (rc == IW_OK)
        rc = buf_add(b, s, n);
    if (rc == IW_OK)
        rc = buf_add(b, "\r\n", 2);
    return rc;
}

/* The command is written in RESP here and handed over whole
 * (redisAppendFormattedCommand): hiredis's own formatting of an argv built
 * it in pieces with its printf (sdscatfmt), a few thousand instructions a
 * command, twice per job. */
int redis_link_append_script(redis_link *r, const redis_script *s, int nkeys, int argc,
                             const char **argv, iw_error *err)
{
    char mem[2048], nk[16], *p;
    iw_buf cmd;
    int rc;

    if (!r->ctx)
        return iw_error_set(err, IW_ERR_REDIS, "Redis is not connected");
    if (argc < 0 || nkeys < 0 || argc + 3 > 128)
        return iw_error_set(err, IW_ERR_INVALID, "too many script arguments");
    p = uint_text(nk + sizeof nk, (unsigned long long)nkeys);
    buf_init_on(&cmd, mem, sizeof mem, REDIS_COMMAND_MAX);
    rc = resp_header(&cmd, '*', (size_t)argc + 3);
    if (rc == IW_OK)
        rc = resp_arg(&cmd, "EVALSHA", 7);
    if (rc == IW_OK)
        rc = resp_arg(&cmd, s->sha, strlen(s->sha));
    if (rc == IW_OK)
        rc = resp_arg(&cmd, p, (size_t)(nk + sizeof nk - p));
    for (int i = 0; rc == IW_OK && i < argc; i++)
        rc = resp_arg(&cmd, argv[i], strlen(argv[i]));
    if (rc == IW_OK &&
        redisAppendFormattedCommand(r->ctx, buf_ptr(&cmd), buf_len(&cmd)) != REDIS_OK)
        rc = IW_ERR_NOMEM;
    buf_free(&cmd);
    if (rc != IW_OK)
        return iw_error_set(err, rc,
                            rc == IW_ERR_TOO_LARGE ? "a Redis command is too large"
                                                   : "cannot append a Redis command");
    return IW_OK;
}

int redis_link_append(redis_link *r, iw_error *err, const char *fmt, ...)
{
    va_list ap;
    int rc;

    if (!r->ctx)
        return iw_error_set(err, IW_ERR_REDIS, "Redis is not connected");
    va_start(ap, fmt);
    rc = redisvAppendCommand(r->ctx, fmt, ap);
    va_end(ap);
    return rc == REDIS_OK ? IW_OK
                          : iw_error_set(err, IW_ERR_NOMEM, "cannot append a Redis command");
}

/* Errors after which this connection is useless: NOSCRIPT (the server lost
 * its script cache: reconnecting reloads the scripts), READONLY (the node was
 * demoted by a failover: reconnecting asks the sentinels for the new master),
 * MASTERDOWN (a replica that lost its master), NOREPLICAS (a master cut off
 * from its replicas by min-replicas-to-write: during a partition the
 * sentinels may have promoted another node meanwhile). */
static int must_reconnect(const char *msg)
{
    return strncmp(msg, "NOSCRIPT", 8) == 0 || strncmp(msg, "READONLY", 8) == 0 ||
           strncmp(msg, "MASTERDOWN", 10) == 0 || strncmp(msg, "NOREPLICAS", 10) == 0;
}

int redis_link_read(redis_link *r, redisReply **out, iw_error *err)
{
    void *reply = NULL;

    *out = NULL;
    if (!r->ctx)
        return iw_error_set(err, IW_ERR_REDIS, "Redis is not connected");
    if (redisGetReply(r->ctx, &reply) != REDIS_OK || !reply) {
        iw_error_set(err, IW_ERR_REDIS, "Redis: %s",
                     r->ctx->errstr[0] ? r->ctx->errstr : "no reply");
        redis_link_drop(r);
        return IW_ERR_REDIS;
    }
    redisReply *rep = reply;
    if (rep->type == REDIS_REPLY_ERROR) {
        iw_error_set(err, IW_ERR_REDIS_SCRIPT, "Redis: %s", rep->str);
        int stale = must_reconnect(rep->str);
        freeReplyObject(rep);
        if (stale)
            redis_link_drop(r);
        return IW_ERR_REDIS_SCRIPT;
    }
    *out = rep;
    return IW_OK;
}

redisReply *redis_link_command(redis_link *r, iw_error *err, const char *fmt, ...)
{
    va_list ap;
    redisReply *rep;

    if (redis_link_ensure(r, err) != IW_OK)
        return NULL;
    va_start(ap, fmt);
    rep = redisvCommand(r->ctx, fmt, ap);
    va_end(ap);
    if (!rep) {
        iw_error_set(err, IW_ERR_REDIS, "Redis: %s", r->ctx->errstr);
        redis_link_drop(r);
        return NULL;
    }
    if (rep->type == REDIS_REPLY_ERROR) {
        iw_error_set(err, IW_ERR_REDIS, "Redis: %s", rep->str);
        if (must_reconnect(rep->str))
            redis_link_drop(r);
        freeReplyObject(rep);
        return NULL;
    }
    return rep;
}

int redis_link_append_wait(redis_link *r, long replicas, long timeout_ms, iw_error *err)
{
    int rc;

    if (replicas <= 0)
        return 0;
    rc = redis_link_append(r, err, "WAIT %ld %ld", replicas, timeout_ms > 0 ? timeout_ms : 1L);
    return rc == IW_OK ? 1 : rc;
}

int redis_wait_check(const redisReply *rep, long replicas, iw_error *err)
{
    if (!rep || rep->type != REDIS_REPLY_INTEGER)
        return iw_error_set(err, IW_ERR_REDIS, "WAIT: unexpected reply");
    if (rep->integer < replicas)
        return iw_error_set(err, IW_ERR_TIMEOUT, "WAIT: %lld of %ld replicas acknowledged",
                            rep->integer, replicas);
    return IW_OK;
}
