/* `integration-worker dlq` against the real broker: a dead-letter queue of a
 * few hundred messages of mixed causes (the worker's contract headers, bodies
 * that are not UTF-8, and three that the broker dead-lettered itself: a
 * rejection, an oversized rejection and a delivery limit), every command and
 * filter, the order of the messages a command does not act on, and replays
 * and purges killed with SIGKILL at each step. */
#include <amqp.h>
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "iwtest.h"
#include "log.h"

#define K 300 /* direct dead letters in the standard fixture */
#define MAXMSG 512
#define HOUR 3600000LL

static const char *ns;
static iwt_amqp *A;
static char expected[MAXMSG][64]; /* the labels of N.dead, head first */
static int n_expected;
static char dead_q[256], submit_q[256];

static const char *const base_env[] = {"IW_MAX_MESSAGE_BYTES=4096", NULL};

/* The six kinds of worker dead letters, by seq % 6. */
static const struct kind {
    const char *code;
    long http;
    long attempts;
    const char *rk;
    long long age_ms;
    int binary;
} kinds[6] = {
    {"EXTERNAL_API_ERROR", 503, 4, "submit.transaction", 3 * HOUR, 0},
    {"EXTERNAL_API_BAD_REQUEST", 400, 1, "submit.refund", HOUR / 2, 0},
    {"SCHEMA_VIOLATION", -1, 0, "submit.transaction", 48 * HOUR, 0},
    {"INVALID_JSON", -1, 0, "submit.transaction", 10000, 1},
    {"MISSING_REPLY_TO", -1, 0, "resource.get", HOUR / 12, 0},
    {"EXTERNAL_API_TIMEOUT", -1, 4, "submit.transaction", HOUR, 0},
};

static void id_of(int seq, char *buf, size_t len)
{
    snprintf(buf, len, "dl-%08x%024x", (unsigned)getpid(), (unsigned)seq);
}

static void binary_body(int seq, char *buf, size_t *len)
{
    *len = (size_t)snprintf(buf, 64, "\xff\xfe bin-%d \x80\x01", seq);
}

/* ---- AMQP helpers -------------------------------------------------------- */

static amqp_table_entry_t s_entry(const char *k, const char *v)
{
    amqp_table_entry_t e;
    e.key = amqp_cstring_bytes(k);
    e.value.kind = AMQP_FIELD_KIND_UTF8;
    e.value.value.bytes = amqp_cstring_bytes(v);
    return e;
}

static amqp_table_entry_t i_entry(const char *k, int64_t v)
{
    amqp_table_entry_t e;
    e.key = amqp_cstring_bytes(k);
    e.value.kind = AMQP_FIELD_KIND_I64;
    e.value.value.i64 = v;
    return e;
}

/* Publishes one dead letter as the worker makes it, to N.dlx. */
static void publish_dead(int seq, const char *rk_override)
{
    const struct kind *k = &kinds[seq % 6];
    char ex[256], id[64], body[256], failed_at[40], trace[64], msg[128], queue[256];
    amqp_table_entry_t h[16];
    int n = 0;
    size_t len;
    amqp_basic_properties_t p;
    const char *rk = rk_override ? rk_override : k->rk;

    id_of(seq, id, sizeof id);
    if (k->binary)
        binary_body(seq, body, &len);
    else
        len =
            (size_t)snprintf(body, sizeof body,
                             "{\"jobId\":\"job-%d\",\"userId\":\"u-%d\",\"action\":\"transaction\","
                             "\"payload\":{\"n\":%d}}",
                             seq, seq, seq);
    format_timestamp(clock_wall_ms() - k->age_ms, failed_at, sizeof failed_at);
    snprintf(trace, sizeof trace, "trace-%d", seq);
    snprintf(msg, sizeof msg, "%s for seq %d", k->code, seq);
    snprintf(queue, sizeof queue, "%s.%s", ns, strncmp(rk, "resource", 8) ? "submit" : "resource");
    h[n++] = s_entry("x-error-code", k->code);
    h[n++] = s_entry("x-error-message", msg);
    if (k->http > 0)
        h[n++] = i_entry("x-http-status", k->http);
    h[n++] = i_entry("x-attempts", k->attempts);
    h[n++] = s_entry("x-original-routing-key", rk);
    h[n++] = s_entry("x-original-queue", queue);
    h[n++] = s_entry("x-failed-at", failed_at);
    h[n++] = s_entry("x-upstream-trace", trace);
    h[n++] = i_entry("x-test-seq", seq);
    char upstream_id[32];
    snprintf(upstream_id, sizeof upstream_id, "up-%d", seq);
    if (seq % 6 == 0) /* the upstream's message_id, kept by the worker */
        h[n++] = s_entry("x-original-message-id", upstream_id);
    if (seq % 6 == 5) { /* the internal headers a retried job carries */
        h[n++] = s_entry("iw-target", "submit");
        h[n++] = i_entry("x-due-at", 1);
        h[n++] = i_entry("x-first-seen", 1);
        h[n++] = s_entry("x-last-error", "EXTERNAL_API_TIMEOUT");
    }
    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_HEADERS_FLAG |
               AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_CORRELATION_ID_FLAG;
    p.delivery_mode = 2;
    p.message_id = amqp_cstring_bytes(id);
    p.correlation_id = amqp_cstring_bytes(trace);
    p.headers.num_entries = n;
    p.headers.entries = h;
    if (!k->binary) {
        p._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
        p.content_type = amqp_cstring_bytes("application/json");
    }
    snprintf(ex, sizeof ex, "%s.dlx", ns);
    ck_assert_int_eq(amqp_basic_publish(A->conn, 1, amqp_cstring_bytes(ex), amqp_cstring_bytes(rk),
                                        0, 0, &p, (amqp_bytes_t){len, body}),
                     AMQP_STATUS_OK);
}

static uint32_t consumers_of(const char *queue)
{
    amqp_queue_declare_ok_t *ok =
        amqp_queue_declare(A->conn, 1, amqp_cstring_bytes(queue), 1, 0, 0, 0, amqp_empty_table);
    ck_assert_int_eq(amqp_get_rpc_reply(A->conn).reply_type, AMQP_RESPONSE_NORMAL);
    return ok->consumer_count;
}

typedef struct want {
    const char *queue;
    int n;
} want;

static int depth_is(void *ud)
{
    want *w = ud;
    return iwt_queue_depth(A, w->queue) == w->n;
}

static int idle(void *ud)
{
    return consumers_of(ud) == 0;
}

