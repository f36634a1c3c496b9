"""MD speed: the native engine vs an ASE loop (VelocityVerlet + torchmdx.Calculator), same model.

    .venv/bin/python bench/bench_md.py                       # CPU, systems up to 2 500 atoms
    .venv/bin/python bench/bench_md.py --device cuda         # GPU, every system
    .venv/bin/python bench/bench_md.py --model model.pt --systems alanine_dipeptide chignolin

For each structure of ``../shared/data/systems`` both engines run NVE (dt 0.5 fs, velocities
from 300 K) with the same model, after warm-up steps; the table gives steps/s, the speed-up of
the native engine and ns/day. ``--replicas R`` adds a row per system where R copies run as one
batch (molecule-steps/s = R × steps/s). Without ``--model`` a randomly initialised ET with
TorchMD-NET's MD17 hyper-parameters (or the sizes given) is used: the speed of a potential
does not depend on its weights, and random weights give large forces, so the temperature limit
is lifted and a run that still blows up is reported as such.

On a GPU, ``tmdnet_ase`` adds TorchMD-NET 3.0.0's ASE loop side by side (its ET with the same
MD17 hyper-parameters and random weights, driven by ASE's VelocityVerlet through a minimal
calculator, as ``../shared/bench/anchor_torchmdnet.py`` runs it; skipped when ``torchmdnet`` is
not importable). ``native`` is the engine as users get it (``fuse_integrator="auto"``: on CUDA the
integrator's element-wise work is compiled, issue 16 item 5); ``native_unfused`` (only when asked
for, GPU) the same with the eager integrator (``fuse_integrator=False``), for comparison;
``--ensemble`` picks the native engine's integrator. ``--variants`` picks the measurements; ``--budget-s S`` makes every measurement
finish in about S seconds (the warm-up steps stay, the timed steps are cut to fit from a short
probe); the JSON is rewritten after every system, so a run stopped by a timeout keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the measurements of one system (``--variants``); the native_* / ase_eager / tmdnet_ase ones only on a GPU
VARIANTS = ("native_eager", "native_graph_uncompiled", "native", "native_unfused", "native_other", "ase", "ase_eager",
            "tmdnet_ase")

SYSTEMS = [
    "alanine_dipeptide", "caffeine", "testosterone", "chignolin", "alanine_dipeptide_solvated",
    "dhfr", "factorIX", "stmv",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--model", help="model file (default: a random ET)")
    p.add_argument("--embedding-dimension", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--cutoff", type=float, default=5.0)
    p.add_argument("--systems", nargs="*", help=f"names (default: all up to --max-atoms): {', '.join(SYSTEMS)}")
    p.add_argument("--max-atoms", type=int, help="skip larger systems (default: 2500 on the CPU, none on a GPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per engine")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions; the best is reported")
    p.add_argument("--replicas", type=int, default=0, help="also time R replicas in one batch (native)")
    p.add_argument("--skin", type=float, default=0.5)
    p.add_argument("--ensemble", default="nve", choices=("nve", "langevin", "bussi", "nose-hoover"),
                   help="the native engine's integrator (ASE columns: velocity Verlet)")
    p.add_argument("--replica-compile", default="auto", help="compile mode of the replica rows (auto, whole, parts, off)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "systems"))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated measurements (default: all that apply): {','.join(VARIANTS)}")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds per measurement after its warm-up: timed steps are cut to fit (default: --steps)")
    p.add_argument("--small-row-inner", type=int, default=None,
                   help="whole graph: products of few rows are rewritten as reductions only up to this inner "
                        "dimension (torchmdx.nn.traced.SMALL_ROW_INNER; default: its value)")
    p.add_argument("--plain-epilogue", action="store_true",
                   help="captured step: the non-finite check and the static copies op by op "
                        "(torchmdx.md.cuda_graph.FUSED_EPILOGUE False), for an A/B")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="CUDA: after the native timing, profile this many steps (torch.profiler) and print every "
                        "kernel's GPU time per step, the GPU's busy time per step and the wall time per step")
    return p.parse_args(argv)


def load_model(args):
    import torchmdx

    if args.model:
        return torchmdx.load_model(args.model)
    return torchmdx.build_model({
        "embedding_dimension": args.embedding_dimension, "num_layers": args.num_layers,
        "cutoff_upper": args.cutoff, "seed": 0,
    })


def tame(model, atoms, target_rms_force=1.0):
    """Scale a random model's energies so that its RMS force on ``atoms`` is ``target_rms_force``
    (eV/Å), as for a trained model near equilibrium. Raw random weights give forces of tens of
    eV/Å: the system heats within steps and the Verlet list is rebuilt every other step, which
    measures a regime no production run is in."""
    import torch

    with torch.no_grad():
        rms = float(model.predict(atoms)["forces"].std()) if len(atoms) > 1 else 1.0
        if rms > 0 and hasattr(model, "scale"):
            model.scale.mul_(target_rms_force / rms)
    return model


def time_native(model, structures, args, cuda_graph=None, compile=None, fuse_integrator="auto", profile=None):
    """Best steps/s of the native engine; ``cuda_graph`` / ``compile`` None = the engine's
    defaults (on CUDA: a CUDA graph per step, compile "auto"), False = off; ``compile`` also
    "whole" or "parts" (torchmdx.nn.traced.COMPILE_MODES); ``fuse_integrator``: the integrator's
    element-wise work compiled (``Simulation(fuse_integrator=...)``, torchmdx.md.integrators_fused).
    ``profile``: a dict that receives :func:`profile_steps`' table (``--profile-steps``) after the timing."""
    import torch

    from torchmdx.md.engine import Simulation

    sim = Simulation(model, structures, timestep_fs=0.5, ensemble=getattr(args, "ensemble", "nve"), temperature_K=300.0,
                     device=args.device, dtype=getattr(torch, args.dtype), seed=0, skin=args.skin, max_temperature_K=1e12,
                     cuda_graph=cuda_graph, compile=compile, fuse_integrator=fuse_integrator)
    sim.initialize()
    sim.run(args.warmup, every=max(1, args.warmup))
    steps = args.steps
    if args.budget_s is not None:
        probe = sim.run(PROBE_STEPS, every=PROBE_STEPS)
        steps = budget_steps(probe.steps_per_s, args)
    best, builds = 0.0, 0
    for _ in range(args.repeat):
        summary = sim.run(steps, every=steps)
        best, builds = max(best, summary.steps_per_s), builds + summary.neighbor_list_builds
    if profile is not None and getattr(args, "profile_steps", 0) > 0 and args.device.startswith("cuda"):
        profile.update(profile_steps(sim, args.profile_steps))
    return best, builds


