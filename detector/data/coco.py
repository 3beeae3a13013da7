"""COCO-format detection datasets through pycocotools.

A dataset is an instances JSON (``images``, ``annotations``, ``categories``) plus a folder of
images; the COCO 2017 layout (``annotations/instances_train2017.json`` + ``train2017/``) works as
is. Category ids are mapped to contiguous labels ``0..C-1`` in increasing id order; crowd boxes
are left out of the training targets (COCOeval still uses them through the GT file).

Bad input is reported early and precisely (:class:`DatasetError` names the file and the problem):

* missing / unreadable / malformed annotation file, missing top-level keys, malformed entries,
  annotations that point to unknown images or unknown category ids -> error;
* boxes with zero or negative size (after clipping to the image) -> skipped, logged;
* missing image files -> skipped, logged (an error if nothing is left);
* an image that cannot be decoded -> ``on_bad_image='raise'`` raises :class:`DatasetError` naming
  the file; ``'skip'`` logs it and substitutes the next image (training keeps going); ``'drop'``
  logs it and returns ``(None, target)``, which the collate leaves out (evaluation then covers
  the remaining images and reports how many were dropped);
* no usable image at all -> error.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from .transforms import DetectionTransform, TransformConfig

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A problem with a dataset's files; the message names the file and the problem."""


