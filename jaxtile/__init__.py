"""jaxtile: tile oversized JAX convolutions into exact select-process-reassemble loops."""

import importlib.metadata as _metadata

from jaxtile import reference as reference
from jaxtile._src.tune import TuneResult as TuneResult
from jaxtile._src.tune import autotune as autotune
from jaxtile._src.tune import load_tuning as load_tuning
from jaxtile._src.tuning import Tuning as Tuning
from jaxtile._src.api import default_max_bytes as default_max_bytes
from jaxtile._src.api import explain as explain
from jaxtile._src.api import tile_convs as tile_convs
from jaxtile._src.bands import BandPlan as BandPlan
from jaxtile._src.spill import SpillPlan as SpillPlan
from jaxtile._src.stream import StreamError as StreamError
from jaxtile._src.stream import StreamPlan as StreamPlan
from jaxtile._src.stream import StreamStats as StreamStats
from jaxtile._src.stream import stream as stream
from jaxtile._src.verify import CheckResult as CheckResult
from jaxtile._src.verify import ConvCheck as ConvCheck
from jaxtile._src.verify import check as check
from jaxtile._src.decide import BudgetError as BudgetError
from jaxtile._src.geometry import ConvPlan as ConvPlan
from jaxtile._src.report import ConvReport as ConvReport
from jaxtile._src.report import RegionReport as RegionReport
from jaxtile._src.report import Report as Report

try:  # pyproject.toml holds the one copy of the version
  __version__ = _metadata.version("jaxtile")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
  __version__ = "0+unknown"

__all__ = (
    "BandPlan",
    "BudgetError",
    "CheckResult",
    "ConvCheck",
    "ConvPlan",
    "ConvReport",
    "RegionReport",
    "Report",
    "SpillPlan",
    "StreamError",
    "StreamPlan",
    "StreamStats",
    "Tuning",
    "TuneResult",
    "autotune",
    "check",
    "default_max_bytes",
    "explain",
    "load_tuning",
    "reference",
    "stream",
    "tile_convs",
)
