"""The one place that checks a detection sample, so every reader fails (or skips) the same way.

Readers call :func:`sanitize_boxes` when they build their index and :func:`load_image` when they load an item.
Bad geometry is repaired and counted (one warning per data set, not one per box); bad *data* (a label outside the
class map, a missing or unreadable image) raises :class:`DataError` naming the file, or is skipped and counted when
the user asked for ``skip_bad``. Either way nothing reaches torchvision that would crash it from deep inside.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

#: What PIL raises for files that exist but are not a readable image (truncated, garbage, broken chunks).
_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, zlib.error, Image.DecompressionBombError)


#: The reasons a sample can be skipped for with ``skip_bad``; a DataError of one of them says so.
SKIPPABLE = frozenset({"missing label", "bad label file", "malformed label", "unknown label", "missing image",
                       "corrupt image", "image size mismatch"})
SKIP_HINT = "set skip_bad (data.skip_bad: true in a config) to skip such samples"


class DataError(ValueError):
    """Bad input data; the message names the file, what is wrong with it and what to do.

    ``reason`` is a short category ("missing image", "unknown label", ...) used to count skipped samples.
    ``fix`` says what to do; by default, for a sample ``skip_bad`` can skip, "fix the file, or set skip_bad".
    ``str(error)`` is ``message; fix``; ``error.message`` alone is what a skipped sample is counted with.

    Example:
        >>> str(DataError("a.txt line 3: 14 fields", "malformed label", fix="give it 15"))
        'a.txt line 3: 14 fields; give it 15'
        >>> DataError("a/1.png: image file is missing", "missing image").fix
        'fix or restore the file, or set skip_bad (data.skip_bad: true in a config) to skip such samples'
    """

    def __init__(self, message: str, reason: str = "bad sample", fix: str | None = None) -> None:
        if fix is None and reason in SKIPPABLE:
            fix = f"fix or restore the file, or {SKIP_HINT}"
        super().__init__(f"{message}; {fix}" if fix else message)
        self.message = message
        self.reason = reason
        self.fix = fix


@dataclass
class SanitizeStats:
    """What sanitizing a data set changed: clipped and dropped boxes, skipped samples by reason.

    Counted rather than logged one by one, so a data set with thousands of slightly-out-of-image boxes gives one
    readable warning instead of a flood.
    """

    boxes: int = 0
    clipped: int = 0
    dropped_degenerate: int = 0
    dropped_nonfinite: int = 0
    skipped: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.dropped_degenerate + self.dropped_nonfinite

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, message: str) -> None:
        """Count one skipped sample and keep its message (naming the file) for the summary and for callers."""
        self.skipped[reason] += 1
        self.messages.append(message)

    def clean(self) -> bool:
        return self.clipped == 0 and self.dropped == 0 and self.num_skipped == 0

    def summary(self) -> str:
        """One line: ``"12 boxes: 2 clipped, 1 dropped (1 degenerate, 0 non-finite); 1 sample skipped (...)"``."""
        text = (f"{self.boxes} boxes: {self.clipped} clipped, {self.dropped} dropped "
                f"({self.dropped_degenerate} degenerate, {self.dropped_nonfinite} non-finite)")
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            more = f" | ... {len(self.messages) - 3} more" if len(self.messages) > 3 else ""
            text += f"; {self.num_skipped} samples skipped ({reasons}): " + " | ".join(self.messages[:3]) + more
        return text

    def log(self, name: str) -> None:
        """Warn once for the data set ``name`` when anything was changed or skipped; stay silent otherwise."""
        if not self.clean():
            log.warning("%s: %s", name, self.summary())


def sanitize_boxes(boxes: Tensor | np.ndarray | Sequence, width: int, height: int,
                   stats: SanitizeStats | None = None) -> tuple[Tensor, Tensor]:
    """Clip xyxy pixel boxes to a ``width`` x ``height`` image and drop the ones left without area.

    torchvision's Faster R-CNN asserts on boxes with non-positive width or height and produces NaN losses on
    non-finite ones; clipping first keeps objects that only stick out of the frame.

    Returns:
        ``(boxes, keep)``: the kept float32 boxes (N' x 4) and the boolean mask over the input rows, so callers can
        index their labels with it.

    Example:
        >>> b, keep = sanitize_boxes([[-5.0, 2.0, 20.0, 10.0], [3.0, 3.0, 3.5, 9.0]], width=16, height=16)
        >>> b.tolist(), keep.tolist()
        ([[0.0, 2.0, 16.0, 10.0]], [True, False])
    """
    stats = stats if stats is not None else SanitizeStats()
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    stats.boxes += len(b)
    finite = torch.isfinite(b).all(dim=1)
    clipped = b.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    wide = (clipped[:, 2] - clipped[:, 0] >= 1) & (clipped[:, 3] - clipped[:, 1] >= 1)
    keep = finite & wide
    stats.dropped_nonfinite += int((~finite).sum())
    stats.dropped_degenerate += int((finite & ~wide).sum())
    stats.clipped += int((keep & (clipped != b).any(dim=1)).sum())
    return clipped[keep], keep


def check_label(name: str, class_names: Sequence[str], where: str) -> int:
    """The contiguous label (1-based; 0 is background) of class ``name``, or a DataError saying where it came from."""
    try:
        return list(class_names).index(name) + 1
    except ValueError:
        raise DataError(f"{where}: label {name!r} is not in the class map {list(class_names)}",
                        "unknown label") from None


def check_image_file(path: str) -> None:
    """Raise DataError if ``path`` is not an existing file: cheap enough to run for every sample at index time."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: image file is missing", "missing image")


