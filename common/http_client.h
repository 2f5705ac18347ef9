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
#include "redis_link.h"
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
    /* OAuth2: the token shared by the fleet.  token_store (borrowed, may be
     * NULL: a token per process) holds N:oauth:token, N:oauth:lock and
     * N:oauth:fails under namespace ns; the client uses it only from its own
     * loop callbacks, never while a caller's pipeline is pending.  It adds a
     * script to the link (redis_link_add_script): create the client before
     * the link first connects. */
    redis_link *token_store;
    const char *ns;
    long token_backoff_min_ms; /* IW_TOKEN_BACKOFF_MIN; 0: 1 s */
    long token_backoff_max_ms; /* IW_TOKEN_BACKOFF_MAX; 0: 30 s */
} http_client_opts;

/* What became of one POST /oauth/token this process made (for the breaker,
 * metrics and the outage's two log lines: the client logs nothing itself). */
typedef struct http_token_event {
    int ok;                /* 1: a token was taken */
    iw_http_result result; /* the endpoint's answer: status or transport class */
    const char *problem;   /* "" when ok; else why, safe to log (no token, no secret) */
    long long duration_us;
    int failures;       /* consecutive failed fetches, this one included (0 when ok) */
    long next_try_ms;   /* when !ok: the backoff before the next fetch */
    int outage_started; /* the first failure after a success (or since start) */
    int recovered;      /* the first success after failures */
} http_token_event;

typedef void (*http_token_fn)(void *ud, const http_token_event *ev);

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
/* Longest bearer token taken (a longer one is refused, not cut) and the
 * longest lifetime believed (30 days: more is refused as absurd). */
#define HTTP_TOKEN_MAX 8192
#define HTTP_TOKEN_TTL_MAX_S 2592000LL

/* Starts METHOD base_url+path; body (may be NULL) is copied.  idempotency_key
 * (may be NULL) is the jobId, or its jobKey: the header sent is always
 * `Idempotency-Key: <jobKey>` (jobkey.h).  When IW_OK is returned the
 * callback is called exactly once, from a later loop turn (never from inside
 * this call).  Refused with no request and no callback: IW_ERR_URL_INVALID
 * (path not "/..." of printable ASCII; encode input first),
 * IW_ERR_URL_TOO_LONG (base + path past HTTP_URL_MAX: code URL_TOO_LONG),
 * IW_ERR_HEADER_VALUE (a header value with control bytes), IW_ERR_NOMEM,
 * IW_ERR_INVALID (no method or path).  These refusals are permanent for that
 * input: fail the job, do not retry.
 * With OAuth2 and no valid token the call waits inside the client (it counts
 * as in flight) while the token is fetched on the loop; it is never sent
 * without a token.  When no token can be had in time (the token endpoint
 * fails, or another process fetches it and does not finish within the
 * call's timeout) the callback gets transport IW_TRANSPORT_NO_TOKEN and
 * retry_after_ms = the wait before the next token fetch.  A 401 to a call
 * that carried a token drops that token (here and in the store), fetches a
 * new one and sends the call once more; a 401 after that is the answer. */
int http_client_start(http_client *c, const char *method, const char *path, const char *body,
                      size_t body_len, const char *idempotency_key, http_done_fn cb, void *ud);

/* Puts the client's sockets and timer into the loop: from then on the loop
 * drives every transfer, and each finished transfer's callback runs from
 * inside a loop turn. */
int http_client_attach(http_client *c, loop *l);
/* Calls fn(ud, ev) after each token fetch this process makes (NULL: none). */
void http_client_on_token(http_client *c, http_token_fn fn, void *ud);
/* 1 when calls would be sent at once (no OAuth2, or a token valid now); 0
 * when they would wait for a token.  Lets a caller hold calls (and their
 * permits) back during a token outage. */
int http_client_auth_ready(const http_client *c);
/* How long calls would wait for an OAuth2 token now: 0 when they would be
 * sent at once (not OAuth2, or a token is valid); else the time until the
 * next token fetch (a backoff after failures) or a short poll while one is
 * under way.  Asking it starts a fetch when none runs and none is due later:
 * a caller that holds its calls (and takes no rate-limit permits for them)
 * while this is > 0 gets the token without sending a call for it. */
long http_client_token_wait_ms(http_client *c);
/* Parses a token endpoint's 200 body: the access token (0x21-0x7E only, 1 to
 * HTTP_TOKEN_MAX bytes; copied to *token, caller frees) and its lifetime in
 * ms (expires_in: a positive integer up to HTTP_TOKEN_TTL_MAX_S; absent means
 * 3600 s).  IW_ERR_HTTP with a safe reason in *problem (static text) when
 * the answer must be refused. */
int http_token_parse(const char *body, size_t len, char **token, long long *life_ms,
                     const char **problem);
/* When a token of life_ms, fetched at 0, is renewed: at 80% of its life,
 * but no earlier than 5 minutes before it expires. */
long long http_token_refresh_after(long long life_ms);
int http_client_in_flight(const http_client *c);

/* IW_OK when value[0..len) may be sent as a header value (no byte below
 * 0x20, no DEL), else IW_ERR_HEADER_VALUE. */
int http_header_value_check(const char *value, size_t len);
/* IW_OK when path[0..len) starts with '/' and holds only printable ASCII
 * (0x21-0x7E), else IW_ERR_URL_INVALID. */
int http_url_path_check(const char *path, size_t len);

#endif
