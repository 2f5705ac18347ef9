/* The retry module: the spec's error table (retry_classify), the retry
 * schedule, Retry-After parsing and jitter bounds. */
#include <check.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "parse.h"
#include "retry.h"

/* ---------------------------------------------------------------------------
 * retry_classify
 * ------------------------------------------------------------------------ */

static const struct {
    long status;
    iw_transport transport;
    long retry_after_ms;
    iw_verdict_kind kind;
    const char *code; /* NULL: no code */
    long wait_ms;
    int breaker_failure;
} classify_cases[] = {
    /* 2xx: accept */
    {200, IW_TRANSPORT_OK, -1, IW_V_ACCEPT, NULL, 0, 0},
    {201, IW_TRANSPORT_OK, -1, IW_V_ACCEPT, NULL, 0, 0},
    {204, IW_TRANSPORT_OK, -1, IW_V_ACCEPT, NULL, 0, 0},
    /* the spec's 4xx: permanent, never a breaker failure */
    {400, IW_TRANSPORT_OK, -1, IW_V_FAIL, "EXTERNAL_API_BAD_REQUEST", 0, 0},
    {401, IW_TRANSPORT_OK, -1, IW_V_FAIL, "EXTERNAL_API_UNAUTHORIZED", 0, 0},
    {403, IW_TRANSPORT_OK, -1, IW_V_FAIL, "EXTERNAL_API_FORBIDDEN", 0, 0},
    {404, IW_TRANSPORT_OK, -1, IW_V_FAIL, "EXTERNAL_API_NOT_FOUND", 0, 0},
    /* other 4xx */
    {418, IW_TRANSPORT_OK, -1, IW_V_FAIL, "EXTERNAL_API_CLIENT_ERROR", 0, 0},
    {409, IW_TRANSPORT_OK, -1, IW_V_FAIL, "EXTERNAL_API_CLIENT_ERROR", 0, 0},
    {422, IW_TRANSPORT_OK, -1, IW_V_FAIL, "EXTERNAL_API_CLIENT_ERROR", 0, 0},
    {499, IW_TRANSPORT_OK, -1, IW_V_FAIL, "EXTERNAL_API_CLIENT_ERROR", 0, 0},
    /* 429: wait for the reset (or the default), never a breaker failure */
    {429, IW_TRANSPORT_OK, 5000, IW_V_WAIT, "EXTERNAL_API_RATE_LIMITED", 5000, 0},
    {429, IW_TRANSPORT_OK, 0, IW_V_WAIT, "EXTERNAL_API_RATE_LIMITED", 0, 0},
    {429, IW_TRANSPORT_OK, -1, IW_V_WAIT, "EXTERNAL_API_RATE_LIMITED", IW_DEFAULT_429_WAIT_MS, 0},
    /* 5xx: transient, breaker failure */
    {500, IW_TRANSPORT_OK, -1, IW_V_RETRY, "EXTERNAL_API_ERROR", 0, 1},
    {502, IW_TRANSPORT_OK, -1, IW_V_RETRY, "EXTERNAL_API_ERROR", 0, 1},
    {503, IW_TRANSPORT_OK, -1, IW_V_RETRY, "EXTERNAL_API_ERROR", 0, 1},
    {503, IW_TRANSPORT_OK, 30000, IW_V_RETRY, "EXTERNAL_API_ERROR", 0, 1},
    {504, IW_TRANSPORT_OK, -1, IW_V_RETRY, "EXTERNAL_API_ERROR", 0, 1},
    {599, IW_TRANSPORT_OK, -1, IW_V_RETRY, "EXTERNAL_API_ERROR", 0, 1},
    /* anything else: permanent and unexpected */
    {302, IW_TRANSPORT_OK, -1, IW_V_FAIL, "EXTERNAL_API_UNEXPECTED_STATUS", 0, 0},
    {304, IW_TRANSPORT_OK, -1, IW_V_FAIL, "EXTERNAL_API_UNEXPECTED_STATUS", 0, 0},
    {100, IW_TRANSPORT_OK, -1, IW_V_FAIL, "EXTERNAL_API_UNEXPECTED_STATUS", 0, 0},
    {600, IW_TRANSPORT_OK, -1, IW_V_FAIL, "EXTERNAL_API_UNEXPECTED_STATUS", 0, 0},
    /* transport failures */
    {0, IW_TRANSPORT_TIMEOUT, -1, IW_V_RETRY, "EXTERNAL_API_TIMEOUT", 0, 1},
    {0, IW_TRANSPORT_CONNECT, -1, IW_V_RETRY, "EXTERNAL_API_UNREACHABLE", 0, 1},
    {0, IW_TRANSPORT_OTHER, -1, IW_V_RETRY, "EXTERNAL_API_UNREACHABLE", 0, 1},
    {0, IW_TRANSPORT_TOO_LARGE, -1, IW_V_FAIL, "EXTERNAL_API_RESPONSE_TOO_LARGE", 0, 0},
    /* a transport failure wins over whatever status was half-read */
    {200, IW_TRANSPORT_TIMEOUT, -1, IW_V_RETRY, "EXTERNAL_API_TIMEOUT", 0, 1},
    {200, IW_TRANSPORT_TOO_LARGE, -1, IW_V_FAIL, "EXTERNAL_API_RESPONSE_TOO_LARGE", 0, 0},
};

