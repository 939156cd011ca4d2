/* trainer.c - the sparsemem reference trainer.
 *
 *   trainer tokenize --data TEXT_PATH --out DIR [--vocab 8192 | --tokenizer gpt2:DIR]
 *   trainer train    --data DIR_OR_TEXT --out RUN_DIR [options]
 *   trainer eval     --ckpt RUN_DIR/model.ckpt --data DIR
 *   trainer sample   --ckpt RUN_DIR/model.ckpt [--prompt TEXT]
 *   trainer export   --ckpt RUN_DIR/model.ckpt --format safetensors --out MODEL.safetensors
 *   trainer report   --out REPORT_DIR RUN_DIR...
 *   trainer plot     --data LOG.csv --y COL,COL --out CHART.png
 *   trainer --help   every option, with its default and range (COMMAND --help: one command)
 *
 * A GPT-style model (sparsemem.h) with optional Engram, PEER and mHC
 * modules, trained on CPU (or the GPU: --device cuda in a build with
 * CUDA, `make trainer_cuda`); per-module learning-rate schedules for the
 * "Redundancy Bottleneck" study; diagnostics logged as CSV per evaluation
 * and drawn as PNG plots.
 *
 * Data parallel on several processes (`make trainer_mpi`, built with MPI):
 *   mpirun -np N ./trainer_mpi train ... (the same options on every rank)
 * Each rank trains on its 1/N of every global batch (--batch stays the
 * global batch); the gradients are summed over the ranks
 * (sm_params_allreduce_grads), so every rank takes the same step. Rank 0
 * alone evaluates and writes the logs, checkpoints and plots. On GPUs
 * (`make trainer_cuda_mpi`): mpirun -np N ./trainer_cuda_mpi train
 * --device cuda ...; the ranks of a node take its GPUs in turn, and the
 * gradients are summed with NCCL when every rank has a GPU of its own, else
 * through host memory with MPI (smc_params_allreduce_grads). */
#define _POSIX_C_SOURCE 200809L
#ifdef TR_WITH_CUDA /* built by `make trainer_cuda`: the library comes from trainer_cuda.cu */
#include "sparsemem_cuda.cuh"
#else
#define SPARSEMEM_IMPLEMENTATION
#include "sparsemem.h"
#endif

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define SPARSEMEM_PLOT_IMPLEMENTATION
#include "sparsemem_plot.h" /* the PNG charts and the CSV reader */

/* ===================================================================== */
/* Options                                                               */
/* ===================================================================== */

#define TR_MAX_PHASES 16
#define TR_PATH 1024

/* Module groups a schedule can address. "engram" drives both Engram groups
 * (the table keeps its own lr multiple of the dense part). */
enum { TR_G_BACKBONE, TR_G_ENGRAM, TR_G_PEER, TR_G_MHC, TR_N_MODULES };
static const char *const tr_module_names[TR_N_MODULES] = {"backbone", "engram", "peer", "mhc"};

/* One phase of a schedule: from step `start` on, module m trains at
 * lr[m] (absolute; < 0 = unchanged from the previous phase). */
typedef struct {
    long start;
    double start_frac; /* >= 0: start given as a fraction of the run */
    float lr[TR_N_MODULES];
} tr_phase;

typedef struct {
    /* what to do */
    char data[TR_PATH], out[TR_PATH], ckpt[TR_PATH], prompt[TR_PATH];
    char preset[32], schedule[512], engram_layers[128], peer_layers[128], strategy[32];
    char device[16], precision[8];
    char init[TR_PATH], format[16];
    char tokenizer[TR_PATH], tag[64], baseline[64], x_col[32], y_cols[256], title[128];
    char arch[16];
    char xlabel[128], ylabel[128];
    int log_x, log_y;
    int resume, threads, vocab, quiet;
    int shard_tables;     /* several processes: each holds its shard of the tables */
    long stop_after;      /* stop (with a checkpoint) after this step; 0 = run to the end */
    long debug_nan_step;  /* tests only: poison a weight before this step (-1 = never) */
    long debug_kill_step; /* tests only: SIGKILL the process at this step (-1 = never), */
    int debug_kill_in_ckpt; /* inside its checkpoint (written, not renamed) or after it */
    float val_frac;
    /* model */
    int n_layer, d_model, n_head, seq_len, d_ff;
    int engram_heads, engram_d_head, engram_shared, engram_no_sqrt;
    long engram_rows;
    int peer_experts_sqrt, peer_heads, peer_topk, peer_d_key, peer_add, peer_shared_keys;
    int mhc_streams, mhc_static;
    char engram_mhc[16];  /* per-stream | branch; empty: per-stream, branch with --device cuda */
    long nine, hot_labels;
    char nine_route[16];
    int nine_hot_key, nine_hot_gate;
    /* training */
    int batch, eval_batches;
    long steps, warmup, eval_every, ckpt_every, diag_every;
    float lr, min_lr_ratio, weight_decay, grad_clip;
    float lr_engram, lr_peer, lr_mhc; /* < 0: same as lr (table: x5) */
    int coord_every;
    uint64_t seed, data_seed;
    /* sample */
    int sample_tokens, top_k;
    float temperature;
    /* parsed schedule */
    tr_phase phases[TR_MAX_PHASES];
    int n_phases;
} tr_opts;

typedef enum { O_INT, O_LONG, O_FLOAT, O_STR, O_FLAG, O_U64 } tr_opt_kind;

/* One option: its field, and for a number the values it accepts, [lo, hi]
 * or with lo_open (lo, hi]. A value out of range is an error naming the
 * option and the range, before it reaches any arithmetic. */
typedef struct {
    const char *name;
    tr_opt_kind kind;
    size_t offset, size;
    double lo, hi;
    int lo_open;
    const char *help;
} tr_opt_spec;

#define TR_FIELD(field) offsetof(tr_opts, field), sizeof(((tr_opts *)0)->field)
/* a string or a flag */
#define OPT(name, kind, field, help) {name, kind, TR_FIELD(field), 0, 0, 0, help}
/* a number in [lo, hi]; NUM_GT: in (lo, hi] */
#define NUM(name, kind, field, lo, hi, help) {name, kind, TR_FIELD(field), lo, hi, 0, help}
#define NUM_GT(name, kind, field, lo, hi, help) {name, kind, TR_FIELD(field), lo, hi, 1, help}
#define TR_STEPS_MAX 1e9 /* step counts and intervals */
#define TR_U32_MAX 4294967295.0
#define TR_U64_MAX 18446744073709551615.0

static const tr_opt_spec tr_specs[] = {
    OPT("data", O_STR, data, "text file/folder, or a folder made by `tokenize`"),
    OPT("out", O_STR, out, "output folder (run, tokenized data, or report)"),
    OPT("ckpt", O_STR, ckpt, "checkpoint file (eval, sample, export), or a .safetensors export (eval, sample: with --data)"),
    OPT("format", O_STR, format, "export: the file format: safetensors"),
    OPT("resume", O_FLAG, resume, "continue from OUT/model.ckpt"),
    OPT("shard-tables", O_FLAG, shard_tables, "under mpirun: Engram rows and PEER experts sharded over the processes"),
    NUM("stop-after", O_LONG, stop_after, 0, TR_STEPS_MAX, "stop with a checkpoint after this step (0 = run to the end)"),
    OPT("preset", O_STR, preset, "model/training preset: tiny | small | gpt2s"),
    OPT("arch", O_STR, arch, "backbone: rmsnorm (default) | gpt2 (LayerNorm with bias, vocabulary padded to a multiple of 128 as llm.c)"),
    OPT("init", O_STR, init, "train: start from an llm.c GPT-2 model file (gpt2_124M.bin: its shape and weights, modules "
                             "added closed; data tokenized with --tokenizer gpt2:DIR), or from a .safetensors export (the "
                             "options must build the same model)"),
    NUM("seed", O_U64, seed, 0, TR_U64_MAX, "model initialisation seed"),
    NUM("data-seed", O_U64, data_seed, 0, TR_U64_MAX, "batch sampling seed"),
    NUM("threads", O_INT, threads, 0, 4096, "OpenMP threads (0 = all cores)"),
    OPT("device", O_STR, device, "train on: cpu | cuda (make trainer_cuda; GPU ranks under mpirun: make trainer_cuda_mpi)"),
    OPT("precision", O_STR, precision, "GPU GEMMs: tf32 (default with cuda) | fp32 (as the CPU)"),
    OPT("quiet", O_FLAG, quiet, "no progress line"),
    NUM("vocab", O_INT, vocab, SM_BPE_MIN_VOCAB, SM_BPE_MAX_VOCAB, "BPE vocabulary size (tokenize)"),
    NUM_GT("val-frac", O_FLOAT, val_frac, 0, 1, "fraction of documents held out for validation (1 = all: an evaluation set)"),
    OPT("tokenizer", O_STR, tokenizer, "tokenize: reuse this tokenizer.bin instead of training one, or "
                                       "gpt2:DIR for GPT-2's (DIR/encoder.json, vocab.bpe; also writes llm.c .bin shards)"),
    OPT("tag", O_STR, tag, "eval: also write RUN/eval_TAG.json (e.g. a cross-domain set)"),
    OPT("baseline", O_STR, baseline, "report: the run label the others are compared with"),
    OPT("x", O_STR, x_col, "plot: x column of the CSV"),
    OPT("y", O_STR, y_cols, "plot: y columns of the CSV, comma-separated, each COL or COL=legend name"),
    OPT("title", O_STR, title, "plot: chart title"),
    OPT("xlabel", O_STR, xlabel, "plot: x axis label (default: the x column)"),
    OPT("ylabel", O_STR, ylabel, "plot: y axis label, with its unit"),
    OPT("log-x", O_FLAG, log_x, "plot: logarithmic x axis"),
    OPT("log-y", O_FLAG, log_y, "plot: logarithmic y axis"),
    NUM("layers", O_INT, n_layer, 1, SM_MAX_SUBLAYERS / 3, "transformer layers"),
    NUM("d-model", O_INT, d_model, 1, 65536, "model width"),
    NUM("heads", O_INT, n_head, 1, 65536, "attention heads"),
    NUM("d-ff", O_INT, d_ff, 0, 1 << 20, "MLP hidden width (0 = 4 x d-model)"),
    NUM("seq", O_INT, seq_len, 1, 65536, "sequence length T"),
    NUM("batch", O_INT, batch, 1, 65536, "sequences per step B"),
    NUM("steps", O_LONG, steps, 1, TR_STEPS_MAX, "training steps"),
    NUM_GT("lr", O_FLOAT, lr, 0, 10, "peak learning rate (backbone)"),
    NUM("lr-engram", O_FLOAT, lr_engram, -1, 10, "Engram lr (< 0: same as --lr; its table trains at 5x)"),
    NUM("lr-peer", O_FLOAT, lr_peer, -1, 10, "PEER lr (< 0: same as --lr)"),
    NUM("lr-mhc", O_FLOAT, lr_mhc, -1, 10, "mHC lr (< 0: same as --lr)"),
    NUM("min-lr-ratio", O_FLOAT, min_lr_ratio, 0, 1, "cosine schedule floor, as a fraction of the peak"),
    NUM("warmup", O_LONG, warmup, 0, TR_STEPS_MAX, "linear warmup steps"),
    NUM("weight-decay", O_FLOAT, weight_decay, 0, 10, "AdamW weight decay (matrices only)"),
    NUM("grad-clip", O_FLOAT, grad_clip, 0, 1e6, "global gradient-norm clip (0 = off)"),
    NUM("eval-every", O_LONG, eval_every, 0, TR_STEPS_MAX, "steps between evaluations (0 = only at the end)"),
    NUM("eval-batches", O_INT, eval_batches, 0, TR_STEPS_MAX, "validation batches per eval (0 = all of it)"),
    NUM("diag-every", O_LONG, diag_every, 0, TR_STEPS_MAX, "steps between rows of diag.csv, the training-time module diagnostics (0 = off)"),
    NUM("ckpt-every", O_LONG, ckpt_every, 0, TR_STEPS_MAX, "steps between checkpoints (0 = only at the end)"),
    OPT("engram", O_STR, engram_layers, "Engram at these layers, e.g. 1 or 1,3 (empty = off)"),
    NUM("engram-rows", O_LONG, engram_rows, 2, 2147483648.0, "Engram table rows per head (a prime >= it is used)"),
    NUM("engram-heads", O_INT, engram_heads, 1, SM_NGRAM_MAX_HEADS, "Engram hash heads per n-gram order"),
    NUM("engram-d-head", O_INT, engram_d_head, 1, 4096, "Engram row width per head"),
    OPT("engram-shared", O_FLAG, engram_shared, "one Engram table for all Engram layers"),
    OPT("engram-no-sqrt", O_FLAG, engram_no_sqrt, "plain gate (paper) instead of signed sqrt"),
    NUM("nine", O_LONG, nine, 0, TR_U32_MAX, "Engram-Nine hot tier: top-N n-grams per order (0 = off); iso-parameter with --engram-rows"),
    NUM("hot-labels", O_LONG, hot_labels, 0, TR_U32_MAX, "hash-only Engram: label the top-N n-grams hot for route-stratified eval"),
    OPT("nine-route", O_STR, nine_route, "hot-tier indexing: mphf (collision-free) | membership (hashed)"),
    OPT("nine-hot-key", O_FLAG, nine_hot_key, "separate W_K for hot-tier memory (variant)"),
    OPT("nine-hot-gate", O_FLAG, nine_hot_gate, "feed a hot-tier indicator to the gate (variant)"),
    OPT("peer", O_STR, peer_layers, "PEER at these layers (empty = off)"),
    NUM("peer-sqrt-experts", O_INT, peer_experts_sqrt, 1, SM_PEER_MAX_SUB, "s: PEER has s*s experts"),
    NUM("peer-heads", O_INT, peer_heads, 1, 4096, "PEER retrieval heads"),
    NUM("peer-topk", O_INT, peer_topk, 1, SM_TOPK_MAX, "PEER experts per head"),
    NUM("peer-d-key", O_INT, peer_d_key, 2, 65536, "PEER query/key width (even)"),
    NUM("peer-shared-keys", O_INT, peer_shared_keys, 0, 1, "PEER sub-keys: 1 = one set for all heads (paper), 0 = one per head"),
    OPT("peer-add", O_FLAG, peer_add, "add PEER to the MLP instead of replacing it"),
    NUM("mhc", O_INT, mhc_streams, 0, SM_SINKHORN_MAX_N, "mHC residual streams (0 = off, 4 = paper)"),
    OPT("mhc-static", O_FLAG, mhc_static, "static mHC maps (no input dependence)"),
    OPT("engram-mhc", O_STR, engram_mhc, "Engram with mHC: per-stream (reference code; default) | branch (--device cuda: branch)"),
    OPT("strategy", O_STR, strategy, "joint | freeze | differential | auto (see --schedule)"),
    OPT("schedule", O_STR, schedule, "phases 'START:module=lr,...;...' (START a step or N%)"),
    NUM("coord-every", O_INT, coord_every, 0, TR_STEPS_MAX, "steps between automatic lr adjustments (auto; 0 = never)"),
    OPT("prompt", O_STR, prompt, "sample: text to continue"),
    NUM("tokens", O_INT, sample_tokens, 1, 1000000, "sample: tokens to generate"),
    NUM_GT("temperature", O_FLOAT, temperature, 0, 100, "sample: softmax temperature"),
    NUM("top-k", O_INT, top_k, 0, SM_TOPK_MAX, "sample: keep the k most likely tokens (0 = all)"),
};
#define TR_N_SPECS ((int)(sizeof tr_specs / sizeof tr_specs[0]))

static void tr_defaults(tr_opts *o) {
    memset(o, 0, sizeof *o);
    strcpy(o->preset, "tiny");
    strcpy(o->strategy, "joint");
    strcpy(o->baseline, "baseline");
    strcpy(o->nine_route, "mphf");
    strcpy(o->x_col, "step");
    o->seed = 1;
    o->data_seed = 1337;
    o->vocab = 8192;
    o->val_frac = 0.05f;
    o->n_layer = 4, o->d_model = 128, o->n_head = 4, o->seq_len = 128;
    o->batch = 8, o->steps = 600, o->eval_every = 100, o->eval_batches = 0, o->diag_every = 10;
    o->lr = 1e-3f, o->min_lr_ratio = 0.1f, o->warmup = 50, o->weight_decay = 0.1f;
    o->grad_clip = 1.0f;
    o->lr_engram = o->lr_peer = o->lr_mhc = -1.0f;
    o->engram_rows = 20011, o->engram_heads = 4, o->engram_d_head = 16;
    o->peer_experts_sqrt = 64, o->peer_heads = 4, o->peer_topk = 8, o->peer_d_key = 64;
    o->peer_shared_keys = 1;
    o->coord_every = 20;
    o->debug_nan_step = o->debug_kill_step = -1;
    o->sample_tokens = 200, o->temperature = 0.8f, o->top_k = 40;
}

/* Presets set the model shape and step budget; explicit options override. */
static int tr_apply_preset(tr_opts *o, const char *name) {
    if (strcmp(name, "tiny") == 0) {
        o->n_layer = 4, o->d_model = 128, o->n_head = 4, o->seq_len = 128, o->batch = 8;
        o->steps = 600, o->eval_every = 100, o->diag_every = 10;
    } else if (strcmp(name, "small") == 0) {
        o->n_layer = 6, o->d_model = 256, o->n_head = 8, o->seq_len = 256, o->batch = 16;
        o->steps = 3000, o->eval_every = 250, o->diag_every = 50;
    } else if (strcmp(name, "gpt2s") == 0) {
        o->n_layer = 12, o->d_model = 768, o->n_head = 12, o->seq_len = 1024, o->batch = 8;
        o->steps = 20000, o->eval_every = 1000, o->diag_every = 200, o->lr = 6e-4f;
    } else {
        return -1;
    }
    return 0;
}

/* The commands: name, arguments, what it does. */
static const char *const tr_commands[][3] = {
    {"tokenize", "--data TEXT_PATH --out DIR [--vocab N --val-frac F --tokenizer FILE|gpt2:DIR]",
     "train a BPE tokenizer on --data and write tokenizer + train/val tokens to --out"},
    {"train", "--data DIR_OR_TEXT --out RUN_DIR [options]",
     "train a model on --data (tokenized folder, or text: tokenized first) into --out"},
    {"eval", "--ckpt RUN_DIR/model.ckpt [--data DIR --tag TAG]", "evaluate --ckpt on the validation split of --data"},
    {"sample", "--ckpt RUN_DIR/model.ckpt [--prompt TEXT --tokens N]", "generate text from --ckpt"},
    {"export", "--ckpt RUN_DIR/model.ckpt --format safetensors --out MODEL.safetensors",
     "write --ckpt's weights and model config as safetensors (backbone under HF GPT-2 names)"},
    {"report", "--out DIR RUN_DIR...", "tables + plots from finished runs"},
    {"plot", "--data F.csv --x step --y a,b=legend --out F.png", "a line chart of CSV columns"},
};
#define TR_N_COMMANDS ((int)(sizeof tr_commands / sizeof tr_commands[0]))

static int tr_command_index(const char *cmd) {
    int c;
    for (c = 0; c < TR_N_COMMANDS; c++)
        if (strcmp(tr_commands[c][0], cmd) == 0) return c;
    return -1;
}

/* "[1, 65536]", "(0, 10]": the values a numeric option accepts. */
static void tr_format_range(const tr_opt_spec *s, char *out, size_t n) {
    if (s->kind == O_FLOAT)
        snprintf(out, n, "%s%g, %g]", s->lo_open ? "(" : "[", s->lo, s->hi);
    else
        snprintf(out, n, "%s%.0f, %.0f]", s->lo_open ? "(" : "[", s->lo, s->hi);
}

/* Every option with its default and range; for one command (cmd >= 0)
 * its arguments first, else the list of commands. */
