/* Draft-07 JSON Schema validation for the keywords listed in schema.h.
 *
 * schema_new() compiles the document once into a graph of nodes, one per
 * schema object, with every keyword checked and every $ref resolved, so that
 * validation never meets a malformed schema and never looks anything up by
 * name.  Nodes point into the document (property names, enum values, numeric
 * bounds), which the iw_schema keeps a reference to. */
#include "schema.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"

/* Messages are formatted whole up to this size, then cut to IW_ERRMSG_LEN on
 * a character boundary as safe text. */
#define MSG_FORMAT_CAP 65536

/* Instance types as a bit set.  An integral number carries both NUMBER and
 * INTEGER, so "type": "number" accepts 1 and "type": "integer" accepts 1.0. */
enum {
    TYPE_NULL = 1u << 0,
    TYPE_BOOLEAN = 1u << 1,
    TYPE_OBJECT = 1u << 2,
    TYPE_ARRAY = 1u << 3,
    TYPE_NUMBER = 1u << 4,
    TYPE_STRING = 1u << 5,
    TYPE_INTEGER = 1u << 6,
};

static const struct {
    const char *name;
    unsigned bit;
} type_names[] = {
    {"null", TYPE_NULL},       {"boolean", TYPE_BOOLEAN}, {"object", TYPE_OBJECT},
    {"array", TYPE_ARRAY},     {"number", TYPE_NUMBER},   {"string", TYPE_STRING},
    {"integer", TYPE_INTEGER},
};

#define NO_COUNT (-1LL) /* an absent minLength, maxItems, ... */
#define TEXT_CAP 96     /* longest enum/const rendering or name quoted in a message */
#define PATH_CAP 160    /* longest JSON pointer quoted in a message */

struct node;

struct node_list {
    struct node **v;
    size_t n;
};

/* One member of "properties". */
struct property {
    const char *name; /* borrowed from the document */
    size_t len;
    struct node *schema;
};

/* One member of "dependencies": either a list of property names (required
 * array, borrowed) or a schema. */
struct dependency {
    const char *name;
    size_t len;
    const json_t *required;
    struct node *schema;
};

struct node {
    const json_t *json; /* what this node was compiled from; the memo key */
    bool is_false;      /* the schema false; the schema true is a node without rules */
    const char *ref;    /* "$ref" as written (borrowed); the other members do not apply */
    struct node *ref_target;

    unsigned types; /* 0 when "type" is absent */
    const json_t *enum_values;
    const json_t *const_value; /* json null is a value too, so NULL means absent */
    char *expected;            /* enum or const rendered for messages */

    struct property *props;
    size_t nprops;
    struct node *additional_props;
    const json_t *required;
    long long min_props, max_props;
    struct node *property_names;
    struct dependency *deps;
    size_t ndeps;

    long long min_len, max_len;

    const json_t *minimum, *maximum, *ex_minimum, *ex_maximum, *multiple_of;

    struct node *items;     /* "items" as one schema for every item */
    struct node_list tuple; /* "items" as an array */
    bool has_tuple;
    struct node *additional_items; /* applies only after a tuple */
    long long min_items, max_items;
    bool unique_items;
    struct node *contains;

    struct node_list all_of, any_of, one_of;
    struct node *not_schema, *if_schema, *then_schema, *else_schema;
};

struct iw_schema {
    json_t *doc;
    struct node *root;
    struct node **nodes; /* every node, for the memo and for freeing */
    size_t nnodes, cap;
};

/* ---------------------------------------------------------------------------
 * Small helpers shared by compilation and validation
 * ------------------------------------------------------------------------ */

static void *grow(void *v, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return v;
    size_t ncap = *cap ? *cap * 2 : 16;
    while (ncap < need)
        ncap *= 2;
    void *nv = realloc(v, ncap * elem);
    if (nv)
        *cap = ncap;
    return nv;
}

/* Cuts an incomplete UTF-8 sequence off the end of a truncated message, so
 * that it can still become a JSON string in a log line. */
static void trim_utf8(char *s)
{
    size_t len = strlen(s);
    size_t i = len;
    while (i > 0 && ((unsigned char)s[i - 1] & 0xC0) == 0x80)
        i--;
    if (i == 0)
        return;
    unsigned char lead = (unsigned char)s[i - 1];
    size_t want = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    if (len - (i - 1) < want)
        s[i - 1] = '\0';
}

/* Appends bytes to buf (capacity cap, always terminated), escaping what would
 * be ambiguous or unprintable in a log line.  For JSON pointer tokens, ~ and /
 * become ~0 and ~1 (RFC 6901); for quoted names, " and \ are escaped.  Stops
 * with "..." when full.  Returns false once truncated. */
static bool append_escaped(char *buf, size_t cap, size_t *len, const char *s, size_t n,
                           bool pointer)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        char tmp[8];
        if (pointer && ch == '~')
            strcpy(tmp, "~0");
        else if (pointer && ch == '/')
            strcpy(tmp, "~1");
        else if (!pointer && (ch == '"' || ch == '\\'))
            snprintf(tmp, sizeof tmp, "\\%c", ch);
        else if (ch < 0x20 || ch == 0x7F)
            snprintf(tmp, sizeof tmp, "\\x%02x", ch);
        else {
            tmp[0] = (char)ch;
            tmp[1] = '\0';
        }
        size_t tl = strlen(tmp);
        if (*len + tl + 4 > cap) {
            trim_utf8(buf); /* never leave half a character before the "..." */
            *len = strlen(buf);
            if (*len + 4 <= cap) {
                strcpy(buf + *len, "...");
                *len += 3;
            }
            return false;
        }
        memcpy(buf + *len, tmp, tl + 1);
        *len += tl;
    }
    return true;
}

/* A name as it appears in a message: quoted, escaped, capped at TEXT_CAP. */
static const char *quote_name(const char *s, size_t n, char *buf, size_t cap)
{
    size_t len = 1;
    buf[0] = '"';
    buf[1] = '\0';
    if (append_escaped(buf, cap - 1, &len, s, n, false)) {
        buf[len++] = '"';
        buf[len] = '\0';
    }
    trim_utf8(buf);
    return buf;
}

/* A JSON number as text, short when that is exact. */
static const char *number_text(const json_t *j, char *buf, size_t cap)
{
    if (json_is_integer(j)) {
        snprintf(buf, cap, "%" JSON_INTEGER_FORMAT, json_integer_value(j));
    } else {
        double d = json_real_value(j);
        snprintf(buf, cap, "%.15g", d);
        if (strtod(buf, NULL) != d)
            snprintf(buf, cap, "%.17g", d);
    }
    return buf;
}

/* Exact three-way comparison of two JSON numbers, also where an integer
 * beyond 2^53 meets a real (converting both to double would round). */
static int cmp_int_real(json_int_t i, double d)
{
    if (d >= 9223372036854775808.0) /* 2^63: above every json_int_t */
        return -1;
    if (d < -9223372036854775808.0)
        return 1;
    double t = trunc(d);
    json_int_t ti = (json_int_t)t;
    if (i != ti)
        return i < ti ? -1 : 1;
    return d > t ? -1 : d < t ? 1 : 0;
}

