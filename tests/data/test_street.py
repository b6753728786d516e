"""The street benchmark: deterministic frames, KITTI-valid labels, perspective, occlusion, the folder's manifest.

Labels are checked from the written files with a parser written here, not with fqn's KITTI reader, so a mistake
shared by the writer and the reader cannot hide; the reader is then checked against that parser.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fqn.data import street
from fqn.data.datamodule import DetectionDataModule
from fqn.data.kitti import KittiDetection
from fqn.data.street import (
    MANIFEST,
    STREET_CLASS_MAP,
    STREET_CLASSES,
    StreetConfig,
    render_street,
    street_frame,
    write_street_kitti,
)
from fqn.data.street_scene import StreetObject
from tests.data.files import kitti_line, write_kitti

SMALL = StreetConfig(height=48, num_frames=12, seed=3)
H, W = SMALL.height, SMALL.width


def parse_labels(path: Path) -> list[dict]:
    """A minimal KITTI label parser: ``type truncated occluded alpha x1 y1 x2 y2 h w l x y z ry``."""
    rows = []
    for line in path.read_text().splitlines():
        f = line.split()
        assert len(f) == 15, line
        numbers = [float(v) for v in f[1:]]
        assert all(math.isfinite(v) for v in numbers), line
        rows.append({"type": f[0], "truncated": numbers[0], "occluded": int(f[2]), "alpha": numbers[2],
                     "box": numbers[3:7], "dims": numbers[7:10], "loc": numbers[10:13], "ry": numbers[13]})
    return rows


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_street_kitti(tmp_path_factory.mktemp("street"), SMALL, progress=False)


def frames_of(root: Path) -> dict[int, list[dict]]:
    return {int(p.stem): parse_labels(p) for p in sorted((root / "label_2").glob("*.txt"))}


def test_deterministic_and_seeded():
    a, b = street_frame(5, SMALL), street_frame(5, SMALL)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    other_seed = street_frame(5, StreetConfig(height=48, seed=4))
    assert not torch.equal(a.image, other_seed.image)
    assert not torch.equal(a.image, street_frame(6, SMALL).image)
    image, boxes, labels, truncated, occluded = render_street(5, SMALL)
    assert torch.equal(image, a.image) and torch.equal(boxes, a.boxes) and torch.equal(occluded, a.occluded)
    assert image.shape == (3, H, W) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert labels.dtype == torch.int64 and truncated.shape == occluded.shape == labels.shape == (len(boxes),)


def test_boxes_inside_and_classes():
    seen = set()
    for i in range(SMALL.num_frames):
        f = street_frame(i, SMALL)
        b = f.boxes
        assert ((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= W) & (b[:, 3] <= H)).all()
        assert ((b[:, 2] - b[:, 0] >= street.MIN_WIDTH) & (b[:, 3] - b[:, 1] >= street.MIN_HEIGHT)).all()
        assert ((f.labels >= 1) & (f.labels <= 5)).all()
        assert ((f.truncated >= 0) & (f.truncated < 1)).all() and set(f.occluded.tolist()) <= {0, 1, 2}
        seen |= set(f.labels.tolist())
    assert SMALL.classes == STREET_CLASSES == ("Car", "Van", "Truck", "Pedestrian", "Cyclist")
    assert seen == {1, 2, 3, 4, 5}


def test_perspective_far_small_near_large(written):
    """Box height grows with the box bottom's row (nearer = lower = larger), from the files alone."""
    rows = [r for frame in frames_of(written).values() for r in frame if r["type"] != "DontCare"]
    bottoms = np.array([r["box"][3] for r in rows])
    heights = np.array([r["box"][3] - r["box"][1] for r in rows])
    assert np.corrcoef(bottoms, heights)[0, 1] > 0.6
    low, high = heights[bottoms > np.median(bottoms)], heights[bottoms <= np.median(bottoms)]
    assert low.mean() > 2 * high.mean()
    assert heights.min() < 6 and heights.max() > H / 2  # a few pixels far away, over half the image up close


