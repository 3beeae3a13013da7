"""The ablation studies: each setting is a configuration of the existing detector (``ModelConfig``
overrides on top of the sweep's base config), next to the GFL paper's figure for it.

Paper figures are COCO minival, ResNet-50, 1x schedule, in AP percent (``r``, the score–IoU
Pearson correlation of the rebuttal's answer Q2, is a fraction). ``x`` places a setting on the
x-axis of a curve study.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Setting", "Study", "STUDIES", "get_study"]

METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _paper(*values: float, r: float | None = None) -> dict[str, float]:
    """Paper figures in the order AP, AP50, AP75, APs, APm, APl (as many as the table gives)."""
    out = dict(zip(METRICS, values))
    if r is not None:
        out["r"] = r
    return out


@dataclass(frozen=True)
class Setting:
    """One row of a study.

    ``name`` is the id in the CSV (``setting`` column); ``model`` holds ``ModelConfig`` fields
    set on top of the base config; ``paper`` the paper's figures (keys of :data:`METRICS` in
    percent, ``'r'`` a fraction); ``x`` the x-axis value of curve studies.
    """

    name: str
    label: str
    model: Mapping[str, Any]
    paper: Mapping[str, float] = field(default_factory=dict)
    x: float | None = None


@dataclass(frozen=True)
class Study:
    """A set of settings compared with one table of the paper.

    ``plot`` is 'bars' (one bar per setting, and the gain over ``settings[0]``) or 'curve'
    (AP against ``x``, labelled ``x_label``).
    """

    name: str
    title: str
    source: str
    settings: tuple[Setting, ...]
    plot: str = "bars"
    x_label: str = ""
    note: str = ""

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise KeyError(
            f"study {self.name!r} has no setting {name!r}; "
            f"settings: {[s.name for s in self.settings]}"
        )


_TABLE3 = Study(
    name="table3",
    title="QFL and DFL on ATSS",
    source="GFL paper Table 3; score–IoU r from the rebuttal (A2, R-50): ATSS 0.72, GFL 0.78",
    settings=(
        Setting(
            "atss",
            "ATSS (focal loss + centre-ness, Dirac box)",
            {"variant": "atss"},
            _paper(39.2, 57.4, 42.2, r=0.72),
        ),
        Setting("qfl", "+ QFL (joint score)", {"variant": "qfl"}, _paper(39.9, 58.5, 43.0)),
        Setting("dfl", "+ DFL (General box)", {"variant": "dfl"}, _paper(39.5, 57.3, 42.8)),
        Setting("gfl", "+ QFL + DFL (GFL)", {"variant": "gfl"}, _paper(40.2, 58.6, 43.4, r=0.78)),
    ),
)

_BETA = Study(
    name="beta",
    title="β of QFL (joint score on ATSS, Dirac box)",
    source="GFL paper Table 1(c)",
    settings=tuple(
        Setting(f"beta={b:g}", f"β = {b:g}", {"variant": "qfl", "qfl_beta": b}, _paper(*p), x=b)
        for b, p in (
            (0.0, (37.6, 55.4, 40.3)),
            (1.0, (39.0, 58.1, 41.7)),
            (2.0, (39.9, 58.5, 43.0)),
            (2.5, (39.7, 58.1, 42.7)),
            (4.0, (38.2, 55.4, 41.6)),
        )
    ),
    plot="curve",
    x_label="β (QFL)",
    note="β = 2 is the same configuration as table3's '+ QFL' and shares its runs.",
)

_REPRESENTATION = Study(
    name="representation",
    title="Box representation on ATSS",
    source="GFL paper Table 2(a), ATSS columns",
    settings=(
        Setting(
            "dirac",
            "Dirac delta (deltas, GIoU)",
            {"variant": "atss"},
            _paper(39.2, 57.4, 42.2, 23.0, 42.8, 51.1),
        ),
        Setting(
            "gaussian",
            "Gaussian (means + log-sigmas, GIoU + NLL)",
            {"variant": "atss", "box_repr": "gaussian"},
            _paper(39.3, 57.0, 42.4, 23.6, 42.9, 51.0),
        ),
        Setting(
            "general",
            "General, without DFL (GIoU)",
            {"variant": "atss", "box_repr": "general", "dfl_loss": False},
            _paper(39.3, 57.1, 42.5, 23.5, 43.0, 51.2),
        ),
        Setting(
            "general+dfl",
            "General with DFL (GIoU + DFL)",
            {"variant": "dfl"},
            _paper(39.5, 57.3, 42.8, 23.6, 43.2, 51.2),
        ),
    ),
    note="'dirac' and 'general+dfl' are table3's 'atss' and 'dfl' and share their runs.",
)

_BINS = Study(
    name="bins",
    title="Number of bins n (reg_max) of GFL, interval 1",
    source="GFL paper Table 2(b)",
    settings=tuple(
        Setting(f"n={n}", f"n = {n}", {"variant": "gfl", "reg_max": n}, _paper(*p), x=float(n))
        for n, p in (
            (4, ()),
            (8, ()),
            (12, (40.1, 58.4, 43.1, 23.1, 43.8, 52.5)),
            (14, (40.2, 58.3, 43.6, 23.3, 44.2, 52.2)),
            (16, (40.2, 58.6, 43.4, 23.0, 44.3, 53.0)),
            (18, (40.1, 58.1, 43.1, 22.6, 43.9, 52.6)),
        )
    ),
    plot="curve",
    x_label="n (bins 0..n, Δ = 1 stride)",
    note=(
        "The paper tries n = 12..18 on COCO, where regression targets reach ~16 strides; the "
        "embedded dataset's targets stay below ~6 strides, so n = 4 and 8 (the embedded "
        "config's own) are added. With the embedded base config n = 8 shares table3's "
        "'gfl' runs."
    ),
)

_L2_SCORE = Study(
    name="l2_score",
    title="L2 loss instead of QFL on the joint score (ATSS, Dirac box)",
    source="GFL rebuttal Table I, ATSS columns",
    settings=(
        Setting(
            "atss",
            "centre-ness branch + focal loss (ATSS)",
            {"variant": "atss"},
            _paper(39.2, 57.4, 42.2),
        ),
        Setting("qfl", "joint score + QFL", {"variant": "qfl"}, _paper(39.9, 58.5, 43.0)),
        Setting(
            "l2", "joint score + L2", {"variant": "qfl", "cls_loss": "l2"}, _paper(20.4, 28.6, 22.1)
        ),
    ),
    note="'atss' and 'qfl' are table3's and share their runs.",
)

STUDIES: dict[str, Study] = {s.name: s for s in (_TABLE3, _BETA, _REPRESENTATION, _BINS, _L2_SCORE)}


def get_study(name: str) -> Study:
    """The named study (``KeyError`` listing the names if unknown)."""
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    return STUDIES[name]
