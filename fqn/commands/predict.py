"""``fqn predict``: a deployer's first run of a model on their own pictures: an image, a folder or a video.

The model is an ONNX file `fqn convert` wrote (run by ONNX Runtime or OpenVINO, as deployed) or a
checkpoint (run by PyTorch). Detections go to ``detections.json`` in COCO form (``images``,
``annotations`` with a ``score``, ``categories``; boxes in the input's own pixels), drawn copies go to
``drawn/`` (a video becomes a drawn video), and the achieved images per second are printed.

Inputs are checked before they reach a runtime: unreadable or empty files are skipped with the reason
(listed under ``skipped`` in the JSON); grayscale, palette, RGBA, CMYK and 16-bit images are converted to
8-bit-range RGB; images smaller than `MIN_SIDE` are refused, and larger than `MAX_PIXELS` too (a
decompression bomb, or a scan nobody meant to run a detector on).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from tqdm import tqdm

from fqn.commands.common import fresh_file
from fqn.int8.convert import load_int8
from fqn.models.checkpoint import load_detector
from fqn.quant.state import quant_config
from fqn.viz import draw_detections

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".gif"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
MIN_SIDE = 8  # pixels; below this there is nothing to detect and the upscaling would invent it
MAX_PIXELS = 200_000_000  # ~14000 x 14000
SHRINK_SIDE = 4096  # larger images are shrunk before the detector (which resizes to <= max_size anyway)


class InputError(ValueError):
    """An input the detector cannot be run on; the message says why (the file is skipped, the run goes on).

    ``source`` is the file (or frame) it is about, kept apart from the message so that a report can name
    it even when the path itself contains ``:``.
    """

    def __init__(self, source: str | Path, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = str(source)
        self.reason = reason


@dataclass
class Frame:
    """One picture to run: its name in the outputs, the RGB image in [0, 1], and the factor back to its pixels."""

    name: str
    image: Tensor
    width: int
    height: int
    scale: float = 1.0  # original pixels per pixel of ``image`` (> 1 when a huge image was shrunk)
    frame_index: int | None = None


def _to_rgb_array(img: Any) -> np.ndarray:
    """An HxWx3 float32 array in [0, 1] from any PIL mode: 16/32-bit and float images scaled, alpha dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
    elif img.mode == "I":  # 32-bit integer: PNG 16-bit greyscale is read as "I" by some PIL versions
        arr = np.asarray(img, dtype=np.int64).astype(np.float32)
        arr = arr / 65535.0 if arr.max() > 255 else arr / 255.0
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        top = float(np.nanmax(arr)) if arr.size else 1.0
        arr = arr / (top if top > 1.0 else 1.0)
    else:
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent parts on white
            img = Image.alpha_composite(background, rgba)
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    arr = np.nan_to_num(np.clip(arr, 0.0, 1.0))
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr[..., :3]


