#include "json_out.h"

#include <string.h>

#define JSON_OUT_DEPTH 2048 /* jansson's own parser stops at 2,048 levels */
#define JW_DEPTH 8

/* Appends n bytes: straight into the room b has (the NUL is written once at
 * the end, json_out's `done`), through buf_add when it must grow. */
static inline int put(iw_buf *b, const char *s, size_t n)
{
    if (b->ptr && b->alloc - b->len > n) {
        memcpy(b->ptr + b->len, s, n);
        b->len += n;
        return IW_OK;
    }
    return buf_add(b, s, n);
}

/* Puts b back to `start` bytes after a failure, NUL-terminated. */
static int undo(iw_buf *b, size_t start, int rc)
{
    b->len = start;
    if (b->ptr)
        b->ptr[start] = '\0';
    return rc;
}

static int done(iw_buf *b)
{
    if (b->ptr)
        b->ptr[b->len] = '\0';
    return IW_OK;
}

/* What a byte needs in a JSON string: 0 nothing (printable ASCII), 1 an
 * escape (", \\ and bytes below 0x20), 2 a check of the UTF-8 sequence it
 * starts (0x80 and above). */
static const unsigned char byte_class[256] = {
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
};

/* A string's text as jansson writes it: \" \\ \b \f \n \r \t, other bytes
 * below 0x20 as \u00XX (upper-case hex), everything else as it is.  Runs of
 * bytes that need nothing are copied whole. */
static int put_string(iw_buf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, run = 0;
    int rc;

    while (i < n && !byte_class[u[i]])
        i++;
    if (i == n && b->ptr && b->alloc - b->len > n + 2) { /* the usual string: one copy */
        char *p = b->ptr + b->len;
        p[0] = '"';
        memcpy(p + 1, s, n);
        p[n + 1] = '"';
        b->len += n + 2;
        return IW_OK;
    }
    if ((rc = put(b, "\"", 1)) != IW_OK)
        return rc;
    while (i < n) {
        char esc[6] = {'\\', 0, '0', '0', 0, 0};
        size_t k = 2;
        unsigned char c;

        while (i < n && !byte_class[u[i]])
            i++;
        if (i == n)
            break;
        c = u[i];
        if (byte_class[c] == 2) {
            size_t len = utf8_next(s + i, n - i);
            if (!len)
                return IW_ERR_INVALID;
            i += len;
            continue;
        }
        switch (c) {
        case '"':
        case '\\':
            esc[1] = (char)c;
            break;
        case '\b':
            esc[1] = 'b';
            break;
        case '\f':
            esc[1] = 'f';
            break;
        case '\n':
            esc[1] = 'n';
            break;
        case '\r':
            esc[1] = 'r';
            break;
        case '\t':
            esc[1] = 't';
            break;
        default:
            esc[1] = 'u';
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            k = 6;
        }
        if ((rc = put(b, s + run, i - run)) != IW_OK || (rc = put(b, esc, k)) != IW_OK)
            return rc;
        run = ++i;
    }
    if ((rc = put(b, s + run, n - run)) != IW_OK)
        return rc;
    return put(b, "\"", 1);
}

static int put_integer(iw_buf *b, json_int_t v)
{
    char text[24];
    char *p =
        uint_text(text + sizeof text, v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v);

    if (v < 0)
        *--p = '-';
    return put(b, p, (size_t)(text + sizeof text - p));
}

/* A real as jansson prints it (its shortest round-trip form, ".0" added). */
static int put_real(iw_buf *b, const json_t *v)
{
    char text[64];
    size_t n = json_dumpb(v, text, sizeof text, JSON_ENCODE_ANY);

    if (!n || n > sizeof text)
        return IW_ERR_INVALID;
    return put(b, text, n);
}

static int put_value(iw_buf *b, const json_t *v, int depth)
{
    int rc = IW_OK;

    if (depth > JSON_OUT_DEPTH)
        return IW_ERR_INVALID;
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        void *it = json_object_iter((json_t *)v);
        const char *sep = "{";

        if (!it)
            return put(b, "{}", 2);
        for (; it; it = json_object_iter_next((json_t *)v, it)) {
            const char *key = json_object_iter_key(it);
#if JANSSON_VERSION_HEX >= 0x020e00
            size_t key_len = json_object_iter_key_len(it);
#else
            size_t key_len = strlen(key);
#endif
            if ((rc = put(b, sep, 1)) != IW_OK || (rc = put_string(b, key, key_len)) != IW_OK ||
                (rc = put(b, ":", 1)) != IW_OK ||
                (rc = put_value(b, json_object_iter_value(it), depth + 1)) != IW_OK)
                return rc;
            sep = ",";
        }
        return put(b, "}", 1);
    }
    case JSON_ARRAY: {
        size_t i, n = json_array_size(v);

        if (!n)
            return put(b, "[]", 2);
        for (i = 0; i < n; i++)
            if ((rc = put(b, i ? "," : "[", 1)) != IW_OK ||
                (rc = put_value(b, json_array_get(v, i), depth + 1)) != IW_OK)
                return rc;
        return put(b, "]", 1);
    }
    case JSON_STRING:
        return put_string(b, json_string_value(v), json_string_length(v));
    case JSON_INTEGER:
        return put_integer(b, json_integer_value(v));
    case JSON_REAL:
        return put_real(b, v);
    case JSON_TRUE:
        return put(b, "true", 4);
    case JSON_FALSE:
        return put(b, "false", 5);
    case JSON_NULL:
        return put(b, "null", 4);
    }
    return IW_ERR_INVALID;
}

