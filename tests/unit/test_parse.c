/* The parse module: durations, bounded integers, rate limits, schedules and
 * their compact formatting, as tables of good and bad inputs. */
#include <check.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "parse.h"

/* ---------------------------------------------------------------------------
 * parse_duration_ms
 * ------------------------------------------------------------------------ */

static const struct {
    const char *in;
    long ms;
} good_durations[] = {
    {"250ms", 250},      {"1500ms", 1500},      {"2s", 2000},     {"1m", 60000},
    {"24h", 86400000L},  {"1d", 86400000L},     {"0", 0},         {"0s", 0},
    {"0ms", 0},          {"7d", 7 * 86400000L}, {"5min", 300000}, {"3sec", 3000},
    {"2hour", 7200000L}, {"1day", 86400000L},   {"60s", 60000},   {"00", 0},
};

START_TEST(duration_good)
{
    iw_error err = {0};
    long out = -12345;

    ck_assert_msg(parse_duration_ms(good_durations[_i].in, &out, &err) == IW_OK, "'%s' refused: %s",
                  good_durations[_i].in, err.msg);
    ck_assert_int_eq(out, good_durations[_i].ms);
}
END_TEST

static const char *const bad_durations[] = {
    "",
    "5",
    "-1s",
    "2x",
    "1.5s",
    "s",
    "ms",
    " 2s",
    "2s ",
    "2 s",
    "+2s",
    "1e3ms",
    "2S",
    "2sx",
    "1w",
    "0x10s",
    "99999999999999999999s",
    "9223372036854775807d",
};

START_TEST(duration_bad)
{
    iw_error err = {0};
    long out = -12345;

    ck_assert_msg(parse_duration_ms(bad_durations[_i], &out, &err) == IW_ERR_INVALID,
                  "'%s' accepted as %ld", bad_durations[_i], out);
    ck_assert_int_eq(err.status, IW_ERR_INVALID);
    ck_assert_msg(err.msg[0] != '\0', "no message for '%s'", bad_durations[_i]);
    ck_assert_ptr_null(strchr(err.msg, '\n'));
    ck_assert_int_eq(out, -12345); /* untouched on failure */
}
END_TEST

START_TEST(duration_null_and_null_err)
{
    long out = -1;

    ck_assert_int_eq(parse_duration_ms(NULL, &out, NULL), IW_ERR_INVALID);
    ck_assert_int_eq(parse_duration_ms("2x", &out, NULL), IW_ERR_INVALID);
    ck_assert_int_eq(parse_duration_ms("2s", &out, NULL), IW_OK);
    ck_assert_int_eq(out, 2000);
}
END_TEST

START_TEST(duration_messages_quote_input)
{
    iw_error err = {0};
    long out;

    ck_assert_int_eq(parse_duration_ms("5", &out, &err), IW_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "'5'"));
    ck_assert_ptr_nonnull(strstr(err.msg, "unit"));
    ck_assert_int_eq(parse_duration_ms("2x", &out, &err), IW_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "'2x'"));
}
END_TEST

/* ---------------------------------------------------------------------------
 * parse_long
 * ------------------------------------------------------------------------ */

START_TEST(long_good)
{
    iw_error err = {0};
    long out = -1;

    ck_assert_int_eq(parse_long("0", 0, 10, &out, &err), IW_OK);
    ck_assert_int_eq(out, 0);
    ck_assert_int_eq(parse_long("10", 0, 10, &out, &err), IW_OK);
    ck_assert_int_eq(out, 10);
    ck_assert_int_eq(parse_long("64", 1, 10000, &out, &err), IW_OK);
    ck_assert_int_eq(out, 64);
    ck_assert_int_eq(parse_long("007", 1, 10, &out, &err), IW_OK);
    ck_assert_int_eq(out, 7);
    ck_assert_int_eq(parse_long("9223372036854775807", 0, LONG_MAX, &out, &err), IW_OK);
    ck_assert_int_eq(out, LONG_MAX);
}
END_TEST

static const char *const bad_longs[] = {
    "", "-1", "+1", " 1", "1 ", "1x", "x", "1.0", "0x10", "99999999999999999999", "1e3",
};

