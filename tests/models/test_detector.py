"""The fully quantized Faster R-CNN on tiny real torchvision models (128 px, weights=None, BN-calibrated)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import box_iou

from fqn import QuantConfig, build_detector, calibrate, prepare_qat
from fqn.evaluation import sqnr_db
from fqn.models.faster_rcnn import head_outputs
from fqn.quant.fake_quant import FakeQuantize, current_phase, set_phase
from fqn.quant.modules import QuantAdd, QuantConv2d, QuantConvBn2d, QuantLinear
from fqn.quant.prepare import scope_summary

from ..conftest import SIZE, targets_for


def test_build_detector_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_detector("vgg16", 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_detector("resnet18", 1)
    with pytest.raises(ValueError, match="no COCO"):
        build_detector("resnet18", 3, weights="DEFAULT")
    with pytest.raises(ValueError, match="min_size"):
        build_detector("resnet18", 3, min_size=128, max_size=64)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "mobilenet_v3_large"])
def test_every_backbone_builds_and_prepares(backbone):
    model = build_detector(backbone, 5, min_size=SIZE, max_size=SIZE)
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    prepare_qat(model, QuantConfig(bits_w=4, bits_a=4))
    assert scope_summary(model).get("conv:float", 0) == 0


def test_prepare_twice_is_an_error(float_detector):
    model = prepare_qat(float_detector(), QuantConfig())
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat(model, QuantConfig())


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_scope_every_conv_and_linear_is_quantized(float_detector, backbone, per_channel):
    model = prepare_qat(float_detector(backbone), QuantConfig(per_channel=per_channel))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) > 30
    for name, m in layers:
        assert isinstance(m, (QuantConv2d, QuantLinear)) and m.is_quantized, name
        channels = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        assert m.weight_fq.scale.numel() == (channels if per_channel else 1), name
    # every activation: each layer's output is quantized by itself or, for the RPN head, per pyramid level
    head = model.rpn.head
    for name, m in layers:
        if not name.startswith("rpn.head"):
            assert m.act_fq is not None, name
    assert len(head.cls_fq[0]) == len(head.bbox_fq[0]) == len(model.rpn.anchor_generator.sizes)
    assert isinstance(model.backbone.body[next(iter(model.backbone.body))].input_fq if backbone == "resnet18"
                      else model.backbone.body["0"][0].input_fq, FakeQuantize)
    adds = [m for m in model.modules() if isinstance(m, QuantAdd)]
    assert adds and all(a.act_fq is not None for a in adds)
    assert model.fqn_state.scope["float"] == []


def test_r50_fpn_scope_counts_exactly():
    """R50-FPN, 91 classes: every one of its 64 convs and 4 linears, 19 adds, 68 weight and 101 act quantizers."""
    from fqn import build_detector
    from fqn.quant.prepare import scope_summary

    model = build_detector("resnet50", 91, min_size=128, max_size=128)
    convs = sum(type(m) is nn.Conv2d for m in model.modules())
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert (convs, linears) == (64, 4)  # counted on the float torchvision model itself
    prepare_qat(model, QuantConfig())
    # 1 input, 69 backbone body, 11 FPN, 15 RPN head (3 outputs x 5 levels), 1 RoIAlign output, 2 box head, 2 predictor
    assert scope_summary(model) == {"add:quantized": 19, "conv:quantized": convs, "linear:quantized": linears,
                                    "quantizer:act": 1 + 69 + 11 + 15 + 1 + 2 + 2, "quantizer:weight": convs + linears}
    assert model.fqn_state.scope["float"] == []


def test_keep_float_leaves_named_modules_float(float_detector):
    cfg = QuantConfig(keep_float=("roi_heads.box_predictor.*", "backbone.body.layer1.0.conv1"))
    model = prepare_qat(float_detector(), cfg)
    assert type(model.roi_heads.box_predictor.cls_score) is nn.Linear
    assert type(model.roi_heads.box_predictor.bbox_pred) is nn.Linear
    conv = model.backbone.body.layer1[0].conv1
    assert isinstance(conv, QuantConv2d) and not conv.is_quantized and conv.act_fq is None
    assert set(model.fqn_state.scope["float"]) == {"roi_heads.box_predictor.cls_score",
                                                   "roi_heads.box_predictor.bbox_pred", "backbone.body.layer1.0.conv1"}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in model.fqn_state.scope["float"]:
            assert isinstance(m, (QuantConv2d, QuantLinear)) and m.is_quantized, name


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_disabled_fake_quant_matches_float(float_detector, scenes, backbone):
    """Folding only: features, RPN outputs and detections of the prepared model equal the float model's."""
    ref_model = float_detector(backbone)
    model = prepare_qat(float_detector(backbone), QuantConfig())
    assert current_phase(model) == "float"
    images = scenes[6:]
    ref, out = head_outputs(ref_model, images), head_outputs(model, images)
    for k in ref:  # within 1e-4 of the tensor's own scale (R18: also 1e-4 absolute)
        err = float((out[k] - ref[k]).abs().max())
        assert err <= 1e-4 * float(ref[k].abs().max()), (k, err)
        if backbone == "resnet18":
            assert err <= 1e-4, (k, err)
    if backbone == "resnet18":  # random MobileNet scores tie to 1e-5, so its NMS order is not comparable
        with torch.no_grad():
            det_ref, det = ref_model(images), model.eval()(images)
        for a, b in zip(det, det_ref):
            assert torch.allclose(a["scores"], b["scores"], atol=1e-4)
            assert torch.allclose(a["boxes"], b["boxes"], atol=1e-3)  # pixels on a 128 px image
            assert torch.equal(a["labels"], b["labels"])


