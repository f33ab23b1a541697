r"""mnist1d-mlp-macs: mnist1d-mlp plus a user constraint "expected MACs ≤ macs_fraction · dense MACs".

The constraint reads the ``l0`` gates through :mod:`torch.nn.utils.parametrize` on the Linear
layers. With structured gates (``--set grouping=structured``, one gate per input column) layer
:math:`i` of the purged model multiplies :math:`\mathrm{in}_i d_i` inputs by
:math:`\mathrm{out}_i d_{i+1}` outputs, so its expected MACs are
:math:`\mathrm{in}_i\,\mathrm{out}_i\,\bar P_i\,\bar P_{i+1}` (:math:`\bar P` the gates' expected
density, independent across layers; the last layer keeps its 10 outputs). With unstructured gates
the expected MACs of a layer are :math:`\mathrm{in}_i\,\mathrm{out}_i\,\bar P_i` (sparse MACs).
Without gates (another formulation) the exact density of the weights is used; it has no gradient,
so only the multiplier reacts. The violation is a fraction, expected MACs / dense MACs −
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
    net.macs_fraction = float(options["macs_fraction"])
    return net


def expected_macs_fraction(net: nn.Module) -> torch.Tensor:
    """Expected MACs of the (purged) network over its dense MACs."""
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    gates = [find_gate(m, "weight") for m in layers]
    structured = [g is not None and g.grouping == "structured" for g in gates]
    densities = []
    for m, g in zip(layers, gates):
        if g is not None:
            densities.append(g.expected_density())
        else:  # no gates: the exact density of the weights, which no gradient can change (only the
            # multiplier reacts); the zero term gives it the gradient path a constraint must have
            densities.append((m.weight != 0).float().mean() + 0.0 * m.weight.sum())
    expected, dense = 0.0, 0
    for i, m in enumerate(layers):
        size = m.in_features * m.out_features
        out_density = densities[i + 1] if i + 1 < len(layers) and structured[i + 1] else 1.0
        expected = expected + size * densities[i] * (out_density if structured[i] else 1.0)
        dense += size
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
)
