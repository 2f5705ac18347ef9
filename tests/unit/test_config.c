/* The config module: defaults of the contract's table, one-line errors that
 * start with the bad variable's name, secrets from NAME_FILE, warnings about
 * unknown IW_ variables, provider credentials, terminal statuses and --help. */
#include <check.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "limiter.h"

/* Every warning the last config_from_env reported, one per line. */
static char warnings[4096];
static int n_warnings;

static void capture_warn(const char *msg)
{
    size_t used = strlen(warnings);

    n_warnings++;
    snprintf(warnings + used, sizeof warnings - used, "%s\n", msg);
}

static void reset_warnings(void)
{
    warnings[0] = '\0';
    n_warnings = 0;
}

/* config_from_env over a NULL-terminated list of "NAME=value" entries. */
static iw_config *load(const char *const *env, iw_error *err)
{
    reset_warnings();
    memset(err, 0, sizeof *err);
    return config_from_env((char **)env, capture_warn, err);
}

/* Asserts that env is refused with IW_ERR_CONFIG and a one-line message
 * starting with "<name>: ". */
static void assert_refused(const char *const *env, const char *name)
{
    iw_error err;
    iw_config *cfg = load(env, &err);
    size_t len = strlen(name);

    ck_assert_msg(cfg == NULL, "%s accepted", env[0]);
    ck_assert_int_eq(err.status, IW_ERR_CONFIG);
    ck_assert_msg(strncmp(err.msg, name, len) == 0 && err.msg[len] == ':',
                  "%s: message '%s' does not start with '%s:'", env[0], err.msg, name);
    ck_assert_msg(strchr(err.msg, '\n') == NULL, "message '%s' is not one line", err.msg);
    ck_assert_msg(strlen(err.msg) > len + 2, "message '%s' says nothing", err.msg);
}

/* A temporary file holding content; the path goes into path (PATH_LEN). */
#define PATH_LEN 64
static void temp_file(char *path, const char *content)
{
    int fd;
    size_t len = strlen(content);

    snprintf(path, PATH_LEN, "/tmp/iw-test-config-XXXXXX");
    fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, content, len), (ssize_t)len);
    close(fd);
}

/* ---------------------------------------------------------------------------
 * Defaults
 * ------------------------------------------------------------------------ */

