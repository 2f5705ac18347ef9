/* Outcome records in Redis: what makes "exactly one outcome per job" hold
 * across processes, crashes and clocks.
 *
 * A job's outcome (the submitter's submission.accepted, the poller's
 * status.final) is recorded under <ns>:<kind>:<jobId> BEFORE it is
 * published, as
 *   {"event": "<the event's JSON text>", "published": false,
 *    "recordedAt": ms, "owner": "<token>", "leaseUntil": ms}
 * The event is kept as a string so that whoever publishes it later sends the
 * same bytes.  Every script reads Redis's own clock (TIME), never a pod's.
 *
 *   put    records the outcome unless one exists: the first recorder wins and
 *          owns the publishing for a lease; a later one gets the record.
 *   adopt  a claim (compare-and-set): a delivery that finds a record publishes
 *          it only when it is unpublished and its owner's lease has passed
 *          (or it is the owner); it then owns it for a new lease.  So two
 *          chains of one job, or pods whose clocks disagree, never both
 *          publish.
 *   mark   after the broker confirmed the publish: "published": true; later
 *          deliveries of the job are acknowledged without a call or event.
 *   release drops a call claim (<ns>:claim:<jobId>) when its token holds it.
 *
 * All of them are pipelined: append now, read the replies in order. */
#ifndef IW_RECORDS_H
#define IW_RECORDS_H

#include <stddef.h>

#include "redis_link.h"
#include "status.h"

/* Room for <ns>:<kind>:<jobId>: a namespace of up to 200 bytes and a jobId
 * of 128 characters of up to 4 bytes each.  A key that does not fit is
 * refused, never truncated. */
#define RECORDS_KEY_MAX 768

typedef struct records records;

typedef enum records_answer {
    REC_STORED,    /* put: this caller recorded it and owns it */
    REC_EXISTS,    /* put: another outcome was recorded first: *event is it */
    REC_ADOPTED,   /* adopt: unpublished, now owned by this caller: *event */
    REC_PUBLISHED, /* adopt: already published: *event is it */
    REC_BUSY,      /* adopt: its owner's lease runs for *wait_ms more */
    REC_GONE,      /* adopt/mark: the record expired or was never there */
    REC_DONE,      /* mark/release */
} records_answer;

typedef struct records_reply {
    records_answer answer;
    char *event;  /* REC_EXISTS, REC_ADOPTED, REC_PUBLISHED: the event (malloc'd) */
    long wait_ms; /* REC_BUSY */
    int failed;   /* the recorded outcome is a failure (submission.failed) */
} records_reply;

/* The link is borrowed; the scripts are registered on it. */
records *records_new(redis_link *r, const char *ns, long ttl_ms, long lease_ms);
void records_free(records *rec);

/* The bytes <ns>:<kind>:<id> takes with its terminating NUL. */
size_t records_key_size(const records *rec, const char *kind, const char *id);
/* <ns>:<kind>:<id> into buf (size bytes, at most RECORDS_KEY_MAX used); -1
 * when it does not fit. */
int records_key(const records *rec, char *buf, size_t size, const char *kind, const char *id);

/* put also drops the job's call claim (NULL: none) when claim_token holds it.
 * failed_ttl_ms > 0 records a failure (submission.failed) for that long
 * only: a second delivery of the job meanwhile gets the same failure, a later
 * one (an ops replay) is tried again. */
int records_append_put(records *rec, const char *key, const char *event, const char *token,
                       const char *claim_key, const char *claim_token, long failed_ttl_ms,
                       iw_error *err);
int records_append_adopt(records *rec, const char *key, const char *token, iw_error *err);
int records_append_mark(records *rec, const char *key, iw_error *err);
int records_append_release(records *rec, const char *claim_key, const char *token, iw_error *err);
/* The time (Redis's clock, wall ms) each job of a batch was first asked to
 * be called, set once per jobId (<ns>:first:<jobId>, IW_IDEMPOTENCY_TTL):
 * every attempt of a job, even after a crash, builds its body from it.
 * Not part of the reply order of the steps above: read it with
 * records_read_first, in pipeline order. */
int records_append_first(records *rec, const char *const *keys, size_t n, iw_error *err);
int records_read_first(records *rec, long long *out, size_t n, iw_error *err);
/* Reads the next reply of one of the above; out->event is the caller's to
 * free.  A reply of the wrong shape is IW_ERR_REDIS_SCRIPT. */
int records_read(records *rec, records_reply *out, iw_error *err);

#endif
