#include "admin_http.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "metrics.h"

struct admin_http {
    struct MHD_Daemon *daemon;
};

static enum MHD_Result respond(struct MHD_Connection *c, unsigned code, const char *type,
                               char *body, enum MHD_ResponseMemoryMode mode)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), body, mode);
    enum MHD_Result ret;

    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, "Content-Type", type);
    ret = MHD_queue_response(c, code, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *c, const char *url,
                              const char *method, const char *version, const char *upload,
                              size_t *upload_size, void **state)
{
    (void)cls, (void)version, (void)upload, (void)upload_size, (void)state;

    if (strcmp(method, "GET") != 0)
        return respond(c, 405, "text/plain", "method not allowed\n", MHD_RESPMEM_PERSISTENT);
    if (!strcmp(url, "/metrics")) {
        char *text = metrics_render();
        if (!text)
            return respond(c, 500, "text/plain", "out of memory\n", MHD_RESPMEM_PERSISTENT);
        return respond(c, 200, "text/plain; version=0.0.4", text, MHD_RESPMEM_MUST_FREE);
    }
    if (!strcmp(url, "/healthz"))
        return metrics_live(clock_mono_ms())
                   ? respond(c, 200, "text/plain", "ok\n", MHD_RESPMEM_PERSISTENT)
                   : respond(c, 503, "text/plain", "event loop stalled\n", MHD_RESPMEM_PERSISTENT);
    if (!strcmp(url, "/readyz")) {
        /* The reason is a static string; the body is copied so it needs no lifetime. */
        const char *why = NULL;
        char body[160];
        if (metrics_ready(clock_mono_ms(), &why))
            return respond(c, 200, "text/plain", "ready\n", MHD_RESPMEM_PERSISTENT);
        snprintf(body, sizeof body, "not ready: %s\n", why);
        return respond(c, 503, "text/plain", body, MHD_RESPMEM_MUST_COPY);
    }
    return respond(c, 404, "text/plain", "not found\n", MHD_RESPMEM_PERSISTENT);
}

admin_http *admin_http_start(const char *addr, iw_error *err)
{
    struct sockaddr_in sa;
    char host[64];
    const char *colon;
    long port;
    admin_http *a;

    if (!strcmp(addr, "off"))
        return NULL;
    colon = strrchr(addr, ':');
    port = colon ? strtol(colon + 1, NULL, 10) : -1;
    if (!colon || (size_t)(colon - addr) >= sizeof host || port < 0 || port > 65535) {
        iw_error_set(err, IW_ERR_CONFIG, "IW_HTTP_ADDR: expected HOST:PORT or off");
        return NULL;
    }
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = '\0';
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        iw_error_set(err, IW_ERR_CONFIG, "IW_HTTP_ADDR: '%s' is not an IPv4 address", host);
        return NULL;
    }
    a = calloc(1, sizeof *a);
    if (!a) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        return NULL;
    }
    a->daemon =
        MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, 0, NULL, NULL, handle,
                         NULL, MHD_OPTION_SOCK_ADDR, &sa, MHD_OPTION_CONNECTION_LIMIT, 64U,
                         MHD_OPTION_CONNECTION_TIMEOUT, 10U, MHD_OPTION_END);
    if (!a->daemon) {
        free(a);
        iw_error_set(err, IW_ERR_IO, "IW_HTTP_ADDR: cannot listen on %s (in use?)", addr);
        return NULL;
    }
    return a;
}

void admin_http_stop(admin_http *a)
{
    if (!a)
        return;
    MHD_stop_daemon(a->daemon);
    free(a);
}
