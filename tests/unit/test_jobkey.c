/* The jobKey: printable-ASCII jobIds of at most 255 bytes are their own key,
 * every other jobId is "sha256:" + the hex SHA-256 of its bytes (checked
 * against the FIPS 180-2 vectors and hashes computed by another tool). */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "jobkey.h"

static const char *key_of(const char *s, size_t len)
{
    static char out[JOBKEY_SIZE];
    ck_assert_int_eq(jobkey(s, len, out), IW_OK);
    return out;
}

START_TEST(plain_ascii_is_itself)
{
    ck_assert_str_eq(key_of("j-1", 3), "j-1");
    ck_assert_str_eq(key_of("!~", 2), "!~");
    char id[256];
    memset(id, 'x', 255);
    id[255] = '\0';
    ck_assert_str_eq(key_of(id, 255), id);
}
END_TEST

START_TEST(sha256_vectors)
{
    /* FIPS 180-2: "" and one million 'a' (over 255 bytes, so hashed) */
    ck_assert_str_eq(key_of("", 0),
                     "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    char *million = malloc(1000000);
    ck_assert_ptr_nonnull(million);
    memset(million, 'a', 1000000);
    ck_assert_str_eq(key_of(million, 1000000),
                     "sha256:cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    free(million);
    /* 256 bytes: one past the plain limit (Python hashlib) */
    char id[256];
    memset(id, 'a', 256);
    ck_assert_str_eq(key_of(id, 256),
                     "sha256:02d7160d77e18c6447be80c2e355c7ed4388545271702c50253b0914c65ce5fe");
}
END_TEST

START_TEST(control_space_and_non_ascii_are_hashed)
{
    ck_assert_str_eq(key_of("j-1\r\nX-Injected: yes", 20),
                     "sha256:f24392df0b9ed3f37d522a5db29e1eca54fbeb0b300a21921e28a0d9ffcc922d");
    ck_assert_str_eq(key_of("a b", 3),
                     "sha256:c8687a08aa5d6ed2044328fa6a697ab8e96dc34291e8c2034ae8c38e6fcc6d65");
    const char *cjk = "\xe3\x82\xb8\xe3\x83\xa7\xe3\x83\x96-1"; /* ジョブ-1 */
    ck_assert_str_eq(key_of(cjk, strlen(cjk)),
                     "sha256:3998882e99d572b18950f6f28b2e155fa27a9da5137b27473d76609b9484d344");
    /* a NUL inside is part of the bytes, not the end */
    char with_nul[JOBKEY_SIZE];
    strcpy(with_nul, key_of("a\0b", 3));
    ck_assert_str_ne(with_nul, key_of("a", 1));
    ck_assert_int_eq(strncmp(with_nul, "sha256:", 7), 0);
}
END_TEST

START_TEST(deterministic_and_idempotent)
{
    char a[JOBKEY_SIZE], b[JOBKEY_SIZE], c[JOBKEY_SIZE];
    const char *id = "\xc3\xa9t\xc3\xa9-42";
    ck_assert_int_eq(jobkey(id, strlen(id), a), IW_OK);
    ck_assert_int_eq(jobkey(id, strlen(id), b), IW_OK);
    ck_assert_str_eq(a, b);
    ck_assert_int_eq(strlen(a), 7 + 64);
    /* a jobKey is its own jobKey, so callers may pass either */
    ck_assert_int_eq(jobkey(a, strlen(a), c), IW_OK);
    ck_assert_str_eq(a, c);
    for (size_t i = 7; i < strlen(a); i++)
        ck_assert_msg(strchr("0123456789abcdef", a[i]) != NULL, "not lowercase hex: %s", a);
}
END_TEST

START_TEST(is_plain)
{
    ck_assert_int_eq(jobkey_is_plain("abc", 3), 1);
    ck_assert_int_eq(jobkey_is_plain("", 0), 0);
    ck_assert_int_eq(jobkey_is_plain("a b", 3), 0);
    ck_assert_int_eq(jobkey_is_plain("a\x7f", 2), 0);
    ck_assert_int_eq(jobkey_is_plain("a\x80", 2), 0);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("jobkey");
    TCase *tc = tcase_create("jobkey");
    tcase_add_test(tc, plain_ascii_is_itself);
    tcase_add_test(tc, sha256_vectors);
    tcase_add_test(tc, control_space_and_non_ascii_are_hashed);
    tcase_add_test(tc, deterministic_and_idempotent);
    tcase_add_test(tc, is_plain);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
