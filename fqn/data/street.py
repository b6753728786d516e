"""The second built-in benchmark: street-like scenes written to disk as a KITTI-format data set.

Numbers tuned on one generator can be tuned to it, so this set differs from :mod:`fqn.data.synthetic` in everything
but being procedural: wide KITTI-shaped frames (1:3.3), a perspective road with lane markings, buildings, trees,
poles and signs as unlabelled clutter, shadows, lighting and sensor noise, and five KITTI classes whose class is in
the silhouette (car: low body, cabin, wheels; van: tall box; truck: cargo box and cab; pedestrian: head, torso,
legs; cyclist: a rider on two wheel rings). Objects stand on the ground, so size follows distance: a few pixels at
the horizon, more than half the image at the bottom. They are drawn far to near, so near ones occlude far ones, and
labelled as KITTI does: the box is the full extent clipped to the image, ``truncated`` the fraction outside it,
``occluded`` 0/1/2 from the visible fraction; objects almost hidden or too small become ``DontCare`` regions.

It goes to disk (``image_2/``, ``label_2/``) rather than being rendered on the fly so that it exercises the same
KITTI reader, split and sanitizing as real data: :class:`fqn.data.kitti.KittiDetection` reads it unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fqn.data.street_scene import (
    CAM_HEIGHT,
    Draws,
    background,
    darken,
    draw_clutter,
    object_parts,
    paint,
    sample_objects,
    sample_scene,
)

#: The street set's classes, KITTI type names; ``render_street`` labels are 1-based indices into this tuple.
STREET_CLASSES = ("Car", "Van", "Truck", "Pedestrian", "Cyclist")
#: The KITTI class map that reads the set back: each type as itself (a reader numbers them alphabetically).
STREET_CLASS_MAP: dict[str, str | None] = {name: name for name in STREET_CLASSES}
MANIFEST = "street_manifest.json"  # written last: its presence means the folder is complete
STARTED = "street_started.json"  # written first: the folder is ours, so an unfinished write may be redone
FORMAT = "fqn-street-kitti"
FORMAT_VERSION = 1  # bump when the generator's output changes, so old folders are not taken for new ones
MIN_HEIGHT, MIN_WIDTH, MIN_VISIBLE = 3.0, 1.5, 0.1  # below any of these (pixels, fraction): a DontCare region


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"street {name} must be an integer in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class StreetConfig:
    """Knobs of the street generator; plain values only, so the config rides in checkpoints and manifests.

    Args:
        height: image height in pixels.
        width: image width; ``None`` or 0 is ``round(height * 3.3)``, KITTI's 375x1242 shape.
        num_frames: frames written (KITTI ids ``000000`` ...); the reader splits them into train and val.
        min_objects, max_objects: labelled objects per frame asked for (a placement that keeps colliding is dropped).
        clutter: unlabelled roadside things per frame (trees, poles, signs, bushes).
        noise: std of the per-pixel sensor noise.
        seed: the set's seed; frame ``i`` depends on ``(seed, i)`` only.

    Example:
        >>> StreetConfig(height=48).width
        158
    """

    height: int = 128
    width: int | None = None
    num_frames: int = 1200
    min_objects: int = 2
    max_objects: int = 8
    clutter: int = 8
    noise: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("height", self.height, 32, 4096)
        if self.width in (None, 0):
            object.__setattr__(self, "width", round(self.height * 3.3))
        _check_int("width", self.width, 32, 16384)
        _check_int("num_frames", self.num_frames, 1, 999_999)  # KITTI's six-digit frame ids
        _check_int("min_objects", self.min_objects, 1, 50)
        _check_int("max_objects", self.max_objects, 1, 50)
        if self.min_objects > self.max_objects:
            raise ValueError(f"street needs min_objects <= max_objects, got {self.min_objects} > {self.max_objects}")
        _check_int("clutter", self.clutter, 0, 500)
        _check_int("seed", self.seed, 0, 2**31 - 1)
        if isinstance(self.noise, bool) or not isinstance(self.noise, int | float) or not 0 <= self.noise <= 0.5:
            raise ValueError(f"street noise must be a number in [0, 0.5], got {self.noise!r}")

    @property
    def classes(self) -> tuple[str, ...]:
        """The five KITTI types, fixed: not a field, so no config can ask for another set."""
        return STREET_CLASSES


class StreetFrame(NamedTuple):
    """Everything one frame's label file holds: labelled objects (N), DontCare regions (K), KITTI's 3-D fields."""

    image: Tensor  # 3 x H x W float in [0, 1]
    boxes: Tensor  # N x 4 xyxy pixels, full extent clipped to the image
    labels: Tensor  # N, 1-based into STREET_CLASSES
    truncated: Tensor  # N float: fraction of the full box outside the image
    occluded: Tensor  # N int: 0 fully visible (> 95% of its pixels), 1 partly (50-95%), 2 largely (10-50%)
    dontcare: Tensor  # K x 4: objects too hidden or too small to label; neither trained nor penalised
    geometry: Tensor  # N x 8: alpha, h, w, l, x, y, z, ry (KITTI's fields, metres and radians)


def street_frame(index: int, cfg: StreetConfig) -> StreetFrame:
    """Draw frame ``index`` with all its labels; deterministic from ``(cfg.seed, index)`` and the config."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index + 7_777)
    r = Draws(g)
    sc = sample_scene(r, cfg.height, cfg.width)
    img = background(sc, r, g)
    draw_clutter(img, sc, r, cfg.clutter)
    objects = sample_objects(r, sc, int(r.u(cfg.min_objects, cfg.max_objects + 1 - 1e-9)))
    ids = torch.full((cfg.height, cfg.width), -1.0)  # which object each pixel shows (-1: none)
    sun = r.u(-0.6, 0.6)
    own = []
    for k, obj in enumerate(objects):  # far to near: nearer objects paint over farther ones
        x0, y0, x1, y1 = obj.box(sc)
        darken(img, (x0 + x1) / 2 + sun * (y1 - y0) * 0.3, y1, (x1 - x0) * 0.6 + 1, (y1 - y0) * 0.06 + 0.5, 0.5)
        parts, flip = object_parts(obj, r)
        own.append(paint(img, ids, (x0, y0, x1, y1), parts, k, flip))
    visible = torch.bincount((ids.flatten() + 1).long(), minlength=len(objects) + 1)[1:].tolist()
    img = _camera(img, r, g, cfg.noise)
    rows, cares, truncs, occs, geoms = [], [], [], [], []
    for k, obj in enumerate(objects):
        full = obj.box(sc)
        clipped = (max(full[0], 0.0), max(full[1], 0.0), min(full[2], cfg.width), min(full[3], cfg.height))
        cw, ch = clipped[2] - clipped[0], clipped[3] - clipped[1]
        if visible[k] == 0 or cw <= 0 or ch <= 0:
            continue  # nothing of it shows: not even a DontCare region
        seen = visible[k] / max(own[k], 1)
        if ch < MIN_HEIGHT or cw < MIN_WIDTH or seen < MIN_VISIBLE:
            cares.append(clipped)
            continue
        rows.append((*clipped, obj.cls + 1))
        truncs.append(1 - cw * ch / ((full[2] - full[0]) * (full[3] - full[1])))
        occs.append(0 if seen > 0.95 else 1 if seen >= 0.5 else 2)
        geoms.append((obj.alpha(), obj.h, obj.w, obj.l, obj.x, CAM_HEIGHT, obj.z, obj.ry))
    table = torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)
    return StreetFrame(img, table[:, :4], table[:, 4].long(), torch.tensor(truncs, dtype=torch.float32),
                       torch.tensor(occs, dtype=torch.int64), torch.tensor(cares, dtype=torch.float32).reshape(-1, 4),
                       torch.tensor(geoms, dtype=torch.float32).reshape(-1, 8))


