"""k-bit affine fake quantization with zero-point alignment and the FQN straight-through estimator.

Forward uses torch's fused fake-quantize kernels; backward is eq. 8 of the
FQN paper: the gradient passes unchanged inside [lb, ub] and is zero outside.
"""

from __future__ import annotations

import contextlib
import copy
import enum
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from fqn.quant.flags import SavedFlags
from fqn.quant.observers import MinMaxObserver, Observer
from fqn.quant.qparams import (  # noqa: F401  (re-exported: the quantizer's maths, imported from here by callers)
    BIAS_BOUND,
    EPS,
    bias_scale_floor,
    calc_qparams,
    fake_quantize,
    learned_fake_quantize,
    quant_range,
    quantize_bias,
    quantize_dequantize,
)

ExportFn = Callable[[Tensor, Tensor, Tensor, int, int, "int | None"], Tensor]


class FakeQuantize(SavedFlags, nn.Module):
    """A named quantizer: an observer that proposes ranges and an affine fake quantizer.

    Its phase is three booleans, saved in checkpoints (`SavedFlags`): observing (record statistics),
    quantizing, and calibrated (qparams were computed from data). ``forward`` reads them without a
    device sync; change them with `enable_observer` / `enable_fake_quant` (or `set_phase`, or the
    `quantizer_modes` context). With fake quantization disabled the module is exactly the identity.
    The range is the ``scale``/``zero_point`` buffers, the one copy conversion and the bias grid read.

    Args:
        observer: proposes [lb, ub].
        bits: bit-width k.
        symmetric: zero point 0 and a symmetric integer range (weights).
        ch_axis: per-channel quantization along this axis, or None.
        role: ``"weight"`` (range recomputed from the current weight at every
            call) or ``"act"`` (range from the observer's accumulated statistics).
    """

    FLAGS = ("_observe", "_quantize", "_calibrated", "_held")
    LEGACY_BUFFERS = {"observer_enabled": "_observe", "fake_quant_enabled": "_quantize", "calibrated": "_calibrated"}
    learnable = False

    def __init__(self, observer: Observer, bits: int, *, symmetric: bool = False, ch_axis: int | None = None,
                 num_channels: int = 1, role: str = "act") -> None:
        super().__init__()
        self.observer = observer
        self.bits = bits
        self.symmetric = symmetric
        self.ch_axis = ch_axis
        self.role = role
        self.qmin, self.qmax = quant_range(bits, symmetric)
        self._register_range(num_channels if ch_axis is not None else 1)
        self._observe, self._quantize, self._calibrated, self._held = True, False, False, False
        self._export_fn: ExportFn | None = None

    def _register_range(self, n: int) -> None:
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))

    def _set_range(self, scale: Tensor, zero_point: Tensor) -> None:
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def set_export_mode(self, fn: ExportFn | None) -> None:
        """Quantize with ``fn`` (same signature as `fake_quantize`) instead, e.g. to trace a graph op; None resets.

        An exporter gives the quantizer its graph form here instead of rebinding `fake_quantize` for the
        whole process: another model running meanwhile, in another thread, keeps quantizing as before.
        """
        self._export_fn = fn

    @property
    def export_mode(self) -> bool:
        return self._export_fn is not None

    def enable_observer(self, on: bool = True) -> None:
        self._observe = bool(on)

    def enable_fake_quant(self, on: bool = True) -> None:
        self._quantize = bool(on)

    def hold_range(self, on: bool = True) -> None:
        """Keep the current range whatever the observer sees (a weight's, once its codes were chosen for it).

        A weight quantizer recomputes its range from the weight at every call. Learned rounding
        (`fqn.quant.reconstruction`) chooses integer codes for one scale and moves the weight onto their
        grid; recomputed from that weight, min/max would move by a step wherever an extreme weight was
        rounded inwards, and every code with it. Held, the grid stays the one the codes were learned on,
        in the fake-quant model, in checkpoints (saved as a flag) and in the exported int8 file.
        """
        if on and not self._calibrated:
            raise RuntimeError(f"this {self.role} quantizer has no range to hold yet")
        self._held = bool(on)

    @property
    def range_held(self) -> bool:
        return self._held

    @property
    def observing(self) -> bool:
        return self._observe

    @property
    def quantizing(self) -> bool:
        return self._quantize

    @property
    def is_calibrated(self) -> bool:
        return self._calibrated

    def extra_repr(self) -> str:
        axis = "per-tensor" if self.ch_axis is None else f"per-channel(axis={self.ch_axis})"
        kind = "symmetric" if self.symmetric else "asymmetric"
        held = ", range held" if self._held else ""
        return f"role={self.role}, bits={self.bits}, {kind}, {axis}, q=[{self.qmin},{self.qmax}]{held}"

    @torch.no_grad()
    def update_qparams(self, min_scale: Tensor | None = None) -> None:
        """Recompute scale and zero point from the observer's current range (scale floored at ``min_scale``)."""
        if not self.observer.has_data:
            return
        lb, ub = self.observer.compute_range()
        self._set_range(*calc_qparams(lb, ub, self.bits, self.symmetric, min_scale))
        self._calibrated = True

    @torch.no_grad()
    def quantize_detached(self, x: Tensor) -> Tensor:
        """``x`` fake-quantized as this quantizer would on its own range of ``x``, leaving its state untouched.

        A fresh copy of the observer sees ``x`` alone, so this works in any phase (fake quantization on or
        off) and keeps buffers and statistics as they were, which calling ``self(x)`` would not: what the
        training monitor needs to measure a weight's quantization error between steps.
        """
        observer = copy.deepcopy(self.observer)
        observer.reset()
        observer(x)
        lb, ub = observer.compute_range()
        scale, zero_point = calc_qparams(lb, ub, self.bits, self.symmetric)
        return fake_quantize(x, scale, zero_point, self.qmin, self.qmax, self.ch_axis)

    @property
    def range(self) -> tuple[Tensor, Tensor]:
        """The nudged range [lb, ub] that the quantizer actually represents."""
        zp = self.zero_point.float()
        return (self.qmin - zp) * self.scale, (self.qmax - zp) * self.scale

    def forward(self, x: Tensor, min_scale: Tensor | None = None) -> Tensor:
        observed = False
        if self._observe and not self._held and x.numel() > 0:
            self.observer(x.detach())
            observed = True
        if not self._quantize:
            return x
        if observed:
            self.update_qparams(min_scale)
        if x.numel() == 0:
            return x
        if not self._calibrated:
            raise RuntimeError(
                f"this {self.role} quantizer has no range yet: run fqn.calibrate(model, batches, n) "
                "before enabling fake quantization")
        return self._fake_quantize(x, observed)

    def _fake_quantize(self, x: Tensor, observed: bool) -> Tensor:
        fn = self._export_fn or fake_quantize
        return fn(x, self.scale, self.zero_point, self.qmin, self.qmax, self.ch_axis)


