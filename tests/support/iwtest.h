/* Support for integration suites: real RabbitMQ and Redis on loopback (the
 * test command starts them), a real mock-provider process, and worker
 * processes started as the operators would.  Each suite works in its own
 * namespace so suites can run in parallel and leave nothing behind. */
#ifndef IW_TEST_SUPPORT_H
#define IW_TEST_SUPPORT_H

#include <amqp.h>
#include <check.h>
#include <jansson.h>
#include <sys/types.h>

/* Set to 1 by programs that are not Check suites (benchmarks): a failed
 * requirement then prints and exits instead of failing a test. */
extern int iwt_standalone;

/* Talk to a private RabbitMQ (AMQP port) and Redis instead of the shared
 * 5672/6379: the test side's connections, iwt_cleanup, and the workers and
 * commands started afterwards (IW_AMQP_URL, IW_REDIS_URL) all use them.
 * Worker logs go to $IWT_LOG_DIR (default /tmp). */
void iwt_use_servers(int amqp_port, int redis_port);

/* A namespace unique to this process: "t-<name>-<pid>". */
const char *iwt_namespace(const char *name);

/* Starts mock-provider on a free port with extra flags (NULL-terminated
 * list, may be NULL); returns its pid and stores the port. */
pid_t iwt_start_mock(const char *const *args, int *port);

/* Starts `integration-worker role` for namespace ns against the mock on
 * port, with the default test settings (api-key auth, IW_HTTP_ADDR=off,
 * short poll schedule) overridden/extended by env ("NAME=value", NULL-
 * terminated, may be NULL; an IW_PROVIDER_URL there replaces the http:// one).
 * Its stderr goes to /tmp/iwtest-<ns>-<tag>.log (appended; the directory is
 * $IWT_LOG_DIR when set). */
pid_t iwt_start_worker(const char *role, const char *ns, int port, const char *const *env,
                       const char *tag);
/* Runs `integration-worker <args...>` to completion with the same env;
 * returns its exit code and, if out is not NULL, its stdout (malloc'd). */
int iwt_run_worker_cmd(const char *const *args, const char *ns, int port, const char *const *env,
                       char **out);
/* Sends sig and waits (up to 40 s) for the exit; returns the exit status
 * (128+signal when killed by a signal), -1 on timeout (then SIGKILLs). */
int iwt_stop(pid_t pid, int sig);

/* Children a suite started: a failed assertion exits the test process, and
 * every tracked child still running is SIGKILLed then (atexit). */
pid_t iwt_track(pid_t pid);
/* iwt_stop of a tracked child, which is then forgotten. */
int iwt_stop_tracked(pid_t pid, int sig);
/* SIGTERMs every tracked child; returns how many did not exit 0. */
int iwt_stop_all(void);

/* Runs a Check suite (CK_NORMAL); the process's exit code. */
int iwt_run_suite(Suite *s);

/* A blocking AMQP connection for the test side. */
typedef struct iwt_amqp {
    amqp_connection_state_t conn;
    char tap_queue[256];
} iwt_amqp;

iwt_amqp *iwt_amqp_open(void);
void iwt_amqp_close(iwt_amqp *a);
/* Declares the topology of ns (runs `integration-worker declare`). */
void iwt_declare(const char *ns);
/* Binds a private queue to <ns>.events with key (e.g. "#") to read events. */
void iwt_tap_events(iwt_amqp *a, const char *ns, const char *key);

/* Publishes body to exchange with routing key; content_type NULL omits it. */
void iwt_publish(iwt_amqp *a, const char *exchange, const char *routing_key, const char *body,
                 const char *content_type, const char *reply_to, const char *correlation_id);
/* Publishes a job to <ns>.requests with routing key submit.transaction. */
void iwt_publish_job(iwt_amqp *a, const char *ns, const char *job_json);

