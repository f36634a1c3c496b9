"""Compiled inference (``ETPotential.set_compiled``) equals the eager model.

The dense parts of the ET run through torch.compile (inductor; on the CPU it generates C++);
energies, per-atom energies, forces and stress must equal the eager float64 model.
"""

import pytest
import torch

import torchmdx
from torchmdx.nn import et

SMALL_ET = {"embedding_dimension": 16, "num_layers": 2, "num_heads": 2, "num_rbf": 8, "vector_cutoff": True,
            "cutoff_upper": 4.0, "dtype": "float64", "seed": 5, "output_model": "gated_equivariant"}


def _inputs():
    generator = torch.Generator().manual_seed(0)
    z = torch.tensor([6, 1, 1, 8, 1, 7, 6, 1, 1])
    pos = torch.rand(9, 3, generator=generator, dtype=torch.float64) * 4.0
    batch = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    cell = torch.eye(3, dtype=torch.float64).expand(2, 3, 3) * 9.0
    pbc = torch.tensor([[True, True, True], [False, False, False]])
    return z, pos, batch, cell, pbc


def test_compiled_inference_equals_eager():
    eager = torchmdx.build_model(SMALL_ET)
    compiled = torchmdx.build_model(SMALL_ET)
    assert compiled.set_compiled(True) and all(not p.requires_grad for p in compiled.parameters())
    z, pos, batch, cell, pbc = _inputs()
    for shift in (0.0, 0.05):  # a second call reuses the compiled graphs
        moved = pos + shift
        ref = eager(z, moved, batch, cell, pbc, stress=True, per_atom=True)
        out = compiled(z, moved, batch, cell, pbc, stress=True, per_atom=True)
        for key in ("energy", "energies", "forces", "stress"):
            torch.testing.assert_close(out[key], ref[key], rtol=1e-10, atol=1e-10, msg=key)
    # other sizes (a calculator walking through a data set) and more shapes than dynamo's
    # recompile limit (8) still give the eager numbers
    for n in (3, 5, 7, 11, 13, 17, 19, 23, 29, 31):
        z_n = torch.randint(1, 9, (n,), generator=torch.Generator().manual_seed(n))
        pos_n = torch.rand(n, 3, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 3.0
        torch.testing.assert_close(compiled(z_n, pos_n)["forces"], eager(z_n, pos_n)["forces"], rtol=1e-10, atol=1e-10)
    # the compiled pieces really ran: prepare/update/embed and the head
    names = {getattr(fn, "__qualname__", "") for fn, _ in et._COMPILED}
    assert {"EquivariantAttention.prepare", "EquivariantAttention.update", "ETRepresentation.embed",
            "GatedEquivariantHead.forward"} <= names


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_fused_model_on_cuda_matches_float64_reference(shared_data):
    """ET-MD17 size, float32 on CUDA with the fused Triton message kernels and the compiled dense
    parts, against the eager float64 torch-reference model (same weights)."""
    from ase.io import read

    config = dict(SMALL_ET, embedding_dimension=128, num_layers=6, num_heads=8, num_rbf=32, cutoff_upper=5.0)
    atoms = read(shared_data / "systems" / "chignolin.xyz")
    z = torch.tensor(atoms.numbers, device="cuda")
    pos = torch.tensor(atoms.positions, device="cuda")
    reference = torchmdx.build_model(dict(config, backend="torch")).cuda()
    fast = torchmdx.build_model(dict(config, dtype="float32")).cuda()
    fast.load_state_dict(reference.state_dict())  # copied into float32 (normalisation stays float64)
    fast.set_compiled(True)
    ref = reference(z, pos)
    out = fast(z, pos.float())
    force_scale = ref["forces"].abs().max()
    assert float((out["forces"].double() - ref["forces"]).abs().max() / force_scale) < 1e-4
    assert abs(float(out["energy"] - ref["energy"])) < 1e-4 * max(1.0, abs(float(ref["energy"])))


def test_set_compiled_freezes_and_gives_back_requires_grad():
    model = torchmdx.build_model(SMALL_ET)
    kept_frozen = model.representation.embedding.weight
    kept_frozen.requires_grad_(False)  # frozen by the user: stays frozen
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert model.set_compiled(True) and not any(p.requires_grad for p in model.parameters())
    assert model.set_compiled(True)  # twice: still remembers the first state
    assert not model.set_compiled(False)
    assert [p for p in model.parameters() if p.requires_grad] == trainable and not kept_frozen.requires_grad

