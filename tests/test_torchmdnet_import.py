"""Import of TorchMD-NET ET checkpoints: energies and forces equal TorchMD-NET 3.0.0's.

The checkpoints and TorchMD-NET's predictions (float64) were made by
``scripts/make_torchmdnet_reference.py`` in a separate environment with ``torchmd-net==3.0.0``;
this test needs no TorchMD-NET. Configurations: the default ET with its equivariant head, an
Atomref prior and standardisation (also on a periodic solvated peptide); vector cutoff + Gaussian
trainable RBF + keys-only distance influence + lower cutoff + mean reduction; a plain Scalar MLP
head with values-only influence and a disabled Atomref; no distance influence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import torchmdx
from torchmdx.errors import ModelError
from torchmdx.nn import ETPotential, import_torchmdnet




DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "torchmdnet_reference.npz"
CONFIGS = ["et_default", "et_vector_cutoff", "et_scalar_head", "et_no_distance"]


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(REFERENCE))


def systems_of(reference, name):
    return sorted({k.split("/")[1] for k in reference if k.startswith(f"{name}/")})


def inputs(reference, key):
    z = torch.tensor(reference[f"systems/{key}/z"])
    pos = torch.tensor(reference[f"systems/{key}/pos"])
    cell = reference[f"systems/{key}/cell"]
    if np.any(cell):
        return z, pos, torch.tensor(cell), torch.tensor([True, True, True])
    return z, pos, None, None


@pytest.mark.parametrize("name", CONFIGS)
def test_energies_and_forces_equal_torchmdnet(reference, name):
    potential = import_torchmdnet(DATA / f"torchmdnet_{name}.ckpt")
    assert isinstance(potential, ETPotential) and potential.dtype == torch.float64
    keys = systems_of(reference, name)
    assert len(keys) >= 4
    for key in keys:
        z, pos, cell, pbc = inputs(reference, key)
        out = potential(z, pos, cell=cell, pbc=pbc)
        energy = float(out["energy"].detach())
        want_e = float(reference[f"{name}/{key}/energy"][0])
        want_f = reference[f"{name}/{key}/forces"]
        assert energy == pytest.approx(want_e, rel=1e-5), key
        np.testing.assert_allclose(out["forces"].numpy(), want_f, rtol=0, atol=1e-5 * np.abs(want_f).max(), err_msg=key)


def test_imported_models_batch_and_round_trip(reference, tmp_path):
    """All molecules at once in one batch, and after save / load_model, still agree."""
    potential = import_torchmdnet(DATA / "torchmdnet_et_default.ckpt")
    path = tmp_path / "imported.pt"
    potential.save(path)
    loaded = torchmdx.load_model(path)
    keys = [k for k in systems_of(reference, "et_default") if not np.any(reference[f"systems/{k}/cell"])]
    zs, poss, batch = [], [], []
    for b, key in enumerate(keys):
        z, pos, _, _ = inputs(reference, key)
        zs.append(z)
        poss.append(pos)
        batch.append(torch.full((len(z),), b))
    out = loaded(torch.cat(zs), torch.cat(poss), torch.cat(batch))
    forces = out["forces"].numpy()
    start = 0
    for b, key in enumerate(keys):
        n = len(zs[b])
        assert float(out["energy"][b].detach()) == pytest.approx(float(reference[f"et_default/{key}/energy"][0]), rel=1e-10)
        np.testing.assert_allclose(forces[start:start + n], reference[f"et_default/{key}/forces"], atol=1e-9)
        start += n


def test_normalisation_mapping():
    """Atomref table, std -> scale, mean -> energy_offset; disabled Atomref left out unless asked."""
    default = import_torchmdnet(DATA / "torchmdnet_et_default.ckpt")
    norm = default.normalisation()
    assert norm["scale"] != 1.0 and norm["energy_offset"] < -100 and len(norm["atomref"]) > 50
    ckpt = torch.load(DATA / "torchmdnet_et_default.ckpt", map_location="cpu", weights_only=False)
    table = ckpt["state_dict"]["model.prior_model.0.atomref.weight"].flatten()
    torch.testing.assert_close(default.atomref, table.double())
    assert norm["scale"] == pytest.approx(float(ckpt["state_dict"]["model.std"].flatten()[0]))

    scalar_head = import_torchmdnet(DATA / "torchmdnet_et_scalar_head.ckpt")
    assert scalar_head.config.output_model == "scalar" and scalar_head.normalisation()["atomref"] == {}
    enabled = import_torchmdnet(DATA / "torchmdnet_et_scalar_head.ckpt", enable_atomref=True)
    z = torch.tensor([6, 1, 1, 1, 1])
    pos = torch.tensor([[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]], dtype=torch.float64)
    diff = float(enabled(z, pos, forces=False)["energy"].detach() - scalar_head(z, pos, forces=False)["energy"].detach())
    assert diff == pytest.approx(float(enabled.atomref[6] + 4 * enabled.atomref[1]), rel=1e-10)


def test_energy_unit_conversion():
    kcal = import_torchmdnet(DATA / "torchmdnet_et_no_distance.ckpt", energy_unit="kcal/mol")
    ev = import_torchmdnet(DATA / "torchmdnet_et_no_distance.ckpt")
    z = torch.tensor([8, 1, 1])
    pos = torch.tensor([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], dtype=torch.float64)
    ratio = float(kcal(z, pos, forces=False)["energy"].detach()) / float(ev(z, pos, forces=False)["energy"].detach())
    assert ratio == pytest.approx(0.04336410390059322, rel=1e-12)


def test_load_model_recognises_a_torchmdnet_checkpoint(reference):
    potential = torchmdx.load_model(DATA / "torchmdnet_et_no_distance.ckpt", dtype="float32")
    assert potential.dtype == torch.float32
    z, pos, _, _ = inputs(reference, "caffeine")
    energy = float(potential(z, pos.float(), forces=False)["energy"].detach())
    assert energy == pytest.approx(float(reference["et_no_distance/caffeine/energy"][0]), rel=1e-5)


def test_import_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        import_torchmdnet(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="bad.ckpt"):
        import_torchmdnet(bad)
    ckpt = torch.load(DATA / "torchmdnet_et_default.ckpt", map_location="cpu", weights_only=False)
    hp = dict(ckpt["hyper_parameters"])
    for change, message in [
        ({"model": "tensornet"}, "only TorchMD-NET's equivariant-transformer"),
        ({"output_model": "DipoleMoment"}, "not an energy head"),
        ({"prior_model": [{"ZBL": {}}], "prior_args": [{}]}, "prior model 'ZBL' is not supported"),
    ]:
        path = tmp_path / "changed.ckpt"
        torch.save({"hyper_parameters": {**hp, **change}, "state_dict": ckpt["state_dict"]}, path)
        with pytest.raises(ModelError, match=message):
            import_torchmdnet(path)
    path = tmp_path / "wrong_shape.ckpt"
    torch.save({"hyper_parameters": {**hp, "embedding_dimension": 48, "num_heads": 4}, "state_dict": ckpt["state_dict"]}, path)
    with pytest.raises(ModelError, match="shape"):
        import_torchmdnet(path)


def test_reference_files_are_small():
    total = sum(p.stat().st_size for p in DATA.glob("torchmdnet_*"))
    assert total < 3_000_000
