#include "records.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "json_read.h"

#define NOW_MS                                                                                     \
    "local t = redis.call('TIME')\n"                                                               \
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

/* KEYS: record, and the job's call claim (may be the record key itself when
 * there is none).  ARGV: event, owner token, lease ms, ttl ms, claim token,
 * "1" when the outcome is a failure (submission.failed).
 * {1}: stored; {2, record}: one exists.  The claim is dropped in the same
 * step when it is still the caller's: the record guards the job from now on. */
static const char put_source[] =
    NOW_MS "if KEYS[2] ~= KEYS[1] and redis.call('GET', KEYS[2]) == ARGV[5] then\n"
           "  redis.call('DEL', KEYS[2])\n"
           "end\n"
           "local cur = redis.call('GET', KEYS[1])\n"
           "if cur then return {2, cur} end\n"
           "redis.call('SET', KEYS[1], cjson.encode({event = ARGV[1], published = false,\n"
           "  recordedAt = now, owner = ARGV[2], leaseUntil = now + tonumber(ARGV[3]),\n"
           "  failed = (ARGV[6] == '1')}), 'PX', ARGV[4])\n"
           "return {1}\n";

/* KEYS: record.  ARGV: token, lease ms.
 * {0}: gone; {2, record}: published; {3, ms}: owned by another for ms more;
 * {1, record}: adopted (now owned by token). */
static const char adopt_source[] =
    NOW_MS "local cur = redis.call('GET', KEYS[1])\n"
           "if not cur then return {0} end\n"
           "local ok, r = pcall(cjson.decode, cur)\n"
           "if not ok or type(r) ~= 'table' or type(r.event) ~= 'string' then\n"
           "  return redis.error_reply('record is corrupt')\n"
           "end\n"
           "if r.published == true then return {2, cur} end\n"
           "local until_ms = tonumber(r.leaseUntil) or 0\n"
           "if r.owner ~= ARGV[1] and until_ms > now then return {3, until_ms - now} end\n"
           "r.owner = ARGV[1]\n"
           "r.leaseUntil = now + tonumber(ARGV[2])\n"
           "redis.call('SET', KEYS[1], cjson.encode(r), 'KEEPTTL')\n"
           "return {1, cur}\n";

/* KEYS: record. {0}: gone; {1}: marked. */
static const char mark_source[] = "local cur = redis.call('GET', KEYS[1])\n"
                                  "if not cur then return {0} end\n"
                                  "local ok, r = pcall(cjson.decode, cur)\n"
                                  "if not ok or type(r) ~= 'table' then return {0} end\n"
                                  "r.published = true\n"
                                  "redis.call('SET', KEYS[1], cjson.encode(r), 'KEEPTTL')\n"
                                  "return {1}\n";

