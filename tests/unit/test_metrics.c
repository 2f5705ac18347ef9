/* The metrics registry: every family renders in valid Prometheus text format (parsed
 * back here, and by `promtool check metrics` when it is installed), status classes,
 * histograms that histogram_quantile can use, bounded label tables, the API-down
 * gauge and the freshness rule of /readyz. */
#include <check.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "metrics.h"

/* Value of the sample whose name-and-labels is exactly `series`; -1 when absent. */
static double value_of(const char *text, const char *series)
{
    size_t n = strlen(series);
    const char *p = text;

    while (p && *p) {
        if (!strncmp(p, series, n) && p[n] == ' ')
            return strtod(p + n + 1, NULL);
        p = strchr(p, '\n');
        if (p)
            p++;
    }
    return -1;
}

static int is_name_start(int c)
{
    return isalpha(c) || c == '_' || c == ':';
}

/* Checks one sample line of the text format: name{k="v",...} value. Returns the name's
 * length (0 when malformed). */
static size_t parse_sample(const char *line, size_t len)
{
    size_t i = 0, name_len;

    if (!len || !is_name_start((unsigned char)line[0]))
        return 0;
    while (i < len && (isalnum((unsigned char)line[i]) || line[i] == '_' || line[i] == ':'))
        i++;
    name_len = i;
    if (i < len && line[i] == '{') {
        i++;
        while (i < len && line[i] != '}') {
            if (!is_name_start((unsigned char)line[i]) || line[i] == ':')
                return 0;
            while (i < len && (isalnum((unsigned char)line[i]) || line[i] == '_'))
                i++;
            if (i + 1 >= len || line[i] != '=' || line[i + 1] != '"')
                return 0;
            i += 2;
            while (i < len && line[i] != '"') {
                if (line[i] == '\\')
                    i++;
                i++;
            }
            if (i >= len)
                return 0;
            i++;
            if (i < len && line[i] == ',')
                i++;
        }
        if (i >= len)
            return 0;
        i++;
    }
    if (i >= len || line[i] != ' ')
        return 0;
    i++;
    char num[64];
    size_t k = len - i;
    if (k == 0 || k >= sizeof num)
        return 0;
    memcpy(num, line + i, k);
    num[k] = '\0';
    char *end;
    if (strcmp(num, "+Inf") && strcmp(num, "NaN")) {
        strtod(num, &end);
        if (*end)
            return 0;
    }
    return name_len;
}

/* Every line is a HELP, a TYPE or a sample of a family whose TYPE came before (a
 * histogram's _bucket/_sum/_count belong to it); no family is declared twice. */
static void check_exposition(const char *text)
{
    char typed[64][96];
    int n_typed = 0;
    const char *p = text;

    ck_assert_ptr_nonnull(text);
    ck_assert(text[strlen(text) - 1] == '\n');
    while (*p) {
        const char *nl = strchr(p, '\n');
        size_t len = (size_t)(nl - p);
        char line[512];
        ck_assert_uint_lt(len, sizeof line);
        memcpy(line, p, len);
        line[len] = '\0';
        if (!strncmp(line, "# TYPE ", 7)) {
            char name[96], type[32];
            ck_assert_int_eq(sscanf(line + 7, "%95s %31s", name, type), 2);
            ck_assert(!strcmp(type, "counter") || !strcmp(type, "gauge") ||
                      !strcmp(type, "histogram"));
            if (!strcmp(type, "counter"))
                ck_assert_msg(strlen(name) > 6 && !strcmp(name + strlen(name) - 6, "_total"),
                              "counter %s lacks _total", name);
            for (int i = 0; i < n_typed; i++)
                ck_assert_msg(strcmp(typed[i], name), "%s declared twice", name);
            ck_assert_int_lt(n_typed, 64);
            snprintf(typed[n_typed++], sizeof typed[0], "%s", name);
        } else if (!strncmp(line, "# HELP ", 7)) {
            ck_assert(strchr(line + 7, ' ') != NULL);
        } else {
            size_t nlen = parse_sample(line, len);
            ck_assert_msg(nlen > 0, "malformed sample line: %s", line);
            int found = 0;
            for (int i = 0; i < n_typed && !found; i++) {
                size_t tl = strlen(typed[i]);
                if (nlen == tl && !strncmp(line, typed[i], tl))
                    found = 1;
                else if (!strncmp(line, typed[i], tl) &&
                         (!strncmp(line + tl, "_bucket", nlen - tl) ||
                          !strncmp(line + tl, "_sum", nlen - tl) ||
                          !strncmp(line + tl, "_count", nlen - tl)) &&
                         nlen - tl >= 4)
                    found = 1;
            }
            ck_assert_msg(found, "sample before its TYPE: %s", line);
        }
        p = nl + 1;
    }
}

