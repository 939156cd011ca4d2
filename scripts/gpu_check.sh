#!/usr/bin/env bash
# scripts/gpu_check.sh DIR [--dry-run]: everything the CUDA backend must show
# on a GPU (issue #14), in at most 6 minutes on one H200. Every log goes into
# DIR; each part runs under its own timeout and a failure does not stop the
# others; DIR/summary.txt ends with one status line per part and the wall
# time; the exit status is 1 when any part failed or timed out.
#
#   part 0  build        the gpu-bin/ binaries made beforehand (`make gpu-build`
#                        CUDA_ARCH=sm_90, no GPU needed); rebuilt here only
#                        when one is missing or cannot start
#   part 1  device       nvidia-smi, the build's toolchain, the device as the
#                        code sees it
#   part 2  tests_cuda   every GPU test against the CPU, full output
#   part 3  train        the first STEPS steps of each configuration `make
#                        reproduce` trains (its 400-step schedule, tiny preset,
#                        seed 1): GPU with fp32 GEMMs, GPU with TF32 (the
#                        training default) and CPU, loss per step; the largest
#                        loss difference per configuration against a tolerance
#   part 4  checkpoints  GPU checkpoints evaluated by the CPU trainer; CPU
#                        checkpoints resumed on the GPU for RESUME_STEPS steps,
#                        compared with the CPU resuming them
#   part 5  bench        bench_cuda's sections (12 layers x 768 x T=1024, B=8):
#                        tokens/s, MFU, module overheads, PEER-1M/16K, Nine/Hash
#   part 6  dp           data parallelism under MPI (issue #18): tests_nccl with
#                        1 rank (NCCL) and 2 ranks sharing the GPU (host
#                        copies); the joint configuration trained by
#                        trainer_cuda_mpi on 1 and on 2 ranks, losses compared.
#                        Needs mpirun: the machine's, or Open MPI's Debian
#                        packages carried in gpu-mpi/ (`make gpu-mpi`, 6 MB);
#                        skipped without
#
# --dry-run (or GPU_CHECK_DRY_RUN=1) needs no GPU: every CPU run is real, and
# where a GPU run would be a second CPU run with one thread stands in (the
# CPU trainer gives the same bits for any thread count, so those comparisons
# must show 0), so the runs, files and comparisons are exercised; what only a
# GPU can do is reported as SKIP.
#
# How to run it on the GPU machine of this workplace (the `run` tool). First,
# here: `make data` (data/tok, 4.7 MB), `make gpu-build CUDA_ARCH=sm_90`
# (gpu-bin/, 15 MB; a few minutes on 2 cores) and `make gpu-mpi` (6 MB).
# Then run with
#   carry:     ["gpu-bin", "data/tok", "gpu-mpi"]
#   timeout_s: 560   (the script aims at 360 s for parts 0-5, and part 6
#                    has 90 s more; bash scripts/gpu_check.sh --part 6 DIR
#                    runs it alone)
#   command:   bash scripts/gpu_check.sh /tmp/gc; rc=$?;
#              cp /tmp/gc/summary.txt $OUT/;
#              tar -C /tmp -czf $OUT/gpu-check.tgz --exclude='*.ckpt' gc;
#              exit $rc
# (only up to 8 files come back from $OUT, no deeper than two folders: hence
# the tarball; the checkpoints stay behind, the eval and resume logs say what
# they did). results/gpu/README.md says how to record the run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

BIN=gpu-bin
DATA=data/tok/sotu
STEPS=30          # compared training steps per configuration
RESUME_STEPS=10   # steps after a checkpoint crossing
EVAL_BATCHES=20   # validation batches for the checkpoint evals (20 x 8 x 128 tokens)
BENCH_ROUNDS=5    # timed steps per bench configuration (after 2 warm-up steps)
# bench_cuda all's sections, one process each, cheapest first: each model is
# initialised on the host with a serial RNG (26 ns per parameter here),
# and the PEER sweep alone draws 2.6G parameters (PEER-1M 1.7G), so a timeout
# there costs only the PEER figures.
BENCH_SECTIONS="base mhc engram nine peer"
BUDGET=360        # seconds for the whole script (issue #14)
# The configurations of scripts/reproduce.sh (name|options; seed 1 of its
# two), trained with its schedule: --steps 400 sets warmup and cosine decay.
CONFIGS="baseline|
engram|--engram 1
mhc|--mhc 4
peer|--peer 2
joint|--engram 1 --peer 2 --mhc 4 --strategy joint
nine|--engram 1,3 --engram-shared --nine 5000"
COMMON=(--data "$DATA" --preset tiny --steps 400 --seed 1) # not --quiet: the GPU runs say their precision

