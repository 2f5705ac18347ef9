/* The broker link against the real RabbitMQ, through its own API (no
 * worker): returns of unroutable publishes, publishes that cannot be encoded,
 * delivery size limits and the held budget, several cluster URLs, and broker
 * flow control (connection.blocked) on a PRIVATE node started by the test. */
#include <check.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "amqp_link.h"
#include "config.h"
#include "iwtest.h"
#include "topology.h"

#define SHARED_URL "amqp://guest:guest@127.0.0.1:5672/%2f"
#define MAX_SEEN 256

/* What a link reported to its owner. */
typedef struct seen {
    iw_delivery *d[MAX_SEEN];
    int n_deliveries;
    int n_returns;
    char return_exchange[256], return_key[256];
    int n_rejected;
    uint64_t rejected_size;
    int blocked_events;
    int ack_deliveries; /* ack each delivery at once (it stays held) */
    amqp_link *l;
} seen;

static void on_delivery(void *ud, iw_delivery *d)
{
    seen *s = ud;
    if (s->ack_deliveries)
        amqp_link_ack(s->l, d);
    if (s->n_deliveries < MAX_SEEN)
        s->d[s->n_deliveries++] = d;
    else
        delivery_free(d);
}

static void on_return(void *ud, const char *exchange, const char *routing_key)
{
    seen *s = ud;
    s->n_returns++;
    snprintf(s->return_exchange, sizeof s->return_exchange, "%s", exchange);
    snprintf(s->return_key, sizeof s->return_key, "%s", routing_key);
}

static void on_rejected(void *ud, const char *routing_key, uint64_t body_size)
{
    seen *s = ud;
    (void)routing_key;
    s->n_rejected++;
    s->rejected_size = body_size;
}

static void on_blocked(void *ud, int blocked, const char *reason)
{
    seen *s = ud;
    (void)blocked;
    (void)reason;
    s->blocked_events++;
}

static void seen_free(seen *s)
{
    for (int i = 0; i < s->n_deliveries; i++)
        delivery_free(s->d[i]);
    s->n_deliveries = 0;
}

static amqp_link *open_link(const char *url, seen *s)
{
    amqp_link_handlers h = {on_delivery, s, on_return, on_rejected, on_blocked};
    iw_error err = {0};
    amqp_link *l = amqp_link_connect(url, "test_amqp_link", &h, &err);
    ck_assert_msg(l != NULL, "connect: %s", err.msg);
    s->l = l;
    return l;
}

/* Confirm results by slot; -1000 until called. */
#define PENDING -1000
static int calls[256];

static void confirm_cb(void *ud, int status)
{
    int *slot = ud;
    ck_assert_msg(*slot == PENDING, "confirm callback called twice");
    *slot = status;
}

/* Pumps the link (waiting on its socket) until cond or timeout. */
static int pump_until(amqp_link *l, int (*cond)(void *), void *ud, int timeout_ms)
{
    long long deadline = iwt_now_ms() + timeout_ms;
    while (!cond(ud)) {
        struct pollfd p = {amqp_link_fd(l), POLLIN | (amqp_link_wants_write(l) ? POLLOUT : 0), 0};
        if (iwt_now_ms() >= deadline)
            return 0;
        if (!amqp_link_has_buffered(l))
            poll(&p, 1, 20);
        ck_assert_msg(amqp_link_pump(l) == IW_OK, "link failed: %s", amqp_link_error(l));
    }
    return 1;
}

static void pump_for(amqp_link *l, int ms)
{
    long long deadline = iwt_now_ms() + ms;
    while (iwt_now_ms() < deadline) {
        struct pollfd p = {amqp_link_fd(l), POLLIN, 0};
        poll(&p, 1, 20);
        ck_assert_msg(amqp_link_pump(l) == IW_OK, "link failed: %s", amqp_link_error(l));
    }
}

typedef struct slots {
    int from, n;
} slots;

static int all_called(void *ud)
{
    slots *s = ud;
    for (int i = s->from; i < s->from + s->n; i++)
        if (calls[i] == PENDING)
            return 0;
    return 1;
}

typedef struct want {
    seen *s;
    int n;
} want;

static int have_deliveries(void *ud)
{
    want *w = ud;
    return w->s->n_deliveries >= w->n;
}

static int have_rejected(void *ud)
{
    want *w = ud;
    return w->s->n_rejected >= w->n;
}

static int is_blocked(void *ud)
{
    return amqp_link_blocked(ud);
}

static int is_unblocked(void *ud)
{
    return !amqp_link_blocked(ud);
}

static void reset_calls(void)
{
    for (size_t i = 0; i < sizeof calls / sizeof calls[0]; i++)
        calls[i] = PENDING;
}

static iw_publish simple_publish(const char *exchange, const char *key, const char *body)
{
    iw_publish p = {0};
    p.exchange = exchange;
    p.routing_key = key;
    p.body = body;
    p.body_len = strlen(body);
    p.content_type = "application/json";
    return p;
}

static void declare(amqp_link *l, const char *queue, const char *type, const char *exchange,
                    const char *key)
{
    iw_error err = {0};
    json_t *args = json_pack("{s:s}", "x-queue-type", type);
    ck_assert_msg(amqp_link_declare_queue(l, queue, args, &err) == IW_OK, "%s", err.msg);
    json_decref(args);
    if (exchange) {
        ck_assert_msg(amqp_link_declare_exchange(l, exchange, "direct", &err) == IW_OK, "%s",
                      err.msg);
        ck_assert_msg(amqp_link_bind(l, queue, exchange, key, NULL, &err) == IW_OK, "%s", err.msg);
    }
}

