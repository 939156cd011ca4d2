/* sparsemem_cuda.cuh - the CUDA backend of sparsemem.h: the same layers on
 * the GPU, each checked against the CPU reference.                 v0.1.0
 *
 * How to use it
 *   In exactly ONE .cu file (compiled by nvcc, linked with -lcublas), with
 *   sparsemem.h's implementation in the same file (the GPU code reuses its
 *   private sm__ helpers, each listed in sparsemem.h's >>shared section):
 *       #define SPARSEMEM_IMPLEMENTATION
 *       #include "sparsemem.h"
 *       #define SPARSEMEM_CUDA_IMPLEMENTATION
 *       #include "sparsemem_cuda.cuh"
 *   Everywhere else just #include "sparsemem_cuda.cuh" (C or C++: the
 *   declarations need no CUDA header).
 *
 * Conventions
 *   - Every smc_X mirrors the CPU sm_X: same argument order and shapes, with
 *     device pointers, plus the context first. Work is queued on the
 *     context's stream and returns at once; smc_sync waits and turns a CUDA
 *     error into an sm_status naming what failed.
 *   - Backward functions ACCUMULATE into gradients, as on the CPU.
 *   - Storage is fp32. GEMMs go through cuBLAS with TF32 tensor-core math
 *     and fp32 accumulation (ctx.tf32 = 1, the default) or in full fp32
 *     (ctx.tf32 = 0, what the tests use to compare against the CPU).
 *   - Sums that the CPU does in a fixed order are done with atomics on the
 *     GPU where a sort would cost more (embedding, Engram and PEER gradient
 *     scatters): those gradients agree with the CPU to rounding, not bits.
 *
 * Status: compiled and reviewed, not yet run on a GPU (tests_cuda.cu holds
 * the checks a GPU session runs first: `make test-cuda`).
 *
 * Table of contents: the module tags of sparsemem.h, so one search for a
 * tag (">>peer") lands on the CPU and the GPU code and the tests alike.
 * Declarations first, then the implementation in the same order.
 *   >>util      context: device, stream, cuBLAS, memory, errors;
 *               warp/block reductions
 *   >>gemm      smc_sgemm, smc_sgemm_batched (cuBLAS)
 *   >>params    touched-row sets; the device parameter table (with >>optim)
 *   >>mphf      MPHF lookups, fingerprints
 *   >>engram    n-gram hashing; the Engram layer: gather, gate, conv,
 *               table scatter
 *   >>nine      Engram-Nine routing
 *   >>peer      sub-key scores, warp top-k, experts, usage
 *   >>mhc       Sinkhorn, stream maps and mixing, diagnostics
 *   >>backbone  embedding, RMSNorm, linear, GELU/SiLU, attention
 *   >>loss      cross-entropy
 *   >>optim     device parameters, grad norm, AdamW (dense, sparse rows)
 *   >>model     sm_model on the GPU
 *   >>shared    this file calls sparsemem.h's shared internals (sm__
 *               functions listed in its >>shared section)
 *
 * License: MIT or public domain (Unlicense), at your choice; see
 * sparsemem.h.
 */
#ifndef SPARSEMEM_CUDA_CUH
#define SPARSEMEM_CUDA_CUH

#include "sparsemem.h"

/* The declarations need no CUDA header, so C code (the trainer) can call
 * the backend; the implementation is compiled by nvcc. */
#ifdef __cplusplus
extern "C" {
#endif

/* ===================================================================== */
/* >>util  Context                                                       */
/* ===================================================================== */

typedef struct smc_ctx {
    int device;
    struct CUstream_st *stream;   /* cudaStream_t */
    struct cublasContext *blas;   /* cublasHandle_t */
    int tf32;      /* 1: GEMMs in TF32 (default); 0: full fp32 */
    int sm_count;  /* streaming multiprocessors */
    char name[256];
} smc_ctx;

/* Number of usable CUDA devices; 0 (not an error) when there is no device
 * or no driver, so callers can skip GPU work cleanly. */
SMDEF int smc_device_count(void);
SMDEF sm_status smc_init(smc_ctx *c, int device, sm_error *err);
SMDEF void smc_free(smc_ctx *c);
/* Selects TF32 (1) or full fp32 (0) math for the context's GEMMs. */
SMDEF void smc_set_tf32(smc_ctx *c, int on);
/* Waits for the queued work; a CUDA error becomes SM_ERR_IO naming `what`. */
SMDEF sm_status smc_sync(smc_ctx *c, const char *what, sm_error *err);

/* Device memory (zeroed) and blocking host <-> device copies. These run on
 * the legacy default stream, which orders them after the work queued on a
 * context's stream (smc_init makes a blocking stream), so host code may
 * copy between steps without a sync. smc_zero is queued on the context's
 * stream. */
SMDEF void *smc_malloc(size_t bytes, const char *what, sm_error *err);
SMDEF void smc_dfree(void *p);
SMDEF sm_status smc_upload(void *dst, const void *src, size_t bytes, sm_error *err);
SMDEF sm_status smc_download(void *dst, const void *src, size_t bytes, sm_error *err);
SMDEF void smc_zero(smc_ctx *c, void *p, size_t bytes);

/* >>gemm */
/* Row-major C[M,N] = alpha op(A) op(B) + beta C, op(X) = X or X^T (trans_*
 * nonzero), lda/ldb/ldc the row strides of the stored matrices. */
SMDEF void smc_sgemm(smc_ctx *c, int trans_a, int trans_b, int M, int N, int K, float alpha,
                     const float *A, int lda, const float *B, int ldb, float beta, float *C,
                     int ldc);
/* The same over `batch` matrices at fixed strides (elements) apart. */
SMDEF void smc_sgemm_batched(smc_ctx *c, int trans_a, int trans_b, int M, int N, int K,
                             float alpha, const float *A, int lda, long long stride_a,
                             const float *B, int ldb, long long stride_b, float beta, float *C,
                             int ldc, long long stride_c, int batch);

/* >>params */
/* Touched rows of a sparse table on the device (the GPU sm_row_set): a mark
 * per row, the list of marked rows and its length, all in device memory, so
 * kernels add rows without a round trip. List order is arbitrary (atomic);
 * the optimizer's update is per row, so order does not matter. */
typedef struct smc_row_set {
    uint32_t *rows;  /* [nrows] the first *count entries are the set */
    uint32_t *mark;  /* [nrows] 1 when the row is in the set */
    uint32_t *count; /* one device scalar */
    size_t nrows;
} smc_row_set;

SMDEF sm_status smc_row_set_init(smc_row_set *s, size_t nrows, sm_error *err);
SMDEF void smc_row_set_free(smc_row_set *s);
/* Adds rows[0..n) (a device array), each row once however often listed. */
SMDEF void smc_row_set_add(smc_ctx *c, smc_row_set *s, const uint32_t *rows, size_t n);
SMDEF void smc_row_set_clear(smc_ctx *c, smc_row_set *s);
/* The set's size (waits for the stream). */
SMDEF size_t smc_row_set_count(smc_ctx *c, const smc_row_set *s);

/* ===================================================================== */
/* >>mphf  MPHF; >>engram n-gram hashing; >>nine routing                 */
/* ===================================================================== */
/* Device mirrors of the lookup structures built on the host (sparsemem.h
 * >>mphf, >>engram, >>nine): upload once after building (or loading),
 * then look up, hash and route whole batches on the device. A mirror is the CPU struct
 * itself with its arrays in device memory (its plain fields stay host
 * copies, so launches need no round trip), and the kernels call the CPU's
 * own SM_HD functions, so the results are the CPU's bit for bit. */

typedef sm_mphf smc_mphf;                 /* an sm_mphf with device arrays */
typedef sm_fingerprints smc_fingerprints; /* an sm_fingerprints with device data */
typedef sm_ngram_hash smc_ngram_hash;     /* an sm_ngram_hash with device tables */

/* Copies f to the device. An empty sm_mphf (never built) gives an empty
 * mirror, which must not be looked up. On failure d is left empty. */
SMDEF sm_status smc_mphf_upload(smc_mphf *d, const sm_mphf *f, sm_error *err);
SMDEF void smc_mphf_free(smc_mphf *d);
/* out[i] = sm_mphf_lookup(f, keys[i]) for the n device keys. */
SMDEF void smc_mphf_lookup_batch(smc_ctx *c, const smc_mphf *f, const uint64_t *keys,
                                 uint32_t *out, size_t n);

SMDEF sm_status smc_fingerprints_upload(smc_fingerprints *d, const sm_fingerprints *fp,
                                        sm_error *err);
SMDEF void smc_fingerprints_free(smc_fingerprints *d);
/* out[i] = sm_fingerprints_contains(fp, f, keys[i]) (0 or 1) for the n device keys. */
SMDEF void smc_fingerprints_contains_batch(smc_ctx *c, const smc_fingerprints *fp,
                                           const smc_mphf *f, const uint64_t *keys,
                                           unsigned char *out, size_t n);

/* >>engram n-gram hashing */
SMDEF sm_status smc_ngram_hash_upload(smc_ngram_hash *d, const sm_ngram_hash *h, sm_error *err);
SMDEF void smc_ngram_hash_free(smc_ngram_hash *d);
/* sm_ngram_hash_compute on device tokens[B*T] and doc_start[B*T] (may be
 * NULL): rows / flat [B*T, n_slots] (either may be NULL), bit-identical to
 * the CPU. Fails (nothing queued) on the CPU's invalid layer, B or T. */
SMDEF sm_status smc_ngram_hash_compute(smc_ctx *c, const smc_ngram_hash *h, int layer,
                                       uint32_t *rows, uint32_t *flat, const uint32_t *tokens,
                                       const unsigned char *doc_start, int B, int T,
                                       sm_error *err);

/* >>nine */
/* An sm_nine hot tier on the device: the host's layout fields, each hot
 * order's MPHF and fingerprints with device arrays. */
typedef sm_nine smc_nine;

SMDEF sm_status smc_nine_upload(smc_nine *d, const sm_nine *nine, sm_error *err);
SMDEF void smc_nine_free(smc_nine *d);
/* sm_nine_route on the device (device tokens, doc_start, flat, hot): the
 * same flat[B*T, n_slots] and hot[B*T, n_orders] as the CPU, either output
 * may be NULL. The hash/hot-tier consistency checks and the argument checks
 * of the CPU run first (nothing is queued when they fail). */
SMDEF sm_status smc_nine_route(smc_ctx *c, const smc_nine *nine, const smc_ngram_hash *h,
                               int layer, uint32_t *flat, unsigned char *hot,
                               const uint32_t *tokens, const unsigned char *doc_start, int B,
                               int T, sm_error *err);

/* ===================================================================== */
/* >>engram  Engram layer                                                */
/* ===================================================================== */
/* The Engram layer of sparsemem.h (>>engram) on the device, on the CPU's
 * own structs holding device pointers: sm_engram_params (parameters or
 * gradients, e.g. an sm_engram_params_view of a device buffer),
 * sm_engram_acts and sm_engram_scratch (allocated by the functions below,
 * with the CPU's sizes and layout). Configurations stay on the host.
 * Requirements as on the CPU: acts / scratch allocated for this config
 * with at least B*T positions. Differences from the CPU, to rounding only:
 * row sums in fp32 (the CPU sums some in double), and the table, gain,
 * bias and conv gradients summed with atomics in no fixed order.
 * One stream only: the per-stream form inside mHC (n_streams > 1) is not
 * implemented on the GPU, and the allocations below refuse it. */

SMDEF sm_status smc_engram_acts_alloc(sm_engram_acts *a, const sm_engram_config *c, int N,
                                      sm_error *err);
SMDEF void smc_engram_acts_free(sm_engram_acts *a);
SMDEF sm_status smc_engram_scratch_alloc(sm_engram_scratch *s, const sm_engram_config *c,
                                         int N, sm_error *err);
SMDEF void smc_engram_scratch_free(sm_engram_scratch *s);

/* out[B*T, d] from h[B*T, d] and flat[B*T, n_slots] (smc_ngram_hash_compute). */
SMDEF void smc_engram_forward(smc_ctx *c, float *out, sm_engram_acts *acts, const float *h,
                              const uint32_t *flat, const sm_engram_params *p,
                              const sm_engram_config *cfg, int B, int T);
/* The same with the hot flags hot[B*T, n_orders] (smc_nine_route; NULL =
 * all cold) read by the hot_key_proj / hot_gate variants. */
SMDEF void smc_engram_forward_routed(smc_ctx *c, float *out, sm_engram_acts *acts,
                                     const float *h, const uint32_t *flat,
                                     const unsigned char *hot, const sm_engram_params *p,
                                     const sm_engram_config *cfg, int B, int T);
/* Accumulates dh (may be NULL) and the gradients in g; the table gradient
 * only on the rows in flat, which are added to rows (may be NULL; sized for
 * the table's total_rows). The scratch is overwritten. */
SMDEF void smc_engram_backward(smc_ctx *c, float *dh, sm_engram_params *g,
                               smc_row_set *rows, const float *dout, const float *h,
                               const uint32_t *flat, const sm_engram_params *p,
                               const sm_engram_acts *acts, const sm_engram_scratch *scratch,
                               const sm_engram_config *cfg, int B, int T);
/* Backward of smc_engram_forward_routed (same hot flags), with the variant
 * gradients g->w_key_hot / g->gate_hot when they are on. */
SMDEF void smc_engram_backward_routed(smc_ctx *c, float *dh, sm_engram_params *g,
                                      smc_row_set *rows, const float *dout, const float *h,
                                      const uint32_t *flat, const unsigned char *hot,
                                      const sm_engram_params *p, const sm_engram_acts *acts,
                                      const sm_engram_scratch *scratch,
                                      const sm_engram_config *cfg, int B, int T);

/* ===================================================================== */
/* >>peer  Product-key retrieval over single-neuron experts              */
/* ===================================================================== */
/* sparsemem.h's >>peer on the GPU, with the CPU structs holding device
 * pointers: sm_peer_params views of device parameter and gradient buffers
 * (sm_peer_bind works on device pointers too), sm_peer_acts from
 * smc_peer_acts_init, sm_peer_usage from smc_peer_usage_init.
 *   forward   q_raw = x W_q^T (cuBLAS), a warp per (position, head) for the
 *             query norm; per head two GEMMs give the half-scores, then a
 *             warp per position finds both half top-k lists, the top-k of
 *             the k x k candidate sums and the softmax; a block per
 *             position gathers its experts. Ranking is the CPU's total
 *             order (score, then lower id), so equal scores give equal
 *             experts, in the same order.
 *   backward  a block per position for its slots (activation, softmax, dx
 *             through u_i, dq through the selected sub-keys); the norm and
 *             the query net as on the CPU (GEMMs); sub-key, gain and
 *             expert-row gradients are scatter-adds with atomicAdd (equal
 *             to the CPU to rounding, not bits), on retrieved rows only.
 * As on the CPU, the cost per step does not grow with n_experts except
 * for the O(s) sub-key scoring. */

/* Device sm_peer_acts for up to max_n positions: the CPU's buffers and
 * sizes (laid out by the CPU's code), in device memory. The sort buffers
 * are unused: the GPU backward scatters expert rows with atomics. */
SMDEF sm_status smc_peer_acts_init(sm_peer_acts *a, const sm_peer_config *cfg, int d_model,
                                   int max_n, sm_error *err);
SMDEF void smc_peer_acts_free(sm_peer_acts *a);

/* sm_peer_forward: out[N, d_model] = PEER(x) (overwritten). Fails, with
 * nothing queued, only when N is outside [1, acts->max_n]. */
SMDEF sm_status smc_peer_forward(smc_ctx *c, float *out, sm_peer_acts *acts, const float *x,
                                 const sm_peer_params *p, int N, sm_error *err);

/* sm_peer_backward: accumulates dx (may be NULL) and the gradients in g
 * (any pointer NULL to skip it); when g->experts is set, the retrieved
 * experts are added to `touched` (may be NULL). Keys and the query net get
 * gradient only through the k selected scores. */
SMDEF sm_status smc_peer_backward(smc_ctx *c, float *dx, sm_peer_params *g,
                                  smc_row_set *touched, const float *dout, const float *x,
                                  const sm_peer_params *p, sm_peer_acts *acts, int N,
                                  sm_error *err);

/* sm_topk on each of `rows` rows of scores[rows, n]: idx, val [rows, k]
 * receive the row's k best, best first, ties to the lower index
 * (1 <= k <= min(n, SM_TOPK_MAX)). */
SMDEF void smc_topk(smc_ctx *c, const float *scores, int n, int k, int *idx, float *val,
                    int rows);
/* sm_peer_product_topk on each of `rows` rows of s1, s2 [rows, n_sub]:
 * expert, score [rows, k]. */
SMDEF void smc_peer_product_topk(smc_ctx *c, const float *s1, const float *s2, int n_sub, int k,
                                 int32_t *expert, float *score, int rows);

/* Expert usage on the device: an sm_peer_usage whose counts live in device
 * memory (n_experts and total stay on the host). Expert ids outside
 * [0, n_experts) are not counted (the CPU asserts). For the statistics,
 * download into a host sm_peer_usage of the same n_experts and call
 * sm_peer_usage_compute. */
SMDEF sm_status smc_peer_usage_init(sm_peer_usage *u, size_t n_experts, sm_error *err);
/* Counts n device expert ids (e.g. acts->expert, N*h*k of them). */
SMDEF void smc_peer_usage_add(smc_ctx *c, sm_peer_usage *u, const int32_t *experts, size_t n);
SMDEF void smc_peer_usage_reset(smc_ctx *c, sm_peer_usage *u);
/* Waits for the stream, then copies u's counts and total into `host`. */
SMDEF sm_status smc_peer_usage_download(smc_ctx *c, sm_peer_usage *host,
                                        const sm_peer_usage *u, sm_error *err);
SMDEF void smc_peer_usage_free(sm_peer_usage *u);

/* ===================================================================== */
/* >>mhc  Manifold-constrained hyper-connections                         */
/* ===================================================================== */
/* The GPU side of sparsemem.h's >>mhc, with its shapes, layouts and call
 * order: streams x[N, n, C], per-token maps [H_pre | H_post | H_res] of K =
 * sm_mhc_map_count(n) floats, parameters and activations as the CPU's
 * sm_mhc_params / sm_mhc_acts views holding device pointers. sm_mhc_params_at,
 * sm_mhc_acts_size and sm_mhc_acts_at only do pointer arithmetic, so they carve
 * device blocks exactly as they carve host ones (a model can cut every
 * sublayer's activations out of one device arena; smc_mhc_acts_alloc is the
 * one-block shortcut).
 *
 * Sinkhorn runs one thread per matrix, the matrix and its scalings in shared
 * memory, through the very steps the CPU runs (sparsemem.h's SM_HD Sinkhorn
 * functions: scaling form on a kernel re-centred in log space, backward by
 * recomputation), so it agrees with the CPU to float rounding (expf, logf
 * and fused multiply-adds differ in the last bits).
 * n and iters must pass sm_sinkhorn_check, as on the CPU.
 *
 * Where the GPU sums in another order than the CPU: the channel reductions
 * (dH_pre, dH_post, dH_res) and the phi projections are cuBLAS GEMMs (TF32
 * when the context says so), and dbias / dgate add per-block sums over
 * tokens with atomics; those results match the CPU to rounding, not bits. */

/* out / dlogits for `count` n x n matrices stored back to back, as
 * sm_sinkhorn_forward_batched / sm_sinkhorn_backward_batched (dlogits +=). */
SMDEF void smc_sinkhorn_forward_batched(smc_ctx *c, float *out, const float *logits, int count,
                                        int n, int iters);
SMDEF void smc_sinkhorn_backward_batched(smc_ctx *c, float *dlogits, const float *dout,
                                         const float *logits, int count, int n, int iters);

/* Device activations of one mHC sublayer for N tokens: one zeroed block of
 * sm_mhc_acts_size(cfg, N) floats carved by sm_mhc_acts_at. Fails (and leaves
 * *act all NULL) on an invalid config, N < 1 or no device memory. */
SMDEF sm_status smc_mhc_acts_alloc(sm_mhc_acts *act, const sm_mhc_config *cfg, int N,
                                  sm_error *err);
SMDEF void smc_mhc_acts_free(sm_mhc_acts *act);

/* The four steps of one sublayer, as their CPU namesakes (same accumulation
 * rules, same scratch reuse: pre_backward leaves gradients in dmaps, act->z
 * and act->xn). */
SMDEF void smc_mhc_pre_forward(smc_ctx *c, float *u, sm_mhc_acts *act, const float *x,
                               const sm_mhc_params *p, const sm_mhc_config *cfg, int N);
SMDEF void smc_mhc_post_forward(smc_ctx *c, float *x_next, const float *x, const float *y,
                                const sm_mhc_acts *act, const sm_mhc_config *cfg, int N);
SMDEF void smc_mhc_post_backward(smc_ctx *c, float *dx, float *dy, float *dmaps,
                                 const float *dx_next, const float *x, const float *y,
                                 const sm_mhc_acts *act, const sm_mhc_config *cfg, int N);
SMDEF void smc_mhc_pre_backward(smc_ctx *c, float *dx, sm_mhc_params *dp, float *dmaps,
                                const float *du, const float *x, sm_mhc_acts *act,
                                const sm_mhc_params *p, const sm_mhc_config *cfg, int N);

SMDEF void smc_mhc_expand_forward(smc_ctx *c, float *x, const float *h, int N, int n, int C);
SMDEF void smc_mhc_expand_backward(smc_ctx *c, float *dh, const float *dx, int N, int n, int C);
SMDEF void smc_mhc_collapse_forward(smc_ctx *c, float *h, const float *x, int N, int n, int C);
SMDEF void smc_mhc_collapse_backward(smc_ctx *c, float *dx, const float *dh, int N, int n,
                                     int C);

/* Diagnostics: sm_mhc_res_sum_error and sm_mhc_amax_gain_tokens (acts: a
 * host array of `layers` views of device activations). Unlike the CPU they
 * return a status, since they allocate a little device memory and wait for
 * the stream; the statistics go to *stats. */
SMDEF sm_status smc_mhc_res_sum_error(smc_ctx *c, sm_rowcol_stats *stats, const sm_mhc_acts *act,
                                      const sm_mhc_config *cfg, int N, sm_error *err);
SMDEF sm_status smc_mhc_amax_gain_tokens(smc_ctx *c, sm_rowcol_stats *stats,
                                         const sm_mhc_acts *acts, int layers,
                                         const sm_mhc_config *cfg, int N, sm_error *err);

/* ===================================================================== */
/* >>backbone  Backbone and >>loss                                       */
/* ===================================================================== */
/* The GPU sm_rmsnorm_*, sm_layernorm_*, sm_linear_*, sm_gelu_* / sm_silu_*,
 * sm_embedding_*, sm_attention_* and sm_crossentropy_* (sparsemem.h
 * >>backbone, >>loss): the same arguments, shapes and NULL conventions,
 * with device pointers. Sums that the CPU does serially are reductions here
 * (warp or block per row, shuffles), so results agree with the CPU to
 * rounding, not bits. Column sums into gradients (dweight of the norms,
 * dbias) add one partial per block with atomicAdd, and so does the
 * token-embedding scatter. */

SMDEF void smc_rmsnorm_forward(smc_ctx *c, float *out, float *rstd, const float *inp,
                               const float *weight, int N, int C);
SMDEF void smc_rmsnorm_backward(smc_ctx *c, float *dinp, float *dweight, const float *dout,
                                const float *inp, const float *weight, const float *rstd, int N,
                                int C);
SMDEF void smc_layernorm_forward(smc_ctx *c, float *out, float *mean, float *rstd, const float *inp,
                                 const float *weight, const float *bias, int N, int C);
SMDEF void smc_layernorm_backward(smc_ctx *c, float *dinp, float *dweight, float *dbias,
                                  const float *dout, const float *inp, const float *weight,
                                  const float *mean, const float *rstd, int N, int C);

/* out[N,OC] = inp[N,C] weight[OC,C]^T + bias (bias may be NULL). Backward:
 * NULL dinp, dweight or dbias skips that gradient; inp may be NULL without
 * dweight and weight NULL without dinp. */
SMDEF void smc_linear_forward(smc_ctx *c, float *out, const float *inp, const float *weight,
                              const float *bias, int N, int C, int OC);
SMDEF void smc_linear_backward(smc_ctx *c, float *dinp, float *dweight, float *dbias,
                               const float *dout, const float *inp, const float *weight, int N,
                               int C, int OC);

/* GELU (tanh approximation, as sm_gelu_forward) and SiLU over n values. */
SMDEF void smc_gelu_forward(smc_ctx *c, float *out, const float *inp, size_t n);
SMDEF void smc_gelu_backward(smc_ctx *c, float *dinp, const float *dout, const float *inp,
                             size_t n);
SMDEF void smc_silu_forward(smc_ctx *c, float *out, const float *inp, size_t n);
SMDEF void smc_silu_backward(smc_ctx *c, float *dinp, const float *dout, const float *inp,
                             size_t n);

/* tokens[B*T] are device ints. */
SMDEF void smc_embedding_forward(smc_ctx *c, float *out, const int *tokens, const float *wte,
                                 const float *wpe, int B, int T, int C);
SMDEF void smc_embedding_backward(smc_ctx *c, float *dwte, float *dwpe, const float *dout,
                                  const int *tokens, int B, int T, int C);

/* Causal attention with cuBLAS batched GEMMs; att[B,NH,T,T] has the CPU's
 * layout (probabilities, zeros above the diagonal). Backward needs device
 * scratch of smc_attention_scratch_floats(B, T, C, NH) floats (the score
 * gradients, B*NH*T*T), passed as the extra last argument. */
SMDEF void smc_attention_forward(smc_ctx *c, float *out, float *att, const float *qkv, int B,
                                 int T, int C, int NH);
SMDEF size_t smc_attention_scratch_floats(int B, int T, int C, int NH);
SMDEF void smc_attention_backward(smc_ctx *c, float *dqkv, const float *dout, const float *qkv,
                                  const float *att, int B, int T, int C, int NH, float *scratch);

/* As sm_crossentropy_forward (targets are device ints). It waits for the
 * stream to return the mean loss and *n_counted; NaN (and *n_counted = 0)
 * when the device fails. */
SMDEF float smc_crossentropy_forward(smc_ctx *c, float *losses, float *logits_to_probs,
                                     const int *targets, int N, int V, int *n_counted);
SMDEF void smc_crossentropy_backward(smc_ctx *c, float *dlogits, const float *probs,
                                     const int *targets, int N, int V, float dloss);

/* ===================================================================== */
/* >>optim  AdamW with parameter groups and sparse rows (>>params)       */
/* ===================================================================== */
/* The parameter table on the GPU (sparsemem.h >>params, >>optim): the host
 * sm_params keeps the layout (tensors, groups, step counter) and its own
 * host buffers, used for checkpoints; the device holds the four flat
 * buffers and, for each sparse tensor, the smc_row_set its backward marks.
 * Norms, zeroing and the AdamW step read the row sets' counts on the
 * device, so a training step never waits for the host. */

typedef struct smc_params {
    sm_params *layout;                 /* the host table: tensors, groups, step (not owned) */
    float *data, *grad, *m, *v;        /* device, layout->total floats each */
    smc_row_set *rows[SM_MAX_TENSORS]; /* device row set of each sparse tensor (NULL: dense) */
    double *sumsq;                     /* device scratch of the gradient norms */
    /* smc_params_allreduce_grads' scratch: touched rows' gradients packed
     * (device), and a host copy for MPI without NCCL; capacities in floats */
    float *packed, *staged;
    size_t packed_cap, staged_cap;
} smc_params;

/* Allocates the four device buffers (zeroed) for the tensors of `layout`,
 * which must outlive d. Bind the sparse tensors' row sets next. */
SMDEF sm_status smc_params_alloc(smc_params *d, sm_params *layout, sm_error *err);
/* Binds the device row set of tensor `tensor` (one the layout marks sparse:
 * t->rows != NULL); an index out of range binds nothing. */
SMDEF void smc_params_bind_rows(smc_params *d, int tensor, smc_row_set *rows);
/* Fails naming the first sparse tensor left unbound, or a row set bound to
 * a dense tensor or with another number of rows than its tensor. Call it
 * once before the first step: the functions below trust the bindings. */
SMDEF sm_status smc_params_check(const smc_params *d, sm_error *err);
/* Frees the device buffers (not the row sets, nor the layout). */
SMDEF void smc_params_free(smc_params *d);
/* The host layout's data, m and v -> the device (after a checkpoint load).
 * The step counter stays on the host: the GPU step reads and advances
 * layout->step. Waits for the copies. */
SMDEF sm_status smc_params_upload(smc_ctx *c, const smc_params *d, sm_error *err);
/* Device data, m and v -> the host layout's buffers (checkpoints, CPU
 * evaluation). Gradients stay on the device: checkpoints hold none, and
 * the buffer d->grad can be downloaded on its own. Waits for the copies. */
SMDEF sm_status smc_params_download(smc_ctx *c, const smc_params *d, sm_error *err);

/* Zeroes the gradients: dense tensors whole, sparse tensors only the rows in
 * their sets (sm_params_zero_grad). */
SMDEF void smc_params_zero_grad(smc_ctx *c, smc_params *d);
/* Global L2 norm of the gradient, sparse tensors over their touched rows
 * (sm_params_grad_norm); waits for the device. Sums in double, so it agrees
 * with the CPU (float row sums) to about 1e-7 relative. NaN when the device
 * failed (smc_sync then names the error). */
SMDEF double smc_params_grad_norm(smc_ctx *c, const smc_params *d);
/* The same over the tensors of one group (sm_params_group_grad_norm). */
SMDEF double smc_params_group_grad_norm(smc_ctx *c, const smc_params *d, int group);
/* One AdamW step on every tensor, as sm_params_adamw_step: advances
 * layout->step, scales gradients by clip_scale and each group's learning
 * rate by lr_factor; sparse tensors move only their touched rows, whose
 * gradients are then zeroed, and their row sets are cleared. */
SMDEF void smc_params_adamw_step(smc_ctx *c, smc_params *d, float lr_factor, float clip_scale);
/* Data parallelism with replicated parameters, as sm_params_allreduce_grads
 * (sparsemem.h >>comm): every gradient is scaled by `scale` (this rank's
 * share of the global mean loss), then summed over comm's ranks. Dense
 * tensors are summed whole. A sparse tensor's row set first becomes the
 * union of the ranks' sets, sorted, so every rank updates the same rows and
 * reads them in the same order; only those rows are summed, packed. The
 * sums run on the device buffers through comm's NCCL communicator when it
 * has one (sm_comm_init_nccl: one GPU per rank), otherwise through a host
 * copy with comm's MPI, so that several ranks can share a GPU. The row
 * lists (4 bytes per touched row) always go through the host. One rank:
 * the scaling alone. Collective; waits for the device. */
SMDEF sm_status smc_params_allreduce_grads(smc_ctx *c, smc_params *d, const sm_comm *comm, float scale,
                                           sm_error *err);

/* ===================================================================== */
/* >>model  The sm_model on the GPU                                      */
/* ===================================================================== */
/* A host sm_model (config, parameter layout, n-gram hash, hot set) and its
 * device mirror: parameters, gradients and Adam moments in an smc_params,
 * and a "device shadow" sm_model whose activation pointers point into GPU
 * memory, carved by the same code as the CPU model's, so the forward and
 * backward below read line for line like sm_model_forward/backward.
 * The n-gram rows of a batch are computed on the device (canonical ids,
 * hashing, and with Engram-Nine the hot-tier routing through the MPHF and
 * fingerprints), with the CPU's integer functions: the same rows as the
 * CPU model. Build the host model's hot set and canon table before
 * smc_model_init (they are uploaded there).
 * Per-sublayer diagnostics (out_norm, peer_norm, grad_norm) are computed
 * on the device and copied into the host model's sublayers by
 * smc_model_fetch_diagnostics. Checkpoints: smc_model_download copies the
 * parameters and moments into the host model, which saves as usual. */

typedef struct smc_model {
    sm_model *host;      /* not owned */
    smc_ctx *c;          /* not owned */
    sm_model d;          /* device shadow: activations and scratch on the GPU */
    smc_params params;   /* device parameters, gradients, moments */
    smc_row_set engram_rows;
    smc_row_set peer_rows[SM_MAX_SUBLAYERS]; /* of the sublayers with PEER */
    smc_ngram_hash hash; /* Engram: the hash tables on the device */
    smc_nine nine;       /* Engram-Nine: the hot set on the device */
    uint32_t *canon;     /* [V] token -> canonical id */
    unsigned char *doc_start; /* [N] of the batch */
    float *diag;         /* [n_sub][3]: out_norm, peer_norm, grad_norm */
    float *att_scratch;  /* attention backward's score gradients (shared by layers) */
} smc_model;

/* Mirrors `host` (already initialised, B_max as given to sm_model_init) on
 * the GPU and uploads its parameters and moments, and with Engram its hash
 * tables, canon table and hot set (set and build those first). Refuses a
 * model with Engram and mHC in the per-stream form (engram_mhc): the GPU has
 * the branch form only. */
SMDEF sm_status smc_model_init(smc_model *g, smc_ctx *c, sm_model *host, sm_error *err);
SMDEF void smc_model_free(smc_model *g);
/* inputs/targets/doc_start are host arrays of B*T; sets host->loss and
 * host->n_counted as the CPU forward does (targets NULL: logits only).
 * Forward and backward follow the CPU's call paths step for step (listed
 * at sm_model_forward and sm_model_backward in sparsemem.h, >>model), each
 * sm_X call an smc_X one. */
SMDEF sm_status smc_model_forward(smc_model *g, const int *inputs, const int *targets,
                                  const unsigned char *doc_start, int B, int T, sm_error *err);
SMDEF void smc_model_backward(smc_model *g);
/* Device parameters and moments -> the host model (for checkpoints and
 * CPU evaluation); and the reverse after loading a checkpoint. */
SMDEF sm_status smc_model_download(smc_model *g, sm_error *err);
SMDEF sm_status smc_model_upload(smc_model *g, sm_error *err);
/* Copies the last forward/backward's per-sublayer norms into host->sub. */
SMDEF sm_status smc_model_fetch_diagnostics(smc_model *g, sm_error *err);

#ifdef __cplusplus
}
#endif
#endif /* SPARSEMEM_CUDA_CUH */

