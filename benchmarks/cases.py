"""The benchmark cases: a registry of models, inputs and the quantity each one asks for.

Every case builds its weights and input in float32 from a fixed seed and casts them to the
requested dtype, so the float32 and float64 runs differentiate exactly the same function.
The peers get the same tensors (torch), or the same numbers as numpy arrays (JAX, via
:attr:`Instance.weights`).

Common layout of a result (what every method must return, the ``flat=True`` layout of
hesse): ``[B] + [m] + T`` with ``B`` present for batched cases, ``m`` present when several
outputs are selected, and ``T = (n, n)`` (hessian), ``(n,)`` (hessian_diag) or ``()``
(laplacian), ``n`` the number of per-sample input entries.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

Quantity = Literal["hessian", "hessian_diag", "laplacian", "laplacian_train"]
# "laplacian_train": one PINN training step, the Laplacian kept differentiable
# (create_graph=True), loss = mean over samples and outputs of Laplacian^2, backward to
# the weights; the result is the weights' gradient, flattened in parameter order, (P,).
Output = int | tuple[int, ...] | None


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        id: Readable id, used on the command line and in the tables.
        title: One-line description for the report.
        family: Model family, a key of :data:`FAMILIES`.
        quantity: What is computed.
        input_shape: Per-sample input shape ``S``.
        batch: Number of independent samples ``B``; ``None`` for one unbatched input.
        output: ``None`` (all outputs), an int (one flat output index) or a tuple of
            flat indices (several outputs).
        config: Family parameters (widths, activation, ...).
        seed: Seed of the weights and input.
    """

    id: str
    title: str
    family: str
    quantity: Quantity
    input_shape: tuple[int, ...]
    batch: int | None
    output: Output
    config: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def n(self) -> int:
        """Number of per-sample input entries."""
        return math.prod(self.input_shape)

    @property
    def batched(self) -> bool:
        """Whether the input carries a leading batch dimension."""
        return self.batch is not None

    @property
    def samples(self) -> int:
        """Number of samples (1 when unbatched)."""
        return self.batch or 1

    @property
    def n_outputs(self) -> int:
        """Number of selected outputs ``m`` (1 for a scalar selection)."""
        if isinstance(self.output, int):
            return 1
        if self.output is None:
            return FAMILIES[self.family].n_outputs(self.config)
        return len(self.output)

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """``[B] + [m]``: the batch and selected-output dimensions of the result."""
        lead = (self.batch,) if self.batched else ()
        several = isinstance(self.output, tuple) or (
            self.output is None and FAMILIES[self.family].n_outputs(self.config) > 1
        )
        return lead + ((self.n_outputs,) if several else ())

    @property
    def result_shape(self) -> tuple[int, ...]:
        """Shape of the result in the common layout, ``[B] + [m] + T``."""
        if self.quantity == "laplacian_train":
            return (mlp_parameters(self.config),)
        tail = {"hessian": (self.n, self.n), "hessian_diag": (self.n,), "laplacian": ()}
        return self.lead_shape + tail[self.quantity]

    @property
    def randomized(self) -> int | None:
        """Directions of a randomized estimate (``None``: exact)."""
        return self.config.get("randomized")


