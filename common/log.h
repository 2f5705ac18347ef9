/* Structured logging: one JSON object per line on stderr, in the spec's shape
 * (timestamp, level, service, interface, ...).  Callers never pass secrets. */
#ifndef IW_LOG_H
#define IW_LOG_H

#include <jansson.h>
#include <stdio.h>

#include "config.h"

void log_init(int level, const char *service, FILE *out);
int log_enabled(int level);

/* Writes one line with timestamp, level, service and interface followed by
 * the members of `fields`; steals the reference to `fields` (NULL ok). */
void log_json(int level, json_t *fields);

/* A line with a "message" member, plus optional extra fields (stolen).  The
 * message is made valid UTF-8 without control bytes and cut at 16 KiB on a
 * character boundary, so input quoted in it never loses the line. */
void log_msg(int level, json_t *fields, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Flushes buffered lines; the loop calls it once per turn. */
void log_flush(void);

/* "2024-01-01T00:00:00.123Z" for the wall clock in milliseconds (clamped to
 * years 1970..9999); needs len >= 25, else buf is "". */
void format_timestamp(long long wall_ms, char *buf, size_t len);

#endif
