/* tests_nccl.c (>>comm) - sm_comm's NCCL collectives on GPU buffers, one
 * rank per GPU (NCCL cannot put several ranks on one GPU):
 *
 *   make tests_nccl && mpirun -np <GPUs> ./tests_nccl     (make test-nccl)
 *
 * Built whenever nvcc, nccl.h and MPI are present; without a GPU it says
 * so and exits 0. Rank 0 prints the results; exits non-zero on a failure. */
#define SPARSEMEM_IMPLEMENTATION
#define SM_USE_MPI
#define SM_USE_NCCL
#include "sparsemem.h"
#include "tests_harness.h"

static sm_comm t_comm;
static cudaStream_t t_stream;

/* Failed on some rank = failed. */
static int t_nccl_agree(int bad) {
    int any = 0;
    if (bad) fprintf(stderr, "rank %d: %s\n", t_comm.rank, t_fail_msg);
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return any;
}

/* n floats to the device and back around a device collective. */
static float *t_to_device(const float *x, size_t n) {
    float *d = NULL;
    if (cudaMalloc((void **)&d, n * sizeof(float)) != cudaSuccess) return NULL;
    cudaMemcpy(d, x, n * sizeof(float), cudaMemcpyHostToDevice);
    return d;
}

static void t_from_device(float *x, float *d, size_t n) {
    cudaStreamSynchronize(t_stream);
    cudaMemcpy(x, d, n * sizeof(float), cudaMemcpyDeviceToHost);
    cudaFree(d);
}

static int test_nccl_allreduce_sums_ranks(void) {
    float x[1000], *d;
    int i, n = t_comm.size;
    for (i = 0; i < 1000; i++) x[i] = (float)(t_comm.rank + 1) * (float)i;
    CHECK((d = t_to_device(x, 1000)) != NULL, "cudaMalloc failed");
    CHECK_OK(sm_comm_device_allreduce_sum(&t_comm, d, 1000, t_stream, NULL));
    t_from_device(x, d, 1000);
    for (i = 0; i < 1000; i++)
        CHECK(x[i] == (float)(n * (n + 1) / 2) * (float)i, "x[%d] = %g, want %g", i, x[i],
              (double)(n * (n + 1) / 2) * i);
    return 0;
}

static int test_nccl_broadcast_and_allgather(void) {
    float x[64], all[64 * 16], *d, *dall;
    int i, r, n = t_comm.size;
    CHECK(n <= 16, "at most 16 ranks here");
    for (i = 0; i < 64; i++) x[i] = (float)(100 * t_comm.rank + i);
    CHECK((d = t_to_device(x, 64)) != NULL && (dall = t_to_device(all, 64 * (size_t)n)) != NULL, "cudaMalloc failed");
    CHECK_OK(sm_comm_device_allgather(&t_comm, d, 64 * sizeof(float), dall, t_stream, NULL));
    CHECK_OK(sm_comm_device_broadcast(&t_comm, d, 64 * sizeof(float), n - 1, t_stream, NULL));
    t_from_device(all, dall, 64 * (size_t)n);
    t_from_device(x, d, 64);
    for (r = 0; r < n; r++)
        for (i = 0; i < 64; i++) CHECK(all[r * 64 + i] == (float)(100 * r + i), "gathered[%d][%d] = %g", r, i, all[r * 64 + i]);
    for (i = 0; i < 64; i++) CHECK(x[i] == (float)(100 * (n - 1) + i), "broadcast x[%d] = %g", i, x[i]);
    return 0;
}

static const t_case t_cases[] = {T(test_nccl_allreduce_sums_ranks), T(test_nccl_broadcast_and_allgather)};

int main(int argc, char **argv) {
    sm_error err;
    int devices = 0, failed;
    MPI_Init(&argc, &argv);
    if (sm_comm_init_mpi(&t_comm, MPI_COMM_WORLD, &err) != SM_OK) MPI_Abort(MPI_COMM_WORLD, 2);
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 1) {
        if (t_comm.rank == 0) printf("tests_nccl: skipped: no GPU here (NCCL needs one GPU per rank)\n");
        sm_comm_free(&t_comm);
        MPI_Finalize();
        return 0;
    }
    cudaSetDevice(t_comm.rank % devices);
    cudaStreamCreate(&t_stream);
    if (sm_comm_init_nccl(&t_comm, &err) != SM_OK) {
        fprintf(stderr, "tests_nccl: %s\n", err.msg);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    if (t_comm.rank == 0) printf("%d ranks on %d GPU(s)\n", t_comm.size, devices);
    else if (!freopen("/dev/null", "w", stdout)) return 2;
    t_agree = t_nccl_agree;
    failed = t_run(t_cases, sizeof t_cases / sizeof t_cases[0], argc > 1 ? argv[1] : NULL);
    cudaStreamDestroy(t_stream);
    sm_comm_free(&t_comm);
    MPI_Finalize();
    return failed ? 1 : 0;
}
