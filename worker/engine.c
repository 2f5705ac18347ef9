#include "engine.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "intake.h"
#include "limiter.h"
#include "log.h"
#include "topology.h"

#define MAX_ROLES 4
#define LIMITER_RETRY_MS 1000L
#define USAGE_WARN_MS 60000L
#define START_RETRY_MS 1000L
/* No wait we set is longer than a month: a larger x-due-at is not ours. */
#define MAX_DELAY_MS (30L * 24 * 3600 * 1000)
/* A recorded outcome belongs to its recorder this much longer than one
 * provider call can take: long enough for a publish and its confirm. */
#define LEASE_SLACK_MS 5000L
/* A job that cannot reach Redis for longer than IW_HOLD_MAX waits this long
 * in the delay tiers before it tries again. */
#define PARK_MS 10000L

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

struct engine {
    runtime *rt;
    const iw_config *cfg;
    loop *lp;
    records *rec;
    /* calls waiting for a permit: per limiter class, [0] critical, [1] normal */
    call_fifo ready[LIMITER_N_CLASSES][2];
    loop_timer unblock; /* wakes the loop when the limiter may be asked again */
    long long blocked_until;
    long long last_usage_warn;
    /* jobs waiting for a Redis step of the next round trip */
    job_fifo to_put, to_adopt, to_mark;
    long long records_blocked_until;
    job *all;
    size_t alive;
    role_slot roles[MAX_ROLES];
    size_t n_roles;
    char proc_token[40];
    unsigned long long seq;
};

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

void engine_log_call(const call *c, const http_response *r, const iw_verdict *v, json_t *extra)
{
    json_t *f = c->ops->fields(c);
    const char *k;
    json_t *x;
    int level;

    json_object_set_new(f, "operation", json_string(c->kind->operation));
    json_object_set_new(f, "duration", json_integer(r->duration_us / 1000));
    json_object_set_new(f, "status",
                        r->result.status ? json_integer(r->result.status) : json_null());
    json_object_set_new(f, "attempt", json_integer(c->attempt));
    json_object_foreach(extra, k, x) json_object_set(f, k, x);
    json_decref(extra);
    if (v->kind == IW_V_ACCEPT) {
        level = IW_LOG_INFO;
    } else {
        char m[300];
        engine_answer_message(r, m, sizeof m);
        level = v->kind == IW_V_WAIT ? IW_LOG_WARN : iw_code_level(v->code);
        json_object_set_new(
            f, "error",
            json_pack("{s:s, s:s, s:o, s:i}", "code", iw_code_name(v->code), "message", m,
                      "statusCode", r->result.status ? json_integer(r->result.status) : json_null(),
                      "retryAttempt", c->attempt));
    }
    log_json(level, f);
}