def _fmt_ids(ids: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in list(ids)[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def load_coco_json(ann_file: str | os.PathLike) -> COCO:
    """Load and validate an instances JSON; return an indexed pycocotools ``COCO`` object.

    Also fills a missing ``area`` with ``w*h`` and a missing ``iscrowd`` with 0 (COCOeval needs
    both). Raises :class:`DatasetError` for every structural problem, naming ``ann_file``.
    """
    path = Path(ann_file)
    if not path.exists():
        raise DatasetError(f"{path}: annotation file not found")
    if not path.is_file():
        raise DatasetError(f"{path}: annotation path is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read annotation file ({e})") from e
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: expected a JSON object at top level, got {type(data).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{path}: missing top-level key {key!r} (not a COCO instances file)")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    if not data["categories"]:
        raise DatasetError(f"{path}: 'categories' is empty")

    cat_ids = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise DatasetError(f"{path}: categories[{i}] has no integer 'id'")
        if c["id"] in cat_ids:
            raise DatasetError(f"{path}: duplicate category id {c['id']}")
        cat_ids.add(c["id"])
        c.setdefault("name", str(c["id"]))
    img_ids = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise DatasetError(f"{path}: images[{i}] is not an object")
        for key in ("id", "file_name"):
            if key not in im:
                raise DatasetError(f"{path}: images[{i}] has no {key!r}")
        if im["id"] in img_ids:
            raise DatasetError(f"{path}: duplicate image id {im['id']}")
        img_ids.add(im["id"])
    unknown_cat: dict[int, list] = {}
    unknown_img: list = []
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise DatasetError(f"{path}: annotations[{i}] is not an object")
        for key in ("image_id", "category_id", "bbox"):
            if key not in a:
                raise DatasetError(f"{path}: annotation {a.get('id', f'#{i}')} has no {key!r}")
        bbox = a["bbox"]
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in bbox)
        ):
            raise DatasetError(
                f"{path}: annotation {a.get('id', f'#{i}')} has a malformed bbox {bbox!r} "
                "(expected [x, y, width, height] of finite numbers)"
            )
        if a["category_id"] not in cat_ids:
            unknown_cat.setdefault(a["category_id"], []).append(a.get("id", f"#{i}"))
        if a["image_id"] not in img_ids:
            unknown_img.append(a.get("id", f"#{i}"))
        a.setdefault("id", i + 1)
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = float(bbox[2]) * float(bbox[3])
    if unknown_cat:
        desc = "; ".join(
            f"category_id {cid} (annotations {_fmt_ids(ids)})" for cid, ids in unknown_cat.items()
        )
        raise DatasetError(
            f"{path}: annotations use category ids not listed in 'categories': {desc}; "
            f"known ids: {sorted(cat_ids)}"
        )
    if unknown_img:
        raise DatasetError(
            f"{path}: annotations {_fmt_ids(unknown_img)} refer to image ids not in 'images'"
        )
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """A COCO-format detection dataset.

    Args:
        ann_file: instances JSON.
        image_dir: folder the ``file_name`` entries are relative to.
        transform: the :class:`TransformConfig` (resize scale, flip probability, mean/std).
        filter_empty: drop images without any usable (non-crowd, positive-size) box — right for
            training (mmdetection's ``filter_empty_gt``), wrong for evaluation.
        on_bad_image: ``'raise'``, ``'skip'`` or ``'drop'`` for images that exist but cannot be
            decoded (see the module docstring).
        seed: base seed of the per-sample augmentation when indexed with a plain ``int``.

    Indexing with ``i`` or ``(i, aug_seed)`` returns ``(image, target)``: ``image`` float32
    (3, H, W) normalised; ``target`` a dict with ``boxes`` float32 (G, 4) xyxy in the resized
    image, ``labels`` int64 (G,) in ``0..C-1``, ``image_id`` (int), ``orig_shape`` (H0, W0),
    ``img_shape`` (H, W), ``scale_factor`` (sx, sy, sx, sy), ``flip`` (bool), ``file_name``.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        transform: TransformConfig | None = None,
        filter_empty: bool = True,
        on_bad_image: str = "raise",
        seed: int = 0,
    ) -> None:
        if on_bad_image not in ("raise", "skip", "drop"):
            raise ValueError(
                f"on_bad_image must be 'raise', 'skip' or 'drop', got {on_bad_image!r}"
            )
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.on_bad_image = on_bad_image
        self.seed = seed
        self.transform = DetectionTransform(transform or TransformConfig())
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image folder not found")
        self.coco = load_coco_json(self.ann_file)
        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.cat_ids: list[int] = [c["id"] for c in cats]
        self.class_names: list[str] = [str(c["name"]) for c in cats]
        self.cat2label = {cid: i for i, cid in enumerate(self.cat_ids)}

        self.records: list[dict[str, Any]] = []
        missing: list[str] = []
        bad_boxes: list[Any] = []
        no_boxes = 0
        for img in sorted(self.coco.dataset["images"], key=lambda im: im["id"]):
            file = self.image_dir / img["file_name"]
            if not file.is_file():
                missing.append(str(img["file_name"]))
                continue
            boxes, labels = [], []
            w_img, h_img = img.get("width"), img.get("height")
            for a in self.coco.imgToAnns.get(img["id"], []):
                if a.get("iscrowd", 0):
                    continue
                x, y, w, h = (float(v) for v in a["bbox"])
                x1, y1, x2, y2 = x, y, x + w, y + h
                if w_img and h_img:  # clip to the image, as the annotation tools allow overshoot
                    x1, x2 = min(max(x1, 0.0), w_img), min(max(x2, 0.0), w_img)
                    y1, y2 = min(max(y1, 0.0), h_img), min(max(y2, 0.0), h_img)
                if x2 - x1 < 1e-3 or y2 - y1 < 1e-3:
                    bad_boxes.append(a["id"])
                    continue
                boxes.append([x1, y1, x2, y2])
                labels.append(self.cat2label[a["category_id"]])
            if filter_empty and not boxes:
                no_boxes += 1
                continue
            self.records.append(
                {
                    "image_id": img["id"],
                    "file": file,
                    "file_name": img["file_name"],
                    "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    "labels": np.asarray(labels, dtype=np.int64),
                    "landscape": bool(w_img and h_img and w_img > h_img),
                }
            )
        if bad_boxes:
            logger.warning(
                "%s: skipped %d boxes with zero or negative size (annotation ids %s)",
                self.ann_file,
                len(bad_boxes),
                _fmt_ids(bad_boxes),
            )
        if missing:
            logger.warning(
                "%s: skipped %d images missing from %s (%s)",
                self.ann_file,
                len(missing),
                self.image_dir,
                _fmt_ids(missing),
            )
        if filter_empty and no_boxes:
            logger.info("%s: left out %d images without usable boxes", self.ann_file, no_boxes)
        if not self.records:
            raise DatasetError(
                f"{self.ann_file}: dataset is empty: {len(self.coco.dataset['images'])} images "
                f"listed, {len(missing)} missing from {self.image_dir}, {no_boxes} without usable "
                "boxes"
            )
        self.bad_images: set[int] = set()

    # ------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    @property
    def image_ids(self) -> list[int]:
        """Image ids of the usable images, in dataset order."""
        return [r["image_id"] for r in self.records]

    @property
    def aspect_groups(self) -> list[int]:
        """Per image 1 if wider than tall (from the JSON sizes), else 0 — for grouping batches
        by orientation as mmdetection's ``GroupSampler`` does (less padding)."""
        return [int(r["landscape"]) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def _open(self, rec: dict[str, Any]) -> Image.Image:
        try:
            with Image.open(rec["file"]) as im:
                im.load()
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise DatasetError(f"{rec['file']}: cannot decode image ({e})") from e

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | None, dict[str, Any]]:
        if isinstance(key, tuple):
            index, aug_seed = key
        else:
            index, aug_seed = key, None
        n = len(self.records)
        for attempt in range(min(n, 16)):
            i = (index + attempt) % n
            rec = self.records[i]
            try:
                image = self._open(rec)
            except DatasetError as e:
                if self.on_bad_image == "raise":
                    raise
                if self.on_bad_image == "drop":
                    logger.error("leaving out undecodable image: %s", e)
                    return None, {
                        "image_id": rec["image_id"],
                        "file_name": rec["file_name"],
                        "dropped": True,
                    }
                if i not in self.bad_images:
                    self.bad_images.add(i)
                    logger.error("skipping undecodable image: %s", e)
                continue
            break
        else:
            raise DatasetError(
                f"{self.ann_file}: {min(n, 16)} consecutive images from index {index} could not "
                f"be decoded (first: {self.records[index % n]['file']})"
            )
        seed = aug_seed if aug_seed is not None else (self.seed, i)
        rng = np.random.default_rng(seed)
        w0, h0 = image.size
        tensor, boxes, meta = self.transform(image, rec["boxes"], rng)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(rec["labels"].copy()),
            "image_id": rec["image_id"],
            "file_name": rec["file_name"],
            "orig_shape": (h0, w0),
            **meta,
        }
        return tensor, target
