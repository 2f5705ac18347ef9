/* The HTTP client against a capturing server on loopback (raw sockets, so the
 * test sees the exact bytes curl sends): Idempotency-Key is the jobKey, a
 * jobId with CR/LF never adds a header line, header values with control bytes
 * and URLs past HTTP_URL_MAX are refused with no request, long CJK paths go
 * out whole, and a provider token with CR/LF is never sent. */
#include <arpa/inet.h>
#include <check.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "buf.h"
#include "config.h"
#include "clock.h"
#include "http_client.h"
#include "jobkey.h"

#define MAX_REQ 16

typedef struct capture {
    int fd, port;
    pthread_mutex_t lock;
    int n;
    char *heads[MAX_REQ]; /* request line + headers of each request */
    const char *token;    /* access_token answered at /oauth/token */
    int token_status;     /* 0: 200; else /oauth/token answers this status */
    int api_401s;         /* this many API calls answer 401 first */
} capture;

static capture cap;

static void *capture_main(void *ud)
{
    capture *c = ud;
    for (;;) {
        int conn = accept(c->fd, NULL, NULL);
        char *buf = calloc(1, 65536);
        size_t len = 0;
        char *hend = NULL;
        if (conn < 0)
            return NULL;
        while (len < 65535 && !(hend = strstr(buf, "\r\n\r\n"))) {
            ssize_t r = read(conn, buf + len, 65535 - len);
            if (r <= 0)
                break;
            len += (size_t)r;
            buf[len] = '\0';
        }
        if (!hend) /* one read may have filled the buffer */
            hend = strstr(buf, "\r\n\r\n");
        if (!hend) {
            free(buf);
            close(conn);
            continue;
        }
        size_t head = (size_t)(hend + 4 - buf), clen = 0;
        const char *cl = strcasestr(buf, "\r\nContent-Length:");
        if (cl)
            clen = strtoul(cl + 17, NULL, 10);
        while (len < head + clen && len < 65535) {
            ssize_t r = read(conn, buf + len, 65535 - len);
            if (r <= 0)
                break;
            len += (size_t)r;
        }
        for (size_t rest = len < head + clen ? head + clen - len : 0; rest > 0;) {
            char sink[65536]; /* a larger body is read and dropped */
            ssize_t r = read(conn, sink, rest < sizeof sink ? rest : sizeof sink);
            if (r <= 0)
                break;
            rest -= (size_t)r;
        }
        pthread_mutex_lock(&c->lock);
        if (c->n < MAX_REQ)
            c->heads[c->n++] = strndup(buf, head);
        pthread_mutex_unlock(&c->lock);
        iw_buf body, resp;
        buf_init(&body, 4096);
        buf_init(&resp, 8192);
        int status = 200;
        pthread_mutex_lock(&c->lock);
        if (strncmp(buf, "POST /oauth/token", 17) == 0 && c->token_status)
            status = c->token_status;
        else if (strncmp(buf, "POST /oauth/token", 17) != 0 && c->api_401s > 0) {
            c->api_401s--;
            status = 401;
        }
        pthread_mutex_unlock(&c->lock);
        if (strncmp(buf, "POST /oauth/token", 17) == 0)
            ck_assert_int_eq(buf_addf(&body, "{\"access_token\":\"%s\",\"expires_in\":3600}",
                                      c->token ? c->token : "tok"),
                             IW_OK);
        else
            ck_assert_int_eq(buf_adds(&body, "{\"ok\":true}"), IW_OK);
        ck_assert_int_eq(buf_addf(&resp,
                                  "HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                                  "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                                  status, buf_len(&body), buf_ptr(&body)),
                         IW_OK);
        (void)!write(conn, buf_ptr(&resp), buf_len(&resp));
        buf_free(&body);
        buf_free(&resp);
        free(buf);
        close(conn);
    }
}

static void capture_start(void)
{
    struct sockaddr_in a;
    socklen_t alen = sizeof a;
    pthread_t th;

    memset(&cap, 0, sizeof cap);
    pthread_mutex_init(&cap.lock, NULL);
    cap.fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(cap.fd, 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(cap.fd, (struct sockaddr *)&a, sizeof a), 0);
    ck_assert_int_eq(listen(cap.fd, 16), 0);
    ck_assert_int_eq(getsockname(cap.fd, (struct sockaddr *)&a, &alen), 0);
    cap.port = ntohs(a.sin_port);
    ck_assert_int_eq(pthread_create(&th, NULL, capture_main, &cap), 0);
    pthread_detach(th);
}

