/* Growing strings with a hard cap, and safe message text: valid UTF-8 out of
 * any bytes (invalid sequences, cut multibyte characters, NULs, controls),
 * cut at a byte cap on a character boundary. */
#include <check.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "log.h"
#include "status.h"

START_TEST(grows_within_cap)
{
    iw_buf b;
    buf_init(&b, 10);
    ck_assert_str_eq(buf_ptr(&b), "");
    ck_assert_int_eq(buf_add(&b, "abc", 3), IW_OK);
    ck_assert_int_eq(buf_addf(&b, "%d-%s", 42, "xy"), IW_OK);
    ck_assert_str_eq(buf_ptr(&b), "abc42-xy");
    ck_assert_int_eq(buf_len(&b), 8);
    ck_assert_int_eq(buf_adds(&b, "zz"), IW_OK); /* exactly the cap */
    ck_assert_int_eq(buf_len(&b), 10);
    buf_free(&b);
}
END_TEST

START_TEST(past_cap_refused_and_unchanged)
{
    iw_buf b;
    buf_init(&b, 8);
    ck_assert_int_eq(buf_adds(&b, "12345"), IW_OK);
    ck_assert_int_eq(buf_adds(&b, "6789"), IW_ERR_TOO_LARGE);
    ck_assert_int_eq(buf_addf(&b, "%s", "abcd"), IW_ERR_TOO_LARGE);
    ck_assert_str_eq(buf_ptr(&b), "12345");
    ck_assert_int_eq(buf_addf(&b, "%s", "abc"), IW_OK);
    ck_assert_str_eq(buf_ptr(&b), "12345abc");
    ck_assert_int_eq(buf_add(&b, "", 0), IW_OK);
    ck_assert_int_eq(buf_add(&b, "x", 1), IW_ERR_TOO_LARGE);
    char *s = buf_steal(&b);
    ck_assert_str_eq(s, "12345abc");
    free(s);
    ck_assert_int_eq(buf_len(&b), 0);
    buf_free(&b);
    buf_free(NULL);
}
END_TEST

/* buf_cat: the parts in order with one reservation, or nothing at all. */
START_TEST(cat_all_or_nothing)
{
    iw_buf b;
    char mem[8];

    buf_init(&b, 12);
    ck_assert_int_eq(buf_cat(&b, (const char *[]){NULL}), IW_OK);
    ck_assert_str_eq(buf_ptr(&b), "");
    ck_assert_int_eq(buf_cat(&b, (const char *[]){"Name", ": ", "", "val", NULL}), IW_OK);
    ck_assert_str_eq(buf_ptr(&b), "Name: val");
    ck_assert_int_eq(buf_len(&b), 9);
    /* one byte past the cap: refused whole */
    ck_assert_int_eq(buf_cat(&b, (const char *[]){"ab", "cd", NULL}), IW_ERR_TOO_LARGE);
    ck_assert_str_eq(buf_ptr(&b), "Name: val");
    ck_assert_int_eq(buf_cat(&b, (const char *[]){"a", "bc", NULL}), IW_OK); /* exactly */
    ck_assert_str_eq(buf_ptr(&b), "Name: valabc");
    buf_free(&b);
    /* leaves the caller's memory when it outgrows it, as buf_add does */
    buf_init_on(&b, mem, sizeof mem, 100);
    ck_assert_int_eq(buf_cat(&b, (const char *[]){"http://h", "/v1/submissions", NULL}), IW_OK);
    ck_assert_str_eq(buf_ptr(&b), "http://h/v1/submissions");
    buf_free(&b);
}
END_TEST

START_TEST(large_growth)
{
    iw_buf b;
    buf_init(&b, 1000010);
    for (int i = 0; i < 100000; i++)
        ck_assert_int_eq(buf_adds(&b, "0123456789"), IW_OK);
    ck_assert_int_eq(buf_len(&b), 1000000);
    ck_assert_int_eq(buf_adds(&b, "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdef"),
                     IW_ERR_TOO_LARGE);
    buf_reset(&b);
    ck_assert_str_eq(buf_ptr(&b), "");
    buf_free(&b);
}
END_TEST

