#include "mock_provider.h"

#include "mock_map.h"
#include "mock_timer.h"

#include <ctype.h>
#include <jansson.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_MS 1000000LL
#define NS_PER_S 1000000000LL

#define MAX_STATUS 600               /* statuses are 0 (closed) or 100..599 */
#define MAX_IDEMPOTENCY_KEY 255      /* longer keys get 400 */
#define MAX_SCRIPT_LEN 100000        /* entries per route in POST /__admin/faults */
#define MAX_RESOURCE_GET_IDS 100000  /* distinct ids counted in stats; the rest add up */
#define TOKEN_SWEEP_THRESHOLD 10000  /* expired tokens are swept past this many */
#define MAX_FAULT_LATENCY_MS 600000L /* same bound as --latency-ms */

/* The routes counted in the statistics and addressable by fault scripts. */
typedef enum route_id {
    ROUTE_SUBMIT,
    ROUTE_STATUS,
    ROUTE_RESOURCE,
    ROUTE_TOKEN,
    ROUTE_COUNT,
    ROUTE_NOT_FOUND = -1,
    ROUTE_BAD_METHOD = -2,
} route_id;

static const char *const route_names[ROUTE_COUNT] = {
    [ROUTE_SUBMIT] = "POST /api/v1/external-resource",
    [ROUTE_STATUS] = "GET /api/v1/status",
    [ROUTE_RESOURCE] = "GET /api/v1/external-resource",
    [ROUTE_TOKEN] = "POST /oauth/token",
};

/* A queue of scripted statuses for one route. */
typedef struct int_queue {
    int *items;
    size_t head, len;
} int_queue;

/* The fault configuration: starts from the flags, changed by /__admin/faults. */
typedef struct faults {
    bool outage;
    mock_error_rate rates[MOCK_MAX_ERROR_RATES];
    int n_rates;
    long latency_ms, jitter_ms;
    int_queue script[ROUTE_COUNT];
} faults;

typedef struct submission {
    char *id;
    char *tracking;
    char *terminal;          /* terminal status of this submission */
    long checks;             /* status GETs so far */
    long checks_to_complete; /* 0: progress by age */
    int64_t ms_to_complete;  /* used when checks_to_complete is 0 */
    int64_t created_ns;      /* monotonic */
    const char *last_status; /* "pending", "processing" or terminal */
    int64_t updated_unix_ms; /* when last_status last changed */
} submission;

/* What the provider remembers of an Idempotency-Key (or, for test hooks
 * without a key, of a body). */
typedef struct idem_record {
    long attempts;  /* requests that reached the submit handler */
    char *body_201; /* the 201 body once one was sent, else NULL */
} idem_record;

/* A body stored by PUT /__admin/resources/{id}; body NULL means deleted. */
typedef struct stored_resource {
    json_t *body;
} stored_resource;

typedef struct stats {
    uint64_t by_status[ROUTE_COUNT][MAX_STATUS];
    uint64_t submissions_created;
    uint64_t duplicates_refused;
    uint64_t rate_limited;
    uint64_t status_checks;
    uint64_t tokens_issued;
    uint64_t faults_injected;
    uint64_t resource_gets_other; /* gets of ids past MAX_RESOURCE_GET_IDS */
    long in_flight;
    long max_in_flight;
} stats;

struct mock_provider {
    const mock_config *cfg;
    pthread_mutex_t lock;
    mock_limiter *limiter;
    faults faults;
    mock_map *submissions;   /* trackingId -> submission */
    mock_map *idempotency;   /* key -> idem_record */
    mock_map *tokens;        /* access token -> int64_t expiry (monotonic ns) */
    mock_map *resources;     /* id -> stored_resource */
    mock_map *resource_gets; /* id -> uint64_t count */
    stats stats;
    uint64_t next_n;
    char run_id[24]; /* start time in unix ms: ids stay unique across restarts */
    uint64_t rng;
};

/* The per-request test hooks in request_data.mock. */
typedef struct hooks {
    json_t *fail; /* borrowed array of statuses, or NULL */
    bool has_fail_always;
    long fail_always;
    const char *terminal;
    long checks;
    bool has_seconds;
    int64_t ms_to_complete;
    long latency_ms;
    long retry_after_s;
} hooks;

/* ---- small helpers ---------------------------------------------------- */

static int64_t unix_ms_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / NS_PER_MS;
}

