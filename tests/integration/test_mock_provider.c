/* Integration suite of mock-provider: each test starts the binary on a free
 * loopback port, talks to it with libcurl, and stops it with SIGTERM
 * (expecting exit 0).  Needs no broker or Redis. */
#include <check.h>
#include <curl/curl.h>
#include <jansson.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "iwtest.h"

#define MOCK_BIN IW_BIN_DIR "/mock-provider"
#define MAX_ARGS 32

static const char *const api_auth[] = {"X-API-Key: test-key-xxxxx",
                                       "X-API-Secret: test-secret-xxxxx", NULL};

static const char valid_body[] = "{\"user_id\":\"u-1\",\"action_type\":\"transaction\","
                                 "\"request_data\":{\"amount\":5},"
                                 "\"client_info\":{\"client_id\":\"iw\",\"timestamp\":"
                                 "\"2024-01-01T00:00:00Z\"}}";

/* ---- the child process ---------------------------------------------------- */

static pid_t mock_pid = -1;
static char mock_url[128];

static void kill_mock_at_exit(void)
{
    /* A failed ck_assert exits the test process: never leave the mock behind. */
    if (mock_pid > 0) {
        kill(mock_pid, SIGKILL);
        waitpid(mock_pid, NULL, 0);
        mock_pid = -1;
    }
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Starts mock-provider with the given flags (NULL-terminated) plus
 * --listen 127.0.0.1:0, and reads its listening line. */
static void start_mock(const char *flag, ...)
{
    const char *argv[MAX_ARGS];
    int argc = 0;
    argv[argc++] = MOCK_BIN;
    argv[argc++] = "--listen";
    argv[argc++] = "127.0.0.1:0";
    va_list ap;
    va_start(ap, flag);
    for (const char *a = flag; a && argc < MAX_ARGS - 1; a = va_arg(ap, const char *))
        argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;

    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    pid_t parent = getpid();
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        dup2(fds[1], STDOUT_FILENO);
        close(fds[0]);
        close(fds[1]);
        execv(MOCK_BIN, (char *const *)argv);
        _exit(127);
    }
    close(fds[1]);
    mock_pid = pid;
    static bool registered;
    if (!registered)
        atexit(kill_mock_at_exit);
    registered = true;

    char line[256];
    size_t len = 0;
    int64_t deadline = now_ms() + 10000;
    while (len < sizeof line - 1 && (len == 0 || line[len - 1] != '\n')) {
        struct pollfd pfd = {.fd = fds[0], .events = POLLIN};
        int left = (int)(deadline - now_ms());
        ck_assert_msg(left > 0, "mock-provider did not print its listening line");
        if (poll(&pfd, 1, left) <= 0)
            continue;
        ssize_t n = read(fds[0], line + len, sizeof line - 1 - len);
        ck_assert_msg(n > 0, "mock-provider exited before listening");
        len += (size_t)n;
    }
    close(fds[0]);
    line[len] = '\0';
    const char prefix[] = "mock-provider listening on ";
    ck_assert_msg(strncmp(line, prefix, sizeof prefix - 1) == 0, "unexpected line: %s", line);
    snprintf(mock_url, sizeof mock_url, "%.*s", (int)strcspn(line + sizeof prefix - 1, "\n"),
             line + sizeof prefix - 1);
}

/* SIGTERM, and the mock must exit 0 promptly. */
static void stop_mock(void)
{
    ck_assert_int_gt(mock_pid, 0);
    kill(mock_pid, SIGTERM);
    int status = 0;
    pid_t got = 0;
    for (int64_t deadline = now_ms() + 5000; now_ms() < deadline; iwt_sleep_ms(5)) {
        got = waitpid(mock_pid, &status, WNOHANG);
        if (got != 0)
            break;
    }
    if (got == 0)
        kill_mock_at_exit();
    mock_pid = -1;
    ck_assert_msg(got > 0, "mock-provider did not stop on SIGTERM");
    ck_assert_msg(WIFEXITED(status), "mock-provider died of signal %d",
                  WIFSIGNALED(status) ? WTERMSIG(status) : -1);
    ck_assert_int_eq(WEXITSTATUS(status), 0);
}

/* ---- HTTP helpers ------------------------------------------------------- */

typedef struct http_resp {
    CURLcode rc;
    long status;
    char body[65536];
    size_t len;
    char headers[8192];
    size_t hlen;
    json_t *json; /* body parsed, or NULL */
} http_resp;

static size_t on_body(char *data, size_t size, size_t n, void *arg)
{
    http_resp *r = arg;
    size_t total = size * n, room = sizeof r->body - 1 - r->len;
    size_t take = total < room ? total : room;
    memcpy(r->body + r->len, data, take);
    r->len += take;
    r->body[r->len] = '\0';
    return total;
}

static size_t on_header(char *data, size_t size, size_t n, void *arg)
{
    http_resp *r = arg;
    size_t total = size * n, room = sizeof r->headers - 1 - r->hlen;
    size_t take = total < room ? total : room;
    memcpy(r->headers + r->hlen, data, take);
    r->hlen += take;
    r->headers[r->hlen] = '\0';
    return total;
}

