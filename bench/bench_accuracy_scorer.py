#!/usr/bin/env python3
"""The scorer of bench/bench_accuracy.py, the one that belongs to neither side: each checkpoint
loaded by its project's public loader (``torchmdnet.models.model.load_model(path,
derivative=True)``, ``torchmdx.train.export.potential_from_checkpoint``), evaluated in eval mode
with full float32 matmuls (TF32 off) on the test frames, and :func:`errors` (numpy only): energy
MAE per structure (meV) and per atom (meV/atom: |ΔE_s| / N_s averaged over structures, the
meaningful one for molecules of different sizes) and force MAE (meV/Å, over Cartesian
components). Both layouts of bench/bench_accuracy_data.py (one molecule, or flat with offsets)
are scored the same way: the test structures' atoms gathered structure by structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

EV_TO_MEV = 1000.0


def errors(energy_pred, energy_ref, forces_pred, forces_ref, atoms=None) -> dict:
    """Energy MAE/RMSE (meV, over structures) and force MAE/RMSE (meV/Å, over Cartesian
    components) from energies [B] (eV) and forces [B, N, 3] or [A, 3] (eV/Å); with ``atoms`` (the
    atom count of each structure [B]) also the per-atom energy MAE/RMSE (meV/atom) of
    |ΔE_s| / N_s over structures."""
    e_pred, e_ref = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (energy_pred, energy_ref))
    f_pred, f_ref = (np.asarray(a, dtype=np.float64) for a in (forces_pred, forces_ref))
    if e_pred.shape != e_ref.shape or f_pred.size != f_ref.size or f_pred.shape[-1:] != f_ref.shape[-1:]:
        raise ValueError(f"prediction shapes {e_pred.shape}, {f_pred.shape} do not match the references "
                         f"{e_ref.shape}, {f_ref.shape}")
    de, df = e_pred - e_ref, f_pred.reshape(-1) - f_ref.reshape(-1)
    out = {"energy_mae": EV_TO_MEV * float(np.abs(de).mean()), "energy_rmse": EV_TO_MEV * float(np.sqrt((de ** 2).mean())),
           "forces_mae": EV_TO_MEV * float(np.abs(df).mean()), "forces_rmse": EV_TO_MEV * float(np.sqrt((df ** 2).mean()))}
    if atoms is not None:
        n = np.asarray(atoms, dtype=np.float64).reshape(-1)
        if n.shape != de.shape or (n <= 0).any():
            raise ValueError(f"atom counts {n.shape} must be positive, one per structure ({de.shape})")
        de_atom = de / n
        out.update(energy_mae_per_atom=EV_TO_MEV * float(np.abs(de_atom).mean()),
                   energy_rmse_per_atom=EV_TO_MEV * float(np.sqrt((de_atom ** 2).mean())))
    return out


def count_parameters(model) -> int:
    """Parameters of a model without a frozen prior's table (TorchMD-NET's ``Atomref`` prior keeps
    its reference energies as a frozen embedding; torchmdx keeps them as a buffer): the count the
    report compares between the two sides."""
    return int(sum(p.numel() for name, p in model.named_parameters()
                   if not (name.startswith("prior_model") and not p.requires_grad)))


def _test_batches(frames: dict, indices: np.ndarray, batch_size: int, device):
    """(structures, z, pos, batch) of the test structures, ``batch_size`` at a time, atoms in
    structure order (as :func:`bench_accuracy_data.atom_index` gathers the references)."""
    import torch

    from bench_accuracy_data import atom_index, flat_structures

    flat = flat_structures(frames)
    offsets = flat["offsets"]
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        atoms = atom_index(offsets, idx)
        counts = torch.as_tensor(offsets[idx + 1] - offsets[idx], device=device)
        z = torch.as_tensor(flat["z"][atoms], dtype=torch.long, device=device)
        pos = torch.as_tensor(flat["pos"][atoms], dtype=torch.float32, device=device)
        batch = torch.arange(len(idx), device=device).repeat_interleave(counts)
        yield len(idx), z, pos, batch


def predict_torchmdnet(checkpoint: Path, frames: dict, indices: np.ndarray, device, batch_size: int = 64):
    """Energies [B] (eV) and forces [A, 3] (eV/Å, the test structures' atoms in order) of a
    TorchMD-NET checkpoint; its parameter count."""
    from torchmdnet.models.model import load_model

    model = load_model(str(checkpoint), derivative=True).to(device).eval()
    energies, forces = [], []
    for _b, z, pos, batch in _test_batches(frames, indices, batch_size, device):
        y, neg_dy = model(z, pos, batch=batch)
        energies.append(y.detach().double().cpu().numpy().reshape(-1))
        forces.append(neg_dy.detach().double().cpu().numpy())
    return np.concatenate(energies), np.concatenate(forces).reshape(-1, 3), count_parameters(model)


def predict_torchmdx(checkpoint: Path, frames: dict, indices: np.ndarray, device, batch_size: int = 64):
    """Energies [B] (eV) and forces [A, 3] (eV/Å) of a torchmdx checkpoint (its EMA weights)."""
    from torchmdx.train.export import potential_from_checkpoint

    model = potential_from_checkpoint(checkpoint).to(device).eval()
    energies, forces = [], []
    for b, z, pos, batch in _test_batches(frames, indices, batch_size, device):
        out = model(z, pos, batch, forces=True, num_structures=b)
        energies.append(out["energy"].detach().double().cpu().numpy().reshape(-1))
        forces.append(out["forces"].detach().double().cpu().numpy())
    return np.concatenate(energies), np.concatenate(forces).reshape(-1, 3), count_parameters(model)


PREDICTORS = {"torchmdnet": predict_torchmdnet, "torchmdx": predict_torchmdx}


def full_float32_precision() -> None:
    """Score in full float32 (no TF32 products), whatever the training used."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def score_checkpoints(side: str, records: list, frames: dict, indices: np.ndarray, device, on_point=None) -> list:
    """One point per saved checkpoint: the record plus the test errors (and the scored model's
    parameter count)."""
    full_float32_precision()
    from bench_accuracy_data import atom_index, flat_structures

    flat = flat_structures(frames)
    atoms = flat["offsets"][indices + 1] - flat["offsets"][indices]
    e_ref, f_ref = frames["energy"][indices], flat["forces"][atom_index(flat["offsets"], indices)]
    points, scored = [], {}
    for record in records:
        if record["file"] not in scored:  # the end record may repeat the last file
            e_pred, f_pred, count = PREDICTORS[side](Path(record["file"]), frames, indices, device)
            scored[record["file"]] = dict(errors(e_pred, e_ref, f_pred, f_ref, atoms), parameters=int(count))
        point = {k: v for k, v in record.items() if k != "file"}
        point.update(scored[record["file"]])
        points.append(point)
        print(f"[{side}] score t {point['t']:7.1f} s  step {point['step']:6d}  test F MAE {point['forces_mae']:8.2f} "
              f"meV/Å  E MAE {point['energy_mae']:8.2f} meV  ({point['energy_mae_per_atom']:7.3f} meV/atom)", flush=True)
        if on_point is not None:
            on_point(points)
    return points
