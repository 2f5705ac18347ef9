/* Maintenance windows (IW_MAINTENANCE_WINDOWS): weekly local-time windows in
 * tz-database zones, e.g. "Sun 02:00-04:00 America/New_York,Sat 23:00-01:00 UTC".
 *
 * Each window is an English day abbreviation (Sun..Sat, any case), a start and
 * an end as HH:MM (start inclusive, end exclusive; an end before the start
 * crosses midnight into the next day) and a zone from the system tz database
 * (Debian tzdata, /usr/share/zoneinfo or $TZDIR).  Times are wall-clock times
 * of that zone on that day, so a window follows daylight-saving changes:
 *   - a start or end that does not exist (the hour skipped when clocks spring
 *     forward) is the moment the clocks jump past it;
 *   - a start or end that happens twice (the hour repeated when clocks fall
 *     back) is its first occurrence.
 * In both cases the rule is the same: a boundary is the first instant of that
 * local date at which the zone's clock shows that time or later.
 *
 * The parser is pure; maintenance_active converts times through the C
 * library's tz code, which means it sets TZ for the length of the call and
 * restores it before returning (the worker calls it from its single loop
 * thread; no other thread of ours reads local time).  It remembers its last
 * answer and the span over which that answer holds (until the maintenance
 * ends or the next window starts), so calling it every loop turn touches TZ
 * only around window boundaries. */
#ifndef IW_MAINTENANCE_H
#define IW_MAINTENANCE_H

#include <stddef.h>

#include "status.h"

#define MAINTENANCE_MAX_WINDOWS 32
#define MAINTENANCE_MAX_SPEC 4096

typedef struct maintenance maintenance;

/* Parses a window list into a new set (*out, free with maintenance_free).
 * NULL, "" or only blanks give an empty set.  On a bad value returns
 * IW_ERR_CONFIG (*out NULL) with a one-line message naming the window, which
 * the caller prefixes with the setting's name. */
int maintenance_parse(const char *spec, maintenance **out, iw_error *err);

/* Frees a set; NULL is harmless. */
void maintenance_free(maintenance *m);

/* Number of windows in the set (0 for NULL). */
size_t maintenance_count(const maintenance *m);

/* 1 if now_wall_ms (Unix epoch milliseconds) falls inside a window, else 0
 * (also for NULL or an empty set).  When active and ends_at_ms is not NULL,
 * *ends_at_ms is when the maintenance ends: the end of the window, carried on
 * through windows that overlap or abut it, so that a job deferred to it does
 * not wake inside the next window.  Leaves TZ as it found it.  Not
 * thread-safe: the set keeps a cache of its last answer. */
int maintenance_active(const maintenance *m, long long now_wall_ms, long long *ends_at_ms);

#endif
