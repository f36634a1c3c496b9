"""Analytic potentials: Lennard-Jones, Morse and harmonic bonds.

They implement the :class:`torchmdx.nn.base.Potential` contract (per-atom energies on a
:class:`~torchmdx.nn.base.Graph`; energy sums, forces and stress come from the base class by
autograd), so the MD engine, the ASE calculator and their tests run without a trained model.
Each class has a ``kind`` name and :meth:`hparams` (its constructor arguments, plain Python),
which is what a model file stores for it.

All of them use a *full* neighbor list (both (i, j) and (j, i), the default of
:meth:`Potential.neighbors`): a pair energy φ(r_ij) is split equally between its two atoms,
E_i = ½ Σ_j φ(r_ij). Edges with ``mask`` False or r >= cutoff (a list built with a Verlet skin)
get exactly zero energy and zero gradient.

Units: energies eV, lengths Å, force constants eV/Å², Morse width 1/Å.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch

from torchmdx.errors import ModelError
from torchmdx.nn.base import Graph, Potential, check_overlaps

_NUM_ELEMENTS = 119  # atomic numbers 0..118


def _checked(potential: Potential, graph: Graph) -> None:
    """Refuse two atoms of ``graph`` at one position, as the networks do ("atoms 0 and 1 are on top of each other
    (distance 0 Å)", :func:`torchmdx.nn.base.check_overlaps`): the r = 0 pairs get no energy here (padding rows
    rely on that), so such a structure gave 0 eV and zero forces, silently (round 24). Not while traced."""
    if not potential.tracing:
        check_overlaps(graph)


def _within_cutoff(graph: Graph, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [E] bool, r [E]) with invalid distances replaced by ``cutoff`` (finite, no NaN grad)."""
    r = graph.distances
    valid = r < cutoff
    if graph.mask is not None:
        valid = valid & graph.mask
    valid = valid & (r > 0)
    r_safe = torch.where(valid, r, torch.full_like(r, cutoff))
    return valid, r_safe


def _pair_to_atoms(graph: Graph, pair_energy: torch.Tensor) -> torch.Tensor:
    """E_i = ½ Σ_j φ_ij over a full list (the receiver i gets half of each of its pairs)."""
    out = torch.zeros(graph.pos.shape[0], dtype=pair_energy.dtype, device=pair_energy.device)
    return out.index_add(0, graph.edge_index[0], 0.5 * pair_energy)


def _real(value, name: str, minimum: Optional[float] = None, strict: bool = False, unit: str = "") -> float:
    """``value`` as a finite float (a NaN or text parameter gave NaN energies or a ValueError
    traceback), at least ``minimum`` (above it with ``strict``); one-line ModelErrors."""
    import math
    import numbers

    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d numpy array or tensor
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ModelError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ModelError(f"{name} must be a finite number, got {number}")
    if minimum is not None and (number <= minimum if strict else number < minimum):
        raise ModelError(f"{name} must be {'>' if strict else '>='} {minimum:g}{unit}, got {number:g}")
    return number


def _element_table(value, name: str, default_fill: float = float("nan"), minimum: Optional[float] = None,
                   strict: bool = False, unit: str = "") -> tuple[torch.Tensor, Optional[list[int]]]:
    """A per-element parameter [119] from a number (all elements) or a {Z: value} mapping."""
    table = torch.full((_NUM_ELEMENTS,), default_fill, dtype=torch.float64)
    if isinstance(value, Mapping):
        elements = []
        for key, v in value.items():
            try:
                z = int(key)
            except (TypeError, ValueError):
                z = -1
            if isinstance(key, bool) or not 0 < z < _NUM_ELEMENTS or str(z) != str(key).strip():
                raise ModelError(f"{name}: atomic number {key!r} is not between 1 and 118")
            table[z] = _real(v, f"{name}[{z}]", minimum, strict, unit)
            elements.append(z)
        return table, sorted(elements)
    table[:] = _real(value, name, minimum, strict, unit)
    return table, None


class _PairPotential(Potential):
    """Shared machinery of element-aware pair potentials (element check, hparams)."""

    kind = "pair"
    elements: Optional[list[int]] = None

    def check_elements(self, z: torch.Tensor) -> None:
        if self.elements is None:
            return
        known = torch.zeros(_NUM_ELEMENTS, dtype=torch.bool, device=z.device)
        known[torch.tensor(self.elements, device=z.device)] = True
        ok = known[z.clamp(0, _NUM_ELEMENTS - 1)] & (z >= 0) & (z < _NUM_ELEMENTS)
        if not bool(ok.all()):
            from ase.data import chemical_symbols

            from torchmdx.data.structures import element_label

            bad = int((~ok).nonzero()[0, 0])
            zb = int(z[bad])
            have = ", ".join(chemical_symbols[e] for e in self.elements)
            raise ModelError(
                f"atom {bad} is element {element_label(zb)}, which this {self.kind} potential has no "
                f"parameters for; it knows: {have}"
            )


