"""Each fact about a quantized model has one owner: flags, learned ranges, the config, the input grids.

The quantizer's phase, an observer's "has data" and a conv+BN's frozen statistics are Python booleans saved
with the state dict (`fqn.quant.flags`); a learned range is its parameters alone; the QuantConfig lives in
the model's `QuantState`; modes are saved and restored by one context (`quantizer_modes`); a layer bound to
a quantizer that left the model is an error, not a silently stale grid; the export leaves the caller's
modules' classes alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fqn import QuantConfig, build_detector, calibrate, prepare_qat
from fqn.int8.convert import check_quantized, export_form
from fqn.models.roi_pool import FastMultiScaleRoIAlign
from fqn.quant.fake_quant import FakeQuantize, LearnedFakeQuantize, Phase, phase_of, quantizer_modes, quantizers
from fqn.quant.modules import QuantConvBn2d
from fqn.quant.observers import MinMaxObserver, PercentileObserver
from fqn.quant.state import QuantState, quant_config


def _detector(cfg: QuantConfig) -> nn.Module:
    torch.manual_seed(0)
    model = prepare_qat(build_detector("resnet18", 3, min_size=64, max_size=64), cfg)
    return calibrate(model, [[torch.rand(3, 64, 64)]], 1, progress=False)


def test_flags_are_saved_and_loaded_with_the_state_dict():
    fq = FakeQuantize(MinMaxObserver(), 8)
    fq(torch.randn(10))
    fq.update_qparams()
    fq.enable_observer(False)
    fq.enable_fake_quant(True)
    fresh = FakeQuantize(MinMaxObserver(), 8)
    assert (fresh.observing, fresh.quantizing, fresh.is_calibrated, fresh.observer.has_data) == (True, False,
                                                                                                False, False)
    fresh.load_state_dict(fq.state_dict())
    assert (fresh.observing, fresh.quantizing, fresh.is_calibrated, fresh.observer.has_data) == (False, True,
                                                                                                True, True)
    assert torch.equal(fresh.scale, fq.scale) and torch.equal(fresh.zero_point, fq.zero_point)


def test_checkpoints_with_flag_buffers_still_load():
    """The state dict as fqn wrote it when the flags were uint8 buffers (and observers counted their calls)."""
    fq = FakeQuantize(MinMaxObserver(), 8)
    old = {"scale": torch.tensor([0.5]), "zero_point": torch.tensor([3], dtype=torch.int32),
           "observer_enabled": torch.tensor(0, dtype=torch.uint8),
           "fake_quant_enabled": torch.tensor(1, dtype=torch.uint8), "calibrated": torch.tensor(1, dtype=torch.uint8),
           "observer.num_seen": torch.tensor(7), "observer.min_val": torch.tensor([-1.0]),
           "observer.max_val": torch.tensor([2.0])}
    fq.load_state_dict(old)
    assert (fq.observing, fq.quantizing, fq.is_calibrated, fq.observer.has_data) == (False, True, True, True)
    assert float(fq.scale) == 0.5 and int(fq.zero_point) == 3
    learned = LearnedFakeQuantize(PercentileObserver(), 4)
    state = {k: v for k, v in learned.state_dict().items() if k != "_extra_state"}
    state.update(scale=torch.tensor([9.0]), zero_point=torch.tensor([9], dtype=torch.int32),
                 observer_enabled=torch.tensor(0, dtype=torch.uint8), calibrated=torch.tensor(1, dtype=torch.uint8),
                 fake_quant_enabled=torch.tensor(1, dtype=torch.uint8))
    state["lsq_scale"] = torch.tensor([0.25])
    state["lsq_zero_point"] = torch.tensor([2.4])
    learned.load_state_dict(state)  # the old derived copy is dropped: the parameters are the range
    assert float(learned.scale) == 0.25 and int(learned.zero_point) == 2


def test_a_learned_range_is_its_parameters():
    fq = LearnedFakeQuantize(PercentileObserver(), 4)
    assert "scale" not in dict(fq.named_buffers()) and "zero_point" not in dict(fq.named_buffers())
    with torch.no_grad():
        fq.lsq_scale.fill_(0.125)
        fq.lsq_zero_point.fill_(20.6)  # beyond qmax: the stored zero point is clamped
    assert float(fq.scale) == 0.125 and int(fq.zero_point) == fq.qmax == 15
    assert not fq.scale.requires_grad


def test_bn_frozen_is_saved():
    model = _detector(QuantConfig(bits_w=8, bits_a=8, freeze_bn=False))
    layer = next(m for m in model.modules() if isinstance(m, QuantConvBn2d))
    assert not layer.bn_frozen
    layer.freeze_bn()
    restored = prepare_qat(build_detector("resnet18", 3, min_size=64, max_size=64),
                           QuantConfig(bits_w=8, bits_a=8, freeze_bn=False))
    restored.load_state_dict(model.state_dict())
    name = next(n for n, m in model.named_modules() if m is layer)
    assert dict(restored.named_modules())[name].bn_frozen


def test_the_config_is_saved_once_with_the_weights():
    cfg = QuantConfig(bits_w=4, bits_a=4, learn_ranges=True, keep_float=("roi_heads.box_predictor.*",))
    model = _detector(cfg)
    assert quant_config(model) == cfg
    state = model.state_dict()
    assert QuantState.read(state)["config"] == cfg.to_dict()
    assert QuantState.read(build_detector("resnet18", 3).state_dict()) is None
    # a model prepared with other settings takes the saved ones along with the weights
    other = prepare_qat(build_detector("resnet18", 3, min_size=64, max_size=64), cfg)
    other.fqn_state.config = QuantConfig()
    other.load_state_dict(state)
    assert quant_config(other) == cfg


def test_quantizer_modes_restores_mixed_modes_exactly():
    model = _detector(QuantConfig(bits_w=8, bits_a=8))
    qs = quantizers(model)
    qs[3][1].enable_fake_quant(False)  # a mixed model: one quantizer kept off
    before = [(q.observing, q.quantizing, q.export_mode) for _, q in qs]
    with phase_of(model, Phase.OBSERVE):
        assert all(not q.quantizing for _, q in qs)
    with quantizer_modes(model) as inside:
        for _, q in inside:
            q.enable_observer(True)
            q.set_export_mode(lambda *a: a[0])
    assert [(q.observing, q.quantizing, q.export_mode) for _, q in qs] == before


def test_a_layer_bound_to_a_replaced_quantizer_is_an_error():
    model = _detector(QuantConfig(bits_w=8, bits_a=8))
    check_quantized(model)
    # a copied block: its first conv is bound to a copy of the quantizer upstream, which is not in the model
    model.backbone.body.layer1[1] = copy.deepcopy(model.backbone.body.layer1[1])
    with pytest.raises(RuntimeError, match=r"backbone\.body\.layer1\.1\.conv1 is bound to an input quantizer"):
        check_quantized(model)
    with pytest.raises(RuntimeError, match="no longer in the model"):
        calibrate(model, [[torch.rand(3, 64, 64)]], 1, progress=False)


def test_the_export_form_leaves_the_callers_modules_as_they_are():
    from torchvision.ops import MultiScaleRoIAlign

    model = build_detector("resnet18", 3, min_size=64, max_size=64)
    assert type(model.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    form = export_form(model)
    assert type(model.roi_heads.box_roi_pool) is MultiScaleRoIAlign  # the caller's pooler: unchanged
    assert type(form.roi_heads.box_roi_pool) is FastMultiScaleRoIAlign
    assert form.backbone is model.backbone and form.roi_heads.box_head is model.roi_heads.box_head
    model.eval()
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        a, b = model(images), form.eval()(images)
    assert torch.equal(a[0]["boxes"], b[0]["boxes"])


@pytest.mark.slow
def test_a_learned_range_exports_as_the_fixed_range_of_its_values(tmp_path):
    """The int8 file of a model with learned ranges is the file of a fixed-range model holding those values."""
    import onnx

    from fqn.int8.convert import convert_int8

    learned = _detector(QuantConfig(bits_w=4, bits_a=4, learn_ranges=True))
    with torch.no_grad():
        for _, fq in quantizers(learned, "act"):
            fq.lsq_scale.mul_(1.1)
            fq.lsq_zero_point.add_(0.6)
    fixed = _detector(QuantConfig(bits_w=4, bits_a=4))
    skip = ("lsq_scale", "lsq_zero_point", "fqn_state._extra_state")  # the learned ranges; the config says L
    fixed.load_state_dict({k: v for k, v in learned.state_dict().items() if not k.endswith(skip)}, strict=False)
    for (_, a), (_, b) in zip(quantizers(learned, "act"), quantizers(fixed, "act")):
        b.scale.copy_(a.scale)
        b.zero_point.copy_(a.zero_point)
    image = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))]
    files = [convert_int8(m, tmp_path / f"{i}.onnx", image) for i, m in enumerate((learned, fixed))]
    graphs = [onnx.load(str(f)).graph for f in files]
    assert [n.op_type for n in graphs[0].node] == [n.op_type for n in graphs[1].node]
    codes = [{t.name: onnx.numpy_helper.to_array(t).tobytes() for t in g.initializer} for g in graphs]
    assert codes[0] == codes[1]
    # the caller's model still learns: its quantizers kept their class and parameters
    assert all(type(fq) is LearnedFakeQuantize and fq.lsq_scale.requires_grad for _, fq in quantizers(learned, "act"))
