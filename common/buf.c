#include "buf.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void buf_init(iw_buf *b, size_t cap)
{
    b->ptr = NULL;
    b->len = 0;
    b->alloc = 0;
    b->cap = cap;
    b->fixed = 0;
}

void buf_init_on(iw_buf *b, char *mem, size_t size, size_t cap)
{
    b->ptr = mem;
    b->len = 0;
    b->alloc = size - 1 > cap ? cap + 1 : size; /* never room past the cap */
    b->cap = cap;
    b->fixed = 1;
    mem[0] = '\0';
}

void buf_free(iw_buf *b)
{
    if (!b)
        return;
    if (!b->fixed)
        free(b->ptr);
    b->ptr = NULL;
    b->len = 0;
    b->alloc = 0;
    b->fixed = 0;
}

void buf_reset(iw_buf *b)
{
    b->len = 0;
    if (b->ptr)
        b->ptr[0] = '\0';
}

/* Makes room for n more bytes and the NUL, within the cap. */
static int reserve(iw_buf *b, size_t n)
{
    size_t need, a;
    char *p;

    if (n > b->cap || b->len > b->cap - n)
        return IW_ERR_TOO_LARGE;
    need = b->len + n + 1;
    if (need <= b->alloc)
        return IW_OK;
    a = b->alloc ? b->alloc : 32;
    while (a < need)
        a = a > SIZE_MAX / 2 ? need : a * 2;
    if (a > b->cap + 1)
        a = b->cap + 1;
    if (b->fixed) { /* leaves the caller's memory */
        if (!(p = malloc(a)))
            return IW_ERR_NOMEM;
        memcpy(p, b->ptr, b->len + 1);
        b->fixed = 0;
    } else if (!(p = realloc(b->ptr, a))) {
        return IW_ERR_NOMEM;
    }
    b->ptr = p;
    b->alloc = a;
    return IW_OK;
}

int buf_reserve(iw_buf *b, size_t n)
{
    return reserve(b, n);
}

int buf_add(iw_buf *b, const void *mem, size_t n)
{
    int rc = reserve(b, n);

    if (rc != IW_OK)
        return rc;
    if (n)
        memcpy(b->ptr + b->len, mem, n);
    b->len += n;
    b->ptr[b->len] = '\0';
    return IW_OK;
}

int buf_adds(iw_buf *b, const char *s)
{
    return buf_add(b, s, strlen(s));
}

int buf_cat(iw_buf *b, const char *const *parts)
{
    size_t n = 0, k;
    int rc;

    for (const char *const *p = parts; *p; p++) {
        k = strlen(*p);
        if (k > b->cap - n)
            return IW_ERR_TOO_LARGE;
        n += k;
    }
    if ((rc = reserve(b, n)) != IW_OK)
        return rc;
    for (const char *const *p = parts; *p; p++) {
        k = strlen(*p);
        memcpy(b->ptr + b->len, *p, k);
        b->len += k;
    }
    b->ptr[b->len] = '\0';
    return IW_OK;
}

int buf_vaddf(iw_buf *b, const char *fmt, va_list ap)
{
    va_list ap2;
    int n, rc;

    /* first into the room there is: most texts fit, and are formatted once */
    va_copy(ap2, ap);
    if (b->ptr && b->alloc > b->len) {
        n = vsnprintf(b->ptr + b->len, b->alloc - b->len, fmt, ap2);
        if (n >= 0 && (size_t)n < b->alloc - b->len && (size_t)n <= b->cap - b->len) {
            va_end(ap2);
            b->len += (size_t)n;
            return IW_OK;
        }
        b->ptr[b->len] = '\0'; /* b unchanged */
    } else {
        n = vsnprintf(NULL, 0, fmt, ap2);
    }
    va_end(ap2);
    if (n < 0)
        return IW_ERR_INVALID;
    rc = reserve(b, (size_t)n);
    if (rc != IW_OK)
        return rc;
    vsnprintf(b->ptr + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
    return IW_OK;
}

int buf_addf(iw_buf *b, const char *fmt, ...)
{
    va_list ap;
    int rc;

    va_start(ap, fmt);
    rc = buf_vaddf(b, fmt, ap);
    va_end(ap);
    return rc;
}

char *uint_text(char *end, unsigned long long v)
{
    do {
        *--end = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return end;
}

const char *buf_ptr(const iw_buf *b)
{
    return b->ptr ? b->ptr : "";
}

size_t buf_len(const iw_buf *b)
{
    return b->len;
}

char *buf_steal(iw_buf *b)
{
    char *p;

    if (b->fixed) {
        if ((p = malloc(b->len + 1)))
            memcpy(p, b->ptr, b->len + 1);
    } else {
        p = b->ptr ? b->ptr : strdup("");
    }
    b->ptr = NULL;
    b->len = 0;
    b->alloc = 0;
    b->fixed = 0;
    return p;
}

/* Decodes one UTF-8 sequence at s (n > 0 bytes left): its length when valid
 * (and the code point in *cp), else 0 with *bad the length of the maximal
 * invalid subpart to replace by one U+FFFD (Unicode's "best practice"). */
static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp, size_t *bad)
{
    unsigned char c = s[0];
    size_t len, i;
    uint32_t v;
    unsigned char lo = 0x80, hi = 0xBF;

    *bad = 1;
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        v = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        v = c & 0x0F;
        if (c == 0xE0)
            lo = 0xA0; /* overlong */
        else if (c == 0xED)
            hi = 0x9F; /* surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        v = c & 0x07;
        if (c == 0xF0)
            lo = 0x90; /* overlong */
        else if (c == 0xF4)
            hi = 0x8F; /* past U+10FFFF */
    } else {
        return 0;
    }
    for (i = 1; i < len; i++) {
        if (i >= n || s[i] < lo || s[i] > hi) {
            *bad = i;
            return 0;
        }
        v = (v << 6) | (s[i] & 0x3F);
        lo = 0x80;
        hi = 0xBF;
    }
    *cp = v;
    return len;
}

