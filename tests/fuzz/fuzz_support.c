#include "fuzz_support.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "json_out.h"

void fuzz_fail(const char *what, const char *file, int line)
{
    fprintf(stderr, "FUZZ FINDING: %s (%s:%d)\n", what, file, line);
    abort();
}

#define MAX_SCHEMAS 16

const iw_schema *fuzz_schema(const char *name)
{
    static struct {
        const char *name;
        iw_schema *s;
    } cache[MAX_SCHEMAS];
    iw_buf path;
    iw_error err;
    size_t i;

    for (i = 0; i < MAX_SCHEMAS && cache[i].name; i++)
        if (strcmp(cache[i].name, name) == 0)
            return cache[i].s;
    FUZZ_REQUIRE(i < MAX_SCHEMAS);
    buf_init(&path, 4096);
    const char *dir = getenv("IW_SCHEMA_DIR");
    FUZZ_REQUIRE(buf_addf(&path, "%s/%s.schema.json", dir ? dir : IW_SCHEMA_DIR_DEFAULT, name) ==
                 IW_OK);
    cache[i].s = schema_load_file(buf_ptr(&path), &err);
    if (!cache[i].s)
        fprintf(stderr, "cannot load %s: %s\n", buf_ptr(&path), err.msg);
    FUZZ_REQUIRE(cache[i].s != NULL);
    cache[i].name = name;
    buf_free(&path);
    return cache[i].s;
}

int fuzz_line(const uint8_t **data, size_t *size, const char **line, size_t *len)
{
    const uint8_t *nl;

    if (*size == 0)
        return 0;
    nl = memchr(*data, '\n', *size);
    *line = (const char *)*data;
    *len = nl ? (size_t)(nl - *data) : *size;
    *data += *len + (nl ? 1 : 0);
    *size -= *len + (nl ? 1 : 0);
    return 1;
}

char *fuzz_strndup(const void *p, size_t n)
{
    char *s = malloc(n + 1);
    FUZZ_REQUIRE(s != NULL);
    memcpy(s, p, n);
    s[n] = '\0';
    return s;
}

void fuzz_check_message(const char *msg)
{
    size_t n = strlen(msg);
    FUZZ_REQUIRE(utf8_valid(msg, n));
    for (size_t i = 0; i < n; i++)
        FUZZ_REQUIRE((unsigned char)msg[i] >= 0x20 && msg[i] != 0x7F);
    json_t *j = json_string(msg);
    FUZZ_REQUIRE(j != NULL);
    json_decref(j);
}

void fuzz_check_json_out(const json_t *v)
{
    char *want = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    size_t len = 0;
    char *got = json_out_text(v, &len);

    FUZZ_REQUIRE(want != NULL && got != NULL);
    FUZZ_REQUIRE(len == strlen(want) && memcmp(got, want, len) == 0);
    free(want);
    free(got);
}

void fuzz_check_schema(const char *name, const json_t *doc)
{
    iw_error err;
    FUZZ_REQUIRE(doc != NULL);
    if (schema_validate(fuzz_schema(name), doc, &err) != IW_OK) {
        char *text = json_dumps(doc, JSON_COMPACT);
        fprintf(stderr, "%s breaks %s: %s\n", text ? text : "?", name, err.msg);
        free(text);
        fuzz_fail("published JSON passes its schema", __FILE__, __LINE__);
    }
}
