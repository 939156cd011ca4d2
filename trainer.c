/* trainer.c - the sparsemem reference trainer.
 *
 *   trainer tokenize --data TEXT_PATH --out DIR [--vocab 8192]
 *   trainer train    --data DIR_OR_TEXT --out RUN_DIR [options]
 *   trainer eval     --ckpt RUN_DIR/model.ckpt --data DIR
 *   trainer sample   --ckpt RUN_DIR/model.ckpt [--prompt TEXT]
 *   trainer report   --out REPORT_DIR RUN_DIR...
 *   trainer plot     --data LOG.csv --y COL,COL --out CHART.png
 *   trainer --help   every option, with its default and range (COMMAND --help: one command)
 *
 * A GPT-style model (sparsemem.h) with optional Engram, PEER and mHC
 * modules, trained on CPU (or the GPU: --device cuda in a build with
 * CUDA, `make trainer_cuda`); per-module learning-rate schedules for the
 * "Redundancy Bottleneck" study; diagnostics logged as CSV per evaluation
 * and drawn as PNG plots. */
#define _POSIX_C_SOURCE 200809L
#ifdef TR_WITH_CUDA /* built by `make trainer_cuda`: the library comes from trainer_cuda.cu */
#include "sparsemem_cuda.cuh"
#else
#define SPARSEMEM_IMPLEMENTATION
#include "sparsemem.h"
#endif

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ===================================================================== */
/* Plots (PNG via stb_image_write)                                       */
/* ===================================================================== */

/* plot.h - PNG charts for the sparsemem reference trainer.
 *
 * Line charts (multiple series, NaN gaps, optional log y, legend placed in the
 * emptiest corner), grouped bar charts (value labels, reference line), heatmaps
 * (viridis colour map with a colour bar) and multi-panel grids, drawn on an RGB
 * raster with anti-aliased lines and text and written as PNG.
 *
 * Use: include (or paste) in ONE C file; every function is static. Needs the
 * Debian libstb-dev headers <stb/stb_image_write.h> and <stb/stb_easy_font.h>.
 * stb_image_write's implementation is compiled here unless PLOT_NO_STB_IMPL is
 * defined (define it when the program compiles STB_IMAGE_WRITE_IMPLEMENTATION
 * elsewhere). Text is stb_easy_font's segment font scaled up (scale 2: capitals
 * 14 px tall).
 *
 * Conventions: colours are 0xRRGGBB. Functions that can fail return 0 on
 * success, non-zero on failure with a message in errbuf (PLOT_ERR_SIZE bytes,
 * may be NULL). Chart specs are meant to be zero-initialised: a 0 field means
 * its default. Canvas coordinates are pixels, x right, y down; pixel (i, j)
 * covers [i, i+1) x [j, j+1). No global state.
 *
 * Charts (to a PNG file, or into a panel of a canvas with the _draw forms):
 *   plot_line_chart(spec, path, err)   plot_line_chart_draw(canvas, x, y, w, h, spec, err)
 *   plot_bar_chart(spec, path, err)    plot_bar_chart_draw(...)
 *   plot_heatmap(spec, path, err)      plot_heatmap_draw(...)
 *   plot_grid(panels, n, cols, panel_w, panel_h, title, path, err)
 * Raster: plot_canvas_init/free, plot_fill, plot_clip/plot_clip_reset,
 *   plot_fill_rect, plot_rect, plot_line, plot_polyline, plot_dashed_hline,
 *   plot_text, plot_text_ex (anchored, optionally rotated), plot_text_width,
 *   plot_get_pixel, plot_write_png; colours: plot_palette, plot_viridis.
 * When the same C file defines STB_IMAGE_WRITE_IMPLEMENTATION itself, include
 * stb_image_write there only once: leave PLOT_NO_STB_IMPL undefined and drop
 * that define, or define PLOT_NO_STB_IMPL when it lives in another file.
 */
#ifndef PLOT_H
#define PLOT_H

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef PLOT_NO_STB_IMPL
#define STB_IMAGE_WRITE_IMPLEMENTATION
#endif
#include <stb/stb_image_write.h>
#include <stb/stb_easy_font.h>

#if defined(__GNUC__) || defined(__clang__)
#define PLOT_FN static __attribute__((unused))
#else
#define PLOT_FN static
#endif

#define PLOT_ERR_SIZE 256
#define PLOT_MAX_SERIES 32
#define PLOT_DEFAULT_W 960
#define PLOT_DEFAULT_H 600
#define PLOT_MIN_DIM 160 /* smallest chart panel, either side */
#define PLOT_MAX_DIM 16384
#define PLOT_WHITE 0xFFFFFFu

#define PLOT__TEXT 0x222222u
#define PLOT__AXIS 0x444444u
#define PLOT__GRID 0xE2E2E2u
#define PLOT__GRID_MINOR 0xF2F2F2u
#define PLOT__REF 0x555555u
#define PLOT__MISSING 0xCCCCCCu
#define PLOT__CAP 7.0  /* stb_easy_font capital height, font units */
#define PLOT__DESC 2.0 /* descender depth below the baseline, font units */
#define PLOT__MAX_TICKS 32
#define PLOT__LABEL 128 /* longest label kept, bytes */

typedef unsigned plot_color; /* 0xRRGGBB */

typedef struct {
    int w, h;
    unsigned char *px;      /* w*h*3 bytes RGB, top row first */
    float *cover;           /* w*h scratch coverage for anti-aliased shapes */
    int cx0, cy0, cx1, cy1; /* clip rectangle [cx0,cx1) x [cy0,cy1) */
} plot_canvas;

typedef struct {
    const char *name;  /* legend entry; NULL: not in the legend */
    const float *x;    /* n x values, or NULL for 0, 1, ..., n-1 */
    const float *y;    /* n y values; NaN/inf (and y <= 0 on a log axis) leave gaps */
    int n;
    plot_color color;  /* 0: palette colour of the series index */
} plot_series;

typedef struct {
    const char *title, *xlabel, *ylabel;
    const plot_series *series;
    int n_series;          /* 1..PLOT_MAX_SERIES */
    int log_y;             /* log10 y axis */
    int fixed_x, fixed_y;  /* 1: use xmin..xmax / ymin..ymax instead of the data range */
    double xmin, xmax, ymin, ymax;
    int has_ref;           /* 1: dashed horizontal reference line at ref_y */
    double ref_y;
    const char *ref_label; /* text over the reference line (may be NULL) */
    int width, height;     /* image size for plot_line_chart; 0: 960 x 600 */
    float line_width;      /* px; 0: 2.5 */
    float text_scale;      /* 0: 2 (capitals 14 px tall) */
} plot_line_spec;

typedef struct {
    const char *name;     /* legend entry; NULL: not in the legend */
    const float *values;  /* one per category; NaN: no bar */
    plot_color color;     /* 0: palette colour of the series index */
} plot_bar_series;

typedef struct {
    const char *title, *xlabel, *ylabel;
    const char *const *categories; /* n_categories labels; NULL: 0, 1, ... */
    int n_categories;
    const plot_bar_series *series; /* bars side by side in each category */
    int n_series;                  /* 1..PLOT_MAX_SERIES */
    int value_labels;              /* 1: print each value over its bar when it fits */
    int fixed_y;
    double ymin, ymax;
    int has_ref;
    double ref_y;
    const char *ref_label;
    int width, height;
    float text_scale;
} plot_bar_spec;

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
} plot_heatmap_spec;

/* One panel of a grid: exactly one of the three is non-NULL. */
typedef struct {
    const plot_line_spec *line;
    const plot_bar_spec *bar;
    const plot_heatmap_spec *heatmap;
} plot_panel;

typedef struct {
    int x0, y0, x1, y1;
} plot__box;

typedef struct {
    double lo, hi; /* shown range; log10 of the data on a log axis */
    int log;
    double p0, p1; /* pixel coordinates of lo and hi */
} plot__axis;

typedef struct {
    int n, n_minor;
    double v[PLOT__MAX_TICKS];
    char label[PLOT__MAX_TICKS][24];
    double minor[PLOT__MAX_TICKS * 8];
} plot__ticks;

/* ---- errors, small helpers ------------------------------------------ */

PLOT_FN int plot__fail(char *errbuf, const char *fmt, ...) {
    if (errbuf) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(errbuf, PLOT_ERR_SIZE, fmt, ap);
        va_end(ap);
    }
    return 1;
}

/* floor/ceil of v as an int clamped to [lo, hi] (safe for huge v). */
PLOT_FN int plot__clampi(double v, int lo, int hi) {
    if (!(v > lo)) return lo;
    if (v > hi) return hi;
    return (int)v;
}

PLOT_FN plot__box plot__mkbox(int x0, int y0, int x1, int y1) {
    plot__box b;
    b.x0 = x0;
    b.y0 = y0;
    b.x1 = x1;
    b.y1 = y1;
    return b;
}

/* Okabe & Ito's colour-blind-safe palette, yellow last (weak on white). */
PLOT_FN plot_color plot_palette(int i) {
    static const plot_color pal[8] = {0x0072B2, 0xD55E00, 0x009E73, 0xE69F00,
                                      0xCC79A7, 0x56B4E9, 0x000000, 0xF0E442};
    return pal[((i % 8) + 8) % 8];
}

/* Viridis (matplotlib's perceptual map) sampled at t = 0, 0.1, ..., 1 and
 * linearly interpolated; t is clamped to [0, 1], NaN maps to 0. */
PLOT_FN plot_color plot_viridis(double t) {
    static const unsigned char tab[11][3] = {
        {68, 1, 84},    {72, 36, 117},  {65, 68, 135},  {53, 95, 141},
        {42, 120, 142}, {33, 145, 140}, {34, 168, 132}, {68, 191, 112},
        {122, 209, 81}, {189, 223, 38}, {253, 231, 37}};
    double f, w;
    int i, k;
    plot_color c = 0;
    if (!(t > 0)) t = 0;
    if (t > 1) t = 1;
    f = t * 10.0;
    i = f >= 10.0 ? 9 : (int)f;
    w = f - i;
    for (k = 0; k < 3; k++) {
        double v = tab[i][k] + (tab[i + 1][k] - tab[i][k]) * w;
        c = (c << 8) | (plot_color)(v + 0.5);
    }
    return c;
}

/* ---- canvas ------------------------------------------------------------ */

PLOT_FN void plot_clip_reset(plot_canvas *c) {
    c->cx0 = 0;
    c->cy0 = 0;
    c->cx1 = c->w;
    c->cy1 = c->h;
}

/* Restrict drawing to [x0,x1) x [y0,y1) (intersected with the canvas). */
PLOT_FN void plot_clip(plot_canvas *c, int x0, int y0, int x1, int y1) {
    c->cx0 = x0 < 0 ? 0 : x0;
    c->cy0 = y0 < 0 ? 0 : y0;
    c->cx1 = x1 > c->w ? c->w : x1;
    c->cy1 = y1 > c->h ? c->h : y1;
}

PLOT_FN void plot_fill(plot_canvas *c, plot_color col) {
    size_t i, n = (size_t)c->w * c->h;
    for (i = 0; i < n; i++) {
        c->px[3 * i + 0] = (unsigned char)(col >> 16);
        c->px[3 * i + 1] = (unsigned char)(col >> 8);
        c->px[3 * i + 2] = (unsigned char)col;
    }
}

PLOT_FN void plot_canvas_free(plot_canvas *c) {
    free(c->px);
    free(c->cover);
    c->px = NULL;
    c->cover = NULL;
    c->w = c->h = 0;
}

PLOT_FN int plot_canvas_init(plot_canvas *c, int w, int h, plot_color bg, char *errbuf) {
    memset(c, 0, sizeof *c);
    if (w < 1 || w > PLOT_MAX_DIM)
        return plot__fail(errbuf, "plot_canvas_init: width %d out of range [1, %d]", w, PLOT_MAX_DIM);
    if (h < 1 || h > PLOT_MAX_DIM)
        return plot__fail(errbuf, "plot_canvas_init: height %d out of range [1, %d]", h, PLOT_MAX_DIM);
    c->px = (unsigned char *)malloc((size_t)w * h * 3);
    c->cover = (float *)malloc((size_t)w * h * sizeof(float));
    if (!c->px || !c->cover) {
        plot_canvas_free(c);
        return plot__fail(errbuf, "plot_canvas_init: out of memory for %d x %d", w, h);
    }
    c->w = w;
    c->h = h;
    plot_clip_reset(c);
    plot_fill(c, bg);
    return 0;
}

PLOT_FN plot_color plot_get_pixel(const plot_canvas *c, int x, int y) {
    const unsigned char *p = c->px + ((size_t)y * c->w + x) * 3;
    return ((plot_color)p[0] << 16) | ((plot_color)p[1] << 8) | p[2];
}

/* pixel = pixel + (col - pixel) * a, inside the clip rectangle. */
PLOT_FN void plot__blend(plot_canvas *c, int x, int y, plot_color col, float a) {
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

PLOT_FN plot__box plot__cover_begin(plot_canvas *c, double x0, double y0, double x1, double y1) {
    plot__box b;
    int y;
    b.x0 = plot__clampi(floor(x0), c->cx0, c->cx1);
    b.x1 = plot__clampi(ceil(x1), b.x0, c->cx1);
    b.y0 = plot__clampi(floor(y0), c->cy0, c->cy1);
    b.y1 = plot__clampi(ceil(y1), b.y0, c->cy1);
    for (y = b.y0; y < b.y1; y++)
        memset(c->cover + (size_t)y * c->w + b.x0, 0, (size_t)(b.x1 - b.x0) * sizeof(float));
    return b;
}

PLOT_FN void plot__cover_max(plot_canvas *c, int x, int y, double a) {
    float *p = c->cover + (size_t)y * c->w + x;
    if (a > *p) *p = (float)(a > 1 ? 1 : a);
}

/* Length of [i, i+1) inside [a, b). */
PLOT_FN double plot__overlap(int i, double a, double b) {
    double lo = a > i ? a : i, hi = b < i + 1 ? b : i + 1;
    return hi > lo ? hi - lo : 0;
}

/* Exact area coverage of the rectangle [x0,x1) x [y0,y1). */
PLOT_FN void plot__cover_rect(plot_canvas *c, plot__box b, double x0, double y0, double x1, double y1) {
    int i, j, i0 = plot__clampi(floor(x0), b.x0, b.x1), i1 = plot__clampi(ceil(x1), b.x0, b.x1);
    int j0 = plot__clampi(floor(y0), b.y0, b.y1), j1 = plot__clampi(ceil(y1), b.y0, b.y1);
    for (j = j0; j < j1; j++) {
        double fy = plot__overlap(j, y0, y1);
        for (i = i0; i < i1; i++) plot__cover_max(c, i, j, fy * plot__overlap(i, x0, x1));
    }
}

/* Capsule of radius r around segment (ax,ay)-(bx,by): coverage of a pixel is
 * r + 0.5 - distance(pixel centre, segment), clamped to [0, 1]. */
PLOT_FN void plot__cover_segment(plot_canvas *c, plot__box b, double ax, double ay, double bx,
                                 double by, double r) {
    double dx = bx - ax, dy = by - ay, len2 = dx * dx + dy * dy;
    int i, j;
    int i0 = plot__clampi(floor((ax < bx ? ax : bx) - r - 1), b.x0, b.x1);
    int i1 = plot__clampi(ceil((ax > bx ? ax : bx) + r + 1), b.x0, b.x1);
    int j0 = plot__clampi(floor((ay < by ? ay : by) - r - 1), b.y0, b.y1);
    int j1 = plot__clampi(ceil((ay > by ? ay : by) + r + 1), b.y0, b.y1);
    for (j = j0; j < j1; j++) {
        for (i = i0; i < i1; i++) {
            double px = i + 0.5 - ax, py = j + 0.5 - ay;
            double t = len2 > 0 ? (px * dx + py * dy) / len2 : 0, ex, ey;
            t = t < 0 ? 0 : t > 1 ? 1 : t;
            ex = px - t * dx;
            ey = py - t * dy;
            plot__cover_max(c, i, j, r + 0.5 - sqrt(ex * ex + ey * ey));
        }
    }
}

PLOT_FN void plot__cover_end(plot_canvas *c, plot__box b, plot_color col) {
    int i, j;
    for (j = b.y0; j < b.y1; j++)
        for (i = b.x0; i < b.x1; i++) plot__blend(c, i, j, col, c->cover[(size_t)j * c->w + i]);
}

/* ---- shapes ------------------------------------------------------------ */

/* Filled rectangle [x0,x1) x [y0,y1); fractional edges are anti-aliased. */
PLOT_FN void plot_fill_rect(plot_canvas *c, double x0, double y0, double x1, double y1, plot_color col) {
    plot__box b;
    double t;
    if (x1 < x0) t = x0, x0 = x1, x1 = t;
    if (y1 < y0) t = y0, y0 = y1, y1 = t;
    b = plot__cover_begin(c, x0, y0, x1, y1);
    plot__cover_rect(c, b, x0, y0, x1, y1);
    plot__cover_end(c, b, col);
}

/* Outline of the rectangle [x0,x1) x [y0,y1), `thick` px wide, inside it. */
PLOT_FN void plot_rect(plot_canvas *c, double x0, double y0, double x1, double y1, double thick,
                       plot_color col) {
    plot_fill_rect(c, x0, y0, x1, y0 + thick, col);
    plot_fill_rect(c, x0, y1 - thick, x1, y1, col);
    plot_fill_rect(c, x0, y0 + thick, x0 + thick, y1 - thick, col);
    plot_fill_rect(c, x1 - thick, y0 + thick, x1, y1 - thick, col);
}

/* Anti-aliased polyline through (xs[i], ys[i]) with round joins, `width` px
 * wide. A non-finite point breaks the line; a point with no finite neighbour
 * becomes a dot. marker_r > 0 also puts a disc of that radius on every point. */
PLOT_FN void plot_polyline(plot_canvas *c, const double *xs, const double *ys, int n, double width,
                           double marker_r, plot_color col) {
    double r = width / 2, dot = marker_r > r ? marker_r : r, bx0 = HUGE_VAL, by0 = HUGE_VAL;
    double bx1 = -HUGE_VAL, by1 = -HUGE_VAL;
    plot__box b;
    int i;
    for (i = 0; i < n; i++) {
        if (!isfinite(xs[i]) || !isfinite(ys[i])) continue;
        bx0 = xs[i] < bx0 ? xs[i] : bx0;
        bx1 = xs[i] > bx1 ? xs[i] : bx1;
        by0 = ys[i] < by0 ? ys[i] : by0;
        by1 = ys[i] > by1 ? ys[i] : by1;
    }
    if (bx0 > bx1) return;
    b = plot__cover_begin(c, bx0 - dot - 1, by0 - dot - 1, bx1 + dot + 1, by1 + dot + 1);
    for (i = 0; i < n; i++) {
        int ok = isfinite(xs[i]) && isfinite(ys[i]);
        int next = i + 1 < n && isfinite(xs[i + 1]) && isfinite(ys[i + 1]);
        int prev = i > 0 && isfinite(xs[i - 1]) && isfinite(ys[i - 1]);
        if (!ok) continue;
        if (next) plot__cover_segment(c, b, xs[i], ys[i], xs[i + 1], ys[i + 1], r);
        if (marker_r > 0 || (!next && !prev)) plot__cover_segment(c, b, xs[i], ys[i], xs[i], ys[i], dot);
    }
    plot__cover_end(c, b, col);
}

PLOT_FN void plot_line(plot_canvas *c, double x0, double y0, double x1, double y1, double width,
                       plot_color col) {
    double xs[2], ys[2];
    xs[0] = x0;
    xs[1] = x1;
    ys[0] = y0;
    ys[1] = y1;
    plot_polyline(c, xs, ys, 2, width, 0, col);
}

/* Dashed horizontal line from x0 to x1 at height y (centre), `width` px thick. */
PLOT_FN void plot_dashed_hline(plot_canvas *c, double x0, double x1, double y, double width,
                               double dash, double gap, plot_color col) {
    double x;
    for (x = x0; x < x1; x += dash + gap)
        plot_fill_rect(c, x, y - width / 2, x + dash < x1 ? x + dash : x1, y + width / 2, col);
}

/* ---- text ----------------------------------------------------------------
 * stb_easy_font builds each glyph from axis-aligned quads in font units
 * (capitals 7 high, advance ~6); they are scaled and rasterised with exact
 * area coverage, so any scale works and integer scales are crisp. */

PLOT_FN char plot__printable(char ch) {
    unsigned char u = (unsigned char)ch;
    return (u >= 32 && u < 127) ? ch : '?';
}

PLOT_FN int plot__advance(char ch) {
    char one[2];
    one[0] = plot__printable(ch);
    one[1] = 0;
    return stb_easy_font_width(one);
}

/* Width in px of the drawn text (the last glyph's trailing spacing excluded). */
PLOT_FN double plot_text_width(const char *text, double scale) {
    int u = 0;
    if (!text || !*text) return 0;
    for (; *text; text++) u += plot__advance(*text);
    return (u - 1) * scale;
}

/* Cover the glyph quads of `text` with its top-left at (x, y); `up` rotates
 * it 90 degrees counter-clockwise (read bottom to top), (x, y) then being the
 * top-left of the rotated box. wu is the text width in font units. */
PLOT_FN void plot__cover_text(plot_canvas *c, plot__box b, double x, double y, const char *text,
                              double s, int up, double wu) {
    char one[2], vbuf[4096];
    double u = 0;
    int q, nq;
    for (; *text; text++) {
        one[0] = plot__printable(*text);
        one[1] = 0;
        nq = stb_easy_font_print(0, 0, one, NULL, vbuf, (int)sizeof vbuf);
        for (q = 0; q < nq; q++) { /* vertices 0 and 2 are opposite corners of the quad */
            float a[2], z[2];
            memcpy(a, vbuf + q * 64, sizeof a);
            memcpy(z, vbuf + q * 64 + 32, sizeof z);
            if (up)
                plot__cover_rect(c, b, x + a[1] * s, y + (wu - u - z[0]) * s, x + z[1] * s,
                                 y + (wu - u - a[0]) * s);
            else
                plot__cover_rect(c, b, x + (u + a[0]) * s, y + a[1] * s, x + (u + z[0]) * s,
                                 y + z[1] * s);
        }
        u += plot__advance(*text);
    }
}

/* Text anchored at (x, y): (ax, ay) are fractions of its box (0 left/top,
 * 0.5 centre, 1 right/bottom). The box is the text width by the capital height
 * (descenders hang below it); `up` draws it rotated to read bottom to top. */
PLOT_FN void plot_text_ex(plot_canvas *c, double x, double y, const char *text, double scale,
                          plot_color col, double ax, double ay, int up) {
    double wu = plot_text_width(text, 1), bw = up ? PLOT__CAP * scale : wu * scale;
    double bh = up ? wu * scale : PLOT__CAP * scale;
    plot__box b;
    if (!text || !*text) return;
    x = floor(x - ax * bw + 0.5);
    y = floor(y - ay * bh + 0.5);
    b = plot__cover_begin(c, x - 1, y - 1, x + bw + PLOT__DESC * scale + 1,
                          y + bh + PLOT__DESC * scale + 1);
    plot__cover_text(c, b, x, y, text, scale, up, wu);
    plot__cover_end(c, b, col);
}

/* Pixels covered by horizontal anchored text, descenders and `pad` around included. */
PLOT_FN plot__box plot__text_box(double x, double y, const char *text, double scale, double ax,
                                 double ay, double pad) {
    double bw = plot_text_width(text, scale), x0 = floor(x - ax * bw + 0.5);
    double y0 = floor(y - ay * PLOT__CAP * scale + 0.5);
    return plot__mkbox((int)floor(x0 - pad), (int)floor(y0 - pad), (int)ceil(x0 + bw + pad),
                       (int)ceil(y0 + (PLOT__CAP + PLOT__DESC) * scale + pad));
}

/* Horizontal anchored text on a white box, readable over lines and grid. */
PLOT_FN void plot__text_on_white(plot_canvas *c, double x, double y, const char *text, double scale,
                                 plot_color col, double ax, double ay) {
    plot__box b = plot__text_box(x, y, text, scale, ax, ay, scale + 1);
    if (!text || !*text) return;
    plot_fill_rect(c, b.x0, b.y0, b.x1, b.y1, PLOT_WHITE);
    plot_text_ex(c, x, y, text, scale, col, ax, ay, 0);
}

PLOT_FN void plot_text(plot_canvas *c, double x, double y, const char *text, double scale,
                       plot_color col) {
    plot_text_ex(c, x, y, text, scale, col, 0, 0, 0);
}

/* Copy src to dst (PLOT__LABEL bytes), cut with ".." to fit max_px. */
PLOT_FN void plot__fit_text(char *dst, const char *src, double max_px, double s) {
    int n;
    snprintf(dst, PLOT__LABEL, "%s", src ? src : "");
    for (n = (int)strlen(dst); n > 0 && plot_text_width(dst, s) > max_px; n--)
        snprintf(dst, PLOT__LABEL, "%.*s..", n - 1, src);
}

/* ---- numbers and ticks ---------------------------------------------------- */

/* Decimals needed to print multiples of step (a 1-2-5 value). */
PLOT_FN int plot__decimals(double step) {
    int d = (int)ceil(-log10(step) - 1e-6);
    return d < 0 ? 0 : d > 6 ? 6 : d;
}

/* v printed to the resolution of step; scientific when |v| >= 1e6 or < 1e-3. */
PLOT_FN void plot__fmt_value(char *buf, size_t cap, double v, double step) {
    double a = fabs(v);
    if (a < 1e-9 * step) v = a = 0; /* no "-0.0" from rounding */
    if (a == 0 && step < 1e-3) {
        snprintf(buf, cap, "0"); /* beside scientific neighbours */
    } else if (a != 0 && (a >= 1e6 || a < 1e-3)) {
        int e = (int)floor(log10(a));
        double p = pow(10.0, e);
        snprintf(buf, cap, "%.*fe%d", plot__decimals(step / p), v / p, e);
    } else {
        snprintf(buf, cap, "%.*f", plot__decimals(step), v);
    }
}

/* v to about `sig` significant digits. */
PLOT_FN void plot__fmt_sig(char *buf, size_t cap, double v, int sig) {
    double a = fabs(v);
    size_t n;
    plot__fmt_value(buf, cap, v, a > 0 ? pow(10.0, floor(log10(a)) - (sig - 1)) : 1);
    if (!strchr(buf, '.') || strchr(buf, 'e')) return;
    for (n = strlen(buf); buf[n - 1] == '0'; n--) buf[n - 1] = 0; /* 0.810 -> 0.81 */
    if (buf[n - 1] == '.') buf[n - 1] = 0;
}

/* 1-2-5 step giving about `target` intervals over span. */
PLOT_FN double plot__nice_step(double span, int target) {
    double raw = span / (target > 0 ? target : 1), mag = pow(10.0, floor(log10(raw))), f = raw / mag;
    return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
}

/* Multiples of a 1-2-5 step in [lo, hi]. Labels share a suffix: k or M when
 * the largest |tick| is 1e4..1e10 (20000 prints as 20k), a common exponent
 * when it is smaller than 1e-3 or larger (-9.5e-7 prints as -0.95e-6). */
PLOT_FN void plot__ticks_linear(plot__ticks *t, double lo, double hi, int target) {
    double step = plot__nice_step(hi - lo, target), maxabs = 0, unit = 1;
    char suffix[8] = "";
    int i;
    double k;
    t->n = t->n_minor = 0;
    for (k = ceil(lo / step - 1e-9); t->n < PLOT__MAX_TICKS && k * step <= hi + 1e-9 * step; k++) {
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
        plot__fmt_value(num, sizeof num, t->v[i] / unit, step / unit);
        snprintf(t->label[i], sizeof t->label[i], "%s%s", num, t->v[i] != 0 ? suffix : "");
    }
}

/* Ticks for a log10 axis showing [lo, hi] (in log10 units): linear ticks when
 * it spans under a decade, 1-2-5 per decade under 2.5 decades, otherwise every
 * k-th decade, with minor ticks at 2..9 x 10^d when every decade is labelled. */
PLOT_FN void plot__ticks_log(plot__ticks *t, double lo, double hi, int target) {
    double span = hi - lo;
    int nm = span < 2.5 ? 3 : 1, kstep = (int)ceil(span / (target > 0 ? target : 1)), d, m;
    if (span < 1) {
        plot__ticks_linear(t, pow(10.0, lo), pow(10.0, hi), target);
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
            if (major && t->n < PLOT__MAX_TICKS) {
                plot__fmt_value(t->label[t->n], sizeof t->label[0], v, v);
                t->v[t->n++] = v;
            } else if (kstep == 1 && t->n_minor < PLOT__MAX_TICKS * 8) {
                t->minor[t->n_minor++] = v;
            }
        }
    }
}

