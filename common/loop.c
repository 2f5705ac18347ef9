#include "loop.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"

#define MAX_EVENTS 64

typedef struct watcher {
    int events; /* in the epoll set; 0: not watched */
    int parked; /* loop_park: kept in the set for the owner's next watch */
    loop_file_fn *fn;
    void *ud;
} watcher;

typedef struct hook {
    loop_hook_fn *fn;
    void *ud;
} hook;

struct loop {
    int epfd;
    watcher *w; /* indexed by fd */
    size_t n_w;
    loop_timer **heap; /* min-heap on due_ms */
    size_t n, cap;
    hook hooks[LOOP_MAX_HOOKS];
    size_t n_hooks;
    int again;      /* a hook asked for another turn without waiting */
    long linger_us; /* loop_set_linger */
};

loop *loop_new(void)
{
    loop *l = calloc(1, sizeof *l);

    if (!l)
        return NULL;
    l->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (l->epfd < 0) {
        free(l);
        return NULL;
    }
    return l;
}

void loop_free(loop *l)
{
    if (!l)
        return;
    for (size_t i = 0; i < l->n; i++)
        l->heap[i]->index = 0;
    close(l->epfd);
    free(l->w);
    free(l->heap);
    free(l);
}

/* ---- file events ---------------------------------------------------------- */

int loop_watch(loop *l, int fd, int events, loop_file_fn *fn, void *ud)
{
    struct epoll_event ev;
    int op;

    if (fd < 0)
        return -1;
    if ((size_t)fd >= l->n_w) {
        size_t n = (size_t)fd * 2 + 16;
        watcher *w = realloc(l->w, n * sizeof *w);
        if (!w)
            return -1;
        memset(w + l->n_w, 0, (n - l->n_w) * sizeof *w);
        l->w = w;
        l->n_w = n;
    }
    if (l->w[fd].parked && events && events == l->w[fd].events) {
        l->w[fd].parked = 0; /* still in the set with these events */
        l->w[fd].fn = fn;
        l->w[fd].ud = ud;
        return 0;
    }
    l->w[fd].parked = 0;
    memset(&ev, 0, sizeof ev);
    ev.data.fd = fd;
    ev.events = (events & LOOP_READ ? EPOLLIN : 0) | (events & LOOP_WRITE ? EPOLLOUT : 0);
    if (!events)
        op = EPOLL_CTL_DEL;
    else
        op = l->w[fd].events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    /* a closed descriptor has left the epoll set already: not an error */
    if (epoll_ctl(l->epfd, op, fd, &ev) != 0 && !(op == EPOLL_CTL_DEL && errno == EBADF) &&
        !(op == EPOLL_CTL_DEL && errno == ENOENT)) {
        if (op == EPOLL_CTL_MOD && errno == ENOENT) /* fd was closed and reused */
            op = EPOLL_CTL_ADD;
        else if (op == EPOLL_CTL_ADD && errno == EEXIST)
            op = EPOLL_CTL_MOD;
        else
            return -1;
        if (epoll_ctl(l->epfd, op, fd, &ev) != 0)
            return -1;
    }
    l->w[fd].events = events;
    l->w[fd].fn = events ? fn : NULL;
    l->w[fd].ud = events ? ud : NULL;
    return 0;
}

int loop_watched(const loop *l, int fd)
{
    return fd >= 0 && (size_t)fd < l->n_w ? l->w[fd].events : 0;
}

int loop_park(loop *l, int fd, loop_file_fn *fn, void *ud)
{
    if (!loop_watched(l, fd))
        return -1;
    l->w[fd].parked = 1;
    l->w[fd].fn = fn;
    l->w[fd].ud = ud;
    return 0;
}

void loop_forget(loop *l, int fd)
{
    if (fd >= 0 && (size_t)fd < l->n_w)
        memset(&l->w[fd], 0, sizeof l->w[fd]);
}

/* ---- timers: a binary min-heap of intrusive nodes ---------------------------- */

void loop_timer_init(loop_timer *t, loop_timer_fn *fn, void *ud)
{
    t->due_ms = 0;
    t->index = 0;
    t->fn = fn;
    t->ud = ud;
}

static void heap_set(loop *l, size_t i, loop_timer *t)
{
    l->heap[i] = t;
    t->index = i + 1;
}

static void sift_up(loop *l, size_t i)
{
    loop_timer *t = l->heap[i];

    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (l->heap[parent]->due_ms <= t->due_ms)
            break;
        heap_set(l, i, l->heap[parent]);
        i = parent;
    }
    heap_set(l, i, t);
}