static char *render_fresh(void)
{
    char *t = metrics_render();
    ck_assert_ptr_nonnull(t);
    check_exposition(t);
    return t;
}

START_TEST(empty_registry_renders_every_family)
{
    metrics_reset();
    char *t = render_fresh();
    static const char *const families[] = {
        "iw_provider_requests_total",
        "iw_provider_request_duration_seconds",
        "iw_provider_consecutive_failures",
        "iw_provider_down",
        "iw_breaker_state",
        "iw_provider_calls_in_flight",
        "iw_retries_total",
        "iw_job_waits_total",
        "iw_limiter_usage_ratio",
        "iw_limiter_throttling",
        "iw_limiter_refusals_total",
        "iw_limiter_wait_seconds",
        "iw_deliveries_total",
        "iw_jobs_total",
        "iw_job_transitions_total",
        "iw_dead_letters_total",
        "iw_delay_lateness_seconds",
        "iw_cache_lookups_total",
        "iw_cache_coalesced_total",
        "iw_status_checks_total",
        "iw_maintenance_window_active",
        "iw_broker_connected",
        "iw_redis_connected",
        "iw_ready",
        "iw_build_info",
    };
    for (size_t i = 0; i < sizeof families / sizeof families[0]; i++) {
        char want[128];
        snprintf(want, sizeof want, "# TYPE %s ", families[i]);
        ck_assert_msg(strstr(t, want), "missing %s", families[i]);
    }
    /* counters with fixed labels exist at 0 so that rate() and increase() see them */
    ck_assert(value_of(t, "iw_provider_requests_total{route=\"submit\",code=\"5xx\"}") == 0);
    ck_assert(value_of(t, "iw_jobs_total{role=\"poller\",outcome=\"final\"}") == 0);
    /* no call and no breaker read yet: no knowledge to export */
    ck_assert(value_of(t, "iw_provider_down") == -1);
    ck_assert(value_of(t, "iw_breaker_state") == -1);
    ck_assert(strstr(t, "iw_build_info{version=\"") != NULL);
    free(t);
}
END_TEST

START_TEST(status_classes)
{
    static const struct {
        long status;
        const char *code;
    } cases[] = {{200, "2xx"},
                 {201, "2xx"},
                 {302, "3xx"},
                 {400, "4xx"},
                 {404, "4xx"},
                 {429, "429"},
                 {500, "5xx"},
                 {503, "5xx"},
                 {IW_CALL_TIMED_OUT, "timeout"},
                 {IW_CALL_NO_ANSWER, "error"},
                 {777, "error"}};
    metrics_reset();
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        metrics_provider_request(IW_ROUTE_STATUS, cases[i].status, 1000);
    char *t = render_fresh();
    static const char *const codes[] = {"2xx", "3xx", "4xx", "429", "5xx", "timeout", "error"};
    static const double want[] = {2, 1, 2, 1, 2, 1, 2};
    for (size_t i = 0; i < 7; i++) {
        char s[128];
        snprintf(s, sizeof s, "iw_provider_requests_total{route=\"status\",code=\"%s\"}", codes[i]);
        ck_assert_msg(value_of(t, s) == want[i], "%s", s);
    }
    ck_assert(value_of(t, "iw_provider_requests_total{route=\"submit\",code=\"2xx\"}") == 0);
    /* out-of-range routes are ignored, not written past the table */
    metrics_provider_request((iw_route)99, 200, 1);
    free(t);
}
END_TEST

