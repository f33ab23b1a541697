"""Tests for :mod:`constrainedsparse.sets`: projections, linear minimisation oracles, membership.

Every feasible set is checked against an independent reference written in this file:

* feasibility is decided from multi-indices (which "unit" — whole tensor, row, N:M group, slice —
  an entry belongs to), not through the set's own reshapes;
* projection optimality and LMO optimality are checked by enumerating every admissible support
  (or vertex) of tensors with at most 8 entries;
* tie-breaking is checked against a stable sort (lower flat index first).

Property tests use ``hypothesis`` on tiny shapes; golden tests pin hand-computed outputs; one test
exercises the sampled-selection fast path of :meth:`TopK.project` on ``2**21`` entries.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from constrainedsparse import selection, sets
from constrainedsparse.sets import (
    BlockSparse,
    GlobalTopK,
    NMSparse,
    RowTopK,
    StructuredGroups,
    TopK,
    keep_count,
    parse_nm,
    topk_mask,
)

FAST = settings(max_examples=60, deadline=None)
BRUTE = settings(max_examples=40, deadline=None)
TOL = 1e-9

# ---------------------------------------------------------------------------------------------
# Independent reference: which unit each entry belongs to and how many nonzeros a unit may hold.
# ---------------------------------------------------------------------------------------------


GROUP_SETS = (StructuredGroups, BlockSparse)
"""Sets whose budget counts whole groups (structured slices, blocks) rather than entries."""

# The common table: every registered pattern kind and the set class the tests draw for it. A new
# pattern joins every property test below by one row here and one unit rule in ``_units``.
TABLE = {"unstructured": TopK, "row": RowTopK, "nm": NMSparse, "structured": StructuredGroups, "block": BlockSparse}


def test_every_registered_pattern_joins_the_table() -> None:
    assert list(TABLE) == sets.available_patterns()
    assert all(sets.pattern_class(kind) is cls for kind, cls in TABLE.items())


def _units(fs: object, shape: Sequence[int]) -> list[Hashable]:
    """Unit key of every entry of a tensor of ``shape``, in flat (row-major) order.

    For elementwise patterns a unit is the set of entries sharing one nonzero budget (the whole
    tensor for TopK, a row for RowTopK, a group of ``m`` consecutive inputs for N:M). For
    StructuredGroups a unit is one group (a slice along ``dim``).
    """
    keys: list[Hashable] = []
    for idx in itertools.product(*(range(s) for s in shape)):
        if isinstance(fs, TopK):
            keys.append(())
        elif isinstance(fs, RowTopK):
            keys.append(idx[0])
        elif isinstance(fs, NMSparse):
            keys.append((idx[0], idx[1] // fs.m, *idx[2:]))
        elif isinstance(fs, StructuredGroups):
            keys.append(idx[fs.dim])
        elif isinstance(fs, BlockSparse):
            keys.append((idx[0] // fs.rows, idx[1] // fs.cols))
        else:  # pragma: no cover - programming error in the test
            raise TypeError(fs)
    return keys


def _cap(fs: object) -> int:
    """Nonzero budget of one unit (elementwise sets) or number of groups (StructuredGroups)."""
    return fs.n if isinstance(fs, NMSparse) else fs.k


def _unit_counts(fs: object, support: Sequence[bool], shape: Sequence[int]) -> dict:
    """Number of nonzeros per unit (elementwise sets) or ``{(): nonzero groups}`` (structured)."""
    counts: dict = {}
    for key, on in zip(_units(fs, shape), support, strict=True):
        counts.setdefault(key, 0)
        counts[key] += int(bool(on))
    if isinstance(fs, GROUP_SETS):
        return {(): sum(1 for c in counts.values() if c > 0)}
    return counts


def _ref_feasible(fs: object, support: Sequence[bool], shape: Sequence[int]) -> bool:
    """Reference membership test on a flat boolean support."""
    if isinstance(fs, GlobalTopK):
        return sum(map(bool, support)) <= fs.k
    return all(c <= _cap(fs) for c in _unit_counts(fs, support, shape).values())


def _vertices(fs: object, shape: Sequence[int], exact: bool) -> list[torch.Tensor]:
    """All 0/1 masks of the pattern (float64, flat), with exactly or at most the budget.

    ``exact=True`` gives the vertices of the hull used by ``lmo(only_negative=False)``;
    ``exact=False`` those of the hull of masks with *at most* the budget (and every support the
    projection may choose). Structured masks are unions of whole groups.
    """
    numel = math.prod(shape)
    out = []
    if isinstance(fs, GROUP_SETS):
        keys = _units(fs, shape)
        groups = sorted(set(keys))
        sizes = [fs.k] if exact else range(fs.k + 1)
        for size in sizes:
            for chosen in itertools.combinations(groups, size):
                out.append(torch.tensor([float(key in chosen) for key in keys], dtype=torch.float64))
        return out
    for bits in itertools.product((0.0, 1.0), repeat=numel):
        if isinstance(fs, GlobalTopK):
            ok = sum(bits) == fs.k if exact else sum(bits) <= fs.k
        else:
            counts = _unit_counts(fs, bits, shape).values()
            ok = all(c == _cap(fs) for c in counts) if exact else all(c <= _cap(fs) for c in counts)
        if ok:
            out.append(torch.tensor(bits, dtype=torch.float64))
    return out


def _random_vertex(fs: object, shape: Sequence[int], gen: torch.Generator, at_most: bool = False) -> torch.Tensor:
    """A random 0/1 mask of the pattern (flat float64), built by the test.

    With ``at_most=False`` every unit uses its whole budget (a vertex of the exact-budget hull);
    otherwise each unit draws a random count in ``[0, budget]``.
    """
    numel = math.prod(shape)

    def count(cap: int) -> int:
        return int(torch.randint(0, cap + 1, (1,), generator=gen)) if at_most else cap

    v = torch.zeros(numel, dtype=torch.float64)
    if isinstance(fs, GlobalTopK):
        v[torch.randperm(numel, generator=gen)[: count(fs.k)]] = 1.0
        return v
    members: dict = {}
    for i, key in enumerate(_units(fs, shape)):
        members.setdefault(key, []).append(i)
    if isinstance(fs, GROUP_SETS):
        groups = sorted(members)
        for j in torch.randperm(len(groups), generator=gen)[: count(fs.k)].tolist():
            v[members[groups[j]]] = 1.0
        return v
    for idx in members.values():
        picks = torch.randperm(len(idx), generator=gen)[: count(_cap(fs))].tolist()
        v[[idx[p] for p in picks]] = 1.0
    return v


# ---------------------------------------------------------------------------------------------
# Strategies.
# ---------------------------------------------------------------------------------------------

# Values: small integers (many exact ties and zeros) or floats bounded away from underflow.
VALUES = st.one_of(
    st.integers(-4, 4).map(float),
    st.floats(-10.0, 10.0, allow_nan=False, allow_subnormal=False).filter(lambda v: v == 0.0 or abs(v) >= 1e-6),
)


@st.composite
def tensors(draw: st.DrawFn, shape: Sequence[int]) -> torch.Tensor:
    """A float64 tensor of ``shape`` with entries from :data:`VALUES`."""
    numel = math.prod(shape)
    values = draw(st.lists(VALUES, min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=torch.float64).reshape(tuple(shape))


@st.composite
def set_and_shape(draw: st.DrawFn, max_numel: int = 8) -> tuple[object, tuple[int, ...]]:
    """One of the single-tensor sets of :data:`TABLE` with a compatible shape of at most ``max_numel``."""
    kind = draw(st.sampled_from(["topk", "row", "nm", "struct", "block"]))
    if kind == "block":
        rows, cols = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        r = draw(st.integers(1, max(1, max_numel // (rows * cols * 2))))
        c = draw(st.integers(1, max(1, max_numel // (rows * cols * r))))
        shape = (rows * r, cols * c)
        if draw(st.booleans()) and r * c * rows * cols * 2 <= max_numel:  # a conv weight: blocks span its kernel
            shape = (*shape, 2)
        return BlockSparse(draw(st.integers(0, r * c)), rows, cols), shape
    if kind == "nm":
        m = draw(st.integers(1, 4))
        n = draw(st.integers(1, m))
        conv = draw(st.booleans())
        if conv:  # (out, in, kernel): groups run along dim 1 for every kernel position
            kernel = draw(st.integers(1, 2))
            out = draw(st.integers(1, max(1, max_numel // (m * kernel))))
            shape = (out, m, kernel) if out * m * kernel <= max_numel else (1, m, 1)
        else:
            groups = draw(st.integers(1, max(1, max_numel // m)))
            out = draw(st.integers(1, max(1, max_numel // (m * groups))))
            shape = (out, m * groups)
        return NMSparse(n, m), shape
    ndim = draw(st.integers(1 if kind == "topk" else 2, 3))
    shape: tuple[int, ...] = ()
    for _ in range(ndim):
        room = max_numel // max(1, math.prod(shape))
        shape += (draw(st.integers(1, max(1, min(4, room)))),)
    if kind == "topk":
        return TopK(draw(st.integers(0, math.prod(shape)))), shape
    if kind == "row":
        return RowTopK(draw(st.integers(0, math.prod(shape[1:])))), shape
    dim = draw(st.integers(0, 1))
    return StructuredGroups(draw(st.integers(0, shape[dim])), dim=dim), shape


@st.composite
def set_and_tensor(draw: st.DrawFn, max_numel: int = 8) -> tuple[object, torch.Tensor]:
    """A single-tensor set with a compatible random tensor."""
    fs, shape = draw(set_and_shape(max_numel))
    return fs, draw(tensors(shape))


@st.composite
def global_and_tensors(draw: st.DrawFn, max_numel: int = 8) -> tuple[GlobalTopK, list]:
    """A :class:`GlobalTopK` with a list of 1-3 tensors holding at most ``max_numel`` entries."""
    count = draw(st.integers(1, 3))
    shapes = []
    room = max_numel
    for _ in range(count):
        if room < 1:
            break
        a = draw(st.integers(1, min(3, room)))
        b = draw(st.integers(1, max(1, min(3, room // a))))
        shapes.append((a, b) if draw(st.booleans()) else (a * b,))
        room -= a * b
    xs = [draw(tensors(s)) for s in shapes]
    total = sum(x.numel() for x in xs)
    return GlobalTopK(draw(st.integers(0, total))), xs


def _flat(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


# ---------------------------------------------------------------------------------------------
# Projection: feasible, idempotent, optimal, exact count, consistent with mask.
# ---------------------------------------------------------------------------------------------


@FAST
@given(set_and_tensor(max_numel=24))
def test_project_feasible_idempotent_and_consistent(case: tuple[object, torch.Tensor]) -> None:
    fs, x = case
    before = x.clone()
    p = fs.project(x)
    assert torch.equal(x, before), "project must not modify its input"
    assert p.shape == x.shape and p.dtype == x.dtype
    assert fs.contains(p)
    assert _ref_feasible(fs, (p != 0).reshape(-1).tolist(), x.shape)
    assert torch.equal(fs.project(p), p)
    mask = fs.mask(x)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert torch.equal(p, x * mask)
    # Kept entries are copied, not rescaled.
    assert torch.equal(p[mask], x[mask])


@BRUTE
@given(set_and_tensor(max_numel=8))
def test_project_is_optimal_by_enumeration(case: tuple[object, torch.Tensor]) -> None:
    fs, x = case
    flat = x.reshape(-1)
    dist = float(((fs.project(x) - x) ** 2).sum())
    # The closest point with support S is x restricted to S.
    best = min(float(((flat * s - flat) ** 2).sum()) for s in _vertices(fs, x.shape, exact=False))
    assert dist <= best + TOL


@FAST
@given(set_and_tensor(max_numel=24))
def test_project_keeps_exactly_the_budget(case: tuple[object, torch.Tensor]) -> None:
    fs, x = case
    nonzero = (x != 0).reshape(-1).tolist()
    kept = (fs.project(x) != 0).reshape(-1).tolist()
    have = _unit_counts(fs, nonzero, x.shape)
    got = _unit_counts(fs, kept, x.shape)
    for key, count in have.items():
        assert got[key] == min(_cap(fs), count), (key, count, got[key])


def test_only_row_and_nm_are_rows_independent() -> None:
    assert {kind for kind, cls in TABLE.items() if cls.rows_independent} == {"row", "nm"}
    # A layer-wide count is not: the first row of one member and the second of another exceed k = 2.
    first, second = torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    topk = TopK(2)
    assert topk.contains(first) and topk.contains(second) and not topk.contains(first + second)


@FAST
@given(set_and_tensor(max_numel=24), st.integers(0, 2**31 - 1))
def test_rows_independent_sets_take_any_mix_of_two_members_rows(case: tuple[object, torch.Tensor], seed: int) -> None:
    """``rows_independent`` (what the layer-wise solvers read to choose row by row) holds: any rows of two
    members form a member."""
    fs, x = case
    if not fs.rows_independent or x.dim() < 2:
        return
    gen = torch.Generator().manual_seed(seed)
    other = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    rows = torch.rand(x.shape[0], generator=gen) < 0.5
    pick = rows.reshape(-1, *([1] * (x.dim() - 1)))
    assert fs.contains(torch.where(pick, fs.project(x), fs.project(other)))


@FAST
@given(set_and_tensor(max_numel=24))
def test_contains_matches_reference(case: tuple[object, torch.Tensor]) -> None:
    fs, x = case
    assert fs.contains(x) == _ref_feasible(fs, (x != 0).reshape(-1).tolist(), x.shape)


@FAST
@given(global_and_tensors(max_numel=16))
def test_global_project_feasible_idempotent_count(case: tuple[GlobalTopK, list]) -> None:
    fs, xs = case
    before = [x.clone() for x in xs]
    ps = fs.project(xs)
    assert all(torch.equal(x, b) for x, b in zip(xs, before, strict=True))
    assert [p.shape for p in ps] == [x.shape for x in xs]
    assert fs.contains(ps)
    assert all(torch.equal(a, b) for a, b in zip(fs.project(ps), ps, strict=True))
    masks = fs.masks(xs)
    assert all(torch.equal(p, x * m) for p, x, m in zip(ps, xs, masks, strict=True))
    nonzero = int(sum(torch.count_nonzero(x) for x in xs))
    assert int(sum(torch.count_nonzero(p) for p in ps)) == min(fs.k, nonzero)
    assert int(sum(int(m.sum()) for m in masks)) == fs.k
    assert fs.contains(xs) == (nonzero <= fs.k)


@BRUTE
@given(global_and_tensors(max_numel=8))
def test_global_project_is_optimal_by_enumeration(case: tuple[GlobalTopK, list]) -> None:
    fs, xs = case
    flat = _flat(xs)
    dist = float(((_flat(fs.project(xs)) - flat) ** 2).sum())
    shape = (flat.numel(),)
    best = min(float(((flat * s - flat) ** 2).sum()) for s in _vertices(fs, shape, exact=False))
    assert dist <= best + TOL


@FAST
@given(set_and_tensor(max_numel=24))
def test_project_float32_matches_float64_support(case: tuple[object, torch.Tensor]) -> None:
    fs, x = case
    if isinstance(fs, (StructuredGroups, BlockSparse)):
        return  # group norms round differently in float32, which may reorder near-ties
    x32 = x.float()
    x = x32.double()  # the same numbers in both dtypes (values that round alike tie alike in both)
    assert torch.equal(fs.mask(x32), fs.mask(x))
    assert fs.project(x32).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Linear minimisation oracle.
# ---------------------------------------------------------------------------------------------


def _check_vertex(fs: object, v: torch.Tensor, g: torch.Tensor) -> None:
    assert v.dtype == g.dtype and v.shape == g.shape
    assert bool(((v == 0) | (v == 1)).all()), "LMO must return a 0/1 vertex"


@BRUTE
@given(set_and_tensor(max_numel=8), st.booleans())
def test_lmo_is_optimal_by_enumeration(case: tuple[object, torch.Tensor], neg: bool) -> None:
    fs, g = case
    v = fs.lmo(g, only_negative=neg)
    _check_vertex(fs, v, g)
    assert fs.contains(v)
    flat = g.reshape(-1)
    value = float((flat * v.reshape(-1)).sum())
    verts = _vertices(fs, g.shape, exact=not neg)
    best = min(float((flat * s).sum()) for s in verts)
    assert value <= best + TOL
    # The returned mask is itself one of the enumerated vertices when all budgets are used.
    if not neg:
        assert any(torch.equal(v.reshape(-1), s) for s in verts)


@FAST
@given(set_and_tensor(max_numel=32), st.integers(0, 2**31 - 1))
def test_lmo_beats_random_vertices_and_mixtures(case: tuple[object, torch.Tensor], seed: int) -> None:
    fs, g = case
    gen = torch.Generator().manual_seed(seed)
    flat = g.reshape(-1)
    for neg in (False, True):
        v = fs.lmo(g, only_negative=neg)
        _check_vertex(fs, v, g)
        assert fs.contains(v)
        value = float((flat * v.reshape(-1)).sum())
        verts = torch.stack([_random_vertex(fs, g.shape, gen, at_most=neg) for _ in range(8)])
        for s in verts:
            assert value <= float((flat * s).sum()) + TOL
        weights = torch.distributions.Dirichlet(torch.ones(len(verts), dtype=torch.float64))
        for _ in range(4):
            w = weights.sample()
            assert value <= float(flat @ (w @ verts)) + TOL


@FAST
@given(set_and_tensor(max_numel=32))
def test_lmo_exact_budget_and_only_negative(case: tuple[object, torch.Tensor]) -> None:
    fs, g = case
    full = fs.lmo(g)
    neg = fs.lmo(g, only_negative=True)
    on_full = (full != 0).reshape(-1).tolist()
    on_neg = (neg != 0).reshape(-1).tolist()
    # Without only_negative every unit uses its whole budget.
    counts = _unit_counts(fs, on_full, g.shape)
    assert all(c == _cap(fs) for c in counts.values()), counts
    if isinstance(fs, GROUP_SETS):  # a group is switched on by the sign of its summed gradient
        keys = _units(fs, g.shape)
        sums: dict = {}
        for key, value in zip(keys, g.reshape(-1).tolist(), strict=True):
            sums[key] = sums.get(key, 0.0) + value
        nonneg = torch.tensor([sums[key] >= 0 for key in keys]).reshape(g.shape)
    else:
        nonneg = g >= 0
    assert not bool(neg[nonneg].any()), "only_negative switched on a non-negative coordinate"
    # only_negative keeps exactly the negative part of the full vertex.
    assert torch.equal(neg, full * ~nonneg)
    assert on_neg == [a and b for a, b in zip(on_full, (~nonneg).reshape(-1).tolist(), strict=True)]


@FAST
@given(global_and_tensors(max_numel=16), st.booleans())
def test_global_lmo(case: tuple[GlobalTopK, list], neg: bool) -> None:
    fs, gs = case
    vs = fs.lmo(gs, only_negative=neg)
    assert [v.shape for v in vs] == [g.shape for g in gs]
    for v, g in zip(vs, gs, strict=True):
        _check_vertex(fs, v, g)
    assert fs.contains(vs)
    flat, vflat = _flat(gs), _flat(vs)
    value = float((flat * vflat).sum())
    if neg:
        assert not bool(vflat[flat >= 0].any())
    else:
        assert int(vflat.sum()) == fs.k
    if flat.numel() <= 8:
        verts = _vertices(fs, (flat.numel(),), exact=not neg)
        assert value <= min(float((flat * s).sum()) for s in verts) + TOL


# ---------------------------------------------------------------------------------------------
# Golden tests.
# ---------------------------------------------------------------------------------------------


def test_topk_mask_all_equal_keeps_first_k() -> None:
    scores = torch.ones(2, 6)
    expected = torch.tensor([[True, True, True, False, False, False]] * 2)
    assert torch.equal(topk_mask(scores, 3), expected)
    assert torch.equal(topk_mask(torch.zeros(5), 2), torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool))


def test_topk_mask_ties_at_threshold_lower_index_wins() -> None:
    scores = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 5.0])
    assert topk_mask(scores, 3).tolist() == [True, False, True, False, False, True]
    assert topk_mask(scores, 0).tolist() == [False] * 6
    assert topk_mask(scores, 6).tolist() == [True] * 6
    # k = 1 takes its own (argmax) path: the same rule, batched.
    assert topk_mask(scores, 1).tolist() == [False] * 5 + [True]
    batched = torch.tensor([[2.0, 7.0, 7.0], [0.0, 0.0, 0.0], [-1.0, -3.0, -1.0]])
    assert topk_mask(batched, 1).tolist() == [[False, True, False], [True, False, False], [True, False, False]]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 12), min_size=1, max_size=3),
    st.sampled_from([torch.float32, torch.float64]),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_topk_mask_k1_is_the_first_maximum(shape: list[int], dtype: torch.dtype, seed: int, nan: bool) -> None:
    """k = 1 scans columns for short rows and calls argmax otherwise: both give argmax's first maximum."""
    scores = torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if nan:
        scores.view(-1)[seed % scores.numel()] = float("nan")
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.argmax(dim=-1, keepdim=True), True)
    mask = topk_mask(scores, 1)
    assert mask.shape == scores.shape and mask.is_contiguous()
    assert torch.equal(mask, expected)