class LearnedFakeQuantize(FakeQuantize):
    """An activation quantizer whose range is learned (LSQ+, `QuantConfig.learn_ranges`, flag L).

    Once calibrated, the scale and the zero point are the parameters ``lsq_scale``/``lsq_zero_point``,
    set from the calibrated range and trained with LSQ's gradients (`learned_fake_quantize`). They are
    the one copy of the range: ``scale`` and ``zero_point`` are read off them (scale floored at the
    smallest step, zero point rounded and clamped as the int8 model stores it), detached, for
    conversion, the bias grid and monitoring. Observing (calibration) resets them from data.
    """

    learnable = True
    # checkpoints written when the range was kept twice hold the derived copy too: it is read off the parameters
    LEGACY_BUFFERS = {**FakeQuantize.LEGACY_BUFFERS, "scale": "", "zero_point": ""}

    def __init__(self, observer: Observer, bits: int, *, ch_axis: int | None = None, num_channels: int = 1) -> None:
        super().__init__(observer, bits, symmetric=False, ch_axis=ch_axis, num_channels=num_channels, role="act")

    def _register_range(self, n: int) -> None:
        self.lsq_scale = nn.Parameter(torch.ones(n))
        self.lsq_zero_point = nn.Parameter(torch.zeros(n))

    def _set_range(self, scale: Tensor, zero_point: Tensor) -> None:
        self.lsq_scale.copy_(scale)
        self.lsq_zero_point.copy_(zero_point.float())

    @property
    def scale(self) -> Tensor:  # type: ignore[override]
        return self.lsq_scale.detach().clamp_min(EPS)

    @property
    def zero_point(self) -> Tensor:  # type: ignore[override]
        return torch.round(self.lsq_zero_point.detach()).clamp(self.qmin, self.qmax).to(torch.int32)

    @torch.no_grad()
    def fix_range(self) -> None:
        """Stop learning: become a plain `FakeQuantize` whose buffers hold the range as learned so far.

        For an export copy of a model (`fqn.int8.onnx_qdq.qdq_export_mode`): a range read off parameters is
        traced as ops on them, which the ONNX exporter leaves in the graph; a fixed range is a constant it
        folds, so the file is the one a fixed-range model of the same values gives. Not for a model in use.
        """
        scale, zero_point = self.scale.clone(), self.zero_point.clone()
        del self.lsq_scale, self.lsq_zero_point
        self.__class__ = FakeQuantize
        self._register_range(scale.numel())
        self.to(scale.device)
        self._set_range(scale, zero_point)

    def _fake_quantize(self, x: Tensor, observed: bool) -> Tensor:
        if observed or self._export_fn is not None:  # ranges moving with the data, or a traced graph: fixed grid
            return super()._fake_quantize(x, observed)
        return learned_fake_quantize(x, self.lsq_scale, self.lsq_zero_point, self.qmin, self.qmax, self.ch_axis)


