/* Benchmark of the submit path on real RabbitMQ, Redis and mock-provider.
 *
 *   bench_submit [--jobs N] [--latency-ms L] [--concurrency C] [--procs P]
 *                [--rate-limits SPEC] [--mock-limits SPEC] [--paced N] [--paced-rate R]
 *                [--items K]
 *
 * Phase 1 (throughput): publish N jobs at once, wait for N submission.accepted;
 * jobs/s = N / (last accepted - first publish).
 * Phase 2 (latency): publish `paced` jobs at R/s and measure publish ->
 * submission.accepted minus the provider's configured latency: the time the
 * worker, broker and Redis add per job.
 * Then the worker's peak RSS (VmHWM) and the mock's stats (429s, submissions).
 * --items K gives every job of phase 1 a payload of K order lines (about 80
 * bytes each) instead of an amount and a currency. */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iwtest.h"

/* Index of a jobId "b-<run>-<i>" -> i, or -1. */
static long job_index(const char *id)
{
    const char *dash = strrchr(id, '-');
    return dash ? atol(dash + 1) : -1;
}

static double workers_cpu(const pid_t *workers, long procs)
{
    double sum = 0;
    for (long p = 0; p < procs; p++)
        sum += iwt_cpu_seconds(workers[p]);
    return sum;
}

