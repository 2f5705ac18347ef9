/* Integration suite of the poller: real RabbitMQ and Redis on loopback, a real
 * mock-provider and real worker processes.  Each test works in its own
 * namespace with its own mock, and waits for events rather than sleeping.
 *
 * The submitter schedules the first check; the mock answers pending on the
 * first check, processing until --checks-to-complete, then the terminal
 * status, so a job with 3 checks sees: pending (no event, the submission
 * already said pending), processing (status.progress), completed
 * (status.final with checks = 3). */
#include <check.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.h"
#include "iwtest.h"
#include "log.h"
#include "schema.h"

static char ns[128];

/* Fresh namespace with its topology, a mock with `mock_args`, and a tap. */
static iwt_amqp *setup(const char *name, const char *const *mock_args, int *port)
{
    return iwt_scene(ns, sizeof ns, name, mock_args, port);
}

static void teardown_all(iwt_amqp *a)
{
    iwt_scene_end(a, ns);
}

static void publish_job(iwt_amqp *a, const char *job_id, const char *mock_hooks)
{
    char body[1024];
    snprintf(body, sizeof body,
             "{\"jobId\":\"%s\",\"userId\":\"u-1\",\"action\":\"transaction\","
             "\"payload\":{\"amount\":5%s%s}}",
             job_id, mock_hooks ? ",\"mock\":" : "", mock_hooks ? mock_hooks : "");
    iwt_publish_job(a, ns, body);
}

/* Publishes a status check straight to <ns>.status. */
static void publish_check(iwt_amqp *a, const char *job_id, const char *tracking_id,
                          const char *accepted_at, int checks, const char *last_status)
{
    char queue[256];
    json_t *b = json_pack("{s:s, s:s, s:s, s:i, s:s, s:s}", "jobId", job_id, "trackingId",
                          tracking_id, "acceptedAt", accepted_at, "checks", checks, "lastStatus",
                          last_status, "priority", "normal");
    char *text = json_dumps(b, JSON_COMPACT);
    snprintf(queue, sizeof queue, "%s.status", ns);
    iwt_publish(a, "", queue, text, "application/json", NULL, NULL);
    free(text);
    json_decref(b);
}

static void assert_schema(const char *file, const json_t *doc)
{
    char path[512];
    iw_error err = {0};
    snprintf(path, sizeof path, "%s/schemas/%s", IW_SOURCE_DIR, file);
    iw_schema *s = schema_load_file(path, &err);
    ck_assert_msg(s != NULL, "cannot load %s: %s", file, err.msg);
    ck_assert_msg(schema_validate(s, doc, &err) == IW_OK, "%s: %s", file, err.msg);
    schema_free(s);
}

static const char *str(const json_t *o, const char *k)
{
    const char *v = json_string_value(json_object_get(o, k));
    return v ? v : "";
}

static long long num(const json_t *o, const char *k)
{
    return json_integer_value(json_object_get(o, k));
}

/* basic.get on a connection of its own: on the tap's channel a consumer
 * delivery could arrive in the middle of the get. */
static iwt_msg *get_dead(int timeout_ms)
{
    char dead[256];
    iwt_amqp *g = iwt_amqp_open();
    snprintf(dead, sizeof dead, "%s.dead", ns);
    iwt_msg *m = iwt_get(g, dead, timeout_ms);
    iwt_amqp_close(g);
    return m;
}

static const char *hdr(const iwt_msg *m, const char *k)
{
    return str(m->headers, k);
}

static int record_published(void *job_id)
{
    char *stored = iwt_redis_str("GET %s:final:%s", ns, (const char *)job_id);
    json_t *r = stored ? json_loads(stored, 0, NULL) : NULL;
    int yes = json_is_true(json_object_get(r, "published"));
    json_decref(r);
    free(stored);
    return yes;
}

/* ---- one job through submitter and poller ----------------------------------------- */

