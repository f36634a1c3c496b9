"""MD speed side by side (issue 23, item 4): OpenMM + torchmdx vs torchmdx's native engine vs
TorchMD-NET in OpenMM, for alanine dipeptide (22 atoms) and chignolin (166 atoms).

Rows per system (NVE, Verlet, dt 0.5 fs, velocities from 300 K, the same ET size for every model):
  native                  torchmdx's own engine (on a GPU its defaults: compiled model, CUDA graph per step)
  openmm-pythonforce@P    OpenMM (platform P) + openmm-ml ``MLPotential("torchmdx", implementation="python")``
                          with its defaults (fastPath): an ``openmm.PythonForce`` evaluating the model through
                          torchmdx's own fast path on ``--device`` (the Calculator's: on CUDA one CUDA-graph replay
                          per step, neighbor list rebuilt on the device, compiled model; torchmdx/openmm/fast.py)
  openmm-pythonforce-script@P  the same PythonForce with ``fastPath=False``: torchmdx's exported TorchScript module,
                          called eagerly with float64 positions and autograd (what openmm-pythonforce measured
                          until 2026-12-06, docs/benchmarks/2026-12-06-h100-c)
  openmm-torchforce@P     the TorchScript module in openmm-torch's ``TorchForce`` (MLPotential, implementation="torchforce")
  torchmdnet-pythonforce@P  TorchMD-NET 3.0's ET (TorchScript) in an ``openmm.PythonForce``: TorchMD-NET on
                          the same OpenMM path as torchmdx's openmm-pythonforce-script row
  torchmdnet-torchforce@P TorchMD-NET 3.0's ET (TorchScript) in openmm-torch's ``TorchForce``
P: each of ``--platforms`` (default ``CPU CUDA`` with ``--device cuda``, else ``CPU``). A row that
cannot run here is skipped with one line saying why (openmm-torch absent or built for another torch,
an OpenMM platform whose plugin did not load, torchmdnet not importable); a row that fails or
exceeds ``--row-timeout`` says so; the table is printed either way (markdown) and written to --json.

On the GPU machine (torch 2.11 CUDA 13, Python 3.12; wheels openmm 8.6.1 + openmm-cuda-13 8.6.1 +
openmmml 1.8 + torchmd-net 3.0.0 carried in .whl/):

    OUT=/tmp/o bash bench/gpu_session.sh openmm      # = bench/bench_openmm.py --device cuda --data .benchdata ...

openmm-torch's only PyPI wheel (openmmtorch 1.5) is linked against the CUDA 12.8 build of torch
2.9.0 (docs/openmm.md), so on that machine the two TorchForce rows are skipped; in a torch 2.9.0
environment (docs/openmm.md, "An environment for TorchForce") every row runs.

Each row runs in its own process (``--isolate``, the default on CUDA) under ``--row-timeout``: a
crash or hang in a plug-in costs that row only. ``--budget-s`` caps each row's timed part (the timed
steps are cut to fit from a short probe). On a CPU machine, as a smoke test (not a measurement):
``--device cpu --embedding-dimension 32 --num-layers 2 --steps 10 --warmup 2 --repeat 1``.
The speed of a potential does not depend on its weights: random models (energies scaled to an
RMS force of 1 eV/Å, as bench_md.py does) stand in for trained ones.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ROWS = ["native", "openmm-pythonforce", "openmm-pythonforce-script", "openmm-torchforce", "torchmdnet-pythonforce",
        "torchmdnet-torchforce"]
#: rows that run inside OpenMM (one per platform)
OPENMM_ROWS = [r for r in ROWS if r != "native"]
TIMESTEP_FS = 0.5
#: timed steps of the probe that sizes a budgeted measurement
PROBE_STEPS = 5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="torch device of the models")
    p.add_argument("--platforms", nargs="*", help="OpenMM platforms (default: CPU CUDA with --device cuda, else CPU)")
    p.add_argument("--platform", help=argparse.SUPPRESS)  # the old single-platform option
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--systems", nargs="*", default=["alanine_dipeptide", "chignolin"])
    p.add_argument("--rows", nargs="*", default=ROWS, choices=ROWS)
    p.add_argument("--embedding-dimension", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=500, help="timed steps per repetition (at most)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions; the best is reported")
    p.add_argument("--budget-s", type=float, default=20.0, help="about this many seconds of timed steps per row (0: no cap)")
    p.add_argument("--skin", type=float, default=0.5, help="native engine's Verlet skin (Å)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each row in its own process (default: on with a CUDA device)")
    p.add_argument("--row-timeout", type=float, default=150.0, help="seconds per isolated row, set-up included")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="skip the rows that would start after this many seconds (the table is printed either way)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "systems"))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one row described by this JSON file
    args = p.parse_args(argv)
    if args.platforms is None:
        args.platforms = [args.platform] if args.platform else (["CPU", "CUDA"] if args.device.startswith("cuda") else ["CPU"])
    if args.isolate is None:
        args.isolate = args.device.startswith("cuda")
    if not args.budget_s or args.budget_s <= 0:
        args.budget_s = None
    return args


# ---------------------------------------------------------------------------------------- models
def torchmdx_model(args, atoms):
    import torch

    import torchmdx
    from bench_md import tame

    model = torchmdx.build_model({"embedding_dimension": args.embedding_dimension, "num_layers": args.num_layers,
                                  "cutoff_upper": args.cutoff, "vector_cutoff": True, "seed": 0, "dtype": "float64"})
    model = tame(model.eval(), atoms)
    return model.to(dtype=getattr(torch, args.dtype))


def torchmdnet_module(args, atoms):
    """TorchMD-NET 3.0's ET (the torchmdx rows' sizes, random weights, energies scaled to an RMS
    force of 1 eV/Å) as a TorchScript module: positions [N, 3] in nm -> energy in kJ/mol; and
    "torchscript", or the eager module and why it is not scripted."""
    import torch
    from torchmdnet.models.model import create_model

    from torchmdx import units

    # TorchMD-NET's ET-MD17 defaults (torchmd-train's), the sizes of the torchmdx rows
    hp = dict(model="equivariant-transformer", embedding_dimension=args.embedding_dimension, num_layers=args.num_layers,
              num_rbf=32, rbf_type="expnorm", trainable_rbf=False, activation="silu", attn_activation="silu",
              neighbor_embedding=True, num_heads=8, distance_influence="both", cutoff_lower=0.0, cutoff_upper=args.cutoff,
              max_z=100, max_num_neighbors=64, reduce_op="add", output_model="Scalar", prior_model=None,
              derivative=False, atom_filter=-1, precision=64 if args.dtype == "float64" else 32, box_vecs=None,
              static_shapes=False, check_errors=True, vector_cutoff=True, equivariance_invariance_group="O(3)")
    torch.manual_seed(0)
    net = create_model(hp).to(args.device).eval()
    for prm in net.parameters():
        prm.requires_grad_(False)

    class Wrapper(torch.nn.Module):  # attribute types inferred (this file has postponed annotations)
        def __init__(self, net, z, single):
            super().__init__()
            self.net = net
            self.register_buffer("z", z)
            self.register_buffer("batch", torch.zeros_like(z))
            self.single, self.length, self.energy_unit = single, units.NM_TO_ANGSTROM, units.EV_TO_KJ_PER_MOL
            self.scale = 1.0

        def forward(self, positions):
            pos = positions * self.length
            pos = pos.float() if self.single else pos.double()
            energy = self.net(self.z, pos, self.batch)[0]
            return energy.sum().double() * (self.energy_unit * self.scale)

        @torch.jit.export
        def energy(self, positions, box: Optional[torch.Tensor] = None):
            """torchmdx's exported-module signature, so that the PythonForce row runs through
            the same computation class as torchmdx's (no box: the rows are molecules)."""
            return self.forward(positions)

    z = torch.tensor(atoms.numbers, dtype=torch.long, device=args.device)
    wrapper = Wrapper(net, z, args.dtype == "float32")
    pos = torch.tensor(atoms.positions * units.ANGSTROM_TO_NM, dtype=torch.float64, device=args.device, requires_grad=True)
    (grad,) = torch.autograd.grad(wrapper(pos), pos)  # kJ/mol/nm
    rms = float((grad / (units.EV_TO_KJ_PER_MOL * units.NM_TO_ANGSTROM)).std())  # eV/Å
    wrapper.scale = 1.0 / rms if len(atoms) > 1 and rms > 0 else 1.0
    try:
        return torch.jit.script(wrapper), "torchscript"
    except Exception as exc:  # noqa: BLE001 - a PythonForce can call the eager module; a TorchForce cannot
        return wrapper, f"eager (torch.jit.script failed: {one_line(exc)[:120]})"


