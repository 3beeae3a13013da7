"""The CPU operators' buffer cache (csrc/cpu/buffer_cache.h, gfl_ops/memory.py).

A fresh gradient per training step must not page-fault: the operators' large outputs are kept
when their tensor dies and handed to the next call.  These tests check that reuse happens, that
results do not depend on it, that the limit and eviction hold, and that the tensors it makes
behave as any CPU tensor.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

import pytest
import torch

import gfl_ops

pytestmark = pytest.mark.skipif(
    not gfl_ops.extension_loaded(), reason="needs the compiled extension (the cache lives there)"
)

BIG = (4096, 80)  # 1.25 MiB of float32: above the 256 KiB threshold


@pytest.fixture(autouse=True)
def _fresh_cache():
    previous = gfl_ops.set_cpu_buffer_cache_limit(512 << 20)
    gfl_ops.empty_cpu_buffer_cache()
    yield
    gfl_ops.set_cpu_buffer_cache_limit(previous)
    gfl_ops.empty_cpu_buffer_cache()


def _qfl_grad(pred: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n, c = pred.shape
    labels = torch.randint(0, c + 1, (n,), generator=gen)
    scores = torch.rand(n, generator=gen)
    p = pred.detach().requires_grad_(True)
    gfl_ops.quality_focal_loss(p, (labels, scores), backend="cpu").backward()
    return p.grad


def test_a_freed_gradient_is_reused_by_the_next_call():
    pred = torch.randn(*BIG)
    grad = _qfl_grad(pred)
    ptr = grad.data_ptr()
    before = gfl_ops.cpu_buffer_cache_info()
    del grad
    held = gfl_ops.cpu_buffer_cache_info()
    assert held["cached_blocks"] == before["cached_blocks"] + 1
    assert held["cached_bytes"] >= pred.numel() * 4
    again = _qfl_grad(pred)
    after = gfl_ops.cpu_buffer_cache_info()
    assert again.data_ptr() == ptr
    assert after["hits"] == held["hits"] + 1


@pytest.mark.parametrize("op", ["qfl", "dfl", "integral"])
def test_results_do_not_depend_on_the_cache(op):
    def run() -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        if op == "qfl":
            return _qfl_grad(torch.randn(*BIG, generator=gen))
        p = torch.randn(20000, 17, generator=gen).requires_grad_(True)
        if op == "dfl":
            target = torch.rand(20000, generator=gen) * 15.9
            gfl_ops.distribution_focal_loss(p, target, backend="cpu").backward()
        else:
            gfl_ops.integral(p, backend="cpu").backward(torch.randn(20000, generator=gen))
        return p.grad

    gfl_ops.set_cpu_buffer_cache_limit(0)
    expected = run()
    gfl_ops.set_cpu_buffer_cache_limit(512 << 20)
    scribbled = run()
    scribbled.fill_(float("nan"))  # what a user writes into a gradient must not leak onward
    del scribbled
    hits = gfl_ops.cpu_buffer_cache_info()["hits"]
    reused = run()
    assert gfl_ops.cpu_buffer_cache_info()["hits"] > hits
    assert torch.equal(reused, expected)


def test_limit_zero_turns_it_off_and_a_small_limit_evicts():
    gfl_ops.set_cpu_buffer_cache_limit(0)
    grad = _qfl_grad(torch.randn(*BIG))
    del grad
    assert gfl_ops.cpu_buffer_cache_info()["cached_bytes"] == 0

    block = BIG[0] * BIG[1] * 4
    gfl_ops.set_cpu_buffer_cache_limit(block + block // 2)  # room for one block only
    a, b = _qfl_grad(torch.randn(*BIG)), _qfl_grad(torch.randn(*BIG))
    del a, b
    info = gfl_ops.cpu_buffer_cache_info()
    assert info["cached_blocks"] == 1 and info["cached_bytes"] <= info["limit_bytes"]
    gfl_ops.set_cpu_buffer_cache_limit(0)  # lowering the limit frees what no longer fits
    assert gfl_ops.cpu_buffer_cache_info()["cached_blocks"] == 0


def test_only_blocks_of_about_the_same_size_are_taken():
    big = _qfl_grad(torch.randn(8192, 80))
    del big
    small = _qfl_grad(torch.randn(*BIG))  # half the size: must not take the 2.5 MiB block
    info = gfl_ops.cpu_buffer_cache_info()
    assert info["cached_blocks"] == 1 and info["cached_bytes"] >= 8192 * 80 * 4
    del small


def test_cached_tensors_behave_as_any_cpu_tensor(tmp_path):
    grad = _qfl_grad(torch.randn(*BIG))
    expected = grad.clone()
    buf = io.BytesIO()
    torch.save(grad, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), expected)
    grad.resize_(BIG[0] * 2, BIG[1])  # storage growth goes through the same allocator
    assert torch.equal(grad[: BIG[0]], expected)
    assert torch.equal(torch.from_numpy(grad.numpy())[: BIG[0]], expected)
    shared = grad.clone().share_memory_()
    assert shared.is_shared()
    gfl_ops.empty_cpu_buffer_cache()  # a live tensor is not affected
    assert torch.equal(grad[: BIG[0]], expected)


def test_allocations_and_frees_from_several_threads():
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(20):
                g = _qfl_grad(torch.randn(1024 + 64 * (seed % 3), 80), seed=i)
                assert torch.isfinite(g).all()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    info = gfl_ops.cpu_buffer_cache_info()
    assert info["cached_bytes"] <= info["limit_bytes"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="limit_bytes must be an int >= 0"):
        gfl_ops.set_cpu_buffer_cache_limit(-1)
    with pytest.raises(ValueError, match="limit_bytes"):
        gfl_ops.set_cpu_buffer_cache_limit(1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("value, expected", [("64", 64 << 20), ("0", 0), ("abc", None)])
def test_environment_variable(value, expected):
    env = dict(os.environ, GFL_OPS_CPU_CACHE_MB=value)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gfl_ops; print(gfl_ops.cpu_buffer_cache_info()['limit_bytes'])",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if expected is None:
        assert proc.returncode != 0
        assert "GFL_OPS_CPU_CACHE_MB must be a number of MiB >= 0" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert int(proc.stdout.strip()) == expected


def test_the_memory_profiler_sees_cached_blocks():
    from torch.profiler import ProfilerActivity, profile

    grad = _qfl_grad(torch.randn(*BIG))
    del grad  # the next call takes this block from the cache: it must still be reported
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _qfl_grad(torch.randn(*BIG))
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert any(e.nbytes() >= BIG[0] * BIG[1] * 4 for e in events)
