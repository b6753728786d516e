"""Peak memory and time of `fqn.commands.analyze` on an R50-FPN at KITTI size, on the CPU.

The issue asks that the analysis fit an R50-FPN at KITTI resolution in reasonable memory. No
pretrained weights can be downloaded here, so the detector is a BN-calibrated random R50-FPN
(same layer shapes and activation sizes as a trained one); the images are random 375x1242
tensors. Prints and saves peak RSS (whole process) and wall time of each phase.

    .venv/bin/python tools/analyze_memory.py --images 2 --out runs/analyze_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from fqn import QuantConfig, calibrate, prepare_qat
from fqn.commands.analyze import analyze_layers, comparable_points, write_report
from fqn.models import build_detector


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--ptq-bits", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=8, help="layers held at once")
    parser.add_argument("--out", default="analyze_memory.json")
    parser.add_argument("--report", help="also write the pictures and report into this folder")
    a = parser.parse_args()
    torch.manual_seed(0)
    images = [torch.rand(3, 375, 1242) for _ in range(a.images)]
    t0 = time.perf_counter()
    model = build_detector("resnet50", 8, min_size=375, max_size=1242).eval()
    for m in model.modules():  # BN statistics of a random network from one batch, so activations have sane scales
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.backbone.train()
        model.backbone(torch.stack(images[:1]))
    model.eval()
    model = prepare_qat(model, QuantConfig(bits_w=a.ptq_bits, bits_a=a.ptq_bits, n_cal=1))
    calibrate(model, [[img] for img in images[:1]], 1, progress=False)
    after_setup = peak_rss_mib()
    t1 = time.perf_counter()
    stats, pictures = analyze_layers(model, images, keep=None, chunk=a.chunk, progress=True)
    t2 = time.perf_counter()
    result = {"backbone": "resnet50", "image": [375, 1242], "images": a.images, "bits": a.ptq_bits, "chunk": a.chunk,
              "layers": len(comparable_points(model)), "layers_compared": len(stats), "pictures": len(pictures),
              "setup_s": round(t1 - t0, 1), "analyze_s": round(t2 - t1, 1),
              "peak_rss_mib_setup": round(after_setup), "peak_rss_mib": round(peak_rss_mib()),
              "threads": torch.get_num_threads(), "worst_layer": stats[0].layer, "worst_sqnr_db": stats[0].sqnr_db}
    if a.report:
        with torch.no_grad():
            prediction = model([images[0]])[0]
        write_report(a.report, stats, {s.layer: pictures[s.layer] for s in stats[:4] if s.layer in pictures},
                     images[0], None, prediction)
        result["peak_rss_mib_with_report"] = round(peak_rss_mib())
    print(json.dumps(result, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