START_TEST(histogram_is_cumulative)
{
    metrics_reset();
    metrics_provider_request(IW_ROUTE_SUBMIT, 201, 150000);  /* 150 ms */
    metrics_provider_request(IW_ROUTE_SUBMIT, 201, 200000);  /* exactly 200 ms: le="0.2" */
    metrics_provider_request(IW_ROUTE_SUBMIT, 503, 1200000); /* 1.2 s */
    metrics_provider_request(IW_ROUTE_SUBMIT, -1, 20000000); /* 20 s: +Inf only */
    char *t = render_fresh();
    const char *b = "iw_provider_request_duration_seconds_bucket{route=\"submit\",le=\"%s\"}";
    char s[160];
    static const struct {
        const char *le;
        double n;
    } want[] = {{"0.1", 0}, {"0.15", 1}, {"0.2", 2}, {"1", 2}, {"1.5", 3}, {"10", 3}, {"+Inf", 4}};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        snprintf(s, sizeof s, b, want[i].le);
        ck_assert_msg(value_of(t, s) == want[i].n, "%s = %g", s, value_of(t, s));
    }
    ck_assert(value_of(t, "iw_provider_request_duration_seconds_count{route=\"submit\"}") == 4);
    double sum = value_of(t, "iw_provider_request_duration_seconds_sum{route=\"submit\"}");
    ck_assert(sum > 21.549 && sum < 21.551);
    /* the 200 ms and 1 s decision points are bucket bounds */
    ck_assert(strstr(t, "le=\"0.2\"") && strstr(t, "le=\"1\""));
    free(t);
}
END_TEST

START_TEST(provider_down_after_three_failures)
{
    metrics_reset();
    metrics_provider_request(IW_ROUTE_SUBMIT, 500, 1);
    metrics_provider_request(IW_ROUTE_STATUS, IW_CALL_TIMED_OUT, 1);
    char *t = render_fresh();
    ck_assert(value_of(t, "iw_provider_consecutive_failures") == 2);
    ck_assert(value_of(t, "iw_provider_down") == 0);
    free(t);
    metrics_provider_request(IW_ROUTE_RESOURCE, IW_CALL_NO_ANSWER, 1);
    t = render_fresh();
    ck_assert(value_of(t, "iw_provider_down") == 1);
    free(t);
    /* a 4xx or 429 is an answer: the provider is up */
    metrics_provider_request(IW_ROUTE_SUBMIT, 429, 1);
    t = render_fresh();
    ck_assert(value_of(t, "iw_provider_consecutive_failures") == 0);
    ck_assert(value_of(t, "iw_provider_down") == 0);
    free(t);
    /* the shared breaker's count wins when it is larger (other pods failed) */
    metrics_breaker(1, 4);
    t = render_fresh();
    ck_assert(value_of(t, "iw_provider_down") == 1);
    ck_assert(value_of(t, "iw_breaker_state") == 1);
    free(t);
    metrics_breaker(7, -1); /* invalid state ignored, fleet count unknown */
    t = render_fresh();
    ck_assert(value_of(t, "iw_breaker_state") == 1);
    ck_assert(value_of(t, "iw_provider_down") == 0);
    free(t);
}
END_TEST

