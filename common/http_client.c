#include "http_client.h"

#include <ctype.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "buf.h"
#include "clock.h"
#include "config.h"
#include "loop.h"
#include "jobkey.h"

/* Token fetch backoff defaults, the store's poll while another process
 * fetches, and the lifetime assumed when expires_in is absent. */
#define TOKEN_BACKOFF_MIN_MS 1000L
#define TOKEN_BACKOFF_MAX_MS 30000L
#define TOKEN_POLL_MS 200L
#define TOKEN_DEFAULT_LIFE_MS 3600000LL
/* Longest stored value read back from N:oauth:token ("<life_ms> <token>"). */
#define TOKEN_STORED_MAX (HTTP_TOKEN_MAX + 32)

typedef struct transfer {
    http_client *client;
    CURL *easy;
    /* the request's header lines: its own (a bearer token, the token fetch's
     * form type; malloc'd), the idempotency line, then the client's shared
     * ones (http_client.hdr): curl reads them, nobody copies them per call */
    struct curl_slist *own, *own_tail;
    struct curl_slist idem_node;
    char *body;
    size_t len, cap;
    int too_large;
    char errbuf[CURL_ERROR_SIZE]; /* curl's detail (TLS alerts, certificate problems) */
    char retry_after[64];
    char reset_ms[32];
    long long start_us;
    http_done_fn cb;
    void *ud;
    /* for a transparent retry after an expired OAuth2 token */
    char method[8];
    char *req_body;
    size_t req_len;
    int token_retried;
    int is_token;            /* the POST /oauth/token of the client itself */
    int configured;          /* the handle's fixed options are set (common_opts) */
    int carried_token;       /* sent with a bearer token */
    unsigned long token_gen; /* which token it carried */
    long long wait_deadline; /* waiting for a token: fail with NO_TOKEN past it */
    char *url;               /* base + path; kept while a pooled transfer's calls share it */
    CURLU *uh;               /* url parsed for curl (set_url), when uh_ok */
    int uh_ok;
    char *idem_line;        /* "Idempotency-Key: ..." or NULL */
    char *form;             /* token fetch: the form body */
    struct transfer *wnext; /* waiting for a token / failed without one */
    long nt_wait_ms;        /* NO_TOKEN completion: the wait to report */
    const char *nt_msg;
    struct transfer *next_free;   /* free list */
    struct transfer *prev, *next; /* active list */
} transfer;

struct http_client {
    CURLM *multi;
    char *base_url;
    int auth_mode;
    char *api_key_header, *api_secret_header, *basic_user, *basic_password;
    /* the header lines every call sends, linked once: hdr_post_large
     * (Expect:) -> hdr_post (Content-Type) -> hdr_get (the API key lines in
     * api-key mode) -> hdr_common (Accept, User-Agent) */
    struct curl_slist hdr[6];
    struct curl_slist *hdr_post_large, *hdr_post, *hdr_get, *hdr_common;
    char *oauth_id, *oauth_secret;
    char *proxy, *noproxy; /* from the environment, read once (proxy_from_env) */
    char *tls_cert, *tls_key, *tls_ca;
    char *bearer;                      /* "Authorization: Bearer <token>" or NULL */
    char *stored;                      /* "<life_ms> <token>" as in N:oauth:token */
    unsigned long token_gen;           /* bumped with each new token */
    long long token_expires_ms;        /* monotonic */
    long long token_refresh_ms;        /* monotonic: fetch a new one from then on */
    transfer *token_xfer;              /* the token fetch in flight, or NULL */
    int lock_held;                     /* this process holds N:oauth:lock */
    transfer *waiting, **waiting_tail; /* calls waiting for a token, FIFO */
    transfer *nt_done, **nt_tail;      /* calls to complete with NO_TOKEN */
    long long token_next_try_ms;       /* no fetch before (backoff) */
    int token_demand; /* a caller holds calls for a token (http_client_token_wait_ms) */
    int token_failures;
    long backoff_min_ms, backoff_max_ms;
    loop_timer token_timer; /* the token's steps, always from a loop turn */
    redis_link *store;
    char *key_token, *key_lock, *key_fails;
    char owner[64];           /* this process's lock value */
    redis_script del_if_same; /* compare-and-delete: a lock or a token of ours only */
    http_token_fn on_token;
    void *on_token_ud;
    long timeout_ms, connect_timeout_ms, max_response_bytes;
    long max_wait_ms; /* IW_MAX_RATE_PAUSE: caps Retry-After / X-RateLimit-Reset-Ms */
    int in_flight;
    transfer *free_list;
    transfer *active;
    loop *lp;         /* the reactor curl's sockets and timer live in */
    loop_timer timer; /* curl's one timeout */
    /* by descriptor: 1 for the connections opened here (open_socket), whose
     * close this client hears of (close_socket); only those are parked */
    unsigned char *own;
    size_t n_own;
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
    if ((*rc = buf_cat(&b, (const char *[]){name, ": ", value, NULL})) != IW_OK) {
        buf_free(&b);
        return NULL;
    }
    return buf_steal(&b);
}

/* One Redis key of the token's, built by one function: "<ns>:oauth:<what>". */
static char *oauth_key(const char *ns, const char *what)
{
    iw_buf b;

    buf_init(&b, 1024);
    if (buf_addf(&b, "%s:oauth:%s", ns, what) != IW_OK) {
        buf_free(&b);
        return NULL;
    }
    return buf_steal(&b);
}

static void token_tick(loop *l, loop_timer *tm);
static void arm_token_timer(http_client *c, long long due_ms);

/* curl asks for "100 Continue" (and waits up to a second for it) before a
 * POST body larger than this: 1 KiB in older curl, 1 MiB in Debian 12's 7.88
 * (test_http_client sees it at 1,048,577 bytes).  An empty "Expect:" line
 * turns that off; below the smaller of the two no curl asks, so the line is
 * only linked above it: each custom line costs curl a dozen name comparisons
 * and a formatted copy per call. */
#define EXPECT_ASKED_ABOVE 1024