@pytest.mark.parametrize("near_x, level", [(1.5, 0), (0.8, 1), (0.5, 2)])
def test_near_object_occludes_far_one(monkeypatch, near_x, level):
    """A car 10 m away in front of one 25 m away: the more it covers the far one, the higher its ``occluded``."""
    far = StreetObject(0, 0.0, 25.0, 1.5, 1.7, 4.0, -math.pi / 2)
    near = StreetObject(0, near_x, 10.0, 1.5, 1.7, 4.0, -math.pi / 2)
    monkeypatch.setattr(street, "sample_objects", lambda r, sc, n: [far, near])
    for index in range(3):  # three horizons and road layouts
        f = street_frame(index, StreetConfig(height=96, clutter=0))
        assert f.labels.tolist() == [1, 1] and f.truncated.tolist() == [0.0, 0.0]
        assert f.occluded.tolist() == [level, 0]
        (fx0, fy0, fx1, fy1), (nx0, ny0, nx1, ny1) = f.boxes.tolist()
        assert ny1 > fy1 and (ny1 - ny0) > 2 * (fy1 - fy0)  # the near box is lower and larger
        assert (min(fx1, nx1) > max(fx0, nx0)) == (level > 0)
    truck = StreetObject(2, 0.0, 10.0, 3.3, 2.5, 10.0, -math.pi / 2)  # right behind a truck: not labelled at all
    monkeypatch.setattr(street, "sample_objects", lambda r, sc, n: [far, truck])
    f = street_frame(0, StreetConfig(height=96, clutter=0))
    assert f.labels.tolist() == [3] and len(f.dontcare) == 0


def test_occlusion_and_truncation_fields_agree_with_the_boxes(written):
    """An object whose box meets no other box is not occluded; one not touching the border is not truncated."""
    occluded = truncated = 0
    for rows in frames_of(written).values():
        for i, r in enumerate(rows):
            if r["type"] == "DontCare":
                assert (r["truncated"], r["occluded"], r["alpha"], r["loc"]) == (-1, -1, -10, [-1000.0] * 3)
                continue
            others = [o["box"] for j, o in enumerate(rows) if j != i]
            x0, y0, x1, y1 = r["box"]
            alone = all(min(x1, b[2]) - max(x0, b[0]) < -0.02 or min(y1, b[3]) - max(y0, b[1]) < -0.02
                        for b in others)
            if alone:
                assert r["occluded"] == 0, r
            on_border = min(x0, y0) < 0.01 or x1 > W - 0.01 or y1 > H - 0.01
            if not on_border:
                assert r["truncated"] == 0, r
            occluded += r["occluded"] > 0
            truncated += r["truncated"] > 0
            assert r["dims"][0] > 0 and r["loc"][1] == pytest.approx(1.65) and r["loc"][2] > 0
    assert occluded > 0 and truncated > 0  # both happen in ordinary frames


def test_files_parse_and_match_the_renderer(written):
    frames = frames_of(written)
    assert sorted(frames) == list(range(SMALL.num_frames))
    assert sorted(p.name for p in (written / "image_2").iterdir()) == [f"{i:06d}.png" for i in range(12)]
    dontcare = 0
    for i, rows in frames.items():
        ref = street_frame(i, SMALL)
        labelled = [r for r in rows if r["type"] != "DontCare"]
        assert [r["type"] for r in labelled] == [STREET_CLASSES[k - 1] for k in ref.labels.tolist()]
        np.testing.assert_allclose([r["box"] for r in labelled], ref.boxes.numpy().reshape(-1, 4), atol=0.006)
        assert [r["occluded"] for r in labelled] == ref.occluded.tolist()
        dontcare += len(rows) - len(labelled)
        with Image.open(written / "image_2" / f"{i:06d}.png") as im:
            assert im.mode == "RGB" and im.size == (W, H)
            pixels = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
        assert (pixels - ref.image).abs().max() <= 0.5 / 255 + 1e-6
    assert dontcare > 0