int main(int argc, char **argv)
{
    long jobs = 20000, latency = 0, concurrency = 64, procs = 1, paced = 2000, paced_rate = 200,
         prefetch = 0, items = 0;
    const char *limits = "1000000/s", *mock_limits = "off", *linger = NULL;
    char lat[32], buf[16384], conc[64], lim[128], pf[64], lg[64];
    int port;

    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(argv[i], "--jobs"))
            jobs = atol(v), i++;
        else if (!strcmp(argv[i], "--latency-ms"))
            latency = atol(v), i++;
        else if (!strcmp(argv[i], "--concurrency"))
            concurrency = atol(v), i++;
        else if (!strcmp(argv[i], "--procs"))
            procs = atol(v), i++;
        else if (!strcmp(argv[i], "--rate-limits"))
            limits = v, i++;
        else if (!strcmp(argv[i], "--mock-limits"))
            mock_limits = v, i++;
        else if (!strcmp(argv[i], "--paced"))
            paced = atol(v), i++;
        else if (!strcmp(argv[i], "--paced-rate"))
            paced_rate = atol(v), i++;
        else if (!strcmp(argv[i], "--prefetch"))
            prefetch = atol(v), i++;
        else if (!strcmp(argv[i], "--linger"))
            linger = v, i++;
        else if (!strcmp(argv[i], "--items"))
            items = atol(v), i++;
        else {
            fprintf(stderr,
                    "usage: %s [--jobs N] [--latency-ms L] [--concurrency C] [--procs P] "
                    "[--rate-limits SPEC] [--mock-limits SPEC] [--paced N] [--paced-rate R] "
                    "[--prefetch N] [--linger DURATION] [--items K]\n",
                    argv[0]);
            return 2;
        }
    }
    if (items < 0 || items > 150) {
        fprintf(stderr, "bench_submit: --items is 0 to 150\n");
        return 2;
    }
    if (procs < 1 || procs > 16 || jobs < 1)
        return 2;
    iwt_standalone = 1;

    snprintf(lat, sizeof lat, "%ld", latency);
    const char *mock_args[] = {"--latency-ms", lat, "--rate-limits", mock_limits, NULL};
    pid_t mock = iwt_start_mock(mock_args, &port);
    const char *ns = iwt_namespace("bench");
    iwt_cleanup(ns);
    iwt_declare(ns);

    snprintf(conc, sizeof conc, "IW_CONCURRENCY=%ld", concurrency);
    snprintf(lim, sizeof lim, "IW_RATE_LIMITS=%s", limits);
    snprintf(pf, sizeof pf, "IW_PREFETCH=%ld", prefetch); /* 0: the worker's default */
    snprintf(lg, sizeof lg, "IW_TURN_LINGER=%s", linger ? linger : ""); /* none: the default */
    const char *env[] = {
        conc, lim, "IW_LOG_LEVEL=info", "IW_POLL_SCHEDULE=1h", pf, linger ? lg : NULL, NULL};
    pid_t workers[16];
    for (long p = 0; p < procs; p++) {
        char tag[32];
        snprintf(tag, sizeof tag, "bench%ld", p);
        workers[p] = iwt_start_worker("submitter", ns, port, env, tag);
    }
    iwt_amqp *pub = iwt_amqp_open();
    iwt_amqp *tap = iwt_amqp_open();
    iwt_tap_events(tap, ns, "submission.*");
    iwt_sleep_ms(500); /* let the workers connect and consume */
    long idle_kb = 0;  /* a connected worker with nothing to do: what every process costs */
    for (long p = 0; p < procs; p++) {
        long kb = iwt_status_kb(workers[p], "VmRSS");
        if (kb > idle_kb)
            idle_kb = kb;
    }

    /* ---- phase 1: throughput ---- */
    long long *accepted_at = calloc((size_t)jobs, sizeof *accepted_at);
    long long t0 = iwt_now_ms(), first_accept = 0, last_accept = 0;
    long got = 0, failed = 0, dup = 0;
    double cpu_first = 0, cpu_last = 0; /* the workers' CPU seconds at the first and last accept */
    for (long i = 0; i < jobs; i++) {
        if (!items) {
            snprintf(buf, sizeof buf,
                     "{\"jobId\":\"b-1-%ld\",\"userId\":\"u-%ld\",\"action\":\"transaction\","
                     "\"payload\":{\"amount\":%ld,\"currency\":\"EUR\"}}",
                     i, i % 97, i);
        } else {
            size_t n = (size_t)snprintf(buf, sizeof buf,
                                        "{\"jobId\":\"b-1-%ld\",\"userId\":\"u-%ld\",\"action\":"
                                        "\"transaction\",\"payload\":{\"currency\":\"EUR\","
                                        "\"items\":[",
                                        i, i % 97);
            for (long k = 0; k < items; k++)
                n += (size_t)snprintf(buf + n, sizeof buf - n,
                                      "%s{\"sku\":\"SKU-%06ld\",\"name\":\"Item %ld of the "
                                      "order\",\"qty\":%ld,\"price\":%ld.%02ld}",
                                      k ? "," : "", 100000 + k, k, 1 + k % 5, 10 + k, k % 100);
            snprintf(buf + n, sizeof buf - n, "]}}");
        }
        iwt_publish_job(pub, ns, buf);
    }
    long long published = iwt_now_ms();
    long long deadline = published + 600000;
    while (got + failed < jobs && iwt_now_ms() < deadline) {
        iwt_msg *m = iwt_next_event(tap, 2000);
        if (!m)
            continue;
        long idx = job_index(m->correlation_id);
        if (!strcmp(m->routing_key, "submission.accepted") && idx >= 0 && idx < jobs) {
            if (accepted_at[idx])
                dup++;
            else {
                accepted_at[idx] = iwt_now_ms();
                got++;
                if (!first_accept) {
                    first_accept = accepted_at[idx];
                    cpu_first = workers_cpu(workers, procs);
                }
                last_accept = accepted_at[idx];
                if (got == jobs)
                    cpu_last = workers_cpu(workers, procs);
            }
        } else if (!strcmp(m->routing_key, "submission.failed")) {
            failed++;
        }
        iwt_msg_free(m);
    }
    double secs = (last_accept - t0) / 1000.0;
    double steady =
        last_accept > first_accept ? (got - 1) / ((last_accept - first_accept) / 1000.0) : 0;

    /* ---- phase 2: paced latency ---- */
    long n_lat = 0;
    long long *lat_ms = calloc((size_t)(paced ? paced : 1), sizeof *lat_ms);
    long long *sent = calloc((size_t)(paced ? paced : 1), sizeof *sent);
    if (paced > 0 && got == jobs) {
        long long start = iwt_now_ms();
        long next = 0;
        while ((n_lat < paced) && iwt_now_ms() < start + 120000 + paced * 1000 / paced_rate) {
            long long now = iwt_now_ms();
            while (next < paced && now >= start + next * 1000 / paced_rate) {
                snprintf(buf, sizeof buf,
                         "{\"jobId\":\"b-2-%ld\",\"userId\":\"u\",\"action\":\"transaction\","
                         "\"payload\":{\"amount\":%ld}}",
                         next, next);
                sent[next] = iwt_now_ms();
                iwt_publish_job(pub, ns, buf);
                next++;
            }
            iwt_msg *m = iwt_next_event(tap, 2);
            if (!m)
                continue;
            long idx = job_index(m->correlation_id);
            if (!strcmp(m->routing_key, "submission.accepted") &&
                !strncmp(m->correlation_id, "b-2-", 4) && idx >= 0 && idx < paced)
                lat_ms[n_lat++] = iwt_now_ms() - sent[idx] - latency;
            iwt_msg_free(m);
        }
        iwt_sort_ll(lat_ms, (size_t)n_lat);
    }

    long rss_max = 0;
    for (long p = 0; p < procs; p++) {
        long kb = iwt_peak_rss_kb(workers[p]);
        if (kb > rss_max)
            rss_max = kb;
    }
    json_t *stats = iwt_mock_stats(port);
    long created = (long)json_integer_value(json_object_get(stats, "submissions_created"));
    long r429 = (long)json_integer_value(json_object_get(stats, "rate_limited"));

    printf(
        "bench_submit: jobs=%ld procs=%ld concurrency=%ld provider_latency_ms=%ld rate_limits=%s "
        "mock_limits=%s\n",
        jobs, procs, concurrency, latency, limits, mock_limits);
    printf("  throughput: %ld accepted, %ld failed, %ld duplicate events in %.2f s -> %.0f jobs/s "
           "(steady state %.0f jobs/s; publishing took %.2f s)\n",
           got, failed, dup, secs, secs > 0 ? got / secs : 0.0, steady, (published - t0) / 1000.0);
    if (n_lat)
        printf("  added latency (publish -> submission.accepted, provider time excluded) at %ld "
               "jobs/s: p50 %lld ms, p99 %lld ms (n=%ld)\n",
               paced_rate, lat_ms[n_lat / 2], lat_ms[(n_lat * 99) / 100], n_lat);
    if (got == jobs && got > 1)
        printf(
            "  worker CPU per job (first to last accepted): %.1f us (%.2f CPU s per 1,000 jobs)\n",
            (cpu_last - cpu_first) * 1e6 / (double)(got - 1),
            (cpu_last - cpu_first) * 1000 / (double)(got - 1));
    printf("  worker peak RSS: %.1f MB (max over %ld process(es)); idle %.1f MB\n",
           rss_max / 1024.0, procs, idle_kb / 1024.0);
    printf("  per call in flight: %.1f KB of the peak, %.1f KB above the idle worker\n",
           (double)rss_max / (double)concurrency,
           (double)(rss_max - idle_kb) / (double)concurrency);
    printf("  mock: submissions_created=%ld rate_limited(429)=%ld\n", created, r429);
    json_decref(stats);

    for (long p = 0; p < procs; p++)
        iwt_stop(workers[p], SIGTERM);
    iwt_stop(mock, SIGTERM);
    iwt_amqp_close(pub);
    iwt_amqp_close(tap);
    iwt_cleanup(ns);
    free(accepted_at);
    free(lat_ms);
    free(sent);
    return got == jobs && r429 == 0 ? 0 : 1;
}
