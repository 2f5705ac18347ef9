#include "amqp_link.h"

#include <amqp.h>
#include <errno.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define CHANNEL 1
#define HEARTBEAT_S 30
#define FRAME_MAX 131072
#define SHORTSTR_MAX 255
#define TABLE_DEPTH_MAX 32
#define MAX_NODES 16
/* frame type + channel + size before the payload, frame-end after it */
#define FRAME_OVERHEAD 8

typedef struct pending_confirm {
    uint64_t seq;
    amqp_confirm_fn cb; /* NULL once resolved out of order */
    void *ud;
    int returned; /* a basic.return named this publish: its confirm fails */
} pending_confirm;

/* What waits in the write buffer while the broker blocks us or the socket is
 * full, in the order it was asked for. */
typedef enum out_kind {
    OUT_PUBLISH,
    OUT_ACK,
    OUT_NACK,
    OUT_REJECT,
    OUT_CONSUME,
    OUT_CANCEL,
} out_kind;

typedef struct out_op {
    struct out_op *next;
    out_kind kind;
    uint64_t tag;
    int requeue;
    char *name;     /* OUT_CONSUME: queue */
    char *ctag;     /* OUT_CONSUME, OUT_CANCEL */
    iw_publish pub; /* OUT_PUBLISH: every string and the body owned */
    json_t *headers;
    amqp_confirm_fn cb;
    void *ud;
    size_t bytes;
} out_op;

typedef struct consumer {
    char *queue;
    char *tag;
} consumer;

/* The content (header + body frames) that follows a basic.deliver,
 * basic.return or basic.get-ok on our channel. */
typedef enum content_kind {
    CT_NONE,
    CT_DELIVERY, /* held: copied into d->body */
    CT_GET,      /* held for amqp_link_get, outside the budget */
    CT_RETURN,   /* headers read to find the publish, body discarded */
    CT_DISCARD,  /* body discarded (a rejected delivery) */
} content_kind;

typedef struct content {
    content_kind kind;
    int have_header;
    uint64_t remaining; /* body bytes still to come */
    iw_delivery *d;     /* CT_DELIVERY, CT_GET */
    char *ret_exchange, *ret_routing_key;
} content;

struct amqp_link {
    amqp_connection_state_t conn;
    int ok;
    char error[IW_ERRMSG_LEN];
    uint64_t generation;
    int node;
    uint64_t next_seq;    /* publish sequence number of the next publish */
    amqp_pool_t pub_pool; /* a publish's header table; recycled, not freed, after each */
    pending_confirm *pending;
    size_t cap, head, count; /* ring buffer of unconfirmed publishes, in seq order */
    amqp_link_handlers h;
    int blocked;
    /* Bytes the socket takes without a write waiting, known from its last
     * POLLOUT: checked once per so many bytes, not before every write. */
    size_t room;
    int batching; /* publishes of a turn go out together (amqp_link_push) */
    int corked;
    /* Plain TCP: the frames of a turn's publishes and acks, encoded here and
     * written in one send() by amqp_link_push (TLS goes through librabbitmq,
     * corked). */
    int raw;
    unsigned char *wb;
    size_t wb_len, wb_cap;
    out_op *out_head, *out_tail;
    size_t out_bytes, out_publishes;
    consumer *consumers;
    size_t n_consumers;
    int paused; /* consumers cancelled because the held budget is used up */
    size_t max_body, max_held;
    content ct;
    iw_delivery *got; /* amqp_link_get's result */
};

static uint64_t generation_counter;
/* The process's held delivery bytes.  One process has one budget, whatever
 * links come and go: deliveries of a lost connection are still in memory
 * after the reconnect, so the count cannot live in a link. */
static size_t held_total;
/* The node whose connection failed last, so that the next connect starts
 * with the one after it (one process talks to one cluster). */
static int last_failed_node = -1;

size_t amqp_link_held_bytes(void)
{
    return held_total;
}

/* ---- AMQP tables <-> JSON ------------------------------------------------ */

/* A malloc'd NUL-terminated copy of at most cap bytes of b: kept as is when it
 * is UTF-8 (cut at a character boundary), else printable ASCII with every
 * other byte as \xNN, so that it is always a valid string.  NULL on OOM. */
char *amqp_clean_str(const void *bytes, size_t len, size_t cap)
{
    const unsigned char *b = bytes;
    size_t n = len < cap ? len : cap;
    json_t *probe;
    char *out;

    if (n < len)
        while (n > 0 && (b[n] & 0xC0) == 0x80)
            n--; /* drop a character cut in half */
    if ((probe = json_stringn((const char *)b, n)) != NULL) {
        json_decref(probe);
        /* the bytes are not NUL-terminated: no strndup (it may look past n) */
        if ((out = malloc(n + 1)) != NULL) {
            memcpy(out, b, n);
            out[n] = '\0';
        }
        return out;
    }
    if (!(out = malloc(n * 4 + 1)))
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (b[i] >= 0x20 && b[i] < 0x7f && b[i] != '\\')
            out[o++] = (char)b[i];
        else
            o += (size_t)sprintf(out + o, "\\x%02x", b[i]);
    }
    out[o] = '\0';
    return out;
}

static json_t *field_to_json(const amqp_field_value_t *v, amqp_bytes_json_fn on_binary);

json_t *amqp_table_to_json_with(const amqp_table_t *t, amqp_bytes_json_fn on_binary)
{
    json_t *obj = json_object();
    for (int i = 0; obj && i < t->num_entries; i++) {
        const amqp_table_entry_t *e = &t->entries[i];
        char *key = amqp_clean_str(e->key.bytes, e->key.len, 255);
        json_t *val = field_to_json(&e->value, on_binary);
        if (key && val)
            json_object_set_new(obj, key, val);
        else
            json_decref(val);
        free(key);
    }
    return obj;
}

json_t *amqp_table_to_json(const amqp_table_t *t)
{
    return amqp_table_to_json_with(t, NULL);
}

static json_t *field_to_json(const amqp_field_value_t *v, amqp_bytes_json_fn on_binary)
{
    switch (v->kind) {
    case AMQP_FIELD_KIND_BOOLEAN:
        return json_boolean(v->value.boolean);
    case AMQP_FIELD_KIND_I8:
        return json_integer(v->value.i8);
    case AMQP_FIELD_KIND_U8:
        return json_integer(v->value.u8);
    case AMQP_FIELD_KIND_I16:
        return json_integer(v->value.i16);
    case AMQP_FIELD_KIND_U16:
        return json_integer(v->value.u16);
    case AMQP_FIELD_KIND_I32:
        return json_integer(v->value.i32);
    case AMQP_FIELD_KIND_U32:
        return json_integer(v->value.u32);
    case AMQP_FIELD_KIND_I64:
        return json_integer(v->value.i64);
    case AMQP_FIELD_KIND_U64:
    case AMQP_FIELD_KIND_TIMESTAMP:
        return json_integer((json_int_t)v->value.u64);
    case AMQP_FIELD_KIND_F32:
        return json_real(v->value.f32);
    case AMQP_FIELD_KIND_F64:
        return json_real(v->value.f64);
    case AMQP_FIELD_KIND_DECIMAL:
        return json_pack("{s:i, s:I}", "decimals", v->value.decimal.decimals, "value",
                         (json_int_t)v->value.decimal.value);
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES: {
        json_t *str = json_stringn(v->value.bytes.bytes, v->value.bytes.len);
        if (str)
            return str;
        return on_binary ? on_binary(v->value.bytes) : json_null();
    }
    case AMQP_FIELD_KIND_ARRAY: {
        json_t *arr = json_array();
        for (int i = 0; arr && i < v->value.array.num_entries; i++) {
            json_t *item = field_to_json(&v->value.array.entries[i], on_binary);
            json_array_append_new(arr, item ? item : json_null());
        }
        return arr;
    }
    case AMQP_FIELD_KIND_TABLE:
        return amqp_table_to_json_with(&v->value.table, on_binary);
    default:
        return json_null();
    }
}

static int json_to_field(amqp_pool_t *pool, const json_t *j, amqp_field_value_t *out);

static int json_to_table(amqp_pool_t *pool, const json_t *obj, amqp_table_t *out)
{
    const char *key;
    json_t *val;
    int i = 0;

    out->num_entries = 0;
    out->entries = NULL;
    if (!obj || !json_object_size(obj))
        return 0;
    out->entries = amqp_pool_alloc(pool, sizeof(amqp_table_entry_t) * json_object_size(obj));
    if (!out->entries)
        return -1;
    json_object_foreach((json_t *)obj, key, val)
    {
        out->entries[i].key = amqp_cstring_bytes(key);
        if (json_to_field(pool, val, &out->entries[i].value) != 0)
            return -1;
        i++;
    }
    out->num_entries = i;
    return 0;
}

