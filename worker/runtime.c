#include "runtime.h"

#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "admin_http.h"
#include "clock.h"
#include "errcode.h"
#include "jobkey.h"
#include "json_out.h"
#include "log.h"
#include "metrics.h"
#include "parse.h"
#include "topology.h"

#define MAX_ROLES 4
#define MAX_SERVICES 4
#define HOUSEKEEPING_MS 1000
#define STOP_POLL_MS 100
#define AMQP_BACKOFF_MIN_MS 500
#define AMQP_BACKOFF_MAX_MS 30000
#define REDIS_RETRY_MS 1000

typedef struct rt_consumer {
    const char *queue_suffix;
    void (*on_delivery)(void *self, iw_delivery *d);
    void *self;
} rt_consumer;

struct runtime {
    iw_config *cfg;
    char process_name[128];
    loop *lp;
    amqp_link *amqp;
    redis_link *redis;
    limiter *lim;
    http_client *http;
    rt_consumer roles[MAX_ROLES];
    char tags[MAX_ROLES][96];
    size_t n_roles;
    rt_service services[MAX_SERVICES];
    size_t n_services;
    loop_timer housekeeping;
    int stopping;
    int fatal;
    long long stop_deadline;
    long long amqp_retry_at;
    long amqp_backoff;
    int amqp_fd;
    int redis_down;
    long long redis_retry_at;
    long long redis_probed_at;
    int topology_stale; /* a publish into our topology came back: re-declare */
    int amqp_events;    /* what the loop watches the broker's socket for */
};

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static void housekeeping(loop *l, loop_timer *t);
static void amqp_readable(loop *l, int fd, int events, void *ud);

runtime *runtime_new(iw_config *cfg, const char *process_name, iw_error *err)
{
    runtime *rt = calloc(1, sizeof *rt);
    http_client_opts ho;

    if (!rt) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        return NULL;
    }
    rt->cfg = cfg;
    rt->amqp_fd = -1;
    snprintf(rt->process_name, sizeof rt->process_name, "%s", process_name);
    rt->amqp_backoff = AMQP_BACKOFF_MIN_MS;
    rt->lp = loop_new();
    if (!rt->lp) {
        iw_error_set(err, IW_ERR_NOMEM, "cannot create the event loop");
        goto fail;
    }
    loop_timer_init(&rt->housekeeping, housekeeping, rt);
    rt->redis = redis_link_from_config(cfg, err);
    if (!rt->redis)
        goto fail;
    rt->lim =
        limiter_new(rt->redis, cfg->ns, cfg->rate_tiers, cfg->n_rate_tiers, cfg->rate_guard_ms);
    if (rt->lim) {
        limiter_policy policy = limiter_policy_from_config(cfg);
        limiter_set_policy(rt->lim, &policy);
    }
    memset(&ho, 0, sizeof ho);
    ho.base_url = cfg->provider_url;
    ho.auth_mode = cfg->auth_mode;
    ho.api_key = cfg->api_key;
    ho.api_secret = cfg->api_secret;
    ho.basic_user = cfg->basic_user;
    ho.basic_password = cfg->basic_password;
    ho.oauth_client_id = cfg->oauth_client_id;
    ho.oauth_client_secret = cfg->oauth_client_secret;
    ho.tls_cert = cfg->tls_cert;
    ho.tls_key = cfg->tls_key;
    ho.tls_ca = cfg->tls_ca;
    ho.timeout_ms = cfg->http_timeout_ms;
    ho.connect_timeout_ms = cfg->http_connect_timeout_ms;
    ho.max_response_bytes = cfg->max_response_bytes;
    ho.max_connections = cfg->concurrency;
    ho.max_wait_ms = cfg->max_rate_pause_ms;
    ho.token_store = rt->redis; /* one OAuth token for the fleet */
    ho.ns = cfg->ns;
    ho.token_backoff_min_ms = cfg->token_backoff_min_ms;
    ho.token_backoff_max_ms = cfg->token_backoff_max_ms;
    rt->http = http_client_new(&ho, err);
    if (!rt->lim || !rt->http)
        goto fail;
    if (http_client_attach(rt->http, rt->lp) != IW_OK) {
        iw_error_set(err, IW_ERR_NOMEM, "cannot attach the HTTP client to the loop");
        goto fail;
    }
    return rt;
fail:
    runtime_free(rt);
    return NULL;
}

/* Frees the broker link first: failing its pending confirms completes (and
 * frees) the jobs still waiting for them, while the services and roles they
 * call back into are still alive.  The services are freed by their owners
 * after this returns. */
