"""Bias correction after PTQ: remove the mean shift that quantizing the weights puts on every output channel.

Rounding the weights of a channel does not average out over its input: with ``E[x]`` the mean of the
layer's input per channel, the output mean moves by ``(W_q - W) E[x]``, a bias that the next layers
inherit and that grows as the bit-width drops (Nagel et al., "Data-Free Quantization", ICCV 2019,
section 4.2, in its empirical form: the shift measured on the calibration batches, here with the
layer's own op applied to ``W_q - W``, so borders and padding count exactly). Subtracting it from
the layer's bias costs one more pass over the calibration data and nothing at inference: the
corrected bias is an ordinary bias, exported like any other. Plain PyTorch, no training.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fqn.quant.calibrate import batch_images, model_device, progress_bar
from fqn.quant.fake_quant import ranges_fixed
from fqn.quant.modules import QuantConv2d, QuantConvBn2d, QuantLinear

log = logging.getLogger(__name__)


def correctable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights are quantized and whose output has a bias to correct."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)) and m.is_quantized:
            if isinstance(m, QuantConvBn2d) or m.bias is not None:
                layers[name] = m
    return layers


def weight_error(m: nn.Module) -> Tensor:
    """``W_q - W``: what quantizing ``m``'s (BN-folded) weight changes, as the layer's eval forward quantizes it."""
    return m.quantized_weight() - m.effective_weight()[0]


def output_shift(m: nn.Module, x: Tensor, error: Tensor) -> tuple[Tensor, int]:
    """Sum over positions of ``(W_q - W) * x`` per output channel, and the number of positions.

    The layer's own op with the weight error: exact at borders, strides and padding, where ``(W_q - W) E[x]``
    per tap would not be.
    """
    if isinstance(m, QuantLinear):
        y = F.linear(x, error)
        flat = y.reshape(-1, y.shape[-1])
        return flat.double().sum(0), flat.shape[0]
    y = F.conv2d(x, error, None, m.stride, m.padding, m.dilation, m.groups)
    return y.double().sum(dim=(0, 2, 3)), y.shape[0] * y.shape[2] * y.shape[3]


@torch.no_grad()
def correct_bias(model: nn.Module, batches: Iterable[Any], num_batches: int, *, passes: int = 1,
                 progress: bool = True) -> dict[str, float]:
    """Subtract each quantized layer's weight-rounding shift from its bias; returns the largest shift per layer.

    Call it on a calibrated model (ranges fixed, phase ``quantize``): each layer's shift is measured on
    the inputs the quantized model really gives it. One pass corrects every layer at once, each on
    inputs measured before the layers upstream were corrected; what that leaves is second order (an
    upstream correction times this layer's weight error), and each further pass (``passes``) shrinks it.
    """
    layers = correctable_layers(model)
    if not layers:
        raise ValueError("the model has no quantized layer with a bias: call prepare_qat and calibrate first")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be a positive integer, got {passes!r}")
    batches = list(itertools.islice(batches, num_batches))
    if not batches:
        raise ValueError("bias correction got no batches: the calibration data is empty")
    original = {name: _bias_param(m).detach().clone() for name, m in layers.items()}
    shifts: dict[str, float] = {}
    for _ in range(passes):
        shifts = _one_pass(model, layers, original, batches, progress)
    log.info("bias correction: %d layers, largest shift %.3g", len(shifts), max(shifts.values(), default=0.0))
    return shifts


def _bias_param(m: nn.Module) -> Tensor:
    """The parameter that moves the layer's effective bias 1:1: BN's beta for a conv+BN
    (``b_fold = (b - mean) * gamma / sigma + beta``), else the bias."""
    return m.bn_bias if isinstance(m, QuantConvBn2d) else m.bias


def _one_pass(model: nn.Module, layers: dict[str, nn.Module], original: dict[str, Tensor], batches: list,
              progress: bool) -> dict[str, float]:
    """Measure every layer's shift on the model as it is, and set each bias to its original minus that shift."""
    errors = {name: weight_error(m) for name, m in layers.items()}
    sums: dict[str, list] = {name: [None, 0] for name in layers}

    def recorder(name: str):
        def hook(mod: nn.Module, args: tuple, output: Tensor) -> None:
            x = mod.quantized_input(args[0])
            if x.numel() == 0:
                return
            s, n = output_shift(mod, x, errors[name])
            acc = sums[name]
            acc[0] = s if acc[0] is None else acc[0] + s
            acc[1] += n
        return hook

    handles = [m.register_forward_hook(recorder(name)) for name, m in layers.items()]
    device = model_device(model)
    was_training = model.training
    model.eval()
    bar = progress_bar(len(batches), progress, "bias correction")
    try:
        with ranges_fixed(model):  # measuring must not move EMA ranges ([17]); modes restored after
            for batch in batches:
                model([img.to(device) for img in batch_images(batch)])
                bar.update(1)
    finally:
        bar.close()
        for h in handles:
            h.remove()
        model.train(was_training)
    shifts = {}
    for name, m in layers.items():
        total, n = sums[name]
        if total is None:  # never called with data (e.g. no RoIs): nothing measured, nothing changed
            continue
        shift = (total / n).float()
        _bias_param(m).copy_(original[name] - shift.to(original[name].dtype))
        shifts[name] = float(shift.abs().max())
    return shifts


__all__ = ["correct_bias", "correctable_layers", "output_shift", "weight_error"]