class LennardJones(_PairPotential):
    """Lennard-Jones pair potential, truncated at ``cutoff`` (Å):

        φ(r) = 4 ε [(σ/r)^12 - (σ/r)^6] - s(r),   r < r_c;   0 beyond

    with ``shift="energy"``: s = φ_LJ(r_c) (energy continuous at r_c; the form of ASE's
    ``LennardJones(smooth=False)``), ``shift="force"``: s = φ_LJ(r_c) + (r - r_c) φ_LJ'(r_c)
    (energy and force continuous: best energy conservation), ``shift="none"``: s = 0.

    ``epsilon`` (eV) and ``sigma`` (Å) are numbers (one parameter set for every element) or
    mappings {atomic number: value}; unlike pairs then use the Lorentz–Berthelot rules
    σ_ij = (σ_i + σ_j)/2, ε_ij = sqrt(ε_i ε_j), and other elements are refused. The cutoff
    defaults to 3 max(σ).
    """

    kind = "lennard_jones"

    def __init__(
        self,
        epsilon: Union[float, Mapping[int, float]] = 1.0,
        sigma: Union[float, Mapping[int, float]] = 1.0,
        cutoff: Optional[float] = None,
        shift: str = "energy",
    ):
        super().__init__()
        if shift not in ("energy", "force", "none"):
            raise ModelError(f"lennard_jones: shift must be 'energy', 'force' or 'none', got {shift!r}")
        eps_table, eps_elements = _element_table(epsilon, "lennard_jones.epsilon", minimum=0.0, unit=" eV")
        sig_table, sig_elements = _element_table(sigma, "lennard_jones.sigma", minimum=0.0, strict=True, unit=" Å")
        if eps_elements is not None and sig_elements is not None and eps_elements != sig_elements:
            raise ModelError("lennard_jones: epsilon and sigma must list the same elements")
        # a plain number for one of them applies to every element listed by the other
        elements = eps_elements if eps_elements is not None else sig_elements
        self.elements = elements
        sig_known = sig_table[torch.tensor(elements)] if elements else sig_table[:1]
        max_sigma = float(sig_known.max())
        self.cutoff = (_real(cutoff, "lennard_jones: cutoff", 0.0, strict=True, unit=" Å") if cutoff is not None
                       else 3.0 * max_sigma)
        self.shift = shift
        self._epsilon_arg = {int(k): float(v) for k, v in epsilon.items()} if isinstance(epsilon, Mapping) else float(epsilon)
        self._sigma_arg = {int(k): float(v) for k, v in sigma.items()} if isinstance(sigma, Mapping) else float(sigma)
        self.register_buffer("epsilon_table", eps_table)
        self.register_buffer("sigma_table", sig_table)

    def hparams(self) -> dict:
        return {"epsilon": self._epsilon_arg, "sigma": self._sigma_arg, "cutoff": self.cutoff, "shift": self.shift}

    def pair_parameters(self, zi: torch.Tensor, zj: torch.Tensor, dtype):
        """(ε_ij, σ_ij) by Lorentz–Berthelot mixing (plain numbers for one parameter set)."""
        if self.elements is None:
            return self._epsilon_arg, self._sigma_arg
        eps = self.epsilon_table.to(dtype)
        sig = self.sigma_table.to(dtype)
        return torch.sqrt(eps[zi] * eps[zj]), 0.5 * (sig[zi] + sig[zj])

    def atomic_energies(self, graph: Graph) -> torch.Tensor:
        _checked(self, graph)
        i, j = graph.edge_index[0], graph.edge_index[1]
        dtype = graph.vectors.dtype
        eps, sig = self.pair_parameters(graph.z[i], graph.z[j], dtype)
        valid, r = _within_cutoff(graph, self.cutoff)
        rc = self.cutoff

        def lj(x):
            s6 = (sig / x) ** 6
            return 4.0 * eps * (s6 * s6 - s6)

        phi = lj(r)
        if self.shift != "none":
            rc_t = torch.full_like(r, rc)
            phi = phi - lj(rc_t)
            if self.shift == "force":
                s6c = (sig / rc) ** 6
                dphi_c = 4.0 * eps * (-12.0 * s6c * s6c + 6.0 * s6c) / rc
                phi = phi - (r - rc) * dphi_c
        phi = torch.where(valid, phi, torch.zeros_like(phi))
        return _pair_to_atoms(graph, phi)


