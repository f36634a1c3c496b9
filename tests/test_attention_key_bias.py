"""GATr's and the transformer's attention have no key bias and their score biases no constant
(softmax ignores both: :mod:`torchmdx.nn.graph_attention`); files written with them still load,
with the same energies and forces (float64), and an old training checkpoint's optimiser state
converts alike."""

import copy

import pytest
import torch
from torch import nn

import torchmdx
from torchmdx.nn.gatr.layers import EquiLinear
from torchmdx.nn.graph_attention import Upgradable
from torchmdx.nn.model_file import FORMAT, FORMAT_VERSION, load_model
from torchmdx.train.module import upgrade_optimizer_states

from test_train_graph import molecules
from test_train_graph_architectures import SMALL

QKV_BIASES = ("qkv.bias", "qkv.mv_bias", "qkv.scalar.bias")


def old_layout(model, seed=0):
    """The model's state dict as the code before this change wrote it: every q, k, v bias with a
    (non-zero, random) key third, every score-bias MLP with an output bias [heads]."""
    g = torch.Generator().manual_seed(seed)
    old = {}
    for name, value in model.state_dict().items():
        if name.endswith(QKV_BIASES):
            n = value.shape[0] // 2
            value = value + torch.randn(value.shape, generator=g, dtype=value.dtype)  # q, v biases non-zero
            value = torch.cat([value[:n], torch.randn(n, generator=g, dtype=value.dtype), value[n:]])
        old[name] = value
        if name.endswith(("bias.mlp.2.weight", "radial.mlp.2.weight")):
            old[name[:-len("weight")] + "bias"] = torch.randn(value.shape[0], generator=g, dtype=value.dtype)
    return old


