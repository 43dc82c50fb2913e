"""Generated videos for the ablation study, harder than the embedded toy set.

``make_synthetic_videos(root)`` writes the VSPW layout: ``data/<video>/origin/*.jpg``,
``data/<video>/mask/*.png`` (stored value = train id + 1; 0 and 255 are ignored) and
``train.txt`` / ``val.txt``. There is no ``dataset.yaml``, so the data reads as VSPW (124 classes)
and the 12 classes here use train ids 0..11 of that label space.

What makes it harder than ``themask.data.toy``:
- 12 classes: 4 "stuff" textures and 8 objects. Objects come in pairs that share a shape and
  differ by texture, and in pairs that share a texture and differ by shape;
- every region draws its two colours from one small shared palette, so colour never identifies
  a class;
- 2-3 stuff regions and 2-4 objects per video (4-7 classes per clip);
- the camera pans, objects move in straight lines at different speeds, occlude each other
  (depth order) and enter and leave the frame;
- videos have 18-24 frames, so mVC16 is defined.
Output is a pure function of the arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = (
    "stripes", "checker", "grain", "waves",  # stuff (train ids 0-3)
    "disc/rings", "disc/dots", "box/diagonal", "box/rings",  # objects (4-11): shape/texture
    "triangle/vertical", "triangle/dots", "cross/checker", "ellipse/diagonal",
)  # fmt: skip
NUM_STUFF = 4
_OBJECTS = [(4, "disc", "rings"), (5, "disc", "dots"), (6, "box", "diagonal"),
            (7, "box", "rings"), (8, "triangle", "vertical"), (9, "triangle", "dots"),
            (10, "cross", "checker"), (11, "ellipse", "diagonal")]  # fmt: skip
# Shared palette: (dark, light) RGB pairs any region may draw.
_PALETTE = np.array(
    [
        [(40, 40, 120), (120, 140, 230)],
        [(30, 90, 30), (130, 210, 110)],
        [(110, 40, 30), (230, 150, 110)],
        [(70, 70, 70), (190, 190, 190)],
        [(100, 80, 20), (240, 210, 90)],
        [(80, 20, 90), (200, 120, 220)],
    ],
    dtype=np.float32,
)


def _texture(name: str, x: np.ndarray, y: np.ndarray, grain: np.ndarray) -> np.ndarray:
    """{0, 1} pattern of texture ``name`` at coordinates (x, y) (float arrays, any shape)."""
    if name == "stripes":
        return np.floor(y / 4) % 2
    if name == "checker":
        return (np.floor(x / 5) + np.floor(y / 5)) % 2
    if name == "grain":
        h, w = grain.shape
        return grain[(y.astype(int) // 2) % h, (x.astype(int) // 2) % w]
    if name == "waves":
        return (np.sin(x / 3.0 + 2.0 * np.sin(y / 6.0)) > 0).astype(np.float32)
    if name == "rings":
        return np.floor(np.hypot(x, y) / 3) % 2
    if name == "dots":
        return ((x % 7) - 3.5) ** 2 + ((y % 7) - 3.5) ** 2 <= 5
    if name == "diagonal":
        return np.floor((x + y) / 4) % 2
    if name == "vertical":
        return np.floor(x / 3) % 2
    raise ValueError(f"unknown texture {name!r}")


def _shape(name: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of shape ``name`` of size ``r`` centred at the origin of (x, y)."""
    if name == "disc":
        return x**2 + y**2 <= r**2
    if name == "box":
        return (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)
    if name == "triangle":
        return (y <= 0.8 * r) & (y >= -r) & (np.abs(x) <= (y + r) * 0.6)
    if name == "cross":
        arm = 0.35 * r
        return (np.abs(x) <= r) & (np.abs(y) <= r) & ((np.abs(x) <= arm) | (np.abs(y) <= arm))
    if name == "ellipse":
        return (x / (1.3 * r)) ** 2 + (y / (0.6 * r)) ** 2 <= 1
    raise ValueError(f"unknown shape {name!r}")


def _paint(rng: np.random.Generator, pattern: np.ndarray, shade: np.ndarray) -> np.ndarray:
    """(n, 3) colours: a random palette pair, light/dark by ``pattern``, times ``shade``."""
    dark, light = _PALETTE[rng.integers(len(_PALETTE))]
    if rng.random() < 0.5:
        dark, light = light, dark
    p = pattern.astype(np.float32)[:, None]
    return (dark * (1 - p) + light * p) * shade[:, None]


