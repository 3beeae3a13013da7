"""``python -m detector.infer``: run a checkpoint on an image or a folder of images.

For every image it writes ``OUTPUT/<name>_det.png`` (boxes, class names and scores drawn) and —
like Fig. 3 of the GFL paper — ``OUTPUT/<name>_dist.png``: the image with the top boxes numbered,
and for each of them the four learned distributions (left, top, right, bottom side) over the
``reg_max + 1`` bins, with the expected value (the box side actually predicted) marked. Flat or
bimodal distributions flag ambiguous boundaries. All detections go to ``OUTPUT/detections.json``.

Example::

    python -m detector.infer --checkpoint runs/shapes/latest.pth --input data/shapes/val \\
        --output runs/shapes/vis --score-thr 0.3 --limit 8
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

logger = logging.getLogger("detector.infer")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SIDE_NAMES = ("left", "top", "right", "bottom")


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct, deterministic RGB colour per class label."""
    palette = [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
        (0, 128, 128),
        (220, 190, 255),
        (170, 110, 40),
        (255, 250, 200),
        (128, 0, 0),
    ]
    if label < len(palette):
        return palette[label]
    rng = np.random.default_rng(label)
    return tuple(int(v) for v in rng.integers(60, 256, 3))  # type: ignore[return-value]


