/* Placeholder while the resolver role is being written: fails loudly at start. */
#include "roles.h"

struct resolver {
    int unused;
};

resolver *resolver_new(runtime *rt, iw_error *err)
{
    (void)rt;
    iw_error_set(err, IW_ERR_INVALID, "the resolver role is not built into this binary yet");
    return NULL;
}

void resolver_free(resolver *p)
{
    (void)p;
}

int resolver_register(resolver *p)
{
    (void)p;
    return IW_ERR_INVALID;
}

int resolver_cache_invalidate_cmd(const iw_config *cfg, const char *id)
{
    (void)cfg;
    (void)id;
    return 1;
}