static void tr_usage(FILE *f, int cmd) {
    int i;
    tr_opts d;
    tr_defaults(&d);
    if (cmd >= 0) {
        fprintf(f, "usage: trainer %s %s\n  %s\n\n", tr_commands[cmd][0], tr_commands[cmd][1], tr_commands[cmd][2]);
    } else {
        fprintf(f, "usage: trainer COMMAND [options]   (trainer COMMAND --help: that command)\n\ncommands:\n");
        for (i = 0; i < TR_N_COMMANDS; i++) fprintf(f, "  %-9s %s\n", tr_commands[i][0], tr_commands[i][2]);
        fprintf(f, "\n");
    }
    fprintf(f, "options (--name VALUE or --name=VALUE):\n");
    for (i = 0; i < TR_N_SPECS; i++) {
        const tr_opt_spec *s = &tr_specs[i];
        const char *p = (const char *)&d + s->offset;
        char def[64] = "", range[64] = "";
        switch (s->kind) {
        case O_INT: snprintf(def, sizeof def, "%d", *(const int *)p); break;
        case O_LONG: snprintf(def, sizeof def, "%ld", *(const long *)p); break;
        case O_FLOAT: snprintf(def, sizeof def, "%g", *(const float *)p); break;
        case O_U64: snprintf(def, sizeof def, "%llu", (unsigned long long)*(const uint64_t *)p); break;
        case O_STR: snprintf(def, sizeof def, "%s", p); break;
        case O_FLAG: break;
        }
        if (s->kind != O_STR && s->kind != O_FLAG && s->kind != O_U64) tr_format_range(s, range, sizeof range);
        fprintf(f, "  --%-18s %s%s%s%s%s%s\n", s->name, s->help, def[0] ? " [" : "", def, def[0] ? "]" : "",
                range[0] ? ", in " : "", range);
    }
    if (cmd >= 0 && strcmp(tr_commands[cmd][0], "train") != 0) return;
    fprintf(f,
            "\nstrategies (module learning rates; see README):\n"
            "  joint         every module at --lr\n"
            "  differential  the write-up's 3 phases scaled to --steps: engram 1e-3/peer 1e-5/mhc 1e-3,\n"
            "                then engram 1e-5/peer 1e-3/mhc 1e-4, then all 5e-4 (phases at 0, 1/3, 2/3)\n"
            "  freeze        staggered freeze: like differential but the slowed modules get lr 0\n"
            "  auto          automatic coordination from measured output/gradient shares\n"
            "  --schedule overrides the phases, e.g. '0:engram=1e-3,peer=1e-5;50%%:all=5e-4'\n");
}

/* The number in val for a numeric option, checked: all of val is the
 * number, an integer fits its field, a float is finite, and the value is
 * in the option's range. Returns 0, or -1 with a message naming the option. */
static int tr_set_number(void *field, const tr_opt_spec *s, const char *val) {
    char *end = NULL, range[64];
    double v;
    long long i = 0;
    unsigned long long u = 0;
    errno = 0;
    if (s->kind == O_FLOAT) v = (float)strtod(val, &end); /* checked as stored */
    else if (s->kind == O_U64) v = (double)(u = strtoull(val, &end, 10));
    else v = (double)(i = strtoll(val, &end, 10));
    if (end == val || *end || (s->kind == O_U64 && strchr(val, '-'))) {
        fprintf(stderr, "trainer: --%s expects %s, got '%s'\n", s->name,
                s->kind == O_FLOAT ? "a number" : s->kind == O_U64 ? "a whole number >= 0" : "a whole number", val);
        return -1;
    }
    tr_format_range(s, range, sizeof range);
    if (s->kind == O_FLOAT && !isfinite(v)) {
        fprintf(stderr, "trainer: --%s expects a finite number in %s, got '%s'\n", s->name, range, val);
        return -1;
    }
    if (errno == ERANGE || !(s->lo_open ? v > s->lo : v >= s->lo) || !(v <= s->hi)) {
        fprintf(stderr, "trainer: --%s %s is out of range: it takes values in %s\n", s->name, val, range);
        return -1;
    }
    switch (s->kind) {
    case O_INT: *(int *)field = (int)i; break;
    case O_LONG: *(long *)field = (long)i; break;
    case O_FLOAT: *(float *)field = (float)v; break;
    case O_U64: *(uint64_t *)field = (uint64_t)u; break;
    default: break;
    }
    return 0;
}

static int tr_set_option(tr_opts *o, const tr_opt_spec *s, const char *val) {
    char *p = (char *)o + s->offset;
    switch (s->kind) {
    case O_STR:
        if (strlen(val) >= s->size) {
            fprintf(stderr, "trainer: --%s is too long (max %zu characters)\n", s->name, s->size - 1);
            return -1;
        }
        strcpy(p, val);
        return 0;
    case O_FLAG: *(int *)p = 1; return 0;
    default: return tr_set_number(p, s, val);
    }
}

/* --device: cpu, or cuda in a build with CUDA. */
static int tr_check_device(const char *device) {
    if (!device[0] || strcmp(device, "cpu") == 0) return 0;
    if (strcmp(device, "cuda") != 0) {
        fprintf(stderr, "trainer: --device %s: expected cpu or cuda\n", device);
        return -1;
    }
#ifndef TR_WITH_CUDA
    fprintf(stderr, "trainer: --device cuda: this trainer was built without CUDA; build the GPU "
                    "trainer with `make trainer_cuda` (needs nvcc) and run ./trainer_cuda\n");
    return -1;
#else
    return 0;
#endif
}

/* --precision: the GPU's GEMMs in TF32 (its default: 10-bit mantissa
 * inputs, fp32 accumulation) or in full fp32, as the CPU always computes;
 * tf32 on the CPU is refused rather than silently ignored. */
static int tr_check_precision(const char *precision, const char *device) {
    if (!precision[0] || strcmp(precision, "fp32") == 0) return 0;
    if (strcmp(precision, "tf32") != 0) {
        fprintf(stderr, "trainer: --precision %s: expected tf32 or fp32\n", precision);
        return -1;
    }
    if (strcmp(device, "cuda") != 0) {
        fprintf(stderr, "trainer: --precision tf32 is for --device cuda (the CPU computes in fp32)\n");
        return -1;
    }
    return 0;
}

/* Parses options after the command; positional arguments are collected
 * (pos has room for argc). Returns 0, -1 on an error (with a message), or
 * TR_HELP for --help / -h. */
#define TR_HELP 2
static int tr_parse(tr_opts *o, int argc, char **argv, char **pos, int *n_pos) {
    int i, j, k;
    *n_pos = 0;
    /* the preset first, so explicit options override it */
    for (i = 0; i < argc; i++)
        if (strncmp(argv[i], "--preset", 8) == 0) {
            const char *v = argv[i][8] == '=' ? argv[i] + 9 : (i + 1 < argc ? argv[i + 1] : "");
            if (tr_apply_preset(o, v) != 0) {
                fprintf(stderr, "trainer: unknown preset '%s' (tiny, small, gpt2s)\n", v);
                return -1;
            }
        }
    for (i = 0; i < argc; i++) {
        const char *a = argv[i], *eq;
        size_t len;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) return TR_HELP;
        if (strncmp(a, "--", 2) != 0) {
            pos[(*n_pos)++] = argv[i];
            continue;
        }
        a += 2;
        eq = strchr(a, '=');
        len = eq ? (size_t)(eq - a) : strlen(a);
        for (j = 0, k = -1; j < TR_N_SPECS; j++)
            if (strlen(tr_specs[j].name) == len && strncmp(tr_specs[j].name, a, len) == 0) k = j;
        if (k < 0) {
            fprintf(stderr, "trainer: unknown option --%.*s (see trainer --help)\n", (int)len, a);
            return -1;
        }
        if (tr_specs[k].kind == O_FLAG) {
            tr_set_option(o, &tr_specs[k], "");
            continue;
        }
        if (!eq && i + 1 >= argc) {
            fprintf(stderr, "trainer: --%s needs a value\n", tr_specs[k].name);
            return -1;
        }
        if (tr_set_option(o, &tr_specs[k], eq ? eq + 1 : argv[++i]) != 0) return -1;
    }
    return tr_check_device(o->device) != 0 || tr_check_precision(o->precision, o->device) != 0 ? -1 : 0;
}

/* "1,3" -> ids {1, 3}; returns the count, or -1 unless s is layer numbers
 * separated by single commas (no sign, no empty item, at most max). */
static int tr_parse_layers(const char *s, int *ids, int max) {
    int n = 0;
    while (*s) {
        long v = 0;
        if (!isdigit((unsigned char)*s) || n >= max) return -1;
        while (isdigit((unsigned char)*s) && v < 100000) v = v * 10 + (*s++ - '0');
        ids[n++] = (int)v;
        if (*s == ',' && s[1]) s++;
        else if (*s) return -1;
    }
    return n;
}

/* ===================================================================== */
/* Schedules                                                             */
/* ===================================================================== */

static int tr_module_index(const char *name, size_t len) {
    int m;
    for (m = 0; m < TR_N_MODULES; m++)
        if (strlen(tr_module_names[m]) == len && strncmp(tr_module_names[m], name, len) == 0) return m;
    return -1;
}

/* Parses "START:mod=lr,mod=lr;START:..." where START is a step or "N%" of
 * the run, mod is backbone|engram|peer|mhc|all and lr a number or
 * "freeze" (= 0). Phases must start in increasing order. On error writes a
 * message naming the problem into msg and returns -1. */
static int tr_parse_schedule(const char *spec, tr_phase *phases, int *n_phases, char *msg,
                             size_t msg_size) {
    const char *p = spec;
    int n = 0;
    while (*p) {
        tr_phase *ph;
        char *end;
        int m;
        if (n >= TR_MAX_PHASES) {
            snprintf(msg, msg_size, "more than %d phases", TR_MAX_PHASES);
            return -1;
        }
        ph = &phases[n];
        for (m = 0; m < TR_N_MODULES; m++) ph->lr[m] = -1.0f;
        ph->start_frac = -1.0;
        ph->start = strtol(p, &end, 10);
        if (end == p || ph->start < 0) {
            snprintf(msg, msg_size, "phase %d: expected a start step, got '%.20s'", n + 1, p);
            return -1;
        }
        if (*end == '%' || *end == '.') {
            double v = strtod(p, &end);
            if (*end != '%' || v < 0 || v > 100) {
                snprintf(msg, msg_size, "phase %d: bad percentage '%.20s'", n + 1, p);
                return -1;
            }
            ph->start_frac = v / 100.0;
            end++;
        }
        if (*end != ':') {
            snprintf(msg, msg_size, "phase %d: expected ':' after the start", n + 1);
            return -1;
        }
        p = end + 1;
        while (*p && *p != ';') {
            const char *eq = strchr(p, '=');
            float lr;
            if (!eq) {
                snprintf(msg, msg_size, "phase %d: expected module=lr at '%.20s'", n + 1, p);
                return -1;
            }
            m = tr_module_index(p, (size_t)(eq - p));
            if (m < 0 && !((size_t)(eq - p) == 3 && strncmp(p, "all", 3) == 0)) {
                snprintf(msg, msg_size, "phase %d: unknown module '%.*s' (backbone, engram, peer, mhc, all)",
                         n + 1, (int)(eq - p), p);
                return -1;
            }
            if (strncmp(eq + 1, "freeze", 6) == 0) {
                lr = 0.0f;
                end = (char *)eq + 7;
            } else {
                lr = strtof(eq + 1, &end);
                if (end == eq + 1 || lr < 0) {
                    snprintf(msg, msg_size, "phase %d: bad learning rate '%.20s'", n + 1, eq + 1);
                    return -1;
                }
            }
            if (m >= 0) {
                ph->lr[m] = lr;
            } else {
                int k;
                for (k = 0; k < TR_N_MODULES; k++) ph->lr[k] = lr;
            }
            p = end;
            if (*p == ',') p++;
            else if (*p && *p != ';') {
                snprintf(msg, msg_size, "phase %d: unexpected '%c'", n + 1, *p);
                return -1;
            }
        }
        if (*p == ';') p++;
        n++;
    }
    *n_phases = n;
    return 0;
}

/* Start step of a phase in a run of `steps` steps. */
static long tr_phase_start(const tr_phase *ph, long steps) {
    return ph->start_frac >= 0 ? (long)(ph->start_frac * (double)steps + 0.5) : ph->start;
}

/* The module lrs in force at `step`: each phase overrides what it names. */
static void tr_schedule_lrs(const tr_phase *phases, int n, long step, long steps,
                            float lr[TR_N_MODULES]) {
    int i, m;
    for (i = 0; i < n; i++) {
        if (tr_phase_start(&phases[i], steps) > step) break;
        for (m = 0; m < TR_N_MODULES; m++)
            if (phases[i].lr[m] >= 0) lr[m] = phases[i].lr[m];
    }
}

/* The strategies of the Redundancy Bottleneck study as schedules. The
 * write-up's phases were 1000 steps each of 3000; here they are thirds of
 * the run. "freeze" replaces the slowed modules' small lr by 0. */
static int tr_strategy_schedule(tr_opts *o, char *msg, size_t msg_size) {
    const char *spec = NULL;
    if (o->schedule[0]) spec = o->schedule;
    else if (strcmp(o->strategy, "differential") == 0)
        spec = "0:engram=1e-3,peer=1e-5,mhc=1e-3;33.3%:engram=1e-5,peer=1e-3,mhc=1e-4;66.7%:all=5e-4";
    else if (strcmp(o->strategy, "freeze") == 0)
        spec = "0:engram=1e-3,peer=freeze,mhc=1e-3;33.3%:engram=freeze,peer=1e-3,mhc=freeze;66.7%:all=5e-4";
    else if (strcmp(o->strategy, "joint") != 0 && strcmp(o->strategy, "auto") != 0) {
        snprintf(msg, msg_size, "unknown strategy '%s' (joint, freeze, differential, auto)", o->strategy);
        return -1;
    }
    o->n_phases = 0;
    return spec ? tr_parse_schedule(spec, o->phases, &o->n_phases, msg, msg_size) : 0;
}

/* ===================================================================== */
/* Data                                                                  */
/* ===================================================================== */

typedef struct {
    sm_bpe bpe;     /* our tokenizer; empty for GPT-2 tokens (gpt2) */
    sm_canon canon;
    sm_tokens train, val;
    uint32_t vocab; /* the tokens' vocabulary */
    int gpt2;       /* GPT-2 tokens (`tokenize --tokenizer gpt2:DIR`): no tokenizer.bin */
    char dir[TR_PATH];
} tr_data;

static void tr_die(const char *what, const sm_error *err) {
    fprintf(stderr, "trainer: %s: %s\n", what, err->msg[0] ? err->msg : sm_strerror(err->code));
    exit(1);
}

static int tr_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int tr_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

static void tr_mkdir(const char *path) {
    char tmp[TR_PATH];
    size_t i;
    snprintf(tmp, sizeof tmp, "%s", path);
    for (i = 1; tmp[i]; i++)
        if (tmp[i] == '/') {
            tmp[i] = 0;
            mkdir(tmp, 0755);
            tmp[i] = '/';
        }
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "trainer: cannot create folder %s: %s\n", path, strerror(errno));
        exit(1);
    }
}

static void tr_join(char *out, const char *dir, const char *name) {
    if (strlen(dir) + strlen(name) + 2 > TR_PATH) {
        fprintf(stderr, "trainer: path too long: %s/%s\n", dir, name);
        exit(1);
    }
    strcpy(out, dir);
    strcat(out, "/");
    strcat(out, name);
}

/* The corpus is text (the tokenizer takes any bytes, but binary data as
 * --data is a mistake, not a corpus). */
static void tr_check_utf8(const sm_corpus *c, const char *path) {
    size_t d;
    for (d = 0; d < c->n_docs; d++) {
        const unsigned char *text = c->text + c->doc_offsets[d];
        size_t n = c->doc_offsets[d + 1] - c->doc_offsets[d], ok = sm_utf8_valid_prefix(text, n);
        if (ok < n) {
            fprintf(stderr, "trainer: --data %s: document %zu is not UTF-8 text (byte 0x%02x at offset %zu); "
                            "give UTF-8 text, or a folder made by `trainer tokenize`\n", path, d + 1, text[ok], ok);
            exit(1);
        }
    }
}

/* Reads the UTF-8 corpus at text_path and splits it: documents
 * [0, *n_train_docs) train, the rest validation. */
static void tr_load_corpus(sm_corpus *corpus, const char *text_path, float val_frac,
                           size_t *n_train_docs) {
    sm_error err = {SM_OK, ""};
    if (sm_corpus_load(corpus, text_path, &err) != SM_OK) tr_die("reading the corpus", &err);
    tr_check_utf8(corpus, text_path);
    if (sm_corpus_split(corpus, val_frac, n_train_docs, &err) != SM_OK) tr_die("splitting the corpus", &err);
}

/* `trainer tokenize --tokenizer gpt2:DIR` (>>gpt2bpe): GPT-2's ids (the
 * tokenizer of DIR/encoder.json and DIR/vocab.bpe, each document after an
 * <|endoftext|>) into train.tok and val.tok, and the same as llm.c shards
 * train.bin and val.bin. */
static void tr_tokenize_gpt2(const char *text_path, const char *out_dir, float val_frac,
                             const char *gpt2_dir, int quiet) {
    sm_corpus corpus;
    sm_gpt2 g;
    sm_tokens split[2];
    sm_error err = {SM_OK, ""};
    static const char *const names[2][2] = {{"train.tok", "train.bin"}, {"val.tok", "val.bin"}};
    size_t n_train_docs = 0, i;
    char path[TR_PATH];
    double t0 = sm_now();
    tr_load_corpus(&corpus, text_path, val_frac, &n_train_docs);
    if (sm_gpt2_load_dir(&g, gpt2_dir, &err) != SM_OK) tr_die("--tokenizer gpt2:DIR", &err);
    memset(split, 0, sizeof split); /* no training split for an evaluation-only set (--val-frac 1) */
    if ((n_train_docs > 0 && sm_corpus_tokenize_gpt2(&g, &corpus, 0, n_train_docs, SM_GPT2_INVALID_REPLACE,
                                                     &split[0], &err) != SM_OK) ||
        sm_corpus_tokenize_gpt2(&g, &corpus, n_train_docs, corpus.n_docs, SM_GPT2_INVALID_REPLACE, &split[1],
                                &err) != SM_OK)
        tr_die("tokenizing", &err);
    if (!quiet) printf("tokens (GPT-2, %u): train %zu (%zu documents), val %zu (%zu documents), %.1f s\n",
                       g.vocab_size, split[0].n_tokens, split[0].n_docs, split[1].n_tokens, split[1].n_docs,
                       sm_now() - t0);
    tr_mkdir(out_dir);
    for (i = 0; i < 2; i++) {
        if (split[i].n_tokens == 0) continue;
        tr_join(path, out_dir, names[i][0]);
        if (sm_tokens_save(&split[i], path, &err) != SM_OK) tr_die("saving the tokens", &err);
        tr_join(path, out_dir, names[i][1]);
        if (sm_tokens_save_llmc(&split[i], path, &err) != SM_OK) tr_die("saving the llm.c shard", &err);
        sm_tokens_free(&split[i]);
    }
    sm_gpt2_free(&g);
    sm_corpus_free(&corpus);
}

/* Train a tokenizer on the training documents of `text_path` and write
 * tokenizer.bin, train.tok and val.tok into out_dir. */
static void tr_tokenize(const char *text_path, const char *out_dir, int vocab, float val_frac,
                        const char *tokenizer, int quiet) {
    sm_corpus corpus;
    sm_bpe bpe;
    sm_canon canon;
    sm_tokens train, val;
    sm_bpe_config bc = sm_bpe_default_config();
    sm_error err = {SM_OK, ""};
    size_t n_train_docs = 0, train_bytes;
    char path[TR_PATH];
    double t0;
    if (tokenizer && strncmp(tokenizer, "gpt2:", 5) == 0) {
        tr_tokenize_gpt2(text_path, out_dir, val_frac, tokenizer + 5, quiet);
        return;
    }
    tr_load_corpus(&corpus, text_path, val_frac, &n_train_docs);
    bc.vocab_size = (uint32_t)vocab;
    if (sm_bpe_config_validate(&bc, &err) != SM_OK) tr_die("--vocab", &err);
    train_bytes = corpus.doc_offsets[n_train_docs];
    t0 = sm_now();
    if (tokenizer && tokenizer[0]) {
        if (sm_bpe_load(&bpe, tokenizer, &err) != SM_OK) tr_die("--tokenizer", &err);
        if (!quiet) printf("tokenizer: %u tokens from %s\n", bpe.vocab_size, tokenizer);
    } else {
        if (sm_bpe_train(&bpe, &bc, corpus.text, train_bytes, &err) != SM_OK) tr_die("training the tokenizer", &err);
        if (!quiet) printf("tokenizer: %u tokens from %.1f MB of training text in %.2f s\n", bpe.vocab_size,
               train_bytes / 1e6, sm_now() - t0);
    }
    if (sm_canon_build(&canon, &bpe, &err) != SM_OK) tr_die("tokenizer compression", &err);
    if (!quiet) printf("compression: %u canonical ids for %u tokens (%.1f%% folded)\n", canon.n_canon,
           canon.vocab_size, 100.0 * sm_canon_ratio(&canon));
    t0 = sm_now();
    memset(&train, 0, sizeof train); /* empty for an evaluation-only set (--val-frac 1) */
    if ((n_train_docs > 0 && sm_corpus_tokenize(&bpe, &corpus, 0, n_train_docs, &train, &err) != SM_OK) ||
        sm_corpus_tokenize(&bpe, &corpus, n_train_docs, corpus.n_docs, &val, &err) != SM_OK)
        tr_die("tokenizing", &err);
    if (!quiet) printf("tokens: train %zu (%zu documents), val %zu (%zu documents), %.1f s\n", train.n_tokens,
           train.n_docs, val.n_tokens, val.n_docs, sm_now() - t0);
    tr_mkdir(out_dir);
    tr_join(path, out_dir, "tokenizer.bin");
    if (sm_bpe_save(&bpe, path, &err) != SM_OK) tr_die("saving the tokenizer", &err);
    tr_join(path, out_dir, "train.tok");
    if (n_train_docs > 0 && sm_tokens_save(&train, path, &err) != SM_OK) tr_die("saving train.tok", &err);
    tr_join(path, out_dir, "val.tok");
    if (sm_tokens_save(&val, path, &err) != SM_OK) tr_die("saving val.tok", &err);
    sm_tokens_free(&train), sm_tokens_free(&val), sm_canon_free(&canon), sm_bpe_free(&bpe);
    sm_corpus_free(&corpus);
}