START_TEST(defaults_match_contract)
{
    const char *env[] = {NULL};
    iw_error err;
    iw_config *cfg = load(env, &err);

    ck_assert_msg(cfg != NULL, "defaults refused: %s", err.msg);
    ck_assert_str_eq(cfg->amqp_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
    ck_assert_str_eq(cfg->redis_url, "redis://127.0.0.1:6379/0");
    ck_assert_str_eq(cfg->provider_url, "http://127.0.0.1:8080");
    ck_assert_str_eq(cfg->ns, "ext-api");
    ck_assert_int_eq(cfg->auth_mode, IW_AUTH_API_KEY);
    ck_assert_ptr_null(cfg->api_key);
    ck_assert_ptr_null(cfg->api_secret);
    ck_assert_ptr_null(cfg->oauth_client_id);
    ck_assert_ptr_null(cfg->oauth_client_secret);
    ck_assert_ptr_null(cfg->basic_user);
    ck_assert_ptr_null(cfg->basic_password);
    ck_assert_ptr_null(cfg->tls_cert);
    ck_assert_ptr_null(cfg->tls_key);
    ck_assert_ptr_null(cfg->tls_ca);

    ck_assert_uint_eq(cfg->n_rate_tiers, 3);
    ck_assert_int_eq(cfg->rate_tiers[0].limit, 50);
    ck_assert_int_eq(cfg->rate_tiers[0].window_ms, 60000);
    ck_assert_int_eq(cfg->rate_tiers[1].limit, 1000);
    ck_assert_int_eq(cfg->rate_tiers[1].window_ms, 3600000L);
    ck_assert_int_eq(cfg->rate_tiers[2].limit, 20000);
    ck_assert_int_eq(cfg->rate_tiers[2].window_ms, 86400000L);

    ck_assert_int_eq(cfg->concurrency, 64);
    ck_assert_str_eq(cfg->http_addr, "0.0.0.0:9400");
    ck_assert_int_eq(cfg->log_level, IW_LOG_INFO);

    ck_assert_uint_eq(cfg->n_retry, 4);
    ck_assert_int_eq(cfg->retry_schedule_ms[0], 0);
    ck_assert_int_eq(cfg->retry_schedule_ms[1], 2000);
    ck_assert_int_eq(cfg->retry_schedule_ms[2], 4000);
    ck_assert_int_eq(cfg->retry_schedule_ms[3], 8000);

    ck_assert_int_eq(cfg->breaker_failures, 5);
    ck_assert_int_eq(cfg->breaker_open_ms, 60000);
    ck_assert_int_eq(cfg->turn_linger_ms, 2);

    ck_assert_uint_eq(cfg->n_poll, 5);
    ck_assert_int_eq(cfg->poll_schedule_ms[0], 5000);
    ck_assert_int_eq(cfg->poll_schedule_ms[1], 10000);
    ck_assert_int_eq(cfg->poll_schedule_ms[2], 30000);
    ck_assert_int_eq(cfg->poll_schedule_ms[3], 60000);
    ck_assert_int_eq(cfg->poll_schedule_ms[4], 300000);
    ck_assert_int_eq(cfg->poll_max_age_ms, 86400000L);

    ck_assert_int_eq(cfg->cache_ttl_ms, 300000);
    ck_assert_str_eq(cfg->terminal_statuses_raw, "completed,failed,rejected,cancelled");
    ck_assert_uint_eq(cfg->n_terminal, 4);
    ck_assert_str_eq(cfg->terminal[0], "completed");
    ck_assert_str_eq(cfg->terminal[1], "failed");
    ck_assert_str_eq(cfg->terminal[2], "rejected");
    ck_assert_str_eq(cfg->terminal[3], "cancelled");
    ck_assert_int_eq(cfg->max_message_bytes, 1048576);
    ck_assert_str_eq(cfg->client_id, "integration-worker");
    ck_assert_int_eq(cfg->shutdown_grace_ms, 30000);
    ck_assert_int_eq(cfg->queue_classic, 0);
    ck_assert_int_eq(n_warnings, 0);
    config_free(cfg);
}
END_TEST

START_TEST(null_envp_is_defaults)
{
    iw_error err = {0};
    iw_config *cfg = config_from_env(NULL, NULL, &err);

    ck_assert_ptr_nonnull(cfg);
    ck_assert_str_eq(cfg->ns, "ext-api");
    config_free(cfg);
    config_free(NULL); /* harmless */
}
END_TEST

START_TEST(settings_override_defaults)
{
    const char *env[] = {"PATH=/usr/bin",
                         "IW_AMQP_URL=amqps://u:p@broker:5671/vh",
                         "IW_REDIS_URL=redis://cache:6380/2",
                         "IW_PROVIDER_URL=https://provider.example",
                         "IW_NAMESPACE=team.a_b-1",
                         "IW_AUTH_MODE=oauth2",
                         "IW_RATE_LIMITS=30/s, 10/5s",
                         "IW_CONCURRENCY=10000",
                         "IW_HTTP_ADDR=off",
                         "IW_LOG_LEVEL=debug",
                         "IW_RETRY_SCHEDULE=0s,1s",
                         "IW_BREAKER_FAILURES=1",
                         "IW_BREAKER_OPEN=1s",
                         "IW_POLL_SCHEDULE=250ms",
                         "IW_POLL_MAX_AGE=1d",
                         "IW_CACHE_TTL=1m",
                         "IW_TERMINAL_STATUSES=done, aborted",
                         "IW_MAX_MESSAGE_BYTES=64",
                         "IW_CLIENT_ID=me",
                         "IW_SHUTDOWN_GRACE=0",
                         "IW_QUEUE_TYPE=classic",
                         "IW_TLS_CERT=/etc/cert.pem",
                         "IW_TLS_KEY=/etc/key.pem",
                         NULL};
    iw_error err;
    iw_config *cfg = load(env, &err);

    ck_assert_msg(cfg != NULL, "refused: %s", err.msg);
    ck_assert_str_eq(cfg->amqp_url, "amqps://u:p@broker:5671/vh");
    ck_assert_str_eq(cfg->redis_url, "redis://cache:6380/2");
    ck_assert_str_eq(cfg->provider_url, "https://provider.example");
    ck_assert_str_eq(cfg->ns, "team.a_b-1");
    ck_assert_int_eq(cfg->auth_mode, IW_AUTH_OAUTH2);
    ck_assert_uint_eq(cfg->n_rate_tiers, 2);
    ck_assert_int_eq(cfg->rate_tiers[0].limit, 30);
    ck_assert_int_eq(cfg->rate_tiers[0].window_ms, 1000);
    ck_assert_int_eq(cfg->rate_tiers[1].window_ms, 5000);
    ck_assert_int_eq(cfg->concurrency, 10000);
    ck_assert_str_eq(cfg->http_addr, "off");
    ck_assert_int_eq(cfg->log_level, IW_LOG_DEBUG);
    ck_assert_uint_eq(cfg->n_retry, 2);
    ck_assert_int_eq(cfg->retry_schedule_ms[1], 1000);
    ck_assert_int_eq(cfg->breaker_failures, 1);
    ck_assert_int_eq(cfg->breaker_open_ms, 1000);
    ck_assert_uint_eq(cfg->n_poll, 1);
    ck_assert_int_eq(cfg->poll_schedule_ms[0], 250);
    ck_assert_int_eq(cfg->poll_max_age_ms, 86400000L);
    ck_assert_int_eq(cfg->cache_ttl_ms, 60000);
    ck_assert_uint_eq(cfg->n_terminal, 2);
    ck_assert_str_eq(cfg->terminal[0], "done");
    ck_assert_str_eq(cfg->terminal[1], "aborted");
    ck_assert_int_eq(cfg->max_message_bytes, 64);
    ck_assert_str_eq(cfg->client_id, "me");
    ck_assert_int_eq(cfg->shutdown_grace_ms, 0);
    ck_assert_int_eq(cfg->queue_classic, 1);
    ck_assert_str_eq(cfg->tls_cert, "/etc/cert.pem");
    ck_assert_str_eq(cfg->tls_key, "/etc/key.pem");
    ck_assert_int_eq(n_warnings, 0);
    config_free(cfg);
}
END_TEST

START_TEST(enum_values)
{
    static const struct {
        const char *entry;
        size_t offset;
        int value;
    } cases[] = {
        {"IW_AUTH_MODE=api-key", offsetof(iw_config, auth_mode), IW_AUTH_API_KEY},
        {"IW_AUTH_MODE=oauth2", offsetof(iw_config, auth_mode), IW_AUTH_OAUTH2},
        {"IW_AUTH_MODE=basic", offsetof(iw_config, auth_mode), IW_AUTH_BASIC},
        {"IW_AUTH_MODE=none", offsetof(iw_config, auth_mode), IW_AUTH_NONE},
        {"IW_LOG_LEVEL=debug", offsetof(iw_config, log_level), IW_LOG_DEBUG},
        {"IW_LOG_LEVEL=info", offsetof(iw_config, log_level), IW_LOG_INFO},
        {"IW_LOG_LEVEL=warn", offsetof(iw_config, log_level), IW_LOG_WARN},
        {"IW_LOG_LEVEL=error", offsetof(iw_config, log_level), IW_LOG_ERROR},
        {"IW_QUEUE_TYPE=quorum", offsetof(iw_config, queue_classic), 0},
        {"IW_QUEUE_TYPE=classic", offsetof(iw_config, queue_classic), 1},
    };

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *env[] = {cases[i].entry, NULL};
        iw_error err;
        iw_config *cfg = load(env, &err);
        ck_assert_msg(cfg != NULL, "%s refused: %s", cases[i].entry, err.msg);
        ck_assert_int_eq(*(int *)((char *)cfg + cases[i].offset), cases[i].value);
        config_free(cfg);
    }
}
END_TEST

/* ---------------------------------------------------------------------------
 * Refusals: one per type and then some
 * ------------------------------------------------------------------------ */

