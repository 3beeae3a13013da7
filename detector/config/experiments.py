"""The named experiments (``CONFIGS``; see :mod:`detector.config` for what each one is)."""

from __future__ import annotations

from .schema import DataConfig, ExperimentConfig, TrainConfig


def _gfl_r50_1x_coco() -> ExperimentConfig:
    return ExperimentConfig(
        name="gfl_r50_1x_coco",
        model=dict(
            depth=50,
            num_classes=80,
            variant="gfl",
            reg_max=16,
            pretrained="IMAGENET1K_V1",
            frozen_stages=1,
            norm_eval=True,
        ),
        data=DataConfig(img_scale=(1333, 800), flip_prob=0.5, batch_size=2, num_workers=2),
        train=TrainConfig(
            epochs=12,
            lr=0.01,
            base_batch_size=16,
            momentum=0.9,
            weight_decay=1e-4,
            warmup_iters=500,
            warmup_ratio=0.001,
            lr_steps=(8, 11),
            lr_gamma=0.1,
            grad_clip=None,
            checkpoint_interval_iters=2000,
            log_interval=50,
        ),
    )


def _gfl_r18_synthetic_cpu() -> ExperimentConfig:
    # From scratch (no pretrained weights offline): BN trained, nothing frozen, AdamW with a short
    # warmup, 224-px inputs and a slim FPN/head: 684 iterations of 8 images, ~0.75 s each on 2
    # idle CPU cores. Measured with `python -m detector.main_job` (commit 4a76b4a, idle machine):
    # 9.0 min wall in all, AP50 0.758; 12.6 min on 2 cores shared with other jobs (a
    # longer-schedule probe: AP50 0.26 after 4 epochs, 0.69 after 8 at constant lr).
    return ExperimentConfig(
        name="gfl_r18_synthetic_cpu",
        model=dict(
            depth=18,
            num_classes=4,
            variant="gfl",
            reg_max=8,
            pretrained=None,
            frozen_stages=-1,
            norm_eval=False,
            fpn_channels=64,
            feat_channels=64,
            stacked_convs=2,
            gn_groups=16,
            nms_pre=300,
        ),
        data=DataConfig(
            img_scale=(224, 224), flip_prob=0.5, batch_size=8, eval_batch_size=8, num_workers=1
        ),
        train=TrainConfig(
            epochs=9,
            optimizer="adamw",
            lr=1e-3,
            base_batch_size=8,
            weight_decay=1e-4,
            warmup_iters=100,
            warmup_ratio=0.01,
            lr_steps=(8,),
            lr_gamma=0.1,
            grad_clip=10.0,
            eval_interval=0,
            checkpoint_interval=0,
            checkpoint_interval_iters=100,
            log_interval=5,
        ),
    )


def _gfl_tiny_test() -> ExperimentConfig:
    return ExperimentConfig(
        name="gfl_tiny_test",
        model=dict(
            depth=18,
            num_classes=4,
            variant="gfl",
            reg_max=4,
            pretrained=None,
            frozen_stages=-1,
            norm_eval=True,
            fpn_channels=16,
            feat_channels=16,
            stacked_convs=1,
            gn_groups=4,
            nms_pre=100,
        ),
        data=DataConfig(
            img_scale=(128, 128),
            flip_prob=0.5,
            batch_size=2,
            eval_batch_size=2,
            num_workers=0,
            group_by_aspect=False,
        ),
        train=TrainConfig(
            epochs=2,
            lr=0.01,
            base_batch_size=2,
            warmup_iters=4,
            warmup_ratio=0.1,
            lr_steps=(1,),
            grad_clip=10.0,
            eval_interval=1,
            checkpoint_interval=1,
            log_interval=1,
        ),
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
