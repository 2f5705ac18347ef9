/* The job engine: the mechanics every provider-calling piece of work shares,
 * written once.  curl's struct Curl_handler driven by lib/multi.c is the
 * model: a role is a small table of what is its own; the engine drives it.
 *
 * Two layers:
 *
 * CALLS: anything that wants a provider call (a job, or a resolver flight)
 *   embeds a `call` and asks for a permit.  The engine batches the asks of a
 *   loop turn into one limiter round trip per class and priority (critical
 *   first), counts calls in flight for the whole process against
 *   IW_CONCURRENCY, starts the HTTP transfer, classifies the answer, shares a
 *   429's pause with the fleet, exports the per-route metrics and writes the
 *   spec's one log line per call.
 *
 * JOBS: a delivery that becomes provider calls (submitter, poller).  The
 *   engine does intake (pure: common/intake.c), holds or sends on through the
 *   delay tiers, records outcomes in Redis before publishing them
 *   (common/records.c, batched per turn), publishes each outcome as one
 *   confirmed group, marks it published, and acks; or fails the job with
 *   submission.failed + a dead letter.  A role (job_role) says which queue,
 *   which call, what an answer means and what to publish.
 *
 * Life of a job (one enum, one transition function, logged at debug):
 *   received -> validated -> ready -> permitted -> calling -> classified
 *     -> recording -> publishing -> marking -> acked       (an outcome)
 *     -> publishing -> acked                               (a next check)
 *   side paths: held (a short wait in memory, delivery unacked), sending_on
 *   (a retry or a long wait through the delay tiers), adopting (a record was
 *   found: publish it, or ack), failing (submission.failed + dead letter),
 *   returned (nacked back to its queue), dropped (its broker connection went
 *   away: the broker already requeued it). */
#ifndef IW_ENGINE_H
#define IW_ENGINE_H

#include <jansson.h>

#include "errcode.h"
#include "http_client.h"
#include "jobstate.h"
#include "loop.h"
#include "metrics.h"
#include "records.h"
#include "retry.h"
#include "runtime.h"

typedef struct engine engine;

/* ---- calls ------------------------------------------------------------------- */

typedef enum call_permit {
    CALL_GRANTED,  /* call now (engine_call) */
    CALL_RECORDED, /* the record key exists: no permit was taken */
    CALL_CLAIMED,  /* another attempt of the job holds its claim: wait wait_ms */
    CALL_REFUSED,  /* no permit: wait wait_ms (reason: a limiter_wait_reason) */
    CALL_DEFERRED, /* a maintenance window: wait wait_ms (its end), no call */
} call_permit;

/* What kind of provider call: one per route. */
typedef struct call_kind {
    const char *cls;       /* limiter class: "submit", "status", "resource" */
    iw_route route;        /* metrics label */
    const char *operation; /* log "operation", e.g. "POST /external-resource" */
} call_kind;

typedef struct call call;

/* A field that identifies a call in a log line, borrowed from its owner. */
typedef struct call_field {
    const char *key, *value;
} call_field;
#define CALL_FIELDS_MAX 4

typedef struct call_ops {
    /* The permit decision for c (one batch per turn). */
    void (*on_permit)(call *c, call_permit p, long wait_ms, int reason, const char *record,
                      size_t record_len);
    /* The answer of engine_call, classified; v may be changed by the owner. */
    void (*on_answer)(call *c, const http_response *r, iw_verdict *v);
    /* The fields that identify c in a log line (requestId, state...), at
     * most CALL_FIELDS_MAX, written into f in their order; returns how many.
     * Written into every call's log line as they are, with no object built. */
    size_t (*fields)(const call *c, call_field *f);
} call_ops;

struct call {
    const call_kind *kind;
    const call_ops *ops;
    int critical;
    int attempt;            /* 1-based number of the call being made (logs) */
    const char *record_key; /* checked with the permit; NULL: none */
    const char *claim_key;  /* claimed with the permit (with record_key); NULL: none */
    char claim_token[48];   /* the token of the claim taken with the last permit */
    const char *first_key;  /* where the time of its first ask is kept; NULL: none */
    long long *first_ms;    /* ... and where it goes (set before on_permit) */
    int probe;              /* this call is the breaker's half-open probe */
    call *next;             /* in a ready queue */
    int queued;
    long long ready_since; /* monotonic ms it was queued (engine_ask) */
    engine *eng;           /* set by engine_ask / engine_call */
};

