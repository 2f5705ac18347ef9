#include "iwtest.h"

#include <amqp_tcp_socket.h>
#include <check.h>
#include <arpa/inet.h>
#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <glob.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <signal.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "amqp_link.h"
#include "topology.h"

extern char **environ;

int iwt_standalone;

/* The servers the test side and the workers it starts talk to: the shared
 * loopback stack unless iwt_use_servers() picked private ones. */
static int amqp_port_ = 5672;
static int redis_port_ = 6379;

void iwt_use_servers(int amqp_port, int redis_port)
{
    amqp_port_ = amqp_port;
    redis_port_ = redis_port;
}

/* Fails the current Check test, or (in a benchmark) exits with a message. */
static void iwt_fail(const char *file, int line, const char *what)
{
    if (iwt_standalone) {
        fprintf(stderr, "%s:%d: requirement failed: %s\n", file, line, what);
        exit(1);
    }
    ck_abort_msg("%s:%d: requirement failed: %s", file, line, what);
}

#define REQUIRE(cond)                                                                              \
    do {                                                                                           \
        if (!(cond))                                                                               \
            iwt_fail(__FILE__, __LINE__, #cond);                                                   \
    } while (0)

const char *iwt_log_dir(void)
{
    const char *dir = getenv("IWT_LOG_DIR");
    return dir && *dir ? dir : "/tmp";
}

long long iwt_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int cmp_ll(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return x < y ? -1 : x > y;
}

void iwt_sort_ll(long long *v, size_t n)
{
    qsort(v, n, sizeof *v, cmp_ll);
}

long iwt_status_kb(pid_t pid, const char *field)
{
    char path[64], line[256];
    size_t n = strlen(field);
    long kb = -1;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%ld/status", (long)pid);
    if (!(f = fopen(path, "r")))
        return -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, field, n) == 0 && line[n] == ':')
            kb = atol(line + n + 1);
    fclose(f);
    return kb;
}

long iwt_peak_rss_kb(pid_t pid)
{
    return iwt_status_kb(pid, "VmHWM");
}

double iwt_cpu_seconds(pid_t pid)
{
    char path[64], line[1024];
    FILE *f;

    snprintf(path, sizeof path, "/proc/%ld/stat", (long)pid);
    if (!(f = fopen(path, "r")))
        return -1;
    char *ok = fgets(line, sizeof line, f);
    fclose(f);
    /* fields after the command name (which may hold spaces): state is field 3,
     * utime and stime fields 14 and 15 */
    char *p = ok ? strrchr(line, ')') : NULL;
    unsigned long ut, st;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* ---- namespaces a failed test leaves behind ---- */

static char ns_suite[32];
static pid_t ns_runner;

static char *ns_file(char *buf, size_t len)
{
    snprintf(buf, len, "/tmp/iwtest-%s-%ld.ns", ns_suite, (long)ns_runner);
    return buf;
}

void iwt_ns_suite(const char *suite)
{
    snprintf(ns_suite, sizeof ns_suite, "%s", suite);
    ns_runner = getpid();
}

void iwt_ns_remember(const char *ns)
{
    char path[128];
    FILE *f = fopen(ns_file(path, sizeof path), "a");

    REQUIRE(f != NULL);
    fprintf(f, "%s\n", ns);
    fclose(f);
}

void iwt_ns_remove_leftovers(void)
{
    char path[128], line[256];
    FILE *f = fopen(ns_file(path, sizeof path), "r");

    if (!f)
        return;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (line[0])
            iwt_cleanup(line);
    }
    fclose(f);
    unlink(path);
}

void iwt_ns_forget(void)
{
    char path[128];

    unlink(ns_file(path, sizeof path));
}

const char *iwt_namespace(const char *name)
{
    static char ns[128];
    snprintf(ns, sizeof ns, "t-%s-%ld", name, (long)getpid());
    return ns;
}

