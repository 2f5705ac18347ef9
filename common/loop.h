/* The reactor: one thread waits on file descriptors (the AMQP socket, curl's
 * sockets) and on ONE timer heap that holds every deadline of the process
 * (held jobs, curl's timeout, reconnects, housekeeping, the shutdown grace).
 * Redis `src/ae.c` is the model: file events, timer events, and a hook that
 * runs once at the end of every turn.
 *
 * A turn:
 *   1. wait in epoll until a descriptor is ready or the earliest timer is due
 *      (not at all when a turn-end hook asked for another turn at once), and
 *      linger a little after a thin wake (loop_set_linger);
 *   2. run the file events that fired;
 *   3. run the timers that are due, earliest first;
 *   4. run the turn-end hooks: they flush what the events of this turn queued
 *      (one Redis round trip for a whole batch of permits or records, log
 *      lines), so that work is batched per turn, not done per event.
 * Nothing in a turn is proportional to the number of idle timers or roles:
 * a hook with nothing to do returns at once.
 *
 * Timers are intrusive (a loop_timer lives inside its owner), so arming one
 * allocates nothing once the heap has grown. */
#ifndef IW_LOOP_H
#define IW_LOOP_H

#include <stddef.h>

typedef struct loop loop;

enum { LOOP_READ = 1, LOOP_WRITE = 2 };

/* A file event: `events` is a mask of LOOP_READ/LOOP_WRITE that fired (an
 * error or hang-up is reported as both, so the owner's read/write finds it). */
typedef void loop_file_fn(loop *l, int fd, int events, void *ud);

typedef struct loop_timer loop_timer;
typedef void loop_timer_fn(loop *l, loop_timer *t);

struct loop_timer {
    long long due_ms; /* monotonic */
    size_t index;     /* position in the heap + 1; 0 when not armed */
    loop_timer_fn *fn;
    void *ud;
};

/* A hook run at the end of every turn; returns nonzero when it left work
 * that should run again without waiting (the next turn polls with timeout 0). */
typedef int loop_hook_fn(loop *l, void *ud);

loop *loop_new(void);
/* Frees the loop (not the timers or watchers' owners). NULL ok. */
void loop_free(loop *l);

/* Watches fd for `events` (LOOP_READ|LOOP_WRITE); 0 stops watching it.
 * Calling it again for the same fd changes the mask and callback. */
int loop_watch(loop *l, int fd, int events, loop_file_fn *fn, void *ud);
/* The events fd is watched for (0: none). */
int loop_watched(const loop *l, int fd);
/* Stops handing fd's events to its owner without leaving the epoll set:
 * they go to fn (which should stop watching: loop_watch(fd, 0)), and the
 * owner's next loop_watch with the same events costs no system call.  For a
 * descriptor idle between uses (a keep-alive connection between requests).
 * The owner must call loop_forget before it closes a parked descriptor, or a
 * new one with the same number could be taken for registered.  -1 when fd is
 * not watched. */
int loop_park(loop *l, int fd, loop_file_fn *fn, void *ud);
/* fd is being closed (closing it leaves the epoll set): forgets its watch
 * without a system call.  For a descriptor with no duplicate. */
void loop_forget(loop *l, int fd);

/* Prepares a timer (not armed). */
void loop_timer_init(loop_timer *t, loop_timer_fn *fn, void *ud);
/* Arms (or re-arms) t at monotonic `due_ms`; returns 0, or -1 when out of
 * memory (the timer is then not armed). */
int loop_timer_at(loop *l, loop_timer *t, long long due_ms);
/* Disarms t; harmless when it is not armed. */
void loop_timer_cancel(loop *l, loop_timer *t);
static inline int loop_timer_armed(const loop_timer *t)
{
    return t->index != 0;
}
/* The earliest armed timer's due time, or -1 when none. */
long long loop_next_due(const loop *l);
size_t loop_timers(const loop *l);

/* Adds a turn-end hook (at most LOOP_MAX_HOOKS, run in the order added). */
#define LOOP_MAX_HOOKS 8
int loop_add_hook(loop *l, loop_hook_fn *fn, void *ud);

/* Asks for another turn without waiting: work was queued after the hook that
 * would flush it had already run in this turn. */
void loop_again(loop *l);

/* Lingering: a turn that waited for its first events and was woken by fewer
 * than LOOP_LINGER_THIN ready descriptors sleeps `usec` more and takes
 * every event ready by then, so that events arriving close behind each other
 * (a provider's answers, their confirms) share one turn and its one flush
 * (a Redis round trip, a broker write) instead of a wake-up each.  It trades
 * at most `usec` of latency per thin turn for fewer system calls and wake-ups
 * per job when the process is not busy; a busy process has fat turns or none
 * that wait, and never lingers.  0 (the default): off. */
#define LOOP_LINGER_THIN 8
void loop_set_linger(loop *l, long usec);
/* The linger for a process whose events follow calls that take `mean_us`: a
 * hundredth of it (about 1% more time per job), at most max_us, and none
 * under 100 us, where the sleep itself (a system call, a wake-up, the
 * kernel's 50 us timer slack) would cost more than the events it gathers and
 * each wait of a short cycle would cost throughput. */
long loop_linger_for(long long mean_us, long max_us);

/* Runs one turn, waiting at most max_wait_ms (-1: until an event or a
 * timer).  Returns 0, or -1 when waiting failed (not EINTR, which is a
 * turn without events: the signal handler only sets a flag). */
int loop_turn(loop *l, long long max_wait_ms);

#endif