def profile_steps(sim, steps: int) -> dict:
    """Where an MD step's time goes: every kernel's GPU µs and launches per step over ``steps``
    steps of ``sim.run`` (torch.profiler; CUPTI sees the kernels inside CUDA graphs), the GPU's
    summed kernel time per step and the wall time per step of the same run (their difference is
    host time and gaps between launches)."""
    from gpu_timing import replay_kernels

    wall = {}

    def run():
        start = time.perf_counter()
        sim.run(steps, every=steps)
        wall["s"] = time.perf_counter() - start

    table = replay_kernels(run, calls=1, top=60)
    return {"profile_steps": steps, "gpu_us_per_step": round(table["gpu_ms"] * 1e3 / steps, 2),
            "wall_us_per_step": round(wall["s"] * 1e6 / steps, 2),
            "launches_per_step": round(table["launches"] / steps, 2),
            "kernels": [(name, round(us / steps, 2), round(count / steps, 2)) for name, us, count in table["top"]]}


#: timed steps of the probe that sizes a budgeted measurement
PROBE_STEPS = 5


def budget_steps(rate: float, args) -> int:
    """Timed steps per repetition that fit ``args.budget_s`` at ``rate`` steps/s: at most
    ``args.steps``, at least 10."""
    if not rate or rate <= 0:
        return args.steps
    return int(max(10, min(args.steps, rate * args.budget_s / max(args.repeat, 1))))


def time_ase(model, atoms, args, fast="auto"):
    """Best steps/s of ASE's VelocityVerlet with torchmdx.Calculator; ``fast``: the calculator's
    cuda_graph/compile options ("auto": graph replay of the compiled model on CUDA; False: eager)."""
    import numpy as np
    import torch
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from torchmdx.md.calculator import Calculator
    from torchmdx.md.system import System

    model.set_compiled(False)
    atoms = atoms.copy()
    atoms.calc = Calculator(model, device=args.device, dtype=args.dtype, skin=args.skin, cuda_graph=fast, compile=fast)
    system = System.from_atoms([atoms], "cpu", torch.float64)
    atoms.set_velocities(system.maxwell_boltzmann(300.0, torch.Generator().manual_seed(0)).numpy())
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    best = run_dynamics(dyn, args)
    if not np.isfinite(atoms.get_forces()).all():
        raise FloatingPointError("non-finite forces")
    return best


