"""Geometric Algebra Transformer (Brehmer, de Haan, Behrends, Cohen; de Haan, Cohen, Brehmer) over
the Euclidean, projective or conformal algebra; selected with ``model.architecture: gatr``.
See docs/model.md ("GATr")."""

from torchmdx.nn.gatr.config import GATrConfig, gatr_config
from torchmdx.nn.gatr.potential import GATrPotential

__all__ = ["GATrConfig", "GATrPotential", "gatr_config"]
