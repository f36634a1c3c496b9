#!/usr/bin/env bash
# One device call: set up the carried wheels, then run the named parts and leave JSON/logs in $OUT.
#   bash bench/gpu_session.sh tests md        # GPU tests + MD benchmark
#   bash bench/gpu_session.sh tests-parallel  # the same GPU tests in three pytest processes at once (TESTS_GROUPS; ~1/2 the wall time)
#   bash bench/gpu_session.sh anchor model    # TorchMD-NET 3.0.0 anchor + torchmdx model benchmark
#   bash bench/gpu_session.sh train           # CUDA-graph training step (bench/bench_train.py)
#   bash bench/gpu_session.sh trainrun        # whole training runs per variant (bench/bench_train_run.py)
#   bash bench/gpu_session.sh accuracy-torchmdnet   # then, in a second call, accuracy-torchmdx (bench/bench_accuracy.py)
#   bash bench/gpu_session.sh accuracy-equiformer   # Equiformer (configs/equiformer_md17.yaml) at the same budget and split
#   bash bench/gpu_session.sh locality        # atom order: neighbour bandwidth, ET call time (bench/bench_locality.py)
#   bash bench/gpu_session.sh kernels16       # issue 16's measurements in one call (< 10 min; see below)
#   bash bench/gpu_session.sh tables          # filter tables vs GEMM filters: ms, memory, force error vs float64 (bench/bench_filter_table.py;
#                                             # TABLES_SYSTEMS, TABLES_ARGS, TABLES_TIMEOUT)
#   bash bench/gpu_session.sh dense           # issue 16 item 5 experiments: small molecules over all N x N pairs, or with the fused
#                                             # message as custom ops in the graph, vs the neighbor-list whole graph
#                                             # (bench/bench_dense_pairs.py; DENSE_SYSTEMS, DENSE_VARIANTS, DENSE_TIMEOUT)
#   bash bench/gpu_session.sh small16         # issue 16 item 5: 22-atom whole-model graph under inductor option sets (SMALL16_OPTIONS JSON)
#   bash bench/gpu_session.sh openmm          # issue 23 item 4: OpenMM + torchmdx vs native vs TorchMD-NET (bench/bench_openmm.py; needs
#                                             # openmm, openmm_cuda_13, openmmml wheels in .whl; OPENMM_ARGS / OPENMM_TIMEOUT, docs/openmm.md)
#   bash bench/gpu_session.sh ddp             # issue 20 on a 2-GPU machine: 1 GPU (graph, eager) vs 2 GPUs (DDP) at the same global
#                                             # batch (bench/bench_ddp.py; DDP_ARGS, DDP_TIMEOUT; docs/training.md, "Two GPUs (issue 20)")
# kernels16 (docs/kernels_message.md, "Issue 16 run"): every step has a timeout and writes its JSON as it
# goes, so the call ends in ~9.5 min whatever happens. Estimated from the 2026-11-25 / 12-03 runs
# (first Triton compile of a message-kernel variant ~5-10 s, inductor compile of the dense parts
# 5-30 s, of the 22-atom traced graph 40-60 s):
#   1 sweep16    150 s  bench_model --sweep dhfr,stmv at the 'table' filter place (K16_SWEEP_PLACES: table,gemm
#                       for training's too): launch knobs with errors vs float64 (at 'gemm' also the message
#                       variants, tl.dot precisions, model force error per precision: the gate); writes
#                       torchmdx/kernels/launch_table.json (+ $OUT/launch_table.json): later steps use it
#   2 profile16   90 s  bench_model --profile dhfr,stmv: roofline tables ($OUT/roofline.md), eager + graph
#   3 model16    130 s  bench_model rows (triton; graph, graph + compiled, traced <= 64 atoms), big systems first
#   4 md16       110 s  bench_md: native engine, torchmdx ASE loop, TorchMD-NET's ASE loop (DHFR, factor IX, 22 atoms)
#   5 neighbors16 45 s  bench_neighbors 10 k / 100 k atoms and the systems
# Knobs: K16_SWEEP (systems), K16_SWEEP_BUDGET (s per sweep system), K16_SKIP (space-separated step names),
# K16_PROFILE (systems; BENCH_PROFILE_VARIANTS eager,graph,traced), K16_MODEL_SYSTEMS / K16_ROW_BUDGET / K16_TRACED_MAX_ATOMS (model16's rows; graph_traced up to that size), K16_MD_SYSTEMS / K16_MD_VARIANTS / K16_MD_ARGS (md16; default "--steps 400 --warmup 10 --repeat 1", each measurement cut to 4 s).
# accuracy-equiformer reuses the ET run's split file when it is there ($ACCURACY_SPLIT, default
# $OUT/accuracy_torchmdx/split_<data>_seed0.npz: accuracy-torchmdx earlier in the same call), else it draws
# its own with the same seed (the same indices; the report checks the split digests).
# ACCURACY_DATA=ani1x races on .benchdata/ani1x_xtb.h5 (molecules of 3-11 atoms, split 450/50/100,
# the same per-element reference energies on both sides; docs/benchmarks/accuracy.md, "ANI-1x").
# ACCURACY_DATA=ani1x-large races on .benchdata/ani1x_xtb_large.h5 (made here by bench/make_ani1x_large.py:
# ~9 000 GFN2-xTB MD frames of 46 formulas, 3-22 atoms; split 80/5/15 % stratified by formula, the same
# references; its split file is split_ani1x-large_seed0.npz, which accuracy-equiformer picks up).
# ACCURACY_DATA=polymer races force-only (PolyGET) on .benchdata/polymers_xtb.extxyz (copy it from
# ../shared/data/polymer/): 900 frames of six polymer families, val PVA and test PMMA held out whole;
# torchmdx configs/polymer_forces_only.yaml, TorchMD-NET y_weight 0 / neg_dy_weight 1; force MAE the
# headline (docs/benchmarks/accuracy.md, "polymer (force-only)"; ACCURACY_MINUTES=8.25 per side).
# Environment knobs: ACCURACY_DATA / ACCURACY_MINUTES / ACCURACY_TIMEOUT / ACCURACY_ARGS / ACCURACY_SPLIT,
# MODEL_ARGS / MODEL_TIMEOUT, MD_SYSTEMS / MD_ARGS / MD_TIMEOUT, TRAIN_ARGS / TRAIN_TIMEOUT,
# TESTS_ARGS (pytest selection, default every -m gpu test), BENCH_GRAPH_VARIANTS (bench_model's graph columns).
# Needs `.whl/` (ase, vesin, vesin-torch, torchmd-net, pytest wheels) and `.benchdata/` (the
# systems' xyz files, anchor_torchmdnet.py, md17_aspirin_xtb.npz) carried with the call.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
# the OpenMM wheels (openmm, openmm_cuda_13, openmmml; manylinux_2_34) only for the openmm part, and
# never fatal: a machine whose glibc refuses them still runs every other part
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    $(ls .whl/*.whl | grep -v '/openmm') || exit 1
if [[ " $* " == *" openmm "* ]] && ls .whl/openmm*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/openmm*.whl \
    || echo "the OpenMM wheels do not install here (glibc < 2.34?): the OpenMM rows will be skipped"
fi
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/shared && ln -sfn "$PWD/.benchdata" /tmp/shared/systems
export TORCHMDX_SHARED_DATA=/tmp/shared
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for part in "$@"; do
  echo "=== $part $(date -u +%H:%M:%S)"
  case "$part" in
    tests) timeout -s INT -k 15 ${TESTS_TIMEOUT:-560} python3 -m pytest -q -p no:cacheprovider -m gpu ${TESTS_ARGS:-tests/} -W ignore::UserWarning \
          --durations=12 2>&1 | tee "$OUT/gpu_tests.log" ;;
    tests-parallel)  # every -m gpu test in TESTS_GROUPS (';'-separated file lists), one pytest process per group at once
      groups=${TESTS_GROUPS:-"tests/test_traced.py tests/test_model_compiled.py tests/test_calculator.py tests/test_openmm_fast.py tests/test_locality.py tests/test_model_sync.py tests/test_packing.py tests/test_packing_periodic.py tests/test_pair_layout.py;tests/test_message_triton.py tests/test_filter_table.py tests/test_message_ops.py tests/test_neighbors_triton.py;tests/test_train_graph.py tests/test_train_graph_architectures.py tests/test_equiformer_capture.py tests/test_md_cuda_graph.py tests/test_integrators_fused.py tests/test_train_ddp.py tests/test_train_graph_ddp.py"}
      k=0; IFS=';' read -ra group_list <<< "$groups"
      for g in "${group_list[@]}"; do
        k=$((k + 1))
        timeout -s INT -k 15 ${TESTS_TIMEOUT:-560} python3 -m pytest -q -p no:cacheprovider -m gpu $g -W ignore::UserWarning --durations=5 \
          > "$OUT/gpu_tests_$k.log" 2>&1 &
      done
      wait
      for f in "$OUT"/gpu_tests_*.log; do echo "--- $f"; tail -12 "$f"; done ;;
    md) timeout ${MD_TIMEOUT:-150} python3 bench/bench_md.py --device cuda --data .benchdata \
          --systems ${MD_SYSTEMS:-alanine_dipeptide chignolin dhfr} --steps 200 --warmup 20 --repeat 1 --replicas 32 ${MD_ARGS:-} \
          --json "$OUT/bench_md.json" 2>&1 | tee "$OUT/bench_md.log" ;;
    tables) timeout ${TABLES_TIMEOUT:-400} python3 bench/bench_filter_table.py --data .benchdata \
          --systems ${TABLES_SYSTEMS:-alanine_dipeptide,chignolin,dhfr,factorIX} --out "$OUT" ${TABLES_ARGS:-} 2>&1 \
          | tee "$OUT/filter_table.log" ;;
    dense) timeout ${DENSE_TIMEOUT:-240} python3 bench/bench_dense_pairs.py --data .benchdata \
          --systems ${DENSE_SYSTEMS:-alanine_dipeptide,caffeine,testosterone} --variants ${DENSE_VARIANTS:-list,pairs} \
          2>&1 | tee "$OUT/dense_pairs.log" ;;
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
    accuracy-equiformer) split=${ACCURACY_SPLIT:-$OUT/accuracy_torchmdx/split_${ACCURACY_DATA:-aspirin}_seed0.npz}
          split_args=()
          if [ -f "$split" ]; then split_args=(--split "$split"); else echo "no $split: drawing the split (seed 0)"; fi
          timeout ${ACCURACY_TIMEOUT:-570} python3 bench/bench_accuracy.py run --side torchmdx --config configs/equiformer_md17.yaml \
          --label equiformer --data ${ACCURACY_DATA:-aspirin} --minutes ${ACCURACY_MINUTES:-5} ${split_args[@]+"${split_args[@]}"} \
          --out "$OUT/accuracy_equiformer" ${ACCURACY_ARGS:-} 2>&1 | tee "$OUT/accuracy_equiformer.log" ;;
    locality) timeout 400 python3 bench/bench_locality.py --data .benchdata --systems alanine_dipeptide_solvated,dhfr,factorIX,stmv \
          --out "$OUT" 2>&1 | tee "$OUT/bench_locality.log" ;;
    kernels16)
      skip=" ${K16_SKIP:-} "
      step() { case "$skip" in *" $1 "*) echo "--- $1 skipped"; return 1 ;; esac; echo "--- $1 $(date -u +%H:%M:%S)"; }
      step sweep16 && timeout ${K16_SWEEP_TIMEOUT:-150} python3 bench/bench_model.py --data .benchdata --out "$OUT" --name sweep16 \
          --systems "" --no-train --sweep ${K16_SWEEP:-dhfr,stmv} --sweep-places ${K16_SWEEP_PLACES:-table} \
          --sweep-budget-s ${K16_SWEEP_BUDGET:-55} --budget-s 1.5 \
          2>&1 | tee "$OUT/sweep16.log"
      step profile16 && timeout ${K16_PROFILE_TIMEOUT:-90} python3 bench/bench_model.py --data .benchdata --out "$OUT" --name profile16 \
          --systems "" --no-train --profile ${K16_PROFILE:-dhfr,stmv} 2>&1 | tee "$OUT/profile16.log"
      step model16 && BENCH_GRAPH_VARIANTS=${K16_GRAPH_VARIANTS:-graph,graph_compiled,graph_traced} timeout ${K16_MODEL_TIMEOUT:-130} \
          python3 bench/bench_model.py --data .benchdata --out "$OUT" --name model16 --backends triton --no-train \
          --systems ${K16_MODEL_SYSTEMS:-dhfr,factorIX,stmv,alanine_dipeptide,chignolin} --budget-s 2 --row-budget-s ${K16_ROW_BUDGET:-35} --traced-max-atoms ${K16_TRACED_MAX_ATOMS:-64} \
          2>&1 | tee "$OUT/model16.log"
      step md16 && timeout ${K16_MD_TIMEOUT:-110} python3 bench/bench_md.py --device cuda --data .benchdata \
          --systems ${K16_MD_SYSTEMS:-dhfr factorIX alanine_dipeptide} --variants ${K16_MD_VARIANTS:-native,ase,tmdnet_ase} ${K16_MD_ARGS:---steps 400 --warmup 10 --repeat 1} \
          --budget-s 4 --json "$OUT/bench_md16.json" 2>&1 | tee "$OUT/bench_md16.log"
      step neighbors16 && timeout ${K16_NEIGHBORS_TIMEOUT:-45} python3 bench/bench_neighbors.py --sizes 10000,100000 \
          --systems .benchdata --out "$OUT" 2>&1 | tee "$OUT/bench_neighbors16.log"
      cp torchmdx/kernels/launch_table.json "$OUT/launch_table_final.json" 2>/dev/null
      echo "=== kernels16 done $(date -u +%H:%M:%S)" ;;
    openmm)
      # OpenMM's CUDA plugin (openmm_cuda_13) finds libnvrtc.so.13 / libcufft.so.12 through RUNPATH
      # <site>/nvidia/cu13/lib, i.e. under /tmp/site, where they are not: point it at torch's copies.
      ldd --version 2>&1 | head -1   # the openmm 8.6.1 wheels are manylinux_2_34: glibc >= 2.34
      nvlib=$(python3 -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(f) for p in nvidia.__path__ for f in glob.glob(p + '/*/lib/lib*.so.*')})))" 2>/dev/null)
      LD_LIBRARY_PATH=$nvlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} python3 -c "import openmm as m; print('openmm', m.__version__, 'platforms', \
          [m.Platform.getPlatform(i).getName() for i in range(m.Platform.getNumPlatforms())]); [print('plugin failure:', f) for f in m.Platform.getPluginLoadFailures() if 'OpenCL' not in f and 'HIP' not in f]"
      LD_LIBRARY_PATH=$nvlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} timeout ${OPENMM_TIMEOUT:-510} python3 bench/bench_openmm.py --device cuda \
          --data .benchdata --time-limit-s $(( ${OPENMM_TIMEOUT:-510} - 25 )) --budget-s 8 --warmup 30 ${OPENMM_ARGS:-} --json "$OUT/bench_openmm.json" \
          2>&1 | tee "$OUT/bench_openmm.log" ;;
    small16)  # issue 16 item 5: the 22-atom whole-model graph under inductor option sets (ms, kernel launches per call)
      BENCH_GRAPH_VARIANTS=graph_traced BENCH_TRACED_OPTIONS=${SMALL16_OPTIONS:-'{"agg": {"combo_kernels": true, "aggressive_fusion": true}, "cdt": {"combo_kernels": true, "coordinate_descent_tuning": true}, "bigfuse": {"combo_kernels": true, "max_fusion_size": 256, "score_fusion_memory_threshold": 1}, "mixed": {"combo_kernels": true, "combo_kernel_allow_mixed_sizes": 2, "benchmark_combo_kernel": true}}'} \
        timeout ${SMALL16_TIMEOUT:-540} python3 bench/bench_model.py --data .benchdata --out "$OUT" --name bench_model_small16 \
          --backends triton --no-train --systems ${SMALL16_SYSTEMS:-alanine_dipeptide} --row-budget-s ${SMALL16_ROW_BUDGET:-470} \
          2>&1 | tee "$OUT/bench_model_small16.log" ;;
    ddp)  # issue 20: run folders (checkpoints) in /tmp; JSON, table, PNG, splits and each run's logs in $OUT/ddp.
          # The bench starts no run that its time limit (DDP_TIMEOUT - 45 s) would cut, and lists what it skipped.
      nvidia-smi topo -m 2>&1 | head -8
      timeout ${DDP_TIMEOUT:-570} python3 bench/bench_ddp.py --data .benchdata --out "$OUT/ddp" --runs-dir /tmp/ddp_runs_$(date +%s) \
          --cache-dir /tmp/ddp_cache --time-limit-s $(( ${DDP_TIMEOUT:-570} - 45 )) ${DDP_ARGS:-} 2>&1 | tee "$OUT/bench_ddp.log" ;;
    neighbors) timeout 200 python3 bench/bench_neighbors.py --sizes 1000,10000,100000 --systems .benchdata \
          --out "$OUT" 2>&1 | tee "$OUT/bench_neighbors.log" ;;
    *) echo "unknown part $part" ;;
  esac
done
