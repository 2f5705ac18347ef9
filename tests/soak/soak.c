/* The fault soak's driver (issue 8), started by tests/soak/run.sh against a
 * private RabbitMQ node and a private Redis.
 *
 * It starts a mock provider that answers 5xx, 429 and closed connections at
 * random with latency jitter, S submitter and P poller processes, declares the
 * namespace and a durable quorum "tap" queue bound to <ns>.events with "#"
 * (declared before the first job, it survives the broker restart), then
 * publishes N jobs with confirms, evenly over --duration, while it SIGKILLs and
 * restarts one worker every --kill-every-ms, restarts RabbitMQ once (at 30% of
 * the duration; a clean shutdown, or SIGKILL with --rabbit-restart kill) and
 * Redis once (at 55%) through `run.sh ctl`.  The last quarter of the duration
 * and the tail are free of faults.  Among the jobs (by index, see kind_of):
 * 2% end "rejected", 0.5% fail always with 503 and 0.5% with 400 (per-job mock
 * hooks), 0.5% are published twice and answered 503, 400, then 201; another
 * 1% are published twice (--double-rate), as an upstream double publish.
 *
 * The audit is from the outside only: every event read from the tap, the dead
 * letters in <ns>.dead, the depth of every work and delay queue once the
 * workers are stopped, and the mock's /__admin/stats.  A job must end in
 * exactly one outcome (status.final, or submission.failed with its dead
 * letter; an accepted job fails only by POLL_EXPIRED or TRACKING_NOT_FOUND,
 * and a final carries the status the mock was told); an event may repeat only
 * byte-identical (repeats are
 * counted apart: the contract allows them across faults, and none may arrive
 * more than QUIET_MARGIN_MS after the last fault); the provider must
 * have created exactly one submission per accepted job; nothing may stay in a
 * queue and nothing may reach <ns>.dead through the broker's delivery limit.
 * Exit 0 when every check holds, 1 otherwise, 2 on usage errors. */
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <jansson.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "amqp_link.h"
#include "iwtest.h"
#include "topology.h"

#define MAX_WORKERS 16
#define PUBLISH_BATCH 200
#define TAP_PREFETCH 2000
#define MAX_PROGRESS 6
/* How many problem jobs are printed (all go to <workdir>/audit-problems.txt). */
#define PRINT_PROBLEMS 20
/* Faults happen in the first FAULT_SHARE percent of the publishing time; the
 * rest is quiet.  A repeat is blamed on a fault only within QUIET_MARGIN_MS of
 * the last one: a redelivery may wait out a record's lease (IW_HTTP_TIMEOUT +
 * 5 s) before it republishes. */
#define FAULT_SHARE 75
#define QUIET_MARGIN_MS 20000

/* The kinds of job the soak publishes, by index, so that both outcomes and
 * every path to them run under the faults. */
enum kind { K_NORMAL, K_REJECTED, K_FAIL_503, K_FAIL_400, K_TWICE_503_400 };

typedef struct seen {
    uint64_t hash; /* of the first copy */
    int n;         /* copies received */
    int repeats;   /* byte-identical copies after the first */
    int conflicts; /* copies that differ from the first */
} seen;

typedef struct job {
    seen accepted, final, failed;
    uint64_t progress[MAX_PROGRESS];
    int n_progress, progress_repeats;
    int dead, dead_limit;
    int quiet_repeats; /* repeats received more than QUIET_MARGIN_MS after the last fault */
    unsigned char final_status;
    unsigned char failed_polling;
    /* the failure is POLL_EXPIRED or TRACKING_NOT_FOUND */ /* 'c' completed, 'r' rejected, '?'
                                                               other */
    int published;
    unsigned char kind;
} job;

typedef struct opts {
    long jobs, duration_s, submitters, pollers, kill_every_ms, checks, latency_ms, jitter_ms,
        drain_s, settle_ms, seed;
    int amqp_port, redis_port;
    const char *ctl, *workdir, *error_rate, *log_level, *sabotage, *http_timeout;
    int rabbit_kill; /* SIGKILL the broker instead of a clean shutdown */
    double double_rate;
} opts;

typedef struct worker {
    const char *role;
    char tag[32];
    pid_t pid;
} worker;

/* ---- the soak's state: one driver, one run ------------------------------- */

static opts o = {.jobs = 20000,
                 .duration_s = 200,
                 .submitters = 2,
                 .pollers = 2,
                 .kill_every_ms = 3000,
                 .checks = 3,
                 .latency_ms = 5,
                 .jitter_ms = 25,
                 .drain_s = 180,
                 .settle_ms = 15000,
                 .error_rate = "500=0.04,503=0.03,0=0.01,429=0.001",
                 .log_level = "info",
                 .http_timeout = "5s",
                 .double_rate = 0.01};
static const char *ns;
static int mock_port;
static job *jobs;
static worker workers[MAX_WORKERS];
static int n_workers;
static char tap_queue[300];
static char env_log[64], env_timeout[64];
static const char *worker_env[16];

static long kills, rabbit_restarts, redis_restarts, double_published, publish_reconnects;
static long ev_total, ev_foreign, ev_tap_redelivered, outcomes_in;
static long long last_fault_ms; /* when the last fault ended */
static long dead_total, dead_foreign;

static uint64_t fnv1a(const char *rk, const void *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    const unsigned char *s = (const unsigned char *)rk;
    while (*s)
        h = (h ^ *s++) * 1099511628211ULL;
    h = (h ^ 0xff) * 1099511628211ULL;
    s = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * 1099511628211ULL;
    return h;
}

