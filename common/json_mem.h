/* jansson's small allocations, recycled (json_set_alloc_funcs).
 *
 * A job's JSON documents are built and freed whole: the message parsed at
 * intake and the provider's answer are about 75 small blocks a job (objects,
 * their hash buckets, pairs, strings).  A document freed at once overflows
 * glibc's per-thread cache (7 blocks of a size), so most of those blocks went
 * the slow way through malloc's bins.  Blocks of up to JSON_MEM_SMALL bytes
 * are kept here instead, on one free list per 16-byte size, up to
 * JSON_MEM_KEEP bytes a thread; larger blocks and the rest go to malloc.
 *
 * Every block is malloc's own (a small one is a malloc'd block of its size
 * rounded up to 16), so a string jansson hands out may be freed with free()
 * as before.  The lists are per thread (a thread that ends leaves its list
 * behind: JSON is made on the reactor's thread, which lives as long as the
 * process).  Under AddressSanitizer nothing is installed: it must see every
 * free to find a use after one.  Once installed, json_read gives yajl's
 * parser the same allocator (five small blocks a parse, made and freed
 * whole, which went to malloc's bins like jansson's). */
#ifndef IW_JSON_MEM_H
#define IW_JSON_MEM_H

#include <stddef.h>

#define JSON_MEM_SMALL 256
#define JSON_MEM_KEEP ((size_t)256 << 10)

/* Gives jansson these functions; call once, before the first JSON value is
 * made.  Returns 1 when installed, 0 when not (AddressSanitizer). */
int json_mem_install(void);

/* 1 once json_mem_install has installed it. */
int json_mem_installed(void);

/* The allocator itself: a block of at least n bytes, or NULL; its free; and
 * realloc's contract on top (p may be any malloc'd block or NULL; on
 * failure p is left as it was). */
void *json_mem_alloc(size_t n);
void json_mem_free(void *p);
void *json_mem_realloc(void *p, size_t n);
/* Bytes this thread keeps for reuse. */
size_t json_mem_kept(void);

#endif
