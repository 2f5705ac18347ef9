/* Integration suite of the provider's auth: the OAuth2 token fetched on the
 * event loop and shared by the fleet (an outage of the token endpoint costs
 * no job, a token expires and is renewed, one process fetches for all), and
 * a 401 after a token was revoked leads to one refresh and one retry.
 * Real RabbitMQ and Redis on loopback, a real mock-provider, real workers;
 * each test in its own namespace. */
#include <arpa/inet.h>
#include <check.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "http_client.h"
#include "iwtest.h"
#include "loop.h"
#include "redis_link.h"

#define CLIENT_ID "auth-client"
#define CLIENT_SECRET "auth-client-secret"
#define SUBMIT_ROUTE "POST /api/v1/external-resource"
#define TOKEN_ROUTE "POST /oauth/token"

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

static void publish_job(iwt_amqp *a, const char *job_id)
{
    char body[512];
    snprintf(body, sizeof body,
             "{\"jobId\":\"%s\",\"userId\":\"u-1\",\"action\":\"transaction\","
             "\"payload\":{\"amount\":5}}",
             job_id);
    iwt_publish_job(a, ns, body);
}

static int dead_letters(void)
{
    char dead[256];
    iwt_amqp *g = iwt_amqp_open();
    snprintf(dead, sizeof dead, "%s.dead", ns);
    int n = iwt_queue_depth(g, dead);
    iwt_amqp_close(g);
    return n;
}

static long long stat_num(int port, const char *key)
{
    json_t *s = iwt_mock_stats(port);
    long long v = json_integer_value(json_object_get(s, key));
    json_decref(s);
    return v;
}

static long route_stat(int port, const char *route, const char *status)
{
    json_t *s = iwt_mock_stats(port);
    long v = iwt_stat(s, route, status);
    json_decref(s);
    return v;
}

/* All requests the mock saw on a route, whatever their status. */
static long route_total(int port, const char *route)
{
    json_t *s = iwt_mock_stats(port);
    json_t *by = json_object_get(json_object_get(s, "requests"), route);
    const char *k;
    json_t *v;
    long n = 0;
    json_object_foreach(by, k, v) n += (long)json_integer_value(v);
    json_decref(s);
    return n;
}

/* Log lines of a worker (JSON, one a line) whose `key` is `value` and whose
 * level is `level` (NULL: any). */
static int count_log(const char *tag, const char *key, const char *value, const char *level)
{
    json_t *lines = iwt_worker_log(ns, tag), *j;
    size_t i;
    int n = 0;

    json_array_foreach(lines, i, j)
    {
        const char *v = json_string_value(json_object_get(j, key));
        const char *l = json_string_value(json_object_get(j, "level"));
        if (v && strcmp(v, value) == 0 && (!level || (l && strcmp(l, level) == 0)))
            n++;
    }
    json_decref(lines);
    return n;
}

static const char *const oauth_mock[] = {"--auth",
                                         "oauth2",
                                         "--client-id",
                                         CLIENT_ID,
                                         "--client-secret",
                                         CLIENT_SECRET,
                                         "--checks-to-complete",
                                         "1",
                                         NULL};

#define OAUTH_ENV                                                                                  \
    "IW_AUTH_MODE=oauth2", "IW_OAUTH_CLIENT_ID=" CLIENT_ID, "IW_OAUTH_CLIENT_SECRET=" CLIENT_SECRET

/* The token endpoint answers 503 for `outage_ms` (30 s, the outage)
 * while jobs arrive: none is sent without a token, none fails, none is
 * dead-lettered; the outage is logged once when it starts and once when it
 * ends, and counted in the metrics; after it every job ends in status.final. */
