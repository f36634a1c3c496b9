"""Command-line interface: ``torchmdx <command> ...`` (entry point :func:`torchmdx.cli.main.main`).

Run from a checkout with ``python cli.py ...`` or ``python -m torchmdx.cli ...``.
"""