static int n_captured(void)
{
    pthread_mutex_lock(&cap.lock);
    int n = cap.n;
    pthread_mutex_unlock(&cap.lock);
    return n;
}

static loop *lp; /* the reactor the client puts its sockets in */

static http_client *client(int auth_mode, const char *api_key, iw_error *err)
{
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", cap.port);
    http_client_opts o = {.base_url = url,
                          .auth_mode = auth_mode,
                          .api_key = api_key,
                          .api_secret = "secret",
                          .oauth_client_id = "id",
                          .oauth_client_secret = "sec",
                          .timeout_ms = 5000,
                          .connect_timeout_ms = 2000,
                          .max_response_bytes = 65536,
                          .max_connections = 4};
    http_client *c = http_client_new(&o, err);
    if (c) {
        if (!lp)
            lp = loop_new();
        ck_assert_ptr_nonnull(lp);
        ck_assert_int_eq(http_client_attach(c, lp), IW_OK);
    }
    return c;
}

static int done;
static long last_status;
static int last_refused;
static iw_transport last_transport;
static long last_wait;
static char last_error[256];
static void on_done(void *ud, const http_response *r)
{
    (void)ud;
    done++;
    snprintf(last_error, sizeof last_error, "%s", r->error);
    last_status = r->result.status;
    last_refused = r->result.token_refused;
    last_transport = r->result.transport;
    last_wait = r->result.retry_after_ms;
}

/* Runs one call to completion; returns the start code. */
static int call_as(http_client *c, const char *method, const char *path, const char *idem)
{
    int before = done;
    int post = strcmp(method, "GET") != 0;
    int rc =
        http_client_start(c, method, path, post ? "{}" : NULL, post ? 2 : 0, idem, on_done, NULL);
    if (rc != IW_OK)
        return rc;
    for (int i = 0; i < 500 && done == before; i++) {
        loop_turn(lp, 20);
    }
    ck_assert_int_eq(done, before + 1);
    return rc;
}

static int call(http_client *c, const char *path, const char *idem)
{
    return call_as(c, "POST", path, idem);
}

/* Counts the header lines of a captured request named name. */
static int count_headers(const char *head, const char *name)
{
    int n = 0;
    size_t len = strlen(name);
    for (const char *p = strstr(head, "\r\n"); p; p = strstr(p + 2, "\r\n"))
        if (strncasecmp(p + 2, name, len) == 0 && p[2 + len] == ':')
            n++;
    return n;
}

static const char *header_value(const char *head, const char *name, char *out, size_t cap_len)
{
    size_t len = strlen(name);
    for (const char *p = strstr(head, "\r\n"); p; p = strstr(p + 2, "\r\n")) {
        if (strncasecmp(p + 2, name, len) == 0 && p[2 + len] == ':') {
            const char *v = p + 3 + len;
            while (*v == ' ')
                v++;
            size_t n = strcspn(v, "\r\n");
            ck_assert_uint_lt(n, cap_len);
            memcpy(out, v, n);
            out[n] = '\0';
            return out;
        }
    }
    return NULL;
}

START_TEST(idempotency_key_is_jobkey)
{
    iw_error err;
    char v[512];
    capture_start();
    http_client *c = client(IW_AUTH_API_KEY, "key", &err);
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(call(c, "/api/v1/external-resource", "j-1"), IW_OK);
    ck_assert_int_eq(n_captured(), 1);
    ck_assert_str_eq(header_value(cap.heads[0], "Idempotency-Key", v, sizeof v), "j-1");
    ck_assert_str_eq(header_value(cap.heads[0], "X-API-Key", v, sizeof v), "key");
    http_client_free(c);
    loop_free(lp);
    lp = NULL;
}
END_TEST

/* The lines every call sends, each once, whichever call of the handle it is
 * (the constant lines are linked once per client, the idempotency line is
 * the call's own): a GET after a POST carries no Content-Type. */