static void format_rfc3339(int64_t unix_ms, char *buf, size_t len)
{
    time_t secs = (time_t)(unix_ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    char base[32];
    strftime(base, sizeof base, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf, len, "%s.%03dZ", base, (int)(unix_ms % 1000));
}

/* xorshift64*: error-rate draws and jitter; called under the lock. */
static uint64_t rng_next(mock_provider *p)
{
    uint64_t x = p->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    p->rng = x;
    return x * 2685821657736338717ULL;
}

static double rng_unit(mock_provider *p)
{
    return (double)(rng_next(p) >> 11) * (1.0 / 9007199254740992.0);
}

static bool starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

static bool status_name_valid(const char *s)
{
    size_t len = strlen(s);
    return len > 0 && len <= 64 && strspn(s, "abcdefghijklmnopqrstuvwxyz0123456789_-") == len;
}

static const char *reason_phrase(int status)
{
    switch (status) {
    case 400:
        return "bad request";
    case 401:
        return "unauthorized";
    case 403:
        return "forbidden";
    case 404:
        return "not found";
    case 405:
        return "method not allowed";
    case 408:
        return "request timeout";
    case 409:
        return "conflict";
    case 413:
        return "request body too large";
    case 422:
        return "unprocessable entity";
    case 429:
        return "rate limited";
    case 500:
        return "internal server error";
    case 502:
        return "bad gateway";
    case 503:
        return "service unavailable";
    case 504:
        return "gateway timeout";
    default:
        return "injected error";
    }
}

/* ---- responses --------------------------------------------------------- */

void mock_response_clear(mock_response *resp)
{
    free(resp->body);
    memset(resp, 0, sizeof *resp);
}

/* Sets (or replaces) a response header. */
__attribute__((format(printf, 3, 4))) static void set_header(mock_response *resp, const char *name,
                                                             const char *fmt, ...)
{
    mock_header *h = NULL;
    for (int i = 0; i < resp->n_headers; i++)
        if (strcasecmp(resp->headers[i].name, name) == 0)
            h = &resp->headers[i];
    if (!h) {
        if (resp->n_headers == MOCK_MAX_HEADERS)
            return;
        h = &resp->headers[resp->n_headers++];
        h->name = name;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(h->value, sizeof h->value, fmt, ap);
    va_end(ap);
}

/* Sets status and body from obj (stolen; NULL means out of memory -> 500). */
static void set_json(mock_response *resp, int status, json_t *obj)
{
    free(resp->body);
    resp->body = obj ? json_dumps(obj, JSON_COMPACT | JSON_REAL_PRECISION(15)) : NULL;
    json_decref(obj);
    if (!resp->body) {
        status = 500;
        resp->body = strdup("{\"error\":\"out of memory\"}");
    }
    resp->status = status;
    resp->body_len = resp->body ? strlen(resp->body) : 0;
}

static void set_error(mock_response *resp, int status, const char *message)
{
    set_json(resp, status, json_pack("{ss}", "error", message));
}

static void set_close(mock_response *resp)
{
    free(resp->body);
    resp->body = NULL;
    resp->body_len = 0;
    resp->status = 0;
    resp->n_headers = 0;
}

/* The headers of a 429: Retry-After in whole seconds (rounded up, >= 1), the
 * limit, and when a slot frees as an epoch second and in milliseconds. */
static void set_retry_headers(mock_response *resp, int64_t wait_ns, long limit, long remaining)
{
    int64_t wait_ms = (wait_ns + NS_PER_MS - 1) / NS_PER_MS;
    if (wait_ms < 1)
        wait_ms = 1;
    int64_t secs = (wait_ms + 999) / 1000;
    int64_t reset_ms = unix_ms_now() + wait_ms;
    set_header(resp, "Retry-After", "%lld", (long long)secs);
    set_header(resp, "X-RateLimit-Limit", "%ld", limit);
    set_header(resp, "X-RateLimit-Remaining", "%ld", remaining);
    set_header(resp, "X-RateLimit-Reset", "%lld", (long long)((reset_ms + 999) / 1000));
    set_header(resp, "X-RateLimit-Reset-Ms", "%lld", (long long)wait_ms);
}

/* Answers with an injected status (0 closes the connection). */
static void inject(mock_provider *p, mock_response *resp, int status, long retry_after_s)
{
    p->stats.faults_injected++;
    if (status == 0) {
        set_close(resp);
        return;
    }
    json_t *body = json_pack("{sssb}", "error", reason_phrase(status), "injected", 1);
    set_json(resp, status, body);
    if (status == 429)
        set_retry_headers(resp, (int64_t)retry_after_s * NS_PER_S, 0, 0);
}

/* ---- state ------------------------------------------------------------- */

static void submission_free(void *value)
{
    submission *s = value;
    if (!s)
        return;
    free(s->id);
    free(s->tracking);
    free(s->terminal);
    free(s);
}

static void idem_record_free(void *value)
{
    idem_record *r = value;
    if (!r)
        return;
    free(r->body_201);
    free(r);
}

static void stored_resource_free(void *value)
{
    stored_resource *r = value;
    if (!r)
        return;
    json_decref(r->body);
    free(r);
}

static void script_clear(int_queue *q)
{
    free(q->items);
    memset(q, 0, sizeof *q);
}

static void faults_from_config(faults *f, const mock_config *cfg)
{
    for (int i = 0; i < ROUTE_COUNT; i++)
        script_clear(&f->script[i]);
    f->outage = cfg->outage;
    f->n_rates = cfg->n_error_rates;
    memcpy(f->rates, cfg->error_rates, sizeof f->rates);
    f->latency_ms = cfg->latency_ms;
    f->jitter_ms = cfg->latency_jitter_ms;
}

mock_provider *mock_provider_new(const mock_config *cfg)
{
    mock_provider *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->cfg = cfg;
    pthread_mutex_init(&p->lock, NULL);
    p->limiter = mock_limiter_new(&cfg->rate);
    p->submissions = mock_map_new();
    p->idempotency = mock_map_new();
    p->tokens = mock_map_new();
    p->resources = mock_map_new();
    p->resource_gets = mock_map_new();
    if (!p->limiter || !p->submissions || !p->idempotency || !p->tokens || !p->resources ||
        !p->resource_gets) {
        mock_provider_free(p);
        return NULL;
    }
    faults_from_config(&p->faults, cfg);
    int64_t start = unix_ms_now();
    snprintf(p->run_id, sizeof p->run_id, "%lld", (long long)start);
    p->rng = cfg->seed ? (uint64_t)cfg->seed
                       : (uint64_t)start * 6364136223846793005ULL ^ (uint64_t)getpid();
    if (!p->rng)
        p->rng = 0x9E3779B97F4A7C15ULL;
    return p;
}

void mock_provider_free(mock_provider *p)
{
    if (!p)
        return;
    mock_limiter_free(p->limiter);
    mock_map_free(p->submissions, submission_free);
    mock_map_free(p->idempotency, idem_record_free);
    mock_map_free(p->tokens, free);
    mock_map_free(p->resources, stored_resource_free);
    mock_map_free(p->resource_gets, free);
    for (int i = 0; i < ROUTE_COUNT; i++)
        script_clear(&p->faults.script[i]);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

bool mock_provider_counts_in_flight(const char *path)
{
    return starts_with(path, "/api/");
}

void mock_provider_request_begin(mock_provider *p)
{
    pthread_mutex_lock(&p->lock);
    p->stats.in_flight++;
    if (p->stats.in_flight > p->stats.max_in_flight)
        p->stats.max_in_flight = p->stats.in_flight;
    pthread_mutex_unlock(&p->lock);
}

void mock_provider_request_end(mock_provider *p)
{
    pthread_mutex_lock(&p->lock);
    p->stats.in_flight--;
    pthread_mutex_unlock(&p->lock);
}

/* ---- auth -------------------------------------------------------------- */

static int b64_value(int c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Decodes base64 (padding optional) into out as a NUL-terminated string.
 * Returns 0, or -1 on bad input or overflow. */
static int b64_decode(const char *in, char *out, size_t outlen)
{
    size_t n = 0;
    unsigned acc = 0;
    int bits = 0;
    for (; *in && *in != '='; in++) {
        int v = b64_value((unsigned char)*in);
        if (v < 0)
            return -1;
        acc = (acc << 6) | (unsigned)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (n + 1 >= outlen)
                return -1;
            out[n++] = (char)((acc >> bits) & 0xFF);
        }
    }
    out[n] = '\0';
    return memchr(out, '\0', n) ? -1 : 0;
}

/* Splits "Authorization: Basic base64(user:pass)" into user and pass. */
static bool parse_basic(const char *header, char *buf, size_t len, const char **user,
                        const char **pass)
{
    if (!header || strncasecmp(header, "Basic ", 6) != 0)
        return false;
    const char *b64 = header + 6;
    while (*b64 == ' ')
        b64++;
    if (b64_decode(b64, buf, len) < 0)
        return false;
    char *colon = strchr(buf, ':');
    if (!colon)
        return false;
    *colon = '\0';
    *user = buf;
    *pass = colon + 1;
    return true;
}

static bool str_eq(const char *a, const char *b)
{
    return a && b && strcmp(a, b) == 0;
}

static bool authorized(mock_provider *p, const mock_request *req, int64_t now)
{
    const mock_config *cfg = p->cfg;
    switch (cfg->auth) {
    case MOCK_AUTH_NONE:
        return true;
    case MOCK_AUTH_API_KEY:
        return str_eq(req->header(req->ctx, "X-API-Key"), cfg->api_key) &&
               str_eq(req->header(req->ctx, "X-API-Secret"), cfg->api_secret);
    case MOCK_AUTH_BASIC: {
        char buf[512];
        const char *user, *pass;
        return parse_basic(req->header(req->ctx, "Authorization"), buf, sizeof buf, &user, &pass) &&
               str_eq(user, cfg->basic_user) && str_eq(pass, cfg->basic_password);
    }
    case MOCK_AUTH_OAUTH2: {
        const char *a = req->header(req->ctx, "Authorization");
        if (!a || strncasecmp(a, "Bearer ", 7) != 0)
            return false;
        a += 7;
        while (*a == ' ')
            a++;
        const int64_t *expiry = mock_map_get(p->tokens, a);
        return expiry && *expiry > now;
    }
    }
    return false;
}

static void set_unauthorized(mock_provider *p, mock_response *resp)
{
    set_error(resp, 401, "unauthorized");
    if (p->cfg->auth == MOCK_AUTH_BASIC)
        set_header(resp, "WWW-Authenticate", "Basic realm=\"mock-provider\"");
    else if (p->cfg->auth == MOCK_AUTH_OAUTH2)
        set_header(resp, "WWW-Authenticate", "Bearer");
}

/* ---- faults applied before a route's normal behaviour --------------------- */

/* Consumes the next scripted status of route, if any.  Returns true when the
 * request was answered (a non-2xx entry); 2xx entries let it through. */
static bool apply_script(mock_provider *p, route_id route, mock_response *resp)
{
    int_queue *q = &p->faults.script[route];
    if (q->head == q->len)
        return false;
    int status = q->items[q->head++];
    if (q->head == q->len)
        script_clear(q);
    if (status >= 200 && status < 300)
        return false;
    inject(p, resp, status, 1);
    return true;
}

static bool apply_error_rates(mock_provider *p, mock_response *resp)
{
    if (p->faults.n_rates == 0)
        return false;
    double u = rng_unit(p), acc = 0.0;
    for (int i = 0; i < p->faults.n_rates; i++) {
        acc += p->faults.rates[i].p;
        if (u < acc) {
            inject(p, resp, p->faults.rates[i].code, 1);
            return true;
        }
    }
    return false;
}

/* ---- POST /api/v1/external-resource --------------------------------------- */

static json_t *parse_body(const mock_request *req, mock_response *resp)
{
    json_error_t jerr;
    json_t *root = json_loadb(req->body ? req->body : "", req->body_len, 0, &jerr);
    if (!root) {
        char msg[256];
        snprintf(msg, sizeof msg, "body is not valid JSON: %s", jerr.text);
        set_error(resp, 400, msg);
    }
    return root;
}

static bool is_string_member(json_t *obj, const char *key)
{
    return json_is_string(json_object_get(obj, key));
}

/* Reads request_data.mock into h.  Returns NULL, or the message of a 400. */
static const char *read_hooks(json_t *mock, hooks *h)
{
    memset(h, 0, sizeof *h);
    h->retry_after_s = 1;
    if (!mock)
        return NULL;
    if (!json_is_object(mock))
        return "request_data.mock must be an object";
    const char *key;
    json_t *v;
    json_object_foreach(mock, key, v)
    {
        if (strcmp(key, "fail") == 0) {
            if (!json_is_array(v))
                return "request_data.mock.fail must be an array of statuses";
            size_t i;
            json_t *item;
            json_array_foreach(v, i, item)
            {
                char msg[100];
                if (!json_is_integer(item) ||
                    mock_error_code_valid((long)json_integer_value(item), msg, sizeof msg) < 0)
                    return "request_data.mock.fail entries must be 0 or 100..599";
            }
            h->fail = v;
        } else if (strcmp(key, "fail_always") == 0) {
            char msg[100];
            if (!json_is_integer(v) ||
                mock_error_code_valid((long)json_integer_value(v), msg, sizeof msg) < 0)
                return "request_data.mock.fail_always must be 0 or 100..599";
            h->has_fail_always = true;
            h->fail_always = (long)json_integer_value(v);
        } else if (strcmp(key, "terminal") == 0) {
            if (!json_is_string(v) || !status_name_valid(json_string_value(v)))
                return "request_data.mock.terminal must be 1-64 of [a-z0-9_-]";
            h->terminal = json_string_value(v);
        } else if (strcmp(key, "checks") == 0) {
            if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > 1000000)
                return "request_data.mock.checks must be an integer in 1..1000000";
            h->checks = (long)json_integer_value(v);
        } else if (strcmp(key, "seconds") == 0) {
            if (!json_is_number(v) || json_number_value(v) < 0 || json_number_value(v) > 2592000)
                return "request_data.mock.seconds must be a number in 0..2592000";
            h->has_seconds = true;
            h->ms_to_complete = (int64_t)(json_number_value(v) * 1000.0 + 0.5);
        } else if (strcmp(key, "latency_ms") == 0) {
            if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                json_integer_value(v) > MAX_FAULT_LATENCY_MS)
                return "request_data.mock.latency_ms must be an integer in 0..600000";
            h->latency_ms = (long)json_integer_value(v);
        } else if (strcmp(key, "retry_after") == 0) {
            if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 86400)
                return "request_data.mock.retry_after must be an integer in 0..86400";
            h->retry_after_s = (long)json_integer_value(v);
        } else {
            return "request_data.mock has an unknown hook (fail, fail_always, terminal, "
                   "checks, seconds, latency_ms, retry_after)";
        }
    }
    return NULL;
}

