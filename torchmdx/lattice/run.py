"""A whole ``torchmdx slmc`` run: exact Monte Carlo data, effective models, SLMC, report.

Stages, in order, each resumable:

1. ``data``: exact local-update Metropolis on ``data.chains`` chains from random spins; after
   ``thermalize_sweeps`` one configuration per chain every ``every`` sweeps is kept (spins, Ω,
   fermion energy, filling, m, m_s) in ``data.csv`` and as training data.
2. one stage per effective model (``linear``, then ``transformer-<layers>`` for each depth):
   fit it (least squares / AdamW), then run ``slmc.steps`` SLMC steps on ``slmc.chains`` chains
   started from the last exact configurations; every step's chain states go to
   ``samples_<model>.csv``; the model to ``models/<model>.pt``.
3. report: ``summary.json`` (acceptance, autocorrelation times, observables with errors, fit
   errors, costs per model and for the exact reference), ``acceptance_vs_layers.png``,
   ``structure_factor.png``.

Run folder::

    config.yaml           the resolved config
    checkpoint.pt         the whole state: stage, chains, RNG state, models, series so far
    data.csv              exact local-update samples
    samples_<model>.csv   SLMC samples (step, chain, accepted, omega, energy, filling, e_eff, m, m_stag)
    configurations_<model>.pt   the SLMC chain's configurations and exact Ω (data.previous_runs of a later run)
    proposals_<model>.pt  every SLMC proposal, accepted or not, with exact Ω (data.previous_proposals)
    models/<model>.pt     effective models (torchmdx.lattice.effective.load_effective)
    summary.json, acceptance_vs_layers.png, structure_factor.png

All randomness is drawn from one ``torch.Generator`` seeded with ``seed``; the checkpoint holds
its state together with the chains, so ``--resume`` continues a run exactly as if it had not
stopped (the CSV files are cut back to the checkpoint's rows first).

The report's acceptance diagnostics and the table the CLI prints are in
:mod:`torchmdx.lattice.report` (re-exported here).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from torchmdx.config import to_dict
from torchmdx.errors import ConfigError, TorchmdxError
from torchmdx.io_utils import atomic_write, jsonable
from torchmdx.lattice.config import SLMCRunConfig
from torchmdx.lattice.effective import EquivariantTransformer, LinearEffectiveModel, build_effective, save_effective
from torchmdx.lattice.fermions import DoubleExchangeModel, random_spins
from torchmdx.lattice.geometry import SquareLattice
from torchmdx.lattice.observables import (integrated_autocorrelation_time, mean_and_error, spin_observables,
                                          structure_factor)
from torchmdx.lattice.report import (_chain_mean_and_error, _stacked, expected_acceptance, format_summary,
                                     log_ratio_statistics, residual_decomposition)
from torchmdx.lattice.sampler import ChainState, LocalProposal, effective_energy_fn, local_metropolis, slmc_step
from torchmdx.lattice.training import fit_linear, fit_transformer, split_indices

CHECKPOINT = "checkpoint.pt"
RESOLVED_CONFIG = "config.yaml"
DATA_CSV = "data.csv"
SUMMARY = "summary.json"
DATA_FIELDS = ["sweep", "chain", "omega", "energy", "filling", "m", "m_stag"]
SAMPLE_FIELDS = ["step", "chain", "accepted", "omega", "energy", "filling", "e_eff", "m", "m_stag"]
#: this module's names, and those of :mod:`torchmdx.lattice.report` that callers import from here
__all__ = ["CHECKPOINT", "RESOLVED_CONFIG", "DATA_CSV", "SUMMARY", "DATA_FIELDS", "SAMPLE_FIELDS", "RESUME_MUTABLE",
           "Interrupted", "model_names", "check_run_dir", "load_previous_runs", "CsvLog", "SLMCRun", "run_slmc",
           "format_summary", "log_ratio_statistics", "residual_decomposition", "expected_acceptance"]
#: keys that may differ when a run is resumed (they do not change the chain)
RESUME_MUTABLE = {"checkpoint_every", "threads", "run_dir"}


class Interrupted(TorchmdxError):
    """Raised after the checkpoint when a run stops early on purpose (``stop_after``)."""


def model_names(cfg: SLMCRunConfig) -> list[str]:
    return ["linear"] + [f"transformer-{n}" for n in sorted(cfg.effective.layers)]


def check_run_dir(cfg: SLMCRunConfig, resume: bool) -> Path:
    """The run folder; a new run refuses a folder holding a checkpoint, a resumed run a config
    that differs from the saved one (other than :data:`RESUME_MUTABLE`)."""
    run_dir = Path(cfg.run_dir)
    ckpt = run_dir / CHECKPOINT
    if resume:
        if not ckpt.is_file():
            raise ConfigError(f"--resume: {ckpt} not found; nothing to resume in {run_dir}")
    elif ckpt.is_file():
        raise ConfigError(f"{run_dir} already holds a run ({CHECKPOINT}); pass --resume to continue it or "
                          "--run-dir for a new folder")
    return run_dir


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_previous_runs(cfg: SLMCRunConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(spins, Ω) of every ``configurations_*.pt`` (and with ``data.previous_proposals`` every
    ``proposals_*.pt``, refused when there are none) in the folders ``data.previous_runs``: SLMC configurations of earlier runs
    of the same lattice model (same lattice section, same μ)."""
    import yaml

    out = []
    found_proposals = False
    for folder in cfg.data.previous_runs:
        folder = Path(folder)
        files = sorted(folder.glob("configurations_*.pt"))
        if not files:
            raise ConfigError(f"config key 'data.previous_runs': {folder} holds no configurations_*.pt "
                              "(a finished torchmdx slmc run folder)")
        saved = yaml.safe_load((folder / RESOLVED_CONFIG).read_text()) if (folder / RESOLVED_CONFIG).is_file() else {}
        if (saved or {}).get("lattice") != to_dict(cfg.lattice):
            raise ConfigError(f"config key 'data.previous_runs': {folder} sampled another model "
                              f"(lattice {(saved or {}).get('lattice')}); its energies do not apply here")
        if cfg.data.previous_proposals:
            proposals = sorted(folder.glob("proposals_*.pt"))
            found_proposals = found_proposals or bool(proposals)
            files += proposals
        for path in files:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            out.append((payload["spins"], payload["omega"]))
    if cfg.data.previous_proposals and not found_proposals:
        raise ConfigError("config key 'data.previous_proposals': none of data.previous_runs holds proposals_*.pt "
                          "(written by torchmdx slmc runs from this version on)")
    return out


