/* `integration-worker dlq`: review, replay, export and purge the dead letters
 * in N.dead.  See dlq.h for the reading discipline that keeps the queue's
 * order; this file is a synchronous client of librabbitmq-c (the ops commands
 * have no event loop to share) and owns its connection.
 *
 * Why not basic.get: on RabbitMQ 3.10 a quorum queue returns the messages a
 * channel took with basic.get (no_ack=false) in no particular order when the
 * channel closes, while those it took as a consumer come back in delivery
 * order (measured; tests/integration/test_dlq.c checks the consumer side).
 * Why an explicit prefetch: a quorum queue consumer with prefetch 0 gets 2000
 * credits, not "unlimited", so the prefetch is the number of messages read
 * (at most 65535, the field's range: a larger queue is read 65535 at a time
 * from its head, and the commands say so).
 *
 * Ids: a dead letter made by the worker carries the AMQP message_id
 * "dl-" + 32 lowercase hex digits.  Any other message (dead-lettered by the
 * broker itself, or with the upstream's own message_id) gets "dx-" + the
 * first 32 hex digits of SHA-256("iw-dlq-id-v1" NUL routing-key NUL time NUL
 * body), where routing-key is its original routing key (as replay uses it)
 * and time is its first x-death entry's time in decimal seconds, else its
 * x-failed-at header, else empty.  Nothing in it changes while the message
 * sits in N.dead (the broker's x-delivery-count is left out on purpose). */
#include "dlq.h"

#include "amqp_link.h"

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <libgen.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "config.h"
#include "log.h"
#include "parse.h"
#include "status.h"

#define FRAME_MAX 131072
#define HEARTBEAT_S 60
#define MAX_READ 65535u          /* prefetch is a 16-bit field */
#define IDLE_TIMEOUT_MS 30000    /* no frame for this long while we expect one: give up */
#define FIELD_CAP 1024           /* bytes kept of a header string for display and filters */
#define JOB_CAP 256              /* bytes kept of a jobId */
#define JOB_PARSE_CAP (4u << 20) /* bodies above this are not parsed for their jobId */
#define SHOW_HEX_CAP 65536       /* bytes of a binary body that `show` dumps */
#define PROGRESS_MS 1000

enum { C_LIST, C_STATS, C_SHOW, C_REPLAY, C_EXPORT, C_PURGE, C_COUNT };
static const char *const cmd_names[C_COUNT] = {"list",   "stats",  "show",
                                               "replay", "export", "purge"};
enum { ORDER_QUEUE, ORDER_OLDEST, ORDER_NEWEST };

/* ---- options ------------------------------------------------------------- */

typedef struct strlist {
    char **v;
    size_t n;
} strlist;

typedef struct dlq_opts {
    int cmd;
    int json, order, all, dry_run, yes, no_export;
    strlist codes, keys, jobs, ids;
    long older_ms, newer_ms; /* -1: no filter */
    long limit;              /* -1: none */
    const char *file;        /* export FILE, purge --export-file */
} dlq_opts;

#define B(c) (1u << (c))
#define FILTERS (B(C_LIST) | B(C_STATS) | B(C_REPLAY) | B(C_EXPORT) | B(C_PURGE))

enum {
    O_JSON,
    O_NEWEST,
    O_OLDEST,
    O_CODE,
    O_KEY,
    O_JOB,
    O_OLDER,
    O_NEWER,
    O_LIMIT,
    O_ALL,
    O_DRY,
    O_YES,
    O_NOEXPORT,
    O_EXPORTFILE
};

static const struct opt_def {
    const char *name;
    int has_arg;
    unsigned cmds;
} opt_defs[] = {
    [O_JSON] = {"--json", 0, B(C_LIST) | B(C_STATS) | B(C_SHOW) | B(C_REPLAY) | B(C_PURGE)},
    [O_NEWEST] = {"--newest", 0, B(C_LIST)},
    [O_OLDEST] = {"--oldest", 0, B(C_LIST)},
    [O_CODE] = {"--code", 1, FILTERS},
    [O_KEY] = {"--routing-key", 1, FILTERS},
    [O_JOB] = {"--job", 1, FILTERS},
    [O_OLDER] = {"--older-than", 1, FILTERS},
    [O_NEWER] = {"--newer-than", 1, FILTERS},
    [O_LIMIT] = {"--limit", 1, FILTERS},
    [O_ALL] = {"--all", 0, B(C_REPLAY) | B(C_PURGE)},
    [O_DRY] = {"--dry-run", 0, B(C_REPLAY) | B(C_PURGE)},
    [O_YES] = {"--yes", 0, B(C_PURGE)},
    [O_NOEXPORT] = {"--no-export", 0, B(C_PURGE)},
    [O_EXPORTFILE] = {"--export-file", 1, B(C_PURGE)},
};

static const char filters_help[] =
    "\nFilters (all given must match):\n"
    "  --code CODE[,CODE]      error code (x-error-code; DELIVERY_LIMIT, REJECTED,\n"
    "                          MESSAGE_TOO_LARGE for broker dead letters); repeatable\n"
    "  --routing-key PATTERN   original routing key; AMQP topic pattern (submit.*, #)\n"
    "  --job JOBID             the body's jobId; repeatable\n"
    "  --older-than DURATION   dead-lettered at least this long ago (30m, 2h, 7d)\n"
    "  --newer-than DURATION   dead-lettered less than this long ago\n"
    "  --limit N               at most N messages\n";

static const char *const cmd_help[C_COUNT] = {
    "usage: integration-worker dlq list [FILTERS] [--newest|--oldest] [--json]\n"
    "\n"
    "A table of the dead letters in <ns>.dead: id, age, error code, HTTP status, attempts,\n"
    "original routing key, jobId, body size. Queue order by default (the head first);\n"
    "--oldest/--newest sort by the time each was dead-lettered; --limit applies after the\n"
    "sort. --json prints one JSON object per message and line.\n",
    "usage: integration-worker dlq stats [FILTERS] [--json]\n"
    "\n"
    "Counts by error code and by original routing key, with the oldest and newest\n"
    "dead-letter time of each group. --json prints one object per group and line\n"
    "({\"by\":\"error_code\"|\"routing_key\"|\"total\", \"key\", \"count\", \"oldest\", "
    "\"newest\"}).\n",
    "usage: integration-worker dlq show ID [--json]\n"
    "\n"
    "Every property and header of one dead letter, and its body: pretty-printed when it\n"
    "is UTF-8 JSON, as escaped text when it is other UTF-8, as a hex dump otherwise.\n",
    "usage: integration-worker dlq replay (ID... | FILTERS | --all) [--dry-run] [--json]\n"
    "\n"
    "Republishes each selected dead letter to <ns>.requests with its original routing key\n"
    "(x-original-routing-key, else the key it was dead-lettered with, else x-death's) and\n"
    "fresh attempts (the worker's x-attempts, x-due-at, x-first-seen, x-last-error,\n"
    "x-error-*, x-http-status, x-failed-at, x-original-*, iw-* and the broker's x-death\n"
    "headers removed), mandatory and with publisher confirms; the dead letter is removed\n"
    "only after the broker confirmed the republish. An unroutable or refused republish\n"
    "leaves it in the queue and the command exits 1. --dry-run lists what would go.\n",
    "usage: integration-worker dlq export FILE [FILTERS]\n"
    "\n"
    "Writes the selected dead letters to FILE (\"-\": stdout; an existing file is not\n"
    "overwritten) as JSON lines {\"id\", \"routing_key\", \"properties\", \"headers\", \"body\"}\n"
    "with the body as text when it is UTF-8, otherwise as \"body_base64\". Header values\n"
    "that are not UTF-8 appear as {\"base64\": \"...\"}. Nothing is removed.\n",
    "usage: integration-worker dlq purge (ID... | FILTERS | --all) [--yes]\n"
    "                                    [--export-file FILE | --no-export] [--json]\n"
    "\n"
    "Removes the selected dead letters. Without --yes it only lists them. With --yes it\n"
    "first writes them to an export file (default ./dlq-<ns>-<UTC time>.jsonl, see\n"
    "`dlq export`), synced to disk, and removes them after; --no-export skips that.\n",
};

static const char dlq_usage[] =
    "usage: integration-worker dlq COMMAND [OPTIONS]   (COMMAND --help for details)\n"
    "\n"
    "Commands on the dead-letter queue <ns>.dead (IW_NAMESPACE):\n"
    "  list                 table of dead letters (--json: one object per line)\n"
    "  stats                counts by error code and routing key, oldest and newest\n"
    "  show ID              every header and the body of one dead letter\n"
    "  replay ID...|--all   republish to <ns>.requests with fresh attempts, remove after confirm\n"
    "  export FILE          JSON lines of the selected dead letters\n"
    "  purge ...  --yes     remove the selected dead letters (exported first)\n"
    "\n"
    "Reading never reorders, drops or consumes the messages a command does not act on;\n"
    "one dlq command at a time per namespace. Settings: the worker's (IW_AMQP_URL,\n"
    "IW_NAMESPACE, IW_MAX_MESSAGE_BYTES...). Exit codes: 0 ok, 2 usage or configuration\n"
    "error, 1 runtime failure.\n";

