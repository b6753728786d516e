"""Write the embedded synthetic data set to disk in COCO format (PNG images + one JSON per split).

Useful to try the ``coco`` data source end to end without a download, or to look at the scenes in any COCO viewer.
The scenes come from ``fqn.data.synthetic``; this script only serialises them.

Usage:
    python tools/export_synthetic_coco.py OUT_DIR --num-train 200 --num-val 50 --image-size 160 --num-classes 4

writes ``OUT_DIR/{train,val}/*.png`` and ``OUT_DIR/annotations/{train,val}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import numpy as np
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from fqn.data.synthetic import SyntheticConfig, SyntheticDetection


def to_png(image: Tensor, path: str) -> None:
    """Save a 3xHxW float image in [0, 1] as an 8-bit PNG (rounding: at most 0.5/255 off)."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(array)).save(path)


def coco_dict(dataset: SyntheticDetection, image_dir: str, progress: bool) -> dict:
    """The COCO dictionary of one split, writing its PNGs into ``image_dir`` on the way.

    Image ids are the synthetic indices (as ``SyntheticDetection`` reports them); annotation ids start at 1 because
    pycocotools' COCOeval treats id 0 as "no match".
    """
    images, annotations = [], []
    for index in tqdm(range(len(dataset)), desc=f"synthetic {dataset.split}", disable=not progress):
        image, target = dataset[index]
        file_name = f"{index:06d}.png"
        to_png(image, os.path.join(image_dir, file_name))
        images.append({"id": index, "file_name": file_name, "width": image.shape[2], "height": image.shape[1]})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": index, "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(dataset.class_names)]
    info = {"description": f"fqn synthetic shapes, split {dataset.split!r}", "version": "1.0",
            "fqn_synthetic": {"split": dataset.split, **asdict(dataset.cfg)}}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def synthetic_config(image_size: int = 160, num_classes: int = 4, seed: int = 0) -> SyntheticConfig:
    """The generator settings for an export: the defaults, with object sizes capped to fit small images."""
    max_size = min(SyntheticConfig.max_size, image_size)
    return SyntheticConfig(image_size=image_size, num_classes=num_classes, seed=seed,
                           min_size=min(SyntheticConfig.min_size, max_size), max_size=max_size)


def export(out_dir: str, num_train: int = 200, num_val: int = 50, image_size: int = 160, num_classes: int = 4,
           seed: int = 0, progress: bool = True) -> dict[str, dict]:
    """Write both splits under ``out_dir``; returns per split the image folder, JSON path, counts and the config.

    The images are exactly ``SyntheticDetection(n, synthetic_config(image_size, num_classes, seed), split)``.

    Example:
        >>> export("/tmp/synthetic_coco", num_train=4, num_val=2, progress=False)["val"]["images"]  # doctest: +SKIP
        2
    """
    cfg = synthetic_config(image_size, num_classes, seed)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    written = {}
    for split, length in (("train", num_train), ("val", num_val)):
        image_dir = os.path.join(out_dir, split)
        os.makedirs(image_dir, exist_ok=True)
        data = coco_dict(SyntheticDetection(length, cfg, split), image_dir, progress)
        ann_file = os.path.join(out_dir, "annotations", f"{split}.json")
        with open(ann_file, "w", encoding="utf-8") as f:
            json.dump(data, f)
        written[split] = {"image_dir": image_dir, "ann_file": ann_file, "images": len(data["images"]),
                          "annotations": len(data["annotations"]), "config": cfg}
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="output folder (created if needed)")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        written = export(args.out_dir, args.num_train, args.num_val, args.image_size, args.num_classes, args.seed)
    except ValueError as e:  # SyntheticConfig / SyntheticDetection validate the numbers
        parser.error(str(e))
    for split, w in written.items():
        print(f"{split}: {w['images']} images, {w['annotations']} boxes -> {w['image_dir']}/, {w['ann_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