static void wait_depth(const char *queue, int n)
{
    want w = {queue, n};
    ck_assert_msg(iwt_eventually(depth_is, &w, 15000), "%s: depth %d, want %d", queue,
                  iwt_queue_depth(A, queue), n);
}

/* Takes the head of N.submit unacked and rejects it (requeue or not). */
static void reject_head(int requeue)
{
    amqp_rpc_reply_t r = amqp_basic_get(A->conn, 1, amqp_cstring_bytes(submit_q), 0);
    amqp_message_t m;
    ck_assert_int_eq(r.reply_type, AMQP_RESPONSE_NORMAL);
    ck_assert_int_eq(r.reply.id, AMQP_BASIC_GET_OK_METHOD);
    uint64_t tag = ((amqp_basic_get_ok_t *)r.reply.decoded)->delivery_tag;
    ck_assert_int_eq(amqp_read_message(A->conn, 1, &m, 0).reply_type, AMQP_RESPONSE_NORMAL);
    amqp_destroy_message(&m);
    if (requeue)
        amqp_basic_nack(A->conn, 1, tag, 0, 1);
    else
        amqp_basic_reject(A->conn, 1, tag, 0);
}

static void broker_dead_letters(void)
{
    char big[6000];
    int n = iwt_queue_depth(A, dead_q);

    /* a plain rejection */
    iwt_publish_job(A, ns,
                    "{\"jobId\":\"rej-1\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{}}");
    wait_depth(submit_q, 1);
    reject_head(0);
    wait_depth(dead_q, ++n);
    snprintf(expected[n_expected++], 64, "rej-1");
    /* an oversized job, refused the way the worker's link refuses it */
    int len =
        snprintf(big, sizeof big,
                 "{\"jobId\":\"big-1\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{\"pad\":\"");
    memset(big + len, 'x', 5000);
    strcpy(big + len + 5000, "\"}}");
    iwt_publish_job(A, ns, big);
    wait_depth(submit_q, 1);
    reject_head(0);
    wait_depth(dead_q, ++n);
    snprintf(expected[n_expected++], 64, "big-1");
    /* a job that comes back until the delivery limit (1 here) */
    iwt_publish_job(A, ns,
                    "{\"jobId\":\"poison-1\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{}}");
    for (int i = 0; i < 20 && iwt_queue_depth(A, dead_q) == n; i++) {
        wait_depth(submit_q, 1);
        reject_head(1);
        usleep(100000);
    }
    wait_depth(dead_q, ++n);
    wait_depth(submit_q, 0);
    snprintf(expected[n_expected++], 64, "poison-1");
}

/* N.dead = k worker dead letters with three broker ones in the middle. */
static void build(int k)
{
    const char *declare[] = {"declare", NULL};
    const char *env[] = {"IW_DELIVERY_LIMIT=1", NULL};

    iwt_cleanup(ns);
    ck_assert_int_eq(iwt_run_worker_cmd(declare, ns, 1, env, NULL), 0);
    n_expected = 0;
    for (int i = 0; i < k / 2; i++) {
        publish_dead(i, NULL);
        snprintf(expected[n_expected++], 64, "s%d", i);
    }
    wait_depth(dead_q, n_expected);
    broker_dead_letters();
    for (int i = k / 2; i < k; i++) {
        publish_dead(i, NULL);
        snprintf(expected[n_expected++], 64, "s%d", i);
    }
    wait_depth(dead_q, n_expected);
}

static void label_of(const iwt_msg *m, char *buf, size_t len)
{
    json_t *seq = json_object_get(m->headers, "x-test-seq");
    if (json_is_integer(seq))
        snprintf(buf, len, "s%lld", (long long)json_integer_value(seq));
    else
        snprintf(buf, len, "%s", json_string_value(json_object_get(m->body, "jobId")) ?: "?");
}

/* Reads a queue empty (auto-ack), head first; returns the count. */
static int drain(const char *queue, char labels[][64], iwt_msg **keep)
{
    int n = 0;
    iwt_msg *m;
    while (n < MAXMSG && (m = iwt_get(A, queue, n ? 300 : 1000)) != NULL) {
        label_of(m, labels[n], 64);
        if (keep)
            keep[n] = m;
        else
            iwt_msg_free(m);
        n++;
    }
    return n;
}

static char drained[MAXMSG][64];

/* N.dead holds exactly the expected labels minus `gone`, in order. */
static void check_dead_order(int (*gone)(const char *label))
{
    int n = drain(dead_q, drained, NULL), j = 0;
    for (int i = 0; i < n_expected; i++) {
        if (gone && gone(expected[i]))
            continue;
        ck_assert_msg(j < n, "%s missing from %s", expected[i], dead_q);
        ck_assert_msg(!strcmp(drained[j], expected[i]), "position %d: %s, expected %s", j,
                      drained[j], expected[i]);
        j++;
    }
    ck_assert_int_eq(j, n);
}

/* A tap on N.requests with the real bindings' keys. */
static char tap_q[256];

