"""Energy normalisation and input checks shared by the potentials that predict per-atom energies.

For structure b with atoms a (eV), from a network's per-atom output y_a::

    t_a = scale · y_a + atomref(z_a) + shift
    E_b = sum_a t_a + energy_offset          (reduce_op 'sum')
    E_b = mean_a t_a + energy_offset         (reduce_op 'mean', intensive targets)
    E_b = sum_a t_a / (n_b + 1) + energy_offset   ('torchmdnet_mean': TorchMD-NET 3.0's 'mean')

``atomref`` [max_z] holds per-element reference energies, ``scale`` and ``shift`` the
standardisation fitted on the training set, ``energy_offset`` a per-structure constant. The
returned per-atom energies sum to E_b exactly. The buffers are float64 whatever the model dtype
(absolute energies of large structures need more than float32's 7 digits). ``known_elements``
restricts the accepted elements (a one-line ModelError names the atom and the known ones), and
atoms on top of each other are refused. Every architecture (ET, Equiformer, ...) subclasses
:class:`NormalisedPotential`, so training, model files and the calculator treat them alike.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from torchmdx.data.structures import element_label
from torchmdx.errors import ModelError
from torchmdx.nn.base import OVERLAP_DISTANCE, Graph, Potential, check_overlaps  # noqa: F401 (OVERLAP_DISTANCE: openmm imports it from here)

#: float64 buffers of the energy normalisation
_NORMALISATION_BUFFERS = ("atomref", "scale", "shift", "energy_offset")



def element_symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"


def _one_item(value):
    """A one-element tensor or numpy array (0-d too: ``np.array(0.5)``, which ``float()`` took
    before the checks below) as its Python number; anything else as it is."""
    if (torch.is_tensor(value) and value.numel() == 1) or (isinstance(value, np.ndarray) and value.size == 1):
        return value.item()
    return value


def _finite_number(value, name: str, positive: bool = False) -> Optional[float]:
    """``value`` as a float (None stays None): a finite number (> 0 when ``positive``), else ModelError."""
    if value is None:
        return None
    value = _one_item(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
            positive and not value > 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise ModelError(f"{name} must be {need} (eV), got {value!r}")
    return float(value)


def _atomic_number(value, name: str) -> int:
    """A whole atomic number (int() read 1.5 as hydrogen); digits as text ('6') are taken."""
    value = _one_item(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        raise ModelError(f"{name}: atomic number {value!r} is not a whole number")
    return int(value)


def _check_atomref_list(table: torch.Tensor, listed: int, elements: Optional[list]) -> None:
    """An atomref list is indexed by Z. One given in the order of ``elements`` (``elements=[1, 6, 8],
    atomref=[-13.6, -1029, -2041]``) gave hydrogen carbon's reference and carbon and oxygen none, without a word:
    refused when an element of the model lies beyond the list while the list gives a reference to a Z the model
    does not know (a full table, e.g. QM9's atomrefs for a model of fewer elements, passes)."""
    if elements is None:
        return
    beyond = [z for z in elements if z >= listed]
    stray = [z for z in range(listed) if float(table[z]) != 0.0 and z not in elements]
    if beyond and stray:
        known = ", ".join(element_symbol(z) for z in elements)
        raise ModelError(
            f"atomref: a list is indexed by atomic number (atomref[1] is H's), and this list of {listed} gives "
            f"{float(table[stray[0]]):g} eV to {element_label(stray[0])}, not one of the model's "
            f"elements ({known}), and nothing to {element_label(beyond[0])} (listed in the order of "
            "the elements?); give {Z: energy}, e.g. {1: -13.6, 6: -1029.0}, or a list with an entry for every Z up to "
            "the largest")


class NormalisedPotential(Potential):
    """A :class:`Potential` whose per-atom energies go through the normalisation above.
    Subclasses call :meth:`register_normalisation` in ``__init__`` and
    :meth:`normalised_energies` in ``atomic_energies``; they have ``config`` (with ``max_z`` and
    ``to_dict``) and ``representation.embedding``."""

    @property
    def dtype(self) -> torch.dtype:
        """The network's floating dtype (its representation's embedding table)."""
        return self.representation.embedding.weight.dtype

    def hparams(self) -> dict:
        """Constructor arguments (the config, with the current dtype), plain Python."""
        values = self.config.to_dict()
        values["dtype"] = "float64" if self.dtype == torch.float64 else "float32"
        return values

    def register_normalisation(self, max_z: int) -> None:
        """The normalisation buffers (identity: no references, scale 1) and every element known."""
        self.register_buffer("atomref", torch.zeros(max_z, dtype=torch.float64))
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("shift", torch.zeros((), dtype=torch.float64))
        self.register_buffer("energy_offset", torch.zeros((), dtype=torch.float64))
        self.register_buffer("known_elements", torch.ones(max_z, dtype=torch.bool))

    def normalised_energies(self, y: torch.Tensor, graph: Graph, reduce_op: str = "sum") -> torch.Tensor:
        """Per-atom energies t_a (eV, float64) from the network's per-atom output ``y`` [N]."""
        t = self.scale * y.to(torch.float64) + self.atomref[graph.z] + self.shift
        counts = torch.zeros(graph.num_structures, dtype=t.dtype, device=t.device).index_add(
            0, graph.batch, torch.ones_like(t)
        )
        per_atom_count = counts[graph.batch]
        if reduce_op == "mean":
            t = t / per_atom_count
        elif reduce_op == "torchmdnet_mean":
            t = t / (per_atom_count + 1)
        return t + self.energy_offset / per_atom_count

    def _apply(self, fn, recurse=True):
        """Module.to()/float()/cuda(): move the normalisation buffers but keep them float64."""
        kept = {name: self._buffers[name] for name in _NORMALISATION_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != torch.float64:
                self._buffers[name] = old.to(device=new.device)
        return self

    @property
    def elements(self) -> Optional[list[int]]:
        """Atomic numbers the model accepts (None: every 0 <= Z < max_z)."""
        known = self.known_elements
        if bool(known.all()):
            return None
        return [int(z) for z in known.nonzero().flatten()]

    def normalisation(self) -> dict:
        """Energy normalisation as plain Python (eV): atomref {Z: value} (non-zero entries),
        scale, shift, energy_offset, elements."""
        atomref = self.atomref.detach().double().cpu()
        return {
            "atomref": {int(z): float(atomref[z]) for z in atomref.nonzero().flatten()},
            "scale": float(self.scale),
            "shift": float(self.shift),
            "energy_offset": float(self.energy_offset),
            "elements": self.elements,
        }

    def set_normalisation(
        self,
        atomref: Union[Mapping[int, float], Sequence[float], torch.Tensor, None] = None,
        scale: Optional[float] = None,
        shift: Optional[float] = None,
        energy_offset: Optional[float] = None,
        elements: Optional[Iterable[int]] = None,
    ) -> "NormalisedPotential":
        """Set the energy normalisation (eV); arguments left None keep their value.

        ``atomref``: {Z: E_ref} or a sequence/tensor indexed by Z (length <= max_z).
        ``elements``: the atomic numbers the model may be used on (training set's elements).
        """
        max_z = self.config.max_z
        scale = _finite_number(scale, "scale", positive=True)  # 0 made every energy and force 0
        shift = _finite_number(shift, "shift")
        energy_offset = _finite_number(energy_offset, "energy_offset")
        if elements is not None:
            elements = sorted({_atomic_number(z, "elements") for z in elements})
            if not elements:  # a model that refuses every structure ("known elements: " and nothing)
                raise ModelError("elements: the list is empty; give the atomic numbers the model was trained on")
            for z in elements:
                if not 0 <= z < max_z:
                    raise ModelError(f"elements: atomic number {z} is outside 0..{max_z - 1} (max_z {max_z})")
        table = None
        if atomref is not None:
            table = torch.zeros(max_z, dtype=torch.float64)
            if isinstance(atomref, Mapping):
                for key, value in atomref.items():
                    z = _atomic_number(key, "atomref")
                    if not 0 <= z < max_z:
                        raise ModelError(f"atomref: atomic number {z} is outside 0..{max_z - 1} (max_z {max_z})")
                    table[z] = _finite_number(value, f"atomref[{z}]")
            else:
                try:
                    values = torch.as_tensor(atomref, dtype=torch.float64).flatten()
                except (TypeError, ValueError, RuntimeError):
                    raise ModelError(f"atomref: expected {{Z: energy}} or a list of energies indexed by Z, got "
                                     f"{str(atomref)[:60]}") from None
                if not bool(torch.isfinite(values).all()):
                    z = int((~torch.isfinite(values)).nonzero()[0, 0])
                    raise ModelError(f"atomref[{z}] must be a finite energy (eV), got {float(values[z])}")
                if values.numel() > max_z:
                    nonzero = values[max_z:].nonzero()
                    if nonzero.numel():
                        raise ModelError(
                            f"atomref: a reference energy is given for Z={max_z + int(nonzero[0])}, beyond max_z {max_z}"
                        )
                    values = values[:max_z]
                table[: values.numel()] = values
                _check_atomref_list(table, values.numel(), elements if elements is not None else self.elements)
        if table is not None:
            self.atomref.copy_(table.to(self.atomref))
        if scale is not None:
            self.scale.fill_(float(scale))
        if shift is not None:
            self.shift.fill_(float(shift))
        if energy_offset is not None:
            self.energy_offset.fill_(float(energy_offset))
        if elements is not None:
            known = torch.zeros(max_z, dtype=torch.bool, device=self.known_elements.device)
            known[elements] = True
            self.known_elements.copy_(known)
        return self

    def check_elements(self, z: torch.Tensor) -> None:
        if z.numel() == 0 or (z.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        max_z = self.config.max_z
        in_range = (z >= 0) & (z < max_z)
        ok = in_range & self.known_elements[z.clamp(0, max_z - 1)]
        if bool(ok.all()):
            return
        bad = int((~ok).nonzero()[0, 0])
        zb = int(z[bad])
        elements = self.elements
        if elements is None:
            raise ModelError(
                f"atom {bad} has atomic number {zb} ({element_symbol(zb)}); this model accepts 0..{max_z - 1} (max_z {max_z})"
            )
        known = ", ".join(element_symbol(e) for e in elements)
        raise ModelError(f"atom {bad} is element {element_label(zb)}, which this model does not know; known elements: {known}")

    def _check_overlaps(self, graph: Graph) -> None:
        check_overlaps(graph)
