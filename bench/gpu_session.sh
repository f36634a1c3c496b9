#!/usr/bin/env bash
# One device call: set up the carried wheels, then run the named parts and leave JSON/logs in $OUT.
#   bash bench/gpu_session.sh tests md        # GPU tests + MD benchmark
#   bash bench/gpu_session.sh anchor model    # TorchMD-NET 3.0.0 anchor + torchmdx model benchmark
#   bash bench/gpu_session.sh train           # CUDA-graph training step (bench/bench_train.py)
#   bash bench/gpu_session.sh trainrun        # whole training runs per variant (bench/bench_train_run.py)
#   bash bench/gpu_session.sh accuracy-torchmdnet   # then, in a second call, accuracy-torchmdx (bench/bench_accuracy.py)
# Environment knobs: MODEL_ARGS / MODEL_TIMEOUT, MD_SYSTEMS / MD_ARGS / MD_TIMEOUT, TRAIN_ARGS / TRAIN_TIMEOUT,
# TESTS_ARGS (pytest selection, default every -m gpu test), BENCH_GRAPH_VARIANTS (bench_model's graph columns).
# Needs `.whl/` (ase, vesin, vesin-torch, torchmd-net, pytest wheels) and `.benchdata/` (the
# systems' xyz files, anchor_torchmdnet.py, md17_aspirin_xtb.npz) carried with the call.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/shared && ln -sfn "$PWD/.benchdata" /tmp/shared/systems
export TORCHMDX_SHARED_DATA=/tmp/shared
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for part in "$@"; do
  echo "=== $part $(date -u +%H:%M:%S)"
  case "$part" in
    tests) timeout ${TESTS_TIMEOUT:-560} python3 -m pytest -q -p no:cacheprovider -m gpu ${TESTS_ARGS:-tests/} -W ignore::UserWarning \
          --durations=12 2>&1 | tee "$OUT/gpu_tests.log" ;;
    md) timeout ${MD_TIMEOUT:-150} python3 bench/bench_md.py --device cuda --data .benchdata \
          --systems ${MD_SYSTEMS:-alanine_dipeptide chignolin dhfr} --steps 200 --warmup 20 --repeat 1 --replicas 32 ${MD_ARGS:-} \
          --json "$OUT/bench_md.json" 2>&1 | tee "$OUT/bench_md.log" ;;
    anchor) SYSTEMS=.benchdata timeout 180 python3 .benchdata/anchor_torchmdnet.py \
          alanine_dipeptide,chignolin,dhfr,factorIX,stmv 2>&1 | tee "$OUT/anchor.log" ;;
    model) timeout ${MODEL_TIMEOUT:-200} python3 bench/bench_model.py --data .benchdata --out "$OUT" ${MODEL_ARGS:-} 2>&1 | tee "$OUT/bench_model.log" ;;
    train) timeout ${TRAIN_TIMEOUT:-150} python3 bench/bench_train.py --data .benchdata --out "$OUT" --no-profile ${TRAIN_ARGS:-} \
          2>&1 | tee "$OUT/bench_train.log" ;;
    trainrun) timeout ${TRAINRUN_TIMEOUT:-420} python3 bench/bench_train_run.py --data .benchdata --out "$OUT" \
          --seconds ${TRAINRUN_SECONDS:-45} ${TRAINRUN_ARGS:-} 2>&1 | tee "$OUT/bench_train_run.log" ;;
    accuracy-torchmdnet|accuracy-torchmdx) side=${part#accuracy-}
          timeout ${ACCURACY_TIMEOUT:-570} python3 bench/bench_accuracy.py run --side $side --data ${ACCURACY_DATA:-aspirin} \
          --minutes ${ACCURACY_MINUTES:-5} --out "$OUT/accuracy_$side" ${ACCURACY_ARGS:-} 2>&1 | tee "$OUT/accuracy_$side.log" ;;
    neighbors) timeout 200 python3 bench/bench_neighbors.py --sizes 1000,10000,100000 --systems .benchdata \
          --out "$OUT" 2>&1 | tee "$OUT/bench_neighbors.log" ;;
    *) echo "unknown part $part" ;;
  esac
done
