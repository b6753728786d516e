"""``fqn ablate``: the FQN paper's ablation tables as grids of ordinary QAT (or PTQ) runs from one float model.

Every row is a normal run: its own TensorBoard run and checkpoint under ``OUT/runs/ROW``,
the same seed, schedule and calibration batches as every other row. Each row is then
evaluated as fake-quant and after conversion to int8. A row is done when
``OUT/rows/ROW.json`` exists, so an interrupted grid re-runs only the rows not yet done, and
a half-trained row resumes from its ``last.ckpt``. Rows can run in parallel processes.

Tables (``--table``):

* ``fpc``: Table 2, the [17] baseline (none of F/P/C), each flag alone, each pair, all three;
* ``bn``: Table 3, BN frozen for the whole fine-tuning vs only its last N steps;
* ``gamma``: Table 4, the percentile γ in {0.999, 0.9973, 0.9545};
* ``calibration``: Table 5's spirit, moving-average vs percentile vs histogram ranges, PTQ and QAT;
* ``reconstruction``: PTQ by nearest rounding against learned rounding and block reconstruction (AdaRound,
  BRECQ, QDrop; fqn's PTQ ranges), and QAT from nearest rounding (FQN, + learned ranges) against QAT from a
  BRECQ-reconstructed start;
* ``beyond``: beyond FQN at the same step budget: FQN (F+P+C), + learned ranges (LSQ+), + distillation
  from the float model, + sensitivity-driven mixed precision (the most sensitive layers at 8 bits
  within a weight-storage budget), and all three together. Every row reports its weight storage.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from fqn.commands.common import command_line, provenance
from fqn.commands.config_files import load_config
from fqn.commands.report import Column, markdown_table, write_json, write_report
from fqn.config import QuantConfig
from fqn.data.datamodule import DetectionDataModule
from fqn.data.synthetic import synthetic_scenes
from fqn.evaluation import evaluate_map
from fqn.int8 import convert_int8, load_int8
from fqn.models.checkpoint import load_detector
from fqn.models.sensitivity import choose_layer_bits, layer_sensitivity
from fqn.ptq import post_training_quantize
from fqn.quant.calibrate import batch_images
from fqn.quant.prepare import weight_bits
from fqn.quant.reconstruction import ReconstructionConfig
from fqn.quant.state import quant_state
from fqn.train.runs import train_run

METRICS = ("AP", "AP50", "AP75")
TABLES = ("fpc", "bn", "gamma", "calibration", "reconstruction", "beyond")
PTQ_RANGES = {"percentile": False, "act_observer": "search"}  # fqn's PTQ (`fqn.ptq.ptq_config`)
# the reconstruction QAT starts from in the reconstruction table: one of the two strongest PTQ w4a4 methods on the
# synthetic set (BRECQ and QDrop, within about 0.01 AP of each other, docs/ptq.md); the docs' QAT rows start from it
START = "brecq"
DISTILL = {"fpn": 1.0, "rpn": 1.0, "cls": 1.0, "temperature": 2.0}
RANGE_LR_SCALE = 100.0  # learned ranges at 100x the QAT learning rate: at 1x they moved < 0.5% in 400 steps
MIXED_BUDGET = 0.25  # added weight bits of the 8-bit layers, as a fraction of the all-low-bit weights
TRAINER_KEYS = ("accelerator", "gradient_clip_val", "log_every_n_steps", "precision")


@dataclass(frozen=True)
class Row:
    """One run of a grid: QuantConfig overrides on top of the bit-width, QAT or PTQ only.

    ``module``: training-module overrides (e.g. ``distill``, ``reconstruction``: where QAT starts);
    ``mixed_budget``: pick ``layer_bits`` by layer sensitivity within this weight-storage budget
    (`fqn.models.sensitivity.choose_layer_bits`); ``reconstruction``: a PTQ row's learned rounding.
    """

    name: str
    quant: dict[str, Any] = field(default_factory=dict)
    qat: bool = True
    module: dict[str, Any] = field(default_factory=dict)
    mixed_budget: float | None = None
    reconstruction: str | None = None

    @property
    def slug(self) -> str:
        return slug(self.name)


def slug(name: str) -> str:
    """A file and run name for a row name: ``[17] baseline`` -> ``17_baseline``, ``F+P`` -> ``f_p``."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_").lower()


