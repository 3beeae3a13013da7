"""Two-process DistributedDataParallel on CPU (gloo) agrees with one process on the combined batch.

Real ``torch.distributed``: two processes started with ``torch.multiprocessing``, each with the
environment ``torchrun`` would give it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``PORT``), each running the ordinary :class:`Trainer`. Rank r trains on one image
per step, the single process on two, and the sampler makes global batch k the same pair of
images in both runs; the loss normalisers are averaged over ranks and DDP averages gradients, so
losses, weights and the (sharded, gathered) evaluation must agree.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from detector.checkpoint import read_checkpoint
from detector.config import get_config
from detector.data.synthetic import SyntheticConfig, generate_dataset
from detector.engine import Trainer, read_csv

LOSS_KEYS = ("loss_cls", "loss_bbox", "loss_dfl", "loss")


def _cfg(batch_size: int):
    cfg = get_config("gfl_tiny_test")  # BN in eval mode (norm_eval), GN head: per-sample ops
    cfg.train.epochs = 1
    cfg.train.eval_interval = 1
    cfg.data.img_scale = (128, 128)
    cfg.data.batch_size = batch_size
    cfg.data.eval_batch_size = 1
    # The GIoU/DFL normaliser (sum of the positives' max class scores, averaged over ranks) is
    # floored at 1, as in mmdetection; with the default prior 0.01 an untrained model's sum is
    # below 1 and the floor would bind differently for 1 and 2 processes. A higher prior keeps
    # it above 1, where DDP and the single process compute the same quantity.
    cfg.model["prior_prob"] = 0.3
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, paths: dict, out: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    t = Trainer(
        _cfg(batch_size=1),
        paths["train_ann"],
        paths["train_images"],
        paths["val_ann"],
        paths["val_images"],
        out,
        device="cpu",
        progress=False,
        tensorboard=False,
    )
    assert t.ctx.world_size == world and t.ctx.rank == rank
    t.train()
    t.close()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    paths = generate_dataset(
        tmp_path / "data",
        SyntheticConfig(num_train=6, num_val=3, seed=21, image_size_range=(128, 128)),
    )
    paths = {k: str(v) for k, v in paths.items()}

    single = tmp_path / "single"
    t = Trainer(
        _cfg(batch_size=2),
        paths["train_ann"],
        paths["train_images"],
        paths["val_ann"],
        paths["val_images"],
        single,
        device="cpu",
        progress=False,
        tensorboard=False,
    )
    assert t.iters_per_epoch == 3
    t.train()
    t.close()

    ddp = tmp_path / "ddp"
    mp.start_processes(
        _worker, args=(2, _free_port(), paths, str(ddp)), nprocs=2, join=True, start_method="spawn"
    )

    rows_s, rows_d = read_csv(single / "train_log.csv"), read_csv(ddp / "train_log.csv")
    assert (
        [r["global_step"] for r in rows_d] == [r["global_step"] for r in rows_s] == ["1", "2", "3"]
    )
    for rs, rd in zip(rows_s, rows_d):
        for k in LOSS_KEYS:
            assert float(rd[k]) == pytest.approx(float(rs[k]), rel=1e-4, abs=1e-6), k

    sd_s = read_checkpoint(single / "latest.pth")["model"]
    sd_d = read_checkpoint(ddp / "latest.pth")["model"]
    assert sd_s.keys() == sd_d.keys()
    for k in sd_s:
        torch.testing.assert_close(sd_d[k], sd_s[k], rtol=1e-4, atol=1e-5, msg=k)
    # the weights did move, so the comparison means something
    init = Trainer(
        _cfg(batch_size=2),
        paths["train_ann"],
        paths["train_images"],
        None,
        None,
        tmp_path / "init",
        device="cpu",
        progress=False,
        tensorboard=False,
    )
    moved = [
        k
        for k, v in init.model.state_dict().items()
        if v.is_floating_point() and not torch.allclose(v, sd_s[k])
    ]
    assert len(moved) > 10

    ev_s, ev_d = read_csv(single / "eval_log.csv"), read_csv(ddp / "eval_log.csv")
    for k in ("AP", "AP50", "AP75"):
        assert float(ev_d[0][k]) == pytest.approx(float(ev_s[0][k]), abs=1e-3)