static const struct {
    const char *entry;
    const char *name; /* the message must start with "<name>:" */
} bad_settings[] = {
    /* long */
    {"IW_CONCURRENCY=0", "IW_CONCURRENCY"},
    {"IW_CONCURRENCY=10001", "IW_CONCURRENCY"},
    {"IW_CONCURRENCY=-1", "IW_CONCURRENCY"},
    {"IW_CONCURRENCY=abc", "IW_CONCURRENCY"},
    {"IW_CONCURRENCY=", "IW_CONCURRENCY"},
    {"IW_CONCURRENCY=64 ", "IW_CONCURRENCY"},
    {"IW_BREAKER_FAILURES=0", "IW_BREAKER_FAILURES"},
    {"IW_MAX_MESSAGE_BYTES=10", "IW_MAX_MESSAGE_BYTES"},
    {"IW_MAX_MESSAGE_BYTES=99999999999999999999", "IW_MAX_MESSAGE_BYTES"},
    {"IW_PREFETCH=65536", "IW_PREFETCH"},
    {"IW_POLL_JITTER=101", "IW_POLL_JITTER"},
    /* duration */
    {"IW_BREAKER_OPEN=2x", "IW_BREAKER_OPEN"},
    {"IW_BREAKER_OPEN=5", "IW_BREAKER_OPEN"},
    {"IW_BREAKER_OPEN=", "IW_BREAKER_OPEN"},
    {"IW_BREAKER_OPEN=-1s", "IW_BREAKER_OPEN"},
    {"IW_BREAKER_OPEN=1.5s", "IW_BREAKER_OPEN"},
    {"IW_BREAKER_OPEN=500ms", "IW_BREAKER_OPEN"},
    {"IW_BREAKER_OPEN=2d", "IW_BREAKER_OPEN"},
    {"IW_POLL_MAX_AGE=31d", "IW_POLL_MAX_AGE"},
    {"IW_TURN_LINGER=21ms", "IW_TURN_LINGER"},
    {"IW_TURN_LINGER=1s", "IW_TURN_LINGER"},
    {"IW_CACHE_TTL=0", "IW_CACHE_TTL"},
    {"IW_SHUTDOWN_GRACE=2h", "IW_SHUTDOWN_GRACE"},
    {"IW_HTTP_TIMEOUT=soon", "IW_HTTP_TIMEOUT"},
    /* rate limits */
    {"IW_RATE_LIMITS=50", "IW_RATE_LIMITS"},
    {"IW_RATE_LIMITS=0/s", "IW_RATE_LIMITS"},
    {"IW_RATE_LIMITS=x/min", "IW_RATE_LIMITS"},
    {"IW_RATE_LIMITS=5/fortnight", "IW_RATE_LIMITS"},
    {"IW_RATE_LIMITS=", "IW_RATE_LIMITS"},
    {"IW_RATE_LIMITS=1/s,2/s,3/s,4/s,5/s,6/s,7/s,8/s,9/s", "IW_RATE_LIMITS"},
    /* schedules */
    {"IW_RETRY_SCHEDULE=", "IW_RETRY_SCHEDULE"},
    {"IW_RETRY_SCHEDULE=1s,,", "IW_RETRY_SCHEDULE"},
    {"IW_RETRY_SCHEDULE=0s,2x", "IW_RETRY_SCHEDULE"},
    {"IW_POLL_SCHEDULE=5s,10", "IW_POLL_SCHEDULE"},
    /* enums */
    {"IW_AUTH_MODE=kerberos", "IW_AUTH_MODE"},
    {"IW_AUTH_MODE=API-KEY", "IW_AUTH_MODE"},
    {"IW_AUTH_MODE=", "IW_AUTH_MODE"},
    {"IW_LOG_LEVEL=loud", "IW_LOG_LEVEL"},
    {"IW_QUEUE_TYPE=stream", "IW_QUEUE_TYPE"},
    /* URLs */
    {"IW_AMQP_URL=localhost:5672", "IW_AMQP_URL"},
    {"IW_AMQP_URL=", "IW_AMQP_URL"},
    {"IW_AMQP_URL=http://127.0.0.1:5672", "IW_AMQP_URL"},
    {"IW_REDIS_URL=127.0.0.1:6379", "IW_REDIS_URL"},
    {"IW_REDIS_URL=amqp://127.0.0.1", "IW_REDIS_URL"},
    {"IW_PROVIDER_URL=provider", "IW_PROVIDER_URL"},
    {"IW_PROVIDER_URL=ftp://provider", "IW_PROVIDER_URL"},
    /* strings and lists */
    {"IW_NAMESPACE=", "IW_NAMESPACE"},
    {"IW_NAMESPACE=a/b", "IW_NAMESPACE"},
    {"IW_NAMESPACE=a b", "IW_NAMESPACE"},
    {"IW_NAMESPACE=ns:x", "IW_NAMESPACE"},
    {"IW_CLIENT_ID=", "IW_CLIENT_ID"},
    {"IW_TERMINAL_STATUSES=", "IW_TERMINAL_STATUSES"},
    {"IW_TERMINAL_STATUSES=,,", "IW_TERMINAL_STATUSES"},
    {"IW_TERMINAL_STATUSES=a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q", "IW_TERMINAL_STATUSES"},
    /* combinations */
    {"IW_TLS_CERT=/etc/cert.pem", "IW_TLS_CERT"},
};

START_TEST(bad_setting_refused)
{
    const char *env[] = {bad_settings[_i].entry, NULL};

    assert_refused(env, bad_settings[_i].name);
}
END_TEST

/* A bad value among good ones is still found, and nothing leaks on the way
 * out (the strings before it were already allocated). */
START_TEST(bad_setting_among_good)
{
    const char *env[] = {"HOME=/root",
                         "IW_AMQP_URL=amqp://a/",
                         "IW_API_KEY=k",
                         "IW_TERMINAL_STATUSES=x",
                         "IW_QUEUE_TYPE=stream",
                         "IW_CLIENT_ID=c",
                         NULL};

    assert_refused(env, "IW_QUEUE_TYPE");
}
END_TEST

START_TEST(bad_setting_has_no_warnings)
{
    const char *env[] = {"IW_FOO=1", "IW_CONCURRENCY=0", NULL};

    assert_refused(env, "IW_CONCURRENCY");
    ck_assert_int_eq(n_warnings, 0);
}
END_TEST

START_TEST(enum_message_quotes_value)
{
    const char *env[] = {"IW_AUTH_MODE=kerberos", NULL};
    iw_error err;

    ck_assert_ptr_null(load(env, &err));
    ck_assert_ptr_nonnull(strstr(err.msg, "kerberos"));
}
END_TEST

/* ---------------------------------------------------------------------------
 * Secrets
 * ------------------------------------------------------------------------ */

START_TEST(secret_direct)
{
    const char *env[] = {"IW_API_KEY=k1", "IW_API_SECRET=s1", NULL};
    iw_error err;
    iw_config *cfg = load(env, &err);

    ck_assert_ptr_nonnull(cfg);
    ck_assert_str_eq(cfg->api_key, "k1");
    ck_assert_str_eq(cfg->api_secret, "s1");
    config_free(cfg);
}
END_TEST

