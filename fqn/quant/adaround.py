"""Learned weight rounding (AdaRound, Nagel et al., ICML 2020): the primitives, in plain PyTorch.

Rounding each weight to the nearest grid point is not what minimises a layer's output error: the
errors of neighbouring weights add up through the input. AdaRound instead learns, per weight, whether
to round down or up. A continuous variable ``V`` gives the soft rounding offset
``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (the rectified sigmoid, zeta = 1.1,
gamma = -0.1, so that h reaches exactly 0 and 1), the soft weight is
``s * (clip(floor(W / s) + h(V) + z, qmin, qmax) - z)``, and the regulariser
``sum(1 - |2 h(V) - 1| ** beta)``, with ``beta`` annealed from 20 to 2, pushes every ``h`` to 0 or 1.
Once learned, the integer code is ``floor(W / s) + [h(V) >= 0.5]``: what the int8 file stores.

This module only holds the maths; block reconstruction (BRECQ, QDrop), which minimises a block's output
error with it, builds on these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V)``: the soft rounding offset in [0, 1], exactly 0 or 1 beyond the sigmoid's stretched ends."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _channel_view(t: Tensor, like: Tensor, axis: int | None) -> Tensor:
    """A per-channel (or per-tensor) parameter shaped to broadcast over ``like`` along ``axis``."""
    if axis is None:
        return t.reshape(())
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.reshape(shape)


def initial_rounding(w: Tensor, scale: Tensor, axis: int | None = None) -> Tensor:
    """``V`` with ``h(V) = W / s - floor(W / s)``: the soft weight starts at the float weight itself.

    The fraction is kept inside (0, 1), where the rectified sigmoid is invertible; a weight exactly on the
    grid starts a hair above its grid point, which rounds to it.
    """
    x = w.detach().float() / _channel_view(scale.float(), w, axis)
    frac = (x - torch.floor(x)).clamp(1e-4, 1 - 1e-4)
    p = (frac - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1 - p))


def soft_quantize(w: Tensor, scale: Tensor, zero_point: Tensor, v: Tensor, qmin: int, qmax: int,
                  axis: int | None = None) -> Tensor:
    """The soft-rounded weight ``s * (clip(floor(W / s) + h(V) + z, qmin, qmax) - z)``, differentiable in ``V``.

    The floor is taken of the (constant) weight: during reconstruction only ``V`` learns, so its gradient is
    the output error's, through ``h``; clipped codes pass no gradient, as the int8 kernel cannot exceed them.
    """
    s = _channel_view(scale.float(), w, axis)
    z = _channel_view(zero_point.float(), w, axis)
    base = torch.floor(w.detach().float() / s)
    code = (base + rectified_sigmoid(v) + z).clamp(qmin, qmax)
    return ((code - z) * s).to(w.dtype)


def hard_codes(w: Tensor, scale: Tensor, zero_point: Tensor, v: Tensor, qmin: int, qmax: int,
               axis: int | None = None) -> Tensor:
    """The integer codes the learned rounding gives: ``clip(floor(W / s) + [h(V) >= 0.5] + z, qmin, qmax)``."""
    s = _channel_view(scale.float(), w, axis)
    z = _channel_view(zero_point.float(), w, axis)
    up = (rectified_sigmoid(v) >= 0.5).float()
    return (torch.floor(w.detach().float() / s) + up + z).clamp(qmin, qmax).to(torch.int32)


def rounding_regularizer(v: Tensor, beta: float) -> Tensor:
    """``sum(1 - |2 h(V) - 1| ** beta)``: 0 where every offset is 0 or 1, largest where they sit at 1/2."""
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def beta_schedule(step: int, total: int, *, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """The regulariser's ``beta`` at ``step`` of ``total``: None during the warm-up (no regulariser, the
    rounding moves freely), then linear from ``start`` (a gentle push to 0/1) to ``end`` (a hard one)."""
    if total < 1 or not 0 <= warmup < 1:
        raise ValueError(f"need total >= 1 and 0 <= warmup < 1, got total={total}, warmup={warmup}")
    first = math.floor(warmup * total)
    if step < first:
        return None
    progress = (step - first) / max(total - first - 1, 1)
    return start + (end - start) * min(progress, 1.0)


def learn_rounding(w: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None,
                   op: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, target: Tensor, *, iters: int = 1000,
                   lr: float = 1e-2, weight: float = 0.01, warmup: float = 0.2) -> Tensor:
    """Learn ``w``'s rounding so that ``op(inputs, soft weight)`` matches ``target``; returns the learned ``V``.

    ``op`` applies a weight to inputs (``F.linear``, a conv with the layer's stride and padding); ``target``
    is what the float layer gives. The loss is BRECQ's: the squared output error summed per sample and
    averaged over samples, plus ``weight`` times the rounding regulariser (off during the warm-up, then
    ``beta`` annealed by `beta_schedule`). Adam on ``V``, as in AdaRound. The codes to store are then
    `hard_codes` of the returned ``V``.
    """
    v = initial_rounding(w, scale, axis).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    for step in range(iters):
        out = op(inputs, soft_quantize(w, scale, zero_point, v, qmin, qmax, axis))
        loss = (out - target).pow(2).flatten(1).sum(1).mean()
        beta = beta_schedule(step, iters, warmup=warmup)
        if beta is not None:
            loss = loss + weight * rounding_regularizer(v, beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return v.detach()


__all__ = ["ZETA", "GAMMA", "rectified_sigmoid", "initial_rounding", "soft_quantize", "hard_codes",
           "rounding_regularizer", "beta_schedule", "learn_rounding"]
