/* examples/peer_topk.c - product-key top-k versus brute force.
 *
 * PEER scores N = s^2 experts with a query q = (q1, q2) against product keys
 * (K1[a] ; K2[b]): score(a, b) = q1 . K1[a] + q2 . K2[b]. The product-key
 * search scores only the 2s sub-keys, takes the top-k of each half and the
 * top-k of the k x k sums. This program builds random sub-keys, runs both
 * searches for a batch of queries, checks that they agree exactly (same
 * experts in the same order) and prints both lists and both timings.
 *
 *   cc -O2 -std=c99 -I. examples/peer_topk.c -o peer_topk -lm
 *   ./peer_topk [s=512] [k=8] [d_key=64] [queries=64]                      */
#define SPARSEMEM_IMPLEMENTATION
#include "sparsemem.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Top-k of the scores of all N full keys (K1[a] ; K2[b]), materialised. */
static void brute_force_topk(const float *full_keys, const float *q, int N, int d_key, int k,
                             float *scores, int32_t *expert, float *best) {
    int i, idx[SM_TOPK_MAX];
    sm_sgemm(0, 1, 1, N, d_key, 1.0f, q, d_key, full_keys, d_key, 0.0f, scores, N);
    sm_topk(scores, N, k, idx, best);
    for (i = 0; i < k; i++) expert[i] = idx[i];
}

static void product_key_topk(const float *k1, const float *k2, const float *q, int s, int d_key,
                             int k, float *sub, int32_t *expert, float *best) {
    int half = d_key / 2;
    sm_sgemm(0, 1, 1, s, half, 1.0f, q, d_key, k1, half, 0.0f, sub, s);
    sm_sgemm(0, 1, 1, s, half, 1.0f, q + half, d_key, k2, half, 0.0f, sub + s, s);
    sm_peer_product_topk(sub, sub + s, s, k, expert, best);
}

int main(int argc, char **argv) {
    int s = argc > 1 ? atoi(argv[1]) : 512, k = argc > 2 ? atoi(argv[2]) : 8;
    int d_key = argc > 3 ? atoi(argv[3]) : 64, nq = argc > 4 ? atoi(argv[4]) : 64;
    int N, half, a, b, i, n_same = 0;
    sm_peer_config cfg = sm_peer_default_config();
    sm_error err;
    sm_rng rng;
    float *k1, *k2, *full, *queries, *scores, *sub, bv[SM_TOPK_MAX], pv[SM_TOPK_MAX];
    int32_t be[SM_TOPK_MAX], pe[SM_TOPK_MAX];
    double t_brute = 0, t_product = 0, t0;
    cfg.n_sub = s, cfg.topk = k, cfg.d_key = d_key, cfg.heads = 1;
    if (sm_peer_config_validate(&cfg, 1, &err) != SM_OK || nq < 1) {
        fprintf(stderr, "peer_topk: %s\n", nq < 1 ? "queries must be >= 1" : err.msg);
        return 1;
    }
    N = s * s;
    half = d_key / 2;
    k1 = (float *)malloc(sizeof(float) * (size_t)s * half);
    k2 = (float *)malloc(sizeof(float) * (size_t)s * half);
    full = (float *)malloc(sizeof(float) * (size_t)N * d_key);
    queries = (float *)malloc(sizeof(float) * (size_t)nq * d_key);
    scores = (float *)malloc(sizeof(float) * (size_t)N);
    sub = (float *)malloc(sizeof(float) * 2 * (size_t)s);
    if (!k1 || !k2 || !full || !queries || !scores || !sub) {
        fprintf(stderr, "peer_topk: out of memory for s = %d (%d keys)\n", s, N);
        return 1;
    }
    sm_rng_seed(&rng, 2024);
    sm_rng_fill_normal(&rng, k1, (size_t)s * half, 1.0f);
    sm_rng_fill_normal(&rng, k2, (size_t)s * half, 1.0f);
    sm_rng_fill_normal(&rng, queries, (size_t)nq * d_key, 1.0f);
    for (a = 0; a < s; a++) /* full key of expert a*s + b = (K1[a] ; K2[b]) */
        for (b = 0; b < s; b++) {
            float *row = full + ((size_t)a * s + b) * d_key;
            memcpy(row, k1 + (size_t)a * half, sizeof(float) * half);
            memcpy(row + half, k2 + (size_t)b * half, sizeof(float) * half);
        }
    printf("s = %d sub-keys per half, N = %d experts, k = %d, d_key = %d, %d queries\n", s, N,
           k, d_key, nq);
    for (i = 0; i < nq; i++) {
        const float *q = queries + (size_t)i * d_key;
        int r, same = 1;
        t0 = sm_now();
        brute_force_topk(full, q, N, d_key, k, scores, be, bv);
        t_brute += sm_now() - t0;
        t0 = sm_now();
        product_key_topk(k1, k2, q, s, d_key, k, sub, pe, pv);
        t_product += sm_now() - t0;
        /* scores are summed in a different order, so compare experts exactly
         * and scores to rounding */
        for (r = 0; r < k; r++)
            same &= pe[r] == be[r] && fabsf(pv[r] - bv[r]) <= 1e-4f * (1.0f + fabsf(bv[r]));
        n_same += same;
        if (i == 0) {
            printf("query 0:  rank  brute-force (expert, score)   product-key (expert, score)\n");
            for (r = 0; r < k; r++)
                printf("          %4d  %9d %10.5f             %9d %10.5f\n", r, (int)be[r], bv[r],
                       (int)pe[r], pv[r]);
        }
    }
    printf("identical top-k for %d of %d queries\n", n_same, nq);
    printf("brute force over %d keys: %.3f ms/query;  product keys (2 x %d sub-keys): %.4f ms/query"
           "  (%.0fx faster)\n",
           N, 1e3 * t_brute / nq, s, 1e3 * t_product / nq, t_brute / t_product);
    free(k1);
    free(k2);
    free(full);
    free(queries);
    free(scores);
    free(sub);
    return n_same == nq ? 0 : 1;
}
