#include "maintenance.h"

#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define MAX_ZONE_NAME 64

typedef struct window {
    int wday;      /* 0 = Sunday, as struct tm */
    int start_min; /* minutes after local midnight */
    int end_min;   /* on the next day when <= start_min */
    char *tz;      /* ":Zone", the TZ value that names the zone's file */
} window;

/* The last answer and the span over which it holds. */
typedef struct mcache {
    int valid;
    long long from, until; /* [from, until) */
    int active;
    long long ends;
} mcache;

struct maintenance {
    window w[MAINTENANCE_MAX_WINDOWS];
    size_t n;
    mcache *cache; /* behind a pointer: maintenance_active takes a const set */
};

static const char *const day_names[7] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};

/* ---- parsing ------------------------------------------------------------------ */

/* Copies at most 60 bytes of an item for an error message, printable ASCII
 * only: the message goes to logs and must stay one safe line. */
static void excerpt(const char *s, size_t len, char *out, size_t cap)
{
    size_t j = 0;
    for (size_t i = 0; i < len && j + 4 < cap && i < 60; i++)
        out[j++] = s[i] >= 0x20 && s[i] < 0x7f ? s[i] : '?';
    if (len > 60 && j + 4 < cap)
        out[j++] = '.', out[j++] = '.', out[j++] = '.';
    out[j] = '\0';
}

/* "HH:MM" with two digits each, 00:00..23:59. */
static int parse_hhmm(const char *s, size_t len, int *minutes)
{
    if (len != 5 || !isdigit((unsigned char)s[0]) || !isdigit((unsigned char)s[1]) || s[2] != ':' ||
        !isdigit((unsigned char)s[3]) || !isdigit((unsigned char)s[4]))
        return 0;
    int h = (s[0] - '0') * 10 + (s[1] - '0'), m = (s[3] - '0') * 10 + (s[4] - '0');
    if (h > 23 || m > 59)
        return 0;
    *minutes = h * 60 + m;
    return 1;
}

/* A zone name as the tz database spells them ("America/New_York", "UTC",
 * "Etc/GMT+5"): no absolute path, no "." or ".." component, and a TZif file
 * behind it.  glibc silently falls back to UTC for an unknown zone, so the
 * file is checked here, at start-up. */
static int zone_exists(const char *name, size_t len)
{
    const char *dir = getenv("TZDIR");
    char path[512];
    unsigned char magic[4];
    size_t seg = 0;
    FILE *f;
    int ok;

    if (len == 0 || len > MAX_ZONE_NAME || name[0] == '/')
        return 0;
    for (size_t i = 0; i <= len; i++) {
        char c = i < len ? name[i] : '/';
        if (c == '/') {
            if (seg == 0 || (seg == 1 && name[i - 1] == '.') ||
                (seg == 2 && name[i - 1] == '.' && name[i - 2] == '.'))
                return 0;
            seg = 0;
        } else if (isalnum((unsigned char)c) || c == '_' || c == '-' || c == '+' || c == '.') {
            seg++;
        } else {
            return 0;
        }
    }
    if (!dir || !*dir || strlen(dir) > 256)
        dir = "/usr/share/zoneinfo";
    /* both parts are bounded above (256 + 64 < 512): no truncation */
    snprintf(path, sizeof path, "%s/%.*s", dir, (int)len, name);
    f = fopen(path, "rb");
    if (!f)
        return 0;
    ok = fread(magic, 1, 4, f) == 4 && memcmp(magic, "TZif", 4) == 0;
    fclose(f);
    return ok;
}

/* One "Day HH:MM-HH:MM Zone" item (blanks around it already trimmed). */
static int parse_window(const char *s, size_t len, window *w, size_t index, iw_error *err)
{
    const char *tok[3];
    size_t tlen[3], nt = 0, i = 0;
    char ex[80];
    const char *what = NULL;

    while (i < len) {
        while (i < len && isspace((unsigned char)s[i]))
            i++;
        if (i >= len)
            break;
        if (nt == 3) {
            what = "expected 'Day HH:MM-HH:MM Zone'";
            goto fail;
        }
        tok[nt] = s + i;
        while (i < len && !isspace((unsigned char)s[i]))
            i++;
        tlen[nt] = (size_t)(s + i - tok[nt]);
        nt++;
    }
    if (nt != 3) {
        what = "expected 'Day HH:MM-HH:MM Zone'";
        goto fail;
    }
    w->wday = -1;
    for (int d = 0; d < 7; d++)
        if (tlen[0] == 3 && strncasecmp(tok[0], day_names[d], 3) == 0)
            w->wday = d;
    if (w->wday < 0) {
        what = "the day is not one of Sun, Mon, Tue, Wed, Thu, Fri, Sat";
        goto fail;
    }
    if (tlen[1] != 11 || tok[1][5] != '-' || !parse_hhmm(tok[1], 5, &w->start_min) ||
        !parse_hhmm(tok[1] + 6, 5, &w->end_min)) {
        what = "the times are not HH:MM-HH:MM (00:00..23:59)";
        goto fail;
    }
    if (w->start_min == w->end_min) {
        what = "the window is empty (start equals end)";
        goto fail;
    }
    if (!zone_exists(tok[2], tlen[2])) {
        what = "unknown time zone (not in the tz database)";
        goto fail;
    }
    w->tz = malloc(tlen[2] + 2);
    if (!w->tz)
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    w->tz[0] = ':';
    memcpy(w->tz + 1, tok[2], tlen[2]);
    w->tz[tlen[2] + 1] = '\0';
    return IW_OK;
fail:
    excerpt(s, len, ex, sizeof ex);
    return iw_error_set(err, IW_ERR_CONFIG, "window %zu '%s': %s", index + 1, ex, what);
}

