"""``fqn quickstart``: the whole story on the embedded synthetic data, on a CPU, in minutes.

float training (reused when already done) -> fqn QAT at 4 bits -> fqn PTQ at 8 and 4 bits
-> int8 ONNX files -> the comparison table with the ORT and torchao peers. Everything lands in
one folder: checkpoints, TensorBoard runs, the int8 files and ``compare/compare.json``. An
interrupted quickstart resumes each training run from its ``last.ckpt``.

The float model trains from scratch (nothing downloads), so the schedule is chosen for what a
from-scratch detector learns in a few minutes on 2 cores (measured, see the README): AdamW, which
leaves the early plateau where SGD sits for ~500 steps; 64 sampled RoIs per image for the box
head instead of 128, which makes a step ~1.4x cheaper (a 256-wide box head, cheaper still, did not
learn in that time); and a 128-wide FPN, which halves a step again and trained to a better detector
in the same steps. QAT learns its activation ranges (LSQ+, flag L) from the paper's percentiles.
The training runs skip their own end-of-run validation: the comparison evaluates every model anyway.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fqn.commands.compare import Comparison, run_compare
from fqn.commands.config_files import load_config
from fqn.config import QuantConfig
from fqn.data.datamodule import DetectionDataModule
from fqn.data.synthetic import SyntheticConfig
from fqn.train.runs import train_run

log = logging.getLogger(__name__)

def base_config() -> dict[str, Any]:
    """The packaged ``base.yaml``: the detector and data settings every run starts from, the quickstart's too."""
    return load_config("base")


@dataclass
class QuickstartConfig:
    """What the quickstart runs; the defaults' time on 2 CPU cores is in docs/quickstart.md (budget: 15 min)."""

    out: str = "runs/quickstart"
    backbone: str = "resnet18"
    size: int = 160
    float_steps: int = 700
    qat_steps: int = 150
    qat_bits: tuple[int, ...] = (4,)
    ptq_bits: tuple[int, ...] = (8, 4)
    batch_size: int = 4
    num_val: int = 100
    n_cal: int = 20
    peers: tuple[str, ...] = ("onnxruntime", "torchao")
    runs: int = 10
    threads: int | None = None  # torch's default: one per core

    def __post_init__(self) -> None:
        if self.float_steps < 1 or self.qat_steps < 1 or self.num_val < 1 or self.n_cal < 1:
            raise ValueError("float_steps, qat_steps, num_val and n_cal must be >= 1")


