"""torchvision Faster R-CNN builders and the fully quantized detector (FQN scope)."""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, resnet18, resnet34, resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection import faster_rcnn as tv_frcnn
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fqn.config import QuantConfig
from fqn.models.quantizable import CONVERTERS, stable_ties
from fqn.models.roi_pool import FastMultiScaleRoIAlign
from fqn.quant.fake_quant import Phase, quantizers, set_phase
from fqn.quant.modules import QuantConv2d, act_quantizer
from fqn.quant.prepare import bind_input_grids, is_prepared, restore_float, scope_summary, swap_modules
from fqn.quant.range_search import SearchObserver
from fqn.quant.state import ATTRIBUTE as STATE_ATTRIBUTE
from fqn.quant.state import QuantState, quant_state

log = logging.getLogger(__name__)

_RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
BACKBONES = (*_RESNETS, "mobilenet_v3_large")
# torchvision ships COCO Faster R-CNN weights for these backbones only.
_DETECTION_BUILDERS = {"resnet50": tv_frcnn.fasterrcnn_resnet50_fpn,
                       "mobilenet_v3_large": tv_frcnn.fasterrcnn_mobilenet_v3_large_fpn}


def build_detector(backbone: str, num_classes: int, *, weights: Any = None, weights_backbone: Any = None,
                   min_size: int = 800, max_size: int = 1333, trainable_backbone_layers: int | None = None,
                   frozen_bn: bool | None = None, **kwargs: Any) -> FasterRCNN:
    """A torchvision Faster R-CNN with an FPN on the named backbone.

    Without pretrained weights the backbone uses trainable ``BatchNorm2d``
    (a from-scratch float model must learn its BN statistics); with weights it
    uses ``FrozenBatchNorm2d``, as torchvision does. ``weights`` (COCO
    detection weights, resnet50 and mobilenet_v3_large only) and
    ``weights_backbone`` (ImageNet) are passed to torchvision; with COCO
    weights and ``num_classes != 91`` the box predictor is replaced.

    Args:
        backbone: ``resnet18``, ``resnet34``, ``resnet50`` or ``mobilenet_v3_large``.
        num_classes: number of classes including the background.
        weights, weights_backbone: torchvision weight enums or their names.
        min_size, max_size: resize bounds of torchvision's transform.
        frozen_bn: ``FrozenBatchNorm2d`` in the backbone (default: when weights are given). ``True`` without
            weights builds the pretrained detector's architecture without downloading anything, for
            loading its fine-tuned weights from a checkpoint.
        kwargs: FasterRCNN keyword arguments, plus two plain-valued ones that a config file can hold
            (torchvision wants objects for them): ``anchor_sizes``, one anchor size in pixels per feature
            level (torchvision's 32..512 suit 800 px images; at 160 px objects of 10-80 px match none of
            the three largest, and the RPN learns slowly), and ``representation_size``, the width of the
            two-layer box head (torchvision: 1024, 12.8M weights in its first layer alone), and
            ``fpn_channels``, the width of the FPN outputs, and so of the RPN head and the RoI features
            (torchvision: 256). The FPN's 3x3 convs and the RPN conv run at the finest level's full
            resolution; at 128 a from-scratch R18 training step at 160 px costs half as much (measured).

    Example:
        >>> model = build_detector("resnet18", num_classes=3, min_size=128, max_size=128)
        >>> type(model).__name__
        'FasterRCNN'
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {list(BACKBONES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes!r}")
    if min_size < 32 or max_size < min_size:
        raise ValueError(f"need 32 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    kwargs = dict(kwargs)
    fpn_channels = kwargs.pop("fpn_channels", None)
    if fpn_channels is not None:
        if isinstance(fpn_channels, bool) or not isinstance(fpn_channels, int) or not 8 <= fpn_channels <= 1024:
            raise ValueError(f"fpn_channels must be an integer in [8, 1024], e.g. 128; got {fpn_channels!r}")
        if weights is not None:
            raise ValueError("fpn_channels changes the architecture; it cannot be used with pretrained detection "
                             "weights")
    kwargs = _plain_head_options(kwargs, num_classes, weights is not None, backbone, fpn_channels or 256)
    if weights is not None:
        if backbone not in _DETECTION_BUILDERS:
            raise ValueError(f"torchvision has no COCO Faster R-CNN weights for {backbone}; use weights_backbone "
                             "(ImageNet) instead, or resnet50 / mobilenet_v3_large")
        model = _DETECTION_BUILDERS[backbone](weights=weights, weights_backbone=None, min_size=min_size,
                                              max_size=max_size, trainable_backbone_layers=trainable_backbone_layers,
                                              **kwargs)
        if num_classes != model.roi_heads.box_predictor.cls_score.out_features:
            log.warning("num_classes=%d with COCO weights: the pretrained %d-way box predictor is replaced by a new, "
                        "untrained one (keep num_classes=91 to fine-tune the COCO head with category ids as labels)",
                        num_classes, model.roi_heads.box_predictor.cls_score.out_features)
            in_features = model.roi_heads.box_predictor.cls_score.in_features
            model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
        return model

    trained = weights_backbone is not None if frozen_bn is None else frozen_bn
    norm_layer = FrozenBatchNorm2d if trained else nn.BatchNorm2d
    layers = trainable_backbone_layers if trainable_backbone_layers is not None else (3 if trained else 5)
    if backbone in _RESNETS:
        body = _RESNETS[backbone](weights=weights_backbone, norm_layer=norm_layer)
        feat = _resnet_fpn_extractor(body, layers)
    else:
        # torchvision's pretrained detector is not dilated; keep its architecture when rebuilding it
        body = mobilenet_v3_large(weights=weights_backbone, norm_layer=norm_layer, dilated=not trained)
        feat = _mobilenet_extractor(body, True, min(layers, 6))
    if fpn_channels is not None:
        _set_fpn_width(feat, fpn_channels)
    if backbone == "mobilenet_v3_large":
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        sizes = ((32, 64, 128, 256, 512),) * 3
        ratios = ((0.5, 1.0, 2.0),) * len(sizes)
        kwargs.setdefault("rpn_anchor_generator", AnchorGenerator(sizes, ratios))
    if "box_predictor" in kwargs:
        num_classes = None  # torchvision: the predictor already fixes it
    return FasterRCNN(feat, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs)


def _set_fpn_width(feat: nn.Module, channels: int) -> None:
    """Give torchvision's backbone-with-FPN (always 256 wide) a fresh FPN ``channels`` wide, same inputs."""
    in_channels = [block[0].in_channels for block in feat.fpn.inner_blocks]
    feat.fpn = FeaturePyramidNetwork(in_channels, channels, extra_blocks=LastLevelMaxPool())
    feat.out_channels = channels


