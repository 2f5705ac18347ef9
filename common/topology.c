#include "topology.h"

#include <stdio.h>
#include <string.h>

#include "buf.h"
#include "retry.h"

long topology_tier_ms(int k)
{
    return IW_DELAY_BASE_MS << k;
}

const char *topology_tier_suffix(int k, char *buf)
{
    char digits[24],
        *d = uint_text(digits + sizeof digits, (unsigned long long)topology_tier_ms(k));
    size_t n = (size_t)(digits + sizeof digits - d);

    memcpy(buf, "delay.", 6);
    memcpy(buf + 6, d, n);
    buf[6 + n] = '\0';
    return buf;
}

long topology_hop_tolerance(long remaining_ms)
{
    long rel = remaining_ms / 16;

    return rel < IW_DELAY_SLACK_MS      ? IW_DELAY_SLACK_MS
           : rel > IW_DELAY_HOP_LATE_MS ? IW_DELAY_HOP_LATE_MS
                                        : rel;
}

int topology_pick_tier(long remaining_ms)
{
    if (remaining_ms <= IW_DELAY_SLACK_MS)
        return -1;
    for (int k = IW_DELAY_TIERS - 1; k >= 0; k--)
        if (topology_tier_ms(k) - topology_hop_tolerance(remaining_ms) <= remaining_ms)
            return k;
    return 0;
}

long topology_hops(long wait_ms)
{
    long hops = 0;

    for (int k; (k = topology_pick_tier(wait_ms)) >= 0; hops++)
        wait_ms -= topology_tier_ms(k);
    return hops;
}

long topology_poll_wait(const iw_config *cfg, size_t idx, double rnd)
{
    long base = cfg->poll_schedule_ms[idx < cfg->n_poll ? idx : cfg->n_poll - 1];
    long span = (long)((double)base * (double)cfg->poll_jitter_pct / 100.0);

    return topology_few_hops(retry_jitter(base, cfg->poll_jitter_pct, rnd), base - span,
                             base + span);
}

/* The waits of one or two tiers are IW_DELAY_BASE_MS times the numbers of
 * one or two set bits, up to 2^IW_DELAY_TIERS (the longest tier twice). */
#define FEW_HOPS_MAX (1UL << IW_DELAY_TIERS)

static int top_bit(unsigned long n)
{
    return (int)(sizeof n * 8 - 1) - __builtin_clzl(n);
}

/* The largest such number <= n, or 0 when n < 1. */
static unsigned long few_hops_down(unsigned long n)
{
    unsigned long high, rest;

    if (n >= FEW_HOPS_MAX)
        return FEW_HOPS_MAX;
    if (!n)
        return 0;
    high = 1UL << top_bit(n);
    rest = n - high;
    return rest ? high + (1UL << top_bit(rest)) : high;
}

/* The smallest such number >= n, or 0 when there is none. */
static unsigned long few_hops_up(unsigned long n)
{
    unsigned long high, rest;

    if (n <= 1)
        return 1;
    if (n > FEW_HOPS_MAX)
        return 0;
    high = 1UL << top_bit(n);
    rest = n - high;
    if (!rest || (rest & (rest - 1)) == 0) /* n has one or two bits */
        return n;
    return high + (2UL << top_bit(rest)); /* may carry into 2 * high */
}

long topology_few_hops(long target_ms, long lo_ms, long hi_ms)
{
    /* the nearest on each side of the target; anything else in the range
     * is further away (a tie goes to the shorter wait) */
    unsigned long t = target_ms > 0 ? (unsigned long)target_ms : 0;
    long down = (long)(few_hops_down(t / IW_DELAY_BASE_MS) * IW_DELAY_BASE_MS);
    long up = (long)(few_hops_up((t + IW_DELAY_BASE_MS - 1) / IW_DELAY_BASE_MS) * IW_DELAY_BASE_MS);
    int down_ok = down > 0 && down >= lo_ms && down <= hi_ms;
    int up_ok = up > 0 && up >= lo_ms && up <= hi_ms;

    if (down_ok && (!up_ok || target_ms - down <= up - target_ms))
        return down;
    return up_ok ? up : target_ms;
}

const char *topology_name(char *buf, size_t len, const char *ns, const char *suffix)
{
    /* <ns>.<suffix>, cut to len like snprintf: twice per job, copied */
    size_t a = strlen(ns), b = strlen(suffix), n = 0;

    if (!len)
        return buf;
    a = a < len - 1 ? a : len - 1;
    memcpy(buf, ns, a);
    n = a;
    if (n < len - 1)
        buf[n++] = '.';
    b = b < len - 1 - n ? b : len - 1 - n;
    memcpy(buf + n, suffix, b);
    buf[n + b] = '\0';
    return buf;
}

/* Quorum queues replicate over IW_QUORUM_GROUP_SIZE nodes when it is set;
 * 0 leaves the argument out, so the broker's default applies (RabbitMQ 3.10:
 * its `quorum_cluster_size` setting, 3 unless configured, never more than the
 * cluster's nodes).  The argument is part of a queue's identity: changing it
 * for queues that exist fails the declaration (TOPOLOGY_MISMATCH). */
