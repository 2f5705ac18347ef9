#include "mock_config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

typedef enum opt_kind {
    OPT_FLAG,   /* bool, no value */
    OPT_STRING, /* const char *, non-empty */
    OPT_LONG,   /* long within [min, max] */
    OPT_CUSTOM, /* parsed by fn */
} opt_kind;

typedef int (*opt_parse_fn)(mock_config *cfg, const char *value, char *err, size_t errlen);

typedef struct mock_option {
    const char *name;    /* without the leading "--" */
    const char *metavar; /* NULL for flags */
    opt_kind kind;
    long min, max;
    const char *def; /* applied before argv; NULL = none */
    size_t offset;   /* target field for FLAG, STRING, LONG */
    opt_parse_fn parse;
    const char *help;
} mock_option;

static int parse_listen(mock_config *cfg, const char *value, char *err, size_t errlen);
static int parse_auth(mock_config *cfg, const char *value, char *err, size_t errlen);
static int parse_rate(mock_config *cfg, const char *value, char *err, size_t errlen);
static int parse_error_rate(mock_config *cfg, const char *value, char *err, size_t errlen);
static int parse_seconds(mock_config *cfg, const char *value, char *err, size_t errlen);
static int parse_status(mock_config *cfg, const char *value, char *err, size_t errlen);

#define FIELD(f) offsetof(mock_config, f)

static const mock_option options[] = {
    {"listen", "HOST:PORT", OPT_CUSTOM, 0, 0, "127.0.0.1:8080", 0, parse_listen,
     "address to listen on; port 0 picks a free port"},
    {"auth", "MODE", OPT_CUSTOM, 0, 0, "api-key", 0, parse_auth, "api-key, oauth2, basic or none"},
    {"api-key", "K", OPT_STRING, 0, 0, "test-key-xxxxx", FIELD(api_key), NULL,
     "expected X-API-Key (api-key mode)"},
    {"api-secret", "S", OPT_STRING, 0, 0, "test-secret-xxxxx", FIELD(api_secret), NULL,
     "expected X-API-Secret (api-key mode)"},
    {"client-id", "ID", OPT_STRING, 0, 0, "test-client", FIELD(client_id), NULL,
     "OAuth2 client id accepted at POST /oauth/token"},
    {"client-secret", "S", OPT_STRING, 0, 0, "test-client-secret", FIELD(client_secret), NULL,
     "OAuth2 client secret"},
    {"token-ttl", "SECONDS", OPT_LONG, 1, 31536000, "3600", FIELD(token_ttl_s), NULL,
     "lifetime of issued access tokens"},
    {"basic-user", "USER", OPT_STRING, 0, 0, "test-user", FIELD(basic_user), NULL,
     "user name (basic mode)"},
    {"basic-password", "PASSWORD", OPT_STRING, 0, 0, "test-password", FIELD(basic_password), NULL,
     "password (basic mode)"},
    {"rate-limits", "SPEC", OPT_CUSTOM, 0, 0, "off", 0, parse_rate,
     "off, or N/UNIT[,N/UNIT...] with UNIT s|min|hour|day (sliding windows)"},
    {"checks-to-complete", "N", OPT_LONG, 1, 1000000, "3", FIELD(checks_to_complete), NULL,
     "status checks until a tracking id is terminal"},
    {"seconds-to-complete", "S", OPT_CUSTOM, 0, 0, "0", 0, parse_seconds,
     "if > 0, progress by age instead of checks (fractions allowed)"},
    {"terminal-status", "STATUS", OPT_CUSTOM, 0, 0, "completed", 0, parse_status,
     "status a tracking id ends in"},
    {"latency-ms", "MS", OPT_LONG, 0, 600000, "0", FIELD(latency_ms), NULL,
     "fixed latency added to every /api request"},
    {"latency-jitter-ms", "MS", OPT_LONG, 0, 600000, "0", FIELD(latency_jitter_ms), NULL,
     "uniform extra latency 0..MS per /api request"},
    {"error-rate", "CODE=P", OPT_CUSTOM, 0, 0, NULL, 0, parse_error_rate,
     "answer /api requests with CODE (0 = close) with probability P; repeatable"},
    {"outage", NULL, OPT_FLAG, 0, 0, NULL, FIELD(outage), NULL,
     "start in outage: /api and /oauth answer 503"},
    {"threads", "N", OPT_LONG, 1, 64, "2", FIELD(threads), NULL, "HTTP event-loop threads"},
    {"max-connections", "N", OPT_LONG, 16, 1000000, "8192", FIELD(max_connections), NULL,
     "open connections accepted at once"},
    {"max-body-bytes", "N", OPT_LONG, 1024, 1073741824, "1048576", FIELD(max_body_bytes), NULL,
     "larger request bodies get 413"},
    {"seed", "N", OPT_LONG, 0, 2147483647, "0", FIELD(seed), NULL,
     "random seed for error rates and jitter (0 = from time)"},
    {"tls-cert", "FILE", OPT_STRING, 0, 0, NULL, FIELD(tls_cert), NULL,
     "serve HTTPS with this certificate (PEM); needs --tls-key"},
    {"tls-key", "FILE", OPT_STRING, 0, 0, NULL, FIELD(tls_key), NULL,
     "the certificate's private key (PEM)"},
    {"tls-ca", "FILE", OPT_STRING, 0, 0, NULL, FIELD(tls_ca), NULL,
     "require a client certificate signed by this CA (PEM); others are refused in TLS"},
    {"verbose", NULL, OPT_FLAG, 0, 0, NULL, FIELD(verbose), NULL, "one line per request on stderr"},
    {"help", NULL, OPT_FLAG, 0, 0, NULL, FIELD(help), NULL, "show this help and exit"},
};

