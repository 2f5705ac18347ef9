/* Placeholder while the poller role is being written: fails loudly at start. */
#include "roles.h"

struct poller {
    int unused;
};

poller *poller_new(runtime *rt, iw_error *err)
{
    (void)rt;
    iw_error_set(err, IW_ERR_INVALID, "the poller role is not built into this binary yet");
    return NULL;
}

void poller_free(poller *p)
{
    (void)p;
}

int poller_register(poller *p)
{
    (void)p;
    return IW_ERR_INVALID;
}