static void tap_requests(void)
{
    char ex[256];
    amqp_queue_declare_ok_t *q =
        amqp_queue_declare(A->conn, 1, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    ck_assert_int_eq(amqp_get_rpc_reply(A->conn).reply_type, AMQP_RESPONSE_NORMAL);
    snprintf(tap_q, sizeof tap_q, "%.*s", (int)q->queue.len, (char *)q->queue.bytes);
    snprintf(ex, sizeof ex, "%s.requests", ns);
    static const char *const keys[] = {"submit.#", "resource.#"};
    for (int i = 0; i < 2; i++) {
        amqp_queue_bind(A->conn, 1, amqp_cstring_bytes(tap_q), amqp_cstring_bytes(ex),
                        amqp_cstring_bytes(keys[i]), amqp_empty_table);
        ck_assert_int_eq(amqp_get_rpc_reply(A->conn).reply_type, AMQP_RESPONSE_NORMAL);
    }
}

/* Runs `integration-worker dlq ARGS...`; returns the exit code, stdout in *out. */
static int dlq_env(const char *const *extra_env, char **out, const char *const *args)
{
    const char *argv[32];
    const char *env[8];
    int n = 0, e = 0;

    argv[n++] = "dlq";
    for (int i = 0; args[i] && n < 31; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    for (int i = 0; base_env[i]; i++)
        env[e++] = base_env[i];
    for (int i = 0; extra_env && extra_env[i] && e < 7; i++)
        env[e++] = extra_env[i];
    env[e] = NULL;
    return iwt_run_worker_cmd(argv, ns, 1, env, out);
}

#define DLQ(out, ...) dlq_env(NULL, out, (const char *const[]){__VA_ARGS__, NULL})

/* Splits JSON lines into an array (every line must parse). */
static json_t *json_lines(const char *text)
{
    json_t *arr = json_array();
    const char *p = text;
    while (*p) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        json_error_t e;
        json_t *j = json_loadb(p, len, 0, &e);
        ck_assert_msg(j != NULL, "not JSON: %.*s (%s)", (int)len, p, e.text);
        json_array_append_new(arr, j);
        p += len + (nl ? 1 : 0);
    }
    return arr;
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

static json_t *find_by(json_t *arr, const char *field, const char *value)
{
    size_t i;
    json_t *v;
    json_array_foreach(arr, i, v)
    {
        const char *s = json_string_value(json_object_get(v, field));
        if (s && !strcmp(s, value))
            return v;
    }
    return NULL;
}

static void setup(void)
{
    ns = iwt_namespace("dlq");
    snprintf(dead_q, sizeof dead_q, "%s.dead", ns);
    snprintf(submit_q, sizeof submit_q, "%s.submit", ns);
    A = iwt_amqp_open();
    build(K);
}

static void teardown(void)
{
    iwt_amqp_close(A);
    A = NULL;
    iwt_cleanup(ns);
}

/* ---- list ------------------------------------------------------------------ */

START_TEST(test_list_table_json_and_order)
{
    char *out = NULL, *out2 = NULL, id[64];
    json_t *rows, *rows2, *r;

    ck_assert_int_eq(DLQ(&out, "list"), 0);
    ck_assert_int_eq(count_lines(out), n_expected + 1); /* + the header */
    ck_assert_ptr_nonnull(strstr(out, "ROUTING KEY"));
    ck_assert_ptr_nonnull(strstr(out, "EXTERNAL_API_ERROR"));
    ck_assert_ptr_null(strchr(out, '\xff')); /* no raw byte of a binary body */
    free(out);

    ck_assert_int_eq(DLQ(&out, "list", "--json"), 0);
    rows = json_lines(out);
    ck_assert_int_eq(json_array_size(rows), n_expected);
    /* queue order: the head first */
    id_of(0, id, sizeof id);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(rows, 0), "id")), id);
    r = find_by(rows, "job_id", "job-6");
    ck_assert_ptr_nonnull(r);
    id_of(6, id, sizeof id);
    ck_assert_str_eq(json_string_value(json_object_get(r, "id")), id);
    ck_assert_str_eq(json_string_value(json_object_get(r, "error_code")), "EXTERNAL_API_ERROR");
    ck_assert_int_eq(json_integer_value(json_object_get(r, "http_status")), 503);
    ck_assert_int_eq(json_integer_value(json_object_get(r, "attempts")), 4);
    ck_assert_str_eq(json_string_value(json_object_get(r, "routing_key")), "submit.transaction");
    ck_assert_int_ge(json_integer_value(json_object_get(r, "age_s")), 3 * 3600 - 60);
    ck_assert_int_gt(json_integer_value(json_object_get(r, "size")), 40);
    ck_assert_str_eq(json_string_value(json_object_get(r, "id_source")), "message_id");
    /* a binary body has no jobId and is listed all the same */
    id_of(9, id, sizeof id);
    r = find_by(rows, "id", id);
    ck_assert_ptr_nonnull(r);
    ck_assert(json_is_null(json_object_get(r, "job_id")));
    ck_assert_str_eq(json_string_value(json_object_get(r, "error_code")), "INVALID_JSON");
    /* the broker's own dead letters */
    static const char *const broker[][2] = {
        {"rej-1", "REJECTED"}, {"big-1", "MESSAGE_TOO_LARGE"}, {"poison-1", "DELIVERY_LIMIT"}};
    for (int i = 0; i < 3; i++) {
        r = find_by(rows, "job_id", broker[i][0]);
        ck_assert_msg(r != NULL, "%s not listed", broker[i][0]);
        ck_assert_str_eq(json_string_value(json_object_get(r, "error_code")), broker[i][1]);
        ck_assert_str_eq(json_string_value(json_object_get(r, "routing_key")),
                         "submit.transaction");
        ck_assert_str_eq(json_string_value(json_object_get(r, "id_source")), "content");
        ck_assert_int_eq(strncmp(json_string_value(json_object_get(r, "id")), "dx-", 3), 0);
        ck_assert_int_eq(strlen(json_string_value(json_object_get(r, "id"))), 35);
        ck_assert_ptr_nonnull(json_string_value(json_object_get(r, "failed_at")));
    }
    /* derived ids are stable although every read raises x-delivery-count */
    ck_assert_int_eq(DLQ(&out2, "list", "--json"), 0);
    rows2 = json_lines(out2);
    ck_assert_int_eq(json_array_size(rows2), n_expected);
    for (size_t i = 0; i < json_array_size(rows); i++)
        ck_assert_str_eq(json_string_value(json_object_get(json_array_get(rows, i), "id")),
                         json_string_value(json_object_get(json_array_get(rows2, i), "id")));
    json_decref(rows);
    json_decref(rows2);
    free(out);
    free(out2);
    ck_assert(iwt_eventually(idle, dead_q, 5000));
    /* after two full reads every message is still there, in its place */
    check_dead_order(NULL);
}
END_TEST

