/* The driver of tests/cluster/run.sh: jobs through the full lifecycle on a
 * broker cluster and a Redis with failover, audited from the outside.
 *
 *   cluster_drive --nodes H:P,H:P,... --tap-node I --jobs N [--rate J/s]
 *                 [--mock-arg ARG]... [--env NAME=VALUE]... [--pollers P]
 *                 [--at COUNT CMD]... [--allow-repeats] [--timeout S] [--tag NAME]
 *
 * Starts a mock provider (with the --mock-arg flags), declares a fresh
 * namespace through `integration-worker declare` (with the --env settings:
 * IW_AMQP_URL, IW_REDIS_*...), declares a durable quorum queue <ns>.audit
 * bound to every event, starts one submitter and P pollers, publishes N jobs
 * (paced at --rate, with publisher confirms) to node --tap-node, and reads the
 * audit queue there.  When the number of jobs with an outcome reaches COUNT it
 * runs CMD (sh -c, in the background): that is how run.sh stops and restarts
 * nodes mid-run.
 *
 * The audit: every job has exactly one outcome (status.final or
 * submission.failed), never both and never two different ones; an outcome
 * repeated byte for byte is at-least-once delivery after a fault (allowed by
 * the contract only with --allow-repeats); the mock created exactly N distinct
 * submissions.  Prints the mock's 429s (calls above its limits, which it
 * enforces exactly in any window) and the longest gap between two outcomes
 * (how long a failover stalled the pipeline).  Exit 0 when the audit holds. */
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "iwtest.h"

#define MAX_NODES 8
#define MAX_ENV 32
#define MAX_AT 8
#define MAX_MOCK_ARGS 16
#define MAX_POLLERS 4
#define IDLE_LIMIT_MS 120000
#define TAIL_MS 3000 /* after the last outcome: how long to listen for repeats */

typedef struct node {
    char host[64];
    int port;
} node;

typedef struct milestone {
    long count;
    const char *cmd;
    pid_t pid;
    long long started, ended;
    int rc;
} milestone;

/* What the audit saw of one job. */
typedef struct job_seen {
    unsigned char finals, failed;
    char *first; /* body of the first outcome */
    long long at;
} job_seen;

static int parse_nodes(const char *list, node *out, int max)
{
    int n = 0;
    char *copy = strdup(list), *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t && n < max; t = strtok_r(NULL, ",", &save)) {
        char *c = strrchr(t, ':');
        if (!c)
            break;
        snprintf(out[n].host, sizeof out[n].host, "%.*s", (int)(c - t), t);
        out[n].port = atoi(c + 1);
        n++;
    }
    free(copy);
    return n;
}

static amqp_connection_state_t amqp_open_node(const node *nd)
{
    amqp_connection_state_t c = amqp_new_connection();
    amqp_socket_t *s = amqp_tcp_socket_new(c);
    struct timeval tv = {5, 0};
    if (amqp_socket_open_noblock(s, nd->host, nd->port, &tv) != AMQP_STATUS_OK)
        goto fail;
    if (amqp_login(c, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest").reply_type !=
        AMQP_RESPONSE_NORMAL)
        goto fail;
    amqp_channel_open(c, 1);
    if (amqp_get_rpc_reply(c).reply_type != AMQP_RESPONSE_NORMAL)
        goto fail;
    return c;
fail:
    fprintf(stderr, "cluster_drive: cannot open AMQP to %s:%d\n", nd->host, nd->port);
    amqp_destroy_connection(c);
    return NULL;
}

static int rpc_ok(amqp_connection_state_t c, const char *what)
{
    amqp_rpc_reply_t r = amqp_get_rpc_reply(c);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        fprintf(stderr, "cluster_drive: %s failed\n", what);
        return 0;
    }
    return 1;
}

/* The audit queue: durable, quorum (replicated like the worker's), so that a
 * node loss does not lose what the audit has not read yet. */
static int declare_audit(amqp_connection_state_t c, const char *ns, char *queue, size_t cap)
{
    char ex[256];
    amqp_table_entry_t e = {amqp_cstring_bytes("x-queue-type"),
                            {AMQP_FIELD_KIND_UTF8, {.bytes = amqp_cstring_bytes("quorum")}}};
    amqp_table_t args = {1, &e};
    snprintf(queue, cap, "%s.audit", ns);
    snprintf(ex, sizeof ex, "%s.events", ns);
    amqp_queue_declare(c, 1, amqp_cstring_bytes(queue), 0, 1, 0, 0, args);
    if (!rpc_ok(c, "audit queue.declare"))
        return 0;
    amqp_queue_bind(c, 1, amqp_cstring_bytes(queue), amqp_cstring_bytes(ex),
                    amqp_cstring_bytes("#"), amqp_empty_table);
    return rpc_ok(c, "audit queue.bind");
}

