"""The two PTQ baselines users would otherwise pick, on the same float model and calibration images.

* ONNX Runtime's own ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
  min/max calibration) applied to the FP32 ONNX file of the whole detector.
* torchao's pt2e flow with ``X86InductorQuantizer`` (its default static int8 config), applied
  to the backbone+FPN and the box head, compiled by Inductor and put back into the eager detector
  (the RPN head, RoIAlign, box decoding and NMS stay float eager PyTorch).

These are callers of the two libraries and nothing else: fqn's quantizers are not used.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def ort_quantize_static(float_onnx: str | Path, out_path: str | Path, inputs: Sequence[dict[str, Any]]) -> Path:
    """ONNX Runtime PTQ of ``float_onnx``: calibrated on ``inputs`` (feeds of the model), written to ``out_path``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(list(inputs))

        def get_next(self) -> dict[str, Any] | None:
            return next(self._it, None)

    out_path = Path(out_path)
    quantize_static(str(float_onnx), str(out_path), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return out_path


def _pt2e_quantize(module: nn.Module, example: Tensor, calibration: Sequence[Tensor],
                   dynamic_batch: bool = False) -> nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    dynamic = ({"x": {0: torch.export.Dim("rois", min=2, max=100_000)}},) if dynamic_batch else None
    exported = torch.export.export(module.eval(), (example,), dynamic_shapes=dynamic).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    return convert_pt2e(prepared)


class _Compiled(nn.Module):
    """A compiled pt2e module in place of a float one (eval only)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module)

    def forward(self, x: Tensor) -> Any:
        with torch.no_grad():
            return self.compiled(x)


def torchao_pt2e(float_model: nn.Module, calibration_images: Sequence[Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    """The float detector with its backbone+FPN and box head replaced by torchao pt2e int8 modules (Inductor).

    Returns the detector and ``{"backbone": compiled backbone+FPN (normalised batch in), "bytes": tensor bytes
    of the deployable weights}``.
    """
    model = copy.deepcopy(float_model).eval()
    batches, rois = [], []
    hook = model.roi_heads.box_head.register_forward_hook(lambda m, i, o: rois.append(i[0].detach()))
    with torch.no_grad():
        for img in calibration_images:
            batch = model.transform([img])[0].tensors
            batches.append(batch)
            model([img])
    hook.remove()
    backbone = _pt2e_quantize(model.backbone, batches[0], batches)
    box_head = _pt2e_quantize(model.roi_heads.box_head, rois[0], rois, dynamic_batch=True)
    float_rest = [m for name, m in model.named_children() if name != "backbone"]
    model.backbone = _Compiled(backbone)
    model.backbone.out_channels = float_model.backbone.out_channels
    model.roi_heads.box_head = _Compiled(box_head)
    size = _tensor_bytes(backbone) + _tensor_bytes(box_head)
    size += sum(_tensor_bytes(m) for m in float_rest) - _tensor_bytes(float_model.roi_heads.box_head)
    with torch.no_grad():  # compile now, so the first timed call does not pay for it
        for img in calibration_images[:2]:
            model([img])
    return model, {"backbone": model.backbone, "bytes": size}


def _tensor_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    tensors = list(module.state_dict().values())
    tensors += [v for v in vars(module).values() if isinstance(v, Tensor)]
    if isinstance(module, torch.fx.GraphModule):  # pt2e keeps int8 weights as plain attributes
        tensors += [getattr(module, n.target) for n in module.graph.nodes if n.op == "get_attr"
                    and isinstance(getattr(module, n.target, None), Tensor)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