/* --data is a folder made by `tokenize`, or text (tokenized into OUT/data).
 * The training split is loaded only when `train` is set. */
/* The processes training together: one by default; under MPI
 * (trainer_mpi) every rank of mpirun. Rank 0 is the one that writes. */
static sm_comm tr_world = {0, 1, SM_COMM_SINGLE, NULL, NULL};
static const sm_comm *tr_comm = &tr_world;

/* Every rank waits here until all arrive (rank 0 wrote what they read). */
static void tr_barrier(void) {
    sm_error err = {SM_OK, ""};
    if (sm_comm_barrier(tr_comm, &err) != SM_OK) tr_die("barrier", &err);
}

/* A folder of `tokenize --tokenizer gpt2:DIR`: GPT-2's token files (the
 * llm.c shard val.bin among them) and no tokenizer.bin. */
static int tr_is_gpt2_folder(const char *dir) {
    char path[TR_PATH];
    tr_join(path, dir, "tokenizer.bin");
    if (!tr_is_dir(dir) || tr_exists(path)) return 0;
    tr_join(path, dir, "val.bin");
    return tr_exists(path);
}

/* The tokenizer of a tokenized folder: ours (tokenizer.bin, with its
 * compression table for Engram), or none for GPT-2 tokens, whose
 * vocabulary (50257) the token files carry and whose ids Engram hashes as
 * they are (no compression table: the GPT-2 vocabulary files are not in
 * the folder). */
static void tr_load_tokenizer(tr_data *d) {
    char path[TR_PATH];
    sm_error err = {SM_OK, ""};
    d->gpt2 = tr_is_gpt2_folder(d->dir);
    if (d->gpt2) {
        tr_join(path, d->dir, "val.tok");
        if (sm_tokens_load(&d->val, path, 0, &err) != SM_OK) tr_die("loading val.tok", &err);
        d->vocab = d->val.vocab_size;
        sm_tokens_free(&d->val);
        return;
    }
    tr_join(path, d->dir, "tokenizer.bin");
    if (sm_bpe_load(&d->bpe, path, &err) != SM_OK) tr_die("loading the tokenizer", &err);
    if (sm_canon_build(&d->canon, &d->bpe, &err) != SM_OK) tr_die("tokenizer compression", &err);
    d->vocab = d->bpe.vocab_size;
}

static void tr_load_data(tr_data *d, const tr_opts *o, int train) {
    char path[TR_PATH];
    sm_error err = {SM_OK, ""};
    memset(d, 0, sizeof *d);
    if (!o->data[0]) {
        fprintf(stderr, "trainer: --data is required (a text file/folder or a `trainer tokenize` folder)\n");
        exit(1);
    }
    tr_join(path, o->data, "tokenizer.bin");
    if (tr_is_dir(o->data) && (tr_exists(path) || tr_is_gpt2_folder(o->data))) {
        snprintf(d->dir, sizeof d->dir, "%s", o->data);
    } else {
        tr_join(d->dir, o->out, "data");
        tr_join(path, d->dir, "tokenizer.bin");
        if (tr_comm->rank == 0 && !tr_exists(path)) tr_tokenize(o->data, d->dir, o->vocab, o->val_frac, NULL, o->quiet);
        tr_barrier();
    }
    tr_load_tokenizer(d);
    tr_join(path, d->dir, "train.tok");
    if (train && sm_tokens_load(&d->train, path, d->vocab, &err) != SM_OK) tr_die("loading train.tok", &err);
    tr_join(path, d->dir, "val.tok");
    if (sm_tokens_load(&d->val, path, d->vocab, &err) != SM_OK) tr_die("loading val.tok", &err);
}

/* Engram's compression table from the data's tokenizer (GPT-2 tokens:
 * the model's identity table). */
static void tr_set_canon(sm_model *m, const tr_data *d) {
    sm_error err = {SM_OK, ""};
    if (d->gpt2) return;
    if (sm_model_set_canon(m, d->canon.canon, (int)d->canon.vocab_size, &err) != SM_OK)
        tr_die("tokenizer compression", &err);
}

static void tr_free_data(tr_data *d) {
    sm_tokens_free(&d->train), sm_tokens_free(&d->val);
    sm_canon_free(&d->canon), sm_bpe_free(&d->bpe);
}

/* ===================================================================== */
/* Model from options                                                    */
/* ===================================================================== */

/* --nine: the hot tier, sized against the hash-only table of --engram-rows
 * so both have exactly the same number of rows (sm_nine_iso_config).
 * --hot-labels: the same top-N set, for route labels only. */
static int tr_nine_config(const tr_opts *o, sm_model_config *c, char *msg, size_t n) {
    long n_hot = o->nine > 0 ? o->nine : o->hot_labels;
    sm_nine_iso iso;
    sm_error err = {SM_OK, ""};
    int i;
    if (n_hot <= 0) return 0;
    if (!c->use_engram) {
        snprintf(msg, n, "--nine/--hot-labels need Engram (--engram LAYERS)");
        return -1;
    }
    for (i = 0; i < c->engram.hash.n_orders; i++) c->nine.n_hot[i] = (uint32_t)n_hot;
    if (strcmp(o->nine_route, "mphf") == 0) c->nine.route = SM_NINE_ROUTE_MPHF;
    else if (strcmp(o->nine_route, "membership") == 0) c->nine.route = SM_NINE_ROUTE_MEMBERSHIP;
    else {
        snprintf(msg, n, "--nine-route: '%s' is neither mphf nor membership", o->nine_route);
        return -1;
    }
    if (o->nine <= 0) return 0;
    if (sm_nine_iso_config(&iso, &c->engram.hash, &c->nine, &err) != SM_OK) {
        snprintf(msg, n, "--nine %ld: %.200s", o->nine, err.msg);
        return -1;
    }
    c->use_nine = 1;
    c->engram.hash = iso.cold;
    c->nine = iso.nine;
    c->engram.hot_key_proj = o->nine_hot_key;
    c->engram.hot_gate = o->nine_hot_gate;
    if (!o->quiet)
        printf("Engram-Nine: %llu table rows = %llu cold + %llu hot (the hash-only table's rows)\n",
               (unsigned long long)iso.hash_rows, (unsigned long long)iso.cold_rows,
               (unsigned long long)iso.hot_rows);
    return 0;
}

/* --engram-mhc: Engram's form with mHC. The GPU has only the branch form,
 * which --device cuda then takes by default (and says so). */
static int tr_engram_mhc(const tr_opts *o, sm_model_config *c, char *msg, size_t n) {
    int cuda = strcmp(o->device, "cuda") == 0;
    if (!o->engram_mhc[0]) {
        c->engram_mhc = cuda ? SM_ENGRAM_MHC_BRANCH : SM_ENGRAM_MHC_PER_STREAM;
        if (cuda && c->use_engram && c->use_mhc && !o->quiet)
            printf("Engram with mHC: the branch form (--device cuda has no per-stream form)\n");
        return 0;
    }
    if (strcmp(o->engram_mhc, "per-stream") == 0) c->engram_mhc = SM_ENGRAM_MHC_PER_STREAM;
    else if (strcmp(o->engram_mhc, "branch") == 0) c->engram_mhc = SM_ENGRAM_MHC_BRANCH;
    else {
        snprintf(msg, n, "--engram-mhc: '%s' is neither per-stream nor branch", o->engram_mhc);
        return -1;
    }
    if (cuda && c->engram_mhc == SM_ENGRAM_MHC_PER_STREAM) {
        snprintf(msg, n, "--engram-mhc per-stream is not implemented on --device cuda; use branch");
        return -1;
    }
    return 0;
}

/* --arch: rmsnorm (the default), or gpt2 with its vocabulary padded to a
 * multiple of 128 as llm.c pads it (50257 -> 50304). */
static int tr_arch(const tr_opts *o, sm_model_config *c, char *msg, size_t n) {
    if (!o->arch[0] || strcmp(o->arch, "rmsnorm") == 0) return 0;
    if (strcmp(o->arch, "gpt2") != 0) {
        snprintf(msg, n, "--arch: '%s' is neither rmsnorm nor gpt2", o->arch);
        return -1;
    }
    c->arch = SM_ARCH_GPT2;
    c->padded_vocab_size = (c->vocab_size + 127) / 128 * 128;
    return 0;
}

static int tr_model_config(const tr_opts *o, int vocab, sm_model_config *c, char *msg, size_t n) {
    int ids[SM_NGRAM_MAX_LAYERS], k, i;
    *c = sm_model_default_config();
    c->vocab_size = vocab;
    if (tr_arch(o, c, msg, n) != 0) return -1;
    c->seq_len = o->seq_len, c->n_layer = o->n_layer, c->n_head = o->n_head, c->d_model = o->d_model;
    c->d_ff = o->d_ff > 0 ? o->d_ff : 4 * o->d_model;
    c->lr = o->lr, c->weight_decay = o->weight_decay;
    k = tr_parse_layers(o->engram_layers, ids, SM_NGRAM_MAX_LAYERS);
    if (k < 0) {
        snprintf(msg, n, "--engram: expected a list of layers like 1,3, got '%s'", o->engram_layers);
        return -1;
    }
    c->use_engram = k > 0;
    c->engram.d_model = o->d_model;
    c->engram.d_head = o->engram_d_head;
    c->engram.signed_sqrt_gate = !o->engram_no_sqrt;
    c->engram.hash.n_layers = k > 0 ? k : 1;
    for (i = 0; i < k; i++) c->engram.hash.layer_ids[i] = ids[i];
    c->engram.hash.n_heads = o->engram_heads;
    c->engram.hash.table_rows = (uint32_t)o->engram_rows; /* checked by the parser and sm_model_config_validate */
    c->engram.hash.share_tables = o->engram_shared;
    c->engram.hash.seed = o->seed;
    if (tr_nine_config(o, c, msg, n) != 0) return -1;
    k = tr_parse_layers(o->peer_layers, c->peer_layer_ids, SM_MAX_SUBLAYERS / 3);
    if (k < 0) {
        snprintf(msg, n, "--peer: expected a list of layers like 2, got '%s'", o->peer_layers);
        return -1;
    }
    c->use_peer = k > 0;
    c->peer_n_layers = k;
    c->peer_replace_mlp = !o->peer_add;
    c->peer.n_sub = o->peer_experts_sqrt, c->peer.heads = o->peer_heads;
    c->peer.topk = o->peer_topk, c->peer.d_key = o->peer_d_key;
    c->peer.shared_keys = o->peer_shared_keys;
    c->use_mhc = o->mhc_streams > 0;
    c->mhc.n_streams = o->mhc_streams > 0 ? o->mhc_streams : 4;
    c->mhc.channels = o->d_model;
    c->mhc.dynamic = !o->mhc_static;
    return tr_engram_mhc(o, c, msg, n);
}

/* Parameter groups belonging to each schedulable module. */
static void tr_module_groups(const sm_model *m, int groups[TR_N_MODULES][2]) {
    groups[TR_G_BACKBONE][0] = m->g_backbone, groups[TR_G_BACKBONE][1] = -1;
    groups[TR_G_ENGRAM][0] = m->g_engram_dense, groups[TR_G_ENGRAM][1] = m->g_engram_table;
    groups[TR_G_PEER][0] = m->g_peer, groups[TR_G_PEER][1] = -1;
    groups[TR_G_MHC][0] = m->g_mhc, groups[TR_G_MHC][1] = -1;
}

/* Set each module's groups so their lr is module_lr[m] (the Engram table
 * keeps its multiple). Group base lrs were laid out from --lr. */
static void tr_apply_module_lrs(sm_model *m, const float module_lr[TR_N_MODULES], float base_lr) {
    int groups[TR_N_MODULES][2], k, j;
    tr_module_groups(m, groups);
    for (k = 0; k < TR_N_MODULES; k++)
        for (j = 0; j < 2; j++)
            if (groups[k][j] >= 0)
                m->params.groups[groups[k][j]].lr_mult = base_lr > 0 ? module_lr[k] / base_lr : 0.0f;
}

/* ===================================================================== */
/* Diagnostics                                                           */
/* ===================================================================== */

/* Per-module measurements of one step (or an average over several):
 *   out   mean L2 norm per position of the module's contribution to the
 *         residual (backbone: mean over its attention and MLP sublayers)
 *   dout  L2 norm of the loss gradient w.r.t. that contribution
 *   gpar  L2 norm of the gradient of the module's parameters
 * NaN where a module is absent or the quantity does not exist (mHC adds
 * no output of its own: it mixes the streams). */
typedef struct {
    double out[TR_N_MODULES], dout[TR_N_MODULES], gpar[TR_N_MODULES];
} tr_module_stats;

static void tr_stats_nan(tr_module_stats *s) {
    int m;
    for (m = 0; m < TR_N_MODULES; m++) s->out[m] = s->dout[m] = s->gpar[m] = NAN;
}

/* Output and output-gradient norms from the model's last forward/backward. */
static void tr_measure_outputs(const sm_model *m, tr_module_stats *st) {
    double sum_out[TR_N_MODULES] = {0}, sum_dout[TR_N_MODULES] = {0};
    int count[TR_N_MODULES] = {0}, i, k;
    for (i = 0; i < m->n_sub; i++) {
        const sm_sublayer *s = &m->sub[i];
        int mod = s->kind == SM_SUBLAYER_ENGRAM ? TR_G_ENGRAM : TR_G_BACKBONE;
        if (s->kind == SM_SUBLAYER_FFN && s->has_peer) {
            sum_out[TR_G_PEER] += s->peer_norm;
            sum_dout[TR_G_PEER] += s->grad_norm;
            count[TR_G_PEER]++;
            if (!s->has_mlp) continue;
        }
        sum_out[mod] += s->out_norm;
        sum_dout[mod] += s->grad_norm;
        count[mod]++;
    }
    for (k = 0; k < TR_N_MODULES; k++) {
        st->out[k] = count[k] ? sum_out[k] / count[k] : NAN;
        st->dout[k] = count[k] ? sum_dout[k] / count[k] : NAN;
    }
}

/* Parameter-gradient norms per module (before the optimizer step), from
 * the gradient norm of each parameter group, group_norm[group id]. */
static void tr_measure_param_grads(const sm_model *m, const double *group_norm, tr_module_stats *st) {
    int groups[TR_N_MODULES][2], k, j;
    tr_module_groups(m, groups);
    for (k = 0; k < TR_N_MODULES; k++) {
        double ss = 0;
        int any = 0;
        for (j = 0; j < 2; j++)
            if (groups[k][j] >= 0) {
                double g = group_norm[groups[k][j]];
                ss += g * g;
                any = 1;
            }
        st->gpar[k] = any ? sqrt(ss) : NAN;
    }
}

/* Exponential moving average, NaN-aware (the first value seeds it). */
static void tr_ema(double *avg, double x, double decay) {
    if (isnan(x)) return;
    *avg = isnan(*avg) ? x : decay * *avg + (1.0 - decay) * x;
}

static void tr_stats_ema(tr_module_stats *avg, const tr_module_stats *x, double decay) {
    int m;
    for (m = 0; m < TR_N_MODULES; m++) {
        tr_ema(&avg->out[m], x->out[m], decay);
        tr_ema(&avg->dout[m], x->dout[m], decay);
        tr_ema(&avg->gpar[m], x->gpar[m], decay);
    }
}

/* ===================================================================== */
/* Automatic coordination                                                */
/* ===================================================================== */
/* The Redundancy Bottleneck: trained jointly, the fastest-learning sparse
 * module (Engram) takes most of the residual update and of the gradient
 * signal, and the others stop mattering. The write-up fixes it with
 * hand-tuned phases. Here, every coord_every steps, each sparse module
 * (Engram, PEER) gets a share score
 *     share_m = (out_m / sum out + dout_m / sum dout) / 2
 * from moving averages of its output norm and output-gradient norm; a
 * module above the fair share 1/k (k modules) has its lr multiplier scaled
 * by sqrt(fair / share) (at most x2 per adjustment), one below recovers
 * toward 1. Multipliers stay in [0.05, 1]: never frozen, never above the
 * configured lr. With fewer than two sparse modules it does nothing. */
typedef struct {
    float mult[TR_N_MODULES];
    tr_module_stats avg;
} tr_coord;

static void tr_coord_init(tr_coord *c) {
    int m;
    for (m = 0; m < TR_N_MODULES; m++) c->mult[m] = 1.0f;
    tr_stats_nan(&c->avg);
}

static void tr_coord_update(tr_coord *c) {
    const int sparse[2] = {TR_G_ENGRAM, TR_G_PEER};
    double sum_out = 0, sum_dout = 0;
    int i, k = 0;
    for (i = 0; i < 2; i++)
        if (!isnan(c->avg.out[sparse[i]]) && !isnan(c->avg.dout[sparse[i]])) {
            sum_out += c->avg.out[sparse[i]];
            sum_dout += c->avg.dout[sparse[i]];
            k++;
        }
    if (k < 2 || sum_out <= 0 || sum_dout <= 0) return;
    for (i = 0; i < 2; i++) {
        int m = sparse[i];
        double share = 0.5 * (c->avg.out[m] / sum_out + c->avg.dout[m] / sum_dout);
        double f = sqrt((1.0 / k) / fmax(share, 1e-6));
        f = fmin(2.0, fmax(0.5, f));
        c->mult[m] = (float)fmin(1.0, fmax(0.05, c->mult[m] * f));
    }
}

/* ===================================================================== */
/* Evaluation                                                            */
/* ===================================================================== */

typedef struct {
    double loss, ppl;
    size_t tokens;
    tr_module_stats mod;
    double engram_alpha;           /* mean gate over positions and Engram layers */
    double peer_frac_used, peer_kl; /* over PEER layers (mean) */
    double mhc_sum_err, mhc_amax_fwd, mhc_amax_bwd;
    int has_route;          /* route-stratified stats (a hot set exists) */
    sm_route_report route;
} tr_eval;

typedef struct {
    sm_model model;
    sm_model_config cfg;
    tr_data data;
    sm_loader loader;
    tr_coord coord;
    tr_module_stats train_avg;
    long step;
    double tokens_seen, train_seconds;
    double loss_avg; /* moving average of the training loss (logged) */
    int *in, *tg;
    unsigned char *doc, *label;
    int on_gpu; /* --device cuda: the step runs on the GPU; the host model is
                   brought up to date (tr_to_host) before evals and checkpoints */
#ifdef TR_WITH_CUDA
    smc_ctx gpu;
    smc_model gpu_model;
#endif
} tr_run;

/* ---- the training step's operations, on the CPU or the GPU ---- */

static void tr_zero_grad(tr_run *r) {
#ifdef TR_WITH_CUDA
    if (r->on_gpu) {
        smc_params_zero_grad(&r->gpu, &r->gpu_model.params);
        return;
    }
#endif
    sm_params_zero_grad(&r->model.params);
}

/* The forward over B sequences of the batch buffers, from sequence first. */
static sm_status tr_forward(tr_run *r, int first, int B, int T, sm_error *err) {
    size_t at = (size_t)first * T;
#ifdef TR_WITH_CUDA
    if (r->on_gpu) return smc_model_forward(&r->gpu_model, r->in + at, r->tg + at, r->doc + at, B, T, err);
#endif
    return sm_model_forward(&r->model, r->in + at, r->tg + at, r->doc + at, B, T, err);
}

/* The backward, and the per-sublayer norms it measures on the host model. */
static void tr_backward(tr_run *r) {
#ifdef TR_WITH_CUDA
    if (r->on_gpu) {
        sm_error err = {SM_OK, ""};
        smc_model_backward(&r->gpu_model);
        if (smc_model_fetch_diagnostics(&r->gpu_model, &err) != SM_OK) tr_die("GPU backward", &err);
        return;
    }
#endif
    sm_model_backward(&r->model);
}

/* Gradient norm of each parameter group into group_norm[], and the global
 * norm derived from them (every tensor is in exactly one group), so the
 * gradients are read once. */
static double tr_grad_norms(tr_run *r, double *group_norm) {
    double ss = 0.0;
    int g;
    if (sm_model_is_sharded(&r->model)) { /* the tables' norms are summed over the shards */
        sm_error err = {SM_OK, ""};
        if (sm_model_group_grad_norms(&r->model, group_norm, &ss, &err) != SM_OK) tr_die("gradient norm", &err);
        return ss;
    }
    for (g = 0; g < r->model.params.n_groups; g++) {
#ifdef TR_WITH_CUDA
        if (r->on_gpu)
            group_norm[g] = smc_params_group_grad_norm(&r->gpu, &r->gpu_model.params, g);
        else
#endif
            group_norm[g] = sm_params_group_grad_norm(&r->model.params, g);
        ss += group_norm[g] * group_norm[g];
    }
    return sqrt(ss);
}