START_TEST(completed_after_three_checks)
{
    static const char *const mock[] = {"--checks-to-complete", "3", NULL};
    static const char *const env[] = {"IW_POLL_SCHEDULE=500ms", NULL};
    int port;
    iwt_amqp *a = setup("poll-life", mock, &port);

    iwt_track(iwt_start_worker("submitter", ns, port, env, "submitter"));
    iwt_track(iwt_start_worker("poller", ns, port, env, "poller"));
    publish_job(a, "life-1", NULL);

    iwt_msg *acc = iwt_wait_event(a, "submission.accepted", "life-1", 15000);
    ck_assert_ptr_nonnull(acc);
    iwt_msg *fin = iwt_wait_event(a, "status.final", "life-1", 15000);
    ck_assert_ptr_nonnull(fin);
    assert_schema("status-final.schema.json", fin->body);
    ck_assert_str_eq(fin->correlation_id, "life-1");
    ck_assert_str_eq(str(fin->body, "status"), "completed");
    ck_assert_int_eq(num(fin->body, "checks"), 3);
    ck_assert_str_eq(str(fin->body, "trackingId"), str(acc->body, "trackingId"));
    ck_assert_str_eq(str(fin->body, "acceptedAt"), str(acc->body, "acceptedAt"));
    /* result is the provider's last answer */
    json_t *result = json_object_get(fin->body, "result");
    ck_assert_str_eq(str(result, "status"), "completed");
    ck_assert_str_eq(str(result, "trackingId"), str(acc->body, "trackingId"));
    ck_assert_int_eq(num(result, "checks"), 3);

    /* progress only on a change: pending -> processing, once */
    iwt_msg *prog = iwt_wait_event(a, "status.progress", "life-1", 100);
    ck_assert_ptr_nonnull(prog);
    assert_schema("status-progress.schema.json", prog->body);
    ck_assert_str_eq(str(prog->body, "status"), "processing");
    ck_assert_int_eq(num(prog->body, "checks"), 2);
    ck_assert_int_eq(iwt_count_events(a, "status.progress", "life-1", 100), 0);
    /* no second final, and the outcome is recorded as published */
    ck_assert_int_eq(iwt_count_events(a, "status.final", "life-1", 1500), 0);
    ck_assert(record_published("life-1"));
    /* the record keeps the event as the exact text that was published */
    char *rec = iwt_redis_str("GET %s:final:life-1", ns);
    json_t *r = json_loads(rec, 0, NULL);
    const char *ev_text = json_string_value(json_object_get(r, "event"));
    ck_assert_ptr_nonnull(ev_text);
    ck_assert_int_eq(strlen(ev_text), fin->raw_len);
    ck_assert(memcmp(ev_text, fin->raw, fin->raw_len) == 0);
    json_decref(r);
    free(rec);
    json_t *stats = iwt_mock_stats(port);
    ck_assert_int_eq(iwt_stat(stats, "GET /api/v1/status", "200"), 3);
    json_decref(stats);
    iwt_msg_free(acc);
    iwt_msg_free(fin);
    iwt_msg_free(prog);
    teardown_all(a);
}
END_TEST

START_TEST(every_terminal_status_is_final)
{
    static const char *const mock[] = {"--checks-to-complete", "3", NULL};
    static const char *const env[] = {"IW_POLL_SCHEDULE=500ms", NULL};
    static const char *const terminal[] = {"completed", "failed", "rejected", "cancelled"};
    int port;
    iwt_amqp *a = setup("poll-term", mock, &port);

    iwt_track(iwt_start_worker("submitter", ns, port, env, "submitter"));
    iwt_track(iwt_start_worker("poller", ns, port, env, "poller"));
    for (int i = 0; i < 4; i++) {
        char id[64], hooks[128];
        snprintf(id, sizeof id, "term-%s", terminal[i]);
        snprintf(hooks, sizeof hooks, "{\"terminal\":\"%s\",\"checks\":2}", terminal[i]);
        publish_job(a, id, hooks);
    }
    for (int i = 0; i < 4; i++) {
        char id[64];
        snprintf(id, sizeof id, "term-%s", terminal[i]);
        iwt_msg *fin = iwt_wait_event(a, "status.final", id, 15000);
        ck_assert_msg(fin != NULL, "no status.final for %s", id);
        assert_schema("status-final.schema.json", fin->body);
        ck_assert_str_eq(str(fin->body, "status"), terminal[i]);
        ck_assert_int_eq(num(fin->body, "checks"), 2);
        ck_assert_str_eq(str(json_object_get(fin->body, "result"), "status"), terminal[i]);
        iwt_msg_free(fin);
    }
    /* a provider-side "failed" is an outcome, not a submission failure */
    ck_assert_int_eq(iwt_count_events(a, "submission.failed", NULL, 500), 0);
    ck_assert_int_eq(iwt_count_events(a, "status.final", NULL, 1000), 0);
    teardown_all(a);
}
END_TEST

