"""``YOLO.tune()`` with the fused ops: every trial's ``yolo train`` process is ``gfl-yolo train``.

Ultralytics' tuner trains each trial in a new process, launched as ``python -m
ultralytics.cfg.__init__ train key=value ...`` (the ``yolo`` command: by the tuner itself up to
~8.4.1xx, by its ``MultiTrainer`` since).  That process builds its models stock, so a patched
``YOLO``'s ``tune()`` would train every trial without the fused ops, silently.

:func:`trials_run_fused` covers the span of one ``tune()`` call: the ``subprocess`` module, as
the Ultralytics modules that launch trials see it, is replaced by a stand-in whose ``run``
launches the same arguments under ``python -m gfl_ops.integrations.ultralytics`` (``gfl-yolo``,
same interpreter) instead; every other attribute is the real module's, and both modules get the
real one back when the call ends.  Nothing changes for other code, other threads' launches of
other commands, or other processes.
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import warnings
from collections.abc import Iterator
from typing import Any

# how Ultralytics launches its own CLI: the module form in every tested release (8.3.100 on), the
# console script in older ones
_STOCK_LAUNCHES = ((sys.executable, "-m", "ultralytics.cfg.__init__"), ("yolo",))
FUSED_LAUNCH = (sys.executable, "-m", "gfl_ops.integrations.ultralytics")
# the modules whose ``subprocess.run`` starts trials (the tuner; MultiTrainer in engine.trainer)
_LAUNCHING_MODULES = ("ultralytics.engine.tuner", "ultralytics.engine.trainer")


def fused_command(cmd: Any) -> Any:
    """``cmd`` (an argument list) with a stock ``yolo`` launch at its head replaced by
    :data:`FUSED_LAUNCH`; any other command is returned as it is (the same object)."""
    if isinstance(cmd, (list, tuple)):
        head = tuple(str(part) for part in cmd[:3])
        for launch in _STOCK_LAUNCHES:
            if head[: len(launch)] == launch:
                return [*FUSED_LAUNCH, *cmd[len(launch) :]]
    return cmd


class _GflYoloLaunches:
    """Stands in for the ``subprocess`` module inside Ultralytics' launching modules."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def run(self, cmd: Any, *args: Any, **kwargs: Any) -> Any:
        fused = fused_command(cmd)
        if fused is cmd and isinstance(cmd, (list, tuple)) and "train" in map(str, cmd):
            # a launch form this adapter does not know (a newer release?): say so, loudly
            warnings.warn(
                f"gfl_ops: Ultralytics started a training process as {list(cmd[:3])} ..., which "
                "gfl_ops does not recognise: it trains without the fused ops",
                stacklevel=2,
            )
        return self._real.run(fused, *args, **kwargs)


@contextlib.contextmanager
def trials_run_fused() -> Iterator[None]:
    """For its span, training processes that Ultralytics' tuner launches run under gfl-yolo."""
    swapped = []
    for name in _LAUNCHING_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - every tested release has both
            continue
        if getattr(module, "subprocess", None) is subprocess:
            module.subprocess = _GflYoloLaunches(subprocess)
            swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            module.subprocess = subprocess
