/* sparsemem_plot.h - PNG charts from plain float arrays (or CSV files), in one header.  v0.1.0
 *
 * What it is
 *   Line charts (several series, NaN gaps, log x and/or y axes, shaded
 *   min-max or +-std bands, a legend in the emptiest corner), grouped bar
 *   charts (value labels, a reference line), heatmaps (viridis with a colour
 *   bar) and multi-panel grids, drawn on an RGB raster with anti-aliased lines
 *   and text and written as PNG; a small CSV reader and the helpers a
 *   training-log plot needs (moving average, mean and band over runs).
 *   Part of sparsemem (the trainer draws its diagnostics with it) but needs
 *   nothing from sparsemem.h: only the Debian libstb-dev headers
 *   <stb/stb_image_write.h> and <stb/stb_easy_font.h>.
 *
 * How to use it
 *   In exactly ONE C or C++ file:
 *       #define SPARSEMEM_PLOT_IMPLEMENTATION
 *       #include "sparsemem_plot.h"
 *   Everywhere else just #include "sparsemem_plot.h" (declarations only).
 *
 *   Quick start, CSV -> PNG (examples/plot_csv.c is the full program):
 *       smp_csv t;
 *       smp_series s = {0};
 *       smp_line_spec sp = {0};
 *       char err[SMP_ERR_SIZE];
 *       if (smp_csv_read(&t, "log.csv", err)) return puts(err), 1;
 *       s.name = "training loss", s.n = t.n_rows;
 *       s.x = smp_csv_column(&t, "step"), s.y = smp_csv_column(&t, "loss");
 *       sp.title = "Loss", sp.xlabel = "step", sp.ylabel = "loss (nats/token)";
 *       sp.series = &s, sp.n_series = 1;
 *       if (smp_line_chart(&sp, "loss.png", err)) puts(err);
 *       smp_free((void *)s.x), smp_free((void *)s.y), smp_csv_free(&t);
 *
 *   Optional, before the include that carries the implementation:
 *       #define SMPDEF static          make every function file-local
 *       #define SMP_MALLOC(sz) ...     custom allocator; define all three of
 *       #define SMP_REALLOC(p,sz) ...  SMP_MALLOC/SMP_REALLOC/SMP_FREE or none
 *       #define SMP_FREE(p) ...
 *       #define SMP_NO_STB_IMPL        stb_image_write's implementation lives in
 *                                      another file (by default it is compiled
 *                                      here; do not define
 *                                      STB_IMAGE_WRITE_IMPLEMENTATION yourself)
 *
 * Conventions
 *   - Colours are 0xRRGGBB. Functions that can fail return 0 on success,
 *     non-zero on failure with a message in errbuf (SMP_ERR_SIZE bytes, may
 *     be NULL). No global state.
 *   - Chart specs are meant to be zero-initialised: a 0 field means its
 *     default.
 *   - Canvas coordinates are pixels, x right, y down; pixel (i, j) covers
 *     [i, i+1) x [j, j+1). Text is stb_easy_font's segment font scaled up
 *     (scale 2: capitals 14 px tall); a title too wide for its panel is drawn
 *     smaller, then cut with "..".
 *
 * Table of contents (declarations first, then the implementation)
 *   1. Raster      smp_canvas_init/free, smp_fill, smp_clip/smp_clip_reset,
 *                  smp_fill_rect, smp_rect, smp_line, smp_polyline,
 *                  smp_dashed_hline, smp_text, smp_text_ex (anchored,
 *                  optionally rotated), smp_text_width, smp_get_pixel,
 *                  smp_write_png; colours: smp_palette, smp_viridis
 *   2. Charts      to a PNG file, or into a panel of a canvas (_draw forms):
 *                  smp_line_chart(spec, path, err)  smp_line_chart_draw(canvas, x, y, w, h, spec, err)
 *                  smp_bar_chart(...)               smp_bar_chart_draw(...)
 *                  smp_heatmap(...)                 smp_heatmap_draw(...)
 *                  smp_grid(panels, n, cols, panel_w, panel_h, title, path, err)
 *   3. Data        smp_csv_read/free, smp_csv_col, smp_csv_at,
 *                  smp_csv_column, smp_csv_series ("col=legend,...");
 *                  smp_moving_average, smp_band_over_runs;
 *                  smp_free for the arrays this header allocates
 *
 * License: MIT or public domain (Unlicense), at your choice, as sparsemem.h.
 */
#ifndef SPARSEMEM_PLOT_H
#define SPARSEMEM_PLOT_H

#define SMP_VERSION_MAJOR 0
#define SMP_VERSION_MINOR 1
#define SMP_VERSION_PATCH 0

#ifndef SMPDEF
#define SMPDEF extern
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define SMP_ERR_SIZE 256
#define SMP_MAX_SERIES 32
#define SMP_DEFAULT_W 960
#define SMP_DEFAULT_H 600
#define SMP_MIN_DIM 160 /* smallest chart panel, either side */
#define SMP_MAX_DIM 16384
#define SMP_WHITE 0xFFFFFFu

/* ===================================================================== */
/* 1. Raster                                                             */
/* ===================================================================== */

typedef unsigned smp_color; /* 0xRRGGBB */

typedef struct {
    int w, h;
    unsigned char *px;      /* w*h*3 bytes RGB, top row first */
    float *cover;           /* w*h scratch coverage for anti-aliased shapes */
    int cx0, cy0, cx1, cy1; /* clip rectangle [cx0,cx1) x [cy0,cy1) */
} smp_canvas;

SMPDEF int smp_canvas_init(smp_canvas *c, int w, int h, smp_color bg, char *errbuf);
SMPDEF void smp_canvas_free(smp_canvas *c);
SMPDEF void smp_fill(smp_canvas *c, smp_color col);
/* Restrict drawing to [x0,x1) x [y0,y1) (intersected with the canvas). */
SMPDEF void smp_clip(smp_canvas *c, int x0, int y0, int x1, int y1);
SMPDEF void smp_clip_reset(smp_canvas *c);
SMPDEF smp_color smp_get_pixel(const smp_canvas *c, int x, int y);
/* Filled rectangle [x0,x1) x [y0,y1); fractional edges are anti-aliased. */
SMPDEF void smp_fill_rect(smp_canvas *c, double x0, double y0, double x1, double y1, smp_color col);
/* Outline of the rectangle [x0,x1) x [y0,y1), `thick` px wide, inside it. */
SMPDEF void smp_rect(smp_canvas *c, double x0, double y0, double x1, double y1, double thick,
                     smp_color col);
/* Anti-aliased polyline, `width` px wide, round joins; a non-finite point
 * breaks it; marker_r > 0 puts a disc on every point. */
SMPDEF void smp_polyline(smp_canvas *c, const double *xs, const double *ys, int n, double width,
                         double marker_r, smp_color col);
SMPDEF void smp_line(smp_canvas *c, double x0, double y0, double x1, double y1, double width,
                     smp_color col);
SMPDEF void smp_dashed_hline(smp_canvas *c, double x0, double x1, double y, double width,
                             double dash, double gap, smp_color col);
/* Width in px of the drawn text at `scale`. */
SMPDEF double smp_text_width(const char *text, double scale);
/* Text with its top-left at (x, y). */
SMPDEF void smp_text(smp_canvas *c, double x, double y, const char *text, double scale,
                     smp_color col);
/* Text anchored at (x, y): (ax, ay) are fractions of its box (0 left/top,
 * 1 right/bottom); `up` rotates it to read bottom to top. */
SMPDEF void smp_text_ex(smp_canvas *c, double x, double y, const char *text, double scale,
                        smp_color col, double ax, double ay, int up);
/* Write the canvas as an RGB PNG; a failed write leaves no partial file. */
SMPDEF int smp_write_png(const smp_canvas *c, const char *path, char *errbuf);
/* Okabe & Ito's colour-blind-safe palette (8 colours, cycling). */
SMPDEF smp_color smp_palette(int i);
/* Viridis at t in [0, 1] (clamped; NaN maps to 0). */
SMPDEF smp_color smp_viridis(double t);

/* ===================================================================== */
/* 2. Charts                                                             */
/* ===================================================================== */

typedef struct {
    const char *name;  /* legend entry; NULL: not in the legend */
    const float *x;    /* n x values, or NULL for 0, 1, ..., n-1 */
    const float *y;    /* n y values; NaN/inf (and values <= 0 on a log axis) leave gaps */
    int n;
    smp_color color;   /* 0: palette colour of the series index */
    const float *y_lo, *y_hi; /* optional: a band shaded from y_lo to y_hi (both or neither) */
} smp_series;

typedef struct {
    const char *title, *xlabel, *ylabel;
    const smp_series *series;
    int n_series;          /* 1..SMP_MAX_SERIES */
    int log_x, log_y;      /* log10 axes */
    int fixed_x, fixed_y;  /* 1: use xmin..xmax / ymin..ymax instead of the data range */
    double xmin, xmax, ymin, ymax;
    int has_ref;           /* 1: dashed horizontal reference line at ref_y */
    double ref_y;
    const char *ref_label; /* text over the reference line (may be NULL) */
    int width, height;     /* image size for smp_line_chart; 0: 960 x 600 */
    float line_width;      /* px; 0: 2.5 */
    float text_scale;      /* 0: 2 (capitals 14 px tall) */
    int markers;           /* 0: markers when a series has <= 40 points; 1: always; -1: never */
} smp_line_spec;

typedef struct {
    const char *name;     /* legend entry; NULL: not in the legend */
    const float *values;  /* one per category; NaN: no bar */
    smp_color color;      /* 0: palette colour of the series index */
} smp_bar_series;

typedef struct {
    const char *title, *xlabel, *ylabel;
    const char *const *categories; /* n_categories labels; NULL: 0, 1, ... */
    int n_categories;
    const smp_bar_series *series;  /* bars side by side in each category */
    int n_series;                  /* 1..SMP_MAX_SERIES */
    int value_labels;              /* 1: print each value over its bar when it fits */
    int fixed_y;
    double ymin, ymax;
    int has_ref;
    double ref_y;
    const char *ref_label;
    int width, height;
    float text_scale;
} smp_bar_spec;

typedef struct {
    const char *title, *xlabel, *ylabel;
    const char *value_label;        /* colour bar label (may be NULL) */
    const float *values;            /* rows x cols, row-major; NaN: grey cell */
    int rows, cols;
    const char *const *row_labels;  /* NULL: 0, 1, ... */
    const char *const *col_labels;
    int annotate;                   /* 1: print values in cells big enough */
    int fixed_range;                /* 1: colour range vmin..vmax, else the data range */
    double vmin, vmax;
    int width, height;
    float text_scale;
} smp_heatmap_spec;

/* One panel of a grid: exactly one of the three is non-NULL. */
typedef struct {
    const smp_line_spec *line;
    const smp_bar_spec *bar;
    const smp_heatmap_spec *heatmap;
} smp_panel;

/* A chart as a PNG of the spec's size (0: SMP_DEFAULT_W x SMP_DEFAULT_H). */
SMPDEF int smp_line_chart(const smp_line_spec *sp, const char *png_path, char *errbuf);
SMPDEF int smp_bar_chart(const smp_bar_spec *sp, const char *png_path, char *errbuf);
SMPDEF int smp_heatmap(const smp_heatmap_spec *sp, const char *png_path, char *errbuf);
/* A chart into the panel [x, x+w) x [y, y+h) of a canvas. */
SMPDEF int smp_line_chart_draw(smp_canvas *c, int x, int y, int w, int h, const smp_line_spec *sp,
                               char *errbuf);
SMPDEF int smp_bar_chart_draw(smp_canvas *c, int x, int y, int w, int h, const smp_bar_spec *sp,
                              char *errbuf);
SMPDEF int smp_heatmap_draw(smp_canvas *c, int x, int y, int w, int h, const smp_heatmap_spec *sp,
                            char *errbuf);
