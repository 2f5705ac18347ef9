/* redis_link with Sentinel against real processes: a private master, a
 * replica and three sentinels on loopback ports (never the shared Redis).
 * The link finds the master through the sentinels, follows a manual failover
 * (the demoted node's READONLY or the sentinels' CLIENT KILL drops the link)
 * and a kill -9 of the master (errors while the sentinels vote, then the new
 * master), and WAIT counts the replica's acknowledgements. */
#include <check.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "iwtest.h"
#include "redis_link.h"

#define N_SENTINELS 3

typedef struct cluster {
    char dir[64];
    int master_port, replica_port;
    int sentinel_ports[N_SENTINELS];
    pid_t master, replica, sentinels[N_SENTINELS];
    char sentinel_list[128];
} cluster;

static int port_free(int port)
{
    struct sockaddr_in a;
    int fd = socket(AF_INET, SOCK_STREAM, 0), ok;
    int one = 1;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

/* Five consecutive free ports from a per-process start. */
static int free_ports(int n)
{
    static int next;
    if (!next)
        next = 21000 + (getpid() % 2000) * 5;
    for (;;) {
        int base = next, ok = 1;
        next += n;
        if (next > 60000)
            next = 21000;
        for (int i = 0; i < n && ok; i++)
            ok = port_free(base + i);
        if (ok)
            return base;
    }
}

static redisReply *cmd_at(int port, const char *fmt, ...)
{
    struct timeval tv = {1, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    redisReply *r = NULL;
    va_list ap;

    if (c && !c->err) {
        redisSetTimeout(c, tv);
        va_start(ap, fmt);
        r = redisvCommand(c, fmt, ap);
        va_end(ap);
    }
    if (c)
        redisFree(c);
    return r;
}

static pid_t spawn(char *const argv[])
{
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);
        dup2(fd, 1);
        dup2(fd, 2);
        execvp(argv[0], argv);
        _exit(127);
    }
    return pid;
}

static pid_t start_redis(cluster *c, int port, int replica_of)
{
    char p[16], m[16], dir[96];
    snprintf(p, sizeof p, "%d", port);
    snprintf(m, sizeof m, "%d", replica_of);
    snprintf(dir, sizeof dir, "%s", c->dir);
    char *argv[] = {"redis-server",
                    "--port",
                    p,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    dir,
                    "--dbfilename",
                    p,
                    replica_of ? "--replicaof" : NULL,
                    "127.0.0.1",
                    m,
                    NULL};
    return spawn(argv);
}

static pid_t start_sentinel(cluster *c, int i)
{
    char path[128];
    FILE *f;
    snprintf(path, sizeof path, "%s/sentinel-%d.conf", c->dir, i);
    f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f,
            "port %d\nbind 127.0.0.1\ndir %s\n"
            "sentinel monitor mymaster 127.0.0.1 %d 2\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 4000\n"
            "sentinel parallel-syncs mymaster 1\n",
            c->sentinel_ports[i], c->dir, c->master_port);
    fclose(f);
    char *argv[] = {"redis-server", path, "--sentinel", NULL};
    return spawn(argv);
}

static int pong(int port)
{
    redisReply *r = cmd_at(port, "PING");
    int ok = r && r->type == REDIS_REPLY_STATUS;
    if (r)
        freeReplyObject(r);
    return ok;
}

static int all_up(void *ud)
{
    cluster *c = ud;
    if (!pong(c->master_port) || !pong(c->replica_port))
        return 0;
    for (int i = 0; i < N_SENTINELS; i++)
        if (!pong(c->sentinel_ports[i]))
            return 0;
    return 1;
}

/* Every sentinel knows the replica and the two other sentinels: only then
 * can they agree on a failover. */
static int sentinels_ready(void *ud)
{
    cluster *c = ud;
    for (int i = 0; i < N_SENTINELS; i++) {
        redisReply *r = cmd_at(c->sentinel_ports[i], "SENTINEL replicas mymaster");
        int ok = r && r->type == REDIS_REPLY_ARRAY && r->elements == 1 &&
                 r->element[0]->type == REDIS_REPLY_ARRAY;
        /* the replica's flags are exactly "slave" (not disconnected, not down) */
        for (size_t k = 0; ok && k + 1 < r->element[0]->elements; k += 2)
            if (strcmp(r->element[0]->element[k]->str, "flags") == 0)
                ok = strcmp(r->element[0]->element[k + 1]->str, "slave") == 0;
        if (r)
            freeReplyObject(r);
        r = cmd_at(c->sentinel_ports[i], "SENTINEL sentinels mymaster");
        ok = ok && r && r->type == REDIS_REPLY_ARRAY && r->elements == N_SENTINELS - 1;
        if (r)
            freeReplyObject(r);
        if (!ok)
            return 0;
    }
    /* and the replica is in sync */
    redisReply *r = cmd_at(c->replica_port, "ROLE");
    int ok = r && r->type == REDIS_REPLY_ARRAY && r->elements >= 4 &&
             strcmp(r->element[3]->str, "connected") == 0;
    if (r)
        freeReplyObject(r);
    return ok;
}

