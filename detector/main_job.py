"""``python -m detector.main_job``: the project's main job, end to end on a CPU.

1. generate the embedded shapes dataset (COCO format) under ``--data`` if it is not there yet;
2. train the ``gfl_r18_synthetic_cpu`` config on it (ResNet-18 GFL from scratch);
3. evaluate on the validation split (COCO AP table + score–IoU Pearson, ``OUTPUT/metrics.json``);
4. draw detections and the learned side distributions of a few validation images
   (``OUTPUT/vis/``).

Deterministic for a given ``--seed`` on a given machine and thread count. Re-running continues
an interrupted run from its last checkpoint (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("detector")

CONFIG_NAME = "gfl_r18_synthetic_cpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m detector.main_job",
        description="Generate the embedded dataset, train the small CPU config, evaluate and "
        "visualise.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1] if __doc__ else None,
    )
    p.add_argument(
        "--data", default="data/shapes", help="embedded dataset folder (default: %(default)s)"
    )
    p.add_argument("--output", default="runs/main_job", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    p.add_argument("--data-seed", type=int, default=0, help="dataset generator seed")
    p.add_argument(
        "--num-train",
        type=int,
        default=None,
        help="training images to generate (default: the generator's 600)",
    )
    p.add_argument(
        "--num-val",
        type=int,
        default=None,
        help="validation images to generate (default: the generator's 150)",
    )
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: all cores)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, as in detector.train",
    )
    p.add_argument("--fresh", action="store_true", help="delete OUTPUT first")
    p.add_argument("--vis-images", type=int, default=4, help="validation images to draw")
    p.add_argument(
        "--require-ap50",
        type=float,
        default=None,
        help="exit with status 1 if the final AP50 is below this",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    import torch

    from .config import apply_overrides, get_config
    from .data.synthetic import SyntheticConfig, generate_dataset, is_generated
    from .engine import Trainer, TrainingInterrupted, setup_logging
    from .infer import list_images, run_inference
    from .metrics import format_metrics_table

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    setup_logging(out)

    # 1. data
    syn = SyntheticConfig(seed=args.data_seed)
    if args.num_train is not None:
        syn.num_train = args.num_train
    if args.num_val is not None:
        syn.num_val = args.num_val
    if is_generated(args.data, syn):
        logger.info("embedded dataset found in %s", args.data)
    else:
        logger.info(
            "generating the embedded dataset in %s (%d train + %d val images)",
            args.data,
            syn.num_train,
            syn.num_val,
        )
    paths = generate_dataset(args.data, syn, progress=not args.no_progress)
    t_data = time.perf_counter() - t0

    # 2. train (+ 3. final evaluation)
    cfg = get_config(CONFIG_NAME)
    cfg.train.seed = args.seed
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    apply_overrides(cfg, args.overrides)
    trainer = Trainer(
        cfg,
        paths["train_ann"],
        paths["train_images"],
        paths["val_ann"],
        paths["val_images"],
        out,
        resume="auto",
        device="cpu",
        progress=not args.no_progress,
    )
    try:
        metrics = trainer.train()
    except TrainingInterrupted:
        print(f"interrupted; run the same command again to continue from {out / 'latest.pth'}")
        return 3
    finally:
        trainer.close()
    assert metrics is not None
    t_train = time.perf_counter() - t0 - t_data

    # 4. visualisation
    from .checkpoint import load_for_inference

    model, ckpt = load_for_inference(out / "latest.pth", "cpu")
    files = list_images(paths["val_images"])[: args.vis_images]
    run_inference(model, ckpt, files, out / "vis", torch.device("cpu"), score_thr=0.3)
    wall = time.perf_counter() - t0

    print()
    print(
        format_metrics_table(
            metrics, title=f"{CONFIG_NAME} on the embedded validation split ({paths['val_ann']})"
        )
    )
    print(
        f"wall time {wall / 60:.1f} min (data {t_data:.0f} s, training + evaluation "
        f"{t_train:.0f} s) with {torch.get_num_threads()} threads"
    )
    print(
        f"metrics: {out / 'metrics.json'}   checkpoint: {out / 'latest.pth'}   "
        f"pictures: {out / 'vis'}"
    )
    if args.require_ap50 is not None and metrics["AP50"] < args.require_ap50:
        print(f"AP50 {metrics['AP50']:.3f} is below the required {args.require_ap50}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
