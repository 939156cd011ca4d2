#!/usr/bin/env bash
# bench/flags.sh - how fast the header runs with the compiler flags a project
# that vendors it may build it with, not only the Makefile's -O3.
#
#   bash bench/flags.sh [ROUNDS]     (3 rounds by default; ~30 s per build and round)
#
# Builds bench/bench_backbone.c once per compiler and flag set into a
# temporary folder, then runs the builds one after the other, ROUNDS times
# over, and prints per build the medians of:
#   - sm_sgemm at 768x3072x768 (A B^T, 2 threads): GFLOP/s, and its ratio to
#     OpenBLAS's cblas_sgemm in the same process (where OpenBLAS is installed);
#   - the backbone steps of bench_backbone's default mode (small, GPT-2 124M);
#   - the tiny preset's step with Engram-Nine, PEER and mHC (`profile tiny`);
#   - that step's time over the first build's (the Makefile's -O3).
# Builds, all with -march=native but the last: cc -O3, cc -O2, cc -O2
# -fno-tree-vectorize (what GCC before 12 does at -O2), clang -O2 where it is
# installed, and cc -O2 with no -march, for x86-64's baseline (SSE2), where
# sm_sgemm's kernels are chosen from the target macros: the portable one.
# Needs what `make bench` needs.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "flags.sh: ROUNDS must be a positive whole number, got '$rounds'" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

blas=()
if printf '#include <cblas.h>\nint main(void){return 0;}\n' | cc -x c - -lopenblas -o "$work/probe" 2>/dev/null; then
  blas=(-DSM_BENCH_CBLAS -lopenblas)
fi
omp=()
printf 'int main(void){return 0;}\n' | cc -fopenmp -x c - -o "$work/probe" 2>/dev/null && omp=(-fopenmp)

names=() cmds=()
add_build() { names+=("$1"); cmds+=("$2"); }
add_build "cc -O3 (Makefile)" "cc -O3 -march=native"
add_build "cc -O2" "cc -O2 -march=native"
add_build "cc -O2 -fno-tree-vectorize" "cc -O2 -fno-tree-vectorize -march=native"
if command -v clang >/dev/null; then add_build "clang -O2" "clang -O2 -march=native"; fi
add_build "cc -O2, no -march" "cc -O2"

for i in "${!names[@]}"; do
  read -r -a cmd <<< "${cmds[$i]}"
  "${cmd[@]}" -std=c99 -D_DEFAULT_SOURCE "${omp[@]}" -I. -o "$work/bench$i" \
    bench/bench_backbone.c -lm "${blas[@]}"
done

export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} OPENBLAS_THREAD_TIMEOUT=${OPENBLAS_THREAD_TIMEOUT:-4}
echo "$(cc --version | head -n 1)$(command -v clang >/dev/null && echo "; $(clang --version | head -n 1)")"
echo "$rounds rounds, builds run one after the other in each; OMP_WAIT_POLICY=$OMP_WAIT_POLICY"

# One line per build and round: build gflops ratio small_s gpt2_s path tiny_ms
for ((r = 0; r < rounds; r++)); do
  for i in "${!names[@]}"; do
    gemm=$("$work/bench$i" 768 3072 768 2>&1)
    ((r + i)) || grep -E '^(cpu|OpenBLAS):' <<< "$gemm" || true
    tiny=$("$work/bench$i" profile tiny 2>&1)
    echo "$(awk -v b="$i" '
      / NT +768 x +3072 x +768 / { gflops = NF >= 10 ? $(NF - 2) : $NF; ratio = NF >= 10 ? $NF : "-" }
      /^step small:/ { for (f = 1; f <= NF; f++) if ($f == "s/step,") small = $(f - 1) }
      /^step gpt2-124M:/ { for (f = 1; f <= NF; f++) if ($f == "s/step,") gpt2 = $(f - 1) }
      /^sm_sgemm path:/ { path = $3 }
      END { print b, gflops, ratio, small, gpt2, path }' <<< "$gemm") \
$(awk '$1 == "step" { print $2 }' <<< "$tiny")" >> "$work/rounds"
  done
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
printf '\n%-28s %-9s %9s %7s %10s %10s %12s %8s\n' build "sm_sgemm" "GFLOP/s" "/ BLAS" "small s" \
  "gpt2 s" "tiny+mod ms" "/ -O3"
# The median of column $2 of build $1's rounds ("-": none measured).
col() { awk -v b="$1" -v c="$2" '$1 == b && $c != "-" { print $c }' "$work/rounds" | median; }
base=$(col 0 7)
for i in "${!names[@]}"; do
  ratio=$(col "$i" 3) tiny_ms=$(col "$i" 7)
  path=$(awk -v b="$i" '$1 == b { print $6; exit }' "$work/rounds")
  printf '%-28s %-9s %9s %7s %10s %10s %12s %8.2f\n' "${names[$i]}" "$path" "$(col "$i" 2)" "${ratio:--}" \
    "$(col "$i" 4)" "$(col "$i" 5)" "$tiny_ms" "$(awk -v a="$tiny_ms" -v b="$base" 'BEGIN { print a / b }')"
done