/* Removes what a test declared on the shared broker. */
static void drop(const char *const *queues, const char *const *exchanges)
{
    iwt_amqp *a = iwt_amqp_open();
    for (int i = 0; queues && queues[i]; i++) {
        amqp_queue_delete(a->conn, 1, amqp_cstring_bytes(queues[i]), 0, 0);
        amqp_get_rpc_reply(a->conn);
    }
    for (int i = 0; exchanges && exchanges[i]; i++) {
        amqp_exchange_delete(a->conn, 1, amqp_cstring_bytes(exchanges[i]), 0);
        amqp_get_rpc_reply(a->conn);
    }
    iwt_amqp_close(a);
}

/* Waits (up to 10 s) until queue holds n messages; returns its last depth. */
static int depth_wait(const char *queue, int n)
{
    iwt_amqp *a = iwt_amqp_open();
    long long deadline = iwt_now_ms() + 10000;
    int d;
    while ((d = iwt_queue_depth(a, queue)) != n && iwt_now_ms() < deadline)
        iwt_sleep_ms(50);
    iwt_amqp_close(a);
    return d;
}

/* ---- 1. returns --------------------------------------------------------------------------------
 */

START_TEST(test_return_fails_only_its_publish)
{
    const char *ns = iwt_namespace("amqp-ret");
    char ex[160], q[160];
    seen s = {0};
    slots all = {0, 6};

    snprintf(ex, sizeof ex, "%s.x", ns);
    snprintf(q, sizeof q, "%s.q", ns);
    amqp_link *l = open_link(SHARED_URL, &s);
    /* a quorum queue confirms later than an unroutable publish, so confirms
     * of other publishes come between a return and its own ack */
    declare(l, q, "quorum", ex, "routable");
    reset_calls();
    for (int i = 0; i < 6; i++) {
        iw_publish p = simple_publish(ex, i % 2 ? "nowhere" : "routable", "{\"n\":1}");
        json_t *h = json_pack("{s:s, s:i}", AMQP_LINK_SEQ_HEADER, "forged", "i", i);
        p.headers = h; /* a caller's header of our name is replaced, not duplicated */
        ck_assert_int_eq(amqp_link_publish(l, &p, confirm_cb, &calls[i]), IW_OK);
        json_decref(h);
    }
    ck_assert(pump_until(l, all_called, &all, 10000));
    for (int i = 0; i < 6; i++)
        ck_assert_msg(calls[i] == (i % 2 ? IW_ERR_AMQP_RETURNED : IW_OK), "publish %d: %s", i,
                      iw_strerror(calls[i]));
    ck_assert_int_eq(s.n_returns, 3);
    ck_assert_str_eq(s.return_exchange, ex);
    ck_assert_str_eq(s.return_key, "nowhere");
    ck_assert_int_eq(amqp_link_unconfirmed(l), 0);

    /* the correlation header is ours alone: not reported on deliveries */
    iw_delivery *d = NULL;
    iw_error err = {0};
    ck_assert_int_eq(amqp_link_get(l, q, &d, &err), IW_OK);
    ck_assert_ptr_nonnull(d);
    ck_assert_ptr_null(json_object_get(d->headers, AMQP_LINK_SEQ_HEADER));
    ck_assert_int_eq(json_integer_value(json_object_get(d->headers, "i")), 0);
    ck_assert_str_eq(d->body, "{\"n\":1}");
    ck_assert_int_eq(amqp_link_ack(l, d), IW_OK);
    delivery_free(d);
    ck_assert(amqp_link_ok(l));
    amqp_link_free(l);
    const char *qs[] = {q, NULL}, *xs[] = {ex, NULL};
    drop(qs, xs);
}
END_TEST

/* ---- 2. publishes that cannot be encoded --------------------------------------------------------
 */

START_TEST(test_unencodable_publish_fails_alone)
{
    const char *ns = iwt_namespace("amqp-enc");
    char ex[160], q[160], long_key[301], big_key[300];
    seen s = {0};
    slots all = {0, 8};
    char *huge = malloc(200001);

    snprintf(ex, sizeof ex, "%s.x", ns);
    snprintf(q, sizeof q, "%s.q", ns);
    memset(long_key, 'k', 300);
    long_key[300] = '\0';
    memset(big_key, 'h', 299);
    big_key[299] = '\0';
    memset(huge, 'v', 200000);
    huge[200000] = '\0';
    amqp_link *l = open_link(SHARED_URL, &s);
    declare(l, q, "classic", ex, "ok");
    reset_calls();

    iw_publish good = simple_publish(ex, "ok", "{}");
    ck_assert_int_eq(amqp_link_publish(l, &good, confirm_cb, &calls[0]), IW_OK);

    iw_publish p = simple_publish(ex, long_key, "{}"); /* routing key of 300 bytes */
    ck_assert_int_eq(amqp_link_publish(l, &p, confirm_cb, &calls[1]), IW_ERR_AMQP_ENCODE);
    ck_assert_int_eq(calls[1], IW_ERR_AMQP_ENCODE);

    p = simple_publish(ex, "ok", "{}"); /* headers far over frame_max */
    json_t *h = json_pack("{s:s}", "x-big", huge);
    p.headers = h;
    ck_assert_int_eq(amqp_link_publish(l, &p, confirm_cb, &calls[2]), IW_ERR_AMQP_ENCODE);
    json_decref(h);

    p = simple_publish(ex, "ok", "{}"); /* a short-string property over 255 bytes */
    p.correlation_id = long_key;
    ck_assert_int_eq(amqp_link_publish(l, &p, confirm_cb, &calls[3]), IW_ERR_AMQP_ENCODE);

    p = simple_publish(ex, "ok", "{}"); /* a header name over 255 bytes */
    h = json_pack("{s:i}", big_key, 1);
    p.headers = h;
    ck_assert_int_eq(amqp_link_publish(l, &p, confirm_cb, &calls[4]), IW_ERR_AMQP_ENCODE);
    json_decref(h);

    p = simple_publish(long_key, "ok", "{}"); /* an exchange name over 255 bytes */
    ck_assert_int_eq(amqp_link_publish(l, &p, confirm_cb, &calls[5]), IW_ERR_AMQP_ENCODE);

    /* headers just under frame_max still go */
    p = simple_publish(ex, "ok", "{}");
    huge[120000] = '\0';
    h = json_pack("{s:s}", "x-big", huge);
    p.headers = h;
    ck_assert_int_eq(amqp_link_publish(l, &p, confirm_cb, &calls[6]), IW_OK);
    json_decref(h);

    ck_assert_int_eq(amqp_link_publish(l, &good, confirm_cb, &calls[7]), IW_OK);
    ck_assert(pump_until(l, all_called, &all, 10000));
    ck_assert_int_eq(calls[0], IW_OK);
    ck_assert_int_eq(calls[6], IW_OK);
    ck_assert_int_eq(calls[7], IW_OK);
    for (int i = 1; i <= 5; i++)
        ck_assert_int_eq(calls[i], IW_ERR_AMQP_ENCODE);
    ck_assert(amqp_link_ok(l));
    ck_assert_int_eq(depth_wait(q, 3), 3);
    amqp_link_free(l);
    free(huge);
    const char *qs[] = {q, NULL}, *xs[] = {ex, NULL};
    drop(qs, xs);
}
END_TEST