# Loss tolerances (nats/token; the losses are about 7 to 9), first compared
# step | largest over the compared steps. The first step is one forward pass
# of the same weights on the same batch, so it only sees rounding; later
# steps also carry the updates' differences, which training amplifies. The
# numbers come from emulating each regime on the CPU (see results/gpu/README.md):
# GEMMs with another summation order for fp32, GEMM inputs rounded to TF32's
# 10-bit mantissa for TF32. Each tolerance is 10 to 15x the largest
# difference the emulation gave over the six configurations (fp32: below the
# printed 1e-6 at step 1, 2.5e-4 over 40 steps; TF32: 2.6e-4 and 6.4e-4),
# except the fp32 first step, held to 1e-4 (1e-5 relative, the tests' bound
# for reordered sums).
TOL_FP32_FIRST=1e-4
TOL_FP32_MAX=3e-3
TOL_TF32_FIRST=3e-3
TOL_TF32_MAX=1e-2

export OMP_WAIT_POLICY=PASSIVE # busy-waiting threads slow small models (README)

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}

say() { printf '%s\n' "$*"; }
note() { say "$*" > "$DIR/.note"; say "=> $*"; } # the part's line in summary.txt

# Exit codes of a part.
PASS=0 FAIL=1 SKIP=77

# ---------------------------------------------------------------- helpers

# Line-buffered stdout for a C program, so a part stopped by its timeout
# still leaves everything printed so far in the log.
lb() {
    if command -v stdbuf >/dev/null 2>&1; then stdbuf -oL "$@"; else "$@"; fi
}

# config_opts NAME: the options of one configuration (word-split by callers).
config_opts() { printf '%s\n' "$CONFIGS" | awk -F'|' -v n="$1" '$1 == n { print $2 }'; }
config_names() { printf '%s\n' "$CONFIGS" | cut -d'|' -f1; }

# train KIND NAME STOP [FOLDER --resume]: configuration NAME up to step STOP
# into $RUNS/FOLDER (default KIND-NAME), or continued there from its
# checkpoint. KIND: cpu (all cores), gpu (fp32 GEMMs), tf32 (the GPU's
# default); in a dry run gpu is the CPU on one thread.
train() {
    local kind=$1 name=$2 stop=$3 folder=${4:-$1-$2} resume=${5:-} bin dev=()
    case $kind in
    cpu) bin=$BIN/trainer ;;
    gpu) bin=$BIN/trainer_cuda dev=(--device cuda --precision fp32) ;;
    tf32) bin=$BIN/trainer_cuda dev=(--device cuda) ;;
    esac
    if [ "$kind" = gpu ] && [ "$DRY_RUN" = 1 ]; then bin=$BIN/trainer dev=(--threads 1); fi
    # shellcheck disable=SC2046 # the configuration's options are words
    lb "$bin" train "${COMMON[@]}" $(config_opts "$name") "${dev[@]}" --stop-after "$stop" \
        --out "$RUNS/$folder" ${resume:+"$resume"}
}

