/* Shared pieces of the libFuzzer targets: the project's schemas, input
 * splitting, and the checks every target makes on what it produces. */
#ifndef IW_FUZZ_SUPPORT_H
#define IW_FUZZ_SUPPORT_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "schema.h"

/* Stops the run as a finding (libFuzzer saves the input). */
#define FUZZ_REQUIRE(cond)                                                                         \
    do {                                                                                           \
        if (!(cond))                                                                               \
            fuzz_fail(#cond, __FILE__, __LINE__);                                                  \
    } while (0)

void fuzz_fail(const char *what, const char *file, int line) __attribute__((noreturn));

/* schemas/<name>.schema.json, loaded once; aborts when it cannot load. */
const iw_schema *fuzz_schema(const char *name);

/* Takes the next line (without its '\n') off *data; 0 when none is left. */
int fuzz_line(const uint8_t **data, size_t *size, const char **line, size_t *len);

/* A NUL-terminated copy (the fuzzer's bytes are not terminated). */
char *fuzz_strndup(const void *p, size_t n);

/* A message that goes into JSON: valid UTF-8, no control bytes, accepted by
 * json_string. */
void fuzz_check_message(const char *msg);

/* Validates doc against schemas/<name>.schema.json; a failure is a finding
 * (everything we publish must pass its own schema). */
void fuzz_check_schema(const char *name, const json_t *doc);

/* json_out_text(v) is json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY), byte for
 * byte (what we publish is written by json_out; readers compare with
 * jansson's form). */
void fuzz_check_json_out(const json_t *v);

#endif