static int number_cmp(const json_t *a, const json_t *b)
{
    if (json_is_integer(a) && json_is_integer(b)) {
        json_int_t x = json_integer_value(a), y = json_integer_value(b);
        return x < y ? -1 : x > y ? 1 : 0;
    }
    if (json_is_integer(a))
        return cmp_int_real(json_integer_value(a), json_real_value(b));
    if (json_is_integer(b))
        return -cmp_int_real(json_integer_value(b), json_real_value(a));
    double x = json_real_value(a), y = json_real_value(b);
    return x < y ? -1 : x > y ? 1 : 0;
}

/* JSON equality as JSON Schema defines it (jansson's json_equal() tells 1
 * from 1.0): 1 equal, 0 not, -1 nested deeper than the cap. */
static int json_value_equal(const json_t *a, const json_t *b, int depth)
{
    if (depth > IW_SCHEMA_MAX_DEPTH)
        return -1;
    if (json_is_number(a) && json_is_number(b))
        return number_cmp(a, b) == 0;
    if (json_typeof(a) != json_typeof(b))
        return 0;
    switch (json_typeof(a)) {
    case JSON_STRING:
        return json_string_length(a) == json_string_length(b) &&
               memcmp(json_string_value(a), json_string_value(b), json_string_length(a)) == 0;
    case JSON_ARRAY: {
        if (json_array_size(a) != json_array_size(b))
            return 0;
        for (size_t i = 0; i < json_array_size(a); i++) {
            int r = json_value_equal(json_array_get(a, i), json_array_get(b, i), depth + 1);
            if (r != 1)
                return r;
        }
        return 1;
    }
    case JSON_OBJECT: {
        if (json_object_size(a) != json_object_size(b))
            return 0;
        const char *key;
        size_t key_len;
        json_t *value;
        /* jansson's iterators take non-const objects but do not modify them */
        json_object_keylen_foreach((json_t *)a, key, key_len, value)
        {
            const json_t *other = json_object_getn(b, key, key_len);
            if (!other)
                return 0;
            int r = json_value_equal(value, other, depth + 1);
            if (r != 1)
                return r;
        }
        return 1;
    }
    default: /* true, false, null: equal types are equal values */
        return 1;
    }
}

static unsigned instance_types(const json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT:
        return TYPE_OBJECT;
    case JSON_ARRAY:
        return TYPE_ARRAY;
    case JSON_STRING:
        return TYPE_STRING;
    case JSON_INTEGER:
        return TYPE_NUMBER | TYPE_INTEGER;
    case JSON_REAL: {
        double d = json_real_value(j);
        return TYPE_NUMBER | (d == trunc(d) ? TYPE_INTEGER : 0);
    }
    case JSON_TRUE:
    case JSON_FALSE:
        return TYPE_BOOLEAN;
    case JSON_NULL:
    default:
        return TYPE_NULL;
    }
}

static const char *instance_type_name(const json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT:
        return "object";
    case JSON_ARRAY:
        return "array";
    case JSON_STRING:
        return "string";
    case JSON_INTEGER:
        return "integer";
    case JSON_REAL:
        return "number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "boolean";
    case JSON_NULL:
    default:
        return "null";
    }
}

/* ---------------------------------------------------------------------------
 * Compilation
 * ------------------------------------------------------------------------ */

/* A step of a $ref pointer: from a container to one of its values.  Kept as
 * a pair because jansson shares true/false/null between all their uses. */
struct hop {
    const json_t *parent, *child;
};

/* A member we do not know; fatal at the end unless a $ref points into it. */
struct unknown {
    struct hop member;
    char *message;
};

struct compiler {
    iw_schema *s;
    iw_error *err;
    char path[256]; /* schema location of the node being compiled, as a pointer */
    size_t path_len;
    struct hop *ref_route; /* every step a $ref pointer took */
    size_t nroute, route_cap;
    struct unknown *unknown;
    size_t nunknown, unknown_cap;
};

struct keyword;
typedef int (*keyword_fn)(struct compiler *c, struct node *n, const struct keyword *kw,
                          const json_t *value, int depth);

/* The keyword table: name, compiler, and the node field it fills (given as
 * an offset so that one function serves all keywords of a shape). */
struct keyword {
    const char *name;
    keyword_fn compile;
    size_t field;
};

#define FIELD(n, kw, type) ((type *)(void *)((char *)(n) + (kw)->field))

static size_t path_push(struct compiler *c, const char *seg, size_t len)
{
    size_t saved = c->path_len;
    if (c->path_len + 5 < sizeof c->path) {
        c->path[c->path_len++] = '/';
        c->path[c->path_len] = '\0';
        append_escaped(c->path, sizeof c->path, &c->path_len, seg, len, true);
    }
    return saved;
}

static void path_pop(struct compiler *c, size_t saved)
{
    c->path_len = saved;
    c->path[saved] = '\0';
}

/* Every compilation error goes through here: fills err (if any), keeping the
 * message valid UTF-8 when it is cut short, and returns status. */
