"""The scale/zero-point maths of k-bit affine quantization: pure functions on tensors, no modules.

The bottom of ``fqn.quant``: observers, quantizers, layers and the int8 export all compute their
grids with these, so one rounding rule serves training, calibration, evaluation and conversion.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = torch.finfo(torch.float32).eps
"""The smallest scale: a range of width 0 (a dead channel) still has a positive step."""

def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range: ``[0, 2^k-1]`` (asymmetric) or ``[-(2^(k-1)-1), 2^(k-1)-1]`` (symmetric, zero point 0)."""
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def calc_qparams(lb: Tensor, ub: Tensor, bits: int, symmetric: bool,
                 min_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point for the range [lb, ub], with zero-point alignment (FQN 3.6).

    The range is widened to contain 0 and the zero point is rounded to an
    integer, so real 0 (zero padding, ReLU floor) is represented exactly; the
    bounds are nudged accordingly to ``(qmin - z)*scale`` and ``(qmax - z)*scale``.

    Example:
        >>> s, z = calc_qparams(torch.tensor([-1.0]), torch.tensor([3.0]), 8, False)
        >>> int(z), round(float(s) * 255, 4)
        (64, 4.0)
    """
    qmin, qmax = quant_range(bits, symmetric)
    lb = torch.minimum(lb.float(), torch.zeros_like(lb, dtype=torch.float32))
    ub = torch.maximum(ub.float(), torch.zeros_like(ub, dtype=torch.float32))
    if symmetric:
        scale = (torch.maximum(-lb, ub) / qmax).clamp_min(EPS)
        if min_scale is not None:
            scale = torch.maximum(scale, min_scale)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((ub - lb) / (qmax - qmin)).clamp_min(EPS)
    if min_scale is not None:
        scale = torch.maximum(scale, min_scale)
    zero_point = (qmin - torch.round(lb / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize_dequantize(xf: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                        axis: int | None) -> Tensor:
    """torch's fake-quantize kernel on float32 ``xf``, per tensor (0-d qparams) or per channel along ``axis``:
    the one forward training (with its straight-through gradient), evaluation and the ONNX export share."""
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(xf, scale, zero_point, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(xf, scale, zero_point, axis, qmin, qmax)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                  axis: int | None = None) -> Tensor:
    """Quantize-dequantize ``x`` (per tensor if ``axis`` is None, else per channel along ``axis``).

    The gradient is eq. 8's straight-through estimator, zero where the value clips: torch's own
    derivative of its fake-quantize kernels, whose forward also writes the mask, read off the integer
    code ``qmin <= round(x / scale) + z <= qmax`` (bounds recomputed in float, ``(qmax - z) * scale``,
    can land a rounding error below the largest weight of a channel and silently zero its gradient).
    One kernel forward, one backward: a hand-written mask cost five more elementwise kernels and
    their memory per quantizer (measured on CPU, 4x128x80x80 at 4 bits: 125 -> 96 ms forward and
    backward), and a GPU step runs ~170 quantizers. Computed in float32 whatever ``x`` is.
    """
    if axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    return quantize_dequantize(x.float(), scale, zero_point, qmin, qmax, axis).to(x.dtype)


def learned_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                          axis: int | None = None) -> Tensor:
    """Fake quantization with gradients for ``scale`` and the (float) ``zero_point`` too: LSQ+.

    torch's learnable kernels: the forward rounds and clamps the zero point as the int8 model will;
    ``x`` gets eq. 8's straight-through gradient (zero outside the range), the scale LSQ's
    ``round(x/s) - x/s`` inside and the clamp level outside, both scaled by ``1/sqrt(numel * qmax)``
    (LSQ's step-size gradient scale) so that a range moves at the pace of the weights.
    """
    xf = x.float()
    grad_factor = 1.0 / (max(xf.numel(), 1) * qmax) ** 0.5
    scale = scale.float().clamp_min(EPS)
    zero_point = zero_point.float()
    if axis is None:
        # as one channel: torch's per-tensor learnable kernel reads its scale and zero point with .item(), a
        # device sync per call on a GPU; the per-channel one keeps them on the device (same values and gradients)
        out = torch._fake_quantize_learnable_per_channel_affine(xf.unsqueeze(0), scale.reshape(1),
                                                                zero_point.reshape(1), 0, qmin, qmax,
                                                                grad_factor).squeeze(0)
    else:
        out = torch._fake_quantize_learnable_per_channel_affine(xf, scale, zero_point, axis, qmin, qmax,
                                                                grad_factor)
    return out.to(x.dtype)


BIAS_BOUND = 2**30
"""Largest int32 bias code: below 2^31 with room for the int32 accumulator's own sum of products."""


def bias_scale_floor(bias: Tensor, input_step: Tensor, per_channel: bool) -> Tensor:
    """The smallest weight scale whose int32 bias code ``|b| / (s_in * s_w)`` stays within ``BIAS_BOUND``.

    A near-dead channel (weights ~0, so the min/max weight scale is at its floor) with a sizeable bias,
    common in pretrained backbones, would need a bias code beyond int32: ONNX Runtime's int32 bias then
    wraps and moves the int8 output by hundreds of steps. Raising that channel's weight scale instead
    keeps the bias exact; its tiny weights round to 0, which changes the output by less than they weigh.
    """
    floor = bias.detach().abs() / (input_step.detach().to(bias.dtype) * BIAS_BOUND)
    return floor if per_channel else floor.max()


def quantize_bias(bias: Tensor, scale: Tensor) -> Tensor:
    """The bias on the int32 accumulator grid ``scale`` (= s_in * s_w), gradient passed straight through.

    The int8 runtime rounds the bias this way; simulating it makes the fake-quant model and the
    converted model compute the same integers. With the weight scale floored by `bias_scale_floor`
    the codes fit ``±BIAS_BOUND``; the clamp here only guards float rounding at the bound.
    """
    scale = scale.to(bias.dtype).clamp_min(EPS * EPS)
    codes = torch.round(bias / scale).clamp(-BIAS_BOUND, BIAS_BOUND)
    return bias + (codes * scale - bias).detach()