def draw_detections(
    image: Image.Image,
    boxes: Any,
    scores: Any,
    labels: Any,
    class_names: Sequence[str],
    score_thr: float = 0.3,
    numbered: bool = False,
) -> Image.Image:
    """A copy of ``image`` with boxes ``(K, 4)`` xyxy, ``"name score"`` captions drawn for the
    detections scoring at least ``score_thr`` (``numbered``: prefix captions with ``#i``)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    width = max(1, round(max(out.size) / 300))
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    lab = np.asarray(labels).reshape(-1)
    shown = 0
    for (x1, y1, x2, y2), sc, lb in zip(b, s, lab):
        if sc < score_thr:
            continue
        c = class_colour(int(lb))
        draw.rectangle([x1, y1, x2, y2], outline=c, width=width)
        name = class_names[int(lb)] if int(lb) < len(class_names) else str(int(lb))
        text = (f"#{shown} " if numbered else "") + f"{name} {sc:.2f}"
        tb = draw.textbbox((x1, y1), text, font=font)
        th = tb[3] - tb[1]
        ty = y1 - th - 3 if y1 - th - 3 >= 0 else y1 + 1
        draw.rectangle([x1, ty, x1 + tb[2] - tb[0] + 4, ty + th + 3], fill=c)
        draw.text((x1 + 2, ty), text, fill=(0, 0, 0), font=font)
        shown += 1
    return out


def plot_distributions(
    image: Image.Image,
    det: dict[str, Any],
    class_names: Sequence[str],
    path: str | Path,
    score_thr: float = 0.3,
    max_boxes: int = 4,
) -> bool:
    """Fig.-3-style figure: the image with the ``max_boxes`` best boxes (score >= ``score_thr``)
    numbered, and per box the four side distributions (``det['distributions']`` (K, 4, n+1)).
    Returns False (and writes nothing) when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists = det.get("distributions")
    if dists is None:
        return False
    scores = np.asarray(det["scores"], dtype=np.float64)
    keep = np.nonzero(scores >= score_thr)[0][:max_boxes]
    if keep.size == 0:
        return False
    dists = np.asarray(dists, dtype=np.float64)[keep]
    boxes = np.asarray(det["boxes"], dtype=np.float64)[keep]
    labels = np.asarray(det["labels"])[keep]
    n_bins = dists.shape[-1]
    bins = np.arange(n_bins)
    rows = len(keep)
    fig = plt.figure(figsize=(4 + 8, max(3.2, 2.0 * rows)), dpi=100)
    gs = fig.add_gridspec(rows, 5, width_ratios=[2.2, 1, 1, 1, 1], wspace=0.35, hspace=0.6)
    ax_img = fig.add_subplot(gs[:, 0])
    ax_img.imshow(
        draw_detections(image, boxes, scores[keep], labels, class_names, -1.0, numbered=True)
    )
    ax_img.set_axis_off()
    ax_img.set_title("detections (#i = row)")
    for r in range(rows):
        c = np.array(class_colour(int(labels[r]))) / 255.0
        for s in range(4):
            ax = fig.add_subplot(gs[r, 1 + s])
            p = dists[r, s]
            ax.bar(bins, p, color=c, edgecolor="black", linewidth=0.3)
            mean = float((p * bins).sum())
            ax.axvline(mean, color="black", linestyle="--", linewidth=1)
            ax.set_ylim(0, 1)
            ax.set_xlim(-0.6, n_bins - 0.4)
            ax.tick_params(labelsize=7)
            name = class_names[int(labels[r])] if int(labels[r]) < len(class_names) else "?"
            ax.set_title(f"#{r} {name} {SIDE_NAMES[s]}\nŷ={mean:.2f}", fontsize=8)
            if r == rows - 1:
                ax.set_xlabel("distance (stride units)", fontsize=7)
    fig.suptitle("learned side distributions (GFL, Fig. 3 style)", fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def list_images(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file, else the images directly inside the folder, sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS)
    raise FileNotFoundError(f"{p}: no such image or folder")


@torch.no_grad()
def run_inference(
    model: torch.nn.Module,
    ckpt: dict[str, Any],
    files: Sequence[Path],
    output: str | Path,
    device: torch.device,
    score_thr: float = 0.3,
    max_boxes_plot: int = 4,
    distributions: bool = True,
) -> list[dict[str, Any]]:
    """Detect on each file, write the drawings (see module docstring); returns per image
    ``{'file', 'detections': [{'bbox' xyxy, 'score', 'label', 'category_id', 'name'}]}``.
    Unreadable files are logged and skipped."""
    from .config import ExperimentConfig
    from .data.loader import collate
    from .data.transforms import DetectionTransform, TransformConfig

    cfg = ExperimentConfig.from_dict(ckpt["config"])
    d = cfg.data
    transform = DetectionTransform(
        TransformConfig(tuple(d.img_scale), 0.0, tuple(d.mean), tuple(d.std))
    )
    names = list(
        ckpt.get("classes", {}).get("names") or [str(i) for i in range(cfg.model["num_classes"])]
    )
    cat_ids = list(ckpt.get("classes", {}).get("cat_ids") or range(len(names)))
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            logger.error("skipping %s: cannot decode image (%s)", f, e)
            continue
        tensor, _, meta = transform(image, np.zeros((0, 4), np.float32), np.random.default_rng(0))
        images, _ = collate([(tensor, {})])
        det = model.predict(
            images.to(device),
            image_sizes=[meta["img_shape"]],
            scale_factors=[meta["scale_factor"]],
            original_sizes=[(image.height, image.width)],
            with_distributions=distributions,
        )[0]
        det = {
            k: v.detach().float().cpu().numpy() if k != "labels" else v.cpu().numpy()
            for k, v in det.items()
        }
        draw_detections(image, det["boxes"], det["scores"], det["labels"], names, score_thr).save(
            out_dir / f"{f.stem}_det.png"
        )
        if distributions:
            plot_distributions(
                image, det, names, out_dir / f"{f.stem}_dist.png", score_thr, max_boxes_plot
            )
        results.append(
            {
                "file": str(f),
                "detections": [
                    {
                        "bbox": [round(float(v), 2) for v in b],
                        "score": round(float(s), 4),
                        "label": int(lb),
                        "category_id": int(cat_ids[int(lb)]),
                        "name": names[int(lb)],
                    }
                    for b, s, lb in zip(det["boxes"], det["scores"], det["labels"])
                    if s >= score_thr
                ],
            }
        )
    (out_dir / "detections.json").write_text(json.dumps(results, indent=1))
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m detector.infer",
        description="Detect objects in an image or a folder; draw boxes and the learned "
        "side distributions (GFL Fig. 3).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1] if __doc__ else None,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint written by detector.train")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--score-thr",
        type=float,
        default=0.3,
        help="minimum score drawn / listed (default: %(default)s)",
    )
    p.add_argument("--max-boxes-plot", type=int, default=4, help="boxes per distribution plot")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of a folder")
    p.add_argument("--no-distributions", action="store_true", help="skip the Fig. 3 plots")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError, load_for_inference

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        files = list_images(args.input)
        if args.limit is not None:
            files = files[: args.limit]
        if not files:
            raise FileNotFoundError(f"{args.input}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        model, ckpt = load_for_inference(
            args.checkpoint, device, model_overrides={"score_thr": args.score_thr}
        )
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with_dist = not args.no_distributions and (
        getattr(model.cfg, "box_representation", "general") == "general"
    )
    results = run_inference(
        model, ckpt, files, args.output, device, args.score_thr, args.max_boxes_plot, with_dist
    )
    n = sum(len(r["detections"]) for r in results)
    print(
        f"{len(results)} images, {n} detections with score >= {args.score_thr}; "
        f"drawings in {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