static int list_count(const char *const *args)
{
    char *out = NULL;
    const char *argv[16] = {"list", "--json"};
    int n = 2;
    for (int i = 0; args[i]; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    ck_assert_int_eq(dlq_env(NULL, &out, argv), 0);
    n = count_lines(out);
    free(out);
    return n;
}

#define COUNT(...) list_count((const char *const[]){__VA_ARGS__, NULL})

START_TEST(test_list_filters_and_sorting)
{
    char *out = NULL;
    json_t *rows;

    ck_assert_int_eq(COUNT("--code", "EXTERNAL_API_ERROR"), K / 6);
    ck_assert_int_eq(COUNT("--code", "external_api_error,SCHEMA_VIOLATION"), 2 * K / 6);
    ck_assert_int_eq(COUNT("--code", "EXTERNAL_API_ERROR", "--code", "DELIVERY_LIMIT"), K / 6 + 1);
    ck_assert_int_eq(COUNT("--code", "REJECTED"), 1);
    ck_assert_int_eq(COUNT("--code", "MESSAGE_TOO_LARGE"), 1);
    ck_assert_int_eq(COUNT("--code", "NO_SUCH_CODE"), 0);
    ck_assert_int_eq(COUNT("--routing-key", "submit.refund"), K / 6);
    ck_assert_int_eq(COUNT("--routing-key", "resource.*"), K / 6);
    ck_assert_int_eq(COUNT("--routing-key", "submit.#"), K - K / 6 + 3);
    ck_assert_int_eq(COUNT("--routing-key", "#"), n_expected);
    ck_assert_int_eq(COUNT("--job", "job-7"), 1);
    ck_assert_int_eq(COUNT("--job", "job-7", "--job", "poison-1"), 2);
    ck_assert_int_eq(COUNT("--job", "job-7", "--code", "SCHEMA_VIOLATION"), 0);
    /* ages: 3 h, 48 h are older than 2 h; 10 s and the broker's three are newer than 1 min */
    ck_assert_int_eq(COUNT("--older-than", "2h"), 2 * K / 6);
    ck_assert_int_eq(COUNT("--older-than", "1d"), K / 6);
    ck_assert_int_eq(COUNT("--newer-than", "1m"), K / 6 + 3);
    ck_assert_int_eq(COUNT("--older-than", "20m", "--newer-than", "2h"), 2 * K / 6);
    ck_assert_int_eq(COUNT("--limit", "7"), 7);
    ck_assert_int_eq(COUNT("--limit", "7", "--code", "MISSING_REPLY_TO"), 7);

    /* --newest: dead-letter times descending; --oldest ascending */
    for (int newest = 0; newest < 2; newest++) {
        ck_assert_int_eq(DLQ(&out, "list", "--json", newest ? "--newest" : "--oldest"), 0);
        rows = json_lines(out);
        ck_assert_int_eq(json_array_size(rows), n_expected);
        for (size_t i = 1; i < json_array_size(rows); i++) {
            const char *a =
                json_string_value(json_object_get(json_array_get(rows, i - 1), "failed_at"));
            const char *b =
                json_string_value(json_object_get(json_array_get(rows, i), "failed_at"));
            ck_assert(a && b);
            ck_assert_msg(newest ? strcmp(a, b) >= 0 : strcmp(a, b) <= 0, "%s then %s", a, b);
        }
        /* newest: a broker dead letter made a moment ago; oldest: 48 h */
        json_int_t age = json_integer_value(json_object_get(json_array_get(rows, 0), "age_s"));
        if (newest)
            ck_assert_int_lt(age, 60);
        else
            ck_assert_str_eq(
                json_string_value(json_object_get(json_array_get(rows, 0), "error_code")),
                "SCHEMA_VIOLATION");
        json_decref(rows);
        free(out);
    }
    /* --limit applies after the sort */
    ck_assert_int_eq(DLQ(&out, "list", "--json", "--oldest", "--limit", "3"), 0);
    rows = json_lines(out);
    ck_assert_int_eq(json_array_size(rows), 3);
    for (size_t i = 0; i < 3; i++)
        ck_assert_str_eq(json_string_value(json_object_get(json_array_get(rows, i), "error_code")),
                         "SCHEMA_VIOLATION");
    json_decref(rows);
    free(out);

    /* usage errors: exit 2 with one line */
    ck_assert_int_eq(DLQ(NULL, "list", "--older-than", "soon"), 2);
    ck_assert_int_eq(DLQ(NULL, "list", "--limit", "0"), 2);
    ck_assert_int_eq(DLQ(NULL, "list", "--yes"), 2);
    ck_assert_int_eq(DLQ(NULL, "frobnicate"), 2);
    ck_assert(iwt_eventually(idle, dead_q, 5000));
    check_dead_order(NULL);
}
END_TEST

START_TEST(test_help_on_every_command)
{
    static const char *const cmds[] = {"list", "stats", "show", "replay", "export", "purge"};
    char *out = NULL;

    ck_assert_int_eq(DLQ(&out, "--help"), 0);
    ck_assert_ptr_nonnull(strstr(out, "replay"));
    free(out);
    for (int i = 0; i < 6; i++) {
        ck_assert_int_eq(DLQ(&out, cmds[i], "--help"), 0);
        ck_assert_ptr_nonnull(strstr(out, "usage: integration-worker dlq"));
        ck_assert_ptr_nonnull(strstr(out, cmds[i]));
        free(out);
    }
    ck_assert_int_eq(DLQ(&out, "--help"), 0);
    free(out);
    const char *top[] = {"--help", NULL};
    ck_assert_int_eq(iwt_run_worker_cmd(top, ns, 1, NULL, &out), 0);
    ck_assert_ptr_nonnull(strstr(out, "dlq"));
    free(out);
    /* a bad setting is a configuration error naming it */
    const char *bad[] = {"IW_LOG_LEVEL=loud", NULL};
    ck_assert_int_eq(dlq_env(bad, NULL, (const char *const[]){"list", NULL}), 2);
}
END_TEST

/* ---- stats and show ------------------------------------------------------- */

START_TEST(test_stats)
{
    char *out = NULL;
    json_t *rows, *r;
    size_t i;

    ck_assert_int_eq(DLQ(&out, "stats", "--json"), 0);
    rows = json_lines(out);
    int codes = 0, keys = 0;
    json_array_foreach(rows, i, r)
    {
        const char *by = json_string_value(json_object_get(r, "by"));
        const char *key = json_string_value(json_object_get(r, "key"));
        long long count = json_integer_value(json_object_get(r, "count"));
        ck_assert_ptr_nonnull(by);
        if (!strcmp(by, "total")) {
            ck_assert_int_eq(count, n_expected);
            continue;
        }
        ck_assert_ptr_nonnull(json_string_value(json_object_get(r, "oldest")));
        ck_assert_ptr_nonnull(json_string_value(json_object_get(r, "newest")));
        ck_assert(strcmp(json_string_value(json_object_get(r, "oldest")),
                         json_string_value(json_object_get(r, "newest"))) <= 0);
        if (!strcmp(by, "error_code")) {
            codes++;
            int broker = !strcmp(key, "REJECTED") || !strcmp(key, "MESSAGE_TOO_LARGE") ||
                         !strcmp(key, "DELIVERY_LIMIT");
            ck_assert_int_eq(count, broker ? 1 : K / 6);
        } else {
            ck_assert_str_eq(by, "routing_key");
            keys++;
            if (!strcmp(key, "submit.transaction"))
                ck_assert_int_eq(count, 4 * K / 6 + 3);
            else
                ck_assert_int_eq(count, K / 6);
        }
    }
    ck_assert_int_eq(codes, 9);
    ck_assert_int_eq(keys, 3);
    json_decref(rows);
    free(out);

    ck_assert_int_eq(DLQ(&out, "stats", "--code", "EXTERNAL_API_ERROR"), 0);
    ck_assert_ptr_nonnull(strstr(out, "EXTERNAL_API_ERROR"));
    ck_assert_ptr_null(strstr(out, "SCHEMA_VIOLATION"));
    ck_assert_ptr_nonnull(strstr(out, "TOTAL"));
    free(out);
    ck_assert(iwt_eventually(idle, dead_q, 5000));
    check_dead_order(NULL);
}
END_TEST

START_TEST(test_show)
{
    char *out = NULL, id[64], *list = NULL;
    json_t *j, *rows;
    char body[64];
    size_t len;

    id_of(6, id, sizeof id);
    ck_assert_int_eq(DLQ(&out, "show", id), 0);
    ck_assert_ptr_nonnull(strstr(out, "x-error-code"));
    ck_assert_ptr_nonnull(strstr(out, "EXTERNAL_API_ERROR"));
    ck_assert_ptr_nonnull(strstr(out, "x-upstream-trace"));
    ck_assert_ptr_nonnull(strstr(out, "\n  \"jobId\": \"job-6\"")); /* pretty-printed */
    free(out);

    /* a body that is not UTF-8: a hex dump, no raw byte */
    id_of(9, id, sizeof id);
    ck_assert_int_eq(DLQ(&out, "show", id), 0);
    ck_assert_ptr_nonnull(strstr(out, "hex dump"));
    ck_assert_ptr_nonnull(strstr(out, "ff fe"));
    ck_assert_ptr_null(strchr(out, '\xff'));
    free(out);
    ck_assert_int_eq(DLQ(&out, "show", id, "--json"), 0);
    j = json_loads(out, 0, NULL);
    ck_assert_ptr_nonnull(j);
    binary_body(9, body, &len);
    {
        /* base64 of the body, computed here the slow way */
        static const char b64[] =
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        char enc[128];
        size_t o = 0;
        const unsigned char *u = (const unsigned char *)body;
        for (size_t i = 0; i < len; i += 3) {
            unsigned v = (unsigned)u[i] << 16 | (i + 1 < len ? (unsigned)u[i + 1] << 8 : 0) |
                         (i + 2 < len ? u[i + 2] : 0);
            enc[o++] = b64[v >> 18 & 63];
            enc[o++] = b64[v >> 12 & 63];
            enc[o++] = i + 1 < len ? b64[v >> 6 & 63] : '=';
            enc[o++] = i + 2 < len ? b64[v & 63] : '=';
        }
        enc[o] = '\0';
        ck_assert_str_eq(json_string_value(json_object_get(j, "body_base64")), enc);
    }
    ck_assert_str_eq(
        json_string_value(json_object_get(json_object_get(j, "headers"), "x-error-code")),
        "INVALID_JSON");
    json_decref(j);
    free(out);

    /* a broker dead letter, by its derived id */
    ck_assert_int_eq(DLQ(&list, "list", "--json", "--code", "DELIVERY_LIMIT"), 0);
    rows = json_lines(list);
    ck_assert_int_eq(json_array_size(rows), 1);
    const char *did = json_string_value(json_object_get(json_array_get(rows, 0), "id"));
    ck_assert_int_eq(DLQ(&out, "show", did), 0);
    ck_assert_ptr_nonnull(strstr(out, "x-death"));
    ck_assert_ptr_nonnull(strstr(out, "delivery_limit"));
    ck_assert_ptr_nonnull(strstr(out, "poison-1"));
    free(out);
    json_decref(rows);
    free(list);

    ck_assert_int_eq(DLQ(NULL, "show", "dl-00000000000000000000000000000000"), 1);
    ck_assert_int_eq(DLQ(NULL, "show"), 2);
    ck_assert(iwt_eventually(idle, dead_q, 5000));
    check_dead_order(NULL);
}
END_TEST

/* ---- export -------------------------------------------------------------- */

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "r");
    char *buf = NULL;
    size_t len = 0;
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    len = (size_t)ftell(f);
    rewind(f);
    buf = malloc(len + 1);
    ck_assert_int_eq(fread(buf, 1, len, f), len);
    buf[len] = '\0';
    fclose(f);
    return buf;
}

