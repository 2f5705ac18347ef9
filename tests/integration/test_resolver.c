/* Integration suite of the resolver role: resource look-ups over the broker
 * (RPC with reply_to + correlation_id), the Redis cache, the remembered 404,
 * coalescing, the stale fallback and invalidation.  Real RabbitMQ and Redis
 * on loopback, a real mock-provider, real worker processes; each test works
 * in its own namespace. */
#include <check.h>
#include <curl/curl.h>
#include <jansson.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "iwtest.h"

#define MAX_WORKERS 2
#define REPLY_WAIT_MS 5000

static const char *ns;
static int port;
static pid_t mock_pid = -1;
static pid_t workers[MAX_WORKERS] = {-1, -1};
static iwt_amqp *amqp;
static char reply_queue[256];
static char requests_exchange[256];

/* A failed assertion exits the test process: never leave children (or the
 * namespace) behind. */
static void kill_children(void)
{
    static int cleaning;

    for (int i = 0; i < MAX_WORKERS; i++)
        if (workers[i] > 0) {
            kill(workers[i], SIGKILL);
            waitpid(workers[i], NULL, 0);
            workers[i] = -1;
        }
    if (mock_pid > 0) {
        kill(mock_pid, SIGKILL);
        waitpid(mock_pid, NULL, 0);
        mock_pid = -1;
    }
    if (ns && !cleaning) {
        cleaning = 1;
        iwt_cleanup(ns);
        ns = NULL;
    }
}

