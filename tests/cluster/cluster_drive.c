/* The driver of tests/cluster/run.sh: jobs through the full lifecycle on a
 * broker cluster and a Redis with failover, audited from the outside.
 *
 *   cluster_drive --nodes H:P,H:P,... --tap-node I --jobs N [--rate J/s]
 *                 [--mock-arg ARG]... [--env NAME=VALUE]... [--pollers P]
 *                 [--at COUNT CMD]... [--at-or-after COUNT SECS CMD]...
 *                 [--require-moved] [--allow-repeats] [--timeout S] [--tag NAME]
 *
 * Starts a mock provider (with the --mock-arg flags), declares a fresh
 * namespace through `integration-worker declare` (with the --env settings:
 * IW_AMQP_URL, IW_REDIS_*...), declares a durable quorum queue <ns>.audit
 * bound to every event, starts one submitter and P pollers, publishes N jobs
 * (paced at --rate, with publisher confirms) to node --tap-node, and reads the
 * audit queue there.  When the number of jobs with an outcome reaches COUNT it
 * runs CMD (sh -c, in the background): that is how run.sh stops and restarts
 * nodes mid-run.  Milestones run in order, each once the one before it has
 * finished; --at-or-after also runs CMD SECS seconds after the one before it
 * finished if COUNT is not reached by then (a restart that must not wait for
 * progress the stop itself may hold up: see run.sh).  --require-moved: jobs
 * published after the first milestone finished (e.g. a node stopped) must get
 * events before the second one starts (the worker works on through another
 * node), and the second waits for the first such event as well as for its
 * COUNT (or for its SECS); the time from the first milestone's start to that
 * event is printed.  The last tenth of the jobs is then published only after
 * the first milestone ended, so that there are such jobs however long it takes.
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
    long long after_ms; /* also run this long after the previous milestone ended; 0: never */
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

/* What the audit counted. */
typedef struct audit_counts {
    long outcomes, repeats, conflicts, foreign, accepted, progress, failed_jobs, tap_redeliveries;
    long long last_outcome, max_gap, gap_at;
    /* --require-moved: events of jobs numbered from window_from on, while the window is open */
    int window_open;
    long window_from, window_events;
    long long window_first;
} audit_counts;

/* One event read from the audit queue. */
static void audit_event(const amqp_envelope_t *e, const char *tag, long jobs, job_seen *seen,
                        audit_counts *a, long long t0)
{
    char rk[64], corr[256];
    long long now = iwt_now_ms();
    const amqp_basic_properties_t *p = &e->message.properties;
    snprintf(rk, sizeof rk, "%.*s", (int)e->routing_key.len, (char *)e->routing_key.bytes);
    snprintf(corr, sizeof corr, "%.*s",
             (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) ? (int)p->correlation_id.len : 0,
             (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) ? (char *)p->correlation_id.bytes : "");
    long idx = job_index(corr, tag, jobs);
    int is_final = !strcmp(rk, "status.final"), is_failed = !strcmp(rk, "submission.failed");
    if (idx >= 0 && a->window_open && idx >= a->window_from) {
        if (!a->window_events++)
            a->window_first = now;
    }
    if (idx < 0) {
        a->foreign++;
    } else if (is_final || is_failed) {
        job_seen *s = &seen[idx];
        char *body = strndup(e->message.body.bytes, e->message.body.len);
        if (!s->finals && !s->failed) {
            s->first = body;
            body = NULL;
            s->at = now;
            a->outcomes++;
            if (a->last_outcome && now - a->last_outcome > a->max_gap) {
                a->max_gap = now - a->last_outcome;
                a->gap_at = a->last_outcome - t0;
            }
            a->last_outcome = now;
        } else if (e->redelivered && !strcmp(body, s->first)) {
            a->tap_redeliveries++; /* our own audit queue redelivered it */
        } else if (!strcmp(body, s->first) &&
                   ((is_final && s->finals) || (is_failed && s->failed))) {
            a->repeats++;
        } else {
            a->conflicts++;
            fprintf(stderr, "cluster_drive: job %s has a second, different outcome %s\n", corr, rk);
        }
        if (is_final)
            s->finals++;
        else {
            s->failed++;
            a->failed_jobs += s->failed == 1 && !s->finals;
        }
        free(body);
    } else if (!strcmp(rk, "submission.accepted"))
        a->accepted++;
    else if (!strcmp(rk, "status.progress"))
        a->progress++;
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
                    "[--at-or-after COUNT SECS CMD]... [--require-moved] [--allow-repeats] "
                    "[--timeout S] [--tag NAME]\n");
}

