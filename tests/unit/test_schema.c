/* The schema module: the official JSON Schema Test Suite (draft7) for every
 * keyword we claim, our own messages, refusals, caps, and the project's
 * schemas in schemas/. */
#include <check.h>
#include <dirent.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "schema.h"

#define SUITE_DIR_DEFAULT "/usr/share/json-schema-test-suite/tests/draft7"

/* ---------------------------------------------------------------------------
 * The official test suite
 * ------------------------------------------------------------------------ */

/* One file per keyword schema.h claims (plus default.json, which checks that
 * an annotation does not validate). */
static const char *const suite_files[] = {
    "boolean_schema",
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "minProperties",
    "maxProperties",
    "propertyNames",
    "dependencies",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "items",
    "additionalItems",
    "minItems",
    "maxItems",
    "uniqueItems",
    "contains",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if-then-else",
    "definitions",
    "ref",
    "default",
};
#define N_SUITE_FILES (sizeof suite_files / sizeof suite_files[0])

/* Cases whose schema the validator refuses at load time, by design.  They
 * are not ignored: each must be refused with this status and a message
 * containing `message`, and an entry that matches no case fails the test, so
 * the table cannot go stale. */
static const struct skip {
    const char *file;
    const char *description; /* the case's description, exactly */
    int status;
    const char *message;
    const char *reason;
} skips[] = {
    {"definitions", "valid definition", IW_ERR_SCHEMA_UNSUPPORTED,
     "http://json-schema.org/draft-07/schema#", "remote $ref (the draft-07 meta-schema)"},
    {"definitions", "invalid definition", IW_ERR_SCHEMA_UNSUPPORTED,
     "http://json-schema.org/draft-07/schema#", "remote $ref (the draft-07 meta-schema)"},
    {"ref", "remote ref, containing refs itself", IW_ERR_SCHEMA_UNSUPPORTED,
     "http://json-schema.org/draft-07/schema#", "remote $ref (the draft-07 meta-schema)"},
    {"ref", "Recursive references between schemas", IW_ERR_SCHEMA_UNSUPPORTED, "\"$id\"",
     "$id-based resolution (a nested $id changes the base URI of $ref \"node\")"},
    {"properties", "properties, patternProperties, additionalProperties interaction",
     IW_ERR_SCHEMA_UNSUPPORTED, "\"patternProperties\"", "patternProperties is not supported"},
    {"additionalProperties", "additionalProperties being false does not allow other properties",
     IW_ERR_SCHEMA_UNSUPPORTED, "\"patternProperties\"", "patternProperties is not supported"},
    {"additionalProperties", "non-ASCII pattern with additionalProperties",
     IW_ERR_SCHEMA_UNSUPPORTED, "\"patternProperties\"", "patternProperties is not supported"},
};
#define N_SKIPS (sizeof skips / sizeof skips[0])

static const struct skip *find_skip(const char *file, const char *description)
{
    for (size_t i = 0; i < N_SKIPS; i++)
        if (strcmp(skips[i].file, file) == 0 && strcmp(skips[i].description, description) == 0)
            return &skips[i];
    return NULL;
}

static const char *suite_dir(void)
{
    const char *dir = getenv("IW_JSON_SCHEMA_TEST_SUITE");
    return dir && *dir ? dir : SUITE_DIR_DEFAULT;
}

/* Runs one case whose schema compiles; returns the number of wrong answers. */
static size_t run_case(const char *file, const json_t *c, const iw_schema *s, size_t *passed)
{
    size_t failures = 0, i;
    json_t *test;
    json_array_foreach(json_object_get(c, "tests"), i, test)
    {
        iw_error err = {0};
        bool expected = json_is_true(json_object_get(test, "valid"));
        int rc = schema_validate(s, json_object_get(test, "data"), &err);
        bool ok = expected ? rc == IW_OK
                           : rc == IW_ERR_SCHEMA && err.msg[0] == '/' && strstr(err.msg, ": ");
        if (ok) {
            (*passed)++;
            continue;
        }
        failures++;
        fprintf(stderr, "FAIL draft7/%s.json: \"%s\" / \"%s\": expected %s, got %d (%s)\n", file,
                json_string_value(json_object_get(c, "description")),
                json_string_value(json_object_get(test, "description")),
                expected ? "valid" : "invalid", rc, rc == IW_OK ? "valid" : err.msg);
    }
    return failures;
}

START_TEST(test_official_suite)
{
    const char *file = suite_files[_i];
    char path[4096];
    json_error_t jerr;
    snprintf(path, sizeof path, "%s/%s.json", suite_dir(), file);
    json_t *cases = json_load_file(path, 0, &jerr);
    ck_assert_msg(cases != NULL, "cannot load %s (json-schema-test-suite installed?): %s", path,
                  jerr.text);
    ck_assert(json_is_array(cases) && json_array_size(cases) > 0);

    size_t failures = 0, passed = 0, tests = 0, refused = 0, refused_tests = 0, i;
    size_t expected_refusals = 0;
    for (size_t k = 0; k < N_SKIPS; k++)
        expected_refusals += strcmp(skips[k].file, file) == 0;

    json_t *c;
    json_array_foreach(cases, i, c)
    {
        const char *description = json_string_value(json_object_get(c, "description"));
        const struct skip *skip = find_skip(file, description);
        iw_error err = {0};
        iw_schema *s = schema_new(json_object_get(c, "schema"), &err);
        size_t ntests = json_array_size(json_object_get(c, "tests"));
        if (skip) {
            if (s || err.status != skip->status || !strstr(err.msg, skip->message)) {
                failures++;
                fprintf(stderr, "FAIL draft7/%s.json: \"%s\" should be refused (%s), got %s\n",
                        file, description, skip->reason, s ? "a schema" : err.msg);
            } else {
                refused++;
                refused_tests += ntests;
            }
        } else if (!s) {
            failures++;
            fprintf(stderr, "FAIL draft7/%s.json: \"%s\" does not compile: %s\n", file, description,
                    err.msg);
        } else {
            tests += ntests;
            failures += run_case(file, c, s, &passed);
        }
        schema_free(s);
    }
    printf("draft7/%-25s %2zu cases: %3zu/%3zu tests passed; refused per the skip table: %zu "
           "cases (%zu tests)\n",
           file, json_array_size(cases), passed, tests, refused, refused_tests);
    json_decref(cases);
    ck_assert_msg(failures == 0, "draft7/%s.json: %zu failures (details on stderr)", file,
                  failures);
    ck_assert_msg(refused == expected_refusals, "draft7/%s.json: skip table entries unused", file);
}
END_TEST

