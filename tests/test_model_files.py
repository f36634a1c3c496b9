"""Model files, build_model / load_model, the kind registry and configs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml

import torchmdx
from torchmdx.errors import ConfigError, ModelError
from torchmdx.nn import ETPotential, ModelConfig, Potential, build_model, load_model, register_potential
from torchmdx.nn.model_file import FORMAT, POTENTIAL_KINDS




SMALL = dict(embedding_dimension=16, num_layers=2, num_heads=2, num_rbf=8)


def molecule():
    z = torch.tensor([8, 1, 1, 6, 1])
    pos = torch.tensor(
        [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0], [2.5, 1.0, 0.3], [3.2, 1.7, 0.2]], dtype=torch.float64
    )
    return z, pos


def test_defaults_are_torchmdnet_et_md17():
    """examples/ET-MD17.yaml of TorchMD-NET: 128 channels, 6 layers, 8 heads, 32 expnorm RBF
    (not trainable), cutoff 0-5 Å, silu/silu, neighbor embedding, distance influence both,
    max_z 100, scalar output, sum ('add'), float32."""
    config = ModelConfig()
    assert (config.embedding_dimension, config.num_layers, config.num_heads, config.num_rbf) == (128, 6, 8, 32)
    assert (config.rbf_type, config.trainable_rbf, config.activation, config.attn_activation) == ("expnorm", False, "silu", "silu")
    assert (config.cutoff_lower, config.cutoff_upper, config.max_z) == (0.0, 5.0, 100)
    assert config.neighbor_embedding and config.distance_influence == "both" and not config.vector_cutoff
    assert (config.reduce_op, config.dtype, config.output_model) == ("sum", "float32", "scalar")
    model = torchmdx.build_model()
    assert isinstance(model, ETPotential) and model.cutoff == 5.0
    assert model.representation.embedding.weight.shape == (100, 128) and len(model.representation.layers) == 6


def test_save_load_round_trip(tmp_path):
    model = build_model({**SMALL, "seed": 4, "output_model": "gated_equivariant", "vector_cutoff": True})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    model.set_normalisation(atomref={1: -13.6, 6: -1029.5, 8: -2042.6}, scale=1.7, shift=-0.2, energy_offset=3.0, elements=[1, 6, 8])
    path = tmp_path / "sub" / "model.pt"
    model.save(path)
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name != "model.pt"]  # no temp file
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["kind"] == "et" and payload["cutoff"] == 5.0
    assert payload["elements"] == [1, 6, 8] and payload["torchmdx_version"] == torchmdx.__version__
    assert payload["normalisation"]["atomref"] == {1: -13.6, 6: -1029.5, 8: -2042.6}
    assert payload["hparams"]["output_model"] == "gated_equivariant"

    loaded = torchmdx.load_model(path, device="cpu")
    assert not loaded.training and loaded.elements == [1, 6, 8] and loaded.normalisation() == model.normalisation()
    z, pos = molecule()
    z[3] = 6
    a = model(z, pos.float())
    b = loaded(z, pos.float())
    assert float(a["energy"].detach()) == float(b["energy"].detach())
    torch.testing.assert_close(a["forces"], b["forces"], rtol=0, atol=0)
    # a float32 model opened in float64
    wide = load_model(path, dtype="float64")
    assert wide.dtype == torch.float64 and wide.atomref.dtype == torch.float64
    assert float(wide(z, pos)["energy"].detach()) == pytest.approx(float(a["energy"].detach()), rel=1e-5)
    # and saved again: the file says float64
    wide.save(tmp_path / "wide.pt")
    assert load_model(tmp_path / "wide.pt").dtype == torch.float64


def test_build_model_from_yaml(tmp_path):
    section = tmp_path / "train.yaml"
    section.write_text(yaml.safe_dump({"model": {**SMALL, "cutoff_upper": 4.0}, "train": {"lr": 1e-3}}))
    bare = tmp_path / "model.yaml"
    bare.write_text(yaml.safe_dump({**SMALL, "rbf_type": "gauss"}))
    assert build_model(section).cutoff == 4.0
    assert build_model(bare).config.rbf_type == "gauss"
    assert build_model({"model": SMALL}).config.embedding_dimension == 16
    assert build_model(SMALL, num_layers=1).config.num_layers == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"embeding_dimension": 3}}))
    with pytest.raises(ConfigError, match="'model.embeding_dimension' does not exist \\(did you mean 'embedding_dimension'\\?\\)"):
        build_model(bad)
    with pytest.raises(ConfigError, match="model.cutoff_upper' must be float"):
        build_model({"cutoff_upper": "far"})
    with pytest.raises(ConfigError, match="not found"):
        build_model(tmp_path / "missing.yaml")


def test_same_seed_same_weights():
    a = build_model({**SMALL, "seed": 7})
    b = build_model({**SMALL, "seed": 7})
    c = build_model({**SMALL, "seed": 8})
    for (ka, va), (_, vb), (_, vc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(va, vb), ka
    assert not torch.equal(a.representation.embedding.weight, c.representation.embedding.weight)


class _Harmonic(Potential):
    """E = ½ k Σ_a |pos_a - centre|² (a test potential registered by the decorator)."""

    kind = "test_harmonic_trap"

    def __init__(self, k=1.0, centre=(0.0, 0.0, 0.0)):
        super().__init__()
        self.k = float(k)
        self.register_buffer("centre", torch.tensor(centre, dtype=torch.float64))
        self.cutoff = 1.0

    def hparams(self):
        return {"k": self.k, "centre": self.centre.tolist()}

    def atomic_energies(self, graph):
        return 0.5 * self.k * ((graph.pos - self.centre.to(graph.pos)) ** 2).sum(-1)


def test_registry_saves_and_loads_other_kinds(tmp_path):
    register_potential(_Harmonic)
    assert POTENTIAL_KINDS["test_harmonic_trap"] is _Harmonic
    trap = _Harmonic(k=2.0, centre=(1.0, 0.0, 0.0))
    trap.save(tmp_path / "trap.pt")
    loaded = load_model(tmp_path / "trap.pt")
    assert isinstance(loaded, _Harmonic) and loaded.hparams() == trap.hparams()
    z, pos = molecule()
    np.testing.assert_allclose(loaded(z, pos)["forces"].numpy(), -2.0 * (pos - torch.tensor([1.0, 0, 0], dtype=torch.float64)).numpy())
    assert isinstance(build_model({"kind": "test_harmonic_trap", "k": 3.0}), _Harmonic)
    # analytic potentials are found without registering them
    lj = build_model({"kind": "lennard_jones", "epsilon": 0.01, "sigma": 3.0})
    assert type(lj).__name__ == "LennardJones"


def test_model_file_errors(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        load_model(tmp_path / "nothing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="junk.pt: not a torchmdx model file"):
        load_model(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ModelError, match="no 'torchmdx-model' header"):
        load_model(other)
    model = build_model(SMALL)
    path = tmp_path / "m.pt"
    model.save(path)
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "kind": "mystery"}, tmp_path / "kind.pt")
    with pytest.raises(ModelError, match="unknown model kind 'mystery'; known kinds: .*et"):
        load_model(tmp_path / "kind.pt")
    torch.save({**payload, "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(ModelError, match="newer"):
        load_model(tmp_path / "future.pt")
    torch.save({**payload, "hparams": {**payload["hparams"], "embedding_dimension": 32}}, tmp_path / "shape.pt")
    with pytest.raises(ModelError, match="shape.pt: weights do not fit the 'et' model \\(size mismatch"):
        load_model(tmp_path / "shape.pt")
    with pytest.raises(ModelError, match="unknown model kind"):
        build_model({"kind": "nope"})


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    model = build_model(SMALL)
    path = tmp_path / "model.pt"

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError):
        model.save(path)
    assert os.listdir(tmp_path) == []


def test_set_normalisation_checks():
    model = build_model({**SMALL, "max_z": 10})
    with pytest.raises(ModelError, match="atomic number 12"):
        model.set_normalisation(atomref={12: 1.0})
    with pytest.raises(ModelError, match="elements: atomic number 11"):
        model.set_normalisation(elements=[1, 11])
    model.set_normalisation(atomref=[0.0, -0.5, 0.0, 0.0, 0.0, 0.0, -37.0])
    assert model.normalisation()["atomref"] == {1: -0.5, 6: -37.0}
