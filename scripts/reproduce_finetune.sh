#!/usr/bin/env bash
# scripts/reproduce_finetune.sh - `make reproduce-finetune INIT=gpt2_124M.bin`:
# the Redundancy Bottleneck study in its own setting, modules added to a
# pretrained language model and fine-tuned. Every run starts from the GPT-2
# in INIT (an llm.c model file) with its modules closed, so all of them start
# at the pretrained model's loss: baseline (GPT-2 alone, fine-tuned), Engram
# only, PEER only (added to the MLP), mHC only, all three jointly, staggered
# freeze, differential lr and automatic coordination, on the State of the
# Union corpus tokenized with the GPT-2 tokenizer.
# Results: $OUT/report.md (the table and plots of `trainer report`).
#
# Knobs (environment): INIT (required), STEPS (300), SEQ (256), BATCH (4),
# LR (1e-4: the backbone's fine-tuning peak), SEEDS ("1"), JOBS (2 runs in
# parallel, one thread each), EVAL_BATCHES (25), ENGRAM_LAYERS (1),
# PEER_LAYERS (6), MHC (4 streams), OUT (results/finetune), DATA (a folder
# of `trainer tokenize --tokenizer gpt2:DIR`; default: SOTU, fetched and
# tokenized here), DEVICE (cpu; cuda trains each run on the GPU with
# ./trainer_cuda, `make trainer_cuda`, one run at a time unless JOBS says
# otherwise; Engram inside mHC then takes the branch form, the GPU's).
# The tests run it on a random tiny llm.c file for a few steps
# (test_reproduce_finetune_tiny).
set -euo pipefail
cd "$(dirname "$0")/.."

INIT=${INIT:-}
if [ -z "$INIT" ] || [ ! -f "$INIT" ]; then
    cat >&2 <<'EOF'
reproduce-finetune: give the pretrained weights: make reproduce-finetune INIT=path/to/gpt2_124M.bin
  The file is an llm.c model file. Get GPT-2 124M from llm.c (github.com/karpathy/llm.c):
    ./dev/download_starter_pack.sh     (writes gpt2_124M.bin, float32, and gpt2_124M_bf16.bin)
  or run its train_gpt2.py, which converts Hugging Face's weights and writes gpt2_124M.bin.
  Layout: int32 header[256] = 20240326, version (3 float32 | 5 bfloat16), maxT, V, L, NH,
  C, Vp (50257 padded to 50304), zeros; then wte [Vp,C], wpe [maxT,C], per-layer tensors
  (ln1w, ln1b, qkvw, qkvb, attprojw, attprojb, ln2w, ln2b, fcw, fcb, fcprojw, fcprojb; each
  for all L layers in turn), lnfw, lnfb. gpt2_124M.bin is 497,904,640 bytes (124,475,904 floats).
EOF
    exit 1
fi

STEPS=${STEPS:-300}
SEQ=${SEQ:-256}
BATCH=${BATCH:-4}
LR=${LR:-1e-4}
SEEDS=${SEEDS:-1}
DEVICE=${DEVICE:-cpu}
if [ "$DEVICE" = cuda ]; then
    JOBS=${JOBS:-1}
    TRAINER=${TRAINER:-./trainer_cuda}
    [ -x "$TRAINER" ] || { echo "reproduce-finetune: DEVICE=cuda needs $TRAINER: make trainer_cuda" >&2; exit 1; }
elif [ "$DEVICE" != cpu ]; then
    echo "reproduce-finetune: DEVICE=$DEVICE: expected cpu or cuda" >&2
    exit 1
fi
JOBS=${JOBS:-2}
EVAL_BATCHES=${EVAL_BATCHES:-25}
ENGRAM_LAYERS=${ENGRAM_LAYERS:-1}
PEER_LAYERS=${PEER_LAYERS:-6}
MHC=${MHC:-4}
OUT=${OUT:-results/finetune}
DATA=${DATA:-}
RUNS=$OUT/runs
TRAINER=${TRAINER:-./trainer}
START=$(date +%s)

if [ -z "$DATA" ]; then
    DATA=data/tok/sotu-gpt2
    if [ ! -f "$DATA/val.tok" ]; then
        bash scripts/fetch_data.sh data
        bash scripts/fetch_data.sh data gpt2
        $TRAINER tokenize --data data/sotu --out "$DATA" --tokenizer gpt2:data/gpt2
    fi
fi
mkdir -p "$RUNS"

COMMON="--data $DATA --init $INIT --seq $SEQ --batch $BATCH --steps $STEPS --lr $LR --eval-batches $EVAL_BATCHES --device $DEVICE --quiet"
ENGRAM="--engram $ENGRAM_LAYERS"
PEER="--peer $PEER_LAYERS --peer-add"
MODULES="$ENGRAM $PEER --mhc $MHC"

jobs_file=$OUT/jobs.txt
: > "$jobs_file"
for s in $SEEDS; do
    cat >> "$jobs_file" <<EOF
baseline-s$s --seed $s
engram-s$s --seed $s $ENGRAM
peer-s$s --seed $s $PEER
mhc-s$s --seed $s --mhc $MHC
joint-s$s --seed $s $MODULES --strategy joint
freeze-s$s --seed $s $MODULES --strategy freeze
differential-s$s --seed $s $MODULES --strategy differential
auto-s$s --seed $s $MODULES --strategy auto
EOF
done

run_one() {
    local name=$1
    shift
    if [ -f "$RUNS/$name/summary.json" ]; then
        echo "reproduce-finetune: $name already done"
        return 0
    fi
    echo "reproduce-finetune: training $name"
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $TRAINER train $COMMON --out "$RUNS/$name" "$@" \
        > "$RUNS/$name.log" 2>&1 || { echo "reproduce-finetune: $name failed, see $RUNS/$name.log"; return 1; }
}
export -f run_one
export TRAINER COMMON RUNS

xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _ < "$jobs_file"

# shellcheck disable=SC2046
$TRAINER report --out "$OUT/report" --baseline baseline $(awk '{ print "'"$RUNS"'/" $1 }' "$jobs_file")

{
    echo "# sparsemem: modules added to a pretrained GPT-2, fine-tuned"
    echo
    echo "Command: \`make reproduce-finetune INIT=$INIT DEVICE=$DEVICE\` ($STEPS steps, B=$BATCH, T=$SEQ, lr $LR, seeds: $SEEDS), $(date -u +%Y-%m-%d), $(($(date +%s) - START)) s on $(nproc) cores$([ "$DEVICE" = cuda ] && echo ' and the GPU')."
    echo "Every run starts at the pretrained model's loss (modules closed: sm_model_close_modules)."
    echo
    cat "$OUT/report/report.md"
    echo
    echo "![validation loss](report/val_loss.png) ![training loss](report/train_loss.png)"
} > "$OUT/report.md"
echo "reproduce-finetune: wrote $OUT/report.md ($(($(date +%s) - START)) s)"
