/* tests_mpi.c - the communicator and the row exchange of sharded tables
 * across processes: the tests of tests_comm.h (which tests.c runs in one
 * process) under MPI.
 *
 *   mpicc -DSM_USE_MPI -o tests_mpi tests_mpi.c -lm && mpirun -np 2 ./tests_mpi
 *
 * (`make test-mpi` runs it with 2 and 3 ranks.) Rank 0 prints the results;
 * a rank that fails prints its message on stderr, and the test counts as
 * failed on every rank. Exits non-zero on any failure. */
#define SPARSEMEM_IMPLEMENTATION
#include "sparsemem.h"
#include <math.h>
#include "tests_harness.h"
#include "tests_comm.h"

/* Failed on some rank = failed; the failing rank says why on stderr. */
static int t_mpi_agree(int bad) {
    int any = 0;
    if (bad) fprintf(stderr, "rank %d: %s\n", t_comm.rank, t_fail_msg);
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (any && !bad) snprintf(t_fail_msg, sizeof t_fail_msg, "failed on another rank (see stderr)");
    return any;
}

static const t_case t_cases[] = {COMM_TESTS};

int main(int argc, char **argv) {
    sm_error err;
    int failed;
    MPI_Init(&argc, &argv);
    if (sm_comm_init_mpi(&t_comm, MPI_COMM_WORLD, &err) != SM_OK) {
        fprintf(stderr, "tests_mpi: %s\n", err.msg);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    if (t_comm.rank == 0) printf("%d ranks\n", t_comm.size);
    else if (!freopen("/dev/null", "w", stdout)) return 2;
    t_agree = t_mpi_agree;
    failed = t_run(t_cases, sizeof t_cases / sizeof t_cases[0], argc > 1 ? argv[1] : NULL);
    sm_comm_free(&t_comm);
    MPI_Finalize();
    return failed ? 1 : 0;
}