START_TEST(token_outage_loses_no_job)
{
    int port, http_port = iwt_free_port();
    long outage_ms = getenv("IWT_TOKEN_OUTAGE_MS") ? atol(getenv("IWT_TOKEN_OUTAGE_MS")) : 30000;
    char addr[64], ids[6][64];
    iwt_amqp *a = setup("auth-outage", oauth_mock, &port);
    snprintf(addr, sizeof addr, "IW_HTTP_ADDR=127.0.0.1:%d", http_port);
    const char *env[] = {OAUTH_ENV, addr, "IW_TOKEN_BACKOFF_MAX=8s", NULL};

    /* down before the first token: every fetch fails */
    json_t *script = json_array();
    for (int i = 0; i < 2000; i++)
        json_array_append_new(script, json_integer(503));
    json_t *body = json_pack("{s:{s:o}}", "script", TOKEN_ROUTE, script);
    char *text = json_dumps(body, JSON_COMPACT);
    ck_assert_int_eq(iwt_mock_post(port, "/__admin/faults", text), 200);
    free(text);
    json_decref(body);

    iwt_track(iwt_start_worker("all", ns, port, env, "all"));
    long long t0 = iwt_now_ms();
    for (int i = 0; i < 6; i++) {
        snprintf(ids[i], sizeof ids[i], "auth-outage-%d", i);
        publish_job(a, ids[i]);
    }
    /* a look-up during the outage: the provider is unavailable (not a 429) */
    iwt_amqp *r = iwt_amqp_open();
    amqp_queue_declare_ok_t *q =
        amqp_queue_declare(r->conn, 1, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    ck_assert_ptr_nonnull(q);
    char reply_q[256], reqx[256];
    snprintf(reply_q, sizeof reply_q, "%.*s", (int)q->queue.len, (char *)q->queue.bytes);
    snprintf(reqx, sizeof reqx, "%s.requests", ns);
    iwt_publish(a, reqx, "resource.get", "{\"id\":\"abc123\"}", "application/json", reply_q,
                "outage-get");
    iwt_msg *reply = iwt_get(r, reply_q, 20000);
    ck_assert_ptr_nonnull(reply);
    const char *code =
        json_string_value(json_object_get(json_object_get(reply->body, "error"), "code"));
    ck_assert_msg(code && strcmp(code, "EXTERNAL_API_UNAVAILABLE") == 0, "reply: %s", reply->raw);
    iwt_msg_free(reply);
    iwt_amqp_close(r);
    /* the whole outage: no call without a token, no failure, no dead letter */
    ck_assert(IWT_EVENTUALLY(count_log("all", "operation", "oauth_token", "ERROR") == 1, 15000));
    while (iwt_now_ms() - t0 < outage_ms) {
        ck_assert_int_eq(route_total(port, SUBMIT_ROUTE), 0);
        ck_assert_int_eq(dead_letters(), 0);
        iwt_msg *m = iwt_next_event(a, 500);
        ck_assert_msg(m == NULL, "an event during the token outage: %s", m ? m->routing_key : "");
    }
    ck_assert_int_ge(route_stat(port, TOKEN_ROUTE, "503"), 3); /* retried, with backoff */
    ck_assert_int_le(route_stat(port, TOKEN_ROUTE, "503"), 12);
    ck_assert_int_eq(count_log("all", "operation", "oauth_token", "ERROR"), 1);
    char *metrics = NULL;
    ck_assert_int_eq(iwt_http_get(http_port, "/metrics", &metrics), 200);
    ck_assert_double_gt(
        iwt_metric(metrics, "iw_job_waits_total{role=\"submitter\",reason=\"token\"}"), 0);
    ck_assert_double_ge(
        iwt_metric(metrics, "iw_provider_requests_total{route=\"token\",code=\"5xx\"}"), 3);
    free(metrics);

    /* the endpoint is back: every job completes, none failed */
    ck_assert_int_eq(iwt_mock_post(port, "/__admin/faults", "{\"script\":{}}"), 200);
    for (int i = 0; i < 6; i++) {
        iwt_msg *m = iwt_wait_event(a, "status.final", ids[i], 60000);
        ck_assert_msg(m != NULL, "no status.final for %s", ids[i]);
        iwt_msg_free(m);
    }
    ck_assert_int_eq(iwt_count_events(a, "submission.failed", NULL, 500), 0);
    ck_assert_int_eq(dead_letters(), 0);
    ck_assert_int_eq(route_stat(port, SUBMIT_ROUTE, "401"), 0);
    ck_assert(IWT_EVENTUALLY(count_log("all", "operation", "oauth_token", "INFO") == 1, 5000));
    ck_assert_int_eq(count_log("all", "operation", "oauth_token", "ERROR"), 1);
    teardown_all(a);
}
END_TEST

static void token_endpoint_fails(int port)
{
    json_t *script = json_array();
    for (int i = 0; i < 2000; i++)
        json_array_append_new(script, json_integer(503));
    json_t *body = json_pack("{s:{s:o}}", "script", TOKEN_ROUTE, script);
    char *text = json_dumps(body, JSON_COMPACT);
    ck_assert_int_eq(iwt_mock_post(port, "/__admin/faults", text), 200);
    free(text);
    json_decref(body);
}

/* The token endpoint's 5xx count toward the fleet's breaker like any
 * route's: it opens, no token is fetched while it is open, and the
 * half-open probe (token and call) closes it once the endpoint is back. */
START_TEST(token_failures_open_the_breaker)
{
    int port;
    char key[256];
    iwt_amqp *a = setup("auth-breaker", oauth_mock, &port);
    const char *env[] = {OAUTH_ENV, "IW_TOKEN_BACKOFF_MIN=100ms", "IW_TOKEN_BACKOFF_MAX=200ms",
                         "IW_BREAKER_OPEN=4s", NULL};
    token_endpoint_fails(port);
    iwt_track(iwt_start_worker("all", ns, port, env, "all"));
    publish_job(a, "auth-breaker-1");
    snprintf(key, sizeof key, "%s:breaker:open", ns);
    ck_assert(IWT_EVENTUALLY(iwt_redis_int("EXISTS %s", key) == 1, 20000));
    long fetched = route_total(port, TOKEN_ROUTE);
    ck_assert_int_ge(fetched, 5);
    iwt_sleep_ms(2000); /* inside the open period: no call on any route */
    ck_assert_int_le(route_total(port, TOKEN_ROUTE),
                     fetched + 1); /* one may have been on its way */
    ck_assert_int_eq(route_total(port, SUBMIT_ROUTE), 0);
    ck_assert_int_eq(iwt_mock_post(port, "/__admin/faults", "{\"script\":{}}"), 200);
    iwt_msg *m = iwt_wait_event(a, "status.final", "auth-breaker-1", 30000);
    ck_assert_msg(m != NULL, "no status.final once the token endpoint is back");
    iwt_msg_free(m);
    ck_assert_int_eq(iwt_redis_int("EXISTS %s", key), 0);
    ck_assert_int_eq(dead_letters(), 0);
    teardown_all(a);
}
END_TEST

/* Tokens that live 3 s: renewed before they expire (no 401), the renewed
 * token stored for the fleet; and a token revoked early (the mock forgets
 * it) costs one 401, one refresh and one retry of that call. */
START_TEST(token_expiry_and_refresh)
{
    int port;
    const char *mock[] = {"--auth",
                          "oauth2",
                          "--client-id",
                          CLIENT_ID,
                          "--client-secret",
                          CLIENT_SECRET,
                          "--checks-to-complete",
                          "1",
                          "--token-ttl",
                          "3",
                          NULL};
    iwt_amqp *a = setup("auth-expiry", mock, &port);
    const char *env[] = {OAUTH_ENV, NULL};
    char id[64], key[256];

    iwt_track(iwt_start_worker("all", ns, port, env, "all"));
    long long t0 = iwt_now_ms();
    for (int i = 0; iwt_now_ms() - t0 < 8000; i++) {
        snprintf(id, sizeof id, "auth-exp-%d", i);
        publish_job(a, id);
        iwt_msg *m = iwt_wait_event(a, "status.final", id, 20000);
        ck_assert_msg(m != NULL, "no status.final for %s", id);
        iwt_msg_free(m);
        iwt_sleep_ms(300);
    }
    /* 8 s of 3-s tokens renewed at 80%: at least three, and not one per call */
    long long issued = stat_num(port, "tokens_issued");
    ck_assert_int_ge(issued, 3);
    ck_assert_int_le(issued, 6);
    ck_assert_int_eq(route_stat(port, SUBMIT_ROUTE, "401"), 0);
    ck_assert_int_eq(route_stat(port, "GET /api/v1/status/{trackingId}", "401"), 0);
    snprintf(key, sizeof key, "%s:oauth:token", ns);
    long long pttl = iwt_redis_int("PTTL %s", key);
    ck_assert_int_gt(pttl, 0);
    ck_assert_int_le(pttl, 3000);

    /* revoked: the mock forgets every token (and its counters) */
    ck_assert_int_eq(iwt_mock_post(port, "/__admin/reset", "{}"), 200);
    publish_job(a, "auth-exp-revoked");
    iwt_msg *m = iwt_wait_event(a, "status.final", "auth-exp-revoked", 20000);
    ck_assert_msg(m != NULL, "no status.final after the token was revoked");
    iwt_msg_free(m);
    ck_assert_int_eq(route_stat(port, SUBMIT_ROUTE, "401"), 1);
    ck_assert_int_eq(route_stat(port, SUBMIT_ROUTE, "201"), 1);
    ck_assert_int_ge(stat_num(port, "tokens_issued"), 1);
    ck_assert_int_eq(iwt_count_events(a, "submission.failed", NULL, 500), 0);
    ck_assert_int_eq(dead_letters(), 0);
    teardown_all(a);
}
END_TEST

/* Two submitter processes share one token: one fetch for both. */
START_TEST(one_fetcher_for_two_processes)
{
    int port;
    iwt_amqp *a = setup("auth-fleet", oauth_mock, &port);
    const char *env[] = {OAUTH_ENV, NULL};
    char id[64];

    /* a slow token endpoint: both processes want a token while it runs */
    ck_assert_int_eq(iwt_mock_post(port, "/__admin/faults", "{\"latency_ms\":300}"), 200);
    iwt_track(iwt_start_worker("submitter", ns, port, env, "sub-a"));
    iwt_track(iwt_start_worker("submitter", ns, port, env, "sub-b"));
    iwt_track(iwt_start_worker("poller", ns, port, env, "poller"));
    char q[256];
    snprintf(q, sizeof q, "%s.submit", ns);
    ck_assert(IWT_EVENTUALLY(iwt_queue_consumers(a, q) == 2, 20000));
    for (int i = 0; i < 20; i++) {
        snprintf(id, sizeof id, "auth-fleet-%d", i);
        publish_job(a, id);
    }
    for (int i = 0; i < 20; i++) {
        snprintf(id, sizeof id, "auth-fleet-%d", i);
        iwt_msg *m = iwt_wait_event(a, "status.final", id, 30000);
        ck_assert_msg(m != NULL, "no status.final for %s", id);
        iwt_msg_free(m);
    }
    /* both processes called the provider, with one token between them */
    ck_assert_int_gt(count_log("sub-a", "operation", "POST /external-resource", NULL), 0);
    ck_assert_int_gt(count_log("sub-b", "operation", "POST /external-resource", NULL), 0);
    /* one fetch between them, and who made it (their debug lines) when not */
    int fetches[3] = {count_log("sub-a", "operation", "oauth_token", NULL),
                      count_log("sub-b", "operation", "oauth_token", NULL),
                      count_log("poller", "operation", "oauth_token", NULL)};
    long long issued = stat_num(port, "tokens_issued");
    ck_assert_msg(issued == 1 && fetches[0] + fetches[1] + fetches[2] == 1,
                  "%lld tokens issued; fetched by sub-a %d, sub-b %d, poller %d time(s)", issued,
                  fetches[0], fetches[1], fetches[2]);
    ck_assert_int_eq(route_stat(port, SUBMIT_ROUTE, "401"), 0);
    teardown_all(a);
}
END_TEST

/* ---- the lock won just after another fetch ---------------------------------------------- */

/* A relay between a client's Redis link and Redis, which plays another
 * process at one instant: when the client's `SET <lock> NX` comes by, that
 * process's fetch ends first (its token stored, its lock released), then the
 * command goes on.  This is the interleaving CLIENT PAUSE could not force:
 * the client read an empty store, and wins a free lock after the fleet's
 * token was stored. */
typedef struct relay {
    int lfd, port;
    char lock_key[256], token_key[256], stored[1024];
    int played; /* the other fetch ended just before the client's SET NX */
    pthread_t th;
} relay;

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void other_fetch_ends(relay *r)
{
    redisContext *d = redisConnect("127.0.0.1", 6379);
    if (!d || d->err) {
        redisFree(d);
        return;
    }
    freeReplyObject(redisCommand(d, "SET %s %s PX 3600000", r->token_key, r->stored));
    freeReplyObject(redisCommand(d, "DEL %s", r->lock_key));
    redisFree(d);
    __atomic_store_n(&r->played, 1, __ATOMIC_SEQ_CST);
}

static void *relay_main(void *ud)
{
    relay *r = ud;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(6379)};
    int c = accept(r->lfd, NULL, NULL), u = socket(AF_INET, SOCK_STREAM, 0);
    static char buf[65536];

    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (c >= 0 && u >= 0 && connect(u, (struct sockaddr *)&a, sizeof a) == 0) {
        for (;;) {
            struct pollfd p[2] = {{.fd = c, .events = POLLIN}, {.fd = u, .events = POLLIN}};
            ssize_t n;
            if (poll(p, 2, -1) < 0)
                break;
            if (p[0].revents) {
                if ((n = read(c, buf, sizeof buf)) <= 0)
                    break;
                if (!__atomic_load_n(&r->played, __ATOMIC_SEQ_CST) &&
                    memmem(buf, (size_t)n, r->lock_key, strlen(r->lock_key)) &&
                    memmem(buf, (size_t)n, "\r\nNX\r\n", 6))
                    other_fetch_ends(r);
                if (write_all(u, buf, (size_t)n) != 0)
                    break;
            }
            if (p[1].revents) {
                if ((n = read(u, buf, sizeof buf)) <= 0 || write_all(c, buf, (size_t)n) != 0)
                    break;
            }
        }
    }
    if (c >= 0)
        close(c);
    if (u >= 0)
        close(u);
    return NULL;
}

