"""Runs collapsed Taylor mode (PyPI ``jet-for-pytorch``) in its own Python (>= 3.12).

Started by :mod:`benchmarks.peers.jet_peers` as ``python3.12 jet_runner.py CASE.npz
THREADS``; imports neither hesse nor the benchmarks package. The ``.npz`` holds the MLP's
weights ``w0, b0, w1, b1, ...`` (torch layout), the input ``x`` ``(B, n)`` and ``meta`` (a
JSON string: activation, quantity, random directions); the MLP has one output. It builds the same
torch model, ``jet.laplacian`` of one sample (``vmap`` over samples), prints ``ready``
and then answers one line per command on stdin:

- ``run``: one call; replies ``{"ms": ...}``;
- ``fetch PATH``: one call, the result saved to ``PATH`` (``np.save``); replies as ``run``;
- ``mem``: one call after resetting the peak RSS; replies ``{"delta_mb": ...}``.

A call is the Laplacian ``(B,)`` (``laplacian``) or a training step, the gradient of
``mean(lap^2)`` with respect to the weights, flattened in parameter order
(``laplacian_train``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def build(path: str):
    """The zero-argument call described in the module docstring."""
    from jet import laplacian

    data = np.load(path)
    meta = json.loads(str(data["meta"]))
    count = sum(1 for k in data.files if k.startswith("w"))
    layers: list[nn.Module] = []
    for i in range(count):
        w, b = torch.from_numpy(data[f"w{i}"]), torch.from_numpy(data[f"b{i}"])
        lin = nn.Linear(w.shape[1], w.shape[0]).to(w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        layers += [lin] + ([{"tanh": nn.Tanh}[meta["act"]]()] if i < count - 1 else [])
    model = nn.Sequential(*layers)
    x = torch.from_numpy(data["x"])
    f = model  # one output (jet has no rule for slicing)
    kwargs = {}
    if meta.get("randomized"):
        kwargs["randomization"] = ("rademacher", int(meta["randomized"]))
    lap = torch.func.vmap(laplacian(f, (torch.zeros_like(x[0]),), **kwargs), randomness="different")
    params = list(model.parameters())
    if meta["quantity"] == "laplacian":
        model.requires_grad_(False)

        def call() -> torch.Tensor:
            with torch.no_grad():
                return lap(x)[:, 0]

        return call

    def step() -> torch.Tensor:
        loss = (lap(x)[:, 0] ** 2).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for g, p in zip(grads, params, strict=True)
            ]
        )

    return step


def main() -> int:
    """Serves commands until stdin closes."""
    torch.set_num_threads(int(sys.argv[2]))
    call = build(sys.argv[1])
    call()  # warm-up (capture, caches)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "mem":
            Path("/proc/self/clear_refs").write_text("5")
            base = _status_kb("VmRSS")
            call()
            print(json.dumps({"delta_mb": max(0, _status_kb("VmHWM") - base) / 1024}), flush=True)
            continue
        t0 = time.perf_counter()
        result = call()
        ms = 1e3 * (time.perf_counter() - t0)
        if cmd == "fetch":
            np.save(arg, result.detach().numpy())
        print(json.dumps({"ms": ms}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
