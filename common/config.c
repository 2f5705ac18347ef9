#include "config.h"
#include "redis_link.h"

#include <amqp.h>
#include <curl/curl.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "redis_link.h"

/* The longest IW_NAMESPACE.  Names made from it: AMQP queues and exchanges
 * (at most 255 bytes; the longest is "<ns>.delay.65536000", 15 more) and
 * Redis keys ("<ns>:limiter:demand:resource", "<ns>:job:<jobKey>"...).  100
 * bytes leave every one of them far inside its limit. */
#define NS_MAX 100
/* The longest secret read from NAME_FILE (a longer file is refused, not cut). */
#define SECRET_FILE_MAX 65536

typedef enum setting_type {
    T_STRING,
    T_SECRET, /* a string that may also come from NAME_FILE; never printed */
    T_URL,
    T_LONG,
    T_DURATION,
    T_RATE_LIMITS,
    T_SCHEDULE,
    T_ENUM,
    T_LIST,
    T_WINDOWS, /* IW_MAINTENANCE_WINDOWS: kept as text, parsed into cfg->maintenance */
} setting_type;

typedef struct setting {
    const char *name;
    setting_type type;
    const char *def;
    long min, max;
    const char *const *choices; /* T_ENUM: NULL-terminated */
    size_t offset;
    size_t count_offset; /* T_RATE_LIMITS, T_SCHEDULE, T_LIST: where the count goes */
    const char *help;
} setting;

static const char *const auth_choices[] = {"api-key", "oauth2", "basic", "none", NULL};
static const char *const level_choices[] = {"debug", "info", "warn", "error", NULL};
static const char *const queue_choices[] = {"quorum", "classic", NULL};
static const char *const on_off[] = {"on", "off", NULL};

#define F(field) offsetof(iw_config, field)
#define DAY_MS 86400000L