def test_calibrated_8bit_detector_stays_close(float_detector, scenes):
    """Metric: SQNR of FPN features and RPN outputs, and the IoU of the top RPN proposals, float vs w8a8.

    Min/max calibration: on a random (untrained) network the percentile clip of the largest 0.1% of
    activations costs more than rounding; the thresholds sit below the values measured here
    (about 20 dB and 0.9 IoU) and far above what 4 bits give (about 3 dB).
    """
    ref_model = float_detector()
    cfg = QuantConfig(percentile=False, act_observer="minmax")
    model = calibrate(prepare_qat(float_detector(), cfg), [[img] for img in scenes[:6]], 6, progress=False)
    assert current_phase(model) == "quantize"
    images = scenes[6:]
    ref, out = head_outputs(ref_model, images), head_outputs(model, images)
    for k in ref:
        assert sqnr_db(ref[k], out[k]) > 12, (k, sqnr_db(ref[k], out[k]))
    with torch.no_grad():
        batch, _ = ref_model.transform(images)
        props_ref, _ = ref_model.rpn(batch, ref_model.backbone(batch.tensors))
        props, _ = model.rpn(batch, model.backbone(batch.tensors))
        detections = model(images)
    for a, b in zip(props_ref, props):
        assert box_iou(a[:50], b[:200]).max(dim=1).values.mean() > 0.8
    assert all(set(d) == {"boxes", "scores", "labels"} for d in detections)


