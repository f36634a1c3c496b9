"""``torchmdx export checkpoint.ckpt -o model.pt``: a self-contained model file.

The model file holds the hyper-parameters, the EMA weights (``--no-ema``: the raw training
weights), the energy normalisation (atomic references, scale, shift), the elements, the cutoff
and the torchmdx version; ``torchmdx.load_model`` reads it without the config. A TorchMD-NET
checkpoint is converted as well.

``torchmdx export --openmm model.pt -o model_openmm.pt`` writes instead a TorchScript module for
OpenMM's ``TorchForce`` (positions in nm -> energy in kJ/mol; docs/openmm.md), from a model file
or a checkpoint, with the model's elements, cutoff and units recorded. ``--structure`` (and
``--atoms``) fix the ML atoms, so that ``TorchForce("model_openmm.pt")`` works as is; without
them the module is generic and ``MLPotential("torchmdx", modelPath=...)`` sets the atoms.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "write a self-contained model file from a training checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="training checkpoint (.ckpt), e.g. runs/x/checkpoints/best.ckpt")
    parser.add_argument("-o", "--output", required=True, help="model file to write (e.g. model.pt)")
    parser.add_argument("--no-ema", dest="ema", action="store_false",
                        help="export the raw training weights instead of their moving average")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    group = parser.add_argument_group("OpenMM (--openmm)")
    group.add_argument("--openmm", action="store_true",
                       help="write a TorchScript module for OpenMM's TorchForce (nm in, kJ/mol out) instead of a model file; "
                            "the input may be a model file or a checkpoint")
    group.add_argument("--structure", help="structure file (ASE-readable: pdb, xyz, ...) whose atoms (or --atoms) are the ML "
                                           "region; without it the module is generic (openmm-ml's MLPotential sets the atoms)")
    group.add_argument("--atoms", help="ML atoms among the structure's atoms, 0-based, e.g. 0-21,30 (default: all); "
                                       "TorchForce passes every particle and the module picks these")
    group.add_argument("--device", help="device the module is traced for: cpu (OpenMM Reference/CPU "
                                                       "platforms) or cuda (CUDA platform); default cpu")
    group.add_argument("--dtype", choices=["float32", "float64"], help="model precision (default: the model's own)")
    group.add_argument("--outputs-forces", action="store_true",
                       help="the module returns (energy, forces): TorchForce.setOutputsForces(True)")


def parse_atoms(text: str, count: int) -> list:
    """'0-21,30' -> [0, 1, ..., 21, 30] (0-based, each < count); one-line ConfigError otherwise."""
    from torchmdx.errors import ConfigError

    atoms: list = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                if int(hi) < int(lo):  # was an empty range: '0,5-2' silently meant '0'
                    raise ConfigError(f"--atoms: range {part!r} is empty; give low-high, e.g. {hi}-{lo}")
                if not (0 <= int(lo) and int(hi) < count):  # checked before the list is made: 0-9999999999 ran
                    # out of memory ("check the sizes asked for (--replicas, ...)")
                    first = int(lo) if int(lo) < 0 else max(int(lo), count)
                    raise ConfigError(f"--atoms: atom {first} is outside the structure's {count} atoms (0-based: "
                                      f"0..{count - 1})")
                atoms.extend(range(int(lo), int(hi) + 1))
            else:
                atoms.append(int(part))
        except ValueError:
            raise ConfigError(f"--atoms: cannot read {part!r}; give 0-based indices and ranges such as 0-21,30") from None
    bad = [a for a in atoms if not 0 <= a < count]
    if bad:
        raise ConfigError(f"--atoms: atom {bad[0]} is outside the structure's {count} atoms (0-based: 0..{count - 1})")
    if len(set(atoms)) != len(atoms):
        seen: set = set()
        twice = next(a for a in atoms if a in seen or seen.add(a))
        raise ConfigError(f"--atoms: atom {twice} is given twice; each atom once")
    return atoms


def _load_for_openmm(path: str, ema: bool):
    """The potential of a model file or a training checkpoint."""
    from torchmdx.openmm.export import is_openmm_export
    from torchmdx.train.export import check_finite_weights, potential_from_checkpoint, read_checkpoint

    if is_openmm_export(path):  # was "not a torchmdx checkpoint" after torch's warning line
        from torchmdx.errors import ModelError

        raise ModelError(f"{path}: is an OpenMM export already (TorchScript, nm and kJ/mol); give the model file "
                         "(model.pt) or training checkpoint it was exported from")

    try:
        payload = read_checkpoint(path)
    except Exception:  # noqa: BLE001 - potential_from_checkpoint gives the one-line reason
        payload = None
    if isinstance(payload, dict) and payload.get("format") == "torchmdx-model":
        from torchmdx.nn.model_file import load_model

        if not ema:  # was ignored: the module held the model file's weights, without a word
            from torchmdx.errors import ConfigError

            raise ConfigError(f"--no-ema applies to a training checkpoint, and {path} is a model file, which holds one "
                              "set of weights (those it was exported with); give the run's checkpoint (e.g. "
                              "RUN_DIR/checkpoints/last.ckpt) for the raw training weights, or drop --no-ema")
        potential = load_model(path)
    else:
        potential = potential_from_checkpoint(path, ema=ema)
    check_finite_weights(potential, path)
    return potential


def run_openmm(args) -> int:
    from pathlib import Path

    from torchmdx.errors import ConfigError, DataError
    from torchmdx.openmm.export import export_openmm
    from torchmdx.devices import check_device
    from torchmdx.train.export import TORCH_SUFFIXES, check_output_file

    check_output_file(args.output, force=args.force, inputs=[args.checkpoint], what="OpenMM module",
                      suffixes=TORCH_SUFFIXES)
    args.device = args.device or "cpu"
    check_device(args.device, "--device")
    numbers, atoms = None, None
    if args.atoms is not None and not args.atoms.strip():  # an empty shell variable: every atom, silently
        raise ConfigError(f"--atoms is empty ({args.atoms!r}); give 0-based atoms such as 0-21,30, or leave it out "
                          "for all of the structure's atoms")
    if args.atoms and not args.structure:
        raise ConfigError("--atoms needs --structure (the file whose atoms they index)")
    if args.structure:
        if not Path(args.structure).is_file():
            raise ConfigError(f"--structure: {args.structure} "
                              + ("is a folder; give a structure file" if Path(args.structure).is_dir() else "not found"))
        from ase.io import read

        from torchmdx.data.ase_format import ase_source
        from torchmdx.data.xyz_counts import check_rest

        try:
            source, options = ase_source(args.structure)  # a UTF-8 byte-order mark: the text without it
            structure = read(source, **options)
            check_rest(source)  # a blank line between frames: the frame before it read as the last (round 38)
            if hasattr(source, "seek"):
                source.seek(0)
            first = read(source, index=0, **options)  # ASE's read takes the last frame: a file of several
            # structures gave a module for the last one's atoms without a word (round 27)
        except DataError as exc:
            raise ConfigError(f"--structure: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any reader problem is a bad file
            from torchmdx.data.ase_format import classify_read_failure

            failure = classify_read_failure(exc, args.structure)  # a torch file was "cannot read m.pt (pt)"
            words = failure.words("not a structure; give the structure file (pdb, xyz, ...)")
            if words:
                raise ConfigError(f"--structure: {args.structure}: {words}") from None
            raise ConfigError(f"--structure: cannot read {args.structure} ({failure.detail})") from None
        if list(first.numbers) != list(structure.numbers):
            raise ConfigError(f"--structure: {args.structure} holds structures of different atoms (the first "
                              f"{first.get_chemical_formula()}, the last {structure.get_chemical_formula()}), and "
                              "the module's ML atoms come from one structure (ASE reads the last); give a file of "
                              "the one structure OpenMM simulates")
        from torchmdx.data.ase_format import disordered_site

        problem = disordered_site(structure)
        if problem:  # the ML region was built from whichever species ASE kept (round 20)
            raise ConfigError(f"--structure {args.structure}: {problem}")
        numbers = [int(z) for z in structure.numbers]
        if args.atoms:
            atoms = parse_atoms(args.atoms, len(numbers))
            numbers = [numbers[a] for a in atoms]
    potential = _load_for_openmm(args.checkpoint, args.ema)
    if numbers is not None:  # the element line named no file: "atom 0 of the ML region is element Ar" (round 20)
        from torchmdx.openmm.export import check_ml_elements, model_elements

        check_ml_elements(numbers, *model_elements(potential),
                          names=[f"{args.structure}: atom {a}" for a in (atoms or range(len(numbers)))])
    module = export_openmm(potential, args.output, atomic_numbers=numbers, atoms=atoms, device=args.device,
                           dtype=args.dtype, forces="returned" if args.outputs_forces else "autograd", force=True)
    from torchmdx.openmm.export import metadata

    meta = metadata(module)
    names = ", ".join(meta["element_symbols"] or ["any"])
    what = f"{len(numbers)} ML atoms" + (f" (indices {args.atoms})" if atoms else "") if numbers else "generic (atoms set by MLPotential)"
    print(f"wrote {args.output}: OpenMM TorchScript module, nm -> kJ/mol, cutoff {meta['cutoff']:g} nm, elements {names}, "
          f"{what}, forces by {meta['forces']}, device {meta['device']}")
    return 0


#: the names ``export -o`` takes (any case): both exports write torch files, read by ``load_model``, OpenMM's
#: TorchForce and ``MLPotential`` whatever their name, but named ``.pt`` so that people and tools (ASE, md's
#: structure argument) do not take them for what another extension says (round 20)

#: the options of an OpenMM export (a model file export ignored them: --dtype float64 wrote float32)
OPENMM_OPTIONS = ("structure", "atoms", "device", "dtype", "outputs_forces")


def run(args) -> int:
    if args.openmm:
        return run_openmm(args)
    given = [name for name in OPENMM_OPTIONS if getattr(args, name)]
    if given:
        from torchmdx.errors import ConfigError

        option = "--" + given[0].replace("_", "-")
        raise ConfigError(f"{option} applies to OpenMM exports (--openmm) only: a model file holds the model as "
                          "trained (device and precision are chosen when it is loaded); add --openmm or drop "
                          f"{option}")
    from torchmdx.train.export import export_checkpoint

    potential = export_checkpoint(args.checkpoint, args.output, ema=args.ema, force=args.force)
    if getattr(potential, "training_record", None) is None and Path(args.checkpoint).suffix.lower() == ".ckpt":
        # round 26 left it silent: evaluate --run then said only that the model records no run
        print(f"warning: {args.checkpoint} records no training run and lies outside a run folder "
              f"(RUN/checkpoints/x.ckpt), so {args.output} records none: evaluate --run cannot check that a run's "
              "test split holds none of its training structures; export the checkpoint from its run's checkpoints "
              "folder to record the run", file=sys.stderr, flush=True)
    elements = getattr(potential, "elements", None)
    from torchmdx.nn.potential import element_symbol

    names = ", ".join(element_symbol(z) for z in elements) if elements else "any"
    print(f"wrote {args.output}: {type(potential).__name__}, cutoff {potential.cutoff:g} Å, elements {names}")
    return 0
