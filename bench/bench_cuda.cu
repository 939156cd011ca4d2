/* bench_cuda.cu - whole training steps on the GPU (sparsemem_cuda.cuh).
 *
 *   ./bench/bench_cuda [all|base|engram|nine|peer|mhc] [rounds] [B]
 *
 * The backbone is the Engram-Nine paper's shape: 12 layers, d_model 768,
 * 12 heads, T = 1024, vocabulary 50304; B sequences per step (default 8).
 * Each configuration is timed as the median of `rounds` steps (zero grad,
 * forward, backward, grad norm, AdamW), measured in this one run:
 *   base    tokens/s and MFU (model FLOPs per token 6 N_matmul + 12 L T C,
 *           against the device's dense TF32 peak; --peak TFLOPS overrides)
 *   engram  Engram at layers 1 and 5 sharing one table (orders 2,3, 8 heads
 *           of 250K rows x 32 dims: 128M table parameters) vs the baseline
 *   nine    Engram-Nine vs hash-only Engram at equal parameters
 *   peer    PEER replacing layer 6's MLP, N = 128^2 ... 1024^2 experts
 *   mhc     mHC with 4 streams vs the baseline */
#define SPARSEMEM_IMPLEMENTATION
#include "sparsemem.h"
#define SPARSEMEM_CUDA_IMPLEMENTATION
#include "sparsemem_cuda.cuh"
#include "bench_common.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

static smc_ctx GPU;
static int B = 8, ROUNDS = 10;
static int *inputs, *targets;
static double peak_tflops; /* 0: unknown, no MFU */

static sm_model_config base_config(void) {
    sm_model_config c = sm_model_default_config();
    c.vocab_size = 50304, c.seq_len = 1024, c.n_layer = 12, c.n_head = 12, c.d_model = 768;
    c.d_ff = 4 * 768;
    return c;
}

static void die(const char *what, const sm_error *err) {
    fprintf(stderr, "bench_cuda: %s: %s\n", what, err->msg);
    exit(1);
}

typedef struct {
    const char *name;
    sm_model_config cfg;
    sm_model host;
    smc_model gpu;
    double times[64];
    int n;
} bench_cfg;

static double step_seconds(smc_model *g) {
    sm_error err;
    double t = sm_now(), norm;
    smc_params_zero_grad(&GPU, &g->params);
    if (smc_model_forward(g, inputs, targets, NULL, B, g->host->cfg.seq_len, &err) != SM_OK)
        die("forward", &err);
    smc_model_backward(g);
    norm = smc_params_grad_norm(&GPU, &g->params);
    smc_params_adamw_step(&GPU, &g->params, 1.0f, sm_clip_scale(norm, 1.0f));
    if (smc_sync(&GPU, "step", &err) != SM_OK) die("step", &err);
    return sm_now() - t;
}

static double median(bench_cfg *c) { return median_of(c->times, c->n); }

/* Builds one configuration on the host (with a hot set when hot_stream is
 * given) and mirrors it on the GPU. */
static void setup(bench_cfg *c, const uint32_t *hot_stream, size_t n_stream) {
    sm_error err;
    if (sm_model_init(&c->host, &c->cfg, B, 1, &err) != SM_OK) die(c->name, &err);
    if (hot_stream && sm_model_build_hot_set(&c->host, hot_stream, NULL, n_stream, &err) != SM_OK)
        die(c->name, &err);
    if (smc_model_init(&c->gpu, &GPU, &c->host, &err) != SM_OK) die(c->name, &err);
}

static void release(bench_cfg *c) {
    smc_model_free(&c->gpu);
    sm_model_free(&c->host);
}

/* One configuration at a time (GPU memory), each warmed up twice. */
static void run(bench_cfg *cfgs, int n, const uint32_t *hot_stream, size_t n_stream) {
    int i, r;
    for (i = 0; i < n; i++) {
        setup(&cfgs[i], hot_stream, n_stream);
        step_seconds(&cfgs[i].gpu), step_seconds(&cfgs[i].gpu);
        for (r = 0; r < ROUNDS && r < 64; r++) cfgs[i].times[cfgs[i].n++] = step_seconds(&cfgs[i].gpu);
        release(&cfgs[i]);
    }
}

