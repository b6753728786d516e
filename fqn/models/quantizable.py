"""Quantizable versions of the torchvision blocks that Faster R-CNN is made of.

Each is a subclass of the float block whose forward places the quantizers
where an integer-only implementation needs them (FQN 3.4, 3.6): every conv
and linear output, the residual and FPN adds, the SE product, and the inputs
that come out of float glue (pooling, RoIAlign). Max pooling and nearest
upsampling keep values on their input's grid and need no quantizer.
Shared modules (Bottleneck's one ``relu``, RPNHead's one conv over five
levels) get one quantizer per call site.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.misc import SqueezeExcitation

from fqn.quant.fake_quant import input_scale, tag_scale
from fqn.quant.modules import GridMaxPool2d, QAdd, QMul, act_quantizer
from fqn.quant.prepare import SwapContext


def _downsample(block: nn.Module, name: str, ctx: SwapContext) -> None:
    if block.downsample is not None:
        conv, bn = block.downsample[0], block.downsample[1]
        block.downsample = nn.Sequential(ctx.conv_bn(f"{name}.downsample.0", conv, bn))


class QuantBasicBlock(BasicBlock):
    """ResNet BasicBlock: conv1+bn1+relu, conv2+bn2, add+relu quantized."""

    def forward(self, x: Tensor) -> Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        return self.add_relu(self.conv2(self.conv1(x)), identity)

    @classmethod
    def convert(cls, block: BasicBlock, name: str, ctx: SwapContext) -> QuantBasicBlock:
        block.__class__ = cls
        block.conv1 = ctx.conv_bn(f"{name}.conv1", block.conv1, block.bn1, activation=nn.ReLU())
        block.conv2 = ctx.conv_bn(f"{name}.conv2", block.conv2, block.bn2)
        block.bn1 = block.bn2 = block.relu = nn.Identity()
        _downsample(block, name, ctx)
        block.add_relu = QAdd(None if ctx.is_float(f"{name}.add_relu") else ctx.cfg, relu=True)
        return block


class QuantBottleneck(Bottleneck):
    """ResNet Bottleneck: three conv+BN (ReLU fused in the first two), add+relu quantized."""

    def forward(self, x: Tensor) -> Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        return self.add_relu(self.conv3(self.conv2(self.conv1(x))), identity)

    @classmethod
    def convert(cls, block: Bottleneck, name: str, ctx: SwapContext) -> QuantBottleneck:
        block.__class__ = cls
        block.conv1 = ctx.conv_bn(f"{name}.conv1", block.conv1, block.bn1, activation=nn.ReLU())
        block.conv2 = ctx.conv_bn(f"{name}.conv2", block.conv2, block.bn2, activation=nn.ReLU())
        block.conv3 = ctx.conv_bn(f"{name}.conv3", block.conv3, block.bn3)
        block.bn1 = block.bn2 = block.bn3 = block.relu = nn.Identity()
        _downsample(block, name, ctx)
        block.add_relu = QAdd(None if ctx.is_float(f"{name}.add_relu") else ctx.cfg, relu=True)
        return block


class QuantInvertedResidual(InvertedResidual):
    """MobileNetV3 block: its convs are fused by the walker, the residual add is quantized."""

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        return self.add(result, x) if self.use_res_connect else result

    @classmethod
    def convert(cls, block: InvertedResidual, name: str, ctx: SwapContext) -> QuantInvertedResidual:
        block.__class__ = cls
        ctx.walk(block, f"{name}.")
        if block.use_res_connect:
            block.add = QAdd(None if ctx.is_float(f"{name}.add") else ctx.cfg)
        return block


class QuantSqueezeExcitation(SqueezeExcitation):
    """SE: pooled input requantized into fc1, hardsigmoid scale quantized, product quantized."""

    def forward(self, x: Tensor) -> Tensor:
        return self.mul(self.fc2(self.fc1(self.avgpool(x))), x)

    @classmethod
    def convert(cls, se: SqueezeExcitation, name: str, ctx: SwapContext) -> QuantSqueezeExcitation:
        se.__class__ = cls
        se.fc1 = ctx.conv_bn(f"{name}.fc1", se.fc1, None, activation=type(se.activation)(), input_quant=True)
        se.fc2 = ctx.conv_bn(f"{name}.fc2", se.fc2, None, activation=type(se.scale_activation)())
        se.activation = se.scale_activation = nn.Identity()
        se.mul = QMul(None if ctx.is_float(f"{name}.mul") else ctx.cfg)
        return se


class QuantFPN(FeaturePyramidNetwork):
    """FPN with nearest upsampling and one quantized add per top-down merge."""

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        names = list(x.keys())
        feats = list(x.values())
        last_inner = self.get_result_from_inner_blocks(feats[-1], -1)
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(feats) - 2, -1, -1):
            inner_lateral = self.get_result_from_inner_blocks(feats[idx], idx)
            top_down = F.interpolate(last_inner, size=inner_lateral.shape[-2:], mode="nearest")
            last_inner = self.adds[idx](inner_lateral, top_down)
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, feats, names)
        return dict(zip(names, results))

    @classmethod
    def convert(cls, fpn: FeaturePyramidNetwork, name: str, ctx: SwapContext) -> QuantFPN:
        fpn.__class__ = cls
        ctx.walk(fpn, f"{name}.")
        n = len(fpn.inner_blocks)
        fpn.adds = nn.ModuleList(QAdd(None if ctx.is_float(f"{name}.adds.{i}") else ctx.cfg) for i in range(n - 1))
        return fpn


class QuantRPNHead(RPNHead):
    """RPN head: one weight quantizer per conv, one output quantizer per conv and pyramid level."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, bbox_reg = [], []
        for level, feature in enumerate(x):
            t = feature
            for depth, block in enumerate(self.conv):
                t = self._q(self.conv_fq, depth, level, block(t))
            logits.append(self._q(self.cls_fq, 0, level, self.cls_logits(t)))
            bbox_reg.append(self._q(self.bbox_fq, 0, level, self.bbox_pred(t)))
        return logits, bbox_reg

    @staticmethod
    def _q(table: nn.ModuleList | None, row: int, level: int, t: Tensor) -> Tensor:
        if table is None:
            return t
        if level >= len(table[row]):
            raise ValueError(f"the quantized RPN head was prepared for {len(table[row])} feature levels, got more")
        return table[row][level](t)

    @classmethod
    def convert(cls, head: RPNHead, name: str, ctx: SwapContext) -> QuantRPNHead:
        head.__class__ = cls
        levels = ctx.extra.get("num_levels", 5)
        for d, block in enumerate(head.conv):
            conv, act = block[0], block[1] if len(block) > 1 else None
            block[0] = ctx.conv_bn(f"{name}.conv.{d}.0", conv, None, activation=act and type(act)(),
                                   output_quant=False)
            if len(block) > 1:
                block[1] = nn.Identity()
        head.cls_logits = ctx.conv_bn(f"{name}.cls_logits", head.cls_logits, None, output_quant=False)
        head.bbox_pred = ctx.conv_bn(f"{name}.bbox_pred", head.bbox_pred, None, output_quant=False)

        def table(rows: int, quantized: bool) -> nn.ModuleList | None:
            if not quantized:
                return None
            return nn.ModuleList(nn.ModuleList(act_quantizer(ctx.cfg) for _ in range(levels)) for _ in range(rows))

        head.conv_fq = table(len(head.conv), all(q.is_quantized for q in (b[0] for b in head.conv)))
        head.cls_fq = table(1, head.cls_logits.is_quantized)
        head.bbox_fq = table(1, head.bbox_pred.is_quantized)
        return head


