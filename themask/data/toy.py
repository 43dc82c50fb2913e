"""Synthetic videos in the VSPW layout (0 others, 1..8 classes, 255 void), byte-reproducible."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from themask.data.description import DESCRIPTION_FILE, DatasetDescription
from themask.data.vspw import PathLike

logger = logging.getLogger(__name__)

# stuff (textures over the background), then objects (shapes with their own textures)
TOY_CLASS_NAMES = ("stripes", "checker", "dots", "grain", "disc", "box", "triangle", "cross")
# (8, 3) uint8 display colour of each toy train id (not the colours of the rendered frames)
TOY_PALETTE: np.ndarray = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230),
], dtype=np.uint8)  # fmt: skip

TOY_DESCRIPTION = DatasetDescription(TOY_CLASS_NAMES, TOY_PALETTE, source="toy dataset description")

STUFF_IDS = (1, 2, 3, 4)  # raw ids
OBJECT_IDS = (5, 6, 7, 8)
OTHERS_ID, VOID_ID = 0, 255
_CONTRAST = (60.0, 120.0)  # the light colour exceeds the dark one by this much (each channel)


class _ColourField:
    """Two colours bilinear between random corners: (u, v, pattern) in [0, 1] → (n, 3) RGB."""

    def __init__(self, rng: np.random.Generator) -> None:
        dark = rng.uniform(0.0, 150.0, size=(2, 2, 3))
        light = np.clip(dark + rng.uniform(*_CONTRAST, size=(2, 2, 3)), 0.0, 255.0)
        self.colours = (light, dark) if rng.random() < 0.5 else (dark, light)

    @staticmethod
    def _at(corners: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        u, v = np.clip(u, 0.0, 1.0)[:, None], np.clip(v, 0.0, 1.0)[:, None]
        top, bottom = (row[0] * (1 - u) + row[1] * u for row in corners)
        return top * (1 - v) + bottom * v

    def __call__(self, u: np.ndarray, v: np.ndarray, pattern: np.ndarray) -> np.ndarray:
        c0, c1 = (self._at(corners, u, v) for corners in self.colours)
        p = pattern[:, None]
        return (c0 * (1 - p) + c1 * p).astype(np.float32)


# The 0/1 texture of a class at coordinates (x, y) ("grain", 4, is a per-video field).
_TEXTURES = {
    1: lambda x, y: np.floor(y / 4) % 2,  # stripes
    2: lambda x, y: (np.floor(x / 6) + np.floor(y / 6)) % 2,  # checker
    3: lambda x, y: ((x % 8) - 4) ** 2 + ((y % 8) - 4) ** 2 <= 5,  # dots
    5: lambda x, y: np.floor(np.hypot(x, y) / 3) % 2,  # rings
    6: lambda x, y: np.floor((x + y) / 4) % 2,  # diagonal
    7: lambda x, y: np.floor(x / 3) % 2,  # vertical
    8: lambda x, y: np.floor((x - y) / 4) % 2,  # anti-diagonal
}
# Boolean mask of an object of radius r centred at the origin of the local coordinates (x, y).
_SHAPES = {
    5: lambda x, y, r: x**2 + y**2 <= r**2,  # disc
    6: lambda x, y, r: (np.abs(x) <= r * 0.85) & (np.abs(y) <= r * 0.85),  # box
    7: lambda x, y, r: (y <= r * 0.8) & (y >= -r) & (np.abs(x) <= (y + r) * 0.6),  # triangle
    8: lambda x, y, r: (  # cross
        (np.abs(x) <= r) & (np.abs(y) <= r) & ((np.abs(x) <= r * 0.35) | (np.abs(y) <= r * 0.35))
    ),
}


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion by one pixel (pixels outside the frame count as inside)."""
    padded = np.pad(mask, 1, mode="edge")
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


@dataclass
class _Object:
    class_id: int
    radius: float
    position: np.ndarray  # (y, x) in world coordinates at frame 0
    velocity: np.ndarray  # pixels per frame
    colours: _ColourField


