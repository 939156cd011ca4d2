/* bench_backbone.c - GEMM throughput (ours vs cblas_sgemm when built with
 * OpenBLAS) and one backbone training step.
 *
 *   ./bench/bench_backbone [M N K]      GEMM A B^T, default 768 3072 768 (an
 *                                       MLP-sized GEMM), then training steps
 *   ./bench/bench_backbone shapes [R]   every GEMM shape of a GPT-2 124M step
 *                                       (B=4 T=64) and of the tiny preset's,
 *                                       in all three layouts, R rounds (5)
 *   ./bench/bench_backbone gpt2-steps [S]  S timed GPT-2 124M training steps
 *                                       (B=4 T=64), each printed (vs_llmc.sh)
 *   ./bench/bench_backbone choose       the Makefile's choice: the tiny
 *                                       preset's head and MLP shapes (~1 s);
 *                                       prints the trainer's flags for
 *                                       cblas_sgemm if OpenBLAS is the
 *                                       faster, else nothing
 *   ./bench/bench_backbone buffers [R]  the tiny preset's products as sm_sgemm
 *                                       runs them (its packing buffers kept by
 *                                       the thread) and with the buffers freed
 *                                       before every call (as each call once
 *                                       allocated and freed them), alternately:
 *                                       page faults per call and the ratio
 *   ./bench/bench_backbone regions      what one OpenMP parallel region costs
 *                                       (an empty one on every thread) after
 *                                       0, 20 and 100 us of serial work: the
 *                                       waking of sleeping threads under the
 *                                       environment's wait policy
 *   ./bench/bench_backbone profile [PRESET...]  where a training step's time
 *                                       goes, per op (sm_profile), for the
 *                                       presets gpt2 (GPT-2 124M, B=4 T=64),
 *                                       gpt2-1024 (the same at B=1 T=1024)
 *                                       and tiny (the trainer's tiny preset
 *                                       with Engram-Nine, PEER and mHC on);
 *                                       gpt2 and tiny when none is named
 *
 * Every ratio is measured in this one run, ours and OpenBLAS's interleaved,
 * the median of the rounds; absolute numbers depend on the machine and its
 * load. The first lines name the processor and the GEMM path built. */
#define SPARSEMEM_IMPLEMENTATION
#define SM_PROFILE /* for `profile`; the other modes attach no profile */
#include "sparsemem.h"
#include "bench_common.h"
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#ifdef SM_BENCH_CBLAS
#include <cblas.h>
#endif

/* One GEMM shape: C[M,N] = op(A) op(B) (+ C), op per layout as the model
 * uses it: "NT" forward (x W^T, beta = 0), "NN" backward to the input
 * (dy W) and "TN" backward to the weight (dy^T x), both added to the
 * gradient already there (beta = 1). */
typedef struct {
    const char *label, *layout;
    int M, N, K;
} gemm_shape;

typedef void (*gemm_fn)(int ta, int tb, int M, int N, int K, const float *A, int lda,
                        const float *B, int ldb, float beta, float *C);

static void ours(int ta, int tb, int M, int N, int K, const float *A, int lda, const float *B,
                 int ldb, float beta, float *C) {
    sm_sgemm(ta, tb, M, N, K, 1.0f, A, lda, B, ldb, beta, C, N);
}
#ifdef SM_BENCH_CBLAS
static void blas(int ta, int tb, int M, int N, int K, const float *A, int lda, const float *B,
                 int ldb, float beta, float *C) {
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, M,
                N, K, 1.0f, A, lda, B, ldb, beta, C, N);
}
#endif

/* The CPU whose kernels OpenBLAS runs here ("none" built without it). */
static const char *openblas_kernels(void) {
#ifdef SM_BENCH_CBLAS
    return openblas_get_corename();
#else
    return "none";
#endif
}

#ifdef SM_BENCH_CBLAS
/* Whether OpenBLAS runs kernels made for AVX2 or AVX-512 (its core names,
 * any case). */
