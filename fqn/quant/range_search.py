"""Activation ranges chosen by measured quantization error: the L2 histogram search and the per-layer
search over candidate rules (the PTQ default), and the factory that picks an observer by its config name.

These observers read the exact streaming histogram of `fqn.quant.observers.HistogramObserver`; they live
apart from it because they judge ranges through the quantizer's own grid (`calc_qparams`), where the
observers below them only record statistics.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from fqn.quant.observers import (
    EMAMinMaxObserver,
    HistogramObserver,
    MinMaxObserver,
    Observer,
    PercentileObserver,
    dist_ready,
)
from fqn.quant.qparams import calc_qparams, quant_range


def l2_range(hist: HistogramObserver, bits: int) -> tuple[float, float]:
    """The range that minimises the expected L2 quantization error over ``hist``'s histogram.

    The same idea as PyTorch's ``HistogramObserver`` used by the 2025 PTQ paper: shrink [lb, ub]
    from the side that drops fewer values, scoring each candidate by clipping error plus uniform
    rounding noise ``n*D^2/12``.
    """
    counts = hist.counts.cpu().numpy()
    occupied = np.nonzero(counts)[0]
    if occupied.size == 0:
        return 0.0, 0.0
    first, last = int(occupied[0]), int(occupied[-1])
    c = counts[first:last + 1]
    w = hist.bin_width
    centers = (int(hist.kmin) + first + np.arange(c.size) + 0.5) * w
    levels = 2**bits - 1
    best, best_err = (0, c.size - 1), math.inf
    s, e = 0, c.size - 1
    step = max(1, c.size // 512)
    while s < e:
        a, b = s * w + centers[0] - 0.5 * w, (e + 1) * w + centers[0] - 0.5 * w
        delta = (b - a) / levels
        below = np.clip(a - centers, 0, None)
        above = np.clip(centers - b, 0, None)
        err = float(np.sum(c * (below**2 + above**2)) + np.sum(c[s:e + 1]) * delta**2 / 12)
        if err < best_err:
            best, best_err = (s, e), err
        if c[s:s + step].sum() <= c[e - step + 1:e + 1].sum():
            s += step
        else:
            e -= step
    s, e = best
    return max(centers[s] - 0.5 * w, float(hist.min_val)), min(centers[e] + 0.5 * w, float(hist.max_val))


class L2HistogramObserver(HistogramObserver):
    """The range that minimises the expected L2 quantization error over the histogram (`l2_range`)."""

    def __init__(self, bits: int = 8, bins: int = 2048) -> None:
        super().__init__(bins)
        self.bits = bits

    def compute_range(self) -> tuple[Tensor, Tensor]:
        lb, ub = l2_range(self, self.bits)
        dev = self.counts.device
        return torch.tensor([lb], device=dev), torch.tensor([ub], device=dev)


class SearchObserver(HistogramObserver):
    """Per layer, the candidate range whose quantization error, measured on all calibration data, is smallest.

    No single rule suits every activation of a detector at 8 bits: percentile clipping (P) helps the
    long-tailed backbone activations at 4 bits but clips exactly the large logits and box deltas that
    make the top detections, min/max wastes levels on rare outliers, and the L2 search's error model
    (uniform rounding noise) is an approximation. So each candidate's range is turned into the real
    scale and zero point (`calc_qparams`, zero-point alignment included) and its mean squared error
    is measured on the recorded histogram, every bin's mass spread over ``samples`` points, through
    the very rounding and clamping the fake quantizer applies. Exact zeros (half of a ReLU output)
    are counted apart: zero-point alignment represents them exactly, and spreading them over their
    bin would charge every range for an error it does not make. ``choice`` (a buffer, so it is in
    checkpoints) records which candidate won, for reports.

    ``keep_top`` (set by `fqn.models.faster_rcnn.prepare_qat` on the detector's head outputs, RPN
    objectness and deltas, class logits, box deltas, at 8 bits; not at 4, where it measured worse)
    keeps every candidate's upper bound at the maximum seen: those values are ranked by top-k and
    NMS, and the rare large ones are the best detections; a clipped top score ties with the next
    ones, an error MSE barely sees.
    """

    CANDIDATES = ("minmax", "percentile", "percentile_x10", "l2")

    def __init__(self, bits: int = 8, gamma: float = 0.999, bins: int = 2048, samples: int = 8) -> None:
        super().__init__(bins)
        self.bits, self.gamma, self.samples = bits, gamma, samples
        self.register_buffer("choice", torch.tensor(-1, dtype=torch.int64))
        self.register_buffer("zeros", torch.zeros((), dtype=torch.float64))
        self.keep_top = False

    def _update(self, x: Tensor) -> None:
        super()._update(x)
        self.zeros += (x == 0).sum().to(torch.float64)

    def sync(self) -> None:
        if dist_ready():
            dist.all_reduce(self.zeros, op=dist.ReduceOp.SUM)
        super().sync()

    def candidate_ranges(self) -> dict[str, tuple[float, float]]:
        """The ranges competing: min/max, the ``gamma`` percentiles, the percentiles with a 10x smaller tail, L2
        (with ``keep_top``, each with the maximum as its upper bound)."""
        tail = 1 - self.gamma
        ranges = {"minmax": (float(self.min_val), float(self.max_val)),
                  "percentile": (self.quantile(tail), self.quantile(1 - tail)),
                  "percentile_x10": (self.quantile(tail / 10), self.quantile(1 - tail / 10)),
                  "l2": l2_range(self, self.bits)}
        if self.keep_top:
            ranges = {name: (lb, float(self.max_val)) for name, (lb, _) in ranges.items()}
        return ranges

    def quant_error(self, lb: float, ub: float) -> float:
        """Mean squared error of quantizing everything seen with the asymmetric ``bits`` grid of [lb, ub]."""
        counts = self.counts.cpu().numpy()
        occupied = np.nonzero(counts)[0]
        if occupied.size == 0:
            return 0.0
        scale, zp = calc_qparams(torch.tensor([lb]), torch.tensor([ub]), self.bits, False)
        scale, zp = float(scale), int(zp)
        qmin, qmax = quant_range(self.bits, False)
        offsets = (np.arange(self.samples) + 0.5) / self.samples
        x = (int(self.kmin) + occupied[:, None] + offsets[None, :]) * self.bin_width
        x = np.clip(x, float(self.min_val), float(self.max_val))
        xq = (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale
        mass = counts[occupied].copy()
        mass[occupied == -int(self.kmin)] -= float(self.zeros)  # the bin holding 0: its exact zeros cost nothing
        return float(np.sum(mass * np.mean((xq - x) ** 2, axis=1)) / np.sum(counts))

    def compute_range(self) -> tuple[Tensor, Tensor]:
        dev = self.counts.device
        if not self.has_data or float(self.counts.sum()) == 0:
            return torch.zeros(1, device=dev), torch.zeros(1, device=dev)
        ranges = self.candidate_ranges()
        errors = [self.quant_error(*ranges[name]) for name in self.CANDIDATES]
        best = int(np.argmin(errors))
        self.choice.fill_(best)
        lb, ub = ranges[self.CANDIDATES[best]]
        return torch.tensor([lb], device=dev), torch.tensor([ub], device=dev)

    @property
    def chosen(self) -> str | None:
        """The winning candidate's name, or None before `compute_range`."""
        i = int(self.choice)
        return self.CANDIDATES[i] if i >= 0 else None

    def reset(self) -> None:
        super().reset()
        self.choice.fill_(-1)
        self.zeros.zero_()


def make_activation_observer(kind: str, *, gamma: float = 0.999, momentum: float = 0.99, bits: int = 8,
                             bins: int = 2048) -> Observer:
    """The activation observer named by `QuantConfig.activation_observer`."""
    if kind == "percentile":
        return PercentileObserver(gamma, bins)
    if kind == "ema":
        return EMAMinMaxObserver(momentum)
    if kind == "minmax":
        return MinMaxObserver()
    if kind == "histogram":
        return L2HistogramObserver(bits, bins)
    if kind == "search":
        return SearchObserver(bits, gamma, bins)
    raise ValueError(f"unknown activation observer {kind!r}")
