"""Foundation: unit table against ASE, config validation, atomic writes, CLI error lines."""

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import ase.units
import pytest

from torchmdx import units
from torchmdx.config import apply_overrides, from_dict, key_name, load_yaml
from torchmdx.errors import ConfigError
from torchmdx.io_utils import atomic_path, atomic_write, jsonable


def test_unit_constants_match_ase():
    assert units.HARTREE_TO_EV == pytest.approx(ase.units.Hartree, rel=1e-15)
    assert units.KCAL_PER_MOL_TO_EV == pytest.approx(ase.units.kcal / ase.units.mol, rel=1e-15)
    assert units.KJ_PER_MOL_TO_EV == pytest.approx(ase.units.kJ / ase.units.mol, rel=1e-15)
    assert units.BOHR_TO_ANGSTROM == pytest.approx(ase.units.Bohr, rel=1e-15)
    assert units.BOLTZMANN_EV_PER_K == pytest.approx(ase.units.kB, rel=1e-15)
    assert units.FS_TO_ASE_TIME == pytest.approx(ase.units.fs, rel=1e-15)
    assert units.DEBYE_TO_E_ANGSTROM == pytest.approx(ase.units.Debye, rel=1e-15)
    # by hand: 1 kcal/mol = 4184 J/mol / (6.022140857e23 /mol * 1.6021766208e-19 J/eV)
    assert units.KCAL_PER_MOL_TO_EV == pytest.approx(4184 / (6.022140857e23 * 1.6021766208e-19), rel=1e-12)
    assert units.energy_factor("Hartree") == units.HARTREE_TO_EV
    assert units.length_factor("Bohr") == units.BOHR_TO_ANGSTROM


def test_milli_and_mega_electronvolts_are_not_confused():
    """Unit names match without case, but 'MeV' (mega) read as meV was 10^9 off, silently."""
    from torchmdx.errors import DataError

    assert units.energy_factor("meV") == units.energy_factor(" mev ") == pytest.approx(1e-3, rel=1e-15)
    assert units.energy_factor("EV") == units.energy_factor("eV") == 1.0
    for name in ("MeV", "MEV", "Mev"):
        with pytest.raises(DataError, match="ambiguous: milli-electronvolt is 'meV'"):
            units.energy_factor(name)


@dataclass
class Inner:
    width: int = 4


@dataclass
class Section:
    rate: float = 1e-3
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    limit: Optional[int] = None
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    inner: Inner = field(default_factory=Inner)


def test_config_from_dict_types_and_defaults():
    s = from_dict(Section, {"rate": 2, "mode": "b", "inner": {"width": 8}, "sizes": [3]}, "train")
    assert s.rate == 2.0 and isinstance(s.rate, float)
    assert s.mode == "b" and s.inner.width == 8 and s.sizes == [3] and s.limit is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rat": 1.0}, "config key 'train.rat' does not exist (did you mean 'rate'?); allowed: inner, limit, mode, name, rate, sizes"),
        ({"rate": "fast"}, "config key 'train.rate' must be float, got 'fast' (str)"),
        ({"mode": "c"}, "config key 'train.mode' must be one of 'a', 'b', got 'c'"),
        ({"inner": {"depth": 1}}, "config key 'train.inner.depth' does not exist (did you mean 'width'?); allowed: width"),
        ({"limit": 1.5}, "config key 'train.limit' must be int | null, got 1.5 (float)"),
        ({"sizes": [1, "x"]}, "config key 'train.sizes[1]' must be int, got 'x' (str)"),
    ],
)
def test_config_errors_name_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Section, values, "train")
    assert str(err.value) == message


@dataclass
class Checked:
    """A section whose validate names its keys with key_name (as DataConfig's and MDConfig's do)."""

    temperature: float = 300.0
    seed: int = 1
    inner: Inner = field(default_factory=Inner)

    def validate(self, section):
        if self.temperature < 0:
            raise ConfigError(f"{key_name(section + '.temperature')} must be >= 0 K, got {self.temperature}")