def read_image(path: str | Path) -> Frame:
    """The image at ``path`` as a `Frame`, or `InputError` saying why it cannot be run."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise InputError(path, f"{width}x{height} is larger than {MAX_PIXELS / 1e6:.0f} megapixels")
                img.load()
                img = ImageOps.exif_transpose(img)
    except InputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InputError(path, f"not a readable image ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise InputError(path, f"corrupt or truncated image ({err})") from None
    return _frame(path.name, img)


def _frame(name: str, img: Any, frame_index: int | None = None) -> Frame:
    width, height = img.size
    if min(width, height) < MIN_SIDE:
        raise InputError(name, f"{width}x{height} is too small to detect anything (need >= {MIN_SIDE} px a side)")
    scale = 1.0
    if max(width, height) > SHRINK_SIDE:
        scale = max(width, height) / SHRINK_SIDE
        if img.mode not in ("RGB", "L", "RGBA"):
            img = Image.fromarray((_to_rgb_array(img) * 255).round().astype(np.uint8))
        img = img.resize((max(1, round(width / scale)), max(1, round(height / scale))), Image.Resampling.BILINEAR)
    image = torch.from_numpy(np.ascontiguousarray(_to_rgb_array(img).transpose(2, 0, 1)))
    return Frame(name, image, width, height, scale, frame_index)


def video_frames(path: str | Path) -> tuple[Iterator[Frame], dict[str, Any]]:
    """The frames of a video (OpenCV), and its fps / size / frame count; `InputError` if it cannot be opened."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise InputError(path, "not a readable video")
    info = {"fps": cap.get(cv2.CAP_PROP_FPS) or 25.0, "frames": int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
            "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))}

    def frames() -> Iterator[Frame]:
        index = 0
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                yield _frame(f"{path.stem}_{index:06d}", Image.fromarray(bgr[..., ::-1].copy()), index)
                index += 1
        finally:
            cap.release()

    return frames(), info


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


@dataclass
class Predictor:
    """A detector (an int8 ONNX file or a checkpoint) and what its labels are called."""

    detect: Callable[[list[Tensor]], list[dict[str, Tensor]]]
    description: str
    num_classes: int
    class_names: list[str] = field(default_factory=list)

    def name_of(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else f"class_{label}"


def load_predictor(model: str | Path, runtime: str = "onnxruntime", threads: int | None = None,
                   class_names: Sequence[str] | None = None) -> Predictor:
    """``model``: a ``.onnx`` file (`load_int8`, in ``runtime``) or a checkpoint (PyTorch, fake-quant or float)."""
    model = Path(model)
    if not model.exists():
        raise FileNotFoundError(f"model {model} does not exist")
    names = ["background", *class_names] if class_names else []
    if model.suffix.lower() == ".onnx":
        detector = load_int8(model, threads, runtime)
        if not names and detector.metadata.get("fqn.class_names"):  # recorded by `fqn convert`
            names = ["background", *json.loads(detector.metadata["fqn.class_names"])]
        num = int(detector.metadata.get("fqn.num_classes", 0)) or len(names)
        return Predictor(detector, f"{model.name} ({detector.metadata.get('fqn.bits', 'float')}, {runtime})", num,
                         names)

    if threads:
        torch.set_num_threads(threads)
    net, _ = load_detector(model)
    net = net.cpu().eval()
    cfg = quant_config(net)
    kind = "float" if cfg is None else f"fake-quant w{cfg.bits_w}a{cfg.bits_a}"

    def detect(images: list[Tensor]) -> list[dict[str, Tensor]]:
        with torch.no_grad():
            return net(images)

    return Predictor(detect, f"{model.name} ({kind}, PyTorch)", net.roi_heads.box_predictor.cls_score.out_features,
                     names)


@dataclass
class PredictResult:
    """What `run_predict` did: images run, skipped (with reasons), time in the detector, where the outputs are."""

    images: int
    detections: int
    skipped: list[dict[str, str]]
    detector_seconds: float
    total_seconds: float
    json_path: Path
    drawn: Path | None

    @property
    def images_per_second(self) -> float:
        return self.images / self.detector_seconds if self.detector_seconds > 0 else float("nan")


def _sources(source: Path) -> tuple[str, list[Path]]:
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if source.is_dir():
        files = list_images(source)
        if not files:
            raise ValueError(f"{source} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
        return "folder", files
    if source.suffix.lower() in VIDEO_EXTS:
        return "video", [source]
    return "image", [source]


def run_predict(model: str | Path, source: str | Path, out: str | Path, *, runtime: str = "onnxruntime",
                threads: int | None = None, min_score: float = 0.05, draw_score: float = 0.5, draw: bool = True,
                class_names: Sequence[str] | None = None, progress: bool = True) -> PredictResult:
    """Run ``model`` on ``source`` (an image, a folder of images or a video) and write the outputs to ``out``.

    ``min_score``: detections kept in the JSON; ``draw_score``: those drawn. Nothing is lost on a
    crash of one input: it is skipped with its reason, and the JSON is written at the end of every run.
    """
    if not 0.0 <= min_score <= 1.0 or not 0.0 <= draw_score <= 1.0:
        raise ValueError("--min-score and --draw-score must be within [0, 1]")
    source, out = Path(source), Path(out)
    kind, files = _sources(source)

    fresh_file(out / "detections.json")  # an earlier run's detections stay as they are
    predictor = load_predictor(model, runtime, threads, class_names)
    out.mkdir(parents=True, exist_ok=True)
    drawn = out / "drawn" if draw else None
    if drawn is not None:
        drawn.mkdir(exist_ok=True)
    images, annotations, skipped = [], [], []
    writer, video_info = None, None
    start, in_detector = time.perf_counter(), 0.0
    if kind == "video":
        frames, video_info = video_frames(files[0])
        total = video_info["frames"] or None
        stream: Iterator[Frame | InputError] = frames
    else:
        total = len(files)
        stream = (_read_or_error(p) for p in files)
    bar = tqdm(stream, total=total, desc=f"fqn predict {predictor.description}", unit="img", disable=not progress)
    try:
        for item in bar:
            if isinstance(item, InputError):
                skipped.append({"file": item.source, "reason": str(item)})
                bar.write(f"skipped: {item}")
                continue
            t0 = time.perf_counter()
            det = predictor.detect([item.image])[0]
            in_detector += time.perf_counter() - t0
            image_id = len(images) + 1
            entry = {"id": image_id, "file_name": item.name, "width": item.width, "height": item.height}
            if item.frame_index is not None:
                entry["frame_index"] = item.frame_index
            images.append(entry)
            boxes = det["boxes"].detach().float().cpu() * item.scale
            for box, score, label in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist()):
                if score < min_score:
                    continue
                x1, y1, x2, y2 = box
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                    "area": round((x2 - x1) * (y2 - y1), 2), "score": round(float(score), 5),
                                    "iscrowd": 0})
            if drawn is not None:
                picture = _drawn(item, det, predictor, draw_score)
                if kind == "video":
                    writer = writer or _video_writer(drawn / f"{files[0].stem}_detections.mp4", video_info,
                                                     picture.shape[1], picture.shape[0])
                    writer.write(np.ascontiguousarray(picture[..., ::-1]))
                else:
                    Image.fromarray(picture).save(drawn / f"{Path(item.name).stem}.jpg", quality=90)
            bar.set_postfix(img_per_s=f"{len(images) / in_detector:.1f}" if in_detector else "-")
    finally:
        bar.close()
        if writer is not None:
            writer.release()
        json_path = _write_json(out / "detections.json", predictor, images, annotations, skipped, source,
                                video_info, in_detector)
    result = PredictResult(len(images), len(annotations), skipped, in_detector, time.perf_counter() - start,
                           json_path, drawn)
    if not images:
        raise ValueError(f"no image of {source} could be run: " + "; ".join(s["reason"] for s in skipped[:3]))
    return result


