/* tests_comm.h (>>comm) - the communicator and the sharded-table row exchange,
 * written for any number of ranks: tests.c runs them in one process
 * (size 1), tests_mpi.c under mpirun with 2 and 3 ranks. Every rank makes
 * every collective call before it checks anything, so a failing rank
 * cannot leave the others waiting. Include after tests_harness.h. */
#ifndef SM_TESTS_COMM_H
#define SM_TESTS_COMM_H

static sm_comm t_comm; /* set by the runner before the tests */

static int test_comm_ranks_distinct(void) {
    int *all = (int *)t_alloc((size_t)t_comm.size), r, bad = -1;
    size_t *len = (size_t *)calloc((size_t)t_comm.size, sizeof(size_t));
    sm_status st;
    for (r = 0; r < t_comm.size; r++) len[r] = sizeof(int);
    st = sm_comm_allgatherv(&t_comm, &t_comm.rank, sizeof(int), all, len, NULL);
    for (r = 0; r < t_comm.size; r++)
        if (all[r] != r && bad < 0) bad = r;
    free(all), free(len);
    CHECK(st == SM_OK, "allgatherv -> %s", sm_strerror(st));
    CHECK(t_comm.rank >= 0 && t_comm.rank < t_comm.size, "rank %d of %d", t_comm.rank, t_comm.size);
    CHECK(bad < 0, "position %d holds another rank", bad);
    return 0;
}

/* Sums of rank-dependent values that are exact in float, so any missing
 * or doubled contribution shows. */
static int test_comm_allreduce_sums_every_rank(void) {
    const size_t n = 1000;
    float *x = (float *)t_alloc(n);
    double d[3];
    size_t i;
    int S = t_comm.size, bad = -1;
    sm_status s1, s2, s3;
    for (i = 0; i < n; i++) x[i] = (float)t_comm.rank + 0.5f * (float)i;
    d[0] = 1.0, d[1] = t_comm.rank, d[2] = 1e-3 * t_comm.rank;
    s1 = sm_comm_allreduce_sum(&t_comm, x, n, NULL);
    s2 = sm_comm_allreduce_sum_f64(&t_comm, d, 3, NULL);
    s3 = sm_comm_allreduce_sum(&t_comm, x, 0, NULL);
    for (i = 0; i < n && bad < 0; i++)
        if (x[i] != (float)(S * (S - 1) / 2) + (float)S * 0.5f * (float)i) bad = (int)i;
    free(x);
    CHECK(s1 == SM_OK && s2 == SM_OK && s3 == SM_OK, "allreduce failed");
    CHECK(bad < 0, "element %d is not the sum over %d ranks", bad, S);
    CHECK(d[0] == S && d[1] == S * (S - 1) / 2, "f64 sums %g %g", d[0], d[1]);
    CHECK(fabs(d[2] - 1e-3 * S * (S - 1) / 2) < 1e-15, "f64 sum %.17g", d[2]);
    return 0;
}

static int test_comm_broadcast_from_last_rank(void) {
    int buf[4] = {t_comm.rank, t_comm.rank, t_comm.rank, t_comm.rank}, i;
    sm_error err;
    sm_status st = sm_comm_broadcast(&t_comm, buf, sizeof buf, t_comm.size - 1, NULL);
    sm_status bad_root = sm_comm_broadcast(&t_comm, buf, sizeof buf, t_comm.size, &err);
    CHECK(st == SM_OK, "broadcast -> %s", sm_strerror(st));
    for (i = 0; i < 4; i++) CHECK(buf[i] == t_comm.size - 1, "buf[%d] = %d", i, buf[i]);
    CHECK(bad_root == SM_ERR_INVALID_ARG && strstr(err.msg, "root"), "root %d accepted: %s", t_comm.size,
          err.msg);
    CHECK(sm_comm_barrier(&t_comm, NULL) == SM_OK, "barrier");
    return 0;
}

/* Rank r sends r + 1 bytes of value r; the rank that lies about its size
 * is refused before anything is sent (every rank lies here, so all skip). */
