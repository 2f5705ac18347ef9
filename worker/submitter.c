/* The submitter: one submission job becomes exactly one provider submission
 * and one submission.accepted (or submission.failed plus a dead letter).
 *
 * A job is a small state machine:
 *   received -> validated -> permitted -> calling -> classified -> publishing -> acked
 * with the side states deferred (waiting for a permit in memory, the
 * delivery still unacked) and dead.  Its state name is in every log line. */
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "job.h"
#include "log.h"
#include "metrics.h"
#include "retry.h"
#include "roles.h"
#include "topology.h"
#include "transform.h"

typedef enum sjob_state {
    S_RECEIVED,
    S_VALIDATED,
    S_DEFERRED,
    S_PERMITTED,
    S_CALLING,
    S_CLASSIFIED,
    S_PUBLISHING,
    S_DEAD,
} sjob_state;

static const char *const state_names[] = {"received", "validated",  "deferred",   "permitted",
                                          "calling",  "classified", "publishing", "dead"};

typedef struct sjob {
    job base; /* first: a job * is an sjob *; base.state is an sjob_state */
    struct submitter *s;
    json_t *record; /* classified 201: the accepted record to store and publish */
    struct sjob *call_prev, *call_next; /* in submitter.in_call while calling */
} sjob;

struct submitter {
    runtime *rt;
    const iw_config *cfg;
    iw_schema *job_schema;
    iw_schema *resp_schema;
    job_queues waiting;
    job_fifo to_record;
    sjob *in_call; /* jobs in a provider call: freed at exit if still there */
    int calling;
    size_t alive;
    long long blocked_until;
    long long last_usage_warn;
};

/* ---- bookkeeping ------------------------------------------------------------ */

static sjob *sjob_pop(job_fifo *q)
{
    return (sjob *)job_fifo_pop(q);
}

static void sjob_free(void *owner)
{
    sjob *j = owner;

    j->s->alive--;
    delivery_free(j->base.d);
    json_decref(j->base.doc);
    json_decref(j->record);
    free(j);
}

static json_t *sjob_fields(const sjob *j)
{
    return json_pack("{s:s, s:s}", "requestId", j->base.job_id ? j->base.job_id : "", "state",
                     state_names[j->base.state]);
}

static void after_outcome(void *owner, int ok)
{
    sjob *j = owner;

    job_settle(&j->base, j->s->rt, ok, state_names[j->base.state],
               "outcome not confirmed by the broker; the job returns to its queue");
    sjob_free(j);
}

/* Ends a job without success: submission.failed (when the jobId is known)
 * and a dead letter, then the ack once both are confirmed. */
static void fail_job(sjob *j, const char *code, const char *message, long http_status, int attempts)
{
    submitter *s = j->s;
    json_t *fields = sjob_fields(j);

    j->base.state = S_DEAD;
    metrics_job("submitter", "failed");
    json_object_set_new(fields, "state", json_string("dead"));
    json_object_set_new(fields, "operation", json_string("POST /external-resource"));
    json_object_set_new(fields, "error", rt_error_object(code, message, http_status, attempts));
    log_json(IW_LOG_ERROR, fields);
    rt_outcome_begin(&j->base.out, after_outcome, j);
    rt_publish_failure(s->rt, &j->base.out, j->base.d, "submit", j->base.job_id, code, message,
                       http_status, attempts);
    rt_outcome_seal(&j->base.out);
}

/* The same job, unchanged, after delay_ms (a retry or a long wait). */
static void send_on(void *owner, long delay_ms, int attempts, const char *last_error)
{
    sjob *j = owner;

    j->base.state = S_PUBLISHING;
    job_send_on(&j->base, j->s->rt, "submit", delay_ms, attempts, last_error, after_outcome);
}

/* Waits without using an attempt: in memory (delivery unacked) when short,
 * through a delay queue when longer than IW_HOLD_MAX. */
static void defer(sjob *j, long wait_ms)
{
    job_defer(&j->s->waiting, &j->base, wait_ms, j->s->cfg->hold_max_ms, S_DEFERRED, send_on);
}

/* ---- intake ------------------------------------------------------------------- */

static void on_delivery(void *self, iw_delivery *d)
{
    submitter *s = self;
    sjob *j = calloc(1, sizeof *j);
    const char *code;
    char msg[512];
    long early;

    if (!j) {
        rt_nack(s->rt, d, 1);
        delivery_free(d);
        return;
    }
    j->s = s;
    j->base.d = d;
    s->alive++;
    if (rt_stopping(s->rt)) {
        rt_nack(s->rt, d, 1);
        sjob_free(j);
        return;
    }
    if (job_intake(&j->base, s->rt, s->job_schema, &code, msg, sizeof msg) != IW_OK) {
        j->base.job_id = job_readable_id(j->base.doc);
        fail_job(j, code, msg, 0, j->base.attempts);
        return;
    }
    j->base.state = S_VALIDATED;
    job_read_ids(&j->base);
    early = job_early_ms(d);
    if (early) {
        /* back from a delay tier early: on to the next hop */
        send_on(j, early, j->base.attempts, NULL);
        return;
    }
    job_queues_ready(&s->waiting, &j->base);
}

