"""`python -m jaxtile explain|check|stream MODULE:FUNCTION ...` (see `jaxtile._src.cli`)."""

import sys

from jaxtile._src.cli import main

if __name__ == "__main__":
  sys.exit(main())
