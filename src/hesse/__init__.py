"""hesse: full input Jacobians, Hessians, Hessian diagonals, Laplacians and HVPs.

>>> import torch, hesse
>>> H = hesse.hessian(lambda x: (x**2).sum(), torch.ones(3))
>>> torch.equal(H, 2 * torch.eye(3))
True
"""

# dense quantities
# keeping freed memory for reuse (glibc)
from ._heap import set_heap_cache as set_heap_cache

# tuning of strategy="auto"
from ._tuning import set_autotune as set_autotune
from .api import derivatives as derivatives
from .api import hessian as hessian
from .api import jacobian as jacobian

# planning
from .api import plan as plan

# errors and warnings
from .errors import BatchCouplingError as BatchCouplingError
from .errors import DeviceMismatchError as DeviceMismatchError
from .errors import FallbackWarning as FallbackWarning
from .errors import HesseError as HesseError
from .errors import HesseWarning as HesseWarning
from .errors import MemoryBudgetError as MemoryBudgetError
from .errors import NonDeterministicModelError as NonDeterministicModelError
from .errors import NonFiniteError as NonFiniteError
from .errors import NonFiniteResultWarning as NonFiniteResultWarning
from .errors import OutputSelectionError as OutputSelectionError
from .errors import PiecewiseLinearWarning as PiecewiseLinearWarning
from .errors import PrecisionWarning as PrecisionWarning
from .errors import StrategyError as StrategyError
from .errors import StrategyMismatchError as StrategyMismatchError
from .errors import UnsupportedInputError as UnsupportedInputError
from .errors import UnsupportedModelError as UnsupportedModelError
from .errors import ZeroDerivativeWarning as ZeroDerivativeWarning
from .operators import mixed_partials as mixed_partials
from .operators import second_order_operator as second_order_operator
from .planner import Plan as Plan

# products and reductions (never form the full Hessian)
from .products import hessian_diag as hessian_diag
from .products import hvp as hvp
from .products import laplacian as laplacian

# strategies
from .strategies import Strategy as Strategy
from .strategies import available_strategies as available_strategies
from .strategies import register_strategy as register_strategy

# optional torch.compile of the structured engine's fusable kernels
from .structured.kernels import set_compile as set_compile

__version__ = "0.1.0"

__all__ = [
    "BatchCouplingError",
    "DeviceMismatchError",
    "FallbackWarning",
    "HesseError",
    "HesseWarning",
    "MemoryBudgetError",
    "NonDeterministicModelError",
    "NonFiniteError",
    "NonFiniteResultWarning",
    "OutputSelectionError",
    "PiecewiseLinearWarning",
    "Plan",
    "PrecisionWarning",
    "Strategy",
    "StrategyError",
    "StrategyMismatchError",
    "UnsupportedInputError",
    "UnsupportedModelError",
    "ZeroDerivativeWarning",
    "available_strategies",
    "derivatives",
    "hessian",
    "hessian_diag",
    "hvp",
    "jacobian",
    "laplacian",
    "mixed_partials",
    "plan",
    "register_strategy",
    "second_order_operator",
    "set_autotune",
    "set_compile",
    "set_heap_cache",
]