/* K_TWICE_503_400: the "upstream" publishes the job twice, and the provider
 * answers its key 503, then 400, then 201: whichever delivery calls first, the
 * job must still end in exactly one outcome. */
static enum kind kind_of(long i)
{
    if (i % 200 == 101)
        return K_TWICE_503_400;
    if (i % 200 == 7)
        return K_FAIL_503;
    if (i % 200 == 13)
        return K_FAIL_400;
    if (i % 50 == 3)
        return K_REJECTED;
    return K_NORMAL;
}

/* "soak-<i>" -> i, or -1. */
static long job_index(const char *id, size_t len)
{
    char tmp[32];
    if (len < 6 || len > 20 || strncmp(id, "soak-", 5) != 0)
        return -1;
    memcpy(tmp, id + 5, len - 5);
    tmp[len - 5] = '\0';
    char *end;
    long i = strtol(tmp, &end, 10);
    return *end == '\0' && i >= 0 && i < o.jobs ? i : -1;
}

/* ---- AMQP: the driver's own blocking connections ------------------------- */

static int ok_reply(amqp_connection_state_t c)
{
    return amqp_get_rpc_reply(c).reply_type == AMQP_RESPONSE_NORMAL;
}

/* Opens a connection with channel 1 to the private broker, retrying for up to
 * 120 s (the broker may be restarting); NULL when it never answers. */