static void sift_down(loop *l, size_t i)
{
    loop_timer *t = l->heap[i];

    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= l->n)
            break;
        if (c + 1 < l->n && l->heap[c + 1]->due_ms < l->heap[c]->due_ms)
            c++;
        if (t->due_ms <= l->heap[c]->due_ms)
            break;
        heap_set(l, i, l->heap[c]);
        i = c;
    }
    heap_set(l, i, t);
}

void loop_timer_cancel(loop *l, loop_timer *t)
{
    size_t i;

    if (!t->index)
        return;
    i = t->index - 1;
    t->index = 0;
    l->n--;
    if (i == l->n)
        return;
    {
        loop_timer *moved = l->heap[l->n];
        heap_set(l, i, moved);
        sift_up(l, i);
        sift_down(l, moved->index - 1);
    }
}

int loop_timer_at(loop *l, loop_timer *t, long long due_ms)
{
    if (t->index) {
        size_t i = t->index - 1;
        t->due_ms = due_ms;
        sift_up(l, i);
        sift_down(l, t->index - 1);
        return 0;
    }
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        loop_timer **h = realloc(l->heap, cap * sizeof *h);
        if (!h)
            return -1;
        l->heap = h;
        l->cap = cap;
    }
    t->due_ms = due_ms;
    heap_set(l, l->n++, t);
    sift_up(l, l->n - 1);
    return 0;
}

long long loop_next_due(const loop *l)
{
    return l->n ? l->heap[0]->due_ms : -1;
}

size_t loop_timers(const loop *l)
{
    return l->n;
}

/* ---- hooks and the turn ------------------------------------------------------ */

int loop_add_hook(loop *l, loop_hook_fn *fn, void *ud)
{
    if (l->n_hooks == LOOP_MAX_HOOKS)
        return -1;
    l->hooks[l->n_hooks++] = (hook){fn, ud};
    return 0;
}

void loop_again(loop *l)
{
    l->again = 1;
}

void loop_set_linger(loop *l, long usec)
{
    l->linger_us = usec > 0 ? usec : 0;
}

#define LINGER_SHARE 100
#define LINGER_MIN_US 100

long loop_linger_for(long long mean_us, long max_us)
{
    long long lg = mean_us / LINGER_SHARE;

    if (lg < LINGER_MIN_US || max_us <= 0)
        return 0;
    return lg < max_us ? (long)lg : max_us;
}

/* A thin wake after a wait: sleeps the linger, then takes what is ready by
 * now in place of `evs` (level-triggered: the first events are still in it;
 * reading both lists would hand a descriptor its event twice). */
static int linger(loop *l, struct epoll_event *evs, int n)
{
    struct timespec ts = {l->linger_us / 1000000, (l->linger_us % 1000000) * 1000};
    int m;

    nanosleep(&ts, NULL); /* a signal cuts it short: fine */
    m = epoll_wait(l->epfd, evs, MAX_EVENTS, 0);
    return m > 0 ? m : n;
}

int loop_turn(loop *l, long long max_wait_ms)
{
    struct epoll_event evs[MAX_EVENTS];
    long long now = clock_mono_ms(), wait = max_wait_ms;
    int n, rc = 0;

    if (l->n) {
        long long due = l->heap[0]->due_ms - now;
        if (due < 0)
            due = 0;
        if (wait < 0 || due < wait)
            wait = due;
    }
    if (l->again)
        wait = 0;
    l->again = 0;
    n = epoll_wait(l->epfd, evs, MAX_EVENTS, wait > 1000000 ? 1000000 : (int)wait);
    if (n > 0 && n < LOOP_LINGER_THIN && wait != 0 && l->linger_us)
        n = linger(l, evs, n);
    if (n < 0) {
        n = 0;
        if (errno != EINTR)
            rc = -1;
    }
    /* 1. file events */
    for (int i = 0; i < n; i++) {
        int fd = evs[i].data.fd, fired = 0;
        watcher *w;

        if ((size_t)fd >= l->n_w)
            continue;
        w = &l->w[fd];
        if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
            fired |= LOOP_READ;
        if (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
            fired |= LOOP_WRITE;
        fired &= w->events ? w->events : 0;
        if (fired && w->fn)
            w->fn(l, fd, fired, w->ud);
    }
    /* 2. due timers, earliest first; one re-armed for now runs next turn */
    now = clock_mono_ms();
    for (size_t budget = l->n; budget > 0 && l->n && l->heap[0]->due_ms <= now; budget--) {
        loop_timer *t = l->heap[0];
        loop_timer_cancel(l, t);
        t->fn(l, t);
    }
    /* 3. turn-end hooks flush what this turn queued */
    for (size_t i = 0; i < l->n_hooks; i++)
        if (l->hooks[i].fn(l, l->hooks[i].ud))
            l->again = 1;
    return rc;
}
