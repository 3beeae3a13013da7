"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

What is proven, for each kernel variant below (QFL, DFL, integral, row scaling; fp32 / bf16 /
fp16 / fp64; loss, recomputed gradient and fused loss+gradient; QFL at C = 1, 20, 80, 1203 in the
labels / dense / activated / β = 0, 1, 2, general modes; DFL and integral at n+1 = 17 and 16),
on both targets, in two specialisations:

* it lowers through Triton's real compiler (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin, with the
  ``ptxas`` Triton bundles) for ``sm_80`` and ``sm_90a``: this catches what the interpreter
  accepts but the compiler does not (dtype rules, constexpr branches, fp64 math);
* **no register spills**: ``cuobjdump --dump-resource-usage`` on the cubin Triton built reports a
  0-byte stack frame and no local memory.  ptxas places spills in the stack frame (``N bytes stack
  frame, N bytes spill stores``), and the stack frame is ``CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES``,
  from which Triton derives ``kernel.n_spills`` when it loads a kernel on a GPU.  A control
  compiles one variant with ``maxnreg=24`` and checks that the same probe sees its spills;
* **aligned** specialisation (what a launch gets for 16-byte aligned tensors whose sizes and row
  strides are multiples of 16): every global load of the tiled tensors (``pred``, a dense
  ``target``, the saved gradient of ``scale_rows``) and every global store of the gradient is a
  single vector instruction covering the thread's whole ``ELEMENTS_PER_THREAD``-element chunk,
  capped at 16 bytes: 16 bytes (``ld.global.v4.b32`` / ``v2.b64``) for fp32 and fp64, and
  8 bytes (``ld.global.v2.b32``) for fp16/bf16, whose 4 elements per thread are only 8 bytes
  (16-byte half-precision accesses would need 8 elements per thread: ELEMENTS_PER_THREAD in
  _common.py, which the expected width follows);
* **unaligned** specialisation (the same launch with ``do_not_specialize_on_alignment``, i.e.
  unaligned pointers and sizes not divisible by 16): no global access is a vector instruction,
  so the generic kernel assumes no alignment it was not given (a vector access there would fault
  on a misaligned tensor).

How.  The compile runs in a subprocess (this file run as a script), because tests/conftest.py
sets ``TRITON_INTERPRET=1`` before triton is imported and ``triton.jit`` picks interpreted or
compiled kernels at decoration time.  Each variant is specialised the way a launch is: the
launch's argument values (stand-in CPU tensors of the right dtype, and the same ints, in the same
order, as the ``_launch`` functions pass) go through Triton's own ``native_specialize_impl`` and
``parse_attr`` (value 1 -> constexpr, 16-byte aligned pointer / int divisible by 16 ->
``tt.divisibility = 16``), then ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", arch, 32))``.  As in a launch, ints equal to 1 become constexprs: unit
column strides, contiguous per-row vectors (labels, scores, DFL targets) and, at C = 1, C and the
row stride.  Sizes in the aligned variants are rounded up to a multiple of 16 within the same
block configuration (C = 20 -> 32, 1203 -> 1216, n+1 = 17 -> 32, K = 17 -> 32): launches at
exactly C = 20, 1203 or n+1 = 17 get no divisibility on the row pitch and compile to scalar
accesses even with aligned pointers (the row pitch is 80, 4812 or 68 bytes in fp32; Triton only
knows "divisible by 16 elements").  Global accesses are read from the LLVM IR, where Triton
emits each one as an inline-asm PTX instruction whose address is traced back through
``getelementptr`` to the kernel argument, so each access is attributed to its tensor; the PTX is
checked to hold the same instructions.  A fresh Triton cache directory makes every run compile.
The two archs compile in two parallel subprocesses (~120 compiles each, about 20 s of CPU each;
the whole file took 20 s on a 2-core machine, 46 s while it was shared).

The test fails (does not skip) when triton is installed without its NVIDIA backend; it skips only
when triton itself is absent, like the rest of the Triton tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import pytest

ARCHS = (80, 90)
SPECS = ("aligned", "unaligned")
ROWS = 1 << 16  # rows of every launch: large enough for full tiles, a multiple of 16
ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
MODES = {  # mode: (writes the loss, writes the gradient, scales it by grad_output)
    "loss": (True, False, False),
    "grad": (False, True, True),
    "fused": (True, True, False),
}
GENERAL_BETA = 0.3
SPILL_CONTROL = "control-maxnreg24"