START_TEST(header_lines_each_once)
{
    static const char *const once[] = {
        "Host",   "Content-Type", "X-API-Key",       "X-API-Secret",
        "Accept", "User-Agent",   "Idempotency-Key", "Content-Length"};
    iw_error err;
    char v[512];
    capture_start();
    http_client *c = client(IW_AUTH_API_KEY, "key", &err);
    ck_assert_ptr_nonnull(c);
    for (int i = 0; i < 3; i++) {
        char id[16];
        snprintf(id, sizeof id, "j-%d", i);
        ck_assert_int_eq(call(c, "/api/v1/external-resource", id), IW_OK);
        ck_assert_int_eq(n_captured(), i + 1);
        for (size_t k = 0; k < sizeof once / sizeof once[0]; k++)
            ck_assert_msg(count_headers(cap.heads[i], once[k]) == 1, "%s in %s", once[k],
                          cap.heads[i]);
        ck_assert_int_eq(count_headers(cap.heads[i], "Expect"), 0);
        ck_assert_str_eq(header_value(cap.heads[i], "Idempotency-Key", v, sizeof v), id);
        ck_assert_str_eq(header_value(cap.heads[i], "Accept", v, sizeof v), "application/json");
        ck_assert_str_eq(header_value(cap.heads[i], "User-Agent", v, sizeof v),
                         "integration-worker/1");
    }
    ck_assert_int_eq(call_as(c, "GET", "/api/v1/status/t-1", NULL), IW_OK);
    ck_assert_int_eq(n_captured(), 4);
    ck_assert_int_eq(count_headers(cap.heads[3], "Content-Type"), 0);
    ck_assert_int_eq(count_headers(cap.heads[3], "Idempotency-Key"), 0);
    ck_assert_int_eq(count_headers(cap.heads[3], "X-API-Key"), 1);
    ck_assert_int_eq(count_headers(cap.heads[3], "User-Agent"), 1);
    http_client_free(c);
    loop_free(lp);
    lp = NULL;
}
END_TEST

/* curl asks a server for "100 Continue" before a POST body above a size (1
 * KiB in older curl, 1 MiB in 7.88) and waits up to a second for it; the
 * client turns that off, for bodies of every size.  The capture server never
 * answers 100, so a request that asked would carry the line and be late. */
START_TEST(no_100_continue_at_any_size)
{
    static const size_t sizes[] = {2, 1023, 1024, 1025, 70000, 1048576, 1048577, 3 << 20};
    iw_error err;
    capture_start();
    http_client *c = client(IW_AUTH_API_KEY, "key", &err);
    ck_assert_ptr_nonnull(c);
    char *body = malloc(3 << 20);
    ck_assert_ptr_nonnull(body);
    memset(body, ' ', 3 << 20);
    body[0] = '{';
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        int before = done;
        body[sizes[i] - 1] = '}';
        long long t0 = clock_mono_us();
        ck_assert_int_eq(http_client_start(c, "POST", "/api/v1/external-resource", body, sizes[i],
                                           "j-1", on_done, NULL),
                         IW_OK);
        for (int k = 0; k < 500 && done == before; k++)
            loop_turn(lp, 20);
        long long took_ms = (clock_mono_us() - t0) / 1000;
        body[sizes[i] - 1] = ' ';
        ck_assert_int_eq(done, before + 1);
        ck_assert_msg(last_status == 200, "call %zu, %zu bytes: status %ld, transport %d %s", i,
                      sizes[i], last_status, (int)last_transport, last_error);
        ck_assert_int_eq(n_captured(), (int)i + 1);
        ck_assert_msg(count_headers(cap.heads[i], "Expect") == 0, "%zu bytes: %s", sizes[i],
                      cap.heads[i]);
        ck_assert_msg(took_ms < 900, "%zu bytes took %lld ms", sizes[i], took_ms);
    }
    free(body);
    http_client_free(c);
    loop_free(lp);
    lp = NULL;
}
END_TEST

/* A pooled transfer keeps the URL it parsed for curl while its calls keep
 * their path, and parses anew when the path changes: each request line names
 * the call's own path, in every order of repeats and changes. */
START_TEST(each_call_asks_for_its_own_path)
{
    static const char *const paths[] = {"/api/v1/external-resource", "/api/v1/status/t-1",
                                        "/api/v1/status/t-2",        "/api/v1/external-resource",
                                        "/api/v1/external-resource", "/api/v1/status/t-1"};
    iw_error err;
    capture_start();
    http_client *c = client(IW_AUTH_API_KEY, "key", &err);
    ck_assert_ptr_nonnull(c);
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        char line[128];
        int post = strcmp(paths[i], "/api/v1/external-resource") == 0;
        ck_assert_int_eq(call_as(c, post ? "POST" : "GET", paths[i], post ? "j-1" : NULL), IW_OK);
        ck_assert_int_eq(n_captured(), (int)i + 1);
        snprintf(line, sizeof line, "%s %s HTTP/1.1\r\n", post ? "POST" : "GET", paths[i]);
        ck_assert_msg(strncmp(cap.heads[i], line, strlen(line)) == 0, "%s: %s", paths[i],
                      cap.heads[i]);
    }
    http_client_free(c);
    loop_free(lp);
    lp = NULL;
}
END_TEST

