"""The static part of a simulation (atoms, masses, cells) and the dynamic state, as tensors.

Units (ASE's, so that nothing is converted inside the step):
positions Å; velocities in Å per ASE time unit (= sqrt(eV/amu)); forces eV/Å; masses amu;
energies eV; the time step in ASE time units (1 fs = ``units.FS_TO_ASE_TIME``). Then the
kinetic energy is K = ½ Σ m v² in eV and a = F / m with no factor.

Many structures (replicas of one molecule, or different molecules) are simulated together as
one batch (PyG convention: ``batch[a]`` is the structure of atom ``a``); every per-structure
quantity (kinetic energy, temperature, thermostat variables) is a tensor [B].
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

import numpy as np
import torch

from torchmdx import units
from torchmdx.errors import DataError
from torchmdx.nn.atoms import beyond_dtype


def per_structure_sum(values: torch.Tensor, batch: torch.Tensor, num_structures: int) -> torch.Tensor:
    """Σ over the atoms of each structure: values [N, ...] -> [B, ...]."""
    out = torch.zeros((num_structures,) + tuple(values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add(0, batch, values)


@dataclass
class System:
    """Atoms of a batch of structures on one device.

    z [N] long; masses [N] (amu); batch [N] long; cell [B, 3, 3] (Å, rows are lattice vectors)
    or None; pbc [B, 3] bool or None (None: no structure is periodic); degrees_of_freedom [B]:
    N_f = 3 n - 3 for n > 1 atoms (the centre-of-mass motion is removed and kept at zero),
    3 for a single atom. ``templates`` are the input ``ase.Atoms`` (used to write frames).
    """

    z: torch.Tensor
    masses: torch.Tensor
    batch: torch.Tensor
    num_structures: int
    counts: list
    cell: Optional[torch.Tensor]
    pbc: Optional[torch.Tensor]
    degrees_of_freedom: torch.Tensor
    total_mass: torch.Tensor
    multi_atom: torch.Tensor
    templates: list = field(default_factory=list, repr=False)

    @property
    def num_atoms(self) -> int:
        return int(self.z.shape[0])

    @property
    def periodic(self) -> bool:
        return self.pbc is not None

    @property
    def device(self) -> torch.device:
        return self.z.device

    @property
    def dtype(self) -> torch.dtype:
        return self.masses.dtype

    @property
    def offsets(self) -> list:
        """First atom of each structure (host list)."""
        return list(np.cumsum([0] + list(self.counts[:-1])))

    @classmethod
    def from_atoms(cls, atoms_list: Sequence, device="cpu", dtype=torch.float32) -> "System":
        """Batch ``ase.Atoms`` objects; masses from ``atoms.get_masses()`` (ase.data.atomic_masses
        unless the structure sets its own)."""
        if not atoms_list:
            raise DataError("no structures to simulate")
        zs, masses, batch, counts, cells, pbcs = [], [], [], [], [], []
        for b, atoms in enumerate(atoms_list):
            n = len(atoms)
            if n == 0:
                raise DataError(f"structure {b} has no atoms")
            positions = atoms.get_positions()
            if not np.isfinite(positions).all():
                bad = int(np.nonzero(~np.isfinite(positions).all(1))[0][0])
                raise DataError(f"structure {b}: atom {bad} has a non-finite position {positions[bad].tolist()}")
            line = beyond_dtype(positions, dtype, atoms.numbers)
            if line:  # 1e200 Å in float32 became inf: "non-finite [inf, ...]" of a finite number
                raise DataError(f"structure {b}: {line}")
            zs.append(atoms.numbers)
            masses.append(atoms.get_masses())
            batch.append(np.full(n, b))
            counts.append(n)
            pbc = np.asarray(atoms.pbc, dtype=bool)
            if pbc.any() and abs(np.linalg.det(atoms.cell.array)) < 1e-9:
                raise DataError(f"structure {b} is periodic ({pbc.tolist()}) but its cell has no volume")
            cells.append(atoms.cell.array)
            pbcs.append(pbc)
        any_pbc = any(p.any() for p in pbcs)
        masses_np = np.concatenate(masses)
        invalid = ~(np.isfinite(masses_np) & (masses_np > 0))  # a NaN mass passed `<= 0`
        if invalid.any():
            bad = int(np.nonzero(invalid)[0][0])
            b = int(np.concatenate(batch)[bad])
            raise DataError(f"structure {b}: atom {bad - sum(counts[:b])} has mass {masses_np[bad]} amu; "
                            "masses must be finite and positive")
        counts_t = torch.tensor(counts, dtype=dtype)
        dof = torch.where(counts_t > 1, 3.0 * counts_t - 3.0, 3.0 * counts_t)
        total_mass = torch.tensor([float(m.sum()) for m in masses], dtype=dtype)
        return cls(
            z=torch.as_tensor(np.concatenate(zs), dtype=torch.long, device=device),
            masses=torch.as_tensor(masses_np, dtype=dtype, device=device),
            batch=torch.as_tensor(np.concatenate(batch), dtype=torch.long, device=device),
            num_structures=len(atoms_list),
            counts=counts,
            cell=torch.as_tensor(np.stack(cells), dtype=dtype, device=device) if any_pbc else None,
            pbc=torch.as_tensor(np.stack(pbcs), dtype=torch.bool, device=device) if any_pbc else None,
            degrees_of_freedom=dof.to(device),
            total_mass=total_mass.to(device),
            multi_atom=(counts_t > 1).to(device),
            templates=[a.copy() for a in atoms_list],
        )

    def positions_from_templates(self, wrap: bool = False) -> torch.Tensor:
        """The templates' positions [N, 3]; ``wrap``: periodic directions wrapped into the cell in
        float64 first (wrapped after the conversion, float32 positions 10^5 Å out kept steps of
        0.008 Å)."""
        pos = np.concatenate([wrapped_positions(a) if wrap else a.get_positions() for a in self.templates])
        return torch.as_tensor(pos, dtype=self.dtype, device=self.device)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return per_structure_sum(values, self.batch, self.num_structures)

    def kinetic_energy(self, velocities: torch.Tensor) -> torch.Tensor:
        """K_b = ½ Σ_{a in b} m_a |v_a|² (eV) [B]."""
        return self.sum(0.5 * self.masses * (velocities * velocities).sum(-1))

    def temperature(self, kinetic: torch.Tensor) -> torch.Tensor:
        """T_b = 2 K_b / (N_f k_B) (K) [B]."""
        return 2.0 * kinetic / (self.degrees_of_freedom * units.BOLTZMANN_EV_PER_K)

    def momentum(self, velocities: torch.Tensor) -> torch.Tensor:
        """Total momentum of each structure Σ m v (amu·Å/ASE time) [B, 3]."""
        return self.sum(self.masses.unsqueeze(-1) * velocities)

    def remove_com_velocity(self, velocities: torch.Tensor) -> torch.Tensor:
        """v - (Σ m v)/(Σ m) per structure of more than one atom (zero total momentum)."""
        com = self.momentum(velocities) / self.total_mass.unsqueeze(-1)
        com = torch.where(self.multi_atom.unsqueeze(-1), com, torch.zeros_like(com))
        return velocities - com[self.batch]

    def maxwell_boltzmann(self, temperature_K: float, generator: torch.Generator) -> torch.Tensor:
        """Velocities v_a ~ N(0, k_B T / m_a) per component, then zero total momentum per
        structure (not rescaled: the instantaneous temperature fluctuates around T)."""
        kT = units.BOLTZMANN_EV_PER_K * float(temperature_K)
        noise = torch.randn(self.num_atoms, 3, generator=generator, device=self.device, dtype=self.dtype)
        velocities = noise * torch.sqrt(kT / self.masses).unsqueeze(-1)
        return self.remove_com_velocity(velocities)

    def wrap(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions wrapped into the cell along periodic directions: r - floor(s) @ cell with
        s = r @ cell⁻¹ (atoms of non-periodic structures and directions untouched)."""
        if self.cell is None:
            return positions
        periodic = self.pbc.any(-1)
        eye = torch.eye(3, dtype=self.cell.dtype, device=self.cell.device).expand_as(self.cell)
        cell_b = torch.where(periodic.view(-1, 1, 1), self.cell, eye)  # a molecule's cell may be 0
        cell = cell_b[self.batch]
        frac = torch.linalg.solve(cell.transpose(1, 2), positions.unsqueeze(-1)).squeeze(-1)
        shift = torch.where(self.pbc[self.batch], torch.floor(frac), torch.zeros_like(frac))
        return positions - torch.einsum("nk,nkl->nl", shift, cell)

    def volume(self) -> Optional[torch.Tensor]:
        return None if self.cell is None else torch.linalg.det(self.cell).abs()


