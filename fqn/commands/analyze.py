"""``fqn analyze``: where quantization error comes from, layer by layer (the 2025 paper's section 3.3, done right).

The float reference is the same prepared model with its quantizers in the ``float`` phase
(identities; BN folded, which equals the float model within 1e-5), so both runs are hooked at
the same points: the output of every activation quantizer. Per layer: absolute error, relative
error against the *float* activation (elements with ``|float| <= guard * max|float|`` are left
out, so values near 0 do not explode it), MSE and SQNR. Layers are processed a few at a time
(``chunk``), so memory holds the activations of a handful of layers, never of all of them.

Only image-aligned layers (backbone, FPN, RPN head) are compared layer by layer: the box head sees
different proposals in the two runs, so its activations are not element-wise comparable. The layer
sensitivity ranking and the mixed-precision layer choice (`fqn.models.sensitivity`) run the box head on the float
model's proposals in every run instead; this module reports them.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
import yaml
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image
from tqdm.auto import tqdm

from fqn.commands.common import data_for, fresh_file, provenance, quantized_model
from fqn.commands.report import Column, markdown_table, write_json
from fqn.evaluation import sqnr_db
from fqn.int8 import convert_int8, load_int8
from fqn.int8.taps import Int8Taps
from fqn.models.sensitivity import choose_layer_bits, keep_float_patterns, layer_sensitivity
from fqn.quant.fake_quant import Phase, current_phase, phase_of, quantizers
from fqn.quant.state import quant_config
from fqn.viz import draw_detections, plot_average_maps, plot_hexbin, plot_maps

SAMPLES_PER_LAYER = 50_000  # (float, error) pairs kept per layer for the hexbin plots


@dataclass
class LayerError:
    """Error statistics of one quantized activation against the float one."""

    layer: str
    numel: int
    mse: float
    sqnr_db: float
    abs_mean: float
    abs_max: float
    rel_mean: float
    rel_p99: float


def comparable_points(model: nn.Module) -> list[str]:
    """Activation quantizers whose outputs line up element by element between the float and quantized runs."""
    return [n for n, _ in quantizers(model, "act") if not n.startswith("roi_heads")]


def relative_error(ref: Tensor, test: Tensor, guard: float = 1e-3) -> Tensor:
    """``|test - ref| / |ref|`` over the elements where ``|ref| > guard * max|ref|`` (flattened)."""
    ref, test = ref.double().flatten(), test.double().flatten()
    mask = ref.abs() > guard * ref.abs().max().clamp_min(1e-30)
    return (test[mask] - ref[mask]).abs() / ref[mask].abs()


def error_stats(name: str, ref: Tensor, test: Tensor, guard: float = 1e-3) -> LayerError:
    """The statistics of `LayerError` for one activation pair."""
    diff = (test.double() - ref.double()).abs()
    rel = relative_error(ref, test, guard)
    return LayerError(layer=name, numel=ref.numel(), mse=float(diff.square().mean()), sqnr_db=float(sqnr_db(ref, test)),
                      abs_mean=float(diff.mean()), abs_max=float(diff.max()),
                      rel_mean=float(rel.mean()) if rel.numel() else math.nan,
                      rel_p99=float(torch.quantile(rel.float()[:1_000_000], 0.99)) if rel.numel() else math.nan)


@contextlib.contextmanager
def _capture(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[Tensor]]]:
    """Record the outputs of the named quantizers (every call: the RPN head runs once per level)."""
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: store[n].append(out.detach().float().cpu()))
               for n in names]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@dataclass
class LayerCapture:
    """What is kept of one layer for the pictures: per-channel max maps, error maps and hexbin samples."""

    float_max: Tensor  # HxW, max over channels
    quant_max: Tensor
    abs_map: Tensor  # HxW, mean over channels of |quantized - float|
    rel_map: Tensor  # HxW, mean over the unguarded channels of |quantized - float| / |float|
    samples: Tensor  # N x 3: float value, absolute error, relative error (nan where guarded)


def _maps(ref: Tensor, test: Tensor, guard: float, generator: torch.Generator) -> LayerCapture:
    r, t = ref[0], test[0]  # first image, CxHxW
    diff = (t - r).abs()
    denom = r.abs()
    rel = torch.where(denom > guard * denom.max().clamp_min(1e-30), diff / denom.clamp_min(1e-30),
                      torch.full_like(diff, math.nan))
    flat = torch.stack([r.flatten(), diff.flatten(), rel.flatten()], 1)
    if flat.shape[0] > SAMPLES_PER_LAYER:
        flat = flat[torch.randperm(flat.shape[0], generator=generator)[:SAMPLES_PER_LAYER]]
    # error maps are means over channels: a max over channels only shows the one channel whose float value sits
    # just above the guard (relative error in the hundreds everywhere), which hides where the error is
    return LayerCapture(r.amax(0), t.amax(0), diff.mean(0), torch.nan_to_num(rel.nanmean(0), nan=0.0), flat)


@torch.no_grad()
def analyze_layers(model: nn.Module, images: Sequence[Tensor], layers: Sequence[str] | None = None, *,
                   keep: Sequence[str] | None = (), chunk: int = 8, guard: float = 1e-3, progress: bool = False,
                   int8: str | Path | None = None) -> tuple[list[LayerError], dict[str, LayerCapture]]:
    """Per-layer errors of the quantized ``model`` against its float phase on ``images``; ranked worst first.

    The quantized activations are the fake-quant model's, or, with ``int8`` (a file written by
    `fqn.int8.convert_int8` from this model), the int8 model's as ONNX Runtime's integer kernels
    computed them; images then run one at a time in both. Also returns the picture data
    (`LayerCapture`, small: maps and 50k samples) of the ``keep`` layers, or of every layer when
    ``keep`` is None. Runs the images through the model twice per chunk of layers.
    """
    if current_phase(model) not in (Phase.QUANTIZE, Phase.OBSERVE_QUANTIZE):
        raise ValueError("analyze a calibrated, quantizing model (after fqn.calibrate or from a QAT checkpoint)")
    model.eval()
    names = list(layers) if layers is not None else comparable_points(model)
    unknown = set(names) - {n for n, _ in quantizers(model, "act")}
    if unknown:
        raise ValueError(f"not activation quantizers of this model: {sorted(unknown)[:3]}")
    images = list(images)
    stats, pictures = [], {}
    gen = torch.Generator().manual_seed(0)
    chunks = [names[i:i + chunk] for i in range(0, len(names), chunk)]
    if progress:
        chunks = tqdm(chunks, desc="layers", unit="chunk")
    taps = _int8_taps(int8, names) if int8 is not None else None  # one ORT session; each chunk reads its layers
    for part in chunks:
        if taps is None:
            with _capture(model, part) as ref, phase_of(model, Phase.FLOAT):
                model(images)
            with _capture(model, part) as test, phase_of(model, Phase.QUANTIZE):  # EMA ranges stay where they are
                model(images)
        else:
            ref, test = _int8_pair(model, images, part, taps)
        for name in part:
            if name not in test or len(ref[name]) != len(test[name]) or \
                    any(a.shape != b.shape for a, b in zip(ref[name], test[name])):
                continue
            r = torch.cat([a.flatten() for a in ref[name]])
            t = torch.cat([b.flatten() for b in test[name]])
            stats.append(error_stats(name, r, t, guard))
            if (keep is None or name in keep) and ref[name][0].dim() == 4:
                pictures[name] = _maps(ref[name][0], test[name][0], guard, gen)
        del ref, test
    stats.sort(key=lambda s: s.sqnr_db)
    return stats, pictures


def _int8_taps(path: str | Path, names: list[str]) -> Int8Taps:
    taps = Int8Taps(path, names)
    if len(taps.missing) == len(names):
        raise ValueError(f"{path} holds none of this model's quantizers ({names[0]}, ...): convert this checkpoint "
                         "with `fqn convert`, or leave the file out and let `fqn analyze --int8` convert it")
    return taps


def _int8_pair(model: nn.Module, images: list[Tensor], names: list[str],
               taps: Int8Taps) -> tuple[dict[str, list[Tensor]], dict[str, list[Tensor]]]:
    """Float-phase activations (hooks) and int8 ones (graph outputs of the ONNX file), image by image."""
    test: dict[str, list[Tensor]] = {}
    with _capture(model, names) as ref, phase_of(model, Phase.FLOAT):
        for img in images:
            model([img])
            for name, values in taps(img, names).items():
                test.setdefault(name, []).extend(values)
    return ref, test


def write_report(out: str | Path, stats: list[LayerError], pictures: dict[str, LayerCapture], image: Tensor,
                 target: dict[str, Tensor] | None, prediction: dict[str, Tensor] | None,
                 sensitivity: list[dict[str, Any]] | None = None, class_names: Sequence[str] | None = None,
                 source: str = "fake-quant model") -> Path:
    """PNG files, ``layers.json``, ``report.md`` and TensorBoard images under ``out``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(out / "tensorboard"))
    image, target, prediction = _enlarged(image, target, prediction)
    drawn = draw_detections(image, target, prediction, class_names, score_threshold=0.5)
    save_image(drawn.float() / 255, out / "detections.png")
    writer.add_image("analyze/detections", drawn, 0, dataformats="CHW")
    figures = {f"maps_{_slug(n)}": plot_maps(n, c) for n, c in pictures.items()}
    if pictures:
        figures["maps_average"] = plot_average_maps(pictures, tuple(image.shape[-2:]))
        figures.update({f"hexbin_{_slug(n)}": plot_hexbin(n, c.samples) for n, c in pictures.items()})
        figures["hexbin_all"] = plot_hexbin("all analysed layers", torch.cat([c.samples for c in pictures.values()]))
    for key, fig in figures.items():
        fig.savefig(out / f"{key}.png", dpi=110)
        writer.add_figure(f"analyze/{key}", fig, 0)
        plt.close(fig)
    writer.close()
    write_json(out / "layers.json", {"layers": [asdict(s) for s in stats], "sensitivity": sensitivity,
                                     "source": source, "provenance": provenance()})
    (out / "report.md").write_text(report_markdown(stats, sensitivity, source=source))
    return out


