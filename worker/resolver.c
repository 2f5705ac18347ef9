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

#include "buf.h"
#include "cache.h"
#include "clock.h"
#include "intake.h"
#include "json_read.h"
#include "limiter.h"
#include "log.h"
#include "retry.h"
#include "roles.h"
#include "json_out.h"
#include "transform.h"

#define FLIGHT_BUCKETS 4096
#define MAX_PIPELINE 512    /* Redis commands per round trip */
#define PEER_POLL_MIN_MS 5  /* first cache re-read while a peer calls */
#define PEER_POLL_MAX_MS 50 /* ... doubling up to this */
#define LOCK_SLACK_MS 1000  /* the lock outlives one provider call by this */
#define REDIS_RETRY_MS 1000 /* queued invalidations retry Redis this often */

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
    F_PREFER_STALE,
} flight_state;

static const char *const flight_state_names[] = {
    "lookup", "waiting-for-peer", "deferred", "permitting", "calling", "storing", "stale-first"};

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
    long long received_ms;
    cache_slot slot;     /* slot.fresh is also the flight map key */
    struct flight *f;    /* while waiting */
    dlink link;          /* in a flight's waiters, the fallback or the invalidation queue */
    loop_timer deadline; /* IW_RESOLVER_WAIT after it arrived */
    dlink all;
    iw_code fb_code; /* why it falls back: the error if nothing is cached */
    char fb_msg[256];
    rt_outcome out;
} rreq;

typedef struct flight {
    call call; /* first: the engine's call of this flight */
    struct resolver *r;
    char *id, *expand, *request_id;
    cache_slot slot;
    char *path;
    char token[64];
    flight_state state;
    int in_map, owns_lock, critical, attempts;
    int purge;         /* the fresh value was not OurFormat: the next look-up deletes it */
    int token_retried; /* a 401 was retried once with a new token */
    long poll_ms;
    dlink waiters;
    size_t n_waiters;
    loop_timer timer; /* waiting-for-peer and deferred */
    flight_result result;
    json_t *data;
    char *data_text;
    iw_code wait_code; /* the error a request gets when its deadline passes now */
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
    engine *e;
    loop *lp;
    const iw_config *cfg;
    cache *cache;
    iw_schema *get_schema, *inval_schema, *reply_schema;
    flight *buckets[FLIGHT_BUCKETS];
    fqueue lookup_q, store_q;
    fqueue prefer_q; /* flights that try the stale copy first (the API is down) */
    dlink fallback_q, inval_q;
    dlink requests, flights; /* everything alive, for the free and link-lost paths */
    size_t alive;
    int calling;
    long long redis_retry_at, seq;
    loop_timer redis_retry; /* wakes the loop for queued invalidations */
    call_kind kind;
};

/* ---- keys and paths ------------------------------------------------------------- */

static char *provider_path(const char *id, const char *expand)
{
    char *eid = cache_pct_encode(id, NULL), *eexp = expand ? cache_pct_encode(expand, NULL) : NULL;
    char *p = NULL;

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
    if (q->r)
        loop_timer_cancel(q->r->lp, &q->deadline);
    delivery_free(q->d);
    json_decref(q->doc);
    cache_slot_free(&q->slot);
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
    loop_timer_cancel(q->r->lp, &q->deadline);
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
        log_msg(IW_LOG_WARN,
                json_pack("{s:s, s:s}", "requestId",
                          q->d->correlation_id ? q->d->correlation_id : "", "state",
                          req_state_names[q->state]),
                "reply not published (%s); the request returns to its queue",
                iw_strerror(q->out.status));
        rt_nack(q->r->rt, q->d, 1);
    }
    req_free(q);
}

/* Sends body (stolen) to the request's reply_to; the ack follows the confirm. */
static void reply(rreq *q, json_t *body)
{
    resolver *r = q->r;

    req_detach(q);
    metrics_job_outcome(IW_ROLE_RESOLVER,
                        q->invalidate ? IW_OUTCOME_INVALIDATED : IW_OUTCOME_ANSWERED);
    q->state = Q_REPLYING;
    q->outcome_pending = 1;
    rt_outcome_begin(&q->out, after_outcome, q);
    rt_publish_reply(r->rt, &q->out, q->d->reply_to, q->d->correlation_id, body);
    rt_outcome_seal(&q->out);
    json_decref(body);
}

