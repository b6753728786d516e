"""The shared sample checks: box clipping/dropping with counts, image loading errors that name the file."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fqn.data.sanitize import DataError, SanitizeStats, check_label, image_size, load_image, sanitize_boxes
from tests.data.files import truncate, write_garbage, write_png


def test_sanitize_boxes_clips_drops_and_counts():
    stats = SanitizeStats()
    boxes = [[-4.0, 2.0, 10.0, 8.0],  # sticks out left: clipped
             [5.0, 5.0, 30.0, 25.0],  # sticks out right and bottom: clipped
             [3.0, 3.0, 3.5, 9.0],  # 0.5 px wide: dropped
             [25.0, 5.0, 40.0, 9.0],  # entirely right of the image: nothing left after clipping, dropped
             [1.0, float("nan"), 4.0, 6.0],  # non-finite: dropped
             [2.0, 2.0, 6.0, 6.0]]  # fine
    kept, keep = sanitize_boxes(boxes, width=20, height=16, stats=stats)
    assert keep.tolist() == [True, True, False, False, False, True]
    expected = torch.tensor([[0.0, 2.0, 10.0, 8.0], [5.0, 5.0, 20.0, 16.0], [2.0, 2.0, 6.0, 6.0]])
    torch.testing.assert_close(kept, expected)
    assert kept.dtype == torch.float32
    assert (stats.boxes, stats.clipped, stats.dropped_degenerate, stats.dropped_nonfinite) == (6, 2, 2, 1)
    assert stats.summary().startswith("6 boxes: 2 clipped, 3 dropped (2 degenerate, 1 non-finite)")


def test_sanitize_boxes_empty_and_inverted():
    kept, keep = sanitize_boxes(np.zeros((0, 4)), 10, 10)
    assert kept.shape == (0, 4) and keep.shape == (0,)
    stats = SanitizeStats()
    kept, _ = sanitize_boxes([[8.0, 8.0, 2.0, 2.0]], 10, 10, stats)  # x2 < x1: no area
    assert kept.shape == (0, 4) and stats.dropped_degenerate == 1


def test_stats_log_one_warning_per_dataset(caplog):
    stats = SanitizeStats()
    sanitize_boxes([[-1.0, 0.0, 5.0, 5.0]] * 50, 10, 10, stats)
    stats.skip("missing image", "a.png: image file is missing")
    with caplog.at_level(logging.WARNING, logger="fqn.data.sanitize"):
        stats.log("my set")
        SanitizeStats().log("clean set")  # nothing to say: silent
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "my set" in message and "50 clipped" in message and "1 missing image" in message and "a.png" in message


def test_check_label():
    assert check_label("dog", ["cat", "dog"], "x.txt line 3") == 2
    with pytest.raises(DataError, match=r"x.txt line 3: label 'cow' is not in the class map"):
        check_label("cow", ["cat", "dog"], "x.txt line 3")


def test_load_image_good(tmp_path):
    pixels = write_png(tmp_path / "a.png", 7, 5)
    image = load_image(str(tmp_path / "a.png"), expected_size=(7, 5))
    assert image.dtype == torch.float32 and image.shape == (3, 5, 7)
    torch.testing.assert_close(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    assert image_size(str(tmp_path / "a.png")) == (7, 5)


def test_load_image_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "missing.png")
    with pytest.raises(DataError, match=r"missing\.png: image file is missing") as e:
        load_image(missing)
    assert e.value.reason == "missing image" and isinstance(e.value, ValueError)
    garbage = tmp_path / "garbage.png"
    write_garbage(garbage)
    with pytest.raises(DataError, match=r"garbage\.png: image file is corrupt"):
        load_image(str(garbage))
    with pytest.raises(DataError, match=r"garbage\.png: image file is corrupt"):
        image_size(str(garbage))
    write_png(tmp_path / "cut.png", 64, 64)
    truncate(tmp_path / "cut.png")
    assert image_size(str(tmp_path / "cut.png")) == (64, 64)  # the header survives ...
    with pytest.raises(DataError, match=r"cut\.png: image file is corrupt"):  # ... the pixels do not
        load_image(str(tmp_path / "cut.png"))
    write_png(tmp_path / "b.png", 8, 6)
    with pytest.raises(DataError, match=r"b\.png: image is 8x6 but the annotations say 6x8"):
        load_image(str(tmp_path / "b.png"), expected_size=(6, 8))