/* Model FLOPs per token of a training step (forward + backward = 3x the
 * forward's 2 N_matmul + 4 L T C attention FLOPs). */
static double flops_per_token(const sm_model_config *c) {
    double C = c->d_model, L = c->n_layer, F = c->d_ff;
    double matmul = L * (4.0 * C * C + 2.0 * C * F) + (double)c->vocab_size * C;
    return 6.0 * matmul + 12.0 * L * c->seq_len * C;
}

static void report(bench_cfg *c, double base_s) {
    double s = median(c), tokens = (double)B * c->cfg.seq_len;
    printf("  %-22s %8.1f ms/step %10.0f tokens/s", c->name, 1e3 * s, tokens / s);
    if (base_s > 0) printf("  %.3fx", s / base_s);
    printf("\n");
}

static void bench_base(void) {
    bench_cfg c;
    double s, mfu_flops;
    memset(&c, 0, sizeof c);
    c.name = "baseline", c.cfg = base_config();
    run(&c, 1, NULL, 0);
    s = median(&c);
    mfu_flops = flops_per_token(&c.cfg) * B * c.cfg.seq_len / s;
    printf("baseline 12x768, T=1024, B=%d: %.1f ms/step, %.0f tokens/s, %.1f TFLOP/s\n", B,
           1e3 * s, B * c.cfg.seq_len / s, mfu_flops / 1e12);
    if (peak_tflops > 0)
        printf("  MFU %.1f%% of %.0f TFLOP/s dense TF32 (target >= 35%%)\n",
               100.0 * mfu_flops / (peak_tflops * 1e12), peak_tflops);
}

static sm_model_config engram_config(void) {
    sm_model_config c = base_config();
    c.use_engram = 1;
    c.engram.d_model = 768;
    c.engram.hash.n_layers = 2;
    c.engram.hash.layer_ids[0] = 1, c.engram.hash.layer_ids[1] = 5;
    c.engram.hash.n_heads = 8;
    c.engram.d_head = 32;
    c.engram.hash.table_rows = 250000u; /* 2 orders x 8 heads x 250K x 32 = 128M */
    c.engram.hash.share_tables = 1;
    return c;
}

static void bench_engram(void) {
    bench_cfg c[2];
    memset(c, 0, sizeof c);
    c[0].name = "baseline", c[0].cfg = base_config();
    c[1].name = "Engram (layers 1, 5)", c[1].cfg = engram_config();
    run(c, 2, NULL, 0);
    printf("Engram, %d sequences of %d:\n", B, c[0].cfg.seq_len);
    report(&c[0], 0), report(&c[1], median(&c[0]));
}

static void bench_nine(void) {
    bench_cfg c[2];
    sm_nine_iso iso;
    sm_error err;
    size_t n_stream = 2000000, i;
    int *stream = (int *)malloc(sizeof(int) * n_stream);
    uint32_t *ids = (uint32_t *)malloc(sizeof(uint32_t) * n_stream);
    sm_rng r;
    memset(c, 0, sizeof c);
    sm_rng_seed(&r, 9);
    zipf_tokens(stream, n_stream, 50304, &r);
    for (i = 0; i < n_stream; i++) ids[i] = (uint32_t)stream[i];
    c[0].name = "Engram hash-only", c[0].cfg = engram_config();
    c[1].name = "Engram-Nine", c[1].cfg = c[0].cfg;
    c[1].cfg.nine.n_hot[0] = c[1].cfg.nine.n_hot[1] = 100000;
    if (sm_nine_iso_config(&iso, &c[0].cfg.engram.hash, &c[1].cfg.nine, &err) != SM_OK)
        die("iso config", &err);
    c[1].cfg.use_nine = 1, c[1].cfg.engram.hash = iso.cold, c[1].cfg.nine = iso.nine;
    memcpy(inputs, stream + n_stream - (size_t)B * 1024, sizeof(int) * B * 1024);
    run(c, 2, ids, n_stream);
    printf("Engram-Nine vs hash-only at equal parameters:\n");
    report(&c[0], 0), report(&c[1], median(&c[0]));
    printf("  ratio Nine / Hash = %.3f (target <= 1.03)\n", median(&c[1]) / median(&c[0]));
    free(stream), free(ids);
}

