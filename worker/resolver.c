/* The resolver: answers resource look-ups (resource.get, an RPC over the
 * broker) through the Redis cache, and drops cache entries on
 * resource.invalidate.
 *
 * Two kinds of objects:
 *
 * A request is one delivery of <ns>.resource:
 *   received -> validated -> waiting -> [fallback] -> replying -> acked
 * (or dead: dead-lettered with its reason; or invalidating for
 * resource.invalidate).  It is acknowledged only once its reply is confirmed.
 *
 * A flight is the work for one cache slot (id + expand), shared by every
 * request of this process that waits for that slot (in-process coalescing):
 *   lookup -> permitting -> calling -> storing -> done
 * with the side states waiting-for-peer (another process holds the slot's
 * lock: poll the cache) and deferred (a limiter wait, a 429 or a retry gap).
 *
 * The look-up is one Lua script: fresh hit, remembered 404, or else take the
 * slot's lock (<ns>:resource-lock:...) if free.  Only the lock holder calls
 * the provider, so concurrent look-ups of one uncached slot cost one call
 * across every process; the others poll the cache until the holder has
 * stored its result or its lock expired.  The store script writes only while
 * its lock is still held, and invalidation deletes the lock, so a call that
 * was in flight during an invalidation cannot put its older answer back.
 *
 * Every request waits at most IW_RESOLVER_WAIT for anything (provider,
 * limiter, a peer's call).  Then -- or at once, when the provider fails, the
 * limiter refuses for longer, or the breaker is open -- it is answered from
 * the stale copy (source "stale-cache"), or with an error naming why.  The
 * flight itself goes on and fills the cache for later look-ups. */
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "jobheap.h"
#include "log.h"
#include "retry.h"
#include "roles.h"
#include "transform.h"

#define FLIGHT_BUCKETS 4096
#define MAX_PIPELINE 512     /* Redis commands per round trip */
#define PERMIT_BATCH 256     /* flights per limiter take */
#define PEER_POLL_MIN_MS 5   /* first cache re-read while a peer calls */
#define PEER_POLL_MAX_MS 50  /* ... doubling up to this */
#define LOCK_SLACK_MS 1000   /* the lock outlives one provider call by this */
#define REDIS_RETRY_MS 1000  /* queued invalidations retry Redis this often */
#define USAGE_WARN_MS 60000L /* at most one "rate limit approaching" a minute */

/* ---- intrusive doubly-linked lists ------------------------------------------ */

typedef struct dlink {
    struct dlink *prev, *next;
} dlink;

#define CONTAINER_OF(p, type, member) ((type *)((char *)(p)-offsetof(type, member)))

static void dl_init(dlink *h)
{
    h->prev = h->next = h;
}

static int dl_empty(const dlink *h)
{
    return h->next == h;
}

static void dl_push(dlink *h, dlink *n)
{
    n->prev = h->prev;
    n->next = h;
    h->prev->next = n;
    h->prev = n;
}

static void dl_del(dlink *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->prev = n->next = n;
}

/* ---- types ---------------------------------------------------------------------- */

typedef enum req_state {
    Q_RECEIVED,
    Q_VALIDATED,
    Q_WAITING,
    Q_FALLBACK,
    Q_INVALIDATING,
    Q_REPLYING,
    Q_DEAD,
} req_state;

static const char *const req_state_names[] = {"received",     "validated", "waiting", "fallback",
                                              "invalidating", "replying",  "dead"};

typedef enum flight_state {
    F_LOOKUP,
    F_PEER_WAIT,
    F_DEFERRED,
    F_PERMIT,
    F_CALLING,
    F_STORING,
} flight_state;

static const char *const flight_state_names[] = {"lookup",     "waiting-for-peer", "deferred",
                                                 "permitting", "calling",          "storing"};

typedef enum flight_result {
    RES_NONE,
    RES_FOUND,   /* data holds OurFormat */
    RES_MISSING, /* the provider answered 404 */
} flight_result;

struct flight;

typedef struct rreq {
    struct resolver *r; /* NULL once orphaned by resolver_free */
    iw_delivery *d;
    json_t *doc;
    const char *id;     /* borrowed from doc */
    const char *expand; /* borrowed from doc; NULL when absent or empty */
    int critical;
    int invalidate;
    int outcome_pending; /* publishes in flight: freed by after_outcome */
    req_state state;
    long long received_ms, deadline_ms;
    char *member;    /* "" or "@<escaped expand>" */
    char *fresh_key; /* also the flight map key */
    char *stale_key;
    struct flight *f; /* while waiting */
    dlink link;       /* in a flight's waiters, the fallback or the invalidation queue */
    dlink by_deadline;
    dlink all;
    const char *fb_code; /* why it falls back: the error if nothing is cached */
    char fb_msg[256];
    rt_outcome out;
} rreq;

typedef struct flight {
    struct resolver *r;
    char *id, *expand, *member, *request_id;
    char *k_fresh, *k_stale, *k_missing, *k_lock, *k_variants, *path;
    char token[64];
    flight_state state;
    int in_map, owns_lock, critical, attempts;
    int purge; /* the fresh value was not OurFormat: the next look-up deletes it */
    long poll_ms;
    dlink waiters;
    size_t n_waiters;
    jobheap_node node;
    flight_result result;
    json_t *data;
    char *data_text;
    const char *wait_code; /* the error a request gets when its deadline passes now */
    char wait_msg[256];
    struct flight *hnext; /* hash chain */
    struct flight *qnext; /* in one of the work queues */
    dlink all;
} flight;

typedef struct fqueue {
    flight *head, *tail;
} fqueue;

struct resolver {
    runtime *rt;
    const iw_config *cfg;
    iw_schema *get_schema, *inval_schema, *reply_schema;
    redis_script s_lookup, s_store, s_invalidate;
    flight *buckets[FLIGHT_BUCKETS];
    fqueue lookup_q, store_q, permit_q[2]; /* permit_q[0]: critical */
    jobheap timers;                        /* waiting-for-peer and deferred flights */
    dlink deadlines;                       /* waiting requests, oldest first */
    dlink fallback_q, inval_q;
    dlink requests, flights; /* everything alive, for the free and link-lost paths */
    size_t alive;
    int calling;
    long long blocked_until, last_usage_warn, seq;
};

/* ---- Lua ------------------------------------------------------------------------ */

/* KEYS: fresh, missing, lock.  ARGV: token, lock ms, purge (1: delete the
 * fresh value first, it was found corrupt).
 * {1, value}: fresh hit; {2}: remembered 404; {3}: the caller holds the lock
 * now (taken, or extended when it was already its own); {4, pttl}: another
 * caller holds it. */