def test_calibrate_accepts_detection_loader_batches_and_rejects_junk(float_detector, scenes):
    model = prepare_qat(float_detector(), QuantConfig())
    pairs = [((scenes[0], scenes[1]), tuple(targets_for([1, 0])))]
    calibrate(model, pairs, 1, progress=False)
    acts = [fq for n, fq in model.named_modules() if isinstance(fq, FakeQuantize) and fq.role == "act"]
    assert all(fq.is_calibrated for fq in acts)
    with pytest.raises(ValueError, match="batch"):
        calibrate(model, [["not an image"]], 1, progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        calibrate(model, pairs, 0, progress=False)
    with pytest.raises(ValueError, match="prepare_qat"):
        calibrate(float_detector(), pairs, 1, progress=False)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("freeze_bn", [True, False])
def test_train_step_gives_finite_losses_and_every_weight_a_gradient(float_detector, scenes, bits, freeze_bn):
    cfg = QuantConfig(bits_w=bits, bits_a=bits, freeze_bn=freeze_bn, percentile=freeze_bn)
    model = calibrate(prepare_qat(float_detector(), cfg), [[img] for img in scenes[:2]], 2, progress=False)
    bn_layers = [m for m in model.modules() if isinstance(m, QuantConvBn2d)]
    assert bn_layers and all(m._frozen == freeze_bn for m in bn_layers)  # W trained, BN folded per step (Fig. 3)
    set_phase(model, "quantize" if cfg.percentile else "observe_quantize")
    model.train()
    losses = model(scenes[:2], targets_for([2, 0]))  # the second image has no boxes
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing
    model.eval()
    with torch.no_grad():
        detections = model(scenes[6:7])
    assert detections[0]["boxes"].shape[1] == 4


def test_quantizer_state_round_trips_through_state_dict(float_detector, scenes, tmp_path):
    """Ranges, calibrated flags and phase live in buffers: a fresh prepared model loaded from disk is identical."""
    cfg = QuantConfig(bits_w=4, bits_a=4, freeze_bn=False, percentile=False)
    model = calibrate(prepare_qat(float_detector(), cfg), [[img] for img in scenes[:2]], 2, progress=False)
    torch.save(model.state_dict(), tmp_path / "qat.pt")
    fresh = prepare_qat(float_detector(), cfg)
    assert current_phase(fresh) == "float"
    fresh.load_state_dict(torch.load(tmp_path / "qat.pt", weights_only=True), strict=True)
    assert current_phase(fresh) == "quantize"
    images = scenes[6:]
    ref, out = head_outputs(model, images), head_outputs(fresh, images)
    assert all(torch.equal(ref[k], out[k]) for k in ref)


def test_prepared_model_pickles(float_detector, scenes):
    """torch.save(model), spawn-based DDP and worker processes need a picklable prepared model: the copy holds
    the same tensors and, calibrated, detects exactly what the original detects."""
    import pickle

    model = prepare_qat(float_detector(), QuantConfig(freeze_bn=False))
    model = calibrate(model, [[s] for s in scenes[:2]], 2, progress=False).eval()
    clone = pickle.loads(pickle.dumps(model))
    assert scope_summary(clone) == scope_summary(model)
    ours, theirs = model.state_dict(), clone.state_dict()
    assert list(theirs) == list(ours)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    with torch.no_grad():
        expected, got = model(scenes[6:7]), clone(scenes[6:7])
    assert sum(len(d["boxes"]) for d in expected) > 0  # something to compare
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
        assert torch.equal(a["labels"], b["labels"])


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_every_quantized_layer_sees_its_input_grid_and_quantizes_its_bias(float_detector, scenes, backbone):
    """The int32 bias grid needs s_in: every quantized conv/linear must receive a tagged (quantized) input."""
    model = calibrate(prepare_qat(float_detector(backbone), QuantConfig()), [[s] for s in scenes[:2]], 2,
                      progress=False).eval()
    with torch.inference_mode():
        model(scenes[6:7])
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, (QuantConv2d, QuantLinear)) and m.is_quantized
              and (m.bias is not None or isinstance(m, QuantConvBn2d))}
    assert len(layers) > 30
    assert [n for n, m in layers.items() if not m.bias_quantized] == []