static int openblas_core_is_wide(const char *core) {
    static const char *wide[] = {"haswell", "zen", "skylakex", "cooperlake", "sapphirerapids"};
    char lower[64];
    size_t i;
    for (i = 0; core[i] && i + 1 < sizeof lower; i++) lower[i] = (char)tolower((unsigned char)core[i]);
    lower[i] = 0;
    for (i = 0; i < sizeof wide / sizeof wide[0]; i++)
        if (strcmp(lower, wide[i]) == 0) return 1;
    return 0;
}

/* OpenBLAS picks its kernels at run time from the CPU's family and model; a
 * release older than the CPU does not know it and runs the kernels of an old
 * one (Debian's 0.3.21 runs its SSE3 "Prescott" kernels on a family 6 model
 * 207 Xeon, at a fifth of their AVX-512 speed). Prints which it runs, and
 * says so where they are narrower than sm_sgemm's path, so that a ratio is
 * not read as one against OpenBLAS at its best on this CPU. */
static void print_openblas_kernels(FILE *out) {
    const char *path = sm_sgemm_path(), *core = openblas_kernels();
    fprintf(out, "OpenBLAS: %s\n", openblas_get_config());
    if (strcmp(path, "avx512") != 0 && strcmp(path, "avx2") != 0) return;
    if (openblas_core_is_wide(core)) return;
    fprintf(out, "  (OpenBLAS runs its %s kernels here: it does not know this CPU; the ratios below are\n"
                 "   against those. OPENBLAS_CORETYPE=%s runs its %s ones)\n",
            core, strcmp(path, "avx512") == 0 ? "SkylakeX" : "Haswell", path);
}
#endif

/* Seconds for one product at shape s (operands of the right extents). */
static double time_once(gemm_fn f, const gemm_shape *s, const float *A, const float *B, float *C) {
    int ta = s->layout[0] == 'T', tb = s->layout[1] == 'T';
    float beta = !ta && tb ? 0.0f : 1.0f; /* the forward overwrites, the backward adds */
    double t = sm_now();
    f(ta, tb, s->M, s->N, s->K, A, ta ? s->M : s->K, B, tb ? s->K : s->N, beta, C);
    return sm_now() - t;
}

/* n zeroed floats from a 64-byte line on, as the model's activations start
 * (its arena): malloc's 16-byte alignment would make every vector load and
 * store of C straddle two lines, for both libraries. */
static float *line_aligned_floats(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, sizeof(float) * n) != 0) {
        fprintf(stderr, "bench: out of memory for %zu floats\n", n);
        exit(1);
    }
    memset(p, 0, sizeof(float) * n);
    return (float *)p;
}

/* Times ours and OpenBLAS's alternately for `rounds` rounds after a
 * warm-up of each; prints GFLOP/s of the medians and their ratio to `out`
 * and returns the ratio, OpenBLAS's time over ours (0 without OpenBLAS). */
static double bench_shape(FILE *out, const gemm_shape *s, int rounds) {
    sm_rng r;
    float *A = line_aligned_floats((size_t)s->M * s->K);
    float *B = line_aligned_floats((size_t)s->K * s->N);
    float *C = line_aligned_floats((size_t)s->M * s->N);
    double t_ours[64], flop = 2.0 * s->M * s->N * s->K, ratio = 0;
    int i;
    if (rounds > 64) rounds = 64;
    sm_rng_seed(&r, 1);
    sm_rng_fill_normal(&r, A, (size_t)s->M * s->K, 1);
    sm_rng_fill_normal(&r, B, (size_t)s->K * s->N, 1);
    fprintf(out, "  %-14s %s %6d x %5d x %5d", s->label, s->layout, s->M, s->N, s->K);
#ifdef SM_BENCH_CBLAS
    {
        double t_blas[64], m_ours, m_blas;
        time_once(ours, s, A, B, C), time_once(blas, s, A, B, C);
        for (i = 0; i < rounds; i++) {
            t_ours[i] = time_once(ours, s, A, B, C);
            t_blas[i] = time_once(blas, s, A, B, C);
        }
        m_ours = median_of(t_ours, rounds), m_blas = median_of(t_blas, rounds);
        ratio = m_blas / m_ours;
        fprintf(out, "  %7.1f  %7.1f  %5.2f\n", flop / m_ours / 1e9, flop / m_blas / 1e9, ratio);
    }
#else
    time_once(ours, s, A, B, C);
    for (i = 0; i < rounds; i++) t_ours[i] = time_once(ours, s, A, B, C);
    fprintf(out, "  %7.1f\n", flop / median_of(t_ours, rounds) / 1e9);
#endif
    free(A), free(B), free(C);
    return ratio;
}

