"""One LightningDataModule for the data sources: the embedded synthetic set, COCO files, KITTI and the street set.

Everything LightningCLI needs to link into the model (``num_classes``) is known right after ``__init__``; the data
sets themselves are built in ``setup()``, per process. The street set is written to disk on first use by
``prepare_data()`` (Lightning runs it on one process per node before any ``setup()``) or, outside a Trainer, lazily
by whatever first needs the data. Calibration data come from :meth:`calibration_batches`:
training batches drawn with the data seed, without augmentation or a distributed sampler, so every DDP rank
calibrates its quantizers on the same images and PTQ and QAT start from the same ranges.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import os
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from fqn.data.coco import (
    COCO_HEAD_CLASSES,
    CocoDetection,
    category_names,
    coco_class_names,
    label_names,
    load_coco,
    torchvision_coco_names,
)
from fqn.data.kitti import KittiDetection, kitti_class_names
from fqn.data.sampler import ResumableLoader, ShardedShuffleSampler
from fqn.data.street import STREET_CLASS_MAP, StreetConfig, street_set_complete, write_street_kitti
from fqn.data.synthetic import SyntheticConfig, SyntheticDetection
from fqn.data.transforms import TrainAugment

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "coco", "kitti", "street")
COCO_LABELS = ("auto", "category_id", "contiguous")
DEFAULT_SYNTHETIC = SyntheticConfig()
DEFAULT_STREET_ROOT = os.path.join("data", "street")  # relative to the working directory, like runs/


def collate_detection(batch: list) -> tuple:
    """``[(image, target), ...] -> ((images...), (targets...))``: detection images differ in size, so no stacking.

    Module-level (not a lambda) so DataLoader workers can pickle it under the spawn start method.
    """
    return tuple(zip(*batch))


class AugmentedDataset(Dataset):
    """``base`` with ``transform(image, target, sample_seed)`` applied to each item.

    The augmentation of item ``i`` in epoch ``e`` is drawn from a seed made of (seed, e, i) alone, so it
    does not depend on worker count, order or on where a resumed run restarted.
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int = 0) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.class_names = getattr(base, "class_names", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        sample_seed = self.seed * 1_000_003 + self.epoch * 100_003 + index
        return self.transform(*self.base[index], sample_seed=sample_seed)


class DetectionDataModule(pl.LightningDataModule):
    """Detection data for training, validation, testing and quantizer calibration.

    Args:
        source: "synthetic" (embedded, no files), "coco" (JSON + image folder), "kitti" (``image_2``/``label_2``) or
            "street" (the built-in street scenes, written to ``data_root`` as KITTI files on first use).
        synthetic: generator settings of the synthetic source.
        street: generator settings of the street source (``fqn.data.street.StreetConfig``; default ``None``, the
            generator's defaults). Not a config instance as default: LightningCLI would take that instance's derived
            ``width`` as the default, so ``--data.street.height 64`` would keep the 128-pixel images' width.
        num_train, num_val: synthetic split sizes (val size is also the synthetic test size).
        data_root: KITTI folder holding ``image_2/`` and ``label_2/``; for "street", where the set is written
            (default ``data/street`` under the working directory).
        train_images, train_ann, val_images, val_ann: COCO image folders and JSON files.
        class_names: COCO classes to use (default: every category of ``train_ann``, by category id). For the other
            sources they follow from the config and, if given, must match.
        coco_labels: how COCO categories become labels. ``category_id``: the id is the label, as torchvision's
            COCO-pretrained 91-way head was trained. ``contiguous``: labels 1..C by name, for a new head on your own
            classes. ``auto`` (default): ``category_id`` when ``head_classes`` is 91, else ``contiguous``.
        head_classes: the detector's ``num_classes`` (the CLI links ``model.num_classes`` here); decides ``auto``.
        kitti_class_map: KITTI type -> class name or None (ignored); default ``fqn.data.kitti.DEFAULT_CLASS_MAP``,
            for "street" ``fqn.data.street.STREET_CLASS_MAP`` (its five types).
        val_fraction, split_seed: KITTI's (and the street set's) seeded train/val split (kept apart from ``seed``
            so changing the training seed never changes the validation frames).
        batch_size, val_batch_size: images per batch (val defaults to ``batch_size``).
        num_workers: DataLoader worker processes.
        augment: albumentations training augmentation (:class:`TrainAugment`); never applied to val/test/calibration.
        skip_bad: skip and count bad samples instead of raising ``DataError`` (see ``fqn.data.sanitize``).
        seed: training shuffle and augmentation seed.
        data_seed: ``seed`` under the name it is logged as (a rebuild from the hyper-parameters passes it).

    Example:
        >>> dm = DetectionDataModule(num_train=8, num_val=4, batch_size=2)
        >>> dm.num_classes, len(dm.calibration_batches(2))
        (5, 2)
    """

    def __init__(self, source: str = "synthetic", synthetic: SyntheticConfig = DEFAULT_SYNTHETIC,
                 street: StreetConfig | None = None,
                 num_train: int = 2000, num_val: int = 200, data_root: str | None = None,
                 train_images: str | None = None, train_ann: str | None = None, val_images: str | None = None,
                 val_ann: str | None = None, class_names: list[str] | None = None, coco_labels: str = "auto",
                 head_classes: int | None = None,
                 kitti_class_map: dict[str, str | None] | None = None, val_fraction: float = 0.2,
                 split_seed: int = 0, batch_size: int = 4, val_batch_size: int | None = None, num_workers: int = 0,
                 augment: bool = True, skip_bad: bool = False, seed: int = 0, data_seed: int | None = None) -> None:
        super().__init__()
        if data_seed is not None:  # rebuilt from the hyper-parameters, where `seed` is logged as data_seed
            if seed not in (0, data_seed):
                raise ValueError(f"seed={seed} and data_seed={data_seed} are the same setting: give one")
            seed = data_seed
        if isinstance(synthetic, dict):  # rebuilt from a checkpoint's hyper-parameters
            synthetic = SyntheticConfig(**synthetic)
        if isinstance(street, dict):
            street = StreetConfig(**street)
        street = street if street is not None else StreetConfig()  # None, not an instance: see the docstring
        # plain values only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["synthetic", "street", "seed", "data_seed"])
        # saved, not assigned into self.hparams: what the logger records is the copy save_hyperparameters takes.
        # "data_seed", not "seed": Lightning merges the data's and the model's hyper-parameters for the logger
        # and refuses a key both hold with different values; the model's `seed` (its RoI sampling) is another one
        self.save_hyperparameters({"synthetic": dataclasses.asdict(synthetic), "street": dataclasses.asdict(street),
                                   "data_seed": seed})
        if source not in SOURCES:
            raise ValueError(f"data source must be one of {SOURCES}, got {source!r}")
        _check_positive(batch_size=batch_size, val_batch_size=val_batch_size or batch_size, num_train=num_train,
                        num_val=num_val)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.source = source
        self.synthetic = synthetic
        self.street = street
        self.num_train, self.num_val = num_train, num_val
        self.data_root = data_root
        self.coco_paths = {"train_images": train_images, "train_ann": train_ann, "val_images": val_images,
                           "val_ann": val_ann}
        self.kitti_class_map = STREET_CLASS_MAP if source == "street" and kitti_class_map is None else kitti_class_map
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.augment, self.skip_bad, self.seed = num_workers, augment, skip_bad, seed
        if coco_labels not in COCO_LABELS:
            raise ValueError(f"coco_labels must be one of {COCO_LABELS}, got {coco_labels!r}")
        self.coco_labels, self.head_classes = coco_labels, head_classes
        self._check_paths()
        self._class_names = self._read_class_names(class_names)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self._train_base: Dataset | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> DetectionDataModule:
        """The data of a merged training config (its ``data:`` section), told the ``model:`` head's size."""
        data = {**(config.get("data") or {}), **overrides}
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"data: unknown keys {unknown} in the config; the data module takes {sorted(known)}")
        num_classes = (config.get("model") or {}).get("num_classes")
        if num_classes is not None:
            data.setdefault("head_classes", num_classes)
        return cls(**data)

    @property
    def class_names(self) -> list[str]:
        """Class names; label ``i + 1`` is ``class_names[i]`` (0 is background)."""
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        """Classes including background, as torchvision's ``FasterRCNN(num_classes=...)`` counts them."""
        return len(self._class_names) + 1

    def _check_paths(self) -> None:
        """Fail at construction, naming the argument, rather than deep inside ``setup()`` on every rank."""
        if self.source == "coco":
            for name, path in self.coco_paths.items():
                if path is None:
                    raise ValueError(f"data source 'coco' needs {name} (COCO image folder and JSON for train and val)")
                exists = os.path.isdir(path) if name.endswith("images") else os.path.isfile(path)
                if not exists:
                    kind = "folder" if name.endswith("images") else "file"
                    raise ValueError(f"{name}={path!r}: no such {kind}")
        elif self.source == "kitti":
            if self.data_root is None:
                raise ValueError("data source 'kitti' needs data_root (the folder with image_2/ and label_2/)")
            for sub in ("image_2", "label_2"):
                if not os.path.isdir(os.path.join(self.data_root, sub)):
                    raise ValueError(f"data_root={self.data_root!r}: no {sub}/ folder in it (KITTI object layout)")
        elif self.source == "street":
            street_set_complete(self.street_root, self.street)  # another config's set there: an error now

    @property
    def street_root(self) -> str:
        """Where the street set is (or will be) written: ``data_root``, default ``data/street``."""
        return self.data_root if self.data_root is not None else DEFAULT_STREET_ROOT

    def prepare_data(self) -> None:
        """Write the street set if it is not complete; Lightning calls this on one process per node, then syncs."""
        if self.source == "street":
            write_street_kitti(self.street_root, self.street)

    @property
    def coco_label_mode(self) -> str:
        """``category_id`` or ``contiguous``: ``coco_labels`` with ``auto`` resolved by the head's size."""
        if self.coco_labels != "auto":
            return self.coco_labels
        return "category_id" if self.head_classes == COCO_HEAD_CLASSES else "contiguous"

    def _read_class_names(self, given: list[str] | None) -> list[str]:
        if self.source == "coco" and self.coco_label_mode == "category_id":
            return self._coco_head_names(given)
        if self.source == "coco":
            return list(given) if given is not None else coco_class_names(self.coco_paths["train_ann"])
        derived = self.synthetic.class_names if self.source == "synthetic" else kitti_class_names(self.kitti_class_map)
        if given is not None and list(given) != derived:
            origin = {"synthetic": "synthetic.num_classes", "kitti": "kitti_class_map"}.get(
                self.source, "the street set's types (kitti_class_map)")
            raise ValueError(f"class_names {list(given)} do not match {derived} given by {origin}; "
                             f"leave class_names unset for source {self.source!r}")
        return derived

    def _coco_head_names(self, given: list[str] | None) -> list[str]:
        """The head's labels when category ids are labels; with ``auto``, the file must be COCO's own label space."""
        ann = self.coco_paths["train_ann"]
        if given is not None:
            raise ValueError("class_names selects and renumbers classes, which needs coco_labels: contiguous; "
                             "with category ids as labels every category of the file keeps its id")
        cats = category_names(load_coco(ann), ann)
        if self.coco_labels == "auto":
            coco = torchvision_coco_names()
            foreign = {cid: name for cid, name in cats.items()
                       if not 1 <= cid <= len(coco) or coco[cid - 1].lower() != name.lower()}
            if foreign:
                raise ValueError(
                    f"{ann}: categories {foreign} are not COCO's at those ids, but the model has torchvision's "
                    f"91-class COCO head (labels = COCO category ids). For your own classes set "
                    f"model.num_classes: {len(cats) + 1} (a new box predictor; labels 1..{len(cats)} by name); "
                    "to keep the ids as labels anyway set data.coco_labels: category_id")
        return label_names(cats, ann, "category_id", self.head_classes)

    def _build(self, split: str) -> Dataset:
        """The un-augmented data set of ``split`` ("train", "val" or "test"; COCO and KITTI test = val)."""
        if self.source == "synthetic":
            return SyntheticDetection(self.num_train if split == "train" else self.num_val, self.synthetic, split)
        if self.source == "coco":
            key = "train" if split == "train" else "val"
            return CocoDetection(self.coco_paths[f"{key}_images"], self.coco_paths[f"{key}_ann"], self.class_names,
                                 skip_bad=self.skip_bad, label_mode=self.coco_label_mode)
        root = self.data_root
        if self.source == "street":  # outside a Trainer nobody called prepare_data(); a no-op when it did
            root = str(write_street_kitti(self.street_root, self.street))
        return KittiDetection(root, "train" if split == "train" else "val", self.kitti_class_map,
                              self.val_fraction, self.split_seed, skip_bad=self.skip_bad)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            self._train_base = self._build("train")
            self.train_dataset = (AugmentedDataset(self._train_base, TrainAugment(seed=self.seed), self.seed)
                                  if self.augment else self._train_base)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._build("val")
        if stage in (None, "test", "predict") and self.test_dataset is None:
            reuse = self.source != "synthetic" and self.val_dataset is not None
            self.test_dataset = self.val_dataset if reuse else self._build("test")

    def _loader(self, dataset: Dataset | None, batch_size: int, stage: str, persistent: bool = True,
                **kwargs: Any) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call setup({stage!r}) before asking for its dataloader")
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate_detection,
                          persistent_workers=persistent and self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Seeded shuffle per epoch, sharded by rank, resumable mid-epoch (see `fqn.data.sampler`)."""
        if self.train_dataset is None:
            raise RuntimeError("call setup('fit') before asking for its dataloader")
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ShardedShuffleSampler(len(self.train_dataset), self.seed, rank, world)
        return ResumableLoader(self.train_dataset, self.batch_size, sampler, num_workers=self.num_workers,
                               collate_fn=collate_detection)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, self.val_batch_size, "validate", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, self.val_batch_size, "test", shuffle=False)

    def calibration_batches(self, n: int) -> list:
        """``n`` training batches drawn at random with the data seed, un-augmented: identical on every rank.

        The FQN paper calibrates on ``n_cal = 20`` randomly sampled training batches. The draw is a
        permutation seeded by ``seed`` alone, taken outside the trainer's sampler, so every DDP rank
        calibrates on the same images (identical quantizer ranges) and PTQ and QAT start alike.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"calibration needs a positive number of batches, got {n!r}")
        if self._train_base is None:
            self._train_base = self._build("train")
        order = torch.randperm(len(self._train_base), generator=torch.Generator().manual_seed(self.seed))
        chosen = Subset(self._train_base, order[: n * self.batch_size].tolist())
        loader = self._loader(chosen, self.batch_size, "fit", shuffle=False, persistent=False)
        batches = list(itertools.islice(loader, n))
        if len(batches) < n:
            log.warning("calibration asked for %d batches; the training set gives only %d", n, len(batches))
        return batches


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
