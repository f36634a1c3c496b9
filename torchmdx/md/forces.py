"""Forces for the MD engine: a :class:`Potential` plus a Verlet neighbor list with a skin.

The list holds every pair closer than ``cutoff + skin`` when it is built. Until some atom has
moved more than ``skin / 2`` from where it was at the build, no pair outside that list can have
come closer than ``cutoff`` (a pair distance changes by at most the sum of two displacements),
so the list stays exact; pairs of the list beyond ``cutoff`` are masked out at every step.

Every step computes the largest displacement on the device and ORs "list may be stale" into a
device flag; nothing is read back. The engine reads the flag at its check points and, if it
was set, replays those steps in *careful* mode, where the check is synchronous and the list is
rebuilt the moment it is needed. Building the list wraps periodic positions into the cell.

CUDA-graph mode (``rebuild_each_step``): the captured step rebuilds the list on the device at
every step (Triton kernels, fixed capacity, cutoff without skin: 20-200 µs of GPU time, no host
round trip), so nothing can go stale between host checks and no build ever leaves the graph.
The only thing the host has to check is the list's overflow flag, ORed into ``stale``: the engine
then undoes the chunk and replays it in careful mode, where every step builds the exact list
(at cutoff + skin, growing the capacity: a new ``layout_version``, hence a new capture).
"""

from __future__ import annotations

from typing import Optional

import torch

from torchmdx.errors import ModelError
from torchmdx.kernels.neighbors import Neighbors
from torchmdx.md.system import MDState, System
from torchmdx.nn.base import Graph, Potential, edge_vectors, masked_edges


def fit_skin(cutoff: float, skin: float, cell: Optional[torch.Tensor], pbc: Optional[torch.Tensor]) -> float:
    """The skin (Å) actually used: ``skin``, reduced so that cutoff + skin stays within half the
    narrowest perpendicular width of every periodic box (minimum image); 0 if even the cutoff
    does not fit (the neighbor list then reports that)."""
    if cell is None or pbc is None or not bool(pbc.any()):
        return float(skin)
    # the neighbor list checks the widths in the cell's own dtype: a float32 cell's rounding made a skin
    # fitted in float64 to the last 1e-9 too large there ("cutoff 5.26011 Å is larger than half the
    # perpendicular width", an NPT run of a box 5 % above twice the cutoff stopped after 30 steps)
    rounding = 64.0 * torch.finfo(cell.dtype).eps if cell.is_floating_point() else 0.0
    cell = cell.reshape(-1, 3, 3).double()
    pbc = pbc.reshape(-1, 3).expand(cell.shape[0], 3)
    a, b, c = cell[:, 0], cell[:, 1], cell[:, 2]
    volume = torch.linalg.det(cell).abs()
    areas = torch.stack([torch.linalg.cross(b, c).norm(dim=-1), torch.linalg.cross(c, a).norm(dim=-1),
                         torch.linalg.cross(a, b).norm(dim=-1)], dim=-1)
    widths = volume.unsqueeze(-1) / areas.clamp(min=1e-30)
    half = float(torch.where(pbc, widths, torch.full_like(widths, float("inf"))).min()) / 2.0
    room = (half - float(cutoff)) * (1.0 - 1e-9) - rounding * half
    return float(min(float(skin), max(0.0, room)))


