"""hesse: full input Jacobians, Hessians, Hessian diagonals, Laplacians and HVPs.

>>> import torch, hesse
>>> H = hesse.hessian(lambda x: (x**2).sum(), torch.ones(3))
>>> torch.equal(H, 2 * torch.eye(3))
True
"""

# dense quantities
from .api import derivatives as derivatives
from .api import hessian as hessian
from .api import jacobian as jacobian

# planning
from .api import plan as plan

# input-space curvature without forming H
from .curvature import Estimate as Estimate
from .curvature import HessianOperator as HessianOperator
from .curvature import Spectrum as Spectrum
from .curvature import diag_estimate as diag_estimate
from .curvature import hessian_eigs as hessian_eigs
from .curvature import hessian_operator as hessian_operator
from .curvature import hessian_spectrum as hessian_spectrum
from .curvature import laplacian_estimate as laplacian_estimate
from .curvature import trace_estimate as trace_estimate

# errors and warnings
from .errors import BatchCouplingError as BatchCouplingError
from .errors import ConvergenceWarning as ConvergenceWarning
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
from .errors import PlanMismatchError as PlanMismatchError
from .errors import PrecisionWarning as PrecisionWarning
from .errors import StrategyError as StrategyError
from .errors import StrategyMismatchError as StrategyMismatchError
from .errors import UnsupportedInputError as UnsupportedInputError
from .errors import UnsupportedModelError as UnsupportedModelError
from .errors import ZeroDerivativeWarning as ZeroDerivativeWarning

# keeping freed memory for reuse (glibc; process-wide by nature)
from .heap import set_heap_cache as set_heap_cache
from .operators import mixed_partials as mixed_partials
from .operators import second_order_operator as second_order_operator
from .planning.plan import Plan as Plan
from .planning.plan import Tuning as Tuning
from .planning.saved import load_plan as load_plan

# reductions (never form the full Hessian)
from .reduced import hessian_diag as hessian_diag
from .reduced import hvp as hvp
from .reduced import laplacian as laplacian

# per-call settings (autotune, compile), as a context manager
from .settings import settings as settings

# strategies
from .strategies import Strategy as Strategy
from .strategies import available_strategies as available_strategies
from .strategies import register_strategy as register_strategy

__version__ = "0.1.0"

__all__ = [
    "BatchCouplingError",
    "ConvergenceWarning",
    "DeviceMismatchError",
    "Estimate",
    "FallbackWarning",
    "HesseError",
    "HesseWarning",
    "HessianOperator",
    "MemoryBudgetError",
    "NonDeterministicModelError",
    "NonFiniteError",
    "NonFiniteResultWarning",
    "OutputSelectionError",
    "PiecewiseLinearWarning",
    "Plan",
    "PlanMismatchError",
    "PrecisionWarning",
    "Spectrum",
    "Strategy",
    "StrategyError",
    "StrategyMismatchError",
    "Tuning",
    "UnsupportedInputError",
    "UnsupportedModelError",
    "ZeroDerivativeWarning",
    "available_strategies",
    "derivatives",
    "diag_estimate",
    "hessian",
    "hessian_diag",
    "hessian_eigs",
    "hessian_operator",
    "hessian_spectrum",
    "hvp",
    "jacobian",
    "laplacian",
    "laplacian_estimate",
    "load_plan",
    "mixed_partials",
    "plan",
    "register_strategy",
    "second_order_operator",
    "set_heap_cache",
    "settings",
    "trace_estimate",
]
