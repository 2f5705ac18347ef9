/* The job engine, once for every role: what the three copies of the job
 * pipeline it replaced got wrong, each checked against the real RabbitMQ,
 * Redis and mock provider with real worker processes.
 *   - long multibyte jobIds that share a prefix each get their own outcome
 *     (the poller built its keys in 300-byte buffers and truncated them);
 *   - a poller-only and a resolver-only process export their per-route
 *     metrics (only the submitter called the metrics functions);
 *   - `all` keeps at most IW_CONCURRENCY calls in flight in the process
 *     (the submitter and the resolver each counted up to it);
 *   - SIGTERM with IW_SHUTDOWN_GRACE=0 under load exits cleanly (the roles
 *     were freed before the runtime failed their pending confirms), and no
 *     job is lost or submitted twice. */
#include <check.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "clock.h"
#include "iwtest.h"
#include "log.h"

static char ns[128];

/* Fresh namespace with its topology, a mock with `mock_args`, and a tap. */
static iwt_amqp *setup(const char *name, const char *const *mock_args, int *port)
{
    return iwt_scene(ns, sizeof ns, name, mock_args, port);
}

static void teardown(iwt_amqp *a)
{
    iwt_scene_end(a, ns);
}

static void publish_job(iwt_amqp *a, const char *job_id)
{
    json_t *j = json_pack("{s:s, s:s, s:s, s:{s:i}}", "jobId", job_id, "userId", "u-1", "action",
                          "transaction", "payload", "amount", 1);
    char *text = json_dumps(j, JSON_COMPACT);
    iwt_publish_job(a, ns, text);
    free(text);
    json_decref(j);
}

static const char *body_str(const iwt_msg *m, const char *k)
{
    return json_string_value(json_object_get(m->body, k));
}

/* The events of one routing key whose body names job_id, within the window. */
static int count_body_events(iwt_msg **seen, int n, const char *rk, const char *job_id)
{
    int c = 0;
    for (int i = 0; i < n; i++)
        if (!strcmp(seen[i]->routing_key, rk) && body_str(seen[i], "jobId") &&
            !strcmp(body_str(seen[i], "jobId"), job_id))
            c++;
    return c;
}

/* ---- keys that fit the longest jobId ------------------------------------------------------ */

START_TEST(long_multibyte_job_ids_each_get_their_own_final)
{
    static const char *const mock[] = {"--checks-to-complete", "1", NULL};
    static const char *const env[] = {"IW_POLL_SCHEDULE=300ms", NULL};
    char x[600] = "", y[600];
    iwt_msg *seen[64];
    int port, n = 0;
    iwt_amqp *a = setup("eng-mb", mock, &port);

    /* 128 characters of up to 4 bytes: the longest valid jobIds, sharing all
     * but their last character */
    for (int i = 0; i < 127; i++)
        strcat(x, "\xf0\x9f\x98\x80"); /* U+1F600, 4 bytes */
    memcpy(y, x, strlen(x));
    strcpy(y + strlen(x), "b");
    strcat(x, "a");
    iwt_track(iwt_start_worker("submitter", ns, port, env, "submitter"));
    iwt_track(iwt_start_worker("poller", ns, port, env, "poller"));
    publish_job(a, x);
    publish_job(a, y);
    long long deadline = iwt_now_ms() + 20000;
    while (n < 64 && iwt_now_ms() < deadline &&
           (count_body_events(seen, n, "status.final", x) < 1 ||
            count_body_events(seen, n, "status.final", y) < 1)) {
        iwt_msg *m = iwt_next_event(a, 500);
        if (m)
            seen[n++] = m;
    }
    /* a little longer: a second final would show now */
    for (iwt_msg *m; n < 64 && (m = iwt_next_event(a, 1000));)
        seen[n++] = m;
    ck_assert_int_eq(count_body_events(seen, n, "submission.accepted", x), 1);
    ck_assert_int_eq(count_body_events(seen, n, "submission.accepted", y), 1);
    ck_assert_int_eq(count_body_events(seen, n, "status.final", x), 1);
    ck_assert_int_eq(count_body_events(seen, n, "status.final", y), 1);
    const char *tx = NULL, *ty = NULL;
    for (int i = 0; i < n; i++) {
        if (strcmp(seen[i]->routing_key, "status.final"))
            continue;
        if (!strcmp(body_str(seen[i], "jobId"), x))
            tx = body_str(seen[i], "trackingId");
        else
            ty = body_str(seen[i], "trackingId");
    }
    ck_assert_ptr_nonnull(tx);
    ck_assert_ptr_nonnull(ty);
    ck_assert_str_ne(tx, ty); /* each job's own outcome */
    json_t *st = iwt_mock_stats(port);
    ck_assert_int_eq(json_integer_value(json_object_get(st, "submissions_created")), 2);
    json_decref(st);
    for (int i = 0; i < n; i++)
        iwt_msg_free(seen[i]);
    teardown(a);
}
END_TEST

