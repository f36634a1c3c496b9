"""torchmdx.nn: the equivariant transformer potential, its building blocks and model files.

Public API::

    build_model(config)            new potential from a dict / YAML path: model.architecture
                                   'et' (default, ETPotential) or 'equiformer' (EquiformerPotential),
                                   or any registered kind
    load_model(path, device=...)   model file (or a TorchMD-NET .ckpt) -> Potential
    import_torchmdnet(ckpt_path)   TorchMD-NET ET checkpoint -> ETPotential
    Potential, Graph               the contract (torchmdx.nn.base)
    ETPotential, ModelConfig       the ET and its hyper-parameters
    EquiformerPotential, EquiformerConfig   Equiformer (e3nn; imported on first use)
    ARCHITECTURES, architecture_config      model.architecture -> config / potential classes
    register_potential             make another Potential class savable / loadable
"""

from torchmdx.nn.base import Graph, Potential
from torchmdx.nn.config import ARCHITECTURES, ModelConfig, architecture_config, model_config
from torchmdx.nn.model_file import build_model, load_model, register_potential, save_potential
from torchmdx.nn.potential import ETPotential
from torchmdx.nn.torchmdnet_import import import_torchmdnet


def __getattr__(name):
    # Equiformer needs e3nn: import it only when asked for
    if name in ("EquiformerPotential", "EquiformerConfig"):
        from torchmdx.nn import equiformer

        return getattr(equiformer, name)
    raise AttributeError(f"module 'torchmdx.nn' has no attribute {name!r}")


__all__ = [
    "ARCHITECTURES",
    "ETPotential",
    "EquiformerConfig",
    "EquiformerPotential",
    "Graph",
    "ModelConfig",
    "Potential",
    "architecture_config",
    "build_model",
    "import_torchmdnet",
    "load_model",
    "model_config",
    "register_potential",
    "save_potential",
]
