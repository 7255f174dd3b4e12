"""`python -m dpolab ...` (and `accelerate launch -m dpolab train ...`) runs the CLI."""

import sys

from dpolab.cli import main

sys.exit(main())
