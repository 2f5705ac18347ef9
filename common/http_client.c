#include "http_client.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "clock.h"
#include "config.h"
#include "loop.h"
#include "jobkey.h"

/* Longest bearer token taken from the token endpoint (a longer one is
 * refused, not cut). */
#define HTTP_TOKEN_MAX 8192
/* Longest token lifetime believed, in seconds (30 days). */
#define HTTP_TOKEN_TTL_MAX_S 2592000LL

typedef struct transfer {
    http_client *client;
    CURL *easy;
    struct curl_slist *headers;
    char *body;
    size_t len, cap;
    int too_large;
    char retry_after[64];
    char reset_ms[32];
    long long start_us;
    http_done_fn cb;
    void *ud;
    /* for a transparent retry after an expired OAuth2 token */
    char method[8];
    char *path, *req_body, *idem_key;
    size_t req_len;
    int token_retried;
    struct transfer *next_free;   /* free list */
    struct transfer *prev, *next; /* active list */
} transfer;

struct http_client {
    CURLM *multi;
    char *base_url;
    int auth_mode;
    char *api_key_header, *api_secret_header, *basic_user, *basic_password;
    char *oauth_id, *oauth_secret;
    char *tls_cert, *tls_key, *tls_ca;
    char *bearer;               /* "Authorization: Bearer <token>" or NULL */
    long long token_expires_ms; /* monotonic */
    long timeout_ms, connect_timeout_ms, max_response_bytes;
    long max_wait_ms; /* IW_MAX_RATE_PAUSE: caps Retry-After / X-RateLimit-Reset-Ms */
    int in_flight;
    transfer *free_list;
    transfer *active;
    loop *lp;         /* the reactor curl's sockets and timer live in */
    loop_timer timer; /* curl's one timeout */
};

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

int http_header_value_check(const char *value, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)value[i];
        if (ch < 0x20 || ch == 0x7F)
            return IW_ERR_HEADER_VALUE;
    }
    return IW_OK;
}

int http_url_path_check(const char *path, size_t len)
{
    if (len == 0 || path[0] != '/')
        return IW_ERR_URL_INVALID;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)path[i];
        if (ch <= 0x20 || ch >= 0x7F)
            return IW_ERR_URL_INVALID;
    }
    return IW_OK;
}

/* "Name: value" in a new string; NULL when value is NULL, holds control
 * bytes (*rc = IW_ERR_HEADER_VALUE) or memory runs out (*rc = IW_ERR_NOMEM). */
static char *header_line(const char *name, const char *value, int *rc)
{
    iw_buf b;

    *rc = IW_OK;
    if (!value)
        return NULL;
    if ((*rc = http_header_value_check(value, strlen(value))) != IW_OK)
        return NULL;
    buf_init(&b, HTTP_HEADER_MAX);
    if ((*rc = buf_addf(&b, "%s: %s", name, value)) != IW_OK) {
        buf_free(&b);
        return NULL;
    }
    return buf_steal(&b);
}

