/* formats.c - every file format the library and the trainer read, each with
 * its loader run the way the trainer runs it, and a valid seed file of each
 * written with the library's writers. See fuzz.h. */
#define _GNU_SOURCE /* memfd_create */
#define TRAINER_NO_MAIN
#include "../trainer.c" /* the library, plus the trainer's checkpoint reader */
#include "fuzz.h"

#include <sys/mman.h>

/* A loaded object that breaks its contract: a finding, like a crash. */
#define FUZZ_ASSERT(cond)                                                                  \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "fuzz: %s:%d: %s does not hold\n", __FILE__, __LINE__, #cond); \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

/* ---- the loaders, and what a caller does with what they load ---- */

static const unsigned char fuzz_text[] = "The quick brown fox jumps over the lazy dog; na\xc3\xafve caf\xc3\xa9.\n";

/* Encode and decode must round-trip; the trainer also builds the
 * tokenizer compression right after loading. */
static void load_tokenizer(const char *path) {
    uint32_t ids[sizeof fuzz_text];
    unsigned char back[sizeof fuzz_text];
    size_t n = 0, len = sizeof fuzz_text - 1;
    sm_bpe b;
    sm_canon c;
    if (sm_bpe_load(&b, path, NULL) != SM_OK) return;
    if (sm_canon_build(&c, &b, NULL) == SM_OK) sm_canon_free(&c);
    FUZZ_ASSERT(sm_bpe_encode(&b, fuzz_text, len, ids, &n, NULL) == SM_OK);
    FUZZ_ASSERT(sm_bpe_decode(&b, ids, n, back, sizeof back) == len && memcmp(back, fuzz_text, len) == 0);
    sm_bpe_free(&b);
}

/* A few batches over the tokens in both loader modes (training: random
 * windows; evaluation: sequential), as the trainer reads them. */
static void use_tokens(sm_tokens *t) {
    static const sm_loader_mode modes[2] = {SM_LOADER_RANDOM, SM_LOADER_SEQUENTIAL};
    sm_loader l;
    sm_loader_config c = sm_loader_default_config();
    int32_t in[2 * 8], tg[2 * 8];
    unsigned char doc[2 * 8];
    int m, i;
    c.batch_size = 2, c.seq_len = 8;
    for (m = 0; m < 2; m++) {
        c.mode = modes[m];
        if (sm_loader_init(&l, t, &c, NULL) == SM_OK)
            for (i = 0; i < 3; i++) sm_loader_next(&l, in, tg, doc);
    }
    sm_tokens_free(t);
}

static void load_tokens(const char *path) {
    sm_tokens t;
    if (sm_tokens_load(&t, path, 0, NULL) == SM_OK) use_tokens(&t);
}

static void load_llmc(const char *path) {
    sm_tokens t;
    if (sm_tokens_load_llmc(&t, path, 50257, 50256, NULL) == SM_OK) use_tokens(&t); /* GPT-2's */
}

/* An llm.c model file: what its header admits is built, loaded (the
 * modules closed) and run on one token. */
static void load_llmc_model(const char *path) {
    sm_model_config cfg = sm_model_default_config();
    sm_model m;
    int token = 0, target = 0;
    if (sm_llmc_read_config(&cfg, path, NULL) != SM_OK || sm_model_init(&m, &cfg, 1, 1, NULL) != SM_OK) return;
    if (sm_model_load_llmc(&m, path, NULL) == SM_OK) sm_model_forward(&m, &token, &target, NULL, 1, 1, NULL);
    sm_model_free(&m);
}

/* GPT-2's tokenizer is two files: the fuzzed one and a valid companion,
 * written to a second scratch file. What loads must encode and decode
 * losslessly (KEEP mode). */
static const char *fuzz_file(int k);
static const char fuzz_gpt2_merges[] = "#version: 0.2\nt h\nth e\n";

/* encoder.json of the 256 byte tokens (\u escapes, GPT-2's byte-to-unicode
 * map), "th", "the" and eot. */
static const char *fuzz_gpt2_encoder(void) {
    static char json[8192];
    size_t o = 0;
    unsigned b, next = 0x100;
    if (json[0]) return json;
    o += (size_t)snprintf(json, sizeof json, "{");
    for (b = 0; b < 256; b++)
        o += (size_t)snprintf(json + o, sizeof json - o, "\"\\u%04X\": %u, ",
                              sm__gpt2_printable(b) ? b : next++, b);
    snprintf(json + o, sizeof json - o, "\"th\": 256, \"the\": 257, \"<|endoftext|>\": 258}");
    return json;
}

