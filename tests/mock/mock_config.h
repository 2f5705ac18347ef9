/* Command-line configuration of mock-provider.
 *
 * One table (mock_config.c) lists every flag with its type, bounds, default
 * and help text; parsing, defaults and --help all read it. */
#ifndef MOCK_CONFIG_H
#define MOCK_CONFIG_H

#include "mock_limiter.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#define MOCK_MAX_ERROR_RATES 32

typedef enum mock_auth_mode {
    MOCK_AUTH_API_KEY,
    MOCK_AUTH_OAUTH2,
    MOCK_AUTH_BASIC,
    MOCK_AUTH_NONE,
} mock_auth_mode;

/* One "--error-rate CODE=P": answer CODE (0 = close the connection) with
 * probability P. */
typedef struct mock_error_rate {
    int code;
    double p;
} mock_error_rate;

typedef struct mock_config {
    char host[256]; /* without IPv6 brackets */
    unsigned port;
    mock_auth_mode auth;
    const char *api_key, *api_secret; /* borrowed from argv or static */
    const char *client_id, *client_secret;
    const char *basic_user, *basic_password;
    long token_ttl_s;
    mock_rate_spec rate;
    long checks_to_complete;
    long ms_to_complete; /* --seconds-to-complete, 0 = by checks */
    const char *terminal_status;
    long latency_ms, latency_jitter_ms;
    mock_error_rate error_rates[MOCK_MAX_ERROR_RATES];
    int n_error_rates;
    bool outage;
    bool verbose;
    long threads;
    long max_connections;
    long max_body_bytes;
    long seed; /* 0 = from time and pid */
    bool help;
    /* HTTPS: server certificate and key (PEM files); with tls_ca, a client
     * certificate signed by that CA is required (mutual TLS) */
    const char *tls_cert, *tls_key, *tls_ca;
} mock_config;

/* Fills cfg from the defaults and argv.  Returns 0, or -1 with a one-line
 * message in err.  Strings in cfg borrow from argv. */
int mock_config_parse(mock_config *cfg, int argc, char **argv, char *err, size_t errlen);

/* Writes the --help text. */
void mock_config_usage(FILE *out);

/* Name of an auth mode ("api-key", ...). */
const char *mock_auth_name(mock_auth_mode mode);

/* Whether code may be injected: 0 (close the connection) or 100..599.
 * Shared by --error-rate and POST /__admin/faults.  Returns 0, or -1 with a
 * message in err. */
int mock_error_code_valid(long code, char *err, size_t errlen);

#endif
