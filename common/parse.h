/* Pure parsers for the settings' value syntaxes; no allocation, no I/O. */
#ifndef IW_PARSE_H
#define IW_PARSE_H

#include <stddef.h>

#include "status.h"

#define IW_MAX_TIERS 8
#define IW_MAX_SCHEDULE 32

/* One tier of a rate limit: at most `limit` calls in any window of `window_ms`. */
typedef struct iw_rate_tier {
    long limit;
    long window_ms;
} iw_rate_tier;

/* "1500ms", "2s", "1m", "24h", "1d" (and a bare "0") -> milliseconds. */
int parse_duration_ms(const char *s, long *out, iw_error *err);

/* A non-negative decimal integer within [min, max]. */
int parse_long(const char *s, long min, long max, long *out, iw_error *err);

/* "50/min,1000/hour,20000/day": units s, sec, min, hour, day (also a duration
 * such as "30/10s"). At most IW_MAX_TIERS tiers. */
int parse_rate_limits(const char *s, iw_rate_tier *tiers, size_t *n, iw_error *err);

/* "0s,2s,4s,8s" -> durations; at least one, at most IW_MAX_SCHEDULE. */
int parse_schedule(const char *s, long *ms, size_t *n, iw_error *err);

/* Formats a duration compactly ("250ms", "2s", "5m", "24h") into buf. */
const char *format_duration(long ms, char *buf, size_t len);

#endif
