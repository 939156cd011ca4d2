/* tests_nccl.cu (>>comm) - on GPUs, with MPI ranks: sm_comm's NCCL
 * collectives on device buffers, and the data-parallel gradient sums of the
 * CUDA backend (smc_params_allreduce_grads) against the CPU's
 * (sm_params_allreduce_grads), through NCCL and through host copies:
 *
 *   make tests_nccl && mpirun -np <ranks> ./tests_nccl      (make test-nccl)
 *
 * NCCL needs one GPU per rank. With more ranks than GPUs the ranks share
 * them, and only the host-copy case runs (it says so). Built whenever nvcc,
 * nccl.h and MPI are present; without a GPU it says so and exits 0. Rank 0
 * prints the results; exits non-zero on a failure. */
#define SPARSEMEM_IMPLEMENTATION
#define SM_USE_MPI
#define SM_USE_NCCL
#include "sparsemem.h"
#define SPARSEMEM_CUDA_IMPLEMENTATION
#include "sparsemem_cuda.cuh"
#include "tests_harness.h"

static sm_comm t_comm;
static cudaStream_t t_stream;
static int t_device; /* this rank's GPU */

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

/* A parameter table as the model lays one out: dense, a table, dense, a
 * second table, with this rank's gradients (dense everywhere, the tables
 * on rows that overlap between ranks, and duplicates) and its touched rows
 * marked in the host sets. */
#define T_DP_ROWS 97
#define T_DP_WIDTH 40
typedef struct {
    sm_params p;
    sm_row_set sets[2];
    size_t off[4];
} t_dp_table;

static int t_dp_build(t_dp_table *t, int rank) {
    sm_error err;
    sm_rng rng;
    int g, k;
    size_t i, r;
    memset(t, 0, sizeof *t);
    g = sm_params_add_group(&t->p, sm_param_group_default("all", 1e-3f), &err);
    CHECK_OK(sm_row_set_init(&t->sets[0], T_DP_ROWS, &err));
    CHECK_OK(sm_row_set_init(&t->sets[1], T_DP_ROWS, &err));
    t->off[0] = sm_params_add_tensor(&t->p, "dense a", 1234, g, 0, NULL, &err);
    t->off[1] = sm_params_add_tensor(&t->p, "table a", (size_t)T_DP_ROWS * T_DP_WIDTH, g, T_DP_WIDTH, &t->sets[0], &err);
    t->off[2] = sm_params_add_tensor(&t->p, "dense b", 77, g, 0, NULL, &err);
    t->off[3] = sm_params_add_tensor(&t->p, "table b", (size_t)T_DP_ROWS * T_DP_WIDTH, g, T_DP_WIDTH, &t->sets[1], &err);
    CHECK_OK(sm_params_alloc(&t->p, &err));
    sm_rng_seed(&rng, 1000 + (uint64_t)rank);
    sm_rng_fill_normal(&rng, t->p.grad + t->off[0], 1234, 1.0f);
    sm_rng_fill_normal(&rng, t->p.grad + t->off[2], 77, 1.0f);
    for (k = 0; k < 2; k++) /* rows 5 + 3 (rank + i) + k: 8 shared by neighbour ranks; the first listed twice */
        for (i = 0; i < 9; i++) {
            r = (5 + 3 * ((size_t)rank + i) + (size_t)k) % T_DP_ROWS;
            sm_row_set_add(&t->sets[k], r);
            if (i == 0) sm_row_set_add(&t->sets[k], r);
            sm_rng_fill_normal(&rng, t->p.grad + t->off[1 + 2 * k] + r * T_DP_WIDTH, T_DP_WIDTH, 1.0f);
        }
    return 0;
}

static void t_dp_free(t_dp_table *t) {
    sm_params_free(&t->p);
    sm_row_set_free(&t->sets[0]);
    sm_row_set_free(&t->sets[1]);
}

/* The GPU's sum (through NCCL, or host copies with comm's MPI when nccl is
 * 0) equals the CPU's: the same union of touched rows, sorted, on every
 * rank (one rank: the same rows, in the order each set was filled);
 * every gradient scaled and summed (2 ranks add in one order, more may
 * not: 1e-6 relative). */
