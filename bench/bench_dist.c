/* bench_dist.c - what distributed training costs per step, replicated
 * tables against sharded ones (>>comm), at the trainer's tiny and small
 * presets with Engram (layer 1) and PEER (layer 2):
 *
 *   make bench/bench_dist && mpirun -np 1 ./bench/bench_dist && mpirun -np 2 ./bench/bench_dist
 *   (make bench-dist runs both)
 *
 * The global batch is the preset's (B sequences of T tokens, Zipf token
 * ids), split over the ranks. A step is zero_grad, forward, backward,
 * sm_model_allreduce_grads, AdamW; the time is the median of the timed
 * steps after one warm-up step. Mode "overlapped" is "replicated" with
 * the dense gradients summed in buckets of 1 MB while the backward runs
 * (sm_model_backward_allreduce). Bytes are rank 0's payloads per step:
 *   dense      the dense gradients all-reduced (every rank, any mode)
 *   rows_ar    replicated tables: the touched rows' gradients all-reduced
 *              (union over ranks)
 *   fetch      sharded: ids sent to other ranks and rows received from them
 *   push       sharded: row gradients sent to other ranks
 *   tables/rk  this rank's table memory: weights, gradients, 2 moments
 * (payloads: an all-reduce of n bytes moves ~2n(N-1)/N per rank in a
 * ring; an all-to-all moves its payload once). With one rank sharding is
 * off (the tables are whole): both rows are the same code path. */
#define TRAINER_NO_MAIN
#include "../trainer.c"
#include "bench_common.h"

#define BENCH_MAX_STEPS 8

typedef struct {
    double step_s, dense, rows_ar, fetch, push, table_bytes;
} bench_row;

/* The preset's model config with Engram at layer 1 and PEER at layer 2. */
static sm_model_config bench_config(const char *preset, int *B, int *T) {
    tr_opts o;
    sm_model_config c;
    char msg[256];
    tr_defaults(&o);
    if (tr_apply_preset(&o, preset) != 0) exit(2);
    snprintf(o.engram_layers, sizeof o.engram_layers, "1");
    snprintf(o.peer_layers, sizeof o.peer_layers, "2");
    if (tr_model_config(&o, o.vocab, &c, msg, sizeof msg) != 0) {
        fprintf(stderr, "bench_dist: %s\n", msg);
        exit(2);
    }
    *B = o.batch, *T = o.seq_len;
    return c;
}

/* Bytes of the dense gradients and of the tables' touched rows (after the
 * all-reduce: the union over the ranks); none with one rank (nothing is
 * all-reduced). */
static void bench_allreduce_bytes(const sm_model *m, int ranks, bench_row *r) {
    int i;
    r->dense = r->rows_ar = 0;
    for (i = 0; ranks > 1 && i < m->params.n_tensors; i++) {
        const sm_param_tensor *t = &m->params.tensors[i];
        if (!t->rows) r->dense += 4.0 * (double)t->size;
        else if (!sm_model_is_sharded(m)) r->rows_ar += 4.0 * (double)t->rows->count * (double)t->row_size;
    }
}

static void bench_die(const char *what, const sm_error *err) {
    fprintf(stderr, "bench_dist: %s: %s\n", what, err->msg);
    exit(1);
}

#define BENCH_BUCKET_FLOATS ((size_t)1 << 18) /* the overlapped mode's buckets: 1 MB */

/* One step of this rank's slice (the gradients summed during the backward
 * with `overlap`); fills the byte counts. */