def test_config_from_dict_names_keys_as_the_caller_says():
    """``names`` (command-line options: ``--temperature``) replaces "config key 'md.temperature'" in
    from_dict's own lines (type, NaN/inf, seed range, required, nested) and in validate's; keys it
    does not name, and calls without it, keep the config wording."""
    names = {"md.temperature": "--temperature", "md.seed": "--seed", "md.inner.width": "--width"}
    for values, named, default in [
        ({"temperature": "hot"}, "--temperature must be float, got 'hot' (str)",
         "config key 'md.temperature' must be float, got 'hot' (str)"),
        ({"temperature": float("nan")}, "--temperature must be a finite number, got nan",
         "config key 'md.temperature' must be a finite number, got nan"),
        ({"seed": -1}, "--seed must be between 0 and 4294967295 (2**32 - 1), got -1",
         "config key 'md.seed' must be between 0 and 4294967295 (2**32 - 1), got -1"),
        ({"inner": {"width": "x"}}, "--width must be int, got 'x' (str)",
         "config key 'md.inner.width' must be int, got 'x' (str)"),
        ({"temperature": -5.0}, "--temperature must be >= 0 K, got -5.0",  # validate's line
         "config key 'md.temperature' must be >= 0 K, got -5.0"),
        ({"temprature": 1.0}, None,  # a key the map does not name keeps from_dict's own line
         "config key 'md.temprature' does not exist (did you mean 'temperature'?); allowed: inner, seed, temperature"),
    ]:
        with pytest.raises(ConfigError) as err:
            from_dict(Checked, values, "md")
        assert str(err.value) == default
        with pytest.raises(ConfigError) as err:
            from_dict(Checked, values, "md", names=names)
        assert str(err.value) == (named or default)
    with pytest.raises(ConfigError, match=r"^config key 'md.temperature' must be >= 0 K"):  # the names are gone after
        from_dict(Checked, {"temperature": -1.0}, "md")
    assert key_name("md.temperature") == "config key 'md.temperature'"


@dataclass
class Numbers:
    lr: float = 1e-3
    temperature_limit: Optional[float] = None
    scale: Union[float, Literal["auto"]] = "auto"
    size: Union[int, float, None] = None
    steps: int = 10
    label: str = "x"