/* Checks the IF-002 outbound shape.  Returns NULL, or the message of a 400. */
static const char *validate_submission(json_t *root)
{
    if (!json_is_object(root))
        return "body must be a JSON object";
    if (!is_string_member(root, "user_id"))
        return "user_id must be a string";
    if (!is_string_member(root, "action_type"))
        return "action_type must be a string";
    if (!json_is_object(json_object_get(root, "request_data")))
        return "request_data must be an object";
    json_t *client = json_object_get(root, "client_info");
    if (!json_is_object(client))
        return "client_info must be an object";
    if (!is_string_member(client, "client_id"))
        return "client_info.client_id must be a string";
    if (!is_string_member(client, "timestamp"))
        return "client_info.timestamp must be a string";
    return NULL;
}

static idem_record *idem_get_or_create(mock_provider *p, const char *key)
{
    idem_record *r = mock_map_get(p->idempotency, key);
    if (r)
        return r;
    r = calloc(1, sizeof *r);
    if (r && mock_map_put(p->idempotency, key, r, NULL) < 0) {
        free(r);
        r = NULL;
    }
    return r;
}

/* Creates a submission; returns the 201 body (malloc'd) or NULL. */
static char *create_submission(mock_provider *p, const hooks *h, int64_t now)
{
    char id[64], tracking[64];
    uint64_t n = ++p->next_n;
    snprintf(id, sizeof id, "res-%s-%llu", p->run_id, (unsigned long long)n);
    snprintf(tracking, sizeof tracking, "track-%s-%llu", p->run_id, (unsigned long long)n);
    submission *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->id = strdup(id);
    s->tracking = strdup(tracking);
    s->terminal = strdup(h->terminal ? h->terminal : p->cfg->terminal_status);
    s->created_ns = now;
    s->last_status = "pending";
    s->updated_unix_ms = unix_ms_now();
    if (h->checks > 0) {
        s->checks_to_complete = h->checks;
    } else if (h->has_seconds && h->ms_to_complete > 0) {
        s->ms_to_complete = h->ms_to_complete;
    } else if (!h->has_seconds && p->cfg->ms_to_complete > 0) {
        s->ms_to_complete = p->cfg->ms_to_complete;
    } else {
        s->checks_to_complete = p->cfg->checks_to_complete;
    }
    json_t *body = json_pack("{ssssssss}", "id", id, "status", "pending", "message",
                             "Request received and queued for processing", "trackingId", tracking);
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (!s->id || !s->tracking || !s->terminal || !text ||
        mock_map_put(p->submissions, tracking, s, NULL) < 0) {
        submission_free(s);
        free(text);
        return NULL;
    }
    p->stats.submissions_created++;
    return text;
}

