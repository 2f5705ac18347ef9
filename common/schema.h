/* A JSON Schema (draft-07) validator for the subset of keywords this project
 * uses.  The schemas in schemas/ are the normative form of every message; this
 * module turns one into an opaque, immutable iw_schema and checks instances
 * against it.
 *
 * Supported (per draft-07, checked against the official test suite):
 *   boolean schemas, type, enum, const, properties, required,
 *   additionalProperties, minProperties, maxProperties, propertyNames,
 *   dependencies, minLength, maxLength, minimum, maximum, exclusiveMinimum,
 *   exclusiveMaximum, multipleOf, items, additionalItems, minItems, maxItems,
 *   uniqueItems, contains, allOf, anyOf, oneOf, not, if/then/else,
 *   definitions, $ref (same document only).
 * Accepted and ignored (annotations): title, description, $schema (must name
 *   draft-07 when present), $id (root only), $comment, default, examples,
 *   readOnly, writeOnly, and format -- draft-07 makes format validation
 *   optional and we do not do it, so "format": "date-time" documents intent.
 *
 * So that no rule is ever silently ignored, schema_new() rejects any other
 * member of a schema object with IW_ERR_SCHEMA_UNSUPPORTED: the draft-07
 * keywords we do not implement (pattern, patternProperties, contentEncoding,
 * contentMediaType), later drafts' keywords, vendor extensions and typos alike.
 * The one exception is a member that a $ref points into (the test suite keeps
 * schemas under arbitrary names such as "#/slash~1field"), which is compiled
 * as a schema when referenced.  As draft-07 prescribes, the other members of
 * an object that has "$ref" do not apply.
 *
 * Limits: $ref must be "#" or "#/<JSON pointer>" (percent-encoding, ~0 and ~1
 * understood); anything else -- remote documents, "#name" anchors, a $id in a
 * subschema (which would move the base URI) -- is IW_ERR_SCHEMA_UNSUPPORTED
 * at load time.  Schema nesting and validation recursion are capped at
 * IW_SCHEMA_MAX_DEPTH, so neither a hostile instance nor a self-referencing
 * schema can exhaust the stack. */
#ifndef IW_SCHEMA_H
#define IW_SCHEMA_H

#include <jansson.h>

#include "status.h"

#define IW_SCHEMA_MAX_DEPTH 64

typedef struct iw_schema iw_schema;

/* Compiles a schema document.  Borrows doc: takes its own reference, and the
 * caller must not modify doc while the schema lives.  Returns NULL and fills
 * err on failure: IW_ERR_SCHEMA_UNSUPPORTED naming the first keyword (or
 * $ref) it does not support, IW_ERR_JSON for a malformed schema (a keyword
 * with a value of the wrong kind, a $ref that resolves to nothing or loops on
 * itself), IW_ERR_NOMEM. */
iw_schema *schema_new(json_t *doc, iw_error *err) __attribute__((warn_unused_result));

/* Reads and compiles a schema file; IW_ERR_IO / IW_ERR_JSON if it cannot be
 * read or parsed (duplicate keys are rejected), otherwise as schema_new(). */
iw_schema *schema_load_file(const char *path, iw_error *err) __attribute__((warn_unused_result));

/* Releases a schema; NULL is harmless. */
void schema_free(iw_schema *s);

/* Validates a borrowed instance.  IW_OK, or IW_ERR_SCHEMA with err->msg
 * naming the instance location as a JSON pointer ("/" for the root) and the
 * rule, e.g. "/jobId: string longer than maxLength 128" or
 * "/: missing required property \"userId\"".  An instance nested too deeply
 * for IW_SCHEMA_MAX_DEPTH is IW_ERR_SCHEMA too (never "valid"); IW_ERR_NOMEM
 * if memory runs out.  Thread-safe: the schema is not modified. */
int schema_validate(const iw_schema *s, const json_t *instance, iw_error *err)
    __attribute__((warn_unused_result));

#endif