/* Panels in a grid of `cols` columns, each panel_w x panel_h, under an
 * optional title; each panel's own width/height are ignored. */
SMPDEF int smp_grid(const smp_panel *panels, int n, int cols, int panel_w, int panel_h,
                    const char *title, const char *png_path, char *errbuf);

/* ===================================================================== */
/* 3. Data                                                               */
/* ===================================================================== */

#define SMP_CSV_MAX_COLS 64
#define SMP_CSV_NAME 32    /* longest column name kept, bytes with the NUL */
#define SMP_CSV_LINE 8192  /* longest line read, bytes */

/* A CSV file with a header row: named columns of numbers (a cell that is
 * not a number reads as NaN). */
typedef struct {
    char names[SMP_CSV_MAX_COLS][SMP_CSV_NAME];
    int n_cols, n_rows;
    float *v; /* [n_rows][n_cols], row-major */
} smp_csv;

SMPDEF int smp_csv_read(smp_csv *t, const char *path, char *errbuf);
SMPDEF void smp_csv_free(smp_csv *t);
/* Index of the column `name`, or -1. */
SMPDEF int smp_csv_col(const smp_csv *t, const char *name);
/* The value at (row, col); NaN when either is out of range. */
SMPDEF float smp_csv_at(const smp_csv *t, int row, int col);
/* Column `name` as a new array of n_rows floats (all NaN when the column is
 * missing); NULL when out of memory. Free with smp_free. */
SMPDEF float *smp_csv_column(const smp_csv *t, const char *name);
/* Releases what this header allocated for the caller (SMP_FREE). */
SMPDEF void smp_free(void *p);
/* Line series from CSV columns: y_cols is "col[=legend name],...", the
 * legend being the column's name where no "=name" is given; x_col NULL:
 * the row index. Up to `max` series get their own x, y and name (free them
 * with smp_csv_series_free). Returns the number made, or -1 (errbuf says
 * which column is missing, or out of memory; nothing is left allocated). */
SMPDEF int smp_csv_series(const smp_csv *t, const char *x_col, const char *y_cols, smp_series *se,
                          int max, char *errbuf);
SMPDEF void smp_csv_series_free(smp_series *se, int n);

/* out[i] = mean of the finite y[j] with |j - i| <= half (NaN when none):
 * a centred moving average, so a smoothed curve does not lag the data. */
SMPDEF void smp_moving_average(const float *y, int n, int half, float *out);
/* Over k runs ys[0..k) of n points each, per point: the mean of the finite
 * values, and lo/hi = their min and max (NaN where no run is finite). lo
 * and hi may be NULL. */
SMPDEF void smp_band_over_runs(const float *const *ys, int k, int n, float *mean, float *lo,
                               float *hi);

#ifdef __cplusplus
}
#endif

#endif /* SPARSEMEM_PLOT_H */

/* ===================================================================== */
/* Implementation                                                        */
/* ===================================================================== */

#ifdef SPARSEMEM_PLOT_IMPLEMENTATION
#ifndef SPARSEMEM_PLOT_IMPLEMENTATION_DONE
#define SPARSEMEM_PLOT_IMPLEMENTATION_DONE

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(SMP_MALLOC) && defined(SMP_REALLOC) && defined(SMP_FREE)
/* all three given */
#elif !defined(SMP_MALLOC) && !defined(SMP_REALLOC) && !defined(SMP_FREE)
#define SMP_MALLOC(sz) malloc(sz)
#define SMP_REALLOC(p, sz) realloc(p, sz)
#define SMP_FREE(p) free(p)
#else
#error "Define all of SMP_MALLOC, SMP_REALLOC and SMP_FREE, or none of them."
#endif

#ifndef SMP_NO_STB_IMPL
#define STB_IMAGE_WRITE_IMPLEMENTATION
#endif
#include <stb/stb_image_write.h>
#include <stb/stb_easy_font.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SMP__TEXT 0x222222u
#define SMP__AXIS 0x444444u
#define SMP__GRID 0xE2E2E2u
#define SMP__GRID_MINOR 0xF2F2F2u
#define SMP__REF 0x555555u
#define SMP__MISSING 0xCCCCCCu
#define SMP__CAP 7.0  /* stb_easy_font capital height, font units */
#define SMP__DESC 2.0 /* descender depth below the baseline, font units */
#define SMP__MAX_TICKS 32
#define SMP__LABEL 128 /* longest label kept, bytes */

typedef struct {
    int x0, y0, x1, y1;
} smp__box;

typedef struct {
    double lo, hi; /* shown range; log10 of the data on a log axis */
    int log;
    double p0, p1; /* pixel coordinates of lo and hi */
} smp__axis;

typedef struct {
    int n, n_minor;
    double v[SMP__MAX_TICKS];
    char label[SMP__MAX_TICKS][24];
    double minor[SMP__MAX_TICKS * 8];
} smp__ticks;


static int smp__fail(char *errbuf, const char *fmt, ...) {
    if (errbuf) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(errbuf, SMP_ERR_SIZE, fmt, ap);
        va_end(ap);
    }
    return 1;
}

/* floor/ceil of v as an int clamped to [lo, hi] (safe for huge v). */
static int smp__clampi(double v, int lo, int hi) {
    if (!(v > lo)) return lo;
    if (v > hi) return hi;
    return (int)v;
}

static smp__box smp__mkbox(int x0, int y0, int x1, int y1) {
    smp__box b;
    b.x0 = x0;
    b.y0 = y0;
    b.x1 = x1;
    b.y1 = y1;
    return b;
}

/* Okabe & Ito's colour-blind-safe palette, yellow last (weak on white). */
SMPDEF smp_color smp_palette(int i) {
    static const smp_color pal[8] = {0x0072B2, 0xD55E00, 0x009E73, 0xE69F00,
                                      0xCC79A7, 0x56B4E9, 0x000000, 0xF0E442};
    return pal[((i % 8) + 8) % 8];
}

/* Viridis (matplotlib's perceptual map) sampled at t = 0, 0.1, ..., 1 and
 * linearly interpolated; t is clamped to [0, 1], NaN maps to 0. */
SMPDEF smp_color smp_viridis(double t) {
    static const unsigned char tab[11][3] = {
        {68, 1, 84},    {72, 36, 117},  {65, 68, 135},  {53, 95, 141},
        {42, 120, 142}, {33, 145, 140}, {34, 168, 132}, {68, 191, 112},
        {122, 209, 81}, {189, 223, 38}, {253, 231, 37}};
    double f, w;
    int i, k;
    smp_color c = 0;
    if (!(t > 0)) t = 0;
    if (t > 1) t = 1;
    f = t * 10.0;
    i = f >= 10.0 ? 9 : (int)f;
    w = f - i;
    for (k = 0; k < 3; k++) {
        double v = tab[i][k] + (tab[i + 1][k] - tab[i][k]) * w;
        c = (c << 8) | (smp_color)(v + 0.5);
    }
    return c;
}

/* ---- canvas ------------------------------------------------------------ */

SMPDEF void smp_clip_reset(smp_canvas *c) {
    c->cx0 = 0;
    c->cy0 = 0;
    c->cx1 = c->w;
    c->cy1 = c->h;
}

/* Restrict drawing to [x0,x1) x [y0,y1) (intersected with the canvas). */
SMPDEF void smp_clip(smp_canvas *c, int x0, int y0, int x1, int y1) {
    c->cx0 = x0 < 0 ? 0 : x0;
    c->cy0 = y0 < 0 ? 0 : y0;
    c->cx1 = x1 > c->w ? c->w : x1;
    c->cy1 = y1 > c->h ? c->h : y1;
}

SMPDEF void smp_fill(smp_canvas *c, smp_color col) {
    size_t i, n = (size_t)c->w * c->h;
    for (i = 0; i < n; i++) {
        c->px[3 * i + 0] = (unsigned char)(col >> 16);
        c->px[3 * i + 1] = (unsigned char)(col >> 8);
        c->px[3 * i + 2] = (unsigned char)col;
    }
}

SMPDEF void smp_canvas_free(smp_canvas *c) {
    SMP_FREE(c->px);
    SMP_FREE(c->cover);
    c->px = NULL;
    c->cover = NULL;
    c->w = c->h = 0;
}

SMPDEF int smp_canvas_init(smp_canvas *c, int w, int h, smp_color bg, char *errbuf) {
    memset(c, 0, sizeof *c);
    if (w < 1 || w > SMP_MAX_DIM)
        return smp__fail(errbuf, "smp_canvas_init: width %d out of range [1, %d]", w, SMP_MAX_DIM);
    if (h < 1 || h > SMP_MAX_DIM)
        return smp__fail(errbuf, "smp_canvas_init: height %d out of range [1, %d]", h, SMP_MAX_DIM);
    c->px = (unsigned char *)SMP_MALLOC((size_t)w * h * 3);
    c->cover = (float *)SMP_MALLOC((size_t)w * h * sizeof(float));
    if (!c->px || !c->cover) {
        smp_canvas_free(c);
        return smp__fail(errbuf, "smp_canvas_init: out of memory for %d x %d", w, h);
    }
    c->w = w;
    c->h = h;
    smp_clip_reset(c);
    smp_fill(c, bg);
    return 0;
}

SMPDEF smp_color smp_get_pixel(const smp_canvas *c, int x, int y) {
    const unsigned char *p = c->px + ((size_t)y * c->w + x) * 3;
    return ((smp_color)p[0] << 16) | ((smp_color)p[1] << 8) | p[2];
}

/* pixel = pixel + (col - pixel) * a, inside the clip rectangle. */
static void smp__blend(smp_canvas *c, int x, int y, smp_color col, float a) {
    unsigned char *p;
    int k;
    if (x < c->cx0 || x >= c->cx1 || y < c->cy0 || y >= c->cy1 || !(a > 0)) return;
    if (a > 1) a = 1;
    p = c->px + ((size_t)y * c->w + x) * 3;
    for (k = 0; k < 3; k++) {
        float src = (float)((col >> (16 - 8 * k)) & 255u);
        p[k] = (unsigned char)(p[k] + (src - p[k]) * a + 0.5f);
    }
}

/* ---- anti-aliased coverage ----------------------------------------------
 * Shapes are drawn in three steps: clear the coverage of a region, take the
 * max coverage of every piece (rectangles, capsules) so overlapping pieces of
 * one shape do not darken their joints, then blend the colour by coverage. */

static smp__box smp__cover_begin(smp_canvas *c, double x0, double y0, double x1, double y1) {
    smp__box b;
    int y;
    b.x0 = smp__clampi(floor(x0), c->cx0, c->cx1);
    b.x1 = smp__clampi(ceil(x1), b.x0, c->cx1);
    b.y0 = smp__clampi(floor(y0), c->cy0, c->cy1);
    b.y1 = smp__clampi(ceil(y1), b.y0, c->cy1);
    for (y = b.y0; y < b.y1; y++)
        memset(c->cover + (size_t)y * c->w + b.x0, 0, (size_t)(b.x1 - b.x0) * sizeof(float));
    return b;
}

static void smp__cover_max(smp_canvas *c, int x, int y, double a) {
    float *p = c->cover + (size_t)y * c->w + x;
    if (a > *p) *p = (float)(a > 1 ? 1 : a);
}

/* Length of [i, i+1) inside [a, b). */
static double smp__overlap(int i, double a, double b) {
    double lo = a > i ? a : i, hi = b < i + 1 ? b : i + 1;
    return hi > lo ? hi - lo : 0;
}

/* Exact area coverage of the rectangle [x0,x1) x [y0,y1). */
static void smp__cover_rect(smp_canvas *c, smp__box b, double x0, double y0, double x1, double y1) {
    int i, j, i0 = smp__clampi(floor(x0), b.x0, b.x1), i1 = smp__clampi(ceil(x1), b.x0, b.x1);
    int j0 = smp__clampi(floor(y0), b.y0, b.y1), j1 = smp__clampi(ceil(y1), b.y0, b.y1);
    for (j = j0; j < j1; j++) {
        double fy = smp__overlap(j, y0, y1);
        for (i = i0; i < i1; i++) smp__cover_max(c, i, j, fy * smp__overlap(i, x0, x1));
    }
}