int main(int argc, char **argv)
{
    node nodes[MAX_NODES];
    int n_nodes = 0, tap_node = 0, allow_repeats = 0, require_moved = 0, pollers = 1, port = 0,
        rc = 1;
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
        if (!strcmp(argv[i], "--require-moved")) {
            require_moved = 1;
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
        } else if (!strcmp(argv[i], "--at-or-after") && n_at > 0 && n_at < MAX_AT && i + 3 < argc &&
                   atol(argv[i + 2]) > 0) {
            at[n_at].count = atol(v);
            at[n_at].after_ms = atol(argv[i + 2]) * 1000LL;
            at[n_at++].cmd = argv[i + 3];
            i += 2;
        } else {
            usage();
            return 2;
        }
        i++;
    }
    if (n_nodes < 1 || tap_node < 0 || tap_node >= n_nodes || jobs < 1 || pollers < 1 ||
        pollers > MAX_POLLERS || (require_moved && n_at < 2)) {
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
    audit_counts a = {0};
    long published = 0;
    long long t0 = iwt_now_ms(), last_event = t0;
    long long done_at = 0;

    /* --require-moved: a tenth of the jobs (at least one, and never so many that the first
     * milestone's count cannot be reached) waits for the first milestone to end, so that
     * however long it takes there are jobs to publish after it */
    long reserve = 0;
    if (require_moved) {
        reserve = jobs / 10 > 0 ? jobs / 10 : 1;
        if (reserve > jobs - at[0].count)
            reserve = jobs - at[0].count > 0 ? jobs - at[0].count : 0;
    }
    for (;;) {
        long long now = iwt_now_ms();
        /* publish what is due */
        long due = rate > 0 ? (long)((now - t0) * rate / 1000) + 1 : jobs;
        if (due > jobs)
            due = jobs;
        if (!at[0].ended && due > jobs - reserve)
            due = jobs - reserve;
        if (due > published) {
            long to = due - published > 500 ? published + 500 : due;
            if (!publish_jobs(pub, ns, tag, published, to)) {
                fprintf(stderr, "cluster_drive: publishing failed\n");
                break;
            }
            published = to;
        }
        /* milestones, in order: one starts only once the one before it has finished (a
         * restart must not race the stop it follows, however fast the outcomes come) */
        for (int i = 0; i < n_at; i++) {
            /* with --require-moved the second one also waits for the proof (a short run can
             * reach its count while the first is still going) */
            int reached =
                a.outcomes >= at[i].count && (!require_moved || i != 1 || a.window_events);
            int late = i > 0 && at[i].after_ms && at[i - 1].ended &&
                       now - at[i - 1].ended >= at[i].after_ms;
            if (!at[i].pid && (reached || late) && (i == 0 || at[i - 1].ended)) {
                at[i].started = now;
                at[i].pid = run_background(at[i].cmd);
                if (i == 1)
                    a.window_open = 0;
                printf("cluster_drive: %.1f s, %ld outcomes: running '%s'\n", (now - t0) / 1000.0,
                       a.outcomes, at[i].cmd);
                if (!reached)
                    printf("cluster_drive: WARNING: %lld s after the previous command, %ld "
                           "outcomes (wanted %ld)%s: progress stalled while it was in effect (see "
                           "tests/cluster/run.sh on RabbitMQ before 3.13)\n",
                           at[i].after_ms / 1000, a.outcomes, at[i].count,
                           require_moved && i == 1 && !a.window_events
                               ? ", no event of a job published since"
                               : "");
            }
            if (at[i].pid > 0 && !at[i].ended) {
                int st;
                if (waitpid(at[i].pid, &st, WNOHANG) == at[i].pid) {
                    at[i].ended = iwt_now_ms();
                    at[i].rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
                    printf("cluster_drive: '%s' finished (rc %d) after %.1f s\n", at[i].cmd,
                           at[i].rc, (at[i].ended - at[i].started) / 1000.0);
                    if (i == 0 && require_moved && !at[1].pid) {
                        a.window_open = 1;
                        a.window_from = published;
                    }
                }
            }
        }
        int commands_done = 1;
        for (int i = 0; i < n_at; i++)
            if (!at[i].ended)
                commands_done = 0;
        if (a.outcomes >= jobs && commands_done && !done_at)
            done_at = now;
        if (done_at && now - done_at >= TAIL_MS)
            break;
        if (now - last_event > IDLE_LIMIT_MS || now - t0 > timeout_s * 1000) {
            fprintf(stderr, "cluster_drive: giving up (%s)\n",
                    now - t0 > timeout_s * 1000 ? "timeout" : "no event for 120 s");
            break;
        }

        /* read the audit queue: everything that is there, for at most 200 ms (a job makes
         * three events; reading one per turn of this loop, which also waits for publish
         * confirms, fell behind and counted outcomes late) */
        long long read_until = iwt_now_ms() + 200;
        int tap_failed = 0;
        for (int waited = 0; iwt_now_ms() < read_until;) {
            amqp_envelope_t e;
            struct timeval tv = {0, waited ? 0 : 50000};
            amqp_maybe_release_buffers(tap);
            amqp_rpc_reply_t r = amqp_consume_message(tap, &e, &tv, 0);
            waited = 1;
            if (r.reply_type != AMQP_RESPONSE_NORMAL) {
                if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
                    r.library_error == AMQP_STATUS_TIMEOUT)
                    break;
                tap_failed = 1;
                break;
            }
            audit_event(&e, tag, jobs, seen, &a, t0);
            last_event = iwt_now_ms();
            amqp_basic_ack(tap, 1, e.delivery_tag, 0);
            amqp_destroy_envelope(&e);
        }
        if (tap_failed) {
            fprintf(stderr, "cluster_drive: the audit connection failed\n");
            break;
        }
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
    double secs = (a.last_outcome - t0) / 1000.0;

    printf("cluster_drive: %ld of %ld jobs have an outcome in %.1f s (%.0f jobs/s); "
           "status.final %ld, submission.failed %ld\n",
           jobs - missing, jobs, secs, secs > 0 ? (jobs - missing) / secs : 0.0,
           jobs - missing - a.failed_jobs, a.failed_jobs);
    printf("  missing outcomes: %ld   conflicting outcomes: %ld   byte-identical repeats: %ld "
           "(%s)   audit-queue redeliveries: %ld\n",
           missing, a.conflicts, a.repeats, allow_repeats ? "allowed in this phase" : "not allowed",
           a.tap_redeliveries);
    printf("  other events: submission.accepted %ld, status.progress %ld, unrelated %ld\n",
           a.accepted, a.progress, a.foreign);
    printf("  longest gap between two outcomes: %.2f s (starting %.1f s into the run)\n",
           a.max_gap / 1000.0, a.gap_at / 1000.0);
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
    int moved_ok = 1;
    if (require_moved) {
        moved_ok = a.window_events > 0;
        if (moved_ok)
            printf("  moved: %ld events of jobs published after '%s' finished, before the next "
                   "command; the first %.1f s after it started\n",
                   a.window_events, at[0].cmd, (a.window_first - at[0].started) / 1000.0);
        else
            fprintf(stderr,
                    "cluster_drive: no job published after '%s' finished got an event before "
                    "the next command: the worker did not work on through another node\n",
                    at[0].cmd);
    }
    rc = missing == 0 && a.conflicts == 0 && (allow_repeats || a.repeats == 0) && created == jobs &&
                 cmds_ok && moved_ok
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
