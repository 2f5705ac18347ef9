/* Integration suite of the fleet-wide limiter (common/limiter) against the
 * real Redis on 127.0.0.1:6379, through common/redis_link as the worker uses
 * it.  Every test works under its own key namespace and deletes its keys. */
#include <check.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "iwtest.h"
#include "limiter.h"
#include "iwtest.h"
#include "redis_link.h"

#define REDIS_URL "redis://127.0.0.1:6379/0"

/* ---- helpers ------------------------------------------------------------------ */

/* Namespaces carry the runner's pid: the runner's unchecked teardown finds
 * what a failed test left (Check ends it with _exit()). */
static pid_t runner_pid;
static char ns_buf[128];

static const char *test_ns(const char *name)
{
    snprintf(ns_buf, sizeof ns_buf, "t-lim-%s-%ld", name, (long)runner_pid);
    return ns_buf;
}

static redisContext *raw(void)
{
    static redisContext *c;
    if (!c) {
        c = redisConnect("127.0.0.1", 6379);
        ck_assert_msg(c && !c->err, "cannot connect to Redis on 127.0.0.1:6379");
    }
    return c;
}

static long long redis_int(const char *fmt, const char *arg)
{
    redisReply *r = redisCommand(raw(), fmt, arg);
    ck_assert_ptr_nonnull(r);
    long long v = r->type == REDIS_REPLY_INTEGER  ? r->integer
                  : r->type == REDIS_REPLY_STRING ? atoll(r->str)
                                                  : 0;
    freeReplyObject(r);
    return v;
}

static long long key_int(const char *ns, const char *cmd, const char *suffix)
{
    char key[256], fmt[64];
    snprintf(key, sizeof key, "%s:%s", ns, suffix);
    snprintf(fmt, sizeof fmt, "%s %%s", cmd);
    return redis_int(fmt, key);
}