/* A message received by the test side. */
typedef struct iwt_msg {
    char routing_key[256];
    char correlation_id[256];
    char content_type[128];
    char message_id[256];
    json_t *headers; /* AMQP headers as JSON (never NULL) */
    json_t *body;    /* parsed JSON body or NULL */
    char *raw;
    size_t raw_len;
} iwt_msg;

void iwt_msg_free(iwt_msg *m);
/* Next message on the tap within timeout_ms; NULL on timeout. */
iwt_msg *iwt_next_event(iwt_amqp *a, int timeout_ms);
/* Waits for the event with this routing key and jobId (others are kept in
 * an internal backlog for later calls); NULL on timeout. */
iwt_msg *iwt_wait_event(iwt_amqp *a, const char *routing_key, const char *job_id, int timeout_ms);
/* Counts events with routing key and jobId seen within window_ms. */
int iwt_count_events(iwt_amqp *a, const char *routing_key, const char *job_id, int window_ms);
/* basic.get (auto-ack) polling a queue until a message arrives or timeout. */
iwt_msg *iwt_get(iwt_amqp *a, const char *queue, int timeout_ms);
/* Message count of a queue (passive declare). */
int iwt_queue_depth(iwt_amqp *a, const char *queue);
/* Consumers of a queue (passive declare): a worker is consuming once it counts. */
int iwt_queue_consumers(iwt_amqp *a, const char *queue);
/* Deletes every queue and exchange of ns and its Redis keys. */
void iwt_cleanup(const char *ns);
/* A test's scene: a fresh namespace iwt_namespace(name) into ns (its
 * topology declared), a mock provider started with mock_args (tracked; its
 * port in *port) and a connection tapping every event of the namespace. */
iwt_amqp *iwt_scene(char *ns, size_t ns_len, const char *name, const char *const *mock_args,
                    int *port);
/* Where iwt_start_worker writes the workers' logs: IWT_LOG_DIR, else /tmp. */
const char *iwt_log_dir(void);
/* Every JSON line of the log iwt_start_worker wrote for ns and tag (in
 * IWT_LOG_DIR or /tmp), in order, as a new JSON array (empty when there is no
 * log yet); lines that are not JSON are left out. */
json_t *iwt_worker_log(const char *ns, const char *tag);
/* Removes the log files iwt_start_worker wrote for ns (in IWT_LOG_DIR or
 * /tmp), unless IWT_KEEP_LOGS is set: a passing case leaves none behind. */
void iwt_remove_logs(const char *ns);
/* Its end: stops every tracked child (each must exit 0), closes the tap and
 * removes the namespace and its worker logs (a failed check ends the case
 * before: its logs stay). */
void iwt_scene_end(iwt_amqp *a, const char *ns);

/* Mock provider admin: GET /__admin/stats, POST a JSON body to a path. */
json_t *iwt_mock_stats(int port);
long iwt_mock_post(int port, const char *path, const char *json_body);
/* stats["requests"][route][status] as a number (0 when absent). */
long iwt_stat(json_t *stats, const char *route, const char *status);

/* Redis: a command's integer or string reply for assertions. */
long long iwt_redis_int(const char *fmt, ...);
char *iwt_redis_str(const char *fmt, ...);

/* Sleeps ms milliseconds (the one sleep of the test code: prefer waiting for
 * an event or iwt_eventually). */
void iwt_sleep_ms(long ms);
/* A free TCP port on 127.0.0.1 below the kernel's ephemeral range (checked
 * free, not held): no client connection takes it meanwhile. */
int iwt_free_port(void);
/* A private redis-server on 127.0.0.1:port (no persistence, output to
 * /dev/null), tracked (stop it with iwt_stop_tracked), answering PING when
 * this returns; a check failure after 10 s. */
pid_t iwt_start_redis(int port);
/* GET http://127.0.0.1:port/path: the status (0 when unreachable); the body
 * (malloc'd) in *body when not NULL. */
long iwt_http_get(int port, const char *path, char **body);
/* POST of an application/x-www-form-urlencoded form, as iwt_http_get. */
long iwt_http_post_form(int port, const char *path, const char *form, char **body);
/* For iwt_eventually: GET http://127.0.0.1:port/path answers `want` (> 0),
 * or anything but 200 (want 0: down, or not ready). */