# ---------------------------------------------------------------------------------------- OpenMM
def torchforce_problem(torch_version: str):
    """None when openmm-torch's TorchForce can be used here, else why not (one line)."""
    from torchmdx.openmm.forces import openmmtorch_problem

    problem = openmmtorch_problem()
    if problem is None:
        return None
    if problem.startswith("openmmtorch is not installed"):
        return (f"openmm-torch is not installed: its only wheel (openmmtorch 1.5) is built against torch 2.9.0 "
                f"(CUDA 12.8) and cannot load beside torch {torch_version}")
    return problem


def platform_problem(name: str):
    """None when OpenMM's platform ``name`` is there, else why not (one line)."""
    try:
        import openmm
    except ImportError as exc:
        return f"openmm is not importable ({str(exc).splitlines()[0] if str(exc) else 'ImportError'})"
    names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if name in names:
        return None
    failures = [f for f in openmm.Platform.getPluginLoadFailures() if name.lower() in f.lower()]
    why = f"; plugin load failure: {failures[0].strip()[:200]}" if failures else ""
    return f"OpenMM {openmm.__version__} has no {name} platform here (platforms: {', '.join(names)}){why}"


def time_openmm(system, positions_nm, platform_name, args):
    """Best steps/s of OpenMM's VerletIntegrator (0.5 fs) on ``system``; also the timed steps."""
    import openmm

    platform = openmm.Platform.getPlatformByName(platform_name)
    properties = {"Precision": "mixed"} if platform_name in ("CUDA", "OpenCL", "HIP") else {}
    integrator = openmm.VerletIntegrator(TIMESTEP_FS * 1e-3)
    context = openmm.Context(system, integrator, platform, properties)
    context.setPositions(positions_nm)
    context.setVelocitiesToTemperature(300.0, 1)
    integrator.step(args.warmup)
    context.getState(getEnergy=True)  # waits for the device
    steps = args.steps
    if args.budget_s is not None:
        start = time.perf_counter()
        integrator.step(PROBE_STEPS)
        context.getState(getEnergy=True)
        rate = PROBE_STEPS / (time.perf_counter() - start)
        steps = int(max(10, min(args.steps, rate * args.budget_s / max(args.repeat, 1))))
    best = 0.0
    for _ in range(args.repeat):
        start = time.perf_counter()
        integrator.step(steps)
        state = context.getState(getEnergy=True)
        best = max(best, steps / (time.perf_counter() - start))
    energy = state.getPotentialEnergy()._value + state.getKineticEnergy()._value
    if energy != energy:
        raise FloatingPointError("the total energy is NaN")
    return best, steps