static void use_gpt2(const char *encoder_json, const char *vocab_bpe) {
    uint32_t ids[sizeof fuzz_text];
    unsigned char back[sizeof fuzz_text];
    size_t n = 0, len = sizeof fuzz_text - 1;
    sm_gpt2 g;
    if (sm_gpt2_load(&g, encoder_json, vocab_bpe, NULL) != SM_OK) return;
    FUZZ_ASSERT(sm_gpt2_encode(&g, fuzz_text, len, SM_GPT2_INVALID_KEEP, ids, &n, NULL) == SM_OK);
    FUZZ_ASSERT(sm_gpt2_decode(&g, ids, n, back, sizeof back) == len && memcmp(back, fuzz_text, len) == 0);
    sm_gpt2_free(&g);
}

static void load_gpt2_encoder(const char *path) {
    FILE *f = fopen(fuzz_file(1), "wb");
    if (!f || fputs(fuzz_gpt2_merges, f) < 0 || fclose(f) != 0) abort();
    use_gpt2(path, fuzz_file(1));
}

static void load_gpt2_merges(const char *path) {
    FILE *f = fopen(fuzz_file(1), "wb");
    if (!f || fputs(fuzz_gpt2_encoder(), f) < 0 || fclose(f) != 0) abort();
    use_gpt2(fuzz_file(1), path);
}

/* Any key maps to a slot in [0, n) (slot 0 of an empty set). */
static void check_mphf_lookups(const sm_mphf *f) {
    uint64_t key;
    for (key = 0; key < 64; key++) FUZZ_ASSERT(sm_mphf_lookup(f, sm_mix64(key)) < (f->n > 0 ? f->n : 1));
}

static void load_mphf(const char *path) {
    sm_mphf f;
    if (sm_mphf_load(&f, path, NULL) != SM_OK) return;
    check_mphf_lookups(&f);
    sm_mphf_free(&f);
}

static void load_hot_tier(const char *path) {
    sm_nine nine;
    int i;
    if (sm_nine_load(&nine, path, NULL) != SM_OK) return;
    for (i = 0; i < nine.n_orders; i++)
        if (nine.cfg.n_hot[i]) {
            check_mphf_lookups(&nine.mphf[i]);
            (void)sm_fingerprints_contains(&nine.fp[i], &nine.mphf[i], 12345);
        }
    sm_nine_free(&nine);
}

/* As `trainer sample` does: the header, a model (batch 1) built from its
 * config, the state read into it, then a forward pass. */
static void load_checkpoint(const char *path) {
    static tr_run r; /* large: sm_model holds every sublayer */
    tr_opts saved;
    sm_reader rd;
    memset(&r, 0, sizeof r);
    if (tr_read_checkpoint_header(&rd, path, &r.cfg, &saved, NULL) == SM_OK &&
        sm_model_init(&r.model, &r.cfg, 1, 1, NULL) == SM_OK) {
        if (tr_read_checkpoint_state(&rd, &r, NULL) == SM_OK) {
            int in[8], i, T = r.cfg.seq_len < 8 ? r.cfg.seq_len : 8;
            for (i = 0; i < T; i++) in[i] = i % r.cfg.vocab_size;
            (void)sm_model_forward(&r.model, in, NULL, NULL, 1, T, NULL);
        }
        sm_model_free(&r.model);
    }
    sm_reader_close(&rd);
}

/* What the reader promises: tensors in buffer order, each span its
 * shape's bytes, covering the buffer; every tensor converts to floats.
 * Then, as `trainer eval --ckpt X.safetensors` does: the config from the
 * metadata, a model (batch 1) built from it, the tensors loaded into it, a
 * forward pass. The model is built only when the file holds as many
 * values as it has parameters (else the load must fail anyway) and for
 * seq_len <= 64 (a crafted seq_len would otherwise ask for gigabytes of
 * attention scores: the harness's limit, not the reader's). */
