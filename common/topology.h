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

/* The tier for a remaining delay: the largest tier <= remaining (the smallest
 * when remaining is below it); -1 when remaining <= IW_DELAY_SLACK_MS. */
int topology_pick_tier(long remaining_ms);

/* "<ns>.<suffix>" into buf. */
const char *topology_name(char *buf, size_t len, const char *ns, const char *suffix);

/* Declares every exchange, queue and binding of the contract, idempotently. */
int topology_declare(amqp_link *l, const iw_config *cfg, iw_error *err);

#endif
