"""Input-space curvature without forming the Hessian: operators, eigenpairs, spectra, traces.

>>> import torch, hesse
>>> op = hesse.hessian_operator(lambda x: (x**2).sum(), torch.ones(3))
>>> op.shape
(3, 3)
"""

# the operator
# estimates of the trace, the diagonal and the Laplacian
from .estimators import Estimate as Estimate
from .estimators import diag_estimate as diag_estimate
from .estimators import laplacian_estimate as laplacian_estimate
from .estimators import trace_estimate as trace_estimate
from .operator import HessianOperator as HessianOperator
from .operator import hessian_operator as hessian_operator

# eigenpairs and spectral densities
from .spectral import Spectrum as Spectrum
from .spectral import hessian_eigs as hessian_eigs
from .spectral import hessian_spectrum as hessian_spectrum

__all__ = [
    "Estimate",
    "HessianOperator",
    "Spectrum",
    "diag_estimate",
    "hessian_eigs",
    "hessian_operator",
    "hessian_spectrum",
    "laplacian_estimate",
    "trace_estimate",
]
