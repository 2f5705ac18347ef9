/* A main() for the fuzz targets outside libFuzzer: feeds every file of the
 * directories (or files) named on the command line to LLVMFuzzerTestOneInput
 * once.  The normal build runs each target over its committed corpus this way
 * (ctest unit.fuzz_<target>_corpus), so every seed and every regression case
 * of a past finding is checked by every build, with gcc and without clang. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "buf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int replay_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    iw_buf b;
    char chunk[65536];
    size_t n;
    int rc = 0;

    if (!f) {
        fprintf(stderr, "replay: cannot open %s\n", path);
        return 1;
    }
    buf_init(&b, 1 << 24);
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (buf_add(&b, chunk, n) != IW_OK) {
            fprintf(stderr, "replay: %s is too large\n", path);
            rc = 1;
            break;
        }
    fclose(f);
    if (rc == 0) {
        /* a copy of exactly the input's size, so that ASan sees overreads */
        uint8_t *copy = malloc(buf_len(&b) ? buf_len(&b) : 1);
        if (!copy)
            return 1;
        memcpy(copy, buf_ptr(&b), buf_len(&b));
        LLVMFuzzerTestOneInput(copy, buf_len(&b));
        free(copy);
    }
    buf_free(&b);
    return rc;
}

int main(int argc, char **argv)
{
    int failed = 0, count = 0;

    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            fprintf(stderr, "replay: no %s\n", argv[i]);
            return 1;
        }
        if (!S_ISDIR(st.st_mode)) {
            failed |= replay_file(argv[i]);
            count++;
            continue;
        }
        DIR *d = opendir(argv[i]);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (e->d_name[0] == '.')
                continue;
            iw_buf path;
            buf_init(&path, 4096);
            if (buf_addf(&path, "%s/%s", argv[i], e->d_name) == IW_OK) {
                failed |= replay_file(buf_ptr(&path));
                count++;
            }
            buf_free(&path);
        }
        if (d)
            closedir(d);
    }
    printf("replay: %d inputs\n", count);
    return failed || count == 0;
}
