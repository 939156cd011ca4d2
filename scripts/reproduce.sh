#!/usr/bin/env bash
# scripts/reproduce.sh - `make reproduce`: the studies this library exists
# for, at a scale a 2-core machine runs in about half an hour.
#
#   (a) the Redundancy Bottleneck table: baseline, Engram only, mHC only,
#       PEER only, all three jointly (equal lr), staggered freeze,
#       differential lr, automatic coordination; trained on the State of the
#       Union corpus, evaluated on its held-out addresses and on a
#       cross-domain set (Brown corpus + nlp-corpus sentences);
#   (b) the Engram-Nine table: hash-only vs hot/cold at equal parameter
#       count, plus an N_hot ablation;
#   (c) training step time vs number of PEER experts.
# Results: $OUT/report.md with the tables and PNG plots.
#
# Knobs (environment): PRESET (tiny), STEPS (400), SEEDS ("1 2"), JOBS (2
# runs in parallel, one thread each), OUT (results), EVAL_BATCHES (25:
# batches per intermediate eval; the final eval covers the whole split),
# NHOT (5000: top-N n-grams per order in the Engram-Nine hot tier), BENCH
# (1; 0 skips the step-time benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."

PRESET=${PRESET:-tiny}
STEPS=${STEPS:-400}
SEEDS=${SEEDS:-"1 2"}
JOBS=${JOBS:-2}
OUT=${OUT:-results}
EVAL_BATCHES=${EVAL_BATCHES:-25}
NHOT=${NHOT:-5000}
RUNS=$OUT/runs
TRAINER=./trainer
START=$(date +%s)

bash scripts/fetch_data.sh data
mkdir -p "$RUNS"
bash scripts/tokenize_data.sh

COMMON="--data data/tok/sotu --preset $PRESET --steps $STEPS --eval-batches $EVAL_BATCHES --quiet"
MODULES="--engram 1 --peer 2 --mhc 4"
NINE="--engram 1,3 --engram-shared"   # one table shared by two layers, as Engram-Nine

# One line per run: NAME OPTIONS...
jobs_file=$OUT/jobs.txt
: > "$jobs_file"
for s in $SEEDS; do
    cat >> "$jobs_file" <<EOF
baseline-s$s --seed $s
engram-s$s --seed $s --engram 1
mhc-s$s --seed $s --mhc 4
peer-s$s --seed $s --peer 2
joint-s$s --seed $s $MODULES --strategy joint
freeze-s$s --seed $s $MODULES --strategy freeze
differential-s$s --seed $s $MODULES --strategy differential
auto-s$s --seed $s $MODULES --strategy auto
hash-s$s --seed $s $NINE --hot-labels $NHOT
nine-s$s --seed $s $NINE --nine $NHOT
nine-x0.4-s$s --seed $s $NINE --nine $((NHOT * 2 / 5))
nine-x2-s$s --seed $s $NINE --nine $((NHOT * 2))
EOF
done

run_one() {
    local name=$1
    shift
    if [ -f "$RUNS/$name/summary.json" ]; then
        echo "reproduce: $name already done"
        return 0
    fi
    echo "reproduce: training $name"
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $TRAINER train $COMMON --out "$RUNS/$name" "$@" \
        > "$RUNS/$name.log" 2>&1 || { echo "reproduce: $name failed, see $RUNS/$name.log"; return 1; }
    OMP_NUM_THREADS=1 $TRAINER eval --ckpt "$RUNS/$name/model.ckpt" --data data/tok/xdomain \
        --tag xdomain >> "$RUNS/$name.log" 2>&1
}
export -f run_one
export TRAINER COMMON RUNS

xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _ < "$jobs_file"

names() { grep -E "$1" "$jobs_file" | awk '{ print "'"$RUNS"'/" $1 }'; }
# shellcheck disable=SC2046
$TRAINER report --out "$OUT/bottleneck" --baseline baseline \
    $(names '^(baseline|engram|mhc|peer|joint|freeze|differential|auto)-s')
# shellcheck disable=SC2046
$TRAINER report --out "$OUT/nine" --baseline hash $(names '^(hash|nine)')

if [ "${BENCH:-1}" = 1 ]; then
    OMP_WAIT_POLICY=PASSIVE ./bench/bench_modules peer 5 "$OUT/throughput_experts.csv" |
        tee "$OUT/throughput_experts.txt"
    $TRAINER plot --data "$OUT/throughput_experts.csv" --x experts --log-x \
        --y "ms_per_step=with a PEER layer,baseline_ms=baseline (no PEER)" \
        --xlabel "experts (log scale)" --ylabel "ms per training step" \
        --title "Training step time vs PEER experts" --out "$OUT/throughput_experts.png"
    OMP_WAIT_POLICY=PASSIVE ./bench/bench_modules nine 5 | tee "$OUT/nine_overhead.txt"
else
    echo "(skipped: BENCH=0)" | tee "$OUT/throughput_experts.txt" > "$OUT/nine_overhead.txt"
fi

{
    echo "# sparsemem reproduction"
    echo
    echo "Command: \`make reproduce\` (preset $PRESET, $STEPS steps, seeds: $SEEDS), $(date -u +%Y-%m-%d), $(($(date +%s) - START)) s on $(nproc) cores of $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1 || echo "an unknown CPU")."
    echo
    echo "## (a) Redundancy Bottleneck: modules alone and together"
    echo
    cat "$OUT/bottleneck/report.md"
    echo
    echo "![validation loss](bottleneck/val_loss.png) ![training loss](bottleneck/train_loss.png)"
    echo
    for p in joint auto differential freeze; do
        echo "![$p outputs](bottleneck/outputs_$p.png) ![$p gradients](bottleneck/grads_$p.png) ![$p lr](bottleneck/lr_$p.png)"
        echo
    done
    echo "## (b) Engram-Nine: hash-only vs hot/cold tiers at equal parameter count"
    echo
    cat "$OUT/nine/report.md"
    echo
    echo "![validation loss](nine/val_loss.png) ![training loss](nine/train_loss.png)"
    echo
    echo "![hot-cold delta](nine/hot_cold_delta.png) ![alpha hot](nine/alpha_hot.png) ![alpha cold](nine/alpha_cold.png)"
    echo
    echo "![alpha buckets](nine/alpha_buckets_nine.png) ![alpha per layer](nine/alpha_layers_nine.png)"
    echo
    echo '```'
    cat "$OUT/nine_overhead.txt"
    echo '```'
    echo
    echo "## (c) Training step time vs number of PEER experts"
    echo
    echo '```'
    cat "$OUT/throughput_experts.txt"
    echo '```'
    echo
    [ -f "$OUT/throughput_experts.png" ] && echo "![step time vs experts](throughput_experts.png)"
    echo "![PEER usage](bottleneck/peer_usage.png) ![PEER unevenness](bottleneck/peer_kl.png)"
} > "$OUT/report.md"
echo "reproduce: wrote $OUT/report.md ($(($(date +%s) - START)) s)"
