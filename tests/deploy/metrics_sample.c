/* Prints a /metrics exposition in which every family and every label value the worker
 * can export has a sample: tests/deploy/check_deploy.py evaluates the dashboard's queries
 * and checks the alert tests' series against it, so a query or a test that names a label
 * value the worker never exports fails. */
#include <stdio.h>
#include <stdlib.h>

#include "metrics.h"

int main(void)
{
    static const char *const codes[] = {"EXTERNAL_API_ERROR", "INVALID_JSON"};
    static const char *const tiers[] = {"50/min", "1000/hour", "20000/day"};
    static const long statuses[] = {201, 302, 400, 429, 503, IW_CALL_TIMED_OUT, IW_CALL_NO_ANSWER};
    static const long long durations_us[] = {5000, 150000, 200000, 900000, 1200000, 20000000};

    metrics_dead_letter_codes(codes, 2);
    metrics_limiter_tiers(tiers, 3);
    for (int r = 0; r < IW_N_ROUTES; r++) {
        for (size_t s = 0; s < sizeof statuses / sizeof statuses[0]; s++)
            metrics_provider_request((iw_route)r, statuses[s], durations_us[s % 6]);
        for (int k = 0; k < IW_N_RETRY_REASONS; k++)
            metrics_retry((iw_route)r, (iw_retry_reason)k);
        for (int k = 0; k < IW_N_REFUSALS; k++)
            metrics_limiter_refused((iw_route)r, (iw_refusal)k, 1500);
    }
    for (int role = 0; role < IW_N_ROLES; role++) {
        for (int k = 0; k < IW_N_WAIT_REASONS; k++)
            metrics_job_wait((iw_role)role, (iw_wait_reason)k);
        for (int k = 0; k < IW_N_DELIVERY; k++)
            metrics_delivery((iw_role)role, (iw_delivery_action)k);
        for (int k = 0; k < IW_N_OUTCOMES; k++)
            metrics_job_outcome((iw_role)role, (iw_outcome)k);
        metrics_job_transition((iw_role)role, "received");
        metrics_dead_letter_role((iw_role)role, "EXTERNAL_API_ERROR");
    }
    for (int k = 0; k < IW_N_CACHE_EVENTS; k++)
        metrics_cache((iw_cache_event)k);
    for (int k = 0; k < IW_N_CHECK_OUTCOMES; k++)
        metrics_status_check((iw_check_outcome)k);
    for (size_t i = 0; i < 3; i++)
        metrics_limiter_tier_usage(i, 850);
    metrics_breaker(1, 4);
    metrics_throttling(1);
    metrics_maintenance(1);
    metrics_in_flight(3);
    metrics_delay_returned(300);
    metrics_dead_letter("INVALID_JSON"); /* today's callers: role "unknown" */
    metrics_connections(1, 1);
    metrics_heartbeat(1);

    char *text = metrics_render();
    if (!text)
        return 1;
    fputs(text, stdout);
    free(text);
    return 0;
}
