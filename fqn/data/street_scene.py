"""Drawing of the street benchmark's scenes: a pinhole camera over a flat road, vectorised torch painting.

Private to :mod:`fqn.data.street`, which owns the public API. The geometry is KITTI's: a camera 1.65 m above the
ground with a focal length of 1.92 image heights (721 px at 375 rows), so a point on the ground ``d`` pixels below the
horizon is ``f * 1.65 / d`` metres away and one metre there spans ``d / 1.65`` pixels. Everything that stands on the
ground (objects, trees, poles, building facades, lane markings) follows from that, which is what makes far objects
tiny near the horizon and near ones large at the bottom. Painting works on the crop of each part's box, so a frame
costs a few dozen full-image operations for the background and small ones for everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CAM_HEIGHT = 1.65  # metres above the ground, as KITTI's camera
FOCAL = 721.5 / 375  # focal length in image heights
#: per class (Car, Van, Truck, Pedestrian, Cyclist): mean height, width, length in metres (KITTI's means)
DIMS = ((1.53, 1.63, 3.88), (2.21, 1.90, 5.08), (3.25, 2.59, 10.1), (1.76, 0.66, 0.84), (1.74, 0.60, 1.76))
CLASS_WEIGHTS = (0.38, 0.15, 0.1, 0.22, 0.15)
LANE = 3.5


class Draws:
    """Uniform numbers from a ``torch.Generator``, fetched in blocks: one ``.item()`` per number would be slow."""

    def __init__(self, g: torch.Generator) -> None:
        self.g = g
        self.buf: list[float] = []

    def u(self, lo: float = 0.0, hi: float = 1.0) -> float:
        if not self.buf:
            self.buf = torch.rand(256, generator=self.g).tolist()[::-1]
        return lo + (hi - lo) * self.buf.pop()

    def log_u(self, lo: float, hi: float) -> float:
        return math.exp(self.u(math.log(lo), math.log(max(hi, lo))))

    def pick(self, weights: tuple[float, ...]) -> int:
        x, acc = self.u(0, sum(weights)), 0.0
        for i, w in enumerate(weights):
            acc += w
            if x < acc:
                return i
        return len(weights) - 1

    def colour(self, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return torch.tensor([self.u(lo, hi) for _ in range(3)])


@dataclass(frozen=True)
class Scene:
    """Camera and road layout of one frame: horizon row, vanishing column, road edges (metres, camera x)."""

    height: int
    width: int
    horizon: float
    vanish: float
    road_left: float
    road_right: float
    sidewalk: float

    @property
    def focal(self) -> float:
        return FOCAL * self.height

    def lanes(self) -> list[float]:
        n = round((self.road_right - self.road_left) / LANE)
        return [self.road_left + LANE * (k + 0.5) for k in range(n)]


@dataclass(frozen=True)
class StreetObject:
    """A labelled object on the ground: class index, lateral position and depth, size (metres) and KITTI ``ry``."""

    cls: int
    x: float
    z: float
    h: float
    w: float
    l: float  # noqa: E741 -- KITTI's name
    ry: float

    def visible_width(self) -> float:
        return self.w * abs(math.sin(self.ry)) + self.l * abs(math.cos(self.ry))

    def depth_extent(self) -> float:
        return self.w * abs(math.cos(self.ry)) + self.l * abs(math.sin(self.ry))

    def box(self, sc: Scene) -> tuple[float, float, float, float]:
        """The full extent in pixels (xyxy), possibly reaching outside the image."""
        s = sc.focal / self.z
        y1 = sc.horizon + CAM_HEIGHT * s
        xc, half = sc.vanish + self.x * s, self.visible_width() * s / 2
        return xc - half, y1 - self.h * s, xc + half, y1

    def alpha(self) -> float:
        a = self.ry - math.atan2(self.x, self.z)
        return (a + math.pi) % (2 * math.pi) - math.pi


def sample_scene(r: Draws, height: int, width: int) -> Scene:
    left = -LANE / 2 - LANE * r.pick((0.3, 0.45, 0.25))
    right = LANE / 2 + LANE * r.pick((0.6, 0.4))
    return Scene(height, width, height * r.u(0.36, 0.5), width * r.u(0.38, 0.62), left, right, r.u(1.5, 4.0))


def sample_objects(r: Draws, sc: Scene, n: int) -> list[StreetObject]:
    """``n`` objects (fewer if placements keep colliding), sorted far to near: the drawing order."""
    placed: list[StreetObject] = []
    for _ in range(n * 6):
        if len(placed) == n:
            break
        obj = _sample_object(r, sc)
        x0, y0, x1, y1 = obj.box(sc)
        inside = max(0.0, min(x1, sc.width) - max(x0, 0)) * max(0.0, min(y1, sc.height) - max(y0, 0))
        if inside < 0.3 * (x1 - x0) * (y1 - y0):
            continue  # more than 70% outside the image
        if any(abs(obj.x - o.x) < (obj.visible_width() + o.visible_width()) / 2
               and abs(obj.z - o.z) < (obj.depth_extent() + o.depth_extent()) / 2 + 0.5 for o in placed):
            continue  # two objects in one place on the ground
        placed.append(obj)
    return sorted(placed, key=lambda o: -o.z)


def _sample_object(r: Draws, sc: Scene) -> StreetObject:
    cls = r.pick(CLASS_WEIGHTS)
    h, w, l = (m * r.u(0.88, 1.12) for m in DIMS[cls])  # noqa: E741
    if cls == 3:
        h *= r.u(0.7, 1.05)  # children too
    d = r.log_u(2.5 * CAM_HEIGHT / h, 1.3 * (sc.height - sc.horizon))  # bottom row below the horizon, log-uniform
    z = sc.focal * CAM_HEIGHT / d
    along = (-math.pi / 2 if r.u() < 0.75 else math.pi / 2) + r.u(-0.15, 0.15)
    lanes, side = sc.lanes(), r.u() < 0.5
    if cls <= 2:  # vehicles: in a lane, parked at the edge, or turning
        x = lanes[int(r.u() * len(lanes)) % len(lanes)] + r.u(-0.4, 0.4)
        if r.u() < 0.25:
            x = sc.road_left + w / 2 + 0.2 if side else sc.road_right - w / 2 - 0.2
        ry = r.u(-math.pi, math.pi) if r.u() < 0.12 else (along if x > 0 else -along)
    elif cls == 3:  # pedestrians: on a sidewalk, some crossing
        walk = r.u(0.3, sc.sidewalk)
        x = (sc.road_left - walk if side else sc.road_right + walk) if r.u() < 0.75 else r.u(sc.road_left,
                                                                                               sc.road_right)
        ry = r.u(-math.pi, math.pi)
    else:  # cyclists: near the road edge or in a lane
        x = sc.road_left + r.u(0.4, 1.2) if side else sc.road_right - r.u(0.4, 1.2)
        if r.u() < 0.35:
            x = lanes[int(r.u() * len(lanes)) % len(lanes)]
        ry = r.u(-math.pi, math.pi) if r.u() < 0.15 else along
    return StreetObject(cls, x, z, h, w, l, ry)


# -- painting ---------------------------------------------------------------------------------------------------------
Part = tuple[str, tuple[float, ...], Tensor]  # (kind, parameters in box units, colour)


def _mask(kind: str, p: tuple[float, ...], u: Tensor, v: Tensor, a: float) -> Tensor:
    """Pixels of one part; ``u``, ``v`` are box coordinates in [0, 1], ``a`` the box's height / width in pixels."""
    if kind == "rect":
        return (u >= p[0]) & (u <= p[1]) & (v >= p[2]) & (v <= p[3])
    if kind == "trap":  # rows p0..p1, left/right edge going from (p2, p3) at the top to (p4, p5) at the bottom
        t = ((v - p[0]) / (p[1] - p[0])).clamp(0, 1)
        return (v >= p[0]) & (v <= p[1]) & (u >= p[2] + (p[4] - p[2]) * t) & (u <= p[3] + (p[5] - p[3]) * t)
    if kind in ("disk", "ring"):  # centre (p0, p1), radius p2 in box heights (round in pixels); ring: inner p3
        q = ((u - p[0]) / (p[2] * a)) ** 2 + ((v - p[1]) / p[2]) ** 2
        return (q <= 1) & (q >= (p[3] ** 2 if kind == "ring" else -1))
    if kind == "ellipse":  # centre (p0, p1), radii (p2, p3) in box units
        return ((u - p[0]) / p[2]) ** 2 + ((v - p[1]) / p[3]) ** 2 <= 1
    if kind == "line":  # segment (p0, p1)-(p2, p3), half-thickness p4 in box heights
        x, ax, bx = u / a, p[0] / a, p[2] / a
        dx, dy = bx - ax, p[3] - p[1]
        t = (((x - ax) * dx + (v - p[1]) * dy) / max(dx * dx + dy * dy, 1e-9)).clamp(0, 1)
        return (x - ax - t * dx) ** 2 + (v - p[1] - t * dy) ** 2 <= p[4] ** 2
    raise ValueError(kind)


