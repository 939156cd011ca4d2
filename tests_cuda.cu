/* tests_cuda.cu - the CUDA backend checked against the CPU reference.
 *
 *   ./tests_cuda         run everything (skips, passing, without a GPU)
 *   ./tests_cuda NAME    run the tests whose name contains NAME
 *
 * Each test runs a layer on the CPU (sparsemem.h) and on the GPU on the same
 * inputs and compares with a stated tolerance; GEMMs run in full fp32
 * (tf32 off) here. The last line is "N passed, N failed"; the exit status
 * is non-zero when anything failed. */
#define SPARSEMEM_IMPLEMENTATION
#include "sparsemem.h"
#define SPARSEMEM_CUDA_IMPLEMENTATION
#include "sparsemem_cuda.cuh"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- harness -------------------------------------------------------- */

#include "tests_harness.h"

static smc_ctx T_GPU; /* the context every test uses */

/* Waits for the GPU and fails the test on a CUDA error. */
#define CHECK_SYNC(what)                                                                     \
    do {                                                                                     \
        sm_error t__e;                                                                       \
        CHECK(smc_sync(&T_GPU, what, &t__e) == SM_OK, "%s", t__e.msg);                       \
    } while (0)

/* A device copy of n floats (or ints, of the same size) from the host. */
static void *t_dev(const void *host, size_t n) {
    sm_error err;
    void *d = smc_malloc(n * 4, "test buffer", &err);
    if (!d || (host && smc_upload(d, host, n * 4, &err) != SM_OK)) {
        fprintf(stderr, "tests_cuda: %s\n", err.msg);
        exit(2);
    }
    return d;
}

/* The device buffer d (n floats) back on the host (freed by the caller). */
static float *t_host(const void *d, size_t n) {
    sm_error err;
    float *h = (float *)t_alloc(n);
    if (smc_download(h, d, n * 4, &err) != SM_OK) {
        fprintf(stderr, "tests_cuda: %s\n", err.msg);
        exit(2);
    }
    return h;
}

/* max_i |a_i - b_i| / (1 + |b_i|): absolute near 0, relative elsewhere. */
static double t_err(const float *a, const float *b, size_t n) {
    double m = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]) / (1.0 + fabs((double)b[i]));
        if (d > m || d != d) m = d;
    }
    return m;
}

/* The device buffer d against the host reference ref: fails the test when
 * the error (t_err) is above tol. Frees the downloaded copy. */
#define CHECK_CLOSE(d, ref, n, tol, what)                                                    \
    do {                                                                                     \
        float *t__h = t_host(d, n);                                                          \
        double t__e = t_err(t__h, ref, n);                                                   \
        free(t__h);                                                                          \
        CHECK(t__e <= (tol), "%s: GPU vs CPU error %.3g > %.3g", what, t__e, (double)(tol)); \
    } while (0)

/* ---- >>util  context, >>gemm ---------------------------------------- */

static int test_gemm_all_transposes(void) {
    const int M = 37, N = 29, K = 53;
    sm_rng r;
    int ta, tb;
    sm_rng_seed(&r, 1);
    for (ta = 0; ta < 2; ta++)
        for (tb = 0; tb < 2; tb++) {
            float *A = t_randn(&r, (size_t)M * K, 1), *B = t_randn(&r, (size_t)K * N, 1);
            float *C = t_randn(&r, (size_t)M * N, 1), *ref = (float *)t_alloc((size_t)M * N);
            float *dA = (float *)t_dev(A, (size_t)M * K), *dB = (float *)t_dev(B, (size_t)K * N);
            float *dC = (float *)t_dev(C, (size_t)M * N);
            int i, j, k;
            for (i = 0; i < M; i++)
                for (j = 0; j < N; j++) {
                    double s = 0;
                    for (k = 0; k < K; k++)
                        s += (double)(ta ? A[k * M + i] : A[i * K + k]) *
                             (tb ? B[j * K + k] : B[k * N + j]);
                    ref[i * N + j] = (float)(2.0 * s + 0.5 * C[i * N + j]);
                }
            smc_sgemm(&T_GPU, ta, tb, M, N, K, 2.0f, dA, ta ? M : K, dB, tb ? K : N, 0.5f, dC, N);
            CHECK_SYNC("sgemm");
            CHECK_CLOSE(dC, ref, (size_t)M * N, 1e-5, "sgemm");
            free(A), free(B), free(C), free(ref);
            smc_dfree(dA), smc_dfree(dB), smc_dfree(dC);
        }
    return 0;
}

static int test_device_errors_named(void) {
    sm_error err;
    smc_ctx c;
    CHECK(smc_init(&c, 9999, &err) == SM_ERR_INVALID_ARG, "device 9999 accepted");
    CHECK(strstr(err.msg, "9999") != NULL, "message does not name the device: %s", err.msg);
    CHECK(smc_malloc((size_t)1 << 60, "huge table", &err) == NULL, "2^60 bytes allocated");
    CHECK(err.code == SM_ERR_OOM && strstr(err.msg, "huge table"), "OOM message: %s", err.msg);
    return 0;
}

/* ---- >>mphf  MPHF, >>engram n-gram hashing, >>nine routing ---------- */
/* Lookups, fingerprints, hashing and routing are integer code: the GPU must
 * give the CPU's results bit for bit. The Engram layer is compared with
 * t_err tolerances: 0 for the gathered rows (copies), 1e-5 for the forward
 * (fp32 row sums where the CPU sums in double, cuBLAS vs CPU GEMM order) and
 * 1e-4 for the gradients (the same plus atomics summing the table, gain, bias
 * and conv gradients in no fixed order). */

/* A device copy of `bytes` bytes (host may be NULL: zeroed). */
static void *t_engram_dev_bytes(const void *host, size_t bytes) {
    sm_error err;
    void *d = smc_malloc(bytes, "test bytes", &err);
    if (!d || (host && smc_upload(d, host, bytes, &err) != SM_OK)) {
        fprintf(stderr, "tests_cuda: %s\n", err.msg);
        exit(2);
    }
    return d;
}

/* The device bytes back on the host (freed by the caller). */
static unsigned char *t_engram_host_bytes(const void *d, size_t bytes) {
    sm_error err;
    unsigned char *h = (unsigned char *)t_alloc(bytes / 4 + 1);
    if (smc_download(h, d, bytes, &err) != SM_OK) {
        fprintf(stderr, "tests_cuda: %s\n", err.msg);
        exit(2);
    }
    return h;
}

/* Whether the device bytes equal the host reference. */
static int t_engram_same(const void *d, const void *ref, size_t bytes) {
    unsigned char *h = t_engram_host_bytes(d, bytes);
    int same = memcmp(h, ref, bytes) == 0;
    free(h);
    return same;
}

static int t_engram_cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* keys[i] = sm_mix64(first + i): distinct, as sm_mix64 is a bijection. */
static uint64_t *t_engram_keys(uint64_t first, size_t n) {
    uint64_t *k = (uint64_t *)t_alloc(2 * n);
    size_t i;
    for (i = 0; i < n; i++) k[i] = sm_mix64(first + i);
    return k;
}

/* Members 1..n of an MPHF and 50000 non-members, on the GPU and the CPU,
 * for sizes down to the empty set. The 100K build has escaped pilots and a
 * remap table, so every lookup path runs. */
static int test_engram_mphf_lookup(void) {
    static const size_t sizes[] = {0, 1, 7, 100000};
    const size_t outside = 50000;
    sm_mphf_config cfg = sm_mphf_default_config();
    size_t s;
    for (s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s], nq = n + outside;
        uint64_t *q = t_engram_keys(1, nq); /* q[0..n) are the members */
        uint32_t *ref = (uint32_t *)t_alloc(nq);
        uint64_t *dq = (uint64_t *)t_dev(q, 2 * nq);
        uint32_t *dout = (uint32_t *)t_dev(NULL, nq);
        sm_mphf f;
        smc_mphf df;
        sm_error err;
        CHECK_OK(sm_mphf_build(&f, q, n, &cfg, &err));
        if (n == 100000)
            CHECK(f.num_overflow > 0 && f.table_size > f.n, "build has no escapes or no remap");
        CHECK_OK(smc_mphf_upload(&df, &f, &err));
        sm_mphf_lookup_batch(&f, q, ref, nq);
        smc_mphf_lookup_batch(&T_GPU, &df, dq, dout, nq);
        CHECK_SYNC("mphf lookup");
        CHECK(t_engram_same(dout, ref, nq * 4), "mphf of %zu keys: GPU slots differ", n);
        smc_mphf_free(&df);
        sm_mphf_free(&f);
        free(q), free(ref);
        smc_dfree(dq), smc_dfree(dout);
    }
    return 0;
}

/* Membership of 20000 members and 50000 non-members with 8- and 16-bit
 * fingerprints (about 200 / 1 false positives), GPU against CPU. */
static int test_engram_fingerprints(void) {
    const size_t n = 20000, nq = n + 50000;
    sm_mphf_config cfg = sm_mphf_default_config();
    uint64_t *q = t_engram_keys(12345, nq);
    uint64_t *dq = (uint64_t *)t_dev(q, 2 * nq);
    unsigned char *ref = (unsigned char *)t_alloc(nq / 4 + 1);
    unsigned char *dout = (unsigned char *)t_engram_dev_bytes(NULL, nq);
    sm_mphf f;
    smc_mphf df;
    sm_error err;
    int bits;
    CHECK_OK(sm_mphf_build(&f, q, n, &cfg, &err));
    CHECK_OK(smc_mphf_upload(&df, &f, &err));
    for (bits = 8; bits <= 16; bits += 8) {
        sm_fingerprints fp;
        smc_fingerprints dfp;
        size_t i;
        CHECK_OK(sm_fingerprints_build(&fp, &f, q, n, bits, &err));
        CHECK_OK(smc_fingerprints_upload(&dfp, &fp, &err));
        for (i = 0; i < nq; i++) ref[i] = (unsigned char)sm_fingerprints_contains(&fp, &f, q[i]);
        smc_fingerprints_contains_batch(&T_GPU, &dfp, &df, dq, dout, nq);
        CHECK_SYNC("fingerprints");
        CHECK(t_engram_same(dout, ref, nq), "%d-bit fingerprints: GPU membership differs", bits);
        smc_fingerprints_free(&dfp);
        sm_fingerprints_free(&fp);
    }
    smc_mphf_free(&df);
    sm_mphf_free(&f);
    free(q), free(ref);
    smc_dfree(dq), smc_dfree(dout);
    return 0;
}

/* doc_start[B*T] with ~1/every starts, plus one at the first position and,
 * with several sequences, two in a row in the second. */
static unsigned char *t_engram_doc_starts(sm_rng *r, int B, int T, uint32_t every) {
    unsigned char *s = (unsigned char *)t_alloc((size_t)B * T / 4 + 1);
    int i;
    for (i = 0; i < B * T; i++) s[i] = sm_rng_below(r, every) == 0;
    s[0] = 1;
    if (B > 1 && T > 7) s[T + 5] = s[T + 6] = 1;
    return s;
}

/* Rows and flat indices of every layer, bit-identical to the CPU: orders up
 * to the longest (8), full 32-bit token ids (64-bit products), own and
 * shared tables, document resets on and off, doc_start NULL. */
static int test_engram_ngram_hash(void) {
    const int B = 3, T = 45, N = B * T;
    static const int variants[4][3] = {{0, 1, 1}, {1, 1, 1}, {0, 0, 1}, {0, 1, 0}};
    sm_rng r;
    uint32_t *tok;
    unsigned char *doc;
    uint32_t *dtok, *drows, *dflat;
    unsigned char *ddoc;
    int v, i;
    sm_rng_seed(&r, 7);
    tok = (uint32_t *)t_alloc((size_t)N);
    for (i = 0; i < N; i++) tok[i] = (uint32_t)(sm_rng_u64(&r) >> 32);
    doc = t_engram_doc_starts(&r, B, T, 8);
    dtok = (uint32_t *)t_dev(tok, (size_t)N);
    ddoc = (unsigned char *)t_engram_dev_bytes(doc, (size_t)N);
    for (v = 0; v < 4; v++) {
        sm_ngram_hash_config hc = sm_ngram_hash_default_config();
        sm_ngram_hash h;
        smc_ngram_hash dh;
        sm_error err;
        int layer;
        hc.n_orders = 3, hc.orders[0] = 1, hc.orders[1] = 3, hc.orders[2] = 8;
        hc.n_heads = 3, hc.table_rows = 1000, hc.pad_id = 77, hc.extra_rows = 13;
        hc.n_layers = 3, hc.layer_ids[0] = 0, hc.layer_ids[1] = 2, hc.layer_ids[2] = 5;
        hc.share_tables = variants[v][0], hc.reset_at_doc = variants[v][1];
        CHECK_OK(sm_ngram_hash_init(&h, &hc, &err));
        CHECK_OK(smc_ngram_hash_upload(&dh, &h, &err));
        drows = (uint32_t *)t_dev(NULL, (size_t)N * h.n_slots);
        dflat = (uint32_t *)t_dev(NULL, (size_t)N * h.n_slots);
        for (layer = 0; layer < hc.n_layers; layer++) {
            uint32_t *rows = (uint32_t *)t_alloc((size_t)N * h.n_slots);
            uint32_t *flat = (uint32_t *)t_alloc((size_t)N * h.n_slots);
            const unsigned char *d = variants[v][2] ? doc : NULL;
            CHECK_OK(sm_ngram_hash_compute(&h, layer, rows, flat, tok, d, B, T, &err));
            /* sentinels: a row or index the GPU did not write cannot match */
            cudaMemset(drows, 0xff, (size_t)N * h.n_slots * 4);
            cudaMemset(dflat, 0xff, (size_t)N * h.n_slots * 4);
            CHECK_OK(smc_ngram_hash_compute(&T_GPU, &dh, layer, drows, dflat, dtok,
                                            variants[v][2] ? ddoc : NULL, B, T, &err));
            CHECK_SYNC("ngram hash");
            CHECK(t_engram_same(drows, rows, (size_t)N * h.n_slots * 4),
                  "variant %d layer %d: rows differ", v, layer);
            CHECK(t_engram_same(dflat, flat, (size_t)N * h.n_slots * 4),
                  "variant %d layer %d: flat indices differ", v, layer);
            free(rows), free(flat);
        }
        CHECK(smc_ngram_hash_compute(&T_GPU, &dh, 3, NULL, dflat, dtok, NULL, B, T, &err) ==
                  SM_ERR_INVALID_ARG && strstr(err.msg, "layer 3"),
              "layer 3 of 3 accepted or not named: %s", err.msg);
        smc_dfree(drows), smc_dfree(dflat);
        smc_ngram_hash_free(&dh);
        sm_ngram_hash_free(&h);
    }
    free(tok), free(doc);
    smc_dfree(dtok), smc_dfree(ddoc);
    return 0;
}

/* Tokens below vocab, skewed to small ids (the min of two draws) so that
 * n-grams repeat and a hot set covers many positions. */
static uint32_t *t_engram_skewed_tokens(sm_rng *r, int n, uint32_t vocab) {
    uint32_t *t = (uint32_t *)t_alloc((size_t)n);
    int i;
    for (i = 0; i < n; i++) {
        uint32_t a = sm_rng_below(r, vocab), b = sm_rng_below(r, vocab);
        t[i] = a < b ? a : b;
    }
    return t;
}

/* sm_nine_route against smc_nine_route on a small hot set: MPHF and
 * membership-only routing, 8- and 16-bit fingerprints, an order without a
 * hot tier, both layers (own tables), and the hot-flags-only call. */