static amqp_connection_state_t conn_open(void)
{
    long long until = iwt_now_ms() + 120000;
    do {
        amqp_connection_state_t c = amqp_new_connection();
        amqp_socket_t *s = amqp_tcp_socket_new(c);
        if (s && amqp_socket_open(s, "127.0.0.1", o.amqp_port) == AMQP_STATUS_OK &&
            amqp_login(c, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest").reply_type ==
                AMQP_RESPONSE_NORMAL) {
            amqp_channel_open(c, 1);
            if (ok_reply(c))
                return c;
        }
        amqp_destroy_connection(c);
        iwt_sleep_ms(250);
    } while (iwt_now_ms() < until);
    return NULL;
}

static void conn_close(amqp_connection_state_t c)
{
    if (!c)
        return;
    amqp_channel_close(c, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(c, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(c);
}

/* The publisher: channel 1 in confirm mode. */
static amqp_connection_state_t pub;
static uint64_t pub_seq, pub_acked;

static int pub_open(void)
{
    pub = conn_open();
    if (!pub)
        return -1;
    amqp_confirm_select(pub, 1);
    pub_seq = pub_acked = 0;
    return ok_reply(pub) ? 0 : -1;
}

/* Waits until the broker confirmed every publish; -1 on a nack or a lost
 * connection (then the batch is published again: a double publish the worker
 * must absorb, counted). */
static int pub_wait_confirms(void)
{
    long long until = iwt_now_ms() + 30000;
    while (pub_acked < pub_seq && iwt_now_ms() < until) {
        amqp_frame_t f;
        struct timeval tv = {1, 0};
        amqp_maybe_release_buffers(pub);
        int rc = amqp_simple_wait_frame_noblock(pub, &f, &tv);
        if (rc == AMQP_STATUS_TIMEOUT)
            continue;
        if (rc != AMQP_STATUS_OK)
            return -1;
        if (f.frame_type != AMQP_FRAME_METHOD)
            continue;
        if (f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
            amqp_basic_ack_t *a = f.payload.method.decoded;
            pub_acked = a->multiple ? a->delivery_tag
                                    : (a->delivery_tag > pub_acked ? a->delivery_tag : pub_acked);
        } else if (f.payload.method.id == AMQP_BASIC_NACK_METHOD) {
            return -1;
        } else if (f.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD ||
                   f.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD) {
            return -1;
        }
    }
    return pub_acked >= pub_seq ? 0 : -1;
}

static void job_body(long i, char *buf, size_t cap)
{
    const char *hook = "";
    switch ((enum kind)jobs[i].kind) {
    case K_REJECTED:
        hook = ",\"mock\":{\"terminal\":\"rejected\"}";
        break;
    case K_FAIL_503:
        hook = ",\"mock\":{\"fail_always\":503}";
        break;
    case K_FAIL_400:
        hook = ",\"mock\":{\"fail_always\":400}";
        break;
    case K_TWICE_503_400:
        hook = ",\"mock\":{\"fail\":[503,400]}";
        break;
    case K_NORMAL:
        break;
    }
    snprintf(buf, cap,
             "{\"jobId\":\"soak-%ld\",\"userId\":\"u-%ld\",\"action\":\"transaction\","
             "\"payload\":{\"amount\":%ld,\"currency\":\"EUR\"%s}}",
             i, i % 97, i, hook);
}

static int publish_one(long i)
{
    char body[512], ex[300];
    amqp_basic_properties_t p;
    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG;
    p.delivery_mode = 2;
    p.content_type = amqp_cstring_bytes("application/json");
    job_body(i, body, sizeof body);
    snprintf(ex, sizeof ex, "%s.requests", ns);
    amqp_bytes_t b = {strlen(body), body};
    if (amqp_basic_publish(pub, 1, amqp_cstring_bytes(ex), amqp_cstring_bytes("submit.transaction"),
                           0, 0, &p, b) != AMQP_STATUS_OK)
        return -1;
    pub_seq++;
    jobs[i].published++;
    return 0;
}

/* Publishes jobs [from, to) (and the double publishes among them) and waits
 * for the confirms; on a failure reconnects and publishes the batch again. */
static void publish_range(long from, long to)
{
    for (int round = 0;; round++) {
        int bad = 0;
        for (long i = from; i < to && !bad; i++) {
            bad = publish_one(i) != 0;
            /* an upstream double publish: the same bytes twice */
            if (!bad && round == 0 &&
                (jobs[i].kind == K_TWICE_503_400 ||
                 (double)((i * 2654435761UL) % 10000) / 10000.0 < o.double_rate)) {
                bad = publish_one(i) != 0;
                double_published++;
            }
        }
        if (!bad && pub_wait_confirms() == 0)
            return;
        if (round >= 5) {
            fprintf(stderr, "soak: cannot publish jobs %ld..%ld\n", from, to - 1);
            exit(1);
        }
        publish_reconnects++;
        amqp_destroy_connection(pub);
        if (pub_open() != 0) {
            fprintf(stderr, "soak: broker unreachable for the publisher\n");
            exit(1);
        }
    }
}

/* ---- the tap: every event, consumed with acks ---------------------------- */

static amqp_connection_state_t tap;
static uint64_t tap_last_tag, tap_acked_tag;

static void declare_tap(amqp_connection_state_t c)
{
    char ex[300];
    amqp_table_entry_t e = {amqp_cstring_bytes("x-queue-type"),
                            {AMQP_FIELD_KIND_UTF8, {.bytes = amqp_cstring_bytes("quorum")}}};
    amqp_table_t args = {1, &e};
    snprintf(tap_queue, sizeof tap_queue, "%s.soak-tap", ns);
    snprintf(ex, sizeof ex, "%s.events", ns);
    amqp_queue_declare(c, 1, amqp_cstring_bytes(tap_queue), 0, 1, 0, 0, args);
    if (!ok_reply(c)) {
        fprintf(stderr, "soak: cannot declare %s\n", tap_queue);
        exit(1);
    }
    amqp_queue_bind(c, 1, amqp_cstring_bytes(tap_queue), amqp_cstring_bytes(ex),
                    amqp_cstring_bytes("#"), amqp_empty_table);
    if (!ok_reply(c)) {
        fprintf(stderr, "soak: cannot bind %s\n", tap_queue);
        exit(1);
    }
}

static void tap_open(void)
{
    tap = conn_open();
    if (!tap) {
        fprintf(stderr, "soak: broker unreachable for the tap\n");
        exit(1);
    }
    amqp_basic_qos(tap, 1, 0, TAP_PREFETCH, 0);
    amqp_basic_consume(tap, 1, amqp_cstring_bytes(tap_queue), amqp_empty_bytes, 0, 0, 0,
                       amqp_empty_table);
    if (!ok_reply(tap)) {
        fprintf(stderr, "soak: cannot consume %s\n", tap_queue);
        exit(1);
    }
    tap_last_tag = tap_acked_tag = 0;
}

static void tap_ack(void)
{
    if (tap && tap_last_tag > tap_acked_tag) {
        amqp_basic_ack(tap, 1, tap_last_tag, 1);
        tap_acked_tag = tap_last_tag;
    }
}

/* Closes the tap cleanly (the broker has every ack before the close-ok), so
 * nothing counted comes back as a redelivery. */
static void tap_close(void)
{
    tap_ack();
    conn_close(tap);
    tap = NULL;
}

/* Counts a copy of an event; 1 when it repeats the first byte for byte. */
static int note_seen(seen *s, uint64_t h)
{
    if (s->n++ == 0)
        s->hash = h;
    else if (s->hash == h)
        return ++s->repeats, 1;
    else
        s->conflicts++;
    return 0;
}

/* A repeat far from any fault breaks the contract.  A job the "upstream"
 * published twice is answered twice by design (README: the same
 * submission.accepted byte for byte), so its repeats are counted apart. */
static void note_repeat(job *j)
{
    if (j->published > 1)
        return;
    if (iwt_now_ms() - last_fault_ms > QUIET_MARGIN_MS)
        j->quiet_repeats++;
}

static int has_outcome(const job *j)
{
    return j->final.n > 0 || j->failed.n > 0;
}

/* Outcome tallies from the first copy of each outcome event. */
static json_t *final_statuses, *failed_codes;

static void tally(json_t *counts, const char *key)
{
    json_t *v = json_object_get(counts, key ? key : "?");
    json_object_set_new(counts, key ? key : "?", json_integer(v ? json_integer_value(v) + 1 : 1));
}

static void on_event(const amqp_envelope_t *env)
{
    const amqp_basic_properties_t *p = &env->message.properties;
    char rk[64];
    long i = -1;

    ev_total++;
    snprintf(rk, sizeof rk, "%.*s", (int)env->routing_key.len, (char *)env->routing_key.bytes);
    if (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG)
        i = job_index(p->correlation_id.bytes, p->correlation_id.len);
    if (i < 0) {
        ev_foreign++;
        return;
    }
    job *j = &jobs[i];
    uint64_t h = fnv1a(rk, env->message.body.bytes, env->message.body.len);
    seen *s = !strcmp(rk, "submission.accepted") ? &j->accepted
              : !strcmp(rk, "status.final")      ? &j->final
              : !strcmp(rk, "submission.failed") ? &j->failed
                                                 : NULL;
    /* the tap's own redelivery (only after a lost tap connection) is not the
     * worker's repeat */
    if (env->redelivered && s && s->n > 0 && s->hash == h) {
        ev_tap_redelivered++;
        return;
    }
    if (!s) {
        if (strcmp(rk, "status.progress") != 0) {
            ev_foreign++;
            return;
        }
        for (int k = 0; k < j->n_progress; k++)
            if (j->progress[k] == h) {
                if (!env->redelivered) {
                    j->progress_repeats++;
                    note_repeat(j);
                }
                return;
            }
        if (j->n_progress < MAX_PROGRESS)
            j->progress[j->n_progress++] = h;
        return;
    }
    int had = has_outcome(j);
    if (note_seen(s, h))
        note_repeat(j);
    if (s->n == 1 && s != &j->accepted) {
        json_t *b = json_loadb(env->message.body.bytes, env->message.body.len, 0, NULL);
        if (s == &j->final) {
            const char *st = json_string_value(json_object_get(b, "status"));
            tally(final_statuses, st);
            j->final_status = !st                        ? '?'
                              : !strcmp(st, "completed") ? 'c'
                              : !strcmp(st, "rejected")  ? 'r'
                                                         : '?';
        } else
            tally(failed_codes,
                  json_string_value(json_object_get(json_object_get(b, "error"), "code")));
        json_decref(b);
    }
    if (!had && has_outcome(j))
        outcomes_in++;
}

/* Reads events for up to ms; returns -1 when the tap connection is lost. */
static int tap_read(long ms)
{
    long long until = iwt_now_ms() + ms;
    while (tap) {
        long long left = until - iwt_now_ms();
        if (left < 0)
            left = 0;
        struct timeval tv = {(time_t)(left / 1000), (suseconds_t)(left % 1000) * 1000};
        amqp_envelope_t env;
        amqp_maybe_release_buffers(tap);
        amqp_rpc_reply_t r = amqp_consume_message(tap, &env, &tv, 0);
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
            r.library_error == AMQP_STATUS_TIMEOUT) {
            tap_ack();
            return 0;
        }
        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
            fprintf(stderr, "soak: tap connection lost; reopening\n");
            amqp_destroy_connection(tap);
            tap = NULL;
            tap_open();
            return -1;
        }
        on_event(&env);
        tap_last_tag = env.delivery_tag;
        amqp_destroy_envelope(&env);
        if (tap_last_tag - tap_acked_tag >= 256)
            tap_ack();
        if (left <= 0) {
            tap_ack();
            return 0;
        }
    }
    return 0;
}

/* ---- workers and faults --------------------------------------------------- */

static void start_worker(worker *w)
{
    w->pid = iwt_track(iwt_start_worker(w->role, ns, mock_port, worker_env, w->tag));
}

static void kill_one(void)
{
    worker *w = &workers[kills % n_workers];
    /* wall-clock time, to match the workers' log lines */
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    fprintf(stderr, "soak: %02d:%02d:%02d.%03ldZ SIGKILL %s (pid %ld)\n", tm.tm_hour, tm.tm_min,
            tm.tm_sec, ts.tv_nsec / 1000000, w->tag, (long)w->pid);
    iwt_stop_tracked(w->pid, SIGKILL);
    start_worker(w);
    kills++;
    last_fault_ms = iwt_now_ms();
}

static void run_ctl(const char *what)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "'%s' ctl %s '%s'", o.ctl, what, o.workdir);
    int rc = system(cmd);
    if (rc != 0) {
        fprintf(stderr, "soak: '%s' failed (%d)\n", cmd, rc);
        exit(1);
    }
}

