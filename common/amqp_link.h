/* One AMQP connection with one channel in confirm mode: consume, confirmed
 * publish (pipelined: many unconfirmed publishes in flight), ack/nack, and the
 * topology declarations.  The link owns no event loop: the caller polls the
 * socket (amqp_link_fd) and calls amqp_link_pump, which never blocks waiting
 * for the network and drains the frames librabbitmq has already buffered.
 *
 * Nothing the link writes can stop the loop: while the broker has blocked the
 * connection (connection.blocked, a memory or disk alarm) or the socket has
 * no room, publishes, acks, nacks and consumer changes wait in a bounded
 * in-memory queue and go out, in order, from amqp_link_pump once it can.  As a
 * last resort against a broker that stops reading in the middle of a write,
 * the socket has TCP_USER_TIMEOUT (AMQP_LINK_SEND_TIMEOUT_MS): data unacknowledged
 * that long fails the link like any connection error. */
#ifndef IW_AMQP_LINK_H
#define IW_AMQP_LINK_H

#include <amqp.h>
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct amqp_link amqp_link;

/* The longest a write may wait for the broker to take its bytes. */
#define AMQP_LINK_SEND_TIMEOUT_MS 30000
/* Bytes of publishes kept in memory while the broker blocks the connection;
 * a publish beyond it fails at once with IW_ERR_AMQP_BLOCKED.  (When only the
 * socket is full and the broker is not blocking, the buffer is written out
 * instead: the broker is reading.) */
#define AMQP_LINK_MAX_BUFFERED (16u * 1024 * 1024)
/* The default budget of held delivery bodies, for the whole process. */
#define AMQP_LINK_DEFAULT_MAX_HELD (64u * 1024 * 1024)
/* The header the link adds to every publish to tie a basic.return to it; it
 * is removed from the headers of every delivery the link reports. */
#define AMQP_LINK_SEQ_HEADER "iw-pub-seq"

/* A delivery; its body was copied once, straight out of librabbitmq's frames,
 * into one allocation.  Owned by whoever holds it; delivery_free gives its
 * bytes back to the held budget. */
typedef struct iw_delivery {
    uint64_t tag;
    uint64_t generation; /* the link connection that delivered it */
    int redelivered;
    int too_large; /* body_len > the link's max_body_bytes (the body is present) */
    char *consumer_tag;
    char *exchange;
    char *routing_key;
    char *content_type;   /* NULL when absent */
    char *correlation_id; /* NULL when absent */
    char *reply_to;       /* NULL when absent */
    char *message_id;     /* NULL when absent */
    json_t *headers;      /* AMQP headers as a JSON object; NULL when none (jansson's
                           * getters and iterators take NULL as an empty object) */
    char *body;           /* NUL-terminated for convenience */
    size_t body_len;
    size_t held; /* bytes counted in the held budget (private to the link) */
} iw_delivery;

/* Frees d and returns its bytes to the process's held budget. NULL ok. */
void delivery_free(iw_delivery *d);

/* Bytes of delivery bodies held by the whole process right now. */
size_t amqp_link_held_bytes(void);

/* A malloc'd NUL-terminated copy of at most cap bytes: kept as is when it is
 * UTF-8 (cut at a character boundary), else printable ASCII with every other
 * byte as \xNN, so that it is always a valid string.  NULL on OOM. */
char *amqp_clean_str(const void *bytes, size_t len, size_t cap);

/* Turns a binary value that is not UTF-8 into JSON (new reference). */
typedef json_t *(*amqp_bytes_json_fn)(amqp_bytes_t b);

/* An AMQP field table as a JSON object (new reference).  Keys are cut to 255
 * bytes at a character boundary and escaped when not UTF-8; a decimal is
 * {decimals, value}; a binary value that is not UTF-8 goes to on_binary, or
 * becomes null when on_binary is NULL (amqp_table_to_json). */
json_t *amqp_table_to_json_with(const amqp_table_t *t, amqp_bytes_json_fn on_binary);
json_t *amqp_table_to_json(const amqp_table_t *t);