/* ===================================================================== */
/* Implementation                                                        */
/* ===================================================================== */
#ifdef SPARSEMEM_CUDA_IMPLEMENTATION
#ifndef SPARSEMEM_CUDA_IMPLEMENTATION_DONE
#define SPARSEMEM_CUDA_IMPLEMENTATION_DONE

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

/* ---- >>util  Context ------------------------------------------------ */

#define SMC__THREADS 256
/* Blocks of SMC__THREADS covering n items. */
static unsigned smc__blocks(size_t n) { return (unsigned)((n + SMC__THREADS - 1) / SMC__THREADS); }

/* ---- reductions: every lane (thread) of the warp (block) gets the result;
 *      block versions need blockDim.x a multiple of 32 and every thread ---- */

template <typename T> static __device__ T smc__warp_sum(T v) {
    int o;
    for (o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ float smc__warp_max(float v) {
    int o;
    for (o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Warp results meet in shared memory; the first barrier keeps a previous
 * call's readers from seeing this call's writes. */
template <typename T> static __device__ T smc__block_sum(T v) {
    __shared__ T part[32];
    int lane = threadIdx.x & 31;
    v = smc__warp_sum(v);
    __syncthreads();
    if (lane == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    return smc__warp_sum(lane < (int)(blockDim.x >> 5) ? part[lane] : (T)0);
}

static __device__ float smc__block_max(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31;
    v = smc__warp_max(v);
    __syncthreads();
    if (lane == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    return smc__warp_max(lane < (int)(blockDim.x >> 5) ? part[lane] : -INFINITY);
}

static sm_status smc__cuda_fail(sm_error *err, cudaError_t e, const char *what) {
    return sm_fail(err, SM_ERR_IO, "cuda: %s: %s", what, cudaGetErrorString(e));
}

SMDEF int smc_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError(); /* clear the sticky "no device/driver" error */
        return 0;
    }
    return n;
}

SMDEF sm_status smc_init(smc_ctx *c, int device, sm_error *err) {
    cudaDeviceProp prop;
    cudaError_t e;
    memset(c, 0, sizeof *c);
    if (device < 0 || device >= smc_device_count())
        return sm_fail(err, SM_ERR_INVALID_ARG, "cuda: no device %d (%d found)", device,
                       smc_device_count());
    if ((e = cudaSetDevice(device)) != cudaSuccess) return smc__cuda_fail(err, e, "set device");
    if ((e = cudaGetDeviceProperties(&prop, device)) != cudaSuccess)
        return smc__cuda_fail(err, e, "device properties");
    if ((e = cudaStreamCreate(&c->stream)) != cudaSuccess)
        return smc__cuda_fail(err, e, "create stream");
    if (cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS) {
        cudaStreamDestroy(c->stream);
        return sm_fail(err, SM_ERR_IO, "cuda: cublasCreate failed");
    }
    cublasSetStream(c->blas, c->stream);
    c->device = device;
    c->sm_count = prop.multiProcessorCount;
    snprintf(c->name, sizeof c->name, "%s", prop.name);
    smc_set_tf32(c, 1);
    return SM_OK;
}

SMDEF void smc_free(smc_ctx *c) {
    if (c->blas) cublasDestroy(c->blas);
    if (c->stream) cudaStreamDestroy(c->stream);
    memset(c, 0, sizeof *c);
}

SMDEF void smc_set_tf32(smc_ctx *c, int on) {
    c->tf32 = on;
    cublasSetMathMode(c->blas, on ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_PEDANTIC_MATH);
}

SMDEF sm_status smc_sync(smc_ctx *c, const char *what, sm_error *err) {
    cudaError_t e = cudaStreamSynchronize(c->stream);
    if (e == cudaSuccess) e = cudaGetLastError();
    return e == cudaSuccess ? SM_OK : smc__cuda_fail(err, e, what);
}

SMDEF void *smc_malloc(size_t bytes, const char *what, sm_error *err) {
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes > 0 ? bytes : 1);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        sm_fail(err, SM_ERR_OOM, "cuda: %s: cannot allocate %zu bytes on the device (%s)", what,
                bytes, cudaGetErrorString(e));
        return NULL;
    }
    cudaMemset(p, 0, bytes > 0 ? bytes : 1);
    return p;
}

SMDEF void smc_dfree(void *p) {
    if (p) cudaFree(p);
}

SMDEF sm_status smc_upload(void *dst, const void *src, size_t bytes, sm_error *err) {
    cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
    return e == cudaSuccess ? SM_OK : smc__cuda_fail(err, e, "copy to device");
}

SMDEF sm_status smc_download(void *dst, const void *src, size_t bytes, sm_error *err) {
    cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
    return e == cudaSuccess ? SM_OK : smc__cuda_fail(err, e, "copy to host");
}

SMDEF void smc_zero(smc_ctx *c, void *p, size_t bytes) { cudaMemsetAsync(p, 0, bytes, c->stream); }

/* >>gemm */
/* cuBLAS is column-major: a row-major C[M,N] is a column-major C^T[N,M], so
 * C = op(A) op(B) becomes C^T = op(B)^T op(A)^T: swap the operands and the
 * sizes, keep the transposes. */
SMDEF void smc_sgemm(smc_ctx *c, int trans_a, int trans_b, int M, int N, int K, float alpha,
                     const float *A, int lda, const float *B, int ldb, float beta, float *C,
                     int ldc) {
    cublasSgemm(c->blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                N, M, K, &alpha, B, ldb, A, lda, &beta, C, ldc);
}

SMDEF void smc_sgemm_batched(smc_ctx *c, int trans_a, int trans_b, int M, int N, int K,
                             float alpha, const float *A, int lda, long long stride_a,
                             const float *B, int ldb, long long stride_b, float beta, float *C,
                             int ldc, long long stride_c, int batch) {
    cublasSgemmStridedBatched(c->blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                              trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, B, ldb,
                              stride_b, A, lda, stride_a, &beta, C, ldc, stride_c, batch);
}

/* ---- >>params  touched-row sets ------------------------------------- */

SMDEF sm_status smc_row_set_init(smc_row_set *s, size_t nrows, sm_error *err) {
    memset(s, 0, sizeof *s);
    if (nrows > 0xffffffffu)
        return sm_fail(err, SM_ERR_INVALID_ARG, "row set: %zu rows exceeds 2^32", nrows);
    s->rows = (uint32_t *)smc_malloc(nrows * 4, "row set list", err);
    s->mark = s->rows ? (uint32_t *)smc_malloc(nrows * 4, "row set marks", err) : NULL;
    s->count = s->mark ? (uint32_t *)smc_malloc(4, "row set count", err) : NULL;
    if (!s->count) {
        smc_row_set_free(s);
        return SM_ERR_OOM;
    }
    s->nrows = nrows;
    return SM_OK;
}

SMDEF void smc_row_set_free(smc_row_set *s) {
    smc_dfree(s->rows);
    smc_dfree(s->mark);
    smc_dfree(s->count);
    memset(s, 0, sizeof *s);
}

/* The first thread to flip a row's mark appends it. */
static __global__ void smc__row_set_add_kernel(uint32_t *list, uint32_t *mark, uint32_t *count,
                                               const uint32_t *rows, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (atomicCAS(&mark[rows[i]], 0u, 1u) == 0u) list[atomicAdd(count, 1u)] = rows[i];
}

SMDEF void smc_row_set_add(smc_ctx *c, smc_row_set *s, const uint32_t *rows, size_t n) {
    if (n == 0) return;
    smc__row_set_add_kernel<<<smc__blocks(n), SMC__THREADS, 0, c->stream>>>(s->rows, s->mark,
                                                                              s->count, rows, n);
}

/* Unmarks the listed rows (the list length is read on the device). */
static __global__ void smc__row_set_clear_kernel(const uint32_t *list, uint32_t *mark,
                                                 const uint32_t *count) {
    size_t i;
    for (i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < *count;
         i += (size_t)gridDim.x * blockDim.x)
        mark[list[i]] = 0;
}

SMDEF void smc_row_set_clear(smc_ctx *c, smc_row_set *s) {
    smc__row_set_clear_kernel<<<(unsigned)(4 * (c->sm_count > 0 ? c->sm_count : 1)), SMC__THREADS,
                                0, c->stream>>>(s->rows, s->mark, s->count);
    cudaMemsetAsync(s->count, 0, 4, c->stream);
}

SMDEF size_t smc_row_set_count(smc_ctx *c, const smc_row_set *s) {
    uint32_t n = 0;
    cudaMemcpyAsync(&n, s->count, 4, cudaMemcpyDeviceToHost, c->stream);
    cudaStreamSynchronize(c->stream);
    return n;
}

/* ---- >>mphf  MPHF and fingerprints ---------------------------------- */

static __global__ void smc__mphf_lookup_kernel(uint32_t *out, smc_mphf f, const uint64_t *keys,
                                               size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = sm_mphf_lookup(&f, keys[i]);
}

static __global__ void smc__fingerprints_contains_kernel(unsigned char *out, smc_fingerprints fp,
                                                         smc_mphf f, const uint64_t *keys,
                                                         size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = (unsigned char)sm_fingerprints_match(&fp, keys[i], sm_mphf_lookup(&f, keys[i]));
}

/* A device copy of bytes from src; NULL when *st already holds a failure
 * (so copies chain) or when this one fails (*st and err then say why). */
static void *smc__device_copy(const void *src, size_t bytes, const char *what, sm_status *st,
                              sm_error *err) {
    void *d;
    if (*st != SM_OK) return NULL;
    d = smc_malloc(bytes, what, err);
    if (!d) {
        *st = SM_ERR_OOM;
        return NULL;
    }
    if ((*st = smc_upload(d, src, bytes, err)) != SM_OK) {
        smc_dfree(d);
        return NULL;
    }
    return d;
}

SMDEF sm_status smc_mphf_upload(smc_mphf *d, const sm_mphf *f, sm_error *err) {
    size_t blocks = (size_t)((f->num_buckets + SM__MPHF_BLOCK - 1) / SM__MPHF_BLOCK);
    size_t overflow_words = sm__packed_words(f->num_overflow, f->overflow_width);
    size_t remap_words = sm__packed_words(f->table_size - f->n, f->remap_width);
    sm_status st = SM_OK;
    *d = *f; /* the plain fields; the arrays are replaced by device copies */
    d->pilots = NULL, d->block_overflows = NULL, d->overflow = NULL, d->remap = NULL;
    if (!f->pilots) return SM_OK; /* never built: nothing to copy */
    d->pilots = (uint8_t *)smc__device_copy(f->pilots, blocks * SM__MPHF_BLOCK, "mphf pilots",
                                            &st, err);
    d->block_overflows = (uint32_t *)smc__device_copy(f->block_overflows, blocks * 4,
                                                      "mphf block counts", &st, err);
    d->overflow = (uint64_t *)smc__device_copy(f->overflow, 8 * overflow_words,
                                               "mphf overflow pilots", &st, err);
    d->remap = (uint64_t *)smc__device_copy(f->remap, 8 * remap_words, "mphf remap", &st, err);
    if (st != SM_OK) smc_mphf_free(d);
    return st;
}

SMDEF void smc_mphf_free(smc_mphf *d) {
    smc_dfree(d->pilots);
    smc_dfree(d->block_overflows);
    smc_dfree(d->overflow);
    smc_dfree(d->remap);
    memset(d, 0, sizeof *d);
}

SMDEF void smc_mphf_lookup_batch(smc_ctx *c, const smc_mphf *f, const uint64_t *keys,
                                 uint32_t *out, size_t n) {
    if (n == 0) return;
    smc__mphf_lookup_kernel<<<smc__blocks(n), SMC__THREADS, 0, c->stream>>>(out, *f, keys, n);
}

SMDEF sm_status smc_fingerprints_upload(smc_fingerprints *d, const sm_fingerprints *fp,
                                        sm_error *err) {
    sm_status st = SM_OK;
    *d = *fp;
    d->data = NULL;
    if (!fp->data) return SM_OK; /* never built */
    d->data = (unsigned char *)smc__device_copy(fp->data, (size_t)fp->n * (size_t)(fp->bits / 8),
                                                "fingerprints", &st, err);
    if (st != SM_OK) smc_fingerprints_free(d);
    return st;
}

SMDEF void smc_fingerprints_free(smc_fingerprints *d) {
    smc_dfree(d->data);
    memset(d, 0, sizeof *d);
}

SMDEF void smc_fingerprints_contains_batch(smc_ctx *c, const smc_fingerprints *fp,
                                           const smc_mphf *f, const uint64_t *keys,
                                           unsigned char *out, size_t n) {
    if (n == 0) return;
    smc__fingerprints_contains_kernel<<<smc__blocks(n), SMC__THREADS, 0, c->stream>>>(out, *fp,
                                                                                    *f, keys, n);
}

/* ---- >>engram  n-gram hashing --------------------------------------- */

SMDEF sm_status smc_ngram_hash_upload(smc_ngram_hash *d, const sm_ngram_hash *h,
                                      sm_error *err) {
    size_t heads = (size_t)h->n_sets * (size_t)h->n_slots;
    sm_status st = SM_OK;
    *d = *h;
    d->mult = NULL, d->primes = NULL, d->offsets = NULL;
    d->mult = (uint64_t *)smc__device_copy(
        h->mult, (size_t)h->n_sets * SM_NGRAM_MAX_ORDER * sizeof(uint64_t), "ngram multipliers",
        &st, err);
    d->primes = (uint32_t *)smc__device_copy(h->primes, heads * 4, "ngram primes", &st, err);
    d->offsets = (uint32_t *)smc__device_copy(h->offsets, heads * 4, "ngram offsets", &st, err);
    if (st != SM_OK) smc_ngram_hash_free(d);
    return st;
}

SMDEF void smc_ngram_hash_free(smc_ngram_hash *d) {
    smc_dfree(d->mult);
    smc_dfree(d->primes);
    smc_dfree(d->offsets);
    memset(d, 0, sizeof *d);
}

/* How kernels read n-grams: B sequences of T tokens, the document starts
 * (NULL unless reset_at_doc) and the pad id. */
typedef struct smc__ngram_src {
    const uint32_t *tokens;
    const unsigned char *starts;
    int T;
    uint32_t pad;
} smc__ngram_src;

static smc__ngram_src smc__ngram_source(const sm_ngram_hash_config *cfg, const uint32_t *tokens,
                                        const unsigned char *doc_start, int T) {
    smc__ngram_src s;
    s.tokens = tokens;
    s.starts = cfg->reset_at_doc ? doc_start : NULL;
    s.T = T;
    s.pad = cfg->pad_id;
    return s;
}

/* gram[k], k < order, of position n: the token at t-k, or the pad where t-k
 * is before the sequence start or, with starts, before the start of t's
 * document (sm__ngram_context with sm__ngram_doc_begin's begin: t-k is in
 * t's document iff no start lies in (t-k, t]). */
static __device__ void smc__ngram_gram(uint32_t *gram, const smc__ngram_src *src, size_t n,
                                       int order) {
    int t = (int)(n % (size_t)src->T), k, live = 1;
    const uint32_t *seq = src->tokens + (n - (size_t)t);
    const unsigned char *starts = src->starts ? src->starts + (n - (size_t)t) : NULL;
#pragma unroll
    for (k = 0; k < SM_NGRAM_MAX_ORDER; k++) {
        if (k >= order) break;
        if (k > 0) live = live && t - k >= 0 && !(starts && starts[t - k + 1]);
        gram[k] = live ? seq[t - k] : src->pad;
    }
}

/* One thread per (position, slot): the slot's order and head, the CPU's
 * mix of the n-gram (sm_ngram_hash_mix), row = mix % prime. */
static __global__ void smc__ngram_hash_kernel(uint32_t *rows, uint32_t *flat, smc__ngram_src src,
                                              smc_ngram_hash h, int layer, size_t total) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, n, head;
    uint32_t gram[SM_NGRAM_MAX_ORDER], row;
    int slot, order;
    if (i >= total) return;
    n = i / (size_t)h.n_slots;
    slot = (int)(i % (size_t)h.n_slots);
    order = h.cfg.orders[slot / h.cfg.n_heads];
    head = (size_t)sm_ngram_hash_set(&h, layer) * h.n_slots + (size_t)slot;
    smc__ngram_gram(gram, &src, n, order);
    row = (uint32_t)(sm_ngram_hash_mix(&h, layer, gram, order) % h.primes[head]);
    if (rows) rows[i] = row;
    if (flat) flat[i] = h.offsets[head] + row;
}

SMDEF sm_status smc_ngram_hash_compute(smc_ctx *c, const smc_ngram_hash *h, int layer,
                                       uint32_t *rows, uint32_t *flat, const uint32_t *tokens,
                                       const unsigned char *doc_start, int B, int T,
                                       sm_error *err) {
    size_t total = (size_t)B * (size_t)T * (size_t)h->n_slots;
    sm_status st = sm__ngram_check_args(h, layer, B, T, err);
    if (st != SM_OK || total == 0 || (!rows && !flat)) return st;
    smc__ngram_hash_kernel<<<smc__blocks(total), SMC__THREADS, 0, c->stream>>>(
        rows, flat, smc__ngram_source(&h->cfg, tokens, doc_start, T), *h, layer, total);
    return SM_OK;
}

/* ---- >>nine  Engram-Nine routing ------------------------------------ */

SMDEF sm_status smc_nine_upload(smc_nine *d, const sm_nine *nine, sm_error *err) {
    sm_status st = SM_OK;
    int i;
    *d = *nine;
    memset(d->mphf, 0, sizeof d->mphf); /* the arrays are replaced by device copies */
    memset(d->fp, 0, sizeof d->fp);
    for (i = 0; i < nine->n_orders && st == SM_OK; i++) {
        if (!nine->cfg.n_hot[i]) continue;
        st = smc_mphf_upload(&d->mphf[i], &nine->mphf[i], err);
        if (st == SM_OK) st = smc_fingerprints_upload(&d->fp[i], &nine->fp[i], err);
    }
    if (st != SM_OK) smc_nine_free(d);
    return st;
}

SMDEF void smc_nine_free(smc_nine *d) {
    int i;
    for (i = 0; i < SM_NGRAM_MAX_ORDER; i++) {
        smc_mphf_free(&d->mphf[i]);
        smc_fingerprints_free(&d->fp[i]);
    }
    memset(d, 0, sizeof *d);
}

/* One order's routing, as the route kernel reads it. */
typedef struct smc__nine_order {
    smc_mphf mphf;
    smc_fingerprints fp;
    uint64_t base;   /* its first hot row: extra_offset + set*set_rows + hot_offset */
    uint32_t n_hot;  /* 0: no hot tier for this order (all cold) */
    int order, index, n_orders, n_slots, n_heads, set, route;
} smc__nine_order;

/* One thread per position: membership of its n-gram of one order and, when
 * hot, its K slots pointed at the hot rows (sm__nine_route_order with
 * sm__nine_hot_slots and sm__nine_member_row). */
static __global__ void smc__nine_route_kernel(uint32_t *flat, unsigned char *hot,
                                              smc__ngram_src src, smc__nine_order job,
                                              size_t N) {
    size_t n = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint32_t gram[SM_NGRAM_MAX_ORDER], slot, *dst;
    uint64_t key;
    int is_hot, j;
    if (n >= N) return;
    if (!job.n_hot) { /* launched only with hot */
        hot[n * job.n_orders + job.index] = 0;
        return;
    }
    smc__ngram_gram(gram, &src, n, job.order);
    key = sm_nine_key(gram, job.order);
    slot = sm_mphf_lookup(&job.mphf, key);
    is_hot = sm_fingerprints_match(&job.fp, key, slot);
    if (hot) hot[n * job.n_orders + job.index] = (unsigned char)is_hot;
    if (!flat || !is_hot) return;
    dst = flat + n * job.n_slots + (size_t)job.index * job.n_heads;
    for (j = 0; j < job.n_heads; j++) {
        uint64_t row = job.route == SM_NINE_ROUTE_MPHF
                           ? slot
                           : sm__nine_member_row(key, job.set, j, job.n_hot);
        dst[j] = (uint32_t)(job.base + row * (uint64_t)job.n_heads + (uint64_t)j);
    }
}

SMDEF sm_status smc_nine_route(smc_ctx *c, const smc_nine *nine, const smc_ngram_hash *h,
                               int layer, uint32_t *flat, unsigned char *hot,
                               const uint32_t *tokens, const unsigned char *doc_start, int B,
                               int T, sm_error *err) {
    size_t N = (size_t)B * (size_t)T;
    smc__nine_order job;
    int i;
    sm_status st = sm__nine_check_hash(nine, h, flat != NULL, err);
    if (st != SM_OK) return st;
    if (flat)
        st = smc_ngram_hash_compute(c, h, layer, NULL, flat, tokens, doc_start, B, T, err);
    else if (layer < 0 || layer >= h->cfg.n_layers || B < 0 || T < 0)
        st = sm_fail(err, SM_ERR_INVALID_ARG, "nine route: layer %d, B %d, T %d", layer, B, T);
    if (st != SM_OK || N == 0) return st;
    memset(&job, 0, sizeof job);
    job.n_orders = nine->n_orders, job.n_slots = h->n_slots, job.n_heads = nine->n_heads;
    job.set = sm_ngram_hash_set(h, layer), job.route = nine->cfg.route;
    for (i = 0; i < nine->n_orders; i++) {
        job.n_hot = nine->cfg.n_hot[i];
        if (!hot && (!flat || !job.n_hot)) continue; /* nothing to write */
        job.mphf = nine->mphf[i], job.fp = nine->fp[i];
        job.base = (uint64_t)h->extra_offset + (uint64_t)job.set * nine->set_rows +
                   nine->hot_offset[i];
        job.order = nine->orders[i], job.index = i;
        smc__nine_route_kernel<<<smc__blocks(N), SMC__THREADS, 0, c->stream>>>(
            flat, hot, smc__ngram_source(&h->cfg, tokens, doc_start, T), job, N);
    }
    return SM_OK;
}

/* ---- >>engram  Engram layer ----------------------------------------- */

#define SMC__ENGRAM_ROWS (SMC__THREADS / 32) /* rows per block of the warp-per-row kernels */
#define SMC__ENGRAM_COL_ROWS 8               /* row lanes of the column-sum blocks (x 32 columns) */

/* The sizes kernels need, from the config. */
typedef struct smc__engram_shape {
    int d, d_mem, d_head, n_heads, n_orders, n_slots;
} smc__engram_shape;

static smc__engram_shape smc__engram_shape_of(const sm_engram_config *cfg) {
    smc__engram_shape s;
    s.d = cfg->d_model;
    s.d_mem = sm_engram_d_mem(cfg);
    s.d_head = cfg->d_head;
    s.n_heads = cfg->hash.n_heads;
    s.n_orders = cfg->hash.n_orders;
    s.n_slots = s.n_orders * s.n_heads;
    return s;
}

/* ---- activations and scratch: the CPU's one-allocation layouts ---- */

/* The kernels below handle one stream (see the section's header). */
static sm_status smc__engram_check_streams(const sm_engram_config *c, sm_error *err) {
    if (c->n_streams == 1) return SM_OK;
    return sm_fail(err, SM_ERR_INVALID_ARG,
                   "engram: n_streams %d (the per-stream form inside mHC) is not implemented on "
                   "the GPU; use one stream (Engram as an mHC branch)",
                   c->n_streams);
}

SMDEF sm_status smc_engram_acts_alloc(sm_engram_acts *a, const sm_engram_config *c, int N,
                                      sm_error *err) {
    sm_status st = smc__engram_check_streams(c, err);
    return st != SM_OK ? st : sm__engram_acts_alloc_with(a, c, N, smc_malloc, err);
}

SMDEF void smc_engram_acts_free(sm_engram_acts *a) {
    smc_dfree(a->e); /* the start of the one allocation */
    memset(a, 0, sizeof *a);
}

SMDEF sm_status smc_engram_scratch_alloc(sm_engram_scratch *s, const sm_engram_config *c,
                                         int N, sm_error *err) {
    sm_status st = smc__engram_check_streams(c, err);
    return st != SM_OK ? st : sm__engram_scratch_alloc_with(s, c, N, smc_malloc, err);
}

SMDEF void smc_engram_scratch_free(sm_engram_scratch *s) {
    smc_dfree(s->dconv);
    memset(s, 0, sizeof *s);
}

/* ---- device helpers ---- */

/* y = x / rms(x) * w over one row of C by one warp (sm_rmsnorm_forward);
 * returns 1/rms. Each lane touches the columns lane, lane + 32, ... so it
 * reads back only what it wrote itself. */
static __device__ float smc__engram_warp_rmsnorm(float *y, const float *x, const float *w, int C,
                                                 int lane) {
    float ss = 0.0f, r;
    int j;
    for (j = lane; j < C; j += 32) ss += x[j] * x[j];
    ss = smc__warp_sum(ss);
    r = 1.0f / sqrtf(ss / (float)C + SM_RMSNORM_EPS);
    for (j = lane; j < C; j += 32) y[j] = x[j] * r * w[j];
    return r;
}

/* Whether element i of an [N, d_mem] array lies in a hot order block. */
static __device__ int smc__engram_elem_hot(const unsigned char *hot, smc__engram_shape sh,
                                           size_t i) {
    size_t n = i / (size_t)sh.d_mem;
    int o = (int)(i % (size_t)sh.d_mem) / (sh.n_heads * sh.d_head);
    return hot && hot[n * sh.n_orders + o];
}

/* Table row element of e's element i: flat[n, slot] * d_head + k. */
static __device__ size_t smc__engram_table_at(const uint32_t *flat, smc__engram_shape sh,
                                              size_t i) {
    size_t n = i / (size_t)sh.d_mem, r = i % (size_t)sh.d_mem;
    return (size_t)flat[n * sh.n_slots + r / (size_t)sh.d_head] * sh.d_head + r % sh.d_head;
}

/* ---- forward kernels ---- */

/* e = the gathered table rows (sm__engram_gather); with e_cold / e_hot also
 * e split by tier (sm__engram_split_tiers). */
static __global__ void smc__engram_gather_kernel(float *e, float *e_cold, float *e_hot,
                                                 const float *table, const uint32_t *flat,
                                                 const unsigned char *hot, smc__engram_shape sh,
                                                 size_t total) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    float v;
    int is_hot;
    if (i >= total) return;
    v = table[smc__engram_table_at(flat, sh, i)];
    e[i] = v;
    if (!e_cold) return;
    is_hot = smc__engram_elem_hot(hot, sh, i);
    e_cold[i] = is_hot ? 0.0f : v;
    e_hot[i] = is_hot ? v : 0.0f;
}