/* The proxy variables are read when the client is made, as curl reads them:
 * http_proxy sends the call through the proxy (here the capturing server,
 * which sees the absolute URL); no_proxy exempts the host. */
START_TEST(proxy_from_environment)
{
    iw_error err;
    char proxy[64];
    capture_start();
    snprintf(proxy, sizeof proxy, "http://127.0.0.1:%d", cap.port);
    http_client_opts o = {.base_url = "http://provider.invalid:9",
                          .auth_mode = IW_AUTH_NONE,
                          .timeout_ms = 5000,
                          .connect_timeout_ms = 2000,
                          .max_response_bytes = 65536,
                          .max_connections = 4};
    setenv("http_proxy", proxy, 1);
    unsetenv("no_proxy");
    unsetenv("NO_PROXY");
    http_client *c = http_client_new(&o, &err);
    setenv("no_proxy", "provider.invalid", 1);
    http_client *direct = http_client_new(&o, &err);
    unsetenv("http_proxy");
    unsetenv("no_proxy");
    ck_assert_ptr_nonnull(c);
    ck_assert_ptr_nonnull(direct);
    if (!lp)
        lp = loop_new();
    ck_assert_int_eq(http_client_attach(c, lp), IW_OK);
    ck_assert_int_eq(http_client_attach(direct, lp), IW_OK);
    /* the environment changed after creation: the client keeps what it read */
    ck_assert_int_eq(call(c, "/api/v1/external-resource", "p-1"), IW_OK);
    ck_assert_int_eq(n_captured(), 1);
    ck_assert_msg(
        strncmp(cap.heads[0], "POST http://provider.invalid:9/api/v1/external-resource ", 56) == 0,
        "%s", cap.heads[0]);
    /* exempt: straight to a host that does not resolve */
    ck_assert_int_eq(call(direct, "/api/v1/external-resource", "p-2"), IW_OK);
    ck_assert_int_ne(last_transport, IW_TRANSPORT_OK);
    ck_assert_int_eq(n_captured(), 1);
    http_client_free(c);
    http_client_free(direct);
    loop_free(lp);
    lp = NULL;
}
END_TEST

START_TEST(crlf_job_id_never_adds_a_header)
{
    iw_error err;
    char v[512], want[JOBKEY_SIZE];
    const char *id = "j-1\r\nX-Injected: yes";
    capture_start();
    http_client *c = client(IW_AUTH_API_KEY, "key", &err);
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(call(c, "/api/v1/external-resource", id), IW_OK);
    ck_assert_int_eq(n_captured(), 1);
    ck_assert_int_eq(count_headers(cap.heads[0], "X-Injected"), 0);
    ck_assert_ptr_null(strstr(cap.heads[0], "X-Injected"));
    ck_assert_int_eq(count_headers(cap.heads[0], "Idempotency-Key"), 1);
    ck_assert_int_eq(jobkey(id, strlen(id), want), IW_OK);
    ck_assert_str_eq(header_value(cap.heads[0], "Idempotency-Key", v, sizeof v),
                     "sha256:f24392df0b9ed3f37d522a5db29e1eca54fbeb0b300a21921e28a0d9ffcc922d");
    ck_assert_str_eq(v, want);
    /* non-ASCII jobIds are hashed too: header values stay ASCII */
    ck_assert_int_eq(call(c, "/api/v1/external-resource", "\xe3\x82\xb8\xe3\x83\xa7\xe3\x83\x96-1"),
                     IW_OK);
    ck_assert_str_eq(header_value(cap.heads[1], "Idempotency-Key", v, sizeof v),
                     "sha256:3998882e99d572b18950f6f28b2e155fa27a9da5137b27473d76609b9484d344");
    http_client_free(c);
    loop_free(lp);
    lp = NULL;
}
END_TEST