static void load_safetensors(const char *path) {
    static tr_run r; /* large: sm_model holds every sublayer */
    sm_safetensors st;
    uint64_t at = 0, values = 0;
    size_t n_params = 0;
    int i;
    if (sm_safetensors_load(&st, path, NULL) != SM_OK) {
        sm_safetensors_free(&st);
        return;
    }
    for (i = 0; i < st.n_tensors; i++) {
        const sm_st_tensor *t = &st.tensors[i];
        float *v = (float *)malloc((size_t)t->numel * sizeof(float) + 1);
        FUZZ_ASSERT(t->begin == at && t->end - t->begin == t->numel * (t->dtype == SM_ST_F32 ? 4 : 2));
        FUZZ_ASSERT(v != NULL);
        sm_safetensors_to_f32(&st, t, v);
        free(v);
        at = t->end, values += t->numel;
    }
    FUZZ_ASSERT(at == st.buffer_size);
    memset(&r, 0, sizeof r);
    if (sm_model_config_from_safetensors(&st, &r.cfg, NULL) == SM_OK && r.cfg.seq_len <= 64 &&
        sm_model_param_count(&r.cfg, &n_params, NULL) == SM_OK && n_params == values &&
        sm_model_init(&r.model, &r.cfg, 1, 1, NULL) == SM_OK) {
        if (sm_model_load_safetensors(&r.model, &st, NULL) == SM_OK && !r.cfg.use_nine) {
            int in[8], T = r.cfg.seq_len < 8 ? r.cfg.seq_len : 8;
            for (i = 0; i < T; i++) in[i] = i % r.cfg.vocab_size;
            (void)sm_model_forward(&r.model, in, NULL, NULL, 1, T, NULL);
        }
        sm_model_free(&r.model);
    }
    sm_safetensors_free(&st);
}

typedef struct {
    const char *name;
    int checksummed; /* the file ends in the library's checksum */
    void (*load)(const char *path);
} fuzz_fmt;

static const fuzz_fmt fuzz_fmts[] = {
    {"tokenizer", 1, load_tokenizer}, {"tokens", 1, load_tokens},     {"llmc", 0, load_llmc},
    {"mphf", 1, load_mphf},           {"hot_tier", 1, load_hot_tier}, {"checkpoint", 1, load_checkpoint},
    {"gpt2_encoder", 0, load_gpt2_encoder}, {"gpt2_merges", 0, load_gpt2_merges},
    {"llmc_model", 0, load_llmc_model},
    {"safetensors", 0, load_safetensors},
};
#define FUZZ_N_FMTS (int)(sizeof fuzz_fmts / sizeof fuzz_fmts[0])

int fuzz_format(const char *name) {
    int i;
    for (i = 0; i < FUZZ_N_FMTS; i++)
        if (strcmp(fuzz_fmts[i].name, name) == 0) return i;
    return -1;
}

/* ---- inputs to files ---- */

/* This process's scratch files (k = 0: the input; 1: a companion file):
 * the loaders take paths, and /proc/self/fd/N of a memfd is one (a file on
 * disk made runs ~100x slower). */
static const char *fuzz_file(int k) {
    static char path[2][64];
    if (!path[k][0]) {
        int fd = memfd_create("sm_fuzz", 0);
        if (fd < 0) {
            perror("fuzz: memfd_create");
            exit(1);
        }
        snprintf(path[k], sizeof path[k], "/proc/self/fd/%d", fd);
    }
    return path[k];
}

/* data[0..size) to path; with fix_checksum its last 8 bytes become the
 * library's checksum of the rest. */
static int fuzz_write_file(const char *path, const uint8_t *data, size_t size, int fix_checksum) {
    FILE *f = fopen(path, "wb");
    int ok;
    if (!f) return 0;
    if (fix_checksum && size >= 8) {
        uint64_t sum = sm_checksum64(data, size - 8);
        ok = fwrite(data, 1, size - 8, f) == size - 8 && fwrite(&sum, 8, 1, f) == 1;
    } else {
        ok = fwrite(data, 1, size, f) == size;
    }
    return fclose(f) == 0 && ok;
}

void fuzz_load(int format, const uint8_t *data, size_t size) {
    const fuzz_fmt *fmt = &fuzz_fmts[format];
    int fix_checksum = 0;
    if (fmt->checksummed) {
        if (size == 0) return;
        fix_checksum = data[0] % 8 != 0;
        data++, size--;
    }
    if (!fuzz_write_file(fuzz_file(0), data, size, fix_checksum)) {
        fprintf(stderr, "fuzz: cannot write %s\n", fuzz_file(0));
        exit(1);
    }
    fmt->load(fuzz_file(0));
}

/* ---- seeds ---- */

/* dir/FORMAT/NAME from the file at src, behind the selector byte 1 (checksum
 * recomputed: the seed is valid either way) where the format has one. */
