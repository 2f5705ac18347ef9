/* The pure parts of redis_link's Sentinel support: the IW_REDIS_SENTINELS
 * list, master names, the sentinels' and ROLE replies (built by hand, as
 * hiredis would), WAIT replies, and the Redis settings of the config table. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "redis_link.h"

START_TEST(sentinels_parsed)
{
    redis_endpoint eps[REDIS_MAX_SENTINELS];
    size_t n = 99;
    iw_error err = {0};

    ck_assert_int_eq(redis_parse_sentinels("127.0.0.1:26379, localhost:26380 ,[::1]:1,a:65535", eps,
                                           REDIS_MAX_SENTINELS, &n, &err),
                     IW_OK);
    ck_assert_uint_eq(n, 4);
    ck_assert_str_eq(eps[0].host, "127.0.0.1");
    ck_assert_int_eq(eps[0].port, 26379);
    ck_assert_str_eq(eps[1].host, "localhost");
    ck_assert_int_eq(eps[1].port, 26380);
    ck_assert_str_eq(eps[2].host, "::1");
    ck_assert_int_eq(eps[2].port, 1);
    ck_assert_str_eq(eps[3].host, "a");
    ck_assert_int_eq(eps[3].port, 65535);
}
END_TEST

START_TEST(sentinels_count_only)
{
    size_t n = 0;
    iw_error err = {0};

    ck_assert_int_eq(redis_parse_sentinels("h:1", NULL, 1, &n, &err), IW_OK);
    ck_assert_uint_eq(n, 1);
}
END_TEST

static const char *const bad_lists[] = {
    "",                       /* nothing */
    " , ",                    /* empty items */
    "h:1,,h:2",               /* an empty item in the middle */
    "h:1,",                   /* a trailing comma */
    "host",                   /* no port */
    "host:",                  /* empty port */
    ":26379",                 /* no host */
    "h:0",                    /* port 0 */
    "h:65536",                /* port too large */
    "h:99999999999999999999", /* overflow */
    "h:12a",                  /* not a number */
    "h:-1",                   /* negative */
    "::1:26379",              /* IPv6 without brackets */
    "[::1]26379",             /* no colon after the bracket */
    "[::1]:",                 /* no port */
    "[::1",                   /* no closing bracket */
    "h h:1",                  /* a space inside the host */
    "user@h:1",               /* not a URL */
    "redis://h:1",
};

START_TEST(sentinels_refused)
{
    redis_endpoint eps[REDIS_MAX_SENTINELS];
    size_t n;
    iw_error err = {0};
    const char *list = bad_lists[_i];

    ck_assert_msg(redis_parse_sentinels(list, eps, REDIS_MAX_SENTINELS, &n, &err) == IW_ERR_CONFIG,
                  "'%s' accepted", list);
    ck_assert_msg(strncmp(err.msg, "IW_REDIS_SENTINELS: ", 20) == 0, "'%s': message '%s'", list,
                  err.msg);
}
END_TEST

START_TEST(sentinels_capped)
{
    redis_endpoint eps[2];
    size_t n;
    iw_error err = {0};
    char host[REDIS_HOST_MAX + 8];

    ck_assert_int_eq(redis_parse_sentinels("a:1,b:2,c:3", eps, 2, &n, &err), IW_ERR_CONFIG);
    memset(host, 'h', REDIS_HOST_MAX);
    strcpy(host + REDIS_HOST_MAX, ":1");
    ck_assert_int_eq(redis_parse_sentinels(host, eps, 2, &n, &err), IW_ERR_CONFIG);
    host[REDIS_HOST_MAX - 1] = ':';
    host[REDIS_HOST_MAX] = '1';
    host[REDIS_HOST_MAX + 1] = '\0';
    ck_assert_int_eq(redis_parse_sentinels(host, eps, 2, &n, &err), IW_OK);
    ck_assert_uint_eq(strlen(eps[0].host), REDIS_HOST_MAX - 1);
}
END_TEST

START_TEST(master_names)
{
    char longest[130];

    ck_assert(redis_master_name_ok("mymaster"));
    ck_assert(redis_master_name_ok("iw-prod_1.eu"));
    ck_assert(!redis_master_name_ok(""));
    ck_assert(!redis_master_name_ok(NULL));
    ck_assert(!redis_master_name_ok("my master"));
    ck_assert(!redis_master_name_ok("m\r\nFLUSHALL"));
    memset(longest, 'm', 128);
    longest[128] = '\0';
    ck_assert(redis_master_name_ok(longest));
    longest[128] = 'm';
    longest[129] = '\0';
    ck_assert(!redis_master_name_ok(longest));
}
END_TEST

/* ---- replies built as hiredis builds them ------------------------------- */

static redisReply *str(const char *s)
{
    redisReply *r = calloc(1, sizeof *r);
    r->type = REDIS_REPLY_STRING;
    r->str = strdup(s);
    r->len = strlen(s);
    return r;
}

