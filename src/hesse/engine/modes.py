"""Quantities from one structured pass: Jacobian, gradient, Hessian, diagonal, Laplacian."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .graph import Graph
from .rules.base import NoTaylorRule, diagonal_pairs
from .rules.tuples import accumulate
from .tangents import Record, Seed, find_seed, forward


def _terms(records: list[Record], grads: tuple, batch: int, diag: bool, d: int, like):
    """Sum of the nonlinear nodes' terms: ``(B, d, d)`` or ``(B, d)``."""
    parts = [
        part
        for record, g in zip(records, grads, strict=True)
        if (part := record.step.rule.term(record.site, g, batch, diag)) is not None
    ]
    if not parts:
        return like.new_zeros((batch, d) if diag else (batch, d, d))
    return torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]


def _sweep(records: list[Record], grads: dict, start, d: int, batch: int, like) -> torch.Tensor:
    """The Hessian in the seed's coordinates by the rule-based reverse sweep: ``(B, d, d)``.

    See NOTE: [reverse sweep] in :mod:`.rules.base`.
    """
    gdot: dict = {}
    for record in reversed(records):
        rule, site = record.step.rule, record.site
        incoming = gdot.pop(record.step.node, None)
        parts = [rule.transpose(site, incoming)] if incoming is not None else []
        g = grads.get(record.step.node)
        curv = rule.curvature(site, g) if g is not None else None
        if curv is not None:
            parts.append(curv)
        for part in parts:
            for node, value in zip(record.inputs, part, strict=True):
                gdot[node] = accumulate(gdot.get(node), value)
    if start not in gdot:
        return like.new_zeros((batch, d, d))
    return gdot[start].reshape(d, batch, -1).transpose(0, 1)


def _to_input(seed: Seed, h: torch.Tensor, diag: bool) -> torch.Tensor:
    """Maps a Hessian in the seed's coordinates to the input: ``W^T H W`` (bottleneck)."""
    w = seed.matrix
    if w is None:
        return h
    hw = torch.matmul(h, w)  # (B, n1, n)
    if diag:
        return (hw * w).sum(-2)
    return torch.matmul(w.t(), hw)


def structured_pass(
    graph: Graph,
    inputs: tuple,
    x: torch.Tensor,
    to_model: Callable[[torch.Tensor], torch.Tensor],
    batch: int,
    index: torch.Tensor | None,
    want: frozenset[str],
    mode: str = "gram",
    differentiable: bool = False,
) -> dict[str, torch.Tensor]:
    """Computes the requested pieces for a sub-batch.

    Args:
        graph: The captured model (captured at this sub-batch's shape).
        inputs: The values of the graph's inputs (parameters, buffers, ...).
        x: Flat inputs of the sub-batch, ``(s, n)``.
        to_model: Reshapes ``(s, n)`` to the model's input layout.
        batch: ``s`` when batched, 1 for a single sample.
        index: Flat indices of the selected outputs (``None``: all).
        want: Any of ``"jacobian"``, ``"gradient"``, ``"hessian"``, ``"diag"``,
            ``"laplacian"``.
        mode: ``"gram"`` (sum of per-layer terms), ``"sweep"`` (rule-based
            forward-over-reverse; Hessians only) or ``"taylor"`` (second-order
            coefficients pushed forward; no bottleneck).
        differentiable: Keep the result in autograd's graph (``create_graph=True``):
            gradients flow to ``x`` and to the graph's inputs.

    Returns:
        ``jacobian`` and ``gradient`` ``(s, m, n)``, ``hessian`` ``(s, m, n, n)``,
        ``diag`` ``(s, m, n)``, ``laplacian`` ``(s, m)``, as requested.
    """
    n = x.shape[1]
    if graph.input_node is None:  # the model does not read its input
        return _zeros(graph, inputs, batch, n, index, want, x)
    if mode == "taylor":
        env = graph.env(inputs, to_model(x if differentiable else x.detach()))
        seed = Seed(graph.input_node, n, None)  # from the input: no bottleneck
        try:
            return _taylor(graph, env, seed, batch, index, want, differentiable)
        except NoTaylorRule:
            mode = "gram"  # an op without a closed form (the cost model avoids this)
    with torch.enable_grad():
        xin = to_model(x if differentiable else x.detach())
        if not xin.requires_grad:
            xin = xin.requires_grad_(True) if xin._base is None else xin.clone().requires_grad_()
        env = graph.env(inputs, xin)
        seed = find_seed(graph, env, n)
        sweep = mode == "sweep"
        res = forward(
            graph,
            env,
            seed,
            keep_linear=sweep,
            jacobian="jacobian" in want,
            differentiable=differentiable,
        )
        y = res.value.reshape(batch, -1)
        j_out = res.tangent.reshape(seed.d, batch, -1)
        if index is not None:
            y, j_out = y.index_select(1, index), j_out.index_select(2, index)
        result: dict[str, torch.Tensor] = {}
        if "jacobian" in want:
            jac = j_out.permute(1, 2, 0)  # (B, m, d)
            result["jacobian"] = jac if seed.matrix is None else jac @ seed.matrix
        second = want & {"hessian", "diag", "laplacian"}
        if second or "gradient" in want:
            result.update(
                _second_order(
                    res.records,
                    xin,
                    y,
                    seed,
                    batch,
                    second,
                    "gradient" in want,
                    res.start if sweep else None,
                    differentiable,
                )
            )
    return result