# compare_losses A B FROM TO TOL_FIRST TOL_MAX LABEL: the steps.csv losses of
# two runs over steps FROM..TO; prints one line, returns 1 when a step is
# missing or not a number, or a tolerance is exceeded.
compare_losses() {
    local f
    for f in "$1" "$2"; do
        [ -f "$f" ] || { printf '%-14s FAIL: no %s (the run failed)\n' "$7" "$f"; return 1; }
    done
    awk -F, -v from="$3" -v to="$4" -v tol1="$5" -v tolm="$6" -v label="$7" '
        FNR == 1 { next }
        $2 !~ /^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$/ { next }  # nan, inf: counted as missing
        NR == FNR { a[$1 + 0] = $2; next }
        { b[$1 + 0] = $2 }
        END {
            worst = 0; at = from
            for (s = from; s <= to; s++) {
                if (!(s in a) || !(s in b)) {
                    printf "%-14s FAIL: step %d missing or not finite in one of the runs\n", label, s
                    exit 1
                }
                d = a[s] - b[s]; if (d < 0) d = -d
                if (s == from) first = d
                if (d > worst) { worst = d; at = s }
            }
            ok = first <= tol1 && worst <= tolm
            printf "%-14s steps %d-%d  first %.2e (tol %g)  max %.2e at step %d (tol %g)  %s\n",
                label, from, to, first, tol1, worst, at, tolm, ok ? "ok" : "FAIL"
            exit ok ? 0 : 1
        }' "$1" "$2"
}