/* Every skip table entry names a file we run. */
START_TEST(test_skip_table_files)
{
    for (size_t k = 0; k < N_SKIPS; k++) {
        bool known = false;
        for (size_t f = 0; f < N_SUITE_FILES; f++)
            known = known || strcmp(skips[k].file, suite_files[f]) == 0;
        ck_assert_msg(known, "skip table names %s, which is not run", skips[k].file);
    }
}
END_TEST

/* ---------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------ */

static json_t *parse(const char *text)
{
    json_error_t jerr;
    json_t *j = json_loads(text, JSON_DECODE_ANY, &jerr);
    ck_assert_msg(j != NULL, "test JSON does not parse: %s: %s", text, jerr.text);
    return j;
}

static iw_schema *compile(const char *text)
{
    iw_error err = {0};
    json_t *doc = parse(text);
    iw_schema *s = schema_new(doc, &err);
    json_decref(doc); /* the schema keeps its own reference */
    ck_assert_msg(s != NULL, "schema %s does not compile: %s", text, err.msg);
    return s;
}

/* Validates instance text; returns the status and leaves the message in err. */
static int check(const iw_schema *s, const char *instance, iw_error *err)
{
    json_t *j = parse(instance);
    memset(err, 0, sizeof *err);
    int rc = schema_validate(s, j, err);
    json_decref(j);
    return rc;
}

static iw_schema *load_project_schema(const char *name)
{
    char path[4096];
    iw_error err = {0};
    snprintf(path, sizeof path, "%s/schemas/%s", IW_SOURCE_DIR, name);
    iw_schema *s = schema_load_file(path, &err);
    ck_assert_msg(s != NULL, "%s: %s", path, err.msg);
    return s;
}

/* ---------------------------------------------------------------------------
 * Messages: the instance location as a JSON pointer, then the rule
 * ------------------------------------------------------------------------ */

START_TEST(test_messages_submission_job)
{
    iw_schema *s = load_project_schema("submission-job.schema.json");
    iw_error err;
    char long_id[200];
    char doc[512];
    memset(long_id, 'x', 129);
    long_id[129] = '\0';
    snprintf(doc, sizeof doc, "{\"jobId\":\"%s\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{}}",
             long_id);
    ck_assert_int_eq(check(s, doc, &err), IW_ERR_SCHEMA);
    ck_assert_str_eq(err.msg, "/jobId: string longer than maxLength 128");
    ck_assert_int_eq(err.status, IW_ERR_SCHEMA);

    ck_assert_int_eq(check(s, "{\"jobId\":\"j\",\"action\":\"a\",\"payload\":{}}", &err),
                     IW_ERR_SCHEMA);
    ck_assert_str_eq(err.msg, "/: missing required property \"userId\"");

    ck_assert_int_eq(
        check(s,
              "{\"jobId\":\"j\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{},\"priority\":"
              "\"urgent\"}",
              &err),
        IW_ERR_SCHEMA);
    ck_assert_str_eq(err.msg, "/priority: value is not one of [\"critical\",\"normal\"]");

    ck_assert_int_eq(
        check(s, "{\"jobId\":5,\"userId\":\"u\",\"action\":\"a\",\"payload\":{}}", &err),
        IW_ERR_SCHEMA);
    ck_assert_str_eq(err.msg, "/jobId: expected string, got integer");

    ck_assert_int_eq(check(s,
                           "{\"jobId\":\"j\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{},"
                           "\"extra\":[1]}",
                           &err),
                     IW_OK);
    schema_free(s);
}
END_TEST

START_TEST(test_messages_pointer)
{
    iw_error err;
    iw_schema *s =
        compile("{\"properties\":{\"a/b\":{\"properties\":{\"c~d\":{\"type\":\"string\"}}},"
                "\"list\":{\"items\":{\"type\":\"integer\"}}}}");
    ck_assert_int_eq(check(s, "{\"a/b\":{\"c~d\":1}}", &err), IW_ERR_SCHEMA);
    ck_assert_str_eq(err.msg, "/a~1b/c~0d: expected string, got integer");
    ck_assert_int_eq(check(s, "{\"list\":[1,2,\"x\"]}", &err), IW_ERR_SCHEMA);
    ck_assert_str_eq(err.msg, "/list/2: expected integer, got string");
    schema_free(s);

    /* keys are escaped, so a message stays one printable line */
    s = compile("{\"additionalProperties\":false}");
    ck_assert_int_eq(check(s, "{\"a\\nb\":1}", &err), IW_ERR_SCHEMA);
    ck_assert_str_eq(err.msg, "/a\\x0ab: additional property not allowed");
    schema_free(s);
}
END_TEST