def _camera(img: Tensor, r: Draws, g: torch.Generator, noise: float) -> Tensor:
    """Exposure, white balance, gamma, vignetting, a little optical blur and sensor noise."""
    h, w = img.shape[1:]
    tint = torch.tensor([r.u(0.9, 1.1), 1.0, r.u(0.88, 1.12)]).view(3, 1, 1)
    img = torch.exp(torch.log((img * r.u(0.55, 1.3) * tint).clamp(1e-4, 1)) * r.u(0.8, 1.25))  # gain, gamma
    xs = torch.linspace(-1, 1, w).view(1, 1, -1)
    ys = torch.linspace(-1, 1, h).view(1, -1, 1)
    img = img * (1 - r.u(0, 0.3) * (0.7 * xs**2 + 0.3 * ys**2))
    pad = F.pad(img.unsqueeze(0), (1, 1, 1, 1), mode="replicate")[0]  # a 3x3 box blur, separably
    rows = pad[:, :, :-2] + pad[:, :, 1:-1] + pad[:, :, 2:]
    img = 0.6 * img + (0.4 / 9) * (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:])
    img = img + noise * torch.randn(img.shape, generator=g) + noise * 0.5 * torch.randn(1, h, 1, generator=g)
    return img.clamp(0, 1)


def render_street(index: int, cfg: StreetConfig) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(image 3xHxW in [0, 1], boxes Nx4 xyxy, labels N 1-based, truncated N, occluded N)`` of frame ``index``.

    The labelled objects only; :func:`street_frame` also gives the DontCare regions and KITTI's 3-D fields.

    Example:
        >>> image, boxes, labels, truncated, occluded = render_street(0, StreetConfig(height=48))
        >>> tuple(image.shape), boxes.shape[1], bool((labels >= 1).all() and (labels <= 5).all())
        ((3, 48, 158), 4, True)
    """
    frame = street_frame(index, cfg)
    return frame.image, frame.boxes, frame.labels, frame.truncated, frame.occluded


def kitti_label_lines(frame: StreetFrame) -> list[str]:
    """KITTI label lines ``type truncated occluded alpha x1 y1 x2 y2 h w l x y z ry``; DontCare with KITTI's dummies."""
    lines = []
    for box, label, trunc, occ, geo in zip(frame.boxes.tolist(), frame.labels.tolist(), frame.truncated.tolist(),
                                           frame.occluded.tolist(), frame.geometry.tolist()):
        numbers = " ".join(f"{v:.2f}" for v in (geo[0], *box, *geo[1:]))
        lines.append(f"{STREET_CLASSES[label - 1]} {trunc:.2f} {occ} {numbers}")
    for box in frame.dontcare.tolist():
        lines.append("DontCare -1 -1 -10 " + " ".join(f"{v:.2f}" for v in box) + " -1 -1 -1 -1000 -1000 -1000 -10")
    return lines


