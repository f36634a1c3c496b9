"""``MDConfig``: every option of ``torchmdx md`` (command line or the ``md:`` section of a YAML).

Units: dt fs, temperature K, friction 1/ps, tau fs, pressure bar, skin Å, fmax eV/Å.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from torchmdx.config import key_name
from torchmdx.devices import check_threads
from torchmdx.errors import ConfigError
from torchmdx.io_utils import expand_home, names_a_folder, repeated_file

Ensemble = Literal["nve", "langevin", "bussi", "nose-hoover"]

#: the longest Nosé–Hoover chain accepted (3-5 are usual; a typo such as 10**9 hung)
MAX_CHAIN_LENGTH = 100
#: the longest Nosé–Hoover or barostat time constant accepted (fs; 1 ms): the native chain's masses
#: kT·tau² overflowed float32 above about 1e21 fs (a traceback) and were NaN in float64 from 1e155,
#: ASE's integrators raised OverflowError at 1e300
MAX_TIME_CONSTANT_FS = 1e12
#: the shortest Nosé–Hoover or barostat time constant accepted, in time steps: ASE's Nosé–Hoover
#: chain gave NaN positions at tau = 1.2 dt (fine at 2 dt), the native one exploded at 0.2 dt, and a
#: barostat_tau of 0.02 dt collapsed the cell (ASE's "0 lattice vectors" traceback)
MIN_TIME_CONSTANT_STEPS = 2.0
#: the highest temperature accepted (K): hydrogen's thermal speed there is 1600 Å/fs; 1e30 K ran to
#: exit 0 with a warning, 1e60 K in float32 stopped "reaching nan K" (blaming the time step or the
#: model). Up to here a temperature above 1e4 K is a warning only (tests/test_bad_inputs_md.py: 1e9 K)
MAX_TEMPERATURE_K = 1e12
#: the command-line flag of each MDConfig field whose flag is not ``--<name with dashes>``
FLAGS = {
    "structure": "the structure argument", "wrap": "--no-wrap", "progress": "--no-progress",
    "cuda_graph": "--no-cuda-graph",
}
_INDEX = re.compile(r"^\s*(-?\d+|-?\d*:-?\d*(:-?\d*)?)\s*$")


def flag(key: str) -> str:
    """The command-line flag of an MDConfig field (``max_temperature`` -> ``--max-temperature``)."""
    return FLAGS.get(key, "--" + key.replace("_", "-"))


@dataclass
class MDConfig:
    """Options of an MD run.

    structure        structure file(s) any ASE reader understands (xyz, extxyz, pdb, cif, ...),
                     simulated together in one batch
    index            frames of each file: "-1" the last (default), ":" all, "0:4", "5:2:-1" (Python's slicing)
    model            model file (``Potential.save`` / ``torchmdx export``)
    steps            total number of steps (a run continued from a restart stops at this step)
    dt               time step (fs)
    temperature      initial Maxwell–Boltzmann temperature and thermostat target (K)
    ensemble         nve | langevin | bussi | nose-hoover
    friction         Langevin friction γ (1/ps)
    tau              Bussi / Nosé–Hoover time constant (fs)
    chain_length     Nosé–Hoover chain length
    pressure         constant pressure (bar): NPT with ``langevin`` (ASE's LangevinBAOAB and its
                     Langevin-Hoover barostat) or ``nose-hoover`` (ASE's MTK NPT), NPH with
                     ``nve``; periodic structures, ``--engine ase``; None (default): constant volume
    barostat_tau     barostat time constant (fs): the cell's fluctuation period and friction time
    barostat         isotropic (the cell keeps its shape, its volume changes) | anisotropic (all
                     six cell degrees of freedom)
    every            output interval (steps) of trajectory frames and log rows
    out              trajectory (.extxyz/.xyz: extended XYZ; .traj: ASE trajectory; .pdb, .cif:
                     ASE's writers, positions and cell only); other extensions are refused
    log              thermo CSV (default: <out stem>.csv)
    restart_out      restart file written during and at the end (default: <out stem>.restart.pt)
    restart_every    steps between restart files (default: 10 × every)
    summary          summary JSON (default: <out stem>.summary.json)
    restart          continue from this restart file
    force            write over outputs of an earlier run (a new run refuses to otherwise)
    truncate         with ``restart``: drop frames and log rows after the restart file's step
                     (refused otherwise, naming the last step on disk)
    device, dtype    where and in which precision to run
    seed             seed of the initial velocities and of the thermostat noise
    engine           native (this package's engine) | ase (ASE's integrators + the calculator)
    minimize         FIRE relaxation before dynamics, to ``fmax`` (eV/Å) within ``minimize_steps``
    replicas         copies of each structure run together (different velocities)
    velocities       initial velocities of a new run: auto (default) takes the velocities (ASE
                     momenta) a structure file carries, as ASE's MD does, and draws
                     Maxwell–Boltzmann ones at ``temperature`` for files without any; file
                     requires them; draw always draws (a note says which was used)
    skin             Verlet neighbor-list skin (Å)
    check_interval   steps between host-side checks (neighbor list, NaN, temperature)
    max_temperature  a structure hotter than this stops the run (K; default max(2000, 5 T))
    wrap             wrap periodic positions into the cell
    progress         show a progress bar
    cuda_graph       capture the MD step as a CUDA graph (native engine on CUDA; default on)
    compile          auto | whole | parts | off (or true = auto, false = off), native engine:
                     "whole" runs the model, forces included, as one traced and compiled graph,
                     "parts" compiles its dense parts around the fused message kernels; "auto"
                     (default): on CUDA whole up to 64 atoms, parts above; off on the CPU.
                     The first step compiles (tens of seconds, a minute for "whole")
    threads          CPU threads for torch (default: torch's choice; 1 is fastest for small
                     molecules on the CPU)
    atom_order       native engine: auto | input | hilbert | morton: sort the atoms of each
                     structure once along a space-filling curve (neighbors close in memory for
                     the message kernels); outputs stay in the input order. auto (default):
                     hilbert when a structure has >= 5000 atoms, else input
    fuse_integrator  native engine: the integrator's element-wise work around the force call
                     compiled into a few kernels (torchmdx.md.integrators_fused; the same numbers).
                     auto (default: with the compiled model, i.e. on CUDA; H100 Langevin 1 471 ->
                     1 620 steps/s for alanine dipeptide) | true | false
    """

    structure: Union[str, list[str]] = field(default_factory=list)
    index: Union[str, int] = "-1"  # an int from YAML (`index: 0`) is taken as its text
    model: Optional[str] = None
    steps: int = 1000
    dt: float = 0.5
    temperature: float = 300.0
    ensemble: Ensemble = "nve"
    friction: float = 1.0
    tau: float = 100.0
    chain_length: int = 3
    pressure: Optional[float] = None
    barostat_tau: float = 1000.0
    barostat: Literal["isotropic", "anisotropic"] = "isotropic"
    every: int = 10
    out: str = "md.extxyz"
    log: Optional[str] = None
    restart_out: Optional[str] = None
    restart_every: Optional[int] = None
    summary: Optional[str] = None
    restart: Optional[str] = None
    force: bool = False
    truncate: bool = False
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"
    seed: int = 0
    engine: Literal["native", "ase"] = "native"
    minimize: bool = False
    fmax: float = 0.05
    minimize_steps: int = 500
    replicas: int = 1
    skin: float = 0.5
    check_interval: int = 10
    max_temperature: Optional[float] = None
    wrap: bool = True
    progress: bool = True
    cuda_graph: bool = True
    compile: Union[bool, Literal["auto", "whole", "parts", "off"]] = "auto"
    threads: Optional[int] = None
    atom_order: Literal["auto", "input", "hilbert", "morton"] = "auto"
    fuse_integrator: Union[bool, Literal["auto"]] = "auto"
    velocities: Literal["auto", "file", "draw"] = "auto"

    def option(self, key: str) -> str:
        """How messages name option ``key``: its flag (``--dt``) when the command line set it or
        left the default, ``config key 'md.dt'`` when a config file or a Python call set it."""
        names = getattr(self, "_names", None)
        if names is None:  # while from_dict builds it: the names md_config gave from_dict, if any
            return key_name(f"{getattr(self, '_section', 'md')}.{key}")
        return names.get(key, flag(key))

    def validate(self, section: str = "md") -> None:
        self._section = section

        def bad(key, message):
            raise ConfigError(f"{self.option(key)} {message}")

        if isinstance(self.structure, str):
            self.structure = [self.structure]
        # '~' as the shell would expand it (a YAML value or --out=~/x is not): 'model: ~/m.pt' was "model file
        # not found" and 'out: ~/md/x.extxyz' wrote into a folder named '~' in the current folder
        self.structure = [expand_home(name) for name in self.structure]
        for key in ("model", "restart", "out", "log", "restart_out", "summary"):
            setattr(self, key, expand_home(getattr(self, key)))
        for name in self.structure:
            if not isinstance(name, str) or not name.strip():
                bad("structure", f"names an empty structure file ({name!r}); give a structure file any ASE reader "
                                 "understands (xyz, extxyz, pdb, cif, ...)")
        repeated = repeated_file(self.structure)
        if repeated:  # 'md a.xyz a.xyz' ran the file twice, as two structures
            bad("structure", f"names {repeated}: each file is read once; for copies of a structure run together, "
                             f"give it once with {flag('replicas')} N")
        # an empty value (an unset shell variable): --out '' was "--out : no file extension ...", --summary '' took
        # the default and --restart '' started a fresh run instead of continuing, silently (round 23)
        if not isinstance(self.out, str) or not self.out.strip():
            bad("out", f"must name the trajectory file (e.g. md.extxyz), or be left out for md.extxyz, got {self.out!r}")
        for key in ("log", "restart_out", "summary"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                bad(key, f"must name a file, or be left out for the default next to md.out, got {value!r}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            # 'model: ""' (or --model '') was "no model given (--model model.pt, or 'model:' in the md config)",
            # as if the key were missing (round 37's leftover)
            bad("model", f"is empty ({self.model!r}): give the model file (Potential.save / torchmdx export), e.g. "
                         f"{flag('model')} model.pt")
        if self.restart is not None and (not isinstance(self.restart, str) or not self.restart.strip()):
            bad("restart", f"must name the restart file to continue from, or be left out for a new run, got "
                           f"{self.restart!r}")
        for key, example in (("out", "md.extxyz"), ("log", "md.csv"), ("restart_out", "md.restart.pt"),
                             ("summary", "md.summary.json")):
            value = getattr(self, key)
            if isinstance(value, str) and (problem := names_a_folder(value, example)):
                bad(key, f"{value} {problem}")
        if not isinstance(self.index, str):
            self.index = str(self.index)
        if not _INDEX.match(self.index):
            bad("index", f"{self.index!r} is not a frame selection (ASE's syntax: -1 the last, 0 the first, "
                         "':' all, '0:4' a slice)")
        parts = self.index.strip().split(":")
        if len(parts) == 3 and parts[2].strip() and int(parts[2]) == 0:
            # '::0' blamed the file: "ar.xyz: cannot read a structure with ASE (slice step cannot be zero)"
            bad("index", f"{self.index!r} has a slice step of 0; the step is >= 1 ('::2' every second frame) or "
                         "negative ('::-1' backwards)")
        if self.steps < 0:
            bad("steps", f"must be >= 0, got {self.steps}")
        if not self.dt > 0:
            bad("dt", f"must be > 0 fs, got {self.dt}")
        if self.dt > 10:
            bad("dt", f"of {self.dt} fs is far too long for molecular dynamics (typical: 0.5-2 fs)")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0 K, got {self.temperature}")
        if self.temperature > MAX_TEMPERATURE_K:
            bad("temperature", f"of {self.temperature:g} K is beyond {MAX_TEMPERATURE_K:g} K, where a hydrogen atom "
                               "moves about 1600 Å per fs: no potential holds there "
                               "(typical: up to 2000 K)")
        if self.ensemble != "nve" and not self.temperature > 0:
            bad("temperature", f"must be > 0 K for the {self.ensemble} thermostat, got {self.temperature}")
        if self.friction < 0:
            bad("friction", f"must be >= 0 1/ps, got {self.friction}")
        if not self.tau > 0:
            bad("tau", f"must be > 0 fs, got {self.tau}")
        if self.ensemble == "nose-hoover":
            self._check_time_constant("tau", "the Nosé–Hoover thermostat", bad)
        if self.chain_length < 1:
            bad("chain_length", f"must be >= 1, got {self.chain_length}")
        if self.chain_length > MAX_CHAIN_LENGTH:  # 10**9 hung allocating the chain's thermostats
            bad("chain_length", f"must be at most {MAX_CHAIN_LENGTH} thermostats, got {self.chain_length} "
                                "(3 to 5 are usual: longer chains change nothing but the cost)")
        if self.pressure is not None:
            if self.engine != "ase":
                bad("pressure", "needs --engine ase: the native engine has no barostat yet (constant volume only)")
            if self.ensemble not in ("langevin", "nose-hoover", "nve"):
                bad("pressure", f"works with the langevin or nose-hoover (NPT) or nve (NPH) ensemble, not {self.ensemble}")
        if self.engine == "ase" and self.atom_order in ("hilbert", "morton"):  # was silently ignored
            bad("atom_order", f"'{self.atom_order}' needs the native engine (--engine ase runs the atoms in the "
                              "input order); leave it out or drop --engine ase")
        if self.engine == "ase" and self.fuse_integrator is True:  # was ignored without a word (round 27)
            bad("fuse_integrator", "true needs the native engine (--engine ase steps with ASE's integrators, which "
                                   "are not fused); leave it out or drop --engine ase")
        if self.engine == "ase" and self.compile in ("whole", "parts"):  # was ignored: ASE's steps ran eager
            bad("compile", f"'{self.compile}' needs the native engine (--engine ase runs the model uncompiled); "
                           "leave it out or drop --engine ase")
        if self.engine == "ase" and self.ensemble == "langevin" and not self.friction > 0:
            bad("friction", "must be > 0 1/ps for ASE's Langevin integrator")
        if not self.barostat_tau > 0:
            bad("barostat_tau", f"must be > 0 fs, got {self.barostat_tau}")
        if self.pressure is not None:
            self._check_time_constant("barostat_tau", "the barostat", bad)
        if self.every < 1:
            bad("every", f"must be >= 1 step, got {self.every}")
        if self.restart_every is not None and self.restart_every < 1:
            bad("restart_every", f"must be >= 1 step, got {self.restart_every}")
        if self.replicas < 1:
            bad("replicas", f"must be >= 1, got {self.replicas}")
        if self.skin < 0:
            bad("skin", f"must be >= 0 Å, got {self.skin}")
        check_threads(self.threads, self.option("threads"))
        if self.check_interval < 1:
            bad("check_interval", f"must be >= 1, got {self.check_interval}")
        if not self.fmax > 0:
            bad("fmax", f"must be > 0 eV/Å, got {self.fmax}")
        if self.minimize_steps < 0 or (self.minimize and self.minimize_steps < 1):  # -1 skipped the relaxation
            bad("minimize_steps", f"must be >= 1 step{' (with --minimize)' if self.minimize else ''}, "
                                  f"got {self.minimize_steps}")
        if self.max_temperature is not None and not self.max_temperature > 0:
            bad("max_temperature", f"must be > 0 K, got {self.max_temperature}")
        if self.truncate and not self.restart:
            bad("truncate", "drops frames written after a restart file's step: it needs --restart FILE")
        if self.force and self.restart:
            bad("force", "starts the outputs afresh and --restart continues them: to drop frames after the "
                         "restart step pass --truncate, or continue into new files with another --out")

    def _check_time_constant(self, key: str, what: str, bad) -> None:
        """``key`` (fs) between MIN_TIME_CONSTANT_STEPS time steps and MAX_TIME_CONSTANT_FS: outside,
        runs gave NaN positions blamed on the time step or the model, or tracebacks."""
        value = getattr(self, key)
        if not value > 0:
            return  # the > 0 check names it
        if value < MIN_TIME_CONSTANT_STEPS * self.dt:
            bad(key, f"of {value:g} fs is shorter than {MIN_TIME_CONSTANT_STEPS:g} time steps ({self.option('dt')} "
                     f"{self.dt:g} fs): {what} cannot follow it and the run blows up (typical: 100-1000 fs)")
        if value > MAX_TIME_CONSTANT_FS:
            bad(key, f"of {value:g} fs is beyond {MAX_TIME_CONSTANT_FS:g} fs, where {what}'s mass overflows; a "
                     f"time constant far beyond the run's length does nothing (typical: 100-1000 fs)")

    @property
    def max_temperature_K(self) -> float:
        """The temperature limit: ``max_temperature``, default max(2000 K, 5 × temperature)."""
        return float(self.max_temperature) if self.max_temperature else max(2000.0, 5.0 * self.temperature)

    # derived paths ------------------------------------------------------------------------
    def _derived(self, value: Optional[str], suffix: str) -> Path:
        if value:
            return Path(value)
        out = Path(self.out)
        return out.with_name(out.stem + suffix)

    @property
    def log_path(self) -> Path:
        return self._derived(self.log, ".csv")

    @property
    def restart_path(self) -> Path:
        return self._derived(self.restart_out, ".restart.pt")

    @property
    def summary_path(self) -> Path:
        return self._derived(self.summary, ".summary.json")


def md_config(values: Optional[dict] = None, yaml_path: Optional[str] = None, command_line: bool = False) -> MDConfig:
    """An :class:`MDConfig` from a YAML file (its ``md:`` section, or the whole mapping) updated
    with ``values`` (e.g. command-line options that were given).

    ``command_line``: ``values`` came from flags, so messages name an option by its flag
    (``--dt``) unless the YAML file set it (``config key 'md.dt'``)."""
    from dataclasses import fields

    from torchmdx.config import from_dict, load_yaml

    merged: dict = {}
    yaml_keys: set = set()
    if yaml_path is not None:
        data = load_yaml(yaml_path)
        if "md" in data:
            section = data["md"]
            if not isinstance(section, dict):
                raise ConfigError(f"{yaml_path}: the 'md' section must be a mapping, got {type(section).__name__}")
        else:
            section = data
            names = {f.name for f in fields(MDConfig)}
            unknown = [k for k in section if k not in names]
            if unknown:
                key = unknown[0]
                close = difflib.get_close_matches(str(key), ["md", *names], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(
                    f"{yaml_path}: no 'md:' section, and its top-level key '{key}' is not an md option{hint}; put "
                    "the options under 'md:' (see torchmdx md --help)"
                )
        merged.update(section)
        yaml_keys = set(section) - set(values or {})
    merged.update(values or {})
    names = None
    if command_line:  # `--seed -1`, `--dt nan` are flags; a file's key is named with its file
        known = {f.name for f in fields(MDConfig)}  # an unknown key keeps from_dict's own line
        names = {key: flag(key) for key in known}
        names.update({k: f"config key 'md.{k}' in {yaml_path}" for k in yaml_keys & known})
    dotted = None if names is None else {f"md.{k}": name for k, name in names.items()}
    config = from_dict(MDConfig, merged, "md", names=dotted)
    config._names = names
    _check_enabled(config, set(merged))
    config._unused_option_warnings = unused_option_warnings(config, set(merged))
    if yaml_path is not None:
        _resolve_paths_near_the_config(config, yaml_keys, Path(yaml_path))
    return config


#: options that act only with another one: (option, what it sets, the enabling key, its value(s), how to enable it)
_ENABLED_BY = (
    ("friction", "the Langevin thermostat's friction", "ensemble", ("langevin",), "langevin"),
    ("tau", "the Bussi / Nosé–Hoover thermostat's time constant", "ensemble", ("bussi", "nose-hoover"),
     "bussi (or nose-hoover)"),
    ("chain_length", "the Nosé–Hoover chain", "ensemble", ("nose-hoover",), "nose-hoover"),
    ("barostat_tau", "the barostat's time constant", "pressure", None, "BAR (with --engine ase)"),
    ("barostat", "the barostat's kind", "pressure", None, "BAR (with --engine ase)"),
)


def _check_enabled(config: MDConfig, given: set) -> None:
    """An option of a thermostat or barostat given while the option that turns it on was not
    mentioned at all (``--friction 5`` or ``--tau 100`` without ``--ensemble``: the default nve ran,
    no thermostat; ``--barostat-tau`` without ``--pressure``: constant volume), silently, is one line. An
    ensemble or pressure given explicitly (a script passing the same options to every ensemble) is
    taken as meant."""
    for key, what, enabler, values, how in _ENABLED_BY:
        if key not in given or enabler in given:
            continue
        current = getattr(config, enabler)
        if (values is None and current is not None) or (values is not None and current in values):
            continue
        reason = "the volume stays constant" if enabler == "pressure" else f"the default ensemble, {current}, has no thermostat"
        raise ConfigError(f"{config.option(key)} sets {what}, but {config.option(enabler)} was not given, so it has no "
                          f"effect ({reason}): add {config.option(enabler)} {how}, or leave {config.option(key)} out")
    # '--fmax 0.01' or '--minimize-steps 50' without --minimize ran the dynamics unrelaxed, silently
    for key, what in (("fmax", "the minimisation's force threshold"), ("minimize_steps", "the minimisation's step limit")):
        if key in given and "minimize" not in given:
            raise ConfigError(f"{config.option(key)} sets {what}, but {config.option('minimize')} was not given, so it "
                              "has no effect (the dynamics start from the structure as it is): add "
                              f"{config.option('minimize')} to relax it first, or leave {config.option(key)} out")


def unused_option_warnings(config: MDConfig, given: set) -> list:
    """Lines for thermostat or barostat options given beside an explicitly given ensemble (or
    ``pressure``) that does not use them (``--ensemble nve --friction 5``): the run goes on (a
    script may pass one set of options to every ensemble; round 17), but says once per option that
    it has no effect. An option whose enabling key was not given at all is refused instead
    (:func:`_check_enabled`)."""
    lines = []
    for key, what, enabler, values, how in _ENABLED_BY:
        if key not in given or enabler not in given:
            continue
        current = getattr(config, enabler)
        if values is None:
            if current is None:
                lines.append(f"{config.option(key)} has no effect: {config.option(enabler)} is not set, so the volume "
                             f"stays constant ({config.option(key)} sets {what})")
        elif current not in values:
            users = " and ".join(values)
            lines.append(f"{config.option(key)} has no effect with {config.option(enabler)} {current} (only {users} "
                         f"use{'s' if len(values) == 1 else ''} it: {what})")
    return lines


def _resolve_paths_near_the_config(config: MDConfig, yaml_keys: set, yaml_path: Path) -> None:
    """Input files an md config names (``model``, ``structure``, ``restart``) follow ``torchmdx
    train``'s rule for its data files (:func:`torchmdx.config.next_to_config`): next to the config
    first, then the current folder. A config run from another folder found nothing before ("ar.extxyz:
    structure file not found"). Outputs (``out``) stay relative to the current folder, as train's
    ``run_dir``; paths given on the command line are the current folder's."""
    from torchmdx.config import next_to_config

    base = yaml_path.parent
    if base == Path(""):
        return

    def near(text):
        found = next_to_config(str(text), base)
        return text if found is None else found

    for key in ("model", "structure", "restart"):
        if key not in yaml_keys:
            continue
        given = getattr(config, key)
        if isinstance(given, str):
            setattr(config, key, near(given))
        elif isinstance(given, (list, tuple)):
            setattr(config, key, type(given)(near(text) for text in given))
