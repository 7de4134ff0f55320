"""The canonical problem every strategy solves.

Whatever the caller passes (a module or a function, one sample or a batch, any input and
output shapes, an ``output=`` selection), hesse reduces it to one function

    F: (b, n) -> (b, m)

on flattened per-sample inputs, with samples independent of each other. A single input is
the case ``b = 1`` (``f`` is called on ``x`` itself, without a batch dimension); a batch is
fed to ``f`` in sub-batches, as models expect. Because samples are independent, the
gradient of ``sum_b u_b . F(X)_b`` is the stack of per-sample gradients: every strategy
works on whole sub-batches at once (the "sum over the batch" trick, exact here).
"""

from __future__ import annotations

import copy
import numbers
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ._checks import (
    LOW_PRECISION,
    OpRecorder,
    check_independent,
    check_input,
    check_module,
    check_output,
)
from .errors import OutputSelectionError, PrecisionWarning, UnsupportedModelError

Selection = None | int | tuple | list | slice | torch.Tensor


@dataclass
class Problem:
    """A derivative request in canonical form.

    Attributes:
        api: The public call, e.g. ``"hesse.hessian"``.
        fn: ``F``, mapping ``(b, n)`` to the selected outputs ``(b, m)``.
        x: The flattened input, shape ``(B, n)``, detached unless a graph is wanted.
        batched: Whether the caller's ``x`` had a batch dimension.
        in_shape: Per-sample input shape ``S``.
        sel_shape: Shape ``Q`` of the selected per-sample output.
        m: Number of selected outputs, ``prod(Q)``.
        piecewise_ops: Piecewise-linear torch functions seen in the probe forward.
        scripted: Whether ``f`` is TorchScript (only the loop strategy applies).
        out_dtype: dtype of the returned result.
        model: The caller's ``f`` after preparation (unwrapped, upcast), for strategies
            that read the model's structure.
        index: Flat indices of the selected outputs (``None``: all).
        cache: Per-call memo of strategies (e.g. the structured engine's graph cost).
    """

    api: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    batched: bool
    in_shape: torch.Size
    sel_shape: tuple[int, ...]
    m: int
    piecewise_ops: list[str] = field(default_factory=list)
    scripted: bool = False
    out_dtype: torch.dtype = torch.float32
    model: Callable[[torch.Tensor], torch.Tensor] | None = None
    index: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        """Number of samples ``B``."""
        return self.x.shape[0]

    @property
    def cache_persistent(self) -> bool:
        """Whether :attr:`cache` outlives the call (modules; see NOTE: [analysis cache])."""
        return isinstance(self.model, nn.Module)

    @property
    def saved_bytes(self) -> int:
        """Bytes of activations autograd saves in one forward of one sample (measured)."""
        return self.cache["profile"][0]

    @property
    def forward_macs(self) -> float:
        """Multiply-adds of one forward pass of one sample (measured)."""
        return self.cache["profile"][1]

    @property
    def n(self) -> int:
        """Number of input entries per sample."""
        return self.x.shape[1]


def select_outputs(api: str, output: Selection, out_shape: torch.Size, device: torch.device):
    """Turns ``output=`` into flat indices into the per-sample output.

    Args:
        api: The public call, for messages.
        output: ``None``, an int, a tuple index, a list / 1-D LongTensor / slice.
        out_shape: Per-sample output shape ``O``.
        device: Where the index tensor lives.

    Returns:
        ``(index, Q)``: a LongTensor of flat indices (``None`` = all) and the shape ``Q``.

    Raises:
        OutputSelectionError: Out of range or not an index.
    """
    size = out_shape.numel()
    if output is None:
        return None, tuple(out_shape)
    if isinstance(output, numbers.Integral) and not isinstance(output, bool):
        flat = [int(output)]
        shape: tuple[int, ...] = ()
    elif isinstance(output, tuple):
        flat = [_flat_from_tuple(api, output, out_shape)]
        shape = ()
    elif isinstance(output, slice):
        flat = list(range(size))[output]
        shape = (len(flat),)
    elif isinstance(output, (list, torch.Tensor)):
        flat = _flat_from_sequence(api, output)
        shape = (len(flat),)
    else:
        raise OutputSelectionError(
            f"{api}: expected output to be None, an int, a tuple index, a list, a slice or "
            f"a 1-D LongTensor, got {type(output).__name__}."
        )
    bad = [i for i in flat if not -size <= i < size]
    if bad or not flat:
        raise OutputSelectionError(
            f"{api}: output={output!r} selects "
            + (f"index {bad[0]}" if bad else "no element")
            + f", but each sample's output has {size} elements (shape {tuple(out_shape)}); "
            f"valid flat indices are 0..{size - 1}."
        )
    return torch.tensor([i % size for i in flat], dtype=torch.long, device=device), shape


def _flat_from_tuple(api: str, output: tuple, out_shape: torch.Size) -> int:
    if len(output) != len(out_shape) or not all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in output
    ):
        raise OutputSelectionError(
            f"{api}: a tuple output must index one element of the per-sample output shape "
            f"{tuple(out_shape)} with {len(out_shape)} ints, got {output!r}."
        )
    flat = 0
    for i, dim in zip(output, out_shape, strict=True):
        if not -dim <= i < dim:
            raise OutputSelectionError(
                f"{api}: output={output!r} is out of range for the per-sample output shape "
                f"{tuple(out_shape)}."
            )
        flat = flat * dim + int(i) % dim
    return flat


