"""What a streamed run computes: the data, the model's output, the result's layout.

Built once per run from the public arguments of :func:`hesse.io.compute_to`, with one
forward pass of one sample; everything here is independent of the number of processes.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hesse.errors import (
    MemoryBudgetError,
    OutputSelectionError,
    UnsupportedInputError,
    UnsupportedModelError,
)

from .schedule import Layout

QUANTITIES = ("jacobian", "hessian", "hessian_diag", "laplacian")
_ORDER = {"jacobian": 1, "hessian": 2, "hessian_diag": 1, "laplacian": 0}
_HASH_CHUNK = 1 << 26  # bytes of input hashed at a time


@dataclass
class Spec:
    """One run: model, data and the result's layout.

    Attributes:
        quantity: ``"jacobian"``, ``"hessian"``, ``"hessian_diag"`` or ``"laplacian"``.
        f: The model.
        data: The input: a tensor, a NumPy array or memmap, or a zarr array.
        output: The ``output=`` selection.
        batched: ``data``'s first dimension holds samples.
        flat: Flat layout of the result.
        device: Where the computation runs.
        layout: The result's layout.
        n: Inputs per sample.
        sample_shape: ``S``.
    """

    quantity: str
    f: Callable[[torch.Tensor], torch.Tensor]
    data: Any
    output: Any
    batched: bool
    flat: bool
    device: torch.device
    layout: Layout
    n: int
    sample_shape: tuple[int, ...]

    def inputs(self, s0: int, s1: int) -> torch.Tensor:
        """Samples ``s0:s1`` as a tensor on the run's device (the whole input if unbatched)."""
        part = self.data[s0:s1] if self.batched else self.data[...]
        if not isinstance(part, torch.Tensor):
            part = torch.from_numpy(np.array(part, copy=True))
        return part.to(self.device)


def selected_shape(out_shape: tuple[int, ...], output: Any) -> tuple[int, ...]:
    """``Q``: the shape of the selected per-sample outputs."""
    m = math.prod(out_shape)
    if output is None:
        return out_shape
    if isinstance(output, (int, tuple)) and not isinstance(output, bool):
        return ()
    if isinstance(output, slice):
        return (len(range(*output.indices(m))),)
    if isinstance(output, torch.Tensor) and output.dim() == 1:
        return (output.numel(),)
    if isinstance(output, list):
        return (len(output),)
    raise OutputSelectionError(
        f"hesse.io.compute_to: output={output!r} is not None, an int, a tuple, a list, a "
        "slice or a 1-D LongTensor"
    )


def result_shape(quantity: str, q: tuple[int, ...], s: tuple[int, ...], flat: bool) -> tuple:
    """The public per-sample shape of ``quantity`` (see the table in the README)."""
    k = _ORDER[quantity] if quantity != "hessian_diag" else 1
    if not flat:
        return q + s * k
    n, m = math.prod(s), math.prod(q)
    head = () if q == () else (m,)
    return head + (n,) * k


def output_json(output: Any) -> Any:
    """The selection as JSON, for the manifest."""
    if isinstance(output, slice):
        return {"slice": [output.start, output.stop, output.step]}
    if isinstance(output, torch.Tensor):
        return output.tolist()
    if isinstance(output, tuple):
        return {"tuple": list(output)}
    return output


def build_spec(
    quantity: str,
    f: Any,
    data: Any,
    output: Any,
    batched: bool,
    flat: bool,
    device: torch.device,
    budget: int,
    row_mode: bool | None,
) -> Spec:
    """Check the request and lay out its result.

    Raises:
        UnsupportedInputError: Bad quantity or input dtype.
        UnsupportedModelError: The model rejects one sample of the input.
        MemoryBudgetError: One sample's result does not fit and cannot be cut into rows.
    """
    if quantity not in QUANTITIES:
        raise UnsupportedInputError(
            f"hesse.io.compute_to: unknown quantity {quantity!r}; expected one of "
            f"{', '.join(QUANTITIES)}"
        )
    dtype = _torch_dtype(data)
    shape = tuple(int(d) for d in data.shape)
    if batched and not shape:
        raise UnsupportedInputError("hesse.io.compute_to: batched=True needs a batch dimension")
    s = shape[1:] if batched else shape
    spec = Spec(quantity, f, data, output, batched, flat, device, None, math.prod(s), s)  # type: ignore[arg-type]
    out_shape = _probe_output(spec)
    q = selected_shape(out_shape, output)
    per = result_shape(quantity, q, s, flat)
    res_dtype = str(torch.promote_types(dtype, torch.float32)).removeprefix("torch.")
    itemsize = torch.empty((), dtype=getattr(torch, res_dtype)).element_size()
    if row_mode is None:
        row_mode = quantity == "hessian" and math.prod(per) * itemsize > budget // 2
    if row_mode and (quantity != "hessian" or q != ()):
        raise MemoryBudgetError(
            f"hesse.io.compute_to: one sample's {quantity} ({math.prod(per) * itemsize} bytes) "
            "does not fit in half of max_memory; only the Hessian of one selected output "
            "(output=k) can be computed in row blocks. Select one output or raise max_memory."
        )
    samples = shape[0] if batched else 1
    rows, cols = (spec.n, spec.n) if row_mode else (1, math.prod(per))
    full = ((samples,) if batched else ()) + per
    spec.layout = Layout(full, samples, rows, cols, res_dtype, row_mode, batched)
    return spec


