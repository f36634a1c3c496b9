"""``torchmdx md``: molecular dynamics with a model file.

    torchmdx md structure.xyz --model model.pt --steps 10000 --dt 0.5 --temperature 300 \\
        --ensemble langevin --friction 1 --out traj.extxyz --log thermo.csv --every 100

Options come from the command line and/or a YAML file (``--config md.yaml``, its ``md:``
section or a bare mapping with the same names, see :class:`torchmdx.md.config.MDConfig`);
options given on the command line win.
"""

from __future__ import annotations

import argparse

HELP = "run molecular dynamics (native engine or ASE) with a model file"

# option name -> (argparse kwargs); dest names are MDConfig fields
_OPTIONS = {
    "--model": dict(help="model file (Potential.save / torchmdx export)"),
    "--index": dict(help="frames of each structure file: -1 the last (default), ':' all, start:stop:step a slice (as Python's)"),
    "--steps": dict(type=int, help="total number of MD steps (default 1000)"),
    "--dt": dict(type=float, help="time step in fs (default 0.5)"),
    "--temperature": dict(type=float, help="temperature in K: initial velocities and thermostat target (default 300)"),
    "--ensemble": dict(choices=["nve", "langevin", "bussi", "nose-hoover"], help="ensemble (default nve)"),
    "--friction": dict(type=float, help="Langevin friction in 1/ps (default 1)"),
    "--tau": dict(type=float, help="Bussi / Nosé-Hoover time constant in fs (default 100)"),
    "--chain-length": dict(type=int, dest="chain_length", help="Nosé-Hoover chain length (default 3)"),
    "--pressure": dict(type=float, help="constant pressure in bar (NPT with langevin or nose-hoover, NPH with nve; periodic "
                                        "structures, --engine ase); default: constant volume"),
    "--barostat-tau": dict(type=float, dest="barostat_tau", help="barostat time constant in fs (default 1000)"),
    "--barostat": dict(choices=["isotropic", "anisotropic"],
                       help="isotropic (default: the cell keeps its shape) or anisotropic (all six cell degrees of freedom)"),
    "--out": dict(help="trajectory: .extxyz/.xyz (extended XYZ), .traj (ASE), or .pdb/.cif (positions and cell "
                       "only); default md.extxyz. An existing trajectory, log or restart file is not "
                       "overwritten without --force"),
    "--log": dict(help="thermo CSV (default <out stem>.csv)"),
    "--every": dict(type=int, help="output interval in steps (default 10)"),
    "--restart-out": dict(dest="restart_out", help="restart file to write (default <out stem>.restart.pt)"),
    "--restart-every": dict(type=int, dest="restart_every", help="steps between restart files (default 10 x every)"),
    "--summary": dict(help="summary JSON (default <out stem>.summary.json)"),
    "--restart": dict(help="continue from this restart file (up to --steps in total), appending to the outputs; "
                           "refused if they hold steps after the restart file's (see --truncate)"),
    "--device": dict(help="cpu, cuda, cuda:1, ... (default cpu)"),
    "--dtype": dict(choices=["float32", "float64"], help="precision (default float32)"),
    "--seed": dict(type=int, help="seed of initial velocities and thermostat noise (default 0)"),
    "--engine": dict(choices=["native", "ase"], help="native (default) or ase (ASE's integrators)"),
    "--fmax": dict(type=float, help="FIRE convergence: largest force in eV/Å (default 0.05)"),
    "--minimize-steps": dict(type=int, dest="minimize_steps", help="most FIRE steps (default 500)"),
    "--replicas": dict(type=int, help="copies of each structure run together in one batch (default 1)"),
    "--skin": dict(type=float, help="neighbor-list skin in Å (default 0.5)"),
    "--check-interval": dict(type=int, dest="check_interval", help="steps between host checks (default 10)"),
    "--max-temperature": dict(type=float, dest="max_temperature",
                              help="stop when a structure gets hotter than this, in K (default: max(2000, 5 x "
                                   "--temperature), so 2000 K at 300 K)"),
    "--velocities": dict(choices=["auto", "file", "draw"],
                         help="initial velocities: auto (default) takes those the structure file carries (ASE "
                              "momenta) and draws Maxwell-Boltzmann ones at --temperature otherwise; file requires "
                              "them; draw always draws"),
    "--threads": dict(type=int, help="CPU threads for torch (default: torch's; 1 is fastest for small molecules)"),
    "--atom-order": dict(choices=["auto", "input", "hilbert", "morton"], dest="atom_order",
                         help="native engine: sort the atoms along a space-filling curve for memory locality "
                              "(outputs stay in the input order); default auto: hilbert from 5000 atoms a structure"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("structure", nargs="*", help="structure file(s) ASE can read (xyz, extxyz, pdb, cif, ...)")
    for flag, kwargs in _OPTIONS.items():
        parser.add_argument(flag, default=None, **kwargs)
    parser.add_argument("--minimize", action="store_true", default=None, help="FIRE relaxation before dynamics")
    parser.add_argument("--force", action="store_true", default=None,
                        help="write over the trajectory, log and restart file of an earlier run")
    parser.add_argument("--truncate", action="store_true", default=None,
                        help="with --restart: drop the frames and log rows written after the restart file's step "
                             "(a half-written last frame too)")
    parser.add_argument("--no-wrap", dest="wrap", action="store_false", default=None,
                        help="do not wrap periodic positions into the cell")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default=None,
                        help="run the native engine's steps eagerly on CUDA (default: one CUDA graph per step)")
    parser.add_argument("--compile", choices=("auto", "whole", "parts", "off"), default=None,
                        help="torch.compile the model (native engine): whole = the model and its forces as one "
                             "graph, parts = its dense parts; default auto: on CUDA whole up to 64 atoms, "
                             "parts above; off on the CPU")
    parser.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                        help="do not torch.compile the model (same as --compile off)")
    # the words, read as True / False in config_from_args: choices of True and False made `--fuse-integrator True`
    # "invalid choice: 'True' (choose from 'auto', True, False)" (round 37)
    parser.add_argument("--fuse-integrator", choices=("auto", "true", "false"), default=None,
                        help="native engine: compile the integrator's element-wise work into a few kernels "
                             "(the same numbers; default auto: with the compiled model, i.e. on CUDA)")
    parser.add_argument("--config", help="YAML file with the options (md: section); command-line options win")


def config_from_args(args):
    """MDConfig from the YAML file (if any) updated with every option given on the command line
    (argparse dests are MDConfig field names, so every field is taken over by name)."""
    from dataclasses import fields

    from torchmdx.md.config import MDConfig, md_config

    values = {}
    for field in fields(MDConfig):
        value = getattr(args, field.name, None)
        if field.name != "structure" and value is not None:
            values[field.name] = {"true": True, "false": False}.get(value, value) if field.name == "fuse_integrator" \
                else value
    if args.structure:
        values["structure"] = list(args.structure)
    return md_config(values, args.config, command_line=True)


def run(args) -> int:
    from torchmdx.md.run import run_md

    run_md(config_from_args(args))
    return 0