static int json_to_field(amqp_pool_t *pool, const json_t *j, amqp_field_value_t *out)
{
    switch (json_typeof(j)) {
    case JSON_STRING:
        out->kind = AMQP_FIELD_KIND_UTF8;
        out->value.bytes.bytes = (void *)json_string_value(j);
        out->value.bytes.len = json_string_length(j);
        return 0;
    case JSON_INTEGER:
        out->kind = AMQP_FIELD_KIND_I64;
        out->value.i64 = json_integer_value(j);
        return 0;
    case JSON_REAL:
        out->kind = AMQP_FIELD_KIND_F64;
        out->value.f64 = json_real_value(j);
        return 0;
    case JSON_TRUE:
    case JSON_FALSE:
        out->kind = AMQP_FIELD_KIND_BOOLEAN;
        out->value.boolean = json_is_true(j);
        return 0;
    case JSON_NULL:
        out->kind = AMQP_FIELD_KIND_VOID;
        return 0;
    case JSON_OBJECT:
        out->kind = AMQP_FIELD_KIND_TABLE;
        return json_to_table(pool, j, &out->value.table);
    case JSON_ARRAY: {
        size_t n = json_array_size(j);
        out->kind = AMQP_FIELD_KIND_ARRAY;
        out->value.array.num_entries = (int)n;
        out->value.array.entries = n ? amqp_pool_alloc(pool, sizeof(amqp_field_value_t) * n) : NULL;
        if (n && !out->value.array.entries)
            return -1;
        for (size_t i = 0; i < n; i++)
            if (json_to_field(pool, json_array_get(j, i), &out->value.array.entries[i]) != 0)
                return -1;
        return 0;
    }
    }
    return -1;
}

/* ---- errors -------------------------------------------------------------- */

static void link_fail(amqp_link *l, const char *fmt, const char *detail)
{
    if (l->ok) {
        snprintf(l->error, sizeof l->error, fmt, detail);
        last_failed_node = l->node;
    }
    l->ok = 0;
}

/* Describes a failed RPC reply; marks the link unusable on server closes. */
static int rpc_check(amqp_link *l, amqp_rpc_reply_t r, const char *what, iw_error *err)
{
    char text[200] = "";

    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        return IW_OK;
    case AMQP_RESPONSE_NONE:
        snprintf(text, sizeof text, "missing RPC reply");
        break;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        snprintf(text, sizeof text, "%s", amqp_error_string2(r.library_error));
        break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            amqp_connection_close_t *m = r.reply.decoded;
            snprintf(text, sizeof text, "server closed connection: %d %.*s", m->reply_code,
                     (int)m->reply_text.len, (char *)m->reply_text.bytes);
            amqp_connection_close_ok_t ok;
            amqp_send_method(l->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        } else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            amqp_channel_close_t *m = r.reply.decoded;
            snprintf(text, sizeof text, "server closed channel: %d %.*s", m->reply_code,
                     (int)m->reply_text.len, (char *)m->reply_text.bytes);
            amqp_channel_close_ok_t ok;
            amqp_send_method(l->conn, CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        } else {
            snprintf(text, sizeof text, "server exception, method 0x%08X", r.reply.id);
        }
        break;
    }
    link_fail(l, "%s", text);
    return iw_error_set(err, IW_ERR_AMQP, "%s: %s", what, text);
}

/* ---- connection ---------------------------------------------------------- */

/* Connects to one node.  The URL may hold a password: no message quotes it. */
#define SYSTEM_CA_BUNDLE "/etc/ssl/certs/ca-certificates.crt"

/* Loads the CA, client certificate and verification settings into a TLS
 * socket.  The file names are settings, not secrets, so errors name them. */
static int setup_tls(amqp_socket_t *sock, const amqp_link_tls *tls, iw_error *err)
{
    const char *ca = tls && tls->ca ? tls->ca : SYSTEM_CA_BUNDLE;
    int verify = tls ? tls->verify : 1;

    amqp_ssl_socket_set_verify_peer(sock, verify);
    amqp_ssl_socket_set_verify_hostname(sock, verify);
    if (amqp_ssl_socket_set_ssl_versions(sock, AMQP_TLSv1_2, AMQP_TLSvLATEST) != AMQP_STATUS_OK)
        return iw_error_set(err, IW_ERR_AMQP, "cannot select TLS versions");
    if ((verify || (tls && tls->ca)) && amqp_ssl_socket_set_cacert(sock, ca) != AMQP_STATUS_OK)
        return iw_error_set(err, IW_ERR_CONFIG, "IW_AMQP_CA: cannot load the CA bundle %s", ca);
    if (tls && tls->cert &&
        amqp_ssl_socket_set_key(sock, tls->cert, tls->key ? tls->key : tls->cert) != AMQP_STATUS_OK)
        return iw_error_set(err, IW_ERR_CONFIG,
                            "IW_AMQP_CERT: cannot load the client certificate %s and its key %s",
                            tls->cert, tls->key ? tls->key : tls->cert);
    return IW_OK;
}

static int connect_one(amqp_link *l, const char *url, const char *name, int node, int nodes,
                       const amqp_link_tls *tls, iw_error *err)
{
    struct amqp_connection_info ci;
    char *copy = strdup(url);
    amqp_socket_t *sock;
    struct timeval tv = {5, 0};
    amqp_table_entry_t caps[3];
    amqp_table_entry_t props[2];
    amqp_table_t props_table = {2, props};
    int rc = IW_OK, arc, fd;
    unsigned int user_timeout = AMQP_LINK_SEND_TIMEOUT_MS;

    if (!copy) {
        rc = iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        goto out;
    }
    amqp_default_connection_info(&ci);
    if (amqp_parse_url(copy, &ci) != AMQP_STATUS_OK) {
        rc = iw_error_set(err, IW_ERR_CONFIG, "IW_AMQP_URL: cannot parse URL %d of %d", node + 1,
                          nodes);
        goto out;
    }
    l->conn = amqp_new_connection();
    l->raw = !ci.ssl;
    sock = ci.ssl ? amqp_ssl_socket_new(l->conn) : amqp_tcp_socket_new(l->conn);
    if (!sock) {
        rc = iw_error_set(err, IW_ERR_AMQP, "cannot create AMQP socket");
        goto out;
    }
    if (ci.ssl && (rc = setup_tls(sock, tls, err)) != IW_OK)
        goto out;
    arc = amqp_socket_open_noblock(sock, ci.host, ci.port, &tv);
    if (arc != AMQP_STATUS_OK) {
        rc = iw_error_set(err, IW_ERR_AMQP, "cannot connect to %s:%d (node %d of %d): %s", ci.host,
                          ci.port, node + 1, nodes, amqp_error_string2(arc));
        goto out;
    }
    /* librabbitmq's sockets are non-blocking and it waits for POLLOUT without
     * a deadline, so SO_SNDTIMEO would never fire; TCP_USER_TIMEOUT makes the
     * kernel abort a connection whose sent data stays unacknowledged (also
     * under a zero window: a broker that stopped reading) that long. */
    fd = amqp_get_sockfd(l->conn);
    if (fd >= 0)
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof user_timeout);
    tv.tv_sec = 10;
    amqp_set_rpc_timeout(l->conn, &tv);
    caps[0].key = amqp_cstring_bytes("connection.blocked");
    caps[0].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    caps[0].value.value.boolean = 1;
    caps[1].key = amqp_cstring_bytes("consumer_cancel_notify");
    caps[1].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    caps[1].value.value.boolean = 1;
    caps[2].key = amqp_cstring_bytes("publisher_confirms");
    caps[2].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    caps[2].value.value.boolean = 1;
    props[0].key = amqp_cstring_bytes("connection_name");
    props[0].value.kind = AMQP_FIELD_KIND_UTF8;
    props[0].value.value.bytes = amqp_cstring_bytes(name ? name : "integration-worker");
    props[1].key = amqp_cstring_bytes("capabilities");
    props[1].value.kind = AMQP_FIELD_KIND_TABLE;
    props[1].value.value.table.num_entries = 3;
    props[1].value.value.table.entries = caps;
    if (rpc_check(l,
                  amqp_login_with_properties(l->conn, ci.vhost, 0, FRAME_MAX, HEARTBEAT_S,
                                             &props_table, AMQP_SASL_METHOD_PLAIN, ci.user,
                                             ci.password),
                  "AMQP login", err) != IW_OK) {
        rc = IW_ERR_AMQP;
        goto out;
    }
    amqp_channel_open(l->conn, CHANNEL);
    if (rpc_check(l, amqp_get_rpc_reply(l->conn), "channel.open", err) != IW_OK) {
        rc = IW_ERR_AMQP;
        goto out;
    }
    amqp_confirm_select(l->conn, CHANNEL);
    if (rpc_check(l, amqp_get_rpc_reply(l->conn), "confirm.select", err) != IW_OK) {
        rc = IW_ERR_AMQP;
        goto out;
    }
