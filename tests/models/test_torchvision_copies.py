"""fqn's copies of torchvision's proposal filtering and detection post-processing, against torchvision's own.

`QuantRPN.filter_proposals` and `QuantRoIHeads.postprocess_detections` copy torchvision's (they differ only
in how equal scores are ordered, as the int8 graph orders them: one NMS over offset boxes at every size,
where torchvision's eager NMS switches to one NMS per class above 1,000 boxes on a CPU). Below that size,
with continuous scores, there are no ties and both take the same NMS, so for the installed torchvision they
must give exactly torchvision's results: when torchvision changes these functions, this test fails, and
pyproject's torchvision lower bound is a version it passes on.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from fqn import build_detector
from fqn.models.quantizable import QuantRoIHeads, QuantRPN, stable_ties


@pytest.fixture(scope="module")
def detectors():
    torch.manual_seed(0)
    plain = build_detector("resnet18", 4, min_size=128, max_size=128).eval()
    for m in plain.modules():  # class scores spread, far from saturating to ties
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.01)
    copied = stable_ties(copy.deepcopy(plain))
    assert type(plain.rpn) is RegionProposalNetwork and type(plain.roi_heads) is RoIHeads
    assert type(copied.rpn) is QuantRPN and type(copied.roi_heads) is QuantRoIHeads
    return plain, copied


def test_the_copies_detect_what_torchvision_detects(detectors):
    plain, copied = detectors
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plain.roi_heads.score_thresh = copied.roi_heads.score_thresh = 0.0  # every candidate through to NMS
    for rpn in (plain.rpn, copied.rpn):  # at most 1,000 boxes per NMS: torchvision's single-NMS path
        rpn._pre_nms_top_n = {"training": 150, "testing": 150}
        rpn._post_nms_top_n = {"training": 100, "testing": 100}
    with torch.no_grad():
        ref, got = plain(images), copied(images)
    assert sum(len(r["boxes"]) for r in ref) > 50
    assert all(len(torch.unique(r["scores"])) == len(r["scores"]) for r in ref)  # no ties: one right order
    for r, g in zip(ref, got):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(r[key], g[key]), key


@pytest.mark.parametrize("anchors", [300, 900])
def test_filter_proposals_matches_torchvision(detectors, anchors):
    plain, copied = detectors
    g = torch.Generator().manual_seed(anchors)
    per_level = [anchors // 2, anchors // 4, anchors // 4]
    xy = torch.rand(2, anchors, 2, generator=g) * 100
    wh = torch.rand(2, anchors, 2, generator=g) * 40 + 2
    proposals = torch.cat([xy, xy + wh], dim=2)
    objectness = torch.randn(2 * anchors, 1, generator=g)
    shapes = [(128, 128), (120, 128)]
    ref = RegionProposalNetwork.filter_proposals(plain.rpn, proposals, objectness, shapes, per_level)
    got = copied.rpn.filter_proposals(proposals, objectness, shapes, per_level)
    for r, c in zip(ref, got):
        for a, b in zip(r, c):
            assert torch.equal(a, b)


def test_postprocess_detections_matches_torchvision(detectors):
    plain, copied = detectors
    g = torch.Generator().manual_seed(1)
    boxes = [torch.cat([xy := torch.rand(300, 2, generator=g) * 100, xy + torch.rand(300, 2, generator=g) * 30 + 1],
                       dim=1) for _ in range(2)]
    classes = plain.roi_heads.box_predictor.cls_score.out_features
    logits = torch.randn(600, classes, generator=g) * 3
    deltas = torch.randn(600, 4 * classes, generator=g) * 0.2
    shapes = [(128, 128), (128, 128)]
    ref = RoIHeads.postprocess_detections(plain.roi_heads, logits, deltas, boxes, shapes)
    got = copied.roi_heads.postprocess_detections(logits, deltas, boxes, shapes)
    assert sum(len(b) for b in ref[0]) > 20
    for r, c in zip(ref, got):
        for a, b in zip(r, c):
            assert torch.equal(a, b)


def test_the_installed_torchvision_is_within_the_tested_bound():
    import re
    from importlib.metadata import requires

    bound = next(r for r in requires("fqn") if r.startswith("torchvision"))
    low = tuple(int(x) for x in re.search(r">=\s*([0-9.]+)", bound).group(1).split(".")[:2])
    installed = tuple(int(x) for x in re.match(r"([0-9]+)\.([0-9]+)", torchvision.__version__).groups())
    assert installed >= low  # this file is what decides that bound: it passes on the installed version