/* Prints a table of the shapes to `out`; returns the geometric mean of the
 * ratios (OpenBLAS's time over ours; 0 without OpenBLAS). */
static double bench_shapes(FILE *out, const gemm_shape *shapes, int n, int rounds) {
    double log_sum = 0;
    int i;
#ifdef SM_BENCH_CBLAS
    print_openblas_kernels(out);
#endif
    fprintf(out, "GEMM GFLOP/s, %d threads, median of %d interleaved rounds (NT: C = A B^T; NN, TN: C +=, as in the model)\n",
            sm_num_threads(), rounds);
#ifdef SM_BENCH_CBLAS
    if (!getenv("OPENBLAS_THREAD_TIMEOUT"))
        fprintf(out, "  (OPENBLAS_THREAD_TIMEOUT unset: OpenBLAS's threads spin after each call and slow the\n"
                     "   OpenMP threads timed next; make bench sets it to 4)\n");
    fprintf(out, "  %-14s %-2s %-22s  %7s  %7s  %5s\n", "what", "", "M x N x K", "ours", "OpenBLAS", "ratio");
#else
    fprintf(out, "  %-14s %-2s %-22s  %7s   (built without OpenBLAS)\n", "what", "", "M x N x K", "ours");
#endif
    for (i = 0; i < n; i++) log_sum += log(bench_shape(out, &shapes[i], rounds));
    return exp(log_sum / n);
}

/* The Makefile's measurement: the GEMMs of the trainer's default preset
 * (tiny, what `make reproduce` trains), its LM head (most of its GEMM time)
 * and its MLP, each in its three layouts. Prints (stdout) the flags that
 * build the trainer on cblas_sgemm when OpenBLAS was faster (ratio below
 * 1), the table and the verdict on stderr. */
static void choose_gemm(void) {
    static const gemm_shape tiny[] = {{"tiny head", "NT", 1024, 8192, 128}, {"tiny head", "NN", 1024, 128, 8192},
                                      {"tiny head", "TN", 8192, 128, 1024}, {"tiny fc", "NT", 1024, 512, 128},
                                      {"tiny fc", "NN", 1024, 128, 512},    {"tiny fc", "TN", 512, 128, 1024}};
    char cpu[256];
    double ratio = bench_shapes(stderr, tiny, 6, 7);
    int use_blas = ratio > 0 && ratio < 1.0;
    cpu_model(cpu, sizeof cpu);
    fprintf(stderr, "sm_sgemm (%s) / OpenBLAS (%s kernels) speed on %s: %.2f (geometric mean): the trainer uses %s\n",
            sm_sgemm_path(), openblas_kernels(), cpu, ratio,
            use_blas ? "OpenBLAS (USE_CBLAS=0 overrides)" : "sm_sgemm (USE_CBLAS=1 overrides)");
    if (use_blas) printf("-DSM_USE_CBLAS -lopenblas\n");
}

/* The GEMMs of one training step: GPT-2 124M at B=4 T=64 (256 tokens,
 * C=768, 4C=3072, vocabulary 50304), then the tiny preset (B=8 T=128: 1024
 * tokens, C=128, 4C=512, vocabulary 8192). Attention's own products are
 * not GEMM calls. */
