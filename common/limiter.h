/* What the fleet shares in Redis before and after a provider call: the rate
 * limiter, the 429 pause, the circuit breaker and the per-job claims.
 *
 * Rate limiter: a sliding-window log.  Every permit is a member of one sorted
 * set scored in microseconds; a tier N/T grants a permit only while fewer
 * than N members lie in the last T, so at most N calls fall in ANY window of
 * length T, whichever way the provider counts.  A permit is never scored
 * earlier than the latest one already logged, so a step back of Redis's wall
 * clock cannot open room (the scores stall until the clock catches up).
 * Members are "<score>:<process token>-<call>-<i>", unique without a shared
 * counter.  All tiers are checked and taken together in one Lua script.
 *
 * A class (submit, status, resource) may be capped to a share of each tier
 * through a second sorted set; the cap binds only while another class is
 * waiting (work-conserving).  The throttle keeps the top of every tier for
 * critical calls: a normal call may use at most IW_RATE_ALERT percent of any
 * tier, and a class's share is of that part.  A 429 sets a fleet-wide pause key that the script
 * honours before the tiers.  Memory: one member per call in the longest window (20,000 for the
 * default day tier, ~1 MB).
 *
 * Circuit breaker: one for the provider, shared by every process, under
 * N:breaker:* and changed only by the scripts here.  IW_BREAKER_FAILURES
 * consecutive failures (limiter_append_outcomes) open it for IW_BREAKER_OPEN;
 * then it is half-open: the next ask that needs a permit gets exactly one
 * item granted as the probe, fleet-wide (a probe key with a lease, so a probe
 * whose holder died is replaced when the lease ends).  The probe's success
 * closes the breaker, its failure re-opens it for another period.
 *
 * Keys (N = namespace):
 *   N:limiter:log            permit log (sorted set, TTL = longest window)
 *   N:limiter:log:CLASS      permits of a capped class
 *   N:limiter:demand:CLASS   "this class was refused in the last 2 s"
 *   N:limiter:pause          429 pause (PX = the provider's reset, capped)
 *   N:breaker:state          hash {state 0|1|2, fails}
 *   N:breaker:open           exists (PX) while the breaker is open
 *   N:breaker:probe          the half-open probe's token (PX = its lease)
 * plus the caller's record and claim keys. */
#ifndef IW_LIMITER_H
#define IW_LIMITER_H

#include "parse.h"
#include "redis_link.h"
#include "status.h"

typedef struct limiter limiter;

#define LIMITER_MAX_RECORDS 40
#define LIMITER_MAX_TOKEN 256
#define LIMITER_N_CLASSES 3
/* The classes of provider calls: "submit", "status", "resource". */
extern const char *const limiter_classes[LIMITER_N_CLASSES];

/* What the limiter enforces besides the tiers; limiter_new starts from
 * limiter_policy_default(). */
typedef struct limiter_policy {
    int alert_pct;                         /* IW_RATE_ALERT, 1..100: normal calls use at most this
                                              percent of any tier; 100 disables the throttle */
    int share_permille[LIMITER_N_CLASSES]; /* class cap of normal calls while another
                                              class waits (IW_*_SHARE x 10); 1000: none */
    long breaker_failures;                 /* IW_BREAKER_FAILURES */
    long breaker_open_ms;                  /* IW_BREAKER_OPEN */
    long probe_lease_ms;                   /* a probe's lease when the ask gives no claim_ms */
    long max_pause_ms; /* IW_MAX_RATE_PAUSE: caps limiter_pause and a stored pause */
} limiter_policy;

/* alert 100 (no throttle), shares 800/500/500, breaker 5 and 60 s, probe
 * lease 30 s, max pause 1 h. */
limiter_policy limiter_policy_default(void);

/* The policy the settings ask for: IW_RATE_ALERT, IW_SUBMIT_SHARE /
 * IW_POLL_SHARE / IW_RESOURCE_SHARE, IW_BREAKER_FAILURES, IW_BREAKER_OPEN,
 * IW_MAX_RATE_PAUSE, and a probe lease of IW_HTTP_TIMEOUT + 5 s. */
struct iw_config;
limiter_policy limiter_policy_from_config(const struct iw_config *cfg);