def _zeros(
    graph: Graph,
    inputs: tuple,
    batch: int,
    n: int,
    index: torch.Tensor | None,
    want: frozenset[str],
    like: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Every derivative of a model that does not read its input: zeros of the right shapes."""
    env = graph.env(inputs, like)
    with torch.no_grad():
        for step in graph.steps:
            leaves, spec = tree_flatten((step.node.args, step.node.kwargs))
            values = [env[v] if isinstance(v, fx.Node) else v for v in leaves]
            args, kwargs = tree_unflatten(values, spec)
            env[step.node] = step.call(*args, **kwargs)
    y = env[graph.output_node].reshape(batch, -1)
    m = y.shape[1] if index is None else index.numel()
    tails = {"jacobian": (n,), "gradient": (n,), "hessian": (n, n), "diag": (n,), "laplacian": ()}
    return {k: like.new_zeros((batch, m, *tails[k])) for k in want}


def _taylor(
    graph: Graph,
    env: dict,
    seed: Seed,
    batch: int,
    index: torch.Tensor | None,
    want: frozenset[str],
    differentiable: bool,
) -> dict[str, torch.Tensor]:
    """Taylor mode (see NOTE: [Taylor mode] in :mod:`.rules.base`): one forward pass.

    Args:
        graph: The captured model.
        env: Its inputs bound, the input in the model's layout (``s`` samples of ``d``).
        seed: The input node with ``d`` directions (no bottleneck).
        batch: ``s`` when batched, 1 for a single sample.
        index: Flat indices of the selected outputs (``None``: all).
        want: As for :func:`structured_pass`.
        differentiable: Keep the result in autograd's graph.

    Returns:
        As :func:`structured_pass`: ``(s, m, ...)`` arrays.

    Raises:
        NoTaylorRule: A curved op has no closed Taylor rule.
    """
    d = seed.d
    x = env[graph.input_node]
    kind = "hessian" if "hessian" in want else "diag" if "diag" in want else "laplacian"
    if kind == "laplacian":
        pairs = None
    elif kind == "diag":
        pairs = diagonal_pairs(d, x.device)
    else:
        iu = torch.triu_indices(d, d, device=x.device)
        pairs = (iu[0], iu[1])
    with torch.enable_grad() if differentiable else torch.no_grad():
        res = forward(
            graph, env, seed, jacobian=True, taylor=(pairs,), differentiable=differentiable
        )
    j_out = res.tangent.reshape(d, batch, -1)
    s_out = res.second.reshape(-1, batch, j_out.shape[-1])  # type: ignore[union-attr]
    if index is not None:
        j_out, s_out = j_out.index_select(2, index), s_out.index_select(2, index)
    result: dict[str, torch.Tensor] = {}
    if want & {"jacobian", "gradient"}:
        jac = j_out.permute(1, 2, 0)  # (B, m, d)
        result.update({key: jac for key in want & {"jacobian", "gradient"}})
    coeffs = s_out.permute(1, 2, 0)  # (B, m, P)
    if kind == "laplacian":
        result["laplacian"] = coeffs[..., 0]
    elif kind == "diag":
        result["diag"] = coeffs
        if "laplacian" in want:
            result["laplacian"] = coeffs.sum(-1)
    else:
        h = coeffs.new_zeros(*coeffs.shape[:2], d, d)
        h[..., pairs[0], pairs[1]] = coeffs  # type: ignore[index]
        h[..., pairs[1], pairs[0]] = coeffs  # type: ignore[index]
        result["hessian"] = h
        result["diag"] = h.diagonal(dim1=-2, dim2=-1)
        result["laplacian"] = result["diag"].sum(-1)
    return result


def directional_pass(
    graph: Graph,
    inputs: tuple,
    x: torch.Tensor,
    to_model: Callable[[torch.Tensor], torch.Tensor],
    index: torch.Tensor | None,
    directions: torch.Tensor,
    mode: str = "taylor",
    differentiable: bool = False,
) -> torch.Tensor:
    """``v_k^T H v_k`` for given directions ``v_k``: ``(s, m, K)``.

    The tangents start as the directions instead of the identity. ``"taylor"``: the
    diagonal pairs ``(k, k)`` give one second-order coefficient per direction (NOTE:
    [Taylor mode]), no backward pass. ``"gram"``: one backward pass per selected output,
    and each curved node adds ``g phi'' J_k^2`` (the diagonal of its term in the
    directions' coordinates), no coefficients through the linear layers.

    Args:
        graph: The captured model.
        inputs: The values of the graph's inputs (parameters, buffers, ...).
        x: Flat inputs of the sub-batch, ``(s, n)``.
        to_model: Reshapes ``(s, n)`` to the model's input layout.
        index: Flat indices of the selected outputs (``None``: all).
        directions: ``(K, s, n)``.
        mode: ``"taylor"`` or ``"gram"``.
        differentiable: Keep the result in autograd's graph.

    Raises:
        NoTaylorRule: Taylor mode, and a curved op has no closed Taylor rule.
    """
    k, s = directions.shape[0], x.shape[0]
    if graph.input_node is None:  # the model does not read its input
        zeros = _zeros(graph, inputs, s, 1, index, frozenset({"laplacian"}), x)["laplacian"]
        return zeros[..., None].expand(*zeros.shape, k)
    with torch.enable_grad() if differentiable or mode == "gram" else torch.no_grad():
        xin = to_model(x if differentiable else x.detach())
        if mode == "gram" and not xin.requires_grad:
            xin = xin.requires_grad_(True) if xin._base is None else xin.clone().requires_grad_()
        env = graph.env(inputs, xin)
        seed = Seed(graph.input_node, k, None, directions.reshape(k, *xin.shape))
        if mode == "gram":
            res = forward(graph, env, seed, jacobian=False, differentiable=differentiable)
            y = res.value.reshape(s, -1)
            y = y if index is None else y.index_select(1, index)
            out = _second_order(res.records, xin, y, seed, s, {"diag"}, False, None, differentiable)
            return out["diag"]
        pairs = diagonal_pairs(k, x.device)
        res = forward(
            graph, env, seed, jacobian=True, taylor=(pairs,), differentiable=differentiable
        )
    coeffs = res.second.reshape(k, s, -1)  # type: ignore[union-attr]
    if index is not None:
        coeffs = coeffs.index_select(2, index)
    return coeffs.permute(1, 2, 0)


def _adjoints(
    y: torch.Tensor, outputs: list[torch.Tensor], differentiable: bool = False
) -> tuple[torch.Tensor, ...]:
    """Adjoints of every output ``k`` w.r.t. ``outputs``, stacked first: ``(m, *shape)``.

    One vectorised backward pass for all selected outputs (``is_grads_batched``); a loop
    over outputs where an op has no batching rule for its backward.
    """
    m = y.shape[1]
    if m == 1:
        grads = torch.autograd.grad(
            y.sum(),
            outputs,
            retain_graph=True,
            create_graph=differentiable,
            allow_unused=True,
            materialize_grads=True,
        )
        return tuple(g[None] for g in grads)
    seeds = torch.eye(m, dtype=y.dtype, device=y.device)[:, None, :].expand(m, *y.shape)
    try:
        return torch.autograd.grad(
            y,
            outputs,
            seeds,
            retain_graph=True,
            create_graph=differentiable,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=True,
        )
    except RuntimeError:
        per_k = [
            torch.autograd.grad(
                y[:, k].sum(),
                outputs,
                retain_graph=True,
                create_graph=differentiable,
                allow_unused=True,
                materialize_grads=True,
            )
            for k in range(m)
        ]
        return tuple(torch.stack(gs) for gs in zip(*per_k, strict=True))


def _second_order(
    records, xin, y, seed: Seed, batch, second: set, gradient: bool, start, differentiable: bool
):
    curved = [r for r in records if not r.step.rule.linear]
    grads = _adjoints(y, [r.site.output for r in curved] + [xin], differentiable)
    result: dict[str, torch.Tensor] = {}
    if gradient:
        grad = grads[-1].reshape(y.shape[1], batch, -1)
        result["gradient"] = (grad if differentiable else grad.detach()).movedim(0, 1)
    if not second:
        return result
    want_lap = "laplacian" in second
    second = (second - {"laplacian"}) | ({"diag"} if want_lap else set())
    diag_only = second == {"diag"} and seed.matrix is None

    def one_output(*gs: torch.Tensor) -> torch.Tensor:
        if start is not None:
            by_node = {r.step.node: g for r, g in zip(curved, gs, strict=True)}
            return _sweep(records, by_node, start, seed.d, batch, y)
        return _terms(records, gs, batch, diag_only, seed.d, y)

    with torch.enable_grad() if differentiable else torch.no_grad():
        adj = grads[:-1]
        if y.shape[1] == 1 or start is not None or not adj:  # the sweep is batched over d
            h = torch.stack([one_output(*(g[k] for g in adj)) for k in range(y.shape[1])])
            # (with no curved node, every term is zero: one_output returns zeros)
        else:
            h = vmap(one_output)(*adj)
        if "hessian" in second:
            result["hessian"] = _to_input(seed, h, diag=False).movedim(0, 1)
        if "diag" in second:
            if diag_only:
                diag = h
            elif seed.matrix is not None:
                diag = _to_input(seed, h, diag=True)
            else:
                diag = h.diagonal(dim1=-2, dim2=-1)
            result["diag"] = diag.movedim(0, 1)
            if want_lap:
                result["laplacian"] = result["diag"].sum(-1)
    return result