static int test_engram_nine_route(void) {
    const int n_train = 4000, B = 4, T = 37, N = B * T;
    sm_ngram_hash_config hc = sm_ngram_hash_default_config();
    sm_rng r;
    uint32_t *train, *tok, *dtok, *dflat;
    unsigned char *train_doc, *doc, *ddoc, *dhot;
    int mode;
    sm_rng_seed(&r, 99);
    hc.n_orders = 3, hc.orders[0] = 2, hc.orders[1] = 3, hc.orders[2] = 4;
    hc.n_heads = 2, hc.table_rows = 97, hc.pad_id = 3;
    hc.n_layers = 2, hc.layer_ids[0] = 1, hc.layer_ids[1] = 3;
    train = t_engram_skewed_tokens(&r, n_train, 12);
    train_doc = t_engram_doc_starts(&r, 1, n_train, 50);
    tok = t_engram_skewed_tokens(&r, N, 12);
    doc = t_engram_doc_starts(&r, B, T, 20);
    dtok = (uint32_t *)t_dev(tok, (size_t)N);
    ddoc = (unsigned char *)t_engram_dev_bytes(doc, (size_t)N);
    dhot = (unsigned char *)t_engram_dev_bytes(NULL, (size_t)N * hc.n_orders);
    for (mode = 0; mode < 4; mode++) {
        sm_nine_config nc = sm_nine_default_config();
        sm_ngram_hash h;
        sm_nine nine;
        smc_ngram_hash dh;
        smc_nine dn;
        sm_error err;
        int layer, i, n_hot = 0;
        nc.n_hot[0] = 40, nc.n_hot[1] = 0, nc.n_hot[2] = 25;
        nc.fingerprint_bits = mode & 1 ? 16 : 8;
        nc.route = mode & 2 ? SM_NINE_ROUTE_MEMBERSHIP : SM_NINE_ROUTE_MPHF;
        hc.extra_rows = (uint32_t)sm_nine_hot_rows(&nc, &hc);
        CHECK_OK(sm_ngram_hash_init(&h, &hc, &err));
        CHECK_OK(sm_nine_build(&nine, &h, train, train_doc, n_train, &nc, &err));
        CHECK_OK(smc_ngram_hash_upload(&dh, &h, &err));
        CHECK_OK(smc_nine_upload(&dn, &nine, &err));
        dflat = (uint32_t *)t_dev(NULL, (size_t)N * h.n_slots);
        for (layer = 0; layer < hc.n_layers; layer++) {
            uint32_t *flat = (uint32_t *)t_alloc((size_t)N * h.n_slots);
            unsigned char *hot = (unsigned char *)t_alloc((size_t)N * hc.n_orders / 4 + 1);
            CHECK_OK(sm_nine_route(&nine, &h, layer, flat, hot, tok, doc, B, T, &err));
            cudaMemset(dflat, 0xff, (size_t)N * h.n_slots * 4); /* sentinels, as above */
            cudaMemset(dhot, 0xab, (size_t)N * hc.n_orders);
            CHECK_OK(smc_nine_route(&T_GPU, &dn, &dh, layer, dflat, dhot, dtok, ddoc, B, T,
                                    &err));
            CHECK_SYNC("nine route");
            CHECK(t_engram_same(dflat, flat, (size_t)N * h.n_slots * 4),
                  "mode %d layer %d: routed flat indices differ", mode, layer);
            CHECK(t_engram_same(dhot, hot, (size_t)N * hc.n_orders),
                  "mode %d layer %d: hot flags differ", mode, layer);
            cudaMemset(dhot, 0xab, (size_t)N * hc.n_orders);
            CHECK_OK(smc_nine_route(&T_GPU, &dn, &dh, layer, NULL, dhot, dtok, ddoc, B, T, &err));
            CHECK_SYNC("nine route, flags only");
            CHECK(t_engram_same(dhot, hot, (size_t)N * hc.n_orders),
                  "mode %d layer %d: hot flags (no flat) differ", mode, layer);
            for (i = 0; i < N; i++) n_hot += hot[(size_t)i * hc.n_orders];
            free(flat), free(hot);
        }
        CHECK(n_hot > 0 && n_hot < 2 * N, "%d of %d bigram positions hot: not a useful test",
              n_hot, 2 * N);
        smc_dfree(dflat);
        smc_nine_free(&dn);
        smc_ngram_hash_free(&dh);
        sm_nine_free(&nine);
        sm_ngram_hash_free(&h);
    }
    free(train), free(train_doc), free(tok), free(doc);
    smc_dfree(dtok), smc_dfree(ddoc), smc_dfree(dhot);
    return 0;
}

/* ---- >>engram  the Engram layer ------------------------------------- */

/* Views of one buffer laid out as table | w_key | b_key | w_value | gains |
 * conv | w_key_hot | gate_hot (the variants only when on). */
static void t_engram_view(sm_engram_params *p, float *base, const sm_engram_config *c,
                          size_t table) {
    size_t d = (size_t)c->d_model, dm = (size_t)sm_engram_d_mem(c);
    p->table = base;
    p->w_key = base + table;
    p->b_key = p->w_key + d * dm;
    p->w_value = p->b_key + d;
    p->norm_query = p->w_value + d * dm;
    p->norm_key = p->norm_query + d;
    p->norm_value = p->norm_key + d;
    p->conv = p->norm_value + d;
    p->w_key_hot = c->hot_key_proj ? p->conv + d * SM_ENGRAM_CONV_KERNEL : NULL;
    p->gate_hot = c->hot_gate ? p->conv + d * SM_ENGRAM_CONV_KERNEL +
                                    (c->hot_key_proj ? d * dm : 0)
                              : NULL;
}

/* Scales the N(0,1) parameters to a trained-looking layer: W ~ N(0, 1/d_mem),
 * gains 1 + N(0, 0.2^2), small bias, a conv that is not zero. */
static void t_engram_shape_params(const sm_engram_params *p, const sm_engram_config *c) {
    size_t d = (size_t)c->d_model, dm = (size_t)sm_engram_d_mem(c), i;
    float w = 1.0f / sqrtf((float)dm);
    for (i = 0; i < d * dm; i++) {
        p->w_key[i] *= w, p->w_value[i] *= w;
        if (p->w_key_hot) p->w_key_hot[i] *= w;
    }
    for (i = 0; i < d; i++) {
        p->b_key[i] *= 0.1f;
        p->norm_query[i] = 1.0f + 0.2f * p->norm_query[i];
        p->norm_key[i] = 1.0f + 0.2f * p->norm_key[i];
        p->norm_value[i] = 1.0f + 0.2f * p->norm_value[i];
    }
    for (i = 0; i < d * SM_ENGRAM_CONV_KERNEL; i++) p->conv[i] *= 0.5f;
    if (p->gate_hot)
        for (i = 0; i < (size_t)c->hash.n_orders; i++) p->gate_hot[i] *= 0.5f;
}

typedef struct t_engram_case {
    int signed_sqrt, hot_key_proj, hot_gate;
    int routed;   /* call the _routed functions */
    int with_hot; /* random hot flags (else NULL: all cold) */
    int with_dh;  /* dh given (else NULL) */
} t_engram_case;

typedef struct t_engram_pair {
    const char *name;
    const float *dev, *ref;
    size_t n;
    double tol;
} t_engram_pair;

static int t_engram_check_pairs(const t_engram_pair *pairs, int n) {
    int i;
    for (i = 0; i < n; i++)
        if (pairs[i].ref) CHECK_CLOSE(pairs[i].dev, pairs[i].ref, pairs[i].n, pairs[i].tol,
                                      pairs[i].name);
    return 0;
}

/* Every saved activation; e (and its tier split) are copies: exact. */
static int t_engram_check_acts(const sm_engram_acts *g, const sm_engram_acts *a, size_t N,
                               size_t d, size_t dm) {
    const t_engram_pair pairs[] = {
        {"acts.e", g->e, a->e, N * dm, 0.0},
        {"acts.e_cold", g->e_cold, a->e_cold, N * dm, 0.0},
        {"acts.e_hot", g->e_hot, a->e_hot, N * dm, 0.0},
        {"acts.key", g->key, a->key, N * d, 1e-5},
        {"acts.key_n", g->key_n, a->key_n, N * d, 1e-5},
        {"acts.query_n", g->query_n, a->query_n, N * d, 1e-5},
        {"acts.value", g->value, a->value, N * d, 1e-5},
        {"acts.v", g->v, a->v, N * d, 1e-5},
        {"acts.v_n", g->v_n, a->v_n, N * d, 1e-5},
        {"acts.conv", g->conv, a->conv, N * d, 1e-5},
        {"acts.rstd_key", g->rstd_key, a->rstd_key, N, 1e-5},
        {"acts.rstd_query", g->rstd_query, a->rstd_query, N, 1e-5},
        {"acts.rstd_v", g->rstd_v, a->rstd_v, N, 1e-5},
        {"acts.gate", g->gate, a->gate, N, 1e-5},
        {"acts.alpha", g->alpha, a->alpha, N, 1e-5},
    };
    return t_engram_check_pairs(pairs, (int)(sizeof pairs / sizeof pairs[0]));
}

/* Every gradient (accumulated onto the same random start on both sides). */
static int t_engram_check_grads(const sm_engram_params *g, const sm_engram_params *ref,
                                size_t table, const sm_engram_config *c) {
    size_t d = (size_t)c->d_model, dm = (size_t)sm_engram_d_mem(c);
    const t_engram_pair pairs[] = {
        {"grad table", g->table, ref->table, table, 1e-4},
        {"grad w_key", g->w_key, ref->w_key, d * dm, 1e-4},
        {"grad b_key", g->b_key, ref->b_key, d, 1e-4},
        {"grad w_value", g->w_value, ref->w_value, d * dm, 1e-4},
        {"grad norm_query", g->norm_query, ref->norm_query, d, 1e-4},
        {"grad norm_key", g->norm_key, ref->norm_key, d, 1e-4},
        {"grad norm_value", g->norm_value, ref->norm_value, d, 1e-4},
        {"grad conv", g->conv, ref->conv, d * SM_ENGRAM_CONV_KERNEL, 1e-4},
        {"grad w_key_hot", g->w_key_hot, ref->w_key_hot, d * dm, 1e-4},
        {"grad gate_hot", g->gate_hot, ref->gate_hot, (size_t)c->hash.n_orders, 1e-4},
    };
    return t_engram_check_pairs(pairs, (int)(sizeof pairs / sizeof pairs[0]));
}

/* The GPU's touched rows equal the CPU's as sets. */
static int t_engram_check_rows(smc_row_set *got, sm_row_set *ref) {
    size_t n = smc_row_set_count(&T_GPU, got);
    uint32_t *rows;
    CHECK(n == ref->count, "touched rows: GPU %zu, CPU %zu", n, ref->count);
    rows = (uint32_t *)t_host(got->rows, n);
    qsort(rows, n, sizeof *rows, t_engram_cmp_u32);
    sm_row_set_sort(ref);
    CHECK(memcmp(rows, ref->rows, n * sizeof *rows) == 0, "touched rows differ as sets");
    free(rows);
    return 0;
}

/* The Engram layer forward and backward (twice, accumulating) on the CPU and
 * the GPU from the same inputs, parameters and gradient start: d_model 40
 * and N = 57 (not multiples of a warp or a block), 11-row heads (rows shared
 * by several positions), document starts, the dilation-3 conv. */
static int t_engram_layer_check(const t_engram_case *k) {
    const int B = 3, T = 19, N = B * T;
    sm_engram_config cfg = sm_engram_default_config();
    sm_ngram_hash hash;
    sm_engram_params p, g, dp, dg;
    sm_engram_acts acts, dacts;
    sm_engram_scratch scr, dscr;
    sm_row_set rows;
    smc_row_set drows;
    sm_error err;
    sm_rng r;
    size_t table, total, nd, i;
    int d, dm, n_slots, rep;
    uint32_t *tok, *flat, *dflat;
    unsigned char *doc, *hot = NULL, *dhot = NULL;
    float *P, *G, *dP, *dG, *h, *dout, *dh, *out, *d_h, *d_dout, *d_dh = NULL, *d_out;
    double min_gate = 1e30;
    cfg.hash.n_orders = 2, cfg.hash.orders[0] = 2, cfg.hash.orders[1] = 3;
    cfg.hash.n_heads = 2, cfg.hash.table_rows = 11, cfg.hash.layer_ids[0] = 0;
    cfg.d_model = 40, cfg.d_head = 6;
    cfg.signed_sqrt_gate = k->signed_sqrt;
    cfg.hot_key_proj = k->hot_key_proj, cfg.hot_gate = k->hot_gate;
    CHECK_OK(sm_engram_config_validate(&cfg, &err));
    CHECK_OK(sm_ngram_hash_init(&hash, &cfg.hash, &err));
    d = cfg.d_model, dm = sm_engram_d_mem(&cfg), n_slots = hash.n_slots;
    nd = (size_t)N * d;
    table = sm_engram_table_size(&hash, &cfg);
    total = table + sm_engram_layer_size(&cfg);
    sm_rng_seed(&r, 26);
    /* inputs: n-gram indices (with document starts), hot flags, h, dout */
    tok = t_engram_skewed_tokens(&r, N, 7);
    doc = t_engram_doc_starts(&r, B, T, 10);
    flat = (uint32_t *)t_alloc((size_t)N * n_slots);
    CHECK_OK(sm_ngram_hash_compute(&hash, 0, NULL, flat, tok, doc, B, T, &err));
    if (k->with_hot) {
        hot = (unsigned char *)t_alloc((size_t)N * cfg.hash.n_orders / 4 + 1);
        for (i = 0; i < (size_t)N * cfg.hash.n_orders; i++) hot[i] = sm_rng_below(&r, 5) < 2;
        dhot = (unsigned char *)t_engram_dev_bytes(hot, (size_t)N * cfg.hash.n_orders);
    }
    h = t_randn(&r, nd, 1.0f), dout = t_randn(&r, nd, 1.0f), dh = t_randn(&r, nd, 0.1f);
    out = (float *)t_alloc(nd);
    /* parameters and a nonzero gradient start (backward accumulates) */
    P = t_randn(&r, total, 1.0f), G = t_randn(&r, total, 0.1f);
    t_engram_view(&p, P, &cfg, table);
    t_engram_view(&g, G, &cfg, table);
    t_engram_shape_params(&p, &cfg);
    dP = (float *)t_dev(P, total), dG = (float *)t_dev(G, total);
    t_engram_view(&dp, dP, &cfg, table);
    t_engram_view(&dg, dG, &cfg, table);
    dflat = (uint32_t *)t_dev(flat, (size_t)N * n_slots);
    d_h = (float *)t_dev(h, nd), d_dout = (float *)t_dev(dout, nd);
    d_out = (float *)t_dev(NULL, nd);
    if (k->with_dh) d_dh = (float *)t_dev(dh, nd);
    /* CPU */
    CHECK_OK(sm_engram_acts_alloc(&acts, &cfg, N, &err));
    CHECK_OK(sm_engram_scratch_alloc(&scr, &cfg, N, &err));
    CHECK_OK(sm_row_set_init(&rows, hash.total_rows, &err));
    if (k->routed)
        sm_engram_forward_routed(out, &acts, h, flat, hot, &p, &cfg, B, T);
    else
        sm_engram_forward(out, &acts, h, flat, &p, &cfg, B, T);
    for (rep = 0; rep < 2; rep++) /* twice: gradients accumulate, the scratch is reused */
        if (k->routed)
            sm_engram_backward_routed(k->with_dh ? dh : NULL, &g, &rows, dout, h, flat, hot, &p,
                                      &acts, &scr, &cfg, B, T);
        else
            sm_engram_backward(k->with_dh ? dh : NULL, &g, &rows, dout, h, flat, &p, &acts, &scr,
                               &cfg, B, T);
    /* keep the gate off the signed sqrt's kink, where rounding is amplified */
    for (i = 0; i < (size_t)N; i++)
        if (fabs(acts.gate[i]) < min_gate) min_gate = fabs(acts.gate[i]);
    CHECK(!k->signed_sqrt || min_gate > 0.02, "min |gate| %.3g: pick another seed", min_gate);
    /* GPU */
    CHECK_OK(smc_engram_acts_alloc(&dacts, &cfg, N, &err));
    CHECK_OK(smc_engram_scratch_alloc(&dscr, &cfg, N, &err));
    CHECK_OK(smc_row_set_init(&drows, hash.total_rows, &err));
    if (k->routed)
        smc_engram_forward_routed(&T_GPU, d_out, &dacts, d_h, dflat, dhot, &dp, &cfg, B, T);
    else
        smc_engram_forward(&T_GPU, d_out, &dacts, d_h, dflat, &dp, &cfg, B, T);
    for (rep = 0; rep < 2; rep++)
        if (k->routed)
            smc_engram_backward_routed(&T_GPU, d_dh, &dg, &drows, d_dout, d_h, dflat, dhot, &dp,
                                       &dacts, &dscr, &cfg, B, T);
        else
            smc_engram_backward(&T_GPU, d_dh, &dg, &drows, d_dout, d_h, dflat, &dp, &dacts,
                                &dscr, &cfg, B, T);
    CHECK_SYNC("engram forward + backward");
    CHECK_CLOSE(d_out, out, nd, 1e-5, "out");
    if (t_engram_check_acts(&dacts, &acts, (size_t)N, (size_t)d, (size_t)dm)) return 1;
    if (k->with_dh) CHECK_CLOSE(d_dh, dh, nd, 1e-4, "dh");
    if (t_engram_check_grads(&dg, &g, table, &cfg)) return 1;
    if (t_engram_check_rows(&drows, &rows)) return 1;
    sm_engram_acts_free(&acts), sm_engram_scratch_free(&scr), sm_row_set_free(&rows);
    smc_engram_acts_free(&dacts), smc_engram_scratch_free(&dscr), smc_row_set_free(&drows);
    sm_ngram_hash_free(&hash);
    free(tok), free(doc), free(flat), free(hot), free(h), free(dout), free(dh), free(out);
    free(P), free(G);
    smc_dfree(dP), smc_dfree(dG), smc_dfree(dflat), smc_dfree(dhot), smc_dfree(d_h);
    smc_dfree(d_dout), smc_dfree(d_dh), smc_dfree(d_out);
    return 0;
}

