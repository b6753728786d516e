"""Training-step time of a Faster R-CNN, float or QAT, with fqn's RoI pooler or torchvision's.

    python tools/bench_train_step.py --backbone resnet18 --size 160 --batch 4 --steps 5
    python tools/bench_train_step.py --quant 4 --poolers fqn torchvision --out bench/train_step.json

Each configuration builds a fresh detector (random weights, BN trainable, 4 classes), draws synthetic
scenes with boxes, runs ``--warmup`` SGD steps, then times ``--steps`` (median and mean seconds per
step). QAT rows are prepared and calibrated on one batch first. The JSON is rewritten after each row.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torchvision.ops import MultiScaleRoIAlign

from fqn import QuantConfig, build_detector, calibrate, prepare_qat
from fqn.commands.report import Column, columns, markdown_table, write_json
from fqn.data.synthetic import SyntheticConfig, render
from fqn.models.faster_rcnn import fast_roi_pool

TABLE = columns("backbone", Column("size", digits=0), Column("batch", digits=0), "quant", "pooler", "s_per_step",
                "mean_s")


def _batch(size: int, batch: int, seed: int) -> tuple[list, list]:
    cfg = SyntheticConfig(image_size=size, max_size=min(80, size // 2), min_size=min(10, size // 8))
    images, targets = [], []
    for i in range(batch):
        img, boxes, labels = render(seed * batch + i, cfg)
        images.append(img)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def time_steps(backbone: str, size: int, batch: int, quant: int | None, pooler: str, steps: int,
               warmup: int, device: str = "cpu") -> dict:
    """One row: seconds per training step of this configuration."""
    torch.manual_seed(0)
    kw = {"box_roi_pool": fast_roi_pool() if pooler == "fqn" else MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)}
    model = build_detector(backbone, 5, min_size=size, max_size=size, **kw).to(device)
    if quant is not None:
        prepare_qat(model, QuantConfig(bits_w=quant, bits_a=quant, n_cal=1))
        calibrate(model, [_batch(size, batch, 999)[0]], 1, progress=False)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9)
    times = []
    for step in range(warmup + steps):
        images, targets = _batch(size, batch, step)
        images = [i.to(device) for i in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        start = time.perf_counter()
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {"backbone": backbone, "size": size, "batch": batch, "quant": f"w{quant}a{quant}" if quant else "float",
            "pooler": pooler, "s_per_step": statistics.median(times), "mean_s": statistics.fmean(times)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--quant", type=int, nargs="*", default=[], help="QAT bit-widths to time besides float")
    parser.add_argument("--poolers", nargs="+", default=["fqn", "torchvision"], choices=["fqn", "torchvision"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for quant in [None, *args.quant]:
        for pooler in args.poolers:
            rows.append(time_steps(args.backbone, args.size, args.batch, quant, pooler, args.steps, args.warmup,
                                   args.device))
            print(markdown_table(rows[-1:], TABLE).splitlines()[-1], flush=True)
            if args.out:
                write_json(args.out, {"threads": args.threads, "torch": torch.__version__, "rows": rows})
    print("\n" + markdown_table(rows, TABLE))
    return rows


if __name__ == "__main__":
    main()
