"""Lightning callbacks that schedule the quantization phases during fine-tuning.

The maths stays in `fqn.quant`; this only decides *when* each phase applies.
"""

from __future__ import annotations

import contextlib

import pytorch_lightning as pl

from fqn.config import QuantConfig
from fqn.quant.calibrate import sync_ema_observers
from fqn.quant.fake_quant import Phase, ranges_fixed, set_phase
from fqn.quant.modules import freeze_bn_stats


def training_phase(cfg: QuantConfig) -> Phase:
    """P: ranges fixed after calibration. Not P ([17]): EMA ranges keep updating while fine-tuning."""
    return Phase.OBSERVE_QUANTIZE if cfg.activation_observer == "ema" else Phase.QUANTIZE


class QuantPhaseScheduler(pl.Callback):
    """Switches quantizer phases: training phase per config, fixed ranges for evaluation, BN freeze for the last N.

    It expects the LightningModule to expose ``model`` (the prepared detector) and ``qcfg`` (its QuantConfig).
    """

    def __init__(self) -> None:
        self._train_phase: Phase | None = None
        self._evaluating = contextlib.ExitStack()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_phase = training_phase(pl_module.qcfg)
        set_phase(pl_module.model, self._train_phase)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        cfg = pl_module.qcfg
        last = cfg.freeze_bn_last_steps
        if last and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps - last:
            freeze_bn_stats(pl_module.model)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._train_phase == Phase.OBSERVE_QUANTIZE:
            sync_ema_observers(pl_module.model)  # every rank keeps identical EMA ranges (no-op on one rank)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluating.enter_context(ranges_fixed(pl_module.model))  # evaluation must not move the ranges

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluating.close()  # the modes training had
