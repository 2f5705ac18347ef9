/* Job intake: content type + AMQP headers + body -> JSON parse (duplicate
 * keys rejected) -> schemas/submission-job -> outbound transform, the way
 * worker/runtime.c's rt_intake and the submitter do it today, with the
 * messages built the safe way (text_quote).  Checks: every refusal gives a
 * message that is valid one-line UTF-8 and a submission.failed event that
 * passes its schema; every accepted job gives a jobKey that is a safe header
 * value and an outbound body that passes provider-submit-request, the same
 * bytes every time.  (The lead moves intake into common/ as one pure
 * function; this target then calls it instead of these steps.)
 *
 * Input: line 1 the content_type ("-" for none), then header lines
 * "name: value" up to an empty line, then the body. */
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "fuzz_support.h"
#include "http_client.h"
#include "jobkey.h"
#include "parse.h"
#include "transform.h"

#define MAX_MESSAGE_BYTES 1048576 /* IW_MAX_MESSAGE_BYTES' default */

static int is_json_content_type(const char *ct)
{
    size_t n = strlen("application/json");
    return strncasecmp(ct, "application/json", n) == 0 && (ct[n] == '\0' || ct[n] == ';');
}

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
    json_t *out = transform_outbound(doc, "integration-worker", 1700000000123LL);
    FUZZ_REQUIRE(out != NULL);
    fuzz_check_schema("provider-submit-request", out);
    /* every attempt sends the same body, byte for byte */
    json_t *again = transform_outbound(doc, "integration-worker", 1700000000123LL);
    char *a = json_dumps(out, JSON_COMPACT), *b = json_dumps(again, JSON_COMPACT);
    FUZZ_REQUIRE(a && b && strcmp(a, b) == 0);
    free(a);
    free(b);
    json_decref(again);
    json_decref(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *line;
    size_t len;
    char *ct = NULL;
    iw_buf msg;
    json_error_t jerr;
    json_t *doc = NULL;
    iw_error err;

    buf_init(&msg, 4096);
    if (fuzz_line(&data, &size, &line, &len) && !(len == 1 && line[0] == '-'))
        ct = fuzz_strndup(line, len);
    /* headers: an attempt count as the worker reads x-attempts, and every
     * value quoted as a dead-letter header would quote it */
    while (fuzz_line(&data, &size, &line, &len) && len > 0) {
        const char *colon = memchr(line, ':', len);
        size_t nlen = colon ? (size_t)(colon - line) : len;
        char *value = colon ? fuzz_strndup(colon + 1, len - nlen - 1) : fuzz_strndup("", 0);
        char *quoted = text_quote(line, len, 256);
        long attempts;
        FUZZ_REQUIRE(quoted != NULL);
        fuzz_check_message(quoted);
        if (nlen == 10 && strncasecmp(line, "x-attempts", 10) == 0 &&
            parse_long(value[0] == ' ' ? value + 1 : value, 0, 100, &attempts, &err) != IW_OK)
            fuzz_check_message(err.msg);
        free(quoted);
        free(value);
    }

    if (size > MAX_MESSAGE_BYTES) {
        FUZZ_REQUIRE(buf_addf(&msg, "message of %zu bytes exceeds IW_MAX_MESSAGE_BYTES=%d", size,
                              MAX_MESSAGE_BYTES) == IW_OK);
        fuzz_check_message(buf_ptr(&msg));
        goto out;
    }
    doc = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, &jerr);
    if (ct && !is_json_content_type(ct)) {
        char *q = text_quote(ct, strlen(ct), 100);
        FUZZ_REQUIRE(q && buf_addf(&msg, "content_type '%s' is not application/json", q) == IW_OK);
        free(q);
        check_failed_event(doc, "INVALID_CONTENT_TYPE", buf_ptr(&msg));
        goto out;
    }
    if (!doc) {
        char *q = text_quote(jerr.text, strlen(jerr.text), 200);
        FUZZ_REQUIRE(q && buf_addf(&msg, "not UTF-8 JSON: %s (line %d, column %d)", q, jerr.line,
                                   jerr.column) == IW_OK);
        free(q);
        fuzz_check_message(buf_ptr(&msg));
        goto out;
    }
    if (schema_validate(fuzz_schema("submission-job"), doc, &err) != IW_OK) {
        FUZZ_REQUIRE(err.status == IW_ERR_SCHEMA);
        check_failed_event(doc, "SCHEMA_VIOLATION", err.msg);
        goto out;
    }
    accepted(doc);
out:
    json_decref(doc);
    buf_free(&msg);
    free(ct);
    return 0;
}