# -- the KITTI folder -------------------------------------------------------------------------------------------------
def street_record(cfg: StreetConfig) -> dict[str, Any]:
    """What the manifest holds: the format, its version and the config, as plain JSON values."""
    return json.loads(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "config": dataclasses.asdict(cfg)}))


def street_set_complete(root: str | os.PathLike, cfg: StreetConfig) -> bool:
    """True if ``root`` holds the complete set of ``cfg``; False if it is empty or an unfinished write of ours.

    Raises:
        ValueError: ``root`` holds a complete set of another config or format version, or KITTI files that fqn did
            not write: regenerating there would overwrite someone's data.
    """
    root = Path(root)
    want = street_record(cfg)
    if (root / MANIFEST).is_file():
        try:
            have = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{root / MANIFEST}: unreadable street manifest ({e}); delete {root} to regenerate") from e
        if have == want:
            return True
        if have.get("version") != FORMAT_VERSION or have.get("format") != FORMAT:
            what = f"format {have.get('format')!r} version {have.get('version')!r} (this fqn writes {FORMAT_VERSION})"
        else:
            old = have.get("config", {})
            what = "config " + ", ".join(f"{k}={old.get(k)!r} (asked: {v!r})" for k, v in want["config"].items()
                                         if old.get(k) != v)
        raise ValueError(f"{root} holds a street set written with another {what}; refusing to overwrite it: "
                         "delete the folder, or point data_root (data.data_root) at another one")
    if not (root / STARTED).is_file() and any(_frame_files(root)):
        raise ValueError(f"{root} holds KITTI files that fqn's street generator did not write (no {MANIFEST}); "
                         "refusing to overwrite them: point data_root (data.data_root) at an empty or new folder")
    return False


