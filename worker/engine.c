#include "engine.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "buf.h"
#include "clock.h"
#include "intake.h"
#include "json_out.h"
#include "json_read.h"
#include "limiter.h"
#include "log.h"
#include "topology.h"

#define MAX_ROLES 4
#define LIMITER_RETRY_MS 1000L
#define START_RETRY_MS 1000L
/* No wait we set is longer than a month: a larger x-due-at is not ours. */
#define MAX_DELAY_MS (30L * 24 * 3600 * 1000)
/* A recorded outcome belongs to its recorder this much longer than one
 * provider call can take: long enough for a publish and its confirm. */
#define LEASE_SLACK_MS 5000L
/* A job that cannot reach Redis for longer than IW_HOLD_MAX waits this long
 * in the delay tiers before it tries again. */
#define PARK_MS 10000L
/* A job whose claim another attempt holds asks again this often: the same
 * script answers with the holder's record as soon as it exists. */
#define CLAIM_POLL_MS 250L
/* How long a job's failure is remembered: a second delivery meanwhile (an
 * upstream double publish) gets the same submission.failed; a later one (a
 * dlq replay) is tried again. */
#define FAILED_RECORD_MS 120000L

typedef struct call_fifo {
    call *head, *tail;
} call_fifo;

typedef struct job_fifo {
    job *head, *tail;
} job_fifo;

typedef struct role_slot {
    engine *e;
    const job_role *role;
    call_kind kind;
    void *self;
    iw_schema *schema;
} role_slot;

typedef struct release release;

/* A published outcome's record, to mark at a coming round trip. */
typedef struct pending_mark {
    struct pending_mark *next;
    long long since; /* monotonic ms it was queued */
    char key[];
} pending_mark;

struct engine {
    runtime *rt;
    const iw_config *cfg;
    loop *lp;
    records *rec;
    /* calls waiting for a permit: per limiter class, [0] critical, [1] normal */
    call_fifo ready[LIMITER_N_CLASSES][2];
    loop_timer unblock; /* wakes the loop when the limiter may be asked again */
    long long blocked_until;
    /* what the fleet's breaker and limiter said last */
    int breaker_state, above_alert;
    long breaker_failures;
    long long breaker_seen_ms;   /* monotonic time of the last breaker report */
    long long maintenance_until; /* monotonic end of the current window, 0 none */
    /* breaker outcomes of the calls finished since the last report */
    release *releases; /* claims to drop at the next round trip */
    char outcomes[4097];
    size_t n_outcomes;
    int probe_outcome;
    /* jobs waiting for a Redis step of the next round trip */
    job_fifo to_put, to_adopt;
    /* records of published outcomes to mark, oldest first */
    pending_mark *marks, *marks_tail;
    loop_timer mark_due; /* wakes the loop when they may not wait longer */
    long long records_blocked_until;
    job *all;
    size_t alive;
    role_slot roles[MAX_ROLES];
    size_t n_roles;
    char proc_token[40];
    unsigned long long seq;
    long long answer_us; /* the provider's mean answer time (EWMA), for the linger */
};

/* "<proc_token>-<seq>", the owner token of a record or a claim, cut to size
 * like snprintf: one per delivery and one per ask, so written without
 * printf. */
static void next_token(engine *e, char *dst, size_t size)
{
    char text[sizeof e->proc_token + 24], *d, *end = text + sizeof text;
    size_t a = strnlen(e->proc_token, sizeof e->proc_token - 1), n;

    d = uint_text(end, ++e->seq);
    *--d = '-';
    d -= a;
    memcpy(d, e->proc_token, a);
    n = (size_t)(end - d);
    if (n > size - 1)
        n = size - 1;
    memcpy(dst, d, n);
    dst[n] = '\0';
}

/* ---- FIFOs ---------------------------------------------------------------------- */

static void call_push(call_fifo *q, call *c)
{
    c->next = NULL;
    if (q->tail)
        q->tail->next = c;
    else
        q->head = c;
    q->tail = c;
}

static void call_push_front(call_fifo *q, call *c)
{
    c->next = q->head;
    q->head = c;
    if (!q->tail)
        q->tail = c;
}

static call *call_pop(call_fifo *q)
{
    call *c = q->head;
    if (c) {
        q->head = c->next;
        if (!q->head)
            q->tail = NULL;
        c->next = NULL;
    }
    return c;
}

static void job_push(job_fifo *q, job *j)
{
    loop_again(j->e->lp);
    j->next = NULL;
    if (q->tail)
        q->tail->next = j;
    else
        q->head = j;
    q->tail = j;
}

static job *job_pop(job_fifo *q)
{
    job *j = q->head;
    if (j) {
        q->head = j->next;
        if (!q->head)
            q->tail = NULL;
        j->next = NULL;
    }
    return j;
}

static int class_index(const char *cls)
{
    for (int i = 0; i < LIMITER_N_CLASSES; i++)
        if (strcmp(limiter_classes[i], cls) == 0)
            return i;
    return LIMITER_N_CLASSES - 1;
}

/* ---- calls ------------------------------------------------------------------------- */

void engine_ask(engine *e, call *c)
{
    if (c->queued)
        return;
    c->queued = 1;
    c->ready_since = clock_mono_ms();
    call_push(&e->ready[class_index(c->kind->cls)][c->critical ? 0 : 1], c);
    loop_again(e->lp);
}

void engine_unask(engine *e, call *c)
{
    call_fifo *q;

    if (!c->queued)
        return;
    q = &e->ready[class_index(c->kind->cls)][c->critical ? 0 : 1];
    for (call **pp = &q->head, *prev = NULL; *pp; prev = *pp, pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            if (q->tail == c)
                q->tail = prev;
            break;
        }
    }
    c->next = NULL;
    c->queued = 0;
}

void engine_answer_message(const http_response *r, char *buf, size_t len)
{
    if (r->result.transport != IW_TRANSPORT_OK)
        snprintf(buf, len, "External API call failed: %s", r->error);
    else
        snprintf(buf, len, "External API returned %ld", r->result.status);
}

/* A field's value as it can go into a log line: itself when it is valid
 * UTF-8 (*quoted NULL), else made safe text in *quoted (the caller frees),
 * e.g. a resource look-up's correlation_id, which is any bytes.  NULL only
 * when out of memory. */
static const char *field_text(const char *v, char **quoted)
{
    size_t n = strlen(v);

    *quoted = NULL;
    if (utf8_valid(v, n))
        return v;
    return *quoted = text_quote(v, n, 4 * n + 4);
}

json_t *engine_call_fields(const call *c)
{
    call_field f[CALL_FIELDS_MAX];
    size_t nf = c->ops->fields(c, f);
    json_t *o = json_object();

    for (size_t i = 0; o && i < nf; i++) {
        char *q;
        const char *v = field_text(f[i].value, &q);
        if (v)
            json_object_set_new(o, f[i].key, json_string(v));
        free(q);
    }
    return o;
}

void engine_log_call(const call *c, const http_response *r, const iw_verdict *v,
                     const char *tracking_id, const char *job_status)
{
    int level = v->kind == IW_V_ACCEPT ? IW_LOG_INFO
                : v->kind == IW_V_WAIT ? IW_LOG_WARN
                                       : iw_code_level(v->code);
    call_field f[CALL_FIELDS_MAX];
    size_t nf;
    log_line l;

    if (!log_line_begin(&l, level))
        return;
    /* written as it goes: one line per call, the hottest in the process */
    nf = c->ops->fields(c, f);
    for (size_t i = 0; i < nf; i++) {
        char *q;
        const char *text = field_text(f[i].value, &q);
        if (text)
            jw_str(&l.w, f[i].key, text);
        free(q);
    }
    jw_str(&l.w, "operation", c->kind->operation);
    jw_int(&l.w, "duration", r->duration_us / 1000);
    if (r->result.status)
        jw_int(&l.w, "status", r->result.status);
    else
        jw_null(&l.w, "status");
    jw_int(&l.w, "attempt", c->attempt);
    if (tracking_id)
        jw_str(&l.w, "externalTrackingId", tracking_id);
    if (job_status)
        jw_str(&l.w, "jobStatus", job_status);
    if (v->kind != IW_V_ACCEPT) {
        char m[300], *safe;
        engine_answer_message(r, m, sizeof m);
        /* curl's error text may quote the URL: made safe text */
        safe = text_quote(m, strlen(m), sizeof m);
        jw_open(&l.w, "error");
        jw_str(&l.w, "code", iw_code_name(v->code));
        jw_str(&l.w, "message", safe ? safe : "(out of memory)");
        if (r->result.status)
            jw_int(&l.w, "statusCode", r->result.status);
        else
            jw_null(&l.w, "statusCode");
        jw_int(&l.w, "retryAttempt", c->attempt);
        jw_close(&l.w);
        free(safe);
    }
    log_line_end(&l);
}

/* The breaker counts this answer: 'F' for a 5xx, a timeout or no answer,
 * 'S' for anything the provider answered otherwise (a 429 and 4xx too). */
static void note_outcome(engine *e, const call *c, int failure)
{
    if (e->n_outcomes < sizeof e->outcomes - 1)
        e->outcomes[e->n_outcomes++] = failure ? 'F' : 'S';
    if (c->probe)
        e->probe_outcome = failure ? 0 : 1;
    loop_again(e->lp);
}