@dataclass(frozen=True)
class Variant:
    kernel: str  # "qfl" | "dfl" | "integral" | "scale_rows"
    dtype: str  # storage dtype of pred (of grad for scale_rows)
    mode: str  # key of MODES ("grad" for scale_rows)
    size: int  # C for QFL, n+1 for DFL / integral, K for scale_rows
    dense: bool = False  # QFL: dense (N, C) target instead of (labels, scores)
    activated: bool = False  # QFL: pred holds probabilities
    beta: float = 2.0  # QFL

    @property
    def id(self) -> str:
        if self.kernel == "qfl":
            target = "dense" if self.dense else "labels"
            kind = "activated" if self.activated else "logits"
            beta = "general" if self.beta == GENERAL_BETA else f"{self.beta:g}"
            return f"qfl-C{self.size}-{target}-{kind}-beta_{beta}-{self.dtype}-{self.mode}"
        if self.kernel == "scale_rows":
            return f"scale_rows-K{self.size}-{self.dtype}"
        return f"{self.kernel}-bins{self.size}-{self.dtype}-{self.mode}"


def _variants() -> list[Variant]:
    dtype_modes = (
        ("fp32", ("loss", "grad", "fused")),
        ("bf16", ("loss", "fused")),
        ("fp16", ("grad",)),
        ("fp64", ("loss", "grad")),
    )
    qfl_cases = (  # (C, dense, activated, beta): block configurations 1, 32, 16 and 256 wide
        (1, False, False, 2.0),
        (20, True, False, 1.0),
        (80, False, False, GENERAL_BETA),
        (1203, True, True, 0.0),
    )
    out = []
    for dtype, modes in dtype_modes:
        for mode in modes:
            out += [
                Variant("qfl", dtype, mode, c, dense, act, beta)
                for c, dense, act, beta in qfl_cases
            ]
            bins = (17, 16) if dtype == "fp32" else (17,)  # 16 = Ultralytics' reg_max
            out += [Variant(k, dtype, mode, nb) for nb in bins for k in ("dfl", "integral")]
        out.append(Variant("scale_rows", dtype, "grad", 80))
    out.append(Variant("scale_rows", "fp32", "grad", 17))
    return out


VARIANTS = _variants()


# --------------------------------------------------------------------------------------------
# The compiling subprocess (this file run as a script): everything below up to the tests runs
# only there, with TRITON_INTERPRET unset.
# --------------------------------------------------------------------------------------------


