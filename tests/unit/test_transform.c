/* The transform module: the spec's Outbound and Inbound Data Mappings, and
 * every malformed provider body refused with a message naming the field. */
#include <check.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "transform.h"

static json_t *parse(const char *text)
{
    json_error_t jerr;
    json_t *v = json_loads(text, JSON_DECODE_ANY, &jerr);

    ck_assert_msg(v != NULL, "bad test JSON '%s': %s", text, jerr.text);
    return v;
}

/* Asserts that actual equals the JSON text expected (deep, order-free). */
static void assert_json_eq(const json_t *actual, const char *expected)
{
    json_t *want = parse(expected);

    if (!json_equal(actual, want)) {
        char *got = json_dumps(actual, JSON_SORT_KEYS | JSON_COMPACT);
        char *exp = json_dumps(want, JSON_SORT_KEYS | JSON_COMPACT);
        ck_abort_msg("got %s\nwant %s", got ? got : "NULL", exp ? exp : "NULL");
    }
    json_decref(want);
}

/* ---------------------------------------------------------------------------
 * transform_outbound
 * ------------------------------------------------------------------------ */

/* The request's text, and that text parsed (it must parse, without
 * duplicate members). */
static json_t *outbound(const json_t *job, const char *client_id, long long wall_ms, iw_buf *b)
{
    json_error_t jerr;
    json_t *v;

    buf_init(b, 1 << 16);
    ck_assert_int_eq(transform_outbound(job, client_id, wall_ms, b), IW_OK);
    v = json_loads(buf_ptr(b), JSON_REJECT_DUPLICATES, &jerr);
    ck_assert_msg(v != NULL, "request is not JSON (%s): %s", jerr.text, buf_ptr(b));
    return v;
}

START_TEST(outbound_mapping)
{
    json_t *job = parse("{\"jobId\":\"j-1\",\"userId\":\"u-42\",\"action\":\"transfer\","
                        "\"payload\":{\"amount\":12.5,\"currency\":\"EUR\",\"tags\":[1,\"a\",null],"
                        "\"nested\":{\"deep\":{\"x\":true}}},\"priority\":\"critical\"}");
    iw_buf b;
    json_t *out = outbound(job, "integration-worker", 0, &b);

    /* the members in the spec's order, compact */
    ck_assert_str_eq(buf_ptr(&b), "{\"user_id\":\"u-42\",\"action_type\":\"transfer\","
                                  "\"request_data\":{\"amount\":12.5,\"currency\":\"EUR\","
                                  "\"tags\":[1,\"a\",null],\"nested\":{\"deep\":{\"x\":true}}},"
                                  "\"client_info\":{\"client_id\":\"integration-worker\","
                                  "\"timestamp\":\"1970-01-01T00:00:00.000Z\"}}");
    buf_free(&b);
    assert_json_eq(out, "{\"user_id\":\"u-42\",\"action_type\":\"transfer\","
                        "\"request_data\":{\"amount\":12.5,\"currency\":\"EUR\","
                        "\"tags\":[1,\"a\",null],\"nested\":{\"deep\":{\"x\":true}}},"
                        "\"client_info\":{\"client_id\":\"integration-worker\","
                        "\"timestamp\":\"1970-01-01T00:00:00.000Z\"}}");
    /* exactly these members: jobId and priority stay behind */
    ck_assert_uint_eq(json_object_size(out), 4);
    ck_assert_ptr_null(json_object_get(out, "jobId"));
    ck_assert_ptr_null(json_object_get(out, "priority"));
    ck_assert(json_equal(json_object_get(out, "request_data"), json_object_get(job, "payload")));
    json_decref(out);
    json_decref(job);
}
END_TEST

/* The job is borrowed: it is unchanged and still ours to free, and the body
 * stays valid after the job is gone. */
START_TEST(outbound_borrows_job)
{
    json_t *job =
        parse("{\"jobId\":\"j\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{\"k\":1}}");
    json_t *copy = json_deep_copy(job);
    iw_buf b;
    json_t *out = outbound(job, "c", 0, &b);

    buf_free(&b);
    ck_assert(json_equal(job, copy));
    json_decref(job);
    json_decref(copy);
    assert_json_eq(json_object_get(out, "request_data"), "{\"k\":1}");
    json_decref(out);
}
END_TEST

static const struct {
    long long wall_ms;
    const char *timestamp;
} timestamps[] = {
    {0, "1970-01-01T00:00:00.000Z"},
    {1, "1970-01-01T00:00:00.001Z"},
    {999, "1970-01-01T00:00:00.999Z"},
    {1700000000123LL, "2023-11-14T22:13:20.123Z"},
    {951782400000LL, "2000-02-29T00:00:00.000Z"},
    {4102444799999LL, "2099-12-31T23:59:59.999Z"},
};

