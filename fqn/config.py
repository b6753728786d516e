"""The one validated description of how a detector is quantized.

`QuantConfig` is the single source of truth for bit-widths and the FQN
ablation flags (F/P/C). It is saved in checkpoints as a plain dict and
rebuilt from there, so conversion and evaluation never depend on CLI flags.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

ACT_OBSERVERS = ("percentile", "ema", "minmax", "histogram", "search")


@dataclass(frozen=True)
class QuantConfig:
    """Bit-widths, the F/P/C flags and the calibration settings.

    Args:
        bits_w: weight bit-width, 2..8 (the paper uses 4 and 8).
        bits_a: activation bit-width, 2..8.
        freeze_bn: **F**. Fold BN into the conv with the frozen EMA statistics
            (eqs. 13-14). Off: fold with batch statistics while fine-tuning and
            keep updating the EMA, as in [17] (eqs. 11-12).
        percentile: **P**. Activation ranges from the ``1-gamma``/``gamma``
            percentiles over ``n_cal`` calibration batches, fixed afterwards.
            Off: EMA min/max that keeps updating while fine-tuning, as in [17].
        per_channel: **C**. One weight range per output channel (eqs. 9-10)
            instead of one per tensor.
        gamma: percentile for the upper bound (lower bound at ``1-gamma``).
        n_cal: number of calibration batches.
        ema_momentum: ``M`` in ``lb <- M*lb + (1-M)*min(x)``; used by the EMA
            observer (P off, or ``act_observer='ema'``).
        freeze_bn_last_steps: only with F off: freeze BN statistics for the
            last N fine-tuning steps, the [18] variant of the paper's Table 3.
        keep_float: ``fnmatch`` patterns of module names left in float.
        symmetric_weights: weights with zero point 0 and integer range
            ``[-(2^(k-1)-1), 2^(k-1)-1]``. This is the default because int8 CPU
            kernels (ONNX Runtime QLinearConv/QGemm, oneDNN, FBGEMM) run
            exactly and fastest with symmetric weights; ``False`` gives the
            paper's asymmetric weights (eqs. 2-6 with zero-point alignment).
        act_observer: override the activation observer: one of
            ``percentile``, ``ema``, ``minmax``, ``histogram``, ``search``.
            ``None`` lets the P flag decide (``percentile`` if P else ``ema``).
            ``minmax``, ``histogram`` (the L2-optimal range search) and
            ``search`` (per layer, whichever of min/max, percentile and L2
            quantizes the calibration data with the least measured error: the
            PTQ default) need ``percentile=False``.
        histogram_bins: number of bins of the percentile/histogram observers.
        learn_ranges: **L** (beyond FQN). Learned activation ranges, LSQ+ (Esser et al. 2020;
            Bhalgat et al. 2020): each activation quantizer's scale and zero point become
            parameters, initialised from the calibrated ranges (P) and trained by the loss with
            LSQ's scaled step-size gradient. Fixed-range observers only (not ``ema``). Weights
            keep their per-channel min/max ranges, which follow the weights exactly.
        layer_bits: mixed precision: ``{pattern: bits}``, layers whose name matches an
            ``fnmatch`` pattern quantized at that bit-width (weights and the activations the
            layer produces) instead of ``bits_w``/``bits_a``; the first matching pattern wins.
            ``fqn ablate --table beyond`` picks them from a measured layer sensitivity
            (`fqn.models.sensitivity.choose_layer_bits`).

    Example:
        >>> cfg = QuantConfig(bits_w=4, bits_a=4)
        >>> QuantConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    bits_w: int = 8
    bits_a: int = 8
    freeze_bn: bool = True
    percentile: bool = True
    per_channel: bool = True
    gamma: float = 0.999
    n_cal: int = 20
    ema_momentum: float = 0.99
    freeze_bn_last_steps: int | None = None
    keep_float: tuple[str, ...] = field(default_factory=tuple)
    symmetric_weights: bool = True
    act_observer: str | None = None
    histogram_bins: int = 2048
    learn_ranges: bool = False
    layer_bits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.keep_float, str):
            raise ValueError("keep_float must be a list of module-name patterns, "
                             "e.g. ['roi_heads.box_predictor.*'], not a string")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        _check_int(self, "bits_w", 2, 8, "4 and 8 are the paper's settings")
        _check_int(self, "bits_a", 2, 8, "4 and 8 are the paper's settings")
        for name in ("freeze_bn", "percentile", "per_channel", "symmetric_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0.5 < self.gamma < 1.0:
            raise ValueError(f"gamma must be a number in (0.5, 1), e.g. 0.999 (the paper's), got {self.gamma!r}")
        _check_int(self, "n_cal", 1, 10**6, "the number of calibration batches; the paper uses 20")
        m = self.ema_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1), e.g. 0.99, got {m!r}")
        if self.freeze_bn_last_steps is not None:
            _check_int(self, "freeze_bn_last_steps", 1, 10**9, "a number of steps, or null")
            if self.freeze_bn:
                raise ValueError("freeze_bn_last_steps only applies with freeze_bn=false (BN frozen in the last "
                                 "N steps, as in [18]); with freeze_bn=true BN is frozen throughout")
        if not all(isinstance(p, str) and p for p in self.keep_float):
            raise ValueError(f"keep_float must hold non-empty module-name patterns, got {list(self.keep_float)!r}")
        if self.act_observer is not None:
            if self.act_observer not in ACT_OBSERVERS:
                raise ValueError(f"act_observer must be one of {ACT_OBSERVERS} or null, got {self.act_observer!r}")
            if self.percentile and self.act_observer != "percentile":
                raise ValueError(f"act_observer={self.act_observer!r} contradicts percentile=true (P); "
                                 "set percentile=false to use it")
        _check_int(self, "histogram_bins", 64, 65536, "e.g. 2048")
        if not isinstance(self.learn_ranges, bool):
            raise ValueError(f"learn_ranges must be true or false, got {self.learn_ranges!r}")
        if self.learn_ranges and self.activation_observer == "ema":
            raise ValueError("learn_ranges needs calibrated, fixed ranges to start from (P, or act_observer "
                             "percentile/histogram/minmax/search), not the moving average that keeps updating")
        if not isinstance(self.layer_bits, dict):
            raise ValueError("layer_bits must map module-name patterns to bit-widths, e.g. "
                             f"{{'backbone.body.conv1': 8}}, got {self.layer_bits!r}")
        for pattern, bits in self.layer_bits.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"layer_bits keys must be non-empty module-name patterns, got {pattern!r}")
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"layer_bits[{pattern!r}] must be an integer bit-width in [2, 8], got {bits!r}")
        object.__setattr__(self, "layer_bits", dict(self.layer_bits))

    def __hash__(self) -> int:
        return hash(tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                          for k, v in dataclasses.asdict(self).items()))

    def for_layer(self, name: str) -> QuantConfig:
        """The config of the layer called ``name``: its `layer_bits` bit-width if a pattern matches, else this one."""
        bits = next((b for p, b in self.layer_bits.items() if fnmatch.fnmatchcase(name, p)), None)
        if bits is None or (bits == self.bits_w and bits == self.bits_a):
            return self
        return dataclasses.replace(self, bits_w=bits, bits_a=bits, layer_bits={})

    @property
    def activation_observer(self) -> str:
        """The observer kind used for activation ranges."""
        if self.act_observer is not None:
            return self.act_observer
        return "percentile" if self.percentile else "ema"

    @property
    def flags(self) -> str:
        """The ablation flags as in the paper's Table 2, e.g. ``"FPC"`` or ``"-"``; ``+L`` learned ranges,
        ``+mixed`` per-layer bit-widths."""
        s = "".join(c for c, on in zip("FPC", (self.freeze_bn, self.percentile, self.per_channel)) if on)
        s = (s or "-") + ("+L" if self.learn_ranges else "") + ("+mixed" if self.layer_bits else "")
        return s

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML/JSON/checkpoint-friendly dict."""
        d = dataclasses.asdict(self)
        d["keep_float"] = list(self.keep_float)
        d["layer_bits"] = dict(self.layer_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Rebuild from `to_dict` output; unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


def _check_int(cfg: QuantConfig, name: str, lo: int, hi: int, hint: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}] ({hint}), got {value!r}")