PLOT_FN void plot__axis_ticks(plot__ticks *t, const plot__axis *a, int target) {
    if (a->log) plot__ticks_log(t, a->lo, a->hi, target);
    else plot__ticks_linear(t, a->lo, a->hi, target);
}

PLOT_FN double plot__max_label_width(const plot__ticks *t, double s) {
    double w = 0;
    int i;
    for (i = 0; i < t->n; i++) {
        double wi = plot_text_width(t->label[i], s);
        w = wi > w ? wi : w;
    }
    return w;
}

/* Pixel coordinate of data value v. */
PLOT_FN double plot__map(const plot__axis *a, double v) {
    double t = a->log ? log10(v) : v;
    return a->p0 + (t - a->lo) / (a->hi - a->lo) * (a->p1 - a->p0);
}

/* Widen [lo, hi] by frac of its span each side; an empty range becomes +-10%
 * of its value (or +-0.5 around 0). */
PLOT_FN void plot__pad_range(double *lo, double *hi, double frac) {
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

PLOT_FN double plot__pad(double s) { return 4 * s + 4; }
PLOT_FN double plot__title_scale(double s) { return floor(s * 1.5 + 0.5); }

/* Plot area of a panel, leaving room for the title, the axis labels, `left`
 * px of y tick labels, `bottom` px of x tick labels and `right` px. */
PLOT_FN plot__box plot__layout(plot__box panel, double s, const char *title, const char *xlabel,
                               const char *ylabel, double left, double bottom, double right) {
    double pad = plot__pad(s), line = (PLOT__CAP + PLOT__DESC) * s, ts = plot__title_scale(s);
    plot__box a;
    a.x0 = (int)(panel.x0 + pad + (ylabel ? line + 10 : 0) + left + 10);
    a.x1 = (int)(panel.x1 - pad - right - 4 * s);
    a.y0 = (int)(panel.y0 + pad + (title ? (PLOT__CAP + PLOT__DESC) * ts + 12 : PLOT__CAP * s));
    a.y1 = (int)(panel.y1 - pad - (xlabel ? line + 10 : 0) - bottom - 10);
    if (a.x1 < a.x0 + 8) a.x1 = a.x0 + 8;
    if (a.y1 < a.y0 + 8) a.y1 = a.y0 + 8;
    return a;
}

PLOT_FN void plot__draw_titles(plot_canvas *c, plot__box panel, plot__box area, double s,
                               const char *title, const char *xlabel, const char *ylabel) {
    double pad = plot__pad(s), mid_x = (area.x0 + area.x1) / 2.0, ts = plot__title_scale(s);
    char buf[PLOT__LABEL];
    if (title) { /* centred on the area unless that pushes it out of the panel */
        plot__fit_text(buf, title, panel.x1 - panel.x0 - 2 * pad, ts);
        mid_x = fmax(mid_x, panel.x0 + pad + plot_text_width(buf, ts) / 2);
        mid_x = fmin(mid_x, panel.x1 - pad - plot_text_width(buf, ts) / 2);
        plot_text_ex(c, mid_x, panel.y0 + pad, buf, ts, PLOT__TEXT, 0.5, 0, 0);
    }
    if (xlabel) {
        plot__fit_text(buf, xlabel, area.x1 - area.x0, s);
        plot_text_ex(c, (area.x0 + area.x1) / 2.0, panel.y1 - pad - PLOT__DESC * s, buf, s, PLOT__TEXT,
                     0.5, 1, 0);
    }
    if (ylabel) {
        plot__fit_text(buf, ylabel, area.y1 - area.y0, s);
        plot_text_ex(c, panel.x0 + pad, (area.y0 + area.y1) / 2.0, buf, s, PLOT__TEXT, 0, 0.5, 1);
    }
}

/* Grid lines at the ticks of a vertical (y) or horizontal (x) axis. */
PLOT_FN void plot__draw_grid(plot_canvas *c, plot__box area, const plot__axis *a,
                             const plot__ticks *t, int is_y) {
    int i;
    for (i = 0; i < t->n_minor + t->n; i++) {
        int minor = i < t->n_minor;
        double p = floor(plot__map(a, minor ? t->minor[i] : t->v[i - t->n_minor]));
        plot_color col = minor ? PLOT__GRID_MINOR : PLOT__GRID;
        if (is_y) plot_fill_rect(c, area.x0, p, area.x1, p + 1, col);
        else plot_fill_rect(c, p, area.y0, p + 1, area.y1, col);
    }
}

/* Frame around the area, tick marks and tick labels of the given axes. */
PLOT_FN void plot__draw_axes(plot_canvas *c, plot__box area, const plot__axis *xa,
                             const plot__ticks *xt, const plot__axis *ya, const plot__ticks *yt,
                             double s) {
    int i;
    plot_rect(c, area.x0 - 1, area.y0 - 1, area.x1 + 1, area.y1 + 1, 1, PLOT__AXIS);
    for (i = 0; ya && i < yt->n; i++) {
        double p = floor(plot__map(ya, yt->v[i]));
        if (p < area.y0 - 1 || p > area.y1) continue;
        plot_fill_rect(c, area.x0 - 6, p, area.x0 - 1, p + 1, PLOT__AXIS);
        plot_text_ex(c, area.x0 - 9, p + 0.5, yt->label[i], s, PLOT__TEXT, 1, 0.5, 0);
    }
    for (i = 0; xa && i < xt->n; i++) {
        double p = floor(plot__map(xa, xt->v[i]));
        if (p < area.x0 - 1 || p > area.x1) continue;
        plot_fill_rect(c, p, area.y1 + 1, p + 1, area.y1 + 6, PLOT__AXIS);
        plot_text_ex(c, p + 0.5, area.y1 + 10, xt->label[i], s, PLOT__TEXT, 0.5, 0, 0);
    }
}

/* x ticks: as many as fit side by side without their labels touching. */
PLOT_FN void plot__fit_xticks(plot__ticks *t, const plot__axis *a, double width, double s) {
    int target;
    for (target = (int)(width / (40 * s)); target > 1; target--) {
        plot__axis_ticks(t, a, target);
        if (t->n * (plot__max_label_width(t, s) + 8 * s) <= width) return;
    }
    plot__axis_ticks(t, a, 1);
}

PLOT_FN int plot__ytick_target(plot__box panel, double s) {
    int n = (int)((panel.y1 - panel.y0) / (40 * s));
    return n < 3 ? 3 : n > 8 ? 8 : n;
}

/* Pixel row of a reference value, or NAN when it is off the axis. */
PLOT_FN double plot__ref_pos(plot__box area, const plot__axis *ya, double v) {
    double p;
    if (!isfinite(v) || (ya->log && !(v > 0))) return NAN;
    p = plot__map(ya, v);
    return p >= area.y0 && p <= area.y1 ? p : NAN;
}

PLOT_FN void plot__ref_line(plot_canvas *c, plot__box area, const plot__axis *ya, double v) {
    double p = plot__ref_pos(area, ya, v);
    if (p == p) plot_dashed_hline(c, area.x0, area.x1, p, 2, 10, 6, PLOT__REF);
}

/* Pixels in [x0,x1) x [y0,y1) that are neither background nor grid. */
PLOT_FN long plot__ink(const plot_canvas *c, int x0, int y0, int x1, int y1) {
    long n = 0;
    int x, y;
    for (y = y0 < 0 ? 0 : y0; y < y1 && y < c->h; y++)
        for (x = x0 < 0 ? 0 : x0; x < x1 && x < c->w; x++) {
            plot_color p = plot_get_pixel(c, x, y);
            n += p != PLOT_WHITE && p != PLOT__GRID && p != PLOT__GRID_MINOR;
        }
    return n;
}

/* Label of a reference line: above or below it, at its right or left end,
 * wherever the drawn data leaves the most room (ties: right, above). */
PLOT_FN void plot__ref_label(plot_canvas *c, plot__box area, const plot__axis *ya, double v,
                             const char *label, double s) {
    double p = plot__ref_pos(area, ya, v), gap = (PLOT__DESC + 1) * s + 3, best_x = 0, best_y = 0;
    long best_ink = -1;
    int k, best_k = 0;
    if (!(p == p) || !label) return;
    for (k = 0; k < 4; k++) {
        double x = k % 2 == 0 ? area.x1 - 6 : area.x0 + 6, y = k < 2 ? p - gap : p + s + 3;
        plot__box b = plot__text_box(x, y, label, s, k % 2 == 0, k < 2, s + 1);
        long ink = b.y0 < area.y0 || b.y1 > area.y1 ? -1 : plot__ink(c, b.x0, b.y0, b.x1, b.y1);
        if (ink >= 0 && (best_ink < 0 || ink < best_ink)) best_ink = ink, best_x = x, best_y = y, best_k = k;
    }
    if (best_ink >= 0)
        plot__text_on_white(c, best_x, best_y, label, s, PLOT__REF, best_k % 2 == 0, best_k < 2);
}

/* Legend entries with their measured box. Entries with a NULL name are
 * left out; `boxes` draws square swatches (bars), else line segments. */
typedef struct {
    const char *names[PLOT_MAX_SERIES];
    plot_color cols[PLOT_MAX_SERIES];
    int n, boxes, w, h; /* w = h = 0 when no entry has a name */
    double lw, s, row, sw;
} plot__legend;

PLOT_FN void plot__legend_make(plot__legend *L, int boxes, double lw, double s) {
    double maxw = 0;
    int i, shown = 0;
    L->boxes = boxes;
    L->lw = lw;
    L->s = s;
    L->row = (PLOT__CAP + 4) * s + 2;
    L->sw = boxes ? PLOT__CAP * s : 13 * s;
    for (i = 0; i < L->n; i++) {
        if (!L->names[i]) continue;
        shown++;
        maxw = plot_text_width(L->names[i], s) > maxw ? plot_text_width(L->names[i], s) : maxw;
    }
    L->w = shown ? (int)(L->sw + maxw + (boxes ? 9 : 11) * s + 2) : 0;
    L->h = shown ? (int)(shown * L->row + 2 * s + 4) : 0;
}

/* A legend covering over half the area's height or 40% of its width goes
 * outside, right of the area. */
PLOT_FN int plot__legend_outside(const plot__legend *L, plot__box area) {
    return L->h > (area.y1 - area.y0) / 2 || L->w > (area.x1 - area.x0) * 2 / 5;
}

PLOT_FN void plot__legend_draw_at(plot_canvas *c, const plot__legend *L, int x, int y) {
    double s = L->s, th = PLOT__CAP * s;
    int i, k;
    plot_fill_rect(c, x, y, x + L->w, y + L->h, PLOT_WHITE);
    plot_rect(c, x, y, x + L->w, y + L->h, 1, 0xBBBBBBu);
    for (i = 0, k = 0; i < L->n; i++) {
        double mid, x0 = x + 3 * s;
        if (!L->names[i]) continue;
        mid = y + 2 + s + (k++ + 0.5) * L->row;
        if (L->boxes) plot_fill_rect(c, x0, mid - th / 2, x0 + L->sw, mid + th / 2, L->cols[i]);
        else plot_line(c, x0, mid, x0 + L->sw, mid, L->lw, L->cols[i]);
        plot_text_ex(c, x0 + L->sw + (L->boxes ? 3 : 5) * s, mid, L->names[i], s, PLOT__TEXT, 0, 0.5, 0);
    }
}

/* Outside: right of the area. Inside: the corner covering the least drawn
 * data (ties: top right, top left, bottom right, bottom left). */
PLOT_FN void plot__legend_place(plot_canvas *c, const plot__legend *L, plot__box area, int outside) {
    int k, best = 0;
    long best_ink = -1;
    if (!L->w) return;
    if (outside) {
        plot__legend_draw_at(c, L, area.x1 + 12, area.y0);
        return;
    }
    for (k = 0; k < 4; k++) {
        int x = k % 2 == 0 ? area.x1 - 10 - L->w : area.x0 + 10;
        int y = k < 2 ? area.y0 + 10 : area.y1 - 10 - L->h;
        long ink = plot__ink(c, x, y, x + L->w, y + L->h);
        if (best_ink < 0 || ink < best_ink) best_ink = ink, best = k;
    }
    plot__legend_draw_at(c, L, best % 2 == 0 ? area.x1 - 10 - L->w : area.x0 + 10,
                         best < 2 ? area.y0 + 10 : area.y1 - 10 - L->h);
}

PLOT_FN plot_color plot__series_color(plot_color given, int i) {
    return given ? given : plot_palette(i);
}

PLOT_FN int plot__check_panel(const char *who, int w, int h, char *errbuf) {
    if (w < PLOT_MIN_DIM || w > PLOT_MAX_DIM)
        return plot__fail(errbuf, "%s: width %d out of range [%d, %d]", who, w, PLOT_MIN_DIM, PLOT_MAX_DIM);
    if (h < PLOT_MIN_DIM || h > PLOT_MAX_DIM)
        return plot__fail(errbuf, "%s: height %d out of range [%d, %d]", who, h, PLOT_MIN_DIM, PLOT_MAX_DIM);
    return 0;
}

PLOT_FN int plot__check_nseries(const char *who, int n, char *errbuf) {
    if (n < 1 || n > PLOT_MAX_SERIES)
        return plot__fail(errbuf, "%s: n_series %d out of range [1, %d]", who, n, PLOT_MAX_SERIES);
    return 0;
}

/* ---- line chart ------------------------------------------------------------ */

PLOT_FN int plot__check_line(const plot_line_spec *sp, char *errbuf) {
    const char *who = "plot_line_chart";
    int i;
    if (!sp) return plot__fail(errbuf, "%s: spec is NULL", who);
    if (plot__check_nseries(who, sp->n_series, errbuf)) return 1;
    if (!sp->series) return plot__fail(errbuf, "%s: series is NULL", who);
    for (i = 0; i < sp->n_series; i++) {
        if (sp->series[i].n < 0)
            return plot__fail(errbuf, "%s: series[%d].n = %d must be >= 0", who, i, sp->series[i].n);
        if (sp->series[i].n > 0 && !sp->series[i].y)
            return plot__fail(errbuf, "%s: series[%d].y is NULL", who, i);
    }
    if (sp->fixed_x && !(sp->xmax > sp->xmin))
        return plot__fail(errbuf, "%s: xmax (%g) must be > xmin (%g)", who, sp->xmax, sp->xmin);
    if (sp->fixed_y && !(sp->ymax > sp->ymin))
        return plot__fail(errbuf, "%s: ymax (%g) must be > ymin (%g)", who, sp->ymax, sp->ymin);
    if (sp->fixed_y && sp->log_y && !(sp->ymin > 0))
        return plot__fail(errbuf, "%s: ymin (%g) must be > 0 on a log y axis", who, sp->ymin);
    if (sp->line_width < 0 || sp->line_width > 50)
        return plot__fail(errbuf, "%s: line_width %g out of range [0, 50]", who, sp->line_width);
    if (sp->text_scale < 0 || sp->text_scale > 10)
        return plot__fail(errbuf, "%s: text_scale %g out of range [0, 10]", who, sp->text_scale);
    return 0;
}

/* Axis ranges from the finite data (and the reference line), padded, unless
 * fixed. Returns whether any point is drawable. */
PLOT_FN int plot__line_ranges(const plot_line_spec *sp, plot__axis *xa, plot__axis *ya) {
    double x0 = HUGE_VAL, x1 = -HUGE_VAL, y0 = HUGE_VAL, y1 = -HUGE_VAL;
    int i, j, found;
    for (i = 0; i < sp->n_series; i++) {
        const plot_series *se = &sp->series[i];
        for (j = 0; j < se->n; j++) {
            double x = se->x ? se->x[j] : j, y = se->y[j];
            if (!isfinite(x) || !isfinite(y) || (sp->log_y && !(y > 0))) continue;
            y = sp->log_y ? log10(y) : y;
            x0 = x < x0 ? x : x0;
            x1 = x > x1 ? x : x1;
            y0 = y < y0 ? y : y0;
            y1 = y > y1 ? y : y1;
        }
    }
    found = x0 <= x1;
    if (!found) x0 = y0 = 0, x1 = y1 = 1;
    if (sp->log_y && y0 == y1) y0 -= 0.5, y1 += 0.5; /* one value: a decade around it */
    if (found && sp->has_ref && isfinite(sp->ref_y) && (!sp->log_y || sp->ref_y > 0)) {
        double r = sp->log_y ? log10(sp->ref_y) : sp->ref_y;
        y0 = r < y0 ? r : y0;
        y1 = r > y1 ? r : y1;
    }
    plot__pad_range(&x0, &x1, 0.02);
    plot__pad_range(&y0, &y1, 0.05);
    xa->lo = sp->fixed_x ? sp->xmin : x0;
    xa->hi = sp->fixed_x ? sp->xmax : x1;
    xa->log = 0;
    ya->lo = sp->fixed_y ? (sp->log_y ? log10(sp->ymin) : sp->ymin) : y0;
    ya->hi = sp->fixed_y ? (sp->log_y ? log10(sp->ymax) : sp->ymax) : y1;
    ya->log = sp->log_y != 0;
    return found;
}

/* One series as an anti-aliased polyline; markers when it has <= 40 points. */
PLOT_FN int plot__draw_series(plot_canvas *c, const plot_series *se, const plot__axis *xa,
                              const plot__axis *ya, plot_color col, double lw, char *errbuf) {
    double *xs = (double *)malloc((size_t)(se->n > 0 ? se->n : 1) * 2 * sizeof(double)), *ys;
    int i, finite = 0;
    if (!xs) return plot__fail(errbuf, "plot_line_chart: out of memory for %d points", se->n);
    ys = xs + se->n;
    for (i = 0; i < se->n; i++) {
        double x = se->x ? se->x[i] : i, y = se->y[i];
        int ok = isfinite(x) && isfinite(y) && (!ya->log || y > 0);
        xs[i] = ok ? plot__map(xa, x) : NAN;
        ys[i] = ok ? plot__map(ya, y) : NAN;
        finite += ok;
    }
    plot_polyline(c, xs, ys, se->n, lw, finite <= 40 ? lw * 1.4 : 0, col);
    free(xs);
    return 0;
}

/* How far x tick labels reach right of the area's right edge. */
PLOT_FN double plot__xlabel_overhang(const plot__ticks *t, const plot__axis *xa, plot__box area, double s) {
    double over = 0;
    int i;
    for (i = 0; i < t->n; i++) {
        double p = floor(plot__map(xa, t->v[i])), r = p + 0.5 + plot_text_width(t->label[i], s) / 2 - area.x1;
        if (p <= area.x1 && r > over) over = r;
    }
    return over;
}

/* Plot area and x ticks of a line chart: the legend goes right of the area
 * when it would cover too much of it, and the last x label must fit. */
PLOT_FN plot__box plot__line_layout(plot__box panel, const plot_line_spec *sp, double s,
                                    const plot__ticks *yt, const plot__legend *L, int *outside,
                                    plot__axis *xa, plot__ticks *xt) {
    double left = plot__max_label_width(yt, s), bottom = (PLOT__CAP + PLOT__DESC) * s, right, over;
    plot__box area = plot__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, bottom, 0);
    int pass;
    *outside = L->w && plot__legend_outside(L, area);
    right = *outside ? L->w + 12 : 0;
    for (pass = 0; pass < 4; pass++) { /* narrower area, other ticks: settles in 1-2 passes */
        area = plot__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, bottom, right);
        xa->p0 = area.x0;
        xa->p1 = area.x1;
        plot__fit_xticks(xt, xa, area.x1 - area.x0, s);
        over = plot__xlabel_overhang(xt, xa, area, s) - (panel.x1 - area.x1 - plot__pad(s) / 2);
        if (over <= 0) break;
        right += over;
    }
    return area;
}

/* Draw a line chart into the panel [x, x+w) x [y, y+h) of the canvas. */
PLOT_FN int plot_line_chart_draw(plot_canvas *c, int x, int y, int w, int h,
                                 const plot_line_spec *sp, char *errbuf) {
    plot__box panel = plot__mkbox(x, y, x + w, y + h), area;
    plot__axis xa, ya;
    plot__ticks xt, yt;
    plot__legend L;
    double s, lw;
    int i, found, outside, err = 0;
    if (plot__check_line(sp, errbuf) || plot__check_panel("plot_line_chart", w, h, errbuf)) return 1;
    s = sp->text_scale > 0 ? sp->text_scale : 2;
    lw = sp->line_width > 0 ? sp->line_width : 2.5;
    L.n = sp->n_series;
    for (i = 0; i < sp->n_series; i++) {
        L.cols[i] = plot__series_color(sp->series[i].color, i);
        L.names[i] = sp->series[i].name;
    }
    plot__legend_make(&L, 0, lw, s);
    found = plot__line_ranges(sp, &xa, &ya);
    plot__axis_ticks(&yt, &ya, plot__ytick_target(panel, s));
    area = plot__line_layout(panel, sp, s, &yt, &L, &outside, &xa, &xt);
    ya.p0 = area.y1;
    ya.p1 = area.y0;
    plot_clip(c, x, y, x + w, y + h);
    plot_fill_rect(c, x, y, x + w, y + h, PLOT_WHITE);
    plot__draw_grid(c, area, &ya, &yt, 1);
    plot__draw_grid(c, area, &xa, &xt, 0);
    plot_clip(c, area.x0, area.y0, area.x1, area.y1);
    if (sp->has_ref) plot__ref_line(c, area, &ya, sp->ref_y); /* under the data */
    for (i = 0; i < sp->n_series && !err; i++)
        err = plot__draw_series(c, &sp->series[i], &xa, &ya, L.cols[i], lw, errbuf);
    if (!err) {
        if (sp->has_ref) plot__ref_label(c, area, &ya, sp->ref_y, sp->ref_label, s);
        if (!found)
            plot_text_ex(c, (area.x0 + area.x1) / 2.0, (area.y0 + area.y1) / 2.0, "no finite data",
                         s, PLOT__REF, 0.5, 0.5, 0);
        plot_clip(c, x, y, x + w, y + h);
        plot__legend_place(c, &L, area, outside);
        plot__draw_axes(c, area, &xa, &xt, &ya, &yt, s);
        plot__draw_titles(c, panel, area, s, sp->title, sp->xlabel, sp->ylabel);
    }
    plot_clip_reset(c);
    return err;
}

