"""Patching by class switching: the fused subclasses of Ultralytics classes and their registry.

A model, loss, trainer or YOLO object is patched by switching its class to a fused subclass (and
back by unpatch), which keeps its identity, state and every reference to it; DFL modules are
replaced by FusedDFL modules sharing their conv.

Every class the adapter defines or makes has the public module,
:mod:`gfl_ops.integrations.ultralytics`, as its ``__module__`` and is found there by name: pickles
(``torch.save`` of a patched model) record that path, not this package's private layout.
"""

from __future__ import annotations

import sys
from typing import TypeVar

T = TypeVar("T")

# the public module: this package's __init__, which re-exports every class defined here and in the
# sibling modules (it runs before any of them, so it is in sys.modules whenever they are)
_HOME = __name__.rpartition(".")[0]

_STOCK: dict[type, type] = {}  # fused class -> the Ultralytics class it extends
_FUSED: dict[tuple[type, type], type] = {}  # (Ultralytics class, mixin) -> fused class


def _homed(cls: T) -> T:
    """Give ``cls`` the public module as its ``__module__`` (pickles look it up there)."""
    cls.__module__ = _HOME
    return cls


def _register(cls: T, base: type, mixin: type) -> T:
    _STOCK[cls] = base
    _FUSED[(base, mixin)] = cls
    return cls


def _fused_subclass(base: type, mixin: type, by_name: bool = True) -> type:
    """``mixin`` over ``base``: a predefined class, or one made (and cached) here.

    ``by_name``: put a made class in the public module's namespace, so that pickle finds it by
    name (models, losses: ``torch.save``); the Ultralytics task classes have theirs made at
    import, so other processes find them too.  Trainer classes are left out: Ultralytics' DDP
    launcher cloudpickles ``type(trainer)``, which works for a made class only by value, i.e. when
    it is not found by name."""
    if issubclass(base, mixin):
        return base
    cls = _FUSED.get((base, mixin))
    if cls is None:
        home = sys.modules[_HOME]
        name = f"Fused{base.__name__}"
        while by_name and hasattr(home, name):  # same-named classes from different modules
            name += "_"
        cls = type(
            name,
            (mixin, base),
            {
                "__module__": _HOME,
                "__qualname__": name,
                "__doc__": f"{base.__name__} patched by gfl_ops.",
            },
        )
        _register(cls, base, mixin)
        if by_name:
            setattr(home, name, cls)
    return cls


def _stock_class(cls: type) -> type:
    return _STOCK.get(cls, cls)