/* An idle pod's view of shared state ages out instead of holding an alert up. */
START_TEST(shared_state_gauges_age_out)
{
    static const char *const tiers[] = {"50/min"};
    metrics_reset();
    metrics_limiter_tiers(tiers, 1);
    for (int i = 0; i < 3; i++)
        metrics_provider_request(IW_ROUTE_SUBMIT, 503, 1);
    metrics_limiter_tier_usage(0, 900);
    long long now = clock_mono_ms();
    char *t = metrics_render_at(now + 59000);
    check_exposition(t);
    ck_assert(value_of(t, "iw_provider_down") == 1);
    ck_assert(value_of(t, "iw_limiter_usage_ratio{tier=\"50/min\"}") == 0.9);
    free(t);
    t = metrics_render_at(now + 61000);
    check_exposition(t);
    ck_assert(value_of(t, "iw_provider_down") == -1);
    ck_assert(value_of(t, "iw_provider_consecutive_failures") == -1);
    ck_assert(value_of(t, "iw_limiter_usage_ratio{tier=\"50/min\"}") == -1);
    ck_assert(strstr(t, "# TYPE iw_provider_down gauge") != NULL); /* the family stays */
    free(t);
    /* a fresh breaker read wins over this process's own streak: another pod succeeded */
    metrics_breaker(0, 0);
    t = render_fresh();
    ck_assert(value_of(t, "iw_provider_down") == 0);
    ck_assert(value_of(t, "iw_breaker_state") == 0);
    free(t);
    t = metrics_render_at(clock_mono_ms() + 61000);
    ck_assert(value_of(t, "iw_breaker_state") == -1);
    free(t);
}
END_TEST

START_TEST(dead_letter_codes_are_bounded)
{
    static const char *const codes[] = {"EXTERNAL_API_ERROR", "INVALID_JSON"};
    metrics_reset();
    metrics_dead_letter_codes(codes, 2);
    char *t = render_fresh();
    ck_assert(value_of(t, "iw_dead_letters_total{role=\"submitter\",code=\"INVALID_JSON\"}") == 0);
    free(t);
    metrics_dead_letter_role(IW_ROLE_SUBMITTER, "INVALID_JSON");
    metrics_dead_letter_role(IW_ROLE_RESOLVER, "bad\"code\n{}");
    metrics_dead_letter_role(IW_ROLE_RESOLVER, NULL);
    metrics_dead_letter_role(IW_ROLE_RESOLVER, "");
    metrics_dead_letter("SCHEMA_VIOLATION"); /* deprecated: role unknown */
    for (int i = 0; i < 200; i++) {
        char c[32];
        snprintf(c, sizeof c, "CODE_%d", i);
        metrics_dead_letter_role(IW_ROLE_POLLER, c);
    }
    t = render_fresh();
    ck_assert(value_of(t, "iw_dead_letters_total{role=\"submitter\",code=\"INVALID_JSON\"}") == 1);
    ck_assert(value_of(t, "iw_dead_letters_total{role=\"resolver\",code=\"OTHER\"}") == 3);
    ck_assert(value_of(t, "iw_dead_letters_total{role=\"unknown\",code=\"SCHEMA_VIOLATION\"}") ==
              1);
    /* 48 names at most: 2 declared + SCHEMA_VIOLATION + 45 CODE_n; the other 155 are OTHER */
    ck_assert(value_of(t, "iw_dead_letters_total{role=\"poller\",code=\"CODE_44\"}") == 1);
    ck_assert(value_of(t, "iw_dead_letters_total{role=\"poller\",code=\"CODE_45\"}") == -1);
    ck_assert(value_of(t, "iw_dead_letters_total{role=\"poller\",code=\"OTHER\"}") == 155);
    ck_assert(strstr(t, "bad") == NULL);
    free(t);
}
END_TEST

