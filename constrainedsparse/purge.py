r"""Purging: a structured-pruned ``nn.Sequential`` becomes a smaller dense model.

After ``l0`` with ``grouping=structured`` and hard pruning, whole input columns of Linear layers
and whole output channels of Conv layers are zero. :func:`purge` removes them for good:

* an input column ``j`` of Linear ``i`` that is zero removes output row ``j`` of the previous
  weight layer, its bias entry and the matching BatchNorm entries in between (exact: the unit's
  value is multiplied by 0 downstream);
* an output channel ``c`` of a Conv whose weights are zero outputs the constant
  :math:`v_c = \mathrm{act}(\mathrm{BN}(b_c))` (whatever lies between it and the next weight
  layer applied to its bias; through a ``Flatten`` one value per position, since a BatchNorm1d
  after it normalises each position of a channel on its own); it is removed with the matching input
  channel (or, through a ``Flatten``, the matching block of Linear input columns and of any
  BatchNorm1d's features) of the next layer, and :math:`v_c`'s contribution is folded into the next
  layer's bias. That fold is exact for a Linear
  consumer and for a Conv consumer without padding; a channel whose :math:`v_c \ne 0` feeds a
  padded Conv is kept (it then still counts in the parameters and MACs);
* zero input columns of the first Linear, when nothing but elementwise modules precede it, become
  a :class:`SelectFeatures` in front of the model.

Handled: a flat ``nn.Sequential`` of Linear, Conv1d/Conv2d (``groups=1``), BatchNorm1d/2d,
Flatten (of all but the batch dimension), Unflatten (before the first weight layer only),
Dropout/Identity, elementwise activations, max / average / adaptive pooling before any Flatten
(channel by channel: a constant channel stays the same constant; an average pool that counts zero
padding is not handled) and a Softmax /
LogSoftmax after the last weight layer, e.g. the bundled ``digits-mlp``, ``mnist1d-mlp`` and
``mnist1d-cnn`` or a LeNet. Anything else (nested ``nn.Sequential`` included) raises ``ValueError``.

Example (after a structured ``l0`` run, ``model`` holds the hard-pruned weights)::

    from constrainedsparse.purge import count_params_and_macs, purge

    small = purge(model)
    x = torch.randn(1, 40)
    print(count_params_and_macs(model, x), count_params_and_macs(small, x))
    save_weights("purged.safetensors", small.state_dict())
"""

from __future__ import annotations

import copy
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from constrainedsparse.modes import eval_mode

__all__ = ["SelectFeatures", "chain_purged_params", "count_params_and_macs", "linear_chain", "load_purged", "purge"]

_CONVS = (nn.Conv1d, nn.Conv2d)
_WEIGHTED = (nn.Linear, *_CONVS)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
)
_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
)
"""Pooling channel by channel: a channel that is one constant everywhere pools to the same constant."""
_TRAILING = (nn.Softmax, nn.LogSoftmax)
"""Handled after the last weight layer only (they mix the units, which nothing is removed from there)."""