/* Every rule's wording, with the pointer it reports. */
static const struct message_case {
    const char *schema, *instance, *message;
} message_cases[] = {
    {"false", "1", "/: no value is allowed here (schema false)"},
    {"{\"type\":[\"string\",\"null\"]}", "1.5", "/: expected null or string, got number"},
    {"{\"const\":{\"a\":[1]}}", "{\"a\":[2]}", "/: value does not equal const {\"a\":[1]}"},
    {"{\"minProperties\":1}", "{}", "/: object has 0 properties, fewer than minProperties 1"},
    {"{\"maxProperties\":1}", "{\"a\":1,\"b\":2}",
     "/: object has 2 properties, more than maxProperties 1"},
    {"{\"dependencies\":{\"a\":[\"b\"]}}", "{\"a\":1}",
     "/: property \"a\" requires property \"b\" (dependencies)"},
    {"{\"dependencies\":{\"a\":{\"required\":[\"c\"]}}}", "{\"a\":1}",
     "/: missing required property \"c\""},
    {"{\"propertyNames\":{\"maxLength\":3}}", "{\"ab\":1,\"abcd\":2}",
     "/: property name \"abcd\": string longer than maxLength 3"},
    {"{\"minLength\":2}", "\"\\u00e9\"", "/: string shorter than minLength 2"},
    {"{\"maxLength\":3}", "\"\\u00e9\\u00e9\\u00e9\\u00e9\"", "/: string longer than maxLength 3"},
    {"{\"minimum\":10}", "5", "/: value 5 is less than minimum 10"},
    {"{\"maximum\":1.5}", "2", "/: value 2 is greater than maximum 1.5"},
    {"{\"exclusiveMinimum\":0}", "0", "/: value 0 is not greater than exclusiveMinimum 0"},
    {"{\"exclusiveMaximum\":1.5}", "1.5", "/: value 1.5 is not less than exclusiveMaximum 1.5"},
    {"{\"multipleOf\":0.5}", "1.25", "/: value 1.25 is not a multiple of 0.5"},
    {"{\"minItems\":2}", "[1]", "/: array has 1 items, fewer than minItems 2"},
    {"{\"maxItems\":1}", "[1,2]", "/: array has 2 items, more than maxItems 1"},
    {"{\"items\":[{\"type\":\"integer\"}],\"additionalItems\":false}", "[1,2]",
     "/1: additional item not allowed (additionalItems)"},
    {"{\"items\":[{}],\"additionalItems\":{\"type\":\"string\"}}", "[1,2]",
     "/1: expected string, got integer"},
    {"{\"uniqueItems\":true}", "[1,2,1.0]", "/: array items 0 and 2 are equal (uniqueItems)"},
    {"{\"contains\":{\"const\":3}}", "[1]", "/: no array item matches the contains subschema"},
    {"{\"allOf\":[{},{\"properties\":{\"a\":{\"type\":\"null\"}}}]}", "{\"a\":1}",
     "/a: expected null, got integer"},
    {"{\"anyOf\":[{\"type\":\"string\"},{\"type\":\"null\"}]}", "5",
     "/: matches none of the 2 anyOf subschemas (subschema 0: /: expected string, got integer)"},
    {"{\"oneOf\":[{\"type\":\"integer\"},{\"minimum\":0}]}", "5",
     "/: matches oneOf subschemas 0 and 1, but must match exactly one"},
    {"{\"not\":{\"type\":\"string\"}}", "\"x\"", "/: value matches the \"not\" subschema"},
    {"{\"if\":{\"type\":\"integer\"},\"then\":{\"minimum\":0},\"else\":{\"type\":\"string\"}}",
     "-1", "/: value -1 is less than minimum 0"},
    {"{\"if\":{\"type\":\"integer\"},\"then\":{\"minimum\":0},\"else\":{\"type\":\"string\"}}",
     "null", "/: expected string, got null"},
    {"{\"definitions\":{\"id\":{\"maxLength\":2}},\"properties\":{\"x\":{\"$ref\":\"#/"
     "definitions/id\"}}}",
     "{\"x\":\"abc\"}", "/x: string longer than maxLength 2"},
};

START_TEST(test_messages_rules)
{
    const struct message_case *mc = &message_cases[_i];
    iw_schema *s = compile(mc->schema);
    iw_error err;
    ck_assert_int_eq(check(s, mc->instance, &err), IW_ERR_SCHEMA);
    ck_assert_str_eq(err.msg, mc->message);
    schema_free(s);
}
END_TEST

/* A message cut short stays valid UTF-8 (it ends up in JSON log lines),
 * whichever byte of a character the cut falls on. */
static const char *const truncation_cases[][2] = {
    {"{\"additionalProperties\":false}", "{\"x%s\":1}"},
    {"{\"additionalProperties\":false}", "{\"xy%s\":1}"},
    {"{\"properties\":{\"a\":{\"properties\":{\"b\":{\"additionalProperties\":false}}}}}",
     "{\"a\":{\"b\":{\"xyz%s\":1}}}"},
    {"{\"propertyNames\":{\"maxLength\":1}}", "{\"x%s\":1}"},
    {"{\"propertyNames\":{\"maxLength\":1}}", "{\"xy%s\":1}"},
    {"{\"anyOf\":[{\"additionalProperties\":false},false]}", "{\"xyz%s\":1}"},
};

START_TEST(test_messages_truncated_utf8)
{
    char key[1300] = "", doc[1400];
    for (int i = 0; i < 200; i++)
        strcat(key, "\xe2\x82\xac"); /* a three-byte character */
    snprintf(doc, sizeof doc, truncation_cases[_i][1], key);
    iw_schema *s = compile(truncation_cases[_i][0]);
    iw_error err;
    ck_assert_int_eq(check(s, doc, &err), IW_ERR_SCHEMA);
    json_t *as_json = json_string(err.msg);
    ck_assert_msg(as_json != NULL, "message is not valid UTF-8: %s", err.msg);
    ck_assert_msg(strstr(err.msg, "...") != NULL, "%s", err.msg);
    json_decref(as_json);
    schema_free(s);

    /* the same for compilation messages, which quote the schema location */
    char schema[1400];
    snprintf(schema, sizeof schema, "{\"properties\":{\"%.*s%s\":{\"bogus\":1}}}", (int)_i,
             "xyzxyz", key);
    json_t *bad = parse(schema);
    ck_assert_ptr_null(schema_new(bad, &err));
    ck_assert_int_eq(err.status, IW_ERR_SCHEMA_UNSUPPORTED);
    as_json = json_string(err.msg);
    ck_assert_msg(as_json != NULL, "message is not valid UTF-8: %s", err.msg);
    json_decref(as_json);
    json_decref(bad);
}
END_TEST

/* ---------------------------------------------------------------------------
 * Numbers: exact comparisons and equality across integer and real
 * ------------------------------------------------------------------------ */

