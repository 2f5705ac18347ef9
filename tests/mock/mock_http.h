/* The HTTP shell of mock-provider: libmicrohttpd in epoll mode with a small
 * pool of event-loop threads.  Delayed answers suspend their connection and
 * leave a timer entry; the one timer thread resumes the connection when the
 * delay is due, so neither a connection nor a delayed request holds a
 * thread. */
#ifndef MOCK_HTTP_H
#define MOCK_HTTP_H

#include "mock_config.h"
#include "mock_provider.h"

#include <stddef.h>

typedef struct mock_server mock_server;

/* Serves provider p on the listening socket listen_fd (which the server
 * takes over).  Returns NULL with a one-line message in err on failure. */
mock_server *mock_server_start(const mock_config *cfg, mock_provider *p, int listen_fd, char *err,
                               size_t errlen);

/* Answers every delayed request at once, then stops and frees the server;
 * NULL is harmless. */
void mock_server_stop(mock_server *srv);

#endif