/* ---- bar chart -------------------------------------------------------------- */

PLOT_FN int plot__check_bar(const plot_bar_spec *sp, char *errbuf) {
    const char *who = "plot_bar_chart";
    int i;
    if (!sp) return plot__fail(errbuf, "%s: spec is NULL", who);
    if (sp->n_categories < 1 || sp->n_categories > 4096)
        return plot__fail(errbuf, "%s: n_categories %d out of range [1, 4096]", who, sp->n_categories);
    if (plot__check_nseries(who, sp->n_series, errbuf)) return 1;
    if (!sp->series) return plot__fail(errbuf, "%s: series is NULL", who);
    for (i = 0; i < sp->n_series; i++)
        if (!sp->series[i].values) return plot__fail(errbuf, "%s: series[%d].values is NULL", who, i);
    if (sp->fixed_y && !(sp->ymax > sp->ymin))
        return plot__fail(errbuf, "%s: ymax (%g) must be > ymin (%g)", who, sp->ymax, sp->ymin);
    if (sp->text_scale < 0 || sp->text_scale > 10)
        return plot__fail(errbuf, "%s: text_scale %g out of range [0, 10]", who, sp->text_scale);
    return 0;
}

/* y range of a bar chart: always includes 0 (bars start there) and the
 * reference line; headroom above for value labels. */
PLOT_FN void plot__bar_range(const plot_bar_spec *sp, plot__axis *ya) {
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

PLOT_FN void plot__category_label(char *dst, const char *const *labels, int i, double max_px, double s) {
    char idx[16];
    snprintf(idx, sizeof idx, "%d", i);
    plot__fit_text(dst, labels ? labels[i] : idx, max_px, s);
}

/* Labels along a categorical axis: horizontal when every label fits its slot
 * of `slot` px, else rotated and cut to max_len px. Returns the px they take
 * below the axis and sets *rotated. */
PLOT_FN double plot__category_extent(const char *const *labels, int n, double slot, double max_len,
                                     double s, int *rotated) {
    char buf[PLOT__LABEL];
    double longest = 0;
    int i;
    for (i = 0; i < n; i++) {
        plot__category_label(buf, labels, i, max_len, s);
        longest = plot_text_width(buf, s) > longest ? plot_text_width(buf, s) : longest;
    }
    *rotated = longest > slot - 4 * s;
    return *rotated ? longest : (PLOT__CAP + PLOT__DESC) * s;
}

/* Category labels under [area.x0, area.x1) at slot centres; when there are
 * too many for the space, every k-th. */
PLOT_FN void plot__draw_categories(plot_canvas *c, plot__box area, const char *const *labels, int n,
                                   double max_len, int rotated, double s) {
    double slot = (double)(area.x1 - area.x0) / n, need = rotated ? (PLOT__CAP + 3) * s : 0;
    int i, every = 1;
    char buf[PLOT__LABEL];
    while (need > 0 && slot * every < need) every++;
    for (i = 0; i < n; i += every) {
        double mid = area.x0 + (i + 0.5) * slot;
        plot__category_label(buf, labels, i, rotated ? max_len : slot, s);
        plot_text_ex(c, mid, area.y1 + 8, buf, s, PLOT__TEXT, 0.5, 0, rotated);
    }
}

PLOT_FN void plot__bar_value_label(plot_canvas *c, double xmid, double bar_w, double ytop, int below,
                                   double v, double s) {
    char buf[24];
    double sc = s;
    plot__fmt_sig(buf, sizeof buf, v, 3);
    if (plot_text_width(buf, sc) > bar_w + 2 * s) sc = s * 0.75;
    if (plot_text_width(buf, sc) > bar_w + 2 * s) return;
    /* clear of the bar end by the white box: its padding (sc + 1) and, above, the descender room */
    plot__text_on_white(c, xmid, below ? ytop + sc + 3 : ytop - (PLOT__DESC + 1) * sc - 3, buf, sc,
                        PLOT__TEXT, 0.5, below ? 0 : 1);
}

/* One pass draws the bars (labels = 0), a second their value labels. */
PLOT_FN void plot__draw_bars(plot_canvas *c, plot__box area, const plot_bar_spec *sp,
                             const plot__axis *ya, const plot_color *cols, int labels, double s) {
    double slot = (double)(area.x1 - area.x0) / sp->n_categories;
    double bw = slot * 0.8 / sp->n_series, base = plot__map(ya, 0);
    double gap = bw > 6 ? 1 : 0;
    int i, j;
    for (j = 0; j < sp->n_categories; j++) {
        for (i = 0; i < sp->n_series; i++) {
            double v = sp->series[i].values[j], x0 = area.x0 + slot * (j + 0.1) + i * bw, top;
            if (!isfinite(v)) continue;
            top = plot__map(ya, v);
            if (labels) plot__bar_value_label(c, x0 + bw / 2, bw, top, v < 0, v, s);
            else plot_fill_rect(c, x0 + gap, top, x0 + bw - gap, base, cols[i]);
        }
    }
    if (!labels && ya->lo < 0 && ya->hi > 0)
        plot_fill_rect(c, area.x0, floor(base), area.x1, floor(base) + 1, PLOT__AXIS);
}

/* Draw a grouped bar chart into the panel [x, x+w) x [y, y+h). */
PLOT_FN int plot_bar_chart_draw(plot_canvas *c, int x, int y, int w, int h, const plot_bar_spec *sp,
                                char *errbuf) {
    plot__box panel = plot__mkbox(x, y, x + w, y + h), area;
    plot__axis ya;
    plot__ticks yt;
    plot__legend L;
    double s, left, below, max_len, right;
    int i, rotated, outside;
    if (plot__check_bar(sp, errbuf) || plot__check_panel("plot_bar_chart", w, h, errbuf)) return 1;
    s = sp->text_scale > 0 ? sp->text_scale : 2;
    max_len = h * 0.25;
    plot__bar_range(sp, &ya);
    plot__axis_ticks(&yt, &ya, plot__ytick_target(panel, s));
    L.n = sp->n_series;
    for (i = 0; i < sp->n_series; i++) {
        L.cols[i] = plot__series_color(sp->series[i].color, i);
        L.names[i] = sp->n_series > 1 ? sp->series[i].name : NULL; /* one series: no legend */
    }
    plot__legend_make(&L, 1, 0, s);
    left = plot__max_label_width(&yt, s);
    area = plot__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, 0, 0);
    outside = L.w && plot__legend_outside(&L, area);
    right = outside ? L.w + 12 : 0;
    area = plot__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, 0, right);
    below = plot__category_extent(sp->categories, sp->n_categories,
                                  (double)(area.x1 - area.x0) / sp->n_categories, max_len, s, &rotated);
    area = plot__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, below, right);
    ya.p0 = area.y1;
    ya.p1 = area.y0;
    plot_clip(c, x, y, x + w, y + h);
    plot_fill_rect(c, x, y, x + w, y + h, PLOT_WHITE);
    plot__draw_grid(c, area, &ya, &yt, 1);
    plot_clip(c, area.x0, area.y0, area.x1, area.y1);
    plot__draw_bars(c, area, sp, &ya, L.cols, 0, s);
    if (sp->has_ref) plot__ref_line(c, area, &ya, sp->ref_y); /* over the bars */
    if (sp->value_labels) plot__draw_bars(c, area, sp, &ya, L.cols, 1, s);
    if (sp->has_ref) plot__ref_label(c, area, &ya, sp->ref_y, sp->ref_label, s);
    plot_clip(c, x, y, x + w, y + h);
    plot__legend_place(c, &L, area, outside);
    plot__draw_axes(c, area, NULL, NULL, &ya, &yt, s);
    plot__draw_categories(c, area, sp->categories, sp->n_categories, max_len, rotated, s);
    plot__draw_titles(c, panel, area, s, sp->title, sp->xlabel, sp->ylabel);
    plot_clip_reset(c);
    return 0;
}

/* ---- heatmap ----------------------------------------------------------------- */

PLOT_FN int plot__check_heatmap(const plot_heatmap_spec *sp, char *errbuf) {
    const char *who = "plot_heatmap";
    if (!sp) return plot__fail(errbuf, "%s: spec is NULL", who);
    if (sp->rows < 1 || sp->rows > 4096)
        return plot__fail(errbuf, "%s: rows %d out of range [1, 4096]", who, sp->rows);
    if (sp->cols < 1 || sp->cols > 4096)
        return plot__fail(errbuf, "%s: cols %d out of range [1, 4096]", who, sp->cols);
    if (!sp->values) return plot__fail(errbuf, "%s: values is NULL", who);
    if (sp->fixed_range && !(sp->vmax > sp->vmin))
        return plot__fail(errbuf, "%s: vmax (%g) must be > vmin (%g)", who, sp->vmax, sp->vmin);
    if (sp->text_scale < 0 || sp->text_scale > 10)
        return plot__fail(errbuf, "%s: text_scale %g out of range [0, 10]", who, sp->text_scale);
    return 0;
}

PLOT_FN void plot__heat_range(const plot_heatmap_spec *sp, plot__axis *va) {
    double lo = HUGE_VAL, hi = -HUGE_VAL;
    int i, n = sp->rows * sp->cols;
    for (i = 0; i < n; i++) {
        double v = sp->values[i];
        if (!isfinite(v)) continue;
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    if (lo > hi) lo = 0, hi = 1;
    if (hi == lo) plot__pad_range(&lo, &hi, 0);
    va->lo = sp->fixed_range ? sp->vmin : lo;
    va->hi = sp->fixed_range ? sp->vmax : hi;
    va->log = 0;
}

/* Cells, each value mapped through viridis; optional value text in cells
 * where it fits, white on dark cells and black on light ones. */
PLOT_FN void plot__draw_cells(plot_canvas *c, plot__box area, const plot_heatmap_spec *sp,
                              const plot__axis *va, double s) {
    double cw = (double)(area.x1 - area.x0) / sp->cols, ch = (double)(area.y1 - area.y0) / sp->rows;
    double step = (va->hi - va->lo) / 100;
    int i, j;
    for (i = 0; i < sp->rows; i++) {
        for (j = 0; j < sp->cols; j++) {
            double v = sp->values[(size_t)i * sp->cols + j];
            double x0 = floor(area.x0 + j * cw), x1 = floor(area.x0 + (j + 1) * cw);
            double y0 = floor(area.y0 + i * ch), y1 = floor(area.y0 + (i + 1) * ch);
            plot_color col = isfinite(v) ? plot_viridis((v - va->lo) / (va->hi - va->lo)) : PLOT__MISSING;
            char buf[24];
            double lum = 0.2126 * (col >> 16) + 0.7152 * ((col >> 8) & 255) + 0.0722 * (col & 255);
            plot_fill_rect(c, x0, y0, x1, y1, col);
            if (!sp->annotate || !isfinite(v)) continue;
            plot__fmt_value(buf, sizeof buf, v, step);
            if (plot_text_width(buf, s) > cw - 4 || (PLOT__CAP + 2) * s > ch) continue;
            plot_text_ex(c, (x0 + x1) / 2, (y0 + y1) / 2, buf, s, lum < 140 ? PLOT_WHITE : 0x111111u,
                         0.5, 0.5, 0);
        }
    }
}

/* Row labels right-aligned left of the area, every k-th when rows are short. */
PLOT_FN void plot__draw_row_labels(plot_canvas *c, plot__box area, const char *const *labels, int n,
                                   double max_len, double s) {
    double slot = (double)(area.y1 - area.y0) / n;
    int i, every = 1;
    char buf[PLOT__LABEL];
    while (slot * every < (PLOT__CAP + 3) * s) every++;
    for (i = 0; i < n; i += every) {
        plot__category_label(buf, labels, i, max_len, s);
        plot_text_ex(c, area.x0 - 8, area.y0 + (i + 0.5) * slot, buf, s, PLOT__TEXT, 1, 0.5, 0);
    }
}

/* Vertical colour bar right of the area with ticks and an optional label. */
PLOT_FN void plot__draw_colorbar(plot_canvas *c, plot__box area, const plot__axis *va,
                                 const plot__ticks *t, const char *label, double s) {
    int x0 = area.x1 + (int)(6 * s), x1 = x0 + (int)(10 * s), y, i;
    double labw = plot__max_label_width(t, s);
    for (y = area.y0; y < area.y1; y++)
        plot_fill_rect(c, x0, y, x1, y + 1,
                       plot_viridis((area.y1 - 0.5 - y) / (double)(area.y1 - area.y0)));
    plot_rect(c, x0 - 1, area.y0 - 1, x1 + 1, area.y1 + 1, 1, PLOT__AXIS);
    for (i = 0; i < t->n; i++) {
        double p = floor(plot__map(va, t->v[i]));
        plot_fill_rect(c, x1 + 1, p, x1 + 6, p + 1, PLOT__AXIS);
        plot_text_ex(c, x1 + 9, p + 0.5, t->label[i], s, PLOT__TEXT, 0, 0.5, 0);
    }
    plot_text_ex(c, x1 + 9 + labw + 10, (area.y0 + area.y1) / 2.0, label, s, PLOT__TEXT, 0, 0.5, 1);
}

PLOT_FN double plot__max_category_width(const char *const *labels, int n, double max_len, double s) {
    char buf[PLOT__LABEL];
    double m = 0;
    int i;
    for (i = 0; i < n; i++) {
        plot__category_label(buf, labels, i, max_len, s);
        m = plot_text_width(buf, s) > m ? plot_text_width(buf, s) : m;
    }
    return m;
}

/* Draw a heatmap into the panel [x, x+w) x [y, y+h). */
PLOT_FN int plot_heatmap_draw(plot_canvas *c, int x, int y, int w, int h, const plot_heatmap_spec *sp,
                              char *errbuf) {
    plot__box panel = plot__mkbox(x, y, x + w, y + h), area;
    plot__axis va;
    plot__ticks vt;
    double s, left, right, below, max_col = h * 0.25;
    int rotated;
    if (plot__check_heatmap(sp, errbuf) || plot__check_panel("plot_heatmap", w, h, errbuf)) return 1;
    s = sp->text_scale > 0 ? sp->text_scale : 2;
    plot__heat_range(sp, &va);
    plot__axis_ticks(&vt, &va, plot__ytick_target(panel, s));
    left = plot__max_category_width(sp->row_labels, sp->rows, w * 0.25, s);
    right = 16 * s + 9 + plot__max_label_width(&vt, s) + (sp->value_label ? 10 + (PLOT__CAP + PLOT__DESC) * s : 0);
    area = plot__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, 0, right);
    below = plot__category_extent(sp->col_labels, sp->cols, (double)(area.x1 - area.x0) / sp->cols,
                                  max_col, s, &rotated);
    area = plot__layout(panel, s, sp->title, sp->xlabel, sp->ylabel, left, below, right);
    va.p0 = area.y1;
    va.p1 = area.y0;
    plot_clip(c, x, y, x + w, y + h);
    plot_fill_rect(c, x, y, x + w, y + h, PLOT_WHITE);
    plot__draw_cells(c, area, sp, &va, s);
    plot__draw_axes(c, area, NULL, NULL, NULL, NULL, s);
    plot__draw_row_labels(c, area, sp->row_labels, sp->rows, w * 0.25, s);
    plot__draw_categories(c, area, sp->col_labels, sp->cols, max_col, rotated, s);
    plot__draw_colorbar(c, area, &va, &vt, sp->value_label, s);
    plot__draw_titles(c, panel, area, s, sp->title, sp->xlabel, sp->ylabel);
    plot_clip_reset(c);
    return 0;
}

/* ---- PNG output and whole-image helpers ------------------------------------------ */

typedef struct {
    FILE *f;
    int failed;
} plot__png_sink;

PLOT_FN void plot__png_write(void *ctx, void *data, int size) {
    plot__png_sink *sink = (plot__png_sink *)ctx;
    if (!sink->failed && fwrite(data, 1, (size_t)size, sink->f) != (size_t)size) sink->failed = 1;
}

/* Write the canvas as an RGB PNG; a failed write leaves no partial file. */
PLOT_FN int plot_write_png(const plot_canvas *c, const char *path, char *errbuf) {
    plot__png_sink sink;
    int ok;
    if (!path || !*path) return plot__fail(errbuf, "plot_write_png: png_path is empty");
    sink.f = fopen(path, "wb");
    sink.failed = 0;
    if (!sink.f) return plot__fail(errbuf, "plot_write_png: cannot open '%s': %s", path, strerror(errno));
    ok = stbi_write_png_to_func(plot__png_write, &sink, c->w, c->h, 3, c->px, c->w * 3);
    if (fclose(sink.f) != 0) sink.failed = 1;
    if (!ok || sink.failed) {
        remove(path);
        return plot__fail(errbuf, "plot_write_png: writing '%s' failed%s", path,
                          ok ? " (disk full?)" : " (PNG encoder out of memory)");
    }
    return 0;
}

PLOT_FN int plot__draw_panel(plot_canvas *c, int x, int y, int w, int h, const plot_panel *p,
                             char *errbuf) {
    if (p->line) return plot_line_chart_draw(c, x, y, w, h, p->line, errbuf);
    if (p->bar) return plot_bar_chart_draw(c, x, y, w, h, p->bar, errbuf);
    return plot_heatmap_draw(c, x, y, w, h, p->heatmap, errbuf);
}

/* Panels in a grid of `cols` columns, each panel_w x panel_h, under an
 * optional title, written to png_path. Each panel's own width/height are
 * ignored here. */
PLOT_FN int plot_grid(const plot_panel *panels, int n, int cols, int panel_w, int panel_h,
                      const char *title, const char *png_path, char *errbuf) {
    plot_canvas c;
    int i, rows, top;
    if (!panels || n < 1) return plot__fail(errbuf, "plot_grid: n %d must be >= 1", n);
    if (cols < 1) return plot__fail(errbuf, "plot_grid: cols %d must be >= 1", cols);
    for (i = 0; i < n; i++)
        if (!!panels[i].line + !!panels[i].bar + !!panels[i].heatmap != 1)
            return plot__fail(errbuf, "plot_grid: panels[%d] must set exactly one of line, bar, heatmap", i);
    if (plot__check_panel("plot_grid", panel_w, panel_h, errbuf)) return 1;
    rows = (n + cols - 1) / cols;
    cols = n < cols ? n : cols;
    top = title ? 48 : 0;
    if ((double)cols * panel_w > PLOT_MAX_DIM || (double)rows * panel_h + top > PLOT_MAX_DIM)
        return plot__fail(errbuf, "plot_grid: %d x %d panels of %d x %d exceed %d px", cols, rows,
                          panel_w, panel_h, PLOT_MAX_DIM);
    if (plot_canvas_init(&c, cols * panel_w, rows * panel_h + top, PLOT_WHITE, errbuf)) return 1;
    plot_text_ex(&c, c.w / 2.0, 12, title, 3, PLOT__TEXT, 0.5, 0, 0);
    for (i = 0; i < n; i++) {
        if (plot__draw_panel(&c, (i % cols) * panel_w, top + (i / cols) * panel_h, panel_w, panel_h,
                             &panels[i], errbuf)) {
            plot_canvas_free(&c);
            return 1;
        }
    }
    i = plot_write_png(&c, png_path, errbuf);
    plot_canvas_free(&c);
    return i;
}

/* Render one panel at the spec's own size (0: PLOT_DEFAULT_W x PLOT_DEFAULT_H). */
PLOT_FN int plot__single(const char *who, const plot_panel *p, int w, int h, const char *png_path,
                         char *errbuf) {
    w = w ? w : PLOT_DEFAULT_W;
    h = h ? h : PLOT_DEFAULT_H;
    if (plot__check_panel(who, w, h, errbuf)) return 1;
    return plot_grid(p, 1, 1, w, h, NULL, png_path, errbuf);
}

PLOT_FN int plot_line_chart(const plot_line_spec *sp, const char *png_path, char *errbuf) {
    plot_panel p = {NULL, NULL, NULL};
    p.line = sp;
    if (!sp) return plot__fail(errbuf, "plot_line_chart: spec is NULL");
    return plot__single("plot_line_chart", &p, sp->width, sp->height, png_path, errbuf);
}

PLOT_FN int plot_bar_chart(const plot_bar_spec *sp, const char *png_path, char *errbuf) {
    plot_panel p = {NULL, NULL, NULL};
    p.bar = sp;
    if (!sp) return plot__fail(errbuf, "plot_bar_chart: spec is NULL");
    return plot__single("plot_bar_chart", &p, sp->width, sp->height, png_path, errbuf);
}

PLOT_FN int plot_heatmap(const plot_heatmap_spec *sp, const char *png_path, char *errbuf) {
    plot_panel p = {NULL, NULL, NULL};
    p.heatmap = sp;
    if (!sp) return plot__fail(errbuf, "plot_heatmap: spec is NULL");
    return plot__single("plot_heatmap", &p, sp->width, sp->height, png_path, errbuf);
}

#endif /* PLOT_H */

/* ===================================================================== */
/* Options                                                               */
/* ===================================================================== */

#define TR_MAX_PHASES 16
#define TR_PATH 1024

/* Module groups a schedule can address. "engram" drives both Engram groups
 * (the table keeps its own lr multiple of the dense part). */
enum { TR_G_BACKBONE, TR_G_ENGRAM, TR_G_PEER, TR_G_MHC, TR_N_MODULES };
static const char *const tr_module_names[TR_N_MODULES] = {"backbone", "engram", "peer", "mhc"};

/* One phase of a schedule: from step `start` on, module m trains at
 * lr[m] (absolute; < 0 = unchanged from the previous phase). */
typedef struct {
    long start;
    double start_frac; /* >= 0: start given as a fraction of the run */
    float lr[TR_N_MODULES];
} tr_phase;

typedef struct {
    /* what to do */
    char data[TR_PATH], out[TR_PATH], ckpt[TR_PATH], prompt[TR_PATH];
    char preset[32], schedule[512], engram_layers[128], peer_layers[128], strategy[32];
    char device[16], precision[8];
    char tokenizer[TR_PATH], tag[64], baseline[64], x_col[32], y_cols[256], title[128];
    int log_y;
    int resume, threads, vocab, quiet;
    long stop_after;      /* stop (with a checkpoint) after this step; 0 = run to the end */
    long debug_nan_step;  /* tests only: poison a weight before this step (-1 = never) */
    long debug_kill_step; /* tests only: SIGKILL the process at this step (-1 = never), */
    int debug_kill_in_ckpt; /* inside its checkpoint (written, not renamed) or after it */
    float val_frac;
    /* model */
    int n_layer, d_model, n_head, seq_len, d_ff;
    int engram_heads, engram_d_head, engram_shared, engram_no_sqrt;
    long engram_rows;
    int peer_experts_sqrt, peer_heads, peer_topk, peer_d_key, peer_add, peer_shared_keys;
    int mhc_streams, mhc_static;
    char engram_mhc[16];  /* per-stream | branch; empty: per-stream, branch with --device cuda */
    long nine, hot_labels;
    char nine_route[16];
    int nine_hot_key, nine_hot_gate;
    /* training */
    int batch, eval_batches;
    long steps, warmup, eval_every, ckpt_every;
    float lr, min_lr_ratio, weight_decay, grad_clip;
    float lr_engram, lr_peer, lr_mhc; /* < 0: same as lr (table: x5) */
    int coord_every;
    uint64_t seed, data_seed;
    /* sample */
    int sample_tokens, top_k;
    float temperature;
    /* parsed schedule */
    tr_phase phases[TR_MAX_PHASES];
    int n_phases;
} tr_opts;

typedef enum { O_INT, O_LONG, O_FLOAT, O_STR, O_FLAG, O_U64 } tr_opt_kind;

/* One option: its field, and for a number the values it accepts, [lo, hi]
 * or with lo_open (lo, hi]. A value out of range is an error naming the
 * option and the range, before it reaches any arithmetic. */
typedef struct {
    const char *name;
    tr_opt_kind kind;
    size_t offset, size;
    double lo, hi;
    int lo_open;
    const char *help;
} tr_opt_spec;

