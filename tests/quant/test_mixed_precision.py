"""Mixed precision: per-layer bit-widths (``QuantConfig.layer_bits``) in the model and the int8 file; the sensitivity
that picks them is tested in tests/models/test_sensitivity.py."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fqn import QuantConfig, calibrate, prepare_qat
from fqn.int8 import convert_int8, load_int8
from fqn.int8.convert import export_part, head_parity
from fqn.quant.fake_quant import quantizers
from fqn.quant.prepare import quantized_layers, weight_bits
from fqn.quant.state import quant_config

HIGH = {"backbone.body.conv1": 8, "rpn.head.cls_logits": 8, "roi_heads.box_predictor.*": 8}


@pytest.fixture(scope="module")
def mixed(_float_detectors, scenes):
    cfg = QuantConfig(bits_w=4, bits_a=4, layer_bits=HIGH)
    model = prepare_qat(copy.deepcopy(_float_detectors["resnet18"]), cfg)
    return calibrate(model, [[s] for s in scenes[:4]], 4, progress=False).eval()


def test_matching_layers_and_their_outputs_take_the_high_bit_width(mixed):
    bits = {n: q.bits for n, q in quantizers(mixed)}
    high = {n for n, b in bits.items() if b == 8}
    assert {"backbone.body.conv1.weight_fq", "backbone.body.conv1.act_fq", "backbone.body.conv1.input_fq",
            "rpn.head.cls_logits.weight_fq", "roi_heads.box_predictor.cls_score.weight_fq",
            "roi_heads.box_predictor.bbox_pred.act_fq"} <= high
    assert {f"rpn.head.cls_fq.0.{i}" for i in range(5)} <= high  # the shared head's per-level outputs
    assert not any(n.startswith(("backbone.body.layer", "rpn.head.bbox", "backbone.fpn")) for n in high)
    assert bits["rpn.head.bbox_pred.weight_fq"] == 4 and bits["backbone.body.layer1.0.conv1.weight_fq"] == 4
    qmin, qmax = mixed.backbone.body.conv1.weight_fq.qmin, mixed.backbone.body.conv1.weight_fq.qmax
    assert (qmin, qmax) == (-127, 127)
    assert weight_bits(mixed) == sum(m.weight.numel() * (8 if n in ("backbone.body.conv1", "rpn.head.cls_logits")
                                                         or n.startswith("roi_heads.box_predictor") else 4)
                                     for n, m in quantized_layers(mixed))
    assert QuantConfig.from_dict(quant_config(mixed).to_dict()) == quant_config(mixed)


@pytest.mark.slow
def test_int8_file_keeps_each_layer_at_its_own_width(mixed, scenes, tmp_path):
    packed = tmp_path / "mixed.int4.onnx"
    deploy = convert_int8(mixed, tmp_path / "mixed.onnx", scenes[:1], packed_path=packed)
    proto = onnx.load(str(deploy))
    codes = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer
             if i.data_type == onnx.TensorProto.INT8 and len(i.dims) in (2, 4)}
    conv1 = next(a for n, a in codes.items() if "body/conv1" in n)
    w = mixed.backbone.body.conv1
    with torch.no_grad():  # the hand-computed 8-bit codes of the folded weight
        wf = w.folded_weight() if hasattr(w, "folded_weight") else w.weight
        scale = wf.detach().abs().amax(dim=(1, 2, 3)) / 127
        expect = torch.round(wf / scale[:, None, None, None]).clamp(-127, 127).numpy().astype(np.int8)
    assert np.abs(conv1.astype(int) - expect.astype(int)).max() <= 1
    assert np.abs(conv1).max() > 7  # not clamped to 4 bits
    layer1 = [a for n, a in codes.items() if "layer1" in n]
    assert layer1 and all(np.abs(a).max() <= 7 for a in layer1)
    stored = onnx.load(str(packed))
    types = {i.name: i.data_type for i in stored.graph.initializer if len(i.dims) == 4}
    assert any(t == onnx.TensorProto.INT4 for t in types.values())
    assert any(t == onnx.TensorProto.INT8 and "body/conv1" in n for n, t in types.items())
    assert packed.stat().st_size < 0.65 * deploy.stat().st_size
    a, b = (load_int8(p, threads=1)(scenes[6:8]) for p in (deploy, packed))
    for da, db in zip(a, b):
        assert all(torch.equal(da[k], db[k]) for k in ("boxes", "scores", "labels"))
    path = export_part(mixed, "heads", tmp_path / "heads.onnx", scenes[0])
    parity = head_parity(mixed, path, scenes[6:8], threads=1)
    assert parity["within_1_step"] > 0.85, parity


def test_layer_bits_are_validated():
    with pytest.raises(ValueError, match="layer_bits"):
        QuantConfig(layer_bits={"backbone.*": 16})
    with pytest.raises(ValueError, match="layer_bits"):
        QuantConfig(layer_bits=["backbone.*"])
    cfg = QuantConfig(bits_w=4, bits_a=4, layer_bits={"a.*": 8, "a.b": 6})
    assert cfg.for_layer("a.b").bits_w == 8 and cfg.for_layer("c").bits_w == 4  # the first pattern wins
    assert cfg.flags == "FPC+mixed"


def test_head_bits_raise_exactly_the_heads_layers(_float_detectors):
    """`ptq_config(..., head_bits=8)`: the RPN head (its conv, objectness, deltas and their per-level outputs) and the
    box predictor at 8 bits; the backbone, the FPN and the box head's fc layers stay at the row's 4 bits."""
    from fqn.ptq import ptq_config

    cfg = ptq_config(4, head_bits=8, layer_bits={"backbone.body.conv1": 8})
    assert cfg.layer_bits == {"backbone.body.conv1": 8, "rpn.head.*": 8, "roi_heads.box_predictor.*": 8}
    model = prepare_qat(copy.deepcopy(_float_detectors["resnet18"]), cfg)
    bits = {n: q.bits for n, q in quantizers(model)}
    high = {n.rsplit(".", 1)[0] for n, b in bits.items() if b == 8 and n.endswith("weight_fq")}
    assert high == {"backbone.body.conv1", "rpn.head.conv.0.0", "rpn.head.cls_logits", "rpn.head.bbox_pred",
                    "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"}
    assert {f"rpn.head.cls_fq.0.{i}" for i in range(5)} | {f"rpn.head.bbox_fq.0.{i}" for i in range(5)} <= {
        n for n, b in bits.items() if b == 8}
    assert bits["roi_heads.box_head.fc7.weight_fq"] == 4 and bits["backbone.fpn.inner_blocks.0.0.weight_fq"] == 4
    assert ptq_config(4).layer_bits == {}
