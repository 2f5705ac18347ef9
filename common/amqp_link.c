#include "amqp_link.h"

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHANNEL 1
#define HEARTBEAT_S 30
#define FRAME_MAX 131072

typedef struct pending_confirm {
    uint64_t seq;
    amqp_confirm_fn cb; /* NULL once resolved out of order */
    void *ud;
} pending_confirm;

struct amqp_link {
    amqp_connection_state_t conn;
    int ok;
    char error[IW_ERRMSG_LEN];
    uint64_t generation;
    uint64_t next_seq; /* publish sequence number of the next publish */
    pending_confirm *pending;
    size_t cap, head, count; /* ring buffer of unconfirmed publishes, in seq order */
    amqp_link_handlers h;
};

static uint64_t generation_counter;

/* ---- AMQP tables <-> JSON ------------------------------------------------ */

static json_t *field_to_json(const amqp_field_value_t *v);

json_t *amqp_table_to_json(const amqp_table_t *t)
{
    json_t *obj = json_object();
    for (int i = 0; i < t->num_entries; i++) {
        const amqp_table_entry_t *e = &t->entries[i];
        char key[256];
        size_t n = e->key.len < sizeof key - 1 ? e->key.len : sizeof key - 1;
        memcpy(key, e->key.bytes, n);
        key[n] = '\0';
        json_t *val = field_to_json(&e->value);
        if (val)
            json_object_set_new(obj, key, val);
    }
    return obj;
}

static json_t *field_to_json(const amqp_field_value_t *v)
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
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES: {
        /* a binary value that is not UTF-8 cannot be a JSON string: null */
        json_t *str = json_stringn(v->value.bytes.bytes, v->value.bytes.len);
        return str ? str : json_null();
    }
    case AMQP_FIELD_KIND_ARRAY: {
        json_t *arr = json_array();
        for (int i = 0; i < v->value.array.num_entries; i++) {
            json_t *item = field_to_json(&v->value.array.entries[i]);
            json_array_append_new(arr, item ? item : json_null());
        }
        return arr;
    }
    case AMQP_FIELD_KIND_TABLE:
        return amqp_table_to_json(&v->value.table);
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
    if (l->ok)
        snprintf(l->error, sizeof l->error, fmt, detail);
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

amqp_link *amqp_link_connect(const char *url, const char *name, const amqp_link_handlers *h,
                             iw_error *err)
{
    struct amqp_connection_info ci;
    amqp_link *l = calloc(1, sizeof *l);
    char *copy = strdup(url);
    amqp_socket_t *sock;
    struct timeval tv = {5, 0};
    amqp_table_entry_t props[1];
    amqp_table_t props_table = {1, props};
    int rc;

    if (!l || !copy) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        goto fail;
    }
    l->ok = 1;
    l->generation = ++generation_counter;
    l->next_seq = 1;
    if (h)
        l->h = *h;
    amqp_default_connection_info(&ci);
    if (amqp_parse_url(copy, &ci) != AMQP_STATUS_OK) {
        iw_error_set(err, IW_ERR_CONFIG, "IW_AMQP_URL: cannot parse the URL");
        goto fail;
    }
    l->conn = amqp_new_connection();
    sock = ci.ssl ? amqp_ssl_socket_new(l->conn) : amqp_tcp_socket_new(l->conn);
    if (!sock) {
        iw_error_set(err, IW_ERR_AMQP, "cannot create AMQP socket");
        goto fail;
    }
    rc = amqp_socket_open_noblock(sock, ci.host, ci.port, &tv);
    if (rc != AMQP_STATUS_OK) {
        iw_error_set(err, IW_ERR_AMQP, "cannot connect to %s:%d: %s", ci.host, ci.port,
                     amqp_error_string2(rc));
        goto fail;
    }
    tv.tv_sec = 10;
    amqp_set_rpc_timeout(l->conn, &tv);
    props[0].key = amqp_cstring_bytes("connection_name");
    props[0].value.kind = AMQP_FIELD_KIND_UTF8;
    props[0].value.value.bytes = amqp_cstring_bytes(name ? name : "integration-worker");
    if (rpc_check(l,
                  amqp_login_with_properties(l->conn, ci.vhost, 0, FRAME_MAX, HEARTBEAT_S,
                                             &props_table, AMQP_SASL_METHOD_PLAIN, ci.user,
                                             ci.password),
                  "AMQP login", err) != IW_OK)
        goto fail;
    amqp_channel_open(l->conn, CHANNEL);
    if (rpc_check(l, amqp_get_rpc_reply(l->conn), "channel.open", err) != IW_OK)
        goto fail;
    amqp_confirm_select(l->conn, CHANNEL);
    if (rpc_check(l, amqp_get_rpc_reply(l->conn), "confirm.select", err) != IW_OK)
        goto fail;
    free(copy);
    return l;
