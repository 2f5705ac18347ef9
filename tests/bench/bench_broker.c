/* The broker's ceiling for the submit path's message mix, without a provider.
 *
 *   bench_broker [--namespace NS] [--jobs N] [--prefetch P]
 *
 * Pre-fills a durable quorum queue NS.jobs with N persistent jobs (publisher
 * confirms), then, on one connection as the worker has: consumes them with
 * prefetch P, publishes one persistent event per job to the topic exchange
 * NS.events (publisher confirms), acks each job after its event's confirm,
 * and reads the events from a private tap queue bound with submission.*, as the
 * side-by-side benchmark does.  jobs/s = (N - 1) / (last tap event - first).
 * The broker's CPU (beam.smp) is the limit when this client is not: compare the
 * client's own CPU printed at the end with the wall time.
 * Deletes NS.jobs and NS.events at the end.  Used by tests/bench/sidebyside/. */
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "iwtest.h"

enum { CH_JOBS = 1, CH_PUB = 2, CH_TAP = 3 };

/* Exits with a message when an RPC failed: a benchmark has nobody to report to. */
static void check_rpc(amqp_connection_state_t c, const char *what)
{
    amqp_rpc_reply_t r = amqp_get_rpc_reply(c);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        fprintf(stderr, "bench_broker: %s failed (reply type %d)\n", what, (int)r.reply_type);
        exit(1);
    }
}

/* Publishes a persistent JSON body on the confirm channel. */
static void publish(amqp_connection_state_t c, const char *exchange, const char *key,
                    const char *body, const char *correlation_id)
{
    amqp_basic_properties_t p;
    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG;
    p.delivery_mode = 2;
    p.content_type = amqp_cstring_bytes("application/json");
    if (correlation_id) {
        p._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
        p.correlation_id = amqp_cstring_bytes(correlation_id);
    }
    if (amqp_basic_publish(c, CH_PUB, amqp_cstring_bytes(exchange), amqp_cstring_bytes(key), 0, 0,
                           &p, amqp_cstring_bytes(body)) != AMQP_STATUS_OK) {
        fprintf(stderr, "bench_broker: publish failed\n");
        exit(1);
    }
}

/* Reads one non-delivery frame (after amqp_consume_message said so) and returns
 * the confirm's delivery tag (with multiple semantics), 0 for anything else. */
