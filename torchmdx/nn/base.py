"""The potential contract shared by the ET model, analytic potentials, training and MD.

A :class:`Potential` maps a (batch of) structure(s) to per-atom energies E_a (eV); the total
energy of structure b is E_b = Σ_{a in b} E_a, forces are F_a = -∂E/∂pos_a (eV/Å) by autograd,
and the stress of a periodic structure is σ = (1/V) ∂E/∂ε (eV/Å³) for a homogeneous strain ε
applied to positions and cell (pos' = pos (1+ε), cell' = cell (1+ε)); ASE's sign convention
(positive under tension), so ``atoms.get_stress()`` matches ASE calculators.

Subclasses implement only :meth:`Potential.atomic_energies` on a :class:`Graph` whose edge
vectors were computed from the (strained) positions here, so forces and stress are exact
derivatives of the same function. The neighbor list itself (indices and integer image shifts)
is computed without gradient; a caller (the MD engine) may pass one built with a Verlet skin:
pairs beyond ``cutoff`` then have ``mask`` False and subclasses must give them zero weight
(the cosine cutoff does this for the ET model).

Host synchronisation. :meth:`Potential.forward` reads nothing back from the device when the
caller gives ``num_structures`` (else B = batch.max() + 1 is read, one ``.item()``) and, for a
periodic input, ``cell`` and ``pbc`` as device tensors. The "non-periodic after all" shortcut
(``pbc`` all False: the cell is dropped and the input treated as a cluster) is taken only when
it costs no device read: ``pbc`` a Python value (list, numpy array) or a CPU tensor. A device
``pbc`` with a ``cell`` is passed on as given (the neighbor-list contract: a structure without a
periodic direction ignores its cell), which gives the same energies and forces. The device
``pbc`` is read only where an answer depends on it: ``pbc`` without a ``cell`` (all False is
allowed, anything periodic an error) and ``stress=True`` (a stress needs a periodic cell).

Atom order (:attr:`Potential.atom_order`, a runtime setting, not saved with the model). When
the potential builds the neighbor list itself (``neighbors`` not given), :meth:`forward` may
sort the atoms along a space-filling curve first (:mod:`torchmdx.kernels.locality`), so that
a receiver's neighbours lie close in memory; z, positions and batch are permuted, the cell and
pbc are not, and the results come back in the input order (forces because the permuted
positions are an index of the differentiable input, per-atom energies by the inverse
permutation). A caller that passes ``neighbors`` (MD engine, ASE calculator, CUDA-graph paths)
keeps its order. A :class:`~torchmdx.errors.ModelError` raised in the sorted order (atoms on top
of each other) is raised again from the input order, so that it names the input's atoms.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from torchmdx.data.coincident import FAR_COORDINATE  # Å: coordinates checked beside the overlaps
from torchmdx.errors import ModelError
from torchmdx.kernels.pairs import receivers_of, senders_of
from torchmdx.kernels.locality import AtomOrder, check_atom_order
from torchmdx.kernels.neighbors import Neighbors, neighbor_list


#: distinct atoms closer than this (Å) are refused as overlapping
OVERLAP_DISTANCE = 1e-6


@dataclass
class Graph:
    """What a potential sees. Shapes: N atoms, E edges, B structures.

    z [N] long; pos [N, 3] (Å); batch [N] long; num_structures B;
    edge_index [2, E] (i receiver, j neighbor, sorted by i); vectors [E, 3] = pos_j - pos_i +
    image shift (Å), differentiable w.r.t. pos and cell; distances [E] (Å); mask [E] bool or
    None (None: every edge valid and within the cutoff). ``pairs`` n: the edges are the
    all-pairs layout of B structures of n atoms each (:mod:`torchmdx.kernels.pairs`: E = B n²,
    edge (b n + i) n + j, the diagonal masked), which a potential with :attr:`Potential.pair_layout`
    may compute with broadcasts and sums instead of gathers and scatters; None: any list.
    """

    z: torch.Tensor
    pos: torch.Tensor
    batch: torch.Tensor
    num_structures: int
    edge_index: torch.Tensor
    vectors: torch.Tensor
    distances: torch.Tensor
    mask: Optional[torch.Tensor] = None
    pairs: Optional[int] = None


def edge_vectors(pos, edge_index, shifts, cell, batch):
    """vectors_ij = pos[j] - pos[i] + n_ij @ cell[batch[i]]  (differentiable; Å)."""
    i, j = edge_index[0], edge_index[1]
    vectors = pos[j] - pos[i]
    if cell is not None and shifts is not None and shifts.numel() > 0:
        vectors = vectors + torch.einsum("ek,ekl->el", shifts.to(pos.dtype), cell[batch[i]])
    return vectors


def spread_where(keep: torch.Tensor, index: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """``index`` where ``keep``, elsewhere row r's own atom r mod ``num_atoms``.

    For rows whose contribution is exactly zero (padding of a fixed-capacity list, all on atom
    N - 1): their scatter-adds (``index_add`` forward, or the backward of ``index_select``) then
    land on different atoms instead of all on one, whose serialised atomics cost a CUDA graph of
    DHFR 0.25-0.35 ms per add (docs/kernels_message.md). Adding zero anywhere is exact, so the
    results are bit for bit those of the unspread index."""
    spread = torch.arange(index.shape[0], device=index.device, dtype=index.dtype) % max(num_atoms, 1)
    return torch.where(keep, index, spread)


def check_overlaps(graph: "Graph") -> None:
    """Raise "atoms i and j are on top of each other (distance d Å)" (a :class:`ModelError` carrying ``atoms`` and
    ``distance``, for callers that name the atoms their own way) for two distinct atoms of ``graph`` closer than
    :data:`OVERLAP_DISTANCE`; valid edges only (a padding row's distance 0, mask False, is no pair of atoms). No
    host read while a CUDA graph is being captured. The networks' check (:mod:`torchmdx.nn.normalised`), and since
    round 24 the analytic potentials' (their r = 0 pairs had no energy: 0 eV and zero forces, silently)."""
    if graph.distances.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # no host synchronisation inside a CUDA graph
    close = graph.distances < OVERLAP_DISTANCE
    if graph.mask is not None:
        close = close & graph.mask
    size = graph.pos.detach().abs()
    far = (size > FAR_COORDINATE) & (size != float("inf"))
    close_any = close.any()
    if not bool(close_any | far.any()):  # one host read for both
        return
    _check_far(graph)
    if bool(close_any):
        e = int(close.nonzero()[0, 0])
        i, j = int(graph.edge_index[0, e]), int(graph.edge_index[1, e])
        distance = float(graph.distances[e].detach())
        error = ModelError(f"atoms {i} and {j} are on top of each other (distance {distance:.3g} Å)")
        error.atoms, error.distance = (i, j), distance  # for callers that name the atoms their own way (md)
        raise error


def _check_far(graph: "Graph") -> None:
    """Refuse an atom with a coordinate beyond :data:`~torchmdx.data.coincident.FAR_COORDINATE` in a structure of
    two or more atoms (round 35): at 1e15 Å the distances were float64's 0.125 Å steps (a wrong energy without a
    word), at 1e30 Å zero ("atoms 0 and 1 are on top of each other", round 34's leftover)."""
    import numpy as np

    from torchmdx.data.coincident import far_atom, far_coordinate_words

    pos = graph.pos.detach().cpu().double().numpy()
    batch = graph.batch.detach().cpu().numpy()
    offsets = np.concatenate([[0], np.cumsum(np.bincount(batch, minlength=graph.num_structures))])
    a = far_atom(pos, offsets)
    if a is not None:
        s = int(batch[a])
        dtype = np.float32 if graph.pos.dtype == torch.float32 else np.float64
        line = far_coordinate_words(a - int(offsets[s]), pos[a], s if graph.num_structures > 1 else None, dtype)
        raise ModelError(line)


def masked_edges(pos, receivers, senders, offsets, cutoff: float, mask=None):
    """(vectors [E, 3] Å, distances [E] Å, valid [E] bool) of the edges i <- j at ``pos``:
    vectors = pos[j] - pos[i] + offset (``offsets`` [E, 3] the image offsets n @ cell, or None),
    valid = ``mask`` and |vectors| < ``cutoff``; invalid rows get distance 0 and no 1/r in the
    gradient (padded rows of a fixed-capacity list, Verlet-skin pairs beyond the cutoff).
    Rows with ``mask`` False are read with both ends on one spread atom k (:func:`spread_where`),
    so the position gradient's scatter of their zeros is spread too; a padded row (i = j = N - 1,
    offset 0) keeps its vector 0, and any masked row stays invalid."""
    if mask is not None:  # masked rows: both ends on the receiver's spread atom
        receivers = spread_where(mask, receivers, pos.shape[0])
        senders = torch.where(mask, senders, receivers)
    vectors = pos.index_select(0, senders) - pos.index_select(0, receivers)
    if offsets is not None:
        vectors = vectors + offsets
    return _within_cutoff(vectors, cutoff, mask)


def _within_cutoff(vectors, cutoff: float, mask):
    """(vectors, distances, valid) with valid = ``mask`` (None: all) and |vectors| < ``cutoff``;
    invalid rows get distance 0 and no 1/r in the gradient (the norm of a safe stand-in vector)."""
    length2 = (vectors * vectors).sum(-1)
    valid = length2 < cutoff * cutoff
    if mask is not None:
        valid = valid & mask
    safe = torch.where(valid.unsqueeze(-1), vectors, torch.ones_like(vectors))
    distances = torch.where(valid, safe.norm(dim=-1), torch.zeros_like(length2))
    return vectors, distances, valid


def pair_edges(pos, atoms_per_structure: int, cutoff: float, mask):
    """(vectors [E, 3] Å, distances [E] Å, valid [E] bool) of the all-pairs layout
    (:mod:`torchmdx.kernels.pairs`) at ``pos``, as :func:`masked_edges` gives them for a list:
    vectors_e = pos[j] - pos[i] for edge e = (b n + i) n + j, valid = ``mask`` (the off-diagonal
    pairs) and |vectors| < ``cutoff``; invalid rows get distance 0 and no 1/r in the gradient."""
    n = int(atoms_per_structure)
    vectors = (senders_of(pos, n) - receivers_of(pos, n)).reshape(-1, 3)
    return _within_cutoff(vectors, cutoff, mask)


def _on_host(value) -> bool:
    """A Python value, numpy array or CPU tensor: reading it costs no device synchronisation."""
    return not torch.is_tensor(value) or value.device.type == "cpu"


def _check_atom_inputs(z: torch.Tensor, pos) -> None:
    """One ModelError line for a ``z`` or ``pos`` the model would index with wrongly (an IndexError
    "tensors used as indices must be long" or "index out of range in self", or an AttributeError on
    ``None``, were tracebacks): ``z`` [N] whole numbers, ``pos`` [N, 3] floating point. Shapes and
    dtypes only: nothing is read from the device."""
    if pos is None:
        raise ModelError("no positions: call the potential as model(z, pos) with z [N] atomic numbers and pos [N, 3] "
                         "in Å (or model(atoms) with an ase.Atoms)")
    if not torch.is_tensor(pos):
        raise ModelError(f"pos must be a torch tensor [N, 3] of positions in Å, got {type(pos).__name__}")
    if z.dim() != 1 or z.dtype.is_floating_point or z.dtype.is_complex or z.dtype == torch.bool:
        raise ModelError(f"z must be a 1-D tensor of atomic numbers (torch.long), got shape {list(z.shape)} of "
                         f"{str(z.dtype).removeprefix('torch.')}")
    if pos.dim() != 2 or pos.shape[1] != 3 or not pos.dtype.is_floating_point:
        raise ModelError(f"pos must have shape [N, 3] of floating-point positions in Å, got shape {list(pos.shape)} "
                         f"of {str(pos.dtype).removeprefix('torch.')}")
    if pos.shape[0] != z.shape[0]:
        raise ModelError(f"z holds {z.shape[0]} atomic numbers but pos {pos.shape[0]} positions; expected one "
                         "position per atom")
    if pos.dtype in _HALF:  # the vectors and distances were computed in it: energies off by percents, silently
        name = str(pos.dtype).removeprefix("torch.")
        raise ModelError(f"pos is {name}, which keeps 3 significant digits or fewer (steps of {_HALF[pos.dtype]} Å "
                         "for coordinates of 8 to 16 Å) and gave energies off by percents; give float32 or float64 "
                         f"positions (pos.float(); the data readers and the Calculator refuse {name} too)")


#: half-precision dtypes: the spacing of their numbers between 8 and 16 (11- and 8-bit significands)
_HALF = {torch.float16: 0.0078, torch.bfloat16: 0.0625}


def _check_weights(module: torch.nn.Module) -> None:
    """A ``model.half()`` (or bfloat16) called as ``model(z, pos)``: -0.162 eV for -0.159 without a word, where
    ``predict``, the Calculator and ``load_model`` refuse half precision. The first floating weight only (all of a
    model's weights share a dtype; ``module.half()`` converts them all): no walk over the weights per call
    (:func:`torchmdx.nn.atoms.half_precision_weights`, the check of predict, the Calculator and the export)."""
    from torchmdx.nn.atoms import half_precision_weights

    name = half_precision_weights(module)
    if name is not None:
        raise ModelError(f"model(...): the model's weights are {name}, which keep 3 significant digits or fewer "
                         "(energies off by percents); the model runs in float32 or float64: model.float() or "
                         "model.double() first (predict and the Calculator refuse it too)")


def _check_flags(call: str, **flags) -> None:
    """One ModelError line for a flag of ``predict``/``model(atoms, ...)`` that is not True or False
    (``forces="no"`` computed the forces: any non-empty string is true; ``stress=None`` skipped
    the stress). numpy's bool passes."""
    import numpy as np

    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ModelError(f"{call}: {name} must be True or False, got {value!r} ({type(value).__name__})")


def _check_call_inputs(neighbors, num_structures) -> None:
    """One ModelError line for a ``neighbors`` that is no :class:`Neighbors`, or a ``num_structures`` that is
    not a whole number >= 1 (that it covers ``batch`` is not checked: the keyword is there to spare that read)."""
    import numpy as np

    if neighbors is not None and not isinstance(neighbors, Neighbors):
        raise ModelError(f"neighbors must be a torchmdx.kernels.neighbors.Neighbors (from model.neighbors(...)) or "
                         f"None, got {type(neighbors).__name__}")
    if num_structures is None:
        return
    if isinstance(num_structures, bool) or not isinstance(num_structures, (int, np.integer)) or num_structures < 1:
        raise ModelError(f"num_structures must be a whole number >= 1 (the structures in the batch), got "
                         f"{num_structures!r}")


def _shape(value) -> list:
    import numpy as np

    return list(value.shape) if torch.is_tensor(value) else list(np.shape(value))


def _check_structure_inputs(batch, cell, pbc) -> None:
    """One ModelError line for a ``batch``, ``cell`` or ``pbc`` of the wrong kind or shape (a float
    batch, a cell of three lengths or a pbc of two entries were RuntimeErrors of index_add_ or
    expand, or a cell [10, 10, 10] became three equal rows: "the cell ... is singular"). Shapes and
    dtypes only: nothing is read from the device."""
    if batch is not None:
        dtype = batch.dtype if torch.is_tensor(batch) else torch.as_tensor(batch).dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise ModelError(f"batch must be a 1-D tensor of structure indices (torch.long), one per atom, got "
                             f"{str(dtype).removeprefix('torch.')}")
    if cell is not None:
        shape = _shape(cell)
        if shape == [3]:
            raise ModelError(f"cell must have shape [3, 3] (rows are the cell vectors, Å) or [B, 3, 3], got {shape}: "
                             "for a box of three lengths a, b, c give torch.diag(torch.tensor([a, b, c]))")
        if not (len(shape) in (2, 3) and shape[-2:] == [3, 3]):
            raise ModelError(f"cell must have shape [3, 3] (rows are the cell vectors, Å) or [B, 3, 3], got {shape}")
    if pbc is not None:
        shape = _shape(pbc)
        if not (len(shape) in (1, 2) and shape[-1:] == [3]):
            raise ModelError(f"pbc must have shape [3] or [B, 3] (True for each periodic direction), got {shape}")


def _normalise_inputs(z, pos, batch, cell, pbc, num_structures: Optional[int] = None, need_periodic: bool = False):
    """(batch, B, cell [B,3,3] or None, pbc [B,3] or None) on the positions' device; see the module
    docstring for when this reads from the device."""
    n = pos.shape[0]
    _check_structure_inputs(batch, cell, pbc)
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=pos.device)
        if num_structures is None:
            num_structures = 1
    if num_structures is None:
        num_structures = int(batch.max().item()) + 1 if n > 0 else 1
    # drop the cell of an input without a periodic direction, where that check is free (or needed)
    check_pbc = pbc is not None and (_on_host(pbc) or cell is None or need_periodic)
    periodic = bool(torch.as_tensor(pbc).any()) if check_pbc else True
    if pbc is not None:
        pbc = torch.as_tensor(pbc, dtype=torch.bool, device=pos.device)
        if pbc.dim() == 1:
            pbc = pbc.unsqueeze(0).expand(num_structures, 3)
    if cell is not None:
        cell = torch.as_tensor(cell, dtype=pos.dtype, device=pos.device)
        if cell.dim() == 2:
            cell = cell.unsqueeze(0).expand(num_structures, 3, 3)
    if pbc is not None and not periodic:
        cell, pbc = None, None
    if cell is not None and pbc is not None:
        # an open row may hold anything (NaN too, see kernels.cell_geometry): shifts along it are
        # 0, and 0 * NaN made every periodic pair's vector NaN: energy 0, silently. Only its
        # non-finite entries are zeroed: a finite open row (a slab's vacuum vector) stays, since the
        # stress divides by the volume it spans (ASE's convention for slabs)
        cell = torch.where(pbc.unsqueeze(-1) | torch.isfinite(cell), cell, torch.zeros_like(cell))
    if pbc is not None and cell is None:
        from torchmdx.errors import ModelError

        raise ModelError("periodic boundary conditions were given without a cell")
    return batch, num_structures, cell, pbc