static int compile_error(struct compiler *c, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int compile_error(struct compiler *c, int status, const char *fmt, ...)
{
    if (c->err) {
        /* the message quotes the schema's own strings ($schema, $ref...):
         * made safe text like every iw_error (a fuzz finding: a DEL or CR in
         * "$schema" reached the message raw) */
        iw_buf b;
        va_list ap;
        buf_init(&b, MSG_FORMAT_CAP);
        va_start(ap, fmt);
        if (buf_vaddf(&b, fmt, ap) != IW_OK)
            (void)!buf_adds(&b, "schema error (message too long)");
        va_end(ap);
        c->err->status = status;
        iw_text_copy(c->err->msg, sizeof c->err->msg, buf_ptr(&b), buf_len(&b));
        buf_free(&b);
    }
    return status;
}

static int malformed(struct compiler *c, const struct keyword *kw, const char *what)
{
    return compile_error(c, IW_ERR_JSON, "malformed schema at #%s: \"%s\" must be %s", c->path,
                         kw->name, what);
}

static int nomem(struct compiler *c)
{
    return compile_error(c, IW_ERR_NOMEM, "out of memory compiling a schema");
}

static void node_free(struct node *n)
{
    free(n->expected);
    free(n->props);
    free(n->deps);
    free(n->tuple.v);
    free(n->all_of.v);
    free(n->any_of.v);
    free(n->one_of.v);
    free(n);
}

static int compile_node(struct compiler *c, const json_t *json, int depth, struct node **out);

/* Compiles the subschema value reached through one or two path segments. */
static int compile_sub(struct compiler *c, const json_t *value, int depth, const char *seg,
                       size_t seg_len, struct node **out)
{
    size_t saved = path_push(c, seg, seg_len);
    int rc = compile_node(c, value, depth, out);
    path_pop(c, saved);
    return rc;
}

static bool is_schema_value(const json_t *v)
{
    return json_is_object(v) || json_is_boolean(v);
}

/* A non-negative integer keyword value (2.0 counts as an integer). */
static bool get_count(const json_t *v, long long *out)
{
    if (json_is_integer(v) && json_integer_value(v) >= 0) {
        *out = json_integer_value(v);
        return true;
    }
    if (json_is_real(v)) {
        double d = json_real_value(v);
        if (d >= 0 && d == trunc(d)) {
            *out = d >= 9.2e18 ? LLONG_MAX : (long long)d;
            return true;
        }
    }
    return false;
}

static int kw_annotation(struct compiler *c, struct node *n, const struct keyword *kw,
                         const json_t *value, int depth)
{
    (void)c, (void)n, (void)kw, (void)value, (void)depth;
    return IW_OK;
}

/* "format" is an annotation: draft-07 (section 7.2) lets an implementation
 * skip format validation, and we do, so "date-time" documents intent only. */
static int kw_format(struct compiler *c, struct node *n, const struct keyword *kw,
                     const json_t *value, int depth)
{
    (void)n, (void)depth;
    return json_is_string(value) ? IW_OK : malformed(c, kw, "a string");
}

/* A schema written for another draft may use keywords with other meanings
 * (e.g. "items" in 2020-12), so only draft-07 is accepted. */
static int kw_dollar_schema(struct compiler *c, struct node *n, const struct keyword *kw,
                            const json_t *value, int depth)
{
    (void)n, (void)depth;
    if (!json_is_string(value))
        return malformed(c, kw, "a string");
    const char *uri = json_string_value(value);
    if (strcmp(uri, "http://json-schema.org/draft-07/schema#") != 0 &&
        strcmp(uri, "http://json-schema.org/draft-07/schema") != 0)
        return compile_error(c, IW_ERR_SCHEMA_UNSUPPORTED,
                             "unsupported \"$schema\" \"%s\" at #%s: only draft-07 is supported",
                             uri, c->path);
    return IW_OK;
}

/* A $id below the root would change the base URI that $refs inside it
 * resolve against; we resolve everything against the root, so refuse. */
static int kw_id(struct compiler *c, struct node *n, const struct keyword *kw, const json_t *value,
                 int depth)
{
    (void)depth;
    if (!json_is_string(value))
        return malformed(c, kw, "a string");
    if (n->json != c->s->doc)
        return compile_error(c, IW_ERR_SCHEMA_UNSUPPORTED,
                             "unsupported \"$id\" in a subschema at #%s (base URI changes)",
                             c->path);
    return IW_OK;
}

static int kw_type(struct compiler *c, struct node *n, const struct keyword *kw,
                   const json_t *value, int depth)
{
    (void)depth;
    const char *what = "a type name or a non-empty array of distinct type names";
    size_t count = json_is_array(value) ? json_array_size(value) : 1;
    if (!json_is_string(value) && (!json_is_array(value) || count == 0))
        return malformed(c, kw, what);
    for (size_t i = 0; i < count; i++) {
        const json_t *t = json_is_array(value) ? json_array_get(value, i) : value;
        unsigned bit = 0;
        for (size_t k = 0; json_is_string(t) && k < sizeof type_names / sizeof type_names[0]; k++)
            if (strcmp(json_string_value(t), type_names[k].name) == 0)
                bit = type_names[k].bit;
        if (bit == 0 || (n->types & bit))
            return malformed(c, kw, what);
        n->types |= bit;
    }
    return IW_OK;
}

/* Renders an enum or const value once, for messages. */
static int set_expected(struct compiler *c, struct node *n, const json_t *value)
{
    char *text = json_dumps(value, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!text)
        return nomem(c);
    if (strlen(text) > TEXT_CAP) {
        text[TEXT_CAP - 3] = '\0';
        trim_utf8(text);
        strcat(text, "...");
    }
    free(n->expected);
    n->expected = text;
    return IW_OK;
}

static int kw_enum(struct compiler *c, struct node *n, const struct keyword *kw,
                   const json_t *value, int depth)
{
    (void)depth;
    if (!json_is_array(value))
        return malformed(c, kw, "an array");
    n->enum_values = value;
    return set_expected(c, n, value);
}

static int kw_const(struct compiler *c, struct node *n, const struct keyword *kw,
                    const json_t *value, int depth)
{
    (void)kw, (void)depth;
    n->const_value = value;
    return set_expected(c, n, value);
}

static int kw_count(struct compiler *c, struct node *n, const struct keyword *kw,
                    const json_t *value, int depth)
{
    (void)depth;
    return get_count(value, FIELD(n, kw, long long)) ? IW_OK
                                                     : malformed(c, kw, "a non-negative integer");
}

static int kw_number(struct compiler *c, struct node *n, const struct keyword *kw,
                     const json_t *value, int depth)
{
    (void)depth;
    if (!json_is_number(value))
        return malformed(c, kw, "a number");
    *FIELD(n, kw, const json_t *) = value;
    return IW_OK;
}

static int kw_multiple_of(struct compiler *c, struct node *n, const struct keyword *kw,
                          const json_t *value, int depth)
{
    (void)depth;
    if (!json_is_number(value) || json_number_value(value) <= 0)
        return malformed(c, kw, "a number greater than 0");
    n->multiple_of = value;
    return IW_OK;
}

static int kw_boolean(struct compiler *c, struct node *n, const struct keyword *kw,
                      const json_t *value, int depth)
{
    (void)depth;
    if (!json_is_boolean(value))
        return malformed(c, kw, "a boolean");
    *FIELD(n, kw, bool) = json_is_true(value);
    return IW_OK;
}

static int kw_subschema(struct compiler *c, struct node *n, const struct keyword *kw,
                        const json_t *value, int depth)
{
    if (!is_schema_value(value))
        return malformed(c, kw, "a schema");
    return compile_sub(c, value, depth + 1, kw->name, strlen(kw->name),
                       FIELD(n, kw, struct node *));
}

/* allOf, anyOf, oneOf: a non-empty array of schemas. */
static int kw_schema_list(struct compiler *c, struct node *n, const struct keyword *kw,
                          const json_t *value, int depth)
{
    struct node_list *list = FIELD(n, kw, struct node_list);
    size_t count = json_array_size(value);
    if (!json_is_array(value) || count == 0)
        return malformed(c, kw, "a non-empty array of schemas");
    list->v = calloc(count, sizeof *list->v);
    if (!list->v)
        return nomem(c);
    list->n = count;
    size_t saved = path_push(c, kw->name, strlen(kw->name));
    int rc = IW_OK;
    for (size_t i = 0; i < count && rc == IW_OK; i++) {
        const json_t *item = json_array_get(value, i);
        char seg[24];
        snprintf(seg, sizeof seg, "%zu", i);
        if (!is_schema_value(item))
            rc = malformed(c, kw, "a non-empty array of schemas");
        else
            rc = compile_sub(c, item, depth + 1, seg, strlen(seg), &list->v[i]);
    }
    path_pop(c, saved);
    return rc;
}

static int kw_items(struct compiler *c, struct node *n, const struct keyword *kw,
                    const json_t *value, int depth)
{
    if (is_schema_value(value))
        return compile_sub(c, value, depth + 1, kw->name, strlen(kw->name), &n->items);
    if (!json_is_array(value))
        return malformed(c, kw, "a schema or an array of schemas");
    n->has_tuple = true;
    if (json_array_size(value) == 0)
        return IW_OK;
    /* the same shape as allOf, which does not accept an empty array */
    static const struct keyword tuple_kw = {"items", kw_schema_list, offsetof(struct node, tuple)};
    return kw_schema_list(c, n, &tuple_kw, value, depth);
}

static int kw_required(struct compiler *c, struct node *n, const struct keyword *kw,
                       const json_t *value, int depth)
{
    (void)depth;
    if (!json_is_array(value))
        return malformed(c, kw, "an array of strings");
    for (size_t i = 0; i < json_array_size(value); i++)
        if (!json_is_string(json_array_get(value, i)))
            return malformed(c, kw, "an array of strings");
    n->required = value;
    return IW_OK;
}

static int kw_properties(struct compiler *c, struct node *n, const struct keyword *kw,
                         const json_t *value, int depth)
{
    if (!json_is_object(value))
        return malformed(c, kw, "an object of schemas");
    n->props = calloc(json_object_size(value) + 1, sizeof *n->props);
    if (!n->props)
        return nomem(c);
    size_t saved = path_push(c, kw->name, strlen(kw->name));
    int rc = IW_OK;
    const char *key;
    size_t key_len;
    json_t *sub;
    json_object_keylen_foreach((json_t *)value, key, key_len, sub)
    {
        struct property *p = &n->props[n->nprops++];
        p->name = key;
        p->len = key_len;
        rc = is_schema_value(sub) ? compile_sub(c, sub, depth + 1, key, key_len, &p->schema)
                                  : malformed(c, kw, "an object of schemas");
        if (rc != IW_OK)
            break;
    }
    path_pop(c, saved);
    return rc;
}

/* Definitions are compiled even when nothing refers to them, so that a
 * mistake in one is reported now rather than when someone starts using it. */
static int kw_definitions(struct compiler *c, struct node *n, const struct keyword *kw,
                          const json_t *value, int depth)
{
    (void)n;
    if (!json_is_object(value))
        return malformed(c, kw, "an object of schemas");
    size_t saved = path_push(c, kw->name, strlen(kw->name));
    int rc = IW_OK;
    const char *key;
    size_t key_len;
    json_t *sub;
    json_object_keylen_foreach((json_t *)value, key, key_len, sub)
    {
        struct node *ignored;
        rc = is_schema_value(sub) ? compile_sub(c, sub, depth + 1, key, key_len, &ignored)
                                  : malformed(c, kw, "an object of schemas");
        if (rc != IW_OK)
            break;
    }
    path_pop(c, saved);
    return rc;
}

static int kw_dependencies(struct compiler *c, struct node *n, const struct keyword *kw,
                           const json_t *value, int depth)
{
    const char *what = "an object of schemas and arrays of strings";
    if (!json_is_object(value))
        return malformed(c, kw, what);
    n->deps = calloc(json_object_size(value) + 1, sizeof *n->deps);
    if (!n->deps)
        return nomem(c);
    size_t saved = path_push(c, kw->name, strlen(kw->name));
    int rc = IW_OK;
    const char *key;
    size_t key_len;
    json_t *dep;
    json_object_keylen_foreach((json_t *)value, key, key_len, dep)
    {
        struct dependency *d = &n->deps[n->ndeps++];
        d->name = key;
        d->len = key_len;
        if (is_schema_value(dep)) {
            rc = compile_sub(c, dep, depth + 1, key, key_len, &d->schema);
        } else if (json_is_array(dep)) {
            d->required = dep;
            for (size_t i = 0; i < json_array_size(dep); i++)
                if (!json_is_string(json_array_get(dep, i)))
                    rc = malformed(c, kw, what);
        } else {
            rc = malformed(c, kw, what);
        }
        if (rc != IW_OK)
            break;
    }
    path_pop(c, saved);
    return rc;
}

static const struct keyword keywords[] = {
    /* annotations */
    {"title", kw_annotation, 0},
    {"description", kw_annotation, 0},
    {"$comment", kw_annotation, 0},
    {"default", kw_annotation, 0},
    {"examples", kw_annotation, 0},
    {"readOnly", kw_annotation, 0},
    {"writeOnly", kw_annotation, 0},
    {"format", kw_format, 0},
    {"$schema", kw_dollar_schema, 0},
    {"$id", kw_id, 0},
    {"definitions", kw_definitions, 0},
    /* any instance */
    {"type", kw_type, 0},
    {"enum", kw_enum, 0},
    {"const", kw_const, 0},
    /* objects */
    {"properties", kw_properties, 0},
    {"additionalProperties", kw_subschema, offsetof(struct node, additional_props)},
    {"required", kw_required, 0},
    {"minProperties", kw_count, offsetof(struct node, min_props)},
    {"maxProperties", kw_count, offsetof(struct node, max_props)},
    {"propertyNames", kw_subschema, offsetof(struct node, property_names)},
    {"dependencies", kw_dependencies, 0},
    /* strings */
    {"minLength", kw_count, offsetof(struct node, min_len)},
    {"maxLength", kw_count, offsetof(struct node, max_len)},
    /* numbers */
    {"minimum", kw_number, offsetof(struct node, minimum)},
    {"maximum", kw_number, offsetof(struct node, maximum)},
    {"exclusiveMinimum", kw_number, offsetof(struct node, ex_minimum)},
    {"exclusiveMaximum", kw_number, offsetof(struct node, ex_maximum)},
    {"multipleOf", kw_multiple_of, 0},
    /* arrays */
    {"items", kw_items, 0},
    {"additionalItems", kw_subschema, offsetof(struct node, additional_items)},
    {"minItems", kw_count, offsetof(struct node, min_items)},
    {"maxItems", kw_count, offsetof(struct node, max_items)},
    {"uniqueItems", kw_boolean, offsetof(struct node, unique_items)},
    {"contains", kw_subschema, offsetof(struct node, contains)},
    /* combinations */
    {"allOf", kw_schema_list, offsetof(struct node, all_of)},
    {"anyOf", kw_schema_list, offsetof(struct node, any_of)},
    {"oneOf", kw_schema_list, offsetof(struct node, one_of)},
    {"not", kw_subschema, offsetof(struct node, not_schema)},
    {"if", kw_subschema, offsetof(struct node, if_schema)},
    {"then", kw_subschema, offsetof(struct node, then_schema)},
    {"else", kw_subschema, offsetof(struct node, else_schema)},
};

static const struct keyword *find_keyword(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof keywords / sizeof keywords[0]; i++)
        if (strlen(keywords[i].name) == len && memcmp(keywords[i].name, name, len) == 0)
            return &keywords[i];
    return NULL;
}