/* ---- 3. sizes and the held budget -------------------------------------------------------------
 */

static char *pattern(size_t n)
{
    char *b = malloc(n + 1);
    for (size_t i = 0; i < n; i++)
        b[i] = (char)('a' + i % 26);
    b[n] = '\0';
    return b;
}

static void publish_raw(amqp_link *l, const char *queue, const char *body, size_t len, int *slot)
{
    iw_publish p = {0};
    p.exchange = "";
    p.routing_key = queue;
    p.body = body;
    p.body_len = len;
    ck_assert_int_eq(amqp_link_publish(l, &p, confirm_cb, slot), IW_OK);
}

START_TEST(test_oversized_delivery_is_flagged)
{
    const char *ns = iwt_namespace("amqp-big");
    char q[160];
    seen s = {0};
    slots all = {0, 2};
    size_t big = 2 * 1024 * 1024;
    char *body = pattern(big);
    iw_error err = {0};

    snprintf(q, sizeof q, "%s.q", ns);
    amqp_link *l = open_link(SHARED_URL, &s);
    amqp_link_set_limits(l, 1024 * 1024, 64 * 1024 * 1024);
    declare(l, q, "classic", NULL, NULL);
    reset_calls();
    publish_raw(l, q, body, big, &calls[0]);
    publish_raw(l, q, "small", 5, &calls[1]);
    ck_assert(pump_until(l, all_called, &all, 10000));
    ck_assert_int_eq(calls[0], IW_OK);

    size_t before = amqp_link_held_bytes();
    ck_assert_int_eq(amqp_link_consume(l, q, "big-consumer", &err), IW_OK);
    want w = {&s, 2};
    ck_assert(pump_until(l, have_deliveries, &w, 10000));
    ck_assert_int_eq(s.d[0]->too_large, 1);
    ck_assert_uint_eq(s.d[0]->body_len, big);
    ck_assert(memcmp(s.d[0]->body, body, big) == 0);
    ck_assert_int_eq(s.d[1]->too_large, 0);
    ck_assert_str_eq(s.d[1]->body, "small");
    ck_assert_uint_eq(amqp_link_held_bytes(), before + big + 5);
    ck_assert_int_eq(amqp_link_ack(l, s.d[0]), IW_OK);
    ck_assert_int_eq(amqp_link_ack(l, s.d[1]), IW_OK);
    seen_free(&s);
    ck_assert_uint_eq(amqp_link_held_bytes(), before); /* delivery_free gave it back */
    ck_assert_int_eq(s.n_rejected, 0);
    amqp_link_free(l);
    free(body);
    const char *qs[] = {q, NULL};
    drop(qs, NULL);
}
END_TEST

START_TEST(test_delivery_over_budget_is_rejected_to_dead_letters)
{
    const char *ns = iwt_namespace("amqp-rej");
    char q[160], dlx[160], dead[160];
    seen s = {0};
    slots all = {0, 2};
    size_t big = 5 * 1024 * 1024;
    char *body = pattern(big);
    iw_error err = {0};

    snprintf(q, sizeof q, "%s.q", ns);
    snprintf(dlx, sizeof dlx, "%s.dlx", ns);
    snprintf(dead, sizeof dead, "%s.dead", ns);
    amqp_link *l = open_link(SHARED_URL, &s);
    amqp_link_set_limits(l, 1024 * 1024, 4 * 1024 * 1024);
    ck_assert_int_eq(amqp_link_declare_exchange(l, dlx, "fanout", &err), IW_OK);
    declare(l, dead, "classic", NULL, NULL);
    ck_assert_int_eq(amqp_link_bind(l, dead, dlx, "", NULL, &err), IW_OK);
    json_t *args = json_pack("{s:s, s:s}", "x-queue-type", "quorum", "x-dead-letter-exchange", dlx);
    ck_assert_msg(amqp_link_declare_queue(l, q, args, &err) == IW_OK, "%s", err.msg);
    json_decref(args);
    reset_calls();
    publish_raw(l, q, body, big, &calls[0]);
    publish_raw(l, q, "after", 5, &calls[1]);
    ck_assert(pump_until(l, all_called, &all, 10000));
    ck_assert_int_eq(calls[0], IW_OK);

    size_t before = amqp_link_held_bytes();
    ck_assert_int_eq(amqp_link_consume(l, q, "rej-consumer", &err), IW_OK);
    want w = {&s, 1};
    ck_assert(pump_until(l, have_rejected, &w, 10000));
    ck_assert_uint_eq(s.rejected_size, big);
    ck_assert(pump_until(l, have_deliveries, &w, 10000)); /* the next one still comes */
    ck_assert_str_eq(s.d[0]->body, "after");
    ck_assert_int_eq(s.n_deliveries, 1);
    ck_assert_uint_eq(amqp_link_held_bytes(), before + 5); /* the big body was never held */
    amqp_link_ack(l, s.d[0]);
    seen_free(&s);

    /* the broker dead-lettered it itself, whole, with x-death reason rejected */
    iwt_amqp *a = iwt_amqp_open();
    iwt_msg *m = iwt_get(a, dead, 10000);
    ck_assert_ptr_nonnull(m);
    ck_assert_uint_eq(m->raw_len, big);
    json_t *death = json_array_get(json_object_get(m->headers, "x-death"), 0);
    ck_assert_ptr_nonnull(death);
    ck_assert_str_eq(json_string_value(json_object_get(death, "reason")), "rejected");
    ck_assert_str_eq(json_string_value(json_object_get(death, "queue")), q);
    iwt_msg_free(m);
    iwt_amqp_close(a);
    ck_assert(amqp_link_ok(l));
    amqp_link_free(l);
    free(body);
    const char *qs[] = {q, dead, NULL}, *xs[] = {dlx, NULL};
    drop(qs, xs);
}
END_TEST

