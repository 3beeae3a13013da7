"""The command-line tools: --help, an end-to-end train -> eval -> infer run, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from detector import eval as eval_cli
from detector import infer as infer_cli
from detector import main_job
from detector import train as train_cli
from detector.data.synthetic import SyntheticConfig, generate_dataset

REPO = Path(__file__).resolve().parents[2]
METRIC_KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl", "score_iou_pearson"}


@pytest.mark.parametrize(
    "module, flags",
    [
        (
            "detector.train",
            [
                "--train-ann",
                "--train-images",
                "--val-ann",
                "--val-images",
                "--output",
                "--config",
                "--epochs",
                "--resume",
                "--seed",
                "--amp",
            ],
        ),
        ("detector.eval", ["--checkpoint", "--ann", "--images", "--output"]),
        ("detector.infer", ["--checkpoint", "--input", "--output", "--score-thr"]),
        ("detector.main_job", ["--data", "--output", "--seed"]),
        ("detector.data.synthetic", ["--num-train", "--seed"]),
    ],
)
def test_help(module, flags):
    r = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    for f in flags:
        assert f in r.stdout, f


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return generate_dataset(
        root, SyntheticConfig(num_train=6, num_val=3, seed=8, image_size_range=(96, 128))
    )


def _train_args(data, out, *extra):
    return [
        "--config",
        "gfl_tiny_test",
        "--train-ann",
        str(data["train_ann"]),
        "--train-images",
        str(data["train_images"]),
        "--val-ann",
        str(data["val_ann"]),
        "--val-images",
        str(data["val_images"]),
        "--output",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--set",
        "data.img_scale=(128,128)",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train_cli.main(_train_args(data, out, "--seed", "3")) == 0
    return out


def test_train_outputs(trained):
    for f in (
        "latest.pth",
        "epoch_1.pth",
        "config.json",
        "train_log.csv",
        "eval_log.csv",
        "metrics.json",
        "train.log",
    ):
        assert (trained / f).is_file(), f
    assert list((trained / "tb").glob("events.out.tfevents.*"))
    assert METRIC_KEYS <= set(json.loads((trained / "metrics.json").read_text()))
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["name"] == "gfl_tiny_test" and cfg["train"]["seed"] == 3
    assert cfg["data"]["img_scale"] == [128, 128] and cfg["model"]["num_classes"] == 4


def test_eval_cli(data, trained, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = eval_cli.main(
        [
            "--checkpoint",
            str(trained / "latest.pth"),
            "--ann",
            str(data["val_ann"]),
            "--images",
            str(data["val_images"]),
            "--output",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
            "--score-thr",
            "0.0",
        ]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics) and metrics["num_images"] == 3
    dets = json.loads((out / "detections.json").read_text())
    assert dets and {"image_id", "category_id", "bbox", "score"} <= set(dets[0])
    printed = capsys.readouterr().out
    assert "AP50" in printed and "score-IoU r" in printed


def test_eval_cli_drops_undecodable_image(data, trained, tmp_path, capsys):
    import shutil

    imgs = tmp_path / "imgs"
    shutil.copytree(data["val_images"], imgs)
    next(iter(sorted(imgs.iterdir()))).write_bytes(b"\x89PNG broken")
    rc = eval_cli.main(
        [
            "--checkpoint",
            str(trained / "latest.pth"),
            "--ann",
            str(data["val_ann"]),
            "--images",
            str(imgs),
            "--output",
            str(tmp_path / "e"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["num_images"] == 2 and m["skipped_images"] == 1
    assert "1 undecodable images were left out" in capsys.readouterr().out


def test_infer_cli(data, trained, tmp_path):
    out = tmp_path / "vis"
    rc = infer_cli.main(
        [
            "--checkpoint",
            str(trained / "latest.pth"),
            "--input",
            str(data["val_images"]),
            "--output",
            str(out),
            "--score-thr",
            "0.0",
            "--device",
            "cpu",
            "--limit",
            "2",
        ]
    )
    assert rc == 0
    for stem in ("000000", "000001"):
        for suffix in ("_det.png", "_dist.png"):
            with Image.open(out / f"{stem}{suffix}") as im:
                assert im.size[0] > 50
    res = json.loads((out / "detections.json").read_text())
    assert len(res) == 2 and res[0]["detections"]
    d = res[0]["detections"][0]
    assert d["name"] in ("ellipse", "rectangle", "triangle", "cross") and len(d["bbox"]) == 4


def test_infer_single_image_and_bad_file(data, trained, tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    img = next(iter(sorted(Path(data["val_images"]).iterdir())))
    (folder / "ok.png").write_bytes(img.read_bytes())
    (folder / "bad.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "o"
    assert (
        infer_cli.main(
            [
                "--checkpoint",
                str(trained / "latest.pth"),
                "--input",
                str(folder),
                "--output",
                str(out),
                "--device",
                "cpu",
                "--no-distributions",
            ]
        )
        == 0
    )
    assert (out / "ok_det.png").is_file() and not (out / "bad_det.png").exists()
    assert "bad.jpg" in caplog.text and "cannot decode" in caplog.text
    assert (
        infer_cli.main(
            [
                "--checkpoint",
                str(trained / "latest.pth"),
                "--input",
                str(folder / "ok.png"),
                "--output",
                str(tmp_path / "o2"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )


# ------------------------------------------------------------------------------ bad input
def test_train_missing_annotation_file(data, tmp_path, capsys):
    args = _train_args(data, tmp_path / "o")
    args[args.index("--train-ann") + 1] = str(tmp_path / "missing.json")
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "missing.json: annotation file not found" in err


def test_train_bad_override_and_config(data, tmp_path, capsys):
    assert train_cli.main(_train_args(data, tmp_path / "o", "--set", "train.nope=1")) == 2
    assert "unknown train key 'nope'" in capsys.readouterr().err
    assert train_cli.main(_train_args(data, tmp_path / "o", "--set", "model.depth=19")) == 2
    assert "depth must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main(_train_args(data, tmp_path / "o", "--config", "no_such_config"))


def test_eval_checkpoint_for_another_config(data, trained, tmp_path, capsys):
    rc = eval_cli.main(
        [
            "--checkpoint",
            str(trained / "latest.pth"),
            "--ann",
            str(data["val_ann"]),
            "--images",
            str(data["val_images"]),
            "--output",
            str(tmp_path),
            "--config",
            "gfl_r18_synthetic_cpu",
            "--device",
            "cpu",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert (
        "latest.pth: checkpoint was trained with config 'gfl_tiny_test', not "
        "'gfl_r18_synthetic_cpu'" in err
    )
    assert "reg_max" in err


def test_eval_checkpoint_with_wrong_weights_or_classes(data, trained, tmp_path, capsys):
    ck = torch.load(trained / "latest.pth", map_location="cpu", weights_only=False)
    ck["config"]["model"]["reg_max"] = 8  # the weights no longer fit the model
    torch.save(ck, tmp_path / "mismatch.pth")
    rc = eval_cli.main(
        [
            "--checkpoint",
            str(tmp_path / "mismatch.pth"),
            "--ann",
            str(data["val_ann"]),
            "--images",
            str(data["val_images"]),
            "--output",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "mismatch.pth: weights do not fit this model" in err and "shape mismatch" in err

    ann = json.loads(Path(data["val_ann"]).read_text())
    ann["categories"] = ann["categories"][:3]
    ann["annotations"] = [
        a for a in ann["annotations"] if a["category_id"] in {c["id"] for c in ann["categories"]}
    ]
    (tmp_path / "three.json").write_text(json.dumps(ann))
    rc = eval_cli.main(
        [
            "--checkpoint",
            str(trained / "latest.pth"),
            "--ann",
            str(tmp_path / "three.json"),
            "--images",
            str(data["val_images"]),
            "--output",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    assert rc == 2
    assert "checkpoint was trained on categories [1, 2, 4, 7]" in capsys.readouterr().err


def test_corrupt_checkpoint(data, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 64)
    rc = eval_cli.main(
        [
            "--checkpoint",
            str(bad),
            "--ann",
            str(data["val_ann"]),
            "--images",
            str(data["val_images"]),
            "--output",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    assert rc == 2 and "bad.pth: cannot read checkpoint" in capsys.readouterr().err
    rc = infer_cli.main(
        [
            "--checkpoint",
            str(bad),
            "--input",
            str(data["val_images"]),
            "--output",
            str(tmp_path / "v"),
        ]
    )
    assert rc == 2


@pytest.mark.slow
def test_main_job_smoke(tmp_path, capsys):
    """The main job's whole pipeline on a very small dataset (the real run is in the README)."""
    rc = main_job.main(
        [
            "--data",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "out"),
            "--num-train",
            "8",
            "--num-val",
            "3",
            "--epochs",
            "1",
            "--no-progress",
            "--set",
            "data.img_scale=(128,128)",
            "--set",
            "model.fpn_channels=16",
            "--set",
            "model.feat_channels=16",
            "--set",
            "model.stacked_convs=1",
            "--set",
            "model.gn_groups=4",
            "--vis-images",
            "1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "AP50" in out and "wall time" in out
    assert (tmp_path / "out" / "metrics.json").is_file()
    assert (tmp_path / "out" / "vis" / "000000_det.png").is_file()
    # running it again continues from the finished checkpoint instead of retraining
    rc = main_job.main(
        [
            "--data",
            str(tmp_path / "data"),
            "--output",
            str(tmp_path / "out"),
            "--num-train",
            "8",
            "--num-val",
            "3",
            "--epochs",
            "1",
            "--no-progress",
            "--set",
            "data.img_scale=(128,128)",
            "--set",
            "model.fpn_channels=16",
            "--set",
            "model.feat_channels=16",
            "--set",
            "model.stacked_convs=1",
            "--set",
            "model.gn_groups=4",
            "--vis-images",
            "1",
        ]
    )
    assert rc == 0
