#include "json_read.h"

#include "buf.h"
#include "json_mem.h"

#include <errno.h>
#include <locale.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <yajl/yajl_parse.h>

/* What a byte asks of the text: 0 nothing, 1 the slow way (a control
 * character other than tab, line feed and carriage return, or a backslash),
 * 2 a check of its UTF-8 sequence. */
static const unsigned char byte_class[256] = {
    [0x00 ... 0x08] = 1, [0x0B ... 0x0C] = 1, [0x0E ... 0x1F] = 1, ['\\'] = 1, [0x80 ... 0xFF] = 2,
};

typedef struct {
    const char *text; /* the input, which keys point into */
    size_t len;
    int reject_dups;
    yajl_handle h;
    json_t *root;
    size_t end;                     /* the text's offset past the root's last byte */
    json_t *stack[JSON_READ_DEPTH]; /* the open containers, borrowed */
    int depth;
    const char *key; /* the pending member's key (depth > 0, in an object) */
    size_t key_len;
} reader;

static int plain_text(const char *text, size_t len)
{
    const unsigned char *u = (const unsigned char *)text;
    size_t i = 0;

    while (i < len) {
        switch (byte_class[u[i]]) {
        case 0:
            i++;
            break;
        case 2: {
            size_t k = utf8_next(u + i, len - i);
            if (!k)
                return 0;
            i += k;
            break;
        }
        default:
            return 0;
        }
    }
    return 1;
}

/* Puts v where the text has it: the root (an object or an array), the next
 * element of an array or the pending member of an object.  Takes v; 0 stops
 * the parse (the slow way decides). */
static int place(reader *r, json_t *v)
{
    json_t *parent;

    if (!v)
        return 0;
    if (r->depth == 0) {
        if (r->root || !(json_is_object(v) || json_is_array(v))) {
            json_decref(v);
            return 0;
        }
        r->root = v;
        return 1;
    }
    parent = r->stack[r->depth - 1];
    if (json_is_array(parent))
        return json_array_append_new(parent, v) == 0;
    if (!r->key || (r->reject_dups && json_object_getn(parent, r->key, r->key_len))) {
        json_decref(v);
        return 0;
    }
    if (json_object_setn_new_nocheck(parent, r->key, r->key_len, v) != 0)
        return 0;
    r->key = NULL;
    return 1;
}

static int open_container(reader *r, json_t *v)
{
    if (!v || r->depth == JSON_READ_DEPTH) {
        json_decref(v);
        return 0;
    }
    if (!place(r, v))
        return 0;
    r->stack[r->depth++] = v; /* owned by its parent or the root */
    return 1;
}

static int on_null(void *ctx)
{
    return place(ctx, json_null());
}

static int on_boolean(void *ctx, int b)
{
    return place(ctx, json_boolean(b));
}

/* A number as json_loadb types and converts it: an integer unless it has a
 * fraction or an exponent, refused when it overflows (jansson's error). */
static int on_number(void *ctx, const char *s, size_t n)
{
    char text[64], *end;

    if (n == 0 || n >= sizeof text)
        return 0;
    memcpy(text, s, n);
    text[n] = '\0';
    errno = 0;
    if (memchr(text, '.', n) || memchr(text, 'e', n) || memchr(text, 'E', n)) {
        double d;

        if (localeconv()->decimal_point[0] != '.') /* jansson converts the point */
            return 0;
        d = strtod(text, &end);
        if (end != text + n || ((d == HUGE_VAL || d == -HUGE_VAL) && errno == ERANGE))
            return 0;
        return place(ctx, json_real(d));
    }
    long long i = strtoll(text, &end, 10);
    if (end != text + n || errno == ERANGE)
        return 0;
    return place(ctx, json_integer(i));
}

static int on_string(void *ctx, const unsigned char *s, size_t n)
{
    return place(ctx, json_stringn_nocheck((const char *)s, n));
}

