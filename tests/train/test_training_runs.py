"""The Lightning trainer on tiny real models: float and QAT fits, their checkpoints, every training precision.

End to end, a few steps each (R18-FPN at 96 px, tests/train/tiny.py). The module's checks without training are
in test_trainer.py; the kill-and-resume and CLI resume runs in test_resume.py.
"""

from __future__ import annotations

import pytest
import torch

from fqn import QuantConfig
from fqn.evaluation import MAP_COLUMNS, evaluate_map
from fqn.models.checkpoint import load_detector
from fqn.quant.fake_quant import current_phase, quantizers
from fqn.quant.modules import QuantConvBn2d
from fqn.quant.qparams import EPS, calc_qparams
from fqn.quant.state import QuantState, quant_config
from fqn.train.module import DetectionModule

from ..devices import needs_cuda
from ..test_evaluation import cocoeval_stats
from .tiny import tiny_data, tiny_module, tiny_trainer

pytestmark = pytest.mark.slow  # end to end: every test trains; the fast tier (-m 'not slow') leaves them out


def test_float_fast_dev_run_logs_the_map_of_what_it_trained(tmp_path):
    """One step, one validation batch: `val/*` is pycocotools' COCOeval of the trained model's detections on that
    batch (the logging across several batches, with an AP away from 0: test_trainer.py)."""
    model, data = tiny_module(), tiny_data()
    trainer = tiny_trainer(str(tmp_path), fast_dev_run=1)
    trainer.fit(model, data)
    assert trainer.global_step == 1
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    images, targets = next(iter(data.val_dataloader()))
    model.eval()
    with torch.no_grad():
        preds = model.model(list(images))
    assert sum(len(p["boxes"]) for p in preds) > 0
    expected = dict(zip(MAP_COLUMNS.values(), cocoeval_stats(list(targets), preds)))
    assert logged["val/mAP"] == pytest.approx(expected["AP"], abs=1e-6)
    assert {k: logged[f"val/{k}"] for k in expected} == pytest.approx(expected, abs=1e-6)


def test_a_second_data_seed_trains_and_is_logged(tmp_path):
    """A second seed of a run varies the data's shuffle, augmentation and calibration batches (`data.seed`):
    with a logger, Lightning merges the data's and the model's hyper-parameters and refuses a key both hold
    with different values, which the model's own RoI-sampling `seed` once was."""
    import yaml
    from pytorch_lightning.loggers import TensorBoardLogger

    trainer = tiny_trainer(str(tmp_path), max_steps=1, limit_val_batches=0,
                           logger=TensorBoardLogger(str(tmp_path), name="run", version=0))
    trainer.fit(tiny_module(seed=0, quant=QuantConfig(bits_w=4, bits_a=8, n_cal=1)), tiny_data(data_seed=1))
    assert trainer.global_step == 1
    logged = yaml.safe_load((tmp_path / "run" / "version_0" / "hparams.yaml").read_text())
    assert logged["data_seed"] == 1 and logged["seed"] == 0
    # the settings a reader of the logs compares runs by, also those the constructors complete
    assert logged["quant"]["bits_w"] == 4 and logged["quant"]["bits_a"] == 8 and logged["frozen_bn"] is False
    assert logged["synthetic"]["num_classes"] == 3


