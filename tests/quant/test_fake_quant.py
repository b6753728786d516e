"""Fake quantization against a hand-written reference of FQN eqs. 2-6 with zero-point alignment, and eq. 8."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fqn.quant.fake_quant import FakeQuantize, calc_qparams, fake_quantize, quant_range, set_phase
from fqn.quant.observers import MinMaxObserver

from ..devices import needs_cuda


def reference_qparams(lb: float, ub: float, k: int, symmetric: bool) -> tuple[float, int, int, int]:
    """Eqs. 3-4 plus zero-point alignment (FQN 3.6), in float64: (delta, z, qmin, qmax)."""
    lb, ub = min(lb, 0.0), max(ub, 0.0)
    if symmetric:  # lb = -ub, zero point 0, levels -(2^(k-1)-1) .. 2^(k-1)-1
        q = 2 ** (k - 1) - 1
        return max(max(-lb, ub) / q, np.finfo(np.float32).eps), 0, -q, q
    delta = max((ub - lb) / (2**k - 1), np.finfo(np.float32).eps)  # eq. 4
    z = int(np.clip(np.round(-lb / delta), 0, 2**k - 1))  # integer index of real 0
    return delta, z, 0, 2**k - 1


def reference_fake_quant(x: np.ndarray, lb: float, ub: float, k: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Eqs. 5, 6 and 2 on the aligned range: (indices X^I in [0, 2^k-1] or [0, 2^k-2], X^Q)."""
    delta, z, qmin, qmax = reference_qparams(lb, ub, k, symmetric)
    lb_al, ub_al = (qmin - z) * delta, (qmax - z) * delta  # aligned: lb_al = -(z - qmin) * delta
    xc = np.clip(x.astype(np.float64), lb_al, ub_al)  # eq. 5
    xi = np.round((xc - lb_al) / delta)  # eq. 6
    return xi.astype(np.int64), delta * xi + lb_al  # eq. 2: delta * (X^I - (z - qmin))


def not_near_tie(x: np.ndarray, lb: float, ub: float, k: int, symmetric: bool) -> np.ndarray:
    """Mask of values not within 1e-3 steps of a rounding tie, where float32 and float64 may round apart."""
    delta, z, qmin, _ = reference_qparams(lb, ub, k, symmetric)
    lb_al = (qmin - z) * delta
    return np.abs(((x.astype(np.float64) - lb_al) / delta) % 1.0 - 0.5) > 1e-3