typedef struct iwt_probe {
    int port;
    const char *path;
    long want;
} iwt_probe;
int iwt_answers(void *probe);
/* The value of the Prometheus sample `series` (name with its labels exactly
 * as rendered, e.g. iw_jobs_total{role="poller",outcome="acked"}) in a
 * /metrics text; -1 when absent. */
double iwt_metric(const char *text, const char *series);

/* Polls cond() every 20 ms until true or timeout; returns its last value. */
int iwt_eventually(int (*cond)(void *), void *ud, int timeout_ms);
/* The same for an expression: re-evaluated every 20 ms until it is true or
 * timeout_ms passed; the statement's value is the expression's last value. */
#define IWT_EVENTUALLY(expr, timeout_ms)                                                           \
    ({                                                                                             \
        long long iwt_until_ = iwt_now_ms() + (timeout_ms);                                        \
        int iwt_ok_;                                                                               \
        while (!(iwt_ok_ = !!(expr)) && iwt_now_ms() < iwt_until_)                                 \
            iwt_sleep_ms(20);                                                                      \
        iwt_ok_;                                                                                   \
    })

long long iwt_now_ms(void);

/* A PRIVATE RabbitMQ node for tests that need a special broker (a memory
 * alarm, a TLS listener): its own node name (iwtest-<tag>-<pid>@localhost),
 * free loopback ports, data, logs and Erlang cookie in a temporary
 * directory, no plugins.  The shared broker is never touched. */
typedef struct iwt_rabbit {
    char node[128];
    char dir[256];
    int port;      /* AMQP */
    int tls_port;  /* 0 unless started with TLS */
    int dist_port; /* Erlang distribution */
} iwt_rabbit;

/* Starts the node and waits until it serves AMQP (up to 90 s).  extra_conf is
 * appended to its rabbitmq.conf (NULL ok); "@DIR@" in it is replaced by the
 * node's directory.  With tls, a TLS listener goes on tls_port.  Returns 0, or
 * -1 (with a message on stderr) when a node cannot be started here. */
int iwt_rabbit_start(iwt_rabbit *r, const char *tag, int tls, const char *extra_conf);
/* Runs `rabbitmqctl -n <node> args...` against the private node; its exit code. */
int iwt_rabbitmqctl(const iwt_rabbit *r, const char *const *args);
/* Stops the node and removes its directory. */
void iwt_rabbit_stop(iwt_rabbit *r);
/* Stops the nodes of `tag` whose test process is gone (a failed Check
 * assertion ends the test at once): call it from an unchecked teardown, which
 * runs in the suite's own process. */
void iwt_rabbit_reap(const char *tag);

/* Namespaces outlive a test that Check ends with _exit() on a failed
 * assertion.  main calls iwt_ns_suite(name) before the runner forks; a test
 * records each namespace it creates (iwt_ns_remember) in a file named after
 * the suite and the runner process; the runner's unchecked teardown
 * (iwt_ns_remove_leftovers) removes what a failed test left; a test that
 * cleaned up after itself ends with iwt_ns_forget. */
void iwt_ns_suite(const char *suite);
void iwt_ns_remember(const char *ns);
void iwt_ns_remove_leftovers(void);
void iwt_ns_forget(void);

/* Benchmarks: a process's peak resident set (VmHWM) in kB, -1 if unknown;
 * its CPU time; sorting samples ascending for percentiles. */
long iwt_peak_rss_kb(pid_t pid);
/* A "<field>: <n> kB" line of /proc/<pid>/status (VmRSS, VmHWM...), -1 if absent. */
long iwt_status_kb(pid_t pid, const char *field);
/* A process's CPU time (user + system) in seconds, -1 if unknown. */
double iwt_cpu_seconds(pid_t pid);
void iwt_sort_ll(long long *v, size_t n);

#endif