static const struct verdict_case {
    const char *schema, *instance;
    bool valid;
} number_cases[] = {
    {"{\"const\":1}", "1.0", true},
    {"{\"enum\":[{\"a\":[1.0]}]}", "{\"a\":[1]}", true},
    {"{\"type\":\"integer\"}", "1.0", true},
    {"{\"type\":\"integer\"}", "1.5", false},
    {"{\"type\":\"number\"}", "1", true},
    /* 2^53 + 1 has no double: comparing as doubles would call these equal */
    {"{\"const\":9007199254740993}", "9007199254740992.0", false},
    {"{\"maximum\":9007199254740992.0}", "9007199254740993", false},
    {"{\"maximum\":9223372036854775807}", "9223372036854775807", true},
    {"{\"maximum\":9223372036854775807}", "9.3e18", false},
    {"{\"minimum\":-9223372036854775808}", "-9.3e18", false},
    {"{\"exclusiveMaximum\":0.5}", "0", true},
    {"{\"multipleOf\":3}", "9007199254740993", true},
    {"{\"multipleOf\":3}", "9007199254740994", false},
    {"{\"multipleOf\":0.0001}", "0.0075", true},
    {"{\"multipleOf\":0.0001}", "0.00751", false},
    {"{\"multipleOf\":0.1}", "0.3", true},
    {"{\"multipleOf\":1}", "1.0000000001", false},
    {"{\"multipleOf\":0.5}", "1e308", true},
    {"{\"uniqueItems\":true}", "[1, 1.5, \"1\", [1], {\"1\":1}]", true},
    {"{\"uniqueItems\":true}", "[{\"a\":1,\"b\":2}, {\"b\":2,\"a\":1.0}]", false},
    /* format is an annotation */
    {"{\"format\":\"date-time\"}", "\"not a date\"", true},
    /* code points, not bytes: three é are six bytes */
    {"{\"maxLength\":3}", "\"\\u00e9\\u00e9\\u00e9\"", true},
    {"{\"maxLength\":1}", "\"\\ud83d\\udca9\"", true},
    /* siblings of $ref do not apply (draft-07 section 8.3) */
    {"{\"definitions\":{\"a\":{}},\"properties\":{\"x\":{\"$ref\":\"#/definitions/a\","
     "\"type\":\"string\"}}}",
     "{\"x\":1}", true},
    /* a $ref into an array and one through percent-encoding */
    {"{\"items\":[{\"type\":\"integer\"},{\"$ref\":\"#/items/0\"}]}", "[1,\"x\"]", false},
    {"{\"definitions\":{\"a b\":{\"type\":\"null\"}},\"$ref\":\"#/definitions/a%20b\"}", "null",
     true},
    {"{\"definitions\":{\"a b\":{\"type\":\"null\"}},\"$ref\":\"#/definitions/a%20b\"}", "0",
     false},
};

START_TEST(test_verdicts)
{
    const struct verdict_case *vc = &number_cases[_i];
    iw_schema *s = compile(vc->schema);
    iw_error err;
    int rc = check(s, vc->instance, &err);
    ck_assert_msg(vc->valid ? rc == IW_OK : rc == IW_ERR_SCHEMA, "%s against %s: got %d (%s)",
                  vc->instance, vc->schema, rc, rc ? err.msg : "valid");
    schema_free(s);
}
END_TEST

/* ---------------------------------------------------------------------------
 * Refusals at load time
 * ------------------------------------------------------------------------ */

static const struct refusal_case {
    const char *schema;
    int status;
    const char *message;
} refusal_cases[] = {
    /* keywords we do not implement, and anything else no keyword claims */
    {"{\"pattern\":\"^a\"}", IW_ERR_SCHEMA_UNSUPPORTED, "unsupported keyword \"pattern\" at #"},
    {"{\"patternProperties\":{\"^a\":{}}}", IW_ERR_SCHEMA_UNSUPPORTED, "\"patternProperties\""},
    {"{\"contentMediaType\":\"application/json\"}", IW_ERR_SCHEMA_UNSUPPORTED,
     "\"contentMediaType\""},
    {"{\"unevaluatedProperties\":false}", IW_ERR_SCHEMA_UNSUPPORTED, "\"unevaluatedProperties\""},
    {"{\"$defs\":{}}", IW_ERR_SCHEMA_UNSUPPORTED, "\"$defs\""},
    {"{\"x-vendor\":1}", IW_ERR_SCHEMA_UNSUPPORTED, "\"x-vendor\""},
    {"{\"properties\":{\"jobId\":{\"type\":\"string\",\"maxLenght\":3}}}",
     IW_ERR_SCHEMA_UNSUPPORTED, "unsupported keyword \"maxLenght\" at #/properties/jobId"},
    {"{\"if\":{\"items\":[{\"bogus\":1}]}}", IW_ERR_SCHEMA_UNSUPPORTED, "#/if/items/0"},
    {"{\"definitions\":{\"unused\":{\"pattern\":\"x\"}}}", IW_ERR_SCHEMA_UNSUPPORTED,
     "#/definitions/unused"},
    /* references we cannot follow */
    {"{\"$ref\":\"http://example.com/s.json\"}", IW_ERR_SCHEMA_UNSUPPORTED,
     "\"http://example.com/s.json\""},
    {"{\"properties\":{\"a\":{\"$ref\":\"other.json#/definitions/a\"}}}", IW_ERR_SCHEMA_UNSUPPORTED,
     "\"other.json#/definitions/a\""},
    {"{\"$ref\":\"#foo\"}", IW_ERR_SCHEMA_UNSUPPORTED, "\"#foo\""},
    {"{\"definitions\":{\"a\":{\"$id\":\"#a\"}}}", IW_ERR_SCHEMA_UNSUPPORTED,
     "\"$id\" in a subschema at #/definitions/a"},
    {"{\"$schema\":\"https://json-schema.org/draft/2020-12/schema\"}", IW_ERR_SCHEMA_UNSUPPORTED,
     "only draft-07"},
    /* malformed schemas */
    {"5", IW_ERR_JSON, "must be an object or a boolean"},
    {"{\"type\":5}", IW_ERR_JSON, "\"type\""},
    {"{\"type\":[]}", IW_ERR_JSON, "\"type\""},
    {"{\"type\":\"float\"}", IW_ERR_JSON, "\"type\""},
    {"{\"type\":[\"string\",\"string\"]}", IW_ERR_JSON, "\"type\""},
    {"{\"properties\":{\"jobId\":{\"maxLength\":-1}}}", IW_ERR_JSON,
     "at #/properties/jobId: \"maxLength\" must be a non-negative integer"},
    {"{\"minLength\":1.5}", IW_ERR_JSON, "\"minLength\""},
    {"{\"maxItems\":\"3\"}", IW_ERR_JSON, "\"maxItems\""},
    {"{\"minimum\":\"0\"}", IW_ERR_JSON, "\"minimum\""},
    {"{\"multipleOf\":0}", IW_ERR_JSON, "\"multipleOf\""},
    {"{\"required\":[1]}", IW_ERR_JSON, "\"required\""},
    {"{\"properties\":[]}", IW_ERR_JSON, "\"properties\""},
    {"{\"properties\":{\"a\":1}}", IW_ERR_JSON, "\"properties\""},
    {"{\"allOf\":[]}", IW_ERR_JSON, "\"allOf\""},
    {"{\"anyOf\":[{}, 2]}", IW_ERR_JSON, "\"anyOf\""},
    {"{\"items\":3}", IW_ERR_JSON, "\"items\""},
    {"{\"enum\":1}", IW_ERR_JSON, "\"enum\""},
    {"{\"uniqueItems\":1}", IW_ERR_JSON, "\"uniqueItems\""},
    {"{\"format\":1}", IW_ERR_JSON, "\"format\""},
    {"{\"not\":3}", IW_ERR_JSON, "\"not\""},
    {"{\"dependencies\":{\"a\":[1]}}", IW_ERR_JSON, "\"dependencies\""},
    {"{\"dependencies\":{\"a\":3}}", IW_ERR_JSON, "\"dependencies\""},
    {"{\"$ref\":1}", IW_ERR_JSON, "\"$ref\""},
    {"{\"$ref\":\"#/definitions/missing\"}", IW_ERR_JSON, "does not resolve"},
    {"{\"items\":[{}],\"properties\":{\"a\":{\"$ref\":\"#/items/01\"}}}", IW_ERR_JSON,
     "does not resolve"},
    {"{\"properties\":{\"a\":{\"$ref\":\"#/required\"}},\"required\":[]}", IW_ERR_JSON,
     "must be an object or a boolean"},
    {"{\"$ref\":\"#/a%zz\"}", IW_ERR_JSON, "percent-escape"},
    {"{\"$ref\":\"#/a~2\"}", IW_ERR_JSON, "~ escape"},
    {"{\"$ref\":\"#\"}", IW_ERR_JSON, "loops back to itself"},
    {"{\"definitions\":{\"a\":{\"$ref\":\"#/definitions/b\"},\"b\":{\"$ref\":\"#/definitions/a\"}},"
     "\"$ref\":\"#/definitions/a\"}",
     IW_ERR_JSON, "loops back to itself"},
};

