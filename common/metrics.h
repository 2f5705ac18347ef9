/* Process metrics for /metrics (Prometheus text format) and the health
 * state behind /healthz and /readyz.
 *
 * The registry is process-wide on purpose: the loop thread updates it with
 * atomic operations and the admin HTTP thread only reads it, so neither
 * waits for the other.  Every label value is bounded: routes, roles, status
 * classes and reasons are enums with fixed names; error codes, job states and
 * rate tiers are small tables filled on first use with sanitised names (an
 * unknown or malformed name, or one past the table's size, counts as "OTHER"),
 * so nothing from outside can create a series.
 *
 * Every function below is cheap (a few atomic adds), never blocks the loop,
 * and ignores out-of-range enum values. */
#ifndef IW_METRICS_H
#define IW_METRICS_H

#include <stddef.h>

/* A provider route: the `route` label and the limiter class of a call. */
typedef enum iw_route {
    IW_ROUTE_SUBMIT,   /* "submit": POST /api/v1/external-resource */
    IW_ROUTE_STATUS,   /* "status": GET /api/v1/status/{trackingId} */
    IW_ROUTE_RESOURCE, /* "resource": GET /api/v1/external-resource/{id} */
    IW_ROUTE_TOKEN,    /* "token": POST /oauth/token */
    IW_N_ROUTES,
} iw_route;

/* A role: the `role` label. */
typedef enum iw_role {
    IW_ROLE_SUBMITTER,
    IW_ROLE_POLLER,
    IW_ROLE_RESOLVER,
    IW_N_ROLES,
} iw_role;

/* Passed as http_status to metrics_provider_request when no HTTP answer came. */
#define IW_CALL_NO_ANSWER 0    /* connection refused/reset, TLS, too large...: code="error" */
#define IW_CALL_TIMED_OUT (-1) /* IW_HTTP_TIMEOUT passed: code="timeout" */

/* Consecutive failed calls after which iw_provider_down is 1 (the spec's "API down"). */
#define IW_PROVIDER_DOWN_AFTER 3

/* Why a job's call is tried again (uses an attempt): the `reason` of iw_retries_total. */
typedef enum iw_retry_reason {
    IW_RETRY_SERVER_ERROR, /* "server_error": 5xx */
    IW_RETRY_TIMEOUT,      /* "timeout" */
    IW_RETRY_CONNECTION,   /* "connection": no answer (refused, reset, DNS, TLS) */
    IW_RETRY_UNAUTHORIZED, /* "token_refresh": 401 on a call with a token, refreshed once */
    IW_N_RETRY_REASONS,
} iw_retry_reason;

/* Why a job waits without using an attempt: the `reason` of iw_job_waits_total. */
typedef enum iw_wait_reason {
    IW_WAIT_RATE_LIMIT,   /* "rate_limit": our limiter refused a permit */
    IW_WAIT_PROVIDER_429, /* "provider_429": the provider's reset / fleet-wide pause */
    IW_WAIT_BREAKER,      /* "breaker": the breaker is open */
    IW_WAIT_MAINTENANCE,  /* "maintenance": a maintenance window */
    IW_WAIT_TOKEN,        /* "token": no OAuth token could be had */
    IW_N_WAIT_REASONS,
} iw_wait_reason;

/* Why the limiter refused a permit: the `reason` of iw_limiter_refusals_total. */
typedef enum iw_refusal {
    IW_REFUSAL_TIER,        /* "tier": a tier of IW_RATE_LIMITS is full */
    IW_REFUSAL_SHARE,       /* "share": the class's IW_*_SHARE binds while another waits */
    IW_REFUSAL_RESERVE,     /* "reserve": normal call above IW_RATE_ALERT (kept for critical) */
    IW_REFUSAL_PAUSE,       /* "pause": fleet-wide pause after a 429 */
    IW_REFUSAL_UNAVAILABLE, /* "unavailable": Redis unreachable, limiter fails closed */
    IW_N_REFUSALS,
} iw_refusal;