out:
    free(copy);
    return rc;
}

/* Splits "u1, u2,u3" into at most MAX_NODES trimmed pieces of buf. */
static int split_urls(char *buf, char **urls)
{
    int n = 0;
    char *save = NULL;

    for (char *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        while (*t == ' ' || *t == '\t')
            t++;
        for (char *e = t + strlen(t); e > t && (e[-1] == ' ' || e[-1] == '\t');)
            *--e = '\0';
        if (!*t)
            continue;
        if (n == MAX_NODES)
            return -1;
        urls[n++] = t;
    }
    return n;
}

static void close_conn(amqp_link *l)
{
    if (!l->conn)
        return;
    /* A polite close is two round trips: not while the broker blocks us
     * (it does not read; they would wait out the RPC timeout). */
    if (l->ok && !l->blocked) {
        amqp_link_push(l); /* the last acks */
        amqp_channel_close(l->conn, CHANNEL, AMQP_REPLY_SUCCESS);
        amqp_connection_close(l->conn, AMQP_REPLY_SUCCESS);
    }
    amqp_destroy_connection(l->conn);
    l->conn = NULL;
}

amqp_link *amqp_link_connect(const char *urls, const char *name, const amqp_link_handlers *h,
                             iw_error *err)
{
    return amqp_link_connect_tls(urls, name, h, NULL, err);
}

amqp_link *amqp_link_connect_tls(const char *urls, const char *name, const amqp_link_handlers *h,
                                 const amqp_link_tls *tls, iw_error *err)
{
    amqp_link *l = calloc(1, sizeof *l);
    char *buf = urls ? strdup(urls) : NULL;
    char *list[MAX_NODES];
    int n, start;

    if (!l || !buf) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        goto fail;
    }
    init_amqp_pool(&l->pub_pool, 4096); /* allocates at its first use */
    n = split_urls(buf, list);
    if (n <= 0) {
        iw_error_set(err, IW_ERR_CONFIG, "IW_AMQP_URL: %s",
                     n < 0 ? "at most 16 URLs" : "no URL given");
        goto fail;
    }
    l->generation = ++generation_counter;
    l->next_seq = 1;
    l->max_body = SIZE_MAX;
    l->max_held = AMQP_LINK_DEFAULT_MAX_HELD;
    if (h)
        l->h = *h;
    start = last_failed_node >= 0 ? (last_failed_node + 1) % n : 0;
    for (int i = 0; i < n; i++) {
        int node = (start + i) % n;
        l->ok = 1;
        l->error[0] = '\0';
        l->node = node;
        if (connect_one(l, list[node], name, node, n, tls, err) == IW_OK) {
            free(buf);
            return l;
        }
        l->ok = 0;
        last_failed_node = node;
        close_conn(l);
        if (err && err->status == IW_ERR_CONFIG)
            break;
    }
fail:
    free(buf);
    free(l);
    return NULL;
}

static void out_free(out_op *op)
{
    free(op->name);
    free(op->ctag);
    free((char *)op->pub.exchange);
    free((char *)op->pub.routing_key);
    free((char *)op->pub.body);
    free((char *)op->pub.content_type);
    free((char *)op->pub.correlation_id);
    free((char *)op->pub.reply_to);
    free((char *)op->pub.message_id);
    json_decref(op->headers);
    free(op);
}

static void fail_all_pending(amqp_link *l, int status)
{
    while (l->count) {
        pending_confirm p = l->pending[l->head];
        l->head = (l->head + 1) % l->cap;
        l->count--;
        if (p.cb)
            p.cb(p.ud, status);
    }
    while (l->out_head) {
        out_op *op = l->out_head;
        l->out_head = op->next;
        if (op->kind == OUT_PUBLISH && op->cb)
            op->cb(op->ud, status);
        out_free(op);
    }
    l->out_tail = NULL;
    l->out_bytes = l->out_publishes = 0;
}

void amqp_link_free(amqp_link *l)
{
    if (!l)
        return;
    close_conn(l);
    l->ok = 0;
    fail_all_pending(l, IW_ERR_AMQP_CLOSED);
    free(l->pending);
    for (size_t i = 0; i < l->n_consumers; i++) {
        free(l->consumers[i].queue);
        free(l->consumers[i].tag);
    }
    free(l->consumers);
    delivery_free(l->ct.d);
    free(l->ct.ret_exchange);
    free(l->ct.ret_routing_key);
    delivery_free(l->got);
    free(l->wb);
    empty_amqp_pool(&l->pub_pool);
    free(l);
}

void amqp_link_set_limits(amqp_link *l, size_t max_body_bytes, size_t max_held_bytes)
{
    l->max_body = max_body_bytes;
    l->max_held = max_held_bytes;
}

int amqp_link_fd(const amqp_link *l)
{
    return l && l->conn ? amqp_get_sockfd(l->conn) : -1;
}

uint64_t amqp_link_generation(const amqp_link *l)
{
    return l ? l->generation : 0;
}

int amqp_link_ok(const amqp_link *l)
{
    return l && l->ok;
}

const char *amqp_link_error(const amqp_link *l)
{
    return l ? l->error : "no link";
}

int amqp_link_blocked(const amqp_link *l)
{
    return l && l->blocked;
}

int amqp_link_node(const amqp_link *l)
{
    return l ? l->node : -1;
}

int amqp_link_has_buffered(const amqp_link *l)
{
    return l && l->ok && (amqp_frames_enqueued(l->conn) || amqp_data_in_buffer(l->conn));
}

int amqp_link_wants_write(const amqp_link *l)
{
    return l && l->ok && !l->blocked && l->out_head;
}

/* ---- confirms ------------------------------------------------------------ */

static int push_pending(amqp_link *l, uint64_t seq, amqp_confirm_fn cb, void *ud)
{
    if (l->count == l->cap) {
        size_t ncap = l->cap ? l->cap * 2 : 256;
        pending_confirm *n = malloc(ncap * sizeof *n);
        if (!n)
            return IW_ERR_NOMEM;
        for (size_t i = 0; i < l->count; i++)
            n[i] = l->pending[(l->head + i) % l->cap];
        free(l->pending);
        l->pending = n;
        l->cap = ncap;
        l->head = 0;
    }
    l->pending[(l->head + l->count) % l->cap] = (pending_confirm){seq, cb, ud, 0};
    l->count++;
    return IW_OK;
}

static pending_confirm *find_pending(amqp_link *l, uint64_t seq)
{
    for (size_t i = 0; i < l->count; i++) {
        pending_confirm *p = &l->pending[(l->head + i) % l->cap];
        if (p->seq == seq)
            return p;
        if (p->seq > seq)
            break;
    }
    return NULL;
}

/* An ack of a returned publish still fails it: the broker confirms an
 * unroutable message, which reached no queue. */
static int final_status(const pending_confirm *p, int status)
{
    return p->returned && status == IW_OK ? IW_ERR_AMQP_RETURNED : status;
}

/* Resolves confirms: all up to `tag` when `multiple`, else exactly `tag`. */
static void resolve(amqp_link *l, uint64_t tag, int multiple, int status)
{
    if (!multiple) {
        pending_confirm *p = find_pending(l, tag);
        if (p && p->cb) {
            amqp_confirm_fn cb = p->cb;
            p->cb = NULL;
            cb(p->ud, final_status(p, status));
        }
    }
    while (l->count) {
        pending_confirm *p = &l->pending[l->head];
        if (p->cb && !(multiple && p->seq <= tag))
            break;
        pending_confirm done = *p;
        l->head = (l->head + 1) % l->cap;
        l->count--;
        if (done.cb)
            done.cb(done.ud, final_status(&done, status));
    }
}

size_t amqp_link_unconfirmed(const amqp_link *l)
{
    return l ? l->count + l->out_publishes : 0;
}

/* ---- deliveries ------------------------------------------------------------ */

static char *bytes_dup(amqp_bytes_t b)
{
    char *s = malloc(b.len + 1);
    if (s) {
        if (b.len)
            memcpy(s, b.bytes, b.len);
        s[b.len] = '\0';
    }
    return s;
}

void delivery_free(iw_delivery *d)
{
    if (!d)
        return;
    held_total -= d->held < held_total ? d->held : held_total;
    free(d->consumer_tag);
    free(d->exchange);
    free(d->routing_key);
    free(d->content_type);
    free(d->correlation_id);
    free(d->reply_to);
    free(d->message_id);
    json_decref(d->headers);
    free(d->body);
    free(d);
}

