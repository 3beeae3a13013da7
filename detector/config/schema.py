"""The detector's configuration types: what every option means and which values it takes.

:class:`ModelConfig` holds every option of the network (read by :mod:`detector.models`), with
mmdetection's GFL R50 1x values as defaults; :class:`ExperimentConfig` a whole run: the model's
keyword arguments (``ModelConfig`` fields), the data pipeline (:class:`DataConfig`) and the
optimisation schedule (:class:`TrainConfig`). The named experiments are in
:mod:`detector.config.experiments`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

# ============================================================================================
# the model
# ============================================================================================

# variant -> (classification loss is QFL, box regression is a General distribution with DFL)
#   atss: focal loss + centre-ness branch, GIoU on a Dirac (delta-coded) box   (Table 3, row 1)
#   qfl:  QFL joint score, GIoU on a Dirac box                                  (Table 3, row 2)
#   dfl:  focal loss + centre-ness, General distribution with GIoU + DFL        (Table 3, row 3)
#   gfl:  QFL + General distribution with GIoU + DFL (the paper's detector)      (Table 3, row 4)
VARIANTS: dict[str, tuple[bool, bool]] = {
    "atss": (False, False),
    "qfl": (True, False),
    "dfl": (False, True),
    "gfl": (True, True),
}

# Ablation options (GFL paper Table 2(a) and the rebuttal's Table I). Left at None, each follows
# the variant, so every existing config and checkpoint (whose model dict lacks these keys)
# builds and trains exactly as before.
#   box_repr: how the head represents a box side
#     'dirac':    4 deltas of mmdetection's DeltaXYWHBBoxCoder (ATSS)
#     'gaussian': per side a mean distance (softplus, in strides) and a log-sigma; trained with
#                 GIoU on the means plus the Gaussian NLL of the paper's Table 5
#     'general':  per side a softmax over bins 0..reg_max, decoded by its integral
#   cls_loss: 'focal' (centre-ness variants), 'qfl' or 'l2' (squared error) on the joint score
BOX_REPRS: tuple[str, ...] = ("dirac", "gaussian", "general")
CLS_LOSSES: tuple[str, ...] = ("focal", "qfl", "l2")


@dataclass
class ModelConfig:
    """Configuration of :class:`detector.models.GFLDetector`.

    Defaults reproduce mmdetection's ``configs/gfl/gfl_r50_fpn_1x_coco.py``.
    """

    # --- architecture
    depth: int = 50  # torchvision ResNet depth: 18, 34, 50 or 101
    num_classes: int = 80  # foreground classes; labels are 0..num_classes-1
    variant: str = "gfl"  # 'gfl' | 'atss' | 'qfl' | 'dfl' (see VARIANTS)
    reg_max: int = 16  # DFL bins are 0..reg_max (stride units)
    pretrained: Any = None  # None | path to a checkpoint | torchvision weights
    frozen_stages: int = 1  # -1: none, 0: stem, k: stem + stages 1..k
    norm_eval: bool = True  # keep backbone BatchNorm in eval mode while training
    fpn_channels: int = 256
    feat_channels: int = 256
    stacked_convs: int = 4
    gn_groups: int = 32
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    octave_base_scale: float = 8.0  # anchor side = octave_base_scale * stride
    prior_prob: float = 0.01  # initial foreground probability of the classifier

    # --- training
    atss_topk: int = 9
    qfl_beta: float = 2.0
    focal_alpha: float = 0.25  # focal loss of the 'atss'/'dfl' variants
    focal_gamma: float = 2.0
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 2.0  # GIoU
    loss_dfl_weight: float = 0.25
    loss_centerness_weight: float = 1.0
    gfl_backend: str | None = None  # gfl_ops backend: None = auto, 'cpu', 'reference', ...
    box_repr: str | None = None  # 'dirac' | 'gaussian' | 'general'; None: the variant's
    dfl_loss: bool | None = None  # DFL on a General box; None: whenever it is General
    cls_loss: str | None = None  # 'focal' | 'qfl' | 'l2'; None: the variant's
    loss_nll_weight: float = 0.25  # Gaussian NLL, averaged over the 4 sides (as DFL)

    # --- inference
    score_thr: float = 0.05
    nms_pre: int = 1000  # top (anchor, class) pairs kept per level before NMS
    nms_iou: float = 0.6
    max_per_img: int = 100
    min_bbox_size: float = 0.0  # boxes with a side <= this are dropped

    extra: dict[str, Any] = field(default_factory=dict)  # free-form, ignored by the model

    def __post_init__(self) -> None:
        if self.depth not in (18, 34, 50, 101):
            raise ValueError(f"depth must be one of 18, 34, 50, 101, got {self.depth}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.reg_max < 1:
            raise ValueError(f"reg_max must be >= 1, got {self.reg_max}")
        self.strides = tuple(int(s) for s in self.strides)
        if len(self.strides) != 5:
            raise ValueError(f"strides must name the 5 levels P3-P7, got {self.strides}")
        self._check_ablation_options()

    def _check_ablation_options(self) -> None:
        if self.box_repr is not None and self.box_repr not in BOX_REPRS:
            raise ValueError(f"box_repr must be one of {BOX_REPRS} or None, got {self.box_repr!r}")
        if self.dfl_loss and self.box_representation != "general":
            raise ValueError(
                f"dfl_loss needs the 'general' box representation, not "
                f"{self.box_representation!r} (variant {self.variant!r})"
            )
        if self.cls_loss is not None:
            if self.cls_loss not in CLS_LOSSES:
                raise ValueError(
                    f"cls_loss must be one of {CLS_LOSSES} or None, got {self.cls_loss!r}"
                )
            # the joint score has no one-hot target for focal loss; the centre-ness variants'
            # class score has no IoU target for QFL / L2
            if (self.cls_loss == "focal") == self.joint_score:
                kind = "joint-score ('qfl', 'gfl')" if self.joint_score else "centre-ness"
                raise ValueError(
                    f"cls_loss {self.cls_loss!r} does not fit the {kind} variant {self.variant!r}"
                )

    @property
    def joint_score(self) -> bool:
        """The classifier predicts the classification-IoU joint score (no centre-ness)."""
        return VARIANTS[self.variant][0]

    @property
    def classification_loss(self) -> str:
        """'focal', 'qfl' or 'l2'."""
        if self.cls_loss is not None:
            return self.cls_loss
        return "qfl" if self.joint_score else "focal"

    @property
    def use_qfl(self) -> bool:
        return self.classification_loss == "qfl"

    @property
    def box_representation(self) -> str:
        """'dirac', 'gaussian' or 'general'."""
        if self.box_repr is not None:
            return self.box_repr
        return "general" if VARIANTS[self.variant][1] else "dirac"

    @property
    def use_dfl(self) -> bool:
        """DFL trains the General distribution."""
        if self.dfl_loss is not None:
            return self.dfl_loss
        return self.box_representation == "general"

    @property
    def with_centerness(self) -> bool:
        """The focal-loss variants rank detections with a separate centre-ness branch."""
        return not self.joint_score

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping; unknown keys are an error (a typo must not pass silently)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ============================================================================================
# a run: data, schedule, experiment; the named experiments and overrides
# ============================================================================================


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
        return cls(
            name=d.get("name", "custom"), model=dict(d.get("model", {})), data=data, train=train
        )


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