void runtime_free(runtime *rt)
{
    if (!rt)
        return;
    if (rt->amqp) {
        amqp_link *l = rt->amqp;
        rt->amqp = NULL;
        loop_watch(rt->lp, rt->amqp_fd, 0, NULL, NULL);
        amqp_link_free(l);
    }
    for (size_t i = 0; i < rt->n_services; i++)
        if (rt->services[i].on_exit)
            rt->services[i].on_exit(rt->services[i].self);
    http_client_free(rt->http);
    limiter_free(rt->lim);
    redis_link_free(rt->redis);
    if (rt->lp)
        loop_timer_cancel(rt->lp, &rt->housekeeping);
    loop_free(rt->lp);
    free(rt);
}

int runtime_add_role(runtime *rt, const rt_role *role)
{
    if (rt->n_roles == MAX_ROLES)
        return IW_ERR_INVALID;
    rt->roles[rt->n_roles] = (rt_consumer){role->queue_suffix, role->on_delivery, role->self};
    snprintf(rt->tags[rt->n_roles], sizeof rt->tags[0], "%s-%ld-%zu", role->name, (long)getpid(),
             rt->n_roles);
    rt->n_roles++;
    return IW_OK;
}

int runtime_add_service(runtime *rt, const rt_service *svc)
{
    if (rt->n_services == MAX_SERVICES)
        return IW_ERR_INVALID;
    rt->services[rt->n_services++] = *svc;
    return IW_OK;
}

loop *rt_loop(runtime *rt)
{
    return rt->lp;
}

const iw_config *rt_config(const runtime *rt)
{
    return rt->cfg;
}

http_client *rt_http(runtime *rt)
{
    return rt->http;
}

limiter *rt_limiter(runtime *rt)
{
    return rt->lim;
}

redis_link *rt_redis(runtime *rt)
{
    return rt->redis;
}

int rt_stopping(const runtime *rt)
{
    return rt->stopping;
}

const char *rt_name(const runtime *rt, char *buf, size_t len, const char *suffix)
{
    return topology_name(buf, len, rt->cfg->ns, suffix);
}

iw_schema *rt_load_schema(const runtime *rt, const char *file, iw_error *err)
{
    char *path = NULL;
    iw_schema *s;

    if (asprintf(&path, "%s/%s", rt->cfg->schema_dir, file) < 0) {
        iw_error_set(err, IW_ERR_NOMEM, "out of memory");
        return NULL;
    }
    s = schema_load_file(path, err);
    free(path);
    return s;
}

/* ---- connections --------------------------------------------------------- */

int rt_redis_ready(runtime *rt)
{
    iw_error err;
    long long now;

    if (redis_link_connected(rt->redis)) {
        if (rt->redis_down) {
            rt->redis_down = 0;
            log_msg(IW_LOG_INFO, NULL, "Redis is back: limiter permits resume");
        }
        return 1;
    }
    now = clock_mono_ms();
    if (now < rt->redis_retry_at)
        return 0;
    if (redis_link_ensure(rt->redis, &err) == IW_OK) {
        if (rt->redis_down)
            log_msg(IW_LOG_INFO, NULL, "Redis is back: limiter permits resume");
        rt->redis_down = 0;
        return 1;
    }
    rt->redis_retry_at = now + REDIS_RETRY_MS;
    if (!rt->redis_down)
        log_json(IW_LOG_ERROR,
                 json_pack("{s:s, s:{s:s, s:s}}", "message",
                           "Redis unavailable: the limiter fails closed, no provider calls and no "
                           "new deliveries until it is back",
                           "error", "code", iw_code_name(IW_C_REDIS_UNAVAILABLE), "message",
                           err.msg));
    rt->redis_down = 1;
    return 0;
}

static void dispatch_delivery(void *ud, iw_delivery *d)
{
    runtime *rt = ud;

    for (size_t i = 0; i < rt->n_roles; i++) {
        if (strcmp(d->consumer_tag, rt->tags[i]) == 0) {
            rt->roles[i].on_delivery(rt->roles[i].self, d);
            return;
        }
    }
    /* not ours (cannot happen): give it back */
    rt_nack(rt, d, 1);
    delivery_free(d);
}

/* True for a publish into the topology topology_declare makes (the delay
 * tiers through the default exchange, N.retry, N.dlx), not N.events or a
 * client's reply queue. */
static int own_topology(runtime *rt, const char *exchange, const char *routing_key)
{
    char events[256];
    size_t n = strlen(rt->cfg->ns);
    const char *name = *exchange ? exchange : routing_key;

    if (*exchange && strcmp(exchange, rt_name(rt, events, sizeof events, "events")) == 0)
        return 0;
    return strncmp(name, rt->cfg->ns, n) == 0 && name[n] == '.';
}

