"""The Trainer's checkpoints: what a run saves, whether a checkpoint may resume it, and the exact
restore (model, optimiser, scheduler, grad scaler, RNG states of every rank, position in the
epoch). ``latest.pth`` is rewritten at epoch ends, every ``checkpoint_interval_iters`` iterations
and on SIGINT/SIGTERM; ``epoch_N.pth`` copies of it are kept. The file format itself (atomic
writes, reading, loading a model for inference) is :mod:`detector.checkpoint`'s.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import (
    CheckpointError,
    capture_rng_state,
    diff_model_configs,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
    unwrap,
)
from ..config import ExperimentConfig
from .distributed import DistContext, gather_objects
from .optim import WarmupStepSchedule

__all__ = ["resume_path", "check_resume_compatible", "TrainingCheckpointer"]

logger = logging.getLogger("detector")


def resume_path(resume: str | os.PathLike | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``resume`` itself, or for ``'auto'``
    ``output_dir/latest.pth`` when it exists; None to start afresh."""
    if resume == "auto":
        cand = output_dir / "latest.pth"
        return cand if cand.is_file() else None
    if resume:
        return Path(resume)
    return None


def check_resume_compatible(
    ckpt: dict[str, Any],
    path: Path | None,
    cfg: ExperimentConfig,
    cat_ids: list[int],
    world_size: int,
) -> None:
    """Raise :class:`CheckpointError` when ``ckpt`` is of another model or category set; warn
    about the settings that make the resumed run differ from an uninterrupted one."""
    old = ckpt["config"]
    diffs = diff_model_configs(old.get("model", {}), cfg.model)
    if diffs:
        raise CheckpointError(
            f"{path}: checkpoint is for another model config ({old.get('name')!r}); "
            f"differences (checkpoint vs now): {'; '.join(diffs)}"
        )
    classes = ckpt.get("classes", {})
    if classes.get("cat_ids") != cat_ids:
        raise CheckpointError(
            f"{path}: checkpoint categories {classes.get('cat_ids')} differ from the "
            f"training set's {cat_ids}"
        )
    for section, keys in (
        ("data", ("batch_size", "img_scale", "flip_prob")),
        ("train", ("seed", "lr", "warmup_iters")),
    ):
        for k in keys:
            a = old.get(section, {}).get(k)
            b = getattr(getattr(cfg, section), k)
            if a is not None and (tuple(a) if isinstance(a, list) else a) != b:
                logger.warning(
                    "resuming with %s.%s = %r (checkpoint: %r): the run will not "
                    "match an uninterrupted one",
                    section,
                    k,
                    b,
                    a,
                )
    if old.get("meta", {}).get("world_size", world_size) != world_size:
        logger.warning(
            "resuming with %d processes, checkpoint was written with %s",
            world_size,
            old["meta"]["world_size"],
        )


class TrainingCheckpointer:
    """Saves and restores the training state of a run in ``output_dir``.

    Holds the objects whose state a checkpoint carries; the progress (epoch, iteration in the
    epoch, global step) stays the Trainer's and is passed in and returned.
    """

    def __init__(
        self,
        output_dir: Path,
        ctx: DistContext,
        cfg: ExperimentConfig,
        classes: dict[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        scaler: torch.amp.GradScaler,
    ) -> None:
        self.output_dir = output_dir
        self.ctx = ctx
        self.cfg = cfg
        self.classes = classes
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler

    def restore(
        self, ckpt: dict[str, Any], path: Path | None, lr: float, iters_per_epoch: int
    ) -> tuple[int, int, int]:
        """Load ``ckpt`` into the model, optimiser, scheduler, scaler and RNGs; returns
        ``(epoch, iteration in the epoch, global step)`` to continue from."""
        load_model_state(self.model, ckpt["model"], path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: optimiser/scheduler state does not fit ({e})") from e
        # the schedule object is rebuilt from the current config (e.g. more epochs)
        self.scheduler.lr_lambdas[0] = WarmupStepSchedule.from_config(
            self.cfg.train, iters_per_epoch
        )
        for g in self.optimizer.param_groups:
            g["initial_lr"] = lr
        self.scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
        if ckpt.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        prog = ckpt["progress"]
        epoch, iter_in_epoch = int(prog["epoch"]), int(prog["iter"])
        global_step = int(prog["global_step"])
        if iter_in_epoch >= iters_per_epoch:
            epoch, iter_in_epoch = epoch + 1, 0
        if global_step != epoch * iters_per_epoch + iter_in_epoch:
            raise CheckpointError(
                f"{path}: progress (epoch {epoch}, iter {iter_in_epoch}, "
                f"step {global_step}) does not fit {iters_per_epoch} iterations per "
                "epoch: the dataset, batch size or number of processes changed"
            )
        rng = ckpt.get("rng")
        if rng is not None:
            per_rank = rng.get("per_rank", [rng])
            restore_rng_state(per_rank[min(self.ctx.rank, len(per_rank) - 1)])
        logger.info(
            "resumed from %s at epoch %d, iteration %d (global step %d)",
            path,
            epoch,
            iter_in_epoch,
            global_step,
        )
        return epoch, iter_in_epoch, global_step

    def save(
        self,
        epoch: int,
        iter_in_epoch: int,
        global_step: int,
        total_iters: int,
        name: str = "latest.pth",
    ) -> Path | None:
        """Write a checkpoint of the current state (collective under DDP: every rank calls);
        its path on rank 0, None elsewhere."""
        rng = capture_rng_state()
        if self.ctx.distributed:
            rng = {"per_rank": gather_objects(rng, self.ctx)}
        if not self.ctx.is_main:
            return None
        path = self.output_dir / name
        save_checkpoint(
            path,
            {
                "config": self.cfg.to_dict(),
                "classes": self.classes,
                "model": unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "progress": {
                    "epoch": epoch,
                    "iter": iter_in_epoch,
                    "global_step": global_step,
                    "finished": global_step >= total_iters,
                },
                "rng": rng,
                "meta": {"world_size": self.ctx.world_size},
            },
        )
        return path

    def keep_epoch_copy(self, epoch: int) -> None:
        """Copy ``latest.pth`` to ``epoch_{epoch}.pth`` and delete all but the newest
        ``train.keep_checkpoints`` such copies (none deleted for ``keep_checkpoints <= 0``)."""
        if self.ctx.is_main:
            shutil.copyfile(self.output_dir / "latest.pth", self.output_dir / f"epoch_{epoch}.pth")
        keep = self.cfg.train.keep_checkpoints
        if not self.ctx.is_main or keep <= 0:
            return
        files = sorted(self.output_dir.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
        for p in files[:-keep]:
            p.unlink(missing_ok=True)
