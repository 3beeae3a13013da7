"""Command-line overrides of a config: ``section.key=value`` strings applied in place."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable
from typing import Any

from .schema import ExperimentConfig


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return text  # a bare string


def apply_overrides(cfg: ExperimentConfig, overrides: Iterable[str]) -> ExperimentConfig:
    """Apply ``section.key=value`` overrides (``value`` parsed as a Python literal, else a
    string). ``model.*`` keys are checked against ``ModelConfig`` when the model is built;
    ``data.*``/``train.*`` keys must exist. Returns ``cfg`` (modified in place)."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        key, text = item.split("=", 1)
        section, name = key.strip().split(".", 1)
        value = _parse_value(text.strip())
        if isinstance(value, list):
            value = tuple(value)
        if section == "model":
            cfg.model[name] = value
        elif section in ("data", "train"):
            target = getattr(cfg, section)
            if not hasattr(target, name):
                valid = sorted(f.name for f in dataclasses.fields(target))
                raise ValueError(
                    f"unknown {section} key {name!r} in override {item!r}; valid: {valid}"
                )
            setattr(target, name, value)
        else:
            raise ValueError(f"override {item!r}: section must be model, data or train")
    return cfg
