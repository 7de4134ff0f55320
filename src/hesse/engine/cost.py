"""Cost of the structured engine, from one values-only pass over one sample.

The estimate counts multiply-adds per sample (see the design notes):

- tangents: ``d`` times the forward pass (``d`` = inputs, or the bottleneck width);
- per selected output: one backward pass (~2 forwards), and for every nonlinear node with
  ``I`` inputs the term ``I d^2`` (``I d`` for diagonals and Laplacians); the generic rule
  pays ``d`` Hessian-vector products of the op itself on top;
- the bottleneck sandwich ``W^T H W``: ``n1^2 n + n1 n^2`` per output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

from .graph import Graph
from .rules.tuples import is_tensors
from .tangents import find_seed

# NOTE: [time estimates]
# Estimated seconds = MACs / mac_rate + bytes / byte_rate, per device type and element
# size. The multiply-adds include each strategy's fixed overheads (in MAC equivalents);
# the bytes are what the call writes and reads (activations, tangents, terms, result).
# The CPU float64 rates are fitted by benchmarks/calibrate.py on 12 cases of the suite
# (one thread; benchmarks/results/calibration): the pair whose first picks lose least to
# the fastest, ties broken by the log error of the time. float32 assumes twice the MAC
# rate at the same bandwidth; GPU rates are not calibrated (placeholders, same idea).
RATES: dict[tuple[str, int], tuple[float, float]] = {
    # (device type, bytes per element): (MACs per second, bytes per second)
    ("cpu", 8): (6.68e9, 5.62e9),
    ("cpu", 4): (1.34e10, 5.62e9),
    ("cuda", 8): (5.0e12, 3.0e12),
    ("cuda", 4): (5.0e13, 3.0e12),
}


def seconds(macs: float, traffic: float, device: str, itemsize: int) -> float:
    """Estimated seconds of a call doing ``macs`` multiply-adds and moving ``traffic`` bytes.

    Args:
        macs: Multiply-adds (with overheads in MAC equivalents).
        traffic: Bytes written and read.
        device: Device type (``"cpu"``, ``"cuda"``, ...; others are costed as CPU).
        itemsize: Bytes per element of the input's dtype.
    """
    mac_rate, byte_rate = RATES.get(
        (device, itemsize), RATES.get(("cpu", itemsize), RATES[("cpu", 4)])
    )
    return macs / mac_rate + traffic / byte_rate


@dataclass(frozen=True)
class GraphCost:
    """What the cost model needs to know about a captured model (per sample).

    Attributes:
        forward_macs: Multiply-adds of one forward pass.
        term_sizes: Input sizes ``I`` of the nonlinear nodes with a closed-form term.
        generic_sizes: Input sizes of the nonlinear nodes handled by the generic rule.
        d: Tangent directions (inputs, or the bottleneck width).
        n: Inputs.
        bottleneck: Whether tangents start at a narrowing Linear layer.
        nodes: Number of captured nodes (per-node overhead).
        taylor: Whether every curved node has a closed Taylor-mode rule.
        total_size: Entries of all values that carry tangents (per sample).
        max_size: Entries of the largest of them.
    """

    forward_macs: float
    term_sizes: tuple[int, ...]
    generic_sizes: tuple[int, ...]
    d: int
    n: int
    bottleneck: bool
    nodes: int
    taylor: bool = True
    total_size: int = 0
    max_size: int = 0

    def macs(self, quantity: str, m: int, mode: str = "gram") -> float:
        """Estimated multiply-adds per sample for ``quantity`` with ``m`` outputs.

        ``mode`` is ``"gram"`` (per-layer terms, ``I d^2`` each), ``"sweep"`` (the
        rule-based reverse sweep: another ``d`` passes through the transposed layers) or
        ``"taylor"`` (``P`` second-order coefficients pushed forward with the tangents:
        ``P = 1`` for Laplacians, ``d`` for diagonals, ``d (d + 1) / 2`` for Hessians;
        no per-output cost, from the input only).
        """
        d, f = self.d, self.forward_macs
        if mode == "taylor":
            if not self.taylor:
                return float("inf")
            p = {"laplacian": 1, "hessian_diag": self.n}.get(quantity, self.n * (self.n + 1) // 2)
            return (self.n + p) * f + p * (sum(self.term_sizes) + 10 * sum(self.generic_sizes))
        diag = quantity in ("hessian_diag", "laplacian") and not self.bottleneck
        total = d * f
        if quantity == "jacobian":
            return total + (m * d * self.n if self.bottleneck else 0.0)
        width = d if diag or mode == "sweep" else d * d
        per_output = 2 * f + sum(self.term_sizes) * width
        per_output += sum(self.generic_sizes) * (width + 10 * d)
        if mode == "sweep":
            per_output += d * f
        if self.bottleneck:
            per_output += d * d * self.n + (d * self.n * self.n if quantity != "laplacian" else 0)
        return total + m * per_output

    def overhead(self, quantity: str, m: int) -> float:
        """Fixed cost of one call in multiply-add equivalents (Python and dispatch).

        Every node costs ~30 us (1.5e6 at ~50 GMAC/s); a node of the generic rule runs
        vectorised ``torch.func`` transforms, ~200 us (1e7), again per output.
        """
        per_output = 1e7 * len(self.generic_sizes) if quantity != "jacobian" else 0.0
        return 1.5e6 * self.nodes + m * per_output

    def sample_bytes(self, quantity: str, m: int, mode: str, itemsize: int) -> float:
        """Working bytes of one sample (an upper estimate): tangents, terms, coefficients.

        Gram and sweep modes keep the tangents of the curved nodes' inputs (at most every
        value's, ``d * total_size``) and per-output ``d x d`` terms; Taylor mode keeps a
        few values' tangents and coefficients alive at a time.
        """
        d = self.d
        if mode == "taylor":
            p = {"laplacian": 1, "hessian_diag": self.n}.get(quantity, self.n * (self.n + 1) // 2)
            entries = 4 * (self.n + p) * self.max_size + m * p
        else:
            entries = d * self.total_size + (2 * d * self.max_size if mode == "sweep" else 0)
            if quantity not in ("jacobian", "laplacian", "hessian_diag") or self.bottleneck:
                entries += 3 * m * d * max(d, self.n if self.bottleneck else d)
        return float(itemsize * (entries + 2 * self.max_size))

    def traffic(self, quantity: str, m: int, mode: str, itemsize: int) -> float:
        """Bytes one sample writes and reads: every tangent-carrying value, and the terms.

        Each value's ``k`` tangent (and Taylor coefficient) columns are written once and read
        once (``2 k total_size``, ``k = d``, or ``n + P`` in Taylor mode); every per-layer
        term reads its input's tangents for each output (``m * sum(I) * width``).
        """
        if mode == "taylor":
            p = {"laplacian": 1, "hessian_diag": self.n}.get(quantity, self.n * (self.n + 1) // 2)
            return float(itemsize * 2 * (self.n + p) * self.total_size)
        diag = quantity in ("hessian_diag", "laplacian") and not self.bottleneck
        width = self.d if diag or mode == "sweep" else self.d * self.d
        terms = 0 if quantity == "jacobian" else m * sum(self.term_sizes + self.generic_sizes)
        sweep = 2 * self.d * self.total_size * m if mode == "sweep" else 0
        return float(itemsize * (2 * self.d * self.total_size + terms * width + sweep))

    def best(self, quantity: str, m: int) -> tuple[str, float]:
        """The cheapest mode for ``quantity`` (the sweep only computes whole Hessians)."""
        whole = quantity in ("hessian", "derivatives", "hvp")
        modes = ("gram", "sweep") if whole else ("gram",)
        if quantity != "jacobian":
            modes += ("taylor",)
        costs = {mode: self.macs(quantity, m, mode) for mode in modes}
        mode = min(costs, key=costs.__getitem__)
        return mode, costs[mode]


def _numel(value: torch.Tensor | tuple) -> int:
    """Entries of a tensor, or of a split's tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel()
    return sum(v.numel() for v in value)