def _round16(size: int) -> int:
    return size if size == 1 else -(-size // 16) * 16


def _launch_args(v: Variant, aligned: bool):
    """(kernel, {argument: value} as the operator's ``_launch`` passes it, num_warps)."""
    import torch

    from gfl_ops.triton import _common, dfl, integral, qfl

    dtypes = {
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
        "fp32": torch.float32,
        "fp64": torch.float64,
    }
    dtype = dtypes[v.dtype]
    opmath = _common.opmath_dtype(dtype)
    cdt = _common.tl_opmath(dtype)
    size = _round16(v.size) if aligned else v.size

    def tensor(dt):  # stand-in: specialisation reads only the dtype and data_ptr() % 16
        return torch.empty(4, dtype=dt)

    write_loss, write_grad, scale = MODES[v.mode]
    pred = tensor(dtype)
    dummy = pred  # what the launches pass for arguments a constexpr branch never reads
    grad_out = tensor(opmath) if scale else dummy
    loss = tensor(opmath) if write_loss else dummy
    grad = tensor(dtype) if write_grad else dummy
    # A contiguous grad_output of a per-row loss is usually the expanded gradient of
    # loss.sum() (stride 0); per-row labels / scores / targets are contiguous (stride 1).
    if v.kernel == "qfl":
        cfg = qfl.qfl_config(ROWS, v.size, dtype)
        hi, lo = _common.split_float(v.beta)
        target = tensor(torch.float32) if v.dense else dummy
        labels = dummy if v.dense else tensor(torch.int64)
        scores = dummy if v.dense else tensor(torch.float32)
        args = dict(
            pred_ptr=pred,
            labels_ptr=labels,
            scores_ptr=scores,
            target_ptr=target,
            grad_out_ptr=grad_out,
            loss_ptr=loss,
            grad_ptr=grad,
            N=ROWS,
            C=size,
            stride_pn=size,
            stride_pc=1,
            stride_lab=0 if v.dense else 1,
            stride_sc=0 if v.dense else 1,
            stride_tn=size if v.dense else 0,
            stride_tc=1 if v.dense else 0,
            stride_go=0,
            beta_hi=hi,
            beta_lo=lo,
            DENSE=v.dense,
            ACTIVATED=v.activated,
            BETA_MODE=qfl.beta_mode(v.beta),
            CDT=cdt,
            WRITE_LOSS=write_loss,
            WRITE_GRAD=write_grad,
            SCALE_GRAD=scale,
            BLOCK_N=cfg.block_rows,
            BLOCK_C=cfg.block_cols,
        )
        return qfl._qfl_kernel, args, cfg.num_warps
    if v.kernel == "scale_rows":
        block_k = min(1 << (v.size - 1).bit_length(), 512)  # as _common.scale_rows
        cfg = _common.row_block(block_k, ROWS, dtype)
        args = dict(
            grad_ptr=pred,
            scale_ptr=tensor(opmath),
            out_ptr=tensor(dtype),
            R=ROWS,
            K=size,
            stride_scale=0,
            CDT=cdt,
            BLOCK_R=cfg.block_rows,
            BLOCK_K=cfg.block_cols,
        )
        return _common._scale_rows_kernel, args, cfg.num_warps
    cfg = dfl.bins_config(ROWS, v.size, dtype)
    common = dict(
        M=ROWS,
        NB=size,
        stride_pm=size,
        stride_pb=1,
        CDT=cdt,
        WRITE_GRAD=write_grad,
        SCALE_GRAD=scale,
        BLOCK_M=cfg.block_rows,
        BLOCK_B=cfg.block_cols,
    )
    if v.kernel == "dfl":
        args = dict(
            pred_ptr=pred,
            target_ptr=tensor(torch.float32),
            grad_out_ptr=grad_out,
            loss_ptr=loss,
            grad_ptr=grad,
            stride_t=1,
            stride_go=0,
            WRITE_LOSS=write_loss,
            **common,
        )
        return dfl._dfl_kernel, args, cfg.num_warps
    out = tensor(dtype) if write_loss else dummy  # the integral is returned in pred's dtype
    grad_out = tensor(dtype) if scale else dummy
    args = dict(
        pred_ptr=pred,
        grad_out_ptr=grad_out,
        out_ptr=out,
        grad_ptr=grad,
        stride_go=0,
        WRITE_OUT=write_loss,
        **common,
    )
    return integral._integral_kernel, args, cfg.num_warps


def _specialise(fn, args: dict, backend, aligned: bool):
    """(signature, constexprs, attrs) exactly as ``JITFunction.run`` builds them for ``args``;
    ``aligned=False`` is ``do_not_specialize_on_alignment`` on every argument."""
    from triton._C.libtriton import native_specialize_impl

    assert set(args) == set(fn.arg_names), set(args) ^ set(fn.arg_names)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = args[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        ty, key = native_specialize_impl(backend, value, False, True, aligned)
        signature[param.name] = ty
        if ty == "constexpr":  # an int equal to 1
            constexprs[param.name] = key
        elif isinstance(key, str):
            attrs[(i,)] = backend.parse_attr(key)
    return signature, constexprs, attrs


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
_LLIR_ASM_CALL = re.compile(r'asm sideeffect "([^"]*)", "[^"]*"\((.*)\)')
_LLIR_PTR_DEF = re.compile(
    r"^\s*(%[\w.]+) = (?:getelementptr|phi ptr addrspace\(1\)|select)"
    r"(.*)$"
)
_PTR_OPERAND = re.compile(r"ptr addrspace\(1\) (%[\w.]+)|\[ (%[\w.]+), ")


def _accesses(llir: str, arg_names: list[str]) -> dict[str, list[str]]:
    """Global ld/st instructions per pointer argument, from the LLVM IR's inline asm; an address
    that does not trace back to exactly one argument is reported under ``"?"``.  ``arg_names``:
    the kernel's non-constexpr arguments, in order (the LLVM function's leading parameters)."""
    define = next(line for line in llir.splitlines() if line.startswith("define "))
    start = define.index("(", define.index("@")) + 1
    depth, end = 1, start
    while depth:  # the parameter list: up to the parenthesis matching the one after the name
        depth += {"(": 1, ")": -1}.get(define[end], 0)
        end += 1
    params = define[start : end - 1].split(", ")
    arg_of = {}  # LLVM value of each pointer argument -> name (trailing scratch pointers: None)
    for i, decl in enumerate(params):
        if decl.startswith("ptr addrspace(1)"):
            arg_of[decl.split()[-1]] = arg_names[i] if i < len(arg_names) else None
    defs = {}
    for line in llir.splitlines():
        m = _LLIR_PTR_DEF.match(line)
        if m:
            defs[m.group(1)] = [a or b for a, b in _PTR_OPERAND.findall(m.group(2))]

    def bases(value, seen):
        if value in arg_of:
            return {arg_of[value]}
        if value in seen or value not in defs:
            return set()
        seen.add(value)
        return set().union(*(bases(op, seen) for op in defs[value]))

    found: dict[str, set[str]] = {}
    for line in llir.splitlines():
        m = _LLIR_ASM_CALL.search(line)
        if not m or not _ACCESS.search(m.group(1)):
            continue
        ops = [a or b for a, b in _PTR_OPERAND.findall(m.group(2))]
        owner = bases(ops[0], set()) if len(ops) == 1 else set()
        name = owner.pop() if len(owner) == 1 else "?"
        found.setdefault(name, set()).update(x.group(0) for x in _ACCESS.finditer(m.group(1)))
    return {name: sorted(ops) for name, ops in found.items()}


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert usage, out
    return dict(zip(("regs", "stack", "shared", "local"), map(int, usage.groups())))


def _compile_one(v: Variant, aligned: bool, target, backend, **options) -> dict:
    import triton
    from triton.compiler import ASTSource

    fn, args, num_warps = _launch_args(v, aligned)
    n_index = {name: i for i, name in enumerate(fn.arg_names)}
    signature, constexprs, attrs = _specialise(fn, args, backend, aligned)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=target, options={"num_warps": num_warps, **options})
    ptx = compiled.asm["ptx"]
    runtime_args = [n for n in fn.arg_names if signature[n] != "constexpr"]
    return dict(
        _resource_usage(compiled.asm["cubin"]),
        target=re.search(r"^\.target (\w+)", ptx, re.MULTILINE).group(1),
        accesses=_accesses(compiled.asm["llir"], runtime_args),
        ptx_accesses=sorted({m.group(0) for m in _ACCESS.finditer(ptx)}),
        num_warps=num_warps,
        specialised_to_1=sorted(n for n in constexprs if not fn.params[n_index[n]].is_constexpr),
    )


def _main(arch: int, out_path: str) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    from gfl_ops.triton import _common

    assert not _common.is_interpreted(), "TRITON_INTERPRET must be unset in the subprocess"
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    results = {}
    for v in VARIANTS:
        for spec in SPECS:
            try:
                results[f"{v.id}/{spec}"] = _compile_one(v, spec == "aligned", target, backend)
            except Exception as exc:  # reported per variant by the tests
                results[f"{v.id}/{spec}"] = {"error": f"{type(exc).__name__}: {exc}"[-4000:]}
    control = Variant("qfl", "fp32", "fused", 80, beta=GENERAL_BETA)
    results[SPILL_CONTROL] = _compile_one(control, True, target, backend, maxnreg=24)
    with open(out_path, "w") as f:
        json.dump(results, f)


# --------------------------------------------------------------------------------------------
# The tests (in the pytest process).
# --------------------------------------------------------------------------------------------


def _require_nvidia_backend() -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as exc:
        pytest.fail(
            f"triton is installed without its NVIDIA backend ({exc}); the ahead-of-time "
            "compile tests need it (it ships in the standard Linux x86-64 wheels)"
        )


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[int, dict]:
    """Results of compiling every variant for every arch: one subprocess per arch, run in
    parallel, each with its own empty Triton cache so that everything is really compiled."""
    _require_nvidia_backend()
    tmp = tmp_path_factory.mktemp("triton_aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    procs = {}
    for arch in ARCHS:
        (tmp / f"cache{arch}").mkdir()
        log = open(tmp / f"sm{arch}.log", "w")  # closed below
        procs[arch] = (
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), str(arch), str(tmp / f"sm{arch}.json")],
                env={**env, "TRITON_CACHE_DIR": str(tmp / f"cache{arch}")},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
            ),
            log,
        )
    results = {}
    for arch, (proc, log) in procs.items():
        try:
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        output = (tmp / f"sm{arch}.log").read_text()
        assert proc.returncode == 0, f"sm_{arch} compile process failed:\n{output[-6000:]}"
        results[arch] = json.loads((tmp / f"sm{arch}.json").read_text())
    return results