/* Copies the properties of a content header into d (not the body). */
static int delivery_set_properties(iw_delivery *d, const amqp_basic_properties_t *p)
{
    if ((p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG) &&
        !(d->content_type = bytes_dup(p->content_type)))
        return IW_ERR_NOMEM;
    if ((p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) &&
        !(d->correlation_id = bytes_dup(p->correlation_id)))
        return IW_ERR_NOMEM;
    if ((p->_flags & AMQP_BASIC_REPLY_TO_FLAG) && !(d->reply_to = bytes_dup(p->reply_to)))
        return IW_ERR_NOMEM;
    if ((p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) && !(d->message_id = bytes_dup(p->message_id)))
        return IW_ERR_NOMEM;
    /* none: NULL, not an empty object (~200 bytes for each job in flight) */
    if (!(p->_flags & AMQP_BASIC_HEADERS_FLAG) || p->headers.num_entries == 0)
        return IW_OK;
    if (!(d->headers = amqp_table_to_json(&p->headers)))
        return IW_ERR_NOMEM;
    json_object_del(d->headers, AMQP_LINK_SEQ_HEADER);
    if (json_object_size(d->headers) == 0) {
        json_decref(d->headers);
        d->headers = NULL;
    }
    return IW_OK;
}

/* A new delivery for a basic.deliver or basic.get-ok, body still to come. */
static iw_delivery *delivery_new(amqp_link *l, uint64_t tag, int redelivered, amqp_bytes_t ctag,
                                 amqp_bytes_t exchange, amqp_bytes_t rkey)
{
    iw_delivery *d = calloc(1, sizeof *d);

    if (!d)
        return NULL;
    d->generation = l->generation;
    d->tag = tag;
    d->redelivered = redelivered;
    d->consumer_tag = bytes_dup(ctag);
    d->exchange = bytes_dup(exchange);
    d->routing_key = bytes_dup(rkey);
    if (!d->consumer_tag || !d->exchange || !d->routing_key) {
        delivery_free(d);
        return NULL;
    }
    return d;
}

static void content_reset(amqp_link *l)
{
    delivery_free(l->ct.d);
    free(l->ct.ret_exchange);
    free(l->ct.ret_routing_key);
    memset(&l->ct, 0, sizeof l->ct);
}

static int out_enqueue(amqp_link *l, out_op *op);
static int must_queue(amqp_link *l, size_t bytes);
static int send_op(amqp_link *l, out_op *op);

/* Sends (or buffers) a small method of ours: ack, nack, reject, consume, cancel. */
static int write_simple(amqp_link *l, out_kind kind, uint64_t tag, int requeue, const char *queue,
                        const char *ctag)
{
    out_op op = {0};
    out_op *copy;

    op.kind = kind;
    op.tag = tag;
    op.requeue = requeue;
    if (!must_queue(l, 64 + (queue ? strlen(queue) : 0) + (ctag ? strlen(ctag) : 0))) {
        op.name = (char *)queue;
        op.ctag = (char *)ctag;
        return send_op(l, &op) == AMQP_STATUS_OK ? IW_OK : IW_ERR_AMQP_CLOSED;
    }
    copy = calloc(1, sizeof *copy);
    if (!copy || (queue && !(copy->name = strdup(queue))) ||
        (ctag && !(copy->ctag = strdup(ctag)))) {
        if (copy)
            out_free(copy);
        link_fail(l, "%s", "out of memory buffering a write");
        return IW_ERR_NOMEM;
    }
    copy->kind = kind;
    copy->tag = tag;
    copy->requeue = requeue;
    return out_enqueue(l, copy);
}

/* Cancels every consumer while the held budget is used up (deliveries already
 * on their way still arrive and are held); consume_again undoes it. */
static void pause_consumers(amqp_link *l)
{
    if (l->paused || !l->n_consumers)
        return;
    l->paused = 1;
    for (size_t i = 0; i < l->n_consumers; i++)
        write_simple(l, OUT_CANCEL, 0, 0, NULL, l->consumers[i].tag);
}

static void consume_again(amqp_link *l)
{
    if (!l->paused || held_total > l->max_held / 2)
        return;
    l->paused = 0;
    for (size_t i = 0; i < l->n_consumers; i++)
        write_simple(l, OUT_CONSUME, 0, 0, l->consumers[i].queue, l->consumers[i].tag);
}

/* The content is complete: hand it over. */
static void content_done(amqp_link *l)
{
    if (l->ct.kind == CT_DELIVERY) {
        iw_delivery *d = l->ct.d;
        l->ct.d = NULL;
        d->body[d->body_len] = '\0';
        if (held_total >= l->max_held)
            pause_consumers(l);
        if (l->h.on_delivery)
            l->h.on_delivery(l->h.ud, d);
        else
            delivery_free(d);
    } else if (l->ct.kind == CT_GET) {
        l->got = l->ct.d;
        l->got->body[l->got->body_len] = '\0';
        l->ct.d = NULL;
    }
    content_reset(l);
}

/* Whether a delivery of body_size bytes may be held: always when it is a
 * valid size (at most max_body and the whole budget: the budget then pauses
 * consuming, and prefetch bounds what is already on its way), an oversized
 * one only if it fits what is left of the budget. */
static int may_hold(const amqp_link *l, uint64_t body_size)
{
    size_t left = held_total < l->max_held ? l->max_held - held_total : 0;

    if (body_size >= SIZE_MAX / 2)
        return 0;
    if (body_size <= l->max_body && body_size <= l->max_held)
        return 1;
    return body_size <= left;
}

/* The ids of returned publishes travel in our header: find the publish. */
static void mark_returned(amqp_link *l, const amqp_basic_properties_t *p)
{
    if (!(p->_flags & AMQP_BASIC_HEADERS_FLAG))
        return;
    for (int i = 0; i < p->headers.num_entries; i++) {
        const amqp_table_entry_t *e = &p->headers.entries[i];
        if (e->key.len == strlen(AMQP_LINK_SEQ_HEADER) &&
            memcmp(e->key.bytes, AMQP_LINK_SEQ_HEADER, e->key.len) == 0 &&
            e->value.kind == AMQP_FIELD_KIND_I64) {
            pending_confirm *pc = find_pending(l, (uint64_t)e->value.value.i64);
            if (pc)
                pc->returned = 1;
            return;
        }
    }
}

static void handle_header(amqp_link *l, const amqp_frame_t *f)
{
    const amqp_basic_properties_t *p = f->payload.properties.decoded;
    uint64_t size = f->payload.properties.body_size;

    if (l->ct.kind == CT_NONE || l->ct.have_header) {
        link_fail(l, "%s", "protocol error: unexpected content header");
        return;
    }
    if (size >= SIZE_MAX / 2) {
        link_fail(l, "%s", "protocol error: absurd body size");
        return;
    }
    l->ct.have_header = 1;
    l->ct.remaining = size;
    switch (l->ct.kind) {
    case CT_DELIVERY:
        if (!may_hold(l, size)) {
            /* Never read into memory: the broker dead-letters it (x-death
             * reason `rejected`); its body frames are skipped as they come. */
            iw_delivery *d = l->ct.d;
            l->ct.d = NULL;
            l->ct.kind = CT_DISCARD;
            write_simple(l, OUT_REJECT, d->tag, 0, NULL, NULL);
            if (l->h.on_rejected)
                l->h.on_rejected(l->h.ud, d->routing_key, size);
            delivery_free(d);
            break;
        }
        /* fallthrough */
    case CT_GET:
        if (delivery_set_properties(l->ct.d, p) != IW_OK ||
            !(l->ct.d->body = malloc((size_t)size + 1))) {
            link_fail(l, "%s", "out of memory reading a delivery");
            return;
        }
        l->ct.d->too_large = size > l->max_body;
        if (l->ct.kind == CT_DELIVERY) {
            l->ct.d->held = (size_t)size;
            held_total += (size_t)size;
        }
        break;
    case CT_RETURN:
        mark_returned(l, p);
        if (l->h.on_return)
            l->h.on_return(l->h.ud, l->ct.ret_exchange, l->ct.ret_routing_key);
        l->ct.kind = CT_DISCARD;
        break;
    default:
        break;
    }
    if (l->ok && size == 0)
        content_done(l);
}