pid_t iwt_start_mock(const char *const *args, int *port)
{
    int fds[2];
    pid_t pid;
    char line[256] = "";
    FILE *f;

    REQUIRE((pipe(fds)) == (0));
    pid = fork();
    REQUIRE((pid) >= (0));
    if (pid == 0) {
        const char *argv[64];
        int n = 0;
        argv[n++] = IW_BIN_DIR "/mock-provider";
        argv[n++] = "--listen";
        argv[n++] = "127.0.0.1:0";
        for (int i = 0; args && args[i] && n < 62; i++)
            argv[n++] = args[i];
        argv[n] = NULL;
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(fds[1]);
    f = fdopen(fds[0], "r");
    REQUIRE((fgets(line, sizeof line, f)) != NULL);
    fclose(f);
    char *colon = strrchr(line, ':');
    REQUIRE((colon) != NULL);
    *port = atoi(colon + 1);
    REQUIRE((*port) > (0));
    return pid;
}

static void build_env(const char *ns, int port, const char *const *extra, char **out, size_t cap)
{
    size_t n = 0;
    static char buf[32][512];
    size_t b = 0;

    for (char **e = environ; *e && n < cap - 40; e++)
        if (strncmp(*e, "IW_", 3) != 0)
            out[n++] = *e;
    snprintf(buf[b], sizeof buf[b], "IW_NAMESPACE=%s", ns);
    out[n++] = buf[b++];
    /* an https:// provider (mTLS tests) comes in extra: the first of two
     * equal names would win */
    int own_url = 0;
    for (int j = 0; extra && extra[j]; j++)
        own_url |= strncmp(extra[j], "IW_PROVIDER_URL=", 16) == 0;
    if (!own_url) {
        snprintf(buf[b], sizeof buf[b], "IW_PROVIDER_URL=http://127.0.0.1:%d", port);
        out[n++] = buf[b++];
    }
    /* private servers (iwt_use_servers): the guest user of a fresh node, no
     * Redis ACL; these replace the shared stack's defaults below */
    const char *private_urls[3] = {NULL, NULL, NULL};
    int n_private = 0;
    if (amqp_port_ != 5672) {
        snprintf(buf[b], sizeof buf[b], "IW_AMQP_URL=amqp://guest:guest@127.0.0.1:%d/%%2f",
                 amqp_port_);
        private_urls[n_private++] = buf[b];
        out[n++] = buf[b++];
    }
    if (redis_port_ != 6379) {
        snprintf(buf[b], sizeof buf[b], "IW_REDIS_URL=redis://127.0.0.1:%d/0", redis_port_);
        private_urls[n_private++] = buf[b];
        out[n++] = buf[b++];
    }
    /* Workers log in as the least-privilege test users that scripts/stack.sh derives
     * from deploy/ (rabbitmq/definitions.json, redis/users.acl), so a permission the
     * worker needs but those files lack fails a test. */
    static const char *const defaults[] = {"IW_AMQP_URL=amqp://iw-test:iw-test@127.0.0.1:5672/%2f",
                                           "IW_REDIS_URL=redis://iw-test:iw-test@127.0.0.1:6379/0",
                                           "IW_API_KEY=test-key-xxxxx",
                                           "IW_API_SECRET=test-secret-xxxxx",
                                           "IW_HTTP_ADDR=off",
                                           "IW_POLL_SCHEDULE=1s",
                                           "IW_POLL_JITTER=0",
                                           "IW_RATE_LIMITS=100000/s",
                                           "IW_LOG_LEVEL=debug",
                                           "IW_SHUTDOWN_GRACE=10s",
                                           NULL};
    for (int i = 0; defaults[i]; i++) {
        int overridden = 0;
        size_t klen = strchr(defaults[i], '=') - defaults[i] + 1;
        for (int j = 0; extra && extra[j]; j++)
            if (strncmp(extra[j], defaults[i], klen) == 0)
                overridden = 1;
        for (int j = 0; private_urls[j]; j++)
            if (strncmp(private_urls[j], defaults[i], klen) == 0)
                overridden = 1;
        if (!overridden)
            out[n++] = (char *)defaults[i];
    }
    for (int j = 0; extra && extra[j] && n < cap - 1; j++)
        out[n++] = (char *)extra[j];
    if (getenv("IW_SCHEMA_DIR") == NULL && b < 32) {
        snprintf(buf[b], sizeof buf[b], "IW_SCHEMA_DIR=%s/schemas", IW_SOURCE_DIR);
        out[n++] = buf[b++];
    }
    out[n] = NULL;
}

pid_t iwt_start_worker(const char *role, const char *ns, int port, const char *const *env,
                       const char *tag)
{
    pid_t pid = fork();
    REQUIRE((pid) >= (0));
    if (pid == 0) {
        char *envp[512];
        char log[512];
        const char *argv[] = {IW_BIN_DIR "/integration-worker", role, NULL};
        /* IWT_WORKER_WRAP: a command the worker runs under (a profiler:
         * "valgrind --tool=callgrind"), split by the shell */
        const char *wrap = getenv("IWT_WORKER_WRAP");
        const char *wrapped[] = {"/bin/sh", "-c", "exec $IWT_WORKER_WRAP \"$0\" \"$@\"",
                                 argv[0],   role, NULL};
        build_env(ns, port, env, envp, 512);
        snprintf(log, sizeof log, "%s/iwtest-%s-%s.log", iwt_log_dir(), ns, tag ? tag : role);
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 2);
            close(fd);
        }
        if (wrap && *wrap) /* envp keeps IWT_WORKER_WRAP for the shell */
            execve(wrapped[0], (char *const *)wrapped, envp);
        execve(argv[0], (char *const *)argv, envp);
        _exit(127);
    }
    return pid;
}

