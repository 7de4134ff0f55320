"""Whether a derivative program runs compiled: ``hesse.settings(compile=...)``.

A :class:`~.program.Program` is plain ATen code, so ``torch.compile`` (inductor) can fuse it
whole, its backward included when it runs with grad enabled (training). Compiling costs
seconds; a training loop calls the same program thousands of times. One
:class:`CompiledRunner` per program (per capture and request, see
:mod:`hesse.strategies.structured`) decides:

- ``compile=False``: always eager.
- ``compile=True``: compiled from the program's first call.
- ``compile="auto"`` (the default): the ski-rental rule. The program runs eagerly, timed.
  Once the time that compiling would have saved so far reaches what compiling costs,
  ``calls * t_eager * saved >= C``, it compiles, then times a few compiled calls and keeps
  the faster of the two. ``C`` is estimated per ATen op of the program and ``saved`` is
  the fraction of a call that compiling saves: conservative constants until this process
  has compiled a program, then the measured values. The rule never spends more than twice
  what the best choice in hindsight would have spent on compiling; a test suite that calls
  a plan a handful of times never compiles.

A compile that fails (no C++ compiler, an unsupported op) warns once per program and runs
that program eagerly from then on; other programs still try. The backward of a compiled
program cannot be differentiated again, so ``"auto"`` keeps a training program eager when
``x`` requires grad (a loss that differentiates the result to ``x`` twice); with ``x`` not
requiring grad, only a second backward through the weights would fail, which PINN training
does not do.

Under ``create_graph=True`` (training) a call's cost includes its backward, which compiling
fuses too: the runner times one backward of the eager program (before the rule first
decides) and of the compiled one (on its first call, which compiles the backward, and its
last timed call), with ``autograd.grad`` into nothing and the graph retained for the
caller's own backward.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import HesseWarning
from .program import Program

MIN_CALLS = 3  # eager calls timed before the rule may compile
TRIALS = 3  # compiled calls timed before keeping the faster
SAVED = 0.3  # fraction of a call's time compiling saves, until measured
SECONDS_PER_OP = 0.2  # compile seconds per ATen op of a program, until measured


@dataclass
class _Learned:
    """What this process measured of compiling (written under :data:`_LOCK`)."""

    seconds_per_op: list[float] = field(default_factory=list)
    saved: list[float] = field(default_factory=list)


_LOCK = threading.Lock()
_LEARNED = _Learned()


def compile_seconds(ops: int) -> float:
    """Estimated seconds to compile a program of ``ops`` ATen ops."""
    with _LOCK:
        rate = max(_LEARNED.seconds_per_op) if _LEARNED.seconds_per_op else SECONDS_PER_OP
    return ops * rate


def expected_saving() -> float:
    """Fraction of a call's time compiling is expected to save (in ``[0.05, 0.9]``)."""
    with _LOCK:
        saved = statistics.median(_LEARNED.saved) if _LEARNED.saved else SAVED
    return min(0.9, max(0.05, saved))


def _learn(ops: int, seconds: float, saved: float | None) -> None:
    with _LOCK:
        _LEARNED.seconds_per_op.append(max(seconds, 0.0) / max(ops, 1))
        if saved is not None:
            _LEARNED.saved.append(saved)


def _clock(x: torch.Tensor) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


_ONCE_DIFFERENTIABLE = (
    "x requires grad, and the backward of a compiled program cannot itself be differentiated "
    "(a gradient of the result to x with create_graph=True would fail); compile=True forces it"
)


@contextlib.contextmanager
def _no_donated_buffers() -> Iterator[None]:
    """AOTAutograd without donated buffers, compiled afresh.

    Without donated buffers the backward can run with ``retain_graph=True``. Inductor's
    on-disk caches were seen to hand back a backward that reuses saved buffers (wrong
    gradients on a second backward), so hesse's compiles skip them.
    """
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    with (
        functorch_config.patch(donated_buffer=False, enable_autograd_cache=False),
        inductor_config.patch(fx_graph_cache=False),
    ):
        yield


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