@dataclass
class Instance:
    """A case built at one dtype: the torch model, the input and the weights as numpy.

    Attributes:
        case: The case.
        dtype: Floating dtype of weights and input.
        model: The torch model (eval mode, parameters frozen); takes ``(B, *S)`` or ``S``.
        x: The input, ``(B, *S)`` when batched else ``S``.
        weights: Parameter and buffer name -> numpy array (same numbers as the model).
    """

    case: Case
    dtype: torch.dtype
    model: nn.Module
    x: torch.Tensor
    weights: dict[str, np.ndarray]

    def select(self, y: torch.Tensor) -> torch.Tensor:
        """Selected outputs of one sample's output ``y`` (shape ``O``): shape ``Q``."""
        out = self.case.output
        if out is None:
            return y.reshape(-1) if y.dim() > 0 else y
        flat = y.reshape(-1)
        return flat[out] if isinstance(out, int) else flat[list(out)]

    def per_sample(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``S -> Q``: the selected outputs of the model on one sample."""
        if self.case.batched:
            return lambda xs: self.select(self.model(xs.unsqueeze(0))[0])
        return lambda xs: self.select(self.model(xs))

    def batched_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *S) -> (B, m)``: selected outputs of every sample (batched cases)."""
        y = self.model(x).reshape(x.shape[0], -1)
        out = self.case.output
        if out is None:
            return y
        return y[:, [out]] if isinstance(out, int) else y[:, list(out)]


# --------------------------------------------------------------------------------------
# Model families
# --------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "softplus": nn.Softplus}


def _mlp(config: Mapping[str, Any]) -> nn.Module:
    sizes = list(config["sizes"])
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes[:-1]):
        layers += [nn.Linear(a, b), ACTIVATIONS[config["act"]]()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


def mlp_parameters(config: Mapping[str, Any]) -> int:
    """Number of weights and biases of an MLP config."""
    return sum(a * b + b for a, b in itertools.pairwise(config["sizes"]))


def _mlp_macs(config: Mapping[str, Any]) -> int:
    sizes = list(config["sizes"])
    return sum(a * b for a, b in itertools.pairwise(sizes))


class SmallCNN(nn.Module):
    """1x28x28 -> conv 16 3x3 -> tanh -> conv 32 3x3 stride 2 -> tanh -> linear 10.

    Takes ``(1, 28, 28)`` or ``(B, 1, 28, 28)``; returns ``(10,)`` or ``(B, 10)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2)
        self.head = nn.Linear(32 * 12 * 12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.head(h.flatten(-3))


def _cnn_macs(config: Mapping[str, Any]) -> int:
    return 26 * 26 * 16 * 9 + 12 * 12 * 32 * 16 * 9 + 32 * 12 * 12 * 10


class PairEnergy(nn.Module):
    """Interatomic-potential-like energy of ``N`` atoms.

    Per-atom descriptors ``G_ik = sum_{j != i} exp(-eta (r_ij - mu_k)^2)`` of the pairwise
    distances, energy ``E = sum_i MLP(G_i)`` (tanh MLP ``K-64-64-1``). Takes ``(N, 3)`` or
    ``(B, N, 3)``; returns ``()`` or ``(B,)``.
    """

    def __init__(self, atoms: int, features: int, eta: float = 4.0) -> None:
        super().__init__()
        self.eta = eta
        self.register_buffer("mu", torch.linspace(0.5, 3.0, features))
        self.register_buffer("offdiag", 1.0 - torch.eye(atoms))
        self.mlp = _mlp({"sizes": (features, 64, 64, 1), "act": "tanh"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diff = x.unsqueeze(-2) - x.unsqueeze(-3)  # (..., N, N, 3)
        # the identity on the diagonal keeps sqrt away from 0; those pairs are masked out
        r = ((diff**2).sum(-1) + (1.0 - self.offdiag)).sqrt()  # (..., N, N)
        phi = torch.exp(-self.eta * (r.unsqueeze(-1) - self.mu) ** 2)  # (..., N, N, K)
        g = (phi * self.offdiag.unsqueeze(-1)).sum(-2)  # (..., N, K)
        return self.mlp(g).squeeze(-1).sum(-1)


def _atoms_macs(config: Mapping[str, Any]) -> int:
    n, k = config["atoms"], config["features"]
    return n * (k * 64 + 64 * 64 + 64) + n * n * (3 + 2 * k)


def _atoms_input(case: Case, gen: torch.Generator) -> torch.Tensor:
    n = case.config["atoms"]
    grid = torch.stack(torch.meshgrid(*(torch.arange(4.0),) * 3, indexing="ij"), -1)
    sites = grid.reshape(-1, 3)[:n] * 1.1
    return sites + 0.1 * torch.randn(sites.shape, generator=gen)


def _uniform_input(low: float, high: float) -> Callable[[Case, torch.Generator], torch.Tensor]:
    def make(case: Case, gen: torch.Generator) -> torch.Tensor:
        shape = ((case.batch,) if case.batched else ()) + case.input_shape
        return low + (high - low) * torch.rand(shape, generator=gen)

    return make


@dataclass(frozen=True)
class Family:
    """How to build a model family.

    Attributes:
        module: Config -> torch module (weights drawn from the global RNG).
        forward_macs: Config -> multiply-adds of one forward pass of one sample.
        n_outputs: Config -> number of per-sample outputs.
        make_input: (case, generator) -> float32 input.
    """

    module: Callable[[Mapping[str, Any]], nn.Module]
    forward_macs: Callable[[Mapping[str, Any]], int]
    n_outputs: Callable[[Mapping[str, Any]], int]
    make_input: Callable[[Case, torch.Generator], torch.Tensor]


FAMILIES: dict[str, Family] = {
    "mlp": Family(_mlp, _mlp_macs, lambda c: c["sizes"][-1], _uniform_input(-1.0, 1.0)),
    "cnn": Family(lambda c: SmallCNN(), _cnn_macs, lambda c: 10, _uniform_input(0.0, 1.0)),
    "atoms": Family(
        lambda c: PairEnergy(c["atoms"], c["features"]),
        _atoms_macs,
        lambda c: 1,
        lambda case, gen: _atoms_input(case, gen),
    ),
}


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------


def _pinn(d: int, quantity: Quantity, outputs: int = 1) -> Case:
    names = {"hessian": "hess", "hessian_diag": "diag", "laplacian": "lap"}
    out = "" if outputs == 1 else f"_{outputs}out"
    what = {"hessian": "d x d Hessians", "hessian_diag": "Hessian diagonals"}
    return Case(
        id=f"pinn_d{d}_{names[quantity]}{out}",
        title=f"PINN MLP {d}-128x4-{outputs} tanh, B=1024, per-sample "
        + what.get(quantity, "Laplacian" + (" of every output" if outputs > 1 else "")),
        family="mlp",
        quantity=quantity,
        input_shape=(d,),
        batch=1024,
        output=None if outputs > 1 else 0,
        config={"sizes": (d, 128, 128, 128, 128, outputs), "act": "tanh"},
        seed=d,
    )


def _train(d: int, batch: int, sizes: tuple[int, ...] | None = None, rand: int | None = None):
    """A PINN training step: Laplacian with create_graph=True, loss, backward to weights."""
    sizes = sizes or (d, 128, 128, 128, 128, 1)
    config: dict[str, Any] = {"sizes": sizes, "act": "tanh"}
    what = "exact Laplacian"
    if rand:
        config["randomized"] = rand
        what = f"randomized Laplacian ({rand} directions)"
    arch = "-".join(map(str, sizes)) if sizes[1] != 128 else f"{d}-128x4-1"
    return Case(
        id=f"train_d{d}" + ("_jet" if sizes[1] == 768 else "") + ("_rand" if rand else ""),
        title=f"PINN training step, MLP {arch} tanh, B={batch}: {what} with create_graph, "
        "loss mean(lap^2), backward to the weights",
        family="mlp",
        quantity="laplacian_train",
        input_shape=(d,),
        batch=batch,
        output=0,
        config=config,
        seed=1000 + d,
    )


JET_MLP = (50, 768, 768, 512, 512, 1)  # the torch-jet paper's MLP
MNIST = {"sizes": (784, 256, 256, 10), "act": "softplus"}

CASES: dict[str, Case] = {
    c.id: c
    for c in [
        _pinn(2, "hessian"),
        _pinn(8, "hessian"),
        _pinn(32, "hessian"),
        _pinn(8, "laplacian"),
        _pinn(32, "laplacian"),
        _pinn(8, "hessian_diag"),
        _pinn(32, "hessian_diag"),
        _pinn(3, "laplacian", outputs=3),
        Case("mnist_single", "MLP 784-256-256-10 softplus, Hessian of logit 3, one sample",
             "mlp", "hessian", (784,), None, 3, MNIST, seed=100),
        Case("mnist_b16", "MLP 784-256-256-10 softplus, Hessian of logit 3, B=16 per sample",
             "mlp", "hessian", (784,), 16, 3, MNIST, seed=100),
        Case("mnist_all10", "MLP 784-256-256-10 softplus, Hessians of all 10 logits, one sample",
             "mlp", "hessian", (784,), None, None, MNIST, seed=100),
        Case("cnn_single", "CNN 1x28x28 conv16-tanh-conv32/2-tanh-linear10, Hessian of logit 3",
             "cnn", "hessian", (1, 28, 28), None, 3, {}, seed=200),
        Case("atoms32", "Pair-feature energy of 32 atoms (16 RBF, MLP 16-64-64-1), 96x96 Hessian",
             "atoms", "hessian", (32, 3), None, None, {"atoms": 32, "features": 16}, seed=300),
        Case("jet_mlp_lap", "torch-jet paper MLP 50-768-768-512-512-1 tanh, B=128, Laplacian",
             "mlp", "laplacian", (50,), 128, 0, {"sizes": JET_MLP, "act": "tanh"}, seed=1050),
        _train(2, 1024),
        _train(8, 1024),
        _train(32, 512),
        _train(100, 256),
        _train(50, 128, JET_MLP),
        _train(1000, 32, rand=64),
    ]
}  # fmt: skip

QUICK_CASES = ("pinn_d8_hess", "pinn_d8_lap", "mnist_single", "atoms32")
TRAIN_CASES = tuple(k for k, c in CASES.items() if c.quantity == "laplacian_train")

# Tiny cases for the test suite (seconds); not part of the full suite.
SMOKE_CASES: dict[str, Case] = {
    c.id: c
    for c in [
        Case("smoke_hess", "tiny MLP 3-8-8-1 tanh, B=4, per-sample Hessians", "mlp", "hessian",
             (3,), 4, 0, {"sizes": (3, 8, 8, 1), "act": "tanh"}, seed=7),
        Case("smoke_lap", "tiny MLP 3-8-2 softplus, Laplacians of both outputs, one sample",
             "mlp", "laplacian", (3,), None, None, {"sizes": (3, 8, 2), "act": "softplus"}),
    ]
}  # fmt: skip
# Tiny cases of the PINN peers (folx, torch-jet, training steps) for their tests.
PINN_SMOKE_CASES: dict[str, Case] = {
    c.id: c
    for c in [
        Case("smoke_lap_b", "tiny MLP 3-8-8-1 tanh, B=4, Laplacians", "mlp", "laplacian",
             (3,), 4, 0, {"sizes": (3, 8, 8, 1), "act": "tanh"}, seed=8),
        Case("smoke_train", "tiny PINN training step, MLP 3-8-8-1 tanh, B=4", "mlp",
             "laplacian_train", (3,), 4, 0, {"sizes": (3, 8, 8, 1), "act": "tanh"}, seed=9),
        Case("smoke_train_rand", "tiny randomized PINN training step, MLP 6-8-1 tanh, B=4",
             "mlp", "laplacian_train", (6,), 4, 0,
             {"sizes": (6, 8, 1), "act": "tanh", "randomized": 4}, seed=10),
    ]
}  # fmt: skip


def get_case(case_id: str) -> Case:
    """The case named ``case_id`` (full suite or smoke cases); a miss lists the valid ids."""
    table = CASES | SMOKE_CASES | PINN_SMOKE_CASES
    if case_id not in table:
        raise KeyError(f"unknown case {case_id!r}; valid: {', '.join(table)}")
    return table[case_id]


def build(case: Case, dtype: torch.dtype) -> Instance:
    """Builds a case at ``dtype`` from its seed (float32 numbers, cast exactly to ``dtype``).

    Args:
        case: The case.
        dtype: ``torch.float32`` or ``torch.float64``.

    Returns:
        The instance; ``x`` has shape ``(B, *S)`` (batched) or ``S``.
    """
    family = FAMILIES[case.family]
    default = torch.get_default_dtype()
    try:  # the same numbers whatever the caller's default dtype
        torch.set_default_dtype(torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(case.seed)
            model = family.module(case.config)
            x = family.make_input(case, torch.Generator().manual_seed(case.seed + 1))
    finally:
        torch.set_default_dtype(default)
    model = model.to(dtype).eval().requires_grad_(False)
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return Instance(case, dtype, model, x.to(dtype), weights)


def head(inst: Instance, samples: int) -> Instance:
    """The first ``samples`` samples of a batched instance (the instance itself otherwise)."""
    if not inst.case.batched or inst.x.shape[0] <= samples:
        return inst
    case = dataclasses.replace(inst.case, batch=samples)
    return Instance(case, inst.dtype, inst.model, inst.x[:samples], inst.weights)


def mlp_layers(inst: Instance) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(W, b), ...]`` of an MLP instance, ``W`` of shape ``(out, in)``, in order."""
    linears = [m for m in inst.model.modules() if isinstance(m, nn.Linear)]
    return [(lin.weight.numpy(), lin.bias.numpy()) for lin in linears]


def forward_macs(case: Case) -> int:
    """Multiply-adds of one forward pass over all samples of the case."""
    return FAMILIES[case.family].forward_macs(case.config) * case.samples


def hessian_macs(case: Case) -> int:
    """Analytic multiply-adds of forward-over-reverse (``n`` batched HVPs) for the case.

    One forward and one reverse pass per selected output (``(1 + m) F``), then per input
    direction a tangent forward and ``m`` tangent reverse passes (``n (1 + m) F``):
    ``(1 + n)(1 + m) F`` with ``F`` the forward multiply-adds; elementwise work is not
    counted. The same count applies to the diagonal and the Laplacian computed by HVPs.
    """
    return (1 + case.n) * (1 + case.n_outputs) * forward_macs(case)