/* The default layer (signed-sqrt gate), through smc_engram_forward/backward. */
static int test_engram_layer(void) {
    const t_engram_case k = {1, 0, 0, 0, 0, 1};
    return t_engram_layer_check(&k);
}

/* The paper's plain gate, and backward without dh. */
static int test_engram_layer_plain_gate(void) {
    const t_engram_case k = {0, 0, 0, 0, 0, 0};
    return t_engram_layer_check(&k);
}

/* Both Engram-Nine variants (W_K^hot per order block, hot-gate scalars) on
 * random hot flags, through the _routed functions. */
static int test_engram_layer_routed(void) {
    const t_engram_case k = {1, 1, 1, 1, 1, 1};
    return t_engram_layer_check(&k);
}

/* The variants on with hot = NULL (all cold): W_K^hot and gate_hot get zero
 * gradient, the layer is the plain one. */
static int test_engram_layer_routed_all_cold(void) {
    const t_engram_case k = {1, 1, 1, 1, 0, 1};
    return t_engram_layer_check(&k);
}

#define SMC_TESTS_ENGRAM                                                                     \
    T(test_engram_mphf_lookup), T(test_engram_fingerprints), T(test_engram_ngram_hash),     \
        T(test_engram_nine_route), T(test_engram_layer), T(test_engram_layer_plain_gate),  \
        T(test_engram_layer_routed), T(test_engram_layer_routed_all_cold)

/* ---- >>peer  PEER --------------------------------------------------- */

/* n int32 values from the device (freed by the caller). */
static int32_t *t_peer_ids(const void *d, size_t n) {
    return (int32_t *)t_host(d, n); /* t_host copies raw 4-byte words */
}

static int t_peer_cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Top-k with many ties (scores from 6 values) against sm_topk, exactly:
 * ids, order and values. Lengths not a multiple of 32, n == k, k = 1, 32. */
static int test_peer_topk_ties_like_cpu(void) {
    const int rows = 19, ns[3] = {70, 32, 5}, ks[3] = {1, 7, 32};
    sm_rng r;
    int a, b;
    sm_rng_seed(&r, 41);
    for (a = 0; a < 3; a++)
        for (b = 0; b < 3; b++) {
            int n = ns[a], k = ks[b] < n ? ks[b] : n, row, i;
            float *sc = (float *)t_alloc((size_t)rows * n), *val = (float *)t_alloc(k);
            float *d_sc, *d_val, *g_val;
            int *d_idx, *g_idx, idx[SM_TOPK_MAX];
            for (i = 0; i < rows * n; i++) sc[i] = (float)sm_rng_below(&r, 6) - 2.5f;
            d_sc = (float *)t_dev(sc, (size_t)rows * n);
            d_idx = (int *)t_dev(NULL, (size_t)rows * k);
            d_val = (float *)t_dev(NULL, (size_t)rows * k);
            smc_topk(&T_GPU, d_sc, n, k, d_idx, d_val, rows);
            CHECK_SYNC("smc_topk");
            g_idx = (int *)t_peer_ids(d_idx, (size_t)rows * k);
            g_val = t_host(d_val, (size_t)rows * k);
            for (row = 0; row < rows; row++) {
                sm_topk(sc + (size_t)row * n, n, k, idx, val);
                for (i = 0; i < k; i++)
                    CHECK(g_idx[row * k + i] == idx[i] && g_val[row * k + i] == val[i],
                          "n %d k %d row %d rank %d: GPU (%d, %g), CPU (%d, %g)", n, k, row, i,
                          g_idx[row * k + i], g_val[row * k + i], idx[i], val[i]);
            }
            free(sc), free(val), free(g_idx), free(g_val);
            smc_dfree(d_sc), smc_dfree(d_idx), smc_dfree(d_val);
        }
    return 0;
}

/* Product-key top-k against sm_peer_product_topk, exactly, with half-scores
 * from a few values so that many candidate sums tie (ties go to the lower
 * expert id) and the early stop is exercised. */
static int test_peer_product_topk_ties_like_cpu(void) {
    const int rows = 11, subs[2] = {37, 32}, ks[3] = {1, 6, 32};
    sm_rng r;
    int a, b;
    sm_rng_seed(&r, 42);
    for (a = 0; a < 2; a++)
        for (b = 0; b < 3; b++) {
            int s = subs[a], k = ks[b], row, i;
            size_t n = (size_t)rows * s;
            float *s1 = (float *)t_alloc(n), *s2 = (float *)t_alloc(n), *d_s1, *d_s2, *d_sc;
            float score[SM_TOPK_MAX], *g_sc;
            int32_t expert[SM_TOPK_MAX], *d_ex, *g_ex;
            for (i = 0; i < (int)n; i++) {
                s1[i] = 0.5f * (float)sm_rng_below(&r, 7);
                s2[i] = 0.25f * (float)sm_rng_below(&r, 9);
            }
            d_s1 = (float *)t_dev(s1, n), d_s2 = (float *)t_dev(s2, n);
            d_ex = (int32_t *)t_dev(NULL, (size_t)rows * k);
            d_sc = (float *)t_dev(NULL, (size_t)rows * k);
            smc_peer_product_topk(&T_GPU, d_s1, d_s2, s, k, d_ex, d_sc, rows);
            CHECK_SYNC("smc_peer_product_topk");
            g_ex = t_peer_ids(d_ex, (size_t)rows * k);
            g_sc = t_host(d_sc, (size_t)rows * k);
            for (row = 0; row < rows; row++) {
                sm_peer_product_topk(s1 + (size_t)row * s, s2 + (size_t)row * s, s, k, expert,
                                     score);
                for (i = 0; i < k; i++)
                    CHECK(g_ex[row * k + i] == expert[i] && g_sc[row * k + i] == score[i],
                          "s %d k %d row %d rank %d: GPU (%d, %g), CPU (%d, %g)", s, k, row, i,
                          (int)g_ex[row * k + i], g_sc[row * k + i], (int)expert[i], score[i]);
            }
            free(s1), free(s2), free(g_ex), free(g_sc);
            smc_dfree(d_s1), smc_dfree(d_s2), smc_dfree(d_ex), smc_dfree(d_sc);
        }
    return 0;
}

/* One PEER layer on both sides: the same parameters (gain perturbed from
 * 1 so that its use is checked), inputs, and starting gradients and dx
 * (random, so that accumulation is checked). */
typedef struct {
    sm_peer_config cfg;
    sm_peer_sizes sz;
    int D, N;
    float *par, *grad, *x, *dout, *dx, *out;         /* host */
    float *d_par, *d_grad, *d_x, *d_dout, *d_dx, *d_out; /* device */
    sm_peer_params p, g, dp, dg;                     /* g, dg: views of all five tensors */
    sm_peer_acts acts, d_acts;
} t_peer;

static int t_peer_cmp_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x > y ? -1 : x < y;
}

/* Of all (position, head), the smallest gap between neighbours among the
 * k+1 best of the N scores s1[a] + s2[b], from the CPU forward's queries
 * (those are among the sums of the k+1 best of s1 and of s2). GPU and CPU
 * scores differ by GEMM rounding (~1e-6), so they retrieve the same
 * experts in the same order when this gap is well above that. */
static double t_peer_min_gap(const t_peer *P) {
    const sm_peer_config *c = &P->cfg;
    int s = c->n_sub, half = c->d_key / 2, h = c->heads, m = c->topk < s ? c->topk + 1 : s;
    int last = c->topk < s * s ? c->topk : s * s - 1, row, a, b, i;
    float *s1 = (float *)t_alloc(s), *s2 = (float *)t_alloc(s), *sc = (float *)t_alloc(m * m);
    double gap = INFINITY;
    for (row = 0; row < P->N * h; row++) {
        const float *q = P->acts.q + (size_t)row * c->d_key;
        size_t table = c->shared_keys ? 0 : (size_t)(row % h); /* the head's sub-keys */
        const float *k1 = P->p.keys1 + table * s * half;
        const float *k2 = P->p.keys2 + table * s * half;
        for (a = 0; a < s; a++) {
            s1[a] = s2[a] = 0.0f;
            for (i = 0; i < half; i++) {
                s1[a] += q[i] * k1[(size_t)a * half + i];
                s2[a] += q[half + i] * k2[(size_t)a * half + i];
            }
        }
        qsort(s1, s, sizeof(float), t_peer_cmp_desc);
        qsort(s2, s, sizeof(float), t_peer_cmp_desc);
        for (a = 0; a < m; a++)
            for (b = 0; b < m; b++) sc[a * m + b] = s1[a] + s2[b];
        qsort(sc, m * m, sizeof(float), t_peer_cmp_desc);
        for (i = 0; i < last; i++)
            if (sc[i] - sc[i + 1] < gap) gap = sc[i] - sc[i + 1];
    }
    free(s1), free(s2), free(sc);
    return gap;
}

static int t_peer_init(t_peer *P, const sm_peer_config *cfg, int D, int N, uint64_t seed) {
    size_t i, nx = (size_t)N * D;
    sm_error err;
    sm_rng r;
    memset(P, 0, sizeof *P);
    P->cfg = *cfg, P->D = D, P->N = N;
    sm_rng_seed(&r, seed);
    CHECK_OK(sm_peer_param_sizes(cfg, D, &P->sz, &err));
    P->par = (float *)t_alloc(P->sz.total);
    sm_peer_bind(&P->p, P->par, &P->sz);
    sm_peer_init(&P->p, &P->sz, cfg, &r);
    for (i = 0; i < P->sz.q_gain; i++) P->p.q_gain[i] += 0.2f * sm_rng_normal(&r);
    P->grad = t_randn(&r, P->sz.total, 0.1f);
    P->x = t_randn(&r, nx, 1.0f), P->dout = t_randn(&r, nx, 1.0f);
    P->dx = t_randn(&r, nx, 0.1f), P->out = (float *)t_alloc(nx);
    sm_peer_bind(&P->g, P->grad, &P->sz);
    P->d_par = (float *)t_dev(P->par, P->sz.total);
    P->d_grad = (float *)t_dev(P->grad, P->sz.total);
    P->d_x = (float *)t_dev(P->x, nx), P->d_dout = (float *)t_dev(P->dout, nx);
    P->d_dx = (float *)t_dev(P->dx, nx), P->d_out = (float *)t_dev(NULL, nx);
    sm_peer_bind(&P->dp, P->d_par, &P->sz);
    sm_peer_bind(&P->dg, P->d_grad, &P->sz);
    CHECK_OK(sm_peer_acts_init(&P->acts, cfg, D, N, &err));
    CHECK_OK(smc_peer_acts_init(&P->d_acts, cfg, D, N, &err));
    return 0;
}

static void t_peer_free(t_peer *P) {
    free(P->par), free(P->grad), free(P->x), free(P->dout), free(P->dx), free(P->out);
    smc_dfree(P->d_par), smc_dfree(P->d_grad), smc_dfree(P->d_x), smc_dfree(P->d_dout);
    smc_dfree(P->d_dx), smc_dfree(P->d_out);
    sm_peer_acts_free(&P->acts);
    smc_peer_acts_free(&P->d_acts);
}

/* t_peer_init from the first seed (seed, seed+1, ...) whose inputs have no
 * near tie among the best scores (t_peer_min_gap >= 2e-5): a tie within
 * rounding could rank either way on either side. */
static int t_peer_setup(t_peer *P, const sm_peer_config *cfg, int D, int N, uint64_t seed) {
    sm_error err;
    int tries;
    for (tries = 0; tries < 20; tries++, seed++) {
        if (t_peer_init(P, cfg, D, N, seed)) return 1;
        CHECK_OK(sm_peer_forward(P->out, &P->acts, P->x, &P->p, N, &err));
        if (t_peer_min_gap(P) >= 2e-5) break;
        t_peer_free(P);
    }
    CHECK(tries < 20, "no seed without near-tied scores in 20 tries");
    return 0;
}

/* Forward on both sides: the retrieved experts must be identical (same
 * slots, same order; the half-scores differ only by GEMM rounding, far
 * below the gaps between random scores), the values within 1e-5 (sums
 * of at most d_model products, reordered). */
static int t_peer_forward_both(t_peer *P) {
    size_t slots = (size_t)P->N * P->cfg.heads * P->cfg.topk, i, bad = 0;
    size_t hk = (size_t)P->N * P->cfg.heads * P->cfg.d_key, rows = (size_t)P->N * P->cfg.heads;
    sm_error err;
    int32_t *g_ex;
    CHECK_OK(sm_peer_forward(P->out, &P->acts, P->x, &P->p, P->N, &err));
    CHECK_OK(smc_peer_forward(&T_GPU, P->d_out, &P->d_acts, P->d_x, &P->dp, P->N, &err));
    CHECK_SYNC("smc_peer_forward");
    g_ex = t_peer_ids(P->d_acts.expert, slots);
    for (i = 0; i < slots; i++) bad += g_ex[i] != P->acts.expert[i];
    free(g_ex);
    CHECK(bad == 0, "%zu of %zu slots retrieve another expert than the CPU", bad, slots);
    CHECK_CLOSE(P->d_acts.q_raw, P->acts.q_raw, hk, 1e-5, "q_raw");
    CHECK_CLOSE(P->d_acts.q, P->acts.q, hk, 1e-5, "q");
    CHECK_CLOSE(P->d_acts.q_rstd, P->acts.q_rstd, rows, 1e-5, "q_rstd");
    CHECK_CLOSE(P->d_acts.q_mean, P->acts.q_mean, rows, 1e-5, "q_mean");
    CHECK_CLOSE(P->d_acts.weight, P->acts.weight, slots, 1e-5, "weights");
    CHECK_CLOSE(P->d_acts.pre, P->acts.pre, slots, 1e-5, "pre-activations");
    CHECK_CLOSE(P->d_out, P->out, (size_t)P->N * P->D, 1e-5, "out");
    return 0;
}

/* The touched expert rows of both sides as sets (the GPU list is in
 * atomic order, so both are sorted first). */
