/* The reactor: the timer heap's order under arming, re-arming and
 * cancelling; file events; turn-end hooks and loop_again. */
#include <check.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.h"
#include "loop.h"
#include "iwtest.h"

#define N 200

static int fired[N], order[N], n_fired;

static void on_timer(loop *l, loop_timer *t)
{
    int i = (int)(long)t->ud;
    (void)l;
    fired[i]++;
    order[n_fired++] = i;
}

/* Runs turns until no timer is left (bounded). */
static void drain(loop *l)
{
    for (int turns = 0; loop_timers(l) && turns < 10000; turns++)
        loop_turn(l, 10);
}

START_TEST(timers_fire_in_due_order)
{
    loop *l = loop_new();
    loop_timer t[N];
    long long now = clock_mono_ms();

    n_fired = 0;
    for (int i = 0; i < N; i++) {
        fired[i] = 0;
        loop_timer_init(&t[i], on_timer, (void *)(long)i);
        /* a scrambled order of due times, all in the past or now */
        ck_assert_int_eq(loop_timer_at(l, &t[i], now - ((i * 7919) % N)), 0);
    }
    ck_assert_int_eq(loop_timers(l), N);
    drain(l);
    ck_assert_int_eq(n_fired, N);
    for (int k = 1; k < N; k++)
        ck_assert_int_le(t[order[k - 1]].due_ms, t[order[k]].due_ms);
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(fired[i], 1);
        ck_assert(!loop_timer_armed(&t[i]));
    }
    loop_free(l);
}
END_TEST

START_TEST(cancel_and_rearm_keep_the_heap_ordered)
{
    loop *l = loop_new();
    loop_timer t[N];
    long long now = clock_mono_ms();

    n_fired = 0;
    for (int i = 0; i < N; i++) {
        fired[i] = 0;
        loop_timer_init(&t[i], on_timer, (void *)(long)i);
        loop_timer_at(l, &t[i], now + 100000 + i);
    }
    /* cancel every third, move every fifth to the past, cancel one twice */
    for (int i = 0; i < N; i += 3)
        loop_timer_cancel(l, &t[i]);
    loop_timer_cancel(l, &t[0]);
    for (int i = 1; i < N; i += 5)
        loop_timer_at(l, &t[i], now - i);
    ck_assert_int_eq(loop_next_due(l), now - 196); /* i = 196 moved furthest back */
    /* only the moved ones are due */
    loop_turn(l, 0);
    for (int i = 0; i < N; i++) {
        int moved = i % 5 == 1;
        ck_assert_int_eq(fired[i], moved ? 1 : 0);
    }
    for (int k = 1; k < n_fired; k++)
        ck_assert_int_le(t[order[k - 1]].due_ms, t[order[k]].due_ms);
    /* the rest are still armed and ordered */
    long long prev = -1;
    int left = 0;
    while (loop_timers(l)) {
        long long due = loop_next_due(l);
        ck_assert_int_ge(due, prev);
        prev = due;
        for (int i = 0; i < N; i++)
            if (loop_timer_armed(&t[i]) && t[i].due_ms == due) {
                loop_timer_cancel(l, &t[i]);
                left++;
                break;
            }
    }
    /* N minus the cancelled (every third) minus the moved-and-fired ones */
    int expect = 0;
    for (int i = 0; i < N; i++)
        if (i % 3 != 0 && i % 5 != 1)
            expect++;
    ck_assert_int_eq(left, expect);
    loop_free(l);
}
END_TEST

static int readable;

static void on_read(loop *l, int fd, int events, void *ud)
{
    char c;
    (void)l;
    (void)ud;
    ck_assert(events & LOOP_READ);
    ck_assert_int_eq(read(fd, &c, 1), 1);
    readable++;
}

static int hooks_run, want_again;

static int hook(loop *l, void *ud)
{
    (void)l;
    (void)ud;
    hooks_run++;
    return want_again-- > 0;
}

