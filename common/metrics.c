#include "metrics.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_BUCKETS 11
#define MAX_LABELS 48
#define HEARTBEAT_STALE_MS 30000

static const double bucket_s[N_BUCKETS] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                           0.5,   1.0,  2.5,   5.0,  10.0};
static const char *const route_names[IW_N_ROUTES] = {"POST /external-resource", "GET /status",
                                                     "GET /external-resource"};
/* statuses with their own label; the rest are "other"; transport errors "error" */
static const long known_status[] = {200, 201, 400, 401, 403, 404, 409, 429, 500, 502, 503, 504};
#define N_STATUS (sizeof known_status / sizeof known_status[0] + 2)

static struct {
    atomic_llong calls[IW_N_ROUTES][N_STATUS];
    atomic_llong buckets[IW_N_ROUTES][N_BUCKETS];
    atomic_llong count[IW_N_ROUTES];
    atomic_llong sum_us[IW_N_ROUTES];
    atomic_int breaker[IW_N_ROUTES];
    atomic_int consecutive_failures;
    atomic_int usage_permille;
    atomic_int amqp_up, redis_up, stopping, in_flight;
    atomic_llong heartbeat_ms;
    pthread_mutex_t lock; /* only for adding a label to the tables below */
    struct {
        char a[64], b[64];
        atomic_llong n;
    } jobs[MAX_LABELS], dead[MAX_LABELS], trans[MAX_LABELS];
    atomic_int n_jobs, n_dead, n_trans;
} m = {.lock = PTHREAD_MUTEX_INITIALIZER};

static size_t status_index(long status)
{
    if (status == 0)
        return N_STATUS - 1;
    for (size_t i = 0; i < N_STATUS - 2; i++)
        if (known_status[i] == status)
            return i;
    return N_STATUS - 2;
}

void metrics_provider_call(iw_route route, long status, long long duration_us, int breaker_failure)
{
    double s = (double)duration_us / 1e6;

    if (route >= IW_N_ROUTES)
        return;
    atomic_fetch_add(&m.calls[route][status_index(status)], 1);
    for (int i = 0; i < N_BUCKETS; i++)
        if (s <= bucket_s[i])
            atomic_fetch_add(&m.buckets[route][i], 1);
    atomic_fetch_add(&m.count[route], 1);
    atomic_fetch_add(&m.sum_us[route], duration_us);
    if (breaker_failure)
        atomic_fetch_add(&m.consecutive_failures, 1);
    else if (status >= 200 && status < 500)
        atomic_store(&m.consecutive_failures, 0);
}

/* Finds or adds the (a, b) label pair in a table; NULL when the table is full. */
static atomic_llong *label_slot(void *table, atomic_int *n, const char *a, const char *b)
{
    typeof(m.jobs[0]) *t = table;
    int count = atomic_load(n);

    for (int i = 0; i < count; i++)
        if (!strcmp(t[i].a, a) && !strcmp(t[i].b, b))
            return &t[i].n;
    pthread_mutex_lock(&m.lock);
    count = atomic_load(n);
    for (int i = 0; i < count; i++) {
        if (!strcmp(t[i].a, a) && !strcmp(t[i].b, b)) {
            pthread_mutex_unlock(&m.lock);
            return &t[i].n;
        }
    }
    atomic_llong *slot = NULL;
    if (count < MAX_LABELS) {
        snprintf(t[count].a, sizeof t[count].a, "%s", a);
        snprintf(t[count].b, sizeof t[count].b, "%s", b);
        slot = &t[count].n;
        atomic_store(n, count + 1); /* publish after the names are written */
    }
    pthread_mutex_unlock(&m.lock);
    return slot;
}

void metrics_job(const char *role, const char *outcome)
{
    atomic_llong *n = label_slot(m.jobs, &m.n_jobs, role, outcome);
    if (n)
        atomic_fetch_add(n, 1);
}

void metrics_job_state(const char *role, const char *state)
{
    atomic_llong *n = label_slot(m.trans, &m.n_trans, role, state);
    if (n)
        atomic_fetch_add(n, 1);
}

void metrics_dead_letter(const char *code)
{
    atomic_llong *n = label_slot(m.dead, &m.n_dead, code, "");
    if (n)
        atomic_fetch_add(n, 1);
}

void metrics_limiter_usage(int permille)
{
    atomic_store(&m.usage_permille, permille);
}

void metrics_breaker_state(iw_route route, int state)
{
    if (route < IW_N_ROUTES)
        atomic_store(&m.breaker[route], state);
}

void metrics_connections(int amqp_up, int redis_up)
{
    atomic_store(&m.amqp_up, amqp_up);
    atomic_store(&m.redis_up, redis_up);
}