http_client *http_client_new(const http_client_opts *o, iw_error *err)
{
    http_client *c = calloc(1, sizeof *c);
    int rc;

    if (!c || !(c->multi = curl_multi_init())) {
        free(c);
        iw_error_set(err, IW_ERR_NOMEM, "cannot create the HTTP client");
        return NULL;
    }
    c->base_url = strdup(o->base_url ? o->base_url : "");
    if (!c->base_url)
        goto nomem;
    size_t n = strlen(c->base_url);
    while (n && c->base_url[n - 1] == '/')
        c->base_url[--n] = '\0';
    c->auth_mode = o->auth_mode;
    /* The values are the operator's, but still outside bytes: a CR or LF in a
     * key would start a header line of its own.  Never echoed (secrets). */
    c->api_key_header = header_line("X-API-Key", o->api_key, &rc);
    if (rc != IW_OK) {
        iw_error_set(err, rc, "IW_API_KEY: %s",
                     rc == IW_ERR_HEADER_VALUE
                         ? "holds control bytes (CR, LF, ...) and cannot be sent as a header"
                         : "too long or out of memory");
        goto fail;
    }
    c->api_secret_header = header_line("X-API-Secret", o->api_secret, &rc);
    if (rc != IW_OK) {
        iw_error_set(err, rc, "IW_API_SECRET: %s",
                     rc == IW_ERR_HEADER_VALUE
                         ? "holds control bytes (CR, LF, ...) and cannot be sent as a header"
                         : "too long or out of memory");
        goto fail;
    }
    c->basic_user = dup_or_null(o->basic_user);
    c->basic_password = dup_or_null(o->basic_password);
    c->oauth_id = dup_or_null(o->oauth_client_id);
    c->oauth_secret = dup_or_null(o->oauth_client_secret);
    c->tls_cert = dup_or_null(o->tls_cert);
    c->tls_key = dup_or_null(o->tls_key);
    c->tls_ca = dup_or_null(o->tls_ca);
    c->timeout_ms = o->timeout_ms;
    c->connect_timeout_ms = o->connect_timeout_ms;
    c->max_response_bytes = o->max_response_bytes;
    c->max_wait_ms = o->max_wait_ms > 0 ? o->max_wait_ms : IW_DEFAULT_MAX_RATE_PAUSE_MS;
    curl_multi_setopt(c->multi, CURLMOPT_MAX_HOST_CONNECTIONS, o->max_connections);
    curl_multi_setopt(c->multi, CURLMOPT_MAXCONNECTS, o->max_connections);
    curl_multi_setopt(c->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    return c;
nomem:
    iw_error_set(err, IW_ERR_NOMEM, "cannot create the HTTP client");
fail:
    http_client_free(c);
    return NULL;
}

static void transfer_destroy(transfer *t)
{
    curl_easy_cleanup(t->easy);
    curl_slist_free_all(t->headers);
    free(t->body);
    free(t->path);
    free(t->req_body);
    free(t->idem_key);
    free(t);
}

void http_client_free(http_client *c)
{
    if (!c)
        return;
    while (c->active) {
        transfer *t = c->active;
        c->active = t->next;
        curl_multi_remove_handle(c->multi, t->easy);
        transfer_destroy(t);
    }
    while (c->free_list) {
        transfer *t = c->free_list;
        c->free_list = t->next_free;
        transfer_destroy(t);
    }
    curl_multi_cleanup(c->multi);
    if (c->lp)
        loop_timer_cancel(c->lp, &c->timer);
    free(c->base_url);
    free(c->api_key_header);
    free(c->api_secret_header);
    free(c->basic_user);
    free(c->basic_password);
    free(c->oauth_id);
    free(c->oauth_secret);
    free(c->tls_cert);
    free(c->tls_key);
    free(c->tls_ca);
    free(c->bearer);
    free(c);
}

static size_t on_body(char *data, size_t size, size_t nmemb, void *ud)
{
    transfer *t = ud;
    size_t n = size * nmemb;

    if (t->len + n > (size_t)t->client->max_response_bytes) {
        t->too_large = 1;
        return 0; /* aborts the transfer with CURLE_WRITE_ERROR */
    }
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 1024;
        while (cap < t->len + n + 1)
            cap *= 2;
        char *b = realloc(t->body, cap);
        if (!b)
            return 0;
        t->body = b;
        t->cap = cap;
    }
    memcpy(t->body + t->len, data, n);
    t->len += n;
    t->body[t->len] = '\0';
    return n;
}

static void copy_header_value(char *dst, size_t cap, const char *line, size_t n, size_t name_len)
{
    const char *v = line + name_len;
    size_t vn = n - name_len;
    while (vn && (*v == ' ' || *v == '\t'))
        v++, vn--;
    while (vn && (v[vn - 1] == '\r' || v[vn - 1] == '\n' || v[vn - 1] == ' '))
        vn--;
    if (vn >= cap)
        vn = cap - 1;
    memcpy(dst, v, vn);
    dst[vn] = '\0';
}

static size_t on_header(char *line, size_t size, size_t nmemb, void *ud)
{
    transfer *t = ud;
    size_t n = size * nmemb;

    if (n > 12 && strncasecmp(line, "Retry-After:", 12) == 0)
        copy_header_value(t->retry_after, sizeof t->retry_after, line, n, 12);
    else if (n > 21 && strncasecmp(line, "X-RateLimit-Reset-Ms:", 21) == 0)
        copy_header_value(t->reset_ms, sizeof t->reset_ms, line, n, 21);
    return n;
}

/* Fetches an OAuth2 client-credentials token.  Synchronous: it runs at most
 * once per token lifetime (default an hour) and takes one loopback round
 * trip; documented in the README. */
