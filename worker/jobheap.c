#include "jobheap.h"

#include <stdlib.h>

static void swap(jobheap *h, size_t a, size_t b)
{
    jobheap_node *t = h->nodes[a];
    h->nodes[a] = h->nodes[b];
    h->nodes[b] = t;
    h->nodes[a]->index = a;
    h->nodes[b]->index = b;
}

int jobheap_push(jobheap *h, jobheap_node *node)
{
    size_t i;

    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        jobheap_node **n = realloc(h->nodes, cap * sizeof *n);
        if (!n)
            return -1;
        h->nodes = n;
        h->cap = cap;
    }
    i = h->n++;
    h->nodes[i] = node;
    node->index = i;
    while (i > 0 && h->nodes[(i - 1) / 2]->due_ms > h->nodes[i]->due_ms) {
        swap(h, i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
    return 0;
}

jobheap_node *jobheap_peek(const jobheap *h)
{
    return h->n ? h->nodes[0] : NULL;
}

jobheap_node *jobheap_pop(jobheap *h)
{
    jobheap_node *top;
    size_t i = 0;

    if (!h->n)
        return NULL;
    top = h->nodes[0];
    h->nodes[0] = h->nodes[--h->n];
    h->nodes[0]->index = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < h->n && h->nodes[l]->due_ms < h->nodes[m]->due_ms)
            m = l;
        if (r < h->n && h->nodes[r]->due_ms < h->nodes[m]->due_ms)
            m = r;
        if (m == i)
            break;
        swap(h, i, m);
        i = m;
    }
    return top;
}

void jobheap_clear(jobheap *h)
{
    free(h->nodes);
    h->nodes = NULL;
    h->n = h->cap = 0;
}
