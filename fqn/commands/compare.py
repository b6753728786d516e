"""``fqn compare``: FP32, fqn PTQ, fqn QAT and two peer PTQ baselines side by side, measured the same way.

Every row is evaluated on the same validation images (mAP columns), and timed on the
same images with the same number of threads: the whole detector end to end (one image
per call) and the backbone+FPN alone, median of ``runs`` calls after ``warmup``. Timing
runs round-robin over all rows at the end, so a noisy machine slows every row alike.
Speedups are against the FP32 eager PyTorch row. Rows are written to ``compare.json``
as they finish, so an interrupted comparison keeps what it measured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fqn.commands.common import data_for, fresh_file, provenance, ptq_file_stem, unique_labels
from fqn.commands.peers import ort_quantize_static
from fqn.commands.report import Column, RoundRobinTimer, Timed, log_scalars, markdown_table, write_json
from fqn.evaluation import MAP_COLUMNS, evaluate_map
from fqn.int8.convert import BackboneFPN, convert_int8, export_float, export_part, load_int8, normalize, resized_batch
from fqn.int8.runtime import available_runtimes, make_session
from fqn.models.checkpoint import load_detector, load_float_reference
from fqn.ptq import post_training_quantize, ptq_config, ranges_summary, reconstruction_config
from fqn.quant.calibrate import batch_images
from fqn.quant.reconstruction import ReconstructionConfig
from fqn.quant.state import quant_config

log = logging.getLogger(__name__)

PEERS = ("onnxruntime", "torchao")  # ONNX Runtime's quantize_static, torchao's pt2e X86InductorQuantizer
ROW_FIELDS = ("name", "method", "bits", "runtime", *MAP_COLUMNS, "size_mb", "latency_ms", "backbone_ms",
              "speedup", "backbone_speedup", "fake_quant_AP", "int8_gap_AP", "file")


RUNTIME_LABELS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}


def _part_fn(path: Path, threads: int, runtime: str = "onnxruntime") -> Callable[[Tensor], Any]:
    session, _ = make_session(path, threads, runtime=runtime)
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch.numpy()})


def _file_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


# the comparison table: what `markdown` prints of each row
TABLE = [Column("name", "model"), Column("runtime"), Column("ranges", "activation ranges"),
         *(Column(k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")),
         Column("size_mb", "size MB", 1), Column("packed_mb", "int4-packed MB", 1),
         Column("latency_ms", "latency ms", 1),
         Column("speedup", "speedup", 2, suffix="x"), Column("backbone_ms", "backbone+FPN ms", 1),
         Column("backbone_speedup", "speedup", 2, suffix="x"),
         Column("int8_gap_AP", "int8 - fake-quant AP", 4, signed=True)]

Row = tuple[dict[str, Any], dict[str, Timed]]
"""A row of the comparison and what to time for it (``latency_ms``: end to end, ``backbone_ms``)."""


@dataclass
class Bench:
    """What every row is measured on: the same validation batches, images, threads and output folder."""

    out: Path
    val: list
    images: list[Tensor]
    threads: int = 2
    progress: bool = True
    runtimes: tuple[str, ...] = ("onnxruntime",)

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError("need threads >= 1")
        unknown = set(self.runtimes) - set(RUNTIME_LABELS)
        if unknown or not self.runtimes:
            raise ValueError(f"runtimes must be among {tuple(RUNTIME_LABELS)}, got {self.runtimes}")
        if not self.val or not self.images:
            raise ValueError("the comparison needs validation batches and at least one image to time")
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def evaluate(self, model: Any) -> dict[str, float]:
        return evaluate_map(model, self.val, progress=self.progress)

    def e2e(self, model: Any) -> Timed:
        return Timed(lambda img: model([img]), self.images)

    def backbone(self, fn: Callable[[Tensor], Any], model: nn.Module, normalized: bool = False) -> Timed:
        batches = [resized_batch(model, img) for img in self.images[:4]]
        if normalized:
            batches = [normalize(model.transform, b) for b in batches]
        return Timed(fn, batches)


@dataclass
class FloatFiles:
    """The FP32 ONNX files, whole detector and backbone+FPN: the ORT peer quantizes these."""

    detector: Path
    backbone_fpn: Path


def export_float_files(bench: Bench, model: nn.Module, example: Tensor) -> FloatFiles:
    model = model.cpu().eval()
    return FloatFiles(export_float(model, bench.out / "fp32.onnx", [example]),
                      export_part(model, "backbone_fpn", bench.out / "fp32_backbone_fpn.onnx", example))


def float_rows(bench: Bench, model: nn.Module, files: FloatFiles) -> list[Row]:
    """FP32 eager PyTorch (the baseline of every speedup) and the same model's ONNX file in each runtime."""
    model = model.cpu().eval()
    size = _file_mb(files.detector)
    rows = [({"name": "FP32", "method": "fp32", "bits": 32, "runtime": "PyTorch eager", **bench.evaluate(model),
              "size_mb": size, "file": files.detector.name},
             {"latency_ms": bench.e2e(model), "backbone_ms": bench.backbone(BackboneFPN(model).eval(), model)})]
    for runtime in bench.runtimes:
        label = RUNTIME_LABELS[runtime]
        runner = load_int8(files.detector, bench.threads, runtime=runtime)
        rows.append(({"name": f"FP32 ({label})", "method": "fp32", "bits": 32, "runtime": label,
                      **bench.evaluate(runner), "size_mb": size, "file": files.detector.name},
                     {"latency_ms": bench.e2e(runner),
                      "backbone_ms": bench.backbone(_part_fn(files.backbone_fpn, bench.threads, runtime), model)}))
    return rows