/* The driver closes its own connections cleanly around the broker restart;
 * the workers are not told. */
static void restart_rabbit(void)
{
    fprintf(stderr, "soak: restarting rabbitmq\n");
    tap_close();
    conn_close(pub);
    pub = NULL;
    run_ctl(o.rabbit_kill ? "rabbit-kill" : "rabbit-restart");
    if (pub_open() != 0) {
        fprintf(stderr, "soak: broker did not come back\n");
        exit(1);
    }
    tap_open();
    rabbit_restarts++;
    last_fault_ms = iwt_now_ms();
}

static void restart_redis(void)
{
    fprintf(stderr, "soak: restarting redis\n");
    run_ctl("redis-restart");
    redis_restarts++;
    last_fault_ms = iwt_now_ms();
}

/* Proof that the audit can fail, deterministically: a loss (the next 5 jobs
 * are published while <ns>.submit is unbound from <ns>.requests, so the broker
 * confirms and drops them, as a lost binding would) and a duplicate outcome (a
 * second and a third status.final with other bodies for soak-0, as a broken
 * worker would publish).  *published advances past the dropped jobs. */
static void sabotage(long *published)
{
    char q[300], ex[300];
    snprintf(q, sizeof q, "%s.submit", ns);
    snprintf(ex, sizeof ex, "%s.requests", ns);
    amqp_queue_unbind(pub, 1, amqp_cstring_bytes(q), amqp_cstring_bytes(ex),
                      amqp_cstring_bytes("submit.#"), amqp_empty_table);
    if (!ok_reply(pub))
        fprintf(stderr, "soak: sabotage: unbind failed\n");
    long to = *published + 5 < o.jobs ? *published + 5 : o.jobs;
    publish_range(*published, to);
    *published = to;
    amqp_queue_bind(pub, 1, amqp_cstring_bytes(q), amqp_cstring_bytes(ex),
                    amqp_cstring_bytes("submit.#"), amqp_empty_table);
    if (!ok_reply(pub))
        fprintf(stderr, "soak: sabotage: rebind failed\n");

    snprintf(ex, sizeof ex, "%s.events", ns);
    amqp_basic_properties_t p;
    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_CORRELATION_ID_FLAG;
    p.correlation_id = amqp_cstring_bytes("soak-0");
    for (int k = 0; k < 2; k++) {
        char body[128];
        snprintf(body, sizeof body,
                 "{\"jobId\":\"soak-0\",\"status\":\"completed\",\"sabotage\":%d}", k);
        amqp_basic_publish(pub, 1, amqp_cstring_bytes(ex), amqp_cstring_bytes("status.final"), 0, 0,
                           &p, amqp_cstring_bytes(body));
        pub_seq++;
    }
    pub_wait_confirms();
    fprintf(stderr,
            "soak: sabotage: jobs up to soak-%ld dropped unrouted, two status.final for "
            "soak-0 published\n",
            to - 1);
}

