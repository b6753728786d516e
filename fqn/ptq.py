"""The PTQ path: the FQN pipeline without fine-tuning (fold BN, prepare, calibrate), ready to convert.

This is the "before" of every QAT result: same quantizer placement, same calibration
images, no training. The activation ranges come from the percentile observer by
default (P), or from the L2 histogram search or plain min/max.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from torch import nn

from fqn.config import QuantConfig
from fqn.models.faster_rcnn import prepare_qat
from fqn.quant.calibrate import calibrate

CALIBRATIONS = ("percentile", "histogram", "minmax")


def ptq_config(bits: int, calibration: str = "percentile", **overrides: Any) -> QuantConfig:
    """The QuantConfig of a PTQ run at ``bits`` (weights and activations) with the named range estimate.

    Example:
        >>> ptq_config(8).flags, ptq_config(4, "histogram").activation_observer
        ('FPC', 'histogram')
        >>> ptq_config(4, "minmax", n_cal=2).n_cal
        2
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    if calibration == "percentile":
        return QuantConfig(bits_w=bits, bits_a=bits, **overrides)
    return QuantConfig(bits_w=bits, bits_a=bits, percentile=False, act_observer=calibration, **overrides)


def post_training_quantize(float_model: nn.Module, batches: Iterable[Any], cfg: QuantConfig, *,
                           num_batches: int | None = None, progress: bool = True) -> nn.Module:
    """A calibrated fake-quant copy of ``float_model`` (the float model is left untouched), in eval mode.

    ``batches`` are calibration batches (image lists or ``(images, targets)``); ``num_batches``
    defaults to ``cfg.n_cal``.
    """
    if getattr(float_model, "fqn_config", None) is not None:
        raise ValueError("post_training_quantize needs the float model, got an already quantized one")
    model = prepare_qat(copy.deepcopy(float_model), cfg)
    calibrate(model, batches, num_batches or cfg.n_cal, progress=progress)
    return model.eval()
