/* bench_common.h - what the CPU and GPU benches share. */
#ifndef SM_BENCH_COMMON_H
#define SM_BENCH_COMMON_H
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static inline int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median of times[0..n) (sorts them). */
static inline double median_of(double *times, int n) {
    qsort(times, (size_t)n, sizeof(double), cmp_double);
    return times[n / 2];
}

/* The processor's name from /proc/cpuinfo ("model name"), or "unknown". */
static inline void cpu_model(char *out, size_t n) {
    char line[512];
    FILE *f = fopen("/proc/cpuinfo", "r");
    snprintf(out, n, "unknown");
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        char *colon = strchr(line, ':');
        if (strncmp(line, "model name", 10) != 0 || !colon) continue;
        colon += 1 + strspn(colon + 1, " \t");
        colon[strcspn(colon, "\n")] = 0;
        snprintf(out, n, "%s", colon);
        break;
    }
    fclose(f);
}

/* Seconds of one CPU training step as the trainer takes it: zero the
 * gradients, forward, backward, clipped AdamW. */
static inline double train_step(sm_model *m, const int *in, const int *tg, int B) {
    double t = sm_now();
    sm_params_zero_grad(&m->params);
    sm_model_forward(m, in, tg, NULL, B, m->cfg.seq_len, NULL);
    sm_model_backward(m);
    sm_params_adamw_step(&m->params, 1.0f, sm_clip_scale(sm_params_grad_norm(&m->params), 1.0f));
    return sm_now() - t;
}

/* Token ids with Zipf(1.1) frequencies over the vocabulary (inverse CDF),
 * so n-grams repeat as in text. */
static inline void zipf_tokens(int *out, size_t n, int V, sm_rng *r) {
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