#define TR_FIELD(field) offsetof(tr_opts, field), sizeof(((tr_opts *)0)->field)
/* a string or a flag */
#define OPT(name, kind, field, help) {name, kind, TR_FIELD(field), 0, 0, 0, help}
/* a number in [lo, hi]; NUM_GT: in (lo, hi] */
#define NUM(name, kind, field, lo, hi, help) {name, kind, TR_FIELD(field), lo, hi, 0, help}
#define NUM_GT(name, kind, field, lo, hi, help) {name, kind, TR_FIELD(field), lo, hi, 1, help}
#define TR_STEPS_MAX 1e9 /* step counts and intervals */
#define TR_U32_MAX 4294967295.0
#define TR_U64_MAX 18446744073709551615.0

static const tr_opt_spec tr_specs[] = {
    OPT("data", O_STR, data, "text file/folder, or a folder made by `tokenize`"),
    OPT("out", O_STR, out, "output folder (run, tokenized data, or report)"),
    OPT("ckpt", O_STR, ckpt, "checkpoint file (eval, sample)"),
    OPT("resume", O_FLAG, resume, "continue from OUT/model.ckpt"),
    NUM("stop-after", O_LONG, stop_after, 0, TR_STEPS_MAX, "stop with a checkpoint after this step (0 = run to the end)"),
    OPT("preset", O_STR, preset, "model/training preset: tiny | small | gpt2s"),
    NUM("seed", O_U64, seed, 0, TR_U64_MAX, "model initialisation seed"),
    NUM("data-seed", O_U64, data_seed, 0, TR_U64_MAX, "batch sampling seed"),
    NUM("threads", O_INT, threads, 0, 4096, "OpenMP threads (0 = all cores)"),
    OPT("device", O_STR, device, "train on: cpu | cuda (a build with CUDA: make trainer_cuda)"),
    OPT("precision", O_STR, precision, "GPU GEMMs: tf32 (default with cuda) | fp32 (as the CPU)"),
    OPT("quiet", O_FLAG, quiet, "no progress line"),
    NUM("vocab", O_INT, vocab, SM_BPE_MIN_VOCAB, SM_BPE_MAX_VOCAB, "BPE vocabulary size (tokenize)"),
    NUM_GT("val-frac", O_FLOAT, val_frac, 0, 1, "fraction of documents held out for validation (1 = all: an evaluation set)"),
    OPT("tokenizer", O_STR, tokenizer, "tokenize: reuse this tokenizer.bin instead of training one"),
    OPT("tag", O_STR, tag, "eval: also write RUN/eval_TAG.json (e.g. a cross-domain set)"),
    OPT("baseline", O_STR, baseline, "report: the run label the others are compared with"),
    OPT("x", O_STR, x_col, "plot: x column of the CSV"),
    OPT("y", O_STR, y_cols, "plot: y columns of the CSV, comma-separated"),
    OPT("title", O_STR, title, "plot: chart title"),
    OPT("log-y", O_FLAG, log_y, "plot: logarithmic y axis"),
    NUM("layers", O_INT, n_layer, 1, SM_MAX_SUBLAYERS / 3, "transformer layers"),
    NUM("d-model", O_INT, d_model, 1, 65536, "model width"),
    NUM("heads", O_INT, n_head, 1, 65536, "attention heads"),
    NUM("d-ff", O_INT, d_ff, 0, 1 << 20, "MLP hidden width (0 = 4 x d-model)"),
    NUM("seq", O_INT, seq_len, 1, 65536, "sequence length T"),
    NUM("batch", O_INT, batch, 1, 65536, "sequences per step B"),
    NUM("steps", O_LONG, steps, 1, TR_STEPS_MAX, "training steps"),
    NUM_GT("lr", O_FLOAT, lr, 0, 10, "peak learning rate (backbone)"),
    NUM("lr-engram", O_FLOAT, lr_engram, -1, 10, "Engram lr (< 0: same as --lr; its table trains at 5x)"),
    NUM("lr-peer", O_FLOAT, lr_peer, -1, 10, "PEER lr (< 0: same as --lr)"),
    NUM("lr-mhc", O_FLOAT, lr_mhc, -1, 10, "mHC lr (< 0: same as --lr)"),
    NUM("min-lr-ratio", O_FLOAT, min_lr_ratio, 0, 1, "cosine schedule floor, as a fraction of the peak"),
    NUM("warmup", O_LONG, warmup, 0, TR_STEPS_MAX, "linear warmup steps"),
    NUM("weight-decay", O_FLOAT, weight_decay, 0, 10, "AdamW weight decay (matrices only)"),
    NUM("grad-clip", O_FLOAT, grad_clip, 0, 1e6, "global gradient-norm clip (0 = off)"),
    NUM("eval-every", O_LONG, eval_every, 0, TR_STEPS_MAX, "steps between evaluations (0 = only at the end)"),
    NUM("eval-batches", O_INT, eval_batches, 0, TR_STEPS_MAX, "validation batches per eval (0 = all of it)"),
    NUM("ckpt-every", O_LONG, ckpt_every, 0, TR_STEPS_MAX, "steps between checkpoints (0 = only at the end)"),
    OPT("engram", O_STR, engram_layers, "Engram at these layers, e.g. 1 or 1,3 (empty = off)"),
    NUM("engram-rows", O_LONG, engram_rows, 2, 2147483648.0, "Engram table rows per head (a prime >= it is used)"),
    NUM("engram-heads", O_INT, engram_heads, 1, SM_NGRAM_MAX_HEADS, "Engram hash heads per n-gram order"),
    NUM("engram-d-head", O_INT, engram_d_head, 1, 4096, "Engram row width per head"),
    OPT("engram-shared", O_FLAG, engram_shared, "one Engram table for all Engram layers"),
    OPT("engram-no-sqrt", O_FLAG, engram_no_sqrt, "plain gate (paper) instead of signed sqrt"),
    NUM("nine", O_LONG, nine, 0, TR_U32_MAX, "Engram-Nine hot tier: top-N n-grams per order (0 = off); iso-parameter with --engram-rows"),
    NUM("hot-labels", O_LONG, hot_labels, 0, TR_U32_MAX, "hash-only Engram: label the top-N n-grams hot for route-stratified eval"),
    OPT("nine-route", O_STR, nine_route, "hot-tier indexing: mphf (collision-free) | membership (hashed)"),
    OPT("nine-hot-key", O_FLAG, nine_hot_key, "separate W_K for hot-tier memory (variant)"),
    OPT("nine-hot-gate", O_FLAG, nine_hot_gate, "feed a hot-tier indicator to the gate (variant)"),
    OPT("peer", O_STR, peer_layers, "PEER at these layers (empty = off)"),
    NUM("peer-sqrt-experts", O_INT, peer_experts_sqrt, 1, SM_PEER_MAX_SUB, "s: PEER has s*s experts"),
    NUM("peer-heads", O_INT, peer_heads, 1, 4096, "PEER retrieval heads"),
    NUM("peer-topk", O_INT, peer_topk, 1, SM_TOPK_MAX, "PEER experts per head"),
    NUM("peer-d-key", O_INT, peer_d_key, 2, 65536, "PEER query/key width (even)"),
    NUM("peer-shared-keys", O_INT, peer_shared_keys, 0, 1, "PEER sub-keys: 1 = one set for all heads (paper), 0 = one per head"),
    OPT("peer-add", O_FLAG, peer_add, "add PEER to the MLP instead of replacing it"),
    NUM("mhc", O_INT, mhc_streams, 0, SM_SINKHORN_MAX_N, "mHC residual streams (0 = off, 4 = paper)"),
    OPT("mhc-static", O_FLAG, mhc_static, "static mHC maps (no input dependence)"),
    OPT("engram-mhc", O_STR, engram_mhc, "Engram with mHC: per-stream (reference code; default) | branch (--device cuda: branch)"),
    OPT("strategy", O_STR, strategy, "joint | freeze | differential | auto (see --schedule)"),
    OPT("schedule", O_STR, schedule, "phases 'START:module=lr,...;...' (START a step or N%)"),
    NUM("coord-every", O_INT, coord_every, 0, TR_STEPS_MAX, "steps between automatic lr adjustments (auto; 0 = never)"),
    OPT("prompt", O_STR, prompt, "sample: text to continue"),
    NUM("tokens", O_INT, sample_tokens, 1, 1000000, "sample: tokens to generate"),
    NUM_GT("temperature", O_FLOAT, temperature, 0, 100, "sample: softmax temperature"),
    NUM("top-k", O_INT, top_k, 0, SM_TOPK_MAX, "sample: keep the k most likely tokens (0 = all)"),
};
#define TR_N_SPECS ((int)(sizeof tr_specs / sizeof tr_specs[0]))

static void tr_defaults(tr_opts *o) {
    memset(o, 0, sizeof *o);
    strcpy(o->preset, "tiny");
    strcpy(o->strategy, "joint");
    strcpy(o->baseline, "baseline");
    strcpy(o->nine_route, "mphf");
    strcpy(o->x_col, "step");
    o->seed = 1;
    o->data_seed = 1337;
    o->vocab = 8192;
    o->val_frac = 0.05f;
    o->n_layer = 4, o->d_model = 128, o->n_head = 4, o->seq_len = 128;
    o->batch = 8, o->steps = 600, o->eval_every = 100, o->eval_batches = 0;
    o->lr = 1e-3f, o->min_lr_ratio = 0.1f, o->warmup = 50, o->weight_decay = 0.1f;
    o->grad_clip = 1.0f;
    o->lr_engram = o->lr_peer = o->lr_mhc = -1.0f;
    o->engram_rows = 20011, o->engram_heads = 4, o->engram_d_head = 16;
    o->peer_experts_sqrt = 64, o->peer_heads = 4, o->peer_topk = 8, o->peer_d_key = 64;
    o->peer_shared_keys = 1;
    o->coord_every = 20;
    o->debug_nan_step = o->debug_kill_step = -1;
    o->sample_tokens = 200, o->temperature = 0.8f, o->top_k = 40;
}

/* Presets set the model shape and step budget; explicit options override. */
static int tr_apply_preset(tr_opts *o, const char *name) {
    if (strcmp(name, "tiny") == 0) {
        o->n_layer = 4, o->d_model = 128, o->n_head = 4, o->seq_len = 128, o->batch = 8;
        o->steps = 600, o->eval_every = 100;
    } else if (strcmp(name, "small") == 0) {
        o->n_layer = 6, o->d_model = 256, o->n_head = 8, o->seq_len = 256, o->batch = 16;
        o->steps = 3000, o->eval_every = 250;
    } else if (strcmp(name, "gpt2s") == 0) {
        o->n_layer = 12, o->d_model = 768, o->n_head = 12, o->seq_len = 1024, o->batch = 8;
        o->steps = 20000, o->eval_every = 1000, o->lr = 6e-4f;
    } else {
        return -1;
    }
    return 0;
}

/* The commands: name, arguments, what it does. */
static const char *const tr_commands[][3] = {
    {"tokenize", "--data TEXT_PATH --out DIR [--vocab N --val-frac F --tokenizer FILE]",
     "train a BPE tokenizer on --data and write tokenizer + train/val tokens to --out"},
    {"train", "--data DIR_OR_TEXT --out RUN_DIR [options]",
     "train a model on --data (tokenized folder, or text: tokenized first) into --out"},
    {"eval", "--ckpt RUN_DIR/model.ckpt [--data DIR --tag TAG]", "evaluate --ckpt on the validation split of --data"},
    {"sample", "--ckpt RUN_DIR/model.ckpt [--prompt TEXT --tokens N]", "generate text from --ckpt"},
    {"report", "--out DIR RUN_DIR...", "tables + plots from finished runs"},
    {"plot", "--data F.csv --x step --y a,b --out F.png", "a line chart of CSV columns"},
};
#define TR_N_COMMANDS ((int)(sizeof tr_commands / sizeof tr_commands[0]))

static int tr_command_index(const char *cmd) {
    int c;
    for (c = 0; c < TR_N_COMMANDS; c++)
        if (strcmp(tr_commands[c][0], cmd) == 0) return c;
    return -1;
}

/* "[1, 65536]", "(0, 10]": the values a numeric option accepts. */
static void tr_format_range(const tr_opt_spec *s, char *out, size_t n) {
    if (s->kind == O_FLOAT)
        snprintf(out, n, "%s%g, %g]", s->lo_open ? "(" : "[", s->lo, s->hi);
    else
        snprintf(out, n, "%s%.0f, %.0f]", s->lo_open ? "(" : "[", s->lo, s->hi);
}

/* Every option with its default and range; for one command (cmd >= 0)
 * its arguments first, else the list of commands. */
static void tr_usage(FILE *f, int cmd) {
    int i;
    tr_opts d;
    tr_defaults(&d);
    if (cmd >= 0) {
        fprintf(f, "usage: trainer %s %s\n  %s\n\n", tr_commands[cmd][0], tr_commands[cmd][1], tr_commands[cmd][2]);
    } else {
        fprintf(f, "usage: trainer COMMAND [options]   (trainer COMMAND --help: that command)\n\ncommands:\n");
        for (i = 0; i < TR_N_COMMANDS; i++) fprintf(f, "  %-9s %s\n", tr_commands[i][0], tr_commands[i][2]);
        fprintf(f, "\n");
    }
    fprintf(f, "options (--name VALUE or --name=VALUE):\n");
    for (i = 0; i < TR_N_SPECS; i++) {
        const tr_opt_spec *s = &tr_specs[i];
        const char *p = (const char *)&d + s->offset;
        char def[64] = "", range[64] = "";
        switch (s->kind) {
        case O_INT: snprintf(def, sizeof def, "%d", *(const int *)p); break;
        case O_LONG: snprintf(def, sizeof def, "%ld", *(const long *)p); break;
        case O_FLOAT: snprintf(def, sizeof def, "%g", *(const float *)p); break;
        case O_U64: snprintf(def, sizeof def, "%llu", (unsigned long long)*(const uint64_t *)p); break;
        case O_STR: snprintf(def, sizeof def, "%s", p); break;
        case O_FLAG: break;
        }
        if (s->kind != O_STR && s->kind != O_FLAG && s->kind != O_U64) tr_format_range(s, range, sizeof range);
        fprintf(f, "  --%-18s %s%s%s%s%s%s\n", s->name, s->help, def[0] ? " [" : "", def, def[0] ? "]" : "",
                range[0] ? ", in " : "", range);
    }
    if (cmd >= 0 && strcmp(tr_commands[cmd][0], "train") != 0) return;
    fprintf(f,
            "\nstrategies (module learning rates; see README):\n"
            "  joint         every module at --lr\n"
            "  differential  the write-up's 3 phases scaled to --steps: engram 1e-3/peer 1e-5/mhc 1e-3,\n"
            "                then engram 1e-5/peer 1e-3/mhc 1e-4, then all 5e-4 (phases at 0, 1/3, 2/3)\n"
            "  freeze        staggered freeze: like differential but the slowed modules get lr 0\n"
            "  auto          automatic coordination from measured output/gradient shares\n"
            "  --schedule overrides the phases, e.g. '0:engram=1e-3,peer=1e-5;50%%:all=5e-4'\n");
}

/* The number in val for a numeric option, checked: all of val is the
 * number, an integer fits its field, a float is finite, and the value is
 * in the option's range. Returns 0, or -1 with a message naming the option. */
static int tr_set_number(void *field, const tr_opt_spec *s, const char *val) {
    char *end = NULL, range[64];
    double v;
    long long i = 0;
    unsigned long long u = 0;
    errno = 0;
    if (s->kind == O_FLOAT) v = (float)strtod(val, &end); /* checked as stored */
    else if (s->kind == O_U64) v = (double)(u = strtoull(val, &end, 10));
    else v = (double)(i = strtoll(val, &end, 10));
    if (end == val || *end || (s->kind == O_U64 && strchr(val, '-'))) {
        fprintf(stderr, "trainer: --%s expects %s, got '%s'\n", s->name,
                s->kind == O_FLOAT ? "a number" : s->kind == O_U64 ? "a whole number >= 0" : "a whole number", val);
        return -1;
    }
    tr_format_range(s, range, sizeof range);
    if (s->kind == O_FLOAT && !isfinite(v)) {
        fprintf(stderr, "trainer: --%s expects a finite number in %s, got '%s'\n", s->name, range, val);
        return -1;
    }
    if (errno == ERANGE || !(s->lo_open ? v > s->lo : v >= s->lo) || !(v <= s->hi)) {
        fprintf(stderr, "trainer: --%s %s is out of range: it takes values in %s\n", s->name, val, range);
        return -1;
    }
    switch (s->kind) {
    case O_INT: *(int *)field = (int)i; break;
    case O_LONG: *(long *)field = (long)i; break;
    case O_FLOAT: *(float *)field = (float)v; break;
    case O_U64: *(uint64_t *)field = (uint64_t)u; break;
    default: break;
    }
    return 0;
}

static int tr_set_option(tr_opts *o, const tr_opt_spec *s, const char *val) {
    char *p = (char *)o + s->offset;
    switch (s->kind) {
    case O_STR:
        if (strlen(val) >= s->size) {
            fprintf(stderr, "trainer: --%s is too long (max %zu characters)\n", s->name, s->size - 1);
            return -1;
        }
        strcpy(p, val);
        return 0;
    case O_FLAG: *(int *)p = 1; return 0;
    default: return tr_set_number(p, s, val);
    }
}

/* --device: cpu, or cuda in a build with CUDA. */
static int tr_check_device(const char *device) {
    if (!device[0] || strcmp(device, "cpu") == 0) return 0;
    if (strcmp(device, "cuda") != 0) {
        fprintf(stderr, "trainer: --device %s: expected cpu or cuda\n", device);
        return -1;
    }
#ifndef TR_WITH_CUDA
    fprintf(stderr, "trainer: --device cuda: this trainer was built without CUDA; build the GPU "
                    "trainer with `make trainer_cuda` (needs nvcc) and run ./trainer_cuda\n");
    return -1;
#else
    return 0;
#endif
}

/* --precision: the GPU's GEMMs in TF32 (its default: 10-bit mantissa
 * inputs, fp32 accumulation) or in full fp32, as the CPU always computes;
 * tf32 on the CPU is refused rather than silently ignored. */
static int tr_check_precision(const char *precision, const char *device) {
    if (!precision[0] || strcmp(precision, "fp32") == 0) return 0;
    if (strcmp(precision, "tf32") != 0) {
        fprintf(stderr, "trainer: --precision %s: expected tf32 or fp32\n", precision);
        return -1;
    }
    if (strcmp(device, "cuda") != 0) {
        fprintf(stderr, "trainer: --precision tf32 is for --device cuda (the CPU computes in fp32)\n");
        return -1;
    }
    return 0;
}

/* Parses options after the command; positional arguments are collected
 * (pos has room for argc). Returns 0, -1 on an error (with a message), or
 * TR_HELP for --help / -h. */
#define TR_HELP 2
static int tr_parse(tr_opts *o, int argc, char **argv, char **pos, int *n_pos) {
    int i, j, k;
    *n_pos = 0;
    /* the preset first, so explicit options override it */
    for (i = 0; i < argc; i++)
        if (strncmp(argv[i], "--preset", 8) == 0) {
            const char *v = argv[i][8] == '=' ? argv[i] + 9 : (i + 1 < argc ? argv[i + 1] : "");
            if (tr_apply_preset(o, v) != 0) {
                fprintf(stderr, "trainer: unknown preset '%s' (tiny, small, gpt2s)\n", v);
                return -1;
            }
        }
    for (i = 0; i < argc; i++) {
        const char *a = argv[i], *eq;
        size_t len;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) return TR_HELP;
        if (strncmp(a, "--", 2) != 0) {
            pos[(*n_pos)++] = argv[i];
            continue;
        }
        a += 2;
        eq = strchr(a, '=');
        len = eq ? (size_t)(eq - a) : strlen(a);
        for (j = 0, k = -1; j < TR_N_SPECS; j++)
            if (strlen(tr_specs[j].name) == len && strncmp(tr_specs[j].name, a, len) == 0) k = j;
        if (k < 0) {
            fprintf(stderr, "trainer: unknown option --%.*s (see trainer --help)\n", (int)len, a);
            return -1;
        }
        if (tr_specs[k].kind == O_FLAG) {
            tr_set_option(o, &tr_specs[k], "");
            continue;
        }
        if (!eq && i + 1 >= argc) {
            fprintf(stderr, "trainer: --%s needs a value\n", tr_specs[k].name);
            return -1;
        }
        if (tr_set_option(o, &tr_specs[k], eq ? eq + 1 : argv[++i]) != 0) return -1;
    }
    return tr_check_device(o->device) != 0 || tr_check_precision(o->precision, o->device) != 0 ? -1 : 0;
}

/* "1,3" -> ids {1, 3}; returns the count, or -1 unless s is layer numbers
 * separated by single commas (no sign, no empty item, at most max). */
static int tr_parse_layers(const char *s, int *ids, int max) {
    int n = 0;
    while (*s) {
        long v = 0;
        if (!isdigit((unsigned char)*s) || n >= max) return -1;
        while (isdigit((unsigned char)*s) && v < 100000) v = v * 10 + (*s++ - '0');
        ids[n++] = (int)v;
        if (*s == ',' && s[1]) s++;
        else if (*s) return -1;
    }
    return n;
}

/* ===================================================================== */
/* Schedules                                                             */
/* ===================================================================== */

static int tr_module_index(const char *name, size_t len) {
    int m;
    for (m = 0; m < TR_N_MODULES; m++)
        if (strlen(tr_module_names[m]) == len && strncmp(tr_module_names[m], name, len) == 0) return m;
    return -1;
}

/* Parses "START:mod=lr,mod=lr;START:..." where START is a step or "N%" of
 * the run, mod is backbone|engram|peer|mhc|all and lr a number or
 * "freeze" (= 0). Phases must start in increasing order. On error writes a
 * message naming the problem into msg and returns -1. */
static int tr_parse_schedule(const char *spec, tr_phase *phases, int *n_phases, char *msg,
                             size_t msg_size) {
    const char *p = spec;
    int n = 0;
    while (*p) {
        tr_phase *ph;
        char *end;
        int m;
        if (n >= TR_MAX_PHASES) {
            snprintf(msg, msg_size, "more than %d phases", TR_MAX_PHASES);
            return -1;
        }
        ph = &phases[n];
        for (m = 0; m < TR_N_MODULES; m++) ph->lr[m] = -1.0f;
        ph->start_frac = -1.0;
        ph->start = strtol(p, &end, 10);
        if (end == p || ph->start < 0) {
            snprintf(msg, msg_size, "phase %d: expected a start step, got '%.20s'", n + 1, p);
            return -1;
        }
        if (*end == '%' || *end == '.') {
            double v = strtod(p, &end);
            if (*end != '%' || v < 0 || v > 100) {
                snprintf(msg, msg_size, "phase %d: bad percentage '%.20s'", n + 1, p);
                return -1;
            }
            ph->start_frac = v / 100.0;
            end++;
        }
        if (*end != ':') {
            snprintf(msg, msg_size, "phase %d: expected ':' after the start", n + 1);
            return -1;
        }
        p = end + 1;
        while (*p && *p != ';') {
            const char *eq = strchr(p, '=');
            float lr;
            if (!eq) {
                snprintf(msg, msg_size, "phase %d: expected module=lr at '%.20s'", n + 1, p);
                return -1;
            }
            m = tr_module_index(p, (size_t)(eq - p));
            if (m < 0 && !((size_t)(eq - p) == 3 && strncmp(p, "all", 3) == 0)) {
                snprintf(msg, msg_size, "phase %d: unknown module '%.*s' (backbone, engram, peer, mhc, all)",
                         n + 1, (int)(eq - p), p);
                return -1;
            }
            if (strncmp(eq + 1, "freeze", 6) == 0) {
                lr = 0.0f;
                end = (char *)eq + 7;
            } else {
                lr = strtof(eq + 1, &end);
                if (end == eq + 1 || lr < 0) {
                    snprintf(msg, msg_size, "phase %d: bad learning rate '%.20s'", n + 1, eq + 1);
                    return -1;
                }
            }
            if (m >= 0) {
                ph->lr[m] = lr;
            } else {
                int k;
                for (k = 0; k < TR_N_MODULES; k++) ph->lr[k] = lr;
            }
            p = end;
            if (*p == ',') p++;
            else if (*p && *p != ';') {
                snprintf(msg, msg_size, "phase %d: unexpected '%c'", n + 1, *p);
                return -1;
            }
        }
        if (*p == ';') p++;
        n++;
    }
    *n_phases = n;
    return 0;
}

/* Start step of a phase in a run of `steps` steps. */
static long tr_phase_start(const tr_phase *ph, long steps) {
    return ph->start_frac >= 0 ? (long)(ph->start_frac * (double)steps + 0.5) : ph->start;
}

/* The module lrs in force at `step`: each phase overrides what it names. */
static void tr_schedule_lrs(const tr_phase *phases, int n, long step, long steps,
                            float lr[TR_N_MODULES]) {
    int i, m;
    for (i = 0; i < n; i++) {
        if (tr_phase_start(&phases[i], steps) > step) break;
        for (m = 0; m < TR_N_MODULES; m++)
            if (phases[i].lr[m] >= 0) lr[m] = phases[i].lr[m];
    }
}

