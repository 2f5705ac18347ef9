#include "mock_timer.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <time.h>

/* Entries fired per lock acquisition; the rest wait for the next round. */
#define FIRE_BATCH 256

typedef struct timer_entry {
    int64_t due_ns;
    uint64_t seq; /* breaks ties so that equal deadlines fire in order */
    void *arg;
} timer_entry;

struct mock_timer {
    pthread_mutex_t lock;
    pthread_cond_t wake; /* on CLOCK_MONOTONIC */
    pthread_t thread;
    bool started;
    bool stopping;
    mock_timer_fn fire;
    timer_entry *heap;
    size_t len, cap;
    uint64_t next_seq;
};

int64_t mock_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static bool earlier(const timer_entry *a, const timer_entry *b)
{
    return a->due_ns < b->due_ns || (a->due_ns == b->due_ns && a->seq < b->seq);
}

static void sift_up(timer_entry *heap, size_t i)
{
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!earlier(&heap[i], &heap[parent]))
            break;
        timer_entry t = heap[i];
        heap[i] = heap[parent];
        heap[parent] = t;
        i = parent;
    }
}

static void sift_down(timer_entry *heap, size_t len, size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, min = i;
        if (l < len && earlier(&heap[l], &heap[min]))
            min = l;
        if (r < len && earlier(&heap[r], &heap[min]))
            min = r;
        if (min == i)
            break;
        timer_entry t = heap[i];
        heap[i] = heap[min];
        heap[min] = t;
        i = min;
    }
}

static timer_entry heap_pop(mock_timer *t)
{
    timer_entry top = t->heap[0];
    t->heap[0] = t->heap[--t->len];
    sift_down(t->heap, t->len, 0);
    return top;
}

static void *timer_main(void *arg)
{
    mock_timer *t = arg;
    void *batch[FIRE_BATCH];
    pthread_mutex_lock(&t->lock);
    for (;;) {
        size_t n = 0;
        int64_t now = mock_now_ns();
        while (t->len > 0 && n < FIRE_BATCH && (t->stopping || t->heap[0].due_ns <= now))
            batch[n++] = heap_pop(t).arg;
        if (n > 0) {
            /* Fire without the lock: the callback may take other locks. */
            pthread_mutex_unlock(&t->lock);
            for (size_t i = 0; i < n; i++)
                t->fire(batch[i]);
            pthread_mutex_lock(&t->lock);
            continue;
        }
        if (t->stopping)
            break;
        if (t->len == 0) {
            pthread_cond_wait(&t->wake, &t->lock);
            continue;
        }
        struct timespec until = {.tv_sec = (time_t)(t->heap[0].due_ns / 1000000000LL),
                                 .tv_nsec = (long)(t->heap[0].due_ns % 1000000000LL)};
        pthread_cond_timedwait(&t->wake, &t->lock, &until);
    }
    pthread_mutex_unlock(&t->lock);
    return NULL;
}

mock_timer *mock_timer_new(mock_timer_fn fire)
{
    mock_timer *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->fire = fire;
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&t->wake, &attr);
    pthread_condattr_destroy(&attr);
    pthread_mutex_init(&t->lock, NULL);
    if (pthread_create(&t->thread, NULL, timer_main, t) != 0) {
        mock_timer_free(t);
        return NULL;
    }
    t->started = true;
    return t;
}

int mock_timer_add(mock_timer *t, int64_t due_ns, void *arg)
{
    int rc = -1;
    pthread_mutex_lock(&t->lock);
    if (t->stopping)
        goto out;
    if (t->len == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 1024;
        timer_entry *heap = realloc(t->heap, cap * sizeof *heap);
        if (!heap)
            goto out;
        t->heap = heap;
        t->cap = cap;
    }
    t->heap[t->len] = (timer_entry){.due_ns = due_ns, .seq = t->next_seq++, .arg = arg};
    sift_up(t->heap, t->len);
    t->len++;
    if (t->heap[0].seq == t->next_seq - 1) /* new earliest deadline */
        pthread_cond_signal(&t->wake);
    rc = 0;
out:
    pthread_mutex_unlock(&t->lock);
    return rc;
}

void mock_timer_stop(mock_timer *t)
{
    pthread_mutex_lock(&t->lock);
    bool join = t->started && !t->stopping;
    t->stopping = true;
    pthread_cond_signal(&t->wake);
    pthread_mutex_unlock(&t->lock);
    if (join)
        pthread_join(t->thread, NULL);
}

void mock_timer_free(mock_timer *t)
{
    if (!t)
        return;
    mock_timer_stop(t);
    pthread_cond_destroy(&t->wake);
    pthread_mutex_destroy(&t->lock);
    free(t->heap);
    free(t);
}
