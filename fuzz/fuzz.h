/* fuzz.h - the file formats under fuzzing (fuzz/formats.c), shared by the
 * libFuzzer targets (fuzz/target.c, one binary per format) and the seed
 * writer (fuzz/seeds.c). `make fuzz` builds and runs them (see Makefile). */
#ifndef SM_FUZZ_H
#define SM_FUZZ_H
#include <stddef.h>
#include <stdint.h>

/* Index of the format called name (tokenizer, tokens, llmc, mphf,
 * hot_tier, checkpoint, gpt2_encoder, gpt2_merges, llmc_model, safetensors), or -1. */
int fuzz_format(const char *name);

/* Writes an input as a file of that format and loads it with the library's
 * loader (then uses and frees what loaded). For formats with a checksum
 * the first byte selects how the rest becomes the file: 0 mod 8 = as
 * given, so the checksum check itself is fuzzed; else the trailing 8 bytes
 * are replaced by the checksum of the others, so mutations reach the
 * parser behind the check. Aborts where a loaded object breaks its
 * contract; crashes, leaks and huge allocations are the sanitizers' and
 * libFuzzer's to report. */
void fuzz_load(int format, const uint8_t *data, size_t size);

/* Writes one small valid file of every format (with the library's writers)
 * into dir/FORMAT/, plus regressions; returns 0 on success. */
int fuzz_write_seeds(const char *dir);

#endif