class Morse(_PairPotential):
    """Morse pair potential truncated (energy-shifted) at ``cutoff`` (Å):

        φ(r) = D [(1 - exp(-a (r - r0)))^2 - 1] - φ(r_c),   r < r_c;   0 beyond

    D (eV) is the well depth, r0 (Å) the minimum, a (1/Å) the inverse width. One parameter set
    for every element. The cutoff defaults to r0 + 5/a.
    """

    kind = "morse"

    def __init__(self, depth: float = 1.0, r0: float = 1.0, width: float = 1.0, cutoff: Optional[float] = None):
        super().__init__()
        self.depth = _real(depth, "morse: depth", 0.0, unit=" eV")
        self.r0 = _real(r0, "morse: r0", 0.0, strict=True, unit=" Å")
        self.width = _real(width, "morse: width", 0.0, strict=True, unit=" 1/Å")
        self.cutoff = (_real(cutoff, "morse: cutoff", 0.0, strict=True, unit=" Å") if cutoff is not None
                       else self.r0 + 5.0 / self.width)
        self.elements = None

    def hparams(self) -> dict:
        return {"depth": self.depth, "r0": self.r0, "width": self.width, "cutoff": self.cutoff}

    def _phi(self, r):
        x = 1.0 - torch.exp(-self.width * (r - self.r0))
        return self.depth * (x * x - 1.0)

    def atomic_energies(self, graph: Graph) -> torch.Tensor:
        _checked(self, graph)
        valid, r = _within_cutoff(graph, self.cutoff)
        phi = self._phi(r) - self._phi(torch.full_like(r, self.cutoff))
        phi = torch.where(valid, phi, torch.zeros_like(phi))
        return _pair_to_atoms(graph, phi)