static const setting settings[] = {
    {"IW_AMQP_URL", T_URL, "amqp://guest:guest@127.0.0.1:5672/%2f", 0, 0, NULL, F(amqp_url), 0,
     "broker URL (amqps:// for TLS); several comma-separated URLs are the nodes of one cluster, "
     "tried in turn"},
    {"IW_AMQP_CA", T_STRING, NULL, 0, 0, NULL, F(amqp_ca), 0,
     "CA bundle (PEM) that signs the broker's certificate, for amqps:// (default: the system's)"},
    {"IW_AMQP_CERT", T_STRING, NULL, 0, 0, NULL, F(amqp_cert), 0,
     "client certificate (PEM) for mutual TLS to the broker; with IW_AMQP_KEY"},
    {"IW_AMQP_KEY", T_STRING, NULL, 0, 0, NULL, F(amqp_key), 0,
     "client key (PEM) for mutual TLS to the broker"},
    {"IW_AMQP_TLS_VERIFY", T_ENUM, "on", 0, 0, on_off, F(amqp_tls_no_verify), 0,
     "on: verify the broker's certificate and host name; off only for tests"},
    {"IW_REDIS_URL", T_URL, "redis://127.0.0.1:6379/0", 0, 0, NULL, F(redis_url), 0,
     "shared state: limiter, breaker, cache, idempotency"},
    {"IW_PROVIDER_URL", T_URL, "http://127.0.0.1:8080", 0, 0, NULL, F(provider_url), 0,
     "provider base URL; /api/v1/... and /oauth/token are appended"},
    {"IW_ALLOW_INSECURE_HTTP", T_LONG, "0", 0, 1, NULL, F(allow_insecure_http), 0,
     "1 lets provider credentials go over plain http:// to a host that is not loopback "
     "(warned about at start-up); otherwise such a setting is refused"},
    {"IW_NAMESPACE", T_STRING, "ext-api", 0, 0, NULL, F(ns), 0,
     "prefix of every exchange, queue and Redis key"},
    {"IW_AUTH_MODE", T_ENUM, "api-key", 0, 0, auth_choices, F(auth_mode), 0,
     "api-key, oauth2, basic or none (mTLS combines with any via IW_TLS_*)"},
    {"IW_API_KEY", T_SECRET, NULL, 0, 0, NULL, F(api_key), 0, "sent as X-API-Key"},
    {"IW_API_SECRET", T_SECRET, NULL, 0, 0, NULL, F(api_secret), 0, "sent as X-API-Secret"},
    {"IW_OAUTH_CLIENT_ID", T_SECRET, NULL, 0, 0, NULL, F(oauth_client_id), 0,
     "client-credentials grant at /oauth/token"},
    {"IW_OAUTH_CLIENT_SECRET", T_SECRET, NULL, 0, 0, NULL, F(oauth_client_secret), 0,
     "client-credentials grant at /oauth/token"},
    {"IW_BASIC_USER", T_SECRET, NULL, 0, 0, NULL, F(basic_user), 0, "for IW_AUTH_MODE=basic"},
    {"IW_BASIC_PASSWORD", T_SECRET, NULL, 0, 0, NULL, F(basic_password), 0,
     "for IW_AUTH_MODE=basic"},
    {"IW_TLS_CERT", T_STRING, NULL, 0, 0, NULL, F(tls_cert), 0, "client certificate (mTLS)"},
    {"IW_TLS_KEY", T_STRING, NULL, 0, 0, NULL, F(tls_key), 0, "client key path (mTLS)"},
    {"IW_TLS_CA", T_STRING, NULL, 0, 0, NULL, F(tls_ca), 0, "CA bundle for the provider"},
    {"IW_RATE_LIMITS", T_RATE_LIMITS, "50/min,1000/hour,20000/day", 0, 0, NULL, F(rate_tiers),
     F(n_rate_tiers), "shared limits on every provider call, all pods together (N/T,...)"},
    {"IW_RATE_GUARD", T_DURATION, "50ms", 0, 60000, NULL, F(rate_guard_ms), 0,
     "added to every rate window: absorbs the jitter between taking a permit and the call "
     "reaching the provider"},
    {"IW_SUBMIT_SHARE", T_LONG, "80", 1, 100, NULL, F(submit_share_pct), 0,
     "percent of the normal part of each rate tier (IW_RATE_ALERT) submissions may use while "
     "other calls wait (critical: 100)"},
    {"IW_POLL_SHARE", T_LONG, "50", 1, 100, NULL, F(poll_share_pct), 0,
     "percent of the normal part of each rate tier status checks may use while other calls wait"},
    {"IW_RESOURCE_SHARE", T_LONG, "50", 1, 100, NULL, F(resource_share_pct), 0,
     "percent of the normal part of each rate tier resource look-ups may use while other calls "
     "wait"},
    {"IW_CONCURRENCY", T_LONG, "64", 1, 10000, NULL, F(concurrency), 0,
     "provider calls in flight per process"},
    {"IW_PREFETCH", T_LONG, "0", 0, 65535, NULL, F(prefetch), 0,
     "unacknowledged deliveries per process (0: 2 x IW_CONCURRENCY)"},
    {"IW_HTTP_ADDR", T_STRING, "0.0.0.0:9400", 0, 0, NULL, F(http_addr), 0,
     "/metrics, /healthz, /readyz; off disables"},
    {"IW_LOG_LEVEL", T_ENUM, "info", 0, 0, level_choices, F(log_level), 0,
     "debug, info, warn or error"},
    {"IW_RETRY_SCHEDULE", T_SCHEDULE, "0s,2s,4s,8s", 0, 0, NULL, F(retry_schedule_ms), F(n_retry),
     "wait before each attempt; its length is the number of attempts"},
    {"IW_BREAKER_FAILURES", T_LONG, "5", 1, 1000, NULL, F(breaker_failures), 0,
     "consecutive failures that open the circuit breaker"},
    {"IW_BREAKER_OPEN", T_DURATION, "60s", 1000, DAY_MS, NULL, F(breaker_open_ms), 0,
     "how long the breaker stays open"},
    {"IW_RATE_ALERT", T_LONG, "80", 1, 100, NULL, F(rate_alert_pct), 0,
     "percent of any rate tier normal calls may use; the rest is kept for critical ones; "
     "crossing it logs a warning (100: no throttle)"},
    {"IW_MAX_RATE_PAUSE", T_DURATION, "1h", 1000, 7 * DAY_MS, NULL, F(max_rate_pause_ms), 0,
     "the longest wait a provider's Retry-After or reset header can impose"},
    {"IW_MAINTENANCE_WINDOWS", T_WINDOWS, NULL, 0, 0, NULL, F(maintenance_raw), 0,
     "comma-separated 'Day HH:MM-HH:MM Zone' (e.g. Sun 02:00-04:00 America/New_York): normal "
     "calls wait for the window's end, critical ones are tried"},
    {"IW_REQUIRE_NOEVICTION", T_LONG, "0", 0, 1, NULL, F(require_noeviction), 0,
     "1: refuse to start when Redis's maxmemory-policy may evict keys (0: warn)"},
    {"IW_POLL_SCHEDULE", T_SCHEDULE, "5s,10s,30s,1m,5m", 0, 0, NULL, F(poll_schedule_ms), F(n_poll),
     "waits between status checks; the last one repeats"},
    {"IW_POLL_MAX_AGE", T_DURATION, "24h", 1000, 30 * DAY_MS, NULL, F(poll_max_age_ms), 0,
     "give up polling a tracking id after this long"},
    {"IW_POLL_JITTER", T_LONG, "20", 0, 100, NULL, F(poll_jitter_pct), 0,
     "random +/- percent added to each poll wait"},
    {"IW_CACHE_TTL", T_DURATION, "300s", 1000, 30 * DAY_MS, NULL, F(cache_ttl_ms), 0,
     "resource cache TTL"},
    {"IW_CACHE_NEGATIVE_TTL", T_DURATION, "30s", 1000, DAY_MS, NULL, F(cache_negative_ttl_ms), 0,
     "how long a resource the provider answered 404 for is remembered"},
    {"IW_CACHE_STALE_TTL", T_DURATION, "24h", 1000, 30 * DAY_MS, NULL, F(cache_stale_ttl_ms), 0,
     "how long the stale copy used when the provider is down is kept"},
    {"IW_RESOLVER_WAIT", T_DURATION, "2s", 100, 60000, NULL, F(resolver_wait_ms), 0,
     "longest a resource look-up waits (provider, limiter, another worker's call) before it is "
     "answered from the stale copy or with an error"},
    {"IW_RESOLVER_RETRY_SCHEDULE", T_SCHEDULE, "0s,200ms", 0, 0, NULL, F(resolver_retry_ms),
     F(n_resolver_retry), "provider attempts of one look-up: the wait before each"},
    {"IW_TERMINAL_STATUSES", T_LIST, "completed,failed,rejected,cancelled", 0, 0, NULL,
     F(terminal_statuses_raw), F(n_terminal), "statuses that end polling"},
    {"IW_MAX_MESSAGE_BYTES", T_LONG, "1048576", 64, 134217728L, NULL, F(max_message_bytes), 0,
     "larger jobs are dead-lettered unread (MESSAGE_TOO_LARGE)"},
    {"IW_MAX_HELD_BYTES", T_LONG, "67108864", 65536, 68719476736L, NULL, F(max_held_bytes), 0,
     "delivery bodies one process holds, all together; a delivery larger than what is left is "
     "rejected unread (the broker dead-letters it) and consuming pauses while it is used up"},
    {"IW_QUORUM_GROUP_SIZE", T_LONG, "0", 0, 99, NULL, F(quorum_group_size), 0,
     "replicas of each quorum queue (x-quorum-initial-group-size); 0: the broker's default "
     "(RabbitMQ 3.10: quorum_cluster_size, 3, at most the cluster's nodes)"},
    {"IW_MAX_RESPONSE_BYTES", T_LONG, "1048576", 1024, 134217728L, NULL, F(max_response_bytes), 0,
     "larger provider responses are an error"},
    {"IW_CLIENT_ID", T_STRING, "integration-worker", 0, 0, NULL, F(client_id), 0,
     "client_info.client_id in outbound bodies"},
    {"IW_SHUTDOWN_GRACE", T_DURATION, "30s", 0, 3600000L, NULL, F(shutdown_grace_ms), 0,
     "time to finish in-flight work on SIGTERM"},
    {"IW_QUEUE_TYPE", T_ENUM, "quorum", 0, 0, queue_choices, F(queue_classic), 0,
     "quorum or classic"},
    {"IW_DELIVERY_LIMIT", T_LONG, "10", 1, 1000, NULL, F(delivery_limit), 0,
     "deliveries of one message before the broker dead-letters it (quorum queues)"},
    {"IW_HTTP_TIMEOUT", T_DURATION, "10s", 100, 600000L, NULL, F(http_timeout_ms), 0,
     "whole provider call, after which it counts as a timeout"},
    {"IW_TOKEN_BACKOFF_MIN", T_DURATION, "1s", 100, 600000L, NULL, F(token_backoff_min_ms), 0,
     "OAuth2: wait after a failed token fetch; doubles with each further failure"},
    {"IW_TOKEN_BACKOFF_MAX", T_DURATION, "30s", 100, 3600000L, NULL, F(token_backoff_max_ms), 0,
     "OAuth2: the longest wait between token fetches while the token endpoint fails"},
    {"IW_HTTP_CONNECT_TIMEOUT", T_DURATION, "3s", 100, 600000L, NULL, F(http_connect_timeout_ms), 0,
     "TCP/TLS connect to the provider"},
    {"IW_TURN_LINGER", T_DURATION, "2ms", 0, 20, NULL, F(turn_linger_ms), 0,
     "the most a turn of the event loop woken by few events waits for more (a hundredth of the "
     "provider's mean answer time), so that they share one Redis round trip and broker write: "
     "less CPU per job for about 1% more latency; 0: off"},
    {"IW_HOLD_MAX", T_DURATION, "5s", 0, 600000L, NULL, F(hold_max_ms), 0,
     "limiter waits up to this long keep the delivery unacked; longer ones go to a delay queue"},
    {"IW_IDEMPOTENCY_TTL", T_DURATION, "7d", 60000, 365 * DAY_MS, NULL, F(idempotency_ttl_ms), 0,
     "how long an accepted jobId is remembered in Redis"},
    {"IW_REDIS_TIMEOUT", T_DURATION, "2s", 10, 60000, NULL, F(redis_timeout_ms), 0,
     "connect and command timeout for Redis"},
    {"IW_REDIS_PASSWORD", T_SECRET, NULL, 0, 0, NULL, F(redis_password), 0,
     "password of the Redis data nodes (overrides one in IW_REDIS_URL)"},
    {"IW_REDIS_SENTINELS", T_STRING, NULL, 0, 0, NULL, F(redis_sentinels), 0,
     "Sentinel host:port list; when set, every (re)connect asks them for the master "
     "(IW_REDIS_URL then only gives the db number)"},
    {"IW_REDIS_MASTER", T_STRING, "mymaster", 0, 0, NULL, F(redis_master), 0,
     "the master name the sentinels monitor"},
    {"IW_REDIS_SENTINEL_PASSWORD", T_SECRET, NULL, 0, 0, NULL, F(redis_sentinel_password), 0,
     "password of the sentinels (requirepass in sentinel.conf)"},
    {"IW_REDIS_WAIT_REPLICAS", T_LONG, "0", 0, 16, NULL, F(redis_wait_replicas), 0,
     "replicas that must acknowledge the records guarding against double submission before "
     "the job's events are published (WAIT); 0 skips"},
    {"IW_REDIS_WAIT_TIMEOUT", T_DURATION, "100ms", 1, 60000, NULL, F(redis_wait_timeout_ms), 0,
     "longest a WAIT for IW_REDIS_WAIT_REPLICAS waits"},
    {"IW_SCHEMA_DIR", T_STRING, IW_SCHEMA_DIR_DEFAULT, 0, 0, NULL, F(schema_dir), 0,
     "directory of the JSON Schemas"},
};