def test_topk_mask_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match=re.escape("k must be in [0, 3], got 4")):
        topk_mask(torch.ones(3), 4)
    with pytest.raises(ValueError, match=re.escape("k must be in [0, 3], got -1")):
        topk_mask(torch.ones(3), -1)


def test_topk_golden() -> None:
    x = torch.tensor([[1.0, -3.0, 2.0], [-3.0, 0.5, 0.0]])
    assert torch.equal(TopK(2).project(x), torch.tensor([[0.0, -3.0, 0.0], [-3.0, 0.0, 0.0]]))
    assert torch.equal(TopK(3).project(x), torch.tensor([[0.0, -3.0, 2.0], [-3.0, 0.0, 0.0]]))
    g = torch.tensor([0.5, -1.0, 2.0, 3.0])
    assert TopK(3).lmo(g).tolist() == [1.0, 1.0, 1.0, 0.0]
    assert TopK(3).lmo(g, only_negative=True).tolist() == [0.0, 1.0, 0.0, 0.0]
    # Equal gradients: the lower index is switched on.
    assert TopK(2).lmo(torch.tensor([-1.0, -2.0, -1.0, -1.0])).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert TopK(2).contains(x.new_tensor([0.0, 1.0, 0.0, 2.0]))
    assert not TopK(1).contains(x.new_tensor([0.0, 1.0, 0.0, 2.0]))


