"""TEST-ONLY stand-in for mmcv's compiled extension module ``mmcv._ext``.

Not part of gfl_ops and never imported by it: ``gfl_ops.integrations.mmdet`` runs against a real
mmcv, whose ``_ext`` holds the compiled ops.  The test environment installs ``mmcv-lite`` (the
same Python package without compiled ops), where ``from mmdet.models import ...`` fails with
"No module named 'mmcv._ext'": every ``mmcv.ops`` module runs, at import time,
``mmcv.utils.ext_loader.load_ext('_ext', [names])``, which imports ``mmcv._ext`` and asserts
that it has each named attribute.

:func:`install` puts this stand-in into ``sys.modules['mmcv._ext']`` when the real extension
cannot be imported (with full mmcv installed it does nothing, so the real ops are used):

* every public name exists (module ``__getattr__``, PEP 562), so ``load_ext`` succeeds for the op
  list of any mmcv version;
* ``nms`` has an exact torchvision equivalent and calls ``torchvision.ops.nms`` (mmdet's
  ``predict`` path: ``mmcv.ops.batched_nms`` -> ``NMSop`` -> ``ext_module.nms``);
* every other op raises ``NotImplementedError`` naming the op when called, so a test can never
  silently depend on a compiled op this stand-in does not have.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from collections.abc import Callable

import torch

__all__ = ["install", "is_stub"]

_MODULE_NAME = "mmcv._ext"


def _nms(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0
) -> torch.Tensor:
    """mmcv ``_ext.nms``: boxes (K, 4) xyxy, scores (K,) -> kept indices (int64), best first."""
    if offset != 0:
        # mmcv's legacy offset=1 (pixel-inclusive widths) has no torchvision equivalent
        raise NotImplementedError(
            "mmcv._ext.nms with offset=1 is not available in the test-only mmcv._ext stand-in"
        )
    import torchvision

    return torchvision.ops.nms(boxes, scores, float(iou_threshold))


def _unavailable(name: str) -> Callable[..., object]:
    def op(*args: object, **kwargs: object) -> object:
        raise NotImplementedError(
            f"mmcv._ext.{name} is a compiled mmcv op; the test-only mmcv._ext stand-in "
            "(tests/integrations/mmcv_ext_stub.py) does not implement it. Install full mmcv "
            "to use it."
        )

    op.__name__ = op.__qualname__ = name
    return op


def _make_module() -> types.ModuleType:
    module = types.ModuleType(_MODULE_NAME, __doc__)
    # a spec without a loader: importlib / pkgutil.find_loader('mmcv._ext') see a module that is
    # present but has no loader, so mmengine's mmcv_full_available() stays False (mmcv-lite)
    module.__spec__ = importlib.machinery.ModuleSpec(_MODULE_NAME, None, origin=__file__)
    module.__file__ = __file__
    module.nms = _nms
    module._gfl_ops_test_stub = True
    cache: dict[str, Callable[..., object]] = {}

    def __getattr__(name: str) -> Callable[..., object]:
        # dunder / private lookups (``__path__``, ``__wrapped__``, ...) must stay AttributeErrors
        # so that import machinery, inspect and pickling treat this as a plain module
        if name.startswith("_"):
            raise AttributeError(f"module {_MODULE_NAME!r} has no attribute {name!r}")
        if name not in cache:
            cache[name] = _unavailable(name)
        return cache[name]

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


def is_stub(module: object) -> bool:
    """True when ``module`` is this test-only stand-in."""
    return bool(getattr(module, "_gfl_ops_test_stub", False))


def install() -> types.ModuleType:
    """Make ``import mmcv._ext`` work; returns the module in use (real extension or stand-in)."""
    existing = sys.modules.get(_MODULE_NAME)
    if existing is not None:
        return existing
    try:
        return importlib.import_module(_MODULE_NAME)
    except ModuleNotFoundError as err:
        if err.name != _MODULE_NAME:  # a real extension failing on a missing dependency
            raise
    module = _make_module()
    sys.modules[_MODULE_NAME] = module
    import mmcv

    mmcv._ext = module  # as the import system would have bound the submodule
    return module