/* Remembers a member no keyword claims; see check_unknown(). */
static int note_unknown(struct compiler *c, const json_t *parent, const json_t *value,
                        const char *key, size_t key_len)
{
    char name[TEXT_CAP + 8];
    char buf[2 * IW_ERRMSG_LEN];
    snprintf(buf, sizeof buf, "unsupported keyword %s at #%s",
             quote_name(key, key_len, name, sizeof name), c->path);
    trim_utf8(buf);
    struct unknown *u = grow(c->unknown, &c->unknown_cap, c->nunknown + 1, sizeof *u);
    if (!u)
        return nomem(c);
    c->unknown = u;
    u[c->nunknown].member = (struct hop){parent, value};
    u[c->nunknown].message = strdup(buf);
    if (!u[c->nunknown].message)
        return nomem(c);
    c->nunknown++;
    return IW_OK;
}

static int add_node(struct compiler *c, struct node *n)
{
    struct node **v = grow(c->s->nodes, &c->s->cap, c->s->nnodes + 1, sizeof *v);
    if (!v)
        return nomem(c);
    c->s->nodes = v;
    v[c->s->nnodes++] = n;
    return IW_OK;
}

/* Compiles one schema value into *out.  Values already compiled (reached
 * again through a $ref) yield their existing node, so cycles are plain
 * pointers.  A $ref is only recorded here; resolve_refs() links it later,
 * which keeps this recursion as deep as the document and no deeper. */
