#!/usr/bin/env bash
# bench/vs_llmc.sh - one GPT-2 124M training step (B=4, T=64, forward + backward
# + AdamW), ours against llm.c's CPU trainer (train_gpt2.c), same machine, same
# thread count, runs interleaved.
#
#   bash bench/vs_llmc.sh LLMC_DIR [ROUNDS] [STEPS]
#
# LLMC_DIR: a checkout of https://github.com/karpathy/llm.c (nothing is
# downloaded; its train_gpt2 is built there with its own Makefile). The
# comparison needs no real weights or text: llm.c reads a checkpoint
# (int32 header[256]: 20240326, version 3, maxT, V, L, NH, C, Vp; then the
# float32 parameters) and token shards (int32 header[256]: 20240520, version 1,
# n_tokens; then uint16 tokens), which are written here with random values into
# a scratch folder. Each round runs llm.c for STEPS timed steps (after its step
# 0, which allocates) and then ours for as many; the medians over all rounds
# and their ratio are printed. OMP_NUM_THREADS (default 2) applies to both.
# Where `make` builds the trainer on OpenBLAS (build/gemm-choice: its
# `choose` measurement found cblas_sgemm faster on this machine), each round
# also times the step on that GEMM, and its ratio is printed as well.
set -euo pipefail
LLMC=${1:?usage: bash bench/vs_llmc.sh LLMC_DIR [ROUNDS] [STEPS]}
ROUNDS=${2:-3}
STEPS=${3:-4}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
[ -f "$LLMC/train_gpt2.c" ] || { echo "vs_llmc: $LLMC has no train_gpt2.c (give an llm.c checkout)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "vs_llmc: python3 is needed to write the random checkpoint" >&2; exit 1; }

echo "building llm.c's train_gpt2 with its Makefile ($LLMC)"
make -s -C "$LLMC" train_gpt2 >/dev/null
echo "building bench/bench_backbone, and it on the trainer's GEMM (build/bench_backbone_trainer)"
make -s -C "$ROOT" bench/bench_backbone build/bench_backbone_trainer >/dev/null
TRAINER_ON_BLAS=$(grep -q SM_USE_CBLAS "$ROOT/build/gemm-choice" 2>/dev/null && echo 1 || echo 0)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/dev/data/tinyshakespeare"
python3 - "$WORK" <<'EOF'
import array, random, struct, sys
work = sys.argv[1]
maxT, V, L, NH, C, Vp = 1024, 50257, 12, 12, 768, 50304
# train_gpt2.c's parameter tensors, in its order (fill_in_parameter_sizes)
sizes = [Vp * C, maxT * C, L * C, L * C, L * 3 * C * C, L * 3 * C, L * C * C, L * C,
         L * C, L * C, L * 4 * C * C, L * 4 * C, L * C * 4 * C, L * C, C, C]
n = sum(sizes)
rng = random.Random(1)
block = array.array('f', (rng.gauss(0.0, 0.02) for _ in range(1 << 20)))
with open(work + '/gpt2_124M.bin', 'wb') as f:
    f.write(struct.pack('<256i', *([20240326, 3, maxT, V, L, NH, C, Vp] + [0] * 248)))
    while n > 0:
        k = min(n, len(block))
        block[:k].tofile(f)
        n -= k
for name, ntok in (('train', 1 << 16), ('val', 1 << 14)):
    toks = array.array('H', (rng.randrange(V) for _ in range(ntok)))
    path = '%s/dev/data/tinyshakespeare/tiny_shakespeare_%s.bin' % (work, name)
    with open(path, 'wb') as f:
        f.write(struct.pack('<256i', *([20240520, 1, ntok] + [0] * 253)))
        toks.tofile(f)
EOF

# llm.c prints "step S: train loss L (took X ms)"; steps 1..STEPS are kept
# (step 0 allocates). It runs in the background and is stopped once it has
# printed step STEPS: a closed pipe would not stop it where SIGPIPE is
# ignored (an ignored signal stays ignored across exec).
llmc_round() {
    (cd "$WORK" && exec stdbuf -oL "$LLMC/train_gpt2" > "$WORK/llmc.log" 2>&1) &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null && ! grep -q "^step $STEPS: train loss" "$WORK/llmc.log"; do sleep 0.5; done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    awk -v n="$STEPS" '/^step [0-9]+: train loss/ { s = $2 + 0; if (s >= 1 && s <= n) print $(NF-1) / 1000 }' "$WORK/llmc.log"
}
ours_round() { # $1: the binary, $2: its output's copy
    "$1" gpt2-steps "$STEPS" | tee "$2" | awk '/^gpt2-step / { print $2 }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

: > "$WORK/llmc.txt"
: > "$WORK/ours.txt"
: > "$WORK/blas.txt"
for r in $(seq 1 "$ROUNDS"); do
    llmc_round >> "$WORK/llmc.txt"
    ours_round "$ROOT/bench/bench_backbone" "$WORK/ours.log" >> "$WORK/ours.txt"
    line="round $r/$ROUNDS: llm.c $(tail -n "$STEPS" "$WORK/llmc.txt" | median) s/step, ours $(tail -n "$STEPS" "$WORK/ours.txt" | median) s/step"
    if [ "$TRAINER_ON_BLAS" = 1 ]; then
        ours_round "$ROOT/build/bench_backbone_trainer" "$WORK/blas.log" >> "$WORK/blas.txt"
        line="$line, ours on OpenBLAS $(tail -n "$STEPS" "$WORK/blas.txt" | median) s/step"
    fi
    echo "$line"
done
[ -s "$WORK/llmc.txt" ] && [ -s "$WORK/ours.txt" ] || { echo "vs_llmc: a run printed no step times" >&2; exit 1; }
L=$(median < "$WORK/llmc.txt")
O=$(median < "$WORK/ours.txt")
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $OMP_NUM_THREADS threads"
echo "llm.c train_gpt2 (commit $(git -C "$LLMC" rev-parse --short HEAD 2>/dev/null || echo unknown)): $L s/step (median of $(wc -l < "$WORK/llmc.txt") steps)"
echo "sparsemem (sm_sgemm path $(awk '/^sm_sgemm path:/ { print $3 }' "$WORK/ours.log")): $O s/step (median of $(wc -l < "$WORK/ours.txt") steps)"
awk -v l="$L" -v o="$O" 'BEGIN { printf "speed-up llm.c / ours = %.2fx (target >= 4)\n", l / o }'
if [ -s "$WORK/blas.txt" ]; then
    B=$(median < "$WORK/blas.txt")
    echo "sparsemem as \`make\` builds the trainer here (cblas_sgemm: OpenBLAS won its \`choose\`): $B s/step (median of $(wc -l < "$WORK/blas.txt") steps)"
    awk -v l="$L" -v o="$B" 'BEGIN { printf "speed-up llm.c / ours on OpenBLAS = %.2fx\n", l / o }'
fi
