"""COCO-format loading, transforms, collate, samplers and bad-input handling (real files)."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from detector.data.coco import CocoDetection, DatasetError, load_coco_json
from detector.data.loader import (
    InferenceSampler,
    TrainSampler,
    build_eval_loader,
    build_train_loader,
    collate,
)
from detector.data.synthetic import SyntheticConfig, generate_dataset
from detector.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformConfig, rescale_size


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return generate_dataset(root, SyntheticConfig(num_train=10, num_val=4, seed=2))


def _write_dataset(tmp_path, images, annotations, categories, sizes=None):
    """A hand-made COCO dataset: ``images`` is a list of (id, file_name), all 64x48 PNGs."""
    img_dir = tmp_path / "imgs"
    img_dir.mkdir(exist_ok=True)
    ims = []
    for i, (iid, name) in enumerate(images):
        w, h = (sizes or {}).get(iid, (64, 48))
        arr = np.full((h, w, 3), 40 * (i + 1) % 255, dtype=np.uint8)
        Image.fromarray(arr).save(img_dir / name)
        ims.append({"id": iid, "file_name": name, "width": w, "height": h})
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps({"images": ims, "annotations": annotations, "categories": categories})
    )
    return ann, img_dir


CATS = [{"id": 5, "name": "cat"}, {"id": 17, "name": "dog"}, {"id": 90, "name": "bird"}]


def _ann(aid, iid, cid, bbox, **kw):
    return {"id": aid, "image_id": iid, "category_id": cid, "bbox": bbox, **kw}


# ----------------------------------------------------------------------------- transforms
def test_rescale_size_matches_mmdetection():
    assert rescale_size(640, 480, (1333, 800)) == (1067, 800, 800 / 480)
    w, h, f = rescale_size(2000, 500, (1333, 800))  # long edge binds
    assert (w, h) == (1333, 333) and math.isclose(f, 1333 / 2000)
    assert rescale_size(320, 240, (320, 320))[:2] == (320, 240)


def test_load_generated_dataset(shapes):
    ds = CocoDetection(
        shapes["train_ann"],
        shapes["train_images"],
        TransformConfig(img_scale=(320, 256), flip_prob=0.0),
    )
    assert len(ds) == 10 and ds.num_classes == 4
    assert ds.class_names == ["ellipse", "rectangle", "triangle", "cross"]
    raw = json.loads(shapes["train_ann"].read_text())
    for i in range(len(ds)):
        img, t = ds[i]
        assert img.dtype == torch.float32 and img.shape[0] == 3
        h, w = t["img_shape"]
        assert img.shape[1:] == (h, w)
        assert max(h, w) <= 320 and min(h, w) <= 256
        assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
        assert t["boxes"].shape == (len(t["labels"]), 4)
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
        assert ((t["labels"] >= 0) & (t["labels"] < 4)).all()
        # boxes are the JSON boxes times the scale factor
        gt = [a for a in raw["annotations"] if a["image_id"] == t["image_id"]]
        sx, sy = t["scale_factor"][:2]
        exp = torch.tensor(
            [
                [
                    a["bbox"][0] * sx,
                    a["bbox"][1] * sy,
                    (a["bbox"][0] + a["bbox"][2]) * sx,
                    (a["bbox"][1] + a["bbox"][3]) * sy,
                ]
                for a in gt
            ]
        )
        torch.testing.assert_close(t["boxes"], exp, rtol=1e-5, atol=1e-3)


def test_normalisation_and_flip(tmp_path):
    """A bright patch on the left moves right under a flip, and the box follows it."""
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[10:20, 5:25] = 255
    (tmp_path / "imgs").mkdir()
    Image.fromarray(arr).save(tmp_path / "imgs" / "a.png")
    ann = tmp_path / "a.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "width": 80, "height": 40}],
                "annotations": [_ann(1, 1, 5, [5, 10, 20, 10])],
                "categories": CATS[:1],
            }
        )
    )
    ds = CocoDetection(ann, tmp_path / "imgs", TransformConfig(img_scale=(80, 40), flip_prob=1.0))
    img, t = ds[0]
    assert t["flip"] is True
    torch.testing.assert_close(t["boxes"], torch.tensor([[55.0, 10.0, 75.0, 20.0]]))
    x1, y1, x2, y2 = (int(v) for v in t["boxes"][0])
    white = (255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    black = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(img[:, y1:y2, x1:x2].mean((1, 2)), white)
    torch.testing.assert_close(img[:, 0, 0], black)
    ds_noflip = CocoDetection(ann, tmp_path / "imgs", TransformConfig(img_scale=(80, 40)))
    assert ds_noflip[0][1]["flip"] is False


def test_flip_is_a_function_of_the_seed(shapes):
    ds = CocoDetection(
        shapes["train_ann"],
        shapes["train_images"],
        TransformConfig(img_scale=(160, 160), flip_prob=0.5),
    )
    flips = [ds[(0, s)][1]["flip"] for s in range(40)]
    assert 5 < sum(flips) < 35
    assert [ds[(0, s)][1]["flip"] for s in range(40)] == flips
    assert torch.equal(ds[(3, 9)][0], ds[(3, 9)][0])


# ----------------------------------------------------------------------------- collate & loaders
def test_collate_pads_to_multiple_of_32():
    a = (torch.ones(3, 50, 70), {"boxes": torch.zeros(0, 4)})
    b = (torch.ones(3, 65, 33), {"boxes": torch.zeros(0, 4)})
    images, targets = collate([a, b])
    assert images.shape == (2, 3, 96, 96)
    assert targets[0]["pad_shape"] == (96, 96)
    assert images[0, :, :50, :70].eq(1).all() and images[0, :, 50:].eq(0).all()
    assert images[1, :, :65, :33].eq(1).all() and images[1, :, :, 33:].eq(0).all()


def test_train_sampler_resume_and_distributed_split():
    n, b = 11, 2
    s = TrainSampler(n, b, seed=4, rank=0, world_size=1)
    s.set_epoch(3)
    full = list(s)
    assert len(full) == s.iters_per_epoch * b == 12  # padded to a full last batch
    assert {i for i, _ in full} == set(range(n))
    s.set_epoch(3, start_iter=2)
    assert list(s) == full[4:] and len(s) == len(full) - 4
    s.set_epoch(4)
    assert list(s) != full  # a new permutation each epoch
    # two ranks with batch 1 see exactly the global batches of one rank with batch 2
    r0 = TrainSampler(n, 1, seed=4, rank=0, world_size=2)
    r1 = TrainSampler(n, 1, seed=4, rank=1, world_size=2)
    for r in (r0, r1):
        r.set_epoch(3)
    merged = [x for pair in zip(r0, r1) for x in pair]
    assert merged == full
    assert r0.iters_per_epoch == s.iters_per_epoch


def test_train_sampler_groups_by_aspect():
    groups = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1]
    s = TrainSampler(11, 2, seed=1, rank=0, world_size=1, groups=groups)
    assert s.iters_per_epoch == 2 + 4  # group 0: 3 -> 4 samples, group 1: 8
    s.set_epoch(2)
    order = [i for i, _ in s]
    assert set(order) == set(range(11))
    for k in range(0, len(order), 2):
        assert len({groups[i] for i in order[k : k + 2]}) == 1
    r = [TrainSampler(11, 1, seed=1, rank=q, world_size=2, groups=groups) for q in (0, 1)]
    for x in r:
        x.set_epoch(2)
    assert [x for pair in zip(*r) for x in pair] == list(s)


def test_inference_sampler_covers_each_index_once():
    got = sorted(i for r in range(3) for i in InferenceSampler(10, rank=r, world_size=3))
    assert got == list(range(10))


def test_loader_independent_of_workers(shapes):
    ds = CocoDetection(
        shapes["train_ann"],
        shapes["train_images"],
        TransformConfig(img_scale=(128, 128), flip_prob=0.5),
    )
    outs = []
    for workers in (0, 2):
        loader, sampler = build_train_loader(ds, batch_size=3, num_workers=workers, seed=1)
        sampler.set_epoch(1)
        outs.append(list(loader))
    assert len(outs[0]) == len(outs[1]) == 4
    for (ia, ta), (ib, tb) in zip(*outs):
        assert ia.shape[-1] % 32 == 0 and ia.shape[-2] % 32 == 0
        assert torch.equal(ia, ib)
        assert [t["image_id"] for t in ta] == [t["image_id"] for t in tb]
        assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(ta, tb))


def test_eval_loader_in_order(shapes):
    ds = CocoDetection(
        shapes["val_ann"],
        shapes["val_images"],
        TransformConfig(img_scale=(128, 128)),
        filter_empty=False,
    )
    loader = build_eval_loader(ds, batch_size=3, num_workers=0)
    ids = [t["image_id"] for _, ts in loader for t in ts]
    assert ids == ds.image_ids


# ----------------------------------------------------------------------------- bad input
def test_category_mapping_and_crowd(tmp_path):
    ann, img_dir = _write_dataset(
        tmp_path,
        [(1, "a.png"), (2, "b.png")],
        [
            _ann(1, 1, 90, [1, 1, 10, 10]),
            _ann(2, 1, 5, [5, 5, 20, 20]),
            _ann(3, 2, 17, [0, 0, 30, 30], iscrowd=1),
            _ann(4, 2, 17, [2, 2, 8, 9]),
        ],
        CATS,
    )
    ds = CocoDetection(ann, img_dir, TransformConfig(img_scale=(64, 48)))
    assert ds.cat_ids == [5, 17, 90] and ds.class_names == ["cat", "dog", "bird"]
    _, t0 = ds[0]
    assert t0["labels"].tolist() == [2, 0]
    _, t1 = ds[1]
    assert t1["labels"].tolist() == [1]  # the crowd box is not a training target
    torch.testing.assert_close(t1["boxes"], torch.tensor([[2.0, 2.0, 10.0, 11.0]]))


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object at top level"),
        (json.dumps({"images": [], "annotations": []}), "missing top-level key 'categories'"),
        (json.dumps({"images": {}, "annotations": [], "categories": CATS}), "must be a list"),
        (
            json.dumps({"images": [{"id": 1}], "annotations": [], "categories": CATS}),
            r"images\[0\] has no 'file_name'",
        ),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.png"}],
                    "annotations": [_ann(7, 1, 5, [0, 0, "x", 3])],
                    "categories": CATS,
                }
            ),
            "annotation 7 has a malformed bbox",
        ),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.png"}],
                    "annotations": [_ann(7, 1, 6, [0, 0, 3, 3])],
                    "categories": CATS,
                }
            ),
            "category ids not listed in 'categories': category_id 6 \\(annotations 7\\)",
        ),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.png"}],
                    "annotations": [_ann(7, 2, 5, [0, 0, 3, 3])],
                    "categories": CATS,
                }
            ),
            "refer to image ids not in 'images'",
        ),
        (json.dumps({"images": [], "annotations": [], "categories": []}), "'categories' is empty"),
    ],
)
def test_malformed_annotation_files(tmp_path, content, match):
    ann = tmp_path / "bad.json"
    ann.write_text(content)
    with pytest.raises(DatasetError, match=match) as e:
        load_coco_json(ann)
    assert str(ann) in str(e.value)


def test_missing_annotation_file_and_image_dir(tmp_path):
    with pytest.raises(DatasetError, match="annotation file not found") as e:
        load_coco_json(tmp_path / "nope.json")
    assert "nope.json" in str(e.value)
    ann, _ = _write_dataset(tmp_path, [(1, "a.png")], [_ann(1, 1, 5, [0, 0, 5, 5])], CATS)
    with pytest.raises(DatasetError, match="image folder not found"):
        CocoDetection(ann, tmp_path / "missing_dir")


def test_degenerate_boxes_skipped_with_log(tmp_path, caplog):
    ann, img_dir = _write_dataset(
        tmp_path,
        [(1, "a.png")],
        [
            _ann(1, 1, 5, [3, 3, 0, 10]),
            _ann(2, 1, 5, [3, 3, 10, -2]),
            _ann(3, 1, 5, [70, 3, 5, 5]),  # entirely right of the 64-px image
            _ann(4, 1, 5, [60, 40, 10, 10]),
        ],  # overshoots: clipped to the image
        CATS,
    )
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(ann, img_dir, TransformConfig(img_scale=(64, 48)))
    assert "skipped 3 boxes with zero or negative size" in caplog.text
    assert "1, 2, 3" in caplog.text and str(ann) in caplog.text
    torch.testing.assert_close(ds[0][1]["boxes"], torch.tensor([[60.0, 40.0, 64.0, 48.0]]))


def test_missing_images_skipped_and_empty_dataset(tmp_path, caplog):
    ann, img_dir = _write_dataset(
        tmp_path,
        [(1, "a.png"), (2, "b.png")],
        [_ann(1, 1, 5, [0, 0, 5, 5]), _ann(2, 2, 5, [0, 0, 5, 5])],
        CATS,
    )
    (img_dir / "b.png").unlink()
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(ann, img_dir)
    assert len(ds) == 1 and "skipped 1 images missing" in caplog.text and "b.png" in caplog.text
    (img_dir / "a.png").unlink()
    with pytest.raises(DatasetError, match="dataset is empty") as e:
        CocoDetection(ann, img_dir)
    assert str(ann) in str(e.value)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": CATS}))
    with pytest.raises(DatasetError, match="dataset is empty"):
        CocoDetection(empty, img_dir)


def test_images_without_boxes_filtered_only_for_training(tmp_path):
    ann, img_dir = _write_dataset(
        tmp_path, [(1, "a.png"), (2, "b.png")], [_ann(1, 1, 5, [0, 0, 5, 5])], CATS
    )
    assert len(CocoDetection(ann, img_dir, filter_empty=True)) == 1
    ds = CocoDetection(ann, img_dir, filter_empty=False)
    assert len(ds) == 2 and ds[1][1]["boxes"].shape == (0, 4)


def test_undecodable_image_raise_or_skip(tmp_path, caplog):
    ann, img_dir = _write_dataset(
        tmp_path,
        [(1, "a.png"), (2, "b.png")],
        [_ann(1, 1, 5, [0, 0, 5, 5]), _ann(2, 2, 17, [1, 1, 5, 5])],
        CATS,
    )
    (img_dir / "a.png").write_bytes(b"this is not a png")
    ds = CocoDetection(ann, img_dir, on_bad_image="raise")
    with pytest.raises(DatasetError, match="cannot decode image") as e:
        ds[0]
    assert "a.png" in str(e.value)
    ds = CocoDetection(ann, img_dir, on_bad_image="skip")
    with caplog.at_level(logging.ERROR):
        _, t = ds[0]
    assert t["image_id"] == 2 and "a.png" in caplog.text
    # ... also inside a DataLoader with worker processes: the training loop never sees it
    loader, sampler = build_train_loader(ds, batch_size=2, num_workers=1)
    sampler.set_epoch(0)
    ((images, targets),) = list(loader)
    assert [t["image_id"] for t in targets] == [2, 2]
