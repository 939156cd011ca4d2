/* bench_modules.c - training-step cost of each module, as ratios measured
 * in one run (rounds interleaved, median per configuration).
 *
 *   ./bench/bench_modules [peer|engram|mhc|nine|all] [rounds] [peer.csv]
 *
 * With a third argument the PEER sweep is also written as CSV (experts,
 * ms per step, ratio to 16K) for `trainer plot`.
 *
 * Shape: the `tiny` trainer preset (4 layers, d=128, 4 heads, B=8, T=128,
 * vocabulary 8192), random tokens, one full step = forward + backward +
 * AdamW (sparse rows for the Engram table and the PEER experts).
 *   peer    PEER replacing the MLP of layer 2, N = 128^2 ... 1024^2 experts:
 *           step time relative to N = 16K (target: 1M <= 1.15x), and PEER-16K
 *           relative to the baseline; then where the 1M step's extra time
 *           goes: per profiled op, and one PEER layer alone, per phase,
 *           each phase beside its memory traffic alone (the touched rows
 *           read and written in row order, no arithmetic): how much of the
 *           growth is the rows' memory traffic on this machine, as the
 *           gradients are kept and as a compact buffer of the touched rows
 *           would keep them.
 * Each target ratio also prints its range over the rounds (each round
 * times every configuration once): how far the machine's load moved it.
 *   engram  Engram at layer 1, 100K vs 4M rows per hash head (8 heads):
 *           the sparse update makes the step cost independent of table size.
 *   mhc     n = 4 streams (dynamic maps, 20 Sinkhorn iterations) vs baseline,
 *           with the time spent inside the mHC maps and mixing, and the ops
 *           whose time grew.
 *   nine    Engram-Nine (top-50K 2- and 3-grams in the hot tier) vs the
 *           hash-only Engram with exactly as many table rows; tokens drawn
 *           from a Zipf distribution (s = 1.1) so n-grams repeat as in text.
 *           (The Engram-Nine paper measured Nine 11-12% slower; target 3%.) */
#define SPARSEMEM_IMPLEMENTATION
#define SM_PROFILE /* peer's breakdown; the timed rounds attach no profile */
#include "sparsemem.h"
#include "bench_common.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *name;
    sm_model_config cfg;
    sm_model model;
    double times[64];
    int n;
} bench_cfg;

static sm_model_config base_config(void) {
    sm_model_config c = sm_model_default_config();
    c.vocab_size = 8192, c.seq_len = 128, c.n_layer = 4, c.n_head = 4, c.d_model = 128, c.d_ff = 512;
    return c;
}

static int B = 8;
static int *inputs, *targets;
static const char *peer_csv; /* optional CSV of the PEER sweep */

static double step_seconds(sm_model *m) { return train_step(m, inputs, targets, B); }

/* The median of c's times (left in round order). */
static double median(const bench_cfg *c) {
    double t[64];
    memcpy(t, c->times, sizeof(double) * (size_t)c->n);
    return median_of(t, c->n);
}

/* The ratio a / b of each round (both timed in it) as "per round LO-HI":
 * how far the machine's load moved it during the run. */
static const char *round_ratios(const bench_cfg *a, const bench_cfg *b) {
    static char buf[48];
    double lo = 1e30, hi = 0.0, q;
    int r;
    for (r = 0; r < a->n && r < b->n; r++) {
        q = a->times[r] / b->times[r];
        lo = q < lo ? q : lo, hi = q > hi ? q : hi;
    }
    snprintf(buf, sizeof buf, "per round %.3f-%.3f", lo, hi);
    return buf;
}

/* Build every configuration, warm each up (first touches of the big
 * buffers page-fault), then time `rounds` interleaved rounds. */
static void run(bench_cfg *cfgs, int n, int rounds) {
    sm_error err;
    int i, r;
    for (i = 0; i < n; i++) {
        if (sm_model_init(&cfgs[i].model, &cfgs[i].cfg, B, 1, &err) != SM_OK) {
            fprintf(stderr, "bench: %s: %s\n", cfgs[i].name, err.msg);
            exit(1);
        }
        step_seconds(&cfgs[i].model);
        step_seconds(&cfgs[i].model);
        cfgs[i].n = 0;
    }
    for (r = 0; r < rounds; r++)
        for (i = 0; i < n; i++) cfgs[i].times[cfgs[i].n++] = step_seconds(&cfgs[i].model);
}