START_TEST(job_states_and_outcomes)
{
    metrics_reset();
    metrics_job_transition(IW_ROLE_SUBMITTER, "received");
    metrics_job_transition(IW_ROLE_SUBMITTER, "received");
    metrics_job_transition(IW_ROLE_POLLER, "calling");
    metrics_job_transition(IW_ROLE_POLLER, "Calling!"); /* not [a-z_] */
    /* the same name at another address: the same series */
    static char copy[] = "calling", poll_name[] = "calling_again";
    metrics_job_transition(IW_ROLE_POLLER, copy);
    metrics_job_transition(IW_ROLE_POLLER, copy);
    metrics_job_transition(IW_ROLE_POLLER, poll_name);
    metrics_job_transition(IW_ROLE_POLLER, "calling");
    metrics_job_outcome(IW_ROLE_SUBMITTER, IW_OUTCOME_ACCEPTED);
    metrics_job("submitter", "failed"); /* deprecated entry point */
    metrics_job("nobody", "accepted");  /* ignored */
    metrics_delivery(IW_ROLE_POLLER, IW_DELIVERY_ACKED);
    metrics_job_wait(IW_ROLE_SUBMITTER, IW_WAIT_BREAKER);
    metrics_retry(IW_ROUTE_SUBMIT, IW_RETRY_SERVER_ERROR);
    metrics_cache(IW_CACHE_STALE);
    metrics_cache(IW_CACHE_COALESCED);
    metrics_status_check(IW_CHECK_PROGRESS);
    metrics_maintenance(5);
    metrics_delay_returned(300);
    metrics_delay_returned(-5);
    char *t = render_fresh();
    ck_assert(value_of(t, "iw_job_transitions_total{role=\"submitter\",state=\"received\"}") == 2);
    ck_assert(value_of(t, "iw_job_transitions_total{role=\"poller\",state=\"received\"}") == 0);
    ck_assert(value_of(t, "iw_job_transitions_total{role=\"poller\",state=\"other\"}") == 1);
    ck_assert(value_of(t, "iw_job_transitions_total{role=\"poller\",state=\"calling\"}") == 4);
    ck_assert(value_of(t, "iw_job_transitions_total{role=\"poller\",state=\"calling_again\"}") ==
              1);
    ck_assert(value_of(t, "iw_jobs_total{role=\"submitter\",outcome=\"accepted\"}") == 1);
    ck_assert(value_of(t, "iw_jobs_total{role=\"submitter\",outcome=\"failed\"}") == 1);
    ck_assert(value_of(t, "iw_deliveries_total{role=\"poller\",action=\"acked\"}") == 1);
    ck_assert(value_of(t, "iw_job_waits_total{role=\"submitter\",reason=\"breaker\"}") == 1);
    ck_assert(value_of(t, "iw_retries_total{route=\"submit\",reason=\"server_error\"}") == 1);
    ck_assert(value_of(t, "iw_cache_lookups_total{result=\"stale\"}") == 1);
    ck_assert(value_of(t, "iw_cache_coalesced_total") == 1);
    ck_assert(value_of(t, "iw_status_checks_total{outcome=\"progress\"}") == 1);
    ck_assert(value_of(t, "iw_maintenance_window_active") == 1);
    ck_assert(value_of(t, "iw_delay_lateness_seconds_bucket{le=\"0.5\"}") == 1);
    ck_assert(value_of(t, "iw_delay_lateness_seconds_count") == 1);
    free(t);
}
END_TEST

START_TEST(limiter_tiers)
{
    static const char *const tiers[] = {"50/min", "1000/hour", "bad tier\"", "20000/day"};
    metrics_reset();
    metrics_limiter_usage(500); /* deprecated: shown as tier="all" until tiers are declared */
    char *t = render_fresh();
    ck_assert(value_of(t, "iw_limiter_usage_ratio{tier=\"all\"}") == 0.5);
    free(t);
    metrics_limiter_tiers(tiers, 4);
    metrics_limiter_tiers(tiers, 1); /* ignored: declared once */
    metrics_limiter_tier_usage(0, 820);
    metrics_limiter_tier_usage(3, 10);
    metrics_limiter_tier_usage(99, 10); /* ignored */
    metrics_throttling(1);
    metrics_limiter_refused(IW_ROUTE_STATUS, IW_REFUSAL_SHARE, 1200);
    metrics_limiter_refused(IW_ROUTE_STATUS, IW_REFUSAL_UNAVAILABLE, -1);
    t = render_fresh();
    ck_assert(value_of(t, "iw_limiter_usage_ratio{tier=\"all\"}") == -1);
    ck_assert(value_of(t, "iw_limiter_usage_ratio{tier=\"50/min\"}") == 0.82);
    ck_assert(value_of(t, "iw_limiter_usage_ratio{tier=\"tier2\"}") == -1); /* never reported */
    ck_assert(strstr(t, "tier=\"tier2\"") == NULL);
    ck_assert(value_of(t, "iw_limiter_usage_ratio{tier=\"20000/day\"}") == 0.01);
    ck_assert(value_of(t, "iw_limiter_throttling") == 1);
    ck_assert(value_of(t, "iw_limiter_refusals_total{class=\"status\",reason=\"share\"}") == 1);
    ck_assert(value_of(t, "iw_limiter_refusals_total{class=\"status\",reason=\"unavailable\"}") ==
              1);
    ck_assert(value_of(t, "iw_limiter_wait_seconds_bucket{class=\"status\",le=\"1\"}") == 0);
    ck_assert(value_of(t, "iw_limiter_wait_seconds_bucket{class=\"status\",le=\"2.5\"}") == 1);
    ck_assert(value_of(t, "iw_limiter_wait_seconds_count{class=\"status\"}") == 1);
    free(t);
}
END_TEST

