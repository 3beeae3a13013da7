"""Stopping a run early: on SIGINT/SIGTERM or after a given number of iterations, every rank at
the same iteration; the loop then checkpoints and raises :class:`TrainingInterrupted`."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from .distributed import DistContext, any_rank

__all__ = ["TrainingInterrupted", "StopRequest"]

logger = logging.getLogger("detector")


class TrainingInterrupted(Exception):
    """Raised (after a checkpoint was written) when training stopped on SIGINT/SIGTERM or on
    ``stop_after_iters``."""


class StopRequest:
    """Whether the run should stop before its next iteration.

    While installed (:meth:`install`, from the main thread only), a first SIGINT/SIGTERM asks
    for a stop after the current iteration and a second one raises ``KeyboardInterrupt`` at
    once. ``stop_after_iters`` asks for a stop once that many global iterations are done.
    """

    def __init__(self, stop_after_iters: int | None = None) -> None:
        self.stop_after_iters = stop_after_iters
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Catch SIGINT and SIGTERM (only possible in the main thread; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._on_signal)

    def uninstall(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning(
            "received signal %d: saving a checkpoint after this iteration "
            "(send again to abort without saving)",
            signum,
        )

    def should_stop(self, global_step: int, ctx: DistContext) -> bool:
        """True when any rank was asked to stop (collective under DDP: every rank calls)."""
        stop = self.signal is not None or (
            self.stop_after_iters is not None and global_step >= self.stop_after_iters
        )
        # every rank must leave at the same iteration
        return any_rank(stop, ctx)
