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

/* Copies every string it needs from opts. */
http_client *http_client_new(const http_client_opts *opts, iw_error *err);
/* Aborts transfers in flight without calling their callbacks. NULL ok. */
void http_client_free(http_client *c);

/* Starts METHOD base_url+path; body (may be NULL) is copied.  The callback is
 * called exactly once, from a later loop turn (never from inside this call). */
int http_client_start(http_client *c, const char *method, const char *path, const char *body,
                      size_t body_len, const char *idempotency_key, http_done_fn cb, void *ud);

/* Puts the client's sockets and timer into the loop: from then on the loop
 * drives every transfer, and each finished transfer's callback runs from
 * inside a loop turn. */
int http_client_attach(http_client *c, loop *l);
int http_client_in_flight(const http_client *c);

#endif
