/* json_out: the same bytes as jansson's compact form for every kind of value
 * (escapes, UTF-8, integers at their limits, reals, nesting, member order),
 * refusals that leave the buffer as it was, and the writer. */
#include <check.h>
#include <dirent.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "json_out.h"
#include "status.h"
#include "transform.h"

/* json_out_text(v) must be json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY). */
static void assert_same(const json_t *v)
{
    char *want = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    size_t len = 0;
    char *got = json_out_text(v, &len);

    ck_assert_ptr_nonnull(want);
    ck_assert_ptr_nonnull(got);
    ck_assert_str_eq(got, want);
    ck_assert_uint_eq(len, strlen(want));
    free(want);
    free(got);
}

static json_t *parse(const char *text)
{
    json_error_t jerr;
    json_t *v = json_loads(text, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);

    ck_assert_msg(v != NULL, "bad test JSON '%s': %s", text, jerr.text);
    return v;
}

static const char *const texts[] = {
    "{}",
    "[]",
    "null",
    "true",
    "false",
    "0",
    "-1",
    "9223372036854775807",
    "-9223372036854775808",
    "1.5",
    "-0.0",
    "1e300",
    "0.1",
    "123456789.123456789",
    "\"\"",
    "\"plain\"",
    "\"quote \\\" backslash \\\\ slash / done\"",
    "\"\\b\\f\\n\\r\\t\\u0001\\u001f\\u007f\\u0000 nul\"",
    "\"\\u00e9 \\u20ac \\ud83d\\ude00 \\u2028\\u2029 \\uffff\"",
    "{\"z\":1,\"a\":2,\"m\":{\"y\":[1,2,{\"k\":null}],\"b\":\"x\"}}",
    "[[],[{}],[[[]]],{\"\":\"\"}]",
    "{\"k\\u00e9y\\n\":\"v\",\"\\u0001\":1}",
    "{\"jobId\":\"j-1\",\"userId\":\"u-42\",\"action\":\"transfer\",\"payload\":{\"amount\":12.5,"
    "\"currency\":\"EUR\",\"tags\":[1,\"a\",null]},\"priority\":\"critical\"}",
};

START_TEST(same_as_jansson)
{
    json_t *v = parse(texts[_i]);

    assert_same(v);
    json_decref(v);
}
END_TEST

/* Every job fixture of the suite, valid and invalid, as jansson writes it. */
static void same_for_dir(const char *dir, int *n)
{
    DIR *d = opendir(dir);
    struct dirent *e;

    ck_assert_msg(d != NULL, "cannot open %s", dir);
    while ((e = readdir(d))) {
        char path[1024];
        json_t *v;

        if (e->d_name[0] == '.')
            continue;
        /* valid/<name>.json, invalid/<name>/input.json */
        snprintf(path, sizeof path, "%s/%s%s", dir, e->d_name,
                 strstr(e->d_name, ".json") ? "" : "/input.json");
        if (!(v = json_load_file(path, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL)))
            continue; /* the fixtures that are not JSON at all */
        assert_same(v);
        json_decref(v);
        (*n)++;
    }
    closedir(d);
}

START_TEST(same_for_fixtures)
{
    int n = 0;

    same_for_dir(IW_TEST_DATA_DIR "/jobs/valid", &n);
    same_for_dir(IW_TEST_DATA_DIR "/jobs/invalid", &n);
    ck_assert_int_ge(n, 20);
}
END_TEST

/* Values built in memory rather than parsed: member order as inserted,
 * replaced and deleted members, every byte value in a string. */
START_TEST(same_for_built_values)
{
    json_t *o = json_object(), *a = json_array();
    char all[256];

    for (int i = 0; i < 256; i++)
        all[i] = (char)(i < 128 ? i : 'x');
    json_object_set_new(o, "b", json_integer(1));
    json_object_set_new(o, "a", json_stringn(all, sizeof all));
    json_object_set_new(o, "c", json_real(3.25));
    json_object_set_new(o, "b", json_integer(2)); /* replaced in place */
    json_object_del(o, "a");
    json_object_set_new(o, "a", json_string("again"));
    for (int i = 0; i < 100; i++)
        json_array_append_new(a, json_integer((json_int_t)i * 7919 - 100000));
    json_object_set_new(o, "list", a);
    assert_same(o);
    json_decref(o);
}
END_TEST

