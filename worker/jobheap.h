/* A binary min-heap of deferred items keyed by a monotonic due time.  Items
 * embed a jobheap_node; the heap never owns them. */
#ifndef IW_JOBHEAP_H
#define IW_JOBHEAP_H

#include <stddef.h>

typedef struct jobheap_node {
    long long due_ms;
    size_t index;
    void *item;
} jobheap_node;

typedef struct jobheap {
    jobheap_node **nodes;
    size_t n, cap;
} jobheap;

int jobheap_push(jobheap *h, jobheap_node *node);
/* The earliest node, or NULL. */
jobheap_node *jobheap_peek(const jobheap *h);
jobheap_node *jobheap_pop(jobheap *h);
void jobheap_clear(jobheap *h);

#endif