#: float32 positions at or beyond this distance from the origin (Å) are 2^-10 Å (~0.001 Å) apart or more
FLOAT32_REACH = 8192.0


def float32_reach_problem(atoms, wrap: bool = True) -> Optional[str]:
    """Why ``atoms`` cannot run in float32 (an atom as far from the origin as
    :data:`FLOAT32_REACH`, after periodic directions are wrapped in float64 when ``wrap``), else
    None. Float32 positions 10^5 Å out move in steps of 0.008 Å (10^6 Å: 0.06 Å), and forces and
    energies lose as much, silently."""
    pos = wrapped_positions(atoms) if wrap else np.asarray(atoms.get_positions(), dtype=np.float64)
    if not len(pos):
        return None
    far = np.abs(pos).max(1)
    a = int(np.argmax(far))
    if not far[a] >= FLOAT32_REACH:
        return None
    if far[a] > float(np.finfo(np.float32).max):  # the spacing of inf: "positions are nan Å apart"
        return beyond_dtype(pos, torch.float32, atoms.numbers, advice=False)
    step = float(np.spacing(np.float32(far[a])))
    return (f"atom {a} ({atoms.get_chemical_symbols()[a]}) lies {far[a]:.4g} Å from the origin, where float32 "
            f"positions are {step:.2g} Å apart (forces and the integration lose that much)")