static void del_keys(const char *ns)
{
    char cursor[32] = "0", pattern[200];
    snprintf(pattern, sizeof pattern, "%s:*", ns);
    do {
        redisReply *r = redisCommand(raw(), "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
        ck_assert_ptr_nonnull(r);
        ck_assert_int_eq(r->type, REDIS_REPLY_ARRAY);
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        for (size_t i = 0; i < r->element[1]->elements; i++)
            freeReplyObject(redisCommand(raw(), "DEL %s", r->element[1]->element[i]->str));
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
}

static void remove_leftovers(void)
{
    char pattern[64];
    snprintf(pattern, sizeof pattern, "t-lim-*-%ld", (long)runner_pid);
    del_keys(pattern);
}

/* Scores (Redis TIME, microseconds) of the permit log, ascending; returns the count. */
static size_t log_scores(const char *ns, long long **out)
{
    char key[256];
    snprintf(key, sizeof key, "%s:limiter:log", ns);
    redisReply *r = redisCommand(raw(), "ZRANGE %s 0 -1 WITHSCORES", key);
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(r->type, REDIS_REPLY_ARRAY);
    size_t n = r->elements / 2;
    *out = calloc(n + 1, sizeof **out);
    for (size_t i = 0; i < n; i++)
        (*out)[i] = atoll(r->element[2 * i + 1]->str);
    freeReplyObject(r);
    return n;
}

/* At most `limit` timestamps in ANY window [t, t + window) of the sorted list. */
static void assert_any_window(const long long *t, size_t n, long limit, long long window,
                              const char *what)
{
    for (size_t i = 0; i + (size_t)limit < n; i++)
        ck_assert_msg(t[i + limit] - t[i] >= window,
                      "%s: %ld + 1 permits within %lld (grants %zu and %zu are %lld apart)", what,
                      limit, window, i, i + (size_t)limit, t[i + limit] - t[i]);
}

typedef struct lim_fixture {
    redis_link *link;
    limiter *lim;
} lim_fixture;

static lim_fixture open_limiter_guard(const char *ns, const char *spec, long guard_ms)
{
    lim_fixture f;
    iw_rate_tier tiers[IW_MAX_TIERS];
    size_t n = 0;
    iw_error err = {0};

    ck_assert_int_eq(parse_rate_limits(spec, tiers, &n, &err), IW_OK);
    f.link = redis_link_new(REDIS_URL, 2000, &err);
    ck_assert_ptr_nonnull(f.link);
    f.lim = limiter_new(f.link, ns, tiers, n, guard_ms);
    ck_assert_ptr_nonnull(f.lim);
    ck_assert_msg(redis_link_ensure(f.link, &err) == IW_OK, "redis: %s", err.msg);
    return f;
}

/* Without a guard: the windows are exactly the configured ones. */
static lim_fixture open_limiter(const char *ns, const char *spec)
{
    return open_limiter_guard(ns, spec, 0);
}

static void close_limiter(lim_fixture *f)
{
    limiter_free(f->lim);
    redis_link_free(f->link);
}

static limiter_result take(lim_fixture *f, const char *cls, int share, int want)
{
    limiter_result r;
    iw_error err = {0};
    memset(&r, 0, sizeof r);
    ck_assert_msg(limiter_take(f->lim, cls, share, want, &r, &err) == IW_OK, "take: %s", err.msg);
    return r;
}

/* The limiter's windows are in Redis's time (TIME, its host's wall clock),
 * the tests' intervals in this process's monotonic clock.  The two run at the
 * same rate (NTP slews both) but the wall clock may be stepped (NTP, the
 * hypervisor after a pause: a 5 ms step once failed these checks in CI).  A
 * reading of the offset between them, taken in one round trip, bounds by how
 * much such a step moved Redis's time against ours between two readings. */
typedef struct clock_reading {
    long long offset_us; /* Redis TIME minus the round trip's midpoint */
    long long rtt_us;
} clock_reading;

static clock_reading redis_clock(void)
{
    long long before = clock_mono_us();
    redisReply *r = redisCommand(raw(), "TIME");
    long long after = clock_mono_us();
    ck_assert_msg(r && r->type == REDIS_REPLY_ARRAY && r->elements == 2, "TIME failed");
    long long redis_us = atoll(r->element[0]->str) * 1000000 + atoll(r->element[1]->str);
    freeReplyObject(r);
    return (clock_reading){redis_us - (before + after) / 2, after - before};
}

/* µs by which Redis's clock may have been stepped against ours since `since`:
 * the change of the offset plus each reading's uncertainty (half its round
 * trip).  0 plus the round trips when nothing stepped. */
static long long redis_clock_moved_us(clock_reading since)
{
    clock_reading now = redis_clock();
    return llabs(now.offset_us - since.offset_us) + (since.rtt_us + now.rtt_us) / 2 + 1;
}

/* A refusal's wait is the window minus the time since the permit that must
 * leave it.  That permit was taken between grant_before and grant_after (µs,
 * around its take) and the refusal between ask_before and ask_after, so the
 * wait lies between these bounds however long each round trip took (the
 * machine is shared; fixed tolerances flake under load).  2 ms for rounding,
 * and what Redis's clock was stepped by since `since`, read before the grant. */
static void assert_wait_within(long wait_ms, long window_ms, long long grant_before,
                               long long grant_after, long long ask_before, long long ask_after,
                               clock_reading since)
{
    long stepped_ms = (long)((redis_clock_moved_us(since) + 999) / 1000);
    long lo = window_ms - (long)((ask_after - grant_before) / 1000) - 2 - stepped_ms;
    long hi = window_ms - (long)((ask_before - grant_after) / 1000) + 2 + stepped_ms;
    ck_assert_msg(wait_ms >= lo && wait_ms <= hi,
                  "wait %ld ms, expected %ld..%ld ms (Redis's clock moved up to %ld ms)", wait_ms,
                  lo, hi, stepped_ms);
}

/* ---- tests ---------------------------------------------------------------------- */

START_TEST(test_grants_then_refuses_with_wait)
{
    const char *ns = test_ns("basic");
    lim_fixture f = open_limiter(ns, "5/1s");
    long long first = 0, first_after = 0;

    del_keys(ns);
    clock_reading clock0 = redis_clock();
    for (int i = 0; i < 5; i++) {
        long long before = clock_mono_us();
        limiter_result r = take(&f, "submit", 1000, 1);
        if (i == 0) {
            first = before;
            first_after = clock_mono_us();
        }
        ck_assert_int_eq(r.granted, 1);
        ck_assert_int_eq(r.wait_ms, 0);
        ck_assert_int_eq(r.paused, 0);
        /* usage is measured before this call: i of 5 used */
        ck_assert_int_eq(r.usage_permille, i * 200);
    }
    ck_assert_int_eq(key_int(ns, "ZCARD", "limiter:log"), 5);

    long long at = clock_mono_us();
    limiter_result r = take(&f, "submit", 1000, 1);
    long long at_after = clock_mono_us();
    ck_assert_int_eq(r.granted, 0);
    ck_assert_int_eq(r.paused, 0);
    ck_assert_int_eq(r.usage_permille, 1000);
    /* the oldest permit (taken at ~first) leaves the window at first + 1 s */
    assert_wait_within(r.wait_ms, 1000, first, first_after, at, at_after, clock0);
    ck_assert_int_eq(key_int(ns, "ZCARD", "limiter:log"), 5); /* a refusal takes nothing */

    /* the wait is enough: after it, a permit is granted again */
    iwt_sleep_ms(r.wait_ms);
    r = take(&f, "submit", 1000, 1);
    ck_assert_int_eq(r.granted, 1);
    /* a grant trims the log to the longest window: at least the oldest permit
     * is gone, and the window holds at most 5 with the new one */
    long long card = key_int(ns, "ZCARD", "limiter:log");
    ck_assert_msg(card >= 1 && card <= 5, "%lld permits logged", card);

    close_limiter(&f);
    del_keys(ns);
}
END_TEST

/* IW_RATE_GUARD lengthens every window: the wait covers the guard too. */
START_TEST(test_guard_lengthens_window)
{
    const char *ns = test_ns("guard");
    /* the 10 s tier keeps the log for the final check */
    lim_fixture f = open_limiter_guard(ns, "3/1s,1000/10s", 200);

    del_keys(ns);
    clock_reading clock0 = redis_clock();
    long long first = clock_mono_us();
    limiter_result r = take(&f, "submit", 1000, 3);
    long long first_after = clock_mono_us();
    ck_assert_int_eq(r.granted, 3);
    long long at = clock_mono_us();
    r = take(&f, "submit", 1000, 1);
    ck_assert_int_eq(r.granted, 0);
    /* a 200 ms guard: the wait covers 1.2 s */
    assert_wait_within(r.wait_ms, 1200, first, first_after, at, clock_mono_us(), clock0);
    /* 1 s later the plain window would be free, the guarded one is not */
    iwt_sleep_ms(1050 - (long)((clock_mono_us() - first) / 1000));
    r = take(&f, "submit", 1000, 1);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_int_gt(r.wait_ms, 100);
    iwt_sleep_ms(r.wait_ms);
    r = take(&f, "submit", 1000, 1);
    ck_assert_int_eq(r.granted, 1);
    long long *t;
    size_t n = log_scores(ns, &t);
    ck_assert_uint_eq(n, 4);
    ck_assert_int_ge(t[3] - t[0], 1200000);
    free(t);
    close_limiter(&f);
    del_keys(ns);
}
END_TEST

START_TEST(test_any_window_single_process)
{
    const char *ns = test_ns("window");
    /* the 10 s tier never binds; it keeps 10 s of log so the whole run can be checked */
    lim_fixture f = open_limiter(ns, "20/1s,1000000/10s");
    long long local_before[400], local_after[400];
    size_t nlocal = 0;
    long long end = clock_mono_ms() + 3000;

    del_keys(ns);
    clock_reading clock0 = redis_clock();
    while (clock_mono_ms() < end) {
        long long before = clock_mono_us();
        limiter_result r = take(&f, "submit", 1000, 1);
        if (r.granted) {
            ck_assert_uint_lt(nlocal, 400);
            local_before[nlocal] = before;
            local_after[nlocal++] = clock_mono_us();
        } else {
            ck_assert_int_gt(r.wait_ms, 0);
            ck_assert_int_le(r.wait_ms, 1000);
            iwt_sleep_ms(1);
        }
    }
    long long *t;
    size_t n = log_scores(ns, &t);
    ck_assert_uint_eq(n, nlocal);
    /* work-conserving: ~20 per second over 3 s (windows starting at 0, 1, 2 s) */
    ck_assert_msg(n >= 58 && n <= 80, "%zu grants in 3 s at 20/1s", n);
    assert_any_window(t, n, 20, 1000000, "Redis TIME");
    /* local clock: grant i happened between local_before[i] and local_after[i],
     * so grants i and i + 20 were at most local_after[i + 20] - local_before[i]
     * apart; that must still be a whole window, less what Redis's clock was
     * stepped by against ours during the run (1 ms more for the clocks' rates) */
    long long stepped = redis_clock_moved_us(clock0);
    for (size_t i = 0; i + 20 < nlocal; i++)
        ck_assert_msg(local_after[i + 20] - local_before[i] >= 1000000 - 1000 - stepped,
                      "local: 21 grants within %lld us (Redis's clock moved up to %lld us)",
                      local_after[i + 20] - local_before[i], stepped);
    free(t);
    close_limiter(&f);
    del_keys(ns);
}
END_TEST

START_TEST(test_multi_tier)
{
    const char *ns = test_ns("tiers");
    lim_fixture f = open_limiter(ns, "5/1s,8/10s");

    del_keys(ns);
    clock_reading clock0 = redis_clock();
    long long t0 = clock_mono_us();
    limiter_result r = take(&f, "submit", 1000, 5);
    long long t0_after = clock_mono_us();
    ck_assert_int_eq(r.granted, 5);
    r = take(&f, "submit", 1000, 1);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_msg(r.wait_ms > 900 && r.wait_ms <= 1000, "1 s tier wait %ld", r.wait_ms);
    iwt_sleep_ms(r.wait_ms);

    /* the 1 s tier has room for 5 again, the 10 s tier only for 3 more */
    long long t1 = clock_mono_us();
    r = take(&f, "submit", 1000, 5);
    ck_assert_int_eq(r.granted, 3);
    assert_wait_within(r.wait_ms, 10000, t0, t0_after, t1, clock_mono_us(), clock0);
    ck_assert_int_eq(r.usage_permille, 625); /* 5 of 8 in the 10 s tier before this call */
    r = take(&f, "submit", 1000, 1);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_int_gt(r.wait_ms, 8000);
    ck_assert_int_eq(key_int(ns, "ZCARD", "limiter:log"), 8);
    close_limiter(&f);
    del_keys(ns);
}
END_TEST

START_TEST(test_partial_grants)
{
    const char *ns = test_ns("partial");
    lim_fixture f = open_limiter(ns, "5/1s");
    limiter_result r;
    iw_error err = {0};

    del_keys(ns);
    r = take(&f, "submit", 1000, 3);
    ck_assert_int_eq(r.granted, 3);
    ck_assert_int_eq(r.wait_ms, 0);
    r = take(&f, "submit", 1000, 3);
    ck_assert_int_eq(r.granted, 2);
    ck_assert_msg(r.wait_ms > 950 && r.wait_ms <= 1000, "wait %ld", r.wait_ms);
    r = take(&f, "submit", 1000, 1);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_int_eq(key_int(ns, "ZCARD", "limiter:log"), 5);
    /* members are distinct even when granted in one call at one Redis TIME,
     * without a shared counter (issue 8 item 11: N:limiter:seq is gone) */
    ck_assert_int_eq(key_int(ns, "EXISTS", "limiter:seq"), 0);

    /* bad requests are refused before touching Redis */
    ck_assert_int_eq(limiter_take(f.lim, "submit", 1000, 0, &r, &err), IW_ERR_INVALID);
    ck_assert_int_eq(limiter_take(f.lim, "submit", 1000, 1001, &r, &err), IW_ERR_INVALID);
    close_limiter(&f);
    del_keys(ns);
}
END_TEST

START_TEST(test_pause)
{
    const char *ns = test_ns("pause");
    lim_fixture f = open_limiter(ns, "100/1s");
    iw_error err = {0};
    limiter_result r;

    del_keys(ns);
    ck_assert_int_eq(limiter_pause(f.lim, 500, &err), IW_OK);
    r = take(&f, "submit", 1000, 1);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_int_eq(r.paused, 1);
    ck_assert_msg(r.wait_ms > 400 && r.wait_ms <= 500, "paused wait %ld", r.wait_ms);
    ck_assert_int_eq(key_int(ns, "EXISTS", "limiter:log"), 0); /* nothing taken */

    /* a shorter pause never shortens a longer one */
    ck_assert_int_eq(limiter_pause(f.lim, 50, &err), IW_OK);
    long long pttl = key_int(ns, "PTTL", "limiter:pause");
    ck_assert_msg(pttl > 350 && pttl <= 500, "pause PTTL %lld after a shorter pause", pttl);
    /* a longer one extends it */
    ck_assert_int_eq(limiter_pause(f.lim, 800, &err), IW_OK);
    pttl = key_int(ns, "PTTL", "limiter:pause");
    ck_assert_msg(pttl > 700 && pttl <= 800, "pause PTTL %lld after a longer pause", pttl);
    r = take(&f, "submit", 1000, 1);
    ck_assert_int_eq(r.paused, 1);
    ck_assert_msg(r.wait_ms > 600 && r.wait_ms <= 800, "paused wait %ld", r.wait_ms);

    /* permits resume when the pause ends */
    iwt_sleep_ms(r.wait_ms + 5);
    r = take(&f, "submit", 1000, 2);
    ck_assert_int_eq(r.granted, 2);
    ck_assert_int_eq(r.paused, 0);
    close_limiter(&f);
    del_keys(ns);
}
END_TEST

START_TEST(test_record_keys)
{
    const char *ns = test_ns("records");
    lim_fixture f = open_limiter(ns, "2/1s");
    char k[4][200];
    const char *keys[4];
    limiter_result r;
    iw_error err = {0};
    size_t len = 0;

    del_keys(ns);
    for (int i = 0; i < 4; i++) {
        snprintf(k[i], sizeof k[i], "%s:job:j%d", ns, i);
        keys[i] = k[i];
    }
    freeReplyObject(redisCommand(raw(), "SET %s %s", k[0], "{\"jobId\":\"j0\"}"));
    freeReplyObject(redisCommand(raw(), "SET %s %s", k[2], "{\"jobId\":\"j2\"}"));

    /* want is ignored: one permit per missing record (j1, j3) */
    ck_assert_int_eq(limiter_append_take(f.lim, "submit", 1000, 1, 4, keys, &err), IW_OK);
    ck_assert_int_eq(limiter_read_take(f.lim, &r, &err), IW_OK);
    ck_assert_int_eq(r.granted, 2);
    ck_assert_uint_eq(r.n_records, 4);
    const char *rec = limiter_record(&r, 0, &len);
    ck_assert_ptr_nonnull(rec);
    ck_assert_uint_eq(len, strlen("{\"jobId\":\"j0\"}"));
    ck_assert_int_eq(memcmp(rec, "{\"jobId\":\"j0\"}", len), 0);
    ck_assert_ptr_null(limiter_record(&r, 1, NULL));
    ck_assert_ptr_nonnull(limiter_record(&r, 2, NULL));
    ck_assert_ptr_null(limiter_record(&r, 3, NULL));
    ck_assert_ptr_null(limiter_record(&r, 4, NULL));
    limiter_result_release(&r);
    ck_assert_int_eq(key_int(ns, "ZCARD", "limiter:log"), 2);

    /* the limit is used up: existing records still come back, and cost nothing */
    ck_assert_int_eq(limiter_append_take(f.lim, "submit", 1000, 1, 1, keys, &err), IW_OK);
    ck_assert_int_eq(limiter_read_take(f.lim, &r, &err), IW_OK);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_int_eq(r.wait_ms, 0);
    ck_assert_ptr_nonnull(limiter_record(&r, 0, NULL));
    limiter_result_release(&r);
    ck_assert_int_eq(key_int(ns, "ZCARD", "limiter:log"), 2);

    /* a missing record with the limit used up: refused with a wait */
    ck_assert_int_eq(limiter_append_take(f.lim, "submit", 1000, 1, 2, keys, &err), IW_OK);
    ck_assert_int_eq(limiter_read_take(f.lim, &r, &err), IW_OK);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_int_gt(r.wait_ms, 0);
    ck_assert_ptr_nonnull(limiter_record(&r, 0, NULL));
    ck_assert_ptr_null(limiter_record(&r, 1, NULL));
    limiter_result_release(&r);

    /* existing records are returned even during a 429 pause */
    ck_assert_int_eq(limiter_pause(f.lim, 1000, &err), IW_OK);
    ck_assert_int_eq(limiter_append_take(f.lim, "submit", 1000, 1, 1, keys + 2, &err), IW_OK);
    ck_assert_int_eq(limiter_read_take(f.lim, &r, &err), IW_OK);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_ptr_nonnull(limiter_record(&r, 0, NULL));
    limiter_result_release(&r);

    /* pipelined: two takes appended, then both read */
    const char *pk[LIMITER_MAX_RECORDS + 1];
    for (int i = 0; i <= LIMITER_MAX_RECORDS; i++)
        pk[i] = k[0];
    ck_assert_int_eq(
        limiter_append_take(f.lim, "submit", 1000, 1, LIMITER_MAX_RECORDS + 1, pk, &err),
        IW_ERR_INVALID);
    ck_assert_int_eq(limiter_append_take(f.lim, "submit", 1000, 1, 1, keys, &err), IW_OK);
    ck_assert_int_eq(limiter_append_take(f.lim, "submit", 1000, 1, 1, keys + 2, &err), IW_OK);
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(limiter_read_take(f.lim, &r, &err), IW_OK);
        ck_assert_ptr_nonnull(limiter_record(&r, 0, NULL));
        limiter_result_release(&r);
    }
    close_limiter(&f);
    del_keys(ns);
}
END_TEST

START_TEST(test_class_share)
{
    char ns1[128], ns2[128];
    snprintf(ns1, sizeof ns1, "%s", test_ns("share-alone"));
    snprintf(ns2, sizeof ns2, "%s", test_ns("share-contended"));
    lim_fixture a = open_limiter(ns1, "10/1s");
    lim_fixture b = open_limiter(ns2, "10/1s");
    limiter_result r;

    del_keys(ns1);
    del_keys(ns2);
    /* alone, a class capped at 50% may use the whole tier (work-conserving) */
    r = take(&a, "submit", 500, 10);
    ck_assert_int_eq(r.granted, 10);

    /* contended: status fills the tier, then waits (shows demand) */
    r = take(&b, "status", 1000, 10);
    ck_assert_int_eq(r.granted, 10);
    r = take(&b, "status", 500, 1);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_int_eq(key_int(ns2, "EXISTS", "limiter:demand:status"), 1);
    iwt_sleep_ms(r.wait_ms + 5);

    /* the window is free again; with status waiting, submit gets its 50% only */
    r = take(&b, "submit", 500, 10);
    ck_assert_int_eq(r.granted, 5);
    ck_assert_int_gt(r.wait_ms, 900);
    /* the cap binds although the tier itself has room */
    r = take(&b, "submit", 500, 1);
    ck_assert_int_eq(r.granted, 0);
    /* and the waiting class gets the rest (submit now shows demand too) */
    r = take(&b, "status", 500, 10);
    ck_assert_int_eq(r.granted, 5);
    /* a class without a cap (critical) is still bounded by the tier */
    r = take(&b, "submit", 1000, 1);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_int_eq(key_int(ns2, "ZCARD", "limiter:log"), 10); /* the first 10 left the window */
    ck_assert_int_eq(key_int(ns2, "ZCARD", "limiter:log:submit"), 5);
    ck_assert_int_eq(key_int(ns2, "ZCARD", "limiter:log:status"), 5);

    close_limiter(&a);
    close_limiter(&b);
    del_keys(ns1);
    del_keys(ns2);
}
END_TEST

/* Several "pods": processes with their own connection and limiter. */
START_TEST(test_two_pods_share_one_limit)
{
    const char *ns = test_ns("pods");
    enum { PODS = 3 };
    int fds[2];
    pid_t pids[PODS];
    long total = 0;

    del_keys(ns);
    ck_assert_int_eq(pipe(fds), 0);
    for (int p = 0; p < PODS; p++) {
        pids[p] = fork();
        ck_assert_int_ge(pids[p], 0);
        if (pids[p] == 0) {
            lim_fixture f = open_limiter(ns, "10/1s,1000000/10s");
            long granted = 0;
            long long end = clock_mono_ms() + 2500;
            close(fds[0]);
            while (clock_mono_ms() < end) {
                limiter_result r = take(&f, p == 1 ? "status" : "submit", 1000, 1 + p % 2);
                granted += r.granted;
                if (r.granted == 0)
                    iwt_sleep_ms(r.wait_ms > 2 ? 2 : 1);
            }
            ck_assert_int_eq(write(fds[1], &granted, sizeof granted), (int)sizeof granted);
            close_limiter(&f);
            _exit(0);
        }
    }
    close(fds[1]);
    for (int p = 0; p < PODS; p++) {
        long g = 0;
        int status;
        ck_assert_int_eq(read(fds[0], &g, sizeof g), (int)sizeof g);
        total += g;
        ck_assert_int_eq(waitpid(pids[p], &status, 0), pids[p]);
        ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    close(fds[0]);
    long long *t;
    size_t n = log_scores(ns, &t);
    ck_assert_uint_eq(n, (size_t)total);
    /* 2.5 s at 10/1s: the windows starting at 0, 1 and 2 s */
    ck_assert_msg(n >= 28 && n <= 30, "%zu permits in 2.5 s at 10/1s", n);
    assert_any_window(t, n, 10, 1000000, "three pods");
    free(t);
    del_keys(ns);
}
END_TEST

/* ---- the ask API: throttle, claims, records, clock step, pause cap ---------------- */

static int key_gone(void *key)
{
    return iwt_redis_int("EXISTS %s", (const char *)key) == 0;
}

static limiter_result ask(lim_fixture *f, const limiter_ask *a)
{
    limiter_result r;
    iw_error err = {0};
    ck_assert_msg(limiter_append_ask(f->lim, a, &err) == IW_OK, "append: %s", err.msg);
    ck_assert_msg(limiter_read_ask(f->lim, &r, &err) == IW_OK, "read: %s", err.msg);
    return r;
}

static int count_verdicts(const limiter_result *r, limiter_verdict v)
{
    int n = 0;
    for (size_t i = 0; i < r->n_items; i++)
        n += limiter_item_verdict(r, i) == v;
    return n;
}

static void set_alert(lim_fixture *f, int pct)
{
    limiter_policy p = limiter_policy_default();
    p.alert_pct = pct;
    limiter_set_policy(f->lim, &p);
}

/* IW_RATE_ALERT: normal calls stop at 80% of a tier, critical ones get the rest. */
START_TEST(test_throttle_keeps_top_for_critical)
{
    const char *ns = test_ns("throttle");
    lim_fixture f = open_limiter(ns, "10/2s,1000/1min");
    limiter_ask normal = {"submit", 0, 10, NULL, NULL, NULL, 0};
    limiter_ask critical = {"submit", 1, 5, NULL, NULL, NULL, 0};

    del_keys(ns);
    set_alert(&f, 80);
    limiter_result r = ask(&f, &normal);
    ck_assert_int_eq(r.granted, 8);
    ck_assert_int_eq(count_verdicts(&r, LIMITER_GRANTED), 8);
    ck_assert_int_eq(count_verdicts(&r, LIMITER_REFUSED), 2);
    /* the first 8 items in order */
    for (size_t i = 0; i < 10; i++)
        ck_assert_int_eq(limiter_item_verdict(&r, i), i < 8 ? LIMITER_GRANTED : LIMITER_REFUSED);
    ck_assert_int_eq(r.wait_reason, LIMITER_WAIT_THROTTLE);
    ck_assert_msg(r.wait_ms > 1900 && r.wait_ms <= 2000, "throttle wait %ld", r.wait_ms);
    ck_assert_int_eq(r.above_alert, 1);
    ck_assert_uint_eq(r.n_tiers, 2);
    ck_assert_int_eq(r.tier_permille[0], 800);
    ck_assert_int_eq(r.tier_permille[1], 8); /* 8 of 1000 */
    limiter_result_release(&r);

    /* another normal one: still held back, the tier has room */
    normal.n = 1;
    r = ask(&f, &normal);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_int_eq(r.wait_reason, LIMITER_WAIT_THROTTLE);
    limiter_result_release(&r);

    /* critical ones get the remaining 20%, then the tier itself binds */
    r = ask(&f, &critical);
    ck_assert_int_eq(r.granted, 2);
    ck_assert_int_eq(r.wait_reason, LIMITER_WAIT_RATE);
    ck_assert_int_eq(r.tier_permille[0], 1000);
    limiter_result_release(&r);
    ck_assert_int_eq(key_int(ns, "ZCARD", "limiter:log"), 10);

    /* below the threshold everything flows: a fresh namespace at 70% */
    close_limiter(&f);
    del_keys(ns);
    f = open_limiter(ns, "10/2s");
    set_alert(&f, 80);
    normal.n = 7;
    r = ask(&f, &normal);
    ck_assert_int_eq(r.granted, 7);
    ck_assert_int_eq(r.above_alert, 0);
    ck_assert_int_eq(r.wait_reason, LIMITER_WAIT_NONE);
    limiter_result_release(&r);
    close_limiter(&f);
    del_keys(ns);
}
END_TEST

/* The class shares divide what normal calls may use (IW_RATE_ALERT of the
 * tier), not the whole tier: with the defaults (alert 80, submit 80%, status
 * 50%) a submitter capped at 80% of the tier would take all of the normal
 * room, and status checks waiting beside it would never get a permit. */
START_TEST(test_shares_divide_the_normal_room)
{
    const char *ns = test_ns("share-room");
    lim_fixture f = open_limiter(ns, "10/1s");
    limiter_ask submit = {"submit", 0, 10, NULL, NULL, NULL, 0};
    limiter_ask status = {"status", 0, 10, NULL, NULL, NULL, 0};

    del_keys(ns);
    limiter_policy p = limiter_policy_default();
    p.alert_pct = 80;
    limiter_set_policy(f.lim, &p); /* shares 800/500/500 */
    /* submissions alone use all of the normal room (work-conserving) */
    limiter_result r = ask(&f, &submit);
    ck_assert_int_eq(r.granted, 8);
    limiter_result_release(&r);
    /* status checks find it taken and show demand */
    r = ask(&f, &status);
    ck_assert_int_eq(r.granted, 0);
    long wait = r.wait_ms;
    limiter_result_release(&r);
    ck_assert_int_eq(key_int(ns, "EXISTS", "limiter:demand:status"), 1);
    iwt_sleep_ms(wait + 5);

    /* the window is free: submissions ask first, and get 80% of the 8 */
    r = ask(&f, &submit);
    ck_assert_int_eq(r.granted, 6);
    limiter_result_release(&r);
    /* the status checks get the rest of the normal room, within their 50% */
    r = ask(&f, &status);
    ck_assert_int_eq(r.granted, 2);
    limiter_result_release(&r);
    /* the top 20% is still kept for critical calls */
    limiter_ask crit = {"submit", 1, 5, NULL, NULL, NULL, 0};
    r = ask(&f, &crit);
    ck_assert_int_eq(r.granted, 2);
    limiter_result_release(&r);
    close_limiter(&f);
    del_keys(ns);
}
END_TEST

/* Records and claims answer without a permit; a granted item takes its claim;
 * a claim ends with its lease. */
START_TEST(test_claims_and_records)
{
    const char *ns = test_ns("claims");
    lim_fixture f = open_limiter(ns, "100/10s");
    char rk[4][200], ck[4][200];
    const char *rkeys[4], *ckeys[4];
    iw_error err = {0};

    del_keys(ns);
    for (int i = 0; i < 4; i++) {
        snprintf(rk[i], sizeof rk[i], "%s:job:j%d", ns, i);
        snprintf(ck[i], sizeof ck[i], "%s:claim:j%d", ns, i);
        rkeys[i] = rk[i];
        ckeys[i] = ck[i];
    }
    freeReplyObject(redisCommand(raw(), "SET %s %s", rk[0], "{\"recorded\":true}"));
    freeReplyObject(redisCommand(raw(), "SET %s %s PX 5000", ck[1], "other-attempt"));

    limiter_ask a = {"submit", 0, 4, rkeys, ckeys, "attempt-A", 400};
    limiter_result r = ask(&f, &a);
    ck_assert_uint_eq(r.n_items, 4);
    ck_assert_int_eq(limiter_item_verdict(&r, 0), LIMITER_RECORDED);
    size_t len = 0;
    const char *rec = limiter_record(&r, 0, &len);
    ck_assert_ptr_nonnull(rec);
    ck_assert_int_eq(len, strlen("{\"recorded\":true}"));
    ck_assert_int_eq(memcmp(rec, "{\"recorded\":true}", len), 0);
    ck_assert_int_eq(limiter_item_verdict(&r, 1), LIMITER_CLAIMED);
    long ttl = limiter_claim_ttl(&r, 1);
    ck_assert_msg(ttl > 4000 && ttl <= 5000, "claim ttl %ld", ttl);
    ck_assert_ptr_null(limiter_record(&r, 1, NULL));
    ck_assert_int_eq(limiter_item_verdict(&r, 2), LIMITER_GRANTED);
    ck_assert_int_eq(limiter_item_verdict(&r, 3), LIMITER_GRANTED);
    ck_assert_int_eq(limiter_claim_ttl(&r, 2), -1);
    ck_assert_int_eq(r.granted, 2);
    ck_assert_int_eq(r.wait_ms, 0);
    limiter_result_release(&r);
    /* only the two granted items took permits, and their claims */
    ck_assert_int_eq(key_int(ns, "ZCARD", "limiter:log"), 2);
    char *v = iwt_redis_str("GET %s", ck[2]);
    ck_assert_str_eq(v, "attempt-A");
    free(v);
    long long pttl = iwt_redis_int("PTTL %s", ck[3]);
    ck_assert_msg(pttl > 300 && pttl <= 400, "claim PTTL %lld", pttl);
    ck_assert_int_eq(iwt_redis_int("EXISTS %s", ck[0]), 0); /* a record takes no claim */

    /* another attempt of the same jobs finds the claims held */
    limiter_ask b = {"submit", 0, 2, rkeys + 2, ckeys + 2, "attempt-B", 400};
    r = ask(&f, &b);
    ck_assert_int_eq(limiter_item_verdict(&r, 0), LIMITER_CLAIMED);
    ck_assert_int_eq(limiter_item_verdict(&r, 1), LIMITER_CLAIMED);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_int_eq(r.wait_reason, LIMITER_WAIT_NONE);
    limiter_result_release(&r);
    ck_assert_int_eq(key_int(ns, "ZCARD", "limiter:log"), 2);

    /* a record written meanwhile wins over the claim */
    freeReplyObject(redisCommand(raw(), "SET %s %s", rk[2], "{\"id\":2}"));
    r = ask(&f, &b);
    ck_assert_int_eq(limiter_item_verdict(&r, 0), LIMITER_RECORDED);
    ck_assert_int_eq(limiter_item_verdict(&r, 1), LIMITER_CLAIMED);
    limiter_result_release(&r);

    /* the claim ends with its lease: then attempt B gets the permit */
    ck_assert(iwt_eventually(key_gone, ck[3], 2000));
    r = ask(&f, &b);
    ck_assert_int_eq(limiter_item_verdict(&r, 1), LIMITER_GRANTED);
    limiter_result_release(&r);
    v = iwt_redis_str("GET %s", ck[3]);
    ck_assert_str_eq(v, "attempt-B");
    free(v);

    /* bad asks are refused before touching Redis */
    limiter_ask bad = {"submit", 0, 0, NULL, NULL, NULL, 0};
    ck_assert_int_eq(limiter_append_ask(f.lim, &bad, &err), IW_ERR_INVALID);
    bad.n = LIMITER_MAX_RECORDS + 1;
    ck_assert_int_eq(limiter_append_ask(f.lim, &bad, &err), IW_ERR_INVALID);
    bad.n = 1;
    bad.cls = "upload";
    ck_assert_int_eq(limiter_append_ask(f.lim, &bad, &err), IW_ERR_INVALID);
    bad.cls = "submit";
    bad.claim_keys = ckeys;
    ck_assert_int_eq(limiter_append_ask(f.lim, &bad, &err), IW_ERR_INVALID); /* no token */
    close_limiter(&f);
    del_keys(ns);
}
END_TEST

/* Redis's clock cannot be stepped from a test, but a step back looks to the
 * script exactly like a permit logged in the future: new permits must be
 * scored no earlier than it, so they stay in the window as long as it does. */
START_TEST(test_clock_step_back_scores_forward)
{
    const char *ns = test_ns("clock");
    lim_fixture f = open_limiter(ns, "3/1s,1000/1min");
    char key[256];
    redisReply *t;
    long long now_us, future;

    del_keys(ns);
    t = redisCommand(raw(), "TIME");
    now_us = atoll(t->element[0]->str) * 1000000 + atoll(t->element[1]->str);
    freeReplyObject(t);
    /* as if the clock had been 1.5 s ahead when this permit was taken */
    future = now_us + 1500000;
    snprintf(key, sizeof key, "%s:limiter:log", ns);
    freeReplyObject(redisCommand(raw(), "ZADD %s %lld %s", key, future, "stepped"));

    limiter_result r = take(&f, "submit", 1000, 3);
    ck_assert_int_eq(r.granted, 2);
    long long *sc;
    size_t n = log_scores(ns, &sc);
    ck_assert_uint_eq(n, 3);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(sc[i] >= future, "permit %zu scored %lld before the latest %lld", i, sc[i],
                      future);
    free(sc);
    /* the wait covers the stepped window */
    ck_assert_msg(r.wait_ms > 2300 && r.wait_ms <= 2500, "wait %ld", r.wait_ms);

    /* one real window later, a log scored by "now" would have room again (its
     * two permits would have left the window): the stepped one must not */
    iwt_sleep_ms(1100);
    r = take(&f, "submit", 1000, 1);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_msg(r.wait_ms > 1200 && r.wait_ms <= 1400, "wait %ld", r.wait_ms);
    close_limiter(&f);
    del_keys(ns);
}
END_TEST

/* IW_MAX_RATE_PAUSE caps limiter_pause and heals a pause stored before the cap. */
START_TEST(test_pause_capped)
{
    const char *ns = test_ns("pausecap");
    lim_fixture f = open_limiter(ns, "100/1s");
    limiter_policy p = limiter_policy_default();
    iw_error err = {0};
    char key[256];

    del_keys(ns);
    p.max_pause_ms = 800;
    limiter_set_policy(f.lim, &p);
    ck_assert_int_eq(limiter_pause(f.lim, 3600L * 1000 * 24 * 365 * 80, &err), IW_OK);
    long long pttl = key_int(ns, "PTTL", "limiter:pause");
    ck_assert_msg(pttl > 700 && pttl <= 800, "pause PTTL %lld", pttl);

    /* a pause set by an older worker until 2100 */
    snprintf(key, sizeof key, "%s:limiter:pause", ns);
    freeReplyObject(redisCommand(raw(), "SET %s 1 PX 2300000000000", key));
    limiter_ask a = {"status", 0, 1, NULL, NULL, NULL, 0};
    limiter_result r = ask(&f, &a);
    ck_assert_int_eq(r.granted, 0);
    ck_assert_int_eq(r.wait_reason, LIMITER_WAIT_PAUSE);
    ck_assert_int_eq(r.paused, 1);
    ck_assert_msg(r.wait_ms > 0 && r.wait_ms <= 800, "paused wait %ld", r.wait_ms);
    limiter_result_release(&r);
    pttl = key_int(ns, "PTTL", "limiter:pause");
    ck_assert_msg(pttl > 0 && pttl <= 800, "stored pause PTTL %lld", pttl);
    /* and limiter_pause cuts such a pause too */
    freeReplyObject(redisCommand(raw(), "SET %s 1 PX 2300000000000", key));
    ck_assert_int_eq(limiter_pause(f.lim, 100, &err), IW_OK);
    pttl = key_int(ns, "PTTL", "limiter:pause");
    ck_assert_msg(pttl > 0 && pttl <= 100, "pause PTTL %lld", pttl);
    close_limiter(&f);
    del_keys(ns);
}
END_TEST

static int redis_port_up(void *ud)
{
    redisContext *c = redisConnect("127.0.0.1", *(int *)ud);
    int up = c && !c->err;
    if (up) {
        redisReply *r = redisCommand(c, "PING");
        up = r && r->type == REDIS_REPLY_STATUS;
        freeReplyObject(r);
    }
    redisFree(c);
    return up;
}

/* maxmemory-policy: the shared Redis (noeviction) is safe; a private one with
 * allkeys-lru is not. */
START_TEST(test_check_redis_policy)
{
    const char *ns = test_ns("policy");
    lim_fixture f = open_limiter(ns, "100/1s");
    limiter_redis_info info;
    iw_error err = {0};

    ck_assert_msg(limiter_check_redis(f.lim, &info, &err) == IW_OK, "%s", err.msg);
    redisReply *cfg = redisCommand(raw(), "CONFIG GET maxmemory-policy");
    ck_assert_str_eq(info.policy, cfg->element[1]->str);
    ck_assert_int_eq(info.can_evict, strcmp(cfg->element[1]->str, "noeviction") != 0);
    freeReplyObject(cfg);
    close_limiter(&f);

    int port = 21000 + getpid() % 9000;
    char sport[16], url[64];
    snprintf(sport, sizeof sport, "%d", port);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int fd = open("/dev/null", 1);
        dup2(fd, 1);
        dup2(fd, 2);
        execlp("redis-server", "redis-server", "--port", sport, "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--maxmemory", "10mb", "--maxmemory-policy", "volatile-lru",
               (char *)NULL);
        _exit(127);
    }
    ck_assert_msg(iwt_eventually(redis_port_up, &port, 10000), "private redis on %d", port);
    snprintf(url, sizeof url, "redis://127.0.0.1:%d/0", port);
    redis_link *link = redis_link_new(url, 2000, &err);
    limiter *lim = limiter_new(link, ns, NULL, 0, 0);
    ck_assert_msg(limiter_check_redis(lim, &info, &err) == IW_OK, "%s", err.msg);
    ck_assert_str_eq(info.policy, "volatile-lru");
    ck_assert_int_eq(info.maxmemory, 10 * 1024 * 1024);
    ck_assert_int_eq(info.can_evict, 1);
    limiter_free(lim);
    redis_link_free(link);
    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
}
END_TEST

static Suite *limiter_suite(void)
{
    Suite *s = suite_create("limiter");
    TCase *tc = tcase_create("redis");
    tcase_set_timeout(tc, 30);
    tcase_add_unchecked_fixture(tc, NULL, remove_leftovers);
    tcase_add_test(tc, test_grants_then_refuses_with_wait);
    tcase_add_test(tc, test_guard_lengthens_window);
    tcase_add_test(tc, test_any_window_single_process);
    tcase_add_test(tc, test_multi_tier);
    tcase_add_test(tc, test_partial_grants);
    tcase_add_test(tc, test_pause);
    tcase_add_test(tc, test_record_keys);
    tcase_add_test(tc, test_class_share);
    tcase_add_test(tc, test_two_pods_share_one_limit);
    tcase_add_test(tc, test_throttle_keeps_top_for_critical);
    tcase_add_test(tc, test_shares_divide_the_normal_room);
    tcase_add_test(tc, test_claims_and_records);
    tcase_add_test(tc, test_clock_step_back_scores_forward);
    tcase_add_test(tc, test_pause_capped);
    tcase_add_test(tc, test_check_redis_policy);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    runner_pid = getpid();
    SRunner *sr = srunner_create(limiter_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