class Potential(torch.nn.Module):
    """Base class: energies, forces and stress from :meth:`atomic_energies`.

    Attributes a subclass sets: ``cutoff`` (Å, the interaction range used to build neighbor
    lists) and optionally ``elements`` (atomic numbers it knows).
    """

    cutoff: float = 0.0
    #: does the potential take periodic structures? (False: molecules and clusters only; the attention
    #: potentials. train, evaluate and md refuse periodic data for such a model naming the file and structure)
    periodic: bool = True
    #: can :class:`torchmdx.nn.traced.TracedForces` trace :meth:`atomic_energies` into one graph?
    traceable: bool = False
    #: may ``compile: auto`` pick that whole-model graph for small systems on CUDA
    #: (:func:`torchmdx.nn.traced.compile_mode`)? An explicit ``compile: whole`` needs only
    #: :attr:`traceable`; this says the compile cost was measured and pays for itself
    whole_graph_auto: bool = True
    #: may ``train.cuda_graph: auto`` capture this potential's training step
    #: (:func:`torchmdx.train.config.resolve_cuda_graph`)? True only where the captured step was
    #: checked against the eager one on a GPU; ``train.cuda_graph: true`` captures any potential
    captured_training_auto: bool = False
    #: does :meth:`atomic_energies` take a :class:`Graph` in the all-pairs layout (``Graph.pairs``)
    #: with dense edge operations? (:class:`torchmdx.nn.traced.TracedForces` ``pairs``)
    pair_layout: bool = False
    #: does the potential take a structure's net charge? (None does today: ``torchmdx md`` warns when a
    #: structure carries one, :func:`torchmdx.md.start_checks.charge_warnings`)
    takes_charge: bool = False
    #: set while it is being traced: no host reads or checks, torch reference kernels only
    tracing: bool = False
    #: can :meth:`atomic_energies`, while traced for inference, run its fused kernels as
    #: ``torch.library`` custom operators (:class:`torchmdx.nn.traced.TracedForces` ``fused_message``),
    #: with :meth:`graph_inputs` as extra inputs of the graph?
    graph_ops: bool = False
    #: while traced with the operators: :meth:`graph_inputs`' names -> the trace's tensors (else None)
    traced_inputs: Optional[dict] = None
    _atom_order: str = "input"
    #: the run that trained it (:mod:`torchmdx.train.provenance`), as :func:`torchmdx.load_model` read it from
    #: the model file; :meth:`save` writes it back (None: a model of no recorded run)
    training_record: Optional[dict] = None
    #: has :meth:`forward` warned of a cell given without pbc (once per model)
    _warned_open_cell: bool = False

    @property
    def atom_order(self) -> str:
        """How :meth:`forward` orders the atoms when it builds the neighbor list itself:
        "input" (default: as given), "hilbert" / "morton" (along that curve), "auto" (for one
        structure of at least :data:`torchmdx.kernels.locality.LOCALITY_MIN_ATOMS` atoms the
        Hilbert order unless the input order is as local, else input). A runtime setting: not
        saved with the model. The default stays "input" until a GPU measurement shows the sort
        (~320 small kernels per call) paying for itself (docs/kernels_message.md, "Locality")."""
        return self._atom_order

    @atom_order.setter
    def atom_order(self, value: str) -> None:
        self._atom_order = check_atom_order(value, ModelError, "atom_order")

    def atomic_energies(self, graph: Graph) -> torch.Tensor:  # pragma: no cover - abstract
        """Per-atom energies [N] (eV) for ``graph``."""
        raise NotImplementedError

    def graph_inputs(self, device) -> dict:
        """Tensors made from the weights (not parameters or buffers, never saved) that a traced
        inference graph with the potential's custom operators (:attr:`graph_ops`) takes as inputs,
        by name; while traced they come back as :attr:`traced_inputs`. Empty by default."""
        return {}

    def check_elements(self, z: torch.Tensor) -> None:
        """Raise a one-line ModelError for atomic numbers the potential cannot handle."""

    def set_compiled(self, enabled: bool = True) -> bool:
        """Switch to compiled (``torch.compile``) inference kernels where the potential has
        them; returns whether it now runs compiled (the base class never does)."""
        return False

    def neighbors(self, pos, batch, cell, pbc, cutoff: Optional[float] = None, max_pairs: Optional[int] = None) -> Neighbors:
        """Pairs within ``cutoff`` (default: the potential's); ``max_pairs``: fixed capacity
        (:func:`torchmdx.kernels.neighbors.neighbor_list`)."""
        return neighbor_list(pos.detach(), self.cutoff if cutoff is None else cutoff, batch, cell, pbc, max_pairs=max_pairs)

    def forward(
        self,
        z: torch.Tensor,
        pos: Optional[torch.Tensor] = None,
        batch: Optional[torch.Tensor] = None,
        cell: Optional[torch.Tensor] = None,
        pbc: Optional[torch.Tensor] = None,
        *,
        neighbors: Optional[Neighbors] = None,
        forces: bool = True,
        stress: bool = False,
        per_atom: bool = False,
        create_graph: bool = False,
        num_structures: Optional[int] = None,
    ) -> dict:
        """Return ``{"energy": [B], "forces": [N, 3], "stress": [B, 3, 3], "energies": [N]}``.

        energy in eV, forces eV/Å, stress eV/Å³ (when asked; needs a cell; NaN for a structure
        of the batch whose cell has no volume).
        ``create_graph=True`` keeps the graph of the forces for training on them.
        ``num_structures``: B, when the caller knows it (a PyG batch's ``num_graphs``), so that it
        is not read back from the device as batch.max() + 1; structures without atoms get energy 0.
        ``z`` may also be an ``ase.Atoms`` or a list of them (then ``pos`` etc. are taken from it).
        """
        _check_weights(self)
        if not torch.is_tensor(z):
            from torchmdx.nn.atoms import atoms_inputs, module_device_dtype

            _check_flags("model(atoms, ...)", forces=forces, stress=stress, per_atom=per_atom,
                         create_graph=create_graph)

            device, dtype = module_device_dtype(self)
            return self.forward(  # num_structures: the list's length (an empty last structure counts)
                **atoms_inputs(z, device, dtype), neighbors=neighbors, forces=forces, stress=stress,
                per_atom=per_atom, create_graph=create_graph,
            )
        _check_atom_inputs(z, pos)
        # forces="no" computed the forces (a non-empty string is true), neighbors="x" or num_structures=0 were
        # AttributeErrors and IndexErrors: one line each (host values only)
        _check_flags("model(z, pos, ...)", forces=forces, stress=stress, per_atom=per_atom, create_graph=create_graph)
        _check_call_inputs(neighbors, num_structures)
        if cell is not None and pbc is None and not self._warned_open_cell:
            self._warn_open_cell()
        if z.dtype != torch.long:  # uint8 indexed as a mask ("The shape of the mask [3] ..."), a traceback
            z = z.long()
        self.check_elements(z)
        batch, num_structures, cell, pbc = _normalise_inputs(z, pos, batch, cell, pbc, num_structures, stress)
        order = AtomOrder.choose(self.atom_order, pos, batch, cell, pbc, num_structures, neighbors is not None)
        args = (z, pos, batch, cell, pbc, neighbors, forces, stress, per_atom, create_graph, num_structures)
        if not order.active:
            return self._forward(AtomOrder(), *args)
        try:
            return self._forward(order, *args)
        except ModelError:  # name the input's atoms: the same call in the input order raises it again
            return self._forward(AtomOrder(), *args)

    def _warn_open_cell(self) -> None:
        """One warning per model: a cell given without ``pbc`` is computed as open (ASE's convention: an
        ``Atoms(cell=...)`` is open unless ``pbc`` is set, and the Calculator reads ``atoms.pbc``), which gave a
        box's energy without its periodic images (0 eV for atoms that meet only across the boundary) silently."""
        if self.tracing or torch.compiler.is_compiling():
            return
        import warnings

        self._warned_open_cell = True
        warnings.warn("model(z, pos, cell=...) got a cell but no pbc, so the structures are computed as open (no "
                      "periodic images; ASE's convention: a cell without pbc is open): pass pbc=True (or a [3] / "
                      "[B, 3] tensor of booleans) for a periodic box, or leave out the cell (this warning is given "
                      "once per model)", UserWarning, stacklevel=5)

    def _forward(self, order: AtomOrder, z, pos, batch, cell, pbc, neighbors, forces, stress, per_atom,
                 create_graph, num_structures) -> dict:
        """:meth:`forward` on normalised inputs, with the atoms in ``order``."""
        z, batch = order.sorted(z), order.sorted(batch)
        if neighbors is None:
            neighbors = self.neighbors(order.sorted(pos), batch, cell, pbc)
        need_grad = forces or stress
        # without forces/stress the caller's grad mode applies (energy-only training needs the graph)
        with torch.enable_grad() if need_grad else contextlib.nullcontext():
            pos_leaf = pos
            if forces and not pos.requires_grad:
                pos_leaf = pos.detach().requires_grad_(True)
            # an index of pos_leaf: the forces come back in the input order
            pos_in, cell_in, strain = order.sorted(pos_leaf), cell, None
            if stress:
                if cell is None:
                    raise ModelError("stress needs a periodic cell")
                strain = torch.zeros(num_structures, 3, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
                sym = 0.5 * (strain + strain.transpose(1, 2))
                pos_in = pos_in + torch.einsum("nk,nkl->nl", pos_in, sym[batch])
                cell_in = cell + torch.bmm(cell, sym)
            vectors = edge_vectors(pos_in, neighbors.edge_index, neighbors.shifts, cell_in, batch)
            distances = vectors.norm(dim=-1)
            if neighbors.mask is not None:
                # padded rows have zero vectors: keep the norm's gradient finite there
                safe = torch.where(neighbors.mask.unsqueeze(-1), vectors, torch.ones_like(vectors))
                distances = torch.where(neighbors.mask, safe.norm(dim=-1), torch.zeros_like(distances))
            graph = Graph(z, pos_in, batch, num_structures, neighbors.edge_index, vectors, distances, neighbors.mask)
            atom_energy = self.atomic_energies(graph)
            energy = torch.zeros(num_structures, dtype=atom_energy.dtype, device=atom_energy.device)
            energy = energy.index_add(0, batch, atom_energy)
            out = {"energy": energy}
            if per_atom:
                out["energies"] = order.back(atom_energy)
            if need_grad:
                targets = ([pos_leaf] if forces else []) + ([strain] if stress else [])
                grads = torch.autograd.grad(
                    energy.sum(), targets, create_graph=create_graph, allow_unused=True
                )
                if forces:
                    out["forces"] = -grads[0] if grads[0] is not None else torch.zeros_like(pos)
                if stress:
                    g = grads[-1] if grads[-1] is not None else torch.zeros_like(cell)
                    volume = torch.linalg.det(cell).abs()
                    # a structure whose cell has no volume (an isolated atom of a mixed batch) has
                    # no stress: NaN, by a constant, so that no 0/0 reaches the gradient
                    has_stress = (volume > 0).view(-1, 1, 1)
                    safe = torch.where(has_stress, volume.view(-1, 1, 1), torch.ones_like(g))
                    out["stress"] = torch.where(has_stress, g / safe, torch.full_like(g, float("nan")))
        return out

    def predict(self, atoms, forces: bool = True, stress: bool = False) -> dict:
        """Energies (eV), forces (eV/Å) and stress (eV/Å³) of an ``ase.Atoms`` or a list, as numpy.

        One structure: ``energy`` float, ``forces`` [N, 3], ``stress`` [3, 3]; a list: ``energy``
        [B], ``forces`` a list of [N_b, 3] arrays, ``stress`` [B, 3, 3].
        """
        import numpy as np

        from torchmdx.nn.atoms import (atoms_inputs, is_atoms, module_device_dtype, no_volume_stress,
                                       spans_volume, split_per_structure)

        _check_flags("predict", forces=forces, stress=stress)
        device, dtype = module_device_dtype(self)
        if dtype in (torch.float16, torch.bfloat16):  # bfloat16: "Got unsupported ScalarType BFloat16" from numpy;
            # float16: energies off by percents, as the Calculator's dtype='float16' is refused
            name = str(dtype).removeprefix("torch.")
            raise ModelError(f"Potential.predict: the model's weights are {name}; predict runs in float32 or float64: "
                             "model.float() or model.double() first")
        inputs = atoms_inputs(atoms, device, dtype, centred=True)  # float32 far from the origin lost precision
        if is_atoms(atoms) and len(atoms) == 0:  # Atoms() gave energy 0.0; md, label and the readers refuse it
            # (an empty structure inside a list keeps its 0 eV row, round 5: the list's order and length hold)
            raise ModelError("Potential.predict: the structure has no atoms; there is nothing to predict (md, label "
                             "and the data readers refuse an empty structure too): give a structure with at least one "
                             "atom")
        if stress and inputs["cell"] is not None:
            # a slab or wire whose open rows span no volume: its stress came back as NaN, silently (the
            # Calculator says so since round 11); a structure without pbc in a list keeps NaN (no stress)
            pbc = inputs["pbc"].cpu().numpy()
            bad = np.flatnonzero(pbc.any(-1) & ~spans_volume(inputs["cell"].detach().cpu().numpy()))
            if bad.size:
                b = int(bad[0])
                where = "" if is_atoms(atoms) else f"structure {b}: "
                raise ModelError(where + no_volume_stress(pbc[b]))
        out = self.forward(**inputs, forces=forces, stress=stress)
        single = is_atoms(atoms)
        energy = out["energy"].detach().cpu().numpy()
        result = {"energy": float(energy[0]) if single else energy}
        if forces:
            per = split_per_structure(out["forces"], inputs["batch"], len(energy))
            result["forces"] = per[0] if single else per
        if stress and "stress" in out:
            s = out["stress"].detach().cpu().numpy()
            result["stress"] = s[0] if single else s
        return result

    def save(self, path) -> None:
        """Write a model file (atomic): kind, hyper-parameters, weights, normalisation, version, and the
        training run :func:`torchmdx.load_model` read (:attr:`training_record`; set it to None for a model
        trained further); read it back with :func:`torchmdx.load_model`. See :mod:`torchmdx.nn.model_file`."""
        from torchmdx.nn.model_file import save_potential

        save_potential(self, path)