/* One batch of items of one class and priority asking for permits. */
typedef struct limiter_ask {
    const char *cls;                /* "submit", "status" or "resource" */
    int critical;                   /* 1: no class cap, no throttle (the whole tier) */
    size_t n;                       /* items, 1..LIMITER_MAX_RECORDS */
    const char *const *record_keys; /* NULL or n keys: an existing one answers RECORDED */
    const char *const *claim_keys;  /* NULL or n keys: held by another token -> CLAIMED;
                                       SET to claim_token PX claim_ms when granted */
    const char *claim_token;        /* unique per attempt; required with claim_keys;
                                       also the probe key's value (may be NULL otherwise) */
    long claim_ms;                  /* the claims' lease (> IW_HTTP_TIMEOUT); also the
                                       probe's lease; 0: policy.probe_lease_ms */
} limiter_ask;

typedef enum limiter_verdict {
    LIMITER_GRANTED = 1,  /* a permit was taken (and the claim set): call */
    LIMITER_RECORDED = 2, /* the record key exists: limiter_record has its text */
    LIMITER_CLAIMED = 3,  /* another attempt holds the claim: limiter_claim_ttl */
    LIMITER_REFUSED = 4,  /* no permit now: wait result.wait_ms (result.wait_reason) */
} limiter_verdict;

typedef enum limiter_wait_reason {
    LIMITER_WAIT_NONE = 0,
    LIMITER_WAIT_RATE = 1,     /* a tier (or the class cap) is used up */
    LIMITER_WAIT_PAUSE = 2,    /* the provider's 429 pause */
    LIMITER_WAIT_BREAKER = 3,  /* open, or half-open with the probe taken */
    LIMITER_WAIT_THROTTLE = 4, /* a normal call above IW_RATE_ALERT of a tier */
} limiter_wait_reason;

typedef enum limiter_breaker_state {
    LIMITER_BREAKER_CLOSED = 0,
    LIMITER_BREAKER_OPEN = 1,
    LIMITER_BREAKER_HALF_OPEN = 2,
} limiter_breaker_state;

typedef struct limiter_result {
    int granted;                  /* permits taken */
    long wait_ms;                 /* when an item was REFUSED: wait before asking again */
    int wait_reason;              /* limiter_wait_reason of wait_ms */
    int paused;                   /* wait_reason == LIMITER_WAIT_PAUSE */
    int usage_permille;           /* highest tier usage BEFORE this call (limiter_take's callers) */
    int probe_index;              /* the item granted as the half-open probe, -1 none */
    int breaker_state;            /* limiter_breaker_state after this call */
    long breaker_failures;        /* consecutive failures counted */
    int breaker_from, breaker_to; /* a transition THIS call made (open -> half-open),
                                     else both -1: log it */
    size_t n_tiers;
    int tier_permille[IW_MAX_TIERS]; /* usage of each tier AFTER this call's grants,
                                        in IW_RATE_LIMITS order (the usage metric) */
    int above_alert;                 /* some tier is at or above IW_RATE_ALERT after this call */
    size_t n_items;                  /* items of the ask */
    size_t n_records;  /* limiter_take's callers: n_items when record keys were given */
    redisReply *reply; /* owns the records; limiter_result_release frees it */
} limiter_result;

/* The link is borrowed; the limiter registers its scripts on it.  Every
 * window is lengthened by guard_ms: a permit is taken a little before the
 * call reaches the provider, and that delay varies, so the provider's clock
 * must still see at most N in any window of T.  NULL when out of memory or
 * when the namespace makes a key longer than 1024 bytes. */
limiter *limiter_new(redis_link *r, const char *ns, const iw_rate_tier *tiers, size_t n,
                     long guard_ms);
/* NULL is harmless. */
void limiter_free(limiter *lim);
/* Replaces the policy (copied; out-of-range values are clamped). */
void limiter_set_policy(limiter *lim, const limiter_policy *p);

/* Appends one batch's ask to the pipeline (nothing is sent until a read).  In
 * one script, atomically, for each item in order: an existing record key ->
 * RECORDED (no permit); else a claim key held by another token -> CLAIMED
 * (no permit); else it needs a permit: the breaker (open -> REFUSED; half-open
 * -> one item fleet-wide is the probe, the others REFUSED), then the 429
 * pause, then every tier, the class cap and the throttle; granted items get
 * their claim.  IW_ERR_INVALID for a bad ask (before touching Redis). */