static int t_peer_same_rows(const sm_row_set *cpu, smc_row_set *gpu) {
    size_t n = smc_row_set_count(&T_GPU, gpu), i, bad = 0;
    uint32_t *g_rows, *c_rows;
    CHECK(n == cpu->count, "GPU touched %zu expert rows, CPU %zu", n, cpu->count);
    g_rows = (uint32_t *)t_host(gpu->rows, n);
    c_rows = (uint32_t *)t_alloc(n);
    memcpy(c_rows, cpu->rows, n * sizeof(uint32_t));
    qsort(g_rows, n, sizeof(uint32_t), t_peer_cmp_u32);
    qsort(c_rows, n, sizeof(uint32_t), t_peer_cmp_u32);
    for (i = 0; i < n; i++) bad += g_rows[i] != c_rows[i];
    free(g_rows), free(c_rows);
    CHECK(bad == 0, "%zu of %zu touched rows differ from the CPU's", bad, n);
    return 0;
}

/* Forward and backward against the CPU. With `partial`, dx, dW_q and
 * dK2 are skipped on both sides (NULL) and must stay as they were.
 * Tolerance 1e-4 for the backward: the gain, sub-key and expert-row
 * gradients are atomic sums in another order, and dscore = w (dw - sum w
 * dw) cancels, so rounding grows a little beyond the forward's. */
static int t_peer_check(const sm_peer_config *cfg, int D, int N, uint64_t seed, int partial) {
    t_peer P;
    sm_peer_params g, dg;
    sm_row_set rows;
    smc_row_set d_rows;
    sm_error err;
    size_t slots = (size_t)N * cfg->heads * cfg->topk;
    if (t_peer_setup(&P, cfg, D, N, seed) || t_peer_forward_both(&P)) return 1;
    g = P.g, dg = P.dg;
    if (partial) g.w_q = dg.w_q = g.keys2 = dg.keys2 = NULL;
    CHECK_OK(sm_row_set_init(&rows, P.sz.n_experts, &err));
    CHECK_OK(smc_row_set_init(&d_rows, P.sz.n_experts, &err));
    CHECK_OK(sm_peer_backward(partial ? NULL : P.dx, &g, &rows, P.dout, P.x, &P.p, &P.acts, N,
                              &err));
    CHECK_OK(smc_peer_backward(&T_GPU, partial ? NULL : P.d_dx, &dg, &d_rows, P.d_dout, P.d_x,
                               &P.dp, &P.d_acts, N, &err));
    CHECK_SYNC("smc_peer_backward");
    CHECK_CLOSE(P.d_acts.dscore, P.acts.dscore, slots, 1e-4, "dscore");
    CHECK_CLOSE(P.d_dx, P.dx, (size_t)N * D, 1e-4, "dx");
    CHECK_CLOSE(P.dg.w_q, P.g.w_q, P.sz.w_q, 1e-4, "dW_q");
    CHECK_CLOSE(P.dg.q_gain, P.g.q_gain, P.sz.q_gain, 1e-4, "dq_gain");
    CHECK_CLOSE(P.dg.keys1, P.g.keys1, P.sz.keys1, 1e-4, "dkeys1");
    CHECK_CLOSE(P.dg.keys2, P.g.keys2, P.sz.keys2, 1e-4, "dkeys2");
    CHECK_CLOSE(P.dg.experts, P.g.experts, P.sz.experts, 1e-4, "dexperts");
    if (t_peer_same_rows(&rows, &d_rows)) return 1;
    sm_row_set_free(&rows);
    smc_row_set_free(&d_rows);
    t_peer_free(&P);
    return 0;
}

static sm_peer_config t_peer_cfg(int s, int h, int k, int d_key, sm_peer_activation act,
                                 sm_peer_query_norm norm) {
    sm_peer_config c = sm_peer_default_config();
    c.n_sub = s, c.heads = h, c.topk = k, c.d_key = d_key, c.activation = act;
    c.query_norm = norm;
    return c;
}

/* s = 37 (not a power of two, two 32-score chunks), 3 heads, odd d_key/2. */
static int test_peer_gelu_rms_like_cpu(void) {
    sm_peer_config c = t_peer_cfg(37, 3, 5, 18, SM_PEER_ACT_GELU, SM_PEER_NORM_RMS);
    return t_peer_check(&c, 40, 13, 51, 0);
}

/* The same with a sub-key table per head (the other tests share one). */
static int test_peer_per_head_keys_like_cpu(void) {
    sm_peer_config c = t_peer_cfg(37, 3, 5, 18, SM_PEER_ACT_GELU, SM_PEER_NORM_RMS);
    c.shared_keys = 0;
    return t_peer_check(&c, 40, 13, 58, 0);
}

/* k = 32, the largest, over 32 x 32 candidate sums. */
static int test_peer_relu_layernorm_k32_like_cpu(void) {
    sm_peer_config c = t_peer_cfg(45, 2, 32, 8, SM_PEER_ACT_RELU, SM_PEER_NORM_LAYER);
    return t_peer_check(&c, 33, 7, 52, 0);
}

/* k = s (every sub-key in both half lists), d_key = 2, N = 300 positions
 * (several blocks of rows), skipped gradients. RMSNorm: a LayerNorm over 2
 * values is ill-conditioned when they nearly agree, which 300 positions
 * would hit. */
static int test_peer_k_equals_s_partial_grads(void) {
    sm_peer_config c = t_peer_cfg(8, 1, 8, 2, SM_PEER_ACT_GELU, SM_PEER_NORM_RMS);
    return t_peer_check(&c, 17, 300, 53, 1);
}

/* 9 heads x k 32 = 288 slots per position: more than one chunk of the
 * expert gather. */
static int test_peer_many_slots_like_cpu(void) {
    sm_peer_config c = t_peer_cfg(33, 9, 32, 4, SM_PEER_ACT_GELU, SM_PEER_NORM_RMS);
    return t_peer_check(&c, 20, 5, 54, 0);
}

/* 16900 experts, d_key 64 and d_model 96 (several values per lane and
 * thread), 128 routing rows per head. */
static int test_peer_wide_like_cpu(void) {
    sm_peer_config c = t_peer_cfg(130, 4, 3, 64, SM_PEER_ACT_RELU, SM_PEER_NORM_RMS);
    return t_peer_check(&c, 96, 128, 55, 0);
}

/* k = 1: the softmax weight is 1 and the score gradients vanish. */
static int test_peer_k1_like_cpu(void) {
    sm_peer_config c = t_peer_cfg(20, 2, 1, 6, SM_PEER_ACT_GELU, SM_PEER_NORM_LAYER);
    return t_peer_check(&c, 10, 9, 57, 0);
}

/* Usage counts of the retrieved experts (twice, so counts accumulate)
 * equal to the CPU's exactly, the statistics too; reset empties them. */
static int test_peer_usage_like_cpu(void) {
    sm_peer_config c = t_peer_cfg(11, 2, 4, 6, SM_PEER_ACT_GELU, SM_PEER_NORM_RMS);
    size_t slots, i, bad = 0;
    sm_peer_usage cpu, got, dev;
    sm_peer_usage_stats a, b;
    sm_error err;
    t_peer P;
    if (t_peer_setup(&P, &c, 24, 29, 56) || t_peer_forward_both(&P)) return 1;
    slots = (size_t)P.N * c.heads * c.topk;
    CHECK_OK(sm_peer_usage_init(&cpu, P.sz.n_experts, &err));
    CHECK_OK(sm_peer_usage_init(&got, P.sz.n_experts, &err));
    CHECK_OK(smc_peer_usage_init(&dev, P.sz.n_experts, &err));
    for (i = 0; i < 2; i++) {
        sm_peer_usage_add(&cpu, P.acts.expert, slots);
        smc_peer_usage_add(&T_GPU, &dev, P.d_acts.expert, slots);
    }
    CHECK_OK(smc_peer_usage_download(&T_GPU, &got, &dev, &err));
    for (i = 0; i < cpu.n_experts; i++) bad += got.counts[i] != cpu.counts[i];
    CHECK(bad == 0 && got.total == cpu.total, "%zu of %zu counts differ; total %llu vs %llu",
          bad, cpu.n_experts, (unsigned long long)got.total, (unsigned long long)cpu.total);
    a = sm_peer_usage_compute(&got), b = sm_peer_usage_compute(&cpu);
    CHECK(a.frac_used == b.frac_used && a.kl_uniform == b.kl_uniform, "usage stats differ");
    smc_peer_usage_reset(&T_GPU, &dev);
    CHECK_OK(smc_peer_usage_download(&T_GPU, &got, &dev, &err));
    for (i = 0; i < got.n_experts; i++) bad += got.counts[i] != 0;
    CHECK(bad == 0 && got.total == 0, "reset left %zu counts", bad);
    sm_peer_usage_free(&cpu), sm_peer_usage_free(&got), smc_peer_usage_free(&dev);
    t_peer_free(&P);
    return 0;
}

/* N outside [1, max_n] is refused, with a message naming it. */
static int test_peer_rejects_bad_n(void) {
    sm_peer_config c = t_peer_cfg(5, 1, 2, 4, SM_PEER_ACT_GELU, SM_PEER_NORM_RMS);
    sm_peer_acts acts;
    sm_peer_params p;
    sm_error err;
    CHECK_OK(smc_peer_acts_init(&acts, &c, 8, 3, &err));
    memset(&p, 0, sizeof p);
    CHECK(smc_peer_forward(&T_GPU, NULL, &acts, NULL, &p, 4, &err) == SM_ERR_INVALID_ARG,
          "N 4 > max_n 3 accepted");
    CHECK(strstr(err.msg, "N 4") != NULL, "message does not name N: %s", err.msg);
    CHECK(smc_peer_backward(&T_GPU, NULL, &p, NULL, NULL, NULL, &p, &acts, 0, &err) ==
              SM_ERR_INVALID_ARG,
          "N 0 accepted");
    smc_peer_acts_free(&acts);
    CHECK(smc_peer_acts_init(&acts, &c, 8, 0, &err) == SM_ERR_INVALID_ARG, "max_n 0 accepted");
    return 0;
}

#define SMC_TESTS_peer                                                                         \
    T(test_peer_topk_ties_like_cpu), T(test_peer_product_topk_ties_like_cpu),                  \
        T(test_peer_gelu_rms_like_cpu), T(test_peer_per_head_keys_like_cpu),                   \
        T(test_peer_relu_layernorm_k32_like_cpu),                                              \
        T(test_peer_k_equals_s_partial_grads), T(test_peer_many_slots_like_cpu),               \
        T(test_peer_wide_like_cpu), T(test_peer_k1_like_cpu), T(test_peer_usage_like_cpu),     \
        T(test_peer_rejects_bad_n)

/* ---- >>mhc  mHC ----------------------------------------------------- */

/* count n x n logit matrices, N(0, 1), with one entry of every 7th matrix
 * pushed 100 below the rest so the clamp of the shifted logits is used. */
static float *t_mhc_logits(sm_rng *r, int count, int n) {
    size_t nn = (size_t)n * n, k;
    float *L = t_randn(r, (size_t)count * nn, 1.0f);
    for (k = 0; nn > 1 && k < (size_t)count; k += 7) L[k * nn + 1] -= 100.0f;
    return L;
}

/* Matrix sides and iteration counts; count = 301 is not a multiple of any
 * block size. Forward: the same loops in the same order as the CPU, so
 * only expf and fused multiply-adds differ (1e-5). */
static int test_mhc_sinkhorn_forward(void) {
    const int ns[] = {1, 2, 4, 8, 16}, count = 301, iters = 20;
    sm_rng r;
    size_t q;
    sm_rng_seed(&r, 51);
    for (q = 0; q < sizeof ns / sizeof ns[0]; q++) {
        int n = ns[q];
        size_t nn = (size_t)n * n, total = (size_t)count * nn;
        float *L = t_mhc_logits(&r, count, n), *ref = (float *)t_alloc(total), *out;
        float *dL = (float *)t_dev(L, total), *dout = (float *)t_dev(NULL, total);
        sm_rowcol_stats cpu, gpu;
        sm_sinkhorn_forward_batched(ref, L, count, n, iters);
        smc_sinkhorn_forward_batched(&T_GPU, dout, dL, count, n, iters);
        CHECK_SYNC("sinkhorn forward");
        CHECK_CLOSE(dout, ref, total, 1e-5, "sinkhorn forward");
        /* doubly stochastic: columns sum to 1 to rounding, rows as far as
         * 20 rounds converge, which the CPU's result measures */
        out = t_host(dout, total);
        gpu = sm_sinkhorn_sum_error(out, nn, count, n);
        cpu = sm_sinkhorn_sum_error(ref, nn, count, n);
        CHECK(gpu.col_max < 1e-5f, "n = %d: a column sums to 1 +- %g", n, (double)gpu.col_max);
        CHECK(fabsf(gpu.row_max - cpu.row_max) < 1e-5f, "n = %d: row sum error %g, CPU %g", n,
              (double)gpu.row_max, (double)cpu.row_max);
        free(L), free(ref), free(out);
        smc_dfree(dL), smc_dfree(dout);
    }
    return 0;
}

/* Backward, accumulating onto random dlogits, for several sides and round
 * counts (1 and 128 included). The chain of 2*iters steps carries the
 * forward's last-bit differences (the CPU built with and without fused
 * multiply-adds differs by 2e-7 here), hence 2e-5. */
static int test_mhc_sinkhorn_backward(void) {
    const int cases[][2] = {{1, 20}, {2, 20}, {4, 20}, {8, 20}, {16, 20}, {4, 1}, {3, 128}};
    const int count = 301;
    sm_rng r;
    size_t q;
    sm_rng_seed(&r, 52);
    for (q = 0; q < sizeof cases / sizeof cases[0]; q++) {
        int n = cases[q][0], iters = cases[q][1];
        size_t total = (size_t)count * n * n;
        float *L = t_mhc_logits(&r, count, n), *g = t_randn(&r, total, 1.0f);
        float *ref = t_randn(&r, total, 1.0f);
        float *dL = (float *)t_dev(L, total), *dg = (float *)t_dev(g, total);
        float *dref = (float *)t_dev(ref, total);
        sm_sinkhorn_backward_batched(ref, g, L, count, n, iters);
        smc_sinkhorn_backward_batched(&T_GPU, dref, dg, dL, count, n, iters);
        CHECK_SYNC("sinkhorn backward");
        CHECK_CLOSE(dref, ref, total, 2e-5, "sinkhorn backward");
        free(L), free(g), free(ref);
        smc_dfree(dL), smc_dfree(dg), smc_dfree(dref);
    }
    return 0;
}

/* ---- one mHC sublayer on both sides ---- */

typedef struct t_mhc {
    sm_mhc_config cfg;
    int N;
    size_t nx, nu, nmaps, nparams, nact; /* floats: streams, [N, C], maps, params, act */
    float *x, *params, *act_base, *dx, *dmaps; /* host; dx, dmaps: the CPU's post backward */
    sm_mhc_acts act;
    float *d_x, *d_params;
    sm_mhc_acts d_act;
} t_mhc;

/* Random streams and parameters away from the init: biases moved, gates
 * large and of both signs, phi std 0.3, so every token's maps differ. */
static int t_mhc_setup(t_mhc *t, int n, int C, int dynamic, int iters, int N, sm_rng *r) {
    sm_error err;
    sm_mhc_params p;
    int k, K = sm_mhc_map_count(n);
    memset(t, 0, sizeof *t);
    t->cfg = sm_mhc_default_config();
    t->cfg.n_streams = n, t->cfg.channels = C, t->cfg.dynamic = dynamic;
    t->cfg.sinkhorn_iters = iters, t->cfg.phi_init_std = 0.3f;
    t->N = N;
    t->nx = (size_t)N * n * C, t->nu = (size_t)N * C, t->nmaps = (size_t)N * K;
    t->nparams = sm_mhc_param_layout(&t->cfg).total, t->nact = sm_mhc_acts_size(&t->cfg, N);
    t->params = (float *)t_alloc(t->nparams);
    CHECK_OK(sm_mhc_init(t->params, &t->cfg, r, &err));
    p = sm_mhc_params_at(&t->cfg, t->params);
    for (k = 0; k < K; k++) p.bias[k] += 0.5f * sm_rng_normal(r);
    if (dynamic) p.gate[0] = 0.7f, p.gate[1] = -0.4f, p.gate[2] = 0.9f;
    t->x = t_randn(r, t->nx, 1.0f);
    t->act_base = (float *)t_alloc(t->nact);
    t->act = sm_mhc_acts_at(&t->cfg, N, t->act_base);
    t->d_x = (float *)t_dev(t->x, t->nx);
    t->d_params = (float *)t_dev(t->params, t->nparams);
    CHECK_OK(smc_mhc_acts_alloc(&t->d_act, &t->cfg, N, &err));
    return 0;
}

