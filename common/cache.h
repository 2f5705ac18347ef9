/* The resource cache in Redis: key formats and the Lua scripts of the
 * resolver's cache-aside protocol (the spec's "Caching Strategy").
 *
 * Keys of one cache slot (an id, and an optional expand):
 *   <ns>:resource:<id>                    fresh entry, IW_CACHE_TTL (the spec's key)
 *   <ns>:resource@<escaped expand>:<id>   an expand variant
 *   <ns>:resource-stale<member>:<id>      the fallback copy for outages
 *   <ns>:resource-missing<member>:<id>    a remembered 404
 *   <ns>:resource-lock<member>:<id>       the token of the process calling the provider
 *   <ns>:resource-variants:<id>           the variant members of an id, for invalidation
 * where <member> is "" or "@<expand with % and : percent-encoded>".  The
 * namespace and kinds contain neither ':' nor '@' and the escaped expand has
 * no ':', so no (id, expand) pair can name another pair's key.
 *
 *   lookup      fresh hit, remembered 404, or else the slot's lock (taken, or
 *               extended when it is the caller's), or the lock holder's TTL;
 *               a variant is fresh only while the id's plain key exists;
 *   store       writes only while the caller still holds the lock (an
 *               invalidation deletes it), then releases it; a found variant
 *               also writes the id's plain key, so that <ns>:resource:<id>
 *               holds the id's OurFormat after any look-up (the spec's key);
 *   invalidate  deletes every key of every variant of an id, atomically. */
#ifndef IW_CACHE_H
#define IW_CACHE_H

#include "redis_link.h"
#include "status.h"

typedef struct cache cache;

typedef struct cache_ttls {
    long fresh_ms, stale_ms, missing_ms, lock_ms;
} cache_ttls;

/* The keys of one slot; every string is owned (cache_slot_free). */
typedef struct cache_slot {
    char *member; /* "" or "@<escaped expand>" */
    char *fresh, *stale, *missing, *lock, *variants;
    char *plain; /* <ns>:resource:<id>, the spec's key of the id */
} cache_slot;

typedef enum cache_store_mode { CACHE_FOUND, CACHE_MISSING, CACHE_RELEASE } cache_store_mode;

/* Lookup answers (the first element of the script's reply). */
enum { CACHE_HIT = 1, CACHE_NEGATIVE = 2, CACHE_LOCKED = 3, CACHE_PEER = 4 };

/* The link is borrowed; the scripts are registered on it. */
cache *cache_new(redis_link *r, const char *ns, const cache_ttls *ttls);
void cache_free(cache *c);

/* Fills s for (id, expand); expand NULL or "" is the plain id. */
int cache_slot_init(const cache *c, cache_slot *s, const char *id, const char *expand);
void cache_slot_free(cache_slot *s);

/* Appends to the pipeline (read the reply with redis_link_read):
 * lookup {1, value} | {2, ''} | {3, ''} | {4, pttl}; purge deletes a fresh
 * value found corrupt first. */
int cache_append_lookup(cache *c, const cache_slot *s, const char *token, int purge, iw_error *err);
/* store: 1 written, 0 the lock was gone (value is the OurFormat text). */
int cache_append_store(cache *c, const cache_slot *s, cache_store_mode mode, const char *token,
                       const char *value, iw_error *err);
/* invalidate: the number of keys deleted. */
int cache_append_invalidate(cache *c, const char *id, iw_error *err);
/* GET of the stale copy. */
int cache_append_stale(cache *c, const cache_slot *s, iw_error *err);

/* Percent-encodes s: every byte outside RFC 3986's unreserved set when
 * `only` is NULL, else just the bytes in `only`.  New string or NULL. */
char *cache_pct_encode(const char *s, const char *only);

#endif
