"""Calibration: run a few batches with observers on and fake quantization off, then fix the ranges."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fqn.quant.fake_quant import Phase, phase_of, quantizers, set_phase
from fqn.quant.observers import EMAMinMaxObserver, dist_ready
from fqn.quant.prepare import check_input_grids

log = logging.getLogger(__name__)


@contextlib.contextmanager
def calibration_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, activation observers on, fake quantization off; restores mode and phase on exit.

    Example:
        >>> with calibration_mode(model):  # doctest: +SKIP
        ...     model(images)
    """
    was_training = model.training
    model.eval()
    try:
        with phase_of(model, Phase.OBSERVE):
            yield model
    finally:
        model.train(was_training)


def batch_images(batch: Any) -> list[Tensor]:
    """The list of 3xHxW images in a batch: a list of images, or an ``(images, targets)`` pair."""
    if isinstance(batch, Tensor):
        if batch.dim() == 4:
            return list(batch)
        if batch.dim() == 3:
            return [batch]
    if isinstance(batch, (list, tuple)) and batch:
        if len(batch) == 2 and isinstance(batch[0], (list, tuple, Tensor)) and not _is_image(batch[0]):
            return batch_images(batch[0])
        if all(_is_image(x) for x in batch):
            return list(batch)
    raise ValueError("a calibration batch must be a list of 3xHxW image tensors or an (images, targets) pair; "
                     f"got {type(batch).__name__}")


def _is_image(x: Any) -> bool:
    return isinstance(x, Tensor) and x.dim() == 3


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def calibrate(model: nn.Module, batches: Iterable[Any], num_batches: int, *, progress: bool = True) -> nn.Module:
    """Record activation statistics on ``num_batches`` batches, then fix every activation range.

    Observers start from scratch, run in eval mode with fake quantization off
    (ranges of the float activations), are reduced across DDP ranks, and the
    model leaves in the ``quantize`` phase. Returns the model.

    Example:
        >>> import torch
        >>> from fqn import QuantConfig, build_detector, prepare_qat
        >>> model = prepare_qat(build_detector("resnet18", 3, min_size=128, max_size=128), QuantConfig())
        >>> model = calibrate(model, [[torch.rand(3, 128, 128)]], 1, progress=False)
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    acts = quantizers(model, "act")
    if not acts:
        raise ValueError("the model has no activation quantizers: call prepare_qat(model, cfg) first")
    check_input_grids(model)
    for _, fq in acts:
        fq.observer.reset()
    device = model_device(model)
    seen = 0
    bar = progress_bar(num_batches, progress, "calibrate")
    with calibration_mode(model), torch.no_grad():
        for batch in batches:
            if seen >= num_batches:
                break
            model([img.to(device) for img in batch_images(batch)])
            seen += 1
            bar.update(1)
    bar.close()
    if seen < num_batches:
        log.warning("calibration asked for %d batches but the data gave only %d", num_batches, seen)
    if seen == 0:
        raise ValueError("calibration got no batches: the calibration data is empty")
    empty = []
    for name, fq in acts:
        fq.observer.sync()
        fq.update_qparams()
        if not fq.is_calibrated:
            empty.append(name)
    if empty:
        log.warning("%d activation quantizers saw no data during calibration (e.g. no RoIs): %s", len(empty),
                    ", ".join(empty[:5]))
    set_phase(model, Phase.QUANTIZE)
    return model


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar over ``total`` batches, or one that shows nothing (``enabled`` False, or no tqdm)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the method itself
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="batch", leave=False)


@torch.no_grad()
def sync_ema_observers(model: nn.Module) -> None:
    """Average the EMA ranges of all activation quantizers over DDP ranks in one all-reduce.

    While fine-tuning without P the EMA observers see each rank's own batches; averaging after each
    step keeps every rank's ranges identical (a no-op without an initialised process group).
    """
    if not dist_ready():
        return
    acts = [fq for _, fq in quantizers(model, "act") if isinstance(fq.observer, EMAMinMaxObserver)]
    if not acts:
        return
    flat = torch.cat([torch.cat([fq.observer.min_val, fq.observer.max_val]) for fq in acts])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for i, fq in enumerate(acts):
        fq.observer.min_val.copy_(flat[2 * i:2 * i + 1])
        fq.observer.max_val.copy_(flat[2 * i + 1:2 * i + 2])
        fq.update_qparams()


@torch.no_grad()
def broadcast_state(model: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of ``model`` from rank ``src`` to all DDP ranks (a no-op without a process group).

    For state computed on every rank from the same data where the ranks' kernels need not agree to the last bit
    (learned rounding on GPUs): all ranks then go on from one copy.
    """
    if not dist_ready():
        return
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src)
