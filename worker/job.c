#include "job.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "clock.h"
#include "log.h"
#include "topology.h"

/* ---- FIFOs -------------------------------------------------------------------- */

void job_fifo_push(job_fifo *q, job *j)
{
    j->next = NULL;
    if (q->tail)
        q->tail->next = j;
    else
        q->head = j;
    q->tail = j;
}

void job_fifo_push_front(job_fifo *q, job *j)
{
    j->next = q->head;
    q->head = j;
    if (!q->tail)
        q->tail = j;
}

job *job_fifo_pop(job_fifo *q)
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

/* ---- waiting for a permit --------------------------------------------------------- */

void job_queues_ready(job_queues *q, job *j)
{
    job_fifo_push(&q->ready[j->critical ? 0 : 1], j);
}

int job_queues_any_ready(const job_queues *q)
{
    return q->ready[0].head || q->ready[1].head;
}

void job_queues_due(job_queues *q, long long now, int ready_state)
{
    jobheap_node *top;

    while ((top = jobheap_peek(&q->deferred)) && top->due_ms <= now) {
        job *j = jobheap_pop(&q->deferred)->item;
        j->state = ready_state;
        job_queues_ready(q, j);
    }
}

long long job_queues_next_due(const job_queues *q)
{
    jobheap_node *top = jobheap_peek(&q->deferred);

    return top ? top->due_ms : LLONG_MAX;
}

void job_queues_drop_ready(job_queues *q, runtime *rt, int nack, job_free_fn *free_job)
{
    for (int c = 0; c < 2; c++)
        for (job *j = job_fifo_pop(&q->ready[c]); j; j = job_fifo_pop(&q->ready[c])) {
            if (nack)
                rt_nack(rt, j->d, 1);
            free_job(j);
        }
}

void job_queues_drop(job_queues *q, runtime *rt, int nack, job_free_fn *free_job)
{
    jobheap_node *n;

    while ((n = jobheap_pop(&q->deferred))) {
        job *j = n->item;
        if (nack)
            rt_nack(rt, j->d, 1);
        free_job(j);
    }
    job_queues_drop_ready(q, rt, nack, free_job);
}

void job_queues_clear(job_queues *q)
{
    jobheap_clear(&q->deferred);
}

/* ---- deferral and sending on ---------------------------------------------------------- */

void job_defer(job_queues *q, job *j, long wait_ms, long hold_max_ms, int deferred_state,
               job_send_on_fn *send_on)
{
    if (wait_ms <= hold_max_ms) {
        j->state = deferred_state;
        j->node.due_ms = clock_mono_ms() + wait_ms;
        j->node.item = j;
        if (jobheap_push(&q->deferred, &j->node) == 0)
            return;
    }
    send_on(j, wait_ms, j->attempts, NULL);
}

void job_send_on(job *j, runtime *rt, const char *target, long delay_ms, int attempts,
                 const char *last_error, void (*done)(void *owner, int ok))
{
    json_t *h = rt_onward_headers(j->d, attempts, last_error);

    rt_outcome_begin(&j->out, done, j);
    rt_publish_delayed(rt, &j->out, target, j->d->body, j->d->body_len, j->job_id, h, delay_ms);
    json_decref(h);
    rt_outcome_seal(&j->out);
}

void job_settle(job *j, runtime *rt, int ok, const char *state_name, const char *message)
{
    if (ok) {
        rt_ack(rt, j->d);
    } else {
        log_json(IW_LOG_WARN, json_pack("{s:s, s:s, s:s}", "requestId", j->job_id ? j->job_id : "",
                                        "state", state_name, "message", message));
        rt_nack(rt, j->d, 1);
    }
}

/* ---- intake ------------------------------------------------------------------------ */

int job_intake(job *j, const runtime *rt, const iw_schema *schema, const char **code, char *msg,
               size_t msg_len)
{
    j->attempts = (int)rt_header_int(j->d, "x-attempts", 0);
    if (j->attempts < 0)
        j->attempts = 0;
    return rt_intake(rt, j->d, schema, &j->doc, code, msg, msg_len);
}

void job_read_ids(job *j)
{
    j->job_id = json_string_value(json_object_get(j->doc, "jobId"));
    j->critical =
        strcmp(json_string_value(json_object_get(j->doc, "priority")) ?: "normal", "critical") == 0;
}

long job_early_ms(const iw_delivery *d)
{
    long long due = rt_header_int(d, "x-due-at", 0);
    long long left = due ? due - clock_wall_ms() : 0;

    return left > IW_DELAY_SLACK_MS ? (long)left : 0;
}

/* ---- provider-call log lines ------------------------------------------------------------ */

void job_call_fields(json_t *f, const char *operation, const http_response *r, int attempt)
{
    json_object_set_new(f, "operation", json_string(operation));
    json_object_set_new(f, "duration", json_integer(r->duration_us / 1000));
    json_object_set_new(f, "status",
                        r->result.status ? json_integer(r->result.status) : json_null());
    json_object_set_new(f, "attempt", json_integer(attempt));
}

void job_log_call(json_t *f, const http_response *r, const iw_verdict *v, int attempt)
{
    if (v->kind != IW_V_ACCEPT) {
        char m[300];
        if (r->result.transport != IW_TRANSPORT_OK)
            snprintf(m, sizeof m, "External API call failed: %s", r->error);
        else
            snprintf(m, sizeof m, "External API returned %ld", r->result.status);
        json_object_set_new(
            f, "error",
            json_pack("{s:s, s:s, s:o, s:i}", "code", v->code, "message", m, "statusCode",
                      r->result.status ? json_integer(r->result.status) : json_null(),
                      "retryAttempt", attempt));
    }
    log_json(v->kind == IW_V_ACCEPT ? IW_LOG_INFO
             : v->kind == IW_V_WAIT ? IW_LOG_WARN
                                    : IW_LOG_ERROR,
             f);
}

const char *job_readable_id(const json_t *doc)
{
    const char *id = json_string_value(json_object_get(doc, "jobId"));
    return id && *id ? id : NULL;
}
