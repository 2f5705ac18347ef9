/* The submitter: one submission job becomes exactly one provider submission
 * and one submission.accepted (or submission.failed plus a dead letter).
 *
 * What is its own, as a role of the job engine (engine.h):
 *   the call     POST /api/v1/external-resource with the outbound mapping and
 *                Idempotency-Key; every attempt sends the same body (the
 *                timestamp of the job's first attempt travels with the job);
 *   an answer    a 201 of the right shape is the accepted record
 *                {jobId, externalId, trackingId, status, acceptedAt}; 5xx,
 *                timeouts and connection errors are retried on the schedule;
 *                other 4xx and bad bodies fail the job;
 *   the outcome  submission.accepted + the job's first status check, one
 *                confirmed group, recorded in Redis (<ns>:job:<jobId>) first. */
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "engine.h"
#include "json_out.h"
#include "json_read.h"
#include "log.h"
#include "roles.h"
#include "topology.h"
#include "transform.h"

struct submitter {
    runtime *rt;
    const iw_config *cfg;
    iw_schema *resp_schema;
    json_t *check_headers; /* the first status check's, the same for every job */
};

static iw_code prepare(job *j, char *msg, size_t len)
{
    (void)j;
    (void)msg;
    (void)len;
    return IW_C_NONE;
}

static int start(job *j)
{
    submitter *s = j->self;
    char mem[1024];
    iw_buf body;
    int rc;

    if (!j->first_attempt_ms)
        j->first_attempt_ms = clock_wall_ms();
    /* the request's text straight from the parsed job (no outbound tree);
     * a body past the stack's 1 KiB moves to the heap, up to the broker's
     * cap on the job it came from */
    buf_init_on(&body, mem, sizeof mem, JSON_OUT_MAX);
    rc = job_doc(j) ? transform_outbound(j->doc, s->cfg->client_id, j->first_attempt_ms, &body)
                    : IW_ERR_NOMEM;
    /* the body is built: nothing else reads the parsed job (another attempt
     * parses it again), and a call in flight holds no jansson tree */
    job_drop_doc(j);
    if (rc == IW_OK)
        rc = engine_call(j->e, &j->call, "POST", "/api/v1/external-resource", buf_ptr(&body),
                         buf_len(&body), j->job_id);
    else if (rc == IW_ERR_INVALID)
        rc = IW_ERR_NOMEM; /* as before: the job passed its schema, so this is not input */
    buf_free(&body);
    return rc;
}

/* The accepted record of a 201 (new), or NULL when the body is not the
 * spec's shape. */
static json_t *accepted_record(submitter *s, const job *j, const http_response *r)
{
    json_t *body = json_read(r->body, r->body_len, 0, NULL), *rec = NULL;
    char ts[40];
    iw_error err;

    if (body && schema_validate(s->resp_schema, body, &err) == IW_OK && (rec = json_object())) {
        /* built member by member (the schema guarantees the strings): no
         * format string to parse, no key to check */
        format_timestamp(clock_wall_ms(), ts, sizeof ts);
        if (json_object_set_new_nocheck(rec, "jobId", json_string(j->job_id)) ||
            json_object_set_nocheck(rec, "externalId", json_object_get(body, "id")) ||
            json_object_set_nocheck(rec, "trackingId", json_object_get(body, "trackingId")) ||
            json_object_set_nocheck(rec, "status", json_object_get(body, "status")) ||
            json_object_set_new_nocheck(rec, "acceptedAt", json_string_nocheck(ts))) {
            json_decref(rec);
            rec = NULL;
        }
    }
    json_decref(body);
    return rec;
}

