"""Runners of the int8 backend: ONNX Runtime's or OpenVINO's CPU kernels behind a torchvision-style detector call.

Both runtimes open the same file. ONNX Runtime fuses DQ -> Conv -> Q into QLinearConv; OpenVINO turns the Q/DQ
pairs into its FakeQuantize and runs int8 (VNNI/AMX) convolutions, about twice as fast on the measured CPU.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: ONNX Runtime's exact u8 x s8 kernels on x86 CPUs without VNNI (AVX2 only). Their fast kernels add two
#: u8 x s8 products in 16 bits (``vpmaddubsw``), which saturates once 8-bit weights meet large activations: measured
#: on an AVX2-only CPU (tools/int8_exactness.py). 4-bit weights cannot overflow. A no-op where the CPU has VNNI.
EXACT_INT8_ON_AVX2 = ("session.x64quantprecision", "1")


def session_options(threads: int | None = None, exact: bool = True) -> Any:
    """ORT options used for every run: ``threads`` intra-op threads, no spinning, all graph optimisations, and
    (``exact``) exact int8 kernels on AVX2-only CPUs (`EXACT_INT8_ON_AVX2`).

    Spinning worker threads would steal the cores other runtimes use in the same benchmark.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if exact:
        opts.add_session_config_entry(*EXACT_INT8_ON_AVX2)
    opts.log_severity_level = 3
    return opts


def ort_session(model: str | bytes, threads: int | None = None, integer_kernels: bool = True) -> Any:
    """An ONNX Runtime CPU session with `session_options`.

    ONNX Runtime's exact int8 mode refuses some files its own ``quantize_static`` writes (zero points shared by
    several nodes: "Attempt to replace the existing tensor"); such a file opens with the default kernels instead,
    as a deployer's plain session opens it, with a warning (on CPUs without VNNI its 8-bit layers then saturate).
    """
    import onnxruntime as ort

    for exact in (True, False):
        opts = session_options(threads, exact)
        if exact:
            opts.log_severity_level = 4  # the refusal below is expected and said once, not as ONNX Runtime's error
        if not integer_kernels:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Fail type
            if not exact or "Attempt to replace the existing tensor" not in str(err):
                raise
            log.warning("ONNX Runtime's exact int8 mode (%s) cannot open this file; it runs with the default kernels",
                        EXACT_INT8_ON_AVX2[0])
    raise AssertionError("unreachable")


RUNTIMES = ("onnxruntime", "openvino")


def available_runtimes() -> tuple[str, ...]:
    """The runtimes installed here: ONNX Runtime always, OpenVINO when its optional package is."""
    import importlib.util

    return tuple(r for r in RUNTIMES if importlib.util.find_spec(r) is not None)


def _check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    return runtime


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


@functools.lru_cache(maxsize=1)
def _openvino_core() -> Any:
    """One OpenVINO ``Core`` for the process, as OpenVINO recommends: every ``Core`` loads the CPU plugin, and
    creating and dropping many (one per session) is what a test worker was doing when it died, twice."""
    try:
        import openvino as ov
    except ImportError:
        raise ImportError("runtime='openvino' needs the openvino package: pip install openvino (from a clone: "
                          "pip install '.[openvino]')") from None
    return ov.Core()