static int queue_empty(void *ud)
{
    return depth_wait(ud, 0) == 0;
}

START_TEST(test_used_up_budget_pauses_consuming)
{
    const char *ns = iwt_namespace("amqp-pause");
    char q[160];
    seen s = {0};
    enum { N = 40 };
    size_t size = 512 * 1024;
    char *body = pattern(size);
    slots all = {0, N};
    iw_error err = {0};

    snprintf(q, sizeof q, "%s.q", ns);
    amqp_link *l = open_link(SHARED_URL, &s);
    amqp_link_set_limits(l, 1024 * 1024, 2 * 1024 * 1024);
    declare(l, q, "classic", NULL, NULL);
    reset_calls();
    for (int i = 0; i < N; i++)
        publish_raw(l, q, body, size, &calls[i]);
    ck_assert(pump_until(l, all_called, &all, 20000));

    /* acked at once but held: only the budget stops the broker (prefetch
     * bounds what is on its way when the link cancels) */
    s.ack_deliveries = 1;
    ck_assert_int_eq(amqp_link_qos(l, 8, &err), IW_OK);
    ck_assert_int_eq(amqp_link_consume(l, q, "pause-consumer", &err), IW_OK);
    pump_for(l, 1500);
    int held = s.n_deliveries;
    ck_assert_msg(held >= 4 && held < N, "%d deliveries held of %d", held, N);
    ck_assert_int_eq(s.n_rejected, 0);
    pump_for(l, 500);
    ck_assert_int_eq(s.n_deliveries, held); /* paused: nothing more comes */
    ck_assert_int_eq(depth_wait(q, N - held), N - held);

    /* freeing the deliveries gives the budget back: consuming resumes */
    int total = 0;
    long long deadline = iwt_now_ms() + 20000;
    while (total < N && iwt_now_ms() < deadline) {
        total += s.n_deliveries;
        seen_free(&s);
        pump_for(l, 100);
    }
    total += s.n_deliveries;
    seen_free(&s);
    ck_assert_int_eq(total, N);
    ck_assert(queue_empty(q));
    amqp_link_free(l);
    free(body);
    const char *qs[] = {q, NULL};
    drop(qs, NULL);
}
END_TEST

/* ---- 5. several cluster URLs --------------------------------------------------------------------
 */

START_TEST(test_several_urls_skip_a_dead_node)
{
    seen s = {0};
    iw_error err = {0};
    char urls[512];
    int dead1 = iwt_free_port(), dead2 = iwt_free_port();

    snprintf(urls, sizeof urls,
             "amqp://guest:S3cretPw@127.0.0.1:%d/%%2f, %s,amqp://guest:S3cretPw@127.0.0.1:%d/%%2f",
             dead1, SHARED_URL, dead2);
    amqp_link *l = open_link(urls, &s);
    ck_assert_int_eq(amqp_link_node(l), 1);
    amqp_link_free(l);

    /* all nodes dead: the error names the node, never a password */
    snprintf(urls, sizeof urls,
             "amqp://guest:S3cretPw@127.0.0.1:%d/%%2f,amqp://guest:S3cretPw@127.0.0.1:%d/%%2f",
             dead1, dead2);
    amqp_link_handlers h = {on_delivery, &s, NULL, NULL, NULL};
    ck_assert_ptr_null(amqp_link_connect(urls, "t", &h, &err));
    ck_assert_ptr_null(strstr(err.msg, "S3cret"));
    ck_assert_msg(strstr(err.msg, "of 2"), "%s", err.msg);

    /* the next connect starts after the node whose connection failed last */
    snprintf(urls, sizeof urls, "%s,%s", SHARED_URL, SHARED_URL);
    l = open_link(urls, &s);
    int first = amqp_link_node(l);
    iw_publish p = simple_publish("no-such-exchange-amqp-link-test", "k", "{}");
    int slot = PENDING;
    amqp_link_publish(l, &p, confirm_cb, &slot);
    long long deadline = iwt_now_ms() + 10000;
    while (amqp_link_ok(l) && iwt_now_ms() < deadline) {
        struct pollfd pf = {amqp_link_fd(l), POLLIN, 0};
        poll(&pf, 1, 20);
        amqp_link_pump(l);
    }
    ck_assert_msg(!amqp_link_ok(l), "a publish to a missing exchange closes the channel");
    amqp_link_free(l);
    ck_assert_int_eq(slot, IW_ERR_AMQP_CLOSED);
    l = open_link(urls, &s);
    ck_assert_int_eq(amqp_link_node(l), (first + 1) % 2);
    amqp_link_free(l);

    /* settings: each URL is checked; errors name the variable, not the value */
    char *env1[] = {"IW_AMQP_URL=" SHARED_URL ",http://guest:S3cretPw@127.0.0.1/", NULL};
    ck_assert_ptr_null(config_from_env(env1, NULL, &err));
    ck_assert_msg(strstr(err.msg, "IW_AMQP_URL") && strstr(err.msg, "URL 2"), "%s", err.msg);
    ck_assert_ptr_null(strstr(err.msg, "S3cret"));
    char *env2[] = {"IW_AMQP_URL=S3cretPw", NULL};
    ck_assert_ptr_null(config_from_env(env2, NULL, &err));
    ck_assert_ptr_null(strstr(err.msg, "S3cret"));
    char *env3[] = {"IW_AMQP_URL=" SHARED_URL ", amqp://u:p@127.0.0.1:5673/%2f",
                    "IW_QUORUM_GROUP_SIZE=3", NULL};
    iw_config *cfg = config_from_env(env3, NULL, &err);
    ck_assert_msg(cfg != NULL, "%s", err.msg);
    ck_assert_int_eq(cfg->quorum_group_size, 3);
    ck_assert_int_eq(cfg->max_held_bytes, 64L * 1024 * 1024);
    config_free(cfg);
}
END_TEST