def run_predict_command(model: str | Path, source: str | Path, out: str | Path, *, min_score: float = 0.05,
                        **options: Any) -> PredictResult:
    """``fqn predict``: `run_predict`, then what a person at the terminal wants to know: how many images and
    detections, how fast, what was skipped, and where the outputs are."""
    r = run_predict(model, source, out, min_score=min_score, **options)
    print(f"{r.images} image(s), {r.detections} detections >= {min_score}; {r.images_per_second:.2f} images/s in "
          f"the detector ({r.images / r.total_seconds:.2f} images/s with reading and drawing)")
    if r.skipped:
        print(f"skipped {len(r.skipped)}: " + "; ".join(s["reason"] for s in r.skipped[:5]))
    print(f"detections: {r.json_path}" + (f"; drawn: {r.drawn}" if r.drawn else ""))
    return r


def _read_or_error(path: Path) -> Frame | InputError:
    try:
        return read_image(path)
    except InputError as err:
        return err


def _drawn(item: Frame, det: dict[str, Tensor], predictor: Predictor, draw_score: float) -> np.ndarray:
    """HxWx3 uint8: the image the detector saw (shrunk if it was huge) with the detections above ``draw_score``."""
    names = [predictor.name_of(i) for i in range(max(predictor.num_classes, 1))]
    picture = draw_detections(item.image, None, det, names, score_threshold=draw_score)
    return picture.permute(1, 2, 0).numpy()


def _video_writer(path: Path, info: dict[str, Any], width: int, height: int) -> Any:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(info["fps"]), (width, height))
    if not writer.isOpened():
        raise OSError(f"cannot write the drawn video {path} (OpenCV has no mp4v encoder here); use --no-draw")
    return writer


def _write_json(path: Path, predictor: Predictor, images: list, annotations: list, skipped: list, source: Path,
                video_info: dict[str, Any] | None, seconds: float) -> Path:
    labels = sorted({a["category_id"] for a in annotations} | set(range(1, predictor.num_classes)))
    doc = {"info": {"description": f"fqn predict: {predictor.description} on {source}",
                    "images_per_second": round(len(images) / seconds, 3) if seconds else None,
                    **({"video": video_info} if video_info else {})},
           "images": images, "annotations": annotations,
           "categories": [{"id": i, "name": predictor.name_of(i)} for i in labels],
           "skipped": skipped}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path