def test_kitti_reader_reads_it_unchanged_and_ignores_dontcare(written):
    frames = frames_of(written)
    ds = KittiDetection(str(written), split="all", class_map=STREET_CLASS_MAP)
    assert ds.class_names == sorted(STREET_CLASSES) and len(ds) == SMALL.num_frames and ds.stats.clean()
    with_dontcare = 0
    for k in range(len(ds)):
        image, target = ds[k]
        rows = frames[int(target["image_id"])]
        labelled = [r for r in rows if r["type"] != "DontCare"]
        care = [r["box"] for r in rows if r["type"] == "DontCare"]
        with_dontcare += bool(care)
        assert image.shape == (3, H, W)
        assert [ds.class_names[i - 1] for i in target["labels"].tolist()] == [r["type"] for r in labelled]
        np.testing.assert_allclose(target["boxes"].numpy(), np.array([r["box"] for r in labelled]).reshape(-1, 4),
                                   atol=1e-4)
        for box in care:  # neither trained nor penalised: not a target at all
            assert not any(np.allclose(box, b, atol=1e-4) for b in target["boxes"].tolist())
    assert with_dontcare > 0
    train, val = (KittiDetection(str(written), s, STREET_CLASS_MAP, val_fraction=0.25) for s in ("train", "val"))
    ids = [int(t["image_id"]) for d in (train, val) for _, t in d]
    assert len(val) == 3 and sorted(ids) == list(range(SMALL.num_frames))


def test_dontcare_only_frame_is_a_negative(tmp_path):
    root = write_kitti(tmp_path, {"000000": [kitti_line("DontCare", (1, 1, 9, 9))],
                                  "000001": [kitti_line("Van", (2, 2, 30, 20))]})
    ds = KittiDetection(str(root), "all", STREET_CLASS_MAP)
    assert ds[0][1]["boxes"].shape == (0, 4) and ds[1][1]["labels"].tolist() == [ds.class_names.index("Van") + 1]


def test_manifest_no_op_mismatch_and_redo(tmp_path):
    cfg = StreetConfig(height=32, num_frames=4)
    root = write_street_kitti(tmp_path / "s", cfg, progress=False)
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["config"]["height"] == 32 and manifest["config"]["width"] == 106 and manifest["version"] >= 1
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    start = time.perf_counter()
    assert write_street_kitti(root, cfg, progress=False) == root
    assert time.perf_counter() - start < 0.5 and {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    with pytest.raises(ValueError, match=r"another config seed=0 \(asked: 1\); refusing to overwrite"):
        write_street_kitti(root, StreetConfig(height=32, num_frames=4, seed=1), progress=False)
    (root / MANIFEST).unlink()  # as if the write had been interrupted before its last step
    (root / "label_2" / "000002.txt").unlink()
    write_street_kitti(root, cfg, progress=False)
    assert (root / MANIFEST).is_file() and (root / "label_2" / "000002.txt").is_file()
    assert len(KittiDetection(str(root), "all", STREET_CLASS_MAP)) == 4


def test_interrupted_write_is_redone_and_leaves_nothing_complete(tmp_path, monkeypatch):
    real = street.street_frame

    def crash_at_two(index, cfg):
        if index == 2:
            raise KeyboardInterrupt
        return real(index, cfg)

    monkeypatch.setattr(street, "street_frame", crash_at_two)
    bigger = StreetConfig(height=32, num_frames=5, seed=1)
    with pytest.raises(KeyboardInterrupt):
        write_street_kitti(tmp_path, bigger, progress=False)
    assert not (tmp_path / MANIFEST).exists() and not street.street_set_complete(tmp_path, bigger)
    monkeypatch.setattr(street, "street_frame", real)
    cfg = StreetConfig(height=32, num_frames=1, seed=2)  # another config may take over our own unfinished folder
    write_street_kitti(tmp_path, cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "label_2").iterdir()) == ["000000.txt"]
    assert (tmp_path / "label_2" / "000000.txt").read_text() == "".join(
        line + "\n" for line in street.kitti_label_lines(real(0, cfg)))