static void t_mhc_free(t_mhc *t) {
    free(t->x), free(t->params), free(t->act_base), free(t->dx), free(t->dmaps);
    smc_dfree(t->d_x), smc_dfree(t->d_params);
    smc_mhc_acts_free(&t->d_act);
}

/* The CPU's activations onto the device, so the next step starts equal. */
static void t_mhc_sync_act(t_mhc *t) {
    sm_error err;
    if (smc_upload(t->d_act.maps, t->act_base, t->nact * sizeof(float), &err) != SM_OK) {
        fprintf(stderr, "tests_cuda: %s\n", err.msg);
        exit(2);
    }
}

/* u, the maps and (dynamic) x', 1/rms, z. Same arithmetic in the same order
 * except z, an fp32 GEMM over n*C in another order (1e-5 covers both). */
static int t_mhc_check_pre_forward(t_mhc *t) {
    sm_mhc_params p = sm_mhc_params_at(&t->cfg, t->params);
    sm_mhc_params dp = sm_mhc_params_at(&t->cfg, t->d_params);
    float *u = (float *)t_alloc(t->nu), *du = (float *)t_dev(NULL, t->nu);
    int nC = t->cfg.n_streams * t->cfg.channels;
    sm_mhc_pre_forward(u, &t->act, t->x, &p, &t->cfg, t->N);
    smc_mhc_pre_forward(&T_GPU, du, &t->d_act, t->d_x, &dp, &t->cfg, t->N);
    CHECK_SYNC("mhc pre forward");
    CHECK_CLOSE(du, u, t->nu, 1e-5, "mhc pre forward: u");
    CHECK_CLOSE(t->d_act.maps, t->act.maps, t->nmaps, 1e-5, "mhc pre forward: maps");
    if (t->cfg.dynamic) {
        CHECK(t->d_act.xn && t->d_act.rstd && t->d_act.z, "dynamic activations missing");
        CHECK_CLOSE(t->d_act.xn, t->act.xn, (size_t)t->N * nC, 1e-5, "mhc pre forward: xn");
        CHECK_CLOSE(t->d_act.rstd, t->act.rstd, (size_t)t->N, 1e-5, "mhc pre forward: rstd");
        CHECK_CLOSE(t->d_act.z, t->act.z, t->nmaps, 1e-5, "mhc pre forward: z");
    } else {
        CHECK(!t->d_act.xn && !t->d_act.rstd && !t->d_act.z, "static activations not NULL");
    }
    free(u);
    smc_dfree(du);
    return 0;
}

/* x_next, then the post backward onto random dx, dy, dmaps (checking that
 * it accumulates). dx, dy: same order as the CPU (1e-5); dmaps: batched
 * GEMMs over C, another summation order (1e-4). */
static int t_mhc_check_post(t_mhc *t, sm_rng *r) {
    float *y = t_randn(r, t->nu, 1.0f), *g = t_randn(r, t->nx, 1.0f);
    float *xn = (float *)t_alloc(t->nx), *dy = t_randn(r, t->nu, 1.0f);
    float *d_y = (float *)t_dev(y, t->nu), *d_g = (float *)t_dev(g, t->nx);
    float *d_xn = (float *)t_dev(NULL, t->nx), *d_dy = (float *)t_dev(dy, t->nu), *d_dx, *d_dm;
    t->dx = t_randn(r, t->nx, 1.0f);
    t->dmaps = t_randn(r, t->nmaps, 1.0f);
    d_dx = (float *)t_dev(t->dx, t->nx);
    d_dm = (float *)t_dev(t->dmaps, t->nmaps);
    t_mhc_sync_act(t);
    sm_mhc_post_forward(xn, t->x, y, &t->act, &t->cfg, t->N);
    smc_mhc_post_forward(&T_GPU, d_xn, t->d_x, d_y, &t->d_act, &t->cfg, t->N);
    CHECK_SYNC("mhc post forward");
    CHECK_CLOSE(d_xn, xn, t->nx, 1e-5, "mhc post forward: x_next");
    sm_mhc_post_backward(t->dx, dy, t->dmaps, g, t->x, y, &t->act, &t->cfg, t->N);
    smc_mhc_post_backward(&T_GPU, d_dx, d_dy, d_dm, d_g, t->d_x, d_y, &t->d_act, &t->cfg, t->N);
    CHECK_SYNC("mhc post backward");
    CHECK_CLOSE(d_dx, t->dx, t->nx, 1e-5, "mhc post backward: dx");
    CHECK_CLOSE(d_dy, dy, t->nu, 1e-5, "mhc post backward: dy");
    CHECK_CLOSE(d_dm, t->dmaps, t->nmaps, 1e-4, "mhc post backward: dmaps");
    free(y), free(g), free(xn), free(dy);
    smc_dfree(d_y), smc_dfree(d_g), smc_dfree(d_xn), smc_dfree(d_dy), smc_dfree(d_dx);
    smc_dfree(d_dm);
    return 0;
}

/* The pre backward from the CPU's post-backward dx and dmaps, onto random
 * parameter gradients: dx, darg (left in dmaps) and every parameter
 * gradient. Sums are reordered (GEMMs, per-block atomics over tokens, float
 * instead of the CPU's double for dgate), hence 1e-4. */
static int t_mhc_check_pre_backward(t_mhc *t, sm_rng *r) {
    sm_mhc_params p = sm_mhc_params_at(&t->cfg, t->params);
    sm_mhc_params dp = sm_mhc_params_at(&t->cfg, t->d_params);
    float *du = t_randn(r, t->nu, 1.0f), *grad = t_randn(r, t->nparams, 1.0f);
    float *d_du = (float *)t_dev(du, t->nu), *d_grad = (float *)t_dev(grad, t->nparams);
    float *d_dx = (float *)t_dev(t->dx, t->nx), *d_dm = (float *)t_dev(t->dmaps, t->nmaps);
    sm_mhc_params g = sm_mhc_params_at(&t->cfg, grad), dg = sm_mhc_params_at(&t->cfg, d_grad);
    sm_mhc_layout l = sm_mhc_param_layout(&t->cfg);
    t_mhc_sync_act(t);
    sm_mhc_pre_backward(t->dx, &g, t->dmaps, du, t->x, &t->act, &p, &t->cfg, t->N);
    smc_mhc_pre_backward(&T_GPU, d_dx, &dg, d_dm, d_du, t->d_x, &t->d_act, &dp, &t->cfg, t->N);
    CHECK_SYNC("mhc pre backward");
    CHECK_CLOSE(d_dx, t->dx, t->nx, 1e-4, "mhc pre backward: dx");
    CHECK_CLOSE(d_dm, t->dmaps, t->nmaps, 1e-4, "mhc pre backward: darg");
    CHECK_CLOSE(dg.bias, g.bias, l.bias.size, 1e-4, "mhc pre backward: dbias");
    if (t->cfg.dynamic) {
        CHECK_CLOSE(dg.gate, g.gate, l.gate.size, 1e-4, "mhc pre backward: dgate");
        CHECK_CLOSE(dg.phi, g.phi, l.phi.size, 1e-4, "mhc pre backward: dphi");
    }
    free(du), free(grad);
    smc_dfree(d_du), smc_dfree(d_grad), smc_dfree(d_dx), smc_dfree(d_dm);
    return 0;
}

/* Every step of a sublayer for (n, C, iters, N) cases; N = 300 spans two
 * blocks of the bias / gate sums, C = 37 is odd. */
static int t_mhc_sublayer(int dynamic) {
    const int cases[][4] = {{4, 37, 20, 300}, {3, 37, 7, 70}, {1, 19, 20, 33}, {8, 16, 20, 40}};
    sm_rng r;
    size_t q;
    sm_rng_seed(&r, 53 + dynamic);
    for (q = 0; q < sizeof cases / sizeof cases[0]; q++) {
        t_mhc t;
        int bad = t_mhc_setup(&t, cases[q][0], cases[q][1], dynamic, cases[q][2], cases[q][3], &r);
        bad = bad || t_mhc_check_pre_forward(&t) || t_mhc_check_post(&t, &r) ||
              t_mhc_check_pre_backward(&t, &r);
        t_mhc_free(&t);
        if (bad) return 1;
    }
    return 0;
}

static int test_mhc_sublayer_dynamic(void) { return t_mhc_sublayer(1); }
static int test_mhc_sublayer_static(void) { return t_mhc_sublayer(0); }

/* Expand / collapse and their backward (accumulating onto random
 * gradients): the CPU's operations in its order, 1e-6. */
static int test_mhc_expand_collapse(void) {
    const int N = 70, n = 3, C = 37;
    size_t nx = (size_t)N * n * C, nh = (size_t)N * C;
    sm_rng r;
    float *h, *x, *out_x, *out_h, *dx, *dh, *d_h, *d_x, *d_out_x, *d_out_h, *d_dx, *d_dh;
    sm_rng_seed(&r, 55);
    h = t_randn(&r, nh, 1.0f), x = t_randn(&r, nx, 1.0f);
    out_x = (float *)t_alloc(nx), out_h = (float *)t_alloc(nh);
    dx = t_randn(&r, nx, 1.0f), dh = t_randn(&r, nh, 1.0f);
    d_h = (float *)t_dev(h, nh), d_x = (float *)t_dev(x, nx);
    d_out_x = (float *)t_dev(NULL, nx), d_out_h = (float *)t_dev(NULL, nh);
    d_dx = (float *)t_dev(dx, nx), d_dh = (float *)t_dev(dh, nh);
    sm_mhc_expand_forward(out_x, h, N, n, C);
    sm_mhc_collapse_forward(out_h, x, N, n, C);
    sm_mhc_expand_backward(dh, x, N, n, C);
    sm_mhc_collapse_backward(dx, h, N, n, C);
    smc_mhc_expand_forward(&T_GPU, d_out_x, d_h, N, n, C);
    smc_mhc_collapse_forward(&T_GPU, d_out_h, d_x, N, n, C);
    smc_mhc_expand_backward(&T_GPU, d_dh, d_x, N, n, C);
    smc_mhc_collapse_backward(&T_GPU, d_dx, d_h, N, n, C);
    CHECK_SYNC("mhc expand / collapse");
    CHECK_CLOSE(d_out_x, out_x, nx, 1e-6, "mhc expand forward");
    CHECK_CLOSE(d_out_h, out_h, nh, 1e-6, "mhc collapse forward");
    CHECK_CLOSE(d_dh, dh, nh, 1e-6, "mhc expand backward");
    CHECK_CLOSE(d_dx, dx, nx, 1e-6, "mhc collapse backward");
    free(h), free(x), free(out_x), free(out_h), free(dx), free(dh);
    smc_dfree(d_h), smc_dfree(d_x), smc_dfree(d_out_x), smc_dfree(d_out_h), smc_dfree(d_dx);
    smc_dfree(d_dh);
    return 0;
}

/* The statistic pairs agree to 1e-5 (per-token values in double on both
 * sides; the means are summed in another order). */
static int t_mhc_stats_close(sm_rowcol_stats a, sm_rowcol_stats b, const char *what) {
    double e = 0;
    e = fmax(e, fabs((double)a.row_max - b.row_max) / (1 + fabs((double)b.row_max)));
    e = fmax(e, fabs((double)a.row_mean - b.row_mean) / (1 + fabs((double)b.row_mean)));
    e = fmax(e, fabs((double)a.col_max - b.col_max) / (1 + fabs((double)b.col_max)));
    e = fmax(e, fabs((double)a.col_mean - b.col_mean) / (1 + fabs((double)b.col_mean)));
    CHECK(e <= 1e-5, "%s: GPU vs CPU error %.3g (GPU row %g / %g, col %g / %g)", what, e,
          (double)a.row_max, (double)a.row_mean, (double)a.col_max, (double)a.col_mean);
    return 0;
}

/* Row / column-sum error and amax gain of three layers' maps (few
 * iterations, so the sums are visibly off 1; some entries of the last layer
 * negated), and a bad config refused by smc_mhc_acts_alloc. */
static int test_mhc_diagnostics(void) {
    enum { LAYERS = 3 };
    t_mhc t[LAYERS];
    sm_mhc_acts host[LAYERS], dev[LAYERS];
    sm_rowcol_stats cpu, gpu;
    sm_mhc_config bad;
    sm_error err;
    sm_rng r;
    size_t k;
    int l;
    sm_rng_seed(&r, 56);
    for (l = 0; l < LAYERS; l++) {
        sm_mhc_params p;
        float *u;
        if (t_mhc_setup(&t[l], 4, 24, 1, 3, 301, &r)) return 1;
        p = sm_mhc_params_at(&t[l].cfg, t[l].params);
        u = (float *)t_alloc(t[l].nu);
        sm_mhc_pre_forward(u, &t[l].act, t[l].x, &p, &t[l].cfg, t[l].N);
        if (l == LAYERS - 1) /* every token's H_res[0][0] (map 8 of K = 24) < 0 */
            for (k = 8; k < t[l].nmaps; k += 24) t[l].act.maps[k] *= -1.0f;
        t_mhc_sync_act(&t[l]);
        host[l] = t[l].act, dev[l] = t[l].d_act;
        free(u);
    }
    cpu = sm_mhc_res_sum_error(&host[1], &t[1].cfg, t[1].N);
    CHECK_OK(smc_mhc_res_sum_error(&T_GPU, &gpu, &dev[1], &t[1].cfg, t[1].N, &err));
    CHECK(cpu.row_max > 1e-4f, "row sums already converged (%g): the check is blind",
          (double)cpu.row_max);
    if (t_mhc_stats_close(gpu, cpu, "mhc res sum error")) return 1;
    cpu = sm_mhc_amax_gain_tokens(host, LAYERS, &t[0].cfg, t[0].N);
    CHECK_OK(smc_mhc_amax_gain_tokens(&T_GPU, &gpu, dev, LAYERS, &t[0].cfg, t[0].N, &err));
    if (t_mhc_stats_close(gpu, cpu, "mhc amax gain")) return 1;
    for (l = 0; l < LAYERS; l++) t_mhc_free(&t[l]);
    bad = t[0].cfg;
    bad.n_streams = SM_SINKHORN_MAX_N + 1;
    CHECK(smc_mhc_acts_alloc(&dev[0], &bad, 10, &err) == SM_ERR_INVALID_ARG && !dev[0].maps,
          "act alloc accepted n_streams = %d", bad.n_streams);
    CHECK(strstr(err.msg, "n_streams") != NULL, "message does not name n_streams: %s", err.msg);
    return 0;
}

#define SMC_TESTS_mhc                                                                          \
    T(test_mhc_sinkhorn_forward), T(test_mhc_sinkhorn_backward), T(test_mhc_sublayer_dynamic), \
        T(test_mhc_sublayer_static), T(test_mhc_expand_collapse), T(test_mhc_diagnostics)

/* ---- >>backbone  backbone and >>loss -------------------------------- */

/* Gradient buffers start random so that the tests see backward accumulate. */

/* RMSNorm at one shape, with or without the gain. Forward: one row sum per
 * output (float on the GPU, double on the CPU): 1e-5. Backward: reordered
 * row dots, and dweight summed by blocks with atomics: 1e-4. */
