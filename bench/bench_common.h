/* bench_common.h - what the CPU and GPU benches share. */
#ifndef SM_BENCH_COMMON_H
#define SM_BENCH_COMMON_H
#include <math.h>
#include <stdlib.h>

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median of times[0..n) (sorts them). */
static double median_of(double *times, int n) {
    qsort(times, (size_t)n, sizeof(double), cmp_double);
    return times[n / 2];
}

/* Token ids with Zipf(1.1) frequencies over the vocabulary (inverse CDF),
 * so n-grams repeat as in text. */
static void zipf_tokens(int *out, size_t n, int V, sm_rng *r) {
    double *cdf = (double *)malloc(sizeof(double) * V), z = 0;
    size_t i;
    int v;
    for (v = 0; v < V; v++) z += pow(v + 1, -1.1), cdf[v] = z;
    for (i = 0; i < n; i++) {
        double u = sm_rng_uniform(r) * z;
        int lo = 0, hi = V - 1;
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (cdf[mid] < u) lo = mid + 1;
            else hi = mid;
        }
        out[i] = lo;
    }
    free(cdf);
}
#endif
