/* JSON text without a detour: jansson values dumped straight into an iw_buf,
 * and a writer for the few objects we build only to send.
 *
 * json_dumps(v, JSON_COMPACT) pays for a callback per token, a strbuffer that
 * grows by copying and, for a message we build only to send, a tree of
 * values allocated and freed again.  The bytes here are the same as
 * jansson's compact form (object members in jansson's order, the same
 * escapes, reals as jansson prints them), so a reader cannot tell them apart;
 * what is not valid UTF-8 is refused as jansson refuses it. */
#ifndef IW_JSON_OUT_H
#define IW_JSON_OUT_H

#include <jansson.h>

#include "buf.h"

/* The most bytes json_out_text writes (a job or a record is far smaller). */
#define JSON_OUT_MAX (64u << 20)

/* Appends v as compact JSON text: IW_OK; IW_ERR_INVALID for a string or key
 * that is not valid UTF-8 or nesting past 2,048 levels; IW_ERR_TOO_LARGE
 * past b's cap; IW_ERR_NOMEM.  On failure b holds what it held before. */
int json_out(iw_buf *b, const json_t *v) __attribute__((warn_unused_result));

/* v as compact JSON text in a new NUL-terminated string the caller frees,
 * its length in *len when len is not NULL: json_dumps(v, JSON_COMPACT |
 * JSON_ENCODE_ANY) without its cost; NULL when v is NULL, not dumpable, or out
 * of memory. */
char *json_out_text(const json_t *v, size_t *len);

/* Appends bytes[0..n) as a JSON string, quotes included (as json_out). */
int json_out_string(iw_buf *b, const char *s, size_t n) __attribute__((warn_unused_result));

/* The writer: an object written member by member, nothing built in memory.
 * The first failure sticks (a NULL value is IW_ERR_INVALID, as json_pack
 * refuses one) and jw_end returns it; on failure b holds what it held at
 * jw_begin.  Members nest up to 8 levels deep (jw_open .. jw_close). */
typedef struct json_w {
    iw_buf *b;
    size_t start;  /* b's length at jw_begin */
    int rc;        /* the first failure, or IW_OK */
    int depth;     /* objects open, the outermost included */
    unsigned rest; /* bit d: the object at depth d has a member already */
} json_w;

void jw_begin(json_w *w, iw_buf *b);
/* Goes on with an object already open in b: its "{" and some members were
 * written from b's length `start` on (a log line's head); jw_end closes it
 * and on failure puts b back to `start`. */
void jw_resume(json_w *w, iw_buf *b, size_t start);
/* "key":"value" (value NUL-terminated) */
void jw_str(json_w *w, const char *key, const char *value);
/* "key":number */
void jw_int(json_w *w, const char *key, long long value);
/* "key":<v as json_out writes it> */
void jw_json(json_w *w, const char *key, const json_t *v);
/* "key":null */
void jw_null(json_w *w, const char *key);
/* Every member of the object obj (a non-object is IW_ERR_INVALID). */
void jw_members(json_w *w, const json_t *obj);
/* "key":{ ... jw_close */
void jw_open(json_w *w, const char *key);
void jw_close(json_w *w);
/* Closes the outermost object: IW_OK or the first failure. */
int jw_end(json_w *w) __attribute__((warn_unused_result));

#endif