static void export_label(json_t *line, char *buf, size_t len)
{
    json_t *seq = json_object_get(json_object_get(line, "headers"), "x-test-seq");
    if (json_is_integer(seq)) {
        snprintf(buf, len, "s%lld", (long long)json_integer_value(seq));
        return;
    }
    json_t *body = json_loads(json_string_value(json_object_get(line, "body")) ?: "", 0, NULL);
    snprintf(buf, len, "%s", json_string_value(json_object_get(body, "jobId")) ?: "?");
    json_decref(body);
}

START_TEST(test_export)
{
    char path[256], *text, label[64];
    json_t *lines, *l;
    size_t i;

    snprintf(path, sizeof path, "/tmp/iwtest-%s-export.jsonl", ns);
    unlink(path);
    ck_assert_int_eq(DLQ(NULL, "export", path), 0);
    text = read_file(path);
    lines = json_lines(text);
    ck_assert_int_eq(json_array_size(lines), n_expected);
    json_array_foreach(lines, i, l)
    {
        ck_assert_ptr_nonnull(json_string_value(json_object_get(l, "id")));
        ck_assert_ptr_nonnull(json_string_value(json_object_get(l, "routing_key")));
        ck_assert(json_is_object(json_object_get(l, "headers")));
        ck_assert(json_is_string(json_object_get(l, "body")) !=
                  json_is_string(json_object_get(l, "body_base64")));
        export_label(l, label, sizeof label);
        ck_assert_str_eq(label, expected[i]); /* in queue order */
    }
    l = json_array_get(lines, 3); /* seq 3: binary */
    ck_assert_ptr_nonnull(json_string_value(json_object_get(l, "body_base64")));
    l = json_array_get(lines, 0);
    ck_assert_str_eq(json_string_value(json_object_get(l, "routing_key")), "submit.transaction");
    ck_assert_ptr_nonnull(strstr(json_string_value(json_object_get(l, "body")), "\"job-0\""));
    json_decref(lines);
    free(text);
    /* an existing file is never overwritten */
    ck_assert_int_eq(DLQ(NULL, "export", path), 2);
    unlink(path);
    /* filters, and stdout */
    ck_assert_int_eq(DLQ(&text, "export", "-", "--routing-key", "resource.get"), 0);
    ck_assert_int_eq(count_lines(text), K / 6);
    free(text);
    ck_assert(iwt_eventually(idle, dead_q, 5000));
    check_dead_order(NULL);
}
END_TEST