static void tr_adamw(tr_run *r, float lr_factor, float clip) {
#ifdef TR_WITH_CUDA
    if (r->on_gpu) {
        smc_params_adamw_step(&r->gpu, &r->gpu_model.params, lr_factor, clip);
        return;
    }
#endif
    sm_params_adamw_step(&r->model.params, lr_factor, clip);
}

/* With --device cuda: the GPU's parameters and moments into the host
 * model (evaluation and checkpoints read the host model). */
static void tr_to_host(tr_run *r) {
#ifdef TR_WITH_CUDA
    sm_error err = {SM_OK, ""};
    if (r->on_gpu && smc_model_download(&r->gpu_model, &err) != SM_OK) tr_die("GPU -> host", &err);
#else
    (void)r;
#endif
}

#ifdef TR_WITH_CUDA
/* This rank's GPU: the ranks of a node take its GPUs in turn. *shared: some
 * node has more ranks than GPUs (the same answer on every rank). */
static int tr_rank_device(int *shared) {
    int devices = smc_device_count(), local_rank = 0, local_size = 1;
#ifdef SM_USE_MPI
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &local_rank);
    MPI_Comm_size(node, &local_size);
    MPI_Comm_free(&node);
    MPI_Allreduce(MPI_IN_PLACE, &local_size, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
#endif
    *shared = local_size > devices;
    return devices > 0 ? local_rank % devices : 0;
}

/* Several ranks: NCCL sums the gradients when every rank has its own GPU
 * (NCCL cannot put two ranks on one), else they go through host memory. */
static void tr_gpu_comm_setup(int shared, int quiet) {
    if (tr_comm->size == 1) return;
#ifdef SM_USE_NCCL
    if (!shared) {
        sm_error err = {SM_OK, ""};
        if (sm_comm_init_nccl(&tr_world, &err) != SM_OK) tr_die("NCCL", &err);
        if (!quiet) printf("%d ranks, one GPU each: gradients summed with NCCL\n", tr_comm->size);
        return;
    }
#endif
    if (!quiet)
        printf("%d ranks%s: gradients summed through host memory with MPI\n", tr_comm->size,
               shared ? " sharing GPUs" : "");
}
#endif

/* Starts the GPU model from the host model (after init or resume); the
 * option was checked by tr_parse. */
static void tr_device_setup(tr_run *r, const tr_opts *o) {
#ifdef TR_WITH_CUDA
    sm_error err = {SM_OK, ""};
    int shared;
    if (strcmp(o->device, "cuda") != 0) return;
    if (smc_init(&r->gpu, tr_rank_device(&shared), &err) != SM_OK) tr_die("--device cuda", &err);
    tr_gpu_comm_setup(shared, o->quiet);
    smc_set_tf32(&r->gpu, strcmp(o->precision, "fp32") != 0);
    if (smc_model_init(&r->gpu_model, &r->gpu, &r->model, &err) != SM_OK) tr_die("GPU model", &err);
    r->on_gpu = 1;
    if (!o->quiet)
        printf("device: %s (%d SMs), GEMMs in %s\n", r->gpu.name, r->gpu.sm_count, r->gpu.tf32 ? "TF32" : "fp32");
#else
    (void)r, (void)o;
#endif
}

static void tr_device_free(tr_run *r) {
#ifdef TR_WITH_CUDA
    if (r->on_gpu) {
        smc_model_free(&r->gpu_model);
        smc_free(&r->gpu);
    }
#else
    (void)r;
#endif
}

/* Mean Engram gate over positions (and streams, for a per-stream Engram). */
static double tr_engram_alpha_mean(const sm_model *m) {
    double s = 0;
    int i, n = 0, j, NS = m->B * m->T * m->cfg.engram.n_streams;
    for (i = 0; i < m->n_sub; i++) {
        if (m->sub[i].kind != SM_SUBLAYER_ENGRAM) continue;
        for (j = 0; j < NS; j++) s += m->sub[i].engram_acts.alpha[j];
        n += NS;
    }
    return n ? s / n : NAN;
}

/* Over the mHC branches (a per-stream Engram has no maps: its residual map
 * is the identity, which leaves the composite gain unchanged). */
static void tr_mhc_stats(const sm_model *m, tr_eval *e) {
    sm_mhc_acts acts[SM_MAX_SUBLAYERS];
    sm_rowcol_stats gain;
    int i, n = 0, N = m->B * m->T;
    double err = 0;
    if (!m->cfg.use_mhc) return;
    for (i = 0; i < m->n_sub; i++) {
        sm_rowcol_stats r;
        if (!m->sub[i].in_mhc) continue;
        r = sm_mhc_res_sum_error(&m->sub[i].mhc_acts, &m->cfg.mhc, N);
        err = fmax(err, fmax(r.row_max, r.col_max));
        acts[n++] = m->sub[i].mhc_acts;
    }
    gain = sm_mhc_amax_gain_tokens(acts, n, &m->cfg.mhc, N);
    e->mhc_sum_err = fmax(isnan(e->mhc_sum_err) ? 0 : e->mhc_sum_err, err);
    e->mhc_amax_fwd = fmax(isnan(e->mhc_amax_fwd) ? 0 : e->mhc_amax_fwd, gain.row_max);
    e->mhc_amax_bwd = fmax(isnan(e->mhc_amax_bwd) ? 0 : e->mhc_amax_bwd, gain.col_max);
}

/* Route-stratified statistics of one eval batch: positions labelled hot
 * when any of their n-grams is in the top-N set, with each Engram layer's
 * gate (for a per-stream Engram the mean of its streams' gates). */
static void tr_route_add(tr_run *r, sm_route_stats *route, int B) {
    const float *alpha[SM_NGRAM_MAX_LAYERS];
    sm_error err = {SM_OK, ""};
    int i, j, k, N = B * r->cfg.seq_len, S = r->model.cfg.engram.n_streams;
    float *mean = NULL;
    if (S > 1 && !(mean = (float *)sm_alloc((size_t)r->cfg.engram.hash.n_layers * N, sizeof(float),
                                            "per-position gates", &err)))
        tr_die("route statistics", &err);
    for (i = 0; i < r->model.n_sub; i++) {
        const sm_sublayer *s = &r->model.sub[i];
        float *m;
        if (s->kind != SM_SUBLAYER_ENGRAM) continue;
        alpha[s->engram_index] = s->engram_acts.alpha;
        if (S == 1) continue;
        m = mean + (size_t)s->engram_index * N;
        for (j = 0; j < N; j++) {
            double sum = 0;
            for (k = 0; k < S; k++) sum += s->engram_acts.alpha[(size_t)j * S + k];
            m[j] = (float)(sum / S);
        }
        alpha[s->engram_index] = m;
    }
    sm_nine_label(r->label, r->model.ngram_hot, N, r->cfg.engram.hash.n_orders, SM_NINE_LABEL_ANY);
    if (sm_route_stats_add(route, r->model.losses, r->tg, r->label, alpha, N, &err) != SM_OK)
        tr_die("route statistics", &err);
    sm_free(mean);
}

/* Loss over contiguous held-out text: non-overlapping windows, every
 * target counted once, padding never counted. max_batches 0 = all. */
static tr_eval tr_evaluate(tr_run *r, int B, int max_batches) {
    sm_loader_config lc = sm_loader_default_config();
    sm_loader loader;
    sm_error err = {SM_OK, ""};
    tr_eval e;
    sm_peer_usage usage[SM_MAX_SUBLAYERS / 3];
    double total = 0, alpha_sum = 0, out_sum[TR_N_MODULES] = {0};
    int n_peer = 0, i, batches = 0, alpha_batches = 0;
    size_t counted = 0;
    sm_route_stats route;
    memset(&e, 0, sizeof e);
    tr_stats_nan(&e.mod);
    e.engram_alpha = e.peer_frac_used = e.peer_kl = NAN;
    e.mhc_sum_err = e.mhc_amax_fwd = e.mhc_amax_bwd = NAN;
    lc.batch_size = B, lc.seq_len = r->cfg.seq_len, lc.mode = SM_LOADER_SEQUENTIAL;
    if (sm_loader_init(&loader, &r->data.val, &lc, &err) != SM_OK) tr_die("validation loader", &err);
    for (i = 0; i < r->model.n_sub; i++)
        if (r->model.sub[i].has_peer &&
            sm_peer_usage_init(&usage[n_peer++], (size_t)r->cfg.peer.n_sub * r->cfg.peer.n_sub, &err) != SM_OK)
            tr_die("PEER usage", &err);
    e.has_route = r->model.has_hot_set;
    if (e.has_route && sm_route_stats_init(&route, r->cfg.engram.hash.n_layers, &err) != SM_OK)
        tr_die("route statistics", &err);
    for (;;) {
        size_t n = sm_loader_next(&loader, r->in, r->tg, r->doc);
        tr_module_stats ms;
        int k, p = 0;
        if (n == 0 || (max_batches > 0 && batches >= max_batches)) break;
        if (sm_model_forward(&r->model, r->in, r->tg, r->doc, B, r->cfg.seq_len, &err) != SM_OK)
            tr_die("evaluation forward", &err);
        total += (double)r->model.loss * r->model.n_counted;
        counted += (size_t)r->model.n_counted;
        tr_measure_outputs(&r->model, &ms);
        for (k = 0; k < TR_N_MODULES; k++) out_sum[k] += ms.out[k];
        if (r->cfg.use_engram) alpha_sum += tr_engram_alpha_mean(&r->model), alpha_batches++;
        for (i = 0; i < r->model.n_sub; i++)
            if (r->model.sub[i].has_peer)
                sm_peer_usage_add(&usage[p++], r->model.sub[i].peer_acts.expert,
                                  (size_t)B * r->cfg.seq_len * r->cfg.peer.heads * r->cfg.peer.topk);
        tr_mhc_stats(&r->model, &e);
        if (e.has_route) tr_route_add(r, &route, B);
        batches++;
    }
    if (e.has_route) sm_route_stats_report(&e.route, &route);
    e.tokens = counted;
    e.loss = counted ? total / counted : NAN;
    e.ppl = exp(e.loss);
    for (i = 0; i < TR_N_MODULES; i++) e.mod.out[i] = batches ? out_sum[i] / batches : NAN;
    if (alpha_batches) e.engram_alpha = alpha_sum / alpha_batches;
    if (n_peer) {
        e.peer_frac_used = e.peer_kl = 0;
        for (i = 0; i < n_peer; i++) {
            sm_peer_usage_stats us = sm_peer_usage_compute(&usage[i]);
            e.peer_frac_used += us.frac_used / n_peer;
            e.peer_kl += us.kl_uniform / n_peer;
            sm_peer_usage_free(&usage[i]);
        }
    }
    return e;
}

/* ===================================================================== */
/* Checkpoints                                                           */
/* ===================================================================== */
/* File "SMCK" v2 (sm_writer: written to a temp file and renamed, with a
 * checksum): the model config and training options as raw structs (a
 * checkpoint is read by the build that wrote it; the sizes are checked;
 * v2 added engram_mhc, so a v1 file is refused rather than read as a
 * config it does not describe),
 * the step, the parameters and both Adam moments, the parameter groups
 * (learning-rate multipliers included), the data loader state, the
 * coordination state and the running statistics. */
#define TR_CKPT_MAGIC 0x4b434d53u /* "SMCK" */
/* v2: the model config gained engram_mhc (Engram's form with mHC) and
 * sm_peer_config shared_keys (v1 PEER layers had per-head sub-keys); v3:
 * arch and padded_vocab_size (the GPT-2 architecture), and the options
 * --arch and --init. An older raw config no longer fits the struct, so
 * older files are refused. */
#define TR_CKPT_VERSION 3u

/* Test hook: a real SIGKILL at a chosen point, after step `step` or inside
 * its checkpoint (in_ckpt: the temp file, flushed first), so tests see what
 * a killed run leaves and that --resume recovers from it. */
static void tr_debug_kill(const tr_opts *o, long step, FILE *in_ckpt) {
    if (step != o->debug_kill_step || !in_ckpt != !o->debug_kill_in_ckpt) return;
    if (in_ckpt) fflush(in_ckpt);
    raise(SIGKILL);
}

/* Writes the parameters and moments of one process's layout (total floats
 * each: the model's own, or gathered from the shards). */
static sm_status tr_write_checkpoint(const tr_run *r, const tr_opts *o, const char *path, const float *data,
                                     const float *mom1, const float *mom2, size_t total, sm_error *err) {
    sm_writer w;
    const sm_params *p = &r->model.params;
    sm_status st = sm_writer_open(&w, path, TR_CKPT_MAGIC, TR_CKPT_VERSION, err);
    if (st != SM_OK) return st;
    sm_writer_u32(&w, (uint32_t)sizeof r->cfg);
    sm_writer_bytes(&w, &r->cfg, sizeof r->cfg);
    sm_writer_u32(&w, (uint32_t)sizeof *o);
    sm_writer_bytes(&w, o, sizeof *o);
    sm_writer_u64(&w, (uint64_t)r->step);
    sm_writer_u64(&w, p->step);
    sm_writer_u64(&w, (uint64_t)total);
    sm_writer_bytes(&w, data, total * sizeof(float));
    sm_writer_bytes(&w, mom1, total * sizeof(float));
    sm_writer_bytes(&w, mom2, total * sizeof(float));
    sm_writer_u32(&w, (uint32_t)p->n_groups);
    sm_writer_bytes(&w, p->groups, sizeof(sm_param_group) * (size_t)p->n_groups);
    sm_writer_bytes(&w, &r->loader.state, sizeof r->loader.state);
    sm_writer_bytes(&w, &r->coord, sizeof r->coord);
    sm_writer_bytes(&w, &r->train_avg, sizeof r->train_avg);
    sm_writer_bytes(&w, &r->tokens_seen, sizeof r->tokens_seen);
    sm_writer_bytes(&w, &r->loss_avg, sizeof r->loss_avg);
    sm_writer_bytes(&w, &r->train_seconds, sizeof r->train_seconds);
    sm_writer_u32(&w, (uint32_t)r->model.has_hot_set);
    if (r->model.has_hot_set) sm_nine_write(&r->model.nine, &w);
    tr_debug_kill(o, r->step, w.f); /* the temp file complete, not renamed */
    return sm_writer_commit(&w, err);
}

/* Rank 0 writes the checkpoint; with sharded tables every rank sends it
 * its rows first, so the file has one process's layout. */
static sm_status tr_save_checkpoint(const tr_run *r, const tr_opts *o, const char *path, sm_error *err) {
    const sm_params *p = &r->model.params;
    size_t total = 0;
    float *full = NULL;
    sm_status st;
    int lead = tr_comm->rank == 0;
    if (!sm_model_is_sharded(&r->model))
        return lead ? tr_write_checkpoint(r, o, path, p->data, p->m, p->v, p->total, err) : SM_OK;
    st = sm_model_param_count(&r->cfg, &total, err);
    if (st == SM_OK && lead && !(full = (float *)sm_alloc(3 * total, sizeof(float), "checkpoint parameters", err)))
        st = SM_ERR_OOM;
    if (st == SM_OK)
        st = sm_model_gather_params(&r->model, 0, full, full ? full + total : NULL, full ? full + 2 * total : NULL, err);
    if (st == SM_OK && lead) st = tr_write_checkpoint(r, o, path, full, full + total, full + 2 * total, total, err);
    sm_free(full);
    return st;
}

/* What a checkpoint's header asks for, checked before anything is built
 * from it: a checksum is no defence against a crafted file (anyone can
 * recompute one), and the config decides how much the model allocates. The
 * config must be valid, the parameter count it implies must be the stored
 * one, and the file must hold that many parameters and both Adam moments.
 * The options' strings must end inside their fields. */
static sm_status tr_check_checkpoint_sizes(const sm_reader *rd, const sm_model_config *cfg,
                                           const tr_opts *o, sm_error *err) {
    size_t expect, left = rd->size - rd->pos;
    uint64_t total;
    sm_error why = {SM_OK, ""};
    int i;
    for (i = 0; i < TR_N_SPECS; i++)
        if (tr_specs[i].kind == O_STR && !memchr((const char *)o + tr_specs[i].offset, 0, tr_specs[i].size))
            return sm_fail(err, SM_ERR_FORMAT, "checkpoint %s: its --%s is not a terminated string", rd->path,
                           tr_specs[i].name);
    if (sm_model_param_count(cfg, &expect, &why) != SM_OK)
        return sm_fail(err, SM_ERR_FORMAT, "checkpoint %s: invalid model config: %.150s", rd->path, why.msg);
    if (left < 24)
        return sm_fail(err, SM_ERR_TRUNCATED, "checkpoint %s: ends after its options", rd->path);
    memcpy(&total, rd->data + rd->pos + 16, 8); /* after the step and the Adam step */
    if (total != expect)
        return sm_fail(err, SM_ERR_FORMAT,
                       "checkpoint %s: its config (seq_len %d, d_model %d, vocab %d, %d layers) has %zu "
                       "parameters, the file stores %llu", rd->path, cfg->seq_len, cfg->d_model,
                       cfg->vocab_size, cfg->n_layer, expect, (unsigned long long)total);
    if (expect > (left - 24) / (3 * sizeof(float)))
        return sm_fail(err, SM_ERR_TRUNCATED, "checkpoint %s: %zu parameters and their Adam moments do not fit "
                       "in its %zu bytes", rd->path, expect, left);
    return SM_OK;
}

/* Reads a checkpoint's config and options (to build the model). */
static sm_status tr_read_checkpoint_header(sm_reader *rd, const char *path, sm_model_config *cfg,
                                           tr_opts *o, sm_error *err) {
    uint32_t n = 0;
    sm_status st = sm_reader_open(rd, path, TR_CKPT_MAGIC, TR_CKPT_VERSION, "checkpoint", err);
    if (st == SM_OK && rd->version < TR_CKPT_VERSION)
        st = sm_fail(err, SM_ERR_FORMAT, "checkpoint %s: format v%u predates the GPT-2 architecture (--arch, --init; v3)%s; this build reads v%u: read it with the build that wrote it or train again",
                     path, (unsigned)rd->version,
                     rd->version < 2 ? " and Engram's form with mHC (--engram-mhc) and PEER's shared sub-keys (shared_keys; v2)" : "",
                     (unsigned)TR_CKPT_VERSION);
    if (st == SM_OK) st = sm_reader_u32(rd, &n, err);
    if (st == SM_OK && n != sizeof *cfg)
        st = sm_fail(err, SM_ERR_MISMATCH, "checkpoint %s: model config of %u bytes, this build uses %zu (written by another version)",
                     path, n, sizeof *cfg);
    if (st == SM_OK) st = sm_reader_bytes(rd, cfg, sizeof *cfg, err);
    if (st == SM_OK) st = sm_reader_u32(rd, &n, err);
    if (st == SM_OK && n != sizeof *o)
        st = sm_fail(err, SM_ERR_MISMATCH, "checkpoint %s: options of %u bytes, this build uses %zu", path, n, sizeof *o);
    if (st == SM_OK) st = sm_reader_bytes(rd, o, sizeof *o, err);
    if (st == SM_OK) st = tr_check_checkpoint_sizes(rd, cfg, o, err);
    if (st != SM_OK) sm_reader_close(rd);
    return st;
}

/* The parameter groups (their lrs and multipliers), which must be the
 * model's own groups in its order. */
static sm_status tr_read_groups(sm_reader *rd, sm_params *p, sm_error *err) {
    sm_param_group g[SM_MAX_GROUPS];
    int i;
    sm_status st = sm_reader_bytes(rd, g, sizeof(sm_param_group) * (size_t)p->n_groups, err);
    for (i = 0; st == SM_OK && i < p->n_groups; i++)
        if (strncmp(g[i].name, p->groups[i].name, sizeof g[i].name) != 0)
            return sm_fail(err, SM_ERR_MISMATCH, "checkpoint: parameter group %d is '%.31s', the model's '%s'",
                           i, g[i].name, p->groups[i].name);
    if (st == SM_OK) memcpy(p->groups, g, sizeof(sm_param_group) * (size_t)p->n_groups);
    return st;
}

/* The parameters and both moments (one process's layout, total floats
 * each) into the model: read in place, or with sharded tables read whole
 * and this rank's rows taken. */
static sm_status tr_read_params(sm_reader *rd, sm_model *m, size_t total, sm_error *err) {
    sm_params *p = &m->params;
    float *full = NULL, *buf[3];
    sm_status st = SM_OK;
    int b;
    buf[0] = p->data, buf[1] = p->m, buf[2] = p->v;
    if (sm_model_is_sharded(m)) {
        if (!(full = (float *)sm_alloc(3 * total, sizeof(float), "checkpoint parameters", err))) return SM_ERR_OOM;
        buf[0] = full, buf[1] = full + total, buf[2] = full + 2 * total;
    }
    for (b = 0; st == SM_OK && b < 3; b++) st = sm_reader_bytes(rd, buf[b], total * sizeof(float), err);
    if (st == SM_OK && full) sm_model_take_params(m, buf[0], buf[1], buf[2]);
    sm_free(full);
    return st;
}