def graph_cost(graph: Graph, inputs: tuple, x: torch.Tensor, n: int, batch: int) -> GraphCost:
    """Runs the captured graph (values only) and measures it per sample.

    Args:
        graph: The captured model.
        inputs: The values of the graph's inputs.
        x: The input in the model's layout (the shape it was captured at).
        n: Inputs per sample.
        batch: Samples in ``x`` (sizes are divided by it).
    """
    env = graph.env(inputs, x)
    if graph.input_node is None:  # the model does not read its input: nothing to push
        return GraphCost(1.0, (), (), n, n, False, len(graph.steps), True, n, n)
    seed = find_seed(graph, env, n)
    varying = {seed.node} if seed.matrix is not None else {graph.input_node}
    terms, generic = [], []
    taylor = True
    total_size = max_size = 0
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        for step in graph.steps:
            leaves, spec = tree_flatten((step.node.args, step.node.kwargs))
            values = [env[v] if isinstance(v, fx.Node) else v for v in leaves]
            args, kwargs = tree_unflatten(values, spec)
            env[step.node] = step.call(*args, **kwargs)
            inputs = [v for v in leaves if isinstance(v, fx.Node) and v in varying]
            out = env[step.node]
            if step.constant or not inputs:
                continue
            if not is_tensors(out) and not (
                isinstance(out, torch.Tensor) and out.is_floating_point()
            ):
                continue
            varying.add(step.node)
            size = sum(_numel(env[v]) for v in inputs) // batch
            total_size += _numel(out) // batch
            max_size = max(max_size, _numel(out) // batch, size)
            same_shape = getattr(env[inputs[0]], "shape", None) == getattr(out, "shape", None)
            kind, exact = step.rule.cost_kind(len(inputs), same_shape)
            {"term": terms, "generic": generic}.get(kind, []).append(size)  # type: ignore[arg-type]
            taylor &= exact
    return GraphCost(
        forward_macs=counter.get_total_flops() / 2 / batch,
        term_sizes=tuple(terms),
        generic_sizes=tuple(generic),
        d=seed.d,
        n=n,
        bottleneck=seed.matrix is not None,
        nodes=len(graph.steps),
        taylor=taylor,
        total_size=total_size + n,
        max_size=max(max_size, n),
    )