static void handle_body(amqp_link *l, const amqp_frame_t *f)
{
    amqp_bytes_t b = f->payload.body_fragment;

    if (l->ct.kind == CT_NONE || !l->ct.have_header || b.len > l->ct.remaining) {
        link_fail(l, "%s", "protocol error: unexpected body frame");
        return;
    }
    if (l->ct.d && b.len) {
        memcpy(l->ct.d->body + l->ct.d->body_len, b.bytes, b.len);
        l->ct.d->body_len += b.len;
    }
    l->ct.remaining -= b.len;
    if (l->ct.remaining == 0)
        content_done(l);
}

/* A method that announces content: the frames that follow belong to it. */
static void begin_content(amqp_link *l, content_kind kind)
{
    if (l->ct.kind != CT_NONE)
        link_fail(l, "%s", "protocol error: content interrupted");
    l->ct.kind = kind;
}

static void close_text(char *text, size_t len, uint16_t code, amqp_bytes_t reply)
{
    snprintf(text, len, "%d %.*s", code, (int)(reply.len > 150 ? 150 : reply.len),
             (char *)reply.bytes);
}

static void handle_method(amqp_link *l, const amqp_frame_t *f)
{
    const amqp_method_t *m = &f->payload.method;

    switch (m->id) {
    case AMQP_BASIC_DELIVER_METHOD: {
        const amqp_basic_deliver_t *dm = m->decoded;
        begin_content(l, CT_DELIVERY);
        l->ct.d = delivery_new(l, dm->delivery_tag, dm->redelivered, dm->consumer_tag, dm->exchange,
                               dm->routing_key);
        if (!l->ct.d)
            link_fail(l, "%s", "out of memory reading a delivery");
        break;
    }
    case AMQP_BASIC_RETURN_METHOD: {
        const amqp_basic_return_t *r = m->decoded;
        begin_content(l, CT_RETURN);
        l->ct.ret_exchange = bytes_dup(r->exchange);
        l->ct.ret_routing_key = bytes_dup(r->routing_key);
        if (!l->ct.ret_exchange || !l->ct.ret_routing_key)
            link_fail(l, "%s", "out of memory reading a return");
        break;
    }
    case AMQP_BASIC_ACK_METHOD: {
        const amqp_basic_ack_t *a = m->decoded;
        resolve(l, a->delivery_tag, a->multiple, IW_OK);
        break;
    }
    case AMQP_BASIC_NACK_METHOD: {
        const amqp_basic_nack_t *n = m->decoded;
        resolve(l, n->delivery_tag, n->multiple, IW_ERR_AMQP_NACK);
        break;
    }
    case AMQP_CONNECTION_BLOCKED_METHOD: {
        const amqp_connection_blocked_t *b = m->decoded;
        char reason[160];
        snprintf(reason, sizeof reason, "%.*s", (int)(b->reason.len > 150 ? 150 : b->reason.len),
                 (char *)b->reason.bytes);
        l->blocked = 1;
        if (l->h.on_blocked)
            l->h.on_blocked(l->h.ud, 1, reason);
        break;
    }
    case AMQP_CONNECTION_UNBLOCKED_METHOD:
        l->blocked = 0;
        if (l->h.on_blocked)
            l->h.on_blocked(l->h.ud, 0, "");
        break;
    case AMQP_BASIC_CANCEL_OK_METHOD:
    case AMQP_BASIC_CONSUME_OK_METHOD:
        break;
    case AMQP_BASIC_CANCEL_METHOD:
        link_fail(l, "%s", "the broker cancelled our consumer (queue deleted?)");
        break;
    case AMQP_CHANNEL_CLOSE_METHOD: {
        const amqp_channel_close_t *c = m->decoded;
        char text[200];
        close_text(text, sizeof text, c->reply_code, c->reply_text);
        amqp_channel_close_ok_t ok;
        amqp_send_method(l->conn, f->channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        link_fail(l, "server closed the channel: %s", text);
        break;
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
        const amqp_connection_close_t *c = m->decoded;
        char text[200];
        close_text(text, sizeof text, c->reply_code, c->reply_text);
        amqp_connection_close_ok_t ok;
        amqp_send_method(l->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        link_fail(l, "server closed the connection: %s", text);
        break;
    }
    default:
        break;
    }
}

static void handle_frame(amqp_link *l, const amqp_frame_t *f)
{
    switch (f->frame_type) {
    case AMQP_FRAME_METHOD:
        handle_method(l, f);
        break;
    case AMQP_FRAME_HEADER:
        if (f->channel == CHANNEL)
            handle_header(l, f);
        break;
    case AMQP_FRAME_BODY:
        if (f->channel == CHANNEL)
            handle_body(l, f);
        break;
    default:
        break;
    }
}

static void flush_out(amqp_link *l);

int amqp_link_pump(amqp_link *l)
{
    int first = 1;

    while (l->ok) {
        amqp_frame_t f;
        struct timeval tv = {0, 0};
        int rc;

        /* Always make one call even when nothing is readable: librabbitmq
         * sends heartbeats from inside its wait functions.  Then read on while
         * the socket has more: a poll costs less than another turn. */
        if (!first && !amqp_frames_enqueued(l->conn) && !amqp_data_in_buffer(l->conn)) {
            struct pollfd p = {amqp_get_sockfd(l->conn), POLLIN, 0};
            if (poll(&p, 1, 0) <= 0)
                break;
        }
        first = 0;
        rc = amqp_simple_wait_frame_noblock(l->conn, &f, &tv);
        if (rc == AMQP_STATUS_TIMEOUT)
            break;
        if (rc != AMQP_STATUS_OK) {
            link_fail(l, "connection lost: %s", amqp_error_string2(rc));
            break;
        }
        handle_frame(l, &f);
        /* Frames live in librabbitmq's pools until released: release after
         * each one, or a large body would pile up there (in frames) while it
         * is copied (or skipped). */
        if (l->ok)
            amqp_maybe_release_buffers_on_channel(l->conn, f.channel);
    }
    if (l->ok) {
        consume_again(l);
        flush_out(l);
    }
    if (l->ok)
        amqp_maybe_release_buffers(l->conn);
    return l->ok ? IW_OK : IW_ERR_AMQP_CLOSED;
}

/* ---- publish encoding ------------------------------------------------------ */

/* The encoded size of a JSON value as librabbitmq encodes it (json_to_field),
 * or -1 when it cannot be encoded (a key over 255 bytes, too deep). */
static long long field_size(const json_t *j, int depth);

static long long table_size(const json_t *obj, int depth, const char *skip)
{
    const char *key;
    json_t *val;
    long long n = 4;

    if (depth > TABLE_DEPTH_MAX)
        return -1;
    json_object_foreach((json_t *)obj, key, val)
    {
        size_t klen = strlen(key);
        long long v;
        if (skip && strcmp(key, skip) == 0)
            continue;
        if (klen > SHORTSTR_MAX || (v = field_size(val, depth + 1)) < 0)
            return -1;
        n += 1 + (long long)klen + v;
    }
    return n;
}

static long long field_size(const json_t *j, int depth)
{
    switch (json_typeof(j)) {
    case JSON_STRING:
        return 1 + 4 + (long long)json_string_length(j);
    case JSON_INTEGER:
    case JSON_REAL:
        return 1 + 8;
    case JSON_TRUE:
    case JSON_FALSE:
        return 1 + 1;
    case JSON_NULL:
        return 1;
    case JSON_OBJECT: {
        long long t = table_size(j, depth, NULL);
        return t < 0 ? -1 : 1 + t;
    }
    case JSON_ARRAY: {
        long long n = 1 + 4;
        if (depth > TABLE_DEPTH_MAX)
            return -1;
        for (size_t i = 0; i < json_array_size(j); i++) {
            long long v = field_size(json_array_get(j, i), depth + 1);
            if (v < 0)
                return -1;
            n += v;
        }
        return n;
    }
    }
    return -1;
}

static int short_ok(const char *s)
{
    return !s || strlen(s) <= SHORTSTR_MAX;
}

static long long short_size(const char *s)
{
    return s ? 1 + (long long)strlen(s) : 0;
}

/* Checks that a publish can be encoded, before any frame is written: one
 * refused half-way fails the connection for every job on it. */
static int publish_check(const amqp_link *l, const iw_publish *p, size_t *bytes)
{
    long long header, tbl;
    int frame_max = l->conn ? amqp_get_frame_max(l->conn) : FRAME_MAX;

    if (!p->routing_key || !short_ok(p->exchange) || !short_ok(p->routing_key) ||
        !short_ok(p->content_type) || !short_ok(p->correlation_id) || !short_ok(p->reply_to) ||
        !short_ok(p->message_id) || (p->body_len && !p->body))
        return IW_ERR_AMQP_ENCODE;
    if (p->headers && !json_is_object(p->headers))
        return IW_ERR_AMQP_ENCODE;
    tbl = p->headers ? table_size(p->headers, 0, AMQP_LINK_SEQ_HEADER) : 4;
    if (tbl < 0)
        return IW_ERR_AMQP_ENCODE;
    tbl += 1 + (long long)strlen(AMQP_LINK_SEQ_HEADER) + 1 + 8;
    /* class, weight, body size, flags; then the properties we set */
    header = 2 + 2 + 8 + 2 + 1 + tbl + short_size(p->content_type) + short_size(p->correlation_id) +
             short_size(p->reply_to) + short_size(p->message_id);
    if (header + FRAME_OVERHEAD > frame_max)
        return IW_ERR_AMQP_ENCODE;
    /* the method frame's names, the header frame, the body's frames */
    *bytes = (size_t)header + p->body_len + 600 +
             FRAME_OVERHEAD * (3 + p->body_len / (size_t)(frame_max - FRAME_OVERHEAD));
    return IW_OK;
}

static void set_short(amqp_basic_properties_t *props, amqp_flags_t flag, amqp_bytes_t *field,
                      const char *value)
{
    if (!value)
        return;
    props->_flags |= flag;
    *field = amqp_cstring_bytes(value);
}

/* The headers of a publish: the caller's and ours, which names the publish's
 * sequence number so that a basic.return finds it. */
static int publish_headers(amqp_pool_t *pool, const json_t *obj, uint64_t seq, amqp_table_t *out)
{
    const char *key;
    json_t *val;
    int i = 0;
    size_t n = (obj ? json_object_size(obj) : 0) + 1;

    out->entries = amqp_pool_alloc(pool, sizeof(amqp_table_entry_t) * n);
    if (!out->entries)
        return -1;
    if (obj) {
        json_object_foreach((json_t *)obj, key, val)
        {
            if (strcmp(key, AMQP_LINK_SEQ_HEADER) == 0)
                continue;
            out->entries[i].key = amqp_cstring_bytes(key);
            if (json_to_field(pool, val, &out->entries[i].value) != 0)
                return -1;
            i++;
        }
    }
    out->entries[i].key = amqp_cstring_bytes(AMQP_LINK_SEQ_HEADER);
    out->entries[i].value.kind = AMQP_FIELD_KIND_I64;
    out->entries[i].value.value.i64 = (int64_t)seq;
    out->num_entries = i + 1;
    return 0;
}

/* TCP_CORK on the broker's socket (TLS links): while set, the kernel sends
 * only full segments, so the publishes of one turn leave in one segment (one
 * wake of the broker) instead of one each. */
static void cork(amqp_link *l, int on)
{
    int fd = amqp_get_sockfd(l->conn);

    if (fd >= 0 && setsockopt(fd, IPPROTO_TCP, TCP_CORK, &on, sizeof on) == 0)
        l->corked = on;
}

/* ---- the write buffer of a turn (plain TCP) -------------------------------- */

/* Frames of ours are written whole and in order, so librabbitmq's own frames
 * (heartbeats, synchronous requests: amqp_link_push first) never land inside
 * one of them.  A turn's buffer is written once it holds this much. */
#define WB_FLUSH_AT (256u * 1024)

static int raw_writes(const amqp_link *l)
{
    return l->batching && l->raw;
}

static int wb_reserve(amqp_link *l, size_t n)
{
    size_t cap = l->wb_cap ? l->wb_cap : 16384;
    unsigned char *p;

    if (l->wb_len + n <= l->wb_cap)
        return 0;
    while (cap < l->wb_len + n)
        cap *= 2;
    if (!(p = realloc(l->wb, cap)))
        return -1;
    l->wb = p;
    l->wb_cap = cap;
    return 0;
}

static void put_be(unsigned char *b, uint64_t v, int bytes)
{
    for (int i = bytes - 1; i >= 0; i--, v >>= 8)
        b[i] = (unsigned char)(v & 0xff);
}

/* Starts a frame of `type` at the end of the buffer (room for its header
 * and `payload` bytes reserved); returns where its payload goes. */
static unsigned char *wb_frame(amqp_link *l, int type, size_t payload)
{
    unsigned char *f;

    if (wb_reserve(l, 7 + payload + 1) != 0)
        return NULL;
    f = l->wb + l->wb_len;
    f[0] = (unsigned char)type;
    put_be(f + 1, CHANNEL, 2);
    return f + 7;
}

/* Closes the frame started by wb_frame with `len` bytes of payload. */
static void wb_close(amqp_link *l, size_t len)
{
    unsigned char *f = l->wb + l->wb_len;

    put_be(f + 3, len, 4);
    f[7 + len] = AMQP_FRAME_END;
    l->wb_len += 7 + len + 1;
}

/* Our methods (publish, ack, nack, reject) encode in well under this. */
#define WB_METHOD_MAX 1024

static int wb_method(amqp_link *l, amqp_method_number_t id, void *m)
{
    unsigned char *p = wb_frame(l, AMQP_FRAME_METHOD, WB_METHOD_MAX);
    int n;

    if (!p)
        return AMQP_STATUS_NO_MEMORY;
    put_be(p, id, 4);
    n = amqp_encode_method(id, m, (amqp_bytes_t){WB_METHOD_MAX - 4, p + 4});
    if (n < 0)
        return n;
    wb_close(l, (size_t)n + 4);
    return AMQP_STATUS_OK;
}

static int wb_content(amqp_link *l, amqp_basic_properties_t *props, const void *body,
                      size_t body_len)
{
    size_t max = (size_t)amqp_get_frame_max(l->conn) - FRAME_OVERHEAD;
    unsigned char *p = wb_frame(l, AMQP_FRAME_HEADER, max);
    int n;

    if (!p)
        return AMQP_STATUS_NO_MEMORY;
    put_be(p, AMQP_BASIC_CLASS, 2);
    put_be(p + 2, 0, 2); /* weight */
    put_be(p + 4, body_len, 8);
    n = amqp_encode_properties(AMQP_BASIC_CLASS, props, (amqp_bytes_t){max - 12, p + 12});
    if (n < 0)
        return n;
    wb_close(l, (size_t)n + 12);
    for (size_t off = 0; off < body_len;) {
        size_t chunk = body_len - off < max ? body_len - off : max;
        if (!(p = wb_frame(l, AMQP_FRAME_BODY, chunk)))
            return AMQP_STATUS_NO_MEMORY;
        memcpy(p, (const char *)body + off, chunk);
        wb_close(l, chunk);
        off += chunk;
    }
    return AMQP_STATUS_OK;
}

/* Writes the buffer whole.  The room taken for each write makes a wait rare;
 * when the socket is full it waits as librabbitmq does (TCP_USER_TIMEOUT
 * ends a connection to a broker that stopped reading). */
static void wb_write(amqp_link *l)
{
    int fd = amqp_get_sockfd(l->conn);
    size_t off = 0;

    while (l->ok && off < l->wb_len) {
        ssize_t n = send(fd, l->wb + off, l->wb_len - off, MSG_NOSIGNAL);
        if (n > 0) {
            off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pf = {fd, POLLOUT, 0};
            if (poll(&pf, 1, -1) < 0 && errno != EINTR)
                link_fail(l, "waiting to write: %s", strerror(errno));
        } else {
            link_fail(l, "connection lost writing: %s", n < 0 ? strerror(errno) : "closed");
        }
    }
    l->wb_len = 0;
}

/* After a frame was added: write at once when the buffer is large. */
static int wb_added(amqp_link *l, int arc)
{
    if (arc == AMQP_STATUS_OK && l->wb_len >= WB_FLUSH_AT)
        wb_write(l);
    return arc == AMQP_STATUS_OK && !l->ok ? AMQP_STATUS_SOCKET_ERROR : arc;
}

/* One method of ours (ack, nack, reject): into the turn's buffer, or
 * through librabbitmq (what its amqp_basic_ack and the like do). */
static int send_method(amqp_link *l, amqp_method_number_t id, void *m)
{
    if (raw_writes(l))
        return wb_added(l, wb_method(l, id, m));
    return amqp_send_method(l->conn, CHANNEL, id, m);
}

void amqp_link_batch_writes(amqp_link *l, int on)
{
    if (!on)
        amqp_link_push(l);
    l->batching = on;
}

void amqp_link_push(amqp_link *l)
{
    if (!l || !l->conn)
        return;
    if (l->wb_len && l->ok)
        wb_write(l);
    l->wb_len = 0;
    if (l->corked)
        cork(l, 0);
}

/* Writes one checked publish now (mandatory, with our sequence header). */
static int send_publish(amqp_link *l, const iw_publish *p, amqp_confirm_fn cb, void *ud)
{
    amqp_basic_properties_t props;
    amqp_bytes_t body = {p->body_len, (void *)p->body};
    int rc = IW_OK, arc;

    memset(&props, 0, sizeof props);
    props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_HEADERS_FLAG;
    props.delivery_mode = p->transient ? 1 : 2;
    set_short(&props, AMQP_BASIC_CONTENT_TYPE_FLAG, &props.content_type, p->content_type);
    set_short(&props, AMQP_BASIC_CORRELATION_ID_FLAG, &props.correlation_id, p->correlation_id);
    set_short(&props, AMQP_BASIC_REPLY_TO_FLAG, &props.reply_to, p->reply_to);
    set_short(&props, AMQP_BASIC_MESSAGE_ID_FLAG, &props.message_id, p->message_id);
    if (publish_headers(&l->pub_pool, p->headers, l->next_seq, &props.headers) != 0) {
        rc = IW_ERR_NOMEM;
        if (cb)
            cb(ud, rc);
        goto out;
    }
    /* Register before sending: the ack may arrive while we are still inside
     * a later read, never before this call returns. */
    rc = push_pending(l, l->next_seq, cb, ud);
    if (rc != IW_OK) {
        if (cb)
            cb(ud, rc);
        goto out;
    }
    if (raw_writes(l)) {
        amqp_basic_publish_t m = {0, amqp_cstring_bytes(p->exchange ? p->exchange : ""),
                                  amqp_cstring_bytes(p->routing_key), 1, 0};
        arc = wb_method(l, AMQP_BASIC_PUBLISH_METHOD, &m);
        if (arc == AMQP_STATUS_OK)
            arc = wb_content(l, &props, body.bytes, body.len);
        arc = wb_added(l, arc);
    } else {
        if (l->batching && !l->corked)
            cork(l, 1);
        arc =
            amqp_basic_publish(l->conn, CHANNEL, amqp_cstring_bytes(p->exchange ? p->exchange : ""),
                               amqp_cstring_bytes(p->routing_key), 1, 0, &props, body);
    }
    l->next_seq++;
    if (arc != AMQP_STATUS_OK) {
        link_fail(l, "publish failed: %s", amqp_error_string2(arc));
        rc = IW_ERR_AMQP_CLOSED;
        /* the pending entry is failed when the link is freed */
    }
out:
    recycle_amqp_pool(&l->pub_pool); /* its page stays for the next publish */
    return rc;
}

/* ---- the write buffer ------------------------------------------------------ */

/* What a write of `bytes` may cost the socket's send buffer: the kernel
 * counts each segment's bookkeeping too (up to one per frame). */
#define WRITE_COST(bytes) ((bytes) + 3 * 1024)

/* Asks the socket for room: POLLOUT on a TCP socket means at least a third
 * of its send buffer is free (tcp_poll: free space >= half of what is
 * queued), so that much can be written before asking again. */
static int refill_room(amqp_link *l)
{
    int fd = amqp_get_sockfd(l->conn), sndbuf = 0;
    socklen_t len = sizeof sndbuf;
    struct pollfd p = {fd, POLLOUT, 0};

    l->room = 0;
    if (poll(&p, 1, 0) != 1 || !(p.revents & POLLOUT))
        return 0;
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &len) == 0 && sndbuf > 0)
        l->room = (size_t)sndbuf / 3;
    return 1;
}

