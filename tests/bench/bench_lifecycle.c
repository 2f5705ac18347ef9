/* Benchmark of a job's whole life on real RabbitMQ, Redis and mock-provider:
 * submission, status checks through the delay tiers, status.final.
 *
 *   bench_lifecycle [--jobs N] [--mode all|split] [--pollers P] [--poll-schedule D]
 *                   [--concurrency C] [--checks K] [--jitter PCT]
 *
 * Starts a mock (--checks-to-complete K, default 3, no rate limits), declares
 * a fresh namespace, starts one `integration-worker all` (or, with --mode
 * split, one submitter and P poller processes), publishes N jobs at once and
 * counts every status.final per jobId on a tap of <ns>.events.  Prints jobs/s
 * (N / time from the first publish to the last status.final), duplicates and
 * missing finals (both must be 0) and the mock's statistics
 * (submissions_created must be N, rate_limited 0).  Exit 0 when all hold. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iwtest.h"

#define MAX_PROCS 16
/* After the last final: how long to keep listening for duplicates. */
#define DUPLICATE_WINDOW_MS 3000
/* Give up when no event arrives for this long. */
#define IDLE_TIMEOUT_MS 60000

/* "lc-<i>" -> i, or -1. */
static long job_index(const char *id, long n)
{
    if (strncmp(id, "lc-", 3) != 0)
        return -1;
    long i = atol(id + 3);
    return i >= 0 && i < n ? i : -1;
}

static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s [--jobs N] [--mode all|split] [--pollers P] [--poll-schedule D] "
            "[--concurrency C] [--checks K] [--jitter PCT]\n",
            argv0);
}