static int refresh_token(http_client *c)
{
    CURL *e = curl_easy_init();
    transfer tmp;
    char *form = NULL, *id = NULL, *secret = NULL;
    iw_buf url, fb;
    int rc = IW_ERR_HTTP;
    long status = 0;

    memset(&tmp, 0, sizeof tmp);
    tmp.client = c;
    buf_init(&url, HTTP_URL_MAX);
    buf_init(&fb, HTTP_URL_MAX);
    if (!e)
        return IW_ERR_NOMEM;
    id = curl_easy_escape(e, c->oauth_id ? c->oauth_id : "", 0);
    secret = curl_easy_escape(e, c->oauth_secret ? c->oauth_secret : "", 0);
    if (id && secret &&
        buf_addf(&fb, "grant_type=client_credentials&client_id=%s&client_secret=%s", id, secret) ==
            IW_OK)
        form = buf_steal(&fb);
    if ((rc = buf_addf(&url, "%s/oauth/token", c->base_url)) != IW_OK)
        goto out;
    rc = IW_ERR_HTTP;
    curl_easy_setopt(e, CURLOPT_URL, buf_ptr(&url));
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, form);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, c->timeout_ms);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, c->connect_timeout_ms);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &tmp);
    if (c->tls_cert)
        curl_easy_setopt(e, CURLOPT_SSLCERT, c->tls_cert);
    if (c->tls_key)
        curl_easy_setopt(e, CURLOPT_SSLKEY, c->tls_key);
    if (c->tls_ca)
        curl_easy_setopt(e, CURLOPT_CAINFO, c->tls_ca);
    if (form && curl_easy_perform(e) == CURLE_OK) {
        curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
        json_t *doc = status == 200 && tmp.body ? json_loads(tmp.body, 0, NULL) : NULL;
        const char *tok = json_string_value(json_object_get(doc, "access_token"));
        json_int_t ttl = json_integer_value(json_object_get(doc, "expires_in"));
        size_t tok_len = tok ? json_string_length(json_object_get(doc, "access_token")) : 0;
        /* the token is the provider's bytes: one with CR/LF would add header
         * lines of its own, a huge one is refused rather than cut */
        if (tok && tok_len && tok_len <= HTTP_TOKEN_MAX && strlen(tok) == tok_len &&
            http_header_value_check(tok, tok_len) == IW_OK) {
            iw_buf hb;
            buf_init(&hb, HTTP_TOKEN_MAX + 64);
            if (buf_addf(&hb, "Authorization: Bearer %s", tok) != IW_OK) {
                buf_free(&hb);
                json_decref(doc);
                goto out;
            }
            free(c->bearer);
            c->bearer = buf_steal(&hb);
            /* renew a minute early (or at half-life for short tokens) */
            /* expires_in is the provider's number: capped before it is scaled */
            long long life =
                ttl > 0
                    ? (long long)(ttl < HTTP_TOKEN_TTL_MAX_S ? ttl : HTTP_TOKEN_TTL_MAX_S) * 1000
                    : 3600000;
            c->token_expires_ms = clock_mono_ms() + (life > 120000 ? life - 60000 : life / 2);
            rc = IW_OK;
        }
        json_decref(doc);
    }
out:
    buf_free(&url);
    buf_free(&fb);
    free(tmp.body);
    free(form);
    curl_free(id);
    curl_free(secret);
    curl_easy_cleanup(e);
    return rc;
}

/* Builds base_url + path whole, or refuses: a cut URL is another URL. */
static int build_url(const http_client *c, const char *path, iw_buf *url)
{
    int rc = http_url_path_check(path, strlen(path));

    if (rc != IW_OK)
        return rc;
    rc = buf_addf(url, "%s%s", c->base_url, path);
    return rc == IW_ERR_TOO_LARGE ? IW_ERR_URL_TOO_LONG : rc;
}

