/* The topology module's pure parts: the delay tiers, the choice of a tier for
 * a remaining delay, and composing any delay from hops; names. */
#include <check.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "topology.h"

#define DAY_MS 86400000L

/* ---------------------------------------------------------------------------
 * Tiers
 * ------------------------------------------------------------------------ */

START_TEST(tier_values)
{
    ck_assert_int_eq(IW_DELAY_TIERS, 19);
    for (int k = 0; k < IW_DELAY_TIERS; k++)
        ck_assert_int_eq(topology_tier_ms(k), 250L << k);
    ck_assert_int_eq(topology_tier_ms(0), 250);
    ck_assert_int_eq(topology_tier_ms(1), 500);
    ck_assert_int_eq(topology_tier_ms(3), 2000);
    ck_assert_int_eq(topology_tier_ms(5), 8000);
    ck_assert_int_eq(topology_tier_ms(10), 256000);
    ck_assert_int_eq(topology_tier_ms(18), 65536000L); /* ~18.2 h */
}
END_TEST

static const struct {
    long remaining_ms;
    long tier_ms; /* -1: due now */
} picks[] = {
    {LONG_MIN, -1},
    {-1000, -1},
    {0, -1},
    {1, -1},
    {50, -1},
    {51, 250},
    {60, 250},
    {249, 250},
    {250, 250},
    {449, 250}, /* + 50 ms tolerance: still short of 500 */
    {450, 500}, /* within 50 ms of 500: one hop of 500, at most 50 ms late */
    {499, 500},
    {500, 500},
    {941, 500}, /* tolerance 941/16 = 58: 999 < 1000 */
    {999, 1000},
    {1000, 1000},
    {1880, 1000},
    {1999, 2000},
    {2000, 2000},
    {2001, 2000},
    {7799, 4000},
    {7999, 8000}, /* tolerance capped at 200 ms from here on */
    {8000, 8000},
    {62000, 32000},
    {63800, 64000},
    {300000, 256000},
    {65535799L, 32768000L},
    {65535800L, 65536000L},
    {65536000L, 65536000L},
    {DAY_MS, 65536000L},
    {30 * DAY_MS, 65536000L},
    {LONG_MAX, 65536000L},
};

START_TEST(pick_table)
{
    int k = topology_pick_tier(picks[_i].remaining_ms);

    if (picks[_i].tier_ms < 0) {
        ck_assert_msg(k == -1, "pick(%ld) = %d, want -1", picks[_i].remaining_ms, k);
    } else {
        ck_assert_msg(k >= 0 && k < IW_DELAY_TIERS, "pick(%ld) = %d", picks[_i].remaining_ms, k);
        ck_assert_msg(topology_tier_ms(k) == picks[_i].tier_ms, "pick(%ld) = tier %ld, want %ld",
                      picks[_i].remaining_ms, topology_tier_ms(k), picks[_i].tier_ms);
    }
}
END_TEST

/* Every tier picks itself, and the value just below picks the one below. */
START_TEST(pick_exact_tiers)
{
    for (int k = 0; k < IW_DELAY_TIERS; k++) {
        ck_assert_int_eq(topology_pick_tier(topology_tier_ms(k)), k);
        if (k > 0) /* just below a tier's tolerance: the tier below */
            ck_assert_int_eq(topology_pick_tier(topology_tier_ms(k) - 1 -
                                                topology_hop_tolerance(topology_tier_ms(k))),
                             k - 1);
    }
}
END_TEST

/* ---------------------------------------------------------------------------
 * Composing a delay from hops
 * ------------------------------------------------------------------------ */

typedef struct hops_result {
    int hops;
    long rest; /* remaining when the last pick said "due now"; negative = overshoot */
} hops_result;

/* Follows the consumer: pick a tier for what remains, wait it, repeat.  The
 * loops below run millions of times, so they test with plain ifs: a passing
 * ck_assert costs a write to Check's pipe. */
static hops_result compose(long delay_ms)
{
    hops_result r = {0, delay_ms};
    int k;

    while ((k = topology_pick_tier(r.rest)) != -1) {
        if (k < 0 || k >= IW_DELAY_TIERS)
            ck_abort_msg("%ld: pick(%ld) = %d", delay_ms, r.rest, k);
        long tier = topology_tier_ms(k);
        /* greedy: the largest tier that fits (with its tolerance), or the smallest */
        long tol = topology_hop_tolerance(r.rest);
        if ((tier - tol > r.rest && k != 0) ||
            (k < IW_DELAY_TIERS - 1 && topology_tier_ms(k + 1) - tol <= r.rest))
            ck_abort_msg("%ld: pick(%ld) = tier %ld is not the largest that fits", delay_ms, r.rest,
                         tier);
        r.rest -= tier;
        r.hops++;
        if (r.hops > 64)
            ck_abort_msg("no end composing %ld", delay_ms);
    }
    return r;
}