/* Capsule of radius r around segment (ax,ay)-(bx,by): coverage of a pixel is
 * r + 0.5 - distance(pixel centre, segment), clamped to [0, 1]. */
static void smp__cover_segment(smp_canvas *c, smp__box b, double ax, double ay, double bx,
                                 double by, double r) {
    double dx = bx - ax, dy = by - ay, len2 = dx * dx + dy * dy;
    int i, j;
    int i0 = smp__clampi(floor((ax < bx ? ax : bx) - r - 1), b.x0, b.x1);
    int i1 = smp__clampi(ceil((ax > bx ? ax : bx) + r + 1), b.x0, b.x1);
    int j0 = smp__clampi(floor((ay < by ? ay : by) - r - 1), b.y0, b.y1);
    int j1 = smp__clampi(ceil((ay > by ? ay : by) + r + 1), b.y0, b.y1);
    for (j = j0; j < j1; j++) {
        for (i = i0; i < i1; i++) {
            double px = i + 0.5 - ax, py = j + 0.5 - ay;
            double t = len2 > 0 ? (px * dx + py * dy) / len2 : 0, ex, ey;
            t = t < 0 ? 0 : t > 1 ? 1 : t;
            ex = px - t * dx;
            ey = py - t * dy;
            smp__cover_max(c, i, j, r + 0.5 - sqrt(ex * ex + ey * ey));
        }
    }
}

static void smp__cover_end(smp_canvas *c, smp__box b, smp_color col) {
    int i, j;
    for (j = b.y0; j < b.y1; j++)
        for (i = b.x0; i < b.x1; i++) smp__blend(c, i, j, col, c->cover[(size_t)j * c->w + i]);
}

/* ---- shapes ------------------------------------------------------------ */

/* Filled rectangle [x0,x1) x [y0,y1); fractional edges are anti-aliased. */
SMPDEF void smp_fill_rect(smp_canvas *c, double x0, double y0, double x1, double y1, smp_color col) {
    smp__box b;
    double t;
    if (x1 < x0) t = x0, x0 = x1, x1 = t;
    if (y1 < y0) t = y0, y0 = y1, y1 = t;
    b = smp__cover_begin(c, x0, y0, x1, y1);
    smp__cover_rect(c, b, x0, y0, x1, y1);
    smp__cover_end(c, b, col);
}

/* The rectangle [x0,x1) x [y0,y1) (y0 <= y1) blended over what is there
 * at opacity `alpha`, edges anti-aliased. */
static void smp__blend_rect(smp_canvas *c, double x0, double y0, double x1, double y1, smp_color col,
                            double alpha) {
    smp__box b = smp__cover_begin(c, x0, y0, x1, y1);
    int i, j;
    smp__cover_rect(c, b, x0, y0, x1, y1);
    for (j = b.y0; j < b.y1; j++)
        for (i = b.x0; i < b.x1; i++) smp__blend(c, i, j, col, (float)(alpha * c->cover[(size_t)j * c->w + i]));
}

/* Outline of the rectangle [x0,x1) x [y0,y1), `thick` px wide, inside it. */
SMPDEF void smp_rect(smp_canvas *c, double x0, double y0, double x1, double y1, double thick,
                       smp_color col) {
    smp_fill_rect(c, x0, y0, x1, y0 + thick, col);
    smp_fill_rect(c, x0, y1 - thick, x1, y1, col);
    smp_fill_rect(c, x0, y0 + thick, x0 + thick, y1 - thick, col);
    smp_fill_rect(c, x1 - thick, y0 + thick, x1, y1 - thick, col);
}

/* Anti-aliased polyline through (xs[i], ys[i]) with round joins, `width` px
 * wide. A non-finite point breaks the line; a point with no finite neighbour
 * becomes a dot. marker_r > 0 also puts a disc of that radius on every point. */
SMPDEF void smp_polyline(smp_canvas *c, const double *xs, const double *ys, int n, double width,
                           double marker_r, smp_color col) {
    double r = width / 2, dot = marker_r > r ? marker_r : r, bx0 = HUGE_VAL, by0 = HUGE_VAL;
    double bx1 = -HUGE_VAL, by1 = -HUGE_VAL;
    smp__box b;
    int i;
    for (i = 0; i < n; i++) {
        if (!isfinite(xs[i]) || !isfinite(ys[i])) continue;
        bx0 = xs[i] < bx0 ? xs[i] : bx0;
        bx1 = xs[i] > bx1 ? xs[i] : bx1;
        by0 = ys[i] < by0 ? ys[i] : by0;
        by1 = ys[i] > by1 ? ys[i] : by1;
    }
    if (bx0 > bx1) return;
    b = smp__cover_begin(c, bx0 - dot - 1, by0 - dot - 1, bx1 + dot + 1, by1 + dot + 1);
    for (i = 0; i < n; i++) {
        int ok = isfinite(xs[i]) && isfinite(ys[i]);
        int next = i + 1 < n && isfinite(xs[i + 1]) && isfinite(ys[i + 1]);
        int prev = i > 0 && isfinite(xs[i - 1]) && isfinite(ys[i - 1]);
        if (!ok) continue;
        if (next) smp__cover_segment(c, b, xs[i], ys[i], xs[i + 1], ys[i + 1], r);
        if (marker_r > 0 || (!next && !prev)) smp__cover_segment(c, b, xs[i], ys[i], xs[i], ys[i], dot);
    }
    smp__cover_end(c, b, col);
}

SMPDEF void smp_line(smp_canvas *c, double x0, double y0, double x1, double y1, double width,
                       smp_color col) {
    double xs[2], ys[2];
    xs[0] = x0;
    xs[1] = x1;
    ys[0] = y0;
    ys[1] = y1;
    smp_polyline(c, xs, ys, 2, width, 0, col);
}

/* Dashed horizontal line from x0 to x1 at height y (centre), `width` px thick. */
SMPDEF void smp_dashed_hline(smp_canvas *c, double x0, double x1, double y, double width,
                               double dash, double gap, smp_color col) {
    double x;
    for (x = x0; x < x1; x += dash + gap)
        smp_fill_rect(c, x, y - width / 2, x + dash < x1 ? x + dash : x1, y + width / 2, col);
}

/* ---- text ----------------------------------------------------------------
 * stb_easy_font builds each glyph from axis-aligned quads in font units
 * (capitals 7 high, advance ~6); they are scaled and rasterised with exact
 * area coverage, so any scale works and integer scales are crisp. */

static char smp__printable(char ch) {
    unsigned char u = (unsigned char)ch;
    return (u >= 32 && u < 127) ? ch : '?';
}

static int smp__advance(char ch) {
    char one[2];
    one[0] = smp__printable(ch);
    one[1] = 0;
    return stb_easy_font_width(one);
}

/* Width in px of the drawn text (the last glyph's trailing spacing excluded). */
SMPDEF double smp_text_width(const char *text, double scale) {
    int u = 0;
    if (!text || !*text) return 0;
    for (; *text; text++) u += smp__advance(*text);
    return (u - 1) * scale;
}

/* Cover the glyph quads of `text` with its top-left at (x, y); `up` rotates
 * it 90 degrees counter-clockwise (read bottom to top), (x, y) then being the
 * top-left of the rotated box. wu is the text width in font units. */
static void smp__cover_text(smp_canvas *c, smp__box b, double x, double y, const char *text,
                              double s, int up, double wu) {
    char one[2], vbuf[4096];
    double u = 0;
    int q, nq;
    for (; *text; text++) {
        one[0] = smp__printable(*text);
        one[1] = 0;
        nq = stb_easy_font_print(0, 0, one, NULL, vbuf, (int)sizeof vbuf);
        for (q = 0; q < nq; q++) { /* vertices 0 and 2 are opposite corners of the quad */
            float a[2], z[2];
            memcpy(a, vbuf + q * 64, sizeof a);
            memcpy(z, vbuf + q * 64 + 32, sizeof z);
            if (up)
                smp__cover_rect(c, b, x + a[1] * s, y + (wu - u - z[0]) * s, x + z[1] * s,
                                 y + (wu - u - a[0]) * s);
            else
                smp__cover_rect(c, b, x + (u + a[0]) * s, y + a[1] * s, x + (u + z[0]) * s,
                                 y + z[1] * s);
        }
        u += smp__advance(*text);
    }
}

/* Text anchored at (x, y): (ax, ay) are fractions of its box (0 left/top,
 * 0.5 centre, 1 right/bottom). The box is the text width by the capital height
 * (descenders hang below it); `up` draws it rotated to read bottom to top. */
SMPDEF void smp_text_ex(smp_canvas *c, double x, double y, const char *text, double scale,
                          smp_color col, double ax, double ay, int up) {
    double wu = smp_text_width(text, 1), bw = up ? SMP__CAP * scale : wu * scale;
    double bh = up ? wu * scale : SMP__CAP * scale;
    smp__box b;
    if (!text || !*text) return;
    x = floor(x - ax * bw + 0.5);
    y = floor(y - ay * bh + 0.5);
    b = smp__cover_begin(c, x - 1, y - 1, x + bw + SMP__DESC * scale + 1,
                          y + bh + SMP__DESC * scale + 1);
    smp__cover_text(c, b, x, y, text, scale, up, wu);
    smp__cover_end(c, b, col);
}

/* Pixels covered by horizontal anchored text, descenders and `pad` around included. */
static smp__box smp__text_box(double x, double y, const char *text, double scale, double ax,
                                 double ay, double pad) {
    double bw = smp_text_width(text, scale), x0 = floor(x - ax * bw + 0.5);
    double y0 = floor(y - ay * SMP__CAP * scale + 0.5);
    return smp__mkbox((int)floor(x0 - pad), (int)floor(y0 - pad), (int)ceil(x0 + bw + pad),
                       (int)ceil(y0 + (SMP__CAP + SMP__DESC) * scale + pad));
}

/* Horizontal anchored text on a white box, readable over lines and grid. */
static void smp__text_on_white(smp_canvas *c, double x, double y, const char *text, double scale,
                                 smp_color col, double ax, double ay) {
    smp__box b = smp__text_box(x, y, text, scale, ax, ay, scale + 1);
    if (!text || !*text) return;
    smp_fill_rect(c, b.x0, b.y0, b.x1, b.y1, SMP_WHITE);
    smp_text_ex(c, x, y, text, scale, col, ax, ay, 0);
}

SMPDEF void smp_text(smp_canvas *c, double x, double y, const char *text, double scale,
                       smp_color col) {
    smp_text_ex(c, x, y, text, scale, col, 0, 0, 0);
}

/* Copy src to dst (SMP__LABEL bytes), cut with ".." to fit max_px. */
static void smp__fit_text(char *dst, const char *src, double max_px, double s) {
    int n;
    snprintf(dst, SMP__LABEL, "%s", src ? src : "");
    for (n = (int)strlen(dst); n > 0 && smp_text_width(dst, s) > max_px; n--)
        snprintf(dst, SMP__LABEL, "%.*s..", n - 1, src);
}

/* ---- numbers and ticks ---------------------------------------------------- */

/* Decimals needed to print multiples of step (a 1-2-5 value). */
static int smp__decimals(double step) {
    int d = (int)ceil(-log10(step) - 1e-6);
    return d < 0 ? 0 : d > 6 ? 6 : d;
}

/* v printed to the resolution of step; scientific when |v| >= 1e6 or < 1e-3. */
static void smp__fmt_value(char *buf, size_t cap, double v, double step) {
    double a = fabs(v);
    if (a < 1e-9 * step) v = a = 0; /* no "-0.0" from rounding */
    if (a == 0 && step < 1e-3) {
        snprintf(buf, cap, "0"); /* beside scientific neighbours */
    } else if (a != 0 && (a >= 1e6 || a < 1e-3)) {
        int e = (int)floor(log10(a));
        double p = pow(10.0, e);
        snprintf(buf, cap, "%.*fe%d", smp__decimals(step / p), v / p, e);
    } else {
        snprintf(buf, cap, "%.*f", smp__decimals(step), v);
    }
}

