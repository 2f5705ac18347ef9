/* The worker's settings: one table of name, type, bounds, default, help and
 * target field.  Validation and --help both read the table, so they agree. */
#ifndef IW_CONFIG_H
#define IW_CONFIG_H

#include <stdio.h>

#include "maintenance.h"
#include "parse.h"
#include "status.h"

typedef enum iw_auth_mode {
    IW_AUTH_API_KEY,
    IW_AUTH_OAUTH2,
    IW_AUTH_BASIC,
    IW_AUTH_NONE,
} iw_auth_mode;

typedef enum iw_log_level {
    IW_LOG_DEBUG,
    IW_LOG_INFO,
    IW_LOG_WARN,
    IW_LOG_ERROR,
} iw_log_level;

#define IW_MAX_TERMINAL 16
/* IW_AMQP_URL: most nodes of one cluster */
#define IW_MAX_AMQP_NODES 16

typedef struct iw_config {
    char *amqp_url;
    char *amqp_ca, *amqp_cert, *amqp_key; /* TLS to the broker (amqps://) */
    int amqp_tls_no_verify;               /* IW_AMQP_TLS_VERIFY=off */
    char *redis_url;
    char *provider_url;
    long allow_insecure_http; /* IW_ALLOW_INSECURE_HTTP: credentials over http:// off loopback */
    char *ns;                 /* IW_NAMESPACE */
    int auth_mode;
    char *api_key, *api_secret;
    char *oauth_client_id, *oauth_client_secret;
    char *basic_user, *basic_password;
    char *tls_cert, *tls_key, *tls_ca;
    iw_rate_tier rate_tiers[IW_MAX_TIERS];
    size_t n_rate_tiers;
    long rate_guard_ms;
    long submit_share_pct;
    long poll_share_pct;
    long resource_share_pct;
    long concurrency;
    long prefetch;
    char *http_addr;
    int log_level;
    long retry_schedule_ms[IW_MAX_SCHEDULE];
    size_t n_retry;
    long breaker_failures;
    long breaker_open_ms;
    long rate_alert_pct;      /* IW_RATE_ALERT: normal calls' share of any tier */
    long max_rate_pause_ms;   /* IW_MAX_RATE_PAUSE: cap of waits the provider imposes */
    long require_noeviction;  /* IW_REQUIRE_NOEVICTION: 1 refuses an evicting Redis */
    char *maintenance_raw;    /* IW_MAINTENANCE_WINDOWS as given (NULL: none) */
    maintenance *maintenance; /* ... parsed; NULL when none (maintenance_active: 0) */
    long poll_schedule_ms[IW_MAX_SCHEDULE];
    size_t n_poll;
    long poll_max_age_ms;
    long poll_jitter_pct;
    long cache_ttl_ms;
    long cache_negative_ttl_ms; /* a remembered 404 */
    long cache_stale_ttl_ms;    /* the fallback copy kept for provider outages */
    long resolver_wait_ms;      /* longest a look-up waits before a fallback answer */
    long resolver_retry_ms[IW_MAX_SCHEDULE];
    size_t n_resolver_retry;
    char *terminal_statuses_raw;
    char *terminal[IW_MAX_TERMINAL];
    size_t n_terminal;
    long max_message_bytes;
    long max_held_bytes;    /* delivery bodies held by one process, all together */
    long quorum_group_size; /* x-quorum-initial-group-size; 0: the broker's default */
    long max_response_bytes;
    char *client_id;
    long shutdown_grace_ms;
    int queue_classic; /* IW_QUEUE_TYPE=classic */
    long delivery_limit;
    long http_timeout_ms;
    long token_backoff_min_ms; /* IW_TOKEN_BACKOFF_MIN: first wait after a failed token fetch */
    long token_backoff_max_ms; /* IW_TOKEN_BACKOFF_MAX: the doubling stops here */
    long http_connect_timeout_ms;
    long hold_max_ms;
    long turn_linger_ms; /* IW_TURN_LINGER: loop_set_linger */
    long idempotency_ttl_ms;
    long redis_timeout_ms;
    char *redis_password;          /* IW_REDIS_PASSWORD: the data nodes' (overrides the URL's) */
    char *redis_sentinels;         /* IW_REDIS_SENTINELS: host:port,...; NULL: no Sentinel */
    char *redis_master;            /* IW_REDIS_MASTER: the master name the sentinels watch */
    char *redis_sentinel_password; /* IW_REDIS_SENTINEL_PASSWORD */
    long redis_wait_replicas;      /* IW_REDIS_WAIT_REPLICAS: WAIT after guarding records */
    long redis_wait_timeout_ms;    /* IW_REDIS_WAIT_TIMEOUT */
    char *schema_dir;
} iw_config;

/* Reads every setting from the environment (and NAME_FILE for secrets) into a
 * new config.  On a bad value returns NULL with IW_ERR_CONFIG and err->msg a
 * one-line message naming the variable.  Unknown IW_ variables are reported
 * through `warn` (may be NULL) and do not fail. */
iw_config *config_from_env(char **envp, void (*warn)(const char *msg), iw_error *err);
void config_free(iw_config *cfg);

/* The settings a role that calls the provider needs on top (credentials for
 * IW_AUTH_MODE); IW_ERR_CONFIG naming the missing variable. */
int config_check_provider(const iw_config *cfg, iw_error *err);

/* Prints the settings table (name, default, help) for --help. */
void config_print_help(FILE *out);

/* The name of the i-th setting of the table, NULL past the last (for the
 * fuzzer and tests that walk every setting). */
const char *config_setting_name(size_t i);

/* True if `status` is one of IW_TERMINAL_STATUSES. */
int config_is_terminal(const iw_config *cfg, const char *status);

#endif