def _result(compiled, arch: int, key: str) -> dict:
    result = compiled[arch][key]
    if "error" in result:
        pytest.fail(f"sm_{arch} {key} does not compile: {result['error']}")
    return result


def _width(instruction: str) -> tuple[int, int]:
    """(vector length, bytes) of a PTX ld/st such as ``ld.global.v4.b32``."""
    parts = instruction.split(".")
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
    bits = next(int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p))
    return vec, vec * bits // 8


def _tiled_tensors(v: Variant) -> dict[str, tuple[str, str]]:
    """Tensors read or written in (rows x columns) tiles: name -> (ld|st, storage dtype)."""
    write_grad = MODES[v.mode][1]
    if v.kernel == "scale_rows":
        return {"grad_ptr": ("ld", v.dtype), "out_ptr": ("st", v.dtype)}
    tiles = {"pred_ptr": ("ld", v.dtype)}
    if v.dense:
        tiles["target_ptr"] = ("ld", "fp32")
    if write_grad:
        tiles["grad_ptr"] = ("st", v.dtype)
    return tiles


def _elements_per_thread() -> int:
    pytest.importorskip("gfl_ops.triton", reason="triton is not installed")
    from gfl_ops.triton import _common

    return _common.ELEMENTS_PER_THREAD


CASES = [
    pytest.param(arch, v, spec, id=f"sm{arch}-{v.id}-{spec}")
    for arch in ARCHS
    for v in VARIANTS
    for spec in SPECS
]


