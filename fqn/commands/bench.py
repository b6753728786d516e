"""``fqn bench``: latency and peak memory of every way to run a Faster R-CNN on a CPU, at the image sizes users run.

    fqn bench --out bench                                          # R18+R50 x 160/KITTI/COCO
    fqn bench --backbones resnet50 --sizes kitti --runs 10 --out bench_kitti

For each backbone and size: FP32 eager PyTorch; the FP32 ONNX file in ONNX Runtime and OpenVINO; fqn's w8a8
and w4a4 files (PTQ) opened plainly in both runtimes, as a deployer opens them; the packed-INT4 storage
file in ONNX Runtime, plainly and through fqn's loader; ONNX Runtime's ``quantize_static`` (the peer) in
both runtimes. Each is timed on the whole detector (one image per call) and on the backbone+FPN alone,
round-robin (one call of each per round, median of ``--runs``), and run once more in a fresh process for
its peak memory (``ru_maxrss``, and its increase over a process that has only imported the libraries).

Weights are random (BN statistics re-estimated on the calibration images). The backbone+FPN's latency does
not depend on training; the whole detector's does a little: a random head scores all 1000 RoIs of every
class above the 0.05 threshold, so the final NMS sees more boxes than a trained model's. Accuracy is
measured by ``fqn compare`` on trained models. Results are printed and
written to OUT/bench.json and OUT/bench.md after every group, so an interrupted run keeps what it measured.

Imports of fqn and the runtimes are inside the functions on purpose: the memory probe
(``python -m fqn.commands.bench``) measures a path's peak over a process that imported only what that path
needs, and an import at the top of this file would count every runtime in every path's baseline.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SIZES = {"160": (160, 160), "kitti": (375, 1242), "coco": (800, 1333)}  # image H x W; the detector keeps it
PARTS = ("detector", "backbone_fpn")
PATHS = [  # (name, file key, runtime, how the file is opened)
    ("FP32 eager PyTorch", "eager", "torch", ""),
    ("FP32 ONNX Runtime", "fp32", "onnxruntime", "plain"),
    ("FP32 OpenVINO", "fp32", "openvino", "plain"),
    ("fqn w8a8 ONNX Runtime", "w8", "onnxruntime", "plain"),
    ("fqn w8a8 OpenVINO", "w8", "openvino", "plain"),
    ("fqn w4a4 ONNX Runtime", "w4", "onnxruntime", "plain"),
    ("fqn w4a4 OpenVINO", "w4", "openvino", "plain"),
    ("fqn w4a4 packed-INT4, ONNX Runtime via fqn", "w4p", "onnxruntime", "fqn"),
    ("fqn w4a4 packed-INT4, plain ONNX Runtime", "w4p", "onnxruntime", "plain"),
    ("ORT quantize_static w8a8, ONNX Runtime", "ort", "onnxruntime", "plain"),
    ("ORT quantize_static w8a8, OpenVINO", "ort", "openvino", "plain"),
]


def _runner(path: Path, runtime: str, how: str, threads: int) -> Any:
    """A callable on one numpy input: the file opened in ``runtime`` (``plain``: no fqn edit of the file)."""
    if runtime == "onnxruntime":
        if how == "fqn":
            from fqn.int8.runtime import make_session

            session, _ = make_session(path, threads)
        else:
            from fqn.int8.runtime import ort_session

            session = ort_session(str(path), threads)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})
    from fqn.int8.runtime import OpenVinoSession

    session = OpenVinoSession(path.read_bytes(), threads)  # compiled for the input's shape, as fqn runs it
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def _inputs(model: Any, images: list[torch.Tensor], part: str) -> list[np.ndarray]:
    from fqn.int8.convert import resized_batch

    if part == "detector":
        return [img.numpy() for img in images]
    return [resized_batch(model, img).numpy() for img in images]


def _eager(model: Any, part: str) -> Any:
    from fqn.int8.convert import BackboneFPN

    if part == "detector":
        return lambda x: model([torch.from_numpy(x)])
    module = BackboneFPN(model).eval()
    return lambda x: module(torch.from_numpy(x))


def build(backbone: str, size: str, seed: int = 0) -> tuple[Any, list[torch.Tensor]]:
    """A random-weight float detector that keeps ``size`` images at their size, BN re-estimated, and 4 images."""
    from fqn import build_detector
    from fqn.data.synthetic import synthetic_scenes
    from fqn.models.faster_rcnn import recalibrate_bn

    h, w = SIZES[size]
    torch.manual_seed(seed)
    model = build_detector(backbone, 4, min_size=min(h, w), max_size=max(h, w)).eval()
    scenes = synthetic_scenes(4, max(h, w), seed=seed)
    images = [torch.nn.functional.interpolate(s[None], size=(h, w), mode="bilinear", align_corners=False)[0]
              for s in scenes]
    recalibrate_bn(model, images[:2], batch_size=1)
    return model.eval(), images


def export_files(model: Any, images: list[torch.Tensor], folder: Path) -> dict[tuple[str, str], Path]:
    """Every file of the benchmark, per (file key, part): FP32, fqn PTQ w8/w4 (deployable and packed), ORT peer."""
    from fqn.commands.peers import ort_quantize_static
    from fqn.int8.convert import convert_int8, export_float, export_part, resized_batch
    from fqn.ptq import post_training_quantize, ptq_config

    folder.mkdir(parents=True, exist_ok=True)
    files = {("fp32", "detector"): export_float(model, folder / "fp32.onnx", images[:1]),
             ("fp32", "backbone_fpn"): export_part(model, "backbone_fpn", folder / "fp32_bb.onnx", images[0])}
    cal = [[img] for img in images[:2]]
    for bits in (8, 4):
        q = post_training_quantize(model, cal, ptq_config(bits), num_batches=len(cal), progress=False)
        packed = folder / "w4.int4.onnx" if bits == 4 else None
        files[(f"w{bits}", "detector")] = convert_int8(q, folder / f"w{bits}.onnx", images[:1], packed_path=packed)
        packed_bb = folder / "w4_bb.int4.onnx" if bits == 4 else None
        files[(f"w{bits}", "backbone_fpn")] = export_part(q, "backbone_fpn", folder / f"w{bits}_bb.onnx", images[0],
                                                         packed_path=packed_bb)
        if packed is not None:
            files[("w4p", "detector")], files[("w4p", "backbone_fpn")] = packed, packed_bb
    files[("ort", "detector")] = ort_quantize_static(files[("fp32", "detector")], folder / "ort.onnx",
                                                     [{"image": img.numpy()} for img in images[:2]])
    files[("ort", "backbone_fpn")] = ort_quantize_static(
        files[("fp32", "backbone_fpn")], folder / "ort_bb.onnx",
        [{"batch": resized_batch(model, img).numpy()} for img in images[:2]])
    return files


def peak_memory(spec: dict[str, Any]) -> dict[str, float]:
    """Peak RSS (MB) of a fresh process that opens one path and runs it twice, and its increase over imports."""
    out = subprocess.run([sys.executable, "-m", "fqn.commands.bench", json.dumps(spec)], capture_output=True,
                         text=True, timeout=1800)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")), None)
    if line is None:
        raise RuntimeError(f"memory probe failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    return json.loads(line[6:])


def _high_water_mb() -> float:
    """This process's peak resident memory (VmHWM; ``ru_maxrss`` would carry the parent's peak across exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _probe(spec: dict[str, Any]) -> None:
    import onnxruntime  # noqa: F401  (the libraries every path imports, counted in the baseline)

    import fqn.int8.runtime  # noqa: F401

    if spec["runtime"] == "openvino":
        import openvino  # noqa: F401
    torch.set_num_threads(spec["threads"])
    base = _high_water_mb()
    model, images = build(spec["backbone"], spec["size"])
    x = _inputs(model, images, spec["part"])[0]
    if spec["runtime"] == "torch":
        fn = _eager(model, spec["part"])
    else:
        del model
        fn = _runner(Path(spec["file"]), spec["runtime"], spec["how"], spec["threads"])
    with torch.no_grad():
        fn(x)
        fn(x)
    peak = _high_water_mb()
    print("PROBE " + json.dumps({"peak_mb": round(peak, 1), "over_imports_mb": round(peak - base, 1)}))


