"""Smoke tests of the benchmark harness: the documented command runs end to end on tiny sizes.

They prove that ``python -m benchmarks.run`` measures every op in both modes, that its providers
compute the same numbers as the float64 reference (so the timings compare like with like), and
that the CSV, the plots and summary.md are written.  Numbers here are not results: --quick uses
tiny sizes and a few repetitions, in a temporary folder.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# benchmarks/ is not an installed package: run from a plain `pytest`, the repository root is not
# necessarily on sys.path (python -m pytest adds the working directory, pytest does not).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import cases, report  # noqa: E402


def _run(args: list[str], tmp_path: Path, timeout: int = 240) -> list[dict[str, str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--csv",
            "bench.csv",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "bench.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_csv_plots_and_summary(tmp_path: Path) -> None:
    # The compile peer is exercised by the next test: compiling here would take most of a minute.
    rows = _run(
        [
            "--quick",
            "--dtypes",
            "float32",
            "--providers",
            "eager,ultralytics,gfl_ops-cpu,gfl_ops-cuda",
        ],
        tmp_path,
    )
    seen = {(r["op"], r["mode"], r["provider"]) for r in rows}
    for op in cases.OPS:
        for mode in cases.MODES:
            assert (op, mode, "eager") in seen
            if op != "qfl":
                assert (op, mode, "ultralytics") in seen
    for r in rows:
        assert not r["notes"].startswith("error"), r
        assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["p80_ms"])
        assert float(r["floor_ms"]) > 0 and float(r["frac_copy_bw"]) > 0
        # every provider computes the reference's numbers (float32 vs float64 yardstick)
        assert float(r["rel_err_fp64"]) < 1e-4, r
        assert r["git_commit"] and r["device_type"] == "cpu" and r["torch"] == torch.__version__
        if r["provider"] == "eager":
            assert float(r["speedup_vs_eager"]) == pytest.approx(1.0)
        if r["peak_extra_mb"]:
            assert float(r["peak_extra_mb"]) >= 0
    # fwd+bwd must allocate at least the gradient (sanity of the memory measurement)
    for r in rows:
        if r["mode"] == "fwd+bwd" and r["peak_extra_mb"]:
            assert float(r["extra_per_grad"]) >= 0.99, r
    summary = (tmp_path / "summary.md").read_text()
    assert "Quality Focal Loss" in summary and "Core targets" in summary
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # plots are optional; the tables are not
        return
    assert len(pngs) == 3, pngs
    assert all(f"]({name})" in summary for name in pngs)


def test_compile_peer_and_report(tmp_path: Path) -> None:
    rows = _run(
        [
            "--quick",
            "--ops",
            "integral",
            "--modes",
            "fwd",
            "--dtypes",
            "float32",
            "--providers",
            "eager,compile",
            "--no-memory",
        ],
        tmp_path,
    )
    comp = [r for r in rows if r["provider"] == "compile"]
    assert len(comp) == 1 and not comp[0]["notes"], comp
    assert float(comp[0]["compile_s"]) >= 0 and float(comp[0]["speedup_vs_compile"]) == 1.0
    # regenerating the report from the CSV alone works and is idempotent
    first = report.generate(tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert [p.name for p in first] == [p.name for p in report.generate(tmp_path)]
    assert (tmp_path / "summary.md").read_text() == text
    assert "compile" in text and "Softmax integral" in text


def test_presets_and_floor() -> None:
    core = cases.preset_cases("core-targets", "cpu")
    assert {(c.op, c.size) for c in core} == {
        ("qfl", "40000x80"),
        ("dfl", "32000x17"),
        ("dfl", "160000x17"),
        ("integral", "32000x17"),
        ("integral", "160000x17"),
    }
    full_cpu = cases.preset_cases("full", "cpu")
    full_gpu = cases.preset_cases("full", "cuda")
    assert all(c.elements <= 25_000_000 for c in full_cpu)
    assert {c.size for c in full_gpu if c.op == "qfl"} >= {"640000x365", "1000x20", "40000x80"}
    assert {c.size for c in full_cpu if c.core} == {"40000x80", "32000x17", "160000x17"}
    # floor: pred read once (+ labels/scores/weight), loss written; fwd+bwd adds one gradient
    c = cases.Case("qfl", 10, 4)
    assert cases.floor_bytes(c, torch.float32, "fwd") == 10 * 4 * 4 + 10 * 16 + 4
    assert (
        cases.floor_bytes(c, torch.float32, "fwd+bwd") - cases.floor_bytes(c, torch.float32, "fwd")
    ) == 10 * 4 * 4
    i = cases.Case("integral", 8, 17)
    assert cases.floor_bytes(i, torch.bfloat16, "fwd+bwd") == 2 * (8 * 17 * 2) + 2 * (8 * 2)


def test_inputs_look_like_a_detector_batch() -> None:
    c = cases.Case("qfl", 5000, 80)
    inp = cases.make_inputs(c, torch.bfloat16, torch.device("cpu"), True, seed=0)
    pred, labels, scores, weight, avg = inp.args
    pos = (labels < 80).sum().item()
    assert pos == round(cases.POS_FRACTION * 5000) == avg
    assert pred.dtype == torch.bfloat16 and pred.requires_grad and scores.dtype == torch.float32
    assert ((labels >= 0) & (labels <= 80)).all() and bool((weight == 1).all())
    d = cases.make_inputs(cases.Case("dfl", 100, 17), torch.float32, torch.device("cpu"), False, 1)
    assert float(d.args[1].max()) <= 15.9 and d.args[3] == 4.0


def test_e2e_loss_step_quick(tmp_path: Path) -> None:
    pytest.importorskip("detector.losses")
    from benchmarks import csvio, e2e_loss_step

    assert (
        e2e_loss_step.main(["--quick", "--no-step", "--device", "cpu", "--out", str(tmp_path)]) == 0
    )
    rows = csvio.read_rows(tmp_path / csvio.E2E_CSV)
    assert {r["losses"] for r in rows} >= {"reference"}
    for r in rows:
        assert float(r["loss_ms"]) > 0 and float(r["assign_ms"]) > 0
        assert int(r["positives"]) > 0 and not r["notes"], r  # same loss value as reference
    assert "End to end" in (tmp_path / "summary.md").read_text()


def test_framework_peers_are_the_real_modules() -> None:
    """The framework peers are the frameworks' own modules (not re-writes), mmdetection's with
    the test-only stand-in for mmcv's compiled ops where mmcv-lite has none."""
    from ultralytics.nn.modules.block import DFL

    from benchmarks import peers

    status = peers.peer_status()
    assert status["ultralytics"] == "available"
    assert status["mmdet"] == "available"
    device = torch.device("cpu")
    (integral,) = [
        p
        for p in peers.build_providers(
            "integral", torch.float32, device, 17, {"qfl": None, "dfl": None, "integral": None}
        )
        if p.name == "ultralytics"
    ]
    assert isinstance(integral.fn, DFL)
    from mmdet.models.losses import DistributionFocalLoss

    (mmdet_dfl,) = [
        p
        for p in peers.build_providers(
            "dfl",
            torch.float32,
            torch.device("cpu"),
            17,
            {"qfl": None, "dfl": None, "integral": None},
        )
        if p.name == "mmdet"
    ]
    assert any(
        isinstance(c.cell_contents, DistributionFocalLoss) for c in mmdet_dfl.fn.__closure__ or ()
    )
    (dfl,) = [
        p
        for p in peers.build_providers(
            "dfl", torch.float32, device, 17, {"qfl": None, "dfl": None, "integral": None}
        )
        if p.name == "ultralytics"
    ]
    inputs = cases.make_inputs(cases.Case("dfl", 64, 17), torch.float32, device, False, seed=0)
    want = peers.EAGER["dfl"](
        *(
            a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in inputs.args
        )
    )
    torch.testing.assert_close(dfl.fn(*inputs.args).double(), want, rtol=1e-5, atol=0)
