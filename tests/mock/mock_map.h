/* A string-keyed hash map for the mock provider's in-memory stores.
 *
 * Keys are copied on insert; values are opaque pointers owned by the caller,
 * who passes a destructor to the functions that drop values.  Not
 * thread-safe: the provider serialises access with its own mutex. */
#ifndef MOCK_MAP_H
#define MOCK_MAP_H

#include <stddef.h>

typedef struct mock_map mock_map;

/* Called on a value the map drops (may be NULL: values are then left alone). */
typedef void (*mock_map_free_fn)(void *value);

/* Visitor for mock_map_each; the map must not be changed during the walk. */
typedef void (*mock_map_visit_fn)(const char *key, void *value, void *arg);

/* New empty map, or NULL when out of memory. */
mock_map *mock_map_new(void);

/* Frees the map and every value through free_value; NULL is harmless. */
void mock_map_free(mock_map *map, mock_map_free_fn free_value);

/* Borrowed value stored under key, or NULL when absent. */
void *mock_map_get(const mock_map *map, const char *key);

/* Stores value under key (copying key), replacing and freeing through
 * free_value any previous value.  Returns 0, or -1 when out of memory (the
 * map is then unchanged and the caller still owns value). */
int mock_map_put(mock_map *map, const char *key, void *value, mock_map_free_fn free_value);

/* Drops every entry, freeing values through free_value. */
void mock_map_clear(mock_map *map, mock_map_free_fn free_value);

/* Number of entries. */
size_t mock_map_size(const mock_map *map);

/* Calls visit on every entry, in no particular order. */
void mock_map_each(const mock_map *map, mock_map_visit_fn visit, void *arg);

/* Removes every entry for which keep returns 0, freeing its value. */
void mock_map_filter(mock_map *map, int (*keep)(void *value, void *arg), void *arg,
                     mock_map_free_fn free_value);

#endif
