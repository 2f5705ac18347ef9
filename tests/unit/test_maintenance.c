/* Maintenance windows (common/maintenance): parsing, weekly local-time windows
 * across daylight-saving changes (America/New_York) and in a zone without DST
 * (Asia/Tokyo, UTC), midnight crossings, overlapping windows, and TZ left as
 * it was. */
#include <check.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "maintenance.h"

/* Epoch milliseconds of a UTC date-time. */
static long long utc_ms(int y, int mo, int d, int h, int mi, int s)
{
    struct tm tm = {0};
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = s;
    return (long long)timegm(&tm) * 1000;
}

static maintenance *parse_ok(const char *spec)
{
    maintenance *m = NULL;
    iw_error err = {0};
    ck_assert_msg(maintenance_parse(spec, &m, &err) == IW_OK, "'%s' refused: %s", spec, err.msg);
    ck_assert_ptr_nonnull(m);
    return m;
}

/* Asserts the window state at t (and its end when active). */
static void expect_at(const maintenance *m, long long t, int active, long long end)
{
    long long got = -7;
    int a = maintenance_active(m, t, &got);
    ck_assert_msg(a == active, "at %lld: active %d, expected %d", t, a, active);
    if (active)
        ck_assert_msg(got == end, "at %lld: ends at %lld, expected %lld (diff %lld s)", t, got, end,
                      (got - end) / 1000);
    else
        ck_assert_msg(got == -7, "ends_at written while inactive");
}

START_TEST(parse_valid)
{
    static const char *const ok[] = {
        "Sun 02:00-04:00 America/New_York",
        "Sun 02:00-04:00 America/New_York,Sat 23:00-01:00 UTC",
        "  sun 02:00-04:00   UTC  ,  MON 00:00-23:59 Asia/Tokyo ",
        "Fri 22:00-00:00 Etc/GMT+5",
    };
    static const size_t counts[] = {1, 2, 2, 1};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        maintenance *m = parse_ok(ok[i]);
        ck_assert_uint_eq(maintenance_count(m), counts[i]);
        maintenance_free(m);
    }
    /* no windows */
    static const char *const empty[] = {"", "   "};
    for (size_t i = 0; i < 2; i++) {
        maintenance *m = parse_ok(empty[i]);
        ck_assert_uint_eq(maintenance_count(m), 0);
        ck_assert_int_eq(maintenance_active(m, utc_ms(2025, 3, 9, 7, 0, 0), NULL), 0);
        maintenance_free(m);
    }
    maintenance *m = NULL;
    iw_error err = {0};
    ck_assert_int_eq(maintenance_parse(NULL, &m, &err), IW_OK);
    ck_assert_uint_eq(maintenance_count(m), 0);
    maintenance_free(m);
    maintenance_free(NULL);
    ck_assert_int_eq(maintenance_active(NULL, 0, NULL), 0);
}
END_TEST

static const char *const bad_specs[] = {
    "Sun 02:00-04:00",
    "Sunday 02:00-04:00 UTC",
    "Son 02:00-04:00 UTC",
    "Sun 2:00-04:00 UTC",
    "Sun 02:00-4:00 UTC",
    "Sun 24:00-01:00 UTC",
    "Sun 02:60-03:00 UTC",
    "Sun 02:00_04:00 UTC",
    "Sun 02:00-04:00-05:00 UTC",
    "Sun 02:00-02:00 UTC",
    "Sun 02:00-04:00 Mars/Olympus_Mons",
    "Sun 02:00-04:00 ../../../etc/passwd",
    "Sun 02:00-04:00 /usr/share/zoneinfo/UTC",
    "Sun 02:00-04:00 America",
    "Sun 02:00-04:00 America//New_York",
    "Sun 02:00-04:00 UTC extra",
    "Sun 02:00-04:00 UTC,",
    ",Sun 02:00-04:00 UTC",
    "Sun 02:00-04:00 UTC,,Mon 02:00-04:00 UTC",
    "Sun 02:00-04:00 UTC\nX-Injected: 1",
};