/* Links c->hdr (see struct http_client).  The User-Agent is a line of its
 * own rather than CURLOPT_USERAGENT, which curl formats anew for every call
 * (its printf writes a character at a time, a few hundred instructions a
 * byte), before copying it into the request once more. */
static void shared_headers(http_client *c)
{
    static char content_type[] = "Content-Type: application/json";
    static char accept[] = "Accept: application/json";
    static char expect[] = "Expect:"; /* no 100-continue round trip */
    static char user_agent[] = "User-Agent: integration-worker/1";
    char *lines[6];
    size_t n = 0, i;

    lines[n++] = expect;
    lines[n++] = content_type;
    /* the key lines only in api-key mode: another mode never sends them,
     * whatever the settings hold */
    if (c->auth_mode == IW_AUTH_API_KEY && c->api_key_header)
        lines[n++] = c->api_key_header;
    if (c->auth_mode == IW_AUTH_API_KEY && c->api_secret_header)
        lines[n++] = c->api_secret_header;
    lines[n++] = accept;
    lines[n++] = user_agent;
    for (i = 0; i < n; i++) {
        c->hdr[i].data = lines[i];
        c->hdr[i].next = i + 1 < n ? &c->hdr[i + 1] : NULL;
    }
    c->hdr_post_large = &c->hdr[0];
    c->hdr_post = &c->hdr[1];
    c->hdr_get = &c->hdr[2];
    c->hdr_common = &c->hdr[n - 2];
}

/* curl reads the proxy variables of the environment for every call (up to
 * six getenv, each a walk of the environment); they are read here once, as
 * curl reads them, and set on every handle: <scheme>_proxy (http_proxy only
 * in lower case, as curl), then all_proxy, ALL_PROXY; no_proxy, NO_PROXY.
 * An empty CURLOPT_PROXY means no proxy, an empty CURLOPT_NOPROXY none
 * excluded. */
static const char *env_set(const char *name)
{
    const char *v = getenv(name);

    return v && *v ? v : NULL; /* empty is unset, as curl_getenv has it */
}

static int proxy_from_env(http_client *c)
{
    char name[32];
    const char *v = NULL, *colon = strstr(c->base_url, "://");
    size_t n = colon ? (size_t)(colon - c->base_url) : 0;

    if (n && n < 16) {
        for (size_t i = 0; i < n; i++)
            name[i] = (char)tolower((unsigned char)c->base_url[i]);
        memcpy(name + n, "_proxy", sizeof "_proxy");
        v = env_set(name);
        if (!v && strcmp(name, "http_proxy") != 0) {
            for (size_t i = 0; i < n; i++)
                name[i] = (char)toupper((unsigned char)name[i]);
            memcpy(name + n, "_PROXY", sizeof "_PROXY");
            v = env_set(name);
        }
    }
    if (!v)
        v = env_set("all_proxy");
    if (!v)
        v = env_set("ALL_PROXY");
    c->proxy = strdup(v ? v : "");
    v = env_set("no_proxy");
    if (!v)
        v = env_set("NO_PROXY");
    c->noproxy = strdup(v ? v : "");
    return c->proxy && c->noproxy ? IW_OK : IW_ERR_NOMEM;
}

/* Drops the transfer's own header lines (the shared ones stay). */
static void own_headers_free(transfer *t)
{
    if (t->own_tail)
        t->own_tail->next = NULL;
    curl_slist_free_all(t->own);
    t->own = t->own_tail = NULL;
}

/* Adds a line of the transfer's own: IW_OK or IW_ERR_NOMEM. */
static int own_header(transfer *t, const char *line)
{
    struct curl_slist *n = curl_slist_append(NULL, line);

    if (!n)
        return IW_ERR_NOMEM;
    if (t->own_tail)
        t->own_tail->next = n;
    else
        t->own = n;
    t->own_tail = n;
    return IW_OK;
}

/* The transfer's lines, then its idempotency line, then `shared`. */
static void set_headers(transfer *t, struct curl_slist *shared)
{
    struct curl_slist *list = shared;

    if (t->idem_line) {
        t->idem_node.data = t->idem_line;
        t->idem_node.next = list;
        list = &t->idem_node;
    }
    if (t->own) {
        t->own_tail->next = list;
        list = t->own;
    }
    curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, list);
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
    c->waiting_tail = &c->waiting;
    c->nt_tail = &c->nt_done;
    loop_timer_init(&c->token_timer, token_tick, c);
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
    shared_headers(c);
    if (proxy_from_env(c) != IW_OK)
        goto nomem;
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
    c->backoff_min_ms =
        o->token_backoff_min_ms > 0 ? o->token_backoff_min_ms : TOKEN_BACKOFF_MIN_MS;
    c->backoff_max_ms =
        o->token_backoff_max_ms > 0 ? o->token_backoff_max_ms : TOKEN_BACKOFF_MAX_MS;
    if (c->backoff_max_ms < c->backoff_min_ms)
        c->backoff_max_ms = c->backoff_min_ms;
    if (o->token_store && o->auth_mode == IW_AUTH_OAUTH2) {
        const char *ns = o->ns ? o->ns : "ext-api";
        c->store = o->token_store;
        c->key_token = oauth_key(ns, "token");
        c->key_lock = oauth_key(ns, "lock");
        c->key_fails = oauth_key(ns, "fails");
        if (!c->key_token || !c->key_lock || !c->key_fails)
            goto nomem;
        /* EVALSHA of a script loaded on connect: the least-privilege Redis
         * user may not EVAL */
        c->del_if_same.source =
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
            "return 0";
        redis_link_add_script(c->store, &c->del_if_same);
    }
    snprintf(c->owner, sizeof c->owner, "%ld-%lx-%llx", (long)getpid(), (unsigned long)random(),
             (unsigned long long)clock_mono_us());
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
    curl_url_cleanup(t->uh);
    own_headers_free(t);
    free(t->body);
    free(t->req_body);
    free(t->url);
    free(t->idem_line);
    free(t->form);
    free(t);
}

