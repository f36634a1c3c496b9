"""A TorchScript-compatible neighbor list for one structure (the ML region of an OpenMM system).

The model's own neighbor lists (:mod:`torchmdx.kernels.neighbors_ref`, the Triton kernels) are
not TorchScript: Python control flow, dataclasses, one-line error classes, batches. An OpenMM
``TorchForce`` calls a TorchScript module with the positions (and the box) of one system, so
this module gives the same pairs for that case only, in ``torch.jit.script``-able code:

- every ordered pair (i, j), i != j, with ``|pos[j] - pos[i] + n @ box| < cutoff``, sorted by i
  then j (:mod:`torchmdx.kernels.neighbors` conventions: i receives, j sends);
- periodic (``box`` given, rows are the box vectors, OpenMM's and ASE's convention): the integer
  image ``n = -round(s_j - s_i)`` of the fractional coordinates. Under the minimum-image
  condition (cutoff < half of every perpendicular width of the box, checked here) that is the
  only image of a pair that can lie within the cutoff: |Δs_k + n_k| d_k <= r < cutoff <= d_k / 2
  forces |Δs_k + n_k| < 1/2, i.e. n_k = -round(Δs_k); no self-image pairs exist then.
- brute force in chunks of rows (at most ``chunk_pairs`` candidate pairs at a time): O(N²) work,
  O(N · rows) memory; an ML region has tens to a few thousand atoms.

The pair search runs without gradient; the caller computes the differentiable edge vectors from
the returned indices and integer shifts (so forces are exact derivatives, as in
:class:`torchmdx.nn.base.Potential`). Tested against :func:`torchmdx.kernels.neighbors_ref.neighbor_list`.
"""


from typing import List, Optional, Tuple

import torch

#: candidate pairs examined at once by :func:`pairs_within`
CHUNK_PAIRS = 1 << 20


def perpendicular_widths(box: torch.Tensor) -> torch.Tensor:
    """[3] distances between opposite faces of the box (rows a, b, c): V / |b x c|, V / |c x a|,
    V / |a x b| (same units as ``box``)."""
    a, b, c = box[0], box[1], box[2]
    volume = torch.abs(torch.dot(a, torch.linalg.cross(b, c)))
    areas = torch.stack([
        torch.linalg.norm(torch.linalg.cross(b, c)),
        torch.linalg.norm(torch.linalg.cross(c, a)),
        torch.linalg.norm(torch.linalg.cross(a, b)),
    ])
    return volume / areas


def pairs_within(pos: torch.Tensor, cutoff: float, box: Optional[torch.Tensor] = None,
                 chunk_pairs: int = CHUNK_PAIRS) -> Tuple[torch.Tensor, torch.Tensor]:
    """(edge_index [2, E] long, shifts [E, 3] integer-valued, ``pos.dtype``) of the pairs of
    ``pos`` [N, 3] closer than ``cutoff``; vectors are ``pos[j] - pos[i] + shifts @ box``.

    ``box`` [3, 3] (rows are box vectors) makes the structure periodic in all three directions;
    a cutoff of half the narrowest perpendicular width or more raises (minimum image)."""
    p = pos.detach()
    n = p.shape[0]
    device = p.device
    rows: List[torch.Tensor] = []
    cols: List[torch.Tensor] = []
    images: List[torch.Tensor] = []
    frac = p
    cell = torch.zeros(3, 3, dtype=p.dtype, device=device)
    periodic = box is not None
    if box is not None:
        cell = box.detach().to(p.dtype)
        widths = perpendicular_widths(cell)
        narrowest = float(widths.min())
        if not 2.0 * cutoff < narrowest:
            raise RuntimeError(
                "torchmdx: the periodic box is " + str(narrowest) + " Å wide at its narrowest, not more than "
                "twice the model's cutoff " + str(cutoff) + " Å; use a larger box (minimum image)"
            )
        frac = p @ torch.linalg.inv(cell)
    step = max(1, chunk_pairs // max(n, 1))
    cutoff2 = cutoff * cutoff
    for start in range(0, n, step):
        stop = min(n, start + step)
        delta = p.unsqueeze(0) - p[start:stop].unsqueeze(1)  # [c, N, 3]: pos[j] - pos[i]
        shift = torch.zeros_like(delta)
        if periodic:
            shift = -torch.round(frac.unsqueeze(0) - frac[start:stop].unsqueeze(1))
            delta = delta + shift @ cell
        within = (delta * delta).sum(-1) < cutoff2
        local = torch.arange(stop - start, device=device)
        within[local, local + start] = False  # an atom is not its own neighbor
        found = within.nonzero()  # row-major: sorted by i, then j
        rows.append(found[:, 0] + start)
        cols.append(found[:, 1])
        images.append(shift[found[:, 0], found[:, 1]])
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return torch.stack([empty, empty]), torch.zeros(0, 3, dtype=p.dtype, device=device)
    edge_index = torch.stack([torch.cat(rows), torch.cat(cols)])
    return edge_index, torch.cat(images)


def edge_geometry(pos: torch.Tensor, edge_index: torch.Tensor, shifts: torch.Tensor,
                  box: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(vectors [E, 3], distances [E]) = pos[j] - pos[i] + shifts @ box and its norm,
    differentiable with respect to ``pos``."""
    vectors = pos.index_select(0, edge_index[1]) - pos.index_select(0, edge_index[0])
    if box is not None:
        vectors = vectors + shifts @ box.to(pos.dtype)
    return vectors, torch.linalg.norm(vectors, dim=-1)
