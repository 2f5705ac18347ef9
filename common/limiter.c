#include "limiter.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "config.h"

/* Longest key the limiter builds from the namespace (the namespace itself is
 * checked by the configuration; this is the hard cap behind it). */
#define LIMITER_MAX_KEY 1024
/* Longest outcome sequence of one turn (one letter per finished call). */
#define LIMITER_MAX_SEQ 4096
/* Fixed KEYS of the ask script before the caller's record and claim keys. */
#define ASK_FIXED_KEYS 9
/* Elements of the ask reply before the per-tier usages. */
#define ASK_HEADER 12

/* KEYS: 1 log, 2 pause, 3 class log, 4 own demand, 5-6 the other classes'
 * demand, 7 breaker state, 8 breaker open, 9 breaker probe, then nr record
 * keys, then nc claim keys.
 * ARGV: 1 n items, 2 nr, 3 nc, 4 class share permille (1000: none),
 * 5 throttle percent (100: none), 6 alert percent, 7 claim/probe token,
 * 8 claim ms, 9 probe lease ms, 10 max pause ms, 11 member prefix, 12 n tiers,
 * then limit and window (ms) per tier.
 *
 * Items are looked at in order: records and foreign claims answer without a
 * permit; the rest need one and get it in order while the breaker, the pause,
 * every tier, the class cap and the throttle allow.  A class cap binds only
 * while another class has shown demand (was refused within the last 2 s): the
 * limiter stays work-conserving when one class is alone, and fair when they
 * compete.  The cap is a share of what the ask may use of each tier (the
 * throttle's part for normal calls): a share of the whole tier would let one
 * class of normal calls fill all of the throttle's part.  The score of new permits is max(now,
 * latest score): a step back of the clock stalls the scores instead of opening room.  The windows
 * are counted from `now`, which after such a step only counts more permits (errs on the safe side).
 *
 * Returns {granted, wait_ms, reason, probe index (0-based, -1), breaker
 * state, fails, transition from, to, usage before (max permille), above
 * alert, nr, n tiers, usage after per tier..., then verdict and payload per
 * item} (payload: the record, the claim's PTTL, or nil). */