static int compile_node(struct compiler *c, const json_t *json, int depth, struct node **out)
{
    for (size_t i = 0; i < c->s->nnodes; i++)
        if (c->s->nodes[i]->json == json) {
            *out = c->s->nodes[i];
            return IW_OK;
        }
    if (depth > IW_SCHEMA_MAX_DEPTH)
        return compile_error(c, IW_ERR_SCHEMA_UNSUPPORTED,
                             "schema nested deeper than %d levels at #%s", IW_SCHEMA_MAX_DEPTH,
                             c->path);
    if (!is_schema_value(json))
        return compile_error(c, IW_ERR_JSON,
                             "malformed schema at #%s: a schema must be an object or a boolean",
                             c->path);

    struct node *n = calloc(1, sizeof *n);
    if (!n)
        return nomem(c);
    n->json = json;
    n->min_props = n->max_props = n->min_len = n->max_len = NO_COUNT;
    n->min_items = n->max_items = NO_COUNT;
    int rc = add_node(c, n);
    if (rc != IW_OK) {
        node_free(n);
        return rc;
    }
    *out = n;
    if (json_is_boolean(json)) {
        n->is_false = json_is_false(json);
        return IW_OK;
    }

    /* draft-07 section 8.3: "All other properties in a "$ref" object MUST be
     * ignored." */
    const json_t *ref = json_object_get(json, "$ref");
    if (ref) {
        if (!json_is_string(ref))
            return compile_error(c, IW_ERR_JSON,
                                 "malformed schema at #%s: \"$ref\" must be a string", c->path);
        n->ref = json_string_value(ref);
        return IW_OK;
    }

    const char *key;
    size_t key_len;
    json_t *value;
    json_object_keylen_foreach((json_t *)json, key, key_len, value)
    {
        const struct keyword *kw = find_keyword(key, key_len);
        rc = kw ? kw->compile(c, n, kw, value, depth) : note_unknown(c, json, value, key, key_len);
        if (rc != IW_OK)
            return rc;
    }
    return IW_OK;
}

static int hex_value(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

static int ref_unresolved(struct compiler *c, const char *ref, const char *why)
{
    return compile_error(c, IW_ERR_JSON, "malformed schema: \"$ref\" \"%s\" %s", ref, why);
}

/* The fragment of a same-document $ref ("#..."), percent-decoded, into a
 * new buffer *out (*len bytes, not NUL-terminated). */
static int decode_fragment(struct compiler *c, const char *ref, char **out, size_t *len)
{
    char *frag;

    *out = NULL;
    if (ref[0] != '#')
        return compile_error(c, IW_ERR_SCHEMA_UNSUPPORTED,
                             "unsupported \"$ref\" \"%s\": only references within the same "
                             "document (\"#/...\") are supported",
                             ref);
    if (!(frag = malloc(strlen(ref + 1) + 1)))
        return nomem(c);
    *len = 0;
    for (const char *p = ref + 1; *p; p++) {
        if (*p == '%') {
            int hi = hex_value(p[1]), lo = hi < 0 ? -1 : hex_value(p[2]);
            if (lo < 0) {
                free(frag);
                return ref_unresolved(c, ref, "has a malformed percent-escape");
            }
            frag[(*len)++] = (char)(hi * 16 + lo);
            p += 2;
        } else {
            frag[(*len)++] = *p;
        }
    }
    if (*len > 0 && frag[0] != '/') {
        free(frag);
        return compile_error(c, IW_ERR_SCHEMA_UNSUPPORTED,
                             "unsupported \"$ref\" \"%s\": named anchors need $id resolution", ref);
    }
    *out = frag;
    return IW_OK;
}

/* The member or element of cur that a pointer token names, or NULL. */
static const json_t *pointer_step(const json_t *cur, const char *tok, size_t tok_len)
{
    size_t index = 0;

    if (json_is_object(cur))
        return json_object_getn(cur, tok, tok_len);
    if (!json_is_array(cur) || tok_len == 0 || tok_len >= 10 || (tok_len > 1 && tok[0] == '0'))
        return NULL;
    for (size_t i = 0; i < tok_len; i++) {
        if (tok[i] < '0' || tok[i] > '9')
            return NULL;
        index = index * 10 + (size_t)(tok[i] - '0');
    }
    return json_array_get(cur, index);
}

/* Follows a same-document $ref ("#" or "#/a/b": a URI fragment holding a
 * JSON pointer, so percent-decoded first, then split, then ~1 and ~0) to
 * the value it names, noting every value on the way (see check_unknown()).
 * *depth is the number of tokens, the target's nesting in the document. */
static int resolve_pointer(struct compiler *c, const char *ref, const json_t **target, int *depth)
{
    const json_t *cur = c->s->doc;
    size_t len = 0, pos = 0;
    char *frag;
    int rc = decode_fragment(c, ref, &frag, &len);

    *depth = 0;
    if (rc != IW_OK)
        return rc;
    /* Each token is unescaped in place: it only ever gets shorter. */
    while (pos < len) {
        size_t start = ++pos, tok_len = 0;
        const json_t *next;
        struct hop *route;
        while (pos < len && frag[pos] != '/') {
            char ch = frag[pos++];
            if (ch == '~') {
                if (pos >= len || (frag[pos] != '0' && frag[pos] != '1')) {
                    rc = ref_unresolved(c, ref, "has a malformed ~ escape");
                    goto out;
                }
                ch = frag[pos++] == '0' ? '~' : '/';
            }
            frag[start + tok_len++] = ch;
        }
        if (!(next = pointer_step(cur, frag + start, tok_len))) {
            rc = ref_unresolved(c, ref, "does not resolve within the document");
            goto out;
        }
        if (!(route = grow(c->ref_route, &c->route_cap, c->nroute + 1, sizeof *route))) {
            rc = nomem(c);
            goto out;
        }
        c->ref_route = route;
        route[c->nroute++] = (struct hop){cur, next};
        cur = next;
        (*depth)++;
    }
    *target = cur;
out:
    free(frag);
    return rc;
}

/* Links every $ref to its target, compiling targets that no keyword reached
 * (which may hold more $refs: the loop runs until the node list stops
 * growing), then refuses chains of $refs that come back to themselves
 * without applying any rule. */
static int resolve_refs(struct compiler *c)
{
    for (size_t i = 0; i < c->s->nnodes; i++) {
        struct node *n = c->s->nodes[i];
        if (!n->ref)
            continue;
        const json_t *target = NULL;
        int depth;
        int rc = resolve_pointer(c, n->ref, &target, &depth);
        if (rc != IW_OK)
            return rc;
        snprintf(c->path, sizeof c->path, "%s", n->ref + 1);
        trim_utf8(c->path);
        c->path_len = strlen(c->path);
        rc = compile_node(c, target, depth, &n->ref_target);
        if (rc != IW_OK)
            return rc;
    }
    for (size_t i = 0; i < c->s->nnodes; i++) {
        const struct node *t = c->s->nodes[i];
        for (size_t steps = 0; t->ref; steps++) {
            if (steps > c->s->nnodes)
                return compile_error(c, IW_ERR_JSON,
                                     "malformed schema: \"$ref\" \"%s\" loops back to itself",
                                     c->s->nodes[i]->ref);
            t = t->ref_target;
        }
    }
    return IW_OK;
}

/* A member no keyword claims is an error -- so that a typo or a keyword we
 * lack is never silently ignored -- unless a $ref points into it: such a
 * member is a container for schemas ("#/slash~1field" in the test suite). */
static int check_unknown(struct compiler *c)
{
    for (size_t i = 0; i < c->nunknown; i++) {
        bool referenced = false;
        for (size_t k = 0; k < c->nroute && !referenced; k++)
            referenced = c->ref_route[k].parent == c->unknown[i].member.parent &&
                         c->ref_route[k].child == c->unknown[i].member.child;
        if (!referenced)
            return compile_error(c, IW_ERR_SCHEMA_UNSUPPORTED, "%s", c->unknown[i].message);
    }
    return IW_OK;
}

iw_schema *schema_new(json_t *doc, iw_error *err)
{
    struct compiler c = {.err = err};
    iw_schema *s = NULL;
    int rc;

    if (!doc) {
        rc = iw_error_set(err, IW_ERR_INVALID, "no schema document");
        goto out;
    }
    s = calloc(1, sizeof *s);
    if (!s) {
        rc = nomem(&c);
        goto out;
    }
    s->doc = json_incref(doc);
    c.s = s;
    rc = compile_node(&c, doc, 0, &s->root);
    if (rc == IW_OK)
        rc = resolve_refs(&c);
    if (rc == IW_OK)
        rc = check_unknown(&c);
out:
    for (size_t i = 0; i < c.nunknown; i++)
        free(c.unknown[i].message);
    free(c.unknown);
    free(c.ref_route);
    if (rc != IW_OK) {
        schema_free(s);
        s = NULL;
    }
    return s;
}

iw_schema *schema_load_file(const char *path, iw_error *err)
{
    json_error_t jerr;
    json_t *doc = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!doc) {
        bool io = json_error_code(&jerr) == json_error_cannot_open_file;
        iw_error_set(err, io ? IW_ERR_IO : IW_ERR_JSON, "%s:%d:%d: %s", path, jerr.line,
                     jerr.column, jerr.text);
        if (err)
            trim_utf8(err->msg);
        return NULL;
    }
    iw_schema *s = schema_new(doc, err);
    json_decref(doc);
    return s;
}

