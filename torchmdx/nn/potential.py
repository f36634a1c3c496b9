"""The ET potential: representation + output head + energy normalisation -> per-atom energies.

Energy of structure b with atoms a (eV):

    t_a = scale · y_a + atomref(z_a) + shift          y_a: the head's output for atom a
    E_b = sum_a t_a + energy_offset          (reduce_op 'sum')
    E_b = mean_a t_a + energy_offset         (reduce_op 'mean', intensive targets)
    E_b = sum_a t_a / (n_b + 1) + energy_offset   ('torchmdnet_mean': TorchMD-NET 3.0's 'mean')

so with 'sum', E = scale · E_model + shift · n_atoms + sum_a atomref(z_a) + energy_offset.
``atomref`` [max_z] holds per-element reference energies (eV), ``scale`` and ``shift`` the
standardisation fitted on the training set, ``energy_offset`` a per-structure constant (what a
TorchMD-NET ``mean`` becomes). The per-atom energies returned by :meth:`atomic_energies` sum to
E_b exactly (the offset and, for 'mean', the 1/n weights are spread over the atoms).
The normalisation buffers are float64 whatever the model dtype, and energies are returned in
float64 (absolute energies of large structures need more than float32's 7 digits); forces
have the dtype of the positions.

``elements`` (atomic numbers seen in training) restricts the accepted elements: any other gives
a one-line ModelError naming the atom, its element and the known ones. Forces, stress and the
neighbor list come from :class:`torchmdx.nn.base.Potential`.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch

from torchmdx.dtypes import torch_dtype
from torchmdx.errors import ModelError
from torchmdx.nn.base import Graph, Potential
from torchmdx.nn.config import ModelConfig, model_config
from torchmdx.nn.et import ETRepresentation, compiled_function
from torchmdx.nn.heads import DipoleHead, GatedEquivariantHead, ScalarHead

#: float64 buffers of the energy normalisation
_NORMALISATION_BUFFERS = ("atomref", "scale", "shift", "energy_offset")

#: distinct atoms closer than this (Å) are refused as overlapping
OVERLAP_DISTANCE = 1e-6


@contextlib.contextmanager
def _construction(dtype: torch.dtype, seed: Optional[int]):
    """Create parameters directly in ``dtype`` and, with a seed, reproducibly."""
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def element_symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"


class ETPotential(Potential):
    """TorchMD-NET's equivariant transformer as a :class:`Potential` (energies in eV).

    ``ETPotential(config)`` with a :class:`ModelConfig`, a dict, a YAML path or None (defaults);
    keyword arguments override single keys: ``ETPotential(embedding_dimension=64)``.
    """

    kind = "et"
    traceable = True

    def __init__(self, config: Union[ModelConfig, Mapping, str, None] = None, **overrides):
        super().__init__()
        cfg = model_config(config, **overrides)
        self.config = cfg
        self.cutoff = float(cfg.cutoff_upper)
        dtype = torch_dtype(cfg.dtype, error=ModelError, what="model dtype")
        with _construction(dtype, cfg.seed):
            self.representation = ETRepresentation(cfg)
            if cfg.output_model == "scalar":
                self.head = ScalarHead(cfg.embedding_dimension, cfg.activation)
            else:
                self.head = GatedEquivariantHead(cfg.embedding_dimension, cfg.activation)
            self.dipole_head = DipoleHead(cfg.embedding_dimension, cfg.activation) if cfg.dipole else None
        # the normalisation stays in float64 whatever the model dtype (see _apply): absolute
        # energies of large structures need more than float32's 7 digits
        self.register_buffer("atomref", torch.zeros(cfg.max_z, dtype=torch.float64))
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("shift", torch.zeros((), dtype=torch.float64))
        self.register_buffer("energy_offset", torch.zeros((), dtype=torch.float64))
        self.register_buffer("known_elements", torch.ones(cfg.max_z, dtype=torch.bool))
        self.backend = cfg.backend
        self._extras: Optional[dict] = None
        self.compiled = False
        self._frozen: list = []  # parameters set_compiled(True) froze

    def _apply(self, fn, recurse=True):
        """Module.to()/float()/cuda(): move the normalisation buffers but keep them float64."""
        kept = {name: self._buffers[name] for name in _NORMALISATION_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != torch.float64:
                self._buffers[name] = old.to(device=new.device)
        return self

    # ------------------------------------------------------------------ description / files
    @property
    def dtype(self) -> torch.dtype:
        return self.representation.embedding.weight.dtype

    def hparams(self) -> dict:
        """Constructor arguments (the config, with the current dtype), plain Python."""
        values = self.config.to_dict()
        values["dtype"] = "float64" if self.dtype == torch.float64 else "float32"
        values["backend"] = self.backend
        return values

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
    ) -> "ETPotential":
        """Set the energy normalisation (eV); arguments left None keep their value.

        ``atomref``: {Z: E_ref} or a sequence/tensor indexed by Z (length <= max_z).
        ``elements``: the atomic numbers the model may be used on (training set's elements).
        """
        max_z = self.config.max_z
        if atomref is not None:
            table = torch.zeros(max_z, dtype=torch.float64)
            if isinstance(atomref, Mapping):
                for key, value in atomref.items():
                    z = int(key)
                    if not 0 <= z < max_z:
                        raise ModelError(f"atomref: atomic number {z} is outside 0..{max_z - 1} (max_z {max_z})")
                    table[z] = float(value)
            else:
                values = torch.as_tensor(atomref, dtype=torch.float64).flatten()
                if values.numel() > max_z:
                    nonzero = values[max_z:].nonzero()
                    if nonzero.numel():
                        raise ModelError(
                            f"atomref: a reference energy is given for Z={max_z + int(nonzero[0])}, beyond max_z {max_z}"
                        )
                    values = values[:max_z]
                table[: values.numel()] = values
            self.atomref.copy_(table.to(self.atomref))
        if scale is not None:
            self.scale.fill_(float(scale))
        if shift is not None:
            self.shift.fill_(float(shift))
        if energy_offset is not None:
            self.energy_offset.fill_(float(energy_offset))
        if elements is not None:
            elements = sorted({int(z) for z in elements})
            for z in elements:
                if not 0 <= z < max_z:
                    raise ModelError(f"elements: atomic number {z} is outside 0..{max_z - 1} (max_z {max_z})")
            known = torch.zeros(max_z, dtype=torch.bool, device=self.known_elements.device)
            known[elements] = True
            self.known_elements.copy_(known)
        return self

    # ------------------------------------------------------------------ checks
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
        raise ModelError(f"atom {bad} is element {element_symbol(zb)} (Z={zb}), which this model does not know; known elements: {known}")

    def _check_overlaps(self, graph: Graph) -> None:
        if graph.distances.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # no host synchronisation inside a CUDA graph
        close = graph.distances < OVERLAP_DISTANCE
        if graph.mask is not None:
            close = close & graph.mask
        if bool(close.any()):
            e = int(close.nonzero()[0, 0])
            i, j = int(graph.edge_index[0, e]), int(graph.edge_index[1, e])
            raise ModelError(f"atoms {i} and {j} are on top of each other (distance {float(graph.distances[e].detach()):.3g} Å)")

    # ------------------------------------------------------------------ inference speed
    def set_compiled(self, enabled: bool = True) -> bool:
        """Inference mode with fewer, fused kernels: the dense parts of the representation and
        the head run through ``torch.compile`` (:func:`torchmdx.nn.et.compiled_function`), the
        message step on its own kernels. Freezes the parameters (``requires_grad = False``):
        energies, forces and stress are unchanged, parameters get no gradients (not for
        training; ``set_compiled(False)`` gives back ``requires_grad`` to the parameters it
        froze), and double backward is not available. The first call compiles (tens of
        seconds); the MD engine and the calculator use it on CUDA. Returns ``enabled``."""
        enabled = bool(enabled)
        if enabled and not self.compiled:
            self._frozen = [p for p in self.parameters() if p.requires_grad]
            for p in self._frozen:
                p.requires_grad_(False)
        elif not enabled and self.compiled:
            for p in self._frozen:
                p.requires_grad_(True)
            self._frozen = []
        self.compiled = enabled
        return self.compiled

    # ------------------------------------------------------------------ energies
    def atomic_energies(self, graph: Graph) -> torch.Tensor:
        """Per-atom energies t_a (eV, float64). While :attr:`tracing`
        (:class:`torchmdx.nn.traced.TracedForces`): no overlap check (a host read) and the torch
        reference message."""
        tracing = self.tracing
        if not tracing:
            self._check_overlaps(graph)
        dtype = self.dtype
        compiled = self.compiled and not tracing
        x, vec = self.representation(
            graph.z, graph.edge_index, graph.vectors.to(dtype), graph.distances.to(dtype), graph.mask,
            backend="torch" if tracing else self.backend, compiled=compiled,
        )
        head = compiled_function(type(self.head).forward, x.device.type) if compiled else type(self.head).forward
        y = head(self.head, x, vec).to(torch.float64)
        t = self.scale * y + self.atomref[graph.z] + self.shift
        counts = torch.zeros(graph.num_structures, dtype=t.dtype, device=t.device).index_add(
            0, graph.batch, torch.ones_like(t)
        )
        per_atom_count = counts[graph.batch]
        if self.config.reduce_op == "mean":
            t = t / per_atom_count
        elif self.config.reduce_op == "torchmdnet_mean":
            t = t / (per_atom_count + 1)
        energies = t + self.energy_offset / per_atom_count
        if self._extras is not None and self.dipole_head is not None:
            self._extras["dipole"] = self.dipole_head(
                x, vec, graph.z, graph.pos.to(dtype), graph.batch, graph.num_structures
            )
        return energies

    def forward(self, z, pos=None, batch=None, cell=None, pbc=None, **kwargs) -> dict:
        """As :meth:`Potential.forward`; a model with a dipole head also returns ``dipole`` [B, 3] (e·Å)."""
        if self.dipole_head is None or not torch.is_tensor(z):
            return super().forward(z, pos, batch, cell, pbc, **kwargs)
        self._extras = {}
        try:
            out = super().forward(z, pos, batch, cell, pbc, **kwargs)
            out.update(self._extras)
        finally:
            self._extras = None
        return out