int iwt_run_worker_cmd(const char *const *args, const char *ns, int port, const char *const *env,
                       char **out)
{
    int fds[2];
    pid_t pid;
    int status;

    REQUIRE((pipe(fds)) == (0));
    pid = fork();
    REQUIRE((pid) >= (0));
    if (pid == 0) {
        char *envp[512];
        const char *argv[32];
        int n = 0;
        argv[n++] = IW_BIN_DIR "/integration-worker";
        for (int i = 0; args[i] && n < 31; i++)
            argv[n++] = args[i];
        argv[n] = NULL;
        build_env(ns, port, env, envp, 512);
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execve(argv[0], (char *const *)argv, envp);
        _exit(127);
    }
    close(fds[1]);
    {
        size_t len = 0, cap = 4096;
        char *buf = malloc(cap);
        ssize_t r;
        while ((r = read(fds[0], buf + len, cap - len - 1)) > 0) {
            len += (size_t)r;
            if (len + 1 == cap)
                buf = realloc(buf, cap *= 2);
        }
        buf[len] = '\0';
        if (out)
            *out = buf;
        else
            free(buf);
    }
    close(fds[0]);
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int iwt_stop(pid_t pid, int sig)
{
    int status;
    long long deadline = iwt_now_ms() + 40000;

    if (pid <= 0)
        return -1;
    kill(pid, sig);
    while (iwt_now_ms() < deadline) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        iwt_sleep_ms(10);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -1;
}

/* ---- AMQP ---------------------------------------------------------------- */

static void die_on_amqp_error(amqp_rpc_reply_t r, const char *what)
{
    if (r.reply_type != AMQP_RESPONSE_NORMAL)
        iwt_fail(__FILE__, __LINE__, what);
}

iwt_amqp *iwt_amqp_open(void)
{
    iwt_amqp *a = calloc(1, sizeof *a);
    amqp_socket_t *s;

    a->conn = amqp_new_connection();
    s = amqp_tcp_socket_new(a->conn);
    REQUIRE(amqp_socket_open(s, "127.0.0.1", amqp_port_) == AMQP_STATUS_OK);
    die_on_amqp_error(
        amqp_login(a->conn, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest"), "login");
    amqp_channel_open(a->conn, 1);
    die_on_amqp_error(amqp_get_rpc_reply(a->conn), "channel.open");
    return a;
}

void iwt_amqp_close(iwt_amqp *a)
{
    if (!a)
        return;
    amqp_channel_close(a->conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(a->conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(a->conn);
    free(a);
}

void iwt_declare(const char *ns)
{
    const char *args[] = {"declare", NULL};
    REQUIRE(iwt_run_worker_cmd(args, ns, 1, NULL, NULL) == 0);
}

void iwt_tap_events(iwt_amqp *a, const char *ns, const char *key)
{
    char ex[256];
    amqp_queue_declare_ok_t *q =
        amqp_queue_declare(a->conn, 1, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    die_on_amqp_error(amqp_get_rpc_reply(a->conn), "queue.declare");
    snprintf(a->tap_queue, sizeof a->tap_queue, "%.*s", (int)q->queue.len, (char *)q->queue.bytes);
    snprintf(ex, sizeof ex, "%s.events", ns);
    amqp_queue_bind(a->conn, 1, amqp_cstring_bytes(a->tap_queue), amqp_cstring_bytes(ex),
                    amqp_cstring_bytes(key), amqp_empty_table);
    die_on_amqp_error(amqp_get_rpc_reply(a->conn), "queue.bind");
    amqp_basic_consume(a->conn, 1, amqp_cstring_bytes(a->tap_queue), amqp_empty_bytes, 0, 1, 1,
                       amqp_empty_table);
    die_on_amqp_error(amqp_get_rpc_reply(a->conn), "basic.consume");
}

void iwt_publish(iwt_amqp *a, const char *exchange, const char *routing_key, const char *body,
                 const char *content_type, const char *reply_to, const char *correlation_id)
{
    amqp_basic_properties_t p;
    memset(&p, 0, sizeof p);
    p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
    p.delivery_mode = 2;
    if (content_type) {
        p._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
        p.content_type = amqp_cstring_bytes(content_type);
    }
    if (reply_to) {
        p._flags |= AMQP_BASIC_REPLY_TO_FLAG;
        p.reply_to = amqp_cstring_bytes(reply_to);
    }
    if (correlation_id) {
        p._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
        p.correlation_id = amqp_cstring_bytes(correlation_id);
    }
    amqp_bytes_t b = {strlen(body), (void *)body};
    REQUIRE(amqp_basic_publish(a->conn, 1, amqp_cstring_bytes(exchange),
                               amqp_cstring_bytes(routing_key), 0, 0, &p, b) == AMQP_STATUS_OK);
}

void iwt_publish_job(iwt_amqp *a, const char *ns, const char *job_json)
{
    char ex[256];
    snprintf(ex, sizeof ex, "%s.requests", ns);
    iwt_publish(a, ex, "submit.transaction", job_json, "application/json", NULL, NULL);
}

void iwt_msg_free(iwt_msg *m)
{
    if (!m)
        return;
    json_decref(m->headers);
    json_decref(m->body);
    free(m->raw);
    free(m);
}

static iwt_msg *msg_from(const amqp_bytes_t *rk, const amqp_message_t *m)
{
    iwt_msg *r = calloc(1, sizeof *r);
    const amqp_basic_properties_t *p = &m->properties;

    snprintf(r->routing_key, sizeof r->routing_key, "%.*s", (int)rk->len, (char *)rk->bytes);
    if (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG)
        snprintf(r->correlation_id, sizeof r->correlation_id, "%.*s", (int)p->correlation_id.len,
                 (char *)p->correlation_id.bytes);
    if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG)
        snprintf(r->message_id, sizeof r->message_id, "%.*s", (int)p->message_id.len,
                 (char *)p->message_id.bytes);
    if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG)
        snprintf(r->content_type, sizeof r->content_type, "%.*s", (int)p->content_type.len,
                 (char *)p->content_type.bytes);
    r->headers =
        (p->_flags & AMQP_BASIC_HEADERS_FLAG) ? amqp_table_to_json(&p->headers) : json_object();
    r->raw = malloc(m->body.len + 1);
    if (m->body.len) /* an empty body has no bytes pointer (memcpy from NULL is UB) */
        memcpy(r->raw, m->body.bytes, m->body.len);
    r->raw[m->body.len] = '\0';
    r->raw_len = m->body.len;
    r->body = json_loadb(r->raw, r->raw_len, 0, NULL);
    return r;
}

/* events read but not yet asked for */
#define BACKLOG 4096
static iwt_msg *backlog[BACKLOG];
static size_t backlog_n;

static iwt_msg *read_event(iwt_amqp *a, int timeout_ms)
{
    amqp_envelope_t env;
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    amqp_maybe_release_buffers(a->conn);
    amqp_rpc_reply_t r = amqp_consume_message(a->conn, &env, &tv, 0);
    if (r.reply_type != AMQP_RESPONSE_NORMAL)
        return NULL;
    iwt_msg *m = msg_from(&env.routing_key, &env.message);
    amqp_destroy_envelope(&env);
    return m;
}

iwt_msg *iwt_next_event(iwt_amqp *a, int timeout_ms)
{
    if (backlog_n) {
        iwt_msg *m = backlog[0];
        memmove(backlog, backlog + 1, --backlog_n * sizeof backlog[0]);
        return m;
    }
    return read_event(a, timeout_ms);
}

static int matches(const iwt_msg *m, const char *rk, const char *job_id)
{
    return (!rk || strcmp(m->routing_key, rk) == 0) &&
           (!job_id || strcmp(m->correlation_id, job_id) == 0);
}

iwt_msg *iwt_wait_event(iwt_amqp *a, const char *routing_key, const char *job_id, int timeout_ms)
{
    long long deadline = iwt_now_ms() + timeout_ms;

    for (size_t i = 0; i < backlog_n; i++) {
        if (matches(backlog[i], routing_key, job_id)) {
            iwt_msg *m = backlog[i];
            memmove(backlog + i, backlog + i + 1, (--backlog_n - i) * sizeof backlog[0]);
            return m;
        }
    }
    while (iwt_now_ms() < deadline) {
        long long left = deadline - iwt_now_ms();
        iwt_msg *m = read_event(a, (int)(left > 0 ? left : 1));
        if (!m)
            continue;
        if (matches(m, routing_key, job_id))
            return m;
        if (backlog_n < BACKLOG)
            backlog[backlog_n++] = m;
        else
            iwt_msg_free(m);
    }
    return NULL;
}

int iwt_count_events(iwt_amqp *a, const char *routing_key, const char *job_id, int window_ms)
{
    int n = 0;
    iwt_msg *m;
    long long deadline = iwt_now_ms() + window_ms;

    while ((m = iwt_wait_event(a, routing_key, job_id,
                               (int)(deadline - iwt_now_ms() > 0 ? deadline - iwt_now_ms() : 0)))) {
        n++;
        iwt_msg_free(m);
        if (iwt_now_ms() >= deadline)
            break;
    }
    return n;
}

iwt_msg *iwt_get(iwt_amqp *a, const char *queue, int timeout_ms)
{
    long long deadline = iwt_now_ms() + timeout_ms;

    do {
        amqp_rpc_reply_t r = amqp_basic_get(a->conn, 1, amqp_cstring_bytes(queue), 1);
        die_on_amqp_error(r, "basic.get");
        if (r.reply.id == AMQP_BASIC_GET_OK_METHOD) {
            amqp_basic_get_ok_t *ok = r.reply.decoded;
            amqp_bytes_t rk = amqp_bytes_malloc_dup(ok->routing_key);
            amqp_message_t m;
            die_on_amqp_error(amqp_read_message(a->conn, 1, &m, 0), "read_message");
            iwt_msg *msg = msg_from(&rk, &m);
            amqp_destroy_message(&m);
            amqp_bytes_free(rk);
            return msg;
        }
        iwt_sleep_ms(50);
    } while (iwt_now_ms() < deadline);
    return NULL;
}

int iwt_queue_depth(iwt_amqp *a, const char *queue)
{
    amqp_queue_declare_ok_t *ok =
        amqp_queue_declare(a->conn, 1, amqp_cstring_bytes(queue), 1, 0, 0, 0, amqp_empty_table);
    die_on_amqp_error(amqp_get_rpc_reply(a->conn), "passive queue.declare");
    return (int)ok->message_count;
}

int iwt_queue_consumers(iwt_amqp *a, const char *queue)
{
    amqp_queue_declare_ok_t *ok =
        amqp_queue_declare(a->conn, 1, amqp_cstring_bytes(queue), 1, 0, 0, 0, amqp_empty_table);
    die_on_amqp_error(amqp_get_rpc_reply(a->conn), "passive queue.declare");
    return (int)ok->consumer_count;
}

void iwt_cleanup(const char *ns)
{
    iwt_amqp *a = iwt_amqp_open();
    static const char *const queues[] = {"submit", "status", "resource", "dead"};
    static const char *const exchanges[] = {"requests", "events", "dlx", "retry"};
    char name[256];

    for (size_t i = 0; i < 4; i++) {
        snprintf(name, sizeof name, "%s.%s", ns, queues[i]);
        amqp_queue_delete(a->conn, 1, amqp_cstring_bytes(name), 0, 0);
        amqp_get_rpc_reply(a->conn);
    }
    for (int k = 0; k < IW_DELAY_TIERS; k++) {
        snprintf(name, sizeof name, "%s.delay.%ld", ns, topology_tier_ms(k));
        amqp_queue_delete(a->conn, 1, amqp_cstring_bytes(name), 0, 0);
        amqp_get_rpc_reply(a->conn);
    }
    for (size_t i = 0; i < 4; i++) {
        snprintf(name, sizeof name, "%s.%s", ns, exchanges[i]);
        amqp_exchange_delete(a->conn, 1, amqp_cstring_bytes(name), 0);
        amqp_get_rpc_reply(a->conn);
    }
    iwt_amqp_close(a);

    redisContext *c = redisConnect("127.0.0.1", redis_port_);
    if (c && !c->err) {
        char cursor[32] = "0";
        do {
            redisReply *r = redisCommand(c, "SCAN %s MATCH %s:* COUNT 1000", cursor, ns);
            if (!r || r->type != REDIS_REPLY_ARRAY) {
                if (r)
                    freeReplyObject(r);
                break;
            }
            snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
            for (size_t i = 0; i < r->element[1]->elements; i++)
                freeReplyObject(redisCommand(c, "DEL %s", r->element[1]->element[i]->str));
            freeReplyObject(r);
        } while (strcmp(cursor, "0") != 0);
    }
    if (c)
        redisFree(c);
}

/* ---- mock admin over HTTP ------------------------------------------------- */

typedef struct buf {
    char *p;
    size_t n;
} buf;

static size_t collect(char *d, size_t s, size_t n, void *ud)
{
    buf *b = ud;
    b->p = realloc(b->p, b->n + s * n + 1);
    memcpy(b->p + b->n, d, s * n);
    b->n += s * n;
    b->p[b->n] = '\0';
    return s * n;
}

static long http_as(int port, const char *method, const char *path, const char *content_type,
                    const char *body, char **out)
{
    CURL *c = curl_easy_init();
    char url[512], ct[128];
    buf b = {0};
    long status = 0;
    struct curl_slist *h;

    snprintf(ct, sizeof ct, "Content-Type: %s", content_type);
    h = curl_slist_append(NULL, ct);

    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", port, path);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    if (body)
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 10L);
    if (curl_easy_perform(c) == CURLE_OK)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    if (out)
        *out = b.p;
    else
        free(b.p);
    return status;
}

static long http(int port, const char *method, const char *path, const char *body, char **out)
{
    return http_as(port, method, path, "application/json", body, out);
}

iwt_amqp *iwt_scene(char *ns, size_t ns_len, const char *name, const char *const *mock_args,
                    int *port)
{
    snprintf(ns, ns_len, "%s", iwt_namespace(name));
    iwt_cleanup(ns);
    iwt_declare(ns);
    iwt_track(iwt_start_mock(mock_args, port));
    iwt_amqp *a = iwt_amqp_open();
    iwt_tap_events(a, ns, "#");
    return a;
}

json_t *iwt_worker_log(const char *ns, const char *tag)
{
    char path[1024];
    static char line[1 << 16];
    json_t *all = json_array();
    FILE *f;

    snprintf(path, sizeof path, "%s/iwtest-%s-%s.log", iwt_log_dir(), ns, tag);
    if (!(f = fopen(path, "r")))
        return all;
    while (fgets(line, sizeof line, f)) {
        json_t *j = json_loads(line, 0, NULL);
        if (j)
            json_array_append_new(all, j);
    }
    fclose(f);
    return all;
}

void iwt_remove_logs(const char *ns)
{
    char pattern[512];
    glob_t g;

    if (getenv("IWT_KEEP_LOGS"))
        return;
    snprintf(pattern, sizeof pattern, "%s/iwtest-%s-*.log", iwt_log_dir(), ns);
    if (glob(pattern, 0, NULL, &g) == 0) {
        for (size_t i = 0; i < g.gl_pathc; i++)
            unlink(g.gl_pathv[i]);
        globfree(&g);
    }
}

void iwt_scene_end(iwt_amqp *a, const char *ns)
{
    REQUIRE(iwt_stop_all() == 0);
    iwt_amqp_close(a);
    iwt_cleanup(ns);
    iwt_remove_logs(ns);
}

json_t *iwt_mock_stats(int port)
{
    char *body = NULL;
    json_t *j;
    REQUIRE(http(port, "GET", "/__admin/stats", NULL, &body) == 200);
    j = json_loads(body, 0, NULL);
    free(body);
    REQUIRE((j) != NULL);
    return j;
}

long iwt_http_get(int port, const char *path, char **body)
{
    return http(port, "GET", path, NULL, body);
}

long iwt_http_post_form(int port, const char *path, const char *form, char **body)
{
    return http_as(port, "POST", path, "application/x-www-form-urlencoded", form, body);
}

int iwt_answers(void *probe)
{
    const iwt_probe *pr = probe;
    long s = http(pr->port, "GET", pr->path, NULL, NULL);

    return pr->want ? s == pr->want : s != 200;
}

double iwt_metric(const char *text, const char *series)
{
    size_t n = strlen(series);

    for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, series, n) == 0 && p[n] == ' ')
            return strtod(p + n + 1, NULL);
    }
    return -1;
}