/* One warp per position: key += b_K, key_n = RMSNorm_k(key), query_n =
 * RMSNorm_q(h), g = <query_n, key_n>/sqrt(d) + sum of gate_hot over the hot
 * orders (gate_hot NULL: variant off), alpha = sigmoid(s(g))
 * (sm__engram_gate_forward). */
static __global__ void smc__engram_gate_kernel(sm_engram_acts a, const float *h,
                                               const unsigned char *hot, sm_engram_params p,
                                               const float *gate_hot, int N, int d, int n_orders,
                                               float inv_sqrt_d, int signed_sqrt) {
    int lane = threadIdx.x & 31, n = blockIdx.x * SMC__ENGRAM_ROWS + threadIdx.x / 32, j;
    size_t o = (size_t)n * d;
    float rk, rq, dot = 0.0f, bias = 0.0f, g;
    if (n >= N) return; /* whole warps */
    for (j = lane; j < d; j += 32) a.key[o + j] += p.b_key[j];
    rk = smc__engram_warp_rmsnorm(a.key_n + o, a.key + o, p.norm_key, d, lane);
    rq = smc__engram_warp_rmsnorm(a.query_n + o, h + o, p.norm_query, d, lane);
    for (j = lane; j < d; j += 32) dot += a.query_n[o + j] * a.key_n[o + j];
    dot = smc__warp_sum(dot);
    if (lane) return;
    if (gate_hot && hot)
        for (j = 0; j < n_orders; j++)
            if (hot[(size_t)n * n_orders + j]) bias += gate_hot[j];
    g = dot * inv_sqrt_d + bias;
    a.rstd_key[n] = rk;
    a.rstd_query[n] = rq;
    a.gate[n] = g;
    a.alpha[n] = sm_sigmoid(sm__engram_squash(g, signed_sqrt));
}

/* One warp per position: v = alpha * value, v_n = RMSNorm_v(v). */
static __global__ void smc__engram_value_kernel(sm_engram_acts a, const float *norm_value, int N,
                                                int d) {
    int lane = threadIdx.x & 31, n = blockIdx.x * SMC__ENGRAM_ROWS + threadIdx.x / 32, j;
    size_t o = (size_t)n * d;
    float al, r;
    if (n >= N) return;
    al = a.alpha[n];
    for (j = lane; j < d; j += 32) a.v[o + j] = al * a.value[o + j];
    r = smc__engram_warp_rmsnorm(a.v_n + o, a.v + o, norm_value, d, lane);
    if (lane == 0) a.rstd_v[n] = r;
}

/* conv[b,t,ch] = sum_j w[ch,j] v_n[b, t - j*dil, ch] over taps inside the
 * sequence (sm__engram_conv_forward), out = SiLU(conv) + v. */
static __global__ void smc__engram_conv_kernel(float *out, float *conv, const float *v_n,
                                               const float *v, const float *w, int T, int d,
                                               int dil, size_t total) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int t, ch, j;
    float acc = 0.0f;
    if (i >= total) return;
    t = (int)((i / (size_t)d) % (size_t)T);
    ch = (int)(i % (size_t)d);
    for (j = 0; j < SM_ENGRAM_CONV_KERNEL && t - j * dil >= 0; j++)
        acc += w[ch * SM_ENGRAM_CONV_KERNEL + j] * v_n[i - (size_t)j * dil * d];
    conv[i] = acc;
    out[i] = acc * sm_sigmoid(acc) + v[i];
}

SMDEF void smc_engram_forward_routed(smc_ctx *c, float *out, sm_engram_acts *acts,
                                     const float *h, const uint32_t *flat,
                                     const unsigned char *hot, const sm_engram_params *p,
                                     const sm_engram_config *cfg, int B, int T) {
    smc__engram_shape sh = smc__engram_shape_of(cfg);
    int N = B * T, d = sh.d, dm = sh.d_mem, hkp = cfg->hot_key_proj;
    size_t ne = (size_t)N * dm, nd = (size_t)N * d;
    unsigned rows = (unsigned)((N + SMC__ENGRAM_ROWS - 1) / SMC__ENGRAM_ROWS);
    if (N <= 0) return;
    smc__engram_gather_kernel<<<smc__blocks(ne), SMC__THREADS, 0, c->stream>>>(
        acts->e, hkp ? acts->e_cold : NULL, acts->e_hot, p->table, flat, hot, sh, ne);
    /* key = W_K e (+ b_K in the gate kernel), per tier with hot_key_proj */
    smc_sgemm(c, 0, 1, N, d, dm, 1.0f, hkp ? acts->e_cold : acts->e, dm, p->w_key, dm, 0.0f,
              acts->key, d);
    if (hkp)
        smc_sgemm(c, 0, 1, N, d, dm, 1.0f, acts->e_hot, dm, p->w_key_hot, dm, 1.0f, acts->key, d);
    smc__engram_gate_kernel<<<rows, SMC__THREADS, 0, c->stream>>>(
        *acts, h, hot, *p, cfg->hot_gate ? p->gate_hot : NULL, N, d, sh.n_orders,
        1.0f / sqrtf((float)d), cfg->signed_sqrt_gate);
    /* v = alpha * (W_V e), out = v + SiLU(conv(RMSNorm_v(v))) */
    smc_sgemm(c, 0, 1, N, d, dm, 1.0f, acts->e, dm, p->w_value, dm, 0.0f, acts->value, d);
    smc__engram_value_kernel<<<rows, SMC__THREADS, 0, c->stream>>>(*acts, p->norm_value, N, d);
    smc__engram_conv_kernel<<<smc__blocks(nd), SMC__THREADS, 0, c->stream>>>(
        out, acts->conv, acts->v_n, acts->v, p->conv, T, d, cfg->hash.orders[sh.n_orders - 1],
        nd);
}

SMDEF void smc_engram_forward(smc_ctx *c, float *out, sm_engram_acts *acts, const float *h,
                              const uint32_t *flat, const sm_engram_params *p,
                              const sm_engram_config *cfg, int B, int T) {
    smc_engram_forward_routed(c, out, acts, h, flat, NULL, p, cfg, B, T);
}

/* ---- backward kernels ---- */

/* Column sums out[ch*out_stride + tap] += sum_n a[n,ch] b[n - tap*dil, ch] scale[n]
 * over the positions n whose t = n % T is >= tap*dil (b, scale may be NULL:
 * factor 1; taps = gridDim.z). Covers the bias and RMSNorm gain gradients
 * (T = N, dil = 0, one tap) and the conv weights (sm__engram_conv_backward's
 * dw). Blocks of 32 columns x SMC__ENGRAM_COL_ROWS row lanes each sum a chunk
 * of rows, reduce in shared memory and add their partial with one atomic per
 * column. */
static __global__ void smc__engram_colsum_kernel(float *out, int out_stride, const float *a,
                                                 const float *b, const float *scale, int N,
                                                 int C, int T, int dil, int chunk) {
    __shared__ float part[SMC__ENGRAM_COL_ROWS][33];
    int ch = blockIdx.x * 32 + threadIdx.x, tap = blockIdx.z, shift = tap * dil, n, i;
    int end = min(N, (int)blockIdx.y * chunk + chunk);
    float s = 0.0f;
    if (ch < C)
        for (n = blockIdx.y * chunk + threadIdx.y; n < end; n += SMC__ENGRAM_COL_ROWS) {
            float v;
            if (n % T < shift) continue;
            v = a[(size_t)n * C + ch];
            if (b) v *= b[(size_t)(n - shift) * C + ch];
            if (scale) v *= scale[n];
            s += v;
        }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y != 0 || ch >= C) return;
    for (i = 1; i < SMC__ENGRAM_COL_ROWS; i++) s += part[i][threadIdx.x];
    atomicAdd(&out[(size_t)ch * out_stride + tap], s);
}

static void smc__engram_colsum(smc_ctx *c, float *out, int out_stride, const float *a,
                               const float *b, const float *scale, int N, int C, int T, int dil,
                               int taps) {
    dim3 block(32, SMC__ENGRAM_COL_ROWS), grid((unsigned)((C + 31) / 32), 1, (unsigned)taps);
    int want = 8 * (c->sm_count > 0 ? c->sm_count : 1), per = (int)(grid.x * grid.z);
    int parts = (want + per - 1) / per, chunk;
    if (!out || N <= 0 || C <= 0) return;
    if (parts > (N + 63) / 64) parts = (N + 63) / 64; /* at least 64 rows a block */
    if (parts > 65535) parts = 65535;
    if (parts < 1) parts = 1;
    chunk = (N + parts - 1) / parts;
    grid.y = (unsigned)((N + chunk - 1) / chunk);
    smc__engram_colsum_kernel<<<grid, block, 0, c->stream>>>(out, out_stride, a, b, scale, N, C,
                                                             T, dil, chunk);
}

/* dx += r (g - x r mean(g . x r)), g = dout * weight, one warp per row
 * (sm_rmsnorm_backward's input gradient). */
static __global__ void smc__engram_rmsnorm_back_kernel(float *dinp, const float *dout,
                                                       const float *inp, const float *weight,
                                                       const float *rstd, int N, int C) {
    int lane = threadIdx.x & 31, n = blockIdx.x * SMC__ENGRAM_ROWS + threadIdx.x / 32, k;
    size_t o = (size_t)n * C;
    float r, dot = 0.0f, mean_dot;
    if (n >= N) return;
    r = rstd[n];
    for (k = lane; k < C; k += 32) dot += dout[o + k] * weight[k] * inp[o + k] * r;
    mean_dot = smc__warp_sum(dot) / (float)C;
    for (k = lane; k < C; k += 32)
        dinp[o + k] += r * (dout[o + k] * weight[k] - inp[o + k] * r * mean_dot);
}

/* sm_rmsnorm_backward: dweight += sum_n dout x rstd, dinp += the row formula
 * (either may be NULL). */
static void smc__engram_rmsnorm_backward(smc_ctx *c, float *dinp, float *dweight,
                                         const float *dout, const float *inp, const float *weight,
                                         const float *rstd, int N, int C) {
    smc__engram_colsum(c, dweight, 1, dout, inp, rstd, N, C, N, 0, 1);
    if (dinp)
        smc__engram_rmsnorm_back_kernel<<<(unsigned)((N + SMC__ENGRAM_ROWS - 1) /
                                                     SMC__ENGRAM_ROWS),
                                          SMC__THREADS, 0, c->stream>>>(dinp, dout, inp, weight,
                                                                        rstd, N, C);
}

/* sm_linear_backward's weight gradients: dweight[OC, C] += dout^T inp,
 * dbias[OC] += the column sums of dout (either may be NULL). */
static void smc__engram_linear_weight_grads(smc_ctx *c, float *dweight, float *dbias,
                                            const float *dout, const float *inp, int N, int C,
                                            int OC) {
    if (dweight) smc_sgemm(c, 1, 0, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dweight, C);
    smc__engram_colsum(c, dbias, 1, dout, NULL, NULL, N, OC, N, 0, 1);
}

/* silu(x) = x sigmoid(x); silu'(x) = s (1 + x (1 - s)), s = sigmoid(x). */
static __device__ float smc__silu_grad(float x) {
    float s = sm_sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}

/* dconv = dout SiLU'(conv) (sm_silu_backward into a zeroed buffer). */
static __global__ void smc__engram_silu_back_kernel(float *dconv, const float *conv,
                                                    const float *dout, size_t total) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) dconv[i] = dout[i] * smc__silu_grad(conv[i]);
}

/* dv_n[b,t,ch] = sum_j w[ch,j] dconv[b, t + j*dil, ch] over taps inside the
 * sequence (sm__engram_conv_backward's dx, gather form: no races). */
static __global__ void smc__engram_conv_back_kernel(float *dv_n, const float *dconv,
                                                    const float *w, int T, int d, int dil,
                                                    size_t total) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int t, ch, j;
    float acc = 0.0f;
    if (i >= total) return;
    t = (int)((i / (size_t)d) % (size_t)T);
    ch = (int)(i % (size_t)d);
    for (j = 0; j < SM_ENGRAM_CONV_KERNEL && t + j * dil < T; j++)
        acc += w[ch * SM_ENGRAM_CONV_KERNEL + j] * dconv[i + (size_t)j * dil * d];
    dv_n[i] = acc;
}

/* One warp per position, from dv (v = alpha * value): dvalue = alpha dv and,
 * with dg = <dv, value> alpha (1 - alpha) s'(g), dquery_n = dg k_n / sqrt(d),
 * dkey_n = dg q_n / sqrt(d) (sm__engram_gate_backward). */
static __global__ void smc__engram_gate_back_kernel(sm_engram_scratch s, sm_engram_acts a, int N,
                                                    int d, float inv_sqrt_d, int signed_sqrt) {
    int lane = threadIdx.x & 31, n = blockIdx.x * SMC__ENGRAM_ROWS + threadIdx.x / 32, j;
    size_t o = (size_t)n * d;
    float al, dalpha = 0.0f, dg;
    if (n >= N) return;
    for (j = lane; j < d; j += 32) dalpha += s.dv[o + j] * a.value[o + j];
    dalpha = smc__warp_sum(dalpha);
    al = a.alpha[n];
    dg = dalpha * al * (1.0f - al) * sm__engram_squash_grad(a.gate[n], signed_sqrt);
    if (lane == 0) s.dgate[n] = dg;
    for (j = lane; j < d; j += 32) {
        s.dvalue[o + j] = al * s.dv[o + j];
        s.dquery_n[o + j] = dg * inv_sqrt_d * a.key_n[o + j];
        s.dkey_n[o + j] = dg * inv_sqrt_d * a.query_n[o + j];
    }
}

/* One block per order o: dgate_hot[o] += sum over the positions hot for o of
 * dL/dg (sm__engram_hot_gate_backward). */
static __global__ void smc__engram_hot_gate_back_kernel(float *dgate_hot, const float *dgate,
                                                        const unsigned char *hot, int N,
                                                        int n_orders) {
    int o = blockIdx.x, n;
    float s = 0.0f;
    for (n = threadIdx.x; n < N; n += blockDim.x)
        if (hot[(size_t)n * n_orders + o]) s += dgate[n];
    s = smc__block_sum(s);
    if (threadIdx.x == 0) dgate_hot[o] += s;
}

/* de[hot order blocks] = de_tier: the W_K^hot term replaces the W_K one there
 * (sm__engram_add_tier's two passes into a zeroed de). */
static __global__ void smc__engram_tier_select_kernel(float *de, const float *de_tier,
                                                      const unsigned char *hot,
                                                      smc__engram_shape sh, size_t total) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total && smc__engram_elem_hot(hot, sh, i)) de[i] = de_tier[i];
}

/* dtable[flat[n, slot] row] += de[n, slot block] (sm__engram_scatter). Rows hit
 * by several positions get atomic adds: equal to the CPU's ordered sum to
 * rounding. */
static __global__ void smc__engram_scatter_kernel(float *dtable, const float *de,
                                                  const uint32_t *flat, smc__engram_shape sh,
                                                  size_t total) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) atomicAdd(&dtable[smc__engram_table_at(flat, sh, i)], de[i]);
}

/* Backward of key = W_K e + b_K (per tier with hot_key_proj): de is
 * overwritten with the key path's part, the key weights accumulate
 * (sm__engram_key_backward). */
static void smc__engram_key_backward(smc_ctx *c, sm_engram_params *g,
                                     const unsigned char *hot, const sm_engram_params *p,
                                     const sm_engram_acts *a, const sm_engram_scratch *s,
                                     const sm_engram_config *cfg, int N) {
    smc__engram_shape sh = smc__engram_shape_of(cfg);
    int d = sh.d, dm = sh.d_mem, hkp = cfg->hot_key_proj;
    size_t ne = (size_t)N * dm;
    smc_sgemm(c, 0, 0, N, dm, d, 1.0f, s->dkey, d, p->w_key, dm, 0.0f, s->de, dm);
    smc__engram_linear_weight_grads(c, g->w_key, g->b_key, s->dkey, hkp ? a->e_cold : a->e, N,
                                    dm, d);
    if (!hkp) return;
    smc__engram_linear_weight_grads(c, g->w_key_hot, NULL, s->dkey, a->e_hot, N, dm, d);
    if (!hot) return; /* all cold: de is the W_K term everywhere */
    smc_sgemm(c, 0, 0, N, dm, d, 1.0f, s->dkey, d, p->w_key_hot, dm, 0.0f, s->de_tier, dm);
    smc__engram_tier_select_kernel<<<smc__blocks(ne), SMC__THREADS, 0, c->stream>>>(
        s->de, s->de_tier, hot, sh, ne);
}

SMDEF void smc_engram_backward_routed(smc_ctx *c, float *dh, sm_engram_params *g,
                                      smc_row_set *rows, const float *dout, const float *h,
                                      const uint32_t *flat, const unsigned char *hot,
                                      const sm_engram_params *p, const sm_engram_acts *acts,
                                      const sm_engram_scratch *s, const sm_engram_config *cfg,
                                      int B, int T) {
    smc__engram_shape sh = smc__engram_shape_of(cfg);
    int N = B * T, d = sh.d, dm = sh.d_mem, dil = cfg->hash.orders[sh.n_orders - 1];
    size_t nd = (size_t)N * d, ne = (size_t)N * dm;
    if (N <= 0) return;
    /* out = v + SiLU(conv(RMSNorm_v(v))) */
    smc__engram_silu_back_kernel<<<smc__blocks(nd), SMC__THREADS, 0, c->stream>>>(
        s->dconv, acts->conv, dout, nd);
    smc__engram_conv_back_kernel<<<smc__blocks(nd), SMC__THREADS, 0, c->stream>>>(
        s->dv_n, s->dconv, p->conv, T, d, dil, nd);
    smc__engram_colsum(c, g->conv, SM_ENGRAM_CONV_KERNEL, s->dconv, acts->v_n, NULL, N, d, T,
                       dil, SM_ENGRAM_CONV_KERNEL);
    cudaMemcpyAsync(s->dv, dout, nd * sizeof(float), cudaMemcpyDeviceToDevice, c->stream);
    smc__engram_rmsnorm_backward(c, s->dv, g->norm_value, s->dv_n, acts->v, p->norm_value,
                                 acts->rstd_v, N, d);
    /* v = alpha * value, alpha from the gate */
    smc__engram_gate_back_kernel<<<(unsigned)((N + SMC__ENGRAM_ROWS - 1) / SMC__ENGRAM_ROWS),
                                   SMC__THREADS, 0, c->stream>>>(*s, *acts, N, d,
                                                                 1.0f / sqrtf((float)d),
                                                                 cfg->signed_sqrt_gate);
    if (cfg->hot_gate && hot) /* without hot flags every position is cold: nothing to add */
        smc__engram_hot_gate_back_kernel<<<(unsigned)sh.n_orders, SMC__THREADS, 0, c->stream>>>(
            g->gate_hot, s->dgate, hot, N, sh.n_orders);
    smc__engram_rmsnorm_backward(c, dh, g->norm_query, s->dquery_n, h, p->norm_query,
                                 acts->rstd_query, N, d);
    smc_zero(c, s->dkey, nd * sizeof(float));
    smc__engram_rmsnorm_backward(c, s->dkey, g->norm_key, s->dkey_n, acts->key, p->norm_key,
                                 acts->rstd_key, N, d);
    /* key = W_K e + b_K, value = W_V e, e = gathered table rows */
    smc__engram_key_backward(c, g, hot, p, acts, s, cfg, N);
    smc_sgemm(c, 0, 0, N, dm, d, 1.0f, s->dvalue, d, p->w_value, dm, 1.0f, s->de, dm);
    smc__engram_linear_weight_grads(c, g->w_value, NULL, s->dvalue, acts->e, N, dm, d);
    smc__engram_scatter_kernel<<<smc__blocks(ne), SMC__THREADS, 0, c->stream>>>(g->table, s->de,
                                                                               flat, sh, ne);
    if (rows) smc_row_set_add(c, rows, flat, (size_t)N * sh.n_slots);
}

SMDEF void smc_engram_backward(smc_ctx *c, float *dh, sm_engram_params *g,
                               smc_row_set *rows, const float *dout, const float *h,
                               const uint32_t *flat, const sm_engram_params *p,
                               const sm_engram_acts *acts, const sm_engram_scratch *scratch,
                               const sm_engram_config *cfg, int B, int T) {
    smc_engram_backward_routed(c, dh, g, rows, dout, h, flat, NULL, p, acts, scratch, cfg, B, T);
}

/* ---- >>peer  PEER --------------------------------------------------- */

#define SMC__PEER_FULL 0xffffffffu
#define SMC__PEER_NO_ID 0x7fffffff /* id of an empty top-k entry: below every real one */
#define SMC__PEER_CHUNK SMC__THREADS /* slots whose coefficients a block stages at once */
#define SMC__PEER_GAIN_ROWS 128      /* positions per block of the gain gradient */

/* a . b over n values by one warp (every lane gets the result). */
static __device__ float smc__peer_warp_dot(const float *a, const float *b, int n) {
    float s = 0.0f;
    int i;
    for (i = threadIdx.x & 31; i < n; i += 32) s += a[i] * b[i];
    return smc__warp_sum(s);
}

/* The row of the calling warp in a launch of a warp per row. */
static __device__ size_t smc__peer_warp_row(void) {
    return ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
}

