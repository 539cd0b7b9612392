/* Replays files through the libFuzzer harness fuzz/fuzz_safetensors.c
 * without libFuzzer, so that every build (and the ASan pass) runs the seed
 * corpus: usage fuzz_st_replay FILE... (exit 0 when every input passes; the
 * harness aborts on a violated property). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) {
            fprintf(stderr, "fuzz replay: cannot open '%s'\n", argv[i]);
            return 1;
        }
        uint8_t *buf = NULL;
        size_t n = 0, cap = 0, got;
        do {
            if (n == cap) {
                cap = cap ? 2 * cap : 4096;
                uint8_t *p = realloc(buf, cap);
                if (!p) return 1;
                buf = p;
            }
            got = fread(buf + n, 1, cap - n, f);
            n += got;
        } while (got > 0);
        fclose(f);
        LLVMFuzzerTestOneInput(buf, n);
        free(buf);
    }
    printf("fuzz replay: %d inputs passed\n", argc - 1);
    return 0;
}
