#!/usr/bin/env python3
"""Run the torchmdx CLI from a checkout: ``python cli.py <command> ...``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from torchmdx.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
