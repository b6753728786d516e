"""One named training run with a TensorBoard log and a resumable ``last.ckpt``: what the quickstart and
the ablation grid run many of. A finished run is reused; an interrupted one resumes from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from fqn.config import QuantConfig
from fqn.train.module import DetectionModule
from fqn.train.monitor import QuantMonitor


def stored_run(ckpt: Path) -> dict[str, Any]:
    """What a run's checkpoint records about the run (its step and hyper-parameters); empty without one."""
    if not ckpt.is_file():
        return {}
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return {"global_step": int(state.get("global_step", 0)), "hyper_parameters": state.get("hyper_parameters", {})}


def _plain(value: Any) -> str:
    """A comparable form of a setting (QuantConfig, tuple/list, dict, path) as a checkpoint stores it."""
    if isinstance(value, QuantConfig):
        value = value.to_dict()
    return json.dumps(value, sort_keys=True, default=str)


def changed_settings(stored: dict[str, Any], module_kw: dict[str, Any]) -> list[str]:
    """The settings in ``module_kw`` that a run (its `stored_run` record) was trained with differently: reusing
    or resuming such a run would silently mix two experiments (or fail later, when a changed architecture
    meets it)."""
    hparams = dict(stored.get("hyper_parameters", {}))
    if isinstance(hparams.get("quant"), dict):  # an older checkpoint lacks newer fields: compare with defaults
        hparams["quant"] = QuantConfig.from_dict(hparams["quant"])
    return [k for k, v in module_kw.items() if k in hparams and _plain(hparams[k]) != _plain(v)]


def train_run(name: str, out: str | Path, steps: int, data: Any, module_kw: dict[str, Any], *,
              trainer_kw: dict[str, Any] | None = None, tag: str = "fqn") -> Path:
    """Train ``DetectionModule(**module_kw)`` for ``steps`` steps into ``out/name/last.ckpt``; returns it.

    TensorBoard logs go to ``out/tensorboard/name``; ``last.ckpt`` is written every 25 steps and at the
    end, so a crash loses at most 25 steps; validation runs once, at the end.
    """
    out = Path(out)
    ckpt_dir = out / name
    last = ckpt_dir / "last.ckpt"
    stored = stored_run(last)  # read once: a float checkpoint with its optimizer state is hundreds of MB
    changed = changed_settings(stored, module_kw)
    if changed:
        raise ValueError(f"{last} was trained with other settings ({', '.join(changed)}) than this run asks for; "
                         f"use another output folder, or delete {ckpt_dir} to train it again")
    if stored.get("global_step", 0) >= steps:
        print(f"[{tag}] {name}: reusing {last}", flush=True)
        return last
    resume = str(last) if last.is_file() else None
    print(f"[{tag}] {name}: {steps} steps" + (f", resuming {last}" if resume else ""), flush=True)
    pl.seed_everything(0, verbose=False)
    module = DetectionModule(**module_kw)
    settings = {"accelerator": "cpu", "devices": 1, "log_every_n_steps": 10, "gradient_clip_val": 10.0,
                "enable_model_summary": False}
    settings.update(trainer_kw or {})
    trainer = pl.Trainer(
        max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        use_distributed_sampler=False, logger=TensorBoardLogger(str(out / "tensorboard"), name=name, version=0),
        callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0, every_n_train_steps=25),
                   LearningRateMonitor(logging_interval="step"), QuantMonitor(log_every_n_steps=25)],
        **settings)
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    trainer.save_checkpoint(str(last))
    return last