START_TEST(secret_from_file)
{
    char path[PATH_LEN], path2[PATH_LEN], path3[PATH_LEN], e1[128], e2[128], e3[128];
    iw_error err;
    iw_config *cfg;

    temp_file(path, "s3cret\n");
    temp_file(path2, "pass word\r\n");
    temp_file(path3, "no-newline");
    snprintf(e1, sizeof e1, "IW_API_KEY_FILE=%s", path);
    snprintf(e2, sizeof e2, "IW_BASIC_PASSWORD_FILE=%s", path2);
    snprintf(e3, sizeof e3, "IW_OAUTH_CLIENT_SECRET_FILE=%s", path3);
    const char *env[] = {e1, e2, e3, NULL};
    cfg = load(env, &err);
    unlink(path);
    unlink(path2);
    unlink(path3);

    ck_assert_msg(cfg != NULL, "refused: %s", err.msg);
    ck_assert_str_eq(cfg->api_key, "s3cret");
    ck_assert_str_eq(cfg->basic_password, "pass word");
    ck_assert_str_eq(cfg->oauth_client_secret, "no-newline");
    ck_assert_int_eq(n_warnings, 0); /* NAME_FILE of a secret is a known variable */
    config_free(cfg);
}
END_TEST

START_TEST(secret_file_keeps_inner_newlines)
{
    char path[PATH_LEN], e1[128];
    iw_error err;
    iw_config *cfg;

    /* an OAuth2 secret is form-encoded, so inner newlines are kept; the
     * header secrets refuse them (api_secret_file_with_newline_refused) */
    temp_file(path, "line1\nline2\n\n");
    snprintf(e1, sizeof e1, "IW_OAUTH_CLIENT_SECRET_FILE=%s", path);
    const char *env[] = {e1, NULL};
    cfg = load(env, &err);
    unlink(path);

    ck_assert_ptr_nonnull(cfg);
    ck_assert_str_eq(cfg->oauth_client_secret, "line1\nline2");
    config_free(cfg);
}
END_TEST

START_TEST(secret_both_set)
{
    char path[PATH_LEN], e1[128];

    temp_file(path, "from-file\n");
    snprintf(e1, sizeof e1, "IW_API_KEY_FILE=%s", path);
    const char *env[] = {"IW_API_KEY=direct", e1, NULL};
    iw_error err;
    iw_config *cfg = load(env, &err);
    unlink(path);

    ck_assert_ptr_null(cfg);
    ck_assert_int_eq(err.status, IW_ERR_CONFIG);
    ck_assert_msg(strncmp(err.msg, "IW_API_KEY", 10) == 0, "'%s'", err.msg);
    ck_assert_ptr_nonnull(strstr(err.msg, "IW_API_KEY_FILE"));
    ck_assert_ptr_null(strstr(err.msg, "direct"));
    ck_assert_ptr_null(strstr(err.msg, "from-file"));
}
END_TEST

START_TEST(secret_file_missing)
{
    const char *env[] = {"IW_OAUTH_CLIENT_ID_FILE=/nonexistent/iw-test/secret", NULL};
    iw_error err;

    assert_refused(env, "IW_OAUTH_CLIENT_ID_FILE");
    ck_assert_ptr_null(load(env, &err));
    ck_assert_ptr_nonnull(strstr(err.msg, "/nonexistent/iw-test/secret"));
}
END_TEST

START_TEST(secret_file_then_later_error_no_leak)
{
    char path[PATH_LEN], e1[128];

    temp_file(path, "k\n");
    snprintf(e1, sizeof e1, "IW_API_KEY_FILE=%s", path);
    const char *env[] = {e1, "IW_CLIENT_ID=", NULL};
    assert_refused(env, "IW_CLIENT_ID");
    unlink(path);
}
END_TEST

/* ---------------------------------------------------------------------------
 * Unknown variables
 * ------------------------------------------------------------------------ */

START_TEST(unknown_variable_warned)
{
    const char *env[] = {"IW_FOO=1",
                         "IW_CONCURRENCY=8",
                         "IW_API_KEY=k",
                         "PATH=/bin",
                         "IWFOO=2",
                         "XIW_BAR=3",
                         "IW_LOG_LEVEL=warn",
                         "IW_NAMESPACE_FILE=/tmp/x",
                         "IW_APIKEY=supersecret",
                         NULL};
    iw_error err;
    iw_config *cfg = load(env, &err);

    ck_assert_msg(cfg != NULL, "refused: %s", err.msg);
    ck_assert_int_eq(n_warnings, 3);
    ck_assert_ptr_nonnull(strstr(warnings, "IW_FOO"));
    ck_assert_ptr_nonnull(strstr(warnings, "IW_NAMESPACE_FILE")); /* not a secret */
    ck_assert_ptr_nonnull(strstr(warnings, "IW_APIKEY"));
    ck_assert_ptr_null(strstr(warnings, "supersecret")); /* names only, never values */
    ck_assert_ptr_null(strstr(warnings, "IW_CONCURRENCY"));
    ck_assert_ptr_null(strstr(warnings, "IW_API_KEY"));
    ck_assert_ptr_null(strstr(warnings, "IW_LOG_LEVEL"));
    ck_assert_ptr_null(strstr(warnings, "PATH"));
    ck_assert_ptr_null(strstr(warnings, "IWFOO"));
    ck_assert_ptr_null(strstr(warnings, "XIW_BAR"));
    config_free(cfg);
}
END_TEST

