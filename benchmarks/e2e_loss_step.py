"""End to end: one training step of the GFL-R50 head's losses, gfl_ops vs the reference losses.

    python -m benchmarks.e2e_loss_step [--device cpu|cuda] [--batch 2] [--image 1344x800]
                                       [--depth 50] [--no-step] [--quick]

What is measured, on one realistic batch (default: 2 images padded to 1344x800 -- mmdetection's
1333x800 resize padded to 32, the per-GPU batch of the GFL 1x recipe -- 80 classes, 8 ground
truths per image with log-uniform sizes, about COCO's average):

* ``assign_ms``: ATSS assignment alone (``detector.assigners.atss_assign_batched``), the same for
  every backend (it does not use gfl_ops).
* ``loss_ms``: forward + backward of the detector's loss (``detector.losses.DetectionLoss``:
  QFL over every anchor, integral decode + GIoU + DFL over the positives, mmdetection's
  weighting) from the head's outputs, with the assignment precomputed -- the part gfl_ops
  changes.  One row per backend: ``reference`` (the pure-PyTorch formulas) and each gfl_ops
  backend that is available on the device.
* ``step_ms``: a whole training step of the GFL-R50-FPN detector (backbone, FPN, head, assignment,
  losses, backward), with that backend's losses; ``loss_share = loss_ms / step_ms``.

The assignment is taken out of ``loss_ms`` by replacing ``detector.losses.atss_assign_batched``
with a lookup of its precomputed result while the loss is timed (nothing in the repository is
edited).  Rows are appended to ``<out>/e2e_loss_step.csv`` and shown in ``summary.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from benchmarks import csvio, timing

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def make_targets(
    batch: int,
    height: int,
    width: int,
    num_gt: int,
    num_classes: int,
    device: torch.device,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Ground truths: ``num_gt`` boxes per image, sides log-uniform in [16, 512] px (clipped to
    the image), centres uniform, labels uniform."""
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        wh = torch.exp(torch.empty(num_gt, 2).uniform_(math.log(16), math.log(512), generator=gen))
        wh = torch.minimum(wh, torch.tensor([width - 2.0, height - 2.0]))
        lo = torch.rand(num_gt, 2, generator=gen) * (torch.tensor([width, height]) - wh)
        boxes = torch.cat([lo, lo + wh], dim=1)
        labels = torch.randint(0, num_classes, (num_gt,), generator=gen)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return targets


@contextlib.contextmanager
def _assignment_cached(result: torch.Tensor) -> Iterator[None]:
    """Make ``DetectionLoss`` use a precomputed assignment (so the loss is timed alone)."""
    import detector.losses as losses_mod

    original = losses_mod.atss_assign_batched
    losses_mod.atss_assign_batched = lambda *args, **kwargs: result
    try:
        yield
    finally:
        losses_mod.atss_assign_batched = original


def _bench(
    fns: dict[str, Callable[[], object]], device: torch.device, budget_s: float, min_reps: int
) -> dict[str, timing.Timing]:
    """Time callables that have each been called once already (so one more warm-up call)."""
    if device.type == "cuda":
        return {name: timing.bench_cuda(fn, min_reps=min_reps) for name, fn in fns.items()}
    return timing.bench_cpu(
        fns,
        budget_s=budget_s,
        min_reps=min_reps,
        rounds=min(min_reps, 5),
        min_warmup=1,
        warmup_s=0.0,
    )