def _data(cfg: QuickstartConfig) -> DetectionDataModule:
    base = base_config()
    synthetic = SyntheticConfig(image_size=cfg.size, num_classes=base["data"]["synthetic"]["num_classes"],
                                max_size=min(80, cfg.size // 2))
    return DetectionDataModule.from_config(base, synthetic=synthetic, num_val=cfg.num_val, batch_size=cfg.batch_size)


# the quickstart samples 64 RoIs per image for the box head (base.yaml: 128): a step ~1.4x cheaper; and its
# FPN is 128 wide (torchvision: 256): the FPN and RPN 3x3 convs dominate at 160 px, a step costs half
HEAD = {"box_batch_size_per_image": 64, "fpn_channels": 128}
# the float run: AdamW at 1e-3 per 4 images (lr is given at base_batch_size=16 and scaled linearly)
FLOAT_TRAINING = {"optimizer": "adamw", "lr": 0.004, "warmup_steps": 50}
# QAT from that model: AdamW at 1e-4 per 4 images. SGD at the paper's 2e-3 per 4 images took an
# AdamW-trained model below its own PTQ (measured at 4 bits: 0.341 fake-quant AP against PTQ's 0.397);
# 1e-4 gave 0.409, 3e-4 0.394 and 1e-5 0.374.
# The activation ranges are learned (LSQ+, flag L) at 100x that LR, starting from the paper's percentiles. At
# fixed ranges, 50 steps left QAT within noise of fqn's PTQ (256-wide FPN: 0.433 against PTQ's 0.460, learned
# ranges 0.487); with learned ranges and the 128-wide FPN, 50 steps gave 0.566 and 150 steps 0.607 against
# PTQ's 0.541 (FP32 0.609).
QAT_TRAINING = {"optimizer": "adamw", "lr": 0.0004, "warmup_steps": 10, "range_lr_scale": 100.0}


def _train(name: str, cfg: QuickstartConfig, steps: int, **module_kw: Any) -> Path:
    model = base_config()["model"]
    module_kw = {"backbone": cfg.backbone, "num_classes": model["num_classes"], "min_size": cfg.size,
                 "max_size": cfg.size, "detector": {**model["detector"], **HEAD},
                 "base_batch_size": model["base_batch_size"], **module_kw}
    return train_run(name, cfg.out, steps, _data(cfg), module_kw, tag="fqn quickstart",
                     trainer_kw={"limit_val_batches": 0})  # compare evaluates every model


def finished_comparison(folder: Path, settings: dict[str, Any]) -> Any:
    """The comparison an earlier quickstart left in ``folder``: reused when made with ``settings``, else an error
    (a quickstart never overwrites an earlier result); None when there is none, or it did not finish."""
    path = folder / "compare.json"
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored["machine"].get("settings") != json.loads(json.dumps(settings)):
        raise FileExistsError(f"{path} holds a comparison made with other settings; pass another --out, or delete "
                              f"{folder} to run it again")
    if not all(r.get("latency_ms") or r.get("error") for r in stored["rows"]):
        return None  # interrupted before the timing: redone (the training runs it needs are reused)
    cmp = Comparison(folder, stored["machine"])
    cmp.rows = stored["rows"]
    return cmp


def run_quickstart_command(*, qat_bits: Sequence[int], ptq_bits: Sequence[int], peers: Sequence[str],
                           **settings: Any) -> Path:
    """``fqn quickstart``: `run_quickstart` with the `QuickstartConfig` of the command's options (``out``,
    ``backbone``, ``size``, ``float_steps``, ``qat_steps``, ``num_val``, ``n_cal``, ``runs``, ``threads``); the
    lists become the config's tuples, so a finished quickstart is recognised by its settings."""
    return run_quickstart(QuickstartConfig(qat_bits=tuple(qat_bits), ptq_bits=tuple(ptq_bits), peers=tuple(peers),
                                           **settings))


def run_quickstart(cfg: QuickstartConfig | None = None) -> Path:
    """Run the pipeline; returns the comparison folder. A finished quickstart in ``cfg.out`` is printed, not redone."""
    cfg = cfg or QuickstartConfig()
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    settings = {k: v for k, v in asdict(cfg).items() if k != "out"}
    done = finished_comparison(Path(cfg.out) / "compare", settings)
    if done is not None:
        print(done.markdown())
        print(f"\n[fqn quickstart] already done: {done.out / 'compare.json'} holds this comparison (same settings). "
              "To run it again, pass another --out or delete that folder.")
        return done.out
    float_ckpt = _train("float", cfg, cfg.float_steps, **FLOAT_TRAINING,
                        lr_steps=[int(cfg.float_steps * 0.8), int(cfg.float_steps * 0.93)])
    seconds = {"float": time.perf_counter() - t0}
    qat = []
    for bits in cfg.qat_bits:
        qat.append(_train(f"qat_w{bits}a{bits}", cfg, cfg.qat_steps, init_from=str(float_ckpt),
                          quant=QuantConfig(bits_w=bits, bits_a=bits, n_cal=cfg.n_cal, learn_ranges=True),
                          **QAT_TRAINING,
                          ptq_eval=False))
    seconds["qat"] = time.perf_counter() - t0 - seconds["float"]
    print(f"[fqn quickstart] comparing FP32, fqn PTQ/QAT and the peers ({time.perf_counter() - t0:.0f} s so far)",
          flush=True)
    cmp = run_compare(float_ckpt, qat, Path(cfg.out) / "compare", _data(cfg), ptq_bits=cfg.ptq_bits,
                      n_cal=cfg.n_cal, peers=cfg.peers, runs=cfg.runs, threads=cfg.threads, settings=settings)
    seconds["compare"] = time.perf_counter() - t0 - seconds["float"] - seconds["qat"]
    cmp.extra["quickstart_seconds"] = {**seconds, "total": time.perf_counter() - t0}  # trained runs reused: less
    cmp.save()
    print("\n" + cmp.markdown())
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n[fqn quickstart] done in {minutes:.1f} min. Everything is in {Path(cfg.out).resolve()}:\n"
          f"  int8 models:  {cmp.out}/*.onnx  (run one on your images: fqn predict FILE.onnx IMAGES --out OUT)\n"
          f"  results:      {cmp.out / 'compare.json'}\n"
          f"  TensorBoard:  tensorboard --logdir {Path(cfg.out) / 'tensorboard'}  (compare: {cmp.out / 'tensorboard'})")
    return cmp.out
