"""The int8 backend: ONNX QDQ files run by ONNX Runtime's or OpenVINO's CPU integer kernels.

Everything backend-specific lives here (`onnx_qdq` writes, `runtime` runs), so
another backend can be added beside it without touching the quantization method.
"""

from fqn.int8.convert import check_quantized, convert_int8, export_float, export_part, head_parity, load_int8

__all__ = ["convert_int8", "load_int8", "export_float", "export_part", "head_parity", "check_quantized"]