def test_rowtopk_golden() -> None:
    x = torch.tensor([[1.0, -4.0, 2.0, 3.0], [2.0, 2.0, -2.0, 1.0]])
    expected = torch.tensor([[0.0, -4.0, 0.0, 3.0], [2.0, 2.0, 0.0, 0.0]])
    assert torch.equal(RowTopK(2).project(x), expected)
    g = torch.tensor([[1.0, -1.0, 2.0, -3.0], [0.0, 1.0, 2.0, 3.0]])
    assert RowTopK(2).lmo(g).tolist() == [[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
    assert RowTopK(2).lmo(g, only_negative=True).tolist() == [[0.0, 1.0, 0.0, 1.0], [0.0] * 4]
    # Rows are dim 0; the remaining dims are flattened into one row.
    x3 = torch.tensor([[[1.0, 5.0], [3.0, 2.0]]])
    assert torch.equal(RowTopK(1).project(x3), torch.tensor([[[0.0, 5.0], [0.0, 0.0]]]))


def test_nm_golden() -> None:
    x = torch.tensor(
        [
            [1.0, -4.0, 2.0, 3.0, 0.5, 0.5, 0.5, 0.5],
            [0.0, 0.0, 0.0, 1.0, -1.0, 2.0, -3.0, 4.0],
        ]
    )
    expected = torch.tensor(
        [
            [0.0, -4.0, 0.0, 3.0, 0.5, 0.5, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, -3.0, 4.0],
        ]
    )
    nm = NMSparse(2, 4)
    assert torch.equal(nm.project(x), expected)
    assert nm.contains(expected) and not nm.contains(x)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, -1.0, -2.0, 5.0, -3.0]])
    assert nm.lmo(g).tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]]
    assert nm.lmo(g, only_negative=True).tolist() == [[0.0] * 5 + [1.0, 0.0, 1.0]]


