/* The spec's data mappings, as pure functions over jansson values. */
#ifndef IW_TRANSFORM_H
#define IW_TRANSFORM_H

#include <jansson.h>

#include "buf.h"
#include "status.h"

/* OurRequest (a validated submission job) -> ExternalRequest, written as the
 * request's compact JSON text and appended to out (no tree is built):
 * {"user_id","action_type","request_data","client_info":{"client_id","timestamp"}},
 * in that order.  Borrows job.  IW_OK; IW_ERR_INVALID when the job lacks
 * one of userId, action, payload or holds text that is not UTF-8 (out is
 * then unchanged); IW_ERR_TOO_LARGE past out's cap; IW_ERR_NOMEM. */
int transform_outbound(const json_t *job, const char *client_id, long long wall_ms, iw_buf *out)
    __attribute__((warn_unused_result));

/* ExternalResponse -> OurFormat (spec, "Inbound Data Mapping").  A body of
 * another shape is IW_ERR_JSON with err->msg naming the first bad field, and
 * NULL is returned: never a half-filled answer. */
json_t *transform_inbound(const json_t *external, iw_error *err);

#endif