static int test_comm_allgatherv_uneven_blocks(void) {
    int S = t_comm.size, r, bad = -1;
    size_t *len = (size_t *)calloc((size_t)S, sizeof(size_t)), total = 0, i, at = 0;
    unsigned char mine[64], *all;
    sm_error err;
    sm_status st, lie;
    for (r = 0; r < S; r++) len[r] = (size_t)r + 1, total += len[r];
    memset(mine, t_comm.rank, sizeof mine);
    all = (unsigned char *)calloc(total, 1);
    st = sm_comm_allgatherv(&t_comm, mine, len[t_comm.rank], all, len, NULL);
    lie = sm_comm_allgatherv(&t_comm, mine, len[t_comm.rank] + 1, all, len, &err);
    for (r = 0; r < S; r++)
        for (i = 0; i < len[r]; i++, at++)
            if (all[at] != r && bad < 0) bad = (int)at;
    free(len), free(all);
    CHECK(st == SM_OK, "allgatherv -> %s", sm_strerror(st));
    CHECK(bad < 0, "byte %d is from the wrong rank", bad);
    CHECK(lie == SM_ERR_INVALID_ARG && strstr(err.msg, "recv_bytes"), "a wrong size was sent: %s", err.msg);
    return 0;
}

/* Rank s sends rank d (s + d) % 3 ints of value 100 s + 10 d + k. */
static int test_comm_alltoallv_blocks_in_rank_order(void) {
    int S = t_comm.size, me = t_comm.rank, d, s, k, bad = -1, *send, *recv, at;
    size_t *sb = (size_t *)calloc(2 * (size_t)S, sizeof(size_t)), *rb = sb + S;
    sm_status st;
    for (d = 0; d < S; d++) sb[d] = sizeof(int) * (size_t)((me + d) % 3), rb[d] = sizeof(int) * (size_t)((d + me) % 3);
    send = (int *)t_alloc(3 * (size_t)S), recv = (int *)t_alloc(3 * (size_t)S);
    for (d = 0, at = 0; d < S; d++)
        for (k = 0; k < (me + d) % 3; k++) send[at++] = 100 * me + 10 * d + k;
    st = sm_comm_alltoallv(&t_comm, send, sb, recv, rb, NULL);
    for (s = 0, at = 0; s < S; s++)
        for (k = 0; k < (s + me) % 3; k++, at++)
            if (recv[at] != 100 * s + 10 * me + k && bad < 0) bad = at;
    free(sb), free(send), free(recv);
    CHECK(st == SM_OK, "alltoallv -> %s", sm_strerror(st));
    CHECK(bad < 0, "received int %d is not what its sender meant for this rank", bad);
    return 0;
}

/* The same bytes pass; bytes that differ on the last rank fail on all. */
static int test_comm_check_same_names_the_rank(void) {
    char cfg[32] = "d_model=128 n_layer=4";
    sm_error err;
    sm_status same = sm_comm_check_same(&t_comm, cfg, sizeof cfg, "the model config", NULL), differ;
    char want[32];
    if (t_comm.rank == t_comm.size - 1 && t_comm.size > 1) cfg[8] = '6';
    differ = sm_comm_check_same(&t_comm, cfg, sizeof cfg, "the model config", &err);
    snprintf(want, sizeof want, "rank %d", t_comm.size - 1);
    CHECK(same == SM_OK, "identical buffers -> %s", sm_strerror(same));
    if (t_comm.size == 1) return 0;
    CHECK(differ == SM_ERR_MISMATCH, "a differing config passed");
    CHECK(strstr(err.msg, "the model config") && strstr(err.msg, want), "message: %s", err.msg);
    return 0;
}