static void release(bench_cfg *cfgs, int n) {
    int i;
    for (i = 0; i < n; i++) sm_model_free(&cfgs[i].model);
}

/* Per-op time of `rounds` more steps of a and of b, interleaved as the
 * timed rounds are (profiled; the rounds that give the ratios are not):
 * the ops whose time differs by more than 0.5 ms per step, where b's extra
 * time goes. */
static void print_op_growth(bench_cfg *a, bench_cfg *b, int rounds) {
    sm_profile prof[2];
    bench_cfg *c[2] = {a, b};
    int i, r, op;
    memset(prof, 0, sizeof prof);
    for (i = 0; i < 2; i++) c[i]->model.params.profile = &prof[i];
    for (r = 0; r < rounds; r++)
        for (i = 0; i < 2; i++) step_seconds(&c[i]->model);
    for (i = 0; i < 2; i++) c[i]->model.params.profile = NULL;
    printf("  per op (ms/step, profiled steps), %s -> %s:\n", a->name, b->name);
    for (op = 0; op < SM_PROF_COUNT; op++) {
        double t0 = 1e3 * prof[0].seconds[op] / rounds, t1 = 1e3 * prof[1].seconds[op] / rounds;
        if (fabs(t1 - t0) > 0.5)
            printf("    %-16s %7.2f -> %7.2f\n", sm_profile_op_name((sm_profile_op)op), t0, t1);
    }
}

#define EXPERT_ROW 256   /* floats of an expert's row: u and v, d = 128 */

/* One PEER layer alone (the model's: d = 128, B*T = 1024 positions) with
 * its parameter table, for the phase timings below. */
typedef struct {
    sm_peer_config cfg;
    sm_peer_sizes sz;
    sm_params p;
    sm_row_set rows;
    sm_peer_params pp, pg;
    sm_peer_acts acts;
    uint32_t *rows_copy; /* the last step's touched experts, increasing */
    long n_rows;
    float *compact;            /* a gradient row per touched expert, in rows_copy's order */
    double best[5];            /* per phase: route, experts fwd, backward, norm, AdamW */
    double traffic_best[2][4]; /* the last four's row traffic alone (rows_traffic_seconds),
                                  [1] with compact gradients */
} peer_layer;

static void peer_layer_reset_best(peer_layer *l) {
    int i;
    for (i = 0; i < 5; i++) l->best[i] = 1e30;
    for (i = 0; i < 8; i++) l->traffic_best[i / 4][i % 4] = 1e30;
}

static void peer_layer_init(peer_layer *l, int n_sub, int N, sm_rng *rng) {
    sm_error err;
    size_t off = 0;
    int g;
    memset(l, 0, sizeof *l);
    l->cfg = sm_peer_default_config();
    l->cfg.n_sub = n_sub;
    g = sm_params_add_group(&l->p, sm_param_group_default("peer", 1e-3f), &err);
    if (sm_peer_param_sizes(&l->cfg, 128, &l->sz, &err) != SM_OK ||
        sm_row_set_init(&l->rows, l->sz.n_experts, &err) != SM_OK ||
        sm_peer_register(&l->p, "peer", &l->cfg, 128, g, g, &l->rows, &off, &err) != SM_OK ||
        sm_params_alloc(&l->p, &err) != SM_OK || sm_peer_acts_init(&l->acts, &l->cfg, 128, N, &err) != SM_OK) {
        fprintf(stderr, "bench: PEER layer: %s\n", err.msg);
        exit(1);
    }
    sm_peer_bind(&l->pp, l->p.data + off, &l->sz);
    sm_peer_bind(&l->pg, l->p.grad + off, &l->sz);
    sm_peer_init(&l->pp, &l->sz, &l->cfg, rng);
    l->rows_copy = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)N * l->cfg.heads * l->cfg.topk);
    l->compact = (float *)calloc((size_t)N * l->cfg.heads * l->cfg.topk * EXPERT_ROW, sizeof(float));
    if (!l->rows_copy || !l->compact) exit(1);
    peer_layer_reset_best(l);
}

static void peer_layer_free(peer_layer *l) {
    sm_peer_acts_free(&l->acts);
    sm_params_free(&l->p);
    sm_row_set_free(&l->rows);
    free(l->rows_copy), free(l->compact);
}

