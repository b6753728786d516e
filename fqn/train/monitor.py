"""TensorBoard quantization health for QAT fine-tuning: ranges, clipping, weight SQNR, BN statistics, boxes.

Losses, LR and mAP say *that* a quantized run goes wrong; these say *where*:
an activation range that clips too much, a layer whose 4-bit weights lose
most of their signal, BN batch statistics that swing from step to step (the
FQN paper's Figure 1, the reason for F). Everything but the validation images
is logged every ``log_every_n_steps`` training steps only; on the other steps
the callback does one integer check.

Tags (``<name>`` is the module name in ``pl_module.model``):

* ``quant/act_lb/<name>``, ``quant/act_ub/<name>``: nudged range of each calibrated activation quantizer.
* ``quant/clip_frac/<name>``, ``quant/clip_frac_mean``: fraction of a quantizer's input outside that range.
* ``quant/weight_sqnr_db/<name>``, ``quant/weight_sqnr_db_min``: weight quantization SQNR of each quantized layer.
* ``bn/batch_mean/<name>``, ``bn/batch_var/<name>``: histograms of the per-channel BN batch statistics.
* ``val/image_<i>``: validation images with ground truth (green) and predictions (red).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn

from fqn.evaluation import sqnr_db
from fqn.quant.fake_quant import FakeQuantize, quantizers
from fqn.quant.modules import QuantConv2d, QuantConvBn2d, QuantLinear
from fqn.viz import draw_detections

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter



@torch.no_grad()
def weight_sqnr_db(layer: QuantConv2d | QuantLinear) -> Tensor:
    """SQNR in dB of a quantized layer's weight: ``10 log10(sum w^2 / sum (w - Q(w))^2)``, a 0-d tensor.

    `QuantConvBn2d` is measured on its weight folded with the EMA statistics (what
    eval mode and the int8 export quantize). Exact weights give ``inf``, an
    all-zero weight ``nan``; the callback skips both.
    """
    if layer.weight_fq is None:
        raise ValueError("this layer has no weight quantizer (it is kept float)")
    w = layer.folded_weight() if isinstance(layer, QuantConvBn2d) else layer.weight
    w = w.detach().float()
    return sqnr_db(w, layer.weight_fq.quantize_detached(w))


def _bounds(fq: FakeQuantize, x: Tensor) -> tuple[Tensor, Tensor]:
    """The quantizer's range shaped to broadcast against its input ``x``."""
    lb, ub = fq.range
    if fq.ch_axis is None:
        return lb.reshape(()), ub.reshape(())
    shape = [1] * x.dim()
    shape[fq.ch_axis] = -1
    return lb.reshape(shape), ub.reshape(shape)


