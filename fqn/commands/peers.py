"""The two PTQ baselines users would otherwise pick, on the same float model and calibration images.

* ONNX Runtime's own ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
  min/max calibration) applied to the FP32 ONNX file of the whole detector, quantizing the
  compute ops (`ORT_OPS`) of the network (`COMPUTE_SCOPES`: backbone, FPN, RPN head, box head and
  predictor), the scope fqn quantizes. Its default op list also quantizes ops of the box-decoding
  glue, and that model crashed ONNX Runtime 1.32 (segfault) on a validation image with few
  proposals; even restricted to `ORT_OPS`, the glue's Adds (anchors, box decoding, the RoI level
  mapper) got 8-bit ranges, and the quickstart's model lost 17 AP points (0.434 against 0.609).
* torchao's pt2e flow with ``X86InductorQuantizer`` (its default static int8 config), applied
  to the backbone+FPN and the box head, compiled by Inductor and put back into the eager detector
  (the RPN head, RoIAlign, box decoding and NMS stay float eager PyTorch).

These are callers of the two libraries and nothing else: fqn's quantizers are not used.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from fqn.quant.fold import fold_bn

ORT_OPS = ("Conv", "Gemm", "MatMul", "Add", "Resize", "MaxPool", "Relu")
# ONNX node-name scopes (torch.onnx names nodes by module path) of the network proper: anchors, box decoding
# and RoI level mapping stay float, as in fqn's own int8 files
COMPUTE_SCOPES = ("/backbone/", "/rpn/head/", "/roi_heads/box_head/", "/roi_heads/box_predictor/")


def glue_nodes(model: Any) -> list[str]:
    """Names of the `ORT_OPS` nodes of an ONNX detector outside `COMPUTE_SCOPES`: what the ORT peer leaves float."""
    return [n.name for n in model.graph.node if n.op_type in ORT_OPS and not any(s in n.name for s in COMPUTE_SCOPES)]


def ort_quantize_static(float_onnx: str | Path, out_path: str | Path, inputs: Sequence[dict[str, Any]]) -> Path:
    """ONNX Runtime PTQ of ``float_onnx``: calibrated on ``inputs`` (feeds of the model), written to ``out_path``."""
    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(list(inputs))

        def get_next(self) -> dict[str, Any] | None:
            return next(self._it, None)

    out_path = Path(out_path)
    quantize_static(str(float_onnx), str(out_path), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(ORT_OPS),
                    nodes_to_exclude=glue_nodes(onnx.load(str(float_onnx), load_external_data=False)))
    return out_path


def fold_batchnorm(model: nn.Module) -> int:
    """Fold (`fqn.quant.fold.fold_bn`) every BatchNorm2d that directly follows a Conv2d among its siblings.

    pt2e's X86InductorQuantizer expects BN already folded: exported with BN, its conv+add+ReLU pattern
    matcher fails ("Input partition has more than one output node"). Returns how many were folded.
    """
    count = 0
    for module in list(model.modules()):
        children = list(module.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fold_bn(conv, bn))
                setattr(module, bn_name, nn.Identity())
                count += 1
    return count


class _BasicBlock(nn.Module):
    """torchvision's BasicBlock with one ReLU module per call site (pt2e matches patterns per module)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu_out(self.bn2(self.conv2(out)) + identity)


class _Bottleneck(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu_mid(self.bn2(self.conv2(out)))
        return self.relu_out(self.bn3(self.conv3(out)) + identity)


def unshare_relus(model: nn.Module) -> int:
    """Give every ResNet block one ReLU per call site, as torchvision's quantizable ResNet does.

    torchvision's blocks call one ``relu`` module two or three times; pt2e's X86InductorQuantizer
    then fails ("Input partition has more than one output node").
    """
    count = 0
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            bottleneck = isinstance(m, Bottleneck)
            m.__class__ = type(f"Unshared{type(m).__name__}", (_Bottleneck if bottleneck else _BasicBlock,), {})
            m.relu_out = nn.ReLU()
            if bottleneck:
                m.relu_mid = nn.ReLU()
            count += 1
    return count


def _pt2e_quantize(module: nn.Module, example: Tensor, calibration: Sequence[Tensor],
                   dynamic_batch: bool = False) -> nn.Module:
    # torchao is imported only when its peer runs (--peers torchao): its import takes about a second and logs
    # torch warnings, which every other command and `--no-peers` would pay for
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    dynamic = ({0: torch.export.Dim("rois", min=2, max=100_000)},) if dynamic_batch else None
    exported = torch.export.export(module.eval(), (example,), dynamic_shapes=dynamic).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    converted = convert_pt2e(prepared)
    allow_exported_model_train_eval(converted)  # the detector's .eval() reaches it
    return converted


class _Compiled(nn.Module):
    """A compiled pt2e module in place of a float one (eval only).

    ``per_image``: the module was exported for one image, so a batch runs image by image
    (the detector's evaluation batches several images; timing uses one).
    """

    def __init__(self, module: nn.Module, per_image: bool = False) -> None:
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module)
        self.per_image = per_image

    def forward(self, x: Tensor) -> Any:
        with torch.no_grad():
            if not self.per_image or x.shape[0] == 1:
                return self.compiled(x)
            outs = [self.compiled(x[i:i + 1]) for i in range(x.shape[0])]
            return type(outs[0])((k, torch.cat([o[k] for o in outs])) for k in outs[0])


def torchao_pt2e(float_model: nn.Module, calibration_images: Sequence[Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    """The float detector with its backbone+FPN and box head replaced by torchao pt2e int8 modules (Inductor).

    Sets ``torch._inductor.config.freezing = True`` for the process, as torchao's pt2e guide asks.

    Returns the detector and ``{"backbone": compiled backbone+FPN (normalised batch in), "bytes": tensor bytes
    of the deployable weights}``.
    """
    import torch._inductor.config as inductor_config  # Inductor, like torchao, only for the torchao peer

    inductor_config.freezing = True  # constant weights: what lets Inductor fuse the int8 conv/linear patterns
    model = copy.deepcopy(float_model).eval()
    fold_batchnorm(model)
    unshare_relus(model)
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
    model.backbone = _Compiled(backbone, per_image=True)
    model.backbone.out_channels = float_model.backbone.out_channels
    model.roi_heads.box_head = _Compiled(box_head)
    size = _saved_bytes(backbone) + _saved_bytes(box_head) + sum(
        _saved_bytes(m) for name, m in model.roi_heads.named_children() if name != "box_head") + _saved_bytes(
        model.rpn)
    with torch.no_grad():  # compile now, so the first timed call does not pay for it
        for img in calibration_images[:2]:
            model([img])
    return model, {"backbone": model.backbone, "bytes": size}


def _saved_bytes(module: nn.Module) -> int:
    """Bytes of the module's weights as ``torch.save`` writes them (pt2e modules keep int8 weights as constants)."""
    tensors = dict(module.state_dict())
    if isinstance(module, torch.fx.GraphModule):  # only what the graph reads (the float originals stay attached)
        tensors = {}
        for node in module.graph.nodes:
            value = getattr(module, str(node.target), None) if node.op == "get_attr" else None
            if isinstance(value, Tensor):
                tensors[str(node.target)] = value
    buf = io.BytesIO()
    torch.save({k: v.detach().contiguous() for k, v in tensors.items()}, buf)
    return buf.tell()
