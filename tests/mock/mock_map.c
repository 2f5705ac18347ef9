#include "mock_map.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Separate chaining; the bucket array doubles when the load passes 1. */
typedef struct entry {
    struct entry *next;
    uint64_t hash;
    void *value;
    char key[]; /* NUL-terminated copy */
} entry;

struct mock_map {
    entry **buckets;
    size_t nbuckets; /* a power of two */
    size_t size;
};

static uint64_t hash_key(const char *key)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)key; *p; p++) {
        h ^= *p;
        h *= 1099511628211ULL;
    }
    return h;
}

mock_map *mock_map_new(void)
{
    mock_map *map = calloc(1, sizeof *map);
    if (!map)
        return NULL;
    map->nbuckets = 64;
    map->buckets = calloc(map->nbuckets, sizeof *map->buckets);
    if (!map->buckets) {
        free(map);
        return NULL;
    }
    return map;
}

void mock_map_clear(mock_map *map, mock_map_free_fn free_value)
{
    if (!map)
        return;
    for (size_t i = 0; i < map->nbuckets; i++) {
        entry *e = map->buckets[i];
        while (e) {
            entry *next = e->next;
            if (free_value)
                free_value(e->value);
            free(e);
            e = next;
        }
        map->buckets[i] = NULL;
    }
    map->size = 0;
}

void mock_map_free(mock_map *map, mock_map_free_fn free_value)
{
    if (!map)
        return;
    mock_map_clear(map, free_value);
    free(map->buckets);
    free(map);
}

static entry *find(const mock_map *map, const char *key, uint64_t hash)
{
    for (entry *e = map->buckets[hash & (map->nbuckets - 1)]; e; e = e->next)
        if (e->hash == hash && strcmp(e->key, key) == 0)
            return e;
    return NULL;
}

void *mock_map_get(const mock_map *map, const char *key)
{
    entry *e = find(map, key, hash_key(key));
    return e ? e->value : NULL;
}

/* Growing is best effort: a failed allocation leaves a longer chain. */
static void grow(mock_map *map)
{
    size_t n = map->nbuckets * 2;
    entry **buckets = calloc(n, sizeof *buckets);
    if (!buckets)
        return;
    for (size_t i = 0; i < map->nbuckets; i++) {
        entry *e = map->buckets[i];
        while (e) {
            entry *next = e->next;
            size_t b = e->hash & (n - 1);
            e->next = buckets[b];
            buckets[b] = e;
            e = next;
        }
    }
    free(map->buckets);
    map->buckets = buckets;
    map->nbuckets = n;
}

int mock_map_put(mock_map *map, const char *key, void *value, mock_map_free_fn free_value)
{
    uint64_t hash = hash_key(key);
    entry *e = find(map, key, hash);
    if (e) {
        if (free_value && e->value != value)
            free_value(e->value);
        e->value = value;
        return 0;
    }
    size_t len = strlen(key);
    e = malloc(sizeof *e + len + 1);
    if (!e)
        return -1;
    memcpy(e->key, key, len + 1);
    e->hash = hash;
    e->value = value;
    size_t b = hash & (map->nbuckets - 1);
    e->next = map->buckets[b];
    map->buckets[b] = e;
    map->size++;
    if (map->size > map->nbuckets)
        grow(map);
    return 0;
}

size_t mock_map_size(const mock_map *map)
{
    return map->size;
}

void mock_map_each(const mock_map *map, mock_map_visit_fn visit, void *arg)
{
    for (size_t i = 0; i < map->nbuckets; i++)
        for (entry *e = map->buckets[i]; e; e = e->next)
            visit(e->key, e->value, arg);
}

void mock_map_filter(mock_map *map, int (*keep)(void *value, void *arg), void *arg,
                     mock_map_free_fn free_value)
{
    for (size_t i = 0; i < map->nbuckets; i++) {
        entry **link = &map->buckets[i];
        while (*link) {
            entry *e = *link;
            if (keep(e->value, arg)) {
                link = &e->next;
                continue;
            }
            *link = e->next;
            if (free_value)
                free_value(e->value);
            free(e);
            map->size--;
        }
    }
}