static long metric_status(const http_response *r)
{
    if (r->result.transport == IW_TRANSPORT_OK)
        return r->result.status;
    return r->result.transport == IW_TRANSPORT_TIMEOUT ? IW_CALL_TIMED_OUT : IW_CALL_NO_ANSWER;
}

/* The loop lingers on thin turns for a share of the provider's mean answer
 * time (loop_linger_for): against a slow provider the answers of the calls in
 * flight arrive spread out, a turn would serve one job and each job would pay
 * its own wake-ups, Redis round trip and broker writes. */
static void follow_provider_pace(engine *e, long long duration_us)
{
    if (duration_us < 0)
        duration_us = 0;
    if (e->answer_us == 0)
        e->answer_us = duration_us;
    else
        e->answer_us += (duration_us - e->answer_us) / 16; /* a mean of the last ~16 */
    loop_set_linger(e->lp, loop_linger_for(e->answer_us, e->cfg->turn_linger_ms * 1000));
}

static void on_http(void *ud, const http_response *r)
{
    call *c = ud;
    engine *e = c->eng;
    iw_verdict v = retry_classify(&r->result);

    if (r->result.transport == IW_TRANSPORT_NO_TOKEN) {
        /* not sent: no provider answer to count; the token endpoint's own
         * failures reached the breaker through on_token.  A half-open probe
         * that could not get a token failed. */
        if (c->probe) {
            e->probe_outcome = 0;
            loop_again(e->lp);
        }
        c->probe = 0;
        c->ops->on_answer(c, r, &v);
        return;
    }
    metrics_provider_request(c->kind->route, metric_status(r), r->duration_us);
    follow_provider_pace(e, r->duration_us);
    note_outcome(e, c, v.breaker_failure);
    c->probe = 0;
    if (r->result.wait_capped)
        log_msg(IW_LOG_WARN, engine_call_fields(c),
                "the provider asked for a longer wait than IW_MAX_RATE_PAUSE; waiting %ld ms",
                v.wait_ms);
    if (v.kind == IW_V_WAIT) {
        /* a 429 pauses the whole fleet, whatever becomes of this call */
        iw_error err;
        if (limiter_pause(rt_limiter(e->rt), v.wait_ms, &err) != IW_OK)
            log_msg(IW_LOG_WARN, engine_call_fields(c), "could not share the 429 pause: %s",
                    err.msg);
    }
    c->ops->on_answer(c, r, &v);
}

/* A token fetch of this process ended: counted like any route (a 5xx, a
 * timeout or no answer is a breaker failure), and an outage logged twice
 * only: when it starts and when it ends. */
static void on_token(void *ud, const http_token_event *ev)
{
    engine *e = ud;
    iw_verdict v = retry_classify(&ev->result);
    long st = ev->result.transport == IW_TRANSPORT_OK        ? ev->result.status
              : ev->result.transport == IW_TRANSPORT_TIMEOUT ? IW_CALL_TIMED_OUT
                                                             : IW_CALL_NO_ANSWER;

    metrics_provider_request(IW_ROUTE_TOKEN, st, ev->duration_us);
    if (ev->result.transport != IW_TRANSPORT_OK || ev->result.status != 200 || ev->ok) {
        /* a 200 whose token was refused is the provider's answer, not a failure of it */
        if (e->n_outcomes < sizeof e->outcomes - 1)
            e->outcomes[e->n_outcomes++] = v.breaker_failure ? 'F' : 'S';
        loop_again(e->lp);
    }
    if (ev->outage_started)
        log_msg(IW_LOG_ERROR,
                json_pack("{s:s, s:o}", "operation", "oauth_token", "statusCode",
                          ev->result.status ? json_integer(ev->result.status) : json_null()),
                "the OAuth token endpoint is failing (%s); calls wait for a token without "
                "using attempts; next try in %ld ms",
                ev->problem, ev->next_try_ms);
    else if (ev->recovered)
        log_msg(IW_LOG_INFO, json_pack("{s:s}", "operation", "oauth_token"),
                "the OAuth token endpoint answers again; calls resume");
    else if (ev->ok) /* which pod fetched the fleet's token, and when */
        log_msg(IW_LOG_DEBUG,
                json_pack("{s:s, s:I}", "operation", "oauth_token", "duration",
                          (json_int_t)(ev->duration_us / 1000)),
                "an OAuth token fetched");
}

int engine_call(engine *e, call *c, const char *method, const char *path, const char *body,
                size_t body_len, const char *idempotency_key)
{
    c->eng = e;
    return http_client_start(rt_http(e->rt), method, path, body, body_len, idempotency_key, on_http,
                             c);
}

static void unblock_fired(loop *l, loop_timer *t)
{
    (void)l;
    (void)t; /* the turn-end hook does the work */
}

/* ---- the breaker's view, logged once by the pod that saw it change ---------------------- */

static const char *breaker_name(int state)
{
    static const char *const names[] = {"closed", "open", "half-open"};
    return state >= 0 && state <= 2 ? names[state] : "unknown";
}

static void log_transition(int from, int to, long failures)
{
    log_json(to == LIMITER_BREAKER_OPEN ? IW_LOG_ERROR : IW_LOG_WARN,
             json_pack("{s:s, s:s, s:s, s:I}", "message",
                       to == LIMITER_BREAKER_OPEN        ? "circuit breaker open: no provider calls"
                       : to == LIMITER_BREAKER_HALF_OPEN ? "circuit breaker half-open: one probe"
                                                         : "circuit breaker closed",
                       "from", breaker_name(from), "to", breaker_name(to), "consecutiveFailures",
                       (json_int_t)failures));
}

static void note_breaker(engine *e, int state, long failures, long failures_before)
{
    long long now = clock_mono_ms();
    int in_window = e->maintenance_until > now;

    metrics_breaker(state, (int)failures);
    /* the spec's "API down": 3 consecutive failures, once per crossing, and
     * not for failures inside a maintenance window */
    if (failures_before < IW_PROVIDER_DOWN_AFTER && failures >= IW_PROVIDER_DOWN_AFTER &&
        !in_window)
        log_json(IW_LOG_ERROR,
                 json_pack("{s:s, s:I, s:{s:s}}", "message",
                           "External API down: consecutive failures; look-ups fall back to the "
                           "cache",
                           "consecutiveFailures", (json_int_t)failures, "error", "code",
                           iw_code_name(IW_C_EXTERNAL_API_UNAVAILABLE)));
    e->breaker_state = state;
    e->breaker_failures = failures;
    e->breaker_seen_ms = now;
}

int engine_provider_down(const engine *e)
{
    return e->breaker_failures >= IW_PROVIDER_DOWN_AFTER && e->maintenance_until == 0 &&
           clock_mono_ms() - e->breaker_seen_ms < e->cfg->breaker_open_ms;
}

static void note_usage(engine *e, const limiter_result *res)
{
    for (size_t i = 0; i < res->n_tiers; i++)
        metrics_limiter_tier_usage(i, res->tier_permille[i]);
    metrics_throttling(res->above_alert);
    if (res->above_alert && !e->above_alert) {
        int top = 0;
        for (size_t i = 0; i < res->n_tiers; i++)
            if (res->tier_permille[i] > top)
                top = res->tier_permille[i];
        log_json(IW_LOG_WARN,
                 json_pack("{s:s, s:i, s:i}", "message",
                           "rate limit approaching: a tier of IW_RATE_LIMITS is over "
                           "IW_RATE_ALERT; normal calls are held back, critical ones "
                           "go on",
                           "usagePermille", top, "alertPercent", (int)e->cfg->rate_alert_pct));
    } else if (!res->above_alert && e->above_alert) {
        log_msg(IW_LOG_INFO, NULL, "rate limit usage back under IW_RATE_ALERT");
    }
    e->above_alert = res->above_alert;
    if (res->breaker_from >= 0)
        log_transition(res->breaker_from, res->breaker_to, res->breaker_failures);
    note_breaker(e, res->breaker_state, res->breaker_failures, res->breaker_failures);
}

/* ---- permits: one round trip per turn for every batch ------------------------------------- */

/* One batch: the calls of one class and priority, asked for in one script. */
typedef struct batch {
    int cls, prio;
    call *calls[LIMITER_MAX_RECORDS];
    size_t n;
    char token[48];
    int firsts; /* a first-attempt script follows the ask in the pipeline */
} batch;

/* Puts the calls of batches back at the front of their queues, in order. */
static void requeue(engine *e, batch *b, size_t n)
{
    for (size_t j = n; j > 0; j--)
        for (size_t m = b[j - 1].n; m > 0; m--) {
            call *c = b[j - 1].calls[m - 1];
            c->queued = 1;
            call_push_front(&e->ready[b[j - 1].cls][b[j - 1].prio], c);
        }
}

/* The wall ms a maintenance window still runs (0: none), refreshed per turn. */
static long maintenance_left(engine *e, long long now)
{
    long long ends = 0;

    if (!e->cfg->maintenance)
        return 0;
    if (maintenance_active(e->cfg->maintenance, clock_wall_ms(), &ends)) {
        long left = (long)(ends - clock_wall_ms());
        if (e->maintenance_until <= now)
            log_msg(IW_LOG_WARN, NULL,
                    "maintenance window (IW_MAINTENANCE_WINDOWS): normal work waits %ld ms, "
                    "critical work goes on",
                    left);
        e->maintenance_until = now + left;
        metrics_maintenance(1);
        return left > 0 ? left : 1;
    }
    if (e->maintenance_until > 0) {
        log_msg(IW_LOG_INFO, NULL, "maintenance window over");
        e->maintenance_until = 0;
    }
    metrics_maintenance(0);
    return 0;
}