/* What to publish; every pointer is borrowed for the duration of the call.
 * A publish that cannot be encoded is refused whole, before any frame is
 * written (IW_ERR_AMQP_ENCODE): exchange, routing key and every short-string
 * property (content_type, correlation_id, reply_to, message_id) at most 255
 * bytes, header keys at most 255 bytes and 32 levels deep, and the content
 * header frame (properties + headers) within the negotiated frame_max.
 * Nothing is silently left out: the caller passes a short enough
 * correlation_id (the contract's jobKey). */
typedef struct iw_publish {
    const char *exchange; /* "" (or NULL) for the default exchange */
    const char *routing_key;
    const char *body;
    size_t body_len;
    const char *content_type;
    const char *correlation_id;
    const char *reply_to;
    const char *message_id;
    const json_t *headers; /* JSON object -> AMQP table; NULL for none */
    int transient;         /* 0: persistent (delivery_mode 2) */
} iw_publish;

/* Called once per publish: IW_OK when the broker confirmed it,
 * IW_ERR_AMQP_RETURNED when the broker could not route it (basic.return; every
 * publish is mandatory), IW_ERR_AMQP_NACK when it refused it,
 * IW_ERR_AMQP_CLOSED when the connection went away first, IW_ERR_AMQP_ENCODE
 * when it cannot be encoded, IW_ERR_AMQP_BLOCKED when the broker blocks the
 * connection and the buffer is full. */
typedef void (*amqp_confirm_fn)(void *ud, int status);

typedef struct amqp_link_handlers {
    /* A new delivery; the callee takes ownership of d. */
    void (*on_delivery)(void *ud, iw_delivery *d);
    void *ud;
    /* Optional: the broker returned a publish as unroutable (its confirm
     * callback gets IW_ERR_AMQP_RETURNED).  A binding or queue is missing. */
    void (*on_return)(void *ud, const char *exchange, const char *routing_key);
    /* Optional: a delivery too large for the held budget was not read into
     * memory but rejected (requeue=false): the broker dead-letters it itself. */
    void (*on_rejected)(void *ud, const char *routing_key, uint64_t body_size);
    /* Optional: the broker blocked (1) or unblocked (0) the connection. */
    void (*on_blocked)(void *ud, int blocked, const char *reason);
} amqp_link_handlers;

/* TLS for amqps:// URLs (paths of PEM files; every pointer borrowed).  The
 * broker's certificate and host name are verified unless verify is 0. */
typedef struct amqp_link_tls {
    const char *ca;   /* CA bundle; NULL: the system's (/etc/ssl/certs/ca-certificates.crt) */
    const char *cert; /* client certificate for mutual TLS, with key; NULL: none */
    const char *key;
    int verify; /* 1: verify the peer and its host name (the default to pass) */
} amqp_link_tls;

/* Connects, logs in, opens channel 1 and selects confirm mode.  `urls` is one
 * URL or several comma-separated ones (the nodes of one cluster): they are
 * tried in turn, once each, starting after the node that failed last in this
 * process; the error is the last node's.  `name` is the connection name shown
 * in the broker's management UI.  Errors never contain a password. */
amqp_link *amqp_link_connect(const char *urls, const char *name, const amqp_link_handlers *h,
                             iw_error *err);
/* amqp_link_connect with TLS settings for amqps:// nodes (NULL: verify
 * against the system's CA bundle, no client certificate). */
amqp_link *amqp_link_connect_tls(const char *urls, const char *name, const amqp_link_handlers *h,
                                 const amqp_link_tls *tls, iw_error *err);
/* Closes politely when possible and fails every pending and buffered confirm
 * with IW_ERR_AMQP_CLOSED. NULL ok. */
void amqp_link_free(amqp_link *l);