static const char *const auth_names[] = {
    [MOCK_AUTH_API_KEY] = "api-key",
    [MOCK_AUTH_OAUTH2] = "oauth2",
    [MOCK_AUTH_BASIC] = "basic",
    [MOCK_AUTH_NONE] = "none",
};

const char *mock_auth_name(mock_auth_mode mode)
{
    return auth_names[mode];
}

int mock_error_code_valid(long code, char *err, size_t errlen)
{
    if (code == 0 || (code >= 100 && code <= 599))
        return 0;
    snprintf(err, errlen, "status %ld is not 0 or 100..599", code);
    return -1;
}

static int parse_listen(mock_config *cfg, const char *value, char *err, size_t errlen)
{
    const char *colon = strrchr(value, ':');
    if (!colon || colon == value)
        goto bad;
    const char *host = value;
    size_t hlen = (size_t)(colon - value);
    if (host[0] == '[') { /* [v6]:port */
        if (hlen < 3 || host[hlen - 1] != ']')
            goto bad;
        host++;
        hlen -= 2;
    }
    if (hlen >= sizeof cfg->host)
        goto bad;
    char *end;
    errno = 0;
    long port = strtol(colon + 1, &end, 10);
    if (colon[1] == '\0' || *end || errno || port < 0 || port > 65535)
        goto bad;
    memcpy(cfg->host, host, hlen);
    cfg->host[hlen] = '\0';
    cfg->port = (unsigned)port;
    return 0;
bad:
    snprintf(err, errlen, "bad --listen \"%s\" (want HOST:PORT)", value);
    return -1;
}

static int parse_auth(mock_config *cfg, const char *value, char *err, size_t errlen)
{
    for (size_t i = 0; i < sizeof auth_names / sizeof auth_names[0]; i++)
        if (strcmp(value, auth_names[i]) == 0) {
            cfg->auth = (mock_auth_mode)i;
            return 0;
        }
    snprintf(err, errlen, "bad --auth \"%s\" (want api-key, oauth2, basic or none)", value);
    return -1;
}

static int parse_rate(mock_config *cfg, const char *value, char *err, size_t errlen)
{
    char msg[200];
    if (mock_rate_spec_parse(value, &cfg->rate, msg, sizeof msg) == 0)
        return 0;
    snprintf(err, errlen, "bad --rate-limits: %s", msg);
    return -1;
}

static int parse_error_rate(mock_config *cfg, const char *value, char *err, size_t errlen)
{
    char *end;
    char msg[100];
    errno = 0;
    long code = strtol(value, &end, 10);
    if (end == value || *end != '=' || errno)
        goto bad;
    if (mock_error_code_valid(code, msg, sizeof msg) < 0) {
        snprintf(err, errlen, "bad --error-rate \"%s\": %s", value, msg);
        return -1;
    }
    const char *num = end + 1;
    double p = strtod(num, &end);
    if (end == num || *end || !(p >= 0.0 && p <= 1.0))
        goto bad;
    double sum = p;
    for (int i = 0; i < cfg->n_error_rates; i++) {
        if (cfg->error_rates[i].code == code) { /* a repeated code replaces */
            cfg->error_rates[i].p = p;
            return 0;
        }
        sum += cfg->error_rates[i].p;
    }
    if (sum > 1.0 + 1e-9) {
        snprintf(err, errlen, "bad --error-rate \"%s\": probabilities add up to more than 1",
                 value);
        return -1;
    }
    if (cfg->n_error_rates == MOCK_MAX_ERROR_RATES) {
        snprintf(err, errlen, "too many --error-rate flags (at most %d)", MOCK_MAX_ERROR_RATES);
        return -1;
    }
    cfg->error_rates[cfg->n_error_rates++] = (mock_error_rate){.code = (int)code, .p = p};
    return 0;
bad:
    snprintf(err, errlen, "bad --error-rate \"%s\" (want CODE=P, 0 <= P <= 1)", value);
    return -1;
}