static void open_reply_queue(void)
{
    amqp_queue_declare_ok_t *q;

    amqp = iwt_amqp_open();
    q = amqp_queue_declare(amqp->conn, 1, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    ck_assert_ptr_nonnull(q);
    snprintf(reply_queue, sizeof reply_queue, "%.*s", (int)q->queue.len, (char *)q->queue.bytes);
}

/* Namespace, topology, mock, n resolver processes with extra env.
 *
 * The resolver's behaviour does not depend on the queue type, and each
 * namespace of quorum queues costs the shared broker 23 Raft groups to
 * create and delete; so most tests declare classic queues (the same
 * `declare` command as iwt_declare, with IW_QUEUE_TYPE=classic) and
 * test_miss_then_hit keeps the default quorum topology. */
static void start_with(const char *name, int n_workers, const char *const *env, int quorum)
{
    static int registered;
    const char *full[16];
    const char *declare[] = {"declare", NULL};
    size_t n = 0;

    if (!registered)
        atexit(kill_children);
    registered = 1;
    if (!quorum)
        full[n++] = "IW_QUEUE_TYPE=classic";
    for (size_t i = 0; env && env[i] && n < 15; i++)
        full[n++] = env[i];
    full[n] = NULL;
    ns = iwt_namespace(name);
    snprintf(requests_exchange, sizeof requests_exchange, "%s.requests", ns);
    if (quorum)
        iwt_declare(ns);
    else
        ck_assert_int_eq(iwt_run_worker_cmd(declare, ns, 1, full, NULL), 0);
    mock_pid = iwt_start_mock(NULL, &port);
    for (int i = 0; i < n_workers; i++) {
        char tag[32];
        snprintf(tag, sizeof tag, "resolver%d", i);
        workers[i] = iwt_start_worker("resolver", ns, port, full, tag);
    }
    open_reply_queue();
}

static void start(const char *name, int n_workers, const char *const *env)
{
    start_with(name, n_workers, env, 0);
}

static void finish(void)
{
    for (int i = 0; i < MAX_WORKERS; i++)
        if (workers[i] > 0) {
            ck_assert_int_eq(iwt_stop(workers[i], SIGTERM), 0);
            workers[i] = -1;
        }
    kill(mock_pid, SIGTERM);
    waitpid(mock_pid, NULL, 0);
    mock_pid = -1;
    iwt_amqp_close(amqp);
    amqp = NULL;
    iwt_cleanup(ns);
    ns = NULL;
}

/* ---- requests and replies ------------------------------------------------------- */

static void publish_get(const char *body, const char *correlation_id)
{
    iwt_publish(amqp, requests_exchange, "resource.get", body, "application/json", reply_queue,
                correlation_id);
}

/* Replies that arrived while another one was awaited. */
static iwt_msg *backlog[256];
static size_t n_backlog;

static iwt_msg *wait_reply(const char *correlation_id, int timeout_ms)
{
    long long deadline = iwt_now_ms() + timeout_ms;

    for (size_t i = 0; i < n_backlog; i++)
        if (strcmp(backlog[i]->correlation_id, correlation_id) == 0) {
            iwt_msg *m = backlog[i];
            memmove(backlog + i, backlog + i + 1, (--n_backlog - i) * sizeof backlog[0]);
            return m;
        }
    while (iwt_now_ms() < deadline) {
        iwt_msg *m = iwt_get(amqp, reply_queue, (int)(deadline - iwt_now_ms()));
        if (!m)
            break;
        if (strcmp(m->correlation_id, correlation_id) == 0)
            return m;
        ck_assert_uint_lt(n_backlog, 256);
        backlog[n_backlog++] = m;
    }
    return NULL;
}

/* One look-up: publishes and waits for the reply (asserted present). */
static iwt_msg *lookup(const char *body, const char *correlation_id)
{
    iwt_msg *m;

    publish_get(body, correlation_id);
    m = wait_reply(correlation_id, REPLY_WAIT_MS);
    ck_assert_msg(m != NULL, "no reply to %s", body);
    ck_assert_str_eq(m->content_type, "application/json");
    ck_assert_ptr_nonnull(m->body);
    return m;
}

static iwt_msg *lookup_id(const char *id, const char *correlation_id)
{
    char body[512];
    snprintf(body, sizeof body, "{\"id\":\"%s\"}", id);
    return lookup(body, correlation_id);
}

static const char *reply_source(const iwt_msg *m)
{
    return json_string_value(json_object_get(m->body, "source"));
}

static const char *reply_error_code(const iwt_msg *m)
{
    return json_string_value(json_object_get(json_object_get(m->body, "error"), "code"));
}

static void assert_found(const iwt_msg *m, const char *id, const char *source)
{
    ck_assert_msg(json_is_true(json_object_get(m->body, "found")), "not found: %s", m->raw);
    ck_assert_str_eq(json_string_value(json_object_get(m->body, "id")), id);
    ck_assert_str_eq(reply_source(m), source);
    ck_assert(json_is_object(json_object_get(m->body, "data")));
}

/* Waits until the resolver consumes (a look-up of a throw-away id). */
static void wait_ready(void)
{
    iwt_msg *m = lookup_id("warm-up", "warm-up");
    iwt_msg_free(m);
}

static long resource_gets(const char *id)
{
    json_t *stats = iwt_mock_stats(port);
    json_t *v = json_object_get(json_object_get(stats, "resource_gets"), id);
    long n = json_is_integer(v) ? (long)json_integer_value(v) : 0;
    json_decref(stats);
    return n;
}

static long long pttl(const char *kind, const char *id)
{
    return iwt_redis_int("PTTL %s:%s:%s", ns, kind, id);
}

static long long exists(const char *key_suffix)
{
    return iwt_redis_int("EXISTS %s:%s", ns, key_suffix);
}

static int key_absent(void *suffix)
{
    return exists(suffix) == 0;
}

static int key_present(void *suffix)
{
    return exists(suffix) == 1;
}

static void set_faults(const char *json)
{
    ck_assert_int_eq(iwt_mock_post(port, "/__admin/faults", json), 200);
}

static size_t discard(char *d, size_t s, size_t n, void *ud)
{
    (void)d;
    (void)ud;
    return s * n;
}

/* PUT /__admin/resources/{id} with an ExternalResponse body. */
static void mock_put_resource(const char *id, const char *body)
{
    CURL *c = curl_easy_init();
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    char url[512];
    long status = 0;

    snprintf(url, sizeof url, "http://127.0.0.1:%d/__admin/resources/%s", port, id);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, "PUT");
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
    ck_assert_int_eq(curl_easy_perform(c), CURLE_OK);
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    ck_assert_int_eq(status, 200);
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
}

static char *worker_log(int i)
{
    char path[512];
    FILE *f;
    char *buf;
    long n;

    snprintf(path, sizeof path, "%s/iwtest-%s-resolver%d.log", iwt_log_dir(), ns, i);
    f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = calloc(1, (size_t)n + 1);
    ck_assert_int_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    return buf;
}

/* ---- scenarios 1, 6, 7, 8: retrieval, cache miss then hit, transformation ------- */

