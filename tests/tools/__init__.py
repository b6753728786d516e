"""Tests of the scripts under tools/, loaded from their files (tools/ is not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load_tool(name: str) -> ModuleType:
    """tools/``name``.py as a module."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_float_checkpoint(folder: Path) -> tuple[Path, Path]:
    """A seeded, untrained tiny FP32 checkpoint and a data config of 8 training and 2 validation synthetic images,
    what the PTQ measurement tools start from."""
    from fqn.models import build_detector

    from ..train.tiny import DETECTOR, SIZE

    torch.manual_seed(0)
    model = build_detector("resnet18", 4, min_size=SIZE, max_size=SIZE, **DETECTOR).eval()
    hp = {"backbone": "resnet18", "num_classes": 4, "min_size": SIZE, "max_size": SIZE, "detector": DETECTOR}
    ckpt = folder / "float.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hp},
               ckpt)
    config = folder / "data.yaml"
    config.write_text(f"data:\n  synthetic: {{image_size: {SIZE}, num_classes: 3, max_size: 48}}\n"
                      "  num_train: 8\n  num_val: 2\n  batch_size: 2\n")
    return ckpt, config