def quantized_rows(bench: Bench, name: str, method: str, model: nn.Module, example: Tensor, stem: str) -> list[Row]:
    """A fake-quant fqn model (PTQ or QAT): its fake-quant mAP, then, per runtime, the int8 file's mAP and latency.

    The file timed is the deployable one, ``stem.onnx``, opened as a deployer opens it; at <= 4 bits the
    packed-INT4 storage file is written beside it and its size given as ``packed_mb``.
    """
    cfg = quant_config(model)
    fake = bench.evaluate(model)
    packed = bench.out / f"{stem}.int4.onnx" if cfg.bits_w <= 4 else None
    path = convert_int8(model, bench.out / f"{stem}.onnx", [example], packed_path=packed)
    part = export_part(model, "backbone_fpn", bench.out / f"{stem}_backbone_fpn.onnx", example)
    extra = {"packed_mb": _file_mb(packed), "packed_file": packed.name} if packed is not None else {}
    rows = []
    for runtime in bench.runtimes:
        int8 = load_int8(path, bench.threads, runtime=runtime)
        metrics = bench.evaluate(int8)
        rows.append(({"name": name, "method": method, "bits": cfg.bits_w, "runtime": f"{RUNTIME_LABELS[runtime]} int8",
                      **metrics, "size_mb": _file_mb(path), **extra, "fake_quant_AP": fake["AP"],
                      "int8_gap_AP": metrics["AP"] - fake["AP"], "file": path.name, "config": cfg.to_dict(),
                      "ranges": ranges_summary(model)},
                     {"latency_ms": bench.e2e(int8),
                      "backbone_ms": bench.backbone(_part_fn(part, bench.threads, runtime), model)}))
    return rows