static int t_backbone_rmsnorm_case(int N, int C, int with_weight, uint64_t seed) {
    size_t nc = (size_t)N * C;
    sm_rng r;
    float *x, *w, *dy, *dx, *dw, *out, *rstd, *d_x, *d_w, *d_dy, *d_dx, *d_dw, *d_out, *d_rstd;
    sm_rng_seed(&r, seed);
    x = t_randn(&r, nc, 1.5f), dy = t_randn(&r, nc, 1), dx = t_randn(&r, nc, 0.5f);
    w = with_weight ? t_randn(&r, (size_t)C, 1) : NULL, dw = t_randn(&r, (size_t)C, 0.5f);
    out = (float *)t_alloc(nc), rstd = (float *)t_alloc((size_t)N);
    d_x = (float *)t_dev(x, nc), d_w = w ? (float *)t_dev(w, (size_t)C) : NULL;
    d_dy = (float *)t_dev(dy, nc), d_dx = (float *)t_dev(dx, nc);
    d_dw = (float *)t_dev(dw, (size_t)C);
    d_out = (float *)t_dev(NULL, nc), d_rstd = (float *)t_dev(NULL, (size_t)N);
    sm_rmsnorm_forward(out, rstd, x, w, N, C);
    sm_rmsnorm_backward(dx, dw, dy, x, w, rstd, N, C);
    smc_rmsnorm_forward(&T_GPU, d_out, d_rstd, d_x, d_w, N, C);
    smc_rmsnorm_backward(&T_GPU, d_dx, d_dw, d_dy, d_x, d_w, d_rstd, N, C);
    CHECK_SYNC("rmsnorm");
    CHECK_CLOSE(d_out, out, nc, 1e-5, "rmsnorm out");
    CHECK_CLOSE(d_rstd, rstd, (size_t)N, 1e-5, "rmsnorm rstd");
    CHECK_CLOSE(d_dx, dx, nc, 1e-4, "rmsnorm dinp");
    CHECK_CLOSE(d_dw, dw, (size_t)C, 1e-4, "rmsnorm dweight");
    free(x), free(w), free(dy), free(dx), free(dw), free(out), free(rstd);
    smc_dfree(d_x), smc_dfree(d_w), smc_dfree(d_dy), smc_dfree(d_dx), smc_dfree(d_dw);
    smc_dfree(d_out), smc_dfree(d_rstd);
    return 0;
}

static int test_backbone_rmsnorm(void) {
    if (t_backbone_rmsnorm_case(14, 24, 1, 11)) return 1;
    if (t_backbone_rmsnorm_case(192, 128, 1, 12)) return 1;
    if (t_backbone_rmsnorm_case(1, 1000, 1, 13)) return 1;
    return t_backbone_rmsnorm_case(37, 77, 0, 14);
}

/* LayerNorm (SM_ARCH_GPT2) at one shape, inputs off-centre (mean 3) so the
 * mean matters; the tolerances of RMSNorm's. */
static int t_backbone_layernorm_case(int N, int C, uint64_t seed) {
    size_t nc = (size_t)N * C, i;
    sm_rng r;
    float *x, *w, *b, *dy, *dx, *dw, *db, *out, *mean, *rstd;
    float *d_x, *d_w, *d_b, *d_dy, *d_dx, *d_dw, *d_db, *d_out, *d_mean, *d_rstd;
    sm_rng_seed(&r, seed);
    x = t_randn(&r, nc, 1.5f), dy = t_randn(&r, nc, 1), dx = t_randn(&r, nc, 0.5f);
    for (i = 0; i < nc; i++) x[i] += 3.0f;
    w = t_randn(&r, (size_t)C, 1), b = t_randn(&r, (size_t)C, 1);
    dw = t_randn(&r, (size_t)C, 0.5f), db = t_randn(&r, (size_t)C, 0.5f);
    out = (float *)t_alloc(nc), mean = (float *)t_alloc((size_t)N), rstd = (float *)t_alloc((size_t)N);
    d_x = (float *)t_dev(x, nc), d_w = (float *)t_dev(w, (size_t)C), d_b = (float *)t_dev(b, (size_t)C);
    d_dy = (float *)t_dev(dy, nc), d_dx = (float *)t_dev(dx, nc);
    d_dw = (float *)t_dev(dw, (size_t)C), d_db = (float *)t_dev(db, (size_t)C);
    d_out = (float *)t_dev(NULL, nc), d_mean = (float *)t_dev(NULL, (size_t)N);
    d_rstd = (float *)t_dev(NULL, (size_t)N);
    sm_layernorm_forward(out, mean, rstd, x, w, b, N, C);
    sm_layernorm_backward(dx, dw, db, dy, x, w, mean, rstd, N, C);
    smc_layernorm_forward(&T_GPU, d_out, d_mean, d_rstd, d_x, d_w, d_b, N, C);
    smc_layernorm_backward(&T_GPU, d_dx, d_dw, d_db, d_dy, d_x, d_w, d_mean, d_rstd, N, C);
    CHECK_SYNC("layernorm");
    CHECK_CLOSE(d_out, out, nc, 1e-5, "layernorm out");
    CHECK_CLOSE(d_mean, mean, (size_t)N, 1e-5, "layernorm mean");
    CHECK_CLOSE(d_rstd, rstd, (size_t)N, 1e-5, "layernorm rstd");
    CHECK_CLOSE(d_dx, dx, nc, 1e-4, "layernorm dinp");
    CHECK_CLOSE(d_dw, dw, (size_t)C, 1e-4, "layernorm dweight");
    CHECK_CLOSE(d_db, db, (size_t)C, 1e-4, "layernorm dbias");
    free(x), free(w), free(b), free(dy), free(dx), free(dw), free(db), free(out), free(mean), free(rstd);
    smc_dfree(d_x), smc_dfree(d_w), smc_dfree(d_b), smc_dfree(d_dy), smc_dfree(d_dx);
    smc_dfree(d_dw), smc_dfree(d_db), smc_dfree(d_out), smc_dfree(d_mean), smc_dfree(d_rstd);
    return 0;
}

static int test_backbone_layernorm(void) {
    if (t_backbone_layernorm_case(14, 24, 21)) return 1;
    if (t_backbone_layernorm_case(192, 768, 22)) return 1;
    return t_backbone_layernorm_case(37, 77, 23);
}

#define T_BB_DINP 1
#define T_BB_DWEIGHT 2
#define T_BB_DBIAS 4

/* Linear at one shape; `grads` selects which gradients backward gets (the
 * others NULL, and inp/weight NULL where the CPU allows it). GEMMs sum in
 * another order than sm_sgemm and dbias adds block partials with atomics:
 * 1e-4. */
static int t_backbone_linear_case(int N, int C, int OC, int with_bias, int grads,
                                  uint64_t seed) {
    size_t nin = (size_t)N * C, nout = (size_t)N * OC, nw = (size_t)OC * C;
    int want_dx = grads & T_BB_DINP, want_dw = grads & T_BB_DWEIGHT, want_db = grads & T_BB_DBIAS;
    sm_rng r;
    float *x, *w, *b, *dy, *dx, *dw, *db, *out;
    float *d_x, *d_w, *d_b, *d_dy, *d_dx, *d_dw, *d_db, *d_out;
    sm_rng_seed(&r, seed);
    x = t_randn(&r, nin, 1), w = t_randn(&r, nw, 0.2f), b = t_randn(&r, (size_t)OC, 1);
    dy = t_randn(&r, nout, 1), dx = t_randn(&r, nin, 0.5f), dw = t_randn(&r, nw, 0.5f);
    db = t_randn(&r, (size_t)OC, 0.5f), out = (float *)t_alloc(nout);
    d_x = (float *)t_dev(x, nin), d_w = (float *)t_dev(w, nw), d_b = (float *)t_dev(b, (size_t)OC);
    d_dy = (float *)t_dev(dy, nout), d_dx = (float *)t_dev(dx, nin);
    d_dw = (float *)t_dev(dw, nw), d_db = (float *)t_dev(db, (size_t)OC);
    d_out = (float *)t_dev(NULL, nout);
    sm_linear_forward(out, x, w, with_bias ? b : NULL, N, C, OC);
    sm_linear_backward(want_dx ? dx : NULL, want_dw ? dw : NULL, want_db ? db : NULL, dy,
                       want_dw ? x : NULL, want_dx ? w : NULL, N, C, OC);
    smc_linear_forward(&T_GPU, d_out, d_x, d_w, with_bias ? d_b : NULL, N, C, OC);
    smc_linear_backward(&T_GPU, want_dx ? d_dx : NULL, want_dw ? d_dw : NULL,
                        want_db ? d_db : NULL, d_dy, want_dw ? d_x : NULL, want_dx ? d_w : NULL,
                        N, C, OC);
    CHECK_SYNC("linear");
    CHECK_CLOSE(d_out, out, nout, 1e-4, "linear out");
    CHECK_CLOSE(d_dx, dx, nin, 1e-4, "linear dinp");
    CHECK_CLOSE(d_dw, dw, nw, 1e-4, "linear dweight");
    CHECK_CLOSE(d_db, db, (size_t)OC, 1e-4, "linear dbias");
    free(x), free(w), free(b), free(dy), free(dx), free(dw), free(db), free(out);
    smc_dfree(d_x), smc_dfree(d_w), smc_dfree(d_b), smc_dfree(d_dy), smc_dfree(d_dx);
    smc_dfree(d_dw), smc_dfree(d_db), smc_dfree(d_out);
    return 0;
}

static int test_backbone_linear(void) {
    const int all = T_BB_DINP | T_BB_DWEIGHT | T_BB_DBIAS;
    if (t_backbone_linear_case(14, 24, 72, 1, all, 21)) return 1;
    if (t_backbone_linear_case(192, 128, 384, 1, all, 22)) return 1;
    if (t_backbone_linear_case(1000, 33, 5, 1, T_BB_DBIAS, 23)) return 1;
    if (t_backbone_linear_case(37, 40, 29, 0, T_BB_DWEIGHT, 24)) return 1;
    return t_backbone_linear_case(37, 40, 29, 0, T_BB_DINP, 25);
}

/* GELU and SiLU forward and backward over n values: elementwise, the same
 * formulas; device tanhf/expf and fused multiply-adds differ from the host
 * in the last bits: 1e-5. */
static int t_backbone_activations_case(size_t n, uint64_t seed) {
    sm_rng r;
    int silu;
    sm_rng_seed(&r, seed);
    for (silu = 0; silu < 2; silu++) {
        float *x = t_randn(&r, n, 3), *dy = t_randn(&r, n, 1), *dx = t_randn(&r, n, 0.5f);
        float *out = (float *)t_alloc(n), *d_x = (float *)t_dev(x, n);
        float *d_dy = (float *)t_dev(dy, n), *d_dx = (float *)t_dev(dx, n);
        float *d_out = (float *)t_dev(NULL, n);
        if (silu) {
            sm_silu_forward(out, x, n), sm_silu_backward(dx, dy, x, n);
            smc_silu_forward(&T_GPU, d_out, d_x, n), smc_silu_backward(&T_GPU, d_dx, d_dy, d_x, n);
        } else {
            sm_gelu_forward(out, x, n), sm_gelu_backward(dx, dy, x, n);
            smc_gelu_forward(&T_GPU, d_out, d_x, n), smc_gelu_backward(&T_GPU, d_dx, d_dy, d_x, n);
        }
        CHECK_SYNC(silu ? "silu" : "gelu");
        CHECK_CLOSE(d_out, out, n, 1e-5, silu ? "silu out" : "gelu out");
        CHECK_CLOSE(d_dx, dx, n, 1e-5, silu ? "silu dinp" : "gelu dinp");
        free(x), free(dy), free(dx), free(out);
        smc_dfree(d_x), smc_dfree(d_dy), smc_dfree(d_dx), smc_dfree(d_out);
    }
    return 0;
}

static int test_backbone_activations(void) {
    if (t_backbone_activations_case(1, 31)) return 1;
    if (t_backbone_activations_case(1000, 32)) return 1;
    return t_backbone_activations_case(100003, 33);
}

/* Embedding at one shape, V small so tokens repeat. Forward and dwpe are
 * the CPU's adds in the CPU's order (exact); dwte is scattered with atomics
 * in another order: 1e-5. */
static int t_backbone_embedding_case(int B, int T, int C, int V, uint64_t seed) {
    size_t n = (size_t)B * T * C, ne = (size_t)V * C, np = (size_t)T * C;
    sm_rng r;
    int *tok = (int *)t_alloc((size_t)B * T), *d_tok, i;
    float *wte, *wpe, *dy, *dwte, *dwpe, *out, *d_wte, *d_wpe, *d_dy, *d_dwte, *d_dwpe, *d_out;
    sm_rng_seed(&r, seed);
    for (i = 0; i < B * T; i++) tok[i] = (int)sm_rng_below(&r, (uint32_t)V);
    wte = t_randn(&r, ne, 1), wpe = t_randn(&r, np, 1), dy = t_randn(&r, n, 1);
    dwte = t_randn(&r, ne, 0.5f), dwpe = t_randn(&r, np, 0.5f), out = (float *)t_alloc(n);
    d_tok = (int *)t_dev(tok, (size_t)B * T), d_wte = (float *)t_dev(wte, ne);
    d_wpe = (float *)t_dev(wpe, np), d_dy = (float *)t_dev(dy, n);
    d_dwte = (float *)t_dev(dwte, ne), d_dwpe = (float *)t_dev(dwpe, np);
    d_out = (float *)t_dev(NULL, n);
    sm_embedding_forward(out, tok, wte, wpe, B, T, C);
    sm_embedding_backward(dwte, dwpe, dy, tok, B, T, C);
    smc_embedding_forward(&T_GPU, d_out, d_tok, d_wte, d_wpe, B, T, C);
    smc_embedding_backward(&T_GPU, d_dwte, d_dwpe, d_dy, d_tok, B, T, C);
    CHECK_SYNC("embedding");
    CHECK_CLOSE(d_out, out, n, 0, "embedding out");
    CHECK_CLOSE(d_dwpe, dwpe, np, 0, "embedding dwpe");
    CHECK_CLOSE(d_dwte, dwte, ne, 1e-5, "embedding dwte");
    free(tok), free(wte), free(wpe), free(dy), free(dwte), free(dwpe), free(out);
    smc_dfree(d_tok), smc_dfree(d_wte), smc_dfree(d_wpe), smc_dfree(d_dy), smc_dfree(d_dwte);
    smc_dfree(d_dwpe), smc_dfree(d_out);
    return 0;
}

static int test_backbone_embedding(void) {
    if (t_backbone_embedding_case(2, 7, 24, 5, 41)) return 1;
    return t_backbone_embedding_case(3, 64, 128, 97, 42);
}

/* Attention at one shape: out, the saved probabilities att (zeros above
 * the diagonal included) and dqkv. Scores and products are cuBLAS GEMMs
 * summed in another order than the CPU loops: 1e-4. */
static int t_backbone_attention_case(int B, int T, int C, int NH, uint64_t seed) {
    size_t nqkv = (size_t)B * T * 3 * C, n = (size_t)B * T * C, natt = (size_t)B * NH * T * T;
    sm_rng r;
    float *qkv, *dy, *dqkv, *out, *att, *d_qkv, *d_dy, *d_dqkv, *d_out, *d_att, *d_scratch;
    sm_rng_seed(&r, seed);
    qkv = t_randn(&r, nqkv, 1), dy = t_randn(&r, n, 1), dqkv = t_randn(&r, nqkv, 0.5f);
    out = (float *)t_alloc(n), att = (float *)t_alloc(natt);
    d_qkv = (float *)t_dev(qkv, nqkv), d_dy = (float *)t_dev(dy, n);
    d_dqkv = (float *)t_dev(dqkv, nqkv), d_out = (float *)t_dev(NULL, n);
    d_att = (float *)t_dev(NULL, natt);
    d_scratch = (float *)t_dev(NULL, smc_attention_scratch_floats(B, T, C, NH));
    sm_attention_forward(out, att, qkv, B, T, C, NH);
    sm_attention_backward(dqkv, dy, qkv, att, B, T, C, NH);
    smc_attention_forward(&T_GPU, d_out, d_att, d_qkv, B, T, C, NH);
    smc_attention_backward(&T_GPU, d_dqkv, d_dy, d_qkv, d_att, B, T, C, NH, d_scratch);
    CHECK_SYNC("attention");
    CHECK_CLOSE(d_out, out, n, 1e-4, "attention out");
    CHECK_CLOSE(d_att, att, natt, 1e-4, "attention att");
    CHECK_CLOSE(d_dqkv, dqkv, nqkv, 1e-4, "attention dqkv");
    free(qkv), free(dy), free(dqkv), free(out), free(att);
    smc_dfree(d_qkv), smc_dfree(d_dy), smc_dfree(d_dqkv), smc_dfree(d_out), smc_dfree(d_att);
    smc_dfree(d_scratch);
    return 0;
}

