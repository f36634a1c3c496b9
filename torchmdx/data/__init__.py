"""torchmdx.data: raw-format readers -> one HDF5 cache -> PyG dataset; splits; atomic references.

Everything is in eV and Å (``torchmdx.units`` converts at read time). Public API::

    read_structures(path, format=None, **options) -> Structures     # any supported format, in memory
    guess_format(path) -> str
    build_cache(source, format=None, cache_dir="data/cache", **options) -> Path
    H5Dataset(cache_path, dtype=torch.float32)                        # PyG Data items
    BatchLoader(dataset, batch_size, shuffle)                         # fast PyG batches (DDP-aware)
    batches_in_order(dataset, indices, batch_size)                    # batches of chosen structures, in order
    random_split / group_split / save_split / load_split              # torchmdx.data.splits
    fit_atomic_references(dataset, indices, max_z) -> tensor [max_z] (index Z)
    DataConfig, TorchmdxDataModule(config, run_dir=None)

Submodules import torch / lightning only when their names are first used, so that
``import torchmdx.data`` stays cheap for the command line.
"""

from torchmdx.data import splits  # noqa: F401  (numpy only)

_LAZY = {
    "Structures": "torchmdx.data.structures",
    "StructureBuilder": "torchmdx.data.structures",
    "read_structures": "torchmdx.data.formats",
    "guess_format": "torchmdx.data.formats",
    "FORMATS": "torchmdx.data.formats",
    "read_md17": "torchmdx.data.md17",
    "read_rmd17": "torchmdx.data.md17",
    "read_md17_xyz": "torchmdx.data.md17",
    "read_qm9": "torchmdx.data.qm9",
    "read_ani1": "torchmdx.data.ani",
    "read_ani1x": "torchmdx.data.ani",
    "read_ase": "torchmdx.data.ase_format",
    "build_cache": "torchmdx.data.cache",
    "find_cache": "torchmdx.data.cache",
    "cache_path": "torchmdx.data.cache",
    "read_cache": "torchmdx.data.cache",
    "write_cache": "torchmdx.data.cache",
    "cache_info": "torchmdx.data.cache",
    "H5Dataset": "torchmdx.data.dataset",
    "BatchLoader": "torchmdx.data.loader",
    "batches_in_order": "torchmdx.data.loader",
    "random_split": "torchmdx.data.splits",
    "make_split": "torchmdx.data.splits",
    "group_split": "torchmdx.data.splits",
    "save_split": "torchmdx.data.splits",
    "load_split": "torchmdx.data.splits",
    "Split": "torchmdx.data.splits",
    "fit_atomic_references": "torchmdx.data.atomref",
    "published_atomic_references": "torchmdx.data.atomref",
    "energy_statistics": "torchmdx.data.atomref",
    "DataConfig": "torchmdx.data.data_config",
    "load_data_config": "torchmdx.data.data_config",
    "TorchmdxDataModule": "torchmdx.data.datamodule",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'torchmdx.data' has no attribute {name!r}")


__all__ = ["splits", *_LAZY]
