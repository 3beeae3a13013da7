"""``python -m detector.train``: train the GFL detector on a COCO-format dataset.

Examples::

    # the embedded dataset on CPU (see python -m detector.main_job for the whole pipeline)
    python -m detector.train --config gfl_r18_synthetic_cpu \\
        --train-ann data/shapes/annotations/instances_train.json --train-images data/shapes/train \\
        --val-ann data/shapes/annotations/instances_val.json --val-images data/shapes/val \\
        --output runs/shapes

    # mmdetection's GFL R50 1x on COCO 2017, 8 GPUs (2 images each)
    torchrun --nproc-per-node 8 -m detector.train --config gfl_r50_1x_coco \\
        --train-ann coco/annotations/instances_train2017.json --train-images coco/train2017 \\
        --val-ann coco/annotations/instances_val2017.json --val-images coco/val2017 \\
        --output runs/gfl_r50_1x

    # continue after an interruption (Ctrl-C / SIGTERM save a checkpoint first)
    python -m detector.train ... --output runs/shapes --resume auto

Exit status: 0 when training finished, 3 when it stopped on a signal (after checkpointing),
2 for bad input (a message naming the file and the problem).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .config import CONFIGS, apply_overrides, get_config

logger = logging.getLogger("detector")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m detector.train",
        description="Train the ATSS + GFL detector on a COCO-format dataset "
        "(single process, or torchrun for multi-GPU / multi-node DDP).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1] if __doc__ else None,
    )
    p.add_argument(
        "--config",
        default="gfl_r18_synthetic_cpu",
        choices=sorted(CONFIGS),
        help="named experiment config (default: %(default)s)",
    )
    p.add_argument("--train-ann", required=True, help="COCO instances JSON of the training set")
    p.add_argument("--train-images", required=True, help="image folder of the training set")
    p.add_argument("--val-ann", help="COCO instances JSON of the validation set")
    p.add_argument("--val-images", help="image folder of the validation set")
    p.add_argument("--output", required=True, help="output directory (checkpoints, logs)")
    p.add_argument(
        "--resume",
        default=None,
        help="checkpoint to resume from, or 'auto' for OUTPUT/latest.pth if present",
    )
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--lr", type=float, help="override train.lr")
    p.add_argument("--batch-size", type=int, help="override data.batch_size (per process)")
    p.add_argument("--workers", type=int, help="override data.num_workers")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="override train.amp")
    p.add_argument("--eval-interval", type=int, help="override train.eval_interval (epochs)")
    p.add_argument(
        "--pretrained",
        help="backbone weights: local path, torchvision name, "
        "or 'none' (override model.pretrained)",
    )
    p.add_argument("--gfl-backend", help="gfl_ops backend (override model.gfl_backend)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config override, e.g. --set train.lr_steps=[16,22] "
        "--set model.reg_max=8 (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    p.add_argument("--stop-after-iters", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace):
    """The :class:`ExperimentConfig` named by ``--config`` with the command-line overrides."""
    cfg = get_config(args.config)
    apply_overrides(cfg, args.overrides)
    simple = {
        "epochs": ("train", "epochs"),
        "lr": ("train", "lr"),
        "seed": ("train", "seed"),
        "amp": ("train", "amp"),
        "eval_interval": ("train", "eval_interval"),
        "batch_size": ("data", "batch_size"),
        "workers": ("data", "num_workers"),
    }
    for arg, (section, key) in simple.items():
        v = getattr(args, arg)
        if v is not None:
            setattr(getattr(cfg, section), key, v)
    if args.pretrained is not None:
        cfg.model["pretrained"] = None if args.pretrained.lower() == "none" else args.pretrained
    if args.gfl_backend is not None:
        cfg.model["gfl_backend"] = args.gfl_backend
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch.distributed as dist

    from .checkpoint import CheckpointError
    from .data.coco import DatasetError
    from .engine import Trainer, TrainingInterrupted, setup_logging
    from .metrics import format_metrics_table

    if (args.val_ann is None) != (args.val_images is None):
        print("error: --val-ann and --val-images go together", file=sys.stderr)
        return 2

    setup_logging(args.output, int(os.environ.get("RANK", "0")))
    trainer = None
    try:
        try:  # bad input: a clear message and exit status 2, no traceback
            cfg = config_from_args(args)
            trainer = Trainer(
                cfg,
                args.train_ann,
                args.train_images,
                args.val_ann,
                args.val_images,
                args.output,
                resume=args.resume,
                device=args.device,
                progress=not args.no_progress,
                stop_after_iters=args.stop_after_iters,
                tensorboard=not args.no_tensorboard,
            )
        except (
            DatasetError,
            CheckpointError,
            KeyError,
            ValueError,
            FileNotFoundError,
            RuntimeError,
        ) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"error: {msg}", file=sys.stderr)
            return 2
        try:
            metrics = trainer.train()
        except TrainingInterrupted:
            return 3
        except DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if trainer.ctx.is_main:
            if metrics is not None:
                print(format_metrics_table(metrics, title=f"validation ({args.val_ann})"))
            print(f"checkpoint: {trainer.output_dir / 'latest.pth'}")
        return 0
    finally:
        if trainer is not None:
            trainer.close()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