def ort_peer_row(bench: Bench, model: nn.Module, calibration_images: list[Tensor], files: FloatFiles) -> Row:
    """ONNX Runtime's ``quantize_static`` of the FP32 files, calibrated on the same images as fqn's PTQ."""
    path = ort_quantize_static(files.detector, bench.out / "ort_quantize_static.onnx",
                               [{"image": img.numpy()} for img in calibration_images])
    part = ort_quantize_static(files.backbone_fpn, bench.out / "ort_quantize_static_bb.onnx",
                               [{"batch": resized_batch(model, img).numpy()} for img in calibration_images])
    peer = load_int8(path, bench.threads)
    return ({"name": "ORT quantize_static w8a8", "method": "peer-onnxruntime", "bits": 8,
             "runtime": "ONNX Runtime int8", **bench.evaluate(peer), "size_mb": _file_mb(path), "file": path.name},
            {"latency_ms": bench.e2e(peer), "backbone_ms": bench.backbone(_part_fn(part, bench.threads), model)})


def torchao_peer_row(bench: Bench, model: nn.Module, calibration_images: list[Tensor]) -> Row:
    """torchao's pt2e X86InductorQuantizer on the backbone+FPN and box head, same calibration images."""
    from fqn.commands.peers import torchao_pt2e  # lazy: onnxruntime.quantization and torchao, only for peer rows

    peer, extra = torchao_pt2e(model, calibration_images)
    return ({"name": "torchao pt2e X86Inductor w8a8", "method": "peer-torchao", "bits": 8,
             "runtime": "PyTorch Inductor int8 (backbone+FPN, box head)", **bench.evaluate(peer),
             "size_mb": extra["bytes"] / 1e6},
            {"latency_ms": bench.e2e(peer), "backbone_ms": bench.backbone(extra["backbone"], model, normalized=True)})


class Comparison:
    """The comparison's rows and where they are written: ``compare.json`` after every row, Markdown, TensorBoard."""

    def __init__(self, out_dir: str | Path, info: dict[str, Any]) -> None:
        self.out = Path(out_dir)
        self.info = info
        self.extra: dict[str, Any] = {}  # what a caller adds to the record (the quickstart: its time per phase)
        self.rows: list[dict[str, Any]] = []
        self.timers: list[tuple[dict[str, Any], dict[str, Timed]]] = []

    def add(self, row: dict[str, Any], timers: dict[str, Timed] | None = None) -> dict[str, Any]:
        full = {k: row.get(k) for k in ROW_FIELDS}
        full.update({k: v for k, v in row.items() if k not in full})
        self.rows.append(full)
        if timers:
            self.timers.append((full, timers))
        self.save()
        missing = float("nan")  # not measured (a failed row): `or` would also turn an AP of 0.0 into nan
        log.info("compare: %s AP=%.4f size=%.1f MB", full["name"], missing if full.get("AP") is None else full["AP"],
                 missing if full.get("size_mb") is None else full["size_mb"])
        return full

    def add_failed(self, name: str, method: str, err: Exception) -> None:
        log.warning("compare: %s failed: %s", name, err)
        self.add({"name": name, "method": method, "runtime": f"failed: {type(err).__name__}: {str(err)[:80]}",
                  "error": f"{type(err).__name__}: {err}"})

    def time_all(self, timer: RoundRobinTimer) -> None:
        """Time every row round-robin, then the speedups against FP32 eager PyTorch."""
        timed = {(id(row), key): t for row, timers in self.timers for key, t in timers.items()}
        medians = timer.run(timed)
        for row, timers in self.timers:
            for key in timers:
                row[key] = medians[(id(row), key)]
        base = next((r for r in self.rows if r["method"] == "fp32" and r["runtime"] == "PyTorch eager"), None)
        for row in self.rows:
            if base is not None and row.get("latency_ms"):
                row["speedup"] = base["latency_ms"] / row["latency_ms"]
            if base is not None and row.get("backbone_ms"):
                row["backbone_speedup"] = base["backbone_ms"] / row["backbone_ms"]
        self.save()

    def save(self) -> Path:
        return write_json(self.out / "compare.json", {"machine": self.info, **self.extra, "rows": self.rows})

    def markdown(self) -> str:
        i = self.info
        return (markdown_table(self.rows, TABLE)
                + f"\n\n{i['cpu']}, {i['threads']} threads, image {i['image_size'][0]}x{i['image_size'][1]}, "
                f"median of {i['runs']} runs after {i['warmup']} warm-up; torch {i['torch']}, "
                f"onnxruntime {i['onnxruntime']}" + (f", openvino {i['openvino']}" if "openvino" in i else "")
                + ". Speedups vs FP32 eager PyTorch.")

    def log_tensorboard(self) -> None:
        ok = [r for r in self.rows if not r.get("error")]
        log_scalars(self.out / "tensorboard", ok, "name",
                    ("AP", "AP50", "AP75", "AR100", "size_mb", "latency_ms", "backbone_ms", "speedup"), "compare",
                    self.markdown())