static void bench_peer(void) {
    bench_cfg c[4];
    static char names[4][32];
    int s[4] = {128, 256, 512, 1024}, i;
    memset(c, 0, sizeof c);
    for (i = 0; i < 4; i++) {
        c[i].cfg = base_config();
        c[i].cfg.use_peer = 1, c[i].cfg.peer_n_layers = 1;
        c[i].cfg.peer_layer_ids[0] = 6;
        c[i].cfg.peer.n_sub = s[i];
        snprintf(names[i], sizeof names[i], "PEER N=%dK", s[i] * s[i] / 1024);
        c[i].name = names[i];
    }
    run(c, 4, NULL, 0);
    printf("PEER (h=4, k=8) replacing layer 6's MLP:\n");
    for (i = 0; i < 4; i++) report(&c[i], median(&c[0]));
    printf("  ratio PEER-1M / PEER-16K = %.3f (target <= 1.15)\n", median(&c[3]) / median(&c[0]));
}

static void bench_mhc(void) {
    bench_cfg c[2];
    memset(c, 0, sizeof c);
    c[0].name = "baseline", c[0].cfg = base_config();
    c[1].name = "mHC n=4", c[1].cfg = base_config();
    c[1].cfg.use_mhc = 1;
    c[1].cfg.mhc.channels = 768;
    run(c, 2, NULL, 0);
    printf("mHC, 4 streams:\n");
    report(&c[0], 0), report(&c[1], median(&c[0]));
}

/* Dense TF32 tensor-core peak of known devices, in TFLOP/s. */
static double known_peak(const smc_ctx *c) {
    if (strstr(c->name, "H100") || strstr(c->name, "H200"))
        return c->sm_count >= 132 ? 494.7 : 378.0; /* SXM : PCIe */
    if (strstr(c->name, "A100")) return 156.0;
    return 0.0;
}

int main(int argc, char **argv) {
    const char *which = argc > 1 ? argv[1] : "all";
    sm_error err;
    sm_rng r;
    int i;
    if (argc > 2) ROUNDS = atoi(argv[2]) > 0 ? atoi(argv[2]) : ROUNDS;
    if (argc > 3) B = atoi(argv[3]) > 0 ? atoi(argv[3]) : B;
    if (smc_device_count() == 0) {
        printf("bench_cuda: no CUDA device; nothing measured\n");
        return 0;
    }
    if (smc_init(&GPU, 0, &err) != SM_OK) die("device", &err);
    peak_tflops = getenv("SM_PEAK_TFLOPS") ? atof(getenv("SM_PEAK_TFLOPS")) : known_peak(&GPU);
    printf("device: %s (%d SMs), GEMMs in TF32\n", GPU.name, GPU.sm_count);
    inputs = (int *)malloc(sizeof(int) * B * 1024), targets = (int *)malloc(sizeof(int) * B * 1024);
    sm_rng_seed(&r, 1);
    zipf_tokens(inputs, (size_t)B * 1024, 50304, &r);
    for (i = 0; i < B * 1024; i++) targets[i] = inputs[(i + 1) % (B * 1024)];
    if (!strcmp(which, "base") || !strcmp(which, "all")) bench_base();
    if (!strcmp(which, "engram") || !strcmp(which, "all")) bench_engram();
    if (!strcmp(which, "nine") || !strcmp(which, "all")) bench_nine();
    if (!strcmp(which, "peer") || !strcmp(which, "all")) bench_peer();
    if (!strcmp(which, "mhc") || !strcmp(which, "all")) bench_mhc();
    smc_free(&GPU);
    free(inputs), free(targets);
    return 0;
}