static void destroy_list(transfer *t)
{
    while (t) {
        transfer *next = t->wnext;
        transfer_destroy(t);
        t = next;
    }
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
    if (c->token_xfer) {
        curl_multi_remove_handle(c->multi, c->token_xfer->easy);
        transfer_destroy(c->token_xfer);
    }
    destroy_list(c->waiting);
    destroy_list(c->nt_done);
    while (c->free_list) {
        transfer *t = c->free_list;
        c->free_list = t->next_free;
        transfer_destroy(t);
    }
    curl_multi_cleanup(c->multi);
    if (c->lp) {
        loop_timer_cancel(c->lp, &c->timer);
        loop_timer_cancel(c->lp, &c->token_timer);
    }
    free(c->own);
    free(c->base_url);
    free(c->api_key_header);
    free(c->api_secret_header);
    free(c->proxy);
    free(c->noproxy);
    free(c->basic_user);
    free(c->basic_password);
    free(c->oauth_id);
    free(c->oauth_secret);
    free(c->tls_cert);
    free(c->tls_key);
    free(c->tls_ca);
    free(c->bearer);
    free(c->stored);
    free(c->key_token);
    free(c->key_lock);
    free(c->key_fails);
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
        size_t cap = t->cap ? t->cap : 256;
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

/* ---- the OAuth2 token: parsed, checked, shared ---------------------------------------- */

int http_token_parse(const char *body, size_t len, char **token, long long *life_ms,
                     const char **problem)
{
    json_t *doc = body ? json_loadb(body, len, 0, NULL) : NULL;
    json_t *tok = json_object_get(doc, "access_token");
    json_t *ttl = json_object_get(doc, "expires_in");
    const char *s = json_string_value(tok);
    size_t n = s ? json_string_length(tok) : 0;
    int rc = IW_ERR_HTTP;

    *token = NULL;
    *life_ms = 0;
    if (!json_is_object(doc)) {
        *problem = "the token answer is not a JSON object";
        goto out;
    }
    if (!s || n == 0) {
        *problem = "the token answer has no access_token string";
        goto out;
    }
    if (n > HTTP_TOKEN_MAX) {
        *problem = "the access_token is longer than 8192 bytes";
        goto out;
    }
    /* the provider's bytes go into a header line: CR/LF would add lines of
     * their own, and a bearer token is printable ASCII (RFC 6750 b64token) */
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch < 0x21 || ch > 0x7E) {
            *problem = "the access_token holds control, space or non-ASCII bytes";
            goto out;
        }
    }
    if (ttl && !json_is_null(ttl)) {
        json_int_t v = json_is_integer(ttl) ? json_integer_value(ttl) : 0;
        if (!json_is_integer(ttl) || v <= 0 || v > HTTP_TOKEN_TTL_MAX_S) {
            *problem = "the token's expires_in is not a number of seconds from 1 to 30 days";
            goto out;
        }
        *life_ms = (long long)v * 1000;
    } else {
        *life_ms = TOKEN_DEFAULT_LIFE_MS;
    }
    if (!(*token = strndup(s, n))) {
        *problem = "out of memory";
        goto out;
    }
    *problem = "";
    rc = IW_OK;
out:
    json_decref(doc);
    return rc;
}

long long http_token_refresh_after(long long life_ms)
{
    long long at = life_ms / 10 * 8;
    long long floor_ms = life_ms - 300000;

    return at > floor_ms ? at : floor_ms;
}

/* Takes a checked token: this process sends it from now on.  `remaining_ms`
 * is how long it is still valid (its whole life when just fetched). */
static int token_take(http_client *c, const char *tok, long long life_ms, long long remaining_ms)
{
    iw_buf hb, sb;
    long long now = clock_mono_ms();
    int rc;

    buf_init(&hb, HTTP_TOKEN_MAX + 64);
    buf_init(&sb, TOKEN_STORED_MAX);
    if ((rc = buf_addf(&hb, "Authorization: Bearer %s", tok)) != IW_OK ||
        (rc = buf_addf(&sb, "%lld %s", life_ms, tok)) != IW_OK) {
        buf_free(&hb);
        buf_free(&sb);
        return rc;
    }
    free(c->bearer);
    free(c->stored);
    c->bearer = buf_steal(&hb);
    c->stored = buf_steal(&sb);
    c->token_gen++;
    /* a token stops being sent a little before it expires: a call must not
     * arrive with one that died on the way */
    c->token_expires_ms = now + remaining_ms - (remaining_ms > 10000 ? 2000 : remaining_ms / 5);
    c->token_refresh_ms = now + http_token_refresh_after(life_ms) - (life_ms - remaining_ms);
    return IW_OK;
}

static void token_drop(http_client *c)
{
    free(c->bearer);
    free(c->stored);
    c->bearer = c->stored = NULL;
    c->token_expires_ms = c->token_refresh_ms = 0;
}

int http_client_auth_ready(const http_client *c)
{
    return c->auth_mode != IW_AUTH_OAUTH2 || (c->bearer && clock_mono_ms() < c->token_expires_ms);
}

long http_client_token_wait_ms(http_client *c)
{
    long long now = clock_mono_ms();

    if (http_client_auth_ready(c))
        return 0;
    /* the caller holds calls for a token: fetch one without waiting for a call */
    c->token_demand = 1;
    if (c->token_xfer)
        return TOKEN_POLL_MS;
    if (now < c->token_next_try_ms) {
        arm_token_timer(c, c->token_next_try_ms);
        return (long)(c->token_next_try_ms - now);
    }
    arm_token_timer(c, now);
    return TOKEN_POLL_MS;
}

void http_client_on_token(http_client *c, http_token_fn fn, void *ud)
{
    c->on_token = fn;
    c->on_token_ud = ud;
}

/* The store is used only while the link is up: the client never reconnects
 * it (that is the runtime's), and a Redis outage only costs the sharing. */
static int store_up(const http_client *c)
{
    return c->store && redis_link_connected(c->store);
}

/* The reply to the command just appended (append_rc its append's status);
 * NULL on any error, which only costs the sharing. */
