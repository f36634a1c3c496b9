"""``python -m torchmdx.cli ...``"""

import sys

from torchmdx.cli.main import main

sys.exit(main())