static const char lookup_source[] =
    "if ARGV[3] == '1' then redis.call('DEL', KEYS[1]) end\n"
    "local v = redis.call('GET', KEYS[1])\n"
    "if v then return {1, v} end\n"
    "if redis.call('EXISTS', KEYS[2]) == 1 then return {2, ''} end\n"
    "local h = redis.call('GET', KEYS[3])\n"
    "if (not h) or h == ARGV[1] then\n"
    "  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])\n"
    "  return {3, ''}\n"
    "end\n"
    "return {4, tostring(redis.call('PTTL', KEYS[3]))}\n";

/* KEYS: fresh, stale, missing, lock, variants.
 * ARGV: mode (found|missing|release), token, value, fresh ttl, stale ttl,
 * negative ttl, variant member, variants ttl.
 * Writes only while the caller still holds the lock (an invalidation deletes
 * it), then releases it.  Returns 1 when written, 0 when the lock was gone. */
static const char store_source[] = "if redis.call('GET', KEYS[4]) ~= ARGV[2] then return 0 end\n"
                                   "redis.call('DEL', KEYS[4])\n"
                                   "if ARGV[1] == 'found' then\n"
                                   "  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])\n"
                                   "  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[5])\n"
                                   "  redis.call('DEL', KEYS[3])\n"
                                   "elseif ARGV[1] == 'missing' then\n"
                                   "  redis.call('SET', KEYS[3], '1', 'PX', ARGV[6])\n"
                                   "  redis.call('DEL', KEYS[1], KEYS[2])\n"
                                   "else\n"
                                   "  return 1\n"
                                   "end\n"
                                   "redis.call('SADD', KEYS[5], ARGV[7])\n"
                                   "if redis.call('PTTL', KEYS[5]) < tonumber(ARGV[8]) then\n"
                                   "  redis.call('PEXPIRE', KEYS[5], ARGV[8])\n"
                                   "end\n"
                                   "return 1\n";

/* KEYS: the id's variants set.  ARGV: namespace, id.
 * Deletes the fresh entry, the stale copy, the remembered 404 and the lock of
 * the plain id and of every expand variant recorded in the set, then the set;
 * atomically.  The per-variant key names are built here from the set's
 * members, which is fine on one Redis server (not on Redis Cluster).
 * Returns the number of keys deleted. */
static const char invalidate_source[] =
    "local kinds = {'resource', 'resource-stale', 'resource-missing', 'resource-lock'}\n"
    "local members = redis.call('SMEMBERS', KEYS[1])\n"
    "members[#members + 1] = ''\n"
    "local n = 0\n"
    "for _, m in ipairs(members) do\n"
    "  for _, k in ipairs(kinds) do\n"
    "    n = n + redis.call('DEL', ARGV[1] .. ':' .. k .. m .. ':' .. ARGV[2])\n"
    "  end\n"
    "end\n"
    "return n + redis.call('DEL', KEYS[1])\n";

/* ---- keys and paths ------------------------------------------------------------- */

/* Percent-encodes s: every byte outside RFC 3986's unreserved set when
 * `only` is NULL, else just the bytes in `only`.  New string or NULL. */
static char *pct_encode(const char *s, const char *only)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = strlen(s);
    char *out = malloc(3 * n + 1), *o = out;

    if (!out)
        return NULL;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        int keep =
            only ? !strchr(only, *p)
                 : ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                    (*p >= '0' && *p <= '9') || *p == '-' || *p == '.' || *p == '_' || *p == '~');
        if (keep) {
            *o++ = (char)*p;
        } else {
            *o++ = '%';
            *o++ = hex[*p >> 4];
            *o++ = hex[*p & 15];
        }
    }
    *o = '\0';
    return out;
}

/* The cache slot of (id, expand) within a kind of key:
 *   <ns>:<kind>:<id>                  no expand (the contract's <ns>:resource:{id})
 *   <ns>:<kind>@<escaped expand>:<id> an expand variant
 * The namespace and kind contain neither ':' nor '@' and the escaped expand
 * has no ':', so no (id, expand) pair can name another pair's key, whatever
 * characters the id holds.  `member` is "" or "@<escaped expand>". */
static char *slot_key(const char *ns, const char *kind, const char *member, const char *id)
{
    char *k = NULL;
    if (asprintf(&k, "%s:%s%s:%s", ns, kind, member, id) < 0)
        return NULL;
    return k;
}

static char *variant_member(const char *expand)
{
    char *enc, *m = NULL;

    if (!expand)
        return strdup("");
    enc = pct_encode(expand, "%:");
    if (enc && asprintf(&m, "@%s", enc) < 0)
        m = NULL;
    free(enc);
    return m;
}

static char *provider_path(const char *id, const char *expand)
{
    char *eid = pct_encode(id, NULL), *eexp = expand ? pct_encode(expand, NULL) : NULL, *p = NULL;

    if (eid && (!expand || eexp) &&
        asprintf(&p, "/api/v1/external-resource/%s%s%s", eid, expand ? "?expand=" : "",
                 expand ? eexp : "") < 0)
        p = NULL;
    free(eid);
    free(eexp);
    return p;
}

static unsigned bucket_of(const char *key)
{
    unsigned h = 2166136261u;
    for (const unsigned char *p = (const unsigned char *)key; *p; p++)
        h = (h ^ *p) * 16777619u;
    return h % FLIGHT_BUCKETS;
}

/* ---- circuit breaker hooks ------------------------------------------------------ */

/* The two places the spec's circuit breaker plugs in.  They pass trivially
 * until common/breaker exists; then breaker_allows asks the shared breaker
 * (closed, or half-open with this call as its probe) and breaker_note feeds
 * it: 5xx, timeouts and connection errors count, 429 and 4xx never. */
static int breaker_allows(resolver *r)
{
    (void)r;
    return 1;
}

static void breaker_note(resolver *r, int failure)
{
    (void)r;
    (void)failure;
}

/* ---- bookkeeping ---------------------------------------------------------------- */

static void fq_push(fqueue *q, flight *f)
{
    f->qnext = NULL;
    if (q->tail)
        q->tail->qnext = f;
    else
        q->head = f;
    q->tail = f;
}

static void fq_push_front(fqueue *q, flight *f)
{
    f->qnext = q->head;
    q->head = f;
    if (!q->tail)
        q->tail = f;
}

static flight *fq_pop(fqueue *q)
{
    flight *f = q->head;
    if (f) {
        q->head = f->qnext;
        if (!q->head)
            q->tail = NULL;
        f->qnext = NULL;
    }
    return f;
}

static void req_free(rreq *q)
{
    if (q->r) {
        q->r->alive--;
        dl_del(&q->all);
    }
    delivery_free(q->d);
    json_decref(q->doc);
    free(q->member);
    free(q->fresh_key);
    free(q->stale_key);
    free(q);
}

/* Takes q out of its flight (if any), the deadline list and any queue. */
static void req_detach(rreq *q)
{
    if (q->f) {
        q->f->n_waiters--;
        q->f = NULL;
    }
    dl_del(&q->link);
    dl_del(&q->by_deadline);
}