/* A publish came back unroutable (the link fails its confirm with
 * IW_ERR_AMQP_RETURNED).  Into our own topology: ERROR, /readyz false and a
 * re-declare.  An event nobody is bound for, or a reply whose client queue is
 * gone: WARN only (outcome_publish counts it as published). */
static void on_amqp_return(void *ud, const char *exchange, const char *routing_key)
{
    runtime *rt = ud;
    int ours = own_topology(rt, exchange, routing_key);

    log_json(ours ? IW_LOG_ERROR : IW_LOG_WARN,
             json_pack("{s:s, s:{s:s, s:s}, s:s, s:s}", "message",
                       ours ? "the broker returned a publish as unroutable: its outcome fails "
                              "and the topology is re-declared"
                            : "an event or reply reached no queue: nobody is bound for it",
                       "error", "code", iw_code_name(IW_C_BROKER_RETURNED), "message",
                       "no queue is bound for this exchange and routing key", "exchange", exchange,
                       "routingKey", routing_key));
    if (ours)
        rt->topology_stale = 1;
}

static void on_amqp_rejected(void *ud, const char *routing_key, uint64_t body_size)
{
    runtime *rt = ud;

    log_json(IW_LOG_WARN,
             json_pack("{s:s, s:{s:s, s:s}, s:s, s:I, s:I}", "message",
                       "delivery too large to hold rejected unread; the broker dead-letters it",
                       "error", "code", iw_code_name(IW_C_MESSAGE_TOO_LARGE), "message",
                       "larger than what is left of IW_MAX_HELD_BYTES", "routingKey", routing_key,
                       "bodyBytes", (json_int_t)body_size, "maxHeldBytes",
                       (json_int_t)rt->cfg->max_held_bytes));
}

static void on_amqp_blocked(void *ud, int blocked, const char *reason)
{
    (void)ud;
    if (blocked)
        log_json(IW_LOG_WARN,
                 json_pack("{s:s, s:s}", "message",
                           "the broker blocks publishing (resource alarm): publishes and acks wait "
                           "in memory",
                           "reason", reason));
    else
        log_msg(IW_LOG_INFO, NULL, "the broker unblocked publishing");
}

/* Returns 0 on success, -1 on a transient failure, -2 on a fatal one (the
 * topology exists with other arguments: retrying cannot help). */
static int connect_amqp(runtime *rt)
{
    amqp_link_handlers h = {dispatch_delivery, rt, on_amqp_return, on_amqp_rejected,
                            on_amqp_blocked};
    amqp_link_tls tls = {rt->cfg->amqp_ca, rt->cfg->amqp_cert, rt->cfg->amqp_key,
                         !rt->cfg->amqp_tls_no_verify};
    iw_error err = {0};
    char queue[256];
    /* by default a backlog of up to 256 deliveries beside the calls in
     * flight (IW_CONCURRENCY at most): enough to keep every slot busy, and
     * each one held costs memory */
    long c = rt->cfg->concurrency,
         prefetch = rt->cfg->prefetch ? rt->cfg->prefetch : c + (c < 256 ? c : 256);

    rt->amqp = amqp_link_connect_tls(rt->cfg->amqp_url, rt->process_name, &h, &tls, &err);
    if (!rt->amqp)
        goto transient;
    amqp_link_set_limits(rt->amqp, (size_t)rt->cfg->max_message_bytes,
                         (size_t)rt->cfg->max_held_bytes);
    rt->topology_stale = 0;
    if (topology_declare(rt->amqp, rt->cfg, &err) != IW_OK) {
        if (strstr(err.msg, "PRECONDITION_FAILED")) {
            log_json(IW_LOG_ERROR,
                     json_pack("{s:s, s:{s:s, s:s}}", "message",
                               "the broker topology differs from this configuration", "error",
                               "code", iw_code_name(IW_C_TOPOLOGY_MISMATCH), "message", err.msg));
            return -2;
        }
        goto transient;
    }
    if (amqp_link_qos(rt->amqp, (uint16_t)(prefetch > 65535 ? 65535 : prefetch), &err) != IW_OK)
        goto transient;
    for (size_t i = 0; i < rt->n_roles; i++) {
        if (amqp_link_consume(rt->amqp, rt_name(rt, queue, sizeof queue, rt->roles[i].queue_suffix),
                              rt->tags[i], &err) != IW_OK)
            goto transient;
    }
    rt->amqp_fd = amqp_link_fd(rt->amqp);
    amqp_link_batch_writes(rt->amqp, 1); /* amqp_buffered pushes at every turn's end */
    rt->amqp_events = LOOP_READ;
    if (loop_watch(rt->lp, rt->amqp_fd, LOOP_READ, amqp_readable, rt) != 0) {
        iw_error_set(&err, IW_ERR_IO, "cannot watch the broker socket");
        goto transient;
    }
    log_msg(IW_LOG_INFO, NULL, "connected to the broker; consuming %zu queue(s), prefetch %ld",
            rt->n_roles, prefetch);
    rt->amqp_backoff = AMQP_BACKOFF_MIN_MS;
    return 0;
transient:
    log_json(IW_LOG_ERROR,
             json_pack("{s:s, s:{s:s, s:s}, s:I}", "message", "broker unavailable, will retry",
                       "error", "code", iw_code_name(IW_C_BROKER_UNAVAILABLE), "message", err.msg,
                       "retryInMs", (json_int_t)rt->amqp_backoff));
    if (rt->amqp) {
        amqp_link *l = rt->amqp;
        rt->amqp = NULL;
        loop_watch(rt->lp, rt->amqp_fd, 0, NULL, NULL);
        amqp_link_free(l);
    }
    rt->amqp_retry_at = clock_mono_ms() + rt->amqp_backoff;
    rt->amqp_backoff =
        rt->amqp_backoff * 2 > AMQP_BACKOFF_MAX_MS ? AMQP_BACKOFF_MAX_MS : rt->amqp_backoff * 2;
    return -1;
}