static void handle_submit(mock_provider *p, const mock_request *req, mock_response *resp,
                          int64_t now)
{
    char *canonical = NULL;
    json_t *root = parse_body(req, resp);
    if (!root)
        return;
    const char *problem = validate_submission(root);
    hooks h = {0};
    if (!problem)
        problem = read_hooks(json_object_get(json_object_get(root, "request_data"), "mock"), &h);
    if (problem) {
        set_error(resp, 400, problem);
        goto out;
    }
    const char *key = req->header(req->ctx, "Idempotency-Key");
    if (key && (!*key || strlen(key) > MAX_IDEMPOTENCY_KEY)) {
        set_error(resp, 400, "Idempotency-Key must be 1-255 characters");
        goto out;
    }
    resp->delay_ms += h.latency_ms;
    idem_record *rec = key ? mock_map_get(p->idempotency, key) : NULL;
    if (rec && rec->body_201) {
        resp->body = strdup(rec->body_201);
        if (!resp->body) {
            set_error(resp, 500, "out of memory");
            goto out;
        }
        resp->status = 201;
        resp->body_len = strlen(resp->body);
        set_header(resp, "Idempotent-Replayed", "true");
        p->stats.duplicates_refused++;
        goto out;
    }
    if (h.fail || h.has_fail_always) {
        /* Attempts are counted per key; without one, per identical body. */
        const char *attempt_key = key;
        if (!attempt_key) {
            char *dump = json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS);
            if (dump && asprintf(&canonical, "body:%s", dump) < 0)
                canonical = NULL;
            free(dump);
            attempt_key = canonical;
        }
        rec = attempt_key ? idem_get_or_create(p, attempt_key) : NULL;
        if (!rec) {
            set_error(resp, 500, "out of memory");
            goto out;
        }
        rec->attempts++;
        if (h.has_fail_always) {
            inject(p, resp, (int)h.fail_always, h.retry_after_s);
            goto out;
        }
        if ((size_t)rec->attempts <= json_array_size(h.fail)) {
            int status = (int)json_integer_value(json_array_get(h.fail, (size_t)rec->attempts - 1));
            if (status < 200 || status >= 300) {
                inject(p, resp, status, h.retry_after_s);
                goto out;
            }
        }
    }
    char *body = create_submission(p, &h, now);
    if (!body) {
        set_error(resp, 500, "out of memory");
        goto out;
    }
    if (key) {
        rec = idem_get_or_create(p, key);
        if (rec)
            rec->body_201 = strdup(body);
    }
    resp->status = 201;
    resp->body = body;
    resp->body_len = strlen(body);