static const gemm_shape model_shapes[] = {
    {"issue #15", "NT", 768, 3072, 768},
    {"gpt2 qkv", "NT", 256, 2304, 768},   {"gpt2 fc", "NT", 256, 3072, 768},
    {"gpt2 proj", "NT", 256, 768, 3072},  {"gpt2 head", "NT", 256, 50304, 768},
    {"gpt2 qkv", "NN", 256, 768, 2304},   {"gpt2 fc", "NN", 256, 768, 3072},
    {"gpt2 proj", "NN", 256, 3072, 768},  {"gpt2 head", "NN", 256, 768, 50304},
    {"gpt2 qkv", "TN", 2304, 768, 256},   {"gpt2 fc", "TN", 3072, 768, 256},
    {"gpt2 proj", "TN", 768, 3072, 256},  {"gpt2 head", "TN", 50304, 768, 256},
    {"tiny qkv", "NT", 1024, 384, 128},   {"tiny fc", "NT", 1024, 512, 128},
    {"tiny proj", "NT", 1024, 128, 512},  {"tiny head", "NT", 1024, 8192, 128},
    {"tiny fc", "NN", 1024, 128, 512},    {"tiny proj", "NN", 1024, 512, 128},
    {"tiny head", "NN", 1024, 128, 8192}, {"tiny fc", "TN", 512, 128, 1024},
    {"tiny proj", "TN", 128, 512, 1024},  {"tiny head", "TN", 8192, 128, 1024},
};

/* Minor page faults of this process so far. */
static long page_faults(void) {
    struct rusage u;
    return getrusage(RUSAGE_SELF, &u) == 0 ? u.ru_minflt : 0;
}

/* Ours at shape s `calls` times in a row, the packing buffers freed before
 * every call when `fresh`; returns the seconds per call, adds the faults. */
static double time_calls(const gemm_shape *s, const float *A, const float *B, float *C, int calls,
                         int fresh, long *faults) {
    long f0 = page_faults();
    double t = 0;
    int i;
    for (i = 0; i < calls; i++) {
        if (fresh) sm_free_thread_buffers();
        t += time_once(ours, s, A, B, C);
    }
    *faults += page_faults() - f0;
    return t / calls;
}

/* `buffers`: what keeping the packing buffers saves, shape by shape (the
 * tiny preset's: 1 ms products), in a process that has run no other
 * product, so the allocator's state is the one a program's first products
 * meet: glibc returns a freed buffer at the top of its heap to the system,
 * and the next call's first touches fault its pages back, zeroed. */
static void bench_buffers(int rounds) {
    static const gemm_shape tiny[] = {
        {"tiny qkv", "NT", 1024, 384, 128}, {"tiny fc", "NN", 1024, 128, 512},
        {"tiny fc", "TN", 512, 128, 1024},  {"tiny proj", "TN", 128, 512, 1024},
        {"tiny head", "NT", 1024, 8192, 128}};
    int n = (int)(sizeof tiny / sizeof tiny[0]), i, r;
    if (rounds > 64) rounds = 64;
    printf("sm_sgemm, %d threads, 10 calls a round, median of %d interleaved rounds:\n"
           "buffers kept by the thread (as built) vs freed before every call (allocated\n"
           "by each call, as before); page faults per call\n"
           "  %-14s %-2s %-22s  %9s %9s  %7s %7s  %5s\n",
           sm_num_threads(), rounds, "what", "", "M x N x K", "kept ms", "fresh ms", "faults",
           "faults", "ratio");
    for (i = 0; i < n; i++) {
        const gemm_shape *s = &tiny[i];
        float *A = line_aligned_floats((size_t)s->M * s->K);
        float *B = line_aligned_floats((size_t)s->K * s->N);
        float *C = line_aligned_floats((size_t)s->M * s->N);
        double kept[64], fresh[64], m_kept, m_fresh;
        long f_kept = 0, f_fresh = 0;
        time_once(ours, s, A, B, C);
        for (r = 0; r < rounds; r++) {
            kept[r] = time_calls(s, A, B, C, 10, 0, &f_kept);
            fresh[r] = time_calls(s, A, B, C, 10, 1, &f_fresh);
        }
        m_kept = median_of(kept, rounds), m_fresh = median_of(fresh, rounds);
        printf("  %-14s %s %6d x %5d x %5d  %9.3f %9.3f  %7.1f %7.1f  %5.2f\n", s->label, s->layout,
               s->M, s->N, s->K, 1e3 * m_kept, 1e3 * m_fresh, (double)f_kept / (10.0 * rounds),
               (double)f_fresh / (10.0 * rounds), m_fresh / m_kept);
        free(A), free(B), free(C);
    }
}

