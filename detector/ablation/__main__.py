"""``python -m detector.ablation STUDY [STUDY ...]``: reproduce the GFL paper's ablations with
this repository's detector and write them beside the paper's figures.

Studies (``all`` runs every one; settings shared between studies are trained once):

  table3          ATSS -> + QFL -> + DFL -> + QFL + DFL (GFL)          paper Table 3 (+ r, rebuttal)
  beta            β of QFL: 0, 1, 2, 2.5, 4                            paper Table 1(c)
  representation  Dirac / Gaussian (NLL) / General / General + DFL     paper Table 2(a)
  bins            number of bins n (reg_max): 4, 8, 12, 14, 16, 18     paper Table 2(b)
  l2_score        ATSS vs joint score trained by QFL vs by L2          rebuttal Table I

Every run trains the base config (``--config``, default the main job's ``gfl_r18_synthetic_cpu``)
with the setting's ``ModelConfig`` options and a seed, under a budget, then evaluates it on the
validation split (COCO AP + score–IoU Pearson r). Each finished run adds one row to
``OUTPUT/<study>.csv``; ``OUTPUT/<study>.md`` (mean ± std over seeds beside the paper, orderings
reproduced or not) and ``OUTPUT/<study>.png`` are rewritten as results come in.

Budgets: ``default`` is the main job's config on the embedded dataset for 8 of its 9 epochs
(608 iterations of 8 images at 224 px, lr / 10 in the last epoch), evaluated on the 150
validation images. Measured on this project's 2-core CPU (2 torch threads, one job, commit
ac3b581 + this change): one run (GFL) took 7.2 min wall -- 422 s training (0.53-0.56 s per
iteration once the machine was otherwise idle; other jobs shared it for the first 2 min), 4 s
evaluation, ~6 s start-up -- so ``table3`` + ``beta`` with 3 seeds, 24 distinct runs (beta's
β = 2 is table3's '+ QFL'), take about 2.9 h; ``representation`` adds 6 runs (~45 min),
``bins`` 15 (~1.8 h), ``l2_score`` 3 (~22 min); ``all`` is 48 runs (~5.8 h). With other jobs
on the same 2 cores a run takes 1.5-2.5x longer (9-epoch runs measured 11.5 and 16.7 min at a
load of 2-4). ``smoke`` takes seconds per run and only tests the machinery; ``full`` keeps the
base config's own schedule (e.g. ``--config gfl_r50_1x_coco --budget full --data /data/coco
--device cuda`` for the paper's 1x on COCO). ``--epochs``, ``--img-size``,
``--max-train-images`` and ``--max-val-images`` adjust any budget.

Resuming: run the same command again. Finished runs (a row with the run's key in any study's
CSV, or a result in ``WORK/<key>/``) are not trained again; interrupted ones resume from their
last checkpoint. Ctrl-C / SIGTERM stop the workers cleanly.

Examples::

    python -m detector.ablation table3 beta                  # ~2.9 h on 2 CPU cores
    python -m detector.ablation all --jobs 4 --threads 4 --device cuda
    python -m detector.ablation beta --seeds 5 --epochs 12
    python -m detector.ablation table3 --data /data/coco --config gfl_r50_1x_coco --budget full
    python -m detector.ablation table3 --report-only         # redraw tables/plots from the CSV
    python -m detector.ablation table3 --budget smoke --output /tmp/abl   # machinery check
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..config import CONFIGS
from .studies import STUDIES

DEFAULT_OUTPUT = "docs/ablation"
DEFAULT_WORK = "runs/ablation"


def build_parser() -> argparse.ArgumentParser:
    from .plan import BUDGETS

    p = argparse.ArgumentParser(
        prog="python -m detector.ablation",
        description="Run the GFL paper's ablation studies with this repository's detector.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2] if __doc__ else None,
    )
    p.add_argument(
        "studies",
        nargs="+",
        metavar="STUDY",
        choices=[*STUDIES, "all"],
        help=f"one or more of {', '.join(STUDIES)}, or all",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="embedded",
        help="'embedded' (the main job's shapes dataset, generated under "
        "--embedded-root if missing) or a COCO-format folder with "
        "annotations/instances_{train,val}*.json (default: %(default)s)",
    )
    g.add_argument(
        "--embedded-root",
        default="data/shapes",
        help="where the embedded dataset lives (default: %(default)s)",
    )
    for name in ("train-ann", "train-images", "val-ann", "val-images"):
        g.add_argument(f"--{name}", help="name the dataset files directly (all four together)")
    g = p.add_argument_group("budget")
    g.add_argument(
        "--config",
        default="gfl_r18_synthetic_cpu",
        choices=sorted(CONFIGS),
        help="base experiment config (default: %(default)s)",
    )
    g.add_argument(
        "--budget",
        default="default",
        choices=sorted(BUDGETS),
        help="training budget preset (default: %(default)s)",
    )
    g.add_argument("--epochs", type=int, help="epochs per run (lr steps scale along)")
    g.add_argument("--img-size", type=int, help="longer image side in pixels")
    g.add_argument("--max-train-images", type=int, help="train on the first N images only")
    g.add_argument("--max-val-images", type=int, help="evaluate on the first N images only")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="base config override, as in detector.train (repeatable)",
    )
    g = p.add_argument_group("sweep")
    g.add_argument("--seeds", type=int, default=3, help="seeds per setting (default: 3)")
    g.add_argument("--first-seed", type=int, default=0, help="first seed (default: 0)")
    g.add_argument("--settings", help="only these settings, comma-separated (e.g. qfl,l2)")
    g.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once (default: 1; on 2 CPU cores two 1-thread jobs "
        "are no faster than one 2-thread job)",
    )
    g.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        help="CSV / markdown / PNG results (default: %(default)s)",
    )
    g.add_argument(
        "--work-dir",
        default=DEFAULT_WORK,
        help="checkpoints and logs of the runs (default: %(default)s)",
    )
    g.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each finished run's checkpoint (deleted by default)",
    )
    g.add_argument(
        "--report-only", action="store_true", help="only rewrite the tables and plots from the CSVs"
    )
    g.add_argument(
        "--dry-run", action="store_true", help="list the runs (finished or to train) and exit"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--stop-after-iters", type=int, help=argparse.SUPPRESS)
    return p


def _budget_label(name: str, args: argparse.Namespace, base) -> str:
    parts = [args.config, f"{base.train.epochs} epochs", f"{max(base.data.img_scale)} px"]
    if args.max_train_images or args.max_val_images:
        parts.append(
            f"first {args.max_train_images or 'all'} train / "
            f"{args.max_val_images or 'all'} val images"
        )
    parts += args.overrides
    return f"{name} ({', '.join(str(p) for p in parts)})"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data import resolve_dataset, subset
    from .plan import BUDGETS, base_config, budget_id, plan_runs
    from .publish import write_report
    from .runner import SweepOptions, record_rows, run_sweep

    names = list(STUDIES) if "all" in args.studies else list(dict.fromkeys(args.studies))
    studies = [STUDIES[n] for n in names]
    if args.settings:
        wanted = set(args.settings.split(","))
        known = {s.name for st in studies for s in st.settings}
        if wanted - known:
            print(
                f"error: unknown settings {sorted(wanted - known)}; these studies have "
                f"{sorted(known)}",
                file=sys.stderr,
            )
            return 2
        studies = [
            replace(st, settings=tuple(s for s in st.settings if s.name in wanted))
            for st in studies
        ]
        studies = [st for st in studies if st.settings]
    preset = BUDGETS[args.budget]
    budget = replace(
        preset,
        max_train_images=args.max_train_images or preset.max_train_images,
        max_val_images=args.max_val_images or preset.max_val_images,
    )
    args.max_train_images, args.max_val_images = budget.max_train_images, budget.max_val_images
    out_dir, work_dir = Path(args.output), Path(args.work_dir)
    try:
        files = {
            k: getattr(args, k) for k in ("train_ann", "train_images", "val_ann", "val_images")
        }
        dataset = resolve_dataset(
            args.data, args.embedded_root, files, progress=not args.no_progress
        )
        dataset = subset(dataset, budget.max_train_images, budget.max_val_images, work_dir / "data")
        base = base_config(args.config, budget, args.overrides, args.epochs, args.img_size)
        bid = budget_id(base, dataset)
        specs = plan_runs(
            studies, list(range(args.first_seed, args.first_seed + args.seeds)), base, dataset
        )
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    full_studies = [STUDIES[st.name] for st in studies]  # reports show every setting

    if args.dry_run:
        for s in specs:
            done = (work_dir / s.key / "result.json").is_file()
            print(
                f"{s.study:>15} {s.setting:>12} seed {s.seed}  {s.key}"
                f"{'  (result in work dir)' if done else ''}"
            )
        print(f"{len(specs)} rows, {len({s.key for s in specs})} distinct runs")
        return 0
    if args.report_only:
        for st in full_studies:
            print(write_report(st, out_dir, bid))
        return 0

    def record(rows: list[dict]) -> None:
        record_rows(rows, out_dir)
        for name in sorted({str(r["study"]) for r in rows}):
            try:
                write_report(STUDIES[name], out_dir, bid)
            except Exception as e:  # noqa: BLE001 - a plot problem must not stop a sweep
                print(f"warning: could not write the {name} report ({e})", file=sys.stderr)

    opts = SweepOptions(
        out_dir=out_dir,
        work_dir=work_dir,
        dataset=dataset,
        budget=_budget_label(args.budget, args, base),
        budget_id=bid,
        jobs=args.jobs,
        threads=args.threads,
        device=args.device,
        progress=not args.no_progress,
        keep_checkpoints=args.keep_checkpoints,
        stop_after_iters=args.stop_after_iters,
    )
    outcome = run_sweep(specs, opts, record)
    for st in full_studies:
        print(f"{st.name}: {write_report(st, out_dir, bid)}")
    if outcome.interrupted:
        return 130
    if outcome.failed:
        print(
            f"{len(outcome.failed)} run(s) did not finish; run the same command again to "
            "retry them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
