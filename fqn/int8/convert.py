"""``convert_int8`` / ``load_int8``: a fake-quantized fqn detector as a real int8 model, and back as a callable.

The whole torchvision detector goes into one ONNX file (resize/normalise, backbone,
FPN, RPN with anchors and NMS, RoIAlign, box head, box decoding and NMS) with
dynamic image size. Parts (backbone+FPN, the head outputs) can be written too,
for latency and parity checks.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

import fqn
from fqn.int8.onnx_qdq import GraphConstants, export_onnx
from fqn.int8.runtime import OnnxDetector, make_session
from fqn.models.roi_pool import FastMultiScaleRoIAlign
from fqn.quant.fake_quant import quant_range, quantizers
from fqn.quant.prepare import check_input_grids
from fqn.quant.state import quant_config

_IMAGE_AXES = {"image": {1: "height", 2: "width"}}


def _with_child(module: nn.Module, name: str, child: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose child ``name`` is ``child``; ``module`` and its other children are shared."""
    clone = copy.copy(module)
    clone._modules = type(module._modules)(module._modules)
    clone._modules[name] = child
    return clone


def export_form(model: nn.Module) -> nn.Module:
    """The detector as it is exported: a torchvision RoI pooler replaced by fqn's `FastMultiScaleRoIAlign`.

    torchvision's pooler merges its levels by a ScatterElements per level, fqn's by one Concat + Gather,
    the same outputs. The model given is left as it is: the export form is a shallow copy that shares
    every weight and quantizer with it and holds a new pooler.
    """
    heads = getattr(model, "roi_heads", None)
    pooler = getattr(heads, "box_roi_pool", None)
    if type(pooler) is not MultiScaleRoIAlign:
        return model
    return _with_child(model, "roi_heads", _with_child(heads, "box_roi_pool", FastMultiScaleRoIAlign.like(pooler)))


def check_quantized(model: nn.Module) -> Any:
    """The model's QuantConfig, or an error that says why this model cannot become an int8 model."""
    cfg = quant_config(model)
    if cfg is None or not quantizers(model):
        raise ValueError("this is a float model: int8 conversion needs a quantized one. Run PTQ "
                         "(fqn.ptq.post_training_quantize or `fqn compare`) or pass a QAT checkpoint")
    acts = quantizers(model, "act")
    missing = [name for name, q in acts if not q.is_calibrated]
    if missing:
        raise ValueError(f"{len(missing)} of {len(acts)} activation quantizers have no range ({missing[0]} ...): "
                         "calibrate the model (fqn.calibrate) before converting it")
    if cfg.bits_a > 8 or cfg.bits_w > 8:
        raise ValueError("int8 conversion needs bits_w and bits_a <= 8")
    check_input_grids(model)
    return cfg


def _check_images(images: Sequence[Tensor]) -> list[Tensor]:
    images = list(images) if images is not None else []
    if not images or not all(isinstance(i, Tensor) and i.dim() == 3 and i.shape[0] == 3 for i in images):
        raise ValueError("example_images must be a non-empty list of 3xHxW float image tensors")
    return [i.detach().float().cpu() for i in images]