/* The strategies of the Redundancy Bottleneck study as schedules. The
 * write-up's phases were 1000 steps each of 3000; here they are thirds of
 * the run. "freeze" replaces the slowed modules' small lr by 0. */
static int tr_strategy_schedule(tr_opts *o, char *msg, size_t msg_size) {
    const char *spec = NULL;
    if (o->schedule[0]) spec = o->schedule;
    else if (strcmp(o->strategy, "differential") == 0)
        spec = "0:engram=1e-3,peer=1e-5,mhc=1e-3;33.3%:engram=1e-5,peer=1e-3,mhc=1e-4;66.7%:all=5e-4";
    else if (strcmp(o->strategy, "freeze") == 0)
        spec = "0:engram=1e-3,peer=freeze,mhc=1e-3;33.3%:engram=freeze,peer=1e-3,mhc=freeze;66.7%:all=5e-4";
    else if (strcmp(o->strategy, "joint") != 0 && strcmp(o->strategy, "auto") != 0) {
        snprintf(msg, msg_size, "unknown strategy '%s' (joint, freeze, differential, auto)", o->strategy);
        return -1;
    }
    o->n_phases = 0;
    return spec ? tr_parse_schedule(spec, o->phases, &o->n_phases, msg, msg_size) : 0;
}

/* ===================================================================== */
/* Data                                                                  */
/* ===================================================================== */

typedef struct {
    sm_bpe bpe;
    sm_canon canon;
    sm_tokens train, val;
    char dir[TR_PATH];
} tr_data;

static void tr_die(const char *what, const sm_error *err) {
    fprintf(stderr, "trainer: %s: %s\n", what, err->msg[0] ? err->msg : sm_strerror(err->code));
    exit(1);
}

static int tr_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int tr_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

static void tr_mkdir(const char *path) {
    char tmp[TR_PATH];
    size_t i;
    snprintf(tmp, sizeof tmp, "%s", path);
    for (i = 1; tmp[i]; i++)
        if (tmp[i] == '/') {
            tmp[i] = 0;
            mkdir(tmp, 0755);
            tmp[i] = '/';
        }
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "trainer: cannot create folder %s: %s\n", path, strerror(errno));
        exit(1);
    }
}

static void tr_join(char *out, const char *dir, const char *name) {
    if (strlen(dir) + strlen(name) + 2 > TR_PATH) {
        fprintf(stderr, "trainer: path too long: %s/%s\n", dir, name);
        exit(1);
    }
    strcpy(out, dir);
    strcat(out, "/");
    strcat(out, name);
}

/* The corpus is text (the tokenizer takes any bytes, but binary data as
 * --data is a mistake, not a corpus). */
static void tr_check_utf8(const sm_corpus *c, const char *path) {
    size_t d;
    for (d = 0; d < c->n_docs; d++) {
        const unsigned char *text = c->text + c->doc_offsets[d];
        size_t n = c->doc_offsets[d + 1] - c->doc_offsets[d], ok = sm_utf8_valid_prefix(text, n);
        if (ok < n) {
            fprintf(stderr, "trainer: --data %s: document %zu is not UTF-8 text (byte 0x%02x at offset %zu); "
                            "give UTF-8 text, or a folder made by `trainer tokenize`\n", path, d + 1, text[ok], ok);
            exit(1);
        }
    }
}

/* Train a tokenizer on the training documents of `text_path` and write
 * tokenizer.bin, train.tok and val.tok into out_dir. */
static void tr_tokenize(const char *text_path, const char *out_dir, int vocab, float val_frac,
                        const char *tokenizer, int quiet) {
    sm_corpus corpus;
    sm_bpe bpe;
    sm_canon canon;
    sm_tokens train, val;
    sm_bpe_config bc = sm_bpe_default_config();
    sm_error err = {SM_OK, ""};
    size_t n_train_docs = 0, train_bytes;
    char path[TR_PATH];
    double t0;
    if (sm_corpus_load(&corpus, text_path, &err) != SM_OK) tr_die("reading the corpus", &err);
    tr_check_utf8(&corpus, text_path);
    if (sm_corpus_split(&corpus, val_frac, &n_train_docs, &err) != SM_OK) tr_die("splitting the corpus", &err);
    bc.vocab_size = (uint32_t)vocab;
    if (sm_bpe_config_validate(&bc, &err) != SM_OK) tr_die("--vocab", &err);
    train_bytes = corpus.doc_offsets[n_train_docs];
    t0 = sm_now();
    if (tokenizer && tokenizer[0]) {
        if (sm_bpe_load(&bpe, tokenizer, &err) != SM_OK) tr_die("--tokenizer", &err);
        if (!quiet) printf("tokenizer: %u tokens from %s\n", bpe.vocab_size, tokenizer);
    } else {
        if (sm_bpe_train(&bpe, &bc, corpus.text, train_bytes, &err) != SM_OK) tr_die("training the tokenizer", &err);
        if (!quiet) printf("tokenizer: %u tokens from %.1f MB of training text in %.2f s\n", bpe.vocab_size,
               train_bytes / 1e6, sm_now() - t0);
    }
    if (sm_canon_build(&canon, &bpe, &err) != SM_OK) tr_die("tokenizer compression", &err);
    if (!quiet) printf("compression: %u canonical ids for %u tokens (%.1f%% folded)\n", canon.n_canon,
           canon.vocab_size, 100.0 * sm_canon_ratio(&canon));
    t0 = sm_now();
    memset(&train, 0, sizeof train); /* empty for an evaluation-only set (--val-frac 1) */
    if ((n_train_docs > 0 && sm_corpus_tokenize(&bpe, &corpus, 0, n_train_docs, &train, &err) != SM_OK) ||
        sm_corpus_tokenize(&bpe, &corpus, n_train_docs, corpus.n_docs, &val, &err) != SM_OK)
        tr_die("tokenizing", &err);
    if (!quiet) printf("tokens: train %zu (%zu documents), val %zu (%zu documents), %.1f s\n", train.n_tokens,
           train.n_docs, val.n_tokens, val.n_docs, sm_now() - t0);
    tr_mkdir(out_dir);
    tr_join(path, out_dir, "tokenizer.bin");
    if (sm_bpe_save(&bpe, path, &err) != SM_OK) tr_die("saving the tokenizer", &err);
    tr_join(path, out_dir, "train.tok");
    if (n_train_docs > 0 && sm_tokens_save(&train, path, &err) != SM_OK) tr_die("saving train.tok", &err);
    tr_join(path, out_dir, "val.tok");
    if (sm_tokens_save(&val, path, &err) != SM_OK) tr_die("saving val.tok", &err);
    sm_tokens_free(&train), sm_tokens_free(&val), sm_canon_free(&canon), sm_bpe_free(&bpe);
    sm_corpus_free(&corpus);
}

/* --data is a folder made by `tokenize`, or text (tokenized into OUT/data).
 * The training split is loaded only when `train` is set. */
static void tr_load_data(tr_data *d, const tr_opts *o, int train) {
    char path[TR_PATH];
    sm_error err = {SM_OK, ""};
    if (!o->data[0]) {
        fprintf(stderr, "trainer: --data is required (a text file/folder or a `trainer tokenize` folder)\n");
        exit(1);
    }
    tr_join(path, o->data, "tokenizer.bin");
    if (tr_is_dir(o->data) && tr_exists(path)) {
        snprintf(d->dir, sizeof d->dir, "%s", o->data);
    } else {
        tr_join(d->dir, o->out, "data");
        tr_join(path, d->dir, "tokenizer.bin");
        if (!tr_exists(path)) tr_tokenize(o->data, d->dir, o->vocab, o->val_frac, NULL, o->quiet);
    }
    tr_join(path, d->dir, "tokenizer.bin");
    if (sm_bpe_load(&d->bpe, path, &err) != SM_OK) tr_die("loading the tokenizer", &err);
    if (sm_canon_build(&d->canon, &d->bpe, &err) != SM_OK) tr_die("tokenizer compression", &err);
    tr_join(path, d->dir, "train.tok");
    memset(&d->train, 0, sizeof d->train);
    if (train && sm_tokens_load(&d->train, path, d->bpe.vocab_size, &err) != SM_OK) tr_die("loading train.tok", &err);
    tr_join(path, d->dir, "val.tok");
    if (sm_tokens_load(&d->val, path, d->bpe.vocab_size, &err) != SM_OK) tr_die("loading val.tok", &err);
}

static void tr_free_data(tr_data *d) {
    sm_tokens_free(&d->train), sm_tokens_free(&d->val);
    sm_canon_free(&d->canon), sm_bpe_free(&d->bpe);
}

/* ===================================================================== */
/* Model from options                                                    */
/* ===================================================================== */

/* --nine: the hot tier, sized against the hash-only table of --engram-rows
 * so both have exactly the same number of rows (sm_nine_iso_config).
 * --hot-labels: the same top-N set, for route labels only. */
static int tr_nine_config(const tr_opts *o, sm_model_config *c, char *msg, size_t n) {
    long n_hot = o->nine > 0 ? o->nine : o->hot_labels;
    sm_nine_iso iso;
    sm_error err = {SM_OK, ""};
    int i;
    if (n_hot <= 0) return 0;
    if (!c->use_engram) {
        snprintf(msg, n, "--nine/--hot-labels need Engram (--engram LAYERS)");
        return -1;
    }
    for (i = 0; i < c->engram.hash.n_orders; i++) c->nine.n_hot[i] = (uint32_t)n_hot;
    if (strcmp(o->nine_route, "mphf") == 0) c->nine.route = SM_NINE_ROUTE_MPHF;
    else if (strcmp(o->nine_route, "membership") == 0) c->nine.route = SM_NINE_ROUTE_MEMBERSHIP;
    else {
        snprintf(msg, n, "--nine-route: '%s' is neither mphf nor membership", o->nine_route);
        return -1;
    }
    if (o->nine <= 0) return 0;
    if (sm_nine_iso_config(&iso, &c->engram.hash, &c->nine, &err) != SM_OK) {
        snprintf(msg, n, "--nine %ld: %.200s", o->nine, err.msg);
        return -1;
    }
    c->use_nine = 1;
    c->engram.hash = iso.cold;
    c->nine = iso.nine;
    c->engram.hot_key_proj = o->nine_hot_key;
    c->engram.hot_gate = o->nine_hot_gate;
    if (!o->quiet)
        printf("Engram-Nine: %llu table rows = %llu cold + %llu hot (the hash-only table's rows)\n",
               (unsigned long long)iso.hash_rows, (unsigned long long)iso.cold_rows,
               (unsigned long long)iso.hot_rows);
    return 0;
}

/* --engram-mhc: Engram's form with mHC. The GPU has only the branch form,
 * which --device cuda then takes by default (and says so). */
static int tr_engram_mhc(const tr_opts *o, sm_model_config *c, char *msg, size_t n) {
    int cuda = strcmp(o->device, "cuda") == 0;
    if (!o->engram_mhc[0]) {
        c->engram_mhc = cuda ? SM_ENGRAM_MHC_BRANCH : SM_ENGRAM_MHC_PER_STREAM;
        if (cuda && c->use_engram && c->use_mhc && !o->quiet)
            printf("Engram with mHC: the branch form (--device cuda has no per-stream form)\n");
        return 0;
    }
    if (strcmp(o->engram_mhc, "per-stream") == 0) c->engram_mhc = SM_ENGRAM_MHC_PER_STREAM;
    else if (strcmp(o->engram_mhc, "branch") == 0) c->engram_mhc = SM_ENGRAM_MHC_BRANCH;
    else {
        snprintf(msg, n, "--engram-mhc: '%s' is neither per-stream nor branch", o->engram_mhc);
        return -1;
    }
    if (cuda && c->engram_mhc == SM_ENGRAM_MHC_PER_STREAM) {
        snprintf(msg, n, "--engram-mhc per-stream is not implemented on --device cuda; use branch");
        return -1;
    }
    return 0;
}

static int tr_model_config(const tr_opts *o, int vocab, sm_model_config *c, char *msg, size_t n) {
    int ids[SM_NGRAM_MAX_LAYERS], k, i;
    *c = sm_model_default_config();
    c->vocab_size = vocab;
    c->seq_len = o->seq_len, c->n_layer = o->n_layer, c->n_head = o->n_head, c->d_model = o->d_model;
    c->d_ff = o->d_ff > 0 ? o->d_ff : 4 * o->d_model;
    c->lr = o->lr, c->weight_decay = o->weight_decay;
    k = tr_parse_layers(o->engram_layers, ids, SM_NGRAM_MAX_LAYERS);
    if (k < 0) {
        snprintf(msg, n, "--engram: expected a list of layers like 1,3, got '%s'", o->engram_layers);
        return -1;
    }
    c->use_engram = k > 0;
    c->engram.d_model = o->d_model;
    c->engram.d_head = o->engram_d_head;
    c->engram.signed_sqrt_gate = !o->engram_no_sqrt;
    c->engram.hash.n_layers = k > 0 ? k : 1;
    for (i = 0; i < k; i++) c->engram.hash.layer_ids[i] = ids[i];
    c->engram.hash.n_heads = o->engram_heads;
    c->engram.hash.table_rows = (uint32_t)o->engram_rows; /* checked by the parser and sm_model_config_validate */
    c->engram.hash.share_tables = o->engram_shared;
    c->engram.hash.seed = o->seed;
    if (tr_nine_config(o, c, msg, n) != 0) return -1;
    k = tr_parse_layers(o->peer_layers, c->peer_layer_ids, SM_MAX_SUBLAYERS / 3);
    if (k < 0) {
        snprintf(msg, n, "--peer: expected a list of layers like 2, got '%s'", o->peer_layers);
        return -1;
    }
    c->use_peer = k > 0;
    c->peer_n_layers = k;
    c->peer_replace_mlp = !o->peer_add;
    c->peer.n_sub = o->peer_experts_sqrt, c->peer.heads = o->peer_heads;
    c->peer.topk = o->peer_topk, c->peer.d_key = o->peer_d_key;
    c->peer.shared_keys = o->peer_shared_keys;
    c->use_mhc = o->mhc_streams > 0;
    c->mhc.n_streams = o->mhc_streams > 0 ? o->mhc_streams : 4;
    c->mhc.channels = o->d_model;
    c->mhc.dynamic = !o->mhc_static;
    return tr_engram_mhc(o, c, msg, n);
}

/* Parameter groups belonging to each schedulable module. */
static void tr_module_groups(const sm_model *m, int groups[TR_N_MODULES][2]) {
    groups[TR_G_BACKBONE][0] = m->g_backbone, groups[TR_G_BACKBONE][1] = -1;
    groups[TR_G_ENGRAM][0] = m->g_engram_dense, groups[TR_G_ENGRAM][1] = m->g_engram_table;
    groups[TR_G_PEER][0] = m->g_peer, groups[TR_G_PEER][1] = -1;
    groups[TR_G_MHC][0] = m->g_mhc, groups[TR_G_MHC][1] = -1;
}

/* Set each module's groups so their lr is module_lr[m] (the Engram table
 * keeps its multiple). Group base lrs were laid out from --lr. */
static void tr_apply_module_lrs(sm_model *m, const float module_lr[TR_N_MODULES], float base_lr) {
    int groups[TR_N_MODULES][2], k, j;
    tr_module_groups(m, groups);
    for (k = 0; k < TR_N_MODULES; k++)
        for (j = 0; j < 2; j++)
            if (groups[k][j] >= 0)
                m->params.groups[groups[k][j]].lr_mult = base_lr > 0 ? module_lr[k] / base_lr : 0.0f;
}

/* ===================================================================== */
/* Diagnostics                                                           */
/* ===================================================================== */

/* Per-module measurements of one step (or an average over several):
 *   out   mean L2 norm per position of the module's contribution to the
 *         residual (backbone: mean over its attention and MLP sublayers)
 *   dout  L2 norm of the loss gradient w.r.t. that contribution
 *   gpar  L2 norm of the gradient of the module's parameters
 * NaN where a module is absent or the quantity does not exist (mHC adds
 * no output of its own: it mixes the streams). */
typedef struct {
    double out[TR_N_MODULES], dout[TR_N_MODULES], gpar[TR_N_MODULES];
} tr_module_stats;

static void tr_stats_nan(tr_module_stats *s) {
    int m;
    for (m = 0; m < TR_N_MODULES; m++) s->out[m] = s->dout[m] = s->gpar[m] = NAN;
}

/* Output and output-gradient norms from the model's last forward/backward. */
static void tr_measure_outputs(const sm_model *m, tr_module_stats *st) {
    double sum_out[TR_N_MODULES] = {0}, sum_dout[TR_N_MODULES] = {0};
    int count[TR_N_MODULES] = {0}, i, k;
    for (i = 0; i < m->n_sub; i++) {
        const sm_sublayer *s = &m->sub[i];
        int mod = s->kind == SM_SUBLAYER_ENGRAM ? TR_G_ENGRAM : TR_G_BACKBONE;
        if (s->kind == SM_SUBLAYER_FFN && s->has_peer) {
            sum_out[TR_G_PEER] += s->peer_norm;
            sum_dout[TR_G_PEER] += s->grad_norm;
            count[TR_G_PEER]++;
            if (!s->has_mlp) continue;
        }
        sum_out[mod] += s->out_norm;
        sum_dout[mod] += s->grad_norm;
        count[mod]++;
    }
    for (k = 0; k < TR_N_MODULES; k++) {
        st->out[k] = count[k] ? sum_out[k] / count[k] : NAN;
        st->dout[k] = count[k] ? sum_dout[k] / count[k] : NAN;
    }
}

/* Parameter-gradient norms per module (before the optimizer step), from
 * the gradient norm of each parameter group, group_norm[group id]. */
static void tr_measure_param_grads(const sm_model *m, const double *group_norm, tr_module_stats *st) {
    int groups[TR_N_MODULES][2], k, j;
    tr_module_groups(m, groups);
    for (k = 0; k < TR_N_MODULES; k++) {
        double ss = 0;
        int any = 0;
        for (j = 0; j < 2; j++)
            if (groups[k][j] >= 0) {
                double g = group_norm[groups[k][j]];
                ss += g * g;
                any = 1;
            }
        st->gpar[k] = any ? sqrt(ss) : NAN;
    }
}

/* Exponential moving average, NaN-aware (the first value seeds it). */
static void tr_ema(double *avg, double x, double decay) {
    if (isnan(x)) return;
    *avg = isnan(*avg) ? x : decay * *avg + (1.0 - decay) * x;
}

static void tr_stats_ema(tr_module_stats *avg, const tr_module_stats *x, double decay) {
    int m;
    for (m = 0; m < TR_N_MODULES; m++) {
        tr_ema(&avg->out[m], x->out[m], decay);
        tr_ema(&avg->dout[m], x->dout[m], decay);
        tr_ema(&avg->gpar[m], x->gpar[m], decay);
    }
}

/* ===================================================================== */
/* Automatic coordination                                                */
/* ===================================================================== */
/* The Redundancy Bottleneck: trained jointly, the fastest-learning sparse
 * module (Engram) takes most of the residual update and of the gradient
 * signal, and the others stop mattering. The write-up fixes it with
 * hand-tuned phases. Here, every coord_every steps, each sparse module
 * (Engram, PEER) gets a share score
 *     share_m = (out_m / sum out + dout_m / sum dout) / 2
 * from moving averages of its output norm and output-gradient norm; a
 * module above the fair share 1/k (k modules) has its lr multiplier scaled
 * by sqrt(fair / share) (at most x2 per adjustment), one below recovers
 * toward 1. Multipliers stay in [0.05, 1]: never frozen, never above the
 * configured lr. With fewer than two sparse modules it does nothing. */
typedef struct {
    float mult[TR_N_MODULES];
    tr_module_stats avg;
} tr_coord;

static void tr_coord_init(tr_coord *c) {
    int m;
    for (m = 0; m < TR_N_MODULES; m++) c->mult[m] = 1.0f;
    tr_stats_nan(&c->avg);
}

static void tr_coord_update(tr_coord *c) {
    const int sparse[2] = {TR_G_ENGRAM, TR_G_PEER};
    double sum_out = 0, sum_dout = 0;
    int i, k = 0;
    for (i = 0; i < 2; i++)
        if (!isnan(c->avg.out[sparse[i]]) && !isnan(c->avg.dout[sparse[i]])) {
            sum_out += c->avg.out[sparse[i]];
            sum_dout += c->avg.dout[sparse[i]];
            k++;
        }
    if (k < 2 || sum_out <= 0 || sum_dout <= 0) return;
    for (i = 0; i < 2; i++) {
        int m = sparse[i];
        double share = 0.5 * (c->avg.out[m] / sum_out + c->avg.dout[m] / sum_dout);
        double f = sqrt((1.0 / k) / fmax(share, 1e-6));
        f = fmin(2.0, fmax(0.5, f));
        c->mult[m] = (float)fmin(1.0, fmax(0.05, c->mult[m] * f));
    }
}

/* ===================================================================== */
/* Evaluation                                                            */
/* ===================================================================== */

typedef struct {
    double loss, ppl;
    size_t tokens;
    tr_module_stats mod;
    double engram_alpha;           /* mean gate over positions and Engram layers */
    double peer_frac_used, peer_kl; /* over PEER layers (mean) */
    double mhc_sum_err, mhc_amax_fwd, mhc_amax_bwd;
    int has_route;          /* route-stratified stats (a hot set exists) */
    sm_route_report route;
} tr_eval;

typedef struct {
    sm_model model;
    sm_model_config cfg;
    tr_data data;
    sm_loader loader;
    tr_coord coord;
    tr_module_stats train_avg;
    long step;
    double tokens_seen, train_seconds;
    double loss_avg; /* moving average of the training loss (logged) */
    int *in, *tg;
    unsigned char *doc, *label;
    int on_gpu; /* --device cuda: the step runs on the GPU; the host model is
                   brought up to date (tr_to_host) before evals and checkpoints */
#ifdef TR_WITH_CUDA
    smc_ctx gpu;
    smc_model gpu_model;
#endif
} tr_run;

/* ---- the training step's operations, on the CPU or the GPU ---- */

static void tr_zero_grad(tr_run *r) {
#ifdef TR_WITH_CUDA
    if (r->on_gpu) {
        smc_params_zero_grad(&r->gpu, &r->gpu_model.params);
        return;
    }
#endif
    sm_params_zero_grad(&r->model.params);
}

static sm_status tr_forward(tr_run *r, int B, int T, sm_error *err) {
#ifdef TR_WITH_CUDA
    if (r->on_gpu) return smc_model_forward(&r->gpu_model, r->in, r->tg, r->doc, B, T, err);
#endif
    return sm_model_forward(&r->model, r->in, r->tg, r->doc, B, T, err);
}

/* The backward, and the per-sublayer norms it measures on the host model. */
static void tr_backward(tr_run *r) {
#ifdef TR_WITH_CUDA
    if (r->on_gpu) {
        sm_error err = {SM_OK, ""};
        smc_model_backward(&r->gpu_model);
        if (smc_model_fetch_diagnostics(&r->gpu_model, &err) != SM_OK) tr_die("GPU backward", &err);
        return;
    }
#endif
    sm_model_backward(&r->model);
}

/* Gradient norm of each parameter group into group_norm[], and the global
 * norm derived from them (every tensor is in exactly one group), so the
 * gradients are read once. */
static double tr_grad_norms(tr_run *r, double *group_norm) {
    double ss = 0.0;
    int g;
    for (g = 0; g < r->model.params.n_groups; g++) {
#ifdef TR_WITH_CUDA
        if (r->on_gpu)
            group_norm[g] = smc_params_group_grad_norm(&r->gpu, &r->gpu_model.params, g);
        else
#endif
            group_norm[g] = sm_params_group_grad_norm(&r->model.params, g);
        ss += group_norm[g] * group_norm[g];
    }
    return sqrt(ss);
}

static void tr_adamw(tr_run *r, float lr_factor, float clip) {
#ifdef TR_WITH_CUDA
    if (r->on_gpu) {
        smc_params_adamw_step(&r->gpu, &r->gpu_model.params, lr_factor, clip);
        return;
    }
#endif
    sm_params_adamw_step(&r->model.params, lr_factor, clip);
}

/* With --device cuda: the GPU's parameters and moments into the host
 * model (evaluation and checkpoints read the host model). */
static void tr_to_host(tr_run *r) {
#ifdef TR_WITH_CUDA
    sm_error err = {SM_OK, ""};
    if (r->on_gpu && smc_model_download(&r->gpu_model, &err) != SM_OK) tr_die("GPU -> host", &err);
#else
    (void)r;
#endif
}

/* Starts the GPU model from the host model (after init or resume); the
 * option was checked by tr_parse. */
static void tr_device_setup(tr_run *r, const tr_opts *o) {
#ifdef TR_WITH_CUDA
    sm_error err = {SM_OK, ""};
    if (strcmp(o->device, "cuda") != 0) return;
    if (smc_init(&r->gpu, 0, &err) != SM_OK) tr_die("--device cuda", &err);
    smc_set_tf32(&r->gpu, strcmp(o->precision, "fp32") != 0);
    if (smc_model_init(&r->gpu_model, &r->gpu, &r->model, &err) != SM_OK) tr_die("GPU model", &err);
    r->on_gpu = 1;
    if (!o->quiet)
        printf("device: %s (%d SMs), GEMMs in %s\n", r->gpu.name, r->gpu.sm_count, r->gpu.tf32 ? "TF32" : "fp32");
#else
    (void)r, (void)o;
#endif
}

