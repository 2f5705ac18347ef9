#include "log.h"

#include <stdarg.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "buf.h"
#include "clock.h"

#define LOG_MSG_MAX 16384

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
    /* strftime and a bounded millisecond part: snprintf of the raw tm fields
     * lets gcc -O2 (-Wformat-truncation) see a 17-byte year, which broke the
     * Release build; a year past 9999 is clamped rather than cut. */
    long long clamped = wall_ms < 0 ? 0 : wall_ms > 253402300799999LL ? 253402300799999LL : wall_ms;
    time_t secs = (time_t)(clamped / 1000);
    unsigned ms = (unsigned)(clamped % 1000);
    /* the second's text, kept: most calls fall in the same second (one
     * reactor thread; a per-thread cache would serve others as well) */
    static _Thread_local time_t cached_secs = -1;
    static _Thread_local char cached[32];
    static _Thread_local size_t cached_n;
    struct tm tm;
    size_t n;

    if (!len)
        return;
    buf[0] = '\0';
    if (secs != cached_secs) {
        cached_secs = -1;
        if (!gmtime_r(&secs, &tm) ||
            !(cached_n = strftime(cached, sizeof cached, "%Y-%m-%dT%H:%M:%S", &tm)))
            return;
        cached_secs = secs;
    }
    n = cached_n;
    if (len - 1 < n || len - n < 6) {
        buf[0] = '\0';
        return;
    }
    memcpy(buf, cached, n);
    buf[n++] = '.';
    buf[n++] = (char)('0' + ms / 100);
    buf[n++] = (char)('0' + ms / 10 % 10);
    buf[n++] = (char)('0' + ms % 10);
    buf[n++] = 'Z';
    buf[n] = '\0';
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
        /* one write into the stream's buffer, not one per token */
        char text[2048];
        size_t n = json_dumpb(line, text, sizeof text - 1, JSON_COMPACT | JSON_PRESERVE_ORDER);
        if (n > 0 && n < sizeof text) {
            text[n] = '\n';
            fwrite(text, 1, n + 1, logger.out);
        } else {
            json_dumpf(line, logger.out, JSON_COMPACT | JSON_PRESERVE_ORDER);
            fputc('\n', logger.out);
        }
        json_decref(line);
    }
    if (level >= IW_LOG_ERROR)
        fflush(logger.out);
}

void log_msg(int level, json_t *fields, const char *fmt, ...)
{
    iw_buf raw, text;
    va_list ap;
    int rc;

    if (!log_enabled(level)) {
        json_decref(fields);
        return;
    }
    /* The message may quote input: it is built whole (up to 64 KiB) and put
     * into the line as valid UTF-8 without control bytes, cut at 16 KiB on a
     * character boundary; a message jansson would refuse never vanishes. */
    buf_init(&raw, 1 << 16);
    buf_init(&text, LOG_MSG_MAX);
    va_start(ap, fmt);
    rc = buf_vaddf(&raw, fmt, ap);
    va_end(ap);
    if (rc != IW_OK)
        rc = buf_adds(&raw, "(message too long to format)");
    if (rc == IW_OK)
        rc = buf_add_text(&text, buf_ptr(&raw), buf_len(&raw), LOG_MSG_MAX);
    if (!fields)
        fields = json_object();
    json_object_set_new(fields, "message",
                        json_stringn(rc == IW_OK ? buf_ptr(&text) : "(out of memory)",
                                     rc == IW_OK ? buf_len(&text) : 15));
    buf_free(&raw);
    buf_free(&text);
    log_json(level, fields);
}

void log_flush(void)
{
    if (logger.out)
        fflush(logger.out);
}
