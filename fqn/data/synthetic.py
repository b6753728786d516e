"""The embedded synthetic detection benchmark: procedural scenes, no download.

Each image is drawn deterministically from ``(seed, split, index)``: a smooth
textured background, unlabeled clutter (strokes and blobs), and 1..N objects
of ``num_classes`` shape classes (rectangle, disk, triangle, cross, ring,
diamond, hexagon, bar-pair) in random colours, sizes from small to large and
partial overlaps. The class is in the shape, not the colour, so a detector has
to learn form; small objects and thin shapes (cross, ring, bars) are what
low-bit quantization loses first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

SHAPES = ("rectangle", "disk", "triangle", "cross", "ring", "diamond", "hexagon", "bars")
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003, "cal": 3_000_017}


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator; the defaults train to a clearly non-trivial mAP in minutes on a CPU.

    Args:
        image_size: square image side in pixels.
        num_classes: object classes (without background), 1..8, taken from `SHAPES` in order.
        min_objects, max_objects: objects per image.
        min_size, max_size: object box side range in pixels (log-uniform: many small ones).
        clutter: unlabeled distractor strokes and blobs per image.
        noise: std of the per-pixel noise.
        seed: the data set's seed; splits draw from disjoint streams.
    """

    image_size: int = 160
    num_classes: int = 4
    min_objects: int = 1
    max_objects: int = 5
    min_size: int = 10
    max_size: int = 80
    clutter: int = 3
    noise: float = 0.04
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"synthetic num_classes must be in 1..{len(SHAPES)}, got {self.num_classes}")
        if not 32 <= self.image_size <= 4096:
            raise ValueError(f"synthetic image_size must be in 32..4096, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 4 <= self.min_size <= self.max_size <= self.image_size:
            raise ValueError(f"need 4 <= min_size <= max_size <= image_size, got {self.min_size}, {self.max_size}")
        if self.clutter < 0 or self.noise < 0:
            raise ValueError("clutter and noise must be >= 0")

    @property
    def class_names(self) -> list[str]:
        return list(SHAPES[: self.num_classes])


def _shape_mask(kind: str, xx: Tensor, yy: Tensor, cx: float, cy: float, w: float, h: float, angle: float) -> Tensor:
    """Boolean mask of one shape inscribed in the w x h box centred at (cx, cy)."""
    u, v = (xx - cx) / (w / 2), (yy - cy) / (h / 2)  # box-normalised coordinates in [-1, 1]
    if kind == "rectangle":
        return (u.abs() <= 1) & (v.abs() <= 1)
    if kind == "disk":
        return u**2 + v**2 <= 1
    if kind == "triangle":
        return (v <= 1) & (v >= 2 * u.abs() - 1)
    if kind == "cross":
        return ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1))
    if kind == "ring":
        r2 = u**2 + v**2
        return (r2 <= 1) & (r2 >= 0.35)
    if kind == "diamond":
        return u.abs() + v.abs() <= 1
    if kind == "hexagon":
        return (v.abs() <= 0.87) & (0.87 * u.abs() + 0.5 * v.abs() <= 0.87)
    if kind == "bars":
        return (u.abs() <= 1) & (((v + 0.6).abs() <= 0.28) | ((v - 0.6).abs() <= 0.28))
    raise ValueError(kind)


def _colour(g: torch.Generator, avoid: Tensor) -> Tensor:
    """A random colour at least 0.35 away (L2 in RGB) from the local background colour."""
    for _ in range(20):
        c = torch.rand(3, generator=g)
        if torch.linalg.vector_norm(c - avoid) > 0.35:
            return c
    return 1 - avoid


