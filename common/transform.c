#include "transform.h"

#include <string.h>

#include "json_out.h"
#include "log.h"

int transform_outbound(const json_t *job, const char *client_id, long long wall_ms, iw_buf *out)
{
    char ts[40];
    json_w w;

    format_timestamp(wall_ms, ts, sizeof ts);
    jw_begin(&w, out);
    jw_json(&w, "user_id", json_object_get(job, "userId"));
    jw_json(&w, "action_type", json_object_get(job, "action"));
    jw_json(&w, "request_data", json_object_get(job, "payload"));
    jw_open(&w, "client_info");
    jw_str(&w, "client_id", client_id);
    jw_str(&w, "timestamp", ts);
    jw_close(&w);
    return jw_end(&w);
}

static const char *string_member(const json_t *obj, const char *name, const char *where,
                                 iw_error *err)
{
    const json_t *v = json_object_get(obj, name);
    if (!json_is_string(v)) {
        iw_error_set(err, IW_ERR_JSON, "%s%s: expected a string", where, name);
        return NULL;
    }
    return json_string_value(v);
}

json_t *transform_inbound(const json_t *external, iw_error *err)
{
    const char *id, *name, *status, *field_one;
    const json_t *data, *field_two;

    if (!json_is_object(external)) {
        iw_error_set(err, IW_ERR_JSON, "body: expected an object");
        return NULL;
    }
    if (!(id = string_member(external, "id", "", err)) ||
        !(name = string_member(external, "ext_name", "", err)) ||
        !(status = string_member(external, "ext_status", "", err)))
        return NULL;
    data = json_object_get(external, "ext_data");
    if (!json_is_object(data)) {
        iw_error_set(err, IW_ERR_JSON, "ext_data: expected an object");
        return NULL;
    }
    if (!(field_one = string_member(data, "field_one", "ext_data.", err)))
        return NULL;
    field_two = json_object_get(data, "field_two");
    if (!json_is_number(field_two)) {
        iw_error_set(err, IW_ERR_JSON, "ext_data.field_two: expected a number");
        return NULL;
    }
    return json_pack("{s:s, s:s, s:s, s:{s:s, s:O}}", "externalId", id, "name", name, "status",
                     strcmp(status, "ACTIVE") == 0 ? "active" : "inactive", "details", "fieldOne",
                     field_one, "fieldTwo", field_two);
}