/* Reads the rest into a model built from the same config. */
static sm_status tr_read_checkpoint_state(sm_reader *rd, tr_run *r, sm_error *err) {
    sm_params *p = &r->model.params;
    uint64_t step = 0, pstep = 0, total = 0;
    uint32_t n_groups = 0, has_hot_set = 0;
    size_t expect = 0;
    sm_status st;
    if ((st = sm_reader_u64(rd, &step, err)) != SM_OK || (st = sm_reader_u64(rd, &pstep, err)) != SM_OK ||
        (st = sm_reader_u64(rd, &total, err)) != SM_OK || (st = sm_model_param_count(&r->cfg, &expect, err)) != SM_OK)
        return st;
    if (total != expect)
        return sm_fail(err, SM_ERR_MISMATCH, "checkpoint has %llu parameters, the model %zu",
                       (unsigned long long)total, expect);
    if ((st = tr_read_params(rd, &r->model, expect, err)) != SM_OK || (st = sm_reader_u32(rd, &n_groups, err)) != SM_OK)
        return st;
    if ((int)n_groups != p->n_groups)
        return sm_fail(err, SM_ERR_MISMATCH, "checkpoint has %u parameter groups, the model %d", n_groups, p->n_groups);
    if ((st = tr_read_groups(rd, p, err)) != SM_OK ||
        (st = sm_reader_bytes(rd, &r->loader.state, sizeof r->loader.state, err)) != SM_OK ||
        (st = sm_reader_bytes(rd, &r->coord, sizeof r->coord, err)) != SM_OK ||
        (st = sm_reader_bytes(rd, &r->train_avg, sizeof r->train_avg, err)) != SM_OK ||
        (st = sm_reader_bytes(rd, &r->tokens_seen, sizeof r->tokens_seen, err)) != SM_OK ||
        (st = sm_reader_bytes(rd, &r->loss_avg, sizeof r->loss_avg, err)) != SM_OK ||
        (st = sm_reader_bytes(rd, &r->train_seconds, sizeof r->train_seconds, err)) != SM_OK)
        return st;
    if ((st = sm_reader_u32(rd, &has_hot_set, err)) != SM_OK) return st;
    if (r->model.has_hot_set) sm_nine_free(&r->model.nine);
    r->model.has_hot_set = 0;
    if (has_hot_set) {
        if ((st = sm_nine_read(&r->model.nine, rd, err)) != SM_OK) return st;
        r->model.has_hot_set = 1;
    }
    if (!sm_all_finite(p->data, p->total)) /* (with sharded tables: this rank's rows) */
        return sm_fail(err, SM_ERR_NONFINITE, "checkpoint parameters contain NaN or Inf");
    r->step = (long)step;
    p->step = pstep;
    return SM_OK;
}

/* ===================================================================== */
/* Training                                                              */
/* ===================================================================== */

static void tr_path(char *out, const tr_opts *o, const char *name) { tr_join(out, o->out, name); }

/* Cuts a log (a header line, then rows whose first column is the step)
 * after its last complete row at or before `step`: the rows a killed run
 * wrote after its last checkpoint, and a partial last line, go. Returns
 * the bytes kept (0: no log, or not even a complete header). */
static size_t tr_truncate_log(const char *path, long step) {
    unsigned char *text;
    size_t n, keep = 0;
    if (sm_read_file(path, &text, &n, NULL) != SM_OK) return 0;
    while (keep < n) {
        const char *line = (const char *)text + keep, *nl = (const char *)memchr(line, '\n', n - keep);
        char *end;
        if (!nl) break;                                         /* a partial line */
        if (keep > 0 && (strtol(line, &end, 10) > step || end == line)) break; /* a later row */
        keep = (size_t)(nl - (const char *)text) + 1;
    }
    sm_free(text);
    if (keep < n && truncate(path, (off_t)keep) != 0) {
        fprintf(stderr, "trainer: --resume: cannot cut %s back to step %ld: %s\n", path, step, strerror(errno));
        exit(1);
    }
    return keep;
}

/* A log of the run in OUT. A resumed run (resume_step >= 0) keeps the rows
 * up to its checkpoint's step and appends; the log then reads as an
 * uninterrupted run's (the rows up to a checkpoint are on the disk before
 * the checkpoint is: tr_sync_log). */
static FILE *tr_open_log(const tr_opts *o, const char *name, const char *header, long resume_step) {
    char path[TR_PATH];
    FILE *f;
    size_t kept;
    tr_path(path, o, name);
    kept = resume_step >= 0 ? tr_truncate_log(path, resume_step) : 0;
    f = fopen(path, kept > 0 ? "a" : "w");
    if (!f) {
        fprintf(stderr, "trainer: cannot write %s: %s\n", path, strerror(errno));
        exit(1);
    }
    if (kept == 0) fprintf(f, "%s\n", header);
    return f;
}

/* Before a checkpoint: the log's rows so far reach the disk. */
static void tr_sync_log(FILE *f, const tr_opts *o, const char *name) {
    char path[TR_PATH];
    sm_error err = {SM_OK, ""};
    tr_path(path, o, name);
    if (fflush(f) != 0) sm_fail(&err, SM_ERR_IO, "cannot write %s: %s", path, strerror(errno));
    else sm_sync_path(path, &err);
    if (err.code != SM_OK) tr_die("log", &err);
}

/* The columns of tr_log_training_stats. */
#define TR_TRAINING_STATS_COLS                                                                  \
    "dout_backbone,dout_engram,dout_peer,gpar_backbone,gpar_engram,gpar_peer,gpar_mhc,"        \
    "lr_backbone,lr_engram,lr_peer,lr_mhc"

/* log.csv: one row per evaluation. out_* are measured on the held-out
 * batches, dout_* and gpar_* are the training-time moving averages. */
static const char *tr_eval_header =
    "step,tokens,train_loss,val_loss,val_ppl,tokens_per_s,"
    "out_backbone,out_engram,out_peer," TR_TRAINING_STATS_COLS ","
    "engram_alpha,peer_frac_used,peer_kl,mhc_sum_err,mhc_amax_fwd,mhc_amax_bwd,"
    "hot_share,loss_hot,loss_cold,hot_cold_delta,alpha_hot,alpha_cold";

static double tr_mean(const double *x, int n) {
    double s = 0;
    int i;
    for (i = 0; i < n; i++) s += x[i];
    return n ? s / n : NAN;
}

/* RUN/route_layers.csv and RUN/route_buckets.csv: the final eval's
 * per-layer gate by tier and its alpha buckets. */
static void tr_write_route_tables(const tr_opts *o, const sm_route_report *rr) {
    char path[TR_PATH];
    FILE *f;
    int l, b;
    tr_path(path, o, "route_layers.csv");
    if (!(f = fopen(path, "w"))) return;
    fprintf(f, "layer,alpha_hot,alpha_cold\n");
    for (l = 0; l < rr->n_layers; l++) fprintf(f, "%d,%.6g,%.6g\n", l, rr->alpha_hot[l], rr->alpha_cold[l]);
    fclose(f);
    tr_path(path, o, "route_buckets.csv");
    if (!(f = fopen(path, "w"))) return;
    fprintf(f, "layer,bucket,count,loss,hot_share\n");
    for (l = 0; l < rr->n_layers; l++)
        for (b = 0; b < SM_ROUTE_ALPHA_BUCKETS; b++)
            fprintf(f, "%d,%d,%llu,%.6g,%.6g\n", l, b, (unsigned long long)rr->bucket_count[l][b],
                    rr->bucket_loss[l][b], rr->bucket_hot_share[l][b]);
    fclose(f);
}

/* The training-time moving averages of the output-gradient and parameter-
 * gradient norms, and the module lrs in force (TR_TRAINING_STATS_COLS). */
static void tr_log_training_stats(FILE *f, const tr_module_stats *avg, const float lr[TR_N_MODULES]) {
    int k;
    for (k = 0; k < 3; k++) fprintf(f, ",%.6g", avg->dout[k]); /* mHC adds no output of its own */
    for (k = 0; k < TR_N_MODULES; k++) fprintf(f, ",%.6g", avg->gpar[k]);
    for (k = 0; k < TR_N_MODULES; k++) fprintf(f, ",%.6g", lr[k]);
}

static void tr_log_eval(FILE *f, const tr_run *r, double train_loss, const tr_eval *e,
                        const float lr[TR_N_MODULES]) {
    int k;
    fprintf(f, "%ld,%.0f,%.6f,%.6f,%.4f,%.1f", r->step, r->tokens_seen, train_loss, e->loss, e->ppl,
            r->train_seconds > 0 ? r->tokens_seen / r->train_seconds : 0.0);
    for (k = 0; k < 3; k++) fprintf(f, ",%.6g", e->mod.out[k]); /* eval output norms */
    tr_log_training_stats(f, &r->train_avg, lr);
    fprintf(f, ",%.6g,%.6g,%.6g,%.6g,%.6g,%.6g", e->engram_alpha, e->peer_frac_used, e->peer_kl,
            e->mhc_sum_err, e->mhc_amax_fwd, e->mhc_amax_bwd);
    if (e->has_route)
        fprintf(f, ",%.6g,%.6g,%.6g,%.6g,%.6g,%.6g\n", e->route.hot_share, e->route.loss_hot,
                e->route.loss_cold, e->route.hot_cold_delta, tr_mean(e->route.alpha_hot, e->route.n_layers),
                tr_mean(e->route.alpha_cold, e->route.n_layers));
    else
        fprintf(f, ",nan,nan,nan,nan,nan,nan\n");
    fflush(f);
}

/* Status line: rewritten in place on a terminal, otherwise one plain line
 * per 10% of the run. */
static void tr_progress(const tr_opts *o, const tr_run *r, double loss) {
    double tps = r->train_seconds > 0 ? r->tokens_seen / r->train_seconds : 0;
    double eta = tps > 0 ? (double)(o->steps - r->step) * o->batch * o->seq_len / tps : 0;
    int tty = isatty(fileno(stdout));
    if (o->quiet) return;
    if (!tty && (r->step * 10) / o->steps == ((r->step - 1) * 10) / o->steps) return;
    printf("%sstep %6ld/%ld | loss %.4f | %6.0f tok/s | ETA %4.0fs%s", tty ? "\r" : "", r->step,
           o->steps, loss, tps, eta, tty ? "   " : "\n");
    fflush(stdout);
}

static float tr_base_lr(const tr_opts *o, int module) {
    float v = module == TR_G_ENGRAM ? o->lr_engram : module == TR_G_PEER ? o->lr_peer
            : module == TR_G_MHC ? o->lr_mhc : o->lr;
    return v >= 0 ? v : o->lr;
}

/* Module lrs in force at the run's current step: base, then the schedule's
 * phases, then the coordination multipliers. */
static void tr_current_lrs(const tr_opts *o, const tr_run *r, float lr[TR_N_MODULES]) {
    int k;
    for (k = 0; k < TR_N_MODULES; k++) lr[k] = tr_base_lr(o, k);
    tr_schedule_lrs(o->phases, o->n_phases, r->step, o->steps, lr);
    for (k = 0; k < TR_N_MODULES; k++) lr[k] *= r->coord.mult[k];
}

/* diag.csv: a row every --diag-every steps (and at the last step), so the
 * module diagnostics have many points without more evaluations. Every
 * value comes from the training steps themselves (no extra passes), and
 * every rank has the same (the sublayer norms and gradients are combined
 * across ranks before they are measured): train_out_* are the moving
 * averages (decay 0.9 per step, as dout_* and gpar_*) of the output norms
 * on the training batches. Not here (log.csv has them per eval): the
 * Engram gate, PEER usage and the mHC errors. The GPU step does not bring
 * them back to the host, under MPI they would be rank 0's slice alone, and
 * PEER usage depends on how many tokens it counts. */
static const char *tr_diag_header = "step,train_out_backbone,train_out_engram,train_out_peer," TR_TRAINING_STATS_COLS;

static int tr_diag_due(const tr_opts *o, long step) {
    return o->diag_every > 0 && (step % o->diag_every == 0 || step == o->steps);
}

static void tr_log_diag(FILE *f, const tr_opts *o, const tr_run *r) {
    float lr[TR_N_MODULES];
    int k;
    tr_current_lrs(o, r, lr);
    fprintf(f, "%ld", r->step);
    for (k = 0; k < 3; k++) fprintf(f, ",%.6g", r->train_avg.out[k]);
    tr_log_training_stats(f, &r->train_avg, lr);
    fprintf(f, "\n");
}

/* The top-N n-gram set of the training split (hot tier or route labels). */
static void tr_build_hot_set(tr_run *r, const tr_opts *o) {
    sm_error err = {SM_OK, ""};
    const sm_tokens *t = &r->data.train;
    unsigned char *doc = (unsigned char *)sm_alloc(t->n_tokens, 1, "document starts", &err);
    size_t i;
    int k;
    if (!doc) tr_die("hot set", &err);
    for (i = 0; i < t->n_docs; i++) doc[t->doc_starts[i]] = 1;
    if (sm_model_build_hot_set(&r->model, t->tokens, doc, t->n_tokens, &err) != SM_OK) tr_die("hot set", &err);
    sm_free(doc);
    if (o->quiet) return;
    for (k = 0; k < r->cfg.engram.hash.n_orders; k++)
        printf("hot set: top %u %d-grams cover %.1f%% of training positions\n", r->cfg.nine.n_hot[k],
               r->cfg.engram.hash.orders[k], 100.0 * r->model.nine.coverage[k]);
}

/* Continue from OUT/model.ckpt: same model configuration required. */
static void tr_resume(tr_run *r, const tr_opts *o) {
    sm_error err = {SM_OK, ""};
    sm_reader rd;
    sm_model_config saved;
    tr_opts saved_opts;
    sm_loader_state state;
    char path[TR_PATH];
    tr_path(path, o, "model.ckpt");
    if (tr_read_checkpoint_header(&rd, path, &saved, &saved_opts, &err) != SM_OK) tr_die("--resume", &err);
    if (memcmp(&saved, &r->cfg, sizeof saved) != 0) {
        fprintf(stderr, "trainer: --resume: %s was written for a different model configuration; "
                        "use the options of the original run\n", path);
        exit(1);
    }
    if (tr_read_checkpoint_state(&rd, r, &err) != SM_OK) tr_die("--resume", &err);
    sm_reader_close(&rd);
    state = r->loader.state;
    if (sm_loader_restore(&r->loader, &state, &err) != SM_OK) tr_die("--resume: data position", &err);
}

static int tr_is_safetensors(const char *path) {
    size_t n = strlen(path);
    return n >= 12 && strcmp(path + n - 12, ".safetensors") == 0;
}

/* --init FILE: the backbone is the GPT-2 of an llm.c model file. Its header
 * sets the architecture and shape (--arch, --layers, --d-model, --heads,
 * --d-ff give way to it); --seq may use fewer positions than it has. */
static void tr_init_config(sm_model_config *c, const tr_opts *o, int data_vocab) {
    sm_error err = {SM_OK, ""};
    int seq = c->seq_len;
    if (sm_llmc_read_config(c, o->init, &err) != SM_OK) tr_die("--init", &err);
    if (c->vocab_size != data_vocab) {
        fprintf(stderr, "trainer: --init %s is a GPT-2 of %d tokens, the data's vocabulary has %d: tokenize "
                        "the text with --tokenizer gpt2:DIR\n", o->init, c->vocab_size, data_vocab);
        exit(1);
    }
    if (seq > c->seq_len) {
        fprintf(stderr, "trainer: --seq %d: the model of --init %s has %d positions\n", seq, o->init, c->seq_len);
        exit(1);
    }
    if (c->use_peer && c->peer_replace_mlp) {
        fprintf(stderr, "trainer: --init with --peer: add --peer-add (PEER replacing the MLP would discard the "
                        "imported one)\n");
        exit(1);
    }
    c->seq_len = seq;
    if (!o->quiet)
        printf("--init %s: GPT-2, %d layers, d_model %d, %d heads, vocabulary %d (padded %d); modules start closed\n",
               o->init, c->n_layer, c->d_model, c->n_head, c->vocab_size, c->padded_vocab_size);
}

/* Several ranks: the global batch splits evenly, and every rank was given
 * the same options, model and training data (a rank that differs stops
 * them all, naming what differs). */
static void tr_check_ranks(const tr_run *r, const tr_opts *o) {
    sm_error err = {SM_OK, ""};
    const sm_tokens *t = &r->data.train;
    tr_opts same = *o;
    same.quiet = 0; /* the ranks after 0 run quiet */
    if (tr_comm->size == 1) return;
    if (o->batch % tr_comm->size != 0) {
        fprintf(stderr, "trainer: --batch %d is the global batch: it must be a multiple of the %d processes\n",
                o->batch, tr_comm->size);
        exit(1);
    }
    if (o->shard_tables && strcmp(o->device, "cuda") == 0) {
        fprintf(stderr, "trainer: --shard-tables with --device cuda: sharded tables run on the CPU only for now; "
                        "on GPUs every rank holds the whole tables (leave out --shard-tables)\n");
        exit(1);
    }
    if (sm_comm_check_same(tr_comm, &same, sizeof same, "the options", &err) != SM_OK ||
        sm_comm_check_same(tr_comm, &r->cfg, sizeof r->cfg, "the model configuration", &err) != SM_OK ||
        sm_comm_check_same(tr_comm, t->tokens, t->n_tokens * sizeof *t->tokens, "the training tokens", &err) != SM_OK)
        tr_die("processes", &err);
}

/* --init FILE.safetensors: the model the options built takes the file's
 * weights (every tensor, same shapes: sm_model_load_safetensors). Config
 * fields that differ without changing a shape (an n-gram seed, top-k, a
 * learning rate) are the options' to set, and are listed. */
static void tr_init_from_safetensors(tr_run *r, const tr_opts *o) {
    sm_error err = {SM_OK, ""};
    sm_safetensors st;
    sm_model_config file_cfg;
    char diff[512];
    int n_diff;
    if (sm_safetensors_load(&st, o->init, &err) != SM_OK || sm_model_load_safetensors(&r->model, &st, &err) != SM_OK)
        tr_die("--init", &err);
    if (sm_model_config_from_safetensors(&st, &file_cfg, &err) == SM_OK &&
        (n_diff = sm_model_config_differences(&file_cfg, &r->model.cfg, diff, sizeof diff)) > 0 && !o->quiet)
        printf("--init %s: the options set %d config field%s the file had otherwise: %s\n", o->init, n_diff,
               n_diff > 1 ? "s" : "", diff);
    sm_safetensors_free(&st);
}

/* --init: the weights of an llm.c model file or of a safetensors export. */
static void tr_init_weights(tr_run *r, const tr_opts *o) {
    sm_error err = {SM_OK, ""};
    if (!tr_is_safetensors(o->init)) {
        if (sm_model_load_llmc(&r->model, o->init, &err) != SM_OK) tr_die("--init", &err);
        return;
    }
    if (sm_model_is_sharded(&r->model)) {
        fprintf(stderr, "trainer: --init %s with --shard-tables: a safetensors file loads into one process's "
                        "model only; start without --shard-tables and resume with it\n", o->init);
        exit(1);
    }
    tr_init_from_safetensors(r, o);
}

static void tr_run_setup(tr_run *r, tr_opts *o) {
    sm_error err = {SM_OK, ""};
    sm_loader_config lc = sm_loader_default_config();
    char msg[256];
    size_t N;
    memset(r, 0, sizeof *r);
    if (tr_strategy_schedule(o, msg, sizeof msg) != 0) {
        fprintf(stderr, "trainer: --schedule/--strategy: %s\n", msg);
        exit(1);
    }
    if (!o->out[0]) {
        fprintf(stderr, "trainer: --out is required (the run folder)\n");
        exit(1);
    }
    tr_mkdir(o->out);
    tr_load_data(&r->data, o, 1);
    if (tr_model_config(o, (int)r->data.vocab, &r->cfg, msg, sizeof msg) != 0) {
        fprintf(stderr, "trainer: %s\n", msg);
        exit(1);
    }
    if (o->init[0] && !tr_is_safetensors(o->init)) tr_init_config(&r->cfg, o, (int)r->data.vocab);
    tr_check_ranks(r, o);
    if (sm_model_init_sharded(&r->model, &r->cfg, o->batch, o->seed, o->shard_tables ? tr_comm : NULL, &err) != SM_OK)
        tr_die("model", &err);
    if (o->init[0] && !o->resume) tr_init_weights(r, o);
    tr_set_canon(&r->model, &r->data);
    lc.batch_size = o->batch, lc.seq_len = o->seq_len, lc.seed = o->data_seed;
    if (sm_loader_init(&r->loader, &r->data.train, &lc, &err) != SM_OK) tr_die("training data", &err);
    tr_coord_init(&r->coord);
    tr_stats_nan(&r->train_avg);
    r->loss_avg = NAN;
    if (o->resume) tr_resume(r, o);
    else if (r->cfg.nine.n_hot[0] > 0 && (o->nine > 0 || o->hot_labels > 0)) tr_build_hot_set(r, o);
    tr_device_setup(r, o);
    N = (size_t)o->batch * o->seq_len;
    r->in = (int *)sm_alloc(N, sizeof(int), "batch inputs", &err);
    r->tg = (int *)sm_alloc(N, sizeof(int), "batch targets", &err);
    r->doc = (unsigned char *)sm_alloc(N, 1, "batch document starts", &err);
    r->label = (unsigned char *)sm_alloc(N, 1, "route labels", &err);
    if (!r->in || !r->tg || !r->doc || !r->label) tr_die("batch buffers", &err);
}

