/* The floor under the worker's memory per call in flight: what libcurl alone
 * holds for N concurrent HTTP/1.1 POSTs (one easy handle and one keep-alive
 * connection each) against the mock provider, in this process.
 *
 *   bench_curl_memory [--calls N] [--latency-ms L]
 *
 * Prints the resident set before, after creating the handles and at its peak
 * while every call is in flight, per call.  The worker's own figure
 * (bench_submit --concurrency N --latency-ms 1000: peak RSS / N) cannot go
 * below this one while each call in flight has its own connection. */
#include <curl/curl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iwtest.h"

static size_t discard(char *p, size_t size, size_t n, void *ud)
{
    (void)p;
    (void)ud;
    return size * n;
}

static long rss_kb(void)
{
    return iwt_status_kb(getpid(), "VmRSS");
}

int main(int argc, char **argv)
{
    long calls = 2048, latency = 1000, done = 0;
    char lat[32], url[128];
    int port, running = 1;

    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(argv[i], "--calls"))
            calls = atol(v), i++;
        else if (!strcmp(argv[i], "--latency-ms"))
            latency = atol(v), i++;
        else {
            fprintf(stderr, "usage: %s [--calls N] [--latency-ms L]\n", argv[0]);
            return 2;
        }
    }
    if (calls < 1 || calls > 100000)
        return 2;
    iwt_standalone = 1;
    snprintf(lat, sizeof lat, "%ld", latency);
    const char *mock_args[] = {"--latency-ms", lat, "--rate-limits", "off", NULL};
    pid_t mock = iwt_start_mock(mock_args, &port);
    snprintf(url, sizeof url, "http://127.0.0.1:%d/api/v1/external-resource", port);

    curl_global_init(CURL_GLOBAL_DEFAULT);
    CURLM *multi = curl_multi_init();
    CURL **easy = calloc((size_t)calls, sizeof *easy);
    curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, calls);
    long before = rss_kb();
    for (long i = 0; i < calls; i++) {
        easy[i] = curl_easy_init();
        curl_easy_setopt(easy[i], CURLOPT_URL, url);
        curl_easy_setopt(easy[i], CURLOPT_WRITEFUNCTION, discard);
        curl_easy_setopt(easy[i], CURLOPT_BUFFERSIZE, 1024L); /* as the worker */
        curl_easy_setopt(easy[i], CURLOPT_POSTFIELDS,
                         "{\"userId\":\"u-1\",\"action\":\"transaction\",\"payload\":{}}");
        curl_multi_add_handle(multi, easy[i]);
    }
    long created = rss_kb(), peak = created;
    while (running) {
        CURLMsg *msg;
        int left;
        curl_multi_perform(multi, &running);
        while ((msg = curl_multi_info_read(multi, &left)))
            if (msg->msg == CURLMSG_DONE && msg->data.result == CURLE_OK)
                done++;
        curl_multi_poll(multi, NULL, 0, 100, NULL);
        long now = rss_kb();
        if (now > peak)
            peak = now;
    }
    printf("bench_curl_memory: %ld concurrent POSTs (%ld answered), provider %ld ms\n", calls, done,
           latency);
    printf("  RSS before %.1f MB, handles created %.1f MB, peak %.1f MB\n", before / 1024.0,
           created / 1024.0, peak / 1024.0);
    printf("  libcurl per call in flight: %.1f KB (%.1f KB of it the easy handle)\n",
           (double)(peak - before) / (double)calls, (double)(created - before) / (double)calls);
    for (long i = 0; i < calls; i++) {
        curl_multi_remove_handle(multi, easy[i]);
        curl_easy_cleanup(easy[i]);
    }
    free(easy);
    curl_multi_cleanup(multi);
    curl_global_cleanup();
    iwt_stop(mock, SIGTERM);
    return done == calls ? 0 : 1;
}
