"""COCO-format detection data: a JSON annotation file plus an image folder, read with pycocotools.

Two label modes:

* ``contiguous`` (custom data sets, a new box predictor): category ids are remapped by *name* to labels 1..C
  (0 is background, as torchvision expects), so a train and a val file that number their categories
  differently still agree.
* ``category_id`` (torchvision's COCO-pretrained 91-way head): the category id *is* the label, as the
  pretrained head was trained (id 13, stop sign, is label 13; ids 12, 26, 29, ... are unused). Renumbering
  would silently misalign every class of the pretrained head.

The ``data.coco_labels`` setting chooses between them (``auto``: by the head's size); :func:`label_space` applies
it, with the checks on ``class_names`` that each mode needs, so the data module only passes the settings on.

Crowd annotations are ignored (torchvision has no crowd handling in training); images without annotations
stay in as negatives.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pycocotools.coco import COCO

from fqn.data.sanitize import (
    SKIP_HINT,
    DataError,
    FileDetection,
    Sample,
    SanitizeStats,
    check_image_file,
    collect_samples,
    image_size,
    is_finite_box,
    sanitize_boxes,
)


def load_coco(ann_file: str) -> COCO:
    """A pycocotools index of ``ann_file``, quietly (pycocotools prints to stdout), or DataError naming the file."""
    if not os.path.isfile(ann_file):
        raise DataError(f"{ann_file}: COCO annotation file is missing", "missing annotations")
    try:
        with open(ann_file, encoding="utf-8") as f:
            dataset = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{ann_file}: not a readable JSON file ({e})", "bad annotations") from e
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise DataError(f"{ann_file}: not a COCO detection file (needs 'images', 'annotations', 'categories')",
                        "bad annotations")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def category_names(coco: COCO, ann_file: str) -> dict[int, str]:
    """``{category id: name}`` in id order; duplicate names would make the name-based label map ambiguous."""
    names = {int(c["id"]): str(c["name"]) for c in sorted(coco.dataset.get("categories", []), key=lambda c: c["id"])}
    if not names:
        raise DataError(f"{ann_file}: the file has no categories", "bad annotations")
    if len(set(names.values())) != len(names):
        raise DataError(f"{ann_file}: duplicate category names {sorted(names.values())}", "bad annotations")
    return names


LABEL_MODES = ("contiguous", "category_id")
COCO_HEAD_CLASSES = 91  # torchvision's COCO detection head: background + category ids 1..90


def torchvision_coco_names() -> list[str]:
    """The names of torchvision's COCO head, label ``i + 1`` is ``names[i]`` ("N/A" for unused ids); no download."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:])


def coco_class_names(ann_file: str, label_mode: str = "contiguous", head_classes: int | None = None) -> list[str]:
    """The class list of ``ann_file``, label ``i + 1`` is ``names[i]``: the default of :class:`CocoDetection`."""
    return label_names(category_names(load_coco(ann_file), ann_file), ann_file, label_mode, head_classes)


def label_names(cats: dict[int, str], ann_file: str, label_mode: str = "contiguous",
                head_classes: int | None = None) -> list[str]:
    """Names by label for the categories ``cats`` (``{id: name}``) of ``ann_file``.

    ``contiguous``: every category name ordered by id. ``category_id``: one entry per label of the head
    (``head_classes - 1``, default: up to the largest id), the file's name at its id and "N/A" elsewhere.

    Example:
        >>> cats = {1: "person", 3: "car"}
        >>> label_names(cats, "ann.json")  # labels 1, 2
        ['person', 'car']
        >>> label_names(cats, "ann.json", "category_id", head_classes=5)  # labels 1..4 = category ids
        ['person', 'N/A', 'car', 'N/A']
    """
    if label_mode == "contiguous":
        return list(cats.values())
    if label_mode != "category_id":
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    size = head_classes if head_classes is not None else max(cats) + 1
    misfit = {cid: name for cid, name in cats.items() if not 1 <= cid < size}
    if misfit:
        raise DataError(f"{ann_file}: categories {misfit} do not fit a {size}-class head, whose labels are the "
                        f"category ids 1..{size - 1}; for your own classes set data.coco_labels: contiguous and "
                        f"model.num_classes: {len(cats) + 1} (a new box predictor)", "bad class names")
    return [cats.get(i, "N/A") for i in range(1, size)]


