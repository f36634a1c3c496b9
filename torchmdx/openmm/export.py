"""Build, check, save and load the OpenMM TorchScript module (:mod:`torchmdx.openmm.module`).

    from torchmdx.openmm import export_openmm, with_atoms, load_openmm_module
    module = export_openmm("model.pt", "model_openmm.pt")                 # generic: atoms later
    module = export_openmm("model.pt", "ligand_openmm.pt", atomic_numbers=[6, 1, 1, 1, 8, 1],
                           atoms=[0, 1, 2, 3, 4, 5])                      # ready for TorchForce

The file is a TorchScript archive (``torch.jit.save``) with one extra file,
``torchmdx_openmm.json`` (:data:`METADATA_FILE`): format, units, the model's elements and
cutoff, the ML atoms, the force convention, the device it was traced on, the constants used and
the model's description. :func:`read_metadata` reads it without loading the module.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from torchmdx.openmm.errors import OpenMMError

FORMAT = "torchmdx-openmm"
FORMAT_VERSION = 1
METADATA_FILE = "torchmdx_openmm.json"

#: the units OpenMM's TorchForce uses (positions and box in, energy out)
OPENMM_LENGTH_UNIT = "nm"
OPENMM_ENERGY_UNIT = "kJ/mol"

#: ``forces`` conventions of openmm-torch: autograd of the returned energy, or returned forces
FORCE_CONVENTIONS = ("autograd", "returned")


def _unit_factors(length_unit: str, energy_unit: str):
    """(length unit -> Å, eV -> energy unit) from the one table of constants (:mod:`torchmdx.units`)."""
    from torchmdx import units

    length = units.LENGTH_UNITS.get(length_unit.strip().lower())
    if length is None:
        raise OpenMMError(f"unknown length unit {length_unit!r}; OpenMM uses 'nm' (known: {', '.join(sorted(units.LENGTH_UNITS))})")
    energy = units.ENERGY_UNITS.get(energy_unit.strip().lower())
    if energy is None:
        raise OpenMMError(f"unknown energy unit {energy_unit!r}; OpenMM uses 'kJ/mol' (known: {', '.join(sorted(units.ENERGY_UNITS))})")
    if length_unit.strip().lower() == "nm":
        length = units.NM_TO_ANGSTROM
    if energy_unit.strip().lower() == "kj/mol":
        return length, units.EV_TO_KJ_PER_MOL
    return length, 1.0 / energy


def _element_label(z: int) -> str:
    """``C (Z=6)``, or ``Z=200`` alone where there is no symbol."""
    name = _element_name(z)
    return name if name.startswith("Z=") else f"{name} (Z={z})"


def _element_name(z: int) -> str:
    try:
        from ase.data import chemical_symbols

        return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"
    except ImportError:  # pragma: no cover - ase is a dependency of torchmdx
        return f"Z={z}"


def _model_dtype(potential):
    import torch

    dtype = getattr(potential, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for p in potential.parameters():
        return p.dtype
    return torch.float64


def _example_structure(elements: Sequence[int], n: int, cutoff: float, seed: int, dtype, device):
    """(z [n], pos [n, 3] Å): a compact random cluster of the model's elements (many pairs within
    the cutoff, no two atoms closer than 0.9 Å) for tracing and checking the trace."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    points: list = []
    radius = max(1.2, min(cutoff, 4.0) * 0.6)
    while len(points) < n:
        p = (torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 1) * radius
        if all(float((p - q).norm()) > 0.9 for q in points):
            points.append(p)
    z = torch.tensor([elements[k % len(elements)] for k in range(n)], dtype=torch.long, device=device)
    return z, torch.stack(points).to(dtype=dtype, device=device)


def _core_inputs(z, pos, cutoff):
    from torchmdx.openmm.neighbors import edge_geometry, pairs_within

    edge_index, shifts = pairs_within(pos, cutoff, None)
    vectors, distances = edge_geometry(pos, edge_index, shifts, None)
    return z, edge_index, vectors, distances