def test_nm_groups_run_along_input_dim_of_conv() -> None:
    # (out=1, in=4, kh=1, kw=2): each kernel position holds one group of the 4 input channels.
    x = torch.tensor([1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0]).reshape(1, 4, 1, 2)
    p = NMSparse(1, 4).project(x)
    assert p.reshape(4, 2).tolist() == [[0.0, 8.0], [0.0, 0.0], [0.0, 0.0], [4.0, 0.0]]


def test_structured_golden() -> None:
    x = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 2.0], [-3.0, 0.0, 0.0]])
    # Row norms^2: 3, 4, 9 -> keep rows 2 and 1.
    rows = StructuredGroups(2, dim=0)
    assert torch.equal(rows.project(x), torch.tensor([[0.0] * 3, [0.0, 0.0, 2.0], [-3.0, 0, 0]]))
    # Column norms^2: 10, 1, 5 -> keep column 0.
    cols = StructuredGroups(1, dim=1)
    assert torch.equal(cols.project(x), torch.tensor([[1.0, 0, 0], [0.0, 0, 0], [-3.0, 0, 0]]))
    assert rows.group_norms(x).square().tolist() == pytest.approx([3.0, 4.0, 9.0])  # what the mask ranks
    assert cols.group_norms(x).dtype == torch.float64 and cols.group_norms(x).square().tolist() == pytest.approx(
        [10.0, 1.0, 5.0]
    )
    # Equal norms: the lower group index wins.
    tie = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert torch.equal(StructuredGroups(1).project(tie), torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    g = torch.tensor([[1.0, -3.0], [-1.0, -1.0], [5.0, -1.0]])  # row sums -2, -2, 4
    assert StructuredGroups(2).lmo(g).tolist() == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    assert StructuredGroups(1).lmo(g).tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert StructuredGroups(3).lmo(g, only_negative=True).tolist() == [[1.0, 1.0]] * 2 + [[0, 0]]
    assert StructuredGroups(1, dim=1).lmo(g).tolist() == [[0.0, 1.0]] * 3  # column sums 5, -5
    assert StructuredGroups(1).contains(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    assert not StructuredGroups(1).contains(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_global_topk_golden() -> None:
    a = torch.tensor([[1.0, -5.0], [0.5, 2.0]])
    b = torch.tensor([4.0, -2.0, 0.1])
    pa, pb = GlobalTopK(3).project([a, b])
    # |values| 5, 4, then a tie 2 (a[1, 1], flat 3) vs 2 (b[1], flat 5): the lower index wins.
    assert torch.equal(pa, torch.tensor([[0.0, -5.0], [0.0, 2.0]]))
    assert torch.equal(pb, torch.tensor([4.0, 0.0, 0.0]))
    leaf = a.clone().requires_grad_()
    # Every pattern's projection keeps the graph through x with its support fixed (TopK detached it alone).
    for projected in (*GlobalTopK(3).project([leaf, b])[:1], TopK(2).project(leaf), NMSparse(1, 2).project(leaf)):
        (grad,) = torch.autograd.grad(projected.sum(), leaf)
        assert torch.equal(grad, (projected != 0).float())
    assert not TopK(2).project(leaf, out=torch.empty(2, 2)).requires_grad  # into a buffer: a value
    va, vb = GlobalTopK(2).lmo([a, b])
    assert va.tolist() == [[0.0, 1.0], [0.0, 0.0]] and vb.tolist() == [0.0, 1.0, 0.0]
    # Five negative gradients, a budget of six: the sixth pick (-0.1 -> 0.1) is non-negative.
    va, vb = GlobalTopK(6).lmo([-a.abs(), b])
    assert va.tolist() == [[1.0, 1.0], [1.0, 1.0]] and vb.tolist() == [0.0, 1.0, 1.0]
    va, vb = GlobalTopK(6).lmo([-a.abs(), b], only_negative=True)
    assert va.tolist() == [[1.0, 1.0], [1.0, 1.0]] and vb.tolist() == [0.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Validation and helpers.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("numel", "sparsity", "expected"),
    [(10, 0.0, 10), (10, 0.9, 1), (10, 0.5, 5), (1000, 0.75, 250), (7, 0.5, 4), (0, 0.3, 0)],
)
def test_keep_count_values(numel: int, sparsity: float, expected: int) -> None:
    assert keep_count(numel, sparsity) == expected


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_keep_count_rejects_out_of_range(sparsity: float) -> None:
    message = f"sparsity must be in [0, 1), got {sparsity}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        keep_count(10, sparsity)


@pytest.mark.parametrize(("text", "expected"), [("2:4", (2, 4)), ("4:4", (4, 4)), ("1:8", (1, 8))])
def test_parse_nm_accepts(text: str, expected: tuple[int, int]) -> None:
    assert parse_nm(text) == expected


@pytest.mark.parametrize("text", ["2-4", "3:2", "0:4", "a:b", "2:4:8", "", ":4", "2:", "-1:4"])
def test_parse_nm_rejects(text: str) -> None:
    message = f"pattern must look like N:M with integers 0 < N <= M (e.g. 2:4), got {text!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_nm(text)


@pytest.mark.parametrize("width", [6, 3, 5])
def test_nm_rejects_width_not_divisible(width: int) -> None:
    nm = NMSparse(2, 4)
    x = torch.ones(2, width)
    message = f"N:M pattern 2:4 needs the input width divisible by 4, got width {width}"
    for call in (nm.mask, nm.project, nm.lmo, nm.contains):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            call(x)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        nm.check_shape((2, width, 3, 3))


def test_nm_rejects_1d_and_bad_pattern() -> None:
    message = "N:M pattern 2:4 needs a tensor with an input dimension, got shape (8,)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        NMSparse(2, 4).project(torch.ones(8))
    for n, m in [(3, 2), (0, 4), (-1, 4)]:
        with pytest.raises(ValueError, match=re.escape(f"N:M needs integers 0 < N <= M, got {n}:{m}")):
            NMSparse(n, m)


@pytest.mark.parametrize(
    ("make", "arg", "message"),
    [
        (lambda: TopK(-1), None, "k must be an integer >= 0, got -1"),
        (lambda: TopK(5), torch.ones(4), "k=5 exceeds the tensor's 4 entries"),
        (lambda: RowTopK(-2), None, "k must be an integer >= 0, got -2"),
        (lambda: RowTopK(4), torch.ones(2, 3), "k=4 exceeds the row width 3"),
        (lambda: StructuredGroups(-1), None, "k must be an integer >= 0, got -1"),
        (lambda: StructuredGroups(1, dim=2), None, "dim must be 0 (output groups) or 1"),
        (
            lambda: StructuredGroups(3, dim=1),
            torch.ones(4, 2),
            "k=3 exceeds the 2 groups along dim 1",
        ),
        (lambda: GlobalTopK(-1), None, "k must be an integer >= 0, got -1"),
        (lambda: GlobalTopK(6), [torch.ones(2), torch.ones(3)], "k=6 exceeds the 5 entries"),
    ],
)
def test_invalid_budgets_rejected(make: Callable, arg: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        fs = make()
        fs.project(arg)


# ---------------------------------------------------------------------------------------------
# Large-tensor fast path (sampled selection + hardshrink), above the 1 << 20 threshold.
# ---------------------------------------------------------------------------------------------

LARGE = 1 << 21


def _stable_topk_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: the k largest of a flat tensor, lower index first among ties (stable sort)."""
    order = torch.sort(a, descending=True, stable=True).indices[:k]
    mask = torch.zeros(a.numel(), dtype=torch.bool)
    mask[order] = True
    return mask


@pytest.fixture
def sampled_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """Records the results of the sampled k-th-largest selection, to prove the path is used."""
    calls: list = []
    original = selection.kth_largest_sampled

    def spy(*args: object, **kwargs: object) -> object:
        found = original(*args, **kwargs)
        calls.append(found)
        return found

    monkeypatch.setattr(selection, "kth_largest_sampled", spy)
    return calls


def test_large_topk_project_matches_threshold(sampled_calls: list) -> None:
    assert LARGE > selection.SAMPLED_SELECT_MIN_NUMEL
    gen = torch.Generator().manual_seed(0)
    # Distinct magnitudes (exact in float32), random signs: no ties anywhere.
    magnitudes = (torch.randperm(LARGE, generator=gen) + 1).float() * 2.0**-21
    signs = torch.randint(0, 2, (LARGE,), generator=gen).float() * 2 - 1
    x = (magnitudes * signs).reshape(1024, 2048)
    a = x.abs()
    for sparsity in (0.05, 0.5, 0.9, 0.99):
        k = keep_count(LARGE, sparsity)
        kth = a.reshape(-1).kthvalue(LARGE - k + 1).values
        expected = x * (a >= kth)
        sampled_calls.clear()
        got = TopK(k).project(x)
        assert any(c is not None for c in sampled_calls), "sampled path was not taken"
        assert torch.equal(got, expected), sparsity
        assert int(torch.count_nonzero(got)) == k
    # Gaussian data may hold a few exact float32 ties: compare with the stable reference.
    y = torch.randn(LARGE, generator=gen)
    k = keep_count(LARGE, 0.9)
    assert torch.equal(TopK(k).project(y), y * _stable_topk_mask(y.abs(), k))


def test_large_topk_project_with_many_ties(sampled_calls: list) -> None:
    gen = torch.Generator().manual_seed(1)
    # Magnitudes in {1, 2, 3} with random signs: every threshold is a massive tie.
    x = torch.randint(1, 4, (LARGE,), generator=gen).float()
    x *= torch.randint(0, 2, (LARGE,), generator=gen).float() * 2 - 1
    a = x.abs()
    for sparsity in (0.5, 0.9):
        k = keep_count(LARGE, sparsity)
        sampled_calls.clear()
        got = TopK(k).project(x)
        assert sampled_calls, "sampled path was not taken"
        assert int(torch.count_nonzero(got)) == k
        expected_mask = _stable_topk_mask(a, k)
        assert torch.equal(got, x * expected_mask)
        assert torch.equal(topk_mask(a.reshape(1, -1), k).reshape(-1), expected_mask)
    # With zeros in the input the mask still has exactly k entries, zeros included.
    z = torch.randint(0, 3, (LARGE,), generator=gen).float()
    k = keep_count(LARGE, 0.2)
    mask = TopK(k).mask(z).reshape(-1)
    assert int(mask.sum()) == k
    assert torch.equal(mask, _stable_topk_mask(z, k))
    assert int(torch.count_nonzero(TopK(k).project(z))) == int(torch.count_nonzero(z))


def _tied_data(kind: str, gen: torch.Generator) -> torch.Tensor:
    """Large tensors whose thresholds are heavily tied (and the orders that stress the tie cut)."""
    signs = torch.randint(0, 2, (LARGE,), generator=gen).float() * 2 - 1
    if kind == "integers":  # 1..8: every threshold is tied by about 1/8 of the entries
        return torch.randint(1, 9, (LARGE,), generator=gen).float() * signs
    if kind == "quantized":  # a few hundred levels
        return torch.round(torch.randn(LARGE, generator=gen) * 16) / 16
    if kind == "sorted":  # the ties of one value are contiguous, not spread over the index range
        return torch.sort(torch.randint(1, 5, (LARGE,), generator=gen).float()).values
    if kind == "descending":
        return torch.sort(torch.randint(1, 5, (LARGE,), generator=gen).float(), descending=True).values
    if kind == "constant":
        return torch.full((LARGE,), -2.5)
    if kind == "float64":
        return torch.randint(0, 6, (LARGE,), generator=gen).double() * signs.double()
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["integers", "quantized", "sorted", "descending", "constant", "float64"])
def test_large_topk_project_with_heavy_ties_takes_the_sampled_path(kind: str, sampled_calls: list) -> None:
    """Heavily tied data is selected by the sampled bracket too (no full selection), with the same result
    as a stable sort: ties to the lower flat index, into a buffer, in place."""
    x = _tied_data(kind, torch.Generator().manual_seed(3))
    for sparsity in (0.2, 0.5, 0.9, 0.99):
        k = keep_count(LARGE, sparsity)
        expected = x * _stable_topk_mask(x.abs(), k)
        sampled_calls.clear()
        got = TopK(k).project(x)
        assert sampled_calls and all(c is not None for c in sampled_calls), (kind, sparsity)
        assert torch.equal(got, expected), (kind, sparsity)
        buffer = torch.full_like(x, 7.0)
        assert TopK(k).project(x, out=buffer) is buffer and torch.equal(buffer, expected)
        y = x.clone()
        assert TopK(k).project(y, out=y) is y and torch.equal(y, expected)


def test_sampled_selection_reports_the_tie_cut() -> None:
    """The cut is the flat index of the last kept tie: >= t up to it, > t after it."""
    periods = LARGE // 7  # period 7: prime to the sample's stride
    x = torch.tensor([3.0, 1.0, -2.0, 2.0, 1.0, 2.0, -2.0]).repeat(periods)
    found = selection.kth_largest_sampled(x, periods + 3, magnitude=True)  # every 3, then the first three 2s
    assert found is not None
    assert float(found.threshold) == 2.0 and found.count_gt == periods and found.count_ge == 5 * periods
    assert found.cut == 5
    found = selection.kth_largest_sampled(x, 5 * periods, magnitude=True)
    assert found is not None and found.cut is None  # every 2 is kept


def test_large_project_allocates_only_its_result() -> None:
    """No second tensor of the input's size: the result (none with ``out=``) and small buffers only."""
    import tracemalloc

    from torch.profiler import ProfilerActivity, profile

    x = _tied_data("integers", torch.Generator().manual_seed(4))
    nbytes = x.numel() * x.element_size()
    k = keep_count(LARGE, 0.5)
    buffer = torch.empty_like(x)
    TopK(k).project(x, out=buffer)  # warm-up: the thread pool
    # k = 0 and k = numel too (slr's Z-step at the start of its schedule keeps everything)
    for keep, out in ((k, buffer), (k, None), (0, buffer), (x.numel(), buffer)):
        tracemalloc.start()  # NumPy's allocations (the sample, the band, the chunk buffers)
        TopK(keep).project(x, out=out)
        _, numpy_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:  # torch's allocations
            TopK(keep).project(x, out=out)
        allocated = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
        big = [size for size in allocated if size > nbytes // 8]
        assert big == ([] if out is not None else [nbytes] * len(big)), big  # only the result, if any
        assert numpy_peak < nbytes // 4, numpy_peak  # the sample, the band and the chunk buffers: ~1.5 MB here


def test_more_infinities_than_the_level_keeps_project_finite_where_it_zeroes_and_feasible() -> None:
    inf = math.inf
    x = torch.tensor([[inf, inf, 1.0, 2.0], [inf, 3.0, -inf, 1.0]])
    for fs in (TopK(1), RowTopK(1), NMSparse(1, 4), StructuredGroups(1), BlockSparse(1, 1, 4)):
        for out in (None, torch.empty_like(x)):
            projected = fs.project(x, out=out)
            assert not projected.isnan().any() and fs.contains(projected), (fs, projected)  # inf * 0 was nan
    projected = GlobalTopK(1).project([x[0], x[1]])
    assert not any(p.isnan().any() for p in projected) and GlobalTopK(1).contains(projected)


def test_a_mask_buffer_assigned_anew_is_the_one_applied() -> None:
    from constrainedsparse.masks import Mask

    mask = Mask(torch.tensor([True, True, False, False]))
    assert mask(torch.ones(4)).tolist() == [1, 1, 0, 0]
    mask.load_state_dict({"mask": torch.tensor([False, False, True, True])}, assign=True)
    assert mask(torch.ones(4)).tolist() == [0, 0, 1, 1]  # was the cached old mask


@FAST
@given(set_and_tensor(max_numel=24), st.booleans())
def test_project_into_a_buffer_matches_project(case: tuple[object, torch.Tensor], inplace: bool) -> None:
    """``project(x, out=...)`` writes the projection into ``out`` (``x`` itself allowed) and returns it."""
    fs, x = case
    expected = fs.project(x)
    out = x.clone() if inplace else torch.full_like(x, 7.0)
    assert fs.project(out if inplace else x, out=out) is out
    assert torch.equal(out, expected)


@FAST
@given(
    st.lists(st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0]), min_size=2, max_size=40),
    st.sampled_from([torch.float32, torch.float64]),
    st.data(),
)
def test_small_tensor_projection_takes_the_threshold_path_with_ties(values: list, dtype, data) -> None:
    """Below the sampled-selection size a CPU float tensor is projected from one NumPy introselect
    and ``hardshrink`` (no bool mask); it keeps exactly the top-k with ties to the lower index."""
    x = torch.tensor(values, dtype=dtype)
    k = data.draw(st.integers(1, x.numel() - 1))
    projected = selection.project_largest_magnitudes(x, k)
    assert projected is not None
    assert torch.equal(projected, x * selection.topk_mask(x.abs(), k))
    assert torch.equal(selection.project_largest_magnitudes(x, k, out=x.clone()), projected)
    assert selection.project_largest_magnitudes(torch.tensor([float("nan"), 1.0, 2.0], dtype=dtype), 2) is None


@pytest.mark.parametrize(
    "make",
    [
        lambda rng, n: rng.standard_normal(n),
        lambda rng, n: rng.integers(-3, 4, n).astype(float),  # heavy ties and zeros
        lambda rng, n: np.where(np.arange(n) % 16 == 0, 1.0, 1e-3 * rng.standard_normal(n)),  # the sample sees only 1s
        lambda rng, n: np.where(np.arange(n) % 97 == 5, np.nan, rng.standard_normal(n)),
        lambda rng, n: np.where(np.arange(n) % 7 == 0, np.inf, rng.standard_normal(n)),
    ],
    ids=["normal", "ties", "biased-sample", "nan", "inf"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_band_selection_equals_the_full_introselect(make, dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """From :data:`selection._BAND_MIN_NUMEL` entries the k-th largest magnitude is selected within a band of
    candidates: the same threshold, counts and tie cut as one introselect over all of them (or ``None`` alike)."""
    rng = np.random.default_rng(0)
    for n in (selection._BAND_MIN_NUMEL, 5000, 20000):
        values = make(rng, n).astype(dtype)
        for k in (1, n // 100, n // 10, n // 3, n // 2 + 1, n - 1):
            banded = selection._largest_magnitude_numpy(values, k)
            with monkeypatch.context() as patch:
                patch.setattr(selection, "_band", lambda scores, k: scores)
                full = selection._largest_magnitude_numpy(values, k)
            assert (banded is None) == (full is None)
            if full is not None:
                assert torch.equal(banded.threshold, full.threshold)
                assert banded[1:] == full[1:]
                x = torch.from_numpy(values)
                assert torch.equal(selection.project_largest_magnitudes(x, k), x * selection.topk_mask(x.abs(), k))


def test_project_rejects_a_mismatched_buffer() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    wrong = (
        (torch.empty(3, 2), r"\(3, 2\) torch.float32"),
        (torch.empty(2, 3, dtype=torch.float64), r"\(2, 3\) torch.float64"),
    )
    for out, what in wrong:
        for fs in (TopK(2), RowTopK(1), StructuredGroups(1)):
            with pytest.raises(ValueError, match=rf"out must have the input's shape, dtype and device: got {what}"):
                fs.project(x, out=out)


def test_project_refuses_a_buffer_overlapping_the_input_and_leaves_the_input_as_it_was() -> None:
    storage = torch.tensor([1.0, -1.0, 2.0, 0.5, 9.0])
    x = storage[:4]
    for fs, out in ((TopK(2), storage[1:]), (RowTopK(1), x.view(2, 2).t())):
        shaped = x.view(2, 2) if isinstance(fs, RowTopK) else x
        with pytest.raises(ValueError, match=r"^out shares memory with the input without being the input itself"):
            fs.project(shaped, out=out)
        assert storage.tolist() == [1.0, -1.0, 2.0, 0.5, 9.0]
    assert TopK(2).project(x, out=x) is x  # x itself stays allowed


def test_large_integer_tensors_project_as_small_ones() -> None:
    x = torch.randint(-1000, 1000, (LARGE,), generator=torch.Generator().manual_seed(0))
    k = LARGE // 3
    assert torch.equal(TopK(k).project(x), x * topk_mask(x.abs().reshape(1, -1), k).reshape(-1))


@pytest.mark.parametrize(
    ("dtype", "rows"),
    [
        (torch.float16, [[-60000.0, -60000.0], [-60000.0, -69984.0]]),  # both sums past float16's range
        (torch.bfloat16, [[-128.0, -128.0], [-128.0, -129.0]]),  # -256 and -257: one bfloat16 value
    ],
)
def test_group_lmo_sums_half_precision_gradients_without_overflow_or_false_ties(dtype, rows) -> None:
    grad = torch.tensor(rows, dtype=dtype)  # the second row's sum is the lower one
    for fs in (StructuredGroups(1, dim=0), BlockSparse(1, 1, 2)):
        assert fs.lmo(grad)[:, 0].tolist() == [0.0, 1.0]


def test_large_lmo_accepts_grad_requiring_tensor() -> None:
    g = torch.randn(LARGE, requires_grad=True)
    k = keep_count(LARGE, 0.9)
    v = TopK(k).lmo(g)
    assert int(v.sum()) == k


@pytest.mark.parametrize(
    ("x", "keep_row"),
    [
        # float16: both squared norms (65536, 102400) overflow to inf; row 1 is the larger.
        (torch.stack([torch.full((4096,), 4.0), torch.full((4096,), 5.0)]).half(), 1),
        # float32: 1e-30 squares to 0, so a feasible point is not a fixed point of the projection.
        (torch.tensor([[0.0, 0.0], [1e-30, 0.0]]), 1),
    ],
    ids=["float16-overflow", "float32-underflow"],
)
def test_structured_project_extreme_magnitudes(x: torch.Tensor, keep_row: int) -> None:
    mask = StructuredGroups(1).mask(x)
    assert bool(mask[keep_row].all()) and not bool(mask[1 - keep_row].any())


@pytest.mark.parametrize(
    "feasible", [TopK(3), RowTopK(1), NMSparse(1, 2), StructuredGroups(1, dim=0), StructuredGroups(2, dim=1)]
)
def test_contains_accepts_boolean_masks(feasible):
    weights = torch.arange(1.0, 13.0).reshape(3, 4)
    mask = feasible.mask(weights)
    assert mask.dtype == torch.bool
    assert feasible.contains(mask) and feasible.contains(weights * mask)
    assert not feasible.contains(torch.ones(3, 4, dtype=torch.bool))


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["row", "unstructured", "nm"]),
    rows=st.integers(1, 4),
    groups=st.integers(1, 4),
    fraction=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**16),
)
def test_face_vertices_are_vertices_of_the_whole_pattern(kind, rows, groups, fraction, seed):
    """Fixed coordinates + a free vertex of the face = a vertex of the pattern with the full budget."""
    generator = torch.Generator().manual_seed(seed)
    shape = (rows, 4 * groups)
    pattern = {"row": RowTopK(2 * groups), "unstructured": TopK(rows * 2 * groups), "nm": NMSparse(2, 4)}[kind]
    scores = torch.rand(shape, generator=generator)
    grad = -torch.rand(shape, generator=generator)  # all negative: the oracle fills the whole budget
    face = pattern.face(fraction, shape)
    fixed = face.fixed.mask(scores) if face.fixed is not None else torch.zeros(shape, dtype=torch.bool)
    free_index = (~fixed).reshape(-1).nonzero()[:, 0]
    assert free_index.numel() == math.prod(face.free_shape)
    free_vertex = face.free.lmo(grad.reshape(-1)[free_index].reshape(face.free_shape), only_negative=True)
    vertex = fixed.reshape(-1).clone().float()
    vertex[free_index] = free_vertex.reshape(-1)
    vertex = vertex.reshape(shape)
    assert pattern.contains(vertex)
    full = pattern.lmo(grad)
    assert int(vertex.sum()) == int(full.sum())  # the face keeps every unit's budget


def test_face_rejects_structured_groups_and_bad_fractions():
    with pytest.raises(ValueError, match=r"StructuredGroups\(k=1, dim=0\) has no face with fixed coordinates"):
        StructuredGroups(1, dim=0).face(0.5, (2, 4))
    with pytest.raises(ValueError, match=r"the fixed fraction of a face must be in \[0, 1\), got 1.0"):
        RowTopK(2).face(1.0, (2, 4))


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 9),
    rows=st.integers(1, 5),
    data=st.data(),
)
def test_topk_mask_matches_a_stable_sort_on_short_and_long_rows(width: int, rows: int, data) -> None:
    """Every path of topk_mask (argmax for k = 1, selection otherwise) keeps the same entries."""
    values = data.draw(st.lists(st.integers(-2, 2), min_size=width * rows, max_size=width * rows))  # many ties
    scores = torch.tensor(values, dtype=torch.float32).reshape(rows, width)
    k = data.draw(st.integers(0, width))
    mask = topk_mask(scores, k)
    for row in range(rows):
        assert torch.equal(mask[row], _stable_topk_mask(scores[row], k))


@FAST
@given(global_and_tensors(max_numel=16), st.data())
def test_lifted_floors_keep_each_floor_and_the_best_of_the_rest(case: tuple[GlobalTopK, list], data) -> None:
    """Every prefix at least as long as the floors keeps each tensor's own best ``floor`` entries,
    and the rest of the prefix is the best of what remains (a global budget with minimums)."""
    _, xs = case
    floors = [data.draw(st.integers(0, x.numel())) for x in xs]
    k = data.draw(st.integers(sum(floors), sum(x.numel() for x in xs)))
    masks = GlobalTopK(k).masks(sets.lift_floors(xs, floors))
    assert sum(int(m.sum()) for m in masks) == k
    own_best = [selection.topk_mask(x.abs().reshape(1, -1), f)[0].reshape(x.shape) for x, f in zip(xs, floors)]
    assert all(bool((m | ~b).all()) for m, b in zip(masks, own_best, strict=True))
    rest_kept = torch.cat([x.abs()[m & ~b] for x, m, b in zip(xs, masks, own_best)])
    rest_dropped = torch.cat([x.abs()[~m] for x, m in zip(xs, masks)])
    if rest_kept.numel() and rest_dropped.numel():
        assert float(rest_kept.min()) >= float(rest_dropped.max())


@FAST
@given(global_and_tensors(max_numel=16), st.data())
def test_nearest_prefix_never_goes_below_the_floors(case: tuple[GlobalTopK, list], data) -> None:
    _, xs = case
    floors = [data.draw(st.integers(0, x.numel())) for x in xs]
    budget = data.draw(st.integers(0, sum(x.numel() for x in xs)))
    masks = sets.nearest_prefix(sets.lift_floors(xs, floors), sum, budget, minimum=sum(floors))
    assert all(int(m.sum()) >= f for m, f in zip(masks, floors, strict=True))
    if budget >= sum(floors):
        assert sum(int(m.sum()) for m in masks) == budget


def test_lift_floors_bad_input_is_one_value_error() -> None:
    with pytest.raises(ValueError, match=r"2 floors for 1 score tensors"):
        sets.lift_floors([torch.ones(3)], [1, 1])
    with pytest.raises(ValueError, match=r"a floor must be in \[0, 3\], got 4"):
        sets.lift_floors([torch.ones(3)], [4])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TopK(2.5), r"^k must be an integer >= 0, got 2\.5$"),
        (lambda: TopK("3"), r"^k must be an integer >= 0, got '3'$"),
        (lambda: TopK(True), r"^k must be an integer >= 0, got True$"),
        (lambda: RowTopK(float("nan")), r"^k must be an integer >= 0, got nan$"),
        (lambda: StructuredGroups(1.5), r"^k must be an integer >= 0, got 1\.5$"),
        (lambda: NMSparse(2, 4.0), r"^M must be an integer, got 4\.0$"),
        (lambda: GlobalTopK(2).project([]), r"^GlobalTopK needs at least one tensor$"),
    ],
)
def test_set_constructors_refuse_counts_that_are_not_integers(build, message):
    with pytest.raises(ValueError, match=message):
        build()
    assert TopK(np.int64(3)).k == 3 and isinstance(TopK(torch.tensor(3)).k, int)