START_TEST(readiness_needs_a_fresh_report)
{
    const char *why = NULL;
    metrics_reset();
    ck_assert(!metrics_ready(clock_mono_ms(), &why)); /* never reported */
    ck_assert_ptr_nonnull(why);
    metrics_connections(1, 1);
    long long now = clock_mono_ms();
    ck_assert(metrics_ready(now, &why));
    ck_assert_ptr_null(why);
    ck_assert(metrics_ready(now + IW_READY_FRESH_MS - 100, NULL));
    /* an idle loop that stops reporting turns /readyz red within 5 s */
    ck_assert(!metrics_ready(now + IW_READY_FRESH_MS + 100, &why));
    ck_assert(strstr(why, "fresh") != NULL);
    metrics_connections(1, 0);
    ck_assert(!metrics_ready(clock_mono_ms(), &why));
    ck_assert_str_eq(why, "Redis unavailable");
    metrics_connections(0, 1);
    ck_assert(!metrics_ready(clock_mono_ms(), &why));
    ck_assert_str_eq(why, "broker unavailable");
    metrics_connections(1, 1);
    metrics_stopping(1);
    ck_assert(!metrics_ready(clock_mono_ms(), &why));
    ck_assert_str_eq(why, "stopping");
    metrics_stopping(0);
    char *t = render_fresh();
    ck_assert(value_of(t, "iw_ready") == 1);
    free(t);
}
END_TEST

/* promtool's own linter over a busy registry (skipped when promtool is not installed). */
START_TEST(promtool_accepts_the_exposition)
{
    if (system("command -v promtool >/dev/null 2>&1") != 0) {
        fprintf(stderr, "test_metrics: promtool not installed, skipping its check\n");
        return;
    }
    static const char *const codes[] = {"EXTERNAL_API_ERROR"};
    static const char *const tiers[] = {"50/min"};
    metrics_reset();
    metrics_dead_letter_codes(codes, 1);
    metrics_limiter_tiers(tiers, 1);
    metrics_job_transition(IW_ROLE_RESOLVER, "calling");
    metrics_provider_request(IW_ROUTE_TOKEN, 200, 5000);
    metrics_connections(1, 1);
    char *t = render_fresh();
    char path[] = "/tmp/iw-test-metrics-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, t, strlen(t)), (ssize_t)strlen(t));
    close(fd);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "promtool check metrics < %s", path);
    int rc = system(cmd);
    unlink(path);
    ck_assert_msg(rc == 0, "promtool check metrics failed (its output is above)");
    free(t);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("metrics");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, empty_registry_renders_every_family);
    tcase_add_test(tc, status_classes);
    tcase_add_test(tc, histogram_is_cumulative);
    tcase_add_test(tc, provider_down_after_three_failures);
    tcase_add_test(tc, shared_state_gauges_age_out);
    tcase_add_test(tc, dead_letter_codes_are_bounded);
    tcase_add_test(tc, job_states_and_outcomes);
    tcase_add_test(tc, limiter_tiers);
    tcase_add_test(tc, readiness_needs_a_fresh_report);
    tcase_add_test(tc, promtool_accepts_the_exposition);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