def _trace_core(potential, cutoff: float, elements: Sequence[int], dtype, device):
    """``torch.jit.trace`` of :class:`EnergyCore` on one random cluster, checked on two others of
    other sizes (energies and forces equal the eager model's): a trace that baked in a size
    would be refused here rather than give wrong numbers in OpenMM."""
    import torch

    from torchmdx.openmm.module import EnergyCore

    core = EnergyCore(potential).eval()
    example = _core_inputs(*_example_structure(elements, 7, cutoff, 0, dtype, device), cutoff)
    previous = getattr(potential, "tracing", False)
    potential.tracing = True  # no host reads or checks; the torch reference message path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(core, example, check_trace=False)
    finally:
        potential.tracing = previous
    tolerance = 1e-9 if dtype == torch.float64 else 2e-4
    for seed, n in ((1, 5), (2, 11)):
        z, pos = _example_structure(elements, n, cutoff, seed, dtype, device)
        results = []
        for fn in (core, traced):
            p = pos.clone().requires_grad_(True)
            energy = fn(*_core_inputs(z, p, cutoff))
            (grad,) = torch.autograd.grad(energy, p)
            results.append((float(energy.detach()), grad.detach()))
        (e_ref, f_ref), (e_tr, f_tr) = results
        scale = max(1.0, abs(e_ref), float(f_ref.abs().max()) if f_ref.numel() else 1.0)
        if not (abs(e_ref - e_tr) <= tolerance * scale and float((f_ref - f_tr).abs().max()) <= tolerance * scale):
            raise OpenMMError(
                f"the traced {type(potential).__name__} does not reproduce the model on a {n}-atom cluster "
                f"(energy {e_tr:.10g} vs {e_ref:.10g} eV); this architecture cannot be exported to TorchScript yet"
            )
    return traced


def _load_potential(model, device, dtype):
    from torchmdx.nn.base import Potential

    if isinstance(model, Potential):
        potential = model
        if dtype is None:
            from torchmdx.nn.atoms import half_precision_weights

            half = half_precision_weights(potential)
            if half:  # was "the traced ETPotential does not reproduce the model ... cannot be exported"
                raise OpenMMError(f"the model's weights are {half}, which keep about 3 significant digits; the "
                                  "OpenMM module computes in float32 or float64: pass dtype='float32' (or convert "
                                  "the model with model.float())")
        if dtype is not None:
            from torchmdx.nn.model_file import _finish

            potential = _finish(potential, None, dtype)
        return potential.to(device=device).eval()
    if isinstance(model, (str, os.PathLike)):
        from torchmdx.nn.model_file import load_model

        return load_model(model, device=device, dtype=dtype)
    raise OpenMMError(f"expected a torchmdx Potential or a model file path, got {type(model).__name__}")


