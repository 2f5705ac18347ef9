/* The spec's data mappings, as pure functions over jansson values. */
#ifndef IW_TRANSFORM_H
#define IW_TRANSFORM_H

#include <jansson.h>

#include "buf.h"
#include "status.h"

/* OurRequest (a validated submission job) -> ExternalRequest:
 * {"user_id","action_type","request_data","client_info":{"client_id","timestamp"}}.
 * Borrows job; returns a new reference (NULL only when out of memory). */
json_t *transform_outbound(const json_t *job, const char *client_id, long long wall_ms);

/* The same mapping written straight as the request's JSON text, appended to
 * out (the bytes json_dumps(transform_outbound(...), JSON_COMPACT) gives,
 * with no tree built): IW_OK; IW_ERR_INVALID when the job lacks a member or
 * holds text that is not UTF-8; IW_ERR_TOO_LARGE past out's cap; NOMEM. */
int transform_outbound_text(const json_t *job, const char *client_id, long long wall_ms,
                            iw_buf *out) __attribute__((warn_unused_result));

/* ExternalResponse -> OurFormat (spec, "Inbound Data Mapping").  A body of
 * another shape is IW_ERR_JSON with err->msg naming the first bad field, and
 * NULL is returned: never a half-filled answer. */
json_t *transform_inbound(const json_t *external, iw_error *err);

#endif