START_TEST(parse_invalid)
{
    maintenance *m = (maintenance *)1;
    iw_error err = {0};
    int rc = maintenance_parse(bad_specs[_i], &m, &err);
    ck_assert_msg(rc == IW_ERR_CONFIG, "'%s' accepted", bad_specs[_i]);
    ck_assert_ptr_null(m);
    ck_assert_msg(strstr(err.msg, "window ") == err.msg, "message '%s'", err.msg);
    /* one printable line */
    for (const char *p = err.msg; *p; p++)
        ck_assert_msg(*p >= 0x20 && *p < 0x7f, "control byte in '%s'", err.msg);
}
END_TEST

START_TEST(parse_limits)
{
    char *spec = malloc(33 * 24 + 1);
    maintenance *m = NULL;
    iw_error err = {0};

    spec[0] = '\0';
    for (int i = 0; i < 33; i++)
        strcat(spec, i ? ",Sun 02:00-04:00 UTC" : "Sun 02:00-04:00 UTC");
    ck_assert_int_eq(maintenance_parse(spec, &m, &err), IW_ERR_CONFIG);
    ck_assert_ptr_nonnull(strstr(err.msg, "at most 32"));
    free(spec);
}
END_TEST

/* An ordinary Sunday in winter (EST, UTC-5) and one in summer (EDT, UTC-4). */
START_TEST(new_york_standard_and_daylight)
{
    maintenance *m = parse_ok("Sun 02:00-04:00 America/New_York");

    /* Sun 2 Mar 2025, EST: 07:00Z - 09:00Z */
    expect_at(m, utc_ms(2025, 3, 2, 6, 59, 59) + 999, 0, 0);
    expect_at(m, utc_ms(2025, 3, 2, 7, 0, 0), 1, utc_ms(2025, 3, 2, 9, 0, 0));
    expect_at(m, utc_ms(2025, 3, 2, 8, 59, 59) + 999, 1, utc_ms(2025, 3, 2, 9, 0, 0));
    expect_at(m, utc_ms(2025, 3, 2, 9, 0, 0), 0, 0);
    /* Sun 16 Mar 2025, EDT: 06:00Z - 08:00Z */
    expect_at(m, utc_ms(2025, 3, 16, 5, 59, 59), 0, 0);
    expect_at(m, utc_ms(2025, 3, 16, 6, 0, 0), 1, utc_ms(2025, 3, 16, 8, 0, 0));
    expect_at(m, utc_ms(2025, 3, 16, 8, 0, 0), 0, 0);
    /* other days of the week never */
    expect_at(m, utc_ms(2025, 3, 3, 7, 30, 0), 0, 0);
    expect_at(m, utc_ms(2025, 3, 1, 7, 30, 0), 0, 0);
    maintenance_free(m);
}
END_TEST

/* Sun 9 Mar 2025: at 02:00 EST (07:00Z) clocks jump to 03:00 EDT.  02:00 does
 * not exist: the window starts when the clocks jump past it and ends at
 * 04:00 EDT (08:00Z), one real hour. */
START_TEST(new_york_spring_forward)
{
    maintenance *m = parse_ok("Sun 02:00-04:00 America/New_York");
    expect_at(m, utc_ms(2025, 3, 9, 6, 59, 59), 0, 0); /* 01:59:59 EST */
    expect_at(m, utc_ms(2025, 3, 9, 7, 0, 0), 1, utc_ms(2025, 3, 9, 8, 0, 0));
    expect_at(m, utc_ms(2025, 3, 9, 7, 59, 59), 1, utc_ms(2025, 3, 9, 8, 0, 0));
    expect_at(m, utc_ms(2025, 3, 9, 8, 0, 0), 0, 0); /* 04:00 EDT */
    maintenance_free(m);

    /* a window entirely inside the skipped hour's aftermath: 02:30 -> the jump */
    m = parse_ok("Sun 02:30-03:30 America/New_York");
    expect_at(m, utc_ms(2025, 3, 9, 6, 45, 0), 0, 0);
    expect_at(m, utc_ms(2025, 3, 9, 7, 0, 0), 1, utc_ms(2025, 3, 9, 7, 30, 0));
    expect_at(m, utc_ms(2025, 3, 9, 7, 30, 0), 0, 0);
    maintenance_free(m);
}
END_TEST

