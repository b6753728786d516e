"""The PTQ path: the FQN pipeline without fine-tuning (fold BN, prepare, calibrate), ready to convert.

This is the "before" of every QAT result: same quantizer placement, same calibration
images, no training. The activation ranges come, per layer, from whichever of min/max,
the percentile ranges and the L2 histogram search quantizes the calibration data with
the least measured error (``search``, the default: percentile clipping alone, the
paper's P, cuts the large logits and box deltas that make the top detections at 8 bits),
or from one rule for all layers (``percentile``, ``histogram``, ``minmax``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterable
from typing import Any

from torch import nn

from fqn.config import QuantConfig
from fqn.models.faster_rcnn import head_layer_bits, prepare_qat
from fqn.models.reconstruct import reconstruct_detector
from fqn.quant.bias_correction import correct_bias
from fqn.quant.calibrate import calibrate
from fqn.quant.fake_quant import quantizers
from fqn.quant.range_search import SearchObserver
from fqn.quant.reconstruction import ReconstructionConfig
from fqn.quant.state import quant_config, quant_state

CALIBRATIONS = ("search", "percentile", "histogram", "minmax")
"""PTQ range estimates; ``search`` (per layer, the least measured error) is the default, the strongest."""


def ptq_config(bits: int, calibration: str = "search", *, head_bits: int | None = None,
               **overrides: Any) -> QuantConfig:
    """The QuantConfig of a PTQ run at ``bits`` (weights and activations) with the named range estimate.

    ``head_bits``: the detection heads' layers (`fqn.models.faster_rcnn.HEAD_LAYERS`) at this bit-width instead,
    on top of any ``layer_bits`` given.

    Example:
        >>> ptq_config(8).activation_observer, ptq_config(8, "percentile").flags
        ('search', 'FPC')
        >>> ptq_config(4, "minmax", n_cal=2).n_cal
        2
        >>> ptq_config(4, head_bits=8).layer_bits
        {'rpn.head.*': 8, 'roi_heads.box_predictor.*': 8}
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    if head_bits is not None:
        overrides["layer_bits"] = {**overrides.get("layer_bits", {}), **head_layer_bits(head_bits)}
    if calibration == "percentile":
        return QuantConfig(bits_w=bits, bits_a=bits, **overrides)
    return QuantConfig(bits_w=bits, bits_a=bits, percentile=False, act_observer=calibration, **overrides)


def range_choices(model: nn.Module) -> dict[str, str]:
    """Activation quantizer name -> the range rule it uses (for ``search``: the candidate that won)."""
    cfg = quant_config(model)
    kind = cfg.activation_observer if cfg is not None else "float"
    return {name: (fq.observer.chosen or "search") if isinstance(fq.observer, SearchObserver) else kind
            for name, fq in quantizers(model, "act")}


def ranges_summary(model: nn.Module) -> str:
    """One short line of how the activation ranges were set, e.g. ``"search: l2 41, minmax 19"``.

    Example:
        >>> from fqn import build_detector
        >>> ranges_summary(build_detector("resnet18", 3, min_size=64, max_size=64))
        'float'
    """
    state = quant_state(model)
    if state is None:
        return "float"
    cfg = state.config
    corrected = " + bias correction" if (state.ptq or {}).get("bias_correction") else ""
    rec = (state.ptq or {}).get("reconstruction")
    if rec:
        corrected = f", {rec['reconstruction']} ({rec['iters']} iterations)" + corrected
    if cfg.learn_ranges:  # QAT: the rule only set where the learning started
        corrected += ", then learned (L)"
    if cfg.activation_observer != "search":
        return cfg.activation_observer + corrected
    counts: dict[str, int] = {}
    for rule in range_choices(model).values():
        counts[rule] = counts.get(rule, 0) + 1
    return "search: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) + corrected


def reconstruction_config(reconstruction: str | ReconstructionConfig | None, iters: int | None = None
                          ) -> ReconstructionConfig | None:
    """A method name (``adaround``, ``brecq``, ``qdrop``), a `ReconstructionConfig` or None, as a config."""
    if reconstruction is None or isinstance(reconstruction, ReconstructionConfig):
        if iters is not None and reconstruction is not None:
            return dataclasses.replace(reconstruction, iters=iters)
        return reconstruction
    return ReconstructionConfig(reconstruction, **({"iters": iters} if iters is not None else {}))


def post_training_quantize(float_model: nn.Module, batches: Iterable[Any], cfg: QuantConfig, *,
                           num_batches: int | None = None, bias_correction: bool = False,
                           reconstruction: str | ReconstructionConfig | None = None,
                           progress: bool = True) -> nn.Module:
    """A calibrated fake-quant copy of ``float_model`` (the float model is left untouched), in eval mode.

    ``batches`` are calibration batches (image lists or ``(images, targets)``); ``num_batches``
    defaults to ``cfg.n_cal``. ``reconstruction``: after calibration, learn the weights' rounding
    (and, for ``brecq``/``qdrop``, the activation steps) unit by unit on the same batches
    (`fqn.models.reconstruct`); a method name or a `ReconstructionConfig` (iterations, learning rates).
    ``bias_correction``: then remove each layer's remaining weight-rounding shift of its output mean
    (`fqn.quant.bias_correction`), measured on the same batches. The model remembers how it was made
    in its `QuantState` (``ptq``).
    """
    if quant_state(float_model) is not None:
        raise ValueError("post_training_quantize needs the float model, got an already quantized one")
    rcfg = reconstruction_config(reconstruction)
    n = num_batches or cfg.n_cal
    batches = list(itertools.islice(batches, n))  # used again by reconstruction and bias correction
    model = prepare_qat(copy.deepcopy(float_model), cfg)
    calibrate(model, batches, n, progress=progress)
    record: dict[str, Any] = {"calibration": cfg.activation_observer, "bias_correction": bool(bias_correction),
                              "reconstruction": None}
    if rcfg is not None:
        report = reconstruct_detector(model, batches, rcfg, num_batches=n, progress=progress)
        record["reconstruction"] = {k: v for k, v in report.items() if k != "per_unit"}
    if bias_correction:
        correct_bias(model, batches, n, progress=progress)
    quant_state(model).ptq = record
    return model.eval()
