"""Helpers shared by the mmdet adapter's tests (test_mmdet.py, test_mmdet_detectors.py): loss and
prediction comparison, data samples as mmdet's data pipeline makes them, relative errors, and
for runs of mmengine's Runner a tiny COCO-format dataset and the process settings to keep.

Import it after ``mmcv_ext_stub.install()``: it imports mmdet's structures.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (b's norm floored at 1e-12: a zero ``b`` compares absolutely)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def flat(model: torch.nn.Module, attr: str) -> torch.Tensor:
    """All of ``model``'s parameters' ``attr`` (``"data"`` or ``"grad"``; parameters without a
    gradient left out) as one vector."""
    tensors = (getattr(p, attr) for p in model.parameters())
    return torch.cat([t.detach().flatten() for t in tensors if t is not None])


def autocast_steps(
    stock: torch.nn.Module, fused: torch.nn.Module, inputs: torch.Tensor, samples: list
) -> tuple[dict, float, float]:
    """One loss + backward of each detector under bf16 autocast (what AMP runs on a CPU), and of
    a float32 copy of ``stock``; the gradients must be finite.

    Returns (the autocast losses by "stock" / "fused", the fused gradients' relative L2 distance
    from stock's, the stock autocast gradients' distance from the float32 ones)."""
    float32_step = copy.deepcopy(stock)
    total(float32_step.loss(inputs, samples)).backward()
    losses = {}
    for name, model in (("stock", stock), ("fused", fused)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[name] = model.loss(inputs, samples)
        total(losses[name]).backward()
        assert torch.isfinite(flat(model, "grad")).all(), name
    fused_vs_stock = rel_l2(flat(fused, "grad"), flat(stock, "grad"))
    return losses, fused_vs_stock, rel_l2(flat(stock, "grad"), flat(float32_step, "grad"))


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


COCO_SUBSET = ("person", "bicycle", "car")


def write_coco(root, n_images: int = 4, size: int = 96) -> None:
    """A tiny COCO-format dataset: ``images/`` and ``train.json`` / ``val.json`` (the same
    images), 2-4 boxes of three COCO classes per image."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(n_images):
        pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(2, 5))):
            w, h = (int(v) for v in rng.integers(16, 48, 2))
            x, y = (int(v) for v in rng.integers(0, size - 48, 2))
            pixels[y : y + h, x : x + w] = rng.integers(120, 255, 3, dtype=np.uint8)
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=i + 1,
                    category_id=int(rng.integers(1, 4)),
                    bbox=[x, y, w, h],
                    area=w * h,
                    iscrowd=0,
                )
            )
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        images.append(dict(id=i + 1, file_name=f"{i}.png", width=size, height=size))
    categories = [dict(id=k + 1, name=name) for k, name in enumerate(COCO_SUBSET)]
    coco = dict(images=images, annotations=annotations, categories=categories)
    for split in ("train", "val"):
        (root / f"{split}.json").write_text(json.dumps(coco))


def this_process_mp_cfg() -> dict:
    """mmengine's ``env_cfg.mp_cfg`` that keeps this process's settings (its defaults force the
    'fork' start method and set OpenCV's thread count for the whole test process)."""
    import cv2
    import torch.multiprocessing as mp

    return dict(
        mp_start_method=mp.get_start_method(allow_none=True) or "fork",
        opencv_num_threads=cv2.getNumThreads(),
    )


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's intra-op thread count after a Runner has run."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_coco_run(cfg, root, shrink: Callable[[list], None]) -> None:
    """Point a shipped mmdet config at a tiny COCO-format dataset written under ``root`` and
    make it a short CPU run: one epoch of batches of 2, validated once, no LR schedule, no
    worker processes, this process's settings kept.  ``shrink(pipeline)`` makes each loader's
    images small."""
    write_coco(root / "coco")
    cfg.model.bbox_head.num_classes = len(COCO_SUBSET)
    for loader, ann in (("train_dataloader", "train.json"), ("val_dataloader", "val.json")):
        cfg[loader].update(num_workers=0, persistent_workers=False, batch_size=2)
        cfg[loader].dataset.update(
            data_root=str(root / "coco"),
            ann_file=ann,
            data_prefix=dict(img="images/"),
            metainfo=dict(classes=COCO_SUBSET),
        )
        shrink(cfg[loader].dataset.pipeline)
    cfg.test_dataloader = cfg.val_dataloader
    cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = str(root / "coco/val.json")
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=1, val_interval=1)
    cfg.param_scheduler = []
    cfg.work_dir = str(root / "work")
    cfg.log_level = "WARNING"
    cfg.env_cfg.mp_cfg = this_process_mp_cfg()


def train_and_test(cfg, watched: Callable[[torch.nn.Module], torch.nn.Module]):
    """Build mmengine's Runner from ``cfg`` (as mmdet's tools/train.py does), train, test.

    Returns (runner, the class of the module ``watched(runner.model)`` at each of its forward
    calls -- what hooks converted it to is what ran --, the test metrics)."""
    from mmengine.runner import Runner

    with torch_threads_kept():
        runner = Runner.from_cfg(cfg)
        module = watched(runner.model)
        calls: list[type] = []
        module.register_forward_hook(lambda *_: calls.append(type(module)))
        runner.train()
        metrics = runner.test()
    return runner, calls, metrics
