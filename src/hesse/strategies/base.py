"""The interface every strategy implements, and the registry that holds them.

A strategy knows how to differentiate the canonical function ``F: (b, n) -> (b, m)`` of
:mod:`hesse._problem` (samples independent) for a block of *work items* at once. Work items
are stacked along a leading dimension ``r``:

- ``vjps(F, X, U)``: per-sample vector-Jacobian products ``U_i^T dF/dX``, ``U`` of shape
  ``(r, b, m)``, result ``(r, b, n)``;
- ``hvps(F, X, u, V)``: the gradient ``g = u^T dF/dX`` for one cotangent ``u`` of shape
  ``(b, m)`` shared by the block, and the Hessian-vector products ``H(u . F) V_i``, ``V`` of
  shape ``(r, b, n)``; results ``(b, n)`` and ``(r, b, n)``. Keeping ``u`` out of the
  vectorised dimension lets the backward pass be shared (measured 1.6x faster than
  batching ``u`` along with ``V``);
- optionally ``jvps(F, X, V)``: Jacobian-vector products ``dF/dX V_i``, result ``(r, b, m)``.

The engine (:mod:`hesse._engine`) turns quantities into work items, chunks them, and writes
the blocks into a sink; strategies never see shapes other than these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Protocol, runtime_checkable

import torch

from ..errors import StrategyError

Fn = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class Strategy(Protocol):
    """A way of computing blocks of vector-Jacobian and Hessian-vector products.

    Attributes:
        name: Registry name, e.g. ``"vmap"``.
        uses_vmap: Needs every op of the model to be batchable by ``torch.func.vmap``.
        uses_forward_ad: Needs forward-mode AD rules for every op of the model.
        memory_factor: Working bytes of one work item of one sample, as a multiple of the
            bytes autograd saves in one forward pass of one sample.
        sequential: Work items run one after another (memory does not grow with ``r``).
        description: One line for plans and the README.
    """

    name: ClassVar[str]
    uses_vmap: ClassVar[bool]
    uses_forward_ad: ClassVar[bool]
    memory_factor: ClassVar[float]
    sequential: ClassVar[bool]
    description: ClassVar[str]

    def vjps(self, fn: Fn, x: torch.Tensor, u: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """Vector-Jacobian products: ``(r, b, m)`` cotangents to ``(r, b, n)``."""
        ...

    def hvps(
        self, fn: Fn, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, create_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient ``(b, n)`` of ``u . F`` and Hessian-vector products ``(r, b, n)``."""
        ...


_REGISTRY: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy, *, overwrite: bool = False) -> Strategy:
    """Adds a strategy to the registry under ``strategy.name``.

    Args:
        strategy: An object implementing :class:`Strategy`.
        overwrite: Replace an existing strategy of the same name.

    Returns:
        The strategy, so this can be used as a class decorator on an instance factory.

    Raises:
        StrategyError: The name is taken (and ``overwrite`` is false) or reserved.
    """
    if strategy.name == "auto":
        raise StrategyError("hesse.register_strategy: the name 'auto' is reserved.")
    if strategy.name in _REGISTRY and not overwrite:
        raise StrategyError(
            f"hesse.register_strategy: a strategy named {strategy.name!r} exists; pass "
            "overwrite=True to replace it."
        )
    _REGISTRY[strategy.name] = strategy
    return strategy


def get_strategy(name: str, api: str = "hesse") -> Strategy:
    """Looks a strategy up by name; a miss lists the valid names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(n) for n in ("auto", *_REGISTRY))
        raise StrategyError(f"{api}: unknown strategy {name!r}; expected one of {valid}.") from None


def available_strategies() -> tuple[str, ...]:
    """Names of the registered strategies (``"auto"`` chooses among them)."""
    return tuple(_REGISTRY)


def has_jvps(strategy: Strategy) -> bool:
    """Whether the strategy can push tangents forward (cheaper Jacobians when n < m)."""
    return callable(getattr(strategy, "jvps", None))