static void cluster_start(cluster *c)
{
    int base = free_ports(2 + N_SENTINELS);
    memset(c, 0, sizeof *c);
    snprintf(c->dir, sizeof c->dir, "/tmp/iwt-sentinel-%d-XXXXXX", (int)getpid());
    ck_assert_ptr_nonnull(mkdtemp(c->dir));
    c->master_port = base;
    c->replica_port = base + 1;
    for (int i = 0; i < N_SENTINELS; i++)
        c->sentinel_ports[i] = base + 2 + i;
    snprintf(c->sentinel_list, sizeof c->sentinel_list, "127.0.0.1:%d,127.0.0.1:%d,127.0.0.1:%d",
             c->sentinel_ports[0], c->sentinel_ports[1], c->sentinel_ports[2]);
    c->master = start_redis(c, c->master_port, 0);
    c->replica = start_redis(c, c->replica_port, c->master_port);
    for (int i = 0; i < N_SENTINELS; i++)
        c->sentinels[i] = start_sentinel(c, i);
    ck_assert_msg(iwt_eventually(all_up, c, 10000), "private Redis processes did not start");
    ck_assert_msg(iwt_eventually(sentinels_ready, c, 20000), "sentinels did not converge");
}

static void cluster_stop(cluster *c)
{
    char rm[128];
    pid_t pids[] = {c->master, c->replica, c->sentinels[0], c->sentinels[1], c->sentinels[2]};
    for (size_t i = 0; i < sizeof pids / sizeof pids[0]; i++)
        if (pids[i] > 0)
            iwt_stop(pids[i], SIGKILL);
    snprintf(rm, sizeof rm, "rm -rf '%s'", c->dir);
    ck_assert_int_eq(system(rm), 0);
}

static redis_link *sentinel_link(cluster *c)
{
    iw_error err = {0};
    redis_link *r = redis_link_new("redis://127.0.0.1:1/0", 1000, &err);
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(redis_link_use_sentinels(r, c->sentinel_list, "mymaster", NULL, &err), IW_OK);
    return r;
}

static int address_is(redis_link *r, int port)
{
    char want[32];
    snprintf(want, sizeof want, "127.0.0.1:%d", port);
    return strcmp(redis_link_address(r), want) == 0;
}

/* One SET through the link (ensure + command); IW_OK or the failure. */
static int set_once(redis_link *r, const char *key)
{
    iw_error err = {0};
    redisReply *rep = redis_link_command(r, &err, "SET %s 1", key);
    if (!rep)
        return err.status ? err.status : IW_ERR_REDIS;
    freeReplyObject(rep);
    return IW_OK;
}

static char last_error[IW_ERRMSG_LEN];

/* True once a SET through the link fails (the message in last_error). */
static int write_refused(void *ud)
{
    iw_error err = {0};
    redisReply *rep = redis_link_command(ud, &err, "SET iwt:nr 1");
    if (rep) {
        freeReplyObject(rep);
        return 0;
    }
    snprintf(last_error, sizeof last_error, "%s", err.msg);
    return 1;
}

typedef struct follow {
    redis_link *r;
    int port;
    int errors;
} follow;

static int writes_reach(void *ud)
{
    follow *f = ud;
    if (set_once(f->r, "iwt:follow") != IW_OK) {
        f->errors++;
        return 0;
    }
    return address_is(f->r, f->port);
}

