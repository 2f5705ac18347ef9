/* Integration suite of the submit path: real RabbitMQ and Redis on loopback,
 * a real mock-provider per scenario, and `integration-worker submitter`
 * processes started as an operator would.  Every scenario works in its own
 * namespace (t-<name>-<pid>) and removes it at the end; independent
 * scenarios of one test run side by side to keep the suite short.
 *
 * Timings are read from the worker's own log lines (one JSON line per
 * provider call, stamped in wall-clock milliseconds), never from sleeps. */
#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "iwtest.h"
#include "schema.h"
#include "topology.h"

#define ROUTE "POST /api/v1/external-resource"
#define MAX_CALLS 64

/* ---- links and scenarios ------------------------------------------------------ */

static iwt_amqp *tap; /* consumes the events of every namespace of the test */
static iwt_amqp *ctl; /* publishes, basic.get, queue depths */

/* Namespaces are recorded with iwt_ns_remember and removed by the runner
 * when a failed test could not (iwt_ns_remove_leftovers). */

static void open_links(void)
{
    tap = iwt_amqp_open();
    ctl = iwt_amqp_open();
}

static void close_links(void)
{
    iwt_amqp_close(tap);
    iwt_amqp_close(ctl);
    tap = ctl = NULL;
    /* the test passed: each scen_finish removed its namespace already */
    iwt_ns_forget();
}

typedef struct scen {
    char ns[128];
    int port;
    pid_t mock;
} scen;

/* Declares the namespace, taps its events and starts its own mock-provider
 * (mock_args NULL-terminated, may be NULL). */
static void scen_init(scen *s, const char *name, const char *const *mock_args)
{
    memset(s, 0, sizeof *s);
    snprintf(s->ns, sizeof s->ns, "%s", iwt_namespace(name));
    iwt_ns_remember(s->ns);
    iwt_declare(s->ns);
    iwt_tap_events(tap, s->ns, "#");
    s->mock = iwt_start_mock(mock_args, &s->port);
}

static pid_t start_submitter(const scen *s, const char *const *env, const char *tag)
{
    return iwt_start_worker("submitter", s->ns, s->port, env, tag ? tag : "submitter");
}

/* Stops a worker gracefully and expects exit code 0. */
static void stop_worker(pid_t pid)
{
    ck_assert_int_eq(iwt_stop(pid, SIGTERM), 0);
}

static void scen_finish(scen *s)
{
    if (s->mock > 0)
        ck_assert_int_eq(iwt_stop(s->mock, SIGTERM), 0);
    iwt_cleanup(s->ns);
    iwt_remove_logs(s->ns);
}

/* ---- jobs ---------------------------------------------------------------------- */

/* A valid job; hooks (JSON text, may be NULL) become payload.mock. */
static char *job_json(const char *id, const char *hooks)
{
    json_t *payload = json_pack("{s:i, s:s, s:{s:s}}", "amount", 5, "currency", "EUR", "meta",
                                "note", "caf\xc3\xa9");
    if (hooks) {
        json_t *h = json_loads(hooks, 0, NULL);
        ck_assert_ptr_nonnull(h);
        json_object_set_new(payload, "mock", h);
    }
    json_t *j = json_pack("{s:s, s:s, s:s, s:o}", "jobId", id, "userId", "user-42", "action",
                          "transaction", "payload", payload);
    char *text = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    return text;
}

static void publish(const scen *s, const char *body)
{
    iwt_publish_job(ctl, s->ns, body);
}

/* Publishes job_json(id, hooks) and returns the body (caller frees). */
static char *publish_job(const scen *s, const char *id, const char *hooks)
{
    char *body = job_json(id, hooks);
    publish(s, body);
    return body;
}

static char *queue_name(const scen *s, const char *suffix, char *buf, size_t len)
{
    snprintf(buf, len, "%s.%s", s->ns, suffix);
    return buf;
}

static int depth(const scen *s, const char *suffix)
{
    char q[256];
    return iwt_queue_depth(ctl, queue_name(s, suffix, q, sizeof q));
}

/* Messages waiting anywhere on the submit path: the queue and every delay
 * tier (status checks pass through the tiers too, for IW_POLL_SCHEDULE). */
static int pending_submit_path(const scen *s)
{
    int n = depth(s, "submit");
    for (int k = 0; k < IW_DELAY_TIERS; k++) {
        char suffix[64];
        snprintf(suffix, sizeof suffix, "delay.%ld", topology_tier_ms(k));
        n += depth(s, suffix);
    }
    return n;
}

static long mock_posts(const scen *s);

/* Nothing is left that could call the provider again: the submit queue and
 * the delay tiers drain (a status check leaves its tier within 1 s), and the
 * provider saw exactly `posts` submissions meanwhile. */
static void assert_settled(const scen *s, long posts)
{
    long long deadline = iwt_now_ms() + 3000;
    int n;
    while ((n = pending_submit_path(s)) > 0 && iwt_now_ms() < deadline)
        iwt_sleep_ms(50);
    ck_assert_msg(n == 0, "%d message(s) still waiting on the submit path of %s", n, s->ns);
    ck_assert_int_eq(mock_posts(s), posts);
}

/* ---- mock statistics ------------------------------------------------------------- */

static long stat_num(json_t *st, const char *key)
{
    json_t *v = json_object_get(st, key);
    return json_is_integer(v) ? (long)json_integer_value(v) : -1;
}

static long posts(json_t *st)
{
    const char *k;
    json_t *v;
    long n = 0;
    json_object_foreach(json_object_get(json_object_get(st, "requests"), ROUTE), k, v) n +=
        (long)json_integer_value(v);
    return n;
}

static long mock_posts(const scen *s)
{
    json_t *st = iwt_mock_stats(s->port);
    long n = posts(st);
    json_decref(st);
    return n;
}

static long mock_in_flight(const scen *s)
{
    json_t *st = iwt_mock_stats(s->port);
    long n = stat_num(st, "in_flight");
    json_decref(st);
    return n;
}

static void wait_in_flight(const scen *s, long n, int timeout_ms)
{
    long long deadline = iwt_now_ms() + timeout_ms;
    long cur;
    while ((cur = mock_in_flight(s)) < n && iwt_now_ms() < deadline)
        iwt_sleep_ms(20);
    ck_assert_msg(cur >= n, "mock in_flight %ld, waited for %ld", cur, n);
}

/* ---- worker logs ------------------------------------------------------------------- */

static char *log_path(const scen *s, const char *tag, char *buf, size_t len)
{
    snprintf(buf, len, "%s/iwtest-%s-%s.log", iwt_log_dir(), s->ns, tag ? tag : "submitter");
    return buf;
}