def fast_roi_pool() -> FastMultiScaleRoIAlign:
    """torchvision's default box RoI pooler as fqn's `FastMultiScaleRoIAlign`: the same outputs, a sparse CPU
    backward (torchvision's was 42% of a CPU training step), for ``build_detector(..., box_roi_pool=...)``;
    fqn's trainer builds its detectors with it."""
    return FastMultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)


def _plain_head_options(kwargs: dict[str, Any], num_classes: int, pretrained: bool, backbone: str,
                        fpn_channels: int = 256) -> dict[str, Any]:
    """``kwargs`` with ``anchor_sizes`` / ``representation_size`` (plain values) turned into torchvision objects."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import TwoMLPHead

    kwargs = dict(kwargs)
    sizes = kwargs.pop("anchor_sizes", None)
    width = kwargs.pop("representation_size", None)
    if (sizes is not None or width is not None) and pretrained:
        raise ValueError("anchor_sizes and representation_size change the architecture; they cannot be used "
                         "with pretrained detection weights")
    if sizes is not None:
        if (not isinstance(sizes, (list, tuple)) or len(sizes) != 5
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in sizes)):
            raise ValueError(f"anchor_sizes must be 5 positive sizes in pixels, one per FPN level "
                             f"(P2..P6; mobilenet: all 5 on each of its 3 levels), e.g. [16, 32, 64, 128, 256]; "
                             f"got {sizes!r}")
        if "rpn_anchor_generator" in kwargs:
            raise ValueError("give anchor_sizes or rpn_anchor_generator, not both")
        per_level = (tuple((float(v),) for v in sizes) if backbone in _RESNETS  # one size per FPN level
                     else (tuple(float(v) for v in sizes),) * 3)  # mobilenet: all sizes on its 3 levels
        kwargs["rpn_anchor_generator"] = AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * len(per_level))
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, int) or not 16 <= width <= 4096:
            raise ValueError(f"representation_size must be an integer in [16, 4096], e.g. 256; got {width!r}")
        if "box_head" in kwargs or "box_predictor" in kwargs:
            raise ValueError("give representation_size or box_head/box_predictor, not both")
        kwargs["box_head"] = TwoMLPHead(fpn_channels * 7 * 7, width)
        kwargs["box_predictor"] = FastRCNNPredictor(width, num_classes)
    return kwargs


def prepare_qat(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Make a torchvision Faster R-CNN fully quantized as FQN says, in place; returns it.

    Quantized: the normalised input, every conv and linear of the backbone,
    FPN, RPN head, box head and box predictor (BN folded per ``cfg.freeze_bn``),
    the residual and FPN adds, the SE products, and the head outputs that feed
    box decoding and NMS. Anchors, box decoding, RoIAlign and NMS work on
    dequantized values. ``cfg.keep_float`` patterns leave named modules float.
    The model leaves in the ``float`` phase (quantizers are identities) until
    `calibrate` fixes the ranges. ``model.fqn_state`` (`fqn.quant.state.QuantState`) holds ``cfg`` and
    the names of what was swapped and kept float, and is saved with the weights.

    Example:
        >>> from fqn import QuantConfig, build_detector
        >>> model = build_detector("resnet18", 3, min_size=128, max_size=128)
        >>> model = prepare_qat(model, QuantConfig(bits_w=4, bits_a=4))
        >>> scope_summary(model)["conv:quantized"], model.fqn_state.scope["float"]
        (31, [])
    """
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"cfg must be a QuantConfig, got {type(cfg).__name__}")
    if is_prepared(model) or quant_state(model) is not None:
        raise ValueError("this model is already prepared for quantization; prepare_qat must be called once, "
                         "on a float model (build a fresh one or reload the float checkpoint)")
    num_levels = len(model.rpn.anchor_generator.sizes) if hasattr(model, "rpn") else 5
    ctx = swap_modules(model, cfg, CONVERTERS, {"num_levels": num_levels})
    _quantize_network_input(model, cfg)
    stable_ties(model)  # quantized scores tie often: break ties by index, as the int8 graph does
    _keep_top_of_head_outputs(model)
    set_phase(model, Phase.FLOAT)
    bind_input_grids(model, lambda: _probe(model))
    setattr(model, STATE_ATTRIBUTE, QuantState(cfg, scope={"quantized": ctx.swapped, "float": ctx.kept_float}))
    log.info("fqn scope (%s, w%d/a%d): %s; kept float: %s", cfg.flags, cfg.bits_w, cfg.bits_a,
             scope_summary(model), ctx.kept_float or "none")
    return model


