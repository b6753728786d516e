"""Detection metrics shared by the trainer and the tools: COCO mAP columns of the FQN paper's Table 1."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision

from fqn.quant.fake_quant import ranges_fixed

# torchmetrics key -> the column name used in logs and tables
MAP_COLUMNS = {"map": "AP", "map_50": "AP50", "map_75": "AP75", "map_small": "APs", "map_medium": "APm",
               "map_large": "APl", "mar_1": "AR1", "mar_10": "AR10", "mar_100": "AR100"}


def sqnr_db(ref: Tensor, test: Tensor) -> Tensor:
    """Signal-to-quantization-noise ratio of ``test`` against ``ref`` in dB, a 0-d float64 tensor.

    Stays on the tensors' device (no sync); ``inf`` when ``test`` equals a non-zero ``ref``.
    """
    signal = ref.double().square().sum()
    noise = (ref.double() - test.double()).square().sum()
    return 10 * torch.log10(signal / noise)


def make_map_metric() -> MeanAveragePrecision:
    """COCO-style box mAP (pycocotools backend) with the paper's AP/AR columns."""
    return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", max_detection_thresholds=[1, 10, 100])


def map_columns(result: dict[str, Tensor]) -> dict[str, float]:
    """The Table 1 columns from a `MeanAveragePrecision.compute()` result, with pycocotools' meaning.

    ``-1`` means *no ground truth* in that column: a size bin (``APs``, ``APm``, ``APl``) without boxes of that
    size, or every column of a data set without boxes. A model that detects nothing on images that have boxes
    scores ``0.0``, never ``nan``: a ``nan`` (a division by zero detections, as some metric versions return) is
    read as ``0.0``.

    Example:
        >>> nothing = {"map": torch.tensor(float("nan")), "map_small": torch.tensor(-1.0)}
        >>> cols = map_columns({**{k: torch.tensor(0.0) for k in MAP_COLUMNS}, **nothing})
        >>> cols["AP"], cols["APs"], cols["AP50"]
        (0.0, -1.0, 0.0)
    """
    values = {name: float(result[key]) for key, name in MAP_COLUMNS.items()}
    return {name: 0.0 if math.isnan(v) else v for name, v in values.items()}


def detections_for_metric(preds: list[dict[str, Tensor]], targets: Iterable[dict[str, Tensor]]) -> tuple[list, list]:
    """Detach and move to CPU the fields the metric reads."""
    p = [{k: d[k].detach().cpu() for k in ("boxes", "scores", "labels")} for d in preds]
    t = [{k: d[k].detach().cpu() for k in ("boxes", "labels")} for d in targets]
    return p, t


@torch.no_grad()
def evaluate_map(model: nn.Module, batches: Iterable[Any], *, device: torch.device | str = "cpu",
                 progress: bool = True) -> dict[str, float]:
    """mAP columns of ``model`` (eval mode) over ``(images, targets)`` batches, restoring its training flag.

    EMA activation observers still updating ([17], P off) are paused for the evaluation, as the
    trainer does for validation: otherwise the ranges drift over the validation images.
    """

    was_training = model.training
    model.eval()
    metric = make_map_metric()
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="evaluate", unit="batch", leave=False)
    try:
        with ranges_fixed(model) if isinstance(model, nn.Module) else contextlib.nullcontext():
            for images, targets in iterator:
                preds = model([img.to(device) for img in images])
                metric.update(*detections_for_metric(preds, targets))
    finally:
        model.train(was_training)
    return map_columns(metric.compute())