static const char ask_source[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local n, nr, nc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])\n"
    "local share, thr, alert = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])\n"
    "local token, claim_ms, lease = ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])\n"
    "local maxpause, prefix, nt = tonumber(ARGV[10]), ARGV[11], tonumber(ARGV[12])\n"
    "local function fmt(x) return string.format('%d', x) end\n"
    "local verdict, payload, need, recs = {}, {}, {}, {}\n"
    "if nr > 0 then recs = redis.call('MGET', unpack(KEYS, 10, 9 + nr)) end\n"
    "for i = 1, n do\n"
    "  verdict[i] = 4\n"
    "  if recs[i] then\n"
    "    verdict[i] = 2; payload[i] = recs[i]\n"
    "  else\n"
    "    if nc > 0 then\n"
    "      local ck = KEYS[9 + nr + i]\n"
    "      local h = redis.call('GET', ck)\n"
    "      if h and h ~= token then verdict[i] = 3; payload[i] = redis.call('PTTL', ck) end\n"
    "    end\n"
    "    if verdict[i] == 4 then need[#need + 1] = i end\n"
    "  end\n"
    "end\n"
    "local lim, win, counts = {}, {}, {}\n"
    "local maxwin, usage = 0, 0\n"
    "for i = 1, nt do\n"
    "  lim[i] = tonumber(ARGV[11 + 2 * i])\n"
    "  win[i] = tonumber(ARGV[12 + 2 * i]) * 1000\n"
    "  if win[i] > maxwin then maxwin = win[i] end\n"
    "  counts[i] = redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now - win[i]), '+inf')\n"
    "  local u = math.floor(counts[i] * 1000 / lim[i])\n"
    "  if u > usage then usage = u end\n"
    "end\n"
    "local function eff(i)\n"
    "  if thr >= 100 then return lim[i] end\n"
    "  return math.max(1, math.floor(lim[i] * thr / 100))\n"
    "end\n"
    "local st = redis.call('HMGET', KEYS[7], 'state', 'fails')\n"
    "local bs, fails = tonumber(st[1] or '0'), tonumber(st[2] or '0')\n"
    "local from, to, granted, wait, reason, probe = -1, -1, 0, 0, 0, -1\n"
    "if #need > 0 then\n"
    "  local allow, probing = #need, false\n"
    "  if bs == 1 then\n"
    "    local ttl = redis.call('PTTL', KEYS[8])\n"
    "    if ttl > 0 then\n"
    "      allow = 0; wait = ttl; reason = 3\n"
    "    else\n"
    "      bs = 2; from = 1; to = 2\n"
    "      redis.call('HSET', KEYS[7], 'state', '2')\n"
    "    end\n"
    "  end\n"
    "  if bs == 2 and allow > 0 then\n"
    "    local pt = redis.call('PTTL', KEYS[9])\n"
    "    if pt > 0 then\n"
    "      allow = 0; wait = math.min(pt, 1000); reason = 3\n"
    "    else\n"
    "      allow = 1; probing = true\n"
    "    end\n"
    "  end\n"
    "  if allow > 0 then\n"
    "    local p = redis.call('PTTL', KEYS[2])\n"
    "    if p > maxpause then redis.call('PEXPIRE', KEYS[2], maxpause); p = maxpause end\n"
    "    if p > 0 then\n"
    "      allow = 0; wait = p; reason = 2\n"
    "      redis.call('SET', KEYS[4], '1', 'PX', 2000)\n"
    "    end\n"
    "  end\n"
    "  local clim, ccounts = {}, {}\n"
    "  if allow > 0 then\n"
    "    if share < 1000 and redis.call('EXISTS', KEYS[5]) == 0 and\n"
    "       redis.call('EXISTS', KEYS[6]) == 0 then share = 1000 end\n"
    "    granted = allow\n"
    "    for i = 1, nt do\n"
    "      local room = eff(i) - counts[i]\n"
    "      if share < 1000 then\n"
    "        clim[i] = math.max(1, math.floor(eff(i) * share / 1000))\n"
    "        ccounts[i] = redis.call('ZCOUNT', KEYS[3], '(' .. fmt(now - win[i]), '+inf')\n"
    "        room = math.min(room, clim[i] - ccounts[i])\n"
    "      end\n"
    "      if room < granted then granted = room end\n"
    "    end\n"
    "    if granted < 0 then granted = 0 end\n"
    "  end\n"
    "  if granted > 0 then\n"
    "    local score = now\n"
    "    local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')\n"
    "    if last[2] and tonumber(last[2]) > score then score = tonumber(last[2]) end\n"
    "    local args = {}\n"
    "    for j = 1, granted do\n"
    "      args[2 * j - 1] = fmt(score)\n"
    "      args[2 * j] = fmt(score) .. ':' .. prefix .. '-' .. j\n"
    "      verdict[need[j]] = 1\n"
    "      if nc > 0 then redis.call('SET', KEYS[9 + nr + need[j]], token, 'PX', claim_ms) end\n"
    "    end\n"
    "    local ttl = math.floor((score - now + maxwin) / 1000) + 1000\n"
    "    redis.call('ZADD', KEYS[1], unpack(args))\n"
    "    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - maxwin))\n"
    "    redis.call('PEXPIRE', KEYS[1], ttl)\n"
    "    if share < 1000 then\n"
    "      redis.call('ZADD', KEYS[3], unpack(args))\n"
    "      redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', fmt(now - maxwin))\n"
    "      redis.call('PEXPIRE', KEYS[3], ttl)\n"
    "    end\n"
    "    if probing then\n"
    "      redis.call('SET', KEYS[9], token, 'PX', lease)\n"
    "      probe = need[1] - 1\n"
    "    end\n"
    "  end\n"
    "  if granted < #need and reason == 0 then\n"
    "    if probing and granted == 1 then\n"
    "      reason = 3; wait = 1000\n"
    "    else\n"
    "      redis.call('SET', KEYS[4], '1', 'PX', 2000)\n"
    "      local full = false\n"
    "      for i = 1, nt do\n"
    "        local lo = '(' .. fmt(now - win[i])\n"
    "        local c, e_lim = counts[i] + granted, eff(i)\n"
    "        if c >= lim[i] then full = true end\n"
    "        if c >= e_lim then\n"
    "          local e = redis.call('ZRANGEBYSCORE', KEYS[1], lo, '+inf', 'WITHSCORES', 'LIMIT',\n"
    "                               c - e_lim, 1)\n"
    "          if e[2] then wait = math.max(wait, tonumber(e[2]) + win[i] - now) end\n"
    "        end\n"
    "        if share < 1000 and ccounts[i] + granted >= clim[i] then\n"
    "          full = true\n"
    "          local e = redis.call('ZRANGEBYSCORE', KEYS[3], lo, '+inf', 'WITHSCORES', 'LIMIT',\n"
    "                               ccounts[i] + granted - clim[i], 1)\n"
    "          if e[2] then wait = math.max(wait, tonumber(e[2]) + win[i] - now) end\n"
    "        end\n"
    "      end\n"
    "      wait = math.max(1, math.ceil(wait / 1000))\n"
    "      if full then reason = 1 else reason = 4 end\n"
    "    end\n"
    "  end\n"
    "end\n"
    "local r = {granted, wait, reason, probe, bs, fails, from, to, usage, 0, nr, nt}\n"
    "for i = 1, nt do\n"
    "  local c = counts[i] + granted\n"
    "  r[#r + 1] = math.floor(c * 1000 / lim[i])\n"
    "  if c * 100 >= lim[i] * alert then r[10] = 1 end\n"
    "end\n"
    "for i = 1, n do\n"
    "  r[#r + 1] = verdict[i]\n"
    "  r[#r + 1] = payload[i] or false\n"
    "end\n"
    "return r\n";

