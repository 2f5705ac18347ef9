/* The poller: status checks of accepted jobs until the provider reports a
 * terminal status, and then exactly one status.final.
 *
 * What is its own, as a role of the job engine (engine.h):
 *   a delivery   a status check {jobId, trackingId, externalId, acceptedAt,
 *                checks, lastStatus, priority} (schemas/status-check);
 *   the call     GET /api/v1/status/{trackingId}, the id percent-encoded;
 *   an answer    a terminal status (IW_TERMINAL_STATUSES) is the outcome
 *                status.final, recorded in Redis (<ns>:final:<jobId>) before
 *                it is published; another status re-schedules the next check
 *                through the delay tiers (the schedule's next wait, jittered,
 *                never past IW_POLL_MAX_AGE), with status.progress when it
 *                changed, both in one confirmed group; no terminal status by
 *                IW_POLL_MAX_AGE fails the job (POLL_EXPIRED), a 404 too
 *                (TRACKING_NOT_FOUND).  A malformed answer is retried: a GET is
 *                safe to repeat.
 * `checks` counts the GETs the provider answered; failed attempts of one
 * check are counted by x-attempts, as for submissions.  The records (put,
 * adopt as a claim, mark after the confirm) make the outcome exactly-once
 * across pollers and duplicate check chains. */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "buf.h"
#include "clock.h"
#include "engine.h"
#include "json_out.h"
#include "json_read.h"
#include "log.h"
#include "roles.h"
#include "topology.h"

typedef struct pjob {
    job base;                /* first */
    const char *tracking_id; /* borrowed from doc */
    long long accepted_ms;   /* wall clock */
    int checks;              /* answered checks so far (the body's "checks") */
} pjob;

struct poller {
    runtime *rt;
    const iw_config *cfg;
    iw_schema *resp_schema;
};

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

static iw_code prepare(job *base, char *msg, size_t len)
{
    pjob *j = (pjob *)base;
    const iw_config *cfg = ((poller *)base->self)->cfg;
    json_int_t checks = json_integer_value(json_object_get(base->doc, "checks"));

    j->tracking_id = json_string_value(json_object_get(base->doc, "trackingId"));
    j->checks = checks > INT_MAX / 2 ? INT_MAX / 2 : (int)checks; /* schema: >= 0 */
    j->accepted_ms =
        parse_timestamp_ms(json_string_value(json_object_get(base->doc, "acceptedAt")));
    if (j->accepted_ms < 0) {
        snprintf(msg, len, "acceptedAt is not an RFC 3339 date-time");
        return IW_C_SCHEMA_VIOLATION;
    }
    /* a check that waited past the deadline (an open breaker, a long 429
     * pause, a maintenance window) ends without a call */
    if (clock_wall_ms() > j->accepted_ms + cfg->poll_max_age_ms + IW_DELAY_SLACK_MS) {
        char age[32];
        const char *last = json_string_value(json_object_get(base->doc, "lastStatus")) ?: "none";
        char *q = text_quote(last, strlen(last), 64);
        snprintf(msg, len, "no terminal status within IW_POLL_MAX_AGE=%s (last: %s)",
                 format_duration(cfg->poll_max_age_ms, age, sizeof age), q ? q : "?");
        free(q);
        metrics_status_check(IW_CHECK_EXPIRED);
        return IW_C_POLL_EXPIRED;
    }
    return IW_C_NONE;
}

static int start(job *base)
{
    pjob *j = (pjob *)base;
    char *path = status_path(j->tracking_id);
    int rc = path ? engine_call(base->e, &base->call, "GET", path, NULL, 0, NULL) : IW_ERR_NOMEM;

    free(path);
    return rc;
}

/* The schedule's wait before the next check (jittered), never past the
 * IW_POLL_MAX_AGE deadline. */
static long next_check_in(const pjob *j, long long now_wall)
{
    const iw_config *cfg = ((poller *)j->base.self)->cfg;
    long delay =
        topology_poll_wait(cfg, (size_t)j->checks, (double)random() / ((double)RAND_MAX + 1.0));
    long long deadline = j->accepted_ms + cfg->poll_max_age_ms;

    if (now_wall + delay > deadline)
        delay = deadline > now_wall ? (long)(deadline - now_wall) : 0;
    return delay;
}