def test_prepared_detector_breaks_score_ties_by_index_like_onnx(float_detector):
    """Quantized scores tie often; the fake-quant RPN must keep the lower index first, as ONNX TopK does."""
    import numpy as np
    from torchvision.ops import boxes as box_ops

    from fqn.models.quantizable import QuantRoIHeads, QuantRPN

    model = prepare_qat(float_detector(), QuantConfig())
    assert isinstance(model.rpn, QuantRPN) and isinstance(model.roi_heads, QuantRoIHeads)
    torch.manual_seed(0)
    objectness = torch.randint(0, 16, (2, 700)).float()  # 16 levels: a 4-bit objectness
    levels = [400, 200, 100]
    got = model.rpn._get_top_n_idx(objectness, levels)
    k = model.rpn.pre_nms_top_n()
    expected, offset = [], 0
    for n in levels:
        block = objectness[:, offset:offset + n].numpy()
        expected.append(np.argsort(-block, axis=1, kind="stable")[:, :min(k, n)] + offset)
        offset += n
    assert np.array_equal(got.numpy(), np.concatenate(expected, axis=1))
    original = box_ops.batched_nms
    model.eval()([torch.rand(3, SIZE, SIZE)])
    assert box_ops.batched_nms is original  # the single-NMS path is only swapped in during a forward


@pytest.mark.slow  # converts a whole detector to int8 and runs it
def test_plain_anchor_sizes_and_box_head_width_build_what_torchvision_would(tmp_path):
    """Config-file options (plain values) give the same detector as torchvision's objects, and come back from a
    checkpoint's hyper-parameters."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from fqn.int8 import convert_int8, load_int8
    from fqn.models.checkpoint import load_detector

    det = {"anchor_sizes": [8, 16, 32, 64, 128], "representation_size": 64, "fpn_channels": 32}
    model = build_detector("resnet18", 4, min_size=SIZE, max_size=SIZE, **det).eval()
    body = torchvision.models.resnet18(norm_layer=torch.nn.BatchNorm2d)
    fpn = BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in range(1, 5)}, [64, 128, 256, 512], 32,
                          extra_blocks=LastLevelMaxPool()).eval()
    fpn.load_state_dict(model.backbone.state_dict())  # same names and shapes as torchvision's 32-wide FPN
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        for mine, theirs in zip(model.backbone(x).values(), fpn(x).values()):
            assert mine.shape[1] == 32 and torch.equal(mine, theirs)
    assert model.rpn.head.conv[0][0].in_channels == 32 and model.roi_heads.box_head.fc6.in_features == 32 * 7 * 7
    reference = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 5)
    images = [torch.rand(3, SIZE, SIZE)]
    image_list, _ = model.transform(images)
    feats = list(model.backbone(image_list.tensors).values())
    for mine, theirs in zip(model.rpn.anchor_generator(image_list, feats), reference(image_list, feats)):
        assert torch.equal(mine, theirs)
    assert model.roi_heads.box_head.fc7.out_features == 64 and model.roi_heads.box_predictor.cls_score.out_features == 4
    hp = {"backbone": "resnet18", "num_classes": 4, "min_size": SIZE, "max_size": SIZE, "detector": det}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hp},
               tmp_path / "m.ckpt")
    again, _ = load_detector(tmp_path / "m.ckpt")
    with torch.no_grad():
        a, b = model(images)[0], again(images)[0]
    assert torch.equal(a["boxes"], b["boxes"])
    q = prepare_qat(again, QuantConfig())  # the narrow box head quantizes and converts like the default one
    calibrate(q, [images], 1, progress=False)
    path = convert_int8(q.eval(), tmp_path / "m.onnx", images)
    out = load_int8(path)(images)[0]
    assert set(out) == {"boxes", "labels", "scores"} and out["boxes"].shape[1:] == (4,)


@pytest.mark.parametrize("bad", [{"anchor_sizes": [8, 16]}, {"anchor_sizes": "8,16,32,64,128"},
                                 {"anchor_sizes": [8, 16, 32, 64, -1]}, {"representation_size": 0},
                                 {"representation_size": 1.5}, {"fpn_channels": 0}, {"fpn_channels": 1.5}])
def test_bad_plain_detector_options_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_detector("resnet18", 4, min_size=SIZE, max_size=SIZE, **bad)
    with pytest.raises(ValueError, match="pretrained"):
        build_detector("resnet50", 4, weights="DEFAULT", anchor_sizes=[8, 16, 32, 64, 128])
    with pytest.raises(ValueError, match="pretrained"):
        build_detector("resnet50", 4, weights="DEFAULT", fpn_channels=128)