COCO_LABELS = ("auto", "category_id", "contiguous")  # the data.coco_labels setting: a label mode, or auto


def resolve_label_mode(coco_labels: str = "auto", head_classes: int | None = None) -> str:
    """``category_id`` or ``contiguous``: the ``coco_labels`` setting with ``auto`` decided by the head's size.

    ``auto`` keeps the category ids as labels exactly when the detector has torchvision's 91-class COCO head, the
    one head that renumbering would silently misalign; any other head is new, and labels its classes 1..C.

    Example:
        >>> resolve_label_mode("auto", 91), resolve_label_mode("auto", 4), resolve_label_mode("category_id", 4)
        ('category_id', 'contiguous', 'category_id')
    """
    if coco_labels not in COCO_LABELS:
        raise ValueError(f"coco_labels must be one of {COCO_LABELS}, got {coco_labels!r}")
    if coco_labels != "auto":
        return coco_labels
    return "category_id" if head_classes == COCO_HEAD_CLASSES else "contiguous"


@dataclass(frozen=True)
class LabelSpace:
    """What a detector trained on a COCO file predicts: the label mode of :class:`CocoDetection`, names by label."""

    mode: str
    class_names: list[str]


def label_space(ann_file: str, class_names: list[str] | None = None, coco_labels: str = "auto",
                head_classes: int | None = None) -> LabelSpace:
    """The labels of a detector trained on the COCO file ``ann_file``, from the ``data:`` settings.

    Known before any image is read, so the head's size is checked at start-up. ``contiguous``: ``class_names``, or
    every category of the file (each name is checked by :class:`CocoDetection`). ``category_id``: one name per label
    of a ``head_classes``-way head; ``class_names`` would renumber, so it is an error; with ``auto`` the file must be
    COCO's own label space (a custom file under the 91-way head is almost surely a forgotten ``model.num_classes``).

    Args:
        ann_file: the training JSON; its categories fix the labels (the val file is matched to them).
        class_names: the classes asked for (``data.class_names``), or None.
        coco_labels: ``auto``, ``category_id`` or ``contiguous`` (``data.coco_labels``).
        head_classes: the detector's ``num_classes``, background included (``model.num_classes``).
    """
    mode = resolve_label_mode(coco_labels, head_classes)
    if mode == "contiguous":
        return LabelSpace(mode, list(class_names) if class_names is not None else coco_class_names(ann_file))
    if class_names is not None:
        raise ValueError("class_names selects and renumbers classes, which needs coco_labels: contiguous; "
                         "with category ids as labels every category of the file keeps its id")
    cats = category_names(load_coco(ann_file), ann_file)
    if coco_labels == "auto":
        coco = torchvision_coco_names()
        foreign = {cid: name for cid, name in cats.items()
                   if not 1 <= cid <= len(coco) or coco[cid - 1].lower() != name.lower()}
        if foreign:
            raise ValueError(
                f"{ann_file}: categories {foreign} are not COCO's at those ids, but the model has torchvision's "
                f"91-class COCO head (labels = COCO category ids). For your own classes set "
                f"model.num_classes: {len(cats) + 1} (a new box predictor; labels 1..{len(cats)} by name); "
                "to keep the ids as labels anyway set data.coco_labels: category_id")
    return LabelSpace(mode, label_names(cats, ann_file, "category_id", head_classes))