# side_by_side CSV...: the loss column of each steps.csv that exists, one
# line per step.
side_by_side() {
    local f files=()
    for f in "$@"; do [ -f "$f" ] && files+=("$f"); done
    [ ${#files[@]} -gt 0 ] || return 0
    awk -F, 'FNR == 1 { k++; next }
        { loss[$1, k] = $2; if ($1 + 0 > n) n = $1 + 0 }
        END { for (s = 1; s <= n; s++) {
                  line = sprintf("%3d:", s)
                  for (i = 1; i <= k; i++) line = line " " ((s, i) in loss ? loss[s, i] : "-")
                  print line } }' "${files[@]}"
}

# val_loss LOG: the number after "val loss" in a `trainer eval` log.
val_loss() { awk '/^val loss/ { print $3 }' "$1"; }

# The commit of the tree: from git, or (a copy without .git) the binaries' build.
source_commit() {
    if git rev-parse --short HEAD >/dev/null 2>&1; then
        say "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || say ' (modified)')"
    else
        say "binaries $(sed -n 1p "$BIN/build-info.txt" 2>/dev/null)"
    fi
}

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }

# ---------------------------------------------------------------- part 0

# The prebuilt binaries, rebuilt only when one is missing or cannot start
# here (another C library, a missing libcublas, a CPU without AVX-512).
binaries_start() {
    local ok=0 b
    for b in trainer trainer_cuda tests_cuda bench_cuda; do
        [ -x "$BIN/$b" ] || { say "missing: $BIN/$b"; ok=1; }
    done
    [ $ok = 0 ] || return 1
    "$BIN/trainer" --help >/dev/null || { say "$BIN/trainer does not start"; ok=1; }
    "$BIN/trainer_cuda" --help >/dev/null || { say "$BIN/trainer_cuda does not start"; ok=1; }
    # with no visible device these only report that and exit
    CUDA_VISIBLE_DEVICES='' "$BIN/tests_cuda" >/dev/null || { say "$BIN/tests_cuda does not start"; ok=1; }
    CUDA_VISIBLE_DEVICES='' "$BIN/bench_cuda" >/dev/null || { say "$BIN/bench_cuda does not start"; ok=1; }
    return $ok
}

part_0() {
    if binaries_start; then
        note "prebuilt $BIN/ binaries start here ($(head -c 80 "$BIN/build-info.txt" 2>/dev/null | head -1))"
        return $PASS
    fi
    say "rebuilding: make -B gpu-build for this machine's processor"
    # Needs nvcc, and for the trainers the stb headers (Debian libstb-dev).
    if make -B -j4 gpu-build GPU_HOST_ARCH=-march=native && binaries_start; then
        note "rebuilt $BIN/ here (the prebuilt binaries were missing or did not start)"
        return $PASS
    fi
    note "no working $BIN/ binaries: build them with make gpu-build"
    return $FAIL
}

# ---------------------------------------------------------------- part 1

part_1() {
    say "== host"
    uname -a
    say "$(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) memory"
    grep -m1 'model name' /proc/cpuinfo
    say "== the binaries' build"
    cat "$BIN/build-info.txt" 2>/dev/null || say "(no $BIN/build-info.txt)"
    say "== CUDA libraries the binaries load"
    ldd "$BIN/tests_cuda" | grep -E 'cublas|cudart|not found'
    command -v nvcc >/dev/null && nvcc --version | tail -2
    if ! have_gpu; then
        say "== no GPU: nvidia-smi is missing or lists no device"
        note "no GPU"
        [ "$DRY_RUN" = 1 ] && return $SKIP
        return $FAIL
    fi
    say "== nvidia-smi"
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,power.limit \
        --format=csv
    say "== the device as the code sees it (smc_init)"
    # A filter that matches no test: tests_cuda starts the device, prints it and stops.
    lb "$BIN/tests_cuda" no-test-has-this-name | tee "$DIR/.device"
    local dev
    dev=$(sed -n 's/^device: //p' "$DIR/.device")
    [ -n "$dev" ] || { note "the code sees no device (driver too old for the build's CUDA?)"; return $FAIL; }
    note "$dev; driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
    return $PASS
}

# ---------------------------------------------------------------- part 2

part_2() {
    local expected result
    # With no visible device tests_cuda only counts its tests.
    expected=$(CUDA_VISIBLE_DEVICES='' "$BIN/tests_cuda" | sed -n 's/^no CUDA device: \([0-9]*\) .*/\1/p')
    say "tests_cuda has ${expected:-?} tests"
    if [ "$DRY_RUN" = 1 ]; then
        note "skipped: no GPU (${expected:-?} tests present)"
        return $SKIP
    fi
    lb "$BIN/tests_cuda" | tee "$DIR/.tests_cuda"
    result=$(tail -1 "$DIR/.tests_cuda")
    note "$result (of ${expected:-?})"
    [ -n "$expected" ] && [ "$result" = "$expected passed, 0 failed" ] && return $PASS
    return $FAIL
}

# ---------------------------------------------------------------- part 3

part_3() {
    local name status=$PASS
    mkdir -p "$RUNS"
    for name in $(config_names); do
        say "== $name: $(config_opts "$name")"
        train cpu "$name" $STEPS || status=$FAIL
        train gpu "$name" $STEPS || status=$FAIL
        [ "$DRY_RUN" = 1 ] || train tf32 "$name" $STEPS || status=$FAIL
    done
    say
    say "== loss per step: $STEPS steps of each configuration, GPU against CPU"
    say "(|loss_gpu - loss_cpu| in nats/token; the first step sees the forward pass only)"
    [ "$DRY_RUN" = 1 ] && say "(dry run: 'gpu fp32' is the CPU on one thread, which must match exactly)"
    for name in $(config_names); do
        compare_losses "$RUNS/cpu-$name/steps.csv" "$RUNS/gpu-$name/steps.csv" 1 $STEPS \
            $TOL_FP32_FIRST $TOL_FP32_MAX "$name fp32" || status=$FAIL
        [ "$DRY_RUN" = 1 ] && continue
        compare_losses "$RUNS/cpu-$name/steps.csv" "$RUNS/tf32-$name/steps.csv" 1 $STEPS \
            $TOL_TF32_FIRST $TOL_TF32_MAX "$name tf32" || status=$FAIL
    done | tee "$DIR/part3_compare.txt"
    grep -q FAIL "$DIR/part3_compare.txt" && status=$FAIL
    say
    say "== losses per step, side by side (step: cpu, gpu fp32, gpu tf32)"
    for name in $(config_names); do
        say "-- $name"
        side_by_side "$RUNS/cpu-$name/steps.csv" "$RUNS/gpu-$name/steps.csv" "$RUNS/tf32-$name/steps.csv"
    done
    note "$(awk '{ n++ } /FAIL/ { f++ } END { printf "%d comparisons, %d failed", n, f }' \
        "$DIR/part3_compare.txt")$(
        [ "$DRY_RUN" = 1 ] && printf '; GPU skipped (CPU stand-in)')"
    [ $status = $PASS ] && [ "$DRY_RUN" = 1 ] && return $SKIP
    return $status
}

# ---------------------------------------------------------------- part 4