fail:
    free(copy);
    if (l)
        l->ok = 0;
    amqp_link_free(l);
    return NULL;
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
}

void amqp_link_free(amqp_link *l)
{
    if (!l)
        return;
    if (l->conn) {
        if (l->ok) {
            amqp_channel_close(l->conn, CHANNEL, AMQP_REPLY_SUCCESS);
            amqp_connection_close(l->conn, AMQP_REPLY_SUCCESS);
        }
        amqp_destroy_connection(l->conn);
    }
    l->ok = 0;
    fail_all_pending(l, IW_ERR_AMQP_CLOSED);
    free(l->pending);
    free(l);
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

int amqp_link_has_buffered(const amqp_link *l)
{
    return l && l->ok && (amqp_frames_enqueued(l->conn) || amqp_data_in_buffer(l->conn));
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
    l->pending[(l->head + l->count) % l->cap] = (pending_confirm){seq, cb, ud};
    l->count++;
    return IW_OK;
}

/* Resolves confirms: all up to `tag` when `multiple`, else exactly `tag`. */
static void resolve(amqp_link *l, uint64_t tag, int multiple, int status)
{
    if (!multiple) {
        for (size_t i = 0; i < l->count; i++) {
            pending_confirm *p = &l->pending[(l->head + i) % l->cap];
            if (p->seq == tag) {
                amqp_confirm_fn cb = p->cb;
                p->cb = NULL;
                if (cb)
                    cb(p->ud, status);
                break;
            }
            if (p->seq > tag)
                break;
        }
    }
    while (l->count) {
        pending_confirm *p = &l->pending[l->head];
        if (p->cb && !(multiple && p->seq <= tag))
            break;
        amqp_confirm_fn cb = p->cb;
        void *ud = p->ud;
        l->head = (l->head + 1) % l->cap;
        l->count--;
        if (cb)
            cb(ud, status);
    }
}

size_t amqp_link_unconfirmed(const amqp_link *l)
{
    return l ? l->count : 0;
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

static iw_delivery *delivery_from_message(amqp_link *l, const amqp_message_t *m)
{
    iw_delivery *d = calloc(1, sizeof *d);
    const amqp_basic_properties_t *p = &m->properties;

    if (!d)
        return NULL;
    d->generation = l->generation;
    d->body = bytes_dup(m->body);
    d->body_len = m->body.len;
    if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG)
        d->content_type = bytes_dup(p->content_type);
    if (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG)
        d->correlation_id = bytes_dup(p->correlation_id);
    if (p->_flags & AMQP_BASIC_REPLY_TO_FLAG)
        d->reply_to = bytes_dup(p->reply_to);
    if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG)
        d->message_id = bytes_dup(p->message_id);
    d->headers =
        (p->_flags & AMQP_BASIC_HEADERS_FLAG) ? amqp_table_to_json(&p->headers) : json_object();
    return d;
}

static void handle_deliver(amqp_link *l, const amqp_basic_deliver_t *m)
{
    uint64_t tag = m->delivery_tag;
    int redelivered = m->redelivered;
    char *ctag = bytes_dup(m->consumer_tag), *exchange = bytes_dup(m->exchange),
         *rkey = bytes_dup(m->routing_key);
    amqp_message_t msg;
    amqp_rpc_reply_t r = amqp_read_message(l->conn, CHANNEL, &msg, 0);
    iw_delivery *d = NULL;

    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        rpc_check(l, r, "reading a delivery", NULL);
        goto out;
    }
    d = delivery_from_message(l, &msg);
    amqp_destroy_message(&msg);
    if (!d) {
        link_fail(l, "%s", "out of memory reading a delivery");
        goto out;
    }
    d->tag = tag;
    d->redelivered = redelivered;
    d->consumer_tag = ctag;
    d->exchange = exchange;
    d->routing_key = rkey;
    ctag = exchange = rkey = NULL;
    if (l->h.on_delivery)
        l->h.on_delivery(l->h.ud, d);
    else
        delivery_free(d);
out:
    free(ctag);
    free(exchange);
    free(rkey);
}