/* ---- replay -------------------------------------------------------------- */

static char replayed[8][64];
static int n_replayed;

static int is_replayed(const char *label)
{
    for (int i = 0; i < n_replayed; i++)
        if (!strcmp(replayed[i], label))
            return 1;
    return 0;
}

START_TEST(test_replay_ids_fresh_headers_and_order)
{
    char *out = NULL, *list = NULL, id0[64], id5[64];
    iwt_msg *got[MAXMSG];
    char labels[MAXMSG][64];
    json_t *rows;

    tap_requests();
    id_of(0, id0, sizeof id0);
    id_of(5, id5, sizeof id5);
    ck_assert_int_eq(DLQ(&list, "list", "--json", "--code", "REJECTED"), 0);
    rows = json_lines(list);
    const char *rej = json_string_value(json_object_get(json_array_get(rows, 0), "id"));

    /* --dry-run moves nothing */
    ck_assert_int_eq(DLQ(&out, "replay", id0, id5, rej, "--dry-run"), 0);
    ck_assert_int_eq(count_lines(out), 4);
    free(out);
    ck_assert(iwt_eventually(idle, dead_q, 5000));
    ck_assert_int_eq(iwt_queue_depth(A, dead_q), n_expected);
    ck_assert_int_eq(iwt_queue_depth(A, tap_q), 0);

    ck_assert_int_eq(DLQ(&out, "replay", id0, id5, rej), 0);
    ck_assert_int_eq(count_lines(out), 3);
    ck_assert_ptr_nonnull(strstr(out, id0));
    free(out);
    int n = drain(tap_q, labels, got);
    ck_assert_int_eq(n, 3);
    for (int i = 0; i < n; i++) {
        iwt_msg *m = got[i];
        /* fresh attempts: none of the worker's or the broker's bookkeeping */
        static const char *const stripped[] = {"x-attempts",
                                               "x-error-code",
                                               "x-error-message",
                                               "x-http-status",
                                               "x-failed-at",
                                               "x-original-routing-key",
                                               "x-original-queue",
                                               "x-death",
                                               "iw-target",
                                               "x-due-at",
                                               "x-first-seen",
                                               "x-last-error",
                                               "x-first-death-reason",
                                               "x-first-death-queue",
                                               "x-first-death-exchange",
                                               "x-original-message-id",
                                               "x-delivery-count"};
        for (size_t k = 0; k < sizeof stripped / sizeof stripped[0]; k++)
            ck_assert_msg(!json_object_get(m->headers, stripped[k]), "%s kept on %s", stripped[k],
                          labels[i]);
        /* the dead letter's id is not the job's; the upstream's comes back */
        if (!strcmp(labels[i], "s0"))
            ck_assert_str_eq(m->message_id, "up-0");
        else
            ck_assert_str_eq(m->message_id, "");
        ck_assert_str_eq(m->routing_key, "submit.transaction");
        if (!strcmp(labels[i], "rej-1")) {
            ck_assert_str_eq(
                m->raw, "{\"jobId\":\"rej-1\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{}}");
        } else {
            /* what the upstream set survives */
            int seq = atoi(labels[i] + 1);
            char trace[64];
            snprintf(trace, sizeof trace, "trace-%d", seq);
            ck_assert_str_eq(json_string_value(json_object_get(m->headers, "x-upstream-trace")),
                             trace);
            ck_assert_str_eq(m->correlation_id, trace);
            ck_assert_str_eq(m->content_type, "application/json");
            ck_assert_int_eq(
                json_integer_value(json_object_get(json_object_get(m->body, "payload"), "n")), seq);
        }
        snprintf(replayed[n_replayed++], 64, "%.63s", labels[i]);
        iwt_msg_free(m);
    }
    ck_assert(is_replayed("s0") && is_replayed("s5") && is_replayed("rej-1"));
    /* the jobs went on to the real binding too */
    ck_assert_int_eq(iwt_queue_depth(A, submit_q), 3);
    /* a replayed id is gone; the others kept their order */
    ck_assert_int_eq(DLQ(NULL, "replay", id0), 1);
    ck_assert(iwt_eventually(idle, dead_q, 5000));
    check_dead_order(is_replayed);
    json_decref(rows);
    free(list);
}
END_TEST

START_TEST(test_replay_filters_all_and_unroutable)
{
    char *out = NULL, labels[MAXMSG][64];

    tap_requests();
    /* a filter: the 50 bad requests, and nothing else */
    ck_assert_int_eq(DLQ(&out, "replay", "--code", "EXTERNAL_API_BAD_REQUEST", "--json"), 0);
    json_t *lines = json_lines(out);
    ck_assert_int_eq(json_array_size(lines), K / 6);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(lines, 0), "result")),
                     "replayed");
    json_decref(lines);
    free(out);
    ck_assert_int_eq(iwt_queue_depth(A, tap_q), K / 6);
    ck_assert_int_eq(iwt_queue_depth(A, dead_q), n_expected - K / 6);
    /* --limit takes the first matches in queue order */
    ck_assert_int_eq(DLQ(NULL, "replay", "--routing-key", "resource.get", "--limit", "2"), 0);
    ck_assert_int_eq(iwt_queue_depth(A, tap_q), K / 6 + 2);

    /* a dead letter whose routing key no queue is bound to stays */
    publish_dead(1000, "nobody.listens");
    wait_depth(dead_q, n_expected - K / 6 - 2 + 1);
    ck_assert_int_eq(DLQ(&out, "replay", "--all"), 1);
    ck_assert_ptr_nonnull(strstr(out, "unroutable"));
    free(out);
    ck_assert(iwt_eventually(idle, dead_q, 5000));
    ck_assert_int_eq(drain(dead_q, labels, NULL), 1);
    ck_assert_str_eq(labels[0], "s1000");
    ck_assert_int_eq(iwt_queue_depth(A, tap_q), n_expected);
}
END_TEST

/* ---- purge -------------------------------------------------------------- */

static int purged(const char *label)
{
    return !strcmp(label, "poison-1") || (label[0] == 's' && atoi(label + 1) % 6 == 2);
}

