#include "limiter.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* KEYS: log, seq, pause, class log, own demand key, the other classes'
 * demand keys (ARGV[4] of them), then optional record keys.
 * ARGV: want, share permille, n tiers, n other demand keys, then limit and
 * window (ms) per tier.
 * A class cap binds only while another class has shown demand (was refused
 * within the last DEMAND_MS): the limiter stays work-conserving when one
 * class is alone, and fair when they compete.
 * With record keys, `want` becomes the number of them that do not exist:
 * work already done (an accepted jobId) costs no permit, and the check rides
 * in the same round trip.  Returns {granted, wait_ms, usage_permille, paused,
 * record...} (a missing record is nil). */
static const char take_source[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local want = tonumber(ARGV[1])\n"
    "local share = tonumber(ARGV[2])\n"
    "local n = tonumber(ARGV[3])\n"
    "local nd = tonumber(ARGV[4])\n"
    "local first_record = 6 + nd\n"
    "local records = {}\n"
    "if share < 1000 then\n"
    "  local contended = false\n"
    "  for i = 6, 5 + nd do if redis.call('EXISTS', KEYS[i]) == 1 then contended = true end end\n"
    "  if not contended then share = 1000 end\n"
    "end\n"
    "if #KEYS >= first_record then\n"
    "  local rk = {}\n"
    "  for i = first_record, #KEYS do rk[#rk + 1] = KEYS[i] end\n"
    "  records = redis.call('MGET', unpack(rk))\n"
    "  want = 0\n"
    "  for i = 1, #records do if not records[i] then want = want + 1 end end\n"
    "end\n"
    "local function fmt(x) return string.format('%d', x) end\n"
    "local function reply(g, w, u, p)\n"
    "  local r = {g, w, u, p}\n"
    "  for i = 1, #records do r[4 + i] = records[i] end\n"
    "  return r\n"
    "end\n"
    "local lim, win, clim = {}, {}, {}\n"
    "local maxwin, usage, grant = 0, 0, want\n"
    "local counts, ccounts = {}, {}\n"
    "for i = 1, n do\n"
    "  lim[i] = tonumber(ARGV[3 + 2 * i])\n"
    "  win[i] = tonumber(ARGV[4 + 2 * i]) * 1000\n"
    "  if win[i] > maxwin then maxwin = win[i] end\n"
    "  local lo = '(' .. fmt(now - win[i])\n"
    "  counts[i] = redis.call('ZCOUNT', KEYS[1], lo, '+inf')\n"
    "  local u = math.floor(counts[i] * 1000 / lim[i])\n"
    "  if u > usage then usage = u end\n"
    "  local room = lim[i] - counts[i]\n"
    "  if share < 1000 then\n"
    "    clim[i] = math.max(1, math.floor(lim[i] * share / 1000))\n"
    "    ccounts[i] = redis.call('ZCOUNT', KEYS[4], lo, '+inf')\n"
    "    room = math.min(room, clim[i] - ccounts[i])\n"
    "  end\n"
    "  if room < grant then grant = room end\n"
    "end\n"
    "if want == 0 then return reply(0, 0, usage, 0) end\n"
    "local pause = redis.call('PTTL', KEYS[3])\n"
    "if pause > 0 then\n"
    "  redis.call('SET', KEYS[5], '1', 'PX', 2000)\n"
    "  return reply(0, pause, usage, 1)\n"
    "end\n"
    "if grant < 0 then grant = 0 end\n"
    "if grant > 0 then\n"
    "  local seq = redis.call('INCRBY', KEYS[2], grant)\n"
    "  local args = {}\n"
    "  for j = 1, grant do\n"
    "    args[#args + 1] = fmt(now)\n"
    "    args[#args + 1] = fmt(seq - grant + j)\n"
    "  end\n"
    "  redis.call('ZADD', KEYS[1], unpack(args))\n"
    "  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now - maxwin))\n"
    "  redis.call('PEXPIRE', KEYS[1], math.floor(maxwin / 1000) + 1000)\n"
    "  if share < 1000 then\n"
    "    redis.call('ZADD', KEYS[4], unpack(args))\n"
    "    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', fmt(now - maxwin))\n"
    "    redis.call('PEXPIRE', KEYS[4], math.floor(maxwin / 1000) + 1000)\n"
    "  end\n"
    "end\n"
    "local wait = 0\n"
    "if grant < want then\n"
    "  redis.call('SET', KEYS[5], '1', 'PX', 2000)\n"
    "  for i = 1, n do\n"
    "    local lo = '(' .. fmt(now - win[i])\n"
    "    local c = counts[i] + grant\n"
    "    if c >= lim[i] then\n"
    "      local e = redis.call('ZRANGEBYSCORE', KEYS[1], lo, '+inf', 'WITHSCORES', 'LIMIT', c - "
    "lim[i], 1)\n"
    "      if e[2] then wait = math.max(wait, tonumber(e[2]) + win[i] - now) end\n"
    "    end\n"
    "    if share < 1000 then\n"
    "      local cc = ccounts[i] + grant\n"
    "      if cc >= clim[i] then\n"
    "        local e = redis.call('ZRANGEBYSCORE', KEYS[4], lo, '+inf', 'WITHSCORES', 'LIMIT', cc "
    "- clim[i], 1)\n"
    "        if e[2] then wait = math.max(wait, tonumber(e[2]) + win[i] - now) end\n"
    "      end\n"
    "    end\n"
    "  end\n"
    "  wait = math.max(1, math.ceil(wait / 1000))\n"
    "end\n"
    "return reply(grant, wait, usage, 0)\n";

/* KEYS: pause. ARGV: ms. */
static const char pause_source[] =
    "local cur = redis.call('PTTL', KEYS[1])\n"
    "local ms = tonumber(ARGV[1])\n"
    "if cur < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end\n"
    "return ms\n";

const char *const limiter_classes[LIMITER_N_CLASSES] = {"submit", "status", "resource"};

struct limiter {
    redis_link *redis;
    redis_script take;
    redis_script pause;
    char key_log[200], key_seq[200], key_pause[200], ns[128];
    iw_rate_tier tiers[IW_MAX_TIERS];
    size_t n;
    char tier_args[IW_MAX_TIERS * 2][24];
};

limiter *limiter_new(redis_link *r, const char *ns, const iw_rate_tier *tiers, size_t n,
                     long guard_ms)
{
    limiter *lim = calloc(1, sizeof *lim);

    if (!lim)
        return NULL;
    lim->redis = r;
    lim->take.source = take_source;
    lim->pause.source = pause_source;
    snprintf(lim->ns, sizeof lim->ns, "%s", ns);
    snprintf(lim->key_log, sizeof lim->key_log, "%s:limiter:log", ns);
    snprintf(lim->key_seq, sizeof lim->key_seq, "%s:limiter:seq", ns);
    snprintf(lim->key_pause, sizeof lim->key_pause, "%s:limiter:pause", ns);
    lim->n = n > IW_MAX_TIERS ? IW_MAX_TIERS : n;
    for (size_t i = 0; i < lim->n; i++) {
        lim->tiers[i] = tiers[i];
        snprintf(lim->tier_args[2 * i], sizeof lim->tier_args[0], "%ld", tiers[i].limit);
        snprintf(lim->tier_args[2 * i + 1], sizeof lim->tier_args[0], "%ld",
                 tiers[i].window_ms + guard_ms);
    }
    redis_link_add_script(r, &lim->take);
    redis_link_add_script(r, &lim->pause);
    return lim;
}

void limiter_free(limiter *lim)
{
    free(lim);
}

int limiter_append_take(limiter *lim, const char *cls, int share_permille, int want,
                        size_t n_records, const char *const *record_keys, iw_error *err)
{
    const char *argv[5 + LIMITER_N_CLASSES + 4 + IW_MAX_TIERS * 2 + LIMITER_MAX_RECORDS];
    char key_class[200], key_demand[LIMITER_N_CLASSES][200], swant[16], sshare[16], sn[16], snd[16];
    int argc = 0, nd = 0, nkeys;

    if (want < 1 || want > 1000 || n_records > LIMITER_MAX_RECORDS)
        return iw_error_set(err, IW_ERR_INVALID, "permit request of %d", want);
    snprintf(key_class, sizeof key_class, "%s:limiter:log:%s", lim->ns, cls);
    snprintf(key_demand[0], sizeof key_demand[0], "%s:limiter:demand:%s", lim->ns, cls);
    for (int i = 0; i < LIMITER_N_CLASSES; i++)
        if (strcmp(limiter_classes[i], cls) != 0 && nd + 1 < LIMITER_N_CLASSES)
            snprintf(key_demand[++nd], sizeof key_demand[0], "%s:limiter:demand:%s", lim->ns,
                     limiter_classes[i]);
    snprintf(snd, sizeof snd, "%d", nd);
    snprintf(swant, sizeof swant, "%d", want);
    snprintf(sshare, sizeof sshare, "%d", share_permille > 1000 ? 1000 : share_permille);
    snprintf(sn, sizeof sn, "%zu", lim->n);
    argv[argc++] = lim->key_log;
    argv[argc++] = lim->key_seq;
    argv[argc++] = lim->key_pause;
    argv[argc++] = key_class;
    for (int i = 0; i <= nd; i++)
        argv[argc++] = key_demand[i];
    for (size_t i = 0; i < n_records; i++)
        argv[argc++] = record_keys[i];
    nkeys = argc;
    argv[argc++] = swant;
    argv[argc++] = sshare;
    argv[argc++] = sn;
    argv[argc++] = snd;
    for (size_t i = 0; i < lim->n * 2; i++)
        argv[argc++] = lim->tier_args[i];
    return redis_link_append_script(lim->redis, &lim->take, nkeys, argc, argv, err);
}

int limiter_read_take(limiter *lim, limiter_result *out, iw_error *err)
{
    redisReply *rep;
    int rc = redis_link_read(lim->redis, &rep, err);

    if (rc != IW_OK)
        return rc;
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 4) {
        freeReplyObject(rep);
        return iw_error_set(err, IW_ERR_REDIS_SCRIPT, "limiter: unexpected reply");
    }
    out->granted = (int)rep->element[0]->integer;
    out->wait_ms = (long)rep->element[1]->integer;
    out->usage_permille = (int)rep->element[2]->integer;
    out->paused = (int)rep->element[3]->integer;
    out->n_records = rep->elements - 4;
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

const char *limiter_record(const limiter_result *r, size_t i, size_t *len)
{
    if (!r->reply || i >= r->n_records)
        return NULL;
    const redisReply *e = r->reply->element[4 + i];
    if (e->type != REDIS_REPLY_STRING)
        return NULL;
    if (len)
        *len = e->len;
    return e->str;
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
    const char *argv[2];
    char sms[24];
    redisReply *rep;
    int rc = redis_link_ensure(lim->redis, err);

    if (rc != IW_OK)
        return rc;
    snprintf(sms, sizeof sms, "%ld", ms < 1 ? 1 : ms);
    argv[0] = lim->key_pause;
    argv[1] = sms;
    rc = redis_link_append_script(lim->redis, &lim->pause, 1, 2, argv, err);
    if (rc == IW_OK)
        rc = redis_link_read(lim->redis, &rep, err);
    if (rc == IW_OK)
        freeReplyObject(rep);
    return rc;
}
