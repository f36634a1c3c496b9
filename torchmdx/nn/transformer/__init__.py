"""A plain transformer on atoms, not equivariant (``model.architecture: transformer``): the
baseline of "Does equivariance matter at scale?", trained with ``train.augment: rotations``."""

from torchmdx.nn.transformer.config import TransformerConfig, transformer_config
from torchmdx.nn.transformer.potential import TransformerPotential

__all__ = ["TransformerConfig", "TransformerPotential", "transformer_config"]
