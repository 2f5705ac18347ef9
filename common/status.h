/* Project-wide status codes and the error detail a caller passes in.
 *
 * Every fallible function in common/ returns an iw_status (0 ok, negative on
 * failure, grouped by subsystem) and, when given a non-NULL iw_error, fills it
 * with a one-line human message.  Only a role's top level decides what to log. */
#ifndef IW_STATUS_H
#define IW_STATUS_H

#include <stddef.h>

typedef enum iw_status {
    IW_OK = 0,
    /* generic: -1 .. -99 */
    IW_ERR_NOMEM = -1,
    IW_ERR_INVALID = -2,
    IW_ERR_IO = -3,
    IW_ERR_TOO_LARGE = -4,
    IW_ERR_TIMEOUT = -5,
    IW_ERR_NOT_FOUND = -6,
    IW_ERR_AGAIN = -7,
    /* configuration: -100 .. */
    IW_ERR_CONFIG = -100,
    IW_ERR_USAGE = -101,
    /* JSON and schemas: -200 .. */
    IW_ERR_JSON = -200,
    IW_ERR_SCHEMA = -201,
    IW_ERR_SCHEMA_UNSUPPORTED = -202,
    /* AMQP: -300 .. */
    IW_ERR_AMQP = -300,
    IW_ERR_AMQP_CLOSED = -301,
    IW_ERR_AMQP_NACK = -302,
    IW_ERR_AMQP_RETURNED = -303, /* unroutable: basic.return */
    IW_ERR_AMQP_ENCODE = -304,   /* cannot be encoded (sizes, frame_max) */
    IW_ERR_AMQP_BLOCKED = -305,  /* broker blocked and the buffer is full */
    /* Redis: -400 .. */
    IW_ERR_REDIS = -400,
    IW_ERR_REDIS_SCRIPT = -401,
    /* HTTP: -500 .. */
    IW_ERR_HTTP = -500,
    IW_ERR_URL_TOO_LONG = -501, /* a URL built from input is past its cap: URL_TOO_LONG */
    IW_ERR_HEADER_VALUE = -502, /* a header value from input holds CR, LF or control bytes */
    IW_ERR_URL_INVALID = -503,  /* a URL path from input holds control bytes or spaces */
} iw_status;

#define IW_ERRMSG_LEN 256

/* Detail of a failure: the status and a one-line message (never a secret). */
typedef struct iw_error {
    int status;
    char msg[IW_ERRMSG_LEN];
} iw_error;

/* Static string naming a status ("ok", "out of memory", ...); never NULL. */
const char *iw_strerror(int status);

/* Fills err (if non-NULL) and returns status, so that callers can write
 * `return iw_error_set(err, IW_ERR_CONFIG, "...")`. */
int iw_error_set(iw_error *err, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Copies src[0..len) into dst (cap >= 4 bytes) as safe message text: valid
 * UTF-8, control bytes escaped, cut at a character boundary (buf.h). */
void iw_text_copy(char *dst, size_t cap, const char *src, size_t len);

#endif