#define N_SETTINGS (sizeof settings / sizeof settings[0])

/* The file's content without trailing newlines, whole: a file past
 * SECRET_FILE_MAX or holding a NUL is refused, never cut short. */
static char *read_secret_file(const char *path, iw_error *err)
{
    FILE *f = fopen(path, "rb");
    iw_buf b;
    char chunk[4096];
    size_t n;
    char *out = NULL;

    buf_init(&b, SECRET_FILE_MAX);
    if (!f) {
        iw_error_set(err, IW_ERR_CONFIG, "cannot read %s", path);
        return NULL;
    }
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (buf_add(&b, chunk, n) != IW_OK) {
            iw_error_set(err, IW_ERR_CONFIG, "the file is larger than %d bytes", SECRET_FILE_MAX);
            goto out;
        }
    }
    if (ferror(f)) {
        iw_error_set(err, IW_ERR_CONFIG, "cannot read the file");
        goto out;
    }
    if (memchr(buf_ptr(&b), '\0', buf_len(&b))) {
        iw_error_set(err, IW_ERR_CONFIG, "the file holds a NUL byte");
        goto out;
    }
    n = buf_len(&b);
    out = buf_steal(&b);
    while (out && n && (out[n - 1] == '\n' || out[n - 1] == '\r'))
        out[--n] = '\0';
    if (!out)
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
out:
    fclose(f);
    buf_free(&b);
    return out;
}