/* ---- the audit -------------------------------------------------------------- */

static long queue_depth(const char *name)
{
    amqp_queue_declare_ok_t *ok =
        amqp_queue_declare(pub, 1, amqp_cstring_bytes(name), 1, 0, 0, 0, amqp_empty_table);
    if (!ok_reply(pub)) {
        fprintf(stderr, "soak: queue %s is missing\n", name);
        amqp_destroy_connection(pub);
        pub_open();
        return -1;
    }
    return (long)ok->message_count;
}

/* Messages in the submit, status and delay queues (-1 for a missing queue
 * counts as one stranded); details to stderr when verbose. */
static long stranded(int verbose)
{
    char name[300];
    long total = 0, d;
    snprintf(name, sizeof name, "%s.submit", ns);
    d = queue_depth(name);
    total += d < 0 ? 1 : d;
    if (verbose && d)
        fprintf(stderr, "soak: %s holds %ld\n", name, d);
    snprintf(name, sizeof name, "%s.status", ns);
    d = queue_depth(name);
    total += d < 0 ? 1 : d;
    if (verbose && d)
        fprintf(stderr, "soak: %s holds %ld\n", name, d);
    for (int k = 0; k < IW_DELAY_TIERS; k++) {
        snprintf(name, sizeof name, "%s.delay.%ld", ns, topology_tier_ms(k));
        d = queue_depth(name);
        total += d < 0 ? 1 : d;
        if (verbose && d)
            fprintf(stderr, "soak: %s holds %ld\n", name, d);
    }
    return total;
}

/* True when one of the x-death entries of a dead letter has reason
 * delivery_limit. */
static int by_delivery_limit(json_t *headers)
{
    json_t *deaths = json_object_get(headers, "x-death"), *d;
    size_t k;
    json_array_foreach(deaths, k, d)
    {
        const char *reason = json_string_value(json_object_get(d, "reason"));
        if (reason && !strcmp(reason, "delivery_limit"))
            return 1;
    }
    return 0;
}

static void read_dead(void)
{
    char name[300];
    snprintf(name, sizeof name, "%s.dead", ns);
    for (;;) {
        amqp_rpc_reply_t r = amqp_basic_get(pub, 1, amqp_cstring_bytes(name), 1);
        if (r.reply_type != AMQP_RESPONSE_NORMAL || r.reply.id != AMQP_BASIC_GET_OK_METHOD)
            break;
        amqp_message_t m;
        if (amqp_read_message(pub, 1, &m, 0).reply_type != AMQP_RESPONSE_NORMAL)
            break;
        dead_total++;
        json_t *body = json_loadb(m.body.bytes, m.body.len, 0, NULL);
        json_t *headers = (m.properties._flags & AMQP_BASIC_HEADERS_FLAG)
                              ? amqp_table_to_json(&m.properties.headers)
                              : json_object();
        const char *id = json_string_value(json_object_get(body, "jobId"));
        long i = id ? job_index(id, strlen(id)) : -1;
        if (i < 0)
            dead_foreign++;
        else {
            jobs[i].dead++;
            jobs[i].dead_limit += by_delivery_limit(headers);
        }
        json_decref(body);
        json_decref(headers);
        amqp_destroy_message(&m);
    }
}

static long stat_sum(json_t *stats, const char *route, int lo, int hi)
{
    long n = 0;
    for (int c = lo; c <= hi; c++) {
        char k[8];
        snprintf(k, sizeof k, "%d", c);
        n += iwt_stat(stats, route, k);
    }
    return n;
}

static void print_counts(const char *title, json_t *counts)
{
    const char *k;
    json_t *v;
    printf("  %s:", title);
    json_object_foreach(counts, k, v) printf(" %s %lld", k, (long long)json_integer_value(v));
    printf("\n");
}

/* Writes one line per job that breaks a promise; returns how many. */
static long problems(FILE *f, const char *what, int (*bad)(const job *))
{
    long n = 0;
    for (long i = 0; i < o.jobs; i++) {
        const job *j = &jobs[i];
        if (!bad(j))
            continue;
        if (n < PRINT_PROBLEMS || f != stdout)
            fprintf(f,
                    "  %s: soak-%ld (kind %d, published %d): accepted %d/%d conflicting, final "
                    "%d/%d, failed %d/%d, dead letters %d (delivery_limit %d)\n",
                    what, i, j->kind, j->published, j->accepted.n, j->accepted.conflicts,
                    j->final.n, j->final.conflicts, j->failed.n, j->failed.conflicts, j->dead,
                    j->dead_limit);
        n++;
    }
    return n;
}

static int is_lost(const job *j)
{
    return j->published && !has_outcome(j);
}
static int is_dup_outcome(const job *j)
{
    return j->final.conflicts || j->failed.conflicts || (j->final.n && j->failed.n) ||
           j->accepted.conflicts;
}
static int is_final_without_accepted(const job *j)
{
    return j->final.n && !j->accepted.n;
}
static int is_failed_without_dead(const job *j)
{
    return j->failed.n && !j->dead;
}
static int is_dead_without_failed(const job *j)
{
    return j->dead && !j->failed.n;
}
static int is_delivery_limit(const job *j)
{
    return j->dead_limit > 0;
}
/* A job that the mock fails always must not end in status.final; a final
 * must carry the terminal status the mock was told for the job. */