static void tr_device_free(tr_run *r) {
#ifdef TR_WITH_CUDA
    if (r->on_gpu) {
        smc_model_free(&r->gpu_model);
        smc_free(&r->gpu);
    }
#else
    (void)r;
#endif
}

/* Mean Engram gate over positions (and streams, for a per-stream Engram). */
static double tr_engram_alpha_mean(const sm_model *m) {
    double s = 0;
    int i, n = 0, j, NS = m->B * m->T * m->cfg.engram.n_streams;
    for (i = 0; i < m->n_sub; i++) {
        if (m->sub[i].kind != SM_SUBLAYER_ENGRAM) continue;
        for (j = 0; j < NS; j++) s += m->sub[i].engram_acts.alpha[j];
        n += NS;
    }
    return n ? s / n : NAN;
}

/* Over the mHC branches (a per-stream Engram has no maps: its residual map
 * is the identity, which leaves the composite gain unchanged). */
static void tr_mhc_stats(const sm_model *m, tr_eval *e) {
    sm_mhc_acts acts[SM_MAX_SUBLAYERS];
    sm_rowcol_stats gain;
    int i, n = 0, N = m->B * m->T;
    double err = 0;
    if (!m->cfg.use_mhc) return;
    for (i = 0; i < m->n_sub; i++) {
        sm_rowcol_stats r;
        if (!m->sub[i].in_mhc) continue;
        r = sm_mhc_res_sum_error(&m->sub[i].mhc_acts, &m->cfg.mhc, N);
        err = fmax(err, fmax(r.row_max, r.col_max));
        acts[n++] = m->sub[i].mhc_acts;
    }
    gain = sm_mhc_amax_gain_tokens(acts, n, &m->cfg.mhc, N);
    e->mhc_sum_err = fmax(isnan(e->mhc_sum_err) ? 0 : e->mhc_sum_err, err);
    e->mhc_amax_fwd = fmax(isnan(e->mhc_amax_fwd) ? 0 : e->mhc_amax_fwd, gain.row_max);
    e->mhc_amax_bwd = fmax(isnan(e->mhc_amax_bwd) ? 0 : e->mhc_amax_bwd, gain.col_max);
}

/* Route-stratified statistics of one eval batch: positions labelled hot
 * when any of their n-grams is in the top-N set, with each Engram layer's
 * gate (for a per-stream Engram the mean of its streams' gates). */
static void tr_route_add(tr_run *r, sm_route_stats *route, int B) {
    const float *alpha[SM_NGRAM_MAX_LAYERS];
    sm_error err = {SM_OK, ""};
    int i, j, k, N = B * r->cfg.seq_len, S = r->model.cfg.engram.n_streams;
    float *mean = NULL;
    if (S > 1 && !(mean = (float *)sm_alloc((size_t)r->cfg.engram.hash.n_layers * N, sizeof(float),
                                            "per-position gates", &err)))
        tr_die("route statistics", &err);
    for (i = 0; i < r->model.n_sub; i++) {
        const sm_sublayer *s = &r->model.sub[i];
        float *m;
        if (s->kind != SM_SUBLAYER_ENGRAM) continue;
        alpha[s->engram_index] = s->engram_acts.alpha;
        if (S == 1) continue;
        m = mean + (size_t)s->engram_index * N;
        for (j = 0; j < N; j++) {
            double sum = 0;
            for (k = 0; k < S; k++) sum += s->engram_acts.alpha[(size_t)j * S + k];
            m[j] = (float)(sum / S);
        }
        alpha[s->engram_index] = m;
    }
    sm_nine_label(r->label, r->model.ngram_hot, N, r->cfg.engram.hash.n_orders, SM_NINE_LABEL_ANY);
    if (sm_route_stats_add(route, r->model.losses, r->tg, r->label, alpha, N, &err) != SM_OK)
        tr_die("route statistics", &err);
    sm_free(mean);
}

/* Loss over contiguous held-out text: non-overlapping windows, every
 * target counted once, padding never counted. max_batches 0 = all. */
static tr_eval tr_evaluate(tr_run *r, int B, int max_batches) {
    sm_loader_config lc = sm_loader_default_config();
    sm_loader loader;
    sm_error err = {SM_OK, ""};
    tr_eval e;
    sm_peer_usage usage[SM_MAX_SUBLAYERS / 3];
    double total = 0, alpha_sum = 0, out_sum[TR_N_MODULES] = {0};
    int n_peer = 0, i, batches = 0, alpha_batches = 0;
    size_t counted = 0;
    sm_route_stats route;
    memset(&e, 0, sizeof e);
    tr_stats_nan(&e.mod);
    e.engram_alpha = e.peer_frac_used = e.peer_kl = NAN;
    e.mhc_sum_err = e.mhc_amax_fwd = e.mhc_amax_bwd = NAN;
    lc.batch_size = B, lc.seq_len = r->cfg.seq_len, lc.mode = SM_LOADER_SEQUENTIAL;
    if (sm_loader_init(&loader, &r->data.val, &lc, &err) != SM_OK) tr_die("validation loader", &err);
    for (i = 0; i < r->model.n_sub; i++)
        if (r->model.sub[i].has_peer &&
            sm_peer_usage_init(&usage[n_peer++], (size_t)r->cfg.peer.n_sub * r->cfg.peer.n_sub, &err) != SM_OK)
            tr_die("PEER usage", &err);
    e.has_route = r->model.has_hot_set;
    if (e.has_route && sm_route_stats_init(&route, r->cfg.engram.hash.n_layers, &err) != SM_OK)
        tr_die("route statistics", &err);
    for (;;) {
        size_t n = sm_loader_next(&loader, r->in, r->tg, r->doc);
        tr_module_stats ms;
        int k, p = 0;
        if (n == 0 || (max_batches > 0 && batches >= max_batches)) break;
        if (sm_model_forward(&r->model, r->in, r->tg, r->doc, B, r->cfg.seq_len, &err) != SM_OK)
            tr_die("evaluation forward", &err);
        total += (double)r->model.loss * r->model.n_counted;
        counted += (size_t)r->model.n_counted;
        tr_measure_outputs(&r->model, &ms);
        for (k = 0; k < TR_N_MODULES; k++) out_sum[k] += ms.out[k];
        if (r->cfg.use_engram) alpha_sum += tr_engram_alpha_mean(&r->model), alpha_batches++;
        for (i = 0; i < r->model.n_sub; i++)
            if (r->model.sub[i].has_peer)
                sm_peer_usage_add(&usage[p++], r->model.sub[i].peer_acts.expert,
                                  (size_t)B * r->cfg.seq_len * r->cfg.peer.heads * r->cfg.peer.topk);
        tr_mhc_stats(&r->model, &e);
        if (e.has_route) tr_route_add(r, &route, B);
        batches++;
    }
    if (e.has_route) sm_route_stats_report(&e.route, &route);
    e.tokens = counted;
    e.loss = counted ? total / counted : NAN;
    e.ppl = exp(e.loss);
    for (i = 0; i < TR_N_MODULES; i++) e.mod.out[i] = batches ? out_sum[i] / batches : NAN;
    if (alpha_batches) e.engram_alpha = alpha_sum / alpha_batches;
    if (n_peer) {
        e.peer_frac_used = e.peer_kl = 0;
        for (i = 0; i < n_peer; i++) {
            sm_peer_usage_stats us = sm_peer_usage_compute(&usage[i]);
            e.peer_frac_used += us.frac_used / n_peer;
            e.peer_kl += us.kl_uniform / n_peer;
            sm_peer_usage_free(&usage[i]);
        }
    }
    return e;
}

/* ===================================================================== */
/* Checkpoints                                                           */
/* ===================================================================== */
/* File "SMCK" v2 (sm_writer: written to a temp file and renamed, with a
 * checksum): the model config and training options as raw structs (a
 * checkpoint is read by the build that wrote it; the sizes are checked;
 * v2 added engram_mhc, so a v1 file is refused rather than read as a
 * config it does not describe),
 * the step, the parameters and both Adam moments, the parameter groups
 * (learning-rate multipliers included), the data loader state, the
 * coordination state and the running statistics. */
#define TR_CKPT_MAGIC 0x4b434d53u /* "SMCK" */
/* v2: the model config gained engram_mhc (Engram's form with mHC) and
 * sm_peer_config shared_keys (v1 PEER layers had per-head sub-keys); the raw
 * v1 config no longer fits the struct, so v1 is refused. */
#define TR_CKPT_VERSION 2u

/* Test hook: a real SIGKILL at a chosen point, after step `step` or inside
 * its checkpoint (in_ckpt: the temp file, flushed first), so tests see what
 * a killed run leaves and that --resume recovers from it. */
static void tr_debug_kill(const tr_opts *o, long step, FILE *in_ckpt) {
    if (step != o->debug_kill_step || !in_ckpt != !o->debug_kill_in_ckpt) return;
    if (in_ckpt) fflush(in_ckpt);
    raise(SIGKILL);
}

static sm_status tr_save_checkpoint(const tr_run *r, const tr_opts *o, const char *path,
                                    sm_error *err) {
    sm_writer w;
    const sm_params *p = &r->model.params;
    sm_status st = sm_writer_open(&w, path, TR_CKPT_MAGIC, TR_CKPT_VERSION, err);
    if (st != SM_OK) return st;
    sm_writer_u32(&w, (uint32_t)sizeof r->cfg);
    sm_writer_bytes(&w, &r->cfg, sizeof r->cfg);
    sm_writer_u32(&w, (uint32_t)sizeof *o);
    sm_writer_bytes(&w, o, sizeof *o);
    sm_writer_u64(&w, (uint64_t)r->step);
    sm_writer_u64(&w, p->step);
    sm_writer_u64(&w, (uint64_t)p->total);
    sm_writer_bytes(&w, p->data, p->total * sizeof(float));
    sm_writer_bytes(&w, p->m, p->total * sizeof(float));
    sm_writer_bytes(&w, p->v, p->total * sizeof(float));
    sm_writer_u32(&w, (uint32_t)p->n_groups);
    sm_writer_bytes(&w, p->groups, sizeof(sm_param_group) * (size_t)p->n_groups);
    sm_writer_bytes(&w, &r->loader.state, sizeof r->loader.state);
    sm_writer_bytes(&w, &r->coord, sizeof r->coord);
    sm_writer_bytes(&w, &r->train_avg, sizeof r->train_avg);
    sm_writer_bytes(&w, &r->tokens_seen, sizeof r->tokens_seen);
    sm_writer_bytes(&w, &r->loss_avg, sizeof r->loss_avg);
    sm_writer_bytes(&w, &r->train_seconds, sizeof r->train_seconds);
    sm_writer_u32(&w, (uint32_t)r->model.has_hot_set);
    if (r->model.has_hot_set) sm_nine_write(&r->model.nine, &w);
    tr_debug_kill(o, r->step, w.f); /* the temp file complete, not renamed */
    return sm_writer_commit(&w, err);
}

/* What a checkpoint's header asks for, checked before anything is built
 * from it: a checksum is no defence against a crafted file (anyone can
 * recompute one), and the config decides how much the model allocates. The
 * config must be valid, the parameter count it implies must be the stored
 * one, and the file must hold that many parameters and both Adam moments.
 * The options' strings must end inside their fields. */
static sm_status tr_check_checkpoint_sizes(const sm_reader *rd, const sm_model_config *cfg,
                                           const tr_opts *o, sm_error *err) {
    size_t expect, left = rd->size - rd->pos;
    uint64_t total;
    sm_error why = {SM_OK, ""};
    int i;
    for (i = 0; i < TR_N_SPECS; i++)
        if (tr_specs[i].kind == O_STR && !memchr((const char *)o + tr_specs[i].offset, 0, tr_specs[i].size))
            return sm_fail(err, SM_ERR_FORMAT, "checkpoint %s: its --%s is not a terminated string", rd->path,
                           tr_specs[i].name);
    if (sm_model_param_count(cfg, &expect, &why) != SM_OK)
        return sm_fail(err, SM_ERR_FORMAT, "checkpoint %s: invalid model config: %.150s", rd->path, why.msg);
    if (left < 24)
        return sm_fail(err, SM_ERR_TRUNCATED, "checkpoint %s: ends after its options", rd->path);
    memcpy(&total, rd->data + rd->pos + 16, 8); /* after the step and the Adam step */
    if (total != expect)
        return sm_fail(err, SM_ERR_FORMAT,
                       "checkpoint %s: its config (seq_len %d, d_model %d, vocab %d, %d layers) has %zu "
                       "parameters, the file stores %llu", rd->path, cfg->seq_len, cfg->d_model,
                       cfg->vocab_size, cfg->n_layer, expect, (unsigned long long)total);
    if (expect > (left - 24) / (3 * sizeof(float)))
        return sm_fail(err, SM_ERR_TRUNCATED, "checkpoint %s: %zu parameters and their Adam moments do not fit "
                       "in its %zu bytes", rd->path, expect, left);
    return SM_OK;
}

/* Reads a checkpoint's config and options (to build the model). */
static sm_status tr_read_checkpoint_header(sm_reader *rd, const char *path, sm_model_config *cfg,
                                           tr_opts *o, sm_error *err) {
    uint32_t n = 0;
    sm_status st = sm_reader_open(rd, path, TR_CKPT_MAGIC, TR_CKPT_VERSION, "checkpoint", err);
    if (st == SM_OK && rd->version < TR_CKPT_VERSION)
        st = sm_fail(err, SM_ERR_FORMAT, "checkpoint %s: format v%u predates Engram's form with mHC (--engram-mhc) and PEER's shared sub-keys (shared_keys; v1 PEER had per-head sub-keys); this build reads v%u: read it with the build that wrote it or train again",
                     path, (unsigned)rd->version, (unsigned)TR_CKPT_VERSION);
    if (st == SM_OK) st = sm_reader_u32(rd, &n, err);
    if (st == SM_OK && n != sizeof *cfg)
        st = sm_fail(err, SM_ERR_MISMATCH, "checkpoint %s: model config of %u bytes, this build uses %zu (written by another version)",
                     path, n, sizeof *cfg);
    if (st == SM_OK) st = sm_reader_bytes(rd, cfg, sizeof *cfg, err);
    if (st == SM_OK) st = sm_reader_u32(rd, &n, err);
    if (st == SM_OK && n != sizeof *o)
        st = sm_fail(err, SM_ERR_MISMATCH, "checkpoint %s: options of %u bytes, this build uses %zu", path, n, sizeof *o);
    if (st == SM_OK) st = sm_reader_bytes(rd, o, sizeof *o, err);
    if (st == SM_OK) st = tr_check_checkpoint_sizes(rd, cfg, o, err);
    if (st != SM_OK) sm_reader_close(rd);
    return st;
}

/* The parameter groups (their lrs and multipliers), which must be the
 * model's own groups in its order. */
static sm_status tr_read_groups(sm_reader *rd, sm_params *p, sm_error *err) {
    sm_param_group g[SM_MAX_GROUPS];
    int i;
    sm_status st = sm_reader_bytes(rd, g, sizeof(sm_param_group) * (size_t)p->n_groups, err);
    for (i = 0; st == SM_OK && i < p->n_groups; i++)
        if (strncmp(g[i].name, p->groups[i].name, sizeof g[i].name) != 0)
            return sm_fail(err, SM_ERR_MISMATCH, "checkpoint: parameter group %d is '%.31s', the model's '%s'",
                           i, g[i].name, p->groups[i].name);
    if (st == SM_OK) memcpy(p->groups, g, sizeof(sm_param_group) * (size_t)p->n_groups);
    return st;
}

/* Reads the rest into a model built from the same config. */
static sm_status tr_read_checkpoint_state(sm_reader *rd, tr_run *r, sm_error *err) {
    sm_params *p = &r->model.params;
    uint64_t step = 0, pstep = 0, total = 0;
    uint32_t n_groups = 0, has_hot_set = 0;
    sm_status st;
    if ((st = sm_reader_u64(rd, &step, err)) != SM_OK || (st = sm_reader_u64(rd, &pstep, err)) != SM_OK ||
        (st = sm_reader_u64(rd, &total, err)) != SM_OK)
        return st;
    if (total != p->total)
        return sm_fail(err, SM_ERR_MISMATCH, "checkpoint has %llu parameters, the model %zu",
                       (unsigned long long)total, p->total);
    if ((st = sm_reader_bytes(rd, p->data, p->total * sizeof(float), err)) != SM_OK ||
        (st = sm_reader_bytes(rd, p->m, p->total * sizeof(float), err)) != SM_OK ||
        (st = sm_reader_bytes(rd, p->v, p->total * sizeof(float), err)) != SM_OK ||
        (st = sm_reader_u32(rd, &n_groups, err)) != SM_OK)
        return st;
    if ((int)n_groups != p->n_groups)
        return sm_fail(err, SM_ERR_MISMATCH, "checkpoint has %u parameter groups, the model %d", n_groups, p->n_groups);
    if ((st = tr_read_groups(rd, p, err)) != SM_OK ||
        (st = sm_reader_bytes(rd, &r->loader.state, sizeof r->loader.state, err)) != SM_OK ||
        (st = sm_reader_bytes(rd, &r->coord, sizeof r->coord, err)) != SM_OK ||
        (st = sm_reader_bytes(rd, &r->train_avg, sizeof r->train_avg, err)) != SM_OK ||
        (st = sm_reader_bytes(rd, &r->tokens_seen, sizeof r->tokens_seen, err)) != SM_OK ||
        (st = sm_reader_bytes(rd, &r->loss_avg, sizeof r->loss_avg, err)) != SM_OK ||
        (st = sm_reader_bytes(rd, &r->train_seconds, sizeof r->train_seconds, err)) != SM_OK)
        return st;
    if ((st = sm_reader_u32(rd, &has_hot_set, err)) != SM_OK) return st;
    if (r->model.has_hot_set) sm_nine_free(&r->model.nine);
    r->model.has_hot_set = 0;
    if (has_hot_set) {
        if ((st = sm_nine_read(&r->model.nine, rd, err)) != SM_OK) return st;
        r->model.has_hot_set = 1;
    }
    if (!sm_all_finite(p->data, p->total))
        return sm_fail(err, SM_ERR_NONFINITE, "checkpoint parameters contain NaN or Inf");
    r->step = (long)step;
    p->step = pstep;
    return SM_OK;
}

/* ===================================================================== */
/* CSV logs, read back for plots and reports                             */
/* ===================================================================== */

#define TR_MAX_COLS 64
#define TR_MAX_ROWS 4096

/* A run's log.csv: named columns of numbers. */
typedef struct {
    char names[TR_MAX_COLS][32];
    int n_cols, n_rows;
    float *v; /* [n_rows][n_cols] */
} tr_table;

static int tr_table_read(tr_table *t, const char *path) {
    FILE *f = fopen(path, "r");
    char line[8192];
    memset(t, 0, sizeof *t);
    if (!f) return -1;
    if (fgets(line, sizeof line, f)) {
        char *tok = strtok(line, ",\n");
        while (tok && t->n_cols < TR_MAX_COLS) {
            snprintf(t->names[t->n_cols++], 32, "%s", tok);
            tok = strtok(NULL, ",\n");
        }
    }
    t->v = (float *)calloc((size_t)TR_MAX_ROWS * TR_MAX_COLS, sizeof(float));
    while (t->v && t->n_rows < TR_MAX_ROWS && fgets(line, sizeof line, f)) {
        char *p = line;
        int c;
        for (c = 0; c < t->n_cols; c++) {
            t->v[t->n_rows * TR_MAX_COLS + c] = strtof(p, &p);
            if (*p == ',') p++;
        }
        t->n_rows++;
    }
    fclose(f);
    return t->v ? 0 : -1;
}

static int tr_table_col(const tr_table *t, const char *name) {
    int c;
    for (c = 0; c < t->n_cols; c++)
        if (strcmp(t->names[c], name) == 0) return c;
    return -1;
}

/* Column `name` as a freshly allocated array (NaN where missing). */
static float *tr_table_get(const tr_table *t, const char *name) {
    int c = tr_table_col(t, name), r;
    float *out = (float *)malloc(sizeof(float) * (t->n_rows > 0 ? t->n_rows : 1));
    for (r = 0; out && r < t->n_rows; r++) out[r] = c >= 0 ? t->v[r * TR_MAX_COLS + c] : NAN;
    return out;
}

/* ===================================================================== */
/* Training                                                              */
/* ===================================================================== */

static void tr_path(char *out, const tr_opts *o, const char *name) { tr_join(out, o->out, name); }

/* Cuts a log (a header line, then rows whose first column is the step)
 * after its last complete row at or before `step`: the rows a killed run
 * wrote after its last checkpoint, and a partial last line, go. Returns
 * the bytes kept (0: no log, or not even a complete header). */
static size_t tr_truncate_log(const char *path, long step) {
    unsigned char *text;
    size_t n, keep = 0;
    if (sm_read_file(path, &text, &n, NULL) != SM_OK) return 0;
    while (keep < n) {
        const char *line = (const char *)text + keep, *nl = (const char *)memchr(line, '\n', n - keep);
        char *end;
        if (!nl) break;                                         /* a partial line */
        if (keep > 0 && (strtol(line, &end, 10) > step || end == line)) break; /* a later row */
        keep = (size_t)(nl - (const char *)text) + 1;
    }
    sm_free(text);
    if (keep < n && truncate(path, (off_t)keep) != 0) {
        fprintf(stderr, "trainer: --resume: cannot cut %s back to step %ld: %s\n", path, step, strerror(errno));
        exit(1);
    }
    return keep;
}

/* A log of the run in OUT. A resumed run (resume_step >= 0) keeps the rows
 * up to its checkpoint's step and appends; the log then reads as an
 * uninterrupted run's (the rows up to a checkpoint are on the disk before
 * the checkpoint is: tr_sync_log). */
static FILE *tr_open_log(const tr_opts *o, const char *name, const char *header, long resume_step) {
    char path[TR_PATH];
    FILE *f;
    size_t kept;
    tr_path(path, o, name);
    kept = resume_step >= 0 ? tr_truncate_log(path, resume_step) : 0;
    f = fopen(path, kept > 0 ? "a" : "w");
    if (!f) {
        fprintf(stderr, "trainer: cannot write %s: %s\n", path, strerror(errno));
        exit(1);
    }
    if (kept == 0) fprintf(f, "%s\n", header);
    return f;
}

/* Before a checkpoint: the log's rows so far reach the disk. */
static void tr_sync_log(FILE *f, const tr_opts *o, const char *name) {
    char path[TR_PATH];
    sm_error err = {SM_OK, ""};
    tr_path(path, o, name);
    if (fflush(f) != 0) sm_fail(&err, SM_ERR_IO, "cannot write %s: %s", path, strerror(errno));
    else sm_sync_path(path, &err);
    if (err.code != SM_OK) tr_die("log", &err);
}

static const char *tr_eval_header =
    "step,tokens,train_loss,val_loss,val_ppl,tokens_per_s,"
    "out_backbone,out_engram,out_peer,dout_backbone,dout_engram,dout_peer,"
    "gpar_backbone,gpar_engram,gpar_peer,gpar_mhc,lr_backbone,lr_engram,lr_peer,lr_mhc,"
    "engram_alpha,peer_frac_used,peer_kl,mhc_sum_err,mhc_amax_fwd,mhc_amax_bwd,"
    "hot_share,loss_hot,loss_cold,hot_cold_delta,alpha_hot,alpha_cold";

static double tr_mean(const double *x, int n) {
    double s = 0;
    int i;
    for (i = 0; i < n; i++) s += x[i];
    return n ? s / n : NAN;
}

/* RUN/route_layers.csv and RUN/route_buckets.csv: the final eval's
 * per-layer gate by tier and its alpha buckets. */
static void tr_write_route_tables(const tr_opts *o, const sm_route_report *rr) {
    char path[TR_PATH];
    FILE *f;
    int l, b;
    tr_path(path, o, "route_layers.csv");
    if (!(f = fopen(path, "w"))) return;
    fprintf(f, "layer,alpha_hot,alpha_cold\n");
    for (l = 0; l < rr->n_layers; l++) fprintf(f, "%d,%.6g,%.6g\n", l, rr->alpha_hot[l], rr->alpha_cold[l]);
    fclose(f);
    tr_path(path, o, "route_buckets.csv");
    if (!(f = fopen(path, "w"))) return;
    fprintf(f, "layer,bucket,count,loss,hot_share\n");
    for (l = 0; l < rr->n_layers; l++)
        for (b = 0; b < SM_ROUTE_ALPHA_BUCKETS; b++)
            fprintf(f, "%d,%d,%llu,%.6g,%.6g\n", l, b, (unsigned long long)rr->bucket_count[l][b],
                    rr->bucket_loss[l][b], rr->bucket_hot_share[l][b]);
    fclose(f);
}

