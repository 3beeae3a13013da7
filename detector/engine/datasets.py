"""The datasets of a run: training and validation sets from an experiment's data config."""

from __future__ import annotations

import os

from ..config import ExperimentConfig
from ..data.coco import CocoDetection
from ..data.transforms import TransformConfig

__all__ = ["build_datasets"]


def build_datasets(
    cfg: ExperimentConfig,
    train_ann: str | os.PathLike | None,
    train_images: str | os.PathLike | None,
    val_ann: str | os.PathLike | None,
    val_images: str | os.PathLike | None,
) -> tuple[CocoDetection | None, CocoDetection | None]:
    """Training (flip, empty images dropped, undecodable images skipped) and validation
    (no flip, every image, undecodable images dropped from the evaluation) datasets."""
    d = cfg.data
    train = val = None
    if train_ann is not None:
        train = CocoDetection(
            train_ann,
            train_images,
            TransformConfig(tuple(d.img_scale), d.flip_prob, tuple(d.mean), tuple(d.std)),
            filter_empty=d.filter_empty,
            on_bad_image="skip",
            seed=cfg.train.seed,
        )
    if val_ann is not None:
        val = CocoDetection(
            val_ann,
            val_images,
            TransformConfig(tuple(d.img_scale), 0.0, tuple(d.mean), tuple(d.std)),
            filter_empty=False,
            on_bad_image="drop",
        )
    if train is not None and val is not None and train.cat_ids != val.cat_ids:
        raise ValueError(
            f"{val_ann}: categories {val.cat_ids} differ from the training set's "
            f"({train_ann}: {train.cat_ids})"
        )
    return train, val