/* KEYS: breaker state, open, probe.  ARGV: seq, probe outcome (-1, 0, 1),
 * failures threshold, open ms.
 * A breaker whose open period ended is half-open whether or not an ask has
 * noticed yet.  Closed: 'F' counts and opens at the threshold, anything else
 * resets the count.  Open or half-open: the letters are calls granted before
 * it opened and change nothing; the probe's outcome closes or re-opens it.
 * Returns {state before (effective), state after, transitions, fails after,
 * fails before}. */
static const char outcomes_source[] =
    "local st = redis.call('HMGET', KEYS[1], 'state', 'fails')\n"
    "local stored, fails = tonumber(st[1] or '0'), tonumber(st[2] or '0')\n"
    "local before, bs, changes = fails, stored, 0\n"
    "local po, thr, open_ms = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])\n"
    "if bs == 1 and redis.call('PTTL', KEYS[2]) <= 0 then bs = 2 end\n"
    "local from = bs\n"
    "local function open()\n"
    "  bs = 1; changes = changes + 1\n"
    "  redis.call('SET', KEYS[2], '1', 'PX', open_ms)\n"
    "  redis.call('DEL', KEYS[3])\n"
    "end\n"
    "if po >= 0 and bs == 2 then\n"
    "  if po == 1 then\n"
    "    bs = 0; fails = 0; changes = changes + 1\n"
    "    redis.call('DEL', KEYS[2], KEYS[3])\n"
    "  else\n"
    "    fails = fails + 1\n"
    "    open()\n"
    "  end\n"
    "end\n"
    "local seq = ARGV[1]\n"
    "for i = 1, #seq do\n"
    "  if bs == 0 then\n"
    "    if string.byte(seq, i) == 70 then\n"
    "      fails = fails + 1\n"
    "      if fails >= thr then open() end\n"
    "    else\n"
    "      fails = 0\n"
    "    end\n"
    "  end\n"
    "end\n"
    "local store = bs\n"
    "if store == 2 and stored == 1 and changes == 0 then store = 1 end\n"
    "if store ~= stored or fails ~= before then\n"
    "  redis.call('HSET', KEYS[1], 'state', store, 'fails', fails)\n"
    "end\n"
    "return {from, bs, changes, fails, before}\n";

/* KEYS: pause.  ARGV: ms, max ms.  Never shortens a longer pause, except one
 * longer than the cap (set before the cap existed, or by a bigger cap). */
static const char pause_source[] =
    "local cur = redis.call('PTTL', KEYS[1])\n"
    "local ms, max = tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "if ms > max then ms = max end\n"
    "if cur < ms or cur > max then redis.call('SET', KEYS[1], '1', 'PX', ms) end\n"
    "return ms\n";

const char *const limiter_classes[LIMITER_N_CLASSES] = {"submit", "status", "resource"};

