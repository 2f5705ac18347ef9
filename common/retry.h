/* Classification of a provider response and the retry schedule: pure
 * functions over plain data (the spec's error table is retry_classify). */
#ifndef IW_RETRY_H
#define IW_RETRY_H

#include <stddef.h>

#include "errcode.h"

typedef enum iw_transport {
    IW_TRANSPORT_OK = 0,    /* an HTTP response arrived */
    IW_TRANSPORT_TIMEOUT,   /* no (complete) response within IW_HTTP_TIMEOUT */
    IW_TRANSPORT_CONNECT,   /* could not connect / connection refused or reset */
    IW_TRANSPORT_TOO_LARGE, /* response exceeded IW_MAX_RESPONSE_BYTES */
    IW_TRANSPORT_OTHER,
    IW_TRANSPORT_NO_TOKEN, /* not sent: no OAuth2 token could be had (the token endpoint
                              fails); retry_after_ms is the wait before the next fetch */
} iw_transport;

typedef struct iw_http_result {
    long status; /* HTTP status, 0 when transport != OK */
    iw_transport transport;
    long retry_after_ms; /* from Retry-After / X-RateLimit-Reset-Ms, -1 when absent;
                            already capped at IW_MAX_RATE_PAUSE */
    int wait_capped;     /* 1 when the provider asked for longer and the cap applied */
    int token_refused;   /* a 401 on a call that carried a token: the token is dropped
                            and a new one is being fetched; the caller retries once */
} iw_http_result;

typedef enum iw_verdict_kind {
    IW_V_ACCEPT, /* 2xx: process the body */
    IW_V_RETRY,  /* transient: retry after the schedule's next wait */
    IW_V_WAIT,   /* 429, or no OAuth token: wait without using an attempt */
    IW_V_FAIL,   /* permanent: no retry */
} iw_verdict_kind;

typedef struct iw_verdict {
    iw_verdict_kind kind;
    iw_code code;        /* for RETRY, WAIT and FAIL; IW_C_NONE for ACCEPT */
    long wait_ms;        /* WAIT: how long until the provider's reset */
    int breaker_failure; /* 5xx, timeouts and connection errors count; 429 and 4xx never */
} iw_verdict;

/* The wait of a call that could get no token, when the client names none,
 * and its bounds: a few seconds, no attempt used. */
#define IW_NO_TOKEN_WAIT_MS 2000
#define IW_NO_TOKEN_WAIT_MIN_MS 500
#define IW_NO_TOKEN_WAIT_MAX_MS 30000

/* Default wait after a 429 that names no reset. */
#define IW_DEFAULT_429_WAIT_MS 1000

iw_verdict retry_classify(const iw_http_result *r);

/* Milliseconds to wait before attempt `next_attempt` (1-based) under the
 * schedule; -1 when the schedule is exhausted (no such attempt). */
long retry_delay_before(const long *schedule, size_t n, int next_attempt);

/* Default of IW_MAX_RATE_PAUSE: the longest wait a provider's answer may
 * impose on the fleet. */
#define IW_DEFAULT_MAX_RATE_PAUSE_MS 3600000L

/* t + d in milliseconds, saturated at LLONG_MAX / LLONG_MIN instead of
 * overflowing (a deadline built from a provider's number stays defined). */
long long iw_add_ms(long long t, long long d);

/* min(max(ms, 0), max_ms): a wait from outside cut to the cap; *capped (may
 * be NULL) says whether the cap applied.  max_ms <= 0 means
 * IW_DEFAULT_MAX_RATE_PAUSE_MS. */
long retry_cap_wait(long long ms, long max_ms, int *capped);

/* Parses a Retry-After value: delta seconds (any number of digits, read with
 * saturation) or an IMF-fixdate relative to now_wall_ms (a date in the past
 * is 0).  Returns milliseconds in [0, max_ms], or -1 if unparseable; *capped
 * (may be NULL) is 1 when the value asked for more than max_ms, else 0.
 * max_ms <= 0 means IW_DEFAULT_MAX_RATE_PAUSE_MS. */
long retry_parse_retry_after(const char *value, long long now_wall_ms, long max_ms, int *capped);

/* Parses X-RateLimit-Reset-Ms: a delay in milliseconds, decimal digits with
 * optional blanks around them, read with saturation (an epoch timestamp where
 * a delay was meant, or 40 digits, is simply more than the cap).  Returns
 * milliseconds in [0, max_ms] or -1 if unparseable; *capped as above. */
long retry_parse_reset_ms(const char *value, long max_ms, int *capped);

/* Returns a copy of `ms` moved by a random amount within +/- pct percent;
 * `rnd` is a uniform random number in [0, 1). */
long retry_jitter(long ms, long pct, double rnd);

#endif
