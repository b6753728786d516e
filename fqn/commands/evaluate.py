"""``fqn evaluate``: the COCO mAP of one model on validation data, written to ``OUT/metrics.json``.

What a deployer runs on the file they ship: an int8 ``.onnx`` file in ONNX Runtime or OpenVINO, on the data it was
trained on (recorded in the file by `fqn convert`) or on ``--config``'s validation split. A checkpoint is scored in
PyTorch as it is: float, or fake-quant for a QAT one. The images per second are the detector's own time, one image
per call, at ``--threads``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fqn.commands.common import data_for, fresh_file, provenance
from fqn.commands.report import Column, markdown_table, write_json
from fqn.evaluation import MAP_COLUMNS, evaluate_map
from fqn.int8 import load_int8
from fqn.models.checkpoint import load_detector
from fqn.quant.state import quant_config

TABLE = [Column("model"), Column("runtime"), *(Column(k) for k in MAP_COLUMNS.values()),
         Column("images_per_second", "images/s", 2)]


class _Timed:
    """A detector that adds up the time spent inside it (the metric's own work is not the model's)."""

    def __init__(self, detector: Any) -> None:
        self.detector, self.seconds, self.images = detector, 0.0, 0

    def __call__(self, images: list) -> list:
        t0 = time.perf_counter()
        out = self.detector(images)
        self.seconds += time.perf_counter() - t0
        self.images += len(images)
        return out

    @property
    def training(self) -> bool:
        return bool(self.detector.training)

    def train(self, mode: bool = True) -> _Timed:
        self.detector.train(mode)
        return self

    def eval(self) -> _Timed:
        return self.train(False)


def load_model(model: str | Path, runtime: str = "onnxruntime", threads: int | None = None) -> tuple[Any, str, str]:
    """``(detector, description, runtime label)`` of an ``.onnx`` file (in ``runtime``) or a checkpoint (PyTorch)."""
    model = Path(model)
    if not model.is_file():
        raise FileNotFoundError(f"model {model} does not exist")
    if model.suffix.lower() == ".onnx":
        detector = load_int8(model, threads, runtime=runtime)
        return detector, detector.metadata.get("fqn.bits", "float"), runtime

    net, _ = load_detector(model)
    cfg = quant_config(net)
    return net.cpu().eval(), "float" if cfg is None else f"fake-quant w{cfg.bits_w}a{cfg.bits_a}", "pytorch"


def run_evaluate(model: str | Path, out: str | Path, *, config: str | None = None, runtime: str = "onnxruntime",
                 threads: int | None = None, num_val: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Score ``model`` on its validation data; writes and returns the record of ``OUT/metrics.json``."""
    target = fresh_file(Path(out) / "metrics.json")
    if threads:
        torch.set_num_threads(threads)
    data = data_for(model, config, **({"num_val": num_val} if num_val is not None else {}))
    data.setup("validate")
    detector, kind, runtime_used = load_model(model, runtime, threads)
    timed = _Timed(detector)
    metrics = evaluate_map(timed, data.val_dataloader(), progress=progress)
    row = {"model": f"{Path(model).name} ({kind})", "runtime": runtime_used, **metrics,
           "images_per_second": timed.images / timed.seconds if timed.seconds else None}
    record = {"model": str(model), "kind": kind, "runtime": runtime_used, "metrics": metrics,
              "images": timed.images, "images_per_second": row["images_per_second"],
              "data": {"source": data.source, "config": config, "class_names": data.class_names},
              "provenance": provenance(threads)}
    write_json(target, record)
    print(markdown_table([row], TABLE))
    print(f"\n{timed.images} validation images ({data.source} data{', ' + config if config else ''}); metrics: "
          f"{target}")
    return record