def test_block_sparse_blocks_span_a_conv_weights_kernel() -> None:
    fs = BlockSparse(1, 1, 1)
    x = torch.tensor([[[3.0, 0.0]], [[2.0, 2.5]]])  # (out 2, in 1, kernel 2): block norms 3 and 3.2
    assert torch.equal(fs.project(x), torch.tensor([[[0.0, 0.0]], [[2.0, 2.5]]]))
    two = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two nonzero blocks, the second only at kernel position 1
    assert not fs.contains(two) and BlockSparse(2, 1, 1).contains(two)


@pytest.mark.parametrize(
    ("build", "x", "message"),
    [
        (lambda: BlockSparse(1, 0, 2), None, "block rows must be an integer >= 1, got 0"),
        (lambda: BlockSparse(1, 2, 2.0), None, "block cols must be an integer >= 1, got 2.0"),
        (lambda: BlockSparse(5, 2, 2), torch.ones(4, 4), "k=5 exceeds the 4 blocks"),
        (
            lambda: BlockSparse(1, 2, 2),
            torch.ones(3, 4),
            "block pattern 2x2 needs dims 0 and 1 divisible by (2, 2), got shape (3, 4)",
        ),
    ],
)
def test_block_sparse_refusals(build, x, message) -> None:
    if x is None:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            build()
        return
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build().project(x)