/* Not UTF-8 (as json_stringn_nocheck lets one in): refused, b unchanged. */
START_TEST(invalid_utf8_refused)
{
    static const char *const bad[] = {"\xC0\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80", "a\xE2\x82",
                                      "\xFF"};
    iw_buf b;

    buf_init(&b, 1024);
    ck_assert_int_eq(buf_adds(&b, "kept"), IW_OK);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        json_t *s = json_stringn_nocheck(bad[i], strlen(bad[i]));
        json_t *o = json_pack("{s:s, s:O}", "ok", "yes", "bad", s);
        json_t *k = json_object();

        json_object_set_new_nocheck(k, bad[i], json_true());
        ck_assert_int_eq(json_out(&b, s), IW_ERR_INVALID);
        ck_assert_int_eq(json_out(&b, o), IW_ERR_INVALID);
        ck_assert_int_eq(json_out(&b, k), IW_ERR_INVALID);
        ck_assert_ptr_null(json_out_text(o, NULL));
        ck_assert_str_eq(buf_ptr(&b), "kept");
        json_decref(s);
        json_decref(o);
        json_decref(k);
    }
    ck_assert_ptr_null(json_out_text(NULL, NULL));
    ck_assert_int_eq(json_out(&b, NULL), IW_ERR_INVALID);
    buf_free(&b);
}
END_TEST

START_TEST(past_cap_refused)
{
    json_t *v = parse("{\"a\":\"0123456789\",\"b\":[1,2,3]}");
    iw_buf b;

    buf_init(&b, 20);
    ck_assert_int_eq(buf_adds(&b, "xy"), IW_OK);
    ck_assert_int_eq(json_out(&b, v), IW_ERR_TOO_LARGE);
    ck_assert_str_eq(buf_ptr(&b), "xy");
    buf_free(&b);
    buf_init(&b, 30);
    ck_assert_int_eq(json_out(&b, v), IW_OK);
    ck_assert_str_eq(buf_ptr(&b), "{\"a\":\"0123456789\",\"b\":[1,2,3]}");
    buf_free(&b);
    json_decref(v);
}
END_TEST

/* Nesting: as deep as jansson parses is written, deeper is refused. */
START_TEST(deep_nesting)
{
    json_t *root = json_array(), *cur = root;
    iw_buf b;

    for (int i = 1; i < 2048; i++) {
        json_t *next = json_array();
        json_array_append_new(cur, next);
        cur = next;
    }
    assert_same(root);
    json_array_append_new(cur, json_array()); /* level 2,049 */
    buf_init(&b, 1 << 20);
    ck_assert_int_eq(json_out(&b, root), IW_ERR_INVALID);
    ck_assert_uint_eq(buf_len(&b), 0);
    buf_free(&b);
    json_decref(root);
}
END_TEST

/* Into the caller's memory, and on to the heap when it outgrows it. */
START_TEST(on_callers_memory)
{
    char mem[16];
    json_t *v = parse("[\"0123456789abcdef\",\"more\"]");
    iw_buf b;

    buf_init_on(&b, mem, sizeof mem, 1000);
    ck_assert_int_eq(json_out(&b, json_array_get(v, 1)), IW_OK);
    ck_assert_ptr_eq(buf_ptr(&b), mem);
    ck_assert_str_eq(buf_ptr(&b), "\"more\"");
    ck_assert_int_eq(json_out(&b, v), IW_OK);
    ck_assert_ptr_ne(buf_ptr(&b), mem);
    ck_assert_str_eq(buf_ptr(&b), "\"more\"[\"0123456789abcdef\",\"more\"]");
    buf_free(&b);
    json_decref(v);
}
END_TEST

