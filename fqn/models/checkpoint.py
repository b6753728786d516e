"""Rebuild a detector (float or fake-quantized) from a trainer checkpoint alone, without Lightning.

The checkpoint's hyper-parameters say how the detector was built (backbone, classes, resize bounds,
detector keywords, QuantConfig); its state dict holds the weights, BN statistics and quantizer ranges.
Loading uses ``torch.load(weights_only=True)``: no code from the file is executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.models.detection import FasterRCNN

from fqn.config import QuantConfig
from fqn.models.faster_rcnn import build_detector, prepare_qat
from fqn.quant.fake_quant import current_phase, set_phase

_BUILD_KEYS = ("backbone", "num_classes", "min_size", "max_size")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dictionary, with errors that say what went wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, not a torch file, pickled code...
        raise ValueError(f"checkpoint {path} cannot be read as a torch checkpoint: {err}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{path} is not an fqn trainer checkpoint (no state_dict / hyper_parameters); "
                         "write one with `fqn fit`")
    return ckpt


def load_detector(path: str | Path) -> tuple[FasterRCNN, dict[str, Any]]:
    """The detector saved in an fqn checkpoint, in eval mode, and its hyper-parameters.

    A QAT checkpoint gives a prepared (fake-quantized) detector with its ranges and
    ``model.fqn_config``; a float checkpoint gives the float detector. A checkpoint saved while
    EMA ranges were still updating ([17], P off) comes back with them fixed (phase ``quantize``):
    the detector is for inference, and evaluating it must not move the ranges the file holds.
    """
    ckpt = read_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    missing = [k for k in _BUILD_KEYS if k not in hp]
    if missing:
        raise ValueError(f"checkpoint {path} lacks the hyper-parameters {missing}")
    model = build_detector(hp["backbone"], hp["num_classes"], min_size=hp["min_size"], max_size=hp["max_size"],
                           **(hp.get("detector") or {}))
    quant = hp.get("quant")
    if quant:
        prepare_qat(model, QuantConfig.from_dict(quant) if isinstance(quant, dict) else quant)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    if current_phase(model) == "observe_quantize":
        set_phase(model, "quantize")
    return model.eval(), hp