@pytest.mark.parametrize(
    ("feasible", "x", "message"),
    [
        (TopK(1), [1.0, 2.0], "a sparsity set takes a torch.Tensor, got a list"),
        (RowTopK(1), torch.ones(4), "the row pattern needs a tensor with rows, got shape (4,)"),
        (RowTopK(1), torch.tensor(1.0), "the row pattern needs a tensor with rows, got shape ()"),
        (StructuredGroups(1, dim=1), torch.ones(4), "structured groups along dim 1 need a tensor with 2 dimensions"),
        (NMSparse(2, 4), np.ones((2, 4), dtype=np.float32), "a sparsity set takes a torch.Tensor, got a ndarray"),
        (BlockSparse(1, 2, 2), None, "a sparsity set takes a torch.Tensor, got a NoneType"),
    ],
)
def test_every_set_method_refuses_an_input_it_cannot_rank(feasible, x, message) -> None:
    """What a user may pass by mistake (a list, a bool mask, a bias under a row pattern) is one ValueError from
    every method, not a TypeError/IndexError from inside torch."""
    for call in (feasible.mask, feasible.project, feasible.lmo, feasible.contains):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            call(x)


@pytest.mark.parametrize(
    "feasible", [TopK(1), RowTopK(1), NMSparse(2, 4), StructuredGroups(1), BlockSparse(1, 2, 2)], ids=repr
)
def test_a_boolean_mask_is_refused_where_magnitudes_rank_and_counted_by_contains(feasible) -> None:
    mask = torch.ones(2, 4, dtype=torch.bool)
    for call in (feasible.mask, feasible.project, feasible.lmo):
        with pytest.raises(ValueError, match="^a sparsity set takes a numeric tensor, got a bool one"):
            call(mask)
    assert not feasible.contains(mask) and feasible.contains(torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    ("xs", "message"),
    [
        ([], "GlobalTopK needs at least one tensor"),
        (torch.ones(4), "GlobalTopK takes a sequence of tensors (one per layer), got a Tensor"),
        ([torch.ones(2), "w"], "a sparsity set takes a torch.Tensor, got a str"),
    ],
)
def test_global_topk_methods_refuse_what_is_no_sequence_of_tensors(xs, message) -> None:
    joint = GlobalTopK(1)
    for call in (joint.masks, joint.project, joint.lmo, joint.contains):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            call(xs)


def test_global_topk_refuses_boolean_masks_where_magnitudes_rank_and_counts_them_in_contains() -> None:
    joint, masks = GlobalTopK(1), [torch.ones(2, 2, dtype=torch.bool)]
    for call in (joint.masks, joint.project, joint.lmo):
        with pytest.raises(ValueError, match="^a sparsity set takes a numeric tensor, got a bool one"):
            call(masks)
    assert not joint.contains(masks) and joint.contains([torch.zeros(2, 2, dtype=torch.bool)])