def paint(img: Tensor, ids: Tensor | None, box: tuple[float, ...], parts: list[Part], key: int = -1,
          flip: bool = False, min_width: float = 0.0) -> int:
    """Paint ``parts`` into ``box`` (clipped to the image), marking the pixels ``key`` in ``ids``; their count."""
    x0, y0, x1, y1 = box
    if x1 - x0 < min_width:  # thin poles stay one pixel wide when far
        x0, x1 = (x0 + x1 - min_width) / 2, (x0 + x1 + min_width) / 2
    height, width = img.shape[1:]
    c0, c1 = max(math.floor(x0), 0), min(math.ceil(x1), width)
    r0, r1 = max(math.floor(y0), 0), min(math.ceil(y1), height)
    if c1 <= c0 or r1 <= r0 or x1 - x0 <= 0 or y1 - y0 <= 0:
        return 0
    u = ((torch.arange(c0, c1, dtype=torch.float32) + 0.5 - x0) / (x1 - x0)).view(1, -1)
    v = ((torch.arange(r0, r1, dtype=torch.float32) + 0.5 - y0) / (y1 - y0)).view(-1, 1)
    u = 1 - u if flip else u
    crop = img[:, r0:r1, c0:c1]
    shade = (1.1 - 0.25 * v).unsqueeze(0)  # light from above
    own = torch.zeros(r1 - r0, c1 - c0, dtype=torch.bool)
    for kind, p, colour in parts:
        m = _mask(kind, p, u, v, (y1 - y0) / (x1 - x0)).expand_as(own)
        over(crop, m, colour.view(3, 1, 1) * shade)
        own |= m
    if ids is not None:
        over(ids[r0:r1, c0:c1], own, float(key))
    return int(own.view(torch.uint8).sum())