START_TEST(test_miss_then_hit)
{
    iwt_msg *m;
    json_t *want;
    long long ttl;

    start_with("res-hit", 1, NULL, 1);
    m = lookup_id("abc123", "c-1");
    assert_found(m, "abc123", "provider");
    want = json_pack("{s:s, s:s, s:s, s:{s:s, s:i}}", "externalId", "abc123", "name",
                     "Resource abc123", "status", "active", "details", "fieldOne", "value-abc123",
                     "fieldTwo", 42);
    ck_assert_msg(json_equal(json_object_get(m->body, "data"), want), "data: %s", m->raw);
    ck_assert_str_eq(m->correlation_id, "c-1");
    iwt_msg_free(m);

    /* the contract's key, IW_CACHE_TTL (300 s) */
    ttl = pttl("resource", "abc123");
    ck_assert_msg(ttl > 290000 && ttl <= 300000, "PTTL %lld", ttl);
    char *cached = iwt_redis_str("GET %s:resource:abc123", ns);
    json_t *cj = json_loads(cached, 0, NULL);
    ck_assert(json_equal(cj, want));
    json_decref(cj);
    free(cached);
    /* the stale copy, IW_CACHE_STALE_TTL (24 h) */
    ttl = pttl("resource-stale", "abc123");
    ck_assert_msg(ttl > 86000000LL && ttl <= 86400000LL, "stale PTTL %lld", ttl);

    m = lookup_id("abc123", "c-2");
    assert_found(m, "abc123", "cache");
    ck_assert(json_equal(json_object_get(m->body, "data"), want));
    iwt_msg_free(m);
    ck_assert_int_eq(resource_gets("abc123"), 1);

    /* an expand variant is its own entry (and its own provider call) */
    m = lookup("{\"id\":\"abc123\",\"expand\":\"details\"}", "c-3");
    assert_found(m, "abc123", "provider");
    iwt_msg_free(m);
    ck_assert_int_eq(exists("resource@details:abc123"), 1);
    ck_assert_int_eq(exists("resource:abc123"), 1);
    m = lookup("{\"id\":\"abc123\",\"expand\":\"details\",\"priority\":\"normal\"}", "c-4");
    assert_found(m, "abc123", "cache");
    iwt_msg_free(m);
    ck_assert_int_eq(resource_gets("abc123"), 2);

    /* the contract's key holds the id's OurFormat after a look-up of any
     * variant, and deleting it (as a system that follows the spec does when
     * the resource changes) sends every variant back to the provider */
    iwt_redis_int("DEL %s:resource:abc123", ns);
    m = lookup("{\"id\":\"abc123\",\"expand\":\"details\"}", "c-5");
    assert_found(m, "abc123", "provider");
    iwt_msg_free(m);
    ck_assert_int_eq(resource_gets("abc123"), 3);
    ck_assert_int_eq(exists("resource:abc123"), 1);
    iwt_redis_int("DEL %s:resource:abc123", ns);
    m = lookup_id("abc123", "c-6");
    assert_found(m, "abc123", "provider");
    iwt_msg_free(m);
    ck_assert_int_eq(resource_gets("abc123"), 4);
    json_decref(want);
    finish();
}
END_TEST

START_TEST(test_transform)
{
    iwt_msg *m;
    json_t *data;

    start("res-xform", 1, NULL);
    m = lookup_id("inactive-7", "c-1");
    assert_found(m, "inactive-7", "provider");
    data = json_object_get(m->body, "data");
    ck_assert_str_eq(json_string_value(json_object_get(data, "status")), "inactive");
    ck_assert_str_eq(json_string_value(json_object_get(data, "externalId")), "inactive-7");
    iwt_msg_free(m);

    /* any ext_status but ACTIVE is inactive; extra members are dropped; a
     * fractional field_two stays a number */
    mock_put_resource("custom-1", "{\"id\":\"ext-9\",\"ext_name\":\"Nine\",\"ext_status\":"
                                  "\"SUSPENDED\",\"ext_data\":{\"field_one\":\"x\",\"field_two\":"
                                  "3.5,\"extra\":1},\"noise\":true}");
    m = lookup_id("custom-1", "c-2");
    assert_found(m, "custom-1", "provider");
    json_t *want = json_pack("{s:s, s:s, s:s, s:{s:s, s:f}}", "externalId", "ext-9", "name", "Nine",
                             "status", "inactive", "details", "fieldOne", "x", "fieldTwo", 3.5);
    ck_assert_msg(json_equal(json_object_get(m->body, "data"), want), "data: %s", m->raw);
    json_decref(want);
    iwt_msg_free(m);

    /* a body of the wrong shape: an error reply, nothing cached, still serving */
    m = lookup_id("malformed-1", "c-3");
    ck_assert_str_eq(reply_error_code(m), "EXTERNAL_API_BAD_RESPONSE");
    ck_assert_str_eq(json_string_value(json_object_get(m->body, "id")), "malformed-1");
    ck_assert_ptr_null(json_object_get(m->body, "found"));
    iwt_msg_free(m);
    ck_assert_int_eq(exists("resource:malformed-1"), 0);
    mock_put_resource("wrongtype-1", "{\"id\":\"w\",\"ext_name\":\"W\",\"ext_status\":\"ACTIVE\","
                                     "\"ext_data\":{\"field_one\":\"x\",\"field_two\":\"42\"}}");
    m = lookup_id("wrongtype-1", "c-4");
    ck_assert_str_eq(reply_error_code(m), "EXTERNAL_API_BAD_RESPONSE");
    iwt_msg_free(m);
    m = lookup_id("abc", "c-5");
    assert_found(m, "abc", "provider");
    iwt_msg_free(m);
    finish();
}
END_TEST

