"""BN folding parity against torch's own BatchNorm2d / FrozenBatchNorm2d, and the [17] batch-statistics fold."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from fqn.config import QuantConfig
from fqn.quant.fake_quant import set_phase
from fqn.quant.fold import fold_bn
from fqn.quant.modules import QuantConvBn2d, freeze_bn_stats


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
    """F off, quantization off: QuantConvBn2d in training is conv -> BatchNorm2d(train), and updates the EMA alike."""
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    bn = random_bn(nn.BatchNorm2d(6, momentum=0.1), 6, g)
    q = QuantConvBn2d.from_conv_bn(conv, bn, QuantConfig(freeze_bn=False))
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
    q = QuantConvBn2d.from_conv_bn(conv, bn, QuantConfig(freeze_bn=False, bits_w=4, bits_a=4))
    q.train()
    q.act_fq.observer(torch.randn(100) * 3)
    q.act_fq.update_qparams()
    set_phase(q, "quantize")
    q(torch.randn(2, 3, 8, 8)).pow(2).sum().backward()
    for p in (q.weight, q.bn_weight, q.bn_bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def _hand_symmetric(w: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """Symmetric min/max fake quantization written out: s = max|w| / (2^(k-1)-1), w_q = s * round(w / s)."""
    q = 2 ** (bits - 1) - 1
    m = w.abs().amax(dim=(1, 2, 3), keepdim=True) if per_channel else w.abs().max()
    s = m / q
    return torch.clamp(torch.round(w / s), -q, q) * s


def test_freeze_bn_trains_w_as_in_fig3():
    """F: the parameter is W itself; one SGD step moves it by lr * (dL/dW_fold * gamma / sigma), by hand."""
    from fqn import build_detector, prepare_qat

    model = build_detector("resnet18", 3, min_size=128, max_size=128)
    first = model.backbone.body.layer1[0]
    w0 = first.conv1.weight.detach().clone()
    prepare_qat(model, QuantConfig(bits_w=4, bits_a=4))
    conv1 = model.backbone.body.layer1[0].conv1
    assert isinstance(conv1, QuantConvBn2d) and conv1._frozen
    assert torch.equal(conv1.weight, w0) and conv1.weight.requires_grad

    g = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = random_bn(nn.BatchNorm2d(6), 6, g)
    with torch.no_grad():
        bn.weight[0] = 0.01  # alpha / sigma spans orders of magnitude: the effective step must not
    q = QuantConvBn2d.from_conv_bn(conv, bn, QuantConfig(bits_w=4, bits_a=4), output_quant=False)
    set_phase(q, "quantize")
    q.train()
    x = torch.randn(2, 4, 9, 9, generator=g)
    grad_out = torch.randn(2, 6, 9, 9, generator=g)
    w = conv.weight.detach().double()
    factor = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    lr = 0.1
    opt = torch.optim.SGD([p for p in q.parameters() if p.requires_grad], lr=lr)
    (q(x) * grad_out).sum().backward()
    opt.step()
    # Fig. 3 by hand: W_fold = W * gamma / sigma, quantized (all codes in range: the STE passes everything)
    grad_wq = torch.nn.grad.conv2d_weight(x.double(), w.shape, grad_out.double(), padding=1)
    expected = w - lr * grad_wq * factor.view(-1, 1, 1, 1)
    assert torch.allclose(q.weight.detach().double(), expected, atol=1e-6)
    # the running statistics are frozen, and so are the BN parameters of a FrozenBatchNorm2d
    assert torch.equal(q.running_mean, bn.running_mean) and torch.equal(q.running_var, bn.running_var)
    frozen = QuantConvBn2d.from_conv_bn(conv, random_bn(FrozenBatchNorm2d(6), 6, g), QuantConfig())
    assert not frozen.bn_weight.requires_grad and not frozen.bn_bias.requires_grad


@pytest.mark.parametrize("per_channel", [False, True])
def test_without_f_training_and_inference_quantize_the_same_weights(per_channel):
    """[17]: training quantizes W * gamma / sigma_EMA too, and rescales the output by sigma_EMA / sigma_B."""
    g = torch.Generator().manual_seed(6)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = random_bn(nn.BatchNorm2d(6), 6, g)
    cfg = QuantConfig(bits_w=4, bits_a=4, freeze_bn=False, per_channel=per_channel)
    q = QuantConvBn2d.from_conv_bn(conv, bn, cfg, output_quant=False)
    q.bn_momentum = 0.0  # the EMA stays put, so training and inference fold the same statistics
    set_phase(q, "quantize")
    seen = []
    q.weight_fq.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    x = torch.randn(8, 4, 9, 9, generator=g)
    y_train = q.train()(x)
    q.eval()(x)
    assert torch.equal(seen[0], seen[1])
    w = conv.weight.detach().double()
    gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
    sigma_ema = torch.sqrt(bn.running_var.double() + bn.eps)
    wq = _hand_symmetric(w * (gamma / sigma_ema).view(-1, 1, 1, 1), 4, per_channel)
    assert torch.allclose(seen[0].double(), wq, atol=1e-6)
    y_float = nn.functional.conv2d(x.double(), w, padding=1)
    var_b, mean_b = torch.var_mean(y_float, dim=(0, 2, 3), unbiased=False)
    sigma_b = torch.sqrt(var_b + bn.eps)
    expected = (nn.functional.conv2d(x.double(), wq, padding=1) * (sigma_ema / sigma_b).view(1, -1, 1, 1)
                + (beta - gamma * mean_b / sigma_b).view(1, -1, 1, 1))
    assert torch.allclose(y_train.double(), expected, atol=1e-4)
