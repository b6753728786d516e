"""Writers of tiny on-disk data sets for the reader tests: PNGs, a COCO JSON, KITTI label files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


def write_png(path: str | Path, width: int, height: int, seed: int = 0) -> np.ndarray:
    """A random RGB PNG; returns the HxWx3 uint8 pixels written."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def write_garbage(path: str | Path) -> None:
    """A file named like an image that PIL cannot decode."""
    Path(path).write_bytes(b"this is not a png at all" * 10)


def truncate(path: str | Path) -> None:
    """Cut a valid image file in half: the header still reads, the pixels do not."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def write_coco(root: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> tuple[str, str]:
    """``root/images/<file_name>`` PNGs (random pixels of each image's size) and ``root/ann.json``."""
    image_dir = root / "images"
    for i, img in enumerate(images):
        write_png(image_dir / img["file_name"], img["width"], img["height"], seed=i)
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(image_dir), str(ann_file)


def kitti_line(kind: str, box: tuple[float, float, float, float], score: float | None = None) -> str:
    """One KITTI label line: type, truncated, occluded, alpha, the 2-D box, 3-D size/location/rotation[, score]."""
    fields = [kind, "0.00", "0", "-1.57", *(f"{v:.2f}" for v in box), "1.50", "1.60", "3.90", "1.0", "1.5", "20.0",
              "0.10"]
    return " ".join(fields + ([f"{score:.2f}"] if score is not None else []))


def write_kitti(root: Path, frames: dict[str, list[str]], size: tuple[int, int] = (64, 40)) -> Path:
    """``root/image_2/<id>.png`` and ``root/label_2/<id>.txt`` with the given label lines per frame id."""
    for i, (frame, lines) in enumerate(frames.items()):
        write_png(root / "image_2" / f"{frame}.png", size[0], size[1], seed=i)
        (root / "label_2").mkdir(parents=True, exist_ok=True)
        (root / "label_2" / f"{frame}.txt").write_text("".join(line + "\n" for line in lines))
    return root
