"""benchmarks/paper_bounds.py and kernel_sweep.py: the paper bounds a GPU run is compared with
are the code's and cover every case, and the GPU sweep's wiring works (rehearsed on the CPU
operators at tiny sizes)."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
import torch

from benchmarks import kernel_sweep as ks
from benchmarks import paper_bounds as pb


@pytest.fixture(scope="module")
def paper() -> list[dict[str, str]]:
    return pb.read_paper()


def test_paper_bounds_were_counted_from_the_current_cuda_sources(paper) -> None:
    stale = {row["sources_sha256"] for row in paper} - {pb.sources_sha256()}
    assert not stale, (
        "benchmarks/results/paper-bounds-sm90.csv was counted from other CUDA sources than "
        "these: regenerate it with `make paper-bounds` (python -m benchmarks.paper_bounds, "
        "~4 min on 2 cores, no GPU) and commit it with the kernel change"
    )


def test_paper_bounds_cover_every_launch_mode(paper) -> None:
    keys = {
        (r["kernel"], r["op"], r["mode"], r["dtype"], int(r["size"]), r["activated"], r["beta"])
        for r in paper
    }
    rows = set(
        ("rows", op, mode, dtype, bins, "", "")
        for op, mode, dtype, bins in itertools.product(
            pb.ROWS_OPS, pb.MODES, pb.DTYPES, pb.ROWS_BINS
        )
    )
    qfl = set(
        ("qfl", f"qfl_{form}", mode, dtype, c, str(act), beta)
        for form, mode, dtype, c, act, (beta, _, _) in itertools.product(
            ("labels", "dense"), pb.MODES, pb.DTYPES, pb.QFL_CLASSES, (0, 1), pb.QFL_BETAS
        )
    )
    assert keys == rows | qfl
    for r in paper:
        for field in ("bytes_per_elem", "slots_per_elem", "issue_bound_GBps"):
            assert float(r[field]) > 0, r
        if r["kernel"] == "rows":
            assert int(r["inflight_bytes_per_sm"]) > 0, r


def test_paper_bounds_agree_with_the_documented_tables(paper) -> None:
    """Spot checks against benchmarks/cuda_rows_kernel.md (Tables 1, 4, 5), cuda_qfl_kernel.md:
    the same counting code, so the same figures (H200's measured copy bandwidth, 4.3 TB/s)."""

    def bound(**key) -> float:
        (row,) = [r for r in paper if all(r[k] == str(v) for k, v in key.items())]
        return min(1.0, float(row["issue_bound_GBps"]) * 1e9 / 4.3e12)

    assert bound(kernel="rows", op="integral", mode="fwd", dtype="bf16", size=3) == pytest.approx(
        0.84, abs=0.006
    )
    assert bound(kernel="rows", op="integral", mode="fwd", dtype="bf16", size=17) == 1.0
    assert bound(kernel="rows", op="dfl", mode="fwd", dtype="bf16", size=2) == pytest.approx(
        0.84, abs=0.006
    )
    assert bound(kernel="rows", op="dfl", mode="fwd", dtype="bf16", size=7) == 1.0
    # Table 5: the runtime-count kernel, two rows side by side; its lowest case (73% before)
    assert bound(kernel="rows", op="integral", mode="fwd", dtype="bf16", size=19) == pytest.approx(
        0.85, abs=0.006
    )


def test_priority_puts_the_16_bit_rows_forward_first(paper) -> None:
    first = sorted(paper, key=ks.priority)[: 2 * len(pb.ROWS_BINS)]
    assert {(r["kernel"], r["mode"], r["dtype"]) for r in first} == {("rows", "fwd", "bf16")}


def test_sweep_dry_run_times_one_case_of_each_kernel_op_and_mode(tmp_path: Path) -> None:
    csv_path, md_path, _ = ks.run_sweep(
        torch.device("cpu"), tmp_path, budget_s=120, dry_run=True, device_name="cpu"
    )
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["op"], r["mode"]) for r in rows} == set(
        itertools.product(("integral", "dfl", "qfl_labels", "qfl_dense"), pb.MODES)
    )
    for r in rows:
        assert float(r["us"]) > 0 and float(r["GBps"]) > 0 and float(r["paper_pct_copy"]) > 0
    text = md_path.read_text()
    assert "12 of 12 cases" in text and "## Under target" in text and "commit" in text
    assert "regenerate" not in text  # the paper bounds are the current sources'


def test_sweep_reports_a_failing_case_and_goes_on(tmp_path: Path, monkeypatch) -> None:
    real = ks._inputs

    def failing_dfl(case, *args):
        if case["op"] == "dfl":
            raise RuntimeError("planted failure\nsecond line")
        return real(case, *args)

    monkeypatch.setattr(ks, "_inputs", failing_dfl)
    csv_path, md_path, _ = ks.run_sweep(
        torch.device("cpu"), tmp_path, budget_s=120, dry_run=True, device_name="cpu"
    )
    text = md_path.read_text()
    assert "## Errors: 3" in text and "RuntimeError: planted failure" in text, text
    assert "second line" not in text
    assert "9 of 12 cases" in text  # the others were timed


def test_sweep_keeps_the_rows_it_measured_when_stopped_from_outside(
    tmp_path: Path, monkeypatch
) -> None:
    """The GPU machine's time limit kills the run: every row timed before that is on disk."""
    real, calls = ks._median_seconds, []

    def stopped_at_the_fourth(fn, device):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # what a kill looks like from inside, near enough
        return real(fn, device)

    monkeypatch.setattr(ks, "_median_seconds", stopped_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        ks.run_sweep(torch.device("cpu"), tmp_path, budget_s=120, dry_run=True, device_name="cpu")
    with open(tmp_path / "gpu-sweep-cpu.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3


def test_code_only_drops_comments_and_layout_but_not_code() -> None:
    src = (
        'int a = 1;  // one\n/* two\n lines */ const char* s = "// not a comment";\nchar q = \'"\';'
    )
    assert pb.code_only(src) == 'int a = 1; const char* s = "// not a comment"; char q = \'"\';'
    assert pb.code_only("x = 1;\n  y = 2;") == pb.code_only("x = 1; y = 2;  // later")
    assert pb.code_only("x = 1;") != pb.code_only("x = 2;")


def test_sass_walk_follows_predicates_saved_to_a_register() -> None:
    """P2R (nvcc saves a predicate across a loop with it; the runtime-count rows kernel tests it
    again after its max pass): the walk keeps the value, so the branch on it stays decided."""
    from benchmarks.sass_lane import Lane
    from benchmarks.sass_listing import Instr

    lane = Lane({}, {})
    lane.p.update({0: True, 3: True, 5: False})
    # bits outside the mask come from the source register; P5 clears bit 5 of 0xF0
    for mask, src, want in ((0x8, 0, 0x8), (0x20, 0, 0), (0x29, 0xF0, 0xD9), (0x1, 0x1, 0x1)):
        lane.r[1] = src
        lane.execute(Instr(0, None, "P2R", ["R7", "PR", "R1", hex(mask)], ""))
        assert lane.r[7] == want, (mask, src)
    lane.p[5] = None  # unknown
    lane.execute(Instr(0, None, "P2R", ["R7", "PR", "RZ", "0x20"], ""))
    assert lane.reg("R7") is None