def test_qat_4bit_calibrates_logs_ptq_and_trains(float_ckpt, tmp_path):
    cfg = QuantConfig(bits_w=4, bits_a=4, n_cal=2)
    model = tiny_module(quant=cfg, init_from=str(float_ckpt))
    trainer = tiny_trainer(str(tmp_path), max_steps=2, val_check_interval=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit(model, tiny_data())
    assert model.ptq_metrics is not None and set(model.ptq_metrics) >= {"AP", "AP50", "AP75", "AR100"}
    assert all(fq.is_calibrated for _, fq in quantizers(model.model, "act"))
    assert current_phase(model.model) == "quantize"  # P: ranges fixed after calibration
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > 10
    assert "val/AP50" in trainer.callback_metrics


def test_learned_ranges_train_at_their_own_learning_rate_without_decay(float_ckpt, tmp_path):
    """With AdamW too (`optimizer: adamw`): the same groups, decoupled weight decay, the scaled LR."""
    cfg = QuantConfig(bits_w=4, bits_a=4, n_cal=2, learn_ranges=True)
    model = tiny_module(quant=cfg, init_from=str(float_ckpt), ptq_eval=False, range_lr_scale=50.0,
                        optimizer="adamw", lr=0.004, warmup_steps=0)
    trainer = tiny_trainer(str(tmp_path), max_steps=2, limit_val_batches=0)
    data = tiny_data()
    trainer.fit(model, data)
    opt = trainer.optimizers[0]
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True  # one kernel for all parameters
    weights, ranges = opt.param_groups
    assert weights["lr"] == pytest.approx(0.004 * data.batch_size / model.hparams.base_batch_size)
    assert ranges["lr"] == pytest.approx(50.0 * weights["lr"]) and ranges["weight_decay"] == 0.0
    assert weights["weight_decay"] > 0
    lsq = {id(p) for n, p in model.named_parameters() if ".lsq_" in n}
    assert {id(p) for p in ranges["params"]} == lsq and not lsq & {id(p) for p in weights["params"]}
    # two steps at 50x the LR moved most ranges off their calibrated values (the observers still hold the
    # calibration statistics); what conversion reads is the learned range itself
    acts = [fq for _, fq in quantizers(model.model, "act")]
    calibrated = [calc_qparams(*fq.observer.compute_range(), fq.bits, False)[0] for fq in acts]
    assert sum(not torch.equal(fq.lsq_scale.detach(), c) for fq, c in zip(acts, calibrated)) > len(acts) // 2
    assert all(torch.equal(fq.scale, fq.lsq_scale.detach().clamp_min(EPS)) for fq in acts)


def test_qat_without_p_updates_ema_in_training_and_not_in_validation(float_ckpt, tmp_path):
    cfg = QuantConfig(bits_w=8, bits_a=8, n_cal=1, percentile=False, freeze_bn=False)
    model = tiny_module(quant=cfg, init_from=str(float_ckpt))
    assert any(isinstance(m, QuantConvBn2d) for m in model.modules())
    trainer = tiny_trainer(str(tmp_path), max_steps=2, limit_val_batches=0)
    trainer.fit(model, tiny_data())
    assert current_phase(model.model) == "observe_quantize"  # [17]: EMA ranges keep moving while fine-tuning
    # evaluating outside the trainer must not move them either (they are what the int8 file gets)
    scales = {n: fq.scale.clone() for n, fq in quantizers(model.model, "act")}
    data = tiny_data()
    data.setup("validate")
    evaluate_map(model.model, data.val_dataloader(), progress=False)
    assert current_phase(model.model) == "observe_quantize"
    assert all(torch.equal(fq.scale, scales[n]) for n, fq in quantizers(model.model, "act"))
    # and a checkpoint loaded for inference comes back with the ranges fixed
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    loaded, _ = load_detector(tmp_path / "ema.ckpt")
    assert current_phase(loaded) == "quantize"
    assert all(torch.equal(fq.scale, scales[n]) for n, fq in quantizers(loaded, "act"))


def test_checkpoint_alone_rebuilds_the_quantized_model(float_ckpt, tmp_path):
    cfg = QuantConfig(bits_w=4, bits_a=4, n_cal=2)
    model = tiny_module(quant=cfg, init_from=str(float_ckpt))
    trainer = tiny_trainer(str(tmp_path), max_steps=1, limit_val_batches=0)
    trainer.fit(model, tiny_data())
    path = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # loadable without unpickling code
    assert QuantState.read(raw["state_dict"], "model.")["config"] == cfg.to_dict()  # saved once, with the weights
    rebuilt = DetectionModule.load_from_checkpoint(path, init_from=None)
    assert rebuilt.qcfg == cfg
    images = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        a, b = model.model(images), rebuilt.model(images)
    for x, y in zip(a, b):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"])


def test_float_reference_is_the_model_a_qat_run_started_from(float_ckpt, tmp_path):
    """`fqn compare` without --float: the init_from checkpoint (trainer .ckpt or plain state dict), or an error."""
    from fqn.models.checkpoint import load_float_reference

    float_model, _ = load_detector(float_ckpt)
    plain = tmp_path / "float.pth"
    torch.save(float_model.state_dict(), plain)
    for i, source in enumerate((float_ckpt, plain)):
        model = tiny_module(quant=QuantConfig(n_cal=1), init_from=str(source))
        assert model.hparams.frozen_bn is False  # trained from scratch: BatchNorm2d, read off the source
        trainer = tiny_trainer(str(tmp_path / str(i)), max_steps=1, limit_val_batches=0)
        trainer.fit(model, tiny_data())
        trainer.save_checkpoint(tmp_path / f"qat{i}.ckpt")
        ref, _ = load_float_reference(tmp_path / f"qat{i}.ckpt")
        assert quant_config(ref) is None
        for (name, a), b in zip(float_model.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), name
    plain.unlink()
    with pytest.raises(FileNotFoundError, match="--float"):
        load_float_reference(tmp_path / "qat1.ckpt")
    with pytest.raises(ValueError, match="float checkpoint"):
        load_float_reference(float_ckpt)


def _qat_precisions():
    """CPU: bf16-mixed (32-true is every other test here). CUDA: the three precisions Lightning offers, 8 and 4 bits."""
    cases = [pytest.param("cpu", "bf16-mixed", 4, id="cpu-bf16-mixed-w4")]
    for precision in ("32-true", "16-mixed", "bf16-mixed"):
        cases += [pytest.param("cuda", precision, bits, marks=needs_cuda, id=f"cuda-{precision}-w{bits}")
                  for bits in (8, 4)]
    return cases


@pytest.mark.parametrize("device, precision, bits", _qat_precisions())
def test_qat_trains_at_each_precision_and_its_checkpoint_converts_on_a_cpu(device, precision, bits, float_ckpt,
                                                                            tmp_path):
    """QAT under autocast (fake quantization runs in float32 whatever the activations' dtype): finite losses,
    activation ranges those of a float32 CPU calibration of the same batches, and a checkpoint that loads on
    a CPU and converts to an int8 file that runs."""
    from fqn.int8.convert import convert_int8, load_int8
    from fqn.quant import calibrate

    cfg = QuantConfig(bits_w=bits, bits_a=bits, n_cal=2)
    model, data = tiny_module(init_from=str(float_ckpt), quant=cfg, ptq_eval=False), tiny_data()
    trainer = tiny_trainer(str(tmp_path), max_steps=2, limit_val_batches=0, accelerator=device,
                           precision=precision)
    trainer.fit(model, data)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    ckpt = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(ckpt)
    ref = tiny_module(init_from=str(float_ckpt), quant=cfg).model  # the same calibration, float32, on the CPU
    calibrate(ref, tiny_data().calibration_batches(2), 2, progress=False)
    loaded, _ = load_detector(ckpt)  # on the CPU, wherever it was trained
    got = dict(quantizers(loaded, "act"))
    for name, fq in quantizers(ref, "act"):  # P: fixed after calibration, so training did not move them
        assert torch.allclose(got[name].scale, fq.scale, rtol=1e-5), name
        assert torch.equal(got[name].zero_point, fq.zero_point), name
    image = tiny_data().calibration_batches(1)[0][0][:1]
    path = convert_int8(loaded, tmp_path / "qat.onnx", image)
    detections = load_int8(path, threads=1)(image)
    assert len(detections) == 1 and detections[0]["boxes"].shape[1] == 4


def test_mixed_precision_training_clips_gradients_with_an_unfused_optimizer(tmp_path):
    """`precision: bf16-mixed` (CPU here; 16-mixed on a GPU) with gradient clipping, as the configs set it: the
    fused optimizer kernels would make Lightning refuse to clip, so mixed precision gets the unfused ones."""
    model = tiny_module(optimizer="adamw")
    trainer = tiny_trainer(str(tmp_path), max_steps=1, limit_val_batches=0, precision="bf16-mixed",
                           gradient_clip_val=1.0)
    trainer.fit(model, tiny_data())
    assert trainer.global_step == 1 and not trainer.optimizers[0].defaults["fused"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
