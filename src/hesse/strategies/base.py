"""The interface every strategy implements, and the registry that holds them.

A strategy differentiates the canonical function ``F: (b, n) -> (b, m)`` of
:mod:`hesse.planning.problem` (samples independent). There are two kinds, told apart by
:attr:`Capabilities.whole_samples`:

- *product* strategies compute blocks of work items at once. Work items are stacked
  along a leading dimension ``r``:

  - ``vjps(F, X, U)``: per-sample vector-Jacobian products ``U_i^T dF/dX``, ``U`` of shape
    ``(r, b, m)``, result ``(r, b, n)``;
  - ``hvps(F, X, u, V)``: the gradient ``g = u^T dF/dX`` for one cotangent ``u`` of shape
    ``(b, m)`` shared by the block, and the Hessian-vector products ``H(u . F) V_i``, ``V``
    of shape ``(r, b, n)``; results ``(b, n)`` and ``(r, b, n)``. Keeping ``u`` out of the
    vectorised dimension lets the backward pass be shared;
  - ``jvps(F, X, V)`` (when :attr:`Capabilities.jvps`): Jacobian-vector products
    ``dF/dX V_i``, result ``(r, b, m)``;

- *whole-sample* strategies (``compute``) return every array of a sub-batch at once.

The driver (:mod:`hesse.driver`) turns quantities into work items, chunks them, and writes
the blocks into a sink; strategies never see shapes other than these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import torch

from ..errors import StrategyError

if TYPE_CHECKING:
    from ..planning.problem import Problem

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Capabilities:
    """What a strategy needs of the model, and how it works.

    Attributes:
        vmap: Needs every op of the model to be batchable by ``torch.func.vmap``.
        forward_ad: Needs forward-mode AD rules for the model's ops (and their backward).
        whole_samples: Computes whole per-sample results (``compute``) instead of blocks
            of products.
        sequential: Work items run one after another (memory does not grow with ``r``).
        differentiable: Results can stay in autograd's graph (``create_graph=True``).
        jvps: Can push tangents forward (cheaper Jacobians when ``n < m``).
    """

    vmap: bool
    forward_ad: bool
    whole_samples: bool = False
    sequential: bool = False
    differentiable: bool = True
    jvps: bool = False


@runtime_checkable
class Strategy(Protocol):
    """A way of computing derivatives of the canonical problem.

    Attributes:
        name: Registry name, e.g. ``"vmap"``.
        capabilities: What it needs and how it works.
        memory_factor: Working bytes of one work item of one sample, as a multiple of the
            bytes autograd saves in one forward pass of one sample.
        description: One line for plans and the README.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    memory_factor: ClassVar[float]
    description: ClassVar[str]

    def unsupported(self, problem: Problem, quantity: str, create_graph: bool) -> str | None:
        """Why the strategy declines the request up front (``None``: it accepts)."""
        ...

    def estimate(self, problem: Problem, quantity: str) -> float:
        """Estimated multiply-adds of the whole call."""
        ...

    def describe(self, problem: Problem, quantity: str) -> str:
        """A few words for plans on how it would run (``""``: nothing to add)."""
        ...

    # Optional: ``traffic(problem, quantity) -> float``, the bytes the call writes and
    # reads (the cost model's second term, see :func:`hesse.engine.cost.seconds`);
    # strategies without it are costed by multiply-adds alone.


_REGISTRY: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy, *, overwrite: bool = False) -> Strategy:
    """Adds a strategy to the registry under ``strategy.name``.

    Args:
        strategy: An object implementing :class:`Strategy`.
        overwrite: Replace an existing strategy of the same name.

    Returns:
        The strategy, so this can be used as a class decorator on an instance factory.

    Raises:
        StrategyError: The name is taken (and ``overwrite`` is false) or reserved, or the
            object does not implement the protocol.
    """
    if not isinstance(strategy, Strategy):
        raise StrategyError(
            "hesse.register_strategy: expected an object with name, capabilities, "
            "memory_factor, description, unsupported(), estimate() and describe(), got "
            f"{type(strategy).__name__}."
        )
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


# Cost of one work item in forward passes (product strategies), and fixed costs in
# multiply-add equivalents (Python and dispatch overhead): per vectorised step, and per
# item for strategies that run items one by one.
STEP_OVERHEAD = 2e6


class ProductStrategy:
    """Shared defaults of the product strategies: cost from forward passes per item."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    memory_factor: ClassVar[float]
    description: ClassVar[str]
    passes_per_item: ClassVar[float] = 5.0
    item_overhead: ClassVar[float] = 0.0

    def unsupported(self, problem: Problem, quantity: str, create_graph: bool) -> str | None:
        """Product strategies accept every request."""
        return None

    def estimate(self, problem: Problem, quantity: str) -> float:
        """``B * items * passes * F`` plus overheads (``F``: forward multiply-adds)."""
        from ..quantities import QUANTITIES  # the quantities table imports strategies

        items = QUANTITIES[quantity].items(problem, self)  # type: ignore[arg-type]
        passes = 2.0 if quantity == "jacobian" else self.passes_per_item
        per_item = problem.forward_macs * passes
        overhead = self.item_overhead * items + STEP_OVERHEAD
        return problem.batch * items * per_item + overhead

    def traffic(self, problem: Problem, quantity: str) -> float:
        """Bytes written and read: every pass of every item writes and reads the activations.

        ``2 * B * items * passes * A`` (``A``: bytes autograd saves in one forward of one
        sample) plus the result.
        """
        from ..quantities import QUANTITIES

        items = QUANTITIES[quantity].items(problem, self)  # type: ignore[arg-type]
        passes = 2.0 if quantity == "jacobian" else self.passes_per_item
        result = problem.batch * items * problem.n * problem.x.element_size()
        return 2.0 * problem.batch * items * passes * max(problem.saved_bytes, 1) + result

    def describe(self, problem: Problem, quantity: str) -> str:
        """Nothing to add."""
        return ""