static redisReply *arr(size_t n, ...)
{
    redisReply *r = calloc(1, sizeof *r);
    va_list ap;

    r->type = REDIS_REPLY_ARRAY;
    r->elements = n;
    r->element = calloc(n ? n : 1, sizeof *r->element);
    va_start(ap, n);
    for (size_t i = 0; i < n; i++)
        r->element[i] = va_arg(ap, redisReply *);
    va_end(ap);
    return r;
}

static redisReply *typed(int type, long long integer)
{
    redisReply *r = calloc(1, sizeof *r);
    r->type = type;
    r->integer = integer;
    return r;
}

START_TEST(master_addr_reply)
{
    redis_endpoint m;
    iw_error err = {0};
    redisReply *r = arr(2, str("127.0.0.1"), str("6380"));

    ck_assert_int_eq(redis_parse_master_addr(r, &m, &err), IW_OK);
    ck_assert_str_eq(m.host, "127.0.0.1");
    ck_assert_int_eq(m.port, 6380);
    freeReplyObject(r);

    r = typed(REDIS_REPLY_NIL, 0);
    ck_assert_int_eq(redis_parse_master_addr(r, &m, &err), IW_ERR_NOT_FOUND);
    freeReplyObject(r);

    r = arr(1, str("127.0.0.1"));
    ck_assert_int_eq(redis_parse_master_addr(r, &m, &err), IW_ERR_REDIS);
    freeReplyObject(r);
    r = arr(2, str("127.0.0.1"), str("0"));
    ck_assert_int_eq(redis_parse_master_addr(r, &m, &err), IW_ERR_REDIS);
    freeReplyObject(r);
    r = arr(2, str("127.0.0.1"), str("70000"));
    ck_assert_int_eq(redis_parse_master_addr(r, &m, &err), IW_ERR_REDIS);
    freeReplyObject(r);
    r = arr(2, str("127.0.0.1"), str("63x"));
    ck_assert_int_eq(redis_parse_master_addr(r, &m, &err), IW_ERR_REDIS);
    freeReplyObject(r);
    r = arr(2, str(""), str("6379"));
    ck_assert_int_eq(redis_parse_master_addr(r, &m, &err), IW_ERR_REDIS);
    freeReplyObject(r);
    r = arr(2, typed(REDIS_REPLY_INTEGER, 1), str("6379"));
    ck_assert_int_eq(redis_parse_master_addr(r, &m, &err), IW_ERR_REDIS);
    freeReplyObject(r);
    r = typed(REDIS_REPLY_ERROR, 0);
    ck_assert_int_eq(redis_parse_master_addr(r, &m, &err), IW_ERR_REDIS);
    freeReplyObject(r);
    ck_assert_int_eq(redis_parse_master_addr(NULL, &m, &err), IW_ERR_REDIS);
}
END_TEST

START_TEST(role_reply)
{
    redisReply *r = arr(3, str("master"), typed(REDIS_REPLY_INTEGER, 42), arr(0));
    ck_assert_str_eq(redis_parse_role(r), "master");
    freeReplyObject(r);
    r = arr(5, str("slave"), str("127.0.0.1"), typed(REDIS_REPLY_INTEGER, 6379), str("connected"),
            typed(REDIS_REPLY_INTEGER, 1));
    ck_assert_str_eq(redis_parse_role(r), "slave");
    freeReplyObject(r);
    r = arr(1, str("leader"));
    ck_assert_ptr_null(redis_parse_role(r));
    freeReplyObject(r);
    r = arr(0);
    ck_assert_ptr_null(redis_parse_role(r));
    freeReplyObject(r);
    r = str("master");
    ck_assert_ptr_null(redis_parse_role(r));
    freeReplyObject(r);
    ck_assert_ptr_null(redis_parse_role(NULL));
}
END_TEST

START_TEST(wait_reply)
{
    iw_error err = {0};
    redisReply *r = typed(REDIS_REPLY_INTEGER, 1);

    ck_assert_int_eq(redis_wait_check(r, 1, &err), IW_OK);
    ck_assert_int_eq(redis_wait_check(r, 2, &err), IW_ERR_TIMEOUT);
    ck_assert_ptr_nonnull(strstr(err.msg, "1 of 2"));
    freeReplyObject(r);
    r = str("1");
    ck_assert_int_eq(redis_wait_check(r, 1, &err), IW_ERR_REDIS);
    freeReplyObject(r);
}
END_TEST

START_TEST(wait_zero_appends_nothing)
{
    iw_error err = {0};
    redis_link *r = redis_link_new("redis://127.0.0.1:1/0", 100, &err);

    ck_assert_ptr_nonnull(r);
    /* Not connected: appending anything would fail; replicas 0 must not try. */
    ck_assert_int_eq(redis_link_append_wait(r, 0, 100, &err), 0);
    ck_assert_int_lt(redis_link_append_wait(r, 1, 100, &err), 0);
    redis_link_free(r);
}
END_TEST

