"""Reconstruction of a prepared torchvision Faster R-CNN: its units, their inputs and their float targets.

`fqn.quant.reconstruction` learns a unit's rounding from recorded calls. This module says what the
units of a detector are, in the order the network runs them: each residual block (BasicBlock,
Bottleneck, InvertedResidual), every quantized layer outside a block (the stem conv), the whole FPN
(its levels merge top-down, so they are one block), the RPN head (shared across levels: all its calls
together) and the box head with the box predictor. It records, per calibration batch, a unit's input
in the quantized network (the units before it already reconstructed), its input in the float network
and the float output.

The box head needs one care: the quantized and the float RPN propose different boxes, so their RoI
features do not line up. Both are pooled here on the quantized network's proposals (its best
`BOX_ROIS` per image, those that become detections), from each network's own FPN features.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fqn.models.quantizable import (
    QuantBasicBlock,
    QuantBottleneck,
    QuantFPN,
    QuantInvertedResidual,
    QuantRPNHead,
)
from fqn.quant.calibrate import batch_images, model_device, progress_bar
from fqn.quant.fake_quant import Phase, phase_of, quantizers, set_phase
from fqn.quant.reconstruction import (
    ReconstructionConfig,
    Sample,
    error_ratio,
    quantized_layers,
    reconstruct,
    recording,
    run_until_stopped,
    seeded,
)
from fqn.quant.state import quant_state

log = logging.getLogger(__name__)

BLOCKS = (QuantBasicBlock, QuantBottleneck, QuantInvertedResidual, QuantFPN, QuantRPNHead)
BOX_UNIT = "roi_heads.box_head+box_predictor"
BOX_ROIS = 100
"""RoIs per image the box head is reconstructed on: the quantized RPN's best, those that become detections."""


