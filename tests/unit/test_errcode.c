/* The error-code table: every code has one name of the contract's shape, no
 * two codes share a name, and what is retried is exactly the transient
 * provider failures. */
#include <check.h>
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "errcode.h"
#include "iwtest.h"

START_TEST(every_code_has_a_unique_name)
{
    ck_assert_str_eq(iw_code_name(IW_C_NONE), "");
    for (int c = 1; c < IW_N_CODES; c++) {
        const char *n = iw_code_name((iw_code)c);
        ck_assert_msg(n && *n, "code %d has no name", c);
        for (const char *p = n; *p; p++)
            ck_assert_msg(isupper((unsigned char)*p) || *p == '_', "%s", n);
        for (int d = c + 1; d < IW_N_CODES; d++)
            ck_assert_msg(strcmp(n, iw_code_name((iw_code)d)) != 0, "%s twice", n);
    }
    ck_assert_str_eq(iw_code_name(IW_N_CODES), "UNKNOWN");
    ck_assert_str_eq(iw_code_name((iw_code)-1), "UNKNOWN");
}
END_TEST

START_TEST(the_contract_names)
{
    ck_assert_str_eq(iw_code_name(IW_C_MESSAGE_TOO_LARGE), "MESSAGE_TOO_LARGE");
    ck_assert_str_eq(iw_code_name(IW_C_INVALID_CONTENT_TYPE), "INVALID_CONTENT_TYPE");
    ck_assert_str_eq(iw_code_name(IW_C_INVALID_JSON), "INVALID_JSON");
    ck_assert_str_eq(iw_code_name(IW_C_SCHEMA_VIOLATION), "SCHEMA_VIOLATION");
    ck_assert_str_eq(iw_code_name(IW_C_EXTERNAL_API_ERROR), "EXTERNAL_API_ERROR");
    ck_assert_str_eq(iw_code_name(IW_C_EXTERNAL_API_TIMEOUT), "EXTERNAL_API_TIMEOUT");
    ck_assert_str_eq(iw_code_name(IW_C_EXTERNAL_API_RATE_LIMITED), "EXTERNAL_API_RATE_LIMITED");
    ck_assert_str_eq(iw_code_name(IW_C_POLL_EXPIRED), "POLL_EXPIRED");
    ck_assert_str_eq(iw_code_name(IW_C_TRACKING_NOT_FOUND), "TRACKING_NOT_FOUND");
}
END_TEST

START_TEST(retried_are_the_transient_provider_failures)
{
    for (int c = 0; c < IW_N_CODES; c++) {
        iw_answer_class a = iw_code_class((iw_code)c);
        int transient = a == IW_AC_5XX || a == IW_AC_TIMEOUT || a == IW_AC_CONNECT ||
                        c == IW_C_EXTERNAL_API_UNAVAILABLE;
        ck_assert_msg(iw_code_retried((iw_code)c) == transient, "%s", iw_code_name((iw_code)c));
    }
}
END_TEST

START_TEST(levels_and_classes)
{
    for (int c = 1; c < IW_N_CODES; c++) {
        int level = iw_code_level((iw_code)c);
        ck_assert_msg(level == IW_LOG_WARN || level == IW_LOG_ERROR, "%s",
                      iw_code_name((iw_code)c));
    }
    ck_assert_int_eq(iw_code_level(IW_C_EXTERNAL_API_RATE_LIMITED), IW_LOG_WARN);
    ck_assert_int_eq(iw_code_class(IW_C_EXTERNAL_API_RATE_LIMITED), IW_AC_429);
    ck_assert_str_eq(iw_answer_class_name(IW_AC_5XX), "5xx");
    ck_assert_str_eq(iw_answer_class_name(IW_AC_NONE), "");
    ck_assert_str_eq(iw_answer_class_name((iw_answer_class)99), "");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("errcode");
    TCase *tc = tcase_create("table");

    tcase_add_test(tc, every_code_has_a_unique_name);
    tcase_add_test(tc, the_contract_names);
    tcase_add_test(tc, retried_are_the_transient_provider_failures);
    tcase_add_test(tc, levels_and_classes);
    suite_add_tcase(s, tc);
    return iwt_run_suite(s);
}
