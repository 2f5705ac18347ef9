/* json_read (common/json_read.c) against json_loadb: the same value (types,
 * members in their order), or the same refusal with the same error, for
 * hand-picked edge cases, the job fixtures and many random texts; and the fast way taken
 * for plain text and left for everything the two readers could differ on. */
#include <check.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_mem.h"
#include "json_read.h"

/* json_read and json_loadb agree on text[0..len) with flags. */
static void agree(const char *text, size_t len, size_t flags)
{
    json_error_t e1, e2;
    json_t *a = json_read(text, len, flags, &e1), *b = json_loadb(text, len, flags, &e2);

    ck_assert_msg(!a == !b, "json_read %s, json_loadb %s: %.*s", a ? "accepts" : "refuses",
                  b ? "accepts" : "refuses", (int)len, text);
    if (a) {
        char *da = json_dumps(a, JSON_COMPACT | JSON_ENCODE_ANY),
             *db = json_dumps(b, JSON_COMPACT | JSON_ENCODE_ANY);
        ck_assert_msg(json_equal(a, b), "different values: %.*s", (int)len, text);
        ck_assert_str_eq(da, db); /* the same members in the same order */
        free(da);
        free(db);
    } else {
        ck_assert_str_eq(e1.text, e2.text);
        ck_assert_int_eq(e1.line, e2.line);
        ck_assert_int_eq(e1.position, e2.position);
    }
    ck_assert_int_eq(e1.line, e2.line);
    ck_assert_int_eq(e1.column, e2.column);
    ck_assert_str_eq(e1.source, e2.source);
    json_decref(a);
    json_decref(b);
}

static void agree_both(const char *text)
{
    agree(text, strlen(text), 0);
    agree(text, strlen(text), JSON_REJECT_DUPLICATES);
}

/* 1 when json_read reads text without json_loadb. */
static int fast(const char *text, size_t flags)
{
    json_t *v = json_read_plain(text, strlen(text), flags);
    int ok = v != NULL;

    json_decref(v);
    return ok;
}

START_TEST(plain_text_is_read_fast_and_the_same)
{
    static const char *texts[] = {
        "{\"jobId\":\"b-1-7\",\"userId\":\"u-7\",\"action\":\"transaction\","
        "\"payload\":{\"amount\":7,\"currency\":\"EUR\"}}",
        "{\"id\":\"ext-1\",\"status\":\"pending\",\"message\":\"Request received\","
        "\"trackingId\":\"trk-1\"}",
        "[]",
        "{}",
        " [1, -0, 0, 2.5, -1e3, 1E+2, 0.1e-2, true, false, null, \"\", [[]], {\"a\":{}}] \n",
        "{\"n\":9223372036854775807,\"m\":-9223372036854775808}",
        "{\"tiny\":1e-400}",
        "{\"utf8\":\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\",\"\xc3\xa9\":1}",
        "{\"a\":1,\"b\":2,\"c\":3,\"d\":[1,{\"e\":\"f\"}]}",
        "\t{\r\n\"a\" : [ 1 , 2 ] }\r\n",
    };
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
        ck_assert_msg(fast(texts[i], 0), "not read fast: %s", texts[i]);
        agree_both(texts[i]);
    }
}
END_TEST

START_TEST(what_the_readers_could_differ_on_goes_to_jansson)
{
    static const char *texts[] = {
        "{\"a\":\"\\u0000\"}",          /* NUL only with JSON_ALLOW_NUL */
        "{\"a\":\"\\ud800\"}",          /* a lone surrogate */
        "{\"a\":\"\\udc00x\"}",         /* a lone low surrogate */
        "{\"a\":\"\\ud83d\\ude00\"}",   /* a pair */
        "{\"a\":\"q\\\"uote\\n\\t\"}",  /* plain escapes */
        "{\"a\\u0062\":1}",             /* an escaped key */
        "{\"a\":\"\xc0\x80\"}",         /* overlong */
        "{\"a\":\"\xed\xa0\x80\"}",     /* a surrogate in UTF-8 */
        "{\"a\":\"\xf4\x90\x80\x80\"}", /* past U+10FFFF */
        "{\"a\":\"\xe2\x82\"}",         /* cut short */
        "{\"a\":\"\x80\"}",             /* a continuation byte alone */
        "{\"a\":1}\x0b",                /* yajl's whitespace, not JSON's */
        "\x0c{\"a\":1}",
        "{\"a\":\"tab\there\"}",       /* a raw control character in a string */
        "{\"a\":9223372036854775808}", /* too big an integer */
        "{\"a\":-9223372036854775809}",
        "{\"a\":1e400}", /* a real that overflows */
        "{\"a\":-1e400}",
        "{\"a\":1,\"a\":2}", /* a duplicate: kept last, or refused */
        "{\"a\":{\"b\":1,\"b\":[]}}",
        "\"top\"", /* top-level scalars */
        "1",
        "null",
        "",
        "   ",
        "{",
        "{\"a\"}",
        "{\"a\":}",
        "[1,]",
        "{\"a\":1,}",
        "[01]",
        "[1.]",
        "[.5]",
        "[-]",
        "[+1]",
        "[1e]",
        "[tru]",
        "[True]",
        "[NaN]",
        "[Infinity]",
        "{} {}",
        "{}x",
        "{\"a\":1}\"", /* the text ends inside a string after the root */
        "[]\"x",
        "{} \"abc",
        "[1]\n\"\\",
        "{}tru",
        "{}1",
        "{}-",
        "[] // comment",
        "[/* c */]",
        "{'a':1}",
        "{a:1}",
    };
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
        ck_assert_msg(!fast(texts[i], JSON_REJECT_DUPLICATES), "read fast: %s", texts[i]);
        agree_both(texts[i]);
    }
    /* without JSON_REJECT_DUPLICATES a repeated key is plain: the last value */
    ck_assert(fast("{\"a\":1,\"a\":2}", 0));
}
END_TEST