int maintenance_parse(const char *spec, maintenance **out, iw_error *err)
{
    maintenance *m = NULL;
    int rc = IW_OK;

    *out = NULL;
    if (spec && strlen(spec) > MAINTENANCE_MAX_SPEC)
        return iw_error_set(err, IW_ERR_CONFIG, "longer than %d bytes", MAINTENANCE_MAX_SPEC);
    m = calloc(1, sizeof *m);
    if (m && !(m->cache = calloc(1, sizeof *m->cache))) {
        free(m);
        m = NULL;
    }
    if (!m)
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    for (const char *p = spec; p;) {
        const char *comma = strchr(p, ',');
        const char *end = comma ? comma : p + strlen(p);
        const char *a = p, *b = end;

        while (a < b && isspace((unsigned char)*a))
            a++;
        while (b > a && isspace((unsigned char)b[-1]))
            b--;
        if (a == b) {
            /* an empty list is fine, an empty item between commas is a typo */
            if (comma || m->n) {
                rc = iw_error_set(err, IW_ERR_CONFIG, "window %zu is empty", m->n + 1);
                goto out;
            }
        } else {
            if (m->n == MAINTENANCE_MAX_WINDOWS) {
                rc =
                    iw_error_set(err, IW_ERR_CONFIG, "at most %d windows", MAINTENANCE_MAX_WINDOWS);
                goto out;
            }
            rc = parse_window(a, (size_t)(b - a), &m->w[m->n], m->n, err);
            if (rc != IW_OK)
                goto out;
            m->n++;
        }
        p = comma ? comma + 1 : NULL;
    }
out:
    if (rc != IW_OK) {
        maintenance_free(m);
        return rc;
    }
    *out = m;
    return IW_OK;
}

void maintenance_free(maintenance *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->n; i++)
        free(m->w[i].tz);
    free(m->cache);
    free(m);
}

size_t maintenance_count(const maintenance *m)
{
    return m ? m->n : 0;
}

/* ---- local time ----------------------------------------------------------------- */

/* TZ is switched for the zone's computations and restored afterwards. */
typedef struct tz_saved {
    char *old;
    int had;
} tz_saved;

static int tz_enter(const char *tz, tz_saved *s)
{
    const char *old = getenv("TZ");

    s->had = old != NULL;
    s->old = old ? strdup(old) : NULL;
    if ((old && !s->old) || setenv("TZ", tz, 1) != 0) {
        free(s->old);
        return 0;
    }
    tzset();
    return 1;
}

static void tz_leave(tz_saved *s)
{
    if (s->had)
        setenv("TZ", s->old, 1);
    else
        unsetenv("TZ");
    tzset();
    free(s->old);
}

/* A local wall time as one comparable number (seconds, months as 31 days:
 * only the order matters). */
static long long wall_key(int year, int mon, int mday, int hour, int min, int sec)
{
    return ((((long long)year * 12 + mon) * 31 + mday) * 24 + hour) * 3600LL + min * 60LL + sec;
}

static long long wall_key_at(time_t t)
{
    struct tm lt;
    localtime_r(&t, &lt);
    return wall_key(lt.tm_year, lt.tm_mon, lt.tm_mday, lt.tm_hour, lt.tm_min, lt.tm_sec);
}

/* The first instant of local date (year, mon, mday) at which the current
 * zone's clock shows `minutes` after midnight or later (see the header for why
 * that rule covers skipped and repeated hours).  Epoch seconds. */
