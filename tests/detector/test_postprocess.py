"""Inference post-processing: threshold, per-level top-k, decoding, rescale, class-wise NMS."""

from __future__ import annotations

import pytest
import torch

from detector.models import build_detector
from detector.models.anchors import AnchorGenerator
from detector.models.coder import BoxCoder
from detector.models.postprocess import PostProcessConfig, postprocess

STRIDES = (8, 16, 32, 64, 128)
C = 3
REG_MAX = 16


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


class Scene:
    """Hand-made dense outputs on a 64x64 input (P3 is 8x8): every anchor starts as background
    (score ~0) with a 2-stride box; ``put`` plants one detection."""

    def __init__(self, batch: int = 1, h: int = 64, w: int = 64):
        self.anchors = AnchorGenerator(STRIDES)([(-(-h // s), -(-w // s)) for s in STRIDES])
        a = self.anchors.boxes.size(0)
        self.cls = torch.full((batch, a, C), -20.0)
        self.reg = torch.zeros(batch, a, 4, REG_MAX + 1)
        self.reg[..., 2] = 30.0  # distance 2 strides on every side
        self.hw = (h, w)

    def put(self, img: int, x: int, y: int, label: int, score: float, dist=(2, 2, 2, 2)) -> int:
        """A P3 detection at location (x, y): box = centre -/+ dist * 8 px. Returns its index."""
        idx = y * 8 + x
        self.cls[img, idx, label] = logit(score)
        self.reg[img, idx] = 0.0
        for side, d in enumerate(dist):
            self.reg[img, idx, side, d] = 30.0  # a sharp peak: the integral is d
        return idx

    def run(self, batch_hw=None, centerness=None, **kw):
        cfg = PostProcessConfig(
            **{
                k: kw.pop(k)
                for k in list(kw)
                if k in ("score_thr", "nms_pre", "nms_iou", "max_per_img", "min_bbox_size")
            }
        )
        sizes = batch_hw or [self.hw] * self.cls.size(0)
        return postprocess(
            self.cls,
            self.reg.flatten(2),
            centerness,
            self.anchors,
            BoxCoder(True, REG_MAX, "reference"),
            cfg,
            sizes,
            **kw,
        )


def test_decoding_and_threshold():
    s = Scene()
    s.put(0, 3, 4, label=1, score=0.9, dist=(1, 2, 3, 1))
    s.put(0, 6, 1, label=2, score=0.04)  # below score_thr 0.05
    (det,) = s.run()
    assert det["labels"].tolist() == [1]
    assert det["scores"].tolist() == pytest.approx([0.9])
    # centre (24, 32); left 1, top 2, right 3, bottom 1 strides of 8 px
    assert det["boxes"][0].tolist() == pytest.approx([16, 16, 48, 40], abs=1e-3)
    assert det["labels"].dtype == torch.int64 and det["boxes"].dtype == torch.float32


def test_classwise_nms_iou_0_6():
    s = Scene()
    s.put(0, 3, 3, label=0, score=0.9, dist=(2, 2, 3, 2))  # box [8, 8, 48, 40]
    s.put(0, 4, 3, label=0, score=0.8)  # [16, 8, 48, 40]: IoU 0.8, suppressed
    s.put(0, 4, 3, label=1, score=0.7)  # same box, other class: kept
    s.put(0, 3, 5, label=0, score=0.6)  # [8, 24, 40, 56]: IoU 0.29, kept
    (det,) = s.run()
    assert det["labels"].tolist() == [0, 1, 0]
    assert det["scores"].tolist() == pytest.approx([0.9, 0.7, 0.6])


def test_max_per_img_sorted_and_images_kept_apart():
    s = Scene(batch=2)
    for y in range(8):
        for x in range(8):
            s.put(0, x, y, label=(x + y) % C, score=0.1 + 0.01 * (y * 8 + x), dist=(0, 0, 1, 1))
    s.put(1, 3, 3, label=0, score=0.9)
    s.put(0, 3, 3, label=0, score=0.95)  # the same box in image 0 must not suppress 1
    dets = s.run(max_per_img=10, nms_iou=0.99)
    assert len(dets[0]["scores"]) == 10
    assert torch.all(dets[0]["scores"][:-1] >= dets[0]["scores"][1:])
    assert dets[0]["scores"][0].item() == pytest.approx(0.95)
    assert dets[1]["scores"].tolist() == pytest.approx([0.9])


def test_nms_pre_is_per_level():
    s = Scene()
    for x in range(5):
        s.put(0, x, 0, label=0, score=0.5 + 0.05 * x, dist=(0, 0, 1, 1))  # disjoint boxes
    (det,) = s.run(nms_pre=2)
    assert det["scores"].tolist() == pytest.approx([0.7, 0.65])


def test_rescale_to_original_and_clip():
    s = Scene()
    s.put(0, 7, 7, label=2, score=0.9, dist=(1, 1, 3, 3))  # centre (56, 56) -> [48,48,80,80]
    (det,) = s.run()
    assert det["boxes"][0].tolist() == pytest.approx([48, 48, 64, 64])  # clipped to 64x64
    (det,) = s.run(batch_hw=[(60, 62)], scale_factors=[2.0])
    assert det["boxes"][0].tolist() == pytest.approx([24, 24, 31, 30])
    (det,) = s.run(batch_hw=[(60, 62)], original_sizes=[(120, 31)])  # sx = 2, sy = 0.5
    assert det["boxes"][0].tolist() == pytest.approx([24, 96, 31, 120])


def test_distributions_and_min_size():
    s = Scene()
    s.put(0, 2, 2, label=0, score=0.9, dist=(1, 2, 3, 4))
    s.put(0, 5, 5, label=1, score=0.8, dist=(0, 0, 0, 3))  # zero width: dropped
    (det,) = s.run(with_distributions=True)
    assert det["labels"].tolist() == [0]
    dist = det["distributions"]
    assert dist.shape == (1, 4, REG_MAX + 1)
    assert torch.allclose(dist.sum(-1), torch.ones(1, 4))
    assert dist.argmax(-1).tolist() == [[1, 2, 3, 4]]


def test_centerness_multiplies_the_score():
    s = Scene()
    idx = s.put(0, 3, 3, label=0, score=0.8)
    ctr = torch.full((1, s.anchors.boxes.size(0)), -20.0)
    ctr[0, idx] = 0.0  # sigmoid 0.5
    (det,) = s.run(centerness=ctr)
    assert det["scores"].tolist() == pytest.approx([0.4])


@pytest.mark.parametrize("variant", ["gfl", "atss"])
def test_predict_end_to_end(variant):
    torch.manual_seed(0)
    model = build_detector(
        depth=18,
        num_classes=C,
        variant=variant,
        fpn_channels=32,
        feat_channels=32,
        gn_groups=8,
        score_thr=0.0,
    ).eval()
    dets = model.predict(
        torch.randn(2, 3, 64, 96),
        image_sizes=[(64, 96), (50, 70)],
        original_sizes=[(128, 192), (25, 35)],
        with_distributions=variant == "gfl",
    )
    assert len(dets) == 2
    for det, (oh, ow) in zip(dets, [(128, 192), (25, 35)]):
        k = det["scores"].numel()
        assert 0 < k <= 100
        assert det["boxes"].shape == (k, 4) and det["labels"].shape == (k,)
        assert float(det["boxes"][:, 2].max()) <= ow and float(det["boxes"][:, 3].max()) <= oh
        assert float(det["boxes"].min()) >= 0
        assert ("distributions" in det) == (variant == "gfl")
    if variant == "atss":
        with pytest.raises(ValueError, match="General"):
            model.predict(torch.randn(1, 3, 64, 64), with_distributions=True)


def test_integral_lowers_to_softmax_matmul_for_onnx_export(monkeypatch):
    """The fused op has no ONNX symbolic (mmdetection#6244): under export, decode uses the
    reference Softmax + MatMul and gives the same distances."""
    import gfl_ops

    coder = BoxCoder(True, REG_MAX, None)
    reg = torch.randn(6, 4 * (REG_MAX + 1))
    fused = coder.distances(reg)

    def refuse(*args, **kwargs):
        raise AssertionError("the fused integral must not be traced into an ONNX graph")

    monkeypatch.setattr(gfl_ops, "integral", refuse)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert torch.allclose(coder.distances(reg), fused, atol=1e-5)
