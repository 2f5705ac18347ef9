#include "intake.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

static int is_json_content_type(const char *ct)
{
    size_t n = strlen("application/json");
    return strncasecmp(ct, "application/json", n) == 0 && (ct[n] == '\0' || ct[n] == ';');
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
        snprintf(out->msg, sizeof out->msg, "message of %zu bytes exceeds IW_MAX_MESSAGE_BYTES=%zu",
                 len, max_bytes);
        return;
    }
    /* parsed before the content type is judged, so that a readable jobId can
     * still get its submission.failed */
    out->doc = json_loadb(body ? body : "", len, JSON_REJECT_DUPLICATES, &jerr);
    if (content_type && !is_json_content_type(content_type)) {
        out->code = IW_C_INVALID_CONTENT_TYPE;
        snprintf(out->msg, sizeof out->msg, "content_type '%.100s' is not application/json",
                 content_type);
        return;
    }
    if (!out->doc) {
        out->code = IW_C_INVALID_JSON;
        snprintf(out->msg, sizeof out->msg, "not UTF-8 JSON: %s (line %d, column %d)", jerr.text,
                 jerr.line, jerr.column);
        return;
    }
    if (schema_validate(schema, out->doc, &err) != IW_OK) {
        out->code = IW_C_SCHEMA_VIOLATION;
        snprintf(out->msg, sizeof out->msg, "%s", err.msg);
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
