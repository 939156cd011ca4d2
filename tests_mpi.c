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

static const t_case t_cases[] = {COMM_TESTS, T(test_dp_training_matches_one_process),
                                 T(test_dp_checkpoints_resume_across_process_counts)};

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
    failed = t_run(t_cases, sizeof t_cases / sizeof t_cases[0], argc > 1 ? argv[1] : NULL);
    sm_comm_free(&t_comm), sm_comm_free(&tr_world);
    MPI_Finalize();
    return failed ? 1 : 0;
}