START_TEST(known_variables_not_warned)
{
    const char *env[] = {"IW_AMQP_URL=amqp://x/",
                         "IW_REDIS_URL=redis://x/",
                         "IW_PROVIDER_URL=http://x",
                         "IW_NAMESPACE=n",
                         "IW_AUTH_MODE=none",
                         "IW_API_SECRET=s",
                         "IW_OAUTH_CLIENT_ID=i",
                         "IW_OAUTH_CLIENT_SECRET=s",
                         "IW_BASIC_USER=u",
                         "IW_BASIC_PASSWORD=p",
                         "IW_TLS_CA=/ca",
                         "IW_RATE_LIMITS=1/s",
                         "IW_SUBMIT_SHARE=80",
                         "IW_POLL_SHARE=50",
                         "IW_RESOURCE_SHARE=50",
                         "IW_PREFETCH=0",
                         "IW_HTTP_ADDR=off",
                         "IW_RETRY_SCHEDULE=0s",
                         "IW_BREAKER_FAILURES=5",
                         "IW_BREAKER_OPEN=60s",
                         "IW_POLL_SCHEDULE=5s",
                         "IW_POLL_MAX_AGE=24h",
                         "IW_POLL_JITTER=20",
                         "IW_CACHE_TTL=300s",
                         "IW_TERMINAL_STATUSES=done",
                         "IW_MAX_MESSAGE_BYTES=1048576",
                         "IW_MAX_RESPONSE_BYTES=1048576",
                         "IW_CLIENT_ID=c",
                         "IW_SHUTDOWN_GRACE=30s",
                         "IW_QUEUE_TYPE=quorum",
                         "IW_DELIVERY_LIMIT=10",
                         "IW_HTTP_TIMEOUT=10s",
                         "IW_HTTP_CONNECT_TIMEOUT=3s",
                         "IW_HOLD_MAX=5s",
                         "IW_TURN_LINGER=0",
                         "IW_IDEMPOTENCY_TTL=7d",
                         "IW_REDIS_TIMEOUT=2s",
                         "IW_SCHEMA_DIR=/schemas",
                         NULL};
    iw_error err;
    iw_config *cfg = load(env, &err);

    ck_assert_msg(cfg != NULL, "refused: %s", err.msg);
    ck_assert_msg(n_warnings == 0, "unexpected warnings: %s", warnings);
    config_free(cfg);
}
END_TEST

START_TEST(unknown_variable_without_warn_callback)
{
    const char *env[] = {"IW_FOO=1", NULL};
    iw_error err = {0};
    iw_config *cfg = config_from_env((char **)env, NULL, &err);

    ck_assert_ptr_nonnull(cfg);
    config_free(cfg);
}
END_TEST

/* ---------------------------------------------------------------------------
 * Provider credentials
 * ------------------------------------------------------------------------ */

static void check_provider_case(const char *const *env, const char *starts, const char *mentions)
{
    iw_error err;
    iw_config *cfg = load(env, &err);

    ck_assert_msg(cfg != NULL, "refused: %s", err.msg);
    memset(&err, 0, sizeof err);
    if (!starts) {
        ck_assert_msg(config_check_provider(cfg, &err) == IW_OK, "%s", err.msg);
    } else {
        ck_assert_int_eq(config_check_provider(cfg, &err), IW_ERR_CONFIG);
        ck_assert_int_eq(err.status, IW_ERR_CONFIG);
        ck_assert_msg(strncmp(err.msg, starts, strlen(starts)) == 0 &&
                          err.msg[strlen(starts)] == ':',
                      "'%s' does not start with %s:", err.msg, starts);
        if (mentions)
            ck_assert_msg(strstr(err.msg, mentions) != NULL, "'%s' does not mention %s", err.msg,
                          mentions);
    }
    config_free(cfg);
}

START_TEST(provider_api_key)
{
    const char *missing[] = {NULL};
    const char *empty[] = {"IW_API_KEY=", NULL};
    const char *ok[] = {"IW_API_KEY=k", NULL};

    check_provider_case(missing, "IW_API_KEY", NULL);
    check_provider_case(empty, "IW_API_KEY", NULL);
    check_provider_case(ok, NULL, NULL);
}
END_TEST

START_TEST(provider_oauth2)
{
    const char *neither[] = {"IW_AUTH_MODE=oauth2", NULL};
    const char *no_secret[] = {"IW_AUTH_MODE=oauth2", "IW_OAUTH_CLIENT_ID=i", NULL};
    const char *no_id[] = {"IW_AUTH_MODE=oauth2", "IW_OAUTH_CLIENT_SECRET=s", NULL};
    const char *ok[] = {"IW_AUTH_MODE=oauth2", "IW_OAUTH_CLIENT_ID=i", "IW_OAUTH_CLIENT_SECRET=s",
                        NULL};

    check_provider_case(neither, "IW_OAUTH_CLIENT_ID", "IW_OAUTH_CLIENT_SECRET");
    check_provider_case(no_secret, "IW_OAUTH_CLIENT_SECRET", NULL);
    check_provider_case(no_id, "IW_OAUTH_CLIENT_ID", NULL);
    check_provider_case(ok, NULL, NULL);
}
END_TEST

START_TEST(provider_basic)
{
    const char *neither[] = {"IW_AUTH_MODE=basic", NULL};
    const char *no_password[] = {"IW_AUTH_MODE=basic", "IW_BASIC_USER=u", NULL};
    const char *no_user[] = {"IW_AUTH_MODE=basic", "IW_BASIC_PASSWORD=p", NULL};
    const char *ok[] = {"IW_AUTH_MODE=basic", "IW_BASIC_USER=u", "IW_BASIC_PASSWORD=p", NULL};

    check_provider_case(neither, "IW_BASIC_USER", "IW_BASIC_PASSWORD");
    check_provider_case(no_password, "IW_BASIC_PASSWORD", NULL);
    check_provider_case(no_user, "IW_BASIC_USER", NULL);
    check_provider_case(ok, NULL, NULL);
}
END_TEST

START_TEST(provider_none)
{
    const char *none[] = {"IW_AUTH_MODE=none", NULL};

    check_provider_case(none, NULL, NULL);
}
END_TEST

/* ---------------------------------------------------------------------------
 * Terminal statuses
 * ------------------------------------------------------------------------ */

START_TEST(terminal_default)
{
    const char *env[] = {NULL};
    iw_error err;
    iw_config *cfg = load(env, &err);

    ck_assert_ptr_nonnull(cfg);
    ck_assert(config_is_terminal(cfg, "completed"));
    ck_assert(config_is_terminal(cfg, "failed"));
    ck_assert(config_is_terminal(cfg, "rejected"));
    ck_assert(config_is_terminal(cfg, "cancelled"));
    ck_assert(!config_is_terminal(cfg, "pending"));
    ck_assert(!config_is_terminal(cfg, "processing"));
    ck_assert(!config_is_terminal(cfg, "Completed"));
    ck_assert(!config_is_terminal(cfg, "complete"));
    ck_assert(!config_is_terminal(cfg, "completed "));
    ck_assert(!config_is_terminal(cfg, ""));
    config_free(cfg);
}
END_TEST