START_TEST(finds_master_through_sentinels)
{
    cluster c;
    iw_error err = {0};
    cluster_start(&c);
    redis_link *r = sentinel_link(&c);

    ck_assert_int_eq(redis_link_ensure(r, &err), IW_OK);
    ck_assert_msg(address_is(r, c.master_port), "connected to %s", redis_link_address(r));
    ck_assert_int_eq(set_once(r, "iwt:a"), IW_OK);

    /* A sentinel that is down is skipped. */
    redis_link_drop(r);
    iwt_stop(c.sentinels[0], SIGKILL);
    c.sentinels[0] = 0;
    ck_assert_int_eq(redis_link_ensure(r, &err), IW_OK);
    ck_assert(address_is(r, c.master_port));

    /* A master name no sentinel knows is an error naming it. */
    redis_link *u = redis_link_new("redis://127.0.0.1:1/0", 1000, &err);
    ck_assert_int_eq(redis_link_use_sentinels(u, c.sentinel_list, "nosuchmaster", NULL, &err),
                     IW_OK);
    ck_assert_int_eq(redis_link_ensure(u, &err), IW_ERR_REDIS);
    ck_assert_ptr_nonnull(strstr(err.msg, "nosuchmaster"));
    redis_link_free(u);
    redis_link_free(r);
    cluster_stop(&c);
}
END_TEST

static int failover_accepted(void *ud)
{
    redisReply *rep = cmd_at(*(int *)ud, "SENTINEL FAILOVER mymaster");
    int ok = rep && rep->type == REDIS_REPLY_STATUS;
    if (rep)
        freeReplyObject(rep);
    return ok;
}

START_TEST(follows_manual_failover)
{
    cluster c;
    iw_error err = {0};
    cluster_start(&c);
    redis_link *r = sentinel_link(&c);
    follow f = {r, 0, 0};

    ck_assert_int_eq(set_once(r, "iwt:before"), IW_OK);
    ck_assert(address_is(r, c.master_port));

    /* A sentinel may still call the replica unsuitable for a moment after it
     * first saw it (NOGOODSLAVE): ask until it accepts. */
    ck_assert_msg(iwt_eventually(failover_accepted, &c.sentinel_ports[1], 15000),
                  "SENTINEL FAILOVER refused");
    redisReply *rep;

    /* The old master stays alive (demoted): the link must not keep writing to
     * it; it moves to the promoted replica by itself. */
    f.port = c.replica_port;
    ck_assert_msg(iwt_eventually(writes_reach, &f, 20000), "link still at %s after the failover",
                  redis_link_address(r));
    rep = cmd_at(c.replica_port, "ROLE");
    ck_assert_str_eq(redis_parse_role(rep), "master");
    freeReplyObject(rep);
    ck_assert_int_eq(redis_link_ensure(r, &err), IW_OK);
    redis_link_free(r);
    cluster_stop(&c);
}
END_TEST

START_TEST(readonly_drops_the_link)
{
    cluster c;
    iw_error err = {0};
    redisReply *rep = NULL;
    cluster_start(&c);
    /* A link pinned to the replica (no sentinels): a write answers READONLY,
     * which must drop the connection so that a Sentinel link rediscovers. */
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d/0", c.replica_port);
    redis_link *r = redis_link_new(url, 1000, &err);
    ck_assert_int_eq(redis_link_ensure(r, &err), IW_OK);
    ck_assert_ptr_null(redis_link_command(r, &err, "SET iwt:x 1"));
    ck_assert_msg(strstr(err.msg, "READONLY") != NULL, "%s", err.msg);
    ck_assert(!redis_link_connected(r));

    /* the same through a pipelined script (a write in Lua on a replica) */
    static redis_script s = {"return redis.call('SET', KEYS[1], '1')", ""};
    redis_link_add_script(r, &s);
    ck_assert_int_eq(redis_link_ensure(r, &err), IW_OK);
    const char *argv[] = {"iwt:y"};
    ck_assert_int_eq(redis_link_append_script(r, &s, 1, 1, argv, &err), IW_OK);
    ck_assert_int_eq(redis_link_read(r, &rep, &err), IW_ERR_REDIS_SCRIPT);
    ck_assert_msg(strstr(err.msg, "READONLY") != NULL, "%s", err.msg);
    ck_assert(!redis_link_connected(r));

    /* A Sentinel link refuses a node that is not a master, whatever it is told:
     * here the sentinels watch a name whose "master" is in fact the replica. */
    rep = cmd_at(c.sentinel_ports[0], "SENTINEL MONITOR iwt-wrong 127.0.0.1 %d 2", c.replica_port);
    ck_assert_ptr_nonnull(rep);
    freeReplyObject(rep);
    redis_link *w = redis_link_new("redis://127.0.0.1:1/0", 1000, &err);
    char one[32];
    snprintf(one, sizeof one, "127.0.0.1:%d", c.sentinel_ports[0]);
    ck_assert_int_eq(redis_link_use_sentinels(w, one, "iwt-wrong", NULL, &err), IW_OK);
    ck_assert_int_eq(redis_link_ensure(w, &err), IW_ERR_REDIS);
    ck_assert_msg(strstr(err.msg, "replica") != NULL, "%s", err.msg);
    redis_link_free(w);
    redis_link_free(r);
    cluster_stop(&c);
}
END_TEST