def bench_group(backbone: str, size: str, folder: Path, runs: int, warmup: int, threads: int, parts: list[str],
                memory: bool) -> list[dict[str, Any]]:
    """All paths of one backbone and size, both parts, timed round-robin; one row per path."""
    from fqn.commands.report import RoundRobinTimer, Timed
    from fqn.int8.runtime import available_runtimes

    model, images = build(backbone, size)
    t0 = time.perf_counter()
    files = export_files(model, images, folder)
    print(f"[bench] {backbone} {size}: files written in {time.perf_counter() - t0:.0f} s", flush=True)
    runtimes = set(available_runtimes()) | {"torch"}
    rows, timed = [], {}
    for name, key, runtime, how in PATHS:
        if runtime not in runtimes:
            continue
        row = {"backbone": backbone, "size": size, "image": "x".join(map(str, SIZES[size])), "path": name,
               "runtime": runtime}
        if key != "eager":
            row["file_mb"] = round(files[(key, "detector")].stat().st_size / 1e6, 2)
        for part in parts:
            try:
                fn = _eager(model, part) if key == "eager" else _runner(files[(key, part)], runtime, how, threads)
                xs = _inputs(model, images, part)
                fn(xs[0])  # fails here, not in the timing, if the runtime refuses the file
                timed[(name, part)] = Timed(fn, xs)
            except Exception as err:  # one path failing (OpenVINO refusing a file) must not lose the others
                lines = [ln.strip() for ln in str(err).splitlines()
                         if ln.strip() and not ln.startswith("Exception from")]
                row[f"{part}_error"] = f"{type(err).__name__}: {' '.join(lines)[:240]}"
        rows.append(row)
    medians = RoundRobinTimer(runs, warmup, progress=True).run(timed)
    base = {part: medians.get(("FP32 eager PyTorch", part)) for part in parts}
    for row in rows:
        for part in parts:
            ms = medians.get((row["path"], part))
            if ms is not None:
                row[f"{part}_ms"] = round(ms, 1)
                row[f"{part}_speedup"] = round(base[part] / ms, 2) if base[part] else None
    if memory:
        for row in rows:
            key, runtime, how = next((k, r, h) for n, k, r, h in PATHS if n == row["path"])
            if row.get("detector_error"):
                continue
            spec = {"backbone": backbone, "size": size, "part": "detector", "runtime": runtime, "how": how,
                    "threads": threads, "file": str(files.get((key, "detector"), ""))}
            try:
                row.update({f"detector_{k}": v for k, v in peak_memory(spec).items()})
            except Exception as err:
                row["memory_error"] = str(err)[:160]
    return rows


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    from fqn.commands.report import Column, markdown_table

    cols = [Column("backbone"), Column("image"), Column("path"), Column("detector_ms", "detector ms", 1),
            Column("detector_speedup", "vs FP32 eager", 2, suffix="x"), Column("backbone_fpn_ms", "backbone+FPN ms", 1),
            Column("backbone_fpn_speedup", "vs FP32 eager", 2, suffix="x"), Column("file_mb", "file MB", 1),
            Column("detector_peak_mb", "peak RSS MB", 0), Column("detector_over_imports_mb", "over imports MB", 0)]
    failed = [f"- {r['backbone']} {r['image']} {r['path']}: {r.get('detector_error') or r.get('backbone_fpn_error')}"
              for r in rows if r.get("detector_error") or r.get("backbone_fpn_error")]
    return (markdown_table(rows, cols) + f"\n\n{info['cpu']}, {info['threads']} threads; torch {info['torch']}, "
            f"onnxruntime {info['onnxruntime']}, openvino {info.get('openvino', '-')}; median of {info['runs']} "
            "round-robin runs. Random weights: backbone+FPN latency does not depend on training; the whole "
            "detector's final NMS sees more boxes than a trained model's.\n"
            + ("\nFailed:\n" + "\n".join(failed) + "\n" if failed else ""))