#: The quantizers of the values top-k and NMS rank: RPN objectness and deltas, class logits, box deltas.
HEAD_OUTPUTS = ("rpn.head.cls_fq.*", "rpn.head.bbox_fq.*", "roi_heads.box_predictor.*")

#: The layers that compute those values (with the RPN head's shared 3x3 conv): `head_layer_bits` sets their
#: bit-width. 16 levels are too few for scores and box deltas that top-k and NMS rank: on the synthetic set, PTQ
#: w4a4 with these layers at 8 bits scored 10 points above all layers at 4 bits (docs/ptq.md).
HEAD_LAYERS = ("rpn.head.*", "roi_heads.box_predictor.*")


def head_layer_bits(bits: int | None) -> dict[str, int]:
    """`QuantConfig.layer_bits` that put the detector's head layers (`HEAD_LAYERS`) at ``bits``; None: none."""
    return {} if bits is None else {pattern: bits for pattern in HEAD_LAYERS}


#: From this activation bit-width on, the range search keeps the top of the head outputs. Measured on the
#: synthetic benchmark (R18, PTQ): at 8 bits keeping it gave +0.8 AP, at 4 bits -1.7 AP (16 levels are too few
#: to spend on the rare top; the clipped range resolves the bulk of the scores better).
KEEP_TOP_FROM_BITS = 6


def _keep_top_of_head_outputs(model: nn.Module) -> None:
    """PTQ's range search does not clip the top of a head output at >= `KEEP_TOP_FROM_BITS` bits
    (see `SearchObserver.keep_top`)."""
    for name, fq in quantizers(model, "act"):
        if (isinstance(fq.observer, SearchObserver) and fq.bits >= KEEP_TOP_FROM_BITS
                and any(fnmatch.fnmatch(name, p) for p in HEAD_OUTPUTS)):
            fq.observer.keep_top = True


