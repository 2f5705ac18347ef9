/* The fleet's circuit breaker (common/limiter: limiter_append_ask's breaker
 * check and limiter_append_outcomes) against the real Redis on 127.0.0.1:6379.
 * Several limiter instances, each with its own connection, stand for pods;
 * one test forks processes.  Every test works under its own namespace and
 * deletes its keys. */
#include <check.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.h"
#include "iwtest.h"
#include "limiter.h"
#include "redis_link.h"
#include "retry.h"

#define REDIS_URL "redis://127.0.0.1:6379/0"
#define OPEN_MS 500

static pid_t runner_pid;
static char ns_buf[128];

static const char *test_ns(const char *name)
{
    snprintf(ns_buf, sizeof ns_buf, "t-brk-%s-%ld", name, (long)runner_pid);
    return ns_buf;
}

static void del_keys(const char *ns)
{
    char pattern[200], cursor[32] = "0";
    redisContext *c = redisConnect("127.0.0.1", 6379);
    ck_assert_msg(c && !c->err, "cannot connect to Redis");
    snprintf(pattern, sizeof pattern, "%s:*", ns);
    do {
        redisReply *r = redisCommand(c, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
        ck_assert_ptr_nonnull(r);
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        for (size_t i = 0; i < r->element[1]->elements; i++)
            freeReplyObject(redisCommand(c, "DEL %s", r->element[1]->element[i]->str));
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
    redisFree(c);
}

static void remove_leftovers(void)
{
    char pattern[64];
    snprintf(pattern, sizeof pattern, "t-brk-*-%ld", (long)runner_pid);
    del_keys(pattern);
}

typedef struct pod {
    redis_link *link;
    limiter *lim;
} pod;

static pod pod_open(const char *ns)
{
    pod p;
    iw_rate_tier tiers[IW_MAX_TIERS];
    size_t n = 0;
    iw_error err = {0};
    limiter_policy pol = limiter_policy_default();

    ck_assert_int_eq(parse_rate_limits("1000/1s", tiers, &n, &err), IW_OK);
    p.link = redis_link_new(REDIS_URL, 2000, &err);
    ck_assert_ptr_nonnull(p.link);
    p.lim = limiter_new(p.link, ns, tiers, n, 0);
    ck_assert_ptr_nonnull(p.lim);
    pol.breaker_failures = 5;
    pol.breaker_open_ms = OPEN_MS;
    pol.probe_lease_ms = 10000;
    limiter_set_policy(p.lim, &pol);
    ck_assert_msg(redis_link_ensure(p.link, &err) == IW_OK, "redis: %s", err.msg);
    return p;
}

static void pod_close(pod *p)
{
    limiter_free(p->lim);
    redis_link_free(p->link);
}

static breaker_report outcomes(pod *p, const char *seq, int probe)
{
    breaker_report b;
    iw_error err = {0};
    ck_assert_msg(limiter_append_outcomes(p->lim, seq, probe, &err) == IW_OK, "%s", err.msg);
    ck_assert_msg(limiter_read_outcomes(p->lim, &b, &err) == IW_OK, "%s", err.msg);
    ck_assert_int_eq(b.state, b.to);
    return b;
}

/* An ask of n items (no records, no claims); the lease is the probe's. */
static limiter_result ask_n(pod *p, size_t n, const char *token, long lease_ms)
{
    limiter_ask a = {"submit", 0, n, NULL, NULL, token, lease_ms};
    limiter_result r;
    iw_error err = {0};
    ck_assert_msg(limiter_append_ask(p->lim, &a, &err) == IW_OK, "%s", err.msg);
    ck_assert_msg(limiter_read_ask(p->lim, &r, &err) == IW_OK, "%s", err.msg);
    return r;
}

static int granted_items(const limiter_result *r)
{
    int g = 0;
    for (size_t i = 0; i < r->n_items; i++)
        g += limiter_item_verdict(r, i) == LIMITER_GRANTED;
    return g;
}

static char open_key[256], probe_key[256];

static int key_gone(void *key)
{
    return iwt_redis_int("EXISTS %s", (const char *)key) == 0;
}

static void keys_of(const char *ns)
{
    snprintf(open_key, sizeof open_key, "%s:breaker:open", ns);
    snprintf(probe_key, sizeof probe_key, "%s:breaker:probe", ns);
}

static void open_breaker(pod *p)
{
    breaker_report b = outcomes(p, "FFFFF", -1);
    ck_assert_int_eq(b.transitions, 1);
    ck_assert_int_eq(b.to, LIMITER_BREAKER_OPEN);
}

/* The letter the engine reports for an answer: 'F' for a breaker failure. */
static char letter(long status, iw_transport tr)
{
    iw_http_result h = {status, tr, -1, 0, 0};
    return retry_classify(&h).breaker_failure ? 'F' : 'S';
}

/* ---- tests ---------------------------------------------------------------------- */

START_TEST(test_opens_after_exactly_five)
{
    const char *ns = test_ns("five");
    pod a = pod_open(ns), b = pod_open(ns);
    breaker_report r;

    del_keys(ns);
    keys_of(ns);
    r = outcomes(&a, "FFFF", -1);
    ck_assert_int_eq(r.transitions, 0);
    ck_assert_int_eq(r.state, LIMITER_BREAKER_CLOSED);
    ck_assert_int_eq(r.failures, 4);
    /* a success in between resets the count: failures must be consecutive */
    r = outcomes(&b, "SFFFF", -1);
    ck_assert_int_eq(r.failures, 4);
    ck_assert_int_eq(r.state, LIMITER_BREAKER_CLOSED);
    limiter_result q = ask_n(&a, 2, NULL, 0);
    ck_assert_int_eq(q.granted, 2);
    ck_assert_int_eq(q.breaker_state, LIMITER_BREAKER_CLOSED);
    ck_assert_int_eq(q.breaker_failures, 4);
    limiter_result_release(&q);

    /* the fifth consecutive failure opens it, and only this call says so */
    r = outcomes(&b, "F", -1);
    ck_assert_int_eq(r.transitions, 1);
    ck_assert_int_eq(r.from, LIMITER_BREAKER_CLOSED);
    ck_assert_int_eq(r.to, LIMITER_BREAKER_OPEN);
    ck_assert_int_eq(r.failures, 5);
    r = outcomes(&a, "FS", -1); /* late answers of calls granted before */
    ck_assert_int_eq(r.transitions, 0);
    ck_assert_int_eq(r.state, LIMITER_BREAKER_OPEN);
    ck_assert_int_eq(r.failures, 5);
    long long pttl = iwt_redis_int("PTTL %s", open_key);
    ck_assert_msg(pttl > OPEN_MS - 200 && pttl <= OPEN_MS, "open PTTL %lld", pttl);

    /* no grant while open, in either pod; the wait is the rest of the period */
    for (int i = 0; i < 2; i++) {
        q = ask_n(i ? &b : &a, 3, NULL, 0);
        ck_assert_int_eq(q.granted, 0);
        ck_assert_int_eq(granted_items(&q), 0);
        ck_assert_int_eq(q.wait_reason, LIMITER_WAIT_BREAKER);
        ck_assert_int_eq(q.breaker_state, LIMITER_BREAKER_OPEN);
        ck_assert_msg(q.wait_ms > 0 && q.wait_ms <= OPEN_MS, "wait %ld", q.wait_ms);
        ck_assert_int_eq(q.probe_index, -1);
        limiter_result_release(&q);
    }
    ck_assert_int_eq(iwt_redis_int("ZCARD %s:limiter:log", ns), 2);

    /* work already done is still answered: a record needs no permit */
    char rk[256];
    const char *rkeys[1] = {rk};
    snprintf(rk, sizeof rk, "%s:job:done", ns);
    iwt_redis_int("SET %s %s", rk, "{\"id\":\"x\"}");
    limiter_ask ra = {"submit", 0, 1, rkeys, NULL, NULL, 0};
    iw_error err = {0};
    ck_assert_int_eq(limiter_append_ask(a.lim, &ra, &err), IW_OK);
    ck_assert_int_eq(limiter_read_ask(a.lim, &q, &err), IW_OK);
    ck_assert_int_eq(limiter_item_verdict(&q, 0), LIMITER_RECORDED);
    limiter_result_release(&q);

    pod_close(&a);
    pod_close(&b);
    del_keys(ns);
}
END_TEST

/* A 429 (and any 4xx) is an 'S': it never counts, it resets the count. */
START_TEST(test_429_never_counts)
{
    const char *ns = test_ns("429");
    pod a = pod_open(ns);
    char seq[32];

    del_keys(ns);
    ck_assert_int_eq(letter(429, IW_TRANSPORT_OK), 'S');
    ck_assert_int_eq(letter(400, IW_TRANSPORT_OK), 'S');
    ck_assert_int_eq(letter(404, IW_TRANSPORT_OK), 'S');
    ck_assert_int_eq(letter(201, IW_TRANSPORT_OK), 'S');
    ck_assert_int_eq(letter(500, IW_TRANSPORT_OK), 'F');
    ck_assert_int_eq(letter(503, IW_TRANSPORT_OK), 'F');
    ck_assert_int_eq(letter(0, IW_TRANSPORT_TIMEOUT), 'F');
    ck_assert_int_eq(letter(0, IW_TRANSPORT_CONNECT), 'F');

    /* 4 failures, a 429, 4 failures, a 429 ... never 5 in a row */
    for (int i = 0; i < 4; i++)
        seq[i] = letter(503, IW_TRANSPORT_OK);
    seq[4] = letter(429, IW_TRANSPORT_OK);
    seq[5] = '\0';
    for (int round = 0; round < 3; round++) {
        breaker_report r = outcomes(&a, seq, -1);
        ck_assert_int_eq(r.transitions, 0);
        ck_assert_int_eq(r.state, LIMITER_BREAKER_CLOSED);
        ck_assert_int_eq(r.failures, 0);
    }
    /* many 429s in a row: still closed */
    breaker_report r = outcomes(&a, "SSSSSSSSSSSS", -1);
    ck_assert_int_eq(r.state, LIMITER_BREAKER_CLOSED);
    ck_assert_int_eq(r.failures, 0);

    /* bad outcome input is refused before touching Redis */
    iw_error err = {0};
    ck_assert_int_eq(limiter_append_outcomes(a.lim, "FX", -1, &err), IW_ERR_INVALID);
    ck_assert_int_eq(limiter_append_outcomes(a.lim, "F", 2, &err), IW_ERR_INVALID);
    pod_close(&a);
    del_keys(ns);
}
END_TEST

/* After the open period exactly one item fleet-wide is the probe; its success
 * closes the breaker. */
START_TEST(test_half_open_one_probe_then_close)
{
    const char *ns = test_ns("probe");
    pod a = pod_open(ns), b = pod_open(ns);

    del_keys(ns);
    keys_of(ns);
    open_breaker(&a);
    ck_assert(iwt_eventually(key_gone, open_key, 3000));

    limiter_result q = ask_n(&a, 3, "attempt-a", 0);
    ck_assert_int_eq(q.granted, 1);
    ck_assert_int_eq(q.probe_index, 0);
    ck_assert_int_eq(limiter_item_verdict(&q, 0), LIMITER_GRANTED);
    ck_assert_int_eq(limiter_item_verdict(&q, 1), LIMITER_REFUSED);
    ck_assert_int_eq(limiter_item_verdict(&q, 2), LIMITER_REFUSED);
    ck_assert_int_eq(q.wait_reason, LIMITER_WAIT_BREAKER);
    ck_assert_int_eq(q.breaker_state, LIMITER_BREAKER_HALF_OPEN);
    /* this ask made the open -> half-open transition: it logs it */
    ck_assert_int_eq(q.breaker_from, LIMITER_BREAKER_OPEN);
    ck_assert_int_eq(q.breaker_to, LIMITER_BREAKER_HALF_OPEN);
    limiter_result_release(&q);
    char *holder = iwt_redis_str("GET %s", probe_key);
    ck_assert_str_eq(holder, "attempt-a");
    free(holder);

    /* the other pod gets nothing while the probe is out, and logs nothing */
    for (int i = 0; i < 3; i++) {
        q = ask_n(i == 2 ? &a : &b, 2, "attempt-b", 0);
        ck_assert_int_eq(q.granted, 0);
        ck_assert_int_eq(q.probe_index, -1);
        ck_assert_int_eq(q.wait_reason, LIMITER_WAIT_BREAKER);
        ck_assert_int_eq(q.breaker_state, LIMITER_BREAKER_HALF_OPEN);
        ck_assert_int_eq(q.breaker_from, -1);
        ck_assert_msg(q.wait_ms > 0 && q.wait_ms <= 1000, "wait %ld", q.wait_ms);
        limiter_result_release(&q);
    }

    /* the probe succeeds: closed, the count is reset, everybody flows */
    breaker_report r = outcomes(&a, "S", 1);
    ck_assert_int_eq(r.transitions, 1);
    ck_assert_int_eq(r.from, LIMITER_BREAKER_HALF_OPEN);
    ck_assert_int_eq(r.to, LIMITER_BREAKER_CLOSED);
    ck_assert_int_eq(r.failures, 0);
    ck_assert_int_eq(iwt_redis_int("EXISTS %s", probe_key), 0);
    q = ask_n(&b, 3, "attempt-b", 0);
    ck_assert_int_eq(q.granted, 3);
    ck_assert_int_eq(q.probe_index, -1);
    ck_assert_int_eq(q.breaker_state, LIMITER_BREAKER_CLOSED);
    limiter_result_release(&q);
    /* a second report of the same probe changes nothing */
    r = outcomes(&b, "", 1);
    ck_assert_int_eq(r.transitions, 0);
    ck_assert_int_eq(r.state, LIMITER_BREAKER_CLOSED);
    pod_close(&a);
    pod_close(&b);
    del_keys(ns);
}
END_TEST

/* A failed probe re-opens the breaker for another full period. */
START_TEST(test_probe_failure_reopens)
{
    const char *ns = test_ns("reopen");
    pod a = pod_open(ns), b = pod_open(ns);

    del_keys(ns);
    keys_of(ns);
    open_breaker(&a);
    ck_assert(iwt_eventually(key_gone, open_key, 3000));
    limiter_result q = ask_n(&b, 1, "probe-1", 0);
    ck_assert_int_eq(q.probe_index, 0);
    limiter_result_release(&q);

    breaker_report r = outcomes(&b, "F", 0);
    ck_assert_int_eq(r.transitions, 1);
    ck_assert_int_eq(r.from, LIMITER_BREAKER_HALF_OPEN);
    ck_assert_int_eq(r.to, LIMITER_BREAKER_OPEN);
    ck_assert_int_eq(r.failures, 6);
    long long pttl = iwt_redis_int("PTTL %s", open_key);
    ck_assert_msg(pttl > OPEN_MS - 200 && pttl <= OPEN_MS, "open PTTL %lld", pttl);
    ck_assert_int_eq(iwt_redis_int("EXISTS %s", probe_key), 0);
    q = ask_n(&a, 2, "x", 0);
    ck_assert_int_eq(q.granted, 0);
    ck_assert_int_eq(q.breaker_state, LIMITER_BREAKER_OPEN);
    ck_assert_int_eq(q.wait_reason, LIMITER_WAIT_BREAKER);
    limiter_result_release(&q);

    /* after the new period: one probe again */
    ck_assert(iwt_eventually(key_gone, open_key, 3000));
    q = ask_n(&a, 2, "probe-2", 0);
    ck_assert_int_eq(q.granted, 1);
    ck_assert_int_eq(q.probe_index, 0);
    ck_assert_int_eq(q.breaker_from, LIMITER_BREAKER_OPEN);
    limiter_result_release(&q);
    pod_close(&a);
    pod_close(&b);
    del_keys(ns);
}
END_TEST

/* A probe whose holder died (never reports) is replaced after its lease. */
START_TEST(test_abandoned_probe_replaced)
{
    const char *ns = test_ns("abandon");
    pod a = pod_open(ns), b = pod_open(ns);

    del_keys(ns);
    keys_of(ns);
    open_breaker(&b);
    ck_assert(iwt_eventually(key_gone, open_key, 3000));
    limiter_result q = ask_n(&a, 1, "dying-attempt", 300);
    ck_assert_int_eq(q.probe_index, 0);
    limiter_result_release(&q);
    long long pttl = iwt_redis_int("PTTL %s", probe_key);
    ck_assert_msg(pttl > 200 && pttl <= 300, "probe lease %lld", pttl);
    pod_close(&a); /* the pod dies with its probe in flight */

    q = ask_n(&b, 2, "attempt-b", 300);
    ck_assert_int_eq(q.granted, 0);
    ck_assert_int_eq(q.wait_reason, LIMITER_WAIT_BREAKER);
    limiter_result_release(&q);

    ck_assert(iwt_eventually(key_gone, probe_key, 3000));
    q = ask_n(&b, 2, "attempt-b", 300);
    ck_assert_int_eq(q.granted, 1);
    ck_assert_int_eq(q.probe_index, 0);
    ck_assert_int_eq(q.breaker_state, LIMITER_BREAKER_HALF_OPEN);
    limiter_result_release(&q);
    breaker_report r = outcomes(&b, "S", 1);
    ck_assert_int_eq(r.to, LIMITER_BREAKER_CLOSED);
    pod_close(&b);
    del_keys(ns);
}
END_TEST

/* Processes racing for the probe right when the period ends: exactly one. */
START_TEST(test_one_probe_across_processes)
{
    const char *ns = test_ns("race");
    enum { PODS = 4 };
    int fds[2];
    pid_t pids[PODS];
    long total = 0, transitions = 0;

    del_keys(ns);
    keys_of(ns);
    pod a = pod_open(ns);
    open_breaker(&a);
    pod_close(&a);
    ck_assert_int_eq(pipe(fds), 0);
    for (int p = 0; p < PODS; p++) {
        pids[p] = fork();
        ck_assert_int_ge(pids[p], 0);
        if (pids[p] == 0) {
            pod me = pod_open(ns);
            long got[2] = {0, 0};
            char token[32];
            long long end = clock_mono_ms() + OPEN_MS + 700;
            close(fds[0]);
            snprintf(token, sizeof token, "pod-%d", p);
            while (clock_mono_ms() < end) {
                limiter_result q = ask_n(&me, 1 + p % 3, token, 0);
                got[0] += q.granted;
                got[1] += q.breaker_from == LIMITER_BREAKER_OPEN;
                limiter_result_release(&q);
                iwt_sleep_ms(1);
            }
            ck_assert_int_eq(write(fds[1], got, sizeof got), (int)sizeof got);
            pod_close(&me);
            _exit(0);
        }
    }
    close(fds[1]);
    for (int p = 0; p < PODS; p++) {
        long got[2];
        int status;
        ck_assert_int_eq(read(fds[0], got, sizeof got), (int)sizeof got);
        total += got[0];
        transitions += got[1];
        ck_assert_int_eq(waitpid(pids[p], &status, 0), pids[p]);
        ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    close(fds[0]);
    ck_assert_int_eq(total, 1);
    ck_assert_int_eq(transitions, 1);
    ck_assert_int_eq(iwt_redis_int("ZCARD %s:limiter:log", ns), 1);
    del_keys(ns);
}
END_TEST

/* The consecutive-failure count tells exactly one pod that it crossed a
 * threshold (the engine's "API down" at 3). */
START_TEST(test_failure_count_crossing_seen_once)
{
    const char *ns = test_ns("apidown");
    pod a = pod_open(ns), b = pod_open(ns);
    int crossings = 0;

    del_keys(ns);
    const char *turns[] = {"F", "F", "SF", "F", "F", "F"};
    for (size_t i = 0; i < sizeof turns / sizeof turns[0]; i++) {
        breaker_report r = outcomes(i % 2 ? &b : &a, turns[i], -1);
        crossings += r.failures_before < 3 && r.failures >= 3;
        if (i == 2)
            ck_assert_int_eq(r.failures, 1);
    }
    ck_assert_int_eq(crossings, 1);
    pod_close(&a);
    pod_close(&b);
    del_keys(ns);
}
END_TEST

static Suite *breaker_suite(void)
{
    Suite *s = suite_create("breaker");
    TCase *tc = tcase_create("redis");
    tcase_set_timeout(tc, 30);
    tcase_add_unchecked_fixture(tc, NULL, remove_leftovers);
    tcase_add_test(tc, test_opens_after_exactly_five);
    tcase_add_test(tc, test_429_never_counts);
    tcase_add_test(tc, test_half_open_one_probe_then_close);
    tcase_add_test(tc, test_probe_failure_reopens);
    tcase_add_test(tc, test_abandoned_probe_replaced);
    tcase_add_test(tc, test_one_probe_across_processes);
    tcase_add_test(tc, test_failure_count_crossing_seen_once);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    runner_pid = getpid();
    return iwt_run_suite(breaker_suite());
}
