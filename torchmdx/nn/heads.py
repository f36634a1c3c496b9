"""Output heads on the ET representation (x [N, F], vec [N, 3, F]).

- :class:`ScalarHead`: per-atom MLP, y_a = W_2 act(W_1 x_a) (hidden F/2).
- :class:`GatedEquivariantHead`: two gated-equivariant blocks F -> F/2 -> 1 that also read the
  vector features; the scalar output is invariant.
- :class:`DipoleHead`: QM9-style dipole vector (e·Å) from the same two blocks,
  mu_b = sum_{a in b} q_a (pos_a - com_b) + v_a, with q_a the scalar and v_a the vector output
  of atom a and com_b the centre of mass.
"""

from __future__ import annotations

import torch
from torch import nn

from torchmdx.nn.layers import MLP, GatedEquivariantBlock


class ScalarHead(nn.Module):
    def __init__(self, hidden: int, activation: str):
        super().__init__()
        self.mlp = MLP(hidden, hidden // 2, 1, activation)

    def forward(self, x, vec):
        return self.mlp(x).squeeze(-1)


def _gated_blocks(hidden: int, activation: str) -> nn.ModuleList:
    return nn.ModuleList(
        [
            GatedEquivariantBlock(hidden, hidden // 2, activation, scalar_activation=True),
            GatedEquivariantBlock(hidden // 2, 1, activation, scalar_activation=False),
        ]
    )


class GatedEquivariantHead(nn.Module):
    """Scalar output of two gated equivariant blocks (TorchMD-NET's ``EquivariantScalar``)."""

    def __init__(self, hidden: int, activation: str):
        super().__init__()
        self.blocks = _gated_blocks(hidden, activation)

    def forward(self, x, vec):
        for block in self.blocks:
            x, vec = block(x, vec)
        # the last block's vector output is not used; adding it times 0 gives its projection a
        # (zero) gradient, so DDP finds every parameter used (plain strategy: ddp stopped at the
        # first step with "parameters that were not used in producing the loss"); as TorchMD-NET
        return x.squeeze(-1) + 0.0 * vec.sum()


class DipoleHead(nn.Module):
    def __init__(self, hidden: int, activation: str):
        super().__init__()
        self.blocks = _gated_blocks(hidden, activation)

    def forward(self, x, vec, z, pos, batch, num_structures: int):
        """Dipole moment per structure [B, 3] (e·Å)."""
        from ase.data import atomic_masses

        for block in self.blocks:
            x, vec = block(x, vec)
        masses = torch.as_tensor(atomic_masses, dtype=pos.dtype, device=pos.device)[z].unsqueeze(-1)
        total = torch.zeros(num_structures, 1, dtype=pos.dtype, device=pos.device).index_add(0, batch, masses)
        com = torch.zeros(num_structures, 3, dtype=pos.dtype, device=pos.device).index_add(0, batch, masses * pos) / total
        per_atom = x * (pos - com[batch]).to(x.dtype) + vec.squeeze(-1)
        return torch.zeros(num_structures, 3, dtype=x.dtype, device=x.device).index_add(0, batch, per_atom)
