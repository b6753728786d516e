"""Batch-norm folding (FQN 3.5).

`QuantConvBn2d` keeps the conv weight ``W`` as the parameter and folds at every step:
F on, with the frozen EMA statistics (eqs. 13-14, Fig. 3); F off, the [17] scheme
(eqs. 11-12, batch statistics with the EMA-fold correction). `fold_bn` folds once,
for layers kept float and for float references. Both read each BN module's own
``eps``: torchvision's ``FrozenBatchNorm2d`` may carry ``eps=0``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

BN_TYPES = (nn.BatchNorm2d, FrozenBatchNorm2d)


def bn_stats(bn: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """(gamma, beta, running_mean, running_var, eps) of a BatchNorm2d or FrozenBatchNorm2d."""
    if not isinstance(bn, BN_TYPES):
        raise TypeError(f"expected BatchNorm2d or FrozenBatchNorm2d, got {type(bn).__name__}")
    c = bn.running_mean.numel()
    gamma = bn.weight if bn.weight is not None else torch.ones(c, device=bn.running_mean.device)
    beta = bn.bias if bn.bias is not None else torch.zeros(c, device=bn.running_mean.device)
    return gamma, beta, bn.running_mean, bn.running_var, float(bn.eps)


def fold_conv_bn_weights(weight: Tensor, bias: Tensor | None, gamma: Tensor, beta: Tensor, mean: Tensor,
                         var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Eqs. 11-14: ``W_fold = gamma/sqrt(var+eps) * W``, ``b_fold = gamma/sqrt(var+eps) * (b - mean) + beta``.

    Differentiable: `QuantConvBn2d` calls it at every training step with batch statistics (eqs. 11-12).
    """
    factor = gamma / torch.sqrt(var + eps)
    b = bias if bias is not None else torch.zeros_like(mean)
    return weight * factor.reshape(-1, *([1] * (weight.dim() - 1))), (b - mean) * factor + beta


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A new float ``nn.Conv2d`` equal to ``bn(conv(x))`` in eval mode, with a bias.

    Example:
        >>> conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval()
        >>> x = torch.randn(1, 3, 8, 8)
        >>> bool(torch.allclose(fold_bn(conv, bn)(x), bn(conv(x)), atol=1e-5))
        True
    """
    gamma, beta, mean, var, eps = bn_stats(bn)
    bias = conv.bias.double() if conv.bias is not None else None
    # in float64, so that folding itself adds no error worth measuring
    w, b = fold_conv_bn_weights(conv.weight.double(), bias, gamma.double(), beta.double(), mean.double(),
                                var.double(), eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(w)
    fused.bias.copy_(b)
    fused.weight.requires_grad_(conv.weight.requires_grad)
    fused.bias.requires_grad_(conv.weight.requires_grad)
    return fused


def batch_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a conv output (N, C, H, W), as BN uses to normalise."""
    var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    return mean, var
