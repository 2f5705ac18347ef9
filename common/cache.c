#include "cache.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* KEYS: fresh, missing, lock, plain (the id's own <ns>:resource:<id>).
 * ARGV: token, lock ms, purge (1: delete the fresh value first, it was found
 * corrupt).
 * {1, value}: fresh hit; {2}: remembered 404; {3}: the caller holds the lock
 * now (taken, or extended when it was already its own); {4, pttl}: another
 * caller holds it.  An expand variant is fresh only while the id's plain key
 * exists: a system that follows the spec deletes <ns>:resource:<id> when the
 * resource changes, and every variant of the id is then a miss. */
static const char lookup_source[] =
    "if ARGV[3] == '1' then redis.call('DEL', KEYS[1]) end\n"
    "local v = redis.call('GET', KEYS[1])\n"
    "if v and KEYS[1] ~= KEYS[4] and redis.call('EXISTS', KEYS[4]) == 0 then\n"
    "  redis.call('DEL', KEYS[1])\n"
    "  v = nil\n"
    "end\n"
    "if v then return {1, v} end\n"
    "if redis.call('EXISTS', KEYS[2]) == 1 then return {2, ''} end\n"
    "local h = redis.call('GET', KEYS[3])\n"
    "if (not h) or h == ARGV[1] then\n"
    "  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])\n"
    "  return {3, ''}\n"
    "end\n"
    "return {4, tostring(redis.call('PTTL', KEYS[3]))}\n";

/* KEYS: fresh, stale, missing, lock, variants, plain.
 * ARGV: mode (found|missing|release), token, value, fresh ttl, stale ttl,
 * negative ttl, variant member, variants ttl.
 * Writes only while the caller still holds the lock (an invalidation deletes
 * it), then releases it.  A found variant also refreshes the id's plain key
 * (the spec's <ns>:resource:<id> always holds the id's OurFormat after any
 * look-up); a 404 of a variant drops it.  Returns 1 when written, 0 when the
 * lock was gone. */
static const char store_source[] = "if redis.call('GET', KEYS[4]) ~= ARGV[2] then return 0 end\n"
                                   "redis.call('DEL', KEYS[4])\n"
                                   "if ARGV[1] == 'found' then\n"
                                   "  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])\n"
                                   "  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[5])\n"
                                   "  redis.call('DEL', KEYS[3])\n"
                                   "  if KEYS[6] ~= KEYS[1] then\n"
                                   "    redis.call('SET', KEYS[6], ARGV[3], 'PX', ARGV[4])\n"
                                   "  end\n"
                                   "elseif ARGV[1] == 'missing' then\n"
                                   "  redis.call('SET', KEYS[3], '1', 'PX', ARGV[6])\n"
                                   "  redis.call('DEL', KEYS[1], KEYS[2], KEYS[6])\n"
                                   "else\n"
                                   "  return 1\n"
                                   "end\n"
                                   "redis.call('SADD', KEYS[5], ARGV[7])\n"
                                   "if redis.call('PTTL', KEYS[5]) < tonumber(ARGV[8]) then\n"
                                   "  redis.call('PEXPIRE', KEYS[5], ARGV[8])\n"
                                   "end\n"
                                   "return 1\n";

/* KEYS: the id's variants set.  ARGV: namespace, id.
 * Deletes the fresh entry, the stale copy, the remembered 404 and the lock of
 * the plain id and of every expand variant recorded in the set, then the set;
 * atomically.  The per-variant key names are built here from the set's
 * members, which is fine on one Redis server (not on Redis Cluster).
 * Returns the number of keys deleted. */
static const char invalidate_source[] =
    "local kinds = {'resource', 'resource-stale', 'resource-missing', 'resource-lock'}\n"
    "local members = redis.call('SMEMBERS', KEYS[1])\n"
    "members[#members + 1] = ''\n"
    "local n = 0\n"
    "for _, m in ipairs(members) do\n"
    "  for _, k in ipairs(kinds) do\n"
    "    n = n + redis.call('DEL', ARGV[1] .. ':' .. k .. m .. ':' .. ARGV[2])\n"
    "  end\n"
    "end\n"
    "return n + redis.call('DEL', KEYS[1])\n";

struct cache {
    redis_link *redis;
    redis_script lookup, store, invalidate;
    char *ns;
    char fresh[24], stale[24], missing[24], lock[24], set[24];
};

