"""jaxtile: tile oversized JAX convolutions into exact select-process-reassemble loops."""

import importlib.metadata as _metadata

from jaxtile import reference as reference
from jaxtile.tune import TuneResult as TuneResult
from jaxtile.tune import autotune as autotune
from jaxtile.tune import load_tuning as load_tuning
from jaxtile.api import default_max_bytes as default_max_bytes
from jaxtile.api import explain as explain
from jaxtile.api import tile_convs as tile_convs
from jaxtile.verify import CheckResult as CheckResult
from jaxtile.verify import ConvCheck as ConvCheck
from jaxtile.verify import check as check
from jaxtile.plan import BudgetError as BudgetError
from jaxtile.plan import ConvPlan as ConvPlan
from jaxtile.report import ConvReport as ConvReport
from jaxtile.report import Report as Report

try:  # pyproject.toml holds the one copy of the version
  __version__ = _metadata.version("jaxtile")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
  __version__ = "0+unknown"

__all__ = (
    "BudgetError",
    "CheckResult",
    "ConvCheck",
    "ConvPlan",
    "ConvReport",
    "Report",
    "TuneResult",
    "autotune",
    "check",
    "default_max_bytes",
    "explain",
    "load_tuning",
    "reference",
    "tile_convs",
)