/* True when the batch already holds a call with c's claim key. */
static int claims_twice(const batch *x, const call *c)
{
    if (!c->claim_key)
        return 0;
    for (size_t i = 0; i < x->n; i++)
        if (x->calls[i]->claim_key && strcmp(x->calls[i]->claim_key, c->claim_key) == 0)
            return 1;
    return 0;
}

/* Takes the queued calls that fit the free slots off their queues, in
 * batches of one class and priority (critical first); returns how many.
 * Inside a maintenance window normal calls wait for its end instead. */
static size_t take_batches(engine *e, batch *b, size_t cap, long window)
{
    long slots = e->cfg->concurrency - http_client_in_flight(rt_http(e->rt));
    size_t nb = 0;

    for (int prio = 0; prio < 2; prio++)
        for (int cls = 0; cls < LIMITER_N_CLASSES; cls++) {
            /* look-ups, critical or not, answer from the cache inside a window */
            while (window > 0 && (prio == 1 || cls == class_index("resource")) &&
                   e->ready[cls][prio].head) {
                call *c = call_pop(&e->ready[cls][prio]);
                c->queued = 0;
                c->eng = e;
                c->ops->on_permit(c, CALL_DEFERRED, window, 0, NULL, 0);
            }
            while (slots > 0 && e->ready[cls][prio].head && nb < cap) {
                batch *x = &b[nb++];
                x->cls = cls;
                x->prio = prio;
                x->n = 0;
                next_token(e, x->token, sizeof x->token);
                call_fifo later = {0};
                while (x->n < LIMITER_MAX_RECORDS && slots > 0 && e->ready[cls][prio].head) {
                    call *c = call_pop(&e->ready[cls][prio]);
                    if (claims_twice(x, c)) {
                        /* one ask claims with one token: two deliveries of
                         * one job in it would both get the claim */
                        call_push(&later, c);
                        continue;
                    }
                    c->queued = 0;
                    x->calls[x->n++] = c;
                    slots--;
                }
                if (later.head) { /* back at the front, in order, for the next batch */
                    later.tail->next = e->ready[cls][prio].head;
                    if (!e->ready[cls][prio].head)
                        e->ready[cls][prio].tail = later.tail;
                    e->ready[cls][prio].head = later.head;
                }
            }
        }
    return nb;
}

/* With first-attempt keys on every call, the script that keeps the time of
 * each job's first ask follows the batch's ask (its body is built from it,
 * so that every attempt, even after a crash, sends the same bytes). */
static int append_firsts(engine *e, batch *x, iw_error *err)
{
    const char *keys[LIMITER_MAX_RECORDS];

    x->firsts = 0;
    for (size_t i = 0; i < x->n; i++) {
        if (!x->calls[i]->first_key)
            return IW_OK;
        keys[i] = x->calls[i]->first_key;
    }
    if (records_append_first(e->rec, keys, x->n, err) != IW_OK)
        return -1;
    x->firsts = 1;
    return IW_OK;
}

/* Reads the first-attempt times of a batch into its calls. */
static int read_firsts(engine *e, const batch *x, iw_error *err)
{
    long long t[LIMITER_MAX_RECORDS];

    if (!x->firsts)
        return IW_OK;
    if (records_read_first(e->rec, t, x->n, err) != IW_OK)
        return -1;
    for (size_t i = 0; i < x->n; i++)
        if (t[i] > 0 && x->calls[i]->first_ms)
            *x->calls[i]->first_ms = t[i];
    return IW_OK;
}

/* Appends one ask for the batch: its record keys and claims when its calls
 * have them (a class has them for every call or for none). */
static int append_batch(engine *e, batch *x, iw_error *err)
{
    const char *keys[LIMITER_MAX_RECORDS], *claims[LIMITER_MAX_RECORDS];
    limiter_ask ask = {0};
    size_t nk = 0, nc = 0;

    for (size_t i = 0; i < x->n; i++) {
        if (x->calls[i]->record_key)
            keys[nk++] = x->calls[i]->record_key;
        if (x->calls[i]->claim_key)
            claims[nc++] = x->calls[i]->claim_key;
    }
    ask.cls = x->calls[0]->kind->cls;
    ask.critical = x->prio == 0;
    ask.n = x->n;
    ask.record_keys = nk == x->n ? keys : NULL;
    ask.claim_keys = nc == x->n ? claims : NULL;
    ask.claim_token = x->token;
    ask.claim_ms = e->cfg->http_timeout_ms + LEASE_SLACK_MS;
    if (limiter_append_ask(rt_limiter(e->rt), &ask, err) != IW_OK)
        return -1;
    /* the ask is in the pipeline: its reply is read whatever happens next */
    if (append_firsts(e, x, err) != IW_OK)
        x->firsts = 0;
    return IW_OK;
}

/* Hands each call of the batch its permit decision. */
static void decide_batch(engine *e, const batch *x, limiter_result *res)
{
    for (size_t m = 0; m < x->n; m++) {
        call *c = x->calls[m];
        size_t len = 0;
        const char *rec;

        c->eng = e;
        switch (limiter_item_verdict(res, m)) {
        case LIMITER_GRANTED:
            c->probe = res->probe_index == (int)m;
            _Static_assert(sizeof c->claim_token == sizeof x->token, "token sizes");
            memcpy(c->claim_token, x->token, sizeof x->token);
            c->ops->on_permit(c, CALL_GRANTED, 0, 0, NULL, 0);
            break;
        case LIMITER_RECORDED:
            rec = limiter_record(res, m, &len);
            c->ops->on_permit(c, CALL_RECORDED, 0, 0, rec, len);
            break;
        case LIMITER_CLAIMED:
            c->ops->on_permit(c, CALL_CLAIMED, limiter_claim_ttl(res, m) + 1, 0, NULL, 0);
            break;
        default:
            if (res->wait_reason != LIMITER_WAIT_BREAKER)
                metrics_limiter_refused(c->kind->route,
                                        res->wait_reason == LIMITER_WAIT_PAUSE ? IW_REFUSAL_PAUSE
                                        : res->wait_reason == LIMITER_WAIT_THROTTLE
                                            ? IW_REFUSAL_RESERVE
                                            : IW_REFUSAL_TIER,
                                        res->wait_ms);
            c->ops->on_permit(c, CALL_REFUSED, res->wait_ms, res->wait_reason, NULL, 0);
            break;
        }
    }
}

static void park_waiting_jobs(engine *e, long long now, int wait_reason);

/* Fail closed: nobody calls the provider unmetered; ask again in a second. */
static void limiter_unavailable(engine *e, long long now, const iw_error *err)
{
    park_waiting_jobs(e, now, -1);
    log_json(IW_LOG_ERROR,
             json_pack("{s:s, s:{s:s, s:s}}", "message", "limiter unavailable; calls wait", "error",
                       "code", iw_code_name(IW_C_LIMITER_UNAVAILABLE), "message", err->msg));
    e->blocked_until = now + LIMITER_RETRY_MS;
    loop_timer_at(e->lp, &e->unblock, e->blocked_until);
}

static int any_ready(const engine *e)
{
    for (int prio = 0; prio < 2; prio++)
        for (int cls = 0; cls < LIMITER_N_CLASSES; cls++)
            if (e->ready[cls][prio].head)
                return 1;
    return 0;
}

/* Calls wait for a permit and a slot is free: the next turn asks. */
static int calls_could_go(engine *e)
{
    return any_ready(e) && e->cfg->concurrency > http_client_in_flight(rt_http(e->rt));
}

/* Appends the breaker outcomes of this turn's finished calls, if any. */
static int append_outcomes(engine *e, iw_error *err)
{
    if (!e->n_outcomes)
        return 0;
    e->outcomes[e->n_outcomes] = '\0';
    if (limiter_append_outcomes(rt_limiter(e->rt), e->outcomes, e->probe_outcome, err) != IW_OK)
        return -1;
    e->n_outcomes = 0;
    e->probe_outcome = -1;
    return 1;
}

static int read_outcomes(engine *e, iw_error *err)
{
    breaker_report rep;

    if (limiter_read_outcomes(rt_limiter(e->rt), &rep, err) != IW_OK)
        return -1;
    if (rep.transitions > 0)
        log_transition(rep.from, rep.to, rep.failures);
    note_breaker(e, rep.state, rep.failures, rep.failures_before);
    return 0;
}

/* The permit half of a turn's round trip: every queued call that can get a
 * slot, in batches of one class and priority, with the breaker outcomes of
 * the calls that finished. */
typedef struct asks {
    batch b[LIMITER_N_CLASSES * 2 * 4];
    size_t nb, appended;
    int outcomes; /* 1: the outcomes script is in the pipeline; -1: it failed */
    long token_wait;
    enum { ASKS_NONE, ASKS_HOLD, ASKS_SENT } state;
    iw_error err;
} asks;

