/* Data-driven submission-job fixtures (tests/data/jobs/):
 *   valid/<case>.json            must parse and pass schemas/submission-job.schema.json;
 *   invalid/<case>/input.json    any bytes; must fail to parse or fail the schema,
 *   invalid/<case>/error         with a message containing this text; exactly "JSON"
 *                                means it must not parse at all.
 * Parsing is what the worker does with a delivery body: json_loadb() with
 * JSON_REJECT_DUPLICATES, so non-UTF-8, truncated and duplicate-key input are
 * all "JSON" failures. */
#include <check.h>
#include <dirent.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "intake.h"
#include "schema.h"

#define JOBS_DIR IW_TEST_DATA_DIR "/jobs"
#define FIXTURE_MAX_BYTES (1024 * 1024)
#define MIN_VALID_CASES 8
#define MIN_INVALID_CASES 12

/* Reads a whole file into a malloc'd buffer; NULL if missing or too large. */
static char *read_file(const char *path, size_t *len)
{
    char *buf = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        goto out;
    buf = malloc(FIXTURE_MAX_BYTES + 1);
    if (!buf)
        goto out;
    *len = fread(buf, 1, FIXTURE_MAX_BYTES + 1, f);
    if (ferror(f) || *len > FIXTURE_MAX_BYTES) {
        free(buf);
        buf = NULL;
        goto out;
    }
    buf[*len] = '\0';
out:
    if (f)
        fclose(f);
    return buf;
}

/* Intake of one input exactly as the worker does it (common/intake.c):
 * IW_OK, IW_ERR_JSON or IW_ERR_SCHEMA, with the reason in err. */
static int check_job(const iw_schema *s, const char *input, size_t len, iw_error *err)
{
    intake_result in;
    int rc;

    intake_json(input, len, "application/json", FIXTURE_MAX_BYTES, s, &in);
    json_decref(in.doc);
    rc = in.code == IW_C_NONE               ? IW_OK
         : in.code == IW_C_INVALID_JSON     ? IW_ERR_JSON
         : in.code == IW_C_SCHEMA_VIOLATION ? IW_ERR_SCHEMA
                                            : IW_ERR_INVALID;
    if (rc != IW_OK)
        iw_error_set(err, rc, "%s", in.msg);
    return rc;
}

static iw_schema *job_schema(void)
{
    iw_error err = {0};
    iw_schema *s = schema_load_file(IW_SOURCE_DIR "/schemas/submission-job.schema.json", &err);
    ck_assert_msg(s != NULL, "submission-job schema: %s", err.msg);
    return s;
}

static int not_hidden(const struct dirent *de)
{
    return de->d_name[0] != '.';
}

START_TEST(test_valid_jobs)
{
    iw_schema *s = job_schema();
    struct dirent **entries;
    int n = scandir(JOBS_DIR "/valid", &entries, not_hidden, alphasort);
    ck_assert_msg(n >= 0, "cannot read %s/valid", JOBS_DIR);
    int failures = 0, cases = 0;
    for (int i = 0; i < n; i++) {
        char path[4096];
        size_t len = 0;
        iw_error err = {0};
        snprintf(path, sizeof path, "%s/valid/%s", JOBS_DIR, entries[i]->d_name);
        char *input = read_file(path, &len);
        if (!input) {
            fprintf(stderr, "FAIL valid/%s: unreadable\n", entries[i]->d_name);
            failures++;
        } else if (check_job(s, input, len, &err) != IW_OK) {
            fprintf(stderr, "FAIL valid/%s: %s\n", entries[i]->d_name, err.msg);
            failures++;
        } else {
            printf("ok   valid/%s\n", entries[i]->d_name);
        }
        cases++;
        free(input);
        free(entries[i]);
    }
    free(entries);
    schema_free(s);
    ck_assert_msg(failures == 0, "%d valid fixtures rejected (details on stderr)", failures);
    ck_assert_msg(cases >= MIN_VALID_CASES, "only %d valid fixtures", cases);
}
END_TEST