/* Quorum queues carry x-quorum-initial-group-size from IW_QUORUM_GROUP_SIZE;
 * it is part of a queue's identity, so another value for existing queues is
 * refused (the runtime's TOPOLOGY_MISMATCH). */
START_TEST(test_quorum_group_size_is_declared)
{
    const char *ns = iwt_namespace("amqp-qgs");
    char e_ns[200], submit[160];
    seen s = {0};
    iw_error err = {0};
    char *env1[] = {e_ns, "IW_QUORUM_GROUP_SIZE=3", NULL};
    char *env2[] = {e_ns, "IW_QUORUM_GROUP_SIZE=5", NULL};

    snprintf(e_ns, sizeof e_ns, "IW_NAMESPACE=%s", ns);
    snprintf(submit, sizeof submit, "%s.submit", ns);
    iw_config *c1 = config_from_env(env1, NULL, &err), *c2 = config_from_env(env2, NULL, &err);
    ck_assert(c1 && c2);
    amqp_link *l = open_link(SHARED_URL, &s);
    ck_assert_msg(topology_declare(l, c1, &err) == IW_OK, "%s", err.msg);
    ck_assert_msg(topology_declare(l, c1, &err) == IW_OK, "idempotent: %s", err.msg);
    amqp_link_free(l);
    l = open_link(SHARED_URL, &s);
    ck_assert_int_ne(topology_declare(l, c2, &err), IW_OK);
    ck_assert_msg(strstr(err.msg, "PRECONDITION_FAILED") && strstr(err.msg, "group-size"), "%s",
                  err.msg);
    amqp_link_free(l);
    config_free(c1);
    config_free(c2);
    iwt_cleanup(ns);
}
END_TEST

/* ---- 4. broker flow control, on a private node ---------------------------------------------- */

START_TEST(test_blocked_connection_buffers_and_flushes)
{
    iwt_rabbit r;
    seen s = {0};
    char url[128];
    enum { N = 48 };
    size_t size = 256 * 1024; /* 12 MiB in all: far beyond the socket buffers */
    char *body = pattern(size);
    slots all = {0, N + 1};
    const char *const alarm_on[] = {"-q", "set_vm_memory_high_watermark", "0.0000001", NULL};
    const char *const alarm_off[] = {"-q", "set_vm_memory_high_watermark", "0.4", NULL};

    if (iwt_rabbit_start(&r, "amqp", 0, NULL) != 0) {
        fprintf(stderr, "SKIP test_blocked_connection_buffers_and_flushes: no private node\n");
        free(body);
        return;
    }
    snprintf(url, sizeof url, "amqp://guest:guest@127.0.0.1:%d/%%2f", r.port);
    amqp_link *l = open_link(url, &s);
    declare(l, "flow", "classic", NULL, NULL);
    ck_assert_int_eq(iwt_rabbitmqctl(&r, alarm_on), 0);
    /* RabbitMQ blocks (and says so) a connection when it publishes during
     * an alarm: this first publish goes out, the broker stops reading */
    reset_calls();
    publish_raw(l, "flow", "first", 5, &calls[N]);
    ck_assert_msg(pump_until(l, is_blocked, l, 20000), "no connection.blocked");

    /* while blocked nothing is written: every call returns at once */
    long long t0 = iwt_now_ms(), worst = 0;
    for (int i = 0; i < N; i++) {
        long long t = iwt_now_ms();
        publish_raw(l, "flow", body, size, &calls[i]);
        ck_assert_int_eq(amqp_link_pump(l), IW_OK);
        if (iwt_now_ms() - t > worst)
            worst = iwt_now_ms() - t;
    }
    ck_assert_msg(worst < 200, "a publish took %lld ms while blocked", worst);
    ck_assert_int_eq(amqp_link_unconfirmed(l), N + 1);
    /* past the bound, a publish fails at once instead of growing the buffer */
    int over = PENDING, extra = N + 1;
    while (over == PENDING && extra < 200) {
        int *slot = &calls[extra++];
        iw_publish p = {0};
        p.exchange = "";
        p.routing_key = "flow";
        p.body = body;
        p.body_len = size;
        if (amqp_link_publish(l, &p, confirm_cb, slot) != IW_OK)
            over = *slot;
        else
            ck_assert_int_eq(*slot, PENDING); /* buffered */
    }
    ck_assert_int_eq(over, IW_ERR_AMQP_BLOCKED);
    pump_for(l, 1000); /* the loop keeps turning */
    ck_assert(amqp_link_blocked(l));
    ck_assert_int_eq(calls[0], PENDING);
    ck_assert_msg(iwt_now_ms() - t0 < 10000, "blocked loop");

    /* unblocked: everything buffered goes out, in order, and is confirmed */
    ck_assert_int_eq(iwt_rabbitmqctl(&r, alarm_off), 0);
    ck_assert_msg(pump_until(l, is_unblocked, l, 20000), "no connection.unblocked");
    ck_assert(pump_until(l, all_called, &all, 30000));
    all.n = extra - 1; /* the last one failed at once */
    ck_assert(pump_until(l, all_called, &all, 30000));
    for (int i = 0; i < extra - 1; i++)
        ck_assert_int_eq(calls[i], IW_OK);
    ck_assert_int_eq(calls[extra - 1], IW_ERR_AMQP_BLOCKED);
    uint32_t depth = 0;
    iw_error err = {0};
    ck_assert_msg(amqp_link_queue_depth(l, "flow", &depth, &err) == IW_OK, "%s", err.msg);
    ck_assert_int_eq(depth, extra - 1); /* confirmed: in the queue */
    ck_assert_int_ge(s.blocked_events, 2);
    ck_assert(amqp_link_ok(l));
    amqp_link_free(l);
    iwt_rabbit_stop(&r);
    free(body);
}
END_TEST

