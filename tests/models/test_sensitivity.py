"""Layer sensitivity and the mixed-precision layer choice (`fqn.models.sensitivity`): a layer's measured noise
against a hand computation, the ranking's order, the budget of the bit choice, and the layer names it uses."""

from __future__ import annotations

import pytest
import torch

from fqn import QuantConfig, calibrate, prepare_qat
from fqn.models.faster_rcnn import float_proposals, head_outputs
from fqn.models.sensitivity import choose_layer_bits, keep_float_patterns, layer_of, layer_sensitivity
from fqn.quant.fake_quant import Phase, phase_of
from fqn.quant.prepare import quantized_layers


def test_layer_names():
    assert layer_of("backbone.body.layer1.0.conv1.act_fq") == "backbone.body.layer1.0.conv1"
    assert layer_of("rpn.head.cls_fq.0.3") == "rpn.head.cls_logits"
    assert layer_of("rpn.head.conv_fq.1.4") == "rpn.head.conv.1.0"
    assert layer_of("rpn.head.conv.0.0.act_fq") == "rpn.head.conv.0.0"
    assert keep_float_patterns([{"layer": "a", "cost_db": 2.0}, {"layer": "b", "cost_db": -1.0}]) == ["a"]


def test_sensitivity_measures_each_layer_alone_and_the_choice_fits_the_budget(float_detector, scenes):
    model = calibrate(prepare_qat(float_detector(), QuantConfig(bits_w=4, bits_a=4)), [[s] for s in scenes[:2]], 2,
                      progress=False)
    images = list(scenes[2:3])
    ranking = layer_sensitivity(model, images, mode="only")
    rows = {r["layer"]: r for r in ranking}
    assert {n for n, _ in quantized_layers(model)} <= set(rows)
    assert all(r["noise"] > 0 for r in ranking) and ranking == sorted(ranking, key=lambda r: -r["cost_db"])
    # the last layer by hand: only the class logits change (float proposals, float box features); the weight
    # per-channel symmetric 4-bit, the bias float (its input grid is float here), the output on its own range
    pred = model.roi_heads.box_predictor.cls_score
    with torch.no_grad(), phase_of(model, Phase.FLOAT):
        props = float_proposals(model, images)
        n_outputs = len(head_outputs(model, images, props))
        batch, _ = model.transform(images)
        feats = model.backbone(batch.tensors)
        heads = model.roi_heads
        x = heads.box_head(heads.box_roi_pool(feats, props, batch.image_sizes))
        y = x @ pred.weight.T + pred.bias
        s_w = (pred.weight.abs().amax(1) / 7).clamp_min(torch.finfo(torch.float32).eps)
        wq = torch.fake_quantize_per_channel_affine(pred.weight, s_w, torch.zeros(len(s_w), dtype=torch.int32), 0,
                                                    -7, 7)
        out = pred.act_fq
        yq = torch.fake_quantize_per_tensor_affine(x @ wq.T + pred.bias, out.scale.item(),
                                                   int(out.zero_point.item()), out.qmin, out.qmax)
    hand = float((yq - y).pow(2).sum() / y.pow(2).sum()) / n_outputs  # the other outputs are exact
    assert rows["roi_heads.box_predictor.cls_score"]["noise"] == pytest.approx(hand, rel=1e-3)
    assert rows["roi_heads.box_predictor.cls_score"]["weights"] == pred.weight.numel()
    bits = choose_layer_bits(ranking, budget=0.1)
    total = sum(r["weights"] for r in ranking) * 4
    assert bits and sum(rows[n]["weights"] * 4 for n in bits) <= 0.1 * total
    assert choose_layer_bits(ranking, budget=0.0) == {}
    with pytest.raises(ValueError, match="low"):
        choose_layer_bits(ranking, low=8)
    toy = [{"layer": "a", "weights": 100, "noise": 1.0, "mode": "only"},
           {"layer": "b", "weights": 10, "noise": 0.5, "mode": "only"},
           {"layer": "c", "weights": 10, "noise": 0.01, "mode": "only"},
           {"layer": "add", "weights": 0, "noise": 0.2, "mode": "only"}]
    assert choose_layer_bits(toy, budget=40 / 480) == {"b": 8}  # most noise per added bit first: b
    assert choose_layer_bits(toy, budget=1.0) == {"a": 8, "b": 8, "c": 8}
    with pytest.raises(ValueError, match="only"):
        choose_layer_bits([{**toy[0], "mode": "keep_float"}])  # a keep_float ranking ranks by another measure