/* Sun 2 Nov 2025: at 02:00 EDT (06:00Z) clocks fall back to 01:00 EST; the
 * hour 01:00-02:00 happens twice. */
START_TEST(new_york_fall_back)
{
    maintenance *m = parse_ok("Sun 02:00-04:00 America/New_York");
    /* 02:00 is first shown at 02:00 EST (07:00Z); 04:00 EST is 09:00Z */
    expect_at(m, utc_ms(2025, 11, 2, 5, 30, 0), 0, 0); /* 01:30 EDT */
    expect_at(m, utc_ms(2025, 11, 2, 6, 30, 0), 0, 0); /* 01:30 EST */
    expect_at(m, utc_ms(2025, 11, 2, 7, 0, 0), 1, utc_ms(2025, 11, 2, 9, 0, 0));
    expect_at(m, utc_ms(2025, 11, 2, 9, 0, 0), 0, 0);
    maintenance_free(m);

    /* a start in the repeated hour is its first occurrence (01:30 EDT, 05:30Z);
     * the window runs through the repeat to 03:00 EST (08:00Z): 2.5 real hours */
    m = parse_ok("Sun 01:30-03:00 America/New_York");
    expect_at(m, utc_ms(2025, 11, 2, 5, 29, 59), 0, 0);
    expect_at(m, utc_ms(2025, 11, 2, 5, 30, 0), 1, utc_ms(2025, 11, 2, 8, 0, 0));
    expect_at(m, utc_ms(2025, 11, 2, 6, 15, 0), 1, utc_ms(2025, 11, 2, 8, 0, 0)); /* 01:15 EST */
    expect_at(m, utc_ms(2025, 11, 2, 7, 59, 59), 1, utc_ms(2025, 11, 2, 8, 0, 0));
    expect_at(m, utc_ms(2025, 11, 2, 8, 0, 0), 0, 0);
    maintenance_free(m);

    /* an end in the repeated hour is its first occurrence too: 00:00-01:30
     * ends at 01:30 EDT (05:30Z), not at 01:30 EST */
    m = parse_ok("Sun 00:00-01:30 America/New_York");
    expect_at(m, utc_ms(2025, 11, 2, 4, 0, 0), 1, utc_ms(2025, 11, 2, 5, 30, 0));
    expect_at(m, utc_ms(2025, 11, 2, 5, 30, 0), 0, 0);
    expect_at(m, utc_ms(2025, 11, 2, 6, 10, 0), 0, 0); /* 01:10 EST */
    maintenance_free(m);
}
END_TEST

/* A window crossing midnight across the fall-back night: Sat 23:00 EDT to
 * Sun 03:00 EST is 5 real hours. */
START_TEST(new_york_overnight_across_change)
{
    maintenance *m = parse_ok("Sat 23:00-03:00 America/New_York");
    expect_at(m, utc_ms(2025, 11, 2, 2, 59, 59), 0, 0); /* Sat 22:59:59 EDT */
    expect_at(m, utc_ms(2025, 11, 2, 3, 0, 0), 1, utc_ms(2025, 11, 2, 8, 0, 0));
    expect_at(m, utc_ms(2025, 11, 2, 7, 59, 0), 1, utc_ms(2025, 11, 2, 8, 0, 0));
    expect_at(m, utc_ms(2025, 11, 2, 8, 0, 0), 0, 0);
    maintenance_free(m);
}
END_TEST

/* Asia/Tokyo has no DST: the same UTC hours all year, unaffected by the US
 * changes. */