/* ---- provider call ----------------------------------------------------------- */

static void log_call(const sjob *j, const http_response *r, const iw_verdict *v, int attempt,
                     const char *tracking_id)
{
    json_t *f = sjob_fields(j);

    job_call_fields(f, "POST /external-resource", r, attempt);
    if (tracking_id)
        json_object_set_new(f, "externalTrackingId", json_string(tracking_id));
    job_log_call(f, r, v, attempt);
}

static void on_response(void *ud, const http_response *r)
{
    sjob *j = ud;
    submitter *s = j->s;
    const iw_config *cfg = s->cfg;
    iw_verdict v = retry_classify(&r->result);
    int attempt = j->base.attempts + 1;
    json_t *body = NULL;
    char msg[300];

    s->calling--;
    if (j->call_prev)
        j->call_prev->call_next = j->call_next;
    else
        s->in_call = j->call_next;
    if (j->call_next)
        j->call_next->call_prev = j->call_prev;
    j->base.state = S_CLASSIFIED;
    metrics_provider_call(IW_ROUTE_SUBMIT, r->result.status, r->duration_us, v.breaker_failure);
    if (v.kind == IW_V_ACCEPT) {
        iw_error err;
        body = json_loadb(r->body, r->body_len, 0, NULL);
        if (!body || schema_validate(s->resp_schema, body, &err) != IW_OK) {
            v.kind = IW_V_FAIL;
            v.code = "EXTERNAL_API_BAD_RESPONSE";
        }
    }
    log_call(j, r, &v, attempt,
             v.kind == IW_V_ACCEPT ? json_string_value(json_object_get(body, "trackingId")) : NULL);
    if (r->result.transport != IW_TRANSPORT_OK)
        snprintf(msg, sizeof msg, "External API call failed: %s", r->error);
    else if (v.kind == IW_V_FAIL && body)
        snprintf(msg, sizeof msg, "External API returned %ld with a body of an unexpected shape",
                 r->result.status);
    else
        snprintf(msg, sizeof msg, "External API returned %ld", r->result.status);

    switch (v.kind) {
    case IW_V_ACCEPT: {
        char ts[40];
        format_timestamp(clock_wall_ms(), ts, sizeof ts);
        j->record = json_pack("{s:s, s:O, s:O, s:O, s:s}", "jobId", j->base.job_id, "externalId",
                              json_object_get(body, "id"), "trackingId",
                              json_object_get(body, "trackingId"), "status",
                              json_object_get(body, "status"), "acceptedAt", ts);
        /* stored and published in tick(), one Redis round trip for all */
        job_fifo_push(&s->to_record, &j->base);
        break;
    }
    case IW_V_RETRY: {
        long next = retry_delay_before(cfg->retry_schedule_ms, cfg->n_retry, attempt + 1);
        if (!rt_delivery_live(s->rt, j->base.d))
            sjob_free(j);
        else if (next < 0)
            fail_job(j, v.code, msg, r->result.status, attempt);
        else
            send_on(j, next, attempt, v.code);
        break;
    }
    case IW_V_WAIT: {
        iw_error err;
        if (limiter_pause(rt_limiter(s->rt), v.wait_ms, &err) != IW_OK)
            log_msg(IW_LOG_WARN, sjob_fields(j), "could not share the 429 pause: %s", err.msg);
        if (!rt_delivery_live(s->rt, j->base.d))
            sjob_free(j);
        else
            defer(j, v.wait_ms);
        break;
    }
    case IW_V_FAIL:
        if (!rt_delivery_live(s->rt, j->base.d))
            sjob_free(j);
        else
            fail_job(j, v.code, msg, r->result.status, attempt);
        break;
    }
    json_decref(body);
}

static void start_call(sjob *j)
{
    submitter *s = j->s;
    json_t *out = transform_outbound(j->base.doc, s->cfg->client_id, clock_wall_ms());
    char *body = out ? json_dumps(out, JSON_COMPACT) : NULL;

    json_decref(out);
    j->base.state = S_CALLING;
    if (body && http_client_start(rt_http(s->rt), "POST", "/api/v1/external-resource", body,
                                  strlen(body), j->base.job_id, on_response, j) == IW_OK) {
        s->calling++;
        j->call_prev = NULL;
        j->call_next = s->in_call;
        if (s->in_call)
            s->in_call->call_prev = j;
        s->in_call = j;
    } else {
        log_msg(IW_LOG_ERROR, sjob_fields(j), "cannot start the provider call; retrying in 1 s");
        defer(j, 1000);
    }
    free(body);
}