def run_dynamics(dyn, args) -> float:
    """Best steps/s of an ASE dynamics object: warm-up, an optional probe (``--budget-s``), timed runs."""
    dyn.run(args.warmup)
    steps = args.steps
    if args.budget_s is not None:
        start = time.perf_counter()
        dyn.run(PROBE_STEPS)
        steps = budget_steps(PROBE_STEPS / (time.perf_counter() - start), args)
    best = 0.0
    for _ in range(args.repeat):
        start = time.perf_counter()
        dyn.run(steps)
        best = max(best, steps / (time.perf_counter() - start))
    return best


#: TorchMD-NET 3.0.0's ET with the MD17 hyper-parameters, as ../shared/bench/anchor_torchmdnet.py builds it
TMDNET_ARGS = dict(model="equivariant-transformer", embedding_dimension=128, num_layers=6, num_rbf=32,
                   rbf_type="expnorm", trainable_rbf=False, activation="silu", attn_activation="silu",
                   neighbor_embedding=True, num_heads=8, distance_influence="both", cutoff_lower=0.0,
                   cutoff_upper=5.0, max_z=100, max_num_neighbors=64, prior_model=None, output_model="Scalar",
                   reduce_op="add", precision=32, derivative=False, aggr="add", atom_filter=-1,
                   standardize=False, charge=False, spin=False, vector_cutoff=True, box_vecs=None,
                   static_shapes=False, equivariance_invariance_group="O(3)", seed=1)