out:
    free(canonical);
    json_decref(root);
}

/* ---- GET /api/v1/status/{trackingId} -------------------------------------- */

static const char *current_status(const submission *s, int64_t now)
{
    if (s->checks_to_complete > 0) {
        if (s->checks >= s->checks_to_complete)
            return s->terminal;
        return s->checks <= 1 ? "pending" : "processing";
    }
    int64_t age_ms = (now - s->created_ns) / NS_PER_MS;
    if (age_ms >= s->ms_to_complete)
        return s->terminal;
    return age_ms * 2 < s->ms_to_complete ? "pending" : "processing";
}

static void handle_status(mock_provider *p, const char *tracking, mock_response *resp, int64_t now)
{
    submission *s = mock_map_get(p->submissions, tracking);
    if (!s) {
        set_error(resp, 404, "not found");
        return;
    }
    s->checks++;
    p->stats.status_checks++;
    const char *status = current_status(s, now);
    if (strcmp(status, s->last_status) != 0) {
        s->last_status = status;
        s->updated_unix_ms = unix_ms_now();
    }
    char updated[40];
    format_rfc3339(s->updated_unix_ms, updated, sizeof updated);
    json_t *body = json_pack("{sssssssIss}", "trackingId", s->tracking, "id", s->id, "status",
                             status, "checks", (json_int_t)s->checks, "updatedAt", updated);
    if (body && status == s->terminal) {
        char code[72];
        if (strcmp(status, "completed") == 0) {
            snprintf(code, sizeof code, "OK");
        } else {
            size_t i = 0;
            for (; status[i] && i + 1 < sizeof code; i++)
                code[i] = (char)toupper((unsigned char)status[i]);
            code[i] = '\0';
        }
        json_object_set_new(body, "result", json_pack("{ss}", "code", code));
    }
    set_json(resp, 200, body);
}

/* ---- GET /api/v1/external-resource/{id} ----------------------------------- */

static void count_resource_get(mock_provider *p, const char *id)
{
    uint64_t *n = mock_map_get(p->resource_gets, id);
    if (n) {
        (*n)++;
        return;
    }
    if (mock_map_size(p->resource_gets) >= MAX_RESOURCE_GET_IDS) {
        p->stats.resource_gets_other++;
        return;
    }
    n = malloc(sizeof *n);
    if (n) {
        *n = 1;
        if (mock_map_put(p->resource_gets, id, n, NULL) < 0)
            free(n);
    }
}

static void handle_resource(mock_provider *p, const mock_request *req, const char *id,
                            mock_response *resp)
{
    const stored_resource *stored = mock_map_get(p->resources, id);
    if (stored) {
        if (stored->body)
            set_json(resp, 200, json_incref(stored->body));
        else
            set_error(resp, 404, "not found");
        return;
    }
    if (starts_with(id, "missing-")) {
        set_error(resp, 404, "not found");
        return;
    }
    char name[300];
    snprintf(name, sizeof name, "Resource %s", id);
    json_t *body = json_pack("{ssssss}", "id", id, "ext_name", name, "ext_status",
                             starts_with(id, "inactive-") ? "INACTIVE" : "ACTIVE");
    if (body && !starts_with(id, "malformed-")) {
        char value[300];
        snprintf(value, sizeof value, "value-%s", id);
        json_object_set_new(body, "ext_data",
                            json_pack("{sssi}", "field_one", value, "field_two", 42));
    }
    const char *expand = req->query(req->ctx, "expand");
    if (body && expand)
        json_object_set_new(body, "expand", json_string(expand));
    set_json(resp, 200, body);
}

/* ---- /api routing -------------------------------------------------------- */

/* Maps method and path to a route; *id gets the path parameter and *allow
 * the method a 405 should name. */
static route_id classify_api(const char *method, const char *path, const char **id,
                             const char **allow)
{
    static const char submit[] = "/api/v1/external-resource";
    static const char status[] = "/api/v1/status/";
    *id = NULL;
    route_id route = ROUTE_NOT_FOUND;
    if (strcmp(path, submit) == 0) {
        *allow = "POST";
        route = ROUTE_SUBMIT;
    } else if (starts_with(path, submit) && path[sizeof submit - 1] == '/') {
        *id = path + sizeof submit;
        *allow = "GET";
        route = ROUTE_RESOURCE;
    } else if (starts_with(path, status)) {
        *id = path + sizeof status - 1;
        *allow = "GET";
        route = ROUTE_STATUS;
    }
    if (route == ROUTE_NOT_FOUND)
        return route;
    if (*id && (!**id || strchr(*id, '/')))
        return ROUTE_NOT_FOUND;
    return strcmp(method, *allow) == 0 ? route : ROUTE_BAD_METHOD;
}

static void set_route_error(mock_response *resp, route_id route, const char *allow)
{
    if (route == ROUTE_BAD_METHOD) {
        set_error(resp, 405, "method not allowed");
        set_header(resp, "Allow", "%s", allow);
    } else {
        set_error(resp, 404, "not found");
    }
}