static int log_contains(const scen *s, const char *tag, const char *needle)
{
    char path[512], line[65536];
    int found = 0;
    FILE *f = fopen(log_path(s, tag, path, sizeof path), "r");
    if (!f)
        return 0;
    while (!found && fgets(line, sizeof line, f))
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

/* Waits until the broker counts n consumers on the scenario's submit queue. */
static void wait_consumers(const scen *s, int n)
{
    char q[256];
    queue_name(s, "submit", q, sizeof q);
    ck_assert_msg(IWT_EVENTUALLY(iwt_queue_consumers(ctl, q) >= n, 10000),
                  "%d consumer(s) of %s, want %d", iwt_queue_consumers(ctl, q), q, n);
}

static long long parse_ts(const char *ts)
{
    struct tm tm;
    int ms = 0;
    memset(&tm, 0, sizeof tm);
    if (!ts || sscanf(ts, "%d-%d-%dT%d:%d:%d.%dZ", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
                      &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &ms) != 7)
        return -1;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    return (long long)timegm(&tm) * 1000 + ms;
}

typedef struct call_rec {
    long long at_ms; /* wall clock of the log line (the response) */
    long status;     /* 0: no HTTP response */
    int attempt;
} call_rec;

/* The provider calls of one job as the worker logged them, in order. */
static int read_calls(const scen *s, const char *tag, const char *job_id, call_rec *out)
{
    json_t *lines = iwt_worker_log(s->ns, tag ? tag : "submitter"), *j;
    size_t i;
    int n = 0;

    json_array_foreach(lines, i, j)
    {
        const char *rid = json_string_value(json_object_get(j, "requestId"));
        const char *op = json_string_value(json_object_get(j, "operation"));
        if (n < MAX_CALLS && rid && op && strcmp(rid, job_id) == 0 &&
            strcmp(op, "POST /external-resource") == 0 &&
            json_is_integer(json_object_get(j, "attempt"))) {
            out[n].at_ms = parse_ts(json_string_value(json_object_get(j, "timestamp")));
            out[n].status = (long)json_integer_value(json_object_get(j, "status"));
            out[n].attempt = (int)json_integer_value(json_object_get(j, "attempt"));
            ck_assert_int_gt(out[n].at_ms, 0);
            n++;
        }
    }
    json_decref(lines);
    return n;
}

/* read_calls, waiting (up to 2 s) for at least `want` lines: a worker writes
 * its log once per loop turn, after that turn's publishes. */
static int wait_calls(const scen *s, const char *tag, const char *job_id, call_rec *out, int want)
{
    long long deadline = iwt_now_ms() + 2000;
    int n;
    while ((n = read_calls(s, tag, job_id, out)) < want && iwt_now_ms() < deadline)
        iwt_sleep_ms(20);
    return n;
}

/* ---- events and dead letters --------------------------------------------------------- */

static void validate(const char *schema_file, const json_t *doc)
{
    char path[512];
    iw_error err = {0};
    snprintf(path, sizeof path, "%s/schemas/%s", IW_SOURCE_DIR, schema_file);
    iw_schema *sc = schema_load_file(path, &err);
    ck_assert_msg(sc != NULL, "schema %s: %s", schema_file, err.msg);
    ck_assert_msg(schema_validate(sc, doc, &err) == IW_OK, "%s: %s", schema_file, err.msg);
    schema_free(sc);
}

static int is_timestamp(const char *s)
{
    long long t = parse_ts(s);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return t > 0 && llabs(t - (long long)now.tv_sec * 1000) < 600000 && strlen(s) >= 20;
}

static iwt_msg *wait_ev(const char *rk, const char *id, int timeout_ms)
{
    iwt_msg *m = iwt_wait_event(tap, rk, id, timeout_ms);
    ck_assert_msg(m != NULL, "no %s for %s within %d ms", rk, id, timeout_ms);
    return m;
}

static const char *body_str(const iwt_msg *m, const char *key)
{
    return json_string_value(json_object_get(m->body, key));
}

/* Events until one whose body names job_id (correlation_id aside). */
static iwt_msg *wait_body_event(const char *job_id, int timeout_ms)
{
    long long deadline = iwt_now_ms() + timeout_ms;
    while (iwt_now_ms() < deadline) {
        iwt_msg *m = iwt_next_event(tap, (int)(deadline - iwt_now_ms()));
        if (!m)
            continue;
        if (m->body && body_str(m, "jobId") && strcmp(body_str(m, "jobId"), job_id) == 0)
            return m;
        iwt_msg_free(m);
    }
    return NULL;
}

static void check_accepted(const iwt_msg *m, const char *id)
{
    ck_assert_str_eq(m->routing_key, "submission.accepted");
    ck_assert_str_eq(m->correlation_id, id);
    ck_assert_str_eq(m->content_type, "application/json");
    ck_assert_ptr_nonnull(m->body);
    validate("submission-accepted.schema.json", m->body);
    ck_assert_str_eq(body_str(m, "jobId"), id);
    ck_assert_ptr_nonnull(body_str(m, "externalId"));
    ck_assert_ptr_nonnull(body_str(m, "trackingId"));
    ck_assert_ptr_nonnull(body_str(m, "status"));
    ck_assert_msg(is_timestamp(body_str(m, "acceptedAt")), "acceptedAt %s",
                  body_str(m, "acceptedAt"));
}

static iwt_msg *expect_accepted(const char *id, int timeout_ms)
{
    iwt_msg *m = wait_ev("submission.accepted", id, timeout_ms);
    check_accepted(m, id);
    return m;
}

/* submission.failed of job id; status <= 0: statusCode null. */
static void expect_failed(const char *id, const char *code, long status, int attempt,
                          int timeout_ms)
{
    iwt_msg *m = wait_ev("submission.failed", id, timeout_ms);
    ck_assert_str_eq(m->correlation_id, id);
    ck_assert_str_eq(m->content_type, "application/json");
    ck_assert_ptr_nonnull(m->body);
    validate("submission-failed.schema.json", m->body);
    ck_assert_str_eq(body_str(m, "jobId"), id);
    json_t *e = json_object_get(m->body, "error");
    ck_assert_str_eq(json_string_value(json_object_get(e, "code")), code);
    ck_assert_msg(json_string_length(json_object_get(e, "message")) > 0, "empty error message");
    if (status > 0)
        ck_assert_int_eq(json_integer_value(json_object_get(e, "statusCode")), status);
    else
        ck_assert(json_is_null(json_object_get(e, "statusCode")));
    ck_assert_int_eq(json_integer_value(json_object_get(e, "retryAttempt")), attempt);
    iwt_msg_free(m);
}

typedef struct dead_set {
    iwt_msg *m[64];
    int n;
} dead_set;

static void dead_fetch(dead_set *d, const scen *s, int want, int timeout_ms)
{
    char q[256];
    long long deadline = iwt_now_ms() + timeout_ms;
    queue_name(s, "dead", q, sizeof q);
    while (d->n < want && d->n < 64) {
        long long left = deadline - iwt_now_ms();
        iwt_msg *m = iwt_get(ctl, q, (int)(left > 0 ? left : 1));
        if (!m)
            break;
        d->m[d->n++] = m;
    }
    ck_assert_msg(d->n >= want, "%d dead letters in %s, expected %d", d->n, q, want);
}

static void dead_free(dead_set *d)
{
    for (int i = 0; i < d->n; i++)
        iwt_msg_free(d->m[i]);
    d->n = 0;
}

/* The dead letter whose body is exactly `body`. */
static const iwt_msg *dead_find(const dead_set *d, const char *body, size_t len)
{
    for (int i = 0; i < d->n; i++)
        if (d->m[i]->raw_len == len && memcmp(d->m[i]->raw, body, len) == 0)
            return d->m[i];
    ck_abort_msg("no dead letter with the original body %.80s", body);
    return NULL;
}

static const char *hdr_str(const iwt_msg *m, const char *name)
{
    return json_string_value(json_object_get(m->headers, name));
}

/* The contract's dead-letter headers; http_status <= 0: x-http-status absent;
 * attempts < 0: not checked. */
static const iwt_msg *expect_dead(const dead_set *d, const scen *s, const char *body,
                                  const char *code, long http_status, int attempts)
{
    char q[256];
    const iwt_msg *m = dead_find(d, body, strlen(body));
    json_t *h = m->headers;

    ck_assert_str_eq(hdr_str(m, "x-error-code"), code);
    ck_assert_msg(json_string_length(json_object_get(h, "x-error-message")) > 0,
                  "x-error-message missing");
    if (http_status > 0)
        ck_assert_int_eq(json_integer_value(json_object_get(h, "x-http-status")), http_status);
    else
        ck_assert_ptr_null(json_object_get(h, "x-http-status"));
    ck_assert_msg(json_is_integer(json_object_get(h, "x-attempts")), "x-attempts missing");
    if (attempts >= 0)
        ck_assert_int_eq(json_integer_value(json_object_get(h, "x-attempts")), attempts);
    ck_assert_str_eq(hdr_str(m, "x-original-routing-key"), "submit.transaction");
    ck_assert_str_eq(hdr_str(m, "x-original-queue"), queue_name(s, "submit", q, sizeof q));
    ck_assert_msg(is_timestamp(hdr_str(m, "x-failed-at")), "x-failed-at %s",
                  hdr_str(m, "x-failed-at"));
    /* internal routing headers do not leak into the dead letter */
    ck_assert_ptr_null(json_object_get(h, "iw-target"));
    ck_assert_ptr_null(json_object_get(h, "x-due-at"));
    ck_assert_ptr_null(json_object_get(h, "x-death"));
    return m;
}

/* ---- a capturing provider (to see the outbound request itself) ------------------------- */

typedef struct capture {
    int fd;
    int port;
    pthread_mutex_t lock;
    int n;
    char request[16384]; /* request line and headers of the first POST */
    char body[16384];
} capture;

static capture cap;

static void *capture_main(void *ud)
{
    capture *c = ud;
    for (;;) {
        int conn = accept(c->fd, NULL, NULL);
        char buf[32768];
        size_t len = 0;
        char *hend = NULL;
        if (conn < 0)
            return NULL;
        while (len < sizeof buf - 1 && !(hend = strstr(buf, "\r\n\r\n"))) {
            ssize_t r = read(conn, buf + len, sizeof buf - 1 - len);
            if (r <= 0)
                break;
            len += (size_t)r;
            buf[len] = '\0';
        }
        if (!hend) {
            close(conn);
            continue;
        }
        size_t head = (size_t)(hend + 4 - buf), clen = 0;
        const char *cl = strcasestr(buf, "\r\nContent-Length:");
        if (cl)
            clen = strtoul(cl + 17, NULL, 10);
        if (strcasestr(buf, "\r\nExpect: 100-continue") && len == head)
            (void)!write(conn, "HTTP/1.1 100 Continue\r\n\r\n", 25);
        while (len < head + clen && len < sizeof buf - 1) {
            ssize_t r = read(conn, buf + len, sizeof buf - 1 - len);
            if (r <= 0)
                break;
            len += (size_t)r;
        }
        buf[len] = '\0';
        pthread_mutex_lock(&c->lock);
        int n = ++c->n;
        if (n == 1) {
            snprintf(c->request, sizeof c->request, "%.*s", (int)head, buf);
            snprintf(c->body, sizeof c->body, "%.*s", (int)(len - head), buf + head);
        }
        pthread_mutex_unlock(&c->lock);
        char body[256], resp[512];
        snprintf(body, sizeof body,
                 "{\"id\":\"cap-%d\",\"status\":\"pending\",\"message\":\"queued\","
                 "\"trackingId\":\"cap-track-%d\"}",
                 n, n);
        int rl = snprintf(resp, sizeof resp,
                          "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                          "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                          strlen(body), body);
        (void)!write(conn, resp, (size_t)rl);
        close(conn);
    }
}

static int capture_start(void)
{
    struct sockaddr_in a;
    socklen_t alen = sizeof a;
    pthread_t th;

    memset(&cap, 0, sizeof cap);
    pthread_mutex_init(&cap.lock, NULL);
    cap.fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(cap.fd, 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(cap.fd, (struct sockaddr *)&a, sizeof a), 0);
    ck_assert_int_eq(listen(cap.fd, 16), 0);
    ck_assert_int_eq(getsockname(cap.fd, (struct sockaddr *)&a, &alen), 0);
    cap.port = ntohs(a.sin_port);
    ck_assert_int_eq(pthread_create(&th, NULL, capture_main, &cap), 0);
    pthread_detach(th);
    return cap.port;
}

/* The value of header name in the captured request, or NULL. */
static char *captured_header(const char *name, char *out, size_t len)
{
    char needle[128];
    snprintf(needle, sizeof needle, "\r\n%s:", name);
    const char *p = strcasestr(cap.request, needle);
    if (!p)
        return NULL;
    p += strlen(needle);
    while (*p == ' ')
        p++;
    size_t n = strcspn(p, "\r\n");
    snprintf(out, len, "%.*s", (int)n, p);
    return out;
}

/* ---- 1. success ----------------------------------------------------------------------------- */

START_TEST(test_accepted)
{
    scen a, b;
    char hv[512];
    const char *const env_b[] = {"IW_CLIENT_ID=iw-test-client", NULL};

    open_links();
    scen_init(&a, "sub-ok", NULL);
    scen_init(&b, "sub-body", NULL);
    /* b talks to a capturing stand-in instead of the mock */
    b.port = capture_start();
    pid_t wa = start_submitter(&a, NULL, NULL);
    pid_t wb = start_submitter(&b, env_b, NULL);

    char *ja = publish_job(&a, "ok-1", NULL);
    char *jb = publish_job(&b, "body-1", NULL);

    iwt_msg *ea = expect_accepted("ok-1", 15000);
    long long accepted_at = iwt_now_ms();
    ck_assert_msg(strncmp(body_str(ea, "externalId"), "res-", 4) == 0, "externalId %s",
                  body_str(ea, "externalId"));
    ck_assert_msg(strncmp(body_str(ea, "trackingId"), "track-", 6) == 0, "trackingId %s",
                  body_str(ea, "trackingId"));
    ck_assert_str_eq(body_str(ea, "status"), "pending");
    json_t *st = iwt_mock_stats(a.port);
    ck_assert_int_eq(iwt_stat(st, ROUTE, "201"), 1);
    ck_assert_int_eq(posts(st), 1);
    ck_assert_int_eq(stat_num(st, "submissions_created"), 1);
    ck_assert_int_eq(stat_num(st, "duplicates_refused"), 0);
    json_decref(st);

    /* the first status check waits IW_POLL_SCHEDULE (1 s) in a delay tier, then
     * lands in <ns>.status (no poller runs here) */
    ck_assert_int_eq(depth(&a, "status"), 0);
    IWT_EVENTUALLY(depth(&a, "status") >= 1, 5000);
    ck_assert_int_eq(depth(&a, "status"), 1);
    ck_assert_msg(iwt_now_ms() - accepted_at >= 800, "status check after %lld ms",
                  iwt_now_ms() - accepted_at);
    char q[256];
    iwt_msg *chk = iwt_get(ctl, queue_name(&a, "status", q, sizeof q), 1000);
    ck_assert_ptr_nonnull(chk);
    ck_assert_ptr_nonnull(chk->body);
    validate("status-check.schema.json", chk->body);
    ck_assert_str_eq(chk->correlation_id, "ok-1");
    ck_assert_str_eq(body_str(chk, "jobId"), "ok-1");
    ck_assert_str_eq(body_str(chk, "trackingId"), body_str(ea, "trackingId"));
    ck_assert_str_eq(body_str(chk, "externalId"), body_str(ea, "externalId"));
    ck_assert_str_eq(body_str(chk, "acceptedAt"), body_str(ea, "acceptedAt"));
    ck_assert_int_eq(json_integer_value(json_object_get(chk->body, "checks")), 0);
    ck_assert_str_eq(body_str(chk, "priority"), "normal");
    iwt_msg_free(chk);

    /* the same job again (an upstream duplicate): answered from the Redis record,
     * same ids, no second provider call */
    publish(&a, ja);
    iwt_msg *again = expect_accepted("ok-1", 10000);
    ck_assert_str_eq(body_str(again, "externalId"), body_str(ea, "externalId"));
    ck_assert_str_eq(body_str(again, "trackingId"), body_str(ea, "trackingId"));
    ck_assert_int_eq(mock_posts(&a), 1);
    iwt_msg_free(again);
    iwt_msg_free(ea);

    /* the outbound request itself, as the capturing provider saw it */
    iwt_msg *eb = expect_accepted("body-1", 15000);
    ck_assert_str_eq(body_str(eb, "externalId"), "cap-1");
    ck_assert_str_eq(body_str(eb, "trackingId"), "cap-track-1");
    iwt_msg_free(eb);
    pthread_mutex_lock(&cap.lock);
    ck_assert_int_eq(cap.n, 1);
    ck_assert_msg(strncmp(cap.request, "POST /api/v1/external-resource HTTP/1.1\r\n", 41) == 0,
                  "request line: %.60s", cap.request);
    ck_assert_str_eq(captured_header("Idempotency-Key", hv, sizeof hv), "body-1");
    ck_assert_str_eq(captured_header("X-API-Key", hv, sizeof hv), "test-key-xxxxx");
    ck_assert_str_eq(captured_header("X-API-Secret", hv, sizeof hv), "test-secret-xxxxx");
    ck_assert_ptr_nonnull(captured_header("Content-Type", hv, sizeof hv));
    ck_assert_msg(strncasecmp(hv, "application/json", 16) == 0, "Content-Type %s", hv);
    json_t *out = json_loads(cap.body, 0, NULL);
    pthread_mutex_unlock(&cap.lock);
    ck_assert_ptr_nonnull(out);
    validate("provider-submit-request.schema.json", out);
    ck_assert_uint_eq(json_object_size(out), 4);
    json_t *job = json_loads(jb, 0, NULL);
    ck_assert_str_eq(json_string_value(json_object_get(out, "user_id")), "user-42");
    ck_assert_str_eq(json_string_value(json_object_get(out, "action_type")), "transaction");
    ck_assert(json_equal(json_object_get(out, "request_data"), json_object_get(job, "payload")));
    json_t *ci = json_object_get(out, "client_info");
    ck_assert_uint_eq(json_object_size(ci), 2);
    ck_assert_str_eq(json_string_value(json_object_get(ci, "client_id")), "iw-test-client");
    ck_assert_msg(is_timestamp(json_string_value(json_object_get(ci, "timestamp"))),
                  "client_info.timestamp %s", json_string_value(json_object_get(ci, "timestamp")));
    json_decref(job);
    json_decref(out);

    stop_worker(wa);
    stop_worker(wb);
    free(ja);
    free(jb);
    scen_finish(&a);
    scen_finish(&b);
    close_links();
}
END_TEST

/* ---- 2. 4xx: no retry --------------------------------------------------------------------------
 */

START_TEST(test_client_errors_not_retried)
{
    scen a, k;
    static const struct {
        const char *id;
        int status;
        const char *code;
    } cases[] = {{"e400", 400, "EXTERNAL_API_BAD_REQUEST"},
                 {"e401", 401, "EXTERNAL_API_UNAUTHORIZED"},
                 {"e403", 403, "EXTERNAL_API_FORBIDDEN"},
                 {"e404", 404, "EXTERNAL_API_NOT_FOUND"}};
    char *bodies[4];
    const char *const wrong_key[] = {"IW_API_KEY=not-the-key", NULL};

    open_links();
    scen_init(&a, "sub-4xx", NULL);
    scen_init(&k, "sub-401", NULL);
    pid_t wa = start_submitter(&a, NULL, NULL);
    pid_t wk = start_submitter(&k, wrong_key, NULL);
    for (int i = 0; i < 4; i++) {
        char hooks[64];
        snprintf(hooks, sizeof hooks, "{\"fail_always\":%d}", cases[i].status);
        bodies[i] = publish_job(&a, cases[i].id, hooks);
    }
    /* a real 401: the worker's API key is wrong */
    char *kb = publish_job(&k, "e401-real", NULL);

    for (int i = 0; i < 4; i++)
        expect_failed(cases[i].id, cases[i].code, cases[i].status, 1, 15000);
    expect_failed("e401-real", "EXTERNAL_API_UNAUTHORIZED", 401, 1, 15000);

    dead_set d = {0}, dk = {0};
    dead_fetch(&d, &a, 4, 5000);
    for (int i = 0; i < 4; i++)
        expect_dead(&d, &a, bodies[i], cases[i].code, cases[i].status, 1);
    dead_fetch(&dk, &k, 1, 5000);
    expect_dead(&dk, &k, kb, "EXTERNAL_API_UNAUTHORIZED", 401, 1);

    /* exactly one POST each, and nothing left that could retry */
    json_t *st = iwt_mock_stats(a.port);
    for (int i = 0; i < 4; i++) {
        char code[8];
        snprintf(code, sizeof code, "%d", cases[i].status);
        ck_assert_int_eq(iwt_stat(st, ROUTE, code), 1);
    }
    ck_assert_int_eq(posts(st), 4);
    json_decref(st);
    st = iwt_mock_stats(k.port);
    ck_assert_int_eq(iwt_stat(st, ROUTE, "401"), 1);
    ck_assert_int_eq(posts(st), 1);
    json_decref(st);
    assert_settled(&a, 4);
    assert_settled(&k, 1);
    ck_assert_int_eq(depth(&a, "dead"), 0);
    /* no event besides the failures */
    ck_assert_int_eq(iwt_count_events(tap, "submission.accepted", NULL, 300), 0);

    dead_free(&d);
    dead_free(&dk);
    for (int i = 0; i < 4; i++)
        free(bodies[i]);
    free(kb);
    stop_worker(wa);
    stop_worker(wk);
    scen_finish(&a);
    scen_finish(&k);
    close_links();
}
END_TEST

/* ---- 3. 5xx: retried on schedule, then dead-lettered
 * ---------------------------------------------- */

static void expect_gaps(const call_rec *c, int n, const long *min_gap, long slack, const char *what)
{
    for (int i = 1; i < n; i++) {
        long long gap = c[i].at_ms - c[i - 1].at_ms;
        ck_assert_msg(gap >= min_gap[i - 1] && gap <= min_gap[i - 1] + slack,
                      "%s: gap before attempt %d is %lld ms, expected %ld..%ld", what, i + 1, gap,
                      min_gap[i - 1], min_gap[i - 1] + slack);
        ck_assert_int_eq(c[i].attempt, i + 1);
    }
}

START_TEST(test_server_errors_retried)
{
    scen a, b, c;
    call_rec calls[MAX_CALLS];
    const char *const short_schedule[] = {"IW_RETRY_SCHEDULE=0s,1s,2s", NULL};

    open_links();
    scen_init(&a, "sub-5xx", NULL);      /* default schedule 0s,2s,4s,8s: always 503 */
    scen_init(&b, "sub-5xx-ok", NULL);   /* default schedule: 500, 503, then 201 */
    scen_init(&c, "sub-5xx-fast", NULL); /* 0s,1s,2s: three attempts */
    pid_t wa = start_submitter(&a, NULL, NULL);
    pid_t wb = start_submitter(&b, NULL, NULL);
    pid_t wc = start_submitter(&c, short_schedule, NULL);

    char *ja = publish_job(&a, "always-503", "{\"fail_always\":503}");
    char *jb = publish_job(&b, "flaky", "{\"fail\":[500,503]}");
    char *jc1 = publish_job(&c, "always-500", "{\"fail_always\":500}");
    char *jc2 = publish_job(&c, "conn-closed", "{\"fail\":[0]}");

    /* a connection closed without an answer is transient too */
    iwt_msg *m = expect_accepted("conn-closed", 10000);
    iwt_msg_free(m);
    int n = wait_calls(&c, NULL, "conn-closed", calls, 2);
    ck_assert_int_eq(n, 2);
    ck_assert_int_eq(calls[0].status, 0);
    ck_assert_int_eq(calls[1].status, 201);
    ck_assert_int_eq(calls[1].attempt, 2);
    ck_assert_msg(calls[1].at_ms - calls[0].at_ms >= 950, "retry after %lld ms",
                  calls[1].at_ms - calls[0].at_ms);

    /* the short schedule: its length is the number of attempts */
    expect_failed("always-500", "EXTERNAL_API_ERROR", 500, 3, 10000);
    n = wait_calls(&c, NULL, "always-500", calls, 3);
    ck_assert_int_eq(n, 3);
    static const long short_gaps[] = {950, 1950};
    expect_gaps(calls, n, short_gaps, 1500, "0s,1s,2s");

    m = expect_accepted("flaky", 15000);
    iwt_msg_free(m);
    n = wait_calls(&b, NULL, "flaky", calls, 3);
    ck_assert_int_eq(n, 3);
    ck_assert_int_eq(calls[0].status, 500);
    ck_assert_int_eq(calls[1].status, 503);
    ck_assert_int_eq(calls[2].status, 201);
    static const long spec_gaps[] = {1900, 3900, 7900};
    expect_gaps(calls, n, spec_gaps, 1500, "flaky");
    json_t *st = iwt_mock_stats(b.port);
    ck_assert_int_eq(posts(st), 3);
    ck_assert_int_eq(stat_num(st, "submissions_created"), 1);
    ck_assert_int_eq(stat_num(st, "duplicates_refused"), 0);
    json_decref(st);

    /* the spec's timings: immediately, then after 2, 4 and 8 s; then dead */
    expect_failed("always-503", "EXTERNAL_API_ERROR", 503, 4, 25000);
    n = wait_calls(&a, NULL, "always-503", calls, 4);
    ck_assert_int_eq(n, 4);
    for (int i = 0; i < n; i++)
        ck_assert_int_eq(calls[i].status, 503);
    ck_assert_int_eq(calls[0].attempt, 1);
    expect_gaps(calls, n, spec_gaps, 1500, "default schedule");
    ck_assert_msg(calls[3].at_ms - calls[0].at_ms < 20000, "4 attempts took %lld ms",
                  calls[3].at_ms - calls[0].at_ms);
    st = iwt_mock_stats(a.port);
    ck_assert_int_eq(iwt_stat(st, ROUTE, "503"), 4);
    ck_assert_int_eq(posts(st), 4);
    ck_assert_int_eq(stat_num(st, "submissions_created"), 0);
    json_decref(st);

    dead_set da = {0}, dc = {0};
    dead_fetch(&da, &a, 1, 5000);
    expect_dead(&da, &a, ja, "EXTERNAL_API_ERROR", 503, 4);
    dead_fetch(&dc, &c, 1, 5000);
    expect_dead(&dc, &c, jc1, "EXTERNAL_API_ERROR", 500, 3);
    ck_assert_int_eq(depth(&b, "dead"), 0);
    assert_settled(&a, 4);
    assert_settled(&b, 3);
    assert_settled(&c, 5);

    dead_free(&da);
    dead_free(&dc);
    free(ja);
    free(jb);
    free(jc1);
    free(jc2);
    stop_worker(wa);
    stop_worker(wb);
    stop_worker(wc);
    scen_finish(&a);
    scen_finish(&b);
    scen_finish(&c);
    close_links();
}
END_TEST

/* ---- 4. 429
 * -------------------------------------------------------------------------------------- */

static int pause_exists(void *ud)
{
    const scen *s = ud;
    return iwt_redis_int("EXISTS %s:limiter:pause", s->ns) == 1;
}

START_TEST(test_429_honoured)
{
    scen a, b;
    call_rec calls[MAX_CALLS], other[MAX_CALLS];
    /* one attempt only, and every wait through the broker's delay queues */
    const char *const env_b[] = {"IW_RETRY_SCHEDULE=0s", "IW_HOLD_MAX=0", NULL};

    open_links();
    scen_init(&a, "sub-429", NULL);
    scen_init(&b, "sub-429-once", NULL);
    pid_t wa = start_submitter(&a, NULL, NULL);
    pid_t wb = start_submitter(&b, env_b, NULL);

    free(publish_job(&a, "r429", "{\"fail\":[429],\"retry_after\":2}"));
    free(publish_job(&b, "r429-twice", "{\"fail\":[429,429],\"retry_after\":1}"));

    /* the 429 pauses the whole fleet: the pause key appears... */
    ck_assert_msg(iwt_eventually(pause_exists, &a, 10000), "no %s:limiter:pause after the 429",
                  a.ns);
    long long pttl = iwt_redis_int("PTTL %s:limiter:pause", a.ns);
    ck_assert_msg(pttl > 0 && pttl <= 2000, "pause PTTL %lld", pttl);
    /* ...and holds back another job too */
    free(publish_job(&a, "after-pause", NULL));

    iwt_msg *m = expect_accepted("r429", 10000);
    iwt_msg_free(m);
    m = expect_accepted("after-pause", 10000);
    iwt_msg_free(m);
    int n = wait_calls(&a, NULL, "r429", calls, 2);
    ck_assert_int_eq(n, 2);
    ck_assert_int_eq(calls[0].status, 429);
    ck_assert_int_eq(calls[1].status, 201);
    ck_assert_msg(calls[1].at_ms - calls[0].at_ms >= 1990, "second POST %lld ms after the 429",
                  calls[1].at_ms - calls[0].at_ms);
    /* waiting for the reset used no attempt */
    ck_assert_int_eq(calls[0].attempt, 1);
    ck_assert_int_eq(calls[1].attempt, 1);
    ck_assert_int_eq(wait_calls(&a, NULL, "after-pause", other, 1), 1);
    ck_assert_msg(other[0].at_ms - calls[0].at_ms >= 1900,
                  "a job of the same fleet called %lld ms into a 2 s pause",
                  other[0].at_ms - calls[0].at_ms);
    json_t *st = iwt_mock_stats(a.port);
    ck_assert_int_eq(iwt_stat(st, ROUTE, "429"), 1);
    ck_assert_int_eq(iwt_stat(st, ROUTE, "201"), 2);
    ck_assert_int_eq(stat_num(st, "submissions_created"), 2);
    json_decref(st);

    /* one attempt allowed, two 429s: still accepted */
    m = expect_accepted("r429-twice", 15000);
    iwt_msg_free(m);
    n = wait_calls(&b, NULL, "r429-twice", calls, 3);
    ck_assert_int_eq(n, 3);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(calls[i].attempt, 1);
    ck_assert_int_eq(calls[2].status, 201);
    ck_assert_msg(calls[1].at_ms - calls[0].at_ms >= 990 && calls[2].at_ms - calls[1].at_ms >= 990,
                  "429 resets not honoured: gaps %lld, %lld ms", calls[1].at_ms - calls[0].at_ms,
                  calls[2].at_ms - calls[1].at_ms);
    assert_settled(&b, 3);
    ck_assert_int_eq(depth(&b, "dead"), 0);
    ck_assert_int_eq(iwt_count_events(tap, "submission.failed", NULL, 200), 0);

    stop_worker(wa);
    stop_worker(wb);
    scen_finish(&a);
    scen_finish(&b);
    close_links();
}
END_TEST

/* ---- 5. malformed and invalid jobs -------------------------------------------------------------
 */

START_TEST(test_invalid_jobs_dead_lettered)
{
    scen a;
    char ex[256], big[2048], long_id[200], mb_id[256], mb_job[512], id129_job[512];
    char huge_id[301], huge_job[512];
    const char *const env[] = {"IW_MAX_MESSAGE_BYTES=1024", NULL};

    open_links();
    scen_init(&a, "sub-invalid", NULL);
    snprintf(ex, sizeof ex, "%s.requests", a.ns);
    pid_t w = start_submitter(&a, env, NULL);

    const char *not_json = "{\"jobId\": \"nj-1\", this is not JSON";
    const char *bad_utf8 = "{\"jobId\":\"bad-utf8\",\"userId\":\"u\",\"action\":\"a\","
                           "\"payload\":{\"s\":\"\xff\xfe\"}}";
    char *text_plain = job_json("ct-text", NULL);
    const char *no_payload = "{\"jobId\":\"no-payload\",\"userId\":\"u\",\"action\":\"a\"}";
    memset(long_id, 'x', 129);
    long_id[129] = '\0';
    snprintf(id129_job, sizeof id129_job,
             "{\"jobId\":\"%s\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{}}", long_id);
    /* a readable jobId of 100 characters (200 bytes) on a job that breaks the schema */
    mb_id[0] = '\0';
    for (int i = 0; i < 100; i++)
        strcat(mb_id, "\xc3\xa9");
    snprintf(mb_job, sizeof mb_job, "{\"jobId\":\"%s\",\"userId\":\"u\",\"action\":\"a\"}", mb_id);
    /* a jobId too long for an AMQP correlation_id (300 bytes) on an invalid job */
    memset(huge_id, 'h', 300);
    huge_id[300] = '\0';
    snprintf(huge_job, sizeof huge_job, "{\"jobId\":\"%s\",\"userId\":\"u\",\"action\":\"a\"}",
             huge_id);
    memset(big, 'x', sizeof big);
    int off = snprintf(big, sizeof big,
                       "{\"jobId\":\"too-big\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{"
                       "\"blob\":\"");
    memset(big + off, 'x', 1500);
    big[off + 1500] = '\0';
    strcat(big, "\"}}");

    iwt_publish(ctl, ex, "submit.transaction", not_json, "application/json", NULL, NULL);
    iwt_publish(ctl, ex, "submit.transaction", bad_utf8, "application/json", NULL, NULL);
    iwt_publish(ctl, ex, "submit.transaction", text_plain, "text/plain", NULL, NULL);
    iwt_publish(ctl, ex, "submit.transaction", no_payload, "application/json", NULL, NULL);
    iwt_publish(ctl, ex, "submit.transaction", id129_job, "application/json", NULL, NULL);
    iwt_publish(ctl, ex, "submit.transaction", mb_job, "application/json", NULL, NULL);
    iwt_publish(ctl, ex, "submit.transaction", huge_job, "application/json", NULL, NULL);
    iwt_publish(ctl, ex, "submit.transaction", big, "application/json", NULL, NULL);
    /* valid ones after them: without a content type, and with a charset parameter */
    char *v1 = job_json("valid-no-ct", NULL);
    char *v2 = job_json("valid-charset", NULL);
    char *v3 = job_json("valid-after", NULL);
    iwt_publish(ctl, ex, "submit.transaction", v1, NULL, NULL, NULL);
    iwt_publish(ctl, ex, "submit.transaction", v2, "application/json; charset=utf-8", NULL, NULL);
    publish(&a, v3);

    iwt_msg *m = expect_accepted("valid-after", 15000);
    iwt_msg_free(m);
    m = expect_accepted("valid-no-ct", 5000);
    iwt_msg_free(m);
    m = expect_accepted("valid-charset", 5000);
    iwt_msg_free(m);
    ck_assert_int_eq(kill(w, 0), 0);

    /* submission.failed where the jobId can be read (retryAttempt 0: no call made) */
    expect_failed("ct-text", "INVALID_CONTENT_TYPE", 0, 0, 5000);
    expect_failed("no-payload", "SCHEMA_VIOLATION", 0, 0, 5000);
    expect_failed(mb_id, "SCHEMA_VIOLATION", 0, 0, 5000);
    /* "a job rejected for its jobId still gets its event" (submission-failed schema) */
    expect_failed(long_id, "SCHEMA_VIOLATION", 0, 0, 5000);
    /* its correlation_id cannot hold the jobId: the event still comes, named in the body */
    m = wait_body_event(huge_id, 5000);
    ck_assert_ptr_nonnull(m);
    ck_assert_str_eq(m->routing_key, "submission.failed");
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(m->body, "error"), "code")),
                     "SCHEMA_VIOLATION");
    iwt_msg_free(m);
    ck_assert(!log_contains(&a, NULL, "broker connection lost"));
    /* and no other failure event: not JSON, not UTF-8, too large (unread) */
    ck_assert_int_eq(iwt_count_events(tap, "submission.failed", NULL, 500), 0);

    dead_set d = {0};
    dead_fetch(&d, &a, 8, 5000);
    expect_dead(&d, &a, not_json, "INVALID_JSON", 0, -1);
    expect_dead(&d, &a, bad_utf8, "INVALID_JSON", 0, -1);
    const iwt_msg *ct = expect_dead(&d, &a, text_plain, "INVALID_CONTENT_TYPE", 0, -1);
    ck_assert_str_eq(ct->content_type, "text/plain");
    expect_dead(&d, &a, no_payload, "SCHEMA_VIOLATION", 0, -1);
    expect_dead(&d, &a, id129_job, "SCHEMA_VIOLATION", 0, -1);
    expect_dead(&d, &a, mb_job, "SCHEMA_VIOLATION", 0, -1);
    expect_dead(&d, &a, huge_job, "SCHEMA_VIOLATION", 0, -1);
    expect_dead(&d, &a, big, "MESSAGE_TOO_LARGE", 0, -1);
    ck_assert_int_eq(depth(&a, "dead"), 0);

    /* no provider call for any of them */
    json_t *st = iwt_mock_stats(a.port);
    ck_assert_int_eq(posts(st), 3);
    ck_assert_int_eq(iwt_stat(st, ROUTE, "201"), 3);
    json_decref(st);
    assert_settled(&a, 3);

    dead_free(&d);
    free(text_plain);
    free(v1);
    free(v2);
    free(v3);
    stop_worker(w);
    scen_finish(&a);
    close_links();
}
END_TEST

