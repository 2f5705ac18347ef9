#include "mock_http.h"

#include "mock_timer.h"

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <microhttpd.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NS_PER_MS 1000000LL
#define IDLE_TIMEOUT_S 300                   /* keep-alive connections idle longer are closed */
#define STOP_GRACE_NS (2 * 1000 * NS_PER_MS) /* for answering delayed requests at stop */

struct mock_server {
    const mock_config *cfg;
    mock_provider *provider;
    mock_timer *timer;
    struct MHD_Daemon *daemon;
    atomic_long active;                /* requests begun and not yet completed */
    char *tls_cert, *tls_key, *tls_ca; /* PEM text: MHD keeps pointers to them */
};

/* The state of one request across the access handler's calls. */
typedef struct request_ctx {
    mock_server *srv;
    struct MHD_Connection *conn;
    bool counted;   /* in the provider's in_flight */
    bool decided;   /* resp holds the answer */
    bool too_large; /* the body passed --max-body-bytes; the rest is discarded */
    char *body;
    size_t len, cap;
    mock_response resp;
    int sent_status; /* -1 until answered */
    int64_t start_ns;
    char line[160]; /* "METHOD /path" for --verbose */
} request_ctx;

static const char *lookup_header(void *ctx, const char *name)
{
    request_ctx *rc = ctx;
    return MHD_lookup_connection_value(rc->conn, MHD_HEADER_KIND, name);
}

static const char *lookup_query(void *ctx, const char *name)
{
    request_ctx *rc = ctx;
    return MHD_lookup_connection_value(rc->conn, MHD_GET_ARGUMENT_KIND, name);
}

/* Appends an upload chunk, keeping at most --max-body-bytes. */
static void append_body(request_ctx *rc, const char *data, size_t size)
{
    size_t max = (size_t)rc->srv->cfg->max_body_bytes;
    if (rc->too_large || size > max - rc->len) {
        rc->too_large = true;
        return;
    }
    if (rc->len + size > rc->cap) {
        size_t cap = rc->cap ? rc->cap : 1024;
        while (cap < rc->len + size)
            cap *= 2;
        char *body = realloc(rc->body, cap);
        if (!body) {
            rc->too_large = true; /* treat like an oversized body rather than fail silently */
            return;
        }
        rc->body = body;
        rc->cap = cap;
    }
    memcpy(rc->body + rc->len, data, size);
    rc->len += size;
}

static void decide(request_ctx *rc, const char *url, const char *method)
{
    mock_request req = {
        .method = method,
        .path = url,
        .body = rc->body,
        .body_len = rc->len,
        .body_too_large = rc->too_large,
        .header = lookup_header,
        .query = lookup_query,
        .ctx = rc,
    };
    mock_provider_handle(rc->srv->provider, &req, &rc->resp);
    rc->decided = true;
    free(rc->body);
    rc->body = NULL;
    rc->len = rc->cap = 0;
}

static enum MHD_Result send_decided(request_ctx *rc)
{
    mock_response *resp = &rc->resp;
    if (resp->status == 0) {
        rc->sent_status = 0;
        return MHD_NO; /* closes the connection without an answer */
    }
    struct MHD_Response *r =
        MHD_create_response_from_buffer(resp->body_len, resp->body, MHD_RESPMEM_MUST_FREE);
    if (!r)
        return MHD_NO;
    resp->body = NULL; /* now owned by r */
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    for (int i = 0; i < resp->n_headers; i++)
        MHD_add_response_header(r, resp->headers[i].name, resp->headers[i].value);
    enum MHD_Result ret = MHD_queue_response(rc->conn, (unsigned)resp->status, r);
    MHD_destroy_response(r);
    rc->sent_status = resp->status;
    return ret;
}

/* Timer callback: the delay of a suspended request is over.  The pointer is
 * still valid: MHD neither times out nor frees a suspended connection. */
static void resume_connection(void *arg)
{
    MHD_resume_connection(arg);
}

/* True when the peer sent a certificate that chains to --tls-ca (MHD only
 * asks for one: checking it is the application's job). */
static bool client_cert_ok(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    unsigned int status = 0, n = 0;
    if (!ci || !ci->tls_session)
        return false;
    gnutls_session_t s = (gnutls_session_t)ci->tls_session;
    if (!gnutls_certificate_get_peers(s, &n) || n == 0)
        return false;
    return gnutls_certificate_verify_peers2(s, &status) == 0 && status == 0;
}

