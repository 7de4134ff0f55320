"""hesse itself: every strategy of ``hesse.available_strategies()`` and ``"auto"``.

The strategies are read from hesse when this module is imported, so a new strategy is
benchmarked for free. An explicit strategy that cannot run a model (``hesse.StrategyError``)
is recorded as unsupported, with hesse's message.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..cases import Instance
from . import EVAL, Method, MissingDependency, Prepared, Unsupported, register
from .train_peers import step

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
def _compile(setting: bool | str) -> Iterator[None]:
    with hesse.settings(compile=setting):
        yield


def _train(inst: Instance, kwargs: dict[str, Any], compiled: bool | str) -> Prepared:
    """A training step on ``hesse.laplacian(..., create_graph=True)``."""

    def lap(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        try:
            with _compile(compiled):
                return hesse.laplacian(model, x, create_graph=True, **kwargs)
        except hesse.StrategyError as err:
            raise Unsupported(str(err)) from err

    return step(inst, lap)


def _hesse(strategy: str, compiled: bool | str = "auto") -> Callable[[Instance], Prepared]:
    """hesse with ``strategy`` under ``settings(compile=compiled)``.

    ``compiled=True`` compiles the derivative program in the warm-up (its third call);
    ``"auto"``, the default, compiles only once that pays, which a benchmark's few calls
    never reach: it runs the eager program (``Plan.program`` says after how many calls a
    training loop would switch).
    """

    def prepare(inst: Instance) -> Prepared:
        output = inst.case.output
        output = list(output) if isinstance(output, tuple) else output
        kwargs = {"output": output, "batched": inst.case.batched, "strategy": strategy}
        if inst.case.quantity == "laplacian_train":
            run = _train(inst, kwargs, compiled)
            if strategy == "auto" or compiled is True:  # tuning or compiling: warm-up
                start = time.perf_counter()  # (at most 15 calls, 20 s after the first 6)
                for i in range(15):
                    run()
                    if i >= 5 and time.perf_counter() - start > 20:
                        break
            return run
        fn = _call(inst.case.quantity)

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
        if compiled is True:  # the program is compiled on its third call: warm-up
            for _ in range(4):
                run()
        return run

    return prepare


def _operator(inst: Instance) -> Prepared:
    """``hesse.second_order_operator`` (``C = I``: the Laplacian), eval or training step."""
    kwargs = {"output": inst.case.output, "batched": inst.case.batched}
    if inst.case.quantity == "laplacian_train":
        return step(
            inst,
            lambda m, x: hesse.second_order_operator(m, x, create_graph=True, **kwargs),
        )
    return lambda: hesse.second_order_operator(inst.model, inst.x, **kwargs)


def _estimate(inst: Instance) -> Prepared:
    """A training step on ``hesse.laplacian_estimate`` with the case's number of random
    (Rademacher) directions."""
    estimate = getattr(hesse, "laplacian_estimate", None)
    if estimate is None:
        raise MissingDependency("not run: hesse.laplacian_estimate does not exist yet")
    k = inst.case.randomized
    gen = torch.Generator(device=inst.x.device).manual_seed(0)

    def lap(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = estimate(
            model, x, num_samples=k, batched=True, output=inst.case.output,
            create_graph=True, generator=gen,
        )  # fmt: skip
        return getattr(out, "value", out)

    return step(inst, lap)


if hesse is not None:
    ALL = (*EVAL, "laplacian_train")
    for _name in (*hesse.available_strategies(), "auto"):
        register(
            Method(
                f"hesse[{_name}]", f'hesse, strategy="{_name}"', "hesse", _hesse(_name),
                quantities=ALL,
            )
        )  # fmt: skip
    register(
        Method(
            "hesse[operator]",
            "hesse.second_order_operator (C = I), jvp-of-jvp / forward-over-reverse",
            "hesse",
            _operator,
            quantities=("laplacian", "laplacian_train"),
        )
    )
    register(
        Method(
            "hesse[estimate]",
            "hesse.laplacian_estimate (randomized; the engine from the directions, Gram form)",
            "hesse",
            _estimate,
            quantities=("laplacian_train",),
            randomized=True,
        )
    )
    register(
        Method(
            "hesse[auto+compile]",
            'hesse, strategy="auto" under hesse.settings(compile=True) (compiled in the warm-up)',
            "hesse",
            _hesse("auto", compiled=True),
            quantities=ALL,
        )
    )
    register(
        Method(
            "hesse[eager]",
            'hesse, strategy="structured" under hesse.settings(compile=False)',
            "hesse",
            _hesse("structured", compiled=False),
            quantities=ALL,
        )
    )
    register(
        Method(
            "hesse[compiled]",
            'hesse, strategy="structured" under hesse.settings(compile=True): the program '
            "compiled whole in the warm-up (what compile='auto' switches to once it pays)",
            "hesse",
            _hesse("structured", compiled=True),
            quantities=ALL,
        )
    )