static int test_row_owner_partitions_the_table(void) {
    static const uint64_t n_rows[] = {0, 1, 7, 100, 1001};
    static const int sizes[] = {1, 2, 3, 5};
    size_t a, b;
    for (a = 0; a < sizeof n_rows / sizeof n_rows[0]; a++)
        for (b = 0; b < sizeof sizes / sizeof sizes[0]; b++) {
            int S = sizes[b], r;
            uint64_t row, total = 0, n = n_rows[a];
            unsigned char *seen = (unsigned char *)calloc((size_t)(n + 1) * (size_t)S, 1);
            for (r = 0; r < S; r++) total += sm_shard_rows(n, r, S);
            for (row = 0; row < n; row++) {
                int o = sm_row_owner(row, S);
                uint64_t l = sm_row_local(row, S);
                CHECK(o >= 0 && o < S && l < sm_shard_rows(n, o, S), "row %llu -> rank %d local %llu of %llu",
                      (unsigned long long)row, o, (unsigned long long)l,
                      (unsigned long long)sm_shard_rows(n, o, S));
                CHECK(!seen[l * (uint64_t)S + (uint64_t)o], "two rows at rank %d local %llu", o, (unsigned long long)l);
                seen[l * (uint64_t)S + (uint64_t)o] = 1;
            }
            free(seen);
            CHECK(total == n, "%d shards hold %llu of %llu rows", S, (unsigned long long)total, (unsigned long long)n);
        }
    return 0;
}

/* ---- the row exchange: every rank's requests can be regenerated by every
 * rank, so each checks what it received and what it owns ---- */

#define T_ROWS 997u /* a prime: shards of unequal size */
#define T_WIDTH 5

/* Rank r's requested ids: duplicates (a small hot range), ids of every
 * owner, and none at all on rank 1. */
static size_t t_rank_ids(int rank, uint32_t *ids) {
    sm_rng g;
    size_t n = rank == 1 ? 0 : 40 + 13 * (size_t)rank, p;
    sm_rng_seed(&g, 100 + (uint64_t)rank);
    for (p = 0; p < n; p++) ids[p] = p % 3 == 0 ? sm_rng_below(&g, 6) : sm_rng_below(&g, T_ROWS);
    return n;
}

static float t_row_value(uint32_t id, int j) { return (float)(id * 10u + (uint32_t)j); }
/* Integers, so sums are exact whatever the order. */
static float t_grad_value(int rank, size_t p, int j) { return (float)(100 * (rank + 1) + (int)(p % 7) + j); }

static float *t_my_shard(void) {
    uint64_t rows = sm_shard_rows(T_ROWS, t_comm.rank, t_comm.size), l;
    float *shard = (float *)t_alloc((size_t)rows * T_WIDTH);
    int j;
    for (l = 0; l < rows; l++)
        for (j = 0; j < T_WIDTH; j++)
            shard[l * T_WIDTH + j] = t_row_value((uint32_t)(l * (uint64_t)t_comm.size + (uint64_t)t_comm.rank), j);
    return shard;
}

static int test_row_exchange_fetch_returns_each_position_its_row(void) {
    uint32_t ids[128];
    size_t n = t_rank_ids(t_comm.rank, ids), p;
    float *shard = t_my_shard(), *rows = (float *)t_alloc(n * T_WIDTH + 1);
    sm_row_exchange x;
    sm_status st = sm_row_exchange_plan(&x, &t_comm, ids, n, T_ROWS, NULL), st2 = SM_OK;
    int j, bad = -1;
    if (st == SM_OK) st2 = sm_row_exchange_fetch(&x, &t_comm, shard, T_WIDTH, rows, NULL);
    for (p = 0; p < n && bad < 0; p++)
        for (j = 0; j < T_WIDTH; j++)
            if (rows[p * T_WIDTH + j] != t_row_value(ids[p], j)) bad = (int)p;
    CHECK(st == SM_OK && st2 == SM_OK, "plan/fetch failed");
    CHECK(x.n_unique < n || n == 0, "%zu distinct of %zu ids: the duplicates were sent", x.n_unique, n);
    sm_row_exchange_free(&x);
    free(shard), free(rows);
    CHECK(bad < 0, "position %d got another row", bad);
    return 0;
}

/* What this rank's shard gradient must be: every rank's pushes of the rows
 * it owns, summed; and which local rows were touched. */