def _enlarged(image: Tensor, *dets: dict[str, Tensor] | None, min_side: int = 480) -> tuple[Any, ...]:
    """Small images (the 160 px synthetic ones) scaled up by a whole factor, boxes with them, so labels are legible."""
    k = math.ceil(min_side / min(image.shape[-2:]))
    if k <= 1:
        return (image, *dets)
    big = F.interpolate(image[None].float(), scale_factor=k, mode="nearest")[0]
    return (big, *[None if d is None else {**d, "boxes": d["boxes"] * k} for d in dets])


def _slug(name: str) -> str:
    return name.replace(".", "_")


LAYER_TABLE = [Column("layer"), Column("sqnr_db", "SQNR dB", 1), Column("mse", "MSE", fmt=".3g"),
               Column("abs_mean", "mean abs err", fmt=".3g"), Column("abs_max", "max abs err", fmt=".3g"),
               Column("rel_mean", "mean rel err", fmt=".3g"), Column("rel_p99", "p99 rel err", fmt=".3g")]
SENSITIVITY_TABLE = [Column("layer", "layer (kept float)"), Column("sqnr_db", "output SQNR dB", 1),
                     Column("cost_db", "gain dB", 2, signed=True)]


def report_markdown(stats: list[LayerError], sensitivity: list[dict[str, Any]] | None = None, worst: int = 15,
                    source: str = "fake-quant model") -> str:
    """The worst layers by SQNR, and the layer-sensitivity ranking with the keep_float patterns it suggests."""
    lines = [f"Activations of the {source} against the float phase of the same checkpoint.", "",
             markdown_table([asdict(s) for s in stats[:worst]], LAYER_TABLE)]
    if sensitivity:
        lines += ["", markdown_table(sensitivity[:worst], SENSITIVITY_TABLE)]
        lines += ["", f"keep_float: {keep_float_patterns(sensitivity)}"]
    return "\n".join(lines) + "\n"


