"""QuantMonitor: a real tiny detector fine-tuned for two steps, its TensorBoard events read back and checked."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from fqn import QuantConfig, build_detector, calibrate, prepare_qat
from fqn.data.synthetic import synthetic_scenes
from fqn.models import recalibrate_bn
from fqn.quant.fake_quant import quantizers
from fqn.quant.modules import QuantConvBn2d
from fqn.quant.prepare import scope_summary
from fqn.train.monitor import QuantMonitor, weight_sqnr_db
from fqn.viz import GT_COLOR

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),  # Lightning: few dataloader workers, tiny data
              pytest.mark.filterwarnings("ignore:.*LeafSpec")]  # Lightning's own use of a deprecated torch API

SIZE = 96
CLASS_NAMES = ["background", "box", "blob"]
SQNR_TOL_DB = 1e-3  # float32 vs float64 maths; folding with the EMA stats or not differs by ~0.02 dB here


def _samples(n: int = 4) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    images = synthetic_scenes(n, SIZE, seed=1)
    out = []
    for i, img in enumerate(images):
        boxes = torch.tensor([[8.0, 10.0 + 4 * i, 50.0, 60.0], [40.0, 30.0, 90.0, 88.0]])[: 1 + i % 2]
        out.append((img, {"boxes": boxes, "labels": torch.tensor([1, 2])[: len(boxes)]}))
    return out


def _loader() -> DataLoader:
    return DataLoader(_samples(), batch_size=2, shuffle=False, collate_fn=lambda b: tuple(zip(*b)))


def _float_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_detector("resnet18", 3, min_size=SIZE, max_size=SIZE, box_batch_size_per_image=32,
                           rpn_post_nms_top_n_train=100, rpn_post_nms_top_n_test=50)
    return recalibrate_bn(model, synthetic_scenes(4, SIZE, seed=2))


def _quant_model() -> torch.nn.Module:
    model = prepare_qat(_float_model(), QuantConfig(bits_w=4, bits_a=4, freeze_bn=False, percentile=True))
    cal = synthetic_scenes(4, SIZE, seed=3)
    return calibrate(model, [cal[:2], cal[2:]], 2, progress=False)


class _Detector(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return sum(self.model(list(images), list(targets)).values())

    def validation_step(self, batch, batch_idx):
        images, _ = batch
        return {"preds": self.model(list(images))}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _fit(model: torch.nn.Module, tmp_path, monitor: QuantMonitor) -> EventAccumulator:
    trainer = pl.Trainer(max_steps=2, limit_val_batches=1, logger=TensorBoardLogger(tmp_path), callbacks=[monitor],
                         enable_checkpointing=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    loader = _loader()
    trainer.fit(_Detector(model), loader, loader)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    return events.Reload()


def _scalars(events: EventAccumulator, prefix: str) -> dict[str, dict[int, float]]:
    """{tag without prefix: {step: value}} for the scalar tags under ``prefix``."""
    return {tag[len(prefix):]: {e.step: e.value for e in events.Scalars(tag)}
            for tag in events.Tags()["scalars"] if tag.startswith(prefix)}


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory):
    """The fine-tuned model, its events, and the step-0 batch (the model is not touched after fit)."""
    model = _quant_model()
    calibrated = [name for name, fq in quantizers(model, "act") if fq.is_calibrated]
    input_fq = model.backbone.body.conv1.input_fq
    step0_input = model.transform(list(next(iter(_loader()))[0]))[0].tensors
    step0_range = tuple(float(t) for t in input_fq.range)
    events = _fit(model, tmp_path_factory.mktemp("tb"), QuantMonitor(log_every_n_steps=1, class_names=CLASS_NAMES))
    return dict(model=model, events=events, calibrated=calibrated, step0_input=step0_input, step0_range=step0_range)


@pytest.mark.slow  # trains (the quant_run fixture fits a QAT model)
def test_activation_ranges_are_logged_for_every_calibrated_quantizer_and_contain_zero(quant_run):
    lbs, ubs = _scalars(quant_run["events"], "quant/act_lb/"), _scalars(quant_run["events"], "quant/act_ub/")
    assert quant_run["calibrated"] and set(lbs) == set(ubs) == set(quant_run["calibrated"])
    for name in lbs:
        assert set(lbs[name]) == {0, 1}, name  # log_every_n_steps=1: both training steps
        for step in (0, 1):
            assert lbs[name][step] <= 0.0 <= ubs[name][step] and lbs[name][step] < ubs[name][step], name


@pytest.mark.slow  # trains (the quant_run fixture fits a QAT model)
def test_clip_fractions_are_fractions_and_match_a_hand_count_on_the_network_input(quant_run):
    clip = _scalars(quant_run["events"], "quant/clip_frac/")
    assert set(clip) == set(quant_run["calibrated"])  # every quantizer runs in training and gets a hook
    assert all(0.0 <= v <= 1.0 for steps in clip.values() for v in steps.values())
    mean = _scalars(quant_run["events"], "quant/clip_frac_mean")[""]
    for step in (0, 1):
        expected = np.mean([steps[step] for steps in clip.values() if step in steps])
        assert mean[step] == pytest.approx(expected, abs=1e-6)
    # the input quantizer's range is fixed (P): count its clipped inputs on the first batch independently
    x, (lb, ub) = quant_run["step0_input"], quant_run["step0_range"]
    expected = ((x < lb) | (x > ub)).double().mean().item()
    assert clip["backbone.body.conv1.input_fq"][0] == pytest.approx(expected, abs=1e-6)


def _hand_sqnr_db_symmetric_per_channel_4bit(w: torch.Tensor) -> float:
    """Reference: symmetric per-output-channel 4-bit, scale = max|w| / 7, integers in [-7, 7]."""
    w = w.double()
    scale = w.abs().flatten(1).amax(dim=1).clamp_min(1e-30).reshape(-1, *[1] * (w.dim() - 1)) / 7
    wq = torch.clamp(torch.round(w / scale), -7, 7) * scale
    return 10 * math.log10(w.square().sum().item() / (w - wq).square().sum().item())


def _hand_folded_weight(layer: QuantConvBn2d) -> torch.Tensor:
    factor = layer.bn_weight.double() / torch.sqrt(layer.running_var.double() + layer.bn_eps)
    return layer.weight.double() * factor.reshape(-1, 1, 1, 1)


@pytest.mark.slow  # trains (the quant_run fixture fits a QAT model)
def test_weight_sqnr_is_finite_and_matches_a_hand_computed_quantizer(quant_run):
    model, events = quant_run["model"], quant_run["events"]
    sqnr = _scalars(events, "quant/weight_sqnr_db/")
    counts = scope_summary(model)
    assert len(sqnr) == counts["conv:quantized"] + counts["linear:quantized"]
    assert all(math.isfinite(v) for steps in sqnr.values() for v in steps.values())
    sqnr_min = _scalars(events, "quant/weight_sqnr_db_min")[""]
    assert sqnr_min[1] == pytest.approx(min(steps[1] for steps in sqnr.values()))
    # step 1 was logged after the last optimizer step, so it describes the final weights and BN statistics
    layer = model.backbone.body.layer1[0].conv1
    assert isinstance(layer, QuantConvBn2d)
    expected = _hand_sqnr_db_symmetric_per_channel_4bit(_hand_folded_weight(layer))
    assert sqnr["backbone.body.layer1.0.conv1"][1] == pytest.approx(expected, abs=SQNR_TOL_DB)
    fc = model.roi_heads.box_head.fc6
    expected = _hand_sqnr_db_symmetric_per_channel_4bit(fc.weight.detach())
    assert sqnr["roi_heads.box_head.fc6"][1] == pytest.approx(expected, abs=SQNR_TOL_DB)


@pytest.mark.slow  # trains (the quant_run fixture fits a QAT model)
def test_bn_batch_statistics_histograms_for_the_first_unfrozen_layers(quant_run):
    model, events = quant_run["model"], quant_run["events"]
    tags = events.Tags()["histograms"]
    means = [t for t in tags if t.startswith("bn/batch_mean/")]
    assert len(means) == 8 and len([t for t in tags if t.startswith("bn/batch_var/")]) == 8
    first = [n for n, m in model.named_modules() if isinstance(m, QuantConvBn2d)][:8]
    assert sorted(t.removeprefix("bn/batch_mean/") for t in means) == sorted(first)
    name = first[0]
    mean, var = model.get_submodule(name).last_batch_stats  # from the last training forward, step 1
    for tag, ref in ((f"bn/batch_mean/{name}", mean), (f"bn/batch_var/{name}", var)):
        last = {e.step: e.histogram_value for e in events.Histograms(tag)}[1]
        assert last.num == ref.numel()
        assert last.min == pytest.approx(ref.min().item(), rel=1e-5, abs=1e-7)
        assert last.max == pytest.approx(ref.max().item(), rel=1e-5, abs=1e-7)


def _decode(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


@pytest.mark.slow  # trains (the quant_run fixture fits a QAT model)
def test_validation_images_show_the_ground_truth_boxes(quant_run):
    events = quant_run["events"]
    assert sorted(events.Tags()["images"]) == ["val/image_0", "val/image_1"]  # one val batch of 2 images
    first = events.Images("val/image_0")[-1]
    assert (first.height, first.width) == (SIZE, SIZE)
    pixels = _decode(first)
    green = np.all(pixels == np.array(GT_COLOR, dtype=np.uint8), axis=-1)
    assert green[10, 8:51].all()  # top edge of the ground-truth box [8, 10, 50, 60]


def test_weight_sqnr_leaves_the_quantizer_untouched_even_with_fake_quant_off():
    layer = prepare_qat(_float_model(), QuantConfig(bits_w=4, bits_a=4)).roi_heads.box_head.fc7  # float phase
    fq = layer.weight_fq
    assert not fq.quantizing
    before = {k: v.clone() for k, v in fq.state_dict().items()}
    value = weight_sqnr_db(layer).item()
    assert value == pytest.approx(_hand_sqnr_db_symmetric_per_channel_4bit(layer.weight.detach()), abs=SQNR_TOL_DB)
    after = fq.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not fq.quantizing and not fq.observing


@pytest.mark.slow  # trains
def test_float_model_logs_only_images(tmp_path):
    events = _fit(_float_model(), tmp_path, QuantMonitor(log_every_n_steps=1, num_images=1))
    tags = events.Tags()
    assert tags["scalars"] == [] and tags["histograms"] == []
    assert tags["images"] == ["val/image_0"]


@pytest.mark.slow  # trains
def test_quantities_are_logged_only_on_logging_steps_and_hooks_are_removed(tmp_path):
    model = _quant_model()
    events = _fit(model, tmp_path, QuantMonitor(log_every_n_steps=2, num_images=0))
    assert {e.step for e in events.Scalars("quant/clip_frac_mean")} == {0}
    assert {e.step for e in events.Scalars("quant/weight_sqnr_db_min")} == {0}
    assert events.Tags()["images"] == []
    assert all(not fq._forward_hooks and not fq._forward_pre_hooks for _, fq in quantizers(model))


@pytest.mark.parametrize("kwargs", [{"log_every_n_steps": 0}, {"num_images": -1}, {"max_bn_layers": 1.5}])
def test_bad_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        QuantMonitor(**kwargs)