static unsigned smc__peer_warp_blocks(size_t rows) { return smc__blocks(rows * 32); }

/* ---- warp top-k ----
 * A warp keeps a sorted list of the k best (score, id) pairs seen: lane
 * r < k holds the r-th best. Empty entries are (-inf, SMC__PEER_NO_ID),
 * below any real pair, so the list is always k long. */

/* (s, id) ranks above (t, jd): higher score, ties to the lower id
 * (sm__topk_better). */
static __device__ bool smc__peer_better(float s, int id, float t, int jd) {
    return s > t || (s == t && id < jd);
}

/* Offers (v, vid), the same on every lane: the entries ranked above it are
 * a prefix of pos lanes; the lanes from pos on shift down one, and the
 * candidate takes lane pos (no change when pos == k). */
static __device__ void smc__peer_warp_push(float *val, int *id, float v, int vid, int k) {
    unsigned kmask = k == 32 ? SMC__PEER_FULL : (1u << k) - 1u;
    int lane = threadIdx.x & 31;
    int pos = __popc(__ballot_sync(SMC__PEER_FULL, smc__peer_better(*val, *id, v, vid)) & kmask);
    float up_val = __shfl_up_sync(SMC__PEER_FULL, *val, 1);
    int up_id = __shfl_up_sync(SMC__PEER_FULL, *id, 1);
    if (lane == pos) {
        *val = v;
        *id = vid;
    } else if (lane > pos) {
        *val = up_val;
        *id = up_id;
    }
}

/* Offers the lanes of `mask` (warp-uniform), lowest lane first, each lane
 * l with its own (v, vid). */
static __device__ void smc__peer_warp_push_lanes(float *val, int *id, unsigned mask, float v,
                                                 int vid, int k) {
    while (mask) {
        int l = __ffs(mask) - 1;
        mask &= mask - 1;
        smc__peer_warp_push(val, id, __shfl_sync(SMC__PEER_FULL, v, l),
                            __shfl_sync(SMC__PEER_FULL, vid, l), k);
    }
}

/* sm_topk of scores[0..n) by one warp, 32 scores at a time: only those
 * ranked above the current k-th are offered. */
static __device__ void smc__peer_warp_topk(const float *scores, int n, int k, float *val,
                                           int *id) {
    int lane = threadIdx.x & 31, base;
    *val = -INFINITY;
    *id = SMC__PEER_NO_ID;
    for (base = 0; base < n; base += 32) {
        int i = base + lane;
        float v = i < n ? scores[i] : -INFINITY;
        float kth = __shfl_sync(SMC__PEER_FULL, *val, k - 1);
        int kth_id = __shfl_sync(SMC__PEER_FULL, *id, k - 1);
        unsigned mask = __ballot_sync(SMC__PEER_FULL, i < n && smc__peer_better(v, i, kth, kth_id));
        smc__peer_warp_push_lanes(val, id, mask, v, i, k);
    }
}

/* sm_peer_product_topk by one warp: the k x k candidate sums a row (one
 * first-half entry a) at a time, lane c holding (a, c). As on the CPU, rows
 * stop when a row's best sum is below the k-th (every later sum is no
 * larger); both exactly give the top-k of all k^2 sums. */
static __device__ void smc__peer_warp_product_topk(const float *s1, const float *s2, int n_sub,
                                                   int k, float *val, int *id) {
    int lane = threadIdx.x & 31, i1, i2, a;
    float v1, v2;
    smc__peer_warp_topk(s1, n_sub, k, &v1, &i1);
    smc__peer_warp_topk(s2, n_sub, k, &v2, &i2);
    *val = -INFINITY;
    *id = SMC__PEER_NO_ID;
    for (a = 0; a < k; a++) {
        float sum = __shfl_sync(SMC__PEER_FULL, v1, a) + v2;
        int ia = __shfl_sync(SMC__PEER_FULL, i1, a);
        int sid = lane < k ? ia * n_sub + i2 : SMC__PEER_NO_ID;
        float kth = __shfl_sync(SMC__PEER_FULL, *val, k - 1);
        int kth_id = __shfl_sync(SMC__PEER_FULL, *id, k - 1);
        unsigned mask;
        if (__shfl_sync(SMC__PEER_FULL, sum, 0) < kth) break;
        mask = __ballot_sync(SMC__PEER_FULL, lane < k && smc__peer_better(sum, sid, kth, kth_id));
        smc__peer_warp_push_lanes(val, id, mask, sum, sid, k);
    }
}

/* Lane r < k holds score r, lane 0 the largest: returns its softmax weight
 * (sm__peer_softmax). */
static __device__ float smc__peer_warp_softmax(float score, int k) {
    float top = __shfl_sync(SMC__PEER_FULL, score, 0);
    float e = (threadIdx.x & 31) < (unsigned)k ? expf(score - top) : 0.0f;
    return e / smc__warp_sum(e);
}

/* A warp per row: the product-key top-k of s1, s2 [rows, n_sub] into
 * expert[row*stride + r] and out[row*stride + r], the score or (softmax)
 * its softmax weight. */
static __global__ void smc__peer_route_kernel(const float *s1, const float *s2, int rows,
                                              int n_sub, int k, int32_t *expert, float *out,
                                              int stride, int softmax) {
    size_t row = smc__peer_warp_row(), o = row * (size_t)stride;
    int lane = threadIdx.x & 31, id;
    float val;
    if (row >= (size_t)rows) return;
    smc__peer_warp_product_topk(s1 + row * n_sub, s2 + row * n_sub, n_sub, k, &val, &id);
    if (softmax) val = smc__peer_warp_softmax(val, k);
    if (lane < k) {
        expert[o + lane] = id;
        out[o + lane] = val;
    }
}

static __global__ void smc__peer_topk_kernel(const float *scores, int rows, int n, int k,
                                             int *idx, float *val) {
    size_t row = smc__peer_warp_row();
    int lane = threadIdx.x & 31, id;
    float v;
    if (row >= (size_t)rows) return;
    smc__peer_warp_topk(scores + row * n, n, k, &v, &id);
    if (lane < k) {
        idx[row * k + lane] = id;
        val[row * k + lane] = v;
    }
}

SMDEF void smc_topk(smc_ctx *c, const float *scores, int n, int k, int *idx, float *val,
                    int rows) {
    SM_ASSERT(k >= 1 && k <= n && k <= SM_TOPK_MAX);
    if (rows < 1) return;
    smc__peer_topk_kernel<<<smc__peer_warp_blocks((size_t)rows), SMC__THREADS, 0, c->stream>>>(
        scores, rows, n, k, idx, val);
}

SMDEF void smc_peer_product_topk(smc_ctx *c, const float *s1, const float *s2, int n_sub, int k,
                                 int32_t *expert, float *score, int rows) {
    SM_ASSERT(k >= 1 && k <= n_sub && k <= SM_TOPK_MAX);
    if (rows < 1) return;
    smc__peer_route_kernel<<<smc__peer_warp_blocks((size_t)rows), SMC__THREADS, 0, c->stream>>>(
        s1, s2, rows, n_sub, k, expert, score, k, 0);
}

/* ---- activations ---- */

/* sm_peer_acts_init's buffers on the device, and the sub-key scores of
 * one head (smc__peer_route_head), which the CPU keeps per thread. */
SMDEF sm_status smc_peer_acts_init(sm_peer_acts *a, const sm_peer_config *cfg, int d_model,
                                   int max_n, sm_error *err) {
    sm_status st = sm__peer_acts_init_with(a, cfg, d_model, max_n, smc_malloc, smc_dfree, err);
    if (st != SM_OK) return st;
    a->sub_scores = (float *)smc_malloc(2 * (size_t)max_n * (size_t)cfg->n_sub * sizeof(float),
                                        "peer sub-key scores", err);
    if (!a->sub_scores) {
        sm__peer_acts_release(a, smc_dfree);
        return SM_ERR_OOM;
    }
    return SM_OK;
}

SMDEF void smc_peer_acts_free(sm_peer_acts *a) { sm__peer_acts_release(a, smc_dfree); }

/* ---- query normalisation ---- */

/* sm__peer_norm_forward, a warp per row n = (position, head) of d_key
 * values, with the CPU's double sums: q = (r - mu) rstd gain, mu = mean(r)
 * (LayerNorm) or 0, rstd = 1/sqrt(mean((r - mu)^2) + eps). */
static __global__ void smc__peer_norm_forward_kernel(sm_peer_acts a, const float *gain,
                                                     int rows) {
    size_t n = smc__peer_warp_row();
    int d = a.cfg.d_key, lane = threadIdx.x & 31, i;
    const float *r, *g;
    double mu = 0.0, ss = 0.0;
    float m, rs;
    if (n >= (size_t)rows) return;
    r = a.q_raw + n * d;
    g = gain + (size_t)(n % a.cfg.heads) * d;
    if (a.cfg.query_norm == SM_PEER_NORM_LAYER) {
        for (i = lane; i < d; i += 32) mu += r[i];
        mu = smc__warp_sum(mu) / d;
    }
    m = (float)mu;
    for (i = lane; i < d; i += 32) ss += (double)(r[i] - m) * (r[i] - m);
    ss = smc__warp_sum(ss);
    rs = (float)(1.0 / sqrt(ss / d + SM_PEER_NORM_EPS));
    for (i = lane; i < d; i += 32) a.q[n * d + i] = (r[i] - m) * rs * g[i];
    if (lane == 0) {
        a.q_rstd[n] = rs;
        a.q_mean[n] = m;
    }
}

/* sm__peer_norm_backward, a warp per row, dq -> d(q_raw) in place: with
 * xh = (r - mu) rstd and g = dq gain, dr = rstd (g - xh mean(g xh)
 * - [LayerNorm] mean(g)). */
static __global__ void smc__peer_norm_backward_kernel(sm_peer_acts a, const float *gain,
                                                      int rows) {
    size_t n = smc__peer_warp_row();
    int d = a.cfg.d_key, lane = threadIdx.x & 31, i;
    const float *r, *gn;
    float *dq, rstd, mean, mgx, mg;
    double gx = 0.0, gm = 0.0;
    if (n >= (size_t)rows) return;
    r = a.q_raw + n * d;
    gn = gain + (size_t)(n % a.cfg.heads) * d;
    dq = a.dq + n * d;
    rstd = a.q_rstd[n];
    mean = a.q_mean[n];
    for (i = lane; i < d; i += 32) {
        double g = (double)dq[i] * gn[i];
        gx += g * (r[i] - mean) * rstd;
        gm += g;
    }
    gx = smc__warp_sum(gx);
    gm = smc__warp_sum(gm);
    mgx = (float)(gx / d);
    mg = a.cfg.query_norm == SM_PEER_NORM_LAYER ? (float)(gm / d) : 0.0f;
    for (i = lane; i < d; i += 32) {
        float xh = (r[i] - mean) * rstd;
        dq[i] = rstd * (dq[i] * gn[i] - xh * mgx - mg);
    }
}

/* dgain[col] += sum_t dq[t, col] (q_raw - mean) rstd over positions t,
 * col = head*d_key + i of the [N, h*d_key] matrices: a block of 32
 * columns sums SMC__PEER_GAIN_ROWS positions (blockDim.y lanes of rows,
 * then a shared-memory sum), one atomicAdd per column and block. */
static __global__ void smc__peer_gain_backward_kernel(float *dgain, sm_peer_acts a, int N) {
    __shared__ float part[SMC__THREADS / 32][32];
    int d = a.cfg.d_key, hk = a.cfg.heads * d, col = blockIdx.x * 32 + threadIdx.x;
    int t0 = blockIdx.y * SMC__PEER_GAIN_ROWS, end = min(N, t0 + SMC__PEER_GAIN_ROWS), t;
    float sum = 0.0f;
    if (col < hk)
        for (t = t0 + threadIdx.y; t < end; t += blockDim.y) {
            size_t n = (size_t)t * a.cfg.heads + col / d, o = (size_t)t * hk + col;
            sum += a.dq[o] * (a.q_raw[o] - a.q_mean[n]) * a.q_rstd[n];
        }
    part[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y != 0 || col >= hk) return;
    for (t = 1; t < (int)blockDim.y; t++) sum += part[t][threadIdx.x];
    atomicAdd(dgain + col, sum);
}

static void smc__peer_query_forward(smc_ctx *c, sm_peer_acts *a, const float *x,
                                    const sm_peer_params *p, int N) {
    int D = a->d_model, hk = a->cfg.heads * a->cfg.d_key, rows = N * a->cfg.heads;
    smc_sgemm(c, 0, 1, N, hk, D, 1.0f, x, D, p->w_q, D, 0.0f, a->q_raw, hk);
    smc__peer_norm_forward_kernel<<<smc__peer_warp_blocks((size_t)rows), SMC__THREADS, 0,
                                    c->stream>>>(*a, p->q_gain, rows);
}

/* sm__peer_query_backward: dq -> gain gradient, then dq -> d(W_q x) in
 * place, then the linear layer's dx and dW_q (sm_linear_backward). */
static void smc__peer_query_backward(smc_ctx *c, float *dx, sm_peer_params *g,
                                     sm_peer_acts *a, const float *x, const sm_peer_params *p,
                                     int N) {
    int D = a->d_model, hk = a->cfg.heads * a->cfg.d_key, rows = N * a->cfg.heads;
    if (g->q_gain) {
        dim3 grid((unsigned)(hk + 31) / 32, (unsigned)(N + SMC__PEER_GAIN_ROWS - 1) /
                                                SMC__PEER_GAIN_ROWS);
        smc__peer_gain_backward_kernel<<<grid, dim3(32, SMC__THREADS / 32), 0, c->stream>>>(
            g->q_gain, *a, N);
    }
    if (!dx && !g->w_q) return;
    smc__peer_norm_backward_kernel<<<smc__peer_warp_blocks((size_t)rows), SMC__THREADS, 0,
                                     c->stream>>>(*a, p->q_gain, rows);
    if (dx) smc_sgemm(c, 0, 0, N, D, hk, 1.0f, a->dq, hk, p->w_q, D, 1.0f, dx, D);
    if (g->w_q) smc_sgemm(c, 1, 0, hk, D, N, 1.0f, a->dq, hk, x, D, 1.0f, g->w_q, D);
}

/* ---- forward ---- */

/* The routing of head j (sm_peer_route's, which the CPU runs per block
 * of positions): its half-scores of every sub-key for all positions (two
 * GEMMs into sub_scores, [N, s] then [N, s]), then a warp per position for
 * the product-key top-k and the softmax weights of its slots (t, j, r). */
static void smc__peer_route_head(smc_ctx *c, sm_peer_acts *a, const sm_peer_params *p, int j,
                                 int N) {
    const sm_peer_config *cf = &a->cfg;
    int s = cf->n_sub, half = cf->d_key / 2, k = cf->topk, ld = cf->heads * cf->d_key;
    size_t key_off = sm__peer_key_row(cf, j, 0);
    const float *qj = a->q + (size_t)j * cf->d_key;
    float *s1 = a->sub_scores, *s2 = a->sub_scores + (size_t)N * s;
    smc_sgemm(c, 0, 1, N, s, half, 1.0f, qj, ld, p->keys1 + key_off, half, 0.0f, s1, s);
    smc_sgemm(c, 0, 1, N, s, half, 1.0f, qj + half, ld, p->keys2 + key_off, half, 0.0f, s2, s);
    smc__peer_route_kernel<<<smc__peer_warp_blocks((size_t)N), SMC__THREADS, 0, c->stream>>>(
        s1, s2, N, s, k, a->expert + (size_t)j * k, a->weight + (size_t)j * k, cf->heads * k, 1);
}

/* sm__peer_experts_forward for position t = blockIdx.x, SMC__PEER_CHUNK
 * slots at a time: pre = u_i . x_t by a warp per slot, then a thread per
 * value adds w act(pre) v_i over the slots in slot order. */
static __global__ void smc__peer_experts_forward_kernel(float *out, sm_peer_acts a,
                                                        const float *x, const float *experts) {
    __shared__ float coef[SMC__PEER_CHUNK];
    __shared__ int32_t ids[SMC__PEER_CHUNK];
    int D = a.d_model, per = a.cfg.heads * a.cfg.topk, lane = threadIdx.x & 31;
    int warps = blockDim.x >> 5, c0, r, i;
    size_t t = blockIdx.x;
    const float *xt = x + t * D;
    float *ot = out + t * D;
    for (c0 = 0; c0 < per; c0 += SMC__PEER_CHUNK) {
        int n = min(per - c0, SMC__PEER_CHUNK);
        for (r = threadIdx.x >> 5; r < n; r += warps) {
            size_t slot = t * per + c0 + r;
            int32_t e = a.expert[slot];
            float pre = smc__peer_warp_dot(experts + (size_t)e * 2 * D, xt, D);
            if (lane == 0) {
                a.pre[slot] = pre;
                coef[r] = a.weight[slot] * sm__peer_act(a.cfg.activation, pre);
                ids[r] = e;
            }
        }
        __syncthreads();
        for (i = threadIdx.x; i < D; i += blockDim.x) {
            float acc = c0 == 0 ? 0.0f : ot[i];
            for (r = 0; r < n; r++) acc += coef[r] * experts[(size_t)ids[r] * 2 * D + D + i];
            ot[i] = acc;
        }
        __syncthreads();
    }
}

SMDEF sm_status smc_peer_forward(smc_ctx *c, float *out, sm_peer_acts *acts, const float *x,
                                 const sm_peer_params *p, int N, sm_error *err) {
    sm_status st = sm__peer_check_n(acts, N, err);
    int j;
    if (st != SM_OK) return st;
    smc__peer_query_forward(c, acts, x, p, N);
    for (j = 0; j < acts->cfg.heads; j++) smc__peer_route_head(c, acts, p, j, N);
    smc__peer_experts_forward_kernel<<<(unsigned)N, SMC__THREADS, 0, c->stream>>>(
        out, *acts, x, p->experts);
    return SM_OK;
}

/* ---- backward ---- */

/* Per slot of position t (a warp each), with a = act(pre), dv = dout_t . v_i:
 * dpre = w dv act'(pre), wact = w a, and dw = a dv kept in dscore for
 * smc__peer_softmax_backward. */
static __device__ void smc__peer_slot_grads(const sm_peer_acts *a, const float *dy,
                                            const float *experts, size_t base) {
    int D = a->d_model, per = a->cfg.heads * a->cfg.topk, r;
    for (r = threadIdx.x >> 5; r < per; r += blockDim.x >> 5) {
        size_t slot = base + r;
        float dv = smc__peer_warp_dot(dy, experts + (size_t)a->expert[slot] * 2 * D + D, D);
        if ((threadIdx.x & 31) == 0) {
            float w = a->weight[slot], pre = a->pre[slot];
            float act = sm__peer_act(a->cfg.activation, pre);
            a->dpre[slot] = w * dv * sm__peer_act_grad(a->cfg.activation, pre);
            a->wact[slot] = w * act;
            a->dscore[slot] = act * dv;
        }
    }
}

/* Per head of position t (a warp each, lane r = slot r): softmax backward
 * dscore_r = w_r (dw_r - sum_l w_l dw_l), dw read from dscore. */
static __device__ void smc__peer_softmax_backward(const sm_peer_acts *a, size_t base) {
    int k = a->cfg.topk, lane = threadIdx.x & 31, j;
    for (j = threadIdx.x >> 5; j < a->cfg.heads; j += blockDim.x >> 5) {
        size_t slot = base + (size_t)j * k + lane;
        float w = lane < k ? a->weight[slot] : 0.0f, dw = lane < k ? a->dscore[slot] : 0.0f;
        float wdw = smc__warp_sum(w * dw);
        if (lane < k) a->dscore[slot] = w * (dw - wdw);
    }
}

/* dx_t += sum over the slots of position t, in slot order, of dpre u_i. */
static __device__ void smc__peer_dx_from_experts(float *dxt, const sm_peer_acts *a,
                                                 const float *experts, size_t base) {
    int D = a->d_model, per = a->cfg.heads * a->cfg.topk, r, i;
    for (i = threadIdx.x; i < D; i += blockDim.x) {
        float acc = dxt[i];
        for (r = 0; r < per; r++)
            acc += a->dpre[base + r] * experts[(size_t)a->expert[base + r] * 2 * D + i];
        dxt[i] = acc;
    }
}

/* dq_t (overwritten) = per head j, sum_r dscore_r (K1[a_r], K2[b_r]) from
 * head j's key table (sm__peer_key_row) with expert e_r = a_r s + b_r:
 * score = q1 . K1[a] + q2 . K2[b]. */
static __device__ void smc__peer_dq_from_keys(float *dqt, const sm_peer_acts *a,
                                              const sm_peer_params *p, size_t base) {
    int d = a->cfg.d_key, half = d / 2, k = a->cfg.topk, s = a->cfg.n_sub, i, r;
    for (i = threadIdx.x; i < a->cfg.heads * d; i += blockDim.x) {
        int j = i / d, col = i % d;
        const float *keys = col < half ? p->keys1 : p->keys2;
        size_t slot = base + (size_t)j * k;
        float acc = 0.0f;
        for (r = 0; r < k; r++) {
            int e = a->expert[slot + r], sub = col < half ? e / s : e % s;
            acc += a->dscore[slot + r] * keys[sm__peer_key_row(&a->cfg, j, sub) + col % half];
        }
        dqt[i] = acc;
    }
}

/* sm__peer_slots_backward for position t = blockIdx.x: slot gradients,
 * then the softmax backward per head, then dx (when given) and dq, with
 * block barriers between the steps (each reads the previous one's
 * results from global memory). */
static __global__ void smc__peer_slots_backward_kernel(float *dx, sm_peer_acts a,
                                                       const float *dout, sm_peer_params p) {
    size_t t = blockIdx.x, base = t * a.cfg.heads * a.cfg.topk;
    smc__peer_slot_grads(&a, dout + t * a.d_model, p.experts, base);
    __syncthreads();
    smc__peer_softmax_backward(&a, base);
    __syncthreads();
    if (dx) smc__peer_dx_from_experts(dx + t * a.d_model, &a, p.experts, base);
    smc__peer_dq_from_keys(a.dq + t * a.cfg.heads * a.cfg.d_key, &a, &p, base);
}

/* sm__peer_keys_backward: dK1[a] += dscore q1, dK2[b] += dscore q2 in the
 * table of the slot's head, a thread per (slot, query value); atomics,
 * since a sub-key serves many slots (of every head, when shared). */
static __global__ void smc__peer_keys_backward_kernel(float *gk1, float *gk2, sm_peer_acts a,
                                                      size_t n) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x, slot, row;
    int d = a.cfg.d_key, half = d / 2, s = a.cfg.n_sub, col, j, e;
    float g;
    if (idx >= n) return;
    slot = idx / d;
    row = slot / a.cfg.topk; /* (position, head) = t*h + j */
    col = (int)(idx % d);
    j = (int)(row % a.cfg.heads);
    e = a.expert[slot];
    g = a.dscore[slot] * a.q[row * d + col];
    if (col < half) {
        if (gk1) atomicAdd(gk1 + sm__peer_key_row(&a.cfg, j, e / s) + col, g);
    } else if (gk2) {
        atomicAdd(gk2 + sm__peer_key_row(&a.cfg, j, e % s) + col - half, g);
    }
}

/* sm__peer_experts_backward for position t = blockIdx.x: du_i += dpre x_t,
 * dv_i += wact dout_t for each of its slots, a thread per value; atomics,
 * since a row may be retrieved at several positions. */
static __global__ void smc__peer_experts_backward_kernel(float *dexperts, sm_peer_acts a,
                                                         const float *x, const float *dout) {
    int D = a.d_model, per = a.cfg.heads * a.cfg.topk, r, i;
    size_t t = blockIdx.x, base = t * per;
    for (i = threadIdx.x; i < D; i += blockDim.x) {
        float xi = x[t * D + i], gi = dout[t * D + i];
        for (r = 0; r < per; r++) {
            float *row = dexperts + (size_t)a.expert[base + r] * 2 * D;
            atomicAdd(row + i, a.dpre[base + r] * xi);
            atomicAdd(row + D + i, a.wact[base + r] * gi);
        }
    }
}

SMDEF sm_status smc_peer_backward(smc_ctx *c, float *dx, sm_peer_params *g,
                                  smc_row_set *touched, const float *dout, const float *x,
                                  const sm_peer_params *p, sm_peer_acts *acts, int N,
                                  sm_error *err) {
    sm_status st = sm__peer_check_n(acts, N, err);
    size_t n_slots = (size_t)N * acts->cfg.heads * acts->cfg.topk;
    if (st != SM_OK) return st;
    smc__peer_slots_backward_kernel<<<(unsigned)N, SMC__THREADS, 0, c->stream>>>(dx, *acts,
                                                                                  dout, *p);
    if (g->keys1 || g->keys2) {
        size_t n = n_slots * acts->cfg.d_key;
        smc__peer_keys_backward_kernel<<<smc__blocks(n), SMC__THREADS, 0, c->stream>>>(
            g->keys1, g->keys2, *acts, n);
    }
    smc__peer_query_backward(c, dx, g, acts, x, p, N);
    if (!g->experts) return SM_OK;
    smc__peer_experts_backward_kernel<<<(unsigned)N, SMC__THREADS, 0, c->stream>>>(
        g->experts, *acts, x, dout);
    if (touched) smc_row_set_add(c, touched, (const uint32_t *)acts->expert, n_slots);
    return SM_OK;
}

/* ---- usage statistics ---- */

SMDEF sm_status smc_peer_usage_init(sm_peer_usage *u, size_t n_experts, sm_error *err) {
    memset(u, 0, sizeof *u);
    if (n_experts == 0) return sm_fail(err, SM_ERR_INVALID_ARG, "peer usage: n_experts is 0");
    u->counts = (uint64_t *)smc_malloc(n_experts * sizeof(uint64_t), "peer usage counts", err);
    if (!u->counts) return SM_ERR_OOM;
    u->n_experts = n_experts;
    return SM_OK;
}

static __global__ void smc__peer_usage_add_kernel(unsigned long long *counts, size_t n_experts,
                                                  const int32_t *experts, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && experts[i] >= 0 && (size_t)experts[i] < n_experts)
        atomicAdd(counts + experts[i], 1ull);
}

SMDEF void smc_peer_usage_add(smc_ctx *c, sm_peer_usage *u, const int32_t *experts, size_t n) {
    if (n == 0) return;
    smc__peer_usage_add_kernel<<<smc__blocks(n), SMC__THREADS, 0, c->stream>>>(
        (unsigned long long *)u->counts, u->n_experts, experts, n);
    u->total += n;
}

SMDEF void smc_peer_usage_reset(smc_ctx *c, sm_peer_usage *u) {
    smc_zero(c, u->counts, u->n_experts * sizeof(uint64_t));
    u->total = 0;
}

SMDEF sm_status smc_peer_usage_download(smc_ctx *c, sm_peer_usage *host,
                                        const sm_peer_usage *u, sm_error *err) {
    sm_status st;
    if (host->n_experts != u->n_experts)
        return sm_fail(err, SM_ERR_INVALID_ARG, "peer usage: host has %zu experts, device %zu",
                       host->n_experts, u->n_experts);
    if ((st = smc_sync(c, "peer usage", err)) != SM_OK) return st;
    if ((st = smc_download(host->counts, u->counts, u->n_experts * sizeof(uint64_t), err)) !=
        SM_OK)
        return st;
    host->total = u->total;
    return SM_OK;
}

