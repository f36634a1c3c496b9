"""``torchmdx label frames.extxyz [...] --method gfn2-xtb -o labeled.extxyz``.

Reference energies and forces for structures (GFN2-xTB and friends through tblite, an optional
extra: ``pip install 'torchmdx[label]'``; or ``model:<file>``, a torchmdx model), with a progress
bar, written atomically and resumable: run the same command again after an interruption. See
:mod:`torchmdx.md.label` and docs/sweep.md ("Data for a sweep").
"""

from __future__ import annotations

import argparse

HELP = "label structures with GFN2-xTB energies and forces (tblite) for training data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("structures", nargs="+", help="structure files ASE reads (every frame), e.g. MD trajectories")
    parser.add_argument("-o", "--out", required=True, help="labelled frames (.extxyz); <out>.partial while it runs")
    parser.add_argument("--method", default="gfn2-xtb",
                        help="gfn2-xtb (default), gfn1-xtb, ipea1-xtb (tblite), or model:<model file>")
    parser.add_argument("--charge", type=float, default=None, help="total charge (default 0, or atoms.info['charge'])")
    parser.add_argument("--multiplicity", type=int, default=None, help="spin multiplicity (default: tblite's)")
    parser.add_argument("--accuracy", type=float, default=None, help="tblite's SCF accuracy (default 1.0)")
    parser.add_argument("--max-iterations", type=int, default=None, help="SCF iterations (default 250)")
    parser.add_argument("--electronic-temperature", type=float, default=None, help="in K (default 300)")
    parser.add_argument("--skip", type=int, default=0, help="drop the first frames of each file (equilibration)")
    parser.add_argument("--every", type=int, default=1, help="keep every k-th frame (default 1)")
    parser.add_argument("--max-frames", type=int, default=None, help="label at most this many frames")
    parser.add_argument("--skip-failed", action="store_true", help="leave out frames whose calculation fails")
    parser.add_argument("--force", action="store_true", help="replace an existing output (and start afresh)")
    parser.add_argument("--device", default="cpu", help="device of a model:<file> method (default cpu)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args) -> int:
    from torchmdx.md.label import LabelOptions, check_method, check_options, label

    options = LabelOptions(method=args.method, charge=args.charge, multiplicity=args.multiplicity,
                           accuracy=args.accuracy, max_iterations=args.max_iterations,
                           electronic_temperature=args.electronic_temperature, device=args.device)
    check_options(options)  # the option ranges first: they need no tblite
    check_method(args.method)  # a missing tblite is one line before anything is read
    summary = label(args.structures, args.out, options, skip=args.skip, every=args.every, max_frames=args.max_frames,
                    force=args.force, skip_failed=args.skip_failed, progress=args.progress)
    note = f" (continued after {summary['resumed_from']})" if summary["resumed_from"] else ""
    failed = f"; {len(summary['failed'])} failed and left out" if summary["failed"] else ""
    print(f"{summary['frames']} of {summary['inputs']} frames labelled with {summary['method']}{note}{failed}: {summary['out']}")
    return 0
