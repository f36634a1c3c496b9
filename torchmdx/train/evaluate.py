"""Errors of a model on a dataset: predictions, an error table, a JSON of the metrics, parity plots.

Errors (computed here with numpy in float64 from the collected predictions, independently of
the training metrics)::

    energy MAE/RMSE            over structures, meV
    energy per atom MAE/RMSE   (E_pred − E_ref)/n_atoms over structures, meV/atom
    forces MAE/RMSE            over Cartesian force components, meV/Å
    stress MAE/RMSE            over the 9 components of each periodic structure's stress, meV/Å³
                               (data with a stress only)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from torchmdx.errors import DataError, ModelError
from torchmdx.io_utils import atomic_write
from torchmdx.units import EV_TO_MEV



def predict(model, dataset, indices: Optional[Sequence[int]] = None, batch_size: int = 64, device="cpu",
            progress: bool = False) -> dict:
    """Energies (eV) and forces (eV/Å) of ``dataset[indices]`` with ``model`` next to the references.

    Returns numpy arrays: ``energy_pred``/``energy_ref`` [B], ``n_atoms`` [B], ``forces_pred``/
    ``forces_ref`` [N, 3] (None without reference forces), ``stress_pred``/``stress_ref``
    [B, 3, 3] eV/Å³ (None without reference stresses), ``indices`` [B].
    """
    from torchmdx.data.loader import batches_in_order
    from torchmdx.data.structures import structure_indices

    # a boolean mask was cast to 0 and 1 (structures 0 and 1 over and over; round 33)
    idx = np.arange(len(dataset)) if indices is None else structure_indices(indices, len(dataset), "predict")
    has_forces = bool(getattr(dataset, "has_forces", True))
    energy_pred, energy_ref, n_atoms, f_pred, f_ref, s_pred, s_ref = [], [], [], [], [], [], []
    batches = batches_in_order(dataset, idx, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch", leave=False, total=-(-len(idx) // batch_size))
    model = model.to(device)
    from torchmdx.nn.atoms import module_device_dtype

    _, dtype = module_device_dtype(model)  # analytic potentials have buffers only (next(parameters()): StopIteration)
    for batch in batches:
        batch = batch.to(device)
        has_stress = getattr(batch, "stress", None) is not None
        try:
            out = model(batch.z, batch.pos.to(dtype), batch.batch, batch.cell.to(dtype), batch.pbc, forces=has_forces,
                        stress=has_stress, num_structures=int(batch.num_graphs))
        except ModelError as exc:
            raise _name_the_structure(exc, model, batch, dataset) from None
        if has_stress:
            s_pred.append(out["stress"].detach().double().cpu().numpy())
            s_ref.append(batch.stress.reshape(-1, 3, 3).double().cpu().numpy())
        energy_pred.append(out["energy"].detach().double().cpu().numpy())
        energy_ref.append(batch.energy.reshape(-1).double().cpu().numpy())
        n_atoms.append((batch.ptr[1:] - batch.ptr[:-1]).cpu().numpy())
        if has_forces and getattr(batch, "forces", None) is not None:
            f_pred.append(out["forces"].detach().double().cpu().numpy())
            f_ref.append(batch.forces.double().cpu().numpy())
    if not energy_pred:
        raise DataError("nothing to evaluate: the selected split is empty")
    return {
        "indices": idx,
        "energy_pred": np.concatenate(energy_pred),
        "energy_ref": np.concatenate(energy_ref),
        "n_atoms": np.concatenate(n_atoms),
        "forces_pred": np.concatenate(f_pred) if f_pred else None,
        "forces_ref": np.concatenate(f_ref) if f_ref else None,
        "stress_pred": np.concatenate(s_pred) if s_pred else None,
        "stress_ref": np.concatenate(s_ref) if s_ref else None,
    }


def _name_the_structure(exc, model, batch, dataset):
    """The model's one-line error about an atom of a batch, said of its structure in the dataset."""
    source = getattr(dataset, "source", None) or "data"
    for k in range(int(batch.num_graphs)):
        a, b = int(batch.ptr[k]), int(batch.ptr[k + 1])
        try:
            model.check_elements(batch.z[a:b])
        except ModelError as inner:
            index = int(batch.idx[k]) if getattr(batch, "idx", None) is not None else k
            return ModelError(f"{source}: structure {index}: {inner}")
    return exc