static int on_start_map(void *ctx)
{
    return open_container(ctx, json_object());
}

/* The key points into the text (no escape was decoded); anything else stops
 * the parse rather than keep a pointer into yajl's buffers. */
static int on_map_key(void *ctx, const unsigned char *key, size_t n)
{
    reader *r = ctx;
    const char *k = (const char *)key;

    if (k < r->text || k > r->text + r->len || n > (size_t)(r->text + r->len - k))
        return 0;
    r->key = k;
    r->key_len = n;
    return 1;
}

/* yajl's offset, read in the callback of a token, is just past the token. */
static int on_end(void *ctx)
{
    reader *r = ctx;

    if (--r->depth == 0)
        r->end = yajl_get_bytes_consumed(r->h);
    return 1;
}

/* Only JSON's whitespace after the root.  yajl does not check this itself
 * when the text ends inside a string: it accepts {"a":1}" (the unfinished
 * token is dropped at the end of the text). */
static int only_space_after(const reader *r)
{
    for (size_t i = r->end; i < r->len; i++)
        if (r->text[i] != ' ' && r->text[i] != '\t' && r->text[i] != '\n' && r->text[i] != '\r')
            return 0;
    return r->end <= r->len;
}

static int on_start_array(void *ctx)
{
    return open_container(ctx, json_array());
}

static const yajl_callbacks callbacks = {
    .yajl_null = on_null,
    .yajl_boolean = on_boolean,
    .yajl_number = on_number,
    .yajl_string = on_string,
    .yajl_start_map = on_start_map,
    .yajl_map_key = on_map_key,
    .yajl_end_map = on_end,
    .yajl_start_array = on_start_array,
    .yajl_end_array = on_end,
};

/* yajl's handle, lexer, buffers and state stack: small blocks made and
 * freed whole every parse, recycled as jansson's are (json_mem). */
static void *yajl_mem_alloc(void *ctx, size_t n)
{
    (void)ctx;
    return json_mem_alloc(n);
}

static void *yajl_mem_realloc(void *ctx, void *p, size_t n)
{
    (void)ctx;
    return json_mem_realloc(p, n);
}

static void yajl_mem_free(void *ctx, void *p)
{
    (void)ctx;
    json_mem_free(p);
}

static yajl_alloc_funcs yajl_mem = {yajl_mem_alloc, yajl_mem_realloc, yajl_mem_free, NULL};

json_t *json_read_plain(const char *text, size_t len, size_t flags)
{
    reader r = {.text = text, .len = len, .reject_dups = (flags & JSON_REJECT_DUPLICATES) != 0};
    yajl_handle h;
    int ok;

    if ((flags & ~(size_t)JSON_REJECT_DUPLICATES) || !text || !plain_text(text, len))
        return NULL;
    if (!(h = yajl_alloc(&callbacks, json_mem_installed() ? &yajl_mem : NULL, &r)))
        return NULL;
    r.h = h;
    /* No yajl_complete_parse: the root is an object or an array, so its
     * closing bracket ends it (depth 0 again), and only_space_after checks
     * the rest of the text.  It would feed the lexer one more space, for
     * which the lexer takes a 2 KiB buffer (a malloc and free a parse). */
    ok = yajl_parse(h, (const unsigned char *)text, len) == yajl_status_ok && r.root &&
         r.depth == 0 && only_space_after(&r);
    yajl_free(h);
    if (!ok) {
        json_decref(r.root);
        return NULL;
    }
    return r.root;
}

json_t *json_read(const char *text, size_t len, size_t flags, json_error_t *err)
{
    json_t *v = json_read_plain(text, len, flags);

    if (!v)
        return json_loadb(text, len, flags, err);
    if (err) { /* as json_loadb leaves it after a success */
        memset(err, 0, sizeof *err);
        err->line = err->column = -1;
        strcpy(err->source, "<buffer>");
    }
    return v;
}
