/* tests_harness.h - what the test binaries (tests.c, tests_cuda.cu,
 * tests_mpi.c, tests_nccl.cu) share: CHECK macros, host buffers, and the
 * runner that prints one line per test and ends with "N passed, N failed".
 * Include after sparsemem.h. */
#ifndef SM_TESTS_HARNESS_H
#define SM_TESTS_HARNESS_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char t_fail_msg[512];

/* Record the first failure of the running test and return 1 from it. */
#define CHECK(cond, ...)                                                                     \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            char t__buf[400];                                                                \
            snprintf(t__buf, sizeof t__buf, __VA_ARGS__);                                    \
            snprintf(t_fail_msg, sizeof t_fail_msg, "%s:%d: %s", __FILE__, __LINE__, t__buf); \
            return 1;                                                                        \
        }                                                                                    \
    } while (0)

#define CHECK_OK(expr)                                                                       \
    do {                                                                                     \
        sm_status t__st = (expr);                                                            \
        CHECK(t__st == SM_OK, "%s -> %s", #expr, sm_strerror(t__st));                        \
    } while (0)

/* n_floats zeroed floats (exits on out-of-memory: a test cannot go on). */
static void *t_alloc(size_t n_floats) {
    void *p = calloc(n_floats ? n_floats : 1, sizeof(float));
    if (!p) {
        fprintf(stderr, "tests: out of memory\n");
        exit(2);
    }
    return p;
}

static inline float *t_randn(sm_rng *r, size_t n, float std) {
    float *x = (float *)t_alloc(n);
    sm_rng_fill_normal(r, x, n, std);
    return x;
}

/* With several processes (tests_mpi.c): turns one rank's verdict into the
 * verdict of all, so every rank counts the same. NULL: one process. */
static int (*t_agree)(int bad) = NULL;

typedef struct {
    const char *name;
    int (*fn)(void);
} t_case;
#define T(f) {#f, f}

/* Whether a case named `name` runs: with no filters every case, else those
 * whose name contains any of them. */
static int t_selected(const char *name, char **filters, int n_filters) {
    int f;
    for (f = 0; f < n_filters; f++)
        if (strstr(name, filters[f])) return 1;
    return n_filters == 0;
}

/* Runs the cases t_selected picks (the command line's arguments are the
 * filters); returns the number that failed. */
static int t_run(const t_case *cases, size_t n, char **filters, int n_filters) {
    size_t i;
    int passed = 0, failed = 0;
    for (i = 0; i < n; i++) {
        double t0;
        int bad;
        if (!t_selected(cases[i].name, filters, n_filters)) continue;
        t_fail_msg[0] = 0;
        t0 = sm_now();
        bad = cases[i].fn();
        if (t_agree) bad = t_agree(bad);
        if (bad) {
            printf("FAIL %-48s %s\n", cases[i].name, t_fail_msg);
            failed++;
        } else {
            printf("ok   %-48s (%.2fs)\n", cases[i].name, sm_now() - t0);
            passed++;
        }
        fflush(stdout);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed;
}
#endif