def time_tmdnet_ase(atoms, args):
    """Best steps/s of ASE's VelocityVerlet driving TorchMD-NET 3.0.0 (random weights, float32):
    per step one model call and one backward for the forces, as the anchor script does."""
    import numpy as np
    import torch
    from ase import units
    from ase.calculators.calculator import Calculator, all_changes
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from torchmdnet.models.model import create_model

    device = args.device
    torch.manual_seed(0)
    model = create_model(dict(TMDNET_ARGS)).to(device)
    for prm in model.parameters():
        prm.requires_grad_(False)

    class TorchMDNetCalculator(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=None, system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            z = torch.tensor(atoms.numbers, device=device, dtype=torch.long)
            pos = torch.tensor(atoms.positions, device=device, dtype=torch.float32, requires_grad=True)
            box = torch.tensor(atoms.cell.array, device=device, dtype=torch.float32) if atoms.pbc.any() else None
            energy, _ = model(z, pos, batch=torch.zeros_like(z), box=box)
            energy.sum().backward()
            self.results["energy"] = energy.detach().cpu().item()
            self.results["forces"] = (-pos.grad).cpu().numpy()

    atoms = atoms.copy()
    atoms.calc = TorchMDNetCalculator()
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    return run_dynamics(VelocityVerlet(atoms, timestep=0.5 * units.fs), args)


def main(argv=None):
    args = parse_args(argv)
    import torch
    from ase.io import read

    from torchmdx.errors import TorchmdxError
    from torchmdx.nn.traced import compile_mode

    from torchmdx.devices import check_device
    from torchmdx.errors import ConfigError

    check_device(args.device, "--device")  # 'cdua' was torch's RuntimeError listing every device type
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from model_setup import apply_message_config_from_env

    apply_message_config_from_env()  # BENCH_MESSAGE_CONFIG, e.g. {"filters": "gemm"} for an A/B against the tables
    if args.small_row_inner is not None:
        from torchmdx.nn import traced as traced_module

        traced_module.SMALL_ROW_INNER = args.small_row_inner
    if args.plain_epilogue:
        from torchmdx.md import cuda_graph as cuda_graph_module

        cuda_graph_module.FUSED_EPILOGUE = False
    max_atoms = args.max_atoms if args.max_atoms is not None else (None if args.device.startswith("cuda") else 2500)
    cuda = args.device.startswith("cuda")
    wanted = set(args.variants.split(",")) if args.variants else set(VARIANTS) - {"native_unfused"}  # unfused: asked for
    unknown = wanted - set(VARIANTS)
    if unknown:
        print(f"error: unknown --variants {', '.join(sorted(unknown))} (known: {', '.join(VARIANTS)})", file=sys.stderr)
        return 2
    if "tmdnet_ase" in wanted and cuda:
        try:
            import torchmdnet  # noqa: F401
        except ImportError:
            print("# torchmdnet is not importable: no TorchMD-NET ASE column", flush=True)
            wanted.discard("tmdnet_ase")
    run = {v: v in wanted and (cuda or v in ("native", "ase")) for v in VARIANTS}
    names = args.systems or SYSTEMS
    missing = [name for name in names if not (Path(args.data) / f"{name}.xyz").is_file()]
    if missing:  # was FileNotFoundError's traceback after the model was built
        there = sorted(p.stem for p in Path(args.data).glob("*.xyz")) if Path(args.data).is_dir() else []
        raise ConfigError(f"--systems {', '.join(missing)}: no {missing[0]}.xyz in --data {args.data} "
                          f"({'it holds ' + ', '.join(there) if there else 'no .xyz files there'})")
    model = load_model(args).to(args.device)
    print(f"# bench_md: device {args.device}"
          + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else "")
          + f", {args.dtype}, model {args.model or f'random ET F={args.embedding_dimension} L={args.num_layers}'}"
          + f", cutoff {model.cutoff} Å, skin {args.skin} Å, best of {args.repeat} x {args.steps} steps after {args.warmup}")
    header = (f"{'system':28s} {'atoms':>7s} {'native st/s':>12s} {'ASE st/s':>10s} {'speed-up':>9s} {'ns/day':>9s} "
              f"{'nl builds':>9s} {'TMD-NET ASE st/s':>17s}")
    print(header)
    print("-" * len(header))
    rows = []
    for name in names:
        path = Path(args.data) / f"{name}.xyz"
        atoms = read(path)
        if max_atoms is not None and len(atoms) > max_atoms:
            print(f"{name:28s} {len(atoms):7d}   skipped (> --max-atoms {max_atoms})")
            continue
        row = {"system": name, "atoms": len(atoms)}
        if not args.model:
            model.scale.fill_(1.0)
            tame(model, atoms)
        started = time.perf_counter()
        if run["native_eager"]:
            try:
                row["native_eager_steps_per_s"], _ = time_native(model, atoms, args, cuda_graph=False, compile=False)
            except (TorchmdxError, RuntimeError) as exc:
                row["native_eager_error"] = str(exc).splitlines()[0]
        if run["native_graph_uncompiled"]:
            try:
                row["native_graph_uncompiled_steps_per_s"], _ = time_native(model, atoms, args, compile=False)
            except (TorchmdxError, RuntimeError) as exc:
                row["native_graph_uncompiled_error"] = str(exc).splitlines()[0]
        row["compile"] = compile_mode("auto", args.device, len(atoms), model)
        if run["native"]:
            try:
                profile = {}
                row["native_steps_per_s"], row["neighbor_list_builds"] = time_native(model, atoms, args, profile=profile)
                if profile:
                    row["native_profile"] = profile
                    print(f"# {name}: profile of {profile['profile_steps']} native steps: GPU {profile['gpu_us_per_step']} µs, "
                          f"wall {profile['wall_us_per_step']} µs, {profile['launches_per_step']} launches per step")
                    for kernel, us, count in profile["kernels"]:
                        print(f"#   {us:9.2f} µs {count:6.2f}x  {kernel}")
            except (TorchmdxError, RuntimeError) as exc:
                row["native_error"] = str(exc).splitlines()[0]
        if run["native_unfused"]:  # the same with the eager integrator (issue 16 item 5)
            try:
                row["native_unfused_steps_per_s"], _ = time_native(model, atoms, args, fuse_integrator=False)
            except (TorchmdxError, RuntimeError) as exc:
                row["native_unfused_error"] = str(exc).splitlines()[0]
        if run["native_other"]:  # the other compile mode, for comparison
            other = "parts" if row["compile"] == "whole" else "whole"
            try:
                row[f"native_{other}_steps_per_s"], _ = time_native(model, atoms, args, compile=other)
            except (TorchmdxError, RuntimeError) as exc:
                row[f"native_{other}_error"] = str(exc).splitlines()[0]
        if run["ase"]:
            try:
                row["ase_steps_per_s"] = time_ase(model, atoms, args)
            except (TorchmdxError, RuntimeError, FloatingPointError) as exc:
                row["ase_error"] = str(exc).splitlines()[0]
        if run["ase_eager"]:
            try:
                row["ase_eager_steps_per_s"] = time_ase(model, atoms, args, fast=False)
            except (TorchmdxError, RuntimeError, FloatingPointError) as exc:
                row["ase_eager_error"] = str(exc).splitlines()[0]
        if run["tmdnet_ase"]:
            try:
                row["tmdnet_ase_steps_per_s"] = time_tmdnet_ase(atoms, args)
            except Exception as exc:  # noqa: BLE001 - another package: report any failure, go on
                row["tmdnet_ase_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        if "native_unfused_steps_per_s" in row or "native_unfused_error" in row:
            print(f"# {name}: native engine with the eager (unfused) integrator ({args.ensemble}): "
                  f"{row.get('native_unfused_steps_per_s', row.get('native_unfused_error'))} steps/s", flush=True)
        row["wall_s"] = round(time.perf_counter() - started, 1)
        native, ase_rate = row.get("native_steps_per_s"), row.get("ase_steps_per_s")
        speedup = f"{native / ase_rate:9.2f}" if native and ase_rate else f"{'-':>9s}"
        def cell(value, ran: bool, width: int) -> str:  # "-": not asked for; "failed": asked for, no number
            return f"{value:{width}.3g}" if value else f"{'failed' if ran else '-':>{width}s}"

        print(f"{name:28s} {len(atoms):7d} "
              + cell(native, run["native"], 12) + " " + cell(ase_rate, run["ase"], 10) + " "
              + speedup + " "
              + (f"{native * 0.5e-6 * 86400:9.3f}" if native else f"{'-':>9s}") + " "
              + f"{row.get('neighbor_list_builds', '-'):>9} "
              + (f"{row['tmdnet_ase_steps_per_s']:17.3g}" if "tmdnet_ase_steps_per_s" in row else f"{'-':>17s}"))
        if "native_eager_steps_per_s" in row:
            print(f"    native engine without CUDA graph: {row['native_eager_steps_per_s']:.3g} steps/s")
        if "ase_eager_steps_per_s" in row:
            print(f"    ASE loop, calculator without CUDA graph / compile: {row['ase_eager_steps_per_s']:.3g} steps/s")
        print(f"    native engine's compile mode: {row['compile']}")
        if "native_whole_steps_per_s" in row:
            print(f"    native engine, CUDA graph, whole model as one compiled graph: {row['native_whole_steps_per_s']:.3g} steps/s")
        if "native_parts_steps_per_s" in row:
            print(f"    native engine, CUDA graph, model's parts compiled: {row['native_parts_steps_per_s']:.3g} steps/s")
        if "native_graph_uncompiled_steps_per_s" in row:
            print(f"    native engine, CUDA graph, model not compiled: {row['native_graph_uncompiled_steps_per_s']:.3g} steps/s")
        for key in ("native_error", "native_eager_error", "native_graph_uncompiled_error", "native_whole_error", "native_parts_error",
                    "ase_error", "ase_eager_error", "tmdnet_ase_error"):
            if key in row:
                print(f"    {key}: {row[key]}")
        if args.replicas > 1:
            try:
                rate, _ = time_native(model, [atoms] * args.replicas, args, compile=args.replica_compile)
                row["replicas"] = args.replicas
                row["replica_molecule_steps_per_s"] = rate * args.replicas
                print(f"{name + f' x{args.replicas} (batch)':28s} {len(atoms) * args.replicas:7d} {rate:12.3g} "
                      f"{'':>10s} {'':>9s} {rate * 0.5e-6 * 86400:9.3f}   = {rate * args.replicas:.1f} molecule-steps/s")
            except (TorchmdxError, RuntimeError) as exc:
                print(f"    replicas: {str(exc).splitlines()[0]}")
        rows.append(row)
        if args.json:  # after every system: a run stopped by a timeout keeps its rows
            write_json(args.json, {"device": args.device,
                                   "gpu": torch.cuda.get_device_name(args.device) if cuda else None,
                                   "dtype": args.dtype, "rows": rows})
    return 0


def write_json(path, data):
    from torchmdx.io_utils import atomic_write

    with atomic_write(path, "w") as handle:
        handle.write(json.dumps(data, indent=2))


if __name__ == "__main__":
    from torchmdx.cli.main import run_script

    sys.exit(run_script(main))  # a TorchmdxError is one error line (torchmdx bench runs this file)