def darken(img: Tensor, cx: float, cy: float, rx: float, ry: float, factor: float) -> None:
    """Multiply an elliptic patch by ``factor``: the shadow under an object."""
    height, width = img.shape[1:]
    c0, c1 = max(math.floor(cx - rx), 0), min(math.ceil(cx + rx), width)
    r0, r1 = max(math.floor(cy - ry), 0), min(math.ceil(cy + ry), height)
    if c1 <= c0 or r1 <= r0:
        return
    xs = (torch.arange(c0, c1, dtype=torch.float32) + 0.5 - cx).view(1, -1) / max(rx, 0.5)
    ys = (torch.arange(r0, r1, dtype=torch.float32) + 0.5 - cy).view(-1, 1) / max(ry, 0.5)
    q = (xs**2 + ys**2).clamp(max=1)
    img[:, r0:r1, c0:c1] *= 1 - (1 - factor) * (1 - q) ** 0.5


def object_parts(obj: StreetObject, r: Draws) -> tuple[list[Part], bool]:
    """The class's silhouette in box units, and whether to mirror it: the class is in the shape, not the colour."""
    side_share = obj.l * abs(math.cos(obj.ry)) / max(obj.visible_width(), 1e-6)
    side, flip, away = side_share > 0.5, math.cos(obj.ry) < 0, math.sin(obj.ry) < 0
    dark, glass = r.colour(0.02, 0.12), r.colour(0.1, 0.3) * torch.tensor([0.8, 0.9, 1.1])
    body = r.colour()
    lamp = torch.tensor([0.9, 0.1, 0.1]) if away else torch.tensor([1.0, 0.95, 0.75])
    if obj.cls == 0 and side:
        return [("rect", (0, 1, 0.4, 0.82), body), ("trap", (0, 0.42, 0.28, 0.72, 0.1, 0.93), body),
                ("trap", (0.08, 0.4, 0.31, 0.69, 0.17, 0.87), glass), ("disk", (0.2, 0.8, 0.2), dark),
                ("disk", (0.8, 0.8, 0.2), dark), ("disk", (0.2, 0.8, 0.08), r.colour(0.5, 0.8)),
                ("disk", (0.8, 0.8, 0.08), r.colour(0.5, 0.8)), ("rect", (0.96, 1, 0.45, 0.55), lamp)], flip
    if obj.cls == 0:
        return [("rect", (0, 1, 0.42, 0.86), body), ("trap", (0, 0.44, 0.16, 0.84, 0.04, 0.96), body),
                ("trap", (0.07, 0.4, 0.2, 0.8, 0.1, 0.9), glass), ("rect", (0.03, 0.2, 0.5, 0.6), lamp),
                ("rect", (0.8, 0.97, 0.5, 0.6), lamp), ("rect", (0.38, 0.62, 0.64, 0.74), r.colour(0.7, 1)),
                ("rect", (0.04, 0.2, 0.84, 1), dark), ("rect", (0.8, 0.96, 0.84, 1), dark)], False
    if obj.cls == 1 and side:
        return [("trap", (0, 0.86, 0, 0.82, 0, 1), body), ("rect", (0.62, 0.94, 0.08, 0.36), glass),
                ("rect", (0.05, 0.55, 0.1, 0.34), glass * 1.2), ("disk", (0.17, 0.84, 0.16), dark),
                ("disk", (0.83, 0.84, 0.16), dark), ("rect", (0.97, 1, 0.5, 0.6), lamp)], flip
    if obj.cls == 1:
        return [("rect", (0, 1, 0, 0.9), body), ("rect", (0.08, 0.46, 0.08, 0.38), glass),
                ("rect", (0.54, 0.92, 0.08, 0.38), glass), ("rect", (0.02, 0.14, 0.55, 0.68), lamp),
                ("rect", (0.86, 0.98, 0.55, 0.68), lamp), ("rect", (0.05, 0.2, 0.88, 1), dark),
                ("rect", (0.8, 0.95, 0.88, 1), dark)], False
    if obj.cls == 2 and side:
        return [("rect", (0, 0.7, 0, 0.82), r.colour()), ("rect", (0.72, 1, 0.28, 0.86), body),
                ("rect", (0.8, 0.97, 0.33, 0.55), glass), ("rect", (0, 1, 0.78, 0.88), dark),
                ("disk", (0.1, 0.89, 0.11), dark), ("disk", (0.24, 0.89, 0.11), dark),
                ("disk", (0.87, 0.89, 0.11), dark)], flip
    if obj.cls == 2:
        cargo = r.colour()
        return [("rect", (0, 1, 0, 0.88), cargo), ("rect", (0.49, 0.51, 0.03, 0.85), cargo * 0.6),
                ("rect", (0.02, 0.12, 0.74, 0.84), lamp), ("rect", (0.88, 0.98, 0.74, 0.84), lamp),
                ("rect", (0.02, 0.22, 0.86, 1), dark), ("rect", (0.78, 0.98, 0.86, 1), dark)], False
    skin, shirt, legs = r.colour(0.35, 0.95) * torch.tensor([1.0, 0.8, 0.65]), r.colour(), r.colour(0, 0.6)
    if obj.cls == 3:
        stride = r.u(0, 0.22)
        return [("disk", (0.5, 0.075, 0.075), skin), ("rect", (0.18, 0.82, 0.14, 0.56), shirt),
                ("rect", (0, 0.17, 0.16, 0.5), shirt * 0.85), ("rect", (0.83, 1, 0.16, 0.5), shirt * 0.85),
                ("trap", (0.55, 1, 0.2, 0.48, 0.2 - stride * 0.9, 0.48 - stride), legs),
                ("trap", (0.55, 1, 0.52, 0.8, 0.52 + stride, 0.8 + stride * 0.9), legs)], flip
    frame_c = r.colour()
    if side:  # cyclist seen from the side: two wheel rings, frame, rider leaning forward
        return [("ring", (0.2, 0.8, 0.2, 0.72), dark), ("ring", (0.8, 0.8, 0.2, 0.72), dark),
                ("line", (0.2, 0.8, 0.45, 0.55, 0.03), frame_c), ("line", (0.45, 0.55, 0.8, 0.8, 0.03), frame_c),
                ("line", (0.45, 0.55, 0.72, 0.38, 0.03), frame_c), ("line", (0.42, 0.5, 0.6, 0.2, 0.07), shirt),
                ("line", (0.42, 0.52, 0.5, 0.8, 0.05), legs), ("line", (0.6, 0.22, 0.72, 0.38, 0.035), shirt),
                ("disk", (0.64, 0.08, 0.08), skin)], flip
    return [("rect", (0.42, 0.58, 0.58, 1), dark), ("disk", (0.5, 0.075, 0.075), skin),
            ("rect", (0.2, 0.8, 0.14, 0.55), shirt), ("rect", (0, 1, 0.33, 0.38), frame_c),
            ("rect", (0.05, 0.2, 0.2, 0.36), shirt * 0.85), ("rect", (0.8, 0.95, 0.2, 0.36), shirt * 0.85),
            ("rect", (0.26, 0.44, 0.55, 0.82), legs), ("rect", (0.56, 0.74, 0.55, 0.82), legs)], False