static void relay_start(relay *r)
{
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t alen = sizeof a;

    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    r->lfd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(r->lfd, 0);
    ck_assert_int_eq(bind(r->lfd, (struct sockaddr *)&a, sizeof a), 0);
    ck_assert_int_eq(listen(r->lfd, 1), 0);
    ck_assert_int_eq(getsockname(r->lfd, (struct sockaddr *)&a, &alen), 0);
    r->port = ntohs(a.sin_port);
    ck_assert_int_eq(pthread_create(&r->th, NULL, relay_main, r), 0);
}

/* A token from the mock's endpoint, as another process would fetch it, in
 * the store's form ("<lifetime ms> <token>"). */
static void fetch_token(int port, char *out, size_t out_len)
{
    char *body = NULL;

    ck_assert_int_eq(iwt_http_post_form(port, "/oauth/token",
                                        "grant_type=client_credentials&client_id=" CLIENT_ID
                                        "&client_secret=" CLIENT_SECRET,
                                        &body),
                     200);
    json_t *j = json_loads(body, 0, NULL);
    free(body);
    ck_assert_ptr_nonnull(j);
    const char *tok = json_string_value(json_object_get(j, "access_token"));
    ck_assert_ptr_nonnull(tok);
    snprintf(out, out_len, "%lld %s", json_integer_value(json_object_get(j, "expires_in")) * 1000,
             tok);
    json_decref(j);
}

