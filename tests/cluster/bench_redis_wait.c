/* What WAIT costs, and what the shared state weighs in Redis.
 *
 *   build/bin/bench_redis_wait [--records 1000] [--batch 40] [--rounds 20]
 *
 * Starts a private master and replica on free loopback ports (never the shared
 * Redis), then writes job records the way the submitter does (SET key value NX
 * PX, pipelined per loop turn, `--batch` records per round trip) with and
 * without `WAIT 1 <ms>` after each batch, and prints the time per 1,000
 * records.  Then measures MEMORY USAGE of a job record, a final record and the
 * limiter's log per 1,000 permits (the real limiter script). */
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "iwtest.h"
#include "limiter.h"
#include "redis_link.h"

static int port_free(int port)
{
    struct sockaddr_in a;
    int fd = socket(AF_INET, SOCK_STREAM, 0), ok, one = 1;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

static pid_t start_redis(int port, int replica_of, const char *dir)
{
    char p[16], m[16];
    pid_t pid;
    snprintf(p, sizeof p, "%d", port);
    snprintf(m, sizeof m, "%d", replica_of);
    pid = fork();
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);
        dup2(fd, 1);
        dup2(fd, 2);
        if (replica_of)
            execlp("redis-server", "redis-server", "--port", p, "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", dir, "--replicaof", "127.0.0.1", m, (char *)NULL);
        else
            execlp("redis-server", "redis-server", "--port", p, "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", dir, (char *)NULL);
        _exit(127);
    }
    return pid;
}

static redis_link *link_to(int port)
{
    char url[64];
    iw_error err = {0};
    snprintf(url, sizeof url, "redis://127.0.0.1:%d/0", port);
    redis_link *r = redis_link_new(url, 2000, &err);
    if (!r || redis_link_ensure(r, &err) != IW_OK)
        return NULL;
    return r;
}

static int replica_synced(void *ud)
{
    redis_link *r = ud;
    iw_error err = {0};
    redisReply *rep = redis_link_command(r, &err, "ROLE");
    int ok = rep && rep->type == REDIS_REPLY_ARRAY && rep->elements >= 4 &&
             strcmp(rep->element[3]->str, "connected") == 0;
    if (rep)
        freeReplyObject(rep);
    if (!ok)
        redis_link_drop(r);
    return ok;
}

/* A job record as the submitter stores it (~190 bytes). */
static const char *RECORD = "{\"jobId\":\"bench-00000000\",\"externalId\":\"ext-5f0c2a9b1e\","
                            "\"trackingId\":\"trk-5f0c2a9b1e7d4c3a\",\"status\":\"pending\","
                            "\"acceptedAt\":\"2026-11-30T21:00:00.000Z\"}";

/* Writes n records in batches; with wait, WAIT 1 timeout after each batch.
 * Returns microseconds; *short_acks counts WAITs that saw no replica. */
static long long write_records(redis_link *r, const char *tag, int n, int batch, int wait,
                               long *short_acks)
{
    iw_error err = {0};
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int done = 0; done < n;) {
        int k = n - done < batch ? n - done : batch, replies = 0;
        for (int i = 0; i < k; i++, replies++)
            if (redis_link_append(r, &err, "SET bench:job:%s-%d %s NX PX %d", tag, done + i, RECORD,
                                  600000) != IW_OK)
                return -1;
        if (wait) {
            int w = redis_link_append_wait(r, 1, 100, &err);
            if (w < 0)
                return -1;
            replies += w;
        }
        for (int i = 0; i < replies; i++) {
            redisReply *rep;
            if (redis_link_read(r, &rep, &err) != IW_OK)
                return -1;
            if (wait && i == replies - 1 && redis_wait_check(rep, 1, &err) != IW_OK)
                (*short_acks)++;
            freeReplyObject(rep);
        }
        done += k;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    return (b.tv_sec - a.tv_sec) * 1000000LL + (b.tv_nsec - a.tv_nsec) / 1000;
}

static long long memory_usage(redis_link *r, const char *key)
{
    iw_error err = {0};
    redisReply *rep = redis_link_command(r, &err, "MEMORY USAGE %s SAMPLES 0", key);
    long long v = rep && rep->type == REDIS_REPLY_INTEGER ? rep->integer : -1;
    if (rep)
        freeReplyObject(rep);
    return v;
}