class SelectFeatures(nn.Module):
    """Keeps the input features ``index`` along the last dimension (the purged first layer's inputs)."""

    def __init__(self, index: torch.Tensor, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.register_buffer("index", index.to(torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, self.index)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} of {self.in_features} features"


def _check(model: nn.Module) -> list[nn.Module]:
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"purge handles flat nn.Sequential models, got {type(model).__name__}")
    layers = list(model)
    seen_weighted = flattened = False
    for i, m in enumerate(layers):
        if parametrize.is_parametrized(m):
            raise ValueError(
                f"purge: layer {i} ({type(m).__name__.removeprefix('Parametrized')}) still carries a parametrization "
                "(a formulation's gates or mask): call the formulation's finalize() and hard_prune() first (or "
                "remove_masks())"
            )
        if isinstance(m, _NORMS) and not m.track_running_stats:
            raise ValueError(
                f"purge: layer {i} is a {type(m).__name__} without running statistics (track_running_stats=False): "
                "it normalises by each batch's, so a removed unit's constant output is not defined; not handled"
            )
        if isinstance(m, _CONVS) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise ValueError(f"purge: layer {i} ({m}) has groups != 1 or non-zero padding mode; not handled")
        if isinstance(m, nn.Flatten) and (m.start_dim != 1 or m.end_dim != -1):
            raise ValueError(f"purge: layer {i} ({m}) keeps a dimension apart; handled is a Flatten of all but dim 0")
        if isinstance(m, _POOLS) and flattened:
            raise ValueError(f"purge: layer {i} ({type(m).__name__}) pools after a Flatten, across units; not handled")
        if isinstance(m, nn.Unflatten) and seen_weighted:
            raise ValueError(f"purge: Unflatten at layer {i} after a weight layer is not handled")
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)) and m.count_include_pad and _any(m.padding):
            raise ValueError(
                f"purge: layer {i} ({m}) averages zero padding in: a removed channel's constant is not constant "
                "at the borders; not handled (count_include_pad=False is)"
            )
        if not isinstance(m, (*_WEIGHTED, *_NORMS, *_ELEMENTWISE, *_POOLS, *_TRAILING, nn.Flatten, nn.Unflatten)):
            raise ValueError(
                f"purge: layer {i} is a {type(m).__name__}; handled are Linear, Conv1d, Conv2d, BatchNorm1d/2d, "
                "Flatten, Unflatten (before the first weight layer), Dropout, Identity, elementwise activations, "
                "pooling, and Softmax / LogSoftmax after the last weight layer"
            )
        seen_weighted = seen_weighted or isinstance(m, _WEIGHTED)
        flattened = flattened or isinstance(m, nn.Flatten)
    last = max((i for i, m in enumerate(layers) if isinstance(m, _WEIGHTED)), default=-1)
    early = next((i for i, m in enumerate(layers[:last]) if isinstance(m, _TRAILING)), None)
    if early is not None:
        raise ValueError(
            f"purge: layer {early} is a {type(layers[early]).__name__} before a weight layer (it mixes the units "
            "that purge removes); handled only after the last weight layer"
        )
    return layers


def _any(size: int | tuple[int, ...]) -> bool:
    return any(size) if isinstance(size, tuple) else bool(size)


def _slice_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    for name in ("weight", "bias"):
        p = getattr(norm, name)
        if p is not None:
            setattr(norm, name, nn.Parameter(p.detach()[keep].clone()))
    for name in ("running_mean", "running_var"):
        b = getattr(norm, name)
        if b is not None:
            setattr(norm, name, b[keep].clone())
    norm.num_features = int(keep.numel())


def _slice_out(layer: nn.Module, keep: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[keep].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[keep].clone())
    if isinstance(layer, nn.Linear):
        layer.out_features = int(keep.numel())
    else:
        layer.out_channels = int(keep.numel())


def _slice_in(layer: nn.Module, keep: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[:, keep].clone())
    if isinstance(layer, nn.Linear):
        layer.in_features = int(keep.numel())
    else:
        layer.in_channels = int(keep.numel())


def _constant_outputs(producer: nn.Module, between: list[nn.Module], block: int) -> torch.Tensor:
    """What each output unit of ``producer`` becomes after ``between`` when its weights are zero (bias only):
    ``(units, block)``, one value per consumer input of the unit (``block`` > 1 only through a Flatten, after
    which a BatchNorm1d normalises each of a channel's positions on its own)."""
    n = producer.weight.shape[0]
    bias = producer.bias.detach() if producer.bias is not None else torch.zeros(n, device=producer.weight.device)
    x = bias.reshape(1, n, *([1] * (producer.weight.dim() - 2)))
    for m in between:
        if isinstance(m, nn.Flatten):  # every position of a constant channel holds its constant
            x = x.reshape(1, n, 1).expand(1, n, block).reshape(1, n * block)
        elif not isinstance(m, _POOLS):  # a pool leaves a constant channel as it is (and a 1x1 map may not fit it)
            x = m(x)
    return x.reshape(n, -1).expand(n, block)