/* 1 if a listening socket can take 127.0.0.1:port now. */
static int port_free(int port)
{
    struct sockaddr_in a;
    int fd = socket(AF_INET, SOCK_STREAM, 0), ok;

    REQUIRE(fd >= 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)port);
    ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

/* A free port below the kernel's ephemeral range: a port the kernel picks
 * (bind to 0) is one it also hands to client connections as their local
 * port, so a server a test stops and starts again there (a private Redis
 * killed for an outage) could find it taken by any connection made
 * meanwhile, and fail the test. */
int iwt_free_port(void)
{
    static unsigned seed;
    int lo = 32768, hi = 60999;
    FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");

    if (f) {
        if (fscanf(f, "%d %d", &lo, &hi) != 2)
            lo = 32768;
        fclose(f);
    }
    if (!seed)
        seed = (unsigned)getpid() * 2654435761u ^ (unsigned)time(NULL);
    if (lo > 11024) {
        int span = lo - 1024 > 12000 ? 12000 : lo - 1024;
        for (int tries = 0; tries < 200; tries++) {
            int port = lo - 1 - (int)(rand_r(&seed) % (unsigned)span);
            if (port_free(port))
                return port;
        }
    }
    /* no room below the range: the kernel's pick */
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0), port;

    REQUIRE(fd >= 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(bind(fd, (struct sockaddr *)&a, sizeof a) == 0);
    REQUIRE(getsockname(fd, (struct sockaddr *)&a, &len) == 0);
    port = ntohs(a.sin_port);
    close(fd);
    return port;
}

