/* The schema validator on arbitrary schemas and documents: compiling either
 * succeeds or fails with a message, validation answers yes or no with a
 * message, nothing crashes, leaks or recurses without bound, and every
 * message is valid one-line UTF-8.
 *
 * Input: the schema's JSON, a line holding only "----", the instance's JSON
 * (without the separator the whole input is used as both). */
#include <string.h>

#include "fuzz_support.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *sep = NULL;
    size_t schema_len = size;
    const uint8_t *inst = data;
    size_t inst_len = size;
    json_error_t jerr;
    iw_error err;

    for (size_t i = 0; i + 6 <= size; i++) {
        if (memcmp(data + i, "\n----\n", 6) == 0) {
            sep = (const char *)data + i;
            break;
        }
    }
    if (sep) {
        schema_len = (size_t)((const uint8_t *)sep - data);
        inst = (const uint8_t *)sep + 6;
        inst_len = size - schema_len - 6;
    }
    json_t *sdoc = json_loadb((const char *)data, schema_len, JSON_REJECT_DUPLICATES, &jerr);
    json_t *idoc = json_loadb((const char *)inst, inst_len, 0, &jerr);
    if (sdoc) {
        iw_schema *s = schema_new(sdoc, &err);
        if (!s) {
            fuzz_check_message(err.msg);
        } else if (idoc) {
            int rc = schema_validate(s, idoc, &err);
            if (rc != IW_OK)
                fuzz_check_message(err.msg);
            /* the answer is a function of the input */
            iw_error err2;
            FUZZ_REQUIRE(schema_validate(s, idoc, &err2) == rc);
        }
        schema_free(s);
    }
    /* and the project's own schemas on the same document */
    if (idoc) {
        static const char *const names[] = {"submission-job", "provider-status-response",
                                            "resource-get", "status-check"};
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
            if (schema_validate(fuzz_schema(names[i]), idoc, &err) != IW_OK)
                fuzz_check_message(err.msg);
    }
    json_decref(sdoc);
    json_decref(idoc);
    return 0;
}