static void check_delay(long delay_ms, int *max_hops, long *max_overshoot)
{
    hops_result r = compose(delay_ms);

    if (r.rest > IW_DELAY_SLACK_MS)
        ck_abort_msg("%ld: %ld ms left", delay_ms, r.rest);
    if (r.rest < -250)
        ck_abort_msg("%ld: overshoot %ld ms", delay_ms, -r.rest);
    if (r.hops > 20)
        ck_abort_msg("%ld: %d hops", delay_ms, r.hops);
    if (r.hops > *max_hops)
        *max_hops = r.hops;
    if (-r.rest > *max_overshoot)
        *max_overshoot = -r.rest;
}

START_TEST(compose_small_exhaustive)
{
    int max_hops = 0;
    long max_overshoot = 0;

    for (long d = 1; d <= 1000000; d++)
        check_delay(d, &max_hops, &max_overshoot);
    ck_assert_int_ge(max_hops, 10); /* the property was exercised, not vacuous */
    ck_assert_int_gt(max_overshoot, 0);
}
END_TEST

/* A fixed xorshift generator: the same sample every run. */
static uint64_t next_random(uint64_t *state)
{
    uint64_t x = *state;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return x;
}

START_TEST(compose_random_up_to_a_day)
{
    uint64_t state = 0x9e3779b97f4a7c15ULL;
    int max_hops = 0;
    long max_overshoot = 0;

    for (int i = 0; i < 1000000; i++)
        check_delay(1 + (long)(next_random(&state) % (uint64_t)DAY_MS), &max_hops, &max_overshoot);
    ck_assert_int_ge(max_hops, 15);
}
END_TEST

/* The edges: around every tier and every sum of tiers below a day, where a
 * greedy composition is longest, and the day itself. */
START_TEST(compose_edges)
{
    int max_hops = 0;
    long max_overshoot = 0;

    for (int k = 0; k < IW_DELAY_TIERS; k++) {
        long t = topology_tier_ms(k);
        for (long d = t - 300; d <= t + 300; d++)
            if (d >= 1)
                check_delay(d, &max_hops, &max_overshoot);
        /* all tiers up to k: the most hops for its size */
        long all = 2 * t - 250;
        for (long d = all - 300; d <= all + 300; d++)
            if (d >= 1 && d <= DAY_MS)
                check_delay(d, &max_hops, &max_overshoot);
    }
    /* the top tier plus every lower one that still fits in a day */
    long worst = topology_tier_ms(IW_DELAY_TIERS - 1);
    for (int k = IW_DELAY_TIERS - 2; k >= 0; k--)
        if (worst + topology_tier_ms(k) <= DAY_MS)
            worst += topology_tier_ms(k);
    for (long d = worst - 300; d <= worst + 300 && d <= DAY_MS; d++)
        check_delay(d, &max_hops, &max_overshoot);
    for (long d = DAY_MS - 1000; d <= DAY_MS; d++)
        check_delay(d, &max_hops, &max_overshoot);
    ck_assert_int_ge(max_hops, 18); /* the longest compositions were exercised */
    ck_assert_int_lt(max_overshoot, 250);
}
END_TEST

/* The search over every pair of tiers that topology_few_hops replaced by
 * arithmetic: the reference it must agree with. */
static long few_hops_reference(long target_ms, long lo_ms, long hi_ms)
{
    long best = target_ms, best_dist = -1;

    for (int a = 0; a < IW_DELAY_TIERS && topology_tier_ms(a) <= hi_ms; a++)
        for (int b = -1; b <= a; b++) {
            long v = topology_tier_ms(a) + (b >= 0 ? topology_tier_ms(b) : 0);
            long d = v > target_ms ? v - target_ms : target_ms - v;
            if (v > hi_ms)
                break;
            if (v >= lo_ms && (best_dist < 0 || d < best_dist)) {
                best = v;
                best_dist = d;
            }
        }
    return best;
}

START_TEST(few_hops_agree_with_the_search)
{
    uint64_t state = 0x13198a2e03707344ULL;
    long max = 2 * topology_tier_ms(IW_DELAY_TIERS - 1);

    /* targets on and off the 250 ms grid, ties, empty and inverted ranges,
     * both ends of the tiers and past them */
    for (long t = 0; t <= 20000; t += 125)
        for (long span = 0; span <= 3000; span += 250)
            ck_assert_int_eq(topology_few_hops(t, t - span, t + span),
                             few_hops_reference(t, t - span, t + span));
    for (int n = 0; n < 50000; n++) {
        long t = (long)(next_random(&state) % (uint64_t)(max + 100000));
        long lo = t - (long)(next_random(&state) % (uint64_t)(t / 3 + 2));
        long hi = t + (long)(next_random(&state) % (uint64_t)(t / 3 + 2));
        if (n % 7 == 0)
            lo = hi + 1;
        ck_assert_msg(topology_few_hops(t, lo, hi) == few_hops_reference(t, lo, hi),
                      "%ld in [%ld, %ld]: %ld, the search %ld", t, lo, hi,
                      topology_few_hops(t, lo, hi), few_hops_reference(t, lo, hi));
    }
    ck_assert_int_eq(topology_few_hops(max, 0, max * 2), max);
    ck_assert_int_eq(topology_few_hops(max + 1, 0, max * 2), max);
    ck_assert_int_eq(topology_few_hops(1, 0, 10), 1);
}
END_TEST