/* Queues c for a permit (critical before normal, oldest first). */
void engine_ask(engine *e, call *c);
/* Takes c out of the ready queue if it is there. */
void engine_unask(engine *e, call *c);
/* Starts the call; the answer comes through c->ops->on_answer.  Returns
 * IW_OK or an error (nothing started, no callback). */
int engine_call(engine *e, call *c, const char *method, const char *path, const char *body,
                size_t body_len, const char *idempotency_key);
/* The spec's log line of a finished call: the owner's fields, operation,
 * duration, status, attempt, externalTrackingId and jobStatus when not NULL,
 * and the error object when not accepted. */
void engine_log_call(const call *c, const http_response *r, const iw_verdict *v,
                     const char *tracking_id, const char *job_status);
/* c->ops->fields as a new JSON object, for log_msg. */
json_t *engine_call_fields(const call *c);
/* "External API returned 503" / "External API call failed: <curl error>". */
void engine_answer_message(const http_response *r, char *buf, size_t len);

/* ---- jobs ---------------------------------------------------------------------- */

typedef struct job job;

typedef struct job_role {
    const char *name;    /* "submitter": logs, consumer tag */
    iw_role metric_role; /* its metrics label */
    iw_outcome outcome;  /* what its recorded outcome is (accepted, final) */
    /* 1: a call is claimed (N:claim:<jobId>) with its permit, so that two
     * deliveries of one job never call at once (calls that are not safe to
     * repeat: the submitter's POST) */
    int claims;
    const char *queue;       /* the consumed queue: <ns>.<queue> */
    const char *schema;      /* schemas/<file> of the delivery */
    const char *record_kind; /* outcome records <ns>:<kind>:<jobId> */
    const char *operation;   /* the spec's "operation" of its calls and failures */
    const char *cls;         /* limiter class of its calls */
    iw_route route;          /* metrics route of its calls */
    size_t job_size;         /* the role's job struct, `job` first */
    /* After a valid intake: read the role's fields.  IW_C_NONE, or a code
     * (msg filled) that fails the job. */
    iw_code (*prepare)(job *j, char *msg, size_t len);
    /* Permitted: start the call (engine_call).  IW_OK or an error. */
    int (*start)(job *j);
    /* The classified answer: the role calls job_record, job_retry,
     * job_wait, job_fail, or publishes a next step (job_outcome_*). */
    void (*answer)(job *j, const http_response *r, iw_verdict *v);
    /* Publish the recorded outcome `event` (ours or adopted) in one group:
     * job_outcome_begin ... job_outcome_seal(j, 1). */
    void (*publish)(job *j, const char *event);
    /* Another delivery of a job whose outcome is published already: NULL
     * acks it silently; else publish what a later delivery gets (one group,
     * job_outcome_seal(j, 0)). */
    void (*republish)(job *j, const char *event);
    /* Frees what the role's part of j owns (not j). */
    void (*release)(job *j);
} job_role;

