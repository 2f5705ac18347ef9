/* config_from_env over an environment made of fuzz bytes.  Checks: it either
 * gives a config (freed without leaks) or refuses with a one-line UTF-8
 * message that starts with the bad setting's name; a password marker in a
 * URL setting never appears in a message or a warning.
 *
 * Input: one entry per line: "=NAME=value" as it is, or a byte that picks a
 * setting of the table (byte % count) followed by its value.  NAME_FILE
 * entries are dropped: they would read files. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "config.h"
#include "fuzz_support.h"

#define MAX_ENTRIES 64
#define PASSWORD_MARKER "S3cretPW" /* also in the dictionary */

static iw_buf warnings;

/* The message is about a setting whose value may hold a password: URLs and
 * credentials are never echoed. */
static int secret_setting(const char *msg)
{
    static const char *const names[] = {
        "IW_AMQP_URL",      "IW_REDIS_URL",       "IW_PROVIDER_URL",        "IW_API_KEY",
        "IW_API_SECRET",    "IW_OAUTH_CLIENT_ID", "IW_OAUTH_CLIENT_SECRET", "IW_BASIC_USER",
        "IW_BASIC_PASSWORD"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        size_t n = strlen(names[i]);
        if (strncmp(msg, names[i], n) == 0 && (msg[n] == ':' || msg[n] == '_'))
            return 1;
    }
    return 0;
}

static void on_warn(const char *msg)
{
    fuzz_check_message(msg); /* warnings name variables, never values */
    FUZZ_REQUIRE(strchr(msg, '=') == NULL || strstr(msg, PASSWORD_MARKER) == NULL);
    (void)!buf_adds(&warnings, msg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static size_t n_settings;
    char *env[MAX_ENTRIES + 1];
    size_t n = 0;
    const char *line;
    size_t len;
    iw_error err;

    if (!n_settings)
        while (config_setting_name(n_settings))
            n_settings++;
    buf_init(&warnings, 1 << 20);
    while (n < MAX_ENTRIES && fuzz_line(&data, &size, &line, &len)) {
        if (len == 0)
            continue;
        iw_buf e;
        buf_init(&e, 1 << 16);
        if (line[0] == '=') { /* the rest as it is: "NAME=value" */
            if (buf_add(&e, line + 1, len - 1) != IW_OK) {
                buf_free(&e);
                continue;
            }
        } else if (buf_addf(&e, "%s=", config_setting_name((unsigned char)line[0] % n_settings)) !=
                       IW_OK ||
                   buf_add(&e, line + 1, len - 1) != IW_OK) {
            buf_free(&e);
            continue;
        }
        const char *entry = buf_ptr(&e);
        const char *eq = strchr(entry, '=');
        size_t nlen = eq ? (size_t)(eq - entry) : strlen(entry);
        if (strlen(entry) != buf_len(&e) ||
            (nlen >= 5 && memcmp(entry + nlen - 5, "_FILE", 5) == 0)) {
            buf_free(&e); /* a NUL inside, or a file to read */
            continue;
        }
        env[n++] = buf_steal(&e);
    }
    env[n] = NULL;

    memset(&err, 0, sizeof err);
    iw_config *cfg = config_from_env(env, on_warn, &err);
    if (!cfg) {
        fuzz_check_message(err.msg);
        FUZZ_REQUIRE(strncmp(err.msg, "IW_", 3) == 0);
        if (secret_setting(err.msg))
            FUZZ_REQUIRE(strstr(err.msg, PASSWORD_MARKER) == NULL);
    } else {
        FUZZ_REQUIRE(cfg->ns && strlen(cfg->ns) <= 100);
        (void)config_check_provider(cfg, &err);
        config_free(cfg);
    }
    for (size_t i = 0; i < n; i++)
        free(env[i]);
    buf_free(&warnings);
    return 0;
}
