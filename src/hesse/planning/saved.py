"""Saved plans: a tuned choice written to a small JSON file, so a later process does not tune.

``Plan.save(path)`` writes the strategy, its block schedule, the engine mode, the tuning
times, the hesse and torch versions and a *fingerprint* of everything the choice depends
on. :func:`load_plan` recomputes the fingerprint for the caller's model, input and
options and returns a plan pinned to the saved strategy when they match; otherwise it
raises :class:`~hesse.errors.PlanMismatchError` naming each part that differs.

The fingerprint covers (values never enter it):

- ``model``: module types (and training flags), parameter and buffer names, shapes and
  dtypes; for a plain function its qualified name and compiled code;
- ``input``: shape and dtype of ``x``; ``device``: its device type;
- ``request``: the quantity and every option (``output``, ``batched``, ``flat``,
  ``strategy``, ``chunk_size``, ``max_memory``, ``create_graph``, shapes of ``args``);
- ``settings``: hesse settings the choice is kept under (``compile``);
- ``torch`` and ``hesse``: the versions.

A loaded plan only pins which strategy runs: the computation is the real one, with the
model's current values, and its steps are sized again from the memory budget at load.
The pin holds while the model's TorchDynamo capture holds (as for ``Plan.tune``); a
model that cannot be captured is never tuned, and its loaded plan runs as ``hesse.plan``'s.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import FileFormatError, OutputWriteError, PlanMismatchError

if TYPE_CHECKING:
    from .plan import Plan, Request

FORMAT = "hesse.plan"
VERSION = 1
PARTS = {  # part of the fingerprint: what it covers, for messages
    "model": "model structure (module types, parameter and buffer names, shapes, dtypes)",
    "input": "input shape and dtype",
    "device": "device type",
    "request": "quantity and options",
    "settings": "hesse settings (compile)",
    "torch": "torch version",
    "hesse": "hesse version",
}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _model_text(f: Callable[..., Any]) -> tuple[str, str]:
    """``(full description, short summary)`` of the model's structure (no values)."""
    if isinstance(f, torch.nn.Module):
        modules = [
            f"{name}: {type(m).__module__}.{type(m).__qualname__}{' (train)' if m.training else ''}"
            for name, m in f.named_modules()
        ]
        tensors = [
            f"{name}: {tuple(t.shape)} {t.dtype}"
            for name, t in (*f.named_parameters(), *f.named_buffers())
        ]
        summary = f"{type(f).__name__}, {len(modules)} modules, {len(tensors)} tensors"
        return "\n".join(modules + tensors), summary
    name = f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', type(f).__qualname__)}"
    code = getattr(f, "__code__", None)
    body = repr((code.co_code, code.co_consts, code.co_names)) if code is not None else ""
    module = getattr(f, "graph_module", None)  # an ExportedProgram: its graph
    body += str(getattr(module, "code", ""))
    return f"{name}\n{body}", name


def _shapes(value: Any) -> Any:
    """Shapes and dtypes of tensors in fixed arguments (other values as their repr)."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {value.dtype}"
    if isinstance(value, (list, tuple)):
        return [_shapes(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _shapes(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return repr(value)


def fingerprint_parts(
    f: Callable[..., Any],
    spec: tuple[tuple[int, ...], str, str],
    request: Request,
    compile_: bool,
) -> dict[str, str]:
    """Readable parts of the fingerprint (the model as a digest and a summary).

    Args:
        f: The caller's model or function.
        spec: ``(shape, dtype, device type)`` of the input.
        request: The request (quantity and options).
        compile_: The ``compile`` setting.
    """
    shape, dtype, device = spec
    from .. import __version__

    text, summary = _model_text(f)
    options = {
        "quantity": request.quantity,
        "output": _shapes(request.output),
        "batched": request.batched,
        "flat": request.flat,
        "strategy": request.strategy,
        "chunk_size": request.chunk_size,
        "max_memory": str(request.max_memory),
        "create_graph": request.create_graph,
        "args": _shapes(request.args),
        "kwargs": _shapes(request.kwargs or {}),
    }
    return {
        "model": f"{summary} [{_digest(text)}]",
        "input": f"{tuple(shape)} {dtype}",
        "device": device,
        "request": json.dumps(options, sort_keys=True),
        "settings": f"compile={compile_}",
        "torch": torch.__version__,
        "hesse": __version__,
    }


def fingerprint(parts: Mapping[str, str]) -> str:
    """The fingerprint: a digest of the parts."""
    return _digest(json.dumps(dict(parts), sort_keys=True))


def save_plan(plan: Plan, path: str | os.PathLike, parts: Mapping[str, str]) -> None:
    """Writes ``plan`` as JSON (see the module doc).

    Raises:
        OutputWriteError: The file cannot be written.
    """
    tuning = plan.tuning
    record = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint(parts),
        "parts": dict(parts),
        "strategy": plan.strategy,
        "mode": dict(plan.estimates).get(plan.strategy, ""),
        "chunking": {
            "samples_per_step": plan.samples_per_step,
            "rows_per_step": plan.rows_per_step,
            "steps": plan.steps,
        },
        "tuning": None
        if tuning is None
        else {
            "state": tuning.state,
            "best": tuning.best,
            "times": {name: list(ts) for name, ts in tuning.times},
            "skipped": dict(tuning.skipped),
            "work": tuning.work,
            "overhead": tuning.overhead,
        },
    }
    try:
        Path(path).write_text(json.dumps(record, indent=1) + "\n")
    except OSError as exc:
        raise OutputWriteError(
            f"hesse.Plan.save: cannot write {os.fspath(path)!r} ({exc.strerror or exc}); "
            "pass a path in an existing, writable folder."
        ) from None


def read_plan(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks a saved plan.

    Raises:
        FileFormatError: The file is missing, unreadable, not JSON, or not a saved plan.
    """
    where = os.fspath(path)
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(
            f"hesse.load_plan: cannot read a saved plan from {where!r} ({type(exc).__name__}: "
            f"{str(exc)[:120]}); pass a file written by Plan.save."
        ) from None
    expected = {"fingerprint": str, "parts": dict, "strategy": str}
    wrong = [
        k
        for k, kind in expected.items()
        if not isinstance(record, dict) or not isinstance(record.get(k), kind)
    ]
    if wrong or record.get("format") != FORMAT or record.get("version") != VERSION:
        got = (
            f"missing or invalid {', '.join(wrong)}"
            if wrong
            else f"format {record.get('format')!r} version {record.get('version')!r}"
        )
        raise FileFormatError(
            f"hesse.load_plan: {where!r} is not a saved plan of format {FORMAT!r} version "
            f"{VERSION} ({got}); save the plan again with Plan.save."
        )
    return record


