/* Growing strings with a hard cap (curl's lib/curlx/dynbuf is the model).
 *
 * Every string built from input (URLs, header lines, keys, messages) grows in
 * an iw_buf up to the cap its owner sets; past the cap the addition fails with
 * IW_ERR_TOO_LARGE and the buffer keeps what it held before, so a too-long
 * string is refused by name instead of being truncated into another string.
 *
 * The text helpers make any bytes safe to quote in a message: the result is
 * always valid UTF-8 (invalid sequences become U+FFFD), holds no control
 * character (escaped as \n, \r, \t, \xNN or \u00NN) and is cut at a byte cap
 * without splitting a character (the cut is marked with U+2026). */
#ifndef IW_BUF_H
#define IW_BUF_H

#include <stdarg.h>
#include <stddef.h>

#include "status.h"

typedef struct iw_buf {
    char *ptr;    /* NULL until the first addition */
    size_t len;   /* bytes held, without the terminating NUL */
    size_t alloc; /* bytes allocated */
    size_t cap;   /* most bytes it may hold (without the NUL) */
    int fixed;    /* ptr is the caller's memory (buf_init_on), not malloc'd */
} iw_buf;

/* Sets b empty with a cap of `cap` bytes (the NUL is not counted). */
void buf_init(iw_buf *b, size_t cap);
/* Sets b empty with a cap of `cap` bytes, writing into the caller's
 * mem[0..size) (size >= 1) until it outgrows it, then into memory of its own:
 * a short string built on the stack costs no allocation.  buf_free and
 * buf_steal work as for buf_init (buf_steal then returns a copy). */
void buf_init_on(iw_buf *b, char *mem, size_t size, size_t cap);
/* Frees the memory and leaves b empty (same cap); NULL ok. */
void buf_free(iw_buf *b);
/* Empties b, keeping its memory. */
void buf_reset(iw_buf *b);

/* Appends n bytes: IW_OK, IW_ERR_TOO_LARGE past the cap, IW_ERR_NOMEM; on
 * failure b is unchanged. */
int buf_add(iw_buf *b, const void *mem, size_t n) __attribute__((warn_unused_result));
/* Makes room for n more bytes (and the NUL) without adding them: IW_OK,
 * IW_ERR_TOO_LARGE past the cap, IW_ERR_NOMEM; for a builder that knows the
 * usual size of what it writes. */
int buf_reserve(iw_buf *b, size_t n) __attribute__((warn_unused_result));
/* Appends a NUL-terminated string (as buf_add). */
int buf_adds(iw_buf *b, const char *s) __attribute__((warn_unused_result));
/* Appends the strings of parts, up to the NULL that ends them, with one
 * reservation (as buf_add; all of them or nothing):
 * buf_cat(b, (const char *[]){name, ": ", value, NULL}).  What buf_addf
 * does for "%s%s" without formatting (two passes of printf). */
int buf_cat(iw_buf *b, const char *const *parts) __attribute__((warn_unused_result));
/* Appends printf output (as buf_add; the whole output or nothing). */
int buf_addf(iw_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), warn_unused_result));
int buf_vaddf(iw_buf *b, const char *fmt, va_list ap)
    __attribute__((format(printf, 2, 0), warn_unused_result));

/* The decimal digits of v written backwards so that they end just before
 * `end` (at most 20 of them); returns where they start.  For the numbers
 * written into JSON and RESP without printf. */
char *uint_text(char *end, unsigned long long v);

/* The content, always NUL-terminated ("" when empty); borrowed from b. */
const char *buf_ptr(const iw_buf *b);
size_t buf_len(const iw_buf *b);
/* Hands the content to the caller (malloc'd, NUL-terminated, never NULL
 * unless out of memory) and leaves b empty. */
char *buf_steal(iw_buf *b);

/* Appends bytes[0..n) as safe message text (see the top of this file), at
 * most max_bytes of it: a longer text is cut at a character boundary and ends
 * with U+2026 within max_bytes (max_bytes >= 3).  IW_ERR_TOO_LARGE only when
 * b's own cap is reached (b then unchanged), IW_ERR_NOMEM. */
int buf_add_text(iw_buf *b, const void *bytes, size_t n, size_t max_bytes)
    __attribute__((warn_unused_result));

/* bytes[0..n) as safe message text of at most max_bytes (as buf_add_text), in
 * a new NUL-terminated string the caller frees; NULL only when out of memory.
 * For messages that quote input, e.g. the content_type of a job. */
char *text_quote(const void *bytes, size_t n, size_t max_bytes);

/* The length of the longest prefix of s[0..len) of at most max bytes that
 * does not end inside a UTF-8 sequence (for cutting valid UTF-8). */
size_t utf8_prefix(const char *s, size_t len, size_t max);

/* The length of the valid UTF-8 sequence starting s[0..n) (n > 0), or 0 when
 * it is not one (as utf8_valid decides). */
size_t utf8_next(const void *s, size_t n);

/* 1 if s[0..len) is valid UTF-8 (no overlong forms, surrogates or code
 * points past U+10FFFF), else 0. */
int utf8_valid(const void *s, size_t len);

#endif
