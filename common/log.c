#include "log.h"

#include <stdarg.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "buf.h"
#include "clock.h"
#include "json_out.h"

#define LOG_MSG_MAX 16384
/* a longer line is streamed by jansson (write_merged) */
#define LOG_LINE_MAX (1u << 20)

static struct {
    int level;
    const char *service;
    FILE *out;
    char service_json[256]; /* service as a JSON string (at most 100 bytes of it) */
} logger = {IW_LOG_INFO, "integration-worker", NULL, "\"integration-worker\""};

static const char *const level_names[] = {"DEBUG", "INFO", "WARN", "ERROR"};

void log_init(int level, const char *service, FILE *out)
{
    static char buf[1 << 16];

    iw_buf safe, enc;

    logger.level = level;
    logger.service = service;
    logger.out = out ? out : stderr;
    /* encoded once: every line's head is then plain text (log_json); a
     * service of more than 100 bytes is cut, other bytes made safe text */
    buf_init(&safe, 100);
    buf_init_on(&enc, logger.service_json, sizeof logger.service_json,
                sizeof logger.service_json - 1);
    if (buf_add_text(&safe, service, strlen(service), 100) != IW_OK ||
        json_out_string(&enc, buf_ptr(&safe), buf_len(&safe)) != IW_OK)
        memcpy(logger.service_json, "\"integration-worker\"", sizeof "\"integration-worker\"");
    buf_free(&safe);
    buf_free(&enc);
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

/* {"timestamp":..,"level":..,"service":..,"interface":"IF-002" */
static int put_head(iw_buf *b, const char *ts, int level)
{
    const char *const parts[] = {"{\"timestamp\":\"",        ts,
                                 "\",\"level\":\"",          level_names[level],
                                 "\",\"service\":",          logger.service_json,
                                 ",\"interface\":\"IF-002\""};
    int rc = IW_OK;

    for (size_t i = 0; rc == IW_OK && i < sizeof parts / sizeof *parts; i++)
        rc = buf_adds(b, parts[i]);
    return rc;
}

/* A line is the head, written as text (our own timestamp, level and service,
 * the service encoded once), and the caller's fields written by
 * json_out right behind it, their "{" turned into ",": no second object to
 * build and copy the fields into, and no allocation for a line that fits
 * the stack's 4 KiB. */
void log_json(int level, json_t *fields)
{
    char ts[40], mem[4096];
    iw_buf line;
    size_t head;
    int rc;

    if (!log_enabled(level)) {
        json_decref(fields);
        return;
    }
    if (!logger.out)
        logger.out = stderr;
    format_timestamp(clock_wall_ms(), ts, sizeof ts);
    if (!fields_follow(fields)) {
        write_merged(level, fields, ts);
        goto out;
    }
    buf_init_on(&line, mem, sizeof mem, LOG_LINE_MAX);
    rc = put_head(&line, ts, level);
    head = buf_len(&line);
    if (rc == IW_OK && fields && json_object_size(fields) > 0) {
        rc = json_out(&line, fields);
        if (rc == IW_OK)
            line.ptr[head] = ','; /* the fields' "{" */
    } else if (rc == IW_OK) {
        rc = buf_add(&line, "}", 1);
    }
    if (rc == IW_OK)
        rc = buf_add(&line, "\n", 1);
    if (rc == IW_OK)
        fwrite(buf_ptr(&line), 1, buf_len(&line), logger.out);
    else
        write_merged(level, fields, ts); /* past LOG_LINE_MAX, or not valid UTF-8 */
    buf_free(&line);
out:
    json_decref(fields);
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

int log_line_begin(log_line *l, int level)
{
    char ts[40];

    if (!log_enabled(level))
        return 0;
    if (!logger.out)
        logger.out = stderr;
    l->level = level;
    format_timestamp(clock_wall_ms(), ts, sizeof ts);
    buf_init_on(&l->b, l->mem, sizeof l->mem, LOG_LINE_MAX);
    jw_resume(&l->w, &l->b, 0);
    if ((l->w.rc = put_head(&l->b, ts, level)) != IW_OK)
        buf_reset(&l->b);
    return 1;
}

void log_line_end(log_line *l)
{
    int rc = jw_end(&l->w);

    if (rc == IW_OK)
        rc = buf_add(&l->b, "\n", 1);
    if (rc == IW_OK)
        fwrite(buf_ptr(&l->b), 1, buf_len(&l->b), logger.out);
    else
        log_msg(l->level, NULL, "a log line could not be written (%s): %s", iw_strerror(rc),
                rc == IW_ERR_INVALID     ? "one of its values is not valid UTF-8"
                : rc == IW_ERR_TOO_LARGE ? "it is longer than 1 MiB"
                                         : "out of memory");
    buf_free(&l->b);
    if (l->level >= IW_LOG_ERROR)
        fflush(logger.out);
}

void log_flush(void)
{
    if (logger.out)
        fflush(logger.out);
}