def _torch_dtype(data: Any) -> torch.dtype:
    if isinstance(data, torch.Tensor):
        dtype = data.dtype
    else:
        try:
            dtype = torch.from_numpy(np.zeros(0, dtype=np.dtype(data.dtype))).dtype
        except (TypeError, AttributeError) as exc:
            raise UnsupportedInputError(
                f"hesse.io.compute_to: cannot use input of dtype {getattr(data, 'dtype', '?')}"
            ) from exc
    if not dtype.is_floating_point:
        raise UnsupportedInputError(
            f"hesse.io.compute_to: the input must be real floating point, got {dtype}"
        )
    return dtype


def _probe_output(spec: Spec) -> tuple[int, ...]:
    """The per-sample output shape, from one forward pass of one sample."""
    x = spec.inputs(0, 1)
    try:
        with torch.no_grad():
            y = spec.f(x)
    except Exception as exc:
        raise UnsupportedModelError(
            f"hesse.io.compute_to: the model rejects an input of shape {tuple(x.shape)}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ) from exc
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise UnsupportedModelError(
            "hesse.io.compute_to: the model must return one floating tensor, got "
            f"{type(y).__name__}"
        )
    if spec.batched:
        if y.dim() == 0 or y.shape[0] != 1:
            raise UnsupportedModelError(
                f"hesse.io.compute_to: for one sample the model returned shape {tuple(y.shape)}; "
                "with batched=True it must keep the batch dimension"
            )
        return tuple(y.shape[1:])
    return tuple(y.shape)


def fingerprint_data(data: Any, batched: bool) -> str:
    """SHA-256 of the input's shape, dtype and bytes, read a chunk of samples at a time."""
    h = hashlib.sha256(f"{tuple(data.shape)}{data.dtype}".encode())
    total = int(data.shape[0]) if batched and data.shape else 1
    per = max(1, _HASH_CHUNK // max(1, math.prod(data.shape[1:]) * 8)) if batched else 1
    for s0 in range(0, total, per):
        part = data[s0 : s0 + per] if batched else data[...]
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().numpy()
        h.update(memoryview(np.ascontiguousarray(part)).cast("B"))
    return h.hexdigest()[:32]


def fingerprint_model(f: Any) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, bytes), or of a function.

    A function counts by its name and code and the state of the modules and tensors it
    reads (closure cells, defaults, globals it names, a bound method's object, a
    ``functools.partial``'s arguments): a resume with other weights is refused.
    """
    h = hashlib.sha256()
    _fingerprint_into(h, f, depth=0, seen=set())
    return h.hexdigest()[:32]


def _fingerprint_into(h: Any, f: Any, depth: int, seen: set[int]) -> None:
    if id(f) in seen or depth > 4:
        return
    seen.add(id(f))
    if isinstance(f, torch.nn.Module):
        h.update(type(f).__qualname__.encode())
        state = f.state_dict()
        kept = {id(t) for t in state.values()}
        extra = [(n, t) for n, t in f.named_buffers() if id(t) not in kept]  # persistent=False
        for name, t in [*state.items(), *extra]:
            t = t.detach().cpu().contiguous()
            h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return
    if isinstance(f, torch.Tensor):
        t = f.detach().cpu().contiguous()
        h.update(f"tensor{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return
    h.update(getattr(f, "__qualname__", type(f).__qualname__).encode())
    reads: list[Any] = []
    if isinstance(f, functools.partial):
        reads += [f.func, *f.args, *f.keywords.values()]
    self_ = getattr(f, "__self__", None)
    if self_ is not None and not isinstance(self_, type(functools)):
        reads.append(self_)
    code = getattr(f, "__code__", None)
    if code is not None:
        h.update(code.co_code)
        cells = getattr(f, "__closure__", None) or ()
        reads += [c.cell_contents for c in cells if _filled(c)]
        reads += list(getattr(f, "__defaults__", None) or ())
        names = getattr(f, "__globals__", {})
        reads += [names[n] for n in code.co_names if n in names]
    for value in reads:
        if isinstance(value, torch.nn.Module | torch.Tensor) or (
            callable(value) and not isinstance(value, type) and not _is_library(value)
        ):
            _fingerprint_into(h, value, depth + 1, seen)


def _filled(cell: Any) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _is_library(value: Any) -> bool:
    """Functions of torch, NumPy, hesse and the standard library: nothing of the caller's."""
    module = getattr(value, "__module__", None) or ""
    return module.split(".")[0] in {"torch", "numpy", "hesse", "builtins", "math", "functools"}