/* Appends the turn's asks to the pipeline (read by asks_read). */
static void asks_append(engine *e, asks *a, long long now)
{
    a->nb = a->appended = 0;
    a->outcomes = 0;
    a->token_wait = 0;
    a->state = ASKS_NONE;
    memset(&a->err, 0, sizeof a->err);
    if (now < e->blocked_until)
        return;
    /* no OAuth token yet (being fetched, or the token endpoint fails): no
     * permit for a call that could not be sent; the breaker outcomes (the
     * token fetches' own) still go.  Not while the breaker is open or
     * half-open: asking would fetch a token, and then no route may call; the
     * limiter holds the calls, and the half-open probe fetches the token
     * as part of its call. */
    if (any_ready(e) && e->breaker_state == 0)
        a->token_wait = http_client_token_wait_ms(rt_http(e->rt));
    if (!a->token_wait)
        a->nb = take_batches(e, a->b, sizeof a->b / sizeof a->b[0], maintenance_left(e, now));
    a->state = ASKS_HOLD;
    if (!a->nb && !e->n_outcomes)
        return;
    if (!rt_redis_ready(e->rt)) {
        requeue(e, a->b, a->nb);
        iw_error_set(&a->err, IW_ERR_REDIS, "Redis unavailable");
        limiter_unavailable(e, now, &a->err);
        a->state = ASKS_NONE;
        return;
    }
    a->outcomes = append_outcomes(e, &a->err);
    while (a->outcomes >= 0 && a->appended < a->nb &&
           append_batch(e, &a->b[a->appended], &a->err) == IW_OK)
        a->appended++;
    a->state = ASKS_SENT;
}

/* Reads the replies to asks_append's scripts and hands out the permits.
 * Returns 1 when calls are left that could go at once (more than the
 * batches took). */
static int asks_read(engine *e, asks *a, long long now)
{
    iw_error *err = &a->err;

    if (a->state == ASKS_NONE)
        return 0;
    if (a->state == ASKS_SENT) {
        if (a->outcomes > 0 && read_outcomes(e, err) != 0)
            a->appended = 0; /* the connection is gone: nothing after it can be read */
        for (size_t i = 0; i < a->appended; i++) {
            limiter_result res;

            if (limiter_read_ask(rt_limiter(e->rt), &res, err) != IW_OK) {
                requeue(e, a->b + i, a->nb - i); /* the rest is lost with the connection */
                limiter_unavailable(e, now, err);
                return 0;
            }
            if (read_firsts(e, &a->b[i], err) != IW_OK) {
                limiter_result_release(&res);
                requeue(e, a->b + i, a->nb - i);
                limiter_unavailable(e, now, err);
                return 0;
            }
            note_usage(e, &res);
            decide_batch(e, &a->b[i], &res);
            limiter_result_release(&res);
        }
        if (a->appended < a->nb) { /* not even appended: nothing was sent for these */
            requeue(e, a->b + a->appended, a->nb - a->appended);
            limiter_unavailable(e, now, err);
            return 0;
        }
    }
    if (a->token_wait > 0) {
        /* jobs held longer than IW_HOLD_MAX wait in the delay tiers, no
         * attempt used; the rest are asked for again when a token may be there */
        park_waiting_jobs(e, now, IW_WAIT_TOKEN);
        e->blocked_until = now + a->token_wait;
        loop_timer_at(e->lp, &e->unblock, e->blocked_until);
        return 0;
    }
    return calls_could_go(e);
}

static const call_ops job_call_ops;

/* A claim to drop at the next Redis round trip (the job may be gone by then). */
struct release {
    struct release *next;
    char token[48];
    char key[];
};

static void release_claim(engine *e, const call *c)
{
    size_t n;
    release *r;

    if (!c->claim_key || !c->claim_token[0])
        return;
    n = strlen(c->claim_key) + 1;
    if (!(r = malloc(sizeof *r + n)))
        return; /* the claim expires after its lease */
    memcpy(r->key, c->claim_key, n);
    _Static_assert(sizeof r->token == sizeof c->claim_token, "token sizes");
    memcpy(r->token, c->claim_token, sizeof r->token);
    r->next = e->releases;
    e->releases = r;
}

/* ---- jobs: bookkeeping ---------------------------------------------------------------- */

static size_t call_fields(const call *c, call_field *f)
{
    const job *j = (const job *)c;

    f[0] = (call_field){"requestId", j->job_id ? j->job_id : ""};
    f[1] = (call_field){"state", job_state_name(j->state)};
    return 2;
}

static json_t *job_fields(const job *j)
{
    return engine_call_fields(&j->call);
}

json_t *job_doc(job *j)
{
    if (!j->doc)
        j->doc = json_read(j->d->body, j->d->body_len, JSON_REJECT_DUPLICATES, NULL);
    return j->doc;
}

void job_drop_doc(job *j)
{
    json_decref(j->doc);
    j->doc = NULL;
}

/* Counts and logs (at debug) that j is in its state now. */
static void note_state(const job *j)
{
    metrics_job_transition(j->role->metric_role, job_state_name(j->state));
    if (log_enabled(IW_LOG_DEBUG))
        log_json(IW_LOG_DEBUG, json_pack("{s:s, s:s, s:s, s:s}", "message", "job state", "role",
                                         j->role->name, "requestId", j->job_id ? j->job_id : "",
                                         "state", job_state_name(j->state)));
}

void job_set_state(job *j, job_state s)
{
    if (!job_state_allowed(j->state, s))
        log_json(IW_LOG_ERROR,
                 json_pack("{s:s, s:s, s:s, s:s, s:s}", "message",
                           "illegal job state transition (a bug)", "role", j->role->name,
                           "requestId", j->job_id ? j->job_id : "", "from",
                           job_state_name(j->state), "to", job_state_name(s)));
    j->state = s;
    note_state(j);
}

static void job_free(job *j)
{
    engine *e = j->e;

    if (j->prev_all)
        j->prev_all->next_all = j->next_all;
    else
        e->all = j->next_all;
    if (j->next_all)
        j->next_all->prev_all = j->prev_all;
    e->alive--;
    engine_unask(e, &j->call);
    loop_timer_cancel(e->lp, &j->hold);
    if (j->role->release)
        j->role->release(j);
    delivery_free(j->d);
    json_decref(j->doc);
    free(j->event);
    json_decref(j->event_doc);
    free(j->fail_msg);
    free(j->keys);
    free(j);
}

/* The delivery went back to the broker (or is void): the job ends here. */
static void job_end(job *j, job_state s, int nack)
{
    if (nack) {
        rt_nack(j->e->rt, j->d, 1);
        metrics_delivery(j->role->metric_role, IW_DELIVERY_REQUEUED);
    }
    job_set_state(j, s);
    job_free(j);
}

/* True when j's delivery can still be acked; else j is dropped (the broker
 * requeued it when the connection went away). */
static int job_live(job *j)
{
    if (rt_delivery_live(j->e->rt, j->d))
        return 1;
    job_end(j, JOB_DROPPED, 0);
    return 0;
}

/* ---- jobs: outcome groups --------------------------------------------------------------- */

static void queue_mark(engine *e, const char *key);

static void outcome_done(void *owner, int ok)
{
    job *j = owner;
    engine *e = j->e;

    if (!ok && j->out.status == IW_ERR_AMQP_ENCODE) {
        /* the outcome cannot be written as AMQP frames (a header or property
         * over the protocol's limits): requeueing would repeat this for
         * ever.  Fail the job; if even its failure cannot be encoded, the
         * broker dead-letters the delivery itself (x-death reason rejected) */
        if (j->state != JOB_FAILING && job_live(j)) {
            job_fail(j, IW_C_OUTCOME_NOT_ENCODABLE,
                     "the outcome of this job cannot be encoded as an AMQP message", 0,
                     j->attempts);
            return;
        }
        if (!j->bare_dead && j->fail_code != IW_C_NONE && job_live(j)) {
            /* the upstream's own headers cannot be written again: the dead
             * letter goes with the contract's headers only (the failure
             * event, if any, was the rest of the group) */
            log_msg(IW_LOG_WARN, job_fields(j),
                    "the dead letter cannot carry this message's headers; sent without them");
            j->bare_dead = 1;
            rt_outcome_begin(&j->out, outcome_done, j);
            rt_publish_dead_headers(e->rt, &j->out, j->d, j->role->metric_role, j->role->queue,
                                    iw_code_name(j->fail_code), j->fail_msg ? j->fail_msg : "", 0,
                                    j->attempts, 0);
            rt_outcome_seal(&j->out);
            return;
        }
        log_msg(IW_LOG_ERROR, job_fields(j),
                "the dead letter of this job cannot be encoded; rejected to the broker's "
                "dead-lettering");
        rt_nack(e->rt, j->d, 0);
        job_end(j, JOB_ACKED, 0);
        return;
    }
    if (!ok) {
        log_json(IW_LOG_WARN,
                 json_pack("{s:s, s:s, s:s}", "requestId", j->job_id ? j->job_id : "", "state",
                           job_state_name(j->state), "message",
                           "outcome not confirmed by the broker; the job returns to its queue"));
        job_end(j, JOB_RETURNED, 1);
        return;
    }
    /* The events are in the broker: ack now.  The record is marked published
     * with a coming round trip; a later delivery of the job that finds it
     * unmarked (this process died first) adopts it and repeats the event. */
    if (j->mark) {
        queue_mark(e, j->key);
        metrics_job_outcome(j->role->metric_role, j->role->outcome);
    }
    rt_ack(e->rt, j->d);
    metrics_delivery(j->role->metric_role, IW_DELIVERY_ACKED);
    job_end(j, JOB_ACKED, 0);
}

