/* mock-provider: a stand-in for the IF-002 REST provider, for local runs,
 * integration tests and benchmarks.  See mock_config.c for the flags and
 * mock_provider.c for the behaviour. */
#include "mock_config.h"
#include "mock_http.h"
#include "mock_provider.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define LISTEN_BACKLOG 4096

/* Opens a non-blocking listening socket on host:port and reports the bound
 * port (port 0 picks a free one).  Returns the socket, or -1 with err. */
static int open_listener(const char *host, unsigned port, unsigned *bound, char *err, size_t errlen)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    char portstr[8];
    snprintf(portstr, sizeof portstr, "%u", port);
    int rc = getaddrinfo(host, portstr, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
            continue;
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, LISTEN_BACKLOG) == 0)
            break;
        snprintf(err, errlen, "cannot listen on %s:%u: %s", host, port, strerror(errno));
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        return -1;
    struct sockaddr_storage ss;
    socklen_t sslen = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sslen) < 0) {
        snprintf(err, errlen, "getsockname: %s", strerror(errno));
        close(fd);
        return -1;
    }
    if (ss.ss_family == AF_INET6)
        *bound = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    else
        *bound = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    return fd;
}

/* Thousands of open connections need as many descriptors: lift the soft
 * limit to the hard one. */
static void raise_fd_limit(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv)
{
    mock_config cfg;
    char err[300];
    int status = 1;
    mock_provider *provider = NULL;
    mock_server *server = NULL;

    if (mock_config_parse(&cfg, argc, argv, err, sizeof err) < 0) {
        fprintf(stderr, "mock-provider: %s\n", err);
        return 2;
    }
    if (cfg.help) {
        mock_config_usage(stdout);
        return 0;
    }

    /* SIGTERM and SIGINT are taken by sigwait below; every thread started
     * from here on inherits the blocked mask. */
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();

    unsigned port = 0;
    int fd = open_listener(cfg.host, cfg.port, &port, err, sizeof err);
    if (fd < 0) {
        fprintf(stderr, "mock-provider: %s\n", err);
        goto out;
    }
    provider = mock_provider_new(&cfg);
    if (!provider) {
        fprintf(stderr, "mock-provider: out of memory\n");
        close(fd);
        goto out;
    }
    server = mock_server_start(&cfg, provider, fd, err, sizeof err);
    if (!server) {
        fprintf(stderr, "mock-provider: %s\n", err);
        close(fd);
        goto out;
    }
    const char *open_bracket = strchr(cfg.host, ':') ? "[" : "";
    const char *close_bracket = *open_bracket ? "]" : "";
    printf("mock-provider listening on %s://%s%s%s:%u\n", cfg.tls_cert ? "https" : "http",
           open_bracket, cfg.host, close_bracket, port);
    fflush(stdout);

    int sig = 0;
    sigwait(&stop_signals, &sig);
    if (cfg.verbose)
        fprintf(stderr, "mock-provider: %s, stopping\n", strsignal(sig));
    status = 0;
out:
    mock_server_stop(server);
    mock_provider_free(provider);
    return status;
}
