/* The roles a process can run; each registers itself with the runtime. */
#ifndef IW_ROLES_H
#define IW_ROLES_H

#include "runtime.h"

typedef struct submitter submitter;

submitter *submitter_new(runtime *rt, iw_error *err);
void submitter_free(submitter *s);
int submitter_register(submitter *s);

#endif
