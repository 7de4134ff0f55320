"""A PINN training loop under ``hesse.settings(compile=...)``: when ``"auto"`` compiles.

``python -m benchmarks.pinn_compile_loop --steps 1500 --out benchmarks/results/pinn2/loop``
trains the same MLP (``d``-128x4-1 tanh, the Laplacian with ``create_graph=True``, loss
``mean(lap^2)``, Adam) for ``--steps`` steps three times in one process, one torch thread:
``compile=False`` (eager program), ``compile=True`` (compiled on the third call) and
``compile="auto"`` (the default: compiled once the ski-rental rule says it pays). It
writes per-step times, the step at which ``"auto"`` compiled, the cumulative times and
``Plan.program`` of each run to ``results.json`` and ``results.md``.

Runs in a fresh process so that ``"auto"`` starts from the constant compile-cost estimate
(the ``True`` run goes last: what it measures of compiling is not learned before ``"auto"``
has decided).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import hesse


def _model(d: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(d, 128), nn.Tanh()]
    for _ in range(3):
        layers += [nn.Linear(128, 128), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(128, 1)).to(dtype)


def run(setting: bool | str, steps: int, d: int, batch: int, dtype: torch.dtype) -> dict:
    """Trains for ``steps`` steps under ``settings(compile=setting)``; per-step seconds."""
    model = _model(d, dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, d, dtype=dtype, generator=gen)
    kw = {"batched": True, "output": 0, "create_graph": True, "strategy": "structured"}
    times, switched, notes = [], None, []
    with hesse.settings(compile=setting):
        for i in range(steps):
            start = time.perf_counter()
            lap = hesse.laplacian(model, x, **kw)
            loss = (lap**2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
            if switched is None and i % 25 == 0:
                note = hesse.plan(model, x, "laplacian", **kw).program or ""
                if "compiled whole by" in note or "not compiled (" in note:
                    switched = i
                notes.append((i, note))
        notes.append((steps, hesse.plan(model, x, "laplacian", **kw).program))
    return {"setting": setting, "times": times, "switched_near": switched, "notes": notes}


def main() -> None:
    """Runs the three settings and writes the results."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dtype", default="float64")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    runs = [run(s, args.steps, args.d, args.batch, dtype) for s in (False, "auto", True)]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = vars(args) | {"out": str(args.out)}
    (args.out / "results.json").write_text(json.dumps({"args": meta, "runs": runs}, indent=1))
    lines = [
        f"# compile=False / 'auto' / True: {args.steps} training steps, MLP {args.d}-128x4-1 "
        f"tanh, B={args.batch}, {args.dtype}, 1 thread\n",
        "| setting | total s | first 10 steps s | median step ms (last 100) | decided near step |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        t = r["times"]
        tail = sorted(t[-100:])[len(t[-100:]) // 2]
        lines.append(
            f"| {r['setting']} | {sum(t):.1f} | {sum(t[:10]):.1f} | {1e3 * tail:.1f} | "
            f"{r['switched_near'] if r['setting'] == 'auto' else ''} |"
        )
    lines += ["", "Plan.program at the end:", ""]
    lines += [f"- {r['setting']}: {r['notes'][-1][1]}" for r in runs]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