# A run of part 3, made here when part 3 did not leave it.
ensure_run() {
    [ -f "$RUNS/$1-$2/model.ckpt" ] || train "$1" "$2" $STEPS
}

# resume_copy FROM TO: a copy of a run folder to continue from its checkpoint.
resume_copy() {
    rm -rf "${RUNS:?}/$2" && cp -r "$RUNS/$1" "$RUNS/$2"
}

part_4() {
    local name kind status=$PASS cpu_loss gpu_loss end=$((STEPS + RESUME_STEPS))
    mkdir -p "$RUNS"
    # joint: every module, all parameter groups; nine: the hot set (MPHF and
    # fingerprints) travels in the checkpoint too.
    for name in joint nine; do
        say "== $name: the GPU's checkpoint evaluated by the CPU trainer"
        ensure_run cpu "$name" && ensure_run gpu "$name" || status=$FAIL
        for kind in gpu cpu; do
            say "-- trainer eval --ckpt runs/$kind-$name/model.ckpt"
            lb "$BIN/trainer" eval --ckpt "$RUNS/$kind-$name/model.ckpt" --eval-batches $EVAL_BATCHES \
                | tee "$RUNS/eval-$kind-$name.log" || status=$FAIL
        done
        gpu_loss=$(val_loss "$RUNS/eval-gpu-$name.log")
        cpu_loss=$(val_loss "$RUNS/eval-cpu-$name.log")
        # the two models are step-$STEPS models of the two runs part 3 compared
        awk -v g="${gpu_loss:-x}" -v c="${cpu_loss:-x}" -v tol=$TOL_FP32_MAX -v n="$name" 'BEGIN {
            if (g !~ /^[0-9.]+$/ || c !~ /^[0-9.]+$/) { printf "%s: no validation loss\n", n; exit 1 }
            d = g - c; if (d < 0) d = -d
            printf "%s: val loss of the GPU checkpoint %s, of the CPU one %s: |diff| %.2e (tol %g) %s\n",
                n, g, c, d, tol, d <= tol ? "ok" : "FAIL"
            exit d <= tol ? 0 : 1 }' | tee -a "$DIR/part4_compare.txt" || status=$FAIL

        say "== $name: the CPU's checkpoint resumed on the GPU for $RESUME_STEPS steps"
        resume_copy cpu-"$name" resume_cpu-"$name"
        resume_copy cpu-"$name" resume_gpu-"$name"
        train cpu "$name" $end resume_cpu-"$name" --resume || status=$FAIL
        train gpu "$name" $end resume_gpu-"$name" --resume || status=$FAIL
        compare_losses "$RUNS/resume_cpu-$name/steps.csv" "$RUNS/resume_gpu-$name/steps.csv" \
            $((STEPS + 1)) $end $TOL_FP32_FIRST $TOL_FP32_MAX "$name resumed" |
            tee -a "$DIR/part4_compare.txt" || status=$FAIL
    done
    note "$(grep -c -v FAIL "$DIR/part4_compare.txt") of 4 checks ok$(
        [ "$DRY_RUN" = 1 ] && printf '; GPU skipped (CPU stand-in)')"
    [ $status = $PASS ] && [ "$DRY_RUN" = 1 ] && return $SKIP
    return $status
}

# ---------------------------------------------------------------- part 5

# Dense peaks for MFU, TFLOP/s: the H100/H200 SXM datasheet's BF16 (989.4)
# and what an 8192^3 BF16 matrix product reached on this workplace's H200
# (about 790, KINDS.md); bench_cuda itself prints MFU against the dense TF32
# peak (494.7), the precision its GEMMs run in.
PEAK_BF16_SPEC=989.4
PEAK_BF16_MEASURED=790