/* ---- metrics from every role ----------------------------------------------------------------- */

static double scrape(int http_port, const char *series)
{
    char *text = NULL;
    double v = -1;
    if (iwt_http_get(http_port, "/metrics", &text) == 200)
        v = iwt_metric(text, series);
    free(text);
    return v;
}

START_TEST(poller_and_resolver_only_processes_export_their_routes)
{
    static const char *const mock[] = {NULL};
    char ts[40], queue[256], env_p[64], env_r[64], reply_q[160];
    int port, hp = iwt_free_port(), hr = iwt_free_port();
    iwt_amqp *a = setup("eng-metrics", mock, &port);
    const char *const envp[] = {env_p, NULL};
    const char *const envr[] = {env_r, NULL};

    snprintf(env_p, sizeof env_p, "IW_HTTP_ADDR=127.0.0.1:%d", hp);
    snprintf(env_r, sizeof env_r, "IW_HTTP_ADDR=127.0.0.1:%d", hr);
    iwt_track(iwt_start_worker("poller", ns, port, envp, "poller"));
    iwt_track(iwt_start_worker("resolver", ns, port, envr, "resolver"));

    /* a status check of an unknown tracking id: one GET answered 404 */
    format_timestamp(clock_wall_ms(), ts, sizeof ts);
    json_t *chk =
        json_pack("{s:s, s:s, s:s, s:i, s:s, s:s}", "jobId", "m-1", "trackingId", "no-such-track",
                  "acceptedAt", ts, "checks", 0, "lastStatus", "pending", "priority", "normal");
    char *text = json_dumps(chk, JSON_COMPACT);
    snprintf(queue, sizeof queue, "%s.status", ns);
    iwt_publish(a, "", queue, text, "application/json", NULL, NULL);
    free(text);
    json_decref(chk);
    iwt_msg *f = iwt_wait_event(a, "submission.failed", "m-1", 10000);
    ck_assert_ptr_nonnull(f);
    iwt_msg_free(f);

    /* a look-up: one GET answered 200 */
    snprintf(reply_q, sizeof reply_q, "%s.replies", ns);
    amqp_queue_declare(a->conn, 1, amqp_cstring_bytes(reply_q), 0, 0, 0, 1, amqp_empty_table);
    char requests[160];
    snprintf(requests, sizeof requests, "%s.requests", ns);
    iwt_publish(a, requests, "resource.get", "{\"id\":\"abc123\"}", "application/json", reply_q,
                "corr-1");
    iwt_msg *r = iwt_get(a, reply_q, 10000);
    ck_assert_ptr_nonnull(r);
    ck_assert(json_is_true(json_object_get(r->body, "found")));
    iwt_msg_free(r);

    ck_assert_msg(
        IWT_EVENTUALLY(scrape(hp, "iw_provider_requests_total{route=\"status\",code=\"4xx\"}") == 1,
                       5000),
        "the poller exports its status calls");
    ck_assert_msg(IWT_EVENTUALLY(scrape(hr, "iw_provider_requests_total{route=\"resource\","
                                            "code=\"2xx\"}") == 1,
                                 5000),
                  "the resolver exports its resource calls");
    ck_assert(scrape(hp, "iw_provider_request_duration_seconds_count{route=\"status\"}") == 1);
    ck_assert(scrape(hr, "iw_provider_request_duration_seconds_count{route=\"resource\"}") == 1);
    /* each exports only what it did */
    ck_assert(scrape(hp, "iw_provider_requests_total{route=\"resource\",code=\"2xx\"}") <= 0);
    teardown(a);
}
END_TEST

/* ---- one concurrency for the whole process ------------------------------------------------- */