/* The contract: a failing status check is tried again on the poll schedule
 * until IW_POLL_MAX_AGE and never ends an accepted job before then. */
static int is_accepted_then_failed(const job *j)
{
    return j->accepted.n && j->failed.n && !j->failed_polling;
}
static int is_quiet_repeat(const job *j)
{
    return j->quiet_repeats > 0;
}
static int is_wrong_outcome(const job *j)
{
    if (!j->final.n)
        return 0;
    return j->kind == K_FAIL_503 || j->kind == K_FAIL_400 ||
           j->final_status != (j->kind == K_REJECTED ? 'r' : 'c');
}

/* ---- main ------------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr,
            "usage: soak --amqp-port P --redis-port P --ctl RUN_SH --workdir DIR [--jobs N]\n"
            "            [--duration S] [--submitters N] [--pollers N] [--kill-every-ms MS]\n"
            "            [--error-rate CODE=P,...] [--latency-ms MS] [--latency-jitter-ms MS]\n"
            "            [--checks N] [--double-rate P] [--drain-s S] [--settle-ms MS]\n"
            "            [--log-level L] [--seed N] [--rabbit-restart shutdown|kill]\n"
            "            [--http-timeout D]\n"
            "            [--sabotage audit]\n"
            "--sabotage audit breaks the run on purpose (5 jobs published while unrouted,\n"
            "two extra status.final with other bodies) to show that the audit fails.\n"
            "Started by tests/soak/run.sh, which provides the private servers.\n");
}

static int parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            return -1;
        i++;
        if (!strcmp(a, "--jobs"))
            o.jobs = atol(v);
        else if (!strcmp(a, "--duration"))
            o.duration_s = atol(v);
        else if (!strcmp(a, "--submitters"))
            o.submitters = atol(v);
        else if (!strcmp(a, "--pollers"))
            o.pollers = atol(v);
        else if (!strcmp(a, "--kill-every-ms"))
            o.kill_every_ms = atol(v);
        else if (!strcmp(a, "--error-rate"))
            o.error_rate = v;
        else if (!strcmp(a, "--latency-ms"))
            o.latency_ms = atol(v);
        else if (!strcmp(a, "--latency-jitter-ms"))
            o.jitter_ms = atol(v);
        else if (!strcmp(a, "--checks"))
            o.checks = atol(v);
        else if (!strcmp(a, "--double-rate"))
            o.double_rate = atof(v);
        else if (!strcmp(a, "--drain-s"))
            o.drain_s = atol(v);
        else if (!strcmp(a, "--settle-ms"))
            o.settle_ms = atol(v);
        else if (!strcmp(a, "--log-level"))
            o.log_level = v;
        else if (!strcmp(a, "--seed"))
            o.seed = atol(v);
        else if (!strcmp(a, "--amqp-port"))
            o.amqp_port = atoi(v);
        else if (!strcmp(a, "--redis-port"))
            o.redis_port = atoi(v);
        else if (!strcmp(a, "--ctl"))
            o.ctl = v;
        else if (!strcmp(a, "--workdir"))
            o.workdir = v;
        else if (!strcmp(a, "--rabbit-restart") && (!strcmp(v, "kill") || !strcmp(v, "shutdown")))
            o.rabbit_kill = !strcmp(v, "kill");
        else if (!strcmp(a, "--http-timeout"))
            o.http_timeout = v;
        else if (!strcmp(a, "--sabotage"))
            o.sabotage = v;
        else
            return -1;
    }
    if (o.jobs < 1 || o.duration_s < 1 || o.submitters < 1 || o.pollers < 1 ||
        o.submitters + o.pollers > MAX_WORKERS || o.kill_every_ms < 100 || o.checks < 1 ||
        o.amqp_port <= 0 || o.redis_port <= 0 || !o.ctl || !o.workdir ||
        (o.sabotage && strcmp(o.sabotage, "audit")))
        return -1;
    return 0;
}

static pid_t start_mock(void)
{
    static char lat[24], jit[24], chk[24], seed[24], rates[16][32];
    const char *args[64];
    int n = 0;
    snprintf(lat, sizeof lat, "%ld", o.latency_ms);
    snprintf(jit, sizeof jit, "%ld", o.jitter_ms);
    snprintf(chk, sizeof chk, "%ld", o.checks);
    snprintf(seed, sizeof seed, "%ld", o.seed);
    args[n++] = "--rate-limits";
    args[n++] = "off";
    args[n++] = "--checks-to-complete";
    args[n++] = chk;
    args[n++] = "--latency-ms";
    args[n++] = lat;
    args[n++] = "--latency-jitter-ms";
    args[n++] = jit;
    args[n++] = "--seed";
    args[n++] = seed;
    /* one --error-rate flag per CODE=P of the comma-separated list */
    const char *p = o.error_rate;
    for (int r = 0; *p && r < 16; r++) {
        size_t len = strcspn(p, ",");
        snprintf(rates[r], sizeof rates[r], "%.*s", (int)len, p);
        args[n++] = "--error-rate";
        args[n++] = rates[r];
        p += len + (p[len] == ',');
    }
    args[n] = NULL;
    return iwt_track(iwt_start_mock(args, &mock_port));
}