static CURL *make_easy(http_resp *r, const char *method, const char *path, const char *body,
                       const char *const *headers, struct curl_slist **list)
{
    char url[512];
    snprintf(url, sizeof url, "%s%s", mock_url, path);
    memset(r, 0, sizeof *r);
    CURL *c = curl_easy_init();
    ck_assert_ptr_nonnull(c);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 10000L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    *list = curl_slist_append(NULL, "Expect:");
    if (body) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        *list = curl_slist_append(*list, "Content-Type: application/json");
    }
    for (size_t i = 0; headers && headers[i]; i++)
        *list = curl_slist_append(*list, headers[i]);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, *list);
    return c;
}

static void finish_easy(http_resp *r, CURL *c)
{
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r->status);
    r->json = r->len ? json_loads(r->body, 0, NULL) : NULL;
}

/* One request; headers is a NULL-terminated list of "Name: value". */
static void http(http_resp *r, const char *method, const char *path, const char *body,
                 const char *const *headers)
{
    struct curl_slist *list = NULL;
    CURL *c = make_easy(r, method, path, body, headers, &list);
    r->rc = curl_easy_perform(c);
    finish_easy(r, c);
    curl_slist_free_all(list);
    curl_easy_cleanup(c);
}

static void http_free(http_resp *r)
{
    json_decref(r->json);
    r->json = NULL;
}

/* Value of a response header (case-insensitive name), or NULL. */
static const char *header_value(const http_resp *r, const char *name, char *buf, size_t len)
{
    size_t nlen = strlen(name);
    for (const char *line = r->headers; *line;) {
        size_t llen = strcspn(line, "\r\n");
        if (llen > nlen && strncasecmp(line, name, nlen) == 0 && line[nlen] == ':') {
            const char *v = line + nlen + 1;
            while (*v == ' ')
                v++;
            snprintf(buf, len, "%.*s", (int)(llen - (size_t)(v - line)), v);
            return buf;
        }
        line += llen;
        line += strspn(line, "\r\n");
    }
    return NULL;
}

static const char *json_str(const http_resp *r, const char *key)
{
    return json_string_value(json_object_get(r->json, key));
}

/* GET /__admin/stats; the caller frees the result. */
static json_t *get_stats(void)
{
    http_resp r;
    http(&r, "GET", "/__admin/stats", NULL, NULL);
    ck_assert_int_eq(r.status, 200);
    ck_assert_ptr_nonnull(r.json);
    return r.json;
}

static long long stat_int(json_t *stats, const char *key)
{
    json_t *v = json_object_get(stats, key);
    ck_assert_msg(json_is_integer(v), "stats lack %s", key);
    return (long long)json_integer_value(v);
}

static long long route_count(json_t *stats, const char *route, const char *status)
{
    json_t *v = json_object_get(json_object_get(json_object_get(stats, "requests"), route), status);
    return json_is_integer(v) ? (long long)json_integer_value(v) : 0;
}

static void post_admin(const char *path, const char *body, long expect)
{
    http_resp r;
    http(&r, "POST", path, body, NULL);
    ck_assert_msg(r.status == expect, "%s: %ld %s", path, r.status, r.body);
    http_free(&r);
}

/* Submits valid_body (or body) with an optional Idempotency-Key. */
static void submit(http_resp *r, const char *body, const char *key)
{
    char key_header[300];
    const char *headers[4] = {api_auth[0], api_auth[1], NULL, NULL};
    if (key) {
        snprintf(key_header, sizeof key_header, "Idempotency-Key: %s", key);
        headers[2] = key_header;
    }
    http(r, "POST", "/api/v1/external-resource", body ? body : valid_body, headers);
}

/* ---- tests ----------------------------------------------------------- */

START_TEST(test_bad_flag_and_help)
{
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        dup2(fds[1], STDERR_FILENO);
        close(fds[0]);
        execl(MOCK_BIN, MOCK_BIN, "--no-such-flag", (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    char err[512] = "";
    size_t len = 0;
    ssize_t n;
    while ((n = read(fds[0], err + len, sizeof err - 1 - len)) > 0)
        len += (size_t)n;
    close(fds[0]);
    err[len] = '\0';
    int status;
    waitpid(pid, &status, 0);
    ck_assert(WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 2);
    ck_assert_ptr_nonnull(strstr(err, "--no-such-flag"));
    ck_assert_ptr_eq(strchr(err, '\n'), err + len - 1); /* one line */

    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, STDOUT_FILENO);
        execl(MOCK_BIN, MOCK_BIN, "--help", (char *)NULL);
        _exit(127);
    }
    waitpid(pid, &status, 0);
    ck_assert(WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
}
END_TEST

START_TEST(test_auth_api_key)
{
    start_mock(NULL);
    http_resp r;
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, NULL);
    ck_assert_int_eq(r.status, 401);
    ck_assert_str_eq(json_str(&r, "error"), "unauthorized");
    http_free(&r);

    const char *wrong[] = {"X-API-Key: test-key-xxxxx", "X-API-Secret: nope", NULL};
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, wrong);
    ck_assert_int_eq(r.status, 401);
    http_free(&r);

    const char *key_only[] = {"X-API-Key: test-key-xxxxx", NULL};
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, key_only);
    ck_assert_int_eq(r.status, 401);
    http_free(&r);

    http(&r, "GET", "/api/v1/external-resource/abc", NULL, api_auth);
    ck_assert_int_eq(r.status, 200);
    http_free(&r);

    json_t *stats = get_stats();
    ck_assert_int_eq(route_count(stats, "GET /api/v1/external-resource", "401"), 3);
    ck_assert_int_eq(route_count(stats, "GET /api/v1/external-resource", "200"), 1);
    json_decref(stats);
    stop_mock();
}
END_TEST