def table_rows(table: str, steps: int) -> list[Row]:
    """The rows of a named table, in the paper's order."""
    if table == "fpc":
        combos = ["", "F", "P", "C", "FP", "FC", "PC", "FPC"]
        return [Row("[17] baseline" if not c else "+".join(c),
                    {"freeze_bn": "F" in c, "percentile": "P" in c, "per_channel": "C" in c}) for c in combos]
    if table == "bn":
        last = max(1, steps // 4)
        return [Row("BN frozen throughout", {"freeze_bn": True}),
                Row(f"BN frozen last {last} steps", {"freeze_bn": False, "freeze_bn_last_steps": last})]
    if table == "gamma":
        return [Row(f"gamma={g}", {"gamma": g}) for g in (0.999, 0.9973, 0.9545)]
    if table == "calibration":
        ranges = [("moving average", {"percentile": False}), ("percentile", {}),
                  ("histogram", {"percentile": False, "act_observer": "histogram"})]
        return [Row(f"{kind} {name}", q, qat=kind == "QAT") for kind in ("PTQ", "QAT") for name, q in ranges]
    if table == "reconstruction":
        lsq, start = {"learn_ranges": True}, {"reconstruction": START}
        return [Row("PTQ nearest", PTQ_RANGES, qat=False),
                *(Row(f"PTQ {m}", PTQ_RANGES, qat=False, reconstruction=m) for m in ("adaround", "brecq", "qdrop")),
                Row("QAT from nearest (FQN)"), Row("QAT from nearest, + learned ranges", lsq),
                Row(f"QAT from {START}", module=start), Row(f"QAT from {START}, + learned ranges", lsq, module=start)]
    if table == "beyond":
        lsq, distill = {"learn_ranges": True}, {"distill": DISTILL}
        fast = {"range_lr_scale": RANGE_LR_SCALE}
        return [Row("FQN (F+P+C)"), Row("+ learned ranges (LSQ+)", lsq),
                Row(f"+ learned ranges (LSQ+), range LR x{RANGE_LR_SCALE:g}", lsq, module=fast),
                Row("+ distillation", module=distill), Row("+ mixed precision", mixed_budget=MIXED_BUDGET),
                Row("+ all three", lsq, module=distill, mixed_budget=MIXED_BUDGET),
                Row(f"+ all three, range LR x{RANGE_LR_SCALE:g}", lsq, module={**distill, **fast},
                    mixed_budget=MIXED_BUDGET)]
    raise ValueError(f"unknown table {table!r}; choose one of {TABLES}")


@dataclass
class GridSpec:
    """Everything a row needs, plain values only (sent to worker processes)."""

    float_ckpt: str
    out: str
    bits: int
    steps: int
    model: dict[str, Any]
    data: dict[str, Any]
    trainer: dict[str, Any]
    example_size: int
    reconstruction_iters: int = ReconstructionConfig().iters


def grid_spec(float_ckpt: str, out: str, config: dict[str, Any], *, bits: int, steps: int | None = None,
              seed: int | None = None, reconstruction_iters: int | None = None) -> GridSpec:
    """A grid's settings from a training config (``config_files.load_config``): its model, data and trainer sections.

    ``seed`` replaces the config's data seed (training shuffle, augmentation, calibration batches; the
    validation set stays): a second seed of a table is another grid folder with another seed.
    """
    model = dict(config.get("model") or {})
    trainer = config.get("trainer") or {}
    data = dict(config.get("data") or {})
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        data.pop("seed", None)  # the data module's deprecated name of the same setting
        data["data_seed"] = seed
    steps = steps or int(trainer.get("max_steps", 400))
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    QuantConfig(bits_w=bits, bits_a=bits)  # validates the bit-width
    iters = ReconstructionConfig(iters=reconstruction_iters or ReconstructionConfig().iters).iters  # validated
    return GridSpec(float_ckpt=str(float_ckpt), out=str(out), bits=bits, steps=steps, model=model, data=data,
                    trainer={k: trainer[k] for k in TRAINER_KEYS if k in trainer},
                    example_size=int(model.get("min_size", 160)), reconstruction_iters=iters)


def _row_config(spec: GridSpec, row: Row) -> QuantConfig:
    base = {k: v for k, v in (spec.model.get("quant") or {}).items() if k not in ("bits_w", "bits_a")}
    return QuantConfig(**{**base, "bits_w": spec.bits, "bits_a": spec.bits, **row.quant})


def grid_data(spec: GridSpec) -> Any:
    """The grid's data module (training, calibration and validation data of every row), e.g. for `tools/`."""
    return DetectionDataModule.from_config({"data": spec.data, "model": spec.model})


def run_row(spec: GridSpec, row: Row) -> dict[str, Any]:
    """Train (QAT) or calibrate (PTQ) one row, evaluate it fake-quant and as int8, save ``rows/ROW.json``."""
    started = time.perf_counter()

    def minutes() -> float:
        return (time.perf_counter() - started) / 60

    out = Path(spec.out)
    cfg = _row_config(spec, row)
    data = grid_data(spec)
    if row.mixed_budget is not None:
        cfg = mixed_precision_config(spec.float_ckpt, cfg, data, row.mixed_budget)
    if row.qat:
        module_kw = {k: v for k, v in spec.model.items() if k not in ("quant", "init_from")}
        module_kw.update(init_from=spec.float_ckpt, quant=cfg, ptq_eval=False, **row.module)
        if module_kw.get("reconstruction"):
            module_kw["reconstruction_iters"] = spec.reconstruction_iters
        trainer_kw = {**spec.trainer, "limit_val_batches": 0}  # the row is evaluated below, once, fake-quant and int8
        ckpt = train_run(row.slug, out / "runs", spec.steps, data, module_kw, trainer_kw=trainer_kw,
                         tag="fqn ablate")
        model, _ = load_detector(ckpt)
    else:
        float_model, _ = load_detector(spec.float_ckpt)
        rcfg = ReconstructionConfig(row.reconstruction, iters=spec.reconstruction_iters) if row.reconstruction else None
        model = post_training_quantize(float_model, data.calibration_batches(cfg.n_cal), cfg, progress=False,
                                       reconstruction=rcfg)
        ckpt = None
    made_in = minutes()  # training, or calibration and reconstruction: what the row costs before it is scored
    data.setup("validate")
    val = list(data.val_dataloader())
    fake = evaluate_map(model, val, progress=False)
    packed = out / "int8" / f"{row.slug}.int4.onnx" if min([cfg.bits_w, *cfg.layer_bits.values()]) <= 4 else None
    path = convert_int8(model, out / "int8" / f"{row.slug}.onnx", synthetic_scenes(1, spec.example_size),
                        packed_path=packed)
    int8 = evaluate_map(load_int8(path, threads=torch.get_num_threads()), val, progress=False)
    stored = packed or path
    result = {"row": row.name, "qat": row.qat, "bits": spec.bits, "config": cfg.to_dict(), "module": row.module,
              "reconstruction": (quant_state(model).ptq or {}).get("reconstruction"), "minutes": made_in,
              "weight_MB": weight_bits(model) / 8e6, "file_MB": stored.stat().st_size / 1e6,
              "checkpoint": str(ckpt) if ckpt else None, "int8_file": str(path),
              **{k: fake[k] for k in METRICS}, **{f"int8_{k}": int8[k] for k in METRICS}}
    write_json(out / "rows" / f"{row.slug}.json", result)
    return result


def mixed_precision_config(float_ckpt: str, cfg: QuantConfig, data: Any, budget: float,
                           images: int = 8) -> QuantConfig:
    """``cfg`` with the `layer_bits` that layer sensitivity picks: the float model calibrated at ``cfg``'s
    bit-width, each layer quantized alone on ``images`` calibration images (`layer_sensitivity`,
    ``mode="only"``), the noisiest per weight bit raised to 8 bits within ``budget``."""
    model, _ = load_detector(float_ckpt)
    model = post_training_quantize(model, data.calibration_batches(cfg.n_cal), cfg, progress=False)
    pictures: list[Any] = []
    for batch in data.calibration_batches(images):
        pictures += batch_images(batch)
        if len(pictures) >= images:
            break
    ranking = layer_sensitivity(model, pictures[:images], mode="only")
    layer_bits = choose_layer_bits(ranking, low=min(cfg.bits_w, cfg.bits_a), high=8, budget=budget)
    return QuantConfig(**{**cfg.to_dict(), "layer_bits": layer_bits})


def _fp32_row(spec: GridSpec) -> dict[str, Any]:
    path = Path(spec.out) / "rows" / "fp32.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, _ = load_detector(spec.float_ckpt)
    data = grid_data(spec)
    data.setup("validate")
    metrics = evaluate_map(model, list(data.val_dataloader()), progress=False)
    result = {"row": "FP32", "qat": False, "bits": 32, **{k: metrics[k] for k in METRICS}}
    write_json(path, result)
    return result


def _worker(args: tuple[GridSpec, Row, int]) -> dict[str, Any]:
    spec, row, threads = args
    torch.set_num_threads(threads)
    return run_row(spec, row)


def claim_grid(out: Path, spec: GridSpec, rows: list[Row]) -> None:
    """Write ``out/grid.json``, refusing a folder whose rows were made with other settings.

    A re-run resumes a grid: the rows already in ``out/rows`` are kept as they are. With another step
    count, data seed, bit-width or config they would sit in one table beside rows that differ from them
    (and a QAT run would resume past its old schedule), so that is an error naming what changed.
    """
    path = out / "grid.json"
    if path.is_file():
        stored = json.loads(path.read_text()).get("spec", {})
        now = json.loads(json.dumps(asdict(spec)))
        changed = [k for k in now if k != "out" and k in stored and stored[k] != now[k]]
        if changed:
            raise ValueError(f"{out} holds a grid made with other settings ({', '.join(changed)}): use another "
                             f"--out, or delete {out} to start it again")
    write_json(path, {"spec": asdict(spec), "rows": [asdict(r) for r in rows], "command": command_line()})


def run_grid(spec: GridSpec, rows: list[Row], *, jobs: int = 1, threads: int = 2) -> list[dict[str, Any]]:
    """Run the rows not yet done (``jobs`` at a time, ``threads`` torch threads each); returns all rows' results."""
    if jobs < 1 or threads < 1:
        raise ValueError("jobs and threads must be >= 1")
    out = Path(spec.out)
    claim_grid(out, spec, rows)
    torch.set_num_threads(threads)
    results = [_fp32_row(spec)]
    todo = [r for r in rows if not (out / "rows" / f"{r.slug}.json").is_file()]
    done = len(rows) - len(todo)
    print(f"[fqn ablate] {len(rows)} rows: {done} done, {len(todo)} to run ({jobs} at a time)", flush=True)
    if jobs == 1:
        for i, row in enumerate(todo):
            print(f"[fqn ablate] row {done + i + 1}/{len(rows)}: {row.name}", flush=True)
            run_row(spec, row)
    elif todo:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            for result in pool.map(_worker, [(spec, r, threads) for r in todo]):
                print(f"[fqn ablate] done: {result['row']} AP={result['AP']:.4f}", flush=True)
    results += [json.loads((out / "rows" / f"{r.slug}.json").read_text()) for r in rows]
    grid = {"bits": spec.bits, "steps": spec.steps, "float_ckpt": spec.float_ckpt,
            "batch_size": spec.data.get("batch_size"), "reconstruction_iters": spec.reconstruction_iters}
    write_outputs(out, results, command_line(), grid=grid)
    return results


TABLE = [Column("#"), Column("row"), Column("F"), Column("P"), Column("C"), *(Column(k) for k in METRICS),
         *(Column(f"int8_{k}", f"int8 {k}") for k in METRICS), Column("weight_MB", "weights MB", 2),
         Column("file_MB", "file MB", 2), Column("minutes", "minutes", 1)]
_FLAGS = (("F", "freeze_bn"), ("P", "percentile"), ("C", "per_channel"))


def _display(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows shaped like the paper's table: #, the F/P/C checks, then the numbers."""
    return [{**r, "#": str(i), **{flag: "✓" if (r.get("config") or {}).get(key) else "" for flag, key in _FLAGS}}
            for i, r in enumerate(results)]


def markdown(results: list[dict[str, Any]]) -> str:
    """The table shaped like the paper's: #, the F/P/C checks, AP / AP50 / AP75, then the same for the int8 model."""
    return markdown_table(_display(results), TABLE)


def write_outputs(out: Path, results: list[dict[str, Any]], command: str | None = None,
                  grid: dict[str, Any] | None = None) -> None:
    """``table.md``, ``table.csv``, ``table.json`` and a TensorBoard hparams entry per row (``out/tensorboard``).

    ``grid`` (bits, steps, float checkpoint, batch size, reconstruction iterations) goes into ``table.json``'s
    meta, so a results file copied out of ``out`` still says what the rows were trained for.
    """
    footer = f"\nCommand: `{command}`; settings of every row: `grid.json`.\n" if command else ""
    fields = ["row", "qat", "bits", *METRICS, *(f"int8_{k}" for k in METRICS), "weight_MB", "file_MB"]
    meta = {"command": command, "provenance": provenance(), **({"grid": grid} if grid else {})}
    write_report(out, "table", _display(results), TABLE, meta=meta,
                 footer=footer, csv_keys=fields)

    for r in results:
        hparams = {"row": r["row"], "qat": bool(r.get("qat")), "bits": r.get("bits", 32)}
        hparams.update({k: str(v) for k, v in (r.get("config") or {}).items()})
        metrics = {f"hparam/{k}": float(r[k]) for k in (*METRICS, *(f"int8_{m}" for m in METRICS))
                   if isinstance(r.get(k), (int, float))}
        with SummaryWriter(str(out / "tensorboard" / "hparams")) as w:
            w.add_hparams(hparams, metrics, run_name=slug(r["row"]))


def run_ablate(table: str, float_ckpt: str, out: str, config: str, *, bits: int = 4, steps: int | None = None,
               rows: list[str] | None = None, jobs: int = 1, threads: int | None = None,
               seed: int | None = None, reconstruction_iters: int | None = None) -> list[dict[str, Any]]:
    """``fqn ablate``: the table's rows (all, or those named in ``rows``) run as a resumable grid in ``out``."""
    spec = grid_spec(float_ckpt, out, load_config(config), bits=bits, steps=steps, seed=seed,
                     reconstruction_iters=reconstruction_iters)
    chosen = table_rows(table, spec.steps)
    if rows:
        unknown = set(rows) - {r.name for r in chosen}
        if unknown:
            raise ValueError(f"unknown rows {sorted(unknown)}; the table has {[r.name for r in chosen]}")
        chosen = [r for r in chosen if r.name in rows]
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    results = run_grid(spec, chosen, jobs=jobs, threads=threads)
    print(markdown(results))
    print(f"\ntable: {out}/table.md, {out}/table.csv; TensorBoard: tensorboard --logdir {out}/tensorboard")
    return results
