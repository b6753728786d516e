"""A user who brings torchvision's COCO-pretrained Faster R-CNN: `fqn fit` QAT (the shipped coco_r50_w4a4 recipe, on
tiny COCO files), then `fqn compare`, which converts it to an int8 file.

Nothing downloads here: the test writes "torchvision's COCO weights" for R50-FPN (realistic BN statistics, a
recognisable box predictor) into a hub cache of its own, where `weights: DEFAULT` finds them as it finds the real
file on a user's machine. The head must come through intact, with COCO category ids as labels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from fqn.models.checkpoint import load_detector
from fqn.models.faster_rcnn import recalibrate_bn
from fqn.quant.state import quant_config
from tests.test_configs import COCO_IDS, REPO, coco_files, qat_checkpoint


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> Path:
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights, fasterrcnn_resnet50_fpn

    home = tmp_path_factory.mktemp("torch_home")
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, min_size=128, max_size=128)
    recalibrate_bn(model, [torch.rand(3, 128, 128) for _ in range(4)])  # BN statistics that fit the activations
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0.2, 0.05)  # far from a fresh predictor's N(0, 0.01)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = home / "hub" / "checkpoints" / Path(FasterRCNN_ResNet50_FPN_Weights.DEFAULT.url).name
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return home


@pytest.mark.slow
def test_coco_pretrained_detector_through_qat_convert_and_compare(torch_home, tmp_path, monkeypatch):
    """Through the CLI's entry point in this process (a console script's start-up costs 6-10 s; test_install.py runs
    the installed `fqn` itself); torch.hub reads TORCH_HOME at each load, as the real command does."""
    from fqn.commands.cli import main

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.chdir(tmp_path)
    files = coco_files(tmp_path / "coco", COCO_IDS)
    config = tmp_path / "coco_tiny.yaml"  # the shipped recipe, pointed at the tiny data
    config.write_text(yaml.safe_dump({"__base__": str(REPO / "configs" / "coco_r50_w4a4.yaml"),
                                      "data": dict(zip(("train_images", "train_ann", "val_images", "val_ann"), files),
                                                   num_workers=0)}))
    # 32-true on a CPU, as the recipe says: its 16-mixed is bf16 autocast here, ~4x slower (194 s against 51 s)
    assert main(["fit", "--config", str(config), "--model.min_size", "128", "--model.max_size", "128",
                 "--data.batch_size", "2", "--model.quant.n_cal", "2", "--trainer.max_steps", "2",
                 "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                 "--trainer.precision", "32-true"]) == 0
    ckpt = qat_checkpoint(tmp_path)
    model, hp = load_detector(ckpt)
    assert hp["weights"] == "DEFAULT" and hp["frozen_bn"] is True and quant_config(model).flags == "FPC"
    pretrained = torch.load(next(torch_home.glob("hub/checkpoints/*.pth")), weights_only=True)
    head = model.roi_heads.box_predictor.cls_score.weight.detach()
    assert head.shape == (91, 1024)  # the 91-way head stayed: it was fine-tuned, not replaced
    assert torch.allclose(head, pretrained["roi_heads.box_predictor.cls_score.weight"], atol=1e-2)
    conv1 = model.backbone.body.layer1[0].conv1
    assert not conv1.bn_weight.requires_grad  # FrozenBatchNorm2d's affine stays frozen under QAT
    # `fqn convert`'s CLI is tested on tiny models (tests/commands/test_compare.py); here compare converts this
    # checkpoint with the same convert_int8, so the R50 recipe's int8 file is checked below without a second export.
    # no peer rows (ORT quantize_static and torchao are tested on tiny models there); the data: the checkpoint's own
    assert ckpt == tmp_path / "runs" / "coco_tiny" / "checkpoints" / "last.ckpt"  # the run folder of its config
    # (fqn's PTQ of an R50 runs in test_configs.py's custom_coco chain)
    assert main(["compare", "--qat", str(ckpt), "--out", str(tmp_path / "cmp"), "--no-ptq", "--no-peers", "--runs",
                 "1", "--n-cal", "2", "--threads", "1", "--runtime", "onnxruntime"]) == 0
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["machine"]["data_source"] == "coco" and saved["machine"]["val_images"] == 2
    rows = {r["name"]: r for r in saved["rows"]}
    qat = "fqn QAT w4a4 (coco_tiny)"  # named after its run
    assert qat in set(rows) and not any(r["method"] == "ptq" for r in rows.values())
    qat_file = tmp_path / "cmp" / Path(rows[qat]["file"]).name
    assert qat_file.is_file() and qat_file.stat().st_size > 0 and math.isfinite(rows[qat]["AP"])
    assert any(r["method"] == "fp32" for r in rows.values())  # the FP32 model: torchvision's weights, from the cache


def test_build_detector_loads_torchvision_weights_and_says_when_the_head_is_replaced(torch_home, monkeypatch,
                                                                                    caplog):
    from torchvision.ops import FrozenBatchNorm2d

    from fqn import build_detector

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    state = torch.load(next(torch_home.glob("hub/checkpoints/*.pth")), weights_only=True)
    coco = build_detector("resnet50", 91, weights="DEFAULT", min_size=128, max_size=128)
    assert isinstance(coco.backbone.body.bn1, FrozenBatchNorm2d)
    for name, value in coco.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert "replaced" not in caplog.text
    kitti = build_detector("resnet50", 8, weights="DEFAULT", min_size=128, max_size=128)
    assert kitti.roi_heads.box_predictor.cls_score.out_features == 8
    assert torch.equal(kitti.backbone.body.layer4[2].conv3.weight, state["backbone.body.layer4.2.conv3.weight"])
    assert "replaced by a new, untrained one" in caplog.text
