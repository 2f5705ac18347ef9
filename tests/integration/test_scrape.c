/* /metrics, /healthz and /readyz of a running worker (issue 11 item 2): the counters a
 * scrape shows agree with what the mock provider itself saw. (/readyz after losing Redis:
 * test_readyz.) */
#include <arpa/inet.h>
#include <check.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "iwtest.h"

#define ROUTE "POST /api/v1/external-resource"

typedef struct body {
    char *p;
    size_t n;
} body;

static size_t on_data(char *p, size_t size, size_t n, void *ud)
{
    body *b = ud;
    size_t k = size * n;
    char *q = realloc(b->p, b->n + k + 1);
    if (!q)
        return 0;
    memcpy(q + b->n, p, k);
    b->n += k;
    q[b->n] = '\0';
    b->p = q;
    return k;
}

/* GET http://127.0.0.1:port/path: the status (0 when unreachable) and the body. */
static long http_get(int port, const char *path, char **text)
{
    char url[128];
    body b = {0};
    long status = 0;
    CURL *c = curl_easy_init();

    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", port, path);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 3000L);
    if (curl_easy_perform(c) == CURLE_OK)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(c);
    if (text)
        *text = b.p;
    else
        free(b.p);
    return status;
}

static int free_port(void)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    close(fd);
    return ntohs(sa.sin_port);
}

/* The value of the sample `series` (name and labels exactly) in a scrape; -1 if absent. */
static double sample(const char *text, const char *series)
{
    size_t n = strlen(series);
    for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
        if (!strncmp(p, series, n) && p[n] == ' ')
            return strtod(p + n + 1, NULL);
    return -1;
}

typedef struct probe {
    int port;
    const char *path;
    long want; /* > 0: that status; 0: anything but 200 */
} probe;

static int answers(void *ud)
{
    probe *pr = ud;
    long s = http_get(pr->port, pr->path, NULL);
    return pr->want ? s == pr->want : (s != 200);
}

typedef struct accepted {
    iwt_amqp *a;
    int want, seen;
} accepted;

static int all_accepted(void *ud)
{
    accepted *acc = ud;
    iwt_msg *m;
    while ((m = iwt_next_event(acc->a, 50)) != NULL) {
        if (!strcmp(m->routing_key, "submission.accepted"))
            acc->seen++;
        iwt_msg_free(m);
    }
    return acc->seen >= acc->want;
}

START_TEST(scrape_agrees_with_the_mock)
{
    char ns[128], addr[64], *text = NULL;
    int mock_port, http_port = free_port();

    snprintf(ns, sizeof ns, "%s", iwt_namespace("scrape"));
    iwt_cleanup(ns);
    iwt_declare(ns);
    pid_t mock = iwt_start_mock(NULL, &mock_port);
    /* the first submission gets a 503 and is retried: a 5xx, a retry, then a 2xx */
    ck_assert_int_eq(
        iwt_mock_post(mock_port, "/__admin/faults", "{\"script\":{\"" ROUTE "\":[503]}}"), 200);
    iwt_amqp *a = iwt_amqp_open();
    iwt_tap_events(a, ns, "submission.*");
    snprintf(addr, sizeof addr, "IW_HTTP_ADDR=127.0.0.1:%d", http_port);
    const char *const env[] = {addr, "IW_RETRY_SCHEDULE=0s,200ms", NULL};
    pid_t w = iwt_start_worker("submitter", ns, mock_port, env, NULL);

    probe ready = {http_port, "/readyz", 200};
    ck_assert_msg(iwt_eventually(answers, &ready, 15000), "/readyz never 200");
    ck_assert_int_eq(http_get(http_port, "/healthz", NULL), 200);

    enum { JOBS = 10 };
    for (int i = 0; i < JOBS; i++) {
        char job[256];
        snprintf(job, sizeof job,
                 "{\"jobId\":\"scrape-%d\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{}}", i);
        iwt_publish_job(a, ns, job);
    }
    accepted acc = {a, JOBS, 0};
    ck_assert_msg(iwt_eventually(all_accepted, &acc, 30000), "%d of %d accepted", acc.seen, JOBS);

    json_t *st = iwt_mock_stats(mock_port);
    long created = iwt_stat(st, ROUTE, "201"), failed = iwt_stat(st, ROUTE, "503");
    json_decref(st);
    ck_assert_int_eq(created, JOBS);
    ck_assert_int_eq(failed, 1);

    ck_assert_int_eq(http_get(http_port, "/metrics", &text), 200);
    ck_assert_ptr_nonnull(text);
    ck_assert(sample(text, "iw_provider_requests_total{route=\"submit\",code=\"2xx\"}") == created);
    ck_assert(sample(text, "iw_provider_requests_total{route=\"submit\",code=\"5xx\"}") == failed);
    ck_assert(sample(text, "iw_provider_request_duration_seconds_count{route=\"submit\"}") ==
              created + failed);
    ck_assert(
        sample(text, "iw_provider_request_duration_seconds_bucket{route=\"submit\",le=\"+Inf\"}") ==
        created + failed);
    ck_assert(sample(text, "iw_jobs_total{role=\"submitter\",outcome=\"accepted\"}") == JOBS);
    ck_assert(sample(text, "iw_provider_down") == 0);
    ck_assert(sample(text, "iw_ready") == 1);
    ck_assert(strstr(text, "iw_build_info{version=\"") != NULL);
    free(text);

    ck_assert_int_eq(iwt_stop(w, SIGTERM), 0);
    iwt_stop(mock, SIGTERM);
    iwt_amqp_close(a);
    iwt_cleanup(ns);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("scrape");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, scrape_agrees_with_the_mock);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    curl_global_cleanup();
    return failed ? 1 : 0;
}