static char *read_pem(const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    char *text = NULL;
    long n;
    if (!f || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || n > 1048576 ||
        fseek(f, 0, SEEK_SET) != 0 || !(text = calloc(1, (size_t)n + 1)) ||
        fread(text, 1, (size_t)n, f) != (size_t)n) {
        snprintf(err, errlen, "cannot read %s", path);
        free(text);
        text = NULL;
    }
    if (f)
        fclose(f);
    return text;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    (void)version;
    mock_server *srv = cls;
    request_ctx *rc = *con_cls;
    if (!rc) {
        if (srv->tls_ca && !client_cert_ok(conn)) {
            /* what a TLS front end does with ssl_verify_client on: a fatal
             * bad_certificate alert, and the connection closed unanswered */
            const union MHD_ConnectionInfo *ci =
                MHD_get_connection_info(conn, MHD_CONNECTION_INFO_GNUTLS_SESSION);
            if (ci && ci->tls_session)
                gnutls_alert_send((gnutls_session_t)ci->tls_session, GNUTLS_AL_FATAL,
                                  GNUTLS_A_BAD_CERTIFICATE);
            fprintf(stderr, "mock-provider: client certificate refused (%s %s)\n", method, url);
            return MHD_NO;
        }
        rc = calloc(1, sizeof *rc);
        if (!rc)
            return MHD_NO;
        rc->srv = srv;
        rc->conn = conn;
        rc->sent_status = -1;
        rc->start_ns = mock_now_ns();
        atomic_fetch_add(&srv->active, 1);
        if (srv->cfg->verbose)
            snprintf(rc->line, sizeof rc->line, "%s %s", method, url);
        if (mock_provider_counts_in_flight(url)) {
            mock_provider_request_begin(srv->provider);
            rc->counted = true;
        }
        *con_cls = rc;
        /* Refuse a declared oversized body before reading it. */
        const char *cl =
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > (unsigned long long)srv->cfg->max_body_bytes) {
            rc->too_large = true;
            decide(rc, url, method);
            return send_decided(rc);
        }
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        append_body(rc, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (!rc->decided) {
        decide(rc, url, method);
        if (rc->resp.delay_ms > 0) {
            /* Suspend first, then schedule: the timer can only resume a
             * connection that is already suspended.  A stopping timer refuses
             * the entry, and the request is answered at once. */
            MHD_suspend_connection(conn);
            int64_t due = mock_now_ns() + rc->resp.delay_ms * NS_PER_MS;
            if (mock_timer_add(srv->timer, due, conn) < 0)
                MHD_resume_connection(conn);
            return MHD_YES;
        }
    }
    return send_decided(rc);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)conn;
    (void)toe;
    mock_server *srv = cls;
    request_ctx *rc = *con_cls;
    if (!rc)
        return;
    if (rc->counted)
        mock_provider_request_end(srv->provider);
    if (srv->cfg->verbose) {
        double ms = (double)(mock_now_ns() - rc->start_ns) / 1e6;
        if (rc->sent_status > 0)
            fprintf(stderr, "mock-provider: %s -> %d (%.1f ms)\n", rc->line, rc->sent_status, ms);
        else
            fprintf(stderr, "mock-provider: %s -> %s (%.1f ms)\n", rc->line,
                    rc->sent_status == 0 ? "closed" : "aborted", ms);
    }
    free(rc->body);
    mock_response_clear(&rc->resp);
    free(rc);
    *con_cls = NULL;
    atomic_fetch_sub(&srv->active, 1);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    /* MHD reports every deliberate "close without an answer" this way. */
    if (strstr(msg, "Application reported internal error"))
        return;
    fprintf(stderr, "mock-provider: libmicrohttpd: %s%s", msg,
            msg[0] && msg[strlen(msg) - 1] == '\n' ? "" : "\n");
}

mock_server *mock_server_start(const mock_config *cfg, mock_provider *p, int listen_fd, char *err,
                               size_t errlen)
{
    mock_server *srv = calloc(1, sizeof *srv);
    if (!srv) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    srv->cfg = cfg;
    srv->provider = p;
    srv->timer = mock_timer_new(resume_connection);
    if (!srv->timer) {
        snprintf(err, errlen, "cannot start the timer thread");
        goto fail;
    }
    unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    if (cfg->tls_cert) {
        if (!(srv->tls_cert = read_pem(cfg->tls_cert, err, errlen)) ||
            !(srv->tls_key = read_pem(cfg->tls_key, err, errlen)) ||
            (cfg->tls_ca && !(srv->tls_ca = read_pem(cfg->tls_ca, err, errlen))))
            goto fail;
        flags |= MHD_USE_TLS;
    }
    struct MHD_OptionItem opts[12];
    size_t n = 0;
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)on_mhd_log, NULL};
    if (srv->tls_cert) {
        opts[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, srv->tls_cert};
        opts[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, srv->tls_key};
    }
    if (srv->tls_ca)
        opts[n++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_TRUST, 0, srv->tls_ca};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_LISTEN_SOCKET, listen_fd, NULL};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_LIMIT, cfg->max_connections, NULL};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_TIMEOUT, IDLE_TIMEOUT_S, NULL};
    opts[n++] = (struct MHD_OptionItem){MHD_OPTION_NOTIFY_COMPLETED, (intptr_t)on_completed, srv};
    /* Last, and only with more than one thread: MHD warns about a pool of 1. */
    if (cfg->threads > 1)
        opts[n++] = (struct MHD_OptionItem){MHD_OPTION_THREAD_POOL_SIZE, cfg->threads, NULL};
    opts[n] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    srv->daemon = MHD_start_daemon(flags, 0, NULL, NULL, on_request, srv, MHD_OPTION_ARRAY, opts,
                                   MHD_OPTION_END);
    if (!srv->daemon) {
        snprintf(err, errlen, "cannot start the HTTP daemon");
        goto fail;
    }
    return srv;
fail:
    mock_timer_free(srv->timer);
    free(srv->tls_cert);
    free(srv->tls_key);
    free(srv->tls_ca);
    free(srv);
    return NULL;
}

void mock_server_stop(mock_server *srv)
{
    if (!srv)
        return;
    /* Answer every delayed request now (MHD must not be stopped with
     * suspended connections) and give the answers a moment to leave before
     * the connections are closed.  No MHD_quiesce_daemon: in 0.9.75 it races
     * with the pool threads over the listening socket's epoll registration
     * and can abort the process. */
    mock_timer_stop(srv->timer);
    int64_t deadline = mock_now_ns() + STOP_GRACE_NS;
    while (atomic_load(&srv->active) > 0 && mock_now_ns() < deadline) {
        struct timespec pause = {.tv_sec = 0, .tv_nsec = 2 * NS_PER_MS};
        nanosleep(&pause, NULL);
    }
    MHD_stop_daemon(srv->daemon);
    mock_timer_free(srv->timer);
    free(srv->tls_cert);
    free(srv->tls_key);
    free(srv->tls_ca);
    free(srv);
}