static int race_done;
static http_response race_answer;
static void race_on_done(void *ud, const http_response *r)
{
    (void)ud;
    race_answer = *r;
    race_answer.body = race_answer.error = NULL; /* borrowed */
    race_done = 1;
}

/* The fetcher before us stores its token and unlocks between our empty read
 * of the store and our SET NX: the lock is ours, and the token is there.  The
 * client reads the store again and sends the fleet's token: one token issued
 * in all, no second fetch. */
START_TEST(lock_won_after_a_fetch_takes_the_stored_token)
{
    int port;
    iwt_amqp *a = setup("auth-lockrace", oauth_mock, &port);
    relay r;
    iw_error err = {0};
    char url[512], base[64];

    memset(&r, 0, sizeof r);
    snprintf(r.lock_key, sizeof r.lock_key, "%s:oauth:lock", ns);
    snprintf(r.token_key, sizeof r.token_key, "%s:oauth:token", ns);
    fetch_token(port, r.stored, sizeof r.stored);
    ck_assert_int_eq(stat_num(port, "tokens_issued"), 1);
    relay_start(&r);

    snprintf(url, sizeof url, "redis://iw-test:iw-test@127.0.0.1:%d/0", r.port);
    snprintf(base, sizeof base, "http://127.0.0.1:%d", port);
    redis_link *link = redis_link_new(url, 2000, &err);
    ck_assert_msg(link != NULL, "redis link: %s", err.msg);
    http_client_opts o = {.base_url = base,
                          .auth_mode = IW_AUTH_OAUTH2,
                          .oauth_client_id = CLIENT_ID,
                          .oauth_client_secret = CLIENT_SECRET,
                          .timeout_ms = 5000,
                          .connect_timeout_ms = 2000,
                          .max_response_bytes = 65536,
                          .max_connections = 2,
                          .token_store = link,
                          .ns = ns};
    http_client *c = http_client_new(&o, &err);
    ck_assert_msg(c != NULL, "client: %s", err.msg);
    ck_assert_msg(redis_link_ensure(link, &err) == IW_OK, "redis: %s", err.msg);
    loop *lp = loop_new();
    ck_assert_ptr_nonnull(lp);
    ck_assert_int_eq(http_client_attach(c, lp), IW_OK);

    static const char body[] = "{\"request_data\":{}}";
    race_done = 0;
    ck_assert_int_eq(http_client_start(c, "POST", "/api/v1/external-resource", body,
                                       sizeof body - 1, "lockrace-1", race_on_done, NULL),
                     IW_OK);
    for (long long end = iwt_now_ms() + 10000; !race_done && iwt_now_ms() < end;)
        loop_turn(lp, 20);
    ck_assert_msg(race_done, "the call never ended");
    ck_assert_msg(__atomic_load_n(&r.played, __ATOMIC_SEQ_CST),
                  "the client never tried the lock: the race was not played");
    /* sent with the stored token (the mock knows only the tokens it issued) */
    ck_assert_int_eq(race_answer.result.transport, IW_TRANSPORT_OK);
    ck_assert_int_ne(race_answer.result.status, 401);
    ck_assert_msg(stat_num(port, "tokens_issued") == 1,
                  "%lld tokens issued: the lock's winner fetched a second one",
                  stat_num(port, "tokens_issued"));
    ck_assert_int_eq(route_stat(port, SUBMIT_ROUTE, "401"), 0);

    http_client_free(c);
    redis_link_free(link); /* the relay sees the close and ends */
    loop_free(lp);
    pthread_join(r.th, NULL);
    close(r.lfd);
    teardown_all(a);
}
END_TEST