class HarmonicBonds(Potential):
    """Harmonic bonds of one molecule (its replicas may be batched):

        E = Σ_bonds ½ k_b (r_b - r0_b)^2

    ``bonds`` [M, 2] are atom indices *within* the molecule of ``num_atoms`` atoms, ``r0`` [M]
    (Å) and ``k`` [M] (eV/Å²) per bond (or one number). Every structure of a batch must be
    that molecule (same atom count); bond lengths are read from the neighbor-list edges, so
    periodic images work, and ``cutoff`` (Å) must exceed the longest bond stretch reached
    (default 2 max(r0)); a bond stretched past it would silently lose its energy.
    """

    kind = "harmonic_bonds"

    def __init__(
        self,
        bonds: Sequence[Sequence[int]],
        r0: Union[float, Sequence[float]],
        k: Union[float, Sequence[float]] = 10.0,
        num_atoms: Optional[int] = None,
        cutoff: Optional[float] = None,
    ):
        super().__init__()
        bonds_t = torch.as_tensor(bonds, dtype=torch.long).reshape(-1, 2)
        m = bonds_t.shape[0]
        if m == 0:
            raise ModelError("harmonic_bonds: no bonds given")
        if bool((bonds_t[:, 0] == bonds_t[:, 1]).any()):
            raise ModelError("harmonic_bonds: a bond joins an atom to itself")
        r0_t = self._per_bond(r0, "r0", m, strict=True, unit=" Å")
        k_t = self._per_bond(k, "k", m, strict=False, unit=" eV/Å²")
        self.num_atoms = int(num_atoms) if num_atoms is not None else int(bonds_t.max()) + 1
        if int(bonds_t.min()) < 0 or int(bonds_t.max()) >= self.num_atoms:
            raise ModelError(f"harmonic_bonds: bond atom indices must be in 0..{self.num_atoms - 1}")
        self.cutoff = (_real(cutoff, "harmonic_bonds: cutoff", 0.0, strict=True, unit=" Å") if cutoff is not None
                       else 2.0 * float(r0_t.max()))
        if not self.cutoff > float(r0_t.max()):  # every bond would lose its energy beyond the cutoff
            raise ModelError(f"harmonic_bonds: cutoff ({self.cutoff:g} Å) must be longer than the longest bond's "
                             f"r0 ({float(r0_t.max()):g} Å)")
        # both directions, sorted by key i * n + j, for lookup of an edge's bond
        a, b = bonds_t[:, 0], bonds_t[:, 1]
        keys = torch.cat([a * self.num_atoms + b, b * self.num_atoms + a])
        order = torch.argsort(keys)
        keys = keys[order]
        if bool((keys[1:] == keys[:-1]).any()):
            raise ModelError("harmonic_bonds: a bond is listed twice")
        self.register_buffer("bond_keys", keys)
        self.register_buffer("bond_r0", torch.cat([r0_t, r0_t])[order])
        self.register_buffer("bond_k", torch.cat([k_t, k_t])[order])
        self._bonds_arg = bonds_t.tolist()
        self._r0_arg = r0_t.tolist()
        self._k_arg = k_t.tolist()

    @staticmethod
    def _per_bond(value, name: str, m: int, strict: bool, unit: str) -> torch.Tensor:
        """One number or one per bond (finite, > 0 for r0, >= 0 for k) -> [m] float64."""
        import numpy as np

        values = np.asarray(value, dtype=object).reshape(-1) if not isinstance(value, str) else np.array([value], dtype=object)
        if values.size not in (1, m):
            raise ModelError(f"harmonic_bonds: {name} must be one number or one per bond ({m}), got {values.size}")
        numbers = [_real(v, f"harmonic_bonds: {name}", 0.0, strict, unit) for v in values]
        return torch.tensor(numbers, dtype=torch.float64).expand(m).clone()

    @classmethod
    def from_atoms(cls, atoms, k: float = 10.0, scale: float = 1.2, cutoff: Optional[float] = None) -> "HarmonicBonds":
        """Bonds where two atoms are closer than ``scale`` × the sum of their covalent radii
        (ase.data.covalent_radii); r0 = the present distances."""
        import numpy as np
        from ase.data import covalent_radii

        pos = atoms.get_positions()
        radii = covalent_radii[atoms.numbers]
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        limit = scale * (radii[:, None] + radii[None])
        i, j = np.nonzero(np.triu(d < limit, 1))
        if len(i) == 0:
            raise ModelError("harmonic_bonds: no bonded pairs found in the structure")
        return cls(np.stack([i, j], 1).tolist(), d[i, j].tolist(), k, num_atoms=len(atoms), cutoff=cutoff)

    def hparams(self) -> dict:
        return {"bonds": self._bonds_arg, "r0": self._r0_arg, "k": self._k_arg, "num_atoms": self.num_atoms, "cutoff": self.cutoff}

    def atomic_energies(self, graph: Graph) -> torch.Tensor:
        _checked(self, graph)
        n = self.num_atoms
        counts = torch.bincount(graph.batch, minlength=graph.num_structures)
        starts = torch.cumsum(counts, 0) - counts
        local = torch.arange(graph.pos.shape[0], device=graph.pos.device) - starts[graph.batch]
        i, j = graph.edge_index[0], graph.edge_index[1]
        key = local[i] * n + local[j]
        slot = torch.searchsorted(self.bond_keys, key).clamp(max=self.bond_keys.numel() - 1)
        is_bond = self.bond_keys[slot] == key
        if graph.mask is not None:
            is_bond = is_bond & graph.mask
        dtype = graph.vectors.dtype
        r0 = self.bond_r0.to(dtype)[slot]
        k = self.bond_k.to(dtype)[slot]
        r = torch.where(is_bond, graph.distances, r0)
        pair = torch.where(is_bond, 0.5 * k * (r - r0) ** 2, torch.zeros_like(r))
        return _pair_to_atoms(graph, pair)

    def check_elements(self, z: torch.Tensor) -> None:
        if z.numel() % self.num_atoms != 0:
            raise ModelError(
                f"harmonic_bonds: built for a molecule of {self.num_atoms} atoms, got {z.numel()} atoms"
            )


class SumPotential(Potential):
    """Sum of potentials, E_i = Σ_p E_i^(p); the cutoff is the largest of theirs."""

    kind = "sum"

    def __init__(self, potentials: Sequence[Potential]):
        super().__init__()
        self.terms = torch.nn.ModuleList(potentials)
        self.cutoff = max(p.cutoff for p in potentials)

    def check_elements(self, z):
        for p in self.terms:
            p.check_elements(z)

    def hparams(self) -> dict:
        return {"terms": [{"kind": p.kind, "hparams": p.hparams()} for p in self.terms]}

    @classmethod
    def from_hparams(cls, hparams: dict) -> "SumPotential":
        from torchmdx.nn.model_file import potential_class

        terms = []
        for term in hparams.get("terms", []):
            term_cls = potential_class(term["kind"])
            values = dict(term.get("hparams") or {})
            terms.append(term_cls.from_hparams(values) if hasattr(term_cls, "from_hparams") else term_cls(**values))
        if not terms:
            raise ModelError("sum: no terms given")
        return cls(terms)

    def atomic_energies(self, graph: Graph) -> torch.Tensor:
        total = None
        for p in self.terms:
            previous = p.tracing
            p.tracing = previous or self.tracing  # a traced sum: no checks (host reads) in its terms either
            try:
                e = p.atomic_energies(graph)
            finally:
                p.tracing = previous
            total = e if total is None else total + e
        return total


ANALYTIC_KINDS = {cls.kind: cls for cls in (LennardJones, Morse, HarmonicBonds, SumPotential)}