static void strlist_free(strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

/* Appends each comma-separated item of s (empty items are an error). */
static int strlist_add(strlist *l, const char *s, int split)
{
    const char *p = s;

    do {
        const char *comma = split ? strchr(p, ',') : NULL;
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        char **v;
        if (len == 0)
            return -1;
        if (!(v = realloc(l->v, (l->n + 1) * sizeof *v)) || !(v[l->n] = strndup(p, len))) {
            if (v)
                l->v = v;
            return -1;
        }
        l->v = v;
        l->n++;
        p = comma ? comma + 1 : NULL;
    } while (p);
    return 0;
}

static int usage_error(const char *cmd, const char *fmt, const char *arg)
{
    fprintf(stderr, "integration-worker dlq%s%s: ", cmd ? " " : "", cmd ? cmd : "");
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    return 2;
}

/* Parses argv (what follows "dlq"); 0 ok, 1 help printed, 2 usage error. */
static int parse_opts(int argc, char **argv, dlq_opts *o)
{
    const char *cmd;
    int positional_only = 0;
    iw_error err = {0};

    o->older_ms = o->newer_ms = o->limit = -1;
    if (argc < 1) {
        fputs(dlq_usage, stderr);
        return 2;
    }
    if (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h") || !strcmp(argv[0], "help")) {
        fputs(dlq_usage, stdout);
        return 1;
    }
    o->cmd = -1;
    for (int c = 0; c < C_COUNT; c++)
        if (!strcmp(argv[0], cmd_names[c]))
            o->cmd = c;
    if (o->cmd < 0)
        return usage_error(NULL, "unknown command '%s' (see dlq --help)", argv[0]);
    cmd = cmd_names[o->cmd];
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(cmd_help[o->cmd], stdout);
            if (opt_defs[O_CODE].cmds & B(o->cmd))
                fputs(filters_help, stdout);
            return 1;
        } else if (!strcmp(argv[i], "--")) {
            break;
        }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = NULL;
        size_t k, namelen;

        if (positional_only || a[0] != '-' || !strcmp(a, "-")) {
            if (o->cmd == C_EXPORT && !o->file)
                o->file = a;
            else if (o->cmd == C_SHOW || o->cmd == C_REPLAY || o->cmd == C_PURGE) {
                if (o->cmd == C_SHOW && o->ids.n)
                    return usage_error(cmd, "one ID only (got '%s' too)", a);
                if (!*a || strlist_add(&o->ids, a, 0))
                    return usage_error(cmd, "bad ID '%s'", a);
            } else
                return usage_error(cmd, "unexpected argument '%s'", a);
            continue;
        }
        if (!strcmp(a, "--")) {
            positional_only = 1;
            continue;
        }
        namelen = strcspn(a, "=");
        for (k = 0; k < sizeof opt_defs / sizeof opt_defs[0]; k++)
            if (strlen(opt_defs[k].name) == namelen && !strncmp(a, opt_defs[k].name, namelen))
                break;
        if (k == sizeof opt_defs / sizeof opt_defs[0] || !(opt_defs[k].cmds & B(o->cmd)))
            return usage_error(cmd, "unknown option '%s' (see --help)", a);
        if (opt_defs[k].has_arg) {
            if (a[namelen] == '=')
                val = a + namelen + 1;
            else if (i + 1 < argc)
                val = argv[++i];
            else
                return usage_error(cmd, "%s needs a value", opt_defs[k].name);
        } else if (a[namelen] == '=') {
            return usage_error(cmd, "%s takes no value", opt_defs[k].name);
        }
        switch (k) {
        case O_JSON:
            o->json = 1;
            break;
        case O_NEWEST:
            o->order = ORDER_NEWEST;
            break;
        case O_OLDEST:
            o->order = ORDER_OLDEST;
            break;
        case O_CODE:
            if (strlist_add(&o->codes, val, 1))
                return usage_error(cmd, "--code: bad list '%s'", val);
            break;
        case O_KEY:
            if (!*val || strlist_add(&o->keys, val, 0))
                return usage_error(cmd, "--routing-key: bad pattern '%s'", val);
            break;
        case O_JOB:
            if (!*val || strlist_add(&o->jobs, val, 0))
                return usage_error(cmd, "--job: bad jobId '%s'", val);
            break;
        case O_OLDER:
        case O_NEWER:
            if (parse_duration_ms(val, k == O_OLDER ? &o->older_ms : &o->newer_ms, &err) != IW_OK)
                return usage_error(cmd,
                                   k == O_OLDER ? "--older-than: '%s' is not a duration"
                                                : "--newer-than: '%s' is not a duration",
                                   val);
            break;
        case O_LIMIT:
            if (parse_long(val, 1, 1000000000L, &o->limit, &err) != IW_OK)
                return usage_error(cmd, "--limit: '%s' is not a positive integer", val);
            break;
        case O_ALL:
            o->all = 1;
            break;
        case O_DRY:
            o->dry_run = 1;
            break;
        case O_YES:
            o->yes = 1;
            break;
        case O_NOEXPORT:
            o->no_export = 1;
            break;
        case O_EXPORTFILE:
            if (!*val)
                return usage_error(cmd, "--export-file: empty file name%s", "");
            o->file = val;
            break;
        }
    }
    if (o->cmd == C_SHOW && !o->ids.n)
        return usage_error(cmd, "needs the ID of a dead letter (see dlq list)%s", "");
    if (o->cmd == C_EXPORT && !o->file)
        return usage_error(cmd, "needs a FILE (\"-\" for stdout)%s", "");
    if (o->cmd == C_REPLAY || o->cmd == C_PURGE) {
        int filtered = o->codes.n || o->keys.n || o->jobs.n || o->older_ms >= 0 ||
                       o->newer_ms >= 0 || o->limit >= 0;
        if (!o->ids.n && !filtered && !o->all)
            return usage_error(cmd, "needs IDs, a filter or --all (see --help)%s", "");
    }
    if (o->cmd == C_PURGE && o->no_export && o->file)
        return usage_error(cmd, "--no-export and --export-file exclude each other%s", "");
    return 0;
}

/* ---- small pure helpers -------------------------------------------------- */

static int is_utf8(const void *b, size_t len)
{
    json_t *probe = json_stringn(b, len);
    int ok = probe != NULL;
    json_decref(probe);
    return ok;
}

/* Writes s to f with every control character (C0, DEL, C1) escaped, so that
 * no byte of a message can drive the terminal; keep_nl keeps newlines/tabs. */
static void put_safe(FILE *f, const char *s, int keep_nl)
{
    const unsigned char *p = (const unsigned char *)s;

    for (; *p; p++) {
        if ((*p == '\n' || *p == '\t') && keep_nl)
            fputc(*p, f);
        else if (*p < 0x20 || *p == 0x7f)
            fprintf(f, "\\x%02x", *p);
        else if (*p == 0xC2 && p[1] >= 0x80 && p[1] <= 0x9F)
            fprintf(f, "\\u%04x", p[1]), p++;
        else
            fputc(*p, f);
    }
}

/* A table cell: s escaped like put_safe, cut to `width` characters (with an
 * ellipsis) and padded with spaces; pad=0 leaves out the padding. */
static void put_cell(FILE *f, const char *s, int width, int pad)
{
    const unsigned char *p = (const unsigned char *)(s ? s : "-");
    char esc[8];
    int used = 0;

    for (; *p && used < width; p++) {
        int w;
        if (*p < 0x20 || *p == 0x7f) {
            w = snprintf(esc, sizeof esc, "\\x%02x", *p);
        } else if (*p == 0xC2 && p[1] >= 0x80 && p[1] <= 0x9F) {
            w = snprintf(esc, sizeof esc, "\\u%04x", p[1]);
            p++;
        } else {
            /* one character: its lead byte and continuation bytes */
            size_t clen = 1;
            while (p[clen] && (p[clen] & 0xC0) == 0x80)
                clen++;
            const unsigned char *next = p + clen;
            int last = used + 1 == width && *next;
            if (last) {
                fputs("\xe2\x80\xa6", f); /* U+2026 */
                used++;
                break;
            }
            fwrite(p, 1, clen, f);
            p += clen - 1;
            used++;
            continue;
        }
        if (used + w > width || (used + w == width && p[1])) {
            fputs("\xe2\x80\xa6", f);
            used++;
            break;
        }
        fputs(esc, f);
        used += w;
    }
    if (*p && used < width) {
        fputs("\xe2\x80\xa6", f);
        used++;
    }
    while (pad && used++ < width)
        fputc(' ', f);
}

/* AMQP topic matching: words split by '.', '*' one word, '#' zero or more. */
static int topic_match(const char *pat, const char *key)
{
    if (!*pat)
        return !*key;
    if (pat[0] == '#' && (pat[1] == '.' || !pat[1])) {
        const char *rest = pat[1] ? pat + 2 : pat + 1;
        if (!*rest)
            return 1;
        for (const char *k = key;; k++) {
            if ((k == key || k[-1] == '.') && topic_match(rest, k))
                return 1;
            if (!*k)
                return 0;
        }
    }
    size_t plen = strcspn(pat, "."), klen = strcspn(key, ".");
    if (!(plen == 1 && pat[0] == '*') && (plen != klen || strncmp(pat, key, plen) != 0))
        return 0;
    if (!pat[plen] || !key[klen])
        return !pat[plen] && !key[klen];
    return topic_match(pat + plen + 1, key + klen + 1);
}

/* "2026-11-30T21:22:04.123Z" (or without fraction / with +00:00) -> wall ms. */
static long long parse_iso_ms(const char *s)
{
    struct tm tm = {0};
    int y, mo, d, h, mi, sec, n = 0;
    long long ms = 0;

    if (!s || sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &sec, &n) != 6)
        return -1;
    s += n;
    if (*s == '.') {
        int digits = 0;
        for (s++; isdigit((unsigned char)*s); s++)
            if (digits++ < 3)
                ms = ms * 10 + (*s - '0');
        while (digits++ < 3)
            ms *= 10;
    }
    if (strcmp(s, "Z") && strcmp(s, "+00:00"))
        return -1;
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = sec;
    return (long long)timegm(&tm) * 1000 + ms;
}

static void format_age(long long ms, char *buf, size_t len)
{
    long long s = ms / 1000;
    if (ms < 0)
        snprintf(buf, len, "-");
    else if (s < 60)
        snprintf(buf, len, "%llds", s);
    else if (s < 3600)
        snprintf(buf, len, "%lldm%02llds", s / 60, s % 60);
    else if (s < 86400)
        snprintf(buf, len, "%lldh%02lldm", s / 3600, s / 60 % 60);
    else
        snprintf(buf, len, "%lldd%02lldh", s / 86400, s / 3600 % 24);
}

static json_t *time_json(long long ms)
{
    char ts[40];
    if (ms < 0)
        return json_null();
    format_timestamp(ms, ts, sizeof ts);
    return json_string(ts);
}

/* ---- AMQP fields -> JSON (for show and export) -------------------------- */

static char *base64(const void *b, size_t len)
{
    char *out;
    if (len > (size_t)INT32_MAX / 2 || !(out = malloc(4 * ((len + 2) / 3) + 1)))
        return NULL;
    EVP_EncodeBlock((unsigned char *)out, b, (int)len);
    return out;
}

static json_t *bytes_json(amqp_bytes_t b)
{
    json_t *s = json_stringn(b.bytes, b.len);
    char *enc;
    if (s)
        return s;
    enc = base64(b.bytes, b.len);
    s = json_pack("{s:s?}", "base64", enc);
    free(enc);
    return s;
}

static json_t *table_json(const amqp_table_t *t)
{
    return amqp_table_to_json_with(t, bytes_json);
}

