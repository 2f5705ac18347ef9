/* The error codes of the contract, as one table: every code's name (what
 * events, dead letters and logs carry), whether a job that failed with it is
 * tried again, the level it is logged at, and the class of provider answer it
 * stands for.  librabbitmq-c's amqp_error_string2 is the model: code in,
 * static string out, and a unit test walks the table.
 *
 * The codes say what happened to a JOB (submission.failed, x-error-code);
 * iw_status in status.h says what happened to a FUNCTION call. */
#ifndef IW_ERRCODE_H
#define IW_ERRCODE_H

typedef enum iw_code {
    IW_C_NONE = 0,
    /* intake: the message itself */
    IW_C_MESSAGE_TOO_LARGE,
    IW_C_INVALID_CONTENT_TYPE,
    IW_C_INVALID_JSON,
    IW_C_SCHEMA_VIOLATION,
    IW_C_UNKNOWN_ROUTING_KEY,
    IW_C_MISSING_REPLY_TO,
    IW_C_OUTCOME_NOT_ENCODABLE,
    /* the provider's answer */
    IW_C_EXTERNAL_API_ERROR,
    IW_C_EXTERNAL_API_TIMEOUT,
    IW_C_EXTERNAL_API_UNREACHABLE,
    IW_C_EXTERNAL_API_BAD_REQUEST,
    IW_C_EXTERNAL_API_UNAUTHORIZED,
    IW_C_EXTERNAL_API_FORBIDDEN,
    IW_C_EXTERNAL_API_NOT_FOUND,
    IW_C_EXTERNAL_API_CLIENT_ERROR,
    IW_C_EXTERNAL_API_UNEXPECTED_STATUS,
    IW_C_EXTERNAL_API_BAD_RESPONSE,
    IW_C_EXTERNAL_API_RESPONSE_TOO_LARGE,
    IW_C_EXTERNAL_API_RATE_LIMITED,
    IW_C_EXTERNAL_API_UNAVAILABLE,
    IW_C_REQUEST_NOT_SENT,
    /* a job's life */
    IW_C_TRACKING_NOT_FOUND,
    IW_C_POLL_EXPIRED,
    IW_C_RATE_LIMITED,
    IW_C_RECORD_CORRUPT,
    /* our own dependencies */
    IW_C_CACHE_UNAVAILABLE,
    IW_C_LIMITER_UNAVAILABLE,
    IW_C_REDIS_UNAVAILABLE,
    IW_C_BROKER_UNAVAILABLE,
    IW_C_BROKER_CONNECTION_LOST,
    IW_C_BROKER_RETURNED,
    IW_C_TOPOLOGY_MISMATCH,
    IW_C_STARTUP_FAILED,
    IW_C_INTERNAL_ERROR,
    IW_N_CODES
} iw_code;

/* The class of provider answer a code stands for (a metric label). */
typedef enum iw_answer_class {
    IW_AC_NONE,    /* not a provider answer */
    IW_AC_2XX,     /* answered, but the body was not usable */
    IW_AC_4XX,     /* refused: no retry */
    IW_AC_429,     /* rate limited: wait for the reset */
    IW_AC_5XX,     /* server error */
    IW_AC_TIMEOUT, /* no answer in time */
    IW_AC_CONNECT, /* no connection */
} iw_answer_class;

/* "SCHEMA_VIOLATION"; "" for IW_C_NONE; never NULL ("UNKNOWN" out of range). */
const char *iw_code_name(iw_code c);
/* 1 when a job that failed with c is tried again on the retry schedule. */
int iw_code_retried(iw_code c);
/* The log level (iw_log_level) of a failure with c. */
int iw_code_level(iw_code c);
iw_answer_class iw_code_class(iw_code c);
/* "5xx", "timeout", ...; "" for IW_AC_NONE. */
const char *iw_answer_class_name(iw_answer_class a);

#endif
