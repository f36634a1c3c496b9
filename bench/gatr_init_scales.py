"""Where GATr's position information flows at initialisation (docs/sweep.md, "Why GATr trails here").

Builds one GATr variant of configs/sweep_equivariance.yaml (float64, seed 0) on 32 ethanol
frames and prints, per block: the rms of the join's reference coefficient, of the geometric
product's and the join's outputs, and of the three attention-score terms (⟨q, k⟩ and scalars,
the distance-aware term, the radial bias), each as the spread over a receiver's edges (what the
softmax sees); then the rms force of the untrained representation split by path: through the
points (the multivector input) and through the edge lengths (the radial bias only).

    python bench/gatr_init_scales.py [--variant gatr_s] [--set model.key=value ...]

The config's GATr variants use ``distance_normalised: true, join_reference: input``; the first
formulation is ``--set model.distance_normalised=false --set model.join_reference=block``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="gatr_s")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from torchmdx.config import apply_overrides, load_yaml
    from torchmdx.nn.gatr import layers as L
    from torchmdx.nn.gatr import model as M
    from torchmdx.nn.gatr.potential import GATrPotential

    values = load_yaml(ROOT / "configs" / "sweep_equivariance.yaml")
    model_values = {k: v for k, v in values["sweep"]["variants"][args.variant]["model"].items()}
    model_values = apply_overrides({"model": model_values}, args.overrides)["model"]
    model_values.update(dtype="float64", seed=args.seed)
    model_values.pop("architecture")
    potential = GATrPotential(model_values)
    rep = potential.representation

    data = np.load("/work/shared/data/md17/md17_ethanol_xtb.npz")
    B = 32
    pos = torch.tensor(data["R"][:B].reshape(-1, 3), dtype=torch.float64)
    z = torch.tensor(np.tile(data["z"], B), dtype=torch.long)
    batch = torch.arange(B).repeat_interleave(len(data["z"]))
    nb = potential.neighbors(pos, batch, None, None)
    edge_index = nb.edge_index

    records = {}

    def spread(scores, receivers):  # rms over edges of (score - mean over the receiver's edges)
        N = int(receivers.max()) + 1
        count = torch.zeros(N, dtype=scores.dtype).index_add(0, receivers, torch.ones_like(scores[:, 0]))
        mean = torch.zeros(N, scores.shape[1], dtype=scores.dtype).index_add(0, receivers, scores) / count[:, None]
        return float((scores - mean[receivers]).pow(2).mean().sqrt())

    # wrap the attention to record its score terms (recomputed here, independent of the fused code)
    original_attention = M.MVAttention.forward

    def attention(self, mv, s, receivers, senders, phi, distances=None, rbf=None, radial=None, flat=None):
        b = self.buffers_[0]
        qkv_mv, qkv_s = self.qkv.forward_flat(flat)
        C, S, H = self.C, self.S, self.H
        q_mv, k_mv, _ = qkv_mv.split(C, dim=1)
        q_s, k_s, _ = qkv_s.split(S, dim=1)
        i, j = receivers, senders
        qk = ((q_mv * b.inner_weights)[i] * k_mv[j]).reshape(-1, H, (C // H) * b.algebra.dim).sum(-1)
        qk = qk + (q_s[i] * k_s[j]).reshape(-1, H, S // H).sum(-1)
        terms = {"qk": qk * self.scale}
        if self.distance:
            phi_q, psi_k = self._point_features(qkv_mv[:, :2 * C])
            terms["distance"] = (phi_q[i] * psi_k[j]).sum(-1) * self.distance_scale * self.scale
        if radial is not None:
            terms["radial"] = radial
        for key, value in terms.items():
            records.setdefault(f"score {key}", []).append(spread(value.detach(), i))
        return original_attention(self, mv, s, receivers, senders, phi, distances, rbf, radial, flat)

    original_bilinear = L.Bilinear.forward

    def bilinear(self, mv, reference):
        out = original_bilinear(self, mv, reference)
        records.setdefault("reference", []).append(float(reference.detach().pow(2).mean().sqrt()))
        g = self.gp_channels
        records.setdefault("gp out", []).append(float(out[..., :g, :].detach().pow(2).mean().sqrt()))
        if self.join_channels:
            records.setdefault("join out", []).append(float(out[..., g:, :].detach().pow(2).mean().sqrt()))
        return out

    M.MVAttention.forward, L.Bilinear.forward = attention, bilinear
    try:
        def energy(p_points, p_lengths):
            vec = p_lengths[edge_index[1]] - p_lengths[edge_index[0]]
            d = vec.norm(dim=-1)
            return rep(z, p_points, batch, B, edge_index, d).sum()

        p = pos.clone().requires_grad_(True)
        (f_all,) = torch.autograd.grad(energy(p, p), p)
        for key, value in records.items():
            print(f"{key:16s} " + " ".join(f"{v:.3g}" for v in value[: len(value) // 1]))
        records.clear()
        M.MVAttention.forward, L.Bilinear.forward = original_attention, original_bilinear
        (f_points,) = torch.autograd.grad(energy(p, pos), p)
        (f_lengths,) = torch.autograd.grad(energy(pos, p), p)
    finally:
        M.MVAttention.forward, L.Bilinear.forward = original_attention, original_bilinear
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    print(f"rms dy/dx: all {rms(f_all):.3g}, through points {rms(f_points):.3g}, through lengths {rms(f_lengths):.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