/* 1 when s holds no byte below 0x20 and no DEL. */
static int no_controls(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7F)
            return 0;
    return 1;
}

/* The items of a comma-separated list setting (IW_TERMINAL_STATUSES). */
static int apply_list(iw_config *cfg, const setting *s, const char *value, iw_error *err)
{
    char *copy = strdup(value), *save = NULL;
    size_t n = 0;
    int rc = IW_OK;

    if (!copy)
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < cfg->n_terminal; i++)
        free(cfg->terminal[i]);
    for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        while (*t == ' ' || *t == '\t')
            t++;
        for (char *end = t + strlen(t); end > t && (end[-1] == ' ' || end[-1] == '\t');)
            *--end = '\0';
        if (!*t)
            continue;
        if (n == IW_MAX_TERMINAL) {
            rc = iw_error_set(err, IW_ERR_CONFIG, "%s: at most %d items", s->name, IW_MAX_TERMINAL);
            break;
        }
        cfg->terminal[n++] = strdup(t);
    }
    free(copy);
    *(size_t *)((char *)cfg + s->count_offset) = n;
    if (rc == IW_OK && n == 0)
        rc = iw_error_set(err, IW_ERR_CONFIG, "%s: must list at least one", s->name);
    return rc;
}

/* Strings, secrets, URLs and lists: text, kept as given. */
static int apply_text(iw_config *cfg, const setting *s, const char *value, iw_error *err)
{
    char **dst = (char **)((char *)cfg + s->offset);

    /* URLs may hold passwords: never echoed (check_urls says what is wrong) */
    if (s->type == T_URL && !strstr(value, "://"))
        return iw_error_set(err, IW_ERR_CONFIG,
                            "%s: not a URL (scheme://...); the value is not shown, it may "
                            "hold a password",
                            s->name);
    if (s->type != T_SECRET && s->type != T_URL && !*value)
        return iw_error_set(err, IW_ERR_CONFIG, "%s: must not be empty", s->name);
    /* Values go into JSON bodies, headers, names and logs: text only */
    if (s->type != T_SECRET && (!utf8_valid(value, strlen(value)) || !no_controls(value)))
        return iw_error_set(err, IW_ERR_CONFIG, "%s: must be UTF-8 text without control characters",
                            s->name);
    free(*dst);
    if (!(*dst = strdup(value)))
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    return s->type == T_LIST ? apply_list(cfg, s, value, err) : IW_OK;
}

