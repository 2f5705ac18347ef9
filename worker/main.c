/* integration-worker: the first argument picks a role or an ops command. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "dlq.h"
#include "json_mem.h"
#include "log.h"
#include "roles.h"
#include "runtime.h"
#include "topology.h"

extern char **environ;

static const char usage_text[] =
    "usage: integration-worker ROLE [--help]\n"
    "\n"
    "Roles:\n"
    "  submitter   consume <ns>.submit, POST to the provider, publish submission.accepted/failed,\n"
    "              schedule the first status check\n"
    "  poller      consume <ns>.status, GET the status until terminal, publish "
    "status.progress/final\n"
    "  resolver    answer resource.get look-ups (RPC) through the Redis cache\n"
    "  all         the three roles above in one process (local runs)\n"
    "\n"
    "Commands:\n"
    "  declare               declare the whole broker topology idempotently and exit 0\n"
    "  cache invalidate ID   delete the cached entries of resource ID\n"
    "  dlq COMMAND           review the dead letters: list, stats, show, replay, export, purge\n"
    "                        (integration-worker dlq --help)\n"
    "\n"
    "Exit codes: 0 ok, 2 usage or configuration error, 1 runtime failure.\n"
    "SIGTERM/SIGINT stop gracefully within IW_SHUTDOWN_GRACE.\n\n";

static void usage(FILE *out)
{
    fputs(usage_text, out);
    config_print_help(out);
}

static void warn_setting(const char *msg)
{
    log_msg(IW_LOG_WARN, NULL, "%s", msg);
}

static int run_declare(iw_config *cfg)
{
    iw_error err = {0};
    amqp_link *l = amqp_link_connect(cfg->amqp_url, "integration-worker declare", NULL, &err);
    int rc;

    if (!l) {
        fprintf(stderr, "integration-worker declare: %s\n", err.msg);
        return 1;
    }
    rc = topology_declare(l, cfg, &err);
    amqp_link_free(l);
    if (rc != IW_OK) {
        fprintf(stderr, "integration-worker declare: %s\n", err.msg);
        return 1;
    }
    log_msg(IW_LOG_INFO, NULL, "topology of namespace %s declared", cfg->ns);
    log_flush();
    return 0;
}

static int run_roles(iw_config *cfg, const char *role)
{
    iw_error err = {0};
    char name[128];
    runtime *rt;
    engine *eng = NULL;
    submitter *sub = NULL;
    poller *pol = NULL;
    resolver *res = NULL;
    int all = strcmp(role, "all") == 0, rc = 1;

    snprintf(name, sizeof name, "integration-worker %s pid %ld", role, (long)getpid());
    rt = runtime_new(cfg, name, &err);
    if (!rt || !(eng = engine_new(rt, &err)))
        goto out;
    if ((all || strcmp(role, "submitter") == 0) && !(sub = submitter_new(rt, eng, &err)))
        goto out;
    if ((all || strcmp(role, "poller") == 0) && !(pol = poller_new(rt, eng, &err)))
        goto out;
    if ((all || strcmp(role, "resolver") == 0) && !(res = resolver_new(rt, eng, &err)))
        goto out;
    log_msg(IW_LOG_INFO, NULL, "starting role %s (namespace %s, concurrency %ld)", role, cfg->ns,
            cfg->concurrency);
    rc = runtime_run(rt);
out:
    if (rc && err.msg[0]) {
        log_json(IW_LOG_ERROR,
                 json_pack("{s:s, s:{s:s, s:s}}", "message", "cannot start", "error", "code",
                           iw_code_name(IW_C_STARTUP_FAILED), "message", err.msg));
        fprintf(stderr, "integration-worker %s: %s\n", role, err.msg);
    }
    log_flush();
    /* the runtime first: failing its pending confirms completes the jobs
     * that wait for them, while the engine and the roles still exist */
    runtime_free(rt);
    resolver_free(res);
    engine_free(eng);
    submitter_free(sub);
    poller_free(pol);
    return rc;
}

int main(int argc, char **argv)
{
    iw_error err = {0};
    iw_config *cfg;
    const char *role;
    int rc;

    json_mem_install(); /* before the first JSON value */
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    role = argv[1];
    if (!strcmp(role, "--help") || !strcmp(role, "-h") || !strcmp(role, "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(role, "dlq"))
        return dlq_main(argc - 2, argv + 2, environ);
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
    }
    int is_cache = !strcmp(role, "cache");
    if (strcmp(role, "submitter") && strcmp(role, "poller") && strcmp(role, "resolver") &&
        strcmp(role, "all") && strcmp(role, "declare") && !is_cache) {
        fprintf(stderr, "integration-worker: unknown role or command '%s' (see --help)\n", role);
        return 2;
    }
    if (is_cache && (argc != 4 || strcmp(argv[2], "invalidate") != 0 || !*argv[3])) {
        fprintf(stderr,
                "integration-worker cache: usage: integration-worker cache invalidate ID\n");
        return 2;
    }
    if (!is_cache && argc > 2) {
        fprintf(stderr, "integration-worker %s: unexpected argument '%s'\n", role, argv[2]);
        return 2;
    }
    log_init(IW_LOG_INFO, "integration-worker", stderr);
    cfg = config_from_env(environ, warn_setting, &err);
    if (!cfg) {
        fprintf(stderr, "integration-worker: %s\n", err.msg);
        return 2;
    }
    log_init(cfg->log_level, "integration-worker", stderr);
    srandom((unsigned)(time(NULL) ^ getpid()));
    if (is_cache) {
        rc = resolver_cache_invalidate_cmd(cfg, argv[3]);
        config_free(cfg);
        return rc;
    }
    if (strcmp(role, "declare") && config_check_provider(cfg, &err) != IW_OK) {
        fprintf(stderr, "integration-worker: %s\n", err.msg);
        config_free(cfg);
        return 2;
    }
    if (!strcmp(role, "declare"))
        rc = run_declare(cfg);
    else
        rc = run_roles(cfg, role);
    config_free(cfg);
    return rc;
}