static json_t *props_json(const amqp_basic_properties_t *p)
{
    json_t *o = json_object();
    static const struct {
        amqp_flags_t flag;
        const char *name;
        size_t off;
    } strs[] = {
        {AMQP_BASIC_CONTENT_TYPE_FLAG, "content_type",
         offsetof(amqp_basic_properties_t, content_type)},
        {AMQP_BASIC_CONTENT_ENCODING_FLAG, "content_encoding",
         offsetof(amqp_basic_properties_t, content_encoding)},
        {AMQP_BASIC_CORRELATION_ID_FLAG, "correlation_id",
         offsetof(amqp_basic_properties_t, correlation_id)},
        {AMQP_BASIC_REPLY_TO_FLAG, "reply_to", offsetof(amqp_basic_properties_t, reply_to)},
        {AMQP_BASIC_EXPIRATION_FLAG, "expiration", offsetof(amqp_basic_properties_t, expiration)},
        {AMQP_BASIC_MESSAGE_ID_FLAG, "message_id", offsetof(amqp_basic_properties_t, message_id)},
        {AMQP_BASIC_TYPE_FLAG, "type", offsetof(amqp_basic_properties_t, type)},
        {AMQP_BASIC_USER_ID_FLAG, "user_id", offsetof(amqp_basic_properties_t, user_id)},
        {AMQP_BASIC_APP_ID_FLAG, "app_id", offsetof(amqp_basic_properties_t, app_id)},
    };
    for (size_t i = 0; o && i < sizeof strs / sizeof strs[0]; i++)
        if (p->_flags & strs[i].flag)
            json_object_set_new(o, strs[i].name,
                                bytes_json(*(const amqp_bytes_t *)((const char *)p + strs[i].off)));
    if (p->_flags & AMQP_BASIC_DELIVERY_MODE_FLAG)
        json_object_set_new(o, "delivery_mode", json_integer(p->delivery_mode));
    if (p->_flags & AMQP_BASIC_PRIORITY_FLAG)
        json_object_set_new(o, "priority", json_integer(p->priority));
    if (p->_flags & AMQP_BASIC_TIMESTAMP_FLAG)
        json_object_set_new(o, "timestamp", json_integer((json_int_t)p->timestamp));
    return o;
}

/* ---- one dead letter ----------------------------------------------------- */

typedef struct dl_info {
    char id[40];
    int id_derived;
    char *code;
    char *message;
    char *routing_key; /* the original routing key: where replay sends it */
    char *queue;       /* x-original-queue, else the x-death queue */
    char *reason;      /* the first x-death entry's reason */
    char *job_id;
    long long failed_ms; /* -1 unknown */
    long http;           /* -1 none */
    long attempts;       /* -1 none */
    size_t size;
    size_t pos; /* 0-based position in the read */
} dl_info;

static void info_clear(dl_info *i)
{
    free(i->code);
    free(i->message);
    free(i->routing_key);
    free(i->queue);
    free(i->reason);
    free(i->job_id);
    memset(i, 0, sizeof *i);
}

static const amqp_field_value_t *table_get(const amqp_table_t *t, const char *key)
{
    size_t klen = strlen(key);
    for (int i = 0; t && i < t->num_entries; i++)
        if (t->entries[i].key.len == klen && !memcmp(t->entries[i].key.bytes, key, klen))
            return &t->entries[i].value;
    return NULL;
}

static const amqp_table_t *headers_of(const amqp_basic_properties_t *p)
{
    return (p->_flags & AMQP_BASIC_HEADERS_FLAG) ? &p->headers : NULL;
}

static char *field_str(const amqp_field_value_t *v, size_t cap)
{
    if (!v || (v->kind != AMQP_FIELD_KIND_UTF8 && v->kind != AMQP_FIELD_KIND_BYTES))
        return NULL;
    return amqp_clean_str(v->value.bytes.bytes, v->value.bytes.len, cap);
}

static int field_int(const amqp_field_value_t *v, long long *out)
{
    if (!v)
        return 0;
    switch (v->kind) {
    case AMQP_FIELD_KIND_I8:
        *out = v->value.i8;
        return 1;
    case AMQP_FIELD_KIND_U8:
        *out = v->value.u8;
        return 1;
    case AMQP_FIELD_KIND_I16:
        *out = v->value.i16;
        return 1;
    case AMQP_FIELD_KIND_U16:
        *out = v->value.u16;
        return 1;
    case AMQP_FIELD_KIND_I32:
        *out = v->value.i32;
        return 1;
    case AMQP_FIELD_KIND_U32:
        *out = v->value.u32;
        return 1;
    case AMQP_FIELD_KIND_I64:
        *out = v->value.i64;
        return 1;
    case AMQP_FIELD_KIND_U64:
    case AMQP_FIELD_KIND_TIMESTAMP:
        *out = v->value.u64 > (uint64_t)INT64_MAX ? INT64_MAX : (long long)v->value.u64;
        return 1;
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES: {
        /* a decimal string, as some tools (amqp-publish -H) send numbers */
        char buf[24], *end;
        if (v->value.bytes.len == 0 || v->value.bytes.len >= sizeof buf)
            return 0;
        memcpy(buf, v->value.bytes.bytes, v->value.bytes.len);
        buf[v->value.bytes.len] = '\0';
        errno = 0;
        *out = strtoll(buf, &end, 10);
        return !errno && *end == '\0' && isdigit((unsigned char)buf[0]);
    }
    default:
        return 0;
    }
}

/* The first x-death entry (the broker puts the latest death first). */
static const amqp_table_t *first_death(const amqp_table_t *h)
{
    const amqp_field_value_t *v = table_get(h, "x-death");
    if (!v || v->kind != AMQP_FIELD_KIND_ARRAY || v->value.array.num_entries < 1 ||
        v->value.array.entries[0].kind != AMQP_FIELD_KIND_TABLE)
        return NULL;
    return &v->value.array.entries[0].value.table;
}

static int is_worker_id(const amqp_basic_properties_t *p)
{
    if (!(p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) || p->message_id.len != 35 ||
        memcmp(p->message_id.bytes, "dl-", 3) != 0)
        return 0;
    for (size_t i = 3; i < 35; i++) {
        char c = ((const char *)p->message_id.bytes)[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return 0;
    }
    return 1;
}

/* Fills `i` from a delivery; IW_ERR_NOMEM only. */
static int info_from(dl_info *i, const amqp_message_t *m, amqp_bytes_t delivery_key,
                     long max_message_bytes)
{
    const amqp_basic_properties_t *p = &m->properties;
    const amqp_table_t *h = headers_of(p), *death = first_death(h);
    const amqp_field_value_t *v;
    long long n;
    char death_time[32] = "";
    char *failed_at = field_str(table_get(h, "x-failed-at"), 64);
    int rc = IW_ERR_NOMEM;

    i->http = i->attempts = -1;
    i->failed_ms = -1;
    i->size = m->body.len;
    i->message = field_str(table_get(h, "x-error-message"), FIELD_CAP);
    if (field_int(table_get(h, "x-http-status"), &n))
        i->http = (long)n;
    if (field_int(table_get(h, "x-attempts"), &n))
        i->attempts = (long)n;
    i->queue = field_str(table_get(h, "x-original-queue"), FIELD_CAP);
    if (!i->queue && death)
        i->queue = field_str(table_get(death, "queue"), FIELD_CAP);
    if (death) {
        i->reason = field_str(table_get(death, "reason"), 64);
        if (field_int(table_get(death, "time"), &n)) {
            snprintf(death_time, sizeof death_time, "%lld", n);
            i->failed_ms = n * 1000;
        }
    }
    if (failed_at && parse_iso_ms(failed_at) >= 0)
        i->failed_ms = parse_iso_ms(failed_at);

    /* the original routing key: header, else the key it was dead-lettered
     * with, else the x-death entry's first routing key */
    i->routing_key = field_str(table_get(h, "x-original-routing-key"), 255);
    if (!i->routing_key && delivery_key.len)
        i->routing_key = amqp_clean_str(delivery_key.bytes, delivery_key.len, 255);
    if (!i->routing_key && death && (v = table_get(death, "routing-keys")) &&
        v->kind == AMQP_FIELD_KIND_ARRAY && v->value.array.num_entries > 0)
        i->routing_key = field_str(&v->value.array.entries[0], 255);
    if (!i->routing_key)
        i->routing_key = strdup("");

    i->code = field_str(table_get(h, "x-error-code"), 128);
    if (!i->code) {
        const char *c = "UNKNOWN";
        if (i->reason && !strcmp(i->reason, "delivery_limit"))
            c = "DELIVERY_LIMIT";
        else if (i->reason && !strcmp(i->reason, "rejected"))
            c = m->body.len > (size_t)max_message_bytes ? "MESSAGE_TOO_LARGE" : "REJECTED";
        else if (i->reason && !strcmp(i->reason, "expired"))
            c = "EXPIRED";
        else if (i->reason && !strcmp(i->reason, "maxlen"))
            c = "MAXLEN";
        i->code = strdup(c);
    }

    if (m->body.len <= JOB_PARSE_CAP) {
        json_t *body = json_loadb(m->body.bytes, m->body.len, 0, NULL);
        json_t *job = json_object_get(body, "jobId");
        if (json_is_string(job))
            i->job_id = amqp_clean_str(json_string_value(job), json_string_length(job), JOB_CAP);
        json_decref(body);
    }

    if (is_worker_id(p)) {
        memcpy(i->id, p->message_id.bytes, 35);
        i->id[35] = '\0';
    } else {
        static const char hex[] = "0123456789abcdef";
        const char *t = death_time[0] ? death_time : failed_at ? failed_at : "";
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int mdlen = 0;
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) &&
                 EVP_DigestUpdate(ctx, "iw-dlq-id-v1", 13) &&
                 EVP_DigestUpdate(ctx, i->routing_key ? i->routing_key : "",
                                  strlen(i->routing_key ? i->routing_key : "") + 1) &&
                 EVP_DigestUpdate(ctx, t, strlen(t) + 1) &&
                 EVP_DigestUpdate(ctx, m->body.bytes, m->body.len) &&
                 EVP_DigestFinal_ex(ctx, md, &mdlen);
        EVP_MD_CTX_free(ctx);
        if (!ok || mdlen < 16)
            goto out;
        memcpy(i->id, "dx-", 3);
        for (int k = 0; k < 16; k++) {
            i->id[3 + 2 * k] = hex[md[k] >> 4];
            i->id[4 + 2 * k] = hex[md[k] & 15];
        }
        i->id[35] = '\0';
        i->id_derived = 1;
    }
    if (i->code && i->routing_key)
        rc = IW_OK;
out:
    free(failed_at);
    return rc;
}

