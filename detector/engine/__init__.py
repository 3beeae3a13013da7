"""Training and evaluation engine: what runs behind ``python -m detector.train`` / ``.eval``.

* single process, or one process per GPU/CPU-worker under ``torchrun`` (DistributedDataParallel;
  NCCL on CUDA, gloo on CPU), multi-node included (``torchrun --nnodes ...``);
* AMP on GPU: ``bf16`` autocast, or ``fp16`` autocast with a ``GradScaler``;
* SGD with mmdetection's schedule: linear warmup, step decay at given epochs;
* tqdm progress (loss components, lr, ETA of the whole run), CSV and TensorBoard logs;
* periodic COCO evaluation (+ score–IoU Pearson) on the validation set;
* checkpoints (``latest.pth`` at epoch ends, every ``checkpoint_interval_iters`` iterations and
  on SIGINT/SIGTERM; ``epoch_N.pth`` kept) holding everything needed for an *exact* resume: model,
  optimiser, scheduler, grad scaler, RNG states, epoch and iteration within the epoch. The data
  order and augmentation are functions of ``(seed, epoch, position)`` (see
  :mod:`detector.data.loader`), so a resumed run sees exactly the batches an uninterrupted one
  would, and (on CPU, or with ``deterministic``) computes the same losses bit for bit.

One job per module:

``loop``           :class:`Trainer`: sets a run up and steps it through its schedule
``distributed``    process group, DDP wrapping, the collectives (means, flags, gathers)
``amp``            mixed-precision modes and their autocast context
``optim``          optimiser, lr scaling, warmup + step schedule
``datasets``       training / validation datasets of an experiment
``checkpointing``  what a run saves; resume compatibility and exact restore
``stopping``       SIGINT/SIGTERM and ``stop_after_iters``; :class:`TrainingInterrupted`
``logs``           console / ``train.log`` set-up, CSV logs, TensorBoard, ETA
``evaluation``     the evaluation loop over a dataset (metrics from :mod:`detector.metrics`)
"""

from __future__ import annotations

from .amp import autocast_context, check_amp
from .datasets import build_datasets
from .distributed import DistContext, init_distributed
from .evaluation import evaluate
from .logs import CSVLog, read_csv, setup_logging
from .loop import Trainer, seed_everything
from .optim import WarmupStepSchedule
from .stopping import TrainingInterrupted

__all__ = [
    "Trainer",
    "TrainingInterrupted",
    "WarmupStepSchedule",
    "evaluate",
    "build_datasets",
    "DistContext",
    "init_distributed",
    "setup_logging",
    "seed_everything",
    "autocast_context",
    "check_amp",
    "CSVLog",
    "read_csv",
]