SMDEF void smc_peer_usage_free(sm_peer_usage *u) {
    smc_dfree(u->counts);
    memset(u, 0, sizeof *u);
}

/* ---- >>mhc  mHC ----------------------------------------------------- */

#define SMC__MHC_MAX_K (2 * SM_SINKHORN_MAX_N + SM_SINKHORN_MAX_N * SM_SINKHORN_MAX_N)

/* Shapes every mHC kernel needs: tokens, streams, channels, maps per token. */
typedef struct smc__mhc_dims {
    int N, n, C, K;
} smc__mhc_dims;

static smc__mhc_dims smc__mhc_dims_of(int N, int n, int C) {
    smc__mhc_dims d;
    d.N = N;
    d.n = n;
    d.C = C;
    d.K = sm_mhc_map_count(n);
    return d;
}

/* ---- map arguments and Sinkhorn, one thread per matrix ---- */

/* Where map arguments come from (sm__mhc_map_args): arg[e] = a z[e] + b[e]
 * (dynamic maps), b[e] (static: z == NULL), or z[e] (b == NULL: plain
 * Sinkhorn logits). */
typedef struct smc__mhc_src {
    const float *z, *b;
    float a;
} smc__mhc_src;

static __device__ float smc__mhc_arg(smc__mhc_src s, int e) {
    if (!s.z) return s.b[e];
    if (!s.b) return s.z[e];
    /* rounded apart, like the CPU, so a recomputed argument is the same */
    return __fadd_rn(__fmul_rn(s.a, s.z[e]), s.b[e]);
}

/* Token t's arguments from map offset off on, scaled by gate g. */
static __device__ smc__mhc_src smc__mhc_src_at(const float *z, const float *gate,
                                               const float *bias, smc__mhc_dims d, int t,
                                               int off, int g) {
    smc__mhc_src s;
    s.z = z ? z + (size_t)t * d.K + off : NULL;
    s.b = bias + off;
    s.a = z ? gate[g] : 0.0f;
    return s;
}

/* sm__mhc_gate_of. */
static __device__ int smc__mhc_gate_of(int k, int n) {
    return k < n ? SM_MHC_GATE_PRE : k < 2 * n ? SM_MHC_GATE_POST : SM_MHC_GATE_RES;
}

/* The logits of one matrix into L (n*n), so the shared Sinkhorn steps of
 * sparsemem.h read them as the CPU does. */
static __device__ void smc__sk_logits(float *L, smc__mhc_src src, int n) {
    int e;
    for (e = 0; e < n * n; e++) L[e] = smc__mhc_arg(src, e);
}

/* Floats of per-thread scratch: the logits, K, u, v, lam for the forward;
 * the logits, dL, K, dK, alpha, beta, w and the tape (every u_t, v_t, lam
 * and a byte per round) for the backward. */
static int smc__sk_forward_floats(int n) { return 2 * n * n + 3 * n; }
static int smc__sk_backward_floats(int n, int iters) {
    return 4 * n * n + 3 * n + n * (3 * iters + 1) + (iters + 3) / 4;
}

/* sm_sinkhorn_forward of one matrix (sm__sinkhorn_forward_lanes, one lane). w holds
 * smc__sk_forward_floats(n) floats; out may alias the logits. */
static __device__ void smc__sk_forward(float *out, smc__mhc_src src, float *w, int n, int iters) {
    float *L = w, *K = L + n * n, *u = K + n * n, *v = u + n, *lam = v + n;
    smc__sk_logits(L, src, n);
    sm__sinkhorn_forward_lanes(out, K, u, v, lam, L, n, iters, 1);
}

/* sm_sinkhorn_backward of one matrix (sm__sinkhorn_backward_lanes, one lane). w
 * holds smc__sk_backward_floats(n, iters) floats. Returns the n*n gradient
 * of the logits (inside w). dout is read before anything is written to
 * memory outside w, so the caller may store over it. */
static __device__ const float *smc__sk_backward(float *w, const float *dout, smc__mhc_src src,
                                                int n, int iters) {
    float *L = w, *dL = L + n * n;
    sm__sinkhorn_work wk;
    wk.K = dL + n * n, wk.dK = wk.K + n * n, wk.alpha = wk.dK + n * n;
    wk.beta = wk.alpha + n, wk.w = wk.beta + n;
    wk.tape.u = wk.w + n, wk.tape.v = wk.tape.u + (size_t)iters * n;
    wk.tape.lam = wk.tape.v + (size_t)(iters + 1) * n;
    wk.tape.fresh = (unsigned char *)(wk.tape.lam + (size_t)iters * n);
    smc__sk_logits(L, src, n);
    sm__sinkhorn_backward_lanes(dL, &wk, dout, L, n, iters, 1);
    return dL;
}

/* Thread-per-matrix launches: each thread owns `floats` of dynamic shared
 * memory at an odd stride (so the 32 threads of a warp touch 32 different
 * banks), with as many threads per block as fit in the default 48 KiB
 * (whole warps from 32 on, at most 128). */
#define SMC__SK_SHMEM_BYTES (48 * 1024)
#define SMC__SK_MAX_THREADS 128

typedef struct smc__sk_plan {
    unsigned blocks, threads;
    size_t shmem;
    int stride;
} smc__sk_plan;

static smc__sk_plan smc__sk_plan_for(int count, int floats) {
    smc__sk_plan p;
    int fit;
    p.stride = floats | 1;
    fit = SMC__SK_SHMEM_BYTES / (p.stride * (int)sizeof(float));
    fit = fit < SMC__SK_MAX_THREADS ? fit : SMC__SK_MAX_THREADS;
    if (fit >= 32) fit -= fit % 32;
    p.threads = (unsigned)(fit > 1 ? fit : 1);
    p.blocks = (unsigned)(((size_t)count + p.threads - 1) / p.threads);
    p.shmem = (size_t)p.threads * p.stride * sizeof(float);
    return p;
}

static __device__ float *smc__sk_scratch(int stride) {
    extern __shared__ float smc__mhc_shm[];
    return smc__mhc_shm + (size_t)threadIdx.x * stride;
}

static __device__ smc__mhc_src smc__sk_plain(const float *logits) {
    smc__mhc_src s;
    s.z = logits;
    s.b = NULL;
    s.a = 0.0f;
    return s;
}

static __global__ void smc__sk_forward_kernel(float *out, const float *logits, int count, int n,
                                              int iters, int stride) {
    size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x, nn = (size_t)n * n;
    if (k >= (size_t)count) return;
    smc__sk_forward(out + k * nn, smc__sk_plain(logits + k * nn), smc__sk_scratch(stride), n,
                    iters);
}

static __global__ void smc__sk_backward_kernel(float *dlogits, const float *dout,
                                               const float *logits, int count, int n, int iters,
                                               int stride) {
    size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x, nn = (size_t)n * n, e;
    const float *g;
    if (k >= (size_t)count) return;
    g = smc__sk_backward(smc__sk_scratch(stride), dout + k * nn, smc__sk_plain(logits + k * nn),
                         n, iters);
    for (e = 0; e < nn; e++) dlogits[k * nn + e] += g[e];
}

SMDEF void smc_sinkhorn_forward_batched(smc_ctx *c, float *out, const float *logits, int count,
                                        int n, int iters) {
    smc__sk_plan p;
    if (count <= 0) return;
    p = smc__sk_plan_for(count, smc__sk_forward_floats(n));
    smc__sk_forward_kernel<<<p.blocks, p.threads, p.shmem, c->stream>>>(out, logits, count, n,
                                                                         iters, p.stride);
}

SMDEF void smc_sinkhorn_backward_batched(smc_ctx *c, float *dlogits, const float *dout,
                                         const float *logits, int count, int n, int iters) {
    smc__sk_plan p;
    if (count <= 0) return;
    p = smc__sk_plan_for(count, smc__sk_backward_floats(n, iters));
    smc__sk_backward_kernel<<<p.blocks, p.threads, p.shmem, c->stream>>>(
        dlogits, dout, logits, count, n, iters, p.stride);
}

/* ---- per-token maps ---- */

/* sm__mhc_maps_forward for token t: H_pre = sigmoid, H_post = 2 sigmoid,
 * H_res = Sinkhorn of the arguments (z, gate NULL in the static variant). */
static __global__ void smc__mhc_maps_forward_kernel(float *maps, const float *z,
                                                    const float *gate, const float *bias,
                                                    smc__mhc_dims d, int iters, int stride) {
    int t = blockIdx.x * blockDim.x + threadIdx.x, n = d.n, i;
    float *h;
    smc__mhc_src pre, post;
    if (t >= d.N) return;
    h = maps + (size_t)t * d.K;
    pre = smc__mhc_src_at(z, gate, bias, d, t, 0, SM_MHC_GATE_PRE);
    post = smc__mhc_src_at(z, gate, bias, d, t, n, SM_MHC_GATE_POST);
    for (i = 0; i < n; i++) {
        h[i] = sm_sigmoid(smc__mhc_arg(pre, i));
        h[n + i] = 2.0f * sm_sigmoid(smc__mhc_arg(post, i));
    }
    smc__sk_forward(h + 2 * n, smc__mhc_src_at(z, gate, bias, d, t, 2 * n, SM_MHC_GATE_RES),
                    smc__sk_scratch(stride), n, iters);
}

/* sm__mhc_maps_backward for token t, in place: dmaps holds dL/dmaps on
 * entry and dL/darg on exit. sigmoid' = h (1 - h); for h = 2 sigmoid,
 * dh/darg = h (1 - h/2). */
static __global__ void smc__mhc_maps_backward_kernel(float *dmaps, const float *maps,
                                                     const float *z, const float *gate,
                                                     const float *bias, smc__mhc_dims d,
                                                     int iters, int stride) {
    int t = blockIdx.x * blockDim.x + threadIdx.x, n = d.n, i;
    const float *h, *dres;
    float *g;
    if (t >= d.N) return;
    g = dmaps + (size_t)t * d.K;
    h = maps + (size_t)t * d.K;
    for (i = 0; i < n; i++) {
        g[i] *= h[i] * (1.0f - h[i]);
        g[n + i] *= h[n + i] * (1.0f - 0.5f * h[n + i]);
    }
    dres = smc__sk_backward(smc__sk_scratch(stride), g + 2 * n,
                            smc__mhc_src_at(z, gate, bias, d, t, 2 * n, SM_MHC_GATE_RES), n,
                            iters);
    for (i = 0; i < n * n; i++) g[2 * n + i] = dres[i];
}

/* ---- RMSNorm without gain over a token's n*C stream values ---- */

#define SMC__MHC_ROW_THREADS 256 /* one block per token (a multiple of 32) */

/* sm_rmsnorm_forward with weight NULL: out = x r, r = 1/sqrt(mean(x^2) + eps). */
static __global__ void smc__mhc_rmsnorm_forward_kernel(float *out, float *rstd, const float *inp,
                                                       int C) {
    const float *x = inp + (size_t)blockIdx.x * C;
    float *y = out + (size_t)blockIdx.x * C;
    float ss = 0.0f, r;
    int k;
    for (k = threadIdx.x; k < C; k += blockDim.x) ss += x[k] * x[k];
    ss = smc__block_sum(ss);
    r = (float)(1.0 / sqrt((double)ss / C + SM_RMSNORM_EPS));
    for (k = threadIdx.x; k < C; k += blockDim.x) y[k] = x[k] * r;
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

/* sm_rmsnorm_backward with weight NULL: dx += r (g - x r mean(g . x r)). */
static __global__ void smc__mhc_rmsnorm_backward_kernel(float *dinp, const float *dout,
                                                        const float *inp, const float *rstd,
                                                        int C) {
    const float *x = inp + (size_t)blockIdx.x * C, *g = dout + (size_t)blockIdx.x * C;
    float *dx = dinp + (size_t)blockIdx.x * C;
    float r = rstd[blockIdx.x], dot = 0.0f, mean_dot;
    int k;
    for (k = threadIdx.x; k < C; k += blockDim.x) dot += g[k] * x[k] * r;
    mean_dot = smc__block_sum(dot) / C;
    for (k = threadIdx.x; k < C; k += blockDim.x) dx[k] += r * (g[k] - x[k] * r * mean_dot);
}

/* ---- stream mixing, one thread per output value ---- */

/* out[t,:] = (accumulate ? out[t,:] : 0) + sum_i w_i x[t,i,:], times scale,
 * with w_i = maps[t K + moff + i], or 1 when maps is NULL. Serves H_pre x
 * (sm__mhc_pre_mix), dy += H_post^T dx_next, collapse and its transpose. */
static __global__ void smc__mhc_stream_sum_kernel(float *out, const float *x, const float *maps,
                                                  int moff, float scale, int accumulate,
                                                  smc__mhc_dims d) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x, t = e / d.C;
    const float *xt;
    float s;
    int i;
    if (e >= (size_t)d.N * d.C) return;
    xt = x + t * d.n * d.C + e % d.C;
    s = accumulate ? out[e] : 0.0f;
    for (i = 0; i < d.n; i++) s += (maps ? maps[t * d.K + moff + i] : 1.0f) * xt[(size_t)i * d.C];
    out[e] = s * scale;
}

/* out[t,i,:] (= or +=) w_i in[t,:], with w_i = maps[t K + i] (H_pre), or
 * scale when maps is NULL: expand, collapse backward, dx += H_pre du. */
static __global__ void smc__mhc_broadcast_kernel(float *out, const float *in, const float *maps,
                                                 float scale, int accumulate, smc__mhc_dims d) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x, nC = (size_t)d.n * d.C;
    size_t t = e / nC, i = e / d.C % d.n, c = e % d.C;
    float v;
    if (e >= (size_t)d.N * nC) return;
    v = (maps ? maps[t * d.K + i] : scale) * in[t * d.C + c];
    out[e] = accumulate ? out[e] + v : v;
}

/* out[t,i,:] = base + sum_j R_ij in[t,j,:] with R = H_res (transpose 0) or
 * H_res^T; base = H_post[i] y[t,:] when y is given (sm__mhc_post_mix), else
 * out[t,i,:] (the post backward's dx += H_res^T dx_next). Sums run over j in
 * the CPU's order. */
static __global__ void smc__mhc_res_mix_kernel(float *out, const float *in, const float *y,
                                               const float *maps, int transpose,
                                               smc__mhc_dims d) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x, nC = (size_t)d.n * d.C;
    size_t t = e / nC, c = e % d.C;
    int i = (int)(e / d.C % d.n), j;
    const float *h, *h_res, *in_t;
    float s;
    if (e >= (size_t)d.N * nC) return;
    h = maps + t * d.K;
    h_res = h + 2 * d.n;
    in_t = in + t * nC + c;
    s = y ? h[d.n + i] * y[t * d.C + c] : out[e];
    for (j = 0; j < d.n; j++)
        s += (transpose ? h_res[j * d.n + i] : h_res[i * d.n + j]) * in_t[(size_t)j * d.C];
    out[e] = s;
}

/* out[t, i] += <rows[t,i,:], vec[t,:]> for every token t and stream i, out's
 * rows K apart: one batched GEMM [n, C] x [C, 1] per token. */
static void smc__mhc_stream_dots(smc_ctx *c, float *out, const float *rows, const float *vec,
                                 smc__mhc_dims d) {
    smc_sgemm_batched(c, 0, 0, d.n, 1, d.C, 1.0f, rows, d.C, (long long)d.n * d.C, vec, 1, d.C,
                      1.0f, out, 1, d.K, d.N);
}

static void smc__mhc_stream_sum(smc_ctx *c, float *out, const float *x, const float *maps,
                                int moff, float scale, int accumulate, smc__mhc_dims d) {
    size_t total = (size_t)d.N * d.C;
    if (total == 0) return;
    smc__mhc_stream_sum_kernel<<<smc__blocks(total), SMC__THREADS, 0, c->stream>>>(
        out, x, maps, moff, scale, accumulate, d);
}

static void smc__mhc_broadcast(smc_ctx *c, float *out, const float *in, const float *maps,
                               float scale, int accumulate, smc__mhc_dims d) {
    size_t total = (size_t)d.N * d.n * d.C;
    if (total == 0) return;
    smc__mhc_broadcast_kernel<<<smc__blocks(total), SMC__THREADS, 0, c->stream>>>(
        out, in, maps, scale, accumulate, d);
}

static void smc__mhc_res_mix(smc_ctx *c, float *out, const float *in, const float *y,
                             const float *maps, int transpose, smc__mhc_dims d) {
    size_t total = (size_t)d.N * d.n * d.C;
    if (total == 0) return;
    smc__mhc_res_mix_kernel<<<smc__blocks(total), SMC__THREADS, 0, c->stream>>>(
        out, in, y, maps, transpose, d);
}

/* ---- parameter gradients ---- */

#define SMC__MHC_SUM_ROWS 256 /* tokens per block in the dbias / dgate sums */

/* dbias[k] += sum_t darg[t,k] and, with z, dgate[g] += sum_t sum_{k in g}
 * darg[t,k] z[t,k] (sm__mhc_bias_gate_grads). A (32, 8) block sums
 * SMC__MHC_SUM_ROWS tokens: each warp reads 32 adjacent columns of a row,
 * the 8 rows of partial sums meet in shared memory, and each column (and
 * gate) gets one atomicAdd per block. */
static __global__ void smc__mhc_bias_gate_kernel(float *dbias, float *dgate, const float *darg,
                                                 const float *z, smc__mhc_dims d) {
    __shared__ float sb[8][32], sg[8][32], col_g[SMC__MHC_MAX_K];
    int x = threadIdx.x, y = threadIdx.y, t0 = blockIdx.x * SMC__MHC_SUM_ROWS, k0, i;
    int t1 = t0 + SMC__MHC_SUM_ROWS < d.N ? t0 + SMC__MHC_SUM_ROWS : d.N;
    for (k0 = 0; k0 < d.K; k0 += 32) {
        int k = k0 + x, t;
        float b = 0.0f, g = 0.0f;
        if (k < d.K)
            for (t = t0 + y; t < t1; t += 8) {
                float v = darg[(size_t)t * d.K + k];
                b += v;
                if (z) g += v * z[(size_t)t * d.K + k];
            }
        sb[y][x] = b;
        sg[y][x] = g;
        __syncthreads();
        if (y == 0 && k < d.K) {
            for (i = 1; i < 8; i++) b += sb[i][x], g += sg[i][x];
            atomicAdd(&dbias[k], b);
            col_g[k] = g;
        }
        __syncthreads();
    }
    if (z && y == 0 && x < 3) { /* gate x covers maps [x n, x n + n), the last one to K */
        int hi = x < 2 ? (x + 1) * d.n : d.K;
        float s = 0.0f;
        for (i = x * d.n; i < hi; i++) s += col_g[i];
        atomicAdd(&dgate[x], s);
    }
}

/* z <- dz = a_g(k) darg (in place over the saved projections). */
static __global__ void smc__mhc_dz_kernel(float *z, const float *darg, const float *gate,
                                          smc__mhc_dims d) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)d.N * d.K) return;
    z[e] = gate[smc__mhc_gate_of((int)(e % d.K), d.n)] * darg[e];
}

/* ---- public: activations, sublayer steps, expand / collapse ---- */

SMDEF sm_status smc_mhc_acts_alloc(sm_mhc_acts *act, const sm_mhc_config *cfg, int N,
                                  sm_error *err) {
    float *base;
    sm_status st = sm_mhc_config_validate(cfg, err);
    memset(act, 0, sizeof *act);
    if (st != SM_OK) return st;
    if (N < 1)
        return sm_fail(err, SM_ERR_INVALID_ARG, "mhc: activations for N = %d tokens, must be >= 1",
                       N);
    base = (float *)smc_malloc(sm_mhc_acts_size(cfg, N) * sizeof(float), "mhc activations", err);
    if (!base) return SM_ERR_OOM;
    *act = sm_mhc_acts_at(cfg, N, base);
    return SM_OK;
}

SMDEF void smc_mhc_acts_free(sm_mhc_acts *act) {
    smc_dfree(act->maps); /* the block's base */
    memset(act, 0, sizeof *act);
}

SMDEF void smc_mhc_pre_forward(smc_ctx *c, float *u, sm_mhc_acts *act, const float *x,
                               const sm_mhc_params *p, const sm_mhc_config *cfg, int N) {
    smc__mhc_dims d = smc__mhc_dims_of(N, cfg->n_streams, cfg->channels);
    int nC = d.n * d.C;
    smc__sk_plan plan;
    if (N <= 0) return;
    plan = smc__sk_plan_for(N, smc__sk_forward_floats(d.n));
    if (cfg->dynamic) { /* x' = RMSNorm(x), z = x' phi^T */
        smc__mhc_rmsnorm_forward_kernel<<<(unsigned)N, SMC__MHC_ROW_THREADS, 0, c->stream>>>(
            act->xn, act->rstd, x, nC);
        smc_sgemm(c, 0, 1, N, d.K, nC, 1.0f, act->xn, nC, p->phi, nC, 0.0f, act->z, d.K);
    }
    smc__mhc_maps_forward_kernel<<<plan.blocks, plan.threads, plan.shmem, c->stream>>>(
        act->maps, cfg->dynamic ? act->z : NULL, p->gate, p->bias, d, cfg->sinkhorn_iters,
        plan.stride);
    smc__mhc_stream_sum(c, u, x, act->maps, 0, 1.0f, 0, d);
}

SMDEF void smc_mhc_post_forward(smc_ctx *c, float *x_next, const float *x, const float *y,
                                const sm_mhc_acts *act, const sm_mhc_config *cfg, int N) {
    if (N <= 0) return;
    smc__mhc_res_mix(c, x_next, x, y, act->maps, 0,
                     smc__mhc_dims_of(N, cfg->n_streams, cfg->channels));
}

SMDEF void smc_mhc_post_backward(smc_ctx *c, float *dx, float *dy, float *dmaps,
                                 const float *dx_next, const float *x, const float *y,
                                 const sm_mhc_acts *act, const sm_mhc_config *cfg, int N) {
    smc__mhc_dims d = smc__mhc_dims_of(N, cfg->n_streams, cfg->channels);
    long long nC = (long long)d.n * d.C;
    if (N <= 0) return;
    smc__mhc_res_mix(c, dx, dx_next, NULL, act->maps, 1, d); /* dx += H_res^T dx_next */
    smc__mhc_stream_sum(c, dy, dx_next, act->maps, d.n, 1.0f, 1, d); /* dy += H_post dx_next */
    smc__mhc_stream_dots(c, dmaps + d.n, dx_next, y, d); /* dH_post[i] += <dx_next[i], y> */
    /* dH_res[i,j] += <dx_next[i], x[j]>: [n, C] x [C, n] per token */
    smc_sgemm_batched(c, 0, 1, d.n, d.n, d.C, 1.0f, dx_next, d.C, nC, x, d.C, nC, 1.0f,
                      dmaps + 2 * d.n, d.n, d.K, N);
}

SMDEF void smc_mhc_pre_backward(smc_ctx *c, float *dx, sm_mhc_params *dp, float *dmaps,
                                const float *du, const float *x, sm_mhc_acts *act,
                                const sm_mhc_params *p, const sm_mhc_config *cfg, int N) {
    smc__mhc_dims d = smc__mhc_dims_of(N, cfg->n_streams, cfg->channels);
    int nC = d.n * d.C;
    const float *z = cfg->dynamic ? act->z : NULL;
    smc__sk_plan plan;
    dim3 sum_threads(32, 8);
    if (N <= 0) return;
    plan = smc__sk_plan_for(N, smc__sk_backward_floats(d.n, cfg->sinkhorn_iters));
    smc__mhc_broadcast(c, dx, du, act->maps, 1.0f, 1, d); /* dx[i] += H_pre[i] du */
    smc__mhc_stream_dots(c, dmaps, x, du, d);             /* dH_pre[i] += <du, x[i]> */
    smc__mhc_maps_backward_kernel<<<plan.blocks, plan.threads, plan.shmem, c->stream>>>(
        dmaps, act->maps, z, p->gate, p->bias, d, cfg->sinkhorn_iters, plan.stride);
    smc__mhc_bias_gate_kernel<<<(unsigned)((N + SMC__MHC_SUM_ROWS - 1) / SMC__MHC_SUM_ROWS),
                                sum_threads, 0, c->stream>>>(dp->bias, dp->gate, dmaps, z, d);
    if (!cfg->dynamic) return;
    /* z <- dz = a darg; then back through z = x' phi^T and x' = RMSNorm(x) */
    smc__mhc_dz_kernel<<<smc__blocks((size_t)N * d.K), SMC__THREADS, 0, c->stream>>>(
        act->z, dmaps, p->gate, d);
    smc_sgemm(c, 1, 0, d.K, nC, N, 1.0f, act->z, d.K, act->xn, nC, 1.0f, dp->phi, nC);
    smc_sgemm(c, 0, 0, N, nC, d.K, 1.0f, act->z, d.K, p->phi, nC, 0.0f, act->xn, nC);
    smc__mhc_rmsnorm_backward_kernel<<<(unsigned)N, SMC__MHC_ROW_THREADS, 0, c->stream>>>(
        dx, act->xn, x, act->rstd, nC);
}

SMDEF void smc_mhc_expand_forward(smc_ctx *c, float *x, const float *h, int N, int n, int C) {
    smc__mhc_broadcast(c, x, h, NULL, 1.0f, 0, smc__mhc_dims_of(N, n, C));
}

SMDEF void smc_mhc_expand_backward(smc_ctx *c, float *dh, const float *dx, int N, int n, int C) {
    smc__mhc_stream_sum(c, dh, dx, NULL, 0, 1.0f, 1, smc__mhc_dims_of(N, n, C));
}

SMDEF void smc_mhc_collapse_forward(smc_ctx *c, float *h, const float *x, int N, int n, int C) {
    smc__mhc_stream_sum(c, h, x, NULL, 0, 1.0f / (float)n, 0, smc__mhc_dims_of(N, n, C));
}

SMDEF void smc_mhc_collapse_backward(smc_ctx *c, float *dx, const float *dh, int N, int n,
                                     int C) {
    smc__mhc_broadcast(c, dx, dh, NULL, 1.0f / (float)n, 1, smc__mhc_dims_of(N, n, C));
}

/* ---- diagnostics ---- */

#define SMC__MHC_DIAG_WARPS 4       /* warps per block, one token per warp at a time */
#define SMC__MHC_DIAG_MAX_BLOCKS 256 /* partial statistics the host folds */

/* P <- H P for n x n P (double) in this warp's shared memory, T scratch. */
static __device__ void smc__mhc_left_multiply(double *P, double *T, const float *H, int n) {
    int lane = threadIdx.x & 31, e, k;
    for (e = lane; e < n * n; e += 32) {
        int i = e / n, j = e % n;
        double s = 0;
        for (k = 0; k < n; k++) s += (double)H[i * n + k] * P[k * n + j];
        T[e] = s;
    }
    __syncwarp();
    for (e = lane; e < n * n; e += 32) P[e] = T[e];
    __syncwarp();
}

/* sm__rowcol_extremes over the warp: *row = max_i |r_i - target|, *col =
 * max_j |c_j - target| (sums of |P| when absolute), in every lane. */