/* ---- the settings ------------------------------------------------------- */

static iw_config *load(const char *const *env, iw_error *err)
{
    memset(err, 0, sizeof *err);
    return config_from_env((char **)env, NULL, err);
}

START_TEST(settings_defaults)
{
    const char *env[] = {NULL};
    iw_error err;
    iw_config *cfg = load(env, &err);

    ck_assert_ptr_nonnull(cfg);
    ck_assert_ptr_null(cfg->redis_sentinels);
    ck_assert_str_eq(cfg->redis_master, "mymaster");
    ck_assert_ptr_null(cfg->redis_password);
    ck_assert_ptr_null(cfg->redis_sentinel_password);
    ck_assert_int_eq(cfg->redis_wait_replicas, 0);
    ck_assert_int_eq(cfg->redis_wait_timeout_ms, 100);
    config_free(cfg);
}
END_TEST

START_TEST(settings_set)
{
    char path[] = "/tmp/iw-test-redis-XXXXXX";
    int fd = mkstemp(path);
    char file_env[128];
    iw_error err;

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, "s3cret\n", 7), 7);
    close(fd);
    snprintf(file_env, sizeof file_env, "IW_REDIS_SENTINEL_PASSWORD_FILE=%s", path);
    const char *env[] = {"IW_REDIS_SENTINELS=127.0.0.1:26379,127.0.0.1:26380",
                         "IW_REDIS_MASTER=iw-main",
                         "IW_REDIS_PASSWORD=pw",
                         file_env,
                         "IW_REDIS_WAIT_REPLICAS=1",
                         "IW_REDIS_WAIT_TIMEOUT=250ms",
                         NULL};
    iw_config *cfg = load(env, &err);
    unlink(path);
    ck_assert_msg(cfg != NULL, "refused: %s", err.msg);
    ck_assert_str_eq(cfg->redis_sentinels, "127.0.0.1:26379,127.0.0.1:26380");
    ck_assert_str_eq(cfg->redis_master, "iw-main");
    ck_assert_str_eq(cfg->redis_password, "pw");
    ck_assert_str_eq(cfg->redis_sentinel_password, "s3cret");
    ck_assert_int_eq(cfg->redis_wait_replicas, 1);
    ck_assert_int_eq(cfg->redis_wait_timeout_ms, 250);

    redis_link *r = redis_link_from_config(cfg, &err);
    ck_assert_msg(r != NULL, "%s", err.msg);
    /* Nothing listens there: the error names the master and the sentinels' failure. */
    ck_assert_int_eq(redis_link_ensure(r, &err), IW_ERR_REDIS);
    ck_assert_ptr_nonnull(strstr(err.msg, "iw-main"));
    redis_link_free(r);
    config_free(cfg);
}
END_TEST

START_TEST(settings_refused)
{
    static const char *const cases[][2] = {
        {"IW_REDIS_SENTINELS=127.0.0.1", "IW_REDIS_SENTINELS"},
        {"IW_REDIS_SENTINELS=", "IW_REDIS_SENTINELS"},
        {"IW_REDIS_MASTER=a b", "IW_REDIS_MASTER"},
        {"IW_REDIS_WAIT_REPLICAS=-1", "IW_REDIS_WAIT_REPLICAS"},
        {"IW_REDIS_WAIT_REPLICAS=17", "IW_REDIS_WAIT_REPLICAS"},
        {"IW_REDIS_WAIT_TIMEOUT=0ms", "IW_REDIS_WAIT_TIMEOUT"},
        {"IW_REDIS_WAIT_TIMEOUT=2m", "IW_REDIS_WAIT_TIMEOUT"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *env[] = {cases[i][0], NULL};
        iw_error err;
        iw_config *cfg = load(env, &err);
        size_t len = strlen(cases[i][1]);
        ck_assert_msg(cfg == NULL, "%s accepted", cases[i][0]);
        ck_assert_msg(strncmp(err.msg, cases[i][1], len) == 0 && err.msg[len] == ':',
                      "%s: message '%s'", cases[i][0], err.msg);
    }
}
END_TEST

static Suite *redis_link_suite(void)
{
    Suite *s = suite_create("redis_link");
    TCase *tc = tcase_create("sentinel");

    tcase_add_test(tc, sentinels_parsed);
    tcase_add_test(tc, sentinels_count_only);
    tcase_add_loop_test(tc, sentinels_refused, 0, (int)(sizeof bad_lists / sizeof bad_lists[0]));
    tcase_add_test(tc, sentinels_capped);
    tcase_add_test(tc, master_names);
    tcase_add_test(tc, master_addr_reply);
    tcase_add_test(tc, role_reply);
    tcase_add_test(tc, wait_reply);
    tcase_add_test(tc, wait_zero_appends_nothing);
    tcase_add_test(tc, settings_defaults);
    tcase_add_test(tc, settings_set);
    tcase_add_test(tc, settings_refused);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(redis_link_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