def test_float_fields_take_yaml_1_1_exponent_strings(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 and 1.0e7 as strings; float fields read them as numbers."""
    text = "s:\n  lr: 1e-4\n  temperature_limit: 1.0e7\n  scale: 5E-1\n  size: 2e-1\n  label: 1e-4\n"
    (tmp_path / "c.yaml").write_text(text)
    raw = load_yaml(tmp_path / "c.yaml")["s"]
    assert raw["lr"] == "1e-4" and raw["temperature_limit"] == "1.0e7"  # what PyYAML gives
    cfg = from_dict(Numbers, raw, "s")
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.temperature_limit == 1.0e7 and cfg.scale == 0.5 and cfg.size == 0.2
    assert cfg.label == "1e-4"  # a string field keeps the string
    assert from_dict(Numbers, apply_overrides({}, ["s.lr=5e-4"])["s"], "s").lr == 5e-4  # --set too
    assert from_dict(Numbers, {"scale": "auto", "lr": " -2.5e-3 "}, "s").lr == -2.5e-3
    for bad, message in [
        ({"lr": "fast"}, "config key 's.lr' must be float, got 'fast' (str)"),
        ({"lr": "nan"}, "config key 's.lr' must be float, got 'nan' (str)"),
        ({"lr": "inf"}, "config key 's.lr' must be float, got 'inf' (str)"),
        ({"lr": "1e-4x"}, "config key 's.lr' must be float, got '1e-4x' (str)"),
        ({"temperature_limit": "hot"}, "config key 's.temperature_limit' must be float | null, got 'hot' (str)"),
        ({"scale": "big"}, "config key 's.scale' must be float | 'auto', got 'big' (str)"),
        ({"steps": "1e3"}, "config key 's.steps' must be int, got '1e3' (str)"),  # ints stay strict
    ]:
        with pytest.raises(ConfigError) as err:
            from_dict(Numbers, bad, "s")
        assert str(err.value) == message


def test_overrides():
    cfg = apply_overrides({"train": {"lr": 1}}, ["train.lr=0.5", "trainer.max_epochs=3", "data.path=a.npz"])
    assert cfg == {"train": {"lr": 0.5}, "trainer": {"max_epochs": 3}, "data": {"path": "a.npz"}}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match=r"^--set 'train.lr.x=1': 'lr' is not a section$"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=1"])
    from torchmdx.train.sweep_plan import _set

    values = {"model": {"num_layers": 2}}
    grid_value = [1, 2]
    _set(values, "model.heads", grid_value)
    assert values == {"model": {"num_layers": 2, "heads": [1, 2]}} and values["model"]["heads"] is not grid_value
    with pytest.raises(ConfigError, match=r"^sweep key 'model.num_layers.x': 'num_layers' is not a section$"):
        _set(values, "model.num_layers.x", 1)


def test_atomic_write_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as f:
        f.write(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_atomic_path_for_writers_that_open_by_name(tmp_path):
    """h5py / matplotlib write to a file name: atomic_path gives a temporary one and renames it
    only when the block succeeds (an old file stays untouched by a failed rewrite)."""
    target = tmp_path / "sub" / "cache.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and not target.exists()
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first" and list(target.parent.iterdir()) == [target]
    with pytest.raises(RuntimeError):
        with atomic_path(target, fsync=False) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"first" and list(target.parent.iterdir()) == [target]


def test_jsonable_turns_numpy_values_into_python():
    import json

    import numpy as np

    value = {1: np.int64(3), "a": (np.float32(0.5), np.arange(3)), "b": [np.bool_(True), "s", None, 2.5],
             "c": np.array([[1.0, 2.0]]), "d": np.str_("x")}
    out = jsonable(value)
    assert out == {"1": 3, "a": [0.5, [0, 1, 2]], "b": [True, "s", None, 2.5], "c": [[1.0, 2.0]], "d": "x"}
    assert type(out["1"]) is int and type(out["a"][0]) is float and type(out["b"][0]) is bool
    assert json.loads(json.dumps(out)) == out


def test_cli_help_and_unknown_command():
    out = subprocess.run([sys.executable, "-m", "torchmdx.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ["train", "md", "evaluate", "data", "export", "bench"]:
        assert name in out.stdout


def test_dtype_names_one_table_per_layer_rules():
    import torch

    from torchmdx.data.dataset import as_torch_dtype
    from torchmdx.dtypes import torch_dtype
    from torchmdx.errors import ConfigError, DataError
    from torchmdx.md.loading import as_dtype

    assert as_dtype("float64") is torch.float64 and as_dtype("double") is torch.float64
    assert as_dtype("torch.float32") is torch.float32 and as_dtype(torch.float32) is torch.float32
    with pytest.raises(ConfigError, match=r"^dtype must be one of float32, float64, got 'float16'$"):
        as_dtype("float16")  # MD runs in float32 or float64 only
    assert as_torch_dtype("bfloat16") is torch.bfloat16 and as_torch_dtype("float16") is torch.float16
    with pytest.raises(DataError, match="got 'int8'"):
        as_torch_dtype("int8")
    with pytest.raises(ConfigError, match="model dtype must be one of float64, got 'float32'"):
        torch_dtype("float32", (torch.float64,), what="model dtype")


def test_bench_front_door_lists_and_runs_the_scripts(capsys):
    from torchmdx.cli.bench_cmd import BENCHMARKS, bench_folder
    from torchmdx.cli.main import main

    assert main(["bench"]) == 0
    listing = capsys.readouterr().out
    for name, (script, _) in BENCHMARKS.items():
        assert name in listing and (bench_folder() / script).is_file(), script
    out = subprocess.run([sys.executable, "-m", "torchmdx.cli", "bench", "trainrun", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "--seconds" in out.stdout  # the script's own options
    assert "not built" not in subprocess.run([sys.executable, "-m", "torchmdx.cli", "--help"], capture_output=True,
                                             text=True).stdout
