"""Device markers: CUDA cases run where a GPU is and are skipped on CI's CPU-only machine; what the CPU can do."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
CUDA = pytest.param("cuda", marks=needs_cuda, id="cuda")


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI): int8 kernels that cannot saturate. Without it, the
    runtimes' fast u8 x s8 kernels add pairs of products in 16 bits and saturate on 8-bit weights (ONNX Runtime has an
    exact mode, which fqn's sessions turn on; OpenVINO does not)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return True  # not Linux on x86: no claim either way, keep the stricter bars
    return "avx512_vnni" in flags or "avx_vnni" in flags or not any(f.startswith("avx") for f in flags)