static __device__ void smc__mhc_rowcol_extremes(float *row, float *col, const double *P, int n,
                                                int absolute, double target) {
    int lane = threadIdx.x & 31, j, o;
    double r = 0, c = 0;
    if (lane < n) {
        double rs = 0, cs = 0;
        for (j = 0; j < n; j++) {
            rs += absolute ? fabs(P[lane * n + j]) : P[lane * n + j];
            cs += absolute ? fabs(P[j * n + lane]) : P[j * n + lane];
        }
        r = fabs(rs - target);
        c = fabs(cs - target);
    }
    for (o = 16; o > 0; o >>= 1) {
        r = fmax(r, __shfl_xor_sync(0xffffffffu, r, o));
        c = fmax(c, __shfl_xor_sync(0xffffffffu, c, o));
    }
    *row = (float)r;
    *col = (float)c;
}

/* Per token t: P = H_res[layers-1] ... H_res[0] (acts[l].maps), then its
 * row / column extremes. Block b writes partial[4b..4b+3] = max and sum of
 * the row values, max and sum of the column values over its tokens. */
static __global__ void smc__mhc_rowcol_kernel(double *partial, const sm_mhc_acts *acts, int layers,
                                              smc__mhc_dims d, int absolute, double target) {
    extern __shared__ double smc__mhc_shm_d[];
    __shared__ double warp_stats[SMC__MHC_DIAG_WARPS][4];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nn = d.n * d.n, t, l, e, q;
    double *P = smc__mhc_shm_d + (size_t)warp * 2 * nn, *T = P + nn;
    double st[4] = {0, 0, 0, 0};
    for (t = blockIdx.x * SMC__MHC_DIAG_WARPS + warp; t < d.N;
         t += gridDim.x * SMC__MHC_DIAG_WARPS) {
        float row, col;
        for (e = lane; e < nn; e += 32) P[e] = e % (d.n + 1) == 0 ? 1.0 : 0.0;
        __syncwarp();
        for (l = 0; l < layers; l++)
            smc__mhc_left_multiply(P, T, acts[l].maps + (size_t)t * d.K + 2 * d.n, d.n);
        smc__mhc_rowcol_extremes(&row, &col, P, d.n, absolute, target);
        __syncwarp(); /* P is rewritten for the next token */
        st[0] = fmax(st[0], (double)row), st[1] += row;
        st[2] = fmax(st[2], (double)col), st[3] += col;
    }
    if (lane == 0)
        for (q = 0; q < 4; q++) warp_stats[warp][q] = st[q];
    __syncthreads();
    if (threadIdx.x < 4) {
        int w;
        q = threadIdx.x;
        st[0] = 0;
        for (w = 0; w < SMC__MHC_DIAG_WARPS; w++)
            st[0] = q % 2 ? st[0] + warp_stats[w][q] : fmax(st[0], warp_stats[w][q]);
        partial[blockIdx.x * 4 + q] = st[0];
    }
}

/* Runs smc__mhc_rowcol_kernel over N tokens and folds the block partials
 * into *stats as sm__rowcol_stats_add / _finish do. */
static sm_status smc__mhc_rowcol(smc_ctx *c, sm_rowcol_stats *stats, const sm_mhc_acts *acts,
                                 int layers, smc__mhc_dims d, int absolute, double target,
                                 sm_error *err) {
    int max_blocks = 2 * (c->sm_count > 0 ? c->sm_count : 1);
    int blocks = (d.N + SMC__MHC_DIAG_WARPS - 1) / SMC__MHC_DIAG_WARPS, b;
    size_t shmem = (size_t)SMC__MHC_DIAG_WARPS * 2 * d.n * d.n * sizeof(double);
    double host[4 * SMC__MHC_DIAG_MAX_BLOCKS], sum_row = 0, sum_col = 0;
    sm_mhc_acts *dacts = NULL;
    double *partial = NULL;
    sm_status st;
    memset(stats, 0, sizeof *stats);
    if (d.N <= 0) return SM_OK;
    max_blocks = max_blocks < SMC__MHC_DIAG_MAX_BLOCKS ? max_blocks : SMC__MHC_DIAG_MAX_BLOCKS;
    blocks = blocks < max_blocks ? blocks : max_blocks;
    dacts = (sm_mhc_acts *)smc_malloc(sizeof(sm_mhc_acts) * (layers > 0 ? layers : 1),
                                     "mhc diagnostics views", err);
    partial = dacts ? (double *)smc_malloc(sizeof(double) * 4 * blocks, "mhc diagnostics", err)
                    : NULL;
    st = partial ? SM_OK : SM_ERR_OOM;
    if (st == SM_OK && layers > 0) st = smc_upload(dacts, acts, sizeof(sm_mhc_acts) * layers, err);
    if (st == SM_OK) {
        smc__mhc_rowcol_kernel<<<(unsigned)blocks, SMC__MHC_DIAG_WARPS * 32, shmem, c->stream>>>(
            partial, dacts, layers, d, absolute, target);
        st = smc_sync(c, "mhc diagnostics", err);
    }
    if (st == SM_OK) st = smc_download(host, partial, sizeof(double) * 4 * blocks, err);
    smc_dfree(dacts);
    smc_dfree(partial);
    if (st != SM_OK) return st;
    for (b = 0; b < blocks; b++) {
        stats->row_max = fmaxf(stats->row_max, (float)host[4 * b]);
        stats->col_max = fmaxf(stats->col_max, (float)host[4 * b + 2]);
        sum_row += host[4 * b + 1];
        sum_col += host[4 * b + 3];
    }
    stats->row_mean = (float)(sum_row / d.N);
    stats->col_mean = (float)(sum_col / d.N);
    return SM_OK;
}

SMDEF sm_status smc_mhc_res_sum_error(smc_ctx *c, sm_rowcol_stats *stats, const sm_mhc_acts *act,
                                      const sm_mhc_config *cfg, int N, sm_error *err) {
    /* one layer: P = H_res I = H_res exactly; distance of its sums from 1 */
    return smc__mhc_rowcol(c, stats, act, 1, smc__mhc_dims_of(N, cfg->n_streams, cfg->channels),
                           0, 1.0, err);
}

SMDEF sm_status smc_mhc_amax_gain_tokens(smc_ctx *c, sm_rowcol_stats *stats,
                                         const sm_mhc_acts *acts, int layers,
                                         const sm_mhc_config *cfg, int N, sm_error *err) {
    return smc__mhc_rowcol(c, stats, acts, layers,
                           smc__mhc_dims_of(N, cfg->n_streams, cfg->channels), 1, 0.0, err);
}

#include <math.h> /* INFINITY, NAN */

/* ---- >>backbone  Backbone ------------------------------------------- */

#define SMC__WARP 32
#define SMC__WARPS (SMC__THREADS / SMC__WARP) /* warps (rows) per block */

/* Blocks of SMC__WARPS warps, one warp per row. */
static unsigned smc__warp_blocks(size_t rows) {
    return (unsigned)((rows + SMC__WARPS - 1) / SMC__WARPS);
}

/* ---- column sums ---- */

#define SMC__COLSUM_Y 8         /* row lanes per block (x: 32 columns) */
#define SMC__COLSUM_MIN_ROWS 64 /* rows per block at least */

/* acc[j] += sum_n a[n,j] * (b[n,j] - mu[n]) * s[n] (mu NULL: 0; or of
 * a[n,j] alone when b is NULL) over this block's rows: coalesced over 32
 * columns, the row lanes meet in shared memory, then one atomicAdd per
 * column and block. */
static __global__ void smc__colsum_kernel(float *acc, const float *a, const float *b,
                                          const float *mu, const float *s, int N, int C,
                                          int rows_per_block) {
    __shared__ float part[SMC__COLSUM_Y][SMC__WARP];
    int j = blockIdx.x * SMC__WARP + threadIdx.x, n0 = blockIdx.y * rows_per_block;
    int n1 = min(N, n0 + rows_per_block), n;
    float sum = 0.0f;
    if (j < C)
        for (n = n0 + threadIdx.y; n < n1; n += SMC__COLSUM_Y) {
            size_t i = (size_t)n * C + j;
            sum += b ? a[i] * (b[i] - (mu ? mu[n] : 0.0f)) * s[n] : a[i];
        }
    part[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y != 0 || j >= C) return;
    for (n = 1; n < SMC__COLSUM_Y; n++) sum += part[n][threadIdx.x];
    atomicAdd(&acc[j], sum);
}

/* Splits the rows over enough blocks to fill the device (a few per SM). */
static void smc__colsum(smc_ctx *c, float *acc, const float *a, const float *b, const float *mu,
                        const float *s, int N, int C) {
    int gx = (C + SMC__WARP - 1) / SMC__WARP, want = 4 * (c->sm_count > 0 ? c->sm_count : 1);
    int gy = (want + gx - 1) / gx, max_gy = (N + SMC__COLSUM_MIN_ROWS - 1) / SMC__COLSUM_MIN_ROWS;
    int rows;
    if (N <= 0 || C <= 0) return;
    gy = gy < max_gy ? gy : max_gy;
    rows = (N + gy - 1) / gy;
    gy = (N + rows - 1) / rows;
    smc__colsum_kernel<<<dim3((unsigned)gx, (unsigned)gy), dim3(SMC__WARP, SMC__COLSUM_Y), 0,
                         c->stream>>>(acc, a, b, mu, s, N, C, rows);
}

/* ---- RMSNorm ---- */

/* One warp per row (sm_rmsnorm_forward). */
static __global__ void smc__rmsnorm_forward_kernel(float *out, float *rstd, const float *inp,
                                                   const float *weight, int N, int C) {
    int n = blockIdx.x * SMC__WARPS + threadIdx.x / SMC__WARP, lane = threadIdx.x % SMC__WARP, i;
    const float *x;
    float *y, ss = 0.0f, r;
    if (n >= N) return; /* whole warps leave together */
    x = inp + (size_t)n * C;
    y = out + (size_t)n * C;
    for (i = lane; i < C; i += SMC__WARP) ss += x[i] * x[i];
    r = 1.0f / sqrtf(smc__warp_sum(ss) / C + SM_RMSNORM_EPS);
    for (i = lane; i < C; i += SMC__WARP) y[i] = x[i] * r * (weight ? weight[i] : 1.0f);
    if (lane == 0) rstd[n] = r;
}

SMDEF void smc_rmsnorm_forward(smc_ctx *c, float *out, float *rstd, const float *inp,
                               const float *weight, int N, int C) {
    if (N <= 0) return;
    smc__rmsnorm_forward_kernel<<<smc__warp_blocks((size_t)N), SMC__THREADS, 0, c->stream>>>(
        out, rstd, inp, weight, N, C);
}

/* One warp per row: dx += r * (g - x r mean(g . x r)), g = dout * weight
 * (sm_rmsnorm_backward). */
static __global__ void smc__rmsnorm_backward_kernel(float *dinp, const float *dout,
                                                    const float *inp, const float *weight,
                                                    const float *rstd, int N, int C) {
    int n = blockIdx.x * SMC__WARPS + threadIdx.x / SMC__WARP, lane = threadIdx.x % SMC__WARP, i;
    const float *x, *dy;
    float *dx, r, dot = 0.0f, mean_dot;
    if (n >= N) return;
    x = inp + (size_t)n * C;
    dy = dout + (size_t)n * C;
    dx = dinp + (size_t)n * C;
    r = rstd[n];
    for (i = lane; i < C; i += SMC__WARP) dot += dy[i] * (weight ? weight[i] : 1.0f) * x[i] * r;
    mean_dot = smc__warp_sum(dot) / C;
    for (i = lane; i < C; i += SMC__WARP) {
        float g = dy[i] * (weight ? weight[i] : 1.0f);
        dx[i] += r * (g - x[i] * r * mean_dot);
    }
}

SMDEF void smc_rmsnorm_backward(smc_ctx *c, float *dinp, float *dweight, const float *dout,
                                const float *inp, const float *weight, const float *rstd, int N,
                                int C) {
    if (N <= 0) return;
    if (dweight) smc__colsum(c, dweight, dout, inp, NULL, rstd, N, C); /* sum_n dy x rstd */
    if (!dinp) return;
    smc__rmsnorm_backward_kernel<<<smc__warp_blocks((size_t)N), SMC__THREADS, 0, c->stream>>>(
        dinp, dout, inp, weight, rstd, N, C);
}

/* ---- LayerNorm (SM_ARCH_GPT2's norms) ---- */

/* One warp per row (sm_layernorm_forward): the mean, the variance about it
 * (a second pass, as the CPU), y = (x - mean) r w + b. */
static __global__ void smc__layernorm_forward_kernel(float *out, float *mean, float *rstd,
                                                     const float *inp, const float *weight,
                                                     const float *bias, int N, int C) {
    int n = blockIdx.x * SMC__WARPS + threadIdx.x / SMC__WARP, lane = threadIdx.x % SMC__WARP, i;
    const float *x;
    float *y, sum = 0.0f, ss = 0.0f, mu, r;
    if (n >= N) return;
    x = inp + (size_t)n * C;
    y = out + (size_t)n * C;
    for (i = lane; i < C; i += SMC__WARP) sum += x[i];
    mu = smc__warp_sum(sum) / C;
    for (i = lane; i < C; i += SMC__WARP) ss += (x[i] - mu) * (x[i] - mu);
    r = 1.0f / sqrtf(smc__warp_sum(ss) / C + SM_LAYERNORM_EPS);
    for (i = lane; i < C; i += SMC__WARP) y[i] = (x[i] - mu) * r * weight[i] + bias[i];
    if (lane == 0) mean[n] = mu, rstd[n] = r;
}

SMDEF void smc_layernorm_forward(smc_ctx *c, float *out, float *mean, float *rstd, const float *inp,
                                 const float *weight, const float *bias, int N, int C) {
    if (N <= 0) return;
    smc__layernorm_forward_kernel<<<smc__warp_blocks((size_t)N), SMC__THREADS, 0, c->stream>>>(
        out, mean, rstd, inp, weight, bias, N, C);
}

/* One warp per row: with xh = (x - mean) r and g = dout w,
 * dx += r (g - mean(g) - xh mean(g xh)) (sm_layernorm_backward). */
static __global__ void smc__layernorm_backward_kernel(float *dinp, const float *dout,
                                                      const float *inp, const float *weight,
                                                      const float *mean, const float *rstd, int N,
                                                      int C) {
    int n = blockIdx.x * SMC__WARPS + threadIdx.x / SMC__WARP, lane = threadIdx.x % SMC__WARP, i;
    const float *x, *dy;
    float *dx, mu, r, sg = 0.0f, sgx = 0.0f, mg, mgx;
    if (n >= N) return;
    x = inp + (size_t)n * C;
    dy = dout + (size_t)n * C;
    dx = dinp + (size_t)n * C;
    mu = mean[n], r = rstd[n];
    for (i = lane; i < C; i += SMC__WARP) {
        float g = dy[i] * weight[i];
        sg += g;
        sgx += g * (x[i] - mu) * r;
    }
    mg = smc__warp_sum(sg) / C;
    mgx = smc__warp_sum(sgx) / C;
    for (i = lane; i < C; i += SMC__WARP)
        dx[i] += r * (dy[i] * weight[i] - mg - (x[i] - mu) * r * mgx);
}

SMDEF void smc_layernorm_backward(smc_ctx *c, float *dinp, float *dweight, float *dbias,
                                  const float *dout, const float *inp, const float *weight,
                                  const float *mean, const float *rstd, int N, int C) {
    if (N <= 0) return;
    if (dweight) smc__colsum(c, dweight, dout, inp, mean, rstd, N, C); /* sum_n dy xh */
    if (dbias) smc__colsum(c, dbias, dout, NULL, NULL, NULL, N, C);
    if (!dinp) return;
    smc__layernorm_backward_kernel<<<smc__warp_blocks((size_t)N), SMC__THREADS, 0, c->stream>>>(
        dinp, dout, inp, weight, mean, rstd, N, C);
}

/* ---- linear ---- */

static __global__ void smc__add_bias_kernel(float *out, const float *bias, size_t n, int OC) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] += bias[i % OC];
}

SMDEF void smc_linear_forward(smc_ctx *c, float *out, const float *inp, const float *weight,
                              const float *bias, int N, int C, int OC) {
    size_t n = (size_t)N * OC;
    if (n == 0) return;
    smc_sgemm(c, 0, 1, N, OC, C, 1.0f, inp, C, weight, C, 0.0f, out, OC);
    if (!bias) return;
    smc__add_bias_kernel<<<smc__blocks(n), SMC__THREADS, 0, c->stream>>>(out, bias, n, OC);
}

SMDEF void smc_linear_backward(smc_ctx *c, float *dinp, float *dweight, float *dbias,
                               const float *dout, const float *inp, const float *weight, int N,
                               int C, int OC) {
    if (N <= 0) return;
    if (dinp) smc_sgemm(c, 0, 0, N, C, OC, 1.0f, dout, OC, weight, C, 1.0f, dinp, C);
    if (dweight) smc_sgemm(c, 1, 0, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dweight, C);
    if (dbias) smc__colsum(c, dbias, dout, NULL, NULL, NULL, N, OC);
}

/* ---- GELU and SiLU ---- */

static __global__ void smc__act_forward_kernel(float *out, const float *inp, size_t n, int silu) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = silu ? inp[i] * sm_sigmoid(inp[i]) : sm__gelu(inp[i]);
}

static __global__ void smc__act_backward_kernel(float *dinp, const float *inp, const float *dout,
                                                size_t n, int silu) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dinp[i] += dout[i] * (silu ? smc__silu_grad(inp[i]) : sm__gelu_grad(inp[i]));
}

static void smc__act_forward(smc_ctx *c, float *out, const float *inp, size_t n, int silu) {
    if (n == 0) return;
    smc__act_forward_kernel<<<smc__blocks(n), SMC__THREADS, 0, c->stream>>>(out, inp, n, silu);
}

static void smc__act_backward(smc_ctx *c, float *dinp, const float *dout, const float *inp,
                              size_t n, int silu) {
    if (n == 0) return;
    smc__act_backward_kernel<<<smc__blocks(n), SMC__THREADS, 0, c->stream>>>(dinp, inp, dout, n,
                                                                               silu);
}

SMDEF void smc_gelu_forward(smc_ctx *c, float *out, const float *inp, size_t n) {
    smc__act_forward(c, out, inp, n, 0);
}

SMDEF void smc_gelu_backward(smc_ctx *c, float *dinp, const float *dout, const float *inp,
                             size_t n) {
    smc__act_backward(c, dinp, dout, inp, n, 0);
}

SMDEF void smc_silu_forward(smc_ctx *c, float *out, const float *inp, size_t n) {
    smc__act_forward(c, out, inp, n, 1);
}

SMDEF void smc_silu_backward(smc_ctx *c, float *dinp, const float *dout, const float *inp,
                             size_t n) {
    smc__act_backward(c, dinp, dout, inp, n, 1);
}

/* ---- embedding ---- */

static __global__ void smc__embedding_forward_kernel(float *out, const int *tokens,
                                                     const float *wte, const float *wpe, int T,
                                                     int C, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, row;
    int ch;
    if (i >= n) return;
    row = i / C;
    ch = (int)(i % C);
    out[i] = wte[(size_t)tokens[row] * C + ch] + wpe[(row % T) * C + ch];
}

SMDEF void smc_embedding_forward(smc_ctx *c, float *out, const int *tokens, const float *wte,
                                 const float *wpe, int B, int T, int C) {
    size_t n = (size_t)B * T * C;
    if (n == 0) return;
    smc__embedding_forward_kernel<<<smc__blocks(n), SMC__THREADS, 0, c->stream>>>(
        out, tokens, wte, wpe, T, C, n);
}

/* One thread per (t, c): dwpe[t,c] sums over the batch in the CPU's order
 * (no atomics); the token rows get an atomicAdd each (tokens may repeat). */
static __global__ void smc__embedding_backward_kernel(float *dwte, float *dwpe, const float *dout,
                                                      const int *tokens, int B, int T, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, tc = (size_t)T * C;
    int t, ch, b;
    float acc;
    if (i >= tc) return;
    t = (int)(i / C);
    ch = (int)(i % C);
    acc = dwpe[i];
    for (b = 0; b < B; b++) {
        size_t row = (size_t)b * T + t;
        float d = dout[row * C + ch];
        acc += d;
        atomicAdd(&dwte[(size_t)tokens[row] * C + ch], d);
    }
    dwpe[i] = acc;
}

SMDEF void smc_embedding_backward(smc_ctx *c, float *dwte, float *dwpe, const float *dout,
                                  const int *tokens, int B, int T, int C) {
    size_t n = (size_t)T * C;
    if (n == 0 || B <= 0) return;
    smc__embedding_backward_kernel<<<smc__blocks(n), SMC__THREADS, 0, c->stream>>>(
        dwte, dwpe, dout, tokens, B, T, C);
}

/* ---- attention ---- */

/* Where the (batch b, head h) matrix of a buffer starts (b * sb + h * sh
 * elements in) and its row stride ld. */
typedef struct {
    int ld;
    long long sb, sh;
} smc__bh_layout;

/* The per-(b, h) matrices of attention: q, k, v in qkv[B,T,3C] (k and v at
 * +C and +2C), the T x T scores in att[B,NH,T,T], the head slices of
 * out/dout[B,T,C]. */
typedef struct {
    int B, NH;
    smc__bh_layout qkv, att, out;
} smc__attn_dims;

static smc__attn_dims smc__attn_dims_of(int B, int T, int C, int NH) {
    smc__attn_dims d;
    long long hs = C / NH, tt = (long long)T * T;
    d.B = B, d.NH = NH;
    d.qkv.ld = 3 * C, d.qkv.sb = (long long)T * 3 * C, d.qkv.sh = hs;
    d.att.ld = T, d.att.sb = NH * tt, d.att.sh = tt;
    d.out.ld = C, d.out.sb = (long long)T * C, d.out.sh = hs;
    return d;
}

/* op(A) op(B) for every (b, h): a strided-batched GEMM over the longer of
 * the batch and head axes, one call per index of the shorter (the (b, h)
 * offsets are not one stride apart). */
static void smc__gemm_bh(smc_ctx *c, const smc__attn_dims *d, int ta, int tb, int M, int N,
                         int K, float alpha, const float *A, smc__bh_layout la, const float *Bm,
                         smc__bh_layout lb, float beta, float *Cm, smc__bh_layout lc) {
    int by_b = d->B <= d->NH, outer = by_b ? d->B : d->NH, inner = by_b ? d->NH : d->B, i;
    long long oa = by_b ? la.sb : la.sh, ob = by_b ? lb.sb : lb.sh, oc = by_b ? lc.sb : lc.sh;
    long long ia = by_b ? la.sh : la.sb, ib = by_b ? lb.sh : lb.sb, ic = by_b ? lc.sh : lc.sb;
    for (i = 0; i < outer; i++)
        smc_sgemm_batched(c, ta, tb, M, N, K, alpha, A + i * oa, la.ld, ia, Bm + i * ob, lb.ld, ib,
                          beta, Cm + i * oc, lc.ld, ic, inner);
}

/* One warp per score row (b, h, t): softmax over the causal prefix t2 <= t,
 * zeros after it (as the CPU attention forward does). */
static __global__ void smc__causal_softmax_kernel(float *att, size_t rows, int T) {
    size_t r = (size_t)blockIdx.x * SMC__WARPS + threadIdx.x / SMC__WARP;
    int lane = threadIdx.x % SMC__WARP, t, i;
    float *row, maxv = -INFINITY, sum = 0.0f, inv;
    if (r >= rows) return;
    row = att + r * T;
    t = (int)(r % T);
    for (i = lane; i <= t; i += SMC__WARP) maxv = fmaxf(maxv, row[i]);
    maxv = smc__warp_max(maxv);
    for (i = lane; i <= t; i += SMC__WARP) {
        row[i] = expf(row[i] - maxv);
        sum += row[i];
    }
    inv = 1.0f / smc__warp_sum(sum);
    for (i = lane; i < T; i += SMC__WARP) row[i] = i <= t ? row[i] * inv : 0.0f;
}

/* One warp per row, in place on datt: ds = att (datt - sum(att datt)) * scale
 * over the causal prefix, zero after it (as the CPU attention backward does). */
static __global__ void smc__causal_softmax_backward_kernel(float *datt, const float *att,
                                                          size_t rows, int T, float scale) {
    size_t r = (size_t)blockIdx.x * SMC__WARPS + threadIdx.x / SMC__WARP;
    int lane = threadIdx.x % SMC__WARP, t, i;
    const float *a;
    float *g, dot = 0.0f;
    if (r >= rows) return;
    a = att + r * T;
    g = datt + r * T;
    t = (int)(r % T);
    for (i = lane; i <= t; i += SMC__WARP) dot += a[i] * g[i];
    dot = smc__warp_sum(dot);
    for (i = lane; i < T; i += SMC__WARP) g[i] = i <= t ? a[i] * (g[i] - dot) * scale : 0.0f;
}

/* att = softmax(q k^T / sqrt(hs)) with the causal mask (the full T x T
 * product is computed, then masked), out = att v. */
SMDEF void smc_attention_forward(smc_ctx *c, float *out, float *att, const float *qkv, int B,
                                 int T, int C, int NH) {
    smc__attn_dims d = smc__attn_dims_of(B, T, C, NH);
    size_t rows = (size_t)B * NH * T;
    int hs = C / NH;
    if (rows == 0) return;
    smc__gemm_bh(c, &d, 0, 1, T, T, hs, 1.0f / sqrtf((float)hs), qkv, d.qkv, qkv + C, d.qkv,
                 0.0f, att, d.att);
    smc__causal_softmax_kernel<<<smc__warp_blocks(rows), SMC__THREADS, 0, c->stream>>>(att, rows,
                                                                                       T);
    smc__gemm_bh(c, &d, 0, 0, T, hs, T, 1.0f, att, d.att, qkv + 2 * C, d.qkv, 0.0f, out, d.out);
}

SMDEF size_t smc_attention_scratch_floats(int B, int T, int C, int NH) {
    (void)C;
    return (size_t)B * NH * T * T;
}

/* datt = dout v^T, dv += att^T dout, ds = softmax backward (in scratch),
 * dq += ds k, dk += ds^T q. The masked entries of att and ds are zero, so
 * the full products add nothing outside the causal prefix. */
SMDEF void smc_attention_backward(smc_ctx *c, float *dqkv, const float *dout, const float *qkv,
                                  const float *att, int B, int T, int C, int NH, float *scratch) {
    smc__attn_dims d = smc__attn_dims_of(B, T, C, NH);
    size_t rows = (size_t)B * NH * T;
    int hs = C / NH;
    if (rows == 0) return;
    smc__gemm_bh(c, &d, 0, 1, T, T, hs, 1.0f, dout, d.out, qkv + 2 * C, d.qkv, 0.0f, scratch,
                 d.att);
    smc__gemm_bh(c, &d, 1, 0, T, hs, T, 1.0f, att, d.att, dout, d.out, 1.0f, dqkv + 2 * C, d.qkv);
    smc__causal_softmax_backward_kernel<<<smc__warp_blocks(rows), SMC__THREADS, 0, c->stream>>>(
        scratch, att, rows, T, 1.0f / sqrtf((float)hs));
    smc__gemm_bh(c, &d, 0, 0, T, hs, T, 1.0f, scratch, d.att, qkv + C, d.qkv, 1.0f, dqkv, d.qkv);
    smc__gemm_bh(c, &d, 1, 0, T, hs, T, 1.0f, scratch, d.att, qkv, d.qkv, 1.0f, dqkv + C, d.qkv);
}

/* ---- >>loss  cross-entropy ------------------------------------------ */

