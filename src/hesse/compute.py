"""``hesse compute``: derivatives of a saved model over saved inputs, streamed to a file.

``hesse compute MODEL INPUTS --quantity Q --out PATH [...]`` loads the model and inputs
safely (:mod:`hesse.io.load`), streams the result into ``PATH`` block by block
(:func:`hesse.io.compute_to`), resumes with ``--resume``, and splits the work over the
processes of ``torchrun``. Errors are typed (the exit codes of :mod:`hesse.cli`); Ctrl-C
exits 130 and leaves a valid manifest.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hesse.errors import UnsupportedInputError, UnsupportedModelError

__all__ = ["add_compute_parser", "parse_output", "run_compute"]

_PLOT_SIDE = 1024  # a plotted Hessian is averaged down to at most this many pixels a side


def add_compute_parser(sub: Any) -> None:
    """Register the ``compute`` subcommand on the ``hesse`` parser's subparsers."""
    p = sub.add_parser(
        "compute",
        help="derivatives of a saved model over saved inputs, streamed to .npy/.zarr/"
        ".safetensors (resumable; torchrun for several processes)",
        description="Compute a Jacobian, Hessian, Hessian diagonal or Laplacian of a saved "
        "model (torch.export .pt2, or package.module:factory with --weights) over inputs "
        "(.npy, .npz, .safetensors, .pt), block by block into --out.",
    )
    p.add_argument("model", metavar="MODEL", help="model.pt2, or package.module:factory")
    p.add_argument(
        "inputs", metavar="INPUTS", type=Path, help="inputs (.npy/.npz/.safetensors/.pt)"
    )
    p.add_argument(
        "--quantity",
        required=True,
        choices=["jacobian", "hessian", "hessian_diag", "laplacian", "eigs"],
        help="eigs: eigenpairs of one output's Hessian per sample, into .npz or .safetensors",
    )
    p.add_argument("--k", type=int, default=5, help="eigs: how many eigenpairs")
    p.add_argument(
        "--which", default="LA", choices=["LA", "SA", "LM", "BE"], help="eigs: which end"
    )
    p.add_argument(
        "--output",
        metavar="SEL",
        default=None,
        help="outputs: 3 (flat index), 0:5 (slice), 1,4,7 (list), (0,3) (index)",
    )
    p.add_argument("--batched", action="store_true", help="the first input dimension is samples")
    p.add_argument("--flat", action="store_true", help="flat matrices (m, n) / (n, n)")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="PATH",
        help="output file: .npy, .zarr or .safetensors",
    )
    p.add_argument("--max-memory", metavar="SIZE", default=None, help="budget, e.g. 100MB")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="N",
        help="samples (or Hessian rows) per block (default: from --max-memory)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        default=None,
        help="heatmap of the Hessian (first sample), or its diagonal as an image",
    )
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        metavar="W",
        help="weights for a factory model: .safetensors, or a .pt state_dict",
    )
    p.add_argument(
        "--allow-torchscript",
        action="store_true",
        help="accept a TorchScript MODEL (it runs its own code)",
    )
    p.add_argument("--input-key", default=None, help="array name in .npz/.safetensors/.pt")
    p.add_argument(
        "--strategy",
        default="auto",
        help="auto (cost model), timed (fastest on the first block) or a strategy name",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_output(text: str | None) -> Any:
    """``--output``: ``3`` -> 3, ``0:5`` -> slice, ``1,4,7`` -> list, ``(0,3)`` -> tuple.

    >>> parse_output("3"), parse_output("0:4"), parse_output("1,2"), parse_output("(0,3)")
    (3, slice(0, 4, None), [1, 2], (0, 3))
    """
    if text is None:
        return None
    t = text.strip()
    try:
        if t.startswith("(") and t.endswith(")"):
            return tuple(int(v) for v in t[1:-1].split(",") if v.strip())
        if ":" in t:
            parts = [int(v) if v.strip() else None for v in t.split(":")]
            return slice(*parts)
        if "," in t:
            return [int(v) for v in t.split(",") if v.strip()]
        return int(t)
    except (ValueError, TypeError) as exc:
        raise UnsupportedInputError(
            f"hesse compute: cannot read --output {text!r}; use 3, 0:5, 1,4,7 or (0,3)"
        ) from exc


def run_compute(args: argparse.Namespace) -> int:
    """Run ``hesse compute``; return 0 (errors propagate to :func:`hesse.cli.main`)."""
    from hesse.io import compute_to
    from hesse.io._dist import init_from_env, rank_and_world
    from hesse.io.load import load_inputs, load_model

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with `&`
    started = init_from_env(args.device)
    try:
        output = parse_output(args.output)
        model = load_model(args.model, args.weights, allow_torchscript=args.allow_torchscript)
        model = _fit_static_batch(model, args.batched)
        data = load_inputs(args.inputs, args.input_key)
        device = torch.device(args.device)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
            model = model.to(device)
        rank, world = rank_and_world()
        t0 = time.perf_counter()
        if args.quantity == "eigs":
            return _eigs(args, model, data, output, device, t0)
        handle = compute_to(
            args.quantity,
            model,
            data,
            args.out,
            output=output,
            batched=args.batched,
            flat=args.flat,
            max_memory=args.max_memory,
            resume=args.resume,
            progress=not args.quiet,
            strategy=args.strategy,
            device=device,
            block_size=args.block_size,
        )
        if rank == 0:
            _summary(args, handle, time.perf_counter() - t0, world)
            if args.plot is not None:
                _plot(args, handle, tuple(data.shape[1:] if args.batched else data.shape))
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return 0


def _eigs(
    args: argparse.Namespace, model: Any, data: Any, output: Any, device: Any, t0: float
) -> int:
    """``--quantity eigs``: ``values`` ``(k,)``/``(B, k)``, ``vectors`` and ``residuals``."""
    import hesse
    from hesse.errors import OutputExistsError

    out = Path(args.out)
    if out.suffix not in (".npz", ".safetensors"):
        raise UnsupportedInputError(
            f"hesse compute: --quantity eigs writes .npz or .safetensors, got {out.name!r}."
        )
    if out.exists():
        raise OutputExistsError(
            f"hesse compute: {out} exists; eigenpairs are not resumable. Remove it or "
            "choose another --out."
        )
    x = torch.from_numpy(np.array(data)).to(device)  # a copy: inputs may be read-only maps
    values, vectors, residuals = hesse.hessian_eigs(
        model, x, args.k, which=args.which, output=output, batched=args.batched
    )
    arrays = {
        "values": values.detach().cpu().numpy(),
        "vectors": vectors.detach().cpu().numpy(),
        "residuals": residuals.detach().cpu().numpy(),
    }
    tmp = out.with_name(out.stem + ".partial" + out.suffix)
    if out.suffix == ".npz":
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    tmp.replace(out)
    print(
        f"hesse compute: eigs values {list(arrays['values'].shape)} -> {out} "
        f"in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class _PerSample(torch.nn.Module):
    """Calls a program exported with batch size 1 once per sample."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.inner(x[i : i + 1]) for i in range(x.shape[0])])


def _fit_static_batch(model: torch.nn.Module, batched: bool) -> torch.nn.Module:
    """Wrap a ``torch.export`` program traced with batch size 1 to run sample by sample."""
    from hesse.io.load import static_batch

    shape = static_batch(model)
    if shape is None or not batched or not shape:
        return model
    if shape[0] == 1:
        return _PerSample(model)
    raise UnsupportedModelError(
        f"hesse compute: the model was exported with a static batch size of {shape[0]} "
        f"(input {list(shape)}); re-export it with batch size 1 or a dynamic batch "
        "dimension (torch.export.Dim)"
    )


def _summary(args: argparse.Namespace, handle: Any, seconds: float, world: int) -> None:
    shape = tuple(getattr(handle, "shape", ()))
    if isinstance(handle, Path):
        shape = _safetensors_shape(handle, args.quantity)
    procs = f", {world} processes" if world > 1 else ""
    print(
        f"hesse compute: {args.quantity} {list(shape)} -> {args.out} "
        f"({seconds:.1f} s{procs}); manifest {args.out}.manifest.json"
    )


def _safetensors_shape(path: Path, name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        return tuple(fh.get_slice(name).get_shape())


def _plot(args: argparse.Namespace, handle: Any, sample_shape: tuple[int, ...]) -> None:
    """Save a heatmap of the Hessian (averaged down when large) or an image of the diagonal."""
    from hesse import plotting

    n = int(np.prod(sample_shape))
    if isinstance(handle, Path):
        from safetensors.numpy import load_file

        handle = load_file(str(handle))[args.quantity]
    first = handle[0] if args.batched else handle
    if args.quantity == "hessian":
        if np.prod(first.shape) != n * n:
            raise UnsupportedInputError("hesse compute: --plot needs the Hessian of one output")
        fig = plotting.plot_hessian(_pooled(first, n), title=f"Hessian ({n} x {n})")
    elif args.quantity == "hessian_diag":
        diag = np.asarray(first, dtype=np.float64).reshape(-1)
        if diag.size != n:
            raise UnsupportedInputError("hesse compute: --plot needs the diagonal of one output")
        rows = n // sample_shape[-1] if sample_shape else 1
        fig = plotting.plot_diagonal(diag, (rows, n // rows))
    else:
        raise UnsupportedInputError("hesse compute: --plot draws hessian or hessian_diag")
    fig.savefig(args.plot, dpi=120)


def _pooled(arr: Any, n: int) -> np.ndarray:
    """The ``(n, n)`` matrix averaged over ``k x k`` tiles to at most ``_PLOT_SIDE`` a side."""
    k = -(-n // _PLOT_SIDE)
    side = -(-n // k)
    out = np.zeros((side, side))
    rows_per = max(k, (1 << 24) // max(n, 1) // k * k)
    for r0 in range(0, n, rows_per):
        r1 = min(n, r0 + rows_per)
        part = np.asarray(_rows(arr, n, r0, r1), dtype=np.float64)
        pad = np.zeros((-(-(r1 - r0) // k) * k, side * k))
        pad[: r1 - r0, :n] = part
        out[r0 // k : r0 // k + pad.shape[0] // k] = pad.reshape(-1, k, side, k).mean(axis=(1, 3))
    return out


def _rows(arr: Any, n: int, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of an ``(n, n)`` matrix stored as any array shaped ``S + S``."""
    if arr.ndim == 2:
        return np.asarray(arr[r0:r1])
    if isinstance(arr, np.ndarray):
        return arr.reshape(n, n)[r0:r1]
    return np.asarray(arr[...]).reshape(n, n)[r0:r1]
