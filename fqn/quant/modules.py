"""Quantized layers by module swapping: subclasses of the float layers that keep ``weight``/``bias``.

Quantizers are role-named children: ``weight_fq`` (the weight), ``input_fq``
(an input that no upstream quantizer produced: the normalised image, RoIAlign
or pooling output), ``preact_fq`` (conv output before a non-ReLU activation)
and ``act_fq`` (the output, after the fused activation). A quantizer that is
None is not there: such a layer computes in float at that point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fqn.config import QuantConfig
from fqn.quant.fake_quant import FakeQuantize, LearnedFakeQuantize, weight_quantizer
from fqn.quant.flags import SavedFlags
from fqn.quant.fold import batch_stats, bn_stats, fold_conv_bn_weights
from fqn.quant.qparams import bias_scale_floor, quantize_bias
from fqn.quant.range_search import make_activation_observer

GRID_PRESERVING = (nn.ReLU, nn.ReLU6)


def act_quantizer(cfg: QuantConfig) -> FakeQuantize:
    """An activation quantizer (asymmetric, per tensor) with the observer the config asks for."""
    obs = make_activation_observer(cfg.activation_observer, gamma=cfg.gamma, momentum=cfg.ema_momentum,
                                   bits=cfg.bits_a, bins=cfg.histogram_bins)
    if cfg.learn_ranges:
        return LearnedFakeQuantize(obs, cfg.bits_a)
    return FakeQuantize(obs, cfg.bits_a, symmetric=False, role="act")


def _maybe(fq_on: bool, cfg: QuantConfig) -> FakeQuantize | None:
    return act_quantizer(cfg) if fq_on else None


def _take(layer: nn.Module, name: str, value: Tensor) -> None:
    """``value`` as ``layer``'s parameter ``name``, trainable as it was."""
    setattr(layer, name, nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad))


def _make_bn(bn_type: type, gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor, eps: float, momentum: float,
             trainable: bool) -> nn.Module:
    """A BatchNorm2d or FrozenBatchNorm2d (``bn_type``) holding these statistics, on their device."""
    c, device = mean.numel(), mean.device
    if bn_type is nn.BatchNorm2d:
        bn = nn.BatchNorm2d(c, eps=eps, momentum=momentum, device=device)
        bn.weight = nn.Parameter(gamma.detach().clone().to(device), requires_grad=trainable)
        bn.bias = nn.Parameter(beta.detach().clone().to(device), requires_grad=trainable)
    else:
        bn = bn_type(c, eps=eps).to(device)
        bn.weight.copy_(gamma.detach())
        bn.bias.copy_(beta.detach())
    bn.running_mean.copy_(mean.detach())
    bn.running_var.copy_(var.detach())
    return bn