static void init_model(sm_model *m, const sm_model_config *cfg, int B) {
    sm_error err;
    if (sm_model_init(m, cfg, B, 1, &err) != SM_OK) {
        fprintf(stderr, "bench: %s\n", err.msg);
        exit(1);
    }
}

/* Tokens/s of forward + backward + AdamW at a stated shape. */
/* each: also print every step's time as "gpt2-step SECONDS" (bench/vs_llmc.sh reads them). */
static void bench_step(const char *label, sm_model_config cfg, int B, int steps, int each) {
    sm_model m;
    int *in = (int *)malloc(sizeof(int) * B * cfg.seq_len), *tg = (int *)malloc(sizeof(int) * B * cfg.seq_len);
    int i, s;
    double best = 1e30, params;
    sm_rng r;
    init_model(&m, &cfg, B);
    sm_rng_seed(&r, 2);
    for (i = 0; i < B * cfg.seq_len; i++) in[i] = (int)sm_rng_below(&r, cfg.vocab_size), tg[i] = (int)sm_rng_below(&r, cfg.vocab_size);
    for (s = 0; s < steps + 1; s++) {
        double t = train_step(&m, in, tg, B);
        if (s > 0 && t < best) best = t;
        if (s > 0 && each) printf("gpt2-step %.4f\n", t), fflush(stdout);
    }
    params = (double)m.params.total;
    printf("%s: L%d C%d H%d V%d, B=%d T=%d, %.1fM params: %.3f s/step, %.0f tokens/s, %.1f GFLOP/s (6*N*tokens)\n",
           label, cfg.n_layer, cfg.d_model, cfg.n_head, cfg.vocab_size, B, cfg.seq_len, params / 1e6,
           best, B * cfg.seq_len / best, 6.0 * params * B * cfg.seq_len / best / 1e9);
    sm_model_free(&m);
    free(in), free(tg);
}

/* GPT-2 124M at the shape llm.c's CPU trainer defaults to (B=4, T=64). */
static sm_model_config gpt2_config(void) {
    sm_model_config gpt2 = sm_model_default_config();
    gpt2.vocab_size = 50257, gpt2.seq_len = 64, gpt2.n_layer = 12, gpt2.n_head = 12;
    gpt2.d_model = 768, gpt2.d_ff = 3072;
    return gpt2;
}

/* The trainer's tiny preset (L4 C128 H4, B=8 T=128, V8192) with every
 * module on: Engram-Nine at layer 1 (its hot set needs a token stream),
 * PEER (64K experts) in place of layer 2's MLP, mHC with 4 streams. */
static sm_model_config tiny_all_config(void) {
    sm_model_config c = sm_model_default_config();
    sm_nine_iso iso;
    sm_error err;
    c.use_engram = 1, c.engram.hash.layer_ids[0] = 1;
    c.nine.n_hot[0] = c.nine.n_hot[1] = 20000;
    if (sm_nine_iso_config(&iso, &c.engram.hash, &c.nine, &err) != SM_OK) {
        fprintf(stderr, "bench: %s\n", err.msg);
        exit(1);
    }
    c.use_nine = 1, c.engram.hash = iso.cold, c.nine = iso.nine;
    c.use_peer = 1, c.peer_n_layers = 1, c.peer_layer_ids[0] = 2, c.peer.n_sub = 256;
    c.use_mhc = 1;
    return c;
}

