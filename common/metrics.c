#include "metrics.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"

#ifndef IW_VERSION
#define IW_VERSION "unknown"
#endif

#define HEARTBEAT_STALE_MS 30000
/* Gauges that mirror shared state (breaker, limiter tiers, consecutive failures) are only
 * exported while this process's knowledge is at most this old: an idle pod would
 * otherwise report the last state it saw forever and hold an alert up. */
#define KNOWLEDGE_STALE_MS 60000
#define MAX_TIERS 8
#define TIER_NAME_LEN 32
#define MAX_STATES 24
#define STATE_NAME_LEN 25
#define MAX_CODES 48
#define CODE_NAME_LEN 64
#define ROLE_UNKNOWN IW_N_ROLES /* the deprecated metrics_dead_letter's callers */
#define N_ROLE_SLOTS (IW_N_ROLES + 1)

/* Bucket bounds in µs (exact integer comparisons; rendered in seconds). The duration
 * buckets crowd around the spec's 200 ms typical and 1 s alert threshold so that
 * histogram_quantile(0.95, ...) is accurate where the alert decides. */
static const long long dur_bounds[] = {10000,   25000,   50000,   100000,  150000,
                                       200000,  300000,  500000,  750000,  1000000,
                                       1500000, 2000000, 3000000, 5000000, 10000000};
#define N_DUR (sizeof dur_bounds / sizeof dur_bounds[0])
static const long long wait_bounds[] = {10000,    50000,     100000,    250000,      500000,
                                        1000000,  2500000,   5000000,   10000000,    30000000,
                                        60000000, 300000000, 900000000, 3600000000LL};
#define N_WAIT (sizeof wait_bounds / sizeof wait_bounds[0])
static const long long late_bounds[] = {50000,   100000,   250000,   500000,   1000000,  2500000,
                                        5000000, 10000000, 30000000, 60000000, 300000000};
#define N_LATE (sizeof late_bounds / sizeof late_bounds[0])

_Static_assert(N_DUR < 16 && N_WAIT < 16 && N_LATE < 16, "hist has 16 slots");

static const char *const route_names[IW_N_ROUTES] = {"submit", "status", "resource", "token"};
static const char *const role_names[N_ROLE_SLOTS] = {"submitter", "poller", "resolver", "unknown"};
enum { CODE_2XX, CODE_3XX, CODE_4XX, CODE_429, CODE_5XX, CODE_TIMEOUT, CODE_ERROR, N_CODES };
static const char *const code_names[N_CODES] = {"2xx", "3xx",     "4xx",  "429",
                                                "5xx", "timeout", "error"};
static const char *const retry_names[IW_N_RETRY_REASONS] = {"server_error", "timeout", "connection",
                                                            "token_refresh"};
static const char *const wait_names[IW_N_WAIT_REASONS] = {"rate_limit", "provider_429", "breaker",
                                                          "maintenance", "token"};
static const char *const refusal_names[IW_N_REFUSALS] = {"tier", "share", "reserve", "pause",
                                                         "unavailable"};
static const char *const outcome_names[IW_N_OUTCOMES] = {"accepted", "final",    "failed",
                                                         "dead",     "answered", "invalidated"};
static const char *const delivery_names[IW_N_DELIVERY] = {"received", "acked", "delayed",
                                                          "requeued"};
static const char *const cache_names[IW_N_CACHE_EVENTS] = {"hit", "negative_hit", "miss", "stale",
                                                           "coalesced"};
static const char *const check_names[IW_N_CHECK_OUTCOMES] = {"unchanged", "progress", "final",
                                                             "retry",     "expired",  "not_found"};

/* A histogram: non-cumulative bucket counts plus the overflow, cumulated when rendered
 * so that a scrape racing a write still shows monotonic buckets and +Inf == _count. */
typedef struct hist {
    atomic_llong n[16];
    atomic_llong sum_us;
} hist;

/* A table of names filled on first use; the loop thread adds, the HTTP thread reads
 * `count` first (published after the name is written). */
