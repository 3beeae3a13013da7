"""The benchmark harness's fresh-input steps, the CSV column migration and the across-process
summary (issue #19 item 3)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import across_processes, cases, csvio, peers  # noqa: E402
from benchmarks.steps import FreshStep, make_step  # noqa: E402


@pytest.mark.parametrize("op", cases.OPS)
def test_a_fresh_step_computes_what_a_reused_step_does(op):
    case = cases.Case(op, 64, 17)
    sets = [
        cases.make_inputs(case, torch.float32, torch.device("cpu"), True, seed=s) for s in range(2)
    ]
    fn = {
        p.name: p
        for p in peers.build_providers(
            op, torch.float32, torch.device("cpu"), 17, {o: None for o in cases.OPS}
        )
    }["eager"].fn
    reused = make_step(fn, sets, "fwd+bwd", "reused")
    fresh = make_step(fn, sets, "fwd+bwd", "fresh")
    assert isinstance(fresh, FreshStep)
    preds = []
    for _ in range(3):  # cycles through both sets; each call sees a pred it never saw before
        fresh.prepare()
        preds.append(fresh._ready[1])
        out_fresh = fresh()
        out_reused = reused()
        assert torch.equal(out_fresh.detach(), out_reused.detach())
    # a new tensor each time, never one of the input sets' own
    assert all(p is not s.pred and p.data_ptr() != s.pred.data_ptr() for p in preds for s in sets)
    assert len({id(p) for p in preds}) == len(preds)
    # the gradient reached the head through the op's backward, outside the timed call
    fresh.prepare()
    assert fresh.weight.grad is None  # cleared after the head's backward ran
    assert fresh._pending is None


def test_a_fresh_step_prepares_itself_when_called_alone():
    case = cases.Case("integral", 32, 9)
    sets = [cases.make_inputs(case, torch.float32, torch.device("cpu"), True, seed=0)]
    step = make_step(peers.EAGER["integral"], sets, "fwd+bwd", "fresh")
    out = step()
    assert out.shape == (32,)
    with pytest.raises(ValueError, match="inputs must be one of"):
        make_step(peers.EAGER["integral"], sets, "fwd", "cold")


def test_an_older_csv_gets_the_new_columns(tmp_path):
    path = tmp_path / "cpu.csv"
    old_fields = tuple(f for f in csvio.FIELDS if f != "inputs")
    csvio.append_rows(path, [{"run_id": "old", "op": "qfl"}], fields=old_fields)
    csvio.append_rows(path, [{"run_id": "new", "op": "dfl", "inputs": "fresh"}])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(csvio.FIELDS)
    assert [(r["run_id"], r["op"], r["inputs"]) for r in rows] == [
        ("old", "qfl", ""),
        ("new", "dfl", "fresh"),
    ]


def _row(run: str, provider: str, ms: float, x_eager: float, x_compile: float) -> dict:
    return {
        "run_id": run,
        "op": "qfl",
        "size": "40000x80",
        "mode": "fwd+bwd",
        "dtype": "float32",
        "provider": provider,
        "median_ms": str(ms),
        "speedup_vs_eager": str(x_eager),
        "speedup_vs_compile": str(x_compile),
        "frac_copy_bw": "0.4",
        "device_name": "cpu",
        "torch": "t",
        "cpu_threads": "2",
        "git_commit": "abcdef0123",
        "git_dirty": "no",
        "inputs": "fresh",
    }


def test_the_summary_gives_min_median_max_over_processes_and_checks_every_process():
    rows = [
        _row(f"2026120{i}T000000Z-x", "gfl_ops-cpu", ms, xe, 3.0)
        for i, (ms, xe) in enumerate([(2.0, 9.0), (3.0, 8.5), (2.5, 10.0)], start=1)
    ]
    rows.append(_row("20261101T000000Z-x", "gfl_ops-cpu", 99.0, 1.0, 1.0))  # an older series
    lines = "\n".join(across_processes.summarise(rows, since="20261201T000000Z"))
    assert "| 2 / 2.5 / 3 |" in lines and "| 8.5x / 9x / 10x |" in lines
    assert "**PASS**" in lines and "3 processes" in lines
    rows[1] = _row("20261202T000000Z-x", "gfl_ops-cpu", 6.0, 4.0, 3.0)  # one unlucky process
    lines = "\n".join(across_processes.summarise(rows, since="20261201T000000Z"))
    assert "**FAIL**" in lines


def test_the_memory_floor_alternative_counts_the_pass_a_separate_backward_needs():
    """The integral's fwd+bwd floor adds one read of pred (its backward needs the softmax again
    after the forward); the losses' floor is floor_bytes.  A process below the speed target
    passes only when every process ran at >= 90% of copy bandwidth over that floor."""
    integral = cases.Case("integral", 160000, 17)
    base = cases.floor_bytes(integral, torch.float32, "fwd+bwd")
    assert cases.autograd_floor_bytes(integral, torch.float32, "fwd+bwd") == base + 160000 * 17 * 4
    assert cases.autograd_floor_bytes(integral, torch.float32, "fwd") == cases.floor_bytes(
        integral, torch.float32, "fwd"
    )
    dfl = cases.Case("dfl", 32000, 17)
    assert cases.autograd_floor_bytes(dfl, torch.float32, "fwd+bwd") == cases.floor_bytes(
        dfl, torch.float32, "fwd+bwd"
    )

    def row(run: str, x_eager: float, frac: float) -> dict:
        r = _row(run, "gfl_ops-cpu", 1.4, x_eager, 4.0)
        r.update(op="integral", size="160000x17", frac_copy_bw=str(frac))
        return r

    ratio = cases.autograd_floor_bytes(integral, torch.float32, "fwd+bwd") / base
    at_floor = [
        row("20261201T000000Z-x", 4.2, 0.95 / ratio),
        row("20261202T000000Z-x", 3.9, 0.92 / ratio),
    ]
    lines = "\n".join(across_processes.summarise(at_floor, since="20261201T000000Z"))
    assert "**PASS** (at the memory floor: min 92%)" in lines and "92% / 94% / 95%" in lines
    below = [at_floor[0], row("20261202T000000Z-x", 3.9, 0.85 / ratio)]
    assert "**FAIL**" in "\n".join(across_processes.summarise(below, since="20261201T000000Z"))


def test_series_start_is_the_newest_group_of_runs():
    rows = [
        {"run_id": r}
        for r in (
            "20261101T100000Z-a",
            "20261206T100000Z-a",
            "20261206T100500Z-a",
            "20261206T101000Z-a",
        )
    ]
    assert across_processes._series_start(rows) == "20261206T100000Z-a"
