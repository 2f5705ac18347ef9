/* The job state machine's table: names, the paths a job really takes, and
 * the transitions that must never happen. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "jobstate.h"
#include "iwtest.h"

static void walk(const job_state *path, size_t n)
{
    for (size_t i = 1; i < n; i++)
        ck_assert_msg(job_state_allowed(path[i - 1], path[i]), "%s -> %s",
                      job_state_name(path[i - 1]), job_state_name(path[i]));
}

START_TEST(names)
{
    for (int s = 0; s < JOB_N_STATES; s++) {
        ck_assert_msg(*job_state_name((job_state)s), "state %d", s);
        for (int t = s + 1; t < JOB_N_STATES; t++)
            ck_assert_str_ne(job_state_name((job_state)s), job_state_name((job_state)t));
    }
    ck_assert_str_eq(job_state_name(JOB_SENDING_ON), "sending_on");
    ck_assert_str_eq(job_state_name(JOB_N_STATES), "unknown");
}
END_TEST

START_TEST(the_paths_jobs_take)
{
    static const job_state accepted[] = {JOB_RECEIVED,  JOB_VALIDATED,  JOB_READY,
                                         JOB_PERMITTED, JOB_CALLING,    JOB_CLASSIFIED,
                                         JOB_RECORDING, JOB_PUBLISHING, JOB_ACKED};
    static const job_state next_check[] = {JOB_READY,      JOB_PERMITTED,  JOB_CALLING,
                                           JOB_CLASSIFIED, JOB_PUBLISHING, JOB_ACKED};
    static const job_state retried[] = {JOB_READY,      JOB_PERMITTED,  JOB_CALLING,
                                        JOB_CLASSIFIED, JOB_SENDING_ON, JOB_ACKED};
    static const job_state held[] = {JOB_READY, JOB_HELD, JOB_READY, JOB_PERMITTED};
    static const job_state rate_limited[] = {JOB_CALLING, JOB_CLASSIFIED, JOB_HELD, JOB_READY};
    static const job_state invalid[] = {JOB_RECEIVED, JOB_FAILING, JOB_ACKED};
    static const job_state redelivered[] = {JOB_READY, JOB_ADOPTING, JOB_PUBLISHING, JOB_ACKED};
    static const job_state lost_race[] = {JOB_CLASSIFIED, JOB_RECORDING, JOB_ADOPTING, JOB_HELD,
                                          JOB_READY,      JOB_ADOPTING,  JOB_ACKED};
    walk(accepted, sizeof accepted / sizeof accepted[0]);
    walk(next_check, sizeof next_check / sizeof next_check[0]);
    walk(retried, sizeof retried / sizeof retried[0]);
    walk(held, sizeof held / sizeof held[0]);
    walk(rate_limited, sizeof rate_limited / sizeof rate_limited[0]);
    walk(invalid, sizeof invalid / sizeof invalid[0]);
    walk(redelivered, sizeof redelivered / sizeof redelivered[0]);
    walk(lost_race, sizeof lost_race / sizeof lost_race[0]);
}
END_TEST

START_TEST(final_states_have_no_exit)
{
    for (int f = 0; f < JOB_N_STATES; f++) {
        if (!job_state_final((job_state)f))
            continue;
        for (int t = 0; t < JOB_N_STATES; t++)
            ck_assert_msg(!job_state_allowed((job_state)f, (job_state)t), "%s -> %s",
                          job_state_name((job_state)f), job_state_name((job_state)t));
    }
    ck_assert(job_state_final(JOB_ACKED) && job_state_final(JOB_RETURNED) &&
              job_state_final(JOB_DROPPED) && !job_state_final(JOB_PUBLISHING));
}
END_TEST

START_TEST(what_never_happens)
{
    /* no call without a permit, no ack before a publish is confirmed, no
     * publish of an outcome that was not recorded first */
    ck_assert(!job_state_allowed(JOB_READY, JOB_CALLING));
    ck_assert(!job_state_allowed(JOB_HELD, JOB_CALLING));
    ck_assert(!job_state_allowed(JOB_CALLING, JOB_ACKED));
    ck_assert(!job_state_allowed(JOB_CLASSIFIED, JOB_ACKED));
    ck_assert(!job_state_allowed(JOB_CLASSIFIED, JOB_ACKED) &&
              !job_state_allowed(JOB_READY, JOB_ACKED));
    ck_assert(!job_state_allowed(JOB_RECORDING, JOB_ACKED));
    ck_assert(!job_state_allowed(JOB_PUBLISHING, JOB_CALLING));
    ck_assert(!job_state_allowed(JOB_RECEIVED, JOB_RECEIVED));
    /* every live state can be dropped or returned */
    for (int s = 0; s < JOB_N_STATES; s++)
        if (!job_state_final((job_state)s))
            ck_assert(job_state_allowed((job_state)s, JOB_DROPPED) &&
                      job_state_allowed((job_state)s, JOB_RETURNED));
    ck_assert(!job_state_allowed(JOB_N_STATES, JOB_ACKED));
}
END_TEST

int main(void)
{
    Suite *s = suite_create("jobstate");
    TCase *tc = tcase_create("table");

    tcase_add_test(tc, names);
    tcase_add_test(tc, the_paths_jobs_take);
    tcase_add_test(tc, final_states_have_no_exit);
    tcase_add_test(tc, what_never_happens);
    suite_add_tcase(s, tc);
    return iwt_run_suite(s);
}
