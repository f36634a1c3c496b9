"""The model ``bench_model.py`` benchmarks, its systems and the calculator's CUDA-graph call.

- :data:`ET_MD17`: TorchMD-NET's ET-MD17 hyper-parameters (128 channels, 6 layers, 8 heads, 32
  exp-normal RBF, cutoff 5 Å, vector cutoff, float32, seed 0); :data:`EQUIFORMER_MD17`: the
  paper's MD17 Equiformer (configs/equiformer_md17.yaml); :data:`ARCHITECTURE` picks one
  (``--architecture``);
- :func:`read_xyz`: the first frame of a system's (ext)xyz file;
- :func:`make_model`: the benchmarked model on :data:`gpu_timing.DEVICE` with random weights;
- :func:`graph_call`: energy + forces as the calculator replays them on CUDA.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_timing  # noqa: E402

ET_MD17 = dict(embedding_dimension=128, num_layers=6, num_heads=8, num_rbf=32, rbf_type="expnorm", trainable_rbf=False,
               activation="silu", attn_activation="silu", neighbor_embedding=True, distance_influence="both",
               vector_cutoff=True, cutoff_lower=0.0, cutoff_upper=5.0, max_z=100, dtype="float32", seed=0)
#: Equiformer's MD17 model (Liao & Smidt 2023; configs/equiformer_md17.yaml)
EQUIFORMER_MD17 = dict(architecture="equiformer", lmax=2, channels=128, num_layers=6, num_heads=4, ffn_multiplier=3,
                       feature_channels=512, num_rbf=32, rbf_type="expnorm", radial_hidden=[64, 64],
                       nonlinear_message=True, cutoff_upper=5.0, max_z=100, dtype="float32", seed=0)
#: the benchmarked architecture (--architecture)
ARCHITECTURE = "et"
SYMBOLS = ("X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr "
           "Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe").split()


def read_xyz(path: Path):
    """(atomic numbers [N], positions [N, 3] Å, cell [3, 3] or None, pbc [3] or None) of the first
    frame of an (ext)xyz file: count line, comment line (Lattice="..." pbc="..."), symbol x y z."""
    lines = path.read_text().splitlines()
    n = int(lines[0].split()[0])
    comment = lines[1]
    z, pos = [], []
    for line in lines[2:2 + n]:
        parts = line.split()
        symbol = parts[0].capitalize()
        if symbol not in SYMBOLS:
            raise SystemExit(f"error: {path}: unknown element {parts[0]!r}")
        z.append(SYMBOLS.index(symbol))
        pos.append([float(x) for x in parts[1:4]])
    lattice = re.search(r'Lattice="([^"]+)"', comment)
    pbc = re.search(r'pbc="([^"]+)"', comment)
    cell = np.array([float(x) for x in lattice.group(1).split()]).reshape(3, 3) if lattice else None
    flags = [s.upper().startswith("T") for s in pbc.group(1).split()] if pbc else [False] * 3
    if not any(flags):
        cell = None
    return np.array(z), np.array(pos), cell, (flags if cell is not None else None)


def repeats_for(atoms: int) -> tuple:
    """(warm-up calls, timed calls) of one timing for a system of ``atoms`` atoms."""
    return (3, 50) if atoms < 1000 else (3, 20) if atoms < 10000 else (2, 10)


def apply_message_config_from_env() -> None:
    """``BENCH_MESSAGE_CONFIG`` (a JSON dict of ``LaunchConfig`` fields, e.g. ``{"filters": "gemm"}``)
    becomes ``message_triton.CONFIG``; unknown fields stop with one error line."""
    import json
    import os

    if not os.environ.get("BENCH_MESSAGE_CONFIG"):
        return
    from torchmdx.kernels import message_triton

    overrides = json.loads(os.environ["BENCH_MESSAGE_CONFIG"])
    known = message_triton.LaunchConfig.__dataclass_fields__
    if unknown := sorted(set(overrides) - set(known)):  # one line, not a TypeError traceback
        raise SystemExit(f"error: BENCH_MESSAGE_CONFIG: unknown LaunchConfig field(s) {', '.join(unknown)} "
                         f"(known: {', '.join(known)})")
    message_triton.CONFIG = message_triton.LaunchConfig(**overrides)
    print(f"message launch config: {message_triton.CONFIG}", flush=True)


def make_model(backend: str, **overrides):
    """The benchmarked model (:data:`ARCHITECTURE`) in eval mode on :data:`gpu_timing.DEVICE`;
    ``backend``: the ET's message step, ``torch`` (reference) or ``triton`` (fused)."""
    if ARCHITECTURE == "equiformer":  # one path (e3nn): the backend does not apply
        from torchmdx.nn import build_model

        return build_model({**EQUIFORMER_MD17, **overrides}).to(gpu_timing.DEVICE).eval()
    from torchmdx.nn import ETPotential

    return ETPotential({**ET_MD17, **overrides}, backend=backend).to(gpu_timing.DEVICE).eval()


def graph_call(model, z, pos, cell, pbc, traced=False, use_graph=True):
    """Energy + forces of fixed shapes as one CUDA graph, exactly as ``torchmdx.Calculator``
    replays it on CUDA (:class:`torchmdx.md.cuda_graph.GraphedForces`: fixed-capacity Triton
    neighbor list rebuilt inside the graph, model, forces): returns (replay, outputs).
    ``use_graph=False``: the same function called eagerly (tests on the CPU; the outputs are then
    those of one evaluation, not updated by ``replay``)."""
    from ase import Atoms

    from torchmdx.md.cuda_graph import GraphedForces

    atoms = Atoms(numbers=z.cpu().numpy(), positions=pos.double().cpu().numpy(),
                  cell=None if cell is None else cell.double().cpu().numpy(),
                  pbc=False if pbc is None else pbc.cpu().numpy())
    graphed = GraphedForces(model, atoms, pos.device, pos.dtype, traced=bool(traced), use_graph=use_graph)
    if traced == "nosmall":  # the traced graph without small products as reductions
        graphed.forcefield.traced.small = False
    elif isinstance(traced, dict):  # inductor options; "frontend": "dynamo" / "inductor" (nn.traced.FRONTENDS);
        options = dict(traced)      # "small_output" / "small_rows" / "small_row_inner": which products become reductions
        for key in ("small_output", "small_rows", "small_row_inner"):
            if key in options:
                setattr(graphed.forcefield.traced, key, options.pop(key))
        frontend = options.pop("frontend", None)
        if frontend is not None:
            graphed.forcefield.traced.frontend = frontend
        if options or frontend is None:
            graphed.forcefield.traced.options = options
    graphed(pos)  # builds, captures, replays once
    outputs = graphed.outputs if use_graph else graphed._run()  # torchmdx.md.cuda_graph.ForceOutputs
    energy, forces, overflow = outputs.energy, outputs.forces, outputs.overflow

    def replay():  # holds ``graphed``: the graph reads its static buffers at every replay
        if use_graph:
            graphed.graph.replay()
        else:
            graphed(pos)

    return replay, (energy, forces, overflow)