/* ---- scenario 2: 404 ------------------------------------------------------------ */

START_TEST(test_not_found_remembered)
{
    iwt_msg *m;
    long long ttl;
    char *log;

    start("res-404", 1, NULL);
    m = lookup_id("missing-1", "c-1");
    ck_assert(json_is_false(json_object_get(m->body, "found")));
    ck_assert(json_is_null(json_object_get(m->body, "data")));
    ck_assert_str_eq(reply_source(m), "provider");
    iwt_msg_free(m);
    ttl = pttl("resource-missing", "missing-1");
    ck_assert_msg(ttl > 25000 && ttl <= 30000, "PTTL %lld", ttl);
    ck_assert_int_eq(exists("resource:missing-1"), 0);

    m = lookup_id("missing-1", "c-2");
    ck_assert(json_is_false(json_object_get(m->body, "found")));
    ck_assert(json_is_null(json_object_get(m->body, "data")));
    ck_assert_str_eq(reply_source(m), "cache");
    iwt_msg_free(m);
    ck_assert_int_eq(resource_gets("missing-1"), 1);

    ck_assert_int_eq(iwt_stop(workers[0], SIGTERM), 0);
    workers[0] = -1;
    log = worker_log(0);
    ck_assert_msg(strstr(log, "\"level\":\"WARN\"") &&
                      strstr(log, "\"resourceId\":\"missing-1\",\"state\":\"calling\""),
                  "no WARN line for the 404");
    free(log);
    finish();
}
END_TEST

/* ---- coalescing ----------------------------------------------------------------- */

static void burst(const char *id, int n)
{
    char body[128], corr[64];

    snprintf(body, sizeof body, "{\"id\":\"%s\"}", id);
    for (int i = 0; i < n; i++) {
        snprintf(corr, sizeof corr, "burst-%d", i);
        publish_get(body, corr);
    }
    for (int i = 0; i < n; i++) {
        snprintf(corr, sizeof corr, "burst-%d", i);
        iwt_msg *m = wait_reply(corr, 10000);
        ck_assert_msg(m != NULL, "no reply to %s", corr);
        ck_assert_msg(json_is_true(json_object_get(m->body, "found")), "%s", m->raw);
        iwt_msg_free(m);
    }
}

START_TEST(test_coalescing)
{
    start("res-coal", 1, NULL);
    wait_ready();
    set_faults("{\"latency_ms\":300}");
    burst("hot-1", 100);
    ck_assert_int_eq(resource_gets("hot-1"), 1);
    finish();
}
END_TEST

static int consumers(const char *queue)
{
    return iwt_queue_consumers(amqp, queue);
}

START_TEST(test_coalescing_two_processes)
{
    char queue[256];
    char *log;

    start("res-coal2", 2, NULL);
    snprintf(queue, sizeof queue, "%s.resource", ns);
    IWT_EVENTUALLY(consumers(queue) >= 2, 10000);
    ck_assert_int_eq(consumers(queue), 2);
    set_faults("{\"latency_ms\":300}");
    burst("hot-2", 100);
    ck_assert_int_eq(resource_gets("hot-2"), 1);
    /* both processes answered part of the burst: the lock, not luck */
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(iwt_stop(workers[i], SIGTERM), 0);
        workers[i] = -1;
        log = worker_log(i);
        ck_assert_msg(strstr(log, "look-up answered"), "resolver %d answered nothing", i);
        free(log);
    }
    finish();
}
END_TEST

