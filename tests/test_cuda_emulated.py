"""The CUDA kernels' device code, run on the CPU through a warp emulator, against the float64
reference.

CI has no GPU: the CUDA sources are compiled there (test_torch_integration checks that they are
registered) but never run.  Here the kernels themselves (csrc/cuda/*_kernel.cuh) are compiled by
the host compiler with tests/cuda_emulation/warp_emulator.h, which runs each block as cooperative
fibers, carries out a shuffle when all 32 lanes of a warp reach it and releases a __syncthreads
when every thread of the block reaches it (a shuffle or barrier that not all reach is reported,
not hung on), and gives each block its dynamic shared memory.  What this checks: the kernels'
indexing and grid-stride loops, their warp reductions, their shared-memory staging and barriers,
their arithmetic (the integral's pivot, DFL's target split, QFL's per-element math) and the
storage-dtype conversions, for every kernel variant.  What it does not: timing, bank conflicts,
the GPU's own exp / log rounding (the host's libm stands in), the memory model.
tests/test_cuda_only.py and the backend tests cover the real GPU when one is present.

The emulator needs a C++20 compiler and the CUDA headers (cuda_fp16.h); both are installed
wherever the build compiles the CUDA sources, CI included.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from gfl_testing import GRAD_TOL, INTEGRAL_TOL, LOSS_TOL, assert_close
from hypothesis import given
from hypothesis import strategies as st

from gfl_ops import reference

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "cuda_emulation"
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
DTYPES = tuple(DTYPE_CODES)
LANES = (0, 1, 2, 4, 8, 16, 32)  # 0: the launcher's own choice
# rows kernels (emulated_kernels.cpp): 0 the launcher's, 1 the runtime-bin-count tile kernel,
# 2 a warp per row (the launcher's for rows too long for a tile)
ROW_VARIANTS = (0, 1, 2)


class RowsLaunch(ctypes.Structure):  # csrc/cuda/launchers.h
    _fields_ = [
        ("dtype", ctypes.c_int),
        ("dfl", ctypes.c_bool),
        ("pred", ctypes.c_void_p),
        ("target", ctypes.c_void_p),
        ("row_scale", ctypes.c_void_p),
        ("row_scale_stride", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("bins", ctypes.c_int64),
    ]


class QflLaunch(ctypes.Structure):
    _fields_ = [
        ("dtype", ctypes.c_int),
        ("pred", ctypes.c_void_p),
        ("labels", ctypes.c_void_p),
        ("scores", ctypes.c_void_p),
        ("target", ctypes.c_void_p),
        ("target_opmath", ctypes.c_bool),
        ("row_scale", ctypes.c_void_p),
        ("row_scale_stride", ctypes.c_int64),
        ("loss", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("c", ctypes.c_int64),
        ("beta", ctypes.c_double),
        ("activated", ctypes.c_bool),
    ]


class ScaleRowsLaunch(ctypes.Structure):
    _fields_ = [
        ("dtype", ctypes.c_int),
        ("grad", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("scale_stride", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
    ]


def _cuda_include() -> Path | None:
    from torch.utils.cpp_extension import CUDA_HOME

    for home in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            return Path(home) / "include"
    return None


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> ctypes.CDLL:
    """The emulated kernels, compiled once per test session (~40 s on 2 cores: every count the
    rows kernels have compiled in is instantiated)."""
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    cuda_include = _cuda_include()
    if cxx is None or cuda_include is None:
        pytest.skip("the CUDA kernel emulation needs a C++ compiler and the CUDA headers")
    lib = tmp_path_factory.mktemp("cuda_emulation") / "emulated_kernels.so"
    # the half / bfloat16 flags nvcc gets from torch, so both compiles accept the same code
    cmd = [
        cxx,
        "-std=c++20",
        "-O2",
        "-shared",
        "-fPIC",
        "-Wno-unknown-pragmas",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        f"-I{ROOT / 'csrc'}",
        f"-I{include_paths()[0]}",
        f"-I{cuda_include}",
        str(EMULATION / "emulated_kernels.cpp"),
        "-o",
        str(lib),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"compiling the emulated kernels failed:\n{done.stderr[-4000:]}"
    dll = ctypes.CDLL(str(lib))
    dll.gfl_emu_error.restype = ctypes.c_char_p
    return dll


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(emu: ctypes.CDLL, rc: int) -> None:
    assert rc == 0, emu.gfl_emu_error().decode()


def _row_scale(m: int, dtype: torch.dtype, kind: str, gen: torch.Generator):
    """(tensor, stride): none, one scale per row, or one scalar broadcast (stride 0)."""
    if kind == "none":
        return None, 0
    if kind == "scalar":
        return torch.tensor([1.7], dtype=_acc(dtype)), 0
    return torch.rand(m, generator=gen, dtype=torch.float64).add(0.5).to(_acc(dtype)), 1


def _expanded(scale: torch.Tensor | None, stride: int, m: int) -> torch.Tensor:
    if scale is None:
        return torch.ones(m, dtype=torch.float64)
    return scale.double().expand(m) if stride == 0 else scale.double()


def _reference_with_grad(fn, pred: torch.Tensor, scale: torch.Tensor):
    """(fn(pred64), d<fn(pred64), scale>/dpred) in float64."""
    leaf = pred.detach().double().requires_grad_(True)
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out, leaf, scale)
    return out.detach(), torch.nan_to_num(grad, nan=0.0)


# the emulated launch: 2 blocks of 2 warps, small enough that the grid-stride loops wrap
GRID = (2, 64)


def _offset_view(t: torch.Tensor, offset: int) -> torch.Tensor:
    """t's values in a view that starts `offset` elements into a fresh (64-byte aligned) buffer:
    a pointer off the 16-byte boundary for an offset that is not a multiple of 16 bytes."""
    if offset == 0:
        return t
    view = torch.empty(t.numel() + offset, dtype=t.dtype)[offset:].view(t.shape)
    view.copy_(t)
    return view


def run_rows(
    emu,
    pred,
    *,
    dfl,
    target=None,
    scale=None,
    stride=0,
    with_out=True,
    with_grad=True,
    variant=0,
    grid=GRID,
    grad_offset=0,
):
    """(out, grad) of one emulated rows-kernel launch; grid (0, 0) is the launcher's geometry.
    What the launch does not write stays NaN."""
    m, bins = pred.shape
    out = torch.full((m,), float("nan"), dtype=_acc(pred.dtype) if dfl else pred.dtype)
    grad = _offset_view(torch.full_like(pred, float("nan")), grad_offset)
    launch = RowsLaunch(
        DTYPE_CODES[pred.dtype],
        dfl,
        _ptr(pred),
        _ptr(target),
        _ptr(scale),
        stride,
        _ptr(out) if with_out else None,
        _ptr(grad) if with_grad else None,
        m,
        bins,
    )
    _check(emu, emu.gfl_emu_rows(ctypes.byref(launch), variant, *grid))
    return out, grad


def _rows_inputs(m: int, bins: int, dtype: torch.dtype, seed: int, spread: float = 3.0):
    """pred (m, bins) in dtype; DFL targets in [0, n] (every third an integer, the last n); per-row
    scales in [0.5, 1.5), all in the opmath type."""
    gen = torch.Generator().manual_seed(seed)
    pred = (torch.randn(m, bins, generator=gen, dtype=torch.float64) * spread).to(dtype)
    n = bins - 1
    target = torch.rand(m, generator=gen, dtype=torch.float64) * n
    target[::3] = target[::3].round()  # integer targets: one bin only
    target[-1] = n  # the last bin, exactly
    scale = torch.rand(m, generator=gen, dtype=torch.float64).add(0.5)
    return pred, target.to(_acc(dtype)), scale.to(_acc(dtype))


def _dfl_reference(p, target):
    return reference.distribution_focal_loss(p, target)


def _rows_reference(pred, dfl, target, scale, stride):
    """(value or loss, scaled gradient) of the rows op in float64."""
    m = pred.shape[0]
    fn = functools.partial(_dfl_reference, target=target.double()) if dfl else reference.integral
    return _reference_with_grad(fn, pred, _expanded(scale, stride, m))


def _assert_rows_close(out, grad, ref, ref_grad, dfl, dtype, what):
    assert out.dtype == (_acc(dtype) if dfl else dtype)
    assert_close(out, ref, (LOSS_TOL if dfl else INTEGRAL_TOL)[dtype], what + " value")
    assert_close(grad, ref_grad, GRAD_TOL[dtype], what + " gradient")


@given(
    m=st.integers(1, 40),
    bins=st.sampled_from([2, 5, 8, 9, 16, 17, 33, 40]),
    dtype=st.sampled_from(DTYPES),
    spread=st.sampled_from([0.5, 4.0, 20.0]),
    variant=st.sampled_from(ROW_VARIANTS),
    scale_kind=st.sampled_from(["none", "rows", "scalar"]),
    seed=st.integers(0, 2**16),
)
def test_emulated_integral_kernel(emu, m, bins, dtype, spread, variant, scale_kind, seed):
    gen = torch.Generator().manual_seed(seed)
    pred = (torch.randn(m, bins, generator=gen, dtype=torch.float64) * spread).to(dtype)
    scale, stride = _row_scale(m, dtype, scale_kind, gen)
    out, grad = run_rows(emu, pred, dfl=False, scale=scale, stride=stride, variant=variant)
    ref, ref_grad = _rows_reference(pred, False, None, scale, stride)
    what = f"integral m={m} bins={bins} {dtype} variant={variant} scale={scale_kind}"
    _assert_rows_close(out, grad, ref, ref_grad, False, dtype, what)


@pytest.mark.parametrize("variant", ROW_VARIANTS)
def test_emulated_integral_kernel_peaked_rows_are_accurate(emu, variant):
    """All the mass on one bin: j - y_hat nearly cancels at that bin, which the pivot avoids
    (float32 gradient to float32 accuracy, where forming j - y_hat directly loses ~4 digits)."""
    bins = 17
    pred = torch.full((bins, bins), -6.0, dtype=torch.float64)
    pred[torch.arange(bins), torch.arange(bins)] = 12.0
    pred = pred.float()
    out, grad = run_rows(emu, pred, dfl=False, variant=variant)
    ref, ref_grad = _reference_with_grad(
        reference.integral, pred, torch.ones(bins, dtype=torch.float64)
    )
    assert_close(out, ref, INTEGRAL_TOL[torch.float32], "peaked integral value")
    assert_close(grad, ref_grad, (2e-5, 1e-12), "peaked integral gradient")


def test_emulated_rows_kernel_forward_only_and_backward_only(emu):
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(33, 17, generator=gen)
    out, grad = run_rows(emu, pred, dfl=False, with_grad=False)
    assert torch.isnan(grad).all(), "no gradient asked for, none written"
    assert_close(out, reference.integral(pred.double()), INTEGRAL_TOL[torch.float32], "value")
    scale = torch.rand(33, generator=gen)
    out, grad = run_rows(emu, pred, dfl=False, scale=scale, stride=1, with_out=False)
    assert torch.isnan(out).all(), "no output asked for, none written"
    _, ref_grad = _reference_with_grad(reference.integral, pred, scale.double())
    assert_close(grad, ref_grad, GRAD_TOL[torch.float32], "gradient")


@given(
    m=st.integers(1, 40),
    bins=st.sampled_from([2, 5, 8, 9, 16, 17, 33]),
    dtype=st.sampled_from(DTYPES),
    variant=st.sampled_from(ROW_VARIANTS),
    scale_kind=st.sampled_from(["none", "rows", "scalar"]),
    seed=st.integers(0, 2**16),
)
def test_emulated_dfl_kernel(emu, m, bins, dtype, variant, scale_kind, seed):
    gen = torch.Generator().manual_seed(seed)
    n = bins - 1
    pred = (torch.randn(m, bins, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.rand(m, generator=gen, dtype=torch.float64) * n
    target[::3] = target[::3].round()  # integer targets: one bin only
    target[-1] = n  # the last bin, exactly
    target = target.to(_acc(dtype))
    scale, stride = _row_scale(m, dtype, scale_kind, gen)
    out, grad = run_rows(
        emu, pred, dfl=True, target=target, scale=scale, stride=stride, variant=variant
    )
    ref, ref_grad = _rows_reference(pred, True, target, scale, stride)
    what = f"dfl m={m} bins={bins} {dtype} variant={variant} scale={scale_kind}"
    _assert_rows_close(out, grad, ref, ref_grad, True, dtype, what)


# the bin counts that get a compile-time instantiation (softmax_rows_kernel.cuh,
# rows_compiled_count), which keeps the row in registers instead of shared memory
FIXED_BINS = (*range(2, 18), 33)
OPS = pytest.mark.parametrize("dfl", [False, True], ids=["integral", "dfl"])


def _rows_geometry(emu, bins: int, acc: int) -> dict[str, int]:
    out = (ctypes.c_int * 6)()
    emu.gfl_emu_rows_geometry(ctypes.c_int64(bins), ctypes.c_int(acc), out)
    return dict(zip(("tiled", "pitch", "vec", "block", "rows_per_thread", "compiled"), out))


def test_rows_geometry_invariants_and_the_bounds_scripts_mirror(emu):
    """For every bin count up to past the tile limit, float and double opmath: what the kernels
    assume of the launcher's geometry (blocks of 32..kBlock threads, a tile in 32 KB, elements of
    a tile indexable by RowOf's 32-bit multiply, a multiple of 4 rows per thread for the odd
    compiled counts), shared-memory accesses free of bank conflicts (consecutive threads' rows
    an odd number of access units apart: kVec elements, or 16 bytes for the odd compiled counts,
    whose threads take groups of 4 adjacent rows), and the counts compiled in; and that
    benchmarks/rows_kernel_bounds.py, whose on-paper figures assume it, mirrors it exactly."""
    from benchmarks import rows_kernel_bounds as rkb

    for acc in (4, 8):
        for bins in range(2, 300):
            g = _rows_geometry(emu, bins, acc)
            assert g["compiled"] == (acc == 4 and (2 <= bins <= 17 or bins == 33)), bins
            if not g["tiled"]:
                pitch = bins + 16 // acc if bins % (32 // acc) == 0 else bins  # rows_pitch
                assert 32 * pitch * acc > 32 * 1024, f"bins={bins}: short rows left untiled"
                continue
            block, rpt, pitch, vec = g["block"], g["rows_per_thread"], g["pitch"], g["vec"]
            tile_rows = block * rpt
            what = f"bins={bins} acc={acc} {g}"
            assert block % 32 == 0 and 32 <= block <= 256, what
            assert tile_rows * pitch * acc <= 32 * 1024, what
            assert tile_rows * bins < 2**13 and bins < 2**8, what  # RowOf's exact range
            if g["compiled"] and vec == 1:  # TileRow's kPhased
                assert rpt % 4 == 0 and (rpt * bins // 4) % 2 == 1, what
            else:
                assert (pitch // vec) % 2 == 1 and vec * acc <= 16 and bins % vec == 0, what
            if acc == 4:
                assert rkb.rows_geometry(bins)[:4] == (pitch, vec, tile_rows, rpt), what


@pytest.mark.parametrize("dtype", DTYPES)
@OPS
def test_emulated_rows_kernel_every_bin_count(emu, dtype, dfl):
    """Every bin count 2..64 (every shared-memory access width, rows with and without the pad,
    the compile-time bin counts), 37 rows: a partial tile, and a tail after the last whole 16
    bytes of the staged loads and stores for most counts.  Value and row-scaled gradient against
    the float64 reference; at the compile-time bin counts (float opmath) the runtime-count
    kernel gives the same bits."""
    for bins in range(2, 65):
        pred, target, scale = _rows_inputs(37, bins, dtype, seed=bins)
        target = target if dfl else None
        out, grad = run_rows(emu, pred, dfl=dfl, target=target, scale=scale, stride=1)
        ref, ref_grad = _rows_reference(pred, dfl, target, scale, 1)
        _assert_rows_close(out, grad, ref, ref_grad, dfl, dtype, f"bins={bins} {dtype}")
        if bins in FIXED_BINS:
            generic = run_rows(emu, pred, dfl=dfl, target=target, scale=scale, stride=1, variant=1)
            assert torch.equal(generic[0], out) and torch.equal(generic[1], grad), bins


@pytest.mark.parametrize("dtype", DTYPES)
@OPS
def test_emulated_rows_kernel_rows_side_by_side(emu, dtype, dfl):
    """The runtime-count kernel works through a thread's rows r and r + block side by side
    (tile_row's kRows) and the rest one at a time.  Every count 2..64 at 200 rows (whole pairs,
    then a partial last tile of pairs and single rows), also the runtime-count kernel at the
    compiled counts, every third row with its max tied in the last bin: the reference's values,
    and every row's bits the same as in a launch of blocks of 256 threads, where each thread takes
    one row of these 200."""
    for bins in range(2, 65):
        pred, target, scale = _rows_inputs(200, bins, dtype, seed=3 * bins)
        pred[::3, -1] = pred[::3].amax(dim=1)  # tied maxima: the pivot is the first of them
        target = target if dfl else None
        ref, ref_grad = _rows_reference(pred, dfl, target, scale, 1)
        for variant in (0, 1) if bins in FIXED_BINS else (0,):
            out, grad = run_rows(
                emu, pred, dfl=dfl, target=target, scale=scale, stride=1, variant=variant
            )
            what = f"bins={bins} {dtype} variant={variant}"
            _assert_rows_close(out, grad, ref, ref_grad, dfl, dtype, what)
            alone = run_rows(
                emu,
                pred,
                dfl=dfl,
                target=target,
                scale=scale,
                stride=1,
                variant=variant,
                grid=(1, 256),
            )
            assert torch.equal(alone[0], out) and torch.equal(alone[1], grad), what


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bins", [2, 3, 8, 16, 17, 24, 33, 64])
@OPS
def test_emulated_rows_kernel_launch_modes(emu, dtype, bins, dfl):
    """The launches the operators make: forward only (value), fused forward (value and unscaled
    gradient), recompute backward (gradient scaled per row or by one scalar, no value).  Each
    writes exactly what it is asked for, and the same numbers as the others."""
    pred, target, scale = _rows_inputs(70, bins, dtype, seed=7 * bins)
    target = target if dfl else None
    fwd_out, fwd_grad = run_rows(emu, pred, dfl=dfl, target=target, with_grad=False)
    assert torch.isnan(fwd_grad).all(), "no gradient asked for, none written"
    out, grad = run_rows(emu, pred, dfl=dfl, target=target)
    assert torch.equal(out, fwd_out)
    ref, ref_grad = _rows_reference(pred, dfl, target, None, 0)
    _assert_rows_close(out, grad, ref, ref_grad, dfl, dtype, f"fused bins={bins}")
    for s, stride in ((scale, 1), (scale[:1].clone(), 0)):
        bwd_out, bwd_grad = run_rows(
            emu, pred, dfl=dfl, target=target, scale=s, stride=stride, with_out=False
        )
        assert torch.isnan(bwd_out).all(), "no value asked for, none written"
        _, ref_grad = _rows_reference(pred, dfl, target, s, stride)
        assert_close(bwd_grad, ref_grad, GRAD_TOL[dtype], f"backward bins={bins} stride={stride}")


@pytest.mark.parametrize("m", [1, 2, 31, 33, 63, 65, 129, 257])
def test_emulated_rows_kernel_partial_tiles(emu, m):
    """Row counts that fill no tile exactly, with the launcher's geometry (tiles of 256, 128, 64
    rows for these bin counts) and one block looping over several tiles."""
    for bins, dtype in (
        (17, torch.bfloat16),
        (6, torch.float32),
        (24, torch.float16),
        (40, torch.float32),
        (12, torch.float64),
    ):
        pred, target, scale = _rows_inputs(m, bins, dtype, seed=m + bins)
        for dfl in (False, True):
            tgt = target if dfl else None
            ref, ref_grad = _rows_reference(pred, dfl, tgt, scale, 1)
            for grid in ((0, 0), (1, 32)):
                out, grad = run_rows(
                    emu, pred, dfl=dfl, target=tgt, scale=scale, stride=1, grid=grid
                )
                _assert_rows_close(
                    out, grad, ref, ref_grad, dfl, dtype, f"m={m} bins={bins} grid={grid}"
                )


@pytest.mark.parametrize("bins", [2, 3, 4, 7])
def test_emulated_rows_kernel_long_tiles_of_short_rows(emu, bins):
    """Rows under 8 bins take tiles of 512-1024 rows (768 with 12 rows per thread for the odd
    counts): row counts on either side of one and two such tiles, one block per tile and one
    block looping over all of them, give the reference's values and the same bits."""
    for dtype in (torch.bfloat16, torch.float32):
        for m in (767, 769, 1025, 2049):
            pred, target, scale = _rows_inputs(m, bins, dtype, seed=m + bins)
            for dfl in (False, True):
                tgt = target if dfl else None
                ref, ref_grad = _rows_reference(pred, dfl, tgt, scale, 1)
                base = run_rows(emu, pred, dfl=dfl, target=tgt, scale=scale, stride=1)
                what = f"m={m} bins={bins} {dtype} dfl={dfl}"
                _assert_rows_close(base[0], base[1], ref, ref_grad, dfl, dtype, what)
                looped = run_rows(
                    emu, pred, dfl=dfl, target=tgt, scale=scale, stride=1, grid=(1, 64)
                )
                assert torch.equal(looped[0], base[0]) and torch.equal(looped[1], base[1]), what


