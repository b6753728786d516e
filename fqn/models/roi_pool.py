"""The box head's RoI pooler with a fast CPU backward, and its export-friendly level merge.

On a CPU, torchvision's ``roi_align`` backward is a scalar loop that scatters one bilinear weight at a
time: measured at 160 px (R18-FPN, 4 images, 512 RoIs per step) it took 42% of a whole training
step. The gradient is linear in the output gradient, ``dL/dF = S^T dL/dY`` with ``S`` the sparse
matrix of bilinear sampling weights (16 per output bin at sampling ratio 2), so it is one sparse
matrix product here: the same numbers up to float summation order, several times faster. The
forward is torchvision's own kernel, unchanged; on a GPU, without gradients, while exporting, or
with an adaptive sampling ratio, torchvision's backward is used as before.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, poolers, roi_align


def _corners(start: Tensor, bin_size: Tensor, size: int, pooled: int, ratio: int) -> tuple[Tensor, Tensor]:
    """Along one axis: the two neighbour indices and their bilinear weights of every sample point.

    Shapes ``(R, pooled, ratio, 2)``. Replicates torchvision's ``bilinear_interpolate_gradient``: a point
    more than one pixel outside the map contributes nothing, one inside that margin is clamped to the edge.
    """
    dtype = start.dtype
    p = torch.arange(pooled, dtype=dtype, device=start.device).view(1, pooled, 1)
    i = torch.arange(ratio, dtype=dtype, device=start.device).view(1, 1, ratio)
    y = start.view(-1, 1, 1) + p * bin_size.view(-1, 1, 1) + (i + 0.5) * bin_size.view(-1, 1, 1) / ratio
    inside = (y >= -1.0) & (y <= size)
    y = y.clamp(min=0)
    low = y.floor().long()
    top = low >= size - 1
    low = torch.where(top, torch.full_like(low, size - 1), low)
    high = torch.where(top, low, low + 1)
    y = torch.where(top, low.to(dtype), y)
    frac = y - low
    weights = torch.stack([1 - frac, frac], -1) * inside.unsqueeze(-1)
    return torch.stack([low, high], -1), weights


def sampling_matrix(rois: Tensor, feature_shape: tuple[int, int, int, int], output_size: tuple[int, int],
                    spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    """``S`` (``B*H*W`` x ``R*ph*pw``, sparse): column ``(r, ph, pw)`` holds the weights with which output bin
    ``(ph, pw)`` of RoI ``r`` averages the feature map's pixels. ``Y = S^T F`` per channel; ``dF = S dY``."""
    b_count, _, height, width = feature_shape
    ph, pw = output_size
    r = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    rois = rois.to(torch.float64)
    batch = rois[:, 0].long()
    x0, y0 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    roi_w, roi_h = rois[:, 3] * spatial_scale - offset - x0, rois[:, 4] * spatial_scale - offset - y0
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    yi, yw = _corners(y0, roi_h / ph, height, ph, sampling_ratio)
    xi, xw = _corners(x0, roi_w / pw, width, pw, sampling_ratio)
    k = 2 * sampling_ratio
    yi, yw, xi, xw = yi.reshape(r, ph, k), yw.reshape(r, ph, k), xi.reshape(r, pw, k), xw.reshape(r, pw, k)
    shape = (r, ph, k, pw, k)
    rows = ((batch.view(r, 1, 1, 1, 1) * height + yi.view(r, ph, k, 1, 1)) * width + xi.view(r, 1, 1, pw, k))
    weights = yw.view(r, ph, k, 1, 1) * xw.view(r, 1, 1, pw, k) / (sampling_ratio * sampling_ratio)
    dev = rois.device
    bins = torch.arange(ph * pw, device=dev).view(1, ph, 1, pw, 1)  # bin (ph, pw) is column ph * pw_count + pw
    cols = torch.arange(r, device=dev).view(r, 1, 1, 1, 1) * ph * pw + bins
    index = torch.stack([rows.expand(shape).reshape(-1), cols.expand(shape).reshape(-1)])
    return torch.sparse_coo_tensor(index, weights.reshape(-1), (b_count * height * width, r * ph * pw),
                                   check_invariants=False)


class _RoIAlignSparseGrad(torch.autograd.Function):
    """torchvision's RoIAlign forward; the backward as one sparse matrix product (see the module docstring)."""

    @staticmethod
    def forward(ctx, features: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                sampling_ratio: int, aligned: bool) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.args = (features.shape, output_size, spatial_scale, sampling_ratio, aligned)
        return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rois,) = ctx.saved_tensors
        shape, output_size, spatial_scale, sampling_ratio, aligned = ctx.args
        b, c, h, w = shape
        if rois.shape[0] == 0:
            return grad.new_zeros(shape), None, None, None, None, None
        s = sampling_matrix(rois, shape, output_size, spatial_scale, sampling_ratio, aligned).to(grad.dtype)
        g = grad.permute(0, 2, 3, 1).reshape(-1, c)  # (R*ph*pw, C), rows in S's column order
        dfeat = torch.sparse.mm(s, g)  # (B*H*W, C)
        return dfeat.view(b, h, w, c).permute(0, 3, 1, 2).contiguous(), None, None, None, None, None


def roi_align_fast_grad(features: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                        sampling_ratio: int, aligned: bool = False) -> Tensor:
    """torchvision's ``roi_align`` (``rois``: K x 5 with batch index), with the sparse backward on a CPU."""
    if (features.device.type == "cpu" and sampling_ratio > 0 and torch.is_grad_enabled() and features.requires_grad
            and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()):
        return _RoIAlignSparseGrad.apply(features, rois, tuple(output_size), float(spatial_scale),
                                         int(sampling_ratio), bool(aligned))
    return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


def gather_merge_levels(levels: Tensor, unmerged_results: list[Tensor]) -> Tensor:
    """torchvision's merge of the per-level RoIAlign results, as one Concat + Gather.

    torchvision's ONNX form scatters every level into a zero tensor element by element (ScatterElements over
    rois x 256 x 7 x 7: about a third of the int8 detector's time at 160 px); concatenating the levels
    and gathering rows back into RoI order gives the same tensor.
    """
    order = torch.cat([torch.where(levels == level)[0] for level in range(len(unmerged_results))])
    position = torch.arange(order.shape[0], dtype=order.dtype, device=order.device)
    inverse = torch.zeros_like(order).scatter(0, order, position)
    return torch.cat(unmerged_results, 0)[inverse]


class FastMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign computing the same outputs, with the fast CPU backward per level and the
    levels merged by `gather_merge_levels` (a Concat + Gather once exported)."""

    @classmethod
    def like(cls, pooler: MultiScaleRoIAlign) -> FastMultiScaleRoIAlign:
        """A new pooler with ``pooler``'s settings (and the level scales it has set up), ``pooler`` untouched."""
        fast = cls(pooler.featmap_names, pooler.output_size, pooler.sampling_ratio,
                   canonical_scale=pooler.canonical_scale, canonical_level=pooler.canonical_level)
        fast.scales, fast.map_levels = pooler.scales, pooler.map_levels
        return fast.train(pooler.training)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = poolers._filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = poolers._setup_scales(feats, image_shapes, self.canonical_scale,
                                                                 self.canonical_level)
        rois = poolers._convert_to_roi_format(boxes)
        if len(feats) == 1:
            return roi_align_fast_grad(feats[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        per_level = []
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            per_level.append(roi_align_fast_grad(feat, rois[idx], self.output_size, scale,
                                                 self.sampling_ratio).to(feats[0].dtype))
        return gather_merge_levels(levels, per_level)
