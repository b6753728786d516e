"""DDP with 2 processes (CPU: gloo; two GPUs: NCCL): identical ranges after calibration and weights after steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..devices import needs_two_gpus
from .tiny import tiny_module

pytestmark = pytest.mark.slow  # end to end: the fast tier (-m 'not slow') leaves it out

SCRIPT = Path(__file__).with_name("ddp_script.py")


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("cuda", marks=needs_two_gpus)])
def test_ddp_ranks_agree(accelerator, tmp_path):
    init_from = tmp_path / "float.pt"
    torch.save(tiny_module().model.state_dict(), init_from)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), str(init_from), accelerator],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    cal = [torch.load(tmp_path / f"calibrated_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert cal[0].keys() == cal[1].keys() and len(cal[0]) > 50
    assert all(torch.equal(cal[0][k], cal[1][k]) for k in cal[0])
    final = [torch.load(tmp_path / f"final_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert final[0]["first_image_sum"] != final[1]["first_image_sum"]  # each rank trained on its own shard
    for k, v in final[0]["weights"].items():
        assert torch.allclose(v.float(), final[1]["weights"][k].float(), atol=1e-6), k
    assert all(torch.allclose(final[0]["acts"][k], final[1]["acts"][k]) for k in final[0]["acts"])
    moved = [k for k in cal[0] if not torch.equal(cal[0][k], final[0]["acts"][k])]
    assert moved  # the EMA ranges did move during training, and stayed identical across ranks
