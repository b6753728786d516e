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
