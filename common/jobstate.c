#include "jobstate.h"

static const char *const names[JOB_N_STATES] = {
    "received",   "validated",  "ready",     "held",     "permitted",
    "calling",    "classified", "recording", "adopting", "publishing",
    "sending_on", "failing",    "acked",     "returned", "dropped"};

#define S(x) (1u << JOB_##x)
/* Each state's allowed next states.  Every non-final state may also be
 * dropped (the broker connection went away) or returned (shutdown, an
 * unconfirmed outcome): added below, not repeated in every row. */
static const unsigned next[JOB_N_STATES] = {
    [JOB_RECEIVED] = S(VALIDATED) | S(FAILING),
    [JOB_VALIDATED] = S(READY) | S(FAILING) | S(SENDING_ON),
    [JOB_READY] = S(PERMITTED) | S(ADOPTING) | S(HELD) | S(SENDING_ON),
    [JOB_HELD] = S(READY) | S(SENDING_ON),
    [JOB_PERMITTED] = S(CALLING),
    [JOB_CALLING] = S(CLASSIFIED) | S(HELD) | S(SENDING_ON),
    [JOB_CLASSIFIED] = S(RECORDING) | S(PUBLISHING) | S(SENDING_ON) | S(FAILING) | S(HELD),
    [JOB_RECORDING] = S(PUBLISHING) | S(ADOPTING) | S(FAILING),
    [JOB_ADOPTING] = S(PUBLISHING) | S(ACKED) | S(HELD) | S(SENDING_ON) | S(READY) | S(FAILING),
    [JOB_PUBLISHING] = S(ACKED) | S(FAILING),
    [JOB_SENDING_ON] = S(ACKED) | S(FAILING),
    [JOB_FAILING] = S(ACKED) | S(RECORDING),
};
#undef S

const char *job_state_name(job_state s)
{
    return (unsigned)s < JOB_N_STATES ? names[s] : "unknown";
}

int job_state_final(job_state s)
{
    return s == JOB_ACKED || s == JOB_RETURNED || s == JOB_DROPPED;
}

int job_state_allowed(job_state from, job_state to)
{
    if ((unsigned)from >= JOB_N_STATES || (unsigned)to >= JOB_N_STATES || job_state_final(from))
        return 0;
    if (to == JOB_DROPPED || to == JOB_RETURNED)
        return 1;
    return (next[from] >> to) & 1u;
}
