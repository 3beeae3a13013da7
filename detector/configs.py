"""Named experiment configurations and command-line overrides.

An :class:`ExperimentConfig` bundles the model's keyword arguments (``ModelConfig`` fields, see
``detector/models/config.py``), the data pipeline (:class:`DataConfig`) and the optimisation
schedule (:class:`TrainConfig`). Named configs:

``gfl_r50_1x_coco``
    mmdetection's ``gfl_r50_fpn_1x_coco`` (DESIGN.md §7): ImageNet ResNet-50, frozen stem + stage
    1, frozen BN; 1333×800 keep-ratio, flip 0.5; SGD lr 0.01 for a total batch of 16 (2 images ×
    8 GPUs), momentum 0.9, wd 1e-4, linear warmup 500 iterations from 0.001, ×0.1 at epochs 8 and
    11, 12 epochs. 40.2 AP on COCO val2017 in mmdetection.
``gfl_r18_synthetic_cpu``
    the main job: ResNet-18 from scratch (BN trained, nothing frozen), a slim FPN and head,
    224-px inputs of the embedded shapes dataset, AdamW, 9 epochs; reaches AP50 0.76 on its
    validation split in 9.0 min on two idle CPU cores (measured with ``make demo`` from a fresh
    clone; 12.6 min on two busy ones).
``gfl_tiny_test``
    a very small model for the test-suite (seconds per step on CPU). Not meant to learn much.

Overrides use dotted keys: ``apply_overrides(cfg, ["train.lr=0.02", "model.reg_max=8"])``.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class DataConfig:
    """Data pipeline parameters. ``batch_size`` is per process (per GPU)."""

    img_scale: tuple[int, int] = (1333, 800)  # (long, short) edge bounds, keep ratio
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size_divisor: int = 32
    batch_size: int = 2
    eval_batch_size: int = 1
    num_workers: int = 2
    filter_empty: bool = True  # training drops images without boxes
    group_by_aspect: bool = True  # batches of only landscape or only portrait images


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Epochs/iterations count from 0.

    ``lr`` is for a total batch of ``base_batch_size``; with ``auto_scale_lr`` it is scaled
    linearly to the actual total batch (``batch_size × world_size``). ``lr_steps`` are the epochs
    at whose start the lr is multiplied by ``lr_gamma`` (mmdetection's ``step=[8, 11]``).
    ``checkpoint_interval_iters`` additionally writes ``latest.pth`` every so many iterations
    (0: only at epoch ends and on SIGINT/SIGTERM).
    """

    epochs: int = 12
    lr: float = 0.01
    base_batch_size: int = 16
    auto_scale_lr: bool = False
    optimizer: str = "sgd"  # 'sgd' (mmdetection) | 'adamw' (momentum unused)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    lr_steps: tuple[int, ...] = (8, 11)
    lr_gamma: float = 0.1
    grad_clip: float | None = None  # max global L2 norm, None: no clipping
    amp: str = "none"  # 'none' | 'bf16' | 'fp16'
    eval_interval: int = 1  # epochs; 0 disables periodic evaluation (final one still runs)
    checkpoint_interval: int = 1  # epochs between kept epoch_N.pth files
    checkpoint_interval_iters: int = 0
    keep_checkpoints: int = 3  # epoch_N.pth files kept (latest.pth always)
    log_interval: int = 20  # iterations between CSV/TensorBoard rows
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    sync_bn: bool = False  # SyncBatchNorm across GPUs (for trainable BN, multi-GPU CUDA only)


@dataclass
class ExperimentConfig:
    """A full experiment: ``model`` holds ``ModelConfig`` keyword arguments (``num_classes`` is
    taken from the training dataset)."""

    name: str
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        d = copy.deepcopy(d)
        data = _dataclass_from_dict(DataConfig, d.get("data", {}), "data")
        train = _dataclass_from_dict(TrainConfig, d.get("train", {}), "train")
        unknown = set(d) - {"name", "model", "data", "train"}
        if unknown:
            raise ValueError(f"unknown ExperimentConfig keys {sorted(unknown)}")
        return cls(name=d.get("name", "custom"), model=dict(d.get("model", {})), data=data,
                   train=train)


