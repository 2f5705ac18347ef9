#include "json_mem.h"

#include <jansson.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__)
#define JSON_MEM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define JSON_MEM_ASAN 1
#endif
#endif

#define GRAIN 16
#define N_SIZES (JSON_MEM_SMALL / GRAIN)

typedef struct block {
    struct block *next;
} block;

/* free_list[k]: blocks of at least k * GRAIN bytes */
static __thread block *free_list[N_SIZES + 1];
static __thread size_t kept;
static int installed;

void *json_mem_alloc(size_t n)
{
    size_t k = n ? (n + GRAIN - 1) / GRAIN : 1;
    block *b;

    if (k > N_SIZES)
        return malloc(n);
    if ((b = free_list[k])) {
        free_list[k] = b->next;
        kept -= k * GRAIN;
        return b;
    }
    return malloc(k * GRAIN);
}

void json_mem_free(void *p)
{
    size_t k;

    if (!p)
        return;
    /* what the block holds, rounded down to the grain: a block of ours of
     * k * GRAIN bytes holds at least that much, and so does any other */
    k = malloc_usable_size(p) / GRAIN;
    if (k > N_SIZES || kept + k * GRAIN > JSON_MEM_KEEP) {
        free(p);
        return;
    }
    ((block *)p)->next = free_list[k];
    free_list[k] = p;
    kept += k * GRAIN;
}

void *json_mem_realloc(void *p, size_t n)
{
    size_t have;
    void *q;

    if (!p)
        return json_mem_alloc(n);
    have = malloc_usable_size(p);
    if (n <= have)
        return p;
    if (!(q = json_mem_alloc(n)))
        return NULL; /* p is left as it was, as realloc leaves it */
    memcpy(q, p, have);
    json_mem_free(p);
    return q;
}

size_t json_mem_kept(void)
{
    return kept;
}

int json_mem_installed(void)
{
    return installed;
}

int json_mem_install(void)
{
#ifdef JSON_MEM_ASAN
    return 0;
#else
    json_set_alloc_funcs(json_mem_alloc, json_mem_free);
    installed = 1;
    return 1;
#endif
}
