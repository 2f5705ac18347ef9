/* The poller: one status check at a time per accepted job, until the provider
 * reports a terminal status, and then exactly one status.final.
 *
 * A check is a small state machine:
 *   received -> validated -> permitted -> calling -> classified
 *            -> (recording -> publishing -> marking | publishing) -> acked
 * with the side states deferred (waiting in memory, the delivery still
 * unacked) and dead.  The state name is in every log line.
 *
 * Non-terminal answers re-schedule the next check through the broker's delay
 * tiers (body with checks + 1 and lastStatus updated), with status.progress
 * when the status changed; both publishes gate the ack.  `checks` counts the
 * status GETs the provider answered (2xx) for this job; failed attempts of one
 * check are counted by the x-attempts header instead, as in the submitter.
 *
 * One status.final per job, never zero.  A terminal answer is first recorded
 * in Redis under <ns>:final:<jobId> (SET NX, TTL IW_IDEMPOTENCY_TTL) as
 *   {"event": <status.final body>, "published": false, "recordedAt": <wall ms>}
 * and only the recorder publishes it; after the broker's confirm the same key
 * is rewritten with "published": true (the mark lives inside the record, so
 * ONE key answers both questions), then the delivery is acked.  Every check
 * looks the key up in the limiter's round trip (record keys), before any call:
 *   - published          -> ack, no call, no second event;
 *   - recorded, unmarked -> publish the recorded event (no call) and mark, but
 *                           only once the record is FINAL_LEASE_MS old: a
 *                           younger record belongs to a live poller that is
 *                           publishing it right now (a duplicate check chain,
 *                           left by a crash between a confirm and an ack), so
 *                           this delivery waits instead of racing it.
 * A crash between the confirm and the mark repeats the event once, which the
 * contract allows (consumers dedupe by correlation_id). */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clock.h"
#include "job.h"
#include "log.h"
#include "retry.h"
#include "roles.h"
#include "topology.h"

#define STATUS_OPERATION "GET /status/{trackingId}"
/* How long a recorded, unpublished outcome belongs to the poller that
 * recorded it; after that anyone holding a check of the job publishes it. */
#define FINAL_LEASE_MS 5000L
#define REDIS_RETRY_MS 1000L

typedef enum pjob_state {
    P_RECEIVED,
    P_VALIDATED,
    P_DEFERRED,
    P_PERMITTED,
    P_CALLING,
    P_CLASSIFIED,
    P_RECORDING,
    P_PUBLISHING,
    P_MARKING,
    P_DEAD,
} pjob_state;

static const char *const state_names[] = {"received", "validated",  "deferred",  "permitted",
                                          "calling",  "classified", "recording", "publishing",
                                          "marking",  "dead"};

/* base.attempts counts the failed attempts of this check before this
 * delivery. */
typedef struct pjob {
    job base; /* first: a job * is a pjob *; base.state is a pjob_state */
    struct poller *p;
    const char *tracking_id; /* borrowed from doc */
    long long accepted_ms;   /* wall clock */
    int checks;              /* answered checks so far (the body's "checks") */
    json_t *final;           /* the status.final body being recorded or published */
    long long recorded_at;   /* the record's recordedAt (wall ms) */
    char *record;            /* P_RECORDING: the record text to SET NX */
} pjob;

struct poller {
    runtime *rt;
    const iw_config *cfg;
    iw_schema *check_schema;
    iw_schema *resp_schema;
    redis_script record_script;
    job_queues waiting;
    job_fifo to_record; /* terminal answers to record in Redis */
    job_fifo to_mark;   /* confirmed status.final to mark published, then ack */
    size_t alive;
    long long blocked_until;
    long long record_blocked_until;
    long long last_usage_warn;
};

/* Records a terminal outcome unless one is recorded: returns {1} when this
 * call stored ARGV[1], else {0, <the stored record>}.  Atomic, so two pollers
 * can never both believe they recorded. */
static const char record_source[] =
    "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end\n"
    "local cur = redis.call('GET', KEYS[1])\n"
    "if not cur then return {0} end\n"
    "return {0, cur}\n";

