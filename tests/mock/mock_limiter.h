/* Sliding-log rate limiter of the mock provider.
 *
 * A tier "N/T" admits a request only if fewer than N requests were admitted
 * in the window (now - T, now]; every tier keeps the timestamps of its
 * admitted requests in a ring of N slots, so the answer is exact for ANY
 * window of length T, not only for aligned ones.  Pure: the caller passes a
 * monotonic time in nanoseconds and serialises calls. */
#ifndef MOCK_LIMITER_H
#define MOCK_LIMITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MOCK_LIMITER_MAX_TIERS 8
#define MOCK_LIMITER_MAX_LIMIT 1000000L

typedef struct mock_rate_tier {
    long limit;        /* N: requests admitted per window */
    int64_t window_ns; /* T */
} mock_rate_tier;

/* Parsed --rate-limits; n == 0 means "off". */
typedef struct mock_rate_spec {
    int n;
    mock_rate_tier tiers[MOCK_LIMITER_MAX_TIERS];
} mock_rate_spec;

/* Parses "off" or a comma-separated list of N/UNIT (UNIT one of s, min,
 * hour, day), e.g. "50/min,1000/hour".  Returns 0, or -1 with a one-line
 * message in err. */
int mock_rate_spec_parse(const char *text, mock_rate_spec *out, char *err, size_t errlen);

typedef struct mock_limiter mock_limiter;

/* What mock_limiter_admit decided.  When admitted, limit and remaining
 * describe the tier with the fewest slots left (after this request); when
 * refused, they describe the tier that frees a slot last, and wait_ns is
 * the time until every refusing tier has a free slot (> 0). */
typedef struct mock_limit_verdict {
    bool admitted;
    long limit;
    long remaining;
    int64_t wait_ns;
} mock_limit_verdict;

/* New limiter for spec (copied), or NULL when out of memory. */
mock_limiter *mock_limiter_new(const mock_rate_spec *spec);

/* Frees the limiter; NULL is harmless. */
void mock_limiter_free(mock_limiter *lim);

/* Forgets every admitted request. */
void mock_limiter_reset(mock_limiter *lim);

/* Whether the limiter has at least one tier. */
bool mock_limiter_enabled(const mock_limiter *lim);

/* Admits (and records) a request at now_ns, or refuses it without recording
 * anything.  now_ns must not go backwards between calls. */
void mock_limiter_admit(mock_limiter *lim, int64_t now_ns, mock_limit_verdict *verdict);

#endif
