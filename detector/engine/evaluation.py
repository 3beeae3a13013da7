"""The evaluation loop: run a model over a dataset (images sharded over the ranks), gather the
detections and compute the COCO metrics (+ score–IoU Pearson) of :mod:`detector.metrics`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..checkpoint import unwrap
from ..data.coco import CocoDetection
from ..data.loader import build_eval_loader
from ..metrics import detections_to_coco, evaluate_detections
from .amp import autocast_context
from .distributed import DistContext, broadcast_from_main, gather_objects

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: CocoDetection,
    ctx: DistContext,
    batch_size: int = 1,
    num_workers: int = 2,
    amp: str = "none",
    progress: bool = True,
    max_images: int | None = None,
    with_distributions: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``model`` over ``dataset`` (sharded over ranks) and compute the COCO metrics.

    Returns ``(metrics, detections)`` on every rank (metrics from :func:`evaluate_detections`,
    detections in COCO result format, gathered from all ranks). Images that cannot be decoded
    are left out of the evaluation and counted in ``metrics['skipped_images']``.
    """
    from tqdm import tqdm

    net = unwrap(model)
    was_training = net.training
    net.eval()
    subset: Any = dataset
    if max_images is not None and max_images < len(dataset):
        subset = torch.utils.data.Subset(dataset, range(max_images))
    loader = build_eval_loader(
        subset,
        batch_size=batch_size,
        num_workers=num_workers,
        size_divisor=32,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    dets: list[dict[str, Any]] = []
    done_ids: list[int] = []
    bar = tqdm(
        loader, desc="eval", leave=False, disable=not (progress and ctx.is_main), dynamic_ncols=True
    )
    for images, targets in bar:
        if images is None:  # every image of the batch was undecodable
            continue
        images = images.to(ctx.device, non_blocking=True)
        with autocast_context(ctx.device, amp):
            results = net.predict(
                images,
                image_sizes=[t["img_shape"] for t in targets],
                scale_factors=[t["scale_factor"] for t in targets],
                original_sizes=[t["orig_shape"] for t in targets],
                with_distributions=with_distributions,
            )
        for t, r in zip(targets, results):
            dets += detections_to_coco(
                t["image_id"], r["boxes"], r["scores"], r["labels"], dataset.cat_ids
            )
            done_ids.append(t["image_id"])
    if ctx.distributed:
        gathered = gather_objects((dets, done_ids), ctx)
        dets = [d for part in gathered for d in part[0]]
        done_ids = [i for part in gathered for i in part[1]]
    expected = len(subset)
    metrics: dict[str, Any] = {}
    if ctx.is_main:
        metrics = evaluate_detections(dataset.coco, dets, image_ids=done_ids)
        metrics["skipped_images"] = expected - len(set(done_ids))
    metrics = broadcast_from_main(metrics, ctx)
    if was_training:
        net.train()
    return metrics, dets