class BoxHeadChain(nn.Module):
    """The box head then the box predictor, as one unit (a view of the detector's modules, not a copy)."""

    def __init__(self, head: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.head, self.predictor = head, predictor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.predictor(self.head(x))


def units(model: nn.Module, images: list[Tensor]) -> list[tuple[str, int]]:
    """``(name, calls per forward)`` of every unit of ``model``, in the order a forward on ``images`` runs them.

    The box head (`BOX_UNIT`) comes last, where it runs.
    """
    named = dict(model.named_modules())
    blocks = [n for n, m in named.items() if isinstance(m, BLOCKS)]
    blocks = [n for n in blocks if not any(n.startswith(b + ".") for b in blocks)]
    box = [n for n in ("roi_heads.box_head", "roi_heads.box_predictor") if n in named]
    inside = tuple(b + "." for b in blocks + box)
    loose = [n for n, m in named.items() if n and getattr(m, "weight_fq", None) is not None
             and not n.startswith(inside) and n not in box]
    order: dict[str, int] = {}
    handles = [named[n].register_forward_pre_hook(lambda _m, _a, n=n: order.__setitem__(n, order.get(n, 0) + 1))
               for n in blocks + loose]
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    found = list(order.items())  # dicts keep first-call order
    if len(box) == 2 and quantized_layers(_module(model, BOX_UNIT)):
        found.append((BOX_UNIT, 1))
    return found


def _module(model: nn.Module, name: str) -> nn.Module:
    if name == BOX_UNIT:
        return BoxHeadChain(model.roi_heads.box_head, model.roi_heads.box_predictor)
    return model.get_submodule(name)


def _box_samples(model: nn.Module, reference: nn.Module, images: list[Tensor], keep_float_args: bool) -> Sample:
    """The box head's sample of one batch: RoI features of both networks on the quantized network's proposals."""
    feeds = []
    for net in (model, reference):
        with recording(net.roi_heads, stop_after=1, inputs_only=True) as calls:
            run_until_stopped(net, images)
        feeds.append(calls[0])
    (qfeats, proposals, shapes), ffeats = feeds[0].args[:3], feeds[1].args[0]
    proposals = [p[:BOX_ROIS] for p in proposals]
    with torch.no_grad():
        q_roi = model.roi_heads.box_roi_pool(qfeats, proposals, shapes)
        f_roi = reference.roi_heads.box_roi_pool(ffeats, proposals, shapes)
        target = _module(reference, BOX_UNIT)(f_roi)
    return Sample((q_roi,), {}, target, (f_roi,) if keep_float_args else None, rows=True)


def unit_samples(model: nn.Module, reference: nn.Module, name: str, calls: int, batches: list[list[Tensor]],
                 keep_float_args: bool) -> list[Sample]:
    """Every call of unit ``name`` on ``batches``: the quantized network's arguments, the float network's output."""
    samples = []
    for images in batches:
        if name == BOX_UNIT:
            samples.append(_box_samples(model, reference, images, keep_float_args))
            continue
        with recording(model.get_submodule(name), stop_after=calls) as q_calls:
            run_until_stopped(model, images)
        with recording(reference.get_submodule(name), stop_after=calls) as f_calls:
            run_until_stopped(reference, images)
        samples += [Sample(q.args, q.kwargs, f.output, f.args if keep_float_args else None)
                    for q, f in zip(q_calls, f_calls)]
    return samples


def _layer_samples(unit: nn.Module, reference: nn.Module, layer: str, samples: list[Sample]) -> list[Sample]:
    """Calls of ``layer`` inside a unit run on its recorded samples: quantized inputs, float outputs."""
    out = []
    for s in samples:
        with recording(unit.get_submodule(layer)) as q_calls:
            run_until_stopped(unit, *s.args, **s.kwargs)
        with recording(reference.get_submodule(layer)) as f_calls:
            # no keywords: a unit's only one is a layer's ``grid``, a quantizer of the quantized network
            run_until_stopped(reference, *(s.float_args or s.args))
        out += [Sample(q.args, q.kwargs, f.output) for q, f in zip(q_calls, f_calls)]
    return out


def reconstruct_detector(model: nn.Module, batches: Iterable[Any], cfg: ReconstructionConfig, *,
                         num_batches: int, progress: bool = True) -> dict[str, Any]:
    """Reconstruct a calibrated, prepared detector in place, unit by unit; returns what it did.

    The float reference is a copy of ``model`` with every quantizer off (the same weights before any
    rounding was learned). Each unit's samples are recorded after the units before it were reconstructed.
    The report: method, iterations, units, calibration batches and images, and the geometric mean over
    units of the learned output error relative to nearest rounding's (``error_ratio``, below 1 is better).
    """
    if quant_state(model) is None:
        raise ValueError("reconstruction needs a prepared, calibrated model (post_training_quantize does both)")
    acts = quantizers(model, "act")
    if not acts or not all(fq.is_calibrated for _, fq in acts):
        raise ValueError("reconstruction needs calibrated activation ranges: run fqn.calibrate first")
    device = model_device(model)
    image_batches = [[im.to(device) for im in batch_images(b)] for _, b in zip(range(num_batches), batches)]
    if not image_batches:
        raise ValueError("reconstruction needs at least one calibration batch")
    was_training = model.training
    model.eval()
    reference = copy.deepcopy(model)
    set_phase(reference, Phase.FLOAT)
    report: list[dict[str, Any]] = []
    with phase_of(model, Phase.QUANTIZE):
        found = units(model, image_batches[0])
        stages = 2 if cfg.method == "brecq" and cfg.learns_activations else 1  # rounding, then the steps
        steps = sum(cfg.iters * (len(quantized_layers(_module(model, n))) if cfg.method == "adaround" else stages)
                    for n, _ in found)
        bar = progress_bar(steps, progress, f"{cfg.method} reconstruction")
        try:
            for index, (name, calls) in enumerate(found):
                unit, ref = _module(model, name), _module(reference, name)
                if not quantized_layers(unit):
                    continue
                bar.set_description(f"{cfg.method}: {name}")
                start = time.perf_counter()
                samples = unit_samples(model, reference, name, calls, image_batches,
                                       keep_float_args=cfg.method != "brecq")
                unit_cfg = seeded(cfg, index)
                if cfg.method == "adaround":
                    names = {m: n for n, m in unit.named_modules()}
                    for layer in quantized_layers(unit):
                        rel = names[layer]
                        layer_samples = _layer_samples(unit, ref, rel, samples) if rel else samples
                        own = [q for q in (layer.act_fq, layer.preact_fq) if q is not None]
                        result = reconstruct(layer, layer_samples, unit_cfg, layers=[layer], outputs_float=own,
                                             step=bar.update)
                        report.append({"unit": f"{name}.{rel}" if rel else name, **result})
                else:
                    result = reconstruct(unit, samples, unit_cfg, step=bar.update)
                    report.append({"unit": name, **result})
                report[-1]["seconds"] = time.perf_counter() - start
                log.debug("%s %s: output error %.4g -> %.4g", cfg.method, name, result["nearest"], result["learned"])
        finally:
            bar.close()
    model.train(was_training)
    return {"reconstruction": cfg.method, "iters": cfg.iters, "units": len(report),
            "calibration_batches": len(image_batches), "calibration_images": sum(len(b) for b in image_batches),
            "error_ratio": round(error_ratio(report), 4),
            "per_unit": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in report]}


__all__ = ["BLOCKS", "BOX_UNIT", "BOX_ROIS", "BoxHeadChain", "units", "unit_samples", "reconstruct_detector"]
