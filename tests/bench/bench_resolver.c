/* Benchmark of the resolver role (not part of ctest).
 *
 *   build/bin/bench_resolver [--requests N] [--window W] [--hot H] [--latency-ms MS]
 *                            [--concurrency C] [--hit-rate P]...
 *
 * Starts a mock-provider and one `integration-worker resolver` in a fresh
 * namespace (default quorum topology, IW_LOG_LEVEL=warn, rate limits out of
 * the way), then for each hit rate P (default 0.95 and 0) sends N look-ups
 * as a closed loop with W outstanding: a look-up names one of H pre-warmed
 * ("hot") ids with probability P, else an id never seen before (a provider
 * call).  Prints look-ups per second and the p50/p99/max latency from
 * publish to reply, plus the sources the replies name and the provider GETs
 * the mock counted.  Cleans up the namespace at the end. */
#include <amqp.h>
#include <jansson.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "iwtest.h"

#define MAX_RATES 8

typedef struct options {
    long requests, window, hot, latency_ms, concurrency;
    double rates[MAX_RATES];
    int n_rates;
} options;

static long long now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

typedef struct bench {
    iwt_amqp *a;
    char reply_queue[256];
    char exchange[256];
    const char *ns;
    int port;
} bench;

static void publish(bench *b, const char *id, long seq)
{
    char body[256], corr[32];
    amqp_basic_properties_t p;

    snprintf(body, sizeof body, "{\"id\":\"%s\"}", id);
    snprintf(corr, sizeof corr, "%ld", seq);
    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_REPLY_TO_FLAG |
               AMQP_BASIC_CORRELATION_ID_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
    p.content_type = amqp_cstring_bytes("application/json");
    p.reply_to = amqp_cstring_bytes(b->reply_queue);
    p.correlation_id = amqp_cstring_bytes(corr);
    p.delivery_mode = 2;
    amqp_bytes_t bb = {strlen(body), body};
    if (amqp_basic_publish(b->a->conn, 1, amqp_cstring_bytes(b->exchange),
                           amqp_cstring_bytes("resource.get"), 0, 0, &p, bb) != AMQP_STATUS_OK) {
        fprintf(stderr, "publish failed\n");
        exit(1);
    }
}

/* Next reply: its sequence number and source ("error" for an error reply). */
static long next_reply(bench *b, char *source, size_t len)
{
    amqp_envelope_t env;
    struct timeval tv = {30, 0};
    long seq;

    amqp_maybe_release_buffers(b->a->conn);
    amqp_rpc_reply_t r = amqp_consume_message(b->a->conn, &env, &tv, 0);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        fprintf(stderr, "no reply within 30 s\n");
        exit(1);
    }
    {
        char cid[32];
        snprintf(cid, sizeof cid, "%.*s", (int)env.message.properties.correlation_id.len,
                 (char *)env.message.properties.correlation_id.bytes);
        seq = cid[0] ? strtol(cid, NULL, 10) : -1;
    }
    json_t *doc = json_loadb(env.message.body.bytes, env.message.body.len, 0, NULL);
    const char *s = json_string_value(json_object_get(doc, "source"));
    snprintf(source, len, "%s", s ? s : "error");
    json_decref(doc);
    amqp_destroy_envelope(&env);
    return seq;
}

static long total_gets(int port)
{
    json_t *stats = iwt_mock_stats(port), *v;
    const char *k;
    long n = 0;
    json_object_foreach(json_object_get(stats, "resource_gets"), k, v) n +=
        (long)json_integer_value(v);
    json_decref(stats);
    return n;
}

