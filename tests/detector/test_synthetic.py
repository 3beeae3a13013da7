"""The embedded procedural dataset: determinism, COCO validity, and the cases it must contain."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from detector.data.synthetic import (
    CATEGORY_IDS,
    SyntheticConfig,
    dataset_paths,
    generate_dataset,
    generate_image,
    is_generated,
    main,
)

SMALL = SyntheticConfig(num_train=24, num_val=6, seed=3)


def _digest(root) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_dataset(root, SMALL)
    return root


def test_layout_and_coco_validity(generated):
    paths = dataset_paths(generated)
    for split, n in (("train", SMALL.num_train), ("val", SMALL.num_val)):
        data = json.loads(paths[f"{split}_ann"].read_text())
        assert len(data["images"]) == n
        assert {c["id"] for c in data["categories"]} == set(CATEGORY_IDS)
        ids = [a["id"] for a in data["annotations"]]
        assert len(ids) == len(set(ids))
        by_img = {im["id"]: im for im in data["images"]}
        for im in data["images"]:
            with Image.open(paths[f"{split}_images"] / im["file_name"]) as f:
                assert f.size == (im["width"], im["height"])
                assert f.mode == "RGB"
        for a in data["annotations"]:
            im = by_img[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= im["width"] and y + h <= im["height"]
            assert 0 < a["area"] <= w * h
            assert a["iscrowd"] == 0
    assert is_generated(generated, SMALL)


def test_contains_sizes_occlusion_and_blur():
    """Over a few dozen images, all COCO area ranges, occluded and blurred objects appear."""
    cfg = SyntheticConfig(seed=11)
    areas, blurred, occluded, cats = [], 0, 0, set()
    for i in range(40):
        img, objs = generate_image(cfg, "train", i)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        for o in objs:
            areas.append(o["area"])
            blurred += o["blurred"]
            occluded += o["occluded_fraction"] > 0.05
            cats.add(o["category"])
            assert o["occluded_fraction"] <= cfg.max_occluded_fraction + 1e-6
    areas = np.array(areas)
    assert (areas < 32**2).sum() >= 5
    assert ((areas >= 32**2) & (areas < 96**2)).sum() >= 5
    assert (areas >= 96**2).sum() >= 5
    assert blurred >= 5 and occluded >= 3
    assert cats == set(cfg.categories)


def test_deterministic_and_seeded(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cfg = SyntheticConfig(num_train=5, num_val=2, seed=7)
    generate_dataset(a, cfg)
    generate_dataset(b, cfg)
    generate_dataset(c, SyntheticConfig(num_train=5, num_val=2, seed=8))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    # image i does not depend on how many images are generated
    img_small, _ = generate_image(cfg, "train", 3)
    img_big, _ = generate_image(SyntheticConfig(num_train=50, seed=7), "train", 3)
    assert np.array_equal(img_small, img_big)


def test_regenerates_when_stale_or_interrupted(tmp_path):
    cfg = SyntheticConfig(num_train=3, num_val=1, seed=1)
    generate_dataset(tmp_path, cfg)
    assert is_generated(tmp_path, cfg)
    assert not is_generated(tmp_path, SyntheticConfig(num_train=4, num_val=1, seed=1))
    (tmp_path / "dataset_meta.json").unlink()  # as if killed before finishing
    assert not is_generated(tmp_path, cfg)
    generate_dataset(tmp_path, cfg)
    assert is_generated(tmp_path, cfg)


def test_bad_config():
    with pytest.raises(ValueError, match="size_mix"):
        SyntheticConfig(size_mix=(0.5, 0.5, 0.5)).validate()
    with pytest.raises(ValueError, match="categories"):
        SyntheticConfig(categories=("hexagon",)).validate()


def test_cli(tmp_path, capsys):
    main([str(tmp_path / "d"), "--num-train", "2", "--num-val", "1", "--seed", "5"])
    out = capsys.readouterr().out
    assert "train_ann" in out
    assert is_generated(tmp_path / "d", SyntheticConfig(num_train=2, num_val=1, seed=5))
