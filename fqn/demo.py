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
from torch import Tensor, nn

from fqn.config import QuantConfig
from fqn.data.synthetic import SyntheticConfig, render
from fqn.evaluation import sqnr_db
from fqn.models.faster_rcnn import build_detector, prepare_qat, recalibrate_bn
from fqn.quant.calibrate import calibrate
from fqn.quant.prepare import scope_summary


def synthetic_scenes(n: int, size: int = 256, seed: int = 0) -> list[Tensor]:
    """``n`` images of the embedded synthetic benchmark (its ``cal`` split, disjoint from train/val)."""
    cfg = SyntheticConfig(image_size=size, max_size=min(80, size), seed=seed)
    return [render(i, cfg, "cal")[0] for i in range(n)]


@torch.no_grad()
def head_outputs(model: nn.Module, images: list[Tensor]) -> dict[str, Tensor]:
    """FPN features and RPN head outputs for a batch, in eval mode."""
    model.eval()
    batch, _ = model.transform(images)
    feats = model.backbone(batch.tensors)
    logits, deltas = model.rpn.head(list(feats.values()))
    out = {f"fpn.{k}": v for k, v in feats.items()}
    out["rpn.objectness"] = torch.cat([t.flatten() for t in logits])
    out["rpn.box_deltas"] = torch.cat([t.flatten() for t in deltas])
    return out


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


def print_demo(rows: list[dict]) -> None:
    keys = list(rows[0]["sqnr_db"])
    print("\nSQNR (dB) of the fake-quantized detector against the float one (higher is closer):")
    print("| config | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for r in rows:
        print(f"| {r['config']} | " + " | ".join(str(r["sqnr_db"][k]) for k in keys) + " |")
    print("\nquantized scope:", rows[0]["scope"])
