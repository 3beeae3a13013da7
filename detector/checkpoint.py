"""Checkpoints: atomic saving, exact-resume state, and loading for evaluation/inference.

A checkpoint is a ``torch.save``'d dict::

    format_version  int
    config          ExperimentConfig.to_dict()  (model kwargs incl. num_classes)
    classes         {'cat_ids': [...], 'names': [...]}  (label i <-> COCO category id)
    model           state dict (unwrapped from DDP)
    optimizer, scheduler, scaler     state dicts (scaler None without fp16)
    progress        {'epoch': e, 'iter': i, 'global_step': g, 'finished': bool}
                    -> resume continues at iteration i of epoch e
    rng             python / numpy / torch CPU / torch CUDA generator states
    meta            torch version, time, world size, ...

It is written to ``PATH.tmp`` and renamed, so a crash while saving never leaves a truncated file.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def capture_rng_state() -> dict[str, Any]:
    """States of Python's, numpy's and torch's (CPU + every CUDA device) global generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states restored only where devices match)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (see module docstring) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    payload = dict(state)
    payload.setdefault("format_version", FORMAT_VERSION)
    meta = dict(payload.get("meta", {}))
    meta.setdefault("torch_version", torch.__version__)
    meta.setdefault("saved_at", time.strftime("%Y-%m-%d %H:%M:%S"))
    payload["meta"] = meta
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, with clear errors for missing / corrupt / foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        # weights_only=False: the file holds RNG states (numpy arrays, tuples); only load
        # checkpoints you trust, as with any pickle.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(
            f"{path}: not a detector checkpoint (expected a dict with 'model' and 'config'; "
            "train one with `python -m detector.train`)"
        )
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {ckpt['format_version']} is newer than this code "
            f"({FORMAT_VERSION})"
        )
    return ckpt


def diff_model_configs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable differences between two model kwargs dicts (``pretrained`` ignored: it
    only matters at initialisation)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ("pretrained", "gfl_backend", "extra"):
            continue
        va, vb = a.get(k, "<default>"), b.get(k, "<default>")
        if isinstance(va, list):
            va = tuple(va)
        if isinstance(vb, list):
            vb = tuple(vb)
        if va != vb:
            out.append(f"{k}: {va!r} vs {vb!r}")
    return out


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Any) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and what differs."""
    model = unwrap(model)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} in checkpoint vs {tuple(v.shape)} in model"
        for k, v in own.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(
            f"{path}: weights do not fit this model ({'; '.join(parts)}); the checkpoint was "
            "probably trained with another config"
        )
    model.load_state_dict(state, strict=True)


def load_for_inference(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    expect_config: str | None = None,
    model_overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint was trained with, load its weights, switch to eval mode.

    ``expect_config``: if given, a config name that the checkpoint must have been trained with
    (a clear :class:`CheckpointError` otherwise). ``model_overrides`` may change inference-only
    model options (``score_thr``, ``nms_iou``, ``max_per_img``, ``nms_pre``, ``gfl_backend``).
    Returns ``(model, checkpoint)``.
    """
    from .config import ModelConfig, get_config
    from .models import build_detector

    ckpt = read_checkpoint(path)
    cfg = ckpt["config"]
    name = cfg.get("name")
    if expect_config is not None and name != expect_config:
        diffs = ""
        try:
            exp = get_config(expect_config).model
            d = diff_model_configs(exp, cfg["model"])
            d = [x for x in d if not x.startswith("num_classes")]
            if d:
                diffs = f"; model differs in: {', '.join(d)}"
        except KeyError:
            pass
        raise CheckpointError(
            f"{path}: checkpoint was trained with config {name!r}, not {expect_config!r}{diffs}"
        )
    model_kwargs = dict(cfg["model"])
    model_kwargs["pretrained"] = None  # weights come from the checkpoint
    allowed = {"score_thr", "nms_iou", "max_per_img", "nms_pre", "gfl_backend", "min_bbox_size"}
    for k, v in (model_overrides or {}).items():
        if k not in allowed:
            raise ValueError(f"cannot override model option {k!r} at inference")
        model_kwargs[k] = v
    try:
        mcfg = ModelConfig.from_dict(model_kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: stored model config is not valid here ({e})") from e
    model = build_detector(mcfg)
    load_model_state(model, ckpt["model"], path)
    model.to(device).eval()
    return model, ckpt