def clutter_parts(kind: int, r: Draws) -> tuple[tuple[float, float], list[Part]]:
    """Unlabelled roadside things, ``((height, width) in metres, parts)``: tree, pole, sign, bush.

    Poles and signs are thin upright shapes a detector could take for a pedestrian: hard negatives.
    """
    grey = r.colour(0.3, 0.6).mean().repeat(3)
    if kind == 0:
        trunk = r.colour(0.2, 0.4) * torch.tensor([1, 0.8, 0.6])
        leaves = r.colour(0.05, 0.45) * torch.tensor([0.7, 1.2, 0.6])
        return (r.u(4, 9), r.u(2, 5)), [("rect", (0.44, 0.56, 0.5, 1), trunk),
                                        ("ellipse", (0.5, 0.33, 0.5, 0.33), leaves)]
    if kind == 1:
        return (r.u(5, 9), 0.2), [("rect", (0, 1, 0, 1), grey)]
    if kind == 2:
        plate = (r.colour(0.6, 1.0) * torch.tensor([1.0, 0.3, 0.3]) if r.u() < 0.5
                 else torch.tensor([0.1, 0.3, 0.8]) * r.u(0.6, 1.2))
        shape = ("disk", (0.5, 0.14, 0.14)) if r.u() < 0.5 else ("rect", (0, 1, 0, 0.3))
        return (r.u(2.2, 3.2), 0.7), [("rect", (0.45, 0.55, 0.2, 1), grey), (*shape, plate)]
    return (r.u(0.7, 1.5), r.u(1.2, 3)), [("ellipse", (0.5, 0.5, 0.5, 0.5), r.colour(0.05, 0.4) *
                                                                                 torch.tensor([0.7, 1.2, 0.6]))]