@torch.no_grad()
def purge(model: nn.Module) -> nn.Module:
    """A smaller dense copy of a structured-pruned ``model`` with the same outputs in eval mode.

    Args:
        model: A flat ``nn.Sequential`` (see the module docstring) with plain (un-parametrized)
            weights, e.g. after ``hard_prune``.

    Returns:
        A new ``nn.Sequential`` in eval mode with the same child names (so ``state_dict`` keys
        match the original's), plus ``select`` in front when input features were dropped;
        ``model`` is left untouched.

    Raises:
        ValueError: For an architecture :func:`purge` does not handle.
    """
    _check(model)
    names = [name for name, _ in model.named_children()]
    layers = [copy.deepcopy(m) for m in model.children()]
    for m in layers:
        m.eval()
    weighted = [i for i, m in enumerate(layers) if isinstance(m, _WEIGHTED)]
    for a, b in zip(weighted, weighted[1:]):
        _purge_between(layers, a, b)
    if weighted:
        _select_live_inputs(layers, names, weighted[0])
    return nn.Sequential(OrderedDict(zip(names, layers))).eval()


def load_purged(model: nn.Module, state: Mapping[str, torch.Tensor] | str | os.PathLike[str]) -> nn.Sequential:
    """The purged model saved by a structured run (``purged.safetensors``), rebuilt on ``model``'s architecture.

    Every Linear, Conv and BatchNorm of ``model`` (the dense ``nn.Sequential`` the run started from,
    e.g. the problem's ``model(options)``) takes the saved tensors' shapes, and a ``select`` entry
    becomes the :class:`SelectFeatures` in front; ``model`` is left untouched.

    Args:
        model: The dense model (its weights do not matter).
        state: The purged ``state_dict``, or the path of a ``.safetensors`` file holding it.

    Returns:
        The purged model in eval mode, its weights loaded.

    Raises:
        ValueError: For a model :func:`purge` does not handle, or a state that does not fit it.
    """
    if not isinstance(state, Mapping):
        from safetensors.torch import load_file

        state = load_file(os.fspath(state))
    _check(model)
    names = [name for name, _ in model.named_children()]
    layers = [copy.deepcopy(m) for m in model.children()]
    for name, layer in zip(names, layers):
        if isinstance(layer, (*_WEIGHTED, *_NORMS)):
            _take_shapes(name, layer, state)
    if "select.index" in state:
        first = next(i for i, m in enumerate(layers) if isinstance(m, _WEIGHTED))
        layers.insert(first, SelectFeatures(state["select.index"], model[first].in_features))
        names.insert(first, "select")
    purged = nn.Sequential(OrderedDict(zip(names, layers)))
    try:
        purged.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"load_purged: the state does not fit the model: {str(err).splitlines()[0]}") from None
    return purged.eval()