/* ---- mutual TLS ------------------------------------------------------------------------ */

static char tls_dir[256];

/* A CA, a server certificate for 127.0.0.1 and a client certificate signed
 * by it, and a rogue self-signed client certificate, made with openssl. */
static void make_certs(void)
{
    char cmd[4096];
    snprintf(tls_dir, sizeof tls_dir, "/tmp/iwt-auth-tls-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tls_dir));
    snprintf(cmd, sizeof cmd,
             "cd %s && "
             "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 "
             "-subj /CN=iwt-ca && "
             "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr "
             "-subj /CN=127.0.0.1 && "
             "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > san.ext && "
             "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
             "-out server.pem -days 2 -extfile san.ext && "
             "openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr "
             "-subj /CN=iwt-worker && "
             "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
             "-out client.pem -days 2 && "
             "openssl req -x509 -newkey rsa:2048 -nodes -keyout rogue.key -out rogue.pem "
             "-days 2 -subj /CN=iwt-rogue",
             tls_dir);
    strcat(cmd, " >/dev/null 2>&1");
    ck_assert_int_eq(system(cmd), 0);
}

static void remove_certs(void)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tls_dir);
    ck_assert_int_eq(system(cmd), 0);
}

typedef struct tls_env {
    char url[96], cert[320], key[320], ca[320];
} tls_env;

static void tls_env_fill(tls_env *t, int port, const char *client)
{
    snprintf(t->url, sizeof t->url, "IW_PROVIDER_URL=https://127.0.0.1:%d", port);
    snprintf(t->cert, sizeof t->cert, "IW_TLS_CERT=%s/%s.pem", tls_dir, client);
    snprintf(t->key, sizeof t->key, "IW_TLS_KEY=%s/%s.key", tls_dir, client);
    snprintf(t->ca, sizeof t->ca, "IW_TLS_CA=%s/ca.pem", tls_dir);
}

/* The mock's flags for HTTPS with client certificates, after `auth`. */
static void tls_mock_args(const char **args, const char *mode, char paths[3][320])
{
    int n = 0;
    snprintf(paths[0], 320, "%s/server.pem", tls_dir);
    snprintf(paths[1], 320, "%s/server.key", tls_dir);
    snprintf(paths[2], 320, "%s/ca.pem", tls_dir);
    args[n++] = "--auth";
    args[n++] = mode;
    args[n++] = "--client-id";
    args[n++] = CLIENT_ID;
    args[n++] = "--client-secret";
    args[n++] = CLIENT_SECRET;
    args[n++] = "--basic-user";
    args[n++] = "iwt-user";
    args[n++] = "--basic-password";
    args[n++] = "iwt-password";
    args[n++] = "--checks-to-complete";
    args[n++] = "1";
    args[n++] = "--tls-cert";
    args[n++] = paths[0];
    args[n++] = "--tls-key";
    args[n++] = paths[1];
    args[n++] = "--tls-ca";
    args[n++] = paths[2];
    args[n] = NULL;
}

/* Each auth mode over mutual TLS: a job goes through submit and status. */
START_TEST(mtls_with_every_auth_mode)
{
    static const char *const modes[] = {"api-key", "oauth2", "basic", "none"};
    make_certs();
    for (size_t m = 0; m < 4; m++) {
        int port;
        const char *args[32];
        char paths[3][320], mode_env[64], name[32], id[64];
        tls_env t;
        tls_mock_args(args, modes[m], paths);
        snprintf(name, sizeof name, "auth-mtls-%zu", m);
        iwt_amqp *a = setup(name, args, &port);
        tls_env_fill(&t, port, "client");
        snprintf(mode_env, sizeof mode_env, "IW_AUTH_MODE=%s", modes[m]);
        const char *env[] = {mode_env,
                             t.url,
                             t.cert,
                             t.key,
                             t.ca,
                             "IW_OAUTH_CLIENT_ID=" CLIENT_ID,
                             "IW_OAUTH_CLIENT_SECRET=" CLIENT_SECRET,
                             "IW_BASIC_USER=iwt-user",
                             "IW_BASIC_PASSWORD=iwt-password",
                             NULL};
        iwt_track(iwt_start_worker("all", ns, port, env, "all"));
        snprintf(id, sizeof id, "auth-mtls-%s", modes[m]);
        publish_job(a, id);
        iwt_msg *e = iwt_wait_event(a, "status.final", id, 30000);
        ck_assert_msg(e != NULL, "no status.final with IW_AUTH_MODE=%s over mTLS", modes[m]);
        iwt_msg_free(e);
        /* (the mock's admin routes are HTTPS too: the events are the proof) */
        ck_assert_int_eq(dead_letters(), 0);
        teardown_all(a);
    }
    remove_certs();
}
END_TEST

