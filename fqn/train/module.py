"""The LightningModule: float training and FQN quantization-aware fine-tuning of a torchvision Faster R-CNN.

Thin on purpose: the quantization maths lives in `fqn.quant`, the phase schedule in
`fqn.train.callbacks`, metrics in `fqn.evaluation`. This class wires them to Lightning:
build (and prepare) the detector, calibrate once, log the PTQ mAP, optimise, evaluate.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from fqn.config import QuantConfig
from fqn.evaluation import detections_for_metric, evaluate_map, make_map_metric, map_columns
from fqn.models.checkpoint import detector_for_run
from fqn.models.distill import DistillConfig, Distiller
from fqn.models.reconstruct import reconstruct_detector
from fqn.ptq import reconstruction_config
from fqn.quant.calibrate import broadcast_state, calibrate
from fqn.quant.fake_quant import LearnedFakeQuantize, quantizers
from fqn.quant.reconstruction import release_weight_ranges
from fqn.quant.state import quant_config, quant_state
from fqn.train.callbacks import QuantPhaseScheduler

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")


class DetectionModule(pl.LightningModule):
    """Faster R-CNN training: float when ``quant`` is None, FQN QAT when it is a `QuantConfig`.

    Args:
        backbone: ``resnet18``, ``resnet34``, ``resnet50`` or ``mobilenet_v3_large``.
        num_classes: classes including the background (must match the data).
        quant: None for float training, else the QuantConfig of the QAT run.
        init_from: float checkpoint to start QAT from (required for QAT unless ``weights`` is given).
        weights, weights_backbone: torchvision weight names (need internet once).
        min_size, max_size: torchvision's resize bounds.
        detector: extra FasterRCNN keyword arguments (RPN/RoI sampling sizes...).
        lr: learning rate at ``base_batch_size`` images per step; scaled linearly with the real total batch.
        warmup_steps, warmup_factor: linear warm-up from ``lr*warmup_factor``.
        lr_steps, lr_gamma: step decay (float training); QAT uses a fixed LR as the paper.
        seed: per-step RNG seed base, so interrupted and resumed runs sample identical RoIs.
        ptq_eval: evaluate (and log as ``ptq/*``) the calibrated model before fine-tuning; off when the
            caller measures PTQ itself (`fqn quickstart` does, in its comparison).
        frozen_bn: torchvision's ``FrozenBatchNorm2d`` in the backbone; default: as the model it starts from
            (torchvision weights, or the ``init_from`` checkpoint's architecture).
        distill: QAT only: distillation from the float model it starts from, the weights of its terms
            (`fqn.models.distill.DistillConfig`: ``fpn``, ``rpn``, ``cls``, ``temperature``); None: off.
        optimizer: ``sgd`` (with ``momentum``; the paper's QAT recipe) or ``adamw`` (decoupled weight decay,
            ``momentum`` unused). From scratch on the synthetic set, AdamW leaves the early plateau about twice
            as fast as SGD (measured: AP 0.40 after 450 steps against SGD's 0.12 after 500), which is what
            a short float schedule such as the quickstart's needs.
        reconstruction: QAT only: start from a reconstructed PTQ model: after calibration, learn the weights'
            rounding (and activation steps) unit by unit on the calibration batches, ``adaround``, ``brecq`` or
            ``qdrop`` (`fqn.models.reconstruct`), then fine-tune from there (the weight ranges follow the
            weights again). None: start from calibration alone (nearest rounding), as FQN.
        reconstruction_iters: iterations per unit of that reconstruction (default: `ReconstructionConfig`'s).
        range_lr_scale: with learned ranges (``quant.learn_ranges``), their learning rate as a multiple of
            the weights'. LSQ's gradient scale keeps a range's relative step near a weight's, which over a
            few hundred fine-tuning steps at the QAT learning rate moves it by under 0.5% (measured):
            a larger multiple lets the ranges actually adapt in a short schedule.
    """

    def __init__(self, backbone: str = "resnet18", num_classes: int = 5, quant: QuantConfig | None = None,
                 init_from: str | None = None, weights: str | None = None, weights_backbone: str | None = None,
                 min_size: int = 160, max_size: int = 160, detector: dict[str, Any] | None = None,
                 lr: float = 0.02, base_batch_size: int = 16, momentum: float = 0.9, weight_decay: float = 1e-4,
                 warmup_steps: int = 100, warmup_factor: float = 0.001, lr_steps: list[int] | None = None,
                 lr_gamma: float = 0.1, seed: int = 0, ptq_eval: bool = True, frozen_bn: bool | None = None,
                 distill: dict[str, float] | None = None, range_lr_scale: float = 1.0,
                 optimizer: str = "sgd", reconstruction: str | None = None,
                 reconstruction_iters: int | None = None) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        if isinstance(range_lr_scale, bool) or not isinstance(range_lr_scale, (int, float)) or range_lr_scale <= 0:
            raise ValueError(f"range_lr_scale must be a number > 0, got {range_lr_scale!r}")
        if isinstance(quant, dict):  # rebuilt from a checkpoint's hyper-parameters
            quant = QuantConfig.from_dict(quant)
        if lr <= 0 or base_batch_size < 1 or warmup_steps < 0 or not 0 < warmup_factor <= 1:
            raise ValueError("need lr > 0, base_batch_size >= 1, warmup_steps >= 0 and 0 < warmup_factor <= 1")
        self.save_hyperparameters(ignore=["quant"])
        # saved, not assigned into self.hparams: what the logger records is the copy save_hyperparameters takes
        self.save_hyperparameters({"quant": quant.to_dict() if quant is not None else None})
        self.reconstruction = reconstruction_config(reconstruction, reconstruction_iters)  # validates both
        if self.reconstruction is not None and quant is None:
            raise ValueError("reconstruction needs a quantized model: set model.quant (it is how a QAT run starts)")
        if distill is not None and quant is None:
            raise ValueError("distill needs a quantized student: set model.quant (distillation is a QAT option)")
        run = detector_for_run(backbone, num_classes, quant=quant, init_from=init_from, weights=weights,
                               weights_backbone=weights_backbone, min_size=min_size, max_size=max_size,
                               frozen_bn=frozen_bn, detector=detector, keep_float_copy=distill is not None)
        self.model, teacher = run.model, run.float_copy
        self.save_hyperparameters({"frozen_bn": run.frozen_bn})  # so a checkpoint rebuilds the same architecture
        self.distiller = (Distiller(teacher, self.model, DistillConfig(**distill))
                          if teacher is not None else None)
        self.val_map = make_map_metric()
        self.test_map = make_map_metric()
        self.ptq_metrics: dict[str, float] | None = None

    @property
    def qcfg(self) -> QuantConfig | None:
        """The model's QuantConfig, read from the model (`fqn.quant.state`), where it is saved with the weights."""
        return quant_config(self.model)

    # -- training -------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        n_data = getattr(dm, "num_classes", None)
        if n_data is not None and n_data != self.hparams.num_classes:
            raise ValueError(f"model.num_classes={self.hparams.num_classes} but the data has {n_data} classes "
                             f"including the background ({dm.class_names}); set model.num_classes: {n_data}")

    def configure_callbacks(self) -> list[pl.Callback]:
        return [QuantPhaseScheduler()] if self.qcfg is not None else []

    def on_fit_start(self) -> None:
        """Calibrate once and log the PTQ mAP, before the phase scheduler sets the training phase."""
        if self.qcfg is None or self._is_calibrated():
            return  # float training, or a resumed QAT run: ranges come from the checkpoint
        dm = self.trainer.datamodule
        batches = dm.calibration_batches(self.qcfg.n_cal)
        calibrate(self.model, batches, self.qcfg.n_cal, progress=self.trainer.is_global_zero)
        if self.reconstruction is not None:
            self._reconstruct(batches)
        if not self.hparams.ptq_eval:
            return
        self.ptq_metrics = evaluate_map(self.model, dm.val_dataloader(), device=self.device,
                                        progress=self.trainer.is_global_zero)
        self.model.train()
        if self.trainer.is_global_zero:
            log.info("PTQ after calibration (w%d/a%d %s): %s", self.qcfg.bits_w, self.qcfg.bits_a, self.qcfg.flags,
                     {k: round(v, 4) for k, v in self.ptq_metrics.items()})
        for logger in self.loggers:
            logger.log_metrics({f"ptq/{k}": v for k, v in self.ptq_metrics.items()}, step=0)

    def _reconstruct(self, batches: list[Any]) -> None:
        """Learned rounding from the calibrated start, rank 0's result on every rank; then the weights train."""
        report = reconstruct_detector(self.model, batches, self.reconstruction, num_batches=self.qcfg.n_cal,
                                      progress=self.trainer.is_global_zero)
        broadcast_state(self.model)  # GPU kernels need not agree to the last bit across ranks: rank 0's codes
        release_weight_ranges(self.model)
        quant_state(self.model).ptq = {"reconstruction": {k: v for k, v in report.items() if k != "per_unit"}}
        if self.trainer.is_global_zero:
            log.info("QAT starts from %s reconstruction (%d iterations per unit): output error x%.3f of nearest "
                     "rounding's", report["reconstruction"], report["iters"], report["error_ratio"])

    def _is_calibrated(self) -> bool:
        acts = quantizers(self.model, "act")
        return bool(acts) and all(fq.is_calibrated for _, fq in acts)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        loader = self.trainer.train_dataloader
        if hasattr(loader, "batches_done"):  # the loader's resumable position (see fqn.data.sampler)
            loader.batches_done = batch_idx + 1
        # RoI/anchor sampling draws from the global RNG: seed it from the step so a resumed run replays it
        torch.manual_seed(self.hparams.seed * 1_000_003 + self.global_step * 101 + self.global_rank)

    def training_step(self, batch: tuple, batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.model(list(images), list(targets))
        if self.distiller is not None:
            self.distiller.follow(self.device)
            losses.update(self.distiller.losses())
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.global_step}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }; lower the learning rate")
        bs = len(images)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        dm = getattr(self.trainer, "datamodule", None)
        batch = getattr(dm, "batch_size", hp.base_batch_size) * self.trainer.world_size
        total = batch * self.trainer.accumulate_grad_batches
        lr = hp.lr * total / hp.base_batch_size  # linear scaling rule (the paper: 0.004 at 16x2 images)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        # learned ranges (LSQ+): their own learning rate, no decay towards 0
        learned = {id(p) for m in self.model.modules() if isinstance(m, LearnedFakeQuantize) for p in m.parameters()}
        ranges = [p for _, p in named if id(p) in learned]
        groups = [{"params": [p for _, p in named if id(p) not in learned]}]
        if ranges:
            groups.append({"params": ranges, "weight_decay": 0.0, "lr": lr * hp.range_lr_scale})
        # torch's fused kernels: one pass over all parameters (measured on the R18 detector's 28M parameters,
        # 2 CPU cores: SGD 42 -> 10 ms a step, AdamW 89 -> 17 ms); they need floating CPU/CUDA tensors, and
        # Lightning's mixed precision refuses to clip the gradients of an optimizer that unscales them itself
        mixed = "mixed" in str(getattr(self.trainer, "precision", ""))
        fused = not mixed and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for _, p in named)
        if hp.get("optimizer", "sgd") == "adamw":
            opt = torch.optim.AdamW(groups, lr=lr, weight_decay=hp.weight_decay, fused=fused)
        else:
            opt = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay, fused=fused)
        steps = sorted(hp.lr_steps or [])

        def factor(step: int) -> float:
            warm = 1.0 if step >= hp.warmup_steps else hp.warmup_factor + (1 - hp.warmup_factor) * step / max(
                hp.warmup_steps, 1)
            return warm * hp.lr_gamma ** sum(step >= s for s in steps)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- evaluation -----------------------------------------------------
    def on_validation_start(self) -> None:
        self._require_calibration()

    def on_test_start(self) -> None:
        self._require_calibration()

    def _require_calibration(self) -> None:
        if self.qcfg is not None and not self._is_calibrated():
            raise RuntimeError("this quantized model has no calibrated ranges: evaluate a QAT checkpoint "
                               "(--ckpt_path runs/.../last.ckpt) or run `fqn fit` first")

    def validation_step(self, batch: tuple, batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, self.val_map)

    def test_step(self, batch: tuple, batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, self.test_map)

    def _eval_step(self, batch: tuple, metric) -> dict[str, Any]:
        images, targets = batch
        preds = self.model(list(images))
        metric.update(*detections_for_metric(preds, targets))
        return {"preds": preds}

    def on_validation_epoch_end(self) -> None:
        self._log_map("val", self.val_map)

    def on_test_epoch_end(self) -> None:
        self._log_map("test", self.test_map)

    def _log_map(self, prefix: str, metric) -> None:
        values = map_columns(metric.compute())
        metric.reset()
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items() if not math.isnan(v)}, sync_dist=False,
                      prog_bar=False)
        self.log(f"{prefix}/mAP", values["AP"], prog_bar=True)

    # -- checkpoints ----------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fqn"] = {"ptq_metrics": self.ptq_metrics}  # the QuantConfig is in the state dict (QuantState)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.ptq_metrics = checkpoint.get("fqn", {}).get("ptq_metrics")