void metrics_in_flight(int calls)
{
    atomic_store(&m.in_flight, calls);
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

int metrics_ready(void)
{
    return atomic_load(&m.amqp_up) && atomic_load(&m.redis_up) && !atomic_load(&m.stopping);
}

typedef struct out {
    char *p;
    size_t n, cap;
} out;

static void put(out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(out *o, const char *fmt, ...)
{
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int k = vsnprintf(o->p ? o->p + o->n : NULL, o->p ? o->cap - o->n : 0, fmt, ap);
        va_end(ap);
        if (k < 0)
            return;
        if (o->p && o->n + (size_t)k < o->cap) {
            o->n += (size_t)k;
            return;
        }
        size_t cap = o->cap ? o->cap * 2 : 8192;
        while (cap < o->n + (size_t)k + 1)
            cap *= 2;
        char *p = realloc(o->p, cap);
        if (!p)
            return;
        o->p = p;
        o->cap = cap;
    }
}

static const char *status_label(size_t i, char *buf, size_t len)
{
    if (i == N_STATUS - 1)
        return "error";
    if (i == N_STATUS - 2)
        return "other";
    snprintf(buf, len, "%ld", known_status[i]);
    return buf;
}

char *metrics_render(void)
{
    out o = {0};
    char sb[16];

    put(&o, "# HELP iw_provider_requests_total Provider calls by route and HTTP status "
            "(error: no response).\n# TYPE iw_provider_requests_total counter\n");
    for (int r = 0; r < IW_N_ROUTES; r++)
        for (size_t s = 0; s < N_STATUS; s++) {
            long long v = atomic_load(&m.calls[r][s]);
            if (v)
                put(&o, "iw_provider_requests_total{route=\"%s\",status=\"%s\"} %lld\n",
                    route_names[r], status_label(s, sb, sizeof sb), v);
        }
    put(&o, "# HELP iw_provider_request_duration_seconds Provider call duration.\n"
            "# TYPE iw_provider_request_duration_seconds histogram\n");
    for (int r = 0; r < IW_N_ROUTES; r++) {
        for (int b = 0; b < N_BUCKETS; b++)
            put(&o, "iw_provider_request_duration_seconds_bucket{route=\"%s\",le=\"%g\"} %lld\n",
                route_names[r], bucket_s[b], atomic_load(&m.buckets[r][b]));
        put(&o, "iw_provider_request_duration_seconds_bucket{route=\"%s\",le=\"+Inf\"} %lld\n",
            route_names[r], atomic_load(&m.count[r]));
        put(&o, "iw_provider_request_duration_seconds_sum{route=\"%s\"} %.6f\n", route_names[r],
            (double)atomic_load(&m.sum_us[r]) / 1e6);
        put(&o, "iw_provider_request_duration_seconds_count{route=\"%s\"} %lld\n", route_names[r],
            atomic_load(&m.count[r]));
    }
    put(&o, "# HELP iw_breaker_state Circuit breaker per route: 0 closed, 1 open, 2 half-open.\n"
            "# TYPE iw_breaker_state gauge\n");
    for (int r = 0; r < IW_N_ROUTES; r++)
        put(&o, "iw_breaker_state{route=\"%s\"} %d\n", route_names[r], atomic_load(&m.breaker[r]));
    put(&o,
        "# HELP iw_provider_consecutive_failures Consecutive failed provider calls "
        "(5xx, timeouts, connection errors) of this process.\n"
        "# TYPE iw_provider_consecutive_failures gauge\niw_provider_consecutive_failures %d\n",
        atomic_load(&m.consecutive_failures));
    put(&o,
        "# HELP iw_limiter_usage_ratio Highest usage of a rate-limit tier at the last permit.\n"
        "# TYPE iw_limiter_usage_ratio gauge\niw_limiter_usage_ratio %.3f\n",
        atomic_load(&m.usage_permille) / 1000.0);
    put(&o, "# HELP iw_job_transitions_total Jobs entering each state of the job engine.\n"
            "# TYPE iw_job_transitions_total counter\n");
    for (int i = 0; i < atomic_load(&m.n_trans); i++)
        put(&o, "iw_job_transitions_total{role=\"%s\",state=\"%s\"} %lld\n", m.trans[i].a,
            m.trans[i].b, atomic_load(&m.trans[i].n));
    put(&o, "# HELP iw_jobs_total Outcomes of jobs and requests by role.\n"
            "# TYPE iw_jobs_total counter\n");
    for (int i = 0; i < atomic_load(&m.n_jobs); i++)
        put(&o, "iw_jobs_total{role=\"%s\",outcome=\"%s\"} %lld\n", m.jobs[i].a, m.jobs[i].b,
            atomic_load(&m.jobs[i].n));
    put(&o, "# HELP iw_dead_letters_total Messages dead-lettered by this process, by code.\n"
            "# TYPE iw_dead_letters_total counter\n");
    for (int i = 0; i < atomic_load(&m.n_dead); i++)
        put(&o, "iw_dead_letters_total{code=\"%s\"} %lld\n", m.dead[i].a,
            atomic_load(&m.dead[i].n));
    put(&o, "# TYPE iw_provider_calls_in_flight gauge\niw_provider_calls_in_flight %d\n",
        atomic_load(&m.in_flight));
    put(&o, "# TYPE iw_broker_connected gauge\niw_broker_connected %d\n", atomic_load(&m.amqp_up));
    put(&o, "# TYPE iw_redis_connected gauge\niw_redis_connected %d\n", atomic_load(&m.redis_up));
    return o.p;
}
