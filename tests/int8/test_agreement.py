"""End to end on a trained model: the int8 file finds the boxes the fake-quant model finds, in both runtimes.

A tiny R18-FPN is trained briefly by the Lightning trainer on a few synthetic scenes with large objects (so that a
minute of training finds them), post-training quantized at 8 and at 4 bits, converted with `convert_int8` and run by
ONNX Runtime and by OpenVINO (`load_int8(path, runtime=...)`) on 16 scenes (8 it was trained on, 8 it has not
seen). On most images the best detections of each model must have a counterpart among the other's (IoU >= 0.5, same
label); at 4 bits the detections are the same to rounding.
"""

from __future__ import annotations

import time

import pytest
import torch
from torchvision.ops import box_iou

from fqn import QuantConfig
from fqn.data.synthetic import SyntheticConfig
from fqn.int8.convert import convert_int8, load_int8
from fqn.ptq import post_training_quantize
from tests.devices import cpu_has_vnni

from ..train.tiny import TORCHVISION_WIDTH, tiny_data, tiny_module, tiny_trainer

pytestmark = pytest.mark.slow  # end to end: the fast tier (-m 'not slow') leaves it out

SIZE = 64
SCENES = SyntheticConfig(image_size=SIZE, num_classes=2, min_objects=1, max_objects=3, min_size=SIZE // 4,
                         max_size=2 * SIZE // 3, clutter=1)
FLOAT_STEPS = 45
TOP = 5  # each model's best detections that must have a counterpart; the counterpart may rank lower (score jitter)


def _data(num_val: int = 2):
    return tiny_data(synthetic=SCENES, num_train=8, num_val=num_val, augment=False, batch_size=2)


def _module(**kw):  # torchvision's widths: the numbers below were measured on them
    return tiny_module(num_classes=3, min_size=SIZE, max_size=SIZE, detector=TORCHVISION_WIDTH, **kw)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: two threads on two busy cores run a training step ~10x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(one_thread, tmp_path_factory):
    """(float checkpoint, 16 scenes): 45 SGD steps on 8 scenes (float AP50 0.18 on them, measured); the scenes are
    those 8 and 8 it has not seen."""
    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    start = time.perf_counter()
    trainer = tiny_trainer(str(root), max_steps=FLOAT_STEPS, limit_val_batches=0)
    trainer.fit(_module(warmup_steps=5), _data())
    path = root / "float.ckpt"
    trainer.save_checkpoint(path)
    data = _data(num_val=8)
    data.setup("fit")
    scenes = [data.train_dataset[i][0] for i in range(8)] + [data.val_dataset[i][0] for i in range(8)]
    print(f"float training: {time.perf_counter() - start:.1f} s")
    return path, scenes


def quantized(bits: int, float_ckpt):
    """The trained float model, post-training quantized at ``bits`` (weights and activations) on 4 batches."""
    model = _module(init_from=str(float_ckpt)).model
    cfg = QuantConfig(bits_w=bits, bits_a=bits, n_cal=4)
    return post_training_quantize(model, _data().calibration_batches(4), cfg, progress=False)


def matched(a: dict, b: dict) -> torch.Tensor:
    """For each detection of ``a``: whether ``b`` has one of the same label at IoU >= 0.5."""
    if len(a["boxes"]) == 0 or len(b["boxes"]) == 0:
        return torch.zeros(len(a["boxes"]), dtype=torch.bool)
    iou = box_iou(a["boxes"], b["boxes"])
    return ((iou >= 0.5) & (a["labels"][:, None] == b["labels"][None, :])).any(dim=1)


def best(d: dict, k: int = TOP) -> dict:
    order = torch.argsort(d["scores"], descending=True)[:k]
    return {key: value[order] for key, value in d.items()}


def agrees(fake: dict, int8: dict) -> bool:
    """Each model's ``TOP`` best detections have a counterpart among all of the other's detections."""
    return bool(matched(best(fake), int8).all()) and bool(matched(best(int8), fake).all())


def identical(a: dict, b: dict) -> bool:
    """The same detections: same count and labels, scores within 1e-4, boxes within 1e-2 px."""
    return (len(a["boxes"]) == len(b["boxes"]) and torch.equal(a["labels"], b["labels"])
            and torch.allclose(a["scores"], b["scores"], atol=1e-4)
            and torch.allclose(a["boxes"], b["boxes"], atol=1e-2))


# Measured on the 16 scenes (seed 0, one thread; torch 2.14, onnxruntime 1.32, x86 CPU): the fake-quant model detects
# something on 16 of 16 at both bit-widths; the best 5 agree on 16 of 16 images at 8 and at 4 bits; identical
# detections on 9 of 16 at 8 bits (one-step rounding differences move some scores) and 16 of 16 at 4 bits.
# Seed 1 gave 14 / 16 agreeing at 8 bits. The bars are a notch below. (Seed 2 gives a model where a residual add's
# input scale is 1.5000001 times its output scale: ORT's QLinearAdd and the fake-quant add round those near-ties
# differently on 6% of the elements, and at 4 bits only 4 of 16 images agree.)
# OpenVINO 2026.4, same file: at 4 bits the best 5 agree on 16 of 16 images, 15 identical (its kernels compute the
# codes exactly once the input shape is fixed, see `OpenVinoSession`, and the exported top-k orders ties by index);
# at 8 bits 11 of 16 agree, none identical: its fused 8-bit requantization is not bit-exact (90% of a ResNet
# block's output codes equal, the rest within 3 steps), which moves scores; on the trained synthetic model (README)
# its AP is 0.0013 below the fake-quant AP, ONNX Runtime's 0.0005 above.
# On an AVX2-only AMD EPYC (no VNNI) the 45-step float model trains differently (other kernels, other rounding): the
# 8-bit model detects on 9 of 16 scenes; ONNX Runtime (exact mode, see fqn.int8.runtime.EXACT_INT8_ON_AVX2) agrees on
# 16 of 16, 11 identical; OpenVINO's 8-bit kernels saturate there (9 of 16, the empty scenes); at 4 bits 15 of 16 agree.
MIN_DETECTING = 8
MIN_AGREE = {"onnxruntime": {8: 14, 4: 15}, "openvino": {8: 9 if cpu_has_vnni() else 0, 4: 15}}
MIN_IDENTICAL = {"onnxruntime": {8: 7, 4: 15}, "openvino": {8: 0, 4: 13}}
RUNTIMES = ("onnxruntime", "openvino")


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_detections_match_the_fake_quant_ones(bits, trained, tmp_path):
    """The same file, in ONNX Runtime and in OpenVINO, opened as a deployer opens it."""
    float_ckpt, scenes = trained
    start = time.perf_counter()
    model = quantized(bits, float_ckpt)
    path = convert_int8(model, tmp_path / f"w{bits}.onnx", scenes[:1])
    with torch.no_grad():
        fake = model(scenes)
    assert sum(len(d["boxes"]) > 0 for d in fake) >= MIN_DETECTING  # the model detects: the test is not vacuous
    for runtime in RUNTIMES:
        int8 = load_int8(path, threads=1, runtime=runtime)(scenes)
        agreeing = [agrees(f, i) for f, i in zip(fake, int8)]
        same = [identical(f, i) for f, i in zip(fake, int8)]
        print(f"w{bits}a{bits} {runtime}: best {TOP} agree on {sum(agreeing)} of {len(scenes)} images, {sum(same)} "
              f"identical; fake-quant detections per image {[len(d['boxes']) for d in fake]}; "
              f"{time.perf_counter() - start:.1f} s")
        assert sum(agreeing) >= MIN_AGREE[runtime][bits], (runtime, agreeing)
        assert sum(same) >= MIN_IDENTICAL[runtime][bits], (runtime, same)


def test_agreement_rule():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    det = {"boxes": box, "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}
    weak = {"boxes": box + 1, "labels": torch.tensor([1]), "scores": torch.tensor([0.2])}  # IoU 0.68, lower score
    other = {"boxes": box, "labels": torch.tensor([2]), "scores": torch.tensor([0.9])}
    none = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    assert agrees(det, weak) and not agrees(det, other) and not agrees(det, none) and agrees(none, none)
    many = {k: torch.cat([det[k]] * TOP + [other[k]]) for k in det}  # the 6th best (label 2) is beyond TOP
    many["scores"][-1] = 0.1
    assert agrees(many, det) and not identical(many, det) and identical(det, dict(det))