/* Writes 64 MB, as the rest of a training step does between the PEER
 * layer's forward, its backward and the optimizer: twice the 32 MB L3 of
 * the AMD EPYC measured here. Where the L3 is far larger (a Xeon host here
 * reports 480 MB) neither this nor the step flushes it, and the 16K
 * tables (64 MB with gradients and moments) stay in it. */
static void evict_caches(void) {
    static float *junk;
    size_t n = (size_t)16 << 20, i;
    if (!junk && !(junk = (float *)calloc(n, sizeof(float)))) exit(1);
    for (i = 0; i < n; i += 16) junk[i] += 1.0f;
}

/* The memory traffic alone of the four phases that touch expert rows
 * (phase 0 the experts' forward, 1 the backward, 2 the gradient norm, 3
 * AdamW), with additions and multiplications by 1 in place of their
 * arithmetic: the forward reads a row's weights; the backward reads them
 * again and adds to its gradient; the norm reads the gradient; AdamW reads
 * and writes weights, moments and gradient (zeroed). Values do not change:
 * it runs after the step, when the gradients are zero. With compact
 * gradients (g_row: the row's place in a buffer of the touched rows, not
 * in the table) the backward writes that buffer, the norm reads it, and
 * AdamW reads it and zeroes nothing in the table: the design that would
 * spare the table's gradient its random reads and writes. */
static volatile float one = 1.0f;
static volatile float sink;
#define TRAFFIC_LANES 64 /* independent sums: the reads, not an add chain, set the pace */
#define TRAFFIC_AHEAD 4  /* rows prefetched ahead, as the sparse AdamW does */
static float row_traffic(float *w, float *g, float *m, float *v, size_t o, size_t g_row, int phase, int compact,
                         float c) {
    float acc[TRAFFIC_LANES] = {0}, sum = 0.0f, *gr = g + g_row;
    size_t i, j;
    for (i = 0; i < EXPERT_ROW; i += TRAFFIC_LANES)
        switch (phase) {
        case 0:
            for (j = 0; j < TRAFFIC_LANES; j++) acc[j] += w[o + i + j];
            break;
        case 1: /* compact: the buffer written, not read */
            for (j = 0; j < TRAFFIC_LANES; j++) acc[j] += w[o + i + j], gr[i + j] = compact ? c - 1.0f : gr[i + j] * c;
            break;
        case 2:
            for (j = 0; j < TRAFFIC_LANES; j++) acc[j] += gr[i + j];
            break;
        default:
            for (j = 0; j < TRAFFIC_LANES; j++) m[o + i + j] *= c, v[o + i + j] *= c, w[o + i + j] += gr[i + j];
            if (!compact)
                for (j = 0; j < TRAFFIC_LANES; j++) gr[i + j] = 0.0f;
        }
    for (j = 0; j < TRAFFIC_LANES; j++) sum += acc[j];
    return sum;
}

/* Seconds of one phase's traffic over the last step's touched rows, in
 * increasing order, on all threads: what the phase would cost if its
 * arithmetic were free and its rows came in that order. */
static double rows_traffic_seconds(peer_layer *l, int phase, int compact) {
    const size_t W = EXPERT_ROW, off = (size_t)(l->pp.experts - l->p.data);
    float *w = l->p.data + off, *g = compact ? l->compact : l->p.grad + off, *m = l->p.m + off, *v = l->p.v + off;
    float c = one, total = 0.0f;
    double t0 = sm_now();
    long r;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) reduction(+ : total)
#endif
    for (r = 0; r < l->n_rows; r++) {
        size_t i, ahead;
        if (r + TRAFFIC_AHEAD < l->n_rows)
            for (ahead = (size_t)l->rows_copy[r + TRAFFIC_AHEAD] * W, i = 0; i < W; i += 16) {
                if (phase != 2) SM__PREFETCH(w + ahead + i);
                if (phase != 0 && !compact) SM__PREFETCH(g + ahead + i);
                if (phase == 3) SM__PREFETCH(m + ahead + i), SM__PREFETCH(v + ahead + i);
            }
        total += row_traffic(w, g, m, v, (size_t)l->rows_copy[r] * W, (compact ? (size_t)r : l->rows_copy[r]) * W,
                             phase, compact, c);
    }
    sink = total;
    return sm_now() - t0;
}