static json_t *info_json(const dl_info *i, long long now_ms)
{
    return json_pack(
        "{s:s, s:o, s:o, s:s, s:o, s:o, s:o, s:s, s:o, s:o, s:o, s:I, s:s}", "id", i->id,
        "failed_at", time_json(i->failed_ms), "age_s",
        i->failed_ms >= 0 ? json_integer((now_ms - i->failed_ms) / 1000) : json_null(),
        "error_code", i->code, "error_message", i->message ? json_string(i->message) : json_null(),
        "http_status", i->http >= 0 ? json_integer(i->http) : json_null(), "attempts",
        i->attempts >= 0 ? json_integer(i->attempts) : json_null(), "routing_key", i->routing_key,
        "original_queue", i->queue ? json_string(i->queue) : json_null(), "dead_letter_reason",
        i->reason ? json_string(i->reason) : json_null(), "job_id",
        i->job_id ? json_string(i->job_id) : json_null(), "size", (json_int_t)i->size, "id_source",
        i->id_derived ? "content" : "message_id");
}

static void print_json_line(FILE *f, json_t *j)
{
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    if (s) {
        fputs(s, f);
        fputc('\n', f);
    }
    free(s);
    json_decref(j);
}

static void print_table_head(FILE *f)
{
    fprintf(f, "%-35s  %-7s  %-26s  %-4s  %-3s  %-24s  %-24s  %s\n", "ID", "AGE", "CODE", "HTTP",
            "ATT", "ROUTING KEY", "JOB ID", "SIZE");
}

static void print_table_row(FILE *f, const dl_info *i, long long now_ms)
{
    char age[32], num[32];

    fprintf(f, "%-35s  ", i->id);
    format_age(i->failed_ms >= 0 ? now_ms - i->failed_ms : -1, age, sizeof age);
    fprintf(f, "%-7s  ", age);
    put_cell(f, i->code, 26, 1);
    fputs("  ", f);
    snprintf(num, sizeof num, "%ld", i->http);
    fprintf(f, "%-4s  ", i->http >= 0 ? num : "-");
    snprintf(num, sizeof num, "%ld", i->attempts);
    fprintf(f, "%-3s  ", i->attempts >= 0 ? num : "-");
    put_cell(f, i->routing_key, 24, 1);
    fputs("  ", f);
    put_cell(f, i->job_id, 24, 1);
    fprintf(f, "  %zu\n", i->size);
}

/* ---- the session: one connection, one channel ---------------------------- */

typedef struct pending {
    uint64_t seq;
    uint64_t tag; /* the dead letter's delivery tag */
    char *routing_key;
    char id[40];
    int returned;
} pending;

/* How often an id was read and acked in the first pass, and read in a
 * verification pass (see settle()). */
typedef struct idcount {
    char id[40]; /* "" when the slot is free */
    unsigned seen, acked, vseen;
} idcount;

typedef struct group {
    char *key;
    size_t count;
    long long oldest, newest;
} group;

typedef struct dlq {
    const dlq_opts *o;
    iw_config *cfg;
    amqp_connection_state_t conn;
    amqp_channel_t ch; /* the channel of the current pass */
    int verify;        /* a verification pass (see settle()) */
    char queue[300], requests[300], lock[300];
    long long now_ms, started_ms, last_progress_ms;
    uint32_t depth, to_read, nread;
    int stop, failed;
    size_t matched, acted;
    /* list */
    dl_info *rows;
    size_t n_rows, cap_rows;
    /* stats */
    group *by_code, *by_key;
    size_t n_code, n_key;
    long long oldest, newest;
    /* show, replay/purge by id */
    int *id_seen;
    /* replay */
    pending *pend;
    size_t pend_head, pend_n, pend_cap;
    uint64_t next_seq;
    size_t unroutable, refused;
    /* export, purge */
    FILE *out;
    char *out_path;
    uint64_t *tags;
    char (*tag_ids)[40];
    size_t n_tags, cap_tags;
    /* settle() */
    idcount *idc;
    size_t idc_cap;
    size_t reacked;
    /* test hook */
    char kill_phase[32];
    long kill_after;
    long kill_count;
} dlq;

/* A test-only hook: IWTEST_DLQ_KILL_AT=PHASE:N makes the process SIGKILL
 * itself at the Nth event of PHASE (read, published, confirmed, acked,
 * exported), so that tests can stop it at each point of a replay or purge. */
static void test_point(dlq *q, const char *phase)
{
    if (q->kill_after > 0 && !strcmp(q->kill_phase, phase) && ++q->kill_count == q->kill_after) {
        fflush(stdout);
        fflush(stderr);
        raise(SIGKILL);
    }
}

static void progress(dlq *q, int final)
{
    long long now = clock_mono_ms();
    if (!final && now - q->last_progress_ms < PROGRESS_MS)
        return;
    if (final && now - q->started_ms < PROGRESS_MS && q->o->cmd != C_REPLAY && q->o->cmd != C_PURGE)
        return;
    q->last_progress_ms = now;
    if (q->verify)
        fprintf(stderr, "integration-worker dlq %s: %zu selected", cmd_names[q->o->cmd],
                q->matched);
    else
        fprintf(stderr, "integration-worker dlq %s: read %u of %u, %zu selected",
                cmd_names[q->o->cmd], q->nread, q->to_read, q->matched);
    if (q->o->cmd == C_REPLAY && !q->o->dry_run)
        fprintf(stderr, ", %zu replayed, %zu waiting for confirms", q->acted, q->pend_n);
    if (q->o->cmd == C_PURGE && q->o->yes)
        fprintf(stderr, ", %zu removed", q->acted);
    fputc('\n', stderr);
}

static int reply_error(amqp_rpc_reply_t r, const char *what, iw_error *err)
{
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        return IW_OK;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        return iw_error_set(err, IW_ERR_AMQP, "%s: %s", what, amqp_error_string2(r.library_error));
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            amqp_channel_close_t *m = r.reply.decoded;
            return iw_error_set(err, m->reply_code == 404 ? IW_ERR_NOT_FOUND : IW_ERR_AMQP,
                                "%s: %d %.*s", what, m->reply_code, (int)m->reply_text.len,
                                (char *)m->reply_text.bytes);
        }
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            amqp_connection_close_t *m = r.reply.decoded;
            return iw_error_set(err, IW_ERR_AMQP, "%s: connection closed: %d %.*s", what,
                                m->reply_code, (int)m->reply_text.len, (char *)m->reply_text.bytes);
        }
        return iw_error_set(err, IW_ERR_AMQP, "%s: server error", what);
    default:
        return iw_error_set(err, IW_ERR_AMQP, "%s: no reply", what);
    }
}

/* Connects to the first node of IW_AMQP_URL (a comma list) that answers. */
static int session_connect(dlq *q, iw_error *err)
{
    char *urls = strdup(q->cfg->amqp_url), *rest = urls, *url;
    int rc = iw_error_set(err, IW_ERR_CONFIG, "IW_AMQP_URL: no URL");

    if (!urls)
        return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
    while ((url = strsep(&rest, ",")) != NULL) {
        struct amqp_connection_info ci;
        amqp_socket_t *sock;
        struct timeval tv = {5, 0};
        amqp_table_entry_t prop;
        amqp_table_t props = {1, &prop};
        char name[64];

        while (*url == ' ')
            url++;
        amqp_default_connection_info(&ci);
        if (amqp_parse_url(url, &ci) != AMQP_STATUS_OK) {
            rc = iw_error_set(err, IW_ERR_CONFIG, "IW_AMQP_URL: cannot parse the URL");
            break;
        }
        q->conn = amqp_new_connection();
        sock = ci.ssl ? amqp_ssl_socket_new(q->conn) : amqp_tcp_socket_new(q->conn);
        if (!sock || amqp_socket_open_noblock(sock, ci.host, ci.port, &tv) != AMQP_STATUS_OK) {
            rc = iw_error_set(err, IW_ERR_AMQP, "cannot connect to %s:%d", ci.host, ci.port);
            amqp_destroy_connection(q->conn);
            q->conn = NULL;
            continue;
        }
        tv.tv_sec = 30;
        amqp_set_rpc_timeout(q->conn, &tv);
        snprintf(name, sizeof name, "integration-worker dlq %s pid %ld", cmd_names[q->o->cmd],
                 (long)getpid());
        prop.key = amqp_cstring_bytes("connection_name");
        prop.value.kind = AMQP_FIELD_KIND_UTF8;
        prop.value.value.bytes = amqp_cstring_bytes(name);
        rc = reply_error(amqp_login_with_properties(q->conn, ci.vhost, 0, FRAME_MAX, HEARTBEAT_S,
                                                    &props, AMQP_SASL_METHOD_PLAIN, ci.user,
                                                    ci.password),
                         "AMQP login", err);
        if (rc == IW_OK) {
            amqp_channel_open(q->conn, q->ch);
            rc = reply_error(amqp_get_rpc_reply(q->conn), "channel.open", err);
        }
        if (rc == IW_OK)
            break;
        amqp_destroy_connection(q->conn);
        q->conn = NULL;
    }
    free(urls);
    return rc;
}

/* Takes the namespace's dlq lock: an exclusive queue lives as long as this
 * connection (even through SIGKILL), so a second dlq command (whose consumer
 * would interleave with ours and reorder the queue) fails instead. */
static int session_lock(dlq *q, iw_error *err)
{
    amqp_table_entry_t e = {amqp_cstring_bytes("x-queue-type"),
                            {AMQP_FIELD_KIND_UTF8, {.bytes = amqp_cstring_bytes("classic")}}};
    amqp_table_t args = {1, &e};
    amqp_rpc_reply_t r;

    amqp_queue_declare(q->conn, q->ch, amqp_cstring_bytes(q->lock), 0, 0, 1, 1, args);
    r = amqp_get_rpc_reply(q->conn);
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD &&
        ((amqp_channel_close_t *)r.reply.decoded)->reply_code == 405)
        return iw_error_set(err, IW_ERR_AMQP,
                            "another dlq command is working on %s (it holds the queue %s)",
                            q->queue, q->lock);
    return reply_error(r, "lock queue.declare", err);
}

