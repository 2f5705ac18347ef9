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
    char service_json[128]; /* service as a JSON string; "" when it did not fit */
} logger = {IW_LOG_INFO, "integration-worker", NULL, "\"integration-worker\""};

static const char *const level_names[] = {"DEBUG", "INFO", "WARN", "ERROR"};

void log_init(int level, const char *service, FILE *out)
{
    static char buf[1 << 16];

    json_t *svc = json_string(service);

    logger.level = level;
    logger.service = service;
    logger.out = out ? out : stderr;
    /* encoded once: every line's head is then plain text (log_json) */
    size_t n =
        svc ? json_dumpb(svc, logger.service_json, sizeof logger.service_json - 1, JSON_ENCODE_ANY)
            : 0;
    logger.service_json[n < sizeof logger.service_json ? n : 0] = '\0';
    json_decref(svc);
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

/* The line the long way: the head's fields and the caller's in one object,
 * dumped (into the stream when longer than the buffer). */
static void write_merged(int level, json_t *fields, const char *ts)
{
    json_t *line = json_pack("{s:s, s:s, s:s, s:s}", "timestamp", ts, "level", level_names[level],
                             "service", logger.service, "interface", "IF-002");

    if (!line)
        return;
    if (fields)
        json_object_update(line, fields);
    json_dumpf(line, logger.out, JSON_COMPACT | JSON_PRESERVE_ORDER);
    fputc('\n', logger.out);
    json_decref(line);
}

/* Whether fields can follow the head as they are: an object without one of
 * the head's names (ours never have them; a caller's would replace them). */
static int fields_follow(const json_t *fields)
{
    return !fields || (json_is_object(fields) && !json_object_get(fields, "timestamp") &&
                       !json_object_get(fields, "level") && !json_object_get(fields, "service") &&
                       !json_object_get(fields, "interface"));
}

/* The head's literal text around the values: the longest head is it plus
 * the timestamp, the level and the service. */
#define HEAD_TEXT                                                                                  \
    (sizeof "{\"timestamp\":\"\",\"level\":\"\",\"service\":,\"interface\":\"IF-002\"" - 1)

static size_t put(char *text, size_t n, const char *s)
{
    size_t len = strlen(s);

    memcpy(text + n, s, len);
    return n + len;
}

/* A line is the head, written as text (our own timestamp, level and service,
 * the service encoded once by jansson), and the caller's fields dumped by
 * jansson right behind it, their "{" turned into ",": one dump of the
 * caller's object, no second object to build and copy the fields into. */
void log_json(int level, json_t *fields)
{
    char ts[40], text[2048];
    size_t n, m = 0;
    int any;

    if (!log_enabled(level)) {
        json_decref(fields);
        return;
    }
    if (!logger.out)
        logger.out = stderr;
    format_timestamp(clock_wall_ms(), ts, sizeof ts);
    if (!logger.service_json[0] || !fields_follow(fields)) {
        write_merged(level, fields, ts);
        goto out;
    }
    /* fits: ts < 40, a level name, service_json < 128 */
    n = put(text, 0, "{\"timestamp\":\"");
    n = put(text, n, ts);
    n = put(text, n, "\",\"level\":\"");
    n = put(text, n, level_names[level]);
    n = put(text, n, "\",\"service\":");
    n = put(text, n, logger.service_json);
    n = put(text, n, ",\"interface\":\"IF-002\"");
    any = fields && json_object_size(fields) > 0;
    if (any)
        m = json_dumpb(fields, text + n, sizeof text - n - 1, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!any) {
        text[n++] = '}';
    } else if (m > 2 && m < sizeof text - n - 1) {
        text[n] = ','; /* the fields' "{" */
        n += m;
    } else {
        write_merged(level, fields, ts); /* too long for the buffer, or not dumpable */
        goto out;
    }
    text[n++] = '\n';
    fwrite(text, 1, n, logger.out);
out:
    json_decref(fields);
    if (level >= IW_LOG_ERROR)
        fflush(logger.out);
}

_Static_assert(HEAD_TEXT + 40 + 5 + 128 + 2 < 2048, "a line's head fits its buffer");

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