/* ---- giving up ------------------------------------------------------------------------ */

START_TEST(expiry_fails_with_poll_expired)
{
    static const char *const mock[] = {NULL};
    static const char *const env[] = {"IW_POLL_SCHEDULE=500ms", "IW_POLL_MAX_AGE=3s", NULL};
    int port;
    iwt_amqp *a = setup("poll-exp", mock, &port);

    iwt_track(iwt_start_worker("submitter", ns, port, env, "submitter"));
    iwt_track(iwt_start_worker("poller", ns, port, env, "poller"));
    publish_job(a, "exp-1", "{\"checks\":1000}");
    iwt_msg *acc = iwt_wait_event(a, "submission.accepted", "exp-1", 15000);
    ck_assert_ptr_nonnull(acc);
    long long accepted = iwt_now_ms();
    iwt_msg *f = iwt_wait_event(a, "submission.failed", "exp-1", 15000);
    ck_assert_ptr_nonnull(f);
    long long took = iwt_now_ms() - accepted;
    assert_schema("submission-failed.schema.json", f->body);
    json_t *e = json_object_get(f->body, "error");
    ck_assert_str_eq(str(e, "code"), "POLL_EXPIRED");
    ck_assert_msg(took >= 2500 && took < 8000, "expired after %lld ms", took);

    iwt_msg *d = get_dead(5000);
    ck_assert_ptr_nonnull(d);
    ck_assert_str_eq(hdr(d, "x-error-code"), "POLL_EXPIRED");
    char q[256];
    snprintf(q, sizeof q, "%s.status", ns);
    ck_assert_str_eq(hdr(d, "x-original-queue"), q);
    ck_assert_str_eq(str(d->body, "jobId"), "exp-1");
    ck_assert_int_eq(iwt_count_events(a, "status.final", "exp-1", 1000), 0);
    /* checks happened at about 0.5 s intervals up to the deadline, then stopped */
    json_t *stats = iwt_mock_stats(port);
    long n = iwt_stat(stats, "GET /api/v1/status", "200");
    ck_assert_msg(n >= 4 && n <= 8, "%ld checks", n);
    json_decref(stats);
    iwt_msg_free(acc);
    iwt_msg_free(f);
    iwt_msg_free(d);
    teardown_all(a);
}
END_TEST