static int add_group(group **gs, size_t *n, const char *key, long long t)
{
    size_t k;
    for (k = 0; k < *n; k++)
        if (!strcmp((*gs)[k].key, key))
            break;
    if (k == *n) {
        group *g = realloc(*gs, (*n + 1) * sizeof *g);
        if (!g)
            return IW_ERR_NOMEM;
        *gs = g;
        if (!(g[k].key = strdup(key)))
            return IW_ERR_NOMEM;
        g[k].count = 0;
        g[k].oldest = g[k].newest = -1;
        (*n)++;
    }
    (*gs)[k].count++;
    if (t >= 0 && ((*gs)[k].oldest < 0 || t < (*gs)[k].oldest))
        (*gs)[k].oldest = t;
    if (t >= 0 && t > (*gs)[k].newest)
        (*gs)[k].newest = t;
    return IW_OK;
}

static int matches(dlq *q, const dl_info *i)
{
    const dlq_opts *o = q->o;
    int ok = 1;

    if (o->codes.n) {
        ok = 0;
        for (size_t k = 0; k < o->codes.n; k++)
            ok |= !strcasecmp(o->codes.v[k], i->code);
    }
    if (ok && o->keys.n) {
        ok = 0;
        for (size_t k = 0; k < o->keys.n; k++)
            ok |= topic_match(o->keys.v[k], i->routing_key);
    }
    if (ok && o->jobs.n) {
        ok = 0;
        for (size_t k = 0; k < o->jobs.n && i->job_id; k++)
            ok |= !strcmp(o->jobs.v[k], i->job_id);
    }
    if (ok && o->older_ms >= 0)
        ok = i->failed_ms >= 0 && q->now_ms - i->failed_ms >= o->older_ms;
    if (ok && o->newer_ms >= 0)
        ok = i->failed_ms >= 0 && q->now_ms - i->failed_ms < o->newer_ms;
    if (ok && o->ids.n) {
        int any = 0;
        for (size_t k = 0; k < o->ids.n; k++)
            if (!strcmp(o->ids.v[k], i->id)) {
                any = 1;
                q->id_seen[k] = 1;
            }
        ok = any;
    }
    return ok;
}

/* The id's slot in the id table (created when `create`); NULL when absent
 * or out of memory. Open addressing over a power-of-two table. */
static idcount *idc_get(dlq *q, const char *id, int create)
{
    size_t h = 5381;

    if (!q->idc) {
        size_t cap = 64;
        if (!create)
            return NULL;
        while (cap < 2 * (size_t)q->to_read + 2)
            cap *= 2;
        if (!(q->idc = calloc(cap, sizeof *q->idc)))
            return NULL;
        q->idc_cap = cap;
    }
    for (const char *p = id; *p; p++)
        h = h * 33 + (unsigned char)*p;
    for (size_t k = 0; k < q->idc_cap; k++) {
        idcount *e = &q->idc[(h + k) & (q->idc_cap - 1)];
        if (!strcmp(e->id, id))
            return e;
        if (!e->id[0]) {
            if (!create)
                return NULL;
            snprintf(e->id, sizeof e->id, "%s", id);
            return e;
        }
    }
    return NULL;
}

static void note_acked(dlq *q, const char *id)
{
    idcount *e = idc_get(q, id, 0);
    if (e)
        e->acked++;
}

/* ---- replay ------------------------------------------------------------- */

static int strip_header(const char *k, size_t len)
{
    static const char *const names[] = {"x-attempts",   "x-due-at",        "x-first-seen",
                                        "x-last-error", "x-http-status",   "x-failed-at",
                                        "x-death",      "x-delivery-count"};
    static const char *const prefixes[] = {"iw-", "x-error-", "x-original-", "x-first-death-",
                                           "x-last-death-"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strlen(names[i]) == len && !strncasecmp(k, names[i], len))
            return 1;
    for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++)
        if (len >= strlen(prefixes[i]) && !strncasecmp(k, prefixes[i], strlen(prefixes[i])))
            return 1;
    return 0;
}

/* Republishes one dead letter (mandatory, persistent) with the upstream's
 * properties and headers minus ours; the entries point into m's memory. */
static int republish(dlq *q, const amqp_message_t *m, const dl_info *i, uint64_t tag)
{
    const amqp_basic_properties_t *src = &m->properties;
    amqp_basic_properties_t p;
    amqp_table_entry_t *entries = NULL;
    int rc = IW_ERR_NOMEM;

    /* copy what the upstream set; leave out what the broker or we added: the
     * user_id would fail the publish unless it is our login, the expiration
     * was the delay tiers', a "dl-" message_id names the dead letter */
    memset(&p, 0, sizeof p);
    p._flags =
        src->_flags & (AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_CONTENT_ENCODING_FLAG |
                       AMQP_BASIC_CORRELATION_ID_FLAG | AMQP_BASIC_REPLY_TO_FLAG |
                       AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_PRIORITY_FLAG |
                       AMQP_BASIC_TIMESTAMP_FLAG | AMQP_BASIC_TYPE_FLAG | AMQP_BASIC_APP_ID_FLAG);
    p.content_type = src->content_type;
    p.content_encoding = src->content_encoding;
    p.correlation_id = src->correlation_id;
    p.reply_to = src->reply_to;
    p.message_id = src->message_id;
    p.priority = src->priority;
    p.timestamp = src->timestamp;
    p.type = src->type;
    p.app_id = src->app_id;
    if (is_worker_id(src)) {
        /* the dead letter's own id; the upstream's, if the worker kept it */
        const amqp_field_value_t *orig = table_get(headers_of(src), "x-original-message-id");
        p._flags &= ~(amqp_flags_t)AMQP_BASIC_MESSAGE_ID_FLAG;
        if (orig && (orig->kind == AMQP_FIELD_KIND_UTF8 || orig->kind == AMQP_FIELD_KIND_BYTES) &&
            orig->value.bytes.len > 0 && orig->value.bytes.len <= 255) {
            p._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
            p.message_id = orig->value.bytes;
        }
    }
    p._flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
    p.delivery_mode = AMQP_DELIVERY_PERSISTENT;
    if (headers_of(src) && src->headers.num_entries > 0) {
        int n = 0;
        if (!(entries = calloc((size_t)src->headers.num_entries, sizeof *entries)))
            goto out;
        for (int k = 0; k < src->headers.num_entries; k++) {
            const amqp_table_entry_t *e = &src->headers.entries[k];
            if (!strip_header(e->key.bytes, e->key.len))
                entries[n++] = *e;
        }
        if (n > 0) {
            p._flags |= AMQP_BASIC_HEADERS_FLAG;
            p.headers.num_entries = n;
            p.headers.entries = entries;
        }
    }
    if (q->pend_n == q->pend_cap || q->pend_head + q->pend_n == q->pend_cap) {
        /* compact, then grow */
        if (q->pend_n)
            memmove(q->pend, q->pend + q->pend_head, q->pend_n * sizeof *q->pend);
        q->pend_head = 0;
        if (q->pend_n == q->pend_cap) {
            size_t cap = q->pend_cap ? q->pend_cap * 2 : 64;
            pending *np = realloc(q->pend, cap * sizeof *np);
            if (!np)
                goto out;
            q->pend = np;
            q->pend_cap = cap;
        }
    }
    pending *pe = &q->pend[q->pend_head + q->pend_n];
    if (!(pe->routing_key = strdup(i->routing_key)))
        goto out;
    pe->seq = q->next_seq;
    pe->tag = tag;
    pe->returned = 0;
    memcpy(pe->id, i->id, sizeof pe->id);
    if (amqp_basic_publish(q->conn, q->ch, amqp_cstring_bytes(q->requests),
                           amqp_cstring_bytes(i->routing_key), 1, 0, &p,
                           m->body) != AMQP_STATUS_OK) {
        free(pe->routing_key);
        rc = IW_ERR_AMQP;
        goto out;
    }
    q->next_seq++;
    q->pend_n++;
    test_point(q, "published");
    rc = IW_OK;
out:
    free(entries);
    return rc;
}

static void report(dlq *q, const char *id, const char *key, const char *result, const char *why)
{
    if (q->o->json) {
        print_json_line(stdout, json_pack("{s:s, s:s, s:s, s:s?}", "id", id, "routing_key", key,
                                          "result", result, "error", why));
        return;
    }
    fprintf(stdout, "%-9s %s  ", result, id);
    put_safe(stdout, key, 0);
    if (why)
        fprintf(stdout, "  (%s)", why);
    fputc('\n', stdout);
}

/* A confirm (ack = 1) or a refusal (ack = 0) for seq (and every earlier one
 * when multiple): ack the dead letters whose republish the broker took. */
static int on_confirm(dlq *q, uint64_t seq, int multiple, int ack)
{
    int rc = IW_OK;

    for (size_t k = 0; k < q->pend_n; k++) {
        pending *pe = &q->pend[q->pend_head + k];
        if (pe->seq > seq || pe->tag == 0 || (!multiple && pe->seq != seq))
            continue;
        test_point(q, "confirmed");
        if (!ack) {
            q->refused++;
            q->failed = 1;
            report(q, pe->id, pe->routing_key, "failed", "the broker refused the republish");
        } else if (pe->returned) {
            q->unroutable++;
            q->failed = 1;
            report(q, pe->id, pe->routing_key, "failed",
                   "unroutable: no queue is bound to this routing key");
        } else if (amqp_basic_ack(q->conn, q->ch, pe->tag, 0) != AMQP_STATUS_OK) {
            rc = IW_ERR_AMQP;
        } else {
            q->acted++;
            note_acked(q, pe->id);
            test_point(q, "acked");
            report(q, pe->id, pe->routing_key, "replayed", NULL);
        }
        free(pe->routing_key);
        pe->routing_key = NULL;
        pe->tag = 0; /* resolved */
    }
    while (q->pend_n && q->pend[q->pend_head].tag == 0) {
        q->pend_head++;
        q->pend_n--;
    }
    return rc;
}

/* basic.return: the earliest outstanding republish with this routing key
 * (returns come in publish order, and routing depends only on the key). */
static void on_return(dlq *q, amqp_bytes_t key)
{
    for (size_t k = 0; k < q->pend_n; k++) {
        pending *pe = &q->pend[q->pend_head + k];
        if (pe->tag && !pe->returned && strlen(pe->routing_key) == key.len &&
            !memcmp(pe->routing_key, key.bytes, key.len)) {
            pe->returned = 1;
            return;
        }
    }
}

/* ---- export ------------------------------------------------------------- */