@pytest.mark.parametrize("bins", [5, 6, 12, 16, 17, 24, 64])
def test_emulated_rows_kernel_does_not_depend_on_the_launch_geometry(emu, bins):
    """A row is reduced by one thread in bin order, so the results are bitwise the same whatever
    the grid and block (tiles of 32 to 256 rows, one block looping over tiles, idle blocks)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        pred, target, scale = _rows_inputs(150, bins, dtype, seed=bins)
        for dfl in (False, True):
            tgt = target if dfl else None
            for variant in (0, 1):
                call = functools.partial(
                    run_rows, emu, pred, dfl=dfl, target=tgt, scale=scale, stride=1, variant=variant
                )
                base = call(grid=(0, 0))
                for grid in ((1, 32), (3, 96), (2, 256), (64, 64)):
                    got = call(grid=grid)
                    assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1]), grid


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bins", [3, 8, 16, 17, 33])
def test_emulated_rows_kernel_misaligned_pointers(emu, dtype, bins):
    """pred or grad off the 16-byte boundary (views that start a few elements into a buffer):
    the tile is staged / stored element by element instead of 16 bytes at a time, with the same
    bits."""
    pred, target, scale = _rows_inputs(45, bins, dtype, seed=bins)
    for dfl in (False, True):
        tgt = target if dfl else None
        base = run_rows(emu, pred, dfl=dfl, target=tgt, scale=scale, stride=1)
        for pred_offset, grad_offset in ((1, 0), (0, 1), (3, 5)):
            got = run_rows(
                emu,
                _offset_view(pred, pred_offset),
                dfl=dfl,
                target=tgt,
                scale=scale,
                stride=1,
                grad_offset=grad_offset,
            )
            assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])


def test_emulated_rows_kernel_long_rows(emu):
    """Rows beyond the 2..64 of the detectors: 100 bins still fit a tile (64 rows of float,
    32 of double), 300 do not and take a warp per row."""
    for bins, dtype in (
        (100, torch.float32),
        (100, torch.float64),
        (300, torch.float32),
        (300, torch.bfloat16),
    ):
        pred, target, scale = _rows_inputs(9, bins, dtype, seed=bins)
        for dfl in (False, True):
            tgt = target if dfl else None
            out, grad = run_rows(emu, pred, dfl=dfl, target=tgt, scale=scale, stride=1, grid=(0, 0))
            ref, ref_grad = _rows_reference(pred, dfl, tgt, scale, 1)
            _assert_rows_close(out, grad, ref, ref_grad, dfl, dtype, f"bins={bins} {dtype}")


# ---------------------------------------------------------------------------------------------
# QFL (csrc/cuda/qfl_kernel.cuh).  One kernel per dtype x target form x activated x beta mode x
# gradient or not x index width, chosen at launch (qfl_dispatch, shared by the launcher and the
# emulator); a launch plan (qfl_plan) with the lanes per row, 16-byte accesses or not, 32- or
# 64-bit indices.  The tests below run each compiled variant, the plan's overrides, both index
# widths (the 64-bit one on rows past 2^31 elements without allocating them), every head / tail
# of the 16-byte split, and check that nothing is written outside the outputs.


class QflEmuOptions(ctypes.Structure):  # tests/cuda_emulation/emulated_kernels.cpp
    _fields_ = [
        ("lanes", ctypes.c_int),
        ("index_bits", ctypes.c_int),
        ("vectorised", ctypes.c_int),
        ("grid", ctypes.c_uint),
        ("block", ctypes.c_uint),
        ("first_block", ctypes.c_uint),
    ]


class QflPlan(ctypes.Structure):  # csrc/cuda/qfl_kernel.cuh
    _fields_ = [
        ("lanes_log2", ctypes.c_int),
        ("vectorised", ctypes.c_bool),
        ("index64", ctypes.c_bool),
        ("grid", ctypes.c_uint),
    ]


# beta 2, 0 and 1 have their own kernels; 2.5 and 0.5 take the general pow (either side of 1)
QFL_BETAS = (2.0, 0.0, 1.0, 2.5, 0.5)
QFL_FORMS = ("labels", "dense", "dense-opmath")
_GUARD = 16  # NaN elements before and after each output (a multiple of 16 bytes in every dtype)


def _guarded(numel: int, dtype: torch.dtype, offset: int = 0):
    """(view, buffer): `numel` NaN elements starting `_GUARD + offset` elements into a NaN buffer
    (torch's CPU allocator aligns the buffer to 64 bytes), with _GUARD more after them."""
    buf = torch.full((2 * _GUARD + offset + numel,), float("nan"), dtype=dtype)
    return buf[_GUARD + offset : _GUARD + offset + numel], buf


def _assert_guards_intact(buf: torch.Tensor, offset: int, numel: int, what: str) -> None:
    outside = torch.cat([buf[: _GUARD + offset], buf[_GUARD + offset + numel :]])
    assert torch.isnan(outside).all(), f"{what}: the kernel wrote outside its output"


def _at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of t whose data starts `offset` elements past a 64-byte boundary."""
    view, _ = _guarded(t.numel(), t.dtype, offset)
    view.copy_(t.reshape(-1))
    return view.view(t.shape)


def _qfl_launch(pred, labels, scores, target, beta, activated, scale, stride, loss, grad):
    n, c = pred.shape
    target_opmath = target is not None and target.dtype != pred.dtype
    return QflLaunch(
        DTYPE_CODES[pred.dtype],
        _ptr(pred),
        _ptr(labels),
        _ptr(scores),
        _ptr(target),
        target_opmath,
        _ptr(scale),
        stride,
        _ptr(loss),
        _ptr(grad),
        n,
        c,
        beta,
        activated,
    )


def qfl_plan(emu, pred, *, target=None, grad_offset=0) -> QflPlan:
    """The launcher's plan for a launch with a fresh gradient buffer at grad_offset."""
    grad, _ = _guarded(pred.numel(), pred.dtype, grad_offset)
    plan = QflPlan()
    emu.gfl_emu_qfl_plan(
        ctypes.byref(_qfl_launch(pred, None, None, target, 2.0, False, None, 0, None, grad)),
        ctypes.byref(plan),
    )
    return plan


def run_qfl(
    emu,
    pred,
    *,
    labels=None,
    scores=None,
    target=None,
    beta=2.0,
    activated=False,
    scale=None,
    stride=0,
    with_loss=True,
    with_grad=True,
    grad_offset=0,
    lanes=0,
    grid=GRID,
    index_bits=0,
    vectorised=-1,
    plan=None,
):
    """(loss, grad) of one emulated QFL launch: NaN where it wrote nothing; the gradient buffer
    starts grad_offset elements past a 64-byte boundary; grid (0, 0) is the launcher's.  Checks
    that nothing outside the outputs was written.  `plan` (a QflPlan) receives the launcher's
    plan."""
    n, c = pred.shape
    loss, loss_buf = _guarded(n, _acc(pred.dtype))
    grad, grad_buf = _guarded(n * c, pred.dtype, grad_offset)
    grad = grad.view(n, c)
    launch = _qfl_launch(
        pred,
        labels,
        scores,
        target,
        beta,
        activated,
        scale,
        stride,
        loss if with_loss else None,
        grad if with_grad else None,
    )
    options = QflEmuOptions(lanes, index_bits, vectorised, grid[0], grid[1], 0)
    _check(
        emu,
        emu.gfl_emu_qfl(
            ctypes.byref(launch),
            ctypes.byref(options),
            ctypes.byref(plan) if plan is not None else None,
        ),
    )
    _assert_guards_intact(loss_buf, 0, n, "loss")
    _assert_guards_intact(grad_buf, grad_offset, n * c, "gradient")
    return loss, grad


def _qfl_case(n, c, dtype, form, activated, beta, gen, *, pred_offset=0, spread=3.0):
    """(pred, targets kwargs for run_qfl, float64 reference function of pred)."""
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * spread
    # probabilities kept off 0 and 1, where BCE of a probability is clamped by torch
    pred = (logits.sigmoid().clamp(0.02, 0.98) if activated else logits).to(dtype)
    pred = _at_offset(pred, pred_offset)
    if form == "labels":
        labels = torch.randint(-1, c + 2, (n,), generator=gen)  # -1, c, c + 1: background
        scores = torch.rand(n, generator=gen, dtype=torch.float64).to(_acc(dtype))

        def ref_fn(p):
            return reference.quality_focal_loss(p, labels, scores.double(), beta, activated)

        return pred, {"labels": labels, "scores": scores}, ref_fn
    target = torch.rand(n, c, generator=gen, dtype=torch.float64)
    target = _at_offset(target.to(_acc(dtype) if form == "dense-opmath" else dtype), pred_offset)

    def ref_fn(p):
        return reference.quality_focal_loss_dense(p, target.double(), beta, activated)

    return pred, {"target": target}, ref_fn


def _assert_qfl_close(loss, grad, pred, ref_fn, beta, scale, stride, what, *, with_loss=True):
    n = pred.shape[0]
    ref, ref_grad = _reference_with_grad(ref_fn, pred, _expanded(scale, stride, n))
    dtype = pred.dtype
    if with_loss:
        assert_close(loss, ref, LOSS_TOL[dtype], what + " loss")
    # beta < 1: |d|^(beta-1) amplifies the rounding of d near s = y (tests/test_qfl.py widens
    # the tolerance element by element there); these random targets keep away from it
    rtol, atol = GRAD_TOL[dtype]
    if beta < 1 and dtype != torch.float64:
        rtol, atol = max(rtol, 1e-3), max(atol, 1e-5)
    assert_close(grad, ref_grad, (rtol, atol), what + " gradient")


@given(
    n=st.integers(1, 24),
    c=st.sampled_from([1, 2, 3, 5, 8, 9, 16, 20, 37, 80]),
    dtype=st.sampled_from(DTYPES),
    beta=st.sampled_from(QFL_BETAS),
    activated=st.booleans(),
    form=st.sampled_from(QFL_FORMS),
    lanes=st.sampled_from(LANES),
    scale_kind=st.sampled_from(["none", "rows", "scalar"]),
    offsets=st.sampled_from([(0, 0), (1, 1), (3, 0), (2, 2)]),
    seed=st.integers(0, 2**16),
)
def test_emulated_qfl_kernel(
    emu, n, c, dtype, beta, activated, form, lanes, scale_kind, offsets, seed
):
    gen = torch.Generator().manual_seed(seed)
    pred_offset, grad_offset = offsets
    pred, targets, ref_fn = _qfl_case(
        n, c, dtype, form, activated, beta, gen, pred_offset=pred_offset
    )
    scale, stride = _row_scale(n, dtype, scale_kind, gen)
    loss, grad = run_qfl(
        emu,
        pred,
        **targets,
        beta=beta,
        activated=activated,
        scale=scale,
        stride=stride,
        lanes=lanes,
        grad_offset=grad_offset,
    )
    what = (
        f"qfl n={n} c={c} {dtype} beta={beta} activated={activated} {form} lanes={lanes} "
        f"offsets={offsets}"
    )
    _assert_qfl_close(loss, grad, pred, ref_fn, beta, scale, stride, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", QFL_FORMS)
@pytest.mark.parametrize("activated", [False, True])
@pytest.mark.parametrize("beta", [2.0, 0.0, 1.0, 2.5])
def test_emulated_qfl_every_specialisation(emu, dtype, form, activated, beta):
    """Each compiled kernel of the dtype / form / activated / beta mode, in its three uses:
    forward with the gradient (fused), forward alone (the loss-only kernel: the same loss bits,
    no gradient written), recompute backward (gradient times a per-row scale, no loss written);
    and the 64-bit-index kernel on the same input: the same bits.  37 classes: every row has a
    different 16-byte head and a tail."""
    gen = torch.Generator().manual_seed(int(beta * 10) + 100 * activated)
    n, c = 11, 37
    pred, targets, ref_fn = _qfl_case(n, c, dtype, form, activated, beta, gen)
    what = f"qfl {dtype} {form} activated={activated} beta={beta}"
    loss, grad = run_qfl(emu, pred, **targets, beta=beta, activated=activated)
    _assert_qfl_close(loss, grad, pred, ref_fn, beta, None, 0, what + " fused")
    alone, no_grad = run_qfl(emu, pred, **targets, beta=beta, activated=activated, with_grad=False)
    assert torch.equal(alone, loss), what + ": the loss-only kernel's loss differs"
    assert torch.isnan(no_grad).all(), what + ": the loss-only kernel wrote a gradient"
    scale = torch.rand(n, generator=gen, dtype=torch.float64).add(0.5).to(_acc(dtype))
    no_loss, scaled = run_qfl(
        emu, pred, **targets, beta=beta, activated=activated, scale=scale, stride=1, with_loss=False
    )
    assert torch.isnan(no_loss).all(), what + ": the backward wrote a loss"
    _assert_qfl_close(
        None, scaled, pred, ref_fn, beta, scale, 1, what + " backward", with_loss=False
    )
    for got, expected in zip(
        run_qfl(emu, pred, **targets, beta=beta, activated=activated, index_bits=64), (loss, grad)
    ):
        assert torch.equal(got, expected), what + ": the 64-bit-index kernel differs"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offsets", [(0, 0), (1, 1), (1, 0), (0, 3), (5, 5), (2, 6)])
@pytest.mark.parametrize("form", ["labels", "dense-opmath"])
def test_emulated_qfl_kernel_vector_heads_tails_and_misaligned_rows(emu, dtype, offsets, form):
    """Every class count up to 17 and a few more, with pred (and the dense target) starting off a
    16-byte boundary and the gradient buffer at the same or another offset.  Where the streams
    are congruent modulo 16 bytes each row is a scalar head, 16-byte words and a scalar tail;
    where not, every element is scalar.  Per element the math is the same either way, so the
    gradient is bitwise that of the aligned run; the row sums differ only in their order."""
    pred_offset, grad_offset = offsets
    width = 16 // torch.empty(0, dtype=dtype).element_size()
    for c in list(range(1, 18)) + [31, 37, 80]:
        gen = torch.Generator().manual_seed(c)
        pred, targets, ref_fn = _qfl_case(
            7, c, dtype, form, False, 2.0, gen, pred_offset=pred_offset
        )
        plan = QflPlan()
        loss, grad = run_qfl(emu, pred, **targets, grad_offset=grad_offset, plan=plan)
        what = f"qfl c={c} {dtype} {form} offsets={offsets}"
        # (the dense target sits at pred's element offset: congruent, also as float for 16-bit)
        congruent = (pred_offset - grad_offset) % width == 0
        assert plan.vectorised == congruent, what + ": 16-byte accesses chosen wrongly"
        _assert_qfl_close(loss, grad, pred, ref_fn, 2.0, None, 0, what)
        aligned = _qfl_case(7, c, dtype, form, False, 2.0, torch.Generator().manual_seed(c))
        _, aligned_grad = run_qfl(emu, aligned[0], **aligned[1])
        assert torch.equal(grad, aligned_grad), what + ": gradient differs from the aligned run"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("pred_offset", [0, 1])
@pytest.mark.parametrize("activated", [False, True])
def test_emulated_qfl_kernel_label_in_every_column(emu, dtype, pred_offset, activated):
    """Rows whose label is -1, then each class 0 .. C-1 (so the positive falls in every head,
    word and tail position, and in every lane's words), then C and C + 1: the word holding the
    label takes the general formula, all others the y = 0 form."""
    c = 37
    n = c + 3
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * 3
    pred = _at_offset(
        (logits.sigmoid().clamp(0.02, 0.98) if activated else logits).to(dtype), pred_offset
    )
    labels = torch.arange(-1, c + 2)
    scores = torch.rand(n, generator=gen, dtype=torch.float64).to(_acc(dtype))
    for lanes in (0, 1, 4, 32):
        loss, grad = run_qfl(
            emu,
            pred,
            labels=labels,
            scores=scores,
            activated=activated,
            lanes=lanes,
            grad_offset=pred_offset,
        )
        _assert_qfl_close(
            loss,
            grad,
            pred,
            lambda p: reference.quality_focal_loss(p, labels, scores.double(), 2.0, activated),
            2.0,
            None,
            0,
            f"qfl labels -1..{c + 1} {dtype} lanes={lanes}",
        )


@pytest.mark.parametrize("form", QFL_FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_qfl_kernel_does_not_depend_on_the_launch_geometry(emu, form, dtype):
    """Each row is reduced by its lane group in an order set by the shape, dtype and alignment
    alone: the launcher's grid, a single warp, blocks of 96 and 256 threads, a grid-stride loop
    that wraps many times, and the 64-bit kernel give the same bits."""
    for c, offset in ((80, 0), (37, 1)):
        gen = torch.Generator().manual_seed(c)
        pred, targets, _ = _qfl_case(45, c, dtype, form, False, 2.0, gen, pred_offset=offset)
        scale = torch.rand(45, generator=gen).to(_acc(dtype))
        expected = run_qfl(
            emu, pred, **targets, scale=scale, stride=1, grad_offset=offset, grid=(0, 0)
        )
        for grid, bits in (((1, 32), 0), ((3, 256), 0), ((5, 96), 0), ((2, 64), 64), ((64, 64), 0)):
            got = run_qfl(
                emu,
                pred,
                **targets,
                scale=scale,
                stride=1,
                grad_offset=offset,
                grid=grid,
                index_bits=bits,
            )
            for g, e in zip(got, expected):
                assert torch.equal(g, e), f"qfl {form} {dtype} c={c} grid={grid} bits={bits}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["labels", "dense-opmath"])
def test_emulated_qfl_kernel_rows_past_2_31_elements(emu, dtype, form):
    """The 64-bit-index kernel where 32 bits would overflow, without allocating 2^31 elements:
    the launch describes n' = R + n rows, every pointer moved back by R rows, and only the blocks
    that hold rows R .. R + n - 1 run (the emulator's first_block); row R starts past element
    2^31.  The launcher's plan picks 64 bits for it, and the results are those of the small
    tensors."""
    n, c = 50, 40
    gen = torch.Generator().manual_seed(3)
    pred, targets, ref_fn = _qfl_case(n, c, dtype, form, False, 2.0, gen)
    lanes_log2 = qfl_plan(emu, pred, target=targets.get("target")).lanes_log2
    block = 256
    rows_per_block = block >> lanes_log2
    first_block = (2**31 // c) // rows_per_block + 1
    skipped = first_block * rows_per_block  # R: its rows' memory does not exist
    assert skipped * c > 2**31
    grid = first_block + (n + rows_per_block - 1) // rows_per_block
    loss, loss_buf = _guarded(n, _acc(dtype))
    grad, grad_buf = _guarded(n * c, dtype)

    def back(t, rows_elements):
        return None if t is None else t.data_ptr() - skipped * rows_elements * t.element_size()

    launch = QflLaunch(
        DTYPE_CODES[dtype],
        back(pred, c),
        back(targets.get("labels"), 1),
        back(targets.get("scores"), 1),
        back(targets.get("target"), c),
        form == "dense-opmath" and dtype != torch.float32,
        None,
        0,
        back(loss, 1),
        back(grad, c),
        skipped + n,
        c,
        2.0,
        False,
    )
    plan = QflPlan()
    options = QflEmuOptions(0, 0, -1, grid, block, first_block)
    _check(emu, emu.gfl_emu_qfl(ctypes.byref(launch), ctypes.byref(options), ctypes.byref(plan)))
    assert plan.index64, "the launcher's plan must take 64-bit indices past 2^31 elements"
    _assert_guards_intact(loss_buf, 0, n, "loss")
    _assert_guards_intact(grad_buf, 0, n * c, "gradient")
    _assert_qfl_close(
        loss, grad.view(n, c), pred, ref_fn, 2.0, None, 0, f"qfl rows past 2^31 {dtype} {form}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["labels", "dense"])
@pytest.mark.parametrize("activated", [False, True])
@pytest.mark.parametrize("beta", [2.0, 0.0, 1.0, 2.5])
def test_emulated_qfl_kernel_extreme_inputs_every_mode(emu, dtype, form, activated, beta):
    """Saturated logits (+-1e4, +-90: exp(-|x|) below float's normal range, +-30) and
    probabilities at and next to 0 and 1, on both sides of the targets, in every compiled mode:
    finite, and the reference's values (BCE's logs clamped at -100 as torch does)."""
    if activated:
        row = [0.0, 1.0, 1e-30, 1.0 - 2.0**-24, 0.5, 2.0**-24, 0.25, 1.0]
    else:
        row = [1e4, -1e4, 0.0, 90.0, -90.0, 30.0, -30.0, 1.0]
    pred = torch.tensor([row, row[::-1], row], dtype=dtype)
    n, c = pred.shape
    if form == "labels":
        targets = {
            "labels": torch.tensor([0, 3, c]),
            "scores": torch.tensor([1.0, 0.9, 0.0], dtype=dtype),
        }

        def ref_fn(p):
            return reference.quality_focal_loss(
                p, targets["labels"], targets["scores"].double(), beta, activated
            )
    else:
        targets = {
            "target": torch.tensor([[1.0, 0.0, 0.5, 1.0, 0.0, 0.3, 0.7, 0.9]] * n, dtype=dtype)
        }

        def ref_fn(p):
            return reference.quality_focal_loss_dense(
                p, targets["target"].double(), beta, activated
            )

    loss, grad = run_qfl(emu, pred, **targets, beta=beta, activated=activated)
    what = f"qfl extreme {dtype} {form} activated={activated} beta={beta}"
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), what
    ref, ref_grad = _reference_with_grad(ref_fn, pred, torch.ones(n, dtype=torch.float64))
    assert_close(loss, ref, (1e-4, 1e-4), what + " loss")
    assert_close(grad, ref_grad, (1e-2, 1e-3), what + " gradient")


def _activated_probabilities() -> torch.Tensor:
    """float32 p over [0, 1]: 0, subnormal, tiny, and both sides of the 1/2 where QflOps'
    prob_logs / log1m_prob change method, up to 1 - 2^-24 and 1; then uniform ones."""
    half = torch.tensor(0.5)
    edges = [
        0.0, 1e-45, 1e-40, 2.0**-126, 1e-30, 1e-10, 2.0**-24, 1e-4, 0.01, 0.1, 0.25,
        torch.nextafter(half, torch.tensor(0.0)).item(), 0.5,
        torch.nextafter(half, torch.tensor(1.0)).item(), 0.75, 0.9, 0.999, 1.0 - 2.0**-23,
        1.0 - 2.0**-24, 1.0,
    ]  # fmt: skip
    uniform = torch.rand(200, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return torch.cat([torch.tensor(edges, dtype=torch.float64), uniform]).float()


@pytest.mark.parametrize("form", ["labels", "dense"])
@pytest.mark.parametrize("width", [1, 4])
def test_emulated_qfl_activated_logs_to_a_few_ulp(emu, form, width):
    """The activated form's logs (QflOps::prob_logs, log1m_prob: the fast log2 on the smaller of
    p and 1 - p, gfl_math.h's log1p series on the other) with beta 0, where the loss is BCE
    itself: -log(1 - p) for a negative, -log p and -log(1 - p) for targets 1 and 0, each within
    1e-6 relative (8 ulp) of float64 on the float p (logs clamped at -100 as torch's BCE), over
    p from subnormal to 1 and on both sides of 1/2 -- with the emulator's fast log2 off by its
    documented worst case (tests/cuda_emulation; measured 3.7e-7), 20x tighter than the loss
    tolerance: a 32x larger log2 error fails it.  width 4: each row is one 16-byte word of equal
    p (the vector path); 1: one scalar element per row."""
    p = _activated_probabilities()
    n = p.numel()
    pred = p[:, None].expand(n, width).contiguous()
    p64 = p.double()
    log_p = p64.log().clamp(min=-100)
    log_q = (-p64).log1p().clamp(min=-100)
    if form == "labels":
        cases = {
            "negative": ({"labels": torch.full((n,), width), "scores": torch.zeros(n)}, -log_q),
            "label, score 1": ({"labels": torch.zeros(n, dtype=torch.int64),
                                "scores": torch.ones(n)}, -log_p),
        }  # fmt: skip
    else:
        cases = {
            "target 0": ({"target": torch.zeros(n, width)}, -log_q),
            "target 1": ({"target": torch.ones(n, width)}, -log_p),
        }
    for what, (targets, element_loss) in cases.items():
        loss, _ = run_qfl(emu, pred, **targets, beta=0.0, activated=True)
        expected = element_loss * (width if form == "dense" or what == "negative" else 1)
        if form == "labels" and what != "negative":
            expected = expected + -log_q * (width - 1)  # the other classes are negatives
        err = (loss.double() - expected).abs()
        bound = 1e-6 * expected.abs() + 1e-40
        worst = int((err / bound).argmax())
        assert (err <= bound).all(), (
            f"qfl activated {form} {what} width {width}: p = {p[worst].item()!r} gives "
            f"{loss[worst].item()!r}, float64 {expected[worst].item()!r}"
        )


@pytest.mark.parametrize("beta", [0.5, 1.5, 2.5])
def test_emulated_qfl_general_beta_power_within_its_bound(emu, beta):
    """The general mode's |d|^beta (QflOps::pow_pos: 2^(beta log2 |d|) with the fast log2 and
    exp2f, both off by their documented worst in the emulator), isolated on negatives with
    probabilities (d = p exactly): loss p^beta (-log(1 - p)) and its gradient within the bound
    QflOps states, 2^-23 (1.8 |E| + 2 + 1.4 beta) for E = beta log2 p, plus 6 ulp for the log
    and the products, over p from 1e-30 to 1 - 2^-24."""
    p = _activated_probabilities()
    p = p[(p > 1e-30) & (p < 1.0)]
    n = p.numel()
    pred = p[:, None].contiguous()
    targets = {"labels": torch.full((n,), 1), "scores": torch.zeros(n)}
    loss, grad = run_qfl(emu, pred, **targets, beta=beta, activated=True)
    p64 = p.double().requires_grad_(True)
    expected = p64.pow(beta) * -(-p64).log1p()
    (expected_grad,) = torch.autograd.grad(expected.sum(), p64)
    exponent = beta * p.double().log2().abs()
    bound = 2.0**-23 * (1.8 * exponent + 1.4 * beta + 2 + 6)
    for what, got, want in (("loss", loss, expected), ("gradient", grad[:, 0], expected_grad)):
        rel = (got.double() - want.detach()).abs() / want.detach().abs()
        worst = int((rel / bound).argmax())
        assert (rel <= bound).all(), (
            f"qfl general beta {beta} {what}: p = {p[worst].item()!r} off by "
            f"{rel[worst].item():.3g} relative, bound {bound[worst].item():.3g}"
        )


@pytest.mark.parametrize("beta", [0.25, 0.5, 1.5, 2.5, 3.7])
def test_emulated_qfl_general_beta_negative_logits_within_their_bound(emu, beta):
    """A negative's general-beta form (gfl_math.h's qfl_logit_negative_given: s^beta from the
    BCE's own nl = -log s = max(-x, 0) + log1p(e) by the fast exp2, no log of d, no division; e
    by the fast exp), with both fast exps off by their documented worst in the emulator: loss
    s^beta softplus(x) and its gradient within 2^-23 (1.8 |E| + 0.6 |x| + 1.4 beta + 9)
    relative, E = beta log2 s (the exp2's and the pow's share, as QflOps states for pow_pos; the
    fast exp's (2 + 1.173 |x|) ulp of e, which lp and the BCE carry for x < 0; the products),
    over x from -80 to 40 -- where the result is below 2^-100, within 2^-100 absolute (the fast
    exp2 flushes s^beta below 2^-126).  Measured: at most 0.98 of the bound (beta 0.25 near
    x = -57), 1.1e-5 relative at worst; the form it replaced, with its log of d and its
    division, reached 1.9e-5 (beta 3.7)."""
    x = torch.cat(
        [torch.linspace(-80, 40, 2401, dtype=torch.float64), torch.tensor([0.0, -0.0, 1e-30])]
    ).float()
    n = x.numel()
    pred = x[:, None].contiguous()
    targets = {"labels": torch.full((n,), 1), "scores": torch.zeros(n)}
    loss, grad = run_qfl(emu, pred, **targets, beta=beta)
    x64 = x.double().requires_grad_(True)
    s = torch.sigmoid(x64)
    expected = s.pow(beta) * torch.nn.functional.softplus(x64)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x64)
    exponent = beta * s.detach().log2().abs()
    bound = 2.0**-23 * (1.8 * exponent + 0.6 * x.double().abs() + 1.4 * beta + 9)
    tiny = 2.0**-100
    for what, got, want in (
        ("loss", loss, expected.detach()),
        ("gradient", grad[:, 0], expected_grad),
    ):
        err = (got.double() - want).abs()
        ok = torch.where(want.abs() >= tiny, err <= bound * want.abs(), err <= tiny)
        worst = int((err / (bound * want.abs()).clamp_min(tiny)).argmax())
        assert ok.all(), (
            f"qfl general beta {beta} negative {what}: x = {x[worst].item()!r} gives "
            f"{got[worst].item()!r}, float64 {want[worst].item()!r}"
        )


def _qfl_plan(emu, n, c, dtype=torch.float32, target=None, grad_offset=0) -> QflPlan:
    """The launcher's plan (qfl_plan) for an n x c QFL launch; only pred's address and the sizes
    matter, so nothing of n x c is allocated."""
    pred = torch.empty(64, dtype=dtype)
    launch = QflLaunch(
        DTYPE_CODES[dtype],
        _ptr(pred),
        None,
        None,
        _ptr(target),
        False,
        None,
        0,
        None,
        _ptr(pred) + grad_offset * pred.element_size(),
        n,
        c,
        2.0,
        False,
    )
    plan = QflPlan()
    emu.gfl_emu_qfl_plan(ctypes.byref(launch), ctypes.byref(plan))
    return plan


def test_emulated_qfl_plan(emu):
    """The launcher's choices: lanes per row from the class count and element size (no idle
    lanes at COCO's 80 classes, whole 32-byte sectors per row and access past 48-byte rows, one
    lane for VOC's 20 classes in 16 bits: 2 words and 4 scalars), 32-bit indices up to
    the limit and 64 past it (decided from n and c alone: nothing is allocated), 16-byte accesses
    only for congruent streams."""

    def plan_for(n, c, dtype=torch.float32, target=None, grad_offset=0):
        return _qfl_plan(emu, n, c, dtype, target, grad_offset)

    lanes = {
        (c, dt): 1 << plan_for(1000, c, dt).lanes_log2
        for c in (1, 4, 20, 80, 365, 4096)
        for dt in (torch.float32, torch.bfloat16)
    }
    assert lanes[(80, torch.float32)] == 2 and lanes[(80, torch.bfloat16)] == 2  # 10 / 5 words
    assert lanes[(1, torch.float32)] == 1 and lanes[(4, torch.float32)] == 1  # rows <= 16 bytes
    assert lanes[(20, torch.bfloat16)] == 1  # 40-byte rows: one contiguous span per warp
    assert lanes[(4096, torch.float32)] == 32 and lanes[(4096, torch.bfloat16)] == 32
    assert all(v >= 2 for (c, dt), v in lanes.items() if c * (4 if dt == torch.float32 else 2) > 48)
    limit = 2**31 - 1 - 1024
    assert not plan_for(limit // 80, 80).index64
    assert plan_for(limit // 80 + 1, 80).index64
    assert not plan_for(1, limit).index64 and plan_for(1, limit + 1).index64
    # the row index plus the grid's row stride must fit as well
    assert plan_for(limit - 100, 1).index64 and not plan_for(2**20, 1).index64
    assert plan_for(100, 80).vectorised and not plan_for(100, 80, grad_offset=1).vectorised
    assert plan_for(100, 80, grad_offset=4).vectorised  # 16 bytes further: still congruent


def test_emulated_qfl_kernel_misaligned_16_byte_access_is_caught(emu):
    """Control for the emulator's alignment check: forcing 16-byte accesses on a gradient buffer
    that is not congruent with pred is what would fault on a GPU, and the emulator says so."""
    pred = torch.randn(4, 80)
    labels, scores = torch.tensor([0, 1, 2, 80]), torch.rand(4)
    with pytest.raises(AssertionError, match="misaligned 16-byte access"):
        run_qfl(emu, pred, labels=labels, scores=scores, grad_offset=1, vectorised=1)
    run_qfl(emu, pred, labels=labels, scores=scores, grad_offset=1)  # the plan's choice: scalar


def run_scale_rows(emu, grad, scale, stride, *, out=None, grid=GRID):
    """out (a fresh NaN tensor unless given: pass grad itself for the in-place call)."""
    rows = grad.shape[0]
    cols = grad.numel() // rows
    if out is None:
        out = torch.full_like(grad, float("nan"))
    launch = ScaleRowsLaunch(
        DTYPE_CODES[grad.dtype], _ptr(grad), _ptr(scale), stride, _ptr(out), rows, cols
    )
    _check(emu, emu.gfl_emu_scale_rows(ctypes.byref(launch), *grid))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [0, 1])
def test_emulated_scale_rows_kernel(emu, dtype, stride):
    """16 bytes per step where grad and out share their alignment (the in-place call always),
    element by element where they do not; heads and tails of the 16-byte body at every offset;
    rows shorter than 16 bytes (several rows per step) and longer; several grids.  Exactly the
    opmath product rounded to the dtype, as the kernel computes it."""
    gen = torch.Generator().manual_seed(5)
    for rows, cols in ((37, 17), (5, 1), (9, 3), (4, 80), (1, 7)):
        grad = torch.randn(rows, cols, generator=gen).to(dtype)
        scale = torch.rand(rows if stride else 1, generator=gen).to(_acc(dtype))
        per_row = scale.expand(rows) if stride == 0 else scale
        expected = (grad.to(_acc(dtype)) * per_row[:, None]).to(dtype)
        for grad_offset, out_offset in ((0, 0), (1, 1), (3, 3), (1, 0), (0, 2)):
            g = _offset_view(grad, grad_offset)
            for grid in (GRID, (1, 32), (7, 64)):
                out = run_scale_rows(
                    emu,
                    g,
                    scale,
                    stride,
                    out=_offset_view(torch.full_like(grad, float("nan")), out_offset),
                    grid=grid,
                )
                what = f"scale_rows {dtype} {rows}x{cols} offsets {grad_offset}/{out_offset}"
                assert_close(out, expected, (0, 0), what)
            in_place = g.clone() if grad_offset == 0 else _offset_view(grad, grad_offset)
            run_scale_rows(emu, in_place, scale, stride, out=in_place)
            assert_close(in_place, expected, (0, 0), f"in-place {what}")


@pytest.mark.parametrize(
    "dtype,magnitude",
    [(torch.float32, 1e4), (torch.float64, 1e4), (torch.float16, 60.0), (torch.bfloat16, 60.0)],
)
def test_emulated_kernels_extreme_logits_are_finite_and_accurate(emu, dtype, magnitude):
    # QFL: saturated logits on both sides of the target
    x = torch.tensor([[magnitude, -magnitude, 0.0], [-magnitude, magnitude, 3.0]], dtype=dtype)
    labels = torch.tensor([0, 0])
    scores = torch.tensor([1.0, 0.9], dtype=_acc(dtype))
    loss, grad = run_qfl(emu, x, labels=labels, scores=scores)
    ref, ref_grad = _reference_with_grad(
        lambda p: reference.quality_focal_loss(p, labels, scores.double()),
        x,
        torch.ones(2, dtype=torch.float64),
    )
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, ref, (1e-4, 1e-4), f"qfl {dtype} +-{magnitude} loss")
    assert_close(grad, ref_grad, (1e-2, 1e-3), f"qfl {dtype} +-{magnitude} gradient")
    # DFL and the integral: one bin at +magnitude, the rest at -magnitude (every rows kernel)
    for bins, variant in ((17, 0), (17, 1), (17, 2), (20, 0), (33, 0)):
        z = torch.full((3, bins), -magnitude, dtype=dtype)
        z[0, 3] = z[1, 16] = z[2, 0] = magnitude
        what = f"{dtype} +-{magnitude} bins={bins} variant={variant}"
        value, value_grad = run_rows(emu, z, dfl=False, variant=variant)
        assert_close(value, torch.tensor([3.0, 16.0, 0.0]), (0, 0), f"integral {what} value")
        assert torch.isfinite(value_grad).all()
        target = torch.tensor([3.0, 16.0, 0.5], dtype=_acc(dtype))
        dfl, dfl_grad = run_rows(emu, z, dfl=True, target=target, variant=variant)
        ref, ref_grad = _reference_with_grad(
            functools.partial(_dfl_reference, target=target.double()),
            z,
            torch.ones(3, dtype=torch.float64),
        )
        assert torch.isfinite(dfl).all() and torch.isfinite(dfl_grad).all()
        assert_close(dfl, ref, (1e-4, 1e-4), f"dfl {what} loss")
        assert_close(dfl_grad, ref_grad, (1e-2, 1e-3), f"dfl {what} gradient")


def test_emulated_kernels_empty_inputs_write_nothing(emu):
    empty = torch.empty(0, 17)
    for variant in ROW_VARIANTS:
        for grid in (GRID, (0, 0)):
            out, grad = run_rows(emu, empty, dfl=False, variant=variant, grid=grid)
            assert out.shape == (0,) and grad.shape == (0, 17)
    loss, grad = run_qfl(
        emu, torch.empty(0, 80), labels=torch.empty(0, dtype=torch.long), scores=torch.empty(0)
    )
    assert loss.shape == (0,)


@pytest.mark.parametrize("grid", [(1, 32), (3, 256), (64, 64)])
def test_emulated_kernels_do_not_depend_on_the_launch_geometry(emu, grid):
    """Each row is reduced by one lane group in a fixed order, so the results are bitwise the
    same whatever the grid (and so run to run: nothing else varies)."""
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(45, 17, generator=gen) * 4
    target = torch.rand(45, generator=gen) * 16
    scale = torch.rand(45, generator=gen)
    x = torch.randn(45, 80, generator=gen)
    labels = torch.randint(0, 81, (45,), generator=gen)
    scores = torch.rand(45, generator=gen)
    for call in (
        lambda g: run_rows(emu, z, dfl=False, grid=g),
        lambda g: run_rows(emu, z, dfl=True, target=target, scale=scale, stride=1, grid=g),
        lambda g: run_qfl(emu, x, labels=labels, scores=scores, scale=scale, stride=1, grid=g),
    ):
        for got, expected in zip(call(grid), call(GRID)):
            assert torch.equal(got, expected)


def test_bounds_script_counts_the_launchers_lanes(emu):
    """benchmarks/qfl_kernel_bounds.py mirrors qfl_lanes_log2 in Python (it reads cubins, not
    the extension): the mirror must give the launcher's lanes, or its tables describe launches
    that do not happen."""
    from benchmarks.qfl_kernel_bounds import after_lanes

    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        for c in range(1, 700):
            assert after_lanes(c, size) == 1 << _qfl_plan(emu, 1000, c, dtype).lanes_log2, (
                c,
                dtype,
            )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["labels", "dense"])
def test_emulated_qfl_probabilities_outside_0_1(emu, dtype, form):
    """Activated inputs that only the (here skipped) value checks reject: the loss of the
    nearer of 0 and 1, loss and gradient alike, a
    NaN giving its anchor a NaN loss and itself alone a NaN gradient: the CPU, Triton and
    reference backends' result (tests/test_unchecked_values.py), in every vector head and tail."""
    gen = torch.Generator().manual_seed(8)
    n, c = 6, 37
    p = torch.rand(n, c, generator=gen, dtype=torch.float64).clamp(0.05, 0.95)
    p[0, 0], p[0, 1], p[1, 36], p[2, 17] = 1.5, -0.25, 1e4, -1e4
    p[3, 0], p[3, 1], p[4, 5] = 1.0, 0.0, float("nan")
    pred = p.to(dtype)
    clamped = pred.double().clamp(0.0, 1.0).nan_to_num(0.5)
    if form == "labels":
        labels = torch.tensor([0, 36, 17, 0, 5, -1])
        scores = torch.rand(n, generator=gen, dtype=torch.float64).to(_acc(dtype))
        targets = {"labels": labels, "scores": scores}

        def ref_fn(q):
            return reference.quality_focal_loss(q, labels, scores.double(), 2.0, True)
    else:
        target = torch.rand(n, c, generator=gen, dtype=torch.float64).to(dtype)
        targets = {"target": target}

        def ref_fn(q):
            return reference.quality_focal_loss_dense(q, target.double(), 2.0, True)

    loss, grad = run_qfl(emu, pred, **targets, activated=True)
    ref, ref_grad = _reference_with_grad(ref_fn, clamped, torch.ones(n, dtype=torch.float64))
    # at p = 1 BCE's slope is (1 - y) / 1e-12, past float16's range: inf there, as in torch
    ref_grad = ref_grad.to(dtype).double()
    finite = torch.ones(n, dtype=torch.bool)
    finite[4] = False
    assert_close(loss[finite], ref[finite], LOSS_TOL[dtype], f"{dtype} {form} loss")
    grad_ok = ~pred.isnan()
    assert_close(grad[grad_ok], ref_grad[grad_ok], GRAD_TOL[dtype], f"{dtype} {form} gradient")
    assert loss[4].isnan() and grad.isnan().nonzero().tolist() == [[4, 5]]