/* ---- 6. SIGKILL mid-flight
 * ------------------------------------------------------------------------ */

START_TEST(test_sigkill_mid_flight)
{
    enum { JOBS = 20 };
    scen a;
    char id[JOBS][32];
    int seen[JOBS] = {0};

    open_links();
    scen_init(&a, "sub-kill", NULL);
    ck_assert_int_eq(iwt_mock_post(a.port, "/__admin/faults", "{\"latency_ms\":3000}"), 200);
    pid_t w = start_submitter(&a, NULL, "first");
    for (int i = 0; i < JOBS; i++) {
        snprintf(id[i], sizeof id[i], "kill-%02d", i);
        free(publish_job(&a, id[i], NULL));
    }
    /* every job is in a provider call when the worker dies */
    wait_in_flight(&a, JOBS, 10000);
    ck_assert_int_eq(iwt_stop(w, SIGKILL), 128 + SIGKILL);
    ck_assert_int_eq(iwt_mock_post(a.port, "/__admin/faults", "{\"latency_ms\":0}"), 200);
    w = start_submitter(&a, NULL, "second");

    for (int i = 0; i < JOBS; i++) {
        iwt_msg *m = expect_accepted(id[i], 20000);
        iwt_msg_free(m);
        seen[i] = 1;
    }
    /* settle: no job gets a second outcome */
    long long end = iwt_now_ms() + 1500;
    iwt_msg *m;
    while ((m = iwt_next_event(tap, (int)(end - iwt_now_ms() > 0 ? end - iwt_now_ms() : 1)))) {
        ck_abort_msg("extra event %s for %s after every job was accepted", m->routing_key,
                     m->correlation_id);
        if (iwt_now_ms() >= end)
            break;
    }
    json_t *st = iwt_mock_stats(a.port);
    ck_assert_int_eq(stat_num(st, "submissions_created"), JOBS);
    /* the replayed calls were answered from the Idempotency-Key */
    ck_assert_int_ge(stat_num(st, "duplicates_refused"), 1);
    json_decref(st);
    assert_settled(&a, mock_posts(&a));
    ck_assert_int_eq(depth(&a, "dead"), 0);
    for (int i = 0; i < JOBS; i++)
        ck_assert(seen[i]);

    stop_worker(w);
    ck_assert_int_eq(depth(&a, "submit"), 0);
    scen_finish(&a);
    close_links();
}
END_TEST