START_TEST(api_key_with_crlf_refused)
{
    iw_error err;
    capture_start();
    http_client *c = client(IW_AUTH_API_KEY, "k\r\nX-Injected: yes", &err);
    ck_assert_ptr_null(c);
    ck_assert_int_eq(err.status, IW_ERR_HEADER_VALUE);
    ck_assert_msg(strncmp(err.msg, "IW_API_KEY: ", 12) == 0, "%s", err.msg);
    ck_assert_ptr_null(strstr(err.msg, "Injected")); /* never echoes the secret */
    ck_assert_int_eq(n_captured(), 0);
}
END_TEST

START_TEST(url_too_long_refused_whole_or_nothing)
{
    iw_error err;
    capture_start();
    http_client *c = client(IW_AUTH_NONE, NULL, &err);
    ck_assert_ptr_nonnull(c);
    /* a 128-character CJK id, percent-encoded (1,152 bytes): built whole */
    iw_buf path;
    buf_init(&path, HTTP_URL_MAX * 2);
    ck_assert_int_eq(buf_adds(&path, "/api/v1/external-resource/"), IW_OK);
    for (int i = 0; i < 128; i++)
        ck_assert_int_eq(buf_adds(&path, "%E6%97%A5"), IW_OK);
    ck_assert_int_eq(call(c, buf_ptr(&path), NULL), IW_OK);
    ck_assert_int_eq(n_captured(), 1);
    ck_assert_ptr_nonnull(strstr(cap.heads[0], buf_ptr(&path)));
    /* past HTTP_URL_MAX: refused by name, nothing sent */
    while (buf_len(&path) < HTTP_URL_MAX)
        ck_assert_int_eq(buf_adds(&path, "%E6%97%A5"), IW_OK);
    ck_assert_int_eq(http_client_start(c, "GET", buf_ptr(&path), NULL, 0, NULL, on_done, NULL),
                     IW_ERR_URL_TOO_LONG);
    ck_assert_int_eq(http_client_in_flight(c), 0);
    buf_free(&path);
    /* raw control bytes or spaces in a path: refused */
    ck_assert_int_eq(
        http_client_start(c, "GET", "/a\r\nX-Injected: yes", NULL, 0, NULL, on_done, NULL),
        IW_ERR_URL_INVALID);
    ck_assert_int_eq(http_client_start(c, "GET", "/a b", NULL, 0, NULL, on_done, NULL),
                     IW_ERR_URL_INVALID);
    ck_assert_int_eq(http_client_start(c, "GET", "/\xe6\x97\xa5", NULL, 0, NULL, on_done, NULL),
                     IW_ERR_URL_INVALID);
    usleep(100000);
    ck_assert_int_eq(n_captured(), 1);
    http_client_free(c);
    loop_free(lp);
    lp = NULL;
}
END_TEST

START_TEST(token_with_crlf_never_sent)
{
    iw_error err;
    capture_start();
    cap.token = "t\\r\\nX-Injected: yes"; /* JSON escapes: the token holds CR LF */
    http_client *c = client(IW_AUTH_OAUTH2, NULL, &err);
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(call(c, "/api/v1/external-resource", "j-2"), IW_OK);
    /* the token is refused, and a call is never sent without one: it waits */
    ck_assert_int_eq(n_captured(), 1);
    ck_assert_int_eq(strncmp(cap.heads[0], "POST /oauth/token", 17), 0);
    ck_assert_int_eq(last_transport, IW_TRANSPORT_NO_TOKEN);
    ck_assert_int_ge(last_wait, 1000);
    http_client_free(c);
    loop_free(lp);
    lp = NULL;
}
END_TEST

START_TEST(good_token_sent)
{
    iw_error err;
    char v[512];
    capture_start();
    cap.token = "abc.def";
    http_client *c = client(IW_AUTH_OAUTH2, NULL, &err);
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(call(c, "/api/v1/external-resource", "j-3"), IW_OK);
    ck_assert_int_eq(n_captured(), 2);
    ck_assert_str_eq(header_value(cap.heads[1], "Authorization", v, sizeof v), "Bearer abc.def");
    /* the API key settings (the secret is set here) are never sent in another mode */
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(count_headers(cap.heads[i], "X-API-Key"), 0);
        ck_assert_int_eq(count_headers(cap.heads[i], "X-API-Secret"), 0);
        ck_assert_int_eq(count_headers(cap.heads[i], "User-Agent"), 1);
    }
    http_client_free(c);
    loop_free(lp);
    lp = NULL;
}
END_TEST

