/* One AMQP connection with one channel in confirm mode: consume, confirmed
 * publish (pipelined: many unconfirmed publishes in flight), ack/nack, and the
 * topology declarations.  The link owns no event loop: the caller polls the
 * socket (amqp_link_fd) and calls amqp_link_pump, which never blocks waiting
 * for the network and drains the frames librabbitmq has already buffered. */
#ifndef IW_AMQP_LINK_H
#define IW_AMQP_LINK_H

#include <amqp.h>
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct amqp_link amqp_link;

/* A delivery, copied out of librabbitmq's buffers; owned by whoever holds it. */
typedef struct iw_delivery {
    uint64_t tag;
    uint64_t generation; /* the link connection that delivered it */
    int redelivered;
    char *consumer_tag;
    char *exchange;
    char *routing_key;
    char *content_type;   /* NULL when absent */
    char *correlation_id; /* NULL when absent */
    char *reply_to;       /* NULL when absent */
    char *message_id;     /* NULL when absent */
    json_t *headers;      /* AMQP headers as a JSON object (never NULL) */
    char *body;
    size_t body_len;
} iw_delivery;

void delivery_free(iw_delivery *d);

/* An AMQP field table as a JSON object (new reference); binary values that
 * are not UTF-8 become null. */
json_t *amqp_table_to_json(const amqp_table_t *t);

/* What to publish; every pointer is borrowed for the duration of the call.
 * Properties longer than AMQP's 255-byte short strings are left out. */
typedef struct iw_publish {
    const char *exchange; /* "" for the default exchange */
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

/* Called once per publish: IW_OK when the broker confirmed it, IW_ERR_AMQP_NACK
 * when it refused it, IW_ERR_AMQP_CLOSED when the connection went away first. */
typedef void (*amqp_confirm_fn)(void *ud, int status);

typedef struct amqp_link_handlers {
    /* A new delivery; the callee takes ownership of d. */
    void (*on_delivery)(void *ud, iw_delivery *d);
    void *ud;
} amqp_link_handlers;

/* Connects, logs in, opens channel 1 and selects confirm mode.  `name` is the
 * connection name shown in the broker's management UI. */
amqp_link *amqp_link_connect(const char *url, const char *name, const amqp_link_handlers *h,
                             iw_error *err);
/* Closes politely when possible and fails every pending confirm with
 * IW_ERR_AMQP_CLOSED. NULL ok. */
void amqp_link_free(amqp_link *l);

int amqp_link_fd(const amqp_link *l);
uint64_t amqp_link_generation(const amqp_link *l);
/* True while the link is usable; false after any protocol or socket error. */
int amqp_link_ok(const amqp_link *l);
const char *amqp_link_error(const amqp_link *l);

/* Reads and dispatches every frame available without blocking.  Returns
 * IW_OK, or IW_ERR_AMQP_CLOSED once the connection is unusable. */
int amqp_link_pump(amqp_link *l);
/* True if frames are already buffered in user space (poll would not see them). */
int amqp_link_has_buffered(const amqp_link *l);

int amqp_link_qos(amqp_link *l, uint16_t prefetch, iw_error *err);
int amqp_link_consume(amqp_link *l, const char *queue, const char *consumer_tag, iw_error *err);
/* Asks the broker to stop delivering to consumer_tag; does not wait. */
int amqp_link_cancel(amqp_link *l, const char *consumer_tag);

/* Publishes; `cb` (may be NULL) is called exactly once: when the broker
 * confirms or refuses, when the link is freed first, or at once (before this
 * returns) when the publish cannot be sent at all. */
int amqp_link_publish(amqp_link *l, const iw_publish *p, amqp_confirm_fn cb, void *ud);
size_t amqp_link_unconfirmed(const amqp_link *l);

/* Acks or nacks a delivery of this link's current connection; a delivery of
 * an earlier connection is silently ignored (the broker already requeued it). */
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
/* Synchronous basic.get (ops commands); *out is NULL when the queue is empty. */
int amqp_link_get(amqp_link *l, const char *queue, iw_delivery **out, iw_error *err);

#endif
