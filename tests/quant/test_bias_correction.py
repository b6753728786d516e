"""Bias correction: after it, each quantized layer's mean output equals the float layer's (torch's own ops)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqn.config import QuantConfig
from fqn.quant.bias_correction import correct_bias
from fqn.quant.calibrate import calibrate
from fqn.quant.modules import QuantConvBn2d, QuantLinear


class Toy(nn.Module):
    """A quantized conv+BN (optionally grouped) then a quantized linear, called like a detector: a list of images."""

    def __init__(self, bits: int, groups: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        conv = nn.Conv2d(4, 8, 3, padding=0, groups=groups)
        bn = nn.BatchNorm2d(8).eval()
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
            conv.bias.copy_(torch.randn(8, generator=g) * 0.1)
            bn.running_mean.copy_(torch.randn(8, generator=g))
            bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(8, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(8, generator=g))
        self.float_conv, self.float_bn = copy.deepcopy(conv), copy.deepcopy(bn)
        cfg = QuantConfig(bits_w=bits, bits_a=8)
        self.conv = QuantConvBn2d.from_conv_bn(conv, bn, cfg, input_quant=True, output_quant=False)
        lin = nn.Linear(8, 5)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(5, 8, generator=g) * 0.5)
            lin.bias.copy_(torch.randn(5, generator=g) * 0.1)
        self.float_lin = copy.deepcopy(lin)
        self.lin = QuantLinear.from_float(lin, cfg, input_quant=True, output_quant=False)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        y = self.conv(torch.stack(images))
        return self.lin(y.mean(dim=(2, 3)) + 1.0)


def _images(seed: int, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 12, 12, generator=g) + 0.5 for _ in range(n)]  # positive means: the shift shows


def _conv_gap(model: Toy, batches: list) -> torch.Tensor:
    """Per channel: mean of the quantized conv's output minus the float conv+BN's on the same quantized input."""
    diffs = []
    with torch.no_grad():
        for images in batches:
            x = torch.stack(images)
            xq = model.conv.input_fq(x)
            ref = F.batch_norm(F.conv2d(xq, model.float_conv.weight, model.float_conv.bias,
                                        groups=model.float_conv.groups),
                               model.float_bn.running_mean, model.float_bn.running_var, model.float_bn.weight,
                               model.float_bn.bias, False, 0.0, model.float_bn.eps)
            diffs.append((model.conv(x) - ref).mean(dim=(0, 2, 3)))
    return torch.stack(diffs).mean(0)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_output_mean_matches_the_float_layer_after_correction(groups):
    model = Toy(bits=3, groups=groups)
    batches = [_images(i) for i in range(3)]
    calibrate(model, batches, 3, progress=False)
    model.eval()
    before = _conv_gap(model, batches)
    assert before.abs().max() > 1e-2  # 3-bit weights really shift the mean
    shifts = correct_bias(model, batches, 3, progress=False)
    after = _conv_gap(model, batches)
    assert set(shifts) == {"conv", "lin"}
    # measured with the layer's own op, exact at the borders: what is left is the int32 bias rounding
    assert after.abs().max() < 5e-3 * before.abs().max()


def test_linear_downstream_of_a_corrected_layer_converges_with_passes():
    """One pass measures the linear's input before the conv upstream is corrected; a second pass fixes that."""

    def gap(model: Toy, batches: list) -> torch.Tensor:
        with torch.no_grad():
            out = []
            for images in batches:
                h = model.conv(torch.stack(images)).mean(dim=(2, 3)) + 1.0
                hq = model.lin.input_fq(h)
                out.append((model.lin(h) - F.linear(hq, model.float_lin.weight, model.float_lin.bias)).mean(0))
        return torch.stack(out).mean(0).abs().max()

    batches = [_images(i) for i in range(3)]
    gaps = []
    for passes in (0, 1, 2, 3):
        model = Toy(bits=3)
        calibrate(model, batches, 3, progress=False)
        model.eval()
        if passes:
            correct_bias(model, batches, 3, passes=passes, progress=False)
        gaps.append(float(gap(model, batches)))
    # what the third pass leaves is the int32 bias rounding
    assert gaps[1] < 0.5 * gaps[0] and gaps[2] < 0.2 * gaps[1] and gaps[3] < 5e-3 * gaps[0]


def test_correction_needs_quantized_layers_and_data():
    with pytest.raises(ValueError, match="no quantized layer"):
        correct_bias(nn.Sequential(nn.Conv2d(3, 3, 1)), [], 1, progress=False)
    model = Toy(bits=4)
    calibrate(model, [_images(0)], 1, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        correct_bias(model, [], 1, progress=False)
    with pytest.raises(ValueError, match="passes"):
        correct_bias(model, [_images(0)], 1, passes=0, progress=False)