/* ---- 6. TLS to the broker, on a private node ----------------------------------------------------
 */

/* Makes a CA, a server certificate for localhost (only) and a client
 * certificate signed by it, and an unrelated CA, in dir. */
static int make_certs(const char *dir)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "set -e; cd '%s'; exec >openssl.log 2>&1;"
             "printf 'subjectAltName=DNS:localhost\n' > san.ext;"
             "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 "
             "  -subj /CN=iwtest-ca;"
             "openssl req -x509 -newkey rsa:2048 -nodes -keyout other.key -out other.pem -days 2 "
             "  -subj /CN=iwtest-other-ca;"
             "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr "
             "  -subj /CN=localhost;"
             "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
             "  -out server.pem -days 2 -extfile san.ext;"
             "openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr "
             "  -subj /CN=iwtest-client;"
             "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
             "  -out client.pem -days 2;"
             "chmod 644 *.pem *.key",
             dir);
    return system(cmd);
}

START_TEST(test_tls_to_the_broker)
{
    iwt_rabbit r;
    seen s = {0};
    char dir[] = "/tmp/iwtest-tls-XXXXXX", conf[2048], url[160], path[5][256];
    iw_error err = {0};
    slots all = {0, 1};

    ck_assert_ptr_nonnull(mkdtemp(dir));
    ck_assert_msg(make_certs(dir) == 0, "openssl failed (see %s/openssl.log)", dir);
    snprintf(conf, sizeof conf,
             "ssl_options.cacertfile = %s/ca.pem\nssl_options.certfile = %s/server.pem\n"
             "ssl_options.keyfile = %s/server.key\nssl_options.verify = verify_peer\n"
             "ssl_options.fail_if_no_peer_cert = true\n",
             dir, dir, dir);
    if (iwt_rabbit_start(&r, "amqptls", 1, conf) != 0) {
        fprintf(stderr, "SKIP test_tls_to_the_broker: no private node\n");
        return;
    }
    snprintf(url, sizeof url, "amqps://guest:guest@localhost:%d/%%2f", r.tls_port);
    snprintf(path[0], sizeof path[0], "%s/ca.pem", dir);
    snprintf(path[1], sizeof path[1], "%s/client.pem", dir);
    snprintf(path[2], sizeof path[2], "%s/client.key", dir);
    snprintf(path[3], sizeof path[3], "%s/other.pem", dir);
    amqp_link_handlers h = {on_delivery, &s, on_return, on_rejected, on_blocked};

    /* the broker's CA and our certificate: connected, verified, publishing */
    amqp_link_tls tls = {path[0], path[1], path[2], 1};
    amqp_link *l = amqp_link_connect_tls(url, "tls", &h, &tls, &err);
    ck_assert_msg(l != NULL, "TLS connect: %s", err.msg);
    s.l = l;
    declare(l, "tls-q", "classic", NULL, NULL);
    reset_calls();
    publish_raw(l, "tls-q", "over TLS", 8, &calls[0]);
    ck_assert(pump_until(l, all_called, &all, 10000));
    ck_assert_int_eq(calls[0], IW_OK);
    amqp_link_free(l);

    /* verification is on by default: another CA, or the system's, is refused */
    amqp_link_tls wrong_ca = {path[3], path[1], path[2], 1};
    ck_assert_ptr_null(amqp_link_connect_tls(url, "tls", &h, &wrong_ca, &err));
    ck_assert_msg(strstr(err.msg, "verification failed"), "%s", err.msg);
    amqp_link_tls system_ca = {NULL, path[1], path[2], 1};
    ck_assert_ptr_null(amqp_link_connect_tls(url, "tls", &h, &system_ca, &err));
    ck_assert_msg(strstr(err.msg, "verification failed"), "%s", err.msg);
    /* the host name is checked too: the certificate names localhost only */
    char other_host[160];
    snprintf(other_host, sizeof other_host, "amqps://guest:guest@127.0.0.1:%d/%%2f", r.tls_port);
    ck_assert_ptr_null(amqp_link_connect_tls(other_host, "tls", &h, &tls, &err));
    ck_assert_msg(strstr(err.msg, "verification failed"), "%s", err.msg);
    /* ... unless verification is turned off (tests only) */
    amqp_link_tls unverified = {NULL, path[1], path[2], 0};
    l = amqp_link_connect_tls(other_host, "tls", &h, &unverified, &err);
    ck_assert_msg(l != NULL, "%s", err.msg);
    amqp_link_free(l);
    /* mutual TLS: without our certificate the broker refuses */
    amqp_link_tls no_cert = {path[0], NULL, NULL, 1};
    ck_assert_ptr_null(amqp_link_connect_tls(url, "tls", &h, &no_cert, &err));
    ck_assert_msg(strstr(err.msg, "SSL"), "%s", err.msg);
    /* the settings: the files by name, the certificate and key together */
    char e_ca[300], e_cert[300];
    snprintf(e_ca, sizeof e_ca, "IW_AMQP_CA=%s", path[0]);
    snprintf(e_cert, sizeof e_cert, "IW_AMQP_CERT=%s", path[1]);
    char *env[] = {e_ca, e_cert, NULL};
    ck_assert_ptr_null(config_from_env(env, NULL, &err));
    ck_assert_msg(strstr(err.msg, "IW_AMQP_CERT"), "%s", err.msg);

    iwt_rabbit_stop(&r);
    snprintf(conf, sizeof conf, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(conf), 0);
}
END_TEST

