/* bench_mphf.c - minimal perfect hash (PTHash-style): build speed, query
 * speed (single and batched), space; and the same lookups through a plain
 * open-addressing (linear probing) table key -> index, the structure a user
 * would otherwise pick.
 *
 *   ./bench/bench_mphf [--lambda L] [n ...]   default: lambda 4 (the builder's
 *                                              default), 1000000 10000000 random keys
 *
 * One thread. Queries visit every key once in a random order. Timings are the
 * best of a few runs; the ratios are measured in this one run. */
#define SPARSEMEM_IMPLEMENTATION
#include "sparsemem.h"
#include <stdlib.h>
#include <string.h>

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "bench_mphf: out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

/* ---- the baseline: linear probing, load <= 1/2, 16-byte slots ---- */

typedef struct {
    uint64_t key;
    uint32_t value, used;
} oa_slot;

typedef struct {
    oa_slot *slots;
    uint64_t mask;
} oa_table;

static void oa_build(oa_table *t, const uint64_t *keys, size_t n) {
    uint64_t cap = 2, i, j;
    while (cap < 2 * (uint64_t)n) cap *= 2;
    t->slots = (oa_slot *)xmalloc(cap * sizeof(oa_slot));
    memset(t->slots, 0, cap * sizeof(oa_slot));
    t->mask = cap - 1;
    for (i = 0; i < n; i++) {
        for (j = sm_mix64(keys[i]) & t->mask; t->slots[j].used; j = (j + 1) & t->mask) {}
        t->slots[j].key = keys[i];
        t->slots[j].value = (uint32_t)i;
        t->slots[j].used = 1;
    }
}

static uint32_t oa_find(const oa_table *t, uint64_t key) {
    uint64_t j;
    for (j = sm_mix64(key) & t->mask; t->slots[j].used; j = (j + 1) & t->mask)
        if (t->slots[j].key == key) return t->slots[j].value;
    return 0xffffffffu;
}

/* ---- timing ---- */

typedef struct {
    const sm_mphf *f;
    const oa_table *t;
    const uint64_t *q;
    uint32_t *out;
    size_t n;
} query_ctx;

static void run_single(query_ctx *c) {
    size_t i;
    for (i = 0; i < c->n; i++) c->out[i] = sm_mphf_lookup(c->f, c->q[i]);
}
static void run_batch(query_ctx *c) { sm_mphf_lookup_batch(c->f, c->q, c->out, c->n); }
static void run_table(query_ctx *c) {
    size_t i;
    for (i = 0; i < c->n; i++) c->out[i] = oa_find(c->t, c->q[i]);
}

static double best_ns_per_key(void (*fn)(query_ctx *), query_ctx *c, int reps) {
    double best = 1e30;
    int r;
    for (r = 0; r < reps; r++) {
        double t0 = sm_now();
        fn(c);
        t0 = sm_now() - t0;
        if (t0 < best) best = t0;
    }
    return best * 1e9 / (double)c->n;
}

/* Every slot of [0, n) hit exactly once (a timing of a wrong answer is void). */
static int is_bijection(const uint32_t *out, size_t n) {
    unsigned char *hit = (unsigned char *)xmalloc(n);
    size_t i;
    int ok = 1;
    memset(hit, 0, n);
    for (i = 0; i < n && ok; i++) {
        ok = out[i] < n && !hit[out[i]];
        if (ok) hit[out[i]] = 1;
    }
    free(hit);
    return ok;
}

