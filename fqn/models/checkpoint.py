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
from fqn.quant.fake_quant import Phase, current_phase, set_phase

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


def pretrained(hp: dict[str, Any]) -> bool:
    """Whether the backbone has FrozenBatchNorm2d: the run started from torchvision weights or from a model that did."""
    if hp.get("frozen_bn") is not None:
        return bool(hp["frozen_bn"])
    return bool(hp.get("weights") or hp.get("weights_backbone"))


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
                           frozen_bn=pretrained(hp), **(hp.get("detector") or {}))
    quant = hp.get("quant")
    if quant:
        prepare_qat(model, QuantConfig.from_dict(quant) if isinstance(quant, dict) else quant)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    if current_phase(model) == Phase.OBSERVE_QUANTIZE:
        set_phase(model, Phase.QUANTIZE)
    return model.eval(), hp


def load_float_reference(path: str | Path) -> tuple[FasterRCNN, dict[str, Any]]:
    """The float detector a QAT checkpoint was fine-tuned from, and that run's hyper-parameters.

    Its ``init_from`` (an fqn float checkpoint or a plain state dict), else the torchvision
    ``weights`` it started from (read from torch's hub cache, or downloaded once). This is the
    FP32 row of a comparison when the user brought a pretrained detector rather than trained one.
    """
    hp = dict(read_checkpoint(path)["hyper_parameters"])
    if not hp.get("quant"):
        raise ValueError(f"{path} is a float checkpoint: it is its own float reference")
    build = {"min_size": hp["min_size"], "max_size": hp["max_size"], **(hp.get("detector") or {})}
    source = hp.get("init_from")
    if source:
        raw = torch.load(source, map_location="cpu", weights_only=True) if Path(source).is_file() else None
        if raw is None:
            raise FileNotFoundError(f"{path} was fine-tuned from {source}, which is not there any more; "
                                    "pass the float checkpoint with --float")
        if "state_dict" in raw:
            return load_detector(source)
        model = build_detector(hp["backbone"], hp["num_classes"], frozen_bn=pretrained(hp), **build)
        model.load_state_dict(raw)
        return model.eval(), hp
    if hp.get("weights"):
        if hp["num_classes"] != 91:  # torchvision's COCO heads have 91 outputs; another size is a new random head
            raise ValueError(f"{path} started from torchvision's COCO weights with a new {hp['num_classes']}-class "
                             "head, which has no trained float version; pass a float checkpoint with --float")
        model = build_detector(hp["backbone"], hp["num_classes"], weights=hp["weights"], **build)
        return model.eval(), hp
    raise ValueError(f"{path} names no float model it started from (no init_from, no weights); "
                     "pass the float checkpoint with --float")