/* ---- 7. several submitters, one limit ----------------------------------------------------------
 */

START_TEST(test_shared_rate_limit)
{
    enum { JOBS = 60, WORKERS = 3 };
    scen a;
    const char *const mock_args[] = {"--rate-limits", "10/s", NULL};
    const char *const env[] = {"IW_RATE_LIMITS=10/s", "IW_PREFETCH=5", NULL};
    const char *tags[WORKERS] = {"w1", "w2", "w3"};
    pid_t w[WORKERS];
    char id[JOBS][32];
    long long first = 0, last = 0;

    open_links();
    scen_init(&a, "sub-limit", mock_args);
    for (int i = 0; i < WORKERS; i++)
        w[i] = start_submitter(&a, env, tags[i]);
    wait_consumers(&a, WORKERS);
    for (int i = 0; i < JOBS; i++) {
        snprintf(id[i], sizeof id[i], "lim-%02d", i);
        free(publish_job(&a, id[i], NULL));
    }
    for (int i = 0; i < JOBS; i++) {
        iwt_msg *m = wait_ev("submission.accepted", id[i], 30000);
        iwt_msg_free(m);
    }
    /* every call is in one of the three logs (written once per loop turn) */
    for (int i = 0; i < JOBS; i++) {
        long long deadline = iwt_now_ms() + 2000;
        int total;
        do {
            call_rec c[MAX_CALLS];
            total = 0;
            for (int k = 0; k < WORKERS; k++)
                total += read_calls(&a, tags[k], id[i], c);
        } while (total < 1 && iwt_now_ms() < deadline && (iwt_sleep_ms(20), 1));
        ck_assert_int_eq(total, 1);
    }
    /* first and last provider calls, from the three logs */
    for (int k = 0; k < WORKERS; k++) {
        int mine = 0;
        for (int i = 0; i < JOBS; i++) {
            call_rec c[MAX_CALLS];
            int n = read_calls(&a, tags[k], id[i], c);
            for (int j = 0; j < n; j++) {
                ck_assert_int_eq(c[j].status, 201);
                if (!first || c[j].at_ms < first)
                    first = c[j].at_ms;
                if (c[j].at_ms > last)
                    last = c[j].at_ms;
                mine++;
            }
        }
        ck_assert_msg(mine > 0, "submitter %s made no call", tags[k]);
    }
    json_t *st = iwt_mock_stats(a.port);
    ck_assert_int_eq(stat_num(st, "rate_limited"), 0);
    ck_assert_int_eq(iwt_stat(st, ROUTE, "429"), 0);
    ck_assert_int_eq(posts(st), JOBS);
    ck_assert_int_eq(stat_num(st, "submissions_created"), JOBS);
    json_decref(st);
    /* 60 calls at 10/s: the 51st cannot start before 5 s after the first */
    ck_assert_msg(last - first >= 4900, "60 calls in %lld ms at 10/s", last - first);
    ck_assert_msg(last - first < 9000, "60 calls took %lld ms at 10/s", last - first);

    for (int i = 0; i < WORKERS; i++)
        stop_worker(w[i]);
    scen_finish(&a);
    close_links();
}
END_TEST