/* A client certificate the provider does not trust is refused in the TLS
 * handshake: the job fails as EXTERNAL_API_UNREACHABLE after its attempts,
 * and the log and the event say it was the certificate; with OAuth2 the
 * token endpoint is refused the same way and the outage line says why. */
START_TEST(mtls_wrong_client_certificate_refused)
{
    int port;
    const char *args[32];
    char paths[3][320];
    tls_env t;
    make_certs();
    tls_mock_args(args, "api-key", paths);
    iwt_amqp *a = setup("auth-rogue", args, &port);
    tls_env_fill(&t, port, "rogue");
    const char *env[] = {t.url, t.cert, t.key, t.ca, "IW_RETRY_SCHEDULE=0s,100ms,100ms,100ms",
                         NULL};
    iwt_track(iwt_start_worker("submitter", ns, port, env, "sub"));
    publish_job(a, "auth-rogue-1");
    iwt_msg *e = iwt_wait_event(a, "submission.failed", "auth-rogue-1", 30000);
    ck_assert_ptr_nonnull(e);
    json_t *err = json_object_get(e->body, "error");
    ck_assert_str_eq(json_string_value(json_object_get(err, "code")), "EXTERNAL_API_UNREACHABLE");
    const char *msg = json_string_value(json_object_get(err, "message"));
    ck_assert_msg(msg && strstr(msg, "certificate"), "message: %s", msg ? msg : "(none)");
    iwt_msg_free(e);
    ck_assert_int_eq(iwt_count_events(a, "submission.accepted", "auth-rogue-1", 200), 0);
    teardown_all(a);

    /* OAuth2: the token fetch is refused; jobs wait, the log says why */
    tls_mock_args(args, "oauth2", paths);
    a = setup("auth-rogue-oauth", args, &port);
    tls_env_fill(&t, port, "rogue");
    const char *env2[] = {t.url, t.cert, t.key, t.ca, OAUTH_ENV, NULL};
    iwt_track(iwt_start_worker("submitter", ns, port, env2, "sub"));
    publish_job(a, "auth-rogue-2");
    ck_assert(IWT_EVENTUALLY(count_log("sub", "operation", "oauth_token", "ERROR") == 1, 20000));
    ck_assert_int_eq(iwt_count_events(a, "submission.failed", "auth-rogue-2", 1000), 0);
    ck_assert_int_eq(dead_letters(), 0);
    char path[512], line[65536];
    int seen = 0;
    snprintf(path, sizeof path, "%s/iwtest-%s-sub.log", iwt_log_dir(), ns);
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    while (fgets(line, sizeof line, f))
        seen |= strstr(line, "oauth_token") && strstr(line, "certificate");
    fclose(f);
    ck_assert_msg(seen, "the token outage line does not name the certificate");
    teardown_all(a);
    remove_certs();
}
END_TEST

/* ---- no secret anywhere ------------------------------------------------------------------ */

#define SEC_API_KEY "zq7APIKEYsecret41"
#define SEC_API_SECRET "zq7APISECRETsecret42"
#define SEC_OAUTH "zq7OAUTHsecret43"
#define SEC_BASIC "zq7BASICsecret44"
#define SEC_REDIS "zq7REDISsecret45"
#define SEC_AMQP "zq7AMQPsecret46"

static const char *const secrets[] = {SEC_API_KEY, SEC_API_SECRET, SEC_OAUTH,
                                      SEC_BASIC,   SEC_REDIS,      SEC_AMQP};
/* base64 of "iwt-user:" SEC_BASIC (an Authorization header, if one leaked) */
static char basic_b64[128];
static char key_lines[64][260]; /* the base64 lines of the client key's PEM */
static int n_key_lines;

static void load_secret_forms(void)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const char *in = "iwt-user:" SEC_BASIC;
    size_t n = strlen(in), o = 0;
    for (size_t i = 0; i + 2 < n; i += 3) { /* the whole groups are enough to spot it */
        unsigned v = ((unsigned char)in[i] << 16) | ((unsigned char)in[i + 1] << 8) |
                     (unsigned char)in[i + 2];
        basic_b64[o++] = tbl[(v >> 18) & 63];
        basic_b64[o++] = tbl[(v >> 12) & 63];
        basic_b64[o++] = tbl[(v >> 6) & 63];
        basic_b64[o++] = tbl[v & 63];
    }
    basic_b64[o] = '\0';
    char path[512], line[256];
    snprintf(path, sizeof path, "%s/client.key", tls_dir);
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    n_key_lines = 0;
    while (fgets(line, sizeof line, f) && n_key_lines < 64) {
        line[strcspn(line, "\r\n")] = '\0';
        if (strncmp(line, "-----", 5) != 0 && strlen(line) >= 40 && strlen(line) < 256)
            snprintf(key_lines[n_key_lines++], sizeof key_lines[0], "%s", line);
    }
    fclose(f);
    ck_assert_int_gt(n_key_lines, 5);
}

/* Fails when any secret (or its base64 form, or a line of the key file)
 * is in text. */
static void assert_clean(const char *text, size_t len, const char *where)
{
    char *t = strndup(text, len);
    ck_assert_ptr_nonnull(t);
    for (size_t i = 0; i < sizeof secrets / sizeof secrets[0]; i++)
        ck_assert_msg(!strstr(t, secrets[i]), "%s holds the secret %s", where, secrets[i]);
    ck_assert_msg(!strstr(t, basic_b64), "%s holds the Basic credentials (base64)", where);
    for (int i = 0; i < n_key_lines; i++)
        ck_assert_msg(!strstr(t, key_lines[i]), "%s holds a line of the TLS key", where);
    free(t);
}

