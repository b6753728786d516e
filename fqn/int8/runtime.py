"""Runner of the int8 backend: ONNX Runtime's CPU kernels behind a torchvision-style detector call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def session_options(threads: int | None = None) -> Any:
    """ORT options used for every run: ``threads`` intra-op threads, no spinning, all graph optimisations.

    Spinning worker threads would steal the cores other runtimes use in the same benchmark.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def _unpack_int4(proto: Any) -> int:
    """Widen packed INT4/UINT4 initializers to INT8/UINT8 in memory, for the 8-bit integer kernels.

    The file keeps the packed 4-bit codes (it really is smaller); the int8 kernels run the same
    integers. Returns how many tensors were widened.
    """
    import onnx
    from onnx import numpy_helper

    widen = {onnx.TensorProto.INT4: np.int8, onnx.TensorProto.UINT4: np.uint8}
    out, count = [], 0
    for init in proto.graph.initializer:
        if init.data_type in widen:
            values = numpy_helper.to_array(init).astype(widen[init.data_type])
            out.append(numpy_helper.from_array(values, init.name))
            count += 1
        else:
            out.append(init)
    if count:
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(out)
    return count


def make_session(path: str | Path, threads: int | None = None, integer_kernels: bool = True,
                 edit: Callable[[Any], Any] | None = None) -> tuple[Any, dict[str, str]]:
    """An ONNX Runtime CPU session for ``path`` and the file's metadata.

    ``integer_kernels=False`` turns ORT's graph optimisations off: the QDQ graph then runs as
    written, in float, a reference for what the integer kernels change. ``edit(proto)`` may
    change the loaded model in memory first (e.g. `fqn.int8.taps` adds graph outputs).
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"int8 model {path} does not exist; write it with `fqn convert`")
    try:
        proto = onnx.load(str(path))
    except Exception as err:
        raise ValueError(f"{path} is not a readable ONNX file: {err}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if edit is not None:
        edit(proto)
    _unpack_int4(proto)
    opts = session_options(threads)
    if not integer_kernels:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session, meta


class OnnxDetector:
    """A detector in an ONNX file, called like a torchvision detector in eval mode.

    ``detector(images)`` takes a list of 3xHxW float images in [0, 1] (any size) and returns one
    ``{"boxes", "scores", "labels"}`` dict of tensors per image, boxes in the image's own pixels.
    The graph holds the whole detector (resize/normalise, backbone, RPN, RoIAlign, box head, NMS);
    images run one at a time.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        self.session, self.metadata = make_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = {"boxes", "scores", "labels"} - set(self.output_names)
        if missing:
            raise ValueError(f"{path} is not a whole-detector model (outputs {self.output_names} lack {missing})")

    def __call__(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        if isinstance(images, Tensor):
            images = [images] if images.dim() == 3 else list(images)
        results = []
        for img in images:
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"expected 3xHxW image tensors, got {getattr(img, 'shape', type(img))}")
            arrays = self.session.run(self.output_names, {self.input_name: img.detach().float().cpu().numpy()})
            out = dict(zip(self.output_names, arrays))
            results.append({"boxes": torch.from_numpy(out["boxes"]).float(),
                            "scores": torch.from_numpy(out["scores"]).float(),
                            "labels": torch.from_numpy(out["labels"]).long()})
        return results

    def eval(self) -> OnnxDetector:
        """No-op, so evaluation code written for nn.Module detectors accepts this one."""
        return self

    def train(self, mode: bool = True) -> OnnxDetector:
        return self

    @property
    def training(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"OnnxDetector({str(self.path)!r}, bits={self.metadata.get('fqn.bits', 'float')})"
