/* json_mem: jansson's small blocks recycled per size, capped, and every
 * block still malloc's own. */
#include <check.h>
#include <jansson.h>
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "json_mem.h"

/* Each test reads what is kept before it starts, so none depends on running
 * in a child process of its own. */

START_TEST(blocks_hold_what_was_asked)
{
    for (size_t n = 0; n <= 2 * JSON_MEM_SMALL; n++) {
        unsigned char *p = json_mem_alloc(n);
        ck_assert_ptr_nonnull(p);
        ck_assert_uint_ge(malloc_usable_size(p), n);
        memset(p, 0xA5, n);
        json_mem_free(p);
    }
    json_mem_free(NULL);
}
END_TEST

START_TEST(a_freed_small_block_is_taken_again_for_its_size)
{
    void *a = json_mem_alloc(40), *b;
    size_t before = json_mem_kept();

    json_mem_free(a);
    ck_assert_uint_eq(json_mem_kept(), before + 48);
    b = json_mem_alloc(33); /* the same 48-byte size */
    ck_assert_ptr_eq(a, b);
    ck_assert_uint_eq(json_mem_kept(), before);
    /* a larger size does not take it */
    json_mem_free(b);
    b = json_mem_alloc(49);
    ck_assert_ptr_ne(a, b);
    json_mem_free(b);
    ck_assert_ptr_eq(json_mem_alloc(48), a);
    free(a); /* malloc's own block */
}
END_TEST

START_TEST(large_blocks_go_back_to_malloc)
{
    size_t before = json_mem_kept();
    void *p = json_mem_alloc(JSON_MEM_SMALL + 100);

    json_mem_free(p);
    ck_assert_uint_eq(json_mem_kept(), before);
    /* and a malloc'd block of any size may be handed over */
    p = malloc(1000);
    json_mem_free(p);
    ck_assert_uint_eq(json_mem_kept(), before);
    p = malloc(20);
    json_mem_free(p);
    ck_assert_uint_gt(json_mem_kept(), before);
}
END_TEST

START_TEST(kept_bytes_are_capped)
{
    size_t n = JSON_MEM_KEEP / 64 + 100, i;
    void **blocks = calloc(n, sizeof *blocks);

    ck_assert_ptr_nonnull(blocks);
    for (i = 0; i < n; i++)
        ck_assert_ptr_nonnull(blocks[i] = json_mem_alloc(64));
    for (i = 0; i < n; i++)
        json_mem_free(blocks[i]);
    ck_assert_uint_le(json_mem_kept(), JSON_MEM_KEEP);
    ck_assert_uint_ge(json_mem_kept(), JSON_MEM_KEEP - 64);
    free(blocks);
}
END_TEST

/* Installed, jansson parses, builds, dumps and frees through it: documents
 * come out right and their blocks are reused, not piled up.  Under
 * AddressSanitizer it is not installed, and jansson keeps nothing here. */
START_TEST(jansson_through_it)
{
    static const char text[] =
        "{\"jobId\":\"j-1\",\"payload\":{\"a\":[1,2,3,{\"b\":\"\\u00e9t\\u00e9\"}],\"c\":null,"
        "\"d\":1.5,\"e\":true,\"f\":\"a longer string value, past one block of sixteen\"}}";
    size_t before = json_mem_kept(), high = 0;
    int installed = json_mem_install();

    for (int i = 0; i < 2000; i++) {
        json_error_t e;
        json_t *doc = json_loads(text, JSON_REJECT_DUPLICATES, &e);
        char *out;
        ck_assert_msg(doc != NULL, "%s", e.text);
        json_object_set_new(doc, "n", json_integer(i));
        out = json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS);
        ck_assert_ptr_nonnull(out);
        ck_assert_ptr_nonnull(strstr(out, "\"f\":\"a longer string value, past one block"));
        free(out); /* json_dumps's string, freed as the worker frees it */
        json_decref(doc);
        if (i == 10)
            high = json_mem_kept();
        else if (i > 10)
            ck_assert_uint_le(json_mem_kept(), high + 1024);
    }
    if (installed)
        ck_assert_uint_gt(high, 0);
    else
        ck_assert_uint_eq(json_mem_kept(), before);
}
END_TEST

static Suite *json_mem_suite(void)
{
    Suite *s = suite_create("json_mem");
    TCase *tc = tcase_create("blocks");

    tcase_add_test(tc, blocks_hold_what_was_asked);
    tcase_add_test(tc, a_freed_small_block_is_taken_again_for_its_size);
    tcase_add_test(tc, large_blocks_go_back_to_malloc);
    tcase_add_test(tc, kept_bytes_are_capped);
    tcase_add_test(tc, jansson_through_it);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(json_mem_suite());

    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
