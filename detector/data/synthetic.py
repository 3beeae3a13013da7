"""The embedded procedural detection dataset ("shapes").

A deterministic, seeded generator that writes a COCO-format dataset: ``train`` and ``val`` splits,
each an instances JSON plus a folder of PNG images::

    ROOT/
      annotations/instances_train.json   annotations/instances_val.json
      train/000000.png ...               val/000000.png ...
      dataset_meta.json                  # generator version + parameters (used to detect staleness)

It exists so that the detector's main job runs out of the box on a CPU-only machine, and it
contains the cases GFL's learned box distributions are meant for:

* several object categories (``ellipse``, ``rectangle``, ``triangle``, ``cross``) whose colour is
  random and independent of the category, so the detector has to learn shape;
* objects in all three COCO area ranges (small < 32², medium < 96², large);
* textured backgrounds (value noise, stripes, checkers, pixel noise, clutter lines);
* partial occlusion: objects are painted in order and later ones may cover up to 40 % of an
  earlier one; boxes are the extent of the *visible* part, as in COCO;
* blurred, ambiguous boundaries: a fraction of the objects have Gaussian-blurred alpha masks.

Every image is drawn from its own ``numpy`` generator seeded with ``(seed, split, index)``, so the
output is bit-identical for a given seed whatever the order or the number of processes used.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GENERATOR_VERSION = 1

CATEGORY_NAMES: tuple[str, ...] = ("ellipse", "rectangle", "triangle", "cross")
# COCO category ids are not contiguous; ours are not either, so the id -> label mapping is
# exercised by every run.
CATEGORY_IDS: tuple[int, ...] = (1, 2, 4, 7)

_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}


@dataclass
class SyntheticConfig:
    """Parameters of the generated dataset (all sizes in pixels of the written images).

    ``image_size_range`` is the inclusive range of each of width and height; set both ends equal
    for fixed-size images. ``size_mix`` gives the probabilities of drawing a small, medium or large
    object (COCO's area ranges), and ``*_side`` the ranges of the square root of the object's
    area in each case.
    """

    num_train: int = 600
    num_val: int = 150
    seed: int = 0
    image_size_range: tuple[int, int] = (224, 320)
    objects_per_image: tuple[int, int] = (1, 6)
    size_mix: tuple[float, float, float] = (0.2, 0.5, 0.3)
    small_side: tuple[float, float] = (14.0, 30.0)
    medium_side: tuple[float, float] = (36.0, 88.0)
    large_side: tuple[float, float] = (100.0, 160.0)
    blur_prob: float = 0.3
    blur_radius: tuple[float, float] = (1.5, 4.0)
    max_occluded_fraction: float = 0.4
    clutter_lines: tuple[int, int] = (0, 6)
    categories: tuple[str, ...] = field(default_factory=lambda: CATEGORY_NAMES)

    def validate(self) -> None:
        if self.num_train < 0 or self.num_val < 0:
            raise ValueError("num_train and num_val must be >= 0")
        lo, hi = self.image_size_range
        if not 32 <= lo <= hi:
            raise ValueError(f"image_size_range must satisfy 32 <= lo <= hi, got {lo, hi}")
        if not 1 <= self.objects_per_image[0] <= self.objects_per_image[1]:
            raise ValueError(f"bad objects_per_image {self.objects_per_image}")
        if abs(sum(self.size_mix) - 1.0) > 1e-6:
            raise ValueError(f"size_mix must sum to 1, got {self.size_mix}")
        unknown = set(self.categories) - set(CATEGORY_NAMES)
        if unknown or not self.categories:
            raise ValueError(f"categories must be a non-empty subset of {CATEGORY_NAMES}")


# --------------------------------------------------------------------------------------------
# drawing helpers
# --------------------------------------------------------------------------------------------


def _value_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random ``cells``×``cells`` grid bilinearly upsampled. (H, W)."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random saturated-ish RGB colour in [0, 255], float32 (3,)."""
    h = rng.random()
    s = rng.uniform(0.35, 1.0)
    v = rng.uniform(0.25, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured background, float32 (H, W, 3) in [0, 255]."""
    c0, c1 = _random_colour(rng), _random_colour(rng)
    t = _value_noise(rng, h, w, int(rng.integers(2, 6)))[..., None]
    img = c0 * (1 - t) + c1 * t
    kind = rng.integers(0, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # stripes at a random angle
        ang = rng.uniform(0, math.pi)
        period = rng.uniform(6, 30)
        s = 0.5 + 0.5 * np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * 2 * math.pi / period)
        img = img + (s[..., None] - 0.5) * rng.uniform(15, 45)
    elif kind == 1:  # checkers
        cell = int(rng.integers(8, 32))
        chk = ((xx // cell + yy // cell) % 2).astype(np.float32)
        img = img + (chk[..., None] - 0.5) * rng.uniform(10, 35)
    fine = _value_noise(rng, h, w, int(rng.integers(12, 40)))[..., None]
    img = img + (fine - 0.5) * rng.uniform(10, 40)
    img = img + rng.normal(0, rng.uniform(2, 8), size=(h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255)


def _clutter(rng: np.random.Generator, img: np.ndarray, n: int) -> np.ndarray:
    """Draw ``n`` random thin lines (background clutter, not objects) onto ``img``."""
    if n == 0:
        return img
    h, w = img.shape[:2]
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    colour = _random_colour(rng)
    for _ in range(n):
        x0, x1 = rng.uniform(0, w, 2)
        y0, y1 = rng.uniform(0, h, 2)
        draw.line([(x0, y0), (x1, y1)], fill=255, width=int(rng.integers(1, 4)))
    a = np.asarray(layer, dtype=np.float32)[..., None] / 255.0 * rng.uniform(0.3, 0.8)
    return img * (1 - a) + colour * a


def _shape_polygon(name: str, rng: np.random.Generator, w: float, h: float) -> np.ndarray:
    """Vertices (K, 2) of a shape centred at the origin with extent about ``w``×``h``."""
    if name == "ellipse":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        pts = np.stack([np.cos(t) * w / 2, np.sin(t) * h / 2], 1)
    elif name == "rectangle":
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]], dtype=np.float64) / 2
    elif name == "triangle":
        apex = rng.uniform(-0.3, 0.3) * w
        pts = np.array([[apex, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]], dtype=np.float64)
    elif name == "cross":
        a = rng.uniform(0.28, 0.4)  # arm thickness as a fraction of the extent
        bw, bh = w * a / 2, h * a / 2
        pts = np.array(
            [
                [-bw, -h / 2],
                [bw, -h / 2],
                [bw, -bh],
                [w / 2, -bh],
                [w / 2, bh],
                [bw, bh],
                [bw, h / 2],
                [-bw, h / 2],
                [-bw, bh],
                [-w / 2, bh],
                [-w / 2, -bh],
                [-bw, -bh],
            ],
            dtype=np.float64,
        )
    else:  # pragma: no cover - guarded by SyntheticConfig.validate
        raise ValueError(name)
    ang = rng.uniform(-math.pi / 9, math.pi / 9)  # up to ±20°
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    return pts @ rot.T


def _object_alpha(
    rng: np.random.Generator, poly: np.ndarray, h: int, w: int, blur: float
) -> np.ndarray:
    """Anti-aliased (and optionally blurred) alpha mask in [0, 1], float32 (H, W)."""
    ss = 4  # supersampling factor
    layer = Image.new("L", (w * ss, h * ss), 0)
    ImageDraw.Draw(layer).polygon([(float(x) * ss, float(y) * ss) for x, y in poly], fill=255)
    layer = layer.resize((w, h), Image.BOX)
    if blur > 0:
        layer = layer.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(layer, dtype=np.float32) / 255.0


def _object_fill(rng: np.random.Generator, h: int, w: int, colour: np.ndarray) -> np.ndarray:
    """Object surface: flat, noisy, or striped around ``colour``. float32 (H, W, 3)."""
    fill = np.broadcast_to(colour, (h, w, 3)).astype(np.float32)
    kind = rng.integers(0, 4)
    if kind == 1:
        fill = fill + (_value_noise(rng, h, w, int(rng.integers(4, 16)))[..., None] - 0.5) * 50
    elif kind == 2:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ang = rng.uniform(0, math.pi)
        period = rng.uniform(4, 12)
        s = np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * 2 * math.pi / period)
        fill = fill + s[..., None] * 25
    elif kind == 3:  # shading gradient
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        fill = fill * (0.75 + 0.5 * (xx / max(w - 1, 1)))[..., None] * 0.8
    return np.clip(fill, 0, 255)


# --------------------------------------------------------------------------------------------
# one image
# --------------------------------------------------------------------------------------------


def generate_image(
    cfg: SyntheticConfig, split: str, index: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw image ``index`` of ``split``.

    Returns ``(image, objects)``: ``image`` is uint8 (H, W, 3) RGB; each object is a dict with
    ``category`` (name), ``bbox`` ``[x, y, w, h]`` of the visible part in pixels (float), ``area``
    (visible pixels, float), ``blurred`` (bool) and ``occluded_fraction`` (float in [0, 1)).
    """
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODES[split], index, GENERATOR_VERSION])
    lo, hi = cfg.image_size_range
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    img = _background(rng, h, w)
    img = _clutter(rng, img, int(rng.integers(cfg.clutter_lines[0], cfg.clutter_lines[1] + 1)))

    n_obj = int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))
    sides = (cfg.small_side, cfg.medium_side, cfg.large_side)
    placed: list[dict[str, Any]] = []  # each: alpha (H,W), hard mask, category, blurred
    attempts = 0
    while len(placed) < n_obj and attempts < n_obj * 8:
        attempts += 1
        cat = cfg.categories[int(rng.integers(0, len(cfg.categories)))]
        band = int(rng.choice(3, p=np.asarray(cfg.size_mix)))
        side = rng.uniform(*sides[band])
        aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
        ow, oh = side * math.sqrt(aspect), side / math.sqrt(aspect)
        if cat == "triangle":  # a triangle covers half its box: scale up to keep the area band
            ow, oh = ow * math.sqrt(2), oh * math.sqrt(2)
        if cat == "cross":
            ow, oh = ow * 1.5, oh * 1.5
        if cat == "ellipse":
            ow, oh = ow * 1.13, oh * 1.13
        ow, oh = min(ow, w * 0.9), min(oh, h * 0.9)
        cx = rng.uniform(ow / 2, w - ow / 2)
        cy = rng.uniform(oh / 2, h - oh / 2)
        poly = _shape_polygon(cat, rng, ow, oh) + np.array([cx, cy])
        blurred = bool(rng.random() < cfg.blur_prob) and side >= 20
        blur = float(rng.uniform(*cfg.blur_radius)) * min(1.0, side / 60) if blurred else 0.0
        alpha = _object_alpha(rng, poly, h, w, blur)
        hard = alpha > 0.5
        if hard.sum() < 16:
            continue
        # occlusion check: every earlier object must keep enough of its visible pixels
        ok = True
        for p in placed:
            vis = p["visible"] & ~hard
            if vis.sum() < (1 - cfg.max_occluded_fraction) * p["hard"].sum() or vis.sum() < 16:
                ok = False
                break
        if not ok:
            continue
        # colour with enough contrast to what is underneath
        under = img[hard].mean(0)
        colour = _random_colour(rng)
        for _ in range(12):
            if np.linalg.norm(colour - under) > 90:
                break
            colour = _random_colour(rng)
        fill = _object_fill(rng, h, w, colour)
        a = alpha[..., None]
        img = img * (1 - a) + fill * a
        for p in placed:
            p["visible"] = p["visible"] & ~hard
        placed.append({"hard": hard, "visible": hard.copy(), "category": cat, "blurred": blurred})

    img = img + rng.normal(0, 2.0, size=img.shape).astype(np.float32)  # sensor noise
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    objects = []
    for p in placed:
        ys, xs = np.nonzero(p["visible"])
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        objects.append(
            {
                "category": p["category"],
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(p["visible"].sum()),
                "blurred": p["blurred"],
                "occluded_fraction": float(1 - p["visible"].sum() / p["hard"].sum()),
            }
        )
    return image, objects