class _QuantLayerMixin:
    """Shared wiring of QuantConv2d and QuantLinear."""

    weight_fq: FakeQuantize | None
    input_fq: FakeQuantize | None
    preact_fq: FakeQuantize | None
    act_fq: FakeQuantize | None
    activation: nn.Module | None

    @torch.no_grad()
    def _copy_params(self, weight: Tensor, bias: Tensor | None, requires_grad: bool) -> None:
        """Take the float layer's (or BN-folded) weight and bias, trainable as the float weight was."""
        self.weight.copy_(weight)
        if bias is not None:
            self.bias.copy_(bias)
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(requires_grad)

    def _setup(self, cfg: QuantConfig | None, *, activation: nn.Module | None, input_quant: bool,
               output_quant: bool) -> None:
        self.activation = activation
        self.bias_quantized = False  # set by each forward: was the bias put on the int32 grid s_in * s_w?
        self.scale_floored = 0  # set by each eval forward: weight-scale channels raised so the int32 bias fits
        quant = cfg is not None
        self.weight_fq = (weight_quantizer(self.weight, cfg.bits_w, per_channel=cfg.per_channel,
                                           symmetric=cfg.symmetric_weights) if quant else None)
        self.input_fq = _maybe(quant and input_quant, cfg)
        needs_preact = activation is not None and not isinstance(activation, GRID_PRESERVING)
        self.preact_fq = _maybe(quant and output_quant and needs_preact, cfg)
        self.act_fq = _maybe(quant and output_quant, cfg)

    @property
    def is_quantized(self) -> bool:
        return self.weight_fq is not None

    def bind_input_grid(self, fq: FakeQuantize | None) -> None:
        """The quantizer whose output this layer reads (its input grid ``s_in``), found by `bind_input_grids`.

        Integer kernels add the bias as int32 on the grid ``s_in * s_w`` of their accumulator; the layer
        knows ``s_w``, the quantizer upstream knows ``s_in``. Kept as a plain reference (not a child), so
        the quantizer is saved once, where it lives. None: the input comes out of float glue.
        """
        object.__setattr__(self, "_input_grid", fq)

    @property
    def input_grid(self) -> FakeQuantize | None:
        """The bound upstream quantizer; None where float glue feeds the layer or it was never bound."""
        return self.__dict__.get("_input_grid")

    @property
    def grid_bound(self) -> bool:
        """Whether `bind_input_grids` has seen this layer (bound it to a quantizer, or to none)."""
        return "_input_grid" in self.__dict__

    def grid_inputs(self, args: tuple) -> list[Tensor]:
        return [args[0]]

    def bind_grids(self, calls: list[list[FakeQuantize | None]]) -> None:
        """Bind the upstream quantizer seen in every probe call; a layer called on several grids (a head
        shared across pyramid levels) binds none and is given its grid by the caller."""
        sources = {id(c[0]): c[0] for c in calls}
        self.bind_input_grid(next(iter(sources.values())) if len(sources) == 1 else None)

    def _input_step(self, grid: FakeQuantize | None) -> Tensor | None:
        """``s_in``: of this layer's own input quantizer, else of ``grid`` (given by the caller) or the bound one."""
        fq = next((q for q in (self.input_fq, grid, self.input_grid) if q is not None), None)
        return fq.scale if fq is not None and fq.quantizing else None

    def _q_weight(self, w: Tensor, bias: Tensor | None, s_in: Tensor | None) -> Tensor:
        """The quantized weight; its scale floored so that the bias fits the int32 grid (`bias_scale_floor`)."""
        fq = self.weight_fq
        if fq is None:
            return w
        if bias is None or s_in is None or not fq.quantizing:
            return fq(w)
        floor = bias_scale_floor(bias, s_in, fq.ch_axis is not None)
        out = fq(w, min_scale=floor)
        if not self.training:  # reported by the int8 export; in training the count would sync the device
            self.scale_floored = int((fq.scale <= floor).sum())
        return out

    def _q_bias(self, bias: Tensor | None, s_in: Tensor | None) -> Tensor | None:
        """The bias on the int32 grid ``s_in * s_w`` when the weight is quantized and the input grid is known."""
        fq = self.weight_fq
        self.bias_quantized = bias is not None and fq is not None and fq.quantizing and s_in is not None
        if not self.bias_quantized:
            return bias
        return quantize_bias(bias, s_in * fq.scale)

    def _q_input(self, x: Tensor) -> Tensor:
        return self.input_fq(x) if self.input_fq is not None else x

    def effective_weight(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias this layer quantizes and applies (a conv+BN's: folded with its EMA statistics)."""
        return self.weight, self.bias

    @torch.no_grad()
    def set_effective_weight(self, w: Tensor) -> None:
        """Make `effective_weight`'s weight ``w`` (e.g. moved onto the integer grid by learned rounding)."""
        self.weight.copy_(w)

    def quantized_weight(self) -> Tensor:
        """`effective_weight` as the layer's eval forward quantizes it: its own ranges, the int32-bias floor."""
        w, b = self.effective_weight()
        was_training = self.training
        self.eval()
        try:
            return self._q_weight(w, b, self._input_step(None))
        finally:
            self.train(was_training)

    def quantized_input(self, x: Tensor) -> Tensor:
        """``x`` as the layer reads it: through its own input quantizer, if it has one."""
        return self._q_input(x)

    def _q_output(self, y: Tensor) -> Tensor:
        if self.activation is not None:
            if self.preact_fq is not None:
                y = self.preact_fq(y)
            y = self.activation(y)
        return self.act_fq(y) if self.act_fq is not None else y


class QuantConv2d(_QuantLayerMixin, nn.Conv2d):
    """Conv2d with fake-quantized weight, optional input quantizer, fused activation and output quantizer."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, cfg: QuantConfig | None, *, bias: Tensor | None = None,
                   weight: Tensor | None = None, activation: nn.Module | None = None, input_quant: bool = False,
                   output_quant: bool = True) -> QuantConv2d:
        """Swap ``conv`` (``cfg=None`` keeps it float); ``weight``/``bias`` override, e.g. BN-folded ones."""
        w = conv.weight if weight is None else weight
        b = conv.bias if bias is None else bias
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, bias=b is not None, padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
        q._copy_params(w, b, conv.weight.requires_grad)
        q._setup(cfg, activation=activation, input_quant=input_quant, output_quant=output_quant)
        return q

    def _float_conv(self, with_bias: bool) -> nn.Conv2d:
        """A plain nn.Conv2d of this layer's shape holding its (trained) weight and, if asked, its bias."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=with_bias, padding_mode=self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        _take(conv, "weight", self.weight)
        if with_bias:
            _take(conv, "bias", self.bias)
        return conv

    def float_layers(self) -> list[nn.Module]:
        """The float layers this one stands for, in order: the conv, its BN if one was folded in, the activation."""
        folded = getattr(self, "folded_bn", None)  # (BN class, conv had a bias): a kept-float conv+BN, folded
        keep_bias = self.bias is not None and (folded is None or folded[1])
        layers: list[nn.Module] = [self._float_conv(keep_bias)]
        if folded is not None:  # the fold is exact: BN(gamma=1, beta=b_fold, mean=0, var=1-eps) adds the bias back
            c = self.out_channels
            beta = self.bias.detach() if self.bias is not None and not keep_bias else torch.zeros(c)
            layers.append(_make_bn(folded[0], torch.ones(c), beta, torch.zeros(c), torch.full((c,), 1 - 1e-5),
                                   1e-5, 0.1, self.weight.requires_grad))
        return layers + ([self.activation] if self.activation is not None else [])

    def forward(self, x: Tensor, grid: FakeQuantize | None = None) -> Tensor:
        """``grid``: the quantizer that produced ``x``, for a layer shared between inputs on different grids."""
        x = self._q_input(x)
        s_in = self._input_step(grid)
        w = self._q_weight(self.weight, self.bias, s_in)
        return self._q_output(self._conv_forward(x, w, self._q_bias(self.bias, s_in)))


class QuantConvBn2d(SavedFlags, QuantConv2d):
    """Conv + BN whose trained parameter stays ``W``, folded with the BN statistics at every step.

    **F** (``freeze_bn=True``, paper Fig. 3): the EMA statistics are frozen; each forward folds
    ``W * gamma / sigma_EMA`` (eqs. 13-14), quantizes it and convolves. ``W`` keeps its own learning
    rate: training a pre-folded ``W_fold`` instead would scale each channel's effective step by
    ``(sigma / gamma)^2``.

    **F off** ([17], Jacob et al. and TensorFlow's ``fold_batch_norms``): batch statistics
    ``mu_B, sigma_B`` come from a float conv; the quantized conv uses the *EMA*-folded weight
    ``W * gamma / sigma_EMA`` and its output is rescaled by ``sigma_EMA / sigma_B``, with the bias
    ``beta - gamma * mu_B / sigma_B``. The output equals batch-normalised training, and training and
    inference quantize the same weights. The EMA keeps updating. Once `bn_frozen` is set (the [18]
    variant: frozen for the last N steps), or in eval mode, the layer computes as under F.
    """

    FLAGS = ("_frozen",)
    LEGACY_BUFFERS = {"bn_frozen": "_frozen"}

    def float_layers(self) -> list[nn.Module]:
        """Conv (trained ``W``), the BN it folds (its class, trained gamma/beta, EMA statistics), the activation."""
        conv = self._float_conv(self.bias is not None)
        bn = _make_bn(self.bn_type, self.bn_weight, self.bn_bias, self.running_mean, self.running_var, self.bn_eps,
                      self.bn_momentum, self.bn_weight.requires_grad)
        return [conv, bn] + ([self.activation] if self.activation is not None else [])

    def effective_weight(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias folded with the EMA statistics: what is quantized in training and inference alike."""
        return fold_conv_bn_weights(self.weight, self.bias, self.bn_weight, self.bn_bias, self.running_mean,
                                    self.running_var, self.bn_eps)

    @torch.no_grad()
    def set_effective_weight(self, w: Tensor) -> None:
        """``W := w / (gamma / sigma_EMA)``, so that the fold gives ``w`` (up to rounding in the last bit).

        A channel whose fold factor is 0 folds to 0 whatever ``W`` is: its ``W`` is kept.
        """
        factor = (self.bn_weight / torch.sqrt(self.running_var + self.bn_eps)).reshape(-1, *([1] * (w.dim() - 1)))
        self.weight.copy_(torch.where(factor != 0, w / torch.where(factor != 0, factor, 1), self.weight))

    def folded_weight(self) -> Tensor:
        """The weight of `effective_weight`."""
        return self.effective_weight()[0]

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.Module, cfg: QuantConfig, **kw) -> QuantConvBn2d:
        """Swap conv + BN; the BN statistics are frozen from the start under F (``cfg.freeze_bn``)."""
        q = cls.from_float(conv, cfg, **kw)
        gamma, beta, mean, var, eps = bn_stats(bn)
        # trainable only where the float model trained them: FrozenBatchNorm2d's are buffers and stay fixed
        trainable = isinstance(gamma, nn.Parameter) and gamma.requires_grad
        q.bn_weight = nn.Parameter(gamma.detach().clone(), requires_grad=trainable)
        q.bn_bias = nn.Parameter(beta.detach().clone(), requires_grad=trainable)
        q.register_buffer("running_mean", mean.detach().clone())
        q.register_buffer("running_var", var.detach().clone())
        q._frozen = False  # saved with the model (`SavedFlags`), read without a device sync
        q.bn_eps = eps
        q.bn_type = type(bn)
        q.last_batch_stats = None
        momentum = getattr(bn, "momentum", None)
        q.bn_momentum = 0.1 if momentum is None else float(momentum)
        q.freeze_bn(cfg.freeze_bn)
        return q

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bn_eps={self.bn_eps}, bn_momentum={self.bn_momentum}, frozen={self._frozen}"

    def freeze_bn(self, frozen: bool = True) -> None:
        """Fold the EMA statistics from now on and stop updating them (F, or the [18] schedule's last N steps)."""
        self._frozen = bool(frozen)

    @property
    def bn_frozen(self) -> bool:
        return self._frozen

    def forward(self, x: Tensor, grid: FakeQuantize | None = None) -> Tensor:
        x = self._q_input(x)
        s_in = self._input_step(grid)
        w, b = self.effective_weight()
        w = self._q_weight(w, b, s_in)
        if not self.training or self._frozen:
            return self._q_output(self._conv_forward(x, w, self._q_bias(b, s_in)))
        # [17]: batch statistics of the float conv, quantized conv on the EMA fold, rescaled by sigma_EMA / sigma_B
        y_float = self._conv_forward(x, self.weight, self.bias)
        mean, var = batch_stats(y_float)
        correction = torch.sqrt(self.running_var + self.bn_eps) / torch.sqrt(var + self.bn_eps)
        _, b_batch = fold_conv_bn_weights(self.weight, self.bias, self.bn_weight, self.bn_bias, mean, var,
                                          self.bn_eps)
        # c * (conv + b_B / c) = c * conv + b_B: the bias goes onto the accumulator grid as at inference
        y = self._conv_forward(x, w, self._q_bias(b_batch / correction, s_in)) * correction.reshape(1, -1, 1, 1)
        self._update_ema(mean.detach(), var.detach(), y_float.numel() // y_float.shape[1])
        return self._q_output(y)

    @torch.no_grad()
    def _update_ema(self, mean: Tensor, var: Tensor, n: int) -> None:
        """nn.BatchNorm2d's EMA update (unbiased running variance), after this step's fold has read the EMA."""
        self.last_batch_stats = (mean, var)  # for monitoring (paper's Figure 1)
        m = self.bn_momentum
        self.running_mean.mul_(1 - m).add_(m * mean)
        self.running_var.mul_(1 - m).add_(m * var * n / max(n - 1, 1))


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> int:
    """Freeze (or unfreeze) the BN statistics of every `QuantConvBn2d`; returns how many there are.

    Without F the trainer calls this ``freeze_bn_last_steps`` steps before the end.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantConvBn2d)]
    for m in layers:
        m.freeze_bn(frozen)
    return len(layers)


class QuantLinear(_QuantLayerMixin, nn.Linear):
    """Linear with fake-quantized weight, optional input quantizer, fused activation and output quantizer."""

    @classmethod
    def from_float(cls, linear: nn.Linear, cfg: QuantConfig | None, *, activation: nn.Module | None = None,
                   input_quant: bool = False, output_quant: bool = True) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q._copy_params(linear.weight, linear.bias, linear.weight.requires_grad)
        q._setup(cfg, activation=activation, input_quant=input_quant, output_quant=output_quant)
        return q

    def float_layers(self) -> list[nn.Module]:
        """The float linear (trained weight and bias) and its activation, if one was fused."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        _take(linear, "weight", self.weight)
        if self.bias is not None:
            _take(linear, "bias", self.bias)
        return [linear] + ([self.activation] if self.activation is not None else [])

    def forward(self, x: Tensor, grid: FakeQuantize | None = None) -> Tensor:
        x = self._q_input(x)
        s_in = self._input_step(grid)
        w = self._q_weight(self.weight, self.bias, s_in)
        return self._q_output(F.linear(x, w, self._q_bias(self.bias, s_in)))


class QuantMaxPool2d(nn.MaxPool2d):
    """Max pooling, which keeps its input's grid: its outputs are input values (see `bind_input_grids`)."""

    def grid_sources(self, args: tuple, output: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [(output, args[0])]

    def restore_float(self) -> None:
        self.__class__ = nn.MaxPool2d


class QuantAdd(nn.Module):
    """Element-wise add of two quantized tensors, optional fused ReLU, quantized output (FQN 3.6)."""

    def __init__(self, cfg: QuantConfig | None, relu: bool = False) -> None:
        super().__init__()
        self.relu = relu
        self.act_fq = _maybe(cfg is not None, cfg)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        y = a + b
        if self.relu:
            y = F.relu(y)
        return self.act_fq(y) if self.act_fq is not None else y


class QuantMul(nn.Module):
    """Element-wise product (squeeze-excitation scaling) with a quantized output."""

    def __init__(self, cfg: QuantConfig | None) -> None:
        super().__init__()
        self.act_fq = _maybe(cfg is not None, cfg)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        y = a * b
        return self.act_fq(y) if self.act_fq is not None else y


__all__ = ["QuantConv2d", "QuantConvBn2d", "QuantLinear", "QuantAdd", "QuantMul", "QuantMaxPool2d", "act_quantizer",
           "freeze_bn_stats"]
