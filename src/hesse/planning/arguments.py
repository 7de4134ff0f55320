"""Fixed extra arguments: ``hesse.hessian(f, x, args=(species, pairs), kwargs={...})``.

Derivatives are taken with respect to ``x`` only; ``args`` and ``kwargs`` are passed to
every call of ``f`` unchanged (``f(x, *args, **kwargs)``; with ``batched=True`` every
sub-batch gets them whole). The front wraps ``f`` in :class:`WithArguments`, an
``nn.Module`` that holds them as attributes: TorchDynamo then lifts the tensors among them
as inputs of the captured graph (their current values are read at every call, so new
species or neighbour lists of the same shape reuse the capture and its tuning), and
guards the rest (numbers, flags), capturing again when they change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedInputError


class WithArguments(nn.Module):
    """``f(x, *args, **kwargs)`` as a model of ``x`` alone.

    Attributes:
        f: The caller's model or function (a submodule when it is a module).
        args: Positional arguments after ``x``.
        kwargs: Keyword arguments.
    """

    def __init__(self, f: Callable[..., torch.Tensor], args: tuple, kwargs: dict[str, Any]):
        super().__init__()
        self.training = bool(getattr(f, "training", False))
        self.f = f
        self.args = args
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The caller's ``f`` on ``x`` and the fixed arguments."""
        return self.f(x, *self.args, **self.kwargs)


def unwrap(f: object) -> object:
    """The caller's model: ``args=``/``kwargs=`` wrap it afresh at every call."""
    while isinstance(f, WithArguments):
        f = f.f
    return f


def with_arguments(
    api: str, f: Callable[..., torch.Tensor], args: Any, kwargs: Any
) -> Callable[..., torch.Tensor]:
    """``f`` itself, or ``f`` with fixed extra arguments bound after ``x``.

    Raises:
        UnsupportedInputError: ``args`` is not a tuple or list, or ``kwargs`` not a
            mapping with string keys.
    """
    if args is None:
        args = ()
    if not isinstance(args, (tuple, list)):
        raise UnsupportedInputError(
            f"{api}: expected args to be a tuple of the extra arguments of f (after x), got "
            f"{type(args).__name__}. Pass args=(value,) for one argument."
        )
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise UnsupportedInputError(
            f"{api}: expected kwargs to be a dict of keyword arguments of f, got "
            f"{type(kwargs).__name__}."
        )
    if not args and not kwargs:
        return f
    return WithArguments(f, tuple(args), dict(kwargs))
