"""Training augmentation with albumentations, box-aware; resizing stays with torchvision.

torchvision's ``GeneralizedRCNNTransform`` resizes to the model's ``min_size``/``max_size`` (from the config) for
training, evaluation and the int8 export alike, so augmenting here never changes the image size and the FP32, PTQ
and QAT models all see the same resize.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

#: Small geometric jitter for ``affine=True``: enough to vary object scale and position, not to lose many objects.
DEFAULT_AFFINE: dict[str, Any] = {"scale": (0.9, 1.1), "translate_percent": (-0.05, 0.05), "p": 0.3}


def build_compose(hflip: float = 0.5, color: bool = True, affine: bool | dict[str, Any] = False,
                  min_visibility: float = 0.3, seed: int | None = None) -> A.Compose:
    """The albumentations pipeline behind :class:`TrainAugment` (pascal_voc = xyxy pixel boxes).

    Boxes that keep less than ``min_visibility`` of their area, or end up under 1 px wide or high, are dropped
    together with their labels; what remains is clipped to the image.
    """
    steps: list[A.BasicTransform] = []
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if color:  # the synthetic classes are shapes, not colours; photometric jitter keeps the model on form
        steps += [A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.3),
                  A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=0, p=0.3)]
    if affine:
        steps.append(A.Affine(**(DEFAULT_AFFINE if affine is True else affine)))
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility,
                               min_width=1, min_height=1, clip=True)
    return A.Compose(steps, bbox_params=bbox_params, seed=seed)


class TrainAugment:
    """``(image 3xHxW float in [0, 1], target) -> (image, target)`` with boxes and labels transformed together.

    albumentations keeps its own random state per ``Compose``; DataLoader workers would all start from a copy of
    the same state (and again at every epoch), so inside a worker the pipeline is reseeded from the worker's
    seed, which the DataLoader draws from its (seeded) generator: different per worker and epoch, yet reproducible.

    Args:
        hflip: probability of a horizontal flip.
        color: brightness/contrast and hue/saturation jitter.
        affine: ``True`` for a small scale/translate jitter, or a dict of ``A.Affine`` arguments.
        seed: seed of the pipeline's random state in the main process (``None``: not reproducible).
        min_visibility: boxes keeping less of their area than this are dropped.

    Example:
        >>> aug = TrainAugment(hflip=1.0, color=False, seed=0)
        >>> target = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 4.0]]), "labels": torch.tensor([1])}
        >>> image, out = aug(torch.rand(3, 8, 10), target)
        >>> out["boxes"].round().tolist(), out["labels"].tolist()
        ([[5.0, 1.0, 8.0, 4.0]], [1])
    """

    def __init__(self, hflip: float = 0.5, color: bool = True, affine: bool | dict[str, Any] = False,
                 seed: int | None = None, min_visibility: float = 0.3) -> None:
        self.seed = seed
        self.compose = build_compose(hflip, color, affine, min_visibility, seed)
        self._worker_seed: int | None = None

    def __call__(self, image: Tensor, target: dict[str, Tensor],
                 sample_seed: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Augment one sample; with ``sample_seed`` the result depends on that seed alone (exact resume)."""
        if sample_seed is not None:
            self.compose.set_random_seed(sample_seed % 2**32)
        else:
            self._reseed_in_worker()
        array = np.ascontiguousarray(image.detach().cpu().permute(1, 2, 0).numpy(), dtype=np.float32)
        boxes = target["boxes"].detach().cpu().numpy().astype(np.float32).reshape(-1, 4)
        labels = target["labels"].detach().cpu().numpy().astype(np.int64).reshape(-1)
        out = self.compose(image=array, bboxes=boxes, labels=labels)
        new_image = torch.from_numpy(np.ascontiguousarray(out["image"], dtype=np.float32)).permute(2, 0, 1)
        new_target = dict(target)
        new_target["boxes"] = torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32)).reshape(-1, 4)
        new_target["labels"] = torch.as_tensor(np.asarray(out["labels"], dtype=np.int64)).reshape(-1)
        return new_image.clamp_(0, 1).contiguous(), new_target

    def _reseed_in_worker(self) -> None:
        info = get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self.compose.set_random_seed((info.seed + (self.seed or 0)) % 2**32)

    def __repr__(self) -> str:
        return f"TrainAugment(seed={self.seed}, {self.compose.transforms})"