static void assert_msg_clean(const iwt_msg *m, const char *where)
{
    char *h = json_dumps(m->headers, JSON_COMPACT);
    assert_clean(m->raw, m->raw_len, where);
    assert_clean(h, strlen(h), where);
    assert_clean(m->correlation_id, strlen(m->correlation_id), where);
    assert_clean(m->message_id, strlen(m->message_id), where);
    free(h);
}

/* Every log file of the namespace, whole. */
static int assert_logs_clean(void)
{
    char cmd[512], line[1 << 16];
    int lines = 0;
    snprintf(cmd, sizeof cmd, "cat %s/iwtest-%s-*.log 2>/dev/null", iwt_log_dir(), ns);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    while (fgets(line, sizeof line, p)) {
        assert_clean(line, strlen(line), "a log line");
        lines++;
    }
    pclose(p);
    return lines;
}

/* Everything that left the worker: events on the tap, dead letters. */
static int drain_clean(iwt_amqp *a)
{
    char dead[256];
    int n = 0;
    iwt_msg *m;
    while ((m = iwt_next_event(a, 300))) {
        assert_msg_clean(m, "an event");
        iwt_msg_free(m);
        n++;
    }
    snprintf(dead, sizeof dead, "%s.dead", ns);
    iwt_amqp *g = iwt_amqp_open();
    while ((m = iwt_get(g, dead, 300))) {
        assert_msg_clean(m, "a dead letter");
        iwt_msg_free(m);
        n++;
    }
    iwt_amqp_close(g);
    return n;
}

/* Every secret setting distinctive, every role, and the ways things go
 * wrong: refused credentials (API key, Basic, OAuth2 client secret), a token
 * endpoint failing, a TLS refusal, Redis refusing the password, the broker
 * refusing the URL's password.  No secret in any log line, event, dead
 * letter, reply or metric. */
