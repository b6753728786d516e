"""Activation-error analysis on a tiny calibrated detector: metrics by hand, float reference, files written."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fqn import QuantConfig, calibrate, prepare_qat
from fqn.commands.analyze import analyze_layers, comparable_points, error_stats, relative_error, write_report
from fqn.models.sensitivity import layer_sensitivity
from fqn.quant.fake_quant import set_phase


@pytest.fixture(scope="module")
def quantized(_float_detectors, scenes):
    import copy

    model = prepare_qat(copy.deepcopy(_float_detectors["resnet18"]), QuantConfig(bits_w=4, bits_a=4))
    return calibrate(model, [[s] for s in scenes[:2]], 2, progress=False).eval()


def test_relative_error_is_against_the_float_value_and_guards_zeros():
    ref = torch.tensor([2.0, -4.0, 0.0, 1e-6, 10.0])
    test = torch.tensor([3.0, -5.0, 0.5, 1.0, 10.0])
    rel = relative_error(ref, test, guard=1e-3)  # |ref| > 0.01 kept: 2, -4, 10
    assert rel.tolist() == pytest.approx([0.5, 0.25, 0.0])
    s = error_stats("x", ref, test)
    diff = (test - ref).double()
    assert s.mse == pytest.approx(float(diff.square().mean()))
    assert s.sqnr_db == pytest.approx(10 * math.log10(float(ref.double().square().sum() / diff.square().sum())))
    assert s.abs_max == pytest.approx(1.0) and s.rel_mean == pytest.approx(0.25)


def test_known_layer_matches_a_hand_computation(quantized, scenes):
    name = "backbone.body.conv1.act_fq"
    stats, pictures = analyze_layers(quantized, scenes[6:7], [name, "backbone.fpn.layer_blocks.0.0.act_fq"],
                                     keep=[name], chunk=1)
    got = {s.layer: s for s in stats}[name]
    # by hand: the same hook point in the float phase and in the quantized phase
    store = {}
    handle = dict(quantized.named_modules())[name].register_forward_hook(lambda m, a, o: store.setdefault("x", o))
    set_phase(quantized, "float")
    with torch.no_grad():
        quantized(scenes[6:7])
    ref = store.pop("x")
    set_phase(quantized, "quantize")
    with torch.no_grad():
        quantized(scenes[6:7])
    test = store.pop("x")
    handle.remove()
    diff = (test - ref).double()
    assert got.mse == pytest.approx(float(diff.square().mean()), rel=1e-6)
    assert got.sqnr_db == pytest.approx(float(10 * torch.log10(ref.double().square().sum() / diff.square().sum())),
                                        rel=1e-6)
    assert got.numel == ref.numel()
    assert torch.equal(pictures[name].float_max, ref[0].amax(0))  # max over channels of the float activation
    err = (test[0] - ref[0]).abs()
    torch.testing.assert_close(pictures[name].abs_map, err.mean(0))
    # relative error map: mean over channels, only where |float| > 1e-3 * max|float| (by hand, per pixel)
    r = ref[0].abs()
    pixel = (3, 5)
    keep = r[:, pixel[0], pixel[1]] > 1e-3 * r.max()
    expect = (err[:, pixel[0], pixel[1]][keep] / r[:, pixel[0], pixel[1]][keep]).mean() if keep.any() else 0.0
    assert float(pictures[name].rel_map[pixel]) == pytest.approx(float(expect), rel=1e-5)
    assert [s.sqnr_db for s in stats] == sorted(s.sqnr_db for s in stats)  # worst first


@pytest.mark.slow
def test_report_files_and_sensitivity(quantized, scenes, tmp_path):
    points = comparable_points(quantized)
    assert points and not any(p.startswith("roi_heads") for p in points)
    keep = points[:2]
    stats, pictures = analyze_layers(quantized, scenes[6:7], points[:6], keep=keep, chunk=4)
    ranking = layer_sensitivity(quantized, scenes[6:7])
    assert {"layer", "sqnr_db", "cost_db"} <= set(ranking[0])
    assert ranking == sorted(ranking, key=lambda r: r["cost_db"], reverse=True)
    pred = quantized([scenes[6]])[0]
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])}
    out = write_report(tmp_path / "an", stats, pictures, scenes[6], target, pred, ranking)
    for f in ["detections.png", "maps_average.png", "hexbin_all.png", "report.md", "layers.json",
              f"maps_{keep[0].replace('.', '_')}.png", f"hexbin_{keep[1].replace('.', '_')}.png"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    saved = json.loads((out / "layers.json").read_text())
    assert len(saved["layers"]) == 6 and saved["sensitivity"][0]["layer"] == ranking[0]["layer"]
    assert list((out / "tensorboard").glob("events.*"))
    assert "keep_float:" in (out / "report.md").read_text()


def test_analyze_needs_a_quantizing_model(float_detector, scenes):
    model = prepare_qat(float_detector(), QuantConfig())
    with pytest.raises(ValueError, match="calibrated"):
        analyze_layers(model, scenes[:1])


def test_int8_file_of_another_model_is_a_clear_error(quantized, scenes, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["boxes"])], "other",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [3, None, None])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [3, None, None])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="none of this model's quantizers"):
        analyze_layers(quantized, scenes[6:7], comparable_points(quantized)[:2], int8=tmp_path / "other.onnx")
