"""Plans: what a call will run, printable, callable, and tunable.

A :class:`Plan` is immutable. It records the request (quantity and options), what it was
derived from (TorchDynamo's capture of the model, see :mod:`hesse.planning.capture`), the
strategy and candidates with their estimates, the block schedule and the memory budget,
and its tuning. Calling it computes the quantity for a new input of the same shape::

    p = hesse.plan(model, x, "laplacian", batched=True)
    print(p)            # strategy, estimates, steps, memory, why
    lap = p(x)          # as hesse.laplacian(model, x, batched=True)
    p = p.tune(x)       # times the close candidates, returns the plan with the fastest
    lap = p(x_next)

When the model changed since the plan was made (a guard of its capture fails), the call
plans again from the current model: a plan never runs on a stale view of the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from .memory import format_bytes

if TYPE_CHECKING:
    from .capture import Capture


@dataclass(frozen=True)
class Request:
    """What the caller asked for.

    Attributes:
        api: The public call, e.g. ``"hesse.hessian"``.
        quantity: ``"hessian"``, ``"jacobian"``, ``"hessian_diag"``, ``"laplacian"``,
            ``"hvp"`` or ``"derivatives"``.
        output: The ``output=`` selection (as given).
        batched: Whether the first dimension of ``x`` holds independent samples.
        flat: Matrix layout of the result.
        strategy: ``"auto"`` or a strategy's name.
        chunk_size: Work items per step (``None``: as the budget allows).
        max_memory: The budget as given.
        create_graph: Keep the result differentiable.
        progress: Show a progress bar.
        args: Fixed extra positional arguments of ``f`` after ``x`` (not differentiated).
        kwargs: Fixed keyword arguments of ``f``.
    """

    api: str
    quantity: str
    output: Any = None
    batched: bool = False
    flat: bool = False
    strategy: str = "auto"
    chunk_size: int | None = None
    max_memory: int | float | str | None = None
    create_graph: bool = False
    progress: bool = False
    args: Any = field(default=(), compare=False, repr=False)
    kwargs: Any = field(default=None, compare=False, repr=False)

    def key(self, index: torch.Tensor | None) -> tuple:
        """What identifies a repeated request on one capture (tuning is kept per key)."""
        selected = None if index is None else tuple(index.tolist())
        return (
            self.quantity,
            selected,
            self.strategy,
            self.chunk_size,
            str(self.max_memory),
            self.create_graph,
        )


@dataclass(frozen=True)
class Chunking:
    """The block schedule of one strategy.

    Attributes:
        items: Work items per sample (Hessian rows over all selected outputs, ...).
        samples_per_step: Samples per vectorised step.
        rows_per_step: Work items per vectorised step.
        steps: Number of steps.
        result_bytes: Size of the result.
        step_bytes: Estimated working memory of one step.
        budget_bytes: The memory budget used to size the steps.
        why: Why these steps.
    """

    items: int
    samples_per_step: int
    rows_per_step: int
    steps: int
    result_bytes: int
    step_bytes: int
    budget_bytes: int
    why: str

    @property
    def peak_bytes(self) -> int:
        """Estimated peak: the result plus one step's working set."""
        return self.result_bytes + self.step_bytes


