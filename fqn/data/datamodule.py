"""One LightningDataModule for the data sources: the embedded synthetic set, COCO files, KITTI and the street set.

What differs between the sources (their settings, class names, files) is theirs, in :mod:`fqn.data.sources`, looked
up by name; what is the same for all (augmentation, loaders, the data seed, calibration batches) is here.
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
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from fqn.data.sampler import ResumableLoader, ShardedShuffleSampler
from fqn.data.sources import DEFAULT_SYNTHETIC, SOURCES, data_source
from fqn.data.street import StreetConfig
from fqn.data.synthetic import SyntheticConfig
from fqn.data.transforms import TrainAugment

log = logging.getLogger(__name__)

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

    The arguments are the ``data:`` section of a config, flat, for every source at once: LightningCLI builds its
    schema from this signature. Each source takes the ones it reads (see :mod:`fqn.data.sources`) and checks them.

    Args:
        source: "synthetic" (embedded, no files), "coco" (JSON + image folder), "kitti" (``image_2``/``label_2``) or
            "street" (the built-in street scenes, written to ``data_root`` as KITTI files on first use); one of
            :data:`fqn.data.sources.SOURCES`.
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
        val_fraction, split_seed: KITTI's (and the street set's) seeded train/val split (kept apart from
            ``data_seed`` so changing the training seed never changes the validation frames).
        batch_size, val_batch_size: images per batch (val defaults to ``batch_size``).
        num_workers: DataLoader worker processes.
        augment: albumentations training augmentation (:class:`TrainAugment`); never applied to val/test/calibration.
        skip_bad: skip and count bad samples instead of raising ``DataError`` (see ``fqn.data.sanitize``).
        data_seed: training shuffle, augmentation and calibration-batch seed. Named apart from the model's
            ``seed`` (its RoI sampling): Lightning merges the data's and the model's hyper-parameters for the logger
            and refuses a key both hold with different values. ``None``, as run configs saved before hold: 0.
        seed: deprecated, the old name of ``data_seed``; still read from configs written before.

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
                 augment: bool = True, skip_bad: bool = False, data_seed: int | None = 0,
                 seed: int | None = None) -> None:
        super().__init__()
        data_seed = _one_seed(data_seed, seed)
        if isinstance(synthetic, dict):  # rebuilt from a checkpoint's hyper-parameters
            synthetic = SyntheticConfig(**synthetic)
        if isinstance(street, dict):
            street = StreetConfig(**street)
        street = street if street is not None else StreetConfig()  # None, not an instance: see the docstring
        # plain values only, so checkpoints load with torch.load(weights_only=True); saved, not assigned into
        # self.hparams: what the logger records is the copy save_hyperparameters takes
        self.save_hyperparameters(ignore=["synthetic", "street", "seed", "data_seed"])
        self.save_hyperparameters({"synthetic": dataclasses.asdict(synthetic), "street": dataclasses.asdict(street),
                                   "data_seed": data_seed})
        if source not in SOURCES:
            raise ValueError(f"data source must be one of {tuple(SOURCES)}, got {source!r}")
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size or batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.source = source
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.augment, self.data_seed = num_workers, augment, data_seed
        # every setting as logged, the configs as objects: the source takes its own, so a rebuild from the
        # hyper-parameters gets exactly these
        self.data_source = data_source(source, {**self.hparams, "synthetic": synthetic, "street": street})
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
        return list(self.data_source.names)

    @property
    def num_classes(self) -> int:
        """Classes including background, as torchvision's ``FasterRCNN(num_classes=...)`` counts them."""
        return len(self.data_source.names) + 1

    @property
    def coco_label_mode(self) -> str | None:
        """The COCO source's label mode, ``category_id`` or ``contiguous``; None for the other sources."""
        return getattr(self.data_source, "label_mode", None)

    @property
    def coco_paths(self) -> dict[str, str | None]:
        """The COCO paths as given (``train_images``, ``train_ann``, ...); the COCO source owns them, this reads the
        logged settings for callers that ask the data module (``tests/test_configs.py``), whatever the source."""
        return {key: self.hparams.get(key) for key in ("train_images", "train_ann", "val_images", "val_ann")}

    def prepare_data(self) -> None:
        """Write what the source needs on disk (the street set); Lightning calls this on one process per node."""
        self.data_source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            self._train_base = self.data_source.dataset("train")
            self.train_dataset = (AugmentedDataset(self._train_base, TrainAugment(seed=self.data_seed),
                                                   self.data_seed)
                                  if self.augment else self._train_base)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self.data_source.dataset("val")
        if stage in (None, "test", "predict") and self.test_dataset is None:
            reuse = self.data_source.test_is_val and self.val_dataset is not None
            self.test_dataset = self.val_dataset if reuse else self.data_source.dataset("test")

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
        sampler = ShardedShuffleSampler(len(self.train_dataset), self.data_seed, rank, world)
        return ResumableLoader(self.train_dataset, self.batch_size, sampler, num_workers=self.num_workers,
                               collate_fn=collate_detection)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, self.val_batch_size, "validate", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, self.val_batch_size, "test", shuffle=False)

    def calibration_batches(self, n: int) -> list:
        """``n`` training batches drawn at random with the data seed, un-augmented: identical on every rank.

        The FQN paper calibrates on ``n_cal = 20`` randomly sampled training batches. The draw is a
        permutation seeded by ``data_seed`` alone, taken outside the trainer's sampler, so every DDP rank
        calibrates on the same images (identical quantizer ranges) and PTQ and QAT start alike.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"calibration needs a positive number of batches, got {n!r}")
        if self._train_base is None:
            self._train_base = self.data_source.dataset("train")
        order = torch.randperm(len(self._train_base), generator=torch.Generator().manual_seed(self.data_seed))
        chosen = Subset(self._train_base, order[: n * self.batch_size].tolist())
        loader = self._loader(chosen, self.batch_size, "fit", shuffle=False, persistent=False)
        batches = list(itertools.islice(loader, n))
        if len(batches) < n:
            log.warning("calibration asked for %d batches; the training set gives only %d", n, len(batches))
        return batches



def _one_seed(data_seed: int | None, seed: int | None) -> int:
    """The data seed, whichever name gave it: ``seed`` is the deprecated one (configs and callers written before)."""
    if seed is None:
        return 0 if data_seed is None else data_seed
    warnings.warn("the data module's `seed` is now `data_seed` (data.data_seed in a config), the name it is logged "
                  "under; `seed` still works but is deprecated", DeprecationWarning, stacklevel=3)
    if data_seed not in (None, 0, seed):
        raise ValueError(f"seed={seed} and data_seed={data_seed} are the same setting: give one (data_seed)")
    return seed
