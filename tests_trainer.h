/* tests_trainer.h - what the trainer's tests in tests.c and tests_mpi.c
 * share: a generated corpus, a small model's options, removing a run
 * folder. Include after trainer.c and tests_harness.h. */
#ifndef SM_TESTS_TRAINER_H
#define SM_TESTS_TRAINER_H

/* A small corpus of generated sentences, documents split by form feeds. */
static void t_write_corpus(const char *path, uint64_t seed) {
    static const char *const words[] = {"the", "state", "of", "union", "is", "strong", "and", "our",
                                        "people", "work", "for", "peace", "nation", "will", "grow",
                                        "we", "must", "build", "a", "better", "future", "together"};
    FILE *f = fopen(path, "w");
    sm_rng r;
    int d, w;
    sm_rng_seed(&r, seed);
    for (d = 0; f && d < 12; d++) {
        for (w = 0; w < 400; w++) {
            fputs(words[sm_rng_below(&r, sizeof words / sizeof words[0])], f);
            fputs(w % 13 == 12 ? ".\n" : " ", f);
        }
        fputc('\f', f);
    }
    if (f) fclose(f);
}

/* A two-layer model with every module, trained 12 steps on the corpus. */
static void t_trainer_opts(tr_opts *o, const char *out) {
    tr_defaults(o);
    snprintf(o->data, sizeof o->data, "test_tmp_corpus.txt");
    snprintf(o->out, sizeof o->out, "%s", out);
    o->quiet = 1, o->vocab = 300, o->val_frac = 0.2f;
    o->n_layer = 2, o->d_model = 16, o->n_head = 2, o->seq_len = 16, o->batch = 2;
    o->steps = 12, o->warmup = 2, o->eval_every = 4, o->eval_batches = 2;
    snprintf(o->engram_layers, sizeof o->engram_layers, "0");
    o->engram_rows = 31, o->engram_heads = 2, o->engram_d_head = 4;
    snprintf(o->peer_layers, sizeof o->peer_layers, "1");
    o->peer_experts_sqrt = 4, o->peer_heads = 1, o->peer_topk = 2, o->peer_d_key = 4;
    o->mhc_streams = 2;
    snprintf(o->strategy, sizeof o->strategy, "auto");
    o->coord_every = 3;
    o->diag_every = 2; /* diag.csv rows at steps 2, 4, ..., 12 */
}

/* Remove a test's output folder (left by an earlier, interrupted run). */
static void t_remove_tree(const char *dir) {
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "tests: could not remove %s\n", dir);
}
#endif
