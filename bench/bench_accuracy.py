#!/usr/bin/env python3
"""Time to accuracy, side by side: TorchMD-NET 3.0.0 and torchmdx on the same data, split,
recipe and wall-clock budget, scored by one scorer that belongs to neither.

Each side runs in its own process (one device call each)::

    python bench/bench_accuracy.py run --side torchmdnet --data aspirin --minutes 5 --out DIR
    python bench/bench_accuracy.py run --side torchmdx   --data aspirin --minutes 5 --out DIR
    python bench/bench_accuracy.py report DIR [DIR ...]          # CPU: table + accuracy_<data>.png

**Data** (bench/bench_accuracy_data.py). ``--data`` is an MD17-layout npz (a path, or ``aspirin`` /
``ethanol`` for the shipped GFN2-xTB samples ``md17_<name>_xtb.npz``) or an ANI-1x-layout HDF5
file (a path, or ``ani1x`` for the shipped sample ``ani1x_xtb.h5``: 600 conformations of 15
formulas, 3-11 atoms, molecules of different sizes; or ``ani1x-large`` for ``ani1x_xtb_large.h5``,
~9 000 GFN2-xTB MD frames of 46 formulas, 3-22 atoms, made by bench/make_ani1x_large.py), looked up in ``$TORCHMDX_SHARED_DATA/md17``,
``$TORCHMDX_SHARED_DATA/ani``, ``$TORCHMDX_SHARED_DATA``, ``.benchdata/``, ``../shared/data/md17``
and ``../shared/data/ani``. It is read once through torchmdx's data layer (``build_cache`` +
``H5Dataset``: kcal/mol or Hartree -> eV, per Å likewise), and both sides train and are scored on
these numbers: torchmdx reads the same cache; TorchMD-NET gets them as its ``Custom`` dataset
(MD17: coord/embed/energy/force .npy files, eV and eV/Å) or, for ANI-1x, as an in-memory
``torch_geometric`` dataset of ``Data(z, pos, y, neg_dy)`` (eV, eV/Å) handed to its
``DataModule(hparams, dataset=...)``.

**Polymers, force only** (``--data polymer``: ``polymers_xtb.extxyz``, 900 GFN2-xTB frames of six
polymer families, 19-35 atoms, read by torchmdx's ``ase`` reader, also looked up in
``$TORCHMDX_SHARED_DATA/polymer`` and ``../shared/data/polymer``). The PolyGET objective on both
sides: torchmdx trains ``configs/polymer_forces_only.yaml`` (``energy_weight: 0``,
``refit_atomref``; the gated equivariant head that TorchMD-NET builds for an ET), TorchMD-NET
the same ET (4 layers, 943 106 parameters) with ``y_weight: 0``, ``neg_dy_weight: 1`` and the
config's batch 16, lr 5e-4, 500 warm-up steps, plateau 0.8 / 20 down to 1e-6, clipping 10, early
stopping 100. Whole families held out (validation PVA, test PMMA; training the other four);
per-element references fitted on the training energies for both. Force MAE is the headline; the
energy columns are the energies relative within the test family (each side's mean error on it
removed), with torchmdx's refit on the training energies applied to both sides' predictions
recorded as ``energy_mae_refit`` (bench_accuracy_data's docstring says why that one is not the
headline: PMMA's composition is outside the span of the training families').

**Split.** By structure, seed 0: 700 / 50 / 250 (MD17) or 450 / 50 / 100 (ANI-1x) structures of
``numpy.random.default_rng(seed).permutation`` (``torchmdx.data.splits.random_split``;
``--train/--val/--test`` change the sizes); ``ani1x-large``: 80 / 5 / 15 % of the structures,
random frames stratified by formula (bench_accuracy_data.formula_split), written once as torchmdx's split file
(``save_split``: indices, size, seed, the source's content hash) and handed to torchmdx as
``data.split_file``; TorchMD-NET's ``splits`` npz (``idx_train/idx_val/idx_test``) is written from
that file as read back by ``load_split``. ``--split FILE`` reuses a split file made earlier (e.g.
the ET race's, for an Equiformer run at the same budget).

**Energy references** (ANI-1x). Per-element reference energies fitted by least squares on the
training structures (torchmdx's ``fit_atomic_references``, what ``data.atomref: fit`` computes),
one table for both sides: torchmdx fits it in its data module from the same split (it is read
back from the run's ``data_state.json`` and recorded), TorchMD-NET gets it as its frozen
``Atomref`` prior (``prior_model: Atomref``, the dataset's ``get_atomref()``). Each side's model
adds the table to its per-atom outputs, so both predict total energies; the report warns if the
two tables differ. The normalisation of the residual stays each project's own (TorchMD-NET:
``standardize``, mean and std of the residual energies; torchmdx: ``scale``/``shift: auto``),
as in the MD17 race. MD17 (one molecule) keeps each recipe's own treatment (TorchMD-NET no prior).

**Recipe.** TorchMD-NET's ET-MD17 example (128 channels, 6 layers, 8 heads, 32 expnorm RBFs,
cutoff 5 Å, SiLU, neighbor embedding, distance influence both, vector cutoff, ``Scalar`` output
(TorchMD-NET builds its gated equivariant head for an ET), batch 8 / 64, AdamW lr 1e-3, 1000
warm-up steps, plateau 0.8 / 30 down to 1e-7, energy 0.2 / force 0.8 MSE, loss EMA
``ema_alpha_y`` 0.05 / ``ema_alpha_neg_dy`` 1.0, standardize, float32), run through TorchMD-NET's
own ``LNNP``, ``DataModule`` and a ``lightning.Trainer`` as its ``torchmd-train`` builds them
(checkpoints every 10 epochs, early stopping; no test passes during training). torchmdx trains
``configs/et_md17.yaml`` (the same recipe) through ``torchmdx.train.run.train`` with
``train.cuda_graph: true`` on CUDA; ``--torchmdx-set key=value`` (repeatable) adds config
overrides. Both parameter counts are printed; they must be equal (1 339 906 for the recipe;
TorchMD-NET's frozen ``Atomref`` table is not counted: torchmdx holds it as a buffer). ANI-1x
changes only the batch (32 on both sides, inference 64: 3-11 atoms a structure, as
bench/bench_train_run.py's ani1x workload) and adds the shared references; torchmdx's captured
step then trains on packed batches (``torchmdx.data.packing``: a few fixed atom capacities).

**Other torchmdx models.** ``--side torchmdx --config configs/equiformer_md17.yaml --label
equiformer`` trains another config (another architecture: Equiformer against the ET at the same
budget, issue 17) on the same data path, split and budget; its files are ``*_<label>.json`` and
the report adds it as a column, with its force error and time to reach against the reference run
(TorchMD-NET's when present, else the first torchmdx run). Its parameter count is its own.

**Budget.** The same ``max_time`` for both Trainers (Lightning's clock starts when training
starts, so compilation and graph capture count inside it). The curves are drawn against the
seconds since the Trainer's fit start (which also holds the sanity validation); the gap between
fit start and train start is recorded for each side.

**Checkpoints.** :class:`WallClockCheckpoints` (the same callback on both sides) saves a full
Lightning checkpoint (``trainer.save_checkpoint``) at train start, every ``--every`` seconds and
at the end, and logs (seconds since fit start, seconds since train start, optimiser step, epoch,
file) to ``checkpoints_<side>.json``. A full checkpoint, not ``weights_only``: only then does
Lightning's ``WeightAveraging`` (torchmdx's weight EMA) put the averaged weights, the ones
torchmdx validates and exports, into the checkpoint's ``state_dict``.

**Scorer.** After training, in the same process: each checkpoint is loaded by its project's
public loader (``torchmdnet.models.model.load_model(path, derivative=True)``,
``torchmdx.train.export.potential_from_checkpoint``), evaluated in eval mode with full float32
matmuls (TF32 off) on the test frames, and :func:`errors` (numpy only) gives energy MAE (meV,
over structures; and per atom, meV/atom: |ΔE_s| / N_s averaged over structures, the one that
means something for molecules of different sizes) and force MAE (meV/Å, over Cartesian
components). ``scores_<side>.json`` in
``--out`` holds the curve, steps, steps/s, parameter counts, device and date.
The scorer is bench/bench_accuracy_scorer.py; the report (``report``: table and PNG) is
bench/bench_accuracy_report.py.

Checkpoints, caches and run folders go to ``--work`` (default: a new folder under the system's
temporary folder, deleted after scoring unless ``--keep``), never to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torchmdx.errors import ConfigError, TorchmdxError  # noqa: E402
from torchmdx.io_utils import atomic_write  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the scorer and the report (and the names callers and tests take from here)
from bench_accuracy_report import LABELS, SIDES, cmd_report, comparison, time_to_reach  # noqa: E402
from bench_accuracy_scorer import errors, full_float32_precision, score_checkpoints  # noqa: E402
# data, split, energy references and TorchMD-NET's inputs (the same for both sides)
from bench_accuracy_data import (DATASETS, atom_index, data_kind, data_name, family_centred_energies,  # noqa: E402,F401
                                 flat_structures, held_out_groups, load_frames, make_split_file, nonzero_table,
                                 reference_energies, refit_energies, resolve_data, split_digest, split_groups,
                                 torchmdnet_dataset, write_torchmdnet_splits)
from bench_accuracy_scorer import PREDICTORS  # noqa: E402
from bench_accuracy_steps import cmd_steps  # noqa: E402

#: the names callers and tests use, this script's and those re-exported from its scorer and report
__all__ = ["main", "cmd_run", "cmd_report", "load_frames", "make_split_file", "write_torchmdnet_splits",
           "WallClockCheckpoints", "errors", "score_checkpoints", "comparison", "time_to_reach", "atom_index",
           "reference_energies", "torchmdnet_dataset"]

# the two sides: each project's own training, and the checkpoint callback both share
from bench_accuracy_sides import (RUNNERS, WallClockCheckpoints, check_torchmdnet, default_config,  # noqa: E402,F401
                                  expected_parameters, max_time_string, torchmdnet_recipe)


# =============================================================================================
# force-only scoring (the polymer kind): relative energies within each test family, and torchmdx's
# refit on the training energies applied to both sides' predictions (bench_accuracy_data's docstring)
def score_checkpoints_force_only(side: str, records: list, frames: dict, test_idx: np.ndarray, train_idx: np.ndarray,
                                 device, on_point=None, val_idx=None) -> list:
    """One point per checkpoint, as ``score_checkpoints`` but for force-only training: forces as
    they are; ``energy_mae`` (and per atom) of the energies with each test family's mean error
    removed (``family_centred_energies``); ``energy_mae_refit`` (and per atom) after the
    least-squares per-element correction to the training energies (``refit_energies``, which
    needs the training structures' predicted energies); ``energy_mae_raw`` as predicted.
    ``val_idx`` (the validation family): its errors by the same scorer, ``val_forces_mae`` and
    ``val_energy_mae`` / ``val_energy_mae_per_atom`` (within its family), and
    ``train_forces_mae`` (the training structures, predicted anyway for the refit), the same numbers for
    both sides (each side's own logged validation differs: torchmdx's is of the EMA weights over
    the epoch's structures, TorchMD-NET's the mean of its per-batch L1 losses)."""
    full_float32_precision()
    flat = flat_structures(frames)
    val_idx = np.zeros(0, dtype=np.int64) if val_idx is None else np.asarray(val_idx, dtype=np.int64)
    atoms = flat["offsets"][test_idx + 1] - flat["offsets"][test_idx]
    val_atoms = flat["offsets"][val_idx + 1] - flat["offsets"][val_idx]
    train_atoms = flat["offsets"][train_idx + 1] - flat["offsets"][train_idx]
    e_ref, f_ref = frames["energy"][test_idx], flat["forces"][atom_index(flat["offsets"], test_idx)]
    no_groups = frames.get("group") is None
    groups = np.zeros(len(test_idx), dtype=np.int64) if no_groups else frames["group"][test_idx]
    val_groups = np.zeros(len(val_idx), dtype=np.int64) if no_groups else frames["group"][val_idx]
    points, scored = [], {}
    for record in records:
        path = Path(record["file"])
        if record["file"] not in scored:  # the end record may repeat the last file
            # one pass over the test structures, the training ones (energies for the refit), the validation ones
            order = np.concatenate([test_idx, train_idx, val_idx])
            e_all, f_all, count = PREDICTORS[side](path, frames, order, device)
            n_test, n_train = len(test_idx), len(train_idx)
            e_pred, e_train, f_pred = e_all[:n_test], e_all[n_test:n_test + n_train], f_all[:int(atoms.sum())]
            e_refit, delta = refit_energies(frames, train_idx, e_train, test_idx, e_pred)
            centred = errors(family_centred_energies(e_pred, e_ref, groups), e_ref, f_pred, f_ref, atoms)
            refit = errors(e_refit, e_ref, f_pred, f_ref, atoms)
            raw = errors(e_pred, e_ref, f_pred, f_ref, atoms)
            centred.update({f"{k}_refit": refit[k] for k in ("energy_mae", "energy_rmse", "energy_mae_per_atom")})
            centred.update({f"{k}_raw": raw[k] for k in ("energy_mae", "energy_rmse", "energy_mae_per_atom")})
            # the training structures' forces come with their energies: the fit to the training set itself
            # (train_forces_mae), to see overfitting by the same scorer on both sides
            f_train = f_all[int(atoms.sum()):int(atoms.sum()) + int(train_atoms.sum())]
            centred["train_forces_mae"] = errors(e_train, frames["energy"][train_idx], f_train,
                                                 flat["forces"][atom_index(flat["offsets"], train_idx)],
                                                 train_atoms)["forces_mae"]
            if len(val_idx):
                e_val, f_val = e_all[n_test + n_train:], f_all[len(f_all) - int(val_atoms.sum()):]
                e_val_ref = frames["energy"][val_idx]
                val = errors(family_centred_energies(e_val, e_val_ref, val_groups), e_val_ref, f_val,
                             flat["forces"][atom_index(flat["offsets"], val_idx)], val_atoms)
                centred.update({f"val_{k}": val[k] for k in ("forces_mae", "energy_mae", "energy_mae_per_atom")})
            centred.update(parameters=int(count), refit_correction=nonzero_table(delta))
            scored[record["file"]] = centred
        point = {k: v for k, v in record.items() if k != "file"}
        point.update(scored[record["file"]])
        points.append(point)
        shown = f"  val F MAE {point['val_forces_mae']:8.2f} meV/Å" if "val_forces_mae" in point else ""
        print(f"[{side}] score t {point['t']:7.1f} s  step {point['step']:6d}  test F MAE {point['forces_mae']:8.2f} "
              f"meV/Å  E MAE within family {point['energy_mae']:8.2f} meV ({point['energy_mae_per_atom']:7.3f} "
              f"meV/atom)  after training refit {point['energy_mae_refit']:9.2f} meV{shown}", flush=True)
        if on_point is not None:
            on_point(points)
    return points


#: scorers of DATASETS[kind]["scoring"] (default: the plain scorer)
SCORERS = {"force_only": score_checkpoints_force_only}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def cmd_run(args) -> int:
    import torch

    if args.minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {args.minutes}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1 optimiser steps, got {args.max_steps}")
    if args.every_steps is not None and args.every_steps < 1:
        raise ConfigError(f"--every-steps must be >= 1 optimiser steps, got {args.every_steps}")
    if args.every <= 0:
        raise ConfigError(f"--every must be > 0 seconds, got {args.every}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here")
    if args.side == "torchmdnet":
        check_torchmdnet()
        if args.config is not None or args.label is not None:
            raise ConfigError("--config and --label choose a torchmdx model; TorchMD-NET runs its recipe")
    if args.config is not None and not Path(args.config).is_file():
        raise ConfigError(f"--config {args.config}: no such file")
    if args.label is not None and (not args.label.replace("_", "").replace("-", "").isalnum()
                                   or args.label == "torchmdnet"):
        raise ConfigError(f"--label {args.label!r}: use letters, digits, '-' and '_' (and not 'torchmdnet')")
    data_path = resolve_data(args.data)
    data_kind(data_path)  # an npz or an HDF5 file, else one line
    own_work = args.work is None
    if not own_work and Path(args.work).exists() and any(Path(args.work).iterdir()):
        raise ConfigError(f"--work {args.work} is not empty; give a new or empty folder")
    work = Path(tempfile.mkdtemp(prefix=f"bench_accuracy_{run_key(args)}_")) if own_work else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, device, data_path, work)
    finally:
        if own_work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, device: str, data_path: Path, work: Path) -> int:
    import torch

    name = data_name(data_path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    frames = load_frames(data_path, work / "cache")
    kind = frames["kind"]
    n = len(frames["energy"])
    sizes = tuple(given if given is not None else default
                  for given, default in zip((args.train, args.val, args.test), DATASETS[kind]["sizes"]))
    if DATASETS[kind].get("split") == "family" and (args.val is not None or args.test is not None):
        raise ConfigError(f"--data {args.data}: validation and test are whole families "
                          f"({', '.join(DATASETS[kind]['val_groups'])} / {', '.join(DATASETS[kind]['test_groups'])}); "
                          "--val/--test do not apply (--train N draws N training structures)")
    if args.split:
        split_file = Path(args.split)
        from torchmdx.data.splits import load_split

        split = load_split(split_file, n, frames["hash"])
    else:
        split_file = out / f"split_{name}_seed{args.seed}.npz"
        split = make_split_file(n, sizes, args.seed, split_file, frames["hash"], groups=split_groups(frames),
                                held_out=held_out_groups(frames))
    sizes = (len(split.train), len(split.val), len(split.test))
    # per-element reference energies, fitted once on the training structures, the same table for both sides
    references = reference_energies(frames, split.train) if DATASETS[kind]["references"] == "fit" else None
    budget = args.minutes * 60.0
    key = run_key(args)
    config = Path(args.config) if args.config is not None else default_config(kind)
    ctx = {"side": args.side, "run": key, "config": config, "data_path": data_path, "frames": frames,
           "split_file": split_file, "sizes": sizes, "seed": args.seed, "device": device, "small": args.small,
           "work": work, "workers": args.workers, "max_time": max_time_string(budget), "max_steps": args.max_steps,
           "torchmdx_set": args.torchmdx_set or [], "kind": kind, "references": references}
    # the recipe's parameter count holds for TorchMD-NET and torchmdx's config of the kind only
    expected = expected_parameters(kind, config, args.small)
    log_path = out / f"checkpoints_{key}.json"
    callback = WallClockCheckpoints(key, work / "checkpoints", log_path, args.every, expected, args.every_steps)
    counts = np.diff(frames["offsets"]) if "offsets" in frames else [len(frames["z"])]
    atoms = f"{min(counts)} atoms" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)} atoms"
    print(f"[{key}] data {data_path} ({n} structures of {atoms}), split {sizes} seed {args.seed} "
          f"({split_file}), budget {budget:.0f} s (max_time {ctx['max_time']})"
          f"{f', max_steps {args.max_steps}' if args.max_steps else ''}, device {device_name(device)}, "
          f"work {work}", flush=True)
    info = RUNNERS[args.side](ctx, callback)
    t_trained = time.monotonic()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    scores = {
        "side": args.side, "run": key, "label": LABELS[args.side] if key == args.side else f"torchmdx {key}",
        "config": str(config) if args.side == "torchmdx" else None, "version": info.get("version"), "data": name,
        "data_file": str(data_path), "data_hash": frames["hash"], "split_file": str(split_file),
        "split_digest": split_digest(split.train, split.val, split.test), "sizes": list(sizes), "seed": args.seed,
        "budget_s": budget, "max_time": ctx["max_time"], "max_steps": args.max_steps, "every_s": args.every,
        "every_steps": args.every_steps, "small": args.small,
        "device": device_name(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "parameters": callback.parameters, "expected_parameters": expected,
        "steps": info.get("steps"), "epochs": info.get("epochs"), "save_seconds": callback.save_seconds,
        "fit_to_train_s": (callback.t_train - callback.t_fit) if callback.t_train is not None else None,
        "train_call_s": t_trained - t_start, "kind": kind,
        "energy_references": DATASETS[kind]["references"],
        "energy_scoring": {"force_only": "energy_mae: relative within each test family (its mean error removed); "
                                         "energy_mae_refit: after the per-element refit to the training energies; "
                                         "energy_mae_raw: as predicted"}.get(DATASETS[kind].get("scoring"), "as predicted"),
        "held_out": held_out_groups(frames) if DATASETS[kind].get("split") == "family" else None,
        "atomic_references": nonzero_table(references) if references is not None else {},
        "info": info, "points": [],
    }
    records = callback.records
    if records:
        last = records[-1]
        scores.update(t_end=last["t"], t_train_end=last["t_train"],
                      steps_per_s=last["step"] / last["t_train"] if last["t_train"] > 0 else None)
    scores_path = out / f"scores_{key}.json"

    def write(points):
        scores["points"] = points
        with atomic_write(scores_path, "w") as handle:
            json.dump(scores, handle, indent=1, default=str)

    write([])
    test_idx = np.asarray(split.test, dtype=np.int64)
    scorer = DATASETS[kind].get("scoring")
    if scorer is not None:
        points = SCORERS[scorer](args.side, records, frames, test_idx, np.asarray(split.train, dtype=np.int64), device,
                                 on_point=write, val_idx=np.asarray(split.val, dtype=np.int64))
    else:
        points = score_checkpoints(args.side, records, frames, test_idx, device, on_point=write)
    scored = {p["parameters"] for p in points}
    if scored and scored != {callback.parameters}:
        print(f"[{key}] WARNING: the scored models have {sorted(scored)} parameters, the trained one "
              f"{callback.parameters}", flush=True)
    best = best_validation_record(info.get("best_checkpoint"), records)
    if best is not None:  # the model each project hands its user: its own lowest-validation checkpoint
        score = SCORERS[scorer] if scorer is not None else score_checkpoints
        extra = (np.asarray(split.train, dtype=np.int64),) if scorer is not None else ()
        more = {"val_idx": np.asarray(split.val, dtype=np.int64)} if scorer is not None else {}
        scores["best_validation"] = score(args.side, [best], frames, test_idx, *extra, device, **more)[0]
    scores["score_s"] = time.monotonic() - t_trained
    write(points)
    if points:
        p = points[-1]
        print(f"[{key}] final: {p['step']} steps in {p['t_train']:.0f} s of training "
              f"({scores.get('steps_per_s') or 0:.2f} steps/s), test F MAE {p['forces_mae']:.2f} meV/Å, "
              f"E MAE {p['energy_mae']:.2f} meV ({p['energy_mae_per_atom']:.3f} meV/atom) -> {scores_path}", flush=True)
    return 0


def best_validation_record(path, records: list):
    """A scoring record for a side's own best-validation checkpoint (``path``; None when the side
    saved none): its step and epoch read from the checkpoint, ``t`` the end of training (when the
    user gets it), kind ``best_validation``."""
    if not path or not Path(path).is_file() or not records:
        return None
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        step, epoch = int(state.get("global_step", -1)), int(state.get("epoch", -1))
    except Exception as exc:  # noqa: BLE001 - a checkpoint that does not load is reported, not fatal
        print(f"best-validation checkpoint {path} does not load ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): not scored", flush=True)
        return None
    end = records[-1]
    return {"t": end["t"], "t_train": end["t_train"], "step": step, "epoch": epoch, "kind": "best_validation",
            "save_s": 0.0, "file": str(path)}


def run_key(args) -> str:
    """The name of a run's files and report column: ``--label``, else the side."""
    return args.label if getattr(args, "label", None) else args.side