/* Order: 413, auth, rate limiter, outage, routing, script, error rates, the
 * route itself; the latency applies to every answer. */
static route_id handle_api(mock_provider *p, const mock_request *req, mock_response *resp,
                           int64_t now)
{
    const char *id, *allow = NULL;
    route_id route = classify_api(req->method, req->path, &id, &allow);
    resp->delay_ms = p->faults.latency_ms;
    if (p->faults.jitter_ms > 0)
        resp->delay_ms += (int64_t)(rng_next(p) % (uint64_t)(p->faults.jitter_ms + 1));
    if (req->body_too_large) {
        set_error(resp, 413, "request body too large");
        return route;
    }
    if (!authorized(p, req, now)) {
        set_unauthorized(p, resp);
        return route;
    }
    if (starts_with(req->path, "/api/v1/") && mock_limiter_enabled(p->limiter)) {
        mock_limit_verdict v;
        mock_limiter_admit(p->limiter, now, &v);
        if (!v.admitted) {
            p->stats.rate_limited++;
            set_error(resp, 429, "rate limited");
            set_retry_headers(resp, v.wait_ns, v.limit, v.remaining);
            return route;
        }
        set_header(resp, "X-RateLimit-Limit", "%ld", v.limit);
        set_header(resp, "X-RateLimit-Remaining", "%ld", v.remaining);
    }
    if (route == ROUTE_RESOURCE)
        count_resource_get(p, id);
    if (p->faults.outage) {
        p->stats.faults_injected++;
        set_error(resp, 503, "outage");
        return route;
    }
    if (route < 0) {
        set_route_error(resp, route, allow);
        return route;
    }
    if (apply_script(p, route, resp) || apply_error_rates(p, resp))
        return route;
    switch (route) {
    case ROUTE_SUBMIT:
        handle_submit(p, req, resp, now);
        break;
    case ROUTE_STATUS:
        handle_status(p, id, resp, now);
        break;
    case ROUTE_RESOURCE:
        handle_resource(p, req, id, resp);
        break;
    default:
        break;
    }
    return route;
}

/* ---- POST /oauth/token --------------------------------------------------- */