/* Non-terminal: status.progress when the status changed, and the next check
 * after the schedule's next interval (clamped to the IW_POLL_MAX_AGE deadline,
 * so that the last check happens at the deadline). */
static void reschedule(pjob *j, const char *status, long long now_wall)
{
    const char *last = json_string_value(json_object_get(j->base.doc, "lastStatus"));
    long delay = next_check_in(j, now_wall);
    json_t *next = json_deep_copy(j->base.doc);
    json_t *h = job_onward_headers(&j->base, 0, NULL);
    char *text;

    json_object_set_new(next, "checks", json_integer(j->checks));
    json_object_set_new(next, "lastStatus", json_string(status));
    text = json_out_text(next, NULL);
    metrics_status_check(!last || strcmp(last, status) != 0 ? IW_CHECK_PROGRESS
                                                            : IW_CHECK_UNCHANGED);
    job_outcome_begin(&j->base);
    if (!last || strcmp(last, status) != 0) {
        json_t *ev = json_pack("{s:s, s:s, s:s, s:i}", "jobId", j->base.job_id, "trackingId",
                               j->tracking_id, "status", status, "checks", j->checks);
        char *evt = ev ? json_out_text(ev, NULL) : NULL;
        if (evt)
            job_publish_event(&j->base, "status.progress", evt, strlen(evt));
        else
            j->base.out.failed = 1;
        free(evt);
        json_decref(ev);
    }
    if (text)
        job_publish_later(&j->base, "status", text, strlen(text), h, delay);
    else
        j->base.out.failed = 1;
    job_outcome_seal(&j->base, 0);
    free(text);
    json_decref(h);
    json_decref(next);
}

/* Terminal: the status.final body, recorded in Redis before publishing. */
static void record_final(pjob *j, const char *status, json_t *body, long long now_wall)
{
    char ts[40];
    json_t *fin;

    format_timestamp(now_wall, ts, sizeof ts);
    fin = json_pack("{s:s, s:s, s:s, s:i, s:O, s:s, s:O}", "jobId", j->base.job_id, "trackingId",
                    j->tracking_id, "status", status, "checks", j->checks, "acceptedAt",
                    json_object_get(j->base.doc, "acceptedAt"), "finishedAt", ts, "result", body);
    job_record(&j->base, fin ? json_out_text(fin, NULL) : NULL);
    json_decref(fin);
}

/* An answered check: final, expired, or the next one. */
static void answered(pjob *j, const char *status, json_t *body)
{
    const iw_config *cfg = ((poller *)j->base.self)->cfg;
    long long now = clock_wall_ms();

    j->checks++;
    if (config_is_terminal(cfg, status)) {
        record_final(j, status, body, now);
    } else if (now + IW_DELAY_SLACK_MS >= j->accepted_ms + cfg->poll_max_age_ms) {
        char m[200], age[32];
        char *q = text_quote(status, strlen(status), 64);
        snprintf(m, sizeof m, "no terminal status within IW_POLL_MAX_AGE=%s (last: %s)",
                 format_duration(cfg->poll_max_age_ms, age, sizeof age), q ? q : "?");
        free(q);
        metrics_status_check(IW_CHECK_EXPIRED);
        job_fail(&j->base, IW_C_POLL_EXPIRED, m, 0, j->base.call.attempt);
    } else {
        reschedule(j, status, now);
    }
}

/* A check that failed (5xx, timeout, no connection, a malformed answer)
 * never ends an accepted job: it is tried again on the poll schedule until
 * IW_POLL_MAX_AGE. */