int main(int argc, char **argv)
{
    long jobs = 10000, pollers = 1, concurrency = 64, checks = 3, jitter = 0;
    const char *mode = "all", *schedule = "250ms";
    char buf[512], conc[64], sched[64], kbuf[24];
    pid_t procs[MAX_PROCS];
    long n_procs = 0;
    int port;

    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(argv[i], "--jobs"))
            jobs = atol(v), i++;
        else if (!strcmp(argv[i], "--mode"))
            mode = v, i++;
        else if (!strcmp(argv[i], "--pollers"))
            pollers = atol(v), i++;
        else if (!strcmp(argv[i], "--poll-schedule"))
            schedule = v, i++;
        else if (!strcmp(argv[i], "--concurrency"))
            concurrency = atol(v), i++;
        else if (!strcmp(argv[i], "--checks"))
            checks = atol(v), i++;
        else if (!strcmp(argv[i], "--jitter"))
            jitter = atol(v), i++;
        else {
            usage(argv[0]);
            return 2;
        }
    }
    if (jobs < 1 || pollers < 1 || pollers > MAX_PROCS - 1 || checks < 1 ||
        (strcmp(mode, "all") && strcmp(mode, "split"))) {
        usage(argv[0]);
        return 2;
    }
    iwt_standalone = 1;

    snprintf(kbuf, sizeof kbuf, "%ld", checks);
    const char *mock_args[] = {"--checks-to-complete", kbuf, "--rate-limits", "off", NULL};
    pid_t mock = iwt_start_mock(mock_args, &port);
    const char *ns = iwt_namespace("lifecycle");
    iwt_cleanup(ns);
    iwt_declare(ns);

    snprintf(conc, sizeof conc, "IW_CONCURRENCY=%ld", concurrency);
    snprintf(sched, sizeof sched, "IW_POLL_SCHEDULE=%s", schedule);
    /* the `all` worker serves /metrics: its delivery counters give the broker
     * messages a job's life cost */
    int http_port = iwt_free_port();
    char http_addr[64];
    snprintf(http_addr, sizeof http_addr, "IW_HTTP_ADDR=127.0.0.1:%d", http_port);
    char jit[64];
    snprintf(jit, sizeof jit, "IW_POLL_JITTER=%ld", jitter);
    const char *env[] = {conc, sched, jit, "IW_RATE_LIMITS=1000000/s", "IW_LOG_LEVEL=info",
                         NULL, NULL};
    if (!strcmp(mode, "all")) {
        env[5] = http_addr;
        procs[n_procs++] = iwt_start_worker("all", ns, port, env, "bench-all");
    } else {
        procs[n_procs++] = iwt_start_worker("submitter", ns, port, env, "bench-submitter");
        for (long p = 0; p < pollers; p++) {
            char tag[32];
            snprintf(tag, sizeof tag, "bench-poller%ld", p);
            procs[n_procs++] = iwt_start_worker("poller", ns, port, env, tag);
        }
    }
    iwt_amqp *pub = iwt_amqp_open();
    iwt_amqp *tap = iwt_amqp_open();
    iwt_tap_events(tap, ns, "#");
    iwt_sleep_ms(500); /* let the workers connect and consume */

    int *finals = calloc((size_t)jobs, sizeof *finals);
    long long *final_at = calloc((size_t)jobs, sizeof *final_at);
    long accepted = 0, failed = 0, progress = 0, got = 0, dup = 0, foreign = 0;
    long long t0 = iwt_now_ms(), last_final = 0, last_event = t0;

    for (long i = 0; i < jobs; i++) {
        snprintf(buf, sizeof buf,
                 "{\"jobId\":\"lc-%ld\",\"userId\":\"u-%ld\",\"action\":\"transaction\","
                 "\"payload\":{\"amount\":%ld,\"currency\":\"EUR\"}}",
                 i, i % 97, i);
        iwt_publish_job(pub, ns, buf);
    }
    long long published = iwt_now_ms();
    long long done_at = 0;
    for (;;) {
        long long now = iwt_now_ms();
        if (got + failed >= jobs && !done_at)
            done_at = now;
        if (done_at && now - done_at >= DUPLICATE_WINDOW_MS)
            break;
        if (now - last_event > IDLE_TIMEOUT_MS)
            break;
        iwt_msg *m = iwt_next_event(tap, 500);
        if (!m)
            continue;
        last_event = iwt_now_ms();
        long idx = job_index(m->correlation_id, jobs);
        if (idx < 0)
            foreign++;
        else if (!strcmp(m->routing_key, "status.final")) {
            if (finals[idx]++)
                dup++;
            else {
                got++;
                final_at[idx] = last_event - t0;
                last_final = last_event;
            }
        } else if (!strcmp(m->routing_key, "submission.accepted"))
            accepted++;
        else if (!strcmp(m->routing_key, "submission.failed"))
            failed++;
        else if (!strcmp(m->routing_key, "status.progress"))
            progress++;
        iwt_msg_free(m);
    }

    long missing = 0;
    for (long i = 0; i < jobs; i++)
        if (!finals[i])
            missing++;
    iwt_sort_ll(final_at, (size_t)jobs);
    long rss_max = 0;
    for (long p = 0; p < n_procs; p++) {
        long kb = iwt_peak_rss_kb(procs[p]);
        if (kb > rss_max)
            rss_max = kb;
    }
    /* Broker messages per job, as the worker sees them: every delivery is
     * one consume and one ack (or nack); every delivery but the N jobs was
     * published by the worker (status checks, delay-tier hops), and so was
     * every event. */
    double recv = -1, delayed = -1;
    char *metrics = NULL;
    if (!strcmp(mode, "all") && iwt_http_get(http_port, "/metrics", &metrics) == 200) {
        recv = iwt_metric(metrics, "iw_deliveries_total{role=\"submitter\",action=\"received\"}") +
               iwt_metric(metrics, "iw_deliveries_total{role=\"poller\",action=\"received\"}");
        delayed =
            iwt_metric(metrics, "iw_deliveries_total{role=\"submitter\",action=\"delayed\"}") +
            iwt_metric(metrics, "iw_deliveries_total{role=\"poller\",action=\"delayed\"}");
    }
    free(metrics);
    json_t *stats = iwt_mock_stats(port);
    long created = (long)json_integer_value(json_object_get(stats, "submissions_created"));
    long r429 = (long)json_integer_value(json_object_get(stats, "rate_limited"));
    long status_checks = (long)json_integer_value(json_object_get(stats, "status_checks"));
    long dups_refused = (long)json_integer_value(json_object_get(stats, "duplicates_refused"));
    double secs = last_final > t0 ? (last_final - t0) / 1000.0 : 0;

    printf("bench_lifecycle: jobs=%ld mode=%s pollers=%ld concurrency=%ld poll_schedule=%s "
           "checks_to_complete=%ld\n",
           jobs, mode, !strcmp(mode, "all") ? 1 : pollers, concurrency, schedule, checks);
    printf("  status.final: %ld of %ld in %.2f s -> %.0f jobs/s (publishing took %.2f s; "
           "time to final p50 %.2f s, p99 %.2f s)\n",
           got, jobs, secs, secs > 0 ? got / secs : 0.0, (published - t0) / 1000.0,
           got ? final_at[jobs - got + (got - 1) / 2] / 1000.0 : 0.0,
           got ? final_at[jobs - got + ((got - 1) * 99) / 100] / 1000.0 : 0.0);
    printf("  duplicates of status.final: %ld   missing: %ld   submission.failed: %ld\n", dup,
           missing, failed);
    printf("  other events: submission.accepted %ld, status.progress %ld, unrelated %ld\n",
           accepted, progress, foreign);
    if (recv >= 0) {
        double events = (double)(accepted + progress + got + dup + failed);
        double publishes = recv - (double)jobs + events;
        printf("  broker messages per job: %.2f (%.2f deliveries + as many acks, %.2f publishes: "
               "%.2f events, %.2f status checks and delay-tier hops; %.2f deliveries went on to "
               "a delay tier)\n",
               (2 * recv + publishes) / (double)jobs, recv / (double)jobs, publishes / (double)jobs,
               events / (double)jobs, (recv - (double)jobs) / (double)jobs, delayed / (double)jobs);
    }
    printf("  worker peak RSS: %.1f MB (max over %ld process(es))\n", rss_max / 1024.0, n_procs);
    printf("  mock: submissions_created=%ld (want %ld) rate_limited=%ld status_checks=%ld "
           "duplicates_refused=%ld\n",
           created, jobs, r429, status_checks, dups_refused);
    char *text = json_dumps(json_object_get(stats, "requests"), JSON_COMPACT);
    printf("  mock requests: %s\n", text ? text : "?");
    free(text);
    json_decref(stats);

    for (long p = 0; p < n_procs; p++)
        iwt_stop(procs[p], SIGTERM);
    iwt_stop(mock, SIGTERM);
    iwt_amqp_close(pub);
    iwt_amqp_close(tap);
    iwt_cleanup(ns);
    free(finals);
    free(final_at);
    return dup == 0 && missing == 0 && failed == 0 && created == jobs && r429 == 0 ? 0 : 1;
}