START_TEST(test_auth_basic)
{
    start_mock("--auth", "basic", "--basic-user", "alice", "--basic-password", "s3cret", NULL);
    http_resp r;
    char auth[128], b64[] = "YWxpY2U6czNjcmV0"; /* alice:s3cret */
    snprintf(auth, sizeof auth, "Authorization: Basic %s", b64);
    const char *good[] = {auth, NULL};
    const char *bad[] = {"Authorization: Basic YWxpY2U6d3Jvbmc=", NULL}; /* alice:wrong */
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, bad);
    ck_assert_int_eq(r.status, 401);
    http_free(&r);
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, good);
    ck_assert_int_eq(r.status, 200);
    http_free(&r);
    stop_mock();
}
END_TEST

START_TEST(test_submit_and_idempotent_replay)
{
    start_mock(NULL);
    http_resp first, again, r;
    submit(&first, NULL, "job-1");
    ck_assert_int_eq(first.status, 201);
    ck_assert_str_eq(json_str(&first, "status"), "pending");
    ck_assert_str_eq(json_str(&first, "message"), "Request received and queued for processing");
    ck_assert(strncmp(json_str(&first, "id"), "res-", 4) == 0);
    ck_assert(strncmp(json_str(&first, "trackingId"), "track-", 6) == 0);

    submit(&again, NULL, "job-1");
    ck_assert_int_eq(again.status, 201);
    ck_assert_str_eq(again.body, first.body);
    char buf[64];
    ck_assert_ptr_nonnull(header_value(&again, "Idempotent-Replayed", buf, sizeof buf));
    ck_assert_str_eq(buf, "true");

    json_t *stats = get_stats();
    ck_assert_int_eq(stat_int(stats, "submissions_created"), 1);
    ck_assert_int_eq(stat_int(stats, "duplicates_refused"), 1);
    ck_assert_int_eq(route_count(stats, "POST /api/v1/external-resource", "201"), 2);
    json_decref(stats);

    submit(&r, NULL, "job-2"); /* another key: a new submission */
    ck_assert_int_eq(r.status, 201);
    ck_assert_str_ne(json_str(&r, "trackingId"), json_str(&first, "trackingId"));
    ck_assert_ptr_null(header_value(&r, "Idempotent-Replayed", buf, sizeof buf));
    http_free(&r);
    stats = get_stats();
    ck_assert_int_eq(stat_int(stats, "submissions_created"), 2);
    json_decref(stats);

    /* The outbound shape is enforced. */
    static const char *const invalid[] = {
        "not json",
        "[]",
        "{\"action_type\":\"a\",\"request_data\":{},\"client_info\":{\"client_id\":\"c\","
        "\"timestamp\":\"t\"}}",
        "{\"user_id\":\"u\",\"action_type\":\"a\",\"request_data\":[],\"client_info\":{"
        "\"client_id\":\"c\",\"timestamp\":\"t\"}}",
        "{\"user_id\":\"u\",\"action_type\":\"a\",\"request_data\":{},\"client_info\":{"
        "\"client_id\":\"c\"}}",
    };
    for (size_t i = 0; i < sizeof invalid / sizeof invalid[0]; i++) {
        submit(&r, invalid[i], NULL);
        ck_assert_msg(r.status == 400, "case %zu: %ld", i, r.status);
        ck_assert_ptr_nonnull(json_str(&r, "error"));
        http_free(&r);
    }

    /* Reset forgets submissions and keys. */
    post_admin("/__admin/reset", "", 200);
    submit(&r, NULL, "job-1");
    ck_assert_int_eq(r.status, 201);
    ck_assert_ptr_null(header_value(&r, "Idempotent-Replayed", buf, sizeof buf));
    http_free(&r);
    stats = get_stats();
    ck_assert_int_eq(stat_int(stats, "submissions_created"), 1);
    ck_assert_int_eq(stat_int(stats, "duplicates_refused"), 0);
    json_decref(stats);
    http_free(&first);
    http_free(&again);
    stop_mock();
}
END_TEST