/* ---- 8. Redis down: fail closed
 * ------------------------------------------------------------------- */

START_TEST(test_redis_down_fails_closed)
{
    scen a;
    char url[64], env_url[96];
    int port = iwt_free_port();
    pid_t r = iwt_start_redis(port);
    snprintf(url, sizeof url, "redis://127.0.0.1:%d/0", port);
    snprintf(env_url, sizeof env_url, "IW_REDIS_URL=%s", url);
    const char *const env[] = {env_url, NULL};

    open_links();
    scen_init(&a, "sub-redis", NULL);
    pid_t w = start_submitter(&a, env, NULL);
    free(publish_job(&a, "before-outage", NULL));
    iwt_msg *m = expect_accepted("before-outage", 15000);
    iwt_msg_free(m);

    /* Redis goes away: the limiter cannot meter, so nobody calls the provider */
    ck_assert_int_eq(iwt_stop_tracked(r, SIGKILL), 128 + SIGKILL);
    free(publish_job(&a, "during-outage", NULL));
    ck_assert_ptr_null(iwt_wait_event(tap, "submission.accepted", "during-outage", 2000));
    ck_assert_int_eq(mock_posts(&a), 1);
    ck_assert_int_eq(kill(w, 0), 0);
    ck_assert(log_contains(&a, NULL, "LIMITER_UNAVAILABLE") ||
              log_contains(&a, NULL, "REDIS_UNAVAILABLE"));

    /* Redis is back on the same port: the job goes through */
    r = iwt_start_redis(port);
    m = expect_accepted("during-outage", 15000);
    iwt_msg_free(m);
    assert_settled(&a, 2);
    ck_assert_int_eq(iwt_count_events(tap, "submission.failed", NULL, 200), 0);

    stop_worker(w);
    iwt_stop_tracked(r, SIGTERM);
    scen_finish(&a);
    close_links();
}
END_TEST

