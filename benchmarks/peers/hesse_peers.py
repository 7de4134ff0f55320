"""hesse itself: every strategy of ``hesse.available_strategies()`` and ``"auto"``.

The strategies are read from hesse when this module is imported, so a new strategy is
benchmarked for free. An explicit strategy that cannot run a model (``hesse.StrategyError``)
is recorded as unsupported, with hesse's message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..cases import Instance
from . import Method, Prepared, Unsupported, register

try:
    import hesse
    from hesse.planning import tuning
except ImportError:  # pragma: no cover - hesse is the package under test
    hesse = None


def _call(quantity: str) -> Callable[..., torch.Tensor]:
    table: dict[str, tuple[str, dict[str, Any]]] = {
        "hessian": ("hessian", {"flat": True}),
        "hessian_diag": ("hessian_diag", {"flat": True}),
        "laplacian": ("laplacian", {}),
    }
    name, extra = table[quantity]
    fn = getattr(hesse, name)
    return lambda *args, **kwargs: fn(*args, **kwargs, **extra)


@contextlib.contextmanager
def _compile(enabled: bool) -> Iterator[None]:
    with hesse.settings(compile=enabled):
        yield


def _hesse(strategy: str, compiled: bool = False) -> Callable[[Instance], Prepared]:
    def prepare(inst: Instance) -> Prepared:
        fn = _call(inst.case.quantity)
        output = inst.case.output
        output = list(output) if isinstance(output, tuple) else output
        kwargs = {"output": output, "batched": inst.case.batched, "strategy": strategy}

        def run() -> torch.Tensor:
            with _compile(compiled):
                try:
                    return fn(inst.model, inst.x, **kwargs)
                except hesse.StrategyError as err:
                    raise Unsupported(str(err)) from err

        def plan() -> hesse.Plan:
            with _compile(compiled):  # the tuner of the same settings as run()
                return hesse.plan(inst.model, inst.x, quantity=inst.case.quantity, **kwargs)

        def pending() -> bool:
            record = plan().tuning
            return record is not None and record.pending

        def describe() -> str:
            current = plan()
            note = f" (tuning {current.tuning})" if current.tuning is not None else ""
            return f"auto ran {current.ran or current.strategy}{note}"

        if strategy == "auto":  # auto times its close candidates on its first calls and
            # watches its choice: those calls are warm-up, like JAX's compilation
            tuning.settle(run, pending)
            run.describe = describe  # type: ignore[attr-defined]
        return run

    return prepare


if hesse is not None:
    for _name in (*hesse.available_strategies(), "auto"):
        register(Method(f"hesse[{_name}]", f'hesse, strategy="{_name}"', "hesse", _hesse(_name)))
    register(
        Method(
            "hesse[auto+compile]",
            'hesse, strategy="auto" under hesse.settings(compile=True) (compiled in the warm-up)',
            "hesse",
            _hesse("auto", compiled=True),
        )
    )
