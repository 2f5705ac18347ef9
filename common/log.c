#include "log.h"

#include <stdarg.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "clock.h"

static struct {
    int level;
    const char *service;
    FILE *out;
} logger = {IW_LOG_INFO, "integration-worker", NULL};

static const char *const level_names[] = {"DEBUG", "INFO", "WARN", "ERROR"};

void log_init(int level, const char *service, FILE *out)
{
    static char buf[1 << 16];

    logger.level = level;
    logger.service = service;
    logger.out = out ? out : stderr;
    /* Fully buffered and flushed once per loop turn: thousands of lines a
     * second must not cost a write(2) each. */
    setvbuf(logger.out, buf, _IOFBF, sizeof buf);
}

int log_enabled(int level)
{
    return level >= logger.level;
}

void format_timestamp(long long wall_ms, char *buf, size_t len)
{
    time_t secs = (time_t)(wall_ms / 1000);
    struct tm tm;

    gmtime_r(&secs, &tm);
    snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(wall_ms % 1000));
}

void log_json(int level, json_t *fields)
{
    char ts[40];
    json_t *line;

    if (!log_enabled(level)) {
        json_decref(fields);
        return;
    }
    if (!logger.out)
        logger.out = stderr;
    format_timestamp(clock_wall_ms(), ts, sizeof ts);
    line = json_pack("{s:s, s:s, s:s, s:s}", "timestamp", ts, "level", level_names[level],
                     "service", logger.service, "interface", "IF-002");
    if (line && fields)
        json_object_update(line, fields);
    json_decref(fields);
    if (line) {
        json_dumpf(line, logger.out, JSON_COMPACT | JSON_PRESERVE_ORDER);
        fputc('\n', logger.out);
        json_decref(line);
    }
    if (level >= IW_LOG_ERROR)
        fflush(logger.out);
}

void log_msg(int level, json_t *fields, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    if (!log_enabled(level)) {
        json_decref(fields);
        return;
    }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (!fields)
        fields = json_object();
    json_object_set_new(fields, "message", json_string(msg));
    log_json(level, fields);
}

void log_flush(void)
{
    if (logger.out)
        fflush(logger.out);
}