static redisReply *store_reply(http_client *c, int append_rc)
{
    redisReply *rep = NULL;
    iw_error err;

    if (append_rc != IW_OK || redis_link_read(c->store, &rep, &err) != IW_OK)
        return NULL;
    return rep;
}

/* Reads N:oauth:token: takes the fleet's token when it is one this process
 * does not have yet.  Returns 1 when a token fresh enough not to need a
 * refresh is now held, else 0. */
static int store_fetch(http_client *c)
{
    redisReply *val = NULL, *ttl = NULL;
    iw_error err;
    int fresh = 0;

    if (!store_up(c))
        return 0;
    if (redis_link_append(c->store, &err, "GET %s", c->key_token) != IW_OK ||
        redis_link_append(c->store, &err, "PTTL %s", c->key_token) != IW_OK) {
        redis_link_drop(c->store); /* half a pipeline: its replies cannot be matched */
        return 0;
    }
    val = store_reply(c, IW_OK);
    ttl = store_reply(c, IW_OK);
    if (val && ttl && val->type == REDIS_REPLY_STRING && ttl->type == REDIS_REPLY_INTEGER &&
        ttl->integer > 0 && val->len < TOKEN_STORED_MAX) {
        char *end;
        long long life = strtoll(val->str, &end, 10);
        const char *tok = *end == ' ' ? end + 1 : NULL;
        size_t n = tok ? val->len - (size_t)(tok - val->str) : 0;
        int ok = tok && life > 0 && life <= HTTP_TOKEN_TTL_MAX_S * 1000 && n > 0 &&
                 n <= HTTP_TOKEN_MAX && ttl->integer <= life;
        /* the store is shared: what is read back is checked like an answer */
        for (size_t i = 0; ok && i < n; i++)
            ok = tok[i] >= 0x21 && tok[i] <= 0x7E;
        if (ok && (!c->stored || strcmp(c->stored, val->str) != 0))
            ok = token_take(c, tok, life, ttl->integer) == IW_OK;
        else if (ok) /* the same token: only its clock */
            ok = 1;
        fresh = ok && c->bearer && clock_mono_ms() < c->token_refresh_ms;
    }
    freeReplyObject(val);
    freeReplyObject(ttl);
    return fresh;
}

/* Deletes key when it still holds value (EVALSHA del_if_same). */
static void store_del_if_same(http_client *c, const char *key, const char *value)
{
    const char *argv[2] = {key, value};
    iw_error err;

    if (value && store_up(c))
        freeReplyObject(
            store_reply(c, redis_link_append_script(c->store, &c->del_if_same, 1, 2, argv, &err)));
}

static void token_lock_release(http_client *c)
{
    if (c->lock_held)
        store_del_if_same(c, c->key_lock, c->owner);
    c->lock_held = 0;
}

/* Drops the stored token when it is `stored` (a 401 showed it dead): the
 * next reader fetches instead of adopting it again. */
static void store_forget(http_client *c, const char *stored)
{
    store_del_if_same(c, c->key_token, stored);
}

/* Tries to become the fleet's one fetcher.  1: go; 0: another process holds
 * the lock (*wait_ms: how long, *failing: the fleet's fetches fail).  With
 * no store every process fetches for itself. */
static int store_lock(http_client *c, long *wait_ms, int *failing)
{
    redisReply *set = NULL, *pttl = NULL, *fails = NULL;
    iw_error err;
    int go = 1;

    *wait_ms = 0;
    *failing = 0;
    if (!store_up(c))
        return 1;
    if (redis_link_append(c->store, &err, "SET %s %s NX PX %ld", c->key_lock, c->owner,
                          c->timeout_ms + 1000) != IW_OK ||
        redis_link_append(c->store, &err, "PTTL %s", c->key_lock) != IW_OK ||
        redis_link_append(c->store, &err, "GET %s", c->key_fails) != IW_OK) {
        redis_link_drop(c->store);
        return 1;
    }
    set = store_reply(c, IW_OK);
    pttl = store_reply(c, IW_OK);
    fails = store_reply(c, IW_OK);
    if (set && set->type == REDIS_REPLY_NIL) {
        go = 0;
        *wait_ms = pttl && pttl->type == REDIS_REPLY_INTEGER && pttl->integer > 0
                       ? (long)pttl->integer
                       : TOKEN_POLL_MS;
        *failing = fails && fails->type == REDIS_REPLY_STRING && atol(fails->str) > 0;
    } else if (set && set->type == REDIS_REPLY_STATUS) {
        c->lock_held = 1;
    }
    freeReplyObject(set);
    freeReplyObject(pttl);
    freeReplyObject(fails);
    return go;
}

/* A fetch failed: one more consecutive failure, fleet-wide when shared; the
 * lock is kept for the backoff so no other process fetches before it ends.
 * Returns the backoff. */
static long store_failed(http_client *c)
{
    redisReply *n = NULL;
    iw_error err;
    long failures = c->token_failures;
    long backoff;

    if (store_up(c)) {
        n = store_reply(c, redis_link_append(c->store, &err, "INCRBY %s 1", c->key_fails));
        if (n && n->type == REDIS_REPLY_INTEGER && n->integer > failures)
            failures = (long)n->integer;
        freeReplyObject(n);
        freeReplyObject(store_reply(c, redis_link_append(c->store, &err, "PEXPIRE %s %ld",
                                                         c->key_fails, c->backoff_max_ms * 4)));
    }
    backoff = c->backoff_min_ms;
    for (long i = 1; i < failures && backoff < c->backoff_max_ms; i++)
        backoff *= 2;
    if (backoff > c->backoff_max_ms)
        backoff = c->backoff_max_ms;
    if (c->lock_held && store_up(c))
        freeReplyObject(store_reply(c, redis_link_append(c->store, &err, "SET %s %s XX PX %ld",
                                                         c->key_lock, c->owner, backoff)));
    c->lock_held = 0; /* it expires with the backoff */
    return backoff;
}

