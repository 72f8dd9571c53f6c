"""Lightning callbacks: they decide *when* layers change; the package's lower layers know *how*."""

from .budget import BudgetConvCallback
from .ghost import GhostConvCallback
from .structured import StructuredConvCallback

__all__ = ["BudgetConvCallback", "GhostConvCallback", "StructuredConvCallback"]