class CocoDetection(FileDetection):
    """Items ``(image 3xHxW float in [0, 1], {"boxes" xyxy float32, "labels" int64 1..C, "image_id"})``.

    Args:
        image_dir: folder the ``file_name`` entries of the JSON are relative to.
        ann_file: the COCO JSON file.
        class_names: the classes to train, label ``i + 1`` for ``class_names[i]``; default: every category of the
            file in category-id order. Each name must be a category of the file. With ``label_mode="category_id"``
            the list of the head's labels (see `coco_class_names`): the file's names must sit at their ids.
        label_mode: ``contiguous`` (labels 1..C by name) or ``category_id`` (the category id is the label, for
            torchvision's COCO-pretrained head).
        transforms: called as ``transforms(image, target)`` on every item (e.g. :class:`TrainAugment`).
        skip_bad: skip (and count in ``stats``) images that are missing, unreadable or carry an annotation outside
            ``class_names``, instead of raising :class:`DataError`.

    Example:
        >>> ds = CocoDetection("data/val", "data/annotations/val.json")  # doctest: +SKIP
        >>> image, target = ds[0]  # doctest: +SKIP
    """

    def __init__(self, image_dir: str, ann_file: str, class_names: list[str] | None = None,
                 transforms: Callable | None = None, skip_bad: bool = False, label_mode: str = "contiguous") -> None:
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        coco = load_coco(ann_file)
        cats = category_names(coco, ann_file)
        if label_mode == "category_id":
            names = list(class_names) if class_names is not None else label_names(cats, ann_file, label_mode)
            moved = {cid: name for cid, name in cats.items() if cid > len(names) or names[cid - 1] != name}
            if moved:
                raise DataError(f"{ann_file}: with category ids as labels, category {moved} must match the head's "
                                f"labels {dict(enumerate(names, 1))}", "bad class names")
            label_of = {cid: cid for cid in cats}
        else:
            names = list(class_names) if class_names is not None else list(cats.values())
            unknown = [n for n in names if n not in cats.values()]
            if unknown or not names or len(set(names)) != len(names):
                raise DataError(f"{ann_file}: class_names {names} must be distinct categories of this file; "
                                f"not found: {unknown}; the file has {list(cats.values())}", "bad class names")
            label_of = {cid: names.index(name) + 1 for cid, name in cats.items() if name in names}
        self.ann_file = ann_file
        self.image_dir = image_dir
        self.label_mode = label_mode
        self._cats = cats
        self._label_of = label_of
        stats = SanitizeStats()
        samples = collect_samples(sorted(coco.imgs), lambda i: self._sample(coco, i, names, stats), stats, skip_bad)
        super().__init__(samples, names, stats, f"COCO {ann_file}", transforms, skip_bad)

    def _sample(self, coco: COCO, img_id: int, names: list[str], stats: SanitizeStats) -> Sample:
        """Check one image entry and its annotations; DataError (naming the files) for what cannot be repaired."""
        info = coco.imgs[img_id]
        path = os.path.join(self.image_dir, str(info.get("file_name", "")))
        check_image_file(path)
        boxes, labels = [], []
        for ann in coco.imgToAnns.get(img_id, []):
            if ann.get("iscrowd", 0):
                continue
            labels.append(self._label(ann, path, names))
            bbox = ann.get("bbox")
            if is_finite_box(bbox):
                x, y, w, h = (float(v) for v in bbox)
                boxes.append([x, y, x + w, y + h])
            else:  # keep rows aligned with labels; sanitize_boxes drops and counts it as non-finite
                boxes.append([float("nan")] * 4)
        if "width" in info and "height" in info:
            size = (int(info["width"]), int(info["height"]))
        else:
            size = image_size(path)
        kept, keep = sanitize_boxes(boxes, size[0], size[1], stats)
        label_tensor = torch.tensor(labels, dtype=torch.int64)[keep]
        return Sample(path, kept, label_tensor, int(img_id), size)

    def _label(self, ann: dict, path: str, names: list[str]) -> int:
        cid = ann.get("category_id")
        if cid not in self._cats:
            raise DataError(f"{self.ann_file}: annotation {ann.get('id')} of {path} has category_id {cid!r}, "
                            f"which is not in the file's categories {sorted(self._cats)}", "unknown label")
        if cid not in self._label_of:
            raise DataError(f"{self.ann_file}: annotation {ann.get('id')} of {path} has category "
                            f"{self._cats[cid]!r} (id {cid}), which is not in class_names {names}", "unknown label",
                            fix=f"add it to class_names (data.class_names), or {SKIP_HINT}")
        return self._label_of[cid]