static void check_status(const char *tracking, const char *expect, long checks)
{
    char path[256];
    http_resp r;
    snprintf(path, sizeof path, "/api/v1/status/%s", tracking);
    http(&r, "GET", path, NULL, api_auth);
    ck_assert_int_eq(r.status, 200);
    ck_assert_str_eq(json_str(&r, "status"), expect);
    ck_assert_str_eq(json_str(&r, "trackingId"), tracking);
    ck_assert_ptr_nonnull(json_str(&r, "id"));
    ck_assert_ptr_nonnull(json_str(&r, "updatedAt"));
    if (checks > 0)
        ck_assert_int_eq(json_integer_value(json_object_get(r.json, "checks")), checks);
    bool terminal = strcmp(expect, "pending") != 0 && strcmp(expect, "processing") != 0;
    ck_assert(terminal == (json_object_get(r.json, "result") != NULL));
    http_free(&r);
}

START_TEST(test_status_progression)
{
    start_mock(NULL);
    http_resp r;
    submit(&r, NULL, "job-s");
    ck_assert_int_eq(r.status, 201);
    char tracking[128];
    snprintf(tracking, sizeof tracking, "%s", json_str(&r, "trackingId"));
    http_free(&r);
    check_status(tracking, "pending", 1);
    check_status(tracking, "processing", 2);
    check_status(tracking, "completed", 3);
    check_status(tracking, "completed", 4);

    char path[256];
    snprintf(path, sizeof path, "/api/v1/status/%s", tracking);
    http(&r, "GET", path, NULL, api_auth);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(r.json, "result"), "code")),
                     "OK");
    http_free(&r);

    http(&r, "GET", "/api/v1/status/track-unknown", NULL, api_auth);
    ck_assert_int_eq(r.status, 404);
    ck_assert_str_eq(json_str(&r, "error"), "not found");
    http_free(&r);

    /* Hooks: this submission ends rejected after 2 checks. */
    submit(&r,
           "{\"user_id\":\"u\",\"action_type\":\"a\",\"request_data\":{\"mock\":{\"terminal\":"
           "\"rejected\",\"checks\":2}},\"client_info\":{\"client_id\":\"c\",\"timestamp\":\"t\"}}",
           "job-r");
    ck_assert_int_eq(r.status, 201);
    snprintf(tracking, sizeof tracking, "%s", json_str(&r, "trackingId"));
    http_free(&r);
    check_status(tracking, "pending", 1);
    check_status(tracking, "rejected", 2);
    snprintf(path, sizeof path, "/api/v1/status/%s", tracking);
    http(&r, "GET", path, NULL, api_auth);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(r.json, "result"), "code")),
                     "REJECTED");
    http_free(&r);

    json_t *stats = get_stats();
    ck_assert_int_eq(stat_int(stats, "status_checks"), 8);
    ck_assert_int_eq(route_count(stats, "GET /api/v1/status", "404"), 1);
    json_decref(stats);
    stop_mock();
}
END_TEST

START_TEST(test_status_by_age)
{
    start_mock("--seconds-to-complete", "0.4", "--terminal-status", "failed", NULL);
    http_resp r;
    submit(&r, NULL, "job-t");
    ck_assert_int_eq(r.status, 201);
    char tracking[128], path[256];
    snprintf(tracking, sizeof tracking, "%s", json_str(&r, "trackingId"));
    http_free(&r);
    check_status(tracking, "pending", 1);
    snprintf(path, sizeof path, "/api/v1/status/%s", tracking);
    bool saw_processing = false;
    int64_t deadline = now_ms() + 3000;
    for (;;) {
        ck_assert_msg(now_ms() < deadline, "never reached the terminal status");
        http(&r, "GET", path, NULL, api_auth);
        ck_assert_int_eq(r.status, 200);
        const char *status = json_str(&r, "status");
        if (strcmp(status, "processing") == 0)
            saw_processing = true;
        bool done = strcmp(status, "failed") == 0;
        http_free(&r);
        if (done)
            break;
        iwt_sleep_ms(20);
    }
    ck_assert(saw_processing);
    stop_mock();
}
END_TEST

