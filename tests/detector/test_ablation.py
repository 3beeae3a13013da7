"""The ablation runner (detector/ablation) and the model options it sweeps: Gaussian boxes,
General boxes without DFL, and an L2 loss on the joint score."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detector.ablation import worker
from detector.ablation.__main__ import main as ablation_main
from detector.ablation.data import coco_folder, subset
from detector.ablation.plan import BUDGETS, Budget, base_config, budget_id, plan_runs, run_key
from detector.ablation.publish import write_report
from detector.ablation.report import orderings, ranks, render_markdown, summarize
from detector.ablation.results import read_rows, write_rows
from detector.ablation.runner import SweepOptions, group_tasks
from detector.ablation.studies import STUDIES
from detector.config import CONFIGS, get_config
from detector.data.synthetic import SyntheticConfig, generate_dataset
from detector.models import VARIANTS, ModelConfig, build_detector
from detector.models.anchors import AnchorGenerator
from detector.models.losses import DetectionLoss, gaussian_nll, l2_joint_score_loss

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """16 training images (2 iterations of the smoke budget's batch 8) and 4 validation ones."""
    root = tmp_path_factory.mktemp("shapes")
    generate_dataset(
        root, SyntheticConfig(num_train=16, num_val=4, seed=5, image_size_range=(96, 128))
    )
    return root


# ============================================================================ model options


def test_gaussian_nll_hand_case():
    mean = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    log_sigma = torch.tensor([0.0, math.log(2.0), -10.0], requires_grad=True)
    target = torch.tensor([3.0, 2.0, 1.5])
    nll = gaussian_nll(mean, log_sigma, target)
    # (3-1)^2 / 2 + 0;  0 + log 2;  log-sigma clamped to -3: 1 / (2 e^-6) - 3
    want = torch.tensor([2.0, math.log(2.0), 0.5 * math.exp(6.0) - 3.0])
    assert torch.allclose(nll, want, rtol=1e-6)
    nll.sum().backward()
    # d/dmean = (mean - y) / sigma^2;  d/dlog_sigma = 1 - (y - mean)^2 / sigma^2 (0 when clamped)
    assert torch.allclose(mean.grad, torch.tensor([-2.0, 0.0, -math.exp(6.0)]), rtol=1e-6)
    assert torch.allclose(log_sigma.grad, torch.tensor([1.0 - 4.0, 1.0, 0.0]), rtol=1e-6)


def test_l2_joint_score_loss_hand_case():
    logits = torch.zeros(2, 3, requires_grad=True)  # every probability 0.5
    labels = torch.tensor([1, 3])  # 3 = background
    scores = torch.tensor([0.8, 0.0])
    loss = l2_joint_score_loss(logits, labels, scores)
    assert loss.item() == pytest.approx(0.25 + 0.09 + 0.25 + 3 * 0.25)
    loss.backward()
    # d/dx (sigmoid(x) - y)^2 = 2 (p - y) p (1 - p)
    want = torch.full((2, 3), 2 * 0.5 * 0.25)
    want[0, 1] = 2 * (0.5 - 0.8) * 0.25
    assert torch.allclose(logits.grad, want)
    weighted = l2_joint_score_loss(logits, labels, scores, torch.tensor([1.0, 0.0]))
    assert weighted.item() == pytest.approx(0.59)


def test_l2_score_variant_loss_without_positives():
    """No ground truth: the L2 classification loss is sum(p^2) / (images counted as 1 each)."""
    cfg = ModelConfig(depth=18, num_classes=3, variant="qfl", cls_loss="l2")
    anchors = AnchorGenerator((8, 16, 32, 64, 128))(
        [(-(-64 // s), -(-64 // s)) for s in (8, 16, 32, 64, 128)]
    )
    n = anchors.boxes.size(0)
    cls = torch.randn(2, n, 3, requires_grad=True)
    reg = torch.randn(2, n, 4, requires_grad=True)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    out = DetectionLoss(cfg)(cls, reg, None, anchors, empty)
    assert out["loss_cls"].item() == pytest.approx(cls.sigmoid().pow(2).sum().item() / 2, rel=1e-5)
    out["loss"].backward()
    assert cls.grad.abs().sum() > 0


def _batch():
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    targets = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 90.0, 90.0]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.tensor([[20.0, 20.0, 44.0, 40.0]]), "labels": torch.tensor([1])},
    ]
    return images, targets


TINY = dict(
    depth=18,
    num_classes=3,
    fpn_channels=16,
    feat_channels=16,
    stacked_convs=1,
    gn_groups=4,
    reg_max=4,
)


def test_gaussian_boxes_train_means_and_sigmas():
    torch.manual_seed(0)
    model = build_detector(TINY, variant="atss", box_repr="gaussian")
    assert model.head.reg_channels == 8 and model.loss_names[-1] == "loss"
    assert "loss_nll" in model.loss_names and "loss_dfl" not in model.loss_names
    out = model(*_batch())
    assert list(out) == model.loss_names and all(torch.isfinite(v) for v in out.values())
    out["loss_nll"].backward()
    g = model.head.reg_out.weight.grad  # (8, C, 3, 3): 4 means, 4 log-sigmas
    assert g[:4].abs().sum() > 0 and g[4:].abs().sum() > 0
    model.eval()
    dets = model.predict(_batch()[0])
    assert len(dets) == 2 and dets[0]["boxes"].shape[1] == 4
    with pytest.raises(ValueError, match="General"):
        model.predict(_batch()[0], with_distributions=True)


def test_general_without_dfl_has_no_dfl_term():
    model = build_detector(TINY, variant="atss", box_repr="general", dfl_loss=False)
    assert model.head.reg_channels == 4 * 5 and model.coder.use_dfl
    out = model(*_batch())
    assert "loss_dfl" not in out and "loss_centerness" in out
    out["loss"].backward()
    assert model.head.reg_out.weight.grad.abs().sum() > 0  # GIoU alone trains the bins


def test_option_defaults_keep_every_variant_and_config():
    for variant, (qfl, dfl) in VARIANTS.items():
        c = ModelConfig(variant=variant)
        assert (c.use_qfl, c.use_dfl, c.with_centerness) == (qfl, dfl, not qfl)
        assert c.box_representation == ("general" if dfl else "dirac")
        assert c.classification_loss == ("qfl" if qfl else "focal")
    new = {"box_repr", "dfl_loss", "cls_loss", "loss_nll_weight"}
    for name in CONFIGS:  # stored model dicts (and so checkpoints) never name the new options
        assert not new & set(get_config(name).model)
    with pytest.raises(ValueError, match="dfl_loss needs"):
        ModelConfig(variant="atss", dfl_loss=True)
    with pytest.raises(ValueError, match="does not fit"):
        ModelConfig(variant="atss", cls_loss="l2")
    with pytest.raises(ValueError, match="does not fit"):
        ModelConfig(variant="gfl", cls_loss="focal")
    with pytest.raises(ValueError, match="box_repr"):
        ModelConfig(box_repr="laplace")


# ============================================================================ studies and plan


def _all_settings():
    return [(st.name, s.name) for st in STUDIES.values() for s in st.settings]


def _smoke_base():
    return base_config("gfl_r18_synthetic_cpu", BUDGETS["smoke"])


@pytest.fixture(scope="module")
def fake_dataset(tiny_data):
    return coco_folder(tiny_data)


def test_every_setting_builds_and_trains_one_step(fake_dataset):
    """Each distinct experiment of every study: one SGD step, finite losses, weights move."""
    specs = plan_runs(list(STUDIES.values()), [0], _smoke_base(), fake_dataset)
    assert {(s.study, s.setting) for s in specs} == set(_all_settings())
    images, targets = _batch()
    seen = set()
    for spec in specs:
        if spec.key in seen:
            continue
        seen.add(spec.key)
        torch.manual_seed(0)
        model = build_detector({**spec.config.model, "num_classes": 3})
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        before = model.head.reg_out.weight.detach().clone()
        out = model(images, targets)
        assert all(torch.isfinite(v) for v in out.values()), (spec.study, spec.setting, out)
        out["loss"].backward()
        opt.step()
        assert not torch.equal(before, model.head.reg_out.weight), (spec.study, spec.setting)
    assert len(seen) == 16  # 22 settings, 6 of which repeat another study's experiment


def test_shared_settings_share_runs_and_keys_follow_the_budget(fake_dataset):
    base = _smoke_base()
    specs = plan_runs(list(STUDIES.values()), [0, 1], base, fake_dataset)
    key = {(s.study, s.setting, s.seed): s.key for s in specs}
    assert key["table3", "qfl", 0] == key["beta", "beta=2", 0] == key["l2_score", "qfl", 0]
    assert key["table3", "atss", 0] == key["representation", "dirac", 0]
    assert key["table3", "dfl", 0] == key["representation", "general+dfl", 0]
    assert key["table3", "gfl", 0] == key["bins", "n=8", 0]  # the base config's reg_max
    assert key["table3", "qfl", 0] != key["table3", "qfl", 1]
    assert len({k for (st, _, sd), k in key.items() if sd == 0 and st in ("table3", "beta")}) == 8
    # bookkeeping does not change a run; the schedule and the data do
    spec = specs[0]
    cfg = spec.config
    cfg.data.num_workers, cfg.train.log_interval = 7, 3
    assert run_key(cfg, fake_dataset) == spec.key
    cfg.train.epochs += 1
    assert run_key(cfg, fake_dataset) != spec.key
    other = subset(fake_dataset, 8, None, fake_dataset.train_ann.parent / "cut")
    assert budget_id(base, other) != budget_id(base, fake_dataset)


def test_tasks_group_shared_runs(tmp_path, fake_dataset):
    base = _smoke_base()
    specs = plan_runs([STUDIES["table3"], STUDIES["beta"]], [0], base, fake_dataset)
    opts = SweepOptions(
        tmp_path / "out", tmp_path / "work", fake_dataset, "smoke", budget_id(base, fake_dataset)
    )
    already, tasks = group_tasks(specs, opts, record=lambda rows: None)
    assert already == 0 and len(tasks) == 8
    shared = [t for t in tasks if len(t.specs) == 2]
    assert [(s.study, s.setting) for s in shared[0].specs] == [
        ("table3", "qfl"),
        ("beta", "beta=2"),
    ]


def test_budget_scales_the_lr_steps():
    cfg = base_config("gfl_r18_synthetic_cpu", Budget("b", epochs=6))
    assert cfg.train.epochs == 6 and cfg.train.lr_steps == (5,)
    cfg = base_config("gfl_r50_1x_coco", Budget("b", epochs=6, img_size=512))
    assert cfg.train.lr_steps == (4, 5) and cfg.data.img_scale == (512, 512)
    assert base_config("gfl_r50_1x_coco", BUDGETS["full"]).train.lr_steps == (8, 11)


# ============================================================================ tables


def _row(setting, seed, ap, r=0.5, budget="b1", study="table3"):
    return {
        "study": study,
        "setting": setting,
        "seed": str(seed),
        "AP": repr(ap),
        "AP50": repr(ap + 0.2),
        "AP75": repr(ap),
        "APs": "-1.0",
        "APm": repr(ap),
        "APl": repr(ap),
        "score_iou_r": repr(r),
        "train_seconds": "100",
        "budget_id": budget,
        "budget": "test",
        "dataset": "d",
        "epochs": "1",
        "iterations": "2",
        "img_size": "64",
        "commit": "abc",
        "device": "cpu",
        "torch": "2",
        "run_key": f"{setting}{seed}",
    }


TABLE3_ROWS = (
    [_row("atss", s, ap, r=0.6) for s, ap in enumerate((0.30, 0.32, 0.34))]
    + [_row("qfl", s, ap) for s, ap in enumerate((0.40, 0.41, 0.42))]
    + [_row("dfl", s, 0.31) for s in (0, 1)]
    + [_row("gfl", 0, 0.29, r=0.7)]
)


def test_summary_statistics_from_rows():
    sums = {s.setting.name: s for s in summarize(STUDIES["table3"], TABLE3_ROWS)}
    ap = sums["atss"].stats["AP"]
    assert (ap.mean, ap.std, ap.n) == (pytest.approx(32.0), pytest.approx(2.0), 3)
    assert sums["qfl"].stats["AP"].std == pytest.approx(1.0)
    assert sums["dfl"].stats["AP"].std == pytest.approx(0.0)
    assert sums["gfl"].seeds == 1 and math.isnan(sums["gfl"].stats["AP"].std)
    assert sums["atss"].stats["APs"].n == 0  # COCOeval's -1 is "no value"
    assert sums["atss"].stats["r"].mean == pytest.approx(0.6)
    assert ranks({"a": 1.0, "b": 2.0, "c": 2.0, "d": math.nan}) == {"a": 3, "b": 1, "c": 1}


def test_orderings_from_rows():
    sums = summarize(STUDIES["table3"], TABLE3_ROWS)
    by_pair = {(o.better, o.worse): o for o in orderings(sums, "AP")}
    # paper: gfl 40.2 > qfl 39.9 > dfl 39.5 > atss 39.2: all six pairs are claims
    assert set(by_pair) == {
        ("qfl", "atss"),
        ("dfl", "atss"),
        ("gfl", "atss"),
        ("qfl", "dfl"),
        ("gfl", "qfl"),
        ("gfl", "dfl"),
    }
    o = by_pair["qfl", "atss"]
    assert o.paper_gap == pytest.approx(0.7) and o.gap == pytest.approx(9.0)
    assert o.se == pytest.approx(math.sqrt(4 / 3 + 1 / 3)) and o.reproduced and o.clearly
    assert by_pair["dfl", "atss"].reproduced is False  # 31 < 32
    assert by_pair["qfl", "dfl"].reproduced and by_pair["qfl", "dfl"].clearly
    assert by_pair["gfl", "qfl"].reproduced is False
    assert math.isnan(by_pair["gfl", "dfl"].se) and not by_pair["gfl", "dfl"].clearly
    (r,) = orderings(sums, "r")
    assert (r.better, r.worse, r.reproduced) == ("gfl", "atss", True)
    # ties in the paper are no claim: bins n=14 vs n=16 (both 40.2)
    bins = orderings(summarize(STUDIES["bins"], []), "AP")
    assert ("n=14", "n=16") not in {(o.better, o.worse) for o in bins}
    assert all(o.reproduced is None for o in bins)


def test_markdown_and_plots_from_a_csv(tmp_path):
    rows = TABLE3_ROWS + [_row("atss", 0, 0.9, budget="other")]
    write_rows(tmp_path / "table3.csv", rows)
    md = write_report(STUDIES["table3"], tmp_path, "b1").read_text()
    assert "| ATSS (focal loss + centre-ness, Dirac box) | 39.2 | 32.0 ± 2.0 |" in md
    assert "AP orderings reproduced: **2 of 6** (2 clearly" in md
    assert "score–IoU r orderings reproduced: **1 of 1**" in md
    assert "1 row(s) of other budgets" in md and (tmp_path / "table3.png").stat().st_size > 0
    beta = [
        _row(f"beta={b:g}", s, 0.3 + 0.01 * b + 0.005 * s, study="beta")
        for b in (0, 1, 2, 2.5, 4)
        for s in (0, 1)
    ]
    write_rows(tmp_path / "beta.csv", beta)
    md = write_report(STUDIES["beta"], tmp_path).read_text()  # budget of the last row
    assert "| β = 4 | 38.2 | 34.2 ± 0.4 |" in md and (tmp_path / "beta.png").is_file()
    assert render_markdown(STUDIES["bins"], []).count("| — |") >= 6


# ============================================================================ running


def _wait_for(cond, proc, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"sweep exited early: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("sweep made no progress")


def test_killed_sweep_continues_and_finished_runs_are_skipped(tmp_path, tiny_data, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    args = [
        "l2_score",
        "--settings",
        "atss,l2",
        "--seeds",
        "1",
        "--budget",
        "smoke",
        "--max-train-images",
        "8",
        "--data",
        str(tiny_data),
        "--output",
        str(out),
        "--work-dir",
        str(work),
        "--threads",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "detector.ablation", *args]
    p = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_for(lambda: len(read_rows(out / "l2_score.csv")) == 1, p)
    p.kill()  # no warning: its worker gets SIGTERM from the kernel
    p.communicate()
    (first,) = read_rows(out / "l2_score.csv")
    assert first["setting"] == "atss" and first["budget"].startswith("smoke")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 runs in this sweep: 1 already finished, 1 to train" in r.stdout
    rows = read_rows(out / "l2_score.csv")
    assert [x["setting"] for x in rows] == ["atss", "l2"] and rows[0] == first
    for x in rows:
        assert 0.0 <= float(x["AP"]) <= 1.0 and float(x["train_seconds"]) > 0
        assert x["torch"] == torch.__version__ and x["commit"] and x["device"]
    assert not list(work.glob("*/*.pth"))  # checkpoints of finished runs
    md = (out / "l2_score.md").read_text()
    assert "joint score + L2" in md and (out / "l2_score.png").is_file()
    # again: nothing to train; and another study's identical setting copies the finished row
    assert ablation_main(args) == 0
    assert "2 runs in this sweep: 2 already finished, 0 to train" in capsys.readouterr().out
    assert read_rows(out / "l2_score.csv") == rows
    assert ablation_main(["table3", "--settings", "atss", *args[3:]]) == 0
    assert "1 runs in this sweep: 1 already finished, 0 to train" in capsys.readouterr().out
    (copied,) = read_rows(out / "table3.csv")
    assert copied["study"] == "table3" and copied["run_key"] == first["run_key"]


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, tiny_data, caplog):
    """A worker stopped after 1 of 2 iterations leaves a checkpoint; the next attempt resumes
    there, adds its training time to the first one's and finishes with a result."""
    dataset = coco_folder(tiny_data)
    base = _smoke_base()
    (spec,) = plan_runs([STUDIES["table3"]], [0], base, dataset)[3:]  # gfl
    run_dir = tmp_path / spec.key
    run_dir.mkdir()
    job = {
        "config": spec.config.to_dict(),
        "paths": dataset.paths(),
        "device": "cpu",
        "threads": 1,
        "stop_after_iters": 1,
    }
    worker.write_json(run_dir / "run.json", job)
    assert worker.run(run_dir) == 3
    from detector.checkpoint import read_checkpoint

    assert read_checkpoint(run_dir / "latest.pth")["progress"]["global_step"] == 1
    first = worker.read_json(run_dir / "progress.json")["train_seconds"]
    worker.write_json(run_dir / "run.json", {**job, "stop_after_iters": None})
    with caplog.at_level("INFO", logger="detector"):
        assert worker.run(run_dir) == 0
    assert "global step 1" in caplog.text
    result = worker.read_json(run_dir / "result.json")
    assert result["iterations"] == 2 and result["train_seconds"] > first
    assert not (run_dir / "latest.pth").exists()


def test_study_page_names_the_command_that_made_it():
    from detector.ablation.report import _command

    default = [{"budget": "default (gfl_r18_synthetic_cpu, 8 epochs)", "dataset": "embedded:v1"}]
    assert _command("table3", default, 3) == "python -m detector.ablation table3"
    coco = [{"budget": "full (gfl_r50_1x_coco)", "dataset": "/data/coco"}]
    assert _command("beta", coco, 1) == (
        "python -m detector.ablation beta --budget full --data /data/coco --seeds 1"
    )
    assert "made with: `python -m detector.ablation bins`" in render_markdown(
        STUDIES["bins"], default
    )
