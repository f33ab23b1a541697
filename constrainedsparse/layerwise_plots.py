"""The figure of a layer-wise run: every pruned layer's relative error and sparsity, (``fw``) each layer's objective
over the iterations, and the block-level steps' errors per block.

Few layers get a bar each, labelled by its name within its block, the blocks' colours alternating; many (an LLM: 30
blocks of 7) get a line per layer kind over the blocks (:data:`BARS_MAX`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from constrainedsparse.report import block_names

__all__ = ["BARS_MAX", "KINDS_MAX", "layerwise_figure"]

Rows = Sequence[dict[str, Any]]


def _bars(ax: Any, names: list[str], values: list[float], title: str) -> None:
    blocks = block_names(names)
    colors = []
    last, shade = None, 0
    for name in names:
        if blocks.get(name) != last:
            last, shade = blocks.get(name), 1 - shade
        colors.append("tab:blue" if shade else "tab:cyan")
    ax.bar(range(len(names)), values, color=colors)
    ax.margins(y=0.12)  # headroom: the "block N" labels sit above the tallest bar
    short = [name.removeprefix(f"{blocks[name]}.") if name in blocks else name for name in names]
    ax.set_xticks(range(len(names)), [s.removesuffix(".weight") for s in short], rotation=90, fontsize=6)
    starts = {}
    for index, name in enumerate(names):
        starts.setdefault(blocks.get(name), index)
    for block, start in starts.items():
        if block is not None:
            ax.axvline(start - 0.5, color="grey", linewidth=0.5)
            ax.text(start - 0.4, ax.get_ylim()[1] * 0.98, f"block {block.rsplit('.', 1)[-1]}", fontsize=8, va="top")
    ax.set_title(title)


BARS_MAX = 64
"""Up to this many layers the layer-wise panels draw a bar per layer; beyond (an LLM: 30 blocks of 7 layers), a
bar per layer is 6 px wide and its label unreadable, so they draw a line per layer kind over the blocks instead
(when the layers sit in at least two numbered blocks, of at most :data:`KINDS_MAX` kinds)."""
KINDS_MAX = 16


@dataclasses.dataclass
class _Stacks:
    """The numbered blocks of the layer names, in order: by stack (``encoder.layer``, ``decoder.layer``: the name
    before the index, in order of appearance), then by index (``model.layers.10`` after ``model.layers.9``)."""

    blocks: dict[str, str]  # layer -> block
    order: list[str]  # blocks, sorted
    kinds: dict[str, dict[int, float]]  # kind (the name within its block) -> {block position: value}
    stacks: list[str]  # the names before the blocks' indices, in order of appearance

    @classmethod
    def of(cls, names: list[str], values: list[float]) -> _Stacks:
        blocks = block_names(names)
        parents = list(dict.fromkeys(blocks[name].rpartition(".")[0] for name in names if name in blocks))
        order = sorted(
            set(blocks.values()), key=lambda b: (parents.index(b.rpartition(".")[0]), int(b.rpartition(".")[2]))
        )
        position = {block: index for index, block in enumerate(order)}
        kinds: dict[str, dict[int, float]] = {}
        for name, value in zip(names, values, strict=True):
            if name in blocks:
                kind = name.removeprefix(f"{blocks[name]}.").removesuffix(".weight")
                kinds.setdefault(kind, {})[position[blocks[name]]] = value
        return cls(blocks, order, kinds, parents)

    def stack(self, index: int) -> str:
        return self.order[index].rpartition(".")[0]

    def drawable(self) -> bool:
        return len(self.order) >= 2 and len(self.kinds) <= KINDS_MAX

    def tick(self, index: int) -> str:
        """The block's index, after the first name that tells its stack apart when there are several (``encoder.3``
        for ``model.encoder.layers.3`` beside ``model.decoder.layers``)."""
        stack, _, number = self.order[index].rpartition(".")
        if len(self.stacks) == 1:
            return number
        stacks = [name.split(".") for name in self.stacks]
        shared = next((i for i, parts in enumerate(zip(*stacks)) if len(set(parts)) > 1), 0)  # first differing name
        return f"{stack.split('.')[shared]}.{number}"


def _lines_by_block(ax: Any, stacks: _Stacks, names: list[str], title: str) -> None:
    """One line per layer kind (its name within the block: ``mlp.down_proj``) over the blocks, broken between stacks
    (an encoder's last block and a decoder's first); layers outside every block are named in the title."""
    colours = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "grey", "olive")]
    for index, (kind, points) in enumerate(stacks.kinds.items()):
        style = {"color": colours[index % len(colours)], "linestyle": "-" if index < len(colours) else "--"}
        xs = sorted(points)
        for number, stack in enumerate(dict.fromkeys(stacks.stack(x) for x in xs)):
            part = [x for x in xs if stacks.stack(x) == stack]
            ax.plot(part, [points[x] for x in part], marker="o", markersize=3, linewidth=1,
                    label=kind if number == 0 else None, **style)  # fmt: skip
    step = max(1, len(stacks.order) // 30)  # at most ~30 tick labels
    ticks = list(range(0, len(stacks.order), step))
    ax.set_xticks(ticks, [stacks.tick(i) for i in ticks], fontsize=7)
    ax.set_xlabel("block (its index in the model)")
    ax.margins(x=0.01)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), title="layer", title_fontsize=7)
    outside = [name.removesuffix(".weight") for name in names if name not in stacks.blocks]
    ax.set_title(title + (f"; not in a block: {', '.join(outside)}" if outside else ""))


def _by_block(names: list[str], values: list[float]) -> _Stacks | None:
    """The line view's data when it applies (many layers in numbered blocks, few kinds), else ``None``: bars."""
    if len(names) <= BARS_MAX:
        return None
    stacks = _Stacks.of(names, values)
    return stacks if stacks.drawable() else None


