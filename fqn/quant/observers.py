"""Range observers: they watch tensors and propose a quantization range [lb, ub].

Every observer ignores empty tensors (a batch with no RoIs), keeps its state in
buffers (so ranges live in checkpoints) and can `sync()` its statistics across
DDP ranks so that every rank ends calibration with identical ranges.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fqn.quant.flags import SavedFlags
from fqn.quant.qparams import calc_qparams, quant_range


def dist_ready() -> bool:
    """True under an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Observer(SavedFlags, nn.Module):
    """Base class: ``forward(x)`` records statistics, ``compute_range()`` proposes [lb, ub]."""

    # Whether any data was seen: a saved Python flag (`SavedFlags`), since reading a GPU buffer would sync at every
    # step. A flag, not a count: a Python int that changes at every call fails torch.compile's guards,
    # recompiling the graph each step. Older checkpoints counted the calls in a buffer.
    FLAGS = ("_has_data",)
    LEGACY_BUFFERS = {"num_seen": "_has_data"}

    def __init__(self) -> None:
        super().__init__()
        self._has_data = False

    def _sync_has_data(self, device: torch.device) -> None:
        """Seen data on any rank: seen data (``dist_ready`` only)."""
        seen = torch.tensor(int(self._has_data), device=device)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        self._has_data = bool(seen)

    @property
    def has_data(self) -> bool:
        return self._has_data

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() > 0:
            self._update(x.detach())
            self._has_data = True
        return x

    def _update(self, x: Tensor) -> None:
        raise NotImplementedError

    def compute_range(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        self._has_data = False

    def sync(self) -> None:
        """Make the statistics identical on every DDP rank (no-op without DDP)."""


class MinMaxObserver(Observer):
    """Min/max, per tensor or per channel (``ch_axis``).

    With ``accumulate=False`` only the last tensor counts: that is what weight
    quantizers use, since the weights change at every step (eqs. 9-10).
    """

    def __init__(self, ch_axis: int | None = None, num_channels: int = 1, accumulate: bool = True) -> None:
        super().__init__()
        self.ch_axis = ch_axis
        self.accumulate = accumulate
        n = num_channels if ch_axis is not None else 1
        self.register_buffer("min_val", torch.full((n,), math.inf))
        self.register_buffer("max_val", torch.full((n,), -math.inf))

    def _update(self, x: Tensor) -> None:
        if self.ch_axis is None:
            lo, hi = torch.aminmax(x.float())
            lo, hi = lo.reshape(1), hi.reshape(1)
        else:
            flat = x.float().transpose(0, self.ch_axis).reshape(x.shape[self.ch_axis], -1)
            lo, hi = torch.aminmax(flat, dim=1)
        if self.accumulate and self.has_data:
            lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)

    def compute_range(self) -> tuple[Tensor, Tensor]:
        return self.min_val, self.max_val

    def reset(self) -> None:
        super().reset()
        self.min_val.fill_(math.inf)
        self.max_val.fill_(-math.inf)

    def sync(self) -> None:
        if dist_ready():
            dist.all_reduce(self.min_val, op=dist.ReduceOp.MIN)
            dist.all_reduce(self.max_val, op=dist.ReduceOp.MAX)
            self._sync_has_data(self.min_val.device)


class EMAMinMaxObserver(Observer):
    """EMA of per-batch min and max, as in [17]: ``lb <- M*lb + (1-M)*min(x)``.

    The first non-empty tensor initialises the averages.
    """

    def __init__(self, momentum: float = 0.99) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("min_val", torch.zeros(1))
        self.register_buffer("max_val", torch.zeros(1))

    def _update(self, x: Tensor) -> None:
        lo, hi = torch.aminmax(x.float())
        if not self.has_data:
            self.min_val.copy_(lo.reshape(1))
            self.max_val.copy_(hi.reshape(1))
            return
        m = self.momentum
        self.min_val.mul_(m).add_((1 - m) * lo)
        self.max_val.mul_(m).add_((1 - m) * hi)

    def compute_range(self) -> tuple[Tensor, Tensor]:
        return self.min_val, self.max_val

    def reset(self) -> None:
        super().reset()
        self.min_val.zero_()
        self.max_val.zero_()

    def sync(self) -> None:
        if dist_ready():
            ws = dist.get_world_size()
            for t in (self.min_val, self.max_val):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(ws)
            self._sync_has_data(self.min_val.device)


