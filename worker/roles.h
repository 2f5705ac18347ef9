/* The roles a process can run; each registers itself with the runtime. */
#ifndef IW_ROLES_H
#define IW_ROLES_H

#include "runtime.h"

typedef struct submitter submitter;
submitter *submitter_new(runtime *rt, iw_error *err);
void submitter_free(submitter *s); /* NULL ok */
int submitter_register(submitter *s);

typedef struct poller poller;
poller *poller_new(runtime *rt, iw_error *err);
void poller_free(poller *p); /* NULL ok */
int poller_register(poller *p);

typedef struct resolver resolver;
resolver *resolver_new(runtime *rt, iw_error *err);
void resolver_free(resolver *r); /* NULL ok */
int resolver_register(resolver *r);

/* `integration-worker cache invalidate ID`: deletes the cache entries of
 * resource ID (every expand variant, the stale copy and a remembered 404).
 * Returns the process exit code and prints one line. */
int resolver_cache_invalidate_cmd(const iw_config *cfg, const char *id);

#endif