part_5() {
    if [ "$DRY_RUN" = 1 ]; then
        note "skipped: no GPU"
        return $SKIP
    fi
    local section status=$PASS failed=""
    for section in $BENCH_SECTIONS; do
        say "== bench_cuda $section $BENCH_ROUNDS"
        lb "$BIN/bench_cuda" "$section" $BENCH_ROUNDS || { status=$FAIL failed="$failed $section"; }
    done
    # "baseline 12x768, T=1024, B=8: X ms/step, Y tokens/s, Z TFLOP/s" and
    # "  ratio NAME = R (target <= T)"
    awk -v spec=$PEAK_BF16_SPEC -v meas=$PEAK_BF16_MEASURED '
        function after_eq(line) { line = substr(line, index(line, " = ") + 3); sub(/ .*/, "", line); return line }
        /^baseline 12x768/ { for (i = 2; i <= NF; i++) if ($i ~ /^TFLOP/) tf = $(i - 1) }
        /ratio PEER-1M/ { peer = after_eq($0) }
        /ratio Nine/ { nine = after_eq($0) }
        END {
            if (tf == "") { print "no baseline result"; exit }
            printf "%.1f TFLOP/s: MFU %.1f%% of %g dense BF16 (datasheet), %.1f%% of %g (bf16 GEMM measured); ",
                tf, 100 * tf / spec, spec, 100 * tf / meas, meas
            printf "PEER-1M/16K %s, Nine/Hash %s\n", peer, nine
        }' "$DIR/part5_bench.log" > "$DIR/.mfu"
    cat "$DIR/.mfu"
    note "$(cat "$DIR/.mfu")${failed:+; failed:$failed}"
    # bench_cuda exits 0 when it finds no device: that is no measurement
    grep -q '^no baseline result' "$DIR/.mfu" && status=$FAIL
    return $status
}

# ---------------------------------------------------------------- part 6

