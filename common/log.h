/* Structured logging: one JSON object per line on stderr, in the spec's shape
 * (timestamp, level, service, interface, ...).  Callers never pass secrets. */
#ifndef IW_LOG_H
#define IW_LOG_H

#include <jansson.h>
#include <stdio.h>

#include "buf.h"
#include "config.h"
#include "json_out.h"

void log_init(int level, const char *service, FILE *out);
int log_enabled(int level);

/* Writes one line with timestamp, level, service and interface followed by
 * the members of `fields`; steals the reference to `fields` (NULL ok). */
void log_json(int level, json_t *fields);

/* A line with a "message" member, plus optional extra fields (stolen).  The
 * message is made valid UTF-8 without control bytes and cut at 16 KiB on a
 * character boundary, so input quoted in it never loses the line. */
void log_msg(int level, json_t *fields, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* A line written member by member, for the lines of every job (no jansson
 * object built to be dumped):
 *
 *     log_line l;
 *     if (log_line_begin(&l, IW_LOG_INFO)) {
 *         jw_str(&l.w, "requestId", id);
 *         log_line_end(&l);
 *     }
 *
 * log_line_begin returns 0 when the level is off (then nothing to end).
 * A member that cannot be written (text that is not UTF-8, a line past
 * 1 MiB) turns the line into one saying so; the line is never half. */
typedef struct log_line {
    json_w w;
    iw_buf b;
    int level;
    char mem[2048];
} log_line;

int log_line_begin(log_line *l, int level);
void log_line_end(log_line *l);

/* Flushes buffered lines; the loop calls it once per turn. */
void log_flush(void);

/* "2024-01-01T00:00:00.123Z" for the wall clock in milliseconds (clamped to
 * years 1970..9999); needs len >= 25, else buf is "". */
void format_timestamp(long long wall_ms, char *buf, size_t len);

#endif