def render(index: int, cfg: SyntheticConfig, split: str = "train") -> tuple[Tensor, Tensor, Tensor]:
    """Image (3xHxW in [0, 1]), boxes (N x 4, xyxy pixels) and labels (N, 1-based) of one scene."""
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + _SPLIT_OFFSET[split] + index)
    s = cfg.image_size
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32) + 0.5, torch.arange(s, dtype=torch.float32) + 0.5,
                            indexing="ij")
    c0, c1 = torch.rand(3, generator=g) * 0.8 + 0.1, torch.rand(3, generator=g) * 0.8 + 0.1
    t = (xx * math.cos(torch.rand(1, generator=g).item() * 6.28) + yy) / (2 * s)
    img = c0.view(3, 1, 1) * (1 - t) + c1.view(3, 1, 1) * t
    bg_mean = img.mean(dim=(1, 2))
    for _ in range(cfg.clutter):  # unlabeled strokes and blobs
        x0, y0, x1, y1 = (torch.rand(4, generator=g) * s).tolist()
        if torch.rand(1, generator=g) < 0.5:
            d = ((xx - x0) * (y1 - y0) - (yy - y0) * (x1 - x0)).abs() / max(math.hypot(x1 - x0, y1 - y0), 1.0)
            inside = ((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0)).clamp(min=0) <= (x1 - x0) ** 2 + (y1 - y0) ** 2
            mask = (d <= 1.0 + torch.rand(1, generator=g).item()) & inside
        else:
            r = 2 + torch.rand(1, generator=g).item() * 4
            mask = (xx - x0) ** 2 + (yy - y0) ** 2 <= r * r
        img = torch.where(mask, torch.rand(3, 1, 1, generator=g), img)
    n = int(torch.randint(cfg.min_objects, cfg.max_objects + 1, (1,), generator=g))
    boxes: list[list[float]] = []
    labels: list[int] = []
    for _ in range(n * 4):  # rejection sampling of placements with little overlap
        if len(boxes) == n:
            break
        size = math.exp(math.log(cfg.min_size) + torch.rand(1, generator=g).item()
                        * (math.log(cfg.max_size) - math.log(cfg.min_size)))
        aspect = math.exp((torch.rand(1, generator=g).item() - 0.5) * 0.8)
        w, h = min(size * aspect, s - 2), min(size / aspect, s - 2)
        cx = w / 2 + 1 + torch.rand(1, generator=g).item() * (s - w - 2)
        cy = h / 2 + 1 + torch.rand(1, generator=g).item() * (s - h - 2)
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        if any(_iou(box, b) > 0.25 for b in boxes):
            continue
        cls = int(torch.randint(0, cfg.num_classes, (1,), generator=g))
        mask = _shape_mask(SHAPES[cls], xx, yy, cx, cy, w, h, 0.0)
        if mask.sum() < 4:
            continue
        local = img[:, int(box[1]):int(box[3]) + 1, int(box[0]):int(box[2]) + 1].mean(dim=(1, 2))
        colour = _colour(g, local if local.numel() == 3 else bg_mean)
        img = torch.where(mask, colour.view(3, 1, 1), img)
        ys, xs = torch.nonzero(mask, as_tuple=True)  # the tight box of the drawn pixels
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1])
        labels.append(cls + 1)
    img = (img + cfg.noise * torch.randn(img.shape, generator=g)).clamp(0, 1)
    return img, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64)


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class SyntheticDetection(Dataset):
    """``length`` deterministic scenes of one split; items are ``(image, target)`` as torchvision detection uses."""

    def __init__(self, length: int, cfg: SyntheticConfig | None = None, split: str = "train") -> None:
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split must be one of {sorted(_SPLIT_OFFSET)}, got {split!r}")
        if length < 1:
            raise ValueError(f"a synthetic split needs at least one image, got length={length}")
        self.cfg = cfg or SyntheticConfig()
        self.length = length
        self.split = split
        self.class_names = self.cfg.class_names

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        img, boxes, labels = render(index, self.cfg, self.split)
        return img, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(index)}


def synthetic_scenes(n: int, size: int = 256, seed: int = 0) -> list[Tensor]:
    """``n`` images of the embedded synthetic benchmark (its ``cal`` split, disjoint from train/val)."""
    cfg = SyntheticConfig(image_size=size, max_size=min(80, size), seed=seed)
    return [render(i, cfg, "cal")[0] for i in range(n)]
