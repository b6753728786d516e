"""A tiny but real training setup shared by the trainer tests: R18-FPN at 96 px on a few synthetic scenes."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from fqn.data.datamodule import DetectionDataModule
from fqn.data.synthetic import SyntheticConfig
from fqn.train.module import DetectionModule

SIZE = 96
# torchvision's widths (FPN 256, box head 1024): for tests whose thresholds were measured on that architecture
TORCHVISION_WIDTH = {"box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
                     "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50}
# narrow FPN and box head: every layer kind and the int8 graph are the same, the int8 file is 12 MB instead of 31,
# and a conversion costs a quarter less, a PTQ a third less (measured on one thread: 12.8 -> 9.4 s, 3.6 -> 2.4 s)
DETECTOR = {**TORCHVISION_WIDTH, "fpn_channels": 64, "representation_size": 128}


def tiny_data(**kw: Any) -> DetectionDataModule:
    args = {"synthetic": SyntheticConfig(image_size=SIZE, num_classes=3, min_size=8, max_size=48),
            "num_train": 12, "num_val": 4, "batch_size": 2}
    args.update(kw)
    return DetectionDataModule(**args)


def tiny_module(**kw: Any) -> DetectionModule:
    args = {"backbone": "resnet18", "num_classes": 4, "min_size": SIZE, "max_size": SIZE, "detector": DETECTOR,
            "lr": 0.01, "base_batch_size": 2, "warmup_steps": 2}
    args.update(kw)
    return DetectionModule(**args)


def tiny_trainer(root: str, **kw: Any) -> pl.Trainer:
    args = {"default_root_dir": root, "accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "limit_val_batches": 1, "use_distributed_sampler": False}
    args.update(kw)
    return pl.Trainer(**args)
