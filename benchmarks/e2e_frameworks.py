"""End to end in the frameworks: one training step of mmdetection's GFLHead and RTMDet head and
of YOLOv8n, stock against fused with gfl_ops' adapters (gfl_ops/integrations/).

    python -m benchmarks.e2e_frameworks [--device cpu|cuda] [--steps 8] [--image PIXELS]
                                        [--frameworks mmdet,rtmdet,ultralytics] [--out DIR]

What is measured, per framework, on the same weights and batch for both variants:

* ``step_ms``: one whole training step -- forward, the framework's own loss, backward, SGD
  update.  mmdetection (``mmdet``): ``GFLHead`` built from the head of
  ``configs/gfl/gfl_r50_fpn_1x_coco.py`` (80 classes, 256 channels, 4 stacked convs, ATSS
  assigner) on FPN-shaped features of a batch of 2 images of 800 x 800 (the backbone and neck
  are outside the part gfl_ops touches and outside this measurement); ``rtmdet``: the
  ``RTMDetSepBNHead`` of ``configs/rtmdet/rtmdet_l_8xb32-300e_coco.py`` (256 channels, strides
  8-32, dynamic soft-label assigner; QFL is the only op fused there) at 640 x 640, likewise;
  Ultralytics: ``DetectionModel('yolov8n.yaml')``, the whole network, batch 2 at 640 x 640 (its
  default training size).  8 ground-truth boxes per image.
* ``loss_ms``: forward + backward of the loss alone, from head outputs held fixed (detached
  leaves): mmdetection's ``loss_by_feat`` (GFL: ATSS assignment, QFL, integral + GIoU, DFL;
  RTMDet: its assignment, QFL, GIoU), and Ultralytics' ``v8DetectionLoss`` (task-aligned
  assignment, BCE, integral + CIoU, DFL).  ``loss_share = loss_ms / step_ms`` of the stock step.

Each step alternates stock and fused (so drift of a shared machine hits both alike) and the
median over ``--steps`` is reported, after one untimed warm-up step each.  Rows are written to
``<out>/e2e-frameworks-<device>.csv`` and a table to ``.md`` beside it, with the device,
versions and commit.

mmdetection needs mmcv's compiled ops to import its heads.  With mmcv-lite (no compiled ops),
this script installs the test suite's stand-in for ``mmcv._ext``
(tests/integrations/mmcv_ext_stub.py, whose every op raises), and says so: neither head's
training step calls a compiled op.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import csvio
from benchmarks.peers import ensure_mmcv_ops

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
FIELDS = (
    "framework",
    "variant",
    "step_ms",
    "loss_ms",
    "loss_share",
    "step_speedup",
    "loss_speedup",
    "steps",
    "image",
    "device_type",
    "device_name",
    "cpu_threads",
    "torch",
    "framework_version",
    "git_commit",
    "git_dirty",
    "date_utc",
    "notes",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _medians(
    fns: dict[str, Callable[[], object]], steps: int, device: torch.device
) -> dict[str, float]:
    for fn in fns.values():  # warm-up, untimed
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            samples[name].append(_time(fn, device))
    return {k: statistics.median(v) for k, v in samples.items()}


def _measure(
    models: dict[str, torch.nn.Module],
    step_loss: Callable[[torch.nn.Module], torch.Tensor],
    fixed_loss: Callable[[torch.nn.Module], Callable[[], torch.Tensor]],
    steps: int,
    device: torch.device,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms of a whole SGD step and of the loss's forward+backward alone, per variant.

    ``step_loss(model)``: the scalar training loss of one forward of ``model``;
    ``fixed_loss(model)``: a callable giving the loss from head outputs held fixed (leaves).
    """

    def step(model: torch.nn.Module) -> Callable[[], None]:
        optim = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def run() -> None:
            loss = step_loss(model)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()

        return run

    def loss_only(model: torch.nn.Module) -> Callable[[], None]:
        loss_of = fixed_loss(model)
        return lambda: loss_of().backward()

    return (
        _medians({k: step(m) for k, m in models.items()}, steps, device),
        _medians({k: loss_only(m) for k, m in models.items()}, steps, device),
    )


def _boxes(batch: int, size: int, num_gt: int, gen: torch.Generator) -> list[torch.Tensor]:
    """xyxy pixel boxes, sides uniform in [size/16, size/2], inside the image."""
    out = []
    for _ in range(batch):
        wh = torch.empty(num_gt, 2).uniform_(size / 16, size / 2, generator=gen)
        lo = torch.rand(num_gt, 2, generator=gen) * (size - wh)
        out.append(torch.cat([lo, lo + wh], dim=1))
    return out


# --------------------------------------------------------------------------------------------
# mmdetection