START_TEST(classify_table)
{
    iw_http_result r = {classify_cases[_i].status, classify_cases[_i].transport,
                        classify_cases[_i].retry_after_ms, 0, 0};
    iw_verdict v = retry_classify(&r);

    ck_assert_msg(v.kind == classify_cases[_i].kind, "status %ld transport %d: kind %d, want %d",
                  r.status, (int)r.transport, (int)v.kind, (int)classify_cases[_i].kind);
    if (classify_cases[_i].code)
        ck_assert_str_eq(iw_code_name(v.code), classify_cases[_i].code);
    else
        ck_assert_int_eq(v.code, IW_C_NONE);
    ck_assert_msg(v.breaker_failure == classify_cases[_i].breaker_failure,
                  "status %ld transport %d: breaker_failure %d", r.status, (int)r.transport,
                  v.breaker_failure);
    if (v.kind == IW_V_WAIT)
        ck_assert_int_eq(v.wait_ms, classify_cases[_i].wait_ms);
}
END_TEST

/* The contract: a 429 or any 4xx never counts as a breaker failure; every
 * 5xx does; every non-2xx has a code. */
START_TEST(classify_every_status)
{
    for (long status = 100; status < 700; status++) {
        iw_http_result r = {status, IW_TRANSPORT_OK, -1, 0, 0};
        iw_verdict v = retry_classify(&r);

        if (status >= 400 && status < 500)
            ck_assert_msg(!v.breaker_failure, "%ld counts as a breaker failure", status);
        if (status >= 500 && status < 600)
            ck_assert_msg(v.breaker_failure && v.kind == IW_V_RETRY, "%ld", status);
        if (status >= 200 && status < 300)
            ck_assert_msg(v.kind == IW_V_ACCEPT && v.code == IW_C_NONE, "%ld", status);
        else
            ck_assert_msg(v.code != IW_C_NONE &&
                              strncmp(iw_code_name(v.code), "EXTERNAL_API_", 13) == 0,
                          "%ld", status);
        if (v.kind == IW_V_ACCEPT)
            ck_assert_msg(status >= 200 && status < 300, "%ld accepted", status);
        if (v.kind == IW_V_WAIT)
            ck_assert_int_eq(status, 429);
    }
}
END_TEST

/* ---------------------------------------------------------------------------
 * retry_delay_before
 * ------------------------------------------------------------------------ */

START_TEST(delay_default_schedule)
{
    long schedule[IW_MAX_SCHEDULE];
    size_t n = 0;

    ck_assert_int_eq(parse_schedule("0s,2s,4s,8s", schedule, &n, NULL), IW_OK);
    ck_assert_uint_eq(n, 4);
    ck_assert_int_eq(retry_delay_before(schedule, n, 1), 0);
    ck_assert_int_eq(retry_delay_before(schedule, n, 2), 2000);
    ck_assert_int_eq(retry_delay_before(schedule, n, 3), 4000);
    ck_assert_int_eq(retry_delay_before(schedule, n, 4), 8000);
    ck_assert_int_eq(retry_delay_before(schedule, n, 5), -1);
    ck_assert_int_eq(retry_delay_before(schedule, n, 0), -1);
    ck_assert_int_eq(retry_delay_before(schedule, n, -1), -1);
    ck_assert_int_eq(retry_delay_before(schedule, n, 1000), -1);
}
END_TEST

START_TEST(delay_empty_and_single)
{
    const long one[] = {1500};

    ck_assert_int_eq(retry_delay_before(NULL, 0, 1), -1);
    ck_assert_int_eq(retry_delay_before(one, 1, 1), 1500);
    ck_assert_int_eq(retry_delay_before(one, 1, 2), -1);
}
END_TEST

