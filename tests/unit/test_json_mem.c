/* json_mem: jansson's small blocks recycled per size, capped, and every
 * block still malloc's own. */
#include <check.h>
#include <jansson.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "json_mem.h"
#include "json_read.h"

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

START_TEST(realloc_keeps_the_bytes)
{
    unsigned char *p = json_mem_realloc(NULL, 20), *q;
    size_t before;

    ck_assert_ptr_nonnull(p);
    for (int i = 0; i < 20; i++)
        p[i] = (unsigned char)i;
    /* within the block: the same block */
    ck_assert_ptr_eq(json_mem_realloc(p, 10), p);
    ck_assert_ptr_eq(json_mem_realloc(p, malloc_usable_size(p)), p);
    /* past it: a larger block with the bytes, the old one kept for reuse */
    before = json_mem_kept();
    q = json_mem_realloc(p, 100);
    ck_assert_ptr_nonnull(q);
    ck_assert_ptr_ne(q, p);
    ck_assert_uint_ge(malloc_usable_size(q), 100);
    for (int i = 0; i < 20; i++)
        ck_assert_uint_eq(q[i], i);
    ck_assert_uint_gt(json_mem_kept(), before);
    /* to a large block and back to malloc */
    p = json_mem_realloc(q, 4 * JSON_MEM_SMALL);
    ck_assert_ptr_nonnull(p);
    for (int i = 0; i < 20; i++)
        ck_assert_uint_eq(p[i], i);
    json_mem_free(p);
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

/* What a new thread (whose lists start empty) keeps after making and
 * freeing one empty array, by jansson alone or read by json_read. */
static void *empty_array_kept(void *read)
{
    json_t *v = read ? json_read_plain("[]", 2, 0) : json_array();
    size_t *kept = malloc(sizeof *kept);

    json_decref(v);
    if (kept)
        *kept = v ? json_mem_kept() : 0;
    return kept;
}

static size_t kept_by_thread(int read)
{
    pthread_t t;
    void *r = NULL;
    size_t kept;

    ck_assert_int_eq(pthread_create(&t, NULL, empty_array_kept, read ? "" : NULL), 0);
    ck_assert_int_eq(pthread_join(t, &r), 0);
    ck_assert_ptr_nonnull(r);
    kept = *(size_t *)r;
    free(r);
    return kept;
}

/* Installed, json_read's parser (yajl) takes its blocks here too: the
 * documents come out right, a parse leaves nothing behind but blocks kept
 * for the next one, and yajl's handle, lexer and stack are among them. */
START_TEST(yajl_through_it)
{
    static const char text[] = "{\"jobId\":\"j-2\",\"payload\":{\"a\":[1,2.5,{\"b\":\"c\"}],"
                               "\"d\":null,\"e\":false}}";
    size_t before = json_mem_kept(), high = 0;
    int installed = json_mem_install();

    ck_assert_int_eq(json_mem_installed(), installed);
    for (int i = 0; i < 2000; i++) {
        json_t *doc = json_read_plain(text, sizeof text - 1, JSON_REJECT_DUPLICATES);
        ck_assert_ptr_nonnull(doc);
        ck_assert_str_eq(json_string_value(json_object_get(doc, "jobId")), "j-2");
        ck_assert(json_is_false(json_object_get(json_object_get(doc, "payload"), "e")));
        json_decref(doc);
        if (i == 10)
            high = json_mem_kept();
        else if (i > 10)
            ck_assert_uint_eq(json_mem_kept(), high);
    }
    if (!installed) {
        ck_assert_uint_eq(json_mem_kept(), before);
        return;
    }
    /* yajl's five blocks: its handle alone is over 100 bytes */
    ck_assert_uint_ge(kept_by_thread(1), kept_by_thread(0) + 200);
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
    tcase_add_test(tc, realloc_keeps_the_bytes);
    tcase_add_test(tc, jansson_through_it);
    tcase_add_test(tc, yajl_through_it);
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