static void link_lost(runtime *rt)
{
    amqp_link *l = rt->amqp;

    log_json(IW_LOG_ERROR, json_pack("{s:s, s:{s:s, s:s}}", "message",
                                     "broker connection lost; unacked deliveries return to their "
                                     "queues, reconnecting",
                                     "error", "code", iw_code_name(IW_C_BROKER_CONNECTION_LOST),
                                     "message", amqp_link_error(l)));
    rt->amqp = NULL;
    loop_watch(rt->lp, rt->amqp_fd, 0, NULL, NULL);
    amqp_link_free(l); /* fails every pending confirm: their jobs are dropped */
    for (size_t i = 0; i < rt->n_services; i++)
        rt->services[i].on_link_lost(rt->services[i].self);
    rt->amqp_retry_at = clock_mono_ms() + rt->amqp_backoff;
}

int rt_delivery_live(const runtime *rt, const iw_delivery *d)
{
    return rt->amqp && amqp_link_ok(rt->amqp) && d->generation == amqp_link_generation(rt->amqp);
}

void rt_ack(runtime *rt, const iw_delivery *d)
{
    if (rt->amqp)
        amqp_link_ack(rt->amqp, d);
}

void rt_nack(runtime *rt, const iw_delivery *d, int requeue)
{
    if (rt->amqp)
        amqp_link_nack(rt->amqp, d, requeue);
}

/* ---- outcomes ---------------------------------------------------------------- */

void rt_outcome_begin(rt_outcome *o, void (*done)(void *owner, int ok), void *owner)
{
    o->pending = 0;
    o->failed = 0;
    o->status = IW_OK;
    o->sealed = 0;
    o->done = done;
    o->owner = owner;
}

static void outcome_confirmed(void *ud, int status)
{
    rt_outcome *o = ud;

    o->pending--;
    if (status != IW_OK && !o->failed) {
        o->failed = 1;
        o->status = status;
    }
    if (o->sealed && o->pending == 0)
        o->done(o->owner, !o->failed);
}

void rt_outcome_seal(rt_outcome *o)
{
    o->sealed = 1;
    if (o->pending == 0)
        o->done(o->owner, !o->failed);
}

/* An event or a reply that reached no queue (nobody subscribed to N.events
 * for that key, the client's reply queue is gone) is not ours to repair:
 * failing its group would requeue the job for ever.  on_amqp_return logs it. */
static void outcome_confirmed_routable_or_not(void *ud, int status)
{
    outcome_confirmed(ud, status == IW_ERR_AMQP_RETURNED ? IW_OK : status);
}

/* strict: a return fails the group (a publish into our own topology: delay
 * tiers, retry exchange, dead letters). */
static void outcome_publish(runtime *rt, rt_outcome *o, const iw_publish *p, int strict)
{
    o->pending++;
    if (!rt->amqp) {
        outcome_confirmed(o, IW_ERR_AMQP_CLOSED);
        return;
    }
    amqp_link_publish(rt->amqp, p, strict ? outcome_confirmed : outcome_confirmed_routable_or_not,
                      o);
}

