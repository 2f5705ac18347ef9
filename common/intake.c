#include "intake.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "buf.h"
#include "json_read.h"

static int is_json_content_type(const char *ct)
{
    size_t n = strlen("application/json");
    return strncasecmp(ct, "application/json", n) == 0 && (ct[n] == '\0' || ct[n] == ';');
}

/* out->msg = the formatted message, as safe text: it quotes the
 * publisher's bytes and goes into JSON (submission.failed, x-error-message,
 * logs), so it must be valid UTF-8 without control bytes, cut on a character
 * boundary (issue 9: '%.100s' cut CJK content types into invalid UTF-8 and
 * json_pack then published `{}`). */
static void set_msg(intake_result *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_msg(intake_result *out, const char *fmt, ...)
{
    iw_buf b;
    va_list ap;

    buf_init(&b, 4 * INTAKE_MSG_LEN);
    va_start(ap, fmt);
    if (buf_vaddf(&b, fmt, ap) != IW_OK)
        (void)!buf_adds(&b, "message too long to format");
    va_end(ap);
    iw_text_copy(out->msg, sizeof out->msg, buf_ptr(&b), buf_len(&b));
    buf_free(&b);
}

void intake_json(const char *body, size_t len, const char *content_type, size_t max_bytes,
                 const iw_schema *schema, intake_result *out)
{
    json_error_t jerr;
    iw_error err;

    out->code = IW_C_NONE;
    out->doc = NULL;
    out->msg[0] = '\0';
    if (len > max_bytes) {
        out->code = IW_C_MESSAGE_TOO_LARGE;
        set_msg(out, "message of %zu bytes exceeds IW_MAX_MESSAGE_BYTES=%zu", len, max_bytes);
        return;
    }
    /* parsed before the content type is judged, so that a readable jobId can
     * still get its submission.failed */
    out->doc = json_read(body ? body : "", len, JSON_REJECT_DUPLICATES, &jerr);
    if (content_type && !is_json_content_type(content_type)) {
        out->code = IW_C_INVALID_CONTENT_TYPE;
        char *q = text_quote(content_type, strlen(content_type), 100);
        set_msg(out, "content_type '%s' is not application/json", q ? q : "?");
        free(q);
        return;
    }
    if (!out->doc) {
        out->code = IW_C_INVALID_JSON;
        /* jansson's text quotes the input near the error ("near '...'") */
        char *q = text_quote(jerr.text, strnlen(jerr.text, sizeof jerr.text), 200);
        set_msg(out, "not UTF-8 JSON: %s (line %d, column %d)", q ? q : "?", jerr.line,
                jerr.column);
        free(q);
        return;
    }
    if (schema_validate(schema, out->doc, &err) != IW_OK) {
        out->code = IW_C_SCHEMA_VIOLATION;
        set_msg(out, "%s", err.msg);
    }
}

int intake_trust_internal_headers(json_t *headers, const char *exchange, const char *ns)
{
    size_t nl = strlen(ns);
    static const char *const internal[] = {
        "x-attempts",     "x-due-at", "x-first-seen", "x-last-error", "x-original-routing-key",
        "x-first-attempt"};
    const char *key;
    void *tmp;
    json_t *v;

    if (!json_is_object(headers))
        return 0;
    if (exchange && strncmp(exchange, ns, nl) == 0 && strcmp(exchange + nl, ".retry") == 0)
        return 1;
    for (size_t i = 0; i < sizeof internal / sizeof internal[0]; i++)
        json_object_del(headers, internal[i]);
    json_object_foreach_safe(headers, tmp, key, v)
    {
        if (strncmp(key, "iw-", 3) == 0)
            json_object_del(headers, key);
    }
    return 0;
}