/* ---- fallback ------------------------------------------------------------------- */

START_TEST(test_stale_fallback)
{
    static const char *const env[] = {"IW_CACHE_TTL=1s", NULL};
    iwt_msg *m;
    json_t *first;
    long long t0;

    start("res-stale", 1, env);
    m = lookup_id("abc", "c-1");
    assert_found(m, "abc", "provider");
    first = json_incref(json_object_get(m->body, "data"));
    iwt_msg_free(m);
    /* the fresh entry expires after IW_CACHE_TTL; the stale copy stays */
    ck_assert(iwt_eventually(key_absent, "resource:abc", 3000));
    ck_assert_int_eq(exists("resource-stale:abc"), 1);

    set_faults("{\"outage\":true}");
    t0 = iwt_now_ms();
    m = lookup_id("abc", "c-2");
    assert_found(m, "abc", "stale-cache");
    ck_assert(json_equal(json_object_get(m->body, "data"), first));
    ck_assert_msg(iwt_now_ms() - t0 < 1500, "stale answer took %lld ms", iwt_now_ms() - t0);
    iwt_msg_free(m);
    /* the provider was tried (bounded: IW_RESOLVER_RETRY_SCHEDULE, 2 attempts) */
    ck_assert_int_eq(resource_gets("abc"), 3);

    /* recovered: the next look-up refreshes the entry */
    set_faults("{\"outage\":false}");
    m = lookup_id("abc", "c-3");
    assert_found(m, "abc", "provider");
    iwt_msg_free(m);
    json_decref(first);
    finish();
}
END_TEST

START_TEST(test_unavailable_nothing_cached)
{
    iwt_msg *m;
    long long t0;

    start("res-down", 1, NULL);
    wait_ready();
    set_faults("{\"outage\":true}");
    t0 = iwt_now_ms();
    m = lookup_id("new-1", "c-1");
    ck_assert_str_eq(reply_error_code(m), "EXTERNAL_API_UNAVAILABLE");
    ck_assert_ptr_nonnull(strstr(m->raw, "503"));
    ck_assert_msg(iwt_now_ms() - t0 < 1000, "error took %lld ms", iwt_now_ms() - t0);
    iwt_msg_free(m);
    ck_assert_int_eq(resource_gets("new-1"), 2);
    ck_assert_int_eq(exists("resource-lock:new-1"), 0);
    finish();
}
END_TEST

START_TEST(test_slow_provider)
{
    static const char *const env[] = {"IW_RESOLVER_WAIT=300ms", NULL};
    iwt_msg *m;
    long long t0;

    start("res-slow", 1, env);
    wait_ready();
    set_faults("{\"latency_ms\":1200}");
    t0 = iwt_now_ms();
    m = lookup_id("slow-1", "c-1");
    ck_assert_str_eq(reply_error_code(m), "EXTERNAL_API_TIMEOUT");
    ck_assert_msg(iwt_now_ms() - t0 < 1000, "error took %lld ms", iwt_now_ms() - t0);
    iwt_msg_free(m);
    /* the call goes on and fills the cache for the next caller */
    ck_assert(iwt_eventually(key_present, "resource:slow-1", 3000));
    set_faults("{\"latency_ms\":0}");
    m = lookup_id("slow-1", "c-2");
    assert_found(m, "slow-1", "cache");
    iwt_msg_free(m);
    ck_assert_int_eq(resource_gets("slow-1"), 1);
    finish();
}
END_TEST

START_TEST(test_rate_limited)
{
    static const char *const env[] = {"IW_RATE_LIMITS=2/min", NULL};
    iwt_msg *m;
    long long t0;

    start("res-rate", 1, env);
    m = lookup_id("r-1", "c-1");
    assert_found(m, "r-1", "provider");
    iwt_msg_free(m);
    m = lookup_id("r-2", "c-2");
    assert_found(m, "r-2", "provider");
    iwt_msg_free(m);
    /* the window is spent: answered at once, not after a minute */
    t0 = iwt_now_ms();
    m = lookup_id("r-3", "c-3");
    ck_assert_str_eq(reply_error_code(m), "RATE_LIMITED");
    ck_assert_msg(iwt_now_ms() - t0 < 1000, "error took %lld ms", iwt_now_ms() - t0);
    iwt_msg_free(m);
    ck_assert_int_eq(resource_gets("r-3"), 0);
    /* a cached entry needs no permit */
    m = lookup_id("r-1", "c-4");
    assert_found(m, "r-1", "cache");
    iwt_msg_free(m);
    finish();
}
END_TEST

