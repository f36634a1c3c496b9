"""``TorchmdxDataModule``: everything a training run needs from one ``data:`` config section.

``prepare_data`` (rank 0) builds the HDF5 cache; ``setup`` opens it, checks the elements against
the model's range, makes or reloads the split (``split_file`` if given, else
``<run_dir>/splits.npz`` if it exists, else a new one, saved to ``<run_dir>/splits.npz``), fits
the atomic reference energies on the training split and computes the normalisation statistics.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Optional, Union

import lightning as L
import numpy as np
import torch
from torch_geometric.loader import DataLoader

from torchmdx.config import from_dict
from torchmdx.data.atomref import (
    elements_without_reference,
    energy_statistics,
    fit_atomic_references,
    given_references,
    published_atomic_references,
)
from torchmdx.data.cache import build_cache
from torchmdx.data.data_config import DataConfig
from torchmdx.data.dataset import H5Dataset
from torchmdx.data.loader import BatchLoader, rank_and_world
from torchmdx.data.ranks import global_rank, launch_world, local_rank, wait_for
from torchmdx.data.packing import DeviceBatchLoader, atom_buckets
from torchmdx.data.splits import (SPLIT_FILE_NAME, Split, check_no_group_leak, copies_across_parts, load_split,
                                  make_split, save_split)
from torchmdx.errors import ConfigError, DataError
from torchmdx.io_utils import atomic_write

#: rank 0's atomic references and statistics, read by the other ranks of a DDP launch
STATE_FILE_NAME = "data_state.json"
STATE_VERSION = 1


def _direct_cache(cfg) -> Optional[Path]:
    """The source itself when it is a torchmdx cache (nothing to build)."""
    from torchmdx.data.formats import check_format, guess_format, resolve_source

    try:
        fmt = check_format(cfg.format)
        src = resolve_source(cfg.path, fmt)
        return src if (fmt or guess_format(src)) == "cache" else None
    except DataError:
        return None


def _say(line: str) -> None:
    """One line to the user (rank 0 of a DDP run)."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(line, flush=True)


def _embedding_rows(max_z) -> int:
    """``max_z`` as an int, or a one-line ConfigError: ``max_z=1.5`` was read as 1 (the lines then said "max_z=1"),
    ``True`` as 1 and ``'100'`` as 100 (round 33's leftover)."""
    if isinstance(max_z, (bool, np.bool_)) or not isinstance(max_z, (int, np.integer)) or max_z < 2:
        raise ConfigError(f"TorchmdxDataModule: max_z must be a whole number >= 2 (it counts embedding rows: atomic "
                          f"numbers 0..max_z-1 are accepted), got {max_z!r}")
    return int(max_z)