static void reply_result(rreq *q, int found, const char *source, const json_t *data)
{
    metrics_cache(!strcmp(source, "provider")      ? IW_CACHE_MISS
                  : !strcmp(source, "stale-cache") ? IW_CACHE_STALE
                  : found                          ? IW_CACHE_HIT
                                                   : IW_CACHE_NEGATIVE_HIT);
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

static void reply_error(rreq *q, iw_code code, const char *message)
{
    json_t *f = req_fields(q);

    json_object_set_new(f, "duration", json_integer(clock_mono_ms() - q->received_ms));
    json_object_set_new(f, "error",
                        json_pack("{s:s, s:s}", "code", iw_code_name(code), "message", message));
    log_json(IW_LOG_ERROR, f);
    reply(q, json_pack("{s:s, s:{s:s, s:s}}", "id", q->id ? q->id : "", "error", "code",
                       iw_code_name(code), "message", message));
}

/* Parses a cached OurFormat and checks it against the reply schema, so that
 * a corrupt or foreign value never reaches a caller.  New reference or NULL. */
static json_t *cached_data(resolver *r, const char *id, const char *text, size_t len)
{
    json_t *data = json_read(text, len, JSON_REJECT_DUPLICATES, NULL), *probe;
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
    for (pp = &f->r->buckets[bucket_of(f->slot.fresh)]; *pp; pp = &(*pp)->hnext) {
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
        if (strcmp(f->slot.fresh, fresh_key) == 0)
            return f;
    return NULL;
}

static void flight_free(flight *f)
{
    flight_unmap(f);
    dl_del(&f->all);
    free(f->id);
    free(f->expand);
    free(f->request_id);
    cache_slot_free(&f->slot);
    free(f->path);
    loop_timer_cancel(f->r->lp, &f->timer);
    engine_unask(f->r->e, &f->call);
    json_decref(f->data);
    free(f->data_text);
    free(f);
}

static void set_wait(flight *f, iw_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_wait(flight *f, iw_code code, const char *fmt, ...)
{
    va_list ap;

    f->wait_code = code;
    va_start(ap, fmt);
    vsnprintf(f->wait_msg, sizeof f->wait_msg, fmt, ap);
    va_end(ap);
}

static const call_ops flight_call_ops;
static void flight_timer(loop *l, loop_timer *t);

static flight *flight_new(resolver *r, const rreq *q)
{
    flight *f = calloc(1, sizeof *f);
    unsigned b;

    if (!f)
        return NULL;
    f->r = r;
    f->call.kind = &r->kind;
    f->call.ops = &flight_call_ops;
    loop_timer_init(&f->timer, flight_timer, f);
    dl_init(&f->waiters);
    dl_push(&r->flights, &f->all);
    f->id = strdup(q->id);
    f->expand = q->expand ? strdup(q->expand) : NULL;
    f->request_id = strdup(q->d->correlation_id ? q->d->correlation_id : q->id);
    f->path = provider_path(q->id, q->expand);
    if (!f->id || (q->expand && !f->expand) || !f->request_id || !f->path ||
        cache_slot_init(r->cache, &f->slot, q->id, q->expand) != IW_OK) {
        flight_free(f);
        return NULL;
    }
    snprintf(f->token, sizeof f->token, "%ld-%lx-%lld", (long)getpid(), (unsigned long)random(),
             ++r->seq);
    f->poll_ms = PEER_POLL_MIN_MS;
    f->state = F_LOOKUP;
    set_wait(f, IW_C_EXTERNAL_API_TIMEOUT, "no answer within IW_RESOLVER_WAIT (%ld ms)",
             r->cfg->resolver_wait_ms);
    b = bucket_of(f->slot.fresh);
    f->hnext = r->buckets[b];
    r->buckets[b] = f;
    f->in_map = 1;
    return f;
}

static size_t call_fields(const call *c, call_field *out)
{
    const flight *f = (const flight *)c;

    out[0] = (call_field){"requestId", f->request_id ? f->request_id : ""};
    out[1] = (call_field){"resourceId", f->id ? f->id : ""};
    out[2] = (call_field){"state", flight_state_names[f->state]};
    return 3;
}

static json_t *flight_fields(const flight *f)
{
    return engine_call_fields(&f->call);
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
static void flight_fail(flight *f, iw_code code, const char *message, int fallback)
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
    if (loop_timer_at(f->r->lp, &f->timer, clock_mono_ms() + (ms > 0 ? ms : 0)) != 0)
        flight_fail(f, IW_C_INTERNAL_ERROR, "out of memory", 1);
}

/* A peer's call or a deferral is over: look the slot up again. */
static void flight_timer(loop *l, loop_timer *t)
{
    flight *f = t->ud;

    (void)l;
    if (!f->n_waiters) {
        flight_drop(f);
    } else {
        f->state = F_LOOKUP;
        fq_push(&f->r->lookup_q, f);
    }
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

static void start_call(flight *f)
{
    resolver *r = f->r;

    int rc;

    f->state = F_CALLING;
    f->attempts++;
    f->call.attempt = f->attempts;
    set_wait(f, IW_C_EXTERNAL_API_TIMEOUT,
             "the External API did not answer within IW_RESOLVER_WAIT "
             "(%ld ms)",
             r->cfg->resolver_wait_ms);
    if ((rc = engine_call(r->e, &f->call, "GET", f->path, NULL, 0, NULL)) == IW_OK) {
        r->calling++;
    } else if (rc == IW_ERR_URL_TOO_LONG || rc == IW_ERR_URL_INVALID) {
        /* this id can never be asked for: an error reply, not a fallback */
        flight_fail(f, IW_C_REQUEST_NOT_SENT, iw_strerror(rc), 0);
    } else {
        log_msg(IW_LOG_ERROR, flight_fields(f), "cannot start the provider call (%s)",
                iw_strerror(rc));
        flight_fail(f, IW_C_EXTERNAL_API_UNAVAILABLE, "cannot start the provider call", 1);
    }
}

/* The engine's permit decision for a flight: a wait longer than the caller
 * can wait (an open breaker, a long rate-limit wait, a maintenance window)
 * answers from the cache now, stale allowed. */
static void on_permit(call *c, call_permit p, long wait_ms, int reason, const char *record,
                      size_t len)
{
    flight *f = (flight *)c;
    const iw_config *cfg = f->r->cfg;
    char m[200];

    (void)record;
    (void)len;
    if (!f->n_waiters) {
        flight_drop(f);
    } else if (p == CALL_GRANTED) {
        start_call(f);
    } else if (p == CALL_DEFERRED) {
        snprintf(m, sizeof m, "a maintenance window of the External API; it ends in %ld ms",
                 wait_ms);
        flight_fail(f, IW_C_EXTERNAL_API_UNAVAILABLE, m, 1);
    } else if (reason == LIMITER_WAIT_BREAKER) {
        snprintf(m, sizeof m, "circuit breaker open; the next probe in %ld ms", wait_ms);
        flight_fail(f, IW_C_EXTERNAL_API_UNAVAILABLE, m, 1);
    } else if (wait_ms > cfg->resolver_wait_ms) {
        snprintf(m, sizeof m, "%s; next permit in %ld ms",
                 reason == LIMITER_WAIT_PAUSE ? "the External API asked us to pause (429)"
                                              : "rate limit reached (IW_RATE_LIMITS)",
                 wait_ms);
        flight_fail(f, IW_C_RATE_LIMITED, m, 1);
    } else {
        set_wait(f, IW_C_RATE_LIMITED, "no rate-limit permit within IW_RESOLVER_WAIT (%ld ms)",
                 cfg->resolver_wait_ms);
        flight_wait(f, F_DEFERRED, wait_ms);
    }
}

/* A 2xx: the body through the inbound mapping, then stored and answered. */
static void answer_found(flight *f, const http_response *resp, iw_verdict *v)
{
    iw_error err = {0};
    json_t *body = json_read(resp->body, resp->body_len, 0, NULL);
    json_t *data = body ? transform_inbound(body, &err) : NULL;
    char msg[400];

    if (!data) {
        snprintf(msg, sizeof msg,
                 "External API returned %ld with a body of an unexpected shape: %s",
                 resp->result.status, body ? err.msg : "not JSON");
        v->kind = IW_V_FAIL;
        v->code = IW_C_EXTERNAL_API_BAD_RESPONSE;
        engine_log_call(&f->call, resp, v, NULL, NULL);
        json_decref(body);
        flight_fail(f, IW_C_EXTERNAL_API_BAD_RESPONSE, msg, 0);
        return;
    }
    json_decref(body);
    engine_log_call(&f->call, resp, v, NULL, NULL);
    f->result = RES_FOUND;
    f->data = data;
    f->data_text = json_out_text(data, NULL);
    f->state = F_STORING;
    fq_push(&f->r->store_q, f);
}

static void on_answer(call *c, const http_response *resp, iw_verdict *v)
{
    flight *f = (flight *)c;
    resolver *r = f->r;
    const iw_config *cfg = r->cfg;
    char msg[400];

    r->calling--;
    engine_answer_message(resp, msg, sizeof msg);
    if (v->kind == IW_V_ACCEPT) {
        answer_found(f, resp, v);
        return;
    }
    if (resp->result.token_refused && !f->token_retried && f->n_waiters) {
        /* a 401 with a token: one retry with the new one, under a permit */
        engine_log_call(c, resp, v, NULL, NULL);
        f->token_retried = 1;
        f->attempts--;
        metrics_retry(c->kind->route, IW_RETRY_UNAUTHORIZED);
        flight_wait(f, F_DEFERRED, 0);
        return;
    }
    engine_log_call(c, resp, v, NULL, NULL);
    if (resp->result.transport == IW_TRANSPORT_OK && resp->result.status == 404) {
        /* the spec: log a warning, return null */
        f->result = RES_MISSING;
        f->state = F_STORING;
        fq_push(&r->store_q, f);
        return;
    }
    switch (v->kind) {
    case IW_V_RETRY: {
        long next =
            retry_delay_before(cfg->resolver_retry_ms, cfg->n_resolver_retry, f->attempts + 1);
        if (next >= 0 && f->n_waiters) {
            set_wait(f, IW_C_EXTERNAL_API_UNAVAILABLE, "%s", msg);
            flight_wait(f, F_DEFERRED, next);
        } else {
            flight_fail(f, IW_C_EXTERNAL_API_UNAVAILABLE, msg, 1);
        }
        break;
    }
    case IW_V_WAIT:
        f->attempts--; /* waiting for a reset uses no attempt */
        if (resp->result.transport == IW_TRANSPORT_NO_TOKEN) {
            /* no OAuth token yet: not the provider's limit, the provider unavailable */
            if (v->wait_ms <= cfg->resolver_wait_ms && f->n_waiters) {
                set_wait(f, IW_C_EXTERNAL_API_UNAVAILABLE, "%s", msg);
                flight_wait(f, F_DEFERRED, v->wait_ms);
            } else {
                flight_fail(f, IW_C_EXTERNAL_API_UNAVAILABLE, msg, 1);
            }
            break;
        }
        if (v->wait_ms <= cfg->resolver_wait_ms && f->n_waiters) {
            set_wait(f, IW_C_RATE_LIMITED, "External API rate limit (429); reset in %ld ms",
                     v->wait_ms);
            flight_wait(f, F_DEFERRED, v->wait_ms);
        } else {
            snprintf(msg, sizeof msg, "External API rate limit (429); reset in %ld ms", v->wait_ms);
            flight_fail(f, IW_C_RATE_LIMITED, msg, 1);
        }
        break;
    default:
        flight_fail(f, v->code != IW_C_NONE ? v->code : IW_C_EXTERNAL_API_ERROR, msg, 0);
        break;
    }
}

static const call_ops flight_call_ops = {on_permit, on_answer, call_fields};

/* ---- intake --------------------------------------------------------------------- */

/* A readable id of an invalid request, for its error reply. */
static const char *readable_id(const json_t *doc)
{
    const char *id = json_string_value(json_object_get(doc, "id"));
    return id && strlen(id) <= 256 ? id : "";
}

/* Dead-letters a request that cannot be served (with an error reply too when
 * it names a reply_to, so that its caller does not wait for a timeout). */
static void reject(rreq *q, iw_code code, const char *message)
{
    resolver *r = q->r;
    json_t *f;

    q->state = Q_DEAD;
    metrics_job_outcome(IW_ROLE_RESOLVER, IW_OUTCOME_DEAD);
    f = req_fields(q);
    json_object_set_new(f, "resourceId", json_string(readable_id(q->doc)));
    json_object_set_new(f, "error",
                        json_pack("{s:s, s:s}", "code", iw_code_name(code), "message", message));
    log_json(IW_LOG_ERROR, f);
    q->outcome_pending = 1;
    rt_outcome_begin(&q->out, after_outcome, q);
    if (q->d->reply_to && *q->d->reply_to) {
        json_t *body = json_pack("{s:s, s:{s:s, s:s}}", "id", readable_id(q->doc), "error", "code",
                                 iw_code_name(code), "message", message);
        rt_publish_reply(r->rt, &q->out, q->d->reply_to, q->d->correlation_id, body);
        json_decref(body);
    }
    rt_publish_dead(r->rt, &q->out, q->d, IW_ROLE_RESOLVER, "resource", iw_code_name(code), message,
                    0, 0);
    rt_outcome_seal(&q->out);
}

static void start_lookup(rreq *q)
{
    resolver *r = q->r;
    flight *f = flight_find(r, q->slot.fresh);

    if (!f) {
        f = flight_new(r, q);
        if (!f) {
            reply_error(q, IW_C_INTERNAL_ERROR, "out of memory");
            return;
        }
        fq_push(&r->lookup_q, f);
    } else {
        metrics_cache(IW_CACHE_COALESCED); /* joins a look-up already under way */
    }
    q->state = Q_WAITING;
    q->f = f;
    dl_push(&f->waiters, &q->link);
    f->n_waiters++;
    if (q->critical && !f->critical) {
        f->critical = 1;
        f->call.critical = 1;
        if (f->call.queued) { /* move it to the front line */
            engine_unask(r->e, &f->call);
            engine_ask(r->e, &f->call);
        }
    }
    loop_timer_at(r->lp, &q->deadline, q->received_ms + r->cfg->resolver_wait_ms);
}

/* IW_RESOLVER_WAIT is over: answer from the stale copy or with the reason
 * the flight is still waiting. */
static void request_deadline(loop *l, loop_timer *t)
{
    rreq *q = t->ud;
    flight *f = q->f;

    (void)l;
    req_detach(q);
    q->state = Q_FALLBACK;
    q->fb_code = f ? f->wait_code : IW_C_EXTERNAL_API_TIMEOUT;
    snprintf(q->fb_msg, sizeof q->fb_msg, "%s", f ? f->wait_msg : "no answer in time");
    if (f && f->call.queued && !http_client_auth_ready(rt_http(q->r->rt))) {
        /* held for an OAuth token, not for a permit: the provider is unavailable */
        q->fb_code = IW_C_EXTERNAL_API_UNAVAILABLE;
        snprintf(q->fb_msg, sizeof q->fb_msg, "no OAuth token yet (the token endpoint fails)");
    }
    dl_push(&q->r->fallback_q, &q->link);
}

/* A validated resource.get: its slot, then the look-up. */
static void accept_get(rreq *q)
{
    const char *prio;

    if (!q->d->reply_to || !*q->d->reply_to) {
        reject(q, IW_C_MISSING_REPLY_TO,
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
    if (cache_slot_init(q->r->cache, &q->slot, q->id, q->expand) != IW_OK) {
        reply_error(q, IW_C_INTERNAL_ERROR, "out of memory");
        return;
    }
    start_lookup(q);
}

static void on_delivery(void *self, iw_delivery *d)
{
    resolver *r = self;
    rreq *q = calloc(1, sizeof *q);
    const char *rk = d->routing_key ? d->routing_key : "";
    intake_result in;
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
    loop_timer_init(&q->deadline, request_deadline, q);
    dl_push(&r->requests, &q->all);
    r->alive++;
    if (rt_stopping(r->rt)) {
        rt_nack(r->rt, d, 1);
        req_free(q);
        return;
    }
    q->invalidate = strcmp(rk, "resource.invalidate") == 0;
    if (!q->invalidate && strcmp(rk, "resource.get") != 0) {
        char *quoted = text_quote(rk, strlen(rk), 100);
        snprintf(msg, sizeof msg,
                 "routing key '%s' is neither resource.get nor "
                 "resource.invalidate",
                 quoted ? quoted : "?");
        free(quoted);
        reject(q, IW_C_UNKNOWN_ROUTING_KEY, msg);
        return;
    }
    intake_json(d->body, d->body_len, d->content_type, (size_t)r->cfg->max_message_bytes,
                q->invalidate ? r->inval_schema : r->get_schema, &in);
    q->doc = in.doc;
    if (in.code != IW_C_NONE) {
        reject(q, in.code, in.msg);
        return;
    }
    q->state = Q_VALIDATED;
    q->id = json_string_value(json_object_get(q->doc, "id"));
    if (q->invalidate) {
        q->state = Q_INVALIDATING;
        dl_push(&r->inval_q, &q->link);
        return;
    }
    accept_get(q);
}

/* ---- Redis round trips ---------------------------------------------------------- */

typedef enum op_kind { OP_STORE, OP_INVALIDATE, OP_LOOKUP, OP_STALE, OP_PREFER } op_kind;

typedef struct pending_op {
    op_kind kind;
    void *item;
} pending_op;

static int append_store(resolver *r, flight *f, iw_error *err)
{
    cache_store_mode mode = f->result == RES_FOUND     ? CACHE_FOUND
                            : f->result == RES_MISSING ? CACHE_MISSING
                                                       : CACHE_RELEASE;
    return cache_append_store(r->cache, &f->slot, mode, f->token, f->data_text, err);
}

static int append_lookup(resolver *r, flight *f, iw_error *err)
{
    int purge = f->purge;

    f->purge = 0;
    return cache_append_lookup(r->cache, &f->slot, f->token, purge, err);
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
            reject(q, IW_C_CACHE_UNAVAILABLE, m); /* a script error would only repeat */
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
            flight_fail(f, IW_C_CACHE_UNAVAILABLE, m, 1);
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
        } else if (engine_provider_down(r->e) && f->state != F_PREFER_STALE) {
            /* the spec's "API down": the cache first, the provider only when
             * there is no stale copy of this slot */
            f->state = F_PREFER_STALE;
            fq_push(&r->prefer_q, f);
        } else {
            f->state = F_PERMIT;
            set_wait(f, IW_C_RATE_LIMITED, "no rate-limit permit within IW_RESOLVER_WAIT (%ld ms)",
                     r->cfg->resolver_wait_ms);
            f->call.critical = f->critical;
            engine_ask(r->e, &f->call);
        }
    } else {
        long pttl = strtol(rep->element[1]->str, NULL, 10);
        long wait = f->poll_ms;
        f->owns_lock = 0;
        if (pttl >= 0 && pttl + 1 < wait)
            wait = pttl + 1;
        f->poll_ms = f->poll_ms * 2 > PEER_POLL_MAX_MS ? PEER_POLL_MAX_MS : f->poll_ms * 2;
        set_wait(f, IW_C_EXTERNAL_API_TIMEOUT,
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
        json_object_set_new(
            f, "error",
            json_pack("{s:s, s:s}", "code", iw_code_name(q->fb_code), "message", q->fb_msg));
        log_msg(IW_LOG_WARN, f, "answered from the stale copy");
        reply_result(q, 1, "stale-cache", data);
        json_decref(data);
    } else {
        reply_error(q, q->fb_code, q->fb_msg);
    }
}

/* The API is down and this slot's lock is ours: a stale copy answers every
 * waiter now (the lock is released); without one the flight asks for a
 * permit after all. */
static void done_prefer(resolver *r, flight *f, const redisReply *rep)
{
    json_t *data = NULL;

    if (rep && rep->type == REDIS_REPLY_STRING)
        data = cached_data(r, f->id, rep->str, rep->len);
    if (!data) {
        f->state = F_PERMIT;
        set_wait(f, IW_C_RATE_LIMITED, "no rate-limit permit within IW_RESOLVER_WAIT (%ld ms)",
                 r->cfg->resolver_wait_ms);
        f->call.critical = f->critical;
        engine_ask(r->e, &f->call);
        return;
    }
    log_msg(IW_LOG_WARN, flight_fields(f),
            "External API down: answered from the stale copy without a call");
    f->result = RES_FOUND;
    f->data = data;
    flight_answer(f, "stale-cache");
    flight_drop(f); /* releases the lock */
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
        if ((ok = cache_append_invalidate(r->cache, q->id, &err) == IW_OK)) {
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
        if ((ok = cache_append_stale(r->cache, &q->slot, &err) == IW_OK)) {
            dl_del(&q->link);
            ops[n++] = (pending_op){OP_STALE, q};
        }
    }
    while (ok && n < MAX_PIPELINE && r->prefer_q.head) {
        if ((ok = redis_link_append(link, &err, "GET %s", r->prefer_q.head->slot.stale) == IW_OK))
            ops[n++] = (pending_op){OP_PREFER, fq_pop(&r->prefer_q)};
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
        case OP_PREFER:
            done_prefer(r, ops[i].item, rep);
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
        flight_fail(f, IW_C_CACHE_UNAVAILABLE, msg, 0);
    }
    while ((f = fq_pop(&r->prefer_q))) {
        f->owns_lock = 0;
        flight_fail(f, IW_C_CACHE_UNAVAILABLE, msg, 0);
    }
    for (dlink *l = r->flights.next, *next; l != &r->flights; l = next) {
        next = l->next;
        f = CONTAINER_OF(l, flight, all);
        if (f->call.queued) { /* waiting for a permit the limiter cannot give */
            engine_unask(r->e, &f->call);
            f->owns_lock = 0;
            flight_fail(f, IW_C_CACHE_UNAVAILABLE, msg, 0);
        }
    }
    while (!dl_empty(&r->fallback_q)) {
        rreq *q = CONTAINER_OF(r->fallback_q.next, rreq, link);
        reply_error(q, q->fb_code, q->fb_msg);
    }
    for (dlink *l = r->inval_q.next, *next; l != &r->inval_q; l = next) {
        rreq *q = CONTAINER_OF(l, rreq, link);
        next = l->next;
        if (q->d->reply_to && *q->d->reply_to)
            reply_error(q, IW_C_CACHE_UNAVAILABLE, msg);
    }
}

/* ---- the turn ------------------------------------------------------------------- */

static int redis_work(const resolver *r)
{
    return r->store_q.head || r->lookup_q.head || r->prefer_q.head || !dl_empty(&r->fallback_q) ||
           !dl_empty(&r->inval_q);
}

static void redis_retry_fired(loop *l, loop_timer *t)
{
    (void)l;
    (void)t; /* the turn-end hook does the work */
}

/* The turn-end hook: one Redis round trip for everything this turn queued.
 * Invalidations that wait for Redis try again every second. */
static int resolver_flush(loop *l, void *ud)
{
    resolver *r = ud;
    long long now;

    (void)l;
    if (!redis_work(r))
        return 0;
    now = clock_mono_ms();
    if (!r->store_q.head && !r->lookup_q.head && !r->prefer_q.head && dl_empty(&r->fallback_q) &&
        now < r->redis_retry_at)
        return 0;
    if (!rt_redis_ready(r->rt)) {
        redis_down(r);
        if (!dl_empty(&r->inval_q)) {
            r->redis_retry_at = now + REDIS_RETRY_MS;
            loop_timer_at(r->lp, &r->redis_retry, r->redis_retry_at);
        }
        return 0;
    }
    run_pipeline(r);
    return r->store_q.head || r->lookup_q.head || r->prefer_q.head || !dl_empty(&r->fallback_q);
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

/* The runtime is going away (its broker link is already freed): free what
 * is left while the loop its timers live in still exists. */
static void resolver_exit(void *self)
{
    resolver *r = self;

    for (dlink *l = r->requests.next, *next; l != &r->requests; l = next) {
        rreq *q = CONTAINER_OF(l, rreq, all);
        next = l->next;
        req_detach(q);
        req_free(q);
    }
    while (!dl_empty(&r->flights))
        flight_free(CONTAINER_OF(r->flights.next, flight, all));
    loop_timer_cancel(r->lp, &r->redis_retry);
    r->lp = NULL;
}

/* ---- construction --------------------------------------------------------------- */

resolver *resolver_new(runtime *rt, engine *e, iw_error *err)
{
    resolver *r = calloc(1, sizeof *r);
    const iw_config *cfg = rt_config(rt);
    cache_ttls ttls;
    rt_role role = {"resolver", "resource", NULL, on_delivery};
    rt_service svc = {NULL, on_link_lost, on_stop, busy, resolver_exit};

    if (!r) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        return NULL;
    }
    r->rt = rt;
    r->e = e;
    r->lp = rt_loop(rt);
    r->cfg = cfg;
    r->kind = (call_kind){"resource", IW_ROUTE_RESOURCE, "GET /external-resource/{id}"};
    dl_init(&r->fallback_q);
    dl_init(&r->inval_q);
    dl_init(&r->requests);
    dl_init(&r->flights);
    loop_timer_init(&r->redis_retry, redis_retry_fired, r);
    ttls = (cache_ttls){cfg->cache_ttl_ms, cfg->cache_stale_ttl_ms, cfg->cache_negative_ttl_ms,
                        cfg->http_timeout_ms + LOCK_SLACK_MS};
    r->cache = cache_new(rt_redis(rt), cfg->ns, &ttls);
    if (!r->cache || !(r->get_schema = rt_load_schema(rt, "resource-get.schema.json", err)) ||
        !(r->inval_schema = rt_load_schema(rt, "resource-invalidate.schema.json", err)) ||
        !(r->reply_schema = rt_load_schema(rt, "resource-reply.schema.json", err))) {
        if (!r->cache)
            iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        resolver_free(r);
        return NULL;
    }
    role.self = r;
    svc.self = r;
    if (loop_add_hook(r->lp, resolver_flush, r) != 0 || runtime_add_role(rt, &role) != IW_OK ||
        runtime_add_service(rt, &svc) != IW_OK) {
        iw_error_set(err, IW_ERR_INVALID, "cannot register the resolver");
        resolver_free(r);
        return NULL;
    }
    return r;
}

void resolver_free(resolver *r)
{
    if (!r)
        return;
    if (r->lp)
        resolver_exit(r);
    cache_free(r->cache);
    schema_free(r->get_schema);
    schema_free(r->inval_schema);
    schema_free(r->reply_schema);
    free(r);
}

/* ---- the ops command ------------------------------------------------------------ */

int resolver_cache_invalidate_cmd(const iw_config *cfg, const char *id)
{
    iw_error err = {0};
    redis_link *link = redis_link_from_config(cfg, &err);
    cache_ttls ttls = {cfg->cache_ttl_ms, cfg->cache_stale_ttl_ms, cfg->cache_negative_ttl_ms,
                       cfg->http_timeout_ms + LOCK_SLACK_MS};
    cache *c = link ? cache_new(link, cfg->ns, &ttls) : NULL;
    redisReply *rep = NULL;
    int rc = 1;

    if (!c)
        goto out;
    if (redis_link_ensure(link, &err) != IW_OK || cache_append_invalidate(c, id, &err) != IW_OK ||
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
    cache_free(c);
    redis_link_free(link);
    return rc;
}