static void tr_run_free(tr_run *r) {
    tr_device_free(r);
    sm_model_free(&r->model);
    tr_free_data(&r->data);
    sm_free(r->in), sm_free(r->tg), sm_free(r->doc), sm_free(r->label);
}

/* ---- data parallelism: what the ranks combine after their slices ---- */

/* The global mean loss from each rank's mean over its counted tokens; the
 * rank's share (its count over the global count) scales its gradients. */
static double tr_global_loss(const sm_model *m, double *share) {
    sm_error err = {SM_OK, ""};
    double v[2];
    v[0] = (double)m->loss * m->n_counted, v[1] = (double)m->n_counted;
    if (sm_comm_allreduce_sum_f64(tr_comm, v, 2, &err) != SM_OK) tr_die("loss all-reduce", &err);
    *share = v[1] > 0 ? m->n_counted / v[1] : 0.0;
    return v[1] > 0 ? v[0] / v[1] : 0.0;
}

/* The sublayers' diagnostics as if measured on the whole batch. Output
 * norms are means over positions: averaged over the (equal) slices. An
 * output-gradient norm is the norm of the gradient of the rank's own mean
 * loss, so it is scaled by the rank's share before the squares are summed:
 * the norm of the global mean loss's gradient. */
static void tr_global_sublayer_stats(sm_model *m, double share) {
    sm_error err = {SM_OK, ""};
    double v[3 * SM_MAX_SUBLAYERS];
    int i, n = m->n_sub;
    for (i = 0; i < n; i++) {
        sm_sublayer *s = &m->sub[i];
        v[i] = s->out_norm / tr_comm->size, v[n + i] = s->peer_norm / tr_comm->size;
        v[2 * n + i] = s->grad_norm * share * s->grad_norm * share;
    }
    if (sm_comm_allreduce_sum_f64(tr_comm, v, 3 * (size_t)n, &err) != SM_OK) tr_die("statistics all-reduce", &err);
    for (i = 0; i < n; i++)
        m->sub[i].out_norm = v[i], m->sub[i].peer_norm = v[n + i], m->sub[i].grad_norm = sqrt(v[2 * n + i]);
}

/* This rank's slice of the global batch through forward and backward; the
 * global mean loss in *loss (every rank), the gradients summed over ranks. */
static int tr_forward_backward(tr_run *r, const tr_opts *o, double *loss, double *share) {
    sm_error err = {SM_OK, ""};
    int rows = o->batch / tr_comm->size;
    if (tr_forward(r, tr_comm->rank * rows, rows, o->seq_len, &err) != SM_OK) tr_die("forward", &err);
    *loss = r->model.loss, *share = 1.0;
    if (tr_comm->size > 1) *loss = tr_global_loss(&r->model, share);
    if (!isfinite(*loss)) return 1;
    if (tr_comm->size == 1) {
        tr_backward(r);
        return 0;
    }
#ifdef TR_WITH_CUDA
    if (r->on_gpu) { /* ranks on GPUs: the gradients are summed after the backward */
        tr_backward(r);
        if (smc_params_allreduce_grads(&r->gpu, &r->gpu_model.params, tr_comm, (float)*share, &err) != SM_OK)
            tr_die("gradient all-reduce", &err);
        return 0;
    }
#endif
    /* ranks on the CPU: the dense gradients are summed in buckets while
     * the backward runs, the tables' rows after it */
    if (sm_model_backward_allreduce(&r->model, tr_comm, (float)*share, 0, &err) != SM_OK)
        tr_die("gradient all-reduce", &err);
    return 0;
}

/* One optimisation step. Returns 0, or 1 when the loss or the gradient is
 * not finite (nothing is updated then). */
static int tr_step(tr_run *r, const tr_opts *o, double *loss_out, char *msg, size_t msg_size) {
    sm_model *m = &r->model;
    float lr[TR_N_MODULES], clip;
    double gnorm, group_norm[SM_MAX_GROUPS], t0 = sm_now(), share;
    tr_module_stats st;
    tr_current_lrs(o, r, lr);
    tr_apply_module_lrs(m, lr, o->lr);
    sm_loader_next(&r->loader, r->in, r->tg, r->doc);
    if (r->step == o->debug_nan_step) m->params.data[m->wte] = NAN; /* test hook (CPU runs) */
    tr_zero_grad(r);
    if (tr_forward_backward(r, o, loss_out, &share) != 0) {
        snprintf(msg, msg_size, "the loss is %g at step %ld", *loss_out, r->step);
        return 1;
    }
    gnorm = tr_grad_norms(r, group_norm);
    if (!(gnorm < INFINITY)) {
        snprintf(msg, msg_size, "the gradient norm is %g at step %ld", gnorm, r->step);
        return 1;
    }
    if (tr_comm->size > 1) tr_global_sublayer_stats(m, share);
    tr_measure_outputs(m, &st);
    tr_measure_param_grads(m, group_norm, &st);
    tr_stats_ema(&r->train_avg, &st, 0.9);
    tr_stats_ema(&r->coord.avg, &st, 0.9);
    clip = sm_clip_scale(gnorm, o->grad_clip);
    tr_adamw(r, sm_lr_schedule(r->step, o->warmup, o->steps, o->min_lr_ratio), clip);
    if (strcmp(o->strategy, "auto") == 0 && o->coord_every > 0 && (r->step + 1) % o->coord_every == 0)
        tr_coord_update(&r->coord);
    r->step++;
    r->tokens_seen += (double)o->batch * o->seq_len;
    r->train_seconds += sm_now() - t0;
    return 0;
}

/* ---- JSON files: valid JSON (null where a value is absent or not
 * finite), written whole or not at all ---- */

typedef struct {
    FILE *f;
    int fields;
    char path[TR_PATH], tmp[TR_PATH + 8];
} tr_json;

/* An object written to PATH.tmp; tr_json_close syncs it and renames it over
 * PATH. Returns 0, or -1 with a message. */
static int tr_json_open(tr_json *j, const char *path) {
    snprintf(j->path, sizeof j->path, "%s", path);
    snprintf(j->tmp, sizeof j->tmp, "%s.tmp", path);
    j->fields = 0;
    if (!(j->f = fopen(j->tmp, "w"))) {
        fprintf(stderr, "trainer: cannot write %s: %s\n", j->tmp, strerror(errno));
        return -1;
    }
    fprintf(j->f, "{");
    return 0;
}

static void tr_json_close(tr_json *j) {
    sm_error err = {SM_OK, ""};
    int ok = fprintf(j->f, "\n}\n") > 0 && fflush(j->f) == 0;
    if (fclose(j->f) != 0 || !ok || sm_sync_path(j->tmp, &err) != SM_OK || rename(j->tmp, j->path) != 0) {
        fprintf(stderr, "trainer: cannot write %s: %s\n", j->path, err.msg[0] ? err.msg : strerror(errno));
        remove(j->tmp);
    }
}

static void tr_json_key(tr_json *j, const char *key) {
    fprintf(j->f, "%s\n  \"%s\": ", j->fields++ ? "," : "", key);
}

static void tr_json_num(tr_json *j, const char *key, double v) {
    tr_json_key(j, key);
    if (isfinite(v)) fprintf(j->f, "%.10g", v);
    else fprintf(j->f, "null");
}

static void tr_json_int(tr_json *j, const char *key, unsigned long long v) {
    tr_json_key(j, key);
    fprintf(j->f, "%llu", v);
}

static void tr_json_str(tr_json *j, const char *key, const char *v) {
    tr_json_key(j, key);
    fputc('"', j->f);
    for (; *v; v++) {
        unsigned char c = (unsigned char)*v;
        if (c == '"' || c == '\\') fprintf(j->f, "\\%c", c);
        else if (c < 0x20) fprintf(j->f, "\\u%04x", c);
        else fputc(c, j->f);
    }
    fputc('"', j->f);
}

static void tr_write_summary(const tr_opts *o, const tr_run *r, const tr_eval *e, double train_loss) {
    char path[TR_PATH];
    tr_json j;
    int g;
    tr_path(path, o, "summary.json");
    if (tr_json_open(&j, path) != 0) return;
    tr_json_int(&j, "steps", (unsigned long long)r->step);
    tr_json_int(&j, "tokens", (unsigned long long)r->tokens_seen);
    tr_json_num(&j, "train_loss", train_loss);
    tr_json_num(&j, "val_loss", e->loss);
    tr_json_num(&j, "val_ppl", e->ppl);
    tr_json_num(&j, "tokens_per_s", r->train_seconds > 0 ? r->tokens_seen / r->train_seconds : NAN);
    tr_json_int(&j, "params", (unsigned long long)r->model.params.total);
    tr_json_str(&j, "strategy", o->strategy);
    tr_json_int(&j, "seed", (unsigned long long)o->seed);
    tr_json_str(&j, "data", r->data.dir);
    tr_json_key(&j, "groups");
    fprintf(j.f, "{");
    for (g = 0; g < r->model.params.n_groups; g++) {
        size_t n = 0;
        int t;
        for (t = 0; t < r->model.params.n_tensors; t++)
            if (r->model.params.tensors[t].group == g) n += r->model.params.tensors[t].size;
        fprintf(j.f, "%s\"%s\": %zu", g ? ", " : "", r->model.params.groups[g].name, n);
    }
    fprintf(j.f, "}");
    tr_json_num(&j, "hot_cold_delta", e->has_route ? e->route.hot_cold_delta : NAN);
    tr_json_num(&j, "loss_hot", e->has_route ? e->route.loss_hot : NAN);
    tr_json_num(&j, "loss_cold", e->has_route ? e->route.loss_cold : NAN);
    tr_json_num(&j, "engram_alpha", e->engram_alpha);
    tr_json_num(&j, "peer_frac_used", e->peer_frac_used);
    tr_json_num(&j, "peer_kl", e->peer_kl);
    tr_json_num(&j, "mhc_sum_err", e->mhc_sum_err);
    tr_json_num(&j, "mhc_amax_fwd", e->mhc_amax_fwd);
    tr_json_close(&j);
}

/* Rows either side a moving average of the per-step loss spans: ~2% of the run. */
static int tr_smoothing_half(int n_steps) { return n_steps / 50 > 1 ? n_steps / 50 : 1; }

/* RUN/loss.png: the training loss per step (light, and as a moving
 * average) and the validation loss per eval. */
static void tr_plot_losses(const tr_opts *o) {
    smp_csv steps, evals;
    smp_series se[3];
    smp_line_spec sp;
    float *sx, *sy, *smooth, *ex, *ey;
    char path[TR_PATH], errbuf[SMP_ERR_SIZE], smooth_name[64];
    tr_path(path, o, "steps.csv");
    if (smp_csv_read(&steps, path, NULL) != 0) return;
    tr_path(path, o, "log.csv");
    if (smp_csv_read(&evals, path, NULL) != 0) {
        smp_csv_free(&steps);
        return;
    }
    sx = smp_csv_column(&steps, "step"), sy = smp_csv_column(&steps, "loss");
    ex = smp_csv_column(&evals, "step"), ey = smp_csv_column(&evals, "val_loss");
    smooth = smp_csv_column(&steps, "loss");
    if (sy && smooth) smp_moving_average(sy, steps.n_rows, tr_smoothing_half(steps.n_rows), smooth);
    snprintf(smooth_name, sizeof smooth_name, "train, %d-step average", 2 * tr_smoothing_half(steps.n_rows) + 1);
    memset(se, 0, sizeof se);
    memset(&sp, 0, sizeof sp);
    se[0].name = "train (per step)", se[0].x = sx, se[0].y = sy, se[0].n = steps.n_rows, se[0].color = 0xC8C8C8u;
    se[1].name = smooth_name, se[1].x = sx, se[1].y = smooth, se[1].n = steps.n_rows, se[1].color = smp_palette(0);
    se[2].name = "validation", se[2].x = ex, se[2].y = ey, se[2].n = evals.n_rows, se[2].color = smp_palette(1);
    sp.title = "Loss", sp.xlabel = "training step", sp.ylabel = "loss (nats/token)", sp.series = se, sp.n_series = 3;
    tr_path(path, o, "loss.png");
    if (smp_line_chart(&sp, path, errbuf) != 0) fprintf(stderr, "trainer: %s\n", errbuf);
    smp_free(sx), smp_free(sy), smp_free(smooth), smp_free(ex), smp_free(ey);
    smp_csv_free(&steps), smp_csv_free(&evals);
}

typedef struct {
    int lead; /* rank 0: writes the files (with sharded tables the other
                 ranks also evaluate and checkpoint, writing nothing) */
    FILE *evlog, *steplog, *diaglog;
    char ckpt[TR_PATH];
    tr_eval e; /* the last evaluation */
} tr_outputs;

/* Rank 0's files of a run: the three logs (cut back to the checkpoint's
 * step on --resume) and where the checkpoint goes; none on other ranks. */
static void tr_outputs_open(tr_outputs *w, const tr_opts *o, const tr_run *r) {
    memset(w, 0, sizeof *w);
    if (tr_comm->rank != 0) return;
    w->lead = 1;
    w->evlog = tr_open_log(o, "log.csv", tr_eval_header, o->resume ? r->step : -1);
    w->steplog = tr_open_log(o, "steps.csv", "step,loss,lr_factor", o->resume ? r->step : -1);
    w->diaglog = tr_open_log(o, "diag.csv", tr_diag_header, o->resume ? r->step : -1); /* header only: off */
    tr_path(w->ckpt, o, "model.ckpt");
}

static void tr_outputs_close(tr_outputs *w) {
    if (w->lead) fclose(w->evlog), fclose(w->steplog), fclose(w->diaglog);
}

/* Rank 0's part of a step (every rank's with sharded tables: their
 * forwards are collective): the step log, progress, evals and checkpoints. */
static void tr_record_step(tr_run *r, const tr_opts *o, tr_outputs *w, double loss, long end) {
    sm_error err = {SM_OK, ""};
    if (w->lead) {
        fprintf(w->steplog, "%ld,%.6f,%.6f\n", r->step, loss,
                sm_lr_schedule(r->step - 1, o->warmup, o->steps, o->min_lr_ratio));
        if (tr_diag_due(o, r->step)) tr_log_diag(w->diaglog, o, r);
    }
    tr_progress(o, r, r->loss_avg);
    if ((o->eval_every > 0 && r->step % o->eval_every == 0) || r->step == o->steps) {
        float lr[TR_N_MODULES];
        tr_current_lrs(o, r, lr);
        tr_to_host(r);
        /* every logged eval uses the same batches, so the curve compares like with like */
        w->e = tr_evaluate(r, o->batch, o->eval_batches);
        if (w->lead) tr_log_eval(w->evlog, r, r->loss_avg, &w->e, lr);
        if (!o->quiet && isatty(fileno(stdout))) printf("\n");
        if (!o->quiet) printf("eval step %ld: val loss %.4f (ppl %.2f)\n", r->step, w->e.loss, w->e.ppl);
    }
    if ((o->ckpt_every > 0 && r->step % o->ckpt_every == 0) || r->step == end) {
        tr_to_host(r);
        if (w->lead) {
            tr_sync_log(w->evlog, o, "log.csv");
            tr_sync_log(w->steplog, o, "steps.csv");
            tr_sync_log(w->diaglog, o, "diag.csv");
        }
        if (tr_save_checkpoint(r, o, w->ckpt, &err) != SM_OK) tr_die("checkpoint", &err);
    }
}

/* Rank 0 (every rank with sharded tables), at the end: the final numbers
 * cover the whole validation split. */
static void tr_finish_run(tr_run *r, const tr_opts *o, tr_outputs *w) {
    if (!o->quiet && isatty(fileno(stdout))) printf("\n");
    if (r->step == o->steps) {
        tr_to_host(r);
        /* (e.tokens == 0: no eval in this process, a finished run resumed) */
        if (o->eval_batches > 0 || w->e.tokens == 0) w->e = tr_evaluate(r, o->batch, 0);
        if (w->lead) tr_write_summary(o, r, &w->e, r->loss_avg);
        if (w->lead && w->e.has_route) tr_write_route_tables(o, &w->e.route);
    }
    tr_outputs_close(w);
    if (w->lead) tr_plot_losses(o);
}

/* The GEMM a run's products go through, for the start-up line: on the CPU
 * the one `make` chose (bench_backbone choose) or USE_CBLAS named. */
static const char *tr_gemm_name(char *out, size_t n, const char *device) {
    if (strcmp(device, "cuda") == 0)
        snprintf(out, n, "cuBLAS");
    else if (strcmp(sm_sgemm_path(), "cblas") == 0)
        snprintf(out, n, "cblas_sgemm");
    else
        snprintf(out, n, "sm_sgemm (%s)", sm_sgemm_path());
    return out;
}

/* Returns 0 on success, 2 when stopped by the NaN guard (on every rank:
 * the loss and the gradient norm they test are global). */
static int tr_train(tr_opts *o) {
    tr_run r;
    tr_outputs w;
    char msg[256], gemm[32];
    double loss = NAN;
    long end;
    int lead = tr_comm->rank == 0, every;
    if (!lead) o->quiet = 1;
    tr_run_setup(&r, o);
    every = lead || sm_model_is_sharded(&r.model); /* the ranks that evaluate and checkpoint */
    end = o->stop_after > 0 && o->stop_after < o->steps ? o->stop_after : o->steps;
    tr_outputs_open(&w, o, &r);
    if (!o->quiet)
        printf("model: %zu parameters%s, %d sublayers, %d threads x %d processes, GEMM %s; %zu train / %zu val tokens\n",
               r.model.params.total, sm_model_is_sharded(&r.model) ? " on rank 0 (tables sharded)" : "",
               r.model.n_sub, sm_num_threads(), tr_comm->size, tr_gemm_name(gemm, sizeof gemm, o->device),
               r.data.train.n_tokens, r.data.val.n_tokens);
    if (!o->quiet && strcmp(o->device, "cuda") != 0 && sm_sgemm_target_advice())
        printf("note: %s\n", sm_sgemm_target_advice());
    while (r.step < end) {
        if (tr_step(&r, o, &loss, msg, sizeof msg) != 0) {
            if (lead) {
                int kept = tr_exists(w.ckpt);
                fprintf(stderr, "\ntrainer: stopped: %s. Nothing was updated; %s%s.\n", msg,
                        kept ? "the last good checkpoint is kept at " : "no checkpoint was written yet",
                        kept ? w.ckpt : "");
                tr_outputs_close(&w);
            }
            tr_run_free(&r);
            return 2;
        }
        tr_ema(&r.loss_avg, loss, 0.9);
        if (every) tr_record_step(&r, o, &w, loss, end);
        tr_debug_kill(o, r.step, NULL);
    }
    if (every) tr_finish_run(&r, o, &w);
    tr_run_free(&r);
    return 0;
}

/* ===================================================================== */
/* Eval and sample from a checkpoint                                     */
/* ===================================================================== */

static void tr_check_vocab(const tr_run *r, const char *what) {
    if (r->data.vocab == (uint32_t)r->cfg.vocab_size) return;
    fprintf(stderr, "trainer: the tokens in %s have %u ids, the %s's model %d\n", r->data.dir, r->data.vocab, what,
            r->cfg.vocab_size);
    exit(1);
}

/* A checkpoint's model, and its data unless --data names other data. */
static void tr_load_checkpoint_model(tr_run *r, tr_opts *o, int B) {
    sm_error err = {SM_OK, ""};
    sm_reader rd;
    tr_opts saved;
    if (tr_read_checkpoint_header(&rd, o->ckpt, &r->cfg, &saved, &err) != SM_OK) tr_die("--ckpt", &err);
    if (!o->data[0]) snprintf(o->data, sizeof o->data, "%s", saved.data);
    snprintf(o->out, sizeof o->out, "%s", saved.out);
    tr_load_data(&r->data, o, 0);
    tr_check_vocab(r, "checkpoint");
    if (sm_model_init(&r->model, &r->cfg, B, 1, &err) != SM_OK) tr_die("model", &err);
    if (tr_read_checkpoint_state(&rd, r, &err) != SM_OK) tr_die("--ckpt", &err);
    sm_reader_close(&rd);
}

/* A safetensors export's model (the config from its metadata); the file
 * does not name its data, so --data must. An Engram-Nine model's hot set
 * is built again from the training split, as training built it. */
