r"""mnist1d-mlp-macs: mnist1d-mlp plus a user constraint "expected MACs ≤ macs_fraction · dense MACs".

The constraint reads the ``l0`` gates through :mod:`torch.nn.utils.parametrize` on the Linear
layers. With structured gates (``--set grouping=structured``, one gate per input column) layer
:math:`i` of the purged model multiplies :math:`\mathrm{in}_i d_i` inputs by
:math:`\mathrm{out}_i d_{i+1}` outputs, so its expected MACs are
:math:`\mathrm{in}_i\,\mathrm{out}_i\,\bar P_i\,\bar P_{i+1}` (:math:`\bar P` the gates' expected
density, independent across layers; the last layer keeps its 10 outputs). With unstructured gates
the expected MACs of a layer are :math:`\mathrm{in}_i\,\mathrm{out}_i\,\bar P_i` (sparse MACs).
Without gates (another formulation, or the final hard-pruned model) the MACs are those of the
purged network, counted exactly: a hidden unit whose weights in or out are all zero goes, and each
layer multiplies its nonzero weights between the units that stay (:func:`purged_macs`); they have
no gradient, so only the multiplier reacts. The violation is a fraction, expected MACs / dense MACs −
``macs_fraction``, hence the problem's ``dual_lr = 0.2``.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from constrainedsparse.gates import find_gate
from constrainedsparse.problem import UserConstraint
from constrainedsparse.problems.mnist1d_mlp import data
from constrainedsparse.spec import Problem


def model(options: Mapping[str, Any]) -> nn.Module:
    """MLP 40-256-256-10; remembers ``macs_fraction`` for the constraint."""
    net = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    fraction = float(options["macs_fraction"])
    if not 0.0 < fraction <= 1.0:  # a budget no network meets would run to the end VIOLATED
        raise ValueError(f"--set macs_fraction={fraction} must be in (0, 1]: the share of the dense MACs to keep")
    net.macs_fraction = fraction
    return net


def purged_macs(layers: list[nn.Linear]) -> int:
    """Sparse MACs per sample of the purged chain: the nonzero weights between the hidden units that stay.

    A hidden unit stays when its row in the layer before and its column in the layer after both hold
    a nonzero weight (a unit with no weight in is a constant that purge folds into the next bias; one
    with no weight out is unused); the inputs and the last layer's outputs always stay.
    """
    weights = [m.weight.detach() != 0 for m in layers]
    alive = [w.any(dim=1) for w in weights[:-1]]  # hidden units fed by some weight ...
    alive = [a & nxt.any(dim=0) for a, nxt in zip(alive, weights[1:])]  # ... that some weight reads
    total = 0
    for i, w in enumerate(weights):
        rows = alive[i] if i < len(alive) else torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
        cols = alive[i - 1] if i > 0 else torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
        total += int(w[rows][:, cols].sum())
    return total


def expected_macs_fraction(net: nn.Module) -> torch.Tensor:
    """Expected MACs of the (purged) network over its dense MACs."""
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    gates = [find_gate(m, "weight") for m in layers]
    dense = sum(m.in_features * m.out_features for m in layers)
    if all(g is None for g in gates):  # the exact MACs, which no gradient can change (only the multiplier
        # reacts); the zero term gives the constraint the gradient path it must have
        return torch.tensor(purged_macs(layers) / dense) + 0.0 * sum(m.weight.sum() for m in layers)
    structured = [g is not None and g.grouping == "structured" for g in gates]
    densities = [
        g.expected_density() if g is not None else (m.weight != 0).float().mean() for m, g in zip(layers, gates)
    ]
    expected = 0.0
    for i, m in enumerate(layers):
        size = m.in_features * m.out_features
        out_density = densities[i + 1] if i + 1 < len(layers) and structured[i + 1] else 1.0
        expected = expected + size * densities[i] * (out_density if structured[i] else 1.0)
    return expected / dense


def macs_violation(net: nn.Module) -> torch.Tensor:
    """``expected MACs / dense MACs - macs_fraction`` (≤ 0 when the budget holds)."""
    return expected_macs_fraction(net) - net.macs_fraction


problem = Problem(
    name="mnist1d-mlp-macs",
    description="mnist1d-mlp with a user constraint: expected MACs <= macs_fraction * dense MACs",
    model=model,
    data=data,
    constraints={"macs": UserConstraint(macs_violation, "<=")},
    pretrain_epochs=40,
    epochs=10,
    batch_size=100,
    lr=1e-3,
    dual_lr=0.2,
    options={"macs_fraction": 0.3},
    option_help={"macs_fraction": "in (0, 1]: the user constraint, expected MACs <= this fraction of the dense MACs"},
)