static int consume_audit(amqp_connection_state_t c, const char *queue)
{
    amqp_basic_qos(c, 1, 0, 2000, 0);
    if (!rpc_ok(c, "basic.qos"))
        return 0;
    amqp_basic_consume(c, 1, amqp_cstring_bytes(queue), amqp_empty_bytes, 0, 0, 0,
                       amqp_empty_table);
    return rpc_ok(c, "basic.consume");
}

/* Publishes jobs [from, to) and waits for the broker's confirms. */
static int publish_jobs(amqp_connection_state_t c, const char *ns, const char *tag, long from,
                        long to)
{
    char ex[256], body[512], id[128];
    amqp_basic_properties_t p;
    uint64_t want = 0;
    static uint64_t seq;

    snprintf(ex, sizeof ex, "%s.requests", ns);
    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG;
    p.delivery_mode = 2;
    p.content_type = amqp_cstring_bytes("application/json");
    for (long i = from; i < to; i++) {
        snprintf(id, sizeof id, "%s-%ld", tag, i);
        snprintf(body, sizeof body,
                 "{\"jobId\":\"%s\",\"userId\":\"u-%ld\",\"action\":\"transaction\","
                 "\"payload\":{\"amount\":%ld,\"currency\":\"EUR\"}}",
                 id, i % 97, i);
        amqp_bytes_t b = {strlen(body), body};
        if (amqp_basic_publish(c, 1, amqp_cstring_bytes(ex), amqp_cstring_bytes("submit.x"), 1, 0,
                               &p, b) != AMQP_STATUS_OK)
            return 0;
        want = ++seq;
    }
    /* confirms: basic.ack (possibly multiple) up to `want` */
    static uint64_t acked;
    while (acked < want) {
        amqp_frame_t f;
        struct timeval tv = {30, 0};
        if (amqp_simple_wait_frame_noblock(c, &f, &tv) != AMQP_STATUS_OK)
            return 0;
        if (f.frame_type != AMQP_FRAME_METHOD)
            continue;
        if (f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
            amqp_basic_ack_t *a = f.payload.method.decoded;
            acked = a->delivery_tag;
        } else if (f.payload.method.id == AMQP_BASIC_NACK_METHOD ||
                   f.payload.method.id == AMQP_BASIC_RETURN_METHOD) {
            fprintf(stderr, "cluster_drive: a job publish was nacked or returned\n");
            return 0;
        }
    }
    return 1;
}

static long job_index(const char *id, const char *tag, long n)
{
    size_t len = strlen(tag);
    if (strncmp(id, tag, len) != 0 || id[len] != '-')
        return -1;
    char *end;
    long i = strtol(id + len + 1, &end, 10);
    return *end == '\0' && i >= 0 && i < n ? i : -1;
}

static pid_t run_background(const char *cmd)
{
    pid_t pid = fork();
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    return pid;
}

static void usage(void)
{
    fprintf(stderr, "usage: cluster_drive --nodes H:P,... --tap-node I --jobs N [--rate J] "
                    "[--mock-arg A]... [--env N=V]... [--pollers P] [--at COUNT CMD]... "
                    "[--allow-repeats] [--timeout S] [--tag NAME]\n");
}