/* v to about `sig` significant digits. */
static void smp__fmt_sig(char *buf, size_t cap, double v, int sig) {
    double a = fabs(v);
    size_t n;
    smp__fmt_value(buf, cap, v, a > 0 ? pow(10.0, floor(log10(a)) - (sig - 1)) : 1);
    if (!strchr(buf, '.') || strchr(buf, 'e')) return;
    for (n = strlen(buf); buf[n - 1] == '0'; n--) buf[n - 1] = 0; /* 0.810 -> 0.81 */
    if (buf[n - 1] == '.') buf[n - 1] = 0;
}

/* 1-2-5 step giving about `target` intervals over span. */
static double smp__nice_step(double span, int target) {
    double raw = span / (target > 0 ? target : 1), mag = pow(10.0, floor(log10(raw))), f = raw / mag;
    return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
}

/* Multiples of a 1-2-5 step in [lo, hi]. Labels share a suffix: k or M when
 * the largest |tick| is 1e4..1e10 (20000 prints as 20k), a common exponent
 * when it is smaller than 1e-3 or larger (-9.5e-7 prints as -0.95e-6). */
static void smp__ticks_linear(smp__ticks *t, double lo, double hi, int target) {
    double step = smp__nice_step(hi - lo, target), maxabs = 0, unit = 1;
    char suffix[8] = "";
    int i;
    double k;
    t->n = t->n_minor = 0;
    for (k = ceil(lo / step - 1e-9); t->n < SMP__MAX_TICKS && k * step <= hi + 1e-9 * step; k++) {
        t->v[t->n++] = k * step;
        maxabs = fabs(k * step) > maxabs ? fabs(k * step) : maxabs;
    }
    if (maxabs >= 1e4 && maxabs < 1e7) {
        unit = 1e3;
        strcpy(suffix, "k");
    } else if (maxabs >= 1e7 && maxabs < 1e10) {
        unit = 1e6;
        strcpy(suffix, "M");
    } else if (maxabs > 0 && (maxabs < 1e-3 || maxabs >= 1e10)) {
        int e = (int)floor(log10(maxabs));
        unit = pow(10.0, e);
        snprintf(suffix, sizeof suffix, "e%d", e);
    }
    for (i = 0; i < t->n; i++) {
        char num[16];
        smp__fmt_value(num, sizeof num, t->v[i] / unit, step / unit);
        snprintf(t->label[i], sizeof t->label[i], "%s%s", num, t->v[i] != 0 ? suffix : "");
    }
}

/* A log axis tick's label: 20000 as "20k", 1e6 as "1M",
 * tiny and huge values in scientific notation. */
static void smp__fmt_log_tick(char *buf, size_t cap, double v) {
    if (v >= 1e4 && v < 1e6) snprintf(buf, cap, "%gk", v / 1e3);
    else if (v >= 1e6 && v < 1e10) snprintf(buf, cap, "%gM", v / 1e6);
    else smp__fmt_value(buf, cap, v, v);
}

/* Ticks for a log10 axis showing [lo, hi] (in log10 units): linear ticks when
 * it spans under a decade, 1-2-5 per decade under 2.5 decades, otherwise every
 * k-th decade, with minor ticks at 2..9 x 10^d when every decade is labelled. */
static void smp__ticks_log(smp__ticks *t, double lo, double hi, int target) {
    double span = hi - lo;
    int nm = span < 2.5 ? 3 : 1, kstep = (int)ceil(span / (target > 0 ? target : 1)), d, m;
    if (span < 1) {
        smp__ticks_linear(t, pow(10.0, lo), pow(10.0, hi), target);
        return;
    }
    if (kstep < 1) kstep = 1;
    t->n = t->n_minor = 0;
    for (d = (int)floor(lo); d <= (int)ceil(hi); d++) {
        for (m = 1; m <= 9; m++) {
            double v = m * pow(10.0, d), lv = log10(v);
            int major = (m == 1 && ((d % kstep) + kstep) % kstep == 0) ||
                        (nm == 3 && (m == 2 || m == 5));
            if (lv < lo - 1e-9 || lv > hi + 1e-9) continue;
            if (major && t->n < SMP__MAX_TICKS) {
                smp__fmt_log_tick(t->label[t->n], sizeof t->label[0], v);
                t->v[t->n++] = v;
            } else if (kstep == 1 && t->n_minor < SMP__MAX_TICKS * 8) {
                t->minor[t->n_minor++] = v;
            }
        }
    }
}

static void smp__axis_ticks(smp__ticks *t, const smp__axis *a, int target) {
    if (a->log) smp__ticks_log(t, a->lo, a->hi, target);
    else smp__ticks_linear(t, a->lo, a->hi, target);
}

static double smp__max_label_width(const smp__ticks *t, double s) {
    double w = 0;
    int i;
    for (i = 0; i < t->n; i++) {
        double wi = smp_text_width(t->label[i], s);
        w = wi > w ? wi : w;
    }
    return w;
}

/* Pixel coordinate of data value v. */
static double smp__map(const smp__axis *a, double v) {
    double t = a->log ? log10(v) : v;
    return a->p0 + (t - a->lo) / (a->hi - a->lo) * (a->p1 - a->p0);
}

/* Widen [lo, hi] by frac of its span each side; an empty range becomes +-10%
 * of its value (or +-0.5 around 0). */
static void smp__pad_range(double *lo, double *hi, double frac) {
    double span = *hi - *lo;
    if (span <= 0) {
        double half = *lo != 0 ? fabs(*lo) * 0.1 : 0.5;
        *lo -= half;
        *hi += half;
        return;
    }
    *lo -= span * frac;
    *hi += span * frac;
}

/* ---- chart frame: layout, grid, axes, titles ------------------------------- */

static double smp__pad(double s) { return 4 * s + 4; }
static double smp__title_scale(double s) { return floor(s * 1.5 + 0.5); }

/* Plot area of a panel, leaving room for the title, the axis labels, `left`
 * px of y tick labels, `bottom` px of x tick labels and `right` px. */
static smp__box smp__layout(smp__box panel, double s, const char *title, const char *xlabel,
                               const char *ylabel, double left, double bottom, double right) {
    double pad = smp__pad(s), line = (SMP__CAP + SMP__DESC) * s, ts = smp__title_scale(s);
    smp__box a;
    a.x0 = (int)(panel.x0 + pad + (ylabel ? line + 10 : 0) + left + 10);
    a.x1 = (int)(panel.x1 - pad - right - 4 * s);
    a.y0 = (int)(panel.y0 + pad + (title ? (SMP__CAP + SMP__DESC) * ts + 12 : SMP__CAP * s));
    a.y1 = (int)(panel.y1 - pad - (xlabel ? line + 10 : 0) - bottom - 10);
    if (a.x1 < a.x0 + 8) a.x1 = a.x0 + 8;
    if (a.y1 < a.y0 + 8) a.y1 = a.y0 + 8;
    return a;
}

/* A title to fit max_w px: at scale `big`, smaller in half steps down to
 * `small` while too wide, then cut with "..". Returns the scale. */
static double smp__fit_title(char *dst, const char *title, double max_w, double big, double small) {
    double ts = big;
    while (ts - 0.5 >= small && smp_text_width(title, ts) > max_w) ts -= 0.5;
    smp__fit_text(dst, title, max_w, ts);
    return ts;
}

static void smp__draw_titles(smp_canvas *c, smp__box panel, smp__box area, double s,
                               const char *title, const char *xlabel, const char *ylabel) {
    double pad = smp__pad(s), mid_x = (area.x0 + area.x1) / 2.0, ts;
    double panel_w = panel.x1 - panel.x0 - 2 * pad;
    char buf[SMP__LABEL];
    if (title) { /* as wide as the plot area (or half the panel), centred on it unless that
                    pushes it out of the panel */
        ts = smp__fit_title(buf, title, fmin(panel_w, fmax(area.x1 - area.x0, panel_w / 2)),
                            smp__title_scale(s), s);
        mid_x = fmax(mid_x, panel.x0 + pad + smp_text_width(buf, ts) / 2);
        mid_x = fmin(mid_x, panel.x1 - pad - smp_text_width(buf, ts) / 2);
        smp_text_ex(c, mid_x, panel.y0 + pad, buf, ts, SMP__TEXT, 0.5, 0, 0);
    }
    if (xlabel) {
        smp__fit_text(buf, xlabel, area.x1 - area.x0, s);
        smp_text_ex(c, (area.x0 + area.x1) / 2.0, panel.y1 - pad - SMP__DESC * s, buf, s, SMP__TEXT,
                     0.5, 1, 0);
    }
    if (ylabel) {
        smp__fit_text(buf, ylabel, area.y1 - area.y0, s);
        smp_text_ex(c, panel.x0 + pad, (area.y0 + area.y1) / 2.0, buf, s, SMP__TEXT, 0, 0.5, 1);
    }
}

/* Grid lines at the ticks of a vertical (y) or horizontal (x) axis. */
static void smp__draw_grid(smp_canvas *c, smp__box area, const smp__axis *a,
                             const smp__ticks *t, int is_y) {
    int i;
    for (i = 0; i < t->n_minor + t->n; i++) {
        int minor = i < t->n_minor;
        double p = floor(smp__map(a, minor ? t->minor[i] : t->v[i - t->n_minor]));
        smp_color col = minor ? SMP__GRID_MINOR : SMP__GRID;
        if (is_y) smp_fill_rect(c, area.x0, p, area.x1, p + 1, col);
        else smp_fill_rect(c, p, area.y0, p + 1, area.y1, col);
    }
}

/* Frame around the area, tick marks and tick labels of the given axes. */
static void smp__draw_axes(smp_canvas *c, smp__box area, const smp__axis *xa,
                             const smp__ticks *xt, const smp__axis *ya, const smp__ticks *yt,
                             double s) {
    int i;
    smp_rect(c, area.x0 - 1, area.y0 - 1, area.x1 + 1, area.y1 + 1, 1, SMP__AXIS);
    for (i = 0; ya && i < yt->n; i++) {
        double p = floor(smp__map(ya, yt->v[i]));
        if (p < area.y0 - 1 || p > area.y1) continue;
        smp_fill_rect(c, area.x0 - 6, p, area.x0 - 1, p + 1, SMP__AXIS);
        smp_text_ex(c, area.x0 - 9, p + 0.5, yt->label[i], s, SMP__TEXT, 1, 0.5, 0);
    }
    for (i = 0; xa && i < xt->n; i++) {
        double p = floor(smp__map(xa, xt->v[i]));
        if (p < area.x0 - 1 || p > area.x1) continue;
        smp_fill_rect(c, p, area.y1 + 1, p + 1, area.y1 + 6, SMP__AXIS);
        smp_text_ex(c, p + 0.5, area.y1 + 10, xt->label[i], s, SMP__TEXT, 0.5, 0, 0);
    }
}

/* x ticks: as many as fit side by side without their labels touching. */
static void smp__fit_xticks(smp__ticks *t, const smp__axis *a, double width, double s) {
    int target;
    for (target = (int)(width / (40 * s)); target > 1; target--) {
        smp__axis_ticks(t, a, target);
        if (t->n * (smp__max_label_width(t, s) + 8 * s) <= width) return;
    }
    smp__axis_ticks(t, a, 1);
}

static int smp__ytick_target(smp__box panel, double s) {
    int n = (int)((panel.y1 - panel.y0) / (40 * s));
    return n < 3 ? 3 : n > 8 ? 8 : n;
}

/* Pixel row of a reference value, or NAN when it is off the axis. */
static double smp__ref_pos(smp__box area, const smp__axis *ya, double v) {
    double p;
    if (!isfinite(v) || (ya->log && !(v > 0))) return NAN;
    p = smp__map(ya, v);
    return p >= area.y0 && p <= area.y1 ? p : NAN;
}