START_TEST(test_rate_limit)
{
    start_mock("--rate-limits", "3/s,1000/hour", NULL);
    http_resp r;
    char buf[64];
    int64_t t0 = now_ms();
    for (int i = 0; i < 3; i++) {
        http(&r, "GET", "/api/v1/external-resource/abc", NULL, api_auth);
        ck_assert_int_eq(r.status, 200);
        http_free(&r);
    }
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, api_auth);
    ck_assert_msg(now_ms() - t0 < 900, "the four requests took too long to be meaningful");
    ck_assert_int_eq(r.status, 429);
    ck_assert_str_eq(json_str(&r, "error"), "rate limited");
    ck_assert_ptr_nonnull(header_value(&r, "Retry-After", buf, sizeof buf));
    ck_assert_str_eq(buf, "1");
    ck_assert_ptr_nonnull(header_value(&r, "X-RateLimit-Limit", buf, sizeof buf));
    ck_assert_str_eq(buf, "3");
    ck_assert_ptr_nonnull(header_value(&r, "X-RateLimit-Remaining", buf, sizeof buf));
    ck_assert_str_eq(buf, "0");
    ck_assert_ptr_nonnull(header_value(&r, "X-RateLimit-Reset", buf, sizeof buf));
    ck_assert_int_ge(atoll(buf), (long long)time(NULL));
    ck_assert_ptr_nonnull(header_value(&r, "X-RateLimit-Reset-Ms", buf, sizeof buf));
    long wait_ms = atol(buf);
    ck_assert_int_ge(wait_ms, 1);
    ck_assert_int_le(wait_ms, 1000);
    http_free(&r);

    /* Admin calls are never limited; a refused request took no slot. */
    json_t *stats = get_stats();
    ck_assert_int_eq(stat_int(stats, "rate_limited"), 1);
    ck_assert_int_eq(route_count(stats, "GET /api/v1/external-resource", "429"), 1);
    json_decref(stats);

    /* A slot frees when announced, not before (refused polls take none). */
    int64_t refused_at = now_ms();
    for (;;) {
        http(&r, "GET", "/api/v1/external-resource/abc", NULL, api_auth);
        long status = r.status;
        http_free(&r);
        int64_t waited = now_ms() - refused_at;
        if (status == 200) {
            ck_assert_int_ge(waited, wait_ms - 20);
            break;
        }
        ck_assert_int_eq(status, 429);
        ck_assert_msg(waited < wait_ms + 500, "no slot %lld ms after the 429", (long long)waited);
        iwt_sleep_ms(10);
    }
    stop_mock();
}
END_TEST

START_TEST(test_fail_hooks)
{
    start_mock(NULL);
    static const char fail_body[] =
        "{\"user_id\":\"u\",\"action_type\":\"a\",\"request_data\":{\"mock\":{\"fail\":[500,"
        "503]}},\"client_info\":{\"client_id\":\"c\",\"timestamp\":\"t\"}}";
    http_resp r;
    submit(&r, fail_body, "job-f");
    ck_assert_int_eq(r.status, 500);
    http_free(&r);
    submit(&r, fail_body, "job-f");
    ck_assert_int_eq(r.status, 503);
    http_free(&r);
    submit(&r, fail_body, "job-f");
    ck_assert_int_eq(r.status, 201);
    http_free(&r);
    submit(&r, fail_body, "job-f");
    ck_assert_int_eq(r.status, 201);
    http_free(&r);

    /* 0 closes the connection without an answer. */
    submit(&r,
           "{\"user_id\":\"u\",\"action_type\":\"a\",\"request_data\":{\"mock\":{\"fail\":[0]}},"
           "\"client_info\":{\"client_id\":\"c\",\"timestamp\":\"t\"}}",
           "job-0");
    ck_assert_int_eq(r.rc, CURLE_GOT_NOTHING);
    http_free(&r);

    /* 429 carries Retry-After (overridable). */
    submit(&r,
           "{\"user_id\":\"u\",\"action_type\":\"a\",\"request_data\":{\"mock\":{\"fail\":[429],"
           "\"retry_after\":7}},\"client_info\":{\"client_id\":\"c\",\"timestamp\":\"t\"}}",
           "job-429");
    ck_assert_int_eq(r.status, 429);
    char buf[64];
    ck_assert_ptr_nonnull(header_value(&r, "Retry-After", buf, sizeof buf));
    ck_assert_str_eq(buf, "7");
    http_free(&r);

    static const char always[] =
        "{\"user_id\":\"u\",\"action_type\":\"a\",\"request_data\":{\"mock\":{\"fail_always\":"
        "404}},\"client_info\":{\"client_id\":\"c\",\"timestamp\":\"t\"}}";
    for (int i = 0; i < 3; i++) {
        submit(&r, always, "job-404");
        ck_assert_int_eq(r.status, 404);
        http_free(&r);
    }

    submit(&r,
           "{\"user_id\":\"u\",\"action_type\":\"a\",\"request_data\":{\"mock\":{\"nope\":1}},"
           "\"client_info\":{\"client_id\":\"c\",\"timestamp\":\"t\"}}",
           "job-bad");
    ck_assert_int_eq(r.status, 400);
    http_free(&r);

    json_t *stats = get_stats();
    ck_assert_int_eq(stat_int(stats, "submissions_created"), 1);
    ck_assert_int_eq(stat_int(stats, "duplicates_refused"), 1);
    ck_assert_int_eq(route_count(stats, "POST /api/v1/external-resource", "500"), 1);
    ck_assert_int_eq(route_count(stats, "POST /api/v1/external-resource", "503"), 1);
    ck_assert_int_eq(route_count(stats, "POST /api/v1/external-resource", "0"), 1);
    ck_assert_int_eq(route_count(stats, "POST /api/v1/external-resource", "404"), 3);
    json_decref(stats);
    stop_mock();
}
END_TEST