static int test_backbone_attention(void) {
    if (t_backbone_attention_case(2, 7, 24, 3, 51)) return 1;   /* GEMMs looped over batch */
    if (t_backbone_attention_case(3, 64, 128, 4, 52)) return 1;
    return t_backbone_attention_case(5, 33, 48, 2, 53);         /* looped over heads */
}

/* Cross-entropy at one shape, every `ignore_every`-th target ignored (1:
 * all), and every other counted target's logit lowered by `below` (its
 * loss is then ~below, past any floor on the probability). Probabilities,
 * losses and the mean: block reductions in float where the CPU sums in
 * double: 1e-5; the count is exact. Backward runs in place on the
 * probabilities, as a model does: 1e-5. */
static int t_backbone_crossentropy_case(int N, int V, int ignore_every, float below,
                                        uint64_t seed) {
    size_t n = (size_t)N * V;
    sm_rng r;
    int *tgt = (int *)t_alloc((size_t)N), *d_tgt, i, count, d_count = -1;
    float *logits, *losses, *d_logits, *d_losses, mean, d_mean, dloss;
    sm_rng_seed(&r, seed);
    for (i = 0; i < N; i++)
        tgt[i] = i % ignore_every == 0 ? SM_IGNORE_INDEX : (int)sm_rng_below(&r, (uint32_t)V);
    logits = t_randn(&r, n, 3), losses = (float *)t_alloc((size_t)N);
    for (i = 1; i < N; i += 2)
        if (tgt[i] != SM_IGNORE_INDEX) logits[(size_t)i * V + tgt[i]] -= below;
    d_tgt = (int *)t_dev(tgt, (size_t)N), d_logits = (float *)t_dev(logits, n);
    d_losses = (float *)t_dev(NULL, (size_t)N);
    mean = sm_crossentropy_forward(losses, logits, tgt, N, V, &count);
    d_mean = smc_crossentropy_forward(&T_GPU, d_losses, d_logits, d_tgt, N, V, &d_count);
    CHECK_SYNC("crossentropy forward");
    CHECK(d_count == count, "n_counted: GPU %d, CPU %d", d_count, count);
    CHECK(fabs((double)d_mean - mean) <= 1e-5 * (1 + fabs((double)mean)),
          "mean loss: GPU %g, CPU %g", (double)d_mean, (double)mean);
    CHECK_CLOSE(d_logits, logits, n, 1e-5, "crossentropy probs");
    CHECK_CLOSE(d_losses, losses, (size_t)N, 1e-5, "crossentropy losses");
    dloss = 1.0f / (float)(count > 0 ? count : 1);
    sm_crossentropy_backward(logits, logits, tgt, N, V, dloss);
    smc_crossentropy_backward(&T_GPU, d_logits, d_logits, d_tgt, N, V, dloss);
    CHECK_SYNC("crossentropy backward");
    CHECK_CLOSE(d_logits, logits, n, 1e-5, "crossentropy dlogits");
    free(tgt), free(logits), free(losses);
    smc_dfree(d_tgt), smc_dfree(d_logits), smc_dfree(d_losses);
    return 0;
}

static int test_backbone_crossentropy(void) {
    if (t_backbone_crossentropy_case(14, 37, 4, 0.0f, 61)) return 1;
    if (t_backbone_crossentropy_case(192, 1000, 7, 0.0f, 62)) return 1;
    if (t_backbone_crossentropy_case(2000, 3, 5, 0.0f, 63)) return 1;
    if (t_backbone_crossentropy_case(64, 50, 4, 200.0f, 65)) return 1; /* p underflows */
    return t_backbone_crossentropy_case(3, 5, 1, 0.0f, 64);            /* nothing counted: mean 0 */
}

#define SMC_TESTS_backbone                                                                   \
    T(test_backbone_rmsnorm), T(test_backbone_layernorm), T(test_backbone_linear), T(test_backbone_activations),         \
        T(test_backbone_embedding), T(test_backbone_attention), T(test_backbone_crossentropy)

/* ---- >>optim  optimizer, >>params row sets -------------------------- */

/* Whether the device set s holds the same rows as the host set h: equal
 * counts, every listed row distinct and in h, and equal marks. */
static int t_opt_same_set(const smc_row_set *s, const sm_row_set *h) {
    size_t n = smc_row_set_count(&T_GPU, s), k;
    uint32_t *list = (uint32_t *)t_host(s->rows, n), *mark = (uint32_t *)t_host(s->mark, h->nrows);
    unsigned char *seen = (unsigned char *)calloc(h->nrows, 1);
    int bad = n != h->count;
    for (k = 0; k < n && !bad; k++) {
        bad = list[k] >= h->nrows || !h->mark[list[k]] || seen[list[k]];
        if (!bad) seen[list[k]] = 1;
    }
    for (k = 0; k < h->nrows && !bad; k++) bad = (mark[k] != 0) != (h->mark[k] != 0);
    free(list), free(mark), free(seen);
    CHECK(!bad, "device row set (%zu rows) differs from the host set (%zu rows)", n, h->count);
    return 0;
}

/* Adds n random rows below `below` (so with duplicates) to both sets. */
static int t_opt_touch(sm_rng *r, sm_row_set *h, smc_row_set *s, size_t n, uint32_t below) {
    uint32_t *idx = (uint32_t *)t_alloc(n), *d_idx;
    size_t k;
    for (k = 0; k < n; k++) {
        idx[k] = sm_rng_below(r, below);
        sm_row_set_add(h, idx[k]);
    }
    d_idx = (uint32_t *)t_dev(idx, n);
    smc_row_set_add(&T_GPU, s, d_idx, n);
    CHECK_SYNC("row set add");
    smc_dfree(d_idx);
    free(idx);
    return 0;
}

/* 1000 adds over 300 rows of 777 (duplicates, several blocks) count each row
 * once; a clear unmarks every row, so adding rows again (some the same) works. */
static int test_optimizer_row_set(void) {
    const size_t nrows = 777, n = 1000;
    const uint32_t below[2] = {300, 777};
    sm_row_set h;
    smc_row_set s;
    sm_error err;
    sm_rng r;
    int pass;
    sm_rng_seed(&r, 11);
    CHECK_OK(sm_row_set_init(&h, nrows, &err));
    CHECK_OK(smc_row_set_init(&s, nrows, &err));
    for (pass = 0; pass < 2; pass++) {
        if (t_opt_touch(&r, &h, &s, n, below[pass]) || t_opt_same_set(&s, &h)) return 1;
        CHECK(h.count < n, "pass %d: no duplicates drawn", pass);
        smc_row_set_add(&T_GPU, &s, NULL, 0); /* adding nothing is a no-op */
        smc_row_set_clear(&T_GPU, &s);
        sm_row_set_clear(&h);
        CHECK_SYNC("row set clear");
        if (t_opt_same_set(&s, &h)) return 1; /* empty, every mark 0 */
    }
    sm_row_set_free(&h);
    smc_row_set_free(&s);
    return 0;
}

/* The test table: three groups (main; mem with its own lr, lr_mult, betas,
 * eps and decay; frozen with lr_mult 0) and dense tensors (two adjacent
 * alike, one no_decay, an empty one, one of several blocks after the tables)
 * around two sparse tables whose rows (37, 40 floats) are not multiples of a
 * warp. */
static const struct {
    const char *name;
    size_t size;
    int group, no_decay, table; /* table: index of its row set, -1 when dense */
} T_OPT_TENSORS[] = {
    {"w1", 3001, 0, 0, -1},       {"w1b", 1000, 0, 0, -1},      {"gain", 77, 0, 1, -1},
    {"empty", 0, 0, 0, -1},       {"w2", 2500, 1, 0, -1},       {"table", 300 * 37, 1, 0, 0},
    {"w3", 500, 2, 0, -1},        {"ftable", 50 * 40, 2, 0, 1}, {"w4", 70001, 0, 0, -1},
};
#define T_OPT_N_TENSORS ((int)(sizeof T_OPT_TENSORS / sizeof T_OPT_TENSORS[0]))
static const size_t T_OPT_TABLE_ROWS[2] = {300, 50};

static int t_opt_tensor(const char *name) {
    int i;
    for (i = 0; strcmp(T_OPT_TENSORS[i].name, name) != 0; i++) continue;
    return i;
}

static sm_status t_opt_layout(sm_params *p, sm_row_set *sets, sm_error *err) {
    sm_param_group g[3];
    int i, k;
    memset(p, 0, sizeof *p);
    g[0] = sm_param_group_default("main", 1e-2f);
    g[0].weight_decay = 0.1f;
    g[1] = sm_param_group_default("mem", 3e-2f);
    g[1].lr_mult = 0.5f;
    g[1].beta1 = 0.8f;
    g[1].beta2 = 0.99f;
    g[1].eps = 1e-6f;
    g[1].weight_decay = 0.01f;
    g[2] = sm_param_group_default("frozen", 1e-2f);
    g[2].lr_mult = 0.0f;
    for (k = 0; k < 2; k++)
        if (sm_row_set_init(&sets[k], T_OPT_TABLE_ROWS[k], err) != SM_OK) return err->code;
    for (k = 0; k < 3; k++)
        if (sm_params_add_group(p, g[k], err) < 0) return err->code;
    for (i = 0; i < T_OPT_N_TENSORS; i++) {
        int table = T_OPT_TENSORS[i].table;
        size_t row_size = table < 0 ? 0 : T_OPT_TENSORS[i].size / T_OPT_TABLE_ROWS[table];
        if (sm_params_add_tensor(p, T_OPT_TENSORS[i].name, T_OPT_TENSORS[i].size,
                                 T_OPT_TENSORS[i].group, row_size, table < 0 ? NULL : &sets[table],
                                 err) == (size_t)-1)
            return err->code;
        p->tensors[i].no_decay = T_OPT_TENSORS[i].no_decay;
    }
    return sm_params_alloc(p, err);
}

static void t_opt_layout_free(sm_params *p, sm_row_set *sets) {
    sm_params_free(p);
    sm_row_set_free(&sets[0]);
    sm_row_set_free(&sets[1]);
}

/* Random gradients everywhere (untouched table rows too, which every step
 * must leave alone), the same on the host and the device. */
static void t_opt_random_grads(sm_rng *r, sm_params *p, const smc_params *d) {
    sm_error err;
    sm_rng_fill_normal(r, p->grad, p->total, 1.0f);
    if (smc_upload(d->grad, p->grad, p->total * sizeof(float), &err) != SM_OK) {
        fprintf(stderr, "tests_cuda: %s\n", err.msg);
        exit(2);
    }
}

/* GPU norms (global and of each group) within 1e-6 relative of the CPU's:
 * the GPU sums in double, the CPU each row in float (~1e-7 apart). */
static int t_opt_norms_match(const sm_params *p, const smc_params *d) {
    double cpu = sm_params_grad_norm(p), gpu = smc_params_grad_norm(&T_GPU, d);
    int g;
    CHECK(fabs(gpu - cpu) <= 1e-6 * cpu, "grad norm: GPU %.9g, CPU %.9g", gpu, cpu);
    for (g = 0; g < p->n_groups; g++) {
        cpu = sm_params_group_grad_norm(p, g);
        gpu = smc_params_group_grad_norm(&T_GPU, d, g);
        CHECK(fabs(gpu - cpu) <= 1e-6 * cpu, "group %d norm: GPU %.9g, CPU %.9g", g, gpu, cpu);
    }
    return 0;
}

/* The GPU step left every float it must not move bit-identical: the table
 * rows not marked in was[table] before the step, and the weights of the
 * frozen group (whose moments still move, as on the CPU).
 * before/after: data, m, v downloaded around the step. */
static int t_opt_unmoved(const sm_params *p, float *const before[3], float *const after[3],
                         unsigned char *const was[2]) {
    int i, k;
    size_t row;
    for (i = 0; i < T_OPT_N_TENSORS; i++) {
        const sm_param_tensor *t = &p->tensors[i];
        int frozen = p->groups[t->group].lr_mult == 0.0f, table = T_OPT_TENSORS[i].table;
        size_t n_rows = table < 0 ? 1 : T_OPT_TABLE_ROWS[table], len = t->size / n_rows;
        for (row = 0; row < n_rows; row++) {
            size_t o = t->offset + row * len;
            int n_fixed = table >= 0 && !was[table][row] ? 3 : frozen; /* arrays: data, m, v */
            for (k = 0; k < n_fixed; k++)
                CHECK(memcmp(before[k] + o, after[k] + o, len * sizeof(float)) == 0,
                      "%s row %zu (array %d) moved but must not", t->name, row, k);
        }
    }
    return 0;
}

/* One step on both sides, then data, m, v within 1e-6 (elementwise math;
 * nvcc may fuse a multiply-add the CPU rounds twice), gradients identical
 * (only touched rows zeroed), untouched floats bit-identical, sets empty. */
static int t_opt_step_matches(sm_params *p, sm_row_set *hp, smc_params *d, smc_row_set *ds,
                              float lr_factor, float clip) {
    float *dev[3] = {d->data, d->m, d->v}, *ref[3] = {p->data, p->m, p->v};
    float *before[3], *after[3];
    unsigned char *was[2];
    const char *names[3] = {"params", "first moments", "second moments"};
    int k, bad;
    for (k = 0; k < 3; k++) before[k] = t_host(dev[k], p->total);
    for (k = 0; k < 2; k++) {
        was[k] = (unsigned char *)malloc(hp[k].nrows);
        memcpy(was[k], hp[k].mark, hp[k].nrows);
    }
    sm_params_adamw_step(p, lr_factor, clip);
    smc_params_adamw_step(&T_GPU, d, lr_factor, clip);
    CHECK_SYNC("adamw step");
    CHECK(d->layout->step == p->step, "step %llu, CPU %llu", (unsigned long long)d->layout->step,
          (unsigned long long)p->step);
    for (k = 0; k < 3; k++) CHECK_CLOSE(dev[k], ref[k], p->total, 1e-6, names[k]);
    CHECK_CLOSE(d->grad, p->grad, p->total, 0.0, "gradients after the step");
    for (k = 0; k < 3; k++) after[k] = t_host(dev[k], p->total);
    bad = t_opt_unmoved(p, before, after, was);
    for (k = 0; k < 3; k++) free(before[k]), free(after[k]);
    free(was[0]), free(was[1]);
    if (bad) return 1;
    for (k = 0; k < 2; k++)
        if (t_opt_same_set(&ds[k], &hp[k])) return 1; /* cleared: empty, no marks */
    return 0;
}

/* Three steps of CPU vs GPU from a resumed state (random params and moments,
 * step 5, uploaded), each after touching table rows (with duplicates) and
 * checking zero_grad and the norms; clipping active. Ends with a download. */