static json_t *quorum_args(const iw_config *cfg, json_t *args)
{
    if (args && cfg->quorum_group_size > 0)
        json_object_set_new(args, "x-quorum-initial-group-size",
                            json_integer(cfg->quorum_group_size));
    return args;
}

static json_t *work_queue_args(const iw_config *cfg, const char *dlx)
{
    if (cfg->queue_classic)
        return json_pack("{s:s, s:s}", "x-queue-type", "classic", "x-dead-letter-exchange", dlx);
    return quorum_args(cfg, json_pack("{s:s, s:I, s:s, s:s, s:s}", "x-queue-type", "quorum",
                                      "x-delivery-limit", (json_int_t)cfg->delivery_limit,
                                      "x-dead-letter-exchange", dlx, "x-dead-letter-strategy",
                                      "at-least-once", "x-overflow", "reject-publish"));
}

static json_t *delay_queue_args(const iw_config *cfg, long ttl_ms, const char *retry)
{
    if (cfg->queue_classic)
        return json_pack("{s:s, s:I, s:s}", "x-queue-type", "classic", "x-message-ttl",
                         (json_int_t)ttl_ms, "x-dead-letter-exchange", retry);
    return quorum_args(cfg, json_pack("{s:s, s:I, s:s, s:s, s:s}", "x-queue-type", "quorum",
                                      "x-message-ttl", (json_int_t)ttl_ms, "x-dead-letter-exchange",
                                      retry, "x-dead-letter-strategy", "at-least-once",
                                      "x-overflow", "reject-publish"));
}

int topology_declare(amqp_link *l, const iw_config *cfg, iw_error *err)
{
    static const struct {
        const char *suffix, *type;
    } exchanges[] = {
        {"requests", "topic"}, {"events", "topic"}, {"dlx", "fanout"}, {"retry", "headers"}};
    static const struct {
        const char *queue, *key;
    } bindings[] = {
        {"submit", "submit.#"}, {"resource", "resource.get"}, {"resource", "resource.invalidate"}};
    static const char *const work_queues[] = {"submit", "status", "resource"};
    char a[256], b[256];
    json_t *args = NULL;
    int rc = IW_OK;

    for (size_t i = 0; i < sizeof exchanges / sizeof exchanges[0]; i++) {
        rc = amqp_link_declare_exchange(l, topology_name(a, sizeof a, cfg->ns, exchanges[i].suffix),
                                        exchanges[i].type, err);
        if (rc != IW_OK)
            goto out;
    }
    topology_name(b, sizeof b, cfg->ns, "dlx");
    for (size_t i = 0; i < sizeof work_queues / sizeof work_queues[0]; i++) {
        args = work_queue_args(cfg, b);
        rc = amqp_link_declare_queue(l, topology_name(a, sizeof a, cfg->ns, work_queues[i]), args,
                                     err);
        json_decref(args);
        args = NULL;
        if (rc != IW_OK)
            goto out;
    }
    args = json_pack("{s:s}", "x-queue-type", cfg->queue_classic ? "classic" : "quorum");
    if (!cfg->queue_classic)
        quorum_args(cfg, args);
    rc = amqp_link_declare_queue(l, topology_name(a, sizeof a, cfg->ns, "dead"), args, err);
    json_decref(args);
    args = NULL;
    if (rc != IW_OK)
        goto out;
    rc = amqp_link_bind(l, a, b, "", NULL, err);
    if (rc != IW_OK)
        goto out;
    topology_name(b, sizeof b, cfg->ns, "requests");
    for (size_t i = 0; i < sizeof bindings / sizeof bindings[0]; i++) {
        rc = amqp_link_bind(l, topology_name(a, sizeof a, cfg->ns, bindings[i].queue), b,
                            bindings[i].key, NULL, err);
        if (rc != IW_OK)
            goto out;
    }
    topology_name(b, sizeof b, cfg->ns, "retry");
    for (size_t i = 0; i < sizeof work_queues / sizeof work_queues[0]; i++) {
        args = json_pack("{s:s, s:s}", "x-match", "all", "iw-target", work_queues[i]);
        rc = amqp_link_bind(l, topology_name(a, sizeof a, cfg->ns, work_queues[i]), b, "", args,
                            err);
        json_decref(args);
        args = NULL;
        if (rc != IW_OK)
            goto out;
    }
    for (int k = 0; k < IW_DELAY_TIERS; k++) {
        char suffix[TOPOLOGY_SUFFIX_SIZE];
        args = delay_queue_args(cfg, topology_tier_ms(k), b);
        rc = amqp_link_declare_queue(
            l, topology_name(a, sizeof a, cfg->ns, topology_tier_suffix(k, suffix)), args, err);
        json_decref(args);
        args = NULL;
        if (rc != IW_OK)
            goto out;
    }
out:
    json_decref(args);
    return rc;
}