def check_match(record: Mapping[str, Any], parts: Mapping[str, str], where: str) -> None:
    """Compares a saved plan's fingerprint with the current one.

    Raises:
        PlanMismatchError: A part differs (each one is named, saved against now).
    """
    saved = record["parts"]
    if record["fingerprint"] == fingerprint(parts) and saved == dict(parts):
        return
    differs = [
        f"{PARTS.get(key, key)}: saved {saved.get(key)!r}, now {parts.get(key)!r}"
        for key in sorted(set(saved) | set(parts))
        if saved.get(key) != parts.get(key)
    ] or ["the fingerprint (the file was edited)"]
    raise PlanMismatchError(
        f"hesse.load_plan: the plan saved in {where!r} was made for another request; "
        + "; ".join(differs)
        + ". Plan and tune this request again (hesse.plan(...).tune(x)) and save it, or "
        "load the file with the model, input and options it was saved for."
    )


def load_plan(
    path: str | os.PathLike,
    f: Callable[..., Any],
    x: torch.Tensor,
    quantity: str = "hessian",
    **options: Any,
) -> Plan:
    """A plan pinned to the strategy saved by ``Plan.save``, when the fingerprint matches.

    Args:
        path: A file written by :meth:`hesse.Plan.save`.
        f: The model (same structure as when saved; values may differ).
        x: An input of the saved shape and dtype, on the same device type.
        quantity: As for :func:`hesse.plan`.
        **options: The keyword options of :func:`hesse.plan` (``output``, ``batched``,
            ``flat``, ``strategy``, ``chunk_size``, ``max_memory``, ``create_graph``,
            ``progress``, ``args``, ``kwargs``), as when the plan was saved.

    Returns:
        A :class:`~hesse.Plan` that runs the saved strategy (no tuning), with the saved
        timings in :attr:`~hesse.Plan.tuning`. If the saved strategy now declines the
        request (e.g. a smaller memory budget), the plan of ``hesse.plan`` and why.

    Raises:
        FileFormatError: The file is not a saved plan.
        PlanMismatchError: The model structure, input, options, device type or versions
            differ from those the plan was saved for.
        TypeError: An unknown option.
    """
    from ..front import input_spec, pinned_plan
    from ..settings import settings
    from .plan import Request

    record = read_plan(path)
    known = set(Request.__dataclass_fields__) - {"api", "quantity"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"hesse.load_plan: unknown option(s) {', '.join(unknown)}; expected those of "
            f"hesse.plan: {', '.join(sorted(known))}."
        )
    request = Request(f"hesse.plan({quantity})", quantity, **options)
    parts = fingerprint_parts(f, input_spec(x), request, settings.current().compile)
    check_match(record, parts, os.fspath(path))
    plan = pinned_plan(request, f, x, record["strategy"], _tuning_of(record))
    return replace(plan, reason=f"{plan.reason}; loaded from {os.fspath(path)!r}")


def _tuning_of(record: Mapping[str, Any]):
    """The saved timings as a :class:`~hesse.planning.plan.Tuning` (``None``: not tuned)."""
    from .plan import Tuning

    saved = record.get("tuning")
    if not isinstance(saved, dict):
        return None
    try:
        times = tuple((str(n), tuple(float(t) for t in ts)) for n, ts in saved["times"].items())
        skipped = tuple((str(n), str(w)) for n, w in saved.get("skipped", {}).items())
        return Tuning(
            "settled",
            times,
            str(saved["best"]),
            0,
            skipped,
            float(saved.get("work", 0.0)),
            float(saved.get("overhead", 0.0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise FileFormatError(
            "hesse.load_plan: the saved plan's tuning record is malformed; save the plan "
            "again with Plan.save."
        ) from None