static int t_opt_adamw_matches_cpu(void) {
    const float lr_factor[3] = {1.0f, 0.5f, 0.25f};
    const size_t n_touch[2] = {200, 30};
    sm_params *p = (sm_params *)calloc(1, sizeof *p), *q = (sm_params *)calloc(1, sizeof *q);
    sm_row_set hp[2], hq[2]; /* p's sets track touched rows; q's only mark its tables sparse */
    smc_row_set ds[2];
    smc_params d;
    sm_error err;
    sm_rng r;
    int step, k, i;
    sm_rng_seed(&r, 7);
    CHECK_OK(t_opt_layout(p, hp, &err));
    CHECK_OK(t_opt_layout(q, hq, &err));
    sm_rng_fill_normal(&r, p->data, p->total, 0.5f);
    sm_rng_fill_normal(&r, p->m, p->total, 0.1f);
    sm_rng_fill_normal(&r, p->v, p->total, 0.1f);
    for (i = 0; i < (int)p->total; i++) /* sqrt(v) >= 0.01, like moments after real steps */
        p->v[i] = p->v[i] * p->v[i] + 1e-4f;
    p->step = q->step = 5;
    memcpy(q->data, p->data, p->total * sizeof(float));
    memcpy(q->m, p->m, p->total * sizeof(float));
    memcpy(q->v, p->v, p->total * sizeof(float));
    CHECK_OK(smc_params_alloc(&d, q, &err));
    for (i = 0; i < T_OPT_N_TENSORS; i++)
        if ((k = T_OPT_TENSORS[i].table) >= 0) {
            CHECK_OK(smc_row_set_init(&ds[k], T_OPT_TABLE_ROWS[k], &err));
            smc_params_bind_rows(&d, i, &ds[k]);
        }
    CHECK_OK(smc_params_check(&d, &err));
    CHECK_OK(smc_params_upload(&T_GPU, &d, &err));
    for (step = 0; step < 3; step++) {
        float clip;
        for (k = 0; k < 2; k++)
            if (t_opt_touch(&r, &hp[k], &ds[k], n_touch[k], (uint32_t)T_OPT_TABLE_ROWS[k]))
                return 1;
        t_opt_random_grads(&r, p, &d);
        sm_params_zero_grad(p);
        smc_params_zero_grad(&T_GPU, &d);
        CHECK_SYNC("zero grad");
        CHECK_CLOSE(d.grad, p->grad, p->total, 0.0, "gradients after zero_grad");
        t_opt_random_grads(&r, p, &d);
        if (t_opt_norms_match(p, &d)) return 1;
        clip = sm_clip_scale(sm_params_grad_norm(p), 1.0f);
        CHECK(clip < 1.0f, "clipping not exercised (scale %g)", clip);
        if (t_opt_step_matches(p, hp, &d, ds, lr_factor[step], clip)) return 1;
    }
    memset(q->data, 0, q->total * sizeof(float));
    memset(q->m, 0, q->total * sizeof(float));
    memset(q->v, 0, q->total * sizeof(float));
    CHECK_OK(smc_params_download(&T_GPU, &d, &err));
    CHECK(t_err(q->data, p->data, p->total) <= 1e-6, "downloaded params differ");
    CHECK(t_err(q->m, p->m, p->total) <= 1e-6, "downloaded first moments differ");
    CHECK(t_err(q->v, p->v, p->total) <= 1e-6, "downloaded second moments differ");
    smc_params_free(&d);
    smc_row_set_free(&ds[0]);
    smc_row_set_free(&ds[1]);
    t_opt_layout_free(p, hp);
    t_opt_layout_free(q, hq);
    free(p), free(q);
    return 0;
}

/* The test above with launches sized as for a device of sm_count SMs. */
static int t_opt_adamw_sized_for(int sm_count) {
    int saved = T_GPU.sm_count, bad;
    T_GPU.sm_count = sm_count;
    bad = t_opt_adamw_matches_cpu();
    T_GPU.sm_count = saved;
    return bad;
}

static int test_optimizer_adamw_matches_cpu(void) { return t_opt_adamw_sized_for(T_GPU.sm_count); }

/* With 1 SM the grids shrink to 8 blocks, so warps loop over several rows. */
static int test_optimizer_adamw_grid_stride(void) { return t_opt_adamw_sized_for(1); }

/* smc_params_check names the first unbound sparse tensor, a set of the
 * wrong size and a set bound to a dense tensor; copies need host buffers. */
static int test_optimizer_check_names_tensor(void) {
    sm_params *p = (sm_params *)calloc(1, sizeof *p);
    sm_row_set hs[2];
    smc_row_set ds[2], wrong;
    smc_params d;
    sm_error err;
    CHECK_OK(t_opt_layout(p, hs, &err));
    CHECK_OK(smc_params_alloc(&d, p, &err));
    CHECK_OK(smc_row_set_init(&ds[0], T_OPT_TABLE_ROWS[0], &err));
    CHECK_OK(smc_row_set_init(&ds[1], T_OPT_TABLE_ROWS[1], &err));
    CHECK_OK(smc_row_set_init(&wrong, T_OPT_TABLE_ROWS[0] - 1, &err));
    CHECK(smc_params_check(&d, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "tensor table:"),
          "unbound table: %s", err.msg);
    smc_params_bind_rows(&d, t_opt_tensor("table"), &wrong);
    CHECK(smc_params_check(&d, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "tensor table:") &&
              strstr(err.msg, "299"),
          "wrong-size set: %s", err.msg);
    smc_params_bind_rows(&d, t_opt_tensor("table"), &ds[0]);
    CHECK(smc_params_check(&d, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "tensor ftable:"),
          "unbound ftable: %s", err.msg);
    smc_params_bind_rows(&d, t_opt_tensor("ftable"), &ds[1]);
    CHECK_OK(smc_params_check(&d, &err));
    smc_params_bind_rows(&d, t_opt_tensor("w1"), &ds[1]);
    CHECK(smc_params_check(&d, &err) == SM_ERR_INVALID_ARG && strstr(err.msg, "tensor w1:"),
          "set on a dense tensor: %s", err.msg);
    sm_params_free(p); /* the host buffers go: copies must refuse */
    CHECK(smc_params_download(&T_GPU, &d, &err) == SM_ERR_INVALID_ARG, "download without buffers");
    smc_params_free(&d);
    smc_row_set_free(&ds[0]);
    smc_row_set_free(&ds[1]);
    smc_row_set_free(&wrong);
    t_opt_layout_free(p, hs);
    free(p);
    return 0;
}

#define SMC_TESTS_OPTIMIZER                                                                  \
    T(test_optimizer_row_set), T(test_optimizer_adamw_matches_cpu),                          \
        T(test_optimizer_adamw_grid_stride), T(test_optimizer_check_names_tensor)

/* ---- >>model  one whole training step, GPU vs CPU ------------------- */

/* A small model (V 97, T 24, 2 layers, C 48) with the modules `mods`
 * selects: 'e' Engram at layer 1, 'n' Engram-Nine (hot set from the batch),
 * 'p' PEER added to layer 0's MLP, 'm' mHC with 4 streams (Engram as an mHC
 * branch: the GPU's form), 'g' the GPT-2 arch (LayerNorm with bias, the
 * vocabulary padded to 128, tied head). */
static sm_model_config t_model_config(const char *mods) {
    sm_model_config c = sm_model_default_config();
    c.vocab_size = 97, c.seq_len = 24, c.n_layer = 2, c.n_head = 3, c.d_model = 48, c.d_ff = 96;
    if (strchr(mods, 'g')) c.arch = SM_ARCH_GPT2, c.padded_vocab_size = 128, c.tied_head = 1;
    if (strchr(mods, 'e') || strchr(mods, 'n')) {
        c.use_engram = 1;
        c.engram.d_model = 48, c.engram.d_head = 8;
        c.engram.hash.n_heads = 2, c.engram.hash.table_rows = 101;
        c.engram.hash.n_layers = 1, c.engram.hash.layer_ids[0] = 1;
    }
    if (strchr(mods, 'n')) {
        sm_nine_iso iso;
        c.nine.n_hot[0] = c.nine.n_hot[1] = 8;
        if (sm_nine_iso_config(&iso, &c.engram.hash, &c.nine, NULL) == SM_OK)
            c.use_nine = 1, c.engram.hash = iso.cold, c.nine = iso.nine;
    }
    if (strchr(mods, 'p')) {
        c.use_peer = 1, c.peer_n_layers = 1, c.peer_layer_ids[0] = 0, c.peer_replace_mlp = 0;
        c.peer.n_sub = 12, c.peer.heads = 2, c.peer.topk = 4, c.peer.d_key = 16;
    }
    if (strchr(mods, 'm')) c.use_mhc = 1, c.mhc.channels = 48, c.engram_mhc = SM_ENGRAM_MHC_BRANCH;
    return c;
}

/* Per-sublayer diagnostics of the GPU model (fetched into its host model)
 * against the CPU model's, to 1e-4 relative. */
static int t_model_diagnostics_match(const sm_model *gpu_host, const sm_model *cpu, const char *mods) {
    int i;
    for (i = 0; i < cpu->n_sub; i++) {
        const sm_sublayer *a = &gpu_host->sub[i], *b = &cpu->sub[i];
        CHECK(fabs(a->out_norm - b->out_norm) <= 1e-4 * (1 + b->out_norm) &&
                  fabs(a->peer_norm - b->peer_norm) <= 1e-4 * (1 + b->peer_norm) &&
                  fabs(a->grad_norm - b->grad_norm) <= 1e-4 * (1 + b->grad_norm),
              "%s: sublayer %d diagnostics %g %g %g vs CPU %g %g %g", mods, i, a->out_norm,
              a->peer_norm, a->grad_norm, b->out_norm, b->peer_norm, b->grad_norm);
    }
    return 0;
}

/* Forward (loss), backward (every gradient, the diagnostics) and one AdamW
 * step of the CPU model and its GPU mirror from the same weights and batch:
 * a batch smaller than the models' capacity (B 3 of 4, T 20 of 24) with
 * document starts. Tolerances, times `loose` (1 in fp32): the loss to 1e-5
 * relative, gradients and updated weights to 2e-4 of 1 + |value| (GPU sums
 * run in another order; atomics in the scatters). */
static int t_model_step_matches(const char *mods, double loose) {
    sm_model_config cfg = t_model_config(mods);
    const int B_max = 4, B = 3, T = 20, N = B * T;
    int inputs[B * T], targets[B * T];
    unsigned char doc[B * T];
    uint32_t stream[B * T];
    sm_model cpu, host;
    smc_model gpu;
    sm_error err;
    sm_rng r;
    float *g;
    double norm_cpu, norm_gpu;
    int i;
    CHECK(!strchr(mods, 'n') || cfg.use_nine, "Engram-Nine iso configuration failed");
    sm_rng_seed(&r, 11);
    for (i = 0; i < N; i++) inputs[i] = (int)(sm_rng_u64(&r) % 20), stream[i] = (uint32_t)inputs[i];
    for (i = 0; i < N; i++) targets[i] = i % 7 == 3 ? SM_IGNORE_INDEX : inputs[(i + 1) % N];
    for (i = 0; i < N; i++) doc[i] = i % T == 0 || i % 13 == 5;
    CHECK_OK(sm_model_init(&cpu, &cfg, B_max, 5, &err));
    CHECK_OK(sm_model_init(&host, &cfg, B_max, 5, &err));
    if (cfg.use_nine) {
        CHECK_OK(sm_model_build_hot_set(&cpu, stream, NULL, N, &err));
        CHECK_OK(sm_model_build_hot_set(&host, stream, NULL, N, &err));
    }
    CHECK_OK(smc_model_init(&gpu, &T_GPU, &host, &err));
    sm_params_zero_grad(&cpu.params);
    smc_params_zero_grad(&T_GPU, &gpu.params);
    CHECK_OK(sm_model_forward(&cpu, inputs, targets, doc, B, T, &err));
    CHECK_OK(smc_model_forward(&gpu, inputs, targets, doc, B, T, &err));
    CHECK(fabs(host.loss - cpu.loss) <= 1e-5 * loose * fabs(cpu.loss), "%s: loss %.7f (GPU) vs %.7f", mods,
          host.loss, cpu.loss);
    sm_model_backward(&cpu);
    smc_model_backward(&gpu);
    CHECK_SYNC("model backward");
    CHECK_OK(smc_model_fetch_diagnostics(&gpu, &err));
    if (loose == 1 && t_model_diagnostics_match(&host, &cpu, mods)) return 1;
    g = t_host(gpu.params.grad, cpu.params.total);
    for (i = 0; i < cpu.params.n_tensors; i++) {
        const sm_param_tensor *t = &cpu.params.tensors[i];
        double e = t_err(g + t->offset, cpu.params.grad + t->offset, t->size);
        CHECK(e <= 2e-4 * loose, "%s: gradient of %s: GPU vs CPU error %.3g", mods, t->name, e);
    }
    free(g);
    norm_cpu = sm_params_grad_norm(&cpu.params);
    norm_gpu = smc_params_grad_norm(&T_GPU, &gpu.params);
    CHECK(fabs(norm_gpu - norm_cpu) <= 1e-4 * loose * norm_cpu, "%s: grad norm %g vs %g", mods, norm_gpu,
          norm_cpu);
    sm_params_adamw_step(&cpu.params, 1.0f, sm_clip_scale(norm_cpu, 1.0f));
    smc_params_adamw_step(&T_GPU, &gpu.params, 1.0f, sm_clip_scale(norm_cpu, 1.0f));
    CHECK_OK(smc_model_download(&gpu, &err));
    CHECK(t_err(host.params.data, cpu.params.data, cpu.params.total) <= 2e-4 * loose,
          "%s: weights after the step differ", mods);
    smc_model_free(&gpu);
    sm_model_free(&host), sm_model_free(&cpu);
    return 0;
}

static int test_model_step_backbone(void) { return t_model_step_matches("", 1); }
static int test_model_step_engram(void) { return t_model_step_matches("e", 1); }
static int test_model_step_nine(void) { return t_model_step_matches("n", 1); }
static int test_model_step_peer(void) { return t_model_step_matches("p", 1); }
static int test_model_step_mhc(void) { return t_model_step_matches("m", 1); }
static int test_model_step_all_modules(void) { return t_model_step_matches("epm", 1); }
/* The GPT-2 arch alone, and with the modules added (the fine-tuning
 * setting of reproduce-finetune). */
static int test_model_step_gpt2_arch(void) {
    return t_model_step_matches("g", 1) || t_model_step_matches("gepm", 1);
}

/* The training default, TF32 GEMMs (10-bit mantissas): the same step within
 * 100x the fp32 tolerances, on the backbone and with Engram and mHC (PEER's
 * expert choice may legitimately flip on near-ties under TF32). */
static int test_model_step_tf32(void) {
    int bad;
    smc_set_tf32(&T_GPU, 1);
    bad = t_model_step_matches("", 100) || t_model_step_matches("em", 100);
    smc_set_tf32(&T_GPU, 0);
    return bad;
}

/* Engram's per-stream form inside mHC has no GPU version: refused at init,
 * with a message naming the option to change. */
static int test_model_refuses_per_stream_engram(void) {
    sm_model_config cfg = t_model_config("em");
    sm_model host;
    smc_model gpu;
    sm_error err;
    cfg.engram_mhc = SM_ENGRAM_MHC_PER_STREAM;
    CHECK_OK(sm_model_init(&host, &cfg, 2, 5, &err));
    CHECK(smc_model_init(&gpu, &T_GPU, &host, &err) == SM_ERR_INVALID_ARG &&
              strstr(err.msg, "SM_ENGRAM_MHC_BRANCH"),
          "per-stream Engram accepted on the GPU: %s", err.msg);
    sm_model_free(&host);
    return 0;
}

#define SMC_TESTS_MODEL                                                                         \
    T(test_model_step_backbone), T(test_model_step_engram), T(test_model_step_nine),            \
        T(test_model_step_peer), T(test_model_step_mhc), T(test_model_step_all_modules),       \
        T(test_model_step_gpt2_arch),                                                           \
        T(test_model_step_tf32), T(test_model_refuses_per_stream_engram)

/* ---- runner ---------------------------------------------------------- */

static const t_case t_cases[] = {
    T(test_gemm_all_transposes), T(test_device_errors_named),
    SMC_TESTS_ENGRAM,
    SMC_TESTS_peer,
    SMC_TESTS_mhc,
    SMC_TESTS_backbone,
    SMC_TESTS_OPTIMIZER,
    SMC_TESTS_MODEL,
};

int main(int argc, char **argv) {
    size_t n = sizeof t_cases / sizeof t_cases[0];
    int failed;
    sm_error err;
    if (smc_device_count() == 0) {
        printf("no CUDA device: %zu GPU tests skipped\n", n);
        printf("0 passed, 0 failed\n");
        return 0;
    }
    if (smc_init(&T_GPU, 0, &err) != SM_OK) {
        fprintf(stderr, "tests_cuda: %s\n", err.msg);
        printf("0 passed, 1 failed\n");
        return 1;
    }
    smc_set_tf32(&T_GPU, 0);
    printf("device: %s (%d SMs)\n", T_GPU.name, T_GPU.sm_count);
    failed = t_run(t_cases, n, argv + 1, argc - 1);
    smc_free(&T_GPU);
    return failed ? 1 : 0;
}