START_TEST(test_purge)
{
    char path[256], *out = NULL, *text;

    snprintf(path, sizeof path, "/tmp/iwtest-%s-purge.jsonl", ns);
    unlink(path);
    /* no selection: a usage error; no --yes: a preview */
    ck_assert_int_eq(DLQ(NULL, "purge"), 2);
    ck_assert_int_eq(DLQ(&out, "purge", "--code", "SCHEMA_VIOLATION"), 0);
    ck_assert_int_eq(count_lines(out), K / 6 + 1);
    free(out);
    ck_assert(iwt_eventually(idle, dead_q, 5000));
    ck_assert_int_eq(iwt_queue_depth(A, dead_q), n_expected);

    ck_assert_int_eq(
        DLQ(NULL, "purge", "--code", "SCHEMA_VIOLATION", "--yes", "--export-file", path), 0);
    ck_assert(iwt_eventually(idle, dead_q, 5000));
    ck_assert_int_eq(iwt_queue_depth(A, dead_q), n_expected - K / 6);
    text = read_file(path);
    json_t *lines = json_lines(text);
    ck_assert_int_eq(json_array_size(lines), K / 6);
    ck_assert_str_eq(json_string_value(json_object_get(
                         json_object_get(json_array_get(lines, 0), "headers"), "x-error-code")),
                     "SCHEMA_VIOLATION");
    json_decref(lines);
    free(text);
    unlink(path);

    ck_assert_int_eq(DLQ(NULL, "purge", "--job", "poison-1", "--yes", "--no-export"), 0);
    ck_assert(iwt_eventually(idle, dead_q, 5000));
    ck_assert_int_eq(iwt_queue_depth(A, dead_q), n_expected - K / 6 - 1);
    /* the others kept their order */
    check_dead_order(purged);
    ck_assert_int_eq(DLQ(NULL, "purge", "--all", "--yes", "--no-export"), 0);
}
END_TEST

/* ---- one command at a time ------------------------------------------------ */

START_TEST(test_refuses_to_read_beside_another_reader)
{
    char lock[256];
    amqp_channel_t ch = 2;

    /* a consumer of N.dead (another reader would interleave with ours) */
    amqp_channel_open(A->conn, ch);
    ck_assert_int_eq(amqp_get_rpc_reply(A->conn).reply_type, AMQP_RESPONSE_NORMAL);
    amqp_basic_qos(A->conn, ch, 0, 1, 0);
    amqp_basic_consume(A->conn, ch, amqp_cstring_bytes(dead_q), amqp_empty_bytes, 0, 0, 0,
                       amqp_empty_table);
    ck_assert_int_eq(amqp_get_rpc_reply(A->conn).reply_type, AMQP_RESPONSE_NORMAL);
    ck_assert_int_eq(DLQ(NULL, "list"), 1);
    amqp_channel_close(A->conn, ch, AMQP_REPLY_SUCCESS);
    ck_assert(iwt_eventually(idle, dead_q, 5000));

    /* the lock of a running dlq command */
    snprintf(lock, sizeof lock, "%s.dlq-lock", ns);
    amqp_queue_declare(A->conn, 1, amqp_cstring_bytes(lock), 0, 0, 1, 1, amqp_empty_table);
    ck_assert_int_eq(amqp_get_rpc_reply(A->conn).reply_type, AMQP_RESPONSE_NORMAL);
    ck_assert_int_eq(DLQ(NULL, "list"), 1);
    amqp_queue_delete(A->conn, 1, amqp_cstring_bytes(lock), 0, 0);
    ck_assert_int_eq(amqp_get_rpc_reply(A->conn).reply_type, AMQP_RESPONSE_NORMAL);
    ck_assert_int_eq(DLQ(NULL, "list"), 0);
    ck_assert(iwt_eventually(idle, dead_q, 5000));
    check_dead_order(NULL);
}
END_TEST

/* ---- SIGKILL at every step ----------------------------------------------- */

#define KK 60 /* a smaller queue per kill point */

static int in(char labels[][64], int n, const char *label)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(labels[i], label))
            return 1;
    return 0;
}

static char left[MAXMSG][64], moved[MAXMSG][64];

/* Every expected message is still in N.dead (in order) or in `moved`. */
static void check_nothing_lost(int n_moved, const char *what)
{
    int n_left, j = 0;

    ck_assert(iwt_eventually(idle, dead_q, 10000));
    n_left = drain(dead_q, left, NULL);
    for (int i = 0; i < n_expected; i++) {
        int here = j < n_left && !strcmp(left[j], expected[i]);
        if (here)
            j++;
        ck_assert_msg(here || in(moved, n_moved, expected[i]),
                      "%s: %s is neither in %s nor moved (%d left, %d moved)", what, expected[i],
                      dead_q, n_left, n_moved);
    }
    ck_assert_msg(j == n_left, "%s: %s holds something unexpected or out of order", what, dead_q);
}

START_TEST(test_replay_killed_at_every_step)
{
    static const char *const points[] = {"read:30",     "published:1",  "published:20",
                                         "confirmed:1", "confirmed:25", "acked:1",
                                         "acked:40"};

    for (size_t p = 0; p < sizeof points / sizeof points[0]; p++) {
        char env_kill[64];
        const char *env[] = {env_kill, NULL};
        int rc;

        build(KK);
        tap_requests();
        snprintf(env_kill, sizeof env_kill, "IWTEST_DLQ_KILL_AT=%s", points[p]);
        rc = dlq_env(env, NULL, (const char *const[]){"replay", "--all", NULL});
        ck_assert_msg(rc == 128 + SIGKILL, "%s: exit %d", points[p], rc);
        check_nothing_lost(drain(tap_q, moved, NULL), points[p]);
    }
}
END_TEST

START_TEST(test_purge_killed_at_every_step)
{
    static const char *const points[] = {"read:30", "exported:1", "acked:1", "acked:33"};

    for (size_t p = 0; p < sizeof points / sizeof points[0]; p++) {
        char env_kill[64], path[256], *text;
        const char *env[] = {env_kill, NULL};
        json_t *lines, *l;
        size_t i;
        int n_moved = 0, rc;

        build(KK);
        snprintf(path, sizeof path, "/tmp/iwtest-%s-kill.jsonl", ns);
        unlink(path);
        snprintf(env_kill, sizeof env_kill, "IWTEST_DLQ_KILL_AT=%s", points[p]);
        rc = dlq_env(env, NULL,
                     (const char *const[]){"purge", "--all", "--yes", "--export-file", path, NULL});
        ck_assert_msg(rc == 128 + SIGKILL, "%s: exit %d", points[p], rc);
        if (access(path, F_OK) == 0) {
            text = read_file(path);
            /* a kill while writing may cut the last line: only whole lines count */
            char *end = strrchr(text, '\n');
            if (end)
                end[1] = '\0';
            else
                text[0] = '\0';
            lines = json_lines(text);
            json_array_foreach(lines, i, l)
            {
                export_label(l, moved[n_moved], 64);
                n_moved++;
            }
            json_decref(lines);
            free(text);
            unlink(path);
        }
        check_nothing_lost(n_moved, points[p]);
    }
}
END_TEST

