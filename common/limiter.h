/* The fleet-wide rate limiter: a sliding-window log in Redis.
 *
 * Every permit is a member of one sorted set scored by Redis TIME (in
 * microseconds).  A tier N/T grants a permit only while fewer than N members
 * lie in the last T, so at most N calls fall in ANY window of length T,
 * whichever way the provider counts.  All tiers are checked and taken
 * together in one Lua script, so a permit is only taken when every tier
 * allows it.  A class (submit, status, resource) may be capped to a share of
 * each tier through a second sorted set; the cap binds only while another
 * class is waiting (work-conserving).  A 429 sets a fleet-wide pause key
 * that the script honours before anything else.  Memory: one member per call
 * in the longest window (20,000 for the default day tier, ~1 MB). */
#ifndef IW_LIMITER_H
#define IW_LIMITER_H

#include "parse.h"
#include "redis_link.h"
#include "status.h"

typedef struct limiter limiter;

#define LIMITER_MAX_RECORDS 40
#define LIMITER_N_CLASSES 3
/* The classes of provider calls: "submit", "status", "resource". */
extern const char *const limiter_classes[LIMITER_N_CLASSES];

typedef struct limiter_result {
    int granted;        /* permits taken (0..want) */
    long wait_ms;       /* when granted < want: wait before asking again */
    int usage_permille; /* highest tier usage before this call, 0..1000+ */
    int paused;         /* the wait comes from a 429 pause */
    size_t n_records;   /* as many as record keys were given */
    redisReply *reply;  /* owns the records; limiter_result_release frees it */
} limiter_result;

/* The link is borrowed; the limiter registers its scripts on it.  Every
 * window is lengthened by guard_ms: a permit is taken a little before the
 * call reaches the provider, and that delay varies, so the provider's clock
 * must still see at most N in any window of T. */
limiter *limiter_new(redis_link *r, const char *ns, const iw_rate_tier *tiers, size_t n,
                     long guard_ms);
void limiter_free(limiter *lim);

/* Appends a request for `want` permits (1..1000) of class `cls` capped at
 * `share_permille` of every tier (1000: no cap) to the pipeline.  With
 * record keys (at most LIMITER_MAX_RECORDS), `want` is ignored: one permit is
 * asked for each key that does not exist, and the records come back. */
int limiter_append_take(limiter *lim, const char *cls, int share_permille, int want,
                        size_t n_records, const char *const *record_keys, iw_error *err);
/* Reads the reply of one appended take; release the result afterwards. */
int limiter_read_take(limiter *lim, limiter_result *out, iw_error *err);
void limiter_result_release(limiter_result *r);
/* Record i of a take (NULL when that key did not exist); borrowed. */
const char *limiter_record(const limiter_result *r, size_t i, size_t *len);
/* append + read. */
int limiter_take(limiter *lim, const char *cls, int share_permille, int want, limiter_result *out,
                 iw_error *err);

/* Pauses every process's permits for ms (a 429's reset); never shortens a
 * longer pause already set. */
int limiter_pause(limiter *lim, long ms, iw_error *err);

#endif
