"""Writer of the int8 backend: a fake-quantized fqn model as an ONNX graph in QDQ form.

Every fqn quantizer becomes QuantizeLinear -> DequantizeLinear with exactly its
scale and zero point; ONNX Runtime (or OpenVINO) then fuses DQ -> Conv/Gemm/Add
-> Q into integer kernels. Nothing is recalibrated or re-quantized by another
tool: the weight codes are computed here with torch's own fake-quantize op, the
one the simulation used, and stored as integer initializers (int4, packed, at
4 bits or less), so the file holds integers, not floats.

Why a custom ``symbolic``: torch's exporter accepts only the (0,255),
(-128,127) and (0,127) ranges, while fqn's weights use the symmetric [-127,127]
range and k < 8 bits use narrower ones. Activations of k < 8 bits are stored
as 8-bit Q -> integer Clip to the k-bit codes -> DQ: the integer kernels are
8-bit, the kernel before the Q still fuses (ONNX Runtime: QLinearConv ->
Clip(uint8) -> QLinearConv; OpenVINO reads it too), and the values are exactly
the k-bit ones. A float DQ -> Clip -> Q after every kernel, the earlier form,
cost as much as the convolutions at KITTI size.

Weights of k <= 4 bits are written as INT8 initializers holding the k-bit codes
(the deployable file: both runtimes fuse it as they open it) or, with
``pack_int4``, as packed INT4 (half the bytes, for storage: a plain ONNX Runtime
session does not fuse INT4 weights and runs it slower than float; fqn's loader
widens them in memory).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fqn.quant.fake_quant import quantizer_modes, quantizers
from fqn.quant.qparams import quantize_dequantize

log = logging.getLogger(__name__)

OPSET = 20  # the newest the TorchScript exporter writes; raised to 21 (type additions only) for int4 weights
INT4_OPSET = 21


class _ExportQDQ(torch.autograd.Function):
    """Fake quantization whose ONNX form is Q -> DQ with constant qparams (export only)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: tuple, zero_point: tuple, qmin: int, qmax: int,
                axis: int | None) -> Tensor:
        s = torch.tensor(scale, dtype=torch.float32, device=x.device)
        z = torch.tensor(zero_point, dtype=torch.int32, device=x.device)
        if axis is None:
            s, z = s.reshape(()), z.reshape(())
        return quantize_dequantize(x.float(), s, z, qmin, qmax, axis)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: tuple, zero_point: tuple, qmin: int, qmax: int, axis: int | None) -> Any:
        zdt = torch.int8 if qmin < 0 else torch.uint8
        s_t = torch.tensor(scale, dtype=torch.float32)
        z_t = torch.tensor(zero_point, dtype=torch.int32)
        kw: dict[str, Any] = {}
        if axis is None:
            s_t, z_t = s_t.reshape(()), z_t.reshape(())
        else:
            kw["axis_i"] = axis
        s = g.op("Constant", value_t=s_t)
        z = g.op("Constant", value_t=z_t.to(zdt))
        q = g.op("QuantizeLinear", x, s, z, **kw)
        full = (-128, 127) if qmin < 0 else (0, 255)
        if axis is None and (qmin, qmax) != full and (qmin, qmax) != (-127, 127):
            # k < 8 bits: clamp the 8-bit codes to the k-bit ones (Q -> Clip -> DQ, integer Clip). Exact: the
            # 8-bit code round(x/s)+z clamped to [qmin, qmax] is the k-bit code; and the kernel before Q still fuses
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(qmin, dtype=zdt)),
                     g.op("Constant", value_t=torch.tensor(qmax, dtype=zdt)))
        return g.op("DequantizeLinear", q, s, z, **kw)


def _export_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                          axis: int | None = None) -> Tensor:
    s = tuple(float(v) for v in scale.detach().float().reshape(-1).cpu())
    z = tuple(int(v) for v in zero_point.detach().reshape(-1).cpu())
    return _ExportQDQ.apply(x, s, z, qmin, qmax, axis)


