"""Training and evaluation engine: the loop behind ``python -m detector.train`` / ``.eval``.

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
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    diff_model_configs,
    load_model_state,
    read_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unwrap,
)
from .config import ExperimentConfig
from .data.coco import CocoDetection
from .data.loader import build_eval_loader, build_train_loader
from .data.transforms import TransformConfig
from .metrics import (
    detections_to_coco,
    evaluate_detections,
    format_metrics_table,
    write_metrics,
)

logger = logging.getLogger("detector")


# ============================================================================================
# process setup
# ============================================================================================


@dataclass
class DistContext:
    """Where this process stands: ``rank``/``world_size`` (global), ``local_rank``, ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Initialise ``torch.distributed`` from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) if present, else run single-process.

    ``device``: ``'cpu'``, ``'cuda'`` or None (CUDA when available). Under torchrun with CUDA each
    process takes ``cuda:LOCAL_RANK``; the backend is NCCL on CUDA and gloo on CPU.
    """
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} requested but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo",
                                    device_id=dev if want_cuda else None)
        return DistContext(rank, world, local_rank, dev)
    if want_cuda:
        dev = torch.device(device if device and ":" in device else "cuda")
    else:
        dev = torch.device("cpu")
    return DistContext(device=dev)


def setup_logging(output_dir: str | os.PathLike | None, rank: int = 0,
                  filename: str = "train.log") -> None:
    """INFO to stderr on rank 0 (WARNING elsewhere) and, on rank 0, to ``output_dir/filename``."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_detector_handler", False):
            root.removeHandler(h)
            h.close()
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    sh.setLevel(level)
    sh._detector_handler = True  # type: ignore[attr-defined]
    root.addHandler(sh)
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(output_dir) / filename)
        fh.setFormatter(fmt)
        fh.setLevel(logging.INFO)
        fh._detector_handler = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    root.setLevel(logging.INFO)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def autocast_context(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` in ``{'none', 'bf16', 'fp16'}`` (a no-op for 'none')."""
    if amp == "none":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_amp(amp: str, device: torch.device) -> None:
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("fp16 AMP needs a CUDA device; use --amp bf16 or --amp none on CPU")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use --amp fp16")


# ============================================================================================
# datasets
# ============================================================================================


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
            train_ann, train_images,
            TransformConfig(tuple(d.img_scale), d.flip_prob, tuple(d.mean), tuple(d.std)),
            filter_empty=d.filter_empty, on_bad_image="skip", seed=cfg.train.seed)
    if val_ann is not None:
        val = CocoDetection(
            val_ann, val_images,
            TransformConfig(tuple(d.img_scale), 0.0, tuple(d.mean), tuple(d.std)),
            filter_empty=False, on_bad_image="drop")
    if train is not None and val is not None and train.cat_ids != val.cat_ids:
        raise ValueError(
            f"{val_ann}: categories {val.cat_ids} differ from the training set's "
            f"({train_ann}: {train.cat_ids})")
    return train, val


# ============================================================================================
# evaluation
# ============================================================================================


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: CocoDetection,
    ctx: DistContext,
    batch_size: int = 1,
    num_workers: int = 2,
    amp: str = "none",
    progress: bool = True,
    max_images: int | None = None,
    with_distributions: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``model`` over ``dataset`` (sharded over ranks) and compute the COCO metrics.

    Returns ``(metrics, detections)`` on every rank (metrics from :func:`evaluate_detections`,
    detections in COCO result format, gathered from all ranks). Images that cannot be decoded
    are left out of the evaluation and counted in ``metrics['skipped_images']``.
    """
    from tqdm import tqdm

    net = unwrap(model)
    was_training = net.training
    net.eval()
    subset: Any = dataset
    if max_images is not None and max_images < len(dataset):
        subset = torch.utils.data.Subset(dataset, range(max_images))
    loader = build_eval_loader(subset, batch_size=batch_size, num_workers=num_workers,
                               size_divisor=32, rank=ctx.rank, world_size=ctx.world_size)
    dets: list[dict[str, Any]] = []
    done_ids: list[int] = []
    bar = tqdm(loader, desc="eval", leave=False, disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    for images, targets in bar:
        if images is None:  # every image of the batch was undecodable
            continue
        images = images.to(ctx.device, non_blocking=True)
        with autocast_context(ctx.device, amp):
            results = net.predict(
                images,
                image_sizes=[t["img_shape"] for t in targets],
                scale_factors=[t["scale_factor"] for t in targets],
                original_sizes=[t["orig_shape"] for t in targets],
                with_distributions=with_distributions,
            )
        for t, r in zip(targets, results):
            dets += detections_to_coco(t["image_id"], r["boxes"], r["scores"], r["labels"],
                                       dataset.cat_ids)
            done_ids.append(t["image_id"])
    if ctx.distributed:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, (dets, done_ids))
        dets = [d for part in gathered for d in part[0]]
        done_ids = [i for part in gathered for i in part[1]]
    expected = len(subset)
    metrics: dict[str, Any] = {}
    if ctx.is_main:
        metrics = evaluate_detections(dataset.coco, dets, image_ids=done_ids)
        metrics["skipped_images"] = expected - len(set(done_ids))
    if ctx.distributed:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    if was_training:
        net.train()
    return metrics, dets


# ============================================================================================
# schedule
# ============================================================================================


class WarmupStepSchedule:
    """lr multiplier at global iteration ``step``: mmdetection's linear warmup from
    ``warmup_ratio`` over ``warmup_iters`` iterations, times ``gamma ** (number of lr_steps
    <= current epoch)``. A callable object (not a lambda) so ``LambdaLR.state_dict`` keeps it."""

    def __init__(self, iters_per_epoch: int, warmup_iters: int, warmup_ratio: float,
                 lr_steps: Sequence[int], gamma: float) -> None:
        self.iters_per_epoch = iters_per_epoch
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        self.lr_steps = tuple(lr_steps)
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        epoch = step // self.iters_per_epoch
        factor = self.gamma ** sum(1 for s in self.lr_steps if epoch >= s)
        if step < self.warmup_iters:
            k = (1 - step / self.warmup_iters) * (1 - self.warmup_ratio)
            factor *= 1 - k
        return factor


# ============================================================================================
# logs
# ============================================================================================


class CSVLog:
    """Append-only CSV with a fixed header; on resume from a checkpoint taken after
    ``resume_step`` iterations, rows of later steps (written by the interrupted run after its
    last checkpoint) are dropped so the log has no duplicates."""

    def __init__(self, path: Path, fields: Sequence[str], resume_step: int | None) -> None:
        self.path = path
        self.fields = list(fields)
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["global_step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(row)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a CSV log as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


# ============================================================================================
# trainer
# ============================================================================================


class TrainingInterrupted(Exception):
    """Raised (after a checkpoint was written) when training stopped on SIGINT/SIGTERM or on
    ``stop_after_iters``."""


class Trainer:
    """Trains an :class:`ExperimentConfig` on COCO-format data.

    Args:
        cfg: the experiment (model kwargs, data, schedule).
        train_ann, train_images, val_ann, val_images: dataset files (val optional).
        output_dir: checkpoints, ``config.json``, ``train_log.csv``, ``eval_log.csv``,
            ``tb/`` (TensorBoard), ``train.log``, ``metrics.json`` (final evaluation).
        resume: a checkpoint path, ``'auto'`` (``output_dir/latest.pth`` if it exists) or None.
        device: ``'cpu'``, ``'cuda'`` or None (auto).
        progress: tqdm bars on rank 0.
        stop_after_iters: stop (as on SIGTERM: checkpoint, then :class:`TrainingInterrupted`)
            once this many global iterations are done — to test resumption.
        tensorboard: write TensorBoard event files.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        train_ann: str | os.PathLike,
        train_images: str | os.PathLike,
        val_ann: str | os.PathLike | None,
        val_images: str | os.PathLike | None,
        output_dir: str | os.PathLike,
        resume: str | os.PathLike | None = None,
        device: str | None = None,
        progress: bool = True,
        stop_after_iters: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        from .config import ModelConfig
        from .models import build_detector

        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.ctx = init_distributed(device)
        self.progress = progress
        self.stop_after_iters = stop_after_iters
        tc = cfg.train
        check_amp(tc.amp, self.ctx.device)
        if self.ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(tc.seed, tc.deterministic)

        self.train_set, self.val_set = build_datasets(
            cfg, train_ann, train_images, val_ann, val_images)
        assert self.train_set is not None
        cfg.model["num_classes"] = self.train_set.num_classes
        self.classes = {"cat_ids": self.train_set.cat_ids, "names": self.train_set.class_names}

        # ---- resume: read first, so a mismatching checkpoint fails before any work
        self.resume_path: Path | None = None
        if resume == "auto":
            cand = self.output_dir / "latest.pth"
            self.resume_path = cand if cand.is_file() else None
        elif resume:
            self.resume_path = Path(resume)
        ckpt = read_checkpoint(self.resume_path) if self.resume_path else None
        if ckpt is not None:
            self._check_compatible(ckpt)

        mcfg = ModelConfig.from_dict(
            {**cfg.model, **({"pretrained": None} if ckpt is not None else {})})
        if self.ctx.distributed and not self.ctx.is_main:
            dist.barrier()  # let rank 0 fetch pretrained weights into the cache first
        model = build_detector(mcfg)
        if self.ctx.distributed and self.ctx.is_main:
            dist.barrier()
        if tc.sync_bn and self.ctx.distributed and self.ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.ctx.device)
        self.model = model
        self.loss_names: list[str] = list(getattr(model, "loss_names", ["loss"]))

        self.loader, self.sampler = build_train_loader(
            self.train_set, cfg.data.batch_size, num_workers=cfg.data.num_workers,
            seed=tc.seed, size_divisor=cfg.data.size_divisor,
            rank=self.ctx.rank, world_size=self.ctx.world_size,
            group_by_aspect=cfg.data.group_by_aspect)
        self.iters_per_epoch = self.sampler.iters_per_epoch
        self.total_iters = self.iters_per_epoch * tc.epochs

        lr = tc.lr
        total_batch = cfg.data.batch_size * self.ctx.world_size
        if tc.auto_scale_lr:
            lr = tc.lr * total_batch / tc.base_batch_size
        self.lr = lr
        params = [p for p in model.parameters() if p.requires_grad]
        # fused kernels: one pass over the parameters (4x faster than the default per-tensor
        # loop on CPU, where foreach is not used), same results up to rounding
        fused = self.ctx.device.type in ("cpu", "cuda")
        if tc.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=lr, momentum=tc.momentum, weight_decay=tc.weight_decay, fused=fused)
        elif tc.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=tc.weight_decay,
                                               fused=fused)
        else:
            raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {tc.optimizer!r}")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            WarmupStepSchedule(self.iters_per_epoch, tc.warmup_iters, tc.warmup_ratio,
                               tc.lr_steps, tc.lr_gamma))
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=tc.amp == "fp16")

        self.epoch, self.iter_in_epoch, self.global_step = 0, 0, 0
        if ckpt is not None:
            self._restore(ckpt)

        if self.ctx.distributed:
            self.ddp: nn.Module = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.ctx.local_rank] if self.ctx.device.type == "cuda"
                else None)
        else:
            self.ddp = model

        resume_step = self.global_step if ckpt is not None else None
        self.train_csv = self.eval_csv = None
        self.tb = None
        if self.ctx.is_main:
            (self.output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            self.train_csv = CSVLog(
                self.output_dir / "train_log.csv",
                ["epoch", "iter", "global_step", "lr", *self.loss_names, "time_per_iter",
                 "data_time"], resume_step)
            self.eval_csv = CSVLog(
                self.output_dir / "eval_log.csv",
                ["epoch", "global_step", "AP", "AP50", "AP75", "APs", "APm", "APl",
                 "score_iou_pearson"], resume_step)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(
                    str(self.output_dir / "tb"),
                    purge_step=None if resume_step is None else resume_step + 1)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(
            "config %s: %s, %d classes, %.2fM parameters; %d training images, %d iterations/"
            "epoch x %d epochs, batch %d x %d process(es), lr %.4g, device %s, amp %s",
            cfg.name, f"ResNet-{mcfg.depth} {mcfg.variant}", mcfg.num_classes, n_params / 1e6,
            len(self.train_set), self.iters_per_epoch, tc.epochs, cfg.data.batch_size,
            self.ctx.world_size, lr, self.ctx.device, tc.amp)
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------------------ resume
    def _check_compatible(self, ckpt: dict[str, Any]) -> None:
        path = self.resume_path
        old = ckpt["config"]
        diffs = diff_model_configs(old.get("model", {}), self.cfg.model)
        if diffs:
            raise CheckpointError(
                f"{path}: checkpoint is for another model config ({old.get('name')!r}); "
                f"differences (checkpoint vs now): {'; '.join(diffs)}")
        classes = ckpt.get("classes", {})
        if classes.get("cat_ids") != self.classes["cat_ids"]:
            raise CheckpointError(
                f"{path}: checkpoint categories {classes.get('cat_ids')} differ from the "
                f"training set's {self.classes['cat_ids']}")
        for section, keys in (("data", ("batch_size", "img_scale", "flip_prob")),
                              ("train", ("seed", "lr", "warmup_iters"))):
            for k in keys:
                a = old.get(section, {}).get(k)
                b = getattr(getattr(self.cfg, section), k)
                if a is not None and (tuple(a) if isinstance(a, list) else a) != b:
                    logger.warning("resuming with %s.%s = %r (checkpoint: %r): the run will not "
                                   "match an uninterrupted one", section, k, b, a)
        if old.get("meta", {}).get("world_size", self.ctx.world_size) != self.ctx.world_size:
            logger.warning("resuming with %d processes, checkpoint was written with %s",
                           self.ctx.world_size, old["meta"]["world_size"])

    def _restore(self, ckpt: dict[str, Any]) -> None:
        load_model_state(self.model, ckpt["model"], self.resume_path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{self.resume_path}: optimiser/scheduler state does not fit "
                                  f"({e})") from e
        # the schedule object is rebuilt from the current config (e.g. more epochs)
        self.scheduler.lr_lambdas[0] = WarmupStepSchedule(
            self.iters_per_epoch, self.cfg.train.warmup_iters, self.cfg.train.warmup_ratio,
            self.cfg.train.lr_steps, self.cfg.train.lr_gamma)
        for g in self.optimizer.param_groups:
            g["initial_lr"] = self.lr
        self.scheduler.base_lrs = [self.lr for _ in self.optimizer.param_groups]
        if ckpt.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        prog = ckpt["progress"]
        self.epoch, self.iter_in_epoch = int(prog["epoch"]), int(prog["iter"])
        self.global_step = int(prog["global_step"])
        if self.iter_in_epoch >= self.iters_per_epoch:
            self.epoch, self.iter_in_epoch = self.epoch + 1, 0
        if self.global_step != self.epoch * self.iters_per_epoch + self.iter_in_epoch:
            raise CheckpointError(
                f"{self.resume_path}: progress (epoch {self.epoch}, iter {self.iter_in_epoch}, "
                f"step {self.global_step}) does not fit {self.iters_per_epoch} iterations per "
                "epoch: the dataset, batch size or number of processes changed")
        rng = ckpt.get("rng")
        if rng is not None:
            per_rank = rng.get("per_rank", [rng])
            restore_rng_state(per_rank[min(self.ctx.rank, len(per_rank) - 1)])
        logger.info("resumed from %s at epoch %d, iteration %d (global step %d)",
                    self.resume_path, self.epoch, self.iter_in_epoch, self.global_step)

    # ------------------------------------------------------------------------------ saving
    def save(self, name: str = "latest.pth") -> Path | None:
        """Write a checkpoint of the current state (collective under DDP: every rank calls)."""
        rng = capture_rng_state()
        if self.ctx.distributed:
            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, rng)
            rng = {"per_rank": gathered}
        if not self.ctx.is_main:
            return None
        path = self.output_dir / name
        save_checkpoint(path, {
            "config": self.cfg.to_dict(),
            "classes": self.classes,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "progress": {"epoch": self.epoch, "iter": self.iter_in_epoch,
                         "global_step": self.global_step,
                         "finished": self.global_step >= self.total_iters},
            "rng": rng,
            "meta": {"world_size": self.ctx.world_size},
        })
        return path

    def _prune(self) -> None:
        keep = self.cfg.train.keep_checkpoints
        if not self.ctx.is_main or keep <= 0:
            return
        files = sorted(self.output_dir.glob("epoch_*.pth"),
                       key=lambda p: int(p.stem.split("_")[1]))
        for p in files[:-keep]:
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        if self._stop_signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        logger.warning("received signal %d: saving a checkpoint after this iteration "
                       "(send again to abort without saving)", signum)

    def _should_stop(self) -> bool:
        stop = self._stop_signal is not None or (
            self.stop_after_iters is not None and self.global_step >= self.stop_after_iters)
        if self.ctx.distributed:  # every rank must leave at the same iteration
            flag = torch.tensor([1.0 if stop else 0.0], device=self.ctx.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item() > 0)
        return stop

    # ------------------------------------------------------------------------------ loop
    def _reduce_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        vec = torch.stack([losses[k].detach().float() for k in self.loss_names])
        if self.ctx.distributed:
            dist.all_reduce(vec)
            vec /= self.ctx.world_size
        return dict(zip(self.loss_names, vec.tolist()))

    def _step(self, images: torch.Tensor, targets: list[dict[str, Any]]) -> dict[str, float]:
        tc = self.cfg.train
        dev = self.ctx.device
        images = images.to(dev, non_blocking=True)
        tgts = [{"boxes": t["boxes"].to(dev), "labels": t["labels"].to(dev),
                 "image_size": t["img_shape"]} for t in targets]
        ids = [t["image_id"] for t in targets]
        try:
            with autocast_context(dev, tc.amp):
                losses = self.ddp(images, tgts)
        except (ValueError, RuntimeError) as e:
            if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
                raise FloatingPointError(self._diverged("the model weights are not finite")) from e
            raise
        values = self._reduce_losses(losses)
        if not all(math.isfinite(v) for v in values.values()):
            # say whether the weights themselves went bad (an earlier step diverged) or only
            # this batch's loss did
            if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
                raise FloatingPointError(self._diverged(
                    f"the model weights are not finite (non-finite loss {values}, images {ids})"))
            raise FloatingPointError(self._diverged(f"non-finite loss {values}, images {ids}"))
        self.scaler.scale(losses["loss"]).backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if tc.grad_clip is not None or not self.scaler.is_enabled():
            # (with fp16 the scaler skips steps with inf/NaN gradients by itself)
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(
                params, tc.grad_clip if tc.grad_clip is not None else float("inf"))
            if not self.scaler.is_enabled() and not math.isfinite(float(norm)):
                raise FloatingPointError(
                    self._diverged(f"non-finite gradient norm, images {ids}"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return values

    def _diverged(self, what: str) -> str:
        return (f"training diverged at epoch {self.epoch} iteration {self.iter_in_epoch} "
                f"(global step {self.global_step}): {what}. The last checkpoint is "
                f"{self.output_dir / 'latest.pth'}; lower the lr, set train.grad_clip, or use "
                "--amp bf16 instead of fp16.")

    def run_eval(self) -> dict[str, Any] | None:
        """Evaluate on the validation set, log the metrics; None without a validation set."""
        if self.val_set is None:
            return None
        metrics, _ = evaluate(
            self.model, self.val_set, self.ctx, batch_size=self.cfg.data.eval_batch_size,
            num_workers=self.cfg.data.num_workers, amp=self.cfg.train.amp,
            progress=self.progress)
        if self.ctx.is_main:
            logger.info("evaluation after epoch %d:\n%s", self.epoch,
                        format_metrics_table(metrics))
            row = {"epoch": self.epoch, "global_step": self.global_step, **metrics}
            assert self.eval_csv is not None
            self.eval_csv.write(row)
            if self.tb is not None:
                for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "score_iou_pearson"):
                    v = metrics.get(k)
                    if v is not None and math.isfinite(v):
                        self.tb.add_scalar(f"val/{k}", v, self.global_step)
        return metrics

    def train(self) -> dict[str, Any] | None:
        """Train to the end of the schedule; returns the final validation metrics (None without
        a validation set). Raises :class:`TrainingInterrupted` after saving when stopped."""
        from tqdm import tqdm

        tc = self.cfg.train
        handlers = {}
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                handlers[s] = signal.signal(s, self._on_signal)
        last_metrics = None
        t_start = time.perf_counter()
        steps_at_start = self.global_step
        try:
            while self.epoch < tc.epochs:
                epoch = self.epoch
                self.model.train()
                self.sampler.set_epoch(epoch, self.iter_in_epoch)
                bar = tqdm(total=self.iters_per_epoch, initial=self.iter_in_epoch,
                           desc=f"epoch {epoch + 1}/{tc.epochs}", dynamic_ncols=True,
                           disable=not (self.progress and self.ctx.is_main), leave=True)
                t_data = time.perf_counter()
                for images, targets in self.loader:
                    if self._should_stop():
                        raise TrainingInterrupted
                    data_time = time.perf_counter() - t_data
                    t0 = time.perf_counter()
                    lr = self.optimizer.param_groups[0]["lr"]  # the lr this step uses
                    values = self._step(images, targets)
                    it_time = time.perf_counter() - t0 + data_time
                    self.iter_in_epoch += 1
                    self.global_step += 1
                    done = self.global_step - steps_at_start
                    avg = (time.perf_counter() - t_start) / max(done, 1)
                    eta = avg * (self.total_iters - self.global_step)
                    if self.ctx.is_main:
                        short = {k.replace("loss_", ""): f"{v:.3f}" for k, v in values.items()}
                        bar.set_postfix(**short, lr=f"{lr:.2e}", eta=_fmt_eta(eta),
                                        refresh=False)
                        bar.update(1)
                        if (self.global_step % tc.log_interval == 0
                                or self.iter_in_epoch == self.iters_per_epoch):
                            self._log_iter(values, lr, it_time, data_time)
                    if (tc.checkpoint_interval_iters
                            and self.global_step % tc.checkpoint_interval_iters == 0
                            and self.iter_in_epoch < self.iters_per_epoch):
                        self.save("latest.pth")
                    t_data = time.perf_counter()
                bar.close()
                # end of epoch
                self.epoch, self.iter_in_epoch = epoch + 1, 0
                final = self.epoch == tc.epochs
                if (tc.eval_interval and self.epoch % tc.eval_interval == 0) or final:
                    last_metrics = self.run_eval()
                self.save("latest.pth")
                if tc.checkpoint_interval and (self.epoch % tc.checkpoint_interval == 0
                                               or final):
                    if self.ctx.is_main:
                        import shutil

                        shutil.copyfile(self.output_dir / "latest.pth",
                                        self.output_dir / f"epoch_{self.epoch}.pth")
                    self._prune()
            if last_metrics is None and self.val_set is not None:
                last_metrics = self.run_eval()  # e.g. resumed a finished run
            if self.ctx.is_main and last_metrics is not None:
                write_metrics(last_metrics, self.output_dir / "metrics.json")
            return last_metrics
        except TrainingInterrupted:
            path = self.save("latest.pth")
            if self.ctx.is_main:
                logger.warning("stopped at epoch %d iteration %d (global step %d); checkpoint "
                               "%s; continue with --resume %s", self.epoch, self.iter_in_epoch,
                               self.global_step, path, path)
            raise
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if self.tb is not None:
                self.tb.flush()

    def _log_iter(self, values: dict[str, float], lr: float, it_time: float,
                  data_time: float) -> None:
        row = {"epoch": self.epoch, "iter": self.iter_in_epoch, "global_step": self.global_step,
               "lr": f"{lr:.6g}", **{k: repr(v) for k, v in values.items()},
               "time_per_iter": f"{it_time:.4f}", "data_time": f"{data_time:.4f}"}
        assert self.train_csv is not None
        self.train_csv.write(row)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, self.global_step)
            self.tb.add_scalar("train/lr", lr, self.global_step)

    def close(self) -> None:
        """Close logs and the process group (if this trainer created one)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.ctx.distributed and dist.is_initialized():
            dist.barrier()
