/* /metrics, /healthz and /readyz on IW_HTTP_ADDR, served by libmicrohttpd's
 * own thread; it only reads the atomic metrics registry. */
#ifndef IW_ADMIN_HTTP_H
#define IW_ADMIN_HTTP_H

#include "status.h"

typedef struct admin_http admin_http;

/* Starts serving on "host:port"; returns NULL without error for "off". */
admin_http *admin_http_start(const char *addr, iw_error *err);
void admin_http_stop(admin_http *a); /* NULL ok */

#endif