START_TEST(unknown_tracking_id_and_bad_messages)
{
    static const char *const mock[] = {NULL};
    char queue[256], ts[40];
    int port;
    iwt_amqp *a = setup("poll-404", mock, &port);

    snprintf(queue, sizeof queue, "%s.status", ns);
    iwt_track(iwt_start_worker("poller", ns, port, NULL, "poller"));
    /* garbage first: dead-lettered, and the poller keeps serving */
    iwt_publish(a, "", queue, "{not json", "application/json", NULL, NULL);
    iwt_msg *d = get_dead(10000);
    ck_assert_ptr_nonnull(d);
    ck_assert_str_eq(hdr(d, "x-error-code"), "INVALID_JSON");
    ck_assert_str_eq(hdr(d, "x-original-queue"), queue);
    iwt_msg_free(d);
    iwt_publish(a, "", queue, "{\"jobId\":\"bad-1\",\"checks\":0}", "application/json", NULL, NULL);
    d = get_dead(10000);
    ck_assert_ptr_nonnull(d);
    ck_assert_str_eq(hdr(d, "x-error-code"), "SCHEMA_VIOLATION");
    ck_assert_str_eq(hdr(d, "x-original-queue"), queue);
    iwt_msg_free(d);
    iwt_msg *f = iwt_wait_event(a, "submission.failed", "bad-1", 5000);
    ck_assert_ptr_nonnull(f);
    ck_assert_str_eq(str(json_object_get(f->body, "error"), "code"), "SCHEMA_VIOLATION");
    iwt_msg_free(f);

    /* a tracking id the provider does not know (escaped into the path) */
    format_timestamp(clock_wall_ms(), ts, sizeof ts);
    publish_check(a, "nf-1", "unknown track#1", ts, 0, "pending");
    f = iwt_wait_event(a, "submission.failed", "nf-1", 10000);
    ck_assert_ptr_nonnull(f);
    assert_schema("submission-failed.schema.json", f->body);
    json_t *e = json_object_get(f->body, "error");
    ck_assert_str_eq(str(e, "code"), "TRACKING_NOT_FOUND");
    ck_assert_int_eq(num(e, "statusCode"), 404);
    ck_assert_int_eq(num(e, "retryAttempt"), 1);
    d = get_dead(5000);
    ck_assert_ptr_nonnull(d);
    ck_assert_str_eq(hdr(d, "x-error-code"), "TRACKING_NOT_FOUND");
    ck_assert_str_eq(hdr(d, "x-original-queue"), queue);
    ck_assert_int_eq(num(d->headers, "x-http-status"), 404);
    ck_assert_str_eq(str(d->body, "trackingId"), "unknown track#1");
    json_t *stats = iwt_mock_stats(port);
    ck_assert_int_eq(iwt_stat(stats, "GET /api/v1/status", "404"), 1);
    json_decref(stats);
    iwt_msg_free(f);
    iwt_msg_free(d);
    teardown_all(a);
}
END_TEST

/* A status check that fails (5xx, timeout, no connection) never ends an
 * accepted job early: it is tried again on the poll schedule, and only
 * IW_POLL_MAX_AGE ends the job (contract). */
START_TEST(server_errors_never_end_an_accepted_job_early)
{
    static const char *const mock[] = {"--checks-to-complete", "2", NULL};
    /* the breaker would open after 5 failures in a row: out of the way here */
    static const char *const env[] = {"IW_POLL_SCHEDULE=300ms", "IW_RETRY_SCHEDULE=0s,200ms,200ms",
                                      "IW_POLL_MAX_AGE=6s", "IW_BREAKER_FAILURES=1000", NULL};
    int port;
    iwt_amqp *a = setup("poll-5xx", mock, &port);

    iwt_track(iwt_start_worker("submitter", ns, port, env, "submitter"));
    iwt_track(iwt_start_worker("poller", ns, port, env, "poller"));
    /* five 503s in a row, more than IW_RETRY_SCHEDULE allows a submission:
     * the checks go on and the job completes */
    ck_assert_int_eq(iwt_mock_post(port, "/__admin/faults",
                                   "{\"script\":{\"GET /api/v1/status\":[503,503,503,503,503]}}"),
                     200);
    publish_job(a, "r-1", NULL);
    iwt_msg *fin = iwt_wait_event(a, "status.final", "r-1", 15000);
    ck_assert_ptr_nonnull(fin);
    ck_assert_int_eq(num(fin->body, "checks"), 2);
    ck_assert_int_eq(iwt_count_events(a, "submission.failed", "r-1", 300), 0);
    iwt_msg_free(fin);
    /* the provider fails every check: only IW_POLL_MAX_AGE ends the job */
    char script[600] = "{\"script\":{\"GET /api/v1/status\":[503";
    for (int i = 1; i < 60; i++)
        strcat(script, ",503");
    strcat(script, "]}}");
    ck_assert_int_eq(iwt_mock_post(port, "/__admin/faults", script), 200);
    long long t0 = iwt_now_ms();
    publish_job(a, "r-2", NULL);
    iwt_msg *f = iwt_wait_event(a, "submission.failed", "r-2", 20000);
    ck_assert_ptr_nonnull(f);
    ck_assert_msg(iwt_now_ms() - t0 >= 5000, "failed after %lld ms, before IW_POLL_MAX_AGE",
                  iwt_now_ms() - t0);
    json_t *e = json_object_get(f->body, "error");
    ck_assert_str_eq(str(e, "code"), "POLL_EXPIRED");
    iwt_msg *d = get_dead(5000);
    ck_assert_ptr_nonnull(d);
    ck_assert_str_eq(str(d->headers, "x-error-code"), "POLL_EXPIRED");
    ck_assert_int_eq(iwt_count_events(a, "status.final", "r-2", 500), 0);
    json_t *stats = iwt_mock_stats(port);
    ck_assert_int_ge(iwt_stat(stats, "GET /api/v1/status", "503"), 8);
    json_decref(stats);
    iwt_msg_free(f);
    iwt_msg_free(d);
    teardown_all(a);
}
END_TEST

