/* The roles a process can run.  The submitter and the poller are tables for
 * the job engine (engine.h); the resolver answers look-ups on top of the
 * engine's calls. */
#ifndef IW_ROLES_H
#define IW_ROLES_H

#include "engine.h"
#include "runtime.h"

typedef struct submitter submitter;
/* Registers the submitter's role with the engine. */
submitter *submitter_new(runtime *rt, engine *e, iw_error *err);
void submitter_free(submitter *s); /* NULL ok */

typedef struct poller poller;
poller *poller_new(runtime *rt, engine *e, iw_error *err);
void poller_free(poller *p); /* NULL ok */

typedef struct resolver resolver;
resolver *resolver_new(runtime *rt, engine *e, iw_error *err);
void resolver_free(resolver *r); /* NULL ok */

/* `integration-worker cache invalidate ID`: deletes the cache entries of
 * resource ID (every expand variant, the stale copy and a remembered 404).
 * Returns the process exit code and prints one line. */
int resolver_cache_invalidate_cmd(const iw_config *cfg, const char *id);

#endif