START_TEST(long_bad_syntax)
{
    iw_error err = {0};
    long out = -12345;

    ck_assert_msg(parse_long(bad_longs[_i], 0, LONG_MAX, &out, &err) == IW_ERR_INVALID,
                  "'%s' accepted as %ld", bad_longs[_i], out);
    ck_assert_int_eq(err.status, IW_ERR_INVALID);
    ck_assert_int_eq(out, -12345);
}
END_TEST

START_TEST(long_out_of_range)
{
    iw_error err = {0};
    long out = -12345;

    ck_assert_int_eq(parse_long("0", 1, 10000, &out, &err), IW_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "1..10000"));
    ck_assert_int_eq(parse_long("10001", 1, 10000, &out, &err), IW_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "10001"));
    ck_assert_int_eq(out, -12345);
    ck_assert_int_eq(parse_long(NULL, 0, 1, &out, &err), IW_ERR_INVALID);
    ck_assert_int_eq(parse_long("5", 0, 1, &out, NULL), IW_ERR_INVALID);
}
END_TEST

/* ---------------------------------------------------------------------------
 * parse_rate_limits
 * ------------------------------------------------------------------------ */

START_TEST(rate_limits_default)
{
    iw_rate_tier t[IW_MAX_TIERS];
    size_t n = 0;
    iw_error err = {0};

    ck_assert_int_eq(parse_rate_limits("50/min,1000/hour,20000/day", t, &n, &err), IW_OK);
    ck_assert_uint_eq(n, 3);
    ck_assert_int_eq(t[0].limit, 50);
    ck_assert_int_eq(t[0].window_ms, 60000);
    ck_assert_int_eq(t[1].limit, 1000);
    ck_assert_int_eq(t[1].window_ms, 3600000L);
    ck_assert_int_eq(t[2].limit, 20000);
    ck_assert_int_eq(t[2].window_ms, 86400000L);
}
END_TEST

