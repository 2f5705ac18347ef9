/* /readyz per the contract: non-200 within 5 s of losing Redis or the broker, busy or
 * idle. An idle worker only notices a lost Redis through its own probes (a PING every
 * second feeding metrics_connections). */
#include <check.h>
#include <curl/curl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iwtest.h"

/* The contract: non-200 within 5 s of losing Redis, busy or idle. The worker below gets no
 * job after Redis dies, so only its own probing can notice. */
START_TEST(readyz_turns_red_within_5s_of_losing_redis_while_idle)
{
    char ns[128], addr[64], redis_url[96];
    int mock_port, http_port = iwt_free_port(), redis_port = iwt_free_port();

    snprintf(ns, sizeof ns, "%s", iwt_namespace("readyz"));
    iwt_cleanup(ns);
    iwt_declare(ns);
    pid_t mock = iwt_start_mock(NULL, &mock_port);
    pid_t r = iwt_start_redis(redis_port);
    snprintf(addr, sizeof addr, "IW_HTTP_ADDR=127.0.0.1:%d", http_port);
    snprintf(redis_url, sizeof redis_url, "IW_REDIS_URL=redis://127.0.0.1:%d/0", redis_port);
    const char *const env[] = {addr, redis_url, NULL};
    pid_t w = iwt_start_worker("submitter", ns, mock_port, env, "readyz");

    iwt_probe ready = {http_port, "/readyz", 200}, not_ready = {http_port, "/readyz", 0};
    /* Outcomes are recorded and asserted after the cleanup, so that a failure leaves no
     * process or namespace behind on the shared broker. */
    int was_ready = iwt_eventually(iwt_answers, &ready, 15000);
    int turned_red = 0, alive = 0, back = 0;
    long long took = -1;
    if (was_ready) {
        usleep(1500 * 1000); /* idle for a while: nothing but probes touches Redis */
        iwt_stop_tracked(r, SIGKILL);
        r = -1;
        long long t0 = iwt_now_ms();
        turned_red = iwt_eventually(iwt_answers, &not_ready, 5000);
        took = iwt_now_ms() - t0;
        alive = iwt_http_get(http_port, "/healthz", NULL) == 200; /* alive, just not ready */
        r = iwt_start_redis(redis_port);
        back = iwt_eventually(iwt_answers, &ready, 10000);
    }
    int stopped = iwt_stop(w, SIGTERM) == 0;
    if (r > 0)
        iwt_stop_tracked(r, SIGTERM);
    iwt_stop(mock, SIGTERM);
    iwt_cleanup(ns);

    ck_assert_msg(was_ready, "/readyz never 200");
    ck_assert_msg(turned_red, "/readyz still 200 5 s after Redis died (idle worker)");
    fprintf(stderr, "test_readyz: /readyz turned red %lld ms after Redis died\n", took);
    ck_assert_msg(alive, "/healthz not 200 while Redis is down");
    ck_assert_msg(back, "/readyz not 200 after Redis came back");
    ck_assert_msg(stopped, "worker did not stop cleanly");
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("readyz");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, readyz_turns_red_within_5s_of_losing_redis_while_idle);
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