static void tr_log_eval(FILE *f, const tr_run *r, double train_loss, const tr_eval *e,
                        const float lr[TR_N_MODULES]) {
    int k;
    fprintf(f, "%ld,%.0f,%.6f,%.6f,%.4f,%.1f", r->step, r->tokens_seen, train_loss, e->loss, e->ppl,
            r->train_seconds > 0 ? r->tokens_seen / r->train_seconds : 0.0);
    for (k = 0; k < 3; k++) fprintf(f, ",%.6g", e->mod.out[k]); /* eval output norms */
    for (k = 0; k < 3; k++) fprintf(f, ",%.6g", r->train_avg.dout[k]);
    for (k = 0; k < TR_N_MODULES; k++) fprintf(f, ",%.6g", r->train_avg.gpar[k]);
    for (k = 0; k < TR_N_MODULES; k++) fprintf(f, ",%.6g", lr[k]);
    fprintf(f, ",%.6g,%.6g,%.6g,%.6g,%.6g,%.6g", e->engram_alpha, e->peer_frac_used, e->peer_kl,
            e->mhc_sum_err, e->mhc_amax_fwd, e->mhc_amax_bwd);
    if (e->has_route)
        fprintf(f, ",%.6g,%.6g,%.6g,%.6g,%.6g,%.6g\n", e->route.hot_share, e->route.loss_hot,
                e->route.loss_cold, e->route.hot_cold_delta, tr_mean(e->route.alpha_hot, e->route.n_layers),
                tr_mean(e->route.alpha_cold, e->route.n_layers));
    else
        fprintf(f, ",nan,nan,nan,nan,nan,nan\n");
    fflush(f);
}

/* Status line: rewritten in place on a terminal, otherwise one plain line
 * per 10% of the run. */
static void tr_progress(const tr_opts *o, const tr_run *r, double loss) {
    double tps = r->train_seconds > 0 ? r->tokens_seen / r->train_seconds : 0;
    double eta = tps > 0 ? (double)(o->steps - r->step) * o->batch * o->seq_len / tps : 0;
    int tty = isatty(fileno(stdout));
    if (o->quiet) return;
    if (!tty && (r->step * 10) / o->steps == ((r->step - 1) * 10) / o->steps) return;
    printf("%sstep %6ld/%ld | loss %.4f | %6.0f tok/s | ETA %4.0fs%s", tty ? "\r" : "", r->step,
           o->steps, loss, tps, eta, tty ? "   " : "\n");
    fflush(stdout);
}

static float tr_base_lr(const tr_opts *o, int module) {
    float v = module == TR_G_ENGRAM ? o->lr_engram : module == TR_G_PEER ? o->lr_peer
            : module == TR_G_MHC ? o->lr_mhc : o->lr;
    return v >= 0 ? v : o->lr;
}

/* Module lrs in force at the run's current step: base, then the schedule's
 * phases, then the coordination multipliers. */
static void tr_current_lrs(const tr_opts *o, const tr_run *r, float lr[TR_N_MODULES]) {
    int k;
    for (k = 0; k < TR_N_MODULES; k++) lr[k] = tr_base_lr(o, k);
    tr_schedule_lrs(o->phases, o->n_phases, r->step, o->steps, lr);
    for (k = 0; k < TR_N_MODULES; k++) lr[k] *= r->coord.mult[k];
}

/* The top-N n-gram set of the training split (hot tier or route labels). */
static void tr_build_hot_set(tr_run *r, const tr_opts *o) {
    sm_error err = {SM_OK, ""};
    const sm_tokens *t = &r->data.train;
    unsigned char *doc = (unsigned char *)sm_alloc(t->n_tokens, 1, "document starts", &err);
    size_t i;
    int k;
    if (!doc) tr_die("hot set", &err);
    for (i = 0; i < t->n_docs; i++) doc[t->doc_starts[i]] = 1;
    if (sm_model_build_hot_set(&r->model, t->tokens, doc, t->n_tokens, &err) != SM_OK) tr_die("hot set", &err);
    sm_free(doc);
    if (o->quiet) return;
    for (k = 0; k < r->cfg.engram.hash.n_orders; k++)
        printf("hot set: top %u %d-grams cover %.1f%% of training positions\n", r->cfg.nine.n_hot[k],
               r->cfg.engram.hash.orders[k], 100.0 * r->model.nine.coverage[k]);
}

/* Continue from OUT/model.ckpt: same model configuration required. */
static void tr_resume(tr_run *r, const tr_opts *o) {
    sm_error err = {SM_OK, ""};
    sm_reader rd;
    sm_model_config saved;
    tr_opts saved_opts;
    sm_loader_state state;
    char path[TR_PATH];
    tr_path(path, o, "model.ckpt");
    if (tr_read_checkpoint_header(&rd, path, &saved, &saved_opts, &err) != SM_OK) tr_die("--resume", &err);
    if (memcmp(&saved, &r->cfg, sizeof saved) != 0) {
        fprintf(stderr, "trainer: --resume: %s was written for a different model configuration; "
                        "use the options of the original run\n", path);
        exit(1);
    }
    if (tr_read_checkpoint_state(&rd, r, &err) != SM_OK) tr_die("--resume", &err);
    sm_reader_close(&rd);
    state = r->loader.state;
    if (sm_loader_restore(&r->loader, &state, &err) != SM_OK) tr_die("--resume: data position", &err);
}

static void tr_run_setup(tr_run *r, tr_opts *o) {
    sm_error err = {SM_OK, ""};
    sm_loader_config lc = sm_loader_default_config();
    char msg[256];
    size_t N;
    memset(r, 0, sizeof *r);
    if (tr_strategy_schedule(o, msg, sizeof msg) != 0) {
        fprintf(stderr, "trainer: --schedule/--strategy: %s\n", msg);
        exit(1);
    }
    if (!o->out[0]) {
        fprintf(stderr, "trainer: --out is required (the run folder)\n");
        exit(1);
    }
    tr_mkdir(o->out);
    tr_load_data(&r->data, o, 1);
    if (tr_model_config(o, (int)r->data.bpe.vocab_size, &r->cfg, msg, sizeof msg) != 0) {
        fprintf(stderr, "trainer: %s\n", msg);
        exit(1);
    }
    if (sm_model_init(&r->model, &r->cfg, o->batch, o->seed, &err) != SM_OK) tr_die("model", &err);
    if (sm_model_set_canon(&r->model, r->data.canon.canon, (int)r->data.canon.vocab_size, &err) != SM_OK)
        tr_die("tokenizer compression", &err);
    lc.batch_size = o->batch, lc.seq_len = o->seq_len, lc.seed = o->data_seed;
    if (sm_loader_init(&r->loader, &r->data.train, &lc, &err) != SM_OK) tr_die("training data", &err);
    tr_coord_init(&r->coord);
    tr_stats_nan(&r->train_avg);
    r->loss_avg = NAN;
    if (o->resume) tr_resume(r, o);
    else if (r->cfg.nine.n_hot[0] > 0 && (o->nine > 0 || o->hot_labels > 0)) tr_build_hot_set(r, o);
    tr_device_setup(r, o);
    N = (size_t)o->batch * o->seq_len;
    r->in = (int *)sm_alloc(N, sizeof(int), "batch inputs", &err);
    r->tg = (int *)sm_alloc(N, sizeof(int), "batch targets", &err);
    r->doc = (unsigned char *)sm_alloc(N, 1, "batch document starts", &err);
    r->label = (unsigned char *)sm_alloc(N, 1, "route labels", &err);
    if (!r->in || !r->tg || !r->doc || !r->label) tr_die("batch buffers", &err);
}

static void tr_run_free(tr_run *r) {
    tr_device_free(r);
    sm_model_free(&r->model);
    tr_free_data(&r->data);
    sm_free(r->in), sm_free(r->tg), sm_free(r->doc), sm_free(r->label);
}

/* One optimisation step. Returns 0, or 1 when the loss or the gradient is
 * not finite (nothing is updated then). */
static int tr_step(tr_run *r, const tr_opts *o, double *loss_out, char *msg, size_t msg_size) {
    sm_model *m = &r->model;
    sm_error err = {SM_OK, ""};
    float lr[TR_N_MODULES], clip;
    double gnorm, group_norm[SM_MAX_GROUPS], t0 = sm_now();
    tr_module_stats st;
    tr_current_lrs(o, r, lr);
    tr_apply_module_lrs(m, lr, o->lr);
    sm_loader_next(&r->loader, r->in, r->tg, r->doc);
    if (r->step == o->debug_nan_step) m->params.data[m->wte] = NAN; /* test hook (CPU runs) */
    tr_zero_grad(r);
    if (tr_forward(r, o->batch, o->seq_len, &err) != SM_OK) tr_die("forward", &err);
    *loss_out = m->loss;
    if (!sm_is_finite(m->loss)) {
        snprintf(msg, msg_size, "the loss is %g at step %ld", (double)m->loss, r->step);
        return 1;
    }
    tr_backward(r);
    gnorm = tr_grad_norms(r, group_norm);
    if (!(gnorm < INFINITY)) {
        snprintf(msg, msg_size, "the gradient norm is %g at step %ld", gnorm, r->step);
        return 1;
    }
    tr_measure_outputs(m, &st);
    tr_measure_param_grads(m, group_norm, &st);
    tr_stats_ema(&r->train_avg, &st, 0.9);
    tr_stats_ema(&r->coord.avg, &st, 0.9);
    clip = sm_clip_scale(gnorm, o->grad_clip);
    tr_adamw(r, sm_lr_schedule(r->step, o->warmup, o->steps, o->min_lr_ratio), clip);
    if (strcmp(o->strategy, "auto") == 0 && o->coord_every > 0 && (r->step + 1) % o->coord_every == 0)
        tr_coord_update(&r->coord);
    r->step++;
    r->tokens_seen += (double)o->batch * o->seq_len;
    r->train_seconds += sm_now() - t0;
    return 0;
}

/* ---- JSON files: valid JSON (null where a value is absent or not
 * finite), written whole or not at all ---- */

typedef struct {
    FILE *f;
    int fields;
    char path[TR_PATH], tmp[TR_PATH + 8];
} tr_json;

/* An object written to PATH.tmp; tr_json_close syncs it and renames it over
 * PATH. Returns 0, or -1 with a message. */
static int tr_json_open(tr_json *j, const char *path) {
    snprintf(j->path, sizeof j->path, "%s", path);
    snprintf(j->tmp, sizeof j->tmp, "%s.tmp", path);
    j->fields = 0;
    if (!(j->f = fopen(j->tmp, "w"))) {
        fprintf(stderr, "trainer: cannot write %s: %s\n", j->tmp, strerror(errno));
        return -1;
    }
    fprintf(j->f, "{");
    return 0;
}

static void tr_json_close(tr_json *j) {
    sm_error err = {SM_OK, ""};
    int ok = fprintf(j->f, "\n}\n") > 0 && fflush(j->f) == 0;
    if (fclose(j->f) != 0 || !ok || sm_sync_path(j->tmp, &err) != SM_OK || rename(j->tmp, j->path) != 0) {
        fprintf(stderr, "trainer: cannot write %s: %s\n", j->path, err.msg[0] ? err.msg : strerror(errno));
        remove(j->tmp);
    }
}

static void tr_json_key(tr_json *j, const char *key) {
    fprintf(j->f, "%s\n  \"%s\": ", j->fields++ ? "," : "", key);
}

static void tr_json_num(tr_json *j, const char *key, double v) {
    tr_json_key(j, key);
    if (isfinite(v)) fprintf(j->f, "%.10g", v);
    else fprintf(j->f, "null");
}

static void tr_json_int(tr_json *j, const char *key, unsigned long long v) {
    tr_json_key(j, key);
    fprintf(j->f, "%llu", v);
}

static void tr_json_str(tr_json *j, const char *key, const char *v) {
    tr_json_key(j, key);
    fputc('"', j->f);
    for (; *v; v++) {
        unsigned char c = (unsigned char)*v;
        if (c == '"' || c == '\\') fprintf(j->f, "\\%c", c);
        else if (c < 0x20) fprintf(j->f, "\\u%04x", c);
        else fputc(c, j->f);
    }
    fputc('"', j->f);
}

static void tr_write_summary(const tr_opts *o, const tr_run *r, const tr_eval *e, double train_loss) {
    char path[TR_PATH];
    tr_json j;
    int g;
    tr_path(path, o, "summary.json");
    if (tr_json_open(&j, path) != 0) return;
    tr_json_int(&j, "steps", (unsigned long long)r->step);
    tr_json_int(&j, "tokens", (unsigned long long)r->tokens_seen);
    tr_json_num(&j, "train_loss", train_loss);
    tr_json_num(&j, "val_loss", e->loss);
    tr_json_num(&j, "val_ppl", e->ppl);
    tr_json_num(&j, "tokens_per_s", r->train_seconds > 0 ? r->tokens_seen / r->train_seconds : NAN);
    tr_json_int(&j, "params", (unsigned long long)r->model.params.total);
    tr_json_str(&j, "strategy", o->strategy);
    tr_json_int(&j, "seed", (unsigned long long)o->seed);
    tr_json_str(&j, "data", r->data.dir);
    tr_json_key(&j, "groups");
    fprintf(j.f, "{");
    for (g = 0; g < r->model.params.n_groups; g++) {
        size_t n = 0;
        int t;
        for (t = 0; t < r->model.params.n_tensors; t++)
            if (r->model.params.tensors[t].group == g) n += r->model.params.tensors[t].size;
        fprintf(j.f, "%s\"%s\": %zu", g ? ", " : "", r->model.params.groups[g].name, n);
    }
    fprintf(j.f, "}");
    tr_json_num(&j, "hot_cold_delta", e->has_route ? e->route.hot_cold_delta : NAN);
    tr_json_num(&j, "loss_hot", e->has_route ? e->route.loss_hot : NAN);
    tr_json_num(&j, "loss_cold", e->has_route ? e->route.loss_cold : NAN);
    tr_json_num(&j, "engram_alpha", e->engram_alpha);
    tr_json_num(&j, "peer_frac_used", e->peer_frac_used);
    tr_json_num(&j, "peer_kl", e->peer_kl);
    tr_json_num(&j, "mhc_sum_err", e->mhc_sum_err);
    tr_json_num(&j, "mhc_amax_fwd", e->mhc_amax_fwd);
    tr_json_close(&j);
}

/* RUN/loss.png: the training loss per step and the validation loss per eval. */
static void tr_plot_losses(const tr_opts *o) {
    tr_table steps, evals;
    plot_series se[2];
    plot_line_spec sp;
    float *sx, *sy, *ex, *ey;
    char path[TR_PATH], errbuf[PLOT_ERR_SIZE];
    tr_path(path, o, "steps.csv");
    if (tr_table_read(&steps, path) != 0) return;
    tr_path(path, o, "log.csv");
    if (tr_table_read(&evals, path) != 0) {
        free(steps.v);
        return;
    }
    sx = tr_table_get(&steps, "step"), sy = tr_table_get(&steps, "loss");
    ex = tr_table_get(&evals, "step"), ey = tr_table_get(&evals, "val_loss");
    memset(se, 0, sizeof se);
    memset(&sp, 0, sizeof sp);
    se[0].name = "train (per step)", se[0].x = sx, se[0].y = sy, se[0].n = steps.n_rows;
    se[1].name = "validation", se[1].x = ex, se[1].y = ey, se[1].n = evals.n_rows;
    sp.title = "Loss", sp.xlabel = "step", sp.ylabel = "loss (nats/token)", sp.series = se, sp.n_series = 2;
    tr_path(path, o, "loss.png");
    if (plot_line_chart(&sp, path, errbuf) != 0) fprintf(stderr, "trainer: %s\n", errbuf);
    free(sx), free(sy), free(ex), free(ey), free(steps.v), free(evals.v);
}

/* Returns 0 on success, 2 when stopped by the NaN guard. */
static int tr_train(tr_opts *o) {
    tr_run r;
    FILE *evlog, *steplog;
    char msg[256], path[TR_PATH];
    double loss = NAN;
    long end;
    sm_error err = {SM_OK, ""};
    tr_eval e;
    memset(&e, 0, sizeof e);
    tr_run_setup(&r, o);
    end = o->stop_after > 0 && o->stop_after < o->steps ? o->stop_after : o->steps;
    evlog = tr_open_log(o, "log.csv", tr_eval_header, o->resume ? r.step : -1);
    steplog = tr_open_log(o, "steps.csv", "step,loss,lr_factor", o->resume ? r.step : -1);
    tr_path(path, o, "model.ckpt");
    if (!o->quiet)
        printf("model: %zu parameters, %d sublayers, %d threads; %zu train / %zu val tokens\n",
               r.model.params.total, r.model.n_sub, sm_num_threads(), r.data.train.n_tokens,
               r.data.val.n_tokens);
    while (r.step < end) {
        if (tr_step(&r, o, &loss, msg, sizeof msg) != 0) {
            fprintf(stderr, "\ntrainer: stopped: %s. Nothing was updated; %s%s.\n", msg,
                    tr_exists(path) ? "the last good checkpoint is kept at " : "no checkpoint was written yet",
                    tr_exists(path) ? path : "");
            fclose(evlog), fclose(steplog);
            tr_run_free(&r);
            return 2;
        }
        tr_ema(&r.loss_avg, loss, 0.9);
        fprintf(steplog, "%ld,%.6f,%.6f\n", r.step, loss,
                sm_lr_schedule(r.step - 1, o->warmup, o->steps, o->min_lr_ratio));
        tr_progress(o, &r, r.loss_avg);
        if ((o->eval_every > 0 && r.step % o->eval_every == 0) || r.step == o->steps) {
            float lr[TR_N_MODULES];
            tr_current_lrs(o, &r, lr);
            tr_to_host(&r);
            /* every logged eval uses the same batches, so the curve compares like with like */
            e = tr_evaluate(&r, o->batch, o->eval_batches);
            tr_log_eval(evlog, &r, r.loss_avg, &e, lr);
            if (!o->quiet && isatty(fileno(stdout))) printf("\n");
            if (!o->quiet) printf("eval step %ld: val loss %.4f (ppl %.2f)\n", r.step, e.loss, e.ppl);
        }
        if ((o->ckpt_every > 0 && r.step % o->ckpt_every == 0) || r.step == end) {
            tr_to_host(&r);
            tr_sync_log(evlog, o, "log.csv");
            tr_sync_log(steplog, o, "steps.csv");
            if (tr_save_checkpoint(&r, o, path, &err) != SM_OK) tr_die("checkpoint", &err);
        }
        tr_debug_kill(o, r.step, NULL);
    }
    if (!o->quiet && isatty(fileno(stdout))) printf("\n");
    if (r.step == o->steps) { /* the final numbers cover the whole validation split */
        tr_to_host(&r);
        /* (e.tokens == 0: no eval in this process, a finished run resumed) */
        if (o->eval_batches > 0 || e.tokens == 0) e = tr_evaluate(&r, o->batch, 0);
        tr_write_summary(o, &r, &e, r.loss_avg);
        if (e.has_route) tr_write_route_tables(o, &e.route);
    }
    fclose(evlog), fclose(steplog);
    tr_plot_losses(o);
    tr_run_free(&r);
    return 0;
}

/* ===================================================================== */
/* Eval and sample from a checkpoint                                     */
/* ===================================================================== */

/* Builds the model of a checkpoint (and its data) for eval/sample. */
static void tr_load_for_inference(tr_run *r, tr_opts *o, int B) {
    sm_error err = {SM_OK, ""};
    sm_reader rd;
    tr_opts saved;
    size_t N;
    if (!o->ckpt[0]) {
        fprintf(stderr, "trainer: --ckpt is required\n");
        exit(1);
    }
    memset(r, 0, sizeof *r);
    if (tr_read_checkpoint_header(&rd, o->ckpt, &r->cfg, &saved, &err) != SM_OK) tr_die("--ckpt", &err);
    /* the checkpoint's data unless --data says otherwise */
    if (!o->data[0]) snprintf(o->data, sizeof o->data, "%s", saved.data);
    snprintf(o->out, sizeof o->out, "%s", saved.out);
    tr_load_data(&r->data, o, 0);
    if (r->data.bpe.vocab_size != (uint32_t)r->cfg.vocab_size) {
        fprintf(stderr, "trainer: the tokenizer in %s has %u tokens, the checkpoint's model %d\n",
                r->data.dir, r->data.bpe.vocab_size, r->cfg.vocab_size);
        exit(1);
    }
    if (sm_model_init(&r->model, &r->cfg, B, 1, &err) != SM_OK) tr_die("model", &err);
    if (tr_read_checkpoint_state(&rd, r, &err) != SM_OK) tr_die("--ckpt", &err);
    sm_reader_close(&rd);
    if (sm_model_set_canon(&r->model, r->data.canon.canon, (int)r->data.canon.vocab_size, &err) != SM_OK)
        tr_die("tokenizer compression", &err);
    N = (size_t)B * r->cfg.seq_len;
    r->in = (int *)sm_alloc(N, sizeof(int), "inputs", &err);
    r->tg = (int *)sm_alloc(N, sizeof(int), "targets", &err);
    r->doc = (unsigned char *)sm_alloc(N, 1, "document starts", &err);
    r->label = (unsigned char *)sm_alloc(N, 1, "route labels", &err);
    if (!r->in || !r->tg || !r->doc || !r->label) tr_die("buffers", &err);
}

/* RUN/eval_TAG.json next to the checkpoint. */
static void tr_write_eval_json(const tr_opts *o, const tr_eval *e) {
    char dir[TR_PATH], name[96], path[TR_PATH];
    const char *slash = strrchr(o->ckpt, '/');
    tr_json j;
    snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - o->ckpt) : 1, slash ? o->ckpt : ".");
    snprintf(name, sizeof name, "eval_%s.json", o->tag);
    tr_join(path, dir, name);
    if (tr_json_open(&j, path) != 0) exit(1);
    tr_json_num(&j, "val_loss", e->loss);
    tr_json_num(&j, "val_ppl", e->ppl);
    tr_json_int(&j, "tokens", (unsigned long long)e->tokens);
    tr_json_str(&j, "data", o->data);
    tr_json_close(&j);
}

static int tr_cmd_eval(tr_opts *o) {
    tr_run r;
    tr_eval e;
    tr_load_for_inference(&r, o, o->batch);
    e = tr_evaluate(&r, o->batch, o->eval_batches);
    if (!o->quiet) printf("val loss %.4f  ppl %.2f  (%zu tokens, step %ld)\n", e.loss, e.ppl, e.tokens, r.step);
    if (o->tag[0]) tr_write_eval_json(o, &e);
    tr_run_free(&r);
    return 0;
}

/* Draws a token from logits[V] with temperature and top-k. */
static int tr_sample_token(const float *logits, int V, float temperature, int top_k, sm_rng *rng) {
    float *p = (float *)malloc(sizeof(float) * V), maxv = -1e30f, kth = -1e30f;
    double sum = 0, u;
    int v, pick = V - 1;
    if (!p) return 0;
    for (v = 0; v < V; v++) maxv = logits[v] > maxv ? logits[v] : maxv;
    if (top_k > 0 && top_k < V) { /* threshold = the k-th largest logit */
        int idx[SM_TOPK_MAX];
        float val[SM_TOPK_MAX];
        int k = top_k < SM_TOPK_MAX ? top_k : SM_TOPK_MAX;
        sm_topk(logits, V, k, idx, val);
        kth = val[k - 1];
    }
    for (v = 0; v < V; v++) {
        p[v] = logits[v] >= kth ? expf((logits[v] - maxv) / (temperature > 0 ? temperature : 1e-6f)) : 0.0f;
        sum += p[v];
    }
    u = sm_rng_uniform(rng) * sum;
    for (v = 0; v < V; v++) {
        u -= p[v];
        if (u <= 0) {
            pick = v;
            break;
        }
    }
    free(p);
    return pick;
}

/* Generates o->sample_tokens tokens after o->prompt and writes the text to out. */
static int tr_sample(tr_opts *o, FILE *out) {
    tr_run r;
    sm_error err = {SM_OK, ""};
    sm_rng rng;
    uint32_t *ids;
    size_t n_ids = 0, i, len = strlen(o->prompt), cap;
    int T, V, t;
    unsigned char *text;
    tr_load_for_inference(&r, o, 1);
    T = r.cfg.seq_len, V = r.cfg.vocab_size;
    cap = len + (size_t)o->sample_tokens + 2;
    ids = (uint32_t *)sm_alloc(cap, sizeof(uint32_t), "sample tokens", &err);
    if (!ids) tr_die("sample", &err);
    ids[n_ids++] = SM_BPE_EOT; /* a document start */
    if (len && sm_bpe_encode(&r.data.bpe, (const unsigned char *)o->prompt, len, ids + 1, &i, &err) != SM_OK)
        tr_die("encoding the prompt", &err);
    n_ids += len ? i : 0;
    sm_rng_seed(&rng, o->seed);
    for (t = 0; t < o->sample_tokens; t++) {
        size_t start = n_ids > (size_t)T ? n_ids - T : 0, n = n_ids - start;
        for (i = 0; i < n; i++) r.in[i] = (int)ids[start + i], r.doc[i] = ids[start + i] == SM_BPE_EOT;
        if (sm_model_forward(&r.model, r.in, NULL, r.doc, 1, (int)n, &err) != SM_OK) tr_die("sample", &err);
        ids[n_ids++] = (uint32_t)tr_sample_token(r.model.logits + (n - 1) * (size_t)V, V, o->temperature, o->top_k, &rng);
    }
    cap = sm_bpe_decode(&r.data.bpe, ids, n_ids, NULL, 0);
    text = (unsigned char *)sm_alloc(cap + 1, 1, "sample text", &err);
    if (!text) tr_die("sample", &err);
    sm_bpe_decode(&r.data.bpe, ids, n_ids, text, cap + 1);
    fwrite(text, 1, cap, out);
    fprintf(out, "\n");
    sm_free(text), sm_free(ids);
    tr_run_free(&r);
    return 0;
}

