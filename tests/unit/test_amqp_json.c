/* AMQP field tables as JSON (amqp_table_to_json[_with]): the one conversion
 * the worker's dead letters, `dlq show` and the tests share. */
#include <check.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_link.h"

static amqp_table_entry_t entry(const char *key, size_t key_len, amqp_field_value_t v)
{
    amqp_table_entry_t e = {.key = {key_len, (void *)key}, .value = v};
    return e;
}

static amqp_field_value_t bytes_value(const void *b, size_t len)
{
    amqp_field_value_t v = {.kind = AMQP_FIELD_KIND_BYTES};
    v.value.bytes = (amqp_bytes_t){len, (void *)b};
    return v;
}

static json_t *tag_binary(amqp_bytes_t b)
{
    return json_pack("{s:I}", "binary_len", (json_int_t)b.len);
}

START_TEST(binary_values_follow_the_policy)
{
    static const unsigned char bin[] = {0xff, 0x00, 0xfe};
    amqp_table_entry_t e[] = {entry("b", 1, bytes_value(bin, sizeof bin)),
                              entry("s", 1, bytes_value("caf\xc3\xa9", 5))};
    amqp_table_t t = {2, e};
    json_t *plain = amqp_table_to_json(&t), *tagged = amqp_table_to_json_with(&t, tag_binary);

    ck_assert(json_is_null(json_object_get(plain, "b")));
    ck_assert_str_eq(json_string_value(json_object_get(plain, "s")), "caf\xc3\xa9");
    ck_assert_int_eq(
        json_integer_value(json_object_get(json_object_get(tagged, "b"), "binary_len")), 3);
    ck_assert_str_eq(json_string_value(json_object_get(tagged, "s")), "caf\xc3\xa9");
    json_decref(plain);
    json_decref(tagged);
}
END_TEST

START_TEST(keys_are_never_dropped)
{
    char long_key[400];
    amqp_field_value_t one = {.kind = AMQP_FIELD_KIND_I32, .value.i32 = 1};
    amqp_field_value_t two = {.kind = AMQP_FIELD_KIND_I32, .value.i32 = 2};
    /* 200 two-byte characters: byte 255 falls inside one */
    for (int i = 0; i < 200; i++)
        memcpy(long_key + 2 * i, "\xc3\xa9", 2);
    amqp_table_entry_t e[] = {entry(long_key, 400, one), entry("a\xff", 2, two)};
    amqp_table_t t = {2, e};
    json_t *j = amqp_table_to_json(&t);
    const char *k;
    json_t *v;
    int seen = 0;

    ck_assert_int_eq(json_object_size(j), 2);
    json_object_foreach(j, k, v)
    {
        if (json_integer_value(v) == 1) {
            ck_assert_uint_eq(strlen(k), 254); /* cut before the split character */
            seen |= 1;
        } else {
            ck_assert_str_eq(k, "a\\xff");
            seen |= 2;
        }
    }
    ck_assert_int_eq(seen, 3);
    json_decref(j);
}
END_TEST

START_TEST(decimals_and_nesting)
{
    amqp_field_value_t dec = {.kind = AMQP_FIELD_KIND_DECIMAL};
    dec.value.decimal.decimals = 2;
    dec.value.decimal.value = 1234;
    amqp_table_entry_t inner[] = {entry("d", 1, dec)};
    amqp_field_value_t tbl = {.kind = AMQP_FIELD_KIND_TABLE};
    tbl.value.table = (amqp_table_t){1, inner};
    amqp_field_value_t arr = {.kind = AMQP_FIELD_KIND_ARRAY};
    arr.value.array = (amqp_array_t){1, &tbl};
    amqp_table_entry_t e[] = {entry("x", 1, arr)};
    amqp_table_t t = {1, e};
    json_t *j = amqp_table_to_json(&t);
    json_t *d = json_object_get(json_array_get(json_object_get(j, "x"), 0), "d");

    ck_assert_int_eq(json_integer_value(json_object_get(d, "decimals")), 2);
    ck_assert_int_eq(json_integer_value(json_object_get(d, "value")), 1234);
    json_decref(j);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("amqp_json");
    TCase *tc = tcase_create("tables");
    tcase_add_test(tc, binary_values_follow_the_policy);
    tcase_add_test(tc, keys_are_never_dropped);
    tcase_add_test(tc, decimals_and_nesting);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