def weight_quantizer(weight: Tensor, bits: int, *, per_channel: bool, symmetric: bool) -> FakeQuantize:
    """A weight quantizer: min/max of the current weight, per output channel (C) or per tensor."""
    n = weight.shape[0]
    axis = 0 if per_channel else None
    obs = MinMaxObserver(ch_axis=axis, num_channels=n, accumulate=False)
    fq = FakeQuantize(obs, bits, symmetric=symmetric, ch_axis=axis, num_channels=n, role="weight")
    return fq.to(weight.device)


class Phase(str, enum.Enum):
    """What every quantizer of a model does: observe statistics, fake-quantize, both, or neither.

    * ``FLOAT``: identity everywhere (no observing, no quantizing).
    * ``OBSERVE``: activation observers record statistics, no quantization (calibration).
    * ``QUANTIZE``: fixed ranges, fake quantization on (P: after calibration).
    * ``OBSERVE_QUANTIZE``: EMA ranges keep updating while quantizing ([17], P off).

    Weight quantizers recompute their range from the current weight whenever they quantize.
    A `str` enum: ``Phase.QUANTIZE == "quantize"``, so configs and logs may use the names.
    """

    FLOAT = "float"
    OBSERVE = "observe"
    QUANTIZE = "quantize"
    OBSERVE_QUANTIZE = "observe_quantize"

    @property
    def flags(self) -> tuple[bool, bool]:
        """(activation observers on, fake quantization on)."""
        return _PHASE_FLAGS[self]


_PHASE_FLAGS = {Phase.FLOAT: (False, False), Phase.OBSERVE: (True, False), Phase.QUANTIZE: (False, True),
                Phase.OBSERVE_QUANTIZE: (True, True)}


def quantizers(model: nn.Module, role: str | None = None) -> list[tuple[str, FakeQuantize]]:
    """All quantizers of ``model`` with their names, optionally only one role."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, FakeQuantize) and (role is None or m.role == role)]


def set_phase(model: nn.Module, phase: Phase | str) -> None:
    """Switch every quantizer of ``model`` to ``phase`` (a `Phase` or its name)."""
    try:
        phase = Phase(phase)
    except ValueError:
        raise ValueError(f"unknown quantizer phase {phase!r}; choose one of {[p.value for p in Phase]}") from None
    observe, quantize = phase.flags
    for _, fq in quantizers(model):
        fq.enable_fake_quant(quantize)
        fq.enable_observer(observe if fq.role == "act" else quantize)


@contextlib.contextmanager
def quantizer_modes(model: nn.Module) -> Iterator[list[tuple[str, FakeQuantize]]]:
    """Every quantizer's modes (observing, quantizing, export form) saved on entry and restored on exit.

    The one save-and-restore of quantizer modes: calibration, the input-grid probe, bias correction,
    the analysis and the export change modes inside this block, and a model whose quantizers were in
    mixed modes (some kept float) comes back exactly as it was. Yields the quantizers.
    """
    qs = quantizers(model)
    saved = [(q.observing, q.quantizing, q._export_fn) for _, q in qs]
    try:
        yield qs
    finally:
        for (_, q), (observe, quantize, export_fn) in zip(qs, saved):
            q.enable_observer(observe)
            q.enable_fake_quant(quantize)
            q.set_export_mode(export_fn)


@contextlib.contextmanager
def phase_of(model: nn.Module, phase: Phase | str) -> Iterator[None]:
    """``model`` in ``phase`` inside the block; every quantizer's modes before restored after."""
    with quantizer_modes(model):
        set_phase(model, phase)
        yield


def fix_ranges(model: nn.Module) -> None:
    """EMA ranges still updating ([17], `Phase.OBSERVE_QUANTIZE`) held where they are from now on.

    Evaluation must not move the ranges: the int8 model is written from them. Every evaluation (the
    trainer's validation, `fqn.evaluation`, a checkpoint loaded for inference) comes through here.
    """
    if current_phase(model) == Phase.OBSERVE_QUANTIZE:
        set_phase(model, Phase.QUANTIZE)


@contextlib.contextmanager
def ranges_fixed(model: nn.Module) -> Iterator[None]:
    """`fix_ranges` inside the block; every quantizer's modes before restored after."""
    with quantizer_modes(model):
        fix_ranges(model)
        yield


def current_phase(model: nn.Module) -> Phase | None:
    """The phase of the activation quantizers, or None if they disagree or there are none."""
    states = {(fq.observing, fq.quantizing) for _, fq in quantizers(model, "act")}
    if len(states) != 1:
        return None
    (state,) = states
    return next(p for p in Phase if p.flags == state)
