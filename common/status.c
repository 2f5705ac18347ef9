#include "status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "buf.h"

static const struct {
    int status;
    const char *text;
} status_table[] = {
    {IW_OK, "ok"},
    {IW_ERR_NOMEM, "out of memory"},
    {IW_ERR_INVALID, "invalid argument"},
    {IW_ERR_IO, "i/o error"},
    {IW_ERR_TOO_LARGE, "too large"},
    {IW_ERR_TIMEOUT, "timed out"},
    {IW_ERR_NOT_FOUND, "not found"},
    {IW_ERR_AGAIN, "try again"},
    {IW_ERR_CONFIG, "configuration error"},
    {IW_ERR_USAGE, "usage error"},
    {IW_ERR_JSON, "invalid JSON"},
    {IW_ERR_SCHEMA, "schema violation"},
    {IW_ERR_SCHEMA_UNSUPPORTED, "unsupported schema keyword"},
    {IW_ERR_AMQP, "AMQP error"},
    {IW_ERR_AMQP_CLOSED, "AMQP connection closed"},
    {IW_ERR_AMQP_NACK, "AMQP publish not confirmed"},
    {IW_ERR_AMQP_RETURNED, "AMQP publish returned as unroutable"},
    {IW_ERR_AMQP_ENCODE, "AMQP publish cannot be encoded"},
    {IW_ERR_AMQP_BLOCKED, "AMQP connection blocked by the broker and its buffer is full"},
    {IW_ERR_REDIS, "Redis error"},
    {IW_ERR_REDIS_SCRIPT, "Redis script error"},
    {IW_ERR_HTTP, "HTTP error"},
    {IW_ERR_URL_TOO_LONG, "URL too long"},
    {IW_ERR_HEADER_VALUE, "header value with control bytes"},
    {IW_ERR_URL_INVALID, "URL path with control bytes"},
};

const char *iw_strerror(int status)
{
    for (size_t i = 0; i < sizeof status_table / sizeof status_table[0]; i++)
        if (status_table[i].status == status)
            return status_table[i].text;
    return "unknown status";
}

int iw_error_set(iw_error *err, int status, const char *fmt, ...)
{
    iw_buf b;
    va_list ap;

    if (!err)
        return status;
    /* Messages quote input and end up in JSON (events, dead-letter headers,
     * logs): they are made valid one-line UTF-8 and cut at a character
     * boundary, marked with U+2026, never mid-character. */
    buf_init(&b, 65536);
    err->status = status;
    va_start(ap, fmt);
    if (buf_vaddf(&b, fmt, ap) != IW_OK) {
        buf_reset(&b);
        if (buf_adds(&b, iw_strerror(status)) != IW_OK)
            buf_free(&b);
    }
    va_end(ap);
    iw_text_copy(err->msg, sizeof err->msg, buf_ptr(&b), buf_len(&b));
    buf_free(&b);
    return status;
}

void iw_text_copy(char *dst, size_t cap, const char *src, size_t len)
{
    iw_buf b;

    buf_init(&b, cap - 1);
    if (buf_add_text(&b, src, len, cap - 1) == IW_OK) {
        memcpy(dst, buf_ptr(&b), buf_len(&b) + 1);
    } else {
        size_t n = utf8_valid(src, len) ? utf8_prefix(src, len, cap - 1) : 0;
        memcpy(dst, src, n);
        dst[n] = '\0';
    }
    buf_free(&b);
}