struct limiter {
    redis_link *redis;
    redis_script ask;
    redis_script outcomes;
    redis_script pause;
    char *key_log, *key_pause, *key_state, *key_open, *key_probe;
    char *key_class[LIMITER_N_CLASSES], *key_demand[LIMITER_N_CLASSES];
    iw_rate_tier tiers[IW_MAX_TIERS];
    size_t n;
    char tier_args[IW_MAX_TIERS * 2][24];
    limiter_policy pol;
    char token[33];           /* this process's random token: unique members */
    unsigned long long calls; /* asks made, part of the member names */
};

limiter_policy limiter_policy_default(void)
{
    limiter_policy p;
    p.alert_pct = 100;
    p.share_permille[0] = 800;
    p.share_permille[1] = 500;
    p.share_permille[2] = 500;
    p.breaker_failures = 5;
    p.breaker_open_ms = 60000;
    p.probe_lease_ms = 30000;
    p.max_pause_ms = 3600000L;
    return p;
}

limiter_policy limiter_policy_from_config(const iw_config *cfg)
{
    limiter_policy p = limiter_policy_default();
    p.alert_pct = (int)cfg->rate_alert_pct;
    p.share_permille[0] = (int)cfg->submit_share_pct * 10;
    p.share_permille[1] = (int)cfg->poll_share_pct * 10;
    p.share_permille[2] = (int)cfg->resource_share_pct * 10;
    p.breaker_failures = cfg->breaker_failures;
    p.breaker_open_ms = cfg->breaker_open_ms;
    /* a probe is one call: it ends within the HTTP timeout, or its pod died */
    p.probe_lease_ms = cfg->http_timeout_ms + 5000;
    p.max_pause_ms = cfg->max_rate_pause_ms;
    return p;
}

static long clamp(long v, long lo, long hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

void limiter_set_policy(limiter *lim, const limiter_policy *p)
{
    lim->pol.alert_pct = (int)clamp(p->alert_pct, 1, 100);
    for (int i = 0; i < LIMITER_N_CLASSES; i++)
        lim->pol.share_permille[i] = (int)clamp(p->share_permille[i], 1, 1000);
    lim->pol.breaker_failures = clamp(p->breaker_failures, 1, 1000000);
    lim->pol.breaker_open_ms = clamp(p->breaker_open_ms, 1, 365L * 86400000L);
    lim->pol.probe_lease_ms = clamp(p->probe_lease_ms, 1, 86400000L);
    lim->pol.max_pause_ms = clamp(p->max_pause_ms, 1, 365L * 86400000L);
}

/* "ns:a" or "ns:a:b", allocated to size (the namespace is outside input:
 * never a fixed buffer); NULL past LIMITER_MAX_KEY or out of memory. */
static char *key_make(const char *ns, const char *a, const char *b)
{
    size_t len = strlen(ns) + 1 + strlen(a) + (b ? 1 + strlen(b) : 0);
    char *k;

    if (len > LIMITER_MAX_KEY || !(k = malloc(len + 1)))
        return NULL;
    strcpy(k, ns);
    strcat(k, ":");
    strcat(k, a);
    if (b) {
        strcat(k, ":");
        strcat(k, b);
    }
    return k;
}

/* 128 random bits in hex; without getrandom, time and pid (still distinct
 * between live processes). */
static void make_token(char out[33])
{
    unsigned char b[16];
    static const char hex[] = "0123456789abcdef";

    if (getrandom(b, sizeof b, 0) != (ssize_t)sizeof b) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        unsigned long long x = (unsigned long long)ts.tv_sec * 1000000007ULL ^
                               (unsigned long long)ts.tv_nsec ^
                               ((unsigned long long)getpid() << 32);
        for (int i = 0; i < 16; i++, x = x * 6364136223846793005ULL + 1442695040888963407ULL)
            b[i] = (unsigned char)(x >> 56);
    }
    for (int i = 0; i < 16; i++) {
        out[2 * i] = hex[b[i] >> 4];
        out[2 * i + 1] = hex[b[i] & 15];
    }
    out[32] = '\0';
}