static void tr_load_safetensors_model(tr_run *r, tr_opts *o, int B) {
    sm_error err = {SM_OK, ""};
    sm_safetensors st;
    if (!o->data[0]) {
        fprintf(stderr, "trainer: --ckpt %s: a safetensors export does not name its data: give --data DIR "
                        "(the tokenized folder it was trained on)\n", o->ckpt);
        exit(1);
    }
    if (sm_safetensors_load(&st, o->ckpt, &err) != SM_OK || sm_model_config_from_safetensors(&st, &r->cfg, &err) != SM_OK)
        tr_die("--ckpt", &err);
    tr_load_data(&r->data, o, r->cfg.use_nine);
    tr_check_vocab(r, "export");
    if (sm_model_init(&r->model, &r->cfg, B, 1, &err) != SM_OK) tr_die("model", &err);
    if (sm_model_load_safetensors(&r->model, &st, &err) != SM_OK) tr_die("--ckpt", &err);
    sm_safetensors_free(&st);
    if (r->cfg.use_nine) tr_build_hot_set(r, o);
}

/* Builds the model of --ckpt (and its data) for eval/sample. */
static void tr_load_for_inference(tr_run *r, tr_opts *o, int B) {
    sm_error err = {SM_OK, ""};
    size_t N;
    if (!o->ckpt[0]) {
        fprintf(stderr, "trainer: --ckpt is required\n");
        exit(1);
    }
    memset(r, 0, sizeof *r);
    if (tr_is_safetensors(o->ckpt)) tr_load_safetensors_model(r, o, B);
    else tr_load_checkpoint_model(r, o, B);
    tr_set_canon(&r->model, &r->data);
    N = (size_t)B * r->cfg.seq_len;
    r->in = (int *)sm_alloc(N, sizeof(int), "inputs", &err);
    r->tg = (int *)sm_alloc(N, sizeof(int), "targets", &err);
    r->doc = (unsigned char *)sm_alloc(N, 1, "document starts", &err);
    r->label = (unsigned char *)sm_alloc(N, 1, "route labels", &err);
    if (!r->in || !r->tg || !r->doc || !r->label) tr_die("buffers", &err);
}

/* RUN/eval_TAG.json next to the checkpoint. */
static void tr_write_eval_json(const tr_opts *o, const tr_eval *e) {
    char dir[TR_PATH], name[96], path[TR_PATH];
    const char *slash = strrchr(o->ckpt, '/');
    tr_json j;
    snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - o->ckpt) : 1, slash ? o->ckpt : ".");
    snprintf(name, sizeof name, "eval_%s.json", o->tag);
    tr_join(path, dir, name);
    if (tr_json_open(&j, path) != 0) exit(1);
    tr_json_num(&j, "val_loss", e->loss);
    tr_json_num(&j, "val_ppl", e->ppl);
    tr_json_int(&j, "tokens", (unsigned long long)e->tokens);
    tr_json_str(&j, "data", o->data);
    tr_json_close(&j);
}

static int tr_cmd_eval(tr_opts *o) {
    tr_run r;
    tr_eval e;
    tr_load_for_inference(&r, o, o->batch);
    e = tr_evaluate(&r, o->batch, o->eval_batches);
    if (!o->quiet) printf("val loss %.4f  ppl %.2f  (%zu tokens, step %ld)\n", e.loss, e.ppl, e.tokens, r.step);
    if (o->tag[0]) tr_write_eval_json(o, &e);
    tr_run_free(&r);
    return 0;
}

/* A checkpoint's weights and model config as a safetensors file
 * (sm_model_save_safetensors); the Adam moments and the run's state stay
 * in the checkpoint. */
static int tr_cmd_export(tr_opts *o) {
    sm_error err = {SM_OK, ""};
    sm_reader rd;
    tr_opts saved;
    tr_run r;
    if (o->format[0] && strcmp(o->format, "safetensors") != 0) {
        fprintf(stderr, "trainer export: --format %s: the format is safetensors\n", o->format);
        return 1;
    }
    if (!o->ckpt[0] || !o->out[0]) {
        fprintf(stderr, "trainer export: --ckpt RUN/model.ckpt and --out FILE.safetensors are required\n");
        return 1;
    }
    memset(&r, 0, sizeof r);
    if (tr_read_checkpoint_header(&rd, o->ckpt, &r.cfg, &saved, &err) != SM_OK) tr_die("--ckpt", &err);
    if (sm_model_init(&r.model, &r.cfg, 1, 1, &err) != SM_OK) tr_die("model", &err);
    if (tr_read_checkpoint_state(&rd, &r, &err) != SM_OK) tr_die("--ckpt", &err);
    sm_reader_close(&rd);
    if (sm_model_save_safetensors(&r.model, o->out, &err) != SM_OK) tr_die("export", &err);
    if (!o->quiet)
        printf("wrote %s: %d tensors, %zu parameters (step %ld)\n", o->out, r.model.params.n_tensors,
               r.model.params.total, r.step);
    sm_model_free(&r.model);
    return 0;
}

/* Draws a token from logits[V] with temperature and top-k. */
static int tr_sample_token(const float *logits, int V, float temperature, int top_k, sm_rng *rng) {
    float *p = (float *)malloc(sizeof(float) * V), maxv = -1e30f, kth = -1e30f;
    double sum = 0, u;
    int v, pick = V - 1;
    if (!p) return 0;
    for (v = 0; v < V; v++) maxv = logits[v] > maxv ? logits[v] : maxv;
    if (top_k > 0 && top_k < V) { /* threshold = the k-th largest logit */
        int idx[SM_TOPK_MAX];
        float val[SM_TOPK_MAX];
        int k = top_k < SM_TOPK_MAX ? top_k : SM_TOPK_MAX;
        sm_topk(logits, V, k, idx, val);
        kth = val[k - 1];
    }
    for (v = 0; v < V; v++) {
        p[v] = logits[v] >= kth ? expf((logits[v] - maxv) / (temperature > 0 ? temperature : 1e-6f)) : 0.0f;
        sum += p[v];
    }
    u = sm_rng_uniform(rng) * sum;
    for (v = 0; v < V; v++) {
        u -= p[v];
        if (u <= 0) {
            pick = v;
            break;
        }
    }
    free(p);
    return pick;
}

/* Generates o->sample_tokens tokens after o->prompt and writes the text to out. */
static int tr_sample(tr_opts *o, FILE *out) {
    tr_run r;
    sm_error err = {SM_OK, ""};
    sm_rng rng;
    uint32_t *ids;
    size_t n_ids = 0, i, len = strlen(o->prompt), cap;
    int T, V, t;
    unsigned char *text;
    tr_load_for_inference(&r, o, 1);
    if (r.data.gpt2) {
        fprintf(stderr, "trainer: sample: %s holds GPT-2 tokens; sampling with GPT-2's tokenizer is not "
                        "implemented (eval works)\n", r.data.dir);
        exit(1);
    }
    T = r.cfg.seq_len, V = r.cfg.vocab_size;
    cap = len + (size_t)o->sample_tokens + 2;
    ids = (uint32_t *)sm_alloc(cap, sizeof(uint32_t), "sample tokens", &err);
    if (!ids) tr_die("sample", &err);
    ids[n_ids++] = SM_BPE_EOT; /* a document start */
    if (len && sm_bpe_encode(&r.data.bpe, (const unsigned char *)o->prompt, len, ids + 1, &i, &err) != SM_OK)
        tr_die("encoding the prompt", &err);
    n_ids += len ? i : 0;
    sm_rng_seed(&rng, o->seed);
    for (t = 0; t < o->sample_tokens; t++) {
        size_t start = n_ids > (size_t)T ? n_ids - T : 0, n = n_ids - start;
        for (i = 0; i < n; i++) r.in[i] = (int)ids[start + i], r.doc[i] = ids[start + i] == SM_BPE_EOT;
        if (sm_model_forward(&r.model, r.in, NULL, r.doc, 1, (int)n, &err) != SM_OK) tr_die("sample", &err);
        ids[n_ids++] = (uint32_t)tr_sample_token(r.model.logits + (n - 1) * (size_t)V, V, o->temperature, o->top_k, &rng);
    }
    cap = sm_bpe_decode(&r.data.bpe, ids, n_ids, NULL, 0);
    text = (unsigned char *)sm_alloc(cap + 1, 1, "sample text", &err);
    if (!text) tr_die("sample", &err);
    sm_bpe_decode(&r.data.bpe, ids, n_ids, text, cap + 1);
    fwrite(text, 1, cap, out);
    fprintf(out, "\n");
    sm_free(text), sm_free(ids);
    tr_run_free(&r);
    return 0;
}

/* ===================================================================== */
/* Report: tables and plots over finished runs                           */
/* ===================================================================== */

#define TR_MAX_RUNS 64
#define TR_LABEL 128

/* The numbers of keys[0..n) ("key": number) from a flat JSON file written
 * by this trainer, read once; NaN where a key (or the file) is missing. */
static void tr_json_numbers(const char *path, const char *const *keys, double *out, int n) {
    unsigned char *text;
    size_t len;
    int i;
    for (i = 0; i < n; i++) out[i] = NAN;
    if (sm_read_file(path, &text, &len, NULL) != SM_OK) return;
    for (i = 0; i < n; i++) {
        char pat[80];
        const char *at;
        snprintf(pat, sizeof pat, "\"%s\":", keys[i]);
        at = strstr((const char *)text, pat);
        if (at) {
            char *end;
            double v = strtod(at + strlen(pat), &end);
            out[i] = end > at + strlen(pat) ? v : NAN; /* null: absent */
        }
    }
    sm_free(text);
}

static double tr_json_number(const char *path, const char *key) {
    double v;
    tr_json_numbers(path, &key, &v, 1);
    return v;
}

/* One finished run: its final numbers, eval log (log.csv), per-step
 * training log (steps.csv) and training-time diagnostics (diag.csv; no rows
 * in a run from before it, or with --diag-every 0). */
typedef struct {
    char dir[TR_PATH], label[TR_LABEL];
    smp_csv log, steps, diag;
    double val_loss, tok_s, params, xdomain;
    double loss_hot, loss_cold, hot_cold_delta; /* NaN without route statistics */
} tr_report_run;

/* The seeds of one configuration (the runs sharing a label), with the mean
 * and standard deviation of their final numbers. */
typedef struct {
    char label[TR_LABEL];
    const tr_report_run *runs[TR_MAX_RUNS];
    int n;
    double val_mean, val_std, x_mean, x_std, tps_mean;
} tr_report_group;

typedef struct {
    tr_report_run *runs;     /* n_runs, then groups in order of first appearance */
    tr_report_group *groups;
    int n_runs, n_groups;
    const char *out, *baseline;
} tr_report;

/* The summary.json keys a report reads, in tr_report_run's order. */
static const char *const tr_summary_keys[6] = {"val_loss", "tokens_per_s", "params",
                                               "loss_hot", "loss_cold", "hot_cold_delta"};
/* Legend names of the modules, and their diagnostic columns in log.csv
 * (and diag.csv, where the output norms are train_out_*). */
static const char *const tr_module_legend[TR_N_MODULES] = {"backbone", "Engram", "PEER", "mHC"};
static const char *const tr_out_cols[TR_N_MODULES] = {"out_backbone", "out_engram", "out_peer", NULL};
static const char *const tr_train_out_cols[TR_N_MODULES] = {"train_out_backbone", "train_out_engram",
                                                            "train_out_peer", NULL};
static const char *const tr_gpar_cols[TR_N_MODULES] = {"gpar_backbone", "gpar_engram", "gpar_peer", "gpar_mhc"};
static const char *const tr_lr_cols[TR_N_MODULES] = {"lr_backbone", "lr_engram", "lr_peer", "lr_mhc"};
static const char *const tr_alpha_buckets[SM_ROUTE_ALPHA_BUCKETS] = {"0-.2", ".2-.4", ".4-.6", ".6-.8", ".8-1"};

/* Label = the run folder's name without a trailing "-sN" seed suffix. */
static void tr_run_label(const char *dir, char *label, size_t n) {
    const char *base = strrchr(dir, '/');
    char *dash;
    snprintf(label, n, "%s", base && base[1] ? base + 1 : dir);
    dash = strrchr(label, '-');
    if (dash && dash[1] == 's' && isdigit((unsigned char)dash[2])) *dash = 0;
}

static void tr_mean_std(const double *x, int n, double *mean, double *std) {
    double s = 0, ss = 0;
    int i, k = 0;
    for (i = 0; i < n; i++)
        if (!isnan(x[i])) s += x[i], ss += x[i] * x[i], k++;
    *mean = k ? s / k : NAN;
    *std = k > 1 ? sqrt(fmax(0, (ss - s * s / k) / (k - 1))) : NAN;
}

static int tr_any_finite(const float *x, int n) {
    int i;
    for (i = 0; i < n; i++)
        if (isfinite(x[i])) return 1;
    return 0;
}

static void tr_report_error(const char *what, const char *path, const char *errbuf) {
    fprintf(stderr, "trainer report: %s %s: %s\n", what, path, errbuf);
}

/* ---- load ------------------------------------------------------------ */

/* A run folder; 0 when it holds a finished run (a summary.json). */
static int tr_report_load_run(tr_report_run *r, const char *dir) {
    char path[TR_PATH];
    double v[6];
    memset(r, 0, sizeof *r);
    snprintf(r->dir, sizeof r->dir, "%s", dir);
    tr_join(path, dir, "summary.json");
    tr_json_numbers(path, tr_summary_keys, v, 6);
    if (isnan(v[0])) return 1;
    r->val_loss = v[0], r->tok_s = v[1], r->params = v[2];
    r->loss_hot = v[3], r->loss_cold = v[4], r->hot_cold_delta = v[5];
    tr_join(path, dir, "eval_xdomain.json");
    r->xdomain = tr_json_number(path, "val_loss");
    tr_join(path, dir, "log.csv");
    smp_csv_read(&r->log, path, NULL); /* a missing log leaves an empty table */
    tr_join(path, dir, "steps.csv");
    smp_csv_read(&r->steps, path, NULL);
    tr_join(path, dir, "diag.csv");
    smp_csv_read(&r->diag, path, NULL);
    tr_run_label(dir, r->label, sizeof r->label);
    return 0;
}

/* Every finished run among dirs; returns how many. */
static int tr_report_load(tr_report *rep, char **dirs, int n_dirs) {
    int i;
    for (i = 0; i < n_dirs; i++) {
        if (tr_report_load_run(&rep->runs[rep->n_runs], dirs[i]) == 0) rep->n_runs++;
        else fprintf(stderr, "trainer report: %s has no finished run (summary.json); skipped\n", dirs[i]);
    }
    return rep->n_runs;
}

/* ---- group ----------------------------------------------------------- */

/* The group of a label, or -1. */
static int tr_group_index(const tr_report *rep, const char *label) {
    int j = rep->n_groups - 1;
    while (j >= 0 && strcmp(rep->groups[j].label, label) != 0) j--;
    return j;
}

static void tr_group_stats(tr_report_group *g) {
    double v[TR_MAX_RUNS], x[TR_MAX_RUNS], t[TR_MAX_RUNS], unused;
    int i;
    for (i = 0; i < g->n; i++) v[i] = g->runs[i]->val_loss, x[i] = g->runs[i]->xdomain, t[i] = g->runs[i]->tok_s;
    tr_mean_std(v, g->n, &g->val_mean, &g->val_std);
    tr_mean_std(x, g->n, &g->x_mean, &g->x_std);
    tr_mean_std(t, g->n, &g->tps_mean, &unused);
}

/* Runs sharing a label are the seeds of one configuration. */
static void tr_report_group_runs(tr_report *rep) {
    int i, j;
    for (i = 0; i < rep->n_runs; i++) {
        const tr_report_run *r = &rep->runs[i];
        if ((j = tr_group_index(rep, r->label)) < 0) {
            j = rep->n_groups++;
            snprintf(rep->groups[j].label, TR_LABEL, "%s", r->label);
        }
        rep->groups[j].runs[rep->groups[j].n++] = r;
    }
    for (j = 0; j < rep->n_groups; j++) tr_group_stats(&rep->groups[j]);
}

/* ---- tables (report.md) ---------------------------------------------- */

/* "mean" or "mean ± std" (std only over several seeds). */
static void tr_md_mean(FILE *md, double mean, double std, int seeds) {
    fprintf(md, "%.4f", mean);
    if (seeds > 1) fprintf(md, " ± %.4f", std);
}

static void tr_report_loss_table(const tr_report *rep, FILE *md) {
    int b = tr_group_index(rep, rep->baseline), j;
    double base = b >= 0 ? rep->groups[b].val_mean : NAN, base_x = b >= 0 ? rep->groups[b].x_mean : NAN;
    fprintf(md, "| run | seeds | val loss | val ppl | vs %s | cross-domain loss | cross-domain ppl | vs %s | tokens/s | params |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n", rep->baseline, rep->baseline);
    for (j = 0; j < rep->n_groups; j++) {
        const tr_report_group *g = &rep->groups[j];
        fprintf(md, "| %s | %d | ", g->label, g->n);
        tr_md_mean(md, g->val_mean, g->val_std, g->n);
        fprintf(md, " | %.2f | %+.2f%% | ", exp(g->val_mean), 100.0 * (g->val_mean - base) / base);
        if (isnan(g->x_mean)) {
            fprintf(md, "– | – | – ");
        } else {
            tr_md_mean(md, g->x_mean, g->x_std, g->n);
            fprintf(md, " | %.2f | %+.2f%% ", exp(g->x_mean), 100.0 * (g->x_mean - base_x) / base_x);
        }
        fprintf(md, "| %.0f | %.2fM |\n", g->tps_mean, g->runs[0]->params / 1e6);
    }
    fprintf(md, "\nLoss: mean cross-entropy (nats/token) over the whole held-out split; ± is the standard "
                "deviation over seeds. \"vs\" columns: relative change of the loss against `%s` (negative = better).\n",
            rep->baseline);
}

/* First eval step at which hot_cold_delta has the opposite sign of its
 * first value (the "flip"), or -1. */
static double tr_flip_step(const smp_csv *t) {
    int cd = smp_csv_col(t, "hot_cold_delta"), cs = smp_csv_col(t, "step"), r;
    double first = NAN;
    if (cd < 0) return -1;
    for (r = 0; r < t->n_rows; r++) {
        double d = smp_csv_at(t, r, cd);
        if (isnan(d)) continue;
        if (isnan(first)) first = d;
        else if ((first < 0) != (d < 0)) return smp_csv_at(t, r, cs);
    }
    return -1;
}

static int tr_has_route(const tr_report_run *r) {
    int c = smp_csv_col(&r->log, "hot_cold_delta");
    return c >= 0 && r->log.n_rows > 0 && !isnan(smp_csv_at(&r->log, r->log.n_rows - 1, c));
}

/* The Engram-Nine table: each configuration's first seed with route statistics. */
static void tr_report_route_table(const tr_report *rep, FILE *md) {
    int j, header = 0;
    for (j = 0; j < rep->n_groups; j++) {
        const tr_report_run *r = rep->groups[j].runs[0];
        const smp_csv *t = &r->log;
        char flip_text[32] = "none";
        double flip = tr_flip_step(t);
        if (!tr_has_route(r)) continue;
        if (!header++)
            fprintf(md, "\n| run | val loss | loss hot | loss cold | hot-cold delta | flip step | alpha hot | alpha cold | tokens/s |\n"
                        "|---|---|---|---|---|---|---|---|---|\n");
        if (flip >= 0) snprintf(flip_text, sizeof flip_text, "%.0f", flip);
        fprintf(md, "| %s | %.4f | %.4f | %.4f | %+.4f | %s | %.3f | %.3f | %.0f |\n", r->label, r->val_loss,
                r->loss_hot, r->loss_cold, r->hot_cold_delta, flip_text,
                smp_csv_at(t, t->n_rows - 1, smp_csv_col(t, "alpha_hot")),
                smp_csv_at(t, t->n_rows - 1, smp_csv_col(t, "alpha_cold")), r->tok_s);
    }
    if (header)
        fprintf(md, "\nhot-cold delta = loss on positions whose n-grams are in the top-N set minus loss on the others "
                    "(negative: hot positions predicted better); flip step = first eval where its sign changes.\n");
}

static int tr_report_write_tables(const tr_report *rep) {
    char path[TR_PATH];
    FILE *md;
    tr_join(path, rep->out, "report.md");
    md = fopen(path, "w");
    if (!md) {
        fprintf(stderr, "trainer report: cannot write %s\n", path);
        return 1;
    }
    tr_report_loss_table(rep, md);
    tr_report_route_table(rep, md);
    fclose(md);
    return 0;
}

/* ---- plots ----------------------------------------------------------- */

/* One line of a report chart: column `col` of a configuration's logs,
 * named `name` in the legend. */
typedef struct {
    const tr_report_group *g;
    const char *col, *name;
} tr_line_item;

/* The logs of a run a chart reads from. */
typedef enum { TR_LOG_EVAL, TR_LOG_STEPS, TR_LOG_DIAG } tr_log_kind;

static const smp_csv *tr_run_log(const tr_report_run *r, tr_log_kind kind) {
    return kind == TR_LOG_STEPS ? &r->steps : kind == TR_LOG_DIAG ? &r->diag : &r->log;
}