class ForceField:
    """Energies and forces of ``potential`` for the atoms of ``system``.

    ``skin`` (Å) is the Verlet buffer; ``wrap`` wraps periodic positions into the cell at each
    list build. ``builds`` counts list builds.
    """

    def __init__(self, potential: Potential, system: System, skin: float = 0.5, wrap: bool = True):
        self.potential = potential
        self.system = system
        self.cutoff = float(potential.cutoff)
        if not self.cutoff > 0:
            raise ModelError(f"the potential has no positive cutoff ({self.cutoff!r} Å)")
        from torchmdx.md.arguments import real_argument

        # "0.5" was a TypeError, NaN or inf "cutoff must be a positive number of Å" (the list's cutoff + skin)
        self.requested_skin = skin = real_argument("skin", skin, "a distance >= 0 Å")
        self.skin = fit_skin(self.cutoff, skin, system.cell, system.pbc)
        self.wrap_positions = bool(wrap)
        self.potential.check_elements(system.z)
        self.neighbors: Optional[Neighbors] = None
        self.reference: Optional[torch.Tensor] = None
        self.stale = torch.zeros((), dtype=torch.bool, device=system.device)
        self.max_displacement2 = torch.zeros((), dtype=system.dtype, device=system.device)
        self.builds = 0
        self._threshold2 = (0.5 * self.skin) ** 2
        #: fixed-capacity mode (CUDA graphs): the list lives in static buffers of ``capacity``
        #: rows, refilled in place at each build; ``layout_version`` changes when they are
        #: reallocated (a captured graph must then be captured again)
        self.fixed_capacity = False
        self.capacity = 0
        self.layout_version = 0
        self._static = None
        #: CUDA-graph mode: rebuild the (fixed-capacity) list on the device at every fast step
        #: (see the module docstring); careful steps then build the exact list at every step
        self.rebuild_each_step = False
        #: :class:`torchmdx.nn.traced.TracedForces` of the potential, or None: when set,
        #: :meth:`evaluate` runs the model, its forces included, as one compiled graph
        #: (:meth:`set_traced`)
        self.traced = None
        #: the atoms of each structure when the list is the all-pairs layout
        #: (:mod:`torchmdx.kernels.pairs`: built once, never stale, the cutoff applied inside the
        #: traced graph), or None: a neighbor list (:meth:`set_traced`)
        self.pairs: Optional[int] = None

    def set_traced(self, traced) -> None:
        """Evaluate through ``traced`` (:class:`torchmdx.nn.traced.TracedForces`) or, with None,
        the potential's own autograd; the list takes the all-pairs layout where
        :func:`torchmdx.nn.traced.pair_layout_size` allows it (a traced graph only). A change of
        layout drops the list: the next :meth:`compute` builds it in the new one."""
        from torchmdx.nn.traced import pair_layout_size

        self.traced = traced
        s = self.system
        pairs = pair_layout_size(self.potential, s.counts, s.periodic) if traced is not None else None
        if pairs != self.pairs:
            self.pairs = pairs
            self.neighbors = None

    # ------------------------------------------------------------------ neighbor list
    def build(self, positions: torch.Tensor, wrap: Optional[bool] = None) -> torch.Tensor:
        """Build the list at ``positions`` (wrapped first if periodic and ``wrap``); returns the
        positions the list refers to (the wrapped ones)."""
        s = self.system
        if self.pairs is not None:
            self._build_pairs(positions)
        else:
            if (self.wrap_positions if wrap is None else wrap) and s.periodic:
                positions = s.wrap(positions)
            nl = self.potential.neighbors(positions.detach(), s.batch, s.cell, s.pbc, cutoff=self.cutoff + self.skin)
            offsets = self._image_offsets(nl) if nl.shifts.numel() > 0 else None
            if self.fixed_capacity:
                self._store_fixed(nl, offsets, positions)
            else:
                self.neighbors = nl
                self.reference = positions.detach()
                self._receivers, self._senders = nl.edge_index[0].contiguous(), nl.edge_index[1].contiguous()
                self._offsets = offsets
        self.stale = torch.zeros((), dtype=torch.bool, device=s.device)
        self.max_displacement2 = torch.zeros((), dtype=s.dtype, device=s.device)
        self.builds += 1
        return positions

    def _build_pairs(self, positions: torch.Tensor) -> None:
        """The all-pairs layout (:func:`torchmdx.kernels.pairs.pair_index`) as the list: edge
        index and off-diagonal mask in buffers of their own (a new ``layout_version``), no image
        offsets. It does not depend on the positions, so it is built once per layout."""
        from torchmdx.kernels.pairs import pair_index

        s = self.system
        edge_index, mask = pair_index(s.num_structures, self.pairs, s.device)
        rows = int(edge_index.shape[1])
        zeros3 = torch.zeros(rows, 3, dtype=s.dtype, device=s.device)
        self.neighbors = Neighbors(edge_index, zeros3, zeros3, torch.zeros(rows, dtype=s.dtype, device=s.device),
                                   torch.tensor(rows, device=s.device), torch.zeros((), dtype=torch.bool, device=s.device),
                                   mask)
        self._receivers, self._senders, self._offsets = edge_index[0], edge_index[1], None
        self._static = None
        self.capacity = rows
        self.layout_version += 1
        self.reference = positions.detach().clone()

    def _image_offsets(self, nl: Neighbors) -> Optional[torch.Tensor]:
        """n_ij @ cell of each pair (Å) [E, 3], None without a cell. The cell is fixed during MD,
        so the offsets stay valid until the next build."""
        s = self.system
        if s.cell is None:
            return None
        cell_i = s.cell.index_select(0, s.batch.index_select(0, nl.edge_index[0]))
        return torch.einsum("ek,ekl->el", nl.shifts.to(s.dtype), cell_i)

    def _store_fixed(self, nl: Neighbors, offsets: Optional[torch.Tensor], positions: torch.Tensor) -> None:
        """Copy the exact list ``nl`` into the static buffers of the fixed-capacity mode (padding
        rows i = j = N-1, shifts and offsets 0, mask False: the contract of
        :mod:`torchmdx.kernels.neighbors`), growing them (new ``layout_version``) when the pairs
        do not fit."""
        s = self.system
        pairs = int(nl.edge_index.shape[1])
        if self._static is None or pairs > self.capacity:
            self.capacity = int(pairs * 1.25) + 64
            n, dev, dt = s.num_atoms, s.device, s.dtype
            self._static = {
                "edge_index": torch.empty(2, self.capacity, dtype=torch.long, device=dev),
                "shifts": torch.zeros(self.capacity, 3, dtype=nl.shifts.dtype, device=dev),
                "offsets": torch.zeros(self.capacity, 3, dtype=dt, device=dev),
                "mask": torch.zeros(self.capacity, dtype=torch.bool, device=dev),
                "reference": torch.zeros(n, 3, dtype=dt, device=dev),
                "zeros3": torch.zeros(self.capacity, 3, dtype=dt, device=dev),
                "zeros": torch.zeros(self.capacity, dtype=dt, device=dev),
            }
            self.layout_version += 1
        st = self._static
        st["edge_index"][:, :pairs].copy_(nl.edge_index)
        st["edge_index"][:, pairs:].fill_(s.num_atoms - 1)
        st["shifts"][:pairs].copy_(nl.shifts)
        st["shifts"][pairs:].zero_()
        if nl.mask is not None:
            st["mask"][:pairs].copy_(nl.mask)
        else:
            st["mask"][:pairs].fill_(True)
        st["mask"][pairs:].zero_()
        st["offsets"].zero_()
        if offsets is not None:
            st["offsets"][:pairs].copy_(offsets)
        st["reference"].copy_(positions.detach())
        self.reference = st["reference"]
        self.neighbors = Neighbors(
            # vectors and distances are recomputed from positions at every evaluation
            st["edge_index"], st["shifts"], st["zeros3"], st["zeros"], nl.num_pairs, nl.overflow, st["mask"],
        )
        self._receivers, self._senders = st["edge_index"][0], st["edge_index"][1]
        self._offsets = st["offsets"] if s.cell is not None else None

    def _build_on_device(self, positions: torch.Tensor) -> None:
        """Rebuild the list at ``positions`` without host synchronisation (no wrapping): pairs
        closer than ``cutoff`` into ``capacity`` rows; an overflow is ORed into ``stale``."""
        if self.pairs is not None:  # the all-pairs layout holds every pair, whatever the positions
            return
        s = self.system
        nl = self.potential.neighbors(positions.detach(), s.batch, s.cell, s.pbc, cutoff=self.cutoff,
                                      max_pairs=self.capacity)
        self.neighbors = nl
        self._receivers, self._senders = nl.edge_index[0], nl.edge_index[1]
        self._offsets = self._image_offsets(nl)
        self.stale = self.stale | nl.overflow

    def displacement2(self, positions: torch.Tensor) -> torch.Tensor:
        """Largest squared displacement since the build (Å², device scalar)."""
        d = positions.detach() - self.reference
        return (d * d).sum(-1).amax() if d.numel() else torch.zeros((), dtype=d.dtype, device=d.device)

    def needs_rebuild(self, positions: torch.Tensor) -> bool:
        """Synchronous check: has an atom moved more than skin/2 since the build? (Never for the
        all-pairs layout.)"""
        return self.pairs is None and bool(self.displacement2(positions) > self._threshold2)

    def snapshot(self) -> tuple:
        return (self.neighbors, self.reference, self.stale, self.max_displacement2,
                self._receivers, self._senders, self._offsets)

    def restore(self, snap: tuple) -> None:
        (self.neighbors, self.reference, self.stale, self.max_displacement2,
         self._receivers, self._senders, self._offsets) = snap

    # ------------------------------------------------------------------ evaluation
    def masked_neighbors(self, positions: torch.Tensor) -> Neighbors:
        """The list with ``mask`` = valid rows within ``cutoff`` at ``positions``."""
        s, nl = self.system, self.neighbors
        vectors = edge_vectors(positions.detach(), nl.edge_index, nl.shifts, s.cell, s.batch)
        mask = (vectors * vectors).sum(-1) < self.cutoff * self.cutoff
        if nl.mask is not None:
            mask = mask & nl.mask
        return Neighbors(nl.edge_index, nl.shifts, vectors, vectors.norm(dim=-1), nl.num_pairs, nl.overflow, mask)

    def evaluate(self, positions: torch.Tensor, per_atom: bool = False):
        """(energy [B] eV, forces [N, 3] eV/Å[, atomic energies [N]]) at ``positions`` with the
        current list; F = -∂E/∂r by autograd. Same equations as :meth:`Potential.forward`
        (edges beyond the cutoff masked), without its host synchronisations."""
        s, nl = self.system, self.neighbors
        if self.traced is not None:
            energy, forces, atomic = self.traced(s.z, positions, s.batch, s.num_structures, nl.edge_index,
                                                 self._offsets, nl.mask, pairs=self.pairs)
            return (energy, forces, atomic) if per_atom else (energy, forces)
        with torch.enable_grad():
            pos = positions.detach().requires_grad_(True)
            # = edge_vectors(pos, ...) with the constant image offsets precomputed at the build
            vectors, distances, mask = masked_edges(pos, self._receivers, self._senders, self._offsets, self.cutoff,
                                                    nl.mask)
            graph = Graph(s.z, pos, s.batch, s.num_structures, nl.edge_index, vectors, distances, mask)
            atomic = self.potential.atomic_energies(graph)
            energy = s.sum(atomic)
            (grad,) = torch.autograd.grad(energy.sum(), pos, allow_unused=True)
        forces = -grad if grad is not None else torch.zeros_like(positions)
        if per_atom:
            return energy.detach(), forces, atomic.detach()
        return energy.detach(), forces

    def compute(self, state: MDState, careful: bool = False) -> None:
        """Set ``state.forces`` and ``state.energy`` at ``state.positions``.

        Fast mode: record on the device whether the list may be stale (no sync). Careful mode:
        check now and rebuild (wrapping ``state.positions``) if an atom moved more than skin/2.
        """
        if self.pairs is not None:  # the all-pairs layout: nothing to check or rebuild
            if self.neighbors is None:
                state.positions = self.build(state.positions)
        elif self.neighbors is None or (careful and (self.rebuild_each_step or self.needs_rebuild(state.positions))):
            state.positions = self.build(state.positions)
        elif self.rebuild_each_step:
            self._build_on_device(state.positions)
        else:
            d2 = self.displacement2(state.positions)
            self.max_displacement2 = torch.maximum(self.max_displacement2, d2)
            self.stale = self.stale | (d2 > self._threshold2)
        state.energy, state.forces = self.evaluate(state.positions)

    def stress(self, positions: torch.Tensor) -> torch.Tensor:
        """Virial stress of the potential σ = (1/V) ∂E/∂ε [B, 3, 3] (eV/Å³, ASE's sign), from
        :meth:`Potential.forward` with the current list (synchronises; for output steps)."""
        s = self.system
        # with lists rebuilt inside the step, positions may have been wrapped since the last one
        neighbors = None if self.rebuild_each_step else self.masked_neighbors(positions)
        out = self.potential(
            s.z, positions.detach(), s.batch, s.cell, s.pbc,
            neighbors=neighbors, forces=False, stress=True,
        )
        return out["stress"].detach()