START_TEST(outbound_timestamp)
{
    json_t *job = parse("{\"jobId\":\"j\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{}}");
    iw_buf b;
    json_t *out = outbound(job, "client-x", timestamps[_i].wall_ms, &b);
    json_t *info;

    buf_free(&b);
    info = json_object_get(out, "client_info");
    ck_assert(json_is_object(info));
    ck_assert_uint_eq(json_object_size(info), 2);
    ck_assert_str_eq(json_string_value(json_object_get(info, "client_id")), "client-x");
    ck_assert_str_eq(json_string_value(json_object_get(info, "timestamp")),
                     timestamps[_i].timestamp);
    json_decref(out);
    json_decref(job);
}
END_TEST

/* ---------------------------------------------------------------------------
 * transform_inbound
 * ------------------------------------------------------------------------ */

START_TEST(inbound_spec_example)
{
    json_t *ext = parse("{\"id\":\"abc123\",\"ext_name\":\"Example\",\"ext_status\":\"ACTIVE\","
                        "\"ext_data\":{\"field_one\":\"value1\",\"field_two\":42}}");
    iw_error err = {0};
    json_t *ours = transform_inbound(ext, &err);

    ck_assert_msg(ours != NULL, "%s", err.msg);
    assert_json_eq(ours, "{\"externalId\":\"abc123\",\"name\":\"Example\",\"status\":\"active\","
                         "\"details\":{\"fieldOne\":\"value1\",\"fieldTwo\":42}}");
    ck_assert_uint_eq(json_object_size(ours), 4);
    ck_assert(json_is_integer(json_object_get(json_object_get(ours, "details"), "fieldTwo")));
    json_decref(ours);
    json_decref(ext);
}
END_TEST

static const struct {
    const char *ext_status;
    const char *status;
} statuses[] = {
    {"ACTIVE", "active"},    {"active", "inactive"},  {"INACTIVE", "inactive"},
    {"", "inactive"},        {"Active", "inactive"},  {"ACTIVE ", "inactive"},
    {"PENDING", "inactive"}, {"DELETED", "inactive"},
};

START_TEST(inbound_status_mapping)
{
    char text[256];
    iw_error err = {0};
    json_t *ext, *ours;

    snprintf(text, sizeof text,
             "{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"%s\","
             "\"ext_data\":{\"field_one\":\"f\",\"field_two\":1}}",
             statuses[_i].ext_status);
    ext = parse(text);
    ours = transform_inbound(ext, &err);
    ck_assert_msg(ours != NULL, "%s", err.msg);
    ck_assert_str_eq(json_string_value(json_object_get(ours, "status")), statuses[_i].status);
    json_decref(ours);
    json_decref(ext);
}
END_TEST

START_TEST(inbound_field_two_kinds)
{
    iw_error err = {0};
    json_t *ext, *ours, *two;

    ext = parse("{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\","
                "\"ext_data\":{\"field_one\":\"f\",\"field_two\":2.75}}");
    ours = transform_inbound(ext, &err);
    ck_assert_ptr_nonnull(ours);
    two = json_object_get(json_object_get(ours, "details"), "fieldTwo");
    ck_assert(json_is_real(two));
    ck_assert_double_eq(json_real_value(two), 2.75);
    json_decref(ours);
    json_decref(ext);

    ext = parse("{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\","
                "\"ext_data\":{\"field_one\":\"f\",\"field_two\":-9007199254740993}}");
    ours = transform_inbound(ext, &err);
    ck_assert_ptr_nonnull(ours);
    two = json_object_get(json_object_get(ours, "details"), "fieldTwo");
    ck_assert(json_is_integer(two));
    ck_assert(json_integer_value(two) == -9007199254740993LL);
    json_decref(ours);
    json_decref(ext);
}
END_TEST

/* Members the mapping does not name are dropped, not copied. */
START_TEST(inbound_extra_members_dropped)
{
    json_t *ext = parse("{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\",\"extra\":1,"
                        "\"ext_data\":{\"field_one\":\"f\",\"field_two\":0,\"field_three\":3}}");
    iw_error err = {0};
    json_t *ours = transform_inbound(ext, &err);

    ck_assert_ptr_nonnull(ours);
    assert_json_eq(ours, "{\"externalId\":\"x\",\"name\":\"n\",\"status\":\"active\","
                         "\"details\":{\"fieldOne\":\"f\",\"fieldTwo\":0}}");
    json_decref(ours);
    json_decref(ext);
}
END_TEST

/* The answer owns its values: it survives the provider's body. */
START_TEST(inbound_result_independent)
{
    json_t *ext = parse("{\"id\":\"abc\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\","
                        "\"ext_data\":{\"field_one\":\"f\",\"field_two\":5}}");
    json_t *copy = json_deep_copy(ext);
    iw_error err = {0};
    json_t *ours = transform_inbound(ext, &err);

    ck_assert_ptr_nonnull(ours);
    ck_assert(json_equal(ext, copy));
    json_decref(ext);
    json_decref(copy);
    ck_assert_str_eq(json_string_value(json_object_get(ours, "externalId")), "abc");
    ck_assert_int_eq(
        json_integer_value(json_object_get(json_object_get(ours, "details"), "fieldTwo")), 5);
    json_decref(ours);
}
END_TEST