/* On the caller's memory until it outgrows it; never past the cap even when
 * the memory is larger; a steal is a copy the caller owns. */
START_TEST(on_callers_memory)
{
    char mem[8], big[64];
    iw_buf b;

    buf_init_on(&b, mem, sizeof mem, 100);
    ck_assert_int_eq(buf_adds(&b, "1234567"), IW_OK);
    ck_assert_ptr_eq(buf_ptr(&b), mem);
    ck_assert_int_eq(buf_adds(&b, "8"), IW_OK); /* no room for the NUL: moves */
    ck_assert_ptr_ne(buf_ptr(&b), mem);
    ck_assert_str_eq(buf_ptr(&b), "12345678");
    buf_free(&b);

    buf_init_on(&b, mem, sizeof mem, 100);
    ck_assert_int_eq(buf_adds(&b, "abc"), IW_OK);
    char *s = buf_steal(&b);
    ck_assert_ptr_ne(s, mem);
    ck_assert_str_eq(s, "abc");
    free(s);
    buf_free(&b);

    buf_init_on(&b, big, sizeof big, 4);
    ck_assert_int_eq(buf_adds(&b, "abcd"), IW_OK);
    ck_assert_int_eq(buf_add(&b, "e", 1), IW_ERR_TOO_LARGE);
    ck_assert_int_eq(buf_reserve(&b, 1), IW_ERR_TOO_LARGE);
    ck_assert_str_eq(buf_ptr(&b), "abcd");
    buf_free(&b);

    buf_init(&b, 1000);
    ck_assert_int_eq(buf_reserve(&b, 500), IW_OK);
    ck_assert_uint_eq(buf_len(&b), 0);
    ck_assert_uint_ge(b.alloc, 501);
    ck_assert_int_eq(buf_reserve(&b, 1001), IW_ERR_TOO_LARGE);
    buf_free(&b);
}
END_TEST

START_TEST(utf8_next_lengths)
{
    ck_assert_uint_eq(utf8_next("a", 1), 1);
    ck_assert_uint_eq(utf8_next("\xC3\xA9", 2), 2);
    ck_assert_uint_eq(utf8_next("\xE2\x82\xAC", 3), 3);
    ck_assert_uint_eq(utf8_next("\xF0\x9F\x98\x80", 4), 4);
    ck_assert_uint_eq(utf8_next("\xE2\x82", 2), 0);         /* cut */
    ck_assert_uint_eq(utf8_next("\xC0\xAF", 2), 0);         /* overlong */
    ck_assert_uint_eq(utf8_next("\xED\xA0\x80", 3), 0);     /* surrogate */
    ck_assert_uint_eq(utf8_next("\xF4\x90\x80\x80", 4), 0); /* past U+10FFFF */
    ck_assert_uint_eq(utf8_next("\x80", 1), 0);
}
END_TEST

/* text_quote's output must always be a valid JSON string */
static void assert_safe(const char *q, size_t max)
{
    ck_assert_ptr_nonnull(q);
    ck_assert_msg(strlen(q) <= max, "'%s' is over %zu bytes", q, max);
    ck_assert_msg(utf8_valid(q, strlen(q)), "'%s' is not UTF-8", q);
    for (const char *p = q; *p; p++)
        ck_assert_msg((unsigned char)*p >= 0x20 && *p != 0x7f, "control byte in '%s'", q);
    json_t *j = json_string(q);
    ck_assert_ptr_nonnull(j);
    json_decref(j);
}

static void check_quote(const char *in, size_t n, size_t max, const char *want)
{
    char *q = text_quote(in, n, max);
    assert_safe(q, max);
    ck_assert_str_eq(q, want);
    free(q);
}

START_TEST(text_valid_passes_unchanged)
{
    check_quote("text/plain", 10, 100, "text/plain");
    check_quote("\xe6\x97\xa5\xe6\x9c\xac", 6, 100, "\xe6\x97\xa5\xe6\x9c\xac");
    check_quote("a\\b", 3, 100, "a\\b");
    check_quote("", 0, 100, "");
}
END_TEST