/* Takes room for a write of `bytes` now: 0 when the socket has it (or is
 * writable at all, for a write larger than any room it reports). */
static int take_room(amqp_link *l, size_t bytes)
{
    size_t cost = WRITE_COST(bytes);

    if (cost > l->room && !refill_room(l))
        return -1;
    l->room = cost < l->room ? l->room - cost : 0;
    return 0;
}

/* Writes go to the buffer while the broker blocks us, while older writes wait
 * there (order), and while the socket has no room (a write would wait). */
static int must_queue(amqp_link *l, size_t bytes)
{
    if (l->blocked || l->out_head)
        return 1;
    return take_room(l, bytes) != 0;
}

static int out_enqueue(amqp_link *l, out_op *op)
{
    op->next = NULL;
    if (l->out_tail)
        l->out_tail->next = op;
    else
        l->out_head = op;
    l->out_tail = op;
    l->out_bytes += op->bytes;
    if (op->kind == OUT_PUBLISH)
        l->out_publishes++;
    return IW_OK;
}

/* Performs one write; returns an AMQP status. */
static int send_op(amqp_link *l, out_op *op)
{
    int arc = AMQP_STATUS_OK;

    switch (op->kind) {
    case OUT_PUBLISH:
        /* send_publish resolves the callback on failure itself */
        return send_publish(l, &op->pub, op->cb, op->ud) == IW_OK ? AMQP_STATUS_OK
                                                                  : AMQP_STATUS_SOCKET_ERROR;
    case OUT_ACK: {
        amqp_basic_ack_t m = {op->tag, 0};
        arc = send_method(l, AMQP_BASIC_ACK_METHOD, &m);
        break;
    }
    case OUT_NACK: {
        amqp_basic_nack_t m = {op->tag, 0, (amqp_boolean_t)op->requeue};
        arc = send_method(l, AMQP_BASIC_NACK_METHOD, &m);
        break;
    }
    case OUT_REJECT: {
        amqp_basic_reject_t m = {op->tag, (amqp_boolean_t)op->requeue};
        arc = send_method(l, AMQP_BASIC_REJECT_METHOD, &m);
        break;
    }
    case OUT_CONSUME: {
        amqp_link_push(l); /* in order after the turn's frames */
        amqp_basic_consume_t m = {0,
                                  amqp_cstring_bytes(op->name),
                                  amqp_cstring_bytes(op->ctag),
                                  0,
                                  0,
                                  0,
                                  0,
                                  amqp_empty_table};
        arc = amqp_send_method(l->conn, CHANNEL, AMQP_BASIC_CONSUME_METHOD, &m);
        break;
    }
    case OUT_CANCEL: {
        amqp_basic_cancel_t m = {amqp_cstring_bytes(op->ctag), 0};
        amqp_link_push(l);
        arc = amqp_send_method(l->conn, CHANNEL, AMQP_BASIC_CANCEL_METHOD, &m);
        break;
    }
    }
    if (arc != AMQP_STATUS_OK)
        link_fail(l, "write failed: %s", amqp_error_string2(arc));
    return arc;
}