START_TEST(token_outage_waits_with_backoff)
{
    iw_error err;
    capture_start();
    cap.token_status = 503;
    http_client *c = client(IW_AUTH_OAUTH2, NULL, &err);
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(call(c, "/api/v1/external-resource", "j-4"), IW_OK);
    ck_assert_int_eq(last_transport, IW_TRANSPORT_NO_TOKEN);
    ck_assert_int_eq(n_captured(), 1); /* only the token request */
    /* within the backoff: no new token request, the call waits again */
    ck_assert_int_eq(call(c, "/api/v1/external-resource", "j-5"), IW_OK);
    ck_assert_int_eq(last_transport, IW_TRANSPORT_NO_TOKEN);
    ck_assert_int_eq(n_captured(), 1);
    ck_assert_int_gt(last_wait, 0);
    ck_assert_int_le(last_wait, 1000);
    /* the endpoint recovers; after the backoff the call goes with a token */
    pthread_mutex_lock(&cap.lock);
    cap.token_status = 0;
    pthread_mutex_unlock(&cap.lock);
    usleep(1100000);
    ck_assert_int_eq(call(c, "/api/v1/external-resource", "j-6"), IW_OK);
    ck_assert_int_eq(last_transport, IW_TRANSPORT_OK);
    ck_assert_int_eq(last_status, 200);
    ck_assert_int_eq(n_captured(), 3);
    ck_assert_int_eq(count_headers(cap.heads[2], "Authorization"), 1);
    http_client_free(c);
    loop_free(lp);
    lp = NULL;
}
END_TEST

/* A caller that holds its calls while http_client_token_wait_ms > 0 gets
 * the token fetched for it, and learns the backoff when the fetch fails. */
START_TEST(token_wait_fetches_without_a_call)
{
    iw_error err;
    capture_start();
    cap.token_status = 503;
    http_client *c = client(IW_AUTH_OAUTH2, NULL, &err);
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(http_client_auth_ready(c), 0);
    ck_assert_int_gt(http_client_token_wait_ms(c), 0); /* a fetch starts */
    for (int i = 0; i < 200 && n_captured() < 1; i++)
        loop_turn(lp, 20);
    long w = 0;
    for (int i = 0; i < 200 && (w = http_client_token_wait_ms(c)) <= 200; i++)
        loop_turn(lp, 20);
    ck_assert_int_gt(w, 200); /* the backoff after the failed fetch */
    ck_assert_int_le(w, 1000);
    ck_assert_int_eq(n_captured(), 1); /* the token request only */
    pthread_mutex_lock(&cap.lock);
    cap.token_status = 0;
    pthread_mutex_unlock(&cap.lock);
    /* at the end of the backoff the client fetches by itself */
    for (int i = 0; i < 200 && !http_client_auth_ready(c); i++) {
        (void)http_client_token_wait_ms(c);
        loop_turn(lp, 20);
    }
    ck_assert_int_eq(http_client_auth_ready(c), 1);
    ck_assert_int_eq(http_client_token_wait_ms(c), 0);
    ck_assert_int_eq(n_captured(), 2);
    http_client_free(c);
    loop_free(lp);
    lp = NULL;
}
END_TEST

/* A 401 on a call that carried a token drops the token, starts a new fetch
 * and comes back marked token_refused: the caller (the job engine) retries
 * it once under a permit of its own; the retry carries the new token. */
START_TEST(one_401_one_refresh_one_retry)
{
    iw_error err;
    capture_start();
    cap.api_401s = 1;
    http_client *c = client(IW_AUTH_OAUTH2, NULL, &err);
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(call(c, "/api/v1/external-resource", "j-7"), IW_OK);
    ck_assert_int_eq(last_status, 401);
    ck_assert_int_eq(last_refused, 1);
    /* the caller's one retry: token again, the same call, answered */
    ck_assert_int_eq(call(c, "/api/v1/external-resource", "j-7"), IW_OK);
    ck_assert_int_eq(last_status, 200);
    ck_assert_int_eq(last_refused, 0);
    /* token, call (401), token again, the same call */
    ck_assert_int_eq(n_captured(), 4);
    ck_assert_int_eq(strncmp(cap.heads[2], "POST /oauth/token", 17), 0);
    http_client_free(c);
    loop_free(lp);
    lp = NULL;
}
END_TEST

