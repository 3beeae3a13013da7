"""ATSS assigner: vectorised implementation against a plain loop over ground truths and anchors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.models.anchors import AnchorGenerator
from detector.models.assigners import atss_assign, atss_assign_batched

STRIDES = (8, 16, 32, 64, 128)


def make_anchors(h: int, w: int, dtype=torch.float64):
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    return AnchorGenerator(STRIDES, 8.0)(sizes, "cpu", dtype)


def loop_atss(
    anchors: list[list[float]], num_level_anchors: list[int], gts: list[list[float]], topk: int
) -> list[int]:
    """ATSS written the obvious way, in Python floats: one GT, one level, one anchor at a time.

    Ties: equal centre distances go to the lower anchor index, equal IoUs to the lower GT index.
    """

    def centre(b):
        return (b[0] + b[2]) * 0.5, (b[1] + b[3]) * 0.5

    def iou(a, b):
        area_a = (a[2] - a[0]) * (a[3] - a[1])
        area_b = (b[2] - b[0]) * (b[3] - b[1])
        iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
        ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
        inter = iw * ih
        return inter / max(area_a + area_b - inter, 1e-6)

    assigned = [-1] * len(anchors)
    best = [-math.inf] * len(anchors)
    for g, gt in enumerate(gts):
        gx, gy = centre(gt)
        candidates = []
        start = 0
        for n in num_level_anchors:
            dist = []
            for i in range(start, start + n):
                ax, ay = centre(anchors[i])
                dist.append(((ax - gx) ** 2 + (ay - gy) ** 2, i))
            dist.sort()
            candidates += [i for _, i in dist[:topk]]
            start += n
        ious = [iou(anchors[i], gt) for i in candidates]
        if len(ious) < 2:
            continue  # the unbiased std of one value is undefined: no positive
        mean = sum(ious) / len(ious)
        std = math.sqrt(sum((v - mean) ** 2 for v in ious) / (len(ious) - 1))
        for i, v in zip(candidates, ious):
            ax, ay = centre(anchors[i])
            inside = min(ax - gt[0], ay - gt[1], gt[2] - ax, gt[3] - ay) > 0.01
            if v >= mean + std and inside and v > best[i]:
                best[i], assigned[i] = v, g
    return assigned


def random_gts(h: int, w: int, n: int, seed: int, snap: bool) -> list[list[float]]:
    """n boxes with centres in (and a little around) the image and log-uniform sides from 1 px
    to 1.5x the image; ``snap`` puts corners on a 4-px lattice, which makes centre distances to
    the regular anchor grid tie."""
    g = torch.Generator().manual_seed(seed)
    ctr = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w + 16.0, h + 16.0])
    ctr -= 8.0
    side = torch.exp(
        torch.rand(n, 2, generator=g, dtype=torch.float64) * math.log(1.5 * max(h, w, 2))
    )
    boxes = torch.cat([ctr - side / 2, ctr + side / 2], dim=1)
    if snap:
        boxes = (boxes / 4).round() * 4
    return boxes.tolist()


sizes = st.integers(1, 256)


@settings(max_examples=150, deadline=None)
@given(
    h=sizes,
    w=sizes,
    n=st.integers(0, 8),
    seed=st.integers(0, 2**31 - 1),
    snap=st.booleans(),
    topk=st.sampled_from([1, 3, 9]),
)
def test_matches_loop(h, w, n, seed, snap, topk):
    anchors = make_anchors(h, w)
    gts = random_gts(h, w, n, seed, snap)
    gt = torch.tensor(gts, dtype=torch.float64).reshape(-1, 4)
    got = atss_assign(anchors.boxes, anchors.num_level_anchors, gt, topk=topk)
    want = loop_atss(anchors.boxes.tolist(), anchors.num_level_anchors, gts, topk)
    assert got.dtype == torch.long and got.shape == (anchors.boxes.size(0),)
    assert got.tolist() == want


@settings(max_examples=50, deadline=None)
@given(
    h=st.integers(8, 200),
    w=st.integers(8, 200),
    counts=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    snap=st.booleans(),
    valid_hw=st.lists(st.tuples(st.integers(1, 200), st.integers(1, 200)), min_size=3, max_size=3),
)
def test_batched_with_padding_and_invalid_anchors(h, w, counts, seed, snap, valid_hw):
    """Each image of a batch equals the loop run on that image's valid anchors only."""
    anchors = make_anchors(h, w)
    gts = [random_gts(h, w, n, seed + i, snap) for i, n in enumerate(counts)]
    gen = AnchorGenerator(STRIDES, 8.0)
    batch = len(gts)
    sizes = torch.tensor(valid_hw[:batch])
    valid = gen.valid_flags(anchors, sizes)
    g = max(max(len(x) for x in gts), 1)
    boxes = torch.zeros(batch, g, 4, dtype=torch.float64)
    gt_valid = torch.zeros(batch, g, dtype=torch.bool)
    for i, x in enumerate(gts):
        if x:
            boxes[i, : len(x)] = torch.tensor(x, dtype=torch.float64)
            gt_valid[i, : len(x)] = True
        boxes[i, len(x) :] = torch.tensor([0.0, 0.0, 300.0, 300.0])  # padding must be ignored
    got = atss_assign_batched(
        anchors.boxes, anchors.num_level_anchors, boxes, gt_valid, topk=9, anchor_valid=valid
    )
    for i in range(batch):
        keep = valid[i].nonzero().flatten()
        per_level = [int(v.sum()) for v in valid[i].split(anchors.num_level_anchors)]
        sub = loop_atss(anchors.boxes[keep].tolist(), per_level, gts[i], 9)
        want = torch.full((anchors.boxes.size(0),), -1, dtype=torch.long)
        want[keep] = torch.tensor(sub, dtype=torch.long)
        assert got[i].tolist() == want.tolist()