static const struct {
    const char *body;
    const char *field; /* the message must name it */
} malformed[] = {
    {"[]", "body"},
    {"\"text\"", "body"},
    {"42", "body"},
    {"null", "body"},
    {"{}", "id"},
    {"{\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\","
     "\"ext_data\":{\"field_one\":\"f\",\"field_two\":1}}",
     "id"},
    {"{\"id\":7,\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\","
     "\"ext_data\":{\"field_one\":\"f\",\"field_two\":1}}",
     "id"},
    {"{\"id\":\"x\",\"ext_name\":5,\"ext_status\":\"ACTIVE\","
     "\"ext_data\":{\"field_one\":\"f\",\"field_two\":1}}",
     "ext_name"},
    {"{\"id\":\"x\",\"ext_status\":\"ACTIVE\","
     "\"ext_data\":{\"field_one\":\"f\",\"field_two\":1}}",
     "ext_name"},
    {"{\"id\":\"x\",\"ext_name\":\"n\","
     "\"ext_data\":{\"field_one\":\"f\",\"field_two\":1}}",
     "ext_status"},
    {"{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":true,"
     "\"ext_data\":{\"field_one\":\"f\",\"field_two\":1}}",
     "ext_status"},
    {"{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\"}", "ext_data"},
    {"{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\",\"ext_data\":[]}", "ext_data"},
    {"{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\",\"ext_data\":null}", "ext_data"},
    {"{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\",\"ext_data\":\"s\"}", "ext_data"},
    {"{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\","
     "\"ext_data\":{\"field_two\":1}}",
     "field_one"},
    {"{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\","
     "\"ext_data\":{\"field_one\":1,\"field_two\":1}}",
     "field_one"},
    {"{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\","
     "\"ext_data\":{\"field_one\":\"f\",\"field_two\":\"1\"}}",
     "field_two"},
    {"{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\","
     "\"ext_data\":{\"field_one\":\"f\"}}",
     "field_two"},
    {"{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\","
     "\"ext_data\":{\"field_one\":\"f\",\"field_two\":null}}",
     "field_two"},
    {"{\"id\":\"x\",\"ext_name\":\"n\",\"ext_status\":\"ACTIVE\","
     "\"ext_data\":{\"field_one\":\"f\",\"field_two\":true}}",
     "field_two"},
    /* the spec's Operation 1 example shape is not the inbound mapping's */
    {"{\"id\":\"abc123\",\"name\":\"Example\",\"status\":\"ACTIVE\"}", "ext_name"},
};

START_TEST(inbound_malformed)
{
    json_t *ext = parse(malformed[_i].body);
    iw_error err = {0};
    json_t *ours = transform_inbound(ext, &err);

    ck_assert_msg(ours == NULL, "%s accepted", malformed[_i].body);
    ck_assert_int_eq(err.status, IW_ERR_JSON);
    ck_assert_msg(strstr(err.msg, malformed[_i].field) != NULL, "%s: message '%s' lacks '%s'",
                  malformed[_i].body, err.msg, malformed[_i].field);
    ck_assert_ptr_null(strchr(err.msg, '\n'));
    json_decref(ext);
}
END_TEST

START_TEST(inbound_null_and_null_err)
{
    iw_error err = {0};
    json_t *ext = parse("{}");

    ck_assert_ptr_null(transform_inbound(NULL, &err));
    ck_assert_int_eq(err.status, IW_ERR_JSON);
    ck_assert_ptr_null(transform_inbound(ext, NULL));
    json_decref(ext);
}
END_TEST

static Suite *transform_suite(void)
{
    Suite *s = suite_create("transform");
    TCase *tc;

    tc = tcase_create("outbound");
    tcase_add_test(tc, outbound_mapping);
    tcase_add_test(tc, outbound_borrows_job);
    tcase_add_loop_test(tc, outbound_timestamp, 0, sizeof timestamps / sizeof timestamps[0]);
    suite_add_tcase(s, tc);

    tc = tcase_create("inbound");
    tcase_add_test(tc, inbound_spec_example);
    tcase_add_loop_test(tc, inbound_status_mapping, 0, sizeof statuses / sizeof statuses[0]);
    tcase_add_test(tc, inbound_field_two_kinds);
    tcase_add_test(tc, inbound_extra_members_dropped);
    tcase_add_test(tc, inbound_result_independent);
    tcase_add_loop_test(tc, inbound_malformed, 0, sizeof malformed / sizeof malformed[0]);
    tcase_add_test(tc, inbound_null_and_null_err);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(transform_suite());

    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
