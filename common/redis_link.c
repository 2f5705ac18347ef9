#include "redis_link.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SCRIPTS 16

struct redis_link {
    char host[256];
    int port;
    int db;
    char user[256]; /* ACL user (Redis 6+); empty: the default user */
    char password[256];
    long timeout_ms;
    redisContext *ctx;
    redis_script *scripts[MAX_SCRIPTS];
    size_t n_scripts;
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

int redis_link_ensure(redis_link *r, iw_error *err)
{
    struct timeval tv = {r->timeout_ms / 1000, (r->timeout_ms % 1000) * 1000};

    if (r->ctx)
        return IW_OK;
    r->ctx = redisConnectWithTimeout(r->host, r->port, tv);
    if (!r->ctx || r->ctx->err) {
        iw_error_set(err, IW_ERR_REDIS, "cannot connect to Redis at %s:%d: %s", r->host, r->port,
                     r->ctx ? r->ctx->errstr : "out of memory");
        redis_link_drop(r);
        return IW_ERR_REDIS;
    }
    redisSetTimeout(r->ctx, tv);
    redisEnableKeepAlive(r->ctx);
    if (r->user[0] && expect_ok(r, redisCommand(r->ctx, "AUTH %s %s", r->user, r->password), "AUTH",
                                err) != IW_OK)
        goto fail;
    if (!r->user[0] && r->password[0] &&
        expect_ok(r, redisCommand(r->ctx, "AUTH %s", r->password), "AUTH", err) != IW_OK)
        goto fail;
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

int redis_link_append_script(redis_link *r, const redis_script *s, int nkeys, int argc,
                             const char **argv, iw_error *err)
{
    const char *args[128];
    char nk[16];

    if (!r->ctx)
        return iw_error_set(err, IW_ERR_REDIS, "Redis is not connected");
    if (argc + 3 > 128)
        return iw_error_set(err, IW_ERR_INVALID, "too many script arguments");
    snprintf(nk, sizeof nk, "%d", nkeys);
    args[0] = "EVALSHA";
    args[1] = s->sha;
    args[2] = nk;
    for (int i = 0; i < argc; i++)
        args[3 + i] = argv[i];
    if (redisAppendCommandArgv(r->ctx, argc + 3, args, NULL) != REDIS_OK)
        return iw_error_set(err, IW_ERR_NOMEM, "cannot append a Redis command");
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
        /* NOSCRIPT means the server lost its script cache (restart, SCRIPT
         * FLUSH): reconnecting reloads the scripts. */
        int noscript = strncmp(rep->str, "NOSCRIPT", 8) == 0;
        freeReplyObject(rep);
        if (noscript)
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
        freeReplyObject(rep);
        return NULL;
    }
    return rep;
}
