"""Guarded capture: the model's graph from TorchDynamo, valid exactly as long as its guards.

A captured graph is only right while everything it was derived from is unchanged:
submodules, Python attributes that ``forward`` reads, branches, globals and closures,
hooks, training flags. hesse does not keep its own cache of graphs keyed on the model
object (that cannot see such changes). It asks TorchDynamo, which tracks exactly this:

``torch.compile(lambda f, x: f(x), backend=<hesse's>, fullgraph=True, dynamic=False)`` is
called with the model and the input (one compiled function for every model: the model is an
input that TorchDynamo guards). On the first call, and whenever a guard fails, TorchDynamo
hands the backend a new FX graph; the backend builds the engine's
:class:`~hesse.engine.graph.Graph` from it and returns a stub. On every call the stub
receives the graph's current inputs (the input, parameters, buffers and closed-over tensors,
so in-place weight updates need no re-capture) and hands them to hesse instead of running
the model. The stub's :class:`Capture` is the *anchor* of everything derived from the model:
probes, cost estimates, plans and tuning are kept on it and die with it.

TorchDynamo's settings are patched for hesse's calls only, under a lock: forward hooks
are guarded (``skip_nnmodule_hook_guards=False``), and the recompile limits are raised
so that many models (or many changes) in one process keep being captured; a model that
TorchDynamo still runs eagerly is treated like one that cannot be captured.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.graph import CaptureError, Graph, build_graph
from .refusals import known_refusal, remember_refusal

_LOCK = threading.RLock()
_LOCAL = threading.local()
_RECOMPILE_LIMIT = 1 << 20


@dataclass(eq=False)
class Capture:
    """One TorchDynamo capture of a model at one input shape.

    Attributes:
        graph: The engine's graph, or why the engine cannot run it.
        facts: What hesse derived from this capture (probes, estimates, plans): valid as
            long as the capture. Written under :attr:`lock`.
        lock: Guards :attr:`facts`.
    """

    graph: Graph | CaptureError
    facts: dict[Any, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, key: Any) -> int:
        """Counts a call of ``key`` on this capture; returns the count so far."""
        with self.lock:
            self.facts[key] = self.facts.get(key, 0) + 1
            return self.facts[key]

    def resolve(self, index: int) -> None:
        """Fixes the graph's output: result ``index`` is what the model returns."""
        with self.lock:
            if "output_index" in self.facts:
                return
            self.facts["output_index"] = index
            if isinstance(self.graph, Graph):
                try:
                    self.graph = self.graph.returning(index)
                except CaptureError as exc:
                    self.graph = exc

    def fact(self, key: Any, derive: Callable[[], Any]) -> Any:
        """The fact ``key``, derived once per capture."""
        with self.lock:
            if key in self.facts:
                return self.facts[key]
        value = derive()
        with self.lock:
            return self.facts.setdefault(key, value)


@dataclass(frozen=True)
class Bound:
    """A capture with the values its graph reads at this call.

    Attributes:
        capture: The capture (the anchor).
        inputs: Current values of the graph's placeholders.
    """

    capture: Capture
    inputs: tuple[Any, ...]

    @property
    def graph(self) -> Graph:
        """The engine's graph.

        Raises:
            CaptureError: The engine cannot run this model.
        """
        graph = self.capture.graph
        if isinstance(graph, CaptureError):
            raise graph
        return graph


class _Request:
    def __init__(self, x: torch.Tensor):
        self.x = x
        self.found: list[tuple[Capture, tuple[Any, ...], tuple[torch.Tensor, ...]]] = []


def _backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """TorchDynamo backend: builds the graph once per capture and returns the stub."""
    request: _Request | None = getattr(_LOCAL, "request", None)
    position = -1
    if request is not None:
        position = next((i for i, a in enumerate(example_inputs) if a is request.x), -1)
    try:
        graph: Graph | CaptureError = build_graph(gm, position)
    except CaptureError as exc:
        graph = exc
    except Exception as exc:  # anything unexpected in the graph: the engine declines
        graph = CaptureError(f"{type(exc).__name__}: {exc}")
    capture = Capture(graph)
    outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    count = len(outputs) if isinstance(outputs, (tuple, list)) else 1

    def stub(*args: Any) -> Any:
        current: _Request | None = getattr(_LOCAL, "request", None)
        if current is None:  # called outside hesse: behave as the model
            return gm(*args)
        markers = tuple(torch.empty(0) for _ in range(count))  # tell the results apart
        current.found.append((capture, args, markers))
        return markers

    return stub


def _call(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Any:
    """What TorchDynamo captures: ``f(x)``, with ``f`` an input it guards."""
    return f(x)


_COMPILED: list[Callable[..., Any]] = []  # torch.compile(_call, ...), made on first use


def _compiled_call() -> Callable[..., Any]:
    if not _COMPILED:
        _COMPILED.append(torch.compile(_call, backend=_backend, fullgraph=True, dynamic=False))
    return _COMPILED[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def capture(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Bound:
    """Captures ``f`` at ``x``'s shape (or finds the capture whose guards hold).

    Args:
        f: The caller's model or function, called as ``f(x)``.
        x: An input in the model's own layout; its values are not used beyond tracing.

    Returns:
        The capture with the values its graph reads now.

    Raises:
        CaptureError: TorchDynamo cannot capture ``f`` as one graph (graph breaks,
            unsupported code) or the engine cannot run it.
    """
    if isinstance(f, torch.jit.ScriptModule | torch.jit.ScriptFunction):
        raise CaptureError("TorchScript is not captured")
    import torch._dynamo as dynamo  # imported on first use: it takes a while

    request = _Request(x.detach())
    with _LOCK:
        _LOCAL.request = request
        try:
            with (
                dynamo.config.patch(
                    skip_nnmodule_hook_guards=False,
                    recompile_limit=_RECOMPILE_LIMIT,
                    accumulated_recompile_limit=_RECOMPILE_LIMIT,
                ),
                warnings.catch_warnings(),
            ):  # the model's own warnings show in its calls
                warnings.simplefilter("ignore")
                returned = _compiled_call()(f, request.x)
        except Exception as exc:
            raise CaptureError(
                f"TorchDynamo could not capture the model ({_first_line(exc)})"
            ) from None
        finally:
            _LOCAL.request = None
    if len(request.found) != 1:
        raise CaptureError("TorchDynamo ran the model without a graph")
    found, inputs, markers = request.found[0]
    index = next((i for i, m in enumerate(markers) if m is returned), None)
    if index is None:
        raise CaptureError("the model does not return one tensor of its graph")
    found.resolve(index)
    return Bound(found, inputs)


def try_capture(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Bound | str:
    """:func:`capture`, or the reason it failed.

    A refusal is not tried again while the model's structure is unchanged (see
    :mod:`.refusals`).
    """
    known = known_refusal(f, x)
    if known is not None:
        return known
    try:
        return capture(f, x)
    except CaptureError as exc:
        remember_refusal(f, x, str(exc))
        return str(exc)