def _flat_from_sequence(api: str, output: list | torch.Tensor) -> list[int]:
    if isinstance(output, torch.Tensor):
        if output.dim() != 1 or output.is_floating_point() or output.dtype == torch.bool:
            raise OutputSelectionError(
                f"{api}: a tensor output must be a 1-D integer (Long) tensor of flat "
                f"indices, got dtype {output.dtype} with shape {tuple(output.shape)}."
            )
        return [int(i) for i in output.tolist()]
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in output):
        raise OutputSelectionError(f"{api}: a list output must hold ints, got {output!r}.")
    return [int(i) for i in output]


# NOTE: [analysis cache] The probes of a call (output shape, piecewise-linear ops, sample
# independence, working set, multiply-adds, the structured engine's graph cost, whether
# forward and reverse mode agree) depend on a module's structure, not on the input's
# values. They are kept per module and per (input shape, dtype, device, batched, training
# flags), so repeated calls skip them. Plain functions are probed on every call: what they
# close over may change without hesse seeing it.
_ANALYSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _analysis(f: Callable, x: torch.Tensor, batched: bool) -> dict:
    """The probe results of earlier calls with the same module and input layout."""
    if not isinstance(f, nn.Module):
        return {}
    key = (
        tuple(x.shape[1:] if batched else x.shape),
        x.dtype,
        x.device,
        batched,
        tuple(m.training for m in f.modules()),
    )
    return _ANALYSES.setdefault(f, {}).setdefault(key, {})


def _prepare_callable(api: str, f: Callable, x: torch.Tensor, batched: bool) -> Callable:
    """Unwraps compiled modules, upcasts low-precision modules, checks module state."""
    f = getattr(f, "_orig_mod", f)  # torch.compile: differentiate the eager module
    if isinstance(f, nn.Module):
        check_module(api, f, x, batched)
        if any(p.dtype in LOW_PRECISION for _, p in f.named_parameters()):
            f = copy.deepcopy(f).float()
    elif not callable(f):
        raise UnsupportedModelError(
            f"{api}: expected f to be a callable or an nn.Module, got {type(f).__name__}."
        )
    return f


def build_problem(
    api: str,
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    output: Selection,
    batched: bool,
    keep_graph: bool = False,
) -> Problem:
    """Validates a request and builds its canonical :class:`Problem`.

    Args:
        api: The public call, for messages.
        f: Model or function; called on ``x`` (or on sub-batches of it when batched).
        x: Input of shape ``S`` (or ``(B, *S)`` when batched).
        output: Selection of outputs (see :func:`select_outputs`).
        batched: Whether the first dimension of ``x`` indexes independent samples.
        keep_graph: Keep ``x``'s autograd history (for ``create_graph=True``).

    Returns:
        The problem.
    """
    x = check_input(api, x, batched)
    f = _prepare_callable(api, f, x, batched)
    out_dtype = x.dtype
    if x.dtype in LOW_PRECISION:
        warnings.warn(
            f"{api}: input dtype {x.dtype} carries too few digits for second derivatives; "
            "computing in float32 on an upcast copy, the result is float32.",
            PrecisionWarning,
            stacklevel=3,
        )
        x, out_dtype = x.float(), torch.float32
    in_shape = x.shape[1:] if batched else x.shape
    base = x if keep_graph else x.detach()
    flat_x = base.reshape(-1 if batched else 1, in_shape.numel()).clone()
    cache = _analysis(f, x, batched)
    if "out_shape" not in cache:
        cache["out_shape"], cache["piecewise"] = _probe(api, f, flat_x, in_shape, batched)
    out_shape = cache["out_shape"]
    index, sel_shape = select_outputs(api, output, out_shape, x.device)
    fn = _canonical(f, in_shape, batched, index)
    if batched and flat_x.shape[0] >= 2 and not cache.get("independent"):
        check_independent(api, fn, flat_x)
        cache["independent"] = True
    problem = Problem(
        api=api,
        fn=fn,
        x=flat_x,
        batched=batched,
        in_shape=in_shape,
        sel_shape=sel_shape,
        m=int(torch.Size(sel_shape).numel()),
        piecewise_ops=cache["piecewise"],
        scripted=isinstance(f, torch.jit.ScriptModule),
        out_dtype=out_dtype,
        model=f,
        index=index,
        cache=cache,
    )
    return problem


def _probe(
    api: str, f: Callable, flat_x: torch.Tensor, in_shape: torch.Size, batched: bool
) -> tuple[torch.Size, list[str]]:
    """One forward pass of one sample: the per-sample output shape and piecewise ops."""
    recorder = OpRecorder()
    probe = flat_x[:1].detach()
    try:
        with torch.no_grad(), recorder:
            out = f(probe.reshape((1, *in_shape)) if batched else probe.reshape(in_shape))
    except Exception as exc:
        raise UnsupportedModelError(
            f"{api}: calling f on the input failed ({type(exc).__name__}: {exc}). Check that "
            "f runs on x of shape "
            f"{tuple((1, *in_shape)) if batched else tuple(in_shape)} by itself."
        ) from exc
    out = check_output(api, out, 1 if batched else None)
    return (out.shape[1:] if batched else out.shape), recorder.piecewise_linear()


def _canonical(
    f: Callable[[torch.Tensor], torch.Tensor],
    in_shape: torch.Size,
    batched: bool,
    index: torch.Tensor | None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Builds ``F: (b, n) -> (b, m)`` from the caller's ``f``."""

    def fn(xb: torch.Tensor) -> torch.Tensor:
        b = xb.shape[0]
        out = f(xb.reshape((b, *in_shape))) if batched else f(xb.reshape(in_shape))
        out = out.reshape(b, -1)
        return out if index is None else out.index_select(1, index)

    return fn
