#include "mock_limiter.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NS_PER_S 1000000000LL

static const struct {
    const char *name;
    int64_t ns;
} units[] = {
    {"s", NS_PER_S},
    {"min", 60 * NS_PER_S},
    {"hour", 3600 * NS_PER_S},
    {"day", 86400 * NS_PER_S},
};

int mock_rate_spec_parse(const char *text, mock_rate_spec *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (strcmp(text, "off") == 0)
        return 0;
    const char *p = text;
    for (;;) {
        if (out->n == MOCK_LIMITER_MAX_TIERS) {
            snprintf(err, errlen, "at most %d rate-limit tiers", MOCK_LIMITER_MAX_TIERS);
            return -1;
        }
        char *end;
        errno = 0;
        long n = strtol(p, &end, 10);
        if (end == p || errno || n < 1 || n > MOCK_LIMITER_MAX_LIMIT || *end != '/') {
            snprintf(err, errlen, "bad rate limit near \"%s\" (want N/UNIT, 1 <= N <= %ld)", p,
                     MOCK_LIMITER_MAX_LIMIT);
            return -1;
        }
        const char *unit = end + 1;
        size_t ulen = strcspn(unit, ",");
        int64_t window = 0;
        for (size_t i = 0; i < sizeof units / sizeof units[0]; i++)
            if (strlen(units[i].name) == ulen && strncmp(unit, units[i].name, ulen) == 0)
                window = units[i].ns;
        if (!window) {
            snprintf(err, errlen, "bad rate-limit unit near \"%s\" (want s, min, hour or day)",
                     unit);
            return -1;
        }
        out->tiers[out->n].limit = n;
        out->tiers[out->n].window_ns = window;
        out->n++;
        if (unit[ulen] == '\0')
            return 0;
        p = unit + ulen + 1;
    }
}

/* The log of one tier: a ring of the admission times still inside the window. */
typedef struct tier_log {
    mock_rate_tier tier;
    int64_t *ring; /* tier.limit slots */
    long head;     /* oldest entry */
    long count;
} tier_log;

struct mock_limiter {
    int n;
    tier_log logs[MOCK_LIMITER_MAX_TIERS];
};

mock_limiter *mock_limiter_new(const mock_rate_spec *spec)
{
    mock_limiter *lim = calloc(1, sizeof *lim);
    if (!lim)
        return NULL;
    for (int i = 0; i < spec->n; i++) {
        lim->logs[i].tier = spec->tiers[i];
        lim->logs[i].ring = calloc((size_t)spec->tiers[i].limit, sizeof(int64_t));
        if (!lim->logs[i].ring) {
            mock_limiter_free(lim);
            return NULL;
        }
        lim->n = i + 1;
    }
    return lim;
}

void mock_limiter_free(mock_limiter *lim)
{
    if (!lim)
        return;
    for (int i = 0; i < lim->n; i++)
        free(lim->logs[i].ring);
    free(lim);
}

void mock_limiter_reset(mock_limiter *lim)
{
    for (int i = 0; i < lim->n; i++) {
        lim->logs[i].head = 0;
        lim->logs[i].count = 0;
    }
}

bool mock_limiter_enabled(const mock_limiter *lim)
{
    return lim->n > 0;
}

/* Drops the entries that no longer occupy a slot: a request admitted at t
 * holds its slot during [t, t + T). */
static void expire(tier_log *log, int64_t now_ns)
{
    while (log->count > 0 && log->ring[log->head] + log->tier.window_ns <= now_ns) {
        log->head = (log->head + 1) % log->tier.limit;
        log->count--;
    }
}

void mock_limiter_admit(mock_limiter *lim, int64_t now_ns, mock_limit_verdict *verdict)
{
    memset(verdict, 0, sizeof *verdict);
    verdict->admitted = true;
    verdict->remaining = -1;
    for (int i = 0; i < lim->n; i++) {
        tier_log *log = &lim->logs[i];
        expire(log, now_ns);
        if (log->count < log->tier.limit)
            continue;
        int64_t wait = log->ring[log->head] + log->tier.window_ns - now_ns;
        if (verdict->admitted || wait > verdict->wait_ns) {
            verdict->wait_ns = wait;
            verdict->limit = log->tier.limit;
        }
        verdict->admitted = false;
        verdict->remaining = 0;
    }
    if (!verdict->admitted)
        return;
    for (int i = 0; i < lim->n; i++) {
        tier_log *log = &lim->logs[i];
        log->ring[(log->head + log->count) % log->tier.limit] = now_ns;
        log->count++;
        long left = log->tier.limit - log->count;
        if (verdict->remaining < 0 || left < verdict->remaining) {
            verdict->remaining = left;
            verdict->limit = log->tier.limit;
        }
    }
}
