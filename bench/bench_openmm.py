"""MD speed side by side (issue 23, item 4): OpenMM + torchmdx vs torchmdx's native engine vs
TorchMD-NET through openmm-torch, for alanine dipeptide (22 atoms) and chignolin (166 atoms).

Rows per system (NVE, Verlet, dt 0.5 fs, velocities from 300 K, same ET size for all):
  openmm-torchforce   OpenMM's CUDA (or CPU) platform, torchmdx's TorchScript module in a TorchForce
  openmm-pythonforce  OpenMM + openmm.PythonForce calling the same module (the path that works with
                      torchmdx's pinned torch 2.13.0)
  native              torchmdx's own engine (CUDA graphs and compile on a GPU: its defaults)
  torchmdnet-torchforce  TorchMD-NET 3.0 ET of the same size, TorchScript, in a TorchForce
A row that cannot run here says why (e.g. openmm-torch does not load beside this torch).

Environment: openmm-torch's only PyPI wheel (openmmtorch 1.5) is linked against the CUDA build of
torch 2.9.0, so the TorchForce rows need that torch (docs/openmm.md "An environment for
TorchForce"), e.g. on the GPU machine:

    python3 -m venv /tmp/omm && /tmp/omm/bin/pip install torch==2.9.0 openmm[cuda12]==8.6.1 openmmtorch[cuda12]==1.5 \\
        openmmml==1.8 ase==3.29.0 pyyaml==6.0.4 e3nn==0.6.0 h5py==3.16.0
    /tmp/omm/bin/pip install --no-deps .whl/torchmd_net-3.0.0-py3-none-any.whl && export PYTHONPATH=$PWD
    /tmp/omm/bin/python bench/bench_openmm.py --device cuda --json bench_openmm.json

On this CPU-only machine: ``--device cpu --platform CPU --steps 20`` checks that every row runs.
The speed of a potential does not depend on its weights: random models (energies scaled to an RMS
force of 1 eV/Å, as bench_md.py does) stand in for trained ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ROWS = ["openmm-torchforce", "openmm-pythonforce", "native", "torchmdnet-torchforce"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--platform", help="OpenMM platform (default: CUDA with --device cuda, else CPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--systems", nargs="*", default=["alanine_dipeptide", "chignolin"])
    p.add_argument("--rows", nargs="*", default=ROWS, choices=ROWS)
    p.add_argument("--embedding-dimension", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=500, help="timed steps per repetition")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions; the best is reported")
    p.add_argument("--skin", type=float, default=0.5, help="native engine's Verlet skin (Å)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "systems"))
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def torchmdx_model(args, atoms):
    import torch

    import torchmdx
    from bench_md import tame

    model = torchmdx.build_model({"embedding_dimension": args.embedding_dimension, "num_layers": args.num_layers,
                                  "cutoff_upper": args.cutoff, "vector_cutoff": True, "seed": 0, "dtype": "float64"})
    model = tame(model.eval(), atoms)
    return model.to(dtype=getattr(torch, args.dtype))


def time_openmm(system, positions_nm, args):
    """Best steps/s of OpenMM's VerletIntegrator (0.5 fs) on ``system``."""
    import openmm

    platform = openmm.Platform.getPlatformByName(args.platform)
    integrator = openmm.VerletIntegrator(0.0005)
    context = openmm.Context(system, integrator, platform)
    context.setPositions(positions_nm)
    context.setVelocitiesToTemperature(300.0, 1)
    integrator.step(args.warmup)
    context.getState(getEnergy=True)
    best = 0.0
    for _ in range(args.repeat):
        start = time.perf_counter()
        integrator.step(args.steps)
        context.getState(getEnergy=True)  # waits for the device
        best = max(best, args.steps / (time.perf_counter() - start))
    return best


def masses_system(atoms):
    import openmm

    system = openmm.System()
    for m in atoms.get_masses():
        system.addParticle(float(m))
    return system


def row_torchmdx_openmm(args, atoms, model, implementation):
    from torchmdx import units
    from torchmdx.openmm.export import build_module, with_atoms
    from torchmdx.openmm.forces import create_python_force, create_torch_force

    module = build_module(model, forces="autograd", device=args.device)
    with_atoms(module, atoms.numbers.tolist())
    system = masses_system(atoms)
    if implementation == "torchforce":
        system.addForce(create_torch_force(module, periodic=False))
    else:
        system.addForce(create_python_force(module, periodic=False, device=args.device))
    return time_openmm(system, atoms.positions * units.ANGSTROM_TO_NM, args)


