"""torchmdx.train: training of potentials with Lightning (docs/training.md).

Public API (imported on first use, so that ``import torchmdx.train`` stays cheap)::

    load_run_config(path, overrides, run_dir) -> RunConfig     # the YAML: data/model/train/trainer/run_dir
    train(run_config, resume=False) -> dict                     # a whole run, run folder out
    prepare(run_config, run_dir) -> (datamodule, module)        # data + model, nothing trained
    PotentialModule                                             # the LightningModule
    EMA                                                         # EMA-of-weights callback
    export_checkpoint(ckpt, out) / potential_from_checkpoint(ckpt)
    predict(model, dataset, indices) / error_metrics(predictions)
"""

_LAZY = {
    "RunConfig": "torchmdx.train.config",
    "TrainConfig": "torchmdx.train.config",
    "TrainerConfig": "torchmdx.train.config",
    "build_run_config": "torchmdx.train.config",
    "load_run_config": "torchmdx.train.config",
    "train": "torchmdx.train.run",
    "prepare": "torchmdx.train.run",
    "build_trainer": "torchmdx.train.run",
    "normalisation_from_data": "torchmdx.train.run",
    "PotentialModule": "torchmdx.train.module",
    "EMA": "torchmdx.train.ema",
    "EpochErrors": "torchmdx.train.metrics",
    "export_checkpoint": "torchmdx.train.export",
    "potential_from_checkpoint": "torchmdx.train.export",
    "predict": "torchmdx.train.evaluate",
    "error_metrics": "torchmdx.train.evaluate",
    "learning_curve": "torchmdx.train.plots",
    "parity_plot": "torchmdx.train.plots",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'torchmdx.train' has no attribute {name!r}")


__all__ = list(_LAZY)
