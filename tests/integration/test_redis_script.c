/* Pipelined scripts on the stack's Redis, as the least-privilege test user
 * (iw-test, keys t-*) like every integration suite: every argument reaches
 * the script byte for byte (the command is written in RESP by redis_link, not by
 * hiredis), whatever its bytes and size, and replies come back in order. */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iwtest.h"
#include "redis_link.h"

/* The script answers with its key, the number of arguments and each one. */
static redis_script echo = {"local r = {KEYS[1], #ARGV}\n"
                            "for i = 1, #ARGV do r[#r + 1] = ARGV[i] end\n"
                            "return r",
                            ""};

START_TEST(arguments_byte_for_byte)
{
    iw_error err = {0};
    redis_link *r = redis_link_new("redis://iw-test:iw-test@127.0.0.1:6379/0", 2000, &err);
    static char big[70000];
    const char *args[4];
    size_t lens[4];

    ck_assert_ptr_nonnull(r);
    for (size_t i = 0; i < sizeof big - 1; i++)
        big[i] = (char)('a' + i % 26);
    redis_link_add_script(r, &echo);
    ck_assert_int_eq(redis_link_ensure(r, &err), IW_OK);
    args[0] = "t-script:key";
    args[1] = "";
    args[2] = "line\r\nbreak $3\r\n*2 \xc3\xa9\xff";
    args[3] = big;
    for (int i = 0; i < 4; i++)
        lens[i] = strlen(args[i]);
    /* three commands in one pipeline: 0, 1 and 3 arguments */
    ck_assert_int_eq(redis_link_append_script(r, &echo, 1, 1, args, &err), IW_OK);
    ck_assert_int_eq(redis_link_append_script(r, &echo, 1, 2, args, &err), IW_OK);
    ck_assert_int_eq(redis_link_append_script(r, &echo, 1, 4, args, &err), IW_OK);
    for (int n = 0; n < 3; n++) {
        int nargs = n == 0 ? 0 : n == 1 ? 1 : 3;
        redisReply *rep = NULL;

        ck_assert_int_eq(redis_link_read(r, &rep, &err), IW_OK);
        ck_assert_int_eq(rep->type, REDIS_REPLY_ARRAY);
        ck_assert_uint_eq(rep->elements, 2 + (size_t)nargs);
        ck_assert_str_eq(rep->element[0]->str, "t-script:key");
        ck_assert_int_eq(rep->element[1]->integer, nargs);
        for (int i = 0; i < nargs; i++) {
            ck_assert_uint_eq(rep->element[2 + i]->len, lens[1 + i]);
            ck_assert(memcmp(rep->element[2 + i]->str, args[1 + i], lens[1 + i]) == 0);
        }
        freeReplyObject(rep);
    }
    /* too many arguments: refused before anything is appended */
    const char *many[130];
    for (int i = 0; i < 130; i++)
        many[i] = "x";
    ck_assert_int_eq(redis_link_append_script(r, &echo, 1, 130, many, &err), IW_ERR_INVALID);
    ck_assert_int_eq(redis_link_append_script(r, &echo, 1, 1, args, &err), IW_OK);
    redisReply *rep = NULL;
    ck_assert_int_eq(redis_link_read(r, &rep, &err), IW_OK);
    ck_assert_uint_eq(rep->elements, 2);
    freeReplyObject(rep);
    redis_link_free(r);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("redis_script");
    TCase *tc = tcase_create("pipeline");

    tcase_add_test(tc, arguments_byte_for_byte);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