static json_t *req_fields(const rreq *q)
{
    return json_pack("{s:s, s:s, s:s}", "requestId",
                     q->d->correlation_id ? q->d->correlation_id : "", "resourceId",
                     q->id ? q->id : "", "state", req_state_names[q->state]);
}

static void after_outcome(void *owner, int ok)
{
    rreq *q = owner;

    if (!q->r) { /* orphaned at shutdown: the runtime is going away */
        req_free(q);
        return;
    }
    if (ok) {
        rt_ack(q->r->rt, q->d);
    } else {
        log_json(IW_LOG_WARN, json_pack("{s:s, s:s, s:s}", "requestId",
                                        q->d->correlation_id ? q->d->correlation_id : "", "state",
                                        req_state_names[q->state], "message",
                                        "reply not confirmed by the broker; the request returns to "
                                        "its queue"));
        rt_nack(q->r->rt, q->d, 1);
    }
    req_free(q);
}

/* Sends body (stolen) to the request's reply_to; the ack follows the confirm. */
static void reply(rreq *q, json_t *body)
{
    resolver *r = q->r;

    req_detach(q);
    q->state = Q_REPLYING;
    q->outcome_pending = 1;
    rt_outcome_begin(&q->out, after_outcome, q);
    rt_publish_reply(r->rt, &q->out, q->d->reply_to, q->d->correlation_id, body);
    rt_outcome_seal(&q->out);
    json_decref(body);
}

static void reply_result(rreq *q, int found, const char *source, const json_t *data)
{
    json_t *body = json_pack("{s:s, s:b, s:s, s:O}", "id", q->id, "found", found, "source", source,
                             "data", found ? data : json_null());

    if (log_enabled(IW_LOG_DEBUG)) {
        json_t *f = req_fields(q);
        json_object_set_new(f, "source", json_string(source));
        json_object_set_new(f, "found", json_boolean(found));
        json_object_set_new(f, "duration", json_integer(clock_mono_ms() - q->received_ms));
        log_msg(IW_LOG_DEBUG, f, "look-up answered");
    }
    reply(q, body);
}

static void reply_error(rreq *q, const char *code, const char *message)
{
    json_t *f = req_fields(q);

    json_object_set_new(f, "duration", json_integer(clock_mono_ms() - q->received_ms));
    json_object_set_new(f, "error", json_pack("{s:s, s:s}", "code", code, "message", message));
    log_json(IW_LOG_ERROR, f);
    reply(q, json_pack("{s:s, s:{s:s, s:s}}", "id", q->id ? q->id : "", "error", "code", code,
                       "message", message));
}

/* Parses a cached OurFormat and checks it against the reply schema, so that
 * a corrupt or foreign value never reaches a caller.  New reference or NULL. */
static json_t *cached_data(resolver *r, const char *id, const char *text, size_t len)
{
    json_t *data = json_loadb(text, len, JSON_REJECT_DUPLICATES, NULL), *probe;
    iw_error err;

    if (!data)
        return NULL;
    probe =
        json_pack("{s:s, s:b, s:s, s:O}", "id", id, "found", 1, "source", "cache", "data", data);
    if (!probe || schema_validate(r->reply_schema, probe, &err) != IW_OK) {
        json_decref(data);
        data = NULL;
    }
    json_decref(probe);
    return data;
}

/* ---- flights -------------------------------------------------------------------- */

static void flight_unmap(flight *f)
{
    flight **pp;

    if (!f->in_map)
        return;
    for (pp = &f->r->buckets[bucket_of(f->k_fresh)]; *pp; pp = &(*pp)->hnext) {
        if (*pp == f) {
            *pp = f->hnext;
            break;
        }
    }
    f->hnext = NULL;
    f->in_map = 0;
}

static flight *flight_find(resolver *r, const char *fresh_key)
{
    for (flight *f = r->buckets[bucket_of(fresh_key)]; f; f = f->hnext)
        if (strcmp(f->k_fresh, fresh_key) == 0)
            return f;
    return NULL;
}

static void flight_free(flight *f)
{
    flight_unmap(f);
    dl_del(&f->all);
    free(f->id);
    free(f->expand);
    free(f->member);
    free(f->request_id);
    free(f->k_fresh);
    free(f->k_stale);
    free(f->k_missing);
    free(f->k_lock);
    free(f->k_variants);
    free(f->path);
    json_decref(f->data);
    free(f->data_text);
    free(f);
}