/* ---- crashes and several pollers --------------------------------------------------- */

static int port_for_cond;

static int check_in_flight(void *ud)
{
    (void)ud;
    json_t *s = iwt_mock_stats(port_for_cond);
    long long n = json_integer_value(json_object_get(s, "in_flight"));
    json_decref(s);
    return n > 0;
}

START_TEST(poller_killed_mid_check)
{
    static const char *const mock[] = {"--checks-to-complete", "3", NULL};
    static const char *const env[] = {"IW_POLL_SCHEDULE=500ms", NULL};
    int port;
    iwt_amqp *a = setup("poll-kill", mock, &port);

    iwt_track(iwt_start_worker("submitter", ns, port, env, "submitter"));
    pid_t pol = iwt_track(iwt_start_worker("poller", ns, port, env, "poller-1"));
    publish_job(a, "kill-1", NULL);
    iwt_msg *acc = iwt_wait_event(a, "submission.accepted", "kill-1", 15000);
    ck_assert_ptr_nonnull(acc);
    /* the first check (due in 0.5 s) hangs for 3 s: kill the poller during it */
    ck_assert_int_eq(iwt_mock_post(port, "/__admin/faults", "{\"latency_ms\":3000}"), 200);
    port_for_cond = port;
    ck_assert_msg(iwt_eventually(check_in_flight, NULL, 10000), "no check in flight");
    ck_assert_int_eq(iwt_stop_tracked(pol, SIGKILL), 128 + SIGKILL);
    ck_assert_int_eq(iwt_mock_post(port, "/__admin/faults", "{\"latency_ms\":0}"), 200);
    iwt_track(iwt_start_worker("poller", ns, port, env, "poller-2"));

    iwt_msg *fin = iwt_wait_event(a, "status.final", "kill-1", 20000);
    ck_assert_ptr_nonnull(fin);
    ck_assert_str_eq(str(fin->body, "status"), "completed");
    ck_assert_int_eq(iwt_count_events(a, "status.final", "kill-1", 2000), 0);
    ck_assert_int_eq(iwt_count_events(a, "submission.failed", "kill-1", 10), 0);
    iwt_msg_free(acc);
    iwt_msg_free(fin);
    teardown_all(a);
}
END_TEST

#define N_TWO 30
#define N_DUPLICATED 5

