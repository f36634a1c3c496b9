"""Equiformer (Liao & Smidt, ICLR 2023): equivariant graph attention over irreps features, on
e3nn; selected with ``model.architecture: equiformer``. See docs/model.md ("Equiformer")."""

from torchmdx.nn.equiformer.config import EquiformerConfig, equiformer_config
from torchmdx.nn.equiformer.potential import EquiformerPotential

__all__ = ["EquiformerConfig", "EquiformerPotential", "equiformer_config"]