static void set_wait(flight *f, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_wait(flight *f, const char *code, const char *fmt, ...)
{
    va_list ap;

    f->wait_code = code;
    va_start(ap, fmt);
    vsnprintf(f->wait_msg, sizeof f->wait_msg, fmt, ap);
    va_end(ap);
}

static flight *flight_new(resolver *r, const rreq *q)
{
    flight *f = calloc(1, sizeof *f);
    const char *ns = r->cfg->ns;
    unsigned b;

    if (!f)
        return NULL;
    f->r = r;
    dl_init(&f->waiters);
    dl_push(&r->flights, &f->all);
    f->id = strdup(q->id);
    f->expand = q->expand ? strdup(q->expand) : NULL;
    f->member = strdup(q->member);
    f->request_id = strdup(q->d->correlation_id ? q->d->correlation_id : q->id);
    f->k_fresh = strdup(q->fresh_key);
    f->k_stale = strdup(q->stale_key);
    f->k_missing = slot_key(ns, "resource-missing", q->member, q->id);
    f->k_lock = slot_key(ns, "resource-lock", q->member, q->id);
    f->k_variants = slot_key(ns, "resource-variants", "", q->id);
    f->path = provider_path(q->id, q->expand);
    if (!f->id || (q->expand && !f->expand) || !f->member || !f->request_id || !f->k_fresh ||
        !f->k_stale || !f->k_missing || !f->k_lock || !f->k_variants || !f->path) {
        flight_free(f);
        return NULL;
    }
    snprintf(f->token, sizeof f->token, "%ld-%lx-%lld", (long)getpid(), (unsigned long)random(),
             ++r->seq);
    f->poll_ms = PEER_POLL_MIN_MS;
    f->state = F_LOOKUP;
    set_wait(f, "EXTERNAL_API_TIMEOUT", "no answer within IW_RESOLVER_WAIT (%ld ms)",
             r->cfg->resolver_wait_ms);
    b = bucket_of(f->k_fresh);
    f->hnext = r->buckets[b];
    r->buckets[b] = f;
    f->in_map = 1;
    return f;
}

static json_t *flight_fields(const flight *f)
{
    return json_pack("{s:s, s:s, s:s}", "requestId", f->request_id, "resourceId", f->id, "state",
                     flight_state_names[f->state]);
}

/* Gives up a flight nobody waits for (or that failed): out of the map at
 * once, its lock released through the store queue when it holds one. */
static void flight_drop(flight *f)
{
    flight_unmap(f);
    if (f->owns_lock) {
        f->state = F_STORING;
        f->result = RES_NONE;
        fq_push(&f->r->store_q, f);
    } else {
        flight_free(f);
    }
}

/* Ends every waiting request of f without an answer from the provider: from
 * the stale copy when `fallback` (the provider is unavailable), with the
 * error otherwise; then drops the flight. */
static void flight_fail(flight *f, const char *code, const char *message, int fallback)
{
    resolver *r = f->r;

    while (!dl_empty(&f->waiters)) {
        rreq *q = CONTAINER_OF(f->waiters.next, rreq, link);
        req_detach(q);
        if (fallback) {
            q->state = Q_FALLBACK;
            q->fb_code = code;
            snprintf(q->fb_msg, sizeof q->fb_msg, "%s", message);
            dl_push(&r->fallback_q, &q->link);
        } else {
            reply_error(q, code, message);
        }
    }
    flight_drop(f);
}

static void flight_wait(flight *f, flight_state state, long ms)
{
    f->state = state;
    f->node.due_ms = clock_mono_ms() + (ms > 0 ? ms : 0);
    f->node.item = f;
    if (jobheap_push(&f->r->timers, &f->node) != 0)
        flight_fail(f, "INTERNAL_ERROR", "out of memory", 1);
}

/* Answers every waiter from the flight's result. */
static void flight_answer(flight *f, const char *source)
{
    while (!dl_empty(&f->waiters)) {
        rreq *q = CONTAINER_OF(f->waiters.next, rreq, link);
        reply_result(q, f->result == RES_FOUND, source, f->data);
    }
}

/* ---- the provider call ---------------------------------------------------------- */

static void log_call(const flight *f, const http_response *resp, int level, const char *code,
                     const char *message)
{
    json_t *o = flight_fields(f);

    json_object_set_new(o, "operation", json_string("GET /external-resource/{id}"));
    json_object_set_new(o, "duration", json_integer(resp->duration_us / 1000));
    json_object_set_new(o, "status",
                        resp->result.status ? json_integer(resp->result.status) : json_null());
    json_object_set_new(o, "attempt", json_integer(f->attempts));
    if (code)
        json_object_set_new(
            o, "error",
            json_pack("{s:s, s:s, s:o, s:i}", "code", code, "message", message, "statusCode",
                      resp->result.status ? json_integer(resp->result.status) : json_null(),
                      "retryAttempt", f->attempts));
    log_json(level, o);
}

static void on_response(void *ud, const http_response *resp)
{
    flight *f = ud;
    resolver *r = f->r;
    const iw_config *cfg = r->cfg;
    iw_verdict v = retry_classify(&resp->result);
    char msg[400];

    r->calling--;
    breaker_note(r, v.breaker_failure);
    if (resp->result.transport != IW_TRANSPORT_OK)
        snprintf(msg, sizeof msg, "External API call failed: %s", resp->error);
    else
        snprintf(msg, sizeof msg, "External API returned %ld", resp->result.status);

    if (v.kind == IW_V_ACCEPT) {
        iw_error err = {0};
        json_t *body = json_loadb(resp->body, resp->body_len, 0, NULL);
        json_t *data = body ? transform_inbound(body, &err) : NULL;

        int parsed = body != NULL;

        json_decref(body);
        if (!data) {
            snprintf(msg, sizeof msg,
                     "External API returned %ld with a body of an unexpected shape: %s",
                     resp->result.status, parsed ? err.msg : "not JSON");
            log_call(f, resp, IW_LOG_ERROR, "EXTERNAL_API_BAD_RESPONSE", msg);
            flight_fail(f, "EXTERNAL_API_BAD_RESPONSE", msg, 0);
            return;
        }
        log_call(f, resp, IW_LOG_INFO, NULL, NULL);
        f->result = RES_FOUND;
        f->data = data;
        f->data_text = json_dumps(data, JSON_COMPACT);
        f->state = F_STORING;
        fq_push(&r->store_q, f);
        return;
    }
    if (resp->result.transport == IW_TRANSPORT_OK && resp->result.status == 404) {
        /* the spec: log a warning, return null */
        log_call(f, resp, IW_LOG_WARN, "EXTERNAL_API_NOT_FOUND", msg);
        f->result = RES_MISSING;
        f->state = F_STORING;
        fq_push(&r->store_q, f);
        return;
    }
    switch (v.kind) {
    case IW_V_RETRY: {
        long next =
            retry_delay_before(cfg->resolver_retry_ms, cfg->n_resolver_retry, f->attempts + 1);
        log_call(f, resp, IW_LOG_ERROR, v.code, msg);
        if (next >= 0 && f->n_waiters) {
            set_wait(f, "EXTERNAL_API_UNAVAILABLE", "%s", msg);
            flight_wait(f, F_DEFERRED, next);
        } else {
            flight_fail(f, "EXTERNAL_API_UNAVAILABLE", msg, 1);
        }
        break;
    }
    case IW_V_WAIT: {
        iw_error err;
        log_call(f, resp, IW_LOG_WARN, v.code, msg);
        if (limiter_pause(rt_limiter(r->rt), v.wait_ms, &err) != IW_OK)
            log_msg(IW_LOG_WARN, flight_fields(f), "could not share the 429 pause: %s", err.msg);
        f->attempts--; /* waiting for a reset uses no attempt */
        if (v.wait_ms <= cfg->resolver_wait_ms && f->n_waiters) {
            set_wait(f, "RATE_LIMITED", "External API rate limit (429); reset in %ld ms",
                     v.wait_ms);
            flight_wait(f, F_DEFERRED, v.wait_ms);
        } else {
            snprintf(msg, sizeof msg, "External API rate limit (429); reset in %ld ms", v.wait_ms);
            flight_fail(f, "RATE_LIMITED", msg, 1);
        }
        break;
    }
    default:
        log_call(f, resp, IW_LOG_ERROR, v.code, msg);
        flight_fail(f, v.code ? v.code : "EXTERNAL_API_ERROR", msg, 0);
        break;
    }
}

static void start_call(flight *f)
{
    resolver *r = f->r;

    f->state = F_CALLING;
    f->attempts++;
    set_wait(f, "EXTERNAL_API_TIMEOUT",
             "the External API did not answer within IW_RESOLVER_WAIT "
             "(%ld ms)",
             r->cfg->resolver_wait_ms);
    if (http_client_start(rt_http(r->rt), "GET", f->path, NULL, 0, NULL, on_response, f) == IW_OK) {
        r->calling++;
    } else {
        log_msg(IW_LOG_ERROR, flight_fields(f), "cannot start the provider call");
        flight_fail(f, "EXTERNAL_API_UNAVAILABLE", "cannot start the provider call", 1);
    }
}

/* ---- intake --------------------------------------------------------------------- */

/* A readable id of an invalid request, for its error reply. */
static const char *readable_id(const json_t *doc)
{
    const char *id = json_string_value(json_object_get(doc, "id"));
    return id && strlen(id) <= 256 ? id : "";
}

/* Dead-letters a request that cannot be served (with an error reply too when
 * it names a reply_to, so that its caller does not wait for a timeout). */
static void reject(rreq *q, const char *code, const char *message)
{
    resolver *r = q->r;
    json_t *f;

    q->state = Q_DEAD;
    f = req_fields(q);
    json_object_set_new(f, "resourceId", json_string(readable_id(q->doc)));
    json_object_set_new(f, "error", json_pack("{s:s, s:s}", "code", code, "message", message));
    log_json(IW_LOG_ERROR, f);
    q->outcome_pending = 1;
    rt_outcome_begin(&q->out, after_outcome, q);
    if (q->d->reply_to && *q->d->reply_to) {
        json_t *body = json_pack("{s:s, s:{s:s, s:s}}", "id", readable_id(q->doc), "error", "code",
                                 code, "message", message);
        rt_publish_reply(r->rt, &q->out, q->d->reply_to, q->d->correlation_id, body);
        json_decref(body);
    }
    rt_publish_dead(r->rt, &q->out, q->d, "resource", code, message, 0, 0);
    rt_outcome_seal(&q->out);
}

static void start_lookup(rreq *q)
{
    resolver *r = q->r;
    flight *f = flight_find(r, q->fresh_key);

    if (!f) {
        f = flight_new(r, q);
        if (!f) {
            reply_error(q, "INTERNAL_ERROR", "out of memory");
            return;
        }
        fq_push(&r->lookup_q, f);
    }
    q->state = Q_WAITING;
    q->f = f;
    dl_push(&f->waiters, &q->link);
    f->n_waiters++;
    if (q->critical && !f->critical) {
        f->critical = 1;
        if (f->state == F_PERMIT) { /* move it to the front line */
            fqueue *from = &r->permit_q[1];
            for (flight **pp = &from->head; *pp; pp = &(*pp)->qnext) {
                if (*pp == f) {
                    *pp = f->qnext;
                    if (from->tail == f) {
                        from->tail = NULL;
                        for (flight *t = from->head; t; t = t->qnext)
                            from->tail = t;
                    }
                    fq_push(&r->permit_q[0], f);
                    break;
                }
            }
        }
    }
    q->deadline_ms = q->received_ms + r->cfg->resolver_wait_ms;
    dl_push(&r->deadlines, &q->by_deadline);
}

static void on_delivery(void *self, iw_delivery *d)
{
    resolver *r = self;
    rreq *q = calloc(1, sizeof *q);
    const char *code, *prio, *rk = d->routing_key ? d->routing_key : "";
    char msg[512];

    if (!q) {
        rt_nack(r->rt, d, 1);
        delivery_free(d);
        return;
    }
    q->r = r;
    q->d = d;
    q->received_ms = clock_mono_ms();
    dl_init(&q->link);
    dl_init(&q->by_deadline);
    dl_push(&r->requests, &q->all);
    r->alive++;
    if (rt_stopping(r->rt)) {
        rt_nack(r->rt, d, 1);
        req_free(q);
        return;
    }
    q->invalidate = strcmp(rk, "resource.invalidate") == 0;
    if (!q->invalidate && strcmp(rk, "resource.get") != 0) {
        snprintf(msg, sizeof msg,
                 "routing key '%.100s' is neither resource.get nor "
                 "resource.invalidate",
                 rk);
        reject(q, "UNKNOWN_ROUTING_KEY", msg);
        return;
    }
    if (rt_intake(r->rt, d, q->invalidate ? r->inval_schema : r->get_schema, &q->doc, &code, msg,
                  sizeof msg) != IW_OK) {
        reject(q, code, msg);
        return;
    }
    q->state = Q_VALIDATED;
    q->id = json_string_value(json_object_get(q->doc, "id"));
    if (q->invalidate) {
        q->state = Q_INVALIDATING;
        dl_push(&r->inval_q, &q->link);
        return;
    }
    if (!d->reply_to || !*d->reply_to) {
        reject(q, "MISSING_REPLY_TO",
               "resource.get needs reply_to (and correlation_id): there is "
               "nowhere to send the answer");
        return;
    }
    q->expand = json_string_value(json_object_get(q->doc, "expand"));
    if (q->expand && !*q->expand)
        q->expand = NULL;
    /* look-ups are critical unless they say otherwise: a caller is waiting */
    prio = json_string_value(json_object_get(q->doc, "priority"));
    q->critical = !prio || strcmp(prio, "normal") != 0;
    q->member = variant_member(q->expand);
    if (q->member) {
        q->fresh_key = slot_key(r->cfg->ns, "resource", q->member, q->id);
        q->stale_key = slot_key(r->cfg->ns, "resource-stale", q->member, q->id);
    }
    if (!q->fresh_key || !q->stale_key) {
        reply_error(q, "INTERNAL_ERROR", "out of memory");
        return;
    }
    start_lookup(q);
}

/* ---- Redis round trips ---------------------------------------------------------- */

typedef enum op_kind { OP_STORE, OP_INVALIDATE, OP_LOOKUP, OP_STALE } op_kind;

typedef struct pending_op {
    op_kind kind;
    void *item;
} pending_op;

static int append_store(resolver *r, flight *f, iw_error *err)
{
    const iw_config *cfg = r->cfg;
    char ttl[24], stale_ttl[24], neg_ttl[24], set_ttl[24];
    long stale =
        cfg->cache_stale_ttl_ms > cfg->cache_ttl_ms ? cfg->cache_stale_ttl_ms : cfg->cache_ttl_ms;
    long set = stale > cfg->cache_negative_ttl_ms ? stale : cfg->cache_negative_ttl_ms;
    const char *mode = f->result == RES_FOUND     ? "found"
                       : f->result == RES_MISSING ? "missing"
                                                  : "release";
    const char *argv[13] = {
        f->k_fresh,    f->k_stale, f->k_missing, f->k_lock,
        f->k_variants, mode,       f->token,     f->data_text ? f->data_text : "",
        ttl,           stale_ttl,  neg_ttl,      f->member,
        set_ttl};

    snprintf(ttl, sizeof ttl, "%ld", cfg->cache_ttl_ms);
    snprintf(stale_ttl, sizeof stale_ttl, "%ld", stale);
    snprintf(neg_ttl, sizeof neg_ttl, "%ld", cfg->cache_negative_ttl_ms);
    snprintf(set_ttl, sizeof set_ttl, "%ld", set);
    return redis_link_append_script(rt_redis(r->rt), &r->s_store, 5, 13, argv, err);
}

static int append_invalidate(redis_link *link, const redis_script *s, const char *ns,
                             const char *id, iw_error *err)
{
    char *variants = slot_key(ns, "resource-variants", "", id);
    const char *argv[3] = {variants, ns, id};
    int rc;

    if (!variants)
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    rc = redis_link_append_script(link, s, 1, 3, argv, err);
    free(variants);
    return rc;
}

static int append_lookup(resolver *r, flight *f, iw_error *err)
{
    char lock_ms[24];
    const char *argv[6] = {f->k_fresh, f->k_missing, f->k_lock,
                           f->token,   lock_ms,      f->purge ? "1" : "0"};

    snprintf(lock_ms, sizeof lock_ms, "%ld", r->cfg->http_timeout_ms + LOCK_SLACK_MS);
    f->purge = 0;
    return redis_link_append_script(rt_redis(r->rt), &r->s_lookup, 3, 6, argv, err);
}

/* The result of a store: answer the waiters (even when the cache could not
 * be written: the answer is good, only later look-ups pay for it). */
static void done_store(flight *f, const redisReply *rep, const iw_error *err)
{
    if (!rep)
        log_msg(IW_LOG_WARN, flight_fields(f), "could not write the resource cache: %s", err->msg);
    else if (rep->type == REDIS_REPLY_INTEGER && rep->integer == 0 && f->result != RES_NONE)
        log_msg(IW_LOG_INFO, flight_fields(f),
                "resource invalidated during the provider call; its answer is not cached");
    f->owns_lock = 0;
    if (f->result != RES_NONE) {
        flight_answer(f, "provider");
        flight_unmap(f);
    }
    flight_free(f);
}

/* Unmaps this process's flights of an invalidated id: requests arriving from
 * now on start afresh instead of joining a call that began before. */
static void unmap_flights_of(resolver *r, const char *id)
{
    for (size_t b = 0; b < FLIGHT_BUCKETS; b++) {
        flight *f = r->buckets[b], *next;
        for (; f; f = next) {
            next = f->hnext;
            if (strcmp(f->id, id) == 0)
                flight_unmap(f);
        }
    }
}

static void done_invalidate(resolver *r, rreq *q, const redisReply *rep, const iw_error *err)
{
    json_t *f;

    if (!rep || rep->type != REDIS_REPLY_INTEGER) {
        char m[300];
        snprintf(m, sizeof m, "cannot invalidate: %s", rep ? "unexpected reply" : err->msg);
        if (!redis_link_connected(rt_redis(r->rt)))
            dl_push(&r->inval_q, &q->link); /* again once Redis is back */
        else
            reject(q, "CACHE_UNAVAILABLE", m); /* a script error would only repeat */
        return;
    }
    unmap_flights_of(r, q->id);
    f = req_fields(q);
    json_object_set_new(f, "keysDeleted", json_integer(rep->integer));
    log_msg(IW_LOG_INFO, f, "resource cache invalidated");
    if (q->d->reply_to && *q->d->reply_to) {
        reply(q, json_pack("{s:s, s:b}", "id", q->id, "invalidated", 1));
    } else {
        q->outcome_pending = 1;
        q->state = Q_REPLYING;
        rt_outcome_begin(&q->out, after_outcome, q);
        rt_outcome_seal(&q->out); /* nothing to publish: ack now */
    }
}

static void done_lookup(resolver *r, flight *f, const redisReply *rep, const iw_error *err)
{
    long long kind;

    if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 ||
        rep->element[0]->type != REDIS_REPLY_INTEGER ||
        rep->element[1]->type != REDIS_REPLY_STRING) {
        char m[300];
        snprintf(m, sizeof m, "resource cache look-up failed: %s",
                 rep ? "unexpected reply" : err->msg);
        log_msg(IW_LOG_WARN, flight_fields(f), "%s", m);
        if (!redis_link_connected(rt_redis(r->rt))) {
            /* connection lost or scripts flushed: the next tick reconnects */
            fq_push_front(&r->lookup_q, f);
        } else {
            /* Redis answers but the script fails: do not spin on it */
            flight_fail(f, "CACHE_UNAVAILABLE", m, 1);
        }
        return;
    }
    kind = rep->element[0]->integer;
    if (kind == 1) {
        json_t *data = cached_data(r, f->id, rep->element[1]->str, rep->element[1]->len);
        if (!data) {
            log_msg(IW_LOG_WARN, flight_fields(f),
                    "cached value is not OurFormat; deleting it and treating it as a miss");
            f->purge = 1;
            fq_push(&r->lookup_q, f);
            return;
        }
        f->result = RES_FOUND;
        f->data = data;
        flight_answer(f, "cache");
        flight_free(f);
    } else if (kind == 2) {
        f->result = RES_MISSING;
        flight_answer(f, "cache");
        flight_free(f);
    } else if (kind == 3) {
        f->owns_lock = 1;
        f->poll_ms = PEER_POLL_MIN_MS;
        if (!f->n_waiters) {
            flight_drop(f);
        } else if (!breaker_allows(r)) {
            flight_fail(f, "EXTERNAL_API_UNAVAILABLE", "circuit breaker open", 1);
        } else {
            f->state = F_PERMIT;
            set_wait(f, "RATE_LIMITED", "no rate-limit permit within IW_RESOLVER_WAIT (%ld ms)",
                     r->cfg->resolver_wait_ms);
            fq_push(&r->permit_q[f->critical ? 0 : 1], f);
        }
    } else {
        long pttl = strtol(rep->element[1]->str, NULL, 10);
        long wait = f->poll_ms;
        f->owns_lock = 0;
        if (pttl >= 0 && pttl + 1 < wait)
            wait = pttl + 1;
        f->poll_ms = f->poll_ms * 2 > PEER_POLL_MAX_MS ? PEER_POLL_MAX_MS : f->poll_ms * 2;
        set_wait(f, "EXTERNAL_API_TIMEOUT",
                 "another worker's provider call for this resource did not finish within "
                 "IW_RESOLVER_WAIT (%ld ms)",
                 r->cfg->resolver_wait_ms);
        flight_wait(f, F_PEER_WAIT, wait);
    }
}