static void t_expected_push(float *want, unsigned char *touched) {
    uint32_t ids[128];
    int r, j;
    for (r = 0; r < t_comm.size; r++) {
        size_t n = t_rank_ids(r, ids), p;
        for (p = 0; p < n; p++) {
            uint64_t l = sm_row_local(ids[p], t_comm.size);
            if (sm_row_owner(ids[p], t_comm.size) != t_comm.rank) continue;
            touched[l] = 1;
            for (j = 0; j < T_WIDTH; j++) want[l * T_WIDTH + j] += t_grad_value(r, p, j);
        }
    }
}

static int test_row_exchange_push_sums_gradients_at_the_owner(void) {
    uint32_t ids[128];
    size_t n = t_rank_ids(t_comm.rank, ids), p, rows = (size_t)sm_shard_rows(T_ROWS, t_comm.rank, t_comm.size), i;
    float *drows = (float *)t_alloc(n * T_WIDTH + 1), *grad = (float *)t_alloc(rows * T_WIDTH);
    float *want = (float *)t_alloc(rows * T_WIDTH);
    unsigned char *touched = (unsigned char *)calloc(rows, 1);
    sm_row_set set;
    sm_row_exchange x;
    sm_status st;
    int j;
    size_t bad = (size_t)-1, n_touched = 0;
    for (p = 0; p < n; p++)
        for (j = 0; j < T_WIDTH; j++) drows[p * T_WIDTH + j] = t_grad_value(t_comm.rank, p, j);
    for (i = 0; i < rows * T_WIDTH; i++) grad[i] = want[i] = 1.0f; /* push accumulates */
    sm_row_set_init(&set, rows ? rows : 1, NULL);
    st = sm_row_exchange_plan(&x, &t_comm, ids, n, T_ROWS, NULL);
    if (st == SM_OK) st = sm_row_exchange_push(&x, &t_comm, drows, T_WIDTH, grad, &set, NULL);
    t_expected_push(want, touched);
    for (i = 0; i < rows * T_WIDTH && bad == (size_t)-1; i++)
        if (grad[i] != want[i]) bad = i;
    for (i = 0; i < rows; i++) n_touched += touched[i];
    for (i = 0; i < set.count; i++)
        if (!touched[set.rows[i]]) bad = set.rows[i] * T_WIDTH;
    CHECK(st == SM_OK, "plan/push failed");
    CHECK(bad == (size_t)-1, "local row %zu: gradient %g, want %g (or touched wrongly)", bad / T_WIDTH,
          grad[bad], want[bad]);
    CHECK(set.count == n_touched, "%zu rows marked touched, want %zu", set.count, n_touched);
    sm_row_exchange_free(&x);
    sm_row_set_free(&set);
    free(drows), free(grad), free(want), free(touched);
    return 0;
}

/* A bad id on rank 0 fails there, naming it, and the others finish. */
static int test_row_exchange_refuses_ids_outside_the_table(void) {
    uint32_t ids[3] = {1, 2, 3};
    sm_row_exchange x;
    sm_error err;
    sm_status st;
    if (t_comm.rank == 0) ids[1] = T_ROWS;
    st = sm_row_exchange_plan(&x, &t_comm, ids, 3, T_ROWS, &err);
    if (st == SM_OK) sm_row_exchange_free(&x);
    if (t_comm.rank != 0) {
        CHECK(st == SM_OK, "rank %d: %s", t_comm.rank, sm_strerror(st));
        return 0;
    }
    CHECK(st == SM_ERR_INVALID_ARG && strstr(err.msg, "997") && strstr(err.msg, "position 1"), "%s", err.msg);
    CHECK(x.unique == NULL && x.send_count == NULL, "a failed plan kept its buffers");
    return 0;
}

/* ---- data parallelism: gradients summed over the ranks ---- */

/* Rank r's gradient of table row `row`, element j (integers: exact sums). */
static float t_table_grad(int r, int row, int j) { return (float)(100 * (r + 1) + row + j); }
static int t_rank_touches(int r, int row) { return row == r || row == 5 || row == 10 + r; }