@contextlib.contextmanager
def qdq_export_mode(model: nn.Module, example_args: tuple) -> Iterator[nn.Module]:
    """Freeze every quantizer's qparams and route fake quantization through `_ExportQDQ`.

    Weight quantizers recompute their range on every call; one forward pass on
    ``example_args`` gives them the current (BN-folded) weights' range, then
    observing stops so the traced graph holds constants. Everything is restored on exit. A model with
    learned ranges is exported from a copy whose ranges are fixed (`LearnedFakeQuantize.fix_range`),
    the model given is left as it is; the module to trace is the one yielded.
    """
    if any(q.learnable for _, q in quantizers(model)):
        model = copy.deepcopy(model)
        for _, q in quantizers(model):
            if q.learnable:
                q.fix_range()
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with quantizer_modes(model) as qs:
            for _, q in qs:
                if q.role == "act":
                    q.enable_observer(False)
            with torch.no_grad():
                model(*example_args)
            _report_floored_scales(model)
            for _, q in qs:
                q.enable_observer(False)
                q.set_export_mode(_export_fake_quantize)
            yield model
    finally:
        for m, training in modes:
            m.training = training


def _report_floored_scales(model: nn.Module) -> None:
    """Say, by layer name, where a weight scale was raised so that the int32 bias fits (`bias_scale_floor`)."""
    floored = {name: m.scale_floored for name, m in model.named_modules() if getattr(m, "scale_floored", 0)}
    if floored:
        log.warning("weight scale raised so the int32 bias fits, in %d layer(s) (channels): %s. These channels' "
                    "weights are near zero next to their bias (near-dead channels); the int8 file and the "
                    "fake-quant model use the same raised scale", len(floored),
                    ", ".join(f"{n} ({c})" for n, c in floored.items()))


def export_onnx(module: nn.Module, args: tuple, path: str | Path | None, *, input_names: Sequence[str],
                output_names: Sequence[str], dynamic_axes: dict[str, dict[int, str]] | None = None,
                quantized: bool = True, metadata: dict[str, str] | None = None,
                weight_range: tuple[int, int] | None = None, pack_int4: bool = False,
                packed: tuple[str | Path, dict[str, str] | None] | None = None) -> Any:
    """Export ``module(*args)`` to ONNX (QDQ form when ``quantized``); returns the ``onnx.ModelProto``.

    ``weight_range`` is the integer range of the weight codes (e.g. (-7, 7) at 4 bits); with
    ``pack_int4``, ranges within 4 bits are stored as packed INT4 (storage) instead of INT8
    (deployment). ``packed=(path, metadata)`` also writes that packed storage file from the same trace:
    tracing a detector is most of an export's time, and the two files then hold the same graph by
    construction. ``path=None`` only returns the proto.
    """
    import onnx

    if packed is not None and not quantized:
        raise ValueError("a packed INT4 file holds integer weights: a float export has none")
    buf = io.BytesIO()
    ctx = qdq_export_mode(module, args) if quantized else contextlib.nullcontext(module)
    with ctx as module, torch.no_grad(), _quiet_export():
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=OPSET, do_constant_folding=True,
                          input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes)
    traced = buf.getvalue()
    if packed is not None:
        _finish(onnx.load_from_string(traced), packed[0], True, weight_range, True, packed[1])
    return _finish(onnx.load_from_string(traced), path, quantized, weight_range, pack_int4, metadata)


