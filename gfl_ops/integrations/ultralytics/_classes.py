"""Patching by class switching: the fused subclasses of Ultralytics classes and their registry.

A model, loss, trainer or YOLO object is patched by switching its class to a fused subclass (and
back by unpatch), which keeps its identity, state and every reference to it; DFL modules are
replaced by FusedDFL modules sharing their conv.

Every class the adapter defines or makes has the public module,
:mod:`gfl_ops.integrations.ultralytics`, as its ``__module__`` and is found there by name: pickles
(``torch.save`` of a patched model) record that path, not this package's private layout.
"""

from __future__ import annotations

import importlib
import json
import os
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
    import, so other processes find them too.  Trainer classes (``by_name=False``) are instead
    published for the processes this one starts (:func:`_publish_for_workers`)."""
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
    if not by_name:  # (each time: the environment is the caller's to change in between)
        _publish_for_workers(cls, base)
    return cls


# Multi-GPU training: Ultralytics starts one worker process per GPU, which rebuilds the trainer
# from its class -- imported by name (``from <module> import <name>``, releases up to 8.4.1xx)
# or from a cloudpickle of it (since).  A trainer class made here at run time exists in no other
# process, so each one is published in this environment variable (inherited by the workers) as
# name -> the class it extends, and the public module's ``__getattr__`` makes it again there on
# first lookup (:func:`_published_base`).  Classes defined in a script (``__main__``) or a
# function cannot be imported elsewhere and are not published: cloudpickle sends those by value,
# and a release that imports by name cannot start them, patched or not.
WORKERS_ENV = "GFL_OPS_ULTRALYTICS_TRAINERS"


def _published() -> dict[str, str]:
    try:
        entries = json.loads(os.environ.get(WORKERS_ENV, "{}"))
    except ValueError:
        return {}
    return entries if isinstance(entries, dict) else {}


def _publish_for_workers(cls: type, base: type) -> None:
    if base.__module__ == "__main__" or "<locals>" in base.__qualname__:
        return
    entries = _published()
    while entries.get(cls.__name__, None) not in (None, f"{base.__module__}:{base.__qualname__}"):
        cls.__name__ = cls.__qualname__ = cls.__name__ + "_"  # same-named bases elsewhere
    entries[cls.__name__] = f"{base.__module__}:{base.__qualname__}"
    os.environ[WORKERS_ENV] = json.dumps(entries, sort_keys=True)


def _published_base(name: str) -> type | None:
    """The class that the published fused class ``name`` extends (imported), or None."""
    spec = _published().get(name)
    if not isinstance(spec, str) or ":" not in spec:
        return None
    module_name, qualname = spec.split(":", 1)
    try:
        obj: object = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:  # an AttributeError: what a failed lookup is
        raise AttributeError(
            f"{name}: the process that started this one made it from {spec}, which cannot be "
            f"imported here ({err})"
        ) from err
    return obj if isinstance(obj, type) else None


def _stock_class(cls: type) -> type:
    return _STOCK.get(cls, cls)