START_TEST(test_refusals)
{
    const struct refusal_case *rc = &refusal_cases[_i];
    iw_error err = {0};
    json_t *doc = parse(rc->schema);
    iw_schema *s = schema_new(doc, &err);
    json_decref(doc);
    ck_assert_msg(s == NULL, "schema %s compiled", rc->schema);
    ck_assert_msg(err.status == rc->status, "schema %s: status %d, want %d (%s)", rc->schema,
                  err.status, rc->status, err.msg);
    ck_assert_msg(strstr(err.msg, rc->message) != NULL, "schema %s: message \"%s\" lacks \"%s\"",
                  rc->schema, err.msg, rc->message);
}
END_TEST

START_TEST(test_annotations_accepted)
{
    iw_schema *s = compile(
        "{\"$schema\":\"http://json-schema.org/draft-07/schema#\",\"$id\":\"https://x.test/"
        "a.json\","
        "\"title\":\"t\",\"description\":\"d\",\"$comment\":\"c\",\"default\":1,\"examples\":[1],"
        "\"readOnly\":true,\"writeOnly\":false,\"format\":\"date-time\","
        "\"properties\":{\"a\":{\"title\":\"a\",\"format\":\"uri\"}}}");
    iw_error err;
    ck_assert_int_eq(check(s, "{\"a\":\"not a uri\"}", &err), IW_OK);
    schema_free(s);
    /* a member that a $ref points into holds schemas: not an unknown keyword */
    s = compile("{\"my-defs\":{\"a\":{\"type\":\"null\"}},\"$ref\":\"#/my-defs/a\"}");
    schema_free(s);
    s = compile("{\"my-defs\":{\"a\":{\"type\":\"null\"}},\"properties\":{\"x\":{\"$ref\":\"#/"
                "my-defs/a\"}}}");
    ck_assert_int_eq(check(s, "{\"x\":1}", &err), IW_ERR_SCHEMA);
    ck_assert_str_eq(err.msg, "/x: expected null, got integer");
    schema_free(s);
}
END_TEST

START_TEST(test_null_arguments)
{
    iw_error err = {0};
    schema_free(NULL);
    ck_assert_ptr_null(schema_new(NULL, &err));
    ck_assert_int_eq(err.status, IW_ERR_INVALID);
    ck_assert_ptr_null(schema_new(NULL, NULL)); /* err is optional */
    iw_schema *s = compile("true");
    ck_assert_int_eq(schema_validate(s, NULL, &err), IW_ERR_INVALID);
    ck_assert_int_eq(schema_validate(NULL, json_null(), &err), IW_ERR_INVALID);
    ck_assert_int_eq(schema_validate(s, json_null(), NULL), IW_OK);
    schema_free(s);
    s = compile("false");
    ck_assert_int_eq(schema_validate(s, json_null(), NULL), IW_ERR_SCHEMA);
    schema_free(s);
}
END_TEST

/* A fuzz finding (tests/fuzz/corpus/schema/regress-del-in-dollar-schema): the
 * schema's own strings reached error messages raw; a DEL, CR or LF in
 * "$schema" or a "$ref" must come out escaped, as valid one-line UTF-8. */
START_TEST(test_messages_are_safe_text)
{
    static const char *const docs[] = {
        "{\"$schema\": \"http://js\\u007fn-schema.org/draft-07/schema#\"}",
        "{\"$schema\": \"a\\r\\nX-Injected: yes\"}",
        "{\"$ref\": \"#/definitions/\\u0001\\n\"}",
        "{\"const\": \"\\u0000\\n\", \"x-\\n\": 1}",
    };
    for (size_t i = 0; i < sizeof docs / sizeof docs[0]; i++) {
        json_error_t je;
        iw_error err = {0};
        json_t *doc = json_loads(docs[i], JSON_ALLOW_NUL, &je);
        ck_assert_msg(doc != NULL, "%s: %s", docs[i], je.text);
        iw_schema *s = schema_new(doc, &err);
        if (s) { /* const compiles: the failure message quotes it */
            json_t *inst = json_string("other");
            ck_assert_int_eq(schema_validate(s, inst, &err), IW_ERR_SCHEMA);
            json_decref(inst);
            schema_free(s);
        }
        ck_assert_msg(err.msg[0] != '\0', "no message for %s", docs[i]);
        for (const char *p = err.msg; *p; p++)
            ck_assert_msg((unsigned char)*p >= 0x20 && *p != 0x7f, "control byte in '%s'", err.msg);
        json_t *j = json_string(err.msg);
        ck_assert_msg(j != NULL, "not UTF-8: %s", err.msg);
        json_decref(j);
        json_decref(doc);
    }
}
END_TEST