@dataclass(frozen=True)
class Tuning:
    """The timings behind a plan's choice, and what tuning cost.

    Attributes:
        state: ``"timing"`` (candidates are being timed on the calls), ``"paused"``
            (timing waits until its overhead is back within 20% of the work done),
            ``"watching"`` (the choice's next calls are compared with its timing), or
            ``"settled"``.
        times: Seconds of the counted calls of every timed candidate.
        best: The fastest candidate so far.
        retunes: How often the candidates were timed again (the choice ran slower).
        skipped: ``(candidate, why)`` of those not timed, or dropped after one call.
        work: Seconds of every call of the request so far.
        overhead: Seconds timed calls took beyond the fastest call measured before them.
    """

    state: str
    times: tuple[tuple[str, tuple[float, ...]], ...]
    best: str
    retunes: int = 0
    skipped: tuple[tuple[str, str], ...] = ()
    work: float = 0.0
    overhead: float = 0.0

    @property
    def pending(self) -> bool:
        """Whether calls still time or watch (the demo and benchmarks wait for this)."""
        return self.state != "settled"

    def __str__(self) -> str:
        parts = [f"{name} {1e3 * min(ts):.3g} ms" for name, ts in self.times if ts]
        head = {
            "timing": "timing",
            "paused": "paused (overhead over 20% of the work so far)",
            "watching": f"settled on {self.best} (watching the choice)",
        }
        state = head.get(self.state, f"settled on {self.best}")
        again = f" (timed again {self.retunes}x: the choice ran slower)" if self.retunes else ""
        text = f"{state}{again}" + (": " + ", ".join(parts) if parts else "")
        text += "".join(f"; skipped {name}: {why}" for name, why in self.skipped)
        if self.work > 0:
            share = self.overhead / self.work
            text += f"; overhead {self.overhead:.3g} s of {self.work:.3g} s work ({share:.0%})"
        return text