/* Column `col` of every seed's log of that kind, each smoothed over +-half
 * rows, as a series: the mean
 * over the seeds shaded from the lowest to the highest seed (no band for
 * one seed). x, y, y_lo and y_hi share one allocation at x. Returns 0
 * (nothing allocated) when the column is missing or all NaN. */
static int tr_seed_band(const tr_report_group *g, tr_log_kind kind, const char *col, int half, smp_series *se) {
    const smp_csv *t0 = tr_run_log(g->runs[0], kind);
    float *ys[TR_MAX_RUNS], *block, *raw;
    int n = t0->n_rows, i, r;
    for (i = 1; i < g->n; i++) { /* the rows every seed has */
        const smp_csv *t = tr_run_log(g->runs[i], kind);
        n = t->n_rows < n ? t->n_rows : n;
    }
    if (n == 0 || smp_csv_col(t0, col) < 0) return 0;
    block = (float *)malloc(sizeof(float) * (size_t)n * (4 + g->n));
    if (!block) return 0;
    for (i = 0; i < g->n; i++) {
        ys[i] = block + (size_t)(4 + i) * n;
        raw = smp_csv_column(tr_run_log(g->runs[i], kind), col);
        if (raw) smp_moving_average(raw, n, half, ys[i]);
        else for (r = 0; r < n; r++) ys[i][r] = NAN;
        smp_free(raw);
    }
    for (r = 0; r < n; r++) block[r] = smp_csv_at(t0, r, smp_csv_col(t0, "step"));
    smp_band_over_runs((const float *const *)ys, g->n, n, block + n, block + 2 * n, block + 3 * n);
    if (!tr_any_finite(block + n, n)) {
        free(block);
        return 0;
    }
    memset(se, 0, sizeof *se);
    se->x = block, se->y = block + n, se->n = n;
    if (g->n > 1) se->y_lo = block + 2 * n, se->y_hi = block + 3 * n;
    return 1;
}

/* The series of the items that have data in their logs of that kind (at
 * most SMP_MAX_SERIES); returns how many. Each series' x holds its
 * allocation (free it). */
static int tr_items_series(const tr_line_item *items, int n, tr_log_kind kind, int half, smp_series *se) {
    int i, k = 0;
    for (i = 0; i < n && k < SMP_MAX_SERIES; i++) {
        if (!items[i].col || !tr_seed_band(items[i].g, kind, items[i].col, half, &se[k])) continue;
        se[k].name = items[i].name;
        k++;
    }
    return k;
}

/* A line chart of the items (those with data) against the training step,
 * styled by `style` (title, y label, log y, reference line), to
 * OUT/file. */
static void tr_plot_items(const tr_report *rep, const tr_line_item *items, int n, tr_log_kind kind, int half,
                          const smp_line_spec *style, const char *file) {
    smp_series se[SMP_MAX_SERIES];
    smp_line_spec sp = *style;
    char path[TR_PATH], errbuf[SMP_ERR_SIZE];
    int i, k = tr_items_series(items, n, kind, half, se);
    if (k == 0) return;
    sp.xlabel = "training step", sp.series = se, sp.n_series = k;
    tr_join(path, rep->out, file);
    if (smp_line_chart(&sp, path, errbuf) != 0) tr_report_error("plot", path, errbuf);
    for (i = 0; i < k; i++) free((void *)se[i].x);
}

/* One column over all configurations, one line each (mean over seeds). */
static void tr_plot_configs(const tr_report *rep, const char *col, tr_log_kind kind, int half,
                            const smp_line_spec *style, const char *file) {
    tr_line_item items[TR_MAX_RUNS] = {{NULL, NULL, NULL}};
    int j;
    for (j = 0; j < rep->n_groups; j++) items[j].g = &rep->groups[j], items[j].col = col, items[j].name = rep->groups[j].label;
    tr_plot_items(rep, items, rep->n_groups, kind, half, style, file);
}

/* A chart style: title, y label (with its unit), log y. */
static smp_line_spec tr_style(const char *title, const char *ylabel, int log_y) {
    smp_line_spec sp;
    memset(&sp, 0, sizeof sp);
    sp.title = title, sp.ylabel = ylabel, sp.log_y = log_y;
    return sp;
}

/* Validation loss per eval and training loss per step (a centred moving
 * average), mean over seeds with a min-max band. */
static void tr_plot_losses_over_seeds(const tr_report *rep) {
    smp_line_spec sp = tr_style("Validation loss (line: mean over seeds, band: min-max)", "loss (nats/token)", 0);
    int half = tr_smoothing_half(rep->groups[0].runs[0]->steps.n_rows);
    char title[160];
    tr_plot_configs(rep, "val_loss", TR_LOG_EVAL, 0, &sp, "val_loss.png");
    snprintf(title, sizeof title, "Training loss, %d-step moving average (line: mean over seeds, band: min-max)",
             2 * half + 1);
    sp.title = title;
    tr_plot_configs(rep, "loss", TR_LOG_STEPS, half, &sp, "train_loss.png");
}

/* A chart of one quantity per module, as drawn from one log: what it
 * shows (the title), its y label with where it was measured, and the
 * columns. */
typedef struct {
    const char *what, *ylabel, *const *cols;
} tr_module_view;

/* Its file prefix, and its views of diag.csv and of log.csv (runs from
 * before diag.csv). */
typedef struct {
    const char *prefix;
    tr_module_view diag, eval;
} tr_module_chart;

#define TR_EMA_NOTE "(EMA, decay 0.9/step)"
static const tr_module_chart tr_module_charts[] = {
    {"outputs", {"output norms, training batches", "L2 norm per position " TR_EMA_NOTE, tr_train_out_cols},
     {"output norms, held-out batches", "L2 norm per position (per eval)", tr_out_cols}},
    {"grads", {"parameter gradient norms", "gradient L2 norm " TR_EMA_NOTE, tr_gpar_cols},
     {"parameter gradient norms", "gradient L2 norm " TR_EMA_NOTE, tr_gpar_cols}},
    {"lr", {"learning rates", "learning rate (before warmup/cosine factor)", tr_lr_cols},
     {"learning rates", "learning rate (before warmup/cosine factor)", tr_lr_cols}},
};

/* A chart's lines for one configuration, one per module, and the view
 * they come from: diag.csv (*kind TR_LOG_DIAG) where every seed has rows
 * in it, else log.csv. */
static const tr_module_view *tr_module_items(const tr_report_group *g, const tr_module_chart *c,
                                             tr_line_item items[TR_N_MODULES], tr_log_kind *kind) {
    const tr_module_view *v;
    int i, m;
    *kind = TR_LOG_DIAG;
    for (i = 0; i < g->n; i++)
        if (g->runs[i]->diag.n_rows == 0) *kind = TR_LOG_EVAL;
    v = *kind == TR_LOG_DIAG ? &c->diag : &c->eval;
    for (m = 0; m < TR_N_MODULES; m++) items[m].g = g, items[m].col = v->cols[m], items[m].name = tr_module_legend[m];
    return v;
}

/* One configuration's chart of one quantity per module, each the mean
 * over its seeds with a min-max band. */
static void tr_plot_modules(const tr_report *rep, const tr_report_group *g, const tr_module_chart *c) {
    tr_line_item items[TR_N_MODULES];
    tr_log_kind kind;
    const tr_module_view *v = tr_module_items(g, c, items, &kind);
    smp_line_spec sp;
    char title[256], file[200];
    snprintf(title, sizeof title, "%s: %s%s", g->label, v->what, g->n > 1 ? " (seed mean, min-max band)" : "");
    snprintf(file, sizeof file, "%s_%s.png", c->prefix, g->label);
    sp = tr_style(title, v->ylabel, 1);
    tr_plot_items(rep, items, TR_N_MODULES, kind, 0, &sp, file);
}

static void tr_plot_module_diagnostics(const tr_report *rep) {
    int j, c;
    for (j = 0; j < rep->n_groups; j++)
        for (c = 0; c < (int)(sizeof tr_module_charts / sizeof tr_module_charts[0]); c++)
            tr_plot_modules(rep, &rep->groups[j], &tr_module_charts[c]);
}

static void tr_plot_peer_usage(const tr_report *rep) {
    smp_line_spec sp = tr_style("PEER: fraction of experts used per eval pass", "experts retrieved (fraction of all)", 0);
    tr_plot_configs(rep, "peer_frac_used", TR_LOG_EVAL, 0, &sp, "peer_usage.png");
    sp = tr_style("PEER: unevenness of expert usage", "KL(usage || uniform) (nats)", 0);
    tr_plot_configs(rep, "peer_kl", TR_LOG_EVAL, 0, &sp, "peer_kl.png");
}

/* Bars of one run's final alpha buckets (mean loss and hot share) of its
 * first Engram layer. */
static void tr_plot_alpha_buckets(const tr_report_run *r, const char *out_dir) {
    smp_csv bt;
    char path[TR_PATH], name[200], title[200], errbuf[SMP_ERR_SIZE];
    float loss[SM_ROUTE_ALPHA_BUCKETS], share[SM_ROUTE_ALPHA_BUCKETS];
    smp_bar_series bs[2];
    smp_bar_spec sp[2];
    smp_panel panels[2];
    int i;
    tr_join(path, r->dir, "route_buckets.csv");
    if (smp_csv_read(&bt, path, NULL) != 0) return;
    for (i = 0; i < SM_ROUTE_ALPHA_BUCKETS; i++) { /* layer 0's buckets come first */
        loss[i] = smp_csv_at(&bt, i, smp_csv_col(&bt, "loss"));
        share[i] = smp_csv_at(&bt, i, smp_csv_col(&bt, "hot_share"));
    }
    smp_csv_free(&bt);
    memset(bs, 0, sizeof bs), memset(sp, 0, sizeof sp), memset(panels, 0, sizeof panels);
    bs[0].name = "mean loss", bs[0].values = loss;
    bs[1].name = "hot share", bs[1].values = share;
    for (i = 0; i < 2; i++) {
        sp[i].xlabel = "gate alpha bucket", sp[i].categories = tr_alpha_buckets;
        sp[i].n_categories = SM_ROUTE_ALPHA_BUCKETS, sp[i].series = &bs[i], sp[i].n_series = 1;
        sp[i].value_labels = 1, panels[i].bar = &sp[i];
    }
    sp[0].title = "mean loss per alpha bucket", sp[0].ylabel = "loss (nats/token)";
    sp[1].title = "hot share per alpha bucket", sp[1].ylabel = "hot positions (fraction)";
    snprintf(name, sizeof name, "alpha_buckets_%s.png", r->label);
    snprintf(title, sizeof title, "%s: first Engram layer, final eval", r->label);
    tr_join(path, out_dir, name);
    if (smp_grid(panels, 2, 2, 640, 480, title, path, errbuf) != 0) tr_report_error("plot", path, errbuf);
}

/* Bars of one run's per-layer gate difference alpha_hot - alpha_cold. */
static void tr_plot_alpha_layers(const tr_report_run *r, const char *out_dir) {
    smp_csv lt;
    char path[TR_PATH], name[200], title[200], errbuf[SMP_ERR_SIZE];
    char layer_names[SM_NGRAM_MAX_LAYERS][24];
    const char *layer_labels[SM_NGRAM_MAX_LAYERS];
    float dalpha[SM_NGRAM_MAX_LAYERS];
    smp_bar_series bs;
    smp_bar_spec sp;
    int i, n_layers;
    tr_join(path, r->dir, "route_layers.csv");
    if (smp_csv_read(&lt, path, NULL) != 0) return;
    n_layers = lt.n_rows < SM_NGRAM_MAX_LAYERS ? lt.n_rows : SM_NGRAM_MAX_LAYERS;
    for (i = 0; i < n_layers; i++) {
        dalpha[i] = smp_csv_at(&lt, i, 1) - smp_csv_at(&lt, i, 2); /* columns: layer, alpha_hot, alpha_cold */
        snprintf(layer_names[i], sizeof layer_names[i], "Engram %d", i);
        layer_labels[i] = layer_names[i];
    }
    smp_csv_free(&lt);
    if (n_layers == 0) return;
    memset(&bs, 0, sizeof bs), memset(&sp, 0, sizeof sp);
    bs.name = "alpha hot - alpha cold", bs.values = dalpha;
    snprintf(title, sizeof title, "%s: gate on hot minus cold positions per layer", r->label);
    sp.title = title, sp.xlabel = "Engram layer", sp.ylabel = "alpha hot - alpha cold (gate, 0-1)";
    sp.categories = layer_labels, sp.n_categories = n_layers, sp.series = &bs, sp.n_series = 1;
    sp.value_labels = 1, sp.has_ref = 1, sp.ref_y = 0;
    snprintf(name, sizeof name, "alpha_layers_%s.png", r->label);
    tr_join(path, out_dir, name);
    if (smp_bar_chart(&sp, path, errbuf) != 0) tr_report_error("plot", path, errbuf);
}

/* The Engram-Nine charts: hot/cold loss and gates over training for the
 * configurations with route statistics, and each one's final buckets. */
static void tr_plot_route(const tr_report *rep) {
    tr_report rt = *rep; /* the same report, its groups cut to those with route statistics */
    tr_report_group groups[TR_MAX_RUNS];
    smp_line_spec sp;
    int j;
    rt.groups = groups, rt.n_groups = 0;
    for (j = 0; j < rep->n_groups; j++)
        if (tr_has_route(rep->groups[j].runs[0])) groups[rt.n_groups++] = rep->groups[j];
    if (rt.n_groups == 0) return;
    sp = tr_style("Hot - cold loss over training", "loss hot - loss cold (nats/token)", 0);
    sp.has_ref = 1, sp.ref_y = 0, sp.ref_label = "no difference";
    tr_plot_configs(&rt, "hot_cold_delta", TR_LOG_EVAL, 0, &sp, "hot_cold_delta.png");
    sp = tr_style("Engram gate on hot positions", "mean gate alpha (0-1)", 0);
    tr_plot_configs(&rt, "alpha_hot", TR_LOG_EVAL, 0, &sp, "alpha_hot.png");
    sp = tr_style("Engram gate on cold positions", "mean gate alpha (0-1)", 0);
    tr_plot_configs(&rt, "alpha_cold", TR_LOG_EVAL, 0, &sp, "alpha_cold.png");
    for (j = 0; j < rt.n_groups; j++) {
        tr_plot_alpha_buckets(groups[j].runs[0], rep->out);
        tr_plot_alpha_layers(groups[j].runs[0], rep->out);
    }
}

static void tr_report_plots(const tr_report *rep) {
    tr_plot_losses_over_seeds(rep);
    tr_plot_module_diagnostics(rep);
    tr_plot_peer_usage(rep);
    tr_plot_route(rep);
}

/* ---- the command ----------------------------------------------------- */

static void tr_report_free(tr_report *rep) {
    int i;
    for (i = 0; i < rep->n_runs; i++)
        smp_csv_free(&rep->runs[i].log), smp_csv_free(&rep->runs[i].steps), smp_csv_free(&rep->runs[i].diag);
    free(rep->runs);
    free(rep->groups);
}

/* report.md (tables) and PNG charts over the finished runs among dirs:
 * load, group the seeds of each configuration, tables, plots. */
static int tr_cmd_report(tr_opts *o, char **dirs, int n_dirs) {
    tr_report rep;
    int rc = 1;
    if (!o->out[0] || n_dirs == 0) {
        fprintf(stderr, "trainer report: usage: trainer report --out DIR RUN_DIR...\n");
        return 1;
    }
    if (n_dirs > TR_MAX_RUNS) {
        fprintf(stderr, "trainer report: %d run folders; a report takes at most %d\n", n_dirs, TR_MAX_RUNS);
        return 1;
    }
    memset(&rep, 0, sizeof rep);
    rep.out = o->out, rep.baseline = o->baseline;
    rep.runs = (tr_report_run *)calloc((size_t)n_dirs, sizeof *rep.runs);
    rep.groups = (tr_report_group *)calloc((size_t)n_dirs, sizeof *rep.groups);
    if (!rep.runs || !rep.groups) fprintf(stderr, "trainer report: out of memory\n");
    else if (tr_report_load(&rep, dirs, n_dirs) == 0)
        fprintf(stderr, "trainer report: none of the %d folders holds a finished run; nothing to report\n", n_dirs);
    else {
        tr_mkdir(o->out);
        tr_report_group_runs(&rep);
        rc = tr_report_write_tables(&rep);
    }
    if (rc == 0) tr_report_plots(&rep);
    if (rc == 0 && !o->quiet)
        printf("report: %s/report.md and plots for %d runs (%d configurations)\n", o->out, rep.n_runs, rep.n_groups);
    tr_report_free(&rep);
    return rc;
}

/* A line chart of columns of any CSV with a header row (the trainer's logs,
 * the benchmarks' tables, or a user's). */
static int tr_cmd_plot(const tr_opts *o) {
    smp_csv t;
    smp_series se[SMP_MAX_SERIES];
    smp_line_spec sp;
    char errbuf[SMP_ERR_SIZE];
    int k, rc;
    if (!o->data[0] || !o->out[0] || !o->y_cols[0]) {
        fprintf(stderr, "trainer plot: --data CSV, --y COLUMNS and --out PNG are required\n");
        return 1;
    }
    if (smp_csv_read(&t, o->data, errbuf) != 0) {
        fprintf(stderr, "trainer plot: %s\n", errbuf);
        return 1;
    }
    k = smp_csv_series(&t, o->x_col, o->y_cols, se, SMP_MAX_SERIES, errbuf);
    if (k <= 0) {
        fprintf(stderr, "trainer plot: %s: %s\n", o->data, k < 0 ? errbuf : "no --y column");
        smp_csv_free(&t);
        return 1;
    }
    memset(&sp, 0, sizeof sp);
    sp.title = o->title[0] ? o->title : o->data;
    sp.xlabel = o->xlabel[0] ? o->xlabel : o->x_col;
    sp.ylabel = o->ylabel[0] ? o->ylabel : k == 1 ? se[0].name : NULL;
    sp.series = se, sp.n_series = k, sp.log_x = o->log_x, sp.log_y = o->log_y;
    rc = smp_line_chart(&sp, o->out, errbuf) == 0 ? 0 : 1;
    if (rc) fprintf(stderr, "trainer plot: %s\n", errbuf);
    smp_csv_series_free(se, k);
    smp_csv_free(&t);
    return rc;
}

/* ===================================================================== */
/* main                                                                  */
/* ===================================================================== */

static int tr_run_command(tr_opts *o, const char *cmd, char **pos, int n_pos) {
#ifdef _OPENMP
    if (o->threads > 0) omp_set_num_threads(o->threads);
#endif
    if (strcmp(cmd, "tokenize") == 0) {
        if (!o->data[0] || !o->out[0]) {
            fprintf(stderr, "trainer tokenize: --data TEXT and --out DIR are required\n");
            return 1;
        }
        tr_tokenize(o->data, o->out, o->vocab, o->val_frac, o->tokenizer, 0);
        return 0;
    }
    if (strcmp(cmd, "train") == 0) return tr_train(o);
    if (strcmp(cmd, "eval") == 0) return tr_cmd_eval(o);
    if (strcmp(cmd, "sample") == 0) return tr_sample(o, stdout);
    if (strcmp(cmd, "export") == 0) return tr_cmd_export(o);
    if (strcmp(cmd, "report") == 0) return tr_cmd_report(o, pos, n_pos);
    return tr_cmd_plot(o);
}

/* The command line; tests run it in a child process (TRAINER_NO_MAIN). */
static int tr_main(int argc, char **argv) {
    tr_opts o;
    char **pos;
    int n_pos = 0, cmd, rc;
    const char *name = argc > 1 ? argv[1] : "";
    tr_defaults(&o);
    if (!name[0] || strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0 || strcmp(name, "help") == 0) {
        tr_usage(name[0] ? stdout : stderr, -1);
        return name[0] ? 0 : 1;
    }
    if ((cmd = tr_command_index(name)) < 0) {
        fprintf(stderr, "trainer: unknown command '%s' (see trainer --help)\n", name);
        return 1;
    }
    pos = (char **)malloc(sizeof(char *) * (size_t)argc);
    if (!pos) {
        fprintf(stderr, "trainer: out of memory\n");
        return 1;
    }
    rc = tr_parse(&o, argc - 2, argv + 2, pos, &n_pos);
    if (rc == TR_HELP) tr_usage(stdout, cmd);
    rc = rc == TR_HELP ? 0 : rc != 0 ? 1 : tr_run_command(&o, name, pos, n_pos);
    free(pos);
    return rc;
}

#ifndef TRAINER_NO_MAIN
#ifdef SM_USE_MPI
/* trainer_mpi: every process of mpirun (or one, started alone) is a rank. */
int main(int argc, char **argv) {
    sm_error err = {SM_OK, ""};
    int rc;
    MPI_Init(&argc, &argv);
    if (sm_comm_init_mpi(&tr_world, MPI_COMM_WORLD, &err) != SM_OK) tr_die("MPI", &err);
    rc = tr_main(argc, argv);
    sm_comm_free(&tr_world);
    MPI_Finalize();
    return rc;
}
#else
int main(int argc, char **argv) { return tr_main(argc, argv); }
#endif
#endif
