/* seeds.c - writes the seed corpus: fuzz/seeds DIR makes DIR/FORMAT/ with
 * one valid file of every format, plus regressions (see formats.c). */
#include <stdio.h>

#include "fuzz.h"

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
        return 2;
    }
    if (fuzz_write_seeds(argv[1]) != 0) {
        fprintf(stderr, "fuzz seeds: could not write the seed corpus in %s\n", argv[1]);
        return 1;
    }
    return 0;
}
