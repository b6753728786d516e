"""CocoDetection against hand-written files, every bad-input case, and the synthetic COCO export round trip."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from fqn.data.coco import CocoDetection, coco_class_names, label_space, resolve_label_mode
from fqn.data.sanitize import DataError
from fqn.data.synthetic import SyntheticDetection
from tests.data.files import truncate, write_coco, write_garbage

CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 5, "name": "bird"}]  # ids not contiguous
IMAGES = [{"id": 10, "file_name": "a.png", "width": 40, "height": 30},
          {"id": 11, "file_name": "sub/b.png", "width": 50, "height": 20},
          {"id": 12, "file_name": "empty.png", "width": 32, "height": 32}]  # no annotations: a negative


def ann(i: int, image_id: int, cat: int, bbox: list[float], crowd: int = 0) -> dict:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": 1.0, "iscrowd": crowd}


ANNOTATIONS = [ann(1, 10, 7, [2.0, 3.0, 10.0, 5.0]), ann(2, 10, 3, [20.5, 1.0, 4.0, 8.0]),
               ann(3, 11, 5, [0.0, 0.0, 50.0, 20.0]), ann(4, 11, 7, [5.0, 5.0, 5.0, 5.0], crowd=1)]


def export_tool():
    path = Path(__file__).resolve().parents[2] / "tools" / "export_synthetic_coco.py"
    spec = importlib.util.spec_from_file_location("export_synthetic_coco", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reads_boxes_and_labels(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, IMAGES, ANNOTATIONS, CATEGORIES)
    ds = CocoDetection(image_dir, ann_file)
    assert ds.class_names == ["cat", "bird", "dog"]  # ordered by category id 3, 5, 7
    assert coco_class_names(ann_file) == ds.class_names
    assert len(ds) == 3
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 8.0], [20.5, 1.0, 24.5, 9.0]]))
    assert target["labels"].tolist() == [3, 1] and target["labels"].dtype == torch.int64
    assert target["image_id"].item() == 10 and target["image_id"].dtype == torch.int64
    _, target = ds[1]  # the crowd annotation is ignored
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.0, 50.0, 20.0]]))
    assert target["labels"].tolist() == [2]
    image, target = ds[2]  # an image with no boxes is kept as a negative
    assert image.shape == (3, 32, 32) and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["boxes"].dtype == torch.float32 and ds.stats.clean()


def test_explicit_class_names_set_the_labels(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, IMAGES, ANNOTATIONS, CATEGORIES)
    ds = CocoDetection(image_dir, ann_file, class_names=["dog", "bird", "cat"])
    assert ds[0][1]["labels"].tolist() == [1, 3]
    with pytest.raises(DataError, match=r"ann\.json: class_names .* not found: \['cow'\]"):
        CocoDetection(image_dir, ann_file, class_names=["dog", "cow"])


def test_label_outside_class_names(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, IMAGES, ANNOTATIONS, CATEGORIES)
    with pytest.raises(DataError, match=r"ann\.json: annotation 3 of .*b\.png has category 'bird' \(id 5\), which is "
                                        r"not in class_names"):
        CocoDetection(image_dir, ann_file, class_names=["cat", "dog"])
    ds = CocoDetection(image_dir, ann_file, class_names=["cat", "dog"], skip_bad=True)
    assert len(ds) == 2 and ds.stats.skipped == {"unknown label": 1} and "b.png" in ds.stats.messages[0]
    assert [ds[i][1]["image_id"].item() for i in range(2)] == [10, 12]
    bad = ANNOTATIONS + [ann(5, 12, 99, [1.0, 1.0, 4.0, 4.0])]  # a category id the file does not define
    image_dir, ann_file = write_coco(tmp_path, IMAGES, bad, CATEGORIES)
    with pytest.raises(DataError, match=r"ann\.json: annotation 5 of .*empty\.png has category_id 99"):
        CocoDetection(image_dir, ann_file)


def test_boxes_clipped_and_dropped_with_counts(tmp_path, caplog):
    anns = [ann(1, 10, 7, [-5.0, 3.0, 10.0, 5.0]),  # clipped to x1 = 0
            ann(2, 10, 3, [35.0, 25.0, 20.0, 20.0]),  # clipped to the 40x30 image
            ann(3, 10, 5, [10.0, 10.0, 0.4, 8.0]),  # 0.4 px wide: dropped
            ann(4, 11, 5, [60.0, 2.0, 5.0, 5.0]),  # right of the 50 px image: dropped
            ann(5, 11, 7, [1.0, 1.0, None, 3.0])]  # non-finite: dropped
    image_dir, ann_file = write_coco(tmp_path, IMAGES, anns, CATEGORIES)
    ds = CocoDetection(image_dir, ann_file)
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 3.0, 5.0, 8.0], [35.0, 25.0, 40.0, 30.0]]))
    assert target["labels"].tolist() == [3, 1]
    assert ds[1][1]["boxes"].shape == (0, 4)  # every box of the image dropped: it trains as a negative
    s = ds.stats
    assert (s.boxes, s.clipped, s.dropped_degenerate, s.dropped_nonfinite, s.num_skipped) == (5, 2, 2, 1, 0)
    assert sum("2 clipped, 3 dropped" in r.getMessage() for r in caplog.records) == 1  # one warning, not one per box


def test_missing_image(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, IMAGES, ANNOTATIONS, CATEGORIES)
    (Path(image_dir) / "sub" / "b.png").unlink()
    with pytest.raises(DataError, match=r"sub/b\.png: image file is missing"):
        CocoDetection(image_dir, ann_file)
    ds = CocoDetection(image_dir, ann_file, skip_bad=True)
    assert len(ds) == 2 and ds.stats.skipped == {"missing image": 1}


@pytest.mark.parametrize("damage", [write_garbage, truncate])
def test_corrupt_image(tmp_path, damage):
    image_dir, ann_file = write_coco(tmp_path, IMAGES, ANNOTATIONS, CATEGORIES)
    damage(Path(image_dir) / "a.png")
    ds = CocoDetection(image_dir, ann_file)  # found when decoded, not at index time
    with pytest.raises(DataError, match=r"a\.png: image file is corrupt"):
        ds[0]
    ds = CocoDetection(image_dir, ann_file, skip_bad=True)
    assert len(ds) == 3
    assert ds[0][1]["image_id"].item() == 11  # the next readable sample, deterministically
    assert ds[0][1]["image_id"].item() == 11 and ds[1][1]["image_id"].item() == 11
    assert ds.stats.skipped == {"corrupt image": 1}  # counted once


def test_bad_annotation_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: COCO annotation file is missing"):
        CocoDetection(str(tmp_path), str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not a readable JSON file"):
        CocoDetection(str(tmp_path), str(tmp_path / "bad.json"))


def test_synthetic_export_round_trip(tmp_path):
    tool = export_tool()
    written = tool.export(str(tmp_path / "out"), num_train=3, num_val=4, image_size=64, num_classes=3, seed=5,
                          progress=False)
    assert written["val"]["images"] == 4 and len(list(Path(written["val"]["image_dir"]).glob("*.png"))) == 4
    coco = COCO(written["val"]["ann_file"])  # pycocotools reads it
    assert len(coco.getImgIds()) == 4 and sorted(coco.getCatIds()) == [1, 2, 3]
    assert len(coco.getAnnIds()) == written["val"]["annotations"]
    for split in ("train", "val"):
        ds = CocoDetection(written[split]["image_dir"], written[split]["ann_file"])
        ref = SyntheticDetection(len(ds), written[split]["config"], split)
        assert ds.class_names == ref.class_names == ["rectangle", "disk", "triangle"]
        for i in range(len(ref)):
            (image, target), (ref_image, ref_target) = ds[i], ref[i]
            assert torch.equal(target["labels"], ref_target["labels"])
            torch.testing.assert_close(target["boxes"], ref_target["boxes"], atol=1e-4, rtol=0)
            torch.testing.assert_close(image, ref_image, atol=1 / 255, rtol=0)
            assert target["image_id"].item() == ref_target["image_id"].item() == i


def test_export_cli(tmp_path, capsys):
    assert export_tool().main([str(tmp_path), "--num-train", "2", "--num-val", "1", "--image-size", "48"]) == 0
    out = capsys.readouterr().out
    assert "train: 2 images" in out and "val: 1 images" in out
    assert (tmp_path / "annotations" / "train.json").is_file() and (tmp_path / "val" / "000000.png").is_file()


def test_category_ids_as_labels(tmp_path):
    """torchvision's COCO head reads the category id as the label: no renumbering, unused ids left as "N/A"."""
    image_dir, ann_file = write_coco(tmp_path, IMAGES, ANNOTATIONS, CATEGORIES)
    ds = CocoDetection(image_dir, ann_file, label_mode="category_id")
    assert ds.class_names == ["N/A", "N/A", "cat", "N/A", "bird", "N/A", "dog"]  # label i + 1 is class_names[i]
    assert ds[0][1]["labels"].tolist() == [7, 3] and ds[1][1]["labels"].tolist() == [5]
    names = coco_class_names(ann_file, "category_id", head_classes=10)
    assert len(names) == 9 and names[6] == "dog"
    with pytest.raises(DataError, match="do not fit a 6-class head"):
        coco_class_names(ann_file, "category_id", head_classes=6)
    with pytest.raises(DataError, match="must match the head"):
        CocoDetection(image_dir, ann_file, class_names=["a", "b", "dog", "d", "e", "f", "g"], label_mode="category_id")
    with pytest.raises(ValueError, match="label_mode"):
        CocoDetection(image_dir, ann_file, label_mode="ids")