START_TEST(two_pollers_one_final_per_job)
{
    static const char *const mock[] = {"--checks-to-complete", "3", NULL};
    static const char *const env[] = {"IW_POLL_SCHEDULE=500ms", NULL};
    int seen[N_TWO] = {0};
    int port, total = 0;
    iwt_amqp *a = setup("poll-two", mock, &port);

    iwt_track(iwt_start_worker("submitter", ns, port, env, "submitter"));
    iwt_track(iwt_start_worker("poller", ns, port, env, "poller-a"));
    iwt_track(iwt_start_worker("poller", ns, port, env, "poller-b"));
    for (int i = 0; i < N_TWO; i++) {
        char id[32];
        snprintf(id, sizeof id, "two-%d", i);
        publish_job(a, id, NULL);
    }
    /* a few jobs get two extra check chains (as a crash between a confirm and
     * an ack would leave): still one status.final each */
    for (int i = 0; i < N_DUPLICATED; i++) {
        char id[32];
        snprintf(id, sizeof id, "two-%d", i);
        iwt_msg *acc = iwt_wait_event(a, "submission.accepted", id, 15000);
        ck_assert_ptr_nonnull(acc);
        publish_check(a, id, str(acc->body, "trackingId"), str(acc->body, "acceptedAt"), 0,
                      "pending");
        publish_check(a, id, str(acc->body, "trackingId"), str(acc->body, "acceptedAt"), 0,
                      "pending");
        iwt_msg_free(acc);
    }
    long long deadline = iwt_now_ms() + 30000;
    while (total < N_TWO && iwt_now_ms() < deadline) {
        iwt_msg *m = iwt_wait_event(a, "status.final", NULL, (int)(deadline - iwt_now_ms()));
        if (!m)
            break;
        int i = atoi(m->correlation_id + 4);
        ck_assert(i >= 0 && i < N_TWO);
        ck_assert_msg(seen[i] == 0, "second status.final for %s", m->correlation_id);
        seen[i]++;
        total++;
        iwt_msg_free(m);
    }
    ck_assert_int_eq(total, N_TWO);
    /* the duplicated chains end without another final (lease + published mark) */
    ck_assert_int_eq(iwt_count_events(a, "status.final", NULL, 7000), 0);
    ck_assert_int_eq(iwt_count_events(a, "submission.failed", NULL, 10), 0);
    char status_q[256];
    snprintf(status_q, sizeof status_q, "%s.status", ns);
    ck_assert_int_eq(iwt_queue_depth(a, status_q), 0);
    teardown_all(a);
}
END_TEST

/* The Redis record decides before any call: an unpublished record (its
 * recorder crashed after recording) is published as recorded and marked; a
 * published one ends the check silently. */
START_TEST(recorded_outcome_wins_over_a_call)
{
    static const char *const mock[] = {NULL};
    char ts[40], queue[256];
    int port;
    iwt_amqp *a = setup("poll-rec", mock, &port);

    snprintf(queue, sizeof queue, "%s.status", ns);
    format_timestamp(clock_wall_ms(), ts, sizeof ts);
    json_t *ev = json_pack("{s:s, s:s, s:s, s:i, s:s, s:s, s:{s:s}}", "jobId", "rec-1",
                           "trackingId", "track-gone", "status", "completed", "checks", 4,
                           "acceptedAt", ts, "finishedAt", ts, "result", "status", "completed");
    /* recorded by a poller that died before publishing: its lease is over */
    char *ev_text = json_dumps(ev, JSON_COMPACT);
    json_t *rec = json_pack("{s:s, s:b, s:i, s:s, s:i}", "event", ev_text, "published", 0,
                            "recordedAt", 0, "owner", "a-dead-poller", "leaseUntil", 0);
    char *text = json_dumps(rec, JSON_COMPACT);
    free(ev_text);
    free(iwt_redis_str("SET %s:final:rec-1 %s PX 600000", ns, text));
    free(text);
    json_decref(rec);

    iwt_track(iwt_start_worker("poller", ns, port, NULL, "poller"));
    /* the tracking id is unknown to the mock: a call would end in a 404 */
    publish_check(a, "rec-1", "track-gone", ts, 3, "processing");
    iwt_msg *fin = iwt_wait_event(a, "status.final", "rec-1", 10000);
    ck_assert_ptr_nonnull(fin);
    ck_assert(json_equal(fin->body, ev));
    /* marked after the poller's confirm, which may follow the tap's copy */
    ck_assert_msg(iwt_eventually(record_published, "rec-1", 5000), "not marked published");

    /* now published: another check of the job is acked without a call or event */
    publish_check(a, "rec-1", "track-gone", ts, 3, "processing");
    ck_assert_int_eq(iwt_count_events(a, NULL, "rec-1", 1500), 0);
    ck_assert_int_eq(iwt_queue_depth(a, queue), 0);
    json_t *stats = iwt_mock_stats(port);
    ck_assert_int_eq(json_integer_value(json_object_get(stats, "status_checks")), 0);
    ck_assert_int_eq(iwt_stat(stats, "GET /api/v1/status", "404"), 0);
    json_decref(stats);
    json_decref(ev);
    iwt_msg_free(fin);
    teardown_all(a);
}
END_TEST