static int redis_answers(void *ud)
{
    redisContext *c = redisConnect("127.0.0.1", *(int *)ud);
    int ok = 0;

    if (c && !c->err) {
        redisReply *r = redisCommand(c, "PING");
        ok = r && r->type == REDIS_REPLY_STATUS;
        if (r)
            freeReplyObject(r);
    }
    if (c)
        redisFree(c);
    return ok;
}

pid_t iwt_start_redis(int port)
{
    char p[16];
    pid_t pid;

    snprintf(p, sizeof p, "%d", port);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);

        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execlp("redis-server", "redis-server", "--port", p, "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--daemonize", "no", (char *)NULL);
        _exit(127);
    }
    iwt_track(pid);
    ck_assert_msg(iwt_eventually(redis_answers, &port, 10000), "private redis-server on %d", port);
    return pid;
}

#define MAX_TRACKED 16
static pid_t tracked[MAX_TRACKED];

static void kill_tracked(void)
{
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked[i] > 0) {
            kill(tracked[i], SIGKILL);
            waitpid(tracked[i], NULL, 0);
            tracked[i] = 0;
        }
}

pid_t iwt_track(pid_t pid)
{
    static int registered;

    if (!registered) {
        atexit(kill_tracked);
        registered = 1;
    }
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked[i] <= 0) {
            tracked[i] = pid;
            return pid;
        }
    REQUIRE(!"too many tracked child processes");
    return pid;
}