def build_module(model, atomic_numbers: Optional[Sequence[int]] = None, atoms: Optional[Sequence[int]] = None, *,
                 forces: str = "autograd", device="cpu", dtype=None, length_unit: str = OPENMM_LENGTH_UNIT,
                 energy_unit: str = OPENMM_ENERGY_UNIT, source: str = ""):
    """The scripted OpenMM module of ``model`` (a Potential or a model file): positions in
    ``length_unit`` -> energy in ``energy_unit``. ``atomic_numbers`` (and ``atoms``, their
    indices among the positions OpenMM passes) make it ready for a ``TorchForce``; without them
    it is generic (see :func:`with_atoms`). ``forces``: 'autograd' (the module returns the
    energy) or 'returned' (energy and forces; ``TorchForce.setOutputsForces(True)``)."""
    import torch

    from torchmdx import __version__
    from torchmdx.openmm.module import OpenMMForcesModule, OpenMMModule

    if forces not in FORCE_CONVENTIONS:
        raise OpenMMError(f"forces must be one of {', '.join(FORCE_CONVENTIONS)}, got {forces!r}")
    length_scale, energy_scale = _unit_factors(length_unit, energy_unit)
    from torchmdx.devices import check_device

    device = check_device(device, "device")
    potential = _load_potential(model, device, dtype)
    cutoff = float(getattr(potential, "cutoff", 0.0) or 0.0)
    if not cutoff > 0:
        raise OpenMMError(f"{source or type(potential).__name__}: the model has no positive cutoff; cannot build its neighbor list")
    known, max_z = model_elements(potential)
    model_dtype = _model_dtype(potential)
    core = _trace_core(potential, cutoff, known or [1, 6, 7, 8], model_dtype, device)
    info = {
        "kind": getattr(potential, "kind", type(potential).__name__),
        "model_dtype": str(model_dtype).replace("torch.", ""),
        "max_z": max_z,
        "source": str(source),
        "torchmdx_version": __version__,
        "torch_version": torch.__version__,
        "normalisation": potential.normalisation() if hasattr(potential, "normalisation") else None,
    }
    cls = OpenMMForcesModule if forces == "returned" else OpenMMModule
    eager = cls(core, cutoff, length_scale, energy_scale, length_unit, energy_unit, device.type, known,
                json.dumps(info, sort_keys=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.script(eager)
    if atomic_numbers is not None:
        module = with_atoms(module, atomic_numbers, atoms)
    return module


def model_elements(potential):
    """(the atomic numbers ``potential`` knows (empty: any), one past the largest atomic number
    it can embed)."""
    known = getattr(potential, "elements", None)
    known = [int(z) for z in known] if known else []
    config = getattr(potential, "config", None)
    max_z = int(getattr(config, "max_z", 0) or 0) or (max(known) + 1 if known else 119)
    return known, max_z


def check_ml_elements(atomic_numbers: Iterable[Optional[int]], known: Iterable[int], max_z: int,
                      names: Optional[Sequence[str]] = None, source: str = "the model") -> list:
    """The atomic numbers of the ML atoms as ints, refused in one line (:class:`OpenMMError`): no
    atoms, an atom without element, an element the model does not know (``known``: its elements,
    empty for any below ``max_z``; ``names`` label the atoms, e.g. OpenMM's residue and atom names)."""
    zs = list(atomic_numbers)
    if not zs:
        raise OpenMMError("the ML region is empty; give at least one atom")
    known = set(int(z) for z in known)
    for k, z in enumerate(zs):
        if z is None:
            raise OpenMMError(f"{_atom_label(k, names)} of the ML region has no element; torchmdx models need one for every "
                              "ML atom: leave virtual sites and extra particles out of the ML atoms")
        z = int(z)
        if (known and z not in known) or not 0 < z < max_z:
            have = ", ".join(_element_name(e) for e in sorted(known)) if known else f"Z 1..{max_z - 1}"
            raise OpenMMError(f"{_atom_label(k, names)} of the ML region is element {_element_label(z)}, which {source} "
                              f"does not know (its elements: {have}); leave it out of the ML atoms or use a model trained on {_element_name(z)}")
    return [int(z) for z in zs]


def _atom_label(k: int, names: Optional[Sequence[str]]) -> str:
    return names[k] if names is not None and k < len(names) else f"atom {k}"


def with_atoms(module, atomic_numbers: Iterable[Optional[int]], atoms: Optional[Iterable[int]] = None,
               names: Optional[Sequence[str]] = None, source: str = "the model"):
    """Set the ML atoms of ``module`` (in place; returned): their atomic numbers and, when the
    module will see more positions than ML atoms (a ``TorchForce`` sees the whole System), their
    ``atoms`` indices. Refused in one line (:class:`OpenMMError`): an atom without element, an
    element the model does not know (``names`` label the atoms in the message, e.g. OpenMM's
    residue and atom names), repeated or negative indices, a count mismatch."""
    import torch

    zs = check_ml_elements(atomic_numbers, module.elements, int(metadata(module)["model"].get("max_z") or 119), names,
                           source)
    device = module.atomic_numbers.device
    module.atomic_numbers = torch.tensor([int(z) for z in zs], dtype=torch.long, device=device)
    if atoms is None:
        module.indices = torch.zeros(0, dtype=torch.long, device=device)
        module.max_index = -1
    else:
        idx = [int(a) for a in atoms]
        if len(idx) != len(zs):
            raise OpenMMError(f"{len(idx)} atom indices were given for {len(zs)} atomic numbers; give one index per ML atom")
        if len(set(idx)) != len(idx) or min(idx) < 0:
            raise OpenMMError("the ML atom indices must be distinct and non-negative")
        module.indices = torch.tensor(idx, dtype=torch.long, device=device)
        module.max_index = max(idx)
    return module


def metadata(module) -> dict:
    """What the exported file records about ``module`` (plain Python)."""
    from torchmdx import units

    info = json.loads(module.info)
    z = module.atomic_numbers.tolist()
    idx = module.indices.tolist()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "units": {"positions": module.length_unit, "box": module.length_unit, "energy": module.energy_unit,
                  "forces": f"{module.energy_unit}/{module.length_unit}"},
        "constants": {"length_to_angstrom": module.length_to_angstrom, "energy_from_ev": module.energy_from_ev,
                      "source": "torchmdx.units (ASE's CODATA 2014)", "EV_TO_KJ_PER_MOL": units.EV_TO_KJ_PER_MOL},
        "cutoff_angstrom": module.cutoff,
        "cutoff": module.cutoff / module.length_to_angstrom,
        "elements": list(module.elements) or None,
        "element_symbols": [_element_name(e) for e in module.elements] or None,
        "atomic_numbers": z or None,
        "atoms": idx or None,
        "forces": "returned" if module.outputs_forces else "autograd",
        "device": module.device_type,
        "model": info,
        "signature": "forward(positions[N,3], box[3,3] | None) -> " + ("(energy, forces[N,3])" if module.outputs_forces else "energy"),
    }


def save_module(module, path: Union[str, Path], force: bool = False) -> Path:
    """Write ``module`` with its metadata (atomic: temporary name, then rename)."""
    import torch

    from torchmdx.io_utils import temporary_path

    path = Path(path)
    if path.is_dir():
        raise OpenMMError(f"{path}: is a folder; give a file name, e.g. {path / 'model_openmm.pt'}")
    if path.exists() and not force:
        raise OpenMMError(f"{path}: exists; pass --force to replace it, or choose another name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OpenMMError(f"{path}: folder {parent} does not exist")
    tmp = temporary_path(path)
    try:
        torch.jit.save(module, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata(module), indent=1, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def export_openmm(model, output: Union[str, Path, None] = None, *, atomic_numbers=None, atoms=None, forces: str = "autograd",
                  device="cpu", dtype=None, length_unit: str = OPENMM_LENGTH_UNIT, energy_unit: str = OPENMM_ENERGY_UNIT,
                  force: bool = False):
    """:func:`build_module` and, with ``output``, :func:`save_module`. Returns the module."""
    if output is not None and Path(output).exists() and not force and not Path(output).is_dir():
        raise OpenMMError(f"{output}: exists; pass --force to replace it, or choose another name")
    source = str(model) if isinstance(model, (str, os.PathLike)) else ""
    module = build_module(model, atomic_numbers, atoms, forces=forces, device=device, dtype=dtype,
                          length_unit=length_unit, energy_unit=energy_unit, source=source)
    if output is not None:
        save_module(module, output, force=force)
    return module


def is_openmm_export(path: Union[str, Path]) -> bool:
    """Is ``path`` a file written by :func:`save_module` (a TorchScript archive with our metadata)?"""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(f"extra/{METADATA_FILE}") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def read_metadata(path: Union[str, Path]) -> dict:
    """The metadata of an exported file, without loading the module."""
    path = Path(path)
    if not path.is_file():
        from torchmdx.io_utils import missing_file_reason

        raise OpenMMError(f"{path}: {missing_file_reason(path)}")
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"extra/{METADATA_FILE}")), None)
            if name is None:
                raise OpenMMError(f"{path}: not a torchmdx OpenMM export (no {METADATA_FILE}); write one with "
                                  f"torchmdx export --openmm model.pt -o {path.stem}_openmm.pt")
            return json.loads(archive.read(name))
    except zipfile.BadZipFile:
        raise OpenMMError(f"{path}: not a torchmdx OpenMM export (not a TorchScript archive)") from None


