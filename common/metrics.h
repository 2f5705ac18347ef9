/* Process metrics for /metrics (Prometheus text format) and the health
 * state behind /healthz and /readyz.
 *
 * The registry is process-wide on purpose: the loop thread updates it with
 * atomic operations and the admin HTTP thread only reads it, so neither
 * waits for the other.  Label sets are fixed tables (routes, statuses) or
 * small tables filled on first use (outcomes, error codes). */
#ifndef IW_METRICS_H
#define IW_METRICS_H

#include <stddef.h>

typedef enum iw_route {
    IW_ROUTE_SUBMIT,   /* POST /external-resource */
    IW_ROUTE_STATUS,   /* GET /status/{trackingId} */
    IW_ROUTE_RESOURCE, /* GET /external-resource/{id} */
    IW_N_ROUTES,
} iw_route;

/* One provider call: status 0 for a transport error (timeout, connection). */
void metrics_provider_call(iw_route route, long status, long long duration_us, int breaker_failure);
/* A job or request outcome of a role, e.g. ("submitter", "accepted"). */
void metrics_job(const char *role, const char *outcome);
/* A job of `role` entered `state` (the engine's state names). */
void metrics_job_state(const char *role, const char *state);
void metrics_dead_letter(const char *code);
void metrics_limiter_usage(int permille);
void metrics_breaker_state(iw_route route, int state); /* 0 closed, 1 open, 2 half-open */
void metrics_connections(int amqp_up, int redis_up);
void metrics_in_flight(int calls);
void metrics_stopping(int stopping);
/* The loop calls this every turn; /healthz fails when it stops turning. */
void metrics_heartbeat(long long mono_ms);

/* Renders the Prometheus text exposition into a malloc'd string. */
char *metrics_render(void);
int metrics_live(long long now_mono_ms);
int metrics_ready(void);

#endif