/* ---------------------------------------------------------------------------
 * Depth caps
 * ------------------------------------------------------------------------ */

/* {"child": {"child": ... {}}} nested `levels` deep */
static json_t *nested_objects(int levels)
{
    json_t *j = json_object();
    for (int i = 0; i < levels; i++) {
        json_t *outer = json_object();
        json_object_set_new(outer, "child", j);
        j = outer;
    }
    return j;
}

static json_t *nested_arrays(int levels)
{
    json_t *j = json_array();
    for (int i = 0; i < levels; i++) {
        json_t *outer = json_array();
        json_array_append_new(outer, j);
        j = outer;
    }
    return j;
}

START_TEST(test_depth_cap_instance)
{
    iw_schema *s = compile("{\"type\":\"object\",\"properties\":{\"child\":{\"$ref\":\"#\"}}}");
    iw_error err = {0};
    json_t *shallow = nested_objects(10), *deep = nested_objects(5000);
    ck_assert_int_eq(schema_validate(s, shallow, &err), IW_OK);
    ck_assert_int_eq(schema_validate(s, deep, &err), IW_ERR_SCHEMA);
    ck_assert_msg(strstr(err.msg, "nested deeper than 64 levels") != NULL, "%s", err.msg);
    ck_assert_msg(strncmp(err.msg, "/child/child/", 13) == 0, "%s", err.msg);
    json_decref(shallow);
    json_decref(deep);
    schema_free(s);
}
END_TEST

/* Schemas that apply themselves to the same value forever are caught by the
 * cap, and the answer is a failure even under "not". */
static const char *const self_applying[] = {
    "{\"not\":{\"$ref\":\"#\"}}",
    "{\"allOf\":[{\"$ref\":\"#\"}]}",
    "{\"anyOf\":[{\"$ref\":\"#\"},true]}",
    "{\"oneOf\":[true,{\"$ref\":\"#\"}]}",
    "{\"if\":{\"$ref\":\"#\"}}",
    "{\"definitions\":{\"a\":{\"not\":{\"$ref\":\"#/definitions/b\"}},\"b\":{\"not\":{\"$ref\":\"#/"
    "definitions/a\"}}},\"$ref\":\"#/definitions/a\"}",
};

START_TEST(test_depth_cap_self_reference)
{
    iw_schema *s = compile(self_applying[_i]);
    iw_error err = {0};
    ck_assert_int_eq(schema_validate(s, json_null(), &err), IW_ERR_SCHEMA);
    ck_assert_msg(strstr(err.msg, "nested deeper than 64 levels") != NULL, "%s", err.msg);
    schema_free(s);
}
END_TEST

START_TEST(test_depth_cap_equality)
{
    iw_schema *s = compile("{\"uniqueItems\":true}");
    iw_error err = {0};
    json_t *pair = json_array();
    json_array_append_new(pair, nested_arrays(5000));
    json_array_append_new(pair, nested_arrays(5000));
    ck_assert_int_eq(schema_validate(s, pair, &err), IW_ERR_SCHEMA);
    ck_assert_msg(strstr(err.msg, "too deeply") != NULL, "%s", err.msg);
    json_decref(pair);
    schema_free(s);

    /* shallow enough to compare: a genuine verdict */
    s = compile("{\"uniqueItems\":true}");
    pair = json_array();
    json_array_append_new(pair, nested_arrays(20));
    json_array_append_new(pair, nested_arrays(21));
    ck_assert_int_eq(schema_validate(s, pair, &err), IW_OK);
    json_decref(pair);
    schema_free(s);
}
END_TEST

START_TEST(test_depth_cap_schema)
{
    json_t *doc = json_object();
    for (int i = 0; i < 5000; i++) {
        json_t *outer = json_object();
        json_object_set_new(outer, "not", doc);
        doc = outer;
    }
    iw_error err = {0};
    iw_schema *s = schema_new(doc, &err);
    ck_assert_ptr_null(s);
    ck_assert_int_eq(err.status, IW_ERR_SCHEMA_UNSUPPORTED);
    ck_assert_msg(strstr(err.msg, "nested deeper than 64 levels") != NULL, "%s", err.msg);
    json_decref(doc);
}
END_TEST

/* ---------------------------------------------------------------------------
 * schema_load_file
 * ------------------------------------------------------------------------ */

static char *write_temp(const char *text)
{
    char *path = strdup("/tmp/iw-test-schema-XXXXXX");
    ck_assert_ptr_nonnull(path);
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return path;
}

START_TEST(test_load_file)
{
    iw_error err = {0};
    ck_assert_ptr_null(schema_load_file("/nonexistent/iw/schema.json", &err));
    ck_assert_int_eq(err.status, IW_ERR_IO);

    static const char *const bad[] = {"{\"type\": ", "{\"type\":\"string\",\"type\":\"null\"}",
                                      "\"string\""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *path = write_temp(bad[i]);
        ck_assert_ptr_null(schema_load_file(path, &err));
        ck_assert_msg(err.status == IW_ERR_JSON, "%s: %s", bad[i], err.msg);
        unlink(path);
        free(path);
    }

    char *path = write_temp("{\"type\":\"string\"}");
    iw_schema *s = schema_load_file(path, &err);
    ck_assert_ptr_nonnull(s);
    ck_assert_int_eq(schema_validate(s, json_null(), &err), IW_ERR_SCHEMA);
    schema_free(s);
    unlink(path);
    free(path);
}
END_TEST

/* ---------------------------------------------------------------------------
 * The project's schemas: every file loads, has the right $id, and tells a
 * good example from a bad one.  A new schema without examples here fails.
 * ------------------------------------------------------------------------ */

