/* JSON text to a jansson value: json_loadb's result, faster for plain text.
 *
 * jansson's reader takes about 150 instructions a byte (a call through its
 * stream and a buffer append for every character), a fifth of the worker's
 * instructions for the two documents of a job (the message and the
 * provider's answer).  yajl's lexer does the same work in a fraction of
 * that; its tokens become jansson values here, member by member.
 *
 * The fast way is taken only for text where the two readers cannot differ:
 * every byte is printable ASCII, a tab, a line feed, a carriage return or
 * part of a valid UTF-8 sequence (as utf8_valid decides), there is no
 * backslash (no escape to decode), the top level is an object or an array
 * nested at most JSON_READ_DEPTH deep, every number fits its jansson type
 * and, with JSON_REJECT_DUPLICATES, no object repeats a key.  Anything else,
 * and anything yajl refuses, is read by json_loadb itself, which so decides
 * every error and its text.  A differential test holds the two to the same
 * value for every input (tests/unit/test_json_read.c, tests/fuzz). */
#ifndef IW_JSON_READ_H
#define IW_JSON_READ_H

#include <jansson.h>
#include <stddef.h>

#define JSON_READ_DEPTH 64

/* As json_loadb(text, len, flags, err) for flags 0 or JSON_REJECT_DUPLICATES
 * (any other flag: json_loadb itself). */
json_t *json_read(const char *text, size_t len, size_t flags, json_error_t *err);

/* The fast way alone, for tests: the value, or NULL where json_read hands
 * the text to json_loadb. */
json_t *json_read_plain(const char *text, size_t len, size_t flags);

#endif