def _gfl_head(device: torch.device):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import ConfigDict

    register_all_modules()
    cfg = dict(
        type="GFLHead",
        num_classes=80,
        in_channels=256,
        stacked_convs=4,
        feat_channels=256,
        anchor_generator=dict(
            type="AnchorGenerator",
            ratios=[1.0],
            octave_base_scale=8,
            scales_per_octave=1,
            strides=[8, 16, 32, 64, 128],
        ),
        loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_dfl=dict(type="DistributionFocalLoss", loss_weight=0.25),
        reg_max=16,
        loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
        train_cfg=ConfigDict(
            assigner=dict(type="ATSSAssigner", topk=9),
            allowed_border=-1,
            pos_weight=-1,
            debug=False,
        ),
    )
    return MODELS.build(cfg).to(device).train()


def _rtmdet_head(device: torch.device):
    """RTMDet-L's head as mmdet's ``configs/rtmdet/rtmdet_l_8xb32-300e_coco.py`` builds it
    (256 channels, 80 classes, strides 8 / 16 / 32, dynamic soft-label assigner), with BN for
    its SyncBN, as mmengine's Runner has it on one device."""
    import os

    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm

    register_all_modules()
    configs = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs")
    model = Config.fromfile(os.path.join(configs, "rtmdet", "rtmdet_l_8xb32-300e_coco.py")).model
    head = model.bbox_head
    head.update(train_cfg=model.train_cfg, test_cfg=model.test_cfg)
    return revert_sync_batchnorm(MODELS.build(head)).to(device).train()


def _bench_mmdet_head(
    name: str,
    build_head: Callable[[torch.device], Any],
    device: torch.device,
    image: int,
    steps: int,
) -> tuple[list[dict], str]:
    """One training step of an mmdet dense head (forward on FPN-shaped features at the strides of
    its prior generator, its ``loss_by_feat``, backward, SGD), stock vs
    :func:`~gfl_ops.integrations.mmdet.fuse`; the rows and the note on mmcv's compiled ops."""
    note = ensure_mmcv_ops()  # before mmdet's models are imported
    import mmdet
    from mmengine.structures import InstanceData

    from gfl_ops.integrations.mmdet import fuse

    torch.manual_seed(0)
    stock = build_head(device)
    fused = fuse(copy.deepcopy(stock))
    gen = torch.Generator().manual_seed(0)
    batch = 2
    channels = stock.in_channels
    feats = [
        torch.randn(batch, channels, image // s, image // s, generator=gen).to(device)
        for s, _ in stock.prior_generator.strides
    ]
    gts = []
    for boxes in _boxes(batch, image, 8, gen):
        gt = InstanceData()
        gt.bboxes = boxes.to(device)
        gt.labels = torch.randint(0, 80, (len(boxes),), generator=gen).to(device)
        gts.append(gt)
    metas = [
        dict(img_shape=(image, image), pad_shape=(image, image), batch_input_shape=(image, image))
    ] * batch

    def total(losses: dict) -> torch.Tensor:  # a head's losses: tensors or per-level lists
        return sum(v if isinstance(v, torch.Tensor) else sum(v) for v in losses.values())

    def fixed_loss(head) -> Callable[[], torch.Tensor]:
        with torch.no_grad():
            outs = head(feats)
        leaves = [[t.detach().requires_grad_(True) for t in level] for level in outs]
        return lambda: total(head.loss_by_feat(*leaves, gts, metas))

    step_ms, loss_ms = _measure(
        {"stock": stock, "fused": fused},
        lambda head: total(head.loss_by_feat(*head(feats), gts, metas)),
        fixed_loss,
        steps,
        device,
    )
    return _rows(name, step_ms, loss_ms, f"mmdet {mmdet.__version__}"), note


def bench_mmdet(device: torch.device, image: int, steps: int) -> tuple[list[dict], str]:
    name = "mmdet GFLHead (gfl_r50_fpn_1x head)"
    return _bench_mmdet_head(name, _gfl_head, device, image, steps)


def bench_rtmdet(device: torch.device, image: int, steps: int) -> tuple[list[dict], str]:
    return _bench_mmdet_head("mmdet RTMDet-L head", _rtmdet_head, device, image, steps)


# --------------------------------------------------------------------------------------------
# Ultralytics


def bench_ultralytics(device: torch.device, image: int, steps: int) -> tuple[list[dict], str]:
    import ultralytics
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from gfl_ops.integrations.ultralytics import patch

    torch.manual_seed(0)
    stock = DetectionModel("yolov8n.yaml", nc=80, verbose=False).to(device).train()
    stock.args = get_cfg()  # the trainer's default hyperparameters (box, cls, dfl gains)
    fused = patch(copy.deepcopy(stock))
    gen = torch.Generator().manual_seed(0)
    batch = 2
    images = torch.rand(batch, 3, image, image, generator=gen).to(device)
    boxes = _boxes(batch, image, 8, gen)
    xyxy = torch.cat(boxes) / image
    targets = {
        "img": images,
        "batch_idx": torch.cat([torch.full((len(b),), float(i)) for i, b in enumerate(boxes)]).to(
            device
        ),
        "cls": torch.randint(0, 80, (len(xyxy), 1), generator=gen).float().to(device),
        "bboxes": torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1).to(
            device
        ),
    }

    def fixed_loss(model) -> Callable[[], torch.Tensor]:
        with torch.no_grad():
            preds = model(images)
        leaves = {
            k: (
                [t.detach().requires_grad_(True) for t in v]
                if isinstance(v, list)
                else v.detach().requires_grad_(v.is_floating_point())
            )
            for k, v in preds.items()
        }
        return lambda: model.loss(targets, leaves)[0].sum()

    step_ms, loss_ms = _measure(
        {"stock": stock, "fused": fused},
        lambda model: model.loss(targets)[0].sum(),
        fixed_loss,
        steps,
        device,
    )
    return _rows(
        "Ultralytics YOLOv8n", step_ms, loss_ms, f"ultralytics {ultralytics.__version__}"
    ), ""


