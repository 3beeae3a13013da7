"""Helpers shared by the mmdet adapter's tests (test_mmdet.py, test_mmdet_detectors.py): loss and
prediction comparison, data samples as mmdet's data pipeline makes them, relative errors.

Import it after ``mmcv_ext_stub.install()``: it imports mmdet's structures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (b's norm floored at 1e-12: a zero ``b`` compares absolutely)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def total(losses: dict) -> torch.Tensor:
    """The training loss of a head's / detector's loss dict (values: tensors or per-level
    lists of tensors)."""
    return sum(sum(v) if isinstance(v, (list, tuple)) else v for v in losses.values())


def assert_losses_equal(got: dict, want: dict, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """Same keys, and each level's loss equal within (rtol, atol)."""
    assert got.keys() == want.keys()
    for key in want:
        for level, (g, w) in enumerate(zip(got[key], want[key])):
            torch.testing.assert_close(
                g, w, rtol=rtol, atol=atol, msg=lambda m, k=key, i=level: f"{k}[{i}]: {m}"
            )


def assert_predictions_equal(
    got_model: torch.nn.Module,
    want_model: torch.nn.Module,
    inputs: torch.Tensor,
    samples: list[DetDataSample],
    **tol: float,
) -> None:
    """Both detectors' ``predict`` (eval mode, unrescaled): the same non-empty detections,
    labels, scores and boxes equal within ``tol`` (``torch.testing.assert_close``'s)."""
    got_model.eval()
    want_model.eval()
    with torch.no_grad():
        want = want_model.predict(inputs, samples, rescale=False)
        got = got_model.predict(inputs, samples, rescale=False)
    for g, w in zip(got, want):
        assert len(w.pred_instances) > 0
        for key in ("labels", "scores", "bboxes"):
            torch.testing.assert_close(g.pred_instances[key], w.pred_instances[key], **tol)


def data_samples(gts: Sequence[InstanceData], size: int) -> list[DetDataSample]:
    """A ``DetDataSample`` per image of ``size`` x ``size`` pixels (no rescaling, no padding),
    holding its ground truth ``gts[i]`` (boxes clamped into the image)."""
    samples = []
    for gt in gts:
        sample = DetDataSample()
        sample.gt_instances = InstanceData(bboxes=gt.bboxes.clamp(0, size - 1), labels=gt.labels)
        sample.set_metainfo(
            dict(
                img_shape=(size, size),
                ori_shape=(size, size),
                pad_shape=(size, size),
                batch_input_shape=(size, size),
                scale_factor=(1.0, 1.0),
            )
        )
        samples.append(sample)
    return samples