def _dataclass_from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"unknown {where} config keys {sorted(unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        if isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def _gfl_r50_1x_coco() -> ExperimentConfig:
    return ExperimentConfig(
        name="gfl_r50_1x_coco",
        model=dict(depth=50, num_classes=80, variant="gfl", reg_max=16,
                   pretrained="IMAGENET1K_V1", frozen_stages=1, norm_eval=True),
        data=DataConfig(img_scale=(1333, 800), flip_prob=0.5, batch_size=2, num_workers=2),
        train=TrainConfig(epochs=12, lr=0.01, base_batch_size=16, momentum=0.9,
                          weight_decay=1e-4, warmup_iters=500, warmup_ratio=0.001,
                          lr_steps=(8, 11), lr_gamma=0.1, grad_clip=None,
                          checkpoint_interval_iters=2000, log_interval=50),
    )


def _gfl_r18_synthetic_cpu() -> ExperimentConfig:
    # From scratch (no pretrained weights offline): BN trained, nothing frozen, AdamW with a short
    # warmup, 224-px inputs and a slim FPN/head: 684 iterations of 8 images, ~0.75 s each on 2
    # idle CPU cores. Measured with `python -m detector.main_job` (commit 4a76b4a, idle machine):
    # 9.0 min wall in all, AP50 0.758; 12.6 min on 2 cores shared with other jobs (a
    # longer-schedule probe: AP50 0.26 after 4 epochs, 0.69 after 8 at constant lr).
    return ExperimentConfig(
        name="gfl_r18_synthetic_cpu",
        model=dict(depth=18, num_classes=4, variant="gfl", reg_max=8, pretrained=None,
                   frozen_stages=-1, norm_eval=False, fpn_channels=64, feat_channels=64,
                   stacked_convs=2, gn_groups=16, nms_pre=300),
        data=DataConfig(img_scale=(224, 224), flip_prob=0.5, batch_size=8, eval_batch_size=8,
                        num_workers=1),
        train=TrainConfig(epochs=9, optimizer="adamw", lr=1e-3, base_batch_size=8,
                          weight_decay=1e-4, warmup_iters=100, warmup_ratio=0.01,
                          lr_steps=(8,), lr_gamma=0.1, grad_clip=10.0,
                          eval_interval=0, checkpoint_interval=0,
                          checkpoint_interval_iters=100, log_interval=5),
    )


def _gfl_tiny_test() -> ExperimentConfig:
    return ExperimentConfig(
        name="gfl_tiny_test",
        model=dict(depth=18, num_classes=4, variant="gfl", reg_max=4, pretrained=None,
                   frozen_stages=-1, norm_eval=True, fpn_channels=16, feat_channels=16,
                   stacked_convs=1, gn_groups=4, nms_pre=100),
        data=DataConfig(img_scale=(128, 128), flip_prob=0.5, batch_size=2, eval_batch_size=2,
                        num_workers=0, group_by_aspect=False),
        train=TrainConfig(epochs=2, lr=0.01, base_batch_size=2, warmup_iters=4,
                          warmup_ratio=0.1, lr_steps=(1,), grad_clip=10.0,
                          eval_interval=1, checkpoint_interval=1, log_interval=1),
    )


CONFIGS = {
    "gfl_r50_1x_coco": _gfl_r50_1x_coco,
    "gfl_r18_synthetic_cpu": _gfl_r18_synthetic_cpu,
    "gfl_tiny_test": _gfl_tiny_test,
}


def get_config(name: str) -> ExperimentConfig:
    """A fresh copy of the named config (``KeyError`` listing the names if unknown)."""
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; available: {', '.join(sorted(CONFIGS))}")
    return CONFIGS[name]()


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return text  # a bare string


def apply_overrides(cfg: ExperimentConfig, overrides: Iterable[str]) -> ExperimentConfig:
    """Apply ``section.key=value`` overrides (``value`` parsed as a Python literal, else a
    string). ``model.*`` keys are checked against ``ModelConfig`` when the model is built;
    ``data.*``/``train.*`` keys must exist. Returns ``cfg`` (modified in place)."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        key, text = item.split("=", 1)
        section, name = key.strip().split(".", 1)
        value = _parse_value(text.strip())
        if isinstance(value, list):
            value = tuple(value)
        if section == "model":
            cfg.model[name] = value
        elif section in ("data", "train"):
            target = getattr(cfg, section)
            if not hasattr(target, name):
                valid = sorted(f.name for f in dataclasses.fields(target))
                raise ValueError(f"unknown {section} key {name!r} in override {item!r}; "
                                 f"valid: {valid}")
            setattr(target, name, value)
        else:
            raise ValueError(f"override {item!r}: section must be model, data or train")
    return cfg
