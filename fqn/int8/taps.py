"""Read the activations of a converted int8 model at its quantizers, as ONNX Runtime's integer kernels computed them.

The exporter names every node after the module scope it was traced in
(``/model/backbone/body/layer1/layer1.0/conv1/act_fq/DequantizeLinear``), so the output of an
fqn activation quantizer is the last DequantizeLinear of that scope. Making it a graph output
keeps ORT's QDQ fusions (checked in the tests: the QLinearConv count is unchanged); ORT only
adds a DequantizeLinear for the extra output, so the values are the int8 codes the next
integer kernel reads, times their scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fqn.int8.runtime import make_session


def scope_of(node_name: str, root: str = "model") -> str:
    """The module of an exported node: ``/model/a/layer1/layer1.0/conv1/act_fq/DQ_1`` -> ``a.layer1.0.conv1.act_fq``.

    Scope components of container children repeat their parent's name (``layer1/layer1.0``);
    they collapse into one dotted path. ``root`` is the wrapper attribute holding the detector.
    """
    parts = node_name.strip("/").split("/")[:-1]
    if parts and parts[0] == root:
        parts = parts[1:]
    out: list[str] = []
    for part in parts:
        if out and part.startswith(out[-1] + "."):
            out[-1] = part
        else:
            out.append(part)
    return ".".join(out)


def activation_outputs(graph: Any, names: list[str], root: str = "model") -> dict[str, list[str]]:
    """For each quantizer name, the ONNX values of its outputs, one per call, in graph order.

    Below 8 bits a quantizer is written as Q -> DQ -> Clip -> Q -> DQ; the DequantizeLinear that
    feeds the Clip is skipped, so the value returned is the clamped k-bit one.
    """
    feeds_clip = {i for n in graph.node if n.op_type == "Clip" for i in n.input[:1]}
    wanted = set(names)
    found: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] in feeds_clip:
            continue
        scope = scope_of(node.name, root)
        if scope in wanted:
            found.setdefault(scope, []).append(node.output[0])
    return found


def add_activation_outputs(proto: Any, names: list[str]) -> dict[str, list[str]]:
    """Make the outputs of the named quantizers graph outputs of ``proto`` (in place); returns `activation_outputs`."""
    import onnx

    values = activation_outputs(proto.graph, names)
    existing = {o.name for o in proto.graph.output}
    for value in (v for vs in values.values() for v in vs):
        if value not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=value))
    return values


class Int8Taps:
    """A session (ONNX Runtime or OpenVINO) of an int8 detector file that also returns chosen quantizers' activations.

    ``taps(image)`` -> ``{quantizer name: [tensor per call]}`` for one 3xHxW image. Quantizers the
    file does not hold in its main graph (e.g. inside the box head's loop) are listed in ``missing``.
    """

    def __init__(self, path: str | Path, names: list[str], threads: int | None = None,
                 runtime: str = "onnxruntime") -> None:

        self.values: dict[str, list[str]] = {}
        self.session, self.metadata = make_session(
            path, threads, edit=lambda proto: self.values.update(add_activation_outputs(proto, names)), runtime=runtime)
        self.missing = [n for n in names if n not in self.values]
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, image: Tensor, names: list[str] | None = None) -> dict[str, list[Tensor]]:
        """The tapped activations for one image; only ``names`` (default: all), so memory holds only those."""
        chosen = {n: vs for n, vs in self.values.items() if names is None or n in names}
        wanted = [v for vs in chosen.values() for v in vs]
        arrays = self.session.run(wanted, {self.input_name: image.detach().float().cpu().numpy()})
        got = dict(zip(wanted, arrays))
        return {name: [torch.from_numpy(np.asarray(got[v], dtype=np.float32)) for v in vs]
                for name, vs in chosen.items()}