/* KEYS: claim. ARGV: token. {1}: released (or not ours: nothing to do). */
static const char release_source[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end\n"
    "return {1}\n";

/* KEYS: the first-attempt keys of a batch.  ARGV: ttl ms.
 * Each key keeps the Redis time it was first set at; returns them all. */
static const char first_source[] = NOW_MS "local out = {}\n"
                                          "for i, k in ipairs(KEYS) do\n"
                                          "  redis.call('SET', k, now, 'NX', 'PX', ARGV[1])\n"
                                          "  out[i] = tonumber(redis.call('GET', k)) or now\n"
                                          "end\n"
                                          "return out\n";

typedef enum op { OP_PUT, OP_ADOPT, OP_MARK, OP_RELEASE } op;

struct records {
    redis_link *redis;
    redis_script put, adopt, mark, release, first;
    char *ns;
    char ttl[24], lease[24];
    /* the kinds of the replies appended and not read yet, a ring */
    op *ops;
    size_t cap, head, n;
};

records *records_new(redis_link *r, const char *ns, long ttl_ms, long lease_ms)
{
    records *rec = calloc(1, sizeof *rec);

    if (!rec || !(rec->ns = strdup(ns))) {
        free(rec);
        return NULL;
    }
    rec->redis = r;
    rec->put.source = put_source;
    rec->adopt.source = adopt_source;
    rec->mark.source = mark_source;
    rec->release.source = release_source;
    rec->first.source = first_source;
    snprintf(rec->ttl, sizeof rec->ttl, "%ld", ttl_ms);
    snprintf(rec->lease, sizeof rec->lease, "%ld", lease_ms);
    redis_link_add_script(r, &rec->put);
    redis_link_add_script(r, &rec->adopt);
    redis_link_add_script(r, &rec->mark);
    redis_link_add_script(r, &rec->release);
    redis_link_add_script(r, &rec->first);
    return rec;
}

void records_free(records *rec)
{
    if (!rec)
        return;
    free(rec->ops);
    free(rec->ns);
    free(rec);
}

size_t records_key_size(const records *rec, const char *kind, const char *id)
{
    return strlen(rec->ns) + strlen(kind) + strlen(id) + 3;
}

int records_key(const records *rec, char *buf, size_t size, const char *kind, const char *id)
{
    size_t ns = strlen(rec->ns), k = strlen(kind), n = strlen(id);

    if (size > RECORDS_KEY_MAX)
        size = RECORDS_KEY_MAX;
    /* <ns>:<kind>:<id>, three per job: copied, not formatted */
    if (!size || ns + k + n + 2 >= size) {
        if (size)
            buf[0] = '\0';
        return -1;
    }
    memcpy(buf, rec->ns, ns);
    buf[ns] = ':';
    memcpy(buf + ns + 1, kind, k);
    buf[ns + 1 + k] = ':';
    memcpy(buf + ns + 2 + k, id, n + 1);
    return 0;
}

static int push_op(records *rec, op o, iw_error *err)
{
    if (rec->n == rec->cap) {
        size_t cap = rec->cap ? rec->cap * 2 : 64;
        op *ops = malloc(cap * sizeof *ops);
        if (!ops)
            return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        for (size_t i = 0; i < rec->n; i++)
            ops[i] = rec->ops[(rec->head + i) % rec->cap];
        free(rec->ops);
        rec->ops = ops;
        rec->cap = cap;
        rec->head = 0;
    }
    rec->ops[(rec->head + rec->n++) % rec->cap] = o;
    return IW_OK;
}

static int append_keys(records *rec, op o, const redis_script *s, int nkeys, int argc,
                       const char **argv, iw_error *err)
{
    int rc = push_op(rec, o, err);

    if (rc == IW_OK &&
        (rc = redis_link_append_script(rec->redis, s, nkeys, argc, argv, err)) != IW_OK)
        rec->n--;
    return rc;
}

static int append(records *rec, op o, const redis_script *s, int argc, const char **argv,
                  iw_error *err)
{
    return append_keys(rec, o, s, 1, argc, argv, err);
}

int records_append_put(records *rec, const char *key, const char *event, const char *token,
                       const char *claim_key, const char *claim_token, long failed_ttl_ms,
                       iw_error *err)
{
    char ttl[24];
    /* a failed record keeps its own time to live; the rest share rec->ttl */
    const char *argv[8] = {key,
                           claim_key ? claim_key : key,
                           event,
                           token,
                           rec->lease,
                           failed_ttl_ms > 0
                               ? uint_text(ttl + sizeof ttl - 1, (unsigned long long)failed_ttl_ms)
                               : rec->ttl,
                           claim_token ? claim_token : "",
                           failed_ttl_ms > 0 ? "1" : "0"};

    ttl[sizeof ttl - 1] = '\0';
    return append_keys(rec, OP_PUT, &rec->put, 2, 8, argv, err);
}

int records_append_adopt(records *rec, const char *key, const char *token, iw_error *err)
{
    const char *argv[3] = {key, token, rec->lease};
    return append(rec, OP_ADOPT, &rec->adopt, 3, argv, err);
}

int records_append_mark(records *rec, const char *key, iw_error *err)
{
    const char *argv[1] = {key};
    return append(rec, OP_MARK, &rec->mark, 1, argv, err);
}

int records_append_release(records *rec, const char *claim_key, const char *token, iw_error *err)
{
    const char *argv[2] = {claim_key, token};
    return append(rec, OP_RELEASE, &rec->release, 2, argv, err);
}

/* The "event" of a stored record (a new string), or NULL. */
static char *event_of(const redisReply *e, int *failed)
{
    json_error_t jerr;
    json_t *r;
    char *out = NULL;

    if (e->type != REDIS_REPLY_STRING)
        return NULL;
    r = json_read(e->str, e->len, 0, &jerr);
    if (json_is_string(json_object_get(r, "event")))
        out = strdup(json_string_value(json_object_get(r, "event")));
    *failed = json_is_true(json_object_get(r, "failed"));
    json_decref(r);
    return out;
}

int records_read(records *rec, records_reply *out, iw_error *err)
{
    redisReply *rep = NULL;
    long long kind;
    op o;
    int rc;

    memset(out, 0, sizeof *out);
    if (!rec->n)
        return iw_error_set(err, IW_ERR_INVALID, "records: no reply pending");
    o = rec->ops[rec->head];
    rec->head = (rec->head + 1) % rec->cap;
    rec->n--;
    if ((rc = redis_link_read(rec->redis, &rep, err)) != IW_OK)
        return rc;
    rc = IW_ERR_REDIS_SCRIPT; /* until the reply has the shape of o's */
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 1 ||
        rep->element[0]->type != REDIS_REPLY_INTEGER)
        goto out;
    kind = rep->element[0]->integer;
    switch (o) {
    case OP_PUT:
        out->answer = kind == 1 ? REC_STORED : REC_EXISTS;
        if (kind != 1 &&
            (rep->elements < 2 || !(out->event = event_of(rep->element[1], &out->failed))))
            goto out;
        break;
    case OP_ADOPT:
        out->answer = kind == 0   ? REC_GONE
                      : kind == 2 ? REC_PUBLISHED
                      : kind == 3 ? REC_BUSY
                                  : REC_ADOPTED;
        if (kind == 3)
            out->wait_ms = rep->elements >= 2 && rep->element[1]->type == REDIS_REPLY_INTEGER
                               ? (long)rep->element[1]->integer
                               : 1000;
        if ((kind == 1 || kind == 2) &&
            (rep->elements < 2 || !(out->event = event_of(rep->element[1], &out->failed))))
            goto out;
        break;
    case OP_MARK:
        out->answer = kind == 1 ? REC_DONE : REC_GONE;
        break;
    case OP_RELEASE:
        out->answer = REC_DONE;
        break;
    }
    rc = IW_OK;
out:
    freeReplyObject(rep);
    if (rc != IW_OK) /* the message is formatted only when it is needed */
        iw_error_set(err, rc, "records: unexpected reply");
    return rc;
}

int records_append_first(records *rec, const char *const *keys, size_t n, iw_error *err)
{
    const char *argv[64 + 1];

    if (n == 0 || n > 64)
        return iw_error_set(err, IW_ERR_INVALID, "records: %zu first-attempt keys", n);
    for (size_t i = 0; i < n; i++)
        argv[i] = keys[i];
    argv[n] = rec->ttl;
    return redis_link_append_script(rec->redis, &rec->first, (int)n, (int)n + 1, argv, err);
}

int records_read_first(records *rec, long long *out, size_t n, iw_error *err)
{
    redisReply *rep = NULL;
    int rc = redis_link_read(rec->redis, &rep, err);

    if (rc != IW_OK)
        return rc;
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements != n) {
        freeReplyObject(rep);
        return iw_error_set(err, IW_ERR_REDIS_SCRIPT, "records: unexpected first-attempt reply");
    }
    for (size_t i = 0; i < n; i++)
        out[i] = rep->element[i]->type == REDIS_REPLY_INTEGER ? rep->element[i]->integer : 0;
    freeReplyObject(rep);
    return IW_OK;
}
