"""DetectionDataModule: every source gives detection batches; calibration data are fixed; bad config fails early;
sources come from one registry; the data seed has one name, and checkpoints written before rebuild the same data."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fqn.data.datamodule import DetectionDataModule
from fqn.data.sources import SOURCES, DataSource
from fqn.data.synthetic import SyntheticConfig, SyntheticDetection
from tests.data.files import kitti_line, write_kitti
from tests.data.test_coco import export_tool

SMALL = SyntheticConfig(image_size=48, num_classes=3, min_size=8, max_size=24)


def check_batch(batch, batch_size: int, num_classes: int) -> None:
    images, targets = batch
    assert isinstance(images, tuple) and isinstance(targets, tuple) and len(images) == len(targets) == batch_size
    for image, target in zip(images, targets):
        assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1:] == (4,)
        assert target["labels"].dtype == torch.int64 and len(target["labels"]) == len(target["boxes"])
        assert ((target["labels"] >= 1) & (target["labels"] < num_classes)).all()
        assert target["image_id"].dtype == torch.int64


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) and torch.equal(s["boxes"], t["boxes"]) and torch.equal(s["labels"], t["labels"])
        for (xs, ss), (ys, ts) in zip(a, b) for x, y, s, t in zip(xs, ys, ss, ts))


def run_loaders(dm: DetectionDataModule, batch_size: int) -> None:
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), batch_size, dm.num_classes)
    check_batch(next(iter(dm.val_dataloader())), batch_size, dm.num_classes)
    dm.setup("test")
    check_batch(next(iter(dm.test_dataloader())), batch_size, dm.num_classes)
    cal = dm.calibration_batches(2)
    assert len(cal) == 2 and same_batches(cal, dm.calibration_batches(2))
    check_batch(cal[0], batch_size, dm.num_classes)


def test_synthetic_source():
    dm = DetectionDataModule(synthetic=SMALL, num_train=8, num_val=4, batch_size=2, data_seed=1)
    assert dm.class_names == ["rectangle", "disk", "triangle"] and dm.num_classes == 4  # known before setup()
    run_loaders(dm, 2)
    cal = dm.calibration_batches(3)  # un-augmented training images drawn at random with the data seed
    ref = SyntheticDetection(8, SMALL, "train")
    drawn = torch.randperm(8, generator=torch.Generator().manual_seed(1))[:6].tolist()
    assert [t["image_id"].item() for _, targets in cal for t in targets] == drawn != list(range(6))
    assert torch.equal(cal[1][0][0], ref[drawn[2]][0])
    assert torch.equal(cal[1][1][0]["boxes"], ref[drawn[2]][1]["boxes"])
    other_rank = DetectionDataModule(synthetic=SMALL, num_train=8, num_val=4, batch_size=2, data_seed=1)
    assert same_batches(cal, other_rank.calibration_batches(3))  # a second process draws the same images
    reseeded = DetectionDataModule(synthetic=SMALL, num_train=8, num_val=4, batch_size=2, data_seed=2)
    assert not same_batches(cal, reseeded.calibration_batches(3))
    order = [[t["image_id"].item() for _, ts in dm.train_dataloader() for t in ts] for _ in range(2)]
    assert order[0] == order[1] and sorted(order[0]) == list(range(8)) and order[0] != list(range(8))
    assert len(dm.calibration_batches(10)) == 4  # fewer batches than asked: what there is (and a warning)


def test_coco_source(tmp_path):
    w = export_tool().export(str(tmp_path), num_train=4, num_val=2, image_size=48, num_classes=2, progress=False)
    dm = DetectionDataModule("coco", train_images=w["train"]["image_dir"], train_ann=w["train"]["ann_file"],
                             val_images=w["val"]["image_dir"], val_ann=w["val"]["ann_file"], batch_size=2)
    assert dm.class_names == ["rectangle", "disk"] and dm.num_classes == 3
    run_loaders(dm, 2)
    assert dm.test_dataset is dm.val_dataset
    sub = DetectionDataModule("coco", train_images=w["train"]["image_dir"], train_ann=w["train"]["ann_file"],
                              val_images=w["val"]["image_dir"], val_ann=w["val"]["ann_file"], class_names=["disk"],
                              skip_bad=True)
    assert sub.num_classes == 2


def test_kitti_source(tmp_path):
    frames = {f"{i:06d}": [kitti_line("Car", (2, 3, 20, 15)), kitti_line("DontCare", (1, 1, 4, 4))]
              + [kitti_line("Cyclist", (30, 2, 40, 30))] * (i % 2) for i in range(10)}
    root = str(write_kitti(tmp_path, frames))
    dm = DetectionDataModule("kitti", data_root=root, batch_size=2, val_fraction=0.2,
                             kitti_class_map={"Car": "car", "Cyclist": "cyclist", "Van": "car"})
    assert dm.class_names == ["car", "cyclist"] and dm.num_classes == 3
    run_loaders(dm, 2)
    assert len(dm.train_dataset) == 8 and len(dm.val_dataset) == 2
    assert DetectionDataModule("kitti", data_root=root).num_classes == 8


def test_bad_configuration_fails_early(tmp_path):
    with pytest.raises(ValueError, match=r"data source must be one of \('synthetic', 'coco', 'kitti', 'street'\), "
                                         r"got 'voc'"):
        DetectionDataModule("voc")
    with pytest.raises(ValueError, match="data source 'coco' needs train_images"):
        DetectionDataModule("coco")
    with pytest.raises(ValueError, match=r"train_images='/no/such/dir': no such folder"):
        DetectionDataModule("coco", train_images="/no/such/dir", train_ann="a.json", val_images="v", val_ann="v")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ValueError, match=r"val_ann='.*missing\.json': no such file"):
        DetectionDataModule("coco", train_images=str(tmp_path / "imgs"), train_ann=__file__,
                            val_images=str(tmp_path / "imgs"), val_ann=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="data source 'kitti' needs data_root"):
        DetectionDataModule("kitti")
    with pytest.raises(ValueError, match=r"data_root='.*': no image_2/ folder"):
        DetectionDataModule("kitti", data_root=str(tmp_path))
    with pytest.raises(ValueError, match=r"class_names \['a'\] do not match"):
        DetectionDataModule(class_names=["a"])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        DetectionDataModule(batch_size=0)
    with pytest.raises(ValueError, match="positive number of batches"):
        DetectionDataModule(synthetic=SMALL, num_train=2).calibration_batches(0)
    with pytest.raises(RuntimeError, match=r"call setup\('fit'\)"):
        DetectionDataModule().train_dataloader()


@dataclass
class ListSource(DataSource):
    """A source written for this test: ``num_val`` one-box images of two classes, read from an existing setting."""

    name = "list"
    names_origin = "the list"
    test_is_val = False

    num_val: int = 200

    def derived_names(self) -> list[str]:
        return ["a", "b"]

    def dataset(self, split: str) -> list:
        n = 2 * self.num_val if split == "train" else self.num_val
        return [(torch.full((3, 32, 32), i / n), {"boxes": torch.tensor([[1.0, 2.0, 9.0, 12.0]]),
                                                  "labels": torch.tensor([1 + i % 2]), "image_id": torch.tensor(i)})
                for i in range(n)]


def test_a_source_is_one_registry_entry(monkeypatch):
    """The data module asks no source what it is: an entry in SOURCES is all a new one needs."""
    assert list(SOURCES) == ["synthetic", "coco", "kitti", "street"] and all(
        name == cls.name and issubclass(cls, DataSource) for name, cls in SOURCES.items())
    monkeypatch.setitem(SOURCES, "list", ListSource)
    dm = DetectionDataModule("list", num_val=3, batch_size=2, augment=False, data_root="ignored/by/this/source")
    assert dm.class_names == ["a", "b"] and dm.num_classes == 3 and dm.coco_label_mode is None
    run_loaders(dm, 2)
    assert len(dm.train_dataset) == 6 and len(dm.val_dataset) == 3 and dm.test_dataset is not dm.val_dataset
    with pytest.raises(ValueError, match=r"class_names \['b'\] do not match \['a', 'b'\] given by the list; leave "
                                         "class_names unset for source 'list'"):
        DetectionDataModule("list", class_names=["b"])


def calibration_ids(dm: DetectionDataModule, n: int) -> list[int]:
    return [t["image_id"].item() for _, targets in dm.calibration_batches(n) for t in targets]


def test_the_data_seed_has_one_name():
    """``data_seed`` is the argument, the attribute and the logged key; ``seed`` is its deprecated old name."""
    args = {"synthetic": SMALL, "num_train": 8, "num_val": 4, "batch_size": 2}
    dm = DetectionDataModule(**args, data_seed=3)
    drawn = torch.randperm(8, generator=torch.Generator().manual_seed(3))[:4].tolist()
    assert dm.data_seed == 3 and dm.hparams["data_seed"] == 3 and "seed" not in dm.hparams
    assert calibration_ids(dm, 2) == drawn
    with pytest.warns(DeprecationWarning, match="`seed` is now `data_seed`"):
        old = DetectionDataModule(**args, seed=3)
    assert old.data_seed == 3 and old.hparams["data_seed"] == 3 and calibration_ids(old, 2) == drawn
    with pytest.warns(DeprecationWarning):  # a run config saved before holds both, data_seed null
        assert DetectionDataModule(**args, seed=3, data_seed=None).data_seed == 3
    assert DetectionDataModule(**args, data_seed=None).data_seed == 0
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="seed=1 and data_seed=2 are the same "
                                                                           "setting: give one"):
        DetectionDataModule(seed=1, data_seed=2)


#: the data hyper-parameters a checkpoint written before the sources and the one seed name holds
LOGGED_BEFORE = {
    "source": "synthetic", "num_train": 8, "num_val": 4, "data_root": None, "train_images": None, "train_ann": None,
    "val_images": None, "val_ann": None, "class_names": None, "coco_labels": "auto", "head_classes": None,
    "kitti_class_map": None, "val_fraction": 0.2, "split_seed": 0, "batch_size": 2, "val_batch_size": None,
    "num_workers": 0, "augment": True, "skip_bad": False,
    "synthetic": {"image_size": 48, "num_classes": 3, "min_objects": 1, "max_objects": 5, "min_size": 8,
                  "max_size": 24, "clutter": 3, "noise": 0.04, "seed": 0},
    "street": {"height": 128, "width": 422, "num_frames": 1200, "min_objects": 2, "max_objects": 8, "clutter": 8,
               "noise": 0.02, "seed": 0},
    "data_seed": 1, "_instantiator": "pytorch_lightning.cli.instantiate_module"}


def test_a_checkpoint_written_before_rebuilds_the_same_data(monkeypatch):
    """`fqn.commands.common.data_for` passes on the logged keys the signature has: same images, order and seed."""
    from fqn.commands import common

    monkeypatch.setattr(common, "checkpoint_data_settings", lambda path: dict(LOGGED_BEFORE))
    dm = common.data_for("old.ckpt")
    assert dm.data_seed == 1 and dm.class_names == ["rectangle", "disk", "triangle"] and not dm.augment
    assert dm.data_source.synthetic == SMALL
    drawn = torch.randperm(8, generator=torch.Generator().manual_seed(1))[:6].tolist()
    assert calibration_ids(dm, 3) == drawn
    ref = SyntheticDetection(8, SMALL, "train")
    assert torch.equal(dm.calibration_batches(1)[0][0][0], ref[drawn[0]][0])
    logged = {k: v for k, v in LOGGED_BEFORE.items() if k != "_instantiator"}
    assert dict(dm.hparams) == {**logged, "augment": False}  # and it logs them again under the same keys