def test_refuses_to_overwrite_kitti_data_it_did_not_write(tmp_path):
    write_kitti(tmp_path, {"000000": [kitti_line("Car", (1, 1, 9, 9))]})
    with pytest.raises(ValueError, match="street generator did not write"):
        write_street_kitti(tmp_path, StreetConfig(height=32, num_frames=1), progress=False)
    with pytest.raises(ValueError, match="street generator did not write"):
        DetectionDataModule("street", street=StreetConfig(height=32, num_frames=1), data_root=str(tmp_path))


def test_datamodule_street_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = StreetConfig(height=48, num_frames=6, max_objects=4)
    dm = DetectionDataModule("street", street=cfg, batch_size=2, val_fraction=0.34, data_seed=3)
    assert dm.num_classes == 6 and dm.class_names == ["Car", "Cyclist", "Pedestrian", "Truck", "Van"]
    assert not (tmp_path / "data").exists()  # nothing written before the data are needed
    dm.prepare_data()
    assert (tmp_path / "data" / "street" / MANIFEST).is_file()
    dm.setup("fit")
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 2
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == 2 and images[0].shape[0] == 3 and targets[0]["boxes"].shape[1:] == (4,)
    assert len(dm.calibration_batches(1)) == 1
    hp = dict(dm.hparams)

    def plain(x):
        return (x is None or isinstance(x, str | int | float | bool)
                or isinstance(x, list | tuple) and all(map(plain, x))
                or isinstance(x, dict) and all(isinstance(k, str) and plain(v) for k, v in x.items()))

    assert plain(hp) and hp["street"]["width"] == 158
    torch.save(hp, tmp_path / "hp.pt")
    again = DetectionDataModule(**torch.load(tmp_path / "hp.pt", weights_only=True))
    assert again.data_source.street == cfg and again.num_classes == 6 and again.data_seed == 3
    again.setup("validate")  # the set is there: read, not rewritten
    assert len(again.val_dataset) == 2
    with pytest.raises(ValueError, match=r"another config height=48 \(asked: 64\)"):
        DetectionDataModule("street", street=StreetConfig(height=64, num_frames=6))


def test_lazy_write_outside_a_trainer(tmp_path):
    dm = DetectionDataModule("street", street=StreetConfig(height=32, num_frames=3), data_root=str(tmp_path / "s"),
                             batch_size=1)
    dm.setup("validate")  # no prepare_data(): the data module writes what it needs itself
    assert (tmp_path / "s" / MANIFEST).is_file() and len(dm.val_dataset) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 16}, r"height must be an integer in \[32, 4096\], got 16"),
    ({"height": 64.5}, "height must be an integer"),
    ({"width": -3}, r"width must be an integer in \[32, 16384\], got -3"),
    ({"num_frames": 0}, "num_frames must be an integer"),
    ({"min_objects": 5, "max_objects": 2}, "min_objects <= max_objects, got 5 > 2"),
    ({"clutter": -1}, "clutter must be an integer"),
    ({"noise": -0.1}, r"noise must be a number in \[0, 0.5\]"),
    ({"noise": "high"}, "noise must be a number"),
    ({"seed": True}, "seed must be an integer"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StreetConfig(**kwargs)
    assert StreetConfig(height=40, width=0).width == 132 and StreetConfig(height=40, width=200).width == 200


def test_worker_processes_write_the_same_bytes(tmp_path):
    cfg = StreetConfig(height=32, num_frames=5)
    serial = write_street_kitti(tmp_path / "serial", cfg, progress=False, workers=0)
    parallel = write_street_kitti(tmp_path / "parallel", cfg, progress=False, workers=2)
    files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file())
    assert all((serial / f).read_bytes() == (parallel / f).read_bytes() for f in files)
    assert not [p for p in parallel.rglob(".*")]  # no temporaries left behind