def strip_quantizers(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The inverse of `prepare_qat`: a float torchvision detector with the trained weights, no quantizer left.

    Every layer is torchvision's own again (conv and BatchNorm2d/FrozenBatchNorm2d apart, with ``W``,
    gamma, beta and the EMA statistics as trained), so the result loads where a float torchvision
    Faster R-CNN does, e.g. to fine-tune again at another bit-width or to export in float.

    Example:
        >>> from fqn import QuantConfig, build_detector, prepare_qat
        >>> float_model = build_detector("resnet18", 3, min_size=128, max_size=128)
        >>> quantized = prepare_qat(copy.deepcopy(float_model), QuantConfig(bits_w=4, bits_a=4))
        >>> back = strip_quantizers(quantized)
        >>> sorted(back.state_dict()) == sorted(float_model.state_dict())
        True
    """
    if quant_state(model) is None and not is_prepared(model):
        raise ValueError("this model has no quantizers to strip: it is a float model already")
    if not inplace:
        model = copy.deepcopy(model)
    restore_float(model)
    pooler = getattr(getattr(model, "roi_heads", None), "box_roi_pool", None)
    if isinstance(pooler, FastMultiScaleRoIAlign):  # torchvision's own pooler: the same outputs, no fqn class left
        pooler.__class__ = MultiScaleRoIAlign
    if quant_state(model) is not None:
        delattr(model, STATE_ATTRIBUTE)
    if is_prepared(model):
        raise RuntimeError("quantizers are left after stripping: a block without restore_float holds them")
    return model


@torch.no_grad()
def head_outputs(model: nn.Module, images: list[Tensor], proposals: list[Tensor] | None = None) -> dict[str, Tensor]:
    """FPN features and RPN head outputs for a batch, in eval mode; with ``proposals`` (one Nx4 box tensor per
    image, e.g. `float_proposals`), also the box head's class logits and box deltas on those RoIs, so that runs
    which would propose different boxes compare element by element."""
    model.eval()
    batch, _ = model.transform(images)
    feats = model.backbone(batch.tensors)
    logits, deltas = model.rpn.head(list(feats.values()))
    out = {f"fpn.{k}": v for k, v in feats.items()}
    out["rpn.objectness"] = torch.cat([t.flatten() for t in logits])
    out["rpn.box_deltas"] = torch.cat([t.flatten() for t in deltas])
    if proposals is not None:
        heads = model.roi_heads
        cls, reg = heads.box_predictor(heads.box_head(heads.box_roi_pool(feats, proposals, batch.image_sizes)))
        out["roi.class_logits"], out["roi.box_deltas"] = cls, reg
    return out


def float_proposals(model: nn.Module, images: list[Tensor], max_per_image: int | None = 100) -> list[Tensor]:
    """The RPN's proposals for ``images`` in ``model``'s current phase (the float phase for a reference), eval mode.

    The best ``max_per_image`` (the RPN returns them by decreasing objectness): the box head's cost per run
    grows with the RoIs, and the top ones are those that become detections.
    """
    model.eval()
    batch, _ = model.transform(images)
    proposals, _ = model.rpn(batch, model.backbone(batch.tensors))
    return [p[:max_per_image] for p in proposals] if max_per_image is not None else proposals


def _probe(model: nn.Module, size: int = 128) -> None:
    """One pass of zeros through the parts that hold quantized layers, for `bind_input_grids`.

    The backbone takes a batch directly (no resize to ``min_size``: the probe only follows tensors) and
    the box head a zero RoIAlign output, so neither the transform nor the pooler's cached scales are touched.
    """
    if not all(hasattr(model, a) for a in ("backbone", "rpn", "roi_heads")):
        return
    device = next(model.parameters()).device
    feats = model.backbone(torch.zeros(1, 3, size, size, device=device))
    model.rpn.head(list(feats.values()))
    heads = model.roi_heads
    out = heads.box_roi_pool.output_size
    out = (out, out) if isinstance(out, int) else tuple(out)
    pooled = torch.zeros(1, next(iter(feats.values())).shape[1], *out, device=device)
    heads.box_predictor(heads.box_head(pooled))


def _quantize_network_input(model: nn.Module, cfg: QuantConfig) -> None:
    """The normalised input (after torchvision's transform) is quantized at the first conv of the backbone."""
    prefix = "backbone." if hasattr(model, "backbone") else ""
    backbone = getattr(model, "backbone", model)
    name, first = next(((n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if isinstance(first, QuantConv2d) and first.is_quantized and first.input_fq is None:
        first.input_fq = act_quantizer(cfg.for_layer(prefix + name))  # at the first layer's bit-width


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: Iterable[Tensor], *, batch_size: int = 2) -> nn.Module:
    """Set the BatchNorm running statistics of a float model from data (cumulative average).

    A randomly initialised detector has BN statistics (mean 0, var 1) that do
    not match its activations, which makes any quantization look terrible;
    this gives such a model realistic statistics for demos and tests. Only
    ``nn.BatchNorm2d`` is touched (``FrozenBatchNorm2d`` stays frozen).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    backbone = getattr(model, "backbone", model)
    transform = getattr(model, "transform", None)
    imgs = list(images)
    for i in range(0, len(imgs), batch_size):
        chunk = imgs[i:i + batch_size]
        batch = transform(chunk)[0].tensors if transform is not None else torch.stack(chunk)
        backbone(batch)
    for m, (momentum, training) in zip(bns, saved):
        m.momentum = momentum
        m.train(training)
    return model