class QuantTwoMLPHead(TwoMLPHead):
    """Box head: RoIAlign output requantized into fc6; fc6 and fc7 with fused ReLU."""

    def forward(self, x: Tensor) -> Tensor:
        return self.fc7(self.fc6(x.flatten(start_dim=1)))

    @classmethod
    def convert(cls, head: TwoMLPHead, name: str, ctx: SwapContext) -> QuantTwoMLPHead:
        head.__class__ = cls
        head.fc6 = ctx.linear(f"{name}.fc6", head.fc6, activation=nn.ReLU(), input_quant=True)
        head.fc7 = ctx.linear(f"{name}.fc7", head.fc7, activation=nn.ReLU())
        return head


def _convert_predictor(pred: FastRCNNPredictor, name: str, ctx: SwapContext) -> FastRCNNPredictor:
    """Box predictor: class scores and box deltas are head outputs, quantized before decoding/NMS."""
    pred.cls_score = ctx.linear(f"{name}.cls_score", pred.cls_score)
    pred.bbox_pred = ctx.linear(f"{name}.bbox_pred", pred.bbox_pred)
    return pred


class QuantLastLevelMaxPool(LastLevelMaxPool):
    """The FPN's extra "pool" level, passing the grid of its input on (the RPN head quantizes its bias with it)."""

    def forward(self, x: list[Tensor], y: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        s = input_scale(x[-1])
        results, names = super().forward(x, y, names)
        if s is not None:
            tag_scale(results[-1], s)
        return results, names

    @classmethod
    def convert(cls, pool: LastLevelMaxPool, name: str, ctx: SwapContext) -> QuantLastLevelMaxPool:
        pool.__class__ = cls
        return pool


def _grid_max_pool(pool: nn.MaxPool2d, name: str, ctx: SwapContext) -> GridMaxPool2d:
    pool.__class__ = GridMaxPool2d
    return pool


@contextlib.contextmanager
def _stable_batched_nms() -> Iterator[None]:
    """torchvision's batched NMS as one NMS over offset boxes (its ONNX path) for the duration of a forward.

    On large inputs torchvision's eager path runs NMS per class and re-sorts the kept boxes with an
    unstable sort; the single NMS keeps equal scores in index order, as ONNX NonMaxSuppression does.
    """
    original = box_ops.batched_nms
    box_ops.batched_nms = box_ops._batched_nms_coordinate_trick
    try:
        yield
    finally:
        box_ops.batched_nms = original


class StableTiesRPN(RegionProposalNetwork):
    """RPN whose top-k and NMS break ties between equal scores by index, as the exported int8 graph does.

    Quantized objectness takes few distinct values (16 at 4 bits), so ties are common, and
    ``torch.topk`` orders them arbitrarily; ONNX TopK and NonMaxSuppression put the lower index
    first. With the same rule on both sides the fake-quant model and the int8 model keep the same proposals.
    """

    def _get_top_n_idx(self, objectness: Tensor, num_anchors_per_level: list[int]) -> Tensor:
        if torchvision._is_tracing():  # exported as ONNX TopK, which is index-stable already
            return super()._get_top_n_idx(objectness, num_anchors_per_level)
        r, offset = [], 0
        for ob in objectness.split(num_anchors_per_level, 1):
            k = min(self.pre_nms_top_n(), ob.shape[1])
            r.append(torch.sort(ob, dim=1, descending=True, stable=True)[1][:, :k] + offset)
            offset += ob.shape[1]
        return torch.cat(r, dim=1)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _stable_batched_nms():
            return super().forward(*args, **kwargs)


class StableTiesRoIHeads(RoIHeads):
    """RoI heads whose final NMS keeps equal scores in index order (see `StableTiesRPN`)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _stable_batched_nms():
            return super().forward(*args, **kwargs)


def stable_ties(model: nn.Module) -> nn.Module:
    """Give a torchvision detector's RPN and RoI heads the index-ordered tie-breaking of the int8 graph."""
    if type(getattr(model, "rpn", None)) is RegionProposalNetwork:
        model.rpn.__class__ = StableTiesRPN
    if type(getattr(model, "roi_heads", None)) is RoIHeads:
        model.roi_heads.__class__ = StableTiesRoIHeads
    return model


CONVERTERS = {
    nn.MaxPool2d: _grid_max_pool,
    LastLevelMaxPool: QuantLastLevelMaxPool.convert,
    BasicBlock: QuantBasicBlock.convert,
    Bottleneck: QuantBottleneck.convert,
    InvertedResidual: QuantInvertedResidual.convert,
    SqueezeExcitation: QuantSqueezeExcitation.convert,
    FeaturePyramidNetwork: QuantFPN.convert,
    RPNHead: QuantRPNHead.convert,
    TwoMLPHead: QuantTwoMLPHead.convert,
    FastRCNNPredictor: _convert_predictor,
}