typedef struct name_table {
    atomic_int count;
    char names[MAX_CODES][CODE_NAME_LEN];
} name_table;

static struct {
    atomic_llong requests[IW_N_ROUTES][N_CODES];
    hist duration[IW_N_ROUTES];
    atomic_int local_failures, fleet_failures, breaker_state, in_flight;
    atomic_llong last_call_ms, breaker_ms; /* when they were last reported (monotonic) */
    atomic_llong retries[IW_N_ROUTES][IW_N_RETRY_REASONS];
    atomic_llong waits[IW_N_ROLES][IW_N_WAIT_REASONS];

    atomic_int n_tiers, legacy_usage, legacy_set, throttling;
    char tier_names[MAX_TIERS][TIER_NAME_LEN];
    atomic_int tier_usage[MAX_TIERS];
    atomic_llong tier_ms[MAX_TIERS], legacy_ms;
    atomic_llong refusals[IW_N_ROUTES][IW_N_REFUSALS];
    hist limiter_wait[IW_N_ROUTES];

    atomic_llong deliveries[IW_N_ROLES][IW_N_DELIVERY];
    atomic_llong outcomes[IW_N_ROLES][IW_N_OUTCOMES];
    name_table states;
    /* the address each state was last counted by: the engine passes the
     * static names of its state table, found again without a strcmp */
    _Atomic(const char *) state_ptrs[MAX_STATES];
    atomic_llong transitions[IW_N_ROLES][MAX_STATES + 1]; /* last: "other" */
    name_table codes;
    atomic_llong dead[N_ROLE_SLOTS][MAX_CODES + 1]; /* last: "OTHER" */
    hist delay_late;

    atomic_llong cache[IW_N_CACHE_EVENTS];
    atomic_llong checks[IW_N_CHECK_OUTCOMES];
    atomic_int maintenance;

    atomic_int amqp_up, redis_up, stopping;
    atomic_llong ready_report_ms, heartbeat_ms;
    pthread_mutex_t lock; /* only for adding a name to a table */
} m = {.lock = PTHREAD_MUTEX_INITIALIZER, .fleet_failures = -1};

static int valid(const char *s, const char *alphabet, size_t max)
{
    size_t n = s ? strlen(s) : 0;
    return n > 0 && n <= max && strspn(s, alphabet) == n;
}

/* Index of name in t, adding it when there is room; `cap` (the "other" slot) when the
 * table is full or name is malformed. */
static int name_index(name_table *t, int cap, const char *name, const char *alphabet, size_t maxlen)
{
    int count, i, idx = cap;

    if (!name)
        return cap;
    /* a name in the table was checked when it was added: the check (a
     * strspn) is for new names only, not for every count */
    count = atomic_load(&t->count);
    for (i = 0; i < count; i++)
        if (!strcmp(t->names[i], name))
            return i;
    if (!valid(name, alphabet, maxlen))
        return cap;
    pthread_mutex_lock(&m.lock);
    count = atomic_load(&t->count);
    for (i = 0; i < count; i++)
        if (!strcmp(t->names[i], name))
            break;
    if (i < count) {
        idx = i;
    } else if (count < cap) {
        memcpy(t->names[count], name, strlen(name) + 1);
        atomic_store(&t->count, count + 1); /* publish after the name is written */
        idx = count;
    }
    pthread_mutex_unlock(&m.lock);
    return idx;
}

#define UPPER_CODE "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
#define LOWER_STATE "abcdefghijklmnopqrstuvwxyz_"

static void hist_observe(hist *h, const long long *bounds, size_t n, long long us)
{
    size_t i = 0;

    if (us < 0)
        us = 0;
    while (i < n && us > bounds[i])
        i++;
    atomic_fetch_add(&h->n[i], 1);
    atomic_fetch_add(&h->sum_us, us);
}