static int t_dp_matches_cpu(int nccl) {
    t_dp_table cpu, gpu;
    sm_comm comm = t_comm;
    smc_ctx ctx;
    smc_params d;
    smc_row_set sets[2];
    sm_error err;
    uint32_t *list, *dev_list;
    float *grad, scale = 0.25f + 0.5f * (float)t_comm.rank;
    size_t i, count[2];
    int k;
    if (!nccl) comm.nccl = NULL;
    if (t_dp_build(&cpu, t_comm.rank) || t_dp_build(&gpu, t_comm.rank)) return 1;
    CHECK_OK(smc_init(&ctx, t_device, &err));
    CHECK_OK(smc_params_alloc(&d, &gpu.p, &err));
    for (k = 0; k < 2; k++) {
        CHECK_OK(smc_row_set_init(&sets[k], T_DP_ROWS, &err));
        CHECK((dev_list = (uint32_t *)smc_malloc(gpu.sets[k].count * 4, "rows", &err)) != NULL, "%s", err.msg);
        CHECK_OK(smc_upload(dev_list, gpu.sets[k].rows, gpu.sets[k].count * 4, &err));
        smc_row_set_add(&ctx, &sets[k], dev_list, gpu.sets[k].count);
        smc_params_bind_rows(&d, k == 0 ? 1 : 3, &sets[k]);
        CHECK_OK(smc_sync(&ctx, "add rows", &err));
        smc_dfree(dev_list);
    }
    CHECK_OK(smc_params_check(&d, &err));
    CHECK_OK(smc_upload(d.grad, gpu.p.grad, gpu.p.total * sizeof(float), &err));
    CHECK_OK(sm_params_allreduce_grads(&cpu.p, &t_comm, scale, &err));
    CHECK_OK(smc_params_allreduce_grads(&ctx, &d, &comm, scale, &err));
    grad = (float *)t_alloc(gpu.p.total);
    list = (uint32_t *)t_alloc(T_DP_ROWS);
    CHECK(cudaMemcpy(grad, d.grad, gpu.p.total * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess, "download");
    for (i = 0; i < gpu.p.total; i++)
        CHECK(fabsf(grad[i] - cpu.p.grad[i]) <= 1e-6f * (1.0f + fabsf(cpu.p.grad[i])), "grad[%zu] = %.9g, the CPU %.9g",
              i, grad[i], cpu.p.grad[i]);
    for (k = 0; k < 2; k++) {
        count[k] = smc_row_set_count(&ctx, &sets[k]);
        CHECK(count[k] == cpu.sets[k].count, "set %d: %zu rows, the CPU %zu", k, count[k], cpu.sets[k].count);
        CHECK(cudaMemcpy(list, sets[k].rows, count[k] * 4, cudaMemcpyDeviceToHost) == cudaSuccess, "download");
        if (t_comm.size == 1) { /* no union: both sets keep their (different) insertion orders */
            qsort(list, count[k], 4, sm__cmp_u32);
            sm_row_set_sort(&cpu.sets[k]);
        }
        for (i = 0; i < count[k]; i++)
            CHECK(list[i] == cpu.sets[k].rows[i], "set %d row %zu: %u, the CPU %u", k, i, list[i], cpu.sets[k].rows[i]);
        smc_row_set_free(&sets[k]);
    }
    free(grad), free(list);
    smc_params_free(&d);
    smc_free(&ctx);
    t_dp_free(&cpu), t_dp_free(&gpu);
    return 0;
}

static int test_gpu_dp_grads_nccl_match_cpu(void) { return t_dp_matches_cpu(1); }
static int test_gpu_dp_grads_host_copies_match_cpu(void) { return t_dp_matches_cpu(0); }

static const t_case t_cases[] = {T(test_nccl_allreduce_sums_ranks), T(test_nccl_broadcast_and_allgather),
                                 T(test_gpu_dp_grads_nccl_match_cpu), T(test_gpu_dp_grads_host_copies_match_cpu)};
/* With more ranks than GPUs: the case that needs no NCCL. */
static const t_case t_shared_gpu_cases[] = {T(test_gpu_dp_grads_host_copies_match_cpu)};

/* Ranks on this rank's node, and this rank's place among them. */
static void t_node_ranks(int *local_rank, int *local_size) {
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, local_rank);
    MPI_Comm_size(node, local_size);
    MPI_Comm_free(&node);
}

int main(int argc, char **argv) {
    sm_error err;
    int devices = 0, failed, local_rank, local_size, shared;
    MPI_Init(&argc, &argv);
    if (sm_comm_init_mpi(&t_comm, MPI_COMM_WORLD, &err) != SM_OK) MPI_Abort(MPI_COMM_WORLD, 2);
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < 1) {
        if (t_comm.rank == 0) printf("tests_nccl: skipped: no GPU here\n");
        sm_comm_free(&t_comm);
        MPI_Finalize();
        return 0;
    }
    t_node_ranks(&local_rank, &local_size);
    t_device = local_rank % devices;
    cudaSetDevice(t_device);
    cudaStreamCreate(&t_stream);
    /* NCCL puts one rank on a GPU: every node must have a GPU per rank */
    MPI_Allreduce(MPI_IN_PLACE, &local_size, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    shared = local_size > devices;
    if (!shared && sm_comm_init_nccl(&t_comm, &err) != SM_OK) {
        fprintf(stderr, "tests_nccl: %s\n", err.msg);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    if (t_comm.rank == 0) printf("%d ranks on %d GPU(s)%s\n", t_comm.size, devices,
                                 shared ? ": they share GPUs, so the NCCL cases are skipped" : "");
    else if (!freopen("/dev/null", "w", stdout)) return 2;
    t_agree = t_nccl_agree;
    failed = shared ? t_run(t_shared_gpu_cases, sizeof t_shared_gpu_cases / sizeof t_shared_gpu_cases[0], argv + 1, argc - 1)
                    : t_run(t_cases, sizeof t_cases / sizeof t_cases[0], argv + 1, argc - 1);
    cudaStreamDestroy(t_stream);
    sm_comm_free(&t_comm);
    MPI_Finalize();
    return failed ? 1 : 0;
}