static const struct example {
    const char *file;
    const char *good;
    const char *bad;
    const char *bad_message; /* exact */
} examples[] = {
    {"submission-job.schema.json",
     "{\"jobId\":\"job-1\",\"userId\":\"user-1\",\"action\":\"create\",\"payload\":{\"a\":1},"
     "\"priority\":\"critical\",\"traceId\":\"t\"}",
     "{\"jobId\":\"job-1\",\"userId\":\"user-1\",\"action\":\"create\",\"payload\":[]}",
     "/payload: expected object, got array"},
    {"provider-submit-request.schema.json",
     "{\"user_id\":\"user-1\",\"action_type\":\"create\",\"request_data\":{\"a\":1},"
     "\"client_info\":{\"client_id\":\"integration-worker\",\"timestamp\":\"2024-01-01T00:00:00Z\"}"
     "}",
     "{\"user_id\":\"user-1\",\"action_type\":\"create\",\"request_data\":{},"
     "\"client_info\":{\"client_id\":\"integration-worker\"}}",
     "/client_info: missing required property \"timestamp\""},
    {"provider-submit-response.schema.json",
     "{\"id\":\"def456\",\"status\":\"pending\",\"message\":\"queued\",\"trackingId\":\"track-"
     "789\"}",
     "{\"id\":\"def456\",\"status\":\"pending\",\"trackingId\":\"\"}",
     "/trackingId: string shorter than minLength 1"},
    {"provider-status-response.schema.json",
     "{\"trackingId\":\"track-789\",\"status\":\"completed\",\"result\":{\"x\":1}}",
     "{\"trackingId\":\"track-789\"}", "/: missing required property \"status\""},
    {"provider-resource-response.schema.json",
     "{\"id\":\"abc123\",\"ext_name\":\"Resource\",\"ext_status\":\"ACTIVE\","
     "\"ext_data\":{\"field_one\":\"v\",\"field_two\":2.5}}",
     "{\"id\":\"abc123\",\"ext_name\":\"Resource\",\"ext_status\":\"ACTIVE\","
     "\"ext_data\":{\"field_one\":\"v\",\"field_two\":\"2\"}}",
     "/ext_data/field_two: expected number, got string"},
    {"submission-accepted.schema.json",
     "{\"jobId\":\"job-1\",\"externalId\":\"def456\",\"trackingId\":\"track-789\","
     "\"status\":\"pending\",\"acceptedAt\":\"2024-01-01T00:00:00.123Z\"}",
     "{\"jobId\":\"job-1\",\"externalId\":\"def456\",\"trackingId\":\"track-789\","
     "\"status\":\"pending\"}",
     "/: missing required property \"acceptedAt\""},
    {"submission-failed.schema.json",
     "{\"jobId\":\"job-1\",\"error\":{\"code\":\"PROVIDER_4XX\",\"message\":\"bad request\","
     "\"statusCode\":400,\"retryAttempt\":1}}",
     "{\"jobId\":\"job-1\",\"error\":{\"code\":\"TIMEOUT\",\"message\":\"timed out\","
     "\"statusCode\":null,\"retryAttempt\":-1}}",
     "/error/retryAttempt: value -1 is less than minimum 0"},
    {"status-check.schema.json",
     "{\"jobId\":\"job-1\",\"trackingId\":\"track-789\",\"externalId\":\"def456\","
     "\"acceptedAt\":\"2024-01-01T00:00:00Z\",\"checks\":0,\"lastStatus\":null,"
     "\"priority\":\"normal\"}",
     "{\"jobId\":\"job-1\",\"trackingId\":\"track-789\",\"acceptedAt\":\"2024-01-01T00:00:00Z\","
     "\"checks\":1.5}",
     "/checks: expected integer, got number"},
    {"status-progress.schema.json",
     "{\"jobId\":\"job-1\",\"trackingId\":\"track-789\",\"status\":\"processing\",\"checks\":2}",
     "{\"jobId\":\"job-1\",\"trackingId\":\"track-789\",\"status\":\"processing\",\"checks\":2,"
     "\"extra\":1}",
     "/extra: additional property not allowed"},
    {"status-final.schema.json",
     "{\"jobId\":\"job-1\",\"trackingId\":\"track-789\",\"status\":\"completed\",\"checks\":3,"
     "\"acceptedAt\":\"2024-01-01T00:00:00Z\",\"finishedAt\":\"2024-01-01T00:01:00Z\","
     "\"result\":null}",
     "{\"jobId\":\"job-1\",\"trackingId\":\"track-789\",\"status\":\"completed\",\"checks\":3,"
     "\"acceptedAt\":\"2024-01-01T00:00:00Z\",\"finishedAt\":\"2024-01-01T00:01:00Z\"}",
     "/: missing required property \"result\""},
    {"resource-get.schema.json",
     "{\"id\":\"abc123\",\"expand\":\"details\",\"priority\":\"normal\"}",
     "{\"expand\":\"details\"}", "/: missing required property \"id\""},
    {"resource-invalidate.schema.json", "{\"id\":\"abc123\"}", "{\"id\":\"\"}",
     "/id: string shorter than minLength 1"},
    {"resource-invalidate-reply.schema.json", "{\"id\":\"abc123\",\"invalidated\":true}",
     "{\"id\":\"abc123\",\"invalidated\":false}", "/invalidated: value does not equal const true"},
    {"resource-reply.schema.json",
     "{\"id\":\"abc123\",\"found\":true,\"source\":\"provider\",\"data\":{\"externalId\":"
     "\"abc123\","
     "\"name\":\"Resource\",\"status\":\"active\",\"details\":{\"fieldOne\":\"v\",\"fieldTwo\":2}}"
     "}",
     "{\"id\":\"abc123\",\"found\":true,\"source\":\"cache\",\"data\":{\"externalId\":\"abc123\","
     "\"name\":\"Resource\",\"status\":\"ACTIVE\",\"details\":{\"fieldOne\":\"v\",\"fieldTwo\":2}}"
     "}",
     "/: matches none of the 2 oneOf subschemas (subschema 0: /data/status: value is not one of "
     "[\"active\",\"inactive\"])"},
};
#define N_EXAMPLES (sizeof examples / sizeof examples[0])