static int code_class(long http_status)
{
    if (http_status == IW_CALL_TIMED_OUT)
        return CODE_TIMEOUT;
    if (http_status == 429)
        return CODE_429;
    if (http_status >= 200 && http_status < 300)
        return CODE_2XX;
    if (http_status >= 300 && http_status < 400)
        return CODE_3XX;
    if (http_status >= 400 && http_status < 500)
        return CODE_4XX;
    if (http_status >= 500 && http_status < 600)
        return CODE_5XX;
    return CODE_ERROR;
}

void metrics_provider_request(iw_route route, long http_status, long long duration_us)
{
    int c = code_class(http_status);

    if ((unsigned)route >= IW_N_ROUTES)
        return;
    atomic_fetch_add(&m.requests[route][c], 1);
    hist_observe(&m.duration[route], dur_bounds, N_DUR, duration_us);
    /* The breaker's notion of failure: 5xx, timeouts, no answer; 429 and 4xx are answers. */
    if (c == CODE_5XX || c == CODE_TIMEOUT || c == CODE_ERROR)
        atomic_fetch_add(&m.local_failures, 1);
    else
        atomic_store(&m.local_failures, 0);
    atomic_store(&m.last_call_ms, clock_mono_ms());
}

void metrics_breaker(int state, int fleet_failures)
{
    if (state >= 0 && state <= 2)
        atomic_store(&m.breaker_state, state);
    atomic_store(&m.fleet_failures, fleet_failures < 0 ? -1 : fleet_failures);
    atomic_store(&m.breaker_ms, clock_mono_ms());
}

void metrics_in_flight(int calls)
{
    atomic_store(&m.in_flight, calls);
}

void metrics_retry(iw_route route, iw_retry_reason reason)
{
    if ((unsigned)route < IW_N_ROUTES && (unsigned)reason < IW_N_RETRY_REASONS)
        atomic_fetch_add(&m.retries[route][reason], 1);
}

void metrics_job_wait(iw_role role, iw_wait_reason reason)
{
    if ((unsigned)role < IW_N_ROLES && (unsigned)reason < IW_N_WAIT_REASONS)
        atomic_fetch_add(&m.waits[role][reason], 1);
}

void metrics_limiter_tiers(const char *const *names, size_t n)
{
    pthread_mutex_lock(&m.lock);
    if (atomic_load(&m.n_tiers) == 0) {
        size_t k = n < MAX_TIERS ? n : MAX_TIERS;
        for (size_t i = 0; i < k; i++) {
            /* The settings text ("50/min", "20/10s") is already parsed, but still only
             * a safe alphabet reaches a label. */
            if (valid(names[i], "abcdefghijklmnopqrstuvwxyz0123456789/.", TIER_NAME_LEN - 1))
                memcpy(m.tier_names[i], names[i], strlen(names[i]) + 1);
            else
                snprintf(m.tier_names[i], TIER_NAME_LEN, "tier%zu", i);
        }
        atomic_store(&m.n_tiers, (int)k);
    }
    pthread_mutex_unlock(&m.lock);
}

void metrics_limiter_tier_usage(size_t i, int permille)
{
    if (i < MAX_TIERS) {
        atomic_store(&m.tier_usage[i], permille < 0 ? 0 : permille);
        atomic_store(&m.tier_ms[i], clock_mono_ms());
    }
}

void metrics_throttling(int active)
{
    atomic_store(&m.throttling, !!active);
}

void metrics_limiter_refused(iw_route cls, iw_refusal reason, long long wait_ms)
{
    if ((unsigned)cls >= IW_N_ROUTES || (unsigned)reason >= IW_N_REFUSALS)
        return;
    atomic_fetch_add(&m.refusals[cls][reason], 1);
    if (wait_ms >= 0)
        hist_observe(&m.limiter_wait[cls], wait_bounds, N_WAIT, wait_ms * 1000);
}

void metrics_delivery(iw_role role, iw_delivery_action what)
{
    if ((unsigned)role < IW_N_ROLES && (unsigned)what < IW_N_DELIVERY)
        atomic_fetch_add(&m.deliveries[role][what], 1);
}