static int bench(size_t n, double lambda) {
    uint64_t *keys = (uint64_t *)xmalloc(n * 8), *q = (uint64_t *)xmalloc(n * 8);
    uint32_t *out = (uint32_t *)xmalloc(n * 4);
    sm_mphf_config cfg = sm_mphf_default_config();
    sm_mphf f;
    sm_fingerprints fp;
    sm_error err;
    oa_table t;
    query_ctx c;
    sm_rng rng;
    double build = 1e30, oa_time, t_single, t_batch, t_table, mphf_bits, oa_bits;
    size_t i;
    int r, reps = n <= 2000000 ? 3 : 1;
    cfg.lambda = lambda;
    sm_rng_seed(&rng, 2024 + n);
    for (i = 0; i < n; i++) keys[i] = q[i] = sm_rng_u64(&rng); /* distinct w.h.p.; build checks */
    for (i = n - 1; i > 0; i--) { /* queries: all keys, random order */
        uint32_t j = sm_rng_below(&rng, (uint32_t)(i + 1));
        uint64_t tmp = q[i];
        q[i] = q[j];
        q[j] = tmp;
    }
    for (r = 0; r < reps; r++) {
        double t0 = sm_now();
        if (sm_mphf_build(&f, keys, n, &cfg, &err) != SM_OK) {
            fprintf(stderr, "bench_mphf: %s\n", err.msg);
            return 1;
        }
        t0 = sm_now() - t0;
        if (t0 < build) build = t0;
        if (r + 1 < reps) sm_mphf_free(&f);
    }
    if (sm_fingerprints_build(&fp, &f, keys, n, 8, &err) != SM_OK) {
        fprintf(stderr, "bench_mphf: %s\n", err.msg);
        return 1;
    }
    oa_time = sm_now();
    oa_build(&t, keys, n);
    oa_time = sm_now() - oa_time;
    c.f = &f;
    c.t = &t;
    c.q = q;
    c.out = out;
    c.n = n;
    t_single = best_ns_per_key(run_single, &c, 3);
    t_batch = best_ns_per_key(run_batch, &c, 3);
    if (!is_bijection(out, n)) {
        fprintf(stderr, "bench_mphf: lookups are not a bijection\n");
        return 1;
    }
    t_table = best_ns_per_key(run_table, &c, 3);
    if (!is_bijection(out, n)) {
        fprintf(stderr, "bench_mphf: the table lost keys\n");
        return 1;
    }
    mphf_bits = (double)sm_mphf_space_bits(&f) / (double)n;
    oa_bits = (double)(t.mask + 1) * sizeof(oa_slot) * 8 / (double)n;
    printf("n = %zu random 64-bit keys (lambda %.1f, alpha %.2f, 1 thread)\n", n, cfg.lambda,
           cfg.alpha);
    printf("  mphf build       %8.1f ns/key  (%.2f M keys/s; %llu of %llu pilots overflow a byte)\n",
           build * 1e9 / (double)n, (double)n / build * 1e-6, (unsigned long long)f.num_overflow,
           (unsigned long long)f.num_buckets);
    printf("  mphf space       %8.3f bits/key (pilots + overflow + remap); fingerprints +%d bits/key\n",
           mphf_bits, fp.bits);
    printf("  mphf query       %8.2f ns/key single, %.2f ns/key batched\n", t_single, t_batch);
    printf("  open addressing  %8.2f ns/key query, %.1f ns/key build, %.0f bits/key\n", t_table,
           oa_time * 1e9 / (double)n, oa_bits);
    printf("  ratios           query time batched/table %.2f, single/table %.2f; memory table/mphf "
           "%.0fx, table/(mphf + 8-bit fingerprints) %.1fx\n",
           t_batch / t_table, t_single / t_table, oa_bits / mphf_bits,
           oa_bits / (mphf_bits + fp.bits));
    sm_fingerprints_free(&fp);
    sm_mphf_free(&f);
    free(t.slots);
    free(keys);
    free(q);
    free(out);
    return 0;
}

int main(int argc, char **argv) {
    static const size_t defaults[] = {1000000, 10000000};
    double lambda = sm_mphf_default_config().lambda;
    int i, first = 1;
    if (argc > 2 && !strcmp(argv[1], "--lambda")) lambda = atof(argv[2]), first = 3;
    if (argc > first) {
        for (i = first; i < argc; i++) {
            long long n = atoll(argv[i]);
            if (n < 1 || n > 0xffffffffLL) {
                fprintf(stderr, "usage: %s [--lambda L] [n ...]  (1 <= n < 2^32)\n", argv[0]);
                return 2;
            }
            if (bench((size_t)n, lambda)) return 1;
        }
        return 0;
    }
    for (i = 0; i < 2; i++)
        if (bench(defaults[i], lambda)) return 1;
    return 0;
}