static void answer(job *j, const http_response *r, iw_verdict *v)
{
    submitter *s = j->self;
    int attempt = j->call.attempt;
    char msg[300];
    json_t *rec = NULL;

    if (v->kind != IW_V_ACCEPT) /* an accepted job's answer needs no message */
        engine_answer_message(r, msg, sizeof msg);
    if (v->kind == IW_V_ACCEPT && !(rec = accepted_record(s, j, r))) {
        v->kind = IW_V_FAIL;
        v->code = IW_C_EXTERNAL_API_BAD_RESPONSE;
        snprintf(msg, sizeof msg, "External API returned %ld with a body of an unexpected shape",
                 r->result.status);
    }
    if (rec) {
        engine_log_call(&j->call, r, v, json_string_value(json_object_get(rec, "trackingId")),
                        NULL);
        job_record_doc(j, rec);
        json_decref(rec);
        return;
    }
    engine_log_call(&j->call, r, v, NULL, NULL);
    if (v->kind == IW_V_RETRY)
        job_retry(j, v->code, msg, r->result.status, attempt);
    else
        job_fail(j, v->code, msg, r->result.status, attempt);
}

/* submission.accepted and the first status check, one confirmed group. */
static void publish(job *j, const char *event)
{
    submitter *s = j->self;
    const iw_config *cfg = s->cfg;
    /* the record as built here, or the text recorded by another delivery */
    json_t *rec = j->event_doc ? json_incref(j->event_doc) : json_loads(event, 0, NULL);
    long delay = topology_poll_wait(cfg, 0, (double)random() / ((double)RAND_MAX + 1.0));
    char mem[512];
    iw_buf text;
    json_w w;
    int rc;

    /* the first status check, written from the record (no tree of its own) */
    buf_init_on(&text, mem, sizeof mem, JSON_OUT_MAX);
    jw_begin(&w, &text);
    jw_json(&w, "jobId", json_object_get(rec, "jobId"));
    jw_json(&w, "trackingId", json_object_get(rec, "trackingId"));
    jw_json(&w, "externalId", json_object_get(rec, "externalId"));
    jw_json(&w, "acceptedAt", json_object_get(rec, "acceptedAt"));
    jw_int(&w, "checks", 0);
    jw_json(&w, "lastStatus", json_object_get(rec, "status"));
    jw_str(&w, "priority", j->call.critical ? "critical" : "normal");
    rc = jw_end(&w);

    job_outcome_begin(j);
    job_publish_event(j, "submission.accepted", event, strlen(event));
    if (rc == IW_OK)
        job_publish_later(j, "status", buf_ptr(&text), buf_len(&text), s->check_headers, delay);
    else
        j->out.failed = 1;
    job_outcome_seal(j, 1);
    json_decref(rec);
    buf_free(&text);
}

/* A later delivery of an accepted job (an upstream duplicate): the same
 * submission.accepted, byte for byte; its status checks run already. */
static void republish(job *j, const char *event)
{
    job_outcome_begin(j);
    job_publish_event(j, "submission.accepted", event, strlen(event));
    job_outcome_seal(j, 0);
}

static const job_role submitter_role = {
    .name = "submitter",
    .metric_role = IW_ROLE_SUBMITTER,
    .claims = 1,
    .outcome = IW_OUTCOME_ACCEPTED,
    .queue = "submit",
    .schema = "submission-job.schema.json",
    .record_kind = "job",
    .operation = "POST /external-resource",
    .cls = "submit",
    .route = IW_ROUTE_SUBMIT,
    .job_size = sizeof(job),
    .prepare = prepare,
    .start = start,
    .answer = answer,
    .publish = publish,
    .republish = republish,
    .release = NULL,
};

submitter *submitter_new(runtime *rt, engine *e, iw_error *err)
{
    submitter *s = calloc(1, sizeof *s);

    if (!s) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        return NULL;
    }
    s->rt = rt;
    s->cfg = rt_config(rt);
    s->check_headers =
        json_pack("{s:i, s:s}", "x-attempts", 0, "x-original-routing-key", "status.check");
    if (!s->check_headers) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        submitter_free(s);
        return NULL;
    }
    s->resp_schema = rt_load_schema(rt, "provider-submit-response.schema.json", err);
    if (!s->resp_schema || engine_add_role(e, &submitter_role, s) != IW_OK) {
        if (s->resp_schema && !err->msg[0])
            iw_error_set(err, IW_ERR_INVALID, "cannot register the submitter");
        submitter_free(s);
        return NULL;
    }
    return s;
}

void submitter_free(submitter *s)
{
    if (!s)
        return;
    schema_free(s->resp_schema);
    json_decref(s->check_headers);
    free(s);
}