void metrics_job_outcome(iw_role role, iw_outcome outcome)
{
    if ((unsigned)role < IW_N_ROLES && (unsigned)outcome < IW_N_OUTCOMES)
        atomic_fetch_add(&m.outcomes[role][outcome], 1);
}

void metrics_job_transition(iw_role role, const char *state)
{
    int i, n;

    if ((unsigned)role >= IW_N_ROLES)
        return;
    n = atomic_load(&m.states.count);
    for (i = 0; i < n; i++)
        if (state && atomic_load_explicit(&m.state_ptrs[i], memory_order_relaxed) == state)
            break;
    if (i == n) {
        i = name_index(&m.states, MAX_STATES, state, LOWER_STATE, STATE_NAME_LEN - 1);
        if (i < MAX_STATES)
            atomic_store_explicit(&m.state_ptrs[i], state, memory_order_relaxed);
    }
    atomic_fetch_add(&m.transitions[role][i], 1);
}

void metrics_dead_letter_codes(const char *const *codes, size_t n)
{
    for (size_t i = 0; i < n; i++)
        (void)name_index(&m.codes, MAX_CODES, codes[i], UPPER_CODE, CODE_NAME_LEN - 1);
}

static void dead_letter(int role, const char *code)
{
    int i = name_index(&m.codes, MAX_CODES, code, UPPER_CODE, CODE_NAME_LEN - 1);
    atomic_fetch_add(&m.dead[role][i], 1);
}

void metrics_dead_letter_role(iw_role role, const char *code)
{
    if ((unsigned)role < IW_N_ROLES)
        dead_letter((int)role, code);
}

void metrics_delay_returned(long long late_ms)
{
    if (late_ms >= 0)
        hist_observe(&m.delay_late, late_bounds, N_LATE, late_ms * 1000);
}

void metrics_cache(iw_cache_event event)
{
    if ((unsigned)event < IW_N_CACHE_EVENTS)
        atomic_fetch_add(&m.cache[event], 1);
}

void metrics_status_check(iw_check_outcome outcome)
{
    if ((unsigned)outcome < IW_N_CHECK_OUTCOMES)
        atomic_fetch_add(&m.checks[outcome], 1);
}

void metrics_maintenance(int active)
{
    atomic_store(&m.maintenance, !!active);
}

void metrics_connections(int amqp_up, int redis_up)
{
    atomic_store(&m.amqp_up, amqp_up);
    atomic_store(&m.redis_up, redis_up);
    atomic_store(&m.ready_report_ms, clock_mono_ms());
}

void metrics_stopping(int stopping)
{
    atomic_store(&m.stopping, stopping);
}

void metrics_heartbeat(long long mono_ms)
{
    atomic_store(&m.heartbeat_ms, mono_ms);
}

int metrics_live(long long now_mono_ms)
{
    long long hb = atomic_load(&m.heartbeat_ms);
    return hb && now_mono_ms - hb < HEARTBEAT_STALE_MS;
}

int metrics_ready(long long now_mono_ms, const char **why)
{
    long long at = atomic_load(&m.ready_report_ms);
    const char *reason = NULL;

    if (atomic_load(&m.stopping))
        reason = "stopping";
    else if (!at || now_mono_ms - at > IW_READY_FRESH_MS)
        reason = "no fresh readiness report (event loop stalled or not probing)";
    else if (!atomic_load(&m.amqp_up))
        reason = "broker unavailable";
    else if (!atomic_load(&m.redis_up))
        reason = "Redis unavailable";
    if (why)
        *why = reason;
    return reason == NULL;
}

static void reset_hist(hist *h)
{
    for (size_t i = 0; i < sizeof h->n / sizeof h->n[0]; i++)
        atomic_store(&h->n[i], 0);
    atomic_store(&h->sum_us, 0);
}

#define ZERO(arr)                                                                                  \
    do {                                                                                           \
        atomic_llong *p_ = (atomic_llong *)(arr);                                                  \
        for (size_t i_ = 0; i_ < sizeof(arr) / sizeof(atomic_llong); i_++)                         \
            atomic_store(&p_[i_], 0);                                                              \
    } while (0)

