"""DetectionModule's checks and its validation metric, without training: argument and checkpoint errors, the
refusal to validate an uncalibrated model, the run-folder reuse rule, and `val/*` against pycocotools.

The training runs (float and QAT fits, checkpoints, precisions) are in test_training_runs.py; the kill-and-resume
and CLI resume runs in test_resume.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fqn import QuantConfig
from fqn.evaluation import MAP_COLUMNS

from ..test_evaluation import cocoeval_stats
from .tiny import tiny_data, tiny_module, tiny_trainer

REPO = Path(__file__).resolve().parents[2]


def test_init_from_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_from"):
        tiny_module(quant=QuantConfig(), init_from=str(tmp_path / "missing.ckpt"))
    plain = tmp_path / "float.pth"  # a plain state dict of a 4-class detector
    torch.save(tiny_module().model.state_dict(), plain)
    with pytest.raises(ValueError, match="does not fit a resnet18 detector with 7 classes"):
        tiny_module(quant=QuantConfig(), init_from=str(plain), num_classes=7)


def test_bad_optimizer_settings_are_rejected():
    with pytest.raises(ValueError, match="range_lr_scale"):
        tiny_module(range_lr_scale=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        tiny_module(optimizer="adam")


def test_cli_fit_rejects_bad_input_while_parsing():
    """Bad input fails while parsing, before any training, so in this process; printing every config:
    tests/test_configs.py; a fit and its resume through the CLI: test_resume.py."""
    from fqn.commands.cli import main

    with pytest.raises(SystemExit, match="unrecognized arguments: --model.bogus"):
        main(["fit", "--config", str(REPO / "configs/synthetic_float.yaml"), "--model.bogus", "1"])
    with pytest.raises(SystemExit, match="bits_w must be an integer"):
        main(["fit", "--config", str(REPO / "configs/synthetic_w4a4.yaml"), "--model.quant.bits_w", "12"])


def test_validating_an_uncalibrated_qat_model_is_a_clear_error(tmp_path):
    model = tiny_module(quant=QuantConfig(n_cal=1))
    with pytest.raises(RuntimeError, match="no calibrated ranges"):
        tiny_trainer(str(tmp_path)).validate(model, tiny_data())


class _NoisyTruth(nn.Module):
    """A stand-in detector with an AP between 0 and 1: each known image's ground-truth boxes moved by up to 2 px,
    plus a false positive, with seeded scores. Images are looked up by content: an unknown one raises KeyError."""

    def __init__(self, pairs: list[tuple[torch.Tensor, dict]]) -> None:
        super().__init__()
        self.truth = {image.numpy().tobytes(): (i, target) for i, (image, target) in enumerate(pairs)}

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            i, target = self.truth[image.numpy().tobytes()]
            g = torch.Generator().manual_seed(i)
            n = len(target["boxes"])
            boxes = target["boxes"] + (torch.rand(n, 4, generator=g) - 0.5) * 4
            out.append({"boxes": torch.cat([boxes, torch.tensor([[0.0, 0.0, 12.0, 12.0]])]),
                        "scores": torch.rand(n + 1, generator=g),
                        "labels": torch.cat([target["labels"], torch.tensor([1])])})
        return out


def test_logged_validation_map_is_pycocotools_on_the_same_detections(tmp_path):
    """Every batch of the validation set goes into `val/*` once: the logged columns are what pycocotools' own
    COCOeval gives for the same detections of all validation images."""
    data = tiny_data()
    data.setup("validate")
    pairs = [(image, target) for images, targets in data.val_dataloader() for image, target in zip(images, targets)]
    assert len(pairs) == 4 and len({len(t["boxes"]) for _, t in pairs}) > 1
    module = tiny_module()
    module.model = _NoisyTruth(pairs)
    [logged] = tiny_trainer(str(tmp_path), limit_val_batches=1.0).validate(module, data, verbose=False)
    with torch.no_grad():
        preds = module.model([image for image, _ in pairs])
    expected = dict(zip(MAP_COLUMNS.values(), cocoeval_stats([t for _, t in pairs], preds)))
    assert 0.1 < expected["AP"] < 0.9  # neither nothing nor everything found: the comparison can tell
    assert logged["val/mAP"] == pytest.approx(expected["AP"], abs=1e-6)
    got = {k: logged[f"val/{k}"] for k in expected if f"val/{k}" in logged}
    assert set(got) >= {"AP", "AP50", "AP75", "AR1", "AR10", "AR100"}
    assert got == pytest.approx({k: expected[k] for k in got}, abs=1e-6)


def test_a_run_folder_trained_with_other_settings_is_not_reused(tmp_path):
    """`fqn quickstart` / `fqn ablate` reuse or resume `OUT/name/last.ckpt`; one from other settings (an older
    quickstart's box head, another learning rate) must not be mixed in: a clear error before any training."""
    from fqn.train.runs import changed_settings, stored_run, train_run

    last = tmp_path / "float" / "last.ckpt"
    last.parent.mkdir()
    cfg = QuantConfig(bits_w=4, bits_a=4)
    torch.save({"global_step": 5, "hyper_parameters": {"lr": 0.02, "detector": {"representation_size": 1024},
                                                       "quant": cfg.to_dict(), "lr_steps": [4, 5]}}, last)
    same = {"lr": 0.02, "quant": cfg, "lr_steps": (4, 5), "detector": {"representation_size": 1024}}
    assert changed_settings(stored_run(last), same) == []
    older = {k: v for k, v in cfg.to_dict().items() if k not in ("learn_ranges", "layer_bits")}
    torch.save({"global_step": 5, "hyper_parameters": {"quant": older}}, tmp_path / "older.ckpt")
    # written before those fields existed: compared with their defaults
    assert changed_settings(stored_run(tmp_path / "older.ckpt"), {"quant": cfg}) == []
    assert train_run("float", tmp_path, 5, None, same) == last  # finished with the same settings: reused
    other = {**same, "detector": {"representation_size": 256}, "quant": QuantConfig(bits_w=8, bits_a=8)}
    assert changed_settings(stored_run(last), other) == ["quant", "detector"]
    with pytest.raises(ValueError, match=r"other settings \(quant, detector\).*delete"):
        train_run("float", tmp_path, 5, None, other)