START_TEST(rate_limits_units_and_durations)
{
    iw_rate_tier t[IW_MAX_TIERS];
    size_t n = 0;
    iw_error err = {0};

    ck_assert_int_eq(parse_rate_limits("30/s", t, &n, &err), IW_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(t[0].limit, 30);
    ck_assert_int_eq(t[0].window_ms, 1000);

    ck_assert_int_eq(parse_rate_limits("10/5s", t, &n, &err), IW_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(t[0].limit, 10);
    ck_assert_int_eq(t[0].window_ms, 5000);

    ck_assert_int_eq(parse_rate_limits("1/sec,2/250ms,3/2m,4/hour,5/2d", t, &n, &err), IW_OK);
    ck_assert_uint_eq(n, 5);
    ck_assert_int_eq(t[0].window_ms, 1000);
    ck_assert_int_eq(t[1].window_ms, 250);
    ck_assert_int_eq(t[2].window_ms, 120000);
    ck_assert_int_eq(t[3].window_ms, 3600000L);
    ck_assert_int_eq(t[4].window_ms, 2 * 86400000L);
    ck_assert_int_eq(t[4].limit, 5);
}
END_TEST

START_TEST(rate_limits_spaces)
{
    iw_rate_tier t[IW_MAX_TIERS];
    size_t n = 0;
    iw_error err = {0};

    ck_assert_msg(parse_rate_limits("  50/min , 1000/hour,\t20000/day  ", t, &n, &err) == IW_OK,
                  "%s", err.msg);
    ck_assert_uint_eq(n, 3);
    ck_assert_int_eq(t[0].limit, 50);
    ck_assert_int_eq(t[0].window_ms, 60000);
    ck_assert_int_eq(t[2].limit, 20000);
    ck_assert_int_eq(t[2].window_ms, 86400000L);
}
END_TEST

START_TEST(rate_limits_max_tiers)
{
    iw_rate_tier t[IW_MAX_TIERS];
    size_t n = 0;
    iw_error err = {0};

    ck_assert_int_eq(parse_rate_limits("1/s,2/s,3/s,4/s,5/s,6/s,7/s,8/s", t, &n, &err), IW_OK);
    ck_assert_uint_eq(n, IW_MAX_TIERS);
    ck_assert_int_eq(t[7].limit, 8);
}
END_TEST

static const char *const bad_rate_limits[] = {
    "50",
    "0/s",
    "x/min",
    "5/fortnight",
    "1/s,2/s,3/s,4/s,5/s,6/s,7/s,8/s,9/s",
    "",
    " ",
    ",",
    "50/min,",
    ",50/min",
    "50/min,,1000/hour",
    "-5/min",
    "50/",
    "/min",
    "50/0",
    "50/0s",
    "50/-1s",
    "50/1.5s",
    "5.5/min",
    "50/min/hour",
    "99999999999/min",
};

START_TEST(rate_limits_bad)
{
    iw_rate_tier t[IW_MAX_TIERS];
    size_t n = 12345;
    iw_error err = {0};

    ck_assert_msg(parse_rate_limits(bad_rate_limits[_i], t, &n, &err) == IW_ERR_INVALID,
                  "'%s' accepted", bad_rate_limits[_i]);
    ck_assert_int_eq(err.status, IW_ERR_INVALID);
    ck_assert_msg(err.msg[0] != '\0', "no message for '%s'", bad_rate_limits[_i]);
    ck_assert_uint_eq(n, 12345); /* untouched on failure */
}
END_TEST

START_TEST(rate_limits_too_long_and_null)
{
    iw_rate_tier t[IW_MAX_TIERS];
    size_t n = 0;
    char big[1024];

    memset(big, '1', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    ck_assert_int_eq(parse_rate_limits(big, t, &n, NULL), IW_ERR_INVALID);
    ck_assert_int_eq(parse_rate_limits(NULL, t, &n, NULL), IW_ERR_INVALID);
}
END_TEST

/* ---------------------------------------------------------------------------
 * parse_schedule
 * ------------------------------------------------------------------------ */

START_TEST(schedule_good)
{
    long ms[IW_MAX_SCHEDULE];
    size_t n = 0;
    iw_error err = {0};

    ck_assert_int_eq(parse_schedule("0s,2s,4s,8s", ms, &n, &err), IW_OK);
    ck_assert_uint_eq(n, 4);
    ck_assert_int_eq(ms[0], 0);
    ck_assert_int_eq(ms[1], 2000);
    ck_assert_int_eq(ms[2], 4000);
    ck_assert_int_eq(ms[3], 8000);

    ck_assert_int_eq(parse_schedule("5s, 10s, 30s, 1m, 5m", ms, &n, &err), IW_OK);
    ck_assert_uint_eq(n, 5);
    ck_assert_int_eq(ms[0], 5000);
    ck_assert_int_eq(ms[3], 60000);
    ck_assert_int_eq(ms[4], 300000);

    ck_assert_int_eq(parse_schedule("250ms", ms, &n, &err), IW_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(ms[0], 250);
}
END_TEST

static void make_list(char *buf, size_t len, int items)
{
    size_t used = 0;

    buf[0] = '\0';
    for (int i = 0; i < items; i++)
        used += (size_t)snprintf(buf + used, len - used, "%s%ds", i ? "," : "", i);
}

START_TEST(schedule_max_items)
{
    long ms[IW_MAX_SCHEDULE];
    size_t n = 0;
    iw_error err = {0};
    char buf[512];

    make_list(buf, sizeof buf, IW_MAX_SCHEDULE);
    ck_assert_int_eq(parse_schedule(buf, ms, &n, &err), IW_OK);
    ck_assert_uint_eq(n, IW_MAX_SCHEDULE);
    ck_assert_int_eq(ms[IW_MAX_SCHEDULE - 1], (IW_MAX_SCHEDULE - 1) * 1000L);

    make_list(buf, sizeof buf, IW_MAX_SCHEDULE + 1);
    n = 12345;
    ck_assert_int_eq(parse_schedule(buf, ms, &n, &err), IW_ERR_INVALID);
    ck_assert_uint_eq(n, 12345);
    ck_assert_ptr_nonnull(strstr(err.msg, "32"));
}
END_TEST

static const char *const bad_schedules[] = {
    "", " ", ",", "1s,,", "1s,", ",1s", "1s,,2s", "1s, ,2s", "1s,2x", "5", "-1s", "1.5s", "1s;2s",
};

START_TEST(schedule_bad)
{
    long ms[IW_MAX_SCHEDULE];
    size_t n = 12345;
    iw_error err = {0};

    ck_assert_msg(parse_schedule(bad_schedules[_i], ms, &n, &err) == IW_ERR_INVALID,
                  "'%s' accepted (%zu items)", bad_schedules[_i], n);
    ck_assert_int_eq(err.status, IW_ERR_INVALID);
    ck_assert_msg(err.msg[0] != '\0', "no message for '%s'", bad_schedules[_i]);
    ck_assert_uint_eq(n, 12345);
}
END_TEST

START_TEST(schedule_message_names_item)
{
    long ms[IW_MAX_SCHEDULE];
    size_t n = 0;
    iw_error err = {0};

    ck_assert_int_eq(parse_schedule("1s,2x,3s", ms, &n, &err), IW_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(err.msg, "'2x'"));
    ck_assert_int_eq(parse_schedule(NULL, ms, &n, NULL), IW_ERR_INVALID);
}
END_TEST

/* ---------------------------------------------------------------------------
 * format_duration
 * ------------------------------------------------------------------------ */

static const struct {
    long ms;
    const char *out;
} formats[] = {
    {0, "0s"},        {1, "1ms"},         {250, "250ms"},    {1500, "1500ms"},
    {2000, "2s"},     {90000, "90s"},     {60000, "1m"},     {300000, "5m"},
    {3600000L, "1h"}, {86400000L, "24h"}, {5400000L, "90m"}, {61000, "61s"},
};

START_TEST(format_table)
{
    char buf[32];

    ck_assert_str_eq(format_duration(formats[_i].ms, buf, sizeof buf), formats[_i].out);
}
END_TEST

/* Whatever format_duration prints, parse_duration_ms reads back. */
START_TEST(format_round_trip)
{
    static const long values[] = {0,     1,      999,     1000,     1001,      59999,
                                  60000, 120000, 3599999, 3600000L, 86400000L, 7 * 86400000L};
    char buf[32];
    long back;

    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
        format_duration(values[i], buf, sizeof buf);
        ck_assert_msg(parse_duration_ms(buf, &back, NULL) == IW_OK, "'%s' unreadable", buf);
        ck_assert_int_eq(back, values[i]);
    }
}
END_TEST

START_TEST(format_truncates_safely)
{
    char buf[4];

    format_duration(250, buf, sizeof buf);
    ck_assert_str_eq(buf, "250");
}
END_TEST

static Suite *parse_suite(void)
{
    Suite *s = suite_create("parse");
    TCase *tc;

    tc = tcase_create("duration");
    tcase_add_loop_test(tc, duration_good, 0, sizeof good_durations / sizeof good_durations[0]);
    tcase_add_loop_test(tc, duration_bad, 0, sizeof bad_durations / sizeof bad_durations[0]);
    tcase_add_test(tc, duration_null_and_null_err);
    tcase_add_test(tc, duration_messages_quote_input);
    suite_add_tcase(s, tc);

    tc = tcase_create("long");
    tcase_add_test(tc, long_good);
    tcase_add_loop_test(tc, long_bad_syntax, 0, sizeof bad_longs / sizeof bad_longs[0]);
    tcase_add_test(tc, long_out_of_range);
    suite_add_tcase(s, tc);

    tc = tcase_create("rate_limits");
    tcase_add_test(tc, rate_limits_default);
    tcase_add_test(tc, rate_limits_units_and_durations);
    tcase_add_test(tc, rate_limits_spaces);
    tcase_add_test(tc, rate_limits_max_tiers);
    tcase_add_loop_test(tc, rate_limits_bad, 0, sizeof bad_rate_limits / sizeof bad_rate_limits[0]);
    tcase_add_test(tc, rate_limits_too_long_and_null);
    suite_add_tcase(s, tc);

    tc = tcase_create("schedule");
    tcase_add_test(tc, schedule_good);
    tcase_add_test(tc, schedule_max_items);
    tcase_add_loop_test(tc, schedule_bad, 0, sizeof bad_schedules / sizeof bad_schedules[0]);
    tcase_add_test(tc, schedule_message_names_item);
    suite_add_tcase(s, tc);

    tc = tcase_create("format");
    tcase_add_loop_test(tc, format_table, 0, sizeof formats / sizeof formats[0]);
    tcase_add_test(tc, format_round_trip);
    tcase_add_test(tc, format_truncates_safely);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(parse_suite());

    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
