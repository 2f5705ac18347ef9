/* Least privilege (issue 12 item 4): the workers that every integration suite starts
 * log in as the test users that scripts/stack.sh derives from deploy/ (RabbitMQ user
 * iw-test limited to t-* names, Redis ACL user iw-test limited to t-* keys and the
 * worker's commands). This suite proves those users really are limited, so that the
 * other suites passing means the deploy files grant everything the worker needs. */
#include <check.h>
#include <hiredis/hiredis.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "iwtest.h"

/* A namespace outside the test user's t-* pattern. */
static const char *outside_namespace(void)
{
    static char ns[64];
    snprintf(ns, sizeof ns, "x-priv-%ld", (long)getpid());
    return ns;
}

START_TEST(declare_inside_the_test_namespaces_only)
{
    const char *const args[] = {"declare", NULL};
    char *out = NULL;
    char ns[128];

    snprintf(ns, sizeof ns, "%s", iwt_namespace("priv"));
    int rc = iwt_run_worker_cmd(args, ns, 1, NULL, &out);
    free(out);
    out = NULL;
    iwt_cleanup(ns);
    ck_assert_msg(rc == 0, "declare in %s as iw-test failed (rc %d): is scripts/stack.sh up run?",
                  ns, rc);

    /* the same command on a name the user may not configure must be refused */
    rc = iwt_run_worker_cmd(args, outside_namespace(), 1, NULL, &out);
    free(out);
    iwt_cleanup(outside_namespace()); /* as admin, in case it was (wrongly) allowed */
    ck_assert_msg(rc == 1, "declare of %s as iw-test was not refused (rc %d)", outside_namespace(),
                  rc);
}
END_TEST

/* hiredis splits the command on spaces only when it is the format itself. */
static redisReply *as_test_user(redisContext *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static redisReply *as_test_user(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    ck_assert_ptr_nonnull(r);
    return r;
}

START_TEST(redis_user_limited_to_test_keys_and_worker_commands)
{
    redisContext *c = redisConnect("127.0.0.1", 6379);
    ck_assert(c && !c->err);
    redisReply *r = redisCommand(c, "AUTH iw-test iw-test");
    ck_assert_msg(r && r->type == REDIS_REPLY_STATUS,
                  "AUTH iw-test failed: run scripts/stack.sh up");
    freeReplyObject(r);

    char key[160];
    snprintf(key, sizeof key, "%s:probe", iwt_namespace("priv"));
    r = as_test_user(c, "SET %s 1 PX 10000", key);
    ck_assert_int_eq(r->type, REDIS_REPLY_STATUS);
    freeReplyObject(r);
    /* a script runs with the caller's rights: its commands and keys are checked too */
    r = as_test_user(c, "EVAL %s 1 %s", "return redis.call('GET', KEYS[1])", key);
    ck_assert_int_eq(r->type, REDIS_REPLY_ERROR); /* EVAL itself is not granted */
    freeReplyObject(r);
    r = as_test_user(c, "SCRIPT LOAD %s", "return redis.call('FLUSHDB')");
    ck_assert_int_eq(r->type, REDIS_REPLY_STRING);
    char sha[64];
    snprintf(sha, sizeof sha, "%s", r->str);
    freeReplyObject(r);
    r = as_test_user(c, "EVALSHA %s 0", sha);
    ck_assert_int_eq(r->type, REDIS_REPLY_ERROR);
    ck_assert_msg(strstr(r->str, "NOPERM") || strstr(r->str, "can't run"), "%s", r->str);
    freeReplyObject(r);

    static const char *const refused[][3] = {
        {"SET", "ext-api:probe", "1"}, {"GET", "other:key", NULL},     {"FLUSHALL", NULL, NULL},
        {"KEYS", "*", NULL},           {"CONFIG", "GET", "maxmemory"}, {"ACL", "LIST", NULL}};
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        int argc = refused[i][2] ? 3 : refused[i][1] ? 2 : 1;
        r = redisCommandArgv(c, argc, (const char **)refused[i], NULL);
        ck_assert_ptr_nonnull(r);
        ck_assert_msg(r->type == REDIS_REPLY_ERROR && strstr(r->str, "NOPERM"),
                      "'%s' was allowed to iw-test", refused[i][0]);
        freeReplyObject(r);
    }
    freeReplyObject(as_test_user(c, "DEL %s", key));
    redisFree(c);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("privilege");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, declare_inside_the_test_namespaces_only);
    tcase_add_test(tc, redis_user_limited_to_test_keys_and_worker_commands);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