/* Prints a profile's ops (ms per step, share of the measured step) and
 * what no op claimed. */
static void print_profile(const sm_profile *prof, double step_seconds, int steps) {
    double total = sm_profile_total(prof) / steps;
    int op;
    printf("  %-16s %9s %7s\n", "op", "ms/step", "share");
    for (op = 0; op < SM_PROF_COUNT; op++) {
        double t = prof->seconds[op] / steps;
        if (t > 0) printf("  %-16s %9.2f %6.1f%%\n", sm_profile_op_name((sm_profile_op)op), 1e3 * t, 100 * t / step_seconds);
    }
    printf("  %-16s %9.2f %6.1f%%\n  %-16s %9.2f\n", "(no op)", 1e3 * (step_seconds - total),
           100 * (step_seconds - total) / step_seconds, "step", 1e3 * step_seconds);
}

/* Profiles `steps` training steps of cfg at batch B after two warm-up
 * steps, on Zipf-distributed tokens (the hot set, if any, from 200K more). */
static void profile_model(const char *label, sm_model_config cfg, int B, int steps) {
    size_t n_stream = 200000, i, N = (size_t)B * cfg.seq_len;
    int *tokens = (int *)malloc(sizeof(int) * (n_stream + 2 * N));
    uint32_t *ids = (uint32_t *)malloc(sizeof(uint32_t) * n_stream);
    sm_profile prof;
    sm_model m;
    sm_rng r;
    double total = 0;
    int s;
    init_model(&m, &cfg, B);
    sm_rng_seed(&r, 2);
    zipf_tokens(tokens, n_stream + 2 * N, cfg.vocab_size, &r);
    for (i = 0; i < n_stream; i++) ids[i] = (uint32_t)tokens[i];
    if (cfg.use_nine && sm_model_build_hot_set(&m, ids, NULL, n_stream, NULL) != SM_OK) {
        fprintf(stderr, "bench: %s: the hot set failed\n", label);
        exit(1);
    }
    train_step(&m, tokens + n_stream, tokens + n_stream + N, B);
    train_step(&m, tokens + n_stream, tokens + n_stream + N, B);
    memset(&prof, 0, sizeof prof);
    m.params.profile = &prof;
    for (s = 0; s < steps; s++) total += train_step(&m, tokens + n_stream, tokens + n_stream + N, B);
    printf("%s: L%d C%d V%d, B=%d T=%d%s%s%s%s, %d threads; mean of %d steps\n", label, cfg.n_layer,
           cfg.d_model, cfg.vocab_size, B, cfg.seq_len, cfg.use_engram ? ", Engram" : "", cfg.use_nine ? "-Nine" : "",
           cfg.use_peer ? ", PEER" : "", cfg.use_mhc ? ", mHC" : "", sm_num_threads(), steps);
    print_profile(&prof, total / steps, steps);
    sm_model_free(&m);
    free(tokens), free(ids);
}

/* profile [gpt2] [gpt2-1024] [tiny]: gpt2 and tiny when none is named. */
static void profile_presets(int n, char **names) {
    int i, all = n == 0;
    for (i = 0; i < n; i++)
        if (strcmp(names[i], "gpt2") != 0 && strcmp(names[i], "gpt2-1024") != 0 && strcmp(names[i], "tiny") != 0) {
            fprintf(stderr, "bench: unknown preset '%s' (gpt2, gpt2-1024, tiny)\n", names[i]);
            exit(1);
        }
    for (i = 0; i < (all ? 2 : n); i++) {
        const char *name = all ? (i == 0 ? "gpt2" : "tiny") : names[i];
        if (strcmp(name, "gpt2") == 0) {
            profile_model("gpt2-124M", gpt2_config(), 4, 3);
        } else if (strcmp(name, "gpt2-1024") == 0) { /* GPT-2's full context: attention's T^2 shows */
            sm_model_config c = gpt2_config();
            c.seq_len = 1024;
            profile_model("gpt2-124M at T=1024", c, 1, 2);
        } else {
            profile_model("tiny, all modules", tiny_all_config(), 8, 10);
        }
    }
}

