/* Clocks: monotonic milliseconds for deadlines, wall milliseconds for stamps. */
#ifndef IW_CLOCK_H
#define IW_CLOCK_H

long long clock_mono_ms(void);
long long clock_wall_ms(void);
/* Microsecond monotonic clock, for measuring call durations. */
long long clock_mono_us(void);

#endif
