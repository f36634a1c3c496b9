"""The TorchScript module that OpenMM's ``TorchForce`` loads: positions (nm) -> energy (kJ/mol).

openmm-torch calls ``module(positions)`` (``module(positions, box)`` when the force uses periodic
boundary conditions) with the positions of *every* particle of the System, float64 on the
Reference/CPU platforms; it takes forces by autograd (``-dE/dpositions``), or, with
``setOutputsForces(True)``, from a second return value. This module

1. picks the ML atoms (``indices``; empty: all positions given) and converts to Å
   (``length_to_angstrom``, :data:`torchmdx.units.NM_TO_ANGSTROM` for OpenMM);
2. finds their pairs within the model's cutoff (:mod:`torchmdx.openmm.neighbors`, TorchScript,
   minimum image in a periodic box) and the differentiable edge vectors;
3. evaluates the model's ``atomic_energies`` on that graph through a *traced* copy of the
   model (``torch.jit.trace`` of :class:`EnergyCore`: the model code itself, on the torch
   reference message path, nothing re-implemented), and sums them (eV);
4. returns ``energy_from_ev`` times that (:data:`torchmdx.units.EV_TO_KJ_PER_MOL` for OpenMM),
   float64 — and in the ``outputs_forces`` variant also the forces on every particle
   (``-dE/dpositions``, zero outside the ML region).

A non-finite position of an ML atom, or two ML atoms on top of each other, raise a
``RuntimeError`` starting "torchmdx:" that names the particles (both gave a finite, wrong energy:
the pairs dropped out of the model's sums).

The atomic numbers of the ML atoms are buffers (``atomic_numbers``, ``indices``): an export
without a structure is generic, and :func:`torchmdx.openmm.export.with_atoms` (which openmm-ml's
``MLPotential("torchmdx")`` calls with the Topology) fills them in after checking the elements.

A trace records the device of the tensors it creates: a module exported on the CPU runs on
OpenMM's Reference and CPU platforms; for the CUDA platform export with ``device="cuda"``
(``torchmdx export --openmm --device cuda``). The module checks this and says so.
"""


import math
from typing import List, Optional, Tuple

import torch

from torchmdx.data.coincident import FAR_COORDINATE, FAR_NEIGHBOUR  # coordinates too far out (Å), round 38
from torchmdx.openmm.neighbors import edge_geometry, pairs_within
from torchmdx.nn.normalised import OVERLAP_DISTANCE  # distinct atoms closer than this (Å) are refused


def _short(x: float) -> str:
    """``x`` in at most 6 significant digits ("1e+15", "0.125", "16384"), as Python's ``f"{x:.6g}"`` writes it for
    the messages here (TorchScript's ``str(1e15)`` is "1000000000000000.", its ``str(0.0025)`` "0.0025000000000000001":
    the digits are made from an integer)."""
    if x == 0.0 or not math.isfinite(x):
        return str(x)
    sign = "-" if x < 0 else ""
    a = abs(x)
    e = int(math.floor(math.log10(a)))
    n = int(round(a / 10.0 ** (e - 5)))  # the 6 significant digits
    if n >= 1000000:
        n, e = int(round(n / 10.0)), e + 1
    elif n < 100000:
        n, e = n * 10, e - 1
    digits = str(n)
    if -4 <= e < 6:
        if e >= 0:
            text = digits[:e + 1] + "." + digits[e + 1:]
        else:
            zeros = ""
            for _ in range(-e - 1):
                zeros += "0"
            text = "0." + zeros + digits
        return sign + text.rstrip("0").rstrip(".")
    mantissa = (digits[0] + "." + digits[1:]).rstrip("0").rstrip(".")
    return sign + mantissa + "e" + ("+" if e >= 0 else "-") + ("0" if abs(e) < 10 else "") + str(abs(e))


class EnergyCore(torch.nn.Module):
    """Eager wrapper that :func:`torch.jit.trace` records: (z, edge_index, vectors, distances)
    -> total energy (eV, float64) of one structure, by the potential's own ``atomic_energies``."""

    def __init__(self, potential):
        super().__init__()
        self.potential = potential

    def forward(self, z, edge_index, vectors, distances):
        from torchmdx.nn.base import Graph

        n = z.shape[0]
        graph = Graph(z, vectors.new_zeros(n, 3), torch.zeros_like(z), 1, edge_index, vectors, distances, None)
        return self.potential.atomic_energies(graph).sum().to(torch.float64)