# --------------------------------------------------------------------------------------------


def _rows(
    framework: str, step_ms: dict[str, float], loss_ms: dict[str, float], version: str
) -> list[dict]:
    rows = []
    for variant in ("stock", "fused"):
        rows.append(
            {
                "framework": framework,
                "variant": variant,
                "step_ms": step_ms[variant],
                "loss_ms": loss_ms[variant],
                "loss_share": loss_ms[variant] / step_ms[variant],
                "step_speedup": step_ms["stock"] / step_ms[variant],
                "loss_speedup": loss_ms["stock"] / loss_ms[variant],
                "framework_version": version,
            }
        )
    return rows


BENCHES = {"mmdet": bench_mmdet, "rtmdet": bench_rtmdet, "ultralytics": bench_ultralytics}
DEFAULT_IMAGE = {"mmdet": 800, "rtmdet": 640, "ultralytics": 640}


def _markdown(rows: list[dict], meta: dict[str, str], notes: list[str], command: str) -> str:
    lines = [
        "# One training step in the frameworks: stock vs gfl_ops (benchmarks/e2e_frameworks.py)",
        "",
        f"Device: {meta['device_name']} ({meta['cpu_threads']} CPU threads); torch "
        f"{meta['torch']}; commit {meta['git_commit'][:10]}"
        f"{' (dirty tree)' if meta['git_dirty'] == 'yes' else ''}; {meta['date_utc']} UTC.",
        f"Command: `{command}`",
        "",
        "| framework | variant | image | step ms | loss fwd+bwd ms | loss share of step |"
        " step speed-up | loss speed-up |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['framework']} ({r['framework_version']}) | {r['variant']} | "
            f"{r['image']} | {r['step_ms']:.1f} | {r['loss_ms']:.1f} | "
            f"{r['loss_share']:.1%} | {r['step_speedup']:.2f}x | "
            f"{r['loss_speedup']:.2f}x |"
        )
    lines += ["", *(f"- {n}" for n in notes if n)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (median)")
    ap.add_argument(
        "--image",
        type=int,
        default=None,
        help="square image side in pixels (default: mmdet 800, rtmdet and ultralytics 640)",
    )
    ap.add_argument("--frameworks", default="mmdet,rtmdet,ultralytics")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    meta = csvio.run_metadata(device, "e2e-frameworks")
    rows, notes = [], []
    for name in args.frameworks.split(","):
        started = time.perf_counter()
        image = args.image or DEFAULT_IMAGE[name]
        got, note = BENCHES[name](device, image, args.steps)
        notes.append(note)
        for r in got:
            r.update(meta, steps=args.steps, image=f"{image}x{image}", notes=note)
            print(
                f"{r['framework']:<40} {r['variant']:<6} step {r['step_ms']:8.1f} ms  loss "
                f"{r['loss_ms']:7.1f} ms  share {r['loss_share']:6.1%}  step x"
                f"{r['step_speedup']:.2f}  loss x{r['loss_speedup']:.2f}"
            )
        rows += got
        print(f"# {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    stem = f"e2e-frameworks-{device.type}-{csvio.slug(meta['device_name'].split(' (')[0])}"
    csv_file = args.out / f"{stem}.csv"
    if csv_file.exists():
        csv_file.unlink()
    csvio.append_rows(csv_file, rows, FIELDS)
    command = "python -m benchmarks.e2e_frameworks " + " ".join(argv or sys.argv[1:])
    (args.out / f"{stem}.md").write_text(_markdown(rows, meta, notes, command.strip()))
    print(f"# wrote {csv_file} and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
