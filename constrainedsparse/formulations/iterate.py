r"""What one coordination iteration of the W = Z formulations (``slr``, ``admm``) computes and reads.

:class:`Iterate` holds :math:`W^k`, :math:`Z^{k-1}`, :math:`Z^k` and the residuals computed once on first use
(and measures the dual dynamics' norms after the last dual step);
:func:`dots` reads many scalars back to the host in one transfer; :func:`chunks` bounds the full-size temporaries
of a foreach computation over many tensors.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

__all__ = ["CHUNK_ELEMENTS", "Iterate", "chunks", "dots"]

CHUNK_ELEMENTS = 1 << 24
"""Elements of the tensors whose full-size temporaries :func:`chunks` lets exist at once (64 MB each in float32)."""


def chunks(names: list[str], sizes: list[int], limit: int | None = None) -> list[list[str]]:
    """``names`` in order, cut into runs of at most ``limit`` (default :data:`CHUNK_ELEMENTS`) elements in all (a
    larger tensor alone): foreach calls over one run at a time bound their temporaries, and a small model is one
    run (one call per op)."""
    limit = CHUNK_ELEMENTS if limit is None else limit
    runs: list[list[str]] = []
    total = 0
    for name, size in zip(names, sizes, strict=True):
        if not runs or total + size > limit:
            runs.append([])
            total = 0
        runs[-1].append(name)
        total += size
    return runs


def dots(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """:math:`\\langle a, b\\rangle` for every pair (one BLAS dot each, in the wider dtype of the two), read back
    to the host at once.

    One host transfer for the whole list: a coordination synchronises a GPU a few times, not once per dot.
    """
    if not pairs:
        return []
    return torch.stack([_dot(a.reshape(-1), b.reshape(-1)) for a, b in pairs]).double().tolist()


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.dot`` in the wider dtype of the two (float32 multipliers of a bfloat16 model)."""
    if a.dtype != b.dtype:
        common = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(common), b.to(common)
    return torch.dot(a, b)


@dataclasses.dataclass
class Iterate:
    """What a dual step rule sees during coordination iteration :math:`k`.

    Residuals are computed on first use and then reused, so a rule that never needs
    :math:`W^k - Z^{k-1}` (ADMM) never pays for it.

    Attributes:
        w: :math:`W^k` (views of the live weights; they do not change during a coordination).
        z_prev: :math:`Z^{k-1}`.
        f_value: :math:`f(W^k)` on the reference batch, if the rule asked for it.
        z: :math:`Z^k`, set after the Z-step.
        notes: Values a dual rule computes before the Z-step and reads after it (this iteration only).
        residual_sq_before_z: :math:`\\lVert W^k - Z^{k-1}\\rVert^2` per tensor, if a rule measured it.
        residual_sq: :math:`\\lVert W^k - Z^k\\rVert^2` per tensor, if a rule measured it (else
            :meth:`squared_norms` measures it with its other norms).
        residual_linear: :math:`\\langle\\Lambda, W^k - Z^k\\rangle` per tensor with the multipliers of the
            second dual step (before it is applied), if a rule measured it.
    """

    w: dict[str, torch.Tensor]
    z_prev: dict[str, torch.Tensor]
    f_value: float | None
    z: dict[str, torch.Tensor] | None = None
    notes: dict[str, float] = dataclasses.field(default_factory=dict)
    residual_sq_before_z: dict[str, float] | None = None
    residual_sq: dict[str, float] | None = None
    residual_linear: dict[str, float] | None = None

    @functools.cached_property
    def residual_before_z(self) -> dict[str, torch.Tensor]:
        """:math:`W^k - Z^{k-1}` per tensor."""
        return dict(zip(self.w, torch._foreach_sub(list(self.w.values()), [self.z_prev[n] for n in self.w])))

    def forget_before_z(self) -> None:
        """Frees :attr:`residual_before_z` (a copy of the pruned weights) once no dual step needs it."""
        self.__dict__.pop("residual_before_z", None)

    @functools.cached_property
    def residual(self) -> dict[str, torch.Tensor]:
        """:math:`W^k - Z^k` per tensor (after the Z-step)."""
        return dict(zip(self.w, torch._foreach_sub(list(self.w.values()), [self.z[n] for n in self.w])))

    @torch.no_grad()
    def squared_norms(self, lam: dict[str, torch.Tensor]) -> dict[str, list[float]]:
        r"""Squared norms per tensor (in the order of :attr:`w`) after the last dual step, read back at once.

        ``lambda``: :math:`\lVert\Lambda_n\rVert^2` (of ``lam``); ``z_change``: :math:`\lVert Z^k_n -
        Z^{k-1}_n\rVert^2`; ``outside``: :math:`\lVert W_n - W_n \odot |\operatorname{sign} Z^k_n|\rVert^2`, the
        weight mass off the support of :math:`Z^k`; ``w``: :math:`\lVert W_n\rVert^2`; ``residual``:
        :math:`\lVert W_n - Z^k_n\rVert^2` (:attr:`residual_sq` if a rule measured it). The full-size differences
        are made a few tensors at a time (:func:`chunks`): a large model's coordination does not hold three more
        copies of its pruned weights for its metrics.
        """
        names = list(self.w)
        known = self.residual_sq is not None
        own = [torch._foreach_norm([lam[n] for n in names]), torch._foreach_norm([self.w[n] for n in names])]
        if not known:
            own.append(torch._foreach_norm(list(self.residual.values())))
        change_norms: list[torch.Tensor] = []
        outside_norms: list[torch.Tensor] = []
        for part in chunks(names, [self.w[n].numel() for n in names]):
            change = torch._foreach_sub([self.z[n] for n in part], [self.z_prev[n] for n in part])
            change_norms += torch._foreach_norm(change)
            del change
            # W - W |sign(Z)| with float ops only (a comparison into a bool tensor costs several float passes on CPU).
            w_list = [self.w[n] for n in part]
            on_support = torch._foreach_sign([self.z[n] for n in part])
            torch._foreach_abs_(on_support)
            outside_norms += torch._foreach_norm(torch._foreach_addcmul(w_list, w_list, on_support, value=-1))
        norms = [*own[0], *change_norms, *outside_norms, *own[1], *(own[2] if not known else [])]
        values = torch.stack(norms).double().square().tolist()
        m = len(names)
        result = {key: values[i * m : (i + 1) * m] for i, key in enumerate(("lambda", "z_change", "outside", "w"))}
        result["residual"] = list(self.residual_sq.values()) if known else values[4 * m :]
        return result