limiter *limiter_new(redis_link *r, const char *ns, const iw_rate_tier *tiers, size_t n,
                     long guard_ms)
{
    limiter *lim = calloc(1, sizeof *lim);
    int ok;

    if (!lim)
        return NULL;
    lim->redis = r;
    lim->ask.source = ask_source;
    lim->outcomes.source = outcomes_source;
    lim->pause.source = pause_source;
    lim->pol = limiter_policy_default();
    make_token(lim->token);
    lim->key_log = key_make(ns, "limiter", "log");
    lim->key_pause = key_make(ns, "limiter", "pause");
    lim->key_state = key_make(ns, "breaker", "state");
    lim->key_open = key_make(ns, "breaker", "open");
    lim->key_probe = key_make(ns, "breaker", "probe");
    ok = lim->key_log && lim->key_pause && lim->key_state && lim->key_open && lim->key_probe;
    for (int i = 0; i < LIMITER_N_CLASSES; i++) {
        lim->key_class[i] = key_make(ns, "limiter:log", limiter_classes[i]);
        lim->key_demand[i] = key_make(ns, "limiter:demand", limiter_classes[i]);
        ok = ok && lim->key_class[i] && lim->key_demand[i];
    }
    if (!ok) {
        limiter_free(lim);
        return NULL;
    }
    lim->n = n > IW_MAX_TIERS ? IW_MAX_TIERS : n;
    for (size_t i = 0; i < lim->n; i++) {
        lim->tiers[i] = tiers[i];
        snprintf(lim->tier_args[2 * i], sizeof lim->tier_args[0], "%ld", tiers[i].limit);
        snprintf(lim->tier_args[2 * i + 1], sizeof lim->tier_args[0], "%ld",
                 tiers[i].window_ms + guard_ms);
    }
    redis_link_add_script(r, &lim->ask);
    redis_link_add_script(r, &lim->outcomes);
    redis_link_add_script(r, &lim->pause);
    return lim;
}

void limiter_free(limiter *lim)
{
    if (!lim)
        return;
    free(lim->key_log);
    free(lim->key_pause);
    free(lim->key_state);
    free(lim->key_open);
    free(lim->key_probe);
    for (int i = 0; i < LIMITER_N_CLASSES; i++) {
        free(lim->key_class[i]);
        free(lim->key_demand[i]);
    }
    free(lim);
}

static int class_index(const char *cls)
{
    for (int i = 0; cls && i < LIMITER_N_CLASSES; i++)
        if (strcmp(cls, limiter_classes[i]) == 0)
            return i;
    return -1;
}

/* What the ask script needs beyond a limiter_ask. */
typedef struct ask_args {
    int cls;
    size_t n;
    const char *const *records; /* NULL or n */
    const char *const *claims;  /* NULL or n */
    const char *token;          /* NULL: this process's member prefix */
    long claim_ms;
    int share_permille;
    int throttle_pct;
} ask_args;

static int append_ask(limiter *lim, const ask_args *a, iw_error *err)
{
    const char *argv[ASK_FIXED_KEYS + 2 * LIMITER_MAX_RECORDS + 12 + IW_MAX_TIERS * 2];
    char sn[24], snr[24], snc[24], sshare[24], sthr[24], salert[24], sclaim[24], slease[24],
        smax[24], snt[24], prefix[80];
    int argc = 0, nkeys, other = 0;
    long lease = a->claim_ms > 0 ? a->claim_ms : lim->pol.probe_lease_ms;

    lim->calls++;
    snprintf(prefix, sizeof prefix, "%s-%llu", lim->token, lim->calls);
    snprintf(sn, sizeof sn, "%zu", a->n);
    snprintf(snr, sizeof snr, "%zu", a->records ? a->n : 0);
    snprintf(snc, sizeof snc, "%zu", a->claims ? a->n : 0);
    snprintf(sshare, sizeof sshare, "%d", a->share_permille);
    snprintf(sthr, sizeof sthr, "%d", a->throttle_pct);
    snprintf(salert, sizeof salert, "%d", lim->pol.alert_pct);
    snprintf(sclaim, sizeof sclaim, "%ld", a->claim_ms > 0 ? a->claim_ms : 1);
    snprintf(slease, sizeof slease, "%ld", lease);
    snprintf(smax, sizeof smax, "%ld", lim->pol.max_pause_ms);
    snprintf(snt, sizeof snt, "%zu", lim->n);
    argv[argc++] = lim->key_log;
    argv[argc++] = lim->key_pause;
    argv[argc++] = lim->key_class[a->cls];
    argv[argc++] = lim->key_demand[a->cls];
    for (int i = 0; i < LIMITER_N_CLASSES; i++)
        if (i != a->cls && other++ < LIMITER_N_CLASSES - 1)
            argv[argc++] = lim->key_demand[i];
    argv[argc++] = lim->key_state;
    argv[argc++] = lim->key_open;
    argv[argc++] = lim->key_probe;
    for (size_t i = 0; a->records && i < a->n; i++)
        argv[argc++] = a->records[i];
    for (size_t i = 0; a->claims && i < a->n; i++)
        argv[argc++] = a->claims[i];
    nkeys = argc;
    argv[argc++] = sn;
    argv[argc++] = snr;
    argv[argc++] = snc;
    argv[argc++] = sshare;
    argv[argc++] = sthr;
    argv[argc++] = salert;
    argv[argc++] = a->token ? a->token : prefix;
    argv[argc++] = sclaim;
    argv[argc++] = slease;
    argv[argc++] = smax;
    argv[argc++] = prefix;
    argv[argc++] = snt;
    for (size_t i = 0; i < lim->n * 2; i++)
        argv[argc++] = lim->tier_args[i];
    return redis_link_append_script(lim->redis, &lim->ask, nkeys, argc, argv, err);
}