def check_openmm_units(meta: dict, source: str) -> None:
    """One line naming what to change unless ``meta`` says nm in, kJ/mol out (OpenMM's units)."""
    got = meta.get("units", {})
    if got.get("positions") != OPENMM_LENGTH_UNIT or got.get("energy") != OPENMM_ENERGY_UNIT:
        raise OpenMMError(
            f"{source}: takes positions in {got.get('positions')} and returns energies in {got.get('energy')}, but OpenMM passes nm "
            f"and expects kJ/mol; export it again with length_unit='nm', energy_unit='kJ/mol' (torchmdx export --openmm does)"
        )


def load_module(path: Union[str, Path], device=None, openmm_units: bool = True):
    """(module, metadata) of an exported file; ``openmm_units``: refuse other units than nm / kJ/mol."""
    import torch

    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise OpenMMError(f"{path}: not a torchmdx OpenMM export (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise OpenMMError(f"{path}: export format {meta['format_version']} is newer than this torchmdx reads ({FORMAT_VERSION}); upgrade torchmdx")
    if openmm_units:
        check_openmm_units(meta, str(path))
    if device is not None and torch.device(device).type != meta.get("device"):
        raise OpenMMError(f"{path}: was exported for device {meta.get('device')} but is to run on {torch.device(device).type}; "
                          f"export it again with --device {torch.device(device).type}")
    module = torch.jit.load(str(path), map_location=device)
    return module, meta


def box_check(box_vectors_angstrom, cutoff_angstrom: float, source: str = "the model") -> None:
    """One line unless the box (3 rows, Å) is more than twice ``cutoff`` wide in every direction."""
    import numpy as np

    a, b, c = (np.asarray(v, dtype=float) for v in box_vectors_angstrom)
    volume = abs(float(np.dot(a, np.cross(b, c))))
    widths = [volume / float(np.linalg.norm(np.cross(u, v))) for u, v in ((b, c), (c, a), (a, b))]
    narrowest = min(widths)
    if not 2 * cutoff_angstrom < narrowest or not math.isfinite(narrowest):
        raise OpenMMError(
            f"the periodic box is {narrowest / 10:.4g} nm wide at its narrowest, not more than twice the cutoff of {source} "
            f"({cutoff_angstrom / 10:g} nm); use a box at least {2 * cutoff_angstrom / 10:.4g} nm wide (minimum image)"
        )
