#include "status.h"

#include <stdarg.h>
#include <stdio.h>

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
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        err->status = status;
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return status;
}