static int apply_duration(iw_config *cfg, const setting *s, const char *value, iw_error *err)
{
    char lo[32], hi[32];
    iw_error e = {0};
    long v;

    if (parse_duration_ms(value, &v, &e) != IW_OK)
        return iw_error_set(err, IW_ERR_CONFIG, "%s: %s", s->name, e.msg);
    if (v < s->min || v > s->max)
        return iw_error_set(err, IW_ERR_CONFIG, "%s: '%s' is outside %s..%s", s->name, value,
                            format_duration(s->min, lo, sizeof lo),
                            format_duration(s->max, hi, sizeof hi));
    *(long *)((char *)cfg + s->offset) = v;
    return IW_OK;
}

static int apply_windows(iw_config *cfg, const setting *s, const char *value, iw_error *err)
{
    char **dst = (char **)((char *)cfg + s->offset);
    maintenance *m = NULL;
    iw_error e = {0};

    if (maintenance_parse(value, &m, &e) != IW_OK)
        return iw_error_set(err, IW_ERR_CONFIG, "%s: %s", s->name, e.msg);
    maintenance_free(cfg->maintenance);
    cfg->maintenance = m;
    free(*dst);
    *dst = strdup(value);
    return IW_OK;
}

static int apply_enum(iw_config *cfg, const setting *s, const char *value, iw_error *err)
{
    for (int i = 0; s->choices[i]; i++) {
        if (strcmp(value, s->choices[i]) == 0) {
            *(int *)((char *)cfg + s->offset) = i;
            return IW_OK;
        }
    }
    return iw_error_set(err, IW_ERR_CONFIG, "%s: '%s' is not one of the allowed values", s->name,
                        value);
}

/* Parses value into the setting's field of cfg, by the setting's type. */
static int apply(iw_config *cfg, const setting *s, const char *value, iw_error *err)
{
    char *base = (char *)cfg;
    iw_error e = {0};
    int rc = IW_OK;

    switch (s->type) {
    case T_STRING:
    case T_SECRET:
    case T_URL:
    case T_LIST:
        return apply_text(cfg, s, value, err);
    case T_DURATION:
        return apply_duration(cfg, s, value, err);
    case T_WINDOWS:
        return apply_windows(cfg, s, value, err);
    case T_ENUM:
        return apply_enum(cfg, s, value, err);
    case T_LONG:
        rc = parse_long(value, s->min, s->max, (long *)(base + s->offset), &e);
        break;
    case T_RATE_LIMITS:
        rc = parse_rate_limits(value, (iw_rate_tier *)(base + s->offset),
                               (size_t *)(base + s->count_offset), &e);
        break;
    case T_SCHEDULE:
        rc = parse_schedule(value, (long *)(base + s->offset), (size_t *)(base + s->count_offset),
                            &e);
        break;
    default:
        return iw_error_set(err, IW_ERR_CONFIG, "%s: unhandled type", s->name);
    }
    return rc == IW_OK ? IW_OK : iw_error_set(err, IW_ERR_CONFIG, "%s: %s", s->name, e.msg);
}

static const char *env_lookup(char **envp, const char *name)
{
    size_t len = strlen(name);
    for (char **e = envp; e && *e; e++)
        if (strncmp(*e, name, len) == 0 && (*e)[len] == '=')
            return *e + len + 1;
    return NULL;
}

static int known_variable(const char *entry)
{
    const char *eq = strchr(entry, '=');
    size_t len = eq ? (size_t)(eq - entry) : strlen(entry);

    for (size_t i = 0; i < N_SETTINGS; i++) {
        size_t n = strlen(settings[i].name);
        if (len == n && strncmp(entry, settings[i].name, n) == 0)
            return 1;
        if (settings[i].type == T_SECRET && len == n + 5 &&
            strncmp(entry, settings[i].name, n) == 0 && strncmp(entry + n, "_FILE", 5) == 0)
            return 1;
    }
    return 0;
}

