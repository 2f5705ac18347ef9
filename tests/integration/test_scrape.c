/* /metrics, /healthz and /readyz of a running worker (issue 11 item 2): the counters a
 * scrape shows agree with what the mock provider itself saw. (/readyz after losing Redis:
 * test_readyz.) */
#include <check.h>
#include <curl/curl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iwtest.h"

#define ROUTE "POST /api/v1/external-resource"

typedef struct accepted {
    iwt_amqp *a;
    int want, seen;
} accepted;

static int all_accepted(void *ud)
{
    accepted *acc = ud;
    iwt_msg *m;
    while ((m = iwt_next_event(acc->a, 50)) != NULL) {
        if (!strcmp(m->routing_key, "submission.accepted"))
            acc->seen++;
        iwt_msg_free(m);
    }
    return acc->seen >= acc->want;
}

START_TEST(scrape_agrees_with_the_mock)
{
    char ns[128], addr[64], *text = NULL;
    int mock_port, http_port = iwt_free_port();

    snprintf(ns, sizeof ns, "%s", iwt_namespace("scrape"));
    iwt_cleanup(ns);
    iwt_declare(ns);
    pid_t mock = iwt_start_mock(NULL, &mock_port);
    /* the first submission gets a 503 and is retried: a 5xx, a retry, then a 2xx */
    ck_assert_int_eq(
        iwt_mock_post(mock_port, "/__admin/faults", "{\"script\":{\"" ROUTE "\":[503]}}"), 200);
    iwt_amqp *a = iwt_amqp_open();
    iwt_tap_events(a, ns, "submission.*");
    snprintf(addr, sizeof addr, "IW_HTTP_ADDR=127.0.0.1:%d", http_port);
    const char *const env[] = {addr, "IW_RETRY_SCHEDULE=0s,200ms", NULL};
    pid_t w = iwt_start_worker("submitter", ns, mock_port, env, NULL);

    iwt_probe ready = {http_port, "/readyz", 200};
    ck_assert_msg(iwt_eventually(iwt_answers, &ready, 15000), "/readyz never 200");
    ck_assert_int_eq(iwt_http_get(http_port, "/healthz", NULL), 200);

    enum { JOBS = 10 };
    for (int i = 0; i < JOBS; i++) {
        char job[256];
        snprintf(job, sizeof job,
                 "{\"jobId\":\"scrape-%d\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{}}", i);
        iwt_publish_job(a, ns, job);
    }
    accepted acc = {a, JOBS, 0};
    ck_assert_msg(iwt_eventually(all_accepted, &acc, 30000), "%d of %d accepted", acc.seen, JOBS);

    json_t *st = iwt_mock_stats(mock_port);
    long created = iwt_stat(st, ROUTE, "201"), failed = iwt_stat(st, ROUTE, "503");
    json_decref(st);
    ck_assert_int_eq(created, JOBS);
    ck_assert_int_eq(failed, 1);

    ck_assert_int_eq(iwt_http_get(http_port, "/metrics", &text), 200);
    ck_assert_ptr_nonnull(text);
    ck_assert(iwt_metric(text, "iw_provider_requests_total{route=\"submit\",code=\"2xx\"}") ==
              created);
    ck_assert(iwt_metric(text, "iw_provider_requests_total{route=\"submit\",code=\"5xx\"}") ==
              failed);
    ck_assert(iwt_metric(text, "iw_provider_request_duration_seconds_count{route=\"submit\"}") ==
              created + failed);
    ck_assert(
        iwt_metric(text,
                   "iw_provider_request_duration_seconds_bucket{route=\"submit\",le=\"+Inf\"}") ==
        created + failed);
    ck_assert(iwt_metric(text, "iw_jobs_total{role=\"submitter\",outcome=\"accepted\"}") == JOBS);
    ck_assert(iwt_metric(text, "iw_provider_down") == 0);
    ck_assert(iwt_metric(text, "iw_ready") == 1);
    ck_assert(strstr(text, "iw_build_info{version=\"") != NULL);
    free(text);

    ck_assert_int_eq(iwt_stop(w, SIGTERM), 0);
    iwt_stop(mock, SIGTERM);
    iwt_amqp_close(a);
    iwt_cleanup(ns);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("scrape");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, scrape_agrees_with_the_mock);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    curl_global_cleanup();
    return failed ? 1 : 0;
}