class HistogramObserver(Observer):
    """Exact streaming histogram on a power-of-two grid; base of the percentile and L2 observers.

    Bin edges sit at integer multiples of ``w = 2**exponent``. When data falls
    outside the current span, ``w`` doubles until it fits and old counts are
    merged two-into-one: the grids are nested, so no count is smeared. The
    same property makes histograms from different DDP ranks mergeable
    exactly. Percentiles read from it are within one bin width of the exact
    ones of all the data seen.
    """

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        self.bins = bins
        self.register_buffer("counts", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("exponent", torch.zeros((), dtype=torch.int64))
        self.register_buffer("kmin", torch.zeros((), dtype=torch.int64))
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))

    # -- grid helpers -------------------------------------------------
    @property
    def bin_width(self) -> float:
        return 2.0 ** int(self.exponent)

    def _fit_exponent(self, lo: float, hi: float, e: int) -> int:
        while math.floor(hi / 2.0**e) - math.floor(lo / 2.0**e) + 1 > self.bins:
            e += 1
        return e

    @staticmethod
    def _rebin(counts: Tensor, kmin: int, e_from: int, e_to: int, kmin_to: int, bins: int) -> Tensor:
        shift = e_to - e_from
        k = torch.arange(kmin, kmin + counts.numel(), device=counts.device, dtype=torch.int64)
        k_new = torch.div(k, 2**shift, rounding_mode="floor") - kmin_to
        out = torch.zeros(bins, dtype=counts.dtype, device=counts.device)
        nz = counts > 0
        return out.index_add_(0, k_new[nz], counts[nz])

    def _update(self, x: Tensor) -> None:
        x = x.float().flatten()
        lo_t, hi_t = torch.aminmax(x)
        lo, hi = lo_t.item(), hi_t.item()
        if not math.isfinite(lo) or not math.isfinite(hi):
            raise ValueError("observer got a non-finite activation (NaN/inf); check the model and the input data")
        if self.has_data:
            lo, hi = min(lo, float(self.min_val)), max(hi, float(self.max_val))
            e = self._fit_exponent(lo, hi, int(self.exponent))
        else:
            span = max(hi - lo, 1e-8, 1e-6 * max(abs(lo), abs(hi)))
            e = self._fit_exponent(lo, hi, math.floor(math.log2(span / self.bins)))
        kmin_new = math.floor(lo / 2.0**e)
        if self.has_data:
            self.counts.copy_(self._rebin(self.counts, int(self.kmin), int(self.exponent), e, kmin_new, self.bins))
        idx = torch.floor(x / 2.0**e).to(torch.int64) - kmin_new
        self.counts += torch.bincount(idx.clamp_(0, self.bins - 1), minlength=self.bins).to(torch.float64)
        self.exponent.fill_(e)
        self.kmin.fill_(kmin_new)
        self.min_val.fill_(lo)
        self.max_val.fill_(hi)

    def quantile(self, q: float) -> float:
        """The ``q``-quantile of all data seen, within one bin width (torch.quantile's 'linear' rank)."""
        counts = self.counts.cpu().numpy()
        cum = np.cumsum(counts)
        pos = q * (cum[-1] - 1)  # 0-based fractional rank, as torch.quantile's 'linear'
        r0 = math.floor(pos)
        r1 = min(r0 + 1, int(cum[-1]) - 1)
        v0, v1 = self._value_at_rank(r0, counts, cum), self._value_at_rank(r1, counts, cum)
        return v0 + (pos - r0) * (v1 - v0)

    def _value_at_rank(self, r: int, counts: np.ndarray, cum: np.ndarray) -> float:
        """The r-th smallest value seen, within one bin (spread evenly inside its bin)."""
        b = min(int(np.searchsorted(cum, r, side="right")), self.bins - 1)
        frac = (r - (cum[b] - counts[b]) + 0.5) / max(counts[b], 1.0)
        v = (int(self.kmin) + b + min(max(frac, 0.0), 1.0)) * self.bin_width
        return float(min(max(v, float(self.min_val)), float(self.max_val)))

    def reset(self) -> None:
        super().reset()
        self.counts.zero_()
        self.exponent.zero_()
        self.kmin.zero_()

    def sync(self) -> None:
        if not dist_ready():
            return
        state = (self._has_data, int(self.exponent), int(self.kmin), self.counts.cpu(),
                 float(self.min_val), float(self.max_val))
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, state)
        gathered = [g for g in gathered if g[0]]
        if not gathered:
            return
        lo = min(g[4] for g in gathered)
        hi = max(g[5] for g in gathered)
        e = self._fit_exponent(lo, hi, max(g[1] for g in gathered))
        kmin = math.floor(lo / 2.0**e)
        total = torch.zeros(self.bins, dtype=torch.float64)
        for _, ge, gk, gc, _, _ in gathered:  # same order on every rank: identical sums
            total += self._rebin(gc, gk, ge, e, kmin, self.bins)
        self.counts.copy_(total)
        self.exponent.fill_(e)
        self.kmin.fill_(kmin)
        self.min_val.fill_(lo)
        self.max_val.fill_(hi)
        self._has_data = True


class PercentileObserver(HistogramObserver):
    """FQN's calibration (3.4.1): lb, ub at the ``1-gamma`` and ``gamma`` percentiles of all calibration data."""

    def __init__(self, gamma: float = 0.999, bins: int = 2048) -> None:
        super().__init__(bins)
        self.gamma = gamma

    def compute_range(self) -> tuple[Tensor, Tensor]:
        dev = self.counts.device
        return (torch.tensor([self.quantile(1 - self.gamma)], device=dev),
                torch.tensor([self.quantile(self.gamma)], device=dev))


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