class TorchmdxDataModule(L.LightningDataModule):
    """Cache, split, references, statistics and loaders from a :class:`DataConfig`.

    ``max_z`` (default ``config.max_z``) has the model's meaning: the number of embedding rows,
    atomic numbers 0 .. max_z - 1 are accepted, and the reference table has max_z entries.

    After :meth:`setup`: ``dataset`` (:class:`H5Dataset`), ``split`` (:class:`Split`),
    ``atomic_references`` (float64 [max_z], eV per atom, index = atomic number), ``elements``
    (atomic numbers in the dataset), ``energy_mean_per_atom`` / ``energy_std_per_atom`` (eV/atom, residual after the
    references, training split), ``force_rms`` (eV/Å, training split, None without forces),
    ``split_path`` (where the split was saved or read).
    """

    def __init__(self, config: Union[DataConfig, Mapping], run_dir=None, max_z: Optional[int] = None,
                 pack_training: bool = False, read_only: bool = False):
        super().__init__()
        #: the run folder is only read (its split; ``evaluate --run``): nothing is written into it (round 33:
        #: evaluate rewrote the run's data_state.json, also when it then refused)
        self.read_only = bool(read_only)
        #: training batches packed to a few fixed sizes (captured training; :mod:`torchmdx.data.packing`)
        self.pack_training = bool(pack_training)
        #: their atom capacities, once the training loader is made (empty: not packed)
        self.training_buckets: list[int] = []
        #: where the training batches are assembled: "device", "host" (packed) or None (PyG batches)
        self.training_batches: Optional[str] = None
        self._plan = False  # packing_plan() not decided yet
        if not isinstance(config, DataConfig):
            config = from_dict(DataConfig, config, "data")
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.max_z = _embedding_rows(max_z if max_z is not None else config.max_z)
        self.dataset: Optional[H5Dataset] = None
        self.split: Optional[Split] = None
        self.split_path: Optional[Path] = None
        self.cache_path: Optional[Path] = None
        self.atomic_references: Optional[torch.Tensor] = None
        self.missing_reference_elements: list[int] = []
        self.statistics: dict = {}

    # -- Lightning hooks -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.cache_path = self._build_cache()

    def setup(self, stage: Optional[str] = None) -> None:
        """Cache, split, references and statistics. In a DDP launch the references and
        statistics are computed once, by rank 0, and shared (module :mod:`torchmdx.data.ranks`):
        through ``torch.distributed`` when it is running, else through ``<run_dir>/data_state.json``,
        which the other ranks wait for."""
        if self.dataset is not None:
            return
        cfg = self.config
        self.cache_path = self._build_cache()
        self.dataset = H5Dataset(self.cache_path, dtype=cfg.dtype, mmap=cfg.mmap)
        elements = self.dataset.elements
        if elements and max(elements) >= self.max_z:
            self.dataset.structures.check_max_z(self.max_z)
        if cfg.check_labels is not False:  # an energy of 1e30 eV or a force of 1e10 eV/Å trained into NaN silently
            from torchmdx.data.label_check import check_labels

            stat = Path(self.cache_path).stat()  # checked once per process and cache file (a sweep sets up often)
            check_labels(self.dataset, key=(str(Path(self.cache_path).resolve()), stat.st_ino, stat.st_size,
                                            stat.st_mtime_ns))
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        if distributed:
            state = None
            if torch.distributed.get_rank() == 0:
                self.split = self._split()
                state = self._fit_state()
            box = [state, self.split]
            torch.distributed.broadcast_object_list(box, src=0)
            state, self.split = box
        elif global_rank() != 0 and self.run_dir is not None:
            state = self._shared_state()
        else:
            self.split = self._split()
            state = self._fit_state()
            if self.run_dir is not None and not self.read_only:
                with atomic_write(self.run_dir / STATE_FILE_NAME, "w") as handle:
                    json.dump(state, handle)
        self._use_state(state)

    def _fit_state(self) -> dict:
        """References, statistics and the key of what they were computed from (JSON-ready:
        Python floats round-trip exactly)."""
        cfg, train = self.config, self.split.train
        missing = []
        if cfg.atomref == "fit":
            refs = fit_atomic_references(self.dataset, train, self.max_z)
            missing = elements_without_reference(self.dataset, train, self.max_z)
        elif cfg.atomref == "dataset":
            refs = published_atomic_references(self.dataset, self.max_z)
        elif isinstance(cfg.atomref, dict):
            refs = given_references(self.dataset, cfg.atomref, self.max_z, cfg.path)
        else:
            refs = torch.zeros(self.max_z, dtype=torch.float64)
        statistics = energy_statistics(self.dataset, train, refs) if len(train) else {}
        return {"key": self._state_key(self.split), "atomic_references": [float(v) for v in refs.tolist()],
                "missing_reference_elements": [int(v) for v in missing], "statistics": statistics}

    def _use_state(self, state: dict) -> None:
        self.atomic_references = torch.tensor(state["atomic_references"], dtype=torch.float64)
        self.missing_reference_elements = list(state["missing_reference_elements"])
        self.statistics = dict(state["statistics"])

    def _state_key(self, split: Split) -> str:
        """What the references depend on: the cache's content, the split, atomref, max_z."""
        digest = hashlib.blake2b(digest_size=16)
        fp = self.dataset.info["fingerprint"]
        for part in (str(Path(self.cache_path).name), str(fp.get("hash", "")), str(fp.get("size", "")),
                     str(self.config.atomref), str(self.max_z), str(STATE_VERSION)):
            digest.update(part.encode() + b"\0")
        for part in ("train", "val", "test"):
            digest.update(np.ascontiguousarray(split[part], dtype=np.int64).tobytes() + b"\1")
        return digest.hexdigest()

    def _shared_state(self) -> dict:
        """A rank other than 0 of a launch without torch.distributed yet: wait for rank 0's
        split and ``data_state.json`` (written after the split), check they belong together."""
        path = self.run_dir / STATE_FILE_NAME
        seen = {"mtime": None}

        def ready():
            if not path.is_file():
                return None
            mtime = path.stat().st_mtime_ns
            if seen["mtime"] == mtime:
                return None
            seen["mtime"] = mtime
            try:
                state = json.loads(path.read_text())
                split = self._split(save=False)
            except (ValueError, OSError, DataError):
                return None
            if state.get("key") != self._state_key(split):
                return None  # an earlier run's file: rank 0 writes the new one
            self.split = split
            return state

        return wait_for(ready, f"rank 0's split and reference fit ({path}; the run folder must be on a file "
                               "system every host sees)", say=print)

    def _build_cache(self) -> Path:
        """The cache; in a launch of several processes only local rank 0 builds it, the others
        wait for it to be current."""
        cfg = self.config
        options = cfg.reader_options()
        if local_rank() != 0 and launch_world() > 1:
            from torchmdx.data.cache import find_cache

            found = wait_for(lambda: find_cache(cfg.path, cfg.format, cfg.cache_dir, **options)
                             or _direct_cache(cfg), f"local rank 0 to build the cache of {cfg.path}")
            return Path(found)
        return build_cache(cfg.path, cfg.format, cfg.cache_dir, **options)

    def _split(self, save: bool = True) -> Split:
        cfg, n = self.config, self.dataset.n_structures
        content_hash = self.dataset.info["fingerprint"].get("hash", "")
        run_file = self.run_dir / SPLIT_FILE_NAME if self.run_dir is not None else None
        if cfg.split_file is not None:
            split = load_split(cfg.split_file, n, content_hash)
            self.split_path = Path(cfg.split_file)
        elif run_file is not None and run_file.is_file():
            split = load_split(run_file, n, content_hash)
            self.split_path = run_file
        elif not save:
            raise DataError(f"{run_file}: not written yet")
        else:
            split = make_split(self.dataset.structures, cfg)
        if cfg.split_by_group and self.dataset.structures.group is not None:
            check_no_group_leak(split, self.dataset.structures.group, self.dataset.structures.group_names)
        if save:  # once (rank 0): duplicated frames in the training and the validation/test part
            copies = copies_across_parts(self.dataset.structures, split)
            if copies:
                import warnings

                warnings.warn(f"{cfg.path}: {copies}", stacklevel=2)
        if save and run_file is not None and self.split_path != run_file and not self.read_only:
            save_split(split, run_file, content_hash)
            self.split_path = run_file
        return split

    # -- what models and training read -----------------------------------------------------------
    @property
    def elements(self) -> list[int]:
        self._need_setup()
        return self.dataset.elements

    @property
    def energy_mean_per_atom(self) -> float:
        self._need_setup()
        return self.statistics.get("energy_per_atom_mean", 0.0)

    @property
    def energy_std_per_atom(self) -> float:
        self._need_setup()
        return self.statistics.get("energy_per_atom_std", 1.0)

    @property
    def force_rms(self) -> Optional[float]:
        self._need_setup()
        return self.statistics.get("force_rms")

    def subset(self, part: str):
        self._need_setup()
        return self.dataset[torch.from_numpy(self.split[part])]

    @property
    def train_dataset(self):
        return self.subset("train")

    @property
    def val_dataset(self):
        return self.subset("val")

    @property
    def test_dataset(self):
        return self.subset("test")

    def _need_setup(self):
        if self.dataset is None:
            raise RuntimeError("TorchmdxDataModule.setup() has not been called")

    # -- loaders ---------------------------------------------------------------------------------
    def _loader(self, part: str, batch_size: int, shuffle: bool, pad_ranks: bool):
        """``BatchLoader`` (``loader: fast``, whole batches gathered from the arrays; shards itself
        over DDP ranks) or PyG's ``DataLoader`` (``loader: pyg``); an empty part gives ``[]``.

        ``pad_ranks``: under DDP, training pads the ranks to equal batch counts by repeating
        structures; validation and test (False) see every structure exactly once, so the error
        sums reduced over the ranks are the split's (BatchLoader: ``pad_ranks=False``; PyG: an
        unrepeated distributed sampler, which Lightning keeps instead of its padding one)."""
        self._need_setup()
        indices = self.split[part]
        if len(indices) == 0:
            return []
        workers = self.config.num_workers
        rank, world = rank_and_world()
        if world > 1 and not pad_ranks and len(indices) < world:
            raise DataError(f"{self.config.path}: the {part} split has {len(indices)} structures, fewer than "
                            f"the {world} DDP ranks; evaluation needs at least one structure per rank")
        if self.config.loader == "fast" and self.dataset.transform is None:
            return BatchLoader(self.dataset, batch_size=batch_size, shuffle=shuffle, indices=indices,
                               num_workers=workers, pad_ranks=pad_ranks)
        sampler = None
        if world > 1 and not pad_ranks:
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(self.subset(part), num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.subset(part), batch_size=batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, num_workers=workers, persistent_workers=workers > 0, drop_last=False)

    def train_dataloader(self):
        plan = self.packing_plan()
        if plan is None:
            return self._loader("train", self.config.batch_size, shuffle=True, pad_ranks=True)
        cfg, indices = self.config, self.split["train"]
        if self.training_batches == "device":
            return DeviceBatchLoader(self.dataset, indices, cfg.batch_size, self.training_buckets, plan["pad_z"],
                                     plan["device"])
        return BatchLoader(self.dataset, batch_size=cfg.batch_size, shuffle=True, indices=indices,
                           num_workers=cfg.num_workers, pad_ranks=True,
                           pin_memory=plan["device"].type == "cuda",  # so the copies to the GPU do not wait
                           pack={"buckets": self.training_buckets, "pad_z": plan["pad_z"],
                                 "periodic": plan["periodic"]})

    def packing_plan(self) -> Optional[dict]:
        """Whether and where training batches are packed (:mod:`torchmdx.data.packing`), decided
        once per run (Lightning asks for the validation loader first, for its sanity check):
        None for plain PyG batches (one line says why where it is not obvious), else
        ``{"device": ..., "pad_z": ...}``, with :attr:`training_batches` ("device" or "host") and
        :attr:`training_buckets` set."""
        if self._plan is not False:
            return self._plan
        self._plan = None
        self.training_buckets, self.training_batches = [], None
        if not self.pack_training:
            return None
        from torchmdx.data.data_config import DEVICE_RESIDENT_FRACTION

        cfg = self.config
        indices = self.split["train"]
        if len(indices) == 0:
            return None
        st = self.dataset.structures
        periodic = bool(np.asarray(st.pbc)[indices].any())
        if self.config.loader != "fast" or self.dataset.transform is not None:
            _say(f"{cfg.path}: data.loader '{cfg.loader}': training batches are not packed")
            return None
        device, world = self._training_device()
        wanted = cfg.device_resident
        if device.type != "cuda" and wanted is not True:
            return None  # nothing is captured off the GPU: plain batches (device_resident: true packs anyway)
        self.training_buckets = atom_buckets(self.dataset._counts[indices], cfg.batch_size, seed=cfg.seed)
        reason = None
        if wanted is False:
            reason = None
        elif world > 1:
            reason = f"{world} processes (DDP) share the data"
        elif device.type == "cuda":
            need = sum(DeviceBatchLoader.nbytes(self.dataset, self.split[part]) for part in ("train", "val"))
            free, _ = torch.cuda.mem_get_info(device)
            if need > DEVICE_RESIDENT_FRACTION * free:
                reason = (f"the training and validation splits need {need / 2**20:.0f} MiB, more than "
                          f"{DEVICE_RESIDENT_FRACTION:.0%} of the {free / 2**20:.0f} MiB free on {device}")
        if wanted is not False and reason is not None:
            _say(f"data.device_resident: {reason}; training batches come from the host loader")
        self.training_batches = "device" if wanted is not False and reason is None else "host"
        self._plan = {"device": device, "pad_z": int(min(self.dataset.elements)), "periodic": periodic}
        return self._plan

    def _training_device(self) -> tuple[torch.device, int]:
        """(the device the trainer trains on, its number of processes); the CPU without a trainer."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return torch.device("cpu"), 1
        return torch.device(trainer.strategy.root_device), int(trainer.world_size)

    def val_dataloader(self):
        batch_size = self.config.inference_batch_size or self.config.batch_size
        plan = self.packing_plan()
        indices = self.split["val"]
        if plan is not None and self.training_batches == "device" and len(indices):
            # the training split is on the device: the validation split joins it, packed in its
            # own buckets, in split order (validated by captured steps, torchmdx.train.graphed_eval)
            buckets = atom_buckets(self.dataset._counts[indices], batch_size, seed=self.config.seed)
            return DeviceBatchLoader(self.dataset, indices, batch_size, buckets, plan["pad_z"], plan["device"],
                                     shuffle=False)
        return self._loader("val", batch_size, shuffle=False, pad_ranks=False)

    def test_dataloader(self):
        return self._loader("test", self.config.inference_batch_size or self.config.batch_size, shuffle=False,
                            pad_ranks=False)

    def predict_dataloader(self):
        return self.test_dataloader()

    def summary(self) -> dict:
        """Split sizes, references and statistics, for logs."""
        self._need_setup()
        refs = {int(z): float(self.atomic_references[z]) for z in self.elements}
        return {"cache": str(self.cache_path), "split": self.split.sizes(), "split_file": str(self.split_path),
                "atomic_references_eV": refs, "elements_without_reference": self.missing_reference_elements,
                **self.statistics}


__all__ = ["TorchmdxDataModule", "make_split", "SPLIT_FILE_NAME"]
