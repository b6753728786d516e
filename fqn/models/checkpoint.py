"""Rebuild a detector (float or fake-quantized) from a trainer checkpoint alone, without Lightning.

The checkpoint's hyper-parameters say how the detector was built (backbone, classes, resize bounds,
detector keywords, QuantConfig); its state dict holds the weights, BN statistics and quantizer ranges.
Loading uses ``torch.load(weights_only=True)``: no code from the file is executed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN

from fqn.config import QuantConfig
from fqn.models.faster_rcnn import build_detector, fast_roi_pool, prepare_qat
from fqn.quant.fake_quant import fix_ranges
from fqn.quant.prepare import scope_summary
from fqn.quant.state import QuantState

log = logging.getLogger(__name__)

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

    A QAT checkpoint gives a prepared (fake-quantized) detector with its ranges and its
    `QuantState`, whose config it is rebuilt with; a float checkpoint gives the float detector. A checkpoint saved while
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
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    saved = QuantState.read(state)
    quant = saved["config"] if saved is not None else hp.get("quant")  # checkpoints before QuantState: hparams
    if quant:
        prepare_qat(model, QuantConfig.from_dict(quant) if isinstance(quant, dict) else quant)
    model.load_state_dict(state)
    fix_ranges(model)
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


def load_float_state(path: str | Path) -> tuple[dict[str, Tensor], bool]:
    """The detector weights of a float checkpoint (a Lightning ``.ckpt`` of this module or a plain state dict),
    and whether its architecture has torchvision's ``FrozenBatchNorm2d`` (it was fine-tuned from pretrained
    weights), read off its hyper-parameters or, for a plain state dict, off its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from checkpoint {path} does not exist; train the float model first "
                                "(e.g. fqn fit --config synthetic_float) or pass the right path")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:
        hparams = state.get("hyper_parameters", {})
        if hparams.get("quant"):
            raise ValueError(f"init_from {path} is a quantized (QAT) checkpoint; QAT starts from a float one")
        state = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
        frozen = pretrained(hparams)
    else:  # BatchNorm2d counts its batches; FrozenBatchNorm2d has no such buffer
        frozen = not any(k.endswith("num_batches_tracked") for k in state)
    if not state:
        raise ValueError(f"init_from {path} holds no detector weights")
    return state, frozen


@dataclass
class RunDetector:
    """The detector a training run starts from: see `detector_for_run`."""

    model: FasterRCNN
    float_copy: FasterRCNN | None
    frozen_bn: bool


def detector_for_run(backbone: str, num_classes: int, *, quant: QuantConfig | None = None,
                     init_from: str | None = None, weights: str | None = None, weights_backbone: str | None = None,
                     min_size: int = 160, max_size: int = 160, frozen_bn: bool | None = None,
                     detector: dict[str, Any] | None = None, keep_float_copy: bool = False) -> RunDetector:
    """The detector a run trains: built, loaded from ``init_from`` (a float checkpoint or state dict), then
    prepared for QAT when ``quant`` is given; with ``keep_float_copy``, also the float model before preparing
    (a distillation teacher). ``frozen_bn`` None: the architecture of what it starts from (torchvision weights,
    or the checkpoint's); the resolved value is returned, for the run to record."""
    state, frozen = load_float_state(init_from) if init_from else (None, None)
    if frozen_bn is None:  # torchvision weights freeze BN
        frozen_bn = frozen if frozen is not None else bool(weights or weights_backbone)
    model = build_detector(backbone, num_classes, weights=weights, weights_backbone=weights_backbone,
                           min_size=min_size, max_size=max_size, frozen_bn=frozen_bn, box_roi_pool=fast_roi_pool(),
                           **(detector or {}))
    if state is not None:
        hint = f"init_from {init_from} does not fit a {backbone} detector with {num_classes} classes"
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches: torch's message lists them after its first line
            raise ValueError(f"{hint}: {str(err).strip().splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ValueError(f"{hint}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    elif quant is not None and weights is None:
        log.warning("QAT without init_from or weights starts from random weights")
    float_copy = copy.deepcopy(model) if keep_float_copy else None
    if quant is not None:
        prepare_qat(model, quant)
        log.info("quantized scope: %s", scope_summary(model))
    return RunDetector(model, float_copy, frozen_bn)