/* The correlation_id of a job's messages (contract): its jobId, or its
 * jobKey (sha256:...) when the jobId is longer than an AMQP short string
 * holds (255 bytes).  NULL when there is no jobId. */
static const char *correlation_of(const char *id, char key[JOBKEY_SIZE])
{
    if (!id)
        return NULL;
    if (strlen(id) <= 255)
        return id;
    return jobkey(id, strlen(id), key) == IW_OK ? key : NULL;
}

void rt_publish_event_text(runtime *rt, rt_outcome *o, const char *routing_key, const char *body,
                           size_t len, const char *job_id)
{
    char exchange[256], key[JOBKEY_SIZE];
    iw_publish p = {0};

    p.exchange = rt_name(rt, exchange, sizeof exchange, "events");
    p.routing_key = routing_key;
    p.body = body;
    p.body_len = len;
    p.content_type = "application/json";
    p.correlation_id = correlation_of(job_id, key);
    outcome_publish(rt, o, &p, 0);
}

/* A message that could not be written (out of memory, a value that is not
 * UTF-8): its group fails and the delivery goes back, rather than "{}" or
 * half a message going out in its place. */
static void outcome_unwritten(rt_outcome *o, int status)
{
    if (!o->failed) {
        o->failed = 1;
        o->status = status;
    }
}

void rt_publish_event(runtime *rt, rt_outcome *o, const char *routing_key, const json_t *body,
                      const char *job_id)
{
    char mem[1024];
    iw_buf text;
    int rc;

    /* written on the stack: amqp_link copies what it keeps */
    buf_init_on(&text, mem, sizeof mem, JSON_OUT_MAX);
    if ((rc = body ? json_out(&text, body) : IW_ERR_INVALID) == IW_OK)
        rt_publish_event_text(rt, o, routing_key, buf_ptr(&text), buf_len(&text), job_id);
    else
        outcome_unwritten(o, rc);
    buf_free(&text);
}

void rt_publish_reply(runtime *rt, rt_outcome *o, const char *reply_to, const char *correlation_id,
                      const json_t *body)
{
    char mem[1024];
    iw_buf text;
    iw_publish p = {0};
    int rc;

    buf_init_on(&text, mem, sizeof mem, JSON_OUT_MAX);
    if ((rc = body ? json_out(&text, body) : IW_ERR_INVALID) != IW_OK) {
        outcome_unwritten(o, rc);
        buf_free(&text);
        return;
    }
    p.exchange = "";
    p.routing_key = reply_to;
    p.body = buf_ptr(&text);
    p.body_len = buf_len(&text);
    p.content_type = "application/json";
    p.correlation_id = correlation_id;
    p.transient = 1;
    outcome_publish(rt, o, &p, 0);
    buf_free(&text);
}

json_t *rt_forward_headers(const iw_delivery *d)
{
    json_t *h = json_deep_copy(d->headers);
    static const char *const drop[] = {"x-death",
                                       "x-first-death-exchange",
                                       "x-first-death-queue",
                                       "x-first-death-reason",
                                       "x-last-death-exchange",
                                       "x-last-death-queue",
                                       "x-last-death-reason"};
    if (!h)
        h = json_object();
    for (size_t i = 0; i < sizeof drop / sizeof drop[0]; i++)
        json_object_del(h, drop[i]);
    return h;
}

/* A dead letter's stable id for the dlq commands: "dl-" and 32 random hex
 * digits, made once, when the dead letter is made. */
static const char *dead_letter_id(char out[36])
{
    static const char hex[] = "0123456789abcdef";
    unsigned char b[16];

    if (getrandom(b, sizeof b, 0) != (ssize_t)sizeof b)
        for (size_t i = 0; i < sizeof b; i++)
            b[i] = (unsigned char)random();
    memcpy(out, "dl-", 3);
    for (size_t i = 0; i < sizeof b; i++) {
        out[3 + 2 * i] = hex[b[i] >> 4];
        out[4 + 2 * i] = hex[b[i] & 15];
    }
    out[35] = '\0';
    return out;
}

void rt_publish_dead(runtime *rt, rt_outcome *o, const iw_delivery *d, iw_role role,
                     const char *queue_suffix, const char *code, const char *message,
                     long http_status, int attempts)
{
    rt_publish_dead_headers(rt, o, d, role, queue_suffix, code, message, http_status, attempts, 1);
}