START_TEST(embedded_nul_bytes_and_other_flags)
{
    static const char nul[] = "{\"a\":1}\0{\"b\":2}";

    agree(nul, sizeof nul - 1, 0);
    agree("{\"a\":\0\"x\"}", 10, 0);
    /* another flag: jansson alone */
    json_t *v = json_read_plain("[1]", 3, JSON_DECODE_ANY);
    ck_assert_ptr_null(v);
    agree("[1]", 3, JSON_DECODE_ANY);
    agree("1", 1, JSON_DECODE_ANY);
}
END_TEST

START_TEST(nesting_past_the_fast_depth)
{
    char text[2 * 5000 + 1];

    for (int depth = JSON_READ_DEPTH - 1; depth <= JSON_READ_DEPTH + 1; depth++) {
        memset(text, '[', (size_t)depth);
        memset(text + depth, ']', (size_t)depth);
        text[2 * depth] = '\0';
        ck_assert_int_eq(fast(text, 0), depth <= JSON_READ_DEPTH);
        agree_both(text);
    }
    /* past jansson's own limit (2048): its error */
    memset(text, '[', 5000);
    memset(text + 5000, ']', 5000);
    text[10000] = '\0';
    agree_both(text);
}
END_TEST

/* Every job fixture of the suite, valid and invalid, byte for byte as the
 * broker would bring it; returns how many were read fast. */
static int agree_for_dir(const char *dir, int *n)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int fast_ones = 0;

    ck_assert_msg(d != NULL, "cannot open %s", dir);
    while ((e = readdir(d))) {
        char path[1024], text[8192];
        size_t len;
        FILE *f;

        if (e->d_name[0] == '.')
            continue;
        /* valid/<name>.json, invalid/<name>/input.json */
        snprintf(path, sizeof path, "%s/%s%s", dir, e->d_name,
                 strstr(e->d_name, ".json") ? "" : "/input.json");
        if (!(f = fopen(path, "rb")))
            continue; /* an invalid case without a body */
        len = fread(text, 1, sizeof text, f);
        fclose(f);
        ck_assert_uint_lt(len, sizeof text);
        agree(text, len, 0);
        agree(text, len, JSON_REJECT_DUPLICATES);
        json_t *v = json_read_plain(text, len, JSON_REJECT_DUPLICATES);
        fast_ones += v != NULL;
        json_decref(v);
        (*n)++;
    }
    closedir(d);
    return fast_ones;
}

START_TEST(job_fixtures_agree)
{
    int n = 0, fast_valid = agree_for_dir(IW_TEST_DATA_DIR "/jobs/valid", &n);

    agree_for_dir(IW_TEST_DATA_DIR "/jobs/invalid", &n);
    ck_assert_int_ge(n, 30);
    ck_assert_int_ge(fast_valid, 5); /* the plain ones do not go through jansson */
}
END_TEST

/* Random texts from JSON's pieces and some bytes that are not: each must be
 * read the same way by both (accepted or refused, and the same error). */
START_TEST(random_texts_agree)
{
    static const char *pieces[] = {
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "\"a\"",
        "\"b\"",
        "\"\"",
        "0",
        "-1",
        "12",
        "3.5",
        "1e9",
        "-0.0e-1",
        "true",
        "false",
        "null",
        " ",
        "\n",
        "\"\\n\"",
        "\"\\u00e9\"",
        "\"\xc3\xa9\"",
        "\x80",
        "\\",
        "\"",
        "99999999999999999999",
        "1e999",
        "\t",
        "x",
        "\x0b",
    };
    char text[512];
    unsigned seed = 12345;

    for (int round = 0; round < 100000; round++) {
        size_t len = 0;
        int n = 1 + (int)(rand_r(&seed) % 24);

        if (round % 2) { /* mostly well formed: an object of members */
            len = (size_t)snprintf(text, sizeof text, "{\"k%d\":", round % 7);
            for (int i = 0; i < n && len < sizeof text - 40; i++) {
                const char *p = pieces[6 + rand_r(&seed) % 12];
                size_t k = strlen(p);
                memcpy(text + len, p, k);
                len += k;
                if (i + 1 < n) {
                    int c = (int)(rand_r(&seed) % 3);
                    len += (size_t)snprintf(text + len, sizeof text - len, "%s",
                                            c == 0   ? ",\"a\":"
                                            : c == 1 ? ",\"b\":"
                                                     : ",");
                }
            }
            text[len++] = '}';
        } else {
            for (int i = 0; i < n; i++) {
                const char *p = pieces[rand_r(&seed) % (sizeof pieces / sizeof *pieces)];
                size_t k = strlen(p);
                if (len + k >= sizeof text)
                    break;
                memcpy(text + len, p, k);
                len += k;
            }
        }
        agree(text, len, round % 3 ? 0 : JSON_REJECT_DUPLICATES);
    }
}
END_TEST

static Suite *json_read_suite(void)
{
    Suite *s = suite_create("json_read");
    TCase *tc = tcase_create("against json_loadb");

    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, plain_text_is_read_fast_and_the_same);
    tcase_add_test(tc, what_the_readers_could_differ_on_goes_to_jansson);
    tcase_add_test(tc, embedded_nul_bytes_and_other_flags);
    tcase_add_test(tc, nesting_past_the_fast_depth);
    tcase_add_test(tc, job_fixtures_agree);
    tcase_add_test(tc, random_texts_agree);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    /* as the worker does (main.c): jansson's and yajl's blocks through
     * json_mem, except under AddressSanitizer */
    json_mem_install();
    SRunner *sr = srunner_create(json_read_suite());

    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
