/* Job intake: content type + AMQP headers + body -> intake_json (size,
 * content type, JSON parse with duplicate keys rejected, schemas/
 * submission-job) and intake_trust_internal_headers -> outbound transform,
 * the functions every role calls.  Checks: every refusal gives a message that
 * is valid one-line UTF-8 and a submission.failed event that passes its
 * schema; every accepted job gives a jobKey that is a safe header value and
 * an outbound body that passes provider-submit-request, the same bytes every
 * time; upstream's copies of our internal headers are dropped.
 *
 * Input: line 1 the content_type ("-" for none), then header lines
 * "name: value" up to an empty line, then the body. */
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "fuzz_support.h"
#include "http_client.h"
#include "intake.h"
#include "jobkey.h"
#include "parse.h"
#include "transform.h"

#define MAX_MESSAGE_BYTES 1048576 /* IW_MAX_MESSAGE_BYTES' default */

/* The failure event the worker would publish for this job. */
static void check_failed_event(const json_t *doc, const char *code, const char *msg)
{
    const json_t *id = json_object_get(doc, "jobId");
    fuzz_check_message(msg);
    if (!json_is_string(id))
        return; /* dead letter only */
    json_t *ev = json_pack("{s:O, s:{s:s, s:s, s:n, s:i}}", "jobId", id, "error", "code", code,
                           "message", msg, "statusCode", "retryAttempt", 0);
    FUZZ_REQUIRE(ev != NULL); /* the issue's `{}` events came from a NULL here */
    fuzz_check_schema("submission-failed", ev);
    json_decref(ev);
}

static void accepted(const json_t *doc)
{
    const json_t *id = json_object_get(doc, "jobId");
    char key[JOBKEY_SIZE];

    FUZZ_REQUIRE(json_is_string(id));
    FUZZ_REQUIRE(jobkey(json_string_value(id), json_string_length(id), key) == IW_OK);
    FUZZ_REQUIRE(jobkey_is_plain(key, strlen(key)));
    FUZZ_REQUIRE(http_header_value_check(key, strlen(key)) == IW_OK);
    /* the request as the submitter writes it: the spec's mapping (built here
     * as a tree, the oracle) byte for byte, and it passes its schema */
    iw_buf text, again;
    json_t *oracle = json_pack(
        "{s:O, s:O, s:O, s:{s:s, s:s}}", "user_id", json_object_get(doc, "userId"), "action_type",
        json_object_get(doc, "action"), "request_data", json_object_get(doc, "payload"),
        "client_info", "client_id", "integration-worker", "timestamp", "2023-11-14T22:13:20.123Z");
    char *want = oracle ? json_dumps(oracle, JSON_COMPACT) : NULL;
    buf_init(&text, 1 << 20);
    buf_init(&again, 1 << 20);
    FUZZ_REQUIRE(want != NULL);
    FUZZ_REQUIRE(transform_outbound(doc, "integration-worker", 1700000000123LL, &text) == IW_OK);
    FUZZ_REQUIRE(strcmp(buf_ptr(&text), want) == 0);
    fuzz_check_schema("provider-submit-request", oracle);
    /* every attempt sends the same body, byte for byte */
    FUZZ_REQUIRE(transform_outbound(doc, "integration-worker", 1700000000123LL, &again) == IW_OK);
    FUZZ_REQUIRE(buf_len(&again) == buf_len(&text) &&
                 memcmp(buf_ptr(&again), buf_ptr(&text), buf_len(&text)) == 0);
    fuzz_check_json_out(doc);
    buf_free(&text);
    buf_free(&again);
    free(want);
    json_decref(oracle);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *line;
    size_t len;
    char *ct = NULL;
    intake_result r;
    json_t *headers = json_object();

    FUZZ_REQUIRE(headers != NULL);
    if (fuzz_line(&data, &size, &line, &len) && !(len == 1 && line[0] == '-'))
        ct = fuzz_strndup(line, len);
    /* headers as the AMQP link gives them (JSON; names and values that are
     * not UTF-8 never become JSON strings), from upstream (not the retry
     * exchange): our internal ones must be dropped */
    while (fuzz_line(&data, &size, &line, &len) && len > 0) {
        const char *colon = memchr(line, ':', len);
        size_t nlen = colon ? (size_t)(colon - line) : len;
        char *name = fuzz_strndup(line, nlen);
        json_t *value = colon ? json_stringn(colon + 1, len - nlen - 1) : json_null();
        if (value && strlen(name) == nlen && utf8_valid(name, nlen))
            json_object_set_new(headers, name, value);
        else
            json_decref(value);
        free(name);
    }
    FUZZ_REQUIRE(intake_trust_internal_headers(headers, "ext-api.requests", "ext-api") == 0);
    FUZZ_REQUIRE(!json_object_get(headers, "x-attempts") && !json_object_get(headers, "x-due-at"));
    {
        const char *key;
        json_t *v;
        json_object_foreach(headers, key, v)
        {
            (void)v;
            FUZZ_REQUIRE(strncmp(key, "iw-", 3) != 0);
        }
    }

    intake_json((const char *)data, size, ct, MAX_MESSAGE_BYTES, fuzz_schema("submission-job"), &r);
    switch (r.code) {
    case IW_C_NONE:
        FUZZ_REQUIRE(r.doc != NULL && r.msg[0] == '\0');
        accepted(r.doc);
        break;
    case IW_C_MESSAGE_TOO_LARGE:
    case IW_C_INVALID_JSON:
        FUZZ_REQUIRE(r.code != IW_C_INVALID_JSON || r.doc == NULL);
        fuzz_check_message(r.msg);
        break;
    case IW_C_INVALID_CONTENT_TYPE:
    case IW_C_SCHEMA_VIOLATION:
        check_failed_event(r.doc, iw_code_name(r.code), r.msg);
        break;
    default:
        FUZZ_REQUIRE(!"intake_json gave a code it does not document");
    }
    if (r.doc)
        fuzz_check_json_out(r.doc);
    fuzz_check_json_out(headers);
    json_decref(r.doc);
    json_decref(headers);
    free(ct);
    return 0;
}