class OpenVinoSession:
    """An OpenVINO CPU model behind the calls fqn makes of an ONNX Runtime session (``run``, ``get_inputs/outputs``).

    Compiled once per input shape (the last ``max_shapes`` kept): with dynamic input shapes
    OpenVINO's CPU plugin picks kernels whose fused requantization is not exact (measured: 62% of a
    4-bit ResNet stage's codes equal to the fake-quant ones, 100% with the shape fixed), and the detector
    then loses its boxes at 4 bits. Compiling takes about a second at KITTI size with R50; a camera
    or a folder of one size compiles once. ``INFERENCE_PRECISION_HINT=f32``: on CPUs with bf16
    (AVX-512 BF16, AMX) OpenVINO otherwise runs the layers left in float in bf16.
    """

    def __init__(self, model: bytes, threads: int, max_shapes: int = 4) -> None:
        self.core = _openvino_core()
        self.model = self.core.read_model(model)
        self.config = {"INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": "f32",
                       "PERFORMANCE_HINT": "LATENCY"}
        self.max_shapes = max_shapes
        self._compiled: dict[tuple, tuple[Any, Any]] = {}
        self._inputs = [_Named(p.get_any_name()) for p in self.model.inputs]
        self._outputs = [_Named(p.get_any_name()) for p in self.model.outputs]

    def get_inputs(self) -> list[_Named]:
        return self._inputs

    def get_outputs(self) -> list[_Named]:
        return self._outputs

    def compiled_for(self, feeds: dict[str, np.ndarray]) -> tuple[Any, Any]:
        """The compiled model and its infer request for the shapes of ``feeds`` (compiled on first use)."""
        key = tuple((name, tuple(np.shape(v))) for name, v in sorted(feeds.items()))
        if key not in self._compiled:
            import openvino as ov

            model = self.model.clone()
            model.reshape({name: ov.PartialShape(list(shape)) for name, shape in key})
            compiled = self.core.compile_model(model, "CPU", self.config)
            if len(self._compiled) >= self.max_shapes:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = (compiled, compiled.create_infer_request())
        return self._compiled[key]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        compiled, request = self.compiled_for(feeds)
        result = request.infer(feeds)
        names = output_names or [o.name for o in self._outputs]
        return [np.asarray(result[compiled.output(name)]) for name in names]


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


def unshare_weights(proto: Any) -> int:
    """Give every DequantizeLinear of a shared weight initializer its own copy (in memory); returns how many copies.

    Files `convert_int8` writes for deployment have one initializer per call site already; a packed
    storage file (or an older file) shares the RPN head's weight across pyramid levels, which OpenVINO
    runs in float (see `fqn.int8.onnx_qdq.store_integer_weights`).
    """
    import copy

    inits = {init.name: init for init in proto.graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            readers.setdefault(node.input[0], []).append(node)
    count = 0
    for name, nodes in readers.items():
        for k, node in enumerate(nodes[1:], 1):
            clone = copy.deepcopy(inits[name])
            clone.name = f"{name}__site{k}"
            proto.graph.initializer.append(clone)
            node.input[0] = clone.name
            count += 1
    return count


def make_session(path: str | Path, threads: int | None = None, integer_kernels: bool = True,
                 edit: Callable[[Any], Any] | None = None, runtime: str = "onnxruntime") -> tuple[Any, dict[str, str]]:
    """A CPU session for ``path`` in ``runtime`` (``"onnxruntime"`` or ``"openvino"``) and the file's metadata.

    ``integer_kernels=False`` turns ORT's graph optimisations off: the QDQ graph then runs as
    written, in float, a reference for what the integer kernels change. ``edit(proto)`` may
    change the loaded model in memory first (e.g. `fqn.int8.taps` adds graph outputs). A file
    whose weights are packed INT4 (storage) has them widened to INT8 in memory, which both
    runtimes' integer kernels take.
    """
    import onnx

    _check_runtime(runtime)
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
    if runtime == "openvino":
        unshare_weights(proto)
        if not integer_kernels:
            raise ValueError("integer_kernels=False (the QDQ graph run in float) is an ONNX Runtime reference only")
        return OpenVinoSession(proto.SerializeToString(), int(threads or torch.get_num_threads())), meta
    return ort_session(proto.SerializeToString(), threads, integer_kernels), meta


class OnnxDetector:
    """A detector in an ONNX file, called like a torchvision detector in eval mode.

    ``detector(images)`` takes a list of 3xHxW float images in [0, 1] (any size) and returns one
    ``{"boxes", "scores", "labels"}`` dict of tensors per image, boxes in the image's own pixels.
    The graph holds the whole detector (resize/normalise, backbone, RPN, RoIAlign, box head, NMS);
    images run one at a time, in ONNX Runtime or OpenVINO (``runtime``).
    """

    def __init__(self, path: str | Path, threads: int | None = None, runtime: str = "onnxruntime") -> None:
        self.path = Path(path)
        self.runtime = runtime
        self.session, self.metadata = make_session(path, threads, runtime=runtime)
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
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3 or min(img.shape[1:]) < 1:
                raise ValueError(f"expected 3xHxW image tensors, got {getattr(img, 'shape', type(img))}")
            if not torch.isfinite(img).all():
                raise ValueError("the image holds NaN or infinite values")
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
        return (f"OnnxDetector({str(self.path)!r}, bits={self.metadata.get('fqn.bits', 'float')}, "
                f"runtime={self.runtime!r})")
