/* examples/plot_csv.c - a line chart of CSV columns, with sparsemem_plot.h alone.
 *
 *   plot_csv DATA.csv X_COLUMN "Y_COLUMN[=legend name],..." OUT.png [TITLE [X_LABEL [Y_LABEL]]]
 *
 * For example, the training loss a run logs per step:
 *
 *   cc -O2 -I. examples/plot_csv.c -o plot_csv -lm
 *   ./plot_csv runs/r/steps.csv step "loss=training loss" loss.png "Loss" "step" "loss (nats/token)"
 *
 * The file needs a header row; the chart has one line per Y column. */
#define SPARSEMEM_PLOT_IMPLEMENTATION
#include "sparsemem_plot.h"

#include <stdio.h>

int main(int argc, char **argv) {
    smp_csv t;
    smp_series se[SMP_MAX_SERIES];
    smp_line_spec sp = {0};
    char err[SMP_ERR_SIZE];
    int n, rc;
    if (argc < 5) {
        fprintf(stderr, "usage: %s DATA.csv X_COLUMN \"Y[=name],...\" OUT.png [TITLE [X_LABEL [Y_LABEL]]]\n",
                argv[0]);
        return 1;
    }
    if (smp_csv_read(&t, argv[1], err)) return fprintf(stderr, "%s\n", err), 1;
    n = smp_csv_series(&t, argv[2], argv[3], se, SMP_MAX_SERIES, err);
    if (n <= 0) {
        fprintf(stderr, "%s\n", n < 0 ? err : "no Y columns given");
        smp_csv_free(&t);
        return 1;
    }
    sp.series = se, sp.n_series = n;
    sp.title = argc > 5 ? argv[5] : argv[1];
    sp.xlabel = argc > 6 ? argv[6] : argv[2];
    sp.ylabel = argc > 7 ? argv[7] : NULL;
    rc = smp_line_chart(&sp, argv[4], err);
    if (rc) fprintf(stderr, "%s\n", err);
    else printf("wrote %s: %d series, %d points each\n", argv[4], n, t.n_rows);
    smp_csv_series_free(se, n);
    smp_csv_free(&t);
    return rc;
}
