"""``fqn compare``: FP32, fqn PTQ, fqn QAT and two peer PTQ baselines side by side, measured the same way.

Every row is evaluated on the same validation images (mAP columns), and timed on the
same images with the same number of threads: the whole detector end to end (one image
per call) and the backbone+FPN alone, median of ``runs`` calls after ``warmup``. Timing
runs round-robin over all rows at the end, so a noisy machine slows every row alike.
Speedups are against the FP32 eager PyTorch row. Rows are written to ``compare.json``
as they finish, so an interrupted comparison keeps what it measured.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fqn.evaluation import MAP_COLUMNS, evaluate_map
from fqn.int8.convert import BackboneFPN, convert_int8, export_float, export_part, load_int8, normalize, resized_batch
from fqn.int8.runtime import make_session
from fqn.models.checkpoint import load_detector, load_float_reference
from fqn.ptq import post_training_quantize, ptq_config
from fqn.quant.calibrate import batch_images

log = logging.getLogger(__name__)

PEERS = ("ort", "torchao")
ROW_FIELDS = ("name", "method", "bits", "runtime", *MAP_COLUMNS, "size_mb", "latency_ms", "backbone_ms",
              "speedup", "backbone_speedup", "fake_quant_AP", "int8_gap_AP", "file")


def machine_info(threads: int) -> dict[str, Any]:
    """What the timings were measured on: CPU, threads and library versions."""
    import onnxruntime
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnxruntime": onnxruntime.__version__}


def _ort_part_fn(path: Path, threads: int) -> Callable[[Tensor], Any]:
    session, _ = make_session(path, threads)
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch.numpy()})


def _file_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


class Comparison:
    """Collects rows, prints and saves them; the timing and evaluation settings are shared by all rows."""

    def __init__(self, out_dir: str | Path, val_batches: list, latency_images: list[Tensor], *, runs: int = 20,
                 warmup: int = 3, threads: int = 2, progress: bool = True) -> None:
        if runs < 1 or warmup < 0 or threads < 1:
            raise ValueError("need runs >= 1, warmup >= 0 and threads >= 1")
        if not val_batches or not latency_images:
            raise ValueError("the comparison needs validation batches and at least one image to time")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.val, self.images = val_batches, latency_images
        self.runs, self.warmup, self.threads, self.progress = runs, warmup, threads, progress
        self.rows: list[dict[str, Any]] = []
        self.info = machine_info(threads)
        self.info["image_size"] = list(latency_images[0].shape[-2:])
        self.info["runs"], self.info["warmup"] = runs, warmup
        torch.set_num_threads(threads)

    # -- measuring ------------------------------------------------------
    def evaluate(self, model: Any) -> dict[str, float]:
        return evaluate_map(model, self.val, progress=self.progress)

    def e2e(self, model: Any) -> tuple[Callable[[Any], Any], list[Any]]:
        return (lambda img: model([img])), self.images

    def backbone(self, fn: Callable[[Tensor], Any], model: nn.Module,
                 normalized: bool = False) -> tuple[Callable[[Any], Any], list[Any]]:
        batches = [resized_batch(model, img) for img in self.images[:4]]
        if normalized:
            batches = [normalize(model.transform, b) for b in batches]
        return fn, batches

    def time_all(self) -> None:
        """Time every row's callables round-robin (one call each per round), so drift hits all rows alike."""
        timers = [(row, key, fn, inputs) for row in self.rows for key, (fn, inputs) in row.pop("_timers", {}).items()]
        samples: dict[tuple[int, str], list[float]] = {(id(r), k): [] for r, k, _, _ in timers}
        with torch.no_grad():
            for i in range(self.warmup):
                for _, _, fn, inputs in timers:
                    fn(inputs[i % len(inputs)])
            rounds = range(self.runs)
            if self.progress:
                from tqdm.auto import tqdm

                rounds = tqdm(rounds, desc=f"timing {len(timers)} models", unit="round", leave=False)
            for i in rounds:
                for row, key, fn, inputs in timers:
                    t0 = time.perf_counter()
                    fn(inputs[i % len(inputs)])
                    samples[(id(row), key)].append(time.perf_counter() - t0)
        for row, key, _, _ in timers:
            row[key] = statistics.median(samples[(id(row), key)]) * 1000
        base = next((r for r in self.rows if r["method"] == "fp32" and r["runtime"] == "PyTorch eager"), None)
        for row in self.rows:
            if base is not None and row.get("latency_ms"):
                row["speedup"] = base["latency_ms"] / row["latency_ms"]
            if base is not None and row.get("backbone_ms"):
                row["backbone_speedup"] = base["backbone_ms"] / row["backbone_ms"]
        self.save()

    def add(self, row: dict[str, Any], timers: dict[str, tuple] | None = None) -> dict[str, Any]:
        full = {k: row.get(k) for k in ROW_FIELDS}
        full.update({k: v for k, v in row.items() if k not in full})
        if timers:
            full["_timers"] = timers
        self.rows.append(full)
        self.save()
        missing = float("nan")  # not measured (a failed row): `or` would also turn an AP of 0.0 into nan
        log.info("compare: %s AP=%.4f size=%.1f MB", full["name"], missing if full.get("AP") is None else full["AP"],
                 missing if full.get("size_mb") is None else full["size_mb"])
        return full

    # -- rows -----------------------------------------------------------
    def add_float(self, model: nn.Module, example: Tensor) -> None:
        """FP32 eager PyTorch (the baseline of every speedup) and the same model in ONNX Runtime."""
        model = model.cpu().eval()
        fp32 = export_float(model, self.out / "fp32.onnx", [example])
        part = export_part(model, "backbone_fpn", self.out / "fp32_backbone_fpn.onnx", example)
        metrics = self.evaluate(model)
        bb = BackboneFPN(model).eval()
        self.add({"name": "FP32", "method": "fp32", "bits": 32, "runtime": "PyTorch eager", **metrics,
                  "size_mb": _file_mb(fp32), "file": fp32.name},
                 {"latency_ms": self.e2e(model), "backbone_ms": self.backbone(bb, model)})
        ort_model = load_int8(fp32, self.threads)
        self.add({"name": "FP32 (ONNX Runtime)", "method": "fp32", "bits": 32, "runtime": "ONNX Runtime",
                  **self.evaluate(ort_model), "size_mb": _file_mb(fp32), "file": fp32.name},
                 {"latency_ms": self.e2e(ort_model),
                  "backbone_ms": self.backbone(_ort_part_fn(part, self.threads), model)})

    def add_quantized(self, name: str, method: str, model: nn.Module, example: Tensor) -> None:
        """A fake-quant fqn model (PTQ or QAT): its fake-quant mAP, then the int8 file's mAP, size and latency."""
        cfg = model.fqn_config
        stem = name.lower().replace(" ", "_").replace("/", "-")
        fake = self.evaluate(model)
        path = convert_int8(model, self.out / f"{stem}.onnx", [example])
        part = export_part(model, "backbone_fpn", self.out / f"{stem}_backbone_fpn.onnx", example)
        int8 = load_int8(path, self.threads)
        metrics = self.evaluate(int8)
        self.add({"name": name, "method": method, "bits": cfg.bits_w, "runtime": "ONNX Runtime int8", **metrics,
                  "size_mb": _file_mb(path), "fake_quant_AP": fake["AP"], "int8_gap_AP": metrics["AP"] - fake["AP"],
                  "file": path.name, "config": cfg.to_dict()},
                 {"latency_ms": self.e2e(int8), "backbone_ms": self.backbone(_ort_part_fn(part, self.threads), model)})

    def add_ort_peer(self, model: nn.Module, calibration_images: list[Tensor]) -> None:
        from fqn.peers import ort_quantize_static

        path = ort_quantize_static(self.out / "fp32.onnx", self.out / "ort_quantize_static.onnx",
                                   [{"image": img.numpy()} for img in calibration_images])
        part = ort_quantize_static(self.out / "fp32_backbone_fpn.onnx", self.out / "ort_quantize_static_bb.onnx",
                                   [{"batch": resized_batch(model, img).numpy()} for img in calibration_images])
        peer = load_int8(path, self.threads)
        self.add({"name": "ORT quantize_static w8a8", "method": "peer-ort", "bits": 8, "runtime": "ONNX Runtime int8",
                  **self.evaluate(peer), "size_mb": _file_mb(path), "file": path.name},
                 {"latency_ms": self.e2e(peer), "backbone_ms": self.backbone(_ort_part_fn(part, self.threads), model)})

    def add_torchao_peer(self, model: nn.Module, calibration_images: list[Tensor]) -> None:
        from fqn.peers import torchao_pt2e

        peer, extra = torchao_pt2e(model, calibration_images)
        self.add({"name": "torchao pt2e X86Inductor w8a8", "method": "peer-torchao", "bits": 8,
                  "runtime": "PyTorch Inductor int8 (backbone+FPN, box head)", **self.evaluate(peer),
                  "size_mb": extra["bytes"] / 1e6},
                 {"latency_ms": self.e2e(peer),
                  "backbone_ms": self.backbone(extra["backbone"], model, normalized=True)})

    def add_failed(self, name: str, method: str, err: Exception) -> None:
        log.warning("compare: %s failed: %s", name, err)
        self.add({"name": name, "method": method, "error": f"{type(err).__name__}: {err}"})

    # -- output ---------------------------------------------------------
    def save(self) -> Path:
        path = self.out / "compare.json"
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items() if k != "_timers"}
                 for r in self.rows]
        path.write_text(json.dumps({"machine": self.info, "rows": clean}, indent=2))
        return path

    def markdown(self) -> str:
        head = ("| model | runtime | AP | AP50 | AP75 | APs | APm | APl | AR100 | size MB | latency ms | speedup "
                "| backbone+FPN ms | speedup | int8 - fake-quant AP |")
        lines = [head, "|" + "---|" * 15]

        def f(v: Any, digits: int = 3, signed: bool = False) -> str:
            missing = v is None or (isinstance(v, float) and math.isnan(v)) or (not signed and v == -1)
            return "–" if missing else f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"

        for r in self.rows:
            if r.get("error"):
                lines.append(f"| {r['name']} | failed: {r['error'][:80]} |" + " |" * 13)
                continue
            lines.append(" ".join([
                f"| {r['name']} | {r['runtime']} |",
                " | ".join(f(r.get(k)) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")),
                f"| {f(r['size_mb'], 1)} | {f(r['latency_ms'], 1)} | {f(r['speedup'], 2)}x",
                f"| {f(r['backbone_ms'], 1)} | {f(r['backbone_speedup'], 2)}x",
                f"| {f(r.get('int8_gap_AP'), 4, signed=True)} |"]))
        i = self.info
        lines.append(f"\n{i['cpu']}, {i['threads']} threads, image {i['image_size'][0]}x{i['image_size'][1]}, "
                     f"median of {i['runs']} runs after {i['warmup']} warm-up; torch {i['torch']}, "
                     f"onnxruntime {i['onnxruntime']}. Speedups vs FP32 eager PyTorch.")
        return "\n".join(lines)

    def log_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.out / "tensorboard"))
        for r in self.rows:
            if r.get("error"):
                continue
            tag = r["name"].replace(" ", "_")
            for key in ("AP", "AP50", "AP75", "AR100", "size_mb", "latency_ms", "backbone_ms", "speedup"):
                value = r.get(key)
                if isinstance(value, (int, float)) and not math.isnan(value):
                    writer.add_scalar(f"compare/{key}/{tag}", value, 0)
        writer.add_text("compare", self.markdown(), 0)
        writer.close()