def masses_system(atoms):
    import openmm

    system = openmm.System()
    for m in atoms.get_masses():
        system.addParticle(float(m))
    return system


def topology_of(atoms):
    """An OpenMM Topology of ``atoms``: one residue, elements from the atomic numbers."""
    from openmm import app

    topology = app.Topology()
    residue = topology.addResidue("MOL", topology.addChain())
    for i, (z, symbol) in enumerate(zip(atoms.numbers, atoms.get_chemical_symbols())):
        topology.addAtom(f"{symbol}{i + 1}", app.Element.getByAtomicNumber(int(z)), residue)
    return topology


def ml_potential(path, **options):
    """openmm-ml's ``MLPotential("torchmdx")``; registered by hand where torchmdx is on the path but
    not installed (no entry point, as on the GPU machine)."""
    from openmmml import MLPotential

    if "torchmdx" not in MLPotential._implFactories:
        from torchmdx.openmm.mlpotential import TorchmdxPotentialImplFactory

        MLPotential.registerImplFactory("torchmdx", TorchmdxPotentialImplFactory())
    return MLPotential("torchmdx", modelPath=str(path), **options)


# ---------------------------------------------------------------------------------------- rows
def run_row(args, name, row, platform):
    """steps/s (and extra fields) of one row on one system, in this process."""
    from ase.io import read

    from torchmdx import units

    atoms = read(Path(args.data) / f"{name}.xyz")
    positions_nm = atoms.positions * units.ANGSTROM_TO_NM
    if row == "native":
        from bench_md import time_native

        native_args = argparse.Namespace(device=args.device, dtype=args.dtype, skin=args.skin, warmup=args.warmup,
                                         steps=args.steps, repeat=args.repeat, budget_s=args.budget_s)
        rate, builds = time_native(torchmdx_model(args, atoms), [atoms], native_args)
        return {"steps_per_s": rate, "neighbor_list_builds": builds}
    if row.startswith("openmm-"):
        options = {"implementation": "torchforce"}
        if row.startswith("openmm-pythonforce"):  # the fast path (default) or the TorchScript module
            options = {"implementation": "python", "fastPath": row == "openmm-pythonforce"}
        model = torchmdx_model(args, atoms)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt"
            model.save(path)
            potential = ml_potential(path, device=args.device, dtype=args.dtype, **options)
            system = potential.createSystem(topology_of(atoms), removeCMMotion=False)
        rate, steps = time_openmm(system, positions_nm, platform, args)
        return {"steps_per_s": rate, "timed_steps": steps}
    module, kind = torchmdnet_module(args, atoms)
    system = masses_system(atoms)
    if row == "torchmdnet-pythonforce":
        import openmm

        from torchmdx.openmm.forces import PythonForceComputation  # the computation of openmm-pythonforce-script

        system.addForce(openmm.PythonForce(PythonForceComputation(module, periodic=False, device=args.device), {}))
    else:
        from torchmdx.openmm.forces import import_openmmtorch

        openmmtorch = import_openmmtorch()
        if kind != "torchscript":
            raise RuntimeError(f"TorchMD-NET's module is {kind}; a TorchForce needs TorchScript")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "torchmdnet.pt"
            module.save(str(path))
            system.addForce(openmmtorch.TorchForce(str(path)))
    rate, steps = time_openmm(system, positions_nm, platform, args)
    return {"steps_per_s": rate, "timed_steps": steps, "torchmdnet_module": kind}


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:240]


