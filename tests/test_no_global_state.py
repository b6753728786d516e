"""fqn keeps its state in modules: no torch/torchvision/fqn attribute is rebound, and models run side by side."""

from __future__ import annotations

import copy
import sys
import threading

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from fqn import QuantConfig, calibrate, prepare_qat
from fqn.int8.convert import convert_int8, resized_batch
from fqn.models.roi_pool import FastMultiScaleRoIAlign


def _module_attributes() -> dict[tuple[str, str], int]:
    """Identity of every attribute of every loaded torchvision, torch.onnx and fqn module."""
    out = {}
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith(("torchvision", "torch.onnx", "fqn")):
            continue
        for attr, value in list(vars(mod).items()):
            out[(name, attr)] = id(value)
    return out


def _diff(before: dict, after: dict) -> list:
    return sorted(k for k in before.keys() & after.keys() if before[k] != after[k])


@pytest.fixture
def quantized(float_detector, scenes):
    model = prepare_qat(float_detector("resnet18"), QuantConfig(bits_w=4, bits_a=4))
    return calibrate(model, [[s] for s in scenes[:2]], 2, progress=False).eval()


@pytest.mark.slow  # converts a whole detector
def test_no_module_attribute_changes_during_a_forward_or_a_conversion(quantized, scenes, tmp_path):
    before = _module_attributes()
    during: list[dict] = []
    transform_during: list[tuple] = []

    def snapshot(*_):  # inside the forward and inside the export's trace alike
        during.append(_module_attributes())
        transform_during.append((list(quantized.transform.image_mean), list(quantized.transform.image_std)))

    mean, std = list(quantized.transform.image_mean), list(quantized.transform.image_std)
    handle = quantized.roi_heads.box_head.register_forward_hook(snapshot)
    try:
        with torch.no_grad():
            quantized([scenes[0]])
        convert_int8(quantized, tmp_path / "m.onnx", scenes[:1])
        resized_batch(quantized, scenes[1])
    finally:
        handle.remove()
    after = _module_attributes()
    assert len(during) >= 2  # the eager forward and the traced one
    for snap in during:
        assert _diff(before, snap) == []
    assert _diff(before, after) == []
    assert all(t == (mean, std) for t in transform_during)
    assert type(quantized.roi_heads.box_roi_pool) is MultiScaleRoIAlign  # swapped back after the export


def test_float_and_quantized_detectors_run_side_by_side_in_threads(float_detector, quantized, scenes):
    float_model = float_detector("resnet18").eval()
    models = {"float": float_model, "quantized": quantized}
    images = scenes[:4]
    with torch.no_grad():
        expected = {k: [m([img])[0] for img in images] for k, m in models.items()}
    got: dict[str, list] = {k: [] for k in models}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(name: str) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(3):
                    for img in images:
                        got[name].append(models[name]([img])[0])
        except BaseException as err:  # reported below, with the thread's own result
            errors.append(err)

    threads = [threading.Thread(target=run, args=(k,)) for k in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for name in models:
        assert len(got[name]) == 3 * len(images)
        for i, det in enumerate(got[name]):
            ref = expected[name][i % len(images)]
            for key in ("boxes", "scores", "labels"):
                torch.testing.assert_close(det[key], ref[key], rtol=0, atol=0)
    # the two models really differ, so a swapped result would have been caught
    assert any(not torch.equal(a["scores"], b["scores"]) or a["scores"].shape != b["scores"].shape
               for a, b in zip(expected["float"], expected["quantized"]))


def test_pooler_swap_computes_what_torchvision_computes(float_detector, scenes):
    model = float_detector("resnet18").eval()
    with torch.no_grad():
        images, _ = model.transform([scenes[0]])
        feats = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, feats)
        pooler = model.roi_heads.box_roi_pool
        ref = pooler(feats, proposals, images.image_sizes)
        swapped = copy.deepcopy(pooler)
        swapped.__class__ = FastMultiScaleRoIAlign
        got = swapped(feats, proposals, images.image_sizes)
    assert proposals[0].shape[0] > 10
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_input_grids_are_bound_inside_the_model_and_follow_a_deep_copy(quantized):
    from fqn.quant.modules import QuantConv2d

    def bound(model):
        return {n: m._input_grid for n, m in model.named_modules()
                if isinstance(m, QuantConv2d) and getattr(m, "_input_grid", None) is not None}

    original = bound(quantized)
    assert len(original) > 20
    own = {id(m) for m in quantized.modules()}
    assert all(id(fq) in own for fq in original.values())
    copied = copy.deepcopy(quantized)
    names = {id(m): n for n, m in copied.named_modules()}
    for name, fq in bound(copied).items():
        assert id(fq) in names  # a quantizer of the copy, not of the original
        assert names[id(fq)] == {id(m): n for n, m in quantized.named_modules()}[id(original[name])]
    assert not any(k.endswith("_input_grid") for k in quantized.state_dict())
