/* The broker topology of the contract, and the delay tiers.
 *
 * Delays live in the broker: quorum queues N.delay.<ms> with a per-queue TTL
 * of 250 ms * 2^k (k = 0..18, up to ~18 h).  Every message in one tier has the
 * same TTL, so the head is always the next to expire and there is no
 * head-of-line blocking.  An expired message is dead-lettered (at-least-once)
 * to the headers exchange N.retry, which routes it back to its queue by its
 * `iw-target` header.  A delay that is not a tier is composed of hops: the
 * consumer sees `x-due-at` still in the future and sends the message on to
 * the largest tier that fits the rest, at most log2 hops. */
#ifndef IW_TOPOLOGY_H
#define IW_TOPOLOGY_H

#include <stddef.h>

#include "amqp_link.h"
#include "config.h"

#define IW_DELAY_TIERS 19
#define IW_DELAY_BASE_MS 250L
/* A message due within this much is treated as due now. */
#define IW_DELAY_SLACK_MS 50L

long topology_tier_ms(int k);

/* "delay.<ms>", the suffix of tier k's queue name, written into buf (at least
 * TOPOLOGY_SUFFIX_SIZE bytes); returns buf.  Once per status check, so
 * without printf. */
#define TOPOLOGY_SUFFIX_SIZE 32
const char *topology_tier_suffix(int k, char *buf);

/* A hop may end this much after the due time at most. */
#define IW_DELAY_HOP_LATE_MS 200L

/* How far past the due time a hop for `remaining_ms` may end: a sixteenth of
 * it, at least IW_DELAY_SLACK_MS, at most IW_DELAY_HOP_LATE_MS.  A message a
 * little late from one tier then still fits the next tier whole, instead of
 * splitting the rest into ever smaller hops. */
long topology_hop_tolerance(long remaining_ms);
/* The tier for a remaining delay: the largest tier <= remaining plus its
 * tolerance (the smallest when remaining is below it); -1 when remaining <=
 * IW_DELAY_SLACK_MS. */
int topology_pick_tier(long remaining_ms);
/* How many delay-tier hops a wait of wait_ms takes (each: a publish, a
 * delivery and an ack). */
long topology_hops(long wait_ms);
/* The wait in [lo_ms, hi_ms] closest to target_ms that is one tier or the
 * sum of two (one or two hops instead of up to log2), or target_ms when no
 * such wait is in the range.  Poll waits are jittered this way. */
long topology_few_hops(long target_ms, long lo_ms, long hi_ms);
/* The wait before status check number idx (0: the first; the schedule's last
 * wait repeats): IW_POLL_SCHEDULE's, jittered by IW_POLL_JITTER percent with
 * rnd (uniform in [0, 1)) and moved to the nearest wait of at most two hops
 * within the jitter's range.  A 5 s wait +-20% is one of 4, 4.25, 4.5, 5 or
 * 6 s: the checks of jobs accepted together still spread, and each costs
 * one or two hops instead of up to four. */
long topology_poll_wait(const iw_config *cfg, size_t idx, double rnd);

/* "<ns>.<suffix>" into buf. */
const char *topology_name(char *buf, size_t len, const char *ns, const char *suffix);

/* Declares every exchange, queue and binding of the contract, idempotently. */
int topology_declare(amqp_link *l, const iw_config *cfg, iw_error *err);

#endif