static void store_succeeded(http_client *c, long long life_ms)
{
    iw_error err;

    if (store_up(c)) {
        freeReplyObject(store_reply(c, redis_link_append(c->store, &err, "SET %s %s PX %lld",
                                                         c->key_token, c->stored, life_ms)));
        freeReplyObject(store_reply(c, redis_link_append(c->store, &err, "DEL %s", c->key_fails)));
    }
    token_lock_release(c);
}

/* Builds base_url + path whole, or refuses: a cut URL is another URL. */
static int build_url(const http_client *c, const char *path, iw_buf *url)
{
    int rc = http_url_path_check(path, strlen(path));

    if (rc != IW_OK)
        return rc;
    rc = buf_cat(url, (const char *[]){c->base_url, path, NULL});
    return rc == IW_ERR_TOO_LARGE ? IW_ERR_URL_TOO_LONG : rc;
}

static curl_socket_t open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *a);
static int close_socket(void *clientp, curl_socket_t fd);

/* Hands curl the call's URL parsed (CURLOPT_CURLU) as well as its text.
 * Given the text alone, curl 7.88 parses it for every transfer and prints
 * the parsed URL back out through its printf, a character at a time: about
 * 12,000 instructions a call.  Given both, it copies the parsed URL and
 * takes the text as it is.  A pooled transfer keeps its parse while its URL
 * stays the same (every call of a route); the parse uses curl's own flags,
 * so curl sees the URL it would have made.  When that parse fails, curl gets
 * the text alone and reports the error as it always did. */
static void set_url(transfer *t)
{
    if (!t->uh_ok) {
        if (!t->uh)
            t->uh = curl_url();
        t->uh_ok =
            t->uh && curl_url_set(t->uh, CURLUPART_URL, t->url,
                                  CURLU_GUESS_SCHEME | CURLU_NON_SUPPORT_SCHEME) == CURLUE_OK;
    }
    curl_easy_setopt(t->easy, CURLOPT_URL, t->url); /* curl copies it */
    curl_easy_setopt(t->easy, CURLOPT_CURLU, t->uh_ok ? t->uh : NULL);
}

/* The options every transfer of the client shares: timeouts, TLS, capped
 * body and the headers we read. */