int config_check_provider(const iw_config *cfg, iw_error *err)
{
    if (cfg->auth_mode == IW_AUTH_API_KEY && (!cfg->api_key || !*cfg->api_key))
        return iw_error_set(
            err, IW_ERR_CONFIG,
            "IW_API_KEY: required when IW_AUTH_MODE=api-key (or set IW_API_KEY_FILE)");
    if (cfg->auth_mode == IW_AUTH_OAUTH2 &&
        (!cfg->oauth_client_id || !*cfg->oauth_client_id || !cfg->oauth_client_secret ||
         !*cfg->oauth_client_secret))
        return iw_error_set(err, IW_ERR_CONFIG,
                            "%s: IW_OAUTH_CLIENT_ID and IW_OAUTH_CLIENT_SECRET are "
                            "required when IW_AUTH_MODE=oauth2",
                            cfg->oauth_client_id && *cfg->oauth_client_id ? "IW_OAUTH_CLIENT_SECRET"
                                                                          : "IW_OAUTH_CLIENT_ID");
    if (cfg->auth_mode == IW_AUTH_BASIC &&
        (!cfg->basic_user || !*cfg->basic_user || !cfg->basic_password || !*cfg->basic_password))
        return iw_error_set(err, IW_ERR_CONFIG,
                            "%s: IW_BASIC_USER and IW_BASIC_PASSWORD are required when "
                            "IW_AUTH_MODE=basic",
                            cfg->basic_user && *cfg->basic_user ? "IW_BASIC_PASSWORD"
                                                                : "IW_BASIC_USER");
    return IW_OK;
}

/* Each comma-separated node of IW_AMQP_URL, parsed by librabbitmq exactly as
 * amqp_link will.  The value is never echoed: it holds the broker password. */
static int check_amqp_url(const char *url, iw_error *err)
{
    char *copy = strdup(url), *rest = copy, *node;
    int rc = IW_OK, i = 0;

    if (!copy)
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    while ((node = strsep(&rest, ",")) != NULL) {
        struct amqp_connection_info ci;
        if (++i > IW_MAX_AMQP_NODES) {
            rc =
                iw_error_set(err, IW_ERR_CONFIG, "IW_AMQP_URL: at most %d URLs", IW_MAX_AMQP_NODES);
            break;
        }
        while (*node == ' ')
            node++;
        for (char *end = node + strlen(node); end > node && end[-1] == ' ';)
            *--end = '\0';
        if (strncmp(node, "amqp://", 7) && strncmp(node, "amqps://", 8)) {
            rc = iw_error_set(err, IW_ERR_CONFIG,
                              "IW_AMQP_URL: URL %d must start with amqp:// or amqps:// (the value "
                              "is not shown: it may hold a password)",
                              i);
            break;
        }
        /* librabbitmq takes an empty host for "localhost": that is a typo here */
        const char *auth = strstr(node, "://") + 3;
        size_t auth_len = strcspn(auth, "/");
        const char *host = auth;
        for (const char *p = auth; p < auth + auth_len; p++)
            if (*p == '@')
                host = p + 1;
        int empty_host = host == auth + auth_len || *host == ':';
        amqp_default_connection_info(&ci);
        if (empty_host || amqp_parse_url(node, &ci) != AMQP_STATUS_OK || !ci.host || !*ci.host) {
            rc = iw_error_set(err, IW_ERR_CONFIG,
                              "IW_AMQP_URL: URL %d is not amqp[s]://[user:password@]host[:port]"
                              "[/vhost] (the value is not shown: it may hold a password)",
                              i);
            break;
        }
    }
    free(copy);
    return rc;
}

/* The host of a provider URL is loopback: localhost, 127.0.0.0/8 or ::1. */
static int is_loopback_host(const char *host)
{
    if (strcasecmp(host, "localhost") == 0 || strcmp(host, "[::1]") == 0 ||
        strcmp(host, "::1") == 0)
        return 1;
    if (strncmp(host, "127.", 4) != 0)
        return 0;
    for (const char *p = host + 4; *p; p++)
        if (!(*p == '.' || (*p >= '0' && *p <= '9')))
            return 0;
    return 1;
}

/* IW_PROVIDER_URL parsed by libcurl (as the calls will be); credentials over
 * plain http:// only to loopback unless IW_ALLOW_INSECURE_HTTP=1. */
