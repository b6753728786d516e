"""Layer sensitivity and the mixed-precision layer choice: which layers cost the detector the most when quantized.

`layer_sensitivity` ranks layers by the noise they add to the detector's outputs, quantizing or keeping float one
layer at a time; `choose_layer_bits` turns a one-layer-at-a-time ranking into `QuantConfig.layer_bits` within a
weight-storage budget, and `keep_float_patterns` a keep-float ranking into `QuantConfig.keep_float` patterns.

It lives with the models, not in `fqn.quant`, because the ranking runs the Faster R-CNN's own parts
(`head_outputs` on the float model's `float_proposals`, so every run sees the same RoIs) and names layers the
way the quantizable RPN head lays out its per-level quantizers. ``fqn analyze --sensitivity / --layer-bits`` and
``fqn ablate --table beyond`` call it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fqn.models.faster_rcnn import float_proposals, head_outputs
from fqn.quant.fake_quant import FakeQuantize, Phase, phase_of, quantizers

_LEVEL_TABLES = {"conv_fq": "conv.{row}.0", "cls_fq": "cls_logits", "bbox_fq": "bbox_pred"}
"""The RPN head's per-level output quantizers (``rpn.head.cls_fq.ROW.LEVEL``) and the layer each follows."""


def layer_of(quantizer_name: str) -> str:
    """The layer a quantizer belongs to, as `QuantConfig.keep_float`/``layer_bits`` name it: ``a.conv1.act_fq`` ->
    ``a.conv1``; the RPN head's per-level outputs ``rpn.head.cls_fq.0.2`` -> ``rpn.head.cls_logits``.

    Example:
        >>> layer_of("rpn.head.cls_fq.0.2")
        'rpn.head.cls_logits'
    """
    parts = quantizer_name.split(".")
    for i, part in enumerate(parts):
        if part.endswith("_fq"):
            owner = ".".join(parts[:i]) or quantizer_name
            if part in _LEVEL_TABLES and len(parts) == i + 3 and parts[i + 1].isdigit():
                return f"{owner}.{_LEVEL_TABLES[part].format(row=parts[i + 1])}"
            return owner
    return quantizer_name


def _noise_of_heads(ref: dict[str, Tensor], out: dict[str, Tensor]) -> float:
    """Mean over the outputs of noise power / signal power: 0 when every output is exact."""
    return sum(float((ref[k].double() - out[k].double()).square().sum() / ref[k].double().square().sum().clamp_min(
        1e-300)) for k in ref) / len(ref)


def _db(noise: float) -> float:
    return math.inf if noise <= 0 else -10 * math.log10(noise)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, images: Sequence[Tensor], mode: str = "keep_float",
                      progress: bool = False) -> list[dict[str, Any]]:
    """Rank layers by how much they cost, in SQNR (dB) of the detector's outputs against float.

    The outputs: FPN levels, RPN head outputs and the box head's class logits and box deltas on the
    float model's proposals (so every run sees the same RoIs); the SQNR is of their mean relative
    noise power. ``keep_float``: the whole model quantized except one layer at a time (the gain of
    keeping it float); ``only``: one layer at a time quantized, the rest float (its own damage, what
    `choose_layer_bits` ranks by). Each row: ``layer``, ``sqnr_db``, ``cost_db``, ``noise`` (the
    relative noise power), ``weights`` (the layer's weight count, 0 for an add). Most costly first.
    """
    if mode not in ("keep_float", "only"):
        raise ValueError(f"mode must be keep_float or only, got {mode!r}")
    groups: dict[str, list[FakeQuantize]] = {}
    for name, q in quantizers(model):
        groups.setdefault(layer_of(name), []).append(q)
    modules = dict(model.named_modules())
    images = list(images)
    with phase_of(model, Phase.FLOAT):
        proposals = float_proposals(model, images)
        ref = head_outputs(model, images, proposals)
    with phase_of(model, Phase.QUANTIZE):
        full = _noise_of_heads(ref, head_outputs(model, images, proposals))
    rows = []
    items = list(groups.items())
    if progress:
        items = tqdm(items, desc=f"sensitivity ({mode})", unit="layer")
    for layer, qs in items:
        with phase_of(model, Phase.QUANTIZE if mode == "keep_float" else Phase.FLOAT):
            for q in qs:
                q.enable_fake_quant(mode == "only")
                q.enable_observer(mode == "only" and q.role == "weight")  # a weight quantizes its current value
            noise = _noise_of_heads(ref, head_outputs(model, images, proposals))
        sqnr = _db(noise)
        cost = sqnr - _db(full) if mode == "keep_float" else -sqnr
        weight = getattr(modules.get(layer), "weight", None)
        rows.append({"layer": layer, "sqnr_db": sqnr, "cost_db": cost, "noise": noise, "mode": mode,
                     "weights": int(weight.numel()) if isinstance(weight, Tensor) else 0})
    rows.sort(key=lambda r: r["cost_db"], reverse=True)
    return rows


def choose_layer_bits(ranking: Sequence[dict[str, Any]], *, low: int = 4, high: int = 8,
                      budget: float = 0.25) -> dict[str, int]:
    """Mixed precision: the layers of a ``mode="only"`` ranking raised to ``high`` bits (`QuantConfig.layer_bits`).

    Most output noise per added weight bit first, while the added bits stay within ``budget`` times the
    weight bits of the all-``low`` model. Layers without weights (adds) stay at ``low``.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
        raise ValueError(f"budget must be >= 0 (a fraction of the low-bit weight storage), got {budget!r}")
    if low >= high:
        raise ValueError(f"mixed precision raises layers from low to high bits; got low={low}, high={high}")
    if any(r.get("mode") != "only" for r in ranking):
        raise ValueError("choose_layer_bits needs the one-layer-at-a-time ranking: layer_sensitivity(mode='only')")
    weighted = [r for r in ranking if r["weights"] > 0]
    allowance = budget * low * sum(r["weights"] for r in weighted)
    spent, chosen = 0, {}
    for r in sorted(weighted, key=lambda r: -r["noise"] / r["weights"]):
        cost = r["weights"] * (high - low)
        if r["noise"] > 0 and spent + cost <= allowance:
            chosen[r["layer"]] = high
            spent += cost
    return chosen


def keep_float_patterns(sensitivity: list[dict[str, Any]], top: int = 3) -> list[str]:
    """The ``keep_float`` patterns (QuantConfig) of the ``top`` most costly layers of a keep_float ranking."""
    return [r["layer"] for r in sensitivity[:top] if r["cost_db"] > 0]