int iwt_stop_tracked(pid_t pid, int sig)
{
    int rc = iwt_stop(pid, sig);
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked[i] == pid)
            tracked[i] = 0;
    return rc;
}

int iwt_stop_all(void)
{
    int bad = 0;
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked[i] > 0)
            bad += iwt_stop_tracked(tracked[i], SIGTERM) != 0;
    return bad;
}

int iwt_run_suite(Suite *s)
{
    SRunner *sr = srunner_create(s);
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

void iwt_sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

long iwt_mock_post(int port, const char *path, const char *json_body)
{
    return http(port, "POST", path, json_body, NULL);
}

long iwt_stat(json_t *stats, const char *route, const char *status)
{
    json_t *v = json_object_get(json_object_get(json_object_get(stats, "requests"), route), status);
    return json_is_integer(v) ? (long)json_integer_value(v) : 0;
}

/* ---- Redis ------------------------------------------------------------------ */

static redisReply *redis_vcmd(const char *fmt, va_list ap)
{
    static redisContext *c;
    if (!c) {
        c = redisConnect("127.0.0.1", redis_port_);
        REQUIRE(c && !c->err);
    }
    redisReply *r = redisvCommand(c, fmt, ap);
    REQUIRE((r) != NULL);
    return r;
}

long long iwt_redis_int(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redis_vcmd(fmt, ap);
    va_end(ap);
    long long v = r->type == REDIS_REPLY_INTEGER  ? r->integer
                  : r->type == REDIS_REPLY_STRING ? atoll(r->str)
                                                  : 0;
    freeReplyObject(r);
    return v;
}

char *iwt_redis_str(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redis_vcmd(fmt, ap);
    va_end(ap);
    char *s = r->type == REDIS_REPLY_STRING ? strdup(r->str) : NULL;
    freeReplyObject(r);
    return s;
}

int iwt_eventually(int (*cond)(void *), void *ud, int timeout_ms)
{
    long long deadline = iwt_now_ms() + timeout_ms;
    int v;
    while (!(v = cond(ud)) && iwt_now_ms() < deadline)
        iwt_sleep_ms(20);
    return v;
}

/* ---- a private RabbitMQ node ---------------------------------------------- */

#define RABBIT_BIN "/usr/lib/rabbitmq/bin/"

/* Runs a RabbitMQ script of the node with the node's environment. */
static int rabbit_run(const iwt_rabbit *r, const char *script, const char *const *args, int quiet)
{
    pid_t pid = fork();
    int status;

    if (pid < 0)
        return -1;
    if (pid == 0) {
        char path[512], conf[512], envf[512], plugins[512], mnesia[512], logs[512], pidf[512];
        char port[16], dist[16];
        const char *argv[32];
        int n = 0;

        snprintf(path, sizeof path, RABBIT_BIN "%s", script);
        snprintf(conf, sizeof conf, "%s/rabbitmq.conf", r->dir);
        snprintf(envf, sizeof envf, "%s/rabbitmq-env.conf", r->dir);
        snprintf(plugins, sizeof plugins, "%s/enabled_plugins", r->dir);
        snprintf(mnesia, sizeof mnesia, "%s/mnesia", r->dir);
        snprintf(logs, sizeof logs, "%s/log", r->dir);
        snprintf(pidf, sizeof pidf, "%s/pid", r->dir);
        snprintf(port, sizeof port, "%d", r->port);
        snprintf(dist, sizeof dist, "%d", r->dist_port);
        setenv("HOME", r->dir, 1); /* its own Erlang cookie */
        setenv("RABBITMQ_NODENAME", r->node, 1);
        setenv("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1", 1);
        setenv("RABBITMQ_NODE_PORT", port, 1);
        setenv("RABBITMQ_DIST_PORT", dist, 1);
        setenv("RABBITMQ_CONFIG_FILE", conf, 1);
        setenv("RABBITMQ_CONF_ENV_FILE", envf, 1);
        setenv("RABBITMQ_ENABLED_PLUGINS_FILE", plugins, 1);
        setenv("RABBITMQ_MNESIA_BASE", mnesia, 1);
        setenv("RABBITMQ_LOG_BASE", logs, 1);
        setenv("RABBITMQ_PID_FILE", pidf, 1);
        setenv("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "-kernel inet_dist_use_interface {127,0,0,1}",
               1);
        if (chdir(r->dir) != 0)
            _exit(126);
        argv[n++] = path;
        if (strcmp(script, "rabbitmqctl") == 0) {
            argv[n++] = "-n";
            argv[n++] = r->node;
        }
        for (int i = 0; args && args[i] && n < 31; i++)
            argv[n++] = args[i];
        argv[n] = NULL;
        if (quiet) {
            int fd = open("/dev/null", O_WRONLY);
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execv(path, (char *const *)argv);
        _exit(127);
    }
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static int write_file(const char *dir, const char *name, const char *text)
{
    char path[512];
    FILE *f;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "w");
    if (!f)
        return -1;
    fputs(text, f);
    return fclose(f);
}

int iwt_rabbit_start(iwt_rabbit *r, const char *tag, int tls, const char *extra_conf)
{
    char conf[4096], path[512];
    const char *const start[] = {"-detached", NULL};
    const char *const wait[] = {"-q", "await_startup", "--timeout", "90", NULL};
    size_t len;
    int up = 0;

    memset(r, 0, sizeof *r);
    if (access(RABBIT_BIN "rabbitmq-server", X_OK) != 0) {
        fprintf(stderr, "private RabbitMQ: %s not found\n", RABBIT_BIN "rabbitmq-server");
        return -1;
    }
    snprintf(r->node, sizeof r->node, "iwtest-%s-%ld@localhost", tag, (long)getpid());
    snprintf(r->dir, sizeof r->dir, "/tmp/iwtest-%s-%ld-XXXXXX", tag, (long)getpid());
    if (!mkdtemp(r->dir)) {
        fprintf(stderr, "private RabbitMQ: mkdtemp: %s\n", strerror(errno));
        return -1;
    }
    chmod(r->dir, 0755);
    r->port = iwt_free_port();
    do
        r->dist_port = iwt_free_port();
    while (r->dist_port == r->port);
    if (tls)
        do
            r->tls_port = iwt_free_port();
        while (r->tls_port == r->port || r->tls_port == r->dist_port);
    len = (size_t)snprintf(conf, sizeof conf,
                           "log.console = false\nlog.file.level = info\n"
                           "listeners.tcp.default = 127.0.0.1:%d\nloopback_users = none\n",
                           r->port);
    if (tls)
        len += (size_t)snprintf(conf + len, sizeof conf - len,
                                "listeners.ssl.default = 127.0.0.1:%d\n", r->tls_port);
    for (const char *p = extra_conf; p && *p && len + 300 < sizeof conf;) {
        if (strncmp(p, "@DIR@", 5) == 0) {
            len += (size_t)snprintf(conf + len, sizeof conf - len, "%s", r->dir);
            p += 5;
        } else {
            conf[len++] = *p++;
        }
    }
    conf[len] = '\0';
    snprintf(path, sizeof path, "%s/mnesia", r->dir);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/log", r->dir);
    mkdir(path, 0755);
    if (write_file(r->dir, "rabbitmq.conf", conf) ||
        write_file(r->dir, "enabled_plugins", "[].\n") ||
        write_file(r->dir, "rabbitmq-env.conf", "")) {
        fprintf(stderr, "private RabbitMQ: cannot write its config\n");
        iwt_rabbit_stop(r);
        return -1;
    }
    if (rabbit_run(r, "rabbitmq-server", start, 1) == 0) {
        /* await_startup fails at once while the node is not yet registered */
        long long deadline = iwt_now_ms() + 90000;
        while ((up = rabbit_run(r, "rabbitmqctl", wait, 1) == 0) == 0 && iwt_now_ms() < deadline)
            iwt_sleep_ms(250);
    }
    if (!up) {
        fprintf(stderr, "private RabbitMQ: node %s did not start (see %s/log)\n", r->node, r->dir);
        iwt_rabbit_stop(r);
        return -1;
    }
    return 0;
}

int iwt_rabbitmqctl(const iwt_rabbit *r, const char *const *args)
{
    return rabbit_run(r, "rabbitmqctl", args, 1);
}

void iwt_rabbit_reap(const char *tag)
{
    char prefix[64];
    size_t plen;
    DIR *dir = opendir("/tmp");
    struct dirent *e;

    if (!dir)
        return;
    plen = (size_t)snprintf(prefix, sizeof prefix, "iwtest-%s-", tag);
    while ((e = readdir(dir)) != NULL) {
        iwt_rabbit r;
        char *end;
        long pid;

        if (strncmp(e->d_name, prefix, plen) != 0 || strlen(e->d_name) > 100)
            continue;
        pid = strtol(e->d_name + plen, &end, 10);
        /* iwtest-<tag>-<pid>-XXXXXX, made by a process that is gone */
        if (pid <= 0 || *end != '-' || strlen(end) != 7 ||
            (kill((pid_t)pid, 0) == 0 || errno != ESRCH))
            continue;
        memset(&r, 0, sizeof r);
        snprintf(r.node, sizeof r.node, "iwtest-%s-%ld@localhost", tag, pid);
        snprintf(r.dir, sizeof r.dir, "/tmp/%.100s", e->d_name);
        fprintf(stderr, "private RabbitMQ: stopping %s, left by a failed test\n", r.node);
        iwt_rabbit_stop(&r);
    }
    closedir(dir);
}

void iwt_rabbit_stop(iwt_rabbit *r)
{
    const char *const stop[] = {"-q", "stop", NULL};
    char cmd[600];

    if (!r->dir[0])
        return;
    rabbit_run(r, "rabbitmqctl", stop, 1);
    if (strncmp(r->dir, "/tmp/iwtest-", 12) == 0 && !getenv("IWT_KEEP_RABBIT")) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", r->dir);
        if (system(cmd) != 0)
            fprintf(stderr, "private RabbitMQ: could not remove %s\n", r->dir);
    }
    r->dir[0] = '\0';
}