def wrapped_positions(atoms) -> np.ndarray:
    """``atoms``' positions [n, 3] (float64) with the periodic directions wrapped into the cell
    (as :meth:`System.wrap`); atoms already inside, and non-periodic structures, unchanged."""
    pos = np.asarray(atoms.get_positions(), dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not pbc.any():
        return pos
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    frac = np.linalg.solve(cell.T, pos.T).T
    shift = np.where(pbc, np.floor(frac), 0.0)
    outside = shift.any(1)
    if outside.any():
        pos = pos.copy()
        pos[outside] -= shift[outside] @ cell
    return pos


@dataclass
class MDState:
    """The dynamic state. positions [N, 3] Å, velocities [N, 3] Å/ASE-time, forces [N, 3] eV/Å,
    energy [B] potential energy (eV), thermostat_energy [B] (eV): the energy the thermostat
    took out of the system, so that ``energy + K + thermostat_energy`` is conserved by every
    integrator (exactly in continuous time; its drift measures the integration error).
    ``step`` is a host integer (never read back from the device).

    Integrators replace these tensors rather than modifying them in place, so a snapshot of
    the state is a shallow copy.
    """

    positions: torch.Tensor
    velocities: torch.Tensor
    forces: torch.Tensor
    energy: torch.Tensor
    thermostat_energy: torch.Tensor
    step: int = 0

    def copy(self) -> "MDState":
        return MDState(**{f.name: getattr(self, f.name) for f in fields(self)})