/* ---------------------------------------------------------------------------
 * Jittered poll waits of at most two hops
 * ------------------------------------------------------------------------ */

START_TEST(few_hops_stay_in_range)
{
    static const long bases[] = {1000, 5000, 10000, 30000, 60000, 300000, 3600000L};
    uint64_t state = 0x243f6a8885a308d3ULL;

    for (size_t i = 0; i < sizeof bases / sizeof bases[0]; i++) {
        long lo = bases[i] * 8 / 10, hi = bases[i] * 12 / 10, distinct = 0, last = -1;
        for (long t = lo; t <= hi; t += (hi - lo) / 200) {
            long w = topology_few_hops(t, lo, hi);
            ck_assert_msg(w >= lo && w <= hi, "%ld in [%ld, %ld]: %ld", t, lo, hi, w);
            ck_assert_msg(topology_hops(w) <= 2, "%ld: %ld hops", w, topology_hops(w));
            if (w != last)
                distinct++;
            last = w;
        }
        /* the jitter still spreads the waits (every hop ends on the 250 ms
         * grid anyway: 1 s +-20% holds one point of it) */
        ck_assert_msg(distinct >= (bases[i] < 5000 ? 1 : 4), "base %ld: %ld distinct waits",
                      bases[i], distinct);
        /* nearest: no wait of at most two hops is closer to the target */
        for (int n = 0; n < 1000; n++) {
            long t = lo + (long)(next_random(&state) % (uint64_t)(hi - lo + 1));
            long w = topology_few_hops(t, lo, hi), d = labs(w - t);
            for (long v = lo; v <= hi; v += 250)
                if (topology_hops(v) <= 2 && labs(v - t) < d && v % 250 == 0)
                    ck_abort_msg("%ld: %ld is closer than %ld", t, v, w);
        }
    }
    /* no wait of two hops in the range: the target as it is */
    ck_assert_int_eq(topology_few_hops(5300, 5300, 5300), 5300);
    ck_assert_int_eq(topology_few_hops(4000, 4000, 4000), 4000);
    ck_assert_int_eq(topology_hops(4000), 1);
    ck_assert_int_eq(topology_hops(5000), 2);
    ck_assert_int_eq(topology_hops(7750), 5);
    ck_assert_int_eq(topology_hops(0), 0);
}
END_TEST

/* ---------------------------------------------------------------------------
 * Names
 * ------------------------------------------------------------------------ */

START_TEST(names)
{
    char buf[64];

    ck_assert_str_eq(topology_name(buf, sizeof buf, "ext-api", "submit"), "ext-api.submit");
    ck_assert_str_eq(topology_name(buf, sizeof buf, "ext-api", "delay.250"), "ext-api.delay.250");
    ck_assert_ptr_eq(topology_name(buf, sizeof buf, "n", "dead"), buf);
    ck_assert_str_eq(buf, "n.dead");

    char small[8];
    ck_assert_str_eq(topology_name(small, sizeof small, "ext-api", "submit"), "ext-api");
}
END_TEST

/* Every tier's queue suffix, written without printf, is what printf writes:
 * the names the broker holds (declared by topology_declare, published to by
 * rt_publish_delayed) must not change. */
START_TEST(tier_suffixes)
{
    char want[64], got[TOPOLOGY_SUFFIX_SIZE];

    for (int k = 0; k < IW_DELAY_TIERS; k++) {
        snprintf(want, sizeof want, "delay.%ld", topology_tier_ms(k));
        ck_assert_ptr_eq(topology_tier_suffix(k, got), got);
        ck_assert_str_eq(got, want);
    }
    ck_assert_str_eq(topology_tier_suffix(0, got), "delay.250");
    ck_assert_str_eq(topology_tier_suffix(IW_DELAY_TIERS - 1, got), "delay.65536000");
}
END_TEST

static Suite *topology_suite(void)
{
    Suite *s = suite_create("topology");
    TCase *tc;

    tc = tcase_create("tiers");
    tcase_add_test(tc, tier_values);
    tcase_add_loop_test(tc, pick_table, 0, sizeof picks / sizeof picks[0]);
    tcase_add_test(tc, pick_exact_tiers);
    suite_add_tcase(s, tc);

    tc = tcase_create("compose");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, compose_small_exhaustive);
    tcase_add_test(tc, compose_random_up_to_a_day);
    tcase_add_test(tc, compose_edges);
    tcase_add_test(tc, few_hops_stay_in_range);
    tcase_add_test(tc, few_hops_agree_with_the_search);
    suite_add_tcase(s, tc);

    tc = tcase_create("names");
    tcase_add_test(tc, names);
    tcase_add_test(tc, tier_suffixes);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(topology_suite());

    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