int main(int argc, char **argv)
{
    node nodes[MAX_NODES];
    int n_nodes = 0, tap_node = 0, allow_repeats = 0, pollers = 1, port = 0, rc = 1;
    long jobs = 1000, rate = 0, timeout_s = 600;
    const char *env[MAX_ENV + 1] = {0}, *mock_args[MAX_MOCK_ARGS + 1] = {0}, *tag = "cj";
    int n_env = 0, n_mock = 0, n_at = 0;
    milestone at[MAX_AT];
    char audit[256];

    memset(at, 0, sizeof at);
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--allow-repeats")) {
            allow_repeats = 1;
            continue;
        }
        if (!v) {
            usage();
            return 2;
        }
        if (!strcmp(argv[i], "--nodes"))
            n_nodes = parse_nodes(v, nodes, MAX_NODES);
        else if (!strcmp(argv[i], "--tap-node"))
            tap_node = atoi(v);
        else if (!strcmp(argv[i], "--jobs"))
            jobs = atol(v);
        else if (!strcmp(argv[i], "--rate"))
            rate = atol(v);
        else if (!strcmp(argv[i], "--pollers"))
            pollers = atoi(v);
        else if (!strcmp(argv[i], "--timeout"))
            timeout_s = atol(v);
        else if (!strcmp(argv[i], "--tag"))
            tag = v;
        else if (!strcmp(argv[i], "--env") && n_env < MAX_ENV)
            env[n_env++] = v;
        else if (!strcmp(argv[i], "--mock-arg") && n_mock < MAX_MOCK_ARGS)
            mock_args[n_mock++] = v;
        else if (!strcmp(argv[i], "--at") && n_at < MAX_AT && i + 2 < argc) {
            at[n_at].count = atol(v);
            at[n_at++].cmd = argv[i + 2];
            i++;
        } else {
            usage();
            return 2;
        }
        i++;
    }
    if (n_nodes < 1 || tap_node < 0 || tap_node >= n_nodes || jobs < 1 || pollers < 1 ||
        pollers > MAX_POLLERS) {
        usage();
        return 2;
    }
    iwt_standalone = 1;
    setvbuf(stdout, NULL, _IOLBF, 0);

    pid_t mock = iwt_start_mock(mock_args, &port);
    const char *ns = iwt_namespace(tag);
    const char *declare[] = {"declare", NULL};
    if (iwt_run_worker_cmd(declare, ns, port, env, NULL) != 0) {
        fprintf(stderr, "cluster_drive: integration-worker declare failed\n");
        iwt_stop(mock, SIGTERM);
        return 1;
    }
    amqp_connection_state_t pub = amqp_open_node(&nodes[tap_node]);
    amqp_connection_state_t tap = amqp_open_node(&nodes[tap_node]);
    if (!pub || !tap || !declare_audit(tap, ns, audit, sizeof audit) || !consume_audit(tap, audit))
        return 1;
    amqp_confirm_select(pub, 1);
    if (!rpc_ok(pub, "confirm.select"))
        return 1;

    pid_t procs[1 + MAX_POLLERS];
    int n_procs = 0;
    procs[n_procs++] = iwt_start_worker("submitter", ns, port, env, "submitter");
    for (int p = 0; p < pollers; p++) {
        char t[32];
        snprintf(t, sizeof t, "poller%d", p);
        procs[n_procs++] = iwt_start_worker("poller", ns, port, env, t);
    }
    printf("cluster_drive: namespace %s, mock on :%d, %ld jobs at %ld/s, worker logs "
           "/tmp/iwtest-%s-*.log\n",
           ns, port, jobs, rate, ns);

    job_seen *seen = calloc((size_t)jobs, sizeof *seen);
    long outcomes = 0, repeats = 0, conflicts = 0, foreign = 0, accepted = 0, progress = 0;
    long published = 0, failed_jobs = 0, tap_redeliveries = 0;
    long long t0 = iwt_now_ms(), last_outcome = 0, max_gap = 0, gap_at = 0, last_event = t0;
    long long done_at = 0;

    for (;;) {
        long long now = iwt_now_ms();
        /* publish what is due */
        long due = rate > 0 ? (long)((now - t0) * rate / 1000) + 1 : jobs;
        if (due > jobs)
            due = jobs;
        if (due > published) {
            long to = due - published > 500 ? published + 500 : due;
            if (!publish_jobs(pub, ns, tag, published, to)) {
                fprintf(stderr, "cluster_drive: publishing failed\n");
                break;
            }
            published = to;
        }
        /* milestones */
        for (int i = 0; i < n_at; i++) {
            if (!at[i].pid && outcomes >= at[i].count) {
                at[i].started = now;
                at[i].pid = run_background(at[i].cmd);
                printf("cluster_drive: %.1f s, %ld outcomes: running '%s'\n", (now - t0) / 1000.0,
                       outcomes, at[i].cmd);
            }
            if (at[i].pid > 0 && !at[i].ended) {
                int st;
                if (waitpid(at[i].pid, &st, WNOHANG) == at[i].pid) {
                    at[i].ended = iwt_now_ms();
                    at[i].rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
                    printf("cluster_drive: '%s' finished (rc %d) after %.1f s\n", at[i].cmd,
                           at[i].rc, (at[i].ended - at[i].started) / 1000.0);
                }
            }
        }
        int commands_done = 1;
        for (int i = 0; i < n_at; i++)
            if (!at[i].ended)
                commands_done = 0;
        if (outcomes >= jobs && commands_done && !done_at)
            done_at = now;
        if (done_at && now - done_at >= TAIL_MS)
            break;
        if (now - last_event > IDLE_LIMIT_MS || now - t0 > timeout_s * 1000) {
            fprintf(stderr, "cluster_drive: giving up (%s)\n",
                    now - t0 > timeout_s * 1000 ? "timeout" : "no event for 120 s");
            break;
        }

        /* read the audit queue */
        amqp_envelope_t e;
        struct timeval tv = {0, 50000};
        amqp_maybe_release_buffers(tap);
        amqp_rpc_reply_t r = amqp_consume_message(tap, &e, &tv, 0);
        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
            if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
                r.library_error == AMQP_STATUS_TIMEOUT)
                continue;
            fprintf(stderr, "cluster_drive: the audit connection failed\n");
            break;
        }
        now = last_event = iwt_now_ms();
        char rk[64], corr[256];
        const amqp_basic_properties_t *p = &e.message.properties;
        snprintf(rk, sizeof rk, "%.*s", (int)e.routing_key.len, (char *)e.routing_key.bytes);
        snprintf(corr, sizeof corr, "%.*s",
                 (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) ? (int)p->correlation_id.len : 0,
                 (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) ? (char *)p->correlation_id.bytes
                                                              : "");
        long idx = job_index(corr, tag, jobs);
        int is_final = !strcmp(rk, "status.final"), is_failed = !strcmp(rk, "submission.failed");
        if (idx < 0) {
            foreign++;
        } else if (is_final || is_failed) {
            job_seen *s = &seen[idx];
            char *body = strndup(e.message.body.bytes, e.message.body.len);
            if (!s->finals && !s->failed) {
                s->first = body;
                body = NULL;
                s->at = now;
                outcomes++;
                if (last_outcome && now - last_outcome > max_gap) {
                    max_gap = now - last_outcome;
                    gap_at = last_outcome - t0;
                }
                last_outcome = now;
            } else if (e.redelivered && !strcmp(body, s->first)) {
                tap_redeliveries++; /* our own audit queue redelivered it */
            } else if (!strcmp(body, s->first) &&
                       ((is_final && s->finals) || (is_failed && s->failed))) {
                repeats++;
            } else {
                conflicts++;
                fprintf(stderr, "cluster_drive: job %s has a second, different outcome %s\n", corr,
                        rk);
            }
            if (is_final)
                s->finals++;
            else {
                s->failed++;
                failed_jobs += s->failed == 1 && !s->finals;
            }
            free(body);
        } else if (!strcmp(rk, "submission.accepted"))
            accepted++;
        else if (!strcmp(rk, "status.progress"))
            progress++;
        amqp_basic_ack(tap, 1, e.delivery_tag, 0);
        amqp_destroy_envelope(&e);
    }

    long missing = 0;
    for (long i = 0; i < jobs; i++)
        if (!seen[i].finals && !seen[i].failed)
            missing++;
    json_t *stats = iwt_mock_stats(port);
    long created = (long)json_integer_value(json_object_get(stats, "submissions_created"));
    long r429 = (long)json_integer_value(json_object_get(stats, "rate_limited"));
    long refused = (long)json_integer_value(json_object_get(stats, "duplicates_refused"));
    long checks = (long)json_integer_value(json_object_get(stats, "status_checks"));
    char *requests = json_dumps(json_object_get(stats, "requests"), JSON_COMPACT);
    double secs = (last_outcome - t0) / 1000.0;

    printf("cluster_drive: %ld of %ld jobs have an outcome in %.1f s (%.0f jobs/s); "
           "status.final %ld, submission.failed %ld\n",
           jobs - missing, jobs, secs, secs > 0 ? (jobs - missing) / secs : 0.0,
           jobs - missing - failed_jobs, failed_jobs);
    printf("  missing outcomes: %ld   conflicting outcomes: %ld   byte-identical repeats: %ld "
           "(%s)   audit-queue redeliveries: %ld\n",
           missing, conflicts, repeats, allow_repeats ? "allowed in this phase" : "not allowed",
           tap_redeliveries);
    printf("  other events: submission.accepted %ld, status.progress %ld, unrelated %ld\n",
           accepted, progress, foreign);
    printf("  longest gap between two outcomes: %.2f s (starting %.1f s into the run)\n",
           max_gap / 1000.0, gap_at / 1000.0);
    printf("  mock: submissions_created=%ld (want %ld) duplicates_refused=%ld status_checks=%ld "
           "rate_limited(429)=%ld\n  mock requests: %s\n",
           created, jobs, refused, checks, r429, requests ? requests : "?");
    free(requests);
    json_decref(stats);
    for (int i = 0; i < n_at; i++)
        if (at[i].rc != 0 || !at[i].ended)
            fprintf(stderr, "cluster_drive: '%s' %s (rc %d)\n", at[i].cmd,
                    at[i].ended ? "failed" : "never finished", at[i].rc);

    int cmds_ok = 1;
    for (int i = 0; i < n_at; i++)
        cmds_ok = cmds_ok && at[i].ended && at[i].rc == 0;
    rc = missing == 0 && conflicts == 0 && (allow_repeats || repeats == 0) && created == jobs &&
                 cmds_ok
             ? 0
             : 1;
    printf("cluster_drive: audit %s\n", rc == 0 ? "PASSED" : "FAILED");

    for (int p = 0; p < n_procs; p++)
        iwt_stop(procs[p], SIGTERM);
    iwt_stop(mock, SIGTERM);
    amqp_channel_close(pub, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(pub, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(pub);
    amqp_channel_close(tap, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(tap, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(tap);
    for (long i = 0; i < jobs; i++)
        free(seen[i].first);
    free(seen);
    return rc;
}