void metrics_reset(void)
{
    pthread_mutex_lock(&m.lock);
    ZERO(m.requests);
    ZERO(m.retries);
    ZERO(m.waits);
    ZERO(m.refusals);
    ZERO(m.deliveries);
    ZERO(m.outcomes);
    ZERO(m.transitions);
    ZERO(m.dead);
    ZERO(m.cache);
    ZERO(m.checks);
    for (int r = 0; r < IW_N_ROUTES; r++) {
        reset_hist(&m.duration[r]);
        reset_hist(&m.limiter_wait[r]);
    }
    reset_hist(&m.delay_late);
    atomic_store(&m.local_failures, 0);
    atomic_store(&m.fleet_failures, -1);
    atomic_store(&m.breaker_state, 0);
    atomic_store(&m.last_call_ms, 0);
    atomic_store(&m.breaker_ms, 0);
    atomic_store(&m.legacy_ms, 0);
    atomic_store(&m.in_flight, 0);
    atomic_store(&m.n_tiers, 0);
    atomic_store(&m.legacy_usage, 0);
    atomic_store(&m.legacy_set, 0);
    atomic_store(&m.throttling, 0);
    for (int i = 0; i < MAX_TIERS; i++) {
        atomic_store(&m.tier_usage[i], 0);
        atomic_store(&m.tier_ms[i], 0);
    }
    atomic_store(&m.states.count, 0);
    for (int i = 0; i < MAX_STATES; i++)
        atomic_store(&m.state_ptrs[i], NULL);
    atomic_store(&m.codes.count, 0);
    atomic_store(&m.maintenance, 0);
    atomic_store(&m.amqp_up, 0);
    atomic_store(&m.redis_up, 0);
    atomic_store(&m.stopping, 0);
    atomic_store(&m.ready_report_ms, 0);
    atomic_store(&m.heartbeat_ms, 0);
    pthread_mutex_unlock(&m.lock);
}

/* ---- deprecated entry points of today's callers ---- */

void metrics_provider_call(iw_route route, long status, long long duration_us, int breaker_failure)
{
    (void)breaker_failure;
    metrics_provider_request(route, status, duration_us);
}

static int index_of(const char *const *names, int n, const char *name)
{
    for (int i = 0; name && i < n; i++)
        if (!strcmp(names[i], name))
            return i;
    return -1;
}

void metrics_job(const char *role, const char *outcome)
{
    int r = index_of(role_names, IW_N_ROLES, role);
    int o = index_of(outcome_names, IW_N_OUTCOMES, outcome);
    if (r >= 0 && o >= 0)
        metrics_job_outcome((iw_role)r, (iw_outcome)o);
}

void metrics_dead_letter(const char *code)
{
    dead_letter(ROLE_UNKNOWN, code);
}

void metrics_limiter_usage(int permille)
{
    atomic_store(&m.legacy_usage, permille < 0 ? 0 : permille);
    atomic_store(&m.legacy_ms, clock_mono_ms());
    atomic_store(&m.legacy_set, 1);
}

/* ---- rendering ---- */

typedef struct out {
    char *p;
    size_t n, cap;
    int failed;
} out;