/* One step of the layer on fresh inputs, each phase timed (the best of the
 * rounds kept): routing, the experts' outputs, the backward, the gradient
 * norm, the sparse AdamW update. */
static void peer_layer_step(peer_layer *l, float *x, float *dx, float *out, const float *dout, int N,
                            sm_rng *rng) {
    double t[5], t0, norm;
    int i;
    sm_rng_fill_normal(rng, x, (size_t)N * 128, 1.0f);
    evict_caches();
    t0 = sm_now();
    sm_peer_route(&l->acts, x, &l->pp, N, NULL);
    t[0] = sm_now() - t0, t0 = sm_now();
    sm_peer_apply(out, &l->acts, x, l->pp.experts, N, NULL);
    t[1] = sm_now() - t0;
    evict_caches();
    memset(dx, 0, sizeof(float) * (size_t)N * 128);
    t0 = sm_now();
    sm_peer_backward(dx, &l->pg, &l->rows, dout, x, &l->pp, &l->acts, N, NULL);
    t[2] = sm_now() - t0;
    l->n_rows = (long)l->rows.count;
    memcpy(l->rows_copy, l->rows.rows, sizeof(uint32_t) * l->rows.count);
    evict_caches();
    t0 = sm_now();
    norm = sm_params_grad_norm(&l->p);
    t[3] = sm_now() - t0, t0 = sm_now();
    sm_params_adamw_step(&l->p, 1.0f, sm_clip_scale(norm, 1.0f));
    t[4] = sm_now() - t0;
    sm_params_zero_grad(&l->p);
    for (i = 0; i < 5; i++) l->best[i] = t[i] < l->best[i] ? t[i] : l->best[i];
    for (i = 0; i < 8; i++) {
        double *best = &l->traffic_best[i / 4][i % 4], secs;
        evict_caches();
        secs = rows_traffic_seconds(l, i % 4, i / 4);
        *best = secs < *best ? secs : *best;
    }
}

/* Where the 1M table's extra time goes, the rest of the step taken away:
 * one PEER layer at 16K and at 1M experts, the two interleaved, phases
 * timed with the caches evicted between them as the step evicts them. */
static void print_peer_phases(int rounds, double step_16k) {
    static const char *phase[5] = {"route", "experts fwd", "backward", "grad norm", "sparse AdamW"};
    peer_layer l[2];
    int N = B * 128, r, i, k;
    double grew = 0.0, traffic_grew[2] = {0.0, 0.0};
    float *x = (float *)malloc(sizeof(float) * (size_t)N * 128 * 4), *dx = x + (size_t)N * 128;
    float *out = dx + (size_t)N * 128, *dout = out + (size_t)N * 128;
    sm_rng rng;
    if (!x) exit(1);
    sm_rng_seed(&rng, 11);
    sm_rng_fill_normal(&rng, dout, (size_t)N * 128, 1.0f);
    peer_layer_init(&l[0], 128, N, &rng);
    peer_layer_init(&l[1], 1024, N, &rng);
    for (r = 0; r <= rounds; r++)
        for (k = 0; k < 2; k++) {
            if (r == 1) peer_layer_reset_best(&l[k]); /* the first round warms up */
            peer_layer_step(&l[k], x, dx, out, dout, N, &rng);
        }
    printf("  one PEER layer alone, caches evicted between phases (ms, best of %d), 16K -> 1M;\n"
           "  then each phase's reads and writes of the touched rows alone, in row order, as the\n"
           "  gradients are kept (in the table) and as they would be in a compact buffer:\n", rounds);
    for (i = 0; i < 5; i++) {
        printf("    %-16s %7.2f -> %7.2f", phase[i], 1e3 * l[0].best[i], 1e3 * l[1].best[i]);
        if (i == 0) {
            printf("\n");
            continue;
        }
        printf("   traffic alone %6.2f -> %6.2f, compact %6.2f -> %6.2f\n", 1e3 * l[0].traffic_best[0][i - 1],
               1e3 * l[1].traffic_best[0][i - 1], 1e3 * l[0].traffic_best[1][i - 1], 1e3 * l[1].traffic_best[1][i - 1]);
        grew += l[1].best[i] - l[0].best[i];
        for (k = 0; k < 2; k++) traffic_grew[k] += l[1].traffic_best[k][i - 1] - l[0].traffic_best[k][i - 1];
    }
    printf("  the four row phases grew %.2f ms; their traffic alone grew %.2f ms, %.3f of the\n"
           "  PEER-16K step (the target allows 0.15 for all of the 1M step's growth); with\n"
           "  compact gradients %.2f ms, %.3f\n",
           1e3 * grew, 1e3 * traffic_grew[0], traffic_grew[0] / step_16k, 1e3 * traffic_grew[1],
           traffic_grew[1] / step_16k);
    peer_layer_free(&l[0]);
    peer_layer_free(&l[1]);
    free(x);
}

