"""Device markers: CUDA cases run where a GPU is (issue 14) and are skipped on CI's CPU-only machine."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
CUDA = pytest.param("cuda", marks=needs_cuda, id="cuda")