START_TEST(terminal_custom)
{
    const char *env[] = {"IW_TERMINAL_STATUSES=done,, aborted,", NULL};
    iw_error err;
    iw_config *cfg = load(env, &err);

    ck_assert_msg(cfg != NULL, "refused: %s", err.msg);
    ck_assert_uint_eq(cfg->n_terminal, 2);
    ck_assert(config_is_terminal(cfg, "done"));
    ck_assert(config_is_terminal(cfg, "aborted"));
    ck_assert(!config_is_terminal(cfg, "completed"));
    config_free(cfg);
}
END_TEST

START_TEST(terminal_max_items)
{
    const char *env[] = {"IW_TERMINAL_STATUSES=a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p", NULL};
    iw_error err;
    iw_config *cfg = load(env, &err);

    ck_assert_msg(cfg != NULL, "refused: %s", err.msg);
    ck_assert_uint_eq(cfg->n_terminal, IW_MAX_TERMINAL);
    ck_assert(config_is_terminal(cfg, "p"));
    config_free(cfg);
}
END_TEST

/* ---------------------------------------------------------------------------
 * --help
 * ------------------------------------------------------------------------ */

START_TEST(help_lists_settings)
{
    static const char *const names[] = {
        "IW_AMQP_URL",
        "IW_REDIS_URL",
        "IW_PROVIDER_URL",
        "IW_NAMESPACE",
        "IW_AUTH_MODE",
        "IW_API_KEY",
        "IW_API_SECRET",
        "IW_OAUTH_CLIENT_ID",
        "IW_OAUTH_CLIENT_SECRET",
        "IW_RATE_LIMITS",
        "IW_CONCURRENCY",
        "IW_HTTP_ADDR",
        "IW_LOG_LEVEL",
        "IW_RETRY_SCHEDULE",
        "IW_BREAKER_FAILURES",
        "IW_BREAKER_OPEN",
        "IW_POLL_SCHEDULE",
        "IW_POLL_MAX_AGE",
        "IW_CACHE_TTL",
        "IW_TERMINAL_STATUSES",
        "IW_MAX_MESSAGE_BYTES",
        "IW_CLIENT_ID",
        "IW_BASIC_USER",
        "IW_BASIC_PASSWORD",
        "IW_SHUTDOWN_GRACE",
        "IW_QUEUE_TYPE",
        "IW_TLS_CERT",
        "IW_TLS_KEY",
        "IW_TLS_CA",
        "50/min,1000/hour,20000/day",
        "0s,2s,4s,8s",
        "5s,10s,30s,1m,5m",
        "integration-worker",
    };
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);

    ck_assert_ptr_nonnull(f);
    config_print_help(f);
    fclose(f);
    ck_assert_uint_gt(len, 0);
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        ck_assert_msg(strstr(text, names[i]) != NULL, "--help lacks %s", names[i]);
    free(text);
}
END_TEST

/* ---------------------------------------------------------------------------
 * Settings that cannot work (issue 9): refused at start-up, secrets unechoed
 * ------------------------------------------------------------------------ */

/* Malformed URL settings that hold a password: refused by name, and neither
 * the password nor the user appears in the message. */
static const struct {
    const char *entry;
    const char *name;
} bad_urls[] = {
    {"IW_AMQP_URL=admin:S3cret@rabbit/", "IW_AMQP_URL"},
    {"IW_AMQP_URL=amqp://admin:S3cret@/", "IW_AMQP_URL"},
    {"IW_AMQP_URL=amqp://admin:S3cret@rabbit:notaport/", "IW_AMQP_URL"},
    {"IW_AMQP_URL=amqps//admin:S3cret@rabbit/", "IW_AMQP_URL"},
    {"IW_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f,admin:S3cret@rabbit/", "IW_AMQP_URL"},
    {"IW_REDIS_URL=admin:S3cret@redis/", "IW_REDIS_URL"},
    {"IW_REDIS_URL=redis://admin:S3cret@redis:notaport/0", "IW_REDIS_URL"},
    {"IW_REDIS_URL=redis://admin:S3cret@/0", "IW_REDIS_URL"},
    {"IW_REDIS_URL=redis://admin:S3cret@redis/db", "IW_REDIS_URL"},
    {"IW_REDIS_URL=rediss://admin:S3cret@redis/", "IW_REDIS_URL"},
    {"IW_PROVIDER_URL=admin:S3cret@provider/", "IW_PROVIDER_URL"},
    {"IW_PROVIDER_URL=http://admin:S3cret@", "IW_PROVIDER_URL"},
    {"IW_PROVIDER_URL=http://admin:S3cret@127.0.0.1:99999/", "IW_PROVIDER_URL"},
    {"IW_PROVIDER_URL=http://admin:S3cret@pro vider/", "IW_PROVIDER_URL"},
    {"IW_PROVIDER_URL=ftp://admin:S3cret@provider/", "IW_PROVIDER_URL"},
    {"IW_PROVIDER_URL=http://admin:S3cret@127.0.0.1/?q=1", "IW_PROVIDER_URL"},
};

START_TEST(bad_url_refused_without_echo)
{
    const char *env[] = {bad_urls[_i].entry, NULL};
    iw_error err;

    assert_refused(env, bad_urls[_i].name);
    ck_assert_ptr_null(load(env, &err));
    ck_assert_msg(strstr(err.msg, "S3cret") == NULL, "password echoed: %s", err.msg);
    ck_assert_msg(strstr(err.msg, "admin") == NULL, "user echoed: %s", err.msg);
}
END_TEST

START_TEST(good_urls_accepted)
{
    static const char *const good[] = {
        "IW_AMQP_URL=amqps://u:p@rabbit.example.com:5671/vh",
        "IW_AMQP_URL=amqp://a:b@127.0.0.1:5672/%2f, amqp://a:b@127.0.0.2:5672/%2f",
        "IW_REDIS_URL=redis://:pw@127.0.0.1:6380/3",
        "IW_PROVIDER_URL=https://provider.example.com/base",
        "IW_PROVIDER_URL=http://localhost:8080",
        "IW_PROVIDER_URL=http://127.0.0.2:8080/",
        "IW_PROVIDER_URL=http://[::1]:8080",
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        const char *env[] = {good[i], NULL};
        iw_error err;
        iw_config *cfg = load(env, &err);
        ck_assert_msg(cfg != NULL, "%s refused: %s", good[i], err.msg);
        ck_assert_int_eq(n_warnings, 0);
        config_free(cfg);
    }
}
END_TEST

