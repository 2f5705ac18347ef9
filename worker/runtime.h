/* The process runtime: one reactor that services the AMQP socket, libcurl's
 * sockets and the roles' deadlines on one thread, plus the connections every
 * role shares (broker, Redis, provider) and the helpers that publish a job's
 * outcome with publisher confirms.
 *
 * A role registers the queue it consumes and a few callbacks; it owns its
 * jobs and never talks to a protocol library directly. */
#ifndef IW_RUNTIME_H
#define IW_RUNTIME_H

#include <jansson.h>
#include <stddef.h>

#include "amqp_link.h"
#include "config.h"
#include "http_client.h"
#include "limiter.h"
#include "metrics.h"
#include "loop.h"
#include "redis_link.h"
#include "schema.h"

typedef struct runtime runtime;

/* A queue the process consumes. */
typedef struct rt_role {
    const char *name;         /* "submitter", also the consumer tag prefix */
    const char *queue_suffix; /* consumed queue: <ns>.<suffix> */
    void *self;
    /* A delivery of this queue; the callee takes ownership. */
    void (*on_delivery)(void *self, iw_delivery *d);
} rt_role;

/* Something that holds deliveries (the job engine, the resolver): what the
 * runtime tells it about the broker connection and the shutdown. */
typedef struct rt_service {
    void *self;
    /* The broker connection was lost: every delivery held is void (the
     * broker requeues them); drop the work that is not in a provider call. */
    void (*on_link_lost)(void *self);
    /* Shutdown began: return work that has not started (nack, requeue). */
    void (*on_stop)(void *self);
    /* Deliveries alive (received but not yet acked or dropped). */
    size_t (*busy)(void *self);
    /* The runtime is being freed (after the broker link): free what is left.
     * May be NULL. */
    void (*on_exit)(void *self);
} rt_service;

/* A group of publishes whose confirms gate one decision (usually: ack the
 * delivery).  `done` runs once, after the group is sealed and every publish
 * is confirmed (ok = 1) or one failed (ok = 0). */
typedef struct rt_outcome {
    int pending;
    int failed;
    int status; /* the first failure's status (IW_ERR_AMQP_ENCODE...), IW_OK */
    int sealed;
    void (*done)(void *owner, int ok);
    void *owner;
} rt_outcome;

runtime *runtime_new(iw_config *cfg, const char *process_name, iw_error *err);
void runtime_free(runtime *rt);
int runtime_add_role(runtime *rt, const rt_role *role);
int runtime_add_service(runtime *rt, const rt_service *svc);
/* Runs until SIGTERM/SIGINT and a graceful drain; returns the exit code. */
int runtime_run(runtime *rt);

const iw_config *rt_config(const runtime *rt);
loop *rt_loop(runtime *rt);
http_client *rt_http(runtime *rt);
limiter *rt_limiter(runtime *rt);
redis_link *rt_redis(runtime *rt);
int rt_stopping(const runtime *rt);
/* "<ns>.<suffix>" (a static per-call buffer is not used: pass one). */
const char *rt_name(const runtime *rt, char *buf, size_t len, const char *suffix);
/* Loads schemas/<file> from IW_SCHEMA_DIR. */
iw_schema *rt_load_schema(const runtime *rt, const char *file, iw_error *err);

/* True when Redis is connected, reconnecting at most once a second; the
 * limiter fails closed while this is false. */
int rt_redis_ready(runtime *rt);
/* The delivery belongs to the current broker connection (it can be acked). */
int rt_delivery_live(const runtime *rt, const iw_delivery *d);
void rt_ack(runtime *rt, const iw_delivery *d);
void rt_nack(runtime *rt, const iw_delivery *d, int requeue);

void rt_outcome_begin(rt_outcome *o, void (*done)(void *owner, int ok), void *owner);
/* Publishes an event on <ns>.events: body (borrowed) with the job's jobId as
 * correlation_id. */
void rt_publish_event(runtime *rt, rt_outcome *o, const char *routing_key, const json_t *body,
                      const char *job_id);
/* The same with the body already serialized (borrowed). */
void rt_publish_event_text(runtime *rt, rt_outcome *o, const char *routing_key, const char *body,
                           size_t len, const char *job_id);
/* Publishes an RPC reply: body (borrowed) to the default exchange with
 * routing key reply_to and the request's correlation_id (NULL omits it);
 * transient, since the caller waits for it now or not at all. */
void rt_publish_reply(runtime *rt, rt_outcome *o, const char *reply_to, const char *correlation_id,
                      const json_t *body);
/* Dead-letters d's original body to <ns>.dlx with the contract's headers.
 * http_status <= 0 omits x-http-status. */
void rt_publish_dead(runtime *rt, rt_outcome *o, const iw_delivery *d, iw_role role,
                     const char *queue_suffix, const char *code, const char *message,
                     long http_status, int attempts);
/* Ends a job without success: submission.failed (when job_id is known)
 * and the dead letter of d, in group o. */
/* The same; forward = 0 leaves the upstream's headers out (only the
 * contract's), for a message whose own headers cannot be encoded again. */
void rt_publish_dead_headers(runtime *rt, rt_outcome *o, const iw_delivery *d, iw_role role,
                             const char *queue_suffix, const char *code, const char *message,
                             long http_status, int attempts, int forward);
void rt_publish_failure(runtime *rt, rt_outcome *o, const iw_delivery *d, iw_role role,
                        const char *queue_suffix, const char *job_id, const char *code,
                        const char *message, long http_status, int attempts);
/* The spec's error object {code, message, statusCode, retryAttempt} (new). */
json_t *rt_error_object(const char *code, const char *message, long http_status, int attempts);
/* Headers for sending d on through the broker (a retry or a long wait):
 * rt_forward_headers plus x-attempts, x-original-routing-key and
 * x-first-seen when absent, and x-last-error (removed when NULL). */
json_t *rt_onward_headers(const iw_delivery *d, int attempts, const char *last_error);
/* Sends a message back to <ns>.<target> after delay_ms through the delay
 * tiers (0: at once through the retry exchange).  `headers` (borrowed) gets
 * iw-target and x-due-at added in a copy. */
void rt_publish_delayed(runtime *rt, rt_outcome *o, const char *target, const char *body,
                        size_t len, const char *correlation_id, const json_t *headers,
                        long delay_ms);
/* Seals the group: `done` runs when the last confirm arrives (or now). */
void rt_outcome_seal(rt_outcome *o);

/* A copy (new reference) of a delivery's headers without the broker's
 * dead-letter history, which would otherwise grow with every hop through a
 * delay tier. */
json_t *rt_forward_headers(const iw_delivery *d);

/* Header helpers over a delivery's headers. */
long long rt_header_int(const iw_delivery *d, const char *name, long long def);
const char *rt_header_str(const iw_delivery *d, const char *name);

#endif
