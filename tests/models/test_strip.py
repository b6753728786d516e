"""strip_quantizers: the inverse of prepare_qat gives torchvision's own float detector back."""

from __future__ import annotations

import pytest
import torch

from fqn import QuantConfig, prepare_qat, strip_quantizers
from fqn.quant.modules import QuantConvBn2d
from fqn.quant.state import quant_config


def _types(model):
    return {n: type(m) for n, m in model.named_modules()}


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
@pytest.mark.parametrize("freeze_bn", [True, False])
def test_prepare_then_strip_is_the_float_model(float_detector, scenes, backbone, freeze_bn):
    float_model = float_detector(backbone)
    prepared = prepare_qat(float_detector(backbone), QuantConfig(bits_w=4, bits_a=4, freeze_bn=freeze_bn))
    back = strip_quantizers(prepared)
    assert _types(back) == _types(float_model)  # torchvision's classes, module for module
    ref, got = float_model.state_dict(), back.state_dict()
    assert sorted(got) == sorted(ref)
    for k in ref:
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        a, b = float_model.eval()(scenes[:2]), back.eval()(scenes[:2])
    for x, y in zip(a, b):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(y[key], x[key], rtol=0, atol=0)
    assert quant_config(prepared) is not None  # not in place by default


def test_stripped_model_holds_the_trained_weights(float_detector, scenes):
    model = prepare_qat(float_detector("resnet18"), QuantConfig(bits_w=8, bits_a=8, freeze_bn=False))
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])}]
    loss = sum(model(scenes[:1], targets).values())
    loss.backward()
    opt.step()
    layer = model.backbone.body.layer1[0].conv1
    assert isinstance(layer, QuantConvBn2d)
    back = strip_quantizers(model)
    block = back.backbone.body.layer1[0]
    torch.testing.assert_close(block.conv1.weight, layer.weight, rtol=0, atol=0)
    torch.testing.assert_close(block.bn1.weight, layer.bn_weight, rtol=0, atol=0)
    torch.testing.assert_close(block.bn1.running_mean, layer.running_mean, rtol=0, atol=0)  # the EMA moved
    assert block.conv1.weight.requires_grad


def test_kept_float_fused_layer_comes_back_equivalent(float_detector, scenes):
    float_model = float_detector("resnet18")
    cfg = QuantConfig(bits_w=4, bits_a=4, keep_float=("backbone.body.layer1.0.conv1",))
    back = strip_quantizers(prepare_qat(float_detector("resnet18"), cfg))
    assert _types(back) == _types(float_model)
    x = torch.rand(1, 64, 32, 32)
    ref_block, got_block = float_model.backbone.body.layer1[0].eval(), back.backbone.body.layer1[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(got_block(x), ref_block(x), rtol=1e-5, atol=1e-5)  # BN folded, then unfolded


def test_strip_refuses_a_float_model(float_detector):
    with pytest.raises(ValueError, match="float model already"):
        strip_quantizers(float_detector("resnet18"))