/* ---- replay through a real worker ------------------------------------------ */

static long posts(json_t *st)
{
    const char *k;
    json_t *v;
    long n = 0;
    json_object_foreach(
        json_object_get(json_object_get(st, "requests"), "POST /api/v1/external-resource"), k, v)
        n += (long)json_integer_value(v);
    return n;
}

/* A job the provider accepted that later sits in N.dead (here: put there by
 * hand with the worker's headers) and is replayed: the submitter sees its
 * accepted record and publishes the recorded outcome again without a second
 * POST. */
START_TEST(test_replay_of_an_accepted_job_is_not_submitted_twice)
{
    static const char job[] =
        "{\"jobId\":\"acc-1\",\"userId\":\"u\",\"action\":\"transaction\",\"payload\":{}}";
    char ex[256], id[64], failed_at[40];
    iwt_amqp *tap = iwt_amqp_open();
    int port;
    pid_t mock, worker;
    iwt_msg *ev;
    json_t *st;

    ns = iwt_namespace("dlq-e2e");
    snprintf(dead_q, sizeof dead_q, "%s.dead", ns);
    A = iwt_amqp_open();
    iwt_cleanup(ns);
    iwt_declare(ns);
    iwt_tap_events(tap, ns, "submission.*");
    mock = iwt_start_mock(NULL, &port);
    worker = iwt_start_worker("submitter", ns, port, NULL, "dlq-e2e");
    /* a job the worker dead-letters itself carries its "dl-" message_id */
    iwt_publish_job(A, ns, "{\"jobId\":\"bad-1\",\"userId\":\"u\",\"action\":\"a\"}");
    wait_depth(dead_q, 1);
    char *out = NULL;
    ck_assert_int_eq(dlq_env(NULL, &out, (const char *const[]){"list", "--json", NULL}), 0);
    json_t *rows = json_lines(out);
    json_t *r = json_array_get(rows, 0);
    ck_assert_int_eq(json_array_size(rows), 1);
    const char *wid = json_string_value(json_object_get(r, "id"));
    ck_assert_int_eq(strlen(wid), 35);
    ck_assert_int_eq(strncmp(wid, "dl-", 3), 0);
    ck_assert_int_eq(strspn(wid + 3, "0123456789abcdef"), 32);
    ck_assert_str_eq(json_string_value(json_object_get(r, "id_source")), "message_id");
    ck_assert_str_eq(json_string_value(json_object_get(r, "error_code")), "SCHEMA_VIOLATION");
    ck_assert_str_eq(json_string_value(json_object_get(r, "job_id")), "bad-1");
    ck_assert_str_eq(json_string_value(json_object_get(r, "routing_key")), "submit.transaction");
    ck_assert_int_eq(json_integer_value(json_object_get(r, "attempts")), 0);
    ck_assert_int_eq(
        dlq_env(NULL, NULL, (const char *const[]){"purge", wid, "--yes", "--no-export", NULL}), 0);
    json_decref(rows);
    free(out);
    ck_assert(iwt_eventually(idle, dead_q, 5000));
    ck_assert_int_eq(iwt_queue_depth(A, dead_q), 0);

    iwt_publish_job(A, ns, job);
    ev = iwt_wait_event(tap, "submission.accepted", "acc-1", 20000);
    ck_assert_ptr_nonnull(ev);
    iwt_msg_free(ev);

    /* the same job as a dead letter */
    amqp_table_entry_t h[] = {
        s_entry("x-error-code", "EXTERNAL_API_ERROR"), i_entry("x-attempts", 4),
        s_entry("x-original-routing-key", "submit.transaction"), s_entry("x-failed-at", failed_at)};
    amqp_basic_properties_t p;
    format_timestamp(clock_wall_ms(), failed_at, sizeof failed_at);
    id_of(77, id, sizeof id);
    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_HEADERS_FLAG |
               AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG;
    p.delivery_mode = 2;
    p.message_id = amqp_cstring_bytes(id);
    p.content_type = amqp_cstring_bytes("application/json");
    p.headers.num_entries = 4;
    p.headers.entries = h;
    snprintf(ex, sizeof ex, "%s.dlx", ns);
    ck_assert_int_eq(amqp_basic_publish(A->conn, 1, amqp_cstring_bytes(ex),
                                        amqp_cstring_bytes("submit.transaction"), 0, 0, &p,
                                        amqp_cstring_bytes(job)),
                     AMQP_STATUS_OK);
    wait_depth(dead_q, 1);

    ck_assert_int_eq(dlq_env(NULL, NULL, (const char *const[]){"replay", id, NULL}), 0);
    ev = iwt_wait_event(tap, "submission.accepted", "acc-1", 20000);
    ck_assert_msg(ev != NULL, "the replayed job got no outcome");
    iwt_msg_free(ev);
    ck_assert_int_eq(iwt_queue_depth(A, dead_q), 0);
    st = iwt_mock_stats(port);
    ck_assert_int_eq(json_integer_value(json_object_get(st, "submissions_created")), 1);
    ck_assert_int_eq(posts(st), 1);
    json_decref(st);

    ck_assert_int_eq(iwt_stop(worker, SIGTERM), 0);
    iwt_stop(mock, SIGTERM);
    iwt_amqp_close(tap);
    iwt_amqp_close(A);
    A = NULL;
    iwt_cleanup(ns);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("dlq");
    TCase *tc = tcase_create("dlq");
    tcase_set_timeout(tc, 240);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_list_table_json_and_order);
    tcase_add_test(tc, test_list_filters_and_sorting);
    tcase_add_test(tc, test_help_on_every_command);
    tcase_add_test(tc, test_stats);
    tcase_add_test(tc, test_show);
    tcase_add_test(tc, test_export);
    tcase_add_test(tc, test_replay_ids_fresh_headers_and_order);
    tcase_add_test(tc, test_replay_filters_all_and_unroutable);
    tcase_add_test(tc, test_purge);
    tcase_add_test(tc, test_refuses_to_read_beside_another_reader);
    tcase_add_test(tc, test_replay_killed_at_every_step);
    tcase_add_test(tc, test_purge_killed_at_every_step);
    suite_add_tcase(s, tc);
    TCase *e2e = tcase_create("worker");
    tcase_set_timeout(e2e, 120);
    tcase_add_test(e2e, test_replay_of_an_accepted_job_is_not_submitted_twice);
    suite_add_tcase(s, e2e);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