void rt_publish_dead_headers(runtime *rt, rt_outcome *o, const iw_delivery *d, iw_role role,
                             const char *queue_suffix, const char *code, const char *message,
                             long http_status, int attempts, int forward)
{
    char exchange[256], queue[256], ts[40], mid[36];
    json_t *h = forward ? rt_forward_headers(d) : json_object();
    const char *orig_key = rt_header_str(d, "x-original-routing-key");
    iw_publish p = {0};

    format_timestamp(clock_wall_ms(), ts, sizeof ts);
    metrics_dead_letter_role(role, code);
    json_object_set_new(h, "x-error-code", json_string(code));
    json_object_set_new(h, "x-error-message", json_string(message));
    if (http_status > 0)
        json_object_set_new(h, "x-http-status", json_integer(http_status));
    else
        json_object_del(h, "x-http-status");
    json_object_set_new(h, "x-attempts", json_integer(attempts));
    json_object_set_new(h, "x-original-routing-key",
                        json_string(orig_key         ? orig_key
                                    : d->routing_key ? d->routing_key
                                                     : ""));
    json_object_set_new(h, "x-original-queue",
                        json_string(rt_name(rt, queue, sizeof queue, queue_suffix)));
    json_object_set_new(h, "x-failed-at", json_string(ts));
    json_object_del(h, "x-due-at");
    json_object_del(h, "iw-target");
    /* the dead letter gets its own id; the upstream's is kept for replay */
    if (d->message_id && !json_object_get(h, "x-original-message-id"))
        json_object_set_new(h, "x-original-message-id", json_string(d->message_id));
    p.exchange = rt_name(rt, exchange, sizeof exchange, "dlx");
    p.routing_key = orig_key ? orig_key : d->routing_key ? d->routing_key : "";
    p.body = d->body;
    p.body_len = d->body_len;
    p.content_type = d->content_type;
    p.correlation_id = d->correlation_id;
    p.reply_to = d->reply_to;
    p.message_id = dead_letter_id(mid);
    p.headers = h;
    outcome_publish(rt, o, &p, 1);
    json_decref(h);
}

json_t *rt_error_object(const char *code, const char *message, long http_status, int attempts)
{
    return json_pack("{s:s, s:s, s:o, s:i}", "code", code, "message", message, "statusCode",
                     http_status > 0 ? json_integer(http_status) : json_null(), "retryAttempt",
                     attempts);
}

void rt_publish_failure(runtime *rt, rt_outcome *o, const iw_delivery *d, iw_role role,
                        const char *queue_suffix, const char *job_id, const char *code,
                        const char *message, long http_status, int attempts)
{
    if (job_id) {
        json_t *ev = json_pack("{s:s, s:o}", "jobId", job_id, "error",
                               rt_error_object(code, message, http_status, attempts));
        rt_publish_event(rt, o, "submission.failed", ev, job_id);
        json_decref(ev);
    }
    rt_publish_dead(rt, o, d, role, queue_suffix, code, message, http_status, attempts);
}

json_t *rt_onward_headers(const iw_delivery *d, int attempts, const char *last_error)
{
    json_t *h = rt_forward_headers(d);

    json_object_set_new(h, "x-attempts", json_integer(attempts));
    if (!json_object_get(h, "x-original-routing-key"))
        json_object_set_new(h, "x-original-routing-key",
                            json_string(d->routing_key ? d->routing_key : ""));
    if (!json_object_get(h, "x-first-seen"))
        json_object_set_new(h, "x-first-seen", json_integer(clock_wall_ms()));
    if (last_error)
        json_object_set_new(h, "x-last-error", json_string(last_error));
    else
        json_object_del(h, "x-last-error");
    return h;
}

void rt_publish_delayed(runtime *rt, rt_outcome *o, const char *target, const char *body,
                        size_t len, const char *correlation_id, const json_t *headers,
                        long delay_ms)
{
    char exchange[256], queue[256], suffix[TOPOLOGY_SUFFIX_SIZE], key[JOBKEY_SIZE];
    /* a copy of the top level: only its members are set here, the values
     * they share are never changed */
    json_t *h = headers ? json_copy((json_t *)headers) : json_object();
    int tier = topology_pick_tier(delay_ms);
    iw_publish p = {0};

    json_object_set_new(h, "iw-target", json_string(target));
    json_object_set_new(h, "x-due-at",
                        json_integer(iw_add_ms(clock_wall_ms(), delay_ms > 0 ? delay_ms : 0)));
    if (tier < 0) {
        p.exchange = rt_name(rt, exchange, sizeof exchange, "retry");
        p.routing_key = "";
    } else {
        p.exchange = "";
        p.routing_key = rt_name(rt, queue, sizeof queue, topology_tier_suffix(tier, suffix));
    }
    p.body = body;
    p.body_len = len;
    p.content_type = "application/json";
    p.correlation_id = correlation_of(correlation_id, key);
    p.headers = h;
    outcome_publish(rt, o, &p, 1);
    json_decref(h);
}

