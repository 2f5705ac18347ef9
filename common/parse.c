#include "parse.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int parse_long(const char *s, long min, long max, long *out, iw_error *err)
{
    char *end;
    long v;

    if (!s || !isdigit((unsigned char)*s))
        return iw_error_set(err, IW_ERR_INVALID, "'%s' is not a whole number", s ? s : "");
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end)
        return iw_error_set(err, IW_ERR_INVALID, "'%s' is not a whole number", s);
    if (v < min || v > max)
        return iw_error_set(err, IW_ERR_INVALID, "%ld is outside %ld..%ld", v, min, max);
    *out = v;
    return IW_OK;
}

static const struct {
    const char *unit;
    long ms;
} duration_units[] = {
    {"ms", 1},      {"s", 1000},       {"sec", 1000},   {"m", 60000},      {"min", 60000},
    {"h", 3600000}, {"hour", 3600000}, {"d", 86400000}, {"day", 86400000},
};

/* Parses a number followed by a unit from the table; `bare_unit_ms` is used
 * when there is no number ("min" in "50/min"), 0 forbids it. */
static int parse_with_units(const char *s, long bare_unit_ms, long *out, iw_error *err)
{
    const char *p = s;
    long n = 1;
    size_t i;

    if (isdigit((unsigned char)*p)) {
        char *end;
        errno = 0;
        n = strtol(p, &end, 10);
        if (errno || n < 0)
            return iw_error_set(err, IW_ERR_INVALID, "'%s' is not a duration", s);
        p = end;
        if (*p == '\0') {
            if (n == 0) {
                *out = 0;
                return IW_OK;
            }
            return iw_error_set(err, IW_ERR_INVALID, "'%s' needs a unit (ms, s, m, h)", s);
        }
    } else if (!bare_unit_ms) {
        return iw_error_set(err, IW_ERR_INVALID, "'%s' is not a duration", s);
    }
    for (i = 0; i < sizeof duration_units / sizeof duration_units[0]; i++) {
        if (strcmp(p, duration_units[i].unit) == 0) {
            if (n > LONG_MAX / duration_units[i].ms)
                return iw_error_set(err, IW_ERR_INVALID, "'%s' is too long", s);
            *out = n * duration_units[i].ms;
            return IW_OK;
        }
    }
    return iw_error_set(err, IW_ERR_INVALID, "'%s' has an unknown unit (ms, s, m, h)", s);
}

int parse_duration_ms(const char *s, long *out, iw_error *err)
{
    if (!s || !*s)
        return iw_error_set(err, IW_ERR_INVALID, "empty duration");
    return parse_with_units(s, 0, out, err);
}

/* Splits a comma list in place into trimmed items; returns their count or -1. */
static int split_list(char *buf, char **items, size_t max)
{
    size_t n = 0;
    char *rest = buf;

    /* strsep, not strtok_r: an empty item ("1s,,") is an error, not skipped */
    for (char *tok = strsep(&rest, ","); tok; tok = strsep(&rest, ",")) {
        while (isspace((unsigned char)*tok))
            tok++;
        char *end = tok + strlen(tok);
        while (end > tok && isspace((unsigned char)end[-1]))
            *--end = '\0';
        if (n == max)
            return -1;
        items[n++] = tok;
    }
    return (int)n;
}

int parse_rate_limits(const char *s, iw_rate_tier *tiers, size_t *n, iw_error *err)
{
    char buf[512], *items[IW_MAX_TIERS];
    int count;

    if (!s || strlen(s) >= sizeof buf)
        return iw_error_set(err, IW_ERR_INVALID, "rate limits missing or too long");
    strcpy(buf, s);
    count = split_list(buf, items, IW_MAX_TIERS);
    if (count <= 0)
        return iw_error_set(err, IW_ERR_INVALID, "expected N/T[,N/T...] with at most %d tiers",
                            IW_MAX_TIERS);
    for (int i = 0; i < count; i++) {
        char *slash = strchr(items[i], '/');
        long limit, window;
        if (!slash)
            return iw_error_set(err, IW_ERR_INVALID, "'%s' is not N/T (e.g. 50/min)", items[i]);
        *slash = '\0';
        if (parse_long(items[i], 1, 1000000000L, &limit, NULL) != IW_OK)
            return iw_error_set(err, IW_ERR_INVALID, "'%s' is not a positive count", items[i]);
        if (parse_with_units(slash + 1, 1, &window, NULL) != IW_OK || window <= 0)
            return iw_error_set(err, IW_ERR_INVALID,
                                "'%s' is not a window (s, min, hour, day or a duration)",
                                slash + 1);
        tiers[i].limit = limit;
        tiers[i].window_ms = window;
    }
    *n = (size_t)count;
    return IW_OK;
}

int parse_schedule(const char *s, long *ms, size_t *n, iw_error *err)
{
    char buf[512], *items[IW_MAX_SCHEDULE];
    int count;

    if (!s || strlen(s) >= sizeof buf)
        return iw_error_set(err, IW_ERR_INVALID, "schedule missing or too long");
    strcpy(buf, s);
    count = split_list(buf, items, IW_MAX_SCHEDULE);
    if (count <= 0)
        return iw_error_set(err, IW_ERR_INVALID,
                            "expected a list of durations with at most %d items", IW_MAX_SCHEDULE);
    for (int i = 0; i < count; i++) {
        iw_error e;
        if (parse_duration_ms(items[i], &ms[i], &e) != IW_OK)
            return iw_error_set(err, IW_ERR_INVALID, "%s", e.msg);
    }
    *n = (size_t)count;
    return IW_OK;
}

const char *format_duration(long ms, char *buf, size_t len)
{
    if (ms % 3600000 == 0 && ms)
        snprintf(buf, len, "%ldh", ms / 3600000);
    else if (ms % 60000 == 0 && ms)
        snprintf(buf, len, "%ldm", ms / 60000);
    else if (ms % 1000 == 0)
        snprintf(buf, len, "%lds", ms / 1000);
    else
        snprintf(buf, len, "%ldms", ms);
    return buf;
}