void job_outcome_begin(job *j)
{
    if (j->state != JOB_FAILING && j->state != JOB_SENDING_ON)
        job_set_state(j, JOB_PUBLISHING);
    j->mark = 0;
    rt_outcome_begin(&j->out, outcome_done, j);
}

void job_publish_event(job *j, const char *routing_key, const char *body, size_t len)
{
    rt_publish_event_text(j->e->rt, &j->out, routing_key, body, len, j->job_id);
}

void job_publish_later(job *j, const char *target, const char *body, size_t len,
                       const json_t *headers, long delay_ms)
{
    rt_publish_delayed(j->e->rt, &j->out, target, body, len, j->job_id, headers, delay_ms);
}

void job_outcome_seal(job *j, int mark)
{
    j->mark = mark;
    rt_outcome_seal(&j->out);
}

json_t *job_onward_headers(const job *j, int attempts, const char *last_error)
{
    return rt_onward_headers(j->d, attempts, last_error);
}

/* The same delivery, unchanged but for its onward headers, after delay_ms. */
static void job_send_on(job *j, long delay_ms, int attempts, const char *last_error)
{
    json_t *h;

    if (!job_live(j))
        return;
    h = job_onward_headers(j, attempts, last_error);
    if (j->first_attempt_ms)
        json_object_set_new(h, "x-first-attempt", json_integer(j->first_attempt_ms));
    job_set_state(j, JOB_SENDING_ON);
    metrics_delivery(j->role->metric_role, IW_DELIVERY_DELAYED);
    job_outcome_begin(j);
    job_publish_later(j, j->role->queue, j->d->body, j->d->body_len, h, delay_ms);
    json_decref(h);
    job_outcome_seal(j, 0);
}

/* Jobs that waited for Redis (the limiter) longer than IW_HOLD_MAX go to the
 * delay tiers, without using an attempt: a delivery held for long meets the
 * broker's consumer_timeout, and every requeue counts toward the quorum
 * queue's x-delivery-limit, which would dead-letter valid jobs. */
static void park_waiting_jobs(engine *e, long long now, int wait_reason)
{
    call_fifo park = {0};

    for (int cls = 0; cls < LIMITER_N_CLASSES; cls++)
        for (int prio = 0; prio < 2; prio++) {
            call_fifo keep = {0};
            call *c;
            while ((c = call_pop(&e->ready[cls][prio]))) {
                if (c->ops == &job_call_ops && now - c->ready_since > e->cfg->hold_max_ms) {
                    c->queued = 0;
                    call_push(&park, c);
                } else {
                    call_push(&keep, c);
                }
            }
            e->ready[cls][prio] = keep;
        }
    for (call *c; (c = call_pop(&park));) {
        if (wait_reason >= 0) /* counted when a reason is ours to name (the token) */
            metrics_job_wait(((job *)c)->role->metric_role, (iw_wait_reason)wait_reason);
        job_send_on((job *)c, PARK_MS, ((job *)c)->attempts, NULL);
    }
}

/* submission.failed (event text given) and this delivery's dead letter, one
 * group; with `mark` the failure was recorded and is marked published. */
static void publish_failure(job *j, const char *event, int mark)
{
    json_t *ev = json_loads(event, 0, NULL), *e = json_object_get(ev, "error");
    const char *code = json_string_value(json_object_get(e, "code"));
    const char *msg = json_string_value(json_object_get(e, "message"));
    json_t *st = json_object_get(e, "statusCode");

    if (j->state != JOB_FAILING)
        job_set_state(j, JOB_FAILING);
    job_outcome_begin(j);
    job_publish_event(j, "submission.failed", event, strlen(event));
    rt_publish_dead(j->e->rt, &j->out, j->d, j->role->metric_role, j->role->queue,
                    code ? code : iw_code_name(j->fail_code), msg ? msg : "",
                    json_is_integer(st) ? (long)json_integer_value(st) : 0,
                    (int)json_integer_value(json_object_get(e, "retryAttempt")));
    json_decref(ev);
    job_outcome_seal(j, mark);
}

void job_fail(job *j, iw_code code, const char *message, long http_status, int attempts)
{
    json_t *f, *ev;
    char *text;

    if (!job_live(j))
        return;
    job_set_state(j, JOB_FAILING);
    j->fail_code = code;
    free(j->fail_msg);
    j->fail_msg = strdup(message);
    metrics_job_outcome(j->role->metric_role, j->job_id ? IW_OUTCOME_FAILED : IW_OUTCOME_DEAD);
    f = job_fields(j);
    json_object_set_new(f, "operation", json_string(j->role->operation));
    json_object_set_new(f, "error",
                        rt_error_object(iw_code_name(code), message, http_status, attempts));
    log_json(IW_LOG_ERROR, f);
    if (!j->job_id) { /* unreadable: the dead letter alone */
        job_outcome_begin(j);
        rt_publish_failure(j->e->rt, &j->out, j->d, j->role->metric_role, j->role->queue, NULL,
                           iw_code_name(code), message, http_status, attempts);
        job_outcome_seal(j, 0);
        return;
    }
    ev = json_pack("{s:s, s:o}", "jobId", j->job_id, "error",
                   rt_error_object(iw_code_name(code), message, http_status, attempts));
    text = ev ? json_out_text(ev, NULL) : NULL;
    json_decref(ev);
    if (text && j->role->claims && j->call.record_key) {
        /* a job that can be called twice records its failure like an
         * acceptance (briefly): a second delivery meanwhile gets this one;
         * the record's script drops the claim */
        j->failing = 1;
        job_record(j, text);
        return;
    }
    release_claim(j->e, &j->call);
    if (!text) {
        job_end(j, JOB_RETURNED, 1);
        return;
    }
    publish_failure(j, text, 0);
    free(text);
}

static void count_retry(const job *j, iw_code code)
{
    iw_answer_class a = iw_code_class(code);

    metrics_retry(j->call.kind->route, a == IW_AC_5XX       ? IW_RETRY_SERVER_ERROR
                                       : a == IW_AC_TIMEOUT ? IW_RETRY_TIMEOUT
                                                            : IW_RETRY_CONNECTION);
}

void job_retry_in(job *j, iw_code code, long delay_ms, int attempt)
{
    release_claim(j->e, &j->call);
    count_retry(j, code);
    job_send_on(j, delay_ms, attempt, iw_code_name(code));
}

void job_retry(job *j, iw_code code, const char *message, long http_status, int attempt)
{
    const iw_config *cfg = j->e->cfg;
    long next = retry_delay_before(cfg->retry_schedule_ms, cfg->n_retry, attempt + 1);

    if (next < 0) {
        job_fail(j, code, message, http_status, attempt);
        return;
    }
    job_retry_in(j, code, next, attempt);
}

static void hold_over(loop *l, loop_timer *t)
{
    job *j = t->ud;

    (void)l;
    job_set_state(j, JOB_READY);
    engine_ask(j->e, &j->call);
}

/* Waits wait_ms without using an attempt: in memory (delivery unacked) up
 * to hold_max, else through the delay tiers. */
static void job_wait_up_to(job *j, long wait_ms, long hold_max)
{
    engine *e = j->e;

    if (!job_live(j))
        return;
    if (wait_ms <= hold_max && !rt_stopping(e->rt)) {
        job_set_state(j, JOB_HELD);
        if (loop_timer_at(e->lp, &j->hold, clock_mono_ms() + (wait_ms > 0 ? wait_ms : 0)) == 0)
            return;
    }
    job_send_on(j, wait_ms, j->attempts, NULL);
}

void job_wait(job *j, long wait_ms)
{
    job_wait_up_to(j, wait_ms, j->e->cfg->hold_max_ms);
}

void job_record_doc(job *j, json_t *doc)
{
    job_record(j, doc ? json_out_text(doc, NULL) : NULL);
    if (doc && j->event)
        j->event_doc = json_incref(doc);
}

void job_record(job *j, char *event)
{
    free(j->event);
    j->event = event;
    json_decref(j->event_doc);
    j->event_doc = NULL;
    if (!event) {
        log_msg(IW_LOG_ERROR, job_fields(j), "out of memory building the outcome; requeued");
        job_end(j, JOB_RETURNED, 1);
        return;
    }
    job_set_state(j, JOB_RECORDING);
    j->step_since = clock_mono_ms();
    job_push(&j->e->to_put, j);
}

/* ---- jobs: the call -------------------------------------------------------------------------- */

