"""BN folding parity against torch's own BatchNorm2d / FrozenBatchNorm2d, and the [17] batch-statistics fold."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from fqn.config import QuantConfig
from fqn.quant.fake_quant import set_phase
from fqn.quant.fold import fold_bn
from fqn.quant.modules import QConvBn2d, freeze_bn_stats


def random_bn(bn: nn.Module, c: int, g: torch.Generator) -> nn.Module:
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) * 2 - 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.05)
    return bn.eval()


@pytest.mark.parametrize("kind,eps", [("frozen", 0.0), ("frozen", 1e-5), ("bn", 1e-5), ("bn", 1e-3)])
@pytest.mark.parametrize("bias,groups", [(False, 1), (True, 1), (False, 4)])
def test_fold_parity(kind, eps, bias, groups):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, bias=bias, groups=groups)
    bn = FrozenBatchNorm2d(12, eps=eps) if kind == "frozen" else nn.BatchNorm2d(12, eps=eps)
    bn = random_bn(bn, 12, g)
    x = torch.randn(2, 8, 9, 11, generator=g)
    ref = bn(conv(x))
    out = fold_bn(conv, bn)(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


def test_fold_reads_each_modules_own_eps():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 4, 1, bias=False)
    bn = random_bn(FrozenBatchNorm2d(4, eps=0.0), 4, g)
    with torch.no_grad():
        bn.running_var.copy_(torch.full((4,), 1e-6))  # eps would dominate if a default 1e-5 were used
    x = torch.randn(1, 3, 5, 5, generator=g)
    assert torch.allclose(fold_bn(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-3)


def test_conv_bn_batch_statistics_match_torch_batchnorm_in_training():
    """F off, quantization off: QConvBn2d in training is conv -> BatchNorm2d(train), and updates the EMA alike."""
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    bn = random_bn(nn.BatchNorm2d(6, momentum=0.1), 6, g)
    q = QConvBn2d.from_conv_bn(conv, bn, QuantConfig(freeze_bn=False))
    set_phase(q, "float")
    bn.train()
    q.train()
    for _ in range(3):
        x = torch.randn(3, 4, 10, 10, generator=g)
        ref = bn(conv(x))
        out = q(x)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert torch.allclose(q.running_mean, bn.running_mean, atol=1e-6)
    assert torch.allclose(q.running_var, bn.running_var, atol=1e-6)
    q.eval()
    bn.eval()
    x = torch.randn(2, 4, 10, 10, generator=g)
    assert torch.allclose(q(x), bn(conv(x)), atol=1e-5)
    q.train()
    assert freeze_bn_stats(q) == 1  # the [18] variant: frozen for the last N steps
    mean = q.running_mean.clone()
    assert torch.allclose(q(x), bn(conv(x)), atol=1e-5)
    assert torch.equal(q.running_mean, mean)


def test_conv_bn_gradients_reach_conv_and_bn_parameters():
    conv = nn.Conv2d(3, 5, 3, bias=False)
    bn = nn.BatchNorm2d(5)
    q = QConvBn2d.from_conv_bn(conv, bn, QuantConfig(freeze_bn=False, bits_w=4, bits_a=4))
    q.train()
    q.act_fq.observer(torch.randn(100) * 3)
    q.act_fq.update_qparams()
    set_phase(q, "quantize")
    q(torch.randn(2, 3, 8, 8)).pow(2).sum().backward()
    for p in (q.weight, q.bn_weight, q.bn_bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
