/* Intake of a JSON message: a pure function from the bytes and properties of
 * a delivery to a validated document or the contract's reason for refusing
 * it.  No I/O: the roles, the fixtures test and the fuzz target call the
 * same function. */
#ifndef IW_INTAKE_H
#define IW_INTAKE_H

#include <jansson.h>
#include <stddef.h>

#include "errcode.h"
#include "schema.h"

#define INTAKE_MSG_LEN 512

typedef struct intake_result {
    iw_code code;             /* IW_C_NONE: valid */
    json_t *doc;              /* new reference when the body is JSON (valid or not), else NULL */
    char msg[INTAKE_MSG_LEN]; /* why it was refused; "" when valid */
} intake_result;

/* Checks, in order: size (at most max_bytes), content type (absent, or
 * application/json with optional parameters), UTF-8 JSON without duplicate
 * keys, then the schema.  The caller releases out->doc (json_decref). */
void intake_json(const char *body, size_t len, const char *content_type, size_t max_bytes,
                 const iw_schema *schema, intake_result *out);

/* The headers only our own delay tiers may set on a message (x-attempts,
 * x-due-at, x-first-seen, x-last-error, iw-*) are believed only on a message
 * that reached its queue through <ns>.retry, the exchange every delay tier
 * dead-letters into and that nobody upstream publishes to (upstream
 * services publish to <ns>.requests).  Otherwise they are removed from
 * `headers` (a JSON object).  Returns 1 when they are trusted. */
int intake_trust_internal_headers(json_t *headers, const char *exchange, const char *ns);

#endif