static void common_opts(http_client *c, transfer *t)
{
    own_headers_free(t);
    t->len = 0;
    t->too_large = 0;
    t->retry_after[0] = t->reset_ms[0] = '\0';
    t->errbuf[0] = '\0';
    if (!t->configured) {
        /* what every call of this handle shares: set once, curl keeps it
         * from one transfer to the next (a reused handle is not reset) */
        curl_easy_setopt(t->easy, CURLOPT_ERRORBUFFER, t->errbuf);
        curl_easy_setopt(t->easy, CURLOPT_PRIVATE, t);
        curl_easy_setopt(t->easy, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(t->easy, CURLOPT_TIMEOUT_MS, c->timeout_ms);
        curl_easy_setopt(t->easy, CURLOPT_CONNECTTIMEOUT_MS, c->connect_timeout_ms);
        curl_easy_setopt(t->easy, CURLOPT_TCP_KEEPALIVE, 1L);
        curl_easy_setopt(t->easy, CURLOPT_PROXY, c->proxy);
        curl_easy_setopt(t->easy, CURLOPT_NOPROXY, c->noproxy);
        curl_easy_setopt(t->easy, CURLOPT_WRITEFUNCTION, on_body);
        curl_easy_setopt(t->easy, CURLOPT_WRITEDATA, t);
        curl_easy_setopt(t->easy, CURLOPT_HEADERFUNCTION, on_header);
        curl_easy_setopt(t->easy, CURLOPT_HEADERDATA, t);
        /* the provider's answers are small (a few hundred bytes with their
         * headers): curl's smallest receive buffer, 1 KiB instead of its
         * 16 KiB, keeps thousands of calls in flight cheap; a larger
         * answer is read in more pieces, capped as before */
        curl_easy_setopt(t->easy, CURLOPT_BUFFERSIZE, 1024L);
        /* a connection's close is reported by the handle that opened it,
         * also when another handle or the pool closes it */
        curl_easy_setopt(t->easy, CURLOPT_OPENSOCKETFUNCTION, open_socket);
        curl_easy_setopt(t->easy, CURLOPT_OPENSOCKETDATA, c);
        curl_easy_setopt(t->easy, CURLOPT_CLOSESOCKETFUNCTION, close_socket);
        curl_easy_setopt(t->easy, CURLOPT_CLOSESOCKETDATA, c);
        if (c->tls_cert)
            curl_easy_setopt(t->easy, CURLOPT_SSLCERT, c->tls_cert);
        if (c->tls_key)
            curl_easy_setopt(t->easy, CURLOPT_SSLKEY, c->tls_key);
        if (c->tls_ca)
            curl_easy_setopt(t->easy, CURLOPT_CAINFO, c->tls_ca);
        if (!t->is_token && c->auth_mode == IW_AUTH_BASIC) {
            curl_easy_setopt(t->easy, CURLOPT_HTTPAUTH, CURLAUTH_BASIC);
            curl_easy_setopt(t->easy, CURLOPT_USERNAME, c->basic_user);
            curl_easy_setopt(t->easy, CURLOPT_PASSWORD, c->basic_password);
        }
        t->configured = 1;
    }
    set_url(t);
}

/* Hands a prepared call to curl, with the auth of the moment. */
static int launch(http_client *c, transfer *t)
{
    int post = strcmp(t->method, "GET") != 0;

    common_opts(c, t);
    if (post) {
        curl_easy_setopt(t->easy, CURLOPT_CUSTOMREQUEST, t->method);
        curl_easy_setopt(t->easy, CURLOPT_POSTFIELDSIZE, (long)t->req_len);
        curl_easy_setopt(t->easy, CURLOPT_POSTFIELDS, t->req_body ? t->req_body : "");
    } else { /* the handle may have POSTed last time */
        curl_easy_setopt(t->easy, CURLOPT_CUSTOMREQUEST, NULL);
        curl_easy_setopt(t->easy, CURLOPT_HTTPGET, 1L);
    }
    t->carried_token = 0;
    switch (c->auth_mode) {
    case IW_AUTH_API_KEY: /* the shared lines (shared_headers) */
        break;
    case IW_AUTH_BASIC: /* set with the handle (common_opts) */
        break;
    case IW_AUTH_OAUTH2:
        /* only ever called with a token: a call without one waits for it */
        if (own_header(t, c->bearer) != IW_OK)
            return IW_ERR_NOMEM;
        t->carried_token = 1;
        t->token_gen = c->token_gen;
        break;
    default:
        break;
    }
    set_headers(t, !post                             ? c->hdr_get
                   : t->req_len > EXPECT_ASKED_ABOVE ? c->hdr_post_large
                                                     : c->hdr_post);
    if (curl_multi_add_handle(c->multi, t->easy) != CURLM_OK)
        return IW_ERR_HTTP;
    t->prev = NULL;
    t->next = c->active;
    if (c->active)
        c->active->prev = t;
    c->active = t;
    return IW_OK;
}

static void arm_token_timer(http_client *c, long long due_ms)
{
    if (!c->lp)
        return;
    if (loop_timer_armed(&c->token_timer) && c->token_timer.due_ms <= due_ms)
        return;
    loop_timer_at(c->lp, &c->token_timer, due_ms);
}

/* Queues t to complete with NO_TOKEN from the next loop turn (never from
 * inside http_client_start). */
static void fail_no_token(http_client *c, transfer *t, long wait_ms, const char *msg)
{
    t->nt_wait_ms = wait_ms;
    t->nt_msg = msg;
    t->wnext = NULL;
    *c->nt_tail = t;
    c->nt_tail = &t->wnext;
    arm_token_timer(c, clock_mono_ms());
}

static void fail_waiting(http_client *c, long wait_ms, const char *msg)
{
    transfer *t = c->waiting;

    c->waiting = NULL;
    c->waiting_tail = &c->waiting;
    while (t) {
        transfer *next = t->wnext;
        fail_no_token(c, t, wait_ms, msg);
        t = next;
    }
}

static void complete_local(http_client *c, transfer *t, iw_transport tr, long wait_ms,
                           const char *msg);

/* A token is held: every waiting call goes out with it. */
static void send_waiting(http_client *c)
{
    transfer *t = c->waiting;

    c->waiting = NULL;
    c->waiting_tail = &c->waiting;
    while (t) {
        transfer *next = t->wnext;
        t->wnext = NULL;
        if (launch(c, t) != IW_OK)
            complete_local(c, t, IW_TRANSPORT_OTHER, -1, "could not start the transfer");
        t = next;
    }
}

static void token_fetch_done(http_client *c, transfer *t, CURLcode code);

/* Starts POST /oauth/token on the multi handle. */
static int token_fetch_start(http_client *c)
{
    transfer *t = calloc(1, sizeof *t);
    char *id = NULL, *secret = NULL;
    iw_buf url, fb;
    int rc = IW_ERR_NOMEM;

    buf_init(&url, HTTP_URL_MAX);
    buf_init(&fb, HTTP_URL_MAX);
    if (!t || !(t->easy = curl_easy_init()))
        goto out;
    t->client = c;
    t->is_token = 1;
    id = curl_easy_escape(t->easy, c->oauth_id ? c->oauth_id : "", 0);
    secret = curl_easy_escape(t->easy, c->oauth_secret ? c->oauth_secret : "", 0);
    if (!id || !secret ||
        buf_addf(&fb, "grant_type=client_credentials&client_id=%s&client_secret=%s", id, secret) !=
            IW_OK ||
        buf_addf(&url, "%s/oauth/token", c->base_url) != IW_OK)
        goto out;
    t->form = buf_steal(&fb);
    t->url = buf_steal(&url);
    if (!t->form || !t->url)
        goto out;
    common_opts(c, t);
    if (own_header(t, "Content-Type: application/x-www-form-urlencoded") != IW_OK ||
        (strlen(t->form) > EXPECT_ASKED_ABOVE && own_header(t, "Expect:") != IW_OK))
        goto out;
    curl_easy_setopt(t->easy, CURLOPT_POSTFIELDS, t->form);
    set_headers(t, c->hdr_common);
    t->start_us = clock_mono_us();
    rc = curl_multi_add_handle(c->multi, t->easy) == CURLM_OK ? IW_OK : IW_ERR_HTTP;
out:
    buf_free(&url);
    buf_free(&fb);
    curl_free(id);
    curl_free(secret);
    if (rc == IW_OK) {
        c->token_xfer = t;
    } else if (t) {
        if (t->easy)
            transfer_destroy(t);
        else
            free(t);
    }
    return rc;
}

/* What the waiting calls need: the fleet's token, or a fetch of our own, or
 * (in a backoff, or while another process fetches) a wait.  Runs only from
 * a loop turn: it may use the Redis link. */
static void token_obtain(http_client *c, long long now)
{
    long wait_ms;
    int failing;

    if (c->token_xfer)
        return; /* its end serves the waiting calls */
    if (store_fetch(c)) {
        send_waiting(c);
        return;
    }
    if (c->bearer && now < c->token_expires_ms)
        send_waiting(c); /* still valid; a refresh is due (below) */
    if (now < c->token_next_try_ms) {
        fail_waiting(c, (long)(c->token_next_try_ms - now),
                     "no OAuth token: the token endpoint is failing (backoff)");
        if (c->token_demand)
            arm_token_timer(c, c->token_next_try_ms);
        return;
    }
    if (!store_lock(c, &wait_ms, &failing)) {
        if (failing) {
            /* another process's fetches fail: its backoff is ours */
            c->token_next_try_ms = now + wait_ms;
            fail_waiting(c, wait_ms, "no OAuth token: the token endpoint is failing (backoff)");
            if (c->token_demand)
                arm_token_timer(c, c->token_next_try_ms);
        } else if (c->waiting || c->token_demand) {
            /* another process is fetching: read the store again soon */
            arm_token_timer(c, now + TOKEN_POLL_MS);
        }
        return;
    }
    /* The lock is ours, but the fetcher before us may have finished between
     * our read of the store and our lock: it stores its token, then unlocks.
     * Read again: what it stored is there now, and is taken instead of
     * fetching a second token. */
    if (c->lock_held && store_fetch(c)) {
        token_lock_release(c);
        send_waiting(c);
        return;
    }
    if (token_fetch_start(c) != IW_OK) {
        token_lock_release(c);
        c->token_next_try_ms = now + c->backoff_min_ms;
        fail_waiting(c, c->backoff_min_ms, "no OAuth token: the token request could not start");
    }
}

/* The token's steps, from a loop turn: NO_TOKEN completions, the fleet's
 * token, a fetch, the deadlines of waiting calls. */
static void token_tick(loop *l, loop_timer *tm)
{
    http_client *c = tm->ud;
    long long now = clock_mono_ms();
    transfer *t, **pp;

    (void)l;
    if (c->token_demand && http_client_auth_ready(c))
        c->token_demand = 0;
    if (c->auth_mode == IW_AUTH_OAUTH2 && !c->token_xfer &&
        (c->waiting || c->token_demand || (c->bearer && now >= c->token_refresh_ms)))
        token_obtain(c, now);
    /* calls that waited their whole timeout for another process's fetch */
    for (pp = &c->waiting; (t = *pp);) {
        if (now >= t->wait_deadline && !c->token_xfer) {
            *pp = t->wnext;
            fail_no_token(c, t, IW_NO_TOKEN_WAIT_MS, "no OAuth token: none arrived in time");
        } else {
            pp = &t->wnext;
        }
    }
    c->waiting_tail = pp;
    if (c->waiting && !c->token_xfer)
        arm_token_timer(c, now + TOKEN_POLL_MS);
    t = c->nt_done;
    c->nt_done = NULL;
    c->nt_tail = &c->nt_done;
    while (t) {
        transfer *next = t->wnext;
        complete_local(c, t, IW_TRANSPORT_NO_TOKEN, t->nt_wait_ms, t->nt_msg);
        t = next;
    }
}

/* Queues t for a token and makes sure one is on its way. */
static void wait_for_token(http_client *c, transfer *t)
{
    t->wnext = NULL;
    t->wait_deadline = clock_mono_ms() + c->timeout_ms;
    *c->waiting_tail = t;
    c->waiting_tail = &t->wnext;
    arm_token_timer(c, clock_mono_ms());
}

int http_client_start(http_client *c, const char *method, const char *path, const char *body,
                      size_t body_len, const char *idempotency_key, http_done_fn cb, void *ud)
{
    transfer *t = c->free_list;
    char mem[512];
    iw_buf url;
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
    t->req_body = body ? malloc(body_len + 1) : NULL;
    if (t->req_body) {
        memcpy(t->req_body, body, body_len);
        t->req_body[body_len] = '\0';
    }
    t->req_len = body ? body_len : 0;
    if (body && !t->req_body) {
        transfer_destroy(t);
        return IW_ERR_NOMEM;
    }
    /* everything that can refuse the call is decided here, before any wait */
    /* built on the stack; a pooled transfer keeps its URL, and curl's parse
     * of it, while its calls go to the same one (every call of a route) */
    buf_init_on(&url, mem, sizeof mem, HTTP_URL_MAX);
    if ((rc = build_url(c, path, &url)) == IW_OK && (!t->url || strcmp(t->url, buf_ptr(&url)))) {
        free(t->url);
        t->uh_ok = 0;
        if (!(t->url = strdup(buf_ptr(&url))))
            rc = IW_ERR_NOMEM;
    }
    buf_free(&url);
    if (rc != IW_OK) {
        transfer_destroy(t);
        return rc;
    }
    if (idempotency_key) {
        char key[JOBKEY_SIZE];
        /* the jobKey, never the raw jobId: CR/LF or non-ASCII bytes of a jobId
         * become its SHA-256, and the line is checked once more before use */
        if ((rc = jobkey(idempotency_key, strlen(idempotency_key), key)) != IW_OK ||
            !(t->idem_line = header_line("Idempotency-Key", key, &rc))) {
            transfer_destroy(t);
            return rc != IW_OK ? rc : IW_ERR_NOMEM;
        }
    }
    t->cb = cb;
    t->ud = ud;
    t->token_retried = 0;
    t->start_us = clock_mono_us();
    if (c->auth_mode == IW_AUTH_OAUTH2 && !http_client_auth_ready(c)) {
        wait_for_token(c, t);
    } else {
        if ((rc = launch(c, t)) != IW_OK) {
            transfer_destroy(t);
            return rc;
        }
        /* past 80% of the token's life: a new one is fetched in the
         * background while this one still serves */
        if (c->auth_mode == IW_AUTH_OAUTH2 && clock_mono_ms() >= c->token_refresh_ms &&
            !c->token_xfer)
            arm_token_timer(c, clock_mono_ms());
    }
    c->in_flight++;
    return IW_OK;
}

static void unlink_active(http_client *c, transfer *t)
{
    if (t->prev)
        t->prev->next = t->next;
    else if (c->active == t)
        c->active = t->next;
    if (t->next)
        t->next->prev = t->prev;
    t->prev = t->next = NULL;
}

static void to_free_list(http_client *c, transfer *t)
{
    free(t->req_body);
    free(t->idem_line);
    t->req_body = t->idem_line = NULL; /* the URL stays: the next call may share it */
    t->next_free = c->free_list;
    c->free_list = t;
}

/* Completes a call that never reached curl (or could not go back to it). */
static void complete_local(http_client *c, transfer *t, iw_transport tr, long wait_ms,
                           const char *msg)
{
    http_response r;

    memset(&r, 0, sizeof r);
    r.result.transport = tr;
    r.result.retry_after_ms = wait_ms;
    r.error = msg;
    r.body = "";
    r.duration_us = clock_mono_us() - t->start_us;
    c->in_flight--;
    t->cb(t->ud, &r);
    to_free_list(c, t);
}

/* The end of POST /oauth/token: a checked token taken and shared, or one
 * more failure and its backoff; either way the waiting calls learn of it. */
static void token_fetch_done(http_client *c, transfer *t, CURLcode code)
{
    http_token_event ev;
    long status = 0;
    char *tok = NULL;
    long long life = 0;
    const char *problem = "";
    int was_failing = c->token_failures > 0;

    memset(&ev, 0, sizeof ev);
    if (code == CURLE_OK)
        curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
    ev.result.status = code == CURLE_OK ? status : 0;
    ev.result.transport = transport_of(code, t->too_large);
    ev.result.retry_after_ms = -1;
    ev.duration_us = clock_mono_us() - t->start_us;
    if (code != CURLE_OK)
        problem = t->errbuf[0] ? t->errbuf : curl_easy_strerror(code); /* curl's text only */
    else if (status != 200)
        problem = status == 400 || status == 401 || status == 403
                      ? "the token endpoint refused the client credentials "
                        "(IW_OAUTH_CLIENT_ID / IW_OAUTH_CLIENT_SECRET)"
                      : "the token endpoint did not answer 200";
    else if (http_token_parse(t->body, t->len, &tok, &life, &problem) == IW_OK &&
             token_take(c, tok, life, life) != IW_OK)
        problem = "out of memory";
    ev.ok = !problem[0];
    ev.problem = problem;
    if (ev.ok) {
        ev.recovered = was_failing;
        c->token_failures = 0;
        c->token_next_try_ms = 0;
        store_succeeded(c, life);
    } else {
        c->token_failures++;
        ev.next_try_ms = store_failed(c);
        ev.failures = c->token_failures;
        ev.outage_started = !was_failing;
        c->token_next_try_ms = clock_mono_ms() + ev.next_try_ms;
        /* a refused answer leaves no usable token: drop it only when it is dead */
        if (c->bearer && clock_mono_ms() >= c->token_expires_ms)
            token_drop(c);
    }
    free(tok);
    curl_multi_remove_handle(c->multi, t->easy);
    c->token_xfer = NULL;
    if (c->on_token)
        c->on_token(c->on_token_ud, &ev);
    transfer_destroy(t); /* after the event: ev.problem may be its error text */
    if (ev.ok)
        send_waiting(c);
    else if (c->bearer && clock_mono_ms() < c->token_expires_ms)
        send_waiting(c); /* a failed early refresh: the old token still serves */
    else
        fail_waiting(c, ev.next_try_ms, "no OAuth token: the token endpoint is failing");
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
        if (t->is_token) {
            token_fetch_done(c, t, code);
            continue;
        }
        curl_multi_remove_handle(c->multi, t->easy);
        unlink_active(c, t);
        if (code == CURLE_OK)
            curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
        int refused = 0;
        if (status == 401 && t->carried_token && !t->token_retried) {
            /* the token expired or was revoked early: it is dropped and a new
             * one fetched; the caller retries the call once, under a permit
             * of its own (a newer token than the one sent is simply used) */
            t->token_retried = 1;
            if (t->token_gen == c->token_gen) {
                store_forget(c, c->stored);
                token_drop(c);
            }
            (void)http_client_token_wait_ms(c); /* starts the fetch */
            refused = 1;
        }
        memset(&r, 0, sizeof r);
        r.result.token_refused = refused;
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
        /* curl's detail says which certificate or alert, never our secrets
         * (a key's path at most) */
        r.error = code == CURLE_OK ? "" : t->errbuf[0] ? t->errbuf : curl_easy_strerror(code);
        r.body = t->body && t->len ? t->body : "";
        r.body_len = t->len;
        r.duration_us = clock_mono_us() - t->start_us;
        c->in_flight--;
        t->cb(t->ud, &r);
        to_free_list(c, t);
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

/* An idle keep-alive connection became readable: the provider closed it (or
 * sent what no request asked for).  It leaves the set; curl finds it dead
 * when it next looks at it. */
static void on_parked_event(loop *l, int fd, int events, void *ud)
{
    (void)events;
    (void)ud;
    loop_watch(l, fd, 0, NULL, NULL);
}

static int own_socket(const http_client *c, curl_socket_t s)
{
    return s >= 0 && (size_t)s < c->n_own && c->own[s];
}

/* CURLMOPT_SOCKETFUNCTION: watch what curl wants watched.  A connection of
 * ours that goes idle (its answer read, kept alive) stays in the epoll set,
 * parked: the next call on it takes it back without a system call, instead
 * of a remove and an add per call. */
static int socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    http_client *c = userp;
    int events = what == CURL_POLL_IN      ? LOOP_READ
                 : what == CURL_POLL_OUT   ? LOOP_WRITE
                 : what == CURL_POLL_INOUT ? LOOP_READ | LOOP_WRITE
                                           : 0;

    (void)easy;
    (void)socketp;
    if (!events && own_socket(c, s) && loop_watched(c->lp, s) == LOOP_READ)
        return loop_park(c->lp, s, on_parked_event, c) == 0 ? 0 : -1;
    return loop_watch(c->lp, s, events, on_socket_event, c) == 0 || !events ? 0 : -1;
}

/* CURLOPT_OPENSOCKETFUNCTION: the provider's connections, marked as ours. */
static curl_socket_t open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *a)
{
    http_client *c = clientp;
    int fd;

    (void)purpose;
    fd = socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
    if (fd < 0)
        return CURL_SOCKET_BAD;
    if ((size_t)fd >= c->n_own) {
        size_t n = (size_t)fd * 2 + 16;
        unsigned char *own = realloc(c->own, n);
        if (!own) {
            close(fd);
            return CURL_SOCKET_BAD;
        }
        memset(own + c->n_own, 0, n - c->n_own);
        c->own = own;
        c->n_own = n;
    }
    c->own[fd] = 1;
    return fd;
}

/* CURLOPT_CLOSESOCKETFUNCTION: a parked connection leaves the loop's table
 * before its number can be reused. */
static int close_socket(void *clientp, curl_socket_t fd)
{
    http_client *c = clientp;

    if (own_socket(c, fd))
        c->own[fd] = 0;
    if (c->lp)
        loop_forget(c->lp, fd);
    return close(fd);
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