class ClipCounter:
    """Forward hooks that count how much of each activation quantizer's input falls outside its range.

    Forward hooks (not pre-hooks) because an EMA quantizer (P off) updates its
    range inside ``forward``: after it, ``fq.range`` is the range that was
    actually applied to this input. Counts stay on the device until `fractions`.
    A quantizer called several times in one batch is counted over all calls;
    empty inputs (a batch without RoIs) are ignored.
    """

    def __init__(self, acts: Sequence[tuple[str, FakeQuantize]]) -> None:
        self._counts: dict[str, list[tuple[Tensor, int]]] = {}
        self._handles = [fq.register_forward_hook(self._hook(name)) for name, fq in acts]

    def _hook(self, name: str):
        def hook(module: FakeQuantize, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            if not isinstance(x, Tensor) or x.numel() == 0:
                return
            with torch.no_grad():
                lb, ub = _bounds(module, x)
                clipped = ((x < lb) | (x > ub)).sum()
            self._counts.setdefault(name, []).append((clipped, x.numel()))

        return hook

    def remove(self) -> None:
        """Detach the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def fractions(self) -> dict[str, Tensor]:
        """Clipped fraction per quantizer name, over everything seen since the hooks were attached."""
        return {name: torch.stack([c for c, _ in calls]).sum().double() / sum(n for _, n in calls)
                for name, calls in self._counts.items()}


def _to_floats(values: Mapping[str, Tensor]) -> dict[str, float]:
    """0-d tensors to Python floats with a single device-to-host copy."""
    if not values:
        return {}
    device = next(iter(values.values())).device
    flat = torch.stack([v.detach().double().reshape(()).to(device) for v in values.values()]).tolist()
    return dict(zip(values, flat))


def act_range_scalars(model: nn.Module) -> dict[str, Tensor]:
    """``quant/act_lb|ub/<name>`` for every calibrated activation quantizer."""
    out: dict[str, Tensor] = {}
    for name, fq in quantizers(model, "act"):
        if fq.is_calibrated:
            lb, ub = fq.range
            out[f"quant/act_lb/{name}"] = lb.min()
            out[f"quant/act_ub/{name}"] = ub.max()
    return out


def weight_sqnr_scalars(model: nn.Module) -> dict[str, Tensor]:
    """``quant/weight_sqnr_db/<name>`` for every quantized conv and linear layer."""
    return {f"quant/weight_sqnr_db/{name}": weight_sqnr_db(m) for name, m in model.named_modules()
            if isinstance(m, (QuantConv2d, QuantLinear)) and m.is_quantized}


def _with_summary(values: dict[str, float], summary_tag: str,
                  reduce: Callable[[list[float]], float]) -> dict[str, float]:
    """Keep the finite values and add ``summary_tag`` = ``reduce`` over them (if any)."""
    kept = {k: v for k, v in values.items() if math.isfinite(v)}
    if kept:
        kept[summary_tag] = reduce(list(kept.values()))
    return kept


def bn_batch_stats(model: nn.Module, max_layers: int) -> list[tuple[str, Tensor, Tensor]]:
    """``(name, batch mean, batch var)`` of the first ``max_layers`` unfrozen `QuantConvBn2d` that have them."""
    out = []
    for name, m in model.named_modules():
        if len(out) >= max_layers:
            break
        if isinstance(m, QuantConvBn2d) and not m._frozen and m.last_batch_stats is not None:
            mean, var = m.last_batch_stats
            out.append((name, mean, var))
    return out


def tensorboard_writer(trainer: pl.Trainer) -> SummaryWriter | None:
    """The SummaryWriter of the trainer's TensorBoardLogger on global rank 0, else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _model(pl_module: pl.LightningModule) -> nn.Module:
    return getattr(pl_module, "model", pl_module)


class QuantMonitor(pl.Callback):
    """Logs quantization health of ``pl_module.model`` to TensorBoard while fine-tuning.

    A float model (no quantizers) logs only the validation images. See the
    module docstring for the tags.

    Args:
        log_every_n_steps: quantization scalars, clipping and BN histograms every this many global steps.
        num_images: validation images (from the first validation batch) drawn with boxes.
        class_names: names indexed by label (0 is the background), drawn next to the boxes.
        score_threshold: predictions below it are not drawn.
        max_bn_layers: BN histograms for at most this many layers (the first in module order).

    Example:
        >>> trainer = pl.Trainer(callbacks=[QuantMonitor(log_every_n_steps=100)])  # doctest: +SKIP
    """

    def __init__(self, log_every_n_steps: int = 50, num_images: int = 4, class_names: list[str] | None = None,
                 *, score_threshold: float = 0.5, max_bn_layers: int = 8) -> None:
        super().__init__()
        for name, value, low in (("log_every_n_steps", log_every_n_steps, 1), ("num_images", num_images, 0),
                                 ("max_bn_layers", max_bn_layers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.log_every_n_steps = log_every_n_steps
        self.num_images = num_images
        self.class_names = list(class_names) if class_names is not None else None
        self.score_threshold = score_threshold
        self.max_bn_layers = max_bn_layers
        self._clip: ClipCounter | None = None
        self._step: int | None = None  # the global step being logged, set only on logging steps
        self._last_logged = -1  # with gradient accumulation one global step spans several batches

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.log_every_n_steps or step == self._last_logged:
            return
        if tensorboard_writer(trainer) is None:
            return
        self._last_logged = self._step = step
        acts = [(name, fq) for name, fq in quantizers(_model(pl_module), "act") if fq.is_calibrated]
        self._clip = ClipCounter(acts)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._step is None:
            return
        step, self._step = self._step, None
        clip = self._detach_clip_counter()
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        model = _model(pl_module)
        scalars = _to_floats(act_range_scalars(model))
        if clip is not None:
            fractions = _to_floats({f"quant/clip_frac/{k}": v for k, v in clip.fractions().items()})
            scalars |= _with_summary(fractions, "quant/clip_frac_mean", lambda v: sum(v) / len(v))
        sqnr = _to_floats(weight_sqnr_scalars(model))
        scalars |= _with_summary(sqnr, "quant/weight_sqnr_db_min", min)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        for name, mean, var in bn_batch_stats(model, self.max_bn_layers):
            writer.add_histogram(f"bn/batch_mean/{name}", mean.detach().float().cpu(), step)
            writer.add_histogram(f"bn/batch_var/{name}", var.detach().float().cpu(), step)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or self.num_images == 0:
            return
        if not isinstance(outputs, Mapping) or "preds" not in outputs:
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        images, targets = batch[0], batch[1]
        for i, (image, target, pred) in enumerate(zip(images, targets, outputs["preds"])):
            if i >= self.num_images:
                break
            drawn = draw_detections(image, target, pred, self._names(trainer), self.score_threshold)
            writer.add_image(f"val/image_{i}", drawn, trainer.global_step, dataformats="CHW")

    def _names(self, trainer: pl.Trainer) -> list[str] | None:
        """The given names, else the data module's (``class_names[i]`` is label ``i + 1``)."""
        if self.class_names is not None:
            return self.class_names
        names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
        return ["background", *names] if names else None

    def _detach_clip_counter(self) -> ClipCounter | None:
        clip, self._clip = self._clip, None
        if clip is not None:
            clip.remove()
        return clip

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._step = None
        self._detach_clip_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = None
        self._detach_clip_counter()