static void bench_peer(int rounds) {
    bench_cfg c[5];
    int s[4] = {128, 256, 512, 1024}, i;
    double t0;
    memset(c, 0, sizeof c);
    c[0].name = "baseline (MLP)", c[0].cfg = base_config();
    for (i = 0; i < 4; i++) {
        static char names[4][32];
        c[i + 1].cfg = base_config();
        c[i + 1].cfg.use_peer = 1, c[i + 1].cfg.peer_n_layers = 1;
        c[i + 1].cfg.peer_layer_ids[0] = 2;
        c[i + 1].cfg.peer.n_sub = s[i];
        snprintf(names[i], sizeof names[i], "PEER N=%dK", s[i] * s[i] / 1024);
        c[i + 1].name = names[i];
    }
    run(c, 5, rounds);
    t0 = median(&c[1]);
    printf("PEER (h=4, k=8, d_key=64) replacing the MLP of layer 2; median of %d steps\n", rounds);
    for (i = 0; i < 5; i++)
        printf("  %-16s %8.1f ms/step  %.3fx PEER-16K\n", c[i].name, 1e3 * median(&c[i]), median(&c[i]) / t0);
    printf("  ratio PEER-1M / PEER-16K = %.3f (target <= 1.15; %s)\n", median(&c[4]) / t0, round_ratios(&c[4], &c[1]));
    if (peer_csv) {
        FILE *f = fopen(peer_csv, "w");
        if (!f) {
            fprintf(stderr, "bench: cannot write %s\n", peer_csv);
            exit(1);
        }
        fprintf(f, "experts,ms_per_step,ratio_to_16k,baseline_ms\n");
        for (i = 1; i < 5; i++)
            fprintf(f, "%d,%.3f,%.4f,%.3f\n", s[i - 1] * s[i - 1], 1e3 * median(&c[i]), median(&c[i]) / t0,
                    1e3 * median(&c[0]));
        fclose(f);
    }
    printf("  ratio PEER-16K / baseline = %.3f\n", t0 / median(&c[0]));
    print_op_growth(&c[1], &c[4], rounds);
    release(c, 5);
    print_peer_phases(rounds, t0);
}

static void bench_engram(int rounds) {
    bench_cfg c[3];
    int i;
    memset(c, 0, sizeof c);
    c[0].name = "baseline", c[0].cfg = base_config();
    for (i = 1; i < 3; i++) {
        c[i].cfg = base_config();
        c[i].cfg.use_engram = 1;
        c[i].cfg.engram.d_model = 128;
        c[i].cfg.engram.hash.layer_ids[0] = 1;
        c[i].cfg.engram.hash.table_rows = i == 1 ? 100000u : 4000000u;
        c[i].name = i == 1 ? "Engram 100K rows" : "Engram 4M rows";
    }
    run(c, 3, rounds);
    printf("Engram at layer 1 (orders 2,3 x 4 heads, d_head 16); median of %d steps\n", rounds);
    for (i = 0; i < 3; i++) printf("  %-16s %8.1f ms/step\n", c[i].name, 1e3 * median(&c[i]));
    printf("  ratio Engram-4M / Engram-100K = %.3f (target <= 1.10; %s)\n", median(&c[2]) / median(&c[1]),
           round_ratios(&c[2], &c[1]));
    printf("  ratio Engram-100K / baseline = %.3f\n", median(&c[1]) / median(&c[0]));
    release(c, 3);
}

/* Time of the mHC maps and mixing alone for one sublayer (best of
 * `rounds`), scaled to all sublayers: where the overhead goes. part[] gets
 * the four calls' own times: pre forward, post forward, post backward,
 * pre backward. */