/* One block per row (sm_crossentropy_forward): max shift, exponentials,
 * probabilities in place; the thread that holds the target's logit writes
 * the loss by log-sum-exp, log(sum) - (z_target - max). */
static __global__ void smc__crossentropy_rows_kernel(float *losses, float *probs,
                                                     const int *targets, int V) {
    float *row = probs + (size_t)blockIdx.x * V, maxv = -INFINITY, sum = 0.0f;
    float shifted_target = 0.0f;
    int target = targets[blockIdx.x], v;
    for (v = threadIdx.x; v < V; v += blockDim.x) maxv = fmaxf(maxv, row[v]);
    maxv = smc__block_max(maxv);
    for (v = threadIdx.x; v < V; v += blockDim.x) {
        if (v == target) shifted_target = row[v] - maxv;
        row[v] = expf(row[v] - maxv);
        sum += row[v];
    }
    sum = smc__block_sum(sum);
    for (v = threadIdx.x; v < V; v += blockDim.x) {
        row[v] /= sum;
        if (v == target) losses[blockIdx.x] = logf(sum) - shifted_target;
    }
    if (target == SM_IGNORE_INDEX && threadIdx.x == 0) losses[blockIdx.x] = 0.0f;
}

#define SMC__MEAN_THREADS 1024

typedef struct {
    float mean;
    int counted;
} smc__loss_mean;

/* One block: the mean of the counted losses (ignored ones are 0). */
static __global__ void smc__loss_mean_kernel(smc__loss_mean *res, const float *losses,
                                             const int *targets, int N) {
    float total = 0.0f;
    int base, counted = 0;
    for (base = 0; base < N; base += blockDim.x) { /* uniform trip count for the barrier */
        int n = base + threadIdx.x, counts = n < N && targets[n] != SM_IGNORE_INDEX;
        if (counts) total += losses[n];
        counted += __syncthreads_count(counts);
    }
    total = smc__block_sum(total);
    if (threadIdx.x != 0) return;
    res->mean = counted ? (float)((double)total / counted) : 0.0f;
    res->counted = counted;
}

/* Queues the rows and the mean, then waits for the mean; 0 on failure. */
static int smc__crossentropy_run(smc_ctx *c, smc__loss_mean *res, float *losses, float *probs,
                                 const int *targets, int N, int V) {
    smc__loss_mean *dev = NULL;
    if (cudaMallocAsync((void **)&dev, sizeof *dev, c->stream) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    smc__crossentropy_rows_kernel<<<(unsigned)N, SMC__THREADS, 0, c->stream>>>(losses, probs,
                                                                                 targets, V);
    smc__loss_mean_kernel<<<1, SMC__MEAN_THREADS, 0, c->stream>>>(dev, losses, targets, N);
    cudaMemcpyAsync(res, dev, sizeof *res, cudaMemcpyDeviceToHost, c->stream);
    cudaFreeAsync(dev, c->stream);
    return cudaStreamSynchronize(c->stream) == cudaSuccess;
}

SMDEF float smc_crossentropy_forward(smc_ctx *c, float *losses, float *logits_to_probs,
                                     const int *targets, int N, int V, int *n_counted) {
    smc__loss_mean res = {0.0f, 0};
    if (N > 0 && !smc__crossentropy_run(c, &res, losses, logits_to_probs, targets, N, V))
        res.mean = NAN, res.counted = 0;
    if (n_counted) *n_counted = res.counted;
    return res.mean;
}

/* dlogits = probs * dloss - onehot(target) * dloss, zero on ignored rows;
 * overwrites (probs may be dlogits). */
static __global__ void smc__crossentropy_backward_kernel(float *dlogits, const float *probs,
                                                         const int *targets, int V, size_t n,
                                                         float dloss) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int target;
    if (i >= n) return;
    target = targets[i / V];
    dlogits[i] = target == SM_IGNORE_INDEX
                     ? 0.0f
                     : probs[i] * dloss - ((int)(i % V) == target ? dloss : 0.0f);
}

SMDEF void smc_crossentropy_backward(smc_ctx *c, float *dlogits, const float *probs,
                                     const int *targets, int N, int V, float dloss) {
    size_t n = (size_t)N * V;
    if (n == 0) return;
    smc__crossentropy_backward_kernel<<<smc__blocks(n), SMC__THREADS, 0, c->stream>>>(
        dlogits, probs, targets, V, n, dloss);
}

/* ---- >>optim  Optimizer (>>params: the device parameter table) ------ */

#define SMC__PARAMS_WARPS (SMC__THREADS / 32) /* warps per block */
#define SMC__PARAMS_DENSE_ROW 1024           /* a dense span counts as rows of this length */
#define SMC__PARAMS_MAX_GRID 1024            /* most blocks per launch (norm partial slots) */

/* What one launch covers, as rows of the flat buffers: the touched rows of a
 * sparse tensor (list and count: its device row set, the count read on the
 * device) or a dense span [offset, offset + size) cut into rows of
 * SMC__PARAMS_DENSE_ROW floats (list and count NULL). */
typedef struct smc__params_rows {
    size_t offset, size, row_size;
    const uint32_t *list, *count;
} smc__params_rows;

static __device__ size_t smc__params_rows_count(const smc__params_rows *s) {
    return s->list ? (size_t)*s->count : (s->size + s->row_size - 1) / s->row_size;
}

/* Where row r starts in the flat buffers; its length in *len. */
static __device__ size_t smc__params_row_start(const smc__params_rows *s, size_t r, size_t *len) {
    if (s->list) {
        *len = s->row_size;
        return s->offset + (size_t)s->list[r] * s->row_size;
    }
    *len = s->size - r * s->row_size < s->row_size ? s->size - r * s->row_size : s->row_size;
    return s->offset + r * s->row_size;
}

/* The kernels below give each row to one warp, whose lanes stride along it
 * (coalesced), and the warps of the grid stride over the rows. */
static __device__ size_t smc__params_warp(void) {
    return ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
}

static __device__ size_t smc__params_warps(void) { return (size_t)gridDim.x * blockDim.x / 32; }

/* Level 1 of a squared norm: block b writes the sum of g^2 over its rows to
 * partial[b]. */
static __global__ void smc__params_sumsq_kernel(double *partial, const float *g,
                                                smc__params_rows s) {
    size_t n = smc__params_rows_count(&s), r, len, o, i;
    double acc = 0.0;
    for (r = smc__params_warp(); r < n; r += smc__params_warps()) {
        o = smc__params_row_start(&s, r, &len);
        for (i = threadIdx.x % 32; i < len; i += 32) acc += (double)g[o + i] * g[o + i];
    }
    acc = smc__block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

/* Level 2: one block adds partial[0..n), in a fixed order, to *sum. */
static __global__ void smc__params_add_partials_kernel(double *sum, const double *partial,
                                                       unsigned n) {
    double acc = 0.0;
    unsigned i;
    for (i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    acc = smc__block_sum(acc);
    if (threadIdx.x == 0) *sum += acc;
}

static __global__ void smc__params_zero_rows_kernel(float *g, smc__params_rows s) {
    size_t n = smc__params_rows_count(&s), r, len, o, i;
    for (r = smc__params_warp(); r < n; r += smc__params_warps()) {
        o = smc__params_row_start(&s, r, &len);
        for (i = threadIdx.x % 32; i < len; i += 32) g[o + i] = 0.0f;
    }
}

/* The scalars of one tensor's step (sm_params_adamw_step): lr = group lr *
 * lr_mult * lr_factor, the bias corrections' reciprocals 1 / (1 - beta^step),
 * decay 0 for no_decay tensors. */
typedef struct smc__adamw_hp {
    float lr, beta1, beta2, eps, weight_decay, inv_bc1, inv_bc2, clip_scale;
} smc__adamw_hp;

/* One element of sm__adamw_span:
 *   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
 *   w -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd * w)
 * (nvcc may fuse a multiply-add where the CPU rounds twice: ~1 ulp apart) */
static __device__ void smc__adamw_element(float *w, float grad, float *m, float *v,
                                          const smc__adamw_hp *h) {
    float gi = grad * h->clip_scale;
    float mi = h->beta1 * *m + (1.0f - h->beta1) * gi;
    float vi = h->beta2 * *v + (1.0f - h->beta2) * gi * gi;
    *m = mi;
    *v = vi;
    *w -= h->lr * ((mi * h->inv_bc1) / (sqrtf(vi * h->inv_bc2) + h->eps) + h->weight_decay * *w);
}

/* AdamW over the rows of s (at lr 0 the moments still move); a sparse
 * tensor's rows also get their gradients zeroed, as sm__adamw_rows does.
 * Rows of a set are distinct, so no two warps share an element. */
static __global__ void smc__params_adamw_kernel(float *w, float *g, float *m, float *v,
                                                smc__params_rows s, smc__adamw_hp h) {
    size_t n = smc__params_rows_count(&s), r, len, o, i;
    for (r = smc__params_warp(); r < n; r += smc__params_warps()) {
        o = smc__params_row_start(&s, r, &len);
        for (i = o + threadIdx.x % 32; i < o + len; i += 32) {
            smc__adamw_element(&w[i], g[i], &m[i], &v[i], &h);
            if (s.list) g[i] = 0.0f;
        }
    }
}

/* ---- host side ---- */

enum { SMC__PARAMS_SAME_GROUP = 1, SMC__PARAMS_SAME_DECAY = 2 };

/* Whether tensor b, just after a, can share a's launch: both dense, adjacent
 * in the buffer and alike in what `same` asks for. */
static int smc__params_joins(const sm_param_tensor *a, const sm_param_tensor *b, int same) {
    return !a->rows && !b->rows && b->offset == a->offset + a->size &&
           (!(same & SMC__PARAMS_SAME_GROUP) || a->group == b->group) &&
           (!(same & SMC__PARAMS_SAME_DECAY) || a->no_decay == b->no_decay);
}

/* The rows of one launch starting at tensor i: a sparse tensor's touched
 * rows, or the dense tensors i..*end-1 that join. */
static smc__params_rows smc__params_run(const smc_params *d, int i, int same, int *end) {
    const sm_params *p = d->layout;
    const sm_param_tensor *t = &p->tensors[i], *last;
    smc__params_rows s;
    int j = i + 1;
    memset(&s, 0, sizeof s);
    s.offset = t->offset;
    if (t->rows) {
        s.size = t->size;
        s.row_size = t->row_size;
        s.list = d->rows[i]->rows;
        s.count = d->rows[i]->count;
    } else {
        while (j < p->n_tensors && smc__params_joins(&p->tensors[j - 1], &p->tensors[j], same))
            j++;
        last = &p->tensors[j - 1];
        s.size = last->offset + last->size - t->offset;
        s.row_size = SMC__PARAMS_DENSE_ROW;
    }
    *end = j;
    return s;
}

/* Blocks for a warp per row of s (a sparse tensor has at most its table's
 * rows): enough to fill the device, at most SMC__PARAMS_MAX_GRID. */
static unsigned smc__params_grid(const smc_ctx *c, const smc__params_rows *s) {
    size_t rows = (s->size + s->row_size - 1) / s->row_size;
    size_t blocks = (rows + SMC__PARAMS_WARPS - 1) / SMC__PARAMS_WARPS;
    size_t cap = 8 * (size_t)(c->sm_count > 0 ? c->sm_count : 1);
    if (cap > SMC__PARAMS_MAX_GRID) cap = SMC__PARAMS_MAX_GRID;
    if (blocks > cap) blocks = cap;
    return blocks > 0 ? (unsigned)blocks : 1u;
}

SMDEF sm_status smc_params_alloc(smc_params *d, sm_params *layout, sm_error *err) {
    size_t bytes = layout->total * sizeof(float);
    memset(d, 0, sizeof *d);
    d->layout = layout;
    d->data = (float *)smc_malloc(bytes, "parameters", err);
    d->grad = d->data ? (float *)smc_malloc(bytes, "gradients", err) : NULL;
    d->m = d->grad ? (float *)smc_malloc(bytes, "Adam first moments", err) : NULL;
    d->v = d->m ? (float *)smc_malloc(bytes, "Adam second moments", err) : NULL;
    d->sumsq = d->v ? (double *)smc_malloc((SMC__PARAMS_MAX_GRID + 1) * sizeof(double),
                                           "gradient norm scratch", err)
                    : NULL;
    if (!d->sumsq) {
        smc_params_free(d);
        return SM_ERR_OOM;
    }
    return SM_OK;
}

SMDEF void smc_params_bind_rows(smc_params *d, int tensor, smc_row_set *rows) {
    if (tensor >= 0 && tensor < d->layout->n_tensors) d->rows[tensor] = rows;
}

SMDEF sm_status smc_params_check(const smc_params *d, sm_error *err) {
    int i;
    for (i = 0; i < d->layout->n_tensors; i++) {
        const sm_param_tensor *t = &d->layout->tensors[i];
        const smc_row_set *s = d->rows[i];
        if (t->rows && !s)
            return sm_fail(err, SM_ERR_INVALID_ARG,
                           "tensor %s: sparse but no device row set bound "
                           "(smc_params_bind_rows)", t->name);
        if (!t->rows && s)
            return sm_fail(err, SM_ERR_INVALID_ARG, "tensor %s: dense but a row set is bound",
                           t->name);
        if (s && s->nrows != t->size / t->row_size)
            return sm_fail(err, SM_ERR_INVALID_ARG,
                           "tensor %s: device row set has %zu rows, the tensor %zu", t->name,
                           s->nrows, t->size / t->row_size);
    }
    return SM_OK;
}

SMDEF void smc_params_free(smc_params *d) {
    smc_dfree(d->data);
    smc_dfree(d->grad);
    smc_dfree(d->m);
    smc_dfree(d->v);
    smc_dfree(d->sumsq);
    smc_dfree(d->packed);
    SM_FREE(d->staged);
    memset(d, 0, sizeof *d);
}

/* Copies data, m and v between the host layout and the device, then waits. */
static sm_status smc__params_copy(smc_ctx *c, const smc_params *d, int to_device,
                                  sm_error *err) {
    const sm_params *p = d->layout;
    float *host[3] = {p->data, p->m, p->v}, *dev[3] = {d->data, d->m, d->v};
    size_t bytes = p->total * sizeof(float);
    const char *what = to_device ? "parameters to the device" : "parameters to the host";
    cudaError_t e = cudaSuccess;
    int k;
    if (!p->data || !p->m || !p->v)
        return sm_fail(err, SM_ERR_INVALID_ARG, "copy %s: the host layout has no buffers "
                       "(sm_params_alloc)", what);
    for (k = 0; k < 3 && e == cudaSuccess; k++)
        e = to_device ? cudaMemcpyAsync(dev[k], host[k], bytes, cudaMemcpyHostToDevice, c->stream)
                      : cudaMemcpyAsync(host[k], dev[k], bytes, cudaMemcpyDeviceToHost, c->stream);
    return e == cudaSuccess ? smc_sync(c, what, err) : smc__cuda_fail(err, e, what);
}

SMDEF sm_status smc_params_upload(smc_ctx *c, const smc_params *d, sm_error *err) {
    return smc__params_copy(c, d, 1, err);
}

SMDEF sm_status smc_params_download(smc_ctx *c, const smc_params *d, sm_error *err) {
    return smc__params_copy(c, d, 0, err);
}

SMDEF void smc_params_zero_grad(smc_ctx *c, smc_params *d) {
    int i, end;
    for (i = 0; i < d->layout->n_tensors; i = end) {
        smc__params_rows s = smc__params_run(d, i, 0, &end);
        if (s.list)
            smc__params_zero_rows_kernel<<<smc__params_grid(c, &s), SMC__THREADS, 0, c->stream>>>(
                d->grad, s);
        else
            cudaMemsetAsync(d->grad + s.offset, 0, s.size * sizeof(float), c->stream);
    }
}

/* sqrt of the sum of g^2 over the tensors of `group` (all when group < 0):
 * per launch, block partials (level 1) that one block adds in order to the
 * device total (level 2); deterministic for a given device and row order. */
static double smc__params_norm(smc_ctx *c, const smc_params *d, int group) {
    double *total = d->sumsq + SMC__PARAMS_MAX_GRID, s = 0.0;
    int i, end, same = group < 0 ? 0 : SMC__PARAMS_SAME_GROUP;
    cudaMemsetAsync(total, 0, sizeof(double), c->stream);
    for (i = 0; i < d->layout->n_tensors; i = end) {
        smc__params_rows rows = smc__params_run(d, i, same, &end);
        unsigned grid = smc__params_grid(c, &rows);
        if (group >= 0 && d->layout->tensors[i].group != group) continue;
        smc__params_sumsq_kernel<<<grid, SMC__THREADS, 0, c->stream>>>(d->sumsq, d->grad, rows);
        smc__params_add_partials_kernel<<<1, SMC__THREADS, 0, c->stream>>>(total, d->sumsq, grid);
    }
    if (cudaMemcpyAsync(&s, total, sizeof s, cudaMemcpyDeviceToHost, c->stream) != cudaSuccess ||
        cudaStreamSynchronize(c->stream) != cudaSuccess)
        return nan("");
    return sqrt(s);
}

SMDEF double smc_params_grad_norm(smc_ctx *c, const smc_params *d) {
    return smc__params_norm(c, d, -1);
}

SMDEF double smc_params_group_grad_norm(smc_ctx *c, const smc_params *d, int group) {
    return smc__params_norm(c, d, group);
}

/* The step scalars of tensor t, computed as sm_params_adamw_step does. */
static smc__adamw_hp smc__adamw_hp_of(const sm_params *p, const sm_param_tensor *t,
                                      float lr_factor, float clip_scale) {
    const sm_param_group *g = &p->groups[t->group];
    smc__adamw_hp h;
    h.lr = g->lr * g->lr_mult * lr_factor;
    h.beta1 = g->beta1;
    h.beta2 = g->beta2;
    h.eps = g->eps;
    h.weight_decay = t->no_decay ? 0.0f : g->weight_decay;
    h.inv_bc1 = 1.0f / (1.0f - powf(g->beta1, (float)p->step));
    h.inv_bc2 = 1.0f / (1.0f - powf(g->beta2, (float)p->step));
    h.clip_scale = clip_scale;
    return h;
}

SMDEF void smc_params_adamw_step(smc_ctx *c, smc_params *d, float lr_factor, float clip_scale) {
    sm_params *p = d->layout;
    int i, end;
    p->step++;
    for (i = 0; i < p->n_tensors; i = end) {
        smc__params_rows s =
            smc__params_run(d, i, SMC__PARAMS_SAME_GROUP | SMC__PARAMS_SAME_DECAY, &end);
        smc__adamw_hp h = smc__adamw_hp_of(p, &p->tensors[i], lr_factor, clip_scale);
        smc__params_adamw_kernel<<<smc__params_grid(c, &s), SMC__THREADS, 0, c->stream>>>(
            d->data, d->grad, d->m, d->v, s, h);
        if (s.list) smc_row_set_clear(c, d->rows[i]);
    }
}

/* ---- >>optim  data parallelism ---- */

static __global__ void smc__params_scale_kernel(float *g, smc__params_rows s, float scale) {
    size_t n = smc__params_rows_count(&s), r, len, o, i;
    for (r = smc__params_warp(); r < n; r += smc__params_warps()) {
        o = smc__params_row_start(&s, r, &len);
        for (i = threadIdx.x % 32; i < len; i += 32) g[o + i] *= scale;
    }
}

/* The touched rows of s between the gradient and packed (row r of the list
 * at packed + r * row_size): out (times scale) when `pack`, else back. */
static __global__ void smc__params_pack_kernel(float *g, float *packed, smc__params_rows s, float scale,
                                               int pack) {
    size_t n = smc__params_rows_count(&s), r, len, o, i;
    for (r = smc__params_warp(); r < n; r += smc__params_warps()) {
        float *row = packed + r * s.row_size;
        o = smc__params_row_start(&s, r, &len);
        for (i = threadIdx.x % 32; i < len; i += 32) {
            if (pack) row[i] = g[o + i] * scale;
            else g[o + i] = row[i];
        }
    }
}

static __global__ void smc__row_set_mark_kernel(uint32_t *mark, const uint32_t *list, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) mark[list[i]] = 1u;
}

/* x[0..n) (device) := its sum over comm's ranks, with NCCL on the device, or
 * through d->staged with MPI. Waits for the device. */
static sm_status smc__allreduce(smc_ctx *c, smc_params *d, const sm_comm *comm, float *x, size_t n,
                                sm_error *err) {
    sm_status st;
#ifdef SM_USE_NCCL
    if (comm->nccl) {
        st = sm_comm_device_allreduce_sum(comm, x, n, c->stream, err);
        return st == SM_OK ? smc_sync(c, "NCCL all-reduce", err) : st;
    }
#endif
    if ((st = sm__grow((void **)&d->staged, &d->staged_cap, n, sizeof(float), "all-reduce host copy", err)))
        return st;
    cudaMemcpyAsync(d->staged, x, n * sizeof(float), cudaMemcpyDeviceToHost, c->stream);
    if ((st = smc_sync(c, "gradients to the host", err)) || (st = sm_comm_allreduce_sum(comm, d->staged, n, err)))
        return st;
    cudaMemcpyAsync(x, d->staged, n * sizeof(float), cudaMemcpyHostToDevice, c->stream);
    return smc_sync(c, "gradients to the device", err);
}

/* Set s := the union of every rank's set, sorted, as on the CPU (>>comm):
 * the rows this rank holds are marked already; the others are marked here. */
static sm_status smc__row_set_union(smc_ctx *c, smc_row_set *s, const sm_comm *comm, sm_error *err) {
    size_t n = smc_row_set_count(c, s), n_all = 0, u = 0, i;
    uint32_t *mine = (uint32_t *)sm_alloc(n, sizeof(uint32_t), "touched rows", err), *all = NULL, count;
    sm_status st = mine ? SM_OK : SM_ERR_OOM;
    if (st == SM_OK) {
        cudaMemcpyAsync(mine, s->rows, n * sizeof(uint32_t), cudaMemcpyDeviceToHost, c->stream);
        st = smc_sync(c, "touched rows to the host", err);
    }
    if (st == SM_OK) st = sm__gather_rows(comm, mine, n, &all, &n_all, err);
    if (st == SM_OK) {
        qsort(all, n_all, sizeof(uint32_t), sm__cmp_u32);
        for (i = 0; i < n_all; i++)
            if (i == 0 || all[i] != all[i - 1]) all[u++] = all[i];
        count = (uint32_t)u;
        cudaMemcpyAsync(s->rows, all, u * sizeof(uint32_t), cudaMemcpyHostToDevice, c->stream);
        cudaMemcpyAsync(s->count, &count, sizeof count, cudaMemcpyHostToDevice, c->stream);
        if (u) smc__row_set_mark_kernel<<<smc__blocks(u), SMC__THREADS, 0, c->stream>>>(s->mark, s->rows, u);
        st = smc_sync(c, "touched-row union", err);
    }
    SM_FREE(mine), SM_FREE(all);
    return st;
}

/* Whether tensor i is the first bound to its row set (tensors may share one). */
static int smc__params_first_with_set(const smc_params *d, int i) {
    int k;
    for (k = 0; k < i; k++)
        if (d->rows[k] == d->rows[i]) return 0;
    return 1;
}

/* The touched rows s of a sparse tensor, n of them (its set the ranks'
 * union): packed times scale, summed, put back. */
static sm_status smc__params_allreduce_rows(smc_ctx *c, smc_params *d, const smc__params_rows *s, size_t n,
                                            const sm_comm *comm, float scale, sm_error *err) {
    unsigned grid = smc__params_grid(c, s);
    sm_status st;
    n *= s->row_size;
    if (n == 0) return SM_OK;
    if (n > d->packed_cap) {
        smc_dfree(d->packed);
        d->packed_cap = 0;
        if (!(d->packed = (float *)smc_malloc(n * sizeof(float), "packed touched-row gradients", err)))
            return SM_ERR_OOM;
        d->packed_cap = n;
    }
    smc__params_pack_kernel<<<grid, SMC__THREADS, 0, c->stream>>>(d->grad, d->packed, *s, scale, 1);
    if ((st = smc__allreduce(c, d, comm, d->packed, n, err)) != SM_OK) return st;
    smc__params_pack_kernel<<<grid, SMC__THREADS, 0, c->stream>>>(d->grad, d->packed, *s, 1.0f, 0);
    return SM_OK;
}

SMDEF sm_status smc_params_allreduce_grads(smc_ctx *c, smc_params *d, const sm_comm *comm, float scale,
                                           sm_error *err) {
    sm_status st = SM_OK;
    int i, end;
    for (i = 0; i < d->layout->n_tensors && comm->size > 1 && st == SM_OK; i++)
        if (d->rows[i] && smc__params_first_with_set(d, i)) st = smc__row_set_union(c, d->rows[i], comm, err);
    for (i = 0; i < d->layout->n_tensors && st == SM_OK; i = end) {
        smc__params_rows s = smc__params_run(d, i, 0, &end);
        if (s.list && comm->size > 1) {
            st = smc__params_allreduce_rows(c, d, &s, smc_row_set_count(c, d->rows[i]), comm, scale, err);
            continue;
        }
        smc__params_scale_kernel<<<smc__params_grid(c, &s), SMC__THREADS, 0, c->stream>>>(d->grad, s, scale);
        if (comm->size > 1) st = smc__allreduce(c, d, comm, d->grad + s.offset, s.size, err);
    }
    return st == SM_OK ? smc_sync(c, "gradient all-reduce", err) : st;
}

/* ---- >>model  Model ------------------------------------------------- */

enum { SMC__DIAG_OUT = 0, SMC__DIAG_PEER = 1, SMC__DIAG_GRAD = 2 };

static __global__ void smc__add_kernel(float *x, const float *y, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

static void smc__add_inplace(smc_ctx *c, float *x, const float *y, size_t n) {
    smc__add_kernel<<<smc__blocks(n), SMC__THREADS, 0, c->stream>>>(x, y, n);
}

static void smc__copy(smc_ctx *c, void *dst, const void *src, size_t bytes) {
    cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream);
}

/* Diagnostics, one warp per row n of x[N, C]: adds ||x_n|| / N to *out
 * (mean row norm), or ||x_n||^2 (sum_sq; the host takes the root). */
static __global__ void smc__row_norms_kernel(float *out, const float *x, int N, int C, int sum_sq) {
    int n = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32), lane = threadIdx.x % 32, i;
    float s = 0.0f;
    if (n >= N) return;
    for (i = lane; i < C; i += 32) s += x[(size_t)n * C + i] * x[(size_t)n * C + i];
    s = smc__warp_sum(s);
    if (lane == 0) atomicAdd(out, sum_sq ? s : sqrtf(s) / (float)N);
}

static void smc__diag(smc_model *g, const sm_sublayer *s, int which, const float *x) {
    int N = g->d.B * g->d.T, C = g->d.cfg.d_model;
    float *slot = g->diag + (size_t)(s - g->d.sub) * 3 + which;
    smc__row_norms_kernel<<<smc__blocks((size_t)N * 32), SMC__THREADS, 0, g->c->stream>>>(
        slot, x, N, C, which == SMC__DIAG_GRAD);
}

/* ---- the backbone's norm: RMSNorm, or LayerNorm with SM_ARCH_GPT2 ---- */

/* As the CPU model: out = Norm(inp) with the gain at w_off (and the bias at
 * b_off, GPT-2); mean (GPT-2 only) and rstd saved for the backward. */
