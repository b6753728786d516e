"""Block reconstruction (BRECQ, QDrop) and layer-wise learned rounding (AdaRound) on fqn's quantizers.

Post-training quantization that rounds every weight to the nearest grid point leaves, at 4 bits, an
output error that the next layers inherit. Reconstruction chooses each weight's rounding (and, for
BRECQ/QDrop, the activation step sizes) to make a *unit* of the network (a layer, or a block of
layers) reproduce the float unit's output on calibration data:

* ``adaround`` (Nagel et al., ICML 2020): one layer at a time, weights only; the layer's own output
  quantizers stay off while its rounding is learned.
* ``brecq`` (Li et al., ICLR 2021): one block at a time (a residual block, the FPN, a head), the
  rounding of all its weights and its activation step sizes together, its activations quantized.
* ``qdrop`` (Wei et al., ICLR 2022): BRECQ where each activation quantizer's output, and the block's
  input, are replaced by their float value at random (probability ``drop``) at every step, so that the
  rounding learned does not over-fit to one pattern of activation noise.

The unit's input comes from the quantized network upstream (with the units before it already
reconstructed); its target is the float network's output of the same unit. This module is plain
PyTorch: it records calls of a module with forward hooks, learns on them and bakes the result in.
Which units a detector has, and how their inputs and targets line up, is `fqn.models.reconstruct`'s.

What a reconstructed layer keeps: its weight moved onto the grid of the learned codes
(`QuantConv2d.set_effective_weight`) and its weight quantizer's range held (`FakeQuantize.hold_range`),
so that nearest rounding of that weight, in the fake-quant model and in the int8 export alike, gives
exactly the learned codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fqn.quant.adaround import GAMMA, ZETA, beta_schedule, hard_codes, initial_rounding
from fqn.quant.fake_quant import EPS, FakeQuantize, fake_quantize, learned_fake_quantize, quantizer_modes, quantizers

METHODS = ("adaround", "brecq", "qdrop")
"""Reconstruction methods, weakest to strongest on the published record."""


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
    """How reconstruction learns. The defaults fit a short run on a CPU (see docs/ptq.md for AP against ``iters``).

    Args:
        method: one of `METHODS`.
        iters: optimisation steps per unit (the papers use 20000 on a GPU). 50: on the quickstart's model, 200
            lowered the units' output error further but not the AP (docs/ptq.md), at four times the time.
        lr: Adam's learning rate for the rounding variables ``V``.
        act_lr: Adam's learning rate for the log of the activation step sizes (BRECQ, QDrop): a relative
            change per step; 0: the steps stay as calibrated.
        weight: the rounding regulariser's weight (BRECQ's 0.01).
        warmup: fraction of ``iters`` without the regulariser.
        drop: QDrop's probability of using the float value instead of the quantized one.
        rows: RoIs per step for a unit whose samples are rows (the box head): a minibatch, as the papers'.
        seed: the sampling and dropping of every unit derives from it: a rerun gives the same codes.
    """

    method: str = "brecq"
    iters: int = 50
    lr: float = 1e-2
    act_lr: float = 1e-2
    weight: float = 0.01
    warmup: float = 0.2
    drop: float = 0.5
    rows: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"reconstruction method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"reconstruction iters must be a positive integer, got {self.iters!r}")
        if self.lr < 0 or self.act_lr < 0 or self.weight < 0:
            raise ValueError("reconstruction lr, act_lr and weight must be >= 0")
        if not 0 <= self.warmup < 1 or not 0 <= self.drop < 1:
            raise ValueError(f"need 0 <= warmup < 1 and 0 <= drop < 1, got {self.warmup}, {self.drop}")

    @property
    def learns_activations(self) -> bool:
        return self.method != "adaround" and self.act_lr > 0

    @property
    def drops(self) -> bool:
        return self.method == "qdrop" and self.drop > 0


@dataclasses.dataclass
class Sample:
    """One call of a unit: its arguments in the quantized network, in the float network, and the float output."""

    args: tuple
    kwargs: dict[str, Any]
    target: Any
    float_args: tuple | None = None
    rows: bool = False
    """The first dimension of every tensor holds independent rows (a box head's RoIs): a step may take a subset."""

    def subset(self, max_rows: int, generator: torch.Generator) -> Sample:
        """At most ``max_rows`` random rows of a `rows` sample (itself otherwise)."""
        n = tensors_of(self.target)[0].shape[0]
        if not self.rows or n <= max_rows:
            return self
        idx = torch.randperm(n, generator=generator)[:max_rows]

        def take(t: Tensor) -> Tensor:
            return t[idx.to(t.device)]
        return Sample(map_tensors(take, self.args), self.kwargs, map_tensors(take, self.target),
                      map_tensors(take, self.float_args) if self.float_args is not None else None)


# -- recording calls -------------------------------------------------------------------------------------------------

class StopForward(Exception):
    """Raised by a recording hook once it has what it needs: the rest of the network's forward is skipped."""


@dataclasses.dataclass
class Call:
    args: tuple
    kwargs: dict[str, Any]
    output: Any = None


@contextlib.contextmanager
def recording(module: nn.Module, *, stop_after: int | None = None, inputs_only: bool = False) -> Iterator[list[Call]]:
    """Every call of ``module`` inside the block (arguments and output), optionally stopping the forward.

    With ``stop_after``, the hook raises `StopForward` at that many calls; run the network through
    `run_until_stopped`. ``inputs_only``: record the arguments before ``module`` runs (it does not run
    when that call stops the forward).
    """
    calls: list[Call] = []

    def record(args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        calls.append(Call(args, dict(kwargs), output))
        if stop_after is not None and len(calls) >= stop_after:
            raise StopForward

    if inputs_only:
        handle = module.register_forward_pre_hook(lambda _m, a, kw: record(a, kw, None), with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda _m, a, kw, out: record(a, kw, out), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def run_until_stopped(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """``fn(*args, **kwargs)`` (a forward of the network) without gradients, ended early by a recording hook's
    `StopForward`."""
    with contextlib.suppress(StopForward), torch.no_grad():
        fn(*args, **kwargs)


# -- tensors in nested outputs ---------------------------------------------------------------------------------------

def tensors_of(value: Any) -> list[Tensor]:
    """The tensors of a unit's output or arguments (a tensor, or lists, tuples and dicts of them), in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_of(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_of(v)]
    return []


def map_tensors(fn: Callable[..., Tensor], value: Any, *others: Any) -> Any:
    """``value`` with every tensor ``t`` replaced by ``fn(t, *matching tensors of others)``, structure kept."""
    if isinstance(value, Tensor):
        return fn(value, *others)
    if isinstance(value, dict):
        return type(value)((k, map_tensors(fn, v, *(o[k] for o in others))) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(fn, v, *(o[i] for o in others)) for i, v in enumerate(value))
    return value


def output_error(out: Any, target: Any) -> Tensor:
    """BRECQ's loss: the squared error summed over each sample's outputs, averaged over samples.

    A sample is a row of the first dimension (an image of a feature map, an RoI of the box head).
    """
    outs, targets = tensors_of(out), tensors_of(target)
    if len(outs) != len(targets) or not outs:
        raise ValueError(f"the unit gave {len(outs)} tensors where its float counterpart gave {len(targets)}")
    n = max(outs[0].shape[0], 1) if outs[0].dim() else 1
    return sum((o.float() - t.float()).pow(2).sum() for o, t in zip(outs, targets)) / n


# -- learning --------------------------------------------------------------------------------------------------------

def quantized_layers(module: nn.Module) -> list[nn.Module]:
    """The layers under ``module`` (itself included) whose weight is quantized, in registration order."""
    return [m for m in module.modules() if getattr(m, "weight_fq", None) is not None]


class LayerRounding:
    """One layer's rounding variables ``V``, with AdaRound's soft weight and regulariser computed in fused form.

    `soft_quantize`'s ``floor(W / s) + z`` does not change while ``V`` learns; ``h(V)``, the soft weight and
    the derivative of the soft weight in ``V`` are computed once per step (`prepare`), and the regulariser's
    gradient is added to ``V.grad`` in closed form (`add_regularizer_grad`): autograd would keep a dozen
    intermediate tensors of the weight's size per step, and the box head's first linear holds 12.8M weights.
    `soft_quantize` and `fqn.quant.adaround.rounding_regularizer` are the references (tests compare both).
    """

    def __init__(self, layer: nn.Module) -> None:
        fq = layer.weight_fq
        w = layer.effective_weight()[0].detach()
        shape = [1] * w.dim()
        if fq.ch_axis is not None:
            shape[fq.ch_axis] = -1
        self.layer, self.dtype = layer, w.dtype
        self.scale = fq.scale.float().reshape(shape)
        self.zero_point = fq.zero_point.float().reshape(shape)
        self.floor_z = torch.floor(w.float() / self.scale) + self.zero_point
        self.qmin, self.qmax = fq.qmin, fq.qmax
        self.v = initial_rounding(w, fq.scale, fq.ch_axis).requires_grad_(True)
        self.prepare()

    @torch.no_grad()
    def prepare(self) -> None:
        """This step's ``h(V)``, soft weight and ``d soft weight / dV`` (zero where a clamp holds it)."""
        sig = torch.sigmoid(self.v)
        h_raw = sig * (ZETA - GAMMA) + GAMMA
        self.h = h_raw.clamp(0.0, 1.0)
        code = self.floor_z + self.h
        self.weight = ((code.clamp(self.qmin, self.qmax) - self.zero_point) * self.scale).to(self.dtype)
        self.dh_dv = torch.where((h_raw >= 0) & (h_raw <= 1), sig * (1 - sig) * (ZETA - GAMMA), 0.0)
        self.dw_dv = torch.where((code >= self.qmin) & (code <= self.qmax), self.dh_dv * self.scale, 0.0)

    def soft_weight(self, *_: Any) -> Tensor:
        """The quantizer's form while learning: same signature as `fake_quantize`, the weight it is given is ours."""
        return _SoftWeight.apply(self.v, self)

    def regularizer(self, beta: float) -> Tensor:
        """``sum(1 - |2h - 1| ** beta)`` of this step's ``h`` (a value, for reports)."""
        return (1 - (2 * self.h - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def add_regularizer_grad(self, beta: float, weight: float) -> None:
        """``V.grad += weight * d regularizer / dV``: ``-2 beta |2h-1|^(beta-1) sign(2h-1) dh/dV``."""
        d = 2 * self.h - 1
        grad = d.abs().pow(beta - 1).mul_(d.sign()).mul_(self.dh_dv).mul_(-2 * beta * weight)
        if self.v.grad is None:
            self.v.grad = grad
        else:
            self.v.grad.add_(grad)


class _SoftWeight(torch.autograd.Function):
    """The prepared soft weight, with the prepared derivative as its backward."""

    @staticmethod
    def forward(ctx: Any, v: Tensor, rounding: LayerRounding) -> Tensor:  # noqa: ARG004 (v: for autograd)
        ctx.rounding = rounding
        return rounding.weight.clone()  # a layer called several times per step (the RPN head's): one output each

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.rounding.dw_dv, None


class ActivationSteps:
    """The step sizes of a unit's activation quantizers while they learn (BRECQ, QDrop), and QDrop's dropping.

    A step is learned as ``s0 * exp(u)``: Adam's steps on ``u`` are relative, the same for a step of 1e-3 and
    of 1 (the calibrated steps of one detector span that). The zero point stays where calibration put it,
    so zero stays exactly representable.
    """

    def __init__(self, quantizers: list[FakeQuantize], learn: bool, drop: float, generator: torch.Generator) -> None:
        self.quantizers, self.drop, self.generator = quantizers, drop, generator
        self.log_steps = [torch.zeros_like(fq.scale, dtype=torch.float32, requires_grad=learn) for fq in quantizers]
        self.learn = learn
        for fq, u in zip(quantizers, self.log_steps):
            fq.set_export_mode(self._form(u))

    def _form(self, u: Tensor) -> Callable[..., Tensor]:
        def fn(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None) -> Tensor:
            if self.learn:
                q = learned_fake_quantize(x, (scale.float() * u.exp()).clamp_min(EPS), zero_point.float(), qmin,
                                          qmax, axis)
            else:
                q = fake_quantize(x, scale, zero_point, qmin, qmax, axis)
            if self.drop > 0:
                keep_float = torch.rand(x.shape, generator=self.generator).to(x.device) < self.drop
                q = torch.where(keep_float, x, q)
            return q
        return fn

    @torch.no_grad()
    def finish(self) -> None:
        """The learned steps into the quantizers, their own form back."""
        for fq, u in zip(self.quantizers, self.log_steps):
            fq.set_export_mode(None)
            if self.learn:
                fq._set_range((fq.scale.float() * u.exp()).clamp_min(EPS), fq.zero_point.clone())


def hold_weight_ranges(layers: list[nn.Module]) -> None:
    """Compute each layer's weight range as its eval forward does (int32-bias floor included) and hold it."""
    for layer in layers:
        fq = layer.weight_fq
        if fq.range_held:
            continue
        with quantizer_modes(layer):
            fq.enable_fake_quant(True)
            fq.enable_observer(True)
            layer.quantized_weight()
        fq.hold_range(True)


def release_weight_ranges(model: nn.Module) -> int:
    """Weight ranges follow the weights again (min/max at every call): for QAT from a reconstructed start."""
    held = [fq for _, fq in quantizers(model, "weight") if fq.range_held]
    for fq in held:
        fq.hold_range(False)
    return len(held)


@torch.no_grad()
def bake_rounding(layer: nn.Module, v: Tensor) -> Tensor:
    """Move ``layer``'s weight onto the grid of the codes ``V`` chose (its range held); returns the codes."""
    fq = layer.weight_fq
    w = layer.effective_weight()[0]
    codes = hard_codes(w, fq.scale, fq.zero_point, v, fq.qmin, fq.qmax, fq.ch_axis)
    shape = [1] * w.dim()
    if fq.ch_axis is not None:
        shape[fq.ch_axis] = -1
    grid = (codes.float() - fq.zero_point.float().reshape(shape)) * fq.scale.reshape(shape)
    layer.set_effective_weight(grid.to(w.dtype))
    return codes


def weight_codes(layer: nn.Module) -> Tensor:
    """The integer codes ``layer``'s weight quantizer gives its (effective) weight, as the int8 export computes them."""
    fq = layer.weight_fq
    w = layer.quantized_weight().detach().float()
    shape = [1] * w.dim()
    if fq.ch_axis is not None:
        shape[fq.ch_axis] = -1
    return (torch.round(w / fq.scale.reshape(shape)) + fq.zero_point.reshape(shape).float()).to(torch.int32)


@contextlib.contextmanager
def _frozen_parameters(module: nn.Module) -> Iterator[None]:
    params = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in params:
            p.requires_grad_(flag)


def _mean_error(module: nn.Module, samples: list[Sample]) -> float:
    with torch.no_grad():
        return float(sum(float(output_error(module(*s.args, **s.kwargs), s.target)) for s in samples) / len(samples))


def _optimise(module: nn.Module, samples: list[Sample], cfg: ReconstructionConfig, rounding: list[LayerRounding],
              params: list[dict[str, Any]], drop_inputs: float, generator: torch.Generator,
              step: Callable[[], None] | None) -> None:
    """``cfg.iters`` Adam steps on the output error (plus the rounding regulariser when ``rounding`` learns)."""
    opt = torch.optim.Adam(params)
    for it in range(cfg.iters):
        sample = samples[int(torch.randint(len(samples), (1,), generator=generator))].subset(cfg.rows, generator)
        args = sample.args
        if drop_inputs > 0 and sample.float_args is not None:  # QDrop: the unit's input, float at random too
            args = map_tensors(lambda q, f: torch.where(
                torch.rand(q.shape, generator=generator).to(q.device) < drop_inputs, f, q), args, sample.float_args)
        for r in rounding:
            r.prepare()
        loss = output_error(module(*args, **sample.kwargs), sample.target)
        beta = beta_schedule(it, cfg.iters, warmup=cfg.warmup) if rounding else None
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        for r in rounding:
            if beta is not None:
                r.add_regularizer_grad(beta, cfg.weight)
        if any(p.grad is not None for g in params for p in g["params"]):
            opt.step()
        if step is not None:
            step()


def reconstruct(module: nn.Module, samples: list[Sample], cfg: ReconstructionConfig, *,
                layers: list[nn.Module] | None = None, outputs_float: list[FakeQuantize] | None = None,
                step: Callable[[], None] | None = None) -> dict[str, float]:
    """Learn the rounding of ``layers`` (default: every quantized layer of ``module``) so that ``module`` on each
    sample's arguments gives its target; bake it in. Returns the unit's mean output error (every quantizer on),
    with nearest rounding and as learned.

    * ``adaround``: the rounding, with ``outputs_float`` (the layer's own output quantizers) off.
    * ``brecq``: the rounding with the unit's activations in float, then (``act_lr`` > 0) the activation
      steps with the learned rounding, activations quantized: two stages of ``iters`` each, as BRECQ's code.
    * ``qdrop``: rounding and steps together, each activation quantizer's output and the unit's input
      float at random (``drop``).

    ``step`` is called once per iteration (a progress bar). The module must be in eval mode with its
    quantizers quantizing; ``samples`` come from `recording` runs without gradients.
    """
    if not samples:
        raise ValueError("reconstruction needs at least one recorded call of the unit")
    layers = [m for m in (quantized_layers(module) if layers is None else layers) if m.weight_fq.quantizing]
    generator = torch.Generator().manual_seed(cfg.seed)
    acts = [fq for _, fq in quantizers(module, "act") if fq.quantizing]
    with quantizer_modes(module), _frozen_parameters(module):
        hold_weight_ranges(layers)
        before = _mean_error(module, samples)
        rounding = [LayerRounding(layer) for layer in layers]
        with quantizer_modes(module):
            for fq in outputs_float or (acts if cfg.method == "brecq" else []):
                fq.enable_fake_quant(False)
            for r in rounding:
                r.layer.weight_fq.set_export_mode(r.soft_weight)
            params = [{"params": [r.v for r in rounding], "lr": cfg.lr}]
            steps = None
            if cfg.method == "qdrop":
                steps = ActivationSteps(acts, cfg.learns_activations, cfg.drop, generator)
                if cfg.learns_activations:
                    params.append({"params": steps.log_steps, "lr": cfg.act_lr})
            _optimise(module, samples, cfg, rounding, params, cfg.drop if cfg.drops else 0.0, generator, step)
            if steps is not None:
                steps.finish()
            for r in rounding:
                r.layer.weight_fq.set_export_mode(None)
                bake_rounding(r.layer, r.v.detach())
        if cfg.method == "brecq" and cfg.learns_activations and acts:
            with quantizer_modes(module):
                steps = ActivationSteps(acts, True, 0.0, generator)
                _optimise(module, samples, cfg, [], [{"params": steps.log_steps, "lr": cfg.act_lr}], 0.0,
                          generator, step)
                steps.finish()
        after = _mean_error(module, samples)
    return {"nearest": before, "learned": after}


def seeded(cfg: ReconstructionConfig, index: int) -> ReconstructionConfig:
    """``cfg`` with a seed of its own for the ``index``-th unit, so units do not share one random stream."""
    return dataclasses.replace(cfg, seed=cfg.seed * 1000003 + index)


def error_ratio(report: list[dict[str, float]]) -> float:
    """Geometric mean over units of learned / nearest output error (below 1: reconstruction helped)."""
    ratios = [r["learned"] / r["nearest"] for r in report if r["nearest"] > 0]
    return math.exp(sum(math.log(max(r, 1e-12)) for r in ratios) / len(ratios)) if ratios else 1.0


__all__ = ["METHODS", "ReconstructionConfig", "Sample", "StopForward", "Call", "recording", "run_until_stopped",
           "tensors_of", "map_tensors", "output_error", "quantized_layers", "LayerRounding",
           "hold_weight_ranges", "release_weight_ranges", "bake_rounding", "weight_codes", "reconstruct", "seeded",
           "error_ratio"]