int main(int argc, char **argv)
{
    if (parse_args(argc, argv) != 0) {
        usage();
        return 2;
    }
    iwt_standalone = 1;
    signal(SIGPIPE, SIG_IGN);
    if (!o.seed)
        o.seed = (long)getpid();
    iwt_use_servers(o.amqp_port, o.redis_port);
    jobs = calloc((size_t)o.jobs, sizeof *jobs);
    final_statuses = json_object();
    failed_codes = json_object();
    for (long i = 0; i < o.jobs; i++)
        jobs[i].kind = (unsigned char)kind_of(i);

    ns = iwt_namespace("soak");
    start_mock();
    iwt_declare(ns);
    if (pub_open() != 0) {
        fprintf(stderr, "soak: broker unreachable\n");
        return 1;
    }
    declare_tap(pub);
    tap_open();

    snprintf(env_log, sizeof env_log, "IW_LOG_LEVEL=%s", o.log_level);
    int e = 0;
    worker_env[e++] = "IW_POLL_SCHEDULE=250ms";
    worker_env[e++] = "IW_POLL_JITTER=20";
    worker_env[e++] = "IW_RATE_LIMITS=1000000/s";
    worker_env[e++] = "IW_RETRY_SCHEDULE=0s,200ms,400ms,800ms";
    snprintf(env_timeout, sizeof env_timeout, "IW_HTTP_TIMEOUT=%s", o.http_timeout);
    worker_env[e++] = env_timeout;
    worker_env[e++] = "IW_SHUTDOWN_GRACE=10s";
    worker_env[e++] = "IW_BREAKER_FAILURES=1000";
    worker_env[e++] = env_log;
    worker_env[e] = NULL;
    for (long k = 0; k < o.submitters + o.pollers; k++) {
        worker *w = &workers[n_workers++];
        w->role = k < o.submitters ? "submitter" : "poller";
        snprintf(w->tag, sizeof w->tag, "%s%ld", w->role, k < o.submitters ? k : k - o.submitters);
        start_worker(w);
    }
    printf("soak: namespace %s, %ld jobs over %ld s, %ld submitters + %ld pollers, mock seed %ld, "
           "errors %s, latency %ld+0..%ld ms\n",
           ns, o.jobs, o.duration_s, o.submitters, o.pollers, o.seed, o.error_rate, o.latency_ms,
           o.jitter_ms);
    fflush(stdout);

    long long t0 = iwt_now_ms(), dur = o.duration_s * 1000;
    long long rabbit_at = t0 + dur * 3 / 10, redis_at = t0 + dur * 55 / 100;
    long long faults_end = t0 + dur * FAULT_SHARE / 100;
    long long next_kill = t0 + o.kill_every_ms, last_outcome = t0, published_at = 0;
    long published = 0, last_in = 0;
    for (;;) {
        long long now = iwt_now_ms();
        long target = now - t0 >= dur ? o.jobs : (long)((now - t0) * o.jobs / dur);
        while (published < target) {
            long to = published + PUBLISH_BATCH < target ? published + PUBLISH_BATCH : target;
            publish_range(published, to);
            published = to;
        }
        if (published == o.jobs && !published_at)
            published_at = iwt_now_ms();
        if (!rabbit_restarts && now >= rabbit_at) {
            restart_rabbit();
            if (o.sabotage)
                sabotage(&published);
        } else if (!redis_restarts && now >= redis_at)
            restart_redis();
        else if (now >= next_kill && now < faults_end) {
            kill_one();
            /* from now: kills that fell due during a server restart are skipped */
            next_kill = iwt_now_ms() + o.kill_every_ms;
        }
        tap_read(50);
        if (outcomes_in != last_in) {
            last_in = outcomes_in;
            last_outcome = iwt_now_ms();
        }
        if (published == o.jobs && rabbit_restarts && redis_restarts && outcomes_in == o.jobs)
            break;
        if (published == o.jobs && iwt_now_ms() - last_outcome > o.drain_s * 1000) {
            fprintf(stderr, "soak: no new outcome for %ld s; auditing what arrived\n", o.drain_s);
            break;
        }
    }
    long long all_in = iwt_now_ms();
    fprintf(stderr, "soak: %ld of %ld outcomes after %.1f s; settling\n", outcomes_in, o.jobs,
            (all_in - t0) / 1000.0);

    /* Late repeats and stray chains: listen while the workers still run and
     * the queues drain (delay tiers hold at most a few seconds of waits).  The
     * default settle (15 s) outlasts a record's or claim's lease
     * (IW_HTTP_TIMEOUT + 5 s), for which a redelivery may wait unacked. */
    long long until = iwt_now_ms() + o.settle_ms;
    while (iwt_now_ms() < until)
        tap_read(100);
    /* A check a poller holds unacked is in no queue's count: the queues must
     * look empty three times in a row, half a second apart. */
    until = iwt_now_ms() + 60000;
    for (int empty = 0; empty < 3 && iwt_now_ms() < until;) {
        empty = stranded(0) == 0 ? empty + 1 : 0;
        tap_read(500);
    }

    int unclean = 0;
    for (int k = 0; k < n_workers; k++) {
        int rc = iwt_stop_tracked(workers[k].pid, SIGTERM);
        if (rc != 0) {
            fprintf(stderr, "soak: %s exited %d on SIGTERM\n", workers[k].tag, rc);
            unclean++;
        }
    }
    /* what the workers published while stopping */
    long before;
    do {
        before = ev_total;
        tap_read(1500);
    } while (ev_total != before);
    long left_over = stranded(1);
    read_dead();
    json_t *stats = iwt_mock_stats(mock_port);
    tap_close();

    /* ---- report ---- */
    const char *post = "POST /api/v1/external-resource", *get = "GET /api/v1/status";
    /* [0]: jobs published once, [1]: jobs the "upstream" published twice */
    long accepted = 0, repeats_acc[2] = {0}, repeats_final[2] = {0}, repeats_failed[2] = {0},
         repeats_progress[2] = {0}, dead_repeats[2] = {0};
    for (long i = 0; i < o.jobs; i++) {
        const job *j = &jobs[i];
        int d = j->published > 1;
        accepted += j->accepted.n > 0;
        repeats_acc[d] += j->accepted.repeats;
        repeats_final[d] += j->final.repeats;
        repeats_failed[d] += j->failed.repeats;
        repeats_progress[d] += j->progress_repeats;
        dead_repeats[d] += j->dead > 1 ? j->dead - 1 : 0;
    }
    long created = (long)json_integer_value(json_object_get(stats, "submissions_created"));
    long refused = (long)json_integer_value(json_object_get(stats, "duplicates_refused"));

    printf("soak: %ld jobs (%ld published twice by 'upstream') in %.1f s (publishing %ld s, last "
           "outcome after %.1f s)\n",
           o.jobs, double_published, (iwt_now_ms() - t0) / 1000.0, o.duration_s,
           (all_in - t0) / 1000.0);
    printf("  faults: %ld worker SIGKILLs, %ld RabbitMQ restart, %ld Redis restart; provider: "
           "%ld x 5xx, %ld x 429, %ld closed connections (of %ld POSTs, %ld status GETs)\n",
           kills, rabbit_restarts, redis_restarts,
           stat_sum(stats, post, 500, 599) + stat_sum(stats, get, 500, 599),
           iwt_stat(stats, post, "429") + iwt_stat(stats, get, "429"),
           iwt_stat(stats, post, "0") + iwt_stat(stats, get, "0"), stat_sum(stats, post, 0, 599),
           stat_sum(stats, get, 0, 599));
    printf("  events: %ld read (%ld foreign, %ld tap redeliveries ignored)\n", ev_total, ev_foreign,
           ev_tap_redelivered);
    print_counts("status.final by status", final_statuses);
    print_counts("submission.failed by code", failed_codes);
    for (int d = 0; d < 2; d++)
        printf("  byte-identical repeats on jobs published %s: submission.accepted %ld, "
               "status.final %ld, submission.failed %ld, status.progress %ld; extra dead letters "
               "%ld\n",
               d ? "twice" : "once", repeats_acc[d], repeats_final[d], repeats_failed[d],
               repeats_progress[d], dead_repeats[d]);
    printf("  provider: %ld submissions created for %ld accepted jobs, %ld duplicate keys "
           "answered from the first 201\n",
           created, accepted, refused);
    printf("  dead letters: %ld (%ld not ours)\n", dead_total, dead_foreign);

    char path[600];
    snprintf(path, sizeof path, "%s/audit-problems.txt", o.workdir);
    FILE *f = fopen(path, "w");
    long lost = problems(stdout, "LOST", is_lost);
    long dup = problems(stdout, "DUPLICATE OUTCOME", is_dup_outcome);
    long nacc = problems(stdout, "FINAL WITHOUT ACCEPTED", is_final_without_accepted);
    long fnd = problems(stdout, "FAILED WITHOUT DEAD LETTER", is_failed_without_dead);
    long dnf = problems(stdout, "DEAD LETTER WITHOUT FAILED", is_dead_without_failed);
    long lim = problems(stdout, "DELIVERY LIMIT", is_delivery_limit);
    long wrong = problems(stdout, "WRONG OUTCOME", is_wrong_outcome);
    long quiet = problems(stdout, "REPEAT AWAY FROM FAULTS", is_quiet_repeat);
    long atf = problems(stdout, "ACCEPTED THEN FAILED", is_accepted_then_failed);
    if (f) {
        problems(f, "LOST", is_lost);
        problems(f, "DUPLICATE OUTCOME", is_dup_outcome);
        problems(f, "FINAL WITHOUT ACCEPTED", is_final_without_accepted);
        problems(f, "FAILED WITHOUT DEAD LETTER", is_failed_without_dead);
        problems(f, "DEAD LETTER WITHOUT FAILED", is_dead_without_failed);
        problems(f, "DELIVERY LIMIT", is_delivery_limit);
        problems(f, "WRONG OUTCOME", is_wrong_outcome);
        problems(f, "REPEAT AWAY FROM FAULTS", is_quiet_repeat);
        problems(f, "ACCEPTED THEN FAILED", is_accepted_then_failed);
        fclose(f);
    }
    int ok = lost == 0 && dup == 0 && nacc == 0 && fnd == 0 && dnf == 0 && lim == 0 && wrong == 0 &&
             quiet == 0 && atf == 0 && left_over == 0 && created == accepted && dead_foreign == 0;
    printf(
        "soak: %s: lost %ld, duplicate outcomes %ld, final without accepted %ld, failed without "
        "dead letter %ld, dead letter without failed %ld, delivery-limit dead letters %ld, wrong "
        "outcomes %ld, repeats away from faults %ld, accepted jobs ended by submission.failed %ld, "
        "stranded messages %ld, extra provider "
        "submissions %ld; workers not exiting 0 on SIGTERM: %d\n",
        ok ? "PASS" : "FAIL", lost, dup, nacc, fnd, dnf, lim, wrong, quiet, atf, left_over,
        created - accepted, unclean);
    json_decref(stats);
    json_decref(final_statuses);
    json_decref(failed_codes);
    free(jobs);
    iwt_stop_all();
    return ok ? 0 : 1;
}