def codes(out: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int) -> np.ndarray:
    """Integer indices counted from qmin, recovered from the dequantized output."""
    return (torch.round(out.double() / scale.double()) + zp.double() - qmin).long().numpy()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_tensor_matches_reference(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    lb, ub = -0.73, 2.3
    x = torch.rand(20000, generator=g) * 4 - 1.5  # also outside [lb, ub]
    x = x[torch.from_numpy(not_near_tie(x.numpy(), lb, ub, bits, symmetric))]
    scale, zp = calc_qparams(torch.tensor([lb]), torch.tensor([ub]), bits, symmetric)
    delta, z, qmin, qmax = reference_qparams(lb, ub, bits, symmetric)
    assert (qmin, qmax) == quant_range(bits, symmetric)
    assert int(zp) == z
    assert float(scale) == pytest.approx(delta, rel=1e-6)
    out = fake_quantize(x, scale, zp, qmin, qmax)
    ref_idx, ref_val = reference_fake_quant(x.numpy(), lb, ub, bits, symmetric)
    np.testing.assert_array_equal(codes(out, scale, zp, qmin), ref_idx)  # integer codes bit-exact
    # values: equal up to float32 rounding of the product
    np.testing.assert_allclose(out.double().numpy(), ref_val, rtol=1e-6, atol=1e-6 * delta)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_channel_matches_reference(bits, symmetric):
    g = torch.Generator().manual_seed(10 + bits)
    mags = torch.tensor([1e-3, 0.01, 0.1, 1.0, 3.0, 0.5]).reshape(-1, 1, 1, 1)
    w = torch.randn(6, 3, 3, 3, generator=g) * mags
    w[5] = w[5].abs()  # a channel with lb > 0: alignment must widen it to include 0
    fq = FakeQuantize(MinMaxObserver(ch_axis=0, num_channels=6, accumulate=False), bits, symmetric=symmetric,
                      ch_axis=0, num_channels=6, role="weight")
    fq.enable_fake_quant()
    out = fq(w)
    assert fq.scale.shape == (6,)
    for c in range(6):
        lb, ub = float(w[c].min()), float(w[c].max())
        delta, z, qmin, _ = reference_qparams(lb, ub, bits, symmetric)
        assert int(fq.zero_point[c]) == z
        assert float(fq.scale[c]) == pytest.approx(delta, rel=1e-6)
        keep = not_near_tie(w[c].numpy().ravel(), lb, ub, bits, symmetric)
        ref_idx, ref_val = reference_fake_quant(w[c].numpy().ravel(), lb, ub, bits, symmetric)
        got = codes(out[c].ravel(), fq.scale[c], fq.zero_point[c], qmin)
        np.testing.assert_array_equal(got[keep], ref_idx[keep])
        got_val = out[c].ravel().double().numpy()[keep]
        np.testing.assert_allclose(got_val, ref_val[keep], rtol=1e-6, atol=1e-6 * delta)


def test_zero_is_exact_and_levels_are_few():
    for bits in (2, 4, 8):
        for lb, ub in [(-0.3, 1.7), (0.2, 5.0), (-4.0, -1.0), (-1e-3, 1e-3)]:
            scale, zp = calc_qparams(torch.tensor([lb]), torch.tensor([ub]), bits, False)
            qmin, qmax = quant_range(bits, False)
            x = torch.linspace(lb - 1, ub + 1, 5001)
            y = fake_quantize(torch.cat([x, torch.zeros(3)]), scale, zp, qmin, qmax)
            assert torch.all(y[-3:] == 0)
            assert y.unique().numel() <= 2**bits


def test_ste_mask_is_eq8():
    """Gradient 1 where the integer code is inside [qmin, qmax], 0 where the value clips (a step or more outside)."""
    scale, zp = calc_qparams(torch.tensor([-1.0]), torch.tensor([3.0]), 4, False)
    qmin, qmax = quant_range(4, False)
    lb, ub = float((qmin - zp) * scale), float((qmax - zp) * scale)
    d = float(scale)
    x = torch.tensor([lb - d, lb - 0.7 * d, lb, 0.0, 1.234, ub, ub + 0.3 * d, ub + 2 * d], requires_grad=True)
    fake_quantize(x, scale, zp, qmin, qmax).backward(torch.arange(1.0, 9.0))
    # ub + 0.3 steps rounds to qmax: its code is in range, so it keeps its gradient, as in torch's kernels
    expected = torch.tensor([0, 0, 3, 4, 5, 6, 7, 0], dtype=torch.float32)
    assert torch.equal(x.grad, expected)


def test_per_channel_ste_mask():
    scale = torch.tensor([0.1, 1.0])
    zp = torch.zeros(2, dtype=torch.int32)
    x = torch.tensor([[0.5, 20.0], [0.5, 20.0]], requires_grad=True)
    fake_quantize(x, scale, zp, -7, 7, axis=0).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    y = torch.tensor([[0.5, 0.76], [0.5, 6.5]], requires_grad=True)
    fake_quantize(y, scale, zp, -7, 7, axis=0).sum().backward()
    assert torch.equal(y.grad, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_ste_mask_equals_torchs_cachemask(symmetric, per_channel, bits):
    """Every in-range weight keeps its gradient, the largest of each channel too: the mask equals torch's own."""
    from fqn.quant.fake_quant import weight_quantizer

    g = torch.Generator().manual_seed(bits + 2 * symmetric + 4 * per_channel)
    w = (torch.randn(256, 32, 3, 3, generator=g) * torch.rand(256, 1, 1, 1, generator=g) * 0.1).requires_grad_()
    fq = weight_quantizer(w, bits, per_channel=per_channel, symmetric=symmetric)
    fq.enable_fake_quant()
    fq(w).backward(torch.ones_like(w))
    s, z = fq.scale, fq.zero_point
    if per_channel:
        _, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(w.detach(), s, z, 0, fq.qmin, fq.qmax)
    else:
        _, mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(w.detach(), float(s), int(z), fq.qmin,
                                                                           fq.qmax)
    assert torch.equal(w.grad, mask.float())
    assert bool(mask.all())  # min/max ranges: no weight clips, every one is trained


def test_disabled_is_identity_and_uncalibrated_is_an_error():
    fq = FakeQuantize(MinMaxObserver(), 4)
    x = torch.randn(1000) * 7
    fq.enable_observer(False)
    assert fq(x) is x
    fq.enable_fake_quant()
    with pytest.raises(RuntimeError, match="calibrate"):
        fq(x)
    with pytest.raises(ValueError, match="phase"):
        set_phase(torch.nn.Sequential(fq), "bogus")


def test_bias_goes_onto_the_int32_accumulator_grid_with_a_straight_through_gradient():
    """QuantConv2d's bias is round(b / (s_in * s_w)) * s_in * s_w, as integer kernels add it; the gradient passes."""
    from torch import nn
    from torch.nn import functional as F

    from fqn import QuantConfig
    from fqn.quant.fake_quant import set_phase
    from fqn.quant.modules import QuantConv2d

    torch.manual_seed(0)
    cfg = QuantConfig(bits_w=4, bits_a=4, percentile=False, act_observer="minmax")
    conv = QuantConv2d.from_float(nn.Conv2d(3, 5, 3), cfg, input_quant=True, output_quant=False)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([0.3137, -0.2718, 0.05, 1.0, -0.6]))
    x = torch.randn(2, 3, 8, 8)
    set_phase(conv, "observe")
    conv(x)
    conv.input_fq.update_qparams()
    set_phase(conv, "quantize")
    y = conv(x)
    assert conv.bias_quantized
    s_in = float(conv.input_fq.scale)
    w = conv.weight.detach().double()
    s_w = w.abs().amax(dim=(1, 2, 3)) / 7  # symmetric 4-bit, per channel
    grid = s_in * s_w
    hand_bias = torch.round(conv.bias.detach().double() / grid) * grid
    xq = conv.input_fq(x).detach()
    wq = torch.round(w / s_w.view(-1, 1, 1, 1)) * s_w.view(-1, 1, 1, 1)
    ref = F.conv2d(xq.double(), wq, hand_bias)
    assert torch.allclose(y.double(), ref, atol=1e-5)
    assert not torch.allclose(hand_bias, conv.bias.detach().double())  # the rounding is visible
    y.sum().backward()
    assert torch.allclose(conv.bias.grad, torch.full((5,), 2 * 6 * 6.0))  # d(sum)/d(bias) = N*H*W, unmasked


def hand_fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int,
                    axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantizer written out in float64: codes q = clamp(round(x / s) + z, qmin, qmax), values (q - z) * s."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s, z = scale.double().reshape(shape), zp.double().reshape(shape)
    q = torch.clamp(torch.round(x.double() / s) + z, qmin, qmax)
    return q, (q - z) * s


@pytest.mark.parametrize("qmin, qmax", [(0, 15), (-7, 7)])
@pytest.mark.parametrize("axis", [None, 1])
def test_with_and_without_autograd_and_in_half_precision_the_output_is_the_hand_quantizers(axis, qmin, qmax):
    """Training (autograd records the straight-through backward), evaluation (no_grad, nothing recorded) and a
    float16 input all give the codes and values of `hand_fake_quant`, per tensor and per channel."""
    g = torch.Generator().manual_seed(10 * (axis or 0) + qmax)
    symmetric = qmin < 0
    if axis is None:
        scale, zp = torch.tensor(0.1), torch.tensor(0 if symmetric else 5, dtype=torch.int32)
    else:
        scale = torch.tensor([0.05, 0.2, 0.5])
        zp = torch.tensor([0, 0, 0] if symmetric else [3, 7, 12], dtype=torch.int32)
    view = [1, -1, 1, 1] if axis is not None else []
    # on each channel's grid, 3 steps beyond both ends (clipped codes too), at most 0.4 steps off a level:
    # never near a rounding tie, where float32 x * (1 / s) and float64 x / s could round apart
    steps = torch.randint(qmin - 3, qmax + 4, (2, 3, 5, 5), generator=g) - zp.reshape(view)
    x = ((steps + (torch.rand(2, 3, 5, 5, generator=g) - 0.5) * 0.8) * scale.reshape(view)).float()
    ref_codes, _ = hand_fake_quant(x, scale, zp, qmin, qmax, axis)
    assert (ref_codes == qmin).any() and (ref_codes == qmax).any() and (ref_codes == zp.reshape(view)).any()

    def check(out: torch.Tensor, inp: torch.Tensor, rtol: float) -> None:
        codes_ref, values_ref = hand_fake_quant(inp, scale, zp, qmin, qmax, axis)
        s, z = scale.double().reshape(view or [1]), zp.double().reshape(view or [1])
        assert torch.equal(torch.round(out.double() / s) + z, codes_ref)
        assert torch.allclose(out.double(), values_ref, rtol=rtol, atol=0)

    trained = fake_quantize(x.clone().requires_grad_(), scale, zp, qmin, qmax, axis=axis)
    assert trained.grad_fn is not None and trained.dtype == torch.float32  # the straight-through backward
    check(trained.detach(), x, 1e-6)
    with torch.no_grad():
        evaluated = fake_quantize(x.clone().requires_grad_(), scale, zp, qmin, qmax, axis=axis)
    assert evaluated.grad_fn is None
    check(evaluated, x, 1e-6)
    half = fake_quantize(x.half(), scale, zp, qmin, qmax, axis=axis)
    assert half.dtype == torch.float16
    check(half, x.half(), 2**-10)  # float16 keeps 11 significant bits


@needs_cuda
@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_on_a_gpu_fake_quantization_and_its_gradient_equal_the_cpus(axis, dtype):
    """The same codes and the same straight-through mask on CUDA as on the CPU, for the activation dtypes
    autocast gives (16-mixed, bf16-mixed), and LSQ+'s learned-range gradients too."""
    from fqn.quant.fake_quant import learned_fake_quantize

    torch.manual_seed(0)
    x = (torch.randn(2, 3, 9, 9) * 3).to(dtype)
    scale = torch.tensor([0.05, 0.2, 0.5]) if axis is not None else torch.tensor(0.1)
    zp = torch.tensor([3, 7, 12], dtype=torch.int32) if axis is not None else torch.tensor(5, dtype=torch.int32)
    out, grads = {}, {}
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_()
        y = fake_quantize(xd, scale.to(dev), zp.to(dev), 0, 15, axis=axis)
        y.float().pow(2).sum().backward()
        out[dev], grads[dev] = y.detach().cpu(), xd.grad.cpu()
    assert out["cuda"].dtype == dtype and torch.equal(out["cuda"], out["cpu"])
    assert torch.equal(grads["cuda"], grads["cpu"])
    learned = {}
    for dev in ("cpu", "cuda"):
        s = scale.clone().float().to(dev).requires_grad_()
        z = zp.float().to(dev).requires_grad_()
        xd = x.float().to(dev).requires_grad_()
        learned_fake_quantize(xd, s, z, 0, 15, axis).pow(2).sum().backward()
        learned[dev] = [t.grad.cpu() for t in (xd, s, z)]
    for a, b in zip(learned["cuda"], learned["cpu"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