void schema_free(iw_schema *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->nnodes; i++)
        node_free(s->nodes[i]);
    free(s->nodes);
    json_decref(s->doc);
    free(s);
}

/* ---------------------------------------------------------------------------
 * Validation
 * ------------------------------------------------------------------------ */

enum { V_OK, V_FAIL, V_ABORT }; /* abort: cannot decide (too deep, no memory) */

struct segment {
    const char *key; /* NULL for an array index */
    size_t len_or_index;
};

struct vctx {
    int depth;
    size_t npath;
    struct segment path[IW_SCHEMA_MAX_DEPTH + 1];
    int quiet; /* > 0 inside a subschema whose failure is not the answer (anyOf, not, ...) */
    int status;
    char msg[IW_ERRMSG_LEN];
    size_t rule_off; /* where the rule starts in msg, after "<pointer>: " */
};

static void render_pointer(const struct vctx *v, char *buf, size_t cap)
{
    size_t len = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < v->npath; i++) {
        const struct segment *seg = &v->path[i];
        char index[24];
        const char *tok = seg->key;
        size_t tok_len = seg->len_or_index;
        if (!tok) {
            snprintf(index, sizeof index, "%zu", seg->len_or_index);
            tok = index;
            tok_len = strlen(index);
        }
        if (len + 6 > cap) { /* no room for "/", a byte and "...", but room for "..." */
            strcpy(buf + len, "...");
            break;
        }
        buf[len++] = '/';
        buf[len] = '\0';
        if (!append_escaped(buf, cap, &len, tok, tok_len, true))
            break;
    }
    if (len == 0)
        strcpy(buf, "/"); /* the root, spelled so that it is visible in a log line */
}

static void vrecord(struct vctx *v, int status, const char *fmt, va_list ap)
{
    char pointer[PATH_CAP];
    render_pointer(v, pointer, sizeof pointer);
    int n = snprintf(v->msg, sizeof v->msg, "%s: ", pointer);
    v->rule_off = n > 0 && (size_t)n < sizeof v->msg ? (size_t)n : 0;
    /* the rule may quote the schema's strings: safe text, cut on a character
     * boundary (it may be quoted inside another message: anyOf) */
    iw_buf rule;
    buf_init(&rule, MSG_FORMAT_CAP);
    if (buf_vaddf(&rule, fmt, ap) != IW_OK)
        (void)!buf_adds(&rule, "(message too long)");
    iw_text_copy(v->msg + v->rule_off, sizeof v->msg - v->rule_off, buf_ptr(&rule), buf_len(&rule));
    buf_free(&rule);
    v->status = status;
}