class _Detector(nn.Module):
    """One image in, ``(boxes, labels, scores)`` out: the exportable signature of a torchvision detector."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model([image])[0]
        return out["boxes"], out["labels"], out["scores"]


def normalize(transform: nn.Module, batch: Tensor) -> Tensor:
    """``batch`` (Nx3xHxW in [0, 1]) normalised with the detector transform's mean and std."""
    mean = torch.tensor(transform.image_mean, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(transform.image_std, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean) / std


class BackboneFPN(nn.Module):
    """Normalise + backbone + FPN on an already resized 1x3xHxW batch: the part the int8 kernels speed up most."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.transform, self.backbone = model.transform, model.backbone

    def forward(self, batch: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.backbone(normalize(self.transform, batch)).values())


class HeadOutputs(BackboneFPN):
    """Backbone + FPN + RPN head: the FPN levels and the RPN logits/deltas per level (parity checks)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.rpn_head = model.rpn.head

    def forward(self, batch: Tensor) -> tuple[Tensor, ...]:
        feats = super().forward(batch)
        logits, deltas = self.rpn_head(list(feats))
        return (*feats, *logits, *deltas)


def resized_batch(model: nn.Module, image: Tensor) -> Tensor:
    """The 1x3xHxW batch (resized, padded, not normalised) that ``model.transform`` makes of one image."""
    t = model.transform
    with torch.no_grad():
        resized, _ = t.resize(image, None)
        return t.batch_images([resized], size_divisible=t.size_divisible)


def _metadata(model: nn.Module, cfg: Any, extra: dict[str, Any] | None, pack_int4: bool = False) -> dict[str, str]:
    weights = "float" if cfg is None else "int4-packed" if pack_int4 and cfg.bits_w <= 4 else "int8"
    if cfg is not None and pack_int4 and getattr(cfg, "layer_bits", None):
        weights = "int4-packed where 4-bit, int8 elsewhere"
    meta = {"fqn.version": fqn.__version__, "fqn.bits": "float" if cfg is None else f"w{cfg.bits_w}a{cfg.bits_a}",
            "fqn.weights": weights,
            "fqn.quant_config": json.dumps(cfg.to_dict() if cfg is not None else None),
            "fqn.num_classes": str(model.roi_heads.box_predictor.cls_score.out_features)}
    meta.update({f"fqn.{k}": json.dumps(v) for k, v in (extra or {}).items()})
    return meta


def _weight_range(cfg: Any) -> tuple[int, int] | None:
    """The integer range weight codes are clamped to: the widest layer's (mixed precision: `layer_bits`)."""
    if cfg is None:
        return None
    bits = max([cfg.bits_w, *getattr(cfg, "layer_bits", {}).values()])
    return quant_range(bits, cfg.symmetric_weights)


def _packed(model: nn.Module, cfg: Any, extra: dict[str, Any] | None,
            packed_path: str | Path | None) -> tuple[Path, dict[str, str]] | None:
    """``export_onnx``'s ``packed=`` argument for a packed-INT4 file at ``packed_path`` (its folder made), or None."""
    if packed_path is None:
        return None
    Path(packed_path).parent.mkdir(parents=True, exist_ok=True)
    return Path(packed_path), _metadata(model, cfg, extra, True)


def _export_detector(model: nn.Module, path: str | Path, example_images: Sequence[Tensor], cfg: Any,
                     metadata: dict[str, Any] | None, pack_int4: bool = False,
                     packed_path: str | Path | None = None) -> Path:
    images = _check_images(example_images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    export_onnx(_Detector(export_form(model)).eval(), (images[0],), path, input_names=["image"],
                output_names=["boxes", "labels", "scores"], dynamic_axes=_IMAGE_AXES, quantized=cfg is not None,
                metadata=_metadata(model, cfg, metadata, pack_int4), weight_range=_weight_range(cfg),
                pack_int4=pack_int4, packed=_packed(model, cfg, metadata, packed_path))
    return path


def convert_int8(model: nn.Module, path: str | Path, example_images: Sequence[Tensor], *,
                 metadata: dict[str, Any] | None = None, pack_int4: bool = False,
                 packed_path: str | Path | None = None) -> Path:
    """Write the quantized ``model`` as one int8 ONNX file (whole detector, dynamic image size); returns the path.

    Uses the model's own scales and zero points and its BN-folded weights rounded by torch's fake
    quantizer, so the int8 model computes what the fake-quant model simulated. ``example_images``
    (3xHxW) only drive the trace; any image size runs afterwards.

    The file is the one to deploy: ONNX Runtime and OpenVINO, opened plainly, run it on integer
    kernels at any bit-width <= 8 (k-bit weights are held in INT8). ``pack_int4=True`` writes
    <= 4-bit weights as packed INT4 instead: about half the size, for storage and transfer; `load_int8`
    widens them in memory, but a plain runtime session does not fuse INT4 weights and runs slower than float.
    ``packed_path`` writes that packed file as well, from the same trace as ``path`` (one trace, not two).

    Example:
        >>> path = convert_int8(qat_model, "model_w8a8.onnx", [image])  # doctest: +SKIP
        >>> detections = load_int8(path)([image])  # doctest: +SKIP
    """
    return _export_detector(model, path, example_images, check_quantized(model), metadata, pack_int4, packed_path)


def export_float(model: nn.Module, path: str | Path, example_images: Sequence[Tensor]) -> Path:
    """The float detector as one ONNX file, same signature as `convert_int8` (the FP32 and ORT-PTQ baselines)."""
    return _export_detector(model, path, example_images, None, None)


def export_part(model: nn.Module, part: str, path: str | Path, example_image: Tensor, *,
                pack_int4: bool = False, packed_path: str | Path | None = None) -> Path:
    """Write ``part`` ("backbone_fpn" or "heads") of a float or quantized detector; input: `resized_batch`.
    ``packed_path``: also its packed-INT4 storage file, from the same trace (as `convert_int8`)."""
    parts = {"backbone_fpn": BackboneFPN, "heads": HeadOutputs}
    if part not in parts:
        raise ValueError(f"unknown part {part!r}; choose one of {sorted(parts)}")
    cfg = quant_config(model)
    if cfg is not None:
        check_quantized(model)
    model = model.cpu().eval()
    module = parts[part](model).eval()
    batch = resized_batch(model, example_image)
    with torch.no_grad():
        n_out = len(module(batch))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(module, (batch,), path, input_names=["batch"], output_names=[f"out{i}" for i in range(n_out)],
                dynamic_axes={"batch": {2: "height", 3: "width"}}, quantized=cfg is not None,
                metadata=_metadata(model, cfg, {"part": part}, pack_int4), weight_range=_weight_range(cfg),
                pack_int4=pack_int4, packed=_packed(model, cfg, {"part": part}, packed_path))
    return path


def load_int8(path: str | Path, threads: int | None = None, runtime: str = "onnxruntime") -> OnnxDetector:
    """The int8 detector written by `convert_int8`, as a callable: ``load_int8(path)(images)`` -> detections.

    ``runtime``: ``"onnxruntime"`` (the default) or ``"openvino"`` (the optional ``openvino`` package;
    about twice as fast on x86 CPUs with VNNI/AMX, measured in the README). Both read the same file.
    """
    return OnnxDetector(path, threads, runtime)


def output_steps(path: str | Path) -> dict[str, float | None]:
    """For each graph output, the quantization step (DQ scale) that produced it, or None for a float output."""
    import onnx

    graph = onnx.load(str(path)).graph
    consts = GraphConstants(graph)
    steps: dict[str, float | None] = {}
    for out in graph.output:
        node = consts.producers.get(out.name)
        while node is not None and node.op_type in ("Identity", "Reshape", "Flatten"):
            node = consts.producers.get(node.input[0])
        scale = consts.value(node.input[1]) if node is not None and node.op_type == "DequantizeLinear" else None
        steps[out.name] = None if scale is None else float(np.asarray(scale).reshape(-1)[0])
    return steps


@torch.no_grad()
def head_parity(model: nn.Module, path: str | Path, images: Sequence[Tensor], threads: int | None = None,
                integer_kernels: bool = True) -> dict[str, float]:
    """How closely the int8 "heads" part (`export_part`) reproduces the fake-quant model, in quantization steps.

    Returns the fraction of elements equal, within one step, and the largest difference in
    steps, over all FPN/RPN outputs and images. ``integer_kernels=False`` runs the same graph
    in float in ORT instead (see `make_session`).
    """
    session, _ = make_session(path, threads, integer_kernels)
    steps = output_steps(path)
    ref_module = HeadOutputs(model.cpu().eval())
    names = [o.name for o in session.get_outputs()]
    equal = within = total = 0
    worst = 0.0
    for img in _check_images(images):
        batch = resized_batch(model, img)
        ref = ref_module(batch)
        got = session.run(names, {"batch": batch.numpy()})
        for name, r, g in zip(names, ref, got):
            step = steps[name]
            if step is None:
                raise ValueError(f"output {name} of {path} is not quantized: export the heads of a quantized model")
            diff = np.abs(r.numpy() - g) / step
            equal += int((diff < 0.5).sum())
            within += int((diff < 1.5).sum())
            total += diff.size
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return {"exact": equal / total, "within_1_step": within / total, "max_steps": round(worst, 3)}
