"""The one module-swap walker.

It walks a model top-down and swaps layers for their quantized versions:
model-specific converters (keyed by exact class) first, then conv->BN->act
runs inside ordered containers, then any remaining Conv2d/Linear. Names that
match ``cfg.keep_float`` are left alone. It knows no model: the detector's
converters come from `fqn.models`.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fqn.config import QuantConfig
from fqn.quant.fake_quant import FakeQuantize, Phase, phase_of
from fqn.quant.fold import BN_TYPES, fold_bn
from fqn.quant.modules import QuantAdd, QuantConv2d, QuantConvBn2d, QuantLinear, QuantMul
from fqn.quant.state import quant_state

log = logging.getLogger(__name__)

FUSABLE_ACTS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU)


@dataclass
class SwapContext:
    """What converters need: the config, the keep-float test, the walker itself, and a record of swaps."""

    cfg: QuantConfig
    converters: dict[type, Callable[..., nn.Module]]
    extra: dict = field(default_factory=dict)
    swapped: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)

    def is_float(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.cfg.keep_float)

    def layer_cfg(self, name: str) -> QuantConfig | None:
        """The config of module ``name``: None if kept float, else with its `QuantConfig.layer_bits` bit-width."""
        return None if self.is_float(name) else self.cfg.for_layer(name)

    def conv_bn(self, name: str, conv: nn.Conv2d, bn: nn.Module | None, *, activation: nn.Module | None = None,
                input_quant: bool = False, output_quant: bool = True) -> nn.Conv2d:
        """Swap conv(+BN)(+act): a `QuantConvBn2d` that trains ``W`` and folds BN at every step, frozen under F.

        A name kept float returns the conv itself if there is nothing to fuse, else a float `QuantConv2d`
        (folded BN, fused activation, no quantizers), since the quantized block no longer calls its BN.
        """
        cfg = self.layer_cfg(name)
        (self.kept_float if cfg is None else self.swapped).append(name)
        if cfg is None and bn is None and activation is None:
            return conv  # nothing to fuse: the float layer itself stays
        kw = dict(activation=activation, input_quant=input_quant, output_quant=output_quant)
        if bn is None:
            return QuantConv2d.from_float(conv, cfg, **kw)
        if cfg is None:
            q = QuantConv2d.from_float(fold_bn(conv, bn), None, **kw)
            q.folded_bn = (type(bn), conv.bias is not None)  # for `restore_float`
            return q
        return QuantConvBn2d.from_conv_bn(conv, bn, cfg, **kw)

    def linear(self, name: str, linear: nn.Linear, *, activation: nn.Module | None = None,
               input_quant: bool = False, output_quant: bool = True) -> QuantLinear:
        cfg = self.layer_cfg(name)
        (self.kept_float if cfg is None else self.swapped).append(name)
        if cfg is None and activation is None:
            return linear
        return QuantLinear.from_float(linear, cfg, activation=activation, input_quant=input_quant,
                                  output_quant=output_quant)

    def walk(self, module: nn.Module, prefix: str = "") -> None:
        """Swap the children of ``module`` in place (recursively)."""
        if isinstance(module, (nn.Sequential, nn.ModuleDict)):
            self._fuse_ordered(module, prefix)
        for name, child in list(module.named_children()):
            full = f"{prefix}{name}"
            if isinstance(child, (QuantConv2d, QuantLinear, QuantAdd, QuantMul, FakeQuantize)):
                continue
            if self.is_float(full):
                if any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in child.modules()):
                    self.kept_float.append(full)
                continue
            converter = self.converters.get(type(child))
            if converter is not None:
                setattr(module, name, converter(child, full, self))
            elif type(child) is nn.Conv2d:
                setattr(module, name, self.conv_bn(full, child, None, input_quant=True))
            elif type(child) is nn.Linear:
                setattr(module, name, self.linear(full, child, input_quant=True))
            else:
                self.walk(child, full + ".")

    def _fuse_ordered(self, seq: nn.Module, prefix: str) -> None:
        """Fuse conv -> [BN] -> [activation] runs among the children of an ordered container."""
        items = list(seq.named_children())
        i = 0
        while i < len(items):
            name, mod = items[i]
            if type(mod) is not nn.Conv2d or self.is_float(prefix + name):
                i += 1
                continue
            j, bn, act = i + 1, None, None
            if j < len(items) and isinstance(items[j][1], BN_TYPES):
                bn = items[j][1]
                j += 1
            if j < len(items) and isinstance(items[j][1], FUSABLE_ACTS):
                act = type(items[j][1])()
                j += 1
            setattr(seq, name, self.conv_bn(prefix + name, mod, bn, activation=act))
            for k in range(i + 1, j):
                setattr(seq, items[k][0], nn.Identity())
            i = j


def swap_modules(model: nn.Module, cfg: QuantConfig, converters: dict[type, Callable[..., nn.Module]],
                 extra: dict | None = None) -> SwapContext:
    """Swap every layer in scope; returns the context holding the swapped and kept-float names."""
    ctx = SwapContext(cfg, converters, extra or {})
    ctx.walk(model)
    return ctx


def restore_float(module: nn.Module) -> nn.Module:
    """Undo `swap_modules` in place: every quantized layer back to the float layers it stands for; returns it.

    Bottom-up: a conv+BN(+activation) run fused in an ordered container gets its conv, BN and
    activation back in the slots the fusion emptied; modules with a ``restore_float`` method (the
    model's quantized blocks) put their own layers back and take their class back; a quantized
    layer left on its own becomes its float layer. Quantizers go with the layers that held them.
    """
    for _, child in list(module.named_children()):
        if not isinstance(child, (QuantConv2d, QuantLinear, FakeQuantize)):
            restore_float(child)
    if isinstance(module, (nn.Sequential, nn.ModuleDict)):
        _unfuse_ordered(module)
    restore = getattr(module, "restore_float", None)
    if callable(restore):
        restore()
    for name, child in list(module.named_children()):
        if isinstance(child, (QuantConv2d, QuantLinear)):
            layers = child.float_layers()
            if len(layers) != 1:
                raise RuntimeError(f"{type(module).__name__}.{name} fuses {len(layers)} float layers and its block "
                                   "does not say where they go: the block needs a restore_float method")
            setattr(module, name, layers[0])
    return module


def _unfuse_ordered(seq: nn.Module) -> None:
    """The inverse of `SwapContext._fuse_ordered`: a fused layer's BN and activation back into the Identity
    slots after it (appended where the container ended with it, as a 1-layer downsample does)."""
    items = list(seq.named_children())
    i = 0
    while i < len(items):
        name, mod = items[i]
        if not isinstance(mod, (QuantConv2d, QuantLinear)):
            i += 1
            continue
        layers = mod.float_layers()
        setattr(seq, name, layers[0])
        j = i + 1
        for extra in layers[1:]:
            if j < len(items) and isinstance(items[j][1], nn.Identity):
                setattr(seq, items[j][0], extra)
                j += 1
            elif j >= len(items):
                seq.add_module(str(len(list(seq.children()))), extra)
            else:
                raise RuntimeError(f"cannot put {type(extra).__name__} back after {name}: {items[j][0]} is not empty")
        i = j


def bind_input_grids(model: nn.Module, probe: Callable[[], object]) -> int:
    """Tell every quantized layer which quantizer produces its input, by one ``probe`` forward; returns the count.

    A layer puts its bias on the int32 grid ``s_in * s_w`` as the integer kernel will, so it must know
    ``s_in``. The probe runs with every quantizer off and every module in eval mode (nothing observed,
    no BN statistics moved, all restored after); hooks follow tensors by identity from each activation
    quantizer to the layers that read them, through grid-keeping ops (those with ``grid_sources``:
    max pooling). Modules with ``grid_inputs``/``bind_grids`` (the quantized conv and linear, heads
    shared across levels) are bound. Values do not matter: zeros will do.
    """
    produced: dict[int, tuple[Tensor, FakeQuantize]] = {}
    calls: dict[nn.Module, list[list[FakeQuantize | None]]] = {}

    def lookup(t: object) -> FakeQuantize | None:
        hit = produced.get(id(t)) if isinstance(t, Tensor) else None
        return hit[1] if hit is not None and hit[0] is t else None

    def on_quantizer(m: FakeQuantize, args: tuple, out: Tensor) -> None:
        if m.role == "act":
            produced[id(out)] = (out, m)

    def on_grid_op(m: nn.Module, args: tuple, out: object) -> None:
        for y, x in m.grid_sources(args, out):
            src = lookup(x)
            if src is not None:
                produced[id(y)] = (y, src)

    def on_reader(m: nn.Module, args: tuple) -> None:
        calls.setdefault(m, []).append([lookup(t) for t in m.grid_inputs(args)])

    handles = []
    for m in model.modules():
        if isinstance(m, FakeQuantize):
            handles.append(m.register_forward_hook(on_quantizer))
        if hasattr(m, "grid_sources"):
            handles.append(m.register_forward_hook(on_grid_op))
        if hasattr(m, "grid_inputs"):
            handles.append(m.register_forward_pre_hook(on_reader))
    modes = [(m, m.training) for m in model.modules()]
    try:
        with phase_of(model, Phase.FLOAT), torch.no_grad():
            model.eval()
            probe()
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    for m in model.modules():
        if hasattr(m, "bind_input_grid") and m not in calls:
            m.bind_input_grid(None)  # present, but the probe did not reach it: float glue feeds it, if anything
    for m, seen in calls.items():
        m.bind_grids(seen)
    return sum(1 for seen in calls.values() if any(s is not None for c in seen for s in c))


def check_input_grids(model: nn.Module) -> None:
    """Raise, naming the layer, where a quantized layer's input grid binding no longer describes ``model``.

    `bind_input_grids` records, per layer, the quantizer upstream whose step puts the bias on the int32
    grid. Replacing a submodule after `prepare_qat` can leave a layer bound to a quantizer that is no longer
    in the model (its ranges then never move again) or add a quantized layer that was never bound: both
    would make the bias grid, and so the int8 file, silently wrong. Calibration and conversion check.
    An unbound layer is an error in a model `prepare_qat` prepared (it binds every layer there); layers
    quantized by hand, without it, read their inputs as float glue.
    """
    prepared = quant_state(model) is not None
    present = {id(m) for m in model.modules()}
    for name, m in model.named_modules():
        if not isinstance(m, (QuantConv2d, QuantLinear)) or not m.is_quantized:
            continue
        grid = m.input_grid
        if prepared and not m.grid_bound:
            raise RuntimeError(f"quantized layer {name} was never bound to its input quantizer (added after "
                               "prepare_qat?): prepare the model again, or call "
                               "fqn.quant.prepare.bind_input_grids(model, probe)")
        if grid is not None and id(grid) not in present:
            raise RuntimeError(f"quantized layer {name} is bound to an input quantizer that is no longer in the "
                               "model (a submodule was replaced after prepare_qat): prepare the model again, or "
                               "call fqn.quant.prepare.bind_input_grids(model, probe)")


def scope_summary(model: nn.Module) -> dict[str, int]:
    """Counts by kind of what is quantized and what computes in float, read off the model itself."""
    counts: Counter[str] = Counter()
    for _, m in model.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            kind = "conv" if isinstance(m, QuantConv2d) else "linear"
            counts[f"{kind}:quantized" if m.is_quantized else f"{kind}:float"] += 1
        elif isinstance(m, nn.Conv2d):
            counts["conv:float"] += 1
        elif isinstance(m, nn.Linear):
            counts["linear:float"] += 1
        elif isinstance(m, QuantAdd):
            counts["add:quantized" if m.act_fq is not None else "add:float"] += 1
        elif isinstance(m, QuantMul):
            counts["mul:quantized" if m.act_fq is not None else "mul:float"] += 1
        elif isinstance(m, FakeQuantize):
            counts[f"quantizer:{m.role}"] += 1
    return dict(sorted(counts.items()))


def is_prepared(model: nn.Module) -> bool:
    return any(isinstance(m, FakeQuantize) for m in model.modules())


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantized conv/linear layers of a prepared model, with their names, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear)) and m.is_quantized]


def weight_bits(model: nn.Module) -> int:
    """Bits of quantized weight storage of a prepared model, each layer at its own bit-width (mixed precision)."""
    return sum(m.weight.numel() * m.weight_fq.bits for _, m in quantized_layers(model))
