/* The job mechanics the submitter and the poller share: a job's common part,
 * its FIFOs, the queues of jobs waiting for a permit (deferred in memory or
 * ready), deferral, sending a delivery on through the delay tiers, and the
 * common steps of intake and of logging a provider call.
 *
 * A role's job struct embeds `job` as its FIRST member, so that a job * and
 * the role's job * are the same address: callbacks that take a `void *owner`
 * receive either.  What to call, how to classify and what to publish stay in
 * the roles. */
#ifndef IW_JOB_H
#define IW_JOB_H

#include "http_client.h"
#include "jobheap.h"
#include "retry.h"
#include "runtime.h"

typedef struct job {
    iw_delivery *d;
    json_t *doc;
    const char *job_id; /* borrowed from doc; NULL when unreadable */
    int critical;
    int attempts;      /* from x-attempts: attempts made before this delivery */
    int state;         /* an index into the role's state names */
    jobheap_node node; /* in job_queues.deferred while deferred */
    rt_outcome out;
    struct job *next; /* in at most one job_fifo */
} job;

/* Frees a role's job (the `owner` is the role's job struct). */
typedef void job_free_fn(void *owner);
/* Sends a role's job on through the delay tiers after delay_ms. */
typedef void job_send_on_fn(void *owner, long delay_ms, int attempts, const char *last_error);

typedef struct job_fifo {
    job *head, *tail;
} job_fifo;

void job_fifo_push(job_fifo *q, job *j);
void job_fifo_push_front(job_fifo *q, job *j);
/* The oldest job, or NULL. */
job *job_fifo_pop(job_fifo *q);

/* Jobs waiting for a permit; the queues never own them. */
typedef struct job_queues {
    jobheap deferred;  /* waiting in memory, delivery unacked */
    job_fifo ready[2]; /* [0] critical first, [1] normal */
} job_queues;

/* Queues j behind the ready jobs of its class. */
void job_queues_ready(job_queues *q, job *j);
/* True when a job is ready. */
int job_queues_any_ready(const job_queues *q);
/* Moves the deferred jobs due at `now` (monotonic ms) to their ready FIFO,
 * setting their state to `ready_state`. */
void job_queues_due(job_queues *q, long long now, int ready_state);
/* The monotonic ms at which the first deferred job is due; LLONG_MAX: none. */
long long job_queues_next_due(const job_queues *q);
/* Frees the ready jobs, nacking their deliveries (requeue) when `nack`. */
void job_queues_drop_ready(job_queues *q, runtime *rt, int nack, job_free_fn *free_job);
/* The same for the deferred and the ready jobs. */
void job_queues_drop(job_queues *q, runtime *rt, int nack, job_free_fn *free_job);
/* Releases the queues' storage; drop the jobs first. */
void job_queues_clear(job_queues *q);

/* Waits without using an attempt: in memory in state `deferred_state`
 * (delivery unacked) when wait_ms <= hold_max_ms, else (or without memory
 * for the heap) through send_on with the job's attempts unchanged. */
void job_defer(job_queues *q, job *j, long wait_ms, long hold_max_ms, int deferred_state,
               job_send_on_fn *send_on);
/* Publishes j's delivery, unchanged but for rt_onward_headers, to the queue
 * <ns>.<target> after delay_ms; `done` (owner j) runs on the confirm.  The
 * caller sets j's state first: `done` may run before this returns. */
void job_send_on(job *j, runtime *rt, const char *target, long delay_ms, int attempts,
                 const char *last_error, void (*done)(void *owner, int ok));
/* The end of a job's outcome group: acks the delivery when ok, else logs
 * `message` with the job's state name and nacks it (requeue).  The caller
 * frees the job. */
void job_settle(job *j, runtime *rt, int ok, const char *state_name, const char *message);

/* Intake of j's delivery: attempts from x-attempts (>= 0), then rt_intake
 * into j->doc (see rt_intake for code and msg). */
int job_intake(job *j, const runtime *rt, const iw_schema *schema, const char **code, char *msg,
               size_t msg_len);
/* The job's jobId and priority class from its validated document. */
void job_read_ids(job *j);
/* When d came back from a delay tier early (x-due-at more than
 * IW_DELAY_SLACK_MS ahead), the ms left before it is due; else 0. */
long job_early_ms(const iw_delivery *d);

/* Adds the fields every provider-call log line has (operation, duration,
 * status, attempt) to f. */
void job_call_fields(json_t *f, const char *operation, const http_response *r, int attempt);
/* Adds the error object of a call that was not accepted and logs f (stolen)
 * at the verdict's level. */
void job_log_call(json_t *f, const http_response *r, const iw_verdict *v, int attempt);

/* The jobId of a job that failed intake, for its submission.failed: any
 * non-empty string (128 characters may take up to 512 bytes); NULL when the
 * body has none. Borrowed from doc. */
const char *job_readable_id(const json_t *doc);

#endif