/* Size limits of deliveries.  A delivery whose body is larger than
 * max_body_bytes is delivered with too_large set, if it fits what is left of
 * the process's held budget max_held_bytes (all held deliveries together);
 * otherwise its body is read and discarded and it is rejected (requeue=false)
 * so the broker dead-letters it (x-death reason `rejected`).  Deliveries of at
 * most min(max_body_bytes, max_held_bytes) are always held.  Once the budget
 * is used up the link cancels its consumers, and consumes again when the held
 * bytes fall to half the budget.  Defaults: no max_body, 64 MiB held. */
void amqp_link_set_limits(amqp_link *l, size_t max_body_bytes, size_t max_held_bytes);

int amqp_link_fd(const amqp_link *l);
uint64_t amqp_link_generation(const amqp_link *l);
/* True while the link is usable; false after any protocol or socket error. */
int amqp_link_ok(const amqp_link *l);
const char *amqp_link_error(const amqp_link *l);
/* True while the broker blocks this connection (connection.blocked). */
int amqp_link_blocked(const amqp_link *l);
/* The index (0-based) in the URL list of the node this link is connected to. */
int amqp_link_node(const amqp_link *l);

/* Reads and dispatches every frame available without blocking, then writes
 * what waited in the buffer if it can.  Returns IW_OK, or IW_ERR_AMQP_CLOSED
 * once the connection is unusable. */
int amqp_link_pump(amqp_link *l);
/* True if frames are already buffered in user space (poll would not see them). */
int amqp_link_has_buffered(const amqp_link *l);
/* True while writes wait in the link's buffer (poll for POLLOUT then). */
int amqp_link_wants_write(const amqp_link *l);
/* With on, publishes are held in the socket (TCP_CORK) until amqp_link_push,
 * so that those of one reactor turn reach the broker together: call
 * amqp_link_push at the end of every turn.  The link pushes by itself before
 * a synchronous request (declare, qos, consume, get). */
void amqp_link_batch_writes(amqp_link *l, int on);
void amqp_link_push(amqp_link *l);

int amqp_link_qos(amqp_link *l, uint16_t prefetch, iw_error *err);
/* Consumes queue under consumer_tag (synchronous: start-up only). */
int amqp_link_consume(amqp_link *l, const char *queue, const char *consumer_tag, iw_error *err);
/* Asks the broker to stop delivering to consumer_tag for good; does not wait. */
int amqp_link_cancel(amqp_link *l, const char *consumer_tag);

/* Publishes (mandatory); `cb` (may be NULL) is called exactly once: when the
 * broker confirms, returns or refuses, when the link is freed first, or at
 * once (before this returns) when the publish cannot be sent at all, with the
 * same status this returns. */
int amqp_link_publish(amqp_link *l, const iw_publish *p, amqp_confirm_fn cb, void *ud);
/* Publishes not yet confirmed, including those waiting in the buffer. */
size_t amqp_link_unconfirmed(const amqp_link *l);

/* Acks, nacks or rejects a delivery of this link's current connection; a
 * delivery of an earlier connection is silently ignored (the broker already
 * requeued it).  While blocked they wait in the buffer. */
int amqp_link_ack(amqp_link *l, const iw_delivery *d);
int amqp_link_nack(amqp_link *l, const iw_delivery *d, int requeue);

/* Synchronous declarations, for start-up and the ops commands only (not while
 * consuming). `args` is a JSON object turned into an AMQP table (NULL ok). */
int amqp_link_declare_exchange(amqp_link *l, const char *name, const char *type, iw_error *err);
int amqp_link_declare_queue(amqp_link *l, const char *name, const json_t *args, iw_error *err);
int amqp_link_bind(amqp_link *l, const char *queue, const char *exchange, const char *key,
                   const json_t *args, iw_error *err);
/* Passive declare: the queue's message count, or an error if it is missing. */
int amqp_link_queue_depth(amqp_link *l, const char *name, uint32_t *messages, iw_error *err);
/* Synchronous basic.get (ops commands); *out is NULL when the queue is empty.
 * Outside the held budget. */
int amqp_link_get(amqp_link *l, const char *queue, iw_delivery **out, iw_error *err);

#endif
