/* The jobKey (contract, "Outbound to the provider"): the one deterministic
 * form of a jobId that may go into an HTTP header or an AMQP short string. */
#ifndef IW_JOBKEY_H
#define IW_JOBKEY_H

#include <stddef.h>

#include "status.h"

/* Longest jobKey in bytes, and the buffer that holds one with its NUL. */
#define JOBKEY_MAX 255
#define JOBKEY_SIZE (JOBKEY_MAX + 1)

/* Writes the jobKey of job_id[0..len) into out: the jobId itself when it is
 * 1..255 bytes of printable ASCII (0x21-0x7E), otherwise "sha256:" and the 64
 * lowercase hex digits of the SHA-256 of its bytes.  jobkey(jobkey(x)) ==
 * jobkey(x).  IW_OK, or IW_ERR_NOMEM/IW_ERR_INVALID when libcrypto fails
 * (out is then ""). */
int jobkey(const char *job_id, size_t len, char out[JOBKEY_SIZE])
    __attribute__((warn_unused_result));

/* 1 if s[0..len) is 1..255 bytes of printable ASCII, i.e. its own jobKey. */
int jobkey_is_plain(const char *s, size_t len);

#endif