static int launch(http_client *c, transfer *t)
{
    iw_buf url;
    char *idem = NULL;
    int rc;

    buf_init(&url, HTTP_URL_MAX);
    if ((rc = build_url(c, t->path, &url)) != IW_OK)
        goto out;
    if (t->idem_key) {
        char key[JOBKEY_SIZE];
        /* the jobKey, never the raw jobId: CR/LF or non-ASCII bytes of a jobId
         * become its SHA-256, and the line is checked once more before use */
        if ((rc = jobkey(t->idem_key, strlen(t->idem_key), key)) != IW_OK ||
            !(idem = header_line("Idempotency-Key", key, &rc)))
            goto out;
    }
    if (c->auth_mode == IW_AUTH_OAUTH2 && (!c->bearer || clock_mono_ms() >= c->token_expires_ms))
        refresh_token(c); /* on failure the call goes out without a token and gets a 401 */
    curl_easy_reset(t->easy);
    curl_slist_free_all(t->headers);
    t->headers = NULL;
    t->len = 0;
    t->too_large = 0;
    t->retry_after[0] = t->reset_ms[0] = '\0';
    curl_easy_setopt(t->easy, CURLOPT_URL, buf_ptr(&url)); /* curl copies it */
    curl_easy_setopt(t->easy, CURLOPT_PRIVATE, t);
    curl_easy_setopt(t->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(t->easy, CURLOPT_TIMEOUT_MS, c->timeout_ms);
    curl_easy_setopt(t->easy, CURLOPT_CONNECTTIMEOUT_MS, c->connect_timeout_ms);
    curl_easy_setopt(t->easy, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(t->easy, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(t->easy, CURLOPT_WRITEDATA, t);
    curl_easy_setopt(t->easy, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(t->easy, CURLOPT_HEADERDATA, t);
    curl_easy_setopt(t->easy, CURLOPT_USERAGENT, "integration-worker/1");
    if (c->tls_cert)
        curl_easy_setopt(t->easy, CURLOPT_SSLCERT, c->tls_cert);
    if (c->tls_key)
        curl_easy_setopt(t->easy, CURLOPT_SSLKEY, c->tls_key);
    if (c->tls_ca)
        curl_easy_setopt(t->easy, CURLOPT_CAINFO, c->tls_ca);
    t->headers = curl_slist_append(t->headers, "Accept: application/json");
    t->headers = curl_slist_append(t->headers, "Expect:");
    if (strcmp(t->method, "GET") != 0) {
        t->headers = curl_slist_append(t->headers, "Content-Type: application/json");
        curl_easy_setopt(t->easy, CURLOPT_CUSTOMREQUEST, t->method);
        curl_easy_setopt(t->easy, CURLOPT_POSTFIELDSIZE, (long)t->req_len);
        curl_easy_setopt(t->easy, CURLOPT_POSTFIELDS, t->req_body ? t->req_body : "");
    }
    switch (c->auth_mode) {
    case IW_AUTH_API_KEY:
        if (c->api_key_header)
            t->headers = curl_slist_append(t->headers, c->api_key_header);
        if (c->api_secret_header)
            t->headers = curl_slist_append(t->headers, c->api_secret_header);
        break;
    case IW_AUTH_BASIC:
        curl_easy_setopt(t->easy, CURLOPT_HTTPAUTH, CURLAUTH_BASIC);
        curl_easy_setopt(t->easy, CURLOPT_USERNAME, c->basic_user);
        curl_easy_setopt(t->easy, CURLOPT_PASSWORD, c->basic_password);
        break;
    case IW_AUTH_OAUTH2:
        if (c->bearer)
            t->headers = curl_slist_append(t->headers, c->bearer);
        break;
    default:
        break;
    }
    if (idem)
        t->headers = curl_slist_append(t->headers, idem);
    curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, t->headers);
    if (curl_multi_add_handle(c->multi, t->easy) != CURLM_OK)
        rc = IW_ERR_HTTP;
out:
    buf_free(&url);
    free(idem);
    return rc;
}

int http_client_start(http_client *c, const char *method, const char *path, const char *body,
                      size_t body_len, const char *idempotency_key, http_done_fn cb, void *ud)
{
    transfer *t = c->free_list;
    int rc;

    if (t) {
        c->free_list = t->next_free;
    } else {
        t = calloc(1, sizeof *t);
        if (!t || !(t->easy = curl_easy_init())) {
            free(t);
            return IW_ERR_NOMEM;
        }
        t->client = c;
    }
    /* the method is ours (GET, POST...), never input: a longer one is a bug */
    if (!method || strlen(method) >= sizeof t->method || !path) {
        transfer_destroy(t);
        return IW_ERR_INVALID;
    }
    memcpy(t->method, method, strlen(method) + 1);
    t->path = strdup(path);
    t->req_body = body ? malloc(body_len + 1) : NULL;
    if (t->req_body) {
        memcpy(t->req_body, body, body_len);
        t->req_body[body_len] = '\0';
    }
    t->req_len = body ? body_len : 0;
    t->idem_key = idempotency_key ? strdup(idempotency_key) : NULL;
    if (!t->path || (body && !t->req_body) || (idempotency_key && !t->idem_key)) {
        transfer_destroy(t);
        return IW_ERR_NOMEM;
    }
    t->cb = cb;
    t->ud = ud;
    t->token_retried = 0;
    t->start_us = clock_mono_us();
    rc = launch(c, t);
    if (rc != IW_OK) {
        transfer_destroy(t);
        return rc;
    }
    c->in_flight++;
    t->prev = NULL;
    t->next = c->active;
    if (c->active)
        c->active->prev = t;
    c->active = t;
    return IW_OK;
}

static iw_transport transport_of(CURLcode code, int too_large)
{
    if (code == CURLE_OK)
        return IW_TRANSPORT_OK;
    if (too_large)
        return IW_TRANSPORT_TOO_LARGE;
    switch (code) {
    case CURLE_OPERATION_TIMEDOUT:
        return IW_TRANSPORT_TIMEOUT;
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_GOT_NOTHING:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:
        return IW_TRANSPORT_CONNECT;
    default:
        return IW_TRANSPORT_OTHER;
    }
}

static void recycle(http_client *c, transfer *t)
{
    if (t->prev)
        t->prev->next = t->next;
    else
        c->active = t->next;
    if (t->next)
        t->next->prev = t->prev;
    free(t->path);
    free(t->req_body);
    free(t->idem_key);
    t->path = t->req_body = t->idem_key = NULL;
    t->next_free = c->free_list;
    c->free_list = t;
}

/* Completes the transfers curl has finished: each one's callback, once. */
static void complete_done(http_client *c)
{
    int left;
    CURLMsg *m;

    while ((m = curl_multi_info_read(c->multi, &left))) {
        transfer *t;
        http_response r;
        long status = 0;

        if (m->msg != CURLMSG_DONE)
            continue;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&t);
        CURLcode code = m->data.result;
        curl_multi_remove_handle(c->multi, t->easy);
        if (code == CURLE_OK)
            curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
        if (status == 401 && c->auth_mode == IW_AUTH_OAUTH2 && !t->token_retried) {
            /* the token expired or was revoked early: renew once, same call */
            t->token_retried = 1;
            free(c->bearer);
            c->bearer = NULL;
            if (launch(c, t) == IW_OK)
                continue;
        }
        memset(&r, 0, sizeof r);
        r.result.status = code == CURLE_OK ? status : 0;
        r.result.transport = transport_of(code, t->too_large);
        /* bounded parses, capped at IW_MAX_RATE_PAUSE; an unreadable reset
         * falls back to Retry-After */
        r.result.retry_after_ms = -1;
        if (t->reset_ms[0])
            r.result.retry_after_ms =
                retry_parse_reset_ms(t->reset_ms, c->max_wait_ms, &r.result.wait_capped);
        if (r.result.retry_after_ms < 0 && t->retry_after[0])
            r.result.retry_after_ms = retry_parse_retry_after(
                t->retry_after, clock_wall_ms(), c->max_wait_ms, &r.result.wait_capped);
        r.error = code == CURLE_OK ? "" : curl_easy_strerror(code);
        r.body = t->body && t->len ? t->body : "";
        r.body_len = t->len;
        r.duration_us = clock_mono_us() - t->start_us;
        c->in_flight--;
        t->cb(t->ud, &r);
        recycle(c, t);
    }
}

int http_client_in_flight(const http_client *c)
{
    return c ? c->in_flight : 0;
}

/* ---- the reactor: curl's sockets and its timer in the loop ----------------------------- */

static void on_socket_event(loop *l, int fd, int events, void *ud)
{
    http_client *c = ud;
    int running, mask = (events & LOOP_READ ? CURL_CSELECT_IN : 0) |
                        (events & LOOP_WRITE ? CURL_CSELECT_OUT : 0);

    (void)l;
    curl_multi_socket_action(c->multi, fd, mask, &running);
    complete_done(c);
}

static void on_timer(loop *l, loop_timer *t)
{
    http_client *c = t->ud;
    int running;

    (void)l;
    curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    complete_done(c);
}

/* CURLMOPT_SOCKETFUNCTION: watch what curl wants watched. */
static int socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    http_client *c = userp;
    int events = what == CURL_POLL_IN      ? LOOP_READ
                 : what == CURL_POLL_OUT   ? LOOP_WRITE
                 : what == CURL_POLL_INOUT ? LOOP_READ | LOOP_WRITE
                                           : 0;

    (void)easy;
    (void)socketp;
    return loop_watch(c->lp, s, events, on_socket_event, c) == 0 || !events ? 0 : -1;
}

/* CURLMOPT_TIMERFUNCTION: one timer, re-armed or cancelled. */
static int timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    http_client *c = userp;

    (void)multi;
    if (timeout_ms < 0) {
        loop_timer_cancel(c->lp, &c->timer);
        return 0;
    }
    return loop_timer_at(c->lp, &c->timer, clock_mono_ms() + timeout_ms) == 0 ? 0 : -1;
}

int http_client_attach(http_client *c, loop *l)
{
    c->lp = l;
    loop_timer_init(&c->timer, on_timer, c);
    if (curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, socket_cb) != CURLM_OK ||
        curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c) != CURLM_OK ||
        curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, timer_cb) != CURLM_OK ||
        curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c) != CURLM_OK)
        return IW_ERR_INVALID;
    return IW_OK;
}