def run_compare(float_ckpt: str | Path | None, qat_ckpts: Sequence[str | Path], out_dir: str | Path, data: Any, *,
                ptq_bits: Sequence[int] = (8, 4), calibration: str = "percentile", n_cal: int = 20,
                peers: Sequence[str] = PEERS, runs: int = 20, warmup: int = 3, threads: int = 2,
                progress: bool = True) -> Comparison:
    """The full comparison: FP32 (eager and ORT), fqn PTQ at ``ptq_bits``, each QAT checkpoint, the peers.

    ``data`` is a `DetectionDataModule`; its validation split is evaluated and its ``n_cal``
    calibration batches (un-augmented) calibrate every PTQ, fqn's and the peers'. Without
    ``float_ckpt`` the FP32 model is the one the first QAT checkpoint was fine-tuned from (its
    ``init_from``, or the torchvision weights it started from).
    """
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    if float_ckpt is None and not qat_ckpts:
        raise ValueError("give the FP32 checkpoint (--float), QAT checkpoints (--qat), or both")
    float_model, hp = load_detector(float_ckpt) if float_ckpt else load_float_reference(qat_ckpts[0])
    if getattr(float_model, "fqn_config", None) is not None:
        raise ValueError(f"{float_ckpt} is a quantized checkpoint; --float needs the FP32 one")
    qat = []
    for path in qat_ckpts:
        model, qhp = load_detector(path)
        if getattr(model, "fqn_config", None) is None:
            raise ValueError(f"{path} is a float checkpoint; --qat needs QAT checkpoints")
        qat.append((Path(path), model))
    data.setup("validate")
    val = list(data.val_dataloader())
    cal_batches = data.calibration_batches(n_cal)
    cal_images = [img for b in cal_batches for img in batch_images(b)]
    images = [img for b in val for img in batch_images(b)][:max(4, min(runs, 20))]
    cmp = Comparison(out_dir, val, images, runs=runs, warmup=warmup, threads=threads, progress=progress)
    example = images[0]
    print(f"[fqn compare] FP32 ({hp['backbone']}, {len(val)} val batches)", flush=True)
    cmp.add_float(float_model, example)
    for bits in ptq_bits:
        print(f"[fqn compare] fqn PTQ w{bits}a{bits} ({calibration}, {n_cal} batches)", flush=True)
        model = post_training_quantize(float_model, cal_batches, ptq_config(bits, calibration), num_batches=n_cal,
                                       progress=progress)
        cmp.add_quantized(f"fqn PTQ w{bits}a{bits}", "ptq", model, example)
    for path, model in qat:
        cfg = model.fqn_config
        print(f"[fqn compare] fqn QAT w{cfg.bits_w}a{cfg.bits_a} ({path})", flush=True)
        cmp.add_quantized(f"fqn QAT w{cfg.bits_w}a{cfg.bits_a}", "qat", model, example)
    for peer, add in (("ort", cmp.add_ort_peer), ("torchao", cmp.add_torchao_peer)):
        if peer in peers:
            print(f"[fqn compare] peer: {peer}", flush=True)
            try:
                add(float_model, cal_images)
            except Exception as err:  # a peer library missing or failing must not lose the other rows
                cmp.add_failed({"ort": "ORT quantize_static w8a8", "torchao": "torchao pt2e w8a8"}[peer],
                               f"peer-{peer}", err)
    print(f"[fqn compare] timing {len(cmp.rows)} models: {runs} rounds, {threads} threads", flush=True)
    cmp.time_all()
    cmp.log_tensorboard()
    return cmp