static void check_failed(pjob *j, iw_code code, const char *msg, int attempt)
{
    const iw_config *cfg = ((poller *)j->base.self)->cfg;
    long long now = clock_wall_ms();

    metrics_status_check(IW_CHECK_RETRY);
    if (now + IW_DELAY_SLACK_MS >= j->accepted_ms + cfg->poll_max_age_ms) {
        char m[400], age[32];
        snprintf(m, sizeof m, "no terminal status within IW_POLL_MAX_AGE=%s (last check: %s)",
                 format_duration(cfg->poll_max_age_ms, age, sizeof age), msg);
        metrics_status_check(IW_CHECK_EXPIRED);
        job_fail(&j->base, IW_C_POLL_EXPIRED, m, 0, attempt);
        return;
    }
    job_retry_in(&j->base, code, next_check_in(j, now), attempt);
}

static void answer(job *base, const http_response *r, iw_verdict *v)
{
    pjob *j = (pjob *)base;
    poller *p = base->self;
    json_t *body = NULL;
    const char *status = NULL;
    int attempt = base->call.attempt;
    char msg[300];
    iw_error err;

    engine_answer_message(r, msg, sizeof msg);
    if (v->kind == IW_V_ACCEPT) {
        body = json_read(r->body, r->body_len, 0, NULL);
        if (!body || schema_validate(p->resp_schema, body, &err) != IW_OK) {
            /* a GET is safe to repeat: a malformed answer is retried */
            v->kind = IW_V_RETRY;
            v->code = IW_C_EXTERNAL_API_BAD_RESPONSE;
            snprintf(msg, sizeof msg,
                     "External API returned %ld with a body of an unexpected shape",
                     r->result.status);
        } else {
            status = json_string_value(json_object_get(body, "status"));
        }
    } else if (v->kind == IW_V_FAIL && r->result.status == 404) {
        metrics_status_check(IW_CHECK_NOT_FOUND);
        v->code = IW_C_TRACKING_NOT_FOUND;
        char *q = text_quote(j->tracking_id, strlen(j->tracking_id), 200);
        snprintf(msg, sizeof msg, "External API returned 404: tracking id %s is unknown",
                 q ? q : "?");
        free(q);
    }
    engine_log_call(&base->call, r, v, j->tracking_id, status);
    if (v->kind == IW_V_ACCEPT)
        answered(j, status, body);
    else if (v->kind == IW_V_RETRY)
        check_failed(j, v->code, msg, attempt);
    else
        job_fail(base, v->code, msg, r->result.status, attempt);
    json_decref(body);
}

static void publish(job *base, const char *event)
{
    log_json(IW_LOG_INFO, json_pack("{s:s, s:s, s:s, s:s}", "requestId", base->job_id, "state",
                                    job_state_name(base->state), "externalTrackingId",
                                    ((pjob *)base)->tracking_id, "message",
                                    "terminal status: publishing status.final"));
    metrics_status_check(IW_CHECK_FINAL);
    job_outcome_begin(base);
    job_publish_event(base, "status.final", event, strlen(event));
    job_outcome_seal(base, 1);
}

static const job_role poller_role = {
    .name = "poller",
    .metric_role = IW_ROLE_POLLER,
    .outcome = IW_OUTCOME_FINAL,
    .queue = "status",
    .schema = "status-check.schema.json",
    .record_kind = "final",
    .operation = "GET /status/{trackingId}",
    .cls = "status",
    .route = IW_ROUTE_STATUS,
    .job_size = sizeof(pjob),
    .prepare = prepare,
    .start = start,
    .answer = answer,
    .publish = publish,
    .release = NULL,
};

poller *poller_new(runtime *rt, engine *e, iw_error *err)
{
    poller *p = calloc(1, sizeof *p);

    if (!p) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        return NULL;
    }
    p->rt = rt;
    p->cfg = rt_config(rt);
    p->resp_schema = rt_load_schema(rt, "provider-status-response.schema.json", err);
    if (!p->resp_schema || engine_add_role(e, &poller_role, p) != IW_OK) {
        if (p->resp_schema && !err->msg[0])
            iw_error_set(err, IW_ERR_INVALID, "cannot register the poller");
        poller_free(p);
        return NULL;
    }
    return p;
}

void poller_free(poller *p)
{
    if (!p)
        return;
    schema_free(p->resp_schema);
    free(p);
}
