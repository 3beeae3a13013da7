"""Training loop: exact resume (in-process stop, SIGTERM, SIGKILL), checkpoints, schedule."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detector.checkpoint import CheckpointError, read_checkpoint
from detector.config import get_config
from detector.data.synthetic import SyntheticConfig, generate_dataset
from detector.engine import Trainer, TrainingInterrupted, WarmupStepSchedule, read_csv

REPO = Path(__file__).resolve().parents[2]
LOSS_KEYS = ("loss_cls", "loss_bbox", "loss_dfl", "loss")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return generate_dataset(
        root, SyntheticConfig(num_train=8, num_val=3, seed=5, image_size_range=(96, 128))
    )


def tiny_cfg(epochs: int = 2):
    cfg = get_config("gfl_tiny_test")
    cfg.train.epochs = epochs
    cfg.data.img_scale = (128, 128)
    return cfg


def make_trainer(data, out, cfg=None, **kw) -> Trainer:
    return Trainer(
        cfg or tiny_cfg(),
        data["train_ann"],
        data["train_images"],
        kw.pop("val_ann", data["val_ann"]),
        kw.pop("val_images", data["val_images"]),
        out,
        device="cpu",
        progress=False,
        tensorboard=False,
        **kw,
    )


def losses(out) -> list[tuple[str, ...]]:
    return [
        tuple(r[k] for k in ("global_step", *LOSS_KEYS))
        for r in read_csv(Path(out) / "train_log.csv")
    ]


def final_state(out) -> dict[str, torch.Tensor]:
    return read_checkpoint(Path(out) / "latest.pth")["model"]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """An uninterrupted 2-epoch run (4 iterations per epoch), logging every iteration."""
    out = tmp_path_factory.mktemp("ref")
    t = make_trainer(data, out)
    metrics = t.train()
    t.close()
    return out, metrics


def test_reference_run_outputs(reference_run):
    out, metrics = reference_run
    rows = read_csv(out / "train_log.csv")
    assert [int(r["global_step"]) for r in rows] == list(range(1, 9))
    assert all(float(r["loss"]) > 0 for r in rows)
    assert len(read_csv(out / "eval_log.csv")) == 2  # eval_interval 1, 2 epochs
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "score_iou_pearson"} <= set(metrics)
    assert (out / "metrics.json").is_file() and (out / "config.json").is_file()
    assert (out / "epoch_1.pth").is_file() and (out / "epoch_2.pth").is_file()
    ck = read_checkpoint(out / "latest.pth")
    assert ck["progress"] == {"epoch": 2, "iter": 0, "global_step": 8, "finished": True}
    assert ck["classes"]["names"] == ["ellipse", "rectangle", "triangle", "cross"]


def test_resume_mid_epoch_is_exact(data, tmp_path, reference_run):
    """Stop after 3 of 4 iterations of epoch 0, resume: identical losses and final weights."""
    ref, _ = reference_run
    t = make_trainer(data, tmp_path, stop_after_iters=3)
    with pytest.raises(TrainingInterrupted):
        t.train()
    t.close()
    ck = read_checkpoint(tmp_path / "latest.pth")
    assert ck["progress"]["epoch"] == 0 and ck["progress"]["iter"] == 3
    t = make_trainer(data, tmp_path, resume="auto")
    assert (t.epoch, t.iter_in_epoch, t.global_step) == (0, 3, 3)
    t.train()
    t.close()
    assert losses(tmp_path) == losses(ref)
    assert_same_state(final_state(tmp_path), final_state(ref))
    assert read_csv(tmp_path / "eval_log.csv") == read_csv(ref / "eval_log.csv")


def test_resume_at_epoch_boundary_is_exact(data, tmp_path, reference_run):
    ref, _ = reference_run
    t = make_trainer(data, tmp_path, stop_after_iters=4)
    with pytest.raises(TrainingInterrupted):
        t.train()
    t.close()
    t = make_trainer(data, tmp_path, resume=tmp_path / "epoch_1.pth")
    assert (t.epoch, t.iter_in_epoch) == (1, 0)
    t.train()
    t.close()
    assert losses(tmp_path) == losses(ref)
    assert_same_state(final_state(tmp_path), final_state(ref))


def test_resume_rejects_other_model_config(data, tmp_path, reference_run):
    ref, _ = reference_run
    cfg = tiny_cfg()
    cfg.model["reg_max"] = 8
    with pytest.raises(CheckpointError, match="another model config.*reg_max: 4 vs 8") as e:
        make_trainer(data, tmp_path, cfg=cfg, resume=ref / "latest.pth")
    assert "latest.pth" in str(e.value)


def test_resume_rejects_missing_and_corrupt_checkpoints(data, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        make_trainer(data, tmp_path, resume=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pth: cannot read checkpoint"):
        make_trainer(data, tmp_path, resume=bad)
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(CheckpointError, match="not a detector checkpoint"):
        make_trainer(data, tmp_path, resume=bad)


def test_extend_finished_run(data, tmp_path, reference_run):
    """Resuming a finished 2-epoch run with epochs=3 trains exactly one more epoch."""
    ref, _ = reference_run
    import shutil

    shutil.copyfile(ref / "latest.pth", tmp_path / "latest.pth")
    t = make_trainer(data, tmp_path, cfg=tiny_cfg(epochs=3), resume="auto")
    assert (t.epoch, t.global_step) == (2, 8)
    t.train()
    t.close()
    assert [r[0] for r in losses(tmp_path)] == ["9", "10", "11", "12"]


def test_training_without_validation_and_non_finite_guard(data, tmp_path):
    cfg = tiny_cfg(epochs=1)
    cfg.train.lr = float("nan")
    t = make_trainer(data, tmp_path, cfg=cfg, val_ann=None, val_images=None)
    with pytest.raises(
        FloatingPointError, match="training diverged at epoch 0 iteration 1.*weights are not finite"
    ):
        t.train()  # the first step poisons the weights; the second forward fails
    t.close()


def test_warmup_step_schedule():
    s = WarmupStepSchedule(
        iters_per_epoch=10, warmup_iters=5, warmup_ratio=0.001, lr_steps=(2, 3), gamma=0.1
    )
    assert s(0) == pytest.approx(0.001)
    assert s(5) == pytest.approx(1.0) and s(19) == pytest.approx(1.0)
    assert s(20) == pytest.approx(0.1) and s(30) == pytest.approx(0.01)
    assert s(2) == pytest.approx(1 - (1 - 2 / 5) * 0.999)


# --------------------------------------------------------------------------------- processes
def _train_cmd(data, out, extra=()):
    return [
        sys.executable,
        "-m",
        "detector.train",
        "--config",
        "gfl_tiny_test",
        "--train-ann",
        str(data["train_ann"]),
        "--train-images",
        str(data["train_images"]),
        "--output",
        str(out),
        "--no-progress",
        "--no-tensorboard",
        "--device",
        "cpu",
        "--set",
        "data.img_scale=(128,128)",
        "--set",
        "train.checkpoint_interval_iters=1",
        "--epochs",
        "2",
        *extra,
    ]


def _wait_rows(csv_path: Path, n: int, proc, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if csv_path.exists() and len(csv_path.read_text().splitlines()) > n:
            return
        if proc.poll() is not None:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training subprocess made no progress")


@pytest.fixture(scope="module")
def subprocess_reference(data, tmp_path_factory):
    """An uninterrupted `python -m detector.train` run (the baseline of the kill tests)."""
    ref = tmp_path_factory.mktemp("subprocess_ref")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(_train_cmd(data, ref), cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_process_resumes_with_nothing_lost(data, tmp_path, sig, subprocess_reference):
    """A real `python -m detector.train` killed mid-epoch (SIGTERM: checkpoint on the way out;
    SIGKILL: the per-iteration checkpoint) and resumed ends exactly like an uninterrupted run."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref = subprocess_reference
    out = tmp_path / "run"
    p = subprocess.Popen(
        _train_cmd(data, out),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_rows(out / "train_log.csv", 2, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert p.returncode == 3, err
        assert "continue with --resume" in err
    else:
        assert p.returncode == -signal.SIGKILL
    stopped_at = read_checkpoint(out / "latest.pth")["progress"]["global_step"]
    assert 0 < stopped_at < 8
    r = subprocess.run(
        _train_cmd(data, out, ["--resume", "auto"]),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert f"global step {stopped_at}" in r.stderr
    assert losses(out) == losses(ref)
    assert_same_state(final_state(out), final_state(ref))


def test_amp_bf16_on_cpu_and_fp16_refused(data, tmp_path):
    cfg = tiny_cfg(epochs=1)
    cfg.train.amp = "bf16"
    t = make_trainer(data, tmp_path / "bf16", cfg=cfg)
    metrics = t.train()
    t.close()
    rows = read_csv(tmp_path / "bf16" / "train_log.csv")
    assert len(rows) == 4 and all(float(r["loss"]) > 0 for r in rows)
    assert metrics is not None and "AP" in metrics
    cfg = tiny_cfg(epochs=1)
    cfg.train.amp = "fp16"
    with pytest.raises(ValueError, match="fp16 AMP needs a CUDA device"):
        make_trainer(data, tmp_path / "fp16", cfg=cfg)
