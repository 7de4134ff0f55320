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
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import HesseError, OutputSelectionError, PrecisionWarning, UnsupportedModelError
from .capture import Bound, try_capture
from .checks import (
    LOW_PRECISION,
    OpRecorder,
    check_deterministic,
    check_independent,
    check_input,
    check_module,
    check_output,
)
from .memory import profile_forward

Selection = None | int | tuple | list | slice | torch.Tensor


@dataclass(frozen=True)
class Problem:
    """A derivative request in canonical form.

    Attributes:
        api: The public call, e.g. ``"hesse.hessian"``.
        fn: ``F``, mapping ``(b, n)`` to the selected outputs ``(b, m)``.
        x: The flattened input, shape ``(B, n)``, detached unless a graph is wanted.
        batched: Whether the caller's ``x`` had a batch dimension.
        in_shape: Per-sample input shape ``S``.
        out_shape: Per-sample output shape ``O`` of the model.
        sel_shape: Shape ``Q`` of the selected per-sample output.
        m: Number of selected outputs, ``prod(Q)``.
        piecewise_ops: Piecewise-linear torch functions seen in the probe forward.
        scripted: Whether ``f`` is TorchScript (only the loop strategy applies).
        out_dtype: dtype of the returned result.
        model: The caller's ``f`` after preparation (unwrapped, upcast).
        index: Flat indices of the selected outputs (``None``: all).
        anchor: TorchDynamo's capture of the model at ``x``'s shape, on which facts about
            the model are kept (see :mod:`hesse.planning.capture`); ``None`` when the
            model could not be captured (facts are then derived on every call).
        capture_failure: Why the model could not be captured.
        saved_bytes: Bytes of activations autograd saves in one forward of one sample.
        forward_macs: Multiply-adds of one forward pass of one sample.
        ops: Names of the torch functions the model calls (seen in the probe).
    """

    api: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    batched: bool
    in_shape: torch.Size
    out_shape: torch.Size
    sel_shape: tuple[int, ...]
    m: int
    piecewise_ops: tuple[str, ...]
    scripted: bool
    out_dtype: torch.dtype
    model: Callable[[torch.Tensor], torch.Tensor]
    index: torch.Tensor | None
    anchor: Bound | None
    capture_failure: str | None
    saved_bytes: int
    forward_macs: float
    ops: frozenset[str] = frozenset()

    @property
    def batch(self) -> int:
        """Number of samples ``B``."""
        return self.x.shape[0]

    @property
    def n(self) -> int:
        """Number of input entries per sample."""
        return self.x.shape[1]

    def fact(self, key: Hashable, derive: Callable[[], Any]) -> Any:
        """A fact about the model: kept on the capture, or derived now without one.

        Keys are qualified by the layout (``batched``): one capture serves both readings
        of an input shape.
        """
        if self.anchor is None:
            return derive()
        return self.anchor.capture.fact((self.batched, key), derive)


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
    capture: bool = True,
) -> Problem:
    """Validates a request and builds its canonical :class:`Problem`.

    Facts about the model (its output shape, whether it is deterministic, whether samples
    are independent, its working set) are derived once per TorchDynamo capture and kept
    on it; a model that cannot be captured is probed on every call.

    Args:
        api: The public call, for messages.
        f: Model or function; called on ``x`` (or on sub-batches of it when batched).
        x: Input of shape ``S`` (or ``(B, *S)`` when batched).
        output: Selection of outputs (see :func:`select_outputs`).
        batched: Whether the first dimension of ``x`` indexes independent samples.
        keep_graph: Keep ``x``'s autograd history (for ``create_graph=True``).
        capture: Capture the model with TorchDynamo (``auto`` and the structured engine
            need its graph; the other strategies call the model itself).

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
    flat_x = base.reshape(-1 if batched else 1, in_shape.numel())
    if not keep_graph or not flat_x.requires_grad:
        flat_x = flat_x.clone()
    model_x = flat_x.detach().reshape((flat_x.shape[0], *in_shape) if batched else in_shape)
    if not capture:
        bound: Bound | str = "not needed by the requested strategy"
    elif flat_x.shape[0] == 0:
        bound = "empty batch"
    else:
        bound = try_capture(f, model_x)
    anchor = bound if isinstance(bound, Bound) else None

    def fact(key: Hashable, derive: Callable[[], Any]) -> Any:  # as Problem.fact
        return derive() if anchor is None else anchor.capture.fact((batched, key), derive)

    out_shape, piecewise, ops = fact("probe", lambda: _probe(api, f, flat_x, in_shape, batched))
    index, sel_shape = select_outputs(api, output, out_shape, x.device)
    fn = _canonical(f, in_shape, batched, index)
    if batched and flat_x.shape[0] >= 2:
        fact(
            "independent",
            lambda: check_independent(api, _canonical(f, in_shape, True, None), flat_x),
        )
    empty = flat_x.shape[0] == 0
    saved, macs = (0, 1.0) if empty else fact("profile", lambda: profile_forward(fn, flat_x[:1]))
    return Problem(
        api=api,
        fn=fn,
        x=flat_x,
        batched=batched,
        in_shape=in_shape,
        out_shape=out_shape,
        sel_shape=sel_shape,
        m=int(torch.Size(sel_shape).numel()),
        piecewise_ops=tuple(piecewise),
        scripted=isinstance(f, torch.jit.ScriptModule | torch.jit.ScriptFunction),
        out_dtype=out_dtype,
        model=f,
        index=index,
        anchor=anchor,
        capture_failure=None if anchor is not None else str(bound),
        saved_bytes=saved,
        forward_macs=macs,
        ops=ops,
    )


def _probe(
    api: str, f: Callable, flat_x: torch.Tensor, in_shape: torch.Size, batched: bool
) -> tuple[torch.Size, list[str], frozenset[str]]:
    """One forward pass of one sample: the output shape, piecewise ops and every op called.

    The sample is run twice (with the caller's random state put back): a model whose
    output changes between two calls on the same input is random, and so would be its
    derivatives.

    Raises:
        UnsupportedModelError: ``f`` fails on the input or returns something else than one
            real floating tensor.
        NonDeterministicModelError: Two calls on the same input differ.
    """
    recorder = OpRecorder()
    probe = flat_x[:1].detach()
    count = probe.shape[0]  # 0 for an empty batch
    shaped = probe.reshape((count, *in_shape)) if batched else probe.reshape(in_shape)
    try:
        with torch.no_grad(), recorder, torch.random.fork_rng(devices=_devices(probe)):
            out = f(shaped)
            again = f(shaped) if isinstance(out, torch.Tensor) else None
    except HesseError:
        raise
    except Exception as exc:
        raise UnsupportedModelError(
            f"{api}: calling f on the input failed ({type(exc).__name__}: {exc}). Check that "
            "f runs on x of shape "
            f"{tuple((1, *in_shape)) if batched else tuple(in_shape)} by itself."
        ) from exc
    out = check_output(api, out, count if batched else None)
    check_deterministic(api, out, again, recorder.random_ops())
    shape = out.shape[1:] if batched else out.shape
    return shape, recorder.piecewise_linear(), frozenset(recorder.names)


def _devices(x: torch.Tensor) -> list[int]:
    return [x.device.index or 0] if x.device.type == "cuda" else []


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