static double mhc_layer_seconds(const sm_model_config *cfg, int rounds, double part[4]) {
    int N = B * cfg->seq_len, n = cfg->mhc.n_streams, C = cfg->d_model, K = sm_mhc_map_count(n);
    int r, i;
    sm_mhc_layout lay = sm_mhc_param_layout(&cfg->mhc);
    float *p = (float *)calloc(lay.total, 4), *g = (float *)calloc(lay.total, 4);
    float *x = (float *)calloc((size_t)N * n * C, 4), *xn = (float *)calloc((size_t)N * n * C, 4);
    float *dx = (float *)calloc((size_t)N * n * C, 4), *dxn = (float *)calloc((size_t)N * n * C, 4);
    float *u = (float *)calloc((size_t)N * C, 4), *y = (float *)calloc((size_t)N * C, 4);
    float *du = (float *)calloc((size_t)N * C, 4), *dy = (float *)calloc((size_t)N * C, 4);
    float *dmaps = (float *)calloc((size_t)N * K, 4);
    float *actm = (float *)calloc(sm_mhc_acts_size(&cfg->mhc, N), 4);
    sm_mhc_acts act = sm_mhc_acts_at(&cfg->mhc, N, actm);
    sm_mhc_params pp = sm_mhc_params_at(&cfg->mhc, p), pg = sm_mhc_params_at(&cfg->mhc, g);
    sm_rng rng;
    double best = 1e30;
    sm_rng_seed(&rng, 3);
    sm_mhc_init(p, &cfg->mhc, &rng, NULL);
    sm_rng_fill_normal(&rng, x, (size_t)N * n * C, 1.0f);
    sm_rng_fill_normal(&rng, y, (size_t)N * C, 1.0f);
    for (i = 0; i < 4; i++) part[i] = 1e30;
    for (r = 0; r < rounds; r++) {
        double t[5];
        t[0] = sm_now();
        sm_mhc_pre_forward(u, &act, x, &pp, &cfg->mhc, N);
        t[1] = sm_now();
        sm_mhc_post_forward(xn, x, y, &act, &cfg->mhc, N);
        t[2] = sm_now();
        memset(dmaps, 0, sizeof(float) * N * K);
        sm_mhc_post_backward(dx, dy, dmaps, dxn, x, y, &act, &cfg->mhc, N);
        t[3] = sm_now();
        sm_mhc_pre_backward(dx, &pg, dmaps, du, x, &act, &pp, &cfg->mhc, N);
        t[4] = sm_now();
        for (i = 0; i < 4; i++) part[i] = t[i + 1] - t[i] < part[i] ? t[i + 1] - t[i] : part[i];
        best = t[4] - t[0] < best ? t[4] - t[0] : best;
    }
    free(p), free(g), free(x), free(xn), free(dx), free(dxn), free(u), free(y), free(du), free(dy);
    free(dmaps), free(actm);
    return best;
}

static void bench_nine(int rounds) {
    bench_cfg c[2];
    sm_nine_iso iso;
    sm_error err;
    size_t n_stream = 400000, i;
    int *stream = (int *)malloc(sizeof(int) * n_stream), *saved_in = inputs;
    uint32_t *ids = (uint32_t *)malloc(sizeof(uint32_t) * n_stream);
    sm_rng r;
    memset(c, 0, sizeof c);
    sm_rng_seed(&r, 9);
    zipf_tokens(stream, n_stream, 8192, &r);
    for (i = 0; i < n_stream; i++) ids[i] = (uint32_t)stream[i];
    c[0].name = "Engram hash-only", c[0].cfg = base_config();
    c[0].cfg.use_engram = 1;
    c[0].cfg.engram.d_model = 128;
    c[0].cfg.engram.hash.layer_ids[0] = 1;
    c[0].cfg.engram.hash.table_rows = 500000u;
    c[1].name = "Engram-Nine", c[1].cfg = c[0].cfg;
    c[1].cfg.nine.n_hot[0] = c[1].cfg.nine.n_hot[1] = 50000;
    if (sm_nine_iso_config(&iso, &c[0].cfg.engram.hash, &c[1].cfg.nine, &err) != SM_OK) {
        fprintf(stderr, "bench: %s\n", err.msg);
        exit(1);
    }
    c[1].cfg.use_nine = 1, c[1].cfg.engram.hash = iso.cold, c[1].cfg.nine = iso.nine;
    inputs = stream + n_stream - (size_t)B * 128; /* a batch from the same distribution */
    for (i = 0; i < 2; i++)
        if (sm_model_init(&c[i].model, &c[i].cfg, B, 1, &err) != SM_OK ||
            sm_model_build_hot_set(&c[i].model, ids, NULL, n_stream, &err) != SM_OK) {
            fprintf(stderr, "bench: %s: %s\n", c[i].name, err.msg);
            exit(1);
        }
    for (i = 0; i < 2; i++) step_seconds(&c[i].model), step_seconds(&c[i].model);
    for (i = 0; i < (size_t)rounds * 2; i++) c[i % 2].times[c[i % 2].n++] = step_seconds(&c[i % 2].model);
    printf("Engram-Nine vs hash-only Engram, %zu = %zu parameters; median of %d steps\n",
           c[0].model.params.total, c[1].model.params.total, rounds);
    for (i = 0; i < 2; i++) printf("  %-16s %8.1f ms/step\n", c[i].name, 1e3 * median(&c[i]));
    printf("  ratio Nine / Hash = %.3f (target <= 1.03; %s)\n", median(&c[1]) / median(&c[0]), round_ratios(&c[1], &c[0]));
    release(c, 2);
    inputs = saved_in;
    free(stream), free(ids);
}