/* Records why the instance fails (unless quiet) and returns V_FAIL. */
static int fail(struct vctx *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(struct vctx *v, const char *fmt, ...)
{
    if (v->quiet == 0) {
        va_list ap;
        va_start(ap, fmt);
        vrecord(v, IW_ERR_SCHEMA, fmt, ap);
        va_end(ap);
    }
    return V_FAIL;
}

/* Records why validation cannot decide, even when quiet: an abort inside
 * "not" must not turn into success. */
static int abort_validation(struct vctx *v, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int abort_validation(struct vctx *v, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vrecord(v, status, fmt, ap);
    va_end(ap);
    return V_ABORT;
}

static int validate(struct vctx *v, const struct node *n, const json_t *inst);

/* Validates a member or item, with its key or index on the pointer. */
static int validate_child(struct vctx *v, const struct node *n, const json_t *inst, const char *key,
                          size_t len_or_index)
{
    /* validate() refuses to go deeper than the path can hold, so there is room */
    v->path[v->npath].key = key;
    v->path[v->npath].len_or_index = len_or_index;
    v->npath++;
    int r = validate(v, n, inst);
    v->npath--;
    return r;
}

/* Validates against n without letting a failure become the message. */
static int probe(struct vctx *v, const struct node *n, const json_t *inst)
{
    v->quiet++;
    int r = validate(v, n, inst);
    v->quiet--;
    return r;
}

static int check_type(struct vctx *v, const struct node *n, const json_t *inst)
{
    if (n->types == 0 || (n->types & instance_types(inst)))
        return V_OK;
    char expected[96] = "";
    for (size_t k = 0; k < sizeof type_names / sizeof type_names[0]; k++)
        if (n->types & type_names[k].bit) {
            if (expected[0])
                strcat(expected, " or ");
            strcat(expected, type_names[k].name);
        }
    return fail(v, "expected %s, got %s", expected, instance_type_name(inst));
}

static int check_enum_const(struct vctx *v, const struct node *n, const json_t *inst)
{
    if (n->const_value) {
        int eq = json_value_equal(inst, n->const_value, 0);
        if (eq < 0)
            return abort_validation(v, IW_ERR_SCHEMA, "value nested too deeply to compare");
        if (!eq)
            return fail(v, "value does not equal const %s", n->expected);
    }
    if (n->enum_values) {
        for (size_t i = 0; i < json_array_size(n->enum_values); i++) {
            int eq = json_value_equal(inst, json_array_get(n->enum_values, i), 0);
            if (eq < 0)
                return abort_validation(v, IW_ERR_SCHEMA, "value nested too deeply to compare");
            if (eq)
                return V_OK;
        }
        return fail(v, "value is not one of %s", n->expected);
    }
    return V_OK;
}

static const struct property *find_property(const struct node *n, const char *key, size_t len)
{
    for (size_t i = 0; i < n->nprops; i++)
        if (n->props[i].len == len && memcmp(n->props[i].name, key, len) == 0)
            return &n->props[i];
    return NULL;
}

static int check_property_names(struct vctx *v, const struct node *n, const json_t *inst)
{
    const char *key;
    size_t key_len;
    json_t *value;
    json_object_keylen_foreach((json_t *)inst, key, key_len, value)
    {
        (void)value;
        json_t *name = json_stringn_nocheck(key, key_len);
        if (!name)
            return abort_validation(v, IW_ERR_NOMEM, "out of memory");
        int r = validate(v, n->property_names, name);
        json_decref(name);
        if (r == V_FAIL && v->quiet == 0) {
            char rule[IW_ERRMSG_LEN], quoted[TEXT_CAP + 8];
            snprintf(rule, sizeof rule, "%s", v->msg + v->rule_off);
            r = fail(v, "property name %s: %s", quote_name(key, key_len, quoted, sizeof quoted),
                     rule);
        }
        if (r != V_OK)
            return r;
    }
    return V_OK;
}

static int check_object(struct vctx *v, const struct node *n, const json_t *inst)
{
    char quoted[TEXT_CAP + 8], other[TEXT_CAP + 8];
    size_t size = json_object_size(inst);
    if (n->min_props != NO_COUNT && size < (unsigned long long)n->min_props)
        return fail(v, "object has %zu properties, fewer than minProperties %lld", size,
                    n->min_props);
    if (n->max_props != NO_COUNT && size > (unsigned long long)n->max_props)
        return fail(v, "object has %zu properties, more than maxProperties %lld", size,
                    n->max_props);
    for (size_t i = 0; n->required && i < json_array_size(n->required); i++) {
        const json_t *name = json_array_get(n->required, i);
        if (!json_object_getn(inst, json_string_value(name), json_string_length(name)))
            return fail(v, "missing required property %s",
                        quote_name(json_string_value(name), json_string_length(name), quoted,
                                   sizeof quoted));
    }

    const char *key;
    size_t key_len;
    json_t *value;
    json_object_keylen_foreach((json_t *)inst, key, key_len, value)
    {
        const struct property *p = find_property(n, key, key_len);
        const struct node *sub = p ? p->schema : n->additional_props;
        int r = V_OK;
        if (!p && sub && sub->is_false) {
            v->path[v->npath++] = (struct segment){key, key_len};
            r = fail(v, "additional property not allowed");
            v->npath--;
        } else if (sub) {
            r = validate_child(v, sub, value, key, key_len);
        }
        if (r != V_OK)
            return r;
    }

    for (size_t i = 0; i < n->ndeps; i++) {
        const struct dependency *d = &n->deps[i];
        if (!json_object_getn(inst, d->name, d->len))
            continue;
        if (d->schema) {
            int r = validate(v, d->schema, inst);
            if (r != V_OK)
                return r;
            continue;
        }
        for (size_t k = 0; k < json_array_size(d->required); k++) {
            const json_t *name = json_array_get(d->required, k);
            if (!json_object_getn(inst, json_string_value(name), json_string_length(name)))
                return fail(v, "property %s requires property %s (dependencies)",
                            quote_name(d->name, d->len, quoted, sizeof quoted),
                            quote_name(json_string_value(name), json_string_length(name), other,
                                       sizeof other));
        }
    }

    return n->property_names ? check_property_names(v, n, inst) : V_OK;
}

static int check_array(struct vctx *v, const struct node *n, const json_t *inst)
{
    size_t size = json_array_size(inst);
    int r = V_OK;
    if (n->min_items != NO_COUNT && size < (unsigned long long)n->min_items)
        return fail(v, "array has %zu items, fewer than minItems %lld", size, n->min_items);
    if (n->max_items != NO_COUNT && size > (unsigned long long)n->max_items)
        return fail(v, "array has %zu items, more than maxItems %lld", size, n->max_items);

    for (size_t i = 0; i < size && r == V_OK; i++) {
        const struct node *sub = n->items;
        if (n->has_tuple) /* additionalItems applies only after a tuple of items */
            sub = i < n->tuple.n ? n->tuple.v[i] : n->additional_items;
        if (!sub)
            continue;
        if (n->has_tuple && i >= n->tuple.n && sub->is_false) {
            v->path[v->npath++] = (struct segment){NULL, i};
            r = fail(v, "additional item not allowed (additionalItems)");
            v->npath--;
        } else {
            r = validate_child(v, sub, json_array_get(inst, i), NULL, i);
        }
    }
    if (r != V_OK)
        return r;

    /* Quadratic, but instances are capped in size before they get here. */
    for (size_t i = 0; n->unique_items && i < size; i++)
        for (size_t k = i + 1; k < size; k++) {
            int eq = json_value_equal(json_array_get(inst, i), json_array_get(inst, k), 0);
            if (eq < 0)
                return abort_validation(v, IW_ERR_SCHEMA,
                                        "array items nested too deeply to compare");
            if (eq)
                return fail(v, "array items %zu and %zu are equal (uniqueItems)", i, k);
        }

    if (n->contains) {
        for (size_t i = 0; i < size; i++) {
            r = probe(v, n->contains, json_array_get(inst, i));
            if (r != V_FAIL)
                return r;
        }
        return fail(v, "no array item matches the contains subschema");
    }
    return V_OK;
}

/* Code points, not bytes: jansson strings are valid UTF-8, so every byte
 * that is not a continuation byte starts one. */
static size_t code_points(const json_t *s)
{
    const unsigned char *p = (const unsigned char *)json_string_value(s);
    size_t n = 0;
    for (size_t i = 0; i < json_string_length(s); i++)
        n += (p[i] & 0xC0) != 0x80;
    return n;
}

static int check_string(struct vctx *v, const struct node *n, const json_t *inst)
{
    if (n->min_len == NO_COUNT && n->max_len == NO_COUNT)
        return V_OK;
    size_t len = code_points(inst);
    if (n->min_len != NO_COUNT && len < (unsigned long long)n->min_len)
        return fail(v, "string shorter than minLength %lld", n->min_len);
    if (n->max_len != NO_COUNT && len > (unsigned long long)n->max_len)
        return fail(v, "string longer than maxLength %lld", n->max_len);
    return V_OK;
}

/* Whether x is an integral multiple of m (> 0).  Integers divide exactly.
 * Otherwise the quotient is computed in double and accepted when it is within
 * a few units in the last place of an integer: 0.0075 / 0.0001 gives
 * 75.00000000000001 because neither is exact in binary, yet the schema's
 * author meant 75.  When the quotient overflows, fmod() decides exactly. */
static bool is_multiple(const json_t *x, const json_t *m)
{
    if (json_is_integer(x) && json_is_integer(m))
        return json_integer_value(x) % json_integer_value(m) == 0;
    double q = json_number_value(x) / json_number_value(m);
    if (!isfinite(q))
        return fmod(json_number_value(x), json_number_value(m)) == 0;
    return fabs(q - nearbyint(q)) <= 8 * DBL_EPSILON * fabs(q);
}

static int check_number(struct vctx *v, const struct node *n, const json_t *inst)
{
    char a[40], b[40];
    if (n->minimum && number_cmp(inst, n->minimum) < 0)
        return fail(v, "value %s is less than minimum %s", number_text(inst, a, sizeof a),
                    number_text(n->minimum, b, sizeof b));
    if (n->maximum && number_cmp(inst, n->maximum) > 0)
        return fail(v, "value %s is greater than maximum %s", number_text(inst, a, sizeof a),
                    number_text(n->maximum, b, sizeof b));
    if (n->ex_minimum && number_cmp(inst, n->ex_minimum) <= 0)
        return fail(v, "value %s is not greater than exclusiveMinimum %s",
                    number_text(inst, a, sizeof a), number_text(n->ex_minimum, b, sizeof b));
    if (n->ex_maximum && number_cmp(inst, n->ex_maximum) >= 0)
        return fail(v, "value %s is not less than exclusiveMaximum %s",
                    number_text(inst, a, sizeof a), number_text(n->ex_maximum, b, sizeof b));
    if (n->multiple_of && !is_multiple(inst, n->multiple_of))
        return fail(v, "value %s is not a multiple of %s", number_text(inst, a, sizeof a),
                    number_text(n->multiple_of, b, sizeof b));
    return V_OK;
}

/* anyOf and oneOf report the first subschema's failure when none matches:
 * with two or three alternatives that is usually the one that was meant. */
static int check_alternatives(struct vctx *v, const struct node_list *list, const json_t *inst,
                              bool exactly_one)
{
    const char *name = exactly_one ? "oneOf" : "anyOf";
    char first[IW_ERRMSG_LEN] = "";
    size_t matched = 0, match[2] = {0, 0};
    for (size_t i = 0; i < list->n; i++) {
        int r = i == 0 ? validate(v, list->v[0], inst) : probe(v, list->v[i], inst);
        if (r == V_ABORT)
            return r;
        if (r == V_FAIL) {
            if (i == 0 && v->quiet == 0)
                snprintf(first, sizeof first, "%s", v->msg);
            continue;
        }
        if (!exactly_one)
            return V_OK;
        if (matched < 2)
            match[matched] = i;
        if (++matched == 2)
            break;
    }
    if (matched == 1)
        return V_OK;
    if (matched > 1)
        return fail(v, "matches %s subschemas %zu and %zu, but must match exactly one", name,
                    match[0], match[1]);
    return fail(v, "matches none of the %zu %s subschemas (subschema 0: %s)", list->n, name, first);
}

static int check_combinations(struct vctx *v, const struct node *n, const json_t *inst)
{
    int r;
    for (size_t i = 0; i < n->all_of.n; i++)
        if ((r = validate(v, n->all_of.v[i], inst)) != V_OK)
            return r;
    if (n->any_of.n && (r = check_alternatives(v, &n->any_of, inst, false)) != V_OK)
        return r;
    if (n->one_of.n && (r = check_alternatives(v, &n->one_of, inst, true)) != V_OK)
        return r;
    if (n->not_schema) {
        r = probe(v, n->not_schema, inst);
        if (r == V_ABORT)
            return r;
        if (r == V_OK)
            return fail(v, "value matches the \"not\" subschema");
    }
    /* then and else apply only with an if (draft-07 section 6.6) */
    if (n->if_schema) {
        r = probe(v, n->if_schema, inst);
        if (r == V_ABORT)
            return r;
        const struct node *branch = r == V_OK ? n->then_schema : n->else_schema;
        if (branch && (r = validate(v, branch, inst)) != V_OK)
            return r;
    }
    return V_OK;
}

static int check_node(struct vctx *v, const struct node *n, const json_t *inst)
{
    int r;
    if (n->is_false)
        return fail(v, "no value is allowed here (schema false)");
    if ((r = check_type(v, n, inst)) != V_OK || (r = check_enum_const(v, n, inst)) != V_OK)
        return r;
    switch (json_typeof(inst)) {
    case JSON_OBJECT:
        r = check_object(v, n, inst);
        break;
    case JSON_ARRAY:
        r = check_array(v, n, inst);
        break;
    case JSON_STRING:
        r = check_string(v, n, inst);
        break;
    case JSON_INTEGER:
    case JSON_REAL:
        r = check_number(v, n, inst);
        break;
    default:
        r = V_OK;
        break;
    }
    return r != V_OK ? r : check_combinations(v, n, inst);
}

/* Every application of a schema, $ref hops included, counts towards the
 * depth cap, which bounds both deep instances and schemas that apply
 * themselves to the same value ({"not": {"$ref": "#"}}). */
static int validate(struct vctx *v, const struct node *n, const json_t *inst)
{
    int r;
    if (v->depth >= IW_SCHEMA_MAX_DEPTH || v->npath >= IW_SCHEMA_MAX_DEPTH)
        return abort_validation(v, IW_ERR_SCHEMA, "nested deeper than %d levels",
                                IW_SCHEMA_MAX_DEPTH);
    v->depth++;
    r = n->ref ? validate(v, n->ref_target, inst) : check_node(v, n, inst);
    v->depth--;
    return r;
}

int schema_validate(const iw_schema *s, const json_t *instance, iw_error *err)
{
    if (!s || !instance)
        return iw_error_set(err, IW_ERR_INVALID, "schema_validate: no schema or no instance");
    struct vctx v = {0};
    if (validate(&v, s->root, instance) == V_OK)
        return IW_OK;
    return iw_error_set(err, v.status, "%s", v.msg);
}