size_t utf8_next(const void *s, size_t n)
{
    uint32_t cp;
    size_t bad;

    return utf8_decode(s, n, &cp, &bad);
}

int utf8_valid(const void *s, size_t len)
{
    const unsigned char *p = s;
    size_t i = 0, bad;
    uint32_t cp;

    while (i < len) {
        size_t k = utf8_decode(p + i, len - i, &cp, &bad);
        if (!k)
            return 0;
        i += k;
    }
    return 1;
}

size_t utf8_prefix(const char *s, size_t len, size_t max)
{
    size_t n = len < max ? len : max;

    if (n == len)
        return n;
    /* s[n] is the first byte left out: back up while it continues a sequence */
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    return n;
}

/* The safe text form of one decoded piece of input, into out (>= 7 bytes). */
static size_t text_piece(const unsigned char *s, size_t n, size_t *used, char out[8])
{
    uint32_t cp;
    size_t bad, k = utf8_decode(s, n, &cp, &bad);
    static const char hex[] = "0123456789abcdef";

    if (!k) {
        *used = bad;
        memcpy(out, "\xEF\xBF\xBD", 3); /* U+FFFD */
        return 3;
    }
    *used = k;
    if (cp == '\n' || cp == '\r' || cp == '\t') {
        out[0] = '\\';
        out[1] = cp == '\n' ? 'n' : cp == '\r' ? 'r' : 't';
        return 2;
    }
    if (cp < 0x20 || cp == 0x7F) {
        out[0] = '\\';
        out[1] = 'x';
        out[2] = hex[cp >> 4];
        out[3] = hex[cp & 15];
        return 4;
    }
    if (cp >= 0x80 && cp <= 0x9F) { /* C1 controls */
        memcpy(out, "\\u00", 4);
        out[4] = hex[cp >> 4];
        out[5] = hex[cp & 15];
        return 6;
    }
    memcpy(out, s, k);
    return k;
}

int buf_add_text(iw_buf *b, const void *bytes, size_t n, size_t max_bytes)
{
    static const char ellipsis[] = "\xE2\x80\xA6"; /* U+2026 */
    const unsigned char *s = bytes;
    size_t start = b->len, written = 0, total = 0, room, i;
    int rc = IW_OK;
    char piece[8];

    if (max_bytes < 3)
        max_bytes = 3;
    /* first the length of the whole safe text: it either fits, or is cut
     * with room for the ellipsis */
    for (i = 0; i < n && total <= max_bytes;) {
        size_t used;
        total += text_piece(s + i, n - i, &used, piece);
        i += used;
    }
    room = total <= max_bytes ? max_bytes : max_bytes - 3;
    for (i = 0; i < n;) {
        size_t used, k = text_piece(s + i, n - i, &used, piece);
        if (written + k > room)
            break;
        if ((rc = buf_add(b, piece, k)) != IW_OK)
            goto out;
        written += k;
        i += used;
    }
    if (i < n)
        rc = buf_add(b, ellipsis, 3);
out:
    if (rc != IW_OK) {
        b->len = start;
        if (b->ptr)
            b->ptr[start] = '\0';
    }
    return rc;
}

char *text_quote(const void *bytes, size_t n, size_t max_bytes)
{
    iw_buf b;

    buf_init(&b, max_bytes < 3 ? 3 : max_bytes);
    if (buf_add_text(&b, bytes, n, max_bytes) != IW_OK) {
        buf_free(&b);
        return NULL;
    }
    return buf_steal(&b);
}