static void done_stale(resolver *r, rreq *q, const redisReply *rep)
{
    json_t *data = NULL;

    if (rep && rep->type == REDIS_REPLY_STRING)
        data = cached_data(r, q->id, rep->str, rep->len);
    if (data) {
        json_t *f = req_fields(q);
        json_object_set_new(f, "error",
                            json_pack("{s:s, s:s}", "code", q->fb_code, "message", q->fb_msg));
        log_msg(IW_LOG_WARN, f, "answered from the stale copy");
        reply_result(q, 1, "stale-cache", data);
        json_decref(data);
    } else {
        reply_error(q, q->fb_code, q->fb_msg);
    }
}

/* One round trip: stores first (a look-up or invalidation later in the same
 * batch sees them), then invalidations, look-ups and stale reads. */
static void run_pipeline(resolver *r)
{
    redis_link *link = rt_redis(r->rt);
    pending_op ops[MAX_PIPELINE];
    size_t n = 0;
    iw_error err = {0};
    int ok = 1;

    while (ok && n < MAX_PIPELINE && r->store_q.head) {
        if ((ok = append_store(r, r->store_q.head, &err) == IW_OK))
            ops[n++] = (pending_op){OP_STORE, fq_pop(&r->store_q)};
    }
    while (ok && n < MAX_PIPELINE && !dl_empty(&r->inval_q)) {
        rreq *q = CONTAINER_OF(r->inval_q.next, rreq, link);
        if ((ok = append_invalidate(link, &r->s_invalidate, r->cfg->ns, q->id, &err) == IW_OK)) {
            dl_del(&q->link);
            ops[n++] = (pending_op){OP_INVALIDATE, q};
        }
    }
    while (ok && n < MAX_PIPELINE && r->lookup_q.head) {
        flight *f = r->lookup_q.head;
        if (!f->n_waiters) {
            fq_pop(&r->lookup_q);
            flight_drop(f);
            continue;
        }
        if ((ok = append_lookup(r, f, &err) == IW_OK))
            ops[n++] = (pending_op){OP_LOOKUP, fq_pop(&r->lookup_q)};
    }
    while (ok && n < MAX_PIPELINE && !dl_empty(&r->fallback_q)) {
        rreq *q = CONTAINER_OF(r->fallback_q.next, rreq, link);
        if ((ok = redis_link_append(link, &err, "GET %s", q->stale_key) == IW_OK)) {
            dl_del(&q->link);
            ops[n++] = (pending_op){OP_STALE, q};
        }
    }
    for (size_t i = 0; i < n; i++) {
        redisReply *rep = NULL;
        if (redis_link_read(link, &rep, &err) != IW_OK)
            rep = NULL;
        switch (ops[i].kind) {
        case OP_STORE:
            done_store(ops[i].item, rep, &err);
            break;
        case OP_INVALIDATE:
            done_invalidate(r, ops[i].item, rep, &err);
            break;
        case OP_LOOKUP:
            done_lookup(r, ops[i].item, rep, &err);
            break;
        case OP_STALE:
            done_stale(r, ops[i].item, rep);
            break;
        }
        if (rep)
            freeReplyObject(rep);
    }
}

