"""Online tuning: the cost model's close calls settled by the clock, within a budget.

The cost model ranks strategies by estimated time, but which one is fastest also depends
on the machine (GEMM rate against memory bandwidth, float32 against float64, CPU against
GPU), so ``strategy="auto"`` times its close candidates on the caller's own work: the
first calls of a repeated request (same module, input shape and dtype, batch size,
quantity, number of outputs and options) run the candidates whose estimates are within
:data:`FACTOR` of the cheapest, :data:`WARMUP` + :data:`TRIALS` calls each in a row (the
warm-up call is not counted); later calls run the one with the shortest counted time.
Every call still computes its full result with one strategy, so tuning wastes no work
beyond the extra time of slower candidates; results of different strategies agree to
rounding.

Tuning pays for itself (the budget):

- *Overhead* is the time timed calls of candidates other than the fastest so far took
  beyond the fastest call measured before them; *work* is the time of every call of the
  request so far. Another candidate, or another
  trial of one, is timed only while overhead <= :data:`OVERHEAD_FRACTION` (20%) of work;
  otherwise the call runs the fastest so far and timing resumes once enough work has
  been done ("paused").
- A candidate whose first timed call is more than :data:`SLOW` (3x) the fastest measured
  is dropped at once (no more trials).
- A candidate is never timed when its estimated peak memory exceeds the budget, nor when
  its estimated time (its cost estimate times the measured seconds per unit of estimate
  of the timed candidates) is more than :data:`SLOW` times the fastest measured call.

Skipped and dropped candidates, with why, and the overhead against the work show in
:class:`~hesse.planning.plan.Tuning` (and so in a plan's printout).

Timings on a shared machine drift (other processes, page faults while the heap settles),
so the choice is watched: if its next :data:`WATCH` calls take, at the median, more than
:data:`RETUNE` times what it was timed at, the candidates are timed once more (at most
:data:`MAX_RETUNES` times per request, under the same budget).

Tuning is kept on TorchDynamo's capture of the model (see :mod:`hesse.planning.capture`),
so it lasts as long as the model is unchanged; models that cannot be captured are not
tuned. ``hesse.settings(autotune=False)`` turns it off: ``"auto"`` then always runs the
cheapest estimate. ``Plan.tune`` times the candidates explicitly, and a tuned plan can be
saved and loaded (:mod:`hesse.planning.saved`) so that a later process does not tune again.
"""

from __future__ import annotations

import contextvars
import math
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .plan import Tuning

FACTOR = 6.0  # candidates estimated within this factor of the cheapest are timed
WARMUP = 1  # first calls per candidate not counted (allocator and cache warm-up)
TRIALS = 2  # counted calls per candidate (the shortest counts)
MAX_CANDIDATES = 4
WATCH = 3  # calls of the settled choice compared with its timing
RETUNE = 1.5  # ... and re-timed when their median is this much slower
MAX_RETUNES = 1
OVERHEAD_FRACTION = 0.2  # tuning overhead allowed, as a fraction of the work so far
SLOW = 3.0  # dropped (measured) or skipped (estimated) beyond this many times the fastest
# Set while settle() runs (per thread and context, so no lock is needed).
_UNBUDGETED: contextvars.ContextVar[bool] = contextvars.ContextVar("unbudgeted", default=False)


