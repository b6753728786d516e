"""KITTI object detection (the ``training/`` layout: ``image_2/*.png`` and ``label_2/*.txt``).

KITTI ships no validation split, so one is drawn from the training frames by a seeded shuffle; the split depends
only on the frame ids and the seed, never on which frames turn out to be bad, so ``skip_bad`` cannot move a frame
from val to train. Label lines are ``type truncated occluded alpha x1 y1 x2 y2 h w l x y z ry [score]``; only the
type and the 2-D box are used.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable

import torch

from fqn.data.sanitize import (
    SKIP_HINT,
    DataError,
    FileDetection,
    Sample,
    SanitizeStats,
    check_label,
    collect_samples,
    image_size,
    sanitize_boxes,
)

#: KITTI type -> our class name; ``None`` ignores the type (its objects are neither trained nor penalised).
DEFAULT_CLASS_MAP: dict[str, str | None] = {
    "Car": "Car", "Van": "Van", "Truck": "Truck", "Pedestrian": "Pedestrian", "Person_sitting": "Person_sitting",
    "Cyclist": "Cyclist", "Tram": "Tram", "Misc": None,
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "all")


def kitti_class_names(class_map: dict[str, str | None] | None = None) -> list[str]:
    """The classes a class map produces, sorted alphabetically: stable whatever order the map was written in."""
    cmap = DEFAULT_CLASS_MAP if class_map is None else class_map
    return sorted({name for name in cmap.values() if name is not None})


def frame_ids(root: str) -> list[str]:
    """Sorted frame ids found in ``image_2`` or ``label_2``: a frame with only one of the two is reported later."""
    ids: set[str] = set()
    for sub, exts in (("image_2", IMAGE_EXTENSIONS), ("label_2", (".txt",))):
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: KITTI folder is missing (expected {root}/image_2 and {root}/label_2)",
                            "missing folder")
        ids.update(os.path.splitext(f)[0] for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in exts)
    return sorted(ids)


def split_frames(ids: Iterable[str], split: str, val_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """The frame ids of ``split``: sort, shuffle with ``random.Random(seed)``, the last ``val_fraction`` is val.

    Deterministic and disjoint: train and val always cover "all" exactly once.

    Example:
        >>> split_frames([f"{i:06d}" for i in range(10)], "val", 0.2, seed=0)
        ['000006', '000009']
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n_val = round(len(order) * val_fraction)
    if 0 < val_fraction < 1 and len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)  # both splits non-empty whenever that is possible
    chosen = {"train": order[: len(order) - n_val], "val": order[len(order) - n_val:], "all": order}[split]
    return sorted(chosen)


def parse_label_file(path: str, class_map: dict[str, str | None], class_names: list[str]) -> tuple[list, list]:
    """Boxes (xyxy) and 1-based labels of one label file; DataError naming the file and line for a bad line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: label file is missing", "missing label") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: label file is unreadable ({e})", "bad label file") from e
    boxes, labels = [], []
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0] == "DontCare":
            continue
        where = f"{path} line {lineno}"
        if len(fields) not in (15, 16):
            raise DataError(f"{where}: expected 15 fields (16 with a score), got {len(fields)}: {line!r}",
                            "malformed label")
        try:
            numbers = [float(v) for v in fields[1:]]
        except ValueError:
            raise DataError(f"{where}: non-numeric field in {line!r}", "malformed label") from None
        if fields[0] not in class_map:
            raise DataError(f"{where}: KITTI type {fields[0]!r} is not in the class map {sorted(class_map)}",
                            "unknown label", fix=f"add it to the class map (data.kitti_class_map; null ignores its "
                            f"objects), or {SKIP_HINT}")
        name = class_map[fields[0]]
        if name is None:
            continue
        labels.append(check_label(name, class_names, where))
        boxes.append(numbers[3:7])
    return boxes, labels


def _image_path(root: str, frame: str) -> str:
    for ext in IMAGE_EXTENSIONS:
        path = os.path.join(root, "image_2", frame + ext)
        if os.path.isfile(path):
            return path
    return os.path.join(root, "image_2", frame + ".png")


class KittiDetection(FileDetection):
    """KITTI frames of one split as ``(image, {"boxes", "labels", "image_id"})`` items.

    Args:
        root: folder holding ``image_2/`` and ``label_2/`` (KITTI's ``training/``).
        split: "train", "val" or "all"; see :func:`split_frames`.
        class_map: KITTI type -> class name, ``None`` to ignore a type; default :data:`DEFAULT_CLASS_MAP`.
            ``DontCare`` is always ignored. ``class_names`` is :func:`kitti_class_names` of the map.
        val_fraction, split_seed: the seeded split.
        transforms: called as ``transforms(image, target)`` on every item.
        skip_bad: skip (and count in ``stats``) frames with a missing/corrupt image, a missing or malformed label
            file, or a type outside the map, instead of raising :class:`DataError`.

    Example:
        >>> ds = KittiDetection("kitti/training", split="val", class_map={"Car": "car", "Van": "car"})  # doctest: +SKIP
    """

    def __init__(self, root: str, split: str = "train", class_map: dict[str, str | None] | None = None,
                 val_fraction: float = 0.2, split_seed: int = 0, transforms: Callable | None = None,
                 skip_bad: bool = False) -> None:
        self.root = root
        self.split = split
        self.class_map = dict(DEFAULT_CLASS_MAP if class_map is None else class_map)
        names = kitti_class_names(self.class_map)
        if not names:
            raise ValueError(f"the KITTI class map maps every type to None: {self.class_map}")
        all_ids = frame_ids(root)
        position = {frame: i for i, frame in enumerate(all_ids)}
        stats = SanitizeStats()

        def build(frame: str) -> Sample:
            return self._sample(frame, int(frame) if frame.isdigit() else position[frame], names, stats)

        samples = collect_samples(split_frames(all_ids, split, val_fraction, split_seed), build, stats, skip_bad)
        super().__init__(samples, names, stats, f"KITTI {root} ({split})", transforms, skip_bad)

    def _sample(self, frame: str, image_id: int, names: list[str], stats: SanitizeStats) -> Sample:
        boxes, labels = parse_label_file(os.path.join(self.root, "label_2", frame + ".txt"), self.class_map, names)
        path = _image_path(self.root, frame)
        width, height = image_size(path)
        kept, keep = sanitize_boxes(boxes, width, height, stats)
        return Sample(path, kept, torch.tensor(labels, dtype=torch.int64)[keep], image_id, (width, height))