def _layer_panel(
    ax: Any, names: list[str], values: list[float], title: str, limits: tuple[float, float] | None = None
) -> None:
    """A bar per layer (few layers; the blocks' colours alternate), or a line per layer kind over the blocks (many;
    the y axis spans ``limits`` if given: sparsities in [0, 1], so that 0.50001 is not drawn as a jump)."""
    stacks = _by_block(names, values)
    if stacks is None:
        _bars(ax, names, values, title)
    else:
        _lines_by_block(ax, stacks, names, title)
        if limits is not None:
            ax.set_ylim(*limits)


# The block-level steps' errors (every layer of a block carries its block's), in the order they happen.
BLOCK_STEPS = {
    "block_error": "pruned",
    "block_error_masked": "after the mask search",
    "block_error_fitted": "after the refit",
}


def _block_errors(rows: Rows) -> dict[str, dict[str, float]]:
    """``{block: {step key: relative block error}}`` in block order, from the block's first layer."""
    found: dict[str, dict[str, float]] = {}
    for row in rows:
        for key, value in row.items():
            step, _, name = key.partition("/")
            if step in BLOCK_STEPS and name:
                block = block_names([name]).get(name, name)
                found.setdefault(block, {}).setdefault(step, value)
    return found


def _block_panel(ax: Any, blocks: dict[str, dict[str, float]]) -> None:
    """The block errors per block, one line per step that ran."""
    for step, label in BLOCK_STEPS.items():
        values = [errors.get(step, float("nan")) for errors in blocks.values()]
        if any(v == v for v in values):  # not all NaN
            ax.plot(range(len(values)), values, marker="o", markersize=3, label=label)
    ax.set_xticks(range(len(blocks)), [block.rsplit(".", 1)[-1] for block in blocks], fontsize=7)
    ax.set_xlabel("block")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("relative block error against the block_fit_target outputs (calibration), per block")


def layerwise_figure(rows: Rows) -> Any:
    """The figure of a layer-wise run's metric rows (its title is :func:`~constrainedsparse.plots.figure_for`'s)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    errors = {
        key.split("/", 1)[1]: value for row in rows for key, value in row.items() if key.startswith("layer_error/")
    }
    sparsity = {k.split("/", 1)[1]: v for row in rows for k, v in row.items() if k.startswith("layer_sparsity/")}
    names = list(errors)
    traced = [row for row in rows if row.get("trace/objective") is not None]
    blocks = _block_errors(rows)
    count = 2 + bool(traced) + bool(blocks)
    lines = _by_block(names, [errors[n] for n in names]) is not None
    width = 14 if lines else max(10, 0.28 * len(names))
    fig = Figure(figsize=(width, 3 + 2.7 * count))
    axes = fig.subplots(count, 1)
    _layer_panel(axes[0], names, [errors[n] for n in names], "relative layer error ||(W - W_hat) X||^2 / ||W X||^2"
                 + ("" if lines else " (blocks alternate)"))  # fmt: skip
    _layer_panel(axes[1], names, [sparsity.get(n, float("nan")) for n in names], "layer sparsity", (0.0, 1.0))
    if traced:
        layers: dict[float, list[float]] = {}
        for row in traced:
            layers.setdefault(row["trace/layer"], []).append(row["trace/objective"])
        colours = colormaps["viridis"]
        for index, values in enumerate(layers.values()):
            colour = colours(index / max(len(layers) - 1, 1))
            axes[2].plot([v / values[0] if values[0] else v for v in values], linewidth=0.7, color=colour)
        axes[2].set_title(
            "fw objective over the iterations, per layer (relative to its start; colour: layer order, dark = first)"
        )
        axes[2].set_xlabel("sampled iteration")
        axes[2].set_ylabel("objective / start")
    if blocks:
        _block_panel(axes[-1], blocks)
    return fig