START_TEST(credentials_over_plain_http_refused)
{
    const char *env[] = {"IW_PROVIDER_URL=http://provider.example.com", NULL};
    iw_error err;
    assert_refused(env, "IW_PROVIDER_URL");
    ck_assert_ptr_null(load(env, &err));
    ck_assert_ptr_nonnull(strstr(err.msg, "IW_ALLOW_INSECURE_HTTP"));
    /* 10.0.0.1 and 128.0.0.1 are not loopback */
    const char *env2[] = {"IW_PROVIDER_URL=http://10.0.0.1:8080", "IW_AUTH_MODE=basic", NULL};
    assert_refused(env2, "IW_PROVIDER_URL");
    const char *env3[] = {"IW_PROVIDER_URL=http://127.0.0.1.example.com", NULL};
    assert_refused(env3, "IW_PROVIDER_URL");
}
END_TEST

START_TEST(insecure_http_allowed_with_warning)
{
    const char *env[] = {"IW_PROVIDER_URL=http://provider.example.com", "IW_ALLOW_INSECURE_HTTP=1",
                         NULL};
    iw_error err;
    iw_config *cfg = load(env, &err);
    ck_assert_msg(cfg != NULL, "refused: %s", err.msg);
    ck_assert_int_eq(cfg->allow_insecure_http, 1);
    ck_assert_int_eq(n_warnings, 1);
    ck_assert_ptr_nonnull(strstr(warnings, "IW_ALLOW_INSECURE_HTTP"));
    config_free(cfg);
    /* no credentials, nothing to protect: no warning */
    const char *env2[] = {"IW_PROVIDER_URL=http://provider.example.com", "IW_AUTH_MODE=none", NULL};
    cfg = load(env2, &err);
    ck_assert_msg(cfg != NULL, "refused: %s", err.msg);
    ck_assert_int_eq(n_warnings, 0);
    config_free(cfg);
    const char *env3[] = {"IW_ALLOW_INSECURE_HTTP=yes", NULL};
    assert_refused(env3, "IW_ALLOW_INSECURE_HTTP");
}
END_TEST

START_TEST(namespace_length_and_reserved)
{
    char ns[200], entry[220];
    iw_error err;
    iw_config *cfg;

    memset(ns, 'n', 100);
    ns[100] = '\0';
    snprintf(entry, sizeof entry, "IW_NAMESPACE=%s", ns);
    const char *env[] = {entry, NULL};
    cfg = load(env, &err);
    ck_assert_msg(cfg != NULL, "100 bytes refused: %s", err.msg);
    config_free(cfg);
    ns[100] = 'n';
    ns[101] = '\0';
    snprintf(entry, sizeof entry, "IW_NAMESPACE=%s", ns);
    assert_refused(env, "IW_NAMESPACE");
    const char *env2[] = {"IW_NAMESPACE=amq.ext", NULL};
    assert_refused(env2, "IW_NAMESPACE");
    const char *env3[] = {"IW_NAMESPACE=ns\xe6\x97\xa5", NULL};
    assert_refused(env3, "IW_NAMESPACE");
    const char *env4[] = {"IW_NAMESPACE=ns\r\nx", NULL};
    assert_refused(env4, "IW_NAMESPACE");
}
END_TEST

START_TEST(header_secrets_with_control_bytes_refused)
{
    char path[PATH_LEN], e1[128];
    iw_error err;

    const char *env[] = {"IW_API_KEY=k\r\nX-Injected: yes", NULL};
    assert_refused(env, "IW_API_KEY");
    ck_assert_ptr_null(load(env, &err));
    ck_assert_ptr_null(strstr(err.msg, "Injected"));
    temp_file(path, "s1\ns2\n");
    snprintf(e1, sizeof e1, "IW_API_SECRET_FILE=%s", path);
    const char *env2[] = {e1, NULL};
    assert_refused(env2, "IW_API_SECRET");
    unlink(path);
    const char *env3[] = {"IW_BASIC_USER=a:b", NULL};
    assert_refused(env3, "IW_BASIC_USER");
}
END_TEST

START_TEST(secret_file_never_cut)
{
    char path[PATH_LEN], e1[128];
    static char big[70000];

    memset(big, 'k', sizeof big - 1);
    temp_file(path, big);
    snprintf(e1, sizeof e1, "IW_API_KEY_FILE=%s", path);
    const char *env[] = {e1, NULL};
    assert_refused(env, "IW_API_KEY_FILE");
    unlink(path);
    /* 5,000 bytes: past the old 4 KiB buffer, read whole */
    big[5000] = '\0';
    temp_file(path, big);
    snprintf(e1, sizeof e1, "IW_API_KEY_FILE=%s", path);
    iw_error err;
    iw_config *cfg = load(env, &err);
    unlink(path);
    ck_assert_msg(cfg != NULL, "refused: %s", err.msg);
    ck_assert_uint_eq(strlen(cfg->api_key), 5000);
    config_free(cfg);
}
END_TEST

START_TEST(text_settings_must_be_utf8)
{
    const char *env[] = {"IW_CLIENT_ID=bad\xff", NULL};
    assert_refused(env, "IW_CLIENT_ID");
    const char *env2[] = {"IW_CLIENT_ID=a\nb", NULL};
    assert_refused(env2, "IW_CLIENT_ID");
    const char *env3[] = {"IW_CLIENT_ID=\xe6\x97\xa5\xe6\x9c\xac", NULL};
    iw_error err;
    iw_config *cfg = load(env3, &err);
    ck_assert_msg(cfg != NULL, "refused: %s", err.msg);
    config_free(cfg);
}
END_TEST

START_TEST(unknown_variable_warning_is_text)
{
    const char *env[] = {"IW_\xff\x01X=1", NULL};
    iw_error err;
    iw_config *cfg = load(env, &err);
    ck_assert_ptr_nonnull(cfg);
    ck_assert_int_eq(n_warnings, 1);
    ck_assert_ptr_nonnull(strstr(warnings, "IW_\xef\xbf\xbd\\x01X"));
    config_free(cfg);
}
END_TEST

/* ---------------------------------------------------------------------------
 * The provider-trouble settings (issue 10): IW_RATE_ALERT, IW_MAX_RATE_PAUSE,
 * IW_MAINTENANCE_WINDOWS, IW_REQUIRE_NOEVICTION
 * ------------------------------------------------------------------------ */