int json_out(iw_buf *b, const json_t *v)
{
    size_t start = b->len;
    int rc = v ? put_value(b, v, 1) : IW_ERR_INVALID;

    return rc == IW_OK ? done(b) : undo(b, start, rc);
}

int json_out_string(iw_buf *b, const char *s, size_t n)
{
    size_t start = b->len;
    int rc = s ? put_string(b, s, n) : IW_ERR_INVALID;

    return rc == IW_OK ? done(b) : undo(b, start, rc);
}

char *json_out_text(const json_t *v, size_t *len)
{
    iw_buf b;

    buf_init(&b, JSON_OUT_MAX);
    /* one allocation for the messages we write (a few hundred bytes) */
    if (!v || buf_reserve(&b, 256) != IW_OK || json_out(&b, v) != IW_OK) {
        buf_free(&b);
        return NULL;
    }
    if (len)
        *len = buf_len(&b);
    return buf_steal(&b);
}

void jw_begin(json_w *w, iw_buf *b)
{
    w->b = b;
    w->start = b->len;
    w->depth = 1;
    w->rest = 0;
    w->rc = put(b, "{", 1);
}

void jw_resume(json_w *w, iw_buf *b, size_t start)
{
    w->b = b;
    w->start = start;
    w->depth = 1;
    w->rest = 1u << 1;
    w->rc = IW_OK;
}

/* The member's "key": with the comma before it; 0 once something failed. */
static int member(json_w *w, const char *key)
{
    unsigned bit = 1u << w->depth;

    if (w->rc != IW_OK)
        return 0;
    if (w->rest & bit)
        w->rc = put(w->b, ",", 1);
    w->rest |= bit;
    if (w->rc == IW_OK)
        w->rc = put_string(w->b, key, strlen(key));
    if (w->rc == IW_OK)
        w->rc = put(w->b, ":", 1);
    return w->rc == IW_OK;
}

void jw_str(json_w *w, const char *key, const char *value)
{
    if (!value && w->rc == IW_OK)
        w->rc = IW_ERR_INVALID;
    if (member(w, key))
        w->rc = put_string(w->b, value, strlen(value));
}

void jw_int(json_w *w, const char *key, long long value)
{
    if (member(w, key))
        w->rc = put_integer(w->b, (json_int_t)value);
}

void jw_json(json_w *w, const char *key, const json_t *v)
{
    if (!v && w->rc == IW_OK)
        w->rc = IW_ERR_INVALID;
    if (member(w, key))
        w->rc = put_value(w->b, v, w->depth + 1);
}

void jw_null(json_w *w, const char *key)
{
    if (member(w, key))
        w->rc = put(w->b, "null", 4);
}

void jw_members(json_w *w, const json_t *obj)
{
    void *it;

    if (!json_is_object(obj) && w->rc == IW_OK)
        w->rc = IW_ERR_INVALID;
    for (it = json_object_iter((json_t *)obj); it && w->rc == IW_OK;
         it = json_object_iter_next((json_t *)obj, it))
        jw_json(w, json_object_iter_key(it), json_object_iter_value(it));
}

void jw_open(json_w *w, const char *key)
{
    if (w->depth + 1 >= JW_DEPTH && w->rc == IW_OK)
        w->rc = IW_ERR_INVALID;
    if (!member(w, key) || (w->rc = put(w->b, "{", 1)) != IW_OK)
        return;
    w->depth++;
    w->rest &= ~(1u << w->depth);
}

void jw_close(json_w *w)
{
    if (w->depth <= 1 && w->rc == IW_OK)
        w->rc = IW_ERR_INVALID;
    if (w->rc != IW_OK)
        return;
    w->rc = put(w->b, "}", 1);
    w->depth--;
}

int jw_end(json_w *w)
{
    if (w->depth != 1 && w->rc == IW_OK)
        w->rc = IW_ERR_INVALID;
    if (w->rc == IW_OK)
        w->rc = put(w->b, "}", 1);
    return w->rc == IW_OK ? done(w->b) : undo(w->b, w->start, w->rc);
}
