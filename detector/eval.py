"""``python -m detector.eval``: COCO metrics of a checkpoint on a COCO-format dataset.

Prints AP, AP50, AP75, APs, APm, APl (pycocotools' COCOeval) and the Pearson correlation between
each detection's score and its IoU with the best-matching ground truth of its class (the GFL
rebuttal's statistic), and writes them to ``OUTPUT/metrics.json`` (keys ``AP``, ``AP50``,
``AP75``, ``APs``, ``APm``, ``APl``, ``score_iou_pearson``; COCOeval's -1 for an area range
without ground truth, ``null`` for an undefined correlation) together with the detections in
COCO result format (``OUTPUT/detections.json``). Runs under ``torchrun`` too (images sharded over
processes).

Example::

    python -m detector.eval --checkpoint runs/shapes/latest.pth \\
        --ann data/shapes/annotations/instances_val.json --images data/shapes/val \\
        --output runs/shapes/eval
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m detector.eval",
        description="Evaluate a detector checkpoint with COCOeval (+ score-IoU Pearson).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1] if __doc__ else None,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint written by detector.train")
    p.add_argument("--ann", required=True, help="COCO instances JSON")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--output", required=True, help="directory for metrics.json, detections.json")
    p.add_argument(
        "--config",
        default=None,
        help="fail unless the checkpoint was trained with this named config",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per batch (default: the checkpoint's data.eval_batch_size)",
    )
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--score-thr", type=float, default=None, help="override model.score_thr")
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images")
    p.add_argument("--gfl-backend", default=None, help="gfl_ops backend for the integral")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch.distributed as dist

    from .checkpoint import CheckpointError, load_for_inference
    from .config import ExperimentConfig
    from .data.coco import CocoDetection, DatasetError
    from .data.transforms import TransformConfig
    from .engine import check_amp, evaluate, init_distributed, setup_logging
    from .metrics import format_metrics_table, write_metrics

    ctx = init_distributed(args.device)
    setup_logging(args.output, ctx.rank, filename="eval.log")
    try:
        try:
            check_amp(args.amp, ctx.device)
            overrides = {}
            if args.score_thr is not None:
                overrides["score_thr"] = args.score_thr
            if args.gfl_backend is not None:
                overrides["gfl_backend"] = args.gfl_backend
            model, ckpt = load_for_inference(
                args.checkpoint, ctx.device, expect_config=args.config, model_overrides=overrides
            )
            cfg = ExperimentConfig.from_dict(ckpt["config"])
            d = cfg.data
            dataset = CocoDetection(
                args.ann,
                args.images,
                TransformConfig(tuple(d.img_scale), 0.0, tuple(d.mean), tuple(d.std)),
                filter_empty=False,
                on_bad_image="drop",
            )
            classes = ckpt.get("classes", {})
            if classes.get("cat_ids") is not None and classes["cat_ids"] != dataset.cat_ids:
                raise CheckpointError(
                    f"{args.checkpoint}: checkpoint was trained on categories "
                    f"{classes['cat_ids']} ({', '.join(classes.get('names', []))}), but "
                    f"{args.ann} has {dataset.cat_ids}"
                )
        except (DatasetError, CheckpointError, ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        metrics, dets = evaluate(
            model,
            dataset,
            ctx,
            batch_size=args.batch_size or d.eval_batch_size,
            num_workers=d.num_workers if args.workers is None else args.workers,
            amp=args.amp,
            progress=not args.no_progress,
            max_images=args.max_images,
        )
        if ctx.is_main:
            out = Path(args.output)
            write_metrics(metrics, out / "metrics.json")
            (out / "detections.json").write_text(json.dumps(dets))
            prog = ckpt.get("progress", {})
            title = (
                f"{args.checkpoint} (config {cfg.name}, epoch {prog.get('epoch', '?')}) "
                f"on {args.ann}"
            )
            print(format_metrics_table(metrics, title=title))
            if metrics.get("skipped_images"):
                print(f"warning: {metrics['skipped_images']} undecodable images were left out")
            print(f"metrics written to {out / 'metrics.json'}")
        return 0
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