@pytest.mark.parametrize(("arch", "variant", "spec"), CASES)
def test_compiles_without_spills(compiled, arch, variant, spec):
    r = _result(compiled, arch, f"{variant.id}/{spec}")
    assert r["target"] == ("sm_90a" if arch == 90 else f"sm_{arch}")
    assert r["stack"] == 0 and r["local"] == 0, (
        f"{r['regs']} registers and a {r['stack']}-byte stack frame ({r['local']} bytes of local "
        "memory): ptxas spilled; see the register note in gfl_ops/triton/_common.py"
    )


@pytest.mark.parametrize(("arch", "variant", "spec"), CASES)
def test_global_access_width(compiled, arch, variant, spec):
    r = _result(compiled, arch, f"{variant.id}/{spec}")
    accesses = r["accesses"]
    assert "?" not in accesses, f"global accesses not traced to an argument: {accesses}"
    assert sorted({op for ops in accesses.values() for op in ops}) == r["ptx_accesses"], (
        "the LLVM IR's accesses differ from the PTX's",
        accesses,
        r["ptx_accesses"],
    )
    if spec == "unaligned":
        vector = {n: ops for n, ops in accesses.items() if any(_width(op)[0] > 1 for op in ops)}
        assert not vector, f"vector accesses without any alignment guarantee: {vector}"
        return
    ept = _elements_per_thread()
    for name, (kind, dtype) in _tiled_tensors(variant).items():
        # one instruction for the thread's whole chunk, capped at the 16-byte maximum of PTX
        want = min(16, ept * ITEMSIZE[dtype])
        ops = [op for op in accesses.get(name, []) if op.startswith(kind)]
        assert ops, f"no {kind} of {name}: {accesses}"
        widths = {op: _width(op) for op in ops}
        assert all(vec > 1 and nbytes == want for vec, nbytes in widths.values()), (
            f"{name} ({dtype}): expected only {want}-byte vector {kind}s, got {ops}"
        )


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_spill_probe_sees_forced_spills(compiled, arch):
    """The spill check is not vacuous: ``maxnreg=24`` on a ~40-register variant spills, and the
    probe used above reports it."""
    r = _result(compiled, arch, SPILL_CONTROL)
    assert r["regs"] <= 24 and r["stack"] > 0, r


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before anything imports triton
    _main(int(sys.argv[1]), sys.argv[2])