static void smp__ref_line(smp_canvas *c, smp__box area, const smp__axis *ya, double v) {
    double p = smp__ref_pos(area, ya, v);
    if (p == p) smp_dashed_hline(c, area.x0, area.x1, p, 2, 10, 6, SMP__REF);
}

/* Pixels in [x0,x1) x [y0,y1) that are neither background nor grid. */
static long smp__ink(const smp_canvas *c, int x0, int y0, int x1, int y1) {
    long n = 0;
    int x, y;
    for (y = y0 < 0 ? 0 : y0; y < y1 && y < c->h; y++)
        for (x = x0 < 0 ? 0 : x0; x < x1 && x < c->w; x++) {
            smp_color p = smp_get_pixel(c, x, y);
            n += p != SMP_WHITE && p != SMP__GRID && p != SMP__GRID_MINOR;
        }
    return n;
}

/* Label of a reference line: above or below it, at its right or left end,
 * wherever the drawn data leaves the most room (ties: right, above). */
static void smp__ref_label(smp_canvas *c, smp__box area, const smp__axis *ya, double v,
                             const char *label, double s) {
    double p = smp__ref_pos(area, ya, v), gap = (SMP__DESC + 1) * s + 3, best_x = 0, best_y = 0;
    long best_ink = -1;
    int k, best_k = 0;
    if (!(p == p) || !label) return;
    for (k = 0; k < 4; k++) {
        double x = k % 2 == 0 ? area.x1 - 6 : area.x0 + 6, y = k < 2 ? p - gap : p + s + 3;
        smp__box b = smp__text_box(x, y, label, s, k % 2 == 0, k < 2, s + 1);
        long ink = b.y0 < area.y0 || b.y1 > area.y1 ? -1 : smp__ink(c, b.x0, b.y0, b.x1, b.y1);
        if (ink >= 0 && (best_ink < 0 || ink < best_ink)) best_ink = ink, best_x = x, best_y = y, best_k = k;
    }
    if (best_ink >= 0)
        smp__text_on_white(c, best_x, best_y, label, s, SMP__REF, best_k % 2 == 0, best_k < 2);
}

/* Legend entries with their measured box. Entries with a NULL name are
 * left out; `boxes` draws square swatches (bars), else line segments. */
typedef struct {
    const char *names[SMP_MAX_SERIES];
    smp_color cols[SMP_MAX_SERIES];
    int n, boxes, w, h; /* w = h = 0 when no entry has a name */
    double lw, s, row, sw;
} smp__legend;

static void smp__legend_make(smp__legend *L, int boxes, double lw, double s) {
    double maxw = 0;
    int i, shown = 0;
    L->boxes = boxes;
    L->lw = lw;
    L->s = s;
    L->row = (SMP__CAP + 4) * s + 2;
    L->sw = boxes ? SMP__CAP * s : 13 * s;
    for (i = 0; i < L->n; i++) {
        if (!L->names[i]) continue;
        shown++;
        maxw = smp_text_width(L->names[i], s) > maxw ? smp_text_width(L->names[i], s) : maxw;
    }
    L->w = shown ? (int)(L->sw + maxw + (boxes ? 9 : 11) * s + 2) : 0;
    L->h = shown ? (int)(shown * L->row + 2 * s + 4) : 0;
}

/* A legend covering over half the area's height or 40% of its width goes
 * outside, right of the area. */
static int smp__legend_outside(const smp__legend *L, smp__box area) {
    return L->h > (area.y1 - area.y0) / 2 || L->w > (area.x1 - area.x0) * 2 / 5;
}

static void smp__legend_draw_at(smp_canvas *c, const smp__legend *L, int x, int y) {
    double s = L->s, th = SMP__CAP * s;
    int i, k;
    smp_fill_rect(c, x, y, x + L->w, y + L->h, SMP_WHITE);
    smp_rect(c, x, y, x + L->w, y + L->h, 1, 0xBBBBBBu);
    for (i = 0, k = 0; i < L->n; i++) {
        double mid, x0 = x + 3 * s;
        if (!L->names[i]) continue;
        mid = y + 2 + s + (k++ + 0.5) * L->row;
        if (L->boxes) smp_fill_rect(c, x0, mid - th / 2, x0 + L->sw, mid + th / 2, L->cols[i]);
        else smp_line(c, x0, mid, x0 + L->sw, mid, L->lw, L->cols[i]);
        smp_text_ex(c, x0 + L->sw + (L->boxes ? 3 : 5) * s, mid, L->names[i], s, SMP__TEXT, 0, 0.5, 0);
    }
}

/* Outside: right of the area. Inside: the corner covering the least drawn
 * data (ties: top right, top left, bottom right, bottom left). */
static void smp__legend_place(smp_canvas *c, const smp__legend *L, smp__box area, int outside) {
    int k, best = 0;
    long best_ink = -1;
    if (!L->w) return;
    if (outside) {
        smp__legend_draw_at(c, L, area.x1 + 12, area.y0);
        return;
    }
    for (k = 0; k < 4; k++) {
        int x = k % 2 == 0 ? area.x1 - 10 - L->w : area.x0 + 10;
        int y = k < 2 ? area.y0 + 10 : area.y1 - 10 - L->h;
        long ink = smp__ink(c, x, y, x + L->w, y + L->h);
        if (best_ink < 0 || ink < best_ink) best_ink = ink, best = k;
    }
    smp__legend_draw_at(c, L, best % 2 == 0 ? area.x1 - 10 - L->w : area.x0 + 10,
                         best < 2 ? area.y0 + 10 : area.y1 - 10 - L->h);
}

static smp_color smp__series_color(smp_color given, int i) {
    return given ? given : smp_palette(i);
}

static int smp__check_panel(const char *who, int w, int h, char *errbuf) {
    if (w < SMP_MIN_DIM || w > SMP_MAX_DIM)
        return smp__fail(errbuf, "%s: width %d out of range [%d, %d]", who, w, SMP_MIN_DIM, SMP_MAX_DIM);
    if (h < SMP_MIN_DIM || h > SMP_MAX_DIM)
        return smp__fail(errbuf, "%s: height %d out of range [%d, %d]", who, h, SMP_MIN_DIM, SMP_MAX_DIM);
    return 0;
}

static int smp__check_nseries(const char *who, int n, char *errbuf) {
    if (n < 1 || n > SMP_MAX_SERIES)
        return smp__fail(errbuf, "%s: n_series %d out of range [1, %d]", who, n, SMP_MAX_SERIES);
    return 0;
}

/* A fixed range (fixed != 0) of axis `ax` ("x", "y", "v") must have hi > lo. */
static int smp__check_fixed(const char *who, int fixed, const char *ax, double lo, double hi, char *errbuf) {
    if (fixed && !(hi > lo)) return smp__fail(errbuf, "%s: %smax (%g) must be > %smin (%g)", who, ax, hi, ax, lo);
    return 0;
}

static int smp__check_text_scale(const char *who, double s, char *errbuf) {
    if (s < 0 || s > 10) return smp__fail(errbuf, "%s: text_scale %g out of range [0, 10]", who, s);
    return 0;
}

/* ---- line chart ------------------------------------------------------------ */

static int smp__check_line(const smp_line_spec *sp, char *errbuf) {
    const char *who = "smp_line_chart";
    int i;
    if (!sp) return smp__fail(errbuf, "%s: spec is NULL", who);
    if (smp__check_nseries(who, sp->n_series, errbuf)) return 1;
    if (!sp->series) return smp__fail(errbuf, "%s: series is NULL", who);
    for (i = 0; i < sp->n_series; i++) {
        if (sp->series[i].n < 0)
            return smp__fail(errbuf, "%s: series[%d].n = %d must be >= 0", who, i, sp->series[i].n);
        if (sp->series[i].n > 0 && !sp->series[i].y)
            return smp__fail(errbuf, "%s: series[%d].y is NULL", who, i);
        if (!sp->series[i].y_lo != !sp->series[i].y_hi)
            return smp__fail(errbuf, "%s: series[%d] sets one of y_lo, y_hi: a band needs both", who, i);
    }
    if (smp__check_fixed(who, sp->fixed_x, "x", sp->xmin, sp->xmax, errbuf) ||
        smp__check_fixed(who, sp->fixed_y, "y", sp->ymin, sp->ymax, errbuf))
        return 1;
    if (sp->fixed_y && sp->log_y && !(sp->ymin > 0))
        return smp__fail(errbuf, "%s: ymin (%g) must be > 0 on a log y axis", who, sp->ymin);
    if (sp->fixed_x && sp->log_x && !(sp->xmin > 0))
        return smp__fail(errbuf, "%s: xmin (%g) must be > 0 on a log x axis", who, sp->xmin);
    if (sp->markers < -1 || sp->markers > 1)
        return smp__fail(errbuf, "%s: markers %d must be -1, 0 or 1", who, sp->markers);
    if (sp->line_width < 0 || sp->line_width > 50)
        return smp__fail(errbuf, "%s: line_width %g out of range [0, 50]", who, sp->line_width);
    return smp__check_text_scale(who, sp->text_scale, errbuf);
}

/* v on an axis's scale: log10(v) on a log axis (NaN for v <= 0), else v. */
static double smp__scaled(double v, int log) {
    return !log ? v : v > 0 ? log10(v) : NAN;
}

/* Grow [*lo, *hi] to hold v when it is finite. */
static void smp__extend(double *lo, double *hi, double v) {
    if (!isfinite(v)) return;
    *lo = v < *lo ? v : *lo;
    *hi = v > *hi ? v : *hi;
}

/* Data range of one series on the chart's scales, its band included. */
static void smp__series_range(const smp_line_spec *sp, const smp_series *se, double *x0, double *x1,
                              double *y0, double *y1) {
    int j;
    for (j = 0; j < se->n; j++) {
        double x = smp__scaled(se->x ? se->x[j] : j, sp->log_x), y = smp__scaled(se->y[j], sp->log_y);
        if (!isfinite(x)) continue;
        if (isfinite(y)) smp__extend(x0, x1, x), smp__extend(y0, y1, y);
        if (se->y_lo && se->y_hi) {
            smp__extend(y0, y1, smp__scaled(se->y_lo[j], sp->log_y));
            smp__extend(y0, y1, smp__scaled(se->y_hi[j], sp->log_y));
        }
    }
}

/* Axis ranges (on the axis's scale) from the finite data, its bands and the
 * reference line, padded, unless fixed. Returns whether any point is drawable. */
static int smp__line_ranges(const smp_line_spec *sp, smp__axis *xa, smp__axis *ya) {
    double x0 = HUGE_VAL, x1 = -HUGE_VAL, y0 = HUGE_VAL, y1 = -HUGE_VAL;
    int i, found;
    for (i = 0; i < sp->n_series; i++) smp__series_range(sp, &sp->series[i], &x0, &x1, &y0, &y1);
    found = x0 <= x1 && y0 <= y1;
    if (!found) x0 = y0 = 0, x1 = y1 = 1;
    if (sp->log_x && x0 == x1) x0 -= 0.5, x1 += 0.5; /* one value: a decade around it */
    if (sp->log_y && y0 == y1) y0 -= 0.5, y1 += 0.5;
    if (found && sp->has_ref) smp__extend(&y0, &y1, smp__scaled(sp->ref_y, sp->log_y));
    smp__pad_range(&x0, &x1, 0.02);
    smp__pad_range(&y0, &y1, 0.05);
    xa->lo = sp->fixed_x ? smp__scaled(sp->xmin, sp->log_x) : x0;
    xa->hi = sp->fixed_x ? smp__scaled(sp->xmax, sp->log_x) : x1;
    xa->log = sp->log_x != 0;
    ya->lo = sp->fixed_y ? smp__scaled(sp->ymin, sp->log_y) : y0;
    ya->hi = sp->fixed_y ? smp__scaled(sp->ymax, sp->log_y) : y1;
    ya->log = sp->log_y != 0;
    return found;
}

