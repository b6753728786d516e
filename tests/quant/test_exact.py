"""A layer of the float64 simulation computes what integer kernels compute: checked against integer arithmetic."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fqn import QuantConfig
from fqn.quant.exact import float64_simulation
from fqn.quant.fake_quant import set_phase
from fqn.quant.modules import QuantConv2d


def _codes(y: torch.Tensor, fq) -> torch.Tensor:
    return torch.round(y.double() / fq.scale.double()) + fq.zero_point.double()


def test_a_layer_in_float64_gives_the_integer_kernels_codes():
    """An 8-bit conv summing 4608 products per output: the codes of exact integer arithmetic (int8 codes,
    exact sums, the int32 bias, one rounding) are those of the float64 simulation, everywhere."""
    torch.manual_seed(0)
    cfg = QuantConfig(bits_w=8, bits_a=8, percentile=False, act_observer="minmax")
    conv = QuantConv2d.from_float(nn.Conv2d(512, 64, 3, padding=1), cfg, input_quant=True, output_quant=True)
    x = torch.randn(1, 512, 24, 24).relu()
    set_phase(conv, "observe")
    conv(x)
    conv.input_fq.update_qparams()
    conv.act_fq.update_qparams()
    set_phase(conv, "quantize")
    conv.eval()
    with torch.no_grad():
        y32 = conv(x)
        y64 = float64_simulation(conv)(x)
        fi, fw, fo = conv.input_fq, conv.weight_fq, conv.act_fq
        qx = _codes(fi(x), fi) - fi.zero_point.double()
        qw = torch.round(fw(conv.weight).double() / fw.scale.double().view(-1, 1, 1, 1))  # symmetric: zero point 0
        grid = fi.scale * fw.scale  # float32, as the int8 file stores s_in * s_w
        qb = torch.round(conv.bias.double() / grid.double())
        acc = F.conv2d(qx, qw, qb, padding=1)  # integers, exact in float64 (|acc| << 2^53)
        ref = torch.clamp(torch.round(acc * grid.double().view(1, -1, 1, 1) / fo.scale.double())
                          + fo.zero_point.double(), 0, 255)
    assert y64.dtype == torch.float64 and y32.dtype == torch.float32
    assert torch.equal(_codes(y64, fo), ref)
    assert int((_codes(y32, fo) != ref).sum()) <= 2  # float32 sums: the odd value near a boundary may flip
    assert conv.weight.dtype == torch.float32  # the simulation is a copy


def test_a_detector_simulates_in_float64_from_float32_images():
    from fqn.models.faster_rcnn import build_detector
    from fqn.ptq import post_training_quantize

    torch.manual_seed(0)
    model = build_detector("resnet18", 3, min_size=64, max_size=64)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    q = post_training_quantize(model, [(images, None)], QuantConfig(bits_w=4, bits_a=4, n_cal=1),
                               num_batches=1, progress=False).eval()
    sim = float64_simulation(q)
    with torch.no_grad():
        out32, out64 = q(images), sim(images)
    assert next(q.parameters()).dtype == torch.float32 and next(sim.parameters()).dtype == torch.float64
    assert len(out64) == 2 and all(d["boxes"].dtype == torch.float64 for d in out64)
    assert all(d["boxes"].shape[1] == 4 for d in out32)