def _render_video(rng: np.random.Generator, size: tuple[int, int], length: int):
    """Yield (image (H, W, 3) uint8, mask (H, W) uint8 stored values) per frame."""
    h, w = size
    stuff = rng.choice(NUM_STUFF, size=int(rng.integers(2, 4)), replace=False)
    objects = [_OBJECTS[i] for i in rng.choice(len(_OBJECTS), int(rng.integers(2, 5)), False)]
    grain = (rng.random((64, 64)) < 0.5).astype(np.float32)
    # stuff: horizontal bands with wavy borders in world coordinates, fixed colours per video
    borders = np.sort(rng.uniform(0.25, 0.75, size=len(stuff) - 1)) * h
    waves = [(rng.uniform(3, 8), rng.uniform(0.04, 0.1), rng.uniform(0, 6.3)) for _ in borders]
    stuff_seeds = rng.integers(1 << 31, size=len(stuff))
    cam0, cam1 = rng.uniform(-30, 30, size=2), rng.uniform(-30, 30, size=2)
    # objects: straight lines through the frame; some start or end outside it
    obj = []
    for class_id, shape, texture in objects:
        radius = rng.uniform(0.15, 0.3) * h
        start = np.array([rng.uniform(0.1, 0.9) * h, rng.uniform(-0.2, 1.2) * w])
        angle = rng.uniform(0, 2 * np.pi)
        velocity = rng.uniform(1.0, 4.0) * np.array([0.4 * np.sin(angle), np.cos(angle)])
        obj.append((class_id, shape, texture, radius, start, velocity, int(rng.integers(1 << 31))))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for t in range(length):
        cy, cx = cam0 + (cam1 - cam0) * t / max(length - 1, 1)
        wy, wx = y + cy, x + cx
        band = np.zeros((h, w), dtype=int)
        for border, (amp, freq, phase) in zip(borders, waves):
            band += wy > border + amp * np.sin(wx * freq + phase)
        image = np.zeros((h, w, 3), dtype=np.float32)
        mask = np.zeros((h, w), dtype=np.uint8)
        shade = 0.8 + 0.4 * (wx - wx.min()) / max(float(np.ptp(wx)), 1.0)
        for i, class_id in enumerate(stuff):
            region = band == i
            pattern = _texture(CLASS_NAMES[class_id], wx[region], wy[region], grain)
            image[region] = _paint(np.random.default_rng(stuff_seeds[i]), pattern, shade[region])
            mask[region] = class_id + 1
        for class_id, shape, texture, radius, start, velocity, seed in obj:
            py, px = start + velocity * t
            lx, ly = x - px, y - py  # objects move in frame coordinates (independent of pan)
            region = _shape(shape, lx, ly, radius)
            if not region.any():
                continue
            pattern = _texture(texture, lx[region], ly[region], grain)
            image[region] = _paint(np.random.default_rng(seed), pattern, shade[region])
            mask[region] = class_id + 1
            edge = region & ~_eroded(region)
            mask[edge] = 255  # void outline, as VSPW's boundary pixels
        image += rng.normal(0.0, 6.0, size=image.shape).astype(np.float32)
        yield np.clip(image, 0, 255).astype(np.uint8), mask


def _eroded(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, mode="edge")
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def make_synthetic_videos(
    root: str | Path,
    *,
    seed: int = 0,
    num_train: int = 150,
    num_val: int = 8,
    size: tuple[int, int] = (96, 128),
    frames: tuple[int, int] = (18, 24),
) -> Path:
    """Write ``num_train`` + ``num_val`` videos of ``frames`` (min, max) frames of ``size``
    (H, W) under ``root`` in the VSPW layout; returns ``root``."""
    root = Path(root)
    names = [f"v{i:04d}" for i in range(num_train + num_val)]
    for index, name in enumerate(names):
        rng = np.random.default_rng([seed, index])
        length = int(rng.integers(frames[0], frames[1] + 1))
        origin, masks = root / "data" / name / "origin", root / "data" / name / "mask"
        origin.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        for t, (image, mask) in enumerate(_render_video(rng, size, length)):
            Image.fromarray(image).save(origin / f"{t:05d}.jpg", quality=92)
            Image.fromarray(mask).save(masks / f"{t:05d}.png")
    (root / "train.txt").write_text("".join(f"{n}\n" for n in names[:num_train]))
    (root / "val.txt").write_text("".join(f"{n}\n" for n in names[num_train:]))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-videos", type=int, default=150)
    parser.add_argument("--val-videos", type=int, default=8)
    args = parser.parse_args()
    make_synthetic_videos(
        args.root, seed=args.seed, num_train=args.train_videos, num_val=args.val_videos
    )


if __name__ == "__main__":
    main()