# =============================================================================================
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train one side for the budget, then score its checkpoints")
    run.add_argument("--side", choices=SIDES, required=True)
    run.add_argument("--data", default="aspirin",
                     help="aspirin | ethanol | ani1x | ani1x-large | polymer | path of an MD17-layout npz, an "
                          "ANI-1x-layout .h5 or a polymer .extxyz")
    run.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget (Lightning max_time)")
    run.add_argument("--max-steps", type=int, default=None,
                     help="stop both sides after N optimiser steps (Lightning max_steps; --minutes stays an upper "
                          "bound): a per-step comparison, e.g. on the CPU")
    run.add_argument("--every", type=float, default=30.0, help="seconds between checkpoints")
    run.add_argument("--every-steps", type=int, default=None,
                     help="checkpoints every N optimiser steps instead of every --every seconds (the same steps on "
                          "both sides)")
    run.add_argument("--out", default=os.environ.get("OUT", "bench/results/accuracy"),
                     help="small results: split file, checkpoints_<side>.json, scores_<side>.json")
    run.add_argument("--work", default=None, help="checkpoints, caches, run folders (default: a new temporary folder)")
    run.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    run.add_argument("--split", default=None, help="reuse this torchmdx split file instead of drawing one")
    run.add_argument("--train", type=int, default=None,
                     help="training structures (default: MD17 700, ANI-1x 450, ani1x-large 80 %%, polymer: all of the "
                          "training families)")
    run.add_argument("--val", type=int, default=None, help="validation structures (default: 50; ani1x-large 5 %%)")
    run.add_argument("--test", type=int, default=None, help="test structures (default: MD17 250, ANI-1x 100, ani1x-large 15 %%)")
    run.add_argument("--seed", type=int, default=0, help="split and training seed")
    run.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    run.add_argument("--workers", type=int, default=None,
                     help="data-loader workers for both sides (default: each side's recipe: TorchMD-NET 6, torchmdx's config)")
    run.add_argument("--small", action="store_true", help="32 channels, 2 layers on both sides (CPU smoke test)")
    run.add_argument("--config", default=None,
                     help="torchmdx side: this config instead of configs/et_md17.yaml (polymer: "
                          "configs/polymer_forces_only.yaml), e.g. configs/equiformer_md17.yaml")
    run.add_argument("--label", default=None,
                     help="name of this run's files and report column (default: the side), e.g. equiformer")
    run.add_argument("--torchmdx-set", action="append", metavar="KEY=VALUE",
                     help="extra torchmdx config override (repeatable), e.g. --torchmdx-set data.loader=device")
    report = sub.add_parser("report", help="table and PNG from the scores of both sides")
    report.add_argument("dirs", nargs="+", help="folders (searched recursively) or scores_<side>.json files")
    report.add_argument("--out", default=None, help="where accuracy_<data>.png/.md go (default: the first folder)")
    steps = sub.add_parser("steps", help="per-step table and PNG of runs with --max-steps/--every-steps, several seeds")
    steps.add_argument("dirs", nargs="+", help="folders (searched recursively) or scores_<run>.json files")
    steps.add_argument("--out", default=None, help="where steps_<data>.png/.md go (default: the first folder)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "report": cmd_report, "steps": cmd_steps}[args.command](args)
    except TorchmdxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from torchmdx.cli.main import run_script

    sys.exit(run_script(main))  # a TorchmdxError is one error line (torchmdx bench runs this file)