def run_isolated(args, name, row, platform, timeout):
    """``run_row`` in a child process, killed after ``timeout`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"args": vars(args), "system": name, "row": row, "platform": platform,
                                    "result": str(result)}))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec)]
        try:
            proc = subprocess.run(cmd, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"steps_per_s": None, "note": f"failed: timed out after {timeout:.0f} s (--row-timeout, --time-limit-s)"}
        if result.is_file():
            return json.loads(result.read_text())
        return {"steps_per_s": None, "note": f"failed: the row's process exited with code {proc.returncode} and no result"}


def child(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    args = argparse.Namespace(**spec["args"])
    try:
        out = run_row(args, spec["system"], spec["row"], spec["platform"])
    except Exception as exc:  # noqa: BLE001 - a row that cannot run says why
        out = {"steps_per_s": None, "note": "failed: " + one_line(exc)}
    tmp = Path(spec["result"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, spec["result"])
    return 0


# ---------------------------------------------------------------------------------------- table
def ns_per_day(steps_per_s):
    return steps_per_s * TIMESTEP_FS * 1e-6 * 86400 if steps_per_s else None


def table(results, systems, labels, atoms):
    """Markdown table: one line per row label, a column per system (steps/s, ns/day), then the
    reason of each skipped or failed cell."""
    cell = {(r["label"], r["system"]): r for r in results}
    head = "| row | " + " | ".join(f"{s} ({atoms.get(s, '?')} atoms): steps/s, ns/day" for s in systems) + " |"
    lines = [head, "|---|" + "---|" * len(systems)]
    notes = []
    for label in labels:
        cells = []
        for s in systems:
            r = cell.get((label, s))
            if r is None:
                cells.append("-")
            elif r["steps_per_s"]:
                cells.append(f"{r['steps_per_s']:.1f}, {r['ns_per_day']:.2f}")
            else:
                cells.append("skipped" if r["note"].startswith("skipped") else "failed")
                if (label, r["note"]) not in notes:
                    notes.append((label, r["note"]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [f"- {label}: {note}" for label, note in notes]
    return "\n".join(lines)


def _terminated(signum, frame):
    raise KeyboardInterrupt


def measure(args, name, n_atoms, label, row, platform, problems, deadline):
    """One cell: skipped (with the reason known beforehand, no time left, or the row timed out on
    an earlier system), or measured."""
    skip = problems.get(platform) if platform else None
    if skip is None:
        skip = problems.get(label)
    if skip is None and row.endswith("torchforce"):
        skip = problems["torchforce"]
    if skip is None and row.startswith("torchmdnet"):
        skip = problems["torchmdnet"]
    left = deadline - time.monotonic() if deadline is not None else None
    if skip is None and left is not None and left < 15:
        skip = f"out of time (--time-limit-s {args.time_limit_s:.0f})"
    start = time.perf_counter()
    if skip is not None:
        out = {"steps_per_s": None, "note": f"skipped: {skip}"}
    elif args.isolate:
        out = run_isolated(args, name, row, platform, timeout=min(args.row_timeout, left) if left else args.row_timeout)
    else:
        try:
            out = run_row(args, name, row, platform)
        except Exception as exc:  # noqa: BLE001 - a row that cannot run says why
            out = {"steps_per_s": None, "note": "failed: " + one_line(exc)}
    out.setdefault("note", "")
    return {"system": name, "atoms": n_atoms, "label": label, "row": row, "platform": platform, **out,
            "ns_per_day": ns_per_day(out["steps_per_s"]), "wall_s": round(time.perf_counter() - start, 1)}


def write_json(path, payload):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args.child)
    start = time.monotonic()
    import torch
    from ase.io import read

    from torchmdx.openmm.forces import openmm_status

    status = openmm_status()
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else None
    print(f"torch {torch.__version__}, openmm {status.get('openmm')}, openmmml {status.get('openmmml')}, "
          f"openmmtorch {status.get('openmmtorch')}; device {args.device}{f' ({gpu})' if gpu else ''}, OpenMM platforms "
          f"{' '.join(args.platforms)}, dtype {args.dtype}, ET {args.embedding_dimension}x{args.num_layers}, "
          f"cutoff {args.cutoff} Å, NVE {TIMESTEP_FS} fs, isolate {args.isolate}", flush=True)
    # reasons known before running anything
    problems = {"torchforce": torchforce_problem(torch.__version__)}
    for platform in args.platforms:
        problems[platform] = platform_problem(platform)
    try:
        import torchmdnet  # noqa: F401

        problems["torchmdnet"] = None
    except Exception as exc:  # noqa: BLE001
        problems["torchmdnet"] = f"torchmdnet is not importable ({one_line(exc)})"

    plan = []  # (label, row, platform)
    for row in args.rows:
        for platform in ([None] if row == "native" else args.platforms):
            plan.append((row if platform is None else f"{row}@{platform}", row, platform))
    labels = [label for label, _, _ in plan]
    results = []
    atoms_of = {name: len(read(Path(args.data) / f"{name}.xyz")) for name in args.systems}
    deadline = start + args.time_limit_s if args.time_limit_s else None
    previous = signal.signal(signal.SIGTERM, _terminated)  # `timeout`: stop the row in flight, still print the table
    try:
        for label, row, platform in plan:  # rows outer: every system of the first rows before the later rows
            for name in args.systems:
                results.append(measure(args, name, atoms_of[name], label, row, platform, problems, deadline))
                r = results[-1]
                if r["note"].startswith("failed: timed out"):  # a hang: spare the other systems the same wait
                    problems[label] = f"timed out on {name}"
                shown = (f"{r['steps_per_s']:10.1f} steps/s {r['ns_per_day']:8.2f} ns/day" if r["steps_per_s"]
                         else f"{'n/a':>10}  {r['note']}")
                print(f"{name:>18} {atoms_of[name]:5d} atoms  {label:<30} {shown}   ({r['wall_s']} s)", flush=True)
                if args.json:
                    write_json(args.json, {"args": vars(args), "status": status, "gpu": gpu, "results": results})
    except KeyboardInterrupt:
        print("# stopped (SIGTERM or interrupt): the table has the rows measured so far", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() called from Python (tests) leaves the process as it was
    print()
    print(table(results, args.systems, labels, atoms_of), flush=True)
    if args.json:
        write_json(args.json, {"args": vars(args), "status": status, "gpu": gpu, "results": results,
                               "table": table(results, args.systems, labels, atoms_of)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