/* ---- circuit breaker hook ------------------------------------------------------
 * The spec's circuit breaker (IW_BREAKER_FAILURES, IW_BREAKER_OPEN) comes with a
 * later issue.  The poller consults it in exactly two places, and both pass
 * through for now:
 *   breaker_allow()  before asking the limiter for permits: "may I call now?"
 *                    (0 with *wait_ms: the ready checks wait that long, without
 *                    using an attempt and without spending a permit);
 *   breaker_record() after classifying each response: 5xx, timeouts and
 *                    connection errors are failures (v->breaker_failure), 2xx
 *                    and other 4xx successes, a 429 neither. */
static int breaker_allow(struct poller *p, long long now, long *wait_ms)
{
    (void)p;
    (void)now;
    *wait_ms = 0;
    return 1;
}

static void breaker_record(struct poller *p, const iw_verdict *v)
{
    (void)p;
    (void)v;
}

/* ---- bookkeeping ---------------------------------------------------------------- */

static pjob *pjob_pop(job_fifo *q)
{
    return (pjob *)job_fifo_pop(q);
}

static void pjob_free(void *owner)
{
    pjob *j = owner;

    j->p->alive--;
    delivery_free(j->base.d);
    json_decref(j->base.doc);
    json_decref(j->final);
    free(j->record);
    free(j);
}

static json_t *pjob_fields(const pjob *j)
{
    json_t *f = json_pack("{s:s, s:s}", "requestId", j->base.job_id ? j->base.job_id : "", "state",
                          state_names[j->base.state]);
    if (j->tracking_id)
        json_object_set_new(f, "externalTrackingId", json_string(j->tracking_id));
    return f;
}

static const char *final_key(const pjob *j, char *buf, size_t len)
{
    snprintf(buf, len, "%s:final:%s", j->p->cfg->ns, j->base.job_id);
    return buf;
}

static void after_outcome(void *owner, int ok)
{
    pjob *j = owner;

    job_settle(&j->base, j->p->rt, ok, state_names[j->base.state],
               "outcome not confirmed by the broker; the check returns to its queue");
    pjob_free(j);
}

/* status.final confirmed: mark it published (tick), then ack. */
static void after_final(void *owner, int ok)
{
    pjob *j = owner;

    if (!ok) {
        after_outcome(owner, ok);
        return;
    }
    j->base.state = P_MARKING;
    job_fifo_push(&j->p->to_mark, &j->base);
}

/* "2024-01-01T00:00:00.123Z" (or with +hh:mm) -> wall ms; -1 if malformed. */
static long long parse_timestamp_ms(const char *s)
{
    struct tm tm;
    const char *p;
    long long ms = 0, scale = 100;

    if (!s)
        return -1;
    memset(&tm, 0, sizeof tm);
    p = strptime(s, "%Y-%m-%dT%H:%M:%S", &tm);
    if (!p)
        return -1;
    if (*p == '.') {
        p++;
        if (*p < '0' || *p > '9')
            return -1;
        for (; *p >= '0' && *p <= '9'; p++, scale /= 10)
            ms += scale > 0 ? (*p - '0') * scale : 0;
    }
    long long t = (long long)timegm(&tm) * 1000 + ms;
    if ((*p == 'Z' || *p == 'z') && !p[1])
        return t;
    if ((*p == '+' || *p == '-') && p[1] >= '0' && p[1] <= '9' && p[2] >= '0' && p[2] <= '9' &&
        p[3] == ':' && p[4] >= '0' && p[4] <= '9' && p[5] >= '0' && p[5] <= '9' && !p[6]) {
        long long off = ((p[1] - '0') * 10 + (p[2] - '0')) * 60 + (p[4] - '0') * 10 + (p[5] - '0');
        return *p == '+' ? t - off * 60000 : t + off * 60000;
    }
    return -1;
}

/* "/api/v1/status/<id>" with the id percent-encoded (RFC 3986 unreserved
 * characters kept); a new string or NULL. */