def _frame_files(root: Path) -> list[Path]:
    return [p for sub in ("image_2", "label_2") if (root / sub).is_dir() for p in (root / sub).iterdir()]


def _replace(path: Path, write: Any) -> None:
    """``write(tmp)``, then rename over ``path``: a crash leaves the old file or a hidden temporary, not half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    _replace(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


class _FrameWriter(Dataset):
    """Item ``i`` renders frame ``i`` and writes its two files: a DataLoader's workers then write in parallel."""

    def __init__(self, root: Path, cfg: StreetConfig) -> None:
        self.root, self.cfg = root, cfg

    def __len__(self) -> int:
        return self.cfg.num_frames

    def __getitem__(self, i: int) -> int:
        frame = street_frame(i, self.cfg)
        pixels = (frame.image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        _replace(self.root / "image_2" / f"{i:06d}.png", lambda tmp: Image.fromarray(pixels).save(tmp, "PNG"))
        text = "".join(line + "\n" for line in kitti_label_lines(frame))
        _replace(self.root / "label_2" / f"{i:06d}.txt", lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return i


def write_street_kitti(root: str | os.PathLike, cfg: StreetConfig | None = None, *, progress: bool = True,
                       workers: int | None = None) -> Path:
    """Write the set of ``cfg`` to ``root/image_2/*.png`` and ``root/label_2/*.txt``; a no-op if it is there.

    The manifest (format version and config) is written last, so a folder that has one is complete; an
    interrupted write has none and is redone on the next call. Each file is written to a temporary and renamed.
    Concurrent writers (several DDP nodes on one shared folder) write identical bytes, so they cannot disagree.

    Args:
        root: the folder; created if missing.
        cfg: the generator's settings (default ``StreetConfig()``: 1200 frames of 128 x 422, about 130 MB).
        progress: show a tqdm bar.
        workers: DataLoader worker processes that render and write (default: one per CPU, up to 8; none for fewer
            than 16 frames). Each runs torch on one thread: the frames' small operations gain nothing from
            more, and on a busy machine several threads per operation wait for each other far longer than they
            compute (measured here: 16 ms a 128 x 424 frame on one thread, over 600 ms on two, 2 cores under load).

    Raises:
        ValueError: ``root`` holds a set of another config, or KITTI data not written here (see
            :func:`street_set_complete`).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     root = write_street_kitti(tmp, StreetConfig(height=48, num_frames=2), progress=False)
        ...     sorted(p.name for p in root.iterdir()), len(list((root / "label_2").iterdir()))
        (['image_2', 'label_2', 'street_manifest.json', 'street_started.json'], 2)
    """
    cfg = cfg or StreetConfig()
    root = Path(root)
    if street_set_complete(root, cfg):
        return root
    for sub in ("image_2", "label_2"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    _write_json(root / STARTED, street_record(cfg))  # before any frame: marks the folder as ours
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(8, cpus) if cfg.num_frames >= 16 else 0
    from tqdm.auto import tqdm

    loader = DataLoader(_FrameWriter(root, cfg), batch_size=None, num_workers=workers)
    for _ in tqdm(loader, total=cfg.num_frames, desc=f"street set -> {root}", unit="frame", disable=not progress):
        pass
    for path in _frame_files(root):  # frames of an unfinished larger write, temporaries of a crashed one
        stem = path.name.split(".")[0]
        if path.name.startswith("."):
            if time.time() - path.stat().st_mtime > 600:  # not a concurrent writer's file in flight
                path.unlink(missing_ok=True)
        elif not stem.isdigit() or int(stem) >= cfg.num_frames:
            path.unlink(missing_ok=True)
    _write_json(root / MANIFEST, street_record(cfg))
    return root