def check_finite_predictions(predictions: dict, model_path) -> None:
    """One-line ModelError when the model predicted NaN or infinite energies or forces."""
    energy = predictions["energy_pred"]
    bad = ~np.isfinite(energy)
    forces = predictions.get("forces_pred")
    if forces is not None:
        per_structure = np.add.reduceat(~np.isfinite(forces).all(axis=1), np.r_[0, np.cumsum(predictions["n_atoms"])[:-1]])
        bad |= per_structure > 0
    if bad.any():
        first = int(predictions["indices"][int(np.argmax(bad))])
        raise ModelError(f"{model_path}: predicts NaN or infinite energies or forces for {int(bad.sum())} of {bad.size} "
                         f"structures (first: structure {first}); no error table written")


def error_metrics(predictions: dict) -> dict:
    """MAE and RMSE (meV, meV/atom, meV/Å) and counts from :func:`predict`'s output."""
    de = predictions["energy_pred"] - predictions["energy_ref"]
    de_atom = de / predictions["n_atoms"]
    out = {
        "n_structures": int(de.size),
        "n_atoms": int(predictions["n_atoms"].sum()),
        "energy_mae": EV_TO_MEV * float(np.abs(de).mean()),
        "energy_rmse": EV_TO_MEV * float(np.sqrt((de ** 2).mean())),
        "energy_per_atom_mae": EV_TO_MEV * float(np.abs(de_atom).mean()),
        "energy_per_atom_rmse": EV_TO_MEV * float(np.sqrt((de_atom ** 2).mean())),
    }
    if predictions.get("forces_ref") is not None:
        df = predictions["forces_pred"] - predictions["forces_ref"]
        out["forces_mae"] = EV_TO_MEV * float(np.abs(df).mean())
        out["forces_rmse"] = EV_TO_MEV * float(np.sqrt((df ** 2).mean()))
    if predictions.get("stress_ref") is not None:
        known = np.isfinite(predictions["stress_ref"])  # structures without a stress are NaN
        ds = (predictions["stress_pred"] - predictions["stress_ref"])[known]
        if ds.size:
            out["stress_mae"] = EV_TO_MEV * float(np.abs(ds).mean())
            out["stress_rmse"] = EV_TO_MEV * float(np.sqrt((ds ** 2).mean()))
    return out


#: (label, metric key, unit) of the error table's rows
QUANTITIES = (("energy", "energy", "meV"), ("energy per atom", "energy_per_atom", "meV/atom"),
              ("forces", "forces", "meV/Å"), ("stress", "stress", "meV/Å³"))


def format_table(errors: dict, heading: str = "") -> str:
    """The error table as text."""
    lines = [heading] if heading else []
    rows = [(label, f"{errors[f'{key}_mae']:.4f}", f"{errors[f'{key}_rmse']:.4f}", unit)
            for label, key, unit in QUANTITIES if f"{key}_mae" in errors]
    # wide enough for the largest value and two spaces (a 9-digit MAE ran into its RMSE: one number to the eye)
    width = max([12] + [len(text) + 2 for row in rows for text in row[1:3]])
    lines.append(f"{'quantity':<18}{'MAE':>{width}}{'RMSE':>{width}}  unit")
    for label, mae, rmse, unit in rows:
        lines.append(f"{label:<18}{mae:>{width}}{rmse:>{width}}  {unit}")
    lines.append(f"({errors['n_structures']} structures, {errors['n_atoms']} atoms)")
    return "\n".join(lines)


def write_report(errors: dict, predictions: dict, out_dir, heading: str, info: dict) -> dict:
    """``errors.json`` (metrics + info), ``errors.txt`` (the table) and ``parity.png`` in ``out_dir``."""
    from torchmdx.train.plots import parity_plot

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(errors, heading)
    paths = {"table": out_dir / "errors.txt", "json": out_dir / "errors.json", "parity": out_dir / "parity.png"}
    with atomic_write(paths["table"], "w") as handle:
        handle.write(table + "\n")
    with atomic_write(paths["json"], "w") as handle:
        units = {key: unit for _, key, unit in QUANTITIES if f"{key}_mae" in errors}
        json.dump({"units": units,
                   "metrics": errors, **info}, handle, indent=2)
    parity_plot(predictions, errors, paths["parity"], title=heading)
    return {k: str(v) for k, v in paths.items()} | {"text": table}