def test_zero_gt():
    anchors = make_anchors(64, 96, torch.float32)
    out = atss_assign(anchors.boxes, anchors.num_level_anchors, torch.zeros(0, 4))
    assert out.shape == (anchors.boxes.size(0),) and bool((out == -1).all())
    out = atss_assign_batched(anchors.boxes, anchors.num_level_anchors, torch.zeros(3, 0, 4))
    assert out.shape == (3, anchors.boxes.size(0)) and bool((out == -1).all())


def test_tiny_image_fewer_anchors_than_topk():
    """A 4x4 image has one anchor per level: 5 candidates, no out-of-range top-k."""
    anchors = make_anchors(4, 4, torch.float32)
    assert anchors.num_level_anchors == [1, 1, 1, 1, 1]
    gt = torch.tensor([[-10.0, -10.0, 10.0, 10.0]])  # contains the anchor centre (0, 0)
    out = atss_assign(anchors.boxes, anchors.num_level_anchors, gt, topk=9)
    want = loop_atss(anchors.boxes.tolist(), anchors.num_level_anchors, gt.tolist(), 9)
    assert out.tolist() == want
    assert (out == 0).any()


def test_gt_equal_to_an_anchor_is_positive_there():
    anchors = make_anchors(128, 128, torch.float32)
    # the P3 anchor at location (x=6, y=5): centre (48, 40), side 64
    idx = 5 * 16 + 6
    gt = anchors.boxes[idx : idx + 1].clone()
    out = atss_assign(anchors.boxes, anchors.num_level_anchors, gt)
    assert out[idx] == 0


def test_highest_iou_wins_and_ties_go_to_lower_index():
    anchors = make_anchors(128, 128, torch.float32)
    idx = 5 * 16 + 6
    a = anchors.boxes[idx]
    small = torch.tensor([a[0] + 8, a[1] + 8, a[2] - 8, a[3] - 8])
    gts = torch.stack([small, a.clone(), a.clone()])  # GT 1 and 2 identical, both beat GT 0
    out = atss_assign(anchors.boxes, anchors.num_level_anchors, gts)
    assert out[idx] == 1
    assert out.tolist() == loop_atss(
        anchors.boxes.tolist(), anchors.num_level_anchors, gts.tolist(), 9
    )


def test_bad_shapes():
    anchors = make_anchors(32, 32, torch.float32)
    with pytest.raises(ValueError, match="gt_boxes"):
        atss_assign(anchors.boxes, anchors.num_level_anchors, torch.zeros(4))
    with pytest.raises(ValueError, match="sum"):
        atss_assign(anchors.boxes, [1, 2], torch.zeros(1, 4))