START_TEST(file_events_and_hooks)
{
    loop *l = loop_new();
    int p[2];
    long long t0;

    ck_assert_int_eq(pipe(p), 0);
    ck_assert_int_eq(loop_watch(l, p[0], LOOP_READ, on_read, NULL), 0);
    ck_assert_int_eq(loop_add_hook(l, hook, NULL), 0);
    readable = hooks_run = 0;
    want_again = 0;
    ck_assert_int_eq(write(p[1], "x", 1), 1);
    loop_turn(l, 1000);
    ck_assert_int_eq(readable, 1);
    ck_assert_int_eq(hooks_run, 1);
    /* nothing ready: waits the whole timeout, the hook still runs */
    t0 = clock_mono_ms();
    loop_turn(l, 50);
    ck_assert_int_ge(clock_mono_ms() - t0, 40);
    ck_assert_int_eq(hooks_run, 2);
    /* a hook that asks for another turn makes the next one not wait */
    want_again = 1;
    loop_turn(l, 0);
    t0 = clock_mono_ms();
    loop_turn(l, 2000);
    ck_assert_int_lt(clock_mono_ms() - t0, 1000);
    /* loop_again does the same from anywhere */
    loop_again(l);
    t0 = clock_mono_ms();
    loop_turn(l, 2000);
    ck_assert_int_lt(clock_mono_ms() - t0, 1000);
    /* unwatched: no more events */
    ck_assert_int_eq(loop_watch(l, p[0], 0, NULL, NULL), 0);
    ck_assert_int_eq(write(p[1], "y", 1), 1);
    loop_turn(l, 20);
    ck_assert_int_eq(readable, 1);
    close(p[0]);
    close(p[1]);
    loop_free(l);
}
END_TEST

static int parked_events;

/* A parked descriptor's events: stop watching it (as the HTTP client does). */
static void on_parked(loop *l, int fd, int events, void *ud)
{
    (void)events;
    (void)ud;
    parked_events++;
    loop_watch(l, fd, 0, NULL, NULL);
}

/* loop_park keeps a descriptor in the epoll set between uses: its events go
 * to the parking callback, the owner's next watch takes it back, and a
 * descriptor forgotten before its close leaves no trace for the next one
 * that gets its number. */
START_TEST(parked_descriptors)
{
    loop *l = loop_new();
    int p[2], q[2];

    ck_assert_int_eq(pipe(p), 0);
    readable = parked_events = 0;
    ck_assert_int_eq(loop_park(l, p[0], on_parked, NULL), -1); /* not watched */
    ck_assert_int_eq(loop_watch(l, p[0], LOOP_READ, on_read, NULL), 0);
    ck_assert_int_eq(loop_park(l, p[0], on_parked, NULL), 0);
    ck_assert_int_eq(loop_watched(l, p[0]), LOOP_READ);
    /* taken back with the same events: they reach the owner again */
    ck_assert_int_eq(loop_watch(l, p[0], LOOP_READ, on_read, NULL), 0);
    ck_assert_int_eq(write(p[1], "x", 1), 1);
    loop_turn(l, 1000);
    ck_assert_int_eq(readable, 1);
    /* parked, an event goes to the parking callback, which stops watching */
    ck_assert_int_eq(loop_park(l, p[0], on_parked, NULL), 0);
    ck_assert_int_eq(write(p[1], "y", 1), 1);
    loop_turn(l, 1000);
    ck_assert_int_eq(parked_events, 1);
    ck_assert_int_eq(readable, 1);
    ck_assert_int_eq(loop_watched(l, p[0]), 0);
    loop_turn(l, 20); /* no longer in the set: nothing more */
    ck_assert_int_eq(parked_events, 1);
    /* watched again (a real registration), parked, forgotten and closed: the
     * next descriptor with that number is registered afresh */
    ck_assert_int_eq(loop_watch(l, p[0], LOOP_READ, on_read, NULL), 0);
    loop_turn(l, 1000);
    ck_assert_int_eq(readable, 2);
    ck_assert_int_eq(loop_park(l, p[0], on_parked, NULL), 0);
    int old = p[0];
    loop_forget(l, p[0]);
    close(p[0]);
    close(p[1]);
    ck_assert_int_eq(pipe(q), 0);
    ck_assert_int_eq(q[0], old); /* the lowest free number */
    ck_assert_int_eq(loop_watched(l, q[0]), 0);
    ck_assert_int_eq(loop_watch(l, q[0], LOOP_READ, on_read, NULL), 0);
    ck_assert_int_eq(write(q[1], "z", 1), 1);
    loop_turn(l, 1000);
    ck_assert_int_eq(readable, 3);
    ck_assert_int_eq(parked_events, 1);
    close(q[0]);
    close(q[1]);
    loop_free(l);
}
END_TEST

/* Writes one byte to fd after `ms`, from a child process. */
static pid_t write_later(int fd, int ms)
{
    pid_t pid = fork();

    if (pid == 0) {
        usleep((useconds_t)ms * 1000);
        _exit(write(fd, "l", 1) == 1 ? 0 : 1);
    }
    ck_assert_int_gt(pid, 0);
    return pid;
}

/* loop_set_linger: a turn woken by a few descriptors waits a little longer,
 * so that the events close behind the first share its turn (and its
 * turn-end flush); a wake that is already a batch, or a turn that must not
 * wait, does not linger. */