/* Pixel position of point j of a series with values y (its line or a band
 * edge); NaN when the point is not drawable on these axes. */
static void smp__point(const smp_series *se, const float *y, int j, const smp__axis *xa,
                       const smp__axis *ya, double *px, double *py) {
    double x = se->x ? se->x[j] : j, v = y[j];
    int ok = isfinite(smp__scaled(x, xa->log)) && isfinite(smp__scaled(v, ya->log));
    *px = ok ? smp__map(xa, x) : NAN;
    *py = ok ? smp__map(ya, v) : NAN;
}

/* Fraction of a series' colour its band is shaded with (over white). */
#define SMP__BAND_ALPHA 0.18

/* The band of a series: in every pixel column between two neighbouring
 * points whose lo and hi are drawable, the span between the linearly
 * interpolated edges, blended at SMP__BAND_ALPHA. */
static void smp__draw_band(smp_canvas *c, const smp_series *se, const smp__axis *xa,
                           const smp__axis *ya, smp_color col) {
    int j, i;
    for (j = 0; j + 1 < se->n; j++) {
        double ax, alo, ahi, bx, blo, bhi;
        smp__point(se, se->y_lo, j, xa, ya, &ax, &alo);
        smp__point(se, se->y_hi, j, xa, ya, &ax, &ahi);
        smp__point(se, se->y_lo, j + 1, xa, ya, &bx, &blo);
        smp__point(se, se->y_hi, j + 1, xa, ya, &bx, &bhi);
        if (!(isfinite(alo) && isfinite(ahi) && isfinite(blo) && isfinite(bhi)) || !(bx > ax)) continue;
        for (i = (int)floor(ax); i < (int)ceil(bx); i++) {
            double f = (i + 0.5 - ax) / (bx - ax), lo, hi;
            f = f < 0 ? 0 : f > 1 ? 1 : f;
            lo = alo + (blo - alo) * f, hi = ahi + (bhi - ahi) * f;
            smp__blend_rect(c, i, lo < hi ? lo : hi, i + 1, lo < hi ? hi : lo, col, SMP__BAND_ALPHA);
        }
    }
}

/* One series as an anti-aliased polyline; markers as sp->markers says
 * (by default when it has <= 40 drawable points). */
static int smp__draw_series(smp_canvas *c, const smp_series *se, const smp__axis *xa,
                            const smp__axis *ya, smp_color col, double lw, int markers,
                            char *errbuf) {
    double *xs = (double *)SMP_MALLOC((size_t)(se->n > 0 ? se->n : 1) * 2 * sizeof(double)), *ys;
    int i, finite = 0;
    if (!xs) return smp__fail(errbuf, "smp_line_chart: out of memory for %d points", se->n);
    ys = xs + se->n;
    for (i = 0; i < se->n; i++) {
        smp__point(se, se->y, i, xa, ya, &xs[i], &ys[i]);
        finite += isfinite(xs[i]) != 0;
    }
    if (markers == 0) markers = finite <= 40 ? 1 : -1;
    smp_polyline(c, xs, ys, se->n, lw, markers > 0 ? lw * 1.4 : 0, col);
    SMP_FREE(xs);
    return 0;
}

/* How far x tick labels reach right of the area's right edge. */
static double smp__xlabel_overhang(const smp__ticks *t, const smp__axis *xa, smp__box area, double s) {
    double over = 0;
    int i;
    for (i = 0; i < t->n; i++) {
        double p = floor(smp__map(xa, t->v[i])), r = p + 0.5 + smp_text_width(t->label[i], s) / 2 - area.x1;
        if (p <= area.x1 && r > over) over = r;
    }
    return over;
}

/* Plot area and x ticks of a line chart: the legend goes right of the area
 * when it would cover too much of it, and the last x label must fit. */
static smp__box smp__line_layout(smp__box panel, const smp_line_spec *sp, double s,
                                    const smp__ticks *yt, const smp__legend *L, int *outside,
                                    smp__axis *xa, smp__ticks *xt) {
    double left = smp__max_label_width(yt, s), bottom = (SMP__CAP + SMP__DESC) * s, right, over;
    smp__box area = smp__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, bottom, 0);
    int pass;
    *outside = L->w && smp__legend_outside(L, area);
    right = *outside ? L->w + 12 : 0;
    for (pass = 0; pass < 4; pass++) { /* narrower area, other ticks: settles in 1-2 passes */
        area = smp__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, bottom, right);
        xa->p0 = area.x0;
        xa->p1 = area.x1;
        smp__fit_xticks(xt, xa, area.x1 - area.x0, s);
        over = smp__xlabel_overhang(xt, xa, area, s) - (panel.x1 - area.x1 - smp__pad(s) / 2);
        if (over <= 0) break;
        right += over;
    }
    return area;
}

/* Draw a line chart into the panel [x, x+w) x [y, y+h) of the canvas. */
SMPDEF int smp_line_chart_draw(smp_canvas *c, int x, int y, int w, int h,
                                 const smp_line_spec *sp, char *errbuf) {
    smp__box panel = smp__mkbox(x, y, x + w, y + h), area;
    smp__axis xa, ya;
    smp__ticks xt, yt;
    smp__legend L;
    double s, lw;
    int i, found, outside, err = 0;
    if (smp__check_line(sp, errbuf) || smp__check_panel("smp_line_chart", w, h, errbuf)) return 1;
    s = sp->text_scale > 0 ? sp->text_scale : 2;
    lw = sp->line_width > 0 ? sp->line_width : 2.5;
    L.n = sp->n_series;
    for (i = 0; i < sp->n_series; i++) {
        L.cols[i] = smp__series_color(sp->series[i].color, i);
        L.names[i] = sp->series[i].name;
    }
    smp__legend_make(&L, 0, lw, s);
    found = smp__line_ranges(sp, &xa, &ya);
    smp__axis_ticks(&yt, &ya, smp__ytick_target(panel, s));
    area = smp__line_layout(panel, sp, s, &yt, &L, &outside, &xa, &xt);
    ya.p0 = area.y1;
    ya.p1 = area.y0;
    smp_clip(c, x, y, x + w, y + h);
    smp_fill_rect(c, x, y, x + w, y + h, SMP_WHITE);
    smp__draw_grid(c, area, &ya, &yt, 1);
    smp__draw_grid(c, area, &xa, &xt, 0);
    smp_clip(c, area.x0, area.y0, area.x1, area.y1);
    if (sp->has_ref) smp__ref_line(c, area, &ya, sp->ref_y); /* under the data */
    for (i = 0; i < sp->n_series; i++) /* bands under every line */
        if (sp->series[i].y_lo && sp->series[i].y_hi) smp__draw_band(c, &sp->series[i], &xa, &ya, L.cols[i]);
    for (i = 0; i < sp->n_series && !err; i++)
        err = smp__draw_series(c, &sp->series[i], &xa, &ya, L.cols[i], lw, sp->markers, errbuf);
    if (!err) {
        if (sp->has_ref) smp__ref_label(c, area, &ya, sp->ref_y, sp->ref_label, s);
        if (!found)
            smp_text_ex(c, (area.x0 + area.x1) / 2.0, (area.y0 + area.y1) / 2.0, "no finite data",
                         s, SMP__REF, 0.5, 0.5, 0);
        smp_clip(c, x, y, x + w, y + h);
        smp__legend_place(c, &L, area, outside);
        smp__draw_axes(c, area, &xa, &xt, &ya, &yt, s);
        smp__draw_titles(c, panel, area, s, sp->title, sp->xlabel, sp->ylabel);
    }
    smp_clip_reset(c);
    return err;
}

/* ---- bar chart -------------------------------------------------------------- */

static int smp__check_bar(const smp_bar_spec *sp, char *errbuf) {
    const char *who = "smp_bar_chart";
    int i;
    if (!sp) return smp__fail(errbuf, "%s: spec is NULL", who);
    if (sp->n_categories < 1 || sp->n_categories > 4096)
        return smp__fail(errbuf, "%s: n_categories %d out of range [1, 4096]", who, sp->n_categories);
    if (smp__check_nseries(who, sp->n_series, errbuf)) return 1;
    if (!sp->series) return smp__fail(errbuf, "%s: series is NULL", who);
    for (i = 0; i < sp->n_series; i++)
        if (!sp->series[i].values) return smp__fail(errbuf, "%s: series[%d].values is NULL", who, i);
    if (smp__check_fixed(who, sp->fixed_y, "y", sp->ymin, sp->ymax, errbuf)) return 1;
    return smp__check_text_scale(who, sp->text_scale, errbuf);
}

/* y range of a bar chart: always includes 0 (bars start there) and the
 * reference line; headroom above for value labels. */
