#include "retry.h"

#include <ctype.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

iw_verdict retry_classify(const iw_http_result *r)
{
    iw_verdict v = {IW_V_FAIL, IW_C_NONE, 0, 0};

    switch (r->transport) {
    case IW_TRANSPORT_OK:
        break;
    case IW_TRANSPORT_TIMEOUT:
        return (iw_verdict){IW_V_RETRY, IW_C_EXTERNAL_API_TIMEOUT, 0, 1};
    case IW_TRANSPORT_CONNECT:
        return (iw_verdict){IW_V_RETRY, IW_C_EXTERNAL_API_UNREACHABLE, 0, 1};
    case IW_TRANSPORT_TOO_LARGE:
        return (iw_verdict){IW_V_FAIL, IW_C_EXTERNAL_API_RESPONSE_TOO_LARGE, 0, 0};
    case IW_TRANSPORT_OTHER:
        return (iw_verdict){IW_V_RETRY, IW_C_EXTERNAL_API_UNREACHABLE, 0, 1};
    }
    if (r->status >= 200 && r->status < 300)
        return (iw_verdict){IW_V_ACCEPT, IW_C_NONE, 0, 0};
    if (r->status == 429)
        return (iw_verdict){IW_V_WAIT, IW_C_EXTERNAL_API_RATE_LIMITED,
                            r->retry_after_ms >= 0 ? r->retry_after_ms : IW_DEFAULT_429_WAIT_MS, 0};
    if (r->status >= 500 && r->status < 600)
        return (iw_verdict){IW_V_RETRY, IW_C_EXTERNAL_API_ERROR, 0, 1};
    switch (r->status) {
    case 400:
        v.code = IW_C_EXTERNAL_API_BAD_REQUEST;
        break;
    case 401:
        v.code = IW_C_EXTERNAL_API_UNAUTHORIZED;
        break;
    case 403:
        v.code = IW_C_EXTERNAL_API_FORBIDDEN;
        break;
    case 404:
        v.code = IW_C_EXTERNAL_API_NOT_FOUND;
        break;
    default:
        v.code = r->status >= 400 && r->status < 500 ? IW_C_EXTERNAL_API_CLIENT_ERROR
                                                     : IW_C_EXTERNAL_API_UNEXPECTED_STATUS;
    }
    return v;
}

long retry_delay_before(const long *schedule, size_t n, int next_attempt)
{
    if (next_attempt < 1 || (size_t)next_attempt > n)
        return -1;
    return schedule[next_attempt - 1];
}

long long iw_add_ms(long long t, long long d)
{
    if (d > 0 && t > LLONG_MAX - d)
        return LLONG_MAX;
    if (d < 0 && t < LLONG_MIN - d)
        return LLONG_MIN;
    return t + d;
}

long retry_cap_wait(long long ms, long max_ms, int *capped)
{
    long cap = max_ms > 0 ? max_ms : IW_DEFAULT_MAX_RATE_PAUSE_MS;
    int c = ms > cap;

    if (capped)
        *capped = c;
    return c ? cap : ms < 0 ? 0 : (long)ms;
}

/* Decimal digits with blanks around them, saturated at LLONG_MAX; -1 when
 * the text is anything else. */
static long long parse_digits(const char *p)
{
    long long v = 0;
    int any = 0;

    while (isspace((unsigned char)*p))
        p++;
    for (; isdigit((unsigned char)*p); p++, any = 1)
        v = v > (LLONG_MAX - 9) / 10 ? LLONG_MAX : v * 10 + (*p - '0');
    while (isspace((unsigned char)*p))
        p++;
    return any && !*p ? v : -1;
}

long retry_parse_retry_after(const char *value, long long now_wall_ms, long max_ms, int *capped)
{
    const char *p = value;
    struct tm tm;

    if (capped)
        *capped = 0;
    if (!value)
        return -1;
    while (isspace((unsigned char)*p))
        p++;
    if (isdigit((unsigned char)*p)) {
        long long secs = parse_digits(p);
        if (secs < 0)
            return -1;
        return retry_cap_wait(secs > LLONG_MAX / 1000 ? LLONG_MAX : secs * 1000, max_ms, capped);
    }
    memset(&tm, 0, sizeof tm);
    /* IMF-fixdate, e.g. "Wed, 21 Oct 2015 07:28:00 GMT" */
    const char *end = strptime(p, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    if (!end || *end)
        return -1;
    time_t when_s = timegm(&tm);
    if (when_s == (time_t)-1)
        return -1;
    /* seconds to milliseconds and the difference, both saturating */
    long long when = (long long)when_s > LLONG_MAX / 1000 ? LLONG_MAX : (long long)when_s * 1000;
    long long delta = iw_add_ms(when, now_wall_ms == LLONG_MIN ? LLONG_MAX : -now_wall_ms);
    return retry_cap_wait(delta, max_ms, capped);
}

long retry_parse_reset_ms(const char *value, long max_ms, int *capped)
{
    long long ms;

    if (capped)
        *capped = 0;
    if (!value)
        return -1;
    ms = parse_digits(value);
    return ms < 0 ? -1 : retry_cap_wait(ms, max_ms, capped);
}

long retry_jitter(long ms, long pct, double rnd)
{
    double span = (double)ms * (double)pct / 100.0;
    long v = ms + (long)((rnd * 2.0 - 1.0) * span);
    return v < 0 ? 0 : v;
}
