/* The publisher of tests/cluster/dlx_stuck.sh: publishes persistent messages
 * carrying `iw-target: status` (as the worker's status re-checks do) straight
 * to one delay tier through the default exchange, RATE a second, with
 * publisher confirms, until killed; reconnects to the same node when its
 * connection drops.  Prints a line per nack and per lost connection.
 *
 *   dlx_pub QUEUE PORT RATE        (host 127.0.0.1, guest/guest, vhost /) */
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static amqp_connection_state_t open_conn(int port)
{
    amqp_connection_state_t c = amqp_new_connection();
    amqp_socket_t *s = amqp_tcp_socket_new(c);
    if (!s || amqp_socket_open(s, "127.0.0.1", port) != AMQP_STATUS_OK)
        goto fail;
    if (amqp_login(c, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest").reply_type !=
        AMQP_RESPONSE_NORMAL)
        goto fail;
    amqp_channel_open(c, 1);
    if (amqp_get_rpc_reply(c).reply_type != AMQP_RESPONSE_NORMAL)
        goto fail;
    amqp_confirm_select(c, 1);
    if (amqp_get_rpc_reply(c).reply_type != AMQP_RESPONSE_NORMAL)
        goto fail;
    return c;
fail:
    amqp_destroy_connection(c);
    return NULL;
}

/* Publishes n messages and waits for their confirms: 0 when all were acked,
 * the number nacked, or -1 when the connection failed. */
static int publish_batch(amqp_connection_state_t c, const char *queue, int n, long *sent,
                         uint64_t *seq)
{
    amqp_table_entry_t h = {amqp_cstring_bytes("iw-target"),
                            {AMQP_FIELD_KIND_UTF8, {.bytes = amqp_cstring_bytes("status")}}};
    amqp_basic_properties_t p;
    uint64_t want = 0, acked = 0;
    int nacks = 0;

    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_HEADERS_FLAG;
    p.delivery_mode = 2;
    p.headers.num_entries = 1;
    p.headers.entries = &h;
    for (int i = 0; i < n; i++) {
        char body[32];
        snprintf(body, sizeof body, "m%ld", (*sent)++);
        if (amqp_basic_publish(c, 1, amqp_cstring_bytes(""), amqp_cstring_bytes(queue), 0, 0, &p,
                               amqp_cstring_bytes(body)) != AMQP_STATUS_OK)
            return -1;
        want = ++*seq;
    }
    while (acked < want) {
        amqp_frame_t f;
        struct timeval tv = {10, 0};
        if (amqp_simple_wait_frame_noblock(c, &f, &tv) != AMQP_STATUS_OK)
            return -1;
        if (f.frame_type != AMQP_FRAME_METHOD)
            continue;
        if (f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
            acked = ((amqp_basic_ack_t *)f.payload.method.decoded)->delivery_tag;
        } else if (f.payload.method.id == AMQP_BASIC_NACK_METHOD) {
            acked = ((amqp_basic_nack_t *)f.payload.method.decoded)->delivery_tag;
            nacks++;
        } else {
            return -1;
        }
    }
    return nacks;
}

int main(int argc, char **argv)
{
    if (argc != 4 || atoi(argv[2]) <= 0 || atoi(argv[3]) <= 0) {
        fprintf(stderr, "usage: dlx_pub QUEUE PORT RATE\n");
        return 2;
    }
    const char *queue = argv[1];
    int port = atoi(argv[2]), per_tick = atoi(argv[3]) / 10 > 0 ? atoi(argv[3]) / 10 : 1;
    amqp_connection_state_t c = NULL;
    long sent = 0;
    uint64_t seq = 0;

    setvbuf(stdout, NULL, _IOLBF, 0);
    for (;;) {
        if (!c) {
            c = open_conn(port);
            seq = 0;
            if (!c) {
                sleep(1);
                continue;
            }
        }
        int r = publish_batch(c, queue, per_tick, &sent, &seq);
        if (r > 0)
            printf("dlx_pub: %d publish(es) nacked\n", r);
        if (r < 0) {
            printf("dlx_pub: connection lost after %ld messages\n", sent);
            amqp_destroy_connection(c);
            c = NULL;
            continue;
        }
        usleep(100000);
    }
}
