/* The settings' value parsers (common/parse.c): durations, whole numbers,
 * rate limits and schedules.  Checks: an accepted value is within its
 * bounds (non-negative durations, 1..IW_MAX_TIERS tiers with positive limits
 * and windows, 1..IW_MAX_SCHEDULE items), formatting an accepted duration
 * and parsing it again gives the same value, and every refusal has a safe
 * message. */
#include <stdlib.h>
#include <string.h>

#include "fuzz_support.h"
#include "parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = fuzz_strndup(data, size);
    iw_error err;
    long v;
    iw_rate_tier tiers[IW_MAX_TIERS];
    long sched[IW_MAX_SCHEDULE];
    size_t n;

    if (parse_duration_ms(s, &v, &err) == IW_OK) {
        char text[32];
        long again;
        FUZZ_REQUIRE(v >= 0);
        FUZZ_REQUIRE(parse_duration_ms(format_duration(v, text, sizeof text), &again, NULL) ==
                     IW_OK);
        FUZZ_REQUIRE(again == v);
    } else {
        fuzz_check_message(err.msg);
    }
    if (parse_long(s, 1, 1000, &v, &err) == IW_OK)
        FUZZ_REQUIRE(v >= 1 && v <= 1000);
    else
        fuzz_check_message(err.msg);
    n = 0;
    if (parse_rate_limits(s, tiers, &n, &err) == IW_OK) {
        FUZZ_REQUIRE(n >= 1 && n <= IW_MAX_TIERS);
        for (size_t i = 0; i < n; i++)
            FUZZ_REQUIRE(tiers[i].limit > 0 && tiers[i].window_ms > 0);
    } else {
        fuzz_check_message(err.msg);
    }
    n = 0;
    if (parse_schedule(s, sched, &n, &err) == IW_OK) {
        FUZZ_REQUIRE(n >= 1 && n <= IW_MAX_SCHEDULE);
        for (size_t i = 0; i < n; i++)
            FUZZ_REQUIRE(sched[i] >= 0);
    } else {
        fuzz_check_message(err.msg);
    }
    free(s);
    return 0;
}