START_TEST(writer)
{
    json_t *payload = parse("{\"x\":[1,\"\\u00e9\"]}");
    iw_buf b;
    json_w w;

    buf_init(&b, 1024);
    jw_begin(&w, &b);
    jw_str(&w, "s", "a\"b\n");
    jw_int(&w, "n", -42);
    jw_json(&w, "p", payload);
    jw_open(&w, "o");
    jw_open(&w, "i");
    jw_close(&w);
    jw_int(&w, "after", 1);
    jw_close(&w);
    jw_str(&w, "last", "");
    jw_null(&w, "z");
    jw_members(&w, payload);
    ck_assert_int_eq(jw_end(&w), IW_OK);
    ck_assert_str_eq(buf_ptr(&b), "{\"s\":\"a\\\"b\\n\",\"n\":-42,\"p\":{\"x\":[1,\"\xC3\xA9\"]},"
                                  "\"o\":{\"i\":{},\"after\":1},\"last\":\"\",\"z\":null,"
                                  "\"x\":[1,\"\xC3\xA9\"]}");
    buf_free(&b);

    /* an empty object, then failures that stick and leave b as it was */
    buf_init(&b, 1024);
    jw_begin(&w, &b);
    ck_assert_int_eq(jw_end(&w), IW_OK);
    ck_assert_str_eq(buf_ptr(&b), "{}");
    jw_begin(&w, &b);
    jw_str(&w, "a", "x");
    jw_json(&w, "missing", NULL);
    jw_str(&w, "b", "y");
    ck_assert_int_eq(jw_end(&w), IW_ERR_INVALID);
    ck_assert_str_eq(buf_ptr(&b), "{}");
    jw_begin(&w, &b);
    jw_str(&w, "a", NULL);
    ck_assert_int_eq(jw_end(&w), IW_ERR_INVALID);
    jw_begin(&w, &b);
    jw_close(&w); /* nothing open */
    ck_assert_int_eq(jw_end(&w), IW_ERR_INVALID);
    jw_begin(&w, &b);
    jw_open(&w, "unclosed");
    ck_assert_int_eq(jw_end(&w), IW_ERR_INVALID);
    jw_begin(&w, &b);
    for (int i = 0; i < 10; i++)
        jw_open(&w, "deep");
    ck_assert_int_eq(jw_end(&w), IW_ERR_INVALID);
    ck_assert_str_eq(buf_ptr(&b), "{}");
    buf_free(&b);

    /* resumed after a head written another way; members of a non-object */
    buf_reset(&b);
    ck_assert_int_eq(buf_adds(&b, "{\"h\":1"), IW_OK);
    jw_resume(&w, &b, 0);
    jw_int(&w, "m", 2);
    ck_assert_int_eq(jw_end(&w), IW_OK);
    ck_assert_str_eq(buf_ptr(&b), "{\"h\":1,\"m\":2}");
    jw_begin(&w, &b);
    jw_members(&w, json_array_get(json_object_get(payload, "x"), 0));
    ck_assert_int_eq(jw_end(&w), IW_ERR_INVALID);
    ck_assert_str_eq(buf_ptr(&b), "{\"h\":1,\"m\":2}");
    buf_free(&b);

    buf_init(&b, 8); /* too small */
    jw_begin(&w, &b);
    jw_str(&w, "key", "value");
    ck_assert_int_eq(jw_end(&w), IW_ERR_TOO_LARGE);
    ck_assert_uint_eq(buf_len(&b), 0);
    buf_free(&b);
    json_decref(payload);
}
END_TEST

/* The request's text is the spec's outbound mapping, built here as a tree
 * (the oracle) and dumped by jansson, byte for byte. */
START_TEST(outbound_text_same_bytes)
{
    static const char *const jobs[] = {
        "{\"jobId\":\"j-1\",\"userId\":\"u-42\",\"action\":\"transfer\",\"payload\":{\"amount\":12."
        "5,"
        "\"tags\":[1,\"a\",null],\"n\":{\"d\":{\"x\":true}}},\"priority\":\"critical\"}",
        "{\"payload\":[],\"action\":\"a\\u0000b\",\"userId\":\"\\u00e9\\n\\\"\"}",
        "{\"userId\":1,\"action\":null,\"payload\":\"text\"}",
    };
    for (size_t i = 0; i < sizeof jobs / sizeof jobs[0]; i++) {
        json_t *job = parse(jobs[i]),
               *out = json_pack("{s:O, s:O, s:O, s:{s:s, s:s}}", "user_id",
                                json_object_get(job, "userId"), "action_type",
                                json_object_get(job, "action"), "request_data",
                                json_object_get(job, "payload"), "client_info", "client_id",
                                "client \"7\"", "timestamp", "2023-11-14T22:13:20.123Z");
        char *want = json_dumps(out, JSON_COMPACT);
        iw_buf b;

        buf_init(&b, 4096);
        ck_assert_int_eq(transform_outbound(job, "client \"7\"", 1700000000123LL, &b), IW_OK);
        ck_assert_str_eq(buf_ptr(&b), want);
        buf_free(&b);
        free(want);
        json_decref(out);
        json_decref(job);
    }
    /* a job without a member the mapping needs: refused, nothing written */
    json_t *job = parse("{\"userId\":\"u\",\"action\":\"a\"}");
    iw_buf b;
    buf_init(&b, 4096);
    ck_assert_int_eq(buf_adds(&b, "kept"), IW_OK);
    ck_assert_int_eq(transform_outbound(job, "c", 0, &b), IW_ERR_INVALID);
    ck_assert_str_eq(buf_ptr(&b), "kept");
    buf_free(&b);
    json_decref(job);
}
END_TEST

static Suite *json_out_suite(void)
{
    Suite *s = suite_create("json_out");
    TCase *tc = tcase_create("dump");

    tcase_add_loop_test(tc, same_as_jansson, 0, sizeof texts / sizeof texts[0]);
    tcase_add_test(tc, same_for_fixtures);
    tcase_add_test(tc, same_for_built_values);
    tcase_add_test(tc, invalid_utf8_refused);
    tcase_add_test(tc, past_cap_refused);
    tcase_add_test(tc, deep_nesting);
    tcase_add_test(tc, on_callers_memory);
    suite_add_tcase(s, tc);
    tc = tcase_create("writer");
    tcase_add_test(tc, writer);
    tcase_add_test(tc, outbound_text_same_bytes);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(json_out_suite());

    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