START_TEST(test_admin_faults)
{
    start_mock(NULL);
    http_resp r;
    post_admin("/__admin/faults",
               "{\"script\":{\"GET /api/v1/status\":[503,200,0],"
               "\"POST /api/v1/external-resource\":[500,201]}}",
               200);
    http(&r, "GET", "/__admin/faults", NULL, NULL);
    ck_assert_int_eq(r.status, 200);
    json_t *script = json_object_get(json_object_get(r.json, "script"), "GET /api/v1/status");
    ck_assert_int_eq(json_array_size(script), 3);
    ck_assert(json_is_false(json_object_get(r.json, "outage")));
    http_free(&r);

    submit(&r, NULL, "job-a");
    ck_assert_int_eq(r.status, 500);
    http_free(&r);
    submit(&r, NULL, "job-a");
    ck_assert_int_eq(r.status, 201);
    char tracking[128], path[256];
    snprintf(tracking, sizeof tracking, "%s", json_str(&r, "trackingId"));
    snprintf(path, sizeof path, "/api/v1/status/%s", tracking);
    http_free(&r);
    http(&r, "GET", path, NULL, api_auth);
    ck_assert_int_eq(r.status, 503);
    http_free(&r);
    http(&r, "GET", path, NULL, api_auth); /* 2xx entry: normal behaviour */
    ck_assert_int_eq(r.status, 200);
    ck_assert_str_eq(json_str(&r, "status"), "pending");
    http_free(&r);
    http(&r, "GET", path, NULL, api_auth);
    ck_assert_int_eq(r.rc, CURLE_GOT_NOTHING);
    http_free(&r);
    http(&r, "GET", path, NULL, api_auth); /* script used up */
    ck_assert_int_eq(r.status, 200);
    http_free(&r);

    /* Error rates: P = 1 hits every request. */
    post_admin("/__admin/faults", "{\"error_rates\":{\"502\":1.0}}", 200);
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, api_auth);
    ck_assert_int_eq(r.status, 502);
    http_free(&r);
    post_admin("/__admin/faults", "{\"error_rates\":{}}", 200);
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, api_auth);
    ck_assert_int_eq(r.status, 200);
    http_free(&r);

    /* Latency via faults. */
    post_admin("/__admin/faults", "{\"latency_ms\":150}", 200);
    int64_t t0 = now_ms();
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, api_auth);
    ck_assert_int_eq(r.status, 200);
    ck_assert_int_ge(now_ms() - t0, 140);
    http_free(&r);

    /* Invalid bodies change nothing. */
    post_admin("/__admin/faults", "{\"error_rates\":{\"500\":0.7,\"503\":0.7}}", 400);
    post_admin("/__admin/faults", "{\"script\":{\"GET /nope\":[500]}}", 400);
    post_admin("/__admin/faults", "{\"latency\":5}", 400);
    http(&r, "GET", "/__admin/faults", NULL, NULL);
    ck_assert_int_eq(json_integer_value(json_object_get(r.json, "latency_ms")), 150);
    ck_assert_int_eq(json_object_size(json_object_get(r.json, "error_rates")), 0);
    http_free(&r);

    /* Reset restores the flags' fault settings. */
    post_admin("/__admin/reset", "", 200);
    http(&r, "GET", "/__admin/faults", NULL, NULL);
    ck_assert_int_eq(json_integer_value(json_object_get(r.json, "latency_ms")), 0);
    http_free(&r);
    stop_mock();
}
END_TEST

START_TEST(test_outage)
{
    start_mock("--outage", NULL);
    http_resp r;
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, api_auth);
    ck_assert_int_eq(r.status, 503);
    ck_assert_str_eq(json_str(&r, "error"), "outage");
    http_free(&r);
    submit(&r, NULL, "job-o");
    ck_assert_int_eq(r.status, 503);
    http_free(&r);
    http(&r, "POST", "/oauth/token",
         "grant_type=client_credentials&client_id=test-client&client_secret=test-client-secret",
         NULL);
    ck_assert_int_eq(r.status, 503);
    http_free(&r);
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, NULL); /* auth comes first */
    ck_assert_int_eq(r.status, 401);
    http_free(&r);

    post_admin("/__admin/faults", "{\"outage\":false}", 200);
    submit(&r, NULL, "job-o");
    ck_assert_int_eq(r.status, 201);
    http_free(&r);
    post_admin("/__admin/faults", "{\"outage\":true}", 200);
    http(&r, "GET", "/api/v1/status/track-x", NULL, api_auth);
    ck_assert_int_eq(r.status, 503);
    http_free(&r);

    json_t *stats = get_stats();
    ck_assert_int_eq(stat_int(stats, "submissions_created"), 1);
    ck_assert_int_eq(route_count(stats, "POST /api/v1/external-resource", "503"), 1);
    json_decref(stats);
    stop_mock();
}
END_TEST

