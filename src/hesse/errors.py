"""The exceptions and warnings hesse raises.

Every error derives from :class:`HesseError`, so ``except hesse.HesseError`` catches
anything the library refuses to do. Each class also derives from the builtin that fits
(``ValueError``, ``TypeError``, ``IndexError``, ``RuntimeError``, ``MemoryError``) so
that generic handlers keep working. Messages follow one pattern: the call
(``hesse.hessian``), what was expected, what was got, and the fix.
"""

from __future__ import annotations


class HesseError(Exception):
    """Base class of every error raised by hesse."""


class UnsupportedInputError(HesseError, TypeError):
    """The input tensor (or ``v``) has a dtype, shape or value hesse cannot differentiate."""


class OutputSelectionError(HesseError, IndexError):
    """``output=`` does not select valid elements of the model's output."""


class UnsupportedModelError(HesseError, TypeError):
    """The model returned something that is not one real floating tensor, or failed to run."""


class NonFiniteError(HesseError, ValueError):
    """The input holds NaN or Inf entries."""


class DeviceMismatchError(HesseError, ValueError):
    """The input and the model's parameters or buffers live on different devices."""


class NonDeterministicModelError(HesseError, RuntimeError):
    """The model is random (e.g. Dropout in training mode), so its derivatives are too."""


class BatchCouplingError(HesseError, RuntimeError):
    """Samples of a batch influence each other, so per-sample derivatives are undefined."""


class MemoryBudgetError(HesseError, MemoryError):
    """The result (or the smallest working set) does not fit in the memory budget."""


class StrategyError(HesseError, ValueError):
    """An unknown strategy name, or a strategy that cannot run this model."""


class StrategyMismatchError(HesseError, RuntimeError):
    """Two differentiation modes disagree on this model (e.g. ``torch.no_grad`` inside it)."""


class FileFormatError(HesseError, ValueError):
    """A model, input or weights file is truncated, corrupt, or not in a supported format."""


class UnsafeFileError(HesseError, ValueError):
    """A file would need pickle or TorchScript to load, which can run code; it was refused."""


class OutputExistsError(HesseError, FileExistsError):
    """The output already exists and resuming was not asked for (or it is not resumable)."""


class OutputWriteError(HesseError, OSError):
    """The output cannot be written: an unwritable or missing folder, or a full disk."""


class ResumeMismatchError(HesseError, ValueError):
    """A resumed run differs from the interrupted one (model, inputs or options changed)."""


class PlanMismatchError(HesseError, ValueError):
    """A saved plan was made for another model structure, input, options or versions."""


class MissingDependencyError(HesseError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class HesseWarning(UserWarning):
    """Base class of every warning issued by hesse."""


class PiecewiseLinearWarning(HesseWarning):
    """A second-order result is all zero because the nonlinearities are piecewise linear."""


class ZeroDerivativeWarning(HesseWarning):
    """A first-order result is all zero: the output does not depend on the input."""


class FallbackWarning(HesseWarning):
    """``strategy="auto"`` fell back to another strategy because of an operator."""


class PrecisionWarning(HesseWarning):
    """A low-precision input was upcast to float32 for the computation."""


class NonFiniteResultWarning(HesseWarning):
    """The result holds NaN or Inf although the input was finite."""


class ConvergenceWarning(HesseWarning):
    """An iterative method (Lanczos, an adaptive estimate) stopped before its tolerance."""
