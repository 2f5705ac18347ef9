#include "jobkey.h"

#include <openssl/evp.h>
#include <string.h>

int jobkey_is_plain(const char *s, size_t len)
{
    if (len == 0 || len > JOBKEY_MAX)
        return 0;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7E)
            return 0;
    return 1;
}

int jobkey(const char *job_id, size_t len, char out[JOBKEY_SIZE])
{
    static const char hex[] = "0123456789abcdef";
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    EVP_MD_CTX *ctx = NULL;
    int rc = IW_ERR_INVALID;

    out[0] = '\0';
    if (jobkey_is_plain(job_id, len)) {
        memcpy(out, job_id, len);
        out[len] = '\0';
        return IW_OK;
    }
    if (!(ctx = EVP_MD_CTX_new())) {
        rc = IW_ERR_NOMEM;
        goto out;
    }
    if (EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1 ||
        EVP_DigestUpdate(ctx, job_id ? job_id : "", len) != 1 ||
        EVP_DigestFinal_ex(ctx, md, &md_len) != 1 || md_len != 32)
        goto out;
    memcpy(out, "sha256:", 7);
    for (unsigned i = 0; i < md_len; i++) {
        out[7 + 2 * i] = hex[md[i] >> 4];
        out[8 + 2 * i] = hex[md[i] & 15];
    }
    out[7 + 2 * md_len] = '\0';
    rc = IW_OK;
out:
    EVP_MD_CTX_free(ctx);
    return rc;
}