def run_bench(out: str | Path, *, backbones: list[str], sizes: list[str], parts: list[str], runs: int = 5,
              warmup: int = 1, threads: int | None = None, memory: bool = True) -> list[dict[str, Any]]:
    """Every path for each backbone and size; ``OUT/bench.json`` and ``OUT/bench.md`` rewritten after each group."""
    from fqn.commands.common import fresh_file, provenance
    from fqn.commands.report import write_json

    out = Path(out)
    fresh_file(out / "bench.json")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    info = {**provenance(threads), "runs": runs, "warmup": warmup}
    rows: list[dict[str, Any]] = []
    for backbone in backbones:
        for size in sizes:
            rows += bench_group(backbone, size, out / "files" / f"{backbone}_{size}", runs, warmup, threads, parts,
                                memory)
            write_json(out / "bench.json", {"machine": info, "rows": rows})
            (out / "bench.md").write_text(markdown(rows, info))
            print(markdown([r for r in rows if r["backbone"] == backbone and r["size"] == size], info), flush=True)
    print(f"results: {out / 'bench.json'}, {out / 'bench.md'}")
    return rows


if __name__ == "__main__":  # the peak-memory probe: `python -m fqn.commands.bench SPEC` in a fresh process
    _probe(json.loads(sys.argv[1]))
