"""hesse itself: every strategy of ``hesse.available_strategies()`` and ``"auto"``.

The strategies are read from hesse when this module is imported, so a new strategy is
benchmarked for free. An explicit strategy that cannot run a model (``hesse.StrategyError``)
is recorded as unsupported, with hesse's message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..cases import Instance
from . import Method, Prepared, Unsupported, register

try:
    import hesse
    from hesse import _tuning as tuning
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


def _hesse(strategy: str, compiled: bool = False) -> Callable[[Instance], Prepared]:
    def prepare(inst: Instance) -> Prepared:
        fn = _call(inst.case.quantity)
        output = inst.case.output
        output = list(output) if isinstance(output, tuple) else output
        kwargs = {"output": output, "batched": inst.case.batched, "strategy": strategy}

        def run() -> torch.Tensor:
            hesse.set_compile(compiled)
            try:
                return fn(inst.model, inst.x, **kwargs)
            except hesse.StrategyError as err:
                raise Unsupported(str(err)) from err
            finally:
                hesse.set_compile(False)

        if strategy == "auto":  # auto times its close candidates on its first calls: the
            # tuning calls are warm-up, like JAX's compilation (see hesse._tuning)
            for _ in range(tuning.MAX_CANDIDATES * (tuning.WARMUP + tuning.TRIALS)):
                run()
        return run

    return prepare


if hesse is not None:
    for _name in (*hesse.available_strategies(), "auto"):
        register(Method(f"hesse[{_name}]", f'hesse, strategy="{_name}"', "hesse", _hesse(_name)))
    register(
        Method(
            "hesse[auto+compile]",
            'hesse, strategy="auto" with hesse.set_compile(True) (compiled in the warm-up)',
            "hesse",
            _hesse("auto", compiled=True),
        )
    )
