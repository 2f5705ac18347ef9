/* A job that kills its worker at every delivery must not loop forever: the
 * quorum queue's delivery limit moves it to the dead-letter queue. */
#include <check.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iwtest.h"

static int mock_port;

/* Submissions the mock has received (it decides on arrival, then holds the
 * answer for the configured latency). */
static long arrivals(void)
{
    json_t *st = iwt_mock_stats(mock_port);
    long n = (long)(json_integer_value(json_object_get(st, "submissions_created")) +
                    json_integer_value(json_object_get(st, "duplicates_refused")));
    json_decref(st);
    return n;
}

static int new_arrival(void *ud)
{
    return arrivals() > *(long *)ud;
}

START_TEST(test_delivery_limit_dead_letters_a_poison_job)
{
    const char *ns = iwt_namespace("poison");
    /* the claim of a killed call lasts IW_HTTP_TIMEOUT + 5 s: the next
     * delivery holds the job that long, then calls (and is killed) again */
    const char *env[] = {"IW_DELIVERY_LIMIT=2", "IW_HTTP_TIMEOUT=6s", NULL};
    const char *declare[] = {"declare", NULL};
    const char *mock_args[] = {"--latency-ms", "5000", NULL};
    char queue[256];
    iwt_msg *dead = NULL;
    int kills = 0;

    iwt_cleanup(ns);
    ck_assert_int_eq(iwt_run_worker_cmd(declare, ns, 1, env, NULL), 0);
    pid_t mock = iwt_start_mock(mock_args, &mock_port);
    iwt_amqp *a = iwt_amqp_open();
    iwt_publish_job(a, ns,
                    "{\"jobId\":\"poison-1\",\"userId\":\"u\",\"action\":\"transaction\","
                    "\"payload\":{}}");
    snprintf(queue, sizeof queue, "%s.dead", ns);

    /* every delivery ends with the worker killed in the middle of its call */
    while (kills < 6 && !dead) {
        long before = arrivals();
        pid_t w = iwt_start_worker("submitter", ns, mock_port, env, "poison");
        if (iwt_eventually(new_arrival, &before, 20000)) {
            ck_assert_int_eq(iwt_stop(w, SIGKILL), 128 + SIGKILL);
            kills++;
        } else {
            iwt_stop(w, SIGTERM);
        }
        dead = iwt_get(a, queue, 1000);
    }
    ck_assert_msg(dead != NULL, "not dead-lettered after %d kills", kills);
    ck_assert_int_le(kills, 3);
    ck_assert_str_eq(dead->raw, "{\"jobId\":\"poison-1\",\"userId\":\"u\",\"action\":"
                                "\"transaction\",\"payload\":{}}");
    json_t *death = json_array_get(json_object_get(dead->headers, "x-death"), 0);
    ck_assert_ptr_nonnull(death);
    ck_assert_str_eq(json_string_value(json_object_get(death, "reason")), "delivery_limit");

    /* the redelivered calls were answered from the Idempotency-Key */
    json_t *st = iwt_mock_stats(mock_port);
    ck_assert_int_le(json_integer_value(json_object_get(st, "submissions_created")), 1);
    json_decref(st);
    snprintf(queue, sizeof queue, "%s.submit", ns);
    ck_assert_int_eq(iwt_queue_depth(a, queue), 0);

    iwt_msg_free(dead);
    iwt_amqp_close(a);
    iwt_stop(mock, SIGTERM);
    iwt_cleanup(ns);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("poison");
    TCase *tc = tcase_create("delivery_limit");
    tcase_set_timeout(tc, 200);
    tcase_add_test(tc, test_delivery_limit_dead_letters_a_poison_job);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