def old_model(model):
    """A copy of ``model`` with the modules of the old code (nn.Linear and EquiLinear with full
    biases, score-bias MLPs with an output bias): the old computation, independent of the
    conversion on load."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        parent = ref.get_submodule(name.rsplit(".", 1)[0]) if "." in name else ref
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "qkv" and isinstance(module, EquiLinear):
            C, S = module.out_mv // 3, module.mv_to_s.shape[0] // 3
            setattr(parent, leaf, EquiLinear(module.buffers_[0], C, 3 * C, S, 3 * S))
        elif leaf == "qkv":
            setattr(parent, leaf, nn.Linear(module.weight.shape[1], module.weight.shape[0]))
        elif leaf == "mlp" and name.endswith(("bias.mlp", "radial.mlp")):
            module[2] = nn.Linear(module[2].in_features, module[2].out_features)
    for module in ref.modules():
        if isinstance(module, Upgradable):  # the score biases: they would drop the old output bias
            module.upgrade_state = lambda state_dict, prefix: None
    return ref.to(torch.float64)


def energies_forces(model):
    z, pos, batch, _, _ = molecules([6, 9, 5], seed=3, box=6.0)
    out = model(z, pos, batch, num_structures=3)
    return out["energy"].detach(), out["forces"].detach()


@pytest.mark.parametrize("architecture", ["gatr", "transformer"])
def test_an_old_state_dict_loads_with_the_old_energies_and_forces(architecture, tmp_path):
    model = torchmdx.build_model({**SMALL[architecture], "dtype": "float64"})
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("mlp.2.bias") and ("radial" in n or ".bias.mlp" in n) for n in names)
    old = old_layout(model)
    reference = old_model(model)
    reference.load_state_dict(old)  # strict: the old layout, as the old code had it
    energy_ref, forces_ref = energies_forces(reference)

    # the dropped entries do not matter: zeroing them gives the same result, bit for bit
    zeroed = {k: v.clone() for k, v in old.items()}
    for name, value in zeroed.items():
        if name.endswith(QKV_BIASES):
            n = value.shape[0] // 3
            value[n:2 * n] = 0
        elif name.endswith("mlp.2.bias"):
            value.zero_()
    reference.load_state_dict(zeroed)
    energy_zero, forces_zero = energies_forces(reference)
    torch.testing.assert_close(energy_zero, energy_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(forces_zero, forces_ref, rtol=1e-10, atol=1e-12)

    fresh = torchmdx.build_model({**SMALL[architecture], "dtype": "float64", "seed": 5})
    assert not torch.equal(energies_forces(fresh)[0], energy_ref)
    fresh.load_state_dict(old)  # strict, converted on load
    energy, forces = energies_forces(fresh)
    assert torch.equal(energy, energy_zero) and torch.equal(forces, forces_zero)  # the same computation
    torch.testing.assert_close(energy, energy_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(forces, forces_ref, rtol=1e-10, atol=1e-12)

    # a model file written by the old code
    path = tmp_path / "old.pt"
    model.save(path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["format_version"] == FORMAT_VERSION
    payload["state_dict"] = old
    torch.save(payload, path)
    loaded = load_model(path, dtype="float64")
    energy, forces = energies_forces(loaded)
    torch.testing.assert_close(energy, energy_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(forces, forces_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("architecture", ["gatr", "transformer"])
def test_an_old_checkpoints_optimiser_state_converts(architecture):
    """AdamW state of the old layout (moments of the full q, k, v biases and of the score-bias
    constants, by parameter index) -> the new parameters' moments, which then load and step."""
    model = torchmdx.build_model({**SMALL[architecture], "dtype": "float64"})
    old = old_layout(model)
    reference = old_model(model)
    reference.load_state_dict(old)
    old_names = [n for n, _ in reference.named_parameters()]
    assert len(old_names) > len(list(model.parameters()))
    g = torch.Generator().manual_seed(1)
    moments = {n: (torch.randn(p.shape, generator=g, dtype=p.dtype), torch.rand(p.shape, generator=g, dtype=p.dtype))
               for n, p in reference.named_parameters()}
    checkpoint = {
        "state_dict": {"model." + k: v for k, v in old.items()},
        "optimizer_states": [{
            "state": {i: {"step": torch.tensor(7.0), "exp_avg": moments[n][0], "exp_avg_sq": moments[n][1]}
                      for i, n in enumerate(old_names)},
            "param_groups": torch.optim.AdamW(reference.parameters(), lr=1e-3).state_dict()["param_groups"],
        }],
    }
    upgrade_optimizer_states(checkpoint, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        exp_avg, exp_avg_sq = moments[name]
        if name.endswith(QKV_BIASES):
            n = p.shape[0] // 2  # the old key third, [n, 2n), is gone
            exp_avg, exp_avg_sq = torch.cat([exp_avg[:n], exp_avg[2 * n:]]), torch.cat([exp_avg_sq[:n], exp_avg_sq[2 * n:]])
        assert torch.equal(state["exp_avg"], exp_avg) and torch.equal(state["exp_avg_sq"], exp_avg_sq), name
        assert float(state["step"]) == 7.0
    model.load_state_dict(old)
    z, pos, batch, _, _ = molecules([6, 9, 5], seed=3, box=6.0)
    out = model(z, pos, batch, num_structures=3, create_graph=True)
    (out["energy"].sum() + (out["forces"] ** 2).sum()).backward()
    optimizer.step()  # the shapes fit

    # a checkpoint of the new layout is left alone
    new = {"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
           "optimizer_states": [optimizer.state_dict()]}
    before = copy.deepcopy(new)
    upgrade_optimizer_states(new, model)
    assert new["optimizer_states"][0]["param_groups"] == before["optimizer_states"][0]["param_groups"]
    assert all(torch.equal(new["optimizer_states"][0]["state"][i]["exp_avg"], s["exp_avg"])
               for i, s in before["optimizer_states"][0]["state"].items())


@pytest.mark.parametrize("architecture", ["gatr", "transformer"])
def test_resume_check_accepts_an_old_checkpoint_that_converts(architecture, tmp_path):
    """``train --resume``'s weight check (names and shapes against the model) compares after the
    conversion on load: a checkpoint written before the key biases went still resumes, and a
    really foreign one is still refused."""
    from torchmdx.errors import ConfigError
    from torchmdx.train.run import _check_checkpoint_fits

    module = nn.Module()
    module.model = torchmdx.build_model({**SMALL[architecture], "dtype": "float64"})
    old = {"model." + k: v for k, v in old_layout(module.model).items()}
    assert set(old) != set(module.state_dict())  # the old names and shapes differ
    torch.save({"state_dict": old}, tmp_path / "old.ckpt")
    _check_checkpoint_fits(tmp_path / "old.ckpt", module)
    module.load_state_dict(dict(old))  # and it does load
    foreign = dict(old)
    foreign["model.unknown.weight"] = torch.zeros(3)
    torch.save({"state_dict": foreign}, tmp_path / "foreign.ckpt")
    with pytest.raises(ConfigError, match=r"unexpected \['model.unknown.weight'\]"):
        _check_checkpoint_fits(tmp_path / "foreign.ckpt", module)
