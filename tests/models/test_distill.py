"""Distillation from the float detector: each term against a hand computation, gradients to the student only."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fqn import QuantConfig, calibrate, prepare_qat
from fqn.models.distill import DistillConfig, Distiller

from ..conftest import targets_for


def _train_forward(student, scenes, bn_eval: bool = False):
    student.train()
    for m in student.modules():  # BN in eval, like the frozen teacher: then a copy computes the same features
        if bn_eval and isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    torch.manual_seed(0)
    return student(scenes[:2], targets_for([2, 1]))


def test_identical_student_gives_zero_fpn_and_cls_and_the_teachers_entropy_for_rpn(float_detector, scenes):
    teacher = float_detector("resnet18")
    student = copy.deepcopy(teacher)
    distiller = Distiller(teacher, student, DistillConfig(temperature=3.0))
    _train_forward(student, scenes, bn_eval=True)
    recorded = dict(distiller._seen)
    kd = distiller.losses()
    assert set(kd) == {"distill/fpn", "distill/rpn", "distill/cls"}
    assert float(kd["distill/fpn"]) < 1e-10 and abs(float(kd["distill/cls"])) < 1e-6
    # soft-target BCE of equal logits is the binary entropy of the teacher's probabilities, level by level
    entropies = []
    for logits in recorded["objectness"]:
        p = torch.sigmoid(logits.detach())
        entropies.append(-(p * torch.log(p) + (1 - p) * torch.log1p(-p)).mean())
    assert float(kd["distill/rpn"]) == pytest.approx(float(torch.stack(entropies).mean()), rel=1e-4)


def test_quantized_student_gets_gradients_the_teacher_none(float_detector, scenes):
    teacher = float_detector("resnet18")
    student = prepare_qat(copy.deepcopy(teacher), QuantConfig(bits_w=4, bits_a=4))
    calibrate(student, [scenes[:2]], 1, progress=False)
    distiller = Distiller(teacher, student, DistillConfig(fpn=1.0, rpn=0.5, cls=2.0))
    losses = _train_forward(student, scenes)
    kd = distiller.losses()
    assert all(float(v) > 0 for v in kd.values())
    sum(kd.values()).backward()
    grad = student.backbone.body.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert not list(distiller.state_dict())  # the teacher is not saved with the student
    assert set(losses) >= {"loss_classifier", "loss_objectness"}
    # the fpn term is the per-level relative MSE, computed here from the teacher and the recorded features
    _train_forward(student, scenes)
    seen = dict(distiller._seen)
    with torch.no_grad():
        t = distiller.teacher.backbone(seen["images"])
        expected = torch.stack([F.mse_loss(seen["features"][k], v) / v.pow(2).mean() for k, v in t.items()]).mean()
    assert float(distiller.losses()["distill/fpn"]) == pytest.approx(float(expected), rel=1e-5)


def test_evaluation_is_not_recorded_and_losses_need_a_forward(float_detector, scenes):
    teacher = float_detector("resnet18")
    student = copy.deepcopy(teacher).eval()
    distiller = Distiller(teacher, student, DistillConfig())
    with torch.no_grad():
        student(scenes[:1])
    with pytest.raises(RuntimeError, match="training forward"):
        distiller.losses()
    distiller.remove()
    _train_forward(student, scenes)
    with pytest.raises(RuntimeError, match="training forward"):
        distiller.losses()


@pytest.mark.parametrize("bad", [{"fpn": -1.0}, {"temperature": 0.0}, {"cls": "x"},
                                 {"fpn": 0.0, "rpn": 0.0, "cls": 0.0}])
def test_bad_distill_settings_are_refused(bad):
    with pytest.raises(ValueError, match="distill"):
        DistillConfig(**bad)


@pytest.mark.slow  # trains
def test_trainer_adds_the_distillation_losses(tmp_path):
    from ..train.tiny import tiny_data, tiny_module, tiny_trainer

    float_module = tiny_module()
    ckpt = tmp_path / "float.ckpt"
    torch.save({"state_dict": float_module.state_dict(), "hyper_parameters": dict(float_module.hparams)}, ckpt)
    module = tiny_module(quant=QuantConfig(bits_w=4, bits_a=4, n_cal=1), init_from=str(ckpt), ptq_eval=False,
                         distill={"fpn": 1.0, "rpn": 1.0, "cls": 1.0, "temperature": 2.0})
    logged = {}
    module.log_dict = lambda d, **kw: logged.update(d)
    tiny_trainer(str(tmp_path), max_steps=1, limit_val_batches=0).fit(module, datamodule=tiny_data())
    assert {"train/distill/fpn", "train/distill/rpn", "train/distill/cls"} <= set(logged)
    assert module.hparams["distill"]["temperature"] == 2.0
    with pytest.raises(ValueError, match="quantized student"):
        tiny_module(distill={"fpn": 1.0})