static int hex_value(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = tolower(c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Percent-decodes [s, s + len) of a form body into out ('+' is a space). */
static void form_decode(const char *s, size_t len, char *out, size_t outlen)
{
    size_t n = 0;
    for (size_t i = 0; i < len && n + 1 < outlen; i++) {
        if (s[i] == '+') {
            out[n++] = ' ';
        } else if (s[i] == '%' && i + 2 < len && hex_value((unsigned char)s[i + 1]) >= 0 &&
                   hex_value((unsigned char)s[i + 2]) >= 0) {
            out[n++] = (char)(hex_value((unsigned char)s[i + 1]) * 16 +
                              hex_value((unsigned char)s[i + 2]));
            i += 2;
        } else {
            out[n++] = s[i];
        }
    }
    out[n] = '\0';
}

/* Finds name in an application/x-www-form-urlencoded body. */
static bool form_get(const char *body, size_t len, const char *name, char *out, size_t outlen)
{
    size_t i = 0;
    while (i < len) {
        const char *pair = body + i;
        const char *amp = memchr(pair, '&', len - i);
        size_t plen = amp ? (size_t)(amp - pair) : len - i;
        const char *eq = memchr(pair, '=', plen);
        size_t klen = eq ? (size_t)(eq - pair) : plen;
        char key[64];
        form_decode(pair, klen, key, sizeof key);
        if (strcmp(key, name) == 0) {
            if (eq)
                form_decode(eq + 1, plen - klen - 1, out, outlen);
            else
                out[0] = '\0';
            return true;
        }
        i += plen + 1;
    }
    return false;
}

static void sweep_expired_tokens(mock_provider *p, int64_t now);

static void handle_token(mock_provider *p, const mock_request *req, mock_response *resp,
                         int64_t now)
{
    const char *body = req->body ? req->body : "";
    char grant[64], form_id[256], form_secret[256], basic[512];
    const char *id = NULL, *secret = NULL;
    if (!form_get(body, req->body_len, "grant_type", grant, sizeof grant)) {
        set_error(resp, 400, "invalid_request");
        return;
    }
    if (strcmp(grant, "client_credentials") != 0) {
        set_error(resp, 400, "unsupported_grant_type");
        return;
    }
    if (!parse_basic(req->header(req->ctx, "Authorization"), basic, sizeof basic, &id, &secret)) {
        if (form_get(body, req->body_len, "client_id", form_id, sizeof form_id))
            id = form_id;
        if (form_get(body, req->body_len, "client_secret", form_secret, sizeof form_secret))
            secret = form_secret;
    }
    if (!str_eq(id, p->cfg->client_id) || !str_eq(secret, p->cfg->client_secret)) {
        set_error(resp, 401, "unauthorized");
        return;
    }
    if (p->faults.outage) {
        p->stats.faults_injected++;
        set_error(resp, 503, "outage");
        return;
    }
    if (apply_script(p, ROUTE_TOKEN, resp))
        return;
    if (mock_map_size(p->tokens) >= TOKEN_SWEEP_THRESHOLD)
        sweep_expired_tokens(p, now);
    char token[96];
    uint64_t a = rng_next(p), b = rng_next(p);
    snprintf(token, sizeof token, "mock-%s-%016llx%016llx", p->run_id, (unsigned long long)a,
             (unsigned long long)b);
    int64_t *expiry = malloc(sizeof *expiry);
    if (!expiry || mock_map_put(p->tokens, token, expiry, free) < 0) {
        free(expiry);
        set_error(resp, 500, "out of memory");
        return;
    }
    *expiry = now + (int64_t)p->cfg->token_ttl_s * NS_PER_S;
    p->stats.tokens_issued++;
    set_json(resp, 200,
             json_pack("{sssssI}", "access_token", token, "token_type", "Bearer", "expires_in",
                       (json_int_t)p->cfg->token_ttl_s));
    set_header(resp, "Cache-Control", "no-store");
}

static int token_alive(void *value, void *arg)
{
    return *(const int64_t *)value > *(const int64_t *)arg;
}

static void sweep_expired_tokens(mock_provider *p, int64_t now)
{
    mock_map_filter(p->tokens, token_alive, &now, free);
}

static route_id handle_oauth(mock_provider *p, const mock_request *req, mock_response *resp,
                             int64_t now)
{
    if (strcmp(req->path, "/oauth/token") != 0 || strcmp(req->method, "POST") != 0) {
        if (p->faults.outage)
            set_error(resp, 503, "outage");
        else if (strcmp(req->path, "/oauth/token") == 0)
            set_route_error(resp, ROUTE_BAD_METHOD, "POST");
        else
            set_route_error(resp, ROUTE_NOT_FOUND, NULL);
        return ROUTE_NOT_FOUND;
    }
    if (req->body_too_large)
        set_error(resp, 413, "request body too large");
    else
        handle_token(p, req, resp, now);
    return ROUTE_TOKEN;
}

/* ---- admin --------------------------------------------------------------- */

typedef struct gets_walk {
    json_t *obj;
} gets_walk;

static void add_resource_get(const char *key, void *value, void *arg)
{
    gets_walk *w = arg;
    json_object_set_new(w->obj, key, json_integer((json_int_t) * (uint64_t *)value));
}

static json_t *stats_json(mock_provider *p)
{
    const stats *s = &p->stats;
    json_t *requests = json_object();
    for (int r = 0; r < ROUTE_COUNT; r++) {
        json_t *by_status = json_object();
        for (int code = 0; code < MAX_STATUS; code++) {
            if (!s->by_status[r][code])
                continue;
            char key[8];
            snprintf(key, sizeof key, "%d", code);
            json_object_set_new(by_status, key, json_integer((json_int_t)s->by_status[r][code]));
        }
        json_object_set_new(requests, route_names[r], by_status);
    }
    gets_walk w = {json_object()};
    mock_map_each(p->resource_gets, add_resource_get, &w);
    json_t *out = json_pack(
        "{sosIsIsIsIsosIsIsIsI}", "requests", requests, "submissions_created",
        (json_int_t)s->submissions_created, "duplicates_refused", (json_int_t)s->duplicates_refused,
        "rate_limited", (json_int_t)s->rate_limited, "status_checks", (json_int_t)s->status_checks,
        "resource_gets", w.obj, "in_flight", (json_int_t)s->in_flight, "max_in_flight",
        (json_int_t)s->max_in_flight, "tokens_issued", (json_int_t)s->tokens_issued,
        "faults_injected", (json_int_t)s->faults_injected);
    if (out && s->resource_gets_other)
        json_object_set_new(out, "resource_gets_other",
                            json_integer((json_int_t)s->resource_gets_other));
    return out;
}

static json_t *faults_json(const faults *f)
{
    json_t *rates = json_object();
    for (int i = 0; i < f->n_rates; i++) {
        char key[8];
        snprintf(key, sizeof key, "%d", f->rates[i].code);
        json_object_set_new(rates, key, json_real(f->rates[i].p));
    }
    json_t *script = json_object();
    for (int r = 0; r < ROUTE_COUNT; r++) {
        const int_queue *q = &f->script[r];
        if (q->head == q->len)
            continue;
        json_t *arr = json_array();
        for (size_t i = q->head; i < q->len; i++)
            json_array_append_new(arr, json_integer(q->items[i]));
        json_object_set_new(script, route_names[r], arr);
    }
    return json_pack("{sbsosIsIso}", "outage", f->outage, "error_rates", rates, "latency_ms",
                     (json_int_t)f->latency_ms, "latency_jitter_ms", (json_int_t)f->jitter_ms,
                     "script", script);
}

static void reset_state(mock_provider *p)
{
    mock_map_clear(p->submissions, submission_free);
    mock_map_clear(p->idempotency, idem_record_free);
    mock_map_clear(p->tokens, free);
    mock_map_clear(p->resources, stored_resource_free);
    mock_map_clear(p->resource_gets, free);
    mock_limiter_reset(p->limiter);
    faults_from_config(&p->faults, p->cfg);
    long in_flight = p->stats.in_flight;
    memset(&p->stats, 0, sizeof p->stats);
    p->stats.in_flight = in_flight;
    p->stats.max_in_flight = in_flight;
}

static const char *read_latency(json_t *v, long *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0 ||
        json_integer_value(v) > MAX_FAULT_LATENCY_MS)
        return "must be an integer in 0..600000";
    *out = (long)json_integer_value(v);
    return NULL;
}

static route_id route_by_name(const char *name)
{
    for (int r = 0; r < ROUTE_COUNT; r++)
        if (strcmp(name, route_names[r]) == 0)
            return (route_id)r;
    return ROUTE_NOT_FOUND;
}

/* Applies a POST /__admin/faults body: either every key or none. */
static void update_faults(mock_provider *p, json_t *root, mock_response *resp)
{
    faults next = p->faults;
    bool new_script = false;
    char msg[300];
    const char *key;
    json_t *v;
    memset(next.script, 0, sizeof next.script);
    if (!json_is_object(root)) {
        snprintf(msg, sizeof msg, "body must be a JSON object");
        goto bad;
    }
    json_object_foreach(root, key, v)
    {
        const char *problem = NULL;
        if (strcmp(key, "outage") == 0) {
            if (json_is_boolean(v))
                next.outage = json_is_true(v);
            else
                problem = "must be true or false";
        } else if (strcmp(key, "latency_ms") == 0) {
            problem = read_latency(v, &next.latency_ms);
        } else if (strcmp(key, "latency_jitter_ms") == 0) {
            problem = read_latency(v, &next.jitter_ms);
        } else if (strcmp(key, "error_rates") == 0) {
            const char *code_text;
            json_t *pv;
            double sum = 0.0;
            next.n_rates = 0;
            if (!json_is_object(v) || json_object_size(v) > MOCK_MAX_ERROR_RATES)
                problem = "must be an object of at most 32 \"CODE\": P";
            json_object_foreach(v, code_text, pv)
            {
                char *end;
                long code = strtol(code_text, &end, 10);
                if (problem)
                    break;
                if (end == code_text || *end || mock_error_code_valid(code, msg, 100) < 0 ||
                    !json_is_number(pv) || json_number_value(pv) < 0 || json_number_value(pv) > 1) {
                    problem = "wants status codes (0 or 100..599) mapped to 0 <= P <= 1";
                    break;
                }
                sum += json_number_value(pv);
                next.rates[next.n_rates++] =
                    (mock_error_rate){.code = (int)code, .p = json_number_value(pv)};
            }
            if (!problem && sum > 1.0 + 1e-9)
                problem = "probabilities add up to more than 1";
        } else if (strcmp(key, "script") == 0) {
            const char *name;
            json_t *arr;
            new_script = true;
            if (!json_is_object(v))
                problem = "must be an object of \"METHOD /path\": [status, ...]";
            json_object_foreach(v, name, arr)
            {
                route_id r = route_by_name(name);
                if (problem)
                    break;
                if (r == ROUTE_NOT_FOUND || !json_is_array(arr) ||
                    json_array_size(arr) > MAX_SCRIPT_LEN) {
                    problem = "keys are routes as in /__admin/stats, values arrays of statuses";
                    break;
                }
                int_queue *q = &next.script[r];
                free(q->items);
                memset(q, 0, sizeof *q);
                q->items = malloc((json_array_size(arr) + 1) * sizeof *q->items);
                if (!q->items) {
                    problem = "out of memory";
                    break;
                }
                size_t i;
                json_t *item;
                json_array_foreach(arr, i, item)
                {
                    if (!json_is_integer(item) ||
                        mock_error_code_valid((long)json_integer_value(item), msg, 100) < 0) {
                        problem = "script entries must be 0 or 100..599";
                        break;
                    }
                    q->items[q->len++] = (int)json_integer_value(item);
                }
            }
        } else {
            problem = "is unknown (outage, error_rates, latency_ms, latency_jitter_ms, script)";
        }
        if (problem) {
            snprintf(msg, sizeof msg, "%s %s", key, problem);
            goto bad;
        }
    }
    if (new_script) {
        for (int r = 0; r < ROUTE_COUNT; r++)
            script_clear(&p->faults.script[r]);
    } else {
        memcpy(next.script, p->faults.script, sizeof next.script);
    }
    p->faults = next;
    set_json(resp, 200, faults_json(&p->faults));
    return;
bad:
    for (int r = 0; r < ROUTE_COUNT; r++)
        script_clear(&next.script[r]);
    set_error(resp, 400, msg);
}

static void store_resource(mock_provider *p, const char *id, json_t *body, mock_response *resp)
{
    stored_resource *r = calloc(1, sizeof *r);
    if (!r || mock_map_put(p->resources, id, r, stored_resource_free) < 0) {
        free(r);
        json_decref(body);
        set_error(resp, 500, "out of memory");
        return;
    }
    r->body = body;
    set_json(resp, 200, json_pack("{sssb}", "id", id, body ? "stored" : "deleted", 1));
}

static void handle_admin(mock_provider *p, const mock_request *req, mock_response *resp)
{
    const char *m = req->method, *path = req->path + strlen("/__admin");
    const char *allow = NULL;
    if (req->body_too_large) {
        set_error(resp, 413, "request body too large");
    } else if (strcmp(path, "/stats") == 0) {
        if (strcmp(m, "GET") == 0)
            set_json(resp, 200, stats_json(p));
        else
            allow = "GET";
    } else if (strcmp(path, "/reset") == 0) {
        if (strcmp(m, "POST") == 0) {
            reset_state(p);
            set_json(resp, 200, json_pack("{sb}", "reset", 1));
        } else {
            allow = "POST";
        }
    } else if (strcmp(path, "/faults") == 0) {
        if (strcmp(m, "GET") == 0) {
            set_json(resp, 200, faults_json(&p->faults));
        } else if (strcmp(m, "POST") == 0) {
            json_t *root = parse_body(req, resp);
            if (root)
                update_faults(p, root, resp);
            json_decref(root);
        } else {
            allow = "GET, POST";
        }
    } else if (starts_with(path, "/resources/") && path[11] && !strchr(path + 11, '/')) {
        const char *id = path + 11;
        if (strcmp(m, "PUT") == 0) {
            json_t *root = parse_body(req, resp);
            if (root)
                store_resource(p, id, root, resp);
        } else if (strcmp(m, "DELETE") == 0) {
            store_resource(p, id, NULL, resp);
        } else {
            allow = "PUT, DELETE";
        }
    } else {
        set_error(resp, 404, "not found");
    }
    if (allow) {
        set_error(resp, 405, "method not allowed");
        set_header(resp, "Allow", "%s", allow);
    }
}

/* ---- entry point --------------------------------------------------------- */

void mock_provider_handle(mock_provider *p, const mock_request *req, mock_response *resp)
{
    memset(resp, 0, sizeof *resp);
    pthread_mutex_lock(&p->lock);
    int64_t now = mock_now_ns(); /* under the lock: the limiter needs ordered times */
    route_id route = ROUTE_NOT_FOUND;
    if (starts_with(req->path, "/__admin/"))
        handle_admin(p, req, resp);
    else if (starts_with(req->path, "/api/"))
        route = handle_api(p, req, resp, now);
    else if (starts_with(req->path, "/oauth/"))
        route = handle_oauth(p, req, resp, now);
    else
        set_error(resp, 404, "not found");
    if (route >= 0 && resp->status >= 0 && resp->status < MAX_STATUS)
        p->stats.by_status[route][resp->status]++;
    pthread_mutex_unlock(&p->lock);
}
