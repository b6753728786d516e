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

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torchvision.ops.misc import SqueezeExcitation

from fqn.quant.fake_quant import FakeQuantize
from fqn.quant.modules import QuantAdd, QuantConv2d, QuantMaxPool2d, QuantMul, act_quantizer
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
        block.add_relu = QuantAdd(ctx.layer_cfg(f"{name}.add_relu"), relu=True)
        return block

    def restore_float(self) -> None:
        _restore_resnet_block(self, 2, BasicBlock)


def _restore_resnet_block(block: nn.Module, n: int, cls: type) -> None:
    """conv1..n and bn1..n back from their fused layers, one ReLU, no quantized add: torchvision's block."""
    for i in range(1, n + 1):
        conv, bn = _unfuse(getattr(block, f"conv{i}"))[:2]
        setattr(block, f"conv{i}", conv)
        setattr(block, f"bn{i}", bn)
    block.relu = nn.ReLU(inplace=True)
    del block.add_relu
    block.__class__ = cls


def _unfuse(layer: nn.Module) -> list[nn.Module]:
    return layer.float_layers() if hasattr(layer, "float_layers") else [layer]


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
        block.add_relu = QuantAdd(ctx.layer_cfg(f"{name}.add_relu"), relu=True)
        return block

    def restore_float(self) -> None:
        _restore_resnet_block(self, 3, Bottleneck)


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
            block.add = QuantAdd(ctx.layer_cfg(f"{name}.add"))
        return block

    def restore_float(self) -> None:
        if hasattr(self, "add"):
            del self.add
        self.__class__ = InvertedResidual


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
        se.mul = QuantMul(ctx.layer_cfg(f"{name}.mul"))
        return se

    def restore_float(self) -> None:
        self.fc1, self.activation = _unfuse(self.fc1)
        self.fc2, self.scale_activation = _unfuse(self.fc2)
        del self.mul
        self.__class__ = SqueezeExcitation


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
        fpn.adds = nn.ModuleList(QuantAdd(ctx.layer_cfg(f"{name}.adds.{i}")) for i in range(n - 1))
        return fpn

    def restore_float(self) -> None:
        del self.adds
        self.__class__ = FeaturePyramidNetwork


class QuantRPNHead(RPNHead):
    """RPN head: one weight quantizer per conv, one output quantizer per conv and pyramid level."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, bbox_reg = [], []
        level_grids = getattr(self, "_level_grids", ())
        for level, feature in enumerate(x):
            t = feature
            grid = level_grids[level] if level < len(level_grids) else None
            for depth, block in enumerate(self.conv):
                t = self._on_grid(block[0], t, grid)
                for rest in list(block)[1:]:  # Identity once the activation is fused
                    t = rest(t)
                t = self._q(self.conv_fq, depth, level, t)
                grid = self.conv_fq[depth][level] if self.conv_fq is not None else None
            logits.append(self._q(self.cls_fq, 0, level, self._on_grid(self.cls_logits, t, grid)))
            bbox_reg.append(self._q(self.bbox_fq, 0, level, self._on_grid(self.bbox_pred, t, grid)))
        return logits, bbox_reg

    @staticmethod
    def _on_grid(layer: nn.Module, t: Tensor, grid: FakeQuantize | None) -> Tensor:
        """The shared conv told which level's quantizer produced ``t`` (its bias goes on that grid)."""
        return layer(t, grid) if isinstance(layer, QuantConv2d) else layer(t)

    def grid_inputs(self, args: tuple) -> list[Tensor]:
        return list(args[0])

    def objectness_step(self, level: int) -> float | None:
        """The quantization step of pyramid level ``level``'s objectness logits; None where they are float."""
        if self.cls_fq is None:
            return None
        return float(self.cls_fq[0][level].scale.reshape(-1)[0])

    def restore_float(self) -> None:
        del self.conv_fq, self.cls_fq, self.bbox_fq
        self.__dict__.pop("_level_grids", None)
        self.__class__ = RPNHead

    def bind_grids(self, calls: list[list[FakeQuantize | None]]) -> None:
        """The quantizer of each pyramid level's input, from the probe (`bind_input_grids`); plain references."""
        object.__setattr__(self, "_level_grids", tuple(calls[0]) if calls else ())

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

        def table(layers: list[str], quantized: bool) -> nn.ModuleList | None:
            if not quantized:  # one quantizer per pyramid level, at the bit-width of the layer it follows
                return None
            return nn.ModuleList(nn.ModuleList(act_quantizer(ctx.cfg.for_layer(f"{name}.{layer}"))
                                               for _ in range(levels)) for layer in layers)

        head.conv_fq = table([f"conv.{d}.0" for d in range(len(head.conv))],
                             all(q.is_quantized for q in (b[0] for b in head.conv)))
        head.cls_fq = table(["cls_logits"], head.cls_logits.is_quantized)
        head.bbox_fq = table(["bbox_pred"], head.bbox_pred.is_quantized)
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

    def restore_float(self) -> None:
        self.fc6, self.fc7 = _unfuse(self.fc6)[0], _unfuse(self.fc7)[0]  # torchvision applies the ReLUs itself
        self.__class__ = TwoMLPHead


def _convert_predictor(pred: FastRCNNPredictor, name: str, ctx: SwapContext) -> FastRCNNPredictor:
    """Box predictor: class scores and box deltas are head outputs, quantized before decoding/NMS."""
    pred.cls_score = ctx.linear(f"{name}.cls_score", pred.cls_score)
    pred.bbox_pred = ctx.linear(f"{name}.bbox_pred", pred.bbox_pred)
    return pred