def _take_shapes(name: str, layer: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Resizes ``layer``'s tensors to ``state``'s (``name.weight`` ...) and its size attributes to match."""
    for key in list(layer.state_dict()):
        saved = state.get(f"{name}.{key}")
        if saved is None:
            raise ValueError(f"load_purged: the state has no {name}.{key}")
        empty = torch.empty_like(saved)
        setattr(layer, key, nn.Parameter(empty) if isinstance(getattr(layer, key), nn.Parameter) else empty)
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = weight.shape
    elif isinstance(layer, _CONVS):
        layer.out_channels, layer.in_channels = weight.shape[:2]
    else:
        layer.num_features = int(weight.shape[0]) if weight is not None else int(layer.running_mean.shape[0])


def _consumer_inputs(layers: list[nn.Module], a: int, b: int) -> tuple[torch.Tensor, int]:
    """The consumer's (layer ``b``) weights grouped by the producer's (layer ``a``) units,
    ``(outputs, units, inputs per unit)``, and the inputs per unit (> 1 only for a Linear after Flatten).

    Raises:
        ValueError: If the two layers do not connect unit to unit (channel to channel).
    """
    producer, consumer, between = layers[a], layers[b], layers[a + 1 : b]
    n = producer.weight.shape[0]
    flatten = any(isinstance(m, nn.Flatten) for m in between)
    block = 1
    if isinstance(consumer, nn.Linear):
        if consumer.in_features % n:
            raise ValueError(f"purge: layer {b} has {consumer.in_features} inputs, not a multiple of {n}")
        block = consumer.in_features // n
        if block > 1 and not flatten:
            raise ValueError(f"purge: layers {a} and {b} do not connect unit to unit")
    else:
        if isinstance(producer, nn.Linear):
            raise ValueError(f"purge: a Linear (layer {a}) feeding a Conv (layer {b}) is not handled")
        if flatten or consumer.in_channels != n:
            raise ValueError(f"purge: layers {a} and {b} do not connect channel to channel")
    return consumer.weight.detach().reshape(consumer.weight.shape[0], n, -1), block


def _purge_between(layers: list[nn.Module], a: int, b: int) -> None:
    """Drops the producer's (layer ``a``) units that the consumer (layer ``b``) does not need, in place:
    units no consumer weight reads, and dead units (all-zero weights) whose constant output is 0 or is
    folded into the consumer's bias (see the module docstring)."""
    producer, consumer, between = layers[a], layers[b], layers[a + 1 : b]
    n = producer.weight.shape[0]
    grouped, block = _consumer_inputs(layers, a, b)
    consumer_dead = (grouped == 0).all(dim=2).all(dim=0)
    producer_dead = (producer.weight.detach() == 0).reshape(n, -1).all(dim=1)
    value = _constant_outputs(producer, between, block)
    constant_zero = (value == 0).all(dim=1)
    foldable = isinstance(consumer, nn.Linear) or all(p == 0 for p in consumer.padding)
    drop = consumer_dead | (producer_dead & (constant_zero | foldable))
    fold = producer_dead & ~consumer_dead & ~constant_zero & drop
    if bool(fold.any()):
        # A Conv consumer reads one value per channel (block 1) at every kernel tap; a Linear one per input.
        delta = (grouped[:, fold, :] * value[fold].unsqueeze(0)).sum(dim=(1, 2))
        if consumer.bias is None:
            consumer.bias = nn.Parameter(torch.zeros_like(delta))
        consumer.bias.add_(delta)
    keep = torch.nonzero(~drop).reshape(-1)
    if keep.numel() == n:
        return
    _slice_out(producer, keep)
    features = (keep.unsqueeze(1) * block + torch.arange(block, device=keep.device)).reshape(-1)
    flattened = False
    for m in between:
        flattened = flattened or isinstance(m, nn.Flatten)
        if isinstance(m, _NORMS):  # after a Flatten a norm has a feature per position of each channel
            _slice_norm(m, features if flattened else keep)
    _slice_in(consumer, features if isinstance(consumer, nn.Linear) else keep)


def _select_live_inputs(layers: list[nn.Module], names: list[str], first_index: int) -> None:
    """Drops the model's input features that no weight of the first Linear reads (a ``select`` layer in
    front of it), when only elementwise layers come before it."""
    first = layers[first_index]
    if not isinstance(first, nn.Linear) or not all(isinstance(m, _ELEMENTWISE) for m in layers[:first_index]):
        return
    alive = torch.nonzero(~(first.weight.detach() == 0).all(dim=0)).reshape(-1)
    if alive.numel() < first.in_features:
        select = SelectFeatures(alive, first.in_features)
        _slice_in(first, alive)
        layers.insert(first_index, select)
        names.insert(first_index, "select")


def linear_chain(model: nn.Module) -> list[str]:
    r"""Child names of the Linear layers of an MLP whose purged size :func:`chain_purged_params` gives.

    With one gate per input column, :func:`purge` turns Linear :math:`l` (``in_l x out_l``) into a
    ``k_l x k_{l+1}`` block: :math:`k_l` kept input columns, and as outputs the kept input columns
    :math:`k_{l+1}` of the next Linear (the last keeps its ``out_L`` outputs). That holds for a flat
    ``nn.Sequential`` that :func:`purge` handles, whose weight layers are all Linear, connected unit
    to unit (``in_{l+1} = out_l``, no Flatten/Unflatten between them), with only elementwise modules
    in front of the first one (so that :class:`SelectFeatures` drops its zero input columns).

    Args:
        model: The model (e.g. an MLP such as ``mnist1d-mlp``).

    Returns:
        The child names of its Linear layers, in order.

    Raises:
        ValueError: One line naming the first layer that breaks the rule above.
    """
    _check(model)
    names = [name for name, _ in model.named_children()]
    layers = list(model)
    weighted = [i for i, m in enumerate(layers) if isinstance(m, _WEIGHTED)]
    if not weighted:
        raise ValueError("the model has no Linear layer")
    for i in weighted:
        if not isinstance(layers[i], nn.Linear):
            raise ValueError(
                f"layer {i} is a {type(layers[i]).__name__}; the purged size is modelled for a chain of Linear layers"
            )
    for i, m in enumerate(layers[: weighted[0]]):
        if not isinstance(m, _ELEMENTWISE):
            raise ValueError(f"layer {i} ({type(m).__name__}) precedes the first Linear, so purge keeps its inputs")
    for a, b in zip(weighted, weighted[1:]):
        between = layers[a + 1 : b]
        if layers[b].in_features != layers[a].out_features or any(
            isinstance(m, (nn.Flatten, nn.Unflatten)) for m in between
        ):
            raise ValueError(f"layers {a} and {b} do not connect unit to unit")
    return [names[i] for i in weighted]


def chain_purged_params(kept_inputs: Sequence[Any], out_features: int) -> Any:
    r"""Entries of the purged weights of a :func:`linear_chain`: :math:`\sum_l k_l\,k_{l+1}`, :math:`k_{L+1} = `
    ``out_features``.

    Args:
        kept_inputs: :math:`k_l`, the kept input columns of every Linear in order: counts (the
            hard-pruned model; exact as long as no layer loses all its inputs, since purge then
            also drops the next layer's now constant inputs) or expected counts
            :math:`\mathrm{in}_l \bar P_l` (tensors; the gates are independent across layers, so
            :math:`E[k_l k_{l+1}] = E[k_l] E[k_{l+1}]` and the result is the expected purged size).
        out_features: Outputs of the last Linear (never removed).

    Returns:
        :math:`\sum_l k_l\,k_{l+1}` (same type as the inputs).
    """
    outputs = [*kept_inputs[1:], out_features]
    return sum(k * o for k, o in zip(kept_inputs, outputs))


@torch.no_grad()
def count_params_and_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """``(parameters, multiply-accumulates per sample)`` of ``model`` on ``example_input``.

    Parameters are all entries of ``model.parameters()`` (zeros included). MACs per sample: Linear
    ``in · out`` (per position of any extra leading dimension), Conv
    ``out · in/groups · kernel · output positions``; other modules count 0.
    """
    macs = 0
    batch = example_input.shape[0]

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Linear):
            positions = output.numel() // output.shape[-1]
            macs += positions * module.in_features * module.out_features
        else:
            kernel = math.prod(module.kernel_size)
            positions = output.numel() // output.shape[1]
            macs += positions * module.out_channels * (module.in_channels // module.groups) * kernel

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    try:
        with eval_mode(model):
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return sum(p.numel() for p in model.parameters()), macs // batch