/* Redis is down: nothing can be read, locked or metered, so every look-up
 * is answered now rather than after a timeout.  Invalidations without a
 * reply_to wait (unacked) for Redis to come back. */
static void redis_down(resolver *r)
{
    static const char msg[] = "the resource cache (Redis) is unavailable";
    flight *f;

    while ((f = fq_pop(&r->store_q))) {
        log_msg(IW_LOG_WARN, flight_fields(f), "could not write the resource cache: Redis is down");
        f->owns_lock = 0;
        if (f->result != RES_NONE)
            flight_answer(f, "provider");
        flight_free(f);
    }
    while ((f = fq_pop(&r->lookup_q))) {
        f->owns_lock = 0;
        flight_fail(f, "CACHE_UNAVAILABLE", msg, 0);
    }
    for (int i = 0; i < 2; i++)
        while ((f = fq_pop(&r->permit_q[i]))) {
            f->owns_lock = 0;
            flight_fail(f, "CACHE_UNAVAILABLE", msg, 0);
        }
    while (!dl_empty(&r->fallback_q)) {
        rreq *q = CONTAINER_OF(r->fallback_q.next, rreq, link);
        reply_error(q, q->fb_code, q->fb_msg);
    }
    for (dlink *l = r->inval_q.next, *next; l != &r->inval_q; l = next) {
        rreq *q = CONTAINER_OF(l, rreq, link);
        next = l->next;
        if (q->d->reply_to && *q->d->reply_to)
            reply_error(q, "CACHE_UNAVAILABLE", msg);
    }
}

