"""The data sources of :class:`fqn.data.datamodule.DetectionDataModule`, looked up by name in :data:`SOURCES`.

A source knows what differs between kinds of data: which of the ``data:`` settings it reads, how to check them, its
class names, what to write before reading (the street set) and how to build the data set of a split. The data module
does the rest (augmentation, loaders, seeds, calibration) the same way for every source, and never asks which one it
has.

To add a source: a :class:`DataSource` subclass here, a dataclass whose fields are the data module's arguments it
reads (same names and defaults), and an entry in :data:`SOURCES`. Only an argument no source had before also goes into
``DetectionDataModule.__init__``, whose signature is the ``data:`` schema LightningCLI parses configs with.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch.utils.data import Dataset

from fqn.data.coco import CocoDetection, label_space, resolve_label_mode
from fqn.data.kitti import KittiDetection, kitti_class_names
from fqn.data.street import STREET_CLASS_MAP, StreetConfig, street_set_complete, write_street_kitti
from fqn.data.synthetic import SyntheticConfig, SyntheticDetection

DEFAULT_SYNTHETIC = SyntheticConfig()
DEFAULT_STREET_ROOT = os.path.join("data", "street")  # relative to the working directory, like runs/


@dataclass
class DataSource:
    """One kind of detection data: its settings (the dataclass fields), checked at construction.

    Construction fails, naming the setting, for what would otherwise fail deep inside ``setup()`` on every rank; it
    also fixes :attr:`names`, so the head's size is known before any data set is built.

    Args:
        class_names: the classes asked for (``data.class_names``). Sources whose classes follow from their other
            settings only check that these match.
        skip_bad: skip and count bad samples instead of raising (see ``fqn.data.sanitize``).
    """

    name: ClassVar[str] = ""
    #: the setting the classes follow from, for the message when ``class_names`` disagrees
    names_origin: ClassVar[str] = ""
    #: whether the test split is the validation split (the file formats have no test set of their own)
    test_is_val: ClassVar[bool] = True

    class_names: list[str] | None = None
    skip_bad: bool = False

    def __post_init__(self) -> None:
        self.check()
        self.names: list[str] = self.label_names()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> DataSource:
        """The source of the data module's ``settings``: its own fields taken, the other sources' ignored."""
        return cls(**{f.name: settings[f.name] for f in dataclasses.fields(cls) if f.name in settings})

    def check(self) -> None:
        """Raise ``ValueError`` naming the setting that cannot work (a missing path, a value out of range)."""

    def derived_names(self) -> list[str]:
        """The class names the source's own settings give, label ``i + 1`` for ``names[i]``."""
        raise NotImplementedError

    def label_names(self) -> list[str]:
        """Class names by label; a ``class_names`` setting that disagrees with the derived ones is an error."""
        derived = self.derived_names()
        if self.class_names is not None and list(self.class_names) != derived:
            raise ValueError(f"class_names {list(self.class_names)} do not match {derived} given by "
                             f"{self.names_origin}; leave class_names unset for source {self.name!r}")
        return derived

    def prepare(self) -> None:
        """Write what must be on disk before any process reads it (Lightning's ``prepare_data``); most need none."""

    def dataset(self, split: str) -> Dataset:
        """The un-augmented data set of ``split`` ("train", "val" or "test")."""
        raise NotImplementedError


