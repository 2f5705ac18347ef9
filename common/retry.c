#include "retry.h"

#include <ctype.h>
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

long retry_parse_retry_after(const char *value, long long now_wall_ms)
{
    const char *p = value;
    struct tm tm;

    if (!value)
        return -1;
    while (isspace((unsigned char)*p))
        p++;
    if (isdigit((unsigned char)*p)) {
        char *end;
        long secs = strtol(p, &end, 10);
        while (isspace((unsigned char)*end))
            end++;
        if (*end || secs < 0 || secs > 86400L * 30)
            return -1;
        return secs * 1000;
    }
    memset(&tm, 0, sizeof tm);
    /* IMF-fixdate, e.g. "Wed, 21 Oct 2015 07:28:00 GMT" */
    const char *end = strptime(p, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    if (!end || *end)
        return -1;
    long long when = (long long)timegm(&tm) * 1000;
    return when > now_wall_ms ? (long)(when - now_wall_ms) : 0;
}

long retry_jitter(long ms, long pct, double rnd)
{
    double span = (double)ms * (double)pct / 100.0;
    long v = ms + (long)((rnd * 2.0 - 1.0) * span);
    return v < 0 ? 0 : v;
}