static char *status_path(const char *id)
{
    static const char prefix[] = "/api/v1/status/";
    static const char hex[] = "0123456789ABCDEF";
    size_t n = strlen(id);
    char *out = malloc(sizeof prefix + 3 * n);
    char *o;

    if (!out)
        return NULL;
    memcpy(out, prefix, sizeof prefix - 1);
    o = out + sizeof prefix - 1;
    for (const unsigned char *c = (const unsigned char *)id; *c; c++) {
        if ((*c >= 'A' && *c <= 'Z') || (*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') ||
            *c == '-' || *c == '.' || *c == '_' || *c == '~') {
            *o++ = (char)*c;
        } else {
            *o++ = '%';
            *o++ = hex[*c >> 4];
            *o++ = hex[*c & 15];
        }
    }
    *o = '\0';
    return out;
}

/* Ends a job without success: submission.failed (when the jobId is known)
 * and a dead letter of the check, then the ack once both are confirmed. */
static void fail_job(pjob *j, const char *code, const char *message, long http_status, int attempts)
{
    poller *p = j->p;
    json_t *fields = pjob_fields(j);

    j->base.state = P_DEAD;
    json_object_set_new(fields, "state", json_string("dead"));
    json_object_set_new(fields, "operation", json_string(STATUS_OPERATION));
    json_object_set_new(fields, "error", rt_error_object(code, message, http_status, attempts));
    log_json(IW_LOG_ERROR, fields);
    rt_outcome_begin(&j->base.out, after_outcome, j);
    rt_publish_failure(p->rt, &j->base.out, j->base.d, "status", j->base.job_id, code, message,
                       http_status, attempts);
    rt_outcome_seal(&j->base.out);
}

/* The same check, unchanged, after delay_ms (a retry or a long wait). */
static void send_on(void *owner, long delay_ms, int attempts, const char *last_error)
{
    pjob *j = owner;

    j->base.state = P_PUBLISHING;
    job_send_on(&j->base, j->p->rt, "status", delay_ms, attempts, last_error, after_outcome);
}

/* Waits without using an attempt: in memory (delivery unacked) when short,
 * through a delay queue when longer than IW_HOLD_MAX. */
static void defer(pjob *j, long wait_ms)
{
    job_defer(&j->p->waiting, &j->base, wait_ms, j->p->cfg->hold_max_ms, P_DEFERRED, send_on);
}

/* ---- intake ---------------------------------------------------------------------- */

static void on_delivery(void *self, iw_delivery *d)
{
    poller *p = self;
    pjob *j = calloc(1, sizeof *j);
    const char *code;
    char msg[512];
    long early;

    if (!j) {
        rt_nack(p->rt, d, 1);
        delivery_free(d);
        return;
    }
    j->p = p;
    j->base.d = d;
    p->alive++;
    if (rt_stopping(p->rt)) {
        rt_nack(p->rt, d, 1);
        pjob_free(j);
        return;
    }
    if (job_intake(&j->base, p->rt, p->check_schema, &code, msg, sizeof msg) != IW_OK) {
        j->base.job_id = job_readable_id(j->base.doc);
        fail_job(j, code, msg, 0, j->base.attempts);
        return;
    }
    job_read_ids(&j->base);
    j->tracking_id = json_string_value(json_object_get(j->base.doc, "trackingId"));
    json_int_t checks = json_integer_value(json_object_get(j->base.doc, "checks"));
    j->checks = checks > INT_MAX / 2 ? INT_MAX / 2 : (int)checks; /* schema: >= 0 */
    j->accepted_ms =
        parse_timestamp_ms(json_string_value(json_object_get(j->base.doc, "acceptedAt")));
    if (j->accepted_ms < 0) {
        fail_job(j, "SCHEMA_VIOLATION", "acceptedAt is not an RFC 3339 date-time", 0,
                 j->base.attempts);
        return;
    }
    j->base.state = P_VALIDATED;
    early = job_early_ms(d);
    if (early) {
        /* back from a delay tier early: on to the next hop */
        send_on(j, early, j->base.attempts, NULL);
        return;
    }
    job_queues_ready(&p->waiting, &j->base);
}

/* ---- outcomes of an answered check ---------------------------------------------- */

/* Non-terminal: status.progress when the status changed, and the next check
 * after the schedule's next interval (clamped to the IW_POLL_MAX_AGE deadline,
 * so that the last check happens at the deadline). */
static void reschedule(pjob *j, const char *status, long long now_wall)
{
    poller *p = j->p;
    const iw_config *cfg = p->cfg;
    const char *last = json_string_value(json_object_get(j->base.doc, "lastStatus"));
    size_t idx = (size_t)j->checks < cfg->n_poll ? (size_t)j->checks : cfg->n_poll - 1;
    long delay = retry_jitter(cfg->poll_schedule_ms[idx], cfg->poll_jitter_pct,
                              (double)random() / ((double)RAND_MAX + 1.0));
    long long deadline = j->accepted_ms + cfg->poll_max_age_ms;
    json_t *next = json_deep_copy(j->base.doc);
    json_t *h = rt_onward_headers(j->base.d, 0, NULL);
    char *text;

    if (now_wall + delay > deadline)
        delay = deadline > now_wall ? (long)(deadline - now_wall) : 0;
    json_object_set_new(next, "checks", json_integer(j->checks));
    json_object_set_new(next, "lastStatus", json_string(status));
    text = json_dumps(next, JSON_COMPACT);
    j->base.state = P_PUBLISHING;
    rt_outcome_begin(&j->base.out, after_outcome, j);
    if (!last || strcmp(last, status) != 0) {
        json_t *ev = json_pack("{s:s, s:s, s:s, s:i}", "jobId", j->base.job_id, "trackingId",
                               j->tracking_id, "status", status, "checks", j->checks);
        rt_publish_event(p->rt, &j->base.out, "status.progress", ev, j->base.job_id);
        json_decref(ev);
    }
    if (text)
        rt_publish_delayed(p->rt, &j->base.out, "status", text, strlen(text), j->base.job_id, h,
                           delay);
    else
        j->base.out.failed = 1;
    rt_outcome_seal(&j->base.out);
    free(text);
    json_decref(h);
    json_decref(next);
}

/* Terminal: the status.final body, recorded in Redis (tick) before publishing. */
static void record_final(pjob *j, const char *status, json_t *body, long long now_wall)
{
    char ts[40];
    json_t *rec;

    format_timestamp(now_wall, ts, sizeof ts);
    j->final =
        json_pack("{s:s, s:s, s:s, s:i, s:O, s:s, s:O}", "jobId", j->base.job_id, "trackingId",
                  j->tracking_id, "status", status, "checks", j->checks, "acceptedAt",
                  json_object_get(j->base.doc, "acceptedAt"), "finishedAt", ts, "result", body);
    j->recorded_at = now_wall;
    rec = json_pack("{s:O, s:b, s:I}", "event", j->final, "published", 0, "recordedAt",
                    (json_int_t)now_wall);
    j->record = rec ? json_dumps(rec, JSON_COMPACT) : NULL;
    json_decref(rec);
    if (!j->final || !j->record) {
        log_msg(IW_LOG_ERROR, pjob_fields(j), "out of memory building status.final; requeued");
        after_outcome(j, 0);
        return;
    }
    j->base.state = P_RECORDING;
    job_fifo_push(&j->p->to_record, &j->base);
}

static void publish_final(pjob *j)
{
    j->base.state = P_PUBLISHING;
    log_json(IW_LOG_INFO, json_pack("{s:s, s:s, s:s, s:O, s:O, s:s}", "requestId", j->base.job_id,
                                    "state", "publishing", "externalTrackingId", j->tracking_id,
                                    "status", json_object_get(j->final, "status"), "checks",
                                    json_object_get(j->final, "checks"), "message",
                                    "terminal status: publishing status.final"));
    rt_outcome_begin(&j->base.out, after_final, j);
    rt_publish_event(j->p->rt, &j->base.out, "status.final", j->final, j->base.job_id);
    rt_outcome_seal(&j->base.out);
}

/* A recorded outcome found before a call (or by losing the record race):
 * ack when published, publish it when its recorder's lease is over, else wait
 * for the lease. */
static void adopt_record(pjob *j, const char *text, size_t len)
{
    json_t *rec = json_loadb(text, len, 0, NULL);
    json_t *ev = json_object_get(rec, "event");
    json_t *at = json_object_get(rec, "recordedAt");
    long long age;

    if (!json_is_object(ev)) {
        json_decref(rec);
        fail_job(j, "FINAL_RECORD_CORRUPT", "the Redis record of this job's outcome is not JSON", 0,
                 j->base.attempts);
        return;
    }
    if (json_is_true(json_object_get(rec, "published"))) {
        log_msg(IW_LOG_INFO, pjob_fields(j),
                "status.final of this job was published before; acked without a call");
        json_decref(rec);
        rt_ack(j->p->rt, j->base.d);
        pjob_free(j);
        return;
    }
    j->recorded_at = json_is_integer(at) ? json_integer_value(at) : 0;
    age = clock_wall_ms() - j->recorded_at;
    if (age < FINAL_LEASE_MS) {
        log_msg(IW_LOG_INFO, pjob_fields(j),
                "this job's outcome was recorded %lld ms ago by a poller that is publishing "
                "it; waiting for its lease before taking over",
                age);
        json_decref(rec);
        defer(j, (long)(FINAL_LEASE_MS - age));
        return;
    }
    log_msg(IW_LOG_INFO, pjob_fields(j),
            "outcome recorded but not published (a crash?); publishing it without a call");
    json_decref(j->final);
    j->final = json_incref(ev);
    json_decref(rec);
    publish_final(j);
}

/* ---- provider call ---------------------------------------------------------------- */

static void log_call(const pjob *j, const http_response *r, const iw_verdict *v, int attempt,
                     const char *status)
{
    json_t *f = pjob_fields(j);

    job_call_fields(f, STATUS_OPERATION, r, attempt);
    if (status)
        json_object_set_new(f, "jobStatus", json_string(status));
    job_log_call(f, r, v, attempt);
}

static void on_response(void *ud, const http_response *r)
{
    pjob *j = ud;
    poller *p = j->p;
    const iw_config *cfg = p->cfg;
    iw_verdict v = retry_classify(&r->result);
    int attempt = j->base.attempts + 1;
    json_t *body = NULL;
    const char *status = NULL;
    char msg[300];

    j->base.state = P_CLASSIFIED;
    if (v.kind == IW_V_ACCEPT) {
        iw_error err;
        body = json_loadb(r->body, r->body_len, 0, NULL);
        if (!body || schema_validate(p->resp_schema, body, &err) != IW_OK) {
            /* a GET is safe to repeat: a malformed answer is retried */
            v.kind = IW_V_RETRY;
            v.code = "EXTERNAL_API_BAD_RESPONSE";
        } else {
            status = json_string_value(json_object_get(body, "status"));
        }
    } else if (v.kind == IW_V_FAIL && r->result.status == 404) {
        v.code = "TRACKING_NOT_FOUND";
    }
    breaker_record(p, &v);
    log_call(j, r, &v, attempt, status);
    if (v.kind == IW_V_WAIT) {
        /* fleet-wide, whatever becomes of this check */
        iw_error err;
        if (limiter_pause(rt_limiter(p->rt), v.wait_ms, &err) != IW_OK)
            log_msg(IW_LOG_WARN, pjob_fields(j), "could not share the 429 pause: %s", err.msg);
    }
    if (r->result.transport != IW_TRANSPORT_OK)
        snprintf(msg, sizeof msg, "External API call failed: %s", r->error);
    else if (v.kind == IW_V_RETRY && v.code && !strcmp(v.code, "EXTERNAL_API_BAD_RESPONSE"))
        snprintf(msg, sizeof msg, "External API returned %ld with a body of an unexpected shape",
                 r->result.status);
    else if (r->result.status == 404)
        snprintf(msg, sizeof msg, "External API returned 404: tracking id %.200s is unknown",
                 j->tracking_id);
    else
        snprintf(msg, sizeof msg, "External API returned %ld", r->result.status);

    if (!rt_delivery_live(p->rt, j->base.d)) {
        /* the broker already requeued it: the redelivery checks again */
        pjob_free(j);
        goto out;
    }
    switch (v.kind) {
    case IW_V_ACCEPT: {
        long long now = clock_wall_ms();
        j->checks++;
        if (config_is_terminal(cfg, status))
            record_final(j, status, body, now);
        else if (now + IW_DELAY_SLACK_MS >= j->accepted_ms + cfg->poll_max_age_ms) {
            char m[200], age[32];
            snprintf(m, sizeof m, "no terminal status within IW_POLL_MAX_AGE=%s (last: %.64s)",
                     format_duration(cfg->poll_max_age_ms, age, sizeof age), status);
            fail_job(j, "POLL_EXPIRED", m, 0, attempt);
        } else {
            reschedule(j, status, now);
        }
        break;
    }
    case IW_V_RETRY: {
        long next = retry_delay_before(cfg->retry_schedule_ms, cfg->n_retry, attempt + 1);
        if (next < 0)
            fail_job(j, v.code, msg, r->result.status, attempt);
        else
            send_on(j, next, attempt, v.code);
        break;
    }
    case IW_V_WAIT:
        defer(j, v.wait_ms);
        break;
    case IW_V_FAIL:
        fail_job(j, v.code, msg, r->result.status, attempt);
        break;
    }
out:
    json_decref(body);
}

static void start_call(pjob *j)
{
    poller *p = j->p;
    char *path = status_path(j->tracking_id);

    j->base.state = P_CALLING;
    if (!path ||
        http_client_start(rt_http(p->rt), "GET", path, NULL, 0, NULL, on_response, j) != IW_OK) {
        log_msg(IW_LOG_ERROR, pjob_fields(j), "cannot start the provider call; retrying in 1 s");
        defer(j, 1000);
    }
    free(path);
}

/* ---- Redis: record terminal outcomes, mark them published ------------------------ */

/* Records the terminal outcomes waiting in to_record in one pipelined round
 * trip: the recorder publishes; a job that finds another record adopts it.
 * Jobs whose record could not be written wait (delivery unacked) and are
 * tried again once Redis answers. */
static void store_finals(poller *p, long long now)
{
    redis_link *r = rt_redis(p->rt);
    job_fifo keep = {0};
    size_t appended = 0;
    char key[300], ttl[24];
    iw_error err = {0};
    int failed = 0;

    if (!p->to_record.head || now < p->record_blocked_until)
        return;
    if (!rt_redis_ready(p->rt)) {
        p->record_blocked_until = now + REDIS_RETRY_MS;
        return;
    }
    snprintf(ttl, sizeof ttl, "%ld", p->cfg->idempotency_ttl_ms);
    for (pjob *j = (pjob *)p->to_record.head; j; j = (pjob *)j->base.next) {
        const char *argv[3] = {final_key(j, key, sizeof key), j->record, ttl};
        if (redis_link_append_script(r, &p->record_script, 1, 3, argv, &err) != IW_OK)
            break;
        appended++;
    }
    /* every appended reply is read, even after a bad one, so that the
     * pipeline stays in step (after a connection error reads fail at once) */
    for (size_t i = 0; i < appended; i++) {
        pjob *j = pjob_pop(&p->to_record);
        redisReply *rep = NULL;

        if (redis_link_read(r, &rep, &err) != IW_OK || rep->type != REDIS_REPLY_ARRAY ||
            rep->elements < 1 || rep->element[0]->type != REDIS_REPLY_INTEGER) {
            if (rep)
                freeReplyObject(rep);
            failed = 1;
            job_fifo_push(&keep, &j->base);
            continue;
        }
        if (!rt_delivery_live(p->rt, j->base.d))
            pjob_free(j); /* requeued by the broker: its redelivery finds the record */
        else if (rep->element[0]->integer == 1)
            publish_final(j);
        else if (rep->elements >= 2 && rep->element[1]->type == REDIS_REPLY_STRING)
            adopt_record(j, rep->element[1]->str, rep->element[1]->len);
        else
            job_fifo_push(&keep, &j->base); /* expired in between: record again */
        freeReplyObject(rep);
    }
    if (failed || appended == 0) {
        log_msg(IW_LOG_WARN, NULL,
                "could not record terminal outcomes in Redis (%s); retrying in %ld ms",
                err.msg[0] ? err.msg : "unexpected reply", REDIS_RETRY_MS);
        p->record_blocked_until = now + REDIS_RETRY_MS;
    }
    /* the ones not appended follow those that failed */
    for (job *j = job_fifo_pop(&p->to_record); j; j = job_fifo_pop(&p->to_record))
        job_fifo_push(&keep, j);
    p->to_record = keep;
}

/* Rewrites each confirmed record with "published": true (one pipelined round
 * trip), then acks.  A failed mark is only logged: the event is out and the
 * check is acked, so only a duplicate check chain could repeat the event. */
static void mark_finals(poller *p)
{
    redis_link *r = rt_redis(p->rt);
    size_t appended = 0, i = 0;
    char key[300];
    iw_error err = {0};

    if (!p->to_mark.head)
        return;
    if (rt_redis_ready(p->rt)) {
        for (pjob *j = (pjob *)p->to_mark.head; j; j = (pjob *)j->base.next) {
            json_t *rec = json_pack("{s:O, s:b, s:I}", "event", j->final, "published", 1,
                                    "recordedAt", (json_int_t)j->recorded_at);
            char *text = rec ? json_dumps(rec, JSON_COMPACT) : NULL;
            int rc = text ? redis_link_append(r, &err, "SET %s %s XX PX %lld",
                                              final_key(j, key, sizeof key), text,
                                              (long long)p->cfg->idempotency_ttl_ms)
                          : IW_ERR_NOMEM;
            free(text);
            json_decref(rec);
            if (rc != IW_OK)
                break;
            appended++;
        }
    } else {
        iw_error_set(&err, IW_ERR_REDIS, "Redis unavailable");
    }
    for (pjob *j = pjob_pop(&p->to_mark); j; j = pjob_pop(&p->to_mark), i++) {
        redisReply *rep = NULL;
        int marked = i < appended && redis_link_read(r, &rep, &err) == IW_OK;
        if (rep)
            freeReplyObject(rep);
        if (!marked)
            log_msg(IW_LOG_WARN, pjob_fields(j),
                    "status.final published but not marked in Redis (%s); acked anyway",
                    err.msg[0] ? err.msg : "cannot append");
        rt_ack(p->rt, j->base.d);
        pjob_free(j);
    }
}

/* ---- the tick: deferred checks, permits, calls ------------------------------------ */

static void take_batch(poller *p, long long now)
{
    const iw_config *cfg = p->cfg;
    pjob *batch[LIMITER_MAX_RECORDS];
    char keys[LIMITER_MAX_RECORDS][300];
    const char *key_ptrs[LIMITER_MAX_RECORDS];
    size_t n = 0;
    long free_slots = cfg->concurrency - http_client_in_flight(rt_http(p->rt));
    limiter_result res;
    iw_error err;

    /* one priority per batch: critical checks bypass the class cap */
    int q = p->waiting.ready[0].head ? 0 : 1;
    while (n < LIMITER_MAX_RECORDS && (long)n < free_slots) {
        pjob *j = pjob_pop(&p->waiting.ready[q]);
        if (!j)
            break;
        batch[n] = j;
        snprintf(keys[n], sizeof keys[n], "%s:final:%s", cfg->ns, j->base.job_id);
        key_ptrs[n] = keys[n];
        n++;
    }
    if (!n)
        return;
    if (limiter_append_take(rt_limiter(p->rt), "status",
                            q == 0 ? 1000 : (int)(cfg->poll_share_pct * 10), (int)n, n, key_ptrs,
                            &err) != IW_OK ||
        limiter_read_take(rt_limiter(p->rt), &res, &err) != IW_OK) {
        /* fail closed: nobody calls the provider unmetered */
        log_json(IW_LOG_ERROR,
                 json_pack("{s:s, s:{s:s, s:s}}", "message", "limiter unavailable; checks wait",
                           "error", "code", "LIMITER_UNAVAILABLE", "message", err.msg));
        while (n)
            job_fifo_push_front(&p->waiting.ready[q], &batch[n - 1]->base), n--;
        p->blocked_until = now + 1000;
        return;
    }
    if (res.usage_permille >= 800 && now - p->last_usage_warn > 60000) {
        p->last_usage_warn = now;
        log_json(IW_LOG_WARN, json_pack("{s:s, s:i}", "message",
                                        "rate limit approaching: a tier of IW_RATE_LIMITS is over "
                                        "80% used",
                                        "usagePermille", res.usage_permille));
    }
    int granted = res.granted;
    for (size_t i = 0; i < n; i++) {
        pjob *j = batch[i];
        size_t len;
        const char *rec = limiter_record(&res, i, &len);
        if (rec) {
            adopt_record(j, rec, len);
        } else if (granted > 0) {
            granted--;
            j->base.state = P_PERMITTED;
            start_call(j);
        } else {
            defer(j, res.wait_ms);
        }
    }
    limiter_result_release(&res);
}

static void tick(void *self, long long now)
{
    poller *p = self;
    long wait;

    mark_finals(p);
    store_finals(p, now);
    job_queues_due(&p->waiting, now, P_VALIDATED);
    if (rt_stopping(p->rt)) {
        job_queues_drop_ready(&p->waiting, p->rt, 1, pjob_free);
        return;
    }
    if (job_queues_any_ready(&p->waiting) && !breaker_allow(p, now, &wait)) {
        for (int q = 0; q < 2; q++)
            for (pjob *j = pjob_pop(&p->waiting.ready[q]); j; j = pjob_pop(&p->waiting.ready[q]))
                defer(j, wait);
        return;
    }
    /* every batch takes at least one check off the ready queues, or blocks */
    while (job_queues_any_ready(&p->waiting) &&
           http_client_in_flight(rt_http(p->rt)) < p->cfg->concurrency && now >= p->blocked_until &&
           rt_redis_ready(p->rt))
        take_batch(p, now);
}

static long long next_deadline(void *self)
{
    poller *p = self;
    long long d = job_queues_next_due(&p->waiting);

    if (p->to_mark.head)
        return 0;
    if (p->to_record.head && p->record_blocked_until < d)
        d = p->record_blocked_until;
    if (job_queues_any_ready(&p->waiting) &&
        http_client_in_flight(rt_http(p->rt)) < p->cfg->concurrency) {
        long long b = p->blocked_until > clock_mono_ms() ? p->blocked_until : 0;
        if (redis_link_connected(rt_redis(p->rt)) && b < d)
            d = b;
    }
    return d;
}

static void on_link_lost(void *self)
{
    poller *p = self;

    job_queues_drop(&p->waiting, p->rt, 0, pjob_free);
    /* not yet recorded: the redelivery checks again */
    for (job *j = job_fifo_pop(&p->to_record); j; j = job_fifo_pop(&p->to_record))
        pjob_free(j);
}

static void on_stop(void *self)
{
    poller *p = self;

    /* checks being recorded or marked finish: they are moments from done */
    job_queues_drop(&p->waiting, p->rt, 1, pjob_free);
}

static size_t busy(void *self)
{
    return ((poller *)self)->alive;
}

poller *poller_new(runtime *rt, iw_error *err)
{
    poller *p = calloc(1, sizeof *p);

    if (!p) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        return NULL;
    }
    p->rt = rt;
    p->cfg = rt_config(rt);
    p->check_schema = rt_load_schema(rt, "status-check.schema.json", err);
    if (p->check_schema)
        p->resp_schema = rt_load_schema(rt, "provider-status-response.schema.json", err);
    if (!p->resp_schema) {
        poller_free(p);
        return NULL;
    }
    p->record_script.source = record_source;
    redis_link_add_script(rt_redis(rt), &p->record_script);
    return p;
}

void poller_free(poller *p)
{
    if (!p)
        return;
    job_queues_drop(&p->waiting, p->rt, 0, pjob_free);
    for (job *j = job_fifo_pop(&p->to_record); j; j = job_fifo_pop(&p->to_record))
        pjob_free(j);
    for (job *j = job_fifo_pop(&p->to_mark); j; j = job_fifo_pop(&p->to_mark))
        pjob_free(j);
    job_queues_clear(&p->waiting);
    schema_free(p->check_schema);
    schema_free(p->resp_schema);
    free(p);
}

int poller_register(poller *p)
{
    rt_role role = {"poller",      "status",     p,       on_delivery, tick,
                    next_deadline, on_link_lost, on_stop, busy};
    return runtime_add_role(p->rt, &role);
}