static void handle_method(amqp_link *l, const amqp_frame_t *f)
{
    const amqp_method_t *m = &f->payload.method;

    switch (m->id) {
    case AMQP_BASIC_DELIVER_METHOD:
        handle_deliver(l, m->decoded);
        break;
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
    case AMQP_BASIC_RETURN_METHOD: {
        amqp_message_t msg;
        if (amqp_read_message(l->conn, f->channel, &msg, 0).reply_type == AMQP_RESPONSE_NORMAL)
            amqp_destroy_message(&msg);
        break;
    }
    case AMQP_BASIC_CANCEL_OK_METHOD:
        break;
    case AMQP_BASIC_CANCEL_METHOD:
        link_fail(l, "%s", "the broker cancelled our consumer (queue deleted?)");
        break;
    case AMQP_CHANNEL_CLOSE_METHOD: {
        const amqp_channel_close_t *c = m->decoded;
        char text[200];
        snprintf(text, sizeof text, "%d %.*s", c->reply_code, (int)c->reply_text.len,
                 (char *)c->reply_text.bytes);
        amqp_channel_close_ok_t ok;
        amqp_send_method(l->conn, f->channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        link_fail(l, "server closed the channel: %s", text);
        break;
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
        const amqp_connection_close_t *c = m->decoded;
        char text[200];
        snprintf(text, sizeof text, "%d %.*s", c->reply_code, (int)c->reply_text.len,
                 (char *)c->reply_text.bytes);
        amqp_connection_close_ok_t ok;
        amqp_send_method(l->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        link_fail(l, "server closed the connection: %s", text);
        break;
    }
    default:
        break;
    }
}

int amqp_link_pump(amqp_link *l)
{
    int first = 1;

    while (l->ok) {
        amqp_frame_t f;
        struct timeval tv = {0, 0};
        int rc;

        /* Always make one call even when nothing is readable: librabbitmq
         * sends heartbeats from inside its wait functions. */
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
        if (f.frame_type == AMQP_FRAME_METHOD)
            handle_method(l, &f);
    }
    if (l->ok)
        amqp_maybe_release_buffers(l->conn);
    return l->ok ? IW_OK : IW_ERR_AMQP_CLOSED;
}

/* ---- consume / publish / ack --------------------------------------------- */

int amqp_link_qos(amqp_link *l, uint16_t prefetch, iw_error *err)
{
    amqp_basic_qos(l->conn, CHANNEL, 0, prefetch, 0);
    return rpc_check(l, amqp_get_rpc_reply(l->conn), "basic.qos", err);
}

int amqp_link_consume(amqp_link *l, const char *queue, const char *consumer_tag, iw_error *err)
{
    amqp_basic_consume(l->conn, CHANNEL, amqp_cstring_bytes(queue),
                       amqp_cstring_bytes(consumer_tag), 0, 0, 0, amqp_empty_table);
    return rpc_check(l, amqp_get_rpc_reply(l->conn), "basic.consume", err);
}

int amqp_link_cancel(amqp_link *l, const char *consumer_tag)
{
    amqp_basic_cancel_t m = {amqp_cstring_bytes(consumer_tag), 0};
    if (!l->ok)
        return IW_ERR_AMQP_CLOSED;
    return amqp_send_method(l->conn, CHANNEL, AMQP_BASIC_CANCEL_METHOD, &m) == AMQP_STATUS_OK
               ? IW_OK
               : IW_ERR_AMQP;
}

/* Sets a short-string property.  AMQP short strings hold at most 255
 * bytes and librabbitmq fails the whole connection on a longer one, so a
 * longer value is left out (a jobId of 128 characters may take 512 bytes;
 * the body still carries it). */
static void set_short(amqp_basic_properties_t *props, amqp_flags_t flag, amqp_bytes_t *field,
                      const char *value)
{
    if (!value || strlen(value) > 255)
        return;
    props->_flags |= flag;
    *field = amqp_cstring_bytes(value);
}

int amqp_link_publish(amqp_link *l, const iw_publish *p, amqp_confirm_fn cb, void *ud)
{
    amqp_basic_properties_t props;
    amqp_pool_t pool;
    amqp_bytes_t body = {p->body_len, (void *)p->body};
    int rc = IW_OK, arc;

    if (!l->ok) {
        if (cb)
            cb(ud, IW_ERR_AMQP_CLOSED);
        return IW_ERR_AMQP_CLOSED;
    }
    init_amqp_pool(&pool, 4096);
    memset(&props, 0, sizeof props);
    props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
    props.delivery_mode = p->transient ? 1 : 2;
    set_short(&props, AMQP_BASIC_CONTENT_TYPE_FLAG, &props.content_type, p->content_type);
    set_short(&props, AMQP_BASIC_CORRELATION_ID_FLAG, &props.correlation_id, p->correlation_id);
    set_short(&props, AMQP_BASIC_REPLY_TO_FLAG, &props.reply_to, p->reply_to);
    set_short(&props, AMQP_BASIC_MESSAGE_ID_FLAG, &props.message_id, p->message_id);
    if (p->headers && json_object_size(p->headers)) {
        if (json_to_table(&pool, p->headers, &props.headers) != 0) {
            rc = IW_ERR_NOMEM;
            if (cb)
                cb(ud, rc);
            goto out;
        }
        props._flags |= AMQP_BASIC_HEADERS_FLAG;
    }
    /* Register before sending: the ack may arrive while we are still inside
     * a later read, never before this call returns. */
    rc = push_pending(l, l->next_seq, cb, ud);
    if (rc != IW_OK) {
        if (cb)
            cb(ud, rc);
        goto out;
    }
    arc = amqp_basic_publish(l->conn, CHANNEL, amqp_cstring_bytes(p->exchange),
                             amqp_cstring_bytes(p->routing_key), 0, 0, &props, body);
    l->next_seq++;
    if (arc != AMQP_STATUS_OK) {
        link_fail(l, "publish failed: %s", amqp_error_string2(arc));
        rc = IW_ERR_AMQP_CLOSED;
        /* the pending entry is failed when the link is freed */
    }
out:
    empty_amqp_pool(&pool);
    return rc;
}

int amqp_link_ack(amqp_link *l, const iw_delivery *d)
{
    if (!l->ok || d->generation != l->generation)
        return IW_ERR_AMQP_CLOSED;
    if (amqp_basic_ack(l->conn, CHANNEL, d->tag, 0) != AMQP_STATUS_OK) {
        link_fail(l, "%s", "basic.ack failed");
        return IW_ERR_AMQP_CLOSED;
    }
    return IW_OK;
}

int amqp_link_nack(amqp_link *l, const iw_delivery *d, int requeue)
{
    if (!l->ok || d->generation != l->generation)
        return IW_ERR_AMQP_CLOSED;
    if (amqp_basic_nack(l->conn, CHANNEL, d->tag, 0, requeue) != AMQP_STATUS_OK) {
        link_fail(l, "%s", "basic.nack failed");
        return IW_ERR_AMQP_CLOSED;
    }
    return IW_OK;
}

/* ---- declarations -------------------------------------------------------- */

int amqp_link_declare_exchange(amqp_link *l, const char *name, const char *type, iw_error *err)
{
    char what[300];
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
    amqp_queue_declare_ok_t *ok = amqp_queue_declare(l->conn, CHANNEL, amqp_cstring_bytes(name), 1,
                                                     0, 0, 0, amqp_empty_table);
    snprintf(what, sizeof what, "queue %s", name);
    int rc = rpc_check(l, amqp_get_rpc_reply(l->conn), what, err);
    if (rc == IW_OK && ok)
        *messages = ok->message_count;
    return rc;
}

int amqp_link_get(amqp_link *l, const char *queue, iw_delivery **out, iw_error *err)
{
    amqp_rpc_reply_t r = amqp_basic_get(l->conn, CHANNEL, amqp_cstring_bytes(queue), 0);
    amqp_message_t msg;

    *out = NULL;
    if (rpc_check(l, r, "basic.get", err) != IW_OK)
        return err ? err->status : IW_ERR_AMQP;
    if (r.reply.id == AMQP_BASIC_GET_EMPTY_METHOD)
        return IW_OK;
    const amqp_basic_get_ok_t *g = r.reply.decoded;
    uint64_t tag = g->delivery_tag;
    int redelivered = g->redelivered;
    char *exchange = bytes_dup(g->exchange), *rkey = bytes_dup(g->routing_key);
    r = amqp_read_message(l->conn, CHANNEL, &msg, 0);
    if (rpc_check(l, r, "reading a message", err) != IW_OK) {
        free(exchange);
        free(rkey);
        return IW_ERR_AMQP;
    }
    iw_delivery *d = delivery_from_message(l, &msg);
    amqp_destroy_message(&msg);
    if (!d) {
        free(exchange);
        free(rkey);
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    }
    d->tag = tag;
    d->redelivered = redelivered;
    d->exchange = exchange;
    d->routing_key = rkey;
    *out = d;
    return IW_OK;
}