@dataclass
class SyntheticSource(DataSource):
    """The embedded synthetic set (:mod:`fqn.data.synthetic`): nothing on disk; its test split is its own."""

    name = "synthetic"
    names_origin = "synthetic.num_classes"
    test_is_val = False

    synthetic: SyntheticConfig = DEFAULT_SYNTHETIC
    num_train: int = 2000
    num_val: int = 200  # also the test split's size

    def check(self) -> None:
        for name, value in (("num_train", self.num_train), ("num_val", self.num_val)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    def derived_names(self) -> list[str]:
        return self.synthetic.class_names

    def dataset(self, split: str) -> Dataset:
        return SyntheticDetection(self.num_train if split == "train" else self.num_val, self.synthetic, split)


@dataclass
class CocoSource(DataSource):
    """COCO JSON files and image folders; the label-space rules are the reader's (:func:`fqn.data.coco.label_space`).

    Args:
        train_images, train_ann, val_images, val_ann: the image folders and JSON files (the test split is val).
        coco_labels: ``auto``, ``category_id`` or ``contiguous``; see :func:`fqn.data.coco.resolve_label_mode`.
        head_classes: the detector's ``num_classes`` (the CLI links ``model.num_classes`` here); decides ``auto``.
    """

    name = "coco"

    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    coco_labels: str = "auto"
    head_classes: int | None = None

    @property
    def paths(self) -> dict[str, str | None]:
        return {"train_images": self.train_images, "train_ann": self.train_ann, "val_images": self.val_images,
                "val_ann": self.val_ann}

    @property
    def label_mode(self) -> str:
        """``category_id`` or ``contiguous``: ``coco_labels`` with ``auto`` resolved by the head's size."""
        return resolve_label_mode(self.coco_labels, self.head_classes)

    def check(self) -> None:
        resolve_label_mode(self.coco_labels, self.head_classes)  # a bad value first: it is the config's error
        for name, path in self.paths.items():
            if path is None:
                raise ValueError(f"data source 'coco' needs {name} (COCO image folder and JSON for train and val)")
            exists = os.path.isdir(path) if name.endswith("images") else os.path.isfile(path)
            if not exists:
                kind = "folder" if name.endswith("images") else "file"
                raise ValueError(f"{name}={path!r}: no such {kind}")

    def label_names(self) -> list[str]:
        return label_space(self.train_ann, self.class_names, self.coco_labels, self.head_classes).class_names

    def dataset(self, split: str) -> Dataset:
        key = "train" if split == "train" else "val"
        return CocoDetection(self.paths[f"{key}_images"], self.paths[f"{key}_ann"], self.names,
                             skip_bad=self.skip_bad, label_mode=self.label_mode)


@dataclass
class KittiSource(DataSource):
    """KITTI's ``image_2``/``label_2`` layout, split into train and val by a seeded shuffle (the test split is val).

    Args:
        data_root: the folder holding ``image_2/`` and ``label_2/``.
        kitti_class_map: KITTI type -> class name or None (ignored); default ``fqn.data.kitti.DEFAULT_CLASS_MAP``.
        val_fraction, split_seed: the seeded split, apart from the training seed so that changing it never
            changes the validation frames.
    """

    name = "kitti"
    names_origin = "kitti_class_map"

    data_root: str | None = None
    kitti_class_map: dict[str, str | None] | None = None
    val_fraction: float = 0.2
    split_seed: int = 0

    def check(self) -> None:
        if self.data_root is None:
            raise ValueError("data source 'kitti' needs data_root (the folder with image_2/ and label_2/)")
        for sub in ("image_2", "label_2"):
            if not os.path.isdir(os.path.join(self.data_root, sub)):
                raise ValueError(f"data_root={self.data_root!r}: no {sub}/ folder in it (KITTI object layout)")

    def derived_names(self) -> list[str]:
        return kitti_class_names(self.kitti_class_map)

    def root(self) -> str:
        """The folder the reader reads, there by now."""
        return str(self.data_root)

    def dataset(self, split: str) -> Dataset:
        return KittiDetection(self.root(), "train" if split == "train" else "val", self.kitti_class_map,
                              self.val_fraction, self.split_seed, skip_bad=self.skip_bad)


@dataclass
class StreetSource(KittiSource):
    """The built-in street scenes, written as KITTI files to ``data_root`` (default ``data/street``) on first use.

    Args:
        street: the generator's settings (``fqn.data.street.StreetConfig``).
        kitti_class_map: default ``fqn.data.street.STREET_CLASS_MAP``, the set's five types.
    """

    name = "street"
    names_origin = "the street set's types (kitti_class_map)"

    street: StreetConfig = field(default_factory=StreetConfig)

    def __post_init__(self) -> None:
        if self.kitti_class_map is None:
            self.kitti_class_map = STREET_CLASS_MAP
        super().__post_init__()

    @property
    def street_root(self) -> str:
        """Where the street set is (or will be) written."""
        return self.data_root if self.data_root is not None else DEFAULT_STREET_ROOT

    def check(self) -> None:
        street_set_complete(self.street_root, self.street)  # another config's set there: an error now

    def prepare(self) -> None:
        write_street_kitti(self.street_root, self.street)

    def root(self) -> str:
        # outside a Trainer nobody called prepare(); a no-op when it did
        return str(write_street_kitti(self.street_root, self.street))


#: Every source by its ``data.source`` name.
SOURCES: dict[str, type[DataSource]] = {cls.name: cls for cls in (SyntheticSource, CocoSource, KittiSource,
                                                                   StreetSource)}


def data_source(name: str, settings: Mapping[str, Any]) -> DataSource:
    """The source ``name`` built from the data module's ``settings``, checked; a ``ValueError`` for an unknown one."""
    if name not in SOURCES:
        raise ValueError(f"data source must be one of {tuple(SOURCES)}, got {name!r}")
    return SOURCES[name].from_settings(settings)
