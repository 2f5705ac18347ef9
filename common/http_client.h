/* Provider calls over one libcurl multi handle: many transfers in flight on
 * one thread, connections reused, responses capped, auth headers added.
 *
 * The client owns no loop: it puts curl's sockets and timeout into the
 * caller's reactor (CURLMOPT_SOCKETFUNCTION / CURLMOPT_TIMERFUNCTION), and
 * calls each finished transfer's callback from there. */
#ifndef IW_HTTP_CLIENT_H
#define IW_HTTP_CLIENT_H

#include <curl/curl.h>
#include <stddef.h>

#include "loop.h"
#include "retry.h"
#include "status.h"

typedef struct http_client http_client;

typedef struct http_client_opts {
    const char *base_url;
    int auth_mode; /* iw_auth_mode */
    const char *api_key, *api_secret;
    const char *basic_user, *basic_password;
    const char *oauth_client_id, *oauth_client_secret;
    const char *tls_cert, *tls_key, *tls_ca;
    long timeout_ms;
    long connect_timeout_ms;
    long max_response_bytes;
    long max_connections;
    long max_wait_ms; /* IW_MAX_RATE_PAUSE; 0: IW_DEFAULT_MAX_RATE_PAUSE_MS */
} http_client_opts;

typedef struct http_response {
    iw_http_result result; /* status, transport class, retry-after */
    const char *error;     /* transport error text, "" when none */
    const char *body;      /* NUL-terminated, borrowed until the callback returns */
    size_t body_len;
    long long duration_us;
} http_response;

typedef void (*http_done_fn)(void *ud, const http_response *resp);

/* Copies every string it needs from opts.  IW_ERR_HEADER_VALUE (message
 * naming IW_API_KEY or IW_API_SECRET, never the value) when a credential
 * holds control bytes. */
http_client *http_client_new(const http_client_opts *opts, iw_error *err);
/* Aborts transfers in flight without calling their callbacks. NULL ok. */
void http_client_free(http_client *c);

/* Longest URL (base + path) and header line built from input; past them a
 * call is refused, never cut. */
#define HTTP_URL_MAX 8192
#define HTTP_HEADER_MAX 8192

/* Starts METHOD base_url+path; body (may be NULL) is copied.  idempotency_key
 * (may be NULL) is the jobId, or its jobKey: the header sent is always
 * `Idempotency-Key: <jobKey>` (jobkey.h).  When IW_OK is returned the
 * callback is called exactly once, from a later loop turn (never from inside
 * this call).  Refused with no request and no callback: IW_ERR_URL_INVALID
 * (path not "/..." of printable ASCII; encode input first),
 * IW_ERR_URL_TOO_LONG (base + path past HTTP_URL_MAX: code URL_TOO_LONG),
 * IW_ERR_HEADER_VALUE (a header value with control bytes), IW_ERR_NOMEM,
 * IW_ERR_INVALID (no method or path).  These refusals are permanent for that
 * input: fail the job, do not retry. */
int http_client_start(http_client *c, const char *method, const char *path, const char *body,
                      size_t body_len, const char *idempotency_key, http_done_fn cb, void *ud);

/* Puts the client's sockets and timer into the loop: from then on the loop
 * drives every transfer, and each finished transfer's callback runs from
 * inside a loop turn. */
int http_client_attach(http_client *c, loop *l);
int http_client_in_flight(const http_client *c);

/* IW_OK when value[0..len) may be sent as a header value (no byte below
 * 0x20, no DEL), else IW_ERR_HEADER_VALUE. */
int http_header_value_check(const char *value, size_t len);
/* IW_OK when path[0..len) starts with '/' and holds only printable ASCII
 * (0x21-0x7E), else IW_ERR_URL_INVALID. */
int http_url_path_check(const char *path, size_t len);

#endif
