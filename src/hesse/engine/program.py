"""Derivative programs: the engine's whole pass for one request, written once as an FX graph.

The engine interprets the captured graph op by op (:mod:`.tangents`, :mod:`.modes`): fine
for one call, but a training loop or a benchmark calls the same request thousands of
times. For those, :func:`emit` traces the pass once with ``make_fx`` on concrete shapes:
tangents, adjoints (the backward ops autograd would run, written out) and the per-layer
Gram, sweep or Taylor terms become one ``torch.fx.GraphModule`` of ATen ops, a pure
function of the graph's inputs (parameters, buffers, closed-over tensors) and ``x``.

- Running it is one call, with no per-op Python interpretation.
- It is ordinary torch code: run under ``no_grad`` it keeps no graph; run with grad
  enabled, its result keeps a graph to ``x`` and to the weights (``create_graph=True``),
  but only where no op of the trace reads an ``aten.detach`` (:attr:`Program.cuts_gradients`).
  ``make_fx`` writes the adjoints' backward ops out with a ``detach`` wherever autograd
  unpacks a saved *output* (``tanh``'s backward reads ``tanh(a)``): harmless for values,
  but differentiating such a program drops every term through that saved output (d/dx of
  a tanh MLP's Hessian came out 8-130% off). Taylor-mode programs have no backward pass and
  no such ``detach``; a model's own ``.detach()`` shows the same way, so it counts too.
- It can be compiled whole by ``torch.compile``; :mod:`.compiling` decides when that pays
  (``hesse.settings(compile=...)``).

A program is specific to everything it was traced with: the capture (its guards), the
sub-batch shape, dtype and device, the quantity, the selected outputs and the engine mode.
It is kept on the capture under exactly that key (see
:class:`hesse.strategies.structured.Structured`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ..settings import settings
from .graph import Graph
from .modes import structured_pass


@dataclass(frozen=True)
class Program:
    """One request's derivative pass as a graph of ATen ops.

    Attributes:
        run: The traced ``GraphModule``, mapping ``(inputs, x)`` to the arrays in the
            order of :attr:`keys`.
        keys: Names of the arrays it returns (``"hessian"``, ``"diag"``, ...).
        nodes: Number of ops in it.
        cuts_gradients: An op reads an ``aten.detach``: its values are right, but its result
            must not be differentiated (see the module doc); ``create_graph=True`` requests
            interpret instead.
    """

    run: torch.fx.GraphModule
    keys: tuple[str, ...]
    nodes: int
    cuts_gradients: bool = False

    def __call__(
        self,
        inputs: tuple,
        x: torch.Tensor,
        differentiable: bool,
        run: Callable[..., Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The arrays for ``x`` ``(s, n)``; differentiable when asked (grad enabled).

        Args:
            inputs: The graph's inputs now.
            x: The flat sub-batch ``(s, n)``.
            differentiable: Run with grad enabled (the result keeps a graph).
            run: A compiled form of :attr:`run` to call instead.
        """
        with torch.enable_grad() if differentiable else torch.no_grad():
            out = (self.run if run is None else run)(list(inputs), x)
        return dict(zip(self.keys, out, strict=True))


def emit(
    graph: Graph,
    inputs: tuple,
    x: torch.Tensor,
    to_model: Callable[[torch.Tensor], torch.Tensor],
    batch: int,
    index: torch.Tensor | None,
    want: frozenset[str],
    mode: str,
) -> Program:
    """Traces the engine's pass for one request into a :class:`Program`.

    Args:
        graph: The captured model (at this sub-batch's shape).
        inputs: The graph's inputs now (only their shapes and dtypes are baked in).
        x: The flat sub-batch ``(s, n)`` (only its shape and dtype are baked in).
        to_model: Reshapes ``(s, n)`` to the model's layout.
        batch: ``s`` when batched, 1 for a single sample.
        index: The selected outputs (baked in).
        want: The arrays to compute (see :func:`.modes.structured_pass`).
        mode: The engine mode.

    Raises:
        Exception: Whatever tracing raises (the caller then keeps interpreting).
    """
    keys = tuple(sorted(want))

    def body(values: list, xx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = structured_pass(
            graph, tuple(values), xx, to_model, batch, index, want, mode, differentiable=True
        )
        return tuple(out[k] for k in keys)

    with settings(compile=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = make_fx(body, tracing_mode="real")(list(inputs), x.detach())
    calls = [n for n in module.graph.nodes if n.op == "call_function"]
    # make_fx also records an unused ``detach`` where autograd saves an output; only a
    # ``detach`` whose value is read cuts a gradient path
    cuts = any(n.target is torch.ops.aten.detach.default and n.users for n in calls)
    # the model's no_grad regions run without autograd while tracing, and leave no mark in
    # the trace: run with grad enabled, the program would differentiate through them
    cuts = cuts or any(step.constant for step in graph.steps)
    return Program(module, keys, len(calls), cuts)