/* ---- fairness under one tight limit ------------------------------------------------ */

#define N_FAIR 40

START_TEST(submitting_and_polling_share_a_tight_limit)
{
    static const char *const mock[] = {"--checks-to-complete", "2", "--rate-limits", "10/s", NULL};
    static const char *const env[] = {"IW_POLL_SCHEDULE=500ms", "IW_RATE_LIMITS=10/s", NULL};
    int port, accepted = 0, finals = 0;
    long checks_when_all_accepted = -1;
    iwt_amqp *a = setup("poll-fair", mock, &port);

    iwt_track(iwt_start_worker("submitter", ns, port, env, "submitter"));
    iwt_track(iwt_start_worker("poller", ns, port, env, "poller"));
    long long start = iwt_now_ms();
    for (int i = 0; i < N_FAIR; i++) {
        char id[32];
        snprintf(id, sizeof id, "fair-%d", i);
        publish_job(a, id, NULL);
    }
    long long deadline = start + 60000;
    while (finals < N_FAIR && iwt_now_ms() < deadline) {
        iwt_msg *m = iwt_next_event(a, (int)(deadline - iwt_now_ms()));
        if (!m)
            break;
        if (!strcmp(m->routing_key, "submission.accepted") && ++accepted == N_FAIR) {
            json_t *s = iwt_mock_stats(port);
            checks_when_all_accepted =
                (long)json_integer_value(json_object_get(s, "status_checks"));
            json_decref(s);
            ck_assert_msg(iwt_now_ms() - start < 20000, "submissions starved: %lld ms",
                          iwt_now_ms() - start);
        }
        if (!strcmp(m->routing_key, "status.final"))
            finals++;
        ck_assert_str_ne(m->routing_key, "submission.failed");
        iwt_msg_free(m);
    }
    ck_assert_int_eq(accepted, N_FAIR);
    ck_assert_int_eq(finals, N_FAIR);
    /* polls were not starved while submissions were still going on */
    ck_assert_msg(checks_when_all_accepted >= 5, "only %ld status checks before the last accept",
                  checks_when_all_accepted);
    json_t *s = iwt_mock_stats(port);
    ck_assert_int_eq(json_integer_value(json_object_get(s, "rate_limited")), 0);
    ck_assert_int_eq(json_integer_value(json_object_get(s, "submissions_created")), N_FAIR);
    json_decref(s);
    teardown_all(a);
}
END_TEST

static Suite *poll_suite(void)
{
    Suite *s = suite_create("poll");
    TCase *tc = tcase_create("poller");

    tcase_set_timeout(tc, 90);
    tcase_add_test(tc, completed_after_three_checks);
    tcase_add_test(tc, every_terminal_status_is_final);
    tcase_add_test(tc, expiry_fails_with_poll_expired);
    tcase_add_test(tc, unknown_tracking_id_and_bad_messages);
    tcase_add_test(tc, server_errors_never_end_an_accepted_job_early);
    tcase_add_test(tc, poller_killed_mid_check);
    tcase_add_test(tc, two_pollers_one_final_per_job);
    tcase_add_test(tc, recorded_outcome_wins_over_a_call);
    tcase_add_test(tc, submitting_and_polling_share_a_tight_limit);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(poll_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
