/* One thread that fires callbacks at monotonic deadlines.
 *
 * The mock provider delays responses without a sleeping thread per request:
 * the HTTP layer suspends the connection, adds a timer entry, and the single
 * timer thread resumes the connection when it is due.  Entries live in a
 * binary min-heap ordered by deadline (ties in insertion order). */
#ifndef MOCK_TIMER_H
#define MOCK_TIMER_H

#include <stdint.h>

typedef struct mock_timer mock_timer;

/* Called on the timer thread, without the timer's lock held. */
typedef void (*mock_timer_fn)(void *arg);

/* Current CLOCK_MONOTONIC time in nanoseconds. */
int64_t mock_now_ns(void);

/* Starts the timer thread; fire is called once per entry.  NULL on failure. */
mock_timer *mock_timer_new(mock_timer_fn fire);

/* Schedules fire(arg) at due_ns (CLOCK_MONOTONIC).  Returns 0, or -1 when
 * the timer is stopping or out of memory (fire will then not be called). */
int mock_timer_add(mock_timer *timer, int64_t due_ns, void *arg);

/* Fires every pending entry at once, refuses new ones, and joins the thread. */
void mock_timer_stop(mock_timer *timer);

/* Stops (if needed) and frees the timer; NULL is harmless. */
void mock_timer_free(mock_timer *timer);

#endif