static time_t local_first(int year, int mon, int mday, int minutes)
{
    const long long want = wall_key(year, mon, mday, minutes / 60, minutes % 60, 0);
    time_t best = (time_t)-1, lo = 0, hi = 0;
    int have_range = 0;

    for (int isdst = -1; isdst <= 1; isdst++) {
        struct tm tm = {0};
        tm.tm_year = year;
        tm.tm_mon = mon;
        tm.tm_mday = mday;
        tm.tm_hour = minutes / 60;
        tm.tm_min = minutes % 60;
        tm.tm_isdst = isdst;
        time_t t = mktime(&tm);
        if (t == (time_t)-1)
            continue;
        if (!have_range || t < lo)
            lo = t;
        if (!have_range || t > hi)
            hi = t;
        have_range = 1;
        if (wall_key_at(t) == want && (best == (time_t)-1 || t < best))
            best = t;
    }
    if (best != (time_t)-1 || !have_range)
        return best;
    /* The time does not exist (clocks jumped over it): between the readings
     * with the offsets before and after the jump, the clock passes `want`
     * exactly once; find that instant. */
    while (lo < hi) {
        time_t mid = lo + (hi - lo) / 2;
        if (wall_key_at(mid) >= want)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* The instance of window w that starts on the local date `days` after t's
 * (TZ must be w's zone): 0 when w does not start on that weekday. */
static int instance(const window *w, long long t_ms, int days, time_t *start, time_t *end)
{
    time_t t = (time_t)(t_ms / 1000 - (t_ms % 1000 < 0));
    struct tm lt, d = {0};

    if (!localtime_r(&t, &lt))
        return 0;
    /* civil-date arithmetic in UTC: no zone involved */
    d.tm_year = lt.tm_year;
    d.tm_mon = lt.tm_mon;
    d.tm_mday = lt.tm_mday + days;
    d.tm_hour = 12;
    time_t noon = timegm(&d);
    gmtime_r(&noon, &d);
    if (d.tm_wday != w->wday)
        return 0;
    *start = local_first(d.tm_year, d.tm_mon, d.tm_mday, w->start_min);
    if (w->end_min <= w->start_min) {
        d.tm_mday++;
        d.tm_hour = 12;
        noon = timegm(&d);
        gmtime_r(&noon, &d);
    }
    *end = local_first(d.tm_year, d.tm_mon, d.tm_mday, w->end_min);
    return *start != (time_t)-1 && *end != (time_t)-1;
}

/* Is t inside window w?  TZ must be w's zone.  Only the windows that start
 * on t's local date or the day before can contain t (a window is shorter
 * than a day of wall time, at most 25 h of real time). */
static int window_contains(const window *w, long long t_ms, long long *end_ms)
{
    time_t start, end;

    for (int days = -1; days <= 0; days++) {
        if (instance(w, t_ms, days, &start, &end) && (long long)start * 1000 <= t_ms &&
            t_ms < (long long)end * 1000) {
            *end_ms = (long long)end * 1000;
            return 1;
        }
    }
    return 0;
}

/* The earliest start of a (non-empty) window instance after t; every window
 * starts within 8 local days of any t.  LLONG_MAX when none is found. */
static long long next_start(const maintenance *m, long long t_ms)
{
    long long best = LLONG_MAX;

    for (size_t i = 0; i < m->n; i++) {
        tz_saved saved;
        time_t start, end;
        if (!tz_enter(m->w[i].tz, &saved))
            continue;
        for (int days = -1; days <= 8; days++) {
            if (instance(&m->w[i], t_ms, days, &start, &end) && end > start &&
                (long long)start * 1000 > t_ms && (long long)start * 1000 < best)
                best = (long long)start * 1000;
        }
        tz_leave(&saved);
    }
    return best;
}

/* Is t inside any window?  *end_ms: the latest end among those containing t. */
static int any_contains(const maintenance *m, long long t_ms, long long *end_ms)
{
    int active = 0;

    for (size_t i = 0; i < m->n; i++) {
        tz_saved saved;
        long long e;
        if (!tz_enter(m->w[i].tz, &saved))
            continue;
        if (window_contains(&m->w[i], t_ms, &e) && (!active || e > *end_ms)) {
            *end_ms = e;
            active = 1;
        }
        tz_leave(&saved);
    }
    return active;
}

int maintenance_active(const maintenance *m, long long now_wall_ms, long long *ends_at_ms)
{
    long long end = 0, next;
    mcache *c = m ? m->cache : NULL;
    int active;

    if (!m || !m->n)
        return 0;
    /* The answer stays the same until the maintenance ends or the next window
     * starts: asked again within that span (the common case, once per loop
     * turn), it comes from the cache without touching TZ. */
    if (c && c->valid && now_wall_ms >= c->from && now_wall_ms < c->until) {
        if (c->active && ends_at_ms)
            *ends_at_ms = c->ends;
        return c->active;
    }
    active = any_contains(m, now_wall_ms, &end);
    if (active) {
        /* windows that overlap or abut carry the end on; each step moves it
         * to a later window's end, so n steps reach the last one */
        for (size_t i = 0; i < m->n && any_contains(m, end, &next) && next > end; i++)
            end = next;
        if (ends_at_ms)
            *ends_at_ms = end;
    }
    if (c) {
        c->valid = 1;
        c->from = now_wall_ms;
        c->until = active ? end : next_start(m, now_wall_ms);
        c->active = active;
        c->ends = end;
    }
    return active;
}