# --------------------------------------------------------------------------------------------
# whole dataset
# --------------------------------------------------------------------------------------------


def _categories(cfg: SyntheticConfig) -> list[dict[str, Any]]:
    ids = dict(zip(CATEGORY_NAMES, CATEGORY_IDS))
    return [{"id": ids[n], "name": n, "supercategory": "shape"} for n in cfg.categories]


def _write_split(
    cfg: SyntheticConfig, root: Path, split: str, n: int, progress: bool
) -> dict[str, Any]:
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    ids = dict(zip(CATEGORY_NAMES, CATEGORY_IDS))
    images, annotations = [], []
    it: Sequence[int] | Any = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"generating {split}", leave=False)
    ann_id = 1
    for i in it:
        image, objects = generate_image(cfg, split, i)
        fname = f"{i:06d}.png"
        Image.fromarray(image).save(img_dir / fname, optimize=False, compress_level=1)
        images.append(
            {
                "id": i + 1,
                "file_name": fname,
                "height": int(image.shape[0]),
                "width": int(image.shape[1]),
            }
        )
        for o in objects:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": i + 1,
                    "category_id": ids[o["category"]],
                    "bbox": o["bbox"],
                    "area": o["area"],
                    "iscrowd": 0,
                    "blurred": o["blurred"],
                    "occluded_fraction": round(o["occluded_fraction"], 4),
                }
            )
            ann_id += 1
    return {
        "info": {
            "description": f"gfl-ops synthetic shapes, {split} split",
            "version": GENERATOR_VERSION,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": _categories(cfg),
    }


def dataset_paths(root: str | os.PathLike) -> dict[str, Path]:
    """Paths of the four inputs the training CLI takes, for a dataset rooted at ``root``."""
    r = Path(root)
    return {
        "train_ann": r / "annotations" / "instances_train.json",
        "train_images": r / "train",
        "val_ann": r / "annotations" / "instances_val.json",
        "val_images": r / "val",
    }


def _meta(cfg: SyntheticConfig) -> dict[str, Any]:
    return {"generator_version": GENERATOR_VERSION, "config": json.loads(json.dumps(asdict(cfg)))}


def is_generated(root: str | os.PathLike, cfg: SyntheticConfig | None = None) -> bool:
    """True when ``root`` holds a complete dataset generated with ``cfg`` (default config)."""
    cfg = cfg or SyntheticConfig()
    meta_file = Path(root) / "dataset_meta.json"
    if not meta_file.is_file():
        return False
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta != _meta(cfg):
        return False
    return all(p.exists() for p in dataset_paths(root).values())


def generate_dataset(
    root: str | os.PathLike,
    cfg: SyntheticConfig | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the dataset under ``root`` (skipped if already there with the same parameters).

    Returns the paths from :func:`dataset_paths`. The meta file is written last, so an
    interrupted generation is detected and redone on the next call.
    """
    cfg = cfg or SyntheticConfig()
    cfg.validate()
    root = Path(root)
    if not overwrite and is_generated(root, cfg):
        return dataset_paths(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    meta_file = root / "dataset_meta.json"
    if meta_file.exists():
        meta_file.unlink()
    paths = dataset_paths(root)
    for split, n in (("train", cfg.num_train), ("val", cfg.num_val)):
        data = _write_split(cfg, root, split, n, progress)
        tmp = paths[f"{split}_ann"].with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, paths[f"{split}_ann"])
    meta_file.write_text(json.dumps(_meta(cfg), indent=2))
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m detector.data.synthetic ROOT``: write the embedded dataset."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m detector.data.synthetic",
        description="Generate the embedded COCO-format shapes dataset.",
    )
    p.add_argument("root", help="output directory")
    p.add_argument("--num-train", type=int, default=SyntheticConfig.num_train)
    p.add_argument("--num-val", type=int, default=SyntheticConfig.num_val)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="regenerate even if up to date")
    a = p.parse_args(argv)
    cfg = SyntheticConfig(num_train=a.num_train, num_val=a.num_val, seed=a.seed)
    paths = generate_dataset(a.root, cfg, progress=True, overwrite=a.overwrite)
    for k, v in paths.items():
        print(f"{k:>13}: {v}")


if __name__ == "__main__":
    main()