static int parse_seconds(mock_config *cfg, const char *value, char *err, size_t errlen)
{
    char *end;
    double s = strtod(value, &end);
    if (end == value || *end || !(s >= 0.0 && s <= 86400.0 * 30)) {
        snprintf(err, errlen, "bad --seconds-to-complete \"%s\" (want 0..2592000)", value);
        return -1;
    }
    cfg->ms_to_complete = (long)(s * 1000.0 + 0.5);
    return 0;
}

static int parse_status(mock_config *cfg, const char *value, char *err, size_t errlen)
{
    size_t len = strlen(value);
    if (len == 0 || len > 64 || strspn(value, "abcdefghijklmnopqrstuvwxyz0123456789_-") != len) {
        snprintf(err, errlen, "bad --terminal-status \"%s\" (want 1-64 of [a-z0-9_-])", value);
        return -1;
    }
    cfg->terminal_status = value;
    return 0;
}

static int apply(mock_config *cfg, const mock_option *opt, const char *value, char *err,
                 size_t errlen)
{
    char *field = (char *)cfg + opt->offset;
    switch (opt->kind) {
    case OPT_FLAG:
        *(bool *)field = true;
        return 0;
    case OPT_STRING:
        if (!*value) {
            snprintf(err, errlen, "--%s must not be empty", opt->name);
            return -1;
        }
        *(const char **)field = value;
        return 0;
    case OPT_LONG: {
        char *end;
        errno = 0;
        long v = strtol(value, &end, 10);
        if (end == value || *end || errno || v < opt->min || v > opt->max) {
            snprintf(err, errlen, "bad --%s \"%s\" (want an integer in %ld..%ld)", opt->name, value,
                     opt->min, opt->max);
            return -1;
        }
        *(long *)field = v;
        return 0;
    }
    case OPT_CUSTOM:
        return opt->parse(cfg, value, err, errlen);
    }
    return -1;
}

int mock_config_parse(mock_config *cfg, int argc, char **argv, char *err, size_t errlen)
{
    const size_t nopts = sizeof options / sizeof options[0];
    memset(cfg, 0, sizeof *cfg);
    for (size_t i = 0; i < nopts; i++)
        if (options[i].def && apply(cfg, &options[i], options[i].def, err, errlen) < 0)
            return -1;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0) {
            snprintf(err, errlen, "unexpected argument \"%s\" (see --help)", arg);
            return -1;
        }
        const char *name = arg + 2;
        const char *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        const mock_option *opt = NULL;
        for (size_t j = 0; j < nopts; j++)
            if (strlen(options[j].name) == nlen && strncmp(options[j].name, name, nlen) == 0)
                opt = &options[j];
        if (!opt) {
            snprintf(err, errlen, "unknown flag --%.*s (see --help)", (int)nlen, name);
            return -1;
        }
        const char *value = NULL;
        if (opt->kind == OPT_FLAG) {
            if (eq) {
                snprintf(err, errlen, "flag --%s takes no value", opt->name);
                return -1;
            }
        } else if (eq) {
            value = eq + 1;
        } else if (i + 1 < argc) {
            value = argv[++i];
        } else {
            snprintf(err, errlen, "flag --%s needs a value %s", opt->name, opt->metavar);
            return -1;
        }
        if (apply(cfg, opt, value, err, errlen) < 0)
            return -1;
    }
    if (!!cfg->tls_cert != !!cfg->tls_key || (cfg->tls_ca && !cfg->tls_cert)) {
        snprintf(err, errlen, "--tls-cert and --tls-key go together; --tls-ca needs both");
        return -1;
    }
    return 0;
}

void mock_config_usage(FILE *out)
{
    fputs("usage: mock-provider [FLAG...]\n"
          "A stand-in for the IF-002 REST provider (tests, local runs, benchmarks).\n\n",
          out);
    for (size_t i = 0; i < sizeof options / sizeof options[0]; i++) {
        const mock_option *o = &options[i];
        char left[64];
        snprintf(left, sizeof left, "--%s%s%s", o->name, o->metavar ? " " : "",
                 o->metavar ? o->metavar : "");
        fprintf(out, "  %-30s %s", left, o->help);
        if (o->def)
            fprintf(out, " (default %s)", o->def);
        fputc('\n', out);
    }
    fputs("\nAdmin API (no auth): GET /__admin/stats, POST /__admin/reset,\n"
          "GET|POST /__admin/faults, PUT|DELETE /__admin/resources/{id}.\n",
          out);
}