static void job_on_permit(call *c, call_permit p, long wait_ms, int reason, const char *record,
                          size_t len)
{
    job *j = (job *)c;
    int rc;

    (void)record;
    (void)len;
    switch (p) {
    case CALL_GRANTED:
        job_set_state(j, JOB_PERMITTED);
        c->attempt = j->attempts + 1;
        job_set_state(j, JOB_CALLING);
        if ((rc = j->role->start(j)) != IW_OK) {
            release_claim(j->e, c);
            if (rc == IW_ERR_URL_TOO_LONG || rc == IW_ERR_HEADER_VALUE ||
                rc == IW_ERR_URL_INVALID) {
                /* the request built from this job can never be sent as it is:
                 * trying again would loop for ever */
                job_fail(j, IW_C_REQUEST_NOT_SENT, iw_strerror(rc), 0, j->attempts);
                break;
            }
            log_msg(IW_LOG_ERROR, job_fields(j),
                    "cannot start the provider call (%s); retrying in 1 s", iw_strerror(rc));
            job_wait(j, START_RETRY_MS);
        }
        break;
    case CALL_RECORDED:
        /* done before (a redelivery, or a second delivery of the jobId) */
        job_set_state(j, JOB_ADOPTING);
        j->step_since = clock_mono_ms();
        job_push(&j->e->to_adopt, j);
        break;
    case CALL_CLAIMED:
        /* another delivery of this job is in a provider call right now (a
         * requeue after a lost connection, a double publish): its outcome,
         * recorded, answers this one; never a second concurrent POST */
        log_msg(j->claim_waits++ ? IW_LOG_DEBUG : IW_LOG_INFO, job_fields(j),
                "another worker is calling the provider for this job; waiting for its outcome "
                "(its claim runs %ld ms more)",
                wait_ms);
        /* held in memory, whatever IW_HOLD_MAX: the wait is bounded by the
         * claim's lease, and a job that kills every worker that calls for it
         * must keep counting its deliveries toward x-delivery-limit */
        job_wait_up_to(j, wait_ms < CLAIM_POLL_MS ? wait_ms : CLAIM_POLL_MS,
                       j->e->cfg->http_timeout_ms + LEASE_SLACK_MS + 1000);
        break;
    case CALL_DEFERRED:
        metrics_job_wait(j->role->metric_role, IW_WAIT_MAINTENANCE);
        job_wait(j, wait_ms);
        break;
    case CALL_REFUSED:
        metrics_job_wait(j->role->metric_role, reason == LIMITER_WAIT_BREAKER ? IW_WAIT_BREAKER
                                               : reason == LIMITER_WAIT_PAUSE ? IW_WAIT_PROVIDER_429
                                                                              : IW_WAIT_RATE_LIMIT);
        job_wait(j, wait_ms);
        break;
    }
}

static void job_on_answer(call *c, const http_response *r, iw_verdict *v)
{
    job *j = (job *)c;

    /* the claim stays until the answer's consequence is in Redis: a recorded
     * outcome (accepted or failed) drops it in the same script; a retry or a
     * wait releases it (job_retry_in, below) */
    job_set_state(j, JOB_CLASSIFIED);
    if (r->result.token_refused && !j->token_retried) {
        /* a 401 on a call that carried a token (expired or revoked early):
         * one retry with the new token, under a permit of its own, no attempt
         * used; a 401 after that is the answer */
        engine_log_call(c, r, v, NULL, NULL);
        j->token_retried = 1;
        metrics_retry(c->kind->route, IW_RETRY_UNAUTHORIZED);
        release_claim(j->e, c);
        job_wait(j, 0);
        return;
    }
    if (v->kind == IW_V_WAIT) {
        release_claim(j->e, c);
        engine_log_call(c, r, v, NULL, NULL);
        metrics_job_wait(j->role->metric_role, r->result.transport == IW_TRANSPORT_NO_TOKEN
                                                   ? IW_WAIT_TOKEN
                                                   : IW_WAIT_PROVIDER_429);
        job_wait(j, v->wait_ms); /* the reset or the token: no attempt used */
        return;
    }
    j->role->answer(j, r, v);
}

static const call_ops job_call_ops = {job_on_permit, job_on_answer, call_fields};

/* ---- jobs: Redis steps, one round trip per turn --------------------------------------------- */

static void after_put(job *j, records_reply *rr)
{
    if (rr->answer == REC_STORED) {
        if (!job_live(j))
            return;
        if (j->failing)
            publish_failure(j, j->event, 1);
        else
            j->role->publish(j, j->event);
        return;
    }
    /* another delivery of this jobId recorded first: its outcome wins */
    log_msg(IW_LOG_INFO, job_fields(j),
            "another delivery of this job recorded its outcome first; that one is published");
    job_set_state(j, JOB_ADOPTING);
    j->step_since = clock_mono_ms();
    job_push(&j->e->to_adopt, j);
}

static void after_adopt(job *j, records_reply *rr)
{
    switch (rr->answer) {
    case REC_ADOPTED:
        free(j->event);
        j->event = rr->event;
        rr->event = NULL;
        json_decref(j->event_doc);
        j->event_doc = NULL;
        if (!job_live(j))
            return;
        log_msg(IW_LOG_INFO, job_fields(j),
                "outcome recorded but not published (a crash?); publishing it without a call");
        if (rr->failed)
            publish_failure(j, j->event, 1);
        else
            j->role->publish(j, j->event);
        break;
    case REC_PUBLISHED:
        if (!job_live(j))
            return;
        if (rr->failed || j->role->republish) {
            log_msg(IW_LOG_INFO, job_fields(j),
                    "job done before; its recorded outcome is published again without a call");
            free(j->event);
            j->event = rr->event;
            rr->event = NULL;
            json_decref(j->event_doc);
            j->event_doc = NULL;
            if (rr->failed) { /* the same submission.failed; its dead letter exists */
                job_set_state(j, JOB_FAILING);
                job_outcome_begin(j);
                job_publish_event(j, "submission.failed", j->event, strlen(j->event));
                job_outcome_seal(j, 0);
            } else {
                j->role->republish(j, j->event);
            }
            return;
        }
        log_msg(IW_LOG_INFO, job_fields(j), "job already done and published; acked without a call");
        rt_ack(j->e->rt, j->d);
        job_end(j, JOB_ACKED, 0);
        break;
    case REC_BUSY:
        log_msg(IW_LOG_INFO, job_fields(j),
                "another worker is publishing this job's outcome; waiting %ld ms for its lease",
                rr->wait_ms);
        job_wait(j, rr->wait_ms + 1);
        break;
    default: /* gone (expired in between): ask again */
        if (job_live(j)) {
            job_set_state(j, JOB_READY);
            engine_ask(j->e, &j->call);
        }
        break;
    }
}

/* A mark's reply: the job was acked at its confirm, the record only tells
 * a later delivery that the outcome is out. */
static void after_mark(const char *key, const records_reply *rr, const iw_error *err, int ok)
{
    if (!ok || rr->answer != REC_DONE)
        log_json(IW_LOG_WARN,
                 json_pack("{s:s, s:s, s:s}", "key", key, "error", ok ? "record gone" : err->msg,
                           "message",
                           "outcome published but not marked in Redis; a later delivery of the "
                           "job repeats its event"));
}

/* Jobs whose Redis step has failed for longer than IW_HOLD_MAX stop holding
 * their deliveries: an outcome not yet recorded is published without its
 * record (a redelivery would repeat the call, which the provider answers
 * from its Idempotency-Key); a found record waits in the delay tiers. */
static void give_up_waiting_steps(engine *e, long long now)
{
    job_fifo keep = {0};
    job *j;

    while ((j = job_pop(&e->to_put))) {
        if (now - j->step_since <= e->cfg->hold_max_ms) {
            job_push(&keep, j);
        } else if (job_live(j)) {
            log_msg(IW_LOG_WARN, job_fields(j),
                    "Redis unavailable: publishing the outcome without its record");
            j->role->publish(j, j->event);
        }
    }
    e->to_put = keep;
    memset(&keep, 0, sizeof keep);
    while ((j = job_pop(&e->to_adopt))) {
        if (now - j->step_since <= e->cfg->hold_max_ms)
            job_push(&keep, j);
        else
            job_send_on(j, PARK_MS, j->attempts, NULL);
    }
    e->to_adopt = keep;
}

/* The records half of a turn's round trip: claims dropped, published
 * outcomes marked, outcomes recorded, records adopted. */
typedef struct steps {
    job_fifo taken[2];    /* puts, adopts appended */
    size_t released;      /* claim releases appended */
    pending_mark *marked; /* marks appended, oldest first */
    size_t n_marked;
    int waiting; /* a WAIT follows the records */
    int active;  /* something was appended or failed */
    int failed;
    iw_error err;
} steps;

/* Marks ride along with the next round trip; alone, they go after this. */
#define MARK_LINGER_MS 5L

static void mark_free_list(pending_mark *m)
{
    while (m) {
        pending_mark *next = m->next;
        free(m);
        m = next;
    }
}

/* Queues the mark of a published outcome's record (key copied). */
static void queue_mark(engine *e, const char *key)
{
    size_t n = strlen(key) + 1;
    pending_mark *m = malloc(sizeof *m + n);

    if (!m) { /* the record's lease expires instead: a later delivery repeats the event */
        log_msg(IW_LOG_WARN, NULL, "out of memory queueing a record's mark");
        return;
    }
    m->next = NULL;
    m->since = clock_mono_ms();
    memcpy(m->key, key, n);
    if (e->marks_tail)
        e->marks_tail->next = m;
    else
        e->marks = m;
    e->marks_tail = m;
    if (!loop_timer_armed(&e->mark_due))
        loop_timer_at(e->lp, &e->mark_due, m->since + MARK_LINGER_MS);
}

/* Whether this turn's round trip carries the queued marks: when there is
 * one anyway, or the oldest has waited long enough, or the process stops. */
static int marks_go(engine *e, long long now)
{
    if (!e->marks)
        return 0;
    return e->to_put.head || e->to_adopt.head || e->releases || e->n_outcomes ||
           now - e->marks->since >= MARK_LINGER_MS || rt_stopping(e->rt) || calls_could_go(e);
}

/* Appends the put, adopt and mark of every queued job (and the claims to
 * drop), moving them to s; returns 0, or -1 when the pipeline broke. */
