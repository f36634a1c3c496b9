"""The all-pairs edge layout of small molecules: every ordered pair of atoms of a structure is an edge.

For B structures of n atoms each (N = B n atoms, the atoms of structure b at b n ... b n + n - 1),
edge e = (b n + i) n + j joins receiver a = b n + i and sender s = b n + j, for every i and j
(E = B n² edges; the diagonal i = j and the pairs beyond the cutoff are masked by the caller).
Nothing has to be searched: the list depends on n and B only, never on the positions, so it is
never stale. On this layout the edge operations of a message-passing layer are dense:

    gather of the receivers   x[i_e]             = x.view(B, n, 1, ...)   broadcast over j
    gather of the senders     x[j_e]             = x.view(B, 1, n, ...)   broadcast over i
    sum over a receiver's edges  sum_{e: i_e = a} m_e = m.view(B, n, n, ...).sum(2)

Inside a compiled graph these are broadcasts and reductions, which inductor fuses with the
element-wise work around them; on a neighbor list they are gathers and atomic scatter-adds (the
backward of a gather is a scatter too). The cost is n² edges instead of the pairs within the
cutoff, which pays only for small molecules, where every pair is within the cutoff or nearly so
(:data:`torchmdx.nn.traced.PAIR_LAYOUT_MAX_ATOMS`).
"""

from __future__ import annotations

import torch


def pair_index(num_structures: int, atoms_per_structure: int, device=None) -> tuple:
    """(edge_index [2, B n²] long, off-diagonal mask [B n²] bool) of the all-pairs layout
    (module doc): row e = (b n + i) n + j is receiver b n + i, sender b n + j, sorted by receiver
    as every torchmdx edge list is."""
    b, n = int(num_structures), int(atoms_per_structure)
    atoms = torch.arange(b * n, device=device)
    receivers = atoms.repeat_interleave(n)
    senders = (atoms.view(b, n, 1) - atoms.view(b, n, 1) % n + torch.arange(n, device=device).view(1, 1, n)).reshape(-1)
    return torch.stack([receivers, senders]), receivers != senders


def receivers_of(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B n, ...] at each edge's receiver, as a [B, n, 1, ...] view (broadcasts over the senders)."""
    return x.view(-1, n, 1, *x.shape[1:])


def senders_of(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B n, ...] at each edge's sender, as a [B, 1, n, ...] view (broadcasts over the receivers)."""
    return x.view(-1, 1, n, *x.shape[1:])


def as_pairs(values: torch.Tensor, n: int) -> torch.Tensor:
    """Per-edge values [B n², ...] as [B, n, n, ...] (receiver, sender)."""
    return values.view(-1, n, n, *values.shape[1:])


def sum_over_senders(messages: torch.Tensor) -> torch.Tensor:
    """m [B, n, n, ...] (receiver, sender) summed over the senders: [B n, ...] per receiver."""
    summed = messages.sum(2)
    return summed.reshape(-1, *summed.shape[2:])
