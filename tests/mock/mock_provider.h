/* The mock provider's behaviour, without any network code.
 *
 * The HTTP layer turns a request into a mock_request, calls
 * mock_provider_handle, and sends the mock_response it gets back (after
 * resp.delay_ms, or by closing the connection when resp.status is 0).  All
 * state (submissions, idempotency keys, tokens, stored resources, faults,
 * rate-limit logs, statistics) lives here behind one mutex, so the handler
 * is safe to call from several HTTP threads. */
#ifndef MOCK_PROVIDER_H
#define MOCK_PROVIDER_H

#include "mock_config.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MOCK_MAX_HEADERS 8

/* Lookup of a request header or query argument (case-insensitive names for
 * headers); returns a borrowed string or NULL. */
typedef const char *(*mock_lookup_fn)(void *ctx, const char *name);

typedef struct mock_request {
    const char *method;
    const char *path; /* decoded, without the query string */
    const char *body; /* may be NULL when body_len is 0; not NUL-terminated */
    size_t body_len;
    bool body_too_large;
    mock_lookup_fn header;
    mock_lookup_fn query;
    void *ctx; /* passed to header and query */
} mock_request;

typedef struct mock_header {
    const char *name; /* static string */
    char value[64];
} mock_header;

typedef struct mock_response {
    int status; /* 0: close the connection without a response */
    char *body; /* malloc'd JSON text, or NULL */
    size_t body_len;
    mock_header headers[MOCK_MAX_HEADERS];
    int n_headers;
    int64_t delay_ms; /* answer after this long */
} mock_response;

typedef struct mock_provider mock_provider;

/* New provider for cfg (which must outlive it), or NULL when out of memory. */
mock_provider *mock_provider_new(const mock_config *cfg);

/* Frees the provider; NULL is harmless. */
void mock_provider_free(mock_provider *p);

/* Decides the answer to req and updates the state and statistics.  resp is
 * overwritten; release it with mock_response_clear. */
void mock_provider_handle(mock_provider *p, const mock_request *req, mock_response *resp);

/* Frees resp->body and zeroes resp. */
void mock_response_clear(mock_response *resp);

/* Whether requests to path count in in_flight (the /api requests). */
bool mock_provider_counts_in_flight(const char *path);

/* Bracket every counted request, from its first byte until its response is
 * sent or the connection is gone: in_flight and max_in_flight in the stats. */
void mock_provider_request_begin(mock_provider *p);
void mock_provider_request_end(mock_provider *p);

#endif
