"""Do this CPU's int8 kernels compute what the fake-quant model simulates? Two quantized 3x3 convolutions, per runtime.

    python tools/int8_exactness.py --out docs/results/int8_exactness.json

A block of two 256-channel 3x3 convolutions (ReLU, per-channel symmetric weights, min/max activation ranges) on a
96x312 feature map, at 8 and at 4 bits, exported as fqn exports every layer, and run by ONNX Runtime with its default
options, by ONNX Runtime with ``session.x64quantprecision`` (what fqn's sessions set), and by OpenVINO. For each it
prints and saves the share of output codes equal to the fake-quant ones, the largest difference in quantization
steps, and the median time of a call. On x86 CPUs without VNNI the runtimes' fast u8 x s8 kernels add pairs of
products in 16 bits, which 8-bit weights can saturate; on CPUs with VNNI every row is exact up to rounding ties.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from fqn import QuantConfig
from fqn.commands.common import provenance
from fqn.commands.report import Column, markdown_table, write_json
from fqn.int8.onnx_qdq import export_onnx
from fqn.int8.runtime import EXACT_INT8_ON_AVX2, OpenVinoSession, session_options
from fqn.quant.fake_quant import quantizers, set_phase
from fqn.quant.modules import QuantConv2d
from fqn.quant.prepare import bind_input_grids

TABLE = [Column("bits"), Column("runtime"), Column("exact", "codes equal", 4), Column("max_steps", "max steps", 0),
         Column("ms", "ms per call", 1)]


class Block(nn.Module):
    def __init__(self, cfg: QuantConfig, channels: int) -> None:
        super().__init__()
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.a = QuantConv2d.from_float(conv, cfg, activation=nn.ReLU(), input_quant=True)
        self.b = QuantConv2d.from_float(nn.Conv2d(channels, channels, 3, padding=1), cfg, activation=nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def calibrated(bits: int, x: torch.Tensor) -> Block:
    cfg = QuantConfig(bits_w=bits, bits_a=bits, percentile=False, act_observer="minmax")
    block = Block(cfg, x.shape[1]).eval()
    bind_input_grids(block, lambda: block(x))
    set_phase(block, "observe")
    with torch.no_grad():
        block(x)
    for _, q in quantizers(block, "act"):
        q.update_qparams()
    set_phase(block, "quantize")
    return block


def measure(run: Any, x: np.ndarray, ref: np.ndarray, step: float, runs: int) -> dict[str, float]:
    got = run(x)
    steps = np.abs(got - ref) / step
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return {"exact": float((steps < 0.5).mean()), "max_steps": float(steps.max()),
            "ms": statistics.median(times) * 1000}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, nargs=2, default=[96, 312], metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x = torch.randn(1, args.channels, *args.size)
    rows = []
    for bits in (8, 4):
        block = calibrated(bits, x)
        with torch.no_grad():
            ref = block(x).numpy()
        proto = export_onnx(block, (x,), None, input_names=["x"], output_names=["y"],
                            weight_range=(-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)).SerializeToString()
        step = float(block.b.act_fq.scale)
        default = ort.SessionOptions()  # ONNX Runtime as a file is opened by default (threads and spinning as fqn's)
        default.intra_op_num_threads = args.threads
        default.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions = {"ONNX Runtime, default options": ort.InferenceSession(proto, default,
                                                                          providers=["CPUExecutionProvider"]),
                    f"ONNX Runtime, {'='.join(EXACT_INT8_ON_AVX2)}": ort.InferenceSession(
                        proto, session_options(args.threads), providers=["CPUExecutionProvider"]),
                    "OpenVINO (shape fixed, f32 hint)": OpenVinoSession(proto, args.threads)}
        for name, session in sessions.items():
            row = {"bits": f"w{bits}a{bits}", "runtime": name,
                   **measure(lambda a, s=session: s.run(None, {"x": a})[0], x.numpy(), ref, step, args.runs)}
            rows.append(row)
            print(markdown_table([row], TABLE).splitlines()[-1], flush=True)
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split() if Path("/proc/cpuinfo").exists() \
        else []
    record = {"machine": {**provenance(args.threads), "vnni": any(f in flags for f in ("avx512_vnni", "avx_vnni")),
                          "avx2": "avx2" in flags},
              "block": {"channels": args.channels, "size": args.size}, "rows": rows}
    print("\n" + markdown_table(rows, TABLE))
    if args.out:
        write_json(args.out, record)
    return rows


if __name__ == "__main__":
    main()