class QuantLastLevelMaxPool(LastLevelMaxPool):
    """The FPN's extra "pool" level: max pooling keeps the grid of its input (the RPN head's bias uses it)."""

    def grid_sources(self, args: tuple, output: tuple[list[Tensor], list[str]]) -> list[tuple[Tensor, Tensor]]:
        results = output[0]  # torchvision appends the pooled level to the list it was given
        return [(results[-1], results[-2])]

    def restore_float(self) -> None:
        self.__class__ = LastLevelMaxPool

    @classmethod
    def convert(cls, pool: LastLevelMaxPool, name: str, ctx: SwapContext) -> QuantLastLevelMaxPool:
        pool.__class__ = cls
        return pool


def _grid_max_pool(pool: nn.MaxPool2d, name: str, ctx: SwapContext) -> QuantMaxPool2d:
    pool.__class__ = QuantMaxPool2d
    return pool


def stable_batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's batched NMS as one NMS over offset boxes (its ONNX path), on every input size.

    On large inputs torchvision's eager ``batched_nms`` runs NMS per class and re-sorts the kept boxes
    with an unstable sort; the single NMS keeps equal scores in index order, as ONNX NonMaxSuppression does.
    """
    return box_ops._batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)


_TOPK_SPAN = 2**21  # anchors per pyramid level the exported top-k orders by index (KITTI level 0: ~73k)


class QuantRPN(RegionProposalNetwork):
    """RPN whose top-k and NMS break ties between equal scores by index, as the exported int8 graph does.

    Quantized objectness takes few distinct values (16 at 4 bits), so ties are common, and
    ``torch.topk`` orders them arbitrarily; ONNX TopK and NonMaxSuppression put the lower index
    first. With the same rule on both sides the fake-quant model and the int8 model keep the same proposals.
    """

    def _get_top_n_idx(self, objectness: Tensor, num_anchors_per_level: list[int]) -> Tensor:
        if torchvision._is_tracing():
            return self._traced_top_n_idx(objectness, num_anchors_per_level)
        r, offset = [], 0
        for ob in objectness.split(num_anchors_per_level, 1):
            k = min(self.pre_nms_top_n(), ob.shape[1])
            r.append(torch.sort(ob, dim=1, descending=True, stable=True)[1][:, :k] + offset)
            offset += ob.shape[1]
        return torch.cat(r, dim=1)

    def _traced_top_n_idx(self, objectness: Tensor, num_anchors_per_level: list[int]) -> Tensor:
        """The exported top-k: ONNX TopK on unique integer keys (quantization code, then index), not on the logits.

        ONNX does not say how TopK orders equal values: ONNX Runtime keeps index order, OpenVINO does not,
        and at 4 bits most objectness values tie, so OpenVINO kept other proposals. The key
        ``(code + 256) * 2^21 + (2^21 - 1 - index)`` orders by objectness, then by index, in any runtime, and
        stays below 2^31 (a runtime may run int64 as int32) for up to 2^21 anchors per level.
        """
        steps = [self.head.objectness_step(level) if isinstance(self.head, QuantRPNHead) else None
                 for level in range(len(num_anchors_per_level))]
        if None in steps:  # float objectness: ties are rare
            return super()._get_top_n_idx(objectness, num_anchors_per_level)
        r, offset = [], 0
        for ob, step in zip(objectness.split(num_anchors_per_level, 1), steps):
            num_anchors = ob.shape[1]
            k = det_utils._topk_min(ob, self.pre_nms_top_n(), 1)
            index = torch.ones_like(ob, dtype=torch.int64).cumsum(1) - 1
            code = torch.round(ob / step).to(torch.int64) + 256
            _, top = (code * _TOPK_SPAN + (_TOPK_SPAN - 1 - index)).topk(k, dim=1)
            r.append(top + offset)
            offset += num_anchors
        return torch.cat(r, dim=1)

    def restore_float(self) -> None:
        self.__class__ = RegionProposalNetwork

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's ``RegionProposalNetwork.filter_proposals`` (0.29) with `stable_batched_nms`."""
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), idx, dtype=torch.int64, device=device)
                            for idx, n in enumerate(num_anchors_per_level)], 0)
        levels = levels.reshape(1, -1).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        objectness = objectness[batch_idx, top_n_idx]
        levels = levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]
        objectness_prob = torch.sigmoid(objectness)
        final_boxes, final_scores = [], []
        for boxes, scores, lvl, img_shape in zip(proposals, objectness_prob, levels, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, img_shape)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = torch.where(scores >= self.score_thresh)[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = stable_batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores


class QuantRoIHeads(RoIHeads):
    """RoI heads whose final NMS keeps equal scores in index order (see `QuantRPN`)."""

    def restore_float(self) -> None:
        self.__class__ = RoIHeads

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                               image_shapes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """torchvision's ``RoIHeads.postprocess_detections`` (0.29) with `stable_batched_nms`."""
        device = class_logits.device
        num_classes = class_logits.shape[-1]
        boxes_per_image = [b.shape[0] for b in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_shape in zip(pred_boxes.split(boxes_per_image, 0),
                                              pred_scores.split(boxes_per_image, 0), image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(scores)
            # drop the background column, then one candidate per (box, class)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            inds = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = stable_batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels


def stable_ties(model: nn.Module) -> nn.Module:
    """Give a torchvision detector's RPN and RoI heads the index-ordered tie-breaking of the int8 graph."""
    if type(getattr(model, "rpn", None)) is RegionProposalNetwork:
        model.rpn.__class__ = QuantRPN
    if type(getattr(model, "roi_heads", None)) is RoIHeads:
        model.roi_heads.__class__ = QuantRoIHeads
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
