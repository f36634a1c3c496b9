"""Command-line interface: ``torchmdx <command> ...`` (see :mod:`torchmdx.cli.main`)."""

from torchmdx.cli.main import main

__all__ = ["main"]