static int keys_valid(const char *const *keys, size_t n)
{
    for (size_t i = 0; keys && i < n; i++)
        if (!keys[i] || !*keys[i])
            return 0;
    return 1;
}

int limiter_append_ask(limiter *lim, const limiter_ask *ask, iw_error *err)
{
    ask_args a;

    memset(&a, 0, sizeof a);
    a.cls = class_index(ask->cls);
    if (a.cls < 0)
        return iw_error_set(err, IW_ERR_INVALID, "limiter: unknown class");
    if (ask->n < 1 || ask->n > LIMITER_MAX_RECORDS)
        return iw_error_set(err, IW_ERR_INVALID, "limiter: %zu items in one ask (1..%d)", ask->n,
                            LIMITER_MAX_RECORDS);
    if (!keys_valid(ask->record_keys, ask->n) || !keys_valid(ask->claim_keys, ask->n))
        return iw_error_set(err, IW_ERR_INVALID, "limiter: an empty record or claim key");
    if (ask->claim_token && (!*ask->claim_token || strlen(ask->claim_token) > LIMITER_MAX_TOKEN))
        return iw_error_set(err, IW_ERR_INVALID, "limiter: claim token empty or over %d bytes",
                            LIMITER_MAX_TOKEN);
    if (ask->claim_keys && (!ask->claim_token || ask->claim_ms < 1))
        return iw_error_set(err, IW_ERR_INVALID, "limiter: claims need a token and a lease");
    a.n = ask->n;
    a.records = ask->record_keys;
    a.claims = ask->claim_keys;
    a.token = ask->claim_token;
    a.claim_ms = ask->claim_ms;
    a.share_permille = ask->critical ? 1000 : lim->pol.share_permille[a.cls];
    a.throttle_pct = ask->critical ? 100 : lim->pol.alert_pct;
    return append_ask(lim, &a, err);
}

static int elem_int(const redisReply *rep, size_t i, long long *v)
{
    if (i >= rep->elements || rep->element[i]->type != REDIS_REPLY_INTEGER)
        return 0;
    *v = rep->element[i]->integer;
    return 1;
}