def draw_clutter(img: Tensor, sc: Scene, r: Draws, n: int) -> None:
    """``n`` roadside things standing on the ground beside the road, far to near, before any object."""
    items = []
    for _ in range(n):
        kind = r.pick((0.4, 0.25, 0.2, 0.15))
        d = r.log_u(1.5, 1.2 * (sc.height - sc.horizon))
        off = r.u(0.2, 0.6) if kind in (1, 2) else r.u(0.5, sc.sidewalk + 3)
        x = sc.road_left - off if r.u() < 0.5 else sc.road_right + off
        items.append((d, x, clutter_parts(kind, r)))
    for d, x, ((h, w), parts) in sorted(items, key=lambda t: t[0]):
        s = d / CAM_HEIGHT
        xc, bottom = sc.vanish + x * s, sc.horizon + d
        paint(img, None, (xc - w * s / 2, bottom - h * s, xc + w * s / 2, bottom), parts, min_width=1.0)


def _texture(g: torch.Generator, height: int, width: int, cells: int) -> Tensor:
    """Smooth noise in [-1, 1] (height x width): bilinear upsampling of a coarse random grid."""
    coarse = torch.rand(1, 1, max(2, cells * height // width), cells, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def over(img: Tensor, mask: Tensor, colour: Tensor | float) -> Tensor:
    """Paint ``colour`` over ``img`` where ``mask`` holds, in place; arithmetic, as ``torch.where`` is slow on CPU."""
    return img.add_(mask.view(torch.uint8).to(img.dtype) * (colour - img))


def background(sc: Scene, r: Draws, g: torch.Generator) -> Tensor:
    """Sky, distant skyline, ground, sidewalks, the road with lane markings, building facades and ground shadows."""
    h, w, hz = sc.height, sc.width, sc.horizon
    ys = (torch.arange(h, dtype=torch.float32) + 0.5).view(-1, 1)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5).view(1, -1)
    coarse, fine = _texture(g, h, w, 6), _texture(g, h, w, 48)
    top = torch.tensor([0.25, 0.45, 0.85]) * r.u(0.6, 1.1) if r.u() < 0.7 else r.colour(0.5, 0.8).mean().repeat(3)
    t = (ys / hz).clamp(0, 1)
    img = (top.view(3, 1, 1) * (1 - t) + r.colour(0.7, 0.95).view(3, 1, 1) * t) * (1 + 0.08 * coarse)
    hills = (ys >= hz - h * r.u(0.01, 0.06) * (1 + coarse[0:1])) & (ys < hz)
    over(img, hills, r.colour(0.2, 0.5).view(3, 1, 1) * (1 + 0.1 * fine))
    g0 = min(max(math.ceil(hz - 0.5), 0), h)  # the first ground row; below it, a view of the ground rows only
    ground, d = img[:, g0:], ys[g0:] - hz
    gc, gf = coarse[g0:], fine[g0:]
    lateral = (xs - sc.vanish) * CAM_HEIGHT / d  # metres from the camera's axis of the ground point at each pixel
    depth = sc.focal * CAM_HEIGHT / d
    verge = r.colour(0.2, 0.5) * torch.tensor([0.8, 1.0, 0.6]) if r.u() < 0.6 else r.colour(0.35, 0.6)
    ground.copy_(verge.view(3, 1, 1) * (1 + 0.2 * gc + 0.1 * gf))
    over(ground, (lateral >= sc.road_left - sc.sidewalk) & (lateral <= sc.road_right + sc.sidewalk),
         r.u(0.5, 0.75) * (1 + 0.08 * gf))
    over(ground, (lateral >= sc.road_left) & (lateral <= sc.road_right), r.u(0.2, 0.45) * (1 + 0.1 * gc + 0.08 * gf))
    phase, marking = r.u(), torch.tensor([1.0, 1.0, r.u(0.3, 1.0)]).view(3, 1, 1) * r.u(0.7, 0.95)
    for k, xm in enumerate([sc.road_left + 0.2, *[lane + LANE / 2 for lane in sc.lanes()[:-1]], sc.road_right - 0.2]):
        near = ((xs - sc.vanish) - xm * d / CAM_HEIGHT).abs() <= (0.08 * d / CAM_HEIGHT).clamp(min=0.5)
        over(ground, near & (torch.frac(depth / 12 + phase) < 0.4) if 0 < k < len(sc.lanes()) else near, marking)
    for _ in range(int(r.u(0, 3.99))):  # shadows of things outside the picture, on the ground
        ex, ez, rx, rz = r.u(sc.road_left - 3, sc.road_right + 3), r.log_u(5, 60), r.u(1, 5), r.u(1, 8)
        blob = ((lateral - ex) / rx) ** 2 + ((depth - ez) / rz) ** 2 <= 1
        ground.mul_(1 - blob.view(torch.uint8).float() * r.u(0.3, 0.55))
    _facades(img, sc, r, xs, ys, fine)
    return img


def _facades(img: Tensor, sc: Scene, r: Draws, xs: Tensor, ys: Tensor, fine: Tensor) -> None:
    """Building fronts along each side of the street: planes parallel to the road, with rows of windows."""
    split = min(max(math.floor(sc.vanish), 0), sc.width)
    for left in (True, False):
        if r.u() < 0.3:
            continue  # an open side: verge and trees only
        line = (sc.road_left - sc.sidewalk if left else sc.road_right + sc.sidewalk) + (-1 if left else 1) * r.u(0, 4)
        bounds, heights, colours, z = [], [], [], r.u(2, 15)
        while z < 400:
            z += r.u(8, 35)
            bounds.append(z)
            heights.append(0.0 if r.u() < 0.15 else r.u(5, 25))
            colours.append(r.colour(0.25, 0.8))
        cols = slice(0, split) if left else slice(split, sc.width)  # this side's columns only
        dx = ((xs[:, cols] - sc.vanish) * CAM_HEIGHT / line).clamp(min=1e-3)  # base of the facade below the horizon
        zx = sc.focal * CAM_HEIGHT / dx
        seg = torch.searchsorted(torch.tensor(bounds), zx.contiguous()).clamp(max=len(bounds) - 1)
        height = torch.tensor(heights)[seg] * (zx < bounds[-1])
        above = (sc.horizon + dx - ys) * CAM_HEIGHT / dx  # metres above the ground on the facade
        facade = (above >= 0) & (above <= height)
        floor = torch.frac(above / 3.2)
        window = facade & (torch.frac(zx / 3.5) < 0.5) & (floor > 0.35) & (floor < 0.75) & (above > 2.5) & \
            (above < height - 1)
        wall = torch.stack(colours)[seg[0]].T.unsqueeze(1)  # the colour of each column, 3 x 1 x W
        over(img[:, :, cols], facade, wall * (1 + 0.1 * fine[:, cols]))
        over(img[:, :, cols], window, wall * r.u(0.2, 0.5) + r.u(0, 0.15))