START_TEST(test_resource_shapes)
{
    start_mock(NULL);
    http_resp r;
    http(&r, "GET", "/api/v1/external-resource/abc123?expand=details", NULL, api_auth);
    ck_assert_int_eq(r.status, 200);
    ck_assert_str_eq(json_str(&r, "id"), "abc123");
    ck_assert_str_eq(json_str(&r, "ext_name"), "Resource abc123");
    ck_assert_str_eq(json_str(&r, "ext_status"), "ACTIVE");
    ck_assert_str_eq(json_str(&r, "expand"), "details");
    json_t *data = json_object_get(r.json, "ext_data");
    ck_assert_str_eq(json_string_value(json_object_get(data, "field_one")), "value-abc123");
    ck_assert_int_eq(json_integer_value(json_object_get(data, "field_two")), 42);
    http_free(&r);

    http(&r, "GET", "/api/v1/external-resource/abc123", NULL, api_auth);
    ck_assert_ptr_null(json_object_get(r.json, "expand"));
    http_free(&r);

    http(&r, "GET", "/api/v1/external-resource/missing-1", NULL, api_auth);
    ck_assert_int_eq(r.status, 404);
    http_free(&r);

    http(&r, "GET", "/api/v1/external-resource/malformed-1", NULL, api_auth);
    ck_assert_int_eq(r.status, 200);
    ck_assert_ptr_null(json_object_get(r.json, "ext_data"));
    http_free(&r);

    http(&r, "GET", "/api/v1/external-resource/inactive-1", NULL, api_auth);
    ck_assert_int_eq(r.status, 200);
    ck_assert_str_eq(json_str(&r, "ext_status"), "INACTIVE");
    http_free(&r);

    http(&r, "PUT", "/__admin/resources/custom-1", "{\"id\":\"custom-1\",\"ext_name\":\"X\"}",
         NULL);
    ck_assert_int_eq(r.status, 200);
    http_free(&r);
    http(&r, "GET", "/api/v1/external-resource/custom-1", NULL, api_auth);
    ck_assert_int_eq(r.status, 200);
    ck_assert_str_eq(json_str(&r, "ext_name"), "X");
    ck_assert_ptr_null(json_object_get(r.json, "ext_data"));
    http_free(&r);
    http(&r, "DELETE", "/__admin/resources/abc123", NULL, NULL);
    ck_assert_int_eq(r.status, 200);
    http_free(&r);
    http(&r, "GET", "/api/v1/external-resource/abc123", NULL, api_auth);
    ck_assert_int_eq(r.status, 404);
    http_free(&r);

    json_t *stats = get_stats();
    json_t *gets = json_object_get(stats, "resource_gets");
    ck_assert_int_eq(json_integer_value(json_object_get(gets, "abc123")), 3);
    ck_assert_int_eq(json_integer_value(json_object_get(gets, "missing-1")), 1);
    ck_assert_int_eq(json_integer_value(json_object_get(gets, "custom-1")), 1);
    json_decref(stats);

    /* Unknown routes, wrong methods, oversized bodies. */
    http(&r, "GET", "/nowhere", NULL, NULL);
    ck_assert_int_eq(r.status, 404);
    http_free(&r);
    http(&r, "GET", "/api/v1/external-resource", NULL, api_auth);
    ck_assert_int_eq(r.status, 405);
    http_free(&r);
    http(&r, "DELETE", "/api/v1/status/x", NULL, api_auth);
    ck_assert_int_eq(r.status, 405);
    http_free(&r);
    size_t big = 2 * 1024 * 1024;
    char *huge = malloc(big + 1);
    ck_assert_ptr_nonnull(huge);
    memset(huge, ' ', big);
    huge[big] = '\0';
    submit(&r, huge, "job-big");
    ck_assert_int_eq(r.status, 413);
    http_free(&r);
    free(huge);
    stop_mock();
}
END_TEST

START_TEST(test_oauth2_flow)
{
    start_mock("--auth", "oauth2", "--token-ttl", "1", NULL);
    http_resp r;
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, NULL);
    ck_assert_int_eq(r.status, 401);
    http_free(&r);
    http(&r, "POST", "/oauth/token",
         "grant_type=client_credentials&client_id=test-client&client_secret=wrong", NULL);
    ck_assert_int_eq(r.status, 401);
    ck_assert_str_eq(json_str(&r, "error"), "unauthorized");
    http_free(&r);
    http(&r, "POST", "/oauth/token", "grant_type=password", NULL);
    ck_assert_int_eq(r.status, 400);
    http_free(&r);

    http(&r, "POST", "/oauth/token",
         "grant_type=client_credentials&client_id=test-client&client_secret=test-client-secret",
         NULL);
    ck_assert_int_eq(r.status, 200);
    ck_assert_str_eq(json_str(&r, "token_type"), "Bearer");
    ck_assert_int_eq(json_integer_value(json_object_get(r.json, "expires_in")), 1);
    char bearer[256];
    snprintf(bearer, sizeof bearer, "Authorization: Bearer %s", json_str(&r, "access_token"));
    http_free(&r);

    /* HTTP Basic client authentication works too. */
    const char *basic[] = {"Authorization: Basic dGVzdC1jbGllbnQ6dGVzdC1jbGllbnQtc2VjcmV0", NULL};
    http(&r, "POST", "/oauth/token", "grant_type=client_credentials", basic);
    ck_assert_int_eq(r.status, 200);
    ck_assert_ptr_nonnull(json_str(&r, "access_token"));
    http_free(&r);

    const char *with_token[] = {bearer, NULL};
    const char *bad_token[] = {"Authorization: Bearer nope", NULL};
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, bad_token);
    ck_assert_int_eq(r.status, 401);
    http_free(&r);
    http(&r, "GET", "/api/v1/external-resource/abc", NULL, with_token);
    ck_assert_int_eq(r.status, 200);
    http_free(&r);

    json_t *stats = get_stats();
    ck_assert_int_eq(stat_int(stats, "tokens_issued"), 2);
    ck_assert_int_eq(route_count(stats, "POST /oauth/token", "200"), 2);
    json_decref(stats);

    /* The token expires after its TTL. */
    int64_t deadline = now_ms() + 3000;
    for (;;) {
        http(&r, "GET", "/api/v1/external-resource/abc", NULL, with_token);
        long status = r.status;
        http_free(&r);
        if (status == 401)
            break;
        ck_assert_int_eq(status, 200);
        ck_assert_msg(now_ms() < deadline, "token never expired");
        iwt_sleep_ms(50);
    }
    stop_mock();
}
END_TEST