/* Writes what waits, in order, while the broker does not block us: only as
 * long as the socket has room, or (through) all of it, waiting for the broker
 * to take the bytes. */
static void flush_out_mode(amqp_link *l, int through)
{
    while (l->ok && l->out_head && !l->blocked) {
        out_op *op = l->out_head;

        if (!through && take_room(l, op->bytes) != 0)
            break;
        l->out_head = op->next;
        if (!l->out_head)
            l->out_tail = NULL;
        l->out_bytes -= op->bytes;
        if (op->kind == OUT_PUBLISH)
            l->out_publishes--;
        op->next = NULL;
        send_op(l, op);
        out_free(op);
    }
}

static void flush_out(amqp_link *l)
{
    flush_out_mode(l, 0);
}

static char *dup_or_null(const char *s, int *failed)
{
    char *c;
    if (!s)
        return NULL;
    c = strdup(s);
    if (!c)
        *failed = 1;
    return c;
}

/* A copy of a checked publish for the buffer (its pointers are borrowed). */
static out_op *publish_copy(const iw_publish *p, amqp_confirm_fn cb, void *ud, size_t bytes)
{
    out_op *op = calloc(1, sizeof *op);
    int failed = 0;
    char *body;

    if (!op)
        return NULL;
    op->kind = OUT_PUBLISH;
    op->cb = cb;
    op->ud = ud;
    op->pub.exchange = dup_or_null(p->exchange ? p->exchange : "", &failed);
    op->pub.routing_key = dup_or_null(p->routing_key, &failed);
    op->pub.content_type = dup_or_null(p->content_type, &failed);
    op->pub.correlation_id = dup_or_null(p->correlation_id, &failed);
    op->pub.reply_to = dup_or_null(p->reply_to, &failed);
    op->pub.message_id = dup_or_null(p->message_id, &failed);
    body = malloc(p->body_len ? p->body_len : 1);
    if (body && p->body_len)
        memcpy(body, p->body, p->body_len);
    op->pub.body = body;
    op->pub.body_len = p->body_len;
    op->pub.transient = p->transient;
    if (p->headers) {
        /* its own top level (a caller may set members after), sharing the
         * values, which nobody changes */
        op->headers = json_copy((json_t *)p->headers);
        op->pub.headers = op->headers;
        if (!op->headers)
            failed = 1;
    }
    op->bytes = bytes;
    if (failed || !body) {
        out_free(op);
        return NULL;
    }
    return op;
}

