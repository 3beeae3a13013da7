"""Where a sweep's images come from: the embedded shapes dataset (the main job's) or any
COCO-format folder, optionally cut to its first N training / validation images."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..data.synthetic import GENERATOR_VERSION, SyntheticConfig, generate_dataset

__all__ = ["DatasetSpec", "embedded_dataset", "coco_folder", "resolve_dataset", "subset"]


@dataclass(frozen=True)
class DatasetSpec:
    """The four inputs of a training run, and ``ident``: a short stable description of the data
    that goes into every run key (a different dataset never reuses a finished run)."""

    name: str
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path
    ident: str

    def paths(self) -> dict[str, str]:
        """Absolute paths as strings (what a worker process reads)."""
        return {
            k: str(Path(getattr(self, k)).resolve())
            for k in ("train_ann", "train_images", "val_ann", "val_images")
        }


def embedded_dataset(root: str | os.PathLike, progress: bool = False) -> DatasetSpec:
    """The main job's shapes dataset (default generator parameters) under ``root``, generated
    there first if it is missing or stale (about 20 s)."""
    cfg = SyntheticConfig()
    p = generate_dataset(root, cfg, progress=progress)
    ident = f"embedded:v{GENERATOR_VERSION}:seed{cfg.seed}:{cfg.num_train}/{cfg.num_val}"
    return DatasetSpec(
        "embedded", p["train_ann"], p["train_images"], p["val_ann"], p["val_images"], ident
    )


def _find_split(folder: Path, split: str) -> tuple[Path, Path]:
    anns = sorted((folder / "annotations").glob(f"instances_{split}*.json"))
    if len(anns) != 1:
        found = ", ".join(a.name for a in anns) or "none"
        raise FileNotFoundError(
            f"{folder}: expected exactly one annotations/instances_{split}*.json (found {found}); "
            "pass the files explicitly with --train-ann/--train-images/--val-ann/--val-images"
        )
    ann = anns[0]
    images = folder / ann.stem[len("instances_") :]  # instances_val2017.json -> val2017/
    if not images.is_dir():
        raise FileNotFoundError(f"{folder}: no image folder {images.name}/ beside {ann}")
    return ann, images


def coco_folder(folder: str | os.PathLike) -> DatasetSpec:
    """A COCO-format folder: ``annotations/instances_train*.json`` + the image folder named by
    its suffix (``train2017/``, ``train/``), and the same for ``val``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: dataset folder not found")
    train_ann, train_images = _find_split(folder, "train")
    val_ann, val_images = _find_split(folder, "val")
    return DatasetSpec(
        folder.name,
        train_ann,
        train_images,
        val_ann,
        val_images,
        _ident(folder.name, train_ann, val_ann),
    )


def _ident(name: str, train_ann: Path, val_ann: Path) -> str:
    # file names and sizes, not absolute paths: a moved folder keeps its finished runs
    return (
        f"coco:{name}:{train_ann.name}:{train_ann.stat().st_size}:"
        f"{val_ann.name}:{val_ann.stat().st_size}"
    )


def resolve_dataset(
    data: str,
    embedded_root: str | os.PathLike,
    files: dict[str, str | None] | None = None,
    progress: bool = False,
) -> DatasetSpec:
    """``data`` is 'embedded' or a COCO-format folder; ``files`` (train_ann, train_images,
    val_ann, val_images), when all four are given, name the inputs directly."""
    if files and all(files.values()):
        paths = {k: Path(v) for k, v in files.items()}  # type: ignore[arg-type]
        for k, v in paths.items():
            if not v.exists():
                raise FileNotFoundError(f"{v}: {k} not found")
        return DatasetSpec(
            paths["train_ann"].parent.name,
            paths["train_ann"],
            paths["train_images"],
            paths["val_ann"],
            paths["val_images"],
            _ident(paths["train_ann"].parent.name, paths["train_ann"], paths["val_ann"]),
        )
    if files and any(files.values()):
        raise ValueError("--train-ann, --train-images, --val-ann and --val-images go together")
    if data == "embedded":
        return embedded_dataset(embedded_root, progress)
    return coco_folder(data)


def _write_subset(src: Path, dst: Path, n: int) -> int:
    """The first ``n`` images of ``src`` (file order) with their annotations, to ``dst``."""
    data = json.loads(src.read_text())
    images = data["images"][:n]
    keep = {im["id"] for im in images}
    out = {
        **data,
        "images": images,
        "annotations": [a for a in data["annotations"] if a["image_id"] in keep],
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, dst)
    return len(images)


def subset(
    spec: DatasetSpec, max_train: int | None, max_val: int | None, cache_dir: str | os.PathLike
) -> DatasetSpec:
    """``spec`` cut to its first ``max_train`` / ``max_val`` images (None: all); the cut
    annotation files are written once under ``cache_dir``."""
    if max_train is None and max_val is None:
        return spec
    cache = Path(cache_dir)
    tag = spec.ident.replace(":", "_").replace("/", "-")
    train_ann, val_ann, ident = spec.train_ann, spec.val_ann, spec.ident
    if max_train is not None:
        train_ann = cache / tag / f"train_first{max_train}.json"
        if not train_ann.is_file():
            _write_subset(spec.train_ann, train_ann, max_train)
        ident += f":train{max_train}"
    if max_val is not None:
        val_ann = cache / tag / f"val_first{max_val}.json"
        if not val_ann.is_file():
            _write_subset(spec.val_ann, val_ann, max_val)
        ident += f":val{max_val}"
    return replace(spec, train_ann=train_ann, val_ann=val_ann, ident=ident)
