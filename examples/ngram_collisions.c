/* ngram_collisions.c - how often do hashed n-grams share a table row?
 *
 *   cc -O2 -I. examples/ngram_collisions.c -o ngram_collisions -lm
 *   ./ngram_collisions TEXT_FILE [ROWS_PER_HEAD=10007] [HEADS=4]
 *
 * Splits the text into words (runs of letters and digits, lowercased), maps
 * each word to an id with a 24-bit FNV-1a hash (the pad is above them), hashes the 2-
 * and 3-grams the way an Engram layer does (sm_ngram_hash_compute) and
 * prints, per head: distinct n-grams D, the head's prime size p, rows used,
 * the fraction of distinct n-grams that share their row with another, and
 * what uniform hashing (balls into bins) predicts:
 *   rows used  p (1 - (1 - 1/p)^D)      sharing  1 - (1 - 1/p)^(D-1)      */
#define SPARSEMEM_IMPLEMENTATION
#include "sparsemem.h"

#include <ctype.h>
#include <stdlib.h>

static int is_word_char(unsigned char c) { return isalnum(c) || c >= 0x80; }

/* Word ids in [0, 2^24): word-level collisions are rare below ~100K words. */
static size_t words_to_ids(uint32_t *ids, const unsigned char *text, size_t size) {
    size_t i = 0, n = 0;
    while (i < size) {
        uint32_t h = 2166136261u;
        size_t len = 0;
        for (; i < size && is_word_char(text[i]); i++, len++)
            h = (h ^ (uint32_t)tolower(text[i])) * 16777619u;
        if (len) ids[n++] = h & 0xffffffu;
        else i++;
    }
    return n;
}

static void print_stats(const sm_ngram_head_stats *st, int n) {
    int i;
    printf("order head   prime   distinct  rows used (expected)   sharing (expected)   chi2/dof\n");
    for (i = 0; i < n; i++) {
        const sm_ngram_head_stats *s = &st[i];
        double D = (double)s->distinct;
        printf("%5d %4d %7u %10zu %10zu (%10.1f)   %6.4f (%6.4f)   %8.3f\n", s->order, s->head,
               (unsigned)s->rows, s->distinct, s->rows_used, s->expected_rows_used,
               D > 0 ? s->shared / D : 0.0, D > 0 ? s->expected_shared / D : 0.0,
               s->chi2 / (s->rows - 1.0));
    }
}

int main(int argc, char **argv) {
    unsigned char *text = NULL;
    size_t size = 0, n = 0;
    uint32_t *ids = NULL;
    sm_ngram_hash h;
    sm_ngram_hash_config c = sm_ngram_hash_default_config();
    sm_ngram_head_stats *st = NULL;
    sm_error err = {SM_OK, ""};
    sm_status s;
    if (argc < 2) {
        fprintf(stderr, "usage: %s TEXT_FILE [ROWS_PER_HEAD=10007] [HEADS=4]\n", argv[0]);
        return 2;
    }
    c.table_rows = argc > 2 ? (uint32_t)strtoul(argv[2], NULL, 10) : 10007u;
    c.n_heads = argc > 3 ? atoi(argv[3]) : 4;
    memset(&h, 0, sizeof h);
    s = sm_ngram_hash_init(&h, &c, &err);
    if (s == SM_OK) s = sm_read_file(argv[1], &text, &size, &err);
    if (s == SM_OK) {
        ids = (uint32_t *)sm_alloc(size / 2 + 1, sizeof(uint32_t), "word ids", &err);
        st = (sm_ngram_head_stats *)sm_alloc((size_t)h.n_slots, sizeof *st, "stats", &err);
        s = ids && st ? SM_OK : SM_ERR_OOM;
    }
    if (s == SM_OK) {
        n = words_to_ids(ids, text, size);
        if (n == 0 || n > 0x7fffffff)
            s = sm_fail(&err, SM_ERR_INVALID_ARG, "%s: %zu words", argv[1], n);
    }
    if (s == SM_OK) s = sm_ngram_collision_stats(st, &h, 0, ids, NULL, (int)n, &err);
    if (s == SM_OK) {
        printf("%s: %zu words; orders 2,3; %d heads; >= %u rows per head\n", argv[1], n,
               c.n_heads, (unsigned)c.table_rows);
        print_stats(st, h.n_slots);
    } else {
        fprintf(stderr, "error: %s\n", err.msg);
    }
    sm_ngram_hash_free(&h);
    sm_free(ids);
    sm_free(st);
    sm_free(text);
    return s == SM_OK ? 0 : 1;
}
