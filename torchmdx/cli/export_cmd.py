"""``torchmdx export checkpoint.ckpt -o model.pt``: a self-contained model file.

The model file holds the hyper-parameters, the EMA weights (``--no-ema``: the raw training
weights), the energy normalisation (atomic references, scale, shift), the elements, the cutoff
and the torchmdx version; ``torchmdx.load_model`` reads it without the config. A TorchMD-NET
checkpoint is converted as well.
"""

from __future__ import annotations

import argparse

HELP = "write a self-contained model file from a training checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="training checkpoint (.ckpt), e.g. runs/x/checkpoints/best.ckpt")
    parser.add_argument("-o", "--output", required=True, help="model file to write (e.g. model.pt)")
    parser.add_argument("--no-ema", dest="ema", action="store_false",
                        help="export the raw training weights instead of their moving average")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")


def run(args) -> int:
    from torchmdx.train.export import export_checkpoint

    potential = export_checkpoint(args.checkpoint, args.output, ema=args.ema, force=args.force)
    elements = getattr(potential, "elements", None)
    from torchmdx.nn.potential import element_symbol

    names = ", ".join(element_symbol(z) for z in elements) if elements else "any"
    print(f"wrote {args.output}: {type(potential).__name__}, cutoff {potential.cutoff:g} Å, elements {names}")
    return 0
