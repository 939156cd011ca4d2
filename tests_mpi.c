/* tests_mpi.c (>>comm) - the communicator and the row exchange of sharded tables
 * across processes (the tests of tests_comm.h, which tests.c runs in one
 * process), and the trainer's data parallelism: a run on every rank against
 * the same run in one process, and checkpoints resumed across process
 * counts.
 *
 *   mpicc -DSM_USE_MPI -o tests_mpi tests_mpi.c -lm && mpirun -np 2 ./tests_mpi
 *
 * (`make test-mpi` runs it with 2 and 3 ranks.) Rank 0 prints the results;
 * a rank that fails prints its message on stderr, and the test counts as
 * failed on every rank. Exits non-zero on any failure. */
#define TRAINER_NO_MAIN
#include "trainer.c" /* the library and the trainer */
#include "tests_harness.h"
#include "tests_comm.h"
#include "tests_trainer.h"

/* Failed on some rank = failed; the failing rank says why on stderr. */
static int t_mpi_agree(int bad) {
    int any = 0;
    if (bad) fprintf(stderr, "rank %d: %s\n", t_comm.rank, t_fail_msg);
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (any && !bad) snprintf(t_fail_msg, sizeof t_fail_msg, "failed on another rank (see stderr)");
    return any;
}

/* ---- data parallelism in the trainer ---- */

/* Summing the ranks' gradients rounds differently from one process summing
 * the whole batch (and the loss is a sum of the ranks' sums): relative
 * differences of ~1e-7 per step, ~1e-6 after 12 steps of this model. */
#define T_DP_TOL 1e-4
/* The diagnostics' norms carry those differences relative to their own
 * size: the Engram table's gradient norm (a few rows' sums) differs by
 * ~1e-4 with 3 ranks, the others by < 1e-5. */
#define T_DIAG_TOL 1e-3

static sm_comm t_one; /* rank 0 alone, for the one-process reference */

/* The trainer's runs: on every rank (all = 1), or on rank 0 alone. */
static int t_train(tr_opts *o, int all) {
    int rc = 0;
    if (all) return tr_train(o);
    if (t_comm.rank == 0) {
        tr_comm = &t_one;
        rc = tr_train(o);
        tr_comm = &tr_world;
    }
    MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
    return rc;
}

/* The largest relative difference between two runs' values in their log
 * `name` (rank 0), every column after the step; -1 when the files differ
 * in rows or cannot be read. */