struct job {
    call call; /* first: a call * of a job is the job */
    const job_role *role;
    void *self; /* the role object */
    engine *e;
    iw_delivery *d;
    json_t *doc;        /* the parsed delivery; NULL once dropped (job_drop_doc) */
    const char *job_id; /* in `keys` once valid, else borrowed from doc; NULL when unreadable */
    job_state state;
    int attempts; /* attempts made before this delivery (x-attempts) */
    /* wall ms of the job's first attempt (x-first-attempt), 0 before it: the
     * body of every attempt is built from it, so that all are identical */
    long long first_attempt_ms;
    int mark;          /* the outcome group publishes a record: mark it after */
    char *event;       /* the recorded outcome being recorded or published */
    json_t *event_doc; /* event as built by this process (NULL: text from Redis) */
    iw_code fail_code; /* job_fail's code and message, for a dead letter sent again */
    char *fail_msg;
    int bare_dead;     /* the dead letter was sent again without upstream headers */
    int claim_waits;   /* times it found another attempt's claim (logged once) */
    int token_retried; /* a 401 was retried once with a new token */
    int failing;       /* its recorded outcome is a failure (submission.failed) */
    char token[48];    /* this delivery's record owner token */
    /* its Redis keys (record, claim, first attempt: <ns>:<kind>:<jobId>),
     * "" until read from a valid delivery; one block, `keys`, sized to them,
     * ending with the jobId */
    const char *key, *claim, *first;
    char *keys;
    loop_timer hold;      /* while held */
    long long step_since; /* monotonic ms it began to wait for its Redis step */
    rt_outcome out;
    job *next; /* in one of the engine's record queues */
    job *prev_all, *next_all;
};

/* The parsed delivery (j->doc), parsed again from its body when a role has
 * dropped it: NULL only when out of memory (the body was valid at intake). */
json_t *job_doc(job *j);
/* Frees the parsed delivery once the role has read what it keeps from it: a
 * job in a call holds its delivery's bytes, not its ~1 KB jansson tree.
 * j->job_id stays (it lives with the keys). */
void job_drop_doc(job *j);

/* Registers a role: consumes its queue from the next connect. */
int engine_add_role(engine *e, const job_role *role, void *self);

void job_set_state(job *j, job_state s);
/* Records `event` (stolen, compact JSON text) as j's outcome; the role's
 * publish runs once it is recorded (or with the outcome recorded first). */
void job_record(job *j, char *event);
/* The same for an outcome built here: its text is dumped from doc, and doc
 * (a reference taken) stays with the job as j->event_doc, so that the role's
 * publish need not parse the text again. */
void job_record_doc(job *j, json_t *doc);
/* The next attempt after the retry schedule's gap, or failing with code
 * when the schedule is used up. */
void job_retry(job *j, iw_code code, const char *message, long http_status, int attempt);
/* The next attempt after delay_ms, whatever the retry schedule says (a
 * status check follows the poll schedule instead). */
void job_retry_in(job *j, iw_code code, long delay_ms, int attempt);
/* Waits wait_ms without using an attempt: held in memory when short, else
 * through the delay tiers. */
void job_wait(job *j, long wait_ms);
/* Ends j without success: submission.failed (when its jobId is known) and
 * a dead letter with the contract's headers; acked once both are confirmed. */
void job_fail(job *j, iw_code code, const char *message, long http_status, int attempts);
/* An outcome group: publishes gated together; the delivery is acked (after
 * the record is marked published, when `mark`) once all are confirmed. */
void job_outcome_begin(job *j);
void job_publish_event(job *j, const char *routing_key, const char *body, size_t len);
void job_publish_later(job *j, const char *target, const char *body, size_t len,
                       const json_t *headers, long delay_ms);
void job_outcome_seal(job *j, int mark);
/* The headers for sending j on (rt_onward_headers) with attempts. */
json_t *job_onward_headers(const job *j, int attempts, const char *last_error);

/* ---- the engine ------------------------------------------------------------------ */

engine *engine_new(runtime *rt, iw_error *err);
/* Frees every job still alive (their deliveries are void by then). */
void engine_free(engine *e);
records *engine_records(engine *e);
/* Jobs alive: received and not yet acked, returned or dropped. */
size_t engine_busy(engine *e);
/* The spec's "API down": the fleet saw IW_PROVIDER_DOWN_AFTER (3) or more
 * consecutive failures, reported within the last IW_BREAKER_OPEN (after
 * that, callers try the provider again so that the count can move). */
int engine_provider_down(const engine *e);
/* Stop: return every job that has not started a call (nack, requeue). */
void engine_stop(engine *e);
/* The broker connection was lost: every delivery is void; drop the jobs
 * that are not in a call or a Redis step (those finish and are dropped). */
void engine_link_lost(engine *e);

#endif