int limiter_append_ask(limiter *lim, const limiter_ask *ask, iw_error *err);
/* Reads the reply of one appended ask (release the result afterwards). */
int limiter_read_ask(limiter *lim, limiter_result *out, iw_error *err);
/* Frees the reply held by a result; NULL or an empty result is harmless. */
void limiter_result_release(limiter_result *r);
/* Verdict of item i (0 when i is out of range). */
limiter_verdict limiter_item_verdict(const limiter_result *r, size_t i);
/* Record text of item i when it is RECORDED, else NULL; borrowed from r. */
const char *limiter_record(const limiter_result *r, size_t i, size_t *len);
/* Remaining lease (ms) of item i's claim when it is CLAIMED, else -1. */
long limiter_claim_ttl(const limiter_result *r, size_t i);

/* The outcome of one turn's finished calls, for the breaker. */
typedef struct breaker_report {
    int transitions;      /* > 0: THIS call changed the breaker's state: log from -> to
                             (2 only when a probe success and fresh failures meet in one turn) */
    int from, to;         /* limiter_breaker_state before and after this call (an open
                             breaker whose period ended counts as half-open) */
    int state;            /* == to */
    long failures;        /* consecutive failures after this call */
    long failures_before; /* before it: exactly one pod sees a threshold crossed */
} breaker_report;

/* Appends one turn's outcomes: seq holds one letter per finished call in
 * completion order, 'S' (2xx, any 4xx including 429) or 'F' (5xx, timeout,
 * connection error) on every route including the token endpoint (at most
 * 4096 letters; "" is fine); probe_outcome is -1 (no probe finished), 0 (the
 * probe failed) or 1 (it succeeded); the probe's call may also be in seq.
 * Closed: 'F' counts, 'S' resets the count, reaching IW_BREAKER_FAILURES
 * opens.  Open or half-open: letters are ignored (calls granted before it
 * opened); a probe success closes it, a probe failure re-opens it. */
int limiter_append_outcomes(limiter *lim, const char *seq, int probe_outcome, iw_error *err);
/* Reads the reply of one appended outcomes call. */
int limiter_read_outcomes(limiter *lim, breaker_report *out, iw_error *err);

/* Redis's eviction setting as read at start-up. */
typedef struct limiter_redis_info {
    char policy[32];     /* maxmemory-policy, e.g. "noeviction" */
    long long maxmemory; /* bytes; 0 = no limit */
    int can_evict;       /* policy is not noeviction: see limiter_check_redis */
} limiter_redis_info;

/* Reads maxmemory-policy and maxmemory (INFO memory, which managed Redis
 * services allow where CONFIG GET is disabled).  can_evict is 1 for every
 * policy but "noeviction": allkeys-* may evict anything, and volatile-* may
 * evict the keys that matter most, because they all carry a TTL (the permit
 * log, accepted-job records, claims, the pause).  maxmemory 0 does not clear
 * can_evict: it can be set at run time.  The caller warns, or refuses to
 * start with IW_REQUIRE_NOEVICTION=1. */
int limiter_check_redis(limiter *lim, limiter_redis_info *out, iw_error *err);

/* ---- the API of the roles before the job engine (kept until it switches) ---- */

/* Appends a request for `want` permits (1..1000) of class `cls` capped at
 * `share_permille` of every tier (1000: no cap; no throttle either way).
 * With record keys (at most LIMITER_MAX_RECORDS), `want` is ignored: one
 * permit is asked for each key that does not exist, and the records come
 * back.  Read with limiter_read_take (== limiter_read_ask). */
int limiter_append_take(limiter *lim, const char *cls, int share_permille, int want,
                        size_t n_records, const char *const *record_keys, iw_error *err);
/* Reads the reply of one appended take; release the result afterwards. */
int limiter_read_take(limiter *lim, limiter_result *out, iw_error *err);
/* append + read; the result holds no reply afterwards. */
int limiter_take(limiter *lim, const char *cls, int share_permille, int want, limiter_result *out,
                 iw_error *err);

/* Pauses every process's permits for ms (a 429's reset), capped at the
 * policy's max_pause_ms; never shortens a longer pause already set, but cuts
 * a stored pause longer than the cap down to it. */
int limiter_pause(limiter *lim, long ms, iw_error *err);

#endif