static void bench_step(sm_model *m, const sm_comm *c, const int *in, const int *tg, int rows, int T,
                       int overlap, bench_row *r) {
    sm_error err = {SM_OK, ""};
    size_t fetch, push;
    sm_params_zero_grad(&m->params);
    if (sm_model_forward(m, in, tg, NULL, rows, T, &err) != SM_OK) bench_die("forward", &err);
    if (overlap) {
        if (sm_model_backward_allreduce(m, c, 1.0f / (float)c->size, BENCH_BUCKET_FLOATS, &err) != SM_OK)
            bench_die("gradients", &err);
    } else {
        sm_model_backward(m);
        if (sm_model_allreduce_grads(m, c, 1.0f / (float)c->size, &err) != SM_OK) bench_die("gradients", &err);
    }
    bench_allreduce_bytes(m, c->size, r);
    sm_model_exchange_bytes(m, &fetch, &push);
    r->fetch = (double)fetch, r->push = (double)push;
    sm_params_adamw_step(&m->params, 1.0f, 1.0f);
}

static bench_row bench_mode(const sm_model_config *cfg, const sm_comm *c, int shard, int overlap, int B, int T,
                            int steps) {
    sm_error err = {SM_OK, ""};
    sm_model m;
    sm_rng rng;
    int rows = B / c->size, s, *in, *tg;
    double times[BENCH_MAX_STEPS];
    bench_row r;
    memset(&r, 0, sizeof r);
    in = (int *)malloc(sizeof(int) * (size_t)B * T), tg = (int *)malloc(sizeof(int) * (size_t)B * T);
    sm_rng_seed(&rng, 7);
    zipf_tokens(in, (size_t)B * T, cfg->vocab_size, &rng);
    zipf_tokens(tg, (size_t)B * T, cfg->vocab_size, &rng);
    if (sm_model_init_sharded(&m, cfg, rows, 1, shard ? c : NULL, &err) != SM_OK) bench_die("model", &err);
    r.table_bytes = (double)sm_model_table_bytes(&m);
    for (s = 0; s <= steps; s++) { /* step 0 warms up */
        double t0;
        sm_comm_barrier(c, &err);
        t0 = sm_now();
        bench_step(&m, c, in + (size_t)c->rank * rows * T, tg + (size_t)c->rank * rows * T, rows, T, overlap,
                   &r);
        sm_comm_barrier(c, &err);
        if (s > 0) times[s - 1] = sm_now() - t0;
    }
    r.step_s = median_of(times, steps);
    sm_model_free(&m);
    free(in), free(tg);
    return r;
}

static void bench_print(const char *preset, const char *mode, int ranks, const bench_row *r) {
    const double MB = 1e6;
    printf("%-6s %-10s %5d %9.1f %9.3f %9.3f %9.3f %9.3f %10.2f\n", preset, mode, ranks, 1e3 * r->step_s,
           r->dense / MB, r->rows_ar / MB, r->fetch / MB, r->push / MB, r->table_bytes / MB);
}

int main(int argc, char **argv) {
    const char *presets[2] = {"tiny", "small"};
    const int steps[2] = {5, 3};
    sm_comm c;
    sm_error err = {SM_OK, ""};
    char cpu[256];
    int p;
    MPI_Init(&argc, &argv);
    if (sm_comm_init_mpi(&c, MPI_COMM_WORLD, &err) != SM_OK) bench_die("MPI", &err);
    cpu_model(cpu, sizeof cpu);
    if (c.rank == 0)
        printf("bench_dist: %d rank(s), %d thread(s) each, %s\n"
               "preset mode       ranks   step_ms  dense_MB rowsAR_MB  fetch_MB   push_MB tables/rk_MB\n",
               c.size, sm_num_threads(), cpu);
    for (p = 0; p < 2; p++) {
        int B, T;
        sm_model_config cfg = bench_config(presets[p], &B, &T);
        bench_row rep = bench_mode(&cfg, &c, 0, 0, B, T, steps[p]);
        bench_row ov = bench_mode(&cfg, &c, 0, 1, B, T, steps[p]);
        bench_row sh = bench_mode(&cfg, &c, 1, 0, B, T, steps[p]);
        if (c.rank != 0) continue;
        bench_print(presets[p], "replicated", c.size, &rep);
        bench_print(presets[p], "overlapped", c.size, &ov);
        bench_print(presets[p], "sharded", c.size, &sh);
        fflush(stdout);
    }
    sm_comm_free(&c);
    MPI_Finalize();
    return 0;
}
