"""Ultralytics' ``yolo`` command, with the fused ops: ``gfl-yolo`` (or ``python -m
gfl_ops.integrations.ultralytics``) takes exactly the ``yolo`` command's arguments::

    gfl-yolo train model=yolo11n.pt data=coco8.yaml epochs=100 imgsz=640
    gfl-yolo val model=runs/detect/train/weights/best.pt data=coco8.yaml
    gfl-yolo predict model=yolo11n.pt source=bus.jpg

Every ``YOLO`` object the command makes holds a PyTorch detection model (detect, segment, pose,
OBB) is patched (:func:`gfl_ops.integrations.ultralytics.patch`), so ``train`` runs the fused
trainer, ``val`` / ``predict`` the fused head, and checkpoints stay stock.  Anything else
(classification models, exported formats, the ``settings`` / ``solutions`` commands) runs as
under ``yolo``.  ``gfl-yolo tune`` starts each trial as a ``gfl-yolo train`` process.

How: Ultralytics' CLI (``ultralytics.cfg.entrypoint``, the same function ``yolo`` runs) imports
``YOLO`` from the ``ultralytics`` package when it builds the model; for the life of this
process, that name makes patched objects.  Nothing changes for other processes.
"""

from __future__ import annotations

from typing import Any


def _patching_yolo(stock_yolo: type) -> Any:
    """A stand-in for the ``YOLO`` class that patches what it makes (when patchable)."""
    from ultralytics.nn.tasks import DetectionModel

    from . import patch

    def make(*args: Any, **kwargs: Any) -> Any:
        yolo = stock_yolo(*args, **kwargs)
        if isinstance(yolo._modules.get("model"), DetectionModel):
            patch(yolo)
        return yolo

    make.__doc__ = stock_yolo.__doc__
    return make


def main() -> None:
    """Run Ultralytics' CLI entry point on ``sys.argv`` with patched ``YOLO`` objects."""
    import ultralytics
    from ultralytics.cfg import entrypoint

    ultralytics.YOLO = _patching_yolo(ultralytics.YOLO)
    entrypoint()


if __name__ == "__main__":
    main()
