"""Which GPUs the CUDA kernels compiled into ``gfl_ops._C`` can run on.

nvcc embeds machine code (SASS) for the architectures of the build's arch list and, for those
marked ``+PTX``, PTX that the driver JIT-compiles.  The CUDA rules (CUDA C++ Programming Guide,
"Binary Compatibility" and "PTX Compatibility"):

* SASS for ``sm_XY`` runs on a GPU of compute capability ``X.Z`` with ``Z >= Y``: same major
  version, equal or newer minor (sm_80 code runs on an RTX 3090, sm_86, and an L4, sm_89, but not
  on an H100, sm_90);
* PTX for ``compute_XY`` runs, JIT-compiled, on any GPU of capability ``X.Y`` or newer;
* an arch-specific target (``sm_90a``, ``compute_90a``) runs on exactly that capability.

setup.py records the compiled targets in ``gfl_ops/_build_info.py`` (``CUDA_SASS``, ``CUDA_PTX``:
strings such as ``"80"``, ``"90a"``), read from the ``-gencode`` flags torch derives from
``TORCH_CUDA_ARCH_LIST``.  Without a matching target a launch fails with "no kernel image is
available"; :func:`unrunnable_reason` says so before any launch, so that the automatic backend
choice passes over the CUDA kernels on such a GPU (a T4, sm_75, with the default build) and an
explicit ``backend='cuda'`` gets a clear error naming the GPU and the rebuild.

This module imports nothing but ``re`` and ``functools`` at load (gfl_ops and torch only inside
the functions that read the build), so setup.py can load it by path to extend the default arch
list with the GPUs it sees.
"""

from __future__ import annotations

import functools
import re

_GENCODE = re.compile(r"code=(sm|compute)_(\d+)([a-z]?)")


def targets_from_gencode(flags: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(SASS targets, PTX targets) of nvcc ``-gencode=arch=compute_XY,code=...`` flags, each as
    ``"XY"`` or ``"XYa"``, sorted by number."""
    sass, ptx = set(), set()
    for flag in flags:
        for kind, number, suffix in _GENCODE.findall(flag):
            (sass if kind == "sm" else ptx).add(number + suffix)
    return _sorted(sass), _sorted(ptx)


def _sorted(targets: set[str]) -> tuple[str, ...]:
    return tuple(sorted(targets, key=lambda t: (int(re.match(r"\d+", t)[0]), t)))


def _number(target: str) -> tuple[int, bool]:
    """(capability as 10 * major + minor, arch-specific?) of ``"90"`` / ``"90a"``."""
    m = re.fullmatch(r"(\d+)([a-z]?)", target)
    if m is None:
        raise ValueError(f"not a CUDA target: {target!r}")
    return int(m[1]), bool(m[2])


def runs_on(capability: tuple[int, int], sass: tuple[str, ...], ptx: tuple[str, ...]) -> bool:
    """Whether code compiled for ``sass`` / ``ptx`` targets runs on a GPU of ``capability``
    (major, minor)."""
    device = 10 * capability[0] + capability[1]
    for target in sass:
        number, specific = _number(target)
        if number == device or (
            not specific and number // 10 == device // 10 and number % 10 <= device % 10
        ):
            return True
    for target in ptx:
        number, specific = _number(target)
        if number == device or (not specific and number <= device):
            return True
    return False


def describe(sass: tuple[str, ...], ptx: tuple[str, ...]) -> str:
    parts = []
    if sass:
        parts.append("SASS for " + ", ".join(f"sm_{t}" for t in sass))
    if ptx:
        parts.append("PTX for " + ", ".join(f"compute_{t}" for t in ptx))
    return " and ".join(parts) or "no GPU code"


def arch_list_entry(capability: tuple[int, int]) -> str:
    """The ``TORCH_CUDA_ARCH_LIST`` entry for a GPU of ``capability``: ``"7.5"``."""
    return f"{capability[0]}.{capability[1]}"


def extend_arch_list(arch_list: str, capabilities: list[tuple[int, int]], sass, ptx) -> str:
    """``arch_list`` (compiling ``sass`` / ``ptx``) plus an entry for each GPU in
    ``capabilities`` that it would not run on."""
    extra = []
    for capability in capabilities:
        entry = arch_list_entry(capability)
        if not runs_on(capability, sass, ptx) and entry not in extra:
            extra.append(entry)
    return ";".join([arch_list, *extra]) if extra else arch_list


def recorded_targets() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(SASS, PTX) targets of the loaded build's record; empty when it has none."""
    from gfl_ops._extension import build_record

    record = build_record()
    return tuple(getattr(record, "CUDA_SASS", ())), tuple(getattr(record, "CUDA_PTX", ()))


@functools.cache
def unrunnable_reason() -> str | None:
    """Why the compiled CUDA kernels cannot run on a visible GPU; None when they run on every
    one (or nothing is known: no GPU, a build without the record)."""
    import torch

    from gfl_ops._extension import REBUILD_HINT

    sass, ptx = recorded_targets()
    if not (sass or ptx) or not torch.cuda.is_available():
        return None
    for index in range(torch.cuda.device_count()):
        capability = tuple(torch.cuda.get_device_capability(index))
        if runs_on(capability, sass, ptx):
            continue
        name = torch.cuda.get_device_name(index)
        entry = arch_list_entry(capability)
        return (
            f"gfl_ops._C holds {describe(sass, ptx)}, none of which runs on cuda:{index} "
            f"({name}, compute capability {entry}). Set "
            f'TORCH_CUDA_ARCH_LIST="{entry}" (or "{entry};8.0;9.0+PTX") for the build. '
            f"{REBUILD_HINT}"
        )
    return None
