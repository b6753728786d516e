"""Resuming training: a run killed mid-epoch and resumed from its last checkpoint ends where an uninterrupted
run does, and `fqn fit --ckpt_path` resumes in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from fqn import QuantConfig

from .tiny import tiny_data, tiny_module, tiny_trainer

pytestmark = pytest.mark.slow  # end to end: the fast tier (-m 'not slow') leaves it out

REPO = Path(__file__).resolve().parents[2]


class _Killed(RuntimeError):
    pass


class _Crash(pl.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise _Killed("simulated kill")


def _qat_run(root: Path, float_ckpt: Path, *, crash_at: int | None = None, resume: Path | None = None):
    cfg = QuantConfig(bits_w=4, bits_a=4, n_cal=2, percentile=False, freeze_bn=False)  # EMA + BN stats: stateful
    model = tiny_module(quant=cfg, init_from=str(float_ckpt), seed=3)
    data = tiny_data(data_seed=5)  # 12 images / batch 2 = 6 batches per epoch: step 3 is mid-epoch
    ckpt = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=1)
    callbacks = [ckpt] + ([_Crash(crash_at)] if crash_at is not None else [])
    pl.seed_everything(0)
    trainer = tiny_trainer(str(root), max_steps=5, limit_val_batches=0, callbacks=callbacks,
                           enable_checkpointing=True)
    trainer.fit(model, data, ckpt_path=str(resume) if resume else None)
    return model, trainer


def test_resume_after_a_kill_mid_epoch_matches_an_uninterrupted_run(float_ckpt, tmp_path):
    full, _ = _qat_run(tmp_path / "full", float_ckpt)
    with pytest.raises(_Killed):
        _qat_run(tmp_path / "killed", float_ckpt, crash_at=3)
    last = tmp_path / "killed" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed, trainer = _qat_run(tmp_path / "resumed", float_ckpt, resume=last)
    assert trainer.global_step == 5
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def _fqn(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fqn")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cli_fit_resumes_from_its_last_checkpoint(tmp_path):
    """`fqn fit` in a subprocess, then again with `--ckpt_path` and one more step (bad input: test_trainer.py)."""
    tiny = ["--data.num_train", "4", "--data.num_val", "2", "--data.synthetic.image_size", "96",
            "--data.synthetic.max_size", "48", "--model.min_size", "96", "--model.max_size", "96",
            "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1"]
    result = _fqn("fit", "--config", str(REPO / "configs/synthetic_float.yaml"), *tiny, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    last = tmp_path / "runs" / "synthetic_float" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    two_steps = [("2" if a == "1" and tiny[i - 1] == "--trainer.max_steps" else a) for i, a in enumerate(tiny)]
    resumed = _fqn("fit", "--config", str(REPO / "configs/synthetic_float.yaml"), *two_steps,
                   "--ckpt_path", str(last), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 2