@dataclass
class Tuner:
    """Timings of the candidates of one repeated request, and the budget they spend.

    Attributes:
        names: The candidates being timed, cheapest estimate first.
        costs: Their estimates (any unit proportional to time).
        peaks: Their estimated peak memory in bytes (missing: not known).
        budget: The memory budget in bytes (``None``: no limit).
        times: Seconds of every timed call, per candidate.
        skipped: Why a candidate is not (or no longer) timed, per candidate.
        work: Seconds of every call of the request so far.
        overhead: Seconds timed calls took beyond the fastest call measured before them.
    """

    names: list[str]
    costs: Mapping[str, float] = field(default_factory=dict)
    peaks: Mapping[str, float] = field(default_factory=dict)
    budget: float | None = None
    times: dict[str, list[float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    work: float = 0.0
    overhead: float = 0.0
    watched: list[float] = field(default_factory=list)
    retunes: int = 0

    def __post_init__(self) -> None:
        for name in self.names[1:]:  # the first runs anyway: it is the plan's own choice
            peak = self.peaks.get(name)
            if self.budget is not None and peak is not None and peak > self.budget:
                self.skipped[name] = (
                    f"estimated peak {_gb(peak)} over the budget {_gb(self.budget)}"
                )

    def _pending(self) -> list[str]:
        rounds = WARMUP + TRIALS
        return [
            n for n in self.names if n not in self.skipped and len(self.times.get(n, ())) < rounds
        ]

    @property
    def settled(self) -> bool:
        """Whether every candidate has had its trials, or was skipped or dropped."""
        return not self._pending()

    def counted(self, name: str) -> list[float]:
        """The timings of ``name`` after its warm-up calls (all of them if there are no others)."""
        times = self.times.get(name, [])
        return times[WARMUP:] or times

    def fastest(self) -> float | None:
        """The shortest call measured so far, of any candidate (``None``: none yet)."""
        every = [t for ts in self.times.values() for t in ts]
        return min(every) if every else None

    def affordable(self) -> bool:
        """Whether the overhead so far leaves room for another timed call (the 20% rule)."""
        return _UNBUDGETED.get() or self.overhead <= OVERHEAD_FRACTION * self.work

    def watching(self) -> bool:
        """Whether the settled choice's next calls are still being compared with its timing."""
        return self.settled and self.retunes < MAX_RETUNES and len(self.watched) < WATCH

    def best(self) -> str:
        """The candidate with the shortest counted call so far."""
        timed = [n for n in self.names if self.times.get(n) and n not in self.skipped]
        return min(timed, key=lambda n: min(self.counted(n))) if timed else self.names[0]

    def _estimated_too_slow(self, name: str) -> str | None:
        """Why ``name``'s estimated time is too far above the fastest measured call."""
        fastest, cost = self.fastest(), self.costs.get(name)
        rates = [
            min(ts) / self.costs[n]
            for n, ts in self.times.items()
            if ts and self.costs.get(n, 0) > 0 and math.isfinite(self.costs[n])
        ]
        if fastest is None or cost is None or not rates:
            return None
        guess = cost * min(rates)  # the most favourable rate measured: skip only the clear
        if guess > SLOW * fastest:
            return f"estimated {_ms(guess)}, over {SLOW:g}x the fastest measured ({_ms(fastest)})"
        return None

    def next_timed(self) -> str | None:
        """The candidate to time on this call, or ``None`` (settled, or the budget is spent)."""
        if not self.affordable():
            return None
        for name in self._pending():
            if name not in self.times:  # not started yet: its estimate must be close
                why = self._estimated_too_slow(name)
                if why is not None:
                    self.skipped[name] = why
                    continue
            return name
        return None

    def order(self, candidates: Sequence[str]) -> tuple[str, ...]:
        """``candidates`` with the one to run now first (the rest keep their order)."""
        # one candidate after the other: interleaving would time each in the memory state
        # the others leave behind, not in its own steady state
        first = self.next_timed() or self.best()
        return (first, *(c for c in candidates if c != first))

    def record(self, name: str, seconds: float) -> None:
        """Adds one call of ``name`` (then watches the choice, see the module doc)."""
        self.work += seconds
        if name not in self.names or name in self.skipped:
            return
        if not self.settled:
            fastest = self.fastest()
            if fastest is not None and name != self.best():  # the best would run anyway
                self.overhead += max(0.0, seconds - fastest)
            first = name not in self.times
            self.times.setdefault(name, []).append(seconds)
            if first and fastest is not None and seconds > SLOW * fastest:
                self.skipped[name] = (
                    f"first call {_ms(seconds)}, over {SLOW:g}x the fastest ({_ms(fastest)}): "
                    "dropped"
                )
        elif name == self.best() and self.watching():
            self.watched.append(seconds)
            if len(self.watched) == WATCH and (
                statistics.median(self.watched) > RETUNE * min(self.counted(name))
            ):
                self.times, self.watched, self.retunes = {}, [], self.retunes + 1
                self.skipped = {n: why for n, why in self.skipped.items() if "budget" in why}

    def drop(self, name: str) -> None:
        """Removes a candidate that failed on this model."""
        if name in self.names and len(self.names) > 1:
            self.names.remove(name)

    def record_of(self) -> Tuning:
        """The timings as an immutable record for plans."""
        if not self.settled:
            state = "timing" if self.affordable() else "paused"
        else:
            state = "watching" if self.watching() else "settled"
        times = tuple((n, tuple(self.counted(n))) for n in self.names if self.times.get(n))
        skipped = tuple((n, why) for n, why in self.skipped.items() if n in self.names)
        return Tuning(state, times, self.best(), self.retunes, skipped, self.work, self.overhead)


def _ms(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 else f"{1e3 * seconds:.3g} ms"


def _gb(size: float) -> str:
    from .memory import format_bytes

    return format_bytes(int(size)) if math.isfinite(size) else "more than fits"


def settle(call: Callable[[], object], pending: Callable[[], bool], limit: int = 64) -> int:
    """Repeats ``call`` until the tuning it triggers is over (at most ``limit`` calls).

    For timings of the steady state (benchmarks, the demo): the tuning calls are warm-up,
    so the 20% rule is lifted while it runs (slow and over-budget candidates are still
    dropped or skipped).

    Args:
        call: One ``strategy="auto"`` call of the repeated request.
        pending: Whether the request's tuning is still going on (timing or watching),
            e.g. ``lambda: hesse.plan(f, x).tuning_pending``.
        limit: Most calls.

    Returns:
        The number of calls made.
    """
    token = _UNBUDGETED.set(True)
    try:
        for calls in range(1, limit + 1):  # the first call creates the tuner (if any)
            call()
            if not pending():
                return calls
        return limit
    finally:
        _UNBUDGETED.reset(token)


def tuner_for(
    lock: threading.Lock,
    facts: dict,
    key: tuple,
    ordered: Sequence[str],
    costs: Mapping[str, float],
    peaks: Callable[[Sequence[str]], dict[str, float]] | None = None,
    budget: float | None = None,
) -> Tuner | None:
    """The tuner of a repeated request on one capture, or None when there is nothing to tune.

    Args:
        lock: The capture's lock (held while the tuner is created).
        facts: The capture's facts, where the tuner is kept.
        key: The request's key (:meth:`hesse.planning.plan.Request.key`) and settings.
        ordered: Candidates, cheapest estimate first.
        costs: Their estimates.
        peaks: Estimated peak bytes of the close candidates (called once, when the tuner
            is created).
        budget: The memory budget in bytes.
    """
    if len(ordered) < 2:
        return None
    with lock:
        tuner = facts.get(("tuner", key))
    if tuner is None:
        cheapest = costs[ordered[0]]
        close = [n for n in ordered if costs[n] <= FACTOR * cheapest][:MAX_CANDIDATES]
        # sized outside the lock: the estimates read facts kept under it
        sizes = peaks(close) if peaks is not None and len(close) > 1 else {}
        with lock:
            tuner = facts.setdefault(("tuner", key), Tuner(close, dict(costs), sizes, budget))
    return tuner if len(tuner.names) > 1 else None


def clock(device: torch.device) -> float:
    """Wall time in seconds, after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