static void bench_steps(void) {
    sm_model_config small = sm_model_default_config();
    small.seq_len = 128;
    bench_step("step small", small, 8, 3, 0);
    bench_step("step gpt2-124M", gpt2_config(), 4, 2, 0);
    printf("  llm.c on the same machine: bash bench/vs_llmc.sh LLMC_DIR (interleaved runs, one ratio)\n");
}

/* Mean seconds of an empty parallel region entered `gap` seconds of
 * serial work after the previous one ended. A model step runs hundreds of
 * regions (every op's own); where the wait policy puts idle threads to
 * sleep at once (OMP_WAIT_POLICY=PASSIVE), each one starts by waking them,
 * and on a virtual machine that wake can cost tens of microseconds. */
static volatile int region_sink;
static double region_seconds(double gap, int reps) {
    double total = 0.0;
    int r;
    for (r = 0; r < reps; r++) {
        double t = sm_now();
        while (sm_now() - t < gap) {
        }
        t = sm_now();
#ifdef _OPENMP
#pragma omp parallel
#endif
        region_sink = 1;
        total += sm_now() - t;
    }
    return total / reps;
}

static void bench_regions(void) {
    static const double gaps[3] = {0.0, 20e-6, 100e-6};
    int i;
    printf("one empty parallel region on %d threads, mean of 2000 (OMP_WAIT_POLICY=%s, GOMP_SPINCOUNT=%s):\n",
           sm_num_threads(), getenv("OMP_WAIT_POLICY") ? getenv("OMP_WAIT_POLICY") : "unset",
           getenv("GOMP_SPINCOUNT") ? getenv("GOMP_SPINCOUNT") : "unset");
    region_seconds(0.0, 100); /* the threads exist from here on */
    for (i = 0; i < 3; i++)
        printf("  after %3.0f us of serial work: %6.1f us\n", 1e6 * gaps[i], 1e6 * region_seconds(gaps[i], 2000));
}

int main(int argc, char **argv) {
    char cpu[256];
    if (argc > 1 && strcmp(argv[1], "choose") == 0) {
        choose_gemm();
        return 0;
    }
    cpu_model(cpu, sizeof cpu);
    printf("cpu: %s\nsm_sgemm path: %s\n", cpu, sm_sgemm_path());
    if (sm_sgemm_target_advice()) printf("  (%s)\n", sm_sgemm_target_advice());
    if (argc > 1 && strcmp(argv[1], "regions") == 0) {
        bench_regions();
    } else if (argc > 1 && strcmp(argv[1], "buffers") == 0) {
        int rounds = argc > 2 ? atoi(argv[2]) : 9;
        bench_buffers(rounds > 0 ? rounds : 9);
    } else if (argc > 1 && strcmp(argv[1], "profile") == 0) {
        profile_presets(argc - 2, argv + 2);
    } else if (argc > 1 && strcmp(argv[1], "gpt2-steps") == 0) {
        int steps = argc > 2 ? atoi(argv[2]) : 4;
        bench_step("step gpt2-124M", gpt2_config(), 4, steps > 0 ? steps : 4, 1);
    } else if (argc > 1 && strcmp(argv[1], "shapes") == 0) {
        int rounds = argc > 2 ? atoi(argv[2]) : 5;
        double mean = bench_shapes(stdout, model_shapes, (int)(sizeof model_shapes / sizeof model_shapes[0]),
                                   rounds > 0 ? rounds : 5);
        if (mean > 0) printf("  geometric mean of the ratios: %.2f\n", mean);
    } else {
        gemm_shape s = {"gemm", "NT", 768, 3072, 768};
        if (argc > 3) s.M = atoi(argv[1]), s.N = atoi(argv[2]), s.K = atoi(argv[3]);
        bench_shapes(stdout, &s, 1, 7);
        bench_steps();
    }
    return 0;
}