int limiter_read_ask(limiter *lim, limiter_result *out, iw_error *err)
{
    redisReply *rep;
    long long h[ASK_HEADER];
    int rc = redis_link_read(lim->redis, &rep, err);

    memset(out, 0, sizeof *out);
    out->probe_index = -1;
    out->breaker_from = out->breaker_to = -1;
    if (rc != IW_OK)
        return rc;
    int ok = rep->type == REDIS_REPLY_ARRAY && rep->elements >= ASK_HEADER;
    for (size_t i = 0; ok && i < ASK_HEADER; i++)
        ok = elem_int(rep, i, &h[i]);
    ok = ok && h[11] >= 0 && h[11] <= IW_MAX_TIERS && rep->elements >= ASK_HEADER + (size_t)h[11] &&
         (rep->elements - ASK_HEADER - (size_t)h[11]) % 2 == 0;
    for (size_t i = 0; ok && i < (size_t)h[11]; i++) {
        long long v;
        ok = elem_int(rep, ASK_HEADER + i, &v);
        out->tier_permille[i] = ok ? (int)v : 0;
    }
    if (!ok) {
        freeReplyObject(rep);
        return iw_error_set(err, IW_ERR_REDIS_SCRIPT, "limiter: unexpected reply");
    }
    out->granted = (int)h[0];
    out->wait_ms = (long)h[1];
    out->wait_reason = (int)h[2];
    out->paused = h[2] == LIMITER_WAIT_PAUSE;
    out->probe_index = (int)h[3];
    out->breaker_state = (int)h[4];
    out->breaker_failures = (long)h[5];
    out->breaker_from = (int)h[6];
    out->breaker_to = (int)h[7];
    out->usage_permille = (int)h[8];
    out->above_alert = (int)h[9];
    out->n_tiers = (size_t)h[11];
    out->n_items = (rep->elements - ASK_HEADER - out->n_tiers) / 2;
    out->n_records = h[10] > 0 ? out->n_items : 0;
    out->reply = rep;
    return IW_OK;
}

void limiter_result_release(limiter_result *r)
{
    if (r && r->reply) {
        freeReplyObject(r->reply);
        r->reply = NULL;
    }
}

/* The verdict and payload elements of item i, or NULL. */
static const redisReply *item(const limiter_result *r, size_t i, const redisReply **payload)
{
    size_t at = ASK_HEADER + r->n_tiers + 2 * i;

    if (!r->reply || i >= r->n_items || at + 1 >= r->reply->elements)
        return NULL;
    *payload = r->reply->element[at + 1];
    return r->reply->element[at];
}

limiter_verdict limiter_item_verdict(const limiter_result *r, size_t i)
{
    const redisReply *p, *v = item(r, i, &p);
    return v && v->type == REDIS_REPLY_INTEGER ? (limiter_verdict)v->integer : (limiter_verdict)0;
}

const char *limiter_record(const limiter_result *r, size_t i, size_t *len)
{
    const redisReply *p;
    if (limiter_item_verdict(r, i) != LIMITER_RECORDED || !item(r, i, &p) ||
        p->type != REDIS_REPLY_STRING)
        return NULL;
    if (len)
        *len = p->len;
    return p->str;
}

long limiter_claim_ttl(const limiter_result *r, size_t i)
{
    const redisReply *p;
    if (limiter_item_verdict(r, i) != LIMITER_CLAIMED || !item(r, i, &p) ||
        p->type != REDIS_REPLY_INTEGER)
        return -1;
    return (long)p->integer;
}

int limiter_append_outcomes(limiter *lim, const char *seq, int probe_outcome, iw_error *err)
{
    const char *argv[7];
    char spo[8], sthr[24], sopen[24];
    size_t len = seq ? strlen(seq) : 0;

    if (len > LIMITER_MAX_SEQ || probe_outcome < -1 || probe_outcome > 1)
        return iw_error_set(err, IW_ERR_INVALID, "limiter: %zu outcomes or probe outcome %d", len,
                            probe_outcome);
    for (size_t i = 0; i < len; i++)
        if (seq[i] != 'S' && seq[i] != 'F')
            return iw_error_set(err, IW_ERR_INVALID, "limiter: outcome letters are S and F");
    snprintf(spo, sizeof spo, "%d", probe_outcome);
    snprintf(sthr, sizeof sthr, "%ld", lim->pol.breaker_failures);
    snprintf(sopen, sizeof sopen, "%ld", lim->pol.breaker_open_ms);
    argv[0] = lim->key_state;
    argv[1] = lim->key_open;
    argv[2] = lim->key_probe;
    argv[3] = seq ? seq : "";
    argv[4] = spo;
    argv[5] = sthr;
    argv[6] = sopen;
    return redis_link_append_script(lim->redis, &lim->outcomes, 3, 7, argv, err);
}

