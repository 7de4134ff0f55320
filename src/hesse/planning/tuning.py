"""Online tuning: the cost model's close calls settled by the clock.

The cost model ranks strategies by multiply-adds, but which one is fastest also depends
on the machine (GEMM rate against memory bandwidth, float32 against float64, CPU against
GPU), so ``strategy="auto"`` times its close candidates on the caller's own work: the
first calls of a repeated request (same module, input shape and dtype, batch size,
quantity, number of outputs and options) run the candidates whose estimates are within
:data:`FACTOR` (6x) of the cheapest, three calls each in a row (the first warms caches
and the allocator up and is not counted); later calls run the one with the shortest
counted time. Every call still computes its full result with one strategy,
so tuning wastes no work; results of different strategies agree to rounding.

Timings on a shared machine drift (other processes, page faults while the heap settles),
so the choice is watched: if its next :data:`WATCH` calls take, at the median, more than
:data:`RETUNE` times what it was timed at, the candidates are timed once more (at most
:data:`MAX_RETUNES` times per request).

Tuning is kept on TorchDynamo's capture of the model (see :mod:`hesse.planning.capture`),
so it lasts as long as the model is unchanged; models that cannot be captured are not
tuned. ``hesse.settings(autotune=False)`` turns it off: ``"auto"`` then always runs the
cheapest estimate. ``Plan.tune`` times the candidates explicitly.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .plan import Tuning

# Multiply-adds miss memory traffic: on a 2-core CPU the row-by-row loop (small, cached
# working sets) ties the structured engine on PINN Hessians estimated 4-5x dearer.
FACTOR = 6.0  # candidates estimated within this factor of the cheapest are timed
WARMUP = 1  # first calls per candidate not counted (allocator and cache warm-up)
TRIALS = 2  # counted calls per candidate (the shortest counts)
MAX_CANDIDATES = 4
WATCH = 3  # calls of the settled choice compared with its timing
RETUNE = 1.5  # ... and re-timed when their median is this much slower
MAX_RETUNES = 1


@dataclass
class Tuner:
    """Timings of the candidates of one repeated request.

    Attributes:
        names: The candidates being timed, cheapest estimate first.
        times: Seconds of every timed call, per candidate.
    """

    names: list[str]
    times: dict[str, list[float]] = field(default_factory=dict)
    watched: list[float] = field(default_factory=list)
    retunes: int = 0

    @property
    def settled(self) -> bool:
        """Whether every candidate has had its warm-up and trials."""
        return all(len(self.times.get(n, ())) >= WARMUP + TRIALS for n in self.names)

    def counted(self, name: str) -> list[float]:
        """The timings of ``name`` after its warm-up calls (all of them if there are no others)."""
        times = self.times.get(name, [])
        return times[WARMUP:] or times

    def watching(self) -> bool:
        """Whether the settled choice's next calls are still being compared with its timing."""
        return self.settled and self.retunes < MAX_RETUNES and len(self.watched) < WATCH

    def best(self) -> str:
        """The candidate with the shortest counted call so far."""
        timed = [n for n in self.names if self.times.get(n)]
        return min(timed, key=lambda n: min(self.counted(n))) if timed else self.names[0]

    def order(self, candidates: Sequence[str]) -> tuple[str, ...]:
        """``candidates`` with the one to run now first (the rest keep their order)."""
        rounds = WARMUP + TRIALS
        pending = [n for n in self.names if len(self.times.get(n, ())) < rounds]
        # one candidate after the other: interleaving would time each in the memory state
        # the others leave behind, not in its own steady state
        first = pending[0] if pending else self.best()
        return (first, *(c for c in candidates if c != first))

    def record(self, name: str, seconds: float) -> None:
        """Adds one timed call of ``name`` (then watches the choice, see the module doc)."""
        if name not in self.names:
            return
        if not self.settled:
            self.times.setdefault(name, []).append(seconds)
        elif name == self.best() and self.watching():
            self.watched.append(seconds)
            if len(self.watched) == WATCH and (
                statistics.median(self.watched) > RETUNE * min(self.counted(name))
            ):
                self.times, self.watched, self.retunes = {}, [], self.retunes + 1

    def drop(self, name: str) -> None:
        """Removes a candidate that failed on this model."""
        if name in self.names and len(self.names) > 1:
            self.names.remove(name)

    def record_of(self) -> Tuning:
        """The timings as an immutable record for plans."""
        state = "timing" if not self.settled else "watching" if self.watching() else "settled"
        times = tuple((n, tuple(self.counted(n))) for n in self.names if self.times.get(n))
        return Tuning(state, times, self.best(), self.retunes)


def settle(call: Callable[[], object], pending: Callable[[], bool], limit: int = 64) -> int:
    """Repeats ``call`` until the tuning it triggers is over (at most ``limit`` calls).

    For timings of the steady state (benchmarks, the demo): the tuning calls are warm-up.

    Args:
        call: One ``strategy="auto"`` call of the repeated request.
        pending: Whether the request's tuning is still going on (timing or watching),
            e.g. ``lambda: hesse.plan(f, x).tuning_pending``.
        limit: Most calls.

    Returns:
        The number of calls made.
    """
    for calls in range(1, limit + 1):  # the first call creates the tuner (if any)
        call()
        if not pending():
            return calls
    return limit


def tuner_for(
    lock: threading.Lock,
    facts: dict,
    key: tuple,
    ordered: Sequence[str],
    costs: dict[str, float],
) -> Tuner | None:
    """The tuner of a repeated request on one capture, or None when there is nothing to tune.

    Args:
        lock: The capture's lock (held while the tuner is created).
        facts: The capture's facts, where the tuner is kept.
        key: The request's key (:meth:`hesse.planning.plan.Request.key`) and settings.
        ordered: Candidates, cheapest estimate first.
        costs: Their estimates.
    """
    if len(ordered) < 2:
        return None
    with lock:
        tuner = facts.get(("tuner", key))
        if tuner is None:
            cheapest = costs[ordered[0]]
            close = [n for n in ordered if costs[n] <= FACTOR * cheapest][:MAX_CANDIDATES]
            tuner = facts[("tuner", key)] = Tuner(close)
    return tuner if len(tuner.names) > 1 else None


def clock(device: torch.device) -> float:
    """Wall time in seconds, after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
