/* json_read (common/json_read.c) against json_loadb, on any bytes: both
 * accept with the same value (the same members in the same order, the same
 * types), or both refuse with the same error; with and without
 * JSON_REJECT_DUPLICATES.  The first byte picks the flags. */
#include <stdlib.h>
#include <string.h>

#include "fuzz_support.h"
#include "json_read.h"

static void agree(const char *text, size_t len, size_t flags)
{
    json_error_t e1, e2;
    json_t *a = json_read(text, len, flags, &e1), *b = json_loadb(text, len, flags, &e2);

    FUZZ_REQUIRE(!a == !b);
    if (a) {
        char *da = json_dumps(a, JSON_COMPACT | JSON_ENCODE_ANY),
             *db = json_dumps(b, JSON_COMPACT | JSON_ENCODE_ANY);
        FUZZ_REQUIRE(json_equal(a, b));
        FUZZ_REQUIRE(da && db && strcmp(da, db) == 0);
        free(da);
        free(db);
    } else {
        FUZZ_REQUIRE(strcmp(e1.text, e2.text) == 0);
        FUZZ_REQUIRE(e1.position == e2.position);
    }
    FUZZ_REQUIRE(e1.line == e2.line && e1.column == e2.column);
    json_decref(a);
    json_decref(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t flags;
    char *text;

    if (size == 0)
        return 0;
    flags = data[0] & 1 ? JSON_REJECT_DUPLICATES : 0;
    /* a copy of exactly the text: a read past its end is then ASan's finding */
    text = malloc(size - 1 ? size - 1 : 1);
    if (!text)
        return 0;
    memcpy(text, data + 1, size - 1);
    agree(text, size - 1, flags);
    free(text);
    return 0;
}