/* Many slow requests at once: they overlap instead of queueing on threads. */
START_TEST(test_latency_concurrency)
{
    enum { N = 200 };
    start_mock("--latency-ms", "200", "--auth", "none", NULL);
    CURLM *multi = curl_multi_init();
    ck_assert_ptr_nonnull(multi);
    static http_resp resps[N];
    CURL *easies[N];
    struct curl_slist *lists[N];
    for (int i = 0; i < N; i++) {
        char path[64];
        snprintf(path, sizeof path, "/api/v1/external-resource/c%d", i);
        easies[i] = make_easy(&resps[i], "GET", path, NULL, NULL, &lists[i]);
        curl_easy_setopt(easies[i], CURLOPT_FRESH_CONNECT, 1L);
        curl_multi_add_handle(multi, easies[i]);
    }
    int64_t t0 = now_ms();
    int running = 1;
    while (running) {
        ck_assert_int_eq(curl_multi_perform(multi, &running), CURLM_OK);
        if (running)
            curl_multi_poll(multi, NULL, 0, 100, NULL);
    }
    int64_t elapsed = now_ms() - t0;
    for (int i = 0; i < N; i++) {
        finish_easy(&resps[i], easies[i]);
        ck_assert_int_eq(resps[i].status, 200);
        http_free(&resps[i]);
        curl_multi_remove_handle(multi, easies[i]);
        curl_easy_cleanup(easies[i]);
        curl_slist_free_all(lists[i]);
    }
    curl_multi_cleanup(multi);
    ck_assert_int_ge(elapsed, 190);
    ck_assert_msg(elapsed < 2000, "200 requests of 200 ms took %lld ms", (long long)elapsed);

    json_t *stats = get_stats();
    ck_assert_int_ge(stat_int(stats, "max_in_flight"), N / 2);
    json_decref(stats);
    /* A request leaves in_flight once MHD has finished with it, which may be
     * just after the client has read its answer. */
    for (int64_t deadline = now_ms() + 3000;; iwt_sleep_ms(10)) {
        stats = get_stats();
        long long in_flight = stat_int(stats, "in_flight");
        json_decref(stats);
        if (in_flight == 0)
            break;
        ck_assert_msg(now_ms() < deadline, "in_flight stays at %lld", in_flight);
    }

    /* A stop answers delayed requests instead of dropping them. */
    http_resp r;
    post_admin("/__admin/faults", "{\"latency_ms\":60000}", 200);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        http(&r, "GET", "/api/v1/external-resource/late", NULL, NULL);
        _exit(r.status == 200 ? 0 : 1);
    }
    for (int64_t deadline = now_ms() + 3000;; iwt_sleep_ms(10)) {
        ck_assert(now_ms() < deadline);
        stats = get_stats();
        long long in_flight = stat_int(stats, "in_flight");
        json_decref(stats);
        if (in_flight == 1)
            break;
    }
    stop_mock();
    int status;
    waitpid(pid, &status, 0);
    ck_assert(WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
}
END_TEST

static Suite *mock_provider_suite(void)
{
    Suite *s = suite_create("mock_provider");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_bad_flag_and_help);
    tcase_add_test(tc, test_auth_api_key);
    tcase_add_test(tc, test_auth_basic);
    tcase_add_test(tc, test_submit_and_idempotent_replay);
    tcase_add_test(tc, test_status_progression);
    tcase_add_test(tc, test_status_by_age);
    tcase_add_test(tc, test_rate_limit);
    tcase_add_test(tc, test_fail_hooks);
    tcase_add_test(tc, test_admin_faults);
    tcase_add_test(tc, test_outage);
    tcase_add_test(tc, test_resource_shapes);
    tcase_add_test(tc, test_oauth2_flow);
    tcase_add_test(tc, test_latency_concurrency);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    SRunner *sr = srunner_create(mock_provider_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    curl_global_cleanup();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