static void run(bench *b, const options *o, double hit_rate, int run_no)
{
    long long *lat = calloc((size_t)o->requests, sizeof *lat);
    long long *sent = calloc((size_t)o->requests, sizeof *sent);
    long next = 0, done = 0, n_cache = 0, n_provider = 0, n_other = 0;
    long gets_before = total_gets(b->port);
    char id[128], source[32];
    long long t0;
    unsigned seed = 12345u + (unsigned)run_no;

    t0 = now_us();
    while (done < o->requests) {
        while (next < o->requests && next - done < o->window) {
            double u = (double)rand_r(&seed) / ((double)RAND_MAX + 1.0);
            if (u < hit_rate)
                snprintf(id, sizeof id, "hot-%ld", (long)(rand_r(&seed) % o->hot));
            else
                snprintf(id, sizeof id, "cold-%d-%ld", run_no, next);
            sent[next] = now_us();
            publish(b, id, next);
            next++;
        }
        long seq = next_reply(b, source, sizeof source);
        if (seq < 0 || seq >= o->requests)
            continue;
        lat[seq] = now_us() - sent[seq];
        done++;
        if (!strcmp(source, "cache"))
            n_cache++;
        else if (!strcmp(source, "provider"))
            n_provider++;
        else
            n_other++;
    }
    double secs = (double)(now_us() - t0) / 1e6;
    iwt_sort_ll(lat, (size_t)o->requests);
    printf("hit rate %3.0f%%: %ld look-ups in %.2f s = %.0f/s; latency p50 %.2f ms, p99 %.2f ms, "
           "max %.2f ms; replies: %ld cache, %ld provider, %ld other; provider GETs %ld\n",
           hit_rate * 100, o->requests, secs, (double)o->requests / secs,
           (double)lat[o->requests / 2] / 1000.0, (double)lat[(o->requests * 99) / 100] / 1000.0,
           (double)lat[o->requests - 1] / 1000.0, n_cache, n_provider, n_other,
           total_gets(b->port) - gets_before);
    fflush(stdout);
    free(lat);
    free(sent);
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_resolver [--requests N] [--window W] [--hot H] [--latency-ms MS] "
                    "[--concurrency C] [--hit-rate P]...\n");
    exit(2);
}

int main(int argc, char **argv)
{
    options o = {20000, 200, 100, 0, 64, {0}, 0};
    bench b = {0};
    char latency_env[64], conc_env[64];
    pid_t mock, worker;
    amqp_queue_declare_ok_t *q;

    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            usage();
        if (!strcmp(argv[i], "--requests"))
            o.requests = atol(argv[++i]);
        else if (!strcmp(argv[i], "--window"))
            o.window = atol(argv[++i]);
        else if (!strcmp(argv[i], "--hot"))
            o.hot = atol(argv[++i]);
        else if (!strcmp(argv[i], "--latency-ms"))
            o.latency_ms = atol(argv[++i]);
        else if (!strcmp(argv[i], "--concurrency"))
            o.concurrency = atol(argv[++i]);
        else if (!strcmp(argv[i], "--hit-rate") && o.n_rates < MAX_RATES)
            o.rates[o.n_rates++] = atof(argv[++i]);
        else
            usage();
    }
    if (o.requests < 1 || o.window < 1 || o.hot < 1)
        usage();
    if (!o.n_rates) {
        o.rates[0] = 0.95;
        o.rates[1] = 0.0;
        o.n_rates = 2;
    }

    b.ns = iwt_namespace("bench-resolver");
    snprintf(b.exchange, sizeof b.exchange, "%s.requests", b.ns);
    iwt_declare(b.ns);
    {
        char lat_arg[32];
        snprintf(lat_arg, sizeof lat_arg, "%ld", o.latency_ms);
        const char *margs[] = {"--latency-ms", lat_arg, "--threads", "4", NULL};
        mock = iwt_start_mock(margs, &b.port);
    }
    snprintf(latency_env, sizeof latency_env, "IW_HTTP_TIMEOUT=%lds", 10 + o.latency_ms / 1000);
    snprintf(conc_env, sizeof conc_env, "IW_CONCURRENCY=%ld", o.concurrency);
    const char *env[] = {"IW_LOG_LEVEL=warn", "IW_RATE_LIMITS=10000000/s",
                         latency_env,         conc_env,
                         "IW_PREFETCH=1000",  NULL};
    worker = iwt_start_worker("resolver", b.ns, b.port, env, "bench");

    b.a = iwt_amqp_open();
    q = amqp_queue_declare(b.a->conn, 1, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    snprintf(b.reply_queue, sizeof b.reply_queue, "%.*s", (int)q->queue.len,
             (char *)q->queue.bytes);
    amqp_basic_consume(b.a->conn, 1, amqp_cstring_bytes(b.reply_queue), amqp_empty_bytes, 0, 1, 1,
                       amqp_empty_table);

    printf("bench_resolver: namespace %s, %ld look-ups per run, window %ld, %ld hot ids, "
           "provider latency %ld ms, IW_CONCURRENCY %ld\n",
           b.ns, o.requests, o.window, o.hot, o.latency_ms, o.concurrency);
    /* warm the hot set (and the connections) */
    for (long i = 0; i < o.hot; i++) {
        char id[64], src[32];
        snprintf(id, sizeof id, "hot-%ld", i);
        publish(&b, id, o.requests + i);
        next_reply(&b, src, sizeof src);
    }
    for (int i = 0; i < o.n_rates; i++)
        run(&b, &o, o.rates[i], i);

    iwt_amqp_close(b.a);
    iwt_stop(worker, SIGTERM);
    kill(mock, SIGTERM);
    waitpid(mock, NULL, 0);
    iwt_cleanup(b.ns);
    return 0;
}