def row_native(args, atoms, model):
    from bench_md import time_native

    native_args = argparse.Namespace(device=args.device, dtype=args.dtype, skin=args.skin, warmup=args.warmup,
                                     steps=args.steps, repeat=args.repeat)
    return time_native(model, [atoms], native_args)[0]


def row_torchmdnet(args, atoms):
    """TorchMD-NET's ET (same sizes, random weights) as TorchScript in a TorchForce."""
    import tempfile

    import torch
    from torchmdnet.models.model import create_model

    from torchmdx import units
    from torchmdx.openmm.forces import import_openmmtorch

    openmmtorch = import_openmmtorch()
    # TorchMD-NET's ET-MD17 defaults (torchmd-train's), the sizes of the torchmdx rows
    hp = dict(model="equivariant-transformer", embedding_dimension=args.embedding_dimension, num_layers=args.num_layers,
              num_rbf=32, rbf_type="expnorm", trainable_rbf=False, activation="silu", attn_activation="silu",
              neighbor_embedding=True, num_heads=8, distance_influence="both", cutoff_lower=0.0, cutoff_upper=args.cutoff,
              max_z=100, max_num_neighbors=64, reduce_op="add", output_model="Scalar", prior_model=None,
              derivative=False, atom_filter=-1, precision=64 if args.dtype == "float64" else 32, box_vecs=None,
              static_shapes=False, check_errors=True, vector_cutoff=True, equivariance_invariance_group="O(3)")
    net = create_model(hp).to(args.device).eval()
    class Wrapper(torch.nn.Module):  # attribute types inferred (this file has postponed annotations)
        def __init__(self, net, z, single):
            super().__init__()
            self.net = net
            self.register_buffer("z", z)
            self.register_buffer("batch", torch.zeros_like(z))
            self.single, self.length, self.energy = single, units.NM_TO_ANGSTROM, units.EV_TO_KJ_PER_MOL

        def forward(self, positions):
            pos = positions * self.length
            pos = pos.float() if self.single else pos.double()
            energy = self.net(self.z, pos, self.batch)[0]
            return energy.sum().double() * self.energy

    z = torch.tensor(atoms.numbers, dtype=torch.long, device=args.device)
    module = torch.jit.script(Wrapper(net, z, args.dtype == "float32"))
    path = Path(tempfile.mkdtemp()) / "torchmdnet.pt"
    module.save(str(path))
    system = masses_system(atoms)
    system.addForce(openmmtorch.TorchForce(str(path)))
    return time_openmm(system, atoms.positions * units.ANGSTROM_TO_NM, args)


def main(argv=None):
    args = parse_args(argv)
    args.platform = args.platform or ("CUDA" if args.device.startswith("cuda") else "CPU")
    import torch
    from ase.io import read

    from torchmdx.openmm.forces import openmm_status

    status = openmm_status()
    print(f"torch {torch.__version__}, {status}, device {args.device}, OpenMM platform {args.platform}, dtype {args.dtype}")
    results = []
    for name in args.systems:
        atoms = read(Path(args.data) / f"{name}.xyz")
        model = torchmdx_model(args, atoms)
        for row in args.rows:
            try:
                if row == "openmm-torchforce":
                    value = row_torchmdx_openmm(args, atoms, model, "torchforce")
                elif row == "openmm-pythonforce":
                    value = row_torchmdx_openmm(args, atoms, model, "python")
                elif row == "native":
                    value = row_native(args, atoms, model)
                else:
                    value = row_torchmdnet(args, atoms)
                note = ""
            except Exception as exc:  # noqa: BLE001 - a row that cannot run says why
                value, note = None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:160]
            ns_day = value * 0.5e-6 * 86400 if value else None
            results.append({"system": name, "atoms": len(atoms), "row": row, "steps_per_s": value, "ns_per_day": ns_day,
                            "note": note})
            shown = f"{value:10.1f} steps/s {ns_day:8.2f} ns/day" if value else f"{'n/a':>10}  {note}"
            print(f"{name:>18} {len(atoms):5d} atoms  {row:<22} {shown}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "status": status, "torch": torch.__version__,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