START_TEST(zone_without_dst)
{
    maintenance *m = parse_ok("Sun 09:00-17:00 Asia/Tokyo");
    /* Sun 9 Mar 2025 (the US change day) and Sun 2 Nov 2025: 00:00Z - 08:00Z */
    expect_at(m, utc_ms(2025, 3, 8, 23, 59, 59), 0, 0);
    expect_at(m, utc_ms(2025, 3, 9, 0, 0, 0), 1, utc_ms(2025, 3, 9, 8, 0, 0));
    expect_at(m, utc_ms(2025, 3, 9, 7, 0, 0), 1, utc_ms(2025, 3, 9, 8, 0, 0));
    expect_at(m, utc_ms(2025, 3, 9, 8, 0, 0), 0, 0);
    expect_at(m, utc_ms(2025, 11, 2, 0, 0, 0), 1, utc_ms(2025, 11, 2, 8, 0, 0));
    expect_at(m, utc_ms(2025, 7, 6, 3, 0, 0), 1, utc_ms(2025, 7, 6, 8, 0, 0));
    maintenance_free(m);
}
END_TEST

START_TEST(utc_across_midnight)
{
    maintenance *m = parse_ok("Sat 23:00-01:00 UTC");
    /* Sat 1 Mar 2025 23:00Z to Sun 2 Mar 01:00Z */
    expect_at(m, utc_ms(2025, 3, 1, 22, 59, 59), 0, 0);
    expect_at(m, utc_ms(2025, 3, 1, 23, 0, 0), 1, utc_ms(2025, 3, 2, 1, 0, 0));
    expect_at(m, utc_ms(2025, 3, 2, 0, 30, 0), 1, utc_ms(2025, 3, 2, 1, 0, 0));
    expect_at(m, utc_ms(2025, 3, 2, 1, 0, 0), 0, 0);
    /* Sunday 23:00 is not a Saturday */
    expect_at(m, utc_ms(2025, 3, 2, 23, 30, 0), 0, 0);
    maintenance_free(m);
}
END_TEST

/* Overlapping and abutting windows: the end carries on to the last one. */
START_TEST(overlapping_windows)
{
    maintenance *m = parse_ok("Sat 23:00-01:00 UTC,Sun 01:00-02:00 UTC,Sun 01:30-03:00 UTC,"
                              "Sun 09:00-10:00 UTC");
    expect_at(m, utc_ms(2025, 3, 1, 23, 30, 0), 1, utc_ms(2025, 3, 2, 3, 0, 0));
    expect_at(m, utc_ms(2025, 3, 2, 1, 0, 0), 1, utc_ms(2025, 3, 2, 3, 0, 0));
    expect_at(m, utc_ms(2025, 3, 2, 2, 30, 0), 1, utc_ms(2025, 3, 2, 3, 0, 0));
    expect_at(m, utc_ms(2025, 3, 2, 3, 0, 0), 0, 0);
    expect_at(m, utc_ms(2025, 3, 2, 9, 0, 0), 1, utc_ms(2025, 3, 2, 10, 0, 0));
    maintenance_free(m);

    /* two zones: 02:00-04:00 New York (EST: 07:00Z-09:00Z) and 08:00-10:00 UTC */
    m = parse_ok("Sun 02:00-04:00 America/New_York,Sun 08:00-10:00 UTC");
    expect_at(m, utc_ms(2025, 3, 2, 7, 30, 0), 1, utc_ms(2025, 3, 2, 10, 0, 0));
    maintenance_free(m);
}
END_TEST

START_TEST(tz_left_unchanged)
{
    maintenance *m = parse_ok("Sun 02:00-04:00 America/New_York,Sat 23:00-01:00 UTC");
    time_t t = (time_t)(utc_ms(2025, 7, 1, 12, 0, 0) / 1000);
    struct tm lt;

    setenv("TZ", "Europe/Paris", 1);
    tzset();
    maintenance_active(m, utc_ms(2025, 3, 2, 7, 30, 0), NULL);
    ck_assert_str_eq(getenv("TZ"), "Europe/Paris");
    localtime_r(&t, &lt);
    ck_assert_int_eq(lt.tm_hour, 14); /* CEST */

    unsetenv("TZ");
    tzset();
    maintenance_active(m, utc_ms(2025, 3, 2, 7, 30, 0), NULL);
    ck_assert_ptr_null(getenv("TZ"));
    maintenance_free(m);
}
END_TEST