START_TEST(test_invalid_jobs)
{
    iw_schema *s = job_schema();
    struct dirent **entries;
    int n = scandir(JOBS_DIR "/invalid", &entries, not_hidden, alphasort);
    ck_assert_msg(n >= 0, "cannot read %s/invalid", JOBS_DIR);
    int failures = 0, cases = 0;
    for (int i = 0; i < n; i++) {
        const char *name = entries[i]->d_name;
        char path[4096];
        size_t input_len = 0, expected_len = 0;
        iw_error err = {0};
        int rc;

        snprintf(path, sizeof path, "%s/invalid/%s/input.json", JOBS_DIR, name);
        char *input = read_file(path, &input_len);
        snprintf(path, sizeof path, "%s/invalid/%s/error", JOBS_DIR, name);
        char *expected = read_file(path, &expected_len);
        while (expected && expected_len > 0 && strchr("\r\n \t", expected[expected_len - 1]))
            expected[--expected_len] = '\0';

        if (!input || !expected || expected_len == 0) {
            fprintf(stderr, "FAIL invalid/%s: needs input.json and a non-empty error\n", name);
            failures++;
        } else if ((rc = check_job(s, input, input_len, &err)) == IW_OK) {
            fprintf(stderr, "FAIL invalid/%s: accepted\n", name);
            failures++;
        } else if (rc != (strcmp(expected, "JSON") == 0 ? IW_ERR_JSON : IW_ERR_SCHEMA)) {
            fprintf(stderr, "FAIL invalid/%s: status %d (%s)\n", name, rc, err.msg);
            failures++;
        } else if (!strstr(err.msg, expected)) {
            fprintf(stderr, "FAIL invalid/%s: message \"%s\" lacks \"%s\"\n", name, err.msg,
                    expected);
            failures++;
        } else {
            printf("ok   invalid/%s: %s\n", name, err.msg);
        }
        cases++;
        free(input);
        free(expected);
        free(entries[i]);
    }
    free(entries);
    schema_free(s);
    ck_assert_msg(failures == 0, "%d invalid fixtures misjudged (details on stderr)", failures);
    ck_assert_msg(cases >= MIN_INVALID_CASES, "only %d invalid fixtures", cases);
}
END_TEST

/* Intake messages quote the publisher's bytes and go into JSON: valid UTF-8
 * without control bytes, never cut inside a character (issue 9; the fuzz
 * target's seed corpus/intake/seed-content-type found '%.100s' cutting one). */
START_TEST(test_messages_are_safe_text)
{
    iw_schema *s = job_schema();
    char ct[200] = "text/plain; charset=";
    intake_result in;
    /* 3-byte characters so that byte 100 falls inside one */
    while (strlen(ct) < 150)
        strcat(ct, "\xe6\x97\xa5");
    const struct {
        const char *content_type, *body;
    } cases[] = {
        {ct, "{}"},
        {"text/plain\r\nX-Injected: yes", "{}"},
        {"text/\xff\xfe", "{}"},
        {NULL, "[1, tru\xe6\x97"},
        {NULL, "{\"jobId\":\"j\",\"userId\":\"u\",\"action\":\"a\",\"payload\":{},"
               "\"\xe6\x97\xa5\xe6\x97\xa5\":1,\"\xe6\x97\xa5\xe6\x97\xa5\":2}"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        intake_json(cases[i].body, strlen(cases[i].body), cases[i].content_type, FIXTURE_MAX_BYTES,
                    s, &in);
        ck_assert_int_ne(in.code, IW_C_NONE);
        for (const char *p = in.msg; *p; p++)
            ck_assert_msg((unsigned char)*p >= 0x20 && *p != 0x7f, "case %zu: control byte", i);
        json_t *j = json_string(in.msg);
        ck_assert_msg(j != NULL, "case %zu: message is not UTF-8: %s", i, in.msg);
        json_decref(j);
        json_decref(in.doc);
    }
    schema_free(s);
}
END_TEST

static Suite *jobs_suite(void)
{
    Suite *s = suite_create("jobs_fixtures");
    TCase *tc = tcase_create("fixtures");
    tcase_add_test(tc, test_valid_jobs);
    tcase_add_test(tc, test_invalid_jobs);
    tcase_add_test(tc, test_messages_are_safe_text);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(jobs_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