static int check_provider_url(const iw_config *cfg, void (*warn)(const char *msg), iw_error *err)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL, *query = NULL, *fragment = NULL;
    int rc = IW_OK;

    if (!u)
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    if (curl_url_set(u, CURLUPART_URL, cfg->provider_url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK || !*host) {
        rc = iw_error_set(err, IW_ERR_CONFIG,
                          "IW_PROVIDER_URL: not a valid http:// or https:// URL (the value is not "
                          "shown: it may hold a password)");
        goto out;
    }
    if (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0) {
        rc = iw_error_set(err, IW_ERR_CONFIG,
                          "IW_PROVIDER_URL: must start with http:// or https://");
        goto out;
    }
    if (curl_url_get(u, CURLUPART_QUERY, &query, 0) == CURLUE_OK ||
        curl_url_get(u, CURLUPART_FRAGMENT, &fragment, 0) == CURLUE_OK) {
        rc = iw_error_set(err, IW_ERR_CONFIG,
                          "IW_PROVIDER_URL: must not have a query or fragment (the API paths are "
                          "appended to it)");
        goto out;
    }
    if (strcmp(scheme, "http") == 0 && cfg->auth_mode != IW_AUTH_NONE && !is_loopback_host(host)) {
        if (!cfg->allow_insecure_http) {
            rc = iw_error_set(err, IW_ERR_CONFIG,
                              "IW_PROVIDER_URL: provider credentials would go over plain http:// "
                              "to a host that is not loopback; use https:// or set "
                              "IW_ALLOW_INSECURE_HTTP=1");
            goto out;
        }
        if (warn)
            warn("IW_ALLOW_INSECURE_HTTP=1: provider credentials go over plain http:// to a host "
                 "that is not loopback");
    }
out:
    curl_free(scheme);
    curl_free(host);
    curl_free(query);
    curl_free(fragment);
    curl_url_cleanup(u);
    return rc;
}