static void bench_mhc(int rounds) {
    bench_cfg c[2];
    double per_sub, part[4];
    memset(c, 0, sizeof c);
    c[0].name = "baseline", c[0].cfg = base_config();
    c[1].name = "mHC n=4", c[1].cfg = base_config();
    c[1].cfg.use_mhc = 1;
    c[1].cfg.mhc.channels = 128;
    run(c, 2, rounds);
    per_sub = mhc_layer_seconds(&c[1].cfg, rounds, part);
    printf("mHC, 4 streams, dynamic maps, 20 Sinkhorn iterations; median of %d steps\n", rounds);
    printf("  %-16s %8.1f ms/step\n  %-16s %8.1f ms/step\n", c[0].name, 1e3 * median(&c[0]), c[1].name,
           1e3 * median(&c[1]));
    printf("  ratio mHC / baseline = %.3f (target <= 1.20; %s)\n", median(&c[1]) / median(&c[0]), round_ratios(&c[1], &c[0]));
    printf("  where it goes: of the %.1f ms extra, the maps (RMSNorm, phi projections, Sinkhorn)\n"
           "  and stream mixing fwd+bwd take %.2f ms per sublayer x %d sublayers = %.1f ms;\n"
           "  the rest is the 4x wider residual (expand, collapse, copies)\n",
           1e3 * (median(&c[1]) - median(&c[0])), 1e3 * per_sub, c[1].model.n_sub,
           1e3 * per_sub * c[1].model.n_sub);
    printf("  per sublayer (ms): pre forward %.3f (maps, H_pre x), post forward %.3f,\n"
           "  post backward %.3f, pre backward %.3f (maps, phi, RMSNorm)\n",
           1e3 * part[0], 1e3 * part[1], 1e3 * part[2], 1e3 * part[3]);
    print_op_growth(&c[0], &c[1], rounds);
    release(c, 2);
}

int main(int argc, char **argv) {
    const char *which = argc > 1 ? argv[1] : "all";
    int rounds = argc > 2 ? atoi(argv[2]) : 7, i;
    peer_csv = argc > 3 ? argv[3] : NULL;
    sm_rng r;
    if (rounds < 1 || rounds > 64) rounds = 7;
    inputs = (int *)malloc(sizeof(int) * B * 128);
    targets = (int *)malloc(sizeof(int) * B * 128);
    sm_rng_seed(&r, 5);
    for (i = 0; i < B * 128; i++) inputs[i] = (int)sm_rng_below(&r, 8192), targets[i] = (int)sm_rng_below(&r, 8192);
    printf("threads: %d\n", sm_num_threads());
    if (!strcmp(which, "peer") || !strcmp(which, "all")) bench_peer(rounds);
    if (!strcmp(which, "engram") || !strcmp(which, "all")) bench_engram(rounds);
    if (!strcmp(which, "mhc") || !strcmp(which, "all")) bench_mhc(rounds);
    if (!strcmp(which, "nine") || !strcmp(which, "all")) bench_nine(rounds);
    free(inputs), free(targets);
    return 0;
}