/* ---------------------------------------------------------------------------
 * retry_parse_retry_after
 * ------------------------------------------------------------------------ */

/* A cap that leaves the values of these tests as they are. */
#define DAYS30 (30L * 86400000L)

/* An IMF-fixdate for a wall time in seconds. */
static void imf_fixdate(time_t secs, char *buf, size_t len)
{
    static const char *const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                         "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    struct tm tm;

    gmtime_r(&secs, &tm);
    snprintf(buf, len, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[tm.tm_wday], tm.tm_mday,
             months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

START_TEST(retry_after_seconds)
{
    ck_assert_int_eq(retry_parse_retry_after("120", 0, DAYS30, NULL), 120000);
    ck_assert_int_eq(retry_parse_retry_after(" 3 ", 0, DAYS30, NULL), 3000);
    ck_assert_int_eq(retry_parse_retry_after("0", 123456789LL, DAYS30, NULL), 0);
    ck_assert_int_eq(retry_parse_retry_after("1", 0, DAYS30, NULL), 1000);
    ck_assert_int_eq(retry_parse_retry_after("\t7\r\n", 0, DAYS30, NULL), 7000);
    ck_assert_int_eq(retry_parse_retry_after("2592000", 0, DAYS30, NULL),
                     2592000000L); /* 30 days */
}
END_TEST

START_TEST(retry_after_known_date)
{
    /* RFC 9110's example: Sun, 06 Nov 1994 08:49:37 GMT = 784111777 */
    const long long when_ms = 784111777LL * 1000;

    ck_assert_int_eq(
        retry_parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", when_ms - 10000, DAYS30, NULL),
        10000);
    ck_assert_int_eq(
        retry_parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", when_ms - 1500, DAYS30, NULL),
        1500);
    ck_assert_int_eq(
        retry_parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", when_ms, DAYS30, NULL), 0);
    ck_assert_int_eq(
        retry_parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", when_ms + 5000, DAYS30, NULL), 0);
}
END_TEST

START_TEST(retry_after_date_relative_to_now)
{
    const time_t now = 1700000000; /* Tue, 14 Nov 2023 22:13:20 GMT */
    const long long now_ms = (long long)now * 1000 + 250;
    char date[64];

    imf_fixdate(now + 10, date, sizeof date);
    ck_assert_int_eq(retry_parse_retry_after(date, (long long)now * 1000, DAYS30, NULL), 10000);
    /* the date has whole seconds; now's milliseconds are subtracted */
    ck_assert_int_eq(retry_parse_retry_after(date, now_ms, DAYS30, NULL), 9750);

    imf_fixdate(now - 3600, date, sizeof date);
    ck_assert_int_eq(retry_parse_retry_after(date, now_ms, DAYS30, NULL), 0);

    imf_fixdate(now + 86400, date, sizeof date);
    ck_assert_int_eq(retry_parse_retry_after(date, (long long)now * 1000, DAYS30, NULL), 86400000L);
}
END_TEST

static const char *const junk_retry_after[] = {
    "",
    "   ",
    "soon",
    "-5",
    "1.5",
    "12abc",
    "12 34",
    "Sun, 06 Nov 1994 08:49:37",
    "Sun, 06 Nov 1994 08:49:37 GMT trailing",
    "Sunday, 06-Nov-94 08:49:37 GMT",
    "Sun Nov  6 08:49:37 1994",
    "Sun, 32 Nov 1994 08:49:37 GMT",
    "Sun, 06 Foo 1994 08:49:37 GMT",
};

START_TEST(retry_after_junk)
{
    ck_assert_msg(retry_parse_retry_after(junk_retry_after[_i], 0, DAYS30, NULL) == -1,
                  "'%s' accepted", junk_retry_after[_i]);
}
END_TEST

START_TEST(retry_after_null)
{
    int capped = 7;
    ck_assert_int_eq(retry_parse_retry_after(NULL, 0, DAYS30, &capped), -1);
    ck_assert_int_eq(capped, 0);
    capped = 7;
    ck_assert_int_eq(retry_parse_reset_ms(NULL, DAYS30, &capped), -1);
    ck_assert_int_eq(capped, 0);
}
END_TEST

/* IW_MAX_RATE_PAUSE: every wait from the provider is capped, and the caller
 * learns that the cap applied (it logs it). */
START_TEST(retry_after_capped)
{
    const long hour = 3600000L;
    const long long now_ms = 1700000000LL * 1000;
    int capped = -1;

    /* at the cap: not capped; one second over: capped */
    ck_assert_int_eq(retry_parse_retry_after("3600", now_ms, hour, &capped), hour);
    ck_assert_int_eq(capped, 0);
    ck_assert_int_eq(retry_parse_retry_after("3601", now_ms, hour, &capped), hour);
    ck_assert_int_eq(capped, 1);
    /* values that overflowed a long before: saturated, then capped */
    ck_assert_int_eq(retry_parse_retry_after("99999999999999999999", now_ms, hour, &capped), hour);
    ck_assert_int_eq(capped, 1);
    ck_assert_int_eq(retry_parse_retry_after("9223372036854775807", now_ms, hour, &capped), hour);
    ck_assert_int_eq(capped, 1);
    ck_assert_int_eq(retry_parse_retry_after("9223372036854776", now_ms, hour, &capped), hour);
    ck_assert_int_eq(capped, 1);
    /* the default cap is one hour */
    ck_assert_int_eq(retry_parse_retry_after("86400", now_ms, 0, &capped), hour);
    ck_assert_int_eq(capped, 1);
    ck_assert_int_eq(retry_parse_retry_after("30", now_ms, 0, NULL), 30000);
    /* an HTTP date far ahead (the example) */
    ck_assert_int_eq(
        retry_parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT", now_ms, hour, &capped), hour);
    ck_assert_int_eq(capped, 1);
    ck_assert_int_eq(
        retry_parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now_ms, hour, &capped), hour);
    ck_assert_int_eq(capped, 1);
    /* a date in the past is 0, never negative, never capped */
    ck_assert_int_eq(
        retry_parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now_ms, hour, &capped), 0);
    ck_assert_int_eq(capped, 0);
    /* an absurd "now" does not overflow the difference */
    ck_assert_int_eq(
        retry_parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT", LLONG_MIN, hour, &capped), hour);
    ck_assert_int_eq(
        retry_parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT", LLONG_MAX, hour, &capped), 0);
}
END_TEST

START_TEST(reset_ms_parse)
{
    const long hour = 3600000L;
    const long long epoch_ms = 1700000000123LL;
    char buf[32];
    int capped = -1;

    ck_assert_int_eq(retry_parse_reset_ms("0", hour, &capped), 0);
    ck_assert_int_eq(capped, 0);
    ck_assert_int_eq(retry_parse_reset_ms("1500", hour, &capped), 1500);
    ck_assert_int_eq(retry_parse_reset_ms(" 250\r\n", hour, &capped), 250);
    ck_assert_int_eq(retry_parse_reset_ms("3600000", hour, &capped), hour);
    ck_assert_int_eq(capped, 0);
    ck_assert_int_eq(retry_parse_reset_ms("3600001", hour, &capped), hour);
    ck_assert_int_eq(capped, 1);
    /* an epoch timestamp where a delay was meant: capped, not 53 years */
    snprintf(buf, sizeof buf, "%lld", epoch_ms);
    ck_assert_int_eq(retry_parse_reset_ms(buf, hour, &capped), hour);
    ck_assert_int_eq(capped, 1);
    /* LONG_MAX and beyond: saturated, no undefined behaviour */
    ck_assert_int_eq(retry_parse_reset_ms("9223372036854775807", hour, &capped), hour);
    ck_assert_int_eq(retry_parse_reset_ms("9223372036854775808", hour, &capped), hour);
    ck_assert_int_eq(retry_parse_reset_ms("1234567890123456789012345678901234567890", 0, &capped),
                     hour);
    ck_assert_int_eq(capped, 1);
    /* junk */
    static const char *const junk[] = {"", " ", "-1", "+5", "1.5", "5s", "0x10", "1 2", "abc"};
    for (size_t i = 0; i < sizeof junk / sizeof junk[0]; i++) {
        ck_assert_msg(retry_parse_reset_ms(junk[i], hour, &capped) == -1, "'%s' accepted", junk[i]);
        ck_assert_int_eq(capped, 0);
    }
}
END_TEST

START_TEST(add_ms_saturates)
{
    ck_assert(iw_add_ms(1000, 500) == 1500);
    ck_assert(iw_add_ms(1000, -1500) == -500);
    ck_assert(iw_add_ms(LLONG_MAX - 10, 5) == LLONG_MAX - 5);
    ck_assert(iw_add_ms(LLONG_MAX - 10, 11) == LLONG_MAX);
    ck_assert(iw_add_ms(LLONG_MAX, LLONG_MAX) == LLONG_MAX);
    ck_assert(iw_add_ms(LLONG_MIN + 10, -11) == LLONG_MIN);
    ck_assert(iw_add_ms(LLONG_MIN, LLONG_MIN) == LLONG_MIN);
    ck_assert(iw_add_ms(LLONG_MAX, LLONG_MIN) == -1);
    /* a wall clock plus the largest possible provider wait */
    ck_assert(iw_add_ms(1700000000000LL, LONG_MAX) == LLONG_MAX);
    int capped;
    ck_assert_int_eq(retry_cap_wait(-5, 1000, &capped), 0);
    ck_assert_int_eq(capped, 0);
    ck_assert_int_eq(retry_cap_wait(LLONG_MAX, 1000, &capped), 1000);
    ck_assert_int_eq(capped, 1);
}
END_TEST

/* ---------------------------------------------------------------------------
 * retry_jitter
 * ------------------------------------------------------------------------ */

START_TEST(jitter_no_pct_is_identity)
{
    static const double rnds[] = {0.0, 0.25, 0.5, 0.999};

    for (size_t i = 0; i < sizeof rnds / sizeof rnds[0]; i++) {
        ck_assert_int_eq(retry_jitter(1000, 0, rnds[i]), 1000);
        ck_assert_int_eq(retry_jitter(0, 0, rnds[i]), 0);
        ck_assert_int_eq(retry_jitter(86400000L, 0, rnds[i]), 86400000L);
    }
}
END_TEST

START_TEST(jitter_20_pct_bounds)
{
    /* rnd 0 is the low edge, 0.5 the middle, just below 1 the high edge */
    ck_assert_int_eq(retry_jitter(1000, 20, 0.0), 800);
    ck_assert_int_eq(retry_jitter(1000, 20, 0.5), 1000);
    long hi = retry_jitter(1000, 20, 0.999);
    ck_assert_int_ge(hi, 1195);
    ck_assert_int_le(hi, 1200);

    ck_assert_int_eq(retry_jitter(5000, 20, 0.0), 4000);
    ck_assert_int_eq(retry_jitter(5000, 20, 0.5), 5000);
    hi = retry_jitter(5000, 20, 0.999);
    ck_assert_int_ge(hi, 5990);
    ck_assert_int_le(hi, 6000);
}
END_TEST

START_TEST(jitter_stays_in_range)
{
    static const long bases[] = {0, 1, 7, 250, 1000, 5000, 300000, 86400000L};
    static const long pcts[] = {0, 1, 20, 50, 100};

    for (size_t b = 0; b < sizeof bases / sizeof bases[0]; b++) {
        for (size_t p = 0; p < sizeof pcts / sizeof pcts[0]; p++) {
            long ms = bases[b], pct = pcts[p];
            long lo = ms - ms * pct / 100 - 1, hi = ms + ms * pct / 100;
            long prev = -1;
            for (int i = 0; i < 1000; i++) {
                double rnd = i / 1000.0;
                long v = retry_jitter(ms, pct, rnd);
                ck_assert_msg(v >= 0 && v >= lo && v <= hi, "jitter(%ld, %ld, %f) = %ld", ms, pct,
                              rnd, v);
                ck_assert_msg(v >= prev, "jitter not monotonic in rnd");
                prev = v;
            }
        }
    }
}
END_TEST

static Suite *retry_suite(void)
{
    Suite *s = suite_create("retry");
    TCase *tc;

    tc = tcase_create("classify");
    tcase_add_loop_test(tc, classify_table, 0, sizeof classify_cases / sizeof classify_cases[0]);
    tcase_add_test(tc, classify_every_status);
    suite_add_tcase(s, tc);

    tc = tcase_create("delay");
    tcase_add_test(tc, delay_default_schedule);
    tcase_add_test(tc, delay_empty_and_single);
    suite_add_tcase(s, tc);

    tc = tcase_create("retry_after");
    tcase_add_test(tc, retry_after_seconds);
    tcase_add_test(tc, retry_after_known_date);
    tcase_add_test(tc, retry_after_date_relative_to_now);
    tcase_add_loop_test(tc, retry_after_junk, 0,
                        sizeof junk_retry_after / sizeof junk_retry_after[0]);
    tcase_add_test(tc, retry_after_null);
    tcase_add_test(tc, retry_after_capped);
    tcase_add_test(tc, reset_ms_parse);
    tcase_add_test(tc, add_ms_saturates);
    suite_add_tcase(s, tc);

    tc = tcase_create("jitter");
    tcase_add_test(tc, jitter_no_pct_is_identity);
    tcase_add_test(tc, jitter_20_pct_bounds);
    tcase_add_test(tc, jitter_stays_in_range);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(retry_suite());

    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