int limiter_read_outcomes(limiter *lim, breaker_report *out, iw_error *err)
{
    redisReply *rep;
    long long v[5];
    int rc = redis_link_read(lim->redis, &rep, err);

    memset(out, 0, sizeof *out);
    if (rc != IW_OK)
        return rc;
    int ok = rep->type == REDIS_REPLY_ARRAY && rep->elements == 5;
    for (size_t i = 0; ok && i < 5; i++)
        ok = elem_int(rep, i, &v[i]);
    freeReplyObject(rep);
    if (!ok)
        return iw_error_set(err, IW_ERR_REDIS_SCRIPT, "breaker: unexpected reply");
    out->from = (int)v[0];
    out->to = out->state = (int)v[1];
    out->transitions = (int)v[2];
    out->failures = (long)v[3];
    out->failures_before = (long)v[4];
    return IW_OK;
}

/* One "name:value" line of an INFO reply, copied into out (capped). */
static int info_field(const char *info, const char *name, char *out, size_t cap)
{
    size_t nlen = strlen(name);

    for (const char *p = info; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, name, nlen) == 0 && p[nlen] == ':') {
            const char *v = p + nlen + 1;
            size_t len = strcspn(v, "\r\n");
            if (len >= cap)
                len = cap - 1;
            memcpy(out, v, len);
            out[len] = '\0';
            return 1;
        }
    }
    return 0;
}

int limiter_check_redis(limiter *lim, limiter_redis_info *out, iw_error *err)
{
    char mem[32];
    redisReply *rep = redis_link_command(lim->redis, err, "INFO memory");

    memset(out, 0, sizeof *out);
    if (!rep)
        return err ? err->status : IW_ERR_REDIS;
    int ok = rep->type == REDIS_REPLY_STRING;
    ok = ok && info_field(rep->str, "maxmemory_policy", out->policy, sizeof out->policy);
    if (ok && info_field(rep->str, "maxmemory", mem, sizeof mem))
        out->maxmemory = strtoll(mem, NULL, 10);
    freeReplyObject(rep);
    if (!ok)
        return iw_error_set(err, IW_ERR_REDIS, "Redis: INFO memory has no maxmemory_policy");
    out->can_evict = strcmp(out->policy, "noeviction") != 0;
    return IW_OK;
}

/* ---- the API of the roles before the job engine ---------------------------------- */

int limiter_append_take(limiter *lim, const char *cls, int share_permille, int want,
                        size_t n_records, const char *const *record_keys, iw_error *err)
{
    ask_args a;

    memset(&a, 0, sizeof a);
    a.cls = class_index(cls);
    if (want < 1 || want > 1000 || n_records > LIMITER_MAX_RECORDS || a.cls < 0 ||
        (n_records && !keys_valid(record_keys, n_records)))
        return iw_error_set(err, IW_ERR_INVALID, "permit request of %d", want);
    a.n = n_records ? n_records : (size_t)want;
    a.records = n_records ? record_keys : NULL;
    a.share_permille = share_permille > 1000 ? 1000 : share_permille < 1 ? 1 : share_permille;
    a.throttle_pct = 100;
    return append_ask(lim, &a, err);
}

int limiter_read_take(limiter *lim, limiter_result *out, iw_error *err)
{
    return limiter_read_ask(lim, out, err);
}

int limiter_take(limiter *lim, const char *cls, int share_permille, int want, limiter_result *out,
                 iw_error *err)
{
    int rc = redis_link_ensure(lim->redis, err);
    if (rc == IW_OK)
        rc = limiter_append_take(lim, cls, share_permille, want, 0, NULL, err);
    if (rc == IW_OK)
        rc = limiter_read_take(lim, out, err);
    if (rc == IW_OK)
        limiter_result_release(out);
    return rc;
}

int limiter_pause(limiter *lim, long ms, iw_error *err)
{
    const char *argv[3];
    char sms[24], smax[24];
    redisReply *rep;
    int rc = redis_link_ensure(lim->redis, err);

    if (rc != IW_OK)
        return rc;
    snprintf(sms, sizeof sms, "%ld",
             ms < 1                       ? 1
             : ms > lim->pol.max_pause_ms ? lim->pol.max_pause_ms
                                          : ms);
    snprintf(smax, sizeof smax, "%ld", lim->pol.max_pause_ms);
    argv[0] = lim->key_pause;
    argv[1] = sms;
    argv[2] = smax;
    rc = redis_link_append_script(lim->redis, &lim->pause, 1, 3, argv, err);
    if (rc == IW_OK)
        rc = redis_link_read(lim->redis, &rep, err);
    if (rc == IW_OK)
        freeReplyObject(rep);
    return rc;
}