START_TEST(test_redis_down)
{
    static const char *const env[] = {"IW_REDIS_URL=redis://127.0.0.1:1", NULL};
    iwt_msg *m;

    start("res-noredis", 1, env);
    m = lookup_id("abc", "c-1");
    ck_assert_str_eq(reply_error_code(m), "CACHE_UNAVAILABLE");
    iwt_msg_free(m);
    /* the limiter fails closed: no unmetered call */
    ck_assert_int_eq(resource_gets("abc"), 0);
    finish();
}
END_TEST

/* ---- invalidation --------------------------------------------------------------- */

START_TEST(test_invalidate_message)
{
    iwt_msg *m;
    char key[256];

    start("res-inval", 1, NULL);
    iwt_msg_free(lookup_id("abc", "c-1"));
    iwt_msg_free(lookup("{\"id\":\"abc\",\"expand\":\"details\"}", "c-2"));
    iwt_msg_free(lookup_id("missing-2", "c-3"));
    ck_assert_int_eq(exists("resource:abc"), 1);
    ck_assert_int_eq(exists("resource@details:abc"), 1);
    ck_assert_int_eq(exists("resource-stale:abc"), 1);

    iwt_publish(amqp, requests_exchange, "resource.invalidate", "{\"id\":\"abc\"}",
                "application/json", reply_queue, "inv-1");
    m = wait_reply("inv-1", REPLY_WAIT_MS);
    ck_assert_ptr_nonnull(m);
    json_t *want = json_pack("{s:s, s:b}", "id", "abc", "invalidated", 1);
    ck_assert_msg(json_equal(m->body, want), "%s", m->raw);
    json_decref(want);
    iwt_msg_free(m);
    ck_assert_int_eq(exists("resource:abc"), 0);
    ck_assert_int_eq(exists("resource@details:abc"), 0);
    ck_assert_int_eq(exists("resource-stale:abc"), 0);
    ck_assert_int_eq(exists("resource-stale@details:abc"), 0);
    ck_assert_int_eq(exists("resource-variants:abc"), 0);
    m = lookup_id("abc", "c-4");
    assert_found(m, "abc", "provider");
    iwt_msg_free(m);

    /* without reply_to: no reply, the remembered 404 goes too */
    ck_assert_int_eq(exists("resource-missing:missing-2"), 1);
    iwt_publish(amqp, requests_exchange, "resource.invalidate", "{\"id\":\"missing-2\"}",
                "application/json", NULL, NULL);
    snprintf(key, sizeof key, "resource-missing:missing-2");
    IWT_EVENTUALLY(!exists(key), 5000);
    ck_assert_int_eq(exists(key), 0);
    ck_assert_ptr_null(iwt_get(amqp, reply_queue, 300));
    finish();
}
END_TEST

START_TEST(test_invalidate_command)
{
    static const char *const bad_redis[] = {"IW_REDIS_URL=redis://127.0.0.1:1", NULL};
    const char *args[] = {"cache", "invalidate", "abc", NULL};
    char *out = NULL;
    iwt_msg *m;

    start("res-invcmd", 1, NULL);
    iwt_msg_free(lookup_id("abc", "c-1"));
    iwt_msg_free(lookup("{\"id\":\"abc\",\"expand\":\"x:y\"}", "c-2"));
    ck_assert_int_eq(exists("resource:abc"), 1);
    ck_assert_int_eq(exists("resource@x%3Ay:abc"), 1);
    ck_assert_int_eq(iwt_run_worker_cmd(args, ns, port, NULL, &out), 0);
    ck_assert_ptr_nonnull(strstr(out, "abc"));
    ck_assert_ptr_nonnull(strchr(out, '\n'));
    ck_assert_msg(strchr(out, '\n')[1] == '\0', "more than one line: %s", out);
    free(out);
    ck_assert_int_eq(exists("resource:abc"), 0);
    ck_assert_int_eq(exists("resource@x%3Ay:abc"), 0);
    ck_assert_int_eq(exists("resource-stale:abc"), 0);
    m = lookup_id("abc", "c-3");
    assert_found(m, "abc", "provider");
    iwt_msg_free(m);

    ck_assert_int_eq(iwt_run_worker_cmd(args, ns, port, bad_redis, NULL), 1);
    finish();
}
END_TEST