class OpenMMModule(torch.nn.Module):
    """positions [N, 3] (``length_unit``), optional box [3, 3] -> energy (``energy_unit``), float64."""

    cutoff: float
    length_to_angstrom: float
    energy_from_ev: float
    length_unit: str
    energy_unit: str
    device_type: str
    elements: List[int]
    max_index: int
    outputs_forces: bool
    overlap_distance: float
    far_coordinate: float
    far_neighbour: float
    info: str

    def __init__(self, core, cutoff: float, length_to_angstrom: float, energy_from_ev: float, length_unit: str,
                 energy_unit: str, device_type: str, elements: List[int], info: str):
        super().__init__()
        self.core = core
        self.cutoff = float(cutoff)
        self.length_to_angstrom = float(length_to_angstrom)
        self.energy_from_ev = float(energy_from_ev)
        self.length_unit = length_unit
        self.energy_unit = energy_unit
        self.device_type = device_type
        self.elements = [int(z) for z in elements]
        self.max_index = -1
        self.outputs_forces = False
        self.overlap_distance = float(OVERLAP_DISTANCE)
        self.far_coordinate = float(FAR_COORDINATE)
        self.far_neighbour = float(FAR_NEIGHBOUR)
        self.info = info
        self.register_buffer("atomic_numbers", torch.zeros(0, dtype=torch.long))
        self.register_buffer("indices", torch.zeros(0, dtype=torch.long))

    def energy(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Energy (``energy_unit``) of the ML atoms among ``positions`` (``length_unit``)."""
        z = self.atomic_numbers
        if z.numel() == 0:
            raise RuntimeError("torchmdx: this OpenMM module has no atoms yet; give the ML atoms with "
                               "torchmdx.openmm.with_atoms(module, atomic_numbers) or MLPotential('torchmdx')")
        if positions.device.type != self.device_type:
            raise RuntimeError("torchmdx: this module was exported for device " + self.device_type + " but is run on "
                               + positions.device.type + "; export it again with --device " + positions.device.type)
        pos = positions
        if self.indices.numel() > 0:
            if self.max_index >= positions.shape[0]:
                raise RuntimeError("torchmdx: the ML region includes atom " + str(self.max_index) + " but only "
                                   + str(positions.shape[0]) + " positions were given")
            pos = positions.index_select(0, self.indices)
        elif positions.shape[0] != z.shape[0]:
            raise RuntimeError("torchmdx: " + str(positions.shape[0]) + " positions were given to a module for "
                               + str(z.shape[0]) + " atoms; give the ML atoms' indices (atoms=...)")
        pos = pos * self.length_to_angstrom
        held = pos.detach()
        finite = torch.isfinite(held).all(dim=1)
        far = held.abs().amax(dim=1) > self.far_coordinate  # one host read for both, as before for the first
        if bool((far | ~finite).any()):
            if not bool(finite.all()):  # was no pair within the cutoff: the atomic reference energies, zero forces
                bad = int((~finite).nonzero()[0, 0])
                raise RuntimeError("torchmdx: particle " + str(self.particle(bad)) + " (an ML atom) has a non-finite "
                                   "position (NaN or infinite: the simulation blew up, or the positions were never "
                                   "set)")
            self.check_far(held, far)
        cell: Optional[torch.Tensor] = None
        if box is not None:
            cell = box.to(pos.dtype) * self.length_to_angstrom
        edge_index, shifts = pairs_within(pos, self.cutoff, cell)
        vectors, distances = edge_geometry(pos, edge_index, shifts, cell)
        close = distances.detach() < self.overlap_distance
        if bool(close.any()):  # the pair dropped out of the model's sums silently: a finite, wrong energy
            e = int(close.nonzero()[0, 0])
            raise RuntimeError("torchmdx: particles " + str(self.particle(int(edge_index[0, e]))) + " and "
                               + str(self.particle(int(edge_index[1, e]))) + " (ML atoms) are on top of each other (distance "
                               + str(float(distances[e].detach())) + " Å)")
        return self.core(z, edge_index, vectors, distances) * self.energy_from_ev

    def check_far(self, pos: torch.Tensor, far: torch.Tensor) -> None:
        """A RuntimeError naming the first ML atom beyond ``far_coordinate`` (Å) with another ML atom near it
        (:func:`torchmdx.data.coincident.far_atom`'s rule: within ``far_neighbour``, or 8 steps of the float type
        at its coordinates): a molecule moved out that far gave a finite, wrong energy without a word (1e15 Å: -30.3
        for -15.3 kJ/mol; round 38). One atom far from all the others is an isolated atom, as elsewhere."""
        for k in range(int(far.sum())):
            a = int(far.nonzero()[k, 0])
            if pos.shape[0] < 2:
                return
            distances = torch.linalg.vector_norm(pos - pos[a], dim=1)
            distances[a] = math.inf
            nearest = float(distances[torch.isfinite(distances)].min()) if bool(torch.isfinite(distances).any()) \
                else math.inf
            largest = pos[a].abs().max()
            spacing = float(torch.nextafter(largest, largest * 2) - largest)
            if nearest < max(self.far_neighbour, 8 * spacing):
                raise RuntimeError("torchmdx: particle " + str(self.particle(a)) + " (an ML atom) is at ["
                                   + _short(float(pos[a, 0])) + ", " + _short(float(pos[a, 1])) + ", "
                                   + _short(float(pos[a, 2])) + "] Å, beyond " + _short(self.far_coordinate)
                                   + " Å from the origin: " + ("float64" if pos.dtype == torch.float64 else "float32")
                                   + " coordinates that large are " + _short(spacing) + " Å apart, so the distances "
                                   "between atoms come out wrong; give coordinates near the origin (move the "
                                   "structure there)")

    def particle(self, a: int) -> int:
        """The position index (the System's particle) of ML atom ``a``."""
        if self.indices.numel() > 0:
            return int(self.indices[a])
        return a

    def forward(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.energy(positions, box)


class OpenMMForcesModule(OpenMMModule):
    """The ``outputs_forces`` variant (``TorchForce.setOutputsForces(True)``): returns
    (energy, forces [N, 3]) with forces = -dE/dpositions (``energy_unit`` / ``length_unit``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outputs_forces = True

    def forward(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        pos = positions.detach().requires_grad_(True)
        energy = self.energy(pos, box)
        grads = torch.autograd.grad([energy], [pos], allow_unused=True)
        gradient = grads[0]
        if gradient is None:
            forces = torch.zeros_like(positions)
        else:
            forces = -gradient
        return energy.detach(), forces.detach()