/* ---- 9. graceful SIGTERM ------------------------------------------------------------------------
 */

/* Waits for every pid; records each exit time (ms after t0) and exit code. */
static void wait_exits(const pid_t *pids, int n, long long t0, long long *at, int *rc,
                       int timeout_ms)
{
    int left = n;
    long long deadline = iwt_now_ms() + timeout_ms;
    for (int i = 0; i < n; i++)
        at[i] = -1;
    while (left && iwt_now_ms() < deadline) {
        for (int i = 0; i < n; i++) {
            int status;
            if (at[i] < 0 && waitpid(pids[i], &status, WNOHANG) == pids[i]) {
                at[i] = iwt_now_ms() - t0;
                rc[i] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
                left--;
            }
        }
        iwt_sleep_ms(5);
    }
    ck_assert_msg(left == 0, "%d worker(s) did not exit within %d ms", left, timeout_ms);
}

START_TEST(test_graceful_sigterm)
{
    enum { JOBS = 6 };
    scen a, b;
    const char *const slow[] = {"--latency-ms", "1000", NULL};
    const char *const slower[] = {"--latency-ms", "5000", NULL};
    const char *const env_a[] = {"IW_CONCURRENCY=3", NULL};
    const char *const env_b[] = {"IW_SHUTDOWN_GRACE=1s", NULL};
    char id[JOBS][32];
    int count[JOBS] = {0};

    open_links();
    scen_init(&a, "sub-term", slow);        /* in-flight calls finish within the grace */
    scen_init(&b, "sub-term-late", slower); /* a call outlives the grace */
    pid_t w[2];
    w[0] = start_submitter(&a, env_a, "first");
    w[1] = start_submitter(&b, env_b, "first");
    wait_consumers(&a, 1);
    for (int i = 0; i < JOBS; i++) {
        snprintf(id[i], sizeof id[i], "term-%d", i);
        free(publish_job(&a, id[i], NULL));
    }
    free(publish_job(&b, "term-late", NULL));
    /* a: three calls in flight (IW_CONCURRENCY=3), three held unstarted */
    wait_in_flight(&a, 3, 10000);
    wait_in_flight(&b, 1, 10000);
    IWT_EVENTUALLY(depth(&a, "submit") == 0, 5000);
    ck_assert_int_eq(depth(&a, "submit"), 0);

    long long t0 = iwt_now_ms(), at[2];
    int rc[2];
    kill(w[0], SIGTERM);
    kill(w[1], SIGTERM);
    wait_exits(w, 2, t0, at, rc, 15000);
    ck_assert_int_eq(rc[0], 0);
    ck_assert_int_eq(rc[1], 0);
    ck_assert_msg(at[0] < 3000, "graceful stop took %lld ms", at[0]);
    ck_assert_msg(at[1] >= 900 && at[1] < 3000, "stop with a 1 s grace took %lld ms", at[1]);
    ck_assert(log_contains(&b, "first", "shutdown grace expired"));

    /* a: the calls in flight finished (accepted), the others are back in the queue */
    iwt_msg *m;
    int accepted = 0;
    long long end = iwt_now_ms() + 1000;
    while ((m = iwt_next_event(tap, (int)(end - iwt_now_ms() > 0 ? end - iwt_now_ms() : 1)))) {
        ck_assert_str_eq(m->routing_key, "submission.accepted");
        for (int i = 0; i < JOBS; i++)
            if (strcmp(m->correlation_id, id[i]) == 0)
                count[i]++, accepted++;
        iwt_msg_free(m);
        if (iwt_now_ms() >= end)
            break;
    }
    ck_assert_int_eq(accepted, 3);
    IWT_EVENTUALLY(depth(&a, "submit") >= JOBS - accepted && depth(&b, "submit") >= 1, 5000);
    ck_assert_int_eq(depth(&a, "submit"), JOBS - accepted);
    ck_assert_int_eq(depth(&b, "submit"), 1);

    /* restart: nothing was lost, nothing is repeated */
    ck_assert_int_eq(iwt_mock_post(a.port, "/__admin/faults", "{\"latency_ms\":0}"), 200);
    ck_assert_int_eq(iwt_mock_post(b.port, "/__admin/faults", "{\"latency_ms\":0}"), 200);
    w[0] = start_submitter(&a, env_a, "second");
    w[1] = start_submitter(&b, env_b, "second");
    for (int i = 0; i < JOBS; i++) {
        if (count[i])
            continue;
        m = expect_accepted(id[i], 15000);
        iwt_msg_free(m);
        count[i]++;
    }
    m = expect_accepted("term-late", 15000);
    iwt_msg_free(m);
    ck_assert_int_eq(iwt_count_events(tap, "submission.accepted", NULL, 1000), 0);
    json_t *st = iwt_mock_stats(a.port);
    ck_assert_int_eq(stat_num(st, "submissions_created"), JOBS);
    ck_assert_int_eq(stat_num(st, "duplicates_refused"), 0);
    json_decref(st);
    /* b's first call reached the provider before the stop: the retry is a replay */
    st = iwt_mock_stats(b.port);
    ck_assert_int_eq(stat_num(st, "submissions_created"), 1);
    ck_assert_int_eq(stat_num(st, "duplicates_refused"), 1);
    json_decref(st);

    stop_worker(w[0]);
    stop_worker(w[1]);
    assert_settled(&a, JOBS);
    assert_settled(&b, 2);
    scen_finish(&a);
    scen_finish(&b);
    close_links();
}
END_TEST

