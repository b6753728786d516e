"""Block reconstruction on fqn's quantized layers: the learned codes lower a block's output error below nearest
rounding on fixed data (an optimiser that does not move fails), they are what the layer computes with after
baking (a conv+BN's folded weight included), and a held weight range survives a checkpoint."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fqn.config import QuantConfig
from fqn.quant.adaround import hard_codes, rounding_regularizer, soft_quantize
from fqn.quant.fake_quant import Phase, phase_of, set_phase
from fqn.quant.modules import QuantAdd, QuantConv2d, QuantConvBn2d
from fqn.quant.reconstruction import (
    LayerRounding,
    ReconstructionConfig,
    Sample,
    bake_rounding,
    hold_weight_ranges,
    reconstruct,
    release_weight_ranges,
    weight_codes,
)

CFG = QuantConfig(bits_w=4, bits_a=4, percentile=False, act_observer="minmax")


class TinyBlock(nn.Module):
    """conv+BN+ReLU -> conv, plus the input: a residual block of fqn's quantized layers."""

    def __init__(self, cfg: QuantConfig) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        conv1, conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.Conv2d(8, 4, 3, padding=1)
        bn = nn.BatchNorm2d(8).eval()
        with torch.no_grad():
            for p in (conv1.weight, conv2.weight, conv2.bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
            bn.weight.copy_(torch.rand(8, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(8, generator=g) * 0.1)
            bn.running_mean.copy_(torch.randn(8, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
        self.conv1 = QuantConvBn2d.from_conv_bn(conv1, bn, cfg, activation=nn.ReLU())
        self.conv2 = QuantConv2d.from_float(conv2, cfg)
        self.add = QuantAdd(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(self.conv2(self.conv1(x)), x)


def _calibrated_block(inputs: list[torch.Tensor]) -> tuple[TinyBlock, list[Sample]]:
    block = TinyBlock(CFG).eval()
    with torch.no_grad(), phase_of(block, Phase.FLOAT):
        targets = [block(x) for x in inputs]
    set_phase(block, Phase.OBSERVE)
    with torch.no_grad():
        for x in inputs:
            block(x)
    for m in block.modules():
        if hasattr(m, "update_qparams") and m.role == "act":
            m.update_qparams()
    set_phase(block, Phase.QUANTIZE)
    return block, [Sample((x,), {}, t) for x, t in zip(inputs, targets)]


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 4, 6, 6, generator=g) for _ in range(4)]


def test_layer_rounding_is_adarounds_soft_weight_and_regulariser_with_their_gradients():
    """The fused soft weight and regulariser against `soft_quantize` and `rounding_regularizer` through autograd."""
    block, _ = _calibrated_block(_inputs())
    layer = block.conv1
    hold_weight_ranges([layer])
    r = LayerRounding(layer)
    with torch.no_grad():
        r.v.copy_(torch.randn(r.v.shape, generator=torch.Generator().manual_seed(3)) * 3)
    fq, w = layer.weight_fq, layer.effective_weight()[0].detach()
    v_ref = r.v.detach().clone().requires_grad_(True)
    reference = soft_quantize(w, fq.scale, fq.zero_point, v_ref, fq.qmin, fq.qmax, fq.ch_axis)
    upstream = torch.randn(reference.shape, generator=torch.Generator().manual_seed(4))
    beta, weight = 7.0, 0.01
    ((reference * upstream).sum() + weight * rounding_regularizer(v_ref, beta)).backward()
    r.prepare()
    soft = r.soft_weight()
    assert torch.allclose(soft, reference, atol=1e-6)
    assert float(r.regularizer(beta)) == pytest.approx(float(rounding_regularizer(v_ref, beta).detach()), rel=1e-5)
    (soft * upstream).sum().backward()
    r.add_regularizer_grad(beta, weight)
    assert torch.allclose(r.v.grad, v_ref.grad, atol=1e-5, rtol=1e-4)
    assert (r.v.grad == 0).any() and (r.v.grad != 0).any()  # clamped codes and decided offsets pass no gradient


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop"])
def test_reconstruction_lowers_the_blocks_error_below_nearest_rounding(method):
    inputs = _inputs()
    block, samples = _calibrated_block(inputs)
    with torch.no_grad():  # nearest rounding, by hand: the float weights rounded on the layers' min/max grid
        nearest = [((block(x) - s.target) ** 2).flatten(1).sum(1).mean() for x, s in zip(inputs, samples)]
    cfg = ReconstructionConfig(method, iters=300, lr=5e-2, weight=1e-3)
    if method == "adaround":  # one layer, weights only: its error with its own output quantizer off
        with torch.no_grad():
            layer_samples = [Sample((block.conv1(x),), {}, _float_conv2(block, x)) for x in inputs]
        block.conv2.act_fq.enable_fake_quant(False)
        before = _error(block.conv2, layer_samples)
        block.conv2.act_fq.enable_fake_quant(True)
        reconstruct(block.conv2, layer_samples, cfg, outputs_float=[block.conv2.act_fq])
        block.conv2.act_fq.enable_fake_quant(False)
        assert _error(block.conv2, layer_samples) < 0.9 * before
        return
    result = reconstruct(block, samples, cfg)
    assert result["nearest"] > 0
    assert result["learned"] < 0.9 * result["nearest"], result
    assert _error(block, samples) < 0.9 * float(sum(nearest)) / len(nearest)  # by hand, after the bake


def _error(module: torch.nn.Module, samples: list[Sample]) -> float:
    with torch.no_grad():
        return sum(float(((module(*s.args) - s.target) ** 2).flatten(1).sum(1).mean()) for s in samples) / len(samples)


def _float_conv2(block: TinyBlock, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), phase_of(block, Phase.FLOAT):
        return block.conv2(block.conv1(x))


def test_reconstruction_is_reproducible():
    codes = []
    for _ in range(2):
        block, samples = _calibrated_block(_inputs())
        reconstruct(block, samples, ReconstructionConfig("qdrop", iters=20, lr=0.2))
        codes.append([weight_codes(block.conv1), weight_codes(block.conv2), block.add.act_fq.scale.clone()])
    assert all(torch.equal(a, b) for a, b in zip(*codes))


def test_an_optimiser_that_does_not_move_keeps_nearest_rounding():
    block, samples = _calibrated_block(_inputs())
    codes = weight_codes(block.conv1).clone()
    result = reconstruct(block, samples, ReconstructionConfig("brecq", iters=50, lr=0.0, act_lr=0.0))
    assert result["learned"] == pytest.approx(result["nearest"], rel=1e-5)
    assert not result["learned"] < 0.9 * result["nearest"]
    assert torch.equal(weight_codes(block.conv1), codes)


def test_baked_codes_are_what_the_layer_computes_with_and_the_range_is_held():
    block, samples = _calibrated_block(_inputs())
    layer = block.conv1  # conv+BN: the fold of the baked W gives the learned grid
    hold_weight_ranges([layer])
    fq = layer.weight_fq
    scale = fq.scale.clone()
    v = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(5)) * 3
    w_before = layer.effective_weight()[0].detach().clone()
    expected = hard_codes(w_before, fq.scale, fq.zero_point, v, fq.qmin, fq.qmax, fq.ch_axis)
    codes = bake_rounding(layer, v)
    assert torch.equal(codes, expected)
    assert torch.equal(weight_codes(layer), expected)  # nearest rounding of the baked weight: the learned codes
    nearest = torch.round(w_before / scale.reshape(-1, 1, 1, 1)).clamp(fq.qmin, fq.qmax).to(torch.int32)
    assert not torch.equal(expected, nearest)  # the test would notice a re-rounding of the float weight
    with torch.no_grad():  # an extreme weight rounded inwards moves min/max: the held range does not move
        block(samples[0].args[0])
    assert torch.equal(fq.scale, scale)
    state = block.state_dict()
    fresh, _ = _calibrated_block(_inputs())
    fresh.load_state_dict(state)
    assert fresh.conv1.weight_fq.range_held and not fresh.conv2.weight_fq.range_held
    assert torch.equal(weight_codes(fresh.conv1), expected)
    assert release_weight_ranges(fresh) == 1 and not fresh.conv1.weight_fq.range_held


def test_a_checkpoint_saved_before_the_held_flag_loads():
    block, _ = _calibrated_block(_inputs())
    state = block.state_dict()
    key = "conv1.weight_fq._extra_state"
    state[key] = state[key][:3]  # observing, quantizing, calibrated: what older checkpoints hold
    fresh, _ = _calibrated_block(_inputs())
    fresh.load_state_dict(state)
    assert fresh.conv1.weight_fq.quantizing and not fresh.conv1.weight_fq.range_held


def test_config_refuses_bad_values():
    for bad in ({"method": "gptq"}, {"iters": 0}, {"iters": True}, {"drop": 1.0}, {"lr": -1.0}):
        with pytest.raises(ValueError):
            dataclasses.replace(ReconstructionConfig(), **bad)