/* ---- the worker on top of the link ------------------------------------------------------------
 */

static int file_contains(const char *path, const char *needle)
{
    char line[65536];
    int found = 0;
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    while (!found && fgets(line, sizeof line, f))
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

/* Lines of a worker log with both needles (b may be NULL). */
static int count_lines(const char *path, const char *a, const char *b)
{
    char line[65536];
    int n = 0;
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    while (fgets(line, sizeof line, f))
        n += strstr(line, a) != NULL && (!b || strstr(line, b) != NULL);
    fclose(f);
    return n;
}

/* A worker is up once it consumes its queue (on the shared broker). */
static int has_consumer(void *ud)
{
    iwt_amqp *a = iwt_amqp_open();
    int n = iwt_queue_consumers(a, ud);
    iwt_amqp_close(a);
    return n >= 1;
}

#define ERROR_LINE "\"level\":\"ERROR\""
#define WARN_LINE "\"level\":\"WARN\""

typedef struct log_wait {
    char path[512];
    const char *needle;
} log_wait;

static int log_has(void *ud)
{
    log_wait *w = ud;
    return file_contains(w->path, w->needle);
}

static int dead_has_one(void *ud)
{
    iwt_amqp *a = iwt_amqp_open();
    int n = iwt_queue_depth(a, ud);
    iwt_amqp_close(a);
    return n == 1;
}

/* A dead letter whose binding is gone comes back as a return: the ERROR log
 * names the exchange and routing key, the delivery is requeued, the topology
 * re-declared, and the redelivery's dead letter reaches N.dead.  Before, it
 * was confirmed into nowhere and the job acked. */
START_TEST(test_worker_requeues_on_return_and_redeclares)
{
    const char *ns = iwt_namespace("amqp-wret");
    char dead[160], dlx[160], requests[160];
    int port;
    log_wait w;

    snprintf(dead, sizeof dead, "%s.dead", ns);
    snprintf(dlx, sizeof dlx, "%s.dlx", ns);
    snprintf(requests, sizeof requests, "%s.requests", ns);
    iwt_declare(ns); /* the queue exists before its consumer is looked for */
    pid_t mock = iwt_start_mock(NULL, &port);
    snprintf(w.path, sizeof w.path, "%s/iwtest-%s-submitter.log", iwt_log_dir(), ns);
    unlink(w.path);
    pid_t worker = iwt_start_worker("submitter", ns, port, NULL, NULL);
    char submit[160];
    snprintf(submit, sizeof submit, "%s.submit", ns);
    ck_assert(iwt_eventually(has_consumer, submit, 15000));
    /* the binding goes after the worker declared the topology */
    iwt_amqp *a = iwt_amqp_open();
    amqp_queue_unbind(a->conn, 1, amqp_cstring_bytes(dead), amqp_cstring_bytes(dlx),
                      amqp_empty_bytes, amqp_empty_table);
    ck_assert_int_eq(amqp_get_rpc_reply(a->conn).reply_type, AMQP_RESPONSE_NORMAL);

    iwt_publish(a, requests, "submit.transaction", "not json", "application/json", NULL, NULL);
    ck_assert_msg(IWT_EVENTUALLY(count_lines(w.path, "BROKER_RETURNED", ERROR_LINE) >= 1, 15000),
                  "no ERROR for the returned dead letter");
    ck_assert(count_lines(w.path, "BROKER_RETURNED", dlx) >= 1);
    ck_assert(iwt_eventually(dead_has_one, dead, 15000));
    iwt_msg *m = iwt_get(a, dead, 5000);
    ck_assert_ptr_nonnull(m);
    ck_assert_str_eq(json_string_value(json_object_get(m->headers, "x-error-code")),
                     "INVALID_JSON");
    iwt_msg_free(m);
    iwt_amqp_close(a);
    ck_assert_int_eq(iwt_stop(worker, SIGTERM), 0);
    iwt_stop(mock, SIGTERM);
    iwt_cleanup(ns);
}
END_TEST

/* An event nobody subscribed to reaches no queue: logged once, and the job
 * is done, not requeued for ever (re-declaring cannot bind a subscriber). */
START_TEST(test_worker_event_without_subscriber_is_not_retried)
{
    const char *ns = iwt_namespace("amqp-wnosub");
    char requests[160];
    int port;
    log_wait w;

    snprintf(requests, sizeof requests, "%s.requests", ns);
    iwt_declare(ns); /* the queue exists before its consumer is looked for */
    pid_t mock = iwt_start_mock(NULL, &port);
    snprintf(w.path, sizeof w.path, "%s/iwtest-%s-submitter.log", iwt_log_dir(), ns);
    unlink(w.path);
    pid_t worker = iwt_start_worker("submitter", ns, port, NULL, NULL);
    char submit[160];
    snprintf(submit, sizeof submit, "%s.submit", ns);
    ck_assert(iwt_eventually(has_consumer, submit, 15000));
    iwt_amqp *a = iwt_amqp_open();
    iwt_publish_job(a, ns,
                    "{\"jobId\":\"nosub-1\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{}}");
    ck_assert(IWT_EVENTUALLY(count_lines(w.path, "BROKER_RETURNED", WARN_LINE) >= 1, 15000));
    ck_assert_msg(count_lines(w.path, "BROKER_RETURNED", "\"submission.accepted\"") == 1,
                  "the unrouted event is named in the log");
    iwt_sleep_ms(1500); /* a requeue loop would repeat within milliseconds */
    ck_assert_int_eq(count_lines(w.path, "BROKER_RETURNED", NULL), 1);
    ck_assert_int_eq(count_lines(w.path, "BROKER_RETURNED", ERROR_LINE), 0);
    ck_assert_int_eq(count_lines(w.path, "returns to its queue", NULL), 0);
    iwt_amqp_close(a);
    ck_assert_int_eq(iwt_stop(worker, SIGTERM), 0);
    iwt_stop(mock, SIGTERM);
    iwt_cleanup(ns);
}
END_TEST

static int mock_calling(void *ud)
{
    json_t *st = iwt_mock_stats(*(int *)ud);
    long n = (long)json_integer_value(json_object_get(st, "in_flight"));
    json_decref(st);
    return n >= 1;
}

/* During a memory alarm the worker's outcome publish waits in memory, the
 * loop turns, and SIGTERM ends it within IW_SHUTDOWN_GRACE, exit 0. */
START_TEST(test_worker_honours_sigterm_during_alarm)
{
    iwt_rabbit r;
    const char *ns = iwt_namespace("amqp-walarm");
    char url[160], env_url[200], requests[160];
    int port;
    log_wait w;
    seen s = {0};
    slots first = {0, 1};
    const char *const alarm_on[] = {"-q", "set_vm_memory_high_watermark", "0.0000001", NULL};

    if (iwt_rabbit_start(&r, "amqpw", 0, NULL) != 0) {
        fprintf(stderr, "SKIP test_worker_honours_sigterm_during_alarm: no private node\n");
        return;
    }
    snprintf(url, sizeof url, "amqp://guest:guest@127.0.0.1:%d/%%2f", r.port);
    snprintf(env_url, sizeof env_url, "IW_AMQP_URL=%s", url);
    snprintf(requests, sizeof requests, "%s.requests", ns);
    const char *const env[] = {env_url, "IW_SHUTDOWN_GRACE=3s", NULL};
    const char *const slow[] = {"--latency-ms", "3000", NULL};
    pid_t mock = iwt_start_mock(slow, &port);
    snprintf(w.path, sizeof w.path, "%s/iwtest-%s-submitter.log", iwt_log_dir(), ns);
    unlink(w.path);
    pid_t worker = iwt_start_worker("submitter", ns, port, env, NULL);
    w.needle = "connected to the broker";
    ck_assert(iwt_eventually(log_has, &w, 20000));

    /* a job whose provider call is in flight when the alarm starts */
    amqp_link *l = open_link(url, &s);
    reset_calls();
    const char *job = "{\"jobId\":\"alarm-1\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{}}";
    iw_publish p = simple_publish(requests, "submit.transaction", job);
    ck_assert_int_eq(amqp_link_publish(l, &p, confirm_cb, &calls[0]), IW_OK);
    ck_assert(pump_until(l, all_called, &first, 10000));
    ck_assert_int_eq(calls[0], IW_OK);
    ck_assert_msg(iwt_eventually(mock_calling, &port, 20000),
                  "the worker never called the provider");
    ck_assert_int_eq(iwt_rabbitmqctl(&r, alarm_on), 0);
    /* its outcome is the worker's first publish in the alarm: the broker blocks it */
    w.needle = "blocks publishing";
    ck_assert_msg(iwt_eventually(log_has, &w, 20000), "the worker was not told it is blocked");

    long long t0 = iwt_now_ms();
    int rc = iwt_stop(worker, SIGTERM);
    long long took = iwt_now_ms() - t0;
    ck_assert_int_eq(rc, 0);
    ck_assert_msg(took < 3000 + 3000, "exit took %lld ms with a 3 s grace", took);
    amqp_link_free(l);
    iwt_stop(mock, SIGTERM);
    iwt_rabbit_stop(&r);
}
END_TEST

/* Private nodes of a test that failed (its process ended at the failed
 * assertion, before iwt_rabbit_stop). */
static void reap_private_nodes(void)
{
    iwt_rabbit_reap("amqp");
    iwt_rabbit_reap("amqptls");
    iwt_rabbit_reap("amqpw");
}

int main(void)
{
    Suite *s = suite_create("amqp_link");
    TCase *tc = tcase_create("link");       /* the shared broker */
    TCase *priv = tcase_create("private");  /* a private node each */
    TCase *worker = tcase_create("worker"); /* the worker on top of the link */

    tcase_set_timeout(tc, 180);
    tcase_set_timeout(priv, 240);
    tcase_set_timeout(worker, 240);
    tcase_add_test(tc, test_return_fails_only_its_publish);
    tcase_add_test(tc, test_unencodable_publish_fails_alone);
    tcase_add_test(tc, test_oversized_delivery_is_flagged);
    tcase_add_test(tc, test_delivery_over_budget_is_rejected_to_dead_letters);
    tcase_add_test(tc, test_used_up_budget_pauses_consuming);
    tcase_add_test(tc, test_several_urls_skip_a_dead_node);
    tcase_add_test(tc, test_quorum_group_size_is_declared);
    tcase_add_test(priv, test_blocked_connection_buffers_and_flushes);
    tcase_add_test(priv, test_tls_to_the_broker);
    tcase_add_test(worker, test_worker_requeues_on_return_and_redeclares);
    tcase_add_test(worker, test_worker_honours_sigterm_during_alarm);
    tcase_add_test(worker, test_worker_event_without_subscriber_is_not_retried);
    tcase_add_unchecked_fixture(priv, NULL, reap_private_nodes);
    tcase_add_unchecked_fixture(worker, NULL, reap_private_nodes);
    suite_add_tcase(s, tc);
    suite_add_tcase(s, priv);
    suite_add_tcase(s, worker);
    return iwt_run_suite(s);
}
