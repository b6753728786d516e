"""A short, self-contained demo of the quantization API on a randomly initialised detector.

It needs no data and no weights: it draws scenes of the embedded synthetic set, gives the random
model realistic BN statistics, then prepares, calibrates and compares a
w8a8 and a w4a4 FQN detector with the float one. The numbers say how far
each quantized model's features and head outputs are from the float ones
(SQNR, dB); they are not accuracy numbers (the trainer gives those).
"""

from __future__ import annotations

import copy
import time

import torch

from fqn.commands.report import Column, markdown_table
from fqn.config import QuantConfig
from fqn.data.synthetic import synthetic_scenes
from fqn.evaluation import sqnr_db
from fqn.models.faster_rcnn import build_detector, head_outputs, prepare_qat, recalibrate_bn
from fqn.quant.calibrate import calibrate
from fqn.quant.prepare import scope_summary


def run_demo(backbone: str = "resnet18", size: int = 256, n_cal: int = 4, seed: int = 0) -> list[dict]:
    """Prepare, calibrate and compare w8a8 and w4a4 FQN detectors with the float one; returns the rows."""
    torch.manual_seed(seed)
    images = synthetic_scenes(n_cal + 2, size, seed)
    cal, test = images[:n_cal], images[n_cal:]
    float_model = recalibrate_bn(build_detector(backbone, 4, min_size=size, max_size=size), cal).eval()
    ref = head_outputs(float_model, test)
    rows = []
    for bits in (8, 4):
        cfg = QuantConfig(bits_w=bits, bits_a=bits)
        t0 = time.perf_counter()
        model = prepare_qat(copy.deepcopy(float_model), cfg)
        calibrate(model, [[img] for img in cal], num_batches=n_cal)
        out = head_outputs(model, test)
        rows.append({"config": f"w{bits}a{bits} {cfg.flags}", "scope": scope_summary(model),
                     "sqnr_db": {k: round(float(sqnr_db(ref[k], out[k])), 1) for k in ref},
                     "seconds": round(time.perf_counter() - t0, 1)})
    return rows


def run_demo_command(backbone: str = "resnet18", size: int = 256, n_cal: int = 4) -> list[dict]:
    """``fqn demo``: `run_demo`, printed as a table; returns its rows."""
    rows = run_demo(backbone, size, n_cal)
    print_demo(rows)
    return rows


def print_demo(rows: list[dict]) -> None:
    """The SQNR of each quantized detector's outputs, one row per bit-width, and the quantized scope."""
    keys = list(rows[0]["sqnr_db"])
    print("\nSQNR (dB) of the fake-quantized detector against the float one (higher is closer):")
    table = [{"config": r["config"], **r["sqnr_db"]} for r in rows]
    print(markdown_table(table, [Column("config"), *(Column(k, digits=1) for k in keys)]))
    print("\nquantized scope:", rows[0]["scope"])