START_TEST(token_answers_checked)
{
    char *tok;
    long long life;
    const char *why;
#define P(s) http_token_parse(s, strlen(s), &tok, &life, &why)
    ck_assert_int_eq(P("{\"access_token\":\"a.b-c\",\"expires_in\":60}"), IW_OK);
    ck_assert_str_eq(tok, "a.b-c");
    ck_assert_int_eq(life, 60000);
    free(tok);
    ck_assert_int_eq(P("{\"access_token\":\"abc\"}"), IW_OK);
    ck_assert_int_eq(life, 3600000);
    free(tok);
    ck_assert_int_ne(P("{\"access_token\":\"a\\r\\nb\",\"expires_in\":60}"), IW_OK);
    ck_assert_ptr_null(tok);
    ck_assert_int_ne(P("{\"access_token\":\"a b\",\"expires_in\":60}"), IW_OK);
    ck_assert_int_ne(P("{\"access_token\":\"a\\u0000b\",\"expires_in\":60}"), IW_OK);
    ck_assert_int_ne(P("{\"access_token\":\"\\u00e9\",\"expires_in\":60}"), IW_OK);
    ck_assert_int_ne(P("{\"access_token\":\"\",\"expires_in\":60}"), IW_OK);
    ck_assert_int_ne(P("{\"access_token\":\"abc\",\"expires_in\":0}"), IW_OK);
    ck_assert_int_ne(P("{\"access_token\":\"abc\",\"expires_in\":-5}"), IW_OK);
    ck_assert_int_ne(P("{\"access_token\":\"abc\",\"expires_in\":99999999999}"), IW_OK);
    ck_assert_int_ne(P("{\"access_token\":\"abc\",\"expires_in\":\"60\"}"), IW_OK);
    ck_assert_int_ne(P("{\"access_token\":\"abc\",\"expires_in\":1.5}"), IW_OK);
    ck_assert_int_ne(P("[]"), IW_OK);
    ck_assert_int_ne(P("not json"), IW_OK);
    ck_assert_ptr_nonnull(why);
    ck_assert_ptr_null(strstr(why, "abc"));
#undef P
    /* 80% of the life, but never more than 5 minutes before the end */
    ck_assert_int_eq(http_token_refresh_after(60000), 48000);
    ck_assert_int_eq(http_token_refresh_after(3600000), 3300000);
}
END_TEST

START_TEST(header_and_path_checks)
{
    ck_assert_int_eq(http_header_value_check("abc def", 7), IW_OK);
    ck_assert_int_eq(http_header_value_check("a\rb", 3), IW_ERR_HEADER_VALUE);
    ck_assert_int_eq(http_header_value_check("a\nb", 3), IW_ERR_HEADER_VALUE);
    ck_assert_int_eq(http_header_value_check("a\0b", 3), IW_ERR_HEADER_VALUE);
    ck_assert_int_eq(http_header_value_check("a\tb", 3), IW_ERR_HEADER_VALUE);
    ck_assert_int_eq(http_header_value_check("a\x7f", 2), IW_ERR_HEADER_VALUE);
    ck_assert_int_eq(http_url_path_check("/x/%20", 6), IW_OK);
    ck_assert_int_eq(http_url_path_check("x", 1), IW_ERR_URL_INVALID);
    ck_assert_int_eq(http_url_path_check("", 0), IW_ERR_URL_INVALID);
}
END_TEST

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    Suite *s = suite_create("http_client");
    TCase *tc = tcase_create("http_client");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, idempotency_key_is_jobkey);
    tcase_add_test(tc, header_lines_each_once);
    tcase_add_test(tc, no_100_continue_at_any_size);
    tcase_add_test(tc, each_call_asks_for_its_own_path);
    tcase_add_test(tc, proxy_from_environment);
    tcase_add_test(tc, crlf_job_id_never_adds_a_header);
    tcase_add_test(tc, api_key_with_crlf_refused);
    tcase_add_test(tc, url_too_long_refused_whole_or_nothing);
    tcase_add_test(tc, token_with_crlf_never_sent);
    tcase_add_test(tc, good_token_sent);
    tcase_add_test(tc, token_outage_waits_with_backoff);
    tcase_add_test(tc, one_401_one_refresh_one_retry);
    tcase_add_test(tc, token_wait_fetches_without_a_call);
    tcase_add_test(tc, token_answers_checked);
    tcase_add_test(tc, header_and_path_checks);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    curl_global_cleanup();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