/* Every minute of a DST week in New York: the active minutes are exactly the
 * ones whose local wall time is inside the window, except in the skipped and
 * repeated hours, whose rule the tests above pin down. */
START_TEST(sweep_matches_local_time)
{
    maintenance *m = parse_ok("Sun 02:00-04:00 America/New_York,Wed 22:30-01:15 America/New_York");
    long long from = utc_ms(2025, 10, 30, 0, 0, 0), to = utc_ms(2025, 11, 6, 0, 0, 0);

    for (long long t = from; t < to; t += 60000) {
        int active = maintenance_active(m, t, NULL);
        char *old = getenv("TZ") ? strdup(getenv("TZ")) : NULL;
        setenv("TZ", ":America/New_York", 1);
        tzset();
        time_t s = (time_t)(t / 1000);
        struct tm lt;
        localtime_r(&s, &lt);
        if (old)
            setenv("TZ", old, 1);
        else
            unsetenv("TZ");
        tzset();
        free(old);
        int min = lt.tm_hour * 60 + lt.tm_min;
        int expect = (lt.tm_wday == 0 && min >= 120 && min < 240) ||
                     (lt.tm_wday == 3 && min >= 22 * 60 + 30) || (lt.tm_wday == 4 && min < 75);
        ck_assert_msg(active == expect, "at %lld (local wday %d %02d:%02d): %d", t, lt.tm_wday,
                      lt.tm_hour, lt.tm_min, active);
    }
    maintenance_free(m);
}
END_TEST

/* The cached answers of one long-lived set agree with a fresh set's at
 * times that jump back and forth (a wall clock may step either way). */
START_TEST(cache_agrees_with_fresh)
{
    const char *spec = "Sun 02:00-04:00 America/New_York,Sat 23:00-01:00 UTC,"
                       "Sun 00:30-02:30 UTC,Wed 09:00-17:00 Asia/Tokyo";
    maintenance *kept = parse_ok(spec);
    long long from = utc_ms(2025, 10, 28, 0, 0, 0), span = 12LL * 86400000;
    unsigned long long x = 88172645463325252ULL;

    for (int i = 0; i < 1500; i++) {
        long long t;
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        if (i % 3 == 2)
            t = from + (long long)(x % (unsigned long long)span); /* a jump */
        else
            t = from + (i / 3) * (span / 500); /* forward in steps */
        maintenance *fresh = parse_ok(spec);
        long long e1 = -1, e2 = -1;
        int a1 = maintenance_active(kept, t, &e1), a2 = maintenance_active(fresh, t, &e2);
        ck_assert_msg(a1 == a2 && e1 == e2, "at %lld: cached %d/%lld, fresh %d/%lld", t, a1, e1, a2,
                      e2);
        maintenance_free(fresh);
    }
    maintenance_free(kept);
}
END_TEST

static Suite *maintenance_suite(void)
{
    Suite *s = suite_create("maintenance");
    TCase *tc = tcase_create("parse");
    tcase_add_test(tc, parse_valid);
    tcase_add_loop_test(tc, parse_invalid, 0, sizeof bad_specs / sizeof bad_specs[0]);
    tcase_add_test(tc, parse_limits);
    suite_add_tcase(s, tc);

    tc = tcase_create("active");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, new_york_standard_and_daylight);
    tcase_add_test(tc, new_york_spring_forward);
    tcase_add_test(tc, new_york_fall_back);
    tcase_add_test(tc, new_york_overnight_across_change);
    tcase_add_test(tc, zone_without_dst);
    tcase_add_test(tc, utc_across_midnight);
    tcase_add_test(tc, overlapping_windows);
    tcase_add_test(tc, tz_left_unchanged);
    tcase_add_test(tc, sweep_matches_local_time);
    tcase_add_test(tc, cache_agrees_with_fresh);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(maintenance_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
