/* json_read (yajl's lexer, jansson's values) against json_loadb on the two
 * documents of every job: the submission message and the provider's answer
 * to its POST, as the benchmarks and the mock send them; and a job whose
 * payload is an order of 22 items (about 2 KB).
 *
 *   bench_json_read [--rounds N]
 *
 * Alternates the two readers over N parses of each document (default
 * 200,000) and prints the time a parse takes with each and their ratio.  The
 * values are checked equal before anything is timed. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "json_read.h"

static const char *docs[] = {
    NULL, /* a job with a payload of 2 KB: filled in by main */
    "{\"jobId\":\"b-1-123456\",\"userId\":\"u-123456\",\"action\":\"transaction\","
    "\"payload\":{\"amount\":123456,\"currency\":\"EUR\"}}",
    "{\"id\":\"sub-000123456\",\"status\":\"pending\",\"message\":"
    "\"Request received and queued for processing\",\"trackingId\":"
    "\"trk-5f0c1c2a-9a51-4c3e-8d0e-3b1a7c9d2e4f\"}",
};

/* {"jobId":..,"payload":{"items":[{"sku":..,"name":..,"qty":..,"price":..},..]}} */
static const char *big_job(void)
{
    static char text[4096];
    size_t n = (size_t)snprintf(text, sizeof text,
                                "{\"jobId\":\"b-3-1\",\"userId\":\"u-1\",\"action\":"
                                "\"order\",\"payload\":{\"currency\":\"EUR\",\"items\":[");

    for (int i = 0; i < 22; i++)
        n += (size_t)snprintf(text + n, sizeof text - n,
                              "%s{\"sku\":\"SKU-%06d\",\"name\":\"Item number %d of the "
                              "order\",\"qty\":%d,\"price\":%d.%02d}",
                              i ? "," : "", 100000 + i, i, 1 + i % 5, 10 + i, i);
    snprintf(text + n, sizeof text - n, "]}}");
    return text;
}

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Seconds for n parses of text with the reader (0 json_loadb, 1 json_read). */
static double run(int reader, const char *text, size_t len, long n)
{
    double t0 = now_s();

    for (long i = 0; i < n; i++) {
        json_t *v = reader ? json_read(text, len, JSON_REJECT_DUPLICATES, NULL)
                           : json_loadb(text, len, JSON_REJECT_DUPLICATES, NULL);
        if (!v) {
            fprintf(stderr, "bench_json_read: a document did not parse\n");
            exit(1);
        }
        json_decref(v);
    }
    return now_s() - t0;
}

int main(int argc, char **argv)
{
    long rounds = 200000;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--rounds") && i + 1 < argc) {
            rounds = strtol(argv[++i], NULL, 10);
        } else {
            fprintf(stderr, "usage: bench_json_read [--rounds N]\n");
            return 2;
        }
    }
    if (rounds < 10)
        rounds = 10;
    docs[0] = big_job();
    for (size_t d = 0; d < sizeof docs / sizeof *docs; d++) {
        size_t len = strlen(docs[d]);
        json_t *a = json_loadb(docs[d], len, 0, NULL), *b = json_read_plain(docs[d], len, 0);
        double t[2] = {0, 0};

        if (!a || !b || !json_equal(a, b)) {
            fprintf(stderr, "bench_json_read: the readers differ on document %zu\n", d + 1);
            return 1;
        }
        json_decref(a);
        json_decref(b);
        for (int pass = 0; pass < 10; pass++) /* alternating, in tenths */
            for (int r = 0; r < 2; r++)
                t[r] += run(r, docs[d], len, rounds / 10);
        printf("document %zu (%zu bytes): json_loadb %.0f ns, json_read %.0f ns a parse "
               "(%.2fx)\n",
               d + 1, len, t[0] / (double)rounds * 1e9, t[1] / (double)rounds * 1e9, t[1] / t[0]);
    }
    return 0;
}