class CompiledRunner:
    """Runs one :class:`~.program.Program` eagerly or compiled, as ``compile`` says.

    Args:
        program: The derivative program.
        compile: ``True``, ``False`` or ``"auto"`` (see the module docstring).
        differentiable: Whether its calls keep a graph (the program is timed and compiled
            for that grad mode only).
    """

    def __init__(self, program: Program, compile: bool | str, differentiable: bool):
        self.program = program
        self.setting = compile
        self.differentiable = differentiable
        self._lock = threading.Lock()
        self._state = "compile" if compile is True else "eager"
        self._compiled: Callable[..., Any] | None = None
        self._eager: list[float] = []  # seconds per eager call
        self._compile_seconds = 0.0
        self._trials: list[float] = []  # seconds per compiled call
        self._backward = {"eager": 0.0, "compiled": 0.0}  # seconds of one backward
        self._why = ""

    @property
    def compiled(self) -> bool:
        """Whether its calls run the compiled program now."""
        return self._state in ("timing", "compiled")

    def __call__(self, inputs: tuple, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The program's arrays for ``x`` ``(s, n)`` (see :meth:`.program.Program.__call__`)."""
        # a result to x that may be differentiated twice: "auto" never runs it compiled,
        # even where this program was compiled on calls whose x did not require grad
        twice = self.setting == "auto" and self.differentiable and x.requires_grad
        with self._lock:
            state = self._state
            if state == "compile" and not twice:
                self._state = "compiling"  # one thread compiles; the others run eagerly
        if state in ("compile", "timing", "compiled") and not twice:
            out = self._run_compiled(inputs, x, first=state == "compile")
            if out is not None:
                return out
        if twice:
            if state == "eager":
                self._keep_eager(_ONCE_DIFFERENTIABLE)
            return self.program(inputs, x, self.differentiable)
        start = _clock(x)
        out = self.program(inputs, x, self.differentiable)
        if state == "eager" and self.setting == "auto":
            seconds = _clock(x) - start
            if len(self._eager) == MIN_CALLS - 1:  # once, before the rule first decides
                self._backward["eager"] = self._time_backward(inputs, x, out)
            self._time_eager(seconds)
        return out

    def _keep_eager(self, why: str) -> None:
        with self._lock:
            self._state, self._why = "kept eager", why

    def _time_backward(self, inputs: tuple, x: torch.Tensor, out: dict) -> float:
        """Seconds of one backward of ``out`` (0 when it keeps no graph).

        The gradients go nowhere (``autograd.grad`` with the graph retained for the
        caller's own backward): the program's per-call cost under ``create_graph=True``
        includes its backward, which compiling speeds up too.
        """
        if not self.differentiable:
            return 0.0
        leaves = [t for t in (*inputs, x) if isinstance(t, torch.Tensor) and t.requires_grad]
        outs = [o.sum() for o in out.values() if o.requires_grad]
        if not leaves or not outs:
            return 0.0
        if any(getattr(t, "_backward_hooks", None) for t in leaves):
            return 0.0  # the caller's gradient hooks would see this throwaway backward
        start = _clock(x)
        torch.autograd.grad(sum(outs), leaves, retain_graph=True, allow_unused=True)
        return _clock(x) - start

    def _run_compiled(
        self, inputs: tuple, x: torch.Tensor, first: bool
    ) -> dict[str, torch.Tensor] | None:
        """The compiled call, or ``None`` after a failure (warned once; eager from then on)."""
        start = _clock(x)
        try:
            if first:
                self._compiled = torch.compile(self.program.run, dynamic=False, fullgraph=True)
            last = len(self._trials) == TRIALS - 1
            with _no_donated_buffers():  # the backward may then run with retain_graph
                out = self.program(inputs, x, self.differentiable, run=self._compiled)
                if first or last:  # its first backward compiles the backward
                    self._backward["compiled"] = self._time_backward(inputs, x, out)
        except Exception as exc:  # no C++ compiler, unsupported op, recompile limit, ...
            self._fail(exc)
            return None
        seconds = _clock(x) - start - (self._backward["compiled"] if last else 0.0)
        with self._lock:
            if first:
                self._first_compiled(seconds)
            elif self._state == "timing":
                self._time_compiled(seconds)
        return out

    def _time_eager(self, seconds: float) -> None:
        """Records an eager call; starts compiling when the ski-rental rule says it pays."""
        with self._lock:
            if self._state != "eager":
                return
            self._eager.append(seconds)
            if len(self._eager) < MIN_CALLS:
                return
            per_call = statistics.median(self._eager) + self._backward["eager"]
            spent = len(self._eager) * per_call
            if spent * expected_saving() >= compile_seconds(self.program.nodes):
                self._state = "compile"

    def _first_compiled(self, seconds: float) -> None:
        eager = statistics.median(self._eager) if self._eager else 0.0
        eager += self._backward["eager"]  # ``seconds`` includes a backward (compiled)
        self._why = f"compiled in {seconds - eager:.3g} s"
        if self.setting is True:
            self._state = "compiled"
            _learn(self.program.nodes, seconds - eager, None)
            return
        self._compile_seconds = seconds - eager
        self._state = "timing"

    def _time_compiled(self, seconds: float) -> None:
        self._trials.append(seconds)
        if len(self._trials) < TRIALS:
            return
        eager = min(self._eager) + self._backward["eager"]
        compiled = min(self._trials) + self._backward["compiled"]
        saved = 1.0 - compiled / eager
        _learn(self.program.nodes, self._compile_seconds, saved)
        times = f"{_ms(compiled)} compiled against {_ms(eager)} eager"
        if self._backward["eager"]:
            times += ", each with one backward"
        self._state = "compiled" if compiled < eager else "kept eager"
        self._why = f"after {len(self._eager)} eager calls; {self._why}; {times}"

    def _fail(self, exc: Exception) -> None:
        text = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
        with self._lock:
            first = self._state != "failed"
            self._state, self._why = "failed", f"torch.compile failed ({reason})"
        if first:
            warnings.warn(
                f"hesse: torch.compile of a derivative program failed ({reason}); this "
                "program runs eagerly from now on (hesse.settings(compile=False) skips "
                "compiling).",
                HesseWarning,
                stacklevel=2,
            )

    def note(self) -> str:
        """Whether the program runs compiled, and why (for ``Plan.program``)."""
        with self._lock:
            state, why, eager = self._state, self._why, list(self._eager)
        if state == "compiled":
            why = why if self.setting == "auto" else f"settings(compile=True), {why}"
            return f"compiled whole by torch.compile ({why})"
        if state in ("kept eager", "failed"):
            return f"not compiled ({why})"
        if state in ("compile", "compiling", "timing"):
            return "compiling whole by torch.compile (timing it against eager)"
        if self.setting is False:
            return "not compiled (settings(compile=False))"
        return f"not compiled yet ({self._pays_after(eager)})"

    def _pays_after(self, eager: list[float]) -> str:
        cost = compile_seconds(self.program.nodes)
        if len(eager) < MIN_CALLS:
            return f"timing {MIN_CALLS} eager calls, then compiled when it pays"
        t = statistics.median(eager) + self._backward["eager"]
        calls = cost / (t * expected_saving())
        return (
            f"{len(eager)} calls of {_ms(t)}; compiling, estimated at {cost:.3g} s, pays "
            f"after ~{calls:.0f} calls at {expected_saving():.0%} saved"
        )