static int append_steps(engine *e, steps *s, long long now)
{
    job_fifo *queues[2] = {&e->to_put, &e->to_adopt};

    while (e->releases) {
        release *r = e->releases;
        if (records_append_release(e->rec, r->key, r->token, &s->err) != IW_OK)
            return -1;
        e->releases = r->next;
        free(r);
        s->released++;
    }
    /* marks first: a put or adopt of the same job later in this pipeline
     * finds its record published */
    if (marks_go(e, now)) {
        pending_mark **tail = &s->marked;
        while (e->marks) {
            pending_mark *m = e->marks;
            if (records_append_mark(e->rec, m->key, &s->err) != IW_OK)
                return -1;
            e->marks = m->next;
            m->next = NULL;
            *tail = m;
            tail = &m->next;
            s->n_marked++;
        }
        e->marks_tail = NULL;
        loop_timer_cancel(e->lp, &e->mark_due);
    }
    for (int q = 0; q < 2; q++) {
        job *j;
        while ((j = queues[q]->head)) {
            int rc = q == 0 ? records_append_put(e->rec, j->key, j->event, j->token,
                                                 j->call.claim_key, j->call.claim_token,
                                                 j->failing ? FAILED_RECORD_MS : 0, &s->err)
                            : records_append_adopt(e->rec, j->key, j->token, &s->err);
            if (rc != IW_OK)
                return -1;
            job_push(&s->taken[q], job_pop(queues[q]));
        }
    }
    return 0;
}

/* With IW_REDIS_WAIT_REPLICAS, the records just written must reach that many
 * replicas before they are acted on (a failover then cannot lose them); too
 * few in IW_REDIS_WAIT_TIMEOUT is logged, not fatal: a replica outage must not
 * become an outage of the worker. */
static void wait_replicas(engine *e, int appended)
{
    redisReply *rep = NULL;
    iw_error err = {0};

    if (appended <= 0)
        return;
    if (redis_link_read(rt_redis(e->rt), &rep, &err) != IW_OK ||
        redis_wait_check(rep, e->cfg->redis_wait_replicas, &err) != IW_OK)
        log_msg(IW_LOG_WARN, NULL, "records not confirmed by IW_REDIS_WAIT_REPLICAS replicas: %s",
                err.msg);
    if (rep)
        freeReplyObject(rep);
}

/* Acts on each job's reply; returns 1 when a put or adopt must be tried
 * again (the connection broke). */
static int dispatch_steps(engine *e, steps *s, records_reply *rr, int *ok, size_t n)
{
    job_fifo *queues[2] = {&e->to_put, &e->to_adopt};
    int failed = 0;
    size_t i = 0;

    for (int q = 0; q < 2; q++) {
        job *j;
        while (i < n && (j = job_pop(&s->taken[q]))) {
            records_reply *r = &rr[i];
            int good = ok[i++];
            if (!good && s->err.status == IW_ERR_REDIS_SCRIPT &&
                redis_link_connected(rt_redis(e->rt))) {
                /* Redis answers, the record does not parse: trying again
                 * cannot help */
                job_fail(j, IW_C_RECORD_CORRUPT, s->err.msg, 0, j->attempts);
            } else if (!good) {
                failed = 1;
                job_push(queues[q], j); /* tried again */
            } else if (q == 0) {
                after_put(j, r);
            } else {
                after_adopt(j, r);
            }
            free(r->event);
        }
    }
    return failed;
}

/* Appends the turn's records steps to the pipeline (read by steps_read). */
static void steps_append(engine *e, steps *s, long long now)
{
    memset(s, 0, sizeof *s);
    if (!e->to_put.head && !e->to_adopt.head && !e->releases && !marks_go(e, now))
        return;
    if (now < e->records_blocked_until)
        return;
    s->active = 1;
    if (!rt_redis_ready(e->rt)) {
        s->failed = 1;
        iw_error_set(&s->err, IW_ERR_REDIS, "Redis unavailable");
        return;
    }
    s->failed = append_steps(e, s, now) != 0;
    if (s->taken[0].head)
        s->waiting = redis_link_append_wait(rt_redis(e->rt), e->cfg->redis_wait_replicas,
                                            e->cfg->redis_wait_timeout_ms, &s->err);
}

/* Reads the replies to steps_append's scripts, in pipeline order, and acts
 * on them once all are read (so that WAIT, when configured, covers them
 * all).  Jobs whose step failed wait for the next try (1 s); marks that
 * failed are logged (their jobs are acked: the event is out).  Returns 1
 * when steps are left for another turn at once. */
static int steps_read(engine *e, steps *s, long long now)
{
    records_reply *rr = NULL;
    int *ok = NULL;
    size_t n = 0;

    if (!s->active)
        return 0;
    /* every reply appended is read, also after a failure or out of memory:
     * the next reader of the pipeline (the permits) must find its own */
    for (size_t i = 0; i < s->released; i++) {
        records_reply r;
        if (records_read(e->rec, &r, &s->err) == IW_OK)
            free(r.event);
    }
    for (pending_mark *m = s->marked; m; m = m->next) {
        records_reply r = {0};
        int good = records_read(e->rec, &r, &s->err) == IW_OK;
        after_mark(m->key, &r, &s->err, good);
        free(r.event);
    }
    for (int q = 0; q < 2; q++)
        for (job *j = s->taken[q].head; j; j = j->next)
            n++;
    rr = calloc(n ? n : 1, sizeof *rr);
    ok = calloc(n ? n : 1, sizeof *ok);
    for (size_t i = 0; i < n; i++) {
        records_reply none = {0};
        int good = records_read(e->rec, rr && ok ? &rr[i] : &none, &s->err) == IW_OK;
        if (rr && ok)
            ok[i] = good;
        else
            free(none.event);
    }
    wait_replicas(e, s->waiting);
    if (rr && ok) {
        s->failed |= dispatch_steps(e, s, rr, ok, n);
    } else { /* out of memory: the replies were dropped, the steps tried again */
        job_fifo *queues[2] = {&e->to_put, &e->to_adopt};
        for (int q = 0; q < 2; q++)
            for (job *j; (j = job_pop(&s->taken[q]));)
                job_push(queues[q], j);
        s->failed = 1;
    }
    free(rr);
    free(ok);
    mark_free_list(s->marked);
    s->marked = NULL;
    if (s->failed) {
        log_msg(IW_LOG_WARN, NULL, "could not record outcomes in Redis (%s); retrying in %ld ms",
                s->err.msg[0] ? s->err.msg : "unexpected reply", LIMITER_RETRY_MS);
        give_up_waiting_steps(e, now);
        e->records_blocked_until = now + LIMITER_RETRY_MS;
        loop_timer_at(e->lp, &e->unblock, e->records_blocked_until);
        return 0;
    }
    return e->to_put.head || e->to_adopt.head;
}

/* The turn-end hook: ONE pipelined Redis round trip for the whole turn, the
 * records steps first (they finish jobs), then the permits. */
static int engine_flush(loop *l, void *ud)
{
    engine *e = ud;
    long long now = clock_mono_ms();
    steps s;
    asks a;
    int again;

    (void)l;
    if (rt_stopping(e->rt)) {
        for (int cls = 0; cls < LIMITER_N_CLASSES; cls++)
            for (int prio = 0; prio < 2; prio++) {
                call *c;
                while ((c = e->ready[cls][prio].head)) {
                    job *j = (job *)c;
                    if (c->ops != &job_call_ops)
                        break; /* a resolver flight: its owner answers it */
                    engine_unask(e, c);
                    job_end(j, JOB_RETURNED, 1);
                }
            }
    }
    steps_append(e, &s, now);
    asks_append(e, &a, now);
    again = steps_read(e, &s, now);
    return asks_read(e, &a, now) || again;
}

/* ---- jobs: intake
 * ---------------------------------------------------------------------------------- */

/* When a delivery came back from a delay tier early (its trusted x-due-at
 * more than IW_DELAY_SLACK_MS ahead), the ms left; else 0. */
static long early_ms(const iw_delivery *d)
{
    long long due = rt_header_int(d, "x-due-at", 0);
    long long left = due > 0 ? due - clock_wall_ms() : 0;

    if (left <= IW_DELAY_SLACK_MS)
        return 0;
    return left > MAX_DELAY_MS ? MAX_DELAY_MS : (long)left;
}

/* A new job for a delivery of role rs, in state received; NULL when out of
 * memory (the delivery is then returned). */
static job *job_new(engine *e, role_slot *rs, iw_delivery *d)
{
    job *j = calloc(1, rs->role->job_size);

    if (!j) {
        rt_nack(e->rt, d, 1);
        delivery_free(d);
        return NULL;
    }
    j->role = rs->role;
    j->self = rs->self;
    j->e = e;
    j->d = d;
    j->key = j->claim = j->first = "";
    j->call.kind = &rs->kind;
    j->call.ops = &job_call_ops;
    loop_timer_init(&j->hold, hold_over, j);
    j->next_all = e->all;
    if (e->all)
        e->all->prev_all = j;
    e->all = j;
    e->alive++;
    next_token(e, j->token, sizeof j->token);
    metrics_delivery(j->role->metric_role, IW_DELIVERY_RECEIVED);
    j->state = JOB_RECEIVED;
    note_state(j);
    return j;
}

/* What the headers say about j, believed only when they are ours (a
 * message back from the delay tiers). */