/* ---- accepted jobs: record in Redis, then publish ------------------------------ */

static void publish_accepted(sjob *j, const json_t *record)
{
    submitter *s = j->s;
    const iw_config *cfg = s->cfg;
    long delay = retry_jitter(cfg->poll_schedule_ms[0], cfg->poll_jitter_pct,
                              (double)random() / ((double)RAND_MAX + 1.0));
    json_t *check = json_pack(
        "{s:O, s:O, s:O, s:O, s:i, s:O, s:s}", "jobId", json_object_get(record, "jobId"),
        "trackingId", json_object_get(record, "trackingId"), "externalId",
        json_object_get(record, "externalId"), "acceptedAt", json_object_get(record, "acceptedAt"),
        "checks", 0, "lastStatus", json_object_get(record, "status"), "priority",
        j->base.critical ? "critical" : "normal");
    char *text = check ? json_dumps(check, JSON_COMPACT) : NULL;
    json_t *h = json_pack("{s:i, s:s}", "x-attempts", 0, "x-original-routing-key", "status.check");

    j->base.state = S_PUBLISHING;
    metrics_job("submitter", "accepted");
    rt_outcome_begin(&j->base.out, after_outcome, j);
    rt_publish_event(s->rt, &j->base.out, "submission.accepted", record, j->base.job_id);
    if (text)
        rt_publish_delayed(s->rt, &j->base.out, "status", text, strlen(text), j->base.job_id, h,
                           delay);
    else
        j->base.out.failed = 1;
    rt_outcome_seal(&j->base.out);
    json_decref(h);
    json_decref(check);
    free(text);
}

static void store_records(submitter *s)
{
    redis_link *r = rt_redis(s->rt);
    size_t n = 0;
    int redis_ok = rt_redis_ready(s->rt);
    iw_error err;

    if (!s->to_record.head)
        return;
    if (redis_ok) {
        for (sjob *j = (sjob *)s->to_record.head; j; j = (sjob *)j->base.next) {
            char *text = json_dumps(j->record, JSON_COMPACT);
            if (redis_link_append(r, &err, "SET %s:job:%s %s NX PX %lld", s->cfg->ns,
                                  j->base.job_id, text ? text : "{}",
                                  (long long)s->cfg->idempotency_ttl_ms) == IW_OK)
                n++;
            free(text);
        }
        for (size_t i = 0; i < n; i++) {
            redisReply *rep;
            if (redis_link_read(r, &rep, &err) == IW_OK)
                freeReplyObject(rep);
            else
                redis_ok = 0;
        }
    }
    if (!redis_ok)
        log_msg(
            IW_LOG_WARN, NULL,
            "could not record accepted jobs in Redis; a redelivery would repeat the call, which "
            "the provider answers from its Idempotency-Key");
    for (sjob *j = sjob_pop(&s->to_record); j; j = sjob_pop(&s->to_record)) {
        if (rt_delivery_live(s->rt, j->base.d))
            publish_accepted(j, j->record);
        else
            sjob_free(j);
    }
}

/* ---- the tick: deferred jobs, permits, calls ---------------------------------- */

