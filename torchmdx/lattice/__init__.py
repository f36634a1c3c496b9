"""Self-learning Monte Carlo (SLMC) for a lattice spin-fermion model with equivariant-attention
effective models (Nagai & Tomiya, "Self-learning Monte Carlo with equivariant Transformer",
J. Phys. Soc. Jpn. 93, 114007 (2024); "Equivariant Transformer is all you need", Lattice 2023).

A second application of torchmdx next to the molecular layers (which never import it)::

    geometry.py     the periodic L x L square lattice: shells, displacements, momenta
    fermions.py     the double-exchange model; exact weight exp(-Ω(S)/T) by diagonalisation
    effective.py    linear effective model and the equivariant transformer; model files
    sampler.py      local Metropolis and the SLMC step (batched chains, one torch.Generator)
    training.py     least squares and AdamW fits of the effective models
    observables.py  S(q), magnetisations, integrated autocorrelation times
    config.py       the typed ``torchmdx slmc`` config
    run.py          the whole run: data, fits, SLMC, checkpoints/resume, CSV, summary
    plots.py        acceptance vs layers, S(q)

See docs/lattice.md.
"""

from torchmdx.lattice.effective import (EquivariantTransformer, LinearEffectiveModel, load_effective,
                                        save_effective)
from torchmdx.lattice.fermions import DoubleExchangeModel, random_spins
from torchmdx.lattice.geometry import SquareLattice
from torchmdx.lattice.sampler import ChainState, LocalProposal, local_metropolis, slmc_step

__all__ = ["ChainState", "DoubleExchangeModel", "EquivariantTransformer", "LinearEffectiveModel", "LocalProposal",
           "SquareLattice", "load_effective", "local_metropolis", "random_spins", "save_effective", "slmc_step"]