/* ---- permits -------------------------------------------------------------------- */

/* One limiter take for up to PERMIT_BATCH flights of one priority; returns 0
 * when the limiter is unavailable (the flights wait; their requests fall
 * back at their deadlines). */
static int permit_batch(resolver *r, int prio, long long now)
{
    const iw_config *cfg = r->cfg;
    flight *batch[PERMIT_BATCH];
    size_t n = 0;
    long slots = cfg->concurrency - r->calling;
    limiter_result res;
    iw_error err;

    while (n < PERMIT_BATCH && (long)n < slots && r->permit_q[prio].head) {
        flight *f = fq_pop(&r->permit_q[prio]);
        if (f->n_waiters)
            batch[n++] = f;
        else
            flight_drop(f);
    }
    if (!n)
        return 1;
    if (limiter_append_take(rt_limiter(r->rt), "resource",
                            prio == 0 ? 1000 : (int)cfg->resource_share_pct * 10, (int)n, 0, NULL,
                            &err) != IW_OK ||
        limiter_read_take(rt_limiter(r->rt), &res, &err) != IW_OK) {
        log_json(IW_LOG_ERROR,
                 json_pack("{s:s, s:{s:s, s:s}}", "message", "limiter unavailable; look-ups wait",
                           "error", "code", "LIMITER_UNAVAILABLE", "message", err.msg));
        while (n) {
            flight *f = batch[--n];
            set_wait(f, "CACHE_UNAVAILABLE", "the rate limiter (Redis) is unavailable");
            fq_push_front(&r->permit_q[prio], f);
        }
        r->blocked_until = now + 1000;
        return 0;
    }
    if (res.usage_permille >= 800 && now - r->last_usage_warn > USAGE_WARN_MS) {
        r->last_usage_warn = now;
        log_json(IW_LOG_WARN, json_pack("{s:s, s:i}", "message",
                                        "rate limit approaching: a tier of IW_RATE_LIMITS is over "
                                        "80% used",
                                        "usagePermille", res.usage_permille));
    }
    for (size_t i = 0; i < n; i++) {
        flight *f = batch[i];
        if ((int)i < res.granted) {
            start_call(f);
        } else if (res.wait_ms > cfg->resolver_wait_ms) {
            char m[200];
            snprintf(m, sizeof m, "%s; next permit in %ld ms",
                     res.paused ? "the External API asked us to pause (429)"
                                : "rate limit reached (IW_RATE_LIMITS)",
                     res.wait_ms);
            flight_fail(f, "RATE_LIMITED", m, 1);
        } else {
            set_wait(f, "RATE_LIMITED", "no rate-limit permit within IW_RESOLVER_WAIT (%ld ms)",
                     cfg->resolver_wait_ms);
            flight_wait(f, F_DEFERRED, res.wait_ms);
        }
    }
    limiter_result_release(&res);
    return 1;
}

/* ---- the tick ------------------------------------------------------------------- */