@dataclass(frozen=True)
class Plan:
    """What a call runs: strategy, steps, memory estimates and why.

    Attributes:
        request: The request it answers.
        model: The caller's model or function.
        strategy: The strategy that runs first.
        candidates: Strategies ``"auto"`` would try, in order.
        costs: Estimated seconds of the candidates (the cost model's ranking).
        work: ``(strategy, multiply-adds, bytes moved)`` behind each estimate.
        batch: Number of samples ``B``.
        n: Inputs per sample.
        m: Selected outputs per sample.
        chunks: The block schedule of :attr:`strategy`.
        reason: Why this strategy and these steps.
        estimates: ``(strategy, estimated cost or why it declined)`` for every candidate.
        failed: ``(strategy, error)`` of candidates skipped because they failed on this
            model before.
        captured: Whether TorchDynamo captured the model (the plan is then kept, with its
            tuning, for as long as the capture's guards hold).
        capture_note: Why the model was not captured (``None`` if it was).
        tuning: The timings behind the choice (``None``: not tuned).
        pinned: Calls run :attr:`strategy` (``tune`` returns pinned plans) rather than
            the online choice of ``"auto"``.
        ran: The strategy the last call of this request ran, if any.
        program: How the structured engine runs the request (interpreted, or as a
            derivative program, compiled or not), when it is the strategy.
        input: ``(shape, dtype, device type)`` of the input it was made for (saved plans).
        anchor: The capture it was derived from (internal).
    """

    request: Request
    model: Callable[..., Any] = field(repr=False)
    strategy: str
    candidates: tuple[str, ...]
    costs: tuple[tuple[str, float], ...]
    batch: int
    n: int
    m: int
    chunks: Chunking
    reason: str
    estimates: tuple[tuple[str, str], ...] = ()
    work: tuple[tuple[str, float, float], ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    captured: bool = False
    capture_note: str | None = None
    tuning: Tuning | None = None
    pinned: bool = False
    ran: str | None = None
    program: str | None = None
    input: tuple[tuple[int, ...], str, str] | None = None
    anchor: Capture | None = field(default=None, repr=False, compare=False)

    # the block schedule, flat (for printing and for the driver)
    @property
    def quantity(self) -> str:
        """The quantity it computes."""
        return self.request.quantity

    @property
    def api(self) -> str:
        """The public call."""
        return self.request.api

    @property
    def items(self) -> int:
        """Work items per sample."""
        return self.chunks.items

    @property
    def samples_per_step(self) -> int:
        """Samples per step."""
        return self.chunks.samples_per_step

    @property
    def rows_per_step(self) -> int:
        """Work items per step."""
        return self.chunks.rows_per_step

    @property
    def steps(self) -> int:
        """Number of steps."""
        return self.chunks.steps

    @property
    def result_bytes(self) -> int:
        """Size of the result."""
        return self.chunks.result_bytes

    @property
    def step_bytes(self) -> int:
        """Estimated working memory of one step."""
        return self.chunks.step_bytes

    @property
    def budget_bytes(self) -> int:
        """The memory budget."""
        return self.chunks.budget_bytes

    @property
    def peak_bytes(self) -> int:
        """Estimated peak: the result plus one step's working set."""
        return self.chunks.peak_bytes

    def __call__(self, x: torch.Tensor, v: torch.Tensor | None = None) -> Any:
        """Computes the plan's quantity at ``x`` (``v``: the direction of an ``hvp``).

        Returns what the public function of :attr:`quantity` returns for ``x``. When the
        model changed since the plan was made, the call plans again.
        """
        from ..front import run  # the front runs plans; plans are made by the front

        return run(self.request, self.model, x, v, pinned=self if self.pinned else None)

    def tune(self, x: torch.Tensor, v: torch.Tensor | None = None, rounds: int = 3) -> Plan:
        """Times every candidate on ``x`` and returns the plan pinned to the fastest.

        Args:
            x: An input of the plan's shape.
            v: The direction, for ``hvp`` plans.
            rounds: Timed calls per candidate (the first one warms up and is not counted).

        Returns:
            The pinned plan, its :attr:`tuning` holding the timings.
        """
        from ..front import tune

        return tune(self, x, v, rounds)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the plan's choice to a small JSON file, for :func:`hesse.load_plan`.

        The file holds the strategy, its steps, the tuning times, the versions and a
        fingerprint of the model structure, input, options and device type (see
        :mod:`hesse.planning.saved`); a training script or a cluster job loads it instead
        of tuning again.

        Raises:
            PlanMismatchError: The plan was not made by ``hesse.plan`` or ``Plan.tune``
                (it does not know its input).
            OutputWriteError: The file cannot be written.
        """
        from ..errors import PlanMismatchError
        from ..settings import settings
        from .saved import fingerprint_parts, save_plan

        if self.input is None:
            raise PlanMismatchError(
                "hesse.Plan.save: expected a plan made by hesse.plan(...) or Plan.tune, got "
                "one that does not record its input; make it with hesse.plan and save that."
            )
        parts = fingerprint_parts(self.model, self.input, self.request, settings.current().compile)
        save_plan(self, path, parts)

    def with_strategy(self, name: str, chunks: Chunking) -> Plan:
        """The same plan running ``name`` first."""
        rest = tuple(c for c in self.candidates if c != name)
        return replace(self, strategy=name, candidates=(name, *rest), chunks=chunks)

    def __str__(self) -> str:
        call = self.api if self.quantity in self.api else f"{self.api} ({self.quantity})"
        rows = [
            ("call", call),
            (
                "strategy",
                self.strategy
                + (
                    f" (last call ran {self.ran})" if self.ran and self.ran != self.strategy else ""
                ),
            ),
            ("problem", f"B={self.batch} samples, n={self.n} inputs, m={self.m} outputs"),
            ("work", f"{self.items} items per sample, {self.batch * self.items} in all"),
            ("step", f"{self.samples_per_step} samples x {self.rows_per_step} items"),
            ("steps", str(self.steps)),
            ("result", format_bytes(self.result_bytes)),
            ("peak (est.)", format_bytes(self.peak_bytes)),
            ("budget", format_bytes(self.budget_bytes)),
            (
                "capture",
                "TorchDynamo graph (guarded)" if self.captured else f"none: {self.capture_note}",
            ),
            ("why", self.reason),
        ]
        rows += [(f"  {name}", note) for name, note in self.estimates]
        if self.tuning is not None:
            rows.append(("tuning", str(self.tuning)))
        if self.program:
            rows.append(("program", self.program))
        width = max(len(k) for k, _ in rows)
        return "hesse plan\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
