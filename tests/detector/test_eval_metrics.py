"""COCOeval metrics and the score–IoU Pearson correlation on real pycocotools objects."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from detector.data.coco import load_coco_json
from detector.data.synthetic import SyntheticConfig, generate_dataset
from detector.metrics import (
    METRIC_KEYS,
    detections_to_coco,
    evaluate_detections,
    format_metrics_table,
    pearson,
    score_iou_pairs,
    write_metrics,
)


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    paths = generate_dataset(root, SyntheticConfig(num_train=1, num_val=12, seed=9))
    return load_coco_json(paths["val_ann"])


def _gt_as_detections(coco, score_fn=lambda a: 1.0):
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": list(a["bbox"]),
            "score": score_fn(a),
        }
        for a in coco.dataset["annotations"]
        if not a.get("iscrowd", 0)
    ]


def test_ground_truth_scores_ap_one(gt):
    m = evaluate_detections(gt, _gt_as_detections(gt, lambda a: 0.5 + a["id"] % 7 / 20))
    areas = np.array([a["area"] for a in gt.dataset["annotations"]])
    for k in ("AP", "AP50", "AP75"):
        assert m[k] == pytest.approx(1.0)
    for k, present in (
        ("APs", (areas < 32**2).any()),
        ("APm", ((areas >= 32**2) & (areas < 96**2)).any()),
        ("APl", (areas >= 96**2).any()),
    ):
        assert m[k] == pytest.approx(1.0 if present else -1.0)
    assert m["num_images"] == 12 and m["num_detections"] == len(gt.dataset["annotations"])
    # every IoU is 1: the correlation is undefined, reported as NaN (null in metrics.json)
    assert math.isnan(m["score_iou_pearson"])


def test_pearson_of_shrunk_boxes(gt):
    """Shrinking each GT box by a known factor gives IoU = factor²; scores = IoU gives r = 1."""
    rng = np.random.default_rng(0)
    dets, ious = [], []
    for a in gt.dataset["annotations"]:
        f = float(rng.uniform(0.3, 1.0))
        x, y, w, h = a["bbox"]
        dets.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": [x, y, w * f, h * f],
                "score": f * f,
            }
        )
        ious.append(f * f)
    # add a detection of a class absent from its image: IoU 0
    img = gt.dataset["images"][0]["id"]
    present = {a["category_id"] for a in gt.dataset["annotations"] if a["image_id"] == img}
    absent = next(c for c in gt.getCatIds() if c not in present)
    dets.append({"image_id": img, "category_id": absent, "bbox": [0, 0, 10, 10], "score": 0.0})
    ious.append(0.0)
    s, i = score_iou_pairs(gt, dets)
    np.testing.assert_allclose(i, ious, atol=1e-9)
    m = evaluate_detections(gt, dets)
    assert m["score_iou_pearson"] == pytest.approx(1.0)
    assert 0 < m["AP"] < 1 and m["AP50"] > m["AP75"]


def test_pearson_basics():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1.0], [2.0]))
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_no_detections(gt):
    m = evaluate_detections(gt, [])
    assert all(m[k] == 0.0 for k in METRIC_KEYS) and math.isnan(m["score_iou_pearson"])


def test_stray_image_ids_rejected(gt):
    with pytest.raises(ValueError, match="not being evaluated"):
        evaluate_detections(
            gt, [{"image_id": 99999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]
        )


def test_subset_of_images(gt):
    ids = gt.getImgIds()[:3]
    dets = [d for d in _gt_as_detections(gt) if d["image_id"] in ids]
    m = evaluate_detections(gt, dets, image_ids=ids)
    assert m["AP"] == pytest.approx(1.0) and m["num_images"] == 3


def test_detections_to_coco_and_outputs(tmp_path):
    import torch

    res = detections_to_coco(
        5,
        torch.tensor([[10.0, 20.0, 30.0, 60.0]]),
        torch.tensor([0.9]),
        torch.tensor([2]),
        [1, 2, 4, 7],
    )
    assert res == [
        {
            "image_id": 5,
            "category_id": 4,
            "bbox": [10.0, 20.0, 20.0, 40.0],
            "score": pytest.approx(0.9),
        }
    ]
    metrics = {k: 0.5 for k in METRIC_KEYS} | {"score_iou_pearson": float("nan")}
    write_metrics(metrics, tmp_path / "m" / "metrics.json")
    loaded = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert set(METRIC_KEYS) | {"score_iou_pearson"} <= set(loaded)
    assert loaded["score_iou_pearson"] is None
    table = format_metrics_table(metrics | {"num_images": 3}, title="val")
    assert "AP50" in table and "0.500" in table and "n/a" in table and "3 images" in table