static void on_http(void *ud, const http_response *r)
{
    call *c = ud;
    iw_verdict v = retry_classify(&r->result);

    metrics_provider_call(c->kind->route, r->result.status, r->duration_us, v.breaker_failure);
    if (v.kind == IW_V_WAIT) {
        /* a 429 pauses the whole fleet, whatever becomes of this call */
        iw_error err;
        if (limiter_pause(rt_limiter(c->eng->rt), v.wait_ms, &err) != IW_OK)
            log_msg(IW_LOG_WARN, c->ops->fields(c), "could not share the 429 pause: %s", err.msg);
    }
    c->ops->on_answer(c, r, &v);
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

static void warn_usage(engine *e, const limiter_result *res, long long now)
{
    metrics_limiter_usage(res->usage_permille);
    if (res->usage_permille >= 800 && now - e->last_usage_warn > USAGE_WARN_MS) {
        e->last_usage_warn = now;
        log_json(IW_LOG_WARN, json_pack("{s:s, s:i}", "message",
                                        "rate limit approaching: a tier of IW_RATE_LIMITS is over "
                                        "80% used",
                                        "usagePermille", res->usage_permille));
    }
}

/* One batch: the calls of one class and priority, asked for in one script. */
typedef struct batch {
    int cls, prio;
    call *calls[LIMITER_MAX_RECORDS];
    size_t n;
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

/* Takes the queued calls that fit the free slots off their queues, in
 * batches of one class and priority (critical first); returns how many. */
static size_t take_batches(engine *e, batch *b, size_t cap)
{
    long slots = e->cfg->concurrency - http_client_in_flight(rt_http(e->rt));
    size_t nb = 0;

    for (int prio = 0; prio < 2; prio++)
        for (int cls = 0; cls < LIMITER_N_CLASSES; cls++)
            while (slots > 0 && e->ready[cls][prio].head && nb < cap) {
                batch *x = &b[nb++];
                x->cls = cls;
                x->prio = prio;
                x->n = 0;
                while (x->n < LIMITER_MAX_RECORDS && slots > 0 && e->ready[cls][prio].head) {
                    call *c = call_pop(&e->ready[cls][prio]);
                    c->queued = 0;
                    x->calls[x->n++] = c;
                    slots--;
                }
            }
    return nb;
}

/* Appends one limiter take for the batch (record keys when its calls have
 * them: a class checks records for every call or for none). */
static int append_batch(engine *e, const batch *x, iw_error *err)
{
    const char *keys[LIMITER_MAX_RECORDS];
    const call_kind *k = x->calls[0]->kind;
    size_t nk = 0;

    for (size_t i = 0; i < x->n; i++)
        if (x->calls[i]->record_key)
            keys[nk++] = x->calls[i]->record_key;
    if (nk != x->n)
        nk = 0;
    return limiter_append_take(rt_limiter(e->rt), k->cls, x->prio == 0 ? 1000 : k->share_permille,
                               (int)x->n, nk, keys, err);
}

/* Hands each call of the batch its permit decision. */
static void decide_batch(engine *e, const batch *x, limiter_result *res)
{
    int granted = res->granted;

    for (size_t m = 0; m < x->n; m++) {
        call *c = x->calls[m];
        size_t len = 0;
        const char *rec = res->n_records ? limiter_record(res, m, &len) : NULL;

        c->eng = e;
        if (rec) {
            c->ops->on_permit(c, CALL_RECORDED, 0, 0, rec, len);
        } else if (granted > 0) {
            granted--;
            c->ops->on_permit(c, CALL_GRANTED, 0, 0, NULL, 0);
        } else {
            c->ops->on_permit(c, CALL_REFUSED, res->wait_ms, res->paused, NULL, 0);
        }
    }
}

/* Fail closed: nobody calls the provider unmetered; ask again in a second. */
static void park_waiting_jobs(engine *e, long long now);

static void limiter_unavailable(engine *e, long long now, const iw_error *err)
{
    park_waiting_jobs(e, now);
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

/* Every queued call that can get a slot, in batches of one class and
 * priority, all asked for in ONE pipelined round trip.  Returns 1 when
 * calls are left that could go at once (more than the batches took). */
static int permits(engine *e, long long now)
{
    batch b[LIMITER_N_CLASSES * 2 * 4];
    size_t nb, appended = 0;
    iw_error err = {0};

    if (now < e->blocked_until || !(nb = take_batches(e, b, sizeof b / sizeof b[0])))
        return 0;
    if (!rt_redis_ready(e->rt)) {
        requeue(e, b, nb);
        iw_error_set(&err, IW_ERR_REDIS, "Redis unavailable");
        limiter_unavailable(e, now, &err);
        return 0;
    }
    while (appended < nb && append_batch(e, &b[appended], &err) == IW_OK)
        appended++;
    for (size_t i = 0; i < appended; i++) {
        limiter_result res;

        if (limiter_read_take(rt_limiter(e->rt), &res, &err) != IW_OK) {
            /* the rest of the pipeline is lost with the connection */
            requeue(e, b + i, nb - i);
            limiter_unavailable(e, now, &err);
            return 0;
        }
        warn_usage(e, &res, now);
        decide_batch(e, &b[i], &res);
        limiter_result_release(&res);
    }
    if (appended < nb) { /* not even appended: nothing was sent for these */
        requeue(e, b + appended, nb - appended);
        limiter_unavailable(e, now, &err);
        return 0;
    }
    return any_ready(e) && e->cfg->concurrency > http_client_in_flight(rt_http(e->rt));
}

static const call_ops job_call_ops;

/* ---- jobs: bookkeeping ---------------------------------------------------------------- */

static json_t *job_fields(const job *j)
{
    return json_pack("{s:s, s:s}", "requestId", j->job_id ? j->job_id : "", "state",
                     job_state_name(j->state));
}

static json_t *call_fields(const call *c)
{
    return job_fields((const job *)c);
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
    free(j);
}

/* The delivery went back to the broker (or is void): the job ends here. */
static void job_end(job *j, job_state s, int nack)
{
    if (nack)
        rt_nack(j->e->rt, j->d, 1);
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

static void outcome_done(void *owner, int ok)
{
    job *j = owner;
    engine *e = j->e;

    if (!ok) {
        log_json(IW_LOG_WARN,
                 json_pack("{s:s, s:s, s:s}", "requestId", j->job_id ? j->job_id : "", "state",
                           job_state_name(j->state), "message",
                           "outcome not confirmed by the broker; the job returns to its queue"));
        job_end(j, JOB_RETURNED, 1);
        return;
    }
    if (j->mark) {
        job_set_state(j, JOB_MARKING);
        job_push(&e->to_mark, j);
        return;
    }
    rt_ack(e->rt, j->d);
    metrics_job(j->role->name, "acked");
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
    job_outcome_begin(j);
    job_publish_later(j, j->role->queue, j->d->body, j->d->body_len, h, delay_ms);
    json_decref(h);
    job_outcome_seal(j, 0);
}

/* Jobs that waited for Redis (the limiter) longer than IW_HOLD_MAX go to the
 * delay tiers, without using an attempt: a delivery held for long meets the
 * broker's consumer_timeout, and every requeue counts toward the quorum
 * queue's x-delivery-limit, which would dead-letter valid jobs. */
static void park_waiting_jobs(engine *e, long long now)
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
    for (call *c; (c = call_pop(&park));)
        job_send_on((job *)c, PARK_MS, ((job *)c)->attempts, NULL);
}

void job_fail(job *j, iw_code code, const char *message, long http_status, int attempts)
{
    json_t *f;

    if (!job_live(j))
        return;
    job_set_state(j, JOB_FAILING);
    metrics_job(j->role->name, "failed");
    f = job_fields(j);
    json_object_set_new(f, "operation", json_string(j->role->operation));
    json_object_set_new(f, "error",
                        rt_error_object(iw_code_name(code), message, http_status, attempts));
    log_json(IW_LOG_ERROR, f);
    job_outcome_begin(j);
    rt_publish_failure(j->e->rt, &j->out, j->d, j->role->queue, j->job_id, iw_code_name(code),
                       message, http_status, attempts);
    job_outcome_seal(j, 0);
}

void job_retry(job *j, iw_code code, const char *message, long http_status, int attempt)
{
    const iw_config *cfg = j->e->cfg;
    long next = retry_delay_before(cfg->retry_schedule_ms, cfg->n_retry, attempt + 1);

    if (next < 0)
        job_fail(j, code, message, http_status, attempt);
    else
        job_send_on(j, next, attempt, iw_code_name(code));
}

static void hold_over(loop *l, loop_timer *t)
{
    job *j = t->ud;

    (void)l;
    job_set_state(j, JOB_READY);
    engine_ask(j->e, &j->call);
}

void job_wait(job *j, long wait_ms)
{
    engine *e = j->e;

    if (!job_live(j))
        return;
    if (wait_ms <= e->cfg->hold_max_ms && !rt_stopping(e->rt)) {
        job_set_state(j, JOB_HELD);
        if (loop_timer_at(e->lp, &j->hold, clock_mono_ms() + (wait_ms > 0 ? wait_ms : 0)) == 0)
            return;
    }
    job_send_on(j, wait_ms, j->attempts, NULL);
}

void job_record(job *j, char *event)
{
    free(j->event);
    j->event = event;
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

static void job_on_permit(call *c, call_permit p, long wait_ms, int paused, const char *record,
                          size_t len)
{
    job *j = (job *)c;

    (void)paused;
    (void)record;
    (void)len;
    switch (p) {
    case CALL_GRANTED:
        job_set_state(j, JOB_PERMITTED);
        c->attempt = j->attempts + 1;
        job_set_state(j, JOB_CALLING);
        if (j->role->start(j) != IW_OK) {
            log_msg(IW_LOG_ERROR, job_fields(j), "cannot start the provider call; retrying in 1 s");
            job_wait(j, START_RETRY_MS);
        }
        break;
    case CALL_RECORDED:
        /* done before (a redelivery, or a second delivery of the jobId) */
        job_set_state(j, JOB_ADOPTING);
        j->step_since = clock_mono_ms();
        job_push(&j->e->to_adopt, j);
        break;
    case CALL_REFUSED:
        job_wait(j, wait_ms);
        break;
    }
}

static void job_on_answer(call *c, const http_response *r, iw_verdict *v)
{
    job *j = (job *)c;

    job_set_state(j, JOB_CLASSIFIED);
    if (v->kind == IW_V_WAIT) {
        engine_log_call(c, r, v, NULL);
        job_wait(j, v->wait_ms); /* the reset: no attempt used */
        return;
    }
    j->role->answer(j, r, v);
}

static const call_ops job_call_ops = {job_on_permit, job_on_answer, call_fields};

/* ---- jobs: Redis steps, one round trip per turn --------------------------------------------- */

static void after_put(job *j, records_reply *rr)
{
    if (rr->answer == REC_STORED) {
        if (job_live(j))
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
        if (!job_live(j))
            return;
        log_msg(IW_LOG_INFO, job_fields(j),
                "outcome recorded but not published (a crash?); publishing it without a call");
        j->role->publish(j, j->event);
        break;
    case REC_PUBLISHED:
        if (!job_live(j))
            return;
        metrics_job(j->role->name, "duplicate");
        if (j->role->republish) {
            log_msg(IW_LOG_INFO, job_fields(j),
                    "job done before; its recorded outcome is published again without a call");
            free(j->event);
            j->event = rr->event;
            rr->event = NULL;
            j->role->republish(j, j->event);
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

static void after_mark(job *j, const records_reply *rr, const iw_error *err, int ok)
{
    if (!ok || rr->answer != REC_DONE)
        log_msg(IW_LOG_WARN, job_fields(j),
                "outcome published but not marked in Redis (%s); acked anyway",
                ok ? "record gone" : err->msg);
    rt_ack(j->e->rt, j->d);
    metrics_job(j->role->name, "acked");
    job_end(j, JOB_ACKED, 0);
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

/* Appends the Redis steps of the queued jobs, then reads every reply in
 * order.  Jobs whose step failed wait for the next try (1 s). */
static int record_steps(engine *e, long long now)
{
    job_fifo *queues[3] = {&e->to_put, &e->to_adopt, &e->to_mark};
    job_fifo taken[3] = {{0}};
    iw_error err = {0};
    int failed = 0;

    if (!e->to_put.head && !e->to_adopt.head && !e->to_mark.head)
        return 0;
    if (now < e->records_blocked_until && !e->to_mark.head)
        return 0;
    if (!rt_redis_ready(e->rt)) {
        failed = 1;
        iw_error_set(&err, IW_ERR_REDIS, "Redis unavailable");
    }
    for (int q = 0; q < 3 && !failed; q++) {
        job *j;
        while (!failed && (j = queues[q]->head)) {
            int rc = q == 0   ? records_append_put(e->rec, j->key, j->event, j->token, &err)
                     : q == 1 ? records_append_adopt(e->rec, j->key, j->token, &err)
                              : records_append_mark(e->rec, j->key, &err);
            if (rc != IW_OK) {
                failed = 1;
                break;
            }
            job_push(&taken[q], job_pop(queues[q]));
        }
    }
    for (int q = 0; q < 3; q++) {
        job *j;
        while ((j = job_pop(&taken[q]))) {
            records_reply rr;
            int ok = records_read(e->rec, &rr, &err) == IW_OK;
            if (q == 2) {
                after_mark(j, &rr, &err, ok);
            } else if (!ok && err.status == IW_ERR_REDIS_SCRIPT &&
                       redis_link_connected(rt_redis(e->rt))) {
                /* Redis answers, the record does not parse: trying again
                 * cannot help */
                job_fail(j, IW_C_RECORD_CORRUPT, err.msg, 0, j->attempts);
            } else if (!ok) {
                failed = 1;
                job_push(queues[q], j); /* tried again */
            } else if (q == 0) {
                after_put(j, &rr);
            } else {
                after_adopt(j, &rr);
            }
            free(rr.event);
        }
    }
    /* a mark that cannot be written is logged and the job acked (the event
     * is out): only the put and adopt steps wait for Redis */
    while (failed && e->to_mark.head) {
        records_reply none = {0};
        after_mark(job_pop(&e->to_mark), &none, &err, 0);
    }
    if (failed) {
        log_msg(IW_LOG_WARN, NULL, "could not record outcomes in Redis (%s); retrying in %ld ms",
                err.msg[0] ? err.msg : "unexpected reply", LIMITER_RETRY_MS);
        give_up_waiting_steps(e, now);
        e->records_blocked_until = now + LIMITER_RETRY_MS;
        loop_timer_at(e->lp, &e->unblock, e->records_blocked_until);
        return 0;
    }
    return e->to_put.head || e->to_adopt.head || e->to_mark.head;
}

/* The turn-end hook: Redis steps first (they finish jobs), then permits. */
static int engine_flush(loop *l, void *ud)
{
    engine *e = ud;
    long long now = clock_mono_ms();
    int again = record_steps(e, now);

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
    return permits(e, now) || again;
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
    j->call.kind = &rs->kind;
    j->call.ops = &job_call_ops;
    loop_timer_init(&j->hold, hold_over, j);
    j->next_all = e->all;
    if (e->all)
        e->all->prev_all = j;
    e->all = j;
    e->alive++;
    snprintf(j->token, sizeof j->token, "%s-%llu", e->proc_token, ++e->seq);
    metrics_job(j->role->name, "consumed");
    j->state = JOB_RECEIVED;
    note_state(j);
    return j;
}

/* What the headers say about j, believed only when they are ours (a
 * message back from the delay tiers). */
static void read_headers(job *j)
{
    const iw_config *cfg = j->e->cfg;

    intake_trust_internal_headers(j->d->headers, j->d->exchange, cfg->ns);
    j->attempts = (int)rt_header_int(j->d, "x-attempts", 0);
    if (j->attempts < 0)
        j->attempts = 0;
    if ((size_t)j->attempts > cfg->n_retry)
        j->attempts = (int)cfg->n_retry;
    j->first_attempt_ms = rt_header_int(j->d, "x-first-attempt", 0);
    if (j->first_attempt_ms < 0)
        j->first_attempt_ms = 0;
}

/* Intake, the role's own reading of the job, and its record key: IW_C_NONE,
 * or the code (msg filled) that fails the job. */
static iw_code accept_job(job *j, const iw_schema *schema, char *msg, size_t len)
{
    intake_result in;
    const char *prio;
    iw_code code;

    intake_json(j->d->body, j->d->body_len, j->d->content_type,
                (size_t)j->e->cfg->max_message_bytes, schema, &in);
    j->doc = in.doc;
    j->job_id = json_string_value(json_object_get(j->doc, "jobId"));
    if (j->job_id && !*j->job_id)
        j->job_id = NULL;
    if (in.code != IW_C_NONE) {
        snprintf(msg, len, "%s", in.msg);
        return in.code;
    }
    job_set_state(j, JOB_VALIDATED);
    prio = json_string_value(json_object_get(j->doc, "priority"));
    j->call.critical = prio && strcmp(prio, "critical") == 0;
    if ((code = j->role->prepare(j, msg, len)) != IW_C_NONE)
        return code;
    if (records_key(j->e->rec, j->key, j->role->record_kind, j->job_id) != 0) {
        snprintf(msg, len, "the record key of this jobId does not fit");
        return IW_C_INTERNAL_ERROR;
    }
    j->call.record_key = j->key;
    return IW_C_NONE;
}

static void on_delivery(void *self, iw_delivery *d)
{
    role_slot *rs = self;
    job *j = job_new(rs->e, rs, d);
    char msg[INTAKE_MSG_LEN];
    iw_code code;
    long early;

    if (!j)
        return;
    if (rt_stopping(rs->e->rt)) {
        job_end(j, JOB_RETURNED, 1);
        return;
    }
    read_headers(j);
    if ((code = accept_job(j, rs->schema, msg, sizeof msg)) != IW_C_NONE) {
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
    loop_timer_cancel(e->lp, &e->unblock);
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
    rs->kind.share_permille = role->share_pct ? (int)(*role->share_pct)(e->cfg) * 10 : 1000;
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
    snprintf(e->proc_token, sizeof e->proc_token, "%ld-%lx", (long)getpid(),
             (unsigned long)random());
    return e;
}

void engine_free(engine *e)
{
    if (!e)
        return;
    if (e->lp)
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

size_t engine_busy(const engine *e)
{
    return e->alive;
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
    job_fifo *qs[2] = {&e->to_adopt, &e->to_mark};

    /* the redelivery decides again; a put still runs: its record saves the
     * redelivery a second call */
    for (int q = 0; q < 2; q++) {
        job *j;
        while ((j = job_pop(qs[q])))
            job_end(j, JOB_DROPPED, 0);
    }
    for (job *j = e->all, *next; j; j = next) {
        next = j->next_all;
        if (j->state == JOB_READY || j->state == JOB_HELD)
            job_end(j, JOB_DROPPED, 0);
    }
}
