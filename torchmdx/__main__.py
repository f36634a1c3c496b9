"""``python -m torchmdx ...``: the command line (the same as ``torchmdx ...``)."""

import sys

from torchmdx.cli.main import main

sys.exit(main())