class _Scene:
    """One video's world: two stuff classes split by a wavy horizon, an others patch, objects."""

    def __init__(
        self,
        rng: np.random.Generator,
        stuff: tuple[int, int],
        objects: list[int],
        size: tuple[int, int],
        num_frames: int,
    ) -> None:
        self.rng, self.size, self.num_frames = rng, size, num_frames
        h, w = size
        self.world = (h + h // 3, w + w // 2)
        self.stuff, self.stuff_colours = stuff, [_ColourField(rng) for _ in stuff]
        base, amp = self.world[0] * rng.uniform(0.4, 0.6), rng.uniform(4, 10)
        self.horizon = (base, amp, rng.uniform(0.03, 0.08), rng.uniform(0, 2 * np.pi))
        self.grain = rng.random((self.world[0] // 2 + 2, self.world[1] // 2 + 2)) < 0.5  # 2x2 cells
        self.others = None
        if rng.random() < 0.75:  # (centre y, x, radius y, x, colours)
            centre = (rng.uniform(0, self.world[0]), rng.uniform(0, self.world[1]))
            radii = (rng.uniform(h * 0.12, h * 0.22), rng.uniform(w * 0.15, w * 0.3))
            self.others = (*centre, *radii, _ColourField(rng))
        corner = (self.world[0] - h, self.world[1] - w)  # the camera's top-left: start, end
        self.camera = [np.array([rng.uniform(0, c) for c in corner]) for _ in range(2)]
        self.objects = [self._new_object(c) for c in objects]

    def _new_object(self, class_id: int) -> _Object:
        h, w = self.size
        radius = self.rng.uniform(0.18, 0.28) * h
        centre = np.array(self.world) / 2
        position = centre + self.rng.uniform(-0.35, 0.35, size=2) * np.array([h, w])
        speed, angle = self.rng.uniform(1.0, 2.5), self.rng.uniform(0, 2 * np.pi)
        velocity = speed * np.array([np.sin(angle), np.cos(angle)])
        return _Object(class_id, radius, position, velocity, _ColourField(self.rng))

    def _object_position(self, obj: _Object, t: int) -> np.ndarray:
        """Position at frame t, bouncing inside the world (reflection off its walls)."""
        low = np.full(2, obj.radius)
        span = np.array(self.world, dtype=np.float64) - 2 * obj.radius
        p = (obj.position + obj.velocity * t - low) % (2 * span)
        return low + np.where(p > span, 2 * span - p, p)

    def render(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame t -> (H, W, 3) uint8 RGB image and (H, W) uint8 raw labels."""
        h, w = self.size
        alpha = t / max(self.num_frames - 1, 1)
        cam_y, cam_x = self.camera[0] + alpha * (self.camera[1] - self.camera[0])
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        wy, wx = y + np.float32(cam_y), x + np.float32(cam_x)
        image, label = np.zeros((h, w, 3), dtype=np.float32), np.zeros((h, w), dtype=np.uint8)

        base, amp, freq, phase = self.horizon
        lower = wy > base + amp * np.sin(wx * freq + phase)
        wu, wv = wx / self.world[1], wy / self.world[0]
        for region, class_id, colours in zip((~lower, lower), self.stuff, self.stuff_colours):
            if class_id == 4:  # grain
                pattern = self.grain[(wy // 2).astype(int), (wx // 2).astype(int)]
            else:
                pattern = _TEXTURES[class_id](wx, wy)
            pattern = pattern[region].astype(np.float32)
            image[region] = colours(wu[region], wv[region], pattern)
            label[region] = class_id

        if self.others is not None:
            oy, ox, ry, rx, colours = self.others
            region = ((wy - oy) / ry) ** 2 + ((wx - ox) / rx) ** 2 <= 1.0
            u, v = (wx[region] - ox + rx) / (2 * rx), (wy[region] - oy + ry) / (2 * ry)
            # No texture: a smooth blend between the two colour fields.
            image[region] = colours(u, v, np.clip(u, 0, 1))
            label[region] = OTHERS_ID

        void = np.zeros((h, w), dtype=bool)
        for obj in self.objects:  # later objects are in front
            py, px = self._object_position(obj, t)
            lx, ly = wx - np.float32(px), wy - np.float32(py)
            region = _SHAPES[obj.class_id](lx, ly, obj.radius)
            lx, ly = lx[region], ly[region]
            pattern = _TEXTURES[obj.class_id](lx, ly).astype(np.float32)
            u, v = (lx + obj.radius) / (2 * obj.radius), (ly + obj.radius) / (2 * obj.radius)
            image[region] = obj.colours(u, v, pattern)
            label[region] = obj.class_id
            void &= ~region
            void |= region & ~_erode(region)
        label[void] = VOID_ID
        image += self.rng.normal(0.0, 5.0, size=image.shape).astype(np.float32)
        return np.clip(image, 0, 255).astype(np.uint8), label


def make_toy_dataset(
    root: PathLike,
    *,
    seed: int = 0,
    num_train: int = 200,
    num_val: int = 6,
    num_frames: int = 16,
    val_frames: int = 24,
    size: tuple[int, int] = (96, 128),
) -> Path:
    """Write (over) the toy dataset under ``root`` (returned): videos of ``num_frames - 3 ..
    num_frames`` frames (val: ``val_frames``, > 16 for mVC16) of ``size`` (H, W)."""
    if min(num_frames, val_frames) < 4:
        raise ValueError(f"num_frames and val_frames must be >= 4, got {num_frames}, {val_frames}")
    root, rng = Path(root), np.random.default_rng(seed)
    # per video 2 stuff classes and 1-3 object classes, cycling so that every class is used
    pairs = list(itertools.combinations(STUFF_IDS, 2))
    pair_order = rng.permutation(len(pairs))
    object_cycle, cursor = [int(c) for c in rng.permutation(OBJECT_IDS)], 0
    names = [f"{i:04d}_toy{seed}" for i in range(num_train + num_val)]
    for index, name in enumerate(names):
        stuff = pairs[pair_order[index % len(pairs)]]
        stuff = stuff[::-1] if rng.random() < 0.5 else stuff
        count = int(rng.integers(1, 4))
        objects = [object_cycle[(cursor + i) % len(object_cycle)] for i in range(count)]
        cursor += count
        video_rng = np.random.default_rng([seed, int(name[:4])])
        most = num_frames if index < num_train else val_frames
        length = int(video_rng.integers(most - 3, most + 1))
        start = int(video_rng.integers(0, 300))
        scene = _Scene(video_rng, stuff, objects, size, length)
        frame_dir = TOY_DESCRIPTION.frame_dir(root, name)
        mask_dir = TOY_DESCRIPTION.mask_dir(root, name)
        for folder in (frame_dir, mask_dir):
            folder.mkdir(parents=True, exist_ok=True)
        for t in range(length):
            image, label = scene.render(t)
            stem = f"{start + t:08d}"
            Image.fromarray(image).save(frame_dir / f"{stem}.jpg", quality=92)
            Image.fromarray(label).save(mask_dir / f"{stem}.png")
    for split, listed in (("train", names[:num_train]), ("val", names[num_train:])):
        (root / f"{split}.txt").write_text("".join(f"{n}\n" for n in listed), encoding="utf-8")
    (root / DESCRIPTION_FILE).write_text(TOY_DESCRIPTION.to_yaml(), encoding="utf-8")
    logger.info("wrote toy dataset to %s: %d train and %d val videos", root, num_train, num_val)
    return root
