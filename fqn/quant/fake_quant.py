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

from fqn.quant.observers import MinMaxObserver, Observer, refresh_after_load

_EPS = torch.finfo(torch.float32).eps


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range: ``[0, 2^k-1]`` (asymmetric) or ``[-(2^(k-1)-1), 2^(k-1)-1]`` (symmetric, zero point 0)."""
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def calc_qparams(lb: Tensor, ub: Tensor, bits: int, symmetric: bool,
                 min_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point for the range [lb, ub], with zero-point alignment (FQN 3.6).

    The range is widened to contain 0 and the zero point is rounded to an
    integer, so real 0 (zero padding, ReLU floor) is represented exactly; the
    bounds are nudged accordingly to ``(qmin - z)*scale`` and ``(qmax - z)*scale``.

    Example:
        >>> s, z = calc_qparams(torch.tensor([-1.0]), torch.tensor([3.0]), 8, False)
        >>> int(z), round(float(s) * 255, 4)
        (64, 4.0)
    """
    qmin, qmax = quant_range(bits, symmetric)
    lb = torch.minimum(lb.float(), torch.zeros_like(lb, dtype=torch.float32))
    ub = torch.maximum(ub.float(), torch.zeros_like(ub, dtype=torch.float32))
    if symmetric:
        scale = (torch.maximum(-lb, ub) / qmax).clamp_min(_EPS)
        if min_scale is not None:
            scale = torch.maximum(scale, min_scale)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((ub - lb) / (qmax - qmin)).clamp_min(_EPS)
    if min_scale is not None:
        scale = torch.maximum(scale, min_scale)
    zero_point = (qmin - torch.round(lb / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize_dequantize(xf: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                        axis: int | None) -> Tensor:
    """torch's fake-quantize kernel on float32 ``xf``, per tensor (0-d qparams) or per channel along ``axis``:
    the one forward training (with its straight-through gradient), evaluation and the ONNX export share."""
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(xf, scale, zero_point, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(xf, scale, zero_point, axis, qmin, qmax)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                  axis: int | None = None) -> Tensor:
    """Quantize-dequantize ``x`` (per tensor if ``axis`` is None, else per channel along ``axis``).

    The gradient is eq. 8's straight-through estimator, zero where the value clips: torch's own
    derivative of its fake-quantize kernels, whose forward also writes the mask, read off the integer
    code ``qmin <= round(x / scale) + z <= qmax`` (bounds recomputed in float, ``(qmax - z) * scale``,
    can land a rounding error below the largest weight of a channel and silently zero its gradient).
    One kernel forward, one backward: a hand-written mask cost five more elementwise kernels and
    their memory per quantizer (measured on CPU, 4x128x80x80 at 4 bits: 125 -> 96 ms forward and
    backward), and a GPU step runs ~170 quantizers. Computed in float32 whatever ``x`` is.
    """
    if axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    return quantize_dequantize(x.float(), scale, zero_point, qmin, qmax, axis).to(x.dtype)


ExportFn = Callable[[Tensor, Tensor, Tensor, int, int, "int | None"], Tensor]


class FakeQuantize(nn.Module):
    """A named quantizer: an observer that proposes ranges and an affine fake quantizer.

    Its phase lives in buffers so it is saved in checkpoints: ``observer_enabled``
    (record statistics), ``fake_quant_enabled`` (quantize) and ``calibrated``
    (qparams were computed from data). Python mirrors of the three flags are
    what ``forward`` reads, so a GPU step never waits on them; change them with
    `enable_observer` / `enable_fake_quant` (or `set_phase`). With fake
    quantization disabled the module is exactly the identity.

    Args:
        observer: proposes [lb, ub].
        bits: bit-width k.
        symmetric: zero point 0 and a symmetric integer range (weights).
        ch_axis: per-channel quantization along this axis, or None.
        role: ``"weight"`` (range recomputed from the current weight at every
            call) or ``"act"`` (range from the observer's accumulated statistics).
        learnable: LSQ+ (``QuantConfig.learn_ranges``): once calibrated, the scale and the zero point
            are the parameters ``lsq_scale``/``lsq_zero_point``, set from the calibrated range and
            trained with LSQ's gradients (torch's learnable fake-quantize kernels, gradient scale
            ``1/sqrt(numel * qmax)``); the ``scale``/``zero_point`` buffers mirror them (clamped,
            rounded) for conversion and monitoring. Observing (calibration) resets them from data.
    """

    def __init__(self, observer: Observer, bits: int, *, symmetric: bool = False, ch_axis: int | None = None,
                 num_channels: int = 1, role: str = "act", learnable: bool = False) -> None:
        super().__init__()
        self.observer = observer
        self.bits = bits
        self.symmetric = symmetric
        self.ch_axis = ch_axis
        self.role = role
        self.qmin, self.qmax = quant_range(bits, symmetric)
        n = num_channels if ch_axis is not None else 1
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("zero_point", torch.zeros(n, dtype=torch.int32))
        self.register_buffer("observer_enabled", torch.tensor(1, dtype=torch.uint8))
        self.register_buffer("fake_quant_enabled", torch.tensor(0, dtype=torch.uint8))
        self.register_buffer("calibrated", torch.tensor(0, dtype=torch.uint8))
        self.learnable = learnable
        if learnable:
            if symmetric:
                raise ValueError("learned ranges are for asymmetric (activation) quantizers")
            self.lsq_scale = nn.Parameter(torch.ones(n))
            self.lsq_zero_point = nn.Parameter(torch.zeros(n))
        self._observe, self._quantize, self._calibrated = True, False, False
        self._export_fn: ExportFn | None = None
        self.register_load_state_dict_post_hook(refresh_after_load)

    def set_export_mode(self, fn: ExportFn | None) -> None:
        """Quantize with ``fn`` (same signature as `fake_quantize`) instead, e.g. to trace a graph op; None resets.

        An exporter gives the quantizer its graph form here instead of rebinding `fake_quantize` for the
        whole process: another model running meanwhile, in another thread, keeps quantizing as before.
        """
        if self.learnable and self._calibrated:
            self._mirror_learned()  # the graph is traced from the buffers: as the parameters stand now
        self._export_fn = fn

    @property
    def export_mode(self) -> bool:
        return self._export_fn is not None

    def _refresh(self) -> None:
        self._observe = bool(self.observer_enabled)
        self._quantize = bool(self.fake_quant_enabled)
        self._calibrated = bool(self.calibrated)
        if self.learnable and self._calibrated:
            self._mirror_learned()

    @torch.no_grad()
    def _mirror_learned(self) -> None:
        """The buffers as the learned parameters quantize: what conversion and the bias grid read."""
        self.scale.copy_(self.lsq_scale.detach().clamp_min(_EPS))
        self.zero_point.copy_(torch.round(self.lsq_zero_point.detach()).clamp(self.qmin, self.qmax).to(torch.int32))

    def enable_observer(self, on: bool = True) -> None:
        self.observer_enabled.fill_(int(on))
        self._observe = bool(on)

    def enable_fake_quant(self, on: bool = True) -> None:
        self.fake_quant_enabled.fill_(int(on))
        self._quantize = bool(on)

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
        return f"role={self.role}, bits={self.bits}, {kind}, {axis}, q=[{self.qmin},{self.qmax}]"

    def update_qparams(self, min_scale: Tensor | None = None) -> None:
        """Recompute scale and zero point from the observer's current range (scale floored at ``min_scale``)."""
        if not self.observer.has_data:
            return
        lb, ub = self.observer.compute_range()
        scale, zp = calc_qparams(lb, ub, self.bits, self.symmetric, min_scale)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        if self.learnable:
            with torch.no_grad():
                self.lsq_scale.copy_(scale)
                self.lsq_zero_point.copy_(zp.float())
        self.calibrated.fill_(1)
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
        if self._observe and x.numel() > 0:
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
        if self.learnable and not observed and self._export_fn is None:  # export: mirrored on entering it
            self._mirror_learned()
            return learned_fake_quantize(x, self.lsq_scale, self.lsq_zero_point, self.qmin, self.qmax,
                                             self.ch_axis)
        fn = self._export_fn or fake_quantize
        return fn(x, self.scale, self.zero_point, self.qmin, self.qmax, self.ch_axis)


def learned_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                          axis: int | None = None) -> Tensor:
    """Fake quantization with gradients for ``scale`` and the (float) ``zero_point`` too: LSQ+.

    torch's learnable kernels: the forward rounds and clamps the zero point as the int8 model will;
    ``x`` gets eq. 8's straight-through gradient (zero outside the range), the scale LSQ's
    ``round(x/s) - x/s`` inside and the clamp level outside, both scaled by ``1/sqrt(numel * qmax)``
    (LSQ's step-size gradient scale) so that a range moves at the pace of the weights.
    """
    xf = x.float()
    grad_factor = 1.0 / (max(xf.numel(), 1) * qmax) ** 0.5
    scale = scale.float().clamp_min(_EPS)
    zero_point = zero_point.float()
    if axis is None:
        # as one channel: torch's per-tensor learnable kernel reads its scale and zero point with .item(), a
        # device sync per call on a GPU; the per-channel one keeps them on the device (same values and gradients)
        out = torch._fake_quantize_learnable_per_channel_affine(xf.unsqueeze(0), scale.reshape(1),
                                                                zero_point.reshape(1), 0, qmin, qmax,
                                                                grad_factor).squeeze(0)
    else:
        out = torch._fake_quantize_learnable_per_channel_affine(xf, scale, zero_point, axis, qmin, qmax,
                                                                grad_factor)
    return out.to(x.dtype)


BIAS_BOUND = 2**30
"""Largest int32 bias code: below 2^31 with room for the int32 accumulator's own sum of products."""


def bias_scale_floor(bias: Tensor, input_step: Tensor, per_channel: bool) -> Tensor:
    """The smallest weight scale whose int32 bias code ``|b| / (s_in * s_w)`` stays within ``BIAS_BOUND``.

    A near-dead channel (weights ~0, so the min/max weight scale is at its floor) with a sizeable bias,
    common in pretrained backbones, would need a bias code beyond int32: ONNX Runtime's int32 bias then
    wraps and moves the int8 output by hundreds of steps. Raising that channel's weight scale instead
    keeps the bias exact; its tiny weights round to 0, which changes the output by less than they weigh.
    """
    floor = bias.detach().abs() / (input_step.detach().to(bias.dtype) * BIAS_BOUND)
    return floor if per_channel else floor.max()


def quantize_bias(bias: Tensor, scale: Tensor) -> Tensor:
    """The bias on the int32 accumulator grid ``scale`` (= s_in * s_w), gradient passed straight through.

    The int8 runtime rounds the bias this way; simulating it makes the fake-quant model and the
    converted model compute the same integers. With the weight scale floored by `bias_scale_floor`
    the codes fit ``±BIAS_BOUND``; the clamp here only guards float rounding at the bound.
    """
    scale = scale.to(bias.dtype).clamp_min(_EPS * _EPS)
    codes = torch.round(bias / scale).clamp(-BIAS_BOUND, BIAS_BOUND)
    return bias + (codes * scale - bias).detach()


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
def phase_of(model: nn.Module, phase: Phase | str) -> Iterator[None]:
    """``model`` in ``phase`` inside the block; its phase before (``QUANTIZE`` if mixed) restored after."""
    before = current_phase(model) or Phase.QUANTIZE
    set_phase(model, phase)
    try:
        yield
    finally:
        set_phase(model, before)


def ranges_fixed(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """EMA ranges still updating ([17], `Phase.OBSERVE_QUANTIZE`) held fixed inside the block, restored after.

    Evaluation must not move the ranges: the int8 model is written from them.
    """
    if current_phase(model) == Phase.OBSERVE_QUANTIZE:
        return phase_of(model, Phase.QUANTIZE)
    return contextlib.nullcontext()


def current_phase(model: nn.Module) -> Phase | None:
    """The phase of the activation quantizers, or None if they disagree or there are none."""
    states = {(fq.observing, fq.quantizing) for _, fq in quantizers(model, "act")}
    if len(states) != 1:
        return None
    (state,) = states
    return next(p for p in Phase if p.flags == state)