static void take_batch(submitter *s, long long now)
{
    const iw_config *cfg = s->cfg;
    sjob *batch[LIMITER_MAX_RECORDS];
    /* <ns>:job:<jobId>: a jobId is up to 128 characters of up to 4 bytes */
    char keys[LIMITER_MAX_RECORDS][1024];
    const char *key_ptrs[LIMITER_MAX_RECORDS];
    size_t n = 0;
    long free_slots = cfg->concurrency - s->calling;
    limiter_result res;
    iw_error err;

    /* one priority per batch: critical jobs bypass the class cap */
    int q = s->waiting.ready[0].head ? 0 : 1;
    while (n < LIMITER_MAX_RECORDS && (long)n < free_slots) {
        sjob *j = sjob_pop(&s->waiting.ready[q]);
        if (!j)
            break;
        batch[n] = j;
        snprintf(keys[n], sizeof keys[n], "%s:job:%s", cfg->ns, j->base.job_id);
        key_ptrs[n] = keys[n];
        n++;
    }
    if (!n)
        return;
    if (limiter_append_take(rt_limiter(s->rt), "submit",
                            q == 0 ? 1000 : (int)cfg->submit_share_pct * 10, (int)n, n, key_ptrs,
                            &err) != IW_OK ||
        limiter_read_take(rt_limiter(s->rt), &res, &err) != IW_OK) {
        /* fail closed: nobody calls the provider unmetered */
        log_json(IW_LOG_ERROR,
                 json_pack("{s:s, s:{s:s, s:s}}", "message", "limiter unavailable; jobs wait",
                           "error", "code", "LIMITER_UNAVAILABLE", "message", err.msg));
        while (n)
            job_fifo_push_front(&s->waiting.ready[batch[n - 1]->base.critical ? 0 : 1],
                                &batch[n - 1]->base),
                n--;
        s->blocked_until = now + 1000;
        return;
    }
    metrics_limiter_usage(res.usage_permille);
    if (res.usage_permille >= 800 && now - s->last_usage_warn > 60000) {
        s->last_usage_warn = now;
        log_json(IW_LOG_WARN, json_pack("{s:s, s:i}", "message",
                                        "rate limit approaching: a tier of IW_RATE_LIMITS is over "
                                        "80% used",
                                        "usagePermille", res.usage_permille));
    }
    int granted = res.granted;
    for (size_t i = 0; i < n; i++) {
        sjob *j = batch[i];
        size_t len;
        const char *rec = limiter_record(&res, i, &len);
        if (rec) {
            /* accepted before (a redelivery after a crash): no second call */
            json_t *record = json_loadb(rec, len, 0, NULL);
            log_msg(IW_LOG_INFO, sjob_fields(j),
                    "job was accepted before; publishing its recorded outcome without a call");
            if (record) {
                publish_accepted(j, record);
                json_decref(record);
            } else {
                fail_job(j, "IDEMPOTENCY_RECORD_CORRUPT",
                         "the Redis record of this job is not JSON", 0, j->base.attempts);
            }
        } else if (granted > 0) {
            granted--;
            j->base.state = S_PERMITTED;
            start_call(j);
        } else {
            defer(j, res.wait_ms);
        }
    }
    limiter_result_release(&res);
}

static void tick(void *self, long long now)
{
    submitter *s = self;

    store_records(s);
    job_queues_due(&s->waiting, now, S_VALIDATED);
    if (rt_stopping(s->rt)) {
        job_queues_drop_ready(&s->waiting, s->rt, 1, sjob_free);
        return;
    }
    /* every batch takes at least one job off the ready queues, or blocks */
    while (job_queues_any_ready(&s->waiting) && s->calling < s->cfg->concurrency &&
           now >= s->blocked_until && rt_redis_ready(s->rt))
        take_batch(s, now);
}

static long long next_deadline(void *self)
{
    submitter *s = self;
    long long d = job_queues_next_due(&s->waiting);

    if (s->to_record.head)
        return 0;
    if (job_queues_any_ready(&s->waiting) && s->calling < s->cfg->concurrency) {
        long long b = s->blocked_until > clock_mono_ms() ? s->blocked_until : 0;
        if (redis_link_connected(rt_redis(s->rt)) && b < d)
            d = b;
    }
    return d;
}

static void on_link_lost(void *self)
{
    submitter *s = self;

    job_queues_drop(&s->waiting, s->rt, 0, sjob_free);
}

static void on_stop(void *self)
{
    submitter *s = self;

    job_queues_drop(&s->waiting, s->rt, 1, sjob_free);
}

static size_t busy(void *self)
{
    return ((submitter *)self)->alive;
}

submitter *submitter_new(runtime *rt, iw_error *err)
{
    submitter *s = calloc(1, sizeof *s);

    if (!s) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        return NULL;
    }
    s->rt = rt;
    s->cfg = rt_config(rt);
    s->job_schema = rt_load_schema(rt, "submission-job.schema.json", err);
    if (s->job_schema)
        s->resp_schema = rt_load_schema(rt, "provider-submit-response.schema.json", err);
    if (!s->resp_schema) {
        submitter_free(s);
        return NULL;
    }
    return s;
}

void submitter_free(submitter *s)
{
    if (!s)
        return;
    job_queues_drop(&s->waiting, s->rt, 0, sjob_free);
    /* calls cut short by the end of the shutdown grace: the HTTP client
     * aborts them without a callback (their deliveries return to the queue) */
    while (s->in_call) {
        sjob *j = s->in_call;
        s->in_call = j->call_next;
        sjob_free(j);
    }
    job_queues_clear(&s->waiting);
    schema_free(s->job_schema);
    schema_free(s->resp_schema);
    free(s);
}

int submitter_register(submitter *s)
{
    rt_role role = {"submitter",   "submit",     s,       on_delivery, tick,
                    next_deadline, on_link_lost, on_stop, busy};
    return runtime_add_role(s->rt, &role);
}