/* ---- malformed requests --------------------------------------------------------- */

static iwt_msg *next_dead(void)
{
    char dead[256];
    snprintf(dead, sizeof dead, "%s.dead", ns);
    return iwt_get(amqp, dead, REPLY_WAIT_MS);
}

static void assert_dead(iwt_msg *d, const char *code, const char *body)
{
    char queue[256];

    snprintf(queue, sizeof queue, "%s.resource", ns);
    ck_assert_ptr_nonnull(d);
    ck_assert_str_eq(json_string_value(json_object_get(d->headers, "x-error-code")), code);
    ck_assert_str_eq(json_string_value(json_object_get(d->headers, "x-original-queue")), queue);
    ck_assert_ptr_nonnull(json_string_value(json_object_get(d->headers, "x-error-message")));
    ck_assert_str_eq(d->raw, body);
    iwt_msg_free(d);
}

START_TEST(test_malformed_requests)
{
    iwt_msg *m;

    start("res-bad", 1, NULL);
    /* no reply_to: nowhere to answer */
    iwt_publish(amqp, requests_exchange, "resource.get", "{\"id\":\"abc\"}", "application/json",
                NULL, "c-1");
    assert_dead(next_dead(), "MISSING_REPLY_TO", "{\"id\":\"abc\"}");

    /* not JSON: dead letter, and an error reply since it has a reply_to */
    publish_get("{\"id\":", "c-2");
    m = wait_reply("c-2", REPLY_WAIT_MS);
    ck_assert_ptr_nonnull(m);
    ck_assert_str_eq(reply_error_code(m), "INVALID_JSON");
    iwt_msg_free(m);
    assert_dead(next_dead(), "INVALID_JSON", "{\"id\":");

    /* schema violations */
    publish_get("{\"id\":42}", "c-3");
    iwt_msg_free(wait_reply("c-3", REPLY_WAIT_MS));
    assert_dead(next_dead(), "SCHEMA_VIOLATION", "{\"id\":42}");
    publish_get("{\"id\":\"abc\",\"priority\":\"urgent\"}", "c-4");
    iwt_msg_free(wait_reply("c-4", REPLY_WAIT_MS));
    assert_dead(next_dead(), "SCHEMA_VIOLATION", "{\"id\":\"abc\",\"priority\":\"urgent\"}");
    iwt_publish(amqp, requests_exchange, "resource.get", "{\"id\":\"abc\"}", "text/plain",
                reply_queue, "c-5");
    iwt_msg_free(wait_reply("c-5", REPLY_WAIT_MS));
    assert_dead(next_dead(), "INVALID_CONTENT_TYPE", "{\"id\":\"abc\"}");
    iwt_publish(amqp, requests_exchange, "resource.invalidate", "{}", "application/json", NULL,
                NULL);
    assert_dead(next_dead(), "SCHEMA_VIOLATION", "{}");

    /* still serving */
    m = lookup_id("abc", "c-6");
    assert_found(m, "abc", "provider");
    iwt_msg_free(m);
    ck_assert_int_eq(waitpid(workers[0], NULL, WNOHANG), 0);
    finish();
}
END_TEST

static Suite *resolver_suite(void)
{
    Suite *s = suite_create("resolver");
    TCase *tc = tcase_create("resolver");

    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_miss_then_hit);
    tcase_add_test(tc, test_transform);
    tcase_add_test(tc, test_not_found_remembered);
    tcase_add_test(tc, test_coalescing);
    tcase_add_test(tc, test_coalescing_two_processes);
    tcase_add_test(tc, test_stale_fallback);
    tcase_add_test(tc, test_unavailable_nothing_cached);
    tcase_add_test(tc, test_slow_provider);
    tcase_add_test(tc, test_rate_limited);
    tcase_add_test(tc, test_redis_down);
    tcase_add_test(tc, test_invalidate_message);
    tcase_add_test(tc, test_invalidate_command);
    tcase_add_test(tc, test_malformed_requests);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(resolver_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
