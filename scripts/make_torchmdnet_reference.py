#!/usr/bin/env python
"""Create TorchMD-NET reference checkpoints and predictions for tests/test_torchmdnet_import.py.

Runs in a throwaway environment with TorchMD-NET (not a torchmdx dependency)::

    python3 -m venv /tmp/tmdnet
    /tmp/tmdnet/bin/pip install torch==2.13.0 torchmd-net==3.0.0     # pure Python since 3.0
    /tmp/tmdnet/bin/python scripts/make_torchmdnet_reference.py [--shared-data ../shared/data]

For each configuration below it builds a small, randomly initialised TorchMD-NET ET in float64
through TorchMD-NET's own ``LNNP`` LightningModule (so the checkpoint has the exact layout
``torchmd-train`` writes: ``hyper_parameters`` + ``state_dict`` with ``model.`` prefixes),
perturbs every parameter (biases, LayerNorm weights, trainable RBF) so that each of them
matters, sets random standardisation (mean/std) and Atomref tables where configured, saves the
checkpoint with a Lightning ``Trainer`` and records energies and forces (F = -dE/dpos) of real
molecules from ``../shared/data/systems`` (and, for two models, periodic orthorhombic and
triclinic boxes cut from the solvated peptide):

    tests/data/torchmdnet_<name>.ckpt
    tests/data/torchmdnet_reference.npz   keys <name>/<system>/{energy,forces}, systems/<system>/{z,pos,cell}

The torchmdx test then needs no TorchMD-NET: it imports each checkpoint and compares.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

#: small models; names are used in file names
CONFIGS = {
    # the ET as torchmd-train builds it (output_model Scalar -> EquivariantScalar head for the
    # ET), with an Atomref prior and standardisation; also evaluated on the periodic system
    "et_default": dict(
        embedding_dimension=32, num_layers=2, num_heads=4, num_rbf=16, rbf_type="expnorm",
        trainable_rbf=False, activation="silu", attn_activation="silu", neighbor_embedding=True,
        distance_influence="both", cutoff_lower=0.0, cutoff_upper=5.0, max_z=100,
        vector_cutoff=False, reduce_op="add", output_model="Scalar",
        prior_model={"Atomref": {"max_z": 100}}, standardize=True,
    ),
    # vector cutoff, no neighbor embedding, Gaussian trainable RBF, keys only, other
    # activations, a lower cutoff, mean reduction
    "et_vector_cutoff": dict(
        embedding_dimension=32, num_layers=3, num_heads=8, num_rbf=12, rbf_type="gauss",
        trainable_rbf=True, activation="ssp", attn_activation="tanh", neighbor_embedding=False,
        distance_influence="keys", cutoff_lower=0.7, cutoff_upper=4.5, max_z=60,
        vector_cutoff=True, reduce_op="mean", output_model="Scalar",
        prior_model=None, standardize=True,
    ),
    # a plain Scalar MLP head on the ET (TorchMD-NET's Scalar output module, attached directly:
    # torchmd-train always gives the ET the equivariant head), values only, trainable expnorm,
    # an Atomref that training disabled (remove_ref_energy): the import must leave it out
    "et_scalar_head": dict(
        embedding_dimension=64, num_layers=2, num_heads=8, num_rbf=20, rbf_type="expnorm",
        trainable_rbf=True, activation="silu", attn_activation="silu", neighbor_embedding=True,
        distance_influence="values", cutoff_lower=0.0, cutoff_upper=5.0, max_z=100,
        vector_cutoff=False, reduce_op="add", output_model="Scalar", plain_scalar_head=True,
        prior_model={"Atomref": {"max_z": 100, "enable": False}}, standardize=False,
    ),
    # no distance influence at all, sigmoid attention
    "et_no_distance": dict(
        embedding_dimension=32, num_layers=2, num_heads=2, num_rbf=8, rbf_type="expnorm",
        trainable_rbf=False, activation="tanh", attn_activation="sigmoid", neighbor_embedding=True,
        distance_influence="none", cutoff_lower=0.0, cutoff_upper=4.0, max_z=100,
        vector_cutoff=False, reduce_op="add", output_model="Scalar",
        prior_model={"Atomref": {"max_z": 90}}, standardize=False,
    ),
}

MOLECULES = ["alanine_dipeptide.xyz", "caffeine.xyz", "testosterone.xyz", "chignolin.xyz"]
PERIODIC = "alanine_dipeptide_solvated.xyz"
#: small periodic boxes cut from the solvated peptide (the atoms inside each cell, which is then
#: treated as periodic): TorchMD-NET's reduced-box convention a_y = a_z = b_z = 0
SUB_BOXES = {
    "solvated_box_ortho": [[12.0, 0.0, 0.0], [0.0, 12.5, 0.0], [0.0, 0.0, 13.0]],
    "solvated_box_triclinic": [[12.0, 0.0, 0.0], [2.5, 12.5, 0.0], [-1.5, 2.0, 13.0]],
}


def sub_box(atoms, cell):
    """The atoms of ``atoms`` whose positions lie inside ``cell`` (origin 10 Å into the box)."""
    from ase import Atoms

    cell = np.array(cell)
    pos = atoms.get_positions() - 10.0
    frac = pos @ np.linalg.inv(cell)
    inside = np.all((frac >= 0) & (frac < 1), axis=1)
    return Atoms(numbers=atoms.numbers[inside], positions=pos[inside], cell=cell, pbc=True)


def hyper_parameters(spec: dict, log_dir: str) -> argparse.Namespace:
    from torchmdnet.scripts.train import get_argparse

    args = get_argparse().parse_args(["--log-dir", log_dir])
    keys = {k: v for k, v in spec.items() if k not in ("standardize", "plain_scalar_head")}
    for key, value in keys.items():
        setattr(args, key, value)
    args.model = "equivariant-transformer"
    args.precision = 64
    args.derivative = True
    args.max_num_neighbors = 512  # never truncate the neighbor list of these molecules
    args.standardize = bool(spec["standardize"])
    args.inference_batch_size = args.batch_size
    return args


def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move every parameter away from its initial value (zero biases, unit LayerNorm weights)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "prior_model" in name:
                continue
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if name.endswith("betas") or name.endswith("coeff"):
                p.mul_(1 + 0.05 * noise.abs())
            elif name.endswith("means") or name.endswith("offset"):
                p.add_(0.01 * noise)
            else:
                p.add_(0.1 * noise)


def build(name: str, spec: dict, log_dir: str, seed: int):
    from torchmdnet.models.model import create_prior_models
    from torchmdnet.models import output_modules
    from torchmdnet.module import LNNP

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    args = hyper_parameters(spec, log_dir)
    priors = create_prior_models(vars(args)) if args.prior_model else None
    if priors:
        for prior in priors:
            table = torch.randn(prior.initial_atomref.shape, generator=generator, dtype=torch.float64) * 3.0
            prior.initial_atomref.copy_(table)
            prior.atomref.weight.data.copy_(table)
        args.prior_args = [p.get_init_args() for p in priors]
    mean = std = None
    if spec["standardize"]:
        mean = torch.tensor([-123.4 + float(torch.randn(1, generator=generator))], dtype=torch.float64)
        std = torch.tensor([0.5 + float(torch.rand(1, generator=generator))], dtype=torch.float64)
    lnnp = LNNP(args, prior_model=priors, mean=mean, std=std)
    if spec.get("plain_scalar_head"):
        head = output_modules.Scalar(args.embedding_dimension, activation=args.activation, reduce_op="sum", dtype=torch.float64)
        lnnp.model.output_model = head.to(torch.float64)
    lnnp.model.to(torch.float64)
    perturb(lnnp.model, generator)
    return lnnp


def save_checkpoint(lnnp, path: Path, log_dir: str) -> None:
    import lightning

    trainer = lightning.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=log_dir, enable_model_summary=False,
    )
    trainer.strategy.connect(lnnp)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    trainer.save_checkpoint(str(tmp))
    os.replace(tmp, path)


def predict(model, z, pos, box=None):
    model.eval()
    pos = pos.clone().requires_grad_(True)
    batch = torch.zeros_like(z)
    energy, forces = model(z, pos, batch, box=box)
    return energy.detach().reshape(-1).numpy(), forces.detach().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "tests" / "data"))
    opts = parser.parse_args()

    import ase.io
    import torchmdnet
    from torchmdnet.models.model import load_model

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    systems = {}
    for fname in MOLECULES:
        atoms = ase.io.read(Path(opts.shared_data) / "systems" / fname)
        systems[Path(fname).stem] = atoms
    solvated = ase.io.read(Path(opts.shared_data) / "systems" / PERIODIC)
    for key, cell in SUB_BOXES.items():
        systems[key] = sub_box(solvated, cell)
    arrays = {"torchmdnet_version": np.array(getattr(torchmdnet, "__version__", "3.0.0"))}
    for key, atoms in systems.items():
        arrays[f"systems/{key}/z"] = atoms.get_atomic_numbers().astype(np.int64)
        arrays[f"systems/{key}/pos"] = atoms.get_positions()
        arrays[f"systems/{key}/cell"] = atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3))

    with tempfile.TemporaryDirectory() as log_dir:
        for index, (name, spec) in enumerate(CONFIGS.items()):
            lnnp = build(name, spec, log_dir, seed=100 + index)
            ckpt_path = out / f"torchmdnet_{name}.ckpt"
            save_checkpoint(lnnp, ckpt_path, log_dir)
            model = lnnp.model
            if not spec.get("plain_scalar_head"):
                # the checkpoint must load back in TorchMD-NET to the same model
                reloaded = load_model(str(ckpt_path), derivative=True)
                for (k1, v1), (k2, v2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
                    assert k1 == k2 and torch.equal(v1.reshape(-1), v2.reshape(-1)), (k1, k2, v1, v2)
            periodic = name in ("et_default", "et_vector_cutoff")
            keys = list(systems) if periodic else [Path(m).stem for m in MOLECULES]
            for key in keys:
                atoms = systems[key]
                z = torch.tensor(atoms.get_atomic_numbers(), dtype=torch.long)
                pos = torch.tensor(atoms.get_positions(), dtype=torch.float64)
                box = torch.tensor(atoms.cell.array, dtype=torch.float64) if atoms.pbc.any() else None
                energy, forces = predict(model, z, pos, box)
                arrays[f"{name}/{key}/energy"] = energy
                arrays[f"{name}/{key}/forces"] = forces
                print(f"{name:18s} {key:28s} E = {energy[0]: .8f}  |F|max = {np.abs(forces).max():.4f}", flush=True)
    tmp = out / f".torchmdnet_reference.npz.tmp-{os.getpid()}.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out / "torchmdnet_reference.npz")
    total = sum(p.stat().st_size for p in out.glob("torchmdnet_*"))
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