START_TEST(no_secret_anywhere)
{
    int port, http_port = iwt_free_port();
    char addr[64], reqx[256], cert[320], key[320], ca[320], url[96];
    const char *args[32];
    char paths[3][320];
    make_certs();
    load_secret_forms();
    snprintf(addr, sizeof addr, "IW_HTTP_ADDR=127.0.0.1:%d", http_port);

    /* 1. all well, api-key over mTLS: every role, a job, a look-up, a bad job */
    tls_mock_args(args, "api-key", paths);
    int na = 0;
    while (args[na])
        na++;
    args[na++] = "--api-key";
    args[na++] = SEC_API_KEY;
    args[na++] = "--api-secret";
    args[na++] = SEC_API_SECRET;
    args[na] = NULL;
    iwt_amqp *a = setup("auth-nosecret", args, &port);
    snprintf(url, sizeof url, "IW_PROVIDER_URL=https://127.0.0.1:%d", port);
    snprintf(cert, sizeof cert, "IW_TLS_CERT=%s/client.pem", tls_dir);
    snprintf(key, sizeof key, "IW_TLS_KEY=%s/client.key", tls_dir);
    snprintf(ca, sizeof ca, "IW_TLS_CA=%s/ca.pem", tls_dir);
#define SECRET_ENV                                                                                 \
    "IW_API_KEY=" SEC_API_KEY, "IW_API_SECRET=" SEC_API_SECRET, "IW_OAUTH_CLIENT_ID=" CLIENT_ID,   \
        "IW_OAUTH_CLIENT_SECRET=" SEC_OAUTH, "IW_BASIC_USER=iwt-user",                             \
        "IW_BASIC_PASSWORD=" SEC_BASIC, "IW_LOG_LEVEL=debug"
    const char *env1[] = {SECRET_ENV, url, cert, key, ca, addr, NULL};
    iwt_track(iwt_start_worker("all", ns, port, env1, "all"));
    publish_job(a, "nosecret-ok");
    iwt_msg *e = iwt_wait_event(a, "status.final", "nosecret-ok", 30000);
    ck_assert_ptr_nonnull(e);
    assert_msg_clean(e, "status.final");
    iwt_msg_free(e);
    iwt_amqp *r = iwt_amqp_open();
    amqp_queue_declare_ok_t *q =
        amqp_queue_declare(r->conn, 1, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    ck_assert_ptr_nonnull(q);
    char reply_q[256];
    snprintf(reply_q, sizeof reply_q, "%.*s", (int)q->queue.len, (char *)q->queue.bytes);
    snprintf(reqx, sizeof reqx, "%s.requests", ns);
    iwt_publish(a, reqx, "resource.get", "{\"id\":\"abc123\"}", "application/json", reply_q,
                "nosecret-get");
    iwt_msg *reply = iwt_get(r, reply_q, 20000);
    ck_assert_ptr_nonnull(reply);
    assert_msg_clean(reply, "a reply");
    iwt_msg_free(reply);
    iwt_publish_job(a, ns, "{\"jobId\":\"nosecret-bad\"}"); /* schema: dead letter */
    ck_assert(IWT_EVENTUALLY(dead_letters() == 1, 10000));
    char *metrics = NULL;
    ck_assert_int_eq(iwt_http_get(http_port, "/metrics", &metrics), 200);
    assert_clean(metrics, strlen(metrics), "/metrics");
    free(metrics);
    ck_assert_int_eq(iwt_stop_all(), 0);
    ck_assert_int_gt(drain_clean(a), 2);
    ck_assert_int_gt(assert_logs_clean(), 10);
    teardown_all(a);

    /* 2. refused credentials, each mode; a look-up that fails; a TLS refusal */
    static const char *const modes[] = {"api-key", "basic", "oauth2"};
    for (int m = 0; m < 3; m++) {
        const char *margs[] = {"--auth",
                               modes[m],
                               "--api-key",
                               "other-key",
                               "--basic-password",
                               "other-password",
                               "--client-secret",
                               "other-secret",
                               "--client-id",
                               CLIENT_ID,
                               NULL};
        char name[32], mode_env[64], id[64];
        snprintf(name, sizeof name, "auth-nosecret-%d", m);
        a = setup(name, margs, &port);
        snprintf(mode_env, sizeof mode_env, "IW_AUTH_MODE=%s", modes[m]);
        const char *env2[] = {SECRET_ENV, mode_env, "IW_RETRY_SCHEDULE=0s,100ms,100ms,100ms", NULL};
        iwt_track(iwt_start_worker("submitter", ns, port, env2, "submitter"));
        iwt_track(iwt_start_worker("resolver", ns, port, env2, "resolver"));
        snprintf(id, sizeof id, "nosecret-refused-%d", m);
        publish_job(a, id);
        snprintf(reqx, sizeof reqx, "%s.requests", ns);
        iwt_publish(a, reqx, "resource.get", "{\"id\":\"abc123\"}", "application/json", reply_q,
                    "nosecret-get-refused");
        reply = iwt_get(r, reply_q, 20000);
        ck_assert_ptr_nonnull(reply);
        assert_msg_clean(reply, "an error reply");
        iwt_msg_free(reply);
        if (m < 2) { /* a refused key or password fails the job */
            e = iwt_wait_event(a, "submission.failed", id, 20000);
            ck_assert_ptr_nonnull(e);
            iwt_msg_free(e);
        } else { /* a refused client secret: the token outage line */
            ck_assert(IWT_EVENTUALLY(
                count_log("submitter", "operation", "oauth_token", "ERROR") == 1, 20000));
        }
        ck_assert_int_eq(iwt_stop_all(), 0);
        drain_clean(a);
        assert_logs_clean();
        teardown_all(a);
    }

    /* 3. the TLS key refused (rogue certificate), Redis and the broker
     *    refusing the passwords */
    tls_mock_args(args, "api-key", paths);
    a = setup("auth-nosecret-deps", args, &port);
    snprintf(url, sizeof url, "IW_PROVIDER_URL=https://127.0.0.1:%d", port);
    char rogue_cert[320], rogue_key[320];
    snprintf(rogue_cert, sizeof rogue_cert, "IW_TLS_CERT=%s/rogue.pem", tls_dir);
    snprintf(rogue_key, sizeof rogue_key, "IW_TLS_KEY=%s/client.key", tls_dir);
    /* a key that does not match its certificate: curl refuses it locally */
    const char *env3[] = {
        SECRET_ENV, url, rogue_cert, rogue_key, ca, "IW_RETRY_SCHEDULE=0s,100ms,100ms,100ms", NULL};
    iwt_track(iwt_start_worker("submitter", ns, port, env3, "submitter"));
    publish_job(a, "nosecret-tls");
    e = iwt_wait_event(a, "submission.failed", "nosecret-tls", 20000);
    ck_assert_ptr_nonnull(e);
    iwt_msg_free(e);
    ck_assert_int_eq(iwt_stop_all(), 0);
    const char *env4[] = {SECRET_ENV, "IW_REDIS_URL=redis://iw-test:" SEC_REDIS "@127.0.0.1:6379/0",
                          NULL};
    const char *env5[] = {SECRET_ENV, "IW_REDIS_PASSWORD=" SEC_REDIS, NULL};
    const char *env6[] = {SECRET_ENV, "IW_AMQP_URL=amqp://iw-test:" SEC_AMQP "@127.0.0.1:5672/%2f",
                          NULL};
    const char *const *bad[] = {env4, env5, env6};
    static const char *const roles[] = {"submitter", "poller", "resolver"};
    for (int b = 0; b < 3; b++) {
        pid_t pid = iwt_track(iwt_start_worker(roles[b], ns, port, bad[b], roles[b]));
        char path[512];
        snprintf(path, sizeof path, "%s/iwtest-%s-%s.log", iwt_log_dir(), ns, roles[b]);
        struct stat st;
        ck_assert(IWT_EVENTUALLY(stat(path, &st) == 0 && st.st_size > 0, 10000));
        iwt_sleep_ms(1500); /* a few reconnect attempts: their errors are logged */
        iwt_stop_tracked(pid, SIGTERM);
    }
    drain_clean(a);
    assert_logs_clean();
    teardown_all(a);
    iwt_amqp_close(r);
    remove_certs();
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("auth");
    TCase *tc = tcase_create("oauth2");
    tcase_set_timeout(tc, 180);
    tcase_add_test(tc, token_outage_loses_no_job);
    tcase_add_test(tc, token_failures_open_the_breaker);
    tcase_add_test(tc, token_expiry_and_refresh);
    tcase_add_test(tc, one_fetcher_for_two_processes);
    suite_add_tcase(s, tc);
    tc = tcase_create("lock");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, lock_won_after_a_fetch_takes_the_stored_token);
    suite_add_tcase(s, tc);
    tc = tcase_create("mtls");
    tcase_set_timeout(tc, 180);
    tcase_add_test(tc, mtls_with_every_auth_mode);
    tcase_add_test(tc, mtls_wrong_client_certificate_refused);
    suite_add_tcase(s, tc);
    tc = tcase_create("secrets");
    tcase_set_timeout(tc, 240);
    tcase_add_test(tc, no_secret_anywhere);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return iwt_run_suite(suite());
}