static int put_seed(const char *dir, const char *format, const char *name, const char *src) {
    char path[TR_PATH];
    unsigned char *bytes, *input;
    size_t n;
    int ok, checksummed = fuzz_fmts[fuzz_format(format)].checksummed;
    if (sm_read_file(src, &bytes, &n, NULL) != SM_OK) return 0;
    input = (unsigned char *)malloc(n + 1);
    if (!input) return 0;
    input[0] = 1;
    memcpy(input + checksummed, bytes, n);
    snprintf(path, sizeof path, "%s/%s", dir, format);
    tr_mkdir(path);
    snprintf(path, sizeof path, "%s/%s/%s", dir, format, name);
    ok = fuzz_write_file(path, input, n + (size_t)checksummed, 0);
    free(input), sm_free(bytes);
    remove(src);
    return ok;
}

/* A small model with every module (Engram with a hot tier, PEER, mHC). */
static int seed_model(tr_run *r) {
    tr_opts o;
    char msg[256];
    uint32_t stream[600];
    int i;
    tr_defaults(&o);
    o.quiet = 1, o.n_layer = 2, o.d_model = 8, o.n_head = 2, o.seq_len = 8;
    snprintf(o.engram_layers, sizeof o.engram_layers, "0");
    o.engram_rows = 61, o.engram_heads = 2, o.engram_d_head = 4, o.nine = 8;
    snprintf(o.peer_layers, sizeof o.peer_layers, "1");
    o.peer_experts_sqrt = 4, o.peer_heads = 1, o.peer_topk = 2, o.peer_d_key = 4;
    o.mhc_streams = 2;
    if (tr_model_config(&o, 300, &r->cfg, msg, sizeof msg) != 0 ||
        sm_model_init(&r->model, &r->cfg, 1, 1, NULL) != SM_OK)
        return 0;
    for (i = 0; i < 600; i++) stream[i] = (uint32_t)(i * i % 37 + i % 5); /* repeating n-grams */
    return sm_model_build_hot_set(&r->model, stream, NULL, 600, NULL) == SM_OK;
}

static int seed_checkpoints(const char *dir, const char *tmp) {
    static tr_run r;
    tr_opts o;
    int ok;
    memset(&r, 0, sizeof r);
    tr_defaults(&o);
    if (!seed_model(&r)) return 0;
    ok = sm_nine_save(&r.model.nine, tmp, NULL) == SM_OK && put_seed(dir, "hot_tier", "seed", tmp);
    ok = ok && tr_save_checkpoint(&r, &o, tmp, NULL) == SM_OK && put_seed(dir, "checkpoint", "seed", tmp);
    ok = ok && sm_model_save_safetensors(&r.model, tmp, NULL) == SM_OK && put_seed(dir, "safetensors", "seed", tmp);
    /* Regression: seq_len 8 -> 65535 in the config (checksum recomputed)
     * made sm_model_init ask for 69 GB of activations (attention scores
     * grow as seq_len^2) before the file's parameter count was checked. */
    r.cfg.seq_len = 65535;
    ok = ok && tr_save_checkpoint(&r, &o, tmp, NULL) == SM_OK &&
         put_seed(dir, "checkpoint", "regression_seq_len_65535", tmp);
    sm_model_free(&r.model);
    return ok;
}

static int seed_tokenizer(const char *dir, const char *tmp) {
    unsigned char text[4000];
    sm_bpe_config c = sm_bpe_default_config();
    sm_bpe b;
    size_t i;
    int ok;
    for (i = 0; i < sizeof text; i++) text[i] = fuzz_text[i % (sizeof fuzz_text - 1)];
    c.vocab_size = 300;
    if (sm_bpe_train(&b, &c, text, sizeof text, NULL) != SM_OK) return 0;
    ok = sm_bpe_save(&b, tmp, NULL) == SM_OK && put_seed(dir, "tokenizer", "seed", tmp);
    sm_bpe_free(&b);
    return ok;
}

/* Regression: n_tokens = n_docs = (2^64 + 4) / 10, so 2 n_tokens + 8 n_docs
 * wraps onto the 4 payload bytes; the size check once passed it and the
 * loader asked for 7.4e18 bytes. */
static int seed_tokens_wrapped_sizes(const char *dir, const char *tmp) {
    const uint64_t n = 1844674407370955162ULL;
    sm_writer w;
    if (sm_writer_open(&w, tmp, SM_TOKENS_MAGIC, SM_TOKENS_VERSION, NULL) != SM_OK) return 0;
    sm_writer_u32(&w, 300), sm_writer_u32(&w, 2), sm_writer_u64(&w, n), sm_writer_u64(&w, n);
    sm_writer_u32(&w, 0);
    return sm_writer_commit(&w, NULL) == SM_OK && put_seed(dir, "tokens", "regression_wrapped_sizes", tmp);
}