def run_analyze(checkpoint: str | Path, out: str | Path, *, ptq_bits: int | None = None, config: str | None = None,
                calibration: str = "search", bias_correction: bool = False, n_cal: int = 20,
                head_bits: int | None = None, reconstruction: Any = None, images: int = 4,
                plot_layers: Sequence[str] | None = None, sensitivity: bool = False, layer_bits: float | None = None,
                int8: str | None = None) -> Path:
    """``fqn analyze``: the report of `analyze_layers` (and, if asked, of `layer_sensitivity` and the mixed-precision
    layer choice) for a QAT checkpoint, or a float one post-training quantized at ``ptq_bits``, on its own data."""
    out = Path(out)
    fresh_file(out / "report.md")
    data = data_for(checkpoint, config)
    model = quantized_model(checkpoint, ptq_bits, data, calibration=calibration, bias_correction=bias_correction,
                            n_cal=n_cal, head_bits=head_bits, reconstruction=reconstruction)
    data.setup("validate")
    pairs = list(itertools.islice(((img, t) for b in data.val_dataloader() for img, t in zip(*b)), max(1, images)))
    pictured = [p[0] for p in pairs]
    if int8 == "":
        int8 = str(convert_int8(model, fresh_file(out / "model_int8.onnx"), pictured[:1]))
        print(f"int8 model: {int8}")
    stats, pictures = analyze_layers(model, pictured, keep=plot_layers or None, progress=True, int8=int8)
    if not plot_layers:  # the 4 worst layers that have pictures (conv feature maps)
        worst = [s.layer for s in stats if s.layer in pictures][:4]
        pictures = {k: pictures[k] for k in worst}
    ranking = layer_sensitivity(model, pictured, progress=True) if sensitivity else None
    if int8:  # the boxes drawn come from the model whose activations were compared
        prediction = load_int8(int8)([pictured[0]])[0]
    else:
        prediction = model.eval()([pictured[0]])[0]
    if layer_bits is not None:
        write_layer_bits(model, pictured, layer_bits, out)
    source = f"int8 model {int8}" if int8 else "fake-quant model"
    write_report(out, stats, pictures, pictured[0], pairs[0][1], prediction, ranking, data.class_names, source=source)
    print(report_markdown(stats, ranking, source=source))
    print(f"pictures and tables: {out}; TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    return out


def write_layer_bits(model: nn.Module, images: Sequence[Tensor], budget: float, out: Path) -> dict[str, int]:
    """`choose_layer_bits` on a one-layer-at-a-time ranking, as a ``layer_bits:`` block to paste into a config.

    The model's own ``layer_bits`` (e.g. ``--head-bits``) come first in the block, so the pasted config keeps them.
    """
    cfg = quant_config(model)
    if min(cfg.bits_w, cfg.bits_a) >= 8:
        raise ValueError("--layer-bits: this model is already 8-bit; mixed precision raises the layers of a "
                         "lower-bit (e.g. w4a4) model to 8 bits")
    ranking = layer_sensitivity(model, images, mode="only", progress=True)
    bits = {**cfg.layer_bits, **choose_layer_bits(ranking, low=min(cfg.bits_w, cfg.bits_a), high=8, budget=budget)}
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump({"layer_bits": bits}, sort_keys=False)
    (out / "layer_bits.yaml").write_text(f"# fqn analyze --layer-bits {budget}: the layers that quantized alone at "
                                         f"{cfg.bits_w} bits add the most output noise per weight bit\n{text}")
    print(f"mixed precision, {len(bits)} layers at 8 bits within {budget:g} of the {cfg.bits_w}-bit weight storage "
          f"(model.quant.layer_bits, also in {out / 'layer_bits.yaml'}):\n{text}")
    return bits