static double t_log_gap(const char *dir_a, const char *dir_b, const char *name) {
    char pa[TR_PATH], pb[TR_PATH], la[1024], lb[1024];
    FILE *fa, *fb;
    double gap = 0;
    tr_join(pa, dir_a, name), tr_join(pb, dir_b, name);
    fa = fopen(pa, "r"), fb = fopen(pb, "r");
    if (!fa || !fb || !fgets(la, sizeof la, fa) || !fgets(lb, sizeof lb, fb)) gap = -1; /* the header */
    while (gap >= 0) {
        char *ra = fgets(la, sizeof la, fa), *rb = fgets(lb, sizeof lb, fb), *ea, *eb;
        if (!ra || !rb) {
            if (ra || rb) gap = -1;
            break;
        }
        if (strtol(ra, &ea, 10) != strtol(rb, &eb, 10)) gap = -1; /* the steps */
        while (gap >= 0 && *ea == ',' && *eb == ',') {
            double a = strtod(ea + 1, &ea), b = strtod(eb + 1, &eb);
            double rel = isnan(a) && isnan(b) ? 0 : fabs(a - b) / fmax(fabs(b), 1e-30);
            if (!(rel <= gap)) gap = isnan(rel) ? -1 : rel; /* NaN against a number: -1 */
        }
        if (*ea != *eb) gap = -1; /* a row with more columns, or text */
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return gap;
}

static void t_dp_opts(tr_opts *o, const char *out) {
    t_trainer_opts(o, out);
    snprintf(o->data, sizeof o->data, "test_tmp_mpi_corpus.txt");
    o->batch = 2 * t_comm.size; /* the global batch: two sequences per rank */
    o->threads = 1;
}

/* The same options on every rank and in one process: the same losses. */
static int test_dp_training_matches_one_process(void) {
    tr_opts o;
    double gap;
    int rc_all, rc_one;
    if (t_comm.rank == 0) {
        t_remove_tree("test_tmp_mpi_dp"), t_remove_tree("test_tmp_mpi_one");
        t_write_corpus("test_tmp_mpi_corpus.txt", 5);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    t_dp_opts(&o, "test_tmp_mpi_dp");
    rc_all = t_train(&o, 1);
    t_dp_opts(&o, "test_tmp_mpi_one");
    rc_one = t_train(&o, 0);
    CHECK(rc_all == 0 && rc_one == 0, "training failed (%d, %d)", rc_all, rc_one);
    if (t_comm.rank != 0) return 0;
    gap = t_log_gap("test_tmp_mpi_dp", "test_tmp_mpi_one", "steps.csv");
    CHECK(gap >= 0 && gap <= T_DP_TOL, "%d processes vs one: losses differ by %g (tolerance %g)", t_comm.size,
          gap, T_DP_TOL);
    gap = t_log_gap("test_tmp_mpi_dp", "test_tmp_mpi_one", "diag.csv"); /* combined across the ranks */
    CHECK(gap >= 0 && gap <= T_DIAG_TOL, "%d processes vs one: diag.csv differs by %g (tolerance %g)", t_comm.size,
          gap, T_DIAG_TOL);
    CHECK(tr_exists("test_tmp_mpi_dp/model.ckpt") && tr_exists("test_tmp_mpi_dp/summary.json"),
          "rank 0 wrote no checkpoint or summary");
    return 0;
}

/* Stopped at step 6 with N processes and resumed with one, and the other
 * way round: both end as the one-process run did (the previous test's). */
static int test_dp_checkpoints_resume_across_process_counts(void) {
    tr_opts o;
    double gap_a = 0, gap_b = 0;
    int rc = 0;
    if (t_comm.rank == 0) t_remove_tree("test_tmp_mpi_a"), t_remove_tree("test_tmp_mpi_b");
    MPI_Barrier(MPI_COMM_WORLD);
    t_dp_opts(&o, "test_tmp_mpi_a"), o.stop_after = 6;
    rc |= t_train(&o, 1);
    t_dp_opts(&o, "test_tmp_mpi_a"), o.resume = 1;
    rc |= t_train(&o, 0);
    t_dp_opts(&o, "test_tmp_mpi_b"), o.stop_after = 6;
    rc |= t_train(&o, 0);
    t_dp_opts(&o, "test_tmp_mpi_b"), o.resume = 1;
    rc |= t_train(&o, 1);
    CHECK(rc == 0, "a run failed");
    if (t_comm.rank != 0) return 0;
    gap_a = t_log_gap("test_tmp_mpi_a", "test_tmp_mpi_one", "steps.csv");
    gap_b = t_log_gap("test_tmp_mpi_b", "test_tmp_mpi_one", "steps.csv");
    CHECK(gap_a >= 0 && gap_a <= T_DP_TOL, "%d processes, then one: losses differ by %g", t_comm.size, gap_a);
    CHECK(gap_b >= 0 && gap_b <= T_DP_TOL, "one process, then %d: losses differ by %g", t_comm.size, gap_b);
    return 0;
}

/* ---- sharded tables ---- */

/* A model small enough to step in every rank, with Engram (two layers on
 * one table) and PEER (two layers, two expert tables), and mHC. */
static sm_model_config t_shard_config(void) {
    sm_model_config c = sm_model_default_config();
    c.vocab_size = 40, c.seq_len = 8, c.n_layer = 2, c.n_head = 2, c.d_model = 8, c.d_ff = 16;
    c.init_std = 0.3f, c.lr = 1e-2f;
    c.use_engram = 1, c.engram.d_model = c.d_model, c.engram.d_head = 4;
    c.engram.hash.n_heads = 2, c.engram.hash.table_rows = 13;
    c.engram.hash.n_layers = 2, c.engram.hash.layer_ids[0] = 0, c.engram.hash.layer_ids[1] = 1;
    c.use_peer = 1, c.peer_n_layers = 2, c.peer_layer_ids[0] = 0, c.peer_layer_ids[1] = 1;
    c.peer.n_sub = 5, c.peer.heads = 2, c.peer.topk = 2, c.peer.d_key = 4;
    c.use_mhc = 1, c.mhc.channels = c.d_model;
    return c;
}

/* One training step of the global batch (B rows; this model's rows
 * [first, first + rows)): forward, backward, gradients combined, AdamW. */
static int t_shard_step(sm_model *m, const sm_comm *c, const int *in, const int *tg, int first, int rows, int T) {
    sm_error err = {SM_OK, ""};
    double v[2];
    sm_params_zero_grad(&m->params);
    CHECK(sm_model_forward(m, in + first * T, tg + first * T, NULL, rows, T, &err) == SM_OK, "forward: %s", err.msg);
    sm_model_backward(m);
    v[0] = m->n_counted, v[1] = 0;
    CHECK_OK(sm_comm_allreduce_sum_f64(c, v, 1, &err));
    CHECK(sm_model_allreduce_grads(m, c, (float)(m->n_counted / v[0]), &err) == SM_OK, "gradients: %s", err.msg);
    sm_params_adamw_step(&m->params, 1.0f, 1.0f);
    return 0;
}

/* The largest difference between a sharded model's parameters (buf 0) or
 * first Adam moments (buf 1), gathered on rank 0, and a whole model's, or
 * -1 when the gather fails. */
static double t_shard_gap(const sm_model *sharded, const sm_model *whole, int buf) {
    size_t n = whole->params.total, i;
    float *full = t_comm.rank == 0 ? (float *)t_alloc(3 * n) : NULL;
    const float *ref = buf ? whole->params.m : whole->params.data;
    double gap = 0;
    if (sm_model_gather_params(sharded, 0, full, full ? full + n : NULL, full ? full + 2 * n : NULL, NULL) != SM_OK)
        gap = -1;
    for (i = 0; full && gap >= 0 && i < n; i++) {
        double d = fabs((double)full[(size_t)buf * n + i] - ref[i]);
        if (d > gap) gap = d;
    }
    free(full);
    return gap;
}

/* N ranks with sharded tables, each stepping its slice, against one
 * process stepping the whole batch: the initial shards are the whole
 * model's rows, and after one step the first Adam moments (0.1 x the
 * global gradient, every table row included) agree within reduction-order
 * rounding (the owner sums the ranks' sums; one process sums the positions
 * in one pass). The weights themselves are not compared: Adam's first
 * step moves a weight by ~lr whatever its gradient's size, so a gradient
 * of ~1e-9 rounded differently moves it differently. */
static int test_shard_model_step_matches_one_process(void) {
    sm_model_config cfg = t_shard_config();
    sm_model whole, sharded;
    int B = 2 * t_comm.size, T = cfg.seq_len, in[64 * 8], tg[64 * 8], i;
    double gap0, gap;
    sm_rng r;
    sm_rng_seed(&r, 5);
    for (i = 0; i < B * T; i++) in[i] = (int)sm_rng_below(&r, 40), tg[i] = (int)sm_rng_below(&r, 40);
    CHECK_OK(sm_model_init(&whole, &cfg, B, 9, NULL));
    CHECK_OK(sm_model_init_sharded(&sharded, &cfg, B, 9, &t_comm, NULL));
    CHECK(sm_model_is_sharded(&sharded) == (t_comm.size > 1), "sharded with %d ranks: %d", t_comm.size,
          sm_model_is_sharded(&sharded));
    gap0 = t_shard_gap(&sharded, &whole, 0);
    if (t_shard_step(&whole, &t_one, in, tg, 0, B, T) || t_shard_step(&sharded, &t_comm, in, tg, 2 * t_comm.rank, 2, T))
        return 1;
    gap = t_shard_gap(&sharded, &whole, 1);
    sm_model_free(&whole), sm_model_free(&sharded);
    if (t_comm.rank != 0) return 0;
    CHECK(gap0 == 0, "initial shards differ from the whole model's rows by %g", gap0);
    CHECK(gap >= 0 && gap <= 1e-7, "%d ranks vs one process: gradients (first moments) differ by %g", t_comm.size, gap);
    return 0;
}

/* Forward and backward of this rank's slice, then the gradients combined:
 * after the backward (bucket 0: sm_model_allreduce_grads) or during it
 * (sm_model_backward_allreduce with buckets of `bucket` floats). */
static int t_grads_of(sm_model *m, const int *in, const int *tg, int T, int overlap, size_t bucket) {
    sm_error err = {SM_OK, ""};
    float scale = 1.0f / (float)t_comm.size;
    sm_params_zero_grad(&m->params);
    CHECK(sm_model_forward(m, in + 2 * t_comm.rank * T, tg + 2 * t_comm.rank * T, NULL, 2, T, &err) == SM_OK,
          "forward: %s", err.msg);
    if (overlap) {
        CHECK(sm_model_backward_allreduce(m, &t_comm, scale, bucket, &err) == SM_OK, "overlapped: %s", err.msg);
    } else {
        sm_model_backward(m);
        CHECK(sm_model_allreduce_grads(m, &t_comm, scale, &err) == SM_OK, "all-reduce: %s", err.msg);
    }
    return 0;
}

/* The dense gradients summed in buckets while the backward runs equal
 * those summed after it, bit for bit (the same messages' sums: MPI adds
 * the ranks' values elementwise, in one order for a given message; the
 * buckets change the messages, and with 3 ranks or more the order may
 * change with them, so there the limit is 1e-6 relative: measured exact
 * with 3 ranks of Open MPI 4.1 here), with the tables' rows and
 * their touched sets, for buckets of one float (a bucket per sublayer),
 * 300 floats (a few sublayers each) and the default (one bucket at the
 * end), with replicated and with sharded tables. */
static int test_dp_overlapped_backward_matches(void) {
    static const size_t buckets[3] = {1, 300, 0};
    sm_model_config cfg = t_shard_config();
    int T = cfg.seq_len, in[64 * 8], tg[64 * 8], i, sharded, k;
    sm_rng r;
    sm_rng_seed(&r, 7);
    for (i = 0; i < 2 * t_comm.size * T; i++) in[i] = (int)sm_rng_below(&r, 40), tg[i] = (int)sm_rng_below(&r, 40);
    for (sharded = 0; sharded < 2; sharded++)
        for (k = 0; k < 3; k++) {
            sm_model a, b;
            double worst = 0;
            size_t j;
            int t;
            CHECK_OK(sharded ? sm_model_init_sharded(&a, &cfg, 2, 9, &t_comm, NULL) : sm_model_init(&a, &cfg, 2, 9, NULL));
            CHECK_OK(sharded ? sm_model_init_sharded(&b, &cfg, 2, 9, &t_comm, NULL) : sm_model_init(&b, &cfg, 2, 9, NULL));
            if (t_grads_of(&a, in, tg, T, 0, 0) || t_grads_of(&b, in, tg, T, 1, buckets[k])) return 1;
            for (j = 0; j < a.params.total; j++)
                worst = fmax(worst, fabs(a.params.grad[j] - b.params.grad[j]) / (fabs(a.params.grad[j]) + 1e-30));
            for (t = 0; t < a.params.n_tensors; t++) {
                const sm_row_set *ra = a.params.tensors[t].rows, *rb = b.params.tensors[t].rows;
                CHECK(!ra || (ra->count == rb->count && !memcmp(ra->rows, rb->rows, ra->count * sizeof *ra->rows)),
                      "sharded %d, bucket %zu: %s's touched rows differ", sharded, buckets[k], a.params.tensors[t].name);
            }
            sm_model_free(&a), sm_model_free(&b);
            CHECK(t_comm.size == 2 ? worst == 0 : worst <= 1e-6,
                  "sharded %d, bucket %zu: gradients differ by %g relative with %d ranks", sharded, buckets[k], worst,
                  t_comm.size);
        }
    return 0;
}

/* Each rank allocates its rows of the tables (and their moments): the
 * ranks' table bytes add up to the whole model's, and no rank holds more
 * than ceil(rows / N) rows of any table. */
static int test_shard_table_memory_per_rank(void) {
    sm_model_config cfg = t_shard_config();
    sm_model whole, sharded;
    double mine[2];
    size_t whole_bytes;
    CHECK_OK(sm_model_init(&whole, &cfg, 2, 9, NULL));
    CHECK_OK(sm_model_init_sharded(&sharded, &cfg, 2, 9, &t_comm, NULL));
    whole_bytes = sm_model_table_bytes(&whole);
    mine[0] = (double)sm_model_table_bytes(&sharded), mine[1] = (double)sharded.engram_rows.nrows;
    CHECK_OK(sm_comm_allreduce_sum_f64(&t_comm, mine, 2, NULL));
    CHECK(mine[0] == (double)whole_bytes, "the ranks' table bytes add up to %g, the whole model's %zu", mine[0],
          whole_bytes);
    CHECK(mine[1] == (double)whole.engram_rows.nrows && sharded.engram_rows.nrows * t_comm.size < whole.engram_rows.nrows + t_comm.size,
          "rank %d holds %zu of %zu Engram rows", t_comm.rank, sharded.engram_rows.nrows, whole.engram_rows.nrows);
    CHECK(whole.params.total - sharded.params.total == whole_bytes / 16 - sm_model_table_bytes(&sharded) / 16,
          "the dense tensors differ: %zu vs %zu floats", whole.params.total, sharded.params.total);
    sm_model_free(&whole), sm_model_free(&sharded);
    return 0;
}

/* The trainer with --shard-tables against one process (the reference of
 * test_dp_training_matches_one_process, rerun here so the test stands
 * alone), and its checkpoints resumed across process counts both ways. */
static int test_shard_training_matches_and_resumes(void) {
    tr_opts o;
    double gap, gap_a, gap_b;
    int rc = 0;
    if (t_comm.rank == 0) {
        t_remove_tree("test_tmp_mpi_shard"), t_remove_tree("test_tmp_mpi_ref");
        t_remove_tree("test_tmp_mpi_sa"), t_remove_tree("test_tmp_mpi_sb");
        t_write_corpus("test_tmp_mpi_corpus.txt", 5);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    t_dp_opts(&o, "test_tmp_mpi_ref");
    rc |= t_train(&o, 0);
    t_dp_opts(&o, "test_tmp_mpi_shard"), o.shard_tables = 1;
    rc |= t_train(&o, 1);
    t_dp_opts(&o, "test_tmp_mpi_sa"), o.shard_tables = 1, o.stop_after = 6;
    rc |= t_train(&o, 1);
    t_dp_opts(&o, "test_tmp_mpi_sa"), o.resume = 1;
    rc |= t_train(&o, 0);
    t_dp_opts(&o, "test_tmp_mpi_sb"), o.stop_after = 6;
    rc |= t_train(&o, 0);
    t_dp_opts(&o, "test_tmp_mpi_sb"), o.shard_tables = 1, o.resume = 1;
    rc |= t_train(&o, 1);
    CHECK(rc == 0, "a run failed");
    if (t_comm.rank != 0) return 0;
    gap = t_log_gap("test_tmp_mpi_shard", "test_tmp_mpi_ref", "steps.csv");
    gap_a = t_log_gap("test_tmp_mpi_sa", "test_tmp_mpi_ref", "steps.csv");
    gap_b = t_log_gap("test_tmp_mpi_sb", "test_tmp_mpi_ref", "steps.csv");
    CHECK(gap >= 0 && gap <= T_DP_TOL, "%d sharded processes vs one: losses differ by %g (tolerance %g)",
          t_comm.size, gap, T_DP_TOL);
    CHECK(gap_a >= 0 && gap_a <= T_DP_TOL, "%d sharded processes, then one: losses differ by %g", t_comm.size, gap_a);
    CHECK(gap_b >= 0 && gap_b <= T_DP_TOL, "one process, then %d sharded: losses differ by %g", t_comm.size, gap_b);
    gap = t_log_gap("test_tmp_mpi_shard", "test_tmp_mpi_ref", "diag.csv");
    CHECK(gap >= 0 && gap <= T_DIAG_TOL, "%d sharded processes vs one: diag.csv differs by %g", t_comm.size, gap);
    return 0;
}

static const t_case t_cases[] = {COMM_TESTS, T(test_dp_training_matches_one_process),
                                 T(test_dp_checkpoints_resume_across_process_counts),
                                 T(test_shard_model_step_matches_one_process), T(test_shard_table_memory_per_rank),
                                 T(test_dp_overlapped_backward_matches),
                                 T(test_shard_training_matches_and_resumes)};

int main(int argc, char **argv) {
    sm_error err;
    int failed;
    MPI_Init(&argc, &argv);
    sm_comm_init_single(&t_one);
    if (sm_comm_init_mpi(&t_comm, MPI_COMM_WORLD, &err) != SM_OK ||
        sm_comm_init_mpi(&tr_world, MPI_COMM_WORLD, &err) != SM_OK) {
        fprintf(stderr, "tests_mpi: %s\n", err.msg);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    if (t_comm.rank == 0) printf("%d ranks\n", t_comm.size);
    else if (!freopen("/dev/null", "w", stdout)) return 2;
    t_agree = t_mpi_agree;
    failed = t_run(t_cases, sizeof t_cases / sizeof t_cases[0], argv + 1, argc - 1);
    sm_comm_free(&t_comm), sm_comm_free(&tr_world);
    MPI_Finalize();
    return failed ? 1 : 0;
}