/* More verdicts on the schemas whose rules are less obvious. */
static const struct project_case {
    const char *file, *instance;
    bool valid;
} project_cases[] = {
    {"resource-reply.schema.json",
     "{\"id\":\"abc123\",\"found\":false,\"source\":\"cache\",\"data\":null}", true},
    {"resource-reply.schema.json",
     "{\"id\":\"abc123\",\"found\":false,\"source\":\"stale-cache\",\"data\":{}}", false},
    {"resource-reply.schema.json",
     "{\"id\":\"abc123\",\"found\":true,\"source\":\"cache\","
     "\"data\":null}",
     false},
    {"resource-reply.schema.json",
     "{\"id\":\"abc123\",\"error\":{\"code\":\"PROVIDER_UNAVAILABLE\",\"message\":\"breaker "
     "open\"}}",
     true},
    {"resource-reply.schema.json",
     "{\"id\":\"abc123\",\"found\":false,\"source\":\"cache\",\"data\":null,"
     "\"error\":{\"code\":\"X\",\"message\":\"y\"}}",
     false},
    {"resource-reply.schema.json",
     "{\"id\":\"abc123\",\"found\":false,\"source\":\"elsewhere\",\"data\":null}", false},
    {"submission-failed.schema.json",
     "{\"jobId\":\"\",\"error\":{\"code\":\"INVALID_JOB\",\"message\":\"/jobId: string shorter "
     "than minLength 1\",\"statusCode\":null,\"retryAttempt\":0}}",
     true},
    {"submission-failed.schema.json",
     "{\"jobId\":\"j\",\"error\":{\"code\":\"X\",\"message\":\"m\",\"statusCode\":99,"
     "\"retryAttempt\":1}}",
     false},
    {"submission-job.schema.json",
     "{\"jobId\":\"j\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{},\"priority\":null}", false},
    {"status-check.schema.json",
     "{\"jobId\":\"j\",\"trackingId\":\"t\",\"acceptedAt\":\"2024-01-01T00:00:00Z\",\"checks\":0,"
     "\"lastStatus\":\"pending\"}",
     true},
    {"provider-submit-request.schema.json",
     "{\"user_id\":\"u\",\"action_type\":\"a\",\"request_data\":{},\"client_info\":"
     "{\"client_id\":\"c\",\"timestamp\":\"2024-01-01T00:00:00Z\"},\"type\":\"transaction\"}",
     false},
};

START_TEST(test_project_schemas)
{
    char dir_path[4096];
    snprintf(dir_path, sizeof dir_path, "%s/schemas", IW_SOURCE_DIR);
    DIR *dir = opendir(dir_path);
    ck_assert_msg(dir != NULL, "cannot open %s", dir_path);
    size_t seen = 0;
    struct dirent *de;
    while ((de = readdir(dir)) != NULL) {
        size_t len = strlen(de->d_name);
        if (len < 5 || strcmp(de->d_name + len - 5, ".json") != 0)
            continue;
        const struct example *ex = NULL;
        for (size_t i = 0; i < N_EXAMPLES; i++)
            if (strcmp(examples[i].file, de->d_name) == 0)
                ex = &examples[i];
        ck_assert_msg(ex != NULL, "schemas/%s has no examples in test_schema.c", de->d_name);
        seen++;

        char path[8192], id[512];
        json_error_t jerr;
        snprintf(path, sizeof path, "%s/%s", dir_path, de->d_name);
        json_t *doc = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
        ck_assert_msg(doc != NULL, "%s: %s", path, jerr.text);
        snprintf(id, sizeof id, "https://integration-worker.local/schemas/%s", de->d_name);
        ck_assert_str_eq(json_string_value(json_object_get(doc, "$id")), id);
        ck_assert_str_eq(json_string_value(json_object_get(doc, "$schema")),
                         "http://json-schema.org/draft-07/schema#");
        ck_assert_ptr_nonnull(json_string_value(json_object_get(doc, "title")));
        json_decref(doc);

        iw_schema *s = load_project_schema(de->d_name);
        iw_error err;
        int rc = check(s, ex->good, &err);
        ck_assert_msg(rc == IW_OK, "%s rejects its good example: %s", de->d_name, err.msg);
        ck_assert_int_eq(check(s, ex->bad, &err), IW_ERR_SCHEMA);
        ck_assert_str_eq(err.msg, ex->bad_message);
        schema_free(s);
    }
    closedir(dir);
    ck_assert_uint_eq(seen, N_EXAMPLES);
}
END_TEST

START_TEST(test_project_verdicts)
{
    const struct project_case *pc = &project_cases[_i];
    iw_schema *s = load_project_schema(pc->file);
    iw_error err;
    int rc = check(s, pc->instance, &err);
    ck_assert_msg(pc->valid ? rc == IW_OK : rc == IW_ERR_SCHEMA, "%s on %s: got %d (%s)", pc->file,
                  pc->instance, rc, rc ? err.msg : "valid");
    schema_free(s);
}
END_TEST

static Suite *schema_suite(void)
{
    Suite *s = suite_create("schema");
    TCase *tc = tcase_create("official");
    tcase_add_loop_test(tc, test_official_suite, 0, (int)N_SUITE_FILES);
    tcase_add_test(tc, test_skip_table_files);
    suite_add_tcase(s, tc);

    tc = tcase_create("messages");
    tcase_add_test(tc, test_messages_submission_job);
    tcase_add_test(tc, test_messages_pointer);
    tcase_add_loop_test(tc, test_messages_rules, 0,
                        (int)(sizeof message_cases / sizeof message_cases[0]));
    tcase_add_loop_test(tc, test_messages_truncated_utf8, 0,
                        (int)(sizeof truncation_cases / sizeof truncation_cases[0]));
    tcase_add_loop_test(tc, test_verdicts, 0, (int)(sizeof number_cases / sizeof number_cases[0]));
    suite_add_tcase(s, tc);

    tc = tcase_create("compile");
    tcase_add_loop_test(tc, test_refusals, 0,
                        (int)(sizeof refusal_cases / sizeof refusal_cases[0]));
    tcase_add_test(tc, test_annotations_accepted);
    tcase_add_test(tc, test_null_arguments);
    tcase_add_test(tc, test_messages_are_safe_text);
    tcase_add_test(tc, test_load_file);
    suite_add_tcase(s, tc);

    tc = tcase_create("caps");
    tcase_add_test(tc, test_depth_cap_instance);
    tcase_add_loop_test(tc, test_depth_cap_self_reference, 0,
                        (int)(sizeof self_applying / sizeof self_applying[0]));
    tcase_add_test(tc, test_depth_cap_equality);
    tcase_add_test(tc, test_depth_cap_schema);
    suite_add_tcase(s, tc);

    tc = tcase_create("project");
    tcase_add_test(tc, test_project_schemas);
    tcase_add_loop_test(tc, test_project_verdicts, 0,
                        (int)(sizeof project_cases / sizeof project_cases[0]));
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(schema_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