/* Terminal outcomes of a job or request: the `outcome` of iw_jobs_total. */
typedef enum iw_outcome {
    IW_OUTCOME_ACCEPTED,    /* "accepted": submission.accepted published */
    IW_OUTCOME_FINAL,       /* "final": status.final published */
    IW_OUTCOME_FAILED,      /* "failed": submission.failed + dead letter */
    IW_OUTCOME_DEAD,        /* "dead": dead letter alone (unreadable input) */
    IW_OUTCOME_ANSWERED,    /* "answered": resolver reply published */
    IW_OUTCOME_INVALIDATED, /* "invalidated": resource.invalidate done */
    IW_N_OUTCOMES,
} iw_outcome;

/* What happened to a delivery: iw_deliveries_total{role,action}. */
typedef enum iw_delivery_action {
    IW_DELIVERY_RECEIVED, /* "received": a delivery was taken from the role's queue */
    IW_DELIVERY_ACKED,    /* "acked": basic.ack sent (after its outcome was confirmed) */
    IW_DELIVERY_DELAYED,  /* "delayed": moved to a delay tier (then acked: counts both) */
    IW_DELIVERY_REQUEUED, /* "requeued": nack/requeue or returned by a lost connection */
    IW_N_DELIVERY,
} iw_delivery_action;

/* Resolver cache events: iw_cache_lookups_total{result} and iw_cache_coalesced_total. */
typedef enum iw_cache_event {
    IW_CACHE_HIT,          /* "hit" */
    IW_CACHE_NEGATIVE_HIT, /* "negative_hit": a remembered 404 */
    IW_CACHE_MISS,         /* "miss": went to the provider (or joined a flight) */
    IW_CACHE_STALE,        /* "stale": answered from the stale copy (outage, maintenance) */
    IW_CACHE_COALESCED,    /* a miss that joined another look-up's flight */
    IW_N_CACHE_EVENTS,
} iw_cache_event;

/* Outcome of one status check: iw_status_checks_total{outcome}. */
typedef enum iw_check_outcome {
    IW_CHECK_UNCHANGED, /* "unchanged": same status, re-scheduled */
    IW_CHECK_PROGRESS,  /* "progress": status.progress published */
    IW_CHECK_FINAL,     /* "final": terminal status, status.final published */
    IW_CHECK_RETRY,     /* "retry": the check failed (5xx, timeout, 429, breaker), re-scheduled */
    IW_CHECK_EXPIRED,   /* "expired": IW_POLL_MAX_AGE reached */
    IW_CHECK_NOT_FOUND, /* "not_found": the provider does not know the tracking id */
    IW_N_CHECK_OUTCOMES,
} iw_check_outcome;

/* ---- provider calls ---------------------------------------------------- */

/* One finished provider call: http_status is the HTTP status, or IW_CALL_TIMED_OUT /
 * IW_CALL_NO_ANSWER. Counts iw_provider_requests_total{route,code} (code 2xx, 3xx, 4xx,
 * 429, 5xx, timeout, error), the duration histogram, and this process's consecutive
 * failures (5xx, timeout, no answer raise it; any other answer resets it). */
void metrics_provider_request(iw_route route, long http_status, long long duration_us);
/* The shared breaker as just read from Redis (never a cached copy: the call stamps it as
 * fresh): state 0 closed, 1 open, 2 half-open; fleet_failures is its consecutive-failure
 * count (-1 when unknown), which then drives iw_provider_down instead of this process's
 * own count. Call whenever the breaker script answers; unrefreshed for 60 s, the state
 * is no longer exported. */
void metrics_breaker(int state, int fleet_failures);
/* Calls in flight in this process (curl handles). */
void metrics_in_flight(int calls);
/* A call is tried again (one attempt used), on route, for reason. */
void metrics_retry(iw_route route, iw_retry_reason reason);
/* A job of role waits without using an attempt. */
void metrics_job_wait(iw_role role, iw_wait_reason reason);

/* ---- limiter ----------------------------------------------------------- */

/* Declares the rate tiers in IW_RATE_LIMITS order, by their settings text ("50/min").
 * Call once at start-up; later calls are ignored. At most 8 tiers are shown. */
void metrics_limiter_tiers(const char *const *names, size_t n);
/* Usage of tier i (index into the declared tiers) in permille of its limit, as the
 * limiter script just returned it (at every permit; unrefreshed for 60 s, not exported). */