class CsvLog:
    """Append rows to a CSV file, flushed after each block; ``rows`` counts data rows so a
    resumed run can cut the file back to its checkpoint."""

    def __init__(self, path: Path, fields: list[str], keep_rows: Optional[int]):
        self.path, self.fields = path, fields
        if keep_rows is None or not path.is_file():
            with atomic_write(path, "w") as f:
                f.write(",".join(fields) + "\n")
            self.rows = 0
        else:
            lines = path.read_text().splitlines(keepends=True)
            kept = lines[: 1 + keep_rows]
            if len(kept) < 1 + keep_rows:
                raise TorchmdxError(f"{path}: has {len(lines) - 1} rows but the checkpoint expects {keep_rows}")
            with atomic_write(path, "w") as f:
                f.write("".join(kept))
            self.rows = keep_rows
        self._handle = open(path, "a", newline="")
        self._writer = csv.writer(self._handle, lineterminator="\n")

    def write(self, rows: list[list]) -> None:
        for row in rows:
            self._writer.writerow([f"{v:.12g}" if isinstance(v, float) else v for v in row])
        self._handle.flush()
        self.rows += len(rows)

    def close(self) -> None:
        self._handle.close()


class SLMCRun:
    """The state of one run and the stages that advance it (see the module docstring)."""

    def __init__(self, cfg: SLMCRunConfig, progress: bool = True, stop_after: Optional[int] = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.progress = progress
        self.stop_after = stop_after  # units of work (sweeps, steps) before an on-purpose stop
        self.lattice = SquareLattice(cfg.lattice.L)
        self.n_sites = self.lattice.n_sites
        lc = cfg.lattice
        self.exact = DoubleExchangeModel(self.lattice, lc.t, lc.J, lc.temperature, 0.0 if lc.mu is None else lc.mu)
        self.beta = 1.0 / lc.temperature
        self.n_shells = cfg.effective.n_shells or len(self.lattice.shell_d2)
        self.names = model_names(cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.ck: dict = {}
        self.previous = load_previous_runs(cfg)

    # ------------------------------------------------------------------ checkpoints
    def new(self) -> None:
        import yaml

        self.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.run_dir / RESOLVED_CONFIG, "w") as f:
            f.write(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        lc = self.cfg.lattice
        if lc.mu is None:
            spins = random_spins(lc.filling_samples, self.n_sites, self.generator)
            self.exact.mu = self.exact.mu_for_filling(lc.resolved_filling, spins)
        self._check_previous_mu()
        self.ck = {"version": 1, "config": self.cfg.to_dict(), "mu": self.exact.mu, "data": None,
                   "results": [], "current": None, "trained": {}}

    def _check_previous_mu(self) -> None:
        for folder in self.cfg.data.previous_runs:
            for path in sorted(Path(folder).glob("configurations_*.pt")) + sorted(Path(folder).glob("proposals_*.pt")):
                mu = torch.load(path, map_location="cpu", weights_only=True)["mu"]
                if abs(mu - self.exact.mu) > 1e-9:
                    raise ConfigError(f"config key 'data.previous_runs': {path} was sampled at μ = {mu} "
                                      f"but this run has μ = {self.exact.mu}")

    def save(self) -> None:
        self.ck["generator"] = self.generator.get_state()
        with atomic_write(self.run_dir / CHECKPOINT) as f:
            torch.save(self.ck, f)

    def load(self) -> None:
        path = self.run_dir / CHECKPOINT
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise TorchmdxError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
        if not isinstance(ck, dict) or not {"config", "mu", "generator"} <= set(ck):
            raise TorchmdxError(f"{path}: not a checkpoint of torchmdx slmc (no config, mu and generator state)")
        saved, now = _flatten(ck.get("config", {})), _flatten(self.cfg.to_dict())
        # keys added after the run started had their default value in it
        defaults = _flatten(SLMCRunConfig().to_dict())
        saved.update({k: defaults[k] for k in set(now) - set(saved) if k in defaults})
        for key in sorted(set(saved) | set(now)):
            if key.split(".")[0] not in RESUME_MUTABLE and saved.get(key) != now.get(key):
                raise ConfigError(f"--resume: config key '{key}' is {now.get(key)!r} but the run in {self.run_dir} "
                                  f"was started with {saved.get(key)!r}; a resumed run keeps its config")
        self.ck = ck
        self.exact.mu = ck["mu"]
        self.generator.set_state(ck["generator"])

    def _tick(self, bar) -> None:
        if bar is not None:
            bar.update(1)
        if self.stop_after is not None:
            self.stop_after -= 1
            if self.stop_after <= 0:
                self.save()
                raise Interrupted(f"stopped on purpose; continue with --resume from {self.run_dir / CHECKPOINT}")

    def _bar(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True, disable=not self.progress,
                    leave=False)

    # ------------------------------------------------------------------ stage 1: exact MC
    def run_data(self) -> None:
        dc = self.cfg.data
        data = self.ck.get("data")
        if data is not None and data.get("done"):
            return
        if data is None:
            spins = random_spins(dc.chains, self.n_sites, self.generator)
            data = {"done": False, "sweep": 0, "spins": spins, "energy": self.exact.energy(spins), "accepted": 0,
                    "samples": [], "records": [], "csv_rows": 0}
            self.ck["data"] = data
            log = CsvLog(self.run_dir / DATA_CSV, DATA_FIELDS, None)
            self.save()
        else:
            log = CsvLog(self.run_dir / DATA_CSV, DATA_FIELDS, data["csv_rows"])
        proposal = LocalProposal(step=dc.step)
        total = dc.thermalize_sweeps + dc.sweeps
        bar = self._bar(total, data["sweep"], "exact MC sweeps")
        try:
            while data["sweep"] < total:
                t0 = time.perf_counter()
                spins, energy, acc = local_metropolis(self.exact.energy, data["spins"], data["energy"], self.beta,
                                                      self.n_sites, proposal, self.generator)
                data["spins"], data["energy"] = spins, energy
                data["accepted"] += int(acc.sum())
                data["sweep"] += 1
                data["seconds"] = data.get("seconds", 0.0) + time.perf_counter() - t0
                done = data["sweep"] - dc.thermalize_sweeps
                if done > 0 and done % dc.every == 0:
                    obs = self.exact.observables(spins)
                    obs.update(spin_observables(spins, self.lattice))
                    data["samples"].append(spins.clone())
                    data["records"].append({k: v.clone() for k, v in obs.items()})
                    log.write([[data["sweep"], c, float(obs["omega"][c]), float(obs["energy"][c]),
                                float(obs["filling"][c]), float(obs["m"][c]), float(obs["m_stag"][c])]
                               for c in range(dc.chains)])
                    data["csv_rows"] = log.rows
                if data["sweep"] % self.cfg.checkpoint_every == 0 or data["sweep"] == total:
                    data["done"] = data["sweep"] == total
                    self.save()
                self._tick(bar)
        finally:
            bar.close()
            log.close()

    def training_set(self, extra: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This run's exact configurations, those of ``data.previous_runs``, then ``extra``
        (configurations visited by SLMC, for refits), with their exact Ω."""
        data = self.ck["data"]
        spins = torch.cat(data["samples"])
        energies = torch.cat([r["omega"] for r in data["records"]])
        for s, e in self.previous + list(extra or []):
            spins, energies = torch.cat([spins, s]), torch.cat([energies, e])
        return spins, energies

    def _save_configurations(self, name: str, spins_and_omega: tuple[torch.Tensor, torch.Tensor]) -> None:
        """``name`` in the run folder: spins and exact Ω with the lattice section and μ they belong
        to (read back by :func:`load_previous_runs`)."""
        spins, omega = spins_and_omega
        with atomic_write(self.run_dir / name) as f:
            torch.save({"lattice": to_dict(self.cfg.lattice), "mu": self.exact.mu, "spins": spins, "omega": omega}, f)

    # ------------------------------------------------------------------ stage 2: models
    def build_model(self, name: str) -> torch.nn.Module:
        ec = self.cfg.effective
        if name == "linear":
            return LinearEffectiveModel(self.cfg.lattice.L, self.n_shells)
        layers = int(name.split("-")[1])
        return EquivariantTransformer(self.cfg.lattice.L, layers, ec.heads, self.n_shells, ec.conv_shells,
                                      ec.init_value)

    def fit(self, model: torch.nn.Module, spins: torch.Tensor, energies: torch.Tensor, desc: str,
            init_readout: bool = True) -> dict:
        ec = self.cfg.effective
        # one split of a given set for every model (its own seed: the models compare like with like)
        split = split_indices(len(spins), ec.val_fraction, self.cfg.seed * 1_000_003 + len(spins))
        if isinstance(model, LinearEffectiveModel):
            return fit_linear(model, spins, energies, self.beta, split).as_dict()
        bar = self._bar(ec.epochs, 0, desc)

        def progress(epoch, rmse, beta_rmse):
            bar.update(1)
            bar.set_postfix(beta_rmse=f"{beta_rmse:.3f}")

        try:
            report = fit_transformer(model, spins, energies, self.beta, split, self.generator,
                                     epochs=ec.epochs, lr=ec.lr, weight_decay=ec.weight_decay,
                                     batch_size=ec.batch_size, patience=ec.patience, init_readout=init_readout,
                                     readout_lr=ec.readout_lr, warmup=ec.warmup_epochs,
                                     progress=progress)
        finally:
            bar.close()
        return report.as_dict()

    def exact_observables(self, spins: torch.Tensor) -> dict:
        return self.exact.observables(spins)

    def start_model(self, index: int) -> dict:
        sc = self.cfg.slmc
        name = self.names[index]
        model = self.build_model(name)
        grown_from = None
        started_from = self.trained_start(name, model)
        if started_from is not None:
            grown_from = started_from
        elif isinstance(model, EquivariantTransformer) and self.cfg.effective.grow:
            shallower = [n for n in self.ck["trained"] if n.startswith("transformer-")]
            if shallower:
                grown_from = max(shallower, key=lambda n: int(n.split("-")[1]))
                hyper, state = self.ck["trained"][grown_from]
                smaller = build_effective(hyper)
                smaller.load_state_dict(state)
                model.grow_from(smaller)
        t0 = time.perf_counter()
        spins, energies = self.training_set()
        fit = self.fit(model, spins, energies, desc=f"fit {name}", init_readout=grown_from is None)
        fit["grown_from"] = grown_from
        fit["init_from"] = started_from
        fit["configurations"] = len(spins)
        fit_seconds = time.perf_counter() - t0
        samples = torch.cat(self.ck["data"]["samples"])
        if len(samples) < sc.chains:
            raise ConfigError(f"config key 'slmc.chains' is {sc.chains} but the exact run kept only {len(samples)} "
                              "configurations to start them from (raise data.sweeps or data.chains)")
        spins = samples[-sc.chains:].clone()
        obs = self.exact_observables(spins)
        omega = obs.pop("omega")
        eff = effective_energy_fn(model)(spins)
        chain = ChainState(spins, omega, eff, obs)
        current = {"index": index, "name": name, "hyper": model.hyper(), "state_dict": model.state_dict(),
                   "fit": fit, "fits": [fit], "fit_seconds": fit_seconds, "slmc_seconds": 0.0, "step": 0,
                   "chain": chain.state_dict(), "series": {k: [] for k in SAMPLE_FIELDS[2:]}, "sq_sum": None,
                   "local_acceptance": [], "log_ratio": [], "visited": [], "csv_rows": 0}
        self.ck["current"] = current
        return current

    def trained_start(self, name: str, model: torch.nn.Module) -> Optional[str]:
        """Load ``effective.init_from``/models/<name>.pt into ``model`` when that file exists
        (transformers only); returns its path, or None. A model of another shape, lattice or μ
        is refused in one line."""
        folder = self.cfg.effective.init_from
        if folder is None or not isinstance(model, EquivariantTransformer):
            return None
        if not Path(folder).is_dir():
            raise ConfigError(f"config key 'effective.init_from': {folder} is not a folder (a finished torchmdx slmc run)")
        path = Path(folder) / "models" / f"{name}.pt"
        if not path.is_file():
            return None
        from torchmdx.lattice.effective import load_effective

        trained, meta = load_effective(path)
        if trained.hyper() != model.hyper():
            raise ConfigError(f"config key 'effective.init_from': {path} is {trained.hyper()} but this run's {name} is "
                              f"{model.hyper()}")
        if meta.get("lattice") != to_dict(self.cfg.lattice) or abs(float(meta.get("mu", math.nan)) - self.exact.mu) > 1e-9:
            raise ConfigError(f"config key 'effective.init_from': {path} was trained on another model "
                              f"(lattice {meta.get('lattice')}, μ = {meta.get('mu')})")
        model.load_state_dict(trained.state_dict())
        return str(path)

    def run_model(self, index: int) -> None:
        sc = self.cfg.slmc
        current = self.ck.get("current")
        name = self.names[index]
        csv_path = self.run_dir / f"samples_{name}.csv"
        if current is None or current["index"] != index:
            current = self.start_model(index)
            log = CsvLog(csv_path, SAMPLE_FIELDS, None)
            self.save()
        else:
            log = CsvLog(csv_path, SAMPLE_FIELDS, current["csv_rows"])
        model = build_effective(current["hyper"])
        model.load_state_dict(current["state_dict"])
        model.eval()
        eff_fn = effective_energy_fn(model)
        chain = ChainState.from_state_dict(current["chain"])
        proposal = LocalProposal(step=sc.step)
        n_local = max(1, int(round(sc.local_sweeps * self.n_sites)))
        bar = self._bar(sc.steps, current["step"], f"SLMC {name}")
        try:
            while current["step"] < sc.steps:
                t0 = time.perf_counter()
                chain, accept, info = slmc_step(chain, self.exact_observables, eff_fn, self.beta, n_local, proposal,
                                                self.generator)
                current["step"] += 1
                step = current["step"]
                spin_obs = spin_observables(chain.spins, self.lattice)
                values = {"accepted": accept.double(), "omega": chain.energy, "energy": chain.extras["energy"],
                          "filling": chain.extras["filling"], "e_eff": chain.effective_energy, **spin_obs}
                for key in current["series"]:
                    current["series"][key].append(values[key].clone())
                sq = structure_factor(chain.spins, self.lattice)  # [chains, Nq]: per-chain sums
                current["sq_sum"] = sq if current["sq_sum"] is None else current["sq_sum"] + sq
                current["local_acceptance"].append(info["local_acceptance"].mean().item())
                current["log_ratio"].append(info["log_ratio"].clone())
                current["visited"].append((chain.spins.clone(), chain.energy.clone()))
                current.setdefault("proposals", []).append((info["proposed"].clone(), info["proposed_energy"].clone()))
                log.write([[step, c, int(accept[c])] + [float(values[k][c]) for k in SAMPLE_FIELDS[3:]]
                           for c in range(sc.chains)])
                current["csv_rows"] = log.rows
                if sc.retrain_every and step % sc.retrain_every == 0 and step < sc.steps:
                    spins, energies = self.training_set(current["visited"])
                    fit = self.fit(model, spins, energies, desc=f"refit {name}", init_readout=False)
                    fit["configurations"] = len(spins)
                    current["fits"].append(fit)
                    current["fit"] = fit
                    current["state_dict"] = model.state_dict()
                    chain.effective_energy = eff_fn(chain.spins)
                current["chain"] = chain.state_dict()
                current["slmc_seconds"] += time.perf_counter() - t0
                if step % self.cfg.checkpoint_every == 0 or step == sc.steps:
                    if step == sc.steps:
                        self.finish_model(current, model)
                    self.save()
                self._tick(bar)
        finally:
            bar.close()
            log.close()

    def finish_model(self, current: dict, model: torch.nn.Module) -> None:
        sc = self.cfg.slmc
        c = sc.autocorrelation_window
        series = {k: torch.stack(v, dim=1).numpy() for k, v in current["series"].items()}  # [chains, steps]
        acc = series["accepted"]
        per_chain = acc.mean(1)
        result = {
            "name": current["name"],
            "layers": 0 if current["name"] == "linear" else int(current["name"].split("-")[1]),
            "parameters": sum(p.numel() for p in model.parameters()),
            "fit": current["fit"],
            "refits": len(current["fits"]) - 1,
            "acceptance": float(acc.mean()),
            "acceptance_error": (float(per_chain.std(ddof=1) / math.sqrt(len(per_chain))) if len(per_chain) > 1
                                 else math.nan),
            "local_acceptance": float(np.mean(current["local_acceptance"])),
            **log_ratio_statistics(torch.stack(current["log_ratio"])),
            **expected_acceptance(torch.stack(current["log_ratio"])),
            "local_updates_per_step": max(1, int(round(sc.local_sweeps * self.n_sites))),
            "steps": sc.steps,
            "chains": sc.chains,
            "fit_seconds": current["fit_seconds"],
            "slmc_seconds": current["slmc_seconds"],
        }
        result.update(self.statistics(series, c))
        # cost of one independent sample (2 τ_int apart) of Ω, per chain: one diagonalisation per step
        result["diagonalisations_per_independent_sample"] = 2 * result["tau_omega"]
        seconds_per_step = result["slmc_seconds"] / sc.steps
        result["seconds_per_independent_sample"] = 2 * result["tau_omega"] * seconds_per_step / sc.chains
        result.update(_chain_mean_and_error(current["sq_sum"] / sc.steps))
        visited = _stacked(current["visited"])
        proposals = _stacked(current["proposals"]) if current.get("proposals") else None
        if proposals is not None:
            result.update(residual_decomposition(model, visited, proposals, self.beta, sc.chains))
        model_dir = self.run_dir / "models"
        model_dir.mkdir(exist_ok=True)
        save_effective(model, model_dir / f"{current['name']}.pt",
                       {"lattice": to_dict(self.cfg.lattice), "mu": self.exact.mu, "fit": current["fit"]})
        # the configurations this chain visited, and its proposals, with exact Ω: training data for later runs
        self._save_configurations(f"configurations_{current['name']}.pt", visited)
        if proposals is not None:
            self._save_configurations(f"proposals_{current['name']}.pt", proposals)
        self.ck["results"].append(result)
        self.ck["trained"][current["name"]] = (model.hyper(), model.state_dict())
        self.ck["current"] = None

    def statistics(self, series: dict, c: float) -> dict:
        out = {}
        n = self.n_sites
        for key, scale in (("omega", 1.0 / n), ("energy", 1.0 / n), ("m", 1.0), ("m_stag", 1.0)):
            mean, err = mean_and_error(series[key] * scale, c)
            tau, _ = integrated_autocorrelation_time(series[key], c)
            out[key] = mean
            out[f"{key}_error"] = err
            out[f"tau_{key}"] = tau
        return out

    def reference(self) -> dict:
        """The exact local-update run's observables (τ in sweeps between kept configurations)."""
        data = self.ck["data"]
        series = {k: torch.stack([r[k] for r in data["records"]], dim=1).numpy() for k in data["records"][0]}
        out = self.statistics(series, self.cfg.slmc.autocorrelation_window)
        spins = torch.stack(data["samples"])  # [records, chains, N, 3]
        out.update(_chain_mean_and_error(structure_factor(spins, self.lattice).mean(0)))
        dc = self.cfg.data
        out["local_acceptance"] = data["accepted"] / ((dc.thermalize_sweeps + dc.sweeps) * dc.chains * self.n_sites)
        out["sweeps_between_samples"] = dc.every
        out["samples_per_chain"] = len(data["samples"])
        out["chains"] = dc.chains
        out["seconds"] = data.get("seconds", 0.0)
        out["sweeps"] = dc.thermalize_sweeps + dc.sweeps
        # cost of one independent sample (2 τ_int apart) of Ω, per chain
        out["diagonalisations_per_independent_sample"] = 2 * out["tau_omega"] * dc.every * self.n_sites
        seconds_per_sweep = out["seconds"] / out["sweeps"]
        out["seconds_per_independent_sample"] = 2 * out["tau_omega"] * dc.every * seconds_per_sweep / dc.chains
        return out

    # ------------------------------------------------------------------ stage 3: report
    def report(self) -> dict:
        from torchmdx.lattice.plots import acceptance_plot, structure_factor_plot

        results = self.ck["results"]
        reference = self.reference()
        summary = {"lattice": to_dict(self.cfg.lattice), "mu": self.exact.mu, "n_sites": self.n_sites,
                   "exact_local_mc": reference, "models": results}
        with atomic_write(self.run_dir / SUMMARY, "w") as f:
            json.dump(jsonable(summary), f, indent=1)
        lc = self.cfg.lattice
        title = f"L={lc.L}, t={lc.t:g}, J={lc.J:g}, T={lc.temperature:g}, μ={self.exact.mu:.3f}"
        acceptance_plot(results, self.run_dir / "acceptance_vs_layers.png", title)
        structure_factor_plot(self.lattice, reference, results, self.run_dir / "structure_factor.png", title)
        return summary

    def execute(self, resume: bool) -> dict:
        if resume:
            self.load()
        else:
            self.new()
            self.save()
        self.run_data()
        done = {r["name"] for r in self.ck["results"]}
        for index, name in enumerate(self.names):
            if name not in done:
                self.run_model(index)
        return self.report()


def run_slmc(cfg: SLMCRunConfig, resume: bool = False, progress: bool = True,
             stop_after: Optional[int] = None) -> dict:
    """Run (or continue, ``resume``) the SLMC study of ``cfg``; returns the summary dict.
    ``stop_after`` stops on purpose after that many sweeps + steps (tests of resume)."""
    check_run_dir(cfg, resume)
    previous = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return SLMCRun(cfg, progress, stop_after).execute(resume)
    except KeyboardInterrupt:
        print(f"SLMC run interrupted; continue it with --resume (from {Path(cfg.run_dir) / CHECKPOINT})",
              file=sys.stderr)
        raise
    finally:
        torch.set_num_threads(previous)