cache *cache_new(redis_link *r, const char *ns, const cache_ttls *t)
{
    cache *c = calloc(1, sizeof *c);
    long stale = t->stale_ms > t->fresh_ms ? t->stale_ms : t->fresh_ms;
    long set = stale > t->missing_ms ? stale : t->missing_ms;

    if (!c || !(c->ns = strdup(ns))) {
        free(c);
        return NULL;
    }
    c->redis = r;
    c->lookup.source = lookup_source;
    c->store.source = store_source;
    c->invalidate.source = invalidate_source;
    snprintf(c->fresh, sizeof c->fresh, "%ld", t->fresh_ms);
    snprintf(c->stale, sizeof c->stale, "%ld", stale);
    snprintf(c->missing, sizeof c->missing, "%ld", t->missing_ms);
    snprintf(c->lock, sizeof c->lock, "%ld", t->lock_ms);
    snprintf(c->set, sizeof c->set, "%ld", set);
    redis_link_add_script(r, &c->lookup);
    redis_link_add_script(r, &c->store);
    redis_link_add_script(r, &c->invalidate);
    return c;
}

void cache_free(cache *c)
{
    if (!c)
        return;
    free(c->ns);
    free(c);
}

/* Percent-encodes s: every byte outside RFC 3986's unreserved set when
 * `only` is NULL, else just the bytes in `only`.  New string or NULL. */
char *cache_pct_encode(const char *s, const char *only)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = strlen(s);
    char *out = malloc(3 * n + 1), *o = out;

    if (!out)
        return NULL;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        int keep =
            only ? !strchr(only, *p)
                 : ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                    (*p >= '0' && *p <= '9') || *p == '-' || *p == '.' || *p == '_' || *p == '~');
        if (keep) {
            *o++ = (char)*p;
        } else {
            *o++ = '%';
            *o++ = hex[*p >> 4];
            *o++ = hex[*p & 15];
        }
    }
    *o = '\0';
    return out;
}

/* <ns>:<kind><member>:<id>, a new string or NULL. */
static char *slot_key(const char *ns, const char *kind, const char *member, const char *id)
{
    char *k = NULL;
    if (asprintf(&k, "%s:%s%s:%s", ns, kind, member, id) < 0)
        return NULL;
    return k;
}

int cache_slot_init(const cache *c, cache_slot *s, const char *id, const char *expand)
{
    memset(s, 0, sizeof s[0]);
    if (!expand || !*expand) {
        s->member = strdup("");
    } else {
        char *enc = cache_pct_encode(expand, "%:");
        if (enc && asprintf(&s->member, "@%s", enc) < 0)
            s->member = NULL;
        free(enc);
    }
    if (s->member) {
        s->fresh = slot_key(c->ns, "resource", s->member, id);
        s->stale = slot_key(c->ns, "resource-stale", s->member, id);
        s->missing = slot_key(c->ns, "resource-missing", s->member, id);
        s->lock = slot_key(c->ns, "resource-lock", s->member, id);
        s->variants = slot_key(c->ns, "resource-variants", "", id);
        s->plain = slot_key(c->ns, "resource", "", id);
    }
    if (!s->member || !s->fresh || !s->stale || !s->missing || !s->lock || !s->variants ||
        !s->plain) {
        cache_slot_free(s);
        return IW_ERR_NOMEM;
    }
    return IW_OK;
}

void cache_slot_free(cache_slot *s)
{
    free(s->member);
    free(s->fresh);
    free(s->stale);
    free(s->missing);
    free(s->lock);
    free(s->variants);
    free(s->plain);
    memset(s, 0, sizeof s[0]);
}

int cache_append_lookup(cache *c, const cache_slot *s, const char *token, int purge, iw_error *err)
{
    const char *argv[7] = {s->fresh, s->missing, s->lock,          s->plain,
                           token,    c->lock,    purge ? "1" : "0"};
    return redis_link_append_script(c->redis, &c->lookup, 4, 7, argv, err);
}

int cache_append_store(cache *c, const cache_slot *s, cache_store_mode mode, const char *token,
                       const char *value, iw_error *err)
{
    static const char *const modes[] = {"found", "missing", "release"};
    const char *argv[14] = {
        s->fresh, s->stale,           s->missing, s->lock,  s->variants, s->plain,  modes[mode],
        token,    value ? value : "", c->fresh,   c->stale, c->missing,  s->member, c->set};
    return redis_link_append_script(c->redis, &c->store, 6, 14, argv, err);
}

int cache_append_invalidate(cache *c, const char *id, iw_error *err)
{
    char *variants = slot_key(c->ns, "resource-variants", "", id);
    const char *argv[3] = {variants, c->ns, id};
    int rc;

    if (!variants)
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    rc = redis_link_append_script(c->redis, &c->invalidate, 1, 3, argv, err);
    free(variants);
    return rc;
}

int cache_append_stale(cache *c, const cache_slot *s, iw_error *err)
{
    return redis_link_append(c->redis, err, "GET %s", s->stale);
}
