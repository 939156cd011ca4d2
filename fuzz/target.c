/* target.c - the libFuzzer entry point for one format, FUZZ_FORMAT (a
 * string, set by the Makefile: one binary per format). */
#include <stdio.h>
#include <stdlib.h>

#include "fuzz.h"

static int fuzz_fmt_index = -1;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fuzz_fmt_index = fuzz_format(FUZZ_FORMAT);
    if (fuzz_fmt_index < 0) {
        fprintf(stderr, "fuzz: unknown format %s\n", FUZZ_FORMAT);
        exit(1);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_load(fuzz_fmt_index, data, size);
    return 0;
}
