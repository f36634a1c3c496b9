"""GATr's two ways from the points' e0 components to its invariants (the distance-aware score and
the join) work at their intended scale (float64, independent references), and files of the first
formulation load with its function.

- distance-aware attention: the score term of query and key channels that hold points with any
  homogeneous weights λ (λ P(x) is the same point) is the squared distance of the points,
  -Σ_c ω(λ_q) ω(λ_k) |x_q - x_k|² with GATr's normaliser ω(λ) = λ²/(λ² + 1e-3), computed here
  from the positions; the first formulation gave -Σ_c λ_q² λ_k² |x_q - x_k|² (~1e-4 of the
  scores at initialisation, where the learned λ are ~0.1-0.3);
- the join's factor is the input point's e123 coefficient, +1 (and -1 in the sign-averaged
  copy), as GATr's reference from the data; the first formulation used the block input's mean
  e0123 coefficient (~0.1 at initialisation);
- both are config keys (``distance_normalised``, ``join_reference: input``) whose defaults are
  the first formulation: a config or model file without them computes what it computed before;
  with both on, the layers stay equivariant and the energy invariant (test_gatr's checks).
"""

import numpy as np
import pytest
import torch
from ase.build import molecule

import torchmdx
from torchmdx.errors import ConfigError
from torchmdx.nn.gatr import layers as gatr_layers
from torchmdx.nn.gatr.algebra import algebra, embed_points
from torchmdx.nn.model_file import load_model

F64 = torch.float64
FIRST = {"architecture": "gatr", "algebra": "projective", "channels": 4, "scalar_channels": 8, "num_layers": 2,
         "num_heads": 2, "cutoff_upper": 4.0, "dtype": "float64", "seed": 1}
SMALL = {**FIRST, "distance_normalised": True, "join_reference": "input"}


def ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.1, seed=4)
    return torch.tensor(atoms.numbers), torch.tensor(atoms.positions, dtype=F64)


def test_distance_term_is_the_squared_distance_of_the_points_whatever_their_weights():
    model = torchmdx.build_model(SMALL)
    att = model.representation.blocks[0].attention
    C, H = att.C, att.H
    rng = np.random.default_rng(0)
    n = 3
    x = rng.normal(scale=1.5, size=(n, 2, C, 3))  # query and key points per atom and channel
    lam = rng.uniform(0.2, 3.0, size=(n, 2, C, 1)) * rng.choice([-1.0, 1.0], size=(n, 2, C, 1))
    mv = lam * embed_points("projective", torch.tensor(x)).numpy()
    # other grades and the e0 parts of other blades must not matter: noise in every non-trivector blade
    ga = algebra("projective")
    mv = mv + np.where(ga.grades == 3, 0.0, 1.0) * rng.normal(size=mv.shape)
    phi, psi = att._point_features(torch.tensor(mv.reshape(n, 2 * C, ga.dim)))
    got = torch.einsum("ihf,jhf->ijh", phi, psi).numpy()  # [query atom, key atom, head]

    omega = (lam ** 2 / (lam ** 2 + 1e-3))[..., 0]  # [n, 2, C]
    expected = np.zeros((n, n, H))
    for i in range(n):
        for j in range(n):
            for c in range(C):
                d2 = np.sum((x[i, 0, c] - x[j, 1, c]) ** 2)
                expected[i, j, c // (C // H)] -= (omega[i, 0, c] * omega[j, 1, c]) ** 2 * d2
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    assert np.abs(expected).min() > 0.1


def test_join_factor_is_the_input_points_e123_coefficient():
    model = torchmdx.build_model(SMALL)
    ga = algebra("projective")
    e123 = next(i for i in range(ga.dim) if ga.blade_name(i) == "e123")
    z, pos = ethanol()
    expected_w = embed_points("projective", pos - pos.mean(0))[:, e123]
    assert torch.allclose(expected_w.abs(), torch.ones_like(expected_w))  # |w| = 1 for every input point
    seen = []
    forward = gatr_layers.Bilinear.forward

    def spy(self, mv, reference):
        seen.append(reference.detach().clone())
        return forward(self, mv, reference)

    gatr_layers.Bilinear.forward = spy
    try:
        model(z, pos)
    finally:
        gatr_layers.Bilinear.forward = forward
    assert len(seen) == SMALL["num_layers"]
    for reference in seen:  # the points, then their sign-averaged copy -P
        torch.testing.assert_close(reference, torch.cat([expected_w, -expected_w]), rtol=0, atol=0)


def test_join_reference_input_is_projective_only():
    with pytest.raises(ConfigError, match="join_reference") as info:
        torchmdx.build_model({**SMALL, "algebra": "conformal", "join": True, "join_reference": "input"})
    assert "\n" not in str(info.value)


def test_without_the_keys_a_model_and_its_file_compute_the_first_formulation(tmp_path):
    z, pos = ethanol()
    first = torchmdx.build_model(FIRST)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # away from the initialisation, so every term counts
        for p in first.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    first.set_normalisation(atomref={1: -13.6, 6: -1029.0, 8: -2040.0}, scale=0.7, shift=0.05)
    reference = first(z, pos)
    explicit = torchmdx.build_model({**FIRST, "distance_normalised": False, "join_reference": "block"})
    explicit.load_state_dict(first.state_dict())
    assert torch.equal(explicit(z, pos)["energy"], reference["energy"])
    for key, value in (("distance_normalised", True), ("join_reference", "input")):  # each changes the function
        other = torchmdx.build_model({**FIRST, key: value})
        other.load_state_dict(first.state_dict())
        assert (other(z, pos)["energy"] - reference["energy"]).abs().max() > 1e-3, key

    path = tmp_path / "first.pt"
    first.save(path)  # as a file written before the keys existed: its hyper-parameters without them
    payload = torch.load(path, weights_only=True)
    for key in ("distance_normalised", "join_reference"):
        payload["hparams"].pop(key)
    torch.save(payload, path)
    out = load_model(path, dtype="float64")(z, pos)
    torch.testing.assert_close(out["energy"], reference["energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out["forces"], reference["forces"], rtol=0, atol=1e-10)


def test_with_both_keys_layers_stay_equivariant_and_the_energy_invariant(monkeypatch):
    """test_gatr's equivariance checks (random versors on random multivectors, the blocks with the
    fallback reference of :meth:`features`; energies under rotation, reflection, translation,
    permutation) on the projective model with both keys."""
    import test_gatr

    monkeypatch.setattr(test_gatr, "TINY", {**test_gatr.TINY, "distance_normalised": True, "join_reference": "input"})
    test_gatr.test_layers_and_blocks_are_equivariant_on_random_multivectors("projective")
    test_gatr.test_energy_invariant_under_rotation_reflection_translation_permutation("projective")