def run_compare_command(float_ckpt: str | None, qat_ckpts: Sequence[str], out_dir: str | Path, *,
                        config: str | None = None, num_val: int | None = None, **options: Any) -> Comparison:
    """``fqn compare``: `run_compare` on ``config``'s data, or on the data the models were trained on; prints it."""
    fresh_file(Path(out_dir) / "compare.json")
    overrides = {"num_val": num_val} if num_val is not None else {}
    data = data_for(float_ckpt or (qat_ckpts[0] if qat_ckpts else None), config, **overrides)
    cmp = run_compare(float_ckpt, qat_ckpts, out_dir, data, **options)
    print(cmp.markdown())
    print(f"\nresults: {cmp.out / 'compare.json'}; TensorBoard: tensorboard --logdir {cmp.out / 'tensorboard'}")
    return cmp


def run_compare(float_ckpt: str | Path | None, qat_ckpts: Sequence[str | Path], out_dir: str | Path, data: Any, *,
                ptq_bits: Sequence[int] = (8, 4), calibration: str = "search", bias_correction: bool = False,
                reconstruction: ReconstructionConfig | str | None = None, n_cal: int = 20,
                head_bits: int | None = None,
                peers: Sequence[str] = PEERS, runs: int = 20, warmup: int = 3,
                threads: int | None = None, progress: bool = True, runtimes: Sequence[str] | None = None,
                settings: dict[str, Any] | None = None) -> Comparison:
    """The full comparison: FP32 (eager and ORT), fqn PTQ at ``ptq_bits``, each QAT checkpoint, the peers.

    ``data`` is a `DetectionDataModule`; its validation split is evaluated and its ``n_cal``
    calibration batches (un-augmented) calibrate every PTQ, fqn's and the peers'. Without
    ``float_ckpt`` the FP32 model is the one the first QAT checkpoint was fine-tuned from (its
    ``init_from``, or the torchvision weights it started from). QAT rows are named after their runs
    (``fqn QAT w4a4 (synthetic_w4a4)``). ``runtimes``: where the ONNX files run (default: ONNX Runtime, and
    OpenVINO when it is installed); ``threads``: default torch's. ``settings`` are recorded in ``compare.json``.
    ``reconstruction``: fqn's PTQ rows learn their rounding (`post_training_quantize`), named for it
    (``fqn PTQ w4a4 (qdrop)``); ``head_bits``: their heads' layers at that bit-width (``fqn PTQ w4a4 (heads 8-bit)``).
    """
    rcfg = reconstruction_config(reconstruction)
    if runtimes is None:
        runtimes = available_runtimes()
        if "openvino" not in runtimes:
            log.warning("compare: OpenVINO is not installed (pip install openvino): ONNX Runtime rows only")
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    if float_ckpt is None and not qat_ckpts:
        raise ValueError("give the FP32 checkpoint (--float), QAT checkpoints (--qat), or both")
    float_model, hp = load_detector(float_ckpt) if float_ckpt else load_float_reference(qat_ckpts[0])
    if quant_config(float_model) is not None:
        raise ValueError(f"{float_ckpt} is a quantized checkpoint; --float needs the FP32 one")
    qat = []
    for path in qat_ckpts:
        model, qhp = load_detector(path)
        if quant_config(model) is None:
            raise ValueError(f"{path} is a float checkpoint; --qat needs QAT checkpoints")
        qat.append((Path(path), model))
    labels = unique_labels([p for p, _ in qat])
    threads = threads or torch.get_num_threads()
    data.setup("validate")
    val = list(data.val_dataloader())
    cal_batches = data.calibration_batches(n_cal)
    cal_images = [img for b in cal_batches for img in batch_images(b)]
    images = [img for b in val for img in batch_images(b)][:max(4, min(runs, 20))]
    warmup = min(warmup, runs)  # a quick look (--runs 1) is not worth three warm-up rounds of every model
    timer = RoundRobinTimer(runs, warmup, progress)
    bench = Bench(Path(out_dir), val, images, threads, progress, tuple(runtimes))
    torch.set_num_threads(threads)
    info = {**provenance(threads), "image_size": list(images[0].shape[-2:]), "runs": runs, "warmup": warmup,
            "val_images": sum(len(b[0]) for b in val), "calibration_batches": len(cal_batches),
            "data_source": getattr(data, "source", None), "settings": settings or {}}
    cmp = Comparison(bench.out, info)
    example = images[0]
    print(f"[fqn compare] FP32 ({hp['backbone']}, {len(val)} val batches)", flush=True)
    files = export_float_files(bench, float_model, example)
    for row in float_rows(bench, float_model, files):
        cmp.add(*row)
    for bits in ptq_bits:
        how = [calibration] + (["bias correction"] if bias_correction else [])
        how += [f"heads {head_bits}-bit"] if head_bits else []
        how += [f"{rcfg.method} {rcfg.iters} iterations"] if rcfg else []
        print(f"[fqn compare] fqn PTQ w{bits}a{bits} ({', '.join(how)}, {n_cal} batches)", flush=True)
        cfg = ptq_config(bits, calibration, head_bits=head_bits)
        model = post_training_quantize(float_model, cal_batches, cfg, num_batches=n_cal,
                                       bias_correction=bias_correction, reconstruction=rcfg, progress=progress)
        variant = ([f"heads {head_bits}-bit"] if head_bits else []) + ([rcfg.method] if rcfg else [])
        name = f"fqn PTQ w{bits}a{bits}" + (f" ({', '.join(variant)})" if variant else "")
        stem = "fqn_" + ptq_file_stem(bits, head_bits, rcfg.method if rcfg else None)
        for row in quantized_rows(bench, name, "ptq", model, example, stem):
            cmp.add(*row)
    for (path, model), label in zip(qat, labels):
        cfg = quant_config(model)
        wa = f"w{cfg.bits_w}a{cfg.bits_a}"
        print(f"[fqn compare] fqn QAT {wa} ({path})", flush=True)
        stem = f"fqn_qat_{wa}_{label.replace('/', '-')}"
        for row in quantized_rows(bench, f"fqn QAT {wa} ({label})", "qat", model, example, stem):
            cmp.add({**row[0], "run": str(path)}, row[1])
    producers = {"onnxruntime": lambda: ort_peer_row(bench, float_model, cal_images, files),
                 "torchao": lambda: torchao_peer_row(bench, float_model, cal_images)}
    for peer, produce in producers.items():
        if peer in peers:
            print(f"[fqn compare] peer: {peer}", flush=True)
            try:
                cmp.add(*produce())
            except Exception as err:  # a peer library missing or failing must not lose the other rows
                cmp.add_failed({"onnxruntime": "ORT quantize_static w8a8", "torchao": "torchao pt2e w8a8"}[peer],
                               f"peer-{peer}", err)
    print(f"[fqn compare] timing {len(cmp.rows)} models: {runs} rounds, {threads} threads", flush=True)
    cmp.time_all(timer)
    cmp.log_tensorboard()
    return cmp
