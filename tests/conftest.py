"""Shared fixtures: tiny real torchvision detectors (weights=None, 128 px) with realistic BN statistics."""

from __future__ import annotations

import copy

import pytest
import torch

from fqn.data.synthetic import synthetic_scenes
from fqn.models import build_detector, recalibrate_bn

SIZE = 128


@pytest.fixture(scope="session")
def scenes() -> list[torch.Tensor]:
    return synthetic_scenes(8, SIZE, seed=0)


@pytest.fixture(scope="session")
def _float_detectors(scenes) -> dict:
    torch.manual_seed(0)
    out = {}
    for backbone in ("resnet18", "mobilenet_v3_large"):
        model = build_detector(backbone, 3, min_size=SIZE, max_size=SIZE)
        out[backbone] = recalibrate_bn(model, scenes[:6]).eval()
    return out


@pytest.fixture
def float_detector(_float_detectors):
    """A fresh copy of a BN-calibrated float detector per test: ``float_detector('resnet18')``."""
    return lambda backbone="resnet18": copy.deepcopy(_float_detectors[backbone])


def targets_for(n_boxes: list[int]) -> list[dict[str, torch.Tensor]]:
    """Targets with the given number of boxes per image (0 = an image with no boxes)."""
    out = []
    for i, n in enumerate(n_boxes):
        boxes = torch.tensor([[8.0 + 10 * k, 12.0 + 5 * i, 60.0 + 10 * k, 70.0] for k in range(n)]).reshape(-1, 4)
        out.append({"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64) + (torch.arange(n) % 2)})
    return out