/* ---- 10. class share of the rate limit
 * ------------------------------------------------------------ */

START_TEST(test_submit_share)
{
    enum { JOBS = 10 };
    scen a, b;
    const char *const env[] = {"IW_RATE_LIMITS=10/s", "IW_SUBMIT_SHARE=50", NULL};
    long long ta[JOBS], tb[JOBS];

    open_links();
    scen_init(&a, "sub-share", NULL);
    scen_init(&b, "sub-share-crit", NULL);
    /* status checks are waiting for permits (a poller was refused) */
    iwt_redis_int("SET %s:limiter:demand:status 1 PX 60000", a.ns);
    iwt_redis_int("SET %s:limiter:demand:status 1 PX 60000", b.ns);
    pid_t wa = start_submitter(&a, env, NULL);
    pid_t wb = start_submitter(&b, env, NULL);
    wait_consumers(&a, 1);
    wait_consumers(&b, 1);
    for (int i = 0; i < JOBS; i++) {
        char id[32];
        snprintf(id, sizeof id, "share-%d", i);
        free(publish_job(&a, id, NULL));
        snprintf(id, sizeof id, "crit-%d", i);
        char *body = job_json(id, NULL);
        json_t *j = json_loads(body, 0, NULL);
        json_object_set_new(j, "priority", json_string("critical"));
        free(body);
        body = json_dumps(j, JSON_COMPACT);
        json_decref(j);
        publish(&b, body);
        free(body);
    }
    for (int i = 0; i < JOBS; i++) {
        char id[32];
        call_rec c[MAX_CALLS];
        snprintf(id, sizeof id, "share-%d", i);
        iwt_msg_free(expect_accepted(id, 15000));
        ck_assert_int_eq(wait_calls(&a, NULL, id, c, 1), 1);
        ta[i] = c[0].at_ms;
        snprintf(id, sizeof id, "crit-%d", i);
        iwt_msg_free(expect_accepted(id, 15000));
        ck_assert_int_eq(wait_calls(&b, NULL, id, c, 1), 1);
        tb[i] = c[0].at_ms;
    }
    long long a0 = ta[0], a1 = ta[0], b0 = tb[0], b1 = tb[0];
    int a_first_second = 0;
    for (int i = 0; i < JOBS; i++) {
        a0 = ta[i] < a0 ? ta[i] : a0;
        a1 = ta[i] > a1 ? ta[i] : a1;
        b0 = tb[i] < b0 ? tb[i] : b0;
        b1 = tb[i] > b1 ? tb[i] : b1;
    }
    for (int i = 0; i < JOBS; i++)
        a_first_second += ta[i] - a0 < 900;
    /* normal submissions get IW_SUBMIT_SHARE (50%) of 10/s while status checks wait */
    ck_assert_msg(a_first_second <= 5, "%d normal submissions in the first second at a 50%% share",
                  a_first_second);
    ck_assert_msg(a1 - a0 >= 900, "10 normal submissions within %lld ms at 5/s", a1 - a0);
    /* critical ones are not capped */
    ck_assert_msg(b1 - b0 < 900, "10 critical submissions took %lld ms at 10/s", b1 - b0);

    stop_worker(wa);
    stop_worker(wb);
    scen_finish(&a);
    scen_finish(&b);
    close_links();
}
END_TEST

