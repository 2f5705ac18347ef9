/* The states of a job in the job engine, their names, and which transitions
 * are legal: a pure table, so that a unit test can walk it and the engine
 * can refuse (and report) a transition that is not in it.
 *
 *   received -> validated -> ready -> permitted -> calling -> classified
 *     -> recording -> publishing -> marking -> acked        an outcome
 *     -> publishing -> acked                                the next check
 *   held        a short wait in memory (delivery unacked), then ready again
 *   sending_on  a retry or a long wait through the delay tiers, then acked
 *   adopting    a record of the job was found: publish it, ack, or wait
 *   failing     submission.failed + dead letter, then acked
 *   returned    nacked back to its queue (shutdown, unconfirmed outcome)
 *   dropped     its broker connection went away: the broker requeued it
 * acked, returned and dropped are final. */
#ifndef IW_JOBSTATE_H
#define IW_JOBSTATE_H

typedef enum job_state {
    JOB_RECEIVED,
    JOB_VALIDATED,
    JOB_READY,
    JOB_HELD,
    JOB_PERMITTED,
    JOB_CALLING,
    JOB_CLASSIFIED,
    JOB_RECORDING,
    JOB_ADOPTING,
    JOB_PUBLISHING,
    JOB_SENDING_ON,
    JOB_FAILING,
    JOB_ACKED,
    JOB_RETURNED,
    JOB_DROPPED,
    JOB_N_STATES
} job_state;

/* "received", ...; "unknown" out of range, never NULL. */
const char *job_state_name(job_state s);
/* 1 when a job may go from `from` to `to`. */
int job_state_allowed(job_state from, job_state to);
/* 1 for acked, returned and dropped: the job is gone. */
int job_state_final(job_state s);

#endif
