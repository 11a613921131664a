"""A synthetic world with exact labels for all 8 Jodi domains.

Each scene is ray cast analytically on the pixel grid (numpy, no renderer): a ground plane, a sky, spheres, boxes,
cylinders and cones with random colours and simple textures, one or two directional lights with shadows, and in some
scenes articulated stick figures made of capsules. One ray cast gives a G-buffer (hit distance, surface normal, object,
part and material per pixel) from which every domain is computed, so the labels agree with the image by construction:

- image: Lambert shading of the albedo under the lights (shadowed) plus sky ambient; the sky is a colour gradient.
- albedo: the unshaded, textured base colour.
- depth: disparity 1 / z normalised to [0, 1] per image, near bright and the sky black, as Jodi's depth maps.
- normal: camera-space unit normals encoded as ``(left, up, towards the camera)``, i.e. ``-n`` in OpenCV camera axes
  (x right, y down, z forward): a surface facing the camera is (0.5, 0.5, 1) blue, one facing up green, one facing
  left red. This is the colour convention of Jodi's normal maps (checked against the shared examples in the tests).
- edge: occlusion contours, creases and material boundaries, white on black, on the nearer side of each boundary.
- lineart: the same lines plus texture boundaries, black on white (Jodi's line art is dark lines on white paper).
- segmentation: one of the 12 Jodi classes per object, drawn in the official palette; also returned as an index map.
- openpose: the figures' visible COCO-18 keypoints drawn the OpenPose way (limbs as ellipses in 0.6 x the limb
  colour, then keypoint discs in full colour), black elsewhere.

Scenes are deterministic: scene ``i`` of a world with seed ``s`` depends only on ``(s, i)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from ..domains import DOMAIN_NAMES, SEG12_CLASSES, seg_palette

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# OpenPose conventions (COCO-18 body, as drawn by the OpenPose / ControlNet annotators)
# ---------------------------------------------------------------------------------------------------------------------

OPENPOSE_KEYPOINTS = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
# Limbs as 0-based keypoint pairs, in drawing order; limb k is drawn in OPENPOSE_COLORS[k] * OPENPOSE_LIMB_SHADE.
OPENPOSE_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
# Keypoint k is drawn in OPENPOSE_COLORS[k]; a hue ramp from red through green and blue to magenta.
OPENPOSE_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
OPENPOSE_LIMB_SHADE = 0.6
# The annotators draw limbs 4 px wide (half-width) and keypoints of radius 4 on a 512 px canvas.
_POSE_SIZE_AT_512 = 4.0

SEG_CLASS = {name: i for i, name in enumerate(SEG12_CLASSES)}

_EPS = 1e-4  # ray offset against self-intersection (world units; scenes are metres)
_SKY = -1  # object index of sky pixels

# Texture kinds
_SOLID, _CHECKER, _STRIPES = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------------------
# Configuration and scene description
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    """Size and content of the synthetic world. Ranges are (low, high)."""

    height: int = 64
    width: int = 64
    seed: int = 0
    objects: tuple[int, int] = (3, 7)  # primitives per scene (inclusive)
    figure_probability: float = 0.5  # chance that a scene has stick figures
    max_figures: int = 2
    mountain_probability: float = 0.3
    second_light_probability: float = 0.5
    shadows: bool = True
    fov_degrees: tuple[float, float] = (45.0, 65.0)  # horizontal field of view

    def validate(self) -> "SyntheticConfig":
        for name in ("height", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 8:
                raise ValueError(f"SyntheticConfig.{name} must be an integer >= 8, got {v!r}.")
        lo, hi = self.objects
        if not (0 <= lo <= hi):
            raise ValueError(f"SyntheticConfig.objects must be a range 0 <= low <= high, got {self.objects!r}.")
        if not 0 <= self.figure_probability <= 1:
            raise ValueError(f"figure_probability must be in [0, 1], got {self.figure_probability!r}.")
        if self.max_figures < 0:
            raise ValueError(f"max_figures must be >= 0, got {self.max_figures!r}.")
        if not 1 <= self.fov_degrees[0] <= self.fov_degrees[1] < 170:
            raise ValueError(f"fov_degrees must be a range within [1, 170), got {self.fov_degrees!r}.")
        return self


@dataclass
class Camera:
    """Pinhole camera at ``origin`` looking along ``forward``; ``focal`` in pixels. World axes: x right, y up."""

    origin: np.ndarray  # (3,)
    right: np.ndarray  # (3,)
    up: np.ndarray  # (3,)
    forward: np.ndarray  # (3,)
    focal: float

    def project(self, points: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """World points ``(..., 3)`` -> pixel coordinates ``(..., 2)`` as (x, y) with pixel centres at +0.5, and
        the planar depth ``(...)``."""
        rel = points - self.origin
        xc, yc, zc = rel @ self.right, rel @ self.up, rel @ self.forward
        safe = np.where(zc > 1e-6, zc, 1e-6)
        px = width / 2 + self.focal * xc / safe
        py = height / 2 - self.focal * yc / safe
        return np.stack([px, py], axis=-1), zc


@dataclass
class Figure:
    """An articulated stick figure: COCO-18 keypoints and the capsules of its body."""

    keypoints: np.ndarray  # (18, 3) world
    cap_a: np.ndarray  # (K, 3) capsule segment starts
    cap_b: np.ndarray  # (K, 3) capsule segment ends
    cap_r: np.ndarray  # (K,) radii
    cap_material: np.ndarray  # (K,) material index
    height: float
    center: np.ndarray = field(default=None)  # bounding sphere
    radius: float = 0.0


@dataclass
class Scene:
    """Everything needed to render one scene. Materials index rows of the ``mat_*`` arrays; material 0 is the
    ground. Every primitive has its own material; a figure has two (clothes and skin)."""

    camera: Camera
    light_dirs: np.ndarray  # (nl, 3) unit vectors towards the lights
    light_colors: np.ndarray  # (nl, 3)
    ambient: np.ndarray  # (3,)
    sky_horizon: np.ndarray  # (3,)
    sky_zenith: np.ndarray  # (3,)
    spheres: np.ndarray  # (S, 5): cx, cy, cz, r, material
    boxes: np.ndarray  # (B, 8): cx, cy, cz, ex, ey, ez, yaw, material
    cylinders: np.ndarray  # (C, 5): cx, cz, r, h, material
    cones: np.ndarray  # (K, 5): cx, cz, r, h, material
    figures: list
    mat_base: np.ndarray  # (M, 3) albedo
    mat_second: np.ndarray  # (M, 3) second texture colour
    mat_kind: np.ndarray  # (M,) texture kind
    mat_freq: np.ndarray  # (M,) texture cells per world unit
    mat_class: np.ndarray  # (M,) segmentation class index
    mat_origin: np.ndarray  # (M, 3) texture origin (object centre)
    caption: str = ""


@dataclass
class SyntheticSample:
    """One rendered scene. ``domains`` maps each of the 8 domain names to an ``(H, W, 3)`` float32 image in [0, 1]."""

    domains: dict
    seg_index: np.ndarray  # (H, W) int64 index into SEG12_CLASSES
    depth_z: np.ndarray  # (H, W) float32 planar camera depth; inf for the sky
    normal_camera: np.ndarray  # (H, W, 3) float32 unit normals in the encoded (left, up, towards camera) axes
    keypoints: np.ndarray  # (F, 18, 3) float32: x, y in pixels (centres at +0.5) and a visibility flag
    material: np.ndarray  # (H, W) int material per pixel: 0 the ground, -1 the sky, > 0 the objects and figures
    caption: str

    def tensors(self) -> dict[str, torch.Tensor]:
        """Domain name -> ``(3, H, W)`` float32 tensor in [-1, 1] (the model's input range)."""
        return {k: torch.from_numpy(v).permute(2, 0, 1) * 2 - 1 for k, v in self.domains.items()}

    def stacked(self) -> torch.Tensor:
        """All domains in the official order as ``(8, 3, H, W)`` in [-1, 1]."""
        t = self.tensors()
        return torch.stack([t[name] for name in DOMAIN_NAMES])

    def uint8(self) -> dict[str, np.ndarray]:
        """Domain name -> ``(H, W, 3)`` uint8 image."""
        return {k: np.round(v * 255).astype(np.uint8) for k, v in self.domains.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Random scene sampling
# ---------------------------------------------------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


_COLOR_NAMES = ("red", "orange", "yellow", "green", "green", "cyan", "blue", "blue", "purple", "pink")


def _color_name(h: float, s: float, v: float) -> str:
    if s < 0.2:
        return "white" if v > 0.75 else ("grey" if v > 0.35 else "black")
    return _COLOR_NAMES[int(h * 10) % 10]


class _Materials:
    def __init__(self):
        self.base, self.second, self.kind, self.freq, self.cls, self.origin = [], [], [], [], [], []

    def add(self, base, second, kind, freq, cls, origin) -> int:
        self.base.append(base)
        self.second.append(second)
        self.kind.append(kind)
        self.freq.append(freq)
        self.cls.append(cls)
        self.origin.append(np.asarray(origin, dtype=np.float32))
        return len(self.base) - 1

    def random(self, rng: np.random.Generator, cls: int, origin) -> tuple[int, str]:
        h, s, v = rng.random(), rng.uniform(0.0, 0.9), rng.uniform(0.25, 0.95)
        base = _hsv(h, s, v)
        r = rng.random()
        kind = _SOLID if r < 0.5 else (_CHECKER if r < 0.75 else _STRIPES)
        second = np.clip(base * rng.uniform(0.4, 0.7) + rng.random(3, dtype=np.float32) * 0.25, 0, 1)
        return self.add(base, second, kind, rng.uniform(1.5, 4.0), cls, origin), _color_name(h, s, v)


def _pick(rng: np.random.Generator, options: tuple):
    """A uniform choice (``rng.choice`` costs ~20x more per call, and scenes make dozens)."""
    return options[min(int(rng.random() * len(options)), len(options) - 1)]


def _count(rng: np.random.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high]."""
    return low + min(int(rng.random() * (high - low + 1)), high - low)


def _frustum_x(rng: np.random.Generator, z: float, half_fov: float, margin: float = 0.85) -> float:
    return float(rng.uniform(-1, 1) * z * math.tan(half_fov) * margin)


def _make_figure(rng: np.random.Generator, base: np.ndarray, yaw: float, height: float, clothes: int,
                 skin: int) -> Figure:
    """Keypoints and body capsules of a standing figure with random limb angles."""
    H = height
    fwd = np.array([math.sin(yaw), 0.0, math.cos(yaw)], dtype=np.float32)  # facing direction
    right = np.array([fwd[2], 0.0, -fwd[0]], dtype=np.float32)  # the person's right (fwd +z -> right +x)
    up = np.array([0.0, 1.0, 0.0], dtype=np.float32)
    down = -up

    def at(h, side=0.0, front=0.0):
        return base + up * h * H + right * side * H + fwd * front * H

    neck, mid_hip = at(0.84), at(0.52)
    head = at(0.925, 0.0, 0.01)
    kp = np.zeros((18, 3), dtype=np.float32)
    kp[0] = at(0.92, 0.0, 0.065)  # nose
    kp[1] = neck
    kp[14], kp[15] = at(0.94, 0.025, 0.055), at(0.94, -0.025, 0.055)  # eyes
    kp[16], kp[17] = at(0.93, 0.06, 0.0), at(0.93, -0.06, 0.0)  # ears

    def limb(start, side, swing, abduct, bend, l1, l2):
        # Upper segment: down, swung forward by `swing`, lifted sideways by `abduct`; lower segment bends by `bend`.
        d1 = math.cos(abduct) * (math.cos(swing) * down + math.sin(swing) * fwd) + math.sin(abduct) * side * right
        s2 = swing + bend
        d2 = math.cos(abduct) * (math.cos(s2) * down + math.sin(s2) * fwd) + math.sin(abduct) * side * right
        mid = start + d1 * l1 * H
        return mid, mid + d2 * l2 * H

    for side, (sh, el, wr) in ((1.0, (2, 3, 4)), (-1.0, (5, 6, 7))):
        kp[sh] = at(0.82, 0.125 * side)
        kp[el], kp[wr] = limb(kp[sh], side, rng.uniform(-1.0, 1.0), rng.uniform(0.05, 1.3), rng.uniform(0, 1.6),
                              0.17, 0.15)
    for side, (hp, kn, an) in ((1.0, (8, 9, 10)), (-1.0, (11, 12, 13))):
        kp[hp] = at(0.52, 0.085 * side)
        kp[kn], kp[an] = limb(kp[hp], side, rng.uniform(-0.5, 0.5), rng.uniform(0.0, 0.3), -rng.uniform(0, 0.8),
                              0.245, 0.245)

    caps = [  # (a, b, radius / H, material)
        (neck, mid_hip, 0.085, clothes), (neck, kp[2], 0.04, clothes), (neck, kp[5], 0.04, clothes),
        (kp[2], kp[3], 0.032, clothes), (kp[5], kp[6], 0.032, clothes), (kp[3], kp[4], 0.026, skin),
        (kp[6], kp[7], 0.026, skin), (mid_hip, kp[8], 0.06, clothes), (mid_hip, kp[11], 0.06, clothes),
        (kp[8], kp[9], 0.045, clothes), (kp[11], kp[12], 0.045, clothes), (kp[9], kp[10], 0.035, clothes),
        (kp[12], kp[13], 0.035, clothes), (neck, head, 0.03, skin), (head, head + up * 0.01 * H, 0.07, skin),
    ]  # fmt: skip
    fig = Figure(
        keypoints=kp,
        cap_a=np.stack([c[0] for c in caps]).astype(np.float32),
        cap_b=np.stack([c[1] for c in caps]).astype(np.float32),
        cap_r=np.array([c[2] * H for c in caps], dtype=np.float32),
        cap_material=np.array([c[3] for c in caps], dtype=np.int64),
        height=H,
    )
    ends = np.concatenate([fig.cap_a, fig.cap_b])
    fig.center = ends.mean(0)
    fig.radius = float(np.linalg.norm(ends - fig.center, axis=1).max() + fig.cap_r.max())
    return fig


def sample_scene(rng: np.random.Generator, cfg: SyntheticConfig) -> Scene:
    """Draw a random scene description."""
    fov = math.radians(rng.uniform(*cfg.fov_degrees))
    half_fov = fov / 2
    focal = cfg.width / 2 / math.tan(half_fov)
    pitch = math.radians(rng.uniform(2, 14))
    cam = Camera(
        origin=np.array([0.0, rng.uniform(1.2, 2.4), 0.0], dtype=np.float32),
        right=np.array([1.0, 0.0, 0.0], dtype=np.float32),
        up=np.array([0.0, math.cos(pitch), math.sin(pitch)], dtype=np.float32),
        forward=np.array([0.0, -math.sin(pitch), math.cos(pitch)], dtype=np.float32),
        focal=focal,
    )

    # Lights: a key light and sometimes a weaker fill light, from above the horizon.
    n_lights = 2 if rng.random() < cfg.second_light_probability else 1
    dirs, colors = [], []
    for i in range(n_lights):
        elev, azim = rng.uniform(0.35, 1.25), rng.uniform(0, 2 * math.pi)
        dirs.append([math.cos(elev) * math.sin(azim), math.sin(elev), -math.cos(elev) * math.cos(azim)])
        warmth = rng.uniform(-0.08, 0.08)
        strength = rng.uniform(0.75, 1.05) if i == 0 else rng.uniform(0.15, 0.4)
        colors.append(np.array([1 + warmth, 1.0, 1 - warmth]) * strength)
    dusk = rng.random() < 0.2
    sky_h = _hsv(rng.uniform(0.02, 0.1), rng.uniform(0.3, 0.6), 0.95) if dusk else _hsv(
        rng.uniform(0.53, 0.6), rng.uniform(0.1, 0.3), rng.uniform(0.85, 1.0))
    sky_z = _hsv(rng.uniform(0.58, 0.66), rng.uniform(0.45, 0.85), rng.uniform(0.55, 0.9))

    mats = _Materials()
    words = []
    if rng.random() < 0.5:
        g = rng.uniform(0.25, 0.5)
        mats.add(np.full(3, g, np.float32), np.full(3, g + rng.uniform(0.08, 0.2), np.float32), _CHECKER,
                 rng.uniform(0.3, 1.0), SEG_CLASS["road"], (0, 0, 0))
        ground_word = "a paved road"
    else:
        base = _hsv(rng.uniform(0.2, 0.35), rng.uniform(0.45, 0.8), rng.uniform(0.3, 0.6))
        mats.add(base, base * rng.uniform(0.7, 0.85), _STRIPES, rng.uniform(0.5, 2.0), SEG_CLASS["plant"], (0, 0, 0))
        ground_word = "a grass field"

    spheres, boxes, cylinders, cones = [], [], [], []
    shape_classes = {
        "sphere": ("animal", "vehicle", "furniture"),
        "box": ("building", "vehicle", "wall", "furniture"),
        "cylinder": ("building", "furniture", "plant"),
        "cone": ("plant", "building"),
    }
    for _ in range(_count(rng, *cfg.objects)):
        shape = _pick(rng, ("sphere", "box", "cylinder", "cone"))
        z = rng.uniform(3.0, 14.0)
        x = _frustum_x(rng, z, half_fov)
        cls = SEG_CLASS[_pick(rng, shape_classes[shape])]
        if shape == "sphere":
            r = rng.uniform(0.3, 1.1)
            y = r + (rng.uniform(0.0, 1.0) if rng.random() < 0.25 else 0.0)
            m, colour = mats.random(rng, cls, (x, y, z))
            spheres.append((x, y, z, r, m))
        elif shape == "box":
            e = rng.uniform(0.25, 1.1, 3)
            if cls == SEG_CLASS["building"]:
                e[1] = rng.uniform(1.0, 3.0)
            m, colour = mats.random(rng, cls, (x, e[1], z))
            boxes.append((x, e[1], z, e[0], e[1], e[2], rng.uniform(0, math.pi / 2), m))
        elif shape == "cylinder":
            r, h = rng.uniform(0.2, 0.8), rng.uniform(0.4, 3.0)
            m, colour = mats.random(rng, cls, (x, h / 2, z))
            cylinders.append((x, z, r, h, m))
        else:
            r, h = rng.uniform(0.3, 1.1), rng.uniform(0.5, 2.5)
            m, colour = mats.random(rng, cls, (x, h / 2, z))
            cones.append((x, z, r, h, m))
        words.append(f"a {colour} {shape}")
    if rng.random() < cfg.mountain_probability:
        for _ in range(_count(rng, 1, 2)):
            z = rng.uniform(40, 80)
            r, h = rng.uniform(12, 30), rng.uniform(6, 20)
            base = _hsv(rng.uniform(0.25, 0.7), rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.6))
            m = mats.add(base, base, _SOLID, 1.0, SEG_CLASS["mountain"], (0, 0, z))
            cones.append((_frustum_x(rng, z, half_fov, 1.2), z, r, h, m))
        words.append("mountains")

    figures = []
    if cfg.max_figures > 0 and rng.random() < cfg.figure_probability:
        n = _count(rng, 1, cfg.max_figures)
        for _ in range(n):
            z = rng.uniform(2.5, 7.0)
            x = _frustum_x(rng, z, half_fov, 0.7)
            yaw = math.pi + rng.uniform(-1.4, 1.4)  # roughly facing the camera
            clothes, _ = mats.random(rng, SEG_CLASS["person"], (x, 1.0, z))
            skin_tone = _hsv(rng.uniform(0.03, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.35, 0.95))
            skin = mats.add(skin_tone, skin_tone, _SOLID, 1.0, SEG_CLASS["person"], (x, 1.0, z))
            base = np.array([x, 0.0, z], dtype=np.float32)
            figures.append(_make_figure(rng, base, yaw, rng.uniform(1.5, 1.9), clothes, skin))
        words.append("a person" if n == 1 else f"{n} people")

    sky_word = "a sunset sky" if dusk else "a clear sky"
    caption = f"A synthetic 3D scene with {', '.join(words) or 'nothing'} on {ground_word} under {sky_word}."

    def arr(rows, width):
        return np.asarray(rows, dtype=np.float32).reshape(-1, width)

    return Scene(
        camera=cam,
        light_dirs=arr(dirs, 3),
        light_colors=arr(colors, 3),
        ambient=(0.25 * sky_h + 0.1).astype(np.float32),
        sky_horizon=sky_h,
        sky_zenith=sky_z,
        spheres=arr(spheres, 5),
        boxes=arr(boxes, 8),
        cylinders=arr(cylinders, 5),
        cones=arr(cones, 5),
        figures=figures,
        mat_base=np.stack(mats.base).astype(np.float32),
        mat_second=np.stack(mats.second).astype(np.float32),
        mat_kind=np.array(mats.kind, dtype=np.int64),
        mat_freq=np.array(mats.freq, dtype=np.float32),
        mat_class=np.array(mats.cls, dtype=np.int64),
        mat_origin=np.stack(mats.origin).astype(np.float32),
        caption=caption,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Ray-primitive intersection. Rays are component arrays: origin (ox, oy, oz) (scalars or (N,)), unit direction
# (dx, dy, dz) (N,). Each function returns t (P, N) with inf where a primitive is missed.
# ---------------------------------------------------------------------------------------------------------------------

_INF = np.float32(np.inf)


def _hit_spheres(o, d, sph):
    cx, cy, cz, r = (sph[:, i : i + 1] for i in range(4))  # (P, 1)
    ox, oy, oz = o[0] - cx, o[1] - cy, o[2] - cz
    b = ox * d[0] + oy * d[1] + oz * d[2]
    c = ox * ox + oy * oy + oz * oz - r * r
    disc = b * b - c
    t = -b - np.sqrt(np.maximum(disc, 0))
    return np.where((disc >= 0) & (t > _EPS), t, _INF)


def _box_local(x, z, cx, cz, yaw):
    cos, sin = np.cos(yaw), np.sin(yaw)
    x, z = x - cx, z - cz
    return cos * x - sin * z, sin * x + cos * z


def _hit_boxes(o, d, box):
    cx, cy, cz, ex, ey, ez, yaw = (box[:, i : i + 1] for i in range(7))
    cos, sin = np.cos(yaw), np.sin(yaw)
    ox, oz = _box_local(o[0], o[2], cx, cz, yaw)
    oy = o[1] - cy
    dx, dz = cos * d[0] - sin * d[2], sin * d[0] + cos * d[2]
    dy = d[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        near, far = None, None
        for oa, da, ea in ((ox, dx, ex), (oy, dy, ey), (oz, dz, ez)):
            inv = 1.0 / da
            t1, t2 = (-ea - oa) * inv, (ea - oa) * inv
            lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
            near = lo if near is None else np.maximum(near, lo)
            far = hi if far is None else np.minimum(far, hi)
        return np.where((near <= far) & (near > _EPS), near, _INF)


def _hit_cylinders(o, d, cyl):
    cx, cz, r, h = (cyl[:, i : i + 1] for i in range(4))
    ox, oz = o[0] - cx, o[2] - cz
    a = d[0] * d[0] + d[2] * d[2]
    b = ox * d[0] + oz * d[2]
    c = ox * ox + oz * oz - r * r
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0))) / a
        ys = o[1] + ts * d[1]
        side = np.where((disc >= 0) & (ts > _EPS) & (ys >= 0) & (ys <= h), ts, _INF)
        tc = (h - o[1]) / d[1]
        px, pz = ox + tc * d[0], oz + tc * d[2]
        cap = np.where((tc > _EPS) & (px * px + pz * pz <= r * r), tc, _INF)
    return np.minimum(side, cap)


def _hit_cones(o, d, cone):
    # Apex at (cx, h, cz); surface x^2 + z^2 = k^2 (y - h)^2 for 0 <= y <= h, k = r / h.
    cx, cz, r, h = (cone[:, i : i + 1] for i in range(4))
    k2 = (r / h) ** 2
    ox, oy, oz = o[0] - cx, o[1] - h, o[2] - cz
    a = d[0] * d[0] + d[2] * d[2] - k2 * d[1] * d[1]
    b = ox * d[0] + oz * d[2] - k2 * oy * d[1]
    c = ox * ox + oz * oz - k2 * oy * oy
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        best = np.full(np.broadcast(a, disc).shape, _INF, dtype=np.float32)
        for t in ((-b - sq) / a, (-b + sq) / a):
            y = oy + t * d[1]
            ok = (disc >= 0) & (t > _EPS) & (y <= 0) & (y >= -h)
            best = np.where(ok & (t < best), t, best)
    return best


def _hit_capsules(o, d, a, b, r):
    """Capsules (segments a-b swept by radius r), a/b (K, 3), r (K,)."""
    ax, ay, az = (a[:, i : i + 1] for i in range(3))
    bax, bay, baz = (b[:, i : i + 1] - a[:, i : i + 1] for i in range(3))
    r = r[:, None]
    oax, oay, oaz = o[0] - ax, o[1] - ay, o[2] - az
    baba = bax * bax + bay * bay + baz * baz
    bard = bax * d[0] + bay * d[1] + baz * d[2]
    baoa = bax * oax + bay * oay + baz * oaz
    rdoa = d[0] * oax + d[1] * oay + d[2] * oaz
    oaoa = oax * oax + oay * oay + oaz * oaz
    qa = baba - bard * bard
    qb = baba * rdoa - baoa * bard
    qc = baba * oaoa - baoa * baoa - r * r * baba
    disc = qb * qb - qa * qc
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (-qb - np.sqrt(np.maximum(disc, 0))) / qa
    y = baoa + t * bard
    body = (disc >= 0) & (y > 0) & (y < baba) & (t > _EPS)
    # End caps: the sphere at the end the body test overshot.
    end = y >= baba
    ocx = np.where(end, oax - bax, oax)
    ocy = np.where(end, oay - bay, oay)
    ocz = np.where(end, oaz - baz, oaz)
    cb = d[0] * ocx + d[1] * ocy + d[2] * ocz
    cc = ocx * ocx + ocy * ocy + ocz * ocz - r * r
    cdisc = cb * cb - cc
    tc = -cb - np.sqrt(np.maximum(cdisc, 0))
    cap = (disc >= 0) & ~body & (cdisc >= 0) & (tc > _EPS)
    return np.where(body, t, np.where(cap, tc, _INF))


def _ray_sphere_mask(o, d, center, radius):
    ox, oy, oz = o[0] - center[0], o[1] - center[1], o[2] - center[2]
    b = ox * d[0] + oy * d[1] + oz * d[2]
    c = ox * ox + oy * oy + oz * oz - radius * radius
    return (b * b - c >= 0) & ((b < 0) | (c < 0))


# ---------------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------------


_HIT_FNS = {"sphere": _hit_spheres, "box": _hit_boxes, "cylinder": _hit_cylinders, "cone": _hit_cones}


def _take(o, idx):
    return tuple(c if np.ndim(c) == 0 else c[idx] for c in o)


class _Caster:
    """Closest-hit ray casting over all primitives of a scene.

    ``cast`` returns per ray the distance ``t`` (inf for a miss), the material and a *part* id that tells apart
    surfaces of one object that meet at an edge-free joint from those that do not (each primitive and each capsule
    has its own part; the ground is part 0).
    """

    def __init__(self, scene: Scene):
        self.s = scene
        self.groups = []  # (kind, params, material (P,), first part id)
        part = 1
        for kind, params in (("sphere", scene.spheres), ("box", scene.boxes), ("cylinder", scene.cylinders),
                             ("cone", scene.cones)):
            if len(params):
                self.groups.append((kind, params, params[:, -1].astype(np.int64), part))
                part += len(params)
        self.figure_parts = []
        for fig in scene.figures:
            self.figure_parts.append(part)
            part += len(fig.cap_r)

    def cast(self, o, d):
        """Closest hits: ``(t, part, material)`` per ray; sky rays get t = inf, part -1 and material -1."""
        n = d[0].shape[0]
        # Ground plane y = 0, hit from above.
        with np.errstate(divide="ignore", invalid="ignore"):
            tg = -o[1] / d[1]
        best_t = np.where((d[1] < 0) & (tg > _EPS), tg, _INF).astype(np.float32)
        ground = np.isfinite(best_t)
        best_part = np.where(ground, 0, -1)
        best_mat = np.where(ground, 0, _SKY)
        for kind, params, mats, part0 in self.groups:
            t = _HIT_FNS[kind](o, d, params)  # (P, N)
            i = t.argmin(0)
            tm = t[i, np.arange(n)]
            closer = tm < best_t
            best_t = np.where(closer, tm, best_t)
            best_part = np.where(closer, part0 + i, best_part)
            best_mat = np.where(closer, mats[i], best_mat)
        for fig, part0 in zip(self.s.figures, self.figure_parts):
            sel = np.nonzero(_ray_sphere_mask(o, d, fig.center, fig.radius))[0]
            if not len(sel):
                continue
            t = _hit_capsules(_take(o, sel), _take(d, sel), fig.cap_a, fig.cap_b, fig.cap_r)  # (K, M)
            i = t.argmin(0)
            tm = t[i, np.arange(len(sel))]
            closer = tm < best_t[sel]
            best_t[sel] = np.where(closer, tm, best_t[sel])
            best_part[sel] = np.where(closer, part0 + i, best_part[sel])
            best_mat[sel] = np.where(closer, fig.cap_material[i], best_mat[sel])
        return best_t, best_part, best_mat

    def occluded(self, o, d) -> np.ndarray:
        """Whether each ray hits anything (shadow rays: they start on a surface and head up, so not the ground)."""
        blocked = np.zeros(d[0].shape[0], dtype=bool)
        for kind, params, _, _ in self.groups:
            blocked |= (_HIT_FNS[kind](o, d, params) < _INF).any(0)
        for fig in self.s.figures:
            sel = np.nonzero(_ray_sphere_mask(o, d, fig.center, fig.radius))[0]
            if len(sel):
                t = _hit_capsules(_take(o, sel), _take(d, sel), fig.cap_a, fig.cap_b, fig.cap_r)
                blocked[sel] |= (t < _INF).any(0)
        return blocked

    def normals(self, px, py, pz, part):
        """World-space unit normals at hit points of the given parts (all non-sky)."""
        nx, ny, nz = np.zeros_like(px), np.ones_like(px), np.zeros_like(px)  # the ground faces up
        for kind, params, _, part0 in self.groups:
            sel = np.nonzero((part >= part0) & (part < part0 + len(params)))[0]
            if not len(sel):
                continue
            q = params[part[sel] - part0]  # (M, width)
            x, y, z = px[sel], py[sel], pz[sel]
            if kind == "sphere":
                gx, gy, gz = x - q[:, 0], y - q[:, 1], z - q[:, 2]
            elif kind == "box":
                lx, lz = _box_local(x, z, q[:, 0], q[:, 2], q[:, 6])
                ly = y - q[:, 1]
                rel = np.abs(np.stack([lx / q[:, 3], ly / q[:, 4], lz / q[:, 5]]))  # (3, M)
                axis = rel.argmax(0)
                sign = np.sign(np.stack([lx, ly, lz])[axis, np.arange(len(sel))])
                lnx, gy, lnz = ((axis == k) * sign for k in range(3))
                cos, sin = np.cos(q[:, 6]), np.sin(q[:, 6])
                gx, gz = cos * lnx + sin * lnz, -sin * lnx + cos * lnz  # local -> world (inverse rotation)
            elif kind == "cylinder":
                rx, rz = x - q[:, 0], z - q[:, 1]
                top = (y >= q[:, 3] * (1 - 1e-4)) & (rx * rx + rz * rz < (q[:, 2] * (1 - 1e-3)) ** 2)
                gx, gy, gz = np.where(top, 0, rx), np.where(top, 1, 0), np.where(top, 0, rz)
            else:  # cone: gradient of x^2 + z^2 - k^2 (y - h)^2
                k2 = (q[:, 2] / q[:, 3]) ** 2
                gx, gy, gz = x - q[:, 0], -k2 * (y - q[:, 3]), z - q[:, 1]
            nx[sel], ny[sel], nz[sel] = gx, gy, gz
        for fig, part0 in zip(self.s.figures, self.figure_parts):
            sel = np.nonzero((part >= part0) & (part < part0 + len(fig.cap_r)))[0]
            if not len(sel):
                continue
            k = part[sel] - part0
            a, ba = fig.cap_a[k], fig.cap_b[k] - fig.cap_a[k]  # (M, 3)
            p = np.stack([px[sel], py[sel], pz[sel]], axis=1)
            h = np.clip(((p - a) * ba).sum(1) / np.maximum((ba * ba).sum(1), 1e-12), 0, 1)
            g = p - a - ba * h[:, None]
            nx[sel], ny[sel], nz[sel] = g[:, 0], g[:, 1], g[:, 2]
        norm = np.sqrt(nx * nx + ny * ny + nz * nz)
        norm = np.where(norm > 0, norm, 1)
        return nx / norm, ny / norm, nz / norm


def _texture(scene: Scene, mat, px, py, pz):
    """Texture pattern (0 or 1) and albedo (N, 3) at hit points."""
    org = scene.mat_origin[mat]
    f = scene.mat_freq[mat]
    kind = scene.mat_kind[mat]
    lx, ly, lz = (px - org[:, 0]) * f, (py - org[:, 1]) * f, (pz - org[:, 2]) * f
    checker = (np.floor(lx) + np.floor(ly) + np.floor(lz)) % 2
    stripes = np.floor(2 * ly + 0.5 * (lx + lz) * (mat == 0)) % 2  # the ground's stripes run across the view
    pattern = np.where(kind == _CHECKER, checker, np.where(kind == _STRIPES, stripes, 0)).astype(np.float32)
    albedo = np.where(pattern[:, None] > 0, scene.mat_second[mat], scene.mat_base[mat])
    return pattern, albedo


def _boundaries(feature_diff: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Mark, for pixel pairs flagged in ``feature_diff`` (a tuple of horizontal (H, W-1) and vertical (H-1, W)
    masks), the nearer pixel of each pair."""
    horiz, vert = feature_diff
    out = np.zeros(z.shape, dtype=bool)
    left_near = z[:, :-1] <= z[:, 1:]
    out[:, :-1] |= horiz & left_near
    out[:, 1:] |= horiz & ~left_near
    top_near = z[:-1] <= z[1:]
    out[:-1] |= vert & top_near
    out[1:] |= vert & ~top_near
    return out


def _pairs(a: np.ndarray, fn) -> tuple[np.ndarray, np.ndarray]:
    return fn(a[:, :-1], a[:, 1:]), fn(a[:-1], a[1:])


def _draw_poses(canvas: np.ndarray, figures: list) -> None:
    """Draw skeletons ``[(points (18, 2), visible (18,)), ...]`` onto ``canvas (H, W, 3)`` in [0, 1], in place, the
    OpenPose way: first every limb of every figure as a filled ellipse (half-width ``stick``) in 0.6 x the limb
    colour, then every keypoint as a disc in full colour; later shapes cover earlier ones."""
    H, W = canvas.shape[:2]
    stick = radius = max(_POSE_SIZE_AT_512 * min(H, W) / 512, 1.0)
    # Shapes in drawing order: (kind, centre, axis unit, half length, colour); kind 0 ellipse, 1 disc.
    centre, unit, half, colour = [], [], [], []
    for k, (i, j) in enumerate(OPENPOSE_LIMBS):
        for points, visible in figures:
            if visible[i] and visible[j]:
                axis = points[j] - points[i]
                length = float(np.hypot(*axis))
                centre.append((points[i] + points[j]) / 2)
                unit.append(axis / length if length > 0 else np.array([1.0, 0.0]))
                half.append(max(length / 2, stick))
                colour.append(np.array(OPENPOSE_COLORS[k]) * OPENPOSE_LIMB_SHADE)
    for k in range(len(OPENPOSE_KEYPOINTS)):
        for points, visible in figures:
            if visible[k]:
                centre.append(points[k])
                unit.append(np.array([1.0, 0.0]))
                half.append(radius)  # a disc is an ellipse with equal axes
                colour.append(np.array(OPENPOSE_COLORS[k], np.float64))
    if not centre:
        return
    c, u, a = np.array(centre, np.float32), np.array(unit, np.float32), np.array(half, np.float32)
    # Only the window that the shapes can reach.
    reach = a + stick
    x0, y0 = max(int(np.floor((c[:, 0] - reach).min())), 0), max(int(np.floor((c[:, 1] - reach).min())), 0)
    x1, y1 = min(int(np.ceil((c[:, 0] + reach).max())) + 1, W), min(int(np.ceil((c[:, 1] + reach).max())) + 1, H)
    if x0 >= x1 or y0 >= y1:
        return
    px = np.arange(x0, x1, dtype=np.float32)[None, None] + 0.5  # (1, 1, w) pixel centres
    py = np.arange(y0, y1, dtype=np.float32)[None, :, None] + 0.5  # (1, h, 1)
    rx, ry = px - c[:, 0, None, None], py - c[:, 1, None, None]  # (S, h, w)
    along = rx * u[:, 0, None, None] + ry * u[:, 1, None, None]
    across = -rx * u[:, 1, None, None] + ry * u[:, 0, None, None]
    inside = (along / a[:, None, None]) ** 2 + (across / stick) ** 2 <= 1  # (S, h, w)
    covered = inside.any(0)
    last = len(c) - 1 - inside[::-1].argmax(0)  # the last shape drawn over each pixel
    palette = np.array(colour, np.float32) / 255
    window = canvas[y0:y1, x0:x1]
    window[covered] = palette[last[covered]]


_PALETTE12 = None


def render_scene(scene: Scene, height: int, width: int, shadows: bool = True) -> SyntheticSample:
    """Ray cast a scene and derive all 8 domains from the one G-buffer."""
    global _PALETTE12
    if _PALETTE12 is None:
        _PALETTE12 = (seg_palette("colors12").numpy() / 255).astype(np.float32)
    cam = scene.camera
    H, W = height, width
    # Primary rays through pixel centres.
    jj, ii = np.meshgrid(np.arange(W, dtype=np.float32) + 0.5, np.arange(H, dtype=np.float32) + 0.5)
    u = ((jj - W / 2) / cam.focal).ravel()
    v = ((H / 2 - ii) / cam.focal).ravel()
    dx = cam.forward[0] + u * cam.right[0] + v * cam.up[0]
    dy = cam.forward[1] + u * cam.right[1] + v * cam.up[1]
    dz = cam.forward[2] + u * cam.right[2] + v * cam.up[2]
    inv = 1 / np.sqrt(dx * dx + dy * dy + dz * dz)
    d = (dx * inv, dy * inv, dz * inv)
    o = tuple(np.float32(c) for c in cam.origin)

    caster = _Caster(scene)
    t, part, mat = caster.cast(o, d)
    hit = np.nonzero(mat != _SKY)[0]
    N = H * W

    # G-buffer at hit pixels.
    th = t[hit]
    px, py, pz = (o[k] + th * d[k][hit] for k in range(3))
    mh = mat[hit]
    py = np.where(mh == 0, np.float32(0), py)  # exactly on the ground: no texture flicker from rounding
    nx, ny, nz = caster.normals(px, py, pz, part[hit])
    pattern_h, albedo_h = _texture(scene, mh, px, py, pz)

    # Shading: ambient + Lambert per light; the key light is shadowed by one ray per lit pixel.
    light = np.broadcast_to(scene.ambient, (len(hit), 3)).copy()
    for li, (ldir, lcol) in enumerate(zip(scene.light_dirs, scene.light_colors)):
        lam = np.maximum(nx * ldir[0] + ny * ldir[1] + nz * ldir[2], 0)
        if shadows and li == 0 and len(hit):  # the key light casts shadows; the weak fill light does not
            lit = np.nonzero(lam > 0)[0]
            so = (px[lit] + nx[lit] * 1e-3, py[lit] + ny[lit] * 1e-3, pz[lit] + nz[lit] * 1e-3)
            sd = tuple(np.full(len(lit), c, np.float32) for c in ldir)
            lam[lit] *= ~caster.occluded(so, sd)
        light += lam[:, None] * lcol
    image_h = np.clip(albedo_h * light, 0, 1)

    # Sky: a vertical gradient from horizon to zenith.
    sky_w = np.clip(d[1], 0, 1)[:, None] ** 0.6
    sky = (scene.sky_horizon * (1 - sky_w) + scene.sky_zenith * sky_w).astype(np.float32)  # (N, 3)

    image = sky.copy()
    image[hit] = image_h
    albedo = sky.copy()
    albedo[hit] = albedo_h

    # Camera-space normals encoded as (left, up, towards the camera) = -n in OpenCV axes.
    normal = np.zeros((N, 3), np.float32)
    normal[:, 2] = 1.0  # the sky faces the camera
    normal[hit, 0] = -(nx * cam.right[0] + ny * cam.right[1] + nz * cam.right[2])
    normal[hit, 1] = nx * cam.up[0] + ny * cam.up[1] + nz * cam.up[2]
    normal[hit, 2] = -(nx * cam.forward[0] + ny * cam.forward[1] + nz * cam.forward[2])

    # Planar depth and normalised disparity (near bright, sky 0).
    cos_f = d[0] * cam.forward[0] + d[1] * cam.forward[1] + d[2] * cam.forward[2]
    z = np.full(N, np.inf, np.float32)
    z[hit] = th * cos_f[hit]
    disp = np.zeros(N, np.float32)
    disp[hit] = 1 / z[hit]
    lo, hi = disp.min(), disp.max()
    depth = (disp - lo) / (hi - lo) if hi > lo else np.zeros_like(disp)

    seg_index = np.full(N, SEG_CLASS["sky"], np.int64)
    seg_index[hit] = scene.mat_class[mh]
    pattern = np.full(N, -1.0, np.float32)
    pattern[hit] = pattern_h

    # Lines from the G-buffer: occlusion (different parts with a depth jump, or sky), creases (normals > 40 deg
    # apart), material boundaries; line art adds texture boundaries.
    z2, part2, mat2 = z.reshape(H, W), part.reshape(H, W), mat.reshape(H, W)
    n2 = normal.reshape(H, W, 3)
    with np.errstate(invalid="ignore"):
        occl = _pairs(np.stack([z2, part2.astype(np.float32)], -1),
                      lambda a, b: (a[..., 1] != b[..., 1])
                      & ~(np.abs(a[..., 0] - b[..., 0]) <= 0.03 * np.minimum(a[..., 0], b[..., 0])))
    crease = _pairs(n2, lambda a, b: (a * b).sum(-1) < math.cos(math.radians(40)))
    material = _pairs(mat2, np.not_equal)
    geometric = tuple(a | b | c for a, b, c in zip(occl, crease, material))
    # Texture lines only where a texture cell spans >= 3 pixels (finer ones would alias into noise).
    cell_px = np.zeros(N, np.float32)
    facing = np.abs(nx * d[0][hit] + ny * d[1][hit] + nz * d[2][hit])  # foreshortening of the surface
    cell_px[hit] = cam.focal * facing / (z[hit] * scene.mat_freq[mh])
    coarse = (pattern != -1) & (cell_px >= 3)
    texture = _pairs(np.where(coarse, pattern, -2).reshape(H, W), lambda a, b: (a != b) & (a != -2) & (b != -2))
    edge = _boundaries(geometric, z2)
    line = edge | _boundaries(tuple(a & b for a, b in zip(texture, _pairs(mat2, np.equal))), z2)

    # OpenPose: keypoints that are in frame and not hidden behind other geometry.
    pose = np.zeros((H, W, 3), np.float32)
    kps = np.zeros((len(scene.figures), 18, 3), np.float32)
    drawn = []
    if scene.figures:
        for f, fig in enumerate(scene.figures):
            pts, kz = cam.project(fig.keypoints, H, W)
            col = np.clip(np.floor(pts[:, 0]).astype(np.int64), 0, W - 1)
            row = np.clip(np.floor(pts[:, 1]).astype(np.int64), 0, H - 1)
            inside = (kz > 0) & (pts[:, 0] >= 0) & (pts[:, 0] < W) & (pts[:, 1] >= 0) & (pts[:, 1] < H)
            visible = inside & (z2[row, col] >= kz - 0.12 * fig.height)
            kps[f, :, :2], kps[f, :, 2] = pts, visible
            drawn.append((pts, visible))
        _draw_poses(pose, drawn)

    gray = lambda m: np.repeat(m.reshape(H, W, 1).astype(np.float32), 3, axis=2)  # noqa: E731
    domains = {
        "image": image.reshape(H, W, 3),
        "lineart": gray(~line),
        "edge": gray(edge),
        "depth": gray(depth),
        "normal": (normal.reshape(H, W, 3) + 1) / 2,
        "albedo": albedo.reshape(H, W, 3),
        "segmentation": _PALETTE12[seg_index].reshape(H, W, 3),
        "openpose": pose,
    }
    return SyntheticSample(
        domains=domains,
        seg_index=seg_index.reshape(H, W),
        depth_z=z2,
        normal_camera=normal.reshape(H, W, 3),
        keypoints=kps,
        material=mat2.astype(np.int64),
        caption=scene.caption,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


class SyntheticWorld:
    """Deterministic scene generator: ``world[i]`` is scene ``i`` (a :class:`SyntheticSample`)."""

    def __init__(self, config: Optional[SyntheticConfig] = None, **overrides):
        if config is None:
            config = SyntheticConfig(**overrides)
        elif overrides:
            raise TypeError("Pass either a SyntheticConfig or keyword overrides, not both.")
        self.config = config.validate()

    def scene(self, index: int) -> Scene:
        if isinstance(index, bool) or int(index) != index or index < 0:
            raise ValueError(f"Scene index must be a non-negative integer, got {index!r}.")
        rng = np.random.default_rng([self.config.seed, int(index)])
        return sample_scene(rng, self.config)

    def __getitem__(self, index: int) -> SyntheticSample:
        cfg = self.config
        return render_scene(self.scene(index), cfg.height, cfg.width, cfg.shadows)


def sample_to_item(sample: SyntheticSample, index: int) -> dict:
    """The training item layout shared with :class:`jodi_core.data.joint_dataset.JointDataset`."""
    return {
        "pixels": sample.stacked(),  # (8, 3, H, W) in [-1, 1]
        "available": torch.ones(len(DOMAIN_NAMES), dtype=torch.bool),
        "caption": sample.caption,
        "seg_index": torch.from_numpy(sample.seg_index),
        "index": index,
    }


class SyntheticDataset(torch.utils.data.IterableDataset):
    """Streams synthetic training items (see :func:`sample_to_item`).

    Scenes ``start, start + 1, ...`` (``length`` of them, or forever when ``length`` is None) are split between
    DataLoader workers and, with ``rank``/``world_size``, between distributed processes: each scene is produced
    exactly once across all of them.
    """

    def __init__(self, config: Optional[SyntheticConfig] = None, *, start: int = 0, length: Optional[int] = None,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.world = SyntheticWorld(config or SyntheticConfig())
        if length is not None and length < 0:
            raise ValueError(f"length must be >= 0 or None, got {length!r}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}.")
        self.start, self.length, self.rank, self.world_size = start, length, rank, world_size

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        shard, shards = self.rank * workers + worker, self.world_size * workers
        i = self.start + shard
        end = None if self.length is None else self.start + self.length
        while end is None or i < end:
            yield sample_to_item(self.world[i], i)
            i += shards

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("An endless SyntheticDataset has no length.")
        return self.length