/* A master that lost its replicas refuses writes under min-replicas-to-write
 * (NOREPLICAS, e.g. the old side of a partition): the link drops, so that the
 * next ensure asks the sentinels again instead of writing there forever. */
START_TEST(noreplicas_drops_the_link)
{
    cluster c;
    iw_error err = {0};
    redisReply *rep = NULL;
    cluster_start(&c);
    redis_link *r = sentinel_link(&c);

    ck_assert_int_eq(redis_link_ensure(r, &err), IW_OK);
    rep = redis_link_command(r, &err, "CONFIG SET min-replicas-to-write 1");
    ck_assert_ptr_nonnull(rep);
    freeReplyObject(rep);
    rep = redis_link_command(r, &err, "CONFIG SET min-replicas-max-lag 1");
    ck_assert_ptr_nonnull(rep);
    freeReplyObject(rep);
    iwt_stop(c.replica, SIGKILL);
    c.replica = 0;
    /* the master notices the replica's silence after min-replicas-max-lag */
    ck_assert_msg(iwt_eventually(write_refused, r, 10000), "writes still accepted");
    ck_assert_msg(strstr(last_error, "NOREPLICAS") != NULL, "%s", last_error);
    ck_assert(!redis_link_connected(r));
    redis_link_free(r);
    cluster_stop(&c);
}
END_TEST

START_TEST(follows_killed_master)
{
    cluster c;
    cluster_start(&c);
    redis_link *r = sentinel_link(&c);
    follow f = {r, 0, 0};
    long long t0;

    ck_assert_int_eq(set_once(r, "iwt:before"), IW_OK);
    iwt_stop(c.master, SIGKILL);
    c.master = 0;
    t0 = iwt_now_ms();
    f.port = c.replica_port;
    ck_assert_msg(iwt_eventually(writes_reach, &f, 30000), "no new master: link at %s",
                  redis_link_address(r));
    /* Fails closed meanwhile: the writes during the vote were errors. */
    ck_assert_int_gt(f.errors, 0);
    fprintf(stderr, "kill -9 to first write on the new master: %lld ms\n", iwt_now_ms() - t0);
    redis_link_free(r);
    cluster_stop(&c);
}
END_TEST

START_TEST(wait_counts_replicas)
{
    cluster c;
    iw_error err = {0};
    redisReply *rep = NULL;
    cluster_start(&c);
    redis_link *r = sentinel_link(&c);

    ck_assert_int_eq(redis_link_ensure(r, &err), IW_OK);
    ck_assert_int_eq(redis_link_append(r, &err, "SET iwt:w 1"), IW_OK);
    ck_assert_int_eq(redis_link_append_wait(r, 1, 1000, &err), 1);
    ck_assert_int_eq(redis_link_read(r, &rep, &err), IW_OK);
    freeReplyObject(rep);
    ck_assert_int_eq(redis_link_read(r, &rep, &err), IW_OK);
    ck_assert_int_eq(redis_wait_check(rep, 1, &err), IW_OK);
    freeReplyObject(rep);

    /* Only one replica exists: asking for two times out with the count. */
    ck_assert_int_eq(redis_link_append(r, &err, "SET iwt:w 2"), IW_OK);
    ck_assert_int_eq(redis_link_append_wait(r, 2, 50, &err), 1);
    ck_assert_int_eq(redis_link_read(r, &rep, &err), IW_OK);
    freeReplyObject(rep);
    ck_assert_int_eq(redis_link_read(r, &rep, &err), IW_OK);
    ck_assert_int_eq(redis_wait_check(rep, 2, &err), IW_ERR_TIMEOUT);
    freeReplyObject(rep);
    redis_link_free(r);
    cluster_stop(&c);
}
END_TEST

static Suite *sentinel_suite(void)
{
    Suite *s = suite_create("redis_sentinel");
    TCase *tc = tcase_create("sentinel");

    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, finds_master_through_sentinels);
    tcase_add_test(tc, follows_manual_failover);
    tcase_add_test(tc, readonly_drops_the_link);
    tcase_add_test(tc, noreplicas_drops_the_link);
    tcase_add_test(tc, follows_killed_master);
    tcase_add_test(tc, wait_counts_replicas);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(sentinel_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
