"""torchmdx.nn: the equivariant transformer potential, its building blocks and model files.

Public API::

    build_model(config)            new ETPotential (or any registered kind) from a dict / YAML path
    load_model(path, device=...)   model file (or a TorchMD-NET .ckpt) -> Potential
    import_torchmdnet(ckpt_path)   TorchMD-NET ET checkpoint -> ETPotential
    Potential, Graph               the contract (torchmdx.nn.base)
    ETPotential, ModelConfig       the ET and its hyper-parameters
    register_potential             make another Potential class savable / loadable
"""

from torchmdx.nn.base import Graph, Potential
from torchmdx.nn.config import ModelConfig, model_config
from torchmdx.nn.model_file import build_model, load_model, register_potential, save_potential
from torchmdx.nn.potential import ETPotential
from torchmdx.nn.torchmdnet_import import import_torchmdnet

__all__ = [
    "ETPotential",
    "Graph",
    "ModelConfig",
    "Potential",
    "build_model",
    "import_torchmdnet",
    "load_model",
    "model_config",
    "register_potential",
    "save_potential",
]