START_TEST(thin_wakes_linger)
{
    loop *l = loop_new();
    int p[2], q[2], many[LOOP_LINGER_THIN][2];
    long long t0;

    ck_assert_int_eq(pipe(p), 0);
    ck_assert_int_eq(pipe(q), 0);
    ck_assert_int_eq(loop_watch(l, p[0], LOOP_READ, on_read, NULL), 0);
    ck_assert_int_eq(loop_watch(l, q[0], LOOP_READ, on_read, NULL), 0);
    ck_assert_int_eq(loop_add_hook(l, hook, NULL), 0);
    readable = hooks_run = want_again = 0;

    /* no linger: the event 200 ms behind the first gets a turn of its own
     * (the margins are wide for a loaded machine: 200 ms for this turn to
     * start, 800 ms for the child to write inside the linger below) */
    pid_t kid = write_later(q[1], 200);
    ck_assert_int_eq(write(p[1], "x", 1), 1);
    loop_turn(l, 2000);
    ck_assert_int_eq(readable, 1);
    ck_assert_int_eq(hooks_run, 1);
    loop_turn(l, 2000);
    ck_assert_int_eq(readable, 2);
    ck_assert_int_eq(hooks_run, 2);
    waitpid(kid, NULL, 0);

    /* a linger of 1 s: both in one turn, one turn-end hook */
    loop_set_linger(l, 1000 * 1000);
    kid = write_later(q[1], 200);
    ck_assert_int_eq(write(p[1], "x", 1), 1);
    t0 = clock_mono_ms();
    loop_turn(l, 3000);
    ck_assert_int_ge(clock_mono_ms() - t0, 950);
    ck_assert_int_eq(readable, 4);
    ck_assert_int_eq(hooks_run, 3);
    waitpid(kid, NULL, 0);

    /* a turn that must not wait (loop_again) does not linger */
    loop_again(l);
    ck_assert_int_eq(write(p[1], "x", 1), 1);
    t0 = clock_mono_ms();
    loop_turn(l, 3000);
    ck_assert_int_lt(clock_mono_ms() - t0, 800);
    ck_assert_int_eq(readable, 5);

    /* a wake with LOOP_LINGER_THIN ready descriptors is a batch already */
    loop_set_linger(l, 2000 * 1000);
    for (int i = 0; i < LOOP_LINGER_THIN; i++) {
        ck_assert_int_eq(pipe(many[i]), 0);
        ck_assert_int_eq(loop_watch(l, many[i][0], LOOP_READ, on_read, NULL), 0);
        ck_assert_int_eq(write(many[i][1], "m", 1), 1);
    }
    t0 = clock_mono_ms();
    loop_turn(l, 2000);
    ck_assert_int_lt(clock_mono_ms() - t0, 1000);
    ck_assert_int_eq(readable, 5 + LOOP_LINGER_THIN);
    for (int i = 0; i < LOOP_LINGER_THIN; i++) {
        close(many[i][0]);
        close(many[i][1]);
    }
    close(p[0]);
    close(p[1]);
    close(q[0]);
    close(q[1]);
    loop_free(l);
}
END_TEST

/* The linger a provider's pace asks for: a hundredth, capped, none when
 * shorter than a wake-up is worth. */
START_TEST(linger_follows_the_pace)
{
    ck_assert_int_eq(loop_linger_for(0, 2000), 0);
    ck_assert_int_eq(loop_linger_for(300, 2000), 0);     /* a fast provider: none */
    ck_assert_int_eq(loop_linger_for(9999, 2000), 0);    /* 99 us: not worth a sleep */
    ck_assert_int_eq(loop_linger_for(10000, 2000), 100); /* 10 ms: 100 us */
    ck_assert_int_eq(loop_linger_for(200000, 2000), 2000);
    ck_assert_int_eq(loop_linger_for(150000, 2000), 1500);
    ck_assert_int_eq(loop_linger_for(1000000, 2000), 2000); /* capped */
    ck_assert_int_eq(loop_linger_for(10000000, 0), 0);      /* IW_TURN_LINGER=0: off */
}
END_TEST

int main(void)
{
    Suite *s = suite_create("loop");
    TCase *tc = tcase_create("loop");

    tcase_add_test(tc, timers_fire_in_due_order);
    tcase_add_test(tc, cancel_and_rearm_keep_the_heap_ordered);
    tcase_add_test(tc, file_events_and_hooks);
    tcase_add_test(tc, parked_descriptors);
    tcase_add_test(tc, thin_wakes_linger);
    tcase_add_test(tc, linger_follows_the_pace);
    suite_add_tcase(s, tc);
    return iwt_run_suite(s);
}