START_TEST(all_keeps_calls_in_flight_under_the_concurrency)
{
    static const char *const mock[] = {"--latency-ms", "300", NULL};
    static const char *const env[] = {"IW_CONCURRENCY=4", NULL};
    char reply_q[160], requests[160], id[32], corr[32];
    int port, replies = 0, accepted = 0;
    iwt_amqp *a = setup("eng-conc", mock, &port);

    iwt_track(iwt_start_worker("all", ns, port, env, "all"));
    snprintf(reply_q, sizeof reply_q, "%s.replies", ns);
    amqp_queue_declare(a->conn, 1, amqp_cstring_bytes(reply_q), 0, 0, 0, 1, amqp_empty_table);
    snprintf(requests, sizeof requests, "%s.requests", ns);
    for (int i = 0; i < 12; i++) {
        snprintf(id, sizeof id, "conc-%d", i);
        publish_job(a, id);
        snprintf(id, sizeof id, "res-%d", i);
        snprintf(corr, sizeof corr, "c-%d", i);
        char body[64];
        snprintf(body, sizeof body, "{\"id\":\"%s\",\"priority\":\"normal\"}", id);
        iwt_publish(a, requests, "resource.get", body, "application/json", reply_q, corr);
    }
    for (int i = 0; i < 12; i++) {
        snprintf(id, sizeof id, "conc-%d", i);
        iwt_msg *m = iwt_wait_event(a, "submission.accepted", id, 20000);
        accepted += m != NULL;
        iwt_msg_free(m);
    }
    for (iwt_msg *m; replies < 12 && (m = iwt_get(a, reply_q, 5000));) {
        replies++;
        iwt_msg_free(m);
    }
    ck_assert_int_eq(accepted, 12);
    ck_assert_int_eq(replies, 12);
    json_t *st = iwt_mock_stats(port);
    long max = (long)json_integer_value(json_object_get(st, "max_in_flight"));
    ck_assert_msg(max <= 4, "%ld calls in flight at once, IW_CONCURRENCY=4", max);
    ck_assert_int_ge(max, 2);
    json_decref(st);
    teardown(a);
}
END_TEST

/* ---- SIGTERM with no grace, under load ----------------------------------------------------------
 */

START_TEST(sigterm_without_grace_under_load)
{
    enum { JOBS = 200 };
    static const char *const mock[] = {"--latency-ms", "150", NULL};
    static const char *const env[] = {"IW_SHUTDOWN_GRACE=0s", "IW_POLL_SCHEDULE=1h", NULL};
    char id[32];
    int port, accepted = 0;
    iwt_amqp *a = setup("eng-term", mock, &port);
    pid_t w = iwt_track(iwt_start_worker("all", ns, port, env, "first"));

    for (int i = 0; i < JOBS; i++) {
        snprintf(id, sizeof id, "term-%03d", i);
        publish_job(a, id);
    }
    /* calls in flight and outcomes being confirmed when the signal lands */
    json_t *st = NULL;
    ck_assert(IWT_EVENTUALLY((json_decref(st), st = iwt_mock_stats(port),
                              json_integer_value(json_object_get(st, "submissions_created")) > 0),
                             10000));
    ck_assert_int_eq(iwt_stop_tracked(w, SIGTERM), 0); /* exit 0, and no sanitizer report */

    /* nothing lost, nothing submitted twice: another worker finishes the rest */
    iwt_track(iwt_start_worker("all", ns, port, env, "second"));
    ck_assert(
        IWT_EVENTUALLY((json_decref(st), st = iwt_mock_stats(port),
                        json_integer_value(json_object_get(st, "submissions_created")) == JOBS &&
                            json_integer_value(json_object_get(st, "in_flight")) == 0),
                       30000));
    json_decref(st);
    static int seen[JOBS];
    memset(seen, 0, sizeof seen);
    /* jobs whose call or record belonged to the killed worker wait for its
     * claim or its record's lease (IW_HTTP_TIMEOUT + 5 s) before the
     * second worker finishes them */
    long long until = iwt_now_ms() + 60000;
    for (iwt_msg *m; accepted < JOBS && iwt_now_ms() < until && (m = iwt_next_event(a, 20000));) {
        int i;
        if (!strcmp(m->routing_key, "submission.accepted") &&
            sscanf(body_str(m, "jobId"), "term-%d", &i) == 1 && i >= 0 && i < JOBS && !seen[i]++)
            accepted++;
        iwt_msg_free(m);
    }
    ck_assert_int_eq(accepted, JOBS);
    teardown(a);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("engine");
    TCase *tc = tcase_create("engine");

    tcase_set_timeout(tc, 90);
    tcase_add_test(tc, long_multibyte_job_ids_each_get_their_own_final);
    tcase_add_test(tc, poller_and_resolver_only_processes_export_their_routes);
    tcase_add_test(tc, all_keeps_calls_in_flight_under_the_concurrency);
    tcase_add_test(tc, sigterm_without_grace_under_load);
    suite_add_tcase(s, tc);
    return iwt_run_suite(s);
}