/* Two-byte tokens (vocab 300) and four-byte tokens (vocab 70000). */
static int seed_tokens(const char *dir, const char *tmp) {
    uint32_t tok[64];
    uint64_t starts[3] = {0, 20, 41};
    sm_tokens t;
    int i;
    for (i = 0; i < 64; i++) tok[i] = (uint32_t)(i * 7 % 300);
    t.tokens = tok, t.n_tokens = 64, t.doc_starts = starts, t.n_docs = 3, t.vocab_size = 300;
    if (sm_tokens_save(&t, tmp, NULL) != SM_OK || !put_seed(dir, "tokens", "seed_u16", tmp)) return 0;
    tok[5] = 69999, t.vocab_size = 70000;
    return sm_tokens_save(&t, tmp, NULL) == SM_OK && put_seed(dir, "tokens", "seed_u32", tmp) &&
           seed_tokens_wrapped_sizes(dir, tmp);
}

static int seed_llmc(const char *dir, const char *tmp) {
    uint32_t tok[64];
    uint64_t start = 0;
    sm_tokens t;
    int i;
    for (i = 0; i < 64; i++) tok[i] = (uint32_t)(i % 16 == 0 ? 50256 : 1000 + i * 7);
    t.tokens = tok, t.n_tokens = 64, t.doc_starts = &start, t.n_docs = 1, t.vocab_size = 50257;
    return sm_tokens_save_llmc(&t, tmp, NULL) == SM_OK && put_seed(dir, "llmc", "seed", tmp);
}

/* A tiny random GPT-2 (V 11 padded to 16, C 8, 2 layers, maxT 6). */
static int seed_llmc_model(const char *dir, const char *tmp) {
    sm_model_config c = sm_model_default_config();
    sm_model m;
    int ok;
    c.arch = SM_ARCH_GPT2, c.vocab_size = 11, c.padded_vocab_size = 16, c.seq_len = 6;
    c.n_layer = 2, c.n_head = 2, c.d_model = 8, c.d_ff = 32;
    if (sm_model_init(&m, &c, 1, 1, NULL) != SM_OK) return 0;
    ok = sm_model_save_llmc(&m, tmp, NULL) == SM_OK && put_seed(dir, "llmc_model", "seed", tmp);
    sm_model_free(&m);
    return ok;
}

static int seed_text(const char *dir, const char *format, const char *name, const char *tmp,
                     const char *text) {
    FILE *f = fopen(tmp, "wb");
    int ok = f && fputs(text, f) >= 0;
    return f && fclose(f) == 0 && ok && put_seed(dir, format, name, tmp);
}

/* Regression: an empty token ({"": 0}) reached a copy from a NULL buffer. */
static int seed_gpt2(const char *dir, const char *tmp) {
    return seed_text(dir, "gpt2_encoder", "seed", tmp, fuzz_gpt2_encoder()) &&
           seed_text(dir, "gpt2_encoder", "regression_empty_token", tmp, "{\"\":0}") &&
           seed_text(dir, "gpt2_merges", "seed", tmp, fuzz_gpt2_merges);
}

static int seed_mphf(const char *dir, const char *tmp) {
    uint64_t keys[200];
    sm_mphf_config c = sm_mphf_default_config();
    sm_mphf f;
    int i, ok;
    for (i = 0; i < 200; i++) keys[i] = sm_mix64((uint64_t)i + 1);
    if (sm_mphf_build(&f, keys, 200, &c, NULL) != SM_OK) return 0;
    ok = sm_mphf_save(&f, tmp, NULL) == SM_OK && put_seed(dir, "mphf", "seed", tmp);
    sm_mphf_free(&f);
    return ok;
}

int fuzz_write_seeds(const char *dir) {
    char tmp[TR_PATH];
    tr_mkdir(dir);
    tr_join(tmp, dir, ".seed.tmp"); /* the library's writers rename a temp file onto it */
    return seed_tokenizer(dir, tmp) && seed_tokens(dir, tmp) && seed_llmc(dir, tmp) && seed_mphf(dir, tmp) &&
                   seed_checkpoints(dir, tmp) && seed_gpt2(dir, tmp) && seed_llmc_model(dir, tmp)
               ? 0
               : 1;
}
