"""Training-step time of a Faster R-CNN, float or QAT, per precision, with fqn's RoI pooler or torchvision's.

    python tools/bench_train_step.py --backbone resnet18 --size 160 --batch 4 --steps 5
    python tools/bench_train_step.py --quant 4 --poolers fqn torchvision --out bench/train_step.json
    # issue 14's GPU table: QAT / FP32 step time at 800 px, per precision, with peak memory and calibration time
    python tools/bench_train_step.py --device cuda --backbone resnet18 resnet50 --size 800 --batch 2 4 8 \
        --precision 32-true 16-mixed bf16-mixed --quant 8 4 --poolers fqn --cal-batches 20 --out bench/gpu.json

Each configuration builds a fresh detector (random weights, BN trainable, 4 classes), draws synthetic
scenes with boxes, runs ``--warmup`` SGD steps, then times ``--steps`` (median and mean seconds per
step; on a GPU each step ends with a synchronize). Mixed precision runs the forward under
``torch.autocast`` (float16 with a gradient scaler, or bfloat16), as Lightning's ``16-mixed`` and
``bf16-mixed`` do. QAT rows are prepared and calibrated on ``--cal-batches`` batches first (timed:
``cal_s``) and report ``qat_over_fp32``, their step time over the float row of the same backbone,
size, batch, precision and pooler. ``peak_MB`` is the GPU's peak allocated memory over the timed steps
(empty on a CPU). The JSON is rewritten after each row.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torchvision.ops import MultiScaleRoIAlign

from fqn import QuantConfig, build_detector, calibrate, prepare_qat
from fqn.commands.common import provenance
from fqn.commands.report import Column, columns, markdown_table, write_json
from fqn.data.synthetic import SyntheticConfig, render
from fqn.models.faster_rcnn import fast_roi_pool

TABLE = columns("backbone", Column("size", digits=0), Column("batch", digits=0), "precision", "compile", "quant",
                "pooler", "s_per_step", "mean_s", Column("qat_over_fp32", digits=2), Column("peak_MB", digits=0),
                Column("cal_s", digits=1))
PRECISIONS = {"32-true": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def _batch(size: int, batch: int, seed: int) -> tuple[list, list]:
    cfg = SyntheticConfig(image_size=size, max_size=min(80, size // 2), min_size=min(10, size // 8))
    images, targets = [], []
    for i in range(batch):
        img, boxes, labels = render(seed * batch + i, cfg)
        images.append(img)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(backbone: str, size: int, batch: int, quant: int | None, pooler: str, steps: int,
               warmup: int, device: str = "cpu", precision: str = "32-true", cal_batches: int = 1,
               compile_backend: str | None = None) -> dict:
    """One row: seconds per training step of this configuration.

    ``compile_backend``: `torch.compile` the backbone (body and FPN, whose shapes are fixed; the RPN and RoI
    heads' data-dependent shapes are left to eager mode) with this backend, after calibration.
    """
    torch.manual_seed(0)
    kw = {"box_roi_pool": fast_roi_pool() if pooler == "fqn" else MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)}
    model = build_detector(backbone, 5, min_size=size, max_size=size, **kw).to(device)
    cal_s = None
    if quant is not None:
        prepare_qat(model, QuantConfig(bits_w=quant, bits_a=quant, n_cal=cal_batches))
        batches = [[i.to(device) for i in _batch(size, batch, 999 + k)[0]] for k in range(cal_batches)]
        _sync(device)
        start = time.perf_counter()
        calibrate(model, batches, cal_batches, progress=False)
        _sync(device)
        cal_s = time.perf_counter() - start
    model.train()
    if compile_backend:
        model.backbone = torch.compile(model.backbone, backend=compile_backend)
    dtype = PRECISIONS[precision]
    kind = torch.device(device).type
    # the trainer's choice: torch's fused optimizer kernels, unless mixed precision (Lightning clips gradients then)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9,
                          fused=dtype is None)
    scaler = torch.amp.GradScaler(kind, enabled=dtype == torch.float16)
    is_cuda = kind == "cuda"
    times = []
    for step in range(warmup + steps):
        images, targets = _batch(size, batch, step)
        images = [i.to(device) for i in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        if step == warmup and is_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(kind, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = sum(model(images, targets).values())
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {"backbone": backbone, "size": size, "batch": batch, "precision": precision, "compile": compile_backend,
            "quant": f"w{quant}a{quant}" if quant else "float", "pooler": pooler,
            "s_per_step": statistics.median(times), "mean_s": statistics.fmean(times), "qat_over_fp32": None,
            "peak_MB": torch.cuda.max_memory_allocated(device) / 2**20 if is_cuda else None, "cal_s": cal_s}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", nargs="+", default=["resnet18"])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--precision", nargs="+", default=["32-true"], choices=list(PRECISIONS))
    parser.add_argument("--quant", type=int, nargs="*", default=[], help="QAT bit-widths to time besides float")
    parser.add_argument("--poolers", nargs="+", default=["fqn", "torchvision"], choices=["fqn", "torchvision"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cal-batches", type=int, default=1, help="calibration batches of the QAT rows (timed)")
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="torch.compile the backbone with this backend (inductor; eager: capture only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA device")
    rows: list[dict] = []
    float_time: dict[tuple, float] = {}
    for backbone in args.backbone:
        for batch in args.batch:
            for precision in args.precision:
                for quant in [None, *args.quant]:
                    for pooler in args.poolers:
                        row = time_steps(backbone, args.size, batch, quant, pooler, args.steps, args.warmup,
                                         args.device, precision, args.cal_batches, args.compile)
                        key = (backbone, batch, precision, pooler)
                        if quant is None:
                            float_time[key] = row["s_per_step"]
                        else:
                            row["qat_over_fp32"] = row["s_per_step"] / float_time[key]
                        rows.append(row)
                        print(markdown_table(rows[-1:], TABLE).splitlines()[-1], flush=True)
                        if args.out:
                            write_json(args.out, {"device": _device_name(args.device),
                                                  "machine": provenance(args.threads), "rows": rows})
    print("\n" + markdown_table(rows, TABLE))
    return rows


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)

    return f"CPU ({platform.processor() or platform.machine()})"


if __name__ == "__main__":
    main()