def run(args: argparse.Namespace) -> list[dict]:
    """Measure and return the rows (one per losses backend)."""
    import gfl_ops
    from detector.assigners import atss_assign_batched
    from detector.losses import DetectionLoss, pad_targets
    from detector.models import ModelConfig, build_detector
    from detector.models.gfl_head import flatten_levels

    device = torch.device(args.device)
    width, height = (int(v) for v in args.image.lower().split("x"))
    torch.manual_seed(0)
    cfg = ModelConfig(depth=args.depth, num_classes=args.num_classes, reg_max=args.reg_max)
    model = build_detector(cfg).to(device).train()
    images = torch.randn(args.batch, 3, height, width, device=device)
    targets = make_targets(args.batch, height, width, args.gts, args.num_classes, device)
    # Triton on CPU is its interpreter: not a timing (see peers.ours_backends)
    backends = ["reference"] + [
        b
        for b in gfl_ops.available_backends(device.type)
        if b != "reference" and not (device.type == "cpu" and b == "triton")
    ]
    if args.backends:
        backends = [b for b in backends if b in args.backends.split(",")]
    notes = []

    # the head's outputs on this batch, as the loss receives them
    with torch.no_grad():
        outs = model.forward_head(images)
    cls = flatten_levels(outs.cls)
    reg = flatten_levels(outs.reg)
    anchors = model.anchor_generator([tuple(m.shape[-2:]) for m in outs.cls], device)
    gt_boxes, _, gt_valid = pad_targets(targets, args.num_classes, device)

    def assign() -> torch.Tensor:
        return atss_assign_batched(
            anchors.boxes, anchors.num_level_anchors, gt_boxes, gt_valid, cfg.atss_topk
        )

    assigned = assign()
    positives = int((assigned >= 0).sum())
    assign_t = _bench({"assign": assign}, device, args.budget_s, args.min_reps)["assign"]

    # loss forward+backward from the head outputs, assignment precomputed
    loss_fns: dict[str, Callable[[], object]] = {}
    leaves = {}
    for b in backends:
        criterion = DetectionLoss(dataclasses.replace(cfg, gfl_backend=b))
        c_leaf = cls.detach().clone().requires_grad_(True)
        r_leaf = reg.detach().clone().requires_grad_(True)
        leaves[b] = (c_leaf, r_leaf)

        def loss_step(criterion=criterion, c_leaf=c_leaf, r_leaf=r_leaf) -> object:
            c_leaf.grad = r_leaf.grad = None
            out = criterion(c_leaf, r_leaf, None, anchors, targets)["loss"]
            out.backward()
            return out

        loss_fns[b] = loss_step
    with _assignment_cached(assigned):
        values = {b: float(fn().detach()) for b, fn in loss_fns.items()}  # warm-up + agreement
        loss_t = _bench(loss_fns, device, args.budget_s, args.min_reps)
    ref_value = values["reference"] if "reference" in values else None
    for b, v in values.items():
        if ref_value is not None and not math.isclose(v, ref_value, rel_tol=1e-4, abs_tol=1e-6):
            notes.append(f"{b}: loss {v:.6g} differs from reference {ref_value:.6g}")

    # whole training step per backend
    step_t: dict[str, timing.Timing] = {}
    if not args.no_step:
        params = [p for p in model.parameters() if p.requires_grad]
        step_fns: dict[str, Callable[[], object]] = {}
        for b in backends:
            criterion = DetectionLoss(dataclasses.replace(cfg, gfl_backend=b)).to(device)

            def train_step(criterion=criterion) -> object:
                for p in params:
                    p.grad = None
                model.criterion = criterion
                loss = model(images, targets)["loss"]
                loss.backward()
                return loss

            step_fns[b] = train_step
        for fn in step_fns.values():
            fn()  # first call (allocations, kernel loading), untimed
        step_t = _bench(step_fns, device, args.step_budget_s, args.step_min_reps)

    meta = csvio.run_metadata(device, "quick" if args.quick else "e2e")
    rows = []
    ref_loss = loss_t["reference"].median_ms if "reference" in loss_t else None
    model_name = f"GFL-R{args.depth}-FPN (detector.models, random init)"
    for b in backends:
        lt = loss_t[b]
        st = step_t.get(b)
        rows.append(
            {
                **meta,
                "losses": "reference" if b == "reference" else f"gfl_ops-{b}",
                "dtype": "float32",
                "batch": args.batch,
                "image": f"{width}x{height}",
                "num_classes": args.num_classes,
                "reg_max": args.reg_max,
                "anchors": int(anchors.boxes.size(0)) * args.batch,
                "positives": positives,
                "assign_ms": assign_t.median_ms,
                "loss_ms": lt.median_ms,
                "loss_p20_ms": lt.p20_ms,
                "loss_p80_ms": lt.p80_ms,
                "step_ms": st.median_ms if st else None,
                "loss_share": lt.median_ms / st.median_ms if st else None,
                "loss_speedup": ref_loss / lt.median_ms if ref_loss else None,
                "reps": lt.reps,
                "model": model_name,
                "notes": "; ".join(notes),
            }
        )
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e_loss_step", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--batch", type=int, default=2, help="images per step (per GPU: 2)")
    ap.add_argument("--image", default="1344x800", help="padded input WxH (default 1344x800)")
    ap.add_argument("--depth", type=int, default=50, help="ResNet depth (default 50)")
    ap.add_argument("--num-classes", type=int, default=80)
    ap.add_argument("--reg-max", type=int, default=16)
    ap.add_argument("--gts", type=int, default=8, help="ground truths per image")
    ap.add_argument(
        "--backends", default=None, help="comma-separated subset of reference,cpu,cuda,triton"
    )
    ap.add_argument(
        "--no-step", action="store_true", help="skip the whole training step (no loss share)"
    )
    ap.add_argument(
        "--budget-s", type=float, default=2.0, help="CPU: timed seconds per loss measurement"
    )
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument(
        "--step-budget-s",
        type=float,
        default=10.0,
        help="CPU: timed seconds per whole-step measurement",
    )
    ap.add_argument("--step-min-reps", type=int, default=3)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: ResNet-18, one 320x256 image, 20 classes, few reps, "
        "writing to results/quick/",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.depth, args.batch, args.image, args.num_classes = 18, 1, "320x256", 20
        args.budget_s, args.min_reps, args.step_budget_s, args.step_min_reps = 0.1, 2, 0.1, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    try:
        import detector.losses  # noqa: F401
        import detector.models  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"the detector package is needed for the end-to-end benchmark: {exc}"
        ) from exc
    out_dir = args.out or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    started = time.perf_counter()
    rows = run(args)
    path = out_dir / csvio.E2E_CSV
    csvio.append_rows(path, rows, csvio.E2E_FIELDS)
    print(
        f"# {rows[0]['device_name']} | torch {rows[0]['torch']} | batch {args.batch} x "
        f"{args.image} | {rows[0]['anchors']} anchors, {rows[0]['positives']} positives | "
        f"assignment {rows[0]['assign_ms']:.4g} ms"
    )
    for r in rows:
        share = f"{100 * r['loss_share']:.1f}%" if r["loss_share"] is not None else "-"
        step = f"{r['step_ms']:.5g}" if r["step_ms"] is not None else "-"
        print(
            f"{r['losses']:<14} loss fwd+bwd {r['loss_ms']:9.4g} ms "
            f"[{r['loss_p20_ms']:.4g}-{r['loss_p80_ms']:.4g}]  x{r['loss_speedup']:.2f} vs "
            f"reference  | step {step} ms, losses {share} of it"
            + (f"  [{r['notes']}]" if r["notes"] else "")
        )
    print(f"# measured in {time.perf_counter() - started:.0f} s; rows appended to {path}")
    if not args.no_report:
        from benchmarks import report

        for p in report.generate(out_dir):
            print(f"# wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