/* ===================================================================== */
/* Report: tables and plots over finished runs                           */
/* ===================================================================== */

#define TR_MAX_RUNS 64
/* The numbers of keys[0..n) ("key": number) from a flat JSON file written
 * by this trainer, read once; NaN where a key (or the file) is missing. */
static void tr_json_numbers(const char *path, const char *const *keys, double *out, int n) {
    unsigned char *text;
    size_t len;
    int i;
    for (i = 0; i < n; i++) out[i] = NAN;
    if (sm_read_file(path, &text, &len, NULL) != SM_OK) return;
    for (i = 0; i < n; i++) {
        char pat[80];
        const char *at;
        snprintf(pat, sizeof pat, "\"%s\":", keys[i]);
        at = strstr((const char *)text, pat);
        if (at) {
            char *end;
            double v = strtod(at + strlen(pat), &end);
            out[i] = end > at + strlen(pat) ? v : NAN; /* null: absent */
        }
    }
    sm_free(text);
}

static double tr_json_number(const char *path, const char *key) {
    double v;
    tr_json_numbers(path, &key, &v, 1);
    return v;
}

typedef struct {
    char dir[TR_PATH], label[128];
    tr_table log;
    double val_loss, tok_s, params, xdomain;
    double loss_hot, loss_cold, hot_cold_delta; /* NaN without route statistics */
} tr_report_run;

/* Label = the run folder's name without a trailing "-sN" seed suffix. */
static void tr_run_label(const char *dir, char *label, size_t n) {
    const char *base = strrchr(dir, '/');
    char *dash;
    snprintf(label, n, "%s", base && base[1] ? base + 1 : dir);
    dash = strrchr(label, '-');
    if (dash && dash[1] == 's' && isdigit((unsigned char)dash[2])) *dash = 0;
}

static void tr_mean_std(const double *x, int n, double *mean, double *std) {
    double s = 0, ss = 0;
    int i, k = 0;
    for (i = 0; i < n; i++)
        if (!isnan(x[i])) s += x[i], ss += x[i] * x[i], k++;
    *mean = k ? s / k : NAN;
    *std = k > 1 ? sqrt(fmax(0, (ss - s * s / k) / (k - 1))) : NAN;
}

static int tr_any_finite(const float *x, int n) {
    int i;
    for (i = 0; i < n; i++)
        if (isfinite(x[i])) return 1;
    return 0;
}

/* Line chart of column `col` against step, one series per run in idx[]
 * (runs where the column is all NaN, e.g. a module they lack, left out). */
static void tr_plot_runs(const tr_report_run *runs, const int *idx, int n, const char *col,
                         const char *title, const char *ylabel, int log_y, const char *path) {
    plot_series se[PLOT_MAX_SERIES];
    plot_line_spec sp;
    float *xs[PLOT_MAX_SERIES], *ys[PLOT_MAX_SERIES];
    char errbuf[PLOT_ERR_SIZE];
    int i, k = 0;
    memset(&sp, 0, sizeof sp);
    for (i = 0; i < n && k < PLOT_MAX_SERIES; i++) {
        const tr_table *t = &runs[idx[i]].log;
        if (tr_table_col(t, col) < 0 || t->n_rows == 0) continue;
        memset(&se[k], 0, sizeof se[k]);
        xs[k] = tr_table_get(t, "step"), ys[k] = tr_table_get(t, col);
        if (!tr_any_finite(ys[k], t->n_rows)) {
            free(xs[k]), free(ys[k]);
            continue;
        }
        se[k].name = runs[idx[i]].label, se[k].x = xs[k], se[k].y = ys[k], se[k].n = t->n_rows;
        k++;
    }
    if (k == 0) return;
    sp.title = title, sp.xlabel = "step", sp.ylabel = ylabel, sp.series = se, sp.n_series = k;
    sp.log_y = log_y;
    if (plot_line_chart(&sp, path, errbuf) != 0) fprintf(stderr, "trainer report: %s\n", errbuf);
    for (i = 0; i < k; i++) free(xs[i]), free(ys[i]);
}

/* Several columns of one run against step. */
static void tr_plot_columns(const tr_report_run *r, const char *const *cols, const char *const *names,
                            int n, const char *title, const char *ylabel, int log_y, const char *path) {
    plot_series se[8];
    plot_line_spec sp;
    float *xs = tr_table_get(&r->log, "step"), *ys[8];
    char errbuf[PLOT_ERR_SIZE];
    int i, k = 0;
    memset(&sp, 0, sizeof sp);
    for (i = 0; i < n && i < 8; i++) {
        if (tr_table_col(&r->log, cols[i]) < 0) continue;
        ys[k] = tr_table_get(&r->log, cols[i]);
        if (!tr_any_finite(ys[k], r->log.n_rows)) {
            free(ys[k]);
            continue;
        }
        memset(&se[k], 0, sizeof se[k]);
        se[k].name = names[i], se[k].x = xs, se[k].y = ys[k], se[k].n = r->log.n_rows;
        k++;
    }
    if (k > 0) {
        sp.title = title, sp.xlabel = "step", sp.ylabel = ylabel, sp.series = se, sp.n_series = k;
        sp.log_y = log_y;
        if (plot_line_chart(&sp, path, errbuf) != 0) fprintf(stderr, "trainer report: %s\n", errbuf);
    }
    for (i = 0; i < k; i++) free(ys[i]);
    free(xs);
}

/* First eval step at which hot_cold_delta has the opposite sign of its
 * first value (the "flip"), or -1. */
static double tr_flip_step(const tr_table *t) {
    int cd = tr_table_col(t, "hot_cold_delta"), cs = tr_table_col(t, "step"), r;
    double first = NAN;
    if (cd < 0) return -1;
    for (r = 0; r < t->n_rows; r++) {
        double d = t->v[r * TR_MAX_COLS + cd];
        if (isnan(d)) continue;
        if (isnan(first)) first = d;
        else if ((first < 0) != (d < 0)) return t->v[r * TR_MAX_COLS + cs];
    }
    return -1;
}

static int tr_has_route(const tr_report_run *r) {
    int c = tr_table_col(&r->log, "hot_cold_delta");
    return c >= 0 && r->log.n_rows > 0 && !isnan(r->log.v[(r->log.n_rows - 1) * TR_MAX_COLS + c]);
}

/* Bars of one run's final alpha buckets (mean loss and hot share) and its
 * per-layer gate difference alpha_hot - alpha_cold. */
static void tr_plot_route_tables(const tr_report_run *r, const char *out_dir) {
    static const char *const buckets[SM_ROUTE_ALPHA_BUCKETS] = {"0-.2", ".2-.4", ".4-.6", ".6-.8", ".8-1"};
    tr_table bt, lt;
    char path[TR_PATH], name[200], title[200], errbuf[PLOT_ERR_SIZE];
    float loss[SM_ROUTE_ALPHA_BUCKETS], share[SM_ROUTE_ALPHA_BUCKETS], dalpha[SM_NGRAM_MAX_LAYERS];
    char layer_names[SM_NGRAM_MAX_LAYERS][24];
    const char *layer_labels[SM_NGRAM_MAX_LAYERS];
    plot_bar_series bs[2];
    plot_bar_spec sp[2];
    plot_panel panels[2];
    int i, n_layers = 0;
    tr_join(path, r->dir, "route_buckets.csv");
    if (tr_table_read(&bt, path) == 0) {
        for (i = 0; i < SM_ROUTE_ALPHA_BUCKETS; i++) loss[i] = share[i] = NAN;
        for (i = 0; i < bt.n_rows && i < SM_ROUTE_ALPHA_BUCKETS; i++) { /* layer 0's buckets */
            loss[i] = bt.v[i * TR_MAX_COLS + tr_table_col(&bt, "loss")];
            share[i] = bt.v[i * TR_MAX_COLS + tr_table_col(&bt, "hot_share")];
        }
        memset(bs, 0, sizeof bs), memset(sp, 0, sizeof sp), memset(panels, 0, sizeof panels);
        bs[0].name = "mean loss", bs[0].values = loss;
        bs[1].name = "hot share", bs[1].values = share;
        for (i = 0; i < 2; i++) {
            sp[i].xlabel = "gate alpha", sp[i].categories = buckets, sp[i].n_categories = SM_ROUTE_ALPHA_BUCKETS;
            sp[i].series = &bs[i], sp[i].n_series = 1, sp[i].value_labels = 1;
            panels[i].bar = &sp[i];
        }
        sp[0].title = "mean loss per alpha bucket", sp[0].ylabel = "loss";
        sp[1].title = "hot share per alpha bucket", sp[1].ylabel = "share";
        snprintf(name, sizeof name, "alpha_buckets_%s.png", r->label);
        snprintf(title, sizeof title, "%s: first Engram layer, final eval", r->label);
        tr_join(path, out_dir, name);
        if (plot_grid(panels, 2, 2, 640, 480, title, path, errbuf) != 0) fprintf(stderr, "trainer report: %s\n", errbuf);
        free(bt.v);
    }
    tr_join(path, r->dir, "route_layers.csv");
    if (tr_table_read(&lt, path) == 0) {
        for (i = 0; i < lt.n_rows && i < SM_NGRAM_MAX_LAYERS; i++, n_layers++) {
            dalpha[i] = lt.v[i * TR_MAX_COLS + 1] - lt.v[i * TR_MAX_COLS + 2];
            snprintf(layer_names[i], sizeof layer_names[i], "Engram %d", i);
            layer_labels[i] = layer_names[i];
        }
        memset(bs, 0, sizeof bs), memset(sp, 0, sizeof sp);
        bs[0].name = "alpha hot - alpha cold", bs[0].values = dalpha;
        sp[0].title = title, sp[0].ylabel = "delta alpha", sp[0].categories = layer_labels;
        sp[0].n_categories = n_layers, sp[0].series = bs, sp[0].n_series = 1, sp[0].value_labels = 1;
        sp[0].has_ref = 1, sp[0].ref_y = 0;
        snprintf(title, sizeof title, "%s: gate on hot minus cold positions per layer", r->label);
        snprintf(name, sizeof name, "alpha_layers_%s.png", r->label);
        tr_join(path, out_dir, name);
        if (n_layers && plot_bar_chart(&sp[0], path, errbuf) != 0) fprintf(stderr, "trainer report: %s\n", errbuf);
        free(lt.v);
    }
}

/* The Engram-Nine table and plots for the runs with route statistics. */
static void tr_report_route(const tr_report_run *runs, int n, const int *first_of, int n_labels,
                            const char *out_dir, FILE *md) {
    int idx[TR_MAX_RUNS], k = 0, j;
    char path[TR_PATH];
    for (j = 0; j < n_labels; j++)
        if (tr_has_route(&runs[first_of[j]])) idx[k++] = first_of[j];
    (void)n;
    if (k == 0) return;
    fprintf(md, "\n| run | val loss | loss hot | loss cold | hot-cold delta | flip step | alpha hot | alpha cold | tokens/s |\n"
                "|---|---|---|---|---|---|---|---|---|\n");
    for (j = 0; j < k; j++) {
        const tr_report_run *r = &runs[idx[j]];
        char flip_text[32] = "none";
        double flip = tr_flip_step(&r->log);
        const tr_table *t = &r->log;
        int last = (t->n_rows - 1) * TR_MAX_COLS;
        if (flip >= 0) snprintf(flip_text, sizeof flip_text, "%.0f", flip);
        fprintf(md, "| %s | %.4f | %.4f | %.4f | %+.4f | %s | %.3f | %.3f | %.0f |\n", r->label, r->val_loss,
                r->loss_hot, r->loss_cold, r->hot_cold_delta, flip_text,
                t->v[last + tr_table_col(t, "alpha_hot")], t->v[last + tr_table_col(t, "alpha_cold")], r->tok_s);
        tr_plot_route_tables(r, out_dir);
    }
    fprintf(md, "\nhot-cold delta = loss on positions whose n-grams are in the top-N set minus loss on the others "
                "(negative: hot positions predicted better); flip step = first eval where its sign changes.\n");
    tr_join(path, out_dir, "hot_cold_delta.png");
    tr_plot_runs(runs, idx, k, "hot_cold_delta", "Hot - cold loss over training", "loss hot - loss cold", 0, path);
    tr_join(path, out_dir, "alpha_hot.png");
    tr_plot_runs(runs, idx, k, "alpha_hot", "Engram gate on hot positions", "mean alpha", 0, path);
    tr_join(path, out_dir, "alpha_cold.png");
    tr_plot_runs(runs, idx, k, "alpha_cold", "Engram gate on cold positions", "mean alpha", 0, path);
}

static int tr_cmd_report(tr_opts *o, char **dirs, int n_dirs) {
    static const char *const summary_keys[6] = {"val_loss", "tokens_per_s", "params",
                                                 "loss_hot", "loss_cold", "hot_cold_delta"};
    static tr_report_run runs[TR_MAX_RUNS];
    double summary[6];
    char path[TR_PATH], labels[TR_MAX_RUNS][128], title[256];
    int n = 0, n_labels = 0, i, j, first_of[TR_MAX_RUNS], seeds[TR_MAX_RUNS];
    double val_mean[TR_MAX_RUNS], val_std[TR_MAX_RUNS], x_mean[TR_MAX_RUNS], x_std[TR_MAX_RUNS];
    double tps_mean[TR_MAX_RUNS];
    double base_mean = NAN, base_x = NAN;
    FILE *md;
    if (!o->out[0] || n_dirs == 0) {
        fprintf(stderr, "trainer report: usage: trainer report --out DIR RUN_DIR...\n");
        return 1;
    }
    if (n_dirs > TR_MAX_RUNS) {
        fprintf(stderr, "trainer report: %d run folders; a report takes at most %d\n", n_dirs, TR_MAX_RUNS);
        return 1;
    }
    for (i = 0; i < n_dirs; i++) {
        tr_report_run *r = &runs[n];
        snprintf(r->dir, sizeof r->dir, "%s", dirs[i]);
        tr_join(path, r->dir, "summary.json");
        tr_json_numbers(path, summary_keys, summary, 6);
        if (isnan(summary[0])) {
            fprintf(stderr, "trainer report: %s has no finished run (summary.json); skipped\n", r->dir);
            continue;
        }
        r->val_loss = summary[0], r->tok_s = summary[1], r->params = summary[2];
        r->loss_hot = summary[3], r->loss_cold = summary[4], r->hot_cold_delta = summary[5];
        tr_join(path, r->dir, "eval_xdomain.json");
        r->xdomain = tr_json_number(path, "val_loss");
        tr_join(path, r->dir, "log.csv");
        tr_table_read(&r->log, path);
        tr_run_label(r->dir, r->label, sizeof r->label);
        n++;
    }
    if (n == 0) {
        fprintf(stderr, "trainer report: none of the %d folders holds a finished run; nothing to report\n", n_dirs);
        return 1;
    }
    tr_mkdir(o->out);
    for (i = 0; i < n; i++) { /* distinct labels in order of appearance */
        for (j = 0; j < n_labels; j++)
            if (strcmp(labels[j], runs[i].label) == 0) break;
        if (j == n_labels) {
            first_of[n_labels] = i;
            snprintf(labels[n_labels++], 128, "%s", runs[i].label);
        }
    }
    tr_join(path, o->out, "report.md");
    md = fopen(path, "w");
    if (!md) {
        fprintf(stderr, "trainer report: cannot write %s\n", path);
        return 1;
    }
    fprintf(md, "| run | seeds | val loss | val ppl | vs %s | cross-domain loss | cross-domain ppl | vs %s | tokens/s | params |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n", o->baseline, o->baseline);
    for (j = 0; j < n_labels; j++) { /* mean and std over the seeds of each label */
        double v[TR_MAX_RUNS], x[TR_MAX_RUNS], t[TR_MAX_RUNS], unused;
        int k = 0;
        for (i = 0; i < n; i++)
            if (strcmp(runs[i].label, labels[j]) == 0)
                v[k] = runs[i].val_loss, x[k] = runs[i].xdomain, t[k] = runs[i].tok_s, k++;
        seeds[j] = k;
        tr_mean_std(v, k, &val_mean[j], &val_std[j]);
        tr_mean_std(x, k, &x_mean[j], &x_std[j]);
        tr_mean_std(t, k, &tps_mean[j], &unused);
        if (strcmp(labels[j], o->baseline) == 0) base_mean = val_mean[j], base_x = x_mean[j];
    }
    for (j = 0; j < n_labels; j++) {
        fprintf(md, "| %s | %d | %.4f", labels[j], seeds[j], val_mean[j]);
        if (seeds[j] > 1) fprintf(md, " ± %.4f", val_std[j]);
        fprintf(md, " | %.2f | %+.2f%% | ", exp(val_mean[j]), 100.0 * (val_mean[j] - base_mean) / base_mean);
        if (isnan(x_mean[j])) {
            fprintf(md, "– | – | – ");
        } else {
            fprintf(md, "%.4f", x_mean[j]);
            if (seeds[j] > 1) fprintf(md, " ± %.4f", x_std[j]);
            fprintf(md, " | %.2f | %+.2f%% ", exp(x_mean[j]), 100.0 * (x_mean[j] - base_x) / base_x);
        }
        fprintf(md, "| %.0f | %.2fM |\n", tps_mean[j], runs[first_of[j]].params / 1e6);
    }
    fprintf(md, "\nLoss: mean cross-entropy (nats/token) over the whole held-out split; ± is the standard "
                "deviation over seeds. \"vs\" columns: relative change of the loss against `%s` (negative = better).\n",
            o->baseline);
    tr_report_route(runs, n, first_of, n_labels, o->out, md);
    fclose(md);
    /* plots: validation curves of every label (first seed), then per-run diagnostics */
    tr_join(path, o->out, "val_loss.png");
    tr_plot_runs(runs, first_of, n_labels, "val_loss", "Validation loss", "loss (nats/token)", 0, path);
    for (j = 0; j < n_labels; j++) {
        const tr_report_run *r = &runs[first_of[j]];
        static const char *const out_cols[3] = {"out_backbone", "out_engram", "out_peer"};
        static const char *const gpar_cols[4] = {"gpar_backbone", "gpar_engram", "gpar_peer", "gpar_mhc"};
        static const char *const lr_cols[4] = {"lr_backbone", "lr_engram", "lr_peer", "lr_mhc"};
        char name[200];
        snprintf(name, sizeof name, "outputs_%s.png", r->label);
        tr_join(path, o->out, name);
        snprintf(title, sizeof title, "%s: module output magnitude (mean L2 per position)", r->label);
        tr_plot_columns(r, out_cols, tr_module_names, 3, title, "||output||", 1, path);
        snprintf(name, sizeof name, "grads_%s.png", r->label);
        tr_join(path, o->out, name);
        snprintf(title, sizeof title, "%s: parameter gradient norm per module", r->label);
        tr_plot_columns(r, gpar_cols, tr_module_names, 4, title, "||grad||", 1, path);
        snprintf(name, sizeof name, "lr_%s.png", r->label);
        tr_join(path, o->out, name);
        snprintf(title, sizeof title, "%s: learning rate per module", r->label);
        tr_plot_columns(r, lr_cols, tr_module_names, 4, title, "lr", 1, path);
    }
    tr_join(path, o->out, "peer_usage.png");
    tr_plot_runs(runs, first_of, n_labels, "peer_frac_used", "PEER: fraction of experts used per eval pass",
                 "fraction of experts retrieved", 0, path);
    tr_join(path, o->out, "peer_kl.png");
    tr_plot_runs(runs, first_of, n_labels, "peer_kl", "PEER: unevenness of expert usage",
                 "KL(usage || uniform), nats", 0, path);
    for (i = 0; i < n; i++) free(runs[i].log.v);
    if (!o->quiet) printf("report: %s/report.md and plots for %d runs (%d configurations)\n", o->out, n, n_labels);
    return 0;
}

/* A line chart of columns of any CSV with a header row (the trainer's logs,
 * the benchmarks' tables, or a user's). */
static int tr_cmd_plot(const tr_opts *o) {
    tr_table t;
    plot_series se[PLOT_MAX_SERIES];
    plot_line_spec sp;
    float *x, *ys[PLOT_MAX_SERIES];
    char cols[256], errbuf[PLOT_ERR_SIZE], *tok, *save = NULL;
    int k = 0, i, rc;
    if (!o->data[0] || !o->out[0] || !o->y_cols[0]) {
        fprintf(stderr, "trainer plot: --data CSV, --y COLUMNS and --out PNG are required\n");
        return 1;
    }
    if (tr_table_read(&t, o->data) != 0) {
        fprintf(stderr, "trainer plot: cannot read %s\n", o->data);
        return 1;
    }
    if (tr_table_col(&t, o->x_col) < 0) {
        fprintf(stderr, "trainer plot: %s has no column '%s'\n", o->data, o->x_col);
        free(t.v);
        return 1;
    }
    memset(se, 0, sizeof se), memset(&sp, 0, sizeof sp);
    x = tr_table_get(&t, o->x_col);
    snprintf(cols, sizeof cols, "%s", o->y_cols);
    for (tok = strtok_r(cols, ",", &save); tok && k < PLOT_MAX_SERIES; tok = strtok_r(NULL, ",", &save)) {
        if (tr_table_col(&t, tok) < 0) {
            fprintf(stderr, "trainer plot: %s has no column '%s'\n", o->data, tok);
            continue;
        }
        ys[k] = tr_table_get(&t, tok);
        se[k].name = tok, se[k].x = x, se[k].y = ys[k], se[k].n = t.n_rows;
        k++;
    }
    sp.title = o->title[0] ? o->title : o->data, sp.xlabel = o->x_col, sp.ylabel = k == 1 ? se[0].name : "";
    sp.series = se, sp.n_series = k, sp.log_y = o->log_y;
    rc = k > 0 && plot_line_chart(&sp, o->out, errbuf) == 0 ? 0 : 1;
    if (k > 0 && rc) fprintf(stderr, "trainer plot: %s\n", errbuf);
    for (i = 0; i < k; i++) free(ys[i]);
    free(x), free(t.v);
    return rc;
}

/* ===================================================================== */
/* main                                                                  */
/* ===================================================================== */

static int tr_run_command(tr_opts *o, const char *cmd, char **pos, int n_pos) {
#ifdef _OPENMP
    if (o->threads > 0) omp_set_num_threads(o->threads);
#endif
    if (strcmp(cmd, "tokenize") == 0) {
        if (!o->data[0] || !o->out[0]) {
            fprintf(stderr, "trainer tokenize: --data TEXT and --out DIR are required\n");
            return 1;
        }
        tr_tokenize(o->data, o->out, o->vocab, o->val_frac, o->tokenizer, 0);
        return 0;
    }
    if (strcmp(cmd, "train") == 0) return tr_train(o);
    if (strcmp(cmd, "eval") == 0) return tr_cmd_eval(o);
    if (strcmp(cmd, "sample") == 0) return tr_sample(o, stdout);
    if (strcmp(cmd, "report") == 0) return tr_cmd_report(o, pos, n_pos);
    return tr_cmd_plot(o);
}

/* The command line; tests run it in a child process (TRAINER_NO_MAIN). */
static int tr_main(int argc, char **argv) {
    tr_opts o;
    char **pos;
    int n_pos = 0, cmd, rc;
    const char *name = argc > 1 ? argv[1] : "";
    tr_defaults(&o);
    if (!name[0] || strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0 || strcmp(name, "help") == 0) {
        tr_usage(name[0] ? stdout : stderr, -1);
        return name[0] ? 0 : 1;
    }
    if ((cmd = tr_command_index(name)) < 0) {
        fprintf(stderr, "trainer: unknown command '%s' (see trainer --help)\n", name);
        return 1;
    }
    pos = (char **)malloc(sizeof(char *) * (size_t)argc);
    if (!pos) {
        fprintf(stderr, "trainer: out of memory\n");
        return 1;
    }
    rc = tr_parse(&o, argc - 2, argv + 2, pos, &n_pos);
    if (rc == TR_HELP) tr_usage(stdout, cmd);
    rc = rc == TR_HELP ? 0 : rc != 0 ? 1 : tr_run_command(&o, name, pos, n_pos);
    free(pos);
    return rc;
}

#ifndef TRAINER_NO_MAIN
int main(int argc, char **argv) { return tr_main(argc, argv); }
#endif
