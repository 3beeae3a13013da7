"""Every configuration of the detector, in one package (``from detector.config import ...``).

:class:`ModelConfig` holds every option of the network (read by :mod:`detector.models`), with
mmdetection's GFL R50 1x values as defaults; :class:`ExperimentConfig` a whole run: the model's
keyword arguments (``ModelConfig`` fields), the data pipeline (:class:`DataConfig`) and the
optimisation schedule (:class:`TrainConfig`). Named experiments:

``gfl_r50_1x_coco``
    mmdetection's ``gfl_r50_fpn_1x_coco`` (mmdetection 3.x ``configs/gfl/gfl_r50_fpn_1x_coco.py``
    with its ``_base_`` COCO dataset and 1x schedule; the AP from ``configs/gfl/metafile.yml``):
    ImageNet ResNet-50, frozen stem + stage 1, frozen BN; 1333×800 keep-ratio, flip 0.5; SGD lr
    0.01 for a total batch of 16 (2 images × 8 GPUs), momentum 0.9, wd 1e-4, linear warmup 500
    iterations from 0.001, ×0.1 at epochs 8 and 11, 12 epochs. 40.2 AP on COCO val2017 in
    mmdetection.
``gfl_r18_synthetic_cpu``
    the main job: ResNet-18 from scratch (BN trained, nothing frozen), a slim FPN and head,
    224-px inputs of the embedded shapes dataset, AdamW, 9 epochs; reaches AP50 0.76 on its
    validation split in 9.0 min on two idle CPU cores (measured with ``make demo`` from a fresh
    clone; 12.6 min on two busy ones).
``gfl_tiny_test``
    a very small model for the test-suite (seconds per step on CPU). Not meant to learn much.

Modules: :mod:`.schema` (the types), :mod:`.experiments` (the named configs),
:mod:`.overrides` (dotted-key overrides):
``apply_overrides(cfg, ["train.lr=0.02", "model.reg_max=8"])``.
"""

from .experiments import CONFIGS, get_config
from .overrides import apply_overrides
from .schema import (
    BOX_REPRS,
    CLS_LOSSES,
    VARIANTS,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = [
    "ModelConfig",
    "VARIANTS",
    "BOX_REPRS",
    "CLS_LOSSES",
    "DataConfig",
    "TrainConfig",
    "ExperimentConfig",
    "CONFIGS",
    "get_config",
    "apply_overrides",
]