START_TEST(text_invalid_utf8_replaced)
{
    /* a lone continuation byte, an overlong '/', a surrogate, past U+10FFFF */
    check_quote("a\x80z", 3, 100, "a\xef\xbf\xbdz");
    check_quote("\xc0\xaf", 2, 100, "\xef\xbf\xbd\xef\xbf\xbd");
    check_quote("\xed\xa0\x80", 3, 100, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    check_quote("\xf4\x90\x80\x80", 4, 100, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    check_quote("\xff\xfe", 2, 100, "\xef\xbf\xbd\xef\xbf\xbd");
    /* a multibyte character cut by the end of the input: one U+FFFD */
    check_quote("ab\xe6\x97", 4, 100, "ab\xef\xbf\xbd");
    check_quote("\xf0\x9f\x98", 3, 100, "\xef\xbf\xbd");
}
END_TEST

START_TEST(text_controls_and_nul_escaped)
{
    check_quote("a\0b", 3, 100, "a\\x00b");
    check_quote("j-1\r\nX-Injected: yes", 20, 100, "j-1\\r\\nX-Injected: yes");
    check_quote("\t\x1b\x7f", 3, 100, "\\t\\x1b\\x7f");
    check_quote("\xc2\x85", 2, 100, "\\u0085"); /* NEL, a C1 control */
}
END_TEST

START_TEST(text_cut_on_character_boundary)
{
    /* 10 x U+65E5 (3 bytes each) = 30 bytes into 10: 2 characters + U+2026 */
    char in[31] = "";
    for (int i = 0; i < 10; i++)
        strcat(in, "\xe6\x97\xa5");
    check_quote(in, 30, 10, "\xe6\x97\xa5\xe6\x97\xa5\xe2\x80\xa6");
    check_quote(in, 30, 30, in);
    check_quote(in, 30, 29,
                "\xe6\x97\xa5\xe6\x97\xa5\xe6\x97\xa5\xe6\x97\xa5\xe6\x97\xa5"
                "\xe6\x97\xa5\xe6\x97\xa5\xe6\x97\xa5\xe2\x80\xa6");
    /* ASCII that fits exactly is not cut */
    check_quote("0123456789", 10, 10, "0123456789");
    check_quote("0123456789A", 11, 10, "0123456\xe2\x80\xa6");
    /* an escape is never split */
    check_quote("abcdefg\n", 8, 8, "abcde\xe2\x80\xa6");
}
END_TEST

START_TEST(text_random_bytes_always_safe)
{
    unsigned seed = 12345;
    for (int round = 0; round < 5000; round++) {
        unsigned char in[64];
        size_t n = (size_t)(rand_r(&seed) % 64), max = 3 + (size_t)(rand_r(&seed) % 80);
        for (size_t i = 0; i < n; i++)
            in[i] = (unsigned char)rand_r(&seed);
        char *q = text_quote(in, n, max);
        assert_safe(q, max);
        /* idempotent on its own output when nothing was cut */
        char *q2 = text_quote(q, strlen(q), 1000);
        ck_assert_str_eq(q, q2);
        free(q);
        free(q2);
    }
}
END_TEST

START_TEST(utf8_prefix_never_splits)
{
    const char *s = "a\xe6\x97\xa5\xf0\x9f\x98\x80"; /* a, U+65E5, U+1F600 */
    ck_assert_int_eq(utf8_prefix(s, 8, 100), 8);
    ck_assert_int_eq(utf8_prefix(s, 8, 8), 8);
    ck_assert_int_eq(utf8_prefix(s, 8, 7), 4);
    ck_assert_int_eq(utf8_prefix(s, 8, 5), 4);
    ck_assert_int_eq(utf8_prefix(s, 8, 3), 1);
    ck_assert_int_eq(utf8_prefix(s, 8, 1), 1);
    ck_assert_int_eq(utf8_prefix(s, 8, 0), 0);
}
END_TEST

START_TEST(error_message_is_valid_utf8)
{
    /* iw_error_set: input quoted raw is made safe and cut on a boundary */
    iw_error err;
    char big[1000] = "";
    for (int i = 0; i < 300; i++)
        strcat(big, "\xe6\x97\xa5");
    iw_error_set(&err, IW_ERR_INVALID, "content_type '%s' is bad", big);
    ck_assert_int_eq(err.status, IW_ERR_INVALID);
    assert_safe(err.msg, IW_ERRMSG_LEN - 1);
    iw_error_set(&err, IW_ERR_INVALID, "id '%s'\n", "a\xff\x80");
    ck_assert_str_eq(err.msg, "id 'a\xef\xbf\xbd\xef\xbf\xbd'\\n");
}
END_TEST

START_TEST(log_line_keeps_invalid_message)
{
    char out[4096];
    FILE *f = tmpfile(); /* log_init sets its own buffer: no memstream */
    ck_assert_ptr_nonnull(f);
    log_init(IW_LOG_DEBUG, "test", f);
    log_msg(IW_LOG_WARN, NULL, "content_type '%s'", "bad\xe6\x97"); /* cut character */
    log_flush();
    rewind(f);
    size_t n = fread(out, 1, sizeof out - 1, f);
    out[n] = '\0';
    log_init(IW_LOG_DEBUG, "test", stderr);
    fclose(f);
    json_error_t je;
    json_t *line = json_loads(out, 0, &je);
    ck_assert_msg(line != NULL, "log line is not JSON: %s", out);
    ck_assert_str_eq(json_string_value(json_object_get(line, "message")),
                     "content_type 'bad\xef\xbf\xbd'");
    json_decref(line);
}
END_TEST

/* Logs one line per call of `emit` into a file and returns the text. */
static void logged(void (*emit)(void), const char *service, char *out, size_t cap)
{
    FILE *f = tmpfile();
    ck_assert_ptr_nonnull(f);
    log_init(IW_LOG_DEBUG, service, f);
    emit();
    log_flush();
    rewind(f);
    size_t n = fread(out, 1, cap - 1, f);
    out[n] = '\0';
    log_init(IW_LOG_DEBUG, "test", stderr);
    fclose(f);
}

static void emit_lines(void)
{
    char big[3000];

    log_json(IW_LOG_INFO, json_pack("{s:s, s:i}", "requestId", "a\"b\n", "attempt", 2));
    log_json(IW_LOG_WARN, NULL);
    log_json(IW_LOG_WARN, json_object());
    log_json(IW_LOG_ERROR, json_pack("{s:s, s:s}", "level", "mine", "x", "y"));
    memset(big, 'z', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    log_json(IW_LOG_INFO, json_pack("{s:s}", "big", big));

    /* written member by member */
    log_line l;
    json_t *bad = json_stringn_nocheck("\xff", 1);
    ck_assert(log_line_begin(&l, IW_LOG_WARN));
    jw_str(&l.w, "requestId", "r\n1");
    jw_null(&l.w, "status");
    jw_open(&l.w, "error");
    jw_int(&l.w, "retryAttempt", 3);
    jw_close(&l.w);
    log_line_end(&l);
    ck_assert(log_line_begin(&l, IW_LOG_ERROR)); /* a member it cannot write */
    jw_str(&l.w, "requestId", "r2");
    jw_json(&l.w, "bad", bad);
    log_line_end(&l);
    json_decref(bad);
}

/* Every line is one JSON object: the head (timestamp, level, service,
 * interface) first, then the caller's fields in their order, whichever way
 * it was written (the head as text with the fields' dump, or one merged
 * object for fields that name a head field or do not fit the buffer). */
START_TEST(log_lines_head_then_fields)
{
    static char out[16384];
    char *line, *save = NULL;
    const char *want_level[] = {"INFO", "WARN", "WARN", "mine", "INFO", "WARN", "ERROR"};
    int i = 0;

    logged(emit_lines, "svc \"q\"", out, sizeof out);
    for (line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save), i++) {
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        const char *key;
        json_t *v;
        const char *order[8];
        int k = 0;

        ck_assert_msg(o != NULL, "line %d is not JSON: %s", i, line);
        ck_assert_int_lt(i, 7);
        json_object_foreach(o, key, v)
        {
            if (k < 8)
                order[k] = key;
            k++;
        }
        ck_assert_int_ge(k, 4);
        ck_assert_str_eq(order[0], "timestamp");
        ck_assert_str_eq(order[1], "level");
        ck_assert_str_eq(order[2], "service");
        ck_assert_str_eq(order[3], "interface");
        ck_assert_str_eq(json_string_value(json_object_get(o, "level")), want_level[i]);
        ck_assert_str_eq(json_string_value(json_object_get(o, "service")), "svc \"q\"");
        ck_assert_str_eq(json_string_value(json_object_get(o, "interface")), "IF-002");
        if (i == 0) {
            ck_assert_int_eq(k, 6);
            ck_assert_str_eq(order[4], "requestId");
            ck_assert_str_eq(order[5], "attempt");
            ck_assert_str_eq(json_string_value(json_object_get(o, "requestId")), "a\"b\n");
        }
        if (i == 1 || i == 2)
            ck_assert_int_eq(k, 4);
        if (i == 3)
            ck_assert_str_eq(json_string_value(json_object_get(o, "x")), "y");
        if (i == 4)
            ck_assert_int_eq(strlen(json_string_value(json_object_get(o, "big"))), 2999);
        if (i == 5) {
            ck_assert_int_eq(k, 7);
            ck_assert_str_eq(json_string_value(json_object_get(o, "requestId")), "r\n1");
            ck_assert(json_is_null(json_object_get(o, "status")));
            ck_assert_int_eq(
                json_integer_value(json_object_get(json_object_get(o, "error"), "retryAttempt")),
                3);
        }
        if (i == 6) { /* the line says so, without half of its members */
            ck_assert_int_eq(k, 5);
            ck_assert_ptr_nonnull(
                strstr(json_string_value(json_object_get(o, "message")), "not valid UTF-8"));
        }
        json_decref(o);
    }
    ck_assert_int_eq(i, 7);
}
END_TEST

START_TEST(log_line_off_below_level)
{
    log_line l;

    log_init(IW_LOG_ERROR, "test", stderr);
    ck_assert_int_eq(log_line_begin(&l, IW_LOG_INFO), 0);
    log_init(IW_LOG_DEBUG, "test", stderr);
}
END_TEST

START_TEST(timestamp_formats_and_clamps)
{
    char ts[40];
    format_timestamp(0, ts, sizeof ts);
    ck_assert_str_eq(ts, "1970-01-01T00:00:00.000Z");
    format_timestamp(1700000000123LL, ts, sizeof ts);
    ck_assert_str_eq(ts, "2023-11-14T22:13:20.123Z");
    format_timestamp(-5, ts, sizeof ts);
    ck_assert_str_eq(ts, "1970-01-01T00:00:00.000Z");
    format_timestamp(9223372036854775807LL, ts, sizeof ts);
    ck_assert_str_eq(ts, "9999-12-31T23:59:59.999Z");
    format_timestamp(0, ts, 10); /* too small: empty, never cut */
    ck_assert_str_eq(ts, "");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("buf");
    TCase *tc = tcase_create("buf");
    tcase_add_test(tc, grows_within_cap);
    tcase_add_test(tc, past_cap_refused_and_unchanged);
    tcase_add_test(tc, cat_all_or_nothing);
    tcase_add_test(tc, large_growth);
    tcase_add_test(tc, on_callers_memory);
    tcase_add_test(tc, utf8_next_lengths);
    tcase_add_test(tc, log_line_off_below_level);
    suite_add_tcase(s, tc);
    tc = tcase_create("text");
    tcase_set_timeout(tc, 60); /* the random round trips on a loaded CI machine */
    tcase_add_test(tc, text_valid_passes_unchanged);
    tcase_add_test(tc, text_invalid_utf8_replaced);
    tcase_add_test(tc, text_controls_and_nul_escaped);
    tcase_add_test(tc, text_cut_on_character_boundary);
    tcase_add_test(tc, text_random_bytes_always_safe);
    tcase_add_test(tc, utf8_prefix_never_splits);
    tcase_add_test(tc, error_message_is_valid_utf8);
    tcase_add_test(tc, log_line_keeps_invalid_message);
    tcase_add_test(tc, log_lines_head_then_fields);
    tcase_add_test(tc, timestamp_formats_and_clamps);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
