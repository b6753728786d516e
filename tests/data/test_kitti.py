"""KittiDetection on hand-written label files: class map, DontCare/Misc, bad input, and the seeded split."""

from __future__ import annotations

import pytest
import torch

from fqn.data.kitti import DEFAULT_CLASS_MAP, KittiDetection, kitti_class_names, split_frames
from fqn.data.sanitize import DataError
from tests.data.files import kitti_line, truncate, write_garbage, write_kitti

FRAMES = {
    "000000": [kitti_line("Car", (1.0, 2.0, 20.5, 15.0)), kitti_line("DontCare", (30.0, 5.0, 40.0, 9.0)),
               kitti_line("Pedestrian", (40.0, 3.0, 48.0, 30.0), score=0.9)],
    "000001": [kitti_line("Misc", (2.0, 2.0, 9.0, 9.0)), kitti_line("Cyclist", (10.0, 10.0, 30.0, 45.0))],
    "000002": [],  # no objects: a negative
    "000003": [kitti_line("DontCare", (0.0, 0.0, 10.0, 10.0))],  # only DontCare: a negative too
}


def test_default_class_names():
    assert kitti_class_names() == ["Car", "Cyclist", "Pedestrian", "Person_sitting", "Tram", "Truck", "Van"]
    assert DEFAULT_CLASS_MAP["Misc"] is None
    assert kitti_class_names({"Van": "car", "Car": "car", "Pedestrian": "person", "Misc": None}) == ["car", "person"]


def test_reads_boxes_and_labels(tmp_path):
    ds = KittiDetection(str(write_kitti(tmp_path, FRAMES)), split="all")
    names = ds.class_names
    assert len(ds) == 4
    image, target = ds[0]
    assert image.shape == (3, 40, 64) and image.dtype == torch.float32
    torch.testing.assert_close(target["boxes"], torch.tensor([[1.0, 2.0, 20.5, 15.0], [40.0, 3.0, 48.0, 30.0]]))
    assert target["labels"].tolist() == [names.index("Car") + 1, names.index("Pedestrian") + 1]  # DontCare ignored
    assert target["image_id"].item() == 0 and target["labels"].dtype == torch.int64
    _, target = ds[1]  # Misc ignored by the default map; the cyclist box clipped to the 40 px height
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 10.0, 30.0, 40.0]]))
    assert target["labels"].tolist() == [names.index("Cyclist") + 1] and target["image_id"].item() == 1
    for i in (2, 3):
        assert ds[i][1]["boxes"].shape == (0, 4) and ds[i][1]["labels"].shape == (0,)
    assert (ds.stats.boxes, ds.stats.clipped, ds.stats.dropped) == (3, 1, 0)


def test_custom_class_map(tmp_path):
    cmap = {"Car": "vehicle", "Cyclist": "person", "Pedestrian": "person", "Misc": "vehicle"}
    ds = KittiDetection(str(write_kitti(tmp_path, FRAMES)), split="all", class_map=cmap)
    assert ds.class_names == ["person", "vehicle"]
    assert ds[0][1]["labels"].tolist() == [2, 1] and ds[1][1]["labels"].tolist() == [2, 1]


def test_type_outside_the_map(tmp_path):
    root = str(write_kitti(tmp_path, {**FRAMES, "000004": [kitti_line("Car", (1, 1, 5, 5)),
                                                           kitti_line("Boat", (1, 1, 9, 9))]}))
    with pytest.raises(DataError, match=r"label_2/000004\.txt line 2: KITTI type 'Boat' is not in the class map"):
        KittiDetection(root, split="all")
    ds = KittiDetection(root, split="all", skip_bad=True)
    assert len(ds) == 4 and ds.stats.skipped == {"unknown label": 1} and "000004.txt line 2" in ds.stats.messages[0]
    assert len(KittiDetection(root, split="all", class_map={**DEFAULT_CLASS_MAP, "Boat": None})) == 5


@pytest.mark.parametrize("line, problem", [("Car 0.0 0 1.0 2.0 3.0", "expected 15 fields"),
                                           (kitti_line("Car", (1, 2, 3, 4)).replace("1.00", "one"), "non-numeric")])
def test_malformed_line(tmp_path, line, problem):
    root = str(write_kitti(tmp_path, {**FRAMES, "000001": [kitti_line("Car", (1, 1, 5, 5)), line]}))
    with pytest.raises(DataError, match=rf"label_2/000001\.txt line 2: {problem}"):
        KittiDetection(root, split="all")
    assert KittiDetection(root, split="all", skip_bad=True).stats.skipped == {"malformed label": 1}


def test_missing_and_corrupt_files(tmp_path):
    root = write_kitti(tmp_path, FRAMES)
    truncate(root / "image_2" / "000003.png")  # readable header, broken pixels: found at load time
    ds = KittiDetection(str(root), split="all")
    with pytest.raises(DataError, match=r"image_2/000003\.png: image file is corrupt"):
        ds[3]
    (root / "label_2" / "000002.txt").unlink()
    with pytest.raises(DataError, match=r"label_2/000002\.txt: label file is missing"):
        KittiDetection(str(root), split="all")
    (root / "image_2" / "000001.png").unlink()
    with pytest.raises(DataError, match=r"image_2/000001\.png: image file is missing"):
        KittiDetection(str(root), split="all")
    ds = KittiDetection(str(root), split="all", skip_bad=True)
    assert len(ds) == 2 and ds.stats.skipped == {"missing label": 1, "missing image": 1}
    assert [ds[i][1]["image_id"].item() for i in range(2)] == [0, 0]  # 000003 is corrupt: its slot wraps to 0
    assert ds.stats.skipped == {"missing label": 1, "missing image": 1, "corrupt image": 1}
    write_garbage(root / "image_2" / "000001.png")  # unreadable header: found at index time
    with pytest.raises(DataError, match=r"image_2/000001\.png: image file is corrupt"):
        KittiDetection(str(root), split="all")


def test_split_deterministic_disjoint_covering(tmp_path):
    ids = [f"{i:06d}" for i in range(50)]
    train, val = split_frames(ids, "train", 0.2, seed=3), split_frames(ids, "val", 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert not set(train) & set(val) and sorted(train + val) == ids == split_frames(ids, "all", 0.2, seed=3)
    assert split_frames(reversed(ids), "val", 0.2, seed=3) == val  # input order does not matter
    assert split_frames(ids, "val", 0.2, seed=4) != val
    frames = {f: [kitti_line("Car", (1, 1, 9, 9))] for f in ids[:10]}
    root = str(write_kitti(tmp_path, frames, size=(16, 16)))
    a = [KittiDetection(root, "val", split_seed=1)[i][1]["image_id"].item() for i in range(2)]
    b = [KittiDetection(root, "val", split_seed=1)[i][1]["image_id"].item() for i in range(2)]
    t = [KittiDetection(root, "train", split_seed=1)[i][1]["image_id"].item() for i in range(8)]
    assert a == b and not set(a) & set(t) and sorted(a + t) == list(range(10))
    with pytest.raises(ValueError, match="split must be one of"):
        split_frames(ids, "test")


def test_nothing_usable_is_an_error_not_an_empty_loader(tmp_path):
    root = write_kitti(tmp_path, {"000000": [kitti_line("Boat", (1, 1, 5, 5))]})
    with pytest.raises(DataError, match=r"no usable images .*1 unknown label"):
        KittiDetection(str(root), split="all", skip_bad=True)