void metrics_limiter_tier_usage(size_t i, int permille);
/* 1 while normal calls are held back because a tier is above IW_RATE_ALERT. */
void metrics_throttling(int active);
/* The limiter refused a permit of class cls and said to wait wait_ms (-1 unknown). */
void metrics_limiter_refused(iw_route cls, iw_refusal reason, long long wait_ms);

/* ---- jobs -------------------------------------------------------------- */

/* A delivery of role's queue was received / acked / delayed / requeued. */
void metrics_delivery(iw_role role, iw_delivery_action what);
/* A job or request of role ended with outcome (exactly once per job). */
void metrics_job_outcome(iw_role role, iw_outcome outcome);
/* A job of role entered state (a static name from the engine's state table, [a-z_],
 * at most 24 distinct; others count as "other").  The name is remembered by
 * its address too: pass names that live as long as the process and never
 * change (the same text at another address counts the same). */
void metrics_job_transition(iw_role role, const char *state);
/* Declares the error codes (the status table's names) so that every
 * iw_dead_letters_total series exists at 0 from the start; at most 48 codes. */
void metrics_dead_letter_codes(const char *const *codes, size_t n);
/* A message of role was dead-lettered with code ([A-Z0-9_], else "OTHER"). */
void metrics_dead_letter_role(iw_role role, const char *code);
/* A message that came back from a delay tier, late_ms after its due time (x-due-at);
 * negative values (early: re-delayed) are ignored. */
void metrics_delay_returned(long long late_ms);

/* ---- resolver and poller ----------------------------------------------- */

/* One resolver look-up's cache result (a coalesced miss counts MISS and COALESCED). */
void metrics_cache(iw_cache_event event);
/* One finished status check of the poller. */
void metrics_status_check(iw_check_outcome outcome);
/* 1 while now is inside one of IW_MAINTENANCE_WINDOWS. */
void metrics_maintenance(int active);

/* ---- health ------------------------------------------------------------ */

/* A readiness report: the broker and Redis as last probed. Stamps the report with
 * the monotonic clock; /readyz is 503 when the last report is older than
 * IW_READY_FRESH_MS, so the caller must probe (Redis PING, AMQP socket) and report at
 * least every second, busy or idle. */
void metrics_connections(int amqp_up, int redis_up);
#define IW_READY_FRESH_MS 5000
/* 1 from the moment a graceful stop begins: /readyz turns 503 at once. */
void metrics_stopping(int stopping);
/* The loop calls this every turn; /healthz fails when it stops turning. */
void metrics_heartbeat(long long mono_ms);

/* Renders the Prometheus text exposition into a malloc'd string (NULL: no memory). The
 * gauges that mirror shared state (iw_breaker_state, iw_limiter_usage_ratio,
 * iw_provider_consecutive_failures, iw_provider_down) are left out when this process has
 * not refreshed them for 60 s, so an idle pod's old view cannot hold an alert up. */
char *metrics_render(void);
/* metrics_render as of a given monotonic time (tests). */
char *metrics_render_at(long long now_mono_ms);
/* 1 while the loop's last heartbeat is less than 30 s old (/healthz). */
int metrics_live(long long now_mono_ms);
/* 1 when the last readiness report is fresh, says both links are up, and we are not
 * stopping; otherwise 0 and, if why is non-NULL, a static reason. */
int metrics_ready(long long now_mono_ms, const char **why);

/* Tests only: zeroes every counter and forgets the label tables. */
void metrics_reset(void);

/* ---- deprecated: today's callers, until the job engine calls the above ---- */

/* Use metrics_provider_request; status 0 is IW_CALL_NO_ANSWER; breaker_failure unused. */
void metrics_provider_call(iw_route route, long status, long long duration_us, int breaker_failure);
/* Use metrics_job_outcome: maps ("submitter", "accepted"|"failed"|...) to the enums. */
void metrics_job(const char *role, const char *outcome);
/* Use metrics_dead_letter_role; counted under role "unknown". */
void metrics_dead_letter(const char *code);
/* Use metrics_limiter_tier_usage: the highest tier's usage, shown as tier="all" until
 * tiers are declared with metrics_limiter_tiers. */
void metrics_limiter_usage(int permille);

#endif