long long rt_header_int(const iw_delivery *d, const char *name, long long def)
{
    json_t *v = json_object_get(d->headers, name);
    if (json_is_integer(v))
        return json_integer_value(v);
    if (json_is_real(v))
        return (long long)json_real_value(v);
    if (json_is_string(v)) {
        char *end;
        long long x = strtoll(json_string_value(v), &end, 10);
        if (*json_string_value(v) && !*end)
            return x;
    }
    return def;
}

const char *rt_header_str(const iw_delivery *d, const char *name)
{
    return json_string_value(json_object_get(d->headers, name));
}

/* ---- the loop ------------------------------------------------------------ */

static size_t busy_jobs(runtime *rt)
{
    size_t n = 0;
    for (size_t i = 0; i < rt->n_services; i++)
        n += rt->services[i].busy(rt->services[i].self);
    return n;
}

static void begin_stop(runtime *rt, long long now)
{
    rt->stopping = 1;
    metrics_stopping(1);
    rt->stop_deadline = now + rt->cfg->shutdown_grace_ms;
    log_msg(IW_LOG_INFO, NULL, "stopping: no new deliveries, finishing %zu job(s) within %ld ms",
            busy_jobs(rt), rt->cfg->shutdown_grace_ms);
    for (size_t i = 0; i < rt->n_roles; i++)
        if (rt->amqp)
            amqp_link_cancel(rt->amqp, rt->tags[i]);
    for (size_t i = 0; i < rt->n_services; i++)
        rt->services[i].on_stop(rt->services[i].self);
}

/* Once a second, whatever else happens: connections, heartbeats, the
 * readiness probes behind /readyz and /healthz.  An idle process still finds
 * out within a second or two that Redis or the broker went away. */
static void housekeeping(loop *l, loop_timer *t)
{
    runtime *rt = t->ud;
    long long now = clock_mono_ms();

    (void)l;
    if (!rt->amqp && !rt->stopping && now >= rt->amqp_retry_at && connect_amqp(rt) == -2)
        rt->fatal = 1;
    if (rt->amqp && amqp_link_pump(rt->amqp) != IW_OK) /* also sends heartbeats */
        link_lost(rt);
    if (redis_link_connected(rt->redis) && now - rt->redis_probed_at >= HOUSEKEEPING_MS) {
        iw_error err;
        redisReply *rep = redis_link_command(rt->redis, &err, "PING");
        if (rep)
            freeReplyObject(rep);
        rt->redis_probed_at = now;
    }
    rt_redis_ready(rt);
    metrics_heartbeat(now);
    metrics_connections(rt->amqp != NULL && !rt->topology_stale, redis_link_connected(rt->redis));
    metrics_in_flight(http_client_in_flight(rt->http));
    loop_timer_at(rt->lp, &rt->housekeeping, now + HOUSEKEEPING_MS);
}

/* The broker's socket is readable: every frame available, including those
 * librabbitmq already buffered. */
static void amqp_readable(loop *l, int fd, int events, void *ud)
{
    runtime *rt = ud;

    (void)l;
    (void)fd;
    (void)events;
    if (rt->amqp && amqp_link_pump(rt->amqp) != IW_OK)
        link_lost(rt);
}

/* The last hook of a turn: frames librabbitmq holds in user space are not
 * seen by epoll, so ask for another turn at once while there are any. */
static int amqp_buffered(loop *l, void *ud)
{
    runtime *rt = ud;
    int again = 0;

    (void)l;
    if (rt->amqp && rt->topology_stale && !amqp_link_blocked(rt->amqp)) {
        iw_error err = {0};
        if (topology_declare(rt->amqp, rt->cfg, &err) == IW_OK) {
            rt->topology_stale = 0;
            log_msg(IW_LOG_INFO, NULL, "topology re-declared after an unroutable publish");
        } else if (amqp_link_ok(rt->amqp)) {
            log_msg(IW_LOG_ERROR, NULL, "re-declaring the topology failed: %s", err.msg);
        }
        if (!amqp_link_ok(rt->amqp))
            link_lost(rt);
    }
    if (rt->amqp) {
        /* writes wait in the link (the socket was full): wake when it drains */
        int want = LOOP_READ | (amqp_link_wants_write(rt->amqp) ? LOOP_WRITE : 0);
        if (want != rt->amqp_events &&
            loop_watch(rt->lp, rt->amqp_fd, want, amqp_readable, rt) == 0)
            rt->amqp_events = want;
    }
    if (rt->amqp && amqp_link_has_buffered(rt->amqp)) {
        if (amqp_link_pump(rt->amqp) != IW_OK)
            link_lost(rt);
        again = rt->amqp && amqp_link_has_buffered(rt->amqp);
    }
    /* the turn's publishes leave together */
    if (rt->amqp)
        amqp_link_push(rt->amqp);
    return again;
}