static void expire_deadlines(resolver *r, long long now)
{
    while (!dl_empty(&r->deadlines)) {
        rreq *q = CONTAINER_OF(r->deadlines.next, rreq, by_deadline);
        flight *f = q->f;
        if (q->deadline_ms > now)
            break;
        req_detach(q);
        q->state = Q_FALLBACK;
        q->fb_code = f ? f->wait_code : "EXTERNAL_API_TIMEOUT";
        snprintf(q->fb_msg, sizeof q->fb_msg, "%s", f ? f->wait_msg : "no answer in time");
        dl_push(&r->fallback_q, &q->link);
    }
}

static int redis_work(const resolver *r)
{
    return r->store_q.head || r->lookup_q.head || !dl_empty(&r->fallback_q) ||
           !dl_empty(&r->inval_q);
}

static void tick(void *self, long long now)
{
    resolver *r = self;
    jobheap_node *top;

    expire_deadlines(r, now);
    while ((top = jobheap_peek(&r->timers)) && top->due_ms <= now) {
        flight *f = jobheap_pop(&r->timers)->item;
        if (!f->n_waiters) {
            flight_drop(f);
        } else {
            f->state = F_LOOKUP;
            fq_push(&r->lookup_q, f);
        }
    }
    if (redis_work(r) || r->permit_q[0].head || r->permit_q[1].head) {
        if (!rt_redis_ready(r->rt)) {
            redis_down(r);
            return;
        }
        run_pipeline(r);
    }
    for (int prio = 0; prio < 2; prio++)
        while (r->permit_q[prio].head && r->calling < r->cfg->concurrency &&
               now >= r->blocked_until && redis_link_connected(rt_redis(r->rt)))
            if (!permit_batch(r, prio, now))
                break;
}

static long long next_deadline(void *self)
{
    resolver *r = self;
    jobheap_node *top = jobheap_peek(&r->timers);
    long long d = top ? top->due_ms : LLONG_MAX;
    int connected = redis_link_connected(rt_redis(r->rt));

    if (!dl_empty(&r->deadlines)) {
        rreq *q = CONTAINER_OF(r->deadlines.next, rreq, by_deadline);
        if (q->deadline_ms < d)
            d = q->deadline_ms;
    }
    if (r->store_q.head || r->lookup_q.head || !dl_empty(&r->fallback_q))
        return 0;
    if (!dl_empty(&r->inval_q)) {
        long long t = connected ? 0 : clock_mono_ms() + REDIS_RETRY_MS;
        if (t < d)
            d = t;
    }
    if ((r->permit_q[0].head || r->permit_q[1].head) && r->calling < r->cfg->concurrency) {
        long long b = connected ? r->blocked_until : clock_mono_ms() + REDIS_RETRY_MS;
        if (b < d)
            d = b;
    }
    return d;
}

/* Frees every request that waits (not those whose reply is being confirmed);
 * with nack, they go back to the queue first. */
static void drop_requests(resolver *r, int nack, int invalidations_only)
{
    for (dlink *l = r->requests.next, *next; l != &r->requests; l = next) {
        rreq *q = CONTAINER_OF(l, rreq, all);
        next = l->next;
        if (q->outcome_pending || (invalidations_only && !q->invalidate))
            continue;
        req_detach(q);
        if (nack)
            rt_nack(r->rt, q->d, 1);
        req_free(q);
    }
}

static void on_link_lost(void *self)
{
    /* every delivery held is void: the broker requeues them; flights go on
     * (a call in progress still fills the cache) and are dropped once idle */
    drop_requests(self, 0, 0);
}

static void on_stop(void *self)
{
    /* look-ups are answered within IW_RESOLVER_WAIT, so they finish; only
     * invalidations waiting for Redis go back to the queue */
    drop_requests(self, 1, 1);
}

static size_t busy(void *self)
{
    resolver *r = self;
    return r->alive + (size_t)r->calling;
}

/* ---- construction --------------------------------------------------------------- */

resolver *resolver_new(runtime *rt, iw_error *err)
{
    resolver *r = calloc(1, sizeof *r);

    if (!r) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        return NULL;
    }
    r->rt = rt;
    r->cfg = rt_config(rt);
    dl_init(&r->deadlines);
    dl_init(&r->fallback_q);
    dl_init(&r->inval_q);
    dl_init(&r->requests);
    dl_init(&r->flights);
    r->s_lookup.source = lookup_source;
    r->s_store.source = store_source;
    r->s_invalidate.source = invalidate_source;
    if (!(r->get_schema = rt_load_schema(rt, "resource-get.schema.json", err)) ||
        !(r->inval_schema = rt_load_schema(rt, "resource-invalidate.schema.json", err)) ||
        !(r->reply_schema = rt_load_schema(rt, "resource-reply.schema.json", err))) {
        resolver_free(r);
        return NULL;
    }
    /* loaded on every (re)connect of the shared link */
    redis_link_add_script(rt_redis(rt), &r->s_lookup);
    redis_link_add_script(rt_redis(rt), &r->s_store);
    redis_link_add_script(rt_redis(rt), &r->s_invalidate);
    return r;
}

void resolver_free(resolver *r)
{
    if (!r)
        return;
    for (dlink *l = r->requests.next, *next; l != &r->requests; l = next) {
        rreq *q = CONTAINER_OF(l, rreq, all);
        next = l->next;
        if (q->outcome_pending) {
            /* its confirm fails when the link is freed: free it then */
            dl_del(&q->all);
            q->r = NULL;
        } else {
            req_detach(q);
            req_free(q);
        }
    }
    while (!dl_empty(&r->flights))
        flight_free(CONTAINER_OF(r->flights.next, flight, all));
    jobheap_clear(&r->timers);
    schema_free(r->get_schema);
    schema_free(r->inval_schema);
    schema_free(r->reply_schema);
    free(r);
}

int resolver_register(resolver *r)
{
    rt_role role = {"resolver",    "resource",   r,       on_delivery, tick,
                    next_deadline, on_link_lost, on_stop, busy};
    return runtime_add_role(r->rt, &role);
}

/* ---- the ops command ------------------------------------------------------------ */

int resolver_cache_invalidate_cmd(const iw_config *cfg, const char *id)
{
    iw_error err = {0};
    redis_script script = {invalidate_source, ""};
    redis_link *link = redis_link_from_config(cfg, &err);
    redisReply *rep = NULL;
    int rc = 1;

    if (!link)
        goto out;
    redis_link_add_script(link, &script);
    if (redis_link_ensure(link, &err) != IW_OK ||
        append_invalidate(link, &script, cfg->ns, id, &err) != IW_OK ||
        redis_link_read(link, &rep, &err) != IW_OK)
        goto out;
    printf("invalidated resource %s in namespace %s (%lld cache keys deleted)\n", id, cfg->ns,
           rep->type == REDIS_REPLY_INTEGER ? rep->integer : 0LL);
    rc = 0;
out:
    if (rc)
        fprintf(stderr, "integration-worker cache invalidate: %s\n",
                err.msg[0] ? err.msg : "failed");
    if (rep)
        freeReplyObject(rep);
    redis_link_free(link);
    return rc;
}