START_TEST(guard_settings)
{
    iw_error err;
    const char *none[] = {NULL};
    iw_config *cfg = load(none, &err);

    ck_assert_ptr_nonnull(cfg);
    ck_assert_int_eq(cfg->rate_alert_pct, 80);
    ck_assert_int_eq(cfg->max_rate_pause_ms, 3600000L);
    ck_assert_int_eq(cfg->require_noeviction, 0);
    ck_assert_ptr_null(cfg->maintenance_raw);
    ck_assert_uint_eq(maintenance_count(cfg->maintenance), 0);
    config_free(cfg);

    const char *set[] = {"IW_RATE_ALERT=90", "IW_MAX_RATE_PAUSE=10m", "IW_REQUIRE_NOEVICTION=1",
                         "IW_MAINTENANCE_WINDOWS=Sun 02:00-04:00 America/New_York,"
                         "Sat 23:00-01:00 UTC",
                         NULL};
    cfg = load(set, &err);
    ck_assert_msg(cfg != NULL, "refused: %s", err.msg);
    ck_assert_int_eq(cfg->rate_alert_pct, 90);
    ck_assert_int_eq(cfg->max_rate_pause_ms, 600000);
    ck_assert_int_eq(cfg->require_noeviction, 1);
    ck_assert_uint_eq(maintenance_count(cfg->maintenance), 2);
    ck_assert_ptr_nonnull(strstr(cfg->maintenance_raw, "America/New_York"));
    ck_assert_int_eq(n_warnings, 0);
    /* the limiter's policy follows the settings */
    limiter_policy pol = limiter_policy_from_config(cfg);
    ck_assert_int_eq(pol.alert_pct, 90);
    ck_assert_int_eq(pol.max_pause_ms, 600000);
    ck_assert_int_eq(pol.share_permille[0], 800);
    ck_assert_int_eq(pol.share_permille[1], 500);
    ck_assert_int_eq(pol.breaker_failures, 5);
    ck_assert_int_eq(pol.breaker_open_ms, 60000);
    ck_assert_int_eq(pol.probe_lease_ms, 15000);
    config_free(cfg);

    const char *empty[] = {"IW_MAINTENANCE_WINDOWS=", NULL};
    cfg = load(empty, &err);
    ck_assert_ptr_nonnull(cfg);
    ck_assert_uint_eq(maintenance_count(cfg->maintenance), 0);
    config_free(cfg);

    static const char *const bad[][2] = {
        {"IW_RATE_ALERT=0", "IW_RATE_ALERT"},
        {"IW_RATE_ALERT=101", "IW_RATE_ALERT"},
        {"IW_MAX_RATE_PAUSE=100ms", "IW_MAX_RATE_PAUSE"},
        {"IW_MAX_RATE_PAUSE=30d", "IW_MAX_RATE_PAUSE"},
        {"IW_REQUIRE_NOEVICTION=yes", "IW_REQUIRE_NOEVICTION"},
        {"IW_MAINTENANCE_WINDOWS=Sun 02:00-04:00 Mars/Base", "IW_MAINTENANCE_WINDOWS"},
        {"IW_MAINTENANCE_WINDOWS=Sunday 02:00-04:00 UTC", "IW_MAINTENANCE_WINDOWS"},
        {"IW_MAINTENANCE_WINDOWS=Sun 02:00-04:00 UTC,", "IW_MAINTENANCE_WINDOWS"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *env[] = {bad[i][0], NULL};
        assert_refused(env, bad[i][1]);
    }

    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    config_print_help(f);
    fclose(f);
    static const char *const names[] = {"IW_RATE_ALERT",          "IW_MAX_RATE_PAUSE",
                                        "IW_MAINTENANCE_WINDOWS", "IW_REQUIRE_NOEVICTION",
                                        "IW_BREAKER_FAILURES",    "IW_BREAKER_OPEN"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        ck_assert_msg(strstr(text, names[i]) != NULL, "--help lacks %s", names[i]);
    free(text);
}
END_TEST

static Suite *config_suite(void)
{
    Suite *s = suite_create("config");
    TCase *tc;

    tc = tcase_create("defaults");
    tcase_add_test(tc, defaults_match_contract);
    tcase_add_test(tc, null_envp_is_defaults);
    tcase_add_test(tc, settings_override_defaults);
    tcase_add_test(tc, enum_values);
    tcase_add_test(tc, guard_settings);
    suite_add_tcase(s, tc);

    tc = tcase_create("refusals");
    tcase_add_loop_test(tc, bad_setting_refused, 0, sizeof bad_settings / sizeof bad_settings[0]);
    tcase_add_test(tc, bad_setting_among_good);
    tcase_add_test(tc, bad_setting_has_no_warnings);
    tcase_add_test(tc, enum_message_quotes_value);
    suite_add_tcase(s, tc);

    tc = tcase_create("secrets");
    tcase_add_test(tc, secret_direct);
    tcase_add_test(tc, secret_from_file);
    tcase_add_test(tc, secret_file_keeps_inner_newlines);
    tcase_add_test(tc, secret_both_set);
    tcase_add_test(tc, secret_file_missing);
    tcase_add_test(tc, secret_file_then_later_error_no_leak);
    suite_add_tcase(s, tc);

    tc = tcase_create("unknown");
    tcase_add_test(tc, unknown_variable_warned);
    tcase_add_test(tc, known_variables_not_warned);
    tcase_add_test(tc, unknown_variable_without_warn_callback);
    suite_add_tcase(s, tc);

    tc = tcase_create("provider");
    tcase_add_test(tc, provider_api_key);
    tcase_add_test(tc, provider_oauth2);
    tcase_add_test(tc, provider_basic);
    tcase_add_test(tc, provider_none);
    suite_add_tcase(s, tc);

    tc = tcase_create("terminal");
    tcase_add_test(tc, terminal_default);
    tcase_add_test(tc, terminal_custom);
    tcase_add_test(tc, terminal_max_items);
    suite_add_tcase(s, tc);

    tc = tcase_create("hostile");
    tcase_add_loop_test(tc, bad_url_refused_without_echo, 0, sizeof bad_urls / sizeof bad_urls[0]);
    tcase_add_test(tc, good_urls_accepted);
    tcase_add_test(tc, credentials_over_plain_http_refused);
    tcase_add_test(tc, insecure_http_allowed_with_warning);
    tcase_add_test(tc, namespace_length_and_reserved);
    tcase_add_test(tc, header_secrets_with_control_bytes_refused);
    tcase_add_test(tc, secret_file_never_cut);
    tcase_add_test(tc, text_settings_must_be_utf8);
    tcase_add_test(tc, unknown_variable_warning_is_text);
    suite_add_tcase(s, tc);

    tc = tcase_create("help");
    tcase_add_test(tc, help_lists_settings);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(config_suite());

    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