static void read_headers(job *j)
{
    const iw_config *cfg = j->e->cfg;

    if (intake_trust_internal_headers(j->d->headers, j->d->exchange, cfg->ns)) {
        long long due = rt_header_int(j->d, "x-due-at", 0);
        if (due > 0)
            metrics_delay_returned(clock_wall_ms() - due);
    }
    j->attempts = (int)rt_header_int(j->d, "x-attempts", 0);
    if (j->attempts < 0)
        j->attempts = 0;
    if ((size_t)j->attempts > cfg->n_retry)
        j->attempts = (int)cfg->n_retry;
    j->first_attempt_ms = rt_header_int(j->d, "x-first-attempt", 0);
    if (j->first_attempt_ms < 0)
        j->first_attempt_ms = 0;
}

/* The job's Redis keys in one block sized to them: a job in the backlog
 * holds its ~100 bytes of keys, not three arrays of RECORDS_KEY_MAX.  0;
 * -1 when a key of this jobId does not fit (msg filled); -2 out of memory. */
static int job_make_keys(job *j, char *msg, size_t len)
{
    static const char *const what[] = {"record", "claim", "first-attempt"};
    const char *kinds[] = {j->role->record_kind, "claim", "first"};
    const char **dst[] = {&j->key, &j->claim, &j->first};
    size_t sz[3], total = 0;
    int n = j->role->claims ? 3 : 2;

    for (int i = 0; i < n; i++) {
        sz[i] = records_key_size(j->e->rec, kinds[i], j->job_id);
        if (sz[i] > RECORDS_KEY_MAX) {
            snprintf(msg, len, "the %s key of this jobId does not fit", what[i]);
            return -1;
        }
        total += sz[i];
    }
    size_t id_size = strlen(j->job_id) + 1;
    char *block = malloc(total + id_size), *p = block;
    if (!block)
        return -2;
    for (int i = 0; i < n; i++) {
        records_key(j->e->rec, p, sz[i], kinds[i], j->job_id);
        *dst[i] = p;
        p += sz[i];
    }
    /* the jobId too, so that it outlives the parsed delivery (job_drop_doc) */
    memcpy(p, j->job_id, id_size);
    j->job_id = p;
    free(j->keys);
    j->keys = block;
    return 0;
}

/* Intake, the role's own reading of the job, and its record key: IW_C_NONE,
 * or the code (msg filled) that fails the job.  *back is set when the job is
 * sound but this process is out of memory: the delivery goes back, a valid
 * job is never failed for it. */
static iw_code accept_job(job *j, const iw_schema *schema, char *msg, size_t len, int *back)
{
    intake_result in;
    const char *prio;
    iw_code code;
    int rc;

    intake_json(j->d->body, j->d->body_len, j->d->content_type,
                (size_t)j->e->cfg->max_message_bytes, schema, &in);
    j->doc = in.doc;
    /* any readable jobId gets its submission.failed, even "" (contract) */
    j->job_id = json_string_value(json_object_get(j->doc, "jobId"));
    if (in.code != IW_C_NONE) {
        snprintf(msg, len, "%s", in.msg);
        return in.code;
    }
    job_set_state(j, JOB_VALIDATED);
    prio = json_string_value(json_object_get(j->doc, "priority"));
    j->call.critical = prio && strcmp(prio, "critical") == 0;
    if ((code = j->role->prepare(j, msg, len)) != IW_C_NONE)
        return code;
    if ((rc = job_make_keys(j, msg, len)) != 0) {
        *back = rc == -2;
        return IW_C_INTERNAL_ERROR;
    }
    j->call.record_key = j->key;
    j->call.claim_key = j->role->claims ? j->claim : NULL;
    j->call.first_key = j->role->claims ? j->first : NULL;
    j->call.first_ms = &j->first_attempt_ms;
    return IW_C_NONE;
}

static void on_delivery(void *self, iw_delivery *d)
{
    role_slot *rs = self;
    job *j = job_new(rs->e, rs, d);
    char msg[INTAKE_MSG_LEN];
    iw_code code;
    long early;
    int back = 0;

    if (!j)
        return;
    if (rt_stopping(rs->e->rt)) {
        job_end(j, JOB_RETURNED, 1);
        return;
    }
    read_headers(j);
    if ((code = accept_job(j, rs->schema, msg, sizeof msg, &back)) != IW_C_NONE) {
        if (back)
            job_end(j, JOB_RETURNED, 1); /* as job_new does when out of memory */
        else
            job_fail(j, code, msg, 0, j->attempts);
        return;
    }
    if ((early = early_ms(d))) {
        /* back from a delay tier early: on to the next hop */
        job_send_on(j, early, j->attempts, rt_header_str(d, "x-last-error"));
        return;
    }
    job_set_state(j, JOB_READY);
    engine_ask(rs->e, &j->call);
}

/* ---- the engine
 * ------------------------------------------------------------------------------------ */

static void svc_link_lost(void *self)
{
    engine_link_lost(self);
}

static void svc_stop(void *self)
{
    engine_stop(self);
}

static size_t svc_busy(void *self)
{
    return engine_busy(self);
}

/* The runtime is going away (its broker link is already freed): free the
 * jobs still alive while the loop they hold timers in still exists. */
static void svc_exit(void *self)
{
    engine *e = self;

    while (e->all)
        job_free(e->all);
    while (e->releases) {
        release *r = e->releases;
        e->releases = r->next;
        free(r);
    }
    loop_timer_cancel(e->lp, &e->unblock);
    loop_timer_cancel(e->lp, &e->mark_due);
    mark_free_list(e->marks);
    e->marks = e->marks_tail = NULL;
    /* the HTTP client outlives this call by a moment (runtime_free frees it
     * next): it must not call back into the engine */
    http_client_on_token(rt_http(e->rt), NULL, NULL);
    e->lp = NULL;
}

int engine_add_role(engine *e, const job_role *role, void *self)
{
    role_slot *rs;
    iw_error err = {0};
    rt_role r;

    if (e->n_roles == MAX_ROLES)
        return IW_ERR_INVALID;
    rs = &e->roles[e->n_roles];
    rs->e = e;
    rs->role = role;
    rs->self = self;
    rs->kind.cls = role->cls;
    rs->kind.route = role->route;
    rs->kind.operation = role->operation;
    rs->schema = rt_load_schema(e->rt, role->schema, &err);
    if (!rs->schema) {
        log_msg(IW_LOG_ERROR, NULL, "cannot load %s: %s", role->schema, err.msg);
        return IW_ERR_SCHEMA;
    }
    e->n_roles++;
    memset(&r, 0, sizeof r);
    r.name = role->name;
    r.queue_suffix = role->queue;
    r.self = rs;
    r.on_delivery = on_delivery;
    return runtime_add_role(e->rt, &r);
}

engine *engine_new(runtime *rt, iw_error *err)
{
    engine *e = calloc(1, sizeof *e);
    const iw_config *cfg = rt_config(rt);

    if (!e) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        return NULL;
    }
    e->rt = rt;
    e->cfg = cfg;
    e->lp = rt_loop(rt);
    e->rec = records_new(rt_redis(rt), cfg->ns, cfg->idempotency_ttl_ms,
                         cfg->http_timeout_ms + LEASE_SLACK_MS);
    rt_service svc = {e, svc_link_lost, svc_stop, svc_busy, svc_exit};
    if (!e->rec || loop_add_hook(e->lp, engine_flush, e) != 0 ||
        runtime_add_service(rt, &svc) != IW_OK) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        engine_free(e);
        return NULL;
    }
    loop_timer_init(&e->unblock, unblock_fired, e);
    loop_timer_init(&e->mark_due, unblock_fired, e);
    e->probe_outcome = -1;
    http_client_on_token(rt_http(rt), on_token, e);
    snprintf(e->proc_token, sizeof e->proc_token, "%ld-%lx", (long)getpid(),
             (unsigned long)random());
    return e;
}

void engine_free(engine *e)
{
    if (!e)
        return;
    if (e->lp) /* the runtime was never run or freed: its HTTP client still exists */
        svc_exit(e);
    for (size_t i = 0; i < e->n_roles; i++)
        schema_free(e->roles[i].schema);
    records_free(e->rec);
    free(e);
}

records *engine_records(engine *e)
{
    return e->rec;
}

size_t engine_busy(engine *e)
{
    /* a stop waits for the marks too, unless Redis is away (then the records'
     * leases expire, and a later delivery repeats the event) */
    return e->alive + (e->marks && rt_redis_ready(e->rt));
}

/* Returns the jobs that wait for a permit or in memory to their queue; calls
 * in flight and Redis steps finish (they are moments from done). */
void engine_stop(engine *e)
{
    for (job *j = e->all, *next; j; j = next) {
        next = j->next_all;
        if (j->state == JOB_READY || j->state == JOB_HELD)
            job_end(j, JOB_RETURNED, 1);
    }
}

void engine_link_lost(engine *e)
{
    job *j, *next;

    /* the redelivery decides again; a put still runs: its record saves the
     * redelivery a second call (and marks are not the link's business) */
    while ((j = job_pop(&e->to_adopt)))
        job_end(j, JOB_DROPPED, 0);
    for (j = e->all; j; j = next) {
        next = j->next_all;
        if (j->state == JOB_READY || j->state == JOB_HELD)
            job_end(j, JOB_DROPPED, 0);
    }
}
