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
from fqn.quant.fake_quant import (
    FakeQuantize,
    bias_scale_floor,
    input_scale,
    quantize_bias,
    tag_scale,
    weight_quantizer,
)
from fqn.quant.fold import batch_stats, bn_stats, fold_conv_bn_weights
from fqn.quant.observers import make_activation_observer, refresh_after_load

GRID_PRESERVING = (nn.ReLU, nn.ReLU6)


def act_quantizer(cfg: QuantConfig) -> FakeQuantize:
    """An activation quantizer (asymmetric, per tensor) with the observer the config asks for."""
    obs = make_activation_observer(cfg.activation_observer, gamma=cfg.gamma, momentum=cfg.ema_momentum,
                                   bits=cfg.bits_a, bins=cfg.histogram_bins)
    return FakeQuantize(obs, cfg.bits_a, symmetric=False, role="act")


def _maybe(fq_on: bool, cfg: QuantConfig) -> FakeQuantize | None:
    return act_quantizer(cfg) if fq_on else None


class _QuantLayerMixin:
    """Shared wiring of QConv2d and QLinear."""

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

    def _q_weight(self, w: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
        """The quantized weight; its scale floored so that the bias fits the int32 grid (`bias_scale_floor`)."""
        fq = self.weight_fq
        if fq is None:
            return w
        s_in = input_scale(x)
        if bias is None or s_in is None or not fq.quantizing:
            return fq(w)
        floor = bias_scale_floor(bias, s_in, fq.ch_axis is not None)
        out = fq(w, min_scale=floor)
        if not self.training:  # reported by the int8 export; in training the count would sync the device
            self.scale_floored = int((fq.scale <= floor).sum())
        return out

    def _q_bias(self, bias: Tensor | None, x: Tensor) -> Tensor | None:
        """The bias on the int32 grid ``s_in * s_w`` when the weight is quantized and ``x`` is on a known grid."""
        fq = self.weight_fq
        s_in = input_scale(x)
        self.bias_quantized = bias is not None and fq is not None and fq.quantizing and s_in is not None
        if not self.bias_quantized:
            return bias
        return quantize_bias(bias, s_in * fq.scale)

    def _q_input(self, x: Tensor) -> Tensor:
        return self.input_fq(x) if self.input_fq is not None else x

    def _q_output(self, y: Tensor) -> Tensor:
        if self.activation is not None:
            if self.preact_fq is not None:
                y = self.preact_fq(y)
            y = self.activation(y)
        return self.act_fq(y) if self.act_fq is not None else y


class QConv2d(_QuantLayerMixin, nn.Conv2d):
    """Conv2d with fake-quantized weight, optional input quantizer, fused activation and output quantizer."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, cfg: QuantConfig | None, *, bias: Tensor | None = None,
                   weight: Tensor | None = None, activation: nn.Module | None = None, input_quant: bool = False,
                   output_quant: bool = True) -> QConv2d:
        """Swap ``conv`` (``cfg=None`` keeps it float); ``weight``/``bias`` override, e.g. BN-folded ones."""
        w = conv.weight if weight is None else weight
        b = conv.bias if bias is None else bias
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, bias=b is not None, padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
        q._copy_params(w, b, conv.weight.requires_grad)
        q._setup(cfg, activation=activation, input_quant=input_quant, output_quant=output_quant)
        return q

    def forward(self, x: Tensor) -> Tensor:
        x = self._q_input(x)
        w = self._q_weight(self.weight, self.bias, x)
        return self._q_output(self._conv_forward(x, w, self._q_bias(self.bias, x)))


class QConvBn2d(QConv2d):
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

    def folded_weight(self) -> Tensor:
        """The weight folded with the EMA statistics: what is quantized in training and inference alike."""
        w, _ = fold_conv_bn_weights(self.weight, self.bias, self.bn_weight, self.bn_bias, self.running_mean,
                                    self.running_var, self.bn_eps)
        return w

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.Module, cfg: QuantConfig, **kw) -> QConvBn2d:
        """Swap conv + BN; the BN statistics are frozen from the start under F (``cfg.freeze_bn``)."""
        q = cls.from_float(conv, cfg, **kw)
        gamma, beta, mean, var, eps = bn_stats(bn)
        # trainable only where the float model trained them: FrozenBatchNorm2d's are buffers and stay fixed
        trainable = isinstance(gamma, nn.Parameter) and gamma.requires_grad
        q.bn_weight = nn.Parameter(gamma.detach().clone(), requires_grad=trainable)
        q.bn_bias = nn.Parameter(beta.detach().clone(), requires_grad=trainable)
        q.register_buffer("running_mean", mean.detach().clone())
        q.register_buffer("running_var", var.detach().clone())
        q.register_buffer("bn_frozen", torch.tensor(0, dtype=torch.uint8))
        q._frozen = False  # mirror of bn_frozen, read without a device sync
        q.register_load_state_dict_post_hook(refresh_after_load)
        q.bn_eps = eps
        q.last_batch_stats = None
        momentum = getattr(bn, "momentum", None)
        q.bn_momentum = 0.1 if momentum is None else float(momentum)
        q.freeze_bn(cfg.freeze_bn)
        return q

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bn_eps={self.bn_eps}, bn_momentum={self.bn_momentum}, frozen={self._frozen}"

    def _refresh(self) -> None:
        self._frozen = bool(self.bn_frozen)

    def freeze_bn(self, frozen: bool = True) -> None:
        """Fold the EMA statistics from now on and stop updating them (F, or the [18] schedule's last N steps)."""
        self.bn_frozen.fill_(int(frozen))
        self._frozen = bool(frozen)

    def forward(self, x: Tensor) -> Tensor:
        x = self._q_input(x)
        w, b = fold_conv_bn_weights(self.weight, self.bias, self.bn_weight, self.bn_bias, self.running_mean,
                                    self.running_var, self.bn_eps)
        w = self._q_weight(w, b, x)
        if not self.training or self._frozen:
            return self._q_output(self._conv_forward(x, w, self._q_bias(b, x)))
        # [17]: batch statistics of the float conv, quantized conv on the EMA fold, rescaled by sigma_EMA / sigma_B
        y_float = self._conv_forward(x, self.weight, self.bias)
        mean, var = batch_stats(y_float)
        correction = torch.sqrt(self.running_var + self.bn_eps) / torch.sqrt(var + self.bn_eps)
        _, b_batch = fold_conv_bn_weights(self.weight, self.bias, self.bn_weight, self.bn_bias, mean, var,
                                          self.bn_eps)
        # c * (conv + b_B / c) = c * conv + b_B: the bias goes onto the accumulator grid as at inference
        y = self._conv_forward(x, w, self._q_bias(b_batch / correction, x)) * correction.reshape(1, -1, 1, 1)
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
    """Freeze (or unfreeze) the BN statistics of every `QConvBn2d`; returns how many there are.

    Without F the trainer calls this ``freeze_bn_last_steps`` steps before the end.
    """
    layers = [m for m in model.modules() if isinstance(m, QConvBn2d)]
    for m in layers:
        m.freeze_bn(frozen)
    return len(layers)


class QLinear(_QuantLayerMixin, nn.Linear):
    """Linear with fake-quantized weight, optional input quantizer, fused activation and output quantizer."""

    @classmethod
    def from_float(cls, linear: nn.Linear, cfg: QuantConfig | None, *, activation: nn.Module | None = None,
                   input_quant: bool = False, output_quant: bool = True) -> QLinear:
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q._copy_params(linear.weight, linear.bias, linear.weight.requires_grad)
        q._setup(cfg, activation=activation, input_quant=input_quant, output_quant=output_quant)
        return q

    def forward(self, x: Tensor) -> Tensor:
        x = self._q_input(x)
        w = self._q_weight(self.weight, self.bias, x)
        return self._q_output(F.linear(x, w, self._q_bias(self.bias, x)))


class GridMaxPool2d(nn.MaxPool2d):
    """Max pooling that passes its input's grid (`tag_scale`) on: its outputs are input values."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        s = input_scale(x)
        return tag_scale(y, s) if s is not None else y


class QAdd(nn.Module):
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


class QMul(nn.Module):
    """Element-wise product (squeeze-excitation scaling) with a quantized output."""

    def __init__(self, cfg: QuantConfig | None) -> None:
        super().__init__()
        self.act_fq = _maybe(cfg is not None, cfg)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        y = a * b
        return self.act_fq(y) if self.act_fq is not None else y


__all__ = ["QConv2d", "QConvBn2d", "QLinear", "QAdd", "QMul", "GridMaxPool2d", "act_quantizer", "freeze_bn_stats"]
