"""The ``torchmdx slmc`` config: one YAML file with the sections ``lattice:``, ``data:``,
``effective:``, ``slmc:`` and the keys ``seed``, ``run_dir``, ``checkpoint_every``.

Each section is a dataclass built with :func:`torchmdx.config.from_dict`: an unknown key, a
wrong type or a bad value is a one-line :class:`~torchmdx.errors.ConfigError` naming the key,
raised before anything runs::

    lattice:               # the spin-fermion model (energies in units of t)
      L: 4                 # L x L periodic square lattice (even, >= 4)
      t: 1.0
      J: 8.0
      temperature: 0.05    # k_B T in units of t (> 0)
      mu: null             # chemical potential; null: from `filling`
      filling: 0.25        # electrons per site / 2 (0.5 = half filling), used when mu is null
                           # (default 0.25); giving both mu and filling is an error
    data:                  # exact local-update Monte Carlo: the training configurations
      chains: 16
      thermalize_sweeps: 50
      sweeps: 150
    effective:             # the linear baseline and transformers with these depths
      layers: [1, 2, 4]
    slmc:
      chains: 16
      steps: 200
    seed: 0
    run_dir: runs/slmc

``torchmdx slmc config.yaml --set slmc.steps=50`` overrides single keys (values parsed as YAML).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

from torchmdx.config import apply_overrides, bad_key, from_dict, load_yaml, to_dict
from torchmdx.devices import check_threads, memory_bytes  # memory_bytes: tests patch it here
from torchmdx.errors import ConfigError


#: electrons per site / 2 when neither ``mu`` nor ``filling`` is given (the lower, spin-aligned band half filled)
DEFAULT_FILLING = 0.25
#: seconds per diagonalisation of an M x M complex Hermitian matrix, per M³ (torch.linalg.eigvalsh,
#: complex128, one CPU core: 2.3-2.9e-10 for M = 256-512 on 2026-12-05; small M cost more per M³, so
#: estimates made with it are lower bounds)
EIGH_SECONDS_PER_M3 = 2.5e-10
#: a study whose exact diagonalisations are estimated to take longer than this (s) gets a warning
WARN_SECONDS = 3600.0
#: seconds per single-site update under an effective model, all chains at once (the linear model,
#: 16 chains, L = 4, one CPU core: 2.4e-4 on 2026-12-06; transformers 6e-4 to 1.7e-3): a lower bound
LOCAL_UPDATE_SECONDS = 1e-4
#: largest |t|, |J|, |mu| or temperature: the diagonalisation squares entries (float64 to 1.8e308)
MAX_SCALE = 1e100
#: largest float64 rounding of Ω in units of kT (Ω / T is the Boltzmann exponent)
MAX_BOLTZMANN_ROUNDING = 1e-3


@dataclass
class LatticeConfig:
    """The model H = -t Σ_<ij>σ (c†c + h.c.) + (J/2) Σ_i S_i · (c†_i σ c_i) on an L x L periodic
    lattice at temperature T, grand canonical at chemical potential μ (or the μ of a filling)."""

    L: int = 4
    t: float = 1.0
    J: float = 8.0
    temperature: float = 0.05
    mu: Optional[float] = None
    filling: Optional[float] = None  # DEFAULT_FILLING when mu is null too
    filling_samples: int = 64  # random spin configurations whose mean density fixes μ

    @property
    def resolved_filling(self) -> float:
        """The filling that fixes μ when ``mu`` is null: ``filling``, else :data:`DEFAULT_FILLING`."""
        return DEFAULT_FILLING if self.filling is None else float(self.filling)

    def validate(self, section: str = "lattice") -> None:
        bad = partial(bad_key, section)
        if self.L < 4 or self.L % 2:
            bad("L", f"must be an even integer >= 4 (periodic bonds double up on L = 2; the S(q) path "
                     f"through X = (π, 0) and M = (π, π) needs even L), got {self.L}")
        if not self.temperature > 0:
            bad("temperature", f"must be > 0, got {self.temperature}")
        if not self.t > 0:
            bad("t", f"must be > 0, got {self.t}")
        if self.mu is not None and self.filling is not None:
            bad("filling", f"is used only when lattice.mu is null, but mu is {self.mu}: set one of mu and filling")
        if self.mu is None and not 0.0 < self.resolved_filling < 1.0:
            bad("filling", f"must be in (0, 1) (electrons per site / 2), got {self.filling}")
        if self.filling_samples < 1:
            bad("filling_samples", f"must be >= 1, got {self.filling_samples}")
        self._check_float64_scales(bad)

    def _check_float64_scales(self, bad) -> None:
        """Energy scales float64 can carry (round 11 left: J, mu or T of 1e300 ran to exit 0 with
        inf/nan columns). The diagonalisation squares matrix entries and Ω sums 2N terms, so each
        scale is at most :data:`MAX_SCALE`; and Ω, of magnitude about 2N · max(4t + |J|/2, |μ|, T),
        is resolved in float64 only to 2.2e-16 of that: see :meth:`check_boltzmann_rounding`."""
        scales = {"t": self.t, "J": self.J, "temperature": self.temperature}
        if self.mu is not None:
            scales["mu"] = self.mu
        for key, value in scales.items():
            if abs(value) > MAX_SCALE:
                bad(key, f"is {value:g}: energies (in units of your choice) beyond {MAX_SCALE:g} overflow float64 in the "
                         "diagonalisation; use t = 1 and give J, mu and temperature in units of t")

    def check_boltzmann_rounding(self, bad) -> None:
        """Ω, of magnitude about 2N · max(4t + |J|/2, |μ|, T), is resolved in float64 to 2.2e-16
        of that: divided by T (the Boltzmann exponent) this rounding must stay below
        :data:`MAX_BOLTZMANN_ROUNDING`, or Metropolis decisions follow rounding noise (μ = 1e20
        gave β·rmse 6.8e7 for an Ω that does not depend on the spins). Called by
        :meth:`SLMCRunConfig.validate` after the size checks (an L too large for memory is named
        as that)."""
        scales = {"t": self.t, "J": self.J, "mu": self.mu}
        terms = {"t": 4.0 * self.t, "J": 0.5 * abs(self.J), "mu": abs(self.mu or 0.0)}
        larger = max(terms, key=terms.get)
        magnitude = 2 * self.L * self.L * max(terms[larger], self.temperature)
        rounding = magnitude * 2.0 ** -52 / self.temperature
        if not rounding <= MAX_BOLTZMANN_ROUNDING:
            bad("temperature", f"is {self.temperature:g} but Ω of this lattice (about {magnitude:.3g}: 2L² x the largest "
                               f"energy scale, here from {larger} = {scales[larger]:g}) is resolved in float64 only to "
                               f"{rounding:.2g} kT: Metropolis decisions would follow rounding noise; raise the "
                               f"temperature or lower |{larger}| (the ratio of the two is what matters)")


@dataclass
class DataConfig:
    """Exact local-update Metropolis (one diagonalisation per update): configurations and
    exact energies to train the effective models on, and the reference observables.
    ``sweeps`` recorded sweeps per chain (one sweep = N single-site updates), one configuration
    per chain every ``every`` sweeps, after ``thermalize_sweeps``. ``step``: width of the local
    proposal (old spin + step * Gaussian, renormalised); null: uniform on the sphere.
    ``previous_runs``: run folders of earlier SLMC runs of the same model whose chains'
    configurations (``configurations_<model>.pt``, with exact Ω) join the training data;
    ``previous_proposals``: their SLMC proposals too, accepted or not (``proposals_<model>.pt``
    where a folder has them: the configurations the effective models proposed, where their
    errors cost acceptance)."""

    chains: int = 16
    thermalize_sweeps: int = 50
    sweeps: int = 150
    every: int = 1
    step: Optional[float] = 0.5
    previous_runs: list[str] = field(default_factory=list)
    previous_proposals: bool = False

    def validate(self, section: str = "data") -> None:
        bad = partial(bad_key, section)
        for key in ("chains", "sweeps", "every"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.thermalize_sweeps < 0:
            bad("thermalize_sweeps", f"must be >= 0, got {self.thermalize_sweeps}")
        if self.step is not None and not self.step > 0:
            bad("step", f"must be > 0 or null (uniform on the sphere), got {self.step}")
        if self.previous_proposals and not self.previous_runs:  # "none of data.previous_runs holds ..." of none
            bad("previous_proposals", "is true but data.previous_runs is empty: there is no earlier run to take "
                                      "proposals from; list its folder in data.previous_runs, or leave this false")


@dataclass
class EffectiveConfig:
    """The effective models: the linear baseline (always) and one equivariant transformer per
    entry of ``layers`` (depths, run in increasing order). ``grow``: a deeper transformer starts
    from the trained next shallower one plus identity layers (so its validation error starts
    where that one ended); false: every transformer starts from the linear fit.
    ``init_value``: initial value weights of new layers (0: identity). ``n_shells``: distance
    shells of the readout E_0 + Σ_n J_n Σ S̃_i·S̃_j (null: every shell of the lattice, the
    complete isotropic pair model); ``conv_shells``: shells the queries/keys/values sum over;
    training: AdamW (``lr``, ``weight_decay``; the readout's E_0 and J_n at ``readout_lr`` x lr;
    a linear warm-up over ``warmup_epochs``, then a cosine), ``epochs`` over mini-batches of
    ``batch_size``,
    early stopping after ``patience`` epochs without a better validation error on the
    ``val_fraction`` held out (one split for all models).
    ``init_from``: a finished run folder of the same lattice model and transformer shape; a
    transformer whose depth it has (``models/transformer-<layers>.pt``) starts from that trained
    model instead (a self-learning round that continues training; other depths grow or start
    from the linear fit as above).
    """

    layers: list[int] = field(default_factory=lambda: [1, 2, 4])
    heads: int = 4
    n_shells: Optional[int] = None
    conv_shells: int = 1
    init_value: float = 0.0
    grow: bool = True
    epochs: int = 200
    lr: float = 0.01
    readout_lr: float = 0.01
    warmup_epochs: int = 10
    weight_decay: float = 0.0
    batch_size: int = 256
    val_fraction: float = 0.2
    patience: int = 50
    init_from: Optional[str] = None

    def validate(self, section: str = "effective") -> None:
        bad = partial(bad_key, section)
        if any(n < 1 for n in self.layers):
            bad("layers", f"must list transformer depths >= 1 (the linear model always runs), got {self.layers}")
        if len(set(self.layers)) != len(self.layers):
            bad("layers", f"lists a depth twice: {self.layers}")
        if self.warmup_epochs < 0:
            bad("warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        for key in ("heads", "epochs", "batch_size", "patience"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.n_shells is not None and self.n_shells < 1:
            bad("n_shells", f"must be >= 1 or null (all shells), got {self.n_shells}")
        if self.conv_shells < 0:
            bad("conv_shells", f"must be >= 0, got {self.conv_shells}")
        if not self.lr > 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if not self.readout_lr > 0:
            bad("readout_lr", f"must be > 0, got {self.readout_lr}")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0.0 < self.val_fraction < 1.0:
            bad("val_fraction", f"must be in (0, 1), got {self.val_fraction}")


@dataclass
class SLMCConfig:
    """The SLMC runs, one per effective model: ``chains`` independent chains (started from the
    last exact configurations), ``steps`` SLMC steps each; a proposal is ``local_sweeps`` x N
    single-site Metropolis updates under E_eff (random sites, proposal width ``step``, null:
    uniform on the sphere). ``retrain_every`` > 0 refits the model every that many steps on
    the training data plus the configurations visited so far (adaptive: keep it for burn-in;
    statistics are exact for each stretch between refits)."""

    chains: int = 16
    steps: int = 200
    local_sweeps: float = 1.0
    step: Optional[float] = 0.5
    retrain_every: int = 0
    autocorrelation_window: float = 5.0  # Sokal's c: sum C(t) up to the first W >= c · τ(W)

    def validate(self, section: str = "slmc") -> None:
        bad = partial(bad_key, section)
        for key in ("chains", "steps"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if not self.local_sweeps > 0:
            bad("local_sweeps", f"must be > 0, got {self.local_sweeps}")
        if self.step is not None and not self.step > 0:
            bad("step", f"must be > 0 or null (uniform on the sphere), got {self.step}")
        if self.retrain_every < 0:
            bad("retrain_every", f"must be >= 0 (0: never), got {self.retrain_every}")
        if not self.autocorrelation_window > 0:
            bad("autocorrelation_window", f"must be > 0, got {self.autocorrelation_window}")


@dataclass
class SLMCRunConfig:
    lattice: LatticeConfig = field(default_factory=LatticeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    effective: EffectiveConfig = field(default_factory=EffectiveConfig)
    slmc: SLMCConfig = field(default_factory=SLMCConfig)
    seed: int = 0
    run_dir: str = "runs/slmc"
    checkpoint_every: int = 20
    threads: Optional[int] = None

    def validate(self, section: str = "") -> None:
        if self.checkpoint_every < 1:
            raise ConfigError(f"config key 'checkpoint_every' must be >= 1, got {self.checkpoint_every}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"config key 'threads' must be >= 1 or null, got {self.threads}")
        check_threads(self.threads, "config key 'threads'")
        if str(self.run_dir).strip() in ("", "."):  # wrote the run's files into the working folder
            raise ConfigError("config key 'run_dir' (or --run-dir) is empty; give a folder for the run, e.g. runs/slmc")
        kept = self.data.chains * (self.data.sweeps // self.data.every)
        if self.slmc.chains > kept:  # was found after the exact Monte Carlo had run
            raise ConfigError(f"config key 'slmc.chains' is {self.slmc.chains} but the exact run keeps only {kept} "
                              f"configurations (data.chains {self.data.chains} x data.sweeps {self.data.sweeps} / "
                              f"data.every {self.data.every}) to start them from; raise data.sweeps or data.chains")
        if self.effective.init_from is not None:
            from pathlib import Path

            if not Path(self.effective.init_from).is_dir():  # was found after the exact Monte Carlo had run
                raise ConfigError(f"config key 'effective.init_from': {self.effective.init_from} is not a folder "
                                  "(a finished torchmdx slmc run)")
        from torchmdx.lattice.geometry import SquareLattice

        available = len(SquareLattice(self.lattice.L).shell_d2)
        for key in ("n_shells", "conv_shells"):
            value = getattr(self.effective, key)
            if value is not None and value > available:
                raise ConfigError(f"config key 'effective.{key}' is {value} but an L = {self.lattice.L} lattice has "
                                  f"{available} distance shells")
        cost = cost_estimate(self, available)
        total, _ = memory_bytes()
        if total and cost["bytes"] > total:
            raise ConfigError(f"config key 'lattice.L' is {self.lattice.L}: the study needs about {_gb(cost['bytes'])} of "
                              f"memory ({cost['what']}) but this machine has {_gb(total)}; lower lattice.L "
                              "(or data.chains, slmc.chains, effective.n_shells)")
        if not self.data.previous_runs:
            # the exact-MC configurations, split as training.split_indices does: too few fit the linear
            # model exactly (acceptance 0) and one validation configuration has an rmse of 0 by construction
            n = self.data.chains * (self.data.sweeps // self.data.every)
            n_val = min(max(1, int(round(self.effective.val_fraction * n))), n - 1) if n > 1 else 0
            need = (self.effective.n_shells or available) + 1  # the linear model's E_0 and J_n
            if n - n_val < need or n_val < 2:
                raise ConfigError(f"config keys data.chains x data.sweeps / data.every give {n} configurations: {n - n_val} "
                                  f"to fit and {n_val} to validate, but the linear model needs >= {need} to fit "
                                  "(E_0 and one J_n a shell) and >= 2 to validate; raise data.sweeps or data.chains")
        self.lattice.check_boltzmann_rounding(partial(bad_key, "lattice"))

    def to_dict(self) -> dict:
        return to_dict(self)


def shell_count(L: int) -> int:
    """Distance shells of an L x L periodic lattice (even L): distinct dx² + dy² > 0 over the
    minimum-image components 0 <= dx, dy <= L/2 (what SquareLattice.shell_d2 lists, without its
    N x N tables)."""
    half = L // 2
    return len({dx * dx + dy * dy for dx in range(half + 1) for dy in range(dx, half + 1)}) - 1


def cost_estimate(cfg: SLMCRunConfig, shells: Optional[int] = None) -> dict:
    """Rough size of a study: ``bytes`` of memory at its peak, ``matrices`` exact diagonalisations
    of ``size`` x ``size`` complex matrices (size = 2L²) and ``seconds`` for them at
    :data:`EIGH_SECONDS_PER_M3` (a lower bound), with ``what`` and ``work`` in words.

    Memory: the exact energies diagonalise up to max(data.chains, slmc.chains, filling_samples)
    matrices at once (16 bytes an entry; the batch, its copy for LAPACK and the kinetic matrix),
    the lattice's N x N tables (about 40 bytes a pair) and the effective models' dense shell and
    convolution matrices (8 bytes a pair each; two models alive at once). Time: one matrix per
    exact local update (data.chains x sweeps x N), one per SLMC proposal and chain, per model;
    and ``local_updates`` single-site updates under the effective models (slmc.local_sweeps x N
    per proposal, all chains at once, per model), ``local_seconds`` at
    :data:`LOCAL_UPDATE_SECONDS` each (a lower bound; a slmc.local_sweeps of 1e9 was not counted)."""
    lc, dc, ec, sc = cfg.lattice, cfg.data, cfg.effective, cfg.slmc
    n = lc.L * lc.L
    size = 2 * n
    shells = ec.n_shells or (shells if shells is not None else shell_count(lc.L))
    batch = max(dc.chains, sc.chains, lc.filling_samples if lc.mu is None else 0)
    exact = 16 * size * size * (1 + 2 * batch)
    tables = 40 * n * n + 2 * 8 * n * n * (shells + ec.conv_shells + 3)
    data_matrices = dc.chains * (dc.thermalize_sweeps + dc.sweeps) * n
    slmc_matrices = (1 + len(ec.layers)) * sc.chains * (sc.steps + 1)
    matrices = data_matrices + slmc_matrices
    local_updates = (1 + len(ec.layers)) * sc.steps * max(1, int(round(sc.local_sweeps * n)))
    return {"bytes": exact + tables, "matrices": matrices, "size": size,
            "seconds": matrices * EIGH_SECONDS_PER_M3 * float(size) ** 3,
            "local_updates": local_updates, "local_seconds": local_updates * LOCAL_UPDATE_SECONDS,
            "what": f"{batch} complex {size} x {size} matrices at once: {_gb(exact)}; N x N lattice and "
                    f"effective-model tables ({shells} shells): {_gb(tables)}",
            "work": f"{data_matrices:.3g} exact local updates ({dc.chains} chains x {dc.thermalize_sweeps + dc.sweeps} "
                    f"sweeps x {n} sites) and {slmc_matrices:.3g} SLMC proposals"}


def unused_warnings(cfg: SLMCRunConfig) -> list[str]:
    """Lines for keys set to values that do nothing (round 19): ``slmc.retrain_every`` at or beyond
    ``slmc.steps`` (a refit happens at steps k x retrain_every < steps) ran without one refit."""
    sc = cfg.slmc
    if sc.retrain_every and sc.retrain_every >= sc.steps:
        return [f"config key 'slmc.retrain_every' is {sc.retrain_every} but slmc.steps is {sc.steps}: no refit happens "
                f"(one every {sc.retrain_every} steps, before the last); lower it below {sc.steps}, or set 0 (never)"]
    return []


def size_warning(cfg: SLMCRunConfig) -> Optional[str]:
    """One line when the study is estimated (:func:`cost_estimate`) to take more than
    :data:`WARN_SECONDS` or more memory than is available now; else None. (More memory than the
    machine has is refused by the config's validation.)"""
    cost = cost_estimate(cfg)
    _, available = memory_bytes()
    problems = []
    if cost["seconds"] > WARN_SECONDS:
        problems.append(f"{cost['work']} diagonalise a {cost['size']} x {cost['size']} complex matrix each: at least "
                        f"{_duration(cost['seconds'])} on one core")
    if available and cost["bytes"] > available:
        problems.append(f"it needs about {_gb(cost['bytes'])} of memory and {_gb(available)} is available now")
    lines = []
    if problems:
        lines.append(f"lattice.L = {cfg.lattice.L}: " + "; ".join(problems)
                     + " (lower lattice.L, data.sweeps or data.chains for a shorter study)")
    if cost["local_seconds"] > WARN_SECONDS:
        sc = cfg.slmc
        lines.append(f"slmc.local_sweeps = {sc.local_sweeps:g}: {cost['local_updates']:.3g} single-site updates under "
                     f"the effective models ({1 + len(cfg.effective.layers)} models x {sc.steps} steps x "
                     f"{float(max(1, round(sc.local_sweeps * cfg.lattice.L ** 2))):.3g} a proposal): at least "
                     f"{_duration(cost['local_seconds'])} on one core (a few sweeps a proposal are usual)")
    return "; and ".join(lines) or None


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def _duration(seconds: float) -> str:
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.3g} days"


def build_slmc_config(values: dict) -> SLMCRunConfig:
    return from_dict(SLMCRunConfig, values)


def load_slmc_config(path, overrides: Optional[list[str]] = None, run_dir: Optional[str] = None) -> SLMCRunConfig:
    """Read ``path`` (YAML), apply ``--set`` overrides and ``--run-dir``, validate."""
    values = apply_overrides(load_yaml(path), list(overrides or []))
    if not values.get("lattice"):  # an empty file ran the whole default study (L = 4, three transformers)
        raise ConfigError(f"{path}: no 'lattice' section; an slmc config names at least the lattice model "
                          "(lattice: with L and temperature; see configs/slmc_l4.yaml and docs/lattice.md)")
    if run_dir is not None:
        values["run_dir"] = str(run_dir)
    return build_slmc_config(values)
