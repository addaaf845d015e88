"""`python -m jaxtile explain|check MODULE:FUNCTION --arg SHAPE:DTYPE ...` (see `jaxtile.cli`)."""

import sys

from jaxtile.cli import main

if __name__ == "__main__":
  sys.exit(main())