/* ---- 11. long multibyte jobIds -----------------------------------------------------------------
 */

START_TEST(test_multibyte_job_ids)
{
    scen a;
    char x[300] = "", y[sizeof x + 8], z[300] = ""; /* y: room for x and 4 more bytes */

    open_links();
    scen_init(&a, "sub-mb", NULL);
    pid_t w = start_submitter(&a, NULL, NULL);

    /* x and y are distinct valid jobIds (<= 128 characters) sharing a long prefix */
    size_t room = 199 - strlen(a.ns) - strlen(":job:");
    while (strlen(x) + 2 <= room)
        strcat(x, "\xc3\xa9");
    while (strlen(x) < room)
        strcat(x, "a");
    snprintf(y, sizeof y, "%s\xc3\xa9\xc3\xa9", x);
    free(publish_job(&a, x, NULL));
    iwt_msg *mx = expect_accepted(x, 15000);
    free(publish_job(&a, y, NULL));
    iwt_msg *my = expect_accepted(y, 15000);
    ck_assert_msg(strcmp(body_str(mx, "externalId"), body_str(my, "externalId")) != 0,
                  "job %s got the outcome of job %s without a call", y, x);
    ck_assert_int_eq(mock_posts(&a), 2);
    iwt_msg_free(mx);
    iwt_msg_free(my);

    /* 128 characters of 2 bytes (a valid fixture): 256 bytes, more than an AMQP
     * correlation_id holds; the job still gets exactly one outcome and the
     * worker keeps its broker connection */
    for (int i = 0; i < 128; i++)
        strcat(z, "\xc3\xa9");
    char *zb = publish_job(&a, z, NULL);
    iwt_msg *mz = wait_body_event(z, 15000);
    ck_assert_msg(mz != NULL, "no outcome for the 256-byte jobId");
    ck_assert_msg(strcmp(mz->routing_key, "submission.accepted") == 0 ||
                      strcmp(mz->routing_key, "submission.failed") == 0,
                  "event %s", mz->routing_key);
    if (strcmp(mz->routing_key, "submission.failed") == 0) {
        dead_set d = {0};
        dead_fetch(&d, &a, 1, 5000);
        dead_find(&d, zb, strlen(zb));
        dead_free(&d);
    }
    iwt_msg_free(mz);
    free(publish_job(&a, "plain-after", NULL));
    iwt_msg_free(expect_accepted("plain-after", 10000));
    ck_assert_ptr_null(wait_body_event(z, 1000));
    ck_assert(!log_contains(&a, NULL, "broker connection lost"));
    assert_settled(&a, mock_posts(&a));

    free(zb);
    stop_worker(w);
    scen_finish(&a);
    close_links();
}
END_TEST

/* Stops the worker and ends the case with nothing left in its queue and no
 * dead letter. */
static void end_drained(scen *a, pid_t w)
{
    stop_worker(w);
    ck_assert_int_eq(depth(a, "submit"), 0);
    ck_assert_int_eq(depth(a, "dead"), 0);
    scen_finish(a);
    close_links();
}

/* The provider restarts while the worker's keep-alive connections are idle
 * (parked in the reactor's epoll set): they are closed under it, and the next
 * calls go out on new connections.  A parked descriptor taken for registered
 * after its number was reused would stall the calls on it: every round must
 * be accepted in time, and each provider must see exactly its own jobs. */
START_TEST(test_provider_restarts_between_calls)
{
    enum { ROUNDS = 3, JOBS = 8 };
    scen a;
    char id[32], listen[64];

    open_links();
    scen_init(&a, "sub-restart", NULL);
    pid_t w = start_submitter(&a, NULL, NULL);
    snprintf(listen, sizeof listen, "127.0.0.1:%d", a.port);
    for (int round = 0; round < ROUNDS; round++) {
        for (int i = 0; i < JOBS; i++) {
            snprintf(id, sizeof id, "restart-%d-%02d", round, i);
            free(publish_job(&a, id, NULL));
        }
        for (int i = 0; i < JOBS; i++) {
            snprintf(id, sizeof id, "restart-%d-%02d", round, i);
            iwt_msg_free(expect_accepted(id, 10000));
        }
        json_t *st = iwt_mock_stats(a.port);
        ck_assert_int_eq(stat_num(st, "submissions_created"), JOBS);
        json_decref(st);
        if (round == ROUNDS - 1)
            break;
        /* the connections are idle: the provider goes and comes back on its port */
        ck_assert_int_eq(iwt_stop(a.mock, SIGTERM), 0);
        const char *args[] = {"--listen", listen, NULL};
        int port;
        a.mock = iwt_start_mock(args, &port);
        ck_assert_int_eq(port, a.port);
    }
    ck_assert(!log_contains(&a, NULL, "External API call failed"));
    end_drained(&a, w);
}
END_TEST

/* Calls cut off by IW_HTTP_TIMEOUT: curl closes their connections (the loop
 * forgets the descriptors as they close) and the retries open new ones,
 * which get the same descriptor numbers: each must be watched afresh, or the
 * retries would stall until they time out too. */
START_TEST(test_timed_out_connections_replaced)
{
    enum { JOBS = 8 };
    static const char *const env[] = {"IW_HTTP_TIMEOUT=500ms", "IW_RETRY_SCHEDULE=0s,1s,1s,1s,1s",
                                      "IW_BREAKER_FAILURES=1000", NULL};
    scen a;
    char id[32];

    open_links();
    scen_init(&a, "sub-cutoff", NULL);
    pid_t w = start_submitter(&a, env, NULL);
    /* first a round on fast calls: the connections exist and go idle */
    for (int i = 0; i < JOBS; i++) {
        snprintf(id, sizeof id, "warm-%02d", i);
        free(publish_job(&a, id, NULL));
    }
    for (int i = 0; i < JOBS; i++) {
        snprintf(id, sizeof id, "warm-%02d", i);
        iwt_msg_free(expect_accepted(id, 10000));
    }
    ck_assert_int_eq(iwt_mock_post(a.port, "/__admin/faults", "{\"latency_ms\":3000}"), 200);
    for (int i = 0; i < JOBS; i++) {
        snprintf(id, sizeof id, "cut-%02d", i);
        free(publish_job(&a, id, NULL));
    }
    wait_in_flight(&a, JOBS, 10000);
    /* cut off at 500 ms (all started together); the retries, 1 s later, find a
     * fast provider */
    ck_assert_msg(IWT_EVENTUALLY(log_contains(&a, NULL, "timed out"), 5000),
                  "no call was cut off by IW_HTTP_TIMEOUT");
    ck_assert_int_eq(iwt_mock_post(a.port, "/__admin/faults", "{\"latency_ms\":0}"), 200);
    for (int i = 0; i < JOBS; i++) {
        snprintf(id, sizeof id, "cut-%02d", i);
        iwt_msg_free(expect_accepted(id, 15000));
    }
    end_drained(&a, w);
}
END_TEST

/* One case per test, so that CK_RUN_CASE=<test name> runs one of them. */
static void add(Suite *s, const char *name, const TTest *t)
{
    TCase *tc = tcase_create(name);
    tcase_set_timeout(tc, 90);
    tcase_add_unchecked_fixture(tc, NULL, iwt_ns_remove_leftovers);
    tcase_add_test(tc, t);
    suite_add_tcase(s, tc);
}

static Suite *submit_suite(void)
{
    Suite *s = suite_create("submit");
    add(s, "accepted", test_accepted);
    add(s, "provider_restart", test_provider_restarts_between_calls);
    add(s, "timed_out_connections", test_timed_out_connections_replaced);
    add(s, "client_errors", test_client_errors_not_retried);
    add(s, "server_errors", test_server_errors_retried);
    add(s, "rate_limited_429", test_429_honoured);
    add(s, "invalid_jobs", test_invalid_jobs_dead_lettered);
    add(s, "sigkill", test_sigkill_mid_flight);
    add(s, "shared_limit", test_shared_rate_limit);
    add(s, "redis_down", test_redis_down_fails_closed);
    add(s, "sigterm", test_graceful_sigterm);
    add(s, "submit_share", test_submit_share);
    add(s, "multibyte_ids", test_multibyte_job_ids);
    return s;
}

int main(void)
{
    iwt_ns_suite("submit");
    SRunner *sr = srunner_create(submit_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