/* A dense tensor, a 20 x 3 table between two dense ones: rank r touches
 * rows r, 5 and 10 + r. After the all-reduce every rank holds the scaled
 * sums, and the union of the touched rows, sorted. */
static int test_params_allreduce_grads_sums_dense_and_touched_rows(void) {
    sm_params p;
    sm_row_set rows;
    size_t off_a, off_t, off_b, i;
    int S = t_comm.size, me = t_comm.rank, r, row, j, n_union = 0;
    sm_status st;
    memset(&p, 0, sizeof p);
    CHECK_OK(sm_row_set_init(&rows, 20, NULL));
    CHECK(sm_params_add_group(&p, sm_param_group_default("g", 0.1f), NULL) == 0, "group");
    off_a = sm_params_add_tensor(&p, "a", 10, 0, 0, NULL, NULL);
    off_t = sm_params_add_tensor(&p, "table", 60, 0, 3, &rows, NULL);
    off_b = sm_params_add_tensor(&p, "b", 4, 0, 0, NULL, NULL);
    CHECK_OK(sm_params_alloc(&p, NULL));
    for (i = 0; i < 10; i++) p.grad[off_a + i] = (float)(me + 1 + (int)i);
    for (i = 0; i < 4; i++) p.grad[off_b + i] = (float)(me * 2);
    for (row = 19; row >= 0; row--) /* added out of order: the union is sorted */
        if (t_rank_touches(me, row)) {
            sm_row_set_add(&rows, (size_t)row);
            for (j = 0; j < 3; j++) p.grad[off_t + (size_t)row * 3 + (size_t)j] = t_table_grad(me, row, j);
        }
    st = sm_params_allreduce_grads(&p, &t_comm, 0.5f, NULL);
    CHECK(st == SM_OK, "allreduce_grads -> %s", sm_strerror(st));
    for (i = 0; i < 10; i++) {
        float want = 0;
        for (r = 0; r < S; r++) want += 0.5f * (float)(r + 1 + (int)i);
        CHECK(p.grad[off_a + i] == want, "a[%zu] = %g, want %g", i, p.grad[off_a + i], want);
    }
    CHECK(p.grad[off_b + 3] == 0.5f * (float)(S * (S - 1)), "b[3] = %g, want %g", p.grad[off_b + 3],
          0.5f * (float)(S * (S - 1)));
    for (row = 0; row < 20; row++) {
        int any = 0;
        for (r = 0; r < S; r++) any |= t_rank_touches(r, row);
        n_union += any;
        CHECK(!rows.mark[row] == !any, "row %d marked %d, touched by some rank %d", row, rows.mark[row], any);
        for (j = 0; j < 3; j++) {
            float want = 0;
            for (r = 0; r < S; r++)
                if (t_rank_touches(r, row)) want += 0.5f * t_table_grad(r, row, j);
            CHECK(p.grad[off_t + (size_t)row * 3 + (size_t)j] == want, "table[%d][%d] = %g, want %g", row, j,
                  p.grad[off_t + (size_t)row * 3 + (size_t)j], want);
        }
    }
    CHECK(rows.count == (size_t)n_union, "%zu touched rows, want %d", rows.count, n_union);
    for (i = 1; S > 1 && i < rows.count; i++) CHECK(rows.rows[i - 1] < rows.rows[i], "touched rows not sorted");
    sm_params_free(&p);
    sm_row_set_free(&rows);
    return 0;
}

#define COMM_TESTS                                                                                 \
    T(test_comm_ranks_distinct), T(test_comm_allreduce_sums_every_rank),                           \
        T(test_comm_broadcast_from_last_rank), T(test_comm_allgatherv_uneven_blocks),              \
        T(test_comm_alltoallv_blocks_in_rank_order), T(test_comm_check_same_names_the_rank),       \
        T(test_row_owner_partitions_the_table), T(test_row_exchange_fetch_returns_each_position_its_row), \
        T(test_row_exchange_push_sums_gradients_at_the_owner),                                     \
        T(test_row_exchange_refuses_ids_outside_the_table),                                        \
        T(test_params_allreduce_grads_sums_dense_and_touched_rows)
#endif