def image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` from the file header only (PIL opens lazily), or DataError naming the file."""
    check_image_file(path)
    try:
        with Image.open(path) as im:
            return im.size
    except _IMAGE_ERRORS as e:
        raise DataError(f"{path}: image file is corrupt or not an image ({type(e).__name__}: {e})",
                        "corrupt image") from e


def load_image(path: str, expected_size: tuple[int, int] | None = None) -> Tensor:
    """Decode ``path`` to a float32 3xHxW tensor in [0, 1]; DataError naming the file if it cannot be used.

    Args:
        path: the image file.
        expected_size: ``(width, height)`` the annotations were made for; a different size means the boxes do not
            belong to this image, which is an error rather than something to clip silently.
    """
    check_image_file(path)
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except _IMAGE_ERRORS as e:
        raise DataError(f"{path}: image file is corrupt or not an image ({type(e).__name__}: {e})",
                        "corrupt image") from e
    if expected_size is not None and tuple(rgb.size) != tuple(expected_size):
        raise DataError(f"{path}: image is {rgb.size[0]}x{rgb.size[1]} but the annotations say "
                        f"{expected_size[0]}x{expected_size[1]}", "image size mismatch")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float().div_(255)


def is_finite_box(values: Sequence[float]) -> bool:
    """True for four finite numbers: annotation files sometimes carry NaN, null or strings."""
    try:
        return len(values) == 4 and all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


@dataclass
class Sample:
    """One indexed image: its file, the sanitized boxes and labels, and the size the boxes were checked against."""

    path: str
    boxes: Tensor
    labels: Tensor
    image_id: int
    size: tuple[int, int] | None = None


def collect_samples(keys: Iterable[Any], build: Callable[[Any], Sample], stats: SanitizeStats,
                    skip_bad: bool) -> list[Sample]:
    """``build(key)`` for each key; a `DataError` is raised, or with ``skip_bad`` counted and the key skipped."""
    samples = []
    for key in keys:
        try:
            samples.append(build(key))
        except DataError as e:
            if not skip_bad:
                raise
            stats.skip(e.reason, e.message)
    return samples


class FileDetection(Dataset):
    """Base of the file readers: items from a list of checked :class:`Sample` records, loading images lazily.

    A corrupt image is only found when it is decoded. With ``skip_bad`` the item at ``index`` is then the next
    readable sample (wrapping around): deterministic, keeps ``len()`` stable for samplers, and each bad file is
    warned about and counted once per process.
    """

    def __init__(self, samples: list[Sample], class_names: list[str], stats: SanitizeStats, name: str,
                 transforms: Callable | None = None, skip_bad: bool = False) -> None:
        if not samples:
            raise DataError(f"{name}: no usable images ({stats.summary()})")
        self.samples = samples
        self.class_names = class_names
        self.stats = stats
        self.name = name
        self.transforms = transforms
        self.skip_bad = skip_bad
        self._bad: set[int] = set()
        stats.log(name)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not 0 <= index < len(self.samples):
            raise IndexError(index)
        for k in range(len(self.samples)):
            j = (index + k) % len(self.samples)
            if j in self._bad:
                continue
            sample = self.samples[j]
            try:
                image = load_image(sample.path, sample.size)
            except DataError as e:
                if not self.skip_bad:
                    raise
                self._bad.add(j)
                self.stats.skip(e.reason, e.message)
                log.warning("%s: skipping %s", self.name, e.message)
                continue
            target = {"boxes": sample.boxes.clone(), "labels": sample.labels.clone(),
                      "image_id": torch.tensor(sample.image_id, dtype=torch.int64)}
            return self.transforms(image, target) if self.transforms is not None else (image, target)
        raise DataError(f"{self.name}: every image is unreadable ({self.stats.summary()})")