static int export_line(dlq *q, const amqp_message_t *m, const dl_info *i)
{
    const amqp_table_t *h = headers_of(&m->properties);
    json_t *line =
        json_pack("{s:s, s:s, s:o, s:o}", "id", i->id, "routing_key", i->routing_key, "properties",
                  props_json(&m->properties), "headers", h ? table_json(h) : json_object());
    int rc = IW_ERR_NOMEM;
    char *s = NULL;

    if (!line)
        goto out;
    if (is_utf8(m->body.bytes, m->body.len)) {
        json_object_set_new(line, "body", json_stringn(m->body.bytes, m->body.len));
    } else {
        char *b = base64(m->body.bytes, m->body.len);
        if (!b)
            goto out;
        json_object_set_new(line, "body_base64", json_string(b));
        free(b);
    }
    if (!(s = json_dumps(line, JSON_COMPACT)))
        goto out;
    rc = fputs(s, q->out) < 0 || fputc('\n', q->out) == EOF ? IW_ERR_IO : IW_OK;
out:
    free(s);
    json_decref(line);
    return rc;
}

static int open_export(dlq *q, const char *path, iw_error *err)
{
    int fd;

    if (!strcmp(path, "-")) {
        q->out = stdout;
        return IW_OK;
    }
    /* never overwrite: an export may be the only copy of purged messages */
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 || !(q->out = fdopen(fd, "w"))) {
        if (fd >= 0)
            close(fd);
        return iw_error_set(err, errno == EEXIST ? IW_ERR_USAGE : IW_ERR_IO, "%s: %s", path,
                            strerror(errno));
    }
    q->out_path = strdup(path);
    return IW_OK;
}

/* Flushes the export and syncs it and its directory to disk. */
static int close_export(dlq *q, iw_error *err)
{
    int rc = IW_OK;

    if (!q->out)
        return IW_OK;
    if (q->out == stdout) {
        q->out = NULL;
        return fflush(stdout) == 0 ? IW_OK : iw_error_set(err, IW_ERR_IO, "stdout: write failed");
    }
    if (fflush(q->out) != 0 || fsync(fileno(q->out)) != 0)
        rc = iw_error_set(err, IW_ERR_IO, "%s: %s", q->out_path, strerror(errno));
    if (fclose(q->out) != 0 && rc == IW_OK)
        rc = iw_error_set(err, IW_ERR_IO, "%s: %s", q->out_path, strerror(errno));
    q->out = NULL;
    if (rc == IW_OK && q->out_path) {
        char *copy = strdup(q->out_path);
        int dfd = copy ? open(dirname(copy), O_RDONLY | O_DIRECTORY) : -1;
        if (dfd >= 0) {
            fsync(dfd);
            close(dfd);
        }
        free(copy);
    }
    return rc;
}

/* ---- show --------------------------------------------------------------- */

static void show_body_text(const amqp_message_t *m)
{
    const unsigned char *b = m->body.bytes;
    size_t len = m->body.len;
    json_t *j = NULL;

    if (is_utf8(b, len) && (j = json_loadb((const char *)b, len, 0, NULL)) != NULL) {
        char *s = json_dumps(j, JSON_INDENT(2) | JSON_ENCODE_ANY);
        if (s)
            put_safe(stdout, s, 1);
        fputc('\n', stdout);
        free(s);
        json_decref(j);
        return;
    }
    if (is_utf8(b, len)) {
        char *s = amqp_clean_str(b, len, len);
        fputs("(UTF-8 text, not JSON)\n", stdout);
        if (s)
            put_safe(stdout, s, 1);
        fputc('\n', stdout);
        free(s);
        return;
    }
    fputs("(not UTF-8: hex dump)\n", stdout);
    for (size_t off = 0; off < len && off < SHOW_HEX_CAP; off += 16) {
        printf("%08zx  ", off);
        for (size_t k = 0; k < 16; k++) {
            if (off + k < len)
                printf("%02x ", b[off + k]);
            else
                fputs("   ", stdout);
            if (k == 7)
                fputc(' ', stdout);
        }
        fputs(" |", stdout);
        for (size_t k = 0; k < 16 && off + k < len; k++)
            fputc(b[off + k] >= 0x20 && b[off + k] < 0x7f ? b[off + k] : '.', stdout);
        fputs("|\n", stdout);
    }
    if (len > SHOW_HEX_CAP)
        printf("... %zu more bytes (dlq export writes the whole body)\n", len - SHOW_HEX_CAP);
}

static void show(dlq *q, const amqp_message_t *m, const dl_info *i, amqp_bytes_t delivery_key)
{
    const amqp_table_t *h = headers_of(&m->properties);
    json_t *props = props_json(&m->properties), *hj = h ? table_json(h) : json_object();
    char age[32];

    if (q->o->json) {
        json_t *line = info_json(i, q->now_ms);
        json_object_set_new(line, "delivery_routing_key",
                            bytes_json((amqp_bytes_t){delivery_key.len, delivery_key.bytes}));
        json_object_set(line, "properties", props);
        json_object_set(line, "headers", hj);
        if (is_utf8(m->body.bytes, m->body.len)) {
            json_object_set_new(line, "body", json_stringn(m->body.bytes, m->body.len));
        } else {
            char *b = base64(m->body.bytes, m->body.len);
            json_object_set_new(line, "body_base64", b ? json_string(b) : json_null());
            free(b);
        }
        print_json_line(stdout, line);
        goto out;
    }
    format_age(i->failed_ms >= 0 ? q->now_ms - i->failed_ms : -1, age, sizeof age);
    printf("id:            %s (%s)\n", i->id,
           i->id_derived ? "derived from the content" : "message_id");
    printf("error code:    ");
    put_safe(stdout, i->code, 0);
    printf("\nroute:         ");
    put_safe(stdout, i->routing_key, 0);
    printf(" (replay target)\nage:           %s\nsize:          %zu bytes\n", age, i->size);
    printf("properties:\n");
    const char *k;
    json_t *v;
    json_object_foreach(props, k, v)
    {
        char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
        printf("  %-17s ", k);
        if (s)
            put_safe(stdout, s, 0);
        fputc('\n', stdout);
        free(s);
    }
    printf("headers:\n");
    json_object_foreach(hj, k, v)
    {
        char *s =
            json_dumps(v, JSON_ENCODE_ANY | (json_is_array(v) || json_is_object(v) ? JSON_INDENT(2)
                                                                                   : JSON_COMPACT));
        fputs("  ", stdout);
        put_safe(stdout, k, 0);
        fputs(": ", stdout);
        if (s)
            put_safe(stdout, s, 1);
        fputc('\n', stdout);
        free(s);
    }
    printf("body:\n");
    show_body_text(m);
out:
    json_decref(props);
    json_decref(hj);
}

/* ---- the read loop ------------------------------------------------------ */

static int push_tag(dlq *q, uint64_t tag, const char *id)
{
    if (q->n_tags == q->cap_tags) {
        size_t cap = q->cap_tags ? q->cap_tags * 2 : 256;
        uint64_t *t = realloc(q->tags, cap * sizeof *t);
        char(*ids)[40];
        if (!t)
            return IW_ERR_NOMEM;
        q->tags = t;
        if (!(ids = realloc(q->tag_ids, cap * sizeof *ids)))
            return IW_ERR_NOMEM;
        q->tag_ids = ids;
        q->cap_tags = cap;
    }
    memcpy(q->tag_ids[q->n_tags], id, sizeof q->tag_ids[0]);
    q->tags[q->n_tags++] = tag;
    return IW_OK;
}

/* What a command does with each delivery it reads. */
static int on_message(dlq *q, const amqp_message_t *m, amqp_bytes_t key, uint64_t tag,
                      iw_error *err)
{
    dl_info i = {0};
    int rc, sel;

    i.pos = q->nread - 1;
    if ((rc = info_from(&i, m, key, q->cfg->max_message_bytes)) != IW_OK) {
        iw_error_set(err, rc, "out of memory");
        goto out;
    }
    if (q->verify) {
        /* more copies of an id we acked than we left: an ack that was lost */
        idcount *e = idc_get(q, i.id, 0);
        if (e && e->acked && ++e->vseen > e->seen - e->acked) {
            if (amqp_basic_ack(q->conn, q->ch, tag, 0) != AMQP_STATUS_OK) {
                rc = iw_error_set(err, IW_ERR_AMQP, "ack failed");
                goto out;
            }
            q->reacked++;
            test_point(q, "acked");
        }
        goto out;
    }
    if ((q->o->cmd == C_REPLAY && !q->o->dry_run) || (q->o->cmd == C_PURGE && q->o->yes)) {
        idcount *e = idc_get(q, i.id, 1);
        if (!e) {
            rc = iw_error_set(err, IW_ERR_NOMEM, "out of memory");
            goto out;
        }
        e->seen++;
    }
    sel = matches(q, &i);
    if (sel && q->o->cmd != C_LIST && q->o->limit >= 0 && q->matched >= (size_t)q->o->limit)
        sel = 0;
    if (!sel)
        goto out;
    q->matched++;
    switch (q->o->cmd) {
    case C_LIST:
        if (q->n_rows == q->cap_rows) {
            size_t cap = q->cap_rows ? q->cap_rows * 2 : 256;
            dl_info *r = realloc(q->rows, cap * sizeof *r);
            if (!r) {
                rc = iw_error_set(err, IW_ERR_NOMEM, "out of memory");
                goto out;
            }
            q->rows = r;
            q->cap_rows = cap;
        }
        q->rows[q->n_rows++] = i;
        memset(&i, 0, sizeof i);
        /* in queue order the first N matches are the answer */
        if (q->o->order == ORDER_QUEUE && q->o->limit >= 0 && q->n_rows >= (size_t)q->o->limit)
            q->stop = 1;
        break;
    case C_STATS:
        if (add_group(&q->by_code, &q->n_code, i.code, i.failed_ms) != IW_OK ||
            add_group(&q->by_key, &q->n_key, i.routing_key, i.failed_ms) != IW_OK) {
            rc = iw_error_set(err, IW_ERR_NOMEM, "out of memory");
            goto out;
        }
        if (i.failed_ms >= 0 && (q->oldest < 0 || i.failed_ms < q->oldest))
            q->oldest = i.failed_ms;
        if (i.failed_ms > q->newest)
            q->newest = i.failed_ms;
        break;
    case C_SHOW:
        show(q, m, &i, key);
        q->stop = 1;
        break;
    case C_REPLAY:
        if (q->o->dry_run) {
            if (q->o->json)
                print_json_line(stdout, info_json(&i, q->now_ms));
            else {
                if (q->matched == 1)
                    print_table_head(stdout);
                print_table_row(stdout, &i, q->now_ms);
            }
        } else if ((rc = republish(q, m, &i, tag)) != IW_OK) {
            iw_error_set(err, rc, "cannot republish %s", i.id);
        }
        break;
    case C_EXPORT:
        if ((rc = export_line(q, m, &i)) != IW_OK)
            iw_error_set(err, rc, "%s: write failed", q->o->file);
        break;
    case C_PURGE:
        if (!q->o->yes) {
            if (q->o->json)
                print_json_line(stdout, info_json(&i, q->now_ms));
            else {
                if (q->matched == 1)
                    print_table_head(stdout);
                print_table_row(stdout, &i, q->now_ms);
            }
            break;
        }
        if (q->out && (rc = export_line(q, m, &i)) != IW_OK) {
            iw_error_set(err, rc, "%s: write failed", q->out_path);
            goto out;
        }
        if ((rc = push_tag(q, tag, i.id)) != IW_OK)
            iw_error_set(err, rc, "out of memory");
        break;
    }
out:
    info_clear(&i);
    return rc;
}