static void smc__norm_forward(smc_model *g, float *out, float *mean, float *rstd, const float *inp,
                              size_t w_off, size_t b_off, int N) {
    const float *w = g->params.data;
    int C = g->d.cfg.d_model;
    if (g->d.cfg.arch == SM_ARCH_GPT2)
        smc_layernorm_forward(g->c, out, mean, rstd, inp, w + w_off, w + b_off, N, C);
    else
        smc_rmsnorm_forward(g->c, out, rstd, inp, w + w_off, N, C);
}

static void smc__norm_backward(smc_model *g, float *dinp, const float *dout, const float *inp,
                               const float *mean, const float *rstd, size_t w_off, size_t b_off,
                               int N) {
    const float *w = g->params.data;
    float *gr = g->params.grad;
    int C = g->d.cfg.d_model;
    if (g->d.cfg.arch == SM_ARCH_GPT2)
        smc_layernorm_backward(g->c, dinp, gr + w_off, gr + b_off, dout, inp, w + w_off, mean, rstd,
                               N, C);
    else
        smc_rmsnorm_backward(g->c, dinp, gr + w_off, dout, inp, w + w_off, rstd, N, C);
}

/* ---- sublayer forward ---- */

static void smc__attn_forward(smc_model *g, sm_sublayer *s, const float *u) {
    sm_model *m = &g->d;
    const float *w = g->params.data;
    const sm_sublayer_offsets *o = &s->off;
    int N = m->B * m->T, C = m->cfg.d_model;
    smc__norm_forward(g, s->ln, s->ln_mean, s->ln_rstd, u, o->ln_w, o->ln_b, N);
    smc_linear_forward(g->c, s->qkv, s->ln, w + o->qkv_w, w + o->qkv_b, N, C, 3 * C);
    smc_attention_forward(g->c, s->atty, s->att, s->qkv, m->B, m->T, C, m->cfg.n_head);
    smc_linear_forward(g->c, s->y, s->atty, w + o->proj_w, w + o->proj_b, N, C, C);
}

static void smc__ffn_forward(smc_model *g, sm_sublayer *s, const float *u) {
    sm_model *m = &g->d;
    const float *w = g->params.data;
    const sm_sublayer_offsets *o = &s->off;
    int N = m->B * m->T, C = m->cfg.d_model, F = m->cfg.d_ff;
    smc__norm_forward(g, s->ln, s->ln_mean, s->ln_rstd, u, o->ln_w, o->ln_b, N);
    if (s->has_mlp) {
        smc_linear_forward(g->c, s->fch, s->ln, w + o->fc_w, w + o->fc_b, N, C, F);
        smc_gelu_forward(g->c, s->fch_gelu, s->fch, (size_t)N * F);
        smc_linear_forward(g->c, s->y, s->fch_gelu, w + o->fcproj_w, w + o->fcproj_b, N, F, C);
    }
    if (s->has_peer) {
        sm_peer_params pp = sm__peer_view(m, g->params.data, s);
        float *out = s->has_mlp ? s->peer_out : s->y;
        smc_peer_forward(g->c, out, &s->peer_acts, s->ln, &pp, N, NULL);
        smc__diag(g, s, SMC__DIAG_PEER, out);
        if (s->has_mlp) smc__add_inplace(g->c, s->y, s->peer_out, (size_t)N * C);
    }
}

static void smc__engram_forward(smc_model *g, sm_sublayer *s, const float *u) {
    sm_model *m = &g->d;
    sm_engram_params ep = sm_engram_params_view(g->params.data, &s->off.engram);
    const uint32_t *idx = m->ngram_idx + (size_t)s->engram_index * m->B * m->T * m->hash.n_slots;
    smc_engram_forward_routed(g->c, s->y, &s->engram_acts, u, idx,
                              m->cfg.use_nine ? m->ngram_hot : NULL, &ep, &m->cfg.engram, m->B,
                              m->T);
}

static void smc__sublayer_forward(smc_model *g, sm_sublayer *s, const float *u) {
    if (s->kind == SM_SUBLAYER_ENGRAM) smc__engram_forward(g, s, u);
    else if (s->kind == SM_SUBLAYER_ATTN) smc__attn_forward(g, s, u);
    else smc__ffn_forward(g, s, u);
    smc__diag(g, s, SMC__DIAG_OUT, s->y);
}

/* x_next = x + F(x), or with mHC: u = H_pre x, x_next = H_res x + H_post^T F(u). */
static void smc__residual_forward(smc_model *g, sm_sublayer *s, float *x_next) {
    sm_model *m = &g->d;
    size_t NC = (size_t)m->B * m->T * m->cfg.d_model;
    int N = m->B * m->T;
    if (!m->cfg.use_mhc) {
        smc__sublayer_forward(g, s, s->x_in);
        smc__copy(g->c, x_next, s->x_in, sizeof(float) * NC);
        smc__add_inplace(g->c, x_next, s->y, NC);
        return;
    }
    {
        sm_mhc_params mp = sm__mhc_view(m, g->params.data, s);
        smc_mhc_pre_forward(g->c, s->u, &s->mhc_acts, s->x_in, &mp, &m->cfg.mhc, N);
        smc__sublayer_forward(g, s, s->u);
        smc_mhc_post_forward(g->c, x_next, s->x_in, s->y, &s->mhc_acts, &m->cfg.mhc, N);
    }
}

/* ngram_tokens[i] = canon[inputs[i]] (sm__engram_hash_batch's first step). */
static __global__ void smc__canon_kernel(uint32_t *out, const int *inputs, const uint32_t *canon,
                                         size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = canon[inputs[i]];
}

/* sm__engram_hash_batch on the device: the flat table rows of every Engram
 * layer (through the hot tier with use_nine, which also writes the hot
 * flags of layer 0's routing). */
static sm_status smc__engram_hash_batch(smc_model *g, sm_error *err) {
    sm_model *m = &g->d;
    int N = m->B * m->T, i;
    size_t per_layer = (size_t)N * m->hash.n_slots;
    sm_status st = SM_OK;
    if (m->cfg.use_nine && !g->host->has_hot_set)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "use_nine: build the hot set before smc_model_init (sm_model_build_hot_set)");
    smc__canon_kernel<<<smc__blocks((size_t)N), SMC__THREADS, 0, g->c->stream>>>(
        m->ngram_tokens, m->inputs, g->canon, (size_t)N);
    for (i = 0; i < m->cfg.engram.hash.n_layers && st == SM_OK; i++) {
        uint32_t *flat = m->ngram_idx + i * per_layer;
        if (m->cfg.use_nine)
            st = smc_nine_route(g->c, &g->nine, &g->hash, i, flat, i == 0 ? m->ngram_hot : NULL,
                                m->ngram_tokens, g->doc_start, m->B, m->T, err);
        else
            st = smc_ngram_hash_compute(g->c, &g->hash, i, NULL, flat, m->ngram_tokens,
                                        g->doc_start, m->B, m->T, err);
    }
    return st;
}

/* Checks the batch like the CPU forward, uploads tokens, targets and
 * document starts, and computes the n-gram rows. */
static sm_status smc__upload_batch(smc_model *g, const int *inputs, const int *targets,
                                   const unsigned char *doc_start, int B, int T, sm_error *err) {
    sm_model *m = &g->d;
    int N = B * T;
    sm_status st = sm__check_batch(g->host, inputs, targets, B, T, err);
    if (st != SM_OK) return st;
    g->host->B = m->B = B;
    g->host->T = m->T = T;
    st = smc_upload(m->inputs, inputs, sizeof(int) * N, err);
    if (st == SM_OK && targets) st = smc_upload(m->targets, targets, sizeof(int) * N, err);
    if (st != SM_OK || !m->cfg.use_engram) return st;
    if (doc_start) st = smc_upload(g->doc_start, doc_start, (size_t)N, err);
    else smc_zero(g->c, g->doc_start, (size_t)N);
    return st == SM_OK ? smc__engram_hash_batch(g, err) : st;
}

SMDEF sm_status smc_model_forward(smc_model *g, const int *inputs, const int *targets,
                                  const unsigned char *doc_start, int B, int T, sm_error *err) {
    sm_model *m = &g->d;
    const sm_model_config *c = &m->cfg;
    const float *w = g->params.data;
    int i, N = B * T, C = c->d_model, V = c->vocab_size;
    sm_status st = smc__upload_batch(g, inputs, targets, doc_start, B, T, err);
    if (st != SM_OK) return st;
    smc_zero(g->c, g->diag, (size_t)m->n_sub * 3 * sizeof(float)); /* the sums start at 0 */
    smc_embedding_forward(g->c, m->emb, m->inputs, w + m->wte, w + m->wpe, B, T, C);
    if (c->use_mhc)
        smc_mhc_expand_forward(g->c, m->sub[0].x_in, m->emb, N, c->mhc.n_streams, C);
    else
        smc__copy(g->c, m->sub[0].x_in, m->emb, sizeof(float) * (size_t)N * C);
    for (i = 0; i < m->n_sub; i++) {
        sm_sublayer *s = &m->sub[i];
        float *next = i + 1 < m->n_sub ? m->sub[i + 1].x_in : c->use_mhc ? m->x_final : m->x_out;
        smc__residual_forward(g, s, next);
    }
    if (c->use_mhc) smc_mhc_collapse_forward(g->c, m->x_out, m->x_final, N, c->mhc.n_streams, C);
    smc__norm_forward(g, m->lnf, m->lnf_mean, m->lnf_rstd, m->x_out, m->lnf_w, m->lnf_b, N);
    smc_sgemm(g->c, 0, 1, N, V, C, 1.0f, m->lnf, C, w + m->head_w, C, 0.0f, m->logits, V);
    g->host->loss = m->loss = 0.0f;
    g->host->n_counted = m->n_counted = 0;
    if (!targets) return smc_sync(g->c, "model forward", err);
    m->loss = smc_crossentropy_forward(g->c, m->losses, m->logits, m->targets, N, V, &m->n_counted);
    g->host->loss = m->loss;
    g->host->n_counted = m->n_counted;
    return smc_sync(g->c, "model forward", err);
}

/* ---- sublayer backward: du += dF/du^T dy, parameter gradients += ---- */

static void smc__attn_backward(smc_model *g, const sm_sublayer *s, float *du, const float *dy,
                               const float *u) {
    sm_model *m = &g->d;
    const float *w = g->params.data;
    float *gr = g->params.grad;
    const sm_sublayer_offsets *o = &s->off;
    int N = m->B * m->T, C = m->cfg.d_model;
    smc_zero(g->c, m->datty, sizeof(float) * (size_t)N * C);
    smc_linear_backward(g->c, m->datty, gr + o->proj_w, gr + o->proj_b, dy, s->atty,
                        w + o->proj_w, N, C, C);
    smc_zero(g->c, m->dqkv, sizeof(float) * (size_t)N * 3 * C);
    smc_attention_backward(g->c, m->dqkv, m->datty, s->qkv, s->att, m->B, m->T, C,
                           m->cfg.n_head, g->att_scratch);
    smc_zero(g->c, m->dln, sizeof(float) * (size_t)N * C);
    smc_linear_backward(g->c, m->dln, gr + o->qkv_w, gr + o->qkv_b, m->dqkv, s->ln,
                        w + o->qkv_w, N, C, 3 * C);
    smc__norm_backward(g, du, m->dln, u, s->ln_mean, s->ln_rstd, o->ln_w, o->ln_b, N);
}

static void smc__ffn_backward(smc_model *g, sm_sublayer *s, float *du, const float *dy,
                              const float *u) {
    sm_model *m = &g->d;
    const float *w = g->params.data;
    float *gr = g->params.grad;
    const sm_sublayer_offsets *o = &s->off;
    int N = m->B * m->T, C = m->cfg.d_model, F = m->cfg.d_ff;
    smc_zero(g->c, m->dln, sizeof(float) * (size_t)N * C);
    if (s->has_mlp) {
        smc_zero(g->c, m->dfch_gelu, sizeof(float) * (size_t)N * F);
        smc_linear_backward(g->c, m->dfch_gelu, gr + o->fcproj_w, gr + o->fcproj_b, dy,
                            s->fch_gelu, w + o->fcproj_w, N, F, C);
        smc_zero(g->c, m->dfch, sizeof(float) * (size_t)N * F);
        smc_gelu_backward(g->c, m->dfch, m->dfch_gelu, s->fch, (size_t)N * F);
        smc_linear_backward(g->c, m->dln, gr + o->fc_w, gr + o->fc_b, m->dfch, s->ln,
                            w + o->fc_w, N, C, F);
    }
    if (s->has_peer) {
        sm_peer_params pp = sm__peer_view(m, g->params.data, s);
        sm_peer_params pg = sm__peer_view(m, g->params.grad, s);
        smc_peer_backward(g->c, m->dln, &pg, &g->peer_rows[s - m->sub], dy, s->ln, &pp,
                          &s->peer_acts, N, NULL);
    }
    smc__norm_backward(g, du, m->dln, u, s->ln_mean, s->ln_rstd, o->ln_w, o->ln_b, N);
}

static void smc__engram_backward(smc_model *g, const sm_sublayer *s, float *du, const float *dy,
                                 const float *u) {
    sm_model *m = &g->d;
    sm_engram_params ep = sm_engram_params_view(g->params.data, &s->off.engram);
    sm_engram_params eg = sm_engram_params_view(g->params.grad, &s->off.engram);
    const uint32_t *idx = m->ngram_idx + (size_t)s->engram_index * m->B * m->T * m->hash.n_slots;
    smc_engram_backward_routed(g->c, du, &eg, &g->engram_rows, dy, u, idx,
                               m->cfg.use_nine ? m->ngram_hot : NULL, &ep, &s->engram_acts,
                               &m->engram_scratch, &m->cfg.engram, m->B, m->T);
}

static void smc__sublayer_backward(smc_model *g, sm_sublayer *s, float *du, const float *dy,
                                   const float *u) {
    smc__diag(g, s, SMC__DIAG_GRAD, dy);
    if (s->kind == SM_SUBLAYER_ENGRAM) smc__engram_backward(g, s, du, dy, u);
    else if (s->kind == SM_SUBLAYER_ATTN) smc__attn_backward(g, s, du, dy, u);
    else smc__ffn_backward(g, s, du, dy, u);
}

/* m->dres holds dL/dx_next on entry and dL/dx_in on return. */
static void smc__residual_backward(smc_model *g, sm_sublayer *s) {
    sm_model *m = &g->d;
    const sm_mhc_config *mc = &m->cfg.mhc;
    int N = m->B * m->T;
    size_t NC = (size_t)N * m->cfg.d_model;
    float *swap;
    if (!m->cfg.use_mhc) { /* dy = dx_next, and dx = dx_next + dF/dx^T dy */
        smc__copy(g->c, m->dy, m->dres, sizeof(float) * NC);
        smc__sublayer_backward(g, s, m->dres, m->dy, s->x_in);
        return;
    }
    {
        sm_mhc_params mp = sm__mhc_view(m, g->params.data, s);
        sm_mhc_params mg = sm__mhc_view(m, g->params.grad, s);
        smc_zero(g->c, m->dres_prev, sizeof(float) * NC * mc->n_streams);
        smc_zero(g->c, m->dy, sizeof(float) * NC);
        smc_zero(g->c, m->dmaps, sizeof(float) * (size_t)N * sm_mhc_map_count(mc->n_streams));
        smc_mhc_post_backward(g->c, m->dres_prev, m->dy, m->dmaps, m->dres, s->x_in, s->y,
                              &s->mhc_acts, mc, N);
        smc_zero(g->c, m->du, sizeof(float) * NC);
        smc__sublayer_backward(g, s, m->du, m->dy, s->u);
        smc_mhc_pre_backward(g->c, m->dres_prev, &mg, m->dmaps, m->du, s->x_in, &s->mhc_acts, &mp,
                             mc, N);
    }
    swap = m->dres, m->dres = m->dres_prev, m->dres_prev = swap;
}

SMDEF void smc_model_backward(smc_model *g) {
    sm_model *m = &g->d;
    const sm_model_config *c = &m->cfg;
    const float *w = g->params.data;
    float *gr = g->params.grad;
    int i, N = m->B * m->T, C = c->d_model, V = c->vocab_size;
    size_t NC = (size_t)N * C;
    float dloss = m->n_counted ? 1.0f / (float)m->n_counted : 0.0f;
    /* m->logits holds the probabilities; turn them into dlogits in place */
    smc_crossentropy_backward(g->c, m->logits, m->logits, m->targets, N, V, dloss);
    smc_sgemm(g->c, 0, 0, N, C, V, 1.0f, m->logits, V, w + m->head_w, C, 0.0f, m->dln, C);
    smc_sgemm(g->c, 1, 0, V, C, N, 1.0f, m->logits, V, m->lnf, C, 1.0f, gr + m->head_w, C);
    smc_zero(g->c, m->du, sizeof(float) * NC);
    smc__norm_backward(g, m->du, m->dln, m->x_out, m->lnf_mean, m->lnf_rstd, m->lnf_w, m->lnf_b,
                       N);
    if (c->use_mhc) {
        smc_zero(g->c, m->dres, sizeof(float) * NC * c->mhc.n_streams);
        smc_mhc_collapse_backward(g->c, m->dres, m->du, N, c->mhc.n_streams, C);
    } else {
        smc__copy(g->c, m->dres, m->du, sizeof(float) * NC);
    }
    for (i = m->n_sub - 1; i >= 0; i--) smc__residual_backward(g, &m->sub[i]);
    smc_zero(g->c, m->du, sizeof(float) * NC);
    if (c->use_mhc)
        smc_mhc_expand_backward(g->c, m->du, m->dres, N, c->mhc.n_streams, C);
    else
        smc__copy(g->c, m->du, m->dres, sizeof(float) * NC);
    smc_embedding_backward(g->c, gr + m->wte, gr + m->wpe, m->du, m->inputs, m->B, m->T, C);
}

/* ---- set-up ---- */

/* The Engram side of a batch on the device: hash tables, hot set and canon
 * table (uploaded from the host model), tokens, document starts, rows,
 * hot flags and the layer's backward scratch. */
static sm_status smc__alloc_engram_batch(smc_model *g, size_t N, sm_error *err) {
    sm_model *m = &g->d, *h = g->host;
    const sm_model_config *c = &m->cfg;
    sm_status st = smc_engram_scratch_alloc(&m->engram_scratch, &c->engram, (int)N, err);
    if (st == SM_OK) st = smc_ngram_hash_upload(&g->hash, &h->hash, err);
    if (st == SM_OK && h->has_hot_set) st = smc_nine_upload(&g->nine, &h->nine, err);
    if (st != SM_OK) return st;
    g->canon = (uint32_t *)smc_malloc((size_t)c->vocab_size * 4, "canon table", err);
    if (!g->canon) return SM_ERR_OOM;
    if ((st = smc_upload(g->canon, h->canon, (size_t)c->vocab_size * 4, err)) != SM_OK) return st;
    g->doc_start = (unsigned char *)smc_malloc(N, "document starts", err);
    m->ngram_tokens = g->doc_start ? (uint32_t *)smc_malloc(N * 4, "n-gram tokens", err) : NULL;
    m->ngram_idx = m->ngram_tokens ? (uint32_t *)smc_malloc(
                                         N * m->hash.n_slots * c->engram.hash.n_layers * 4,
                                         "n-gram indices", err)
                                   : NULL;
    m->ngram_hot = m->ngram_idx ? (unsigned char *)smc_malloc(N * c->engram.hash.n_orders,
                                                              "hot flags", err)
                                : NULL;
    return m->ngram_hot ? SM_OK : SM_ERR_OOM;
}

/* The shadow's activations: the CPU model's carving over device arenas,
 * plus device module activations and batch buffers. */
static sm_status smc__alloc_shadow(smc_model *g, sm_error *err) {
    sm_model *m = &g->d;
    const sm_model_config *c = &m->cfg;
    size_t N = (size_t)m->B_max * c->seq_len;
    sm__arena count = {NULL, 0}, arena;
    sm_status st = SM_OK;
    int i;
    sm__carve_acts(m, &count);
    if (!(m->act_mem = (float *)smc_malloc(count.used * 4, "activations", err))) return SM_ERR_OOM;
    arena.base = m->act_mem, arena.used = 0;
    sm__carve_acts(m, &arena);
    count.used = 0;
    sm__carve_grads(m, &count);
    if (!(m->grad_mem = (float *)smc_malloc(count.used * 4, "activation gradients", err)))
        return SM_ERR_OOM;
    arena.base = m->grad_mem, arena.used = 0;
    sm__carve_grads(m, &arena);
    g->att_scratch = (float *)smc_malloc(
        smc_attention_scratch_floats(m->B_max, c->seq_len, c->d_model, c->n_head) * 4,
        "attention scratch", err);
    if (!g->att_scratch) return SM_ERR_OOM;
    m->inputs = (int *)smc_malloc(N * sizeof(int), "inputs", err);
    m->targets = m->inputs ? (int *)smc_malloc(N * sizeof(int), "targets", err) : NULL;
    if (!m->targets) return SM_ERR_OOM;
    for (i = 0; i < m->n_sub && st == SM_OK; i++) {
        sm_sublayer *s = &m->sub[i];
        if (s->kind == SM_SUBLAYER_ENGRAM)
            st = smc_engram_acts_alloc(&s->engram_acts, &c->engram, (int)N, err);
        if (s->has_peer) st = smc_peer_acts_init(&s->peer_acts, &c->peer, c->d_model, (int)N, err);
    }
    if (st != SM_OK || !c->use_engram) return st;
    return smc__alloc_engram_batch(g, N, err);
}

/* The shadow starts as a copy of the host model with every host pointer
 * cleared, so nothing host-side is ever freed or written through it. */
static void smc__shadow_from_host(smc_model *g) {
    sm_model *m = &g->d;
    int i;
    *m = *g->host;
    memset(&m->params, 0, sizeof m->params);
    memset(&m->engram_rows, 0, sizeof m->engram_rows);
    memset(&m->nine, 0, sizeof m->nine);
    memset(&m->engram_scratch, 0, sizeof m->engram_scratch);
    m->hash.mult = NULL, m->hash.primes = NULL, m->hash.offsets = NULL; /* sizes stay */
    m->canon = m->ngram_tokens = m->ngram_idx = NULL;
    m->ngram_hot = m->doc_start = NULL;
    m->inputs = m->targets = NULL;
    m->act_mem = m->grad_mem = NULL;
    for (i = 0; i < m->n_sub; i++) {
        memset(&m->sub[i].engram_acts, 0, sizeof m->sub[i].engram_acts);
        memset(&m->sub[i].peer_acts, 0, sizeof m->sub[i].peer_acts);
        memset(&m->sub[i].peer_rows, 0, sizeof m->sub[i].peer_rows);
    }
}

/* Device row sets for the sparse tables (the Engram table, each PEER
 * layer's experts), bound to the tensors the host sets belong to. */
static sm_status smc__bind_sparse_tables(smc_model *g, sm_error *err) {
    sm_model *h = g->host;
    sm_status st = SM_OK;
    int i, k;
    if (h->cfg.use_engram) st = smc_row_set_init(&g->engram_rows, h->engram_rows.nrows, err);
    for (i = 0; i < h->n_sub && st == SM_OK; i++)
        if (h->sub[i].has_peer) st = smc_row_set_init(&g->peer_rows[i], h->sub[i].peer_rows.nrows, err);
    for (k = 0; k < h->params.n_tensors && st == SM_OK; k++) {
        const sm_row_set *rows = h->params.tensors[k].rows;
        if (rows == &h->engram_rows) smc_params_bind_rows(&g->params, k, &g->engram_rows);
        for (i = 0; i < h->n_sub; i++)
            if (h->sub[i].has_peer && rows == &h->sub[i].peer_rows)
                smc_params_bind_rows(&g->params, k, &g->peer_rows[i]);
    }
    return st == SM_OK ? smc_params_check(&g->params, err) : st;
}

SMDEF sm_status smc_model_init(smc_model *g, smc_ctx *c, sm_model *host, sm_error *err) {
    sm_status st;
    memset(g, 0, sizeof *g);
    if (host->cfg.use_engram && host->cfg.engram.n_streams > 1)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "smc_model: Engram inside mHC in the per-stream form (engram_mhc = "
                       "SM_ENGRAM_MHC_PER_STREAM) is not implemented on the GPU; build the model "
                       "with engram_mhc = SM_ENGRAM_MHC_BRANCH");
    g->host = host;
    g->c = c;
    smc__shadow_from_host(g);
    st = smc_params_alloc(&g->params, &host->params, err);
    if (st == SM_OK) st = smc__bind_sparse_tables(g, err);
    if (st == SM_OK) st = smc__alloc_shadow(g, err);
    if (st == SM_OK)
        st = (g->diag = (float *)smc_malloc((size_t)host->n_sub * 3 * 4, "diagnostics", err)) ? SM_OK
                                                                                             : SM_ERR_OOM;
    if (st == SM_OK) st = smc_model_upload(g, err);
    if (st != SM_OK) smc_model_free(g);
    return st;
}

SMDEF void smc_model_free(smc_model *g) {
    sm_model *m = &g->d;
    int i;
    for (i = 0; i < m->n_sub; i++) {
        if (m->sub[i].kind == SM_SUBLAYER_ENGRAM) smc_engram_acts_free(&m->sub[i].engram_acts);
        if (m->sub[i].has_peer) smc_peer_acts_free(&m->sub[i].peer_acts);
    }
    smc_engram_scratch_free(&m->engram_scratch);
    smc_dfree(m->act_mem);
    smc_dfree(m->grad_mem);
    smc_dfree(m->inputs);
    smc_dfree(m->targets);
    smc_dfree(m->ngram_tokens);
    smc_dfree(m->ngram_idx);
    smc_dfree(m->ngram_hot);
    smc_dfree(g->canon);
    smc_dfree(g->doc_start);
    smc_ngram_hash_free(&g->hash);
    smc_nine_free(&g->nine);
    smc_dfree(g->diag);
    smc_dfree(g->att_scratch);
    smc_row_set_free(&g->engram_rows);
    for (i = 0; i < m->n_sub; i++) smc_row_set_free(&g->peer_rows[i]);
    smc_params_free(&g->params);
    memset(g, 0, sizeof *g);
}

SMDEF sm_status smc_model_download(smc_model *g, sm_error *err) {
    return smc_params_download(g->c, &g->params, err);
}

SMDEF sm_status smc_model_upload(smc_model *g, sm_error *err) {
    return smc_params_upload(g->c, &g->params, err);
}

SMDEF sm_status smc_model_fetch_diagnostics(smc_model *g, sm_error *err) {
    float d[3 * SM_MAX_SUBLAYERS];
    int i;
    sm_status st = smc_sync(g->c, "diagnostics", err);
    if (st == SM_OK) st = smc_download(d, g->diag, (size_t)g->host->n_sub * 3 * 4, err);
    for (i = 0; i < g->host->n_sub && st == SM_OK; i++) {
        g->host->sub[i].out_norm = d[3 * i + SMC__DIAG_OUT];
        g->host->sub[i].peer_norm = d[3 * i + SMC__DIAG_PEER];
        g->host->sub[i].grad_norm = sqrt((double)d[3 * i + SMC__DIAG_GRAD]);
    }
    return st;
}

#endif /* SPARSEMEM_CUDA_IMPLEMENTATION_DONE */
#endif /* SPARSEMEM_CUDA_IMPLEMENTATION */
