"""`fqn predict` on what deployers point it at: folders of mixed images, bad files, a video, huge and tiny images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fqn import QuantConfig, calibrate, prepare_qat
from fqn.commands import predict
from fqn.commands.cli import main
from fqn.data.synthetic import synthetic_scenes
from fqn.int8 import convert_int8, load_int8
from fqn.models import build_detector

from .train.tiny import DETECTOR, SIZE, tiny_data


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny float checkpoint and the int8 file of its w8a8 PTQ."""
    root = tmp_path_factory.mktemp("predict_models")
    torch.manual_seed(0)
    model = build_detector("resnet18", 4, min_size=SIZE, max_size=SIZE, **DETECTOR).eval()
    hp = {"backbone": "resnet18", "num_classes": 4, "min_size": SIZE, "max_size": SIZE, "detector": DETECTOR,
          "quant": None}
    ckpt = root / "float.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hp},
               ckpt)
    q = calibrate(prepare_qat(model, QuantConfig(bits_w=8, bits_a=8)), tiny_data().calibration_batches(2), 2,
                  progress=False).eval()
    onnx_path = convert_int8(q, root / "w8.onnx", synthetic_scenes(1, SIZE))
    return ckpt, onnx_path


def _rgb(seed: int = 0, size: tuple[int, int] = (SIZE, SIZE + 16)) -> np.ndarray:
    img = synthetic_scenes(1, max(size), seed=seed)[0][:, : size[0], : size[1]]
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _folder(root):
    d = root / "images"
    d.mkdir()
    rgb = _rgb()
    Image.fromarray(rgb).save(d / "a_rgb.png")
    Image.fromarray(rgb).convert("L").save(d / "b_gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(d / "c_rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(d / "d_16bit.png")  # 16-bit greyscale PNG
    Image.fromarray(rgb).convert("P").save(d / "e_palette.gif")
    Image.fromarray(rgb[:4, :4]).save(d / "f_tiny.png")
    (d / "g:corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "h_empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.mark.slow  # fqn predict end to end on a converted detector (models)
def test_folder_of_mixed_images_gives_coco_json_drawn_images_and_reasons(models, tmp_path, capsys):
    _, onnx_path = models
    folder = _folder(tmp_path)
    assert main(["predict", str(onnx_path), str(folder), "--out", str(tmp_path / "out"), "--min-score", "0",
                 "--class-names", "car", "person", "bike"]) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "skipped 3" in printed
    doc = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [i["file_name"] for i in doc["images"]] == ["a_rgb.png", "b_gray.png", "c_rgba.png", "d_16bit.png",
                                                      "e_palette.gif"]
    reasons = {s["file"].split("/")[-1]: s["reason"] for s in doc["skipped"]}
    assert set(reasons) == {"f_tiny.png", "g:corrupt.jpg", "h_empty.png"}
    assert "too small" in reasons["f_tiny.png"] and "empty" in reasons["h_empty.png"]
    assert "not a readable image" in reasons["g:corrupt.jpg"] or "corrupt" in reasons["g:corrupt.jpg"]
    assert {c["name"] for c in doc["categories"]} == {"car", "person", "bike"}
    assert sorted(p.name for p in (tmp_path / "out" / "drawn").iterdir()) == [
        "a_rgb.jpg", "b_gray.jpg", "c_rgba.jpg", "d_16bit.jpg", "e_palette.jpg"]
    # the JSON holds what the int8 model, called directly on the same pixels, detects (boxes as COCO x, y, w, h)
    direct = load_int8(onnx_path)([torch.from_numpy(_rgb().astype(np.float32) / 255).permute(2, 0, 1)])[0]
    mine = [a for a in doc["annotations"] if a["image_id"] == 1]
    assert len(mine) == len(direct["boxes"]) > 0
    for a, box, score, label in zip(mine, direct["boxes"].tolist(), direct["scores"].tolist(),
                                    direct["labels"].tolist()):
        assert a["category_id"] == label and a["score"] == pytest.approx(score, abs=1e-5)
        assert a["bbox"] == pytest.approx([box[0], box[1], box[2] - box[0], box[3] - box[1]], abs=0.01)
        assert 0 <= a["bbox"][0] and a["bbox"][0] + a["bbox"][2] <= SIZE + 16 + 0.01


def test_conversions_to_rgb_in_0_1():
    """16-bit greyscale keeps its value (not clipped to 255/65535), RGBA composites on white, palette expands."""
    grey16 = predict._frame("g", Image.fromarray(np.full((20, 30), 32768, np.uint16)))
    assert grey16.image.shape == (3, 20, 30) and float(grey16.image.mean()) == pytest.approx(0.5, abs=1e-3)
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent
    clear = predict._frame("t", Image.fromarray(rgba))
    assert torch.allclose(clear.image, torch.ones_like(clear.image))
    rgba[..., 3] = 255
    opaque = predict._frame("o", Image.fromarray(rgba))
    assert float(opaque.image[0].mean()) == pytest.approx(200 / 255) and float(opaque.image[1:].max()) == 0


@pytest.mark.slow  # fqn predict end to end on a converted detector (models)
def test_huge_image_is_shrunk_and_boxes_come_back_in_its_pixels(models, tmp_path, monkeypatch):
    ckpt, onnx_path = models
    monkeypatch.setattr(predict, "SHRINK_SIDE", 200)
    big = np.kron(_rgb(1, (SIZE, SIZE)), np.ones((3, 3, 1), np.uint8))  # 3x larger than the shrink side allows
    Image.fromarray(big).save(tmp_path / "big.png")
    frame = predict.read_image(tmp_path / "big.png")
    assert frame.scale == pytest.approx(3 * SIZE / 200) and max(frame.image.shape[1:]) == 200
    r = predict.run_predict(onnx_path, tmp_path / "big.png", tmp_path / "out", min_score=0.0, progress=False)
    doc = json.loads(r.json_path.read_text())
    assert doc["images"][0]["width"] == 3 * SIZE and r.detections > 0
    right = max(a["bbox"][0] + a["bbox"][2] for a in doc["annotations"])
    assert right <= 3 * SIZE + 0.5 and right > 200  # in the original image's pixels, not the shrunk ones
    monkeypatch.setattr(predict, "MAX_PIXELS", 1000)
    with pytest.raises(predict.InputError, match="megapixels"):
        predict.read_image(tmp_path / "big.png")


@pytest.mark.slow  # fqn predict end to end on a converted detector (models)
def test_video_in_both_kinds_of_model_and_openvino(models, tmp_path):
    import cv2

    ckpt, onnx_path = models
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (SIZE + 16, SIZE))
    for seed in range(3):
        writer.write(np.ascontiguousarray(_rgb(seed)[..., ::-1]))
    writer.release()
    r = predict.run_predict(ckpt, path, tmp_path / "ckpt", progress=False)
    doc = json.loads(r.json_path.read_text())
    assert [i["frame_index"] for i in doc["images"]] == [0, 1, 2] and "PyTorch" in doc["info"]["description"]
    assert doc["info"]["video"]["frames"] == 3 and (tmp_path / "ckpt" / "drawn" / "clip_detections.mp4").is_file()
    ov = predict.run_predict(onnx_path, path, tmp_path / "ov", runtime="openvino", draw=False, progress=False)
    assert ov.images == 3 and ov.images_per_second > 0 and not (tmp_path / "ov" / "drawn").exists()


@pytest.mark.slow  # fqn predict end to end on a converted detector (models)
def test_bad_sources_and_values_are_one_line_errors(models, tmp_path):  # the message names the file
    _, onnx_path = models
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cases = [([str(onnx_path), str(tmp_path / "missing.png")], "does not exist"),
             ([str(onnx_path), str(tmp_path / "empty")], "holds no images"),
             ([str(onnx_path), str(tmp_path / "bad.png")], "could be run"),
             ([str(tmp_path / "nope.onnx"), str(tmp_path / "bad.png")], "does not exist"),
             ([str(onnx_path), str(tmp_path / "bad.png"), "--min-score", "2"], "within")]
    for i, (args, message) in enumerate(cases):
        with pytest.raises(SystemExit, match=message):
            main(["predict", *args, "--out", str(tmp_path / f"o{i}")])
    with pytest.raises(SystemExit, match="already exists"):  # the run that skipped bad.png wrote its JSON there
        main(["predict", str(onnx_path), str(tmp_path / "bad.png"), "--out", str(tmp_path / "o2")])


def test_unknown_runtime_is_refused_by_the_parser(tmp_path, capsys):
    """Refused while parsing, before the model file is read: no model needed."""
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tmp_path / "w8.onnx"), str(tmp_path), "--out", str(tmp_path / "o"), "--runtime",
              "tensorrt"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