int main(int argc, char **argv)
{
    int records = 1000, batch = 40, rounds = 20, base = 30000 + getpid() % 5000 * 2;
    char dir[] = "/tmp/iw-bench-wait-XXXXXX";
    long short_acks = 0;
    int rc = 1;

    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--records"))
            records = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--batch"))
            batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--rounds"))
            rounds = atoi(argv[i + 1]);
    }
    if (records < 1 || batch < 1 || rounds < 1) {
        fprintf(stderr, "usage: bench_redis_wait [--records N] [--batch B] [--rounds R]\n");
        return 2;
    }
    iwt_standalone = 1;
    while (!port_free(base) || !port_free(base + 1))
        base += 2;
    if (!mkdtemp(dir))
        return 1;
    pid_t master = start_redis(base, 0, dir);
    usleep(200000);
    pid_t replica = start_redis(base + 1, base, dir);
    redis_link *m = NULL, *rep_link = NULL;
    for (int i = 0; i < 100 && !(m = link_to(base)); i++)
        usleep(100000);
    for (int i = 0; i < 100 && !(rep_link = link_to(base + 1)); i++)
        usleep(100000);
    if (!m || !rep_link || !iwt_eventually(replica_synced, rep_link, 20000)) {
        fprintf(stderr, "private master/replica did not start\n");
        goto out;
    }

    printf("records per round: %d, batch %d, rounds %d (master :%d, replica :%d)\n", records, batch,
           rounds, base, base + 1);
    long long *plain = calloc((size_t)rounds, sizeof *plain);
    long long *waited = calloc((size_t)rounds, sizeof *waited);
    if (!plain || !waited)
        goto out;
    for (int k = 0; k < rounds; k++) {
        char tag[32];
        snprintf(tag, sizeof tag, "p%d", k);
        long long p = write_records(m, tag, records, batch, 0, &short_acks);
        snprintf(tag, sizeof tag, "w%d", k);
        long long w = write_records(m, tag, records, batch, 1, &short_acks);
        if (p < 0 || w < 0) {
            fprintf(stderr, "Redis error during the benchmark\n");
            goto out;
        }
        plain[k] = p;
        waited[k] = w;
    }
    /* medians: the machine is shared, means swing with the neighbours' load */
    iwt_sort_ll(plain, (size_t)rounds);
    iwt_sort_ll(waited, (size_t)rounds);
    long long best_plain = plain[0], best_wait = waited[0];
    double per1k_plain = plain[rounds / 2] * 1000.0 / records / 1000.0;
    double per1k_wait = waited[rounds / 2] * 1000.0 / records / 1000.0;
    free(plain);
    free(waited);
    int batches = (records + batch - 1) / batch;
    printf("SET alone:     %.2f ms per 1,000 records (median round; best %.2f ms)\n", per1k_plain,
           best_plain * 1000.0 / records / 1000.0);
    printf("SET + WAIT 1:  %.2f ms per 1,000 records (median round; best %.2f ms)\n", per1k_wait,
           best_wait * 1000.0 / records / 1000.0);
    printf("WAIT adds:     %.2f ms per 1,000 records = %.1f us per job, %.1f us per batch of %d; "
           "WAITs short of the replica: %ld\n",
           per1k_wait - per1k_plain, (per1k_wait - per1k_plain),
           (per1k_wait - per1k_plain) * 1000.0 / ((double)batches * 1000.0 / records), batch,
           short_acks);

    /* ---- the replica is gone: every WAIT runs into its timeout ---- */
    kill(replica, SIGKILL);
    waitpid(replica, NULL, 0);
    replica = -1;
    {
        long lost = 0;
        int n = records < 200 ? records : 200;
        long long w = write_records(m, "gone", n, batch, 1, &lost);
        if (w < 0)
            goto out;
        printf("replica down:  %.1f ms per 1,000 records (WAIT 1 100 times out on each of %ld "
               "batches: the loop stalls 100 ms per batch)\n",
               w * 1000.0 / n / 1000.0, lost);
    }

    /* ---- memory ---- */
    iw_error err = {0};
    redisReply *r = redis_link_command(m, &err, "SET bench:job:mem %s", RECORD);
    if (r)
        freeReplyObject(r);
    printf("MEMORY USAGE of a job record (N:job:<jobId>, %zu-byte value): %lld bytes\n",
           strlen(RECORD), memory_usage(m, "bench:job:mem"));
    /* a final record: {"event": status.final, "published", "recordedAt"} */
    char final[1024];
    snprintf(final, sizeof final,
             "{\"event\":{\"jobId\":\"bench-00000000\",\"trackingId\":\"trk-5f0c2a9b1e7d4c3a\","
             "\"status\":\"completed\",\"checks\":3,\"acceptedAt\":\"2026-11-30T21:00:00.000Z\","
             "\"finishedAt\":\"2026-11-30T21:00:01.000Z\",\"result\":{\"trackingId\":"
             "\"trk-5f0c2a9b1e7d4c3a\",\"status\":\"completed\",\"updatedAt\":"
             "\"2026-11-30T21:00:01.000Z\"}},\"published\":true,\"recordedAt\":1796072401000}");
    r = redis_link_command(m, &err, "SET bench:final:mem %s", final);
    if (r)
        freeReplyObject(r);
    printf("MEMORY USAGE of a final record (N:final:<jobId>, %zu-byte value): %lld bytes\n",
           strlen(final), memory_usage(m, "bench:final:mem"));

    iw_rate_tier tiers[3] = {{1000000, 86400000L}, {1000000, 3600000L}, {1000000, 60000L}};
    limiter *lim = limiter_new(m, "bench", tiers, 3, 50);
    redis_link_drop(m); /* the scripts load on the next connect */
    if (!lim || redis_link_ensure(m, &err) != IW_OK)
        goto out;
    for (int n = 0; n < 10000;) {
        limiter_result res;
        if (limiter_take(lim, "submit", 800, 100, &res, &err) != IW_OK) {
            fprintf(stderr, "limiter: %s\n", err.msg);
            limiter_free(lim);
            goto out;
        }
        n += res.granted;
        limiter_result_release(&res);
        if (n == 1000 || n == 10000)
            printf("limiter after %5d permits: N:limiter:log %lld bytes (%.1f bytes per permit; "
                   "N:limiter:log:<class> holds as many again while classes compete)\n",
                   n, memory_usage(m, "bench:limiter:log"),
                   memory_usage(m, "bench:limiter:log") / (double)n);
    }
    /* one permit per script call, as a pod asking for one job: what one
     * Redis master serves, the ceiling of the whole fleet's permit requests */
    {
        long long t = iwt_now_ms();
        int calls = 0;
        while (iwt_now_ms() - t < 2000) {
            limiter_result res;
            if (limiter_take(lim, "submit", 800, 1, &res, &err) != IW_OK)
                break;
            limiter_result_release(&res);
            calls++;
        }
        printf("limiter script, one permit per call, one client, log of 10,000+: %.0f calls/s "
               "(%.0f us per round trip)\n",
               calls * 1000.0 / (double)(iwt_now_ms() - t),
               (iwt_now_ms() - t) * 1000.0 / (calls ? calls : 1));
    }
    {
        redisReply *info = redis_link_command(m, &err, "INFO commandstats");
        const char *st = info && info->type == REDIS_REPLY_STRING ? info->str : NULL;
        const char *e = st ? strstr(st, "cmdstat_evalsha:") : NULL;
        const char *u = e ? strstr(e, "usec_per_call=") : NULL;
        if (u)
            printf("limiter script inside Redis: %.1f us per call (INFO commandstats): one "
                   "master serves about %.0f permit requests/s from the whole fleet\n",
                   atof(u + 14), 1e6 / atof(u + 14));
        if (info)
            freeReplyObject(info);
    }
    limiter_free(lim);
    rc = 0;
out:
    redis_link_free(m);
    redis_link_free(rep_link);
    kill(master, SIGKILL);
    if (replica > 0) {
        kill(replica, SIGKILL);
        waitpid(replica, NULL, 0);
    }
    waitpid(master, NULL, 0);
    char rm[96];
    snprintf(rm, sizeof rm, "rm -rf '%s'", dir);
    if (system(rm) != 0)
        rc = 1;
    return rc;
}
