"""The fast-backward RoI pooler: torchvision's outputs and gradients (its own kernels as the reference)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from fqn.models.roi_pool import FastMultiScaleRoIAlign, roi_align_fast_grad


def _rois(n: int, batch: int, side: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * side * 1.1 - side * 0.1  # some start left of / above the map
    wh = torch.rand(n, 2, generator=g) ** 3 * side * 0.8  # many tiny, a few large, some reaching past the edge
    return torch.cat([torch.randint(0, batch, (n, 1), generator=g).float(), xy, xy + wh], 1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_gradient_equals_torchvisions(aligned, ratio):
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(3, 5, 13, 17, generator=g, dtype=torch.float64)
    rois = _rois(40, 3, 60.0, seed=2).double()
    grad = torch.randn(40, 5, 4, 3, generator=g, dtype=torch.float64)
    ref_in, my_in = feat.clone().requires_grad_(), feat.clone().requires_grad_()
    ref = roi_align(ref_in, rois, (4, 3), 0.25, ratio, aligned)
    mine = roi_align_fast_grad(my_in, rois, (4, 3), 0.25, ratio, aligned)
    assert torch.equal(ref, mine)  # the forward is torchvision's kernel
    ref.backward(grad)
    mine.backward(grad)
    torch.testing.assert_close(my_in.grad, ref_in.grad, rtol=1e-10, atol=1e-10)


def test_no_rois_and_adaptive_ratio_and_no_grad():
    feat = torch.randn(1, 2, 8, 8, requires_grad=True)
    out = roi_align_fast_grad(feat, torch.zeros(0, 5), (2, 2), 1.0, 2)
    out.sum().backward()
    assert out.shape == (0, 2, 2, 2) and torch.equal(feat.grad, torch.zeros_like(feat))
    rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 5.0]])
    f1, f2 = feat.detach().clone().requires_grad_(), feat.detach().clone().requires_grad_()
    roi_align_fast_grad(f1, rois, (2, 2), 1.0, -1).sum().backward()  # adaptive: torchvision's own backward
    roi_align(f2, rois, (2, 2), 1.0, -1).sum().backward()
    assert torch.equal(f1.grad, f2.grad)
    with torch.no_grad():
        assert torch.equal(roi_align_fast_grad(feat, rois, (2, 2), 1.0, 2), roi_align(feat, rois, (2, 2), 1.0, 2))


def test_multiscale_pooler_matches_torchvisions_outputs_and_gradients():
    torch.manual_seed(0)
    names = ["0", "1", "2", "3"]
    feats = {n: torch.randn(2, 4, 64 // 2**i, 48 // 2**i, dtype=torch.float64) for i, n in enumerate(names)}
    boxes = [_rois(30, 1, 180.0, seed=s)[:, 1:].clamp(0, 190).double() for s in (3, 4)]
    boxes = [torch.cat([b[:, :2], torch.maximum(b[:, 2:], b[:, :2] + 1)], 1) for b in boxes]
    shapes = [(256, 192), (256, 192)]
    ref_pool = MultiScaleRoIAlign(names, 7, 2)
    my_pool = FastMultiScaleRoIAlign(names, 7, 2)
    ref_in = {k: v.clone().requires_grad_() for k, v in feats.items()}
    my_in = {k: v.clone().requires_grad_() for k, v in feats.items()}
    ref, mine = ref_pool(ref_in, boxes, shapes), my_pool(my_in, boxes, shapes)
    assert torch.equal(ref, mine)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    mine.backward(grad)
    for k in names:
        torch.testing.assert_close(my_in[k].grad, ref_in[k].grad, rtol=1e-10, atol=1e-10)
