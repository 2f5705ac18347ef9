/* Provider answers: status + headers + body -> retry_classify, the
 * Retry-After / X-RateLimit-Reset-Ms parsing, the inbound transform and the
 * status-response schema check.  Checks: a verdict is always one of the
 * four, with a code when it is not an acceptance; a wait from the provider is
 * never negative nor past IW_MAX_RATE_PAUSE;
 * an inbound transform either fails with a safe message or gives an answer
 * that passes resource-reply's data; every message is valid UTF-8.
 *
 * Input: line 1 the status as decimal text and a transport digit
 * ("201 0"), then header lines up to an empty line, then the body. */
#include <stdlib.h>
#include <string.h>

#include "fuzz_support.h"
#include "parse.h"
#include "retry.h"
#include "transform.h"

#define NOW_MS 1700000000000LL

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *line;
    size_t len;
    iw_http_result r = {.status = 0, .transport = IW_TRANSPORT_OK, .retry_after_ms = -1};
    json_error_t jerr;
    iw_error err;

    if (fuzz_line(&data, &size, &line, &len)) {
        char *first = fuzz_strndup(line, len);
        char *sp = strchr(first, ' ');
        if (sp) {
            *sp = '\0';
            r.transport = (iw_transport)(sp[1] >= '0' && sp[1] <= '4' ? sp[1] - '0' : 0);
        }
        long st;
        r.status = parse_long(first, 0, 999, &st, NULL) == IW_OK ? st : 0;
        free(first);
    }
    while (fuzz_line(&data, &size, &line, &len) && len > 0) {
        const char *colon = memchr(line, ':', len);
        if (!colon)
            continue;
        size_t nlen = (size_t)(colon - line);
        const char *v = colon + 1;
        size_t vlen = len - nlen - 1;
        while (vlen && (*v == ' ' || *v == '\t'))
            v++, vlen--;
        char *value = fuzz_strndup(v, vlen);
        if (nlen == 11 && strncasecmp(line, "Retry-After", 11) == 0) {
            int capped = 0;
            long ms = retry_parse_retry_after(value, NOW_MS, 0, &capped);
            FUZZ_REQUIRE(ms >= -1 && ms <= IW_DEFAULT_MAX_RATE_PAUSE_MS);
            if (r.retry_after_ms < 0) {
                r.retry_after_ms = ms;
                r.wait_capped = capped;
            }
        } else if (nlen == 20 && strncasecmp(line, "X-RateLimit-Reset-Ms", 20) == 0) {
            int capped = 0;
            long ms = retry_parse_reset_ms(value, 0, &capped);
            FUZZ_REQUIRE(ms >= -1 && ms <= IW_DEFAULT_MAX_RATE_PAUSE_MS);
            r.retry_after_ms = ms;
            r.wait_capped = capped;
        }
        free(value);
    }
    if (r.transport != IW_TRANSPORT_OK)
        r.status = 0;

    iw_verdict v = retry_classify(&r);
    FUZZ_REQUIRE(v.kind == IW_V_ACCEPT || v.kind == IW_V_RETRY || v.kind == IW_V_WAIT ||
                 v.kind == IW_V_FAIL);
    FUZZ_REQUIRE(v.kind == IW_V_ACCEPT || (v.code != IW_C_NONE && iw_code_name(v.code)));
    FUZZ_REQUIRE(v.kind != IW_V_WAIT ||
                 (v.wait_ms >= 0 && v.wait_ms <= IW_DEFAULT_MAX_RATE_PAUSE_MS));

    json_t *body = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, &jerr);
    if (body) {
        fuzz_check_json_out(body); /* any provider body, as a log field or a cached copy */
        json_t *ours = transform_inbound(body, &err);
        if (ours) {
            json_t *reply =
                json_pack("{s:O, s:b, s:s, s:O}", "id", json_object_get(ours, "externalId"),
                          "found", 1, "source", "provider", "data", ours);
            FUZZ_REQUIRE(reply != NULL);
            fuzz_check_schema("resource-reply", reply);
            fuzz_check_json_out(reply);
            json_decref(reply);
            json_decref(ours);
        } else {
            fuzz_check_message(err.msg);
        }
        if (schema_validate(fuzz_schema("provider-status-response"), body, &err) != IW_OK)
            fuzz_check_message(err.msg);
        if (schema_validate(fuzz_schema("provider-submit-response"), body, &err) != IW_OK)
            fuzz_check_message(err.msg);
        json_decref(body);
    }
    return 0;
}