/* "50/min", "1000/hour", "30/10s": a tier as IW_RATE_LIMITS writes it. */
static void format_rate_tier(const iw_rate_tier *t, char *buf, size_t len)
{
    static const struct {
        long ms;
        const char *unit;
    } units[] = {{1000, "s"}, {60000, "min"}, {3600000, "hour"}, {86400000, "day"}};
    char d[32];

    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
        if (t->window_ms == units[i].ms) {
            snprintf(buf, len, "%ld/%s", t->limit, units[i].unit);
            return;
        }
    snprintf(buf, len, "%ld/%s", t->limit, format_duration(t->window_ms, d, sizeof d));
}

/* Every label set the metrics can have exists from the start, at 0. */
static void declare_metrics(runtime *rt)
{
    const char *codes[IW_N_CODES];
    const char *tiers[IW_MAX_TIERS];
    char names[IW_MAX_TIERS][48];
    size_t n = 0;

    for (int c = 1; c < IW_N_CODES; c++)
        codes[n++] = iw_code_name((iw_code)c);
    metrics_dead_letter_codes(codes, n);
    for (size_t i = 0; i < rt->cfg->n_rate_tiers; i++) {
        format_rate_tier(&rt->cfg->rate_tiers[i], names[i], sizeof names[i]);
        tiers[i] = names[i];
    }
    metrics_limiter_tiers(tiers, rt->cfg->n_rate_tiers);
}

/* Redis must not evict the records, the claims and the permit log: warn, or
 * refuse to start with IW_REQUIRE_NOEVICTION=1.  Returns nonzero to refuse. */
static int check_eviction(runtime *rt)
{
    limiter_redis_info info;
    iw_error err = {0};

    if (limiter_check_redis(rt->lim, &info, &err) != IW_OK || !info.can_evict)
        return 0;
    if (rt->cfg->require_noeviction) {
        fprintf(stderr,
                "integration-worker: IW_REQUIRE_NOEVICTION: Redis maxmemory-policy is %s, "
                "which can evict the worker's records; set it to noeviction\n",
                info.policy);
        return 1;
    }
    log_msg(IW_LOG_WARN, NULL,
            "Redis maxmemory-policy is %s: under memory pressure it can evict the records that "
            "prevent double submissions and the rate-limit log; use noeviction",
            info.policy);
    return 0;
}

int runtime_run(runtime *rt)
{
    struct sigaction sa;
    iw_error err = {0};
    admin_http *admin;
    int rc = 0;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    admin = admin_http_start(rt->cfg->http_addr, &err);
    if (!admin && err.msg[0]) {
        fprintf(stderr, "integration-worker: %s\n", err.msg);
        return err.status == IW_ERR_CONFIG ? 2 : 1;
    }
    loop_add_hook(rt->lp, amqp_buffered, rt);
    metrics_heartbeat(clock_mono_ms());
    if (connect_amqp(rt) == -2) {
        admin_http_stop(admin);
        return 1;
    }
    declare_metrics(rt);
    if (rt_redis_ready(rt) && check_eviction(rt) != 0) {
        admin_http_stop(admin);
        return 2;
    }
    housekeeping(rt->lp, &rt->housekeeping);

    for (;;) {
        long long now = clock_mono_ms();

        if (stop_requested && !rt->stopping)
            begin_stop(rt, now);
        if (rt->fatal) {
            rc = 1;
            break;
        }
        if (rt->stopping) {
            if (busy_jobs(rt) == 0 && (!rt->amqp || amqp_link_unconfirmed(rt->amqp) == 0))
                break;
            if (now >= rt->stop_deadline) {
                log_msg(IW_LOG_WARN, NULL,
                        "shutdown grace expired: %zu job(s) return to their queues unacknowledged",
                        busy_jobs(rt));
                break;
            }
        }
        /* a signal interrupts the wait; one that lands just before it is
         * seen at the next timer (housekeeping runs every second) */
        loop_turn(rt->lp, rt->stopping ? STOP_POLL_MS : -1);
        log_flush();
    }
    log_msg(IW_LOG_INFO, NULL, "stopped");
    log_flush();
    admin_http_stop(admin);
    return rc;
}