/* ---- consume / publish / ack --------------------------------------------- */

int amqp_link_qos(amqp_link *l, uint16_t prefetch, iw_error *err)
{
    amqp_link_push(l); /* a synchronous request must not sit in a corked socket */
    amqp_basic_qos(l->conn, CHANNEL, 0, prefetch, 0);
    return rpc_check(l, amqp_get_rpc_reply(l->conn), "basic.qos", err);
}

int amqp_link_consume(amqp_link *l, const char *queue, const char *consumer_tag, iw_error *err)
{
    consumer *n;
    int rc;

    amqp_link_push(l);
    amqp_basic_consume(l->conn, CHANNEL, amqp_cstring_bytes(queue),
                       amqp_cstring_bytes(consumer_tag), 0, 0, 0, amqp_empty_table);
    rc = rpc_check(l, amqp_get_rpc_reply(l->conn), "basic.consume", err);
    if (rc != IW_OK)
        return rc;
    n = realloc(l->consumers, (l->n_consumers + 1) * sizeof *n);
    if (!n)
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    l->consumers = n;
    n[l->n_consumers].queue = strdup(queue);
    n[l->n_consumers].tag = strdup(consumer_tag);
    if (!n[l->n_consumers].queue || !n[l->n_consumers].tag) {
        free(n[l->n_consumers].queue);
        free(n[l->n_consumers].tag);
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    }
    l->n_consumers++;
    return IW_OK;
}

int amqp_link_cancel(amqp_link *l, const char *consumer_tag)
{
    int was_active = 1;

    if (!l->ok)
        return IW_ERR_AMQP_CLOSED;
    for (size_t i = 0; i < l->n_consumers; i++) {
        if (strcmp(l->consumers[i].tag, consumer_tag) == 0) {
            free(l->consumers[i].queue);
            free(l->consumers[i].tag);
            l->consumers[i] = l->consumers[--l->n_consumers];
            break;
        }
    }
    if (l->paused)
        was_active = 0; /* already cancelled; it will not consume again */
    return was_active ? write_simple(l, OUT_CANCEL, 0, 0, NULL, consumer_tag) : IW_OK;
}

int amqp_link_publish(amqp_link *l, const iw_publish *p, amqp_confirm_fn cb, void *ud)
{
    int rc;
    size_t bytes = 0;
    out_op *op;

    if (!l || !l->ok) {
        rc = IW_ERR_AMQP_CLOSED;
        goto fail;
    }
    rc = publish_check(l, p, &bytes);
    if (rc != IW_OK)
        goto fail;
    if (!must_queue(l, bytes))
        return send_publish(l, p, cb, ud);
    if (l->out_bytes + bytes > AMQP_LINK_MAX_BUFFERED) {
        if (l->blocked) {
            rc = IW_ERR_AMQP_BLOCKED;
            goto fail;
        }
        /* Only the socket is full and the broker reads: rather than grow the
         * buffer, write it out (waiting for the broker) and this one after. */
        flush_out_mode(l, 1);
        if (!l->ok) {
            rc = IW_ERR_AMQP_CLOSED;
            goto fail;
        }
        if (!l->out_head && !l->blocked)
            return send_publish(l, p, cb, ud);
        if (l->blocked) {
            rc = IW_ERR_AMQP_BLOCKED;
            goto fail;
        }
    }
    op = publish_copy(p, cb, ud, bytes);
    if (!op) {
        rc = IW_ERR_NOMEM;
        goto fail;
    }
    out_enqueue(l, op);
    flush_out(l); /* the socket may have room again already */
    return l->ok ? IW_OK : IW_ERR_AMQP_CLOSED;
fail:
    if (cb)
        cb(ud, rc);
    return rc;
}

int amqp_link_ack(amqp_link *l, const iw_delivery *d)
{
    if (!l->ok || d->generation != l->generation)
        return IW_ERR_AMQP_CLOSED;
    return write_simple(l, OUT_ACK, d->tag, 0, NULL, NULL);
}

int amqp_link_nack(amqp_link *l, const iw_delivery *d, int requeue)
{
    if (!l->ok || d->generation != l->generation)
        return IW_ERR_AMQP_CLOSED;
    return write_simple(l, OUT_NACK, d->tag, requeue, NULL, NULL);
}

/* ---- declarations -------------------------------------------------------- */

int amqp_link_declare_exchange(amqp_link *l, const char *name, const char *type, iw_error *err)
{
    char what[300];
    amqp_link_push(l);
    amqp_exchange_declare(l->conn, CHANNEL, amqp_cstring_bytes(name), amqp_cstring_bytes(type), 0,
                          1, 0, 0, amqp_empty_table);
    snprintf(what, sizeof what, "declaring exchange %s", name);
    return rpc_check(l, amqp_get_rpc_reply(l->conn), what, err);
}

int amqp_link_declare_queue(amqp_link *l, const char *name, const json_t *args, iw_error *err)
{
    amqp_pool_t pool;
    amqp_table_t table = amqp_empty_table;
    char what[300];
    int rc;

    init_amqp_pool(&pool, 1024);
    if (json_to_table(&pool, args, &table) != 0) {
        empty_amqp_pool(&pool);
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    }
    amqp_link_push(l);
    amqp_queue_declare(l->conn, CHANNEL, amqp_cstring_bytes(name), 0, 1, 0, 0, table);
    snprintf(what, sizeof what, "declaring queue %s", name);
    rc = rpc_check(l, amqp_get_rpc_reply(l->conn), what, err);
    empty_amqp_pool(&pool);
    return rc;
}

int amqp_link_bind(amqp_link *l, const char *queue, const char *exchange, const char *key,
                   const json_t *args, iw_error *err)
{
    amqp_pool_t pool;
    amqp_table_t table = amqp_empty_table;
    char what[300];
    int rc;

    init_amqp_pool(&pool, 1024);
    if (json_to_table(&pool, args, &table) != 0) {
        empty_amqp_pool(&pool);
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    }
    amqp_link_push(l);
    amqp_queue_bind(l->conn, CHANNEL, amqp_cstring_bytes(queue), amqp_cstring_bytes(exchange),
                    amqp_cstring_bytes(key), table);
    snprintf(what, sizeof what, "binding %s to %s", queue, exchange);
    rc = rpc_check(l, amqp_get_rpc_reply(l->conn), what, err);
    empty_amqp_pool(&pool);
    return rc;
}

int amqp_link_queue_depth(amqp_link *l, const char *name, uint32_t *messages, iw_error *err)
{
    char what[300];
    amqp_queue_declare_ok_t *ok;
    amqp_link_push(l);
    ok = amqp_queue_declare(l->conn, CHANNEL, amqp_cstring_bytes(name), 1, 0, 0, 0,
                            amqp_empty_table);
    snprintf(what, sizeof what, "queue %s", name);
    int rc = rpc_check(l, amqp_get_rpc_reply(l->conn), what, err);
    if (rc == IW_OK && ok)
        *messages = ok->message_count;
    return rc;
}

int amqp_link_get(amqp_link *l, const char *queue, iw_delivery **out, iw_error *err)
{
    amqp_rpc_reply_t r;
    int rc = IW_OK;

    amqp_link_push(l);
    r = amqp_basic_get(l->conn, CHANNEL, amqp_cstring_bytes(queue), 0);

    *out = NULL;
    if (rpc_check(l, r, "basic.get", err) != IW_OK)
        return err ? err->status : IW_ERR_AMQP;
    if (r.reply.id == AMQP_BASIC_GET_EMPTY_METHOD)
        return IW_OK;
    const amqp_basic_get_ok_t *g = r.reply.decoded;
    begin_content(l, CT_GET);
    l->ct.d = delivery_new(l, g->delivery_tag, g->redelivered, amqp_empty_bytes, g->exchange,
                           g->routing_key);
    if (!l->ct.d) {
        link_fail(l, "%s", "out of memory");
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    }
    /* The content follows at once: read it frame by frame, copied once. */
    while (l->ok && !l->got) {
        amqp_frame_t f;
        struct timeval tv = {10, 0};
        int arc = amqp_simple_wait_frame_noblock(l->conn, &f, &tv);
        if (arc != AMQP_STATUS_OK) {
            link_fail(l, "connection lost: %s", amqp_error_string2(arc));
            break;
        }
        handle_frame(l, &f);
        if (l->ok)
            amqp_maybe_release_buffers_on_channel(l->conn, f.channel);
    }
    if (!l->got) {
        content_reset(l);
        rc = iw_error_set(err, IW_ERR_AMQP, "reading a message: %s", l->error);
        goto out;
    }
    *out = l->got;
    l->got = NULL;
out:
    return rc;
}
