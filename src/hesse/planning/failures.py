"""Which strategies failed on a model: one home for the planner and the driver.

Kept on the model's capture (see :mod:`.capture`), or, for a model TorchDynamo could not
capture, on the model object (weakly). It only decides which strategy runs first and
whether to warn, never a result.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

from .arguments import unwrap
from .problem import Problem


def failure_key(name: str, quantity: str, create_graph: bool) -> tuple:
    """The fact under which a strategy's failure on a model is remembered."""
    return ("failed", name, quantity, create_graph)


# Failures of strategies on models TorchDynamo could not capture (there is no capture to
# keep them on): they only decide which strategy runs first, never a result.
_UNCAPTURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_UNCAPTURED_LOCK = threading.Lock()


def remember_failure(problem: Problem, key: tuple, reason: str) -> None:
    """Remembers that a strategy failed on this model."""
    if problem.anchor is not None:
        capture = problem.anchor.capture
        with capture.lock:
            capture.facts[(problem.batched, key)] = reason
        return
    with _UNCAPTURED_LOCK, contextlib.suppress(TypeError):  # not weak-referenceable
        _UNCAPTURED.setdefault(unwrap(problem.model), {})[key] = reason


_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def first_warning(problem: Problem, failures: tuple[str, ...]) -> bool:
    """Whether this model object has not been warned of these failures yet."""
    with _UNCAPTURED_LOCK:
        try:
            seen = _WARNED.setdefault(unwrap(problem.model), set())
        except TypeError:  # not weak-referenceable: warn every time
            return True
        new = failures not in seen
        seen.add(failures)
    return new


def known_failure(problem: Problem, key: tuple) -> str:
    """Why a strategy failed on this model before (``""``: it did not)."""
    if problem.anchor is not None:
        return problem.fact(key, str)
    with _UNCAPTURED_LOCK:
        try:
            return _UNCAPTURED.get(unwrap(problem.model), {}).get(key, "")
        except TypeError:
            return ""
