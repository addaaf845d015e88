"""jaxtile: tile oversized JAX convolutions into exact select-process-reassemble loops."""

from jaxtile import reference as reference
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

__version__ = "0.1.0"

__all__ = (
    "BudgetError",
    "CheckResult",
    "ConvCheck",
    "ConvPlan",
    "ConvReport",
    "Report",
    "check",
    "default_max_bytes",
    "explain",
    "reference",
    "tile_convs",
)