static void smp__bar_range(const smp_bar_spec *sp, smp__axis *ya) {
    double lo = 0, hi = 0, span;
    int i, j;
    for (i = 0; i < sp->n_series; i++)
        for (j = 0; j < sp->n_categories; j++) {
            double v = sp->series[i].values[j];
            if (!isfinite(v)) continue;
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
    if (sp->has_ref && isfinite(sp->ref_y)) {
        lo = sp->ref_y < lo ? sp->ref_y : lo;
        hi = sp->ref_y > hi ? sp->ref_y : hi;
    }
    if (hi == lo) hi = lo + 1;
    span = hi - lo;
    if (hi > 0) hi += span * (sp->value_labels ? 0.12 : 0.05);
    if (lo < 0) lo -= span * (sp->value_labels ? 0.12 : 0.05);
    ya->lo = sp->fixed_y ? sp->ymin : lo;
    ya->hi = sp->fixed_y ? sp->ymax : hi;
    ya->log = 0;
}

static void smp__category_label(char *dst, const char *const *labels, int i, double max_px, double s) {
    char idx[16];
    snprintf(idx, sizeof idx, "%d", i);
    smp__fit_text(dst, labels ? labels[i] : idx, max_px, s);
}

/* Width of the widest category label (each cut to max_len px). */
static double smp__max_category_width(const char *const *labels, int n, double max_len, double s) {
    char buf[SMP__LABEL];
    double m = 0;
    int i;
    for (i = 0; i < n; i++) {
        smp__category_label(buf, labels, i, max_len, s);
        m = smp_text_width(buf, s) > m ? smp_text_width(buf, s) : m;
    }
    return m;
}

/* Labels along a categorical axis: horizontal when every label fits its slot
 * of `slot` px, else rotated and cut to max_len px. Returns the px they take
 * below the axis and sets *rotated. */
static double smp__category_extent(const char *const *labels, int n, double slot, double max_len,
                                     double s, int *rotated) {
    double longest = smp__max_category_width(labels, n, max_len, s);
    *rotated = longest > slot - 4 * s;
    return *rotated ? longest : (SMP__CAP + SMP__DESC) * s;
}

/* Category labels under [area.x0, area.x1) at slot centres; when there are
 * too many for the space, every k-th. */
static void smp__draw_categories(smp_canvas *c, smp__box area, const char *const *labels, int n,
                                   double max_len, int rotated, double s) {
    double slot = (double)(area.x1 - area.x0) / n, need = rotated ? (SMP__CAP + 3) * s : 0;
    int i, every = 1;
    char buf[SMP__LABEL];
    while (need > 0 && slot * every < need) every++;
    for (i = 0; i < n; i += every) {
        double mid = area.x0 + (i + 0.5) * slot;
        smp__category_label(buf, labels, i, rotated ? max_len : slot, s);
        smp_text_ex(c, mid, area.y1 + 8, buf, s, SMP__TEXT, 0.5, 0, rotated);
    }
}

static void smp__bar_value_label(smp_canvas *c, double xmid, double bar_w, double ytop, int below,
                                   double v, double s) {
    char buf[24];
    double sc = s;
    smp__fmt_sig(buf, sizeof buf, v, 3);
    if (smp_text_width(buf, sc) > bar_w + 2 * s) sc = s * 0.75;
    if (smp_text_width(buf, sc) > bar_w + 2 * s) return;
    /* clear of the bar end by the white box: its padding (sc + 1) and, above, the descender room */
    smp__text_on_white(c, xmid, below ? ytop + sc + 3 : ytop - (SMP__DESC + 1) * sc - 3, buf, sc,
                        SMP__TEXT, 0.5, below ? 0 : 1);
}

/* One pass draws the bars (labels = 0), a second their value labels. */
static void smp__draw_bars(smp_canvas *c, smp__box area, const smp_bar_spec *sp,
                             const smp__axis *ya, const smp_color *cols, int labels, double s) {
    double slot = (double)(area.x1 - area.x0) / sp->n_categories;
    double bw = slot * 0.8 / sp->n_series, base = smp__map(ya, 0);
    double gap = bw > 6 ? 1 : 0;
    int i, j;
    for (j = 0; j < sp->n_categories; j++) {
        for (i = 0; i < sp->n_series; i++) {
            double v = sp->series[i].values[j], x0 = area.x0 + slot * (j + 0.1) + i * bw, top;
            if (!isfinite(v)) continue;
            top = smp__map(ya, v);
            if (labels) smp__bar_value_label(c, x0 + bw / 2, bw, top, v < 0, v, s);
            else smp_fill_rect(c, x0 + gap, top, x0 + bw - gap, base, cols[i]);
        }
    }
    if (!labels && ya->lo < 0 && ya->hi > 0)
        smp_fill_rect(c, area.x0, floor(base), area.x1, floor(base) + 1, SMP__AXIS);
}

/* Draw a grouped bar chart into the panel [x, x+w) x [y, y+h). */
SMPDEF int smp_bar_chart_draw(smp_canvas *c, int x, int y, int w, int h, const smp_bar_spec *sp,
                                char *errbuf) {
    smp__box panel = smp__mkbox(x, y, x + w, y + h), area;
    smp__axis ya;
    smp__ticks yt;
    smp__legend L;
    double s, left, below, max_len, right;
    int i, rotated, outside;
    if (smp__check_bar(sp, errbuf) || smp__check_panel("smp_bar_chart", w, h, errbuf)) return 1;
    s = sp->text_scale > 0 ? sp->text_scale : 2;
    max_len = h * 0.25;
    smp__bar_range(sp, &ya);
    smp__axis_ticks(&yt, &ya, smp__ytick_target(panel, s));
    L.n = sp->n_series;
    for (i = 0; i < sp->n_series; i++) {
        L.cols[i] = smp__series_color(sp->series[i].color, i);
        L.names[i] = sp->n_series > 1 ? sp->series[i].name : NULL; /* one series: no legend */
    }
    smp__legend_make(&L, 1, 0, s);
    left = smp__max_label_width(&yt, s);
    area = smp__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, 0, 0);
    outside = L.w && smp__legend_outside(&L, area);
    right = outside ? L.w + 12 : 0;
    area = smp__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, 0, right);
    below = smp__category_extent(sp->categories, sp->n_categories,
                                  (double)(area.x1 - area.x0) / sp->n_categories, max_len, s, &rotated);
    area = smp__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, below, right);
    ya.p0 = area.y1;
    ya.p1 = area.y0;
    smp_clip(c, x, y, x + w, y + h);
    smp_fill_rect(c, x, y, x + w, y + h, SMP_WHITE);
    smp__draw_grid(c, area, &ya, &yt, 1);
    smp_clip(c, area.x0, area.y0, area.x1, area.y1);
    smp__draw_bars(c, area, sp, &ya, L.cols, 0, s);
    if (sp->has_ref) smp__ref_line(c, area, &ya, sp->ref_y); /* over the bars */
    if (sp->value_labels) smp__draw_bars(c, area, sp, &ya, L.cols, 1, s);
    if (sp->has_ref) smp__ref_label(c, area, &ya, sp->ref_y, sp->ref_label, s);
    smp_clip(c, x, y, x + w, y + h);
    smp__legend_place(c, &L, area, outside);
    smp__draw_axes(c, area, NULL, NULL, &ya, &yt, s);
    smp__draw_categories(c, area, sp->categories, sp->n_categories, max_len, rotated, s);
    smp__draw_titles(c, panel, area, s, sp->title, sp->xlabel, sp->ylabel);
    smp_clip_reset(c);
    return 0;
}

/* ---- heatmap ----------------------------------------------------------------- */

static int smp__check_heatmap(const smp_heatmap_spec *sp, char *errbuf) {
    const char *who = "smp_heatmap";
    if (!sp) return smp__fail(errbuf, "%s: spec is NULL", who);
    if (sp->rows < 1 || sp->rows > 4096)
        return smp__fail(errbuf, "%s: rows %d out of range [1, 4096]", who, sp->rows);
    if (sp->cols < 1 || sp->cols > 4096)
        return smp__fail(errbuf, "%s: cols %d out of range [1, 4096]", who, sp->cols);
    if (!sp->values) return smp__fail(errbuf, "%s: values is NULL", who);
    if (smp__check_fixed(who, sp->fixed_range, "v", sp->vmin, sp->vmax, errbuf)) return 1;
    return smp__check_text_scale(who, sp->text_scale, errbuf);
}

static void smp__heat_range(const smp_heatmap_spec *sp, smp__axis *va) {
    double lo = HUGE_VAL, hi = -HUGE_VAL;
    int i, n = sp->rows * sp->cols;
    for (i = 0; i < n; i++) {
        double v = sp->values[i];
        if (!isfinite(v)) continue;
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    if (lo > hi) lo = 0, hi = 1;
    if (hi == lo) smp__pad_range(&lo, &hi, 0);
    va->lo = sp->fixed_range ? sp->vmin : lo;
    va->hi = sp->fixed_range ? sp->vmax : hi;
    va->log = 0;
}

/* Cells, each value mapped through viridis; optional value text in cells
 * where it fits, white on dark cells and black on light ones. */
static void smp__draw_cells(smp_canvas *c, smp__box area, const smp_heatmap_spec *sp,
                              const smp__axis *va, double s) {
    double cw = (double)(area.x1 - area.x0) / sp->cols, ch = (double)(area.y1 - area.y0) / sp->rows;
    double step = (va->hi - va->lo) / 100;
    int i, j;
    for (i = 0; i < sp->rows; i++) {
        for (j = 0; j < sp->cols; j++) {
            double v = sp->values[(size_t)i * sp->cols + j];
            double x0 = floor(area.x0 + j * cw), x1 = floor(area.x0 + (j + 1) * cw);
            double y0 = floor(area.y0 + i * ch), y1 = floor(area.y0 + (i + 1) * ch);
            smp_color col = isfinite(v) ? smp_viridis((v - va->lo) / (va->hi - va->lo)) : SMP__MISSING;
            char buf[24];
            double lum = 0.2126 * (col >> 16) + 0.7152 * ((col >> 8) & 255) + 0.0722 * (col & 255);
            smp_fill_rect(c, x0, y0, x1, y1, col);
            if (!sp->annotate || !isfinite(v)) continue;
            smp__fmt_value(buf, sizeof buf, v, step);
            if (smp_text_width(buf, s) > cw - 4 || (SMP__CAP + 2) * s > ch) continue;
            smp_text_ex(c, (x0 + x1) / 2, (y0 + y1) / 2, buf, s, lum < 140 ? SMP_WHITE : 0x111111u,
                         0.5, 0.5, 0);
        }
    }
}

/* Row labels right-aligned left of the area, every k-th when rows are short. */
static void smp__draw_row_labels(smp_canvas *c, smp__box area, const char *const *labels, int n,
                                   double max_len, double s) {
    double slot = (double)(area.y1 - area.y0) / n;
    int i, every = 1;
    char buf[SMP__LABEL];
    while (slot * every < (SMP__CAP + 3) * s) every++;
    for (i = 0; i < n; i += every) {
        smp__category_label(buf, labels, i, max_len, s);
        smp_text_ex(c, area.x0 - 8, area.y0 + (i + 0.5) * slot, buf, s, SMP__TEXT, 1, 0.5, 0);
    }
}

/* Vertical colour bar right of the area with ticks and an optional label. */
static void smp__draw_colorbar(smp_canvas *c, smp__box area, const smp__axis *va,
                                 const smp__ticks *t, const char *label, double s) {
    int x0 = area.x1 + (int)(6 * s), x1 = x0 + (int)(10 * s), y, i;
    double labw = smp__max_label_width(t, s);
    for (y = area.y0; y < area.y1; y++)
        smp_fill_rect(c, x0, y, x1, y + 1,
                       smp_viridis((area.y1 - 0.5 - y) / (double)(area.y1 - area.y0)));
    smp_rect(c, x0 - 1, area.y0 - 1, x1 + 1, area.y1 + 1, 1, SMP__AXIS);
    for (i = 0; i < t->n; i++) {
        double p = floor(smp__map(va, t->v[i]));
        smp_fill_rect(c, x1 + 1, p, x1 + 6, p + 1, SMP__AXIS);
        smp_text_ex(c, x1 + 9, p + 0.5, t->label[i], s, SMP__TEXT, 0, 0.5, 0);
    }
    smp_text_ex(c, x1 + 9 + labw + 10, (area.y0 + area.y1) / 2.0, label, s, SMP__TEXT, 0, 0.5, 1);
}

/* Draw a heatmap into the panel [x, x+w) x [y, y+h). */
SMPDEF int smp_heatmap_draw(smp_canvas *c, int x, int y, int w, int h, const smp_heatmap_spec *sp,
                              char *errbuf) {
    smp__box panel = smp__mkbox(x, y, x + w, y + h), area;
    smp__axis va;
    smp__ticks vt;
    double s, left, right, below, max_col = h * 0.25;
    int rotated;
    if (smp__check_heatmap(sp, errbuf) || smp__check_panel("smp_heatmap", w, h, errbuf)) return 1;
    s = sp->text_scale > 0 ? sp->text_scale : 2;
    smp__heat_range(sp, &va);
    smp__axis_ticks(&vt, &va, smp__ytick_target(panel, s));
    left = smp__max_category_width(sp->row_labels, sp->rows, w * 0.25, s);
    right = 16 * s + 9 + smp__max_label_width(&vt, s) + (sp->value_label ? 10 + (SMP__CAP + SMP__DESC) * s : 0);
    area = smp__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, 0, right);
    below = smp__category_extent(sp->col_labels, sp->cols, (double)(area.x1 - area.x0) / sp->cols,
                                  max_col, s, &rotated);
    area = smp__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, below, right);
    va.p0 = area.y1;
    va.p1 = area.y0;
    smp_clip(c, x, y, x + w, y + h);
    smp_fill_rect(c, x, y, x + w, y + h, SMP_WHITE);
    smp__draw_cells(c, area, sp, &va, s);
    smp__draw_axes(c, area, NULL, NULL, NULL, NULL, s);
    smp__draw_row_labels(c, area, sp->row_labels, sp->rows, w * 0.25, s);
    smp__draw_categories(c, area, sp->col_labels, sp->cols, max_col, rotated, s);
    smp__draw_colorbar(c, area, &va, &vt, sp->value_label, s);
    smp__draw_titles(c, panel, area, s, sp->title, sp->xlabel, sp->ylabel);
    smp_clip_reset(c);
    return 0;
}

/* ---- PNG output and whole-image helpers ------------------------------------------ */

typedef struct {
    FILE *f;
    int failed;
} smp__png_sink;

static void smp__png_write(void *ctx, void *data, int size) {
    smp__png_sink *sink = (smp__png_sink *)ctx;
    if (!sink->failed && fwrite(data, 1, (size_t)size, sink->f) != (size_t)size) sink->failed = 1;
}

