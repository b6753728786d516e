"""Shared fixtures: tiny real torchvision detectors (weights=None, 128 px) with realistic BN statistics."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from fqn.data.synthetic import synthetic_scenes
from fqn.models import build_detector, recalibrate_bn

SIZE = 128


# The longest tests (``make test`` prints the slowest with --durations), started first. pytest-xdist hands tests to
# its workers in collection order, and these collect late (tests/test_pretrained.py, ...): collected where they are,
# one worker ends the run alone with several minutes of a single test while the other idles.
LONGEST_FIRST = (
    "tests/test_pretrained.py::test_coco_pretrained_detector_through_qat_convert_and_compare",
    "tests/test_install.py::test_tiny_quickstart_from_the_wheel",
    "tests/test_bench.py::test_every_path_is_timed_or_says_why_and_memory_is_measured",
    "tests/test_ablate.py::test_two_row_grid_runs_resumes_and_writes_its_tables",
    "tests/test_ablate.py::test_beyond_fqn_row_learns_ranges_distills_and_mixes_bit_widths",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid, len(rank)))  # a stable sort: the rest keep their order


def _one_core_per_worker() -> None:
    """Under pytest-xdist, each worker (and every process it starts) uses its share of the cores.

    Two workers on two cores, each running torch's default of one thread per core, oversubscribe
    the machine: OpenMP threads spin waiting for a core the other worker holds. The share goes to
    the environment too, so the `fqn` subprocesses and ONNX Runtime sessions the tests start keep it.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(share)
        torch.set_num_threads(share)


_one_core_per_worker()


@pytest.fixture(scope="session")
def scenes() -> list[torch.Tensor]:
    return synthetic_scenes(8, SIZE, seed=0)


# A narrow FPN and box head: every layer kind and graph of torchvision's, at about half the cost of a conversion.
NARROW = {"fpn_channels": 64, "representation_size": 128}


def bn_calibrated_detectors(scenes: list[torch.Tensor], backbones: tuple[str, ...] = ("resnet18", "mobilenet_v3_large"),
                            **widths) -> dict:
    """Seeded float detectors (R18-FPN, MobileNetV3-FPN) with BN statistics fitted to the scenes."""
    torch.manual_seed(0)
    out = {}
    for backbone in backbones:
        model = build_detector(backbone, 3, min_size=SIZE, max_size=SIZE, **widths)
        out[backbone] = recalibrate_bn(model, scenes[:6]).eval()
    return out


@pytest.fixture(scope="session")
def _float_detectors(scenes) -> dict:
    return bn_calibrated_detectors(scenes, **NARROW)


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
