"""Every picture fqn draws: detections on images (TensorBoard, reports) and the activation-error figures.

The trainer's monitor and the ``fqn analyze`` report both draw from here; nothing here trains or measures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

GT_COLOR = (0, 255, 0)
PRED_COLOR = (255, 0, 0)


def _to_uint8(image: Tensor) -> Tensor:
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def _box_labels(labels: Tensor, scores: Tensor | None, class_names: Sequence[str] | None) -> list[str] | None:
    if class_names is None:
        return None
    names = [class_names[i] if 0 <= i < len(class_names) else str(i) for i in labels.tolist()]
    if scores is None:
        return names
    return [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())]


def draw_detections(image: Tensor, target: Mapping[str, Tensor] | None, pred: Mapping[str, Tensor] | None,
                    class_names: Sequence[str] | None = None, score_threshold: float = 0.5) -> Tensor:
    """A 3xHxW uint8 image with predictions (red, score >= threshold) and ground truth (green) drawn on top.

    Args:
        image: 3xHxW float image in [0, 1].
        target, pred: dicts with ``boxes`` (xyxy, pixels) and ``labels``; ``pred`` also ``scores``.
        class_names: names indexed by the model's label (0 is the background); without them no text is drawn.
        score_threshold: predictions below it are not drawn.

    Example:
        >>> img = draw_detections(torch.rand(3, 32, 32), {"boxes": torch.tensor([[2., 2., 20., 20.]]),
        ...                       "labels": torch.tensor([1])}, None)
        >>> img.dtype, tuple(img.shape), tuple(img[:, 2, 10].tolist())
        (torch.uint8, (3, 32, 32), (0, 255, 0))
    """
    out = _to_uint8(image)
    if pred is not None:
        keep = pred["scores"].detach().cpu() >= score_threshold
        boxes = pred["boxes"].detach().cpu()[keep]
        if len(boxes):
            labels = _box_labels(pred["labels"].cpu()[keep], pred["scores"].cpu()[keep], class_names)
            out = draw_bounding_boxes(out, boxes, labels=labels, colors=PRED_COLOR, width=1)
    if target is not None and len(target["boxes"]):
        labels = _box_labels(target["labels"].cpu(), None, class_names)
        out = draw_bounding_boxes(out, target["boxes"].detach().cpu(), labels=labels, colors=GT_COLOR, width=1)
    return out


def _figure(ncols: int, width: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, 3.6))


def plot_maps(name: str, cap: Any):
    """Per-channel max of the float and quantized activation, and the absolute / relative error maps."""
    fig, axes = _figure(4)
    for ax, (title, m) in zip(axes, [("float: max over channels", cap.float_max),
                                     ("quantized: max over channels", cap.quant_max),
                                     ("|error|: mean over channels", cap.abs_map),
                                     ("relative error: mean over channels", cap.rel_map)]):
        # colours of the error maps stop at their 99th percentile, so a few hot pixels do not flatten the rest
        vmax = float(torch.quantile(m.flatten().float(), 0.99)) if m is cap.rel_map else None
        im = ax.imshow(m.numpy(), cmap="viridis", vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    return fig


def plot_average_maps(pictures: dict[str, Any], size: tuple[int, int]):
    """The same maps averaged over layers, each resized to ``size`` and normalised by its own maximum."""
    def avg(attr: str) -> Tensor:
        maps = [getattr(c, attr) for c in pictures.values()]
        maps = [F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0] for m in maps]
        return torch.stack([m / m.max().clamp_min(1e-12) for m in maps]).mean(0)

    fig, axes = _figure(3)
    for ax, (title, attr) in zip(axes, [("float max, mean over layers", "float_max"),
                                        ("|error|, mean over layers", "abs_map"),
                                        ("relative error, mean over layers", "rel_map")]):
        im = ax.imshow(avg(attr).numpy(), cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_hexbin(name: str, samples: Tensor):
    """Absolute and relative error against the float activation value, log density."""
    fig, axes = _figure(2, 5.0)
    x = samples[:, 0].numpy()
    hb = axes[0].hexbin(x, samples[:, 1].numpy(), gridsize=60, bins="log", cmap="magma", mincnt=1)
    fig.colorbar(hb, ax=axes[0], label="count (log)")
    axes[0].set(xlabel="float activation", ylabel="|quantized - float|", title="absolute error")
    ok = ~torch.isnan(samples[:, 2])
    if ok.any():
        hb = axes[1].hexbin(samples[ok, 0].numpy(), samples[ok, 2].clamp_max(10).numpy(), gridsize=60, bins="log",
                            cmap="magma", mincnt=1)
        fig.colorbar(hb, ax=axes[1], label="count (log)")
    axes[1].set(xlabel="float activation", ylabel="|error| / |float| (clipped at 10)", title="relative error")
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    return fig