/* Waits for and handles one frame; IW_ERR_TIMEOUT after IDLE_TIMEOUT_MS. */
static int pump(dlq *q, iw_error *err)
{
    amqp_frame_t f;
    struct timeval tv = {IDLE_TIMEOUT_MS / 1000, 0};
    int rc;

    if (amqp_release_buffers_ok(q->conn))
        amqp_release_buffers(q->conn);
    rc = amqp_simple_wait_frame_noblock(q->conn, &f, &tv);
    if (rc == AMQP_STATUS_TIMEOUT)
        return iw_error_set(err, IW_ERR_TIMEOUT, "no answer from the broker for %d s",
                            IDLE_TIMEOUT_MS / 1000);
    if (rc != AMQP_STATUS_OK)
        return iw_error_set(err, IW_ERR_AMQP, "connection lost: %s", amqp_error_string2(rc));
    /* frames of an earlier pass's channel (queued by librabbitmq while it
     * waited for an RPC reply) and content frames of those are skipped */
    if (f.frame_type != AMQP_FRAME_METHOD || (f.channel != q->ch && f.channel != 0))
        return IW_OK;
    switch (f.payload.method.id) {
    case AMQP_BASIC_DELIVER_METHOD: {
        amqp_basic_deliver_t *d = f.payload.method.decoded;
        uint64_t tag = d->delivery_tag;
        amqp_bytes_t key = amqp_bytes_malloc_dup(d->routing_key);
        amqp_message_t m;
        amqp_rpc_reply_t r = amqp_read_message(q->conn, f.channel, &m, 0);

        if ((rc = reply_error(r, "reading a delivery", err)) != IW_OK) {
            amqp_bytes_free(key);
            return rc;
        }
        if (q->nread < q->to_read && !q->stop) {
            q->nread++;
            test_point(q, "read");
            rc = on_message(q, &m, key, tag, err);
        }
        /* deliveries past what we meant to read stay unacked: the channel's
         * close returns them behind the others, in order */
        amqp_destroy_message(&m);
        amqp_bytes_free(key);
        progress(q, 0);
        return rc;
    }
    case AMQP_BASIC_ACK_METHOD: {
        amqp_basic_ack_t *a = f.payload.method.decoded;
        if ((rc = on_confirm(q, a->delivery_tag, a->multiple, 1)) != IW_OK)
            return iw_error_set(err, rc, "cannot ack a replayed dead letter");
        return IW_OK;
    }
    case AMQP_BASIC_NACK_METHOD: {
        amqp_basic_nack_t *a = f.payload.method.decoded;
        return on_confirm(q, a->delivery_tag, a->multiple, 0);
    }
    case AMQP_BASIC_RETURN_METHOD: {
        amqp_basic_return_t *r = f.payload.method.decoded;
        amqp_bytes_t key = amqp_bytes_malloc_dup(r->routing_key);
        amqp_message_t m;
        rc = reply_error(amqp_read_message(q->conn, f.channel, &m, 0), "reading a return", err);
        if (rc == IW_OK) {
            on_return(q, key);
            amqp_destroy_message(&m);
        }
        amqp_bytes_free(key);
        return rc;
    }
    case AMQP_BASIC_CANCEL_METHOD:
        return iw_error_set(err, IW_ERR_AMQP, "the broker cancelled the consumer of %s", q->queue);
    case AMQP_CHANNEL_CLOSE_METHOD: {
        amqp_channel_close_t *c = f.payload.method.decoded;
        amqp_channel_close_ok_t ok;
        rc = iw_error_set(err, IW_ERR_AMQP, "the broker closed the channel: %d %.*s", c->reply_code,
                          (int)c->reply_text.len, (char *)c->reply_text.bytes);
        amqp_send_method(q->conn, q->ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        return rc;
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
        amqp_connection_close_t *c = f.payload.method.decoded;
        return iw_error_set(err, IW_ERR_AMQP, "the broker closed the connection: %d %.*s",
                            c->reply_code, (int)c->reply_text.len, (char *)c->reply_text.bytes);
    }
    default:
        return IW_OK;
    }
}

static int cmp_rows(const void *a, const void *b, void *ud)
{
    const dl_info *x = a, *y = b;
    int newest = *(const int *)ud == ORDER_NEWEST;
    /* unknown times sort last either way; ties keep queue order */
    if (x->failed_ms != y->failed_ms) {
        if (x->failed_ms < 0 || y->failed_ms < 0)
            return x->failed_ms < 0 ? 1 : -1;
        return (x->failed_ms < y->failed_ms) == !newest ? -1 : 1;
    }
    return x->pos < y->pos ? -1 : 1;
}

static void print_groups(const char *by, const char *title, group *gs, size_t n, int json)
{
    char a[40], b[40];
    if (!json)
        printf("%-40s %7s  %-24s  %-24s\n", title, "COUNT", "OLDEST", "NEWEST");
    for (size_t k = 0; k < n; k++) {
        if (json) {
            print_json_line(stdout,
                            json_pack("{s:s, s:s, s:I, s:o, s:o}", "by", by, "key", gs[k].key,
                                      "count", (json_int_t)gs[k].count, "oldest",
                                      time_json(gs[k].oldest), "newest", time_json(gs[k].newest)));
            continue;
        }
        if (gs[k].oldest >= 0)
            format_timestamp(gs[k].oldest, a, sizeof a);
        if (gs[k].newest >= 0)
            format_timestamp(gs[k].newest, b, sizeof b);
        put_cell(stdout, gs[k].key[0] ? gs[k].key : "(empty)", 40, 1);
        printf(" %7zu  %-24s  %-24s\n", gs[k].count, gs[k].oldest >= 0 ? a : "-",
               gs[k].newest >= 0 ? b : "-");
    }
}

static int cmp_groups(const void *a, const void *b)
{
    const group *x = a, *y = b;
    if (x->count != y->count)
        return x->count > y->count ? -1 : 1;
    return strcmp(x->key, y->key);
}

/* Everything after the read: printing, waiting for confirms, purge acks. */
static int finish(dlq *q, iw_error *err)
{
    const dlq_opts *o = q->o;
    int rc = IW_OK;

    switch (o->cmd) {
    case C_LIST:
        if (o->order != ORDER_QUEUE)
            qsort_r(q->rows, q->n_rows, sizeof *q->rows, cmp_rows, (void *)&o->order);
        if (!o->json && q->n_rows)
            print_table_head(stdout);
        for (size_t k = 0; k < q->n_rows && (o->limit < 0 || k < (size_t)o->limit); k++) {
            if (o->json)
                print_json_line(stdout, info_json(&q->rows[k], q->now_ms));
            else
                print_table_row(stdout, &q->rows[k], q->now_ms);
        }
        if (!o->json)
            fprintf(stderr, "%zu of %u dead letters in %s shown\n",
                    o->limit >= 0 && (size_t)o->limit < q->n_rows ? (size_t)o->limit : q->n_rows,
                    q->depth, q->queue);
        break;
    case C_STATS:
        qsort(q->by_code, q->n_code, sizeof *q->by_code, cmp_groups);
        qsort(q->by_key, q->n_key, sizeof *q->by_key, cmp_groups);
        if (o->json) {
            print_groups("error_code", NULL, q->by_code, q->n_code, 1);
            print_groups("routing_key", NULL, q->by_key, q->n_key, 1);
            print_json_line(stdout,
                            json_pack("{s:s, s:I, s:o, s:o}", "by", "total", "count",
                                      (json_int_t)q->matched, "oldest", time_json(q->oldest),
                                      "newest", time_json(q->newest)));
        } else {
            print_groups("error_code", "ERROR CODE", q->by_code, q->n_code, 0);
            fputc('\n', stdout);
            print_groups("routing_key", "ROUTING KEY", q->by_key, q->n_key, 0);
            printf("\n%-40s %7zu\n", "TOTAL", q->matched);
        }
        break;
    case C_SHOW:
        if (!q->matched)
            rc = iw_error_set(err, IW_ERR_NOT_FOUND, "no dead letter with id %s in %s", o->ids.v[0],
                              q->queue);
        break;
    case C_REPLAY: {
        long long deadline = clock_mono_ms() + IDLE_TIMEOUT_MS;
        while (q->pend_n && rc == IW_OK && clock_mono_ms() < deadline)
            rc = pump(q, err);
        if (rc == IW_OK && q->pend_n)
            rc = iw_error_set(err, IW_ERR_TIMEOUT, "%zu republishes were not confirmed", q->pend_n);
        break;
    }
    case C_EXPORT:
        rc = close_export(q, err);
        if (rc == IW_OK && q->out_path)
            fprintf(stderr, "%zu dead letters written to %s\n", q->matched, q->out_path);
        break;
    case C_PURGE:
        if (!o->yes) {
            fprintf(stderr,
                    "%zu dead letters match; nothing removed (run again with --yes to remove "
                    "them)\n",
                    q->matched);
            break;
        }
        /* the export is on disk before the first ack */
        if ((rc = close_export(q, err)) != IW_OK)
            break;
        test_point(q, "exported");
        for (size_t k = 0; k < q->n_tags && rc == IW_OK; k++) {
            if (amqp_basic_ack(q->conn, q->ch, q->tags[k], 0) != AMQP_STATUS_OK)
                rc = iw_error_set(err, IW_ERR_AMQP, "ack failed");
            else {
                q->acted++;
                note_acked(q, q->tag_ids[k]);
                test_point(q, "acked");
                progress(q, 0);
            }
        }
        break;
    }
    return rc;
}

/* Declares N.dead passively: its depth, and an error if anyone consumes it. */
static int queue_state(dlq *q, uint32_t *depth, uint32_t *consumers, iw_error *err)
{
    amqp_queue_declare_ok_t *ok = amqp_queue_declare(q->conn, q->ch, amqp_cstring_bytes(q->queue),
                                                     1, 0, 0, 0, amqp_empty_table);
    int rc = reply_error(amqp_get_rpc_reply(q->conn), "queue.declare", err);

    if (rc == IW_ERR_NOT_FOUND)
        return iw_error_set(err, rc, "queue %s not found (integration-worker declare creates it)",
                            q->queue);
    if (rc != IW_OK)
        return rc;
    *depth = ok->message_count;
    *consumers = ok->consumer_count;
    return IW_OK;
}

/* One read of N.dead on q->ch: consume up to its depth, act per message. */
static int read_pass(dlq *q, iw_error *err)
{
    uint32_t consumers = 0;
    int rc;

    if ((rc = queue_state(q, &q->depth, &consumers, err)) != IW_OK)
        return rc;
    if (consumers > 0)
        return iw_error_set(err, IW_ERR_AMQP,
                            "%s has %u consumer(s); reading it beside them would reorder it",
                            q->queue, consumers);
    q->nread = 0;
    q->stop = 0;
    q->to_read = q->depth < MAX_READ ? q->depth : MAX_READ;
    if (q->depth > MAX_READ && !q->verify)
        fprintf(stderr,
                "integration-worker dlq %s: %s holds %u messages; this run reads the first %u\n",
                cmd_names[q->o->cmd], q->queue, q->depth, MAX_READ);
    if (q->to_read == 0)
        return IW_OK;
    amqp_basic_qos(q->conn, q->ch, 0, (uint16_t)q->to_read, 0);
    if ((rc = reply_error(amqp_get_rpc_reply(q->conn), "basic.qos", err)) != IW_OK)
        return rc;
    amqp_basic_consume(q->conn, q->ch, amqp_cstring_bytes(q->queue),
                       amqp_cstring_bytes("integration-worker-dlq"), 0, 0, 1, amqp_empty_table);
    if ((rc = reply_error(amqp_get_rpc_reply(q->conn), "basic.consume", err)) != IW_OK)
        return rc;
    while (rc == IW_OK && q->nread < q->to_read && !q->stop)
        rc = pump(q, err);
    return rc;
}

/* Ends the current pass: closing the channel returns every delivery we did
 * not ack, in order.  Then waits until the queue has applied that (our
 * consumer is gone), on a fresh channel, so that the next read sees them. */
static int end_pass(dlq *q, iw_error *err)
{
    uint32_t depth = 0, consumers = 1;
    long long deadline;
    int rc;

    amqp_channel_close(q->conn, q->ch, AMQP_REPLY_SUCCESS);
    q->ch++;
    amqp_channel_open(q->conn, q->ch);
    if ((rc = reply_error(amqp_get_rpc_reply(q->conn), "channel.open", err)) != IW_OK)
        return rc;
    deadline = clock_mono_ms() + IDLE_TIMEOUT_MS;
    while ((rc = queue_state(q, &depth, &consumers, err)) == IW_OK && consumers > 0 &&
           clock_mono_ms() < deadline)
        usleep(20000);
    if (rc == IW_OK && consumers > 0)
        rc = iw_error_set(err, IW_ERR_TIMEOUT, "%s still has a consumer after our channel closed",
                          q->queue);
    return rc;
}

/* Makes sure every ack of the command took effect.  RabbitMQ 3.10's quorum
 * queue client stashes settlements once 32 commands are unconfirmed and
 * drops the stash when the channel closes (rabbitmq-server#10327): acks sent
 * just before the close can come back as unacked.  So after the command's
 * pass the queue is read again, and any message we acked that is still
 * there (more copies of its id than we left) is acked again, until a pass
 * finds none.  Only messages already republished (confirmed) or exported are
 * acked here, so a kill at any point still loses nothing. */
static int settle(dlq *q, iw_error *err)
{
    int rc = IW_OK;

    q->verify = 1;
    for (int pass = 0; pass < 20 && rc == IW_OK; pass++) {
        size_t before = q->reacked;
        if ((rc = end_pass(q, err)) != IW_OK)
            break;
        for (size_t k = 0; k < q->idc_cap; k++)
            q->idc[k].vseen = 0;
        if ((rc = read_pass(q, err)) != IW_OK || q->reacked == before)
            break;
    }
    if (rc == IW_OK && q->reacked)
        fprintf(stderr,
                "integration-worker dlq %s: %zu acks were dropped by the broker and sent again\n",
                cmd_names[q->o->cmd], q->reacked);
    return rc;
}

static int run(dlq *q, iw_error *err)
{
    const dlq_opts *o = q->o;
    int rc;

    q->ch = 1;
    if ((rc = session_connect(q, err)) != IW_OK || (rc = session_lock(q, err)) != IW_OK)
        return rc;
    if (o->cmd == C_REPLAY && !o->dry_run) {
        amqp_confirm_select(q->conn, q->ch);
        if ((rc = reply_error(amqp_get_rpc_reply(q->conn), "confirm.select", err)) != IW_OK)
            return rc;
        q->next_seq = 1;
    }
    if (o->cmd == C_EXPORT || (o->cmd == C_PURGE && o->yes && !o->no_export)) {
        char *def = NULL;
        const char *path = o->file;
        if (!path) {
            char ts[40];
            time_t t = time(NULL);
            struct tm tm;
            gmtime_r(&t, &tm);
            strftime(ts, sizeof ts, "%Y%m%dT%H%M%SZ", &tm);
            if (asprintf(&def, "dlq-%s-%s.jsonl", q->cfg->ns, ts) < 0)
                return iw_error_set(err, IW_ERR_NOMEM, "out of memory");
            path = def;
        }
        rc = open_export(q, path, err);
        free(def);
        if (rc != IW_OK)
            return rc;
    }
    rc = read_pass(q, err);
    if (rc == IW_OK)
        rc = finish(q, err);
    if (rc == IW_OK && q->acted > 0)
        rc = settle(q, err);
    if (o->cmd == C_REPLAY || o->cmd == C_PURGE)
        progress(q, 1);
    return rc;
}

/* Closes the channel (the broker returns every unacked delivery, in order)
 * and the connection. */
static void session_close(dlq *q)
{
    if (!q->conn)
        return;
    amqp_channel_close(q->conn, q->ch, AMQP_REPLY_SUCCESS);
    amqp_connection_close(q->conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(q->conn);
    q->conn = NULL;
}

static void warn_setting(const char *msg)
{
    fprintf(stderr, "integration-worker dlq: warning: %s\n", msg);
}

int dlq_main(int argc, char **argv, char **envp)
{
    dlq_opts o = {0};
    dlq q = {0};
    iw_error err = {0};
    const char *kill_at;
    int rc;

    rc = parse_opts(argc, argv, &o);
    if (rc != 0) {
        rc = rc == 1 ? 0 : 2;
        goto out;
    }
    q.o = &o;
    q.oldest = q.newest = -1;
    if (!(q.cfg = config_from_env(envp, warn_setting, &err))) {
        fprintf(stderr, "integration-worker dlq: %s\n", err.msg);
        rc = 2;
        goto out;
    }
    if (strlen(q.cfg->ns) > 200) {
        fprintf(stderr, "integration-worker dlq: IW_NAMESPACE: longer than 200 bytes\n");
        rc = 2;
        goto out;
    }
    snprintf(q.queue, sizeof q.queue, "%s.dead", q.cfg->ns);
    snprintf(q.requests, sizeof q.requests, "%s.requests", q.cfg->ns);
    snprintf(q.lock, sizeof q.lock, "%s.dlq-lock", q.cfg->ns);
    if ((kill_at = getenv("IWTEST_DLQ_KILL_AT")) != NULL &&
        sscanf(kill_at, "%31[a-z]:%ld", q.kill_phase, &q.kill_after) != 2)
        q.kill_after = 0;
    if (o.ids.n && !(q.id_seen = calloc(o.ids.n, sizeof *q.id_seen))) {
        rc = 1;
        goto out;
    }
    q.now_ms = clock_wall_ms();
    q.started_ms = q.last_progress_ms = clock_mono_ms();
    rc = run(&q, &err);
    fflush(stdout);
    session_close(&q);
    if (rc == IW_OK && o.ids.n && o.cmd != C_SHOW) {
        for (size_t k = 0; k < o.ids.n; k++)
            if (!q.id_seen[k]) {
                fprintf(stderr, "integration-worker dlq %s: no dead letter with id %s\n",
                        cmd_names[o.cmd], o.ids.v[k]);
                q.failed = 1;
            }
    }
    if (rc != IW_OK) {
        fprintf(stderr, "integration-worker dlq %s: %s\n", cmd_names[o.cmd], err.msg);
        rc = err.status == IW_ERR_USAGE || err.status == IW_ERR_CONFIG ? 2 : 1;
    } else {
        if (o.cmd == C_REPLAY && !o.dry_run)
            fprintf(stderr,
                    "integration-worker dlq replay: %zu replayed, %zu unroutable, %zu "
                    "refused\n",
                    q.acted, q.unroutable, q.refused);
        if (o.cmd == C_PURGE && o.yes)
            fprintf(stderr, "integration-worker dlq purge: %zu removed%s%s\n", q.acted,
                    q.out_path ? ", exported to " : "", q.out_path ? q.out_path : "");
        rc = q.failed ? 1 : 0;
    }
out:
    if (q.out && q.out != stdout)
        fclose(q.out);
    free(q.out_path);
    for (size_t k = 0; k < q.n_rows; k++)
        info_clear(&q.rows[k]);
    free(q.rows);
    for (size_t k = 0; k < q.n_code; k++)
        free(q.by_code[k].key);
    for (size_t k = 0; k < q.n_key; k++)
        free(q.by_key[k].key);
    free(q.by_code);
    free(q.by_key);
    for (size_t k = 0; k < q.pend_n; k++)
        free(q.pend[q.pend_head + k].routing_key);
    free(q.pend);
    free(q.tags);
    free(q.tag_ids);
    free(q.idc);
    free(q.id_seen);
    strlist_free(&o.codes);
    strlist_free(&o.keys);
    strlist_free(&o.jobs);
    strlist_free(&o.ids);
    config_free(q.cfg);
    return rc;
}
