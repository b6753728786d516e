"""Learned rounding survives conversion: every quantized layer's integer codes in the int8 file are the codes the
reconstruction chose, not the nearest rounding of the float weights; the units cover every layer once."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fqn.int8 import convert_int8
from fqn.models.reconstruct import BOX_UNIT, units
from fqn.ptq import post_training_quantize, ptq_config, ranges_summary
from fqn.quant.reconstruction import ReconstructionConfig, quantized_layers, weight_codes
from fqn.quant.state import quant_state

pytestmark = pytest.mark.slow  # whole detectors, reconstructed and converted


def _codes(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {n: weight_codes(m).numpy().astype(np.int64) for n, m in model.named_modules()
            if getattr(m, "weight_fq", None) is not None}


@pytest.fixture(scope="module")
def reconstructed(_float_detectors, scenes):
    float_model = copy.deepcopy(_float_detectors["resnet18"])
    batches = [[s] for s in scenes[:3]]
    cfg = ptq_config(4, n_cal=3, layer_bits={"rpn.head.*": 8})  # mixed precision: the RPN head at 8 bits
    before = {k: v.clone() for k, v in float_model.state_dict().items()}
    nearest = post_training_quantize(float_model, batches, cfg, progress=False)
    # a large learning rate so that two steps move many codes off nearest rounding
    rcfg = ReconstructionConfig("qdrop", iters=2, lr=0.5)
    learned = post_training_quantize(float_model, batches, cfg, reconstruction=rcfg, progress=False)
    assert all(torch.equal(before[k], v) for k, v in float_model.state_dict().items())  # the float model untouched
    return nearest, learned, batches, rcfg


def test_units_cover_every_quantized_layer_once_in_run_order(reconstructed, scenes):
    nearest, *_ = reconstructed
    found = units(nearest, [scenes[0]])
    names = [n for n, _ in found]
    assert names[0] == "backbone.body.conv1" and names[-1] == BOX_UNIT
    assert names.index("backbone.body.layer4.1") < names.index("backbone.fpn") < names.index("rpn.head")
    covered = []
    for name in names:
        unit = (nearest.roi_heads if name == BOX_UNIT else nearest.get_submodule(name))
        covered += [id(m) for m in quantized_layers(unit)]
    every = [id(m) for m in quantized_layers(nearest)]
    assert sorted(covered) == sorted(every)  # each layer in exactly one unit


def test_int8_file_stores_the_learned_codes(reconstructed, scenes, tmp_path):
    nearest, learned, _, rcfg = reconstructed
    record = quant_state(learned).ptq["reconstruction"]
    assert record["reconstruction"] == "qdrop" and record["iters"] == rcfg.iters and record["calibration_images"] == 3
    assert "qdrop (2 iterations)" in ranges_summary(learned)
    learned_codes, nearest_codes = _codes(learned), _codes(nearest)
    moved = [n for n in learned_codes if not np.array_equal(learned_codes[n], nearest_codes[n])]
    assert len(moved) > len(learned_codes) // 2  # the test can tell learned from nearest codes
    path = convert_int8(learned, tmp_path / "w4.onnx", scenes[:1])
    stored = [numpy_helper.to_array(i).astype(np.int64) for i in onnx.load(str(path)).graph.initializer
              if i.data_type == onnx.TensorProto.INT8]
    assert max(np.abs(c).max() for n, c in learned_codes.items() if n.startswith("rpn.head")) > 8  # 8-bit codes
    assert max(np.abs(c).max() for n, c in learned_codes.items() if n.startswith("backbone")) <= 8  # 4-bit codes
    for name, codes in learned_codes.items():
        assert any(s.shape == codes.shape and np.array_equal(s, codes) for s in stored), name
    for name in moved:  # and not the float weights rounded to nearest again
        assert not any(s.shape == nearest_codes[name].shape and np.array_equal(s, nearest_codes[name])
                       for s in stored), name