def _finish(proto: Any, path: str | Path | None, quantized: bool, weight_range: tuple[int, int] | None,
            pack_int4: bool, metadata: dict[str, str] | None) -> Any:
    """The traced graph as fqn's file: integer weight codes, the Q/DQ pair after Resize/MaxPool, the metadata."""
    import onnx

    if quantized:
        store_integer_weights(proto, weight_range, pack_int4)
        requantize_after_resize(proto)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    if path is not None:
        onnx.save(proto, str(path))
    return proto


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence what tracing torchvision's detection code always says and a user cannot act on, only that.

    The tracer's warnings about Python values, the UserWarnings torch and torchvision emit while
    traced (tensor copy-construction, how advanced indexing is exported), and the ``torch.jit.script``
    FutureWarning of torchvision's ``_script_if_tracing`` helpers. The legacy exporter's
    DeprecationWarning stays visible: docs/contributing.md ("The ONNX exporter") says what moving to the
    torch.export-based exporter needs.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.script.* is deprecated")
        yield


def _used_names(graph: Any) -> set[str]:
    """Every value name read by a node of ``graph`` or of its subgraphs (If/Loop bodies read outer names)."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                used |= _used_names(sub)
    return used


class GraphConstants:
    """Constant values of a graph: initializers and Constant nodes, seen through Identity nodes."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self._np = numpy_helper
        self.inits = {init.name: init for init in graph.initializer}
        self.producers = {o: n for n in graph.node for o in n.output}

    def source(self, name: str) -> str:
        node = self.producers.get(name)
        while node is not None and node.op_type == "Identity":
            name = node.input[0]
            node = self.producers.get(name)
        return name

    def value(self, name: str) -> np.ndarray | None:
        name = self.source(name)
        if name in self.inits:
            return self._np.to_array(self.inits[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return self._np.to_array(node.attribute[0].t)
        return None


def _weight_codes(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int, lo: int, hi: int) -> np.ndarray:
    """The integers torch's fake quantizer (the simulation's op) rounds ``w`` to."""
    wt = torch.from_numpy(w.copy())
    st = torch.from_numpy(scale.astype(np.float32).copy())
    zt = torch.from_numpy(zp.astype(np.int32).copy())
    if st.dim() == 0:
        fq = torch.fake_quantize_per_tensor_affine(wt, st, zt, lo, hi)
        codes = torch.round(fq / st) + zt
    else:
        fq = torch.fake_quantize_per_channel_affine(wt, st, zt, axis, lo, hi)
        shape = [1] * wt.dim()
        shape[axis] = -1
        codes = torch.round(fq / st.reshape(shape)) + zt.reshape(shape)
    return codes.numpy().astype(zp.dtype)


def _pack4(codes: np.ndarray) -> bytes:
    """Two 4-bit codes per byte, first in the low nibble (ONNX INT4/UINT4 raw layout)."""
    flat = codes.astype(np.int16).reshape(-1) & 0xF
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _fits4(codes: np.ndarray, zp: np.ndarray) -> bool:
    """Whether the codes and zero points of one weight fit INT4 (signed) or UINT4."""
    lo, hi = (-8, 7) if zp.dtype == np.int8 else (0, 15)
    return bool(codes.size) and int(codes.min()) >= lo and int(codes.max()) <= hi and \
        int(zp.min()) >= lo and int(zp.max()) <= hi


def store_integer_weights(proto: Any, weight_range: tuple[int, int] | None, pack_int4: bool = False) -> int:
    """Replace every Q(constant float weight) by the integer codes torch's fake quantizer gives; returns how many
    weight tensors were quantized.

    The codes are ``round(fake_quantize(w) / scale) + zero_point``, i.e. exactly the integers the
    simulation used. With ``pack_int4``, codes that fit 4 bits are stored as packed INT4/UINT4
    (opset raised to 21); otherwise as INT8/UINT8, which every runtime's integer kernels take as they are.

    A weight quantized at several call sites (the RPN head's conv runs once per pyramid level) gets one
    initializer per call site in the deployable file: OpenVINO merges DQ nodes that read one initializer,
    cannot then match the merged weight to each int8 convolution, and ran the RPN head's convs in float
    (R50 at KITTI size: 250 of 460 ms). It costs the file 2.4 MB at R50. The packed storage file keeps one.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    consts = GraphConstants(graph)
    keep, new_inits, renamed, cache = [], [], {}, {}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    clamps = set()  # a per-tensor k-bit weight's integer Clip: its codes are clamped already
    packed_any = False
    for node in graph.node:
        w = consts.value(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if w is None or w.dtype != np.float32:
            if id(node) not in clamps:
                keep.append(node)
            continue
        after = readers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "Clip":
            clamps.add(id(after[0]))
        scale, zp = consts.value(node.input[1]), consts.value(node.input[2])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        key = (consts.source(node.input[0]), scale.tobytes(), zp.tobytes(), axis)
        if key not in cache:
            lo, hi = weight_range if weight_range is not None else ((-128, 127) if zp.dtype == np.int8 else (0, 255))
            codes = _weight_codes(w, scale, zp, axis, lo, hi)
            name, zp_name = node.output[0], None
            # packed per weight: a mixed-precision model's 4-bit layers pack, its 8-bit ones stay INT8
            pack4 = pack_int4 and _fits4(codes, zp)
            if pack4:
                dt = onnx.TensorProto.INT4 if zp.dtype == np.int8 else onnx.TensorProto.UINT4
                new_inits.append(helper.make_tensor(name, dt, codes.shape, _pack4(codes), raw=True))
                zp_name = f"{name}__zp4"
                new_inits.append(helper.make_tensor(zp_name, dt, zp.shape, _pack4(zp), raw=True))
                packed_any = True
            else:
                new_inits.append(numpy_helper.from_array(codes, name))
            cache[key] = (name, zp_name, codes, pack4)
        elif not (pack_int4 and cache[key][3]):  # another call site of the same weight: its own initializer
            new_inits.append(numpy_helper.from_array(cache[key][2], node.output[0]))
        packed = pack_int4 and cache[key][3]
        target = cache[key][:2] if packed or cache[key][0] == node.output[0] else (node.output[0], None)
        renamed[node.output[0]] = target
        if len(after) == 1 and after[0].op_type == "Clip":
            renamed[after[0].output[0]] = target
    for node in keep:
        if node.op_type == "DequantizeLinear" and node.input[0] in renamed:
            name, zp_name = renamed[node.input[0]]
            node.input[0] = name
            if zp_name is not None:
                node.input[2] = zp_name
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    _drop_dead(graph)
    if packed_any:
        for op in proto.opset_import:
            if op.domain in ("", "ai.onnx"):
                op.version = max(op.version, INT4_OPSET)
    return len(cache)


def _drop_dead(graph: Any) -> None:
    """Remove Identity/Constant nodes and initializers nothing reads any more."""
    while True:
        used = _used_names(graph)
        dead = [n for n in graph.node if n.op_type in ("Identity", "Constant") and not set(n.output) & used]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = _used_names(graph)
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def requantize_after_resize(proto: Any) -> int:
    """Put Q -> DQ (same qparams) after every Resize/MaxPool fed by a DQ; returns how many.

    Nearest upsampling and max pooling keep values on their input's grid, so fqn puts no
    quantizer after them; ONNX Runtime, though, keeps them integer (and fuses the following
    FPN add into QLinearAdd) only when it sees a Q after them. The inserted pair changes no value.
    """
    from onnx import helper

    graph = proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    nodes, count = [], 0
    for node in graph.node:
        nodes.append(node)
        src = producers.get(node.input[0]) if node.op_type in ("Resize", "MaxPool") else None
        if src is None or src.op_type != "DequantizeLinear" or len(node.output) != 1:
            continue
        scale, zp = src.input[1], src.input[2]
        out = node.output[0]
        node.output[0] = f"{out}__pre_q"
        nodes.append(helper.make_node("QuantizeLinear", [node.output[0], scale, zp], [f"{out}__q"],
                                      name=f"{node.name}__requant_q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{out}__q", scale, zp], [out],
                                      name=f"{node.name}__requant_dq"))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count