static void put(out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(out *o, const char *fmt, ...)
{
    va_list ap;

    if (o->failed)
        return;
    for (;;) {
        va_start(ap, fmt);
        int k = vsnprintf(o->p ? o->p + o->n : NULL, o->p ? o->cap - o->n : 0, fmt, ap);
        va_end(ap);
        if (k < 0) {
            o->failed = 1;
            return;
        }
        if (o->p && o->n + (size_t)k < o->cap) {
            o->n += (size_t)k;
            return;
        }
        size_t cap = o->cap ? o->cap * 2 : 16384;
        while (cap < o->n + (size_t)k + 1)
            cap *= 2;
        char *p = realloc(o->p, cap);
        if (!p) {
            o->failed = 1;
            return;
        }
        o->p = p;
        o->cap = cap;
    }
}

static void head(out *o, const char *name, const char *type, const char *help)
{
    put(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Label values are from the fixed tables above or sanitised on entry; the build
 * version is the one value escaped here (\\, \", \n per the text format). */
static void put_escaped(out *o, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            put(o, "\\%c", *s);
        else if (*s == '\n')
            put(o, "\\n");
        else
            put(o, "%c", *s);
    }
}

static void render_hist(out *o, const char *name, const char *labels, const hist *h,
                        const long long *bounds, size_t n)
{
    long long cum = 0;
    const char *sep = labels[0] ? "," : "";

    for (size_t i = 0; i < n; i++) {
        cum += atomic_load(&h->n[i]);
        put(o, "%s_bucket{%s%sle=\"%g\"} %lld\n", name, labels, sep, (double)bounds[i] / 1e6, cum);
    }
    cum += atomic_load(&h->n[n]);
    put(o, "%s_bucket{%s%sle=\"+Inf\"} %lld\n", name, labels, sep, cum);
    put(o, "%s_sum%s%s%s %.6f\n", name, labels[0] ? "{" : "", labels, labels[0] ? "}" : "",
        (double)atomic_load(&h->sum_us) / 1e6);
    put(o, "%s_count%s%s%s %lld\n", name, labels[0] ? "{" : "", labels, labels[0] ? "}" : "", cum);
}

static int fresh(const atomic_llong *at, long long now)
{
    long long t = atomic_load(at);
    return t && now - t <= KNOWLEDGE_STALE_MS;
}

static void render_provider(out *o, long long now)
{
    char lab[64];

    head(o, "iw_provider_requests_total", "counter",
         "Provider calls by route and status class (timeout: no answer in IW_HTTP_TIMEOUT; "
         "error: no HTTP answer).");
    for (int r = 0; r < IW_N_ROUTES; r++)
        for (int c = 0; c < N_CODES; c++)
            put(o, "iw_provider_requests_total{route=\"%s\",code=\"%s\"} %lld\n", route_names[r],
                code_names[c], atomic_load(&m.requests[r][c]));
    head(o, "iw_provider_request_duration_seconds", "histogram",
         "Provider call duration by route, answered or not.");
    for (int r = 0; r < IW_N_ROUTES; r++) {
        snprintf(lab, sizeof lab, "route=\"%s\"", route_names[r]);
        render_hist(o, "iw_provider_request_duration_seconds", lab, &m.duration[r], dur_bounds,
                    N_DUR);
    }
    /* The shared breaker's count (fleet-wide, reset by any pod's success) is the spec's
     * "consecutive failures" when we have it; else this process's own calls. */
    int fleet = atomic_load(&m.fleet_failures);
    int have_fleet = fleet >= 0 && fresh(&m.breaker_ms, now);
    int have_local = fresh(&m.last_call_ms, now);
    int failures = have_fleet ? fleet : atomic_load(&m.local_failures);
    head(o, "iw_provider_consecutive_failures", "gauge",
         "Consecutive failed provider calls (5xx, timeouts, no answer): the shared breaker's "
         "count, else this process's; absent without a call or breaker read in 60 s.");
    if (have_fleet || have_local)
        put(o, "iw_provider_consecutive_failures %d\n", failures);
    head(o, "iw_provider_down", "gauge",
         "1 after 3 or more consecutive failed provider calls (the spec's API down).");
    if (have_fleet || have_local)
        put(o, "iw_provider_down %d\n", /* failures inside a maintenance window are expected */
            failures >= IW_PROVIDER_DOWN_AFTER && !atomic_load(&m.maintenance));
    head(o, "iw_breaker_state", "gauge",
         "The shared circuit breaker: 0 closed, 1 open, 2 half-open (absent when not read "
         "from Redis in 60 s).");
    if (fresh(&m.breaker_ms, now))
        put(o, "iw_breaker_state %d\n", atomic_load(&m.breaker_state));
    head(o, "iw_provider_calls_in_flight", "gauge", "Provider calls in flight in this process.");
    put(o, "iw_provider_calls_in_flight %d\n", atomic_load(&m.in_flight));
    head(o, "iw_retries_total", "counter", "Provider calls tried again (an attempt used).");
    for (int r = 0; r < IW_N_ROUTES; r++)
        for (int k = 0; k < IW_N_RETRY_REASONS; k++)
            put(o, "iw_retries_total{route=\"%s\",reason=\"%s\"} %lld\n", route_names[r],
                retry_names[k], atomic_load(&m.retries[r][k]));
    head(o, "iw_job_waits_total", "counter",
         "Jobs that waited without using an attempt, by role and reason.");
    for (int r = 0; r < IW_N_ROLES; r++)
        for (int k = 0; k < IW_N_WAIT_REASONS; k++)
            put(o, "iw_job_waits_total{role=\"%s\",reason=\"%s\"} %lld\n", role_names[r],
                wait_names[k], atomic_load(&m.waits[r][k]));
}

static void render_limiter(out *o, long long now)
{
    char lab[64];
    int n = atomic_load(&m.n_tiers);

    head(o, "iw_limiter_usage_ratio", "gauge",
         "Usage of each IW_RATE_LIMITS tier (0..1) at this process's last permit (absent "
         "after 60 s without one).");
    for (int i = 0; i < n; i++)
        if (fresh(&m.tier_ms[i], now))
            put(o, "iw_limiter_usage_ratio{tier=\"%s\"} %.3f\n", m.tier_names[i],
                atomic_load(&m.tier_usage[i]) / 1000.0);
    if (n == 0 && atomic_load(&m.legacy_set) && fresh(&m.legacy_ms, now))
        put(o, "iw_limiter_usage_ratio{tier=\"all\"} %.3f\n",
            atomic_load(&m.legacy_usage) / 1000.0);
    head(o, "iw_limiter_throttling", "gauge",
         "1 while normal calls are held back above IW_RATE_ALERT.");
    put(o, "iw_limiter_throttling %d\n", atomic_load(&m.throttling));
    head(o, "iw_limiter_refusals_total", "counter", "Permits refused by class and reason.");
    for (int c = 0; c < IW_N_ROUTES; c++)
        for (int k = 0; k < IW_N_REFUSALS; k++)
            put(o, "iw_limiter_refusals_total{class=\"%s\",reason=\"%s\"} %lld\n", route_names[c],
                refusal_names[k], atomic_load(&m.refusals[c][k]));
    head(o, "iw_limiter_wait_seconds", "histogram",
         "The wait the limiter imposed on a refused permit, by class.");
    for (int c = 0; c < IW_N_ROUTES; c++) {
        snprintf(lab, sizeof lab, "class=\"%s\"", route_names[c]);
        render_hist(o, "iw_limiter_wait_seconds", lab, &m.limiter_wait[c], wait_bounds, N_WAIT);
    }
}

static void render_jobs(out *o)
{
    head(o, "iw_deliveries_total", "counter",
         "Deliveries of each role's queue: received, acked, delayed (sent to a delay tier), "
         "requeued.");
    for (int r = 0; r < IW_N_ROLES; r++)
        for (int k = 0; k < IW_N_DELIVERY; k++)
            put(o, "iw_deliveries_total{role=\"%s\",action=\"%s\"} %lld\n", role_names[r],
                delivery_names[k], atomic_load(&m.deliveries[r][k]));
    head(o, "iw_jobs_total", "counter", "Jobs and requests ended, by role and outcome.");
    for (int r = 0; r < IW_N_ROLES; r++)
        for (int k = 0; k < IW_N_OUTCOMES; k++)
            put(o, "iw_jobs_total{role=\"%s\",outcome=\"%s\"} %lld\n", role_names[r],
                outcome_names[k], atomic_load(&m.outcomes[r][k]));
    head(o, "iw_job_transitions_total", "counter", "Job state transitions by role and new state.");
    int ns = atomic_load(&m.states.count);
    for (int r = 0; r < IW_N_ROLES; r++) {
        for (int i = 0; i < ns; i++)
            put(o, "iw_job_transitions_total{role=\"%s\",state=\"%s\"} %lld\n", role_names[r],
                m.states.names[i], atomic_load(&m.transitions[r][i]));
        long long other = atomic_load(&m.transitions[r][MAX_STATES]);
        if (other)
            put(o, "iw_job_transitions_total{role=\"%s\",state=\"other\"} %lld\n", role_names[r],
                other);
    }
    head(o, "iw_dead_letters_total", "counter",
         "Messages this process dead-lettered, by role and error code.");
    int nc = atomic_load(&m.codes.count);
    for (int r = 0; r < N_ROLE_SLOTS; r++) {
        for (int i = 0; i < nc; i++) {
            long long v = atomic_load(&m.dead[r][i]);
            if (r < IW_N_ROLES || v)
                put(o, "iw_dead_letters_total{role=\"%s\",code=\"%s\"} %lld\n", role_names[r],
                    m.codes.names[i], v);
        }
        long long other = atomic_load(&m.dead[r][MAX_CODES]);
        if (other)
            put(o, "iw_dead_letters_total{role=\"%s\",code=\"OTHER\"} %lld\n", role_names[r],
                other);
    }
    head(o, "iw_delay_lateness_seconds", "histogram",
         "How late a message came back from the delay tiers after its due time.");
    render_hist(o, "iw_delay_lateness_seconds", "", &m.delay_late, late_bounds, N_LATE);
}

static void render_roles(out *o)
{
    head(o, "iw_cache_lookups_total", "counter", "Resolver look-ups by cache result.");
    for (int k = 0; k < IW_CACHE_COALESCED; k++)
        put(o, "iw_cache_lookups_total{result=\"%s\"} %lld\n", cache_names[k],
            atomic_load(&m.cache[k]));
    head(o, "iw_cache_coalesced_total", "counter",
         "Resolver look-ups that joined another look-up's provider call.");
    put(o, "iw_cache_coalesced_total %lld\n", atomic_load(&m.cache[IW_CACHE_COALESCED]));
    head(o, "iw_status_checks_total", "counter", "Poller status checks by outcome.");
    for (int k = 0; k < IW_N_CHECK_OUTCOMES; k++)
        put(o, "iw_status_checks_total{outcome=\"%s\"} %lld\n", check_names[k],
            atomic_load(&m.checks[k]));
    head(o, "iw_maintenance_window_active", "gauge", "1 inside one of IW_MAINTENANCE_WINDOWS.");
    put(o, "iw_maintenance_window_active %d\n", atomic_load(&m.maintenance));
}

static void render_health(out *o, long long now)
{
    head(o, "iw_broker_connected", "gauge", "1 while connected to the broker (last probe).");
    put(o, "iw_broker_connected %d\n", atomic_load(&m.amqp_up));
    head(o, "iw_redis_connected", "gauge", "1 while Redis answers (last probe).");
    put(o, "iw_redis_connected %d\n", atomic_load(&m.redis_up));
    head(o, "iw_ready", "gauge", "1 while /readyz answers 200.");
    put(o, "iw_ready %d\n", metrics_ready(now, NULL));
    head(o, "iw_build_info", "gauge", "Always 1; the version is git describe at configure time.");
    put(o, "iw_build_info{version=\"");
    put_escaped(o, IW_VERSION);
    put(o, "\"} 1\n");
}

char *metrics_render(void)
{
    return metrics_render_at(clock_mono_ms());
}

char *metrics_render_at(long long now_mono_ms)
{
    out o = {0};

    render_provider(&o, now_mono_ms);
    render_limiter(&o, now_mono_ms);
    render_jobs(&o);
    render_roles(&o);
    render_health(&o, now_mono_ms);
    if (o.failed) {
        free(o.p);
        return NULL;
    }
    return o.p;
}
