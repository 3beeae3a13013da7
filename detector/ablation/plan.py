"""What a sweep trains: the budget (how long and how large each run is), and one run per
(study, setting, seed), each with the key that identifies its experiment.

A run's key is a hash of everything that changes its result -- the resolved model config (a
setting's overrides on the base config, defaults filled in), data pipeline, schedule, seed
and dataset -- and of nothing else (not the study or setting name, device, workers, logging or
checkpointing). Settings of different studies that are the same experiment (table3's '+ QFL'
and beta's 'β = 2') therefore share one run.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..config import ExperimentConfig, ModelConfig, apply_overrides, get_config
from .data import DatasetSpec
from .studies import Study

__all__ = ["Budget", "BUDGETS", "RunSpec", "base_config", "plan_runs", "run_key", "budget_id"]


@dataclass(frozen=True)
class Budget:
    """How much training each run gets. ``None`` keeps the base config's value.

    ``epochs``: the lr steps are scaled with it (the schedule keeps its shape);
    ``img_size``: the longer image side (``data.img_scale = (S, S)``, aspect kept);
    ``max_train_images`` / ``max_val_images``: cut the dataset to its first N images;
    ``model`` / ``data``: extra ``ModelConfig`` / ``DataConfig`` fields.
    """

    name: str
    epochs: int | None = None
    img_size: int | None = None
    max_train_images: int | None = None
    max_val_images: int | None = None
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    note: str = ""


BUDGETS: dict[str, Budget] = {
    # the main job's config (gfl_r18_synthetic_cpu: ResNet-18 from scratch, AdamW, 224 px, all
    # 600 embedded training images, batch 8) for 8 of its 9 epochs (608 iterations, lr / 10 for
    # the last): 7.2 min per run measured on this project's 2-core CPU, so table3 + beta with 3
    # seeds (24 distinct runs) take ~2.9 h; details in detector/ablation/__main__.py's docstring.
    "default": Budget(
        "default", epochs=8, img_size=224, note="main job config, 8 epochs (608 iterations), 224 px"
    ),
    # seconds per run: to test the machinery, never to read the numbers
    "smoke": Budget(
        "smoke",
        epochs=1,
        img_size=64,
        max_train_images=16,
        max_val_images=8,
        model=dict(fpn_channels=16, feat_channels=16, stacked_convs=1, gn_groups=4, nms_pre=100),
        data=dict(batch_size=8, eval_batch_size=8, num_workers=0),
        note="1 epoch of 16 images at 64 px, a slim head: tests the machinery only",
    ),
    # the base config exactly as named (e.g. --config gfl_r50_1x_coco on COCO: the paper's 1x)
    "full": Budget("full", note="the base config's own schedule and image size"),
}


@dataclass
class RunSpec:
    """One (study, setting, seed) of a sweep and the experiment that produces it."""

    study: str
    setting: str
    seed: int
    key: str
    config: ExperimentConfig


def _scaled_steps(steps: tuple[int, ...], old: int, new: int) -> tuple[int, ...]:
    # keep the decays at the same fraction of the schedule, at least one epoch before its end
    return tuple(
        sorted({min(max(1, round(s * new / old)), max(new - 1, 1)) for s in steps if s < old})
    )


def base_config(
    config_name: str,
    budget: Budget,
    overrides: list[str] | tuple[str, ...] = (),
    epochs: int | None = None,
    img_size: int | None = None,
) -> ExperimentConfig:
    """The named config with the budget, then ``epochs`` / ``img_size`` and the ``--set``
    overrides applied; evaluation and periodic checkpoints are the runner's business."""
    cfg = get_config(config_name)
    cfg.model.update(budget.model)
    for k, v in budget.data.items():
        setattr(cfg.data, k, v)
    epochs = epochs if epochs is not None else budget.epochs
    if epochs is not None and epochs != cfg.train.epochs:
        cfg.train.lr_steps = _scaled_steps(tuple(cfg.train.lr_steps), cfg.train.epochs, epochs)
        cfg.train.epochs = epochs
    img_size = img_size if img_size is not None else budget.img_size
    if img_size is not None:
        cfg.data.img_scale = (img_size, img_size)
    cfg.train.eval_interval = 0  # the worker evaluates once, timed apart from training
    cfg.train.checkpoint_interval = 0  # latest.pth alone is enough to resume
    apply_overrides(cfg, overrides)
    return cfg


# fields that do not change what a run computes
_IGNORED = {
    "data": {"num_workers", "eval_batch_size"},
    "train": {
        "log_interval",
        "eval_interval",
        "checkpoint_interval",
        "checkpoint_interval_iters",
        "keep_checkpoints",
    },
    "model": {"gfl_backend", "extra"},
}


def _identity(cfg: ExperimentConfig, dataset: DatasetSpec, with_seed: bool) -> dict[str, Any]:
    d = cfg.to_dict()
    d.pop("name")
    d["model"] = ModelConfig.from_dict(d["model"]).to_dict()  # defaults filled in, validated
    for section, names in _IGNORED.items():
        for n in names:
            d[section].pop(n, None)
    if not with_seed:
        d["train"].pop("seed")
    d["dataset"] = dataset.ident
    return d


def _hash(obj: Any, n: int) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def run_key(cfg: ExperimentConfig, dataset: DatasetSpec) -> str:
    """12 hex digits identifying the experiment ``cfg`` on ``dataset`` (see module doc)."""
    return _hash(_identity(cfg, dataset, with_seed=True), 12)


def budget_id(base: ExperimentConfig, dataset: DatasetSpec) -> str:
    """8 hex digits identifying a sweep's conditions (base config + dataset, no setting or
    seed): the rows of one study that can be averaged together share it."""
    return _hash(_identity(base, dataset, with_seed=False), 8)


def plan_runs(
    studies: list[Study], seeds: list[int], base: ExperimentConfig, dataset: DatasetSpec
) -> list[RunSpec]:
    """Every (study, setting, seed), seed-major: the first seed of every setting comes first,
    so a sweep stopped half-way has whole seeds to compare."""
    specs = []
    for seed in seeds:
        for study in studies:
            for s in study.settings:
                cfg = copy.deepcopy(base)
                cfg.name = f"{base.name}/{study.name}/{s.name}"
                cfg.model.update(s.model)
                cfg.train.seed = seed
                specs.append(RunSpec(study.name, s.name, seed, run_key(cfg, dataset), cfg))
    return specs