COCO_OWN = [{"id": 1, "name": "person"}, {"id": 13, "name": "stop sign"}, {"id": 44, "name": "bottle"}]


def test_label_space_follows_the_head(tmp_path):
    """data.coco_labels: auto keeps category ids only under torchvision's 91-way head; its names are COCO's."""
    _, custom = write_coco(tmp_path / "custom", IMAGES, ANNOTATIONS, CATEGORIES)
    _, own = write_coco(tmp_path / "own", IMAGES[:1], [], COCO_OWN)
    assert [resolve_label_mode("auto", n) for n in (None, 4, 91)] == ["contiguous", "contiguous", "category_id"]
    assert resolve_label_mode("contiguous", 91) == "contiguous" and resolve_label_mode("category_id") == "category_id"
    with pytest.raises(ValueError, match=r"coco_labels must be one of \('auto', 'category_id', 'contiguous'\)"):
        resolve_label_mode("ids")
    space = label_space(custom, head_classes=4)  # a new head: every category by id order, labels 1..3
    assert space.mode == "contiguous" and space.class_names == ["cat", "bird", "dog"]
    assert label_space(custom, ["dog"]).class_names == ["dog"]  # a chosen subset, checked by the reader
    space = label_space(own, head_classes=91)
    assert space.mode == "category_id" and len(space.class_names) == 90
    assert (space.class_names[0], space.class_names[11], space.class_names[12]) == ("person", "N/A", "stop sign")
    with pytest.raises(ValueError, match=r"not COCO's at those ids.*model.num_classes: 4 .*coco_labels: category_id"):
        label_space(custom, head_classes=91)
    forced = label_space(custom, coco_labels="category_id", head_classes=91)  # the ids kept, names as the file's
    assert forced.mode == "category_id" and forced.class_names[2] == "cat" and forced.class_names[6] == "dog"
    with pytest.raises(ValueError, match="class_names selects and renumbers classes, which needs coco_labels: "
                                         "contiguous"):
        label_space(own, ["person"], head_classes=91)
    with pytest.raises(DataError, match="do not fit a 5-class head"):
        label_space(custom, coco_labels="category_id", head_classes=5)