/* Write the canvas as an RGB PNG; a failed write leaves no partial file. */
SMPDEF int smp_write_png(const smp_canvas *c, const char *path, char *errbuf) {
    smp__png_sink sink;
    int ok;
    if (!path || !*path) return smp__fail(errbuf, "smp_write_png: png_path is empty");
    sink.f = fopen(path, "wb");
    sink.failed = 0;
    if (!sink.f) return smp__fail(errbuf, "smp_write_png: cannot open '%s': %s", path, strerror(errno));
    ok = stbi_write_png_to_func(smp__png_write, &sink, c->w, c->h, 3, c->px, c->w * 3);
    if (fclose(sink.f) != 0) sink.failed = 1;
    if (!ok || sink.failed) {
        remove(path);
        return smp__fail(errbuf, "smp_write_png: writing '%s' failed%s", path,
                          ok ? " (disk full?)" : " (PNG encoder out of memory)");
    }
    return 0;
}

static int smp__draw_panel(smp_canvas *c, int x, int y, int w, int h, const smp_panel *p,
                             char *errbuf) {
    if (p->line) return smp_line_chart_draw(c, x, y, w, h, p->line, errbuf);
    if (p->bar) return smp_bar_chart_draw(c, x, y, w, h, p->bar, errbuf);
    return smp_heatmap_draw(c, x, y, w, h, p->heatmap, errbuf);
}

/* Panels in a grid of `cols` columns, each panel_w x panel_h, under an
 * optional title, written to png_path. Each panel's own width/height are
 * ignored here. */
SMPDEF int smp_grid(const smp_panel *panels, int n, int cols, int panel_w, int panel_h,
                      const char *title, const char *png_path, char *errbuf) {
    smp_canvas c;
    int i, rows, top;
    if (!panels || n < 1) return smp__fail(errbuf, "smp_grid: n %d must be >= 1", n);
    if (cols < 1) return smp__fail(errbuf, "smp_grid: cols %d must be >= 1", cols);
    for (i = 0; i < n; i++)
        if (!!panels[i].line + !!panels[i].bar + !!panels[i].heatmap != 1)
            return smp__fail(errbuf, "smp_grid: panels[%d] must set exactly one of line, bar, heatmap", i);
    if (smp__check_panel("smp_grid", panel_w, panel_h, errbuf)) return 1;
    rows = (n + cols - 1) / cols;
    cols = n < cols ? n : cols;
    top = title ? 48 : 0;
    if ((double)cols * panel_w > SMP_MAX_DIM || (double)rows * panel_h + top > SMP_MAX_DIM)
        return smp__fail(errbuf, "smp_grid: %d x %d panels of %d x %d exceed %d px", cols, rows,
                          panel_w, panel_h, SMP_MAX_DIM);
    if (smp_canvas_init(&c, cols * panel_w, rows * panel_h + top, SMP_WHITE, errbuf)) return 1;
    if (title) {
        char buf[SMP__LABEL];
        double ts = smp__fit_title(buf, title, c.w - 32, 3, 2);
        smp_text_ex(&c, c.w / 2.0, 12, buf, ts, SMP__TEXT, 0.5, 0, 0);
    }
    for (i = 0; i < n; i++) {
        if (smp__draw_panel(&c, (i % cols) * panel_w, top + (i / cols) * panel_h, panel_w, panel_h,
                             &panels[i], errbuf)) {
            smp_canvas_free(&c);
            return 1;
        }
    }
    i = smp_write_png(&c, png_path, errbuf);
    smp_canvas_free(&c);
    return i;
}

/* Render one panel at the spec's own size (0: SMP_DEFAULT_W x SMP_DEFAULT_H). */
static int smp__single(const char *who, const smp_panel *p, int w, int h, const char *png_path,
                         char *errbuf) {
    w = w ? w : SMP_DEFAULT_W;
    h = h ? h : SMP_DEFAULT_H;
    if (smp__check_panel(who, w, h, errbuf)) return 1;
    return smp_grid(p, 1, 1, w, h, NULL, png_path, errbuf);
}

SMPDEF int smp_line_chart(const smp_line_spec *sp, const char *png_path, char *errbuf) {
    smp_panel p = {NULL, NULL, NULL};
    p.line = sp;
    if (!sp) return smp__fail(errbuf, "smp_line_chart: spec is NULL");
    return smp__single("smp_line_chart", &p, sp->width, sp->height, png_path, errbuf);
}

SMPDEF int smp_bar_chart(const smp_bar_spec *sp, const char *png_path, char *errbuf) {
    smp_panel p = {NULL, NULL, NULL};
    p.bar = sp;
    if (!sp) return smp__fail(errbuf, "smp_bar_chart: spec is NULL");
    return smp__single("smp_bar_chart", &p, sp->width, sp->height, png_path, errbuf);
}

SMPDEF int smp_heatmap(const smp_heatmap_spec *sp, const char *png_path, char *errbuf) {
    smp_panel p = {NULL, NULL, NULL};
    p.heatmap = sp;
    if (!sp) return smp__fail(errbuf, "smp_heatmap: spec is NULL");
    return smp__single("smp_heatmap", &p, sp->width, sp->height, png_path, errbuf);
}

/* ---- data: CSV, smoothing, bands over runs ------------------------------------------ */

SMPDEF void smp_free(void *p) { SMP_FREE(p); }

SMPDEF void smp_csv_free(smp_csv *t) {
    SMP_FREE(t->v);
    memset(t, 0, sizeof *t);
}

/* The header line's names, comma-separated (cut to SMP_CSV_NAME - 1 bytes). */
static void smp__csv_header(smp_csv *t, char *line) {
    char *tok = strtok(line, ",\r\n");
    while (tok && t->n_cols < SMP_CSV_MAX_COLS) {
        snprintf(t->names[t->n_cols++], SMP_CSV_NAME, "%s", tok);
        tok = strtok(NULL, ",\r\n");
    }
}

/* Room for one more row: capacity doubles. */
static int smp__csv_grow(smp_csv *t, int *cap) {
    float *v;
    if (t->n_rows < *cap) return 0;
    *cap = *cap ? 2 * *cap : 256;
    v = (float *)SMP_REALLOC(t->v, (size_t)*cap * (t->n_cols ? t->n_cols : 1) * sizeof(float));
    if (!v) return 1;
    t->v = v;
    return 0;
}

/* One data line into row n_rows: a cell strtof cannot read is NaN. */
static void smp__csv_row(smp_csv *t, const char *line) {
    float *row = t->v + (size_t)t->n_rows * t->n_cols;
    const char *p = line;
    int c;
    for (c = 0; c < t->n_cols; c++) {
        char *end;
        row[c] = strtof(p, &end);
        if (end == p) row[c] = NAN;
        p = strchr(end, ',');
        p = p ? p + 1 : end + strlen(end);
    }
    t->n_rows++;
}

SMPDEF int smp_csv_read(smp_csv *t, const char *path, char *errbuf) {
    FILE *f;
    char line[SMP_CSV_LINE];
    int cap = 0;
    memset(t, 0, sizeof *t);
    f = fopen(path, "r");
    if (!f) return smp__fail(errbuf, "smp_csv_read: cannot open '%s': %s", path, strerror(errno));
    if (fgets(line, sizeof line, f)) smp__csv_header(t, line);
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '\n' || line[0] == '\r') continue;
        if (smp__csv_grow(t, &cap)) {
            fclose(f);
            smp_csv_free(t);
            return smp__fail(errbuf, "smp_csv_read: out of memory reading '%s'", path);
        }
        smp__csv_row(t, line);
    }
    fclose(f);
    if (t->n_cols == 0) return smp__fail(errbuf, "smp_csv_read: '%s' has no header row", path);
    return 0;
}

SMPDEF int smp_csv_col(const smp_csv *t, const char *name) {
    int c;
    for (c = 0; c < t->n_cols; c++)
        if (strcmp(t->names[c], name) == 0) return c;
    return -1;
}

SMPDEF float smp_csv_at(const smp_csv *t, int row, int col) {
    if (row < 0 || row >= t->n_rows || col < 0 || col >= t->n_cols) return NAN;
    return t->v[(size_t)row * t->n_cols + col];
}

SMPDEF float *smp_csv_column(const smp_csv *t, const char *name) {
    int c = smp_csv_col(t, name), r;
    float *out = (float *)SMP_MALLOC(sizeof(float) * (size_t)(t->n_rows > 0 ? t->n_rows : 1));
    for (r = 0; out && r < t->n_rows; r++) out[r] = smp_csv_at(t, r, c);
    return out;
}

SMPDEF void smp_csv_series_free(smp_series *se, int n) {
    int i;
    for (i = 0; i < n; i++) {
        SMP_FREE((void *)se[i].x);
        SMP_FREE((void *)se[i].y);
        SMP_FREE((void *)se[i].name);
    }
}

/* A copy of [s, s+n) as a new string. */
static char *smp__strndup(const char *s, size_t n) {
    char *d = (char *)SMP_MALLOC(n + 1);
    if (d) memcpy(d, s, n), d[n] = 0;
    return d;
}

/* One "col[=name]" item (n bytes at spec) as series *out. */
static int smp__csv_one_series(const smp_csv *t, const char *x_col, const char *spec, size_t n,
                               smp_series *out, char *errbuf) {
    const char *eq = (const char *)memchr(spec, '=', n);
    size_t col_len = eq ? (size_t)(eq - spec) : n;
    char col[SMP_CSV_NAME];
    int r;
    memset(out, 0, sizeof *out);
    snprintf(col, sizeof col, "%.*s", (int)col_len, spec);
    if (smp_csv_col(t, col) < 0) return smp__fail(errbuf, "smp_csv_series: no column '%s'", col);
    out->y = smp_csv_column(t, col);
    out->x = x_col ? smp_csv_column(t, x_col) : (float *)SMP_MALLOC(sizeof(float) * (t->n_rows + 1));
    for (r = 0; !x_col && out->x && r < t->n_rows; r++) ((float *)out->x)[r] = (float)r;
    out->name = eq ? smp__strndup(eq + 1, n - col_len - 1) : smp__strndup(spec, col_len);
    out->n = t->n_rows;
    if (!out->x || !out->y || !out->name) {
        smp_csv_series_free(out, 1);
        return smp__fail(errbuf, "smp_csv_series: out of memory");
    }
    return 0;
}

SMPDEF int smp_csv_series(const smp_csv *t, const char *x_col, const char *y_cols, smp_series *se,
                          int max, char *errbuf) {
    const char *p = y_cols;
    int k = 0;
    if (x_col && smp_csv_col(t, x_col) < 0) return smp__fail(errbuf, "smp_csv_series: no column '%s'", x_col), -1;
    while (p && *p && k < max) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        if (smp__csv_one_series(t, x_col, p, n, &se[k], errbuf)) {
            smp_csv_series_free(se, k);
            return -1;
        }
        k++;
        p = comma ? comma + 1 : NULL;
    }
    return k;
}

SMPDEF void smp_moving_average(const float *y, int n, int half, float *out) {
    int i, j;
    for (i = 0; i < n; i++) {
        double s = 0;
        int k = 0;
        for (j = i - half; j <= i + half; j++)
            if (j >= 0 && j < n && isfinite(y[j])) s += y[j], k++;
        out[i] = k ? (float)(s / k) : NAN;
    }
}

SMPDEF void smp_band_over_runs(const float *const *ys, int k, int n, float *mean, float *lo,
                               float *hi) {
    int i, r;
    for (i = 0; i < n; i++) {
        double s = 0, mn = HUGE_VAL, mx = -HUGE_VAL;
        int m = 0;
        for (r = 0; r < k; r++) {
            double v = ys[r][i];
            if (!isfinite(v)) continue;
            s += v, m++;
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
        mean[i] = m ? (float)(s / m) : NAN;
        if (lo) lo[i] = m ? (float)mn : NAN;
        if (hi) hi[i] = m ? (float)mx : NAN;
    }
}

#ifdef __cplusplus
}
#endif

#endif /* SPARSEMEM_PLOT_IMPLEMENTATION_DONE */
#endif /* SPARSEMEM_PLOT_IMPLEMENTATION */