# mpirun: the machine's, or Open MPI's packages from gpu-mpi/ unpacked under
# /tmp (dpkg-deb -x sets up no alternatives, so their mpirun is orterun;
# OPAL_PREFIX moves Open MPI's own plugins there). PMIx still looks for its
# components where Debian built it to (no variable moved them here, checked
# with strace), so on a machine without them they are copied there, when
# that folder can be written (the GPU machine is thrown away after use).
MPI_ROOT=/tmp/gpu-mpi
PMIX_DIR=/usr/lib/x86_64-linux-gnu/pmix2
find_mpirun() {
    local f
    if command -v mpirun >/dev/null 2>&1; then MPIRUN_BIN=mpirun; return 0; fi
    ls gpu-mpi/*.deb >/dev/null 2>&1 || return 1
    for f in gpu-mpi/*.deb; do dpkg-deb -x "$f" "$MPI_ROOT" || return 1; done
    [ -d $PMIX_DIR ] || cp -r "$MPI_ROOT$PMIX_DIR" $PMIX_DIR || say "PMIx's components are not in $PMIX_DIR"
    export OPAL_PREFIX=$MPI_ROOT/usr
    export LD_LIBRARY_PATH=$MPI_ROOT/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    MPIRUN_BIN=$MPI_ROOT/usr/bin/orterun
}

mpi() { OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 lb "$MPIRUN_BIN" --oversubscribe "$@"; }

part_6() {
    local status=$PASS n dev=(--device cuda --precision fp32)
    if ! find_mpirun; then
        note "skipped: no mpirun here (carry Open MPI: make gpu-mpi, and gpu-mpi in carry)"
        return $SKIP
    fi
    for n in trainer_cuda_mpi tests_nccl; do
        [ -x "$BIN/$n" ] || { note "no $BIN/$n (make gpu-build with MPI and NCCL here)"; return $FAIL; }
    done
    # a dry run trains on the CPU: the same comparison with the CPU's all-reduce
    [ "$DRY_RUN" = 1 ] && dev=(--threads 1)
    say "== tests_nccl: 1 rank (NCCL), then 2 ranks sharing the GPU (sums through host copies)"
    rm -f "$DIR/.tests_nccl"
    for n in 1 2; do mpi -np $n "$BIN/tests_nccl" | tee -a "$DIR/.tests_nccl" || status=$FAIL; done
    say "== joint: $STEPS steps on 1 rank and on 2 ranks (each half of every batch)"
    mkdir -p "$RUNS"
    for n in 1 2; do
        # shellcheck disable=SC2046 # the configuration's options are words
        mpi -np $n "$BIN/trainer_cuda_mpi" train "${COMMON[@]}" $(config_opts joint) "${dev[@]}" \
            --stop-after $STEPS --out "$RUNS/dp$n" || status=$FAIL
    done
    compare_losses "$RUNS/dp1/steps.csv" "$RUNS/dp2/steps.csv" 1 $STEPS $TOL_FP32_FIRST $TOL_FP32_MAX \
        "joint 2 ranks" | tee "$DIR/part6_compare.txt" || status=$FAIL
    side_by_side "$RUNS/dp1/steps.csv" "$RUNS/dp2/steps.csv"
    note "tests_nccl: $(grep -E '^[0-9]+ passed' "$DIR/.tests_nccl" | tr '\n' ' ')| $(cat "$DIR/part6_compare.txt")"
    [ $status = $PASS ] && [ "$DRY_RUN" = 1 ] && return $SKIP
    return $status
}

# ---------------------------------------------------------------- driver

PART_NAMES=(build device tests_cuda train checkpoints bench dp)
# timeouts, seconds; part 5 also gets whatever is left of BUDGET
PART_CAPS=(300 30 150 150 60 90 90)

# run_part N: part N in its own process under its own timeout; records the
# status, the seconds and the part's note.
run_part() {
    local n=$1 name=${PART_NAMES[$1]} cap=${PART_CAPS[$1]} t0 rc status left
    if [ "$n" = 5 ]; then
        left=$((BUDGET - ($(date +%s) - START)))
        [ $left -gt "$cap" ] && cap=$left
    fi
    # a dry run trains on the CPU alone, on what may be a small machine
    [ "$DRY_RUN" = 1 ] && cap=$((cap * 4))
    rm -f "$DIR/.note"
    say "part $n ($name): up to $cap s"
    t0=$(date +%s)
    timeout --kill-after=10 "$cap" bash "$0" --part "$n" "$DIR" > "$DIR/part${n}_$name.log" 2>&1
    rc=$?
    case $rc in
    0) status=PASS ;;
    77) status=SKIP ;;
    124 | 137) status=TIMEOUT && say "=> stopped after $cap s" > "$DIR/.note" ;;
    *) status=FAIL ;;
    esac
    printf '%-4s %-12s %-8s %5d s  %s\n' "$n" "$name" "$status" $(($(date +%s) - t0)) \
        "$(cat "$DIR/.note" 2>/dev/null || say "exit status $rc")" | tee -a "$DIR/.status"
}

main() {
    local arg n failed mode
    DIR=
    for arg in "$@"; do
        case $arg in
        --dry-run) DRY_RUN=1 ;;
        -*) say "gpu_check.sh: unknown option $arg (usage: gpu_check.sh DIR [--dry-run])" >&2; exit 2 ;;
        *) DIR=$arg ;;
        esac
    done
    [ -n "$DIR" ] || { say "usage: gpu_check.sh DIR [--dry-run]" >&2; exit 2; }
    mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd) || exit 2
    rm -rf "$DIR/runs" "$DIR"/part*_*.log "$DIR"/part*_compare.txt "$DIR/.status"
    export GPU_CHECK_DRY_RUN=$DRY_RUN START
    START=$(date +%s)
    mode="GPU run"
    [ "$DRY_RUN" = 1 ] && mode="dry run (--dry-run: no GPU used)"
    say "gpu_check.sh: $mode, logs in $DIR"
    for n in 0 1 2 3 4 5 6; do run_part $n; done
    {
        say "gpu_check.sh, $mode, $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)," \
            "$(source_commit)"
        say "part what         status   time    note"
        cat "$DIR/.status"
        say "total wall time $(($(date +%s) - START)) s (budget $BUDGET s)"
    } > "$DIR/summary.txt"
    say
    cat "$DIR/summary.txt"
    failed=$(grep -c -E '^[0-9] +[a-z_]+ +(FAIL|TIMEOUT)' "$DIR/.status")
    [ "$failed" = 0 ]
}

if [ "${1:-}" = --part ]; then # gpu_check.sh --part N DIR: one part, in its own process (run_part)
    DIR=$3
    RUNS=$DIR/runs
    mkdir -p "$DIR" || exit 2
    "part_$2"
    exit
fi
main "$@"
