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


from typing import List, Optional, Tuple

import torch

from torchmdx.openmm.neighbors import edge_geometry, pairs_within
from torchmdx.nn.normalised import OVERLAP_DISTANCE  # distinct atoms closer than this (Å) are refused


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
        finite = torch.isfinite(pos.detach()).all(dim=1)
        if not bool(finite.all()):  # was no pair within the cutoff: the atomic reference energies, zero forces
            bad = int((~finite).nonzero()[0, 0])
            raise RuntimeError("torchmdx: particle " + str(self.particle(bad)) + " (an ML atom) has a non-finite "
                               "position (NaN or infinite: the simulation blew up, or the positions were never set)")
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