static uint64_t read_confirm(amqp_connection_state_t c)
{
    amqp_frame_t f;
    if (amqp_simple_wait_frame(c, &f) != AMQP_STATUS_OK) {
        fprintf(stderr, "bench_broker: connection lost\n");
        exit(1);
    }
    if (f.frame_type != AMQP_FRAME_METHOD)
        return 0;
    if (f.payload.method.id == AMQP_BASIC_NACK_METHOD ||
        f.payload.method.id == AMQP_BASIC_RETURN_METHOD ||
        f.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD ||
        f.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD) {
        fprintf(stderr, "bench_broker: the broker refused (method 0x%08x)\n",
                (unsigned)f.payload.method.id);
        exit(1);
    }
    if (f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
        amqp_basic_ack_t *a = f.payload.method.decoded;
        return a->delivery_tag;
    }
    return 0;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
    long jobs = 5000, prefetch = 128;
    const char *ns = NULL;
    char q[256], ex[256], body[512], cid[64];

    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(argv[i], "--jobs"))
            jobs = atol(v), i++;
        else if (!strcmp(argv[i], "--prefetch"))
            prefetch = atol(v), i++;
        else if (!strcmp(argv[i], "--namespace"))
            ns = v, i++;
        else {
            fprintf(stderr, "usage: %s [--namespace NS] [--jobs N] [--prefetch P]\n", argv[0]);
            return 2;
        }
    }
    if (jobs < 2 || prefetch < 1 || prefetch > 65535)
        return 2;
    iwt_standalone = 1;
    if (!ns)
        ns = iwt_namespace("brk");
    snprintf(q, sizeof q, "%s.jobs", ns);
    snprintf(ex, sizeof ex, "%s.events", ns);

    iwt_amqp *a = iwt_amqp_open(); /* channel 1 open */
    amqp_connection_state_t c = a->conn;
    amqp_channel_open(c, CH_PUB);
    check_rpc(c, "channel.open");
    amqp_channel_open(c, CH_TAP);
    check_rpc(c, "channel.open");

    amqp_table_entry_t qt = {
        .key = amqp_cstring_bytes("x-queue-type"),
        .value = {.kind = AMQP_FIELD_KIND_UTF8, .value.bytes = amqp_cstring_bytes("quorum")}};
    amqp_table_t qargs = {.num_entries = 1, .entries = &qt};
    amqp_queue_declare(c, CH_JOBS, amqp_cstring_bytes(q), 0, 1, 0, 0, qargs);
    check_rpc(c, "queue.declare");
    amqp_exchange_declare(c, CH_JOBS, amqp_cstring_bytes(ex), amqp_cstring_bytes("topic"), 0, 1, 0,
                          0, amqp_empty_table);
    check_rpc(c, "exchange.declare");
    amqp_queue_declare_ok_t *tq =
        amqp_queue_declare(c, CH_TAP, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    check_rpc(c, "queue.declare (tap)");
    amqp_bytes_t tap = amqp_bytes_malloc_dup(tq->queue);
    amqp_queue_bind(c, CH_TAP, tap, amqp_cstring_bytes(ex), amqp_cstring_bytes("submission.*"),
                    amqp_empty_table);
    check_rpc(c, "queue.bind");
    amqp_confirm_select(c, CH_PUB);
    check_rpc(c, "confirm.select");

    /* Pre-fill, as the side-by-side runs do, outside the measured window. */
    for (long i = 0; i < jobs; i++) {
        snprintf(body, sizeof body,
                 "{\"jobId\":\"brk-%ld\",\"userId\":\"u-%ld\",\"action\":\"transaction\","
                 "\"payload\":{\"amount\":%ld,\"currency\":\"EUR\"}}",
                 i, i % 97, i);
        publish(c, "", q, body, NULL);
    }
    for (uint64_t confirmed = 0; confirmed < (uint64_t)jobs;) {
        uint64_t tag = read_confirm(c);
        if (tag > confirmed)
            confirmed = tag;
    }

    amqp_basic_qos(c, CH_JOBS, 0, (uint16_t)prefetch, 0);
    check_rpc(c, "basic.qos");
    amqp_basic_consume(c, CH_JOBS, amqp_cstring_bytes(q), amqp_empty_bytes, 0, 0, 0,
                       amqp_empty_table);
    check_rpc(c, "basic.consume");
    amqp_basic_consume(c, CH_TAP, tap, amqp_empty_bytes, 0, 1, 1, amqp_empty_table);
    check_rpc(c, "basic.consume (tap)");

    double cpu0 = cpu_seconds();
    long long first = 0, last = 0;
    long events = 0, consumed = 0;
    uint64_t acked = 0; /* jobs acked so far (delivery tags 1..acked) */
    while (events < jobs) {
        amqp_envelope_t env;
        amqp_maybe_release_buffers(c);
        amqp_rpc_reply_t r = amqp_consume_message(c, &env, NULL, 0);
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
            r.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
            /* Event publish seq s (after the N pre-fill publishes) belongs to
             * the (s - N)-th delivery: one event per delivery, in order. */
            uint64_t tag = read_confirm(c);
            if (tag > (uint64_t)jobs && tag - (uint64_t)jobs > acked) {
                acked = tag - (uint64_t)jobs;
                amqp_basic_ack(c, CH_JOBS, acked, 1);
            }
            continue;
        }
        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
            fprintf(stderr, "bench_broker: consume failed\n");
            return 1;
        }
        if (env.channel == CH_JOBS) {
            snprintf(cid, sizeof cid, "brk-%ld", consumed++);
            snprintf(body, sizeof body,
                     "{\"jobId\":\"%s\",\"externalId\":\"ext-%ld\",\"trackingId\":\"trk-%ld\","
                     "\"status\":\"pending\",\"acceptedAt\":\"2026-01-01T00:00:00.000Z\"}",
                     cid, consumed, consumed);
            publish(c, ex, "submission.accepted", body, cid);
        } else if (env.channel == CH_TAP) {
            last = iwt_now_ms();
            if (!first)
                first = last;
            events++;
        }
        amqp_destroy_envelope(&env);
    }
    double cpu = cpu_seconds() - cpu0;
    double secs = (last - first) / 1000.0;

    amqp_queue_delete(c, CH_JOBS, amqp_cstring_bytes(q), 0, 0);
    amqp_get_rpc_reply(c);
    amqp_exchange_delete(c, CH_JOBS, amqp_cstring_bytes(ex), 0);
    amqp_get_rpc_reply(c);
    amqp_bytes_free(tap);
    amqp_channel_close(c, CH_PUB, AMQP_REPLY_SUCCESS);
    amqp_channel_close(c, CH_TAP, AMQP_REPLY_SUCCESS);
    iwt_amqp_close(a);
    printf("jobs=%ld prefetch=%ld in %.2f s -> jobs/s=%.0f (client CPU %.2f s)\n", jobs, prefetch,
           secs, secs > 0 ? (jobs - 1) / secs : 0.0, cpu);
    return 0;
}
