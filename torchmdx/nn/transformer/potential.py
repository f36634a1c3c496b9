"""The plain transformer as a :class:`~torchmdx.nn.base.Potential` (the ET's energy
normalisation, forces by autograd; non-periodic structures only, as GATr:
`torchmdx.nn.attention_potential.AttentionPotential`)."""

from __future__ import annotations

from typing import Mapping, Union

from torchmdx.nn.attention_potential import AttentionPotential
from torchmdx.nn.transformer.config import TransformerConfig, transformer_config
from torchmdx.nn.transformer.model import TransformerRepresentation


class TransformerPotential(AttentionPotential):
    """Non-equivariant transformer as a :class:`Potential` (energies in eV)."""

    kind = "transformer"
    build_config = staticmethod(transformer_config)
    representation_class = TransformerRepresentation

    def __init__(self, config: Union[TransformerConfig, Mapping, str, None] = None, **overrides):
        super().__init__(config, **overrides)
