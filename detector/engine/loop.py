"""The training loop: :class:`Trainer` sets a run up from an :class:`ExperimentConfig` and steps
it to the end of its schedule -- forward/backward/optimiser step per batch (AMP, gradient
clipping, divergence checks), progress bar, periodic logs, evaluations and checkpoints.

The pieces it drives live beside it: :mod:`.distributed` (process group, DDP, collectives),
:mod:`.amp`, :mod:`.optim` (optimiser, lr schedule), :mod:`.datasets`, :mod:`.checkpointing`
(save, resume), :mod:`.stopping` (SIGINT/SIGTERM), :mod:`.logs` (CSV, TensorBoard) and
:mod:`.evaluation` (the evaluation loop).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import read_checkpoint
from ..config import ExperimentConfig, ModelConfig
from ..data.loader import build_train_loader
from ..metrics import write_metrics
from ..models import build_detector
from .amp import autocast_context, check_amp
from .checkpointing import TrainingCheckpointer, check_resume_compatible, resume_path
from .datasets import build_datasets
from .distributed import barrier, init_distributed, mean_over_ranks, wrap_ddp
from .evaluation import evaluate
from .logs import RunLogs, format_eta
from .optim import build_optimizer, build_scheduler, scaled_lr
from .stopping import StopRequest, TrainingInterrupted

__all__ = ["Trainer", "seed_everything"]

logger = logging.getLogger("detector")


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
            cfg, train_ann, train_images, val_ann, val_images
        )
        assert self.train_set is not None
        cfg.model["num_classes"] = self.train_set.num_classes
        self.classes = {"cat_ids": self.train_set.cat_ids, "names": self.train_set.class_names}

        # ---- resume: read first, so a mismatching checkpoint fails before any work
        self.resume_path = resume_path(resume, self.output_dir)
        ckpt = read_checkpoint(self.resume_path) if self.resume_path else None
        if ckpt is not None:
            check_resume_compatible(
                ckpt, self.resume_path, cfg, self.classes["cat_ids"], self.ctx.world_size
            )

        mcfg = ModelConfig.from_dict(
            {**cfg.model, **({"pretrained": None} if ckpt is not None else {})}
        )
        if not self.ctx.is_main:
            barrier(self.ctx)  # let rank 0 fetch pretrained weights into the cache first
        model = build_detector(mcfg)
        if self.ctx.is_main:
            barrier(self.ctx)
        if tc.sync_bn and self.ctx.distributed and self.ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.ctx.device)
        self.model = model
        self.loss_names: list[str] = list(getattr(model, "loss_names", ["loss"]))

        self.loader, self.sampler = build_train_loader(
            self.train_set,
            cfg.data.batch_size,
            num_workers=cfg.data.num_workers,
            seed=tc.seed,
            size_divisor=cfg.data.size_divisor,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            group_by_aspect=cfg.data.group_by_aspect,
        )
        self.iters_per_epoch = self.sampler.iters_per_epoch
        self.total_iters = self.iters_per_epoch * tc.epochs

        self.lr = scaled_lr(tc, cfg.data.batch_size * self.ctx.world_size)
        self.optimizer = build_optimizer(
            [p for p in model.parameters() if p.requires_grad], tc, self.lr, self.ctx.device
        )
        self.scheduler = build_scheduler(self.optimizer, tc, self.iters_per_epoch)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=tc.amp == "fp16")
        self.checkpointer = TrainingCheckpointer(
            self.output_dir,
            self.ctx,
            cfg,
            self.classes,
            model,
            self.optimizer,
            self.scheduler,
            self.scaler,
        )

        self.epoch, self.iter_in_epoch, self.global_step = 0, 0, 0
        if ckpt is not None:
            self.epoch, self.iter_in_epoch, self.global_step = self.checkpointer.restore(
                ckpt, self.resume_path, self.lr, self.iters_per_epoch
            )

        self.ddp = wrap_ddp(model, self.ctx)

        self.logs: RunLogs | None = None
        if self.ctx.is_main:
            (self.output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            self.logs = RunLogs(
                self.output_dir,
                self.loss_names,
                self.global_step if ckpt is not None else None,
                tensorboard,
            )
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(
            "config %s: %s, %d classes, %.2fM parameters; %d training images, %d iterations/"
            "epoch x %d epochs, batch %d x %d process(es), lr %.4g, device %s, amp %s",
            cfg.name,
            f"ResNet-{mcfg.depth} {mcfg.variant}",
            mcfg.num_classes,
            n_params / 1e6,
            len(self.train_set),
            self.iters_per_epoch,
            tc.epochs,
            cfg.data.batch_size,
            self.ctx.world_size,
            self.lr,
            self.ctx.device,
            tc.amp,
        )
        self.stop_request = StopRequest(stop_after_iters)

    def save(self, name: str = "latest.pth") -> Path | None:
        """Write a checkpoint of the current state (collective under DDP: every rank calls)."""
        return self.checkpointer.save(
            self.epoch, self.iter_in_epoch, self.global_step, self.total_iters, name
        )

    # ------------------------------------------------------------------------------ step
    def _reduce_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        vec = torch.stack([losses[k].detach().float() for k in self.loss_names])
        return dict(zip(self.loss_names, mean_over_ranks(vec, self.ctx).tolist()))

    def _step(self, images: torch.Tensor, targets: list[dict[str, Any]]) -> dict[str, float]:
        tc = self.cfg.train
        dev = self.ctx.device
        images = images.to(dev, non_blocking=True)
        tgts = [
            {
                "boxes": t["boxes"].to(dev),
                "labels": t["labels"].to(dev),
                "image_size": t["img_shape"],
            }
            for t in targets
        ]
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
                raise FloatingPointError(
                    self._diverged(
                        f"the model weights are not finite (non-finite loss {values}, images {ids})"
                    )
                )
            raise FloatingPointError(self._diverged(f"non-finite loss {values}, images {ids}"))
        self.scaler.scale(losses["loss"]).backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if tc.grad_clip is not None or not self.scaler.is_enabled():
            # (with fp16 the scaler skips steps with inf/NaN gradients by itself)
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(
                params, tc.grad_clip if tc.grad_clip is not None else float("inf")
            )
            if not self.scaler.is_enabled() and not math.isfinite(float(norm)):
                raise FloatingPointError(self._diverged(f"non-finite gradient norm, images {ids}"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return values

    def _diverged(self, what: str) -> str:
        return (
            f"training diverged at epoch {self.epoch} iteration {self.iter_in_epoch} "
            f"(global step {self.global_step}): {what}. The last checkpoint is "
            f"{self.output_dir / 'latest.pth'}; lower the lr, set train.grad_clip, or use "
            "--amp bf16 instead of fp16."
        )

    # ------------------------------------------------------------------------------ loop
    def run_eval(self) -> dict[str, Any] | None:
        """Evaluate on the validation set, log the metrics; None without a validation set."""
        if self.val_set is None:
            return None
        metrics, _ = evaluate(
            self.model,
            self.val_set,
            self.ctx,
            batch_size=self.cfg.data.eval_batch_size,
            num_workers=self.cfg.data.num_workers,
            amp=self.cfg.train.amp,
            progress=self.progress,
        )
        if self.ctx.is_main:
            assert self.logs is not None
            self.logs.log_eval(self.epoch, self.global_step, metrics)
        return metrics

    def train(self) -> dict[str, Any] | None:
        """Train to the end of the schedule; returns the final validation metrics (None without
        a validation set). Raises :class:`TrainingInterrupted` after saving when stopped."""
        from tqdm import tqdm

        tc = self.cfg.train
        self.stop_request.install()
        last_metrics = None
        t_start = time.perf_counter()
        steps_at_start = self.global_step
        try:
            while self.epoch < tc.epochs:
                epoch = self.epoch
                self.model.train()
                self.sampler.set_epoch(epoch, self.iter_in_epoch)
                bar = tqdm(
                    total=self.iters_per_epoch,
                    initial=self.iter_in_epoch,
                    desc=f"epoch {epoch + 1}/{tc.epochs}",
                    dynamic_ncols=True,
                    disable=not (self.progress and self.ctx.is_main),
                    leave=True,
                )
                t_data = time.perf_counter()
                for images, targets in self.loader:
                    if self.stop_request.should_stop(self.global_step, self.ctx):
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
                        bar.set_postfix(**short, lr=f"{lr:.2e}", eta=format_eta(eta), refresh=False)
                        bar.update(1)
                        if (
                            self.global_step % tc.log_interval == 0
                            or self.iter_in_epoch == self.iters_per_epoch
                        ):
                            assert self.logs is not None
                            self.logs.log_iter(
                                self.epoch,
                                self.iter_in_epoch,
                                self.global_step,
                                values,
                                lr,
                                it_time,
                                data_time,
                            )
                    if (
                        tc.checkpoint_interval_iters
                        and self.global_step % tc.checkpoint_interval_iters == 0
                        and self.iter_in_epoch < self.iters_per_epoch
                    ):
                        self.save("latest.pth")
                    t_data = time.perf_counter()
                bar.close()
                # end of epoch
                self.epoch, self.iter_in_epoch = epoch + 1, 0
                final = self.epoch == tc.epochs
                if (tc.eval_interval and self.epoch % tc.eval_interval == 0) or final:
                    last_metrics = self.run_eval()
                self.save("latest.pth")
                if tc.checkpoint_interval and (self.epoch % tc.checkpoint_interval == 0 or final):
                    self.checkpointer.keep_epoch_copy(self.epoch)
            if last_metrics is None and self.val_set is not None:
                last_metrics = self.run_eval()  # e.g. resumed a finished run
            if self.ctx.is_main and last_metrics is not None:
                write_metrics(last_metrics, self.output_dir / "metrics.json")
            return last_metrics
        except TrainingInterrupted:
            path = self.save("latest.pth")
            if self.ctx.is_main:
                logger.warning(
                    "stopped at epoch %d iteration %d (global step %d); checkpoint "
                    "%s; continue with --resume %s",
                    self.epoch,
                    self.iter_in_epoch,
                    self.global_step,
                    path,
                    path,
                )
            raise
        finally:
            self.stop_request.uninstall()
            if self.logs is not None:
                self.logs.flush()

    def close(self) -> None:
        """Close logs and the process group (if this trainer created one)."""
        if self.logs is not None:
            self.logs.close()
        barrier(self.ctx)