static int check_namespace(const char *ns, iw_error *err)
{
    if (strlen(ns) > NS_MAX)
        return iw_error_set(err, IW_ERR_CONFIG,
                            "IW_NAMESPACE: at most %d bytes (it prefixes every queue name, at most "
                            "255 bytes, and Redis key)",
                            NS_MAX);
    for (const char *p = ns; *p; p++)
        if (!(*p == '-' || *p == '_' || *p == '.' || (*p >= 'a' && *p <= 'z') ||
              (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9')))
            return iw_error_set(err, IW_ERR_CONFIG,
                                "IW_NAMESPACE: only letters, digits, '-', '_' and '.' are allowed");
    /* RabbitMQ refuses to declare names starting with "amq." */
    if (strncmp(ns, "amq.", 4) == 0 || strcmp(ns, "amq") == 0)
        return iw_error_set(err, IW_ERR_CONFIG,
                            "IW_NAMESPACE: names starting with 'amq.' are reserved by RabbitMQ");
    return IW_OK;
}

/* Credentials that go into header lines: a CR or LF would start a line of its
 * own, so they are refused here, by name and without the value. */
static int check_secrets(const iw_config *cfg, iw_error *err)
{
    static const struct {
        const char *name;
        size_t offset;
    } header_secrets[] = {{"IW_API_KEY", F(api_key)}, {"IW_API_SECRET", F(api_secret)}};

    for (size_t i = 0; i < sizeof header_secrets / sizeof header_secrets[0]; i++) {
        const char *v = *(char *const *)((const char *)cfg + header_secrets[i].offset);
        if (v && !no_controls(v))
            return iw_error_set(err, IW_ERR_CONFIG,
                                "%s: holds control characters (CR, LF, ...); it is sent as an "
                                "HTTP header",
                                header_secrets[i].name);
    }
    if (cfg->basic_user && strchr(cfg->basic_user, ':'))
        return iw_error_set(err, IW_ERR_CONFIG,
                            "IW_BASIC_USER: must not hold ':' (HTTP basic auth splits on it)");
    return IW_OK;
}

static int check_combinations(const iw_config *cfg, void (*warn)(const char *msg), iw_error *err)
{
    iw_error e = {0};
    int rc;

    if (!!cfg->tls_cert != !!cfg->tls_key)
        return iw_error_set(err, IW_ERR_CONFIG,
                            "IW_TLS_CERT: IW_TLS_CERT and IW_TLS_KEY go together");
    if (!!cfg->amqp_cert != !!cfg->amqp_key)
        return iw_error_set(err, IW_ERR_CONFIG,
                            "IW_AMQP_CERT: IW_AMQP_CERT and IW_AMQP_KEY go together");
    if ((rc = check_amqp_url(cfg->amqp_url, err)) != IW_OK)
        return rc;
    if (strncmp(cfg->redis_url, "redis://", 8))
        return iw_error_set(err, IW_ERR_CONFIG, "IW_REDIS_URL: must start with redis://");
    if (cfg->redis_sentinels) {
        size_t n;
        if (redis_parse_sentinels(cfg->redis_sentinels, NULL, REDIS_MAX_SENTINELS, &n, err) !=
            IW_OK)
            return IW_ERR_CONFIG;
    }
    if (!redis_master_name_ok(cfg->redis_master))
        return iw_error_set(err, IW_ERR_CONFIG,
                            "IW_REDIS_MASTER: 1..128 letters, digits, '-', '_' or '.'");
    /* parsed by redis_link exactly as the roles will (no connection made) */
    redis_link *r = redis_link_new(cfg->redis_url, 1000, &e);
    if (!r)
        return iw_error_set(err, IW_ERR_CONFIG,
                            "IW_REDIS_URL: expected redis://[:password@]host[:port][/db] (the "
                            "value is not shown: it may hold a password)");
    redis_link_free(r);
    if (strncmp(cfg->provider_url, "http://", 7) && strncmp(cfg->provider_url, "https://", 8))
        return iw_error_set(err, IW_ERR_CONFIG,
                            "IW_PROVIDER_URL: must start with http:// or https://");
    if ((rc = check_namespace(cfg->ns, err)) != IW_OK)
        return rc;
    if ((rc = check_secrets(cfg, err)) != IW_OK)
        return rc;
    return check_provider_url(cfg, warn, err); /* last: it may warn */
}

iw_config *config_from_env(char **envp, void (*warn)(const char *msg), iw_error *err)
{
    iw_config *cfg = calloc(1, sizeof *cfg);
    char name_file[128];

    if (!cfg) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < N_SETTINGS; i++) {
        const setting *s = &settings[i];
        const char *value = env_lookup(envp, s->name);
        char *from_file = NULL;
        int rc;

        if (s->type == T_SECRET) {
            snprintf(name_file, sizeof name_file, "%s_FILE", s->name);
            const char *path = env_lookup(envp, name_file);
            if (path && value) {
                iw_error_set(err, IW_ERR_CONFIG, "%s: set either %s or %s, not both", s->name,
                             s->name, name_file);
                goto fail;
            }
            if (path) {
                iw_error e;
                from_file = read_secret_file(path, &e);
                if (!from_file) {
                    iw_error_set(err, IW_ERR_CONFIG, "%s: %s", name_file, e.msg);
                    goto fail;
                }
                value = from_file;
            }
        }
        if (!value)
            value = s->def;
        if (!value)
            continue;
        rc = apply(cfg, s, value, err);
        free(from_file);
        if (rc != IW_OK)
            goto fail;
    }
    if (check_combinations(cfg, warn, err) != IW_OK)
        goto fail;
    if (warn) {
        for (char **e = envp; e && *e; e++) {
            if (strncmp(*e, "IW_", 3) == 0 && !known_variable(*e)) {
                /* the name is outside bytes: quoted safely and capped */
                const char *eq = strchr(*e, '=');
                size_t len = eq ? (size_t)(eq - *e) : strlen(*e);
                iw_buf msg;
                buf_init(&msg, 512);
                if (buf_adds(&msg, "unknown setting ") == IW_OK &&
                    buf_add_text(&msg, *e, len, 200) == IW_OK &&
                    buf_adds(&msg, " ignored") == IW_OK)
                    warn(buf_ptr(&msg));
                buf_free(&msg);
            }
        }
    }
    return cfg;
fail:
    config_free(cfg);
    return NULL;
}

void config_free(iw_config *cfg)
{
    if (!cfg)
        return;
    for (size_t i = 0; i < N_SETTINGS; i++) {
        const setting *s = &settings[i];
        if (s->type == T_STRING || s->type == T_SECRET || s->type == T_URL || s->type == T_LIST ||
            s->type == T_WINDOWS)
            free(*(char **)((char *)cfg + s->offset));
    }
    maintenance_free(cfg->maintenance);
    for (size_t i = 0; i < cfg->n_terminal; i++)
        free(cfg->terminal[i]);
    free(cfg);
}

void config_print_help(FILE *out)
{
    fprintf(out, "Settings (environment; secrets also accept NAME_FILE):\n");
    for (size_t i = 0; i < N_SETTINGS; i++) {
        const setting *s = &settings[i];
        fprintf(out, "  %-24s %s\n  %-24s   default: %s\n", s->name, s->help, "",
                s->def ? s->def : "(none)");
    }
}

const char *config_setting_name(size_t i)
{
    return i < N_SETTINGS ? settings[i].name : NULL;
}

int config_is_terminal(const iw_config *cfg, const char *status)
{
    for (size_t i = 0; i < cfg->n_terminal; i++)
        if (strcmp(cfg->terminal[i], status) == 0)
            return 1;
    return 0;
}
