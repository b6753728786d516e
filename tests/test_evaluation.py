"""A model that detects nothing scores AP 0.0 (not nan) where there are boxes, and -1 only where there are none,
as pycocotools' own COCOeval says."""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fqn.evaluation import MAP_COLUMNS, evaluate_map, make_map_metric, map_columns

# a small (20x20), a medium (50x40) and another medium box; no large one: APl has no ground truth
TARGETS = [{"boxes": torch.tensor([[2.0, 2.0, 22.0, 22.0], [30.0, 10.0, 80.0, 50.0]]), "labels": torch.tensor([1, 2])},
           {"boxes": torch.tensor([[5.0, 5.0, 55.0, 45.0]]), "labels": torch.tensor([1])},
           {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # a negative image
NOTHING = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}


def cocoeval_stats(targets: list[dict], preds: list[dict]) -> list[float]:
    """pycocotools' 12 summary numbers for xyxy targets and predictions, built by hand (no torchmetrics)."""
    images = [{"id": i, "width": 100, "height": 100} for i in range(len(targets))]
    labels = {int(c) for item in [*targets, *preds] for c in item["labels"]}
    categories = [{"id": c} for c in sorted(labels)]  # a class detected but absent from the targets scores -1: left out

    def anns(items: list[dict], scored: bool) -> list[dict]:
        out = []
        for i, item in enumerate(items):
            for k, (box, label) in enumerate(zip(item["boxes"].tolist(), item["labels"].tolist())):
                x1, y1, x2, y2 = box
                out.append({"id": len(out) + 1, "image_id": i, "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                            **({"score": float(item["scores"][k])} if scored else {})})
        return out

    def index(annotations: list[dict]) -> COCO:
        coco = COCO()
        coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
        coco.createIndex()
        return coco

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(index(anns(targets, False)), index(anns(preds, True)), "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def test_no_detections_is_zero_not_nan_as_in_pycocotools():
    metric = make_map_metric()
    metric.update([dict(NOTHING) for _ in TARGETS], TARGETS)
    cols = map_columns(metric.compute())
    expected = dict(zip(MAP_COLUMNS.values(), cocoeval_stats(TARGETS, [NOTHING] * len(TARGETS))))
    assert expected == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": -1.0, "AR1": 0.0,
                        "AR10": 0.0, "AR100": 0.0}  # pycocotools: 0 where there are boxes, -1 in the empty bin
    assert cols == pytest.approx(expected)


def test_one_detection_matches_pycocotools():
    """The same comparison with something detected, so the hand-built COCOeval is known to be the reference."""
    preds = [{"boxes": torch.tensor([[2.0, 2.0, 22.0, 22.0]]), "scores": torch.tensor([0.9]),
              "labels": torch.tensor([1])}, dict(NOTHING), dict(NOTHING)]
    metric = make_map_metric()
    metric.update(preds, TARGETS)
    cols = map_columns(metric.compute())
    expected = dict(zip(MAP_COLUMNS.values(), cocoeval_stats(TARGETS, preds)))
    assert expected["AP"] > 0 and expected["APl"] == -1.0
    assert cols == pytest.approx(expected, abs=1e-6)


def test_nothing_to_detect_is_minus_one():
    metric = make_map_metric()
    metric.update([dict(NOTHING)], [TARGETS[2]])
    assert set(map_columns(metric.compute()).values()) == {-1.0}


def test_nan_reads_as_zero():
    result = {key: torch.tensor(float("nan")) for key in MAP_COLUMNS} | {"map_large": torch.tensor(-1.0)}
    cols = map_columns(result)
    assert cols["AP"] == cols["AR100"] == 0.0 and cols["APl"] == -1.0 and not any(np.isnan(list(cols.values())))


def test_a_detector_that_detects_nothing_scores_zero():
    """A real (untrained) detector whose score threshold nothing passes, through `evaluate_map`."""
    from fqn.models.faster_rcnn import build_detector

    torch.manual_seed(0)
    model = build_detector("resnet18", 3, min_size=96, max_size=96, rpn_pre_nms_top_n_test=50,
                           rpn_post_nms_top_n_test=20)
    model.roi_heads.score_thresh = 1.01  # scores are at most 1: no box survives
    images = [torch.rand(3, 100, 100) for _ in TARGETS]
    assert all(len(p["boxes"]) == 0 for p in model.eval()(images))
    cols = evaluate_map(model, [(images, TARGETS)], progress=False)
    assert cols["AP"] == cols["AP50"] == cols["AP75"] == cols["AR100"] == 0.0
    assert cols["APs"] == cols["APm"] == 0.0 and cols["APl"] == -1.0


def test_compare_logs_an_ap_of_zero_as_zero(tmp_path, caplog):
    from fqn.commands.compare import Comparison

    cmp = Comparison(tmp_path, info={})
    with caplog.at_level(logging.INFO, logger="fqn.commands.compare"):
        cmp.add({"name": "blind", "method": "fp32", "AP": 0.0, "size_mb": 1.0})
    assert "blind AP=0.0000 size=1.0 MB" in caplog.text
