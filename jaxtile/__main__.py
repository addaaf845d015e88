"""`python -m jaxtile explain|check MODULE:FUNCTION --arg SHAPE:DTYPE ...` (see `jaxtile._src.cli`)."""

import sys

from jaxtile._src.cli import main

if __name__ == "__main__":
  sys.exit(main())
