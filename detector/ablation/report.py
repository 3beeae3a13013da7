"""A study's results as a markdown table beside the paper's figures: mean ± std over seeds per
setting, ranks, and every ordering the paper shows (who beats whom) marked reproduced or not.

AP values are shown in percent like the paper's (the CSV holds COCOeval's fractions). An
ordering "A beats B" is taken from every pair of settings whose paper figures differ (ties in
the paper are no claim); it is *reproduced* when our mean of A is above our mean of B, and
*clearly* so when the gap also exceeds twice its standard error
``sqrt(s_A^2 / n_A + s_B^2 / n_B)`` (with one seed there is no standard error: never clearly).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .studies import METRICS, Setting, Study

__all__ = [
    "Stat",
    "SettingSummary",
    "Ordering",
    "summarize",
    "orderings",
    "ranks",
    "render_markdown",
]

PERCENT = set(METRICS)  # shown x100; 'r' and seconds are not


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1; NaN for n < 2) of n finite values."""

    mean: float
    std: float
    n: int

    @staticmethod
    def of(values: Iterable[float]) -> Stat:
        v = [x for x in values if math.isfinite(x)]
        n = len(v)
        if n == 0:
            return Stat(math.nan, math.nan, 0)
        mean = sum(v) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else math.nan
        return Stat(mean, std, n)


@dataclass(frozen=True)
class SettingSummary:
    """A setting's statistics: ``stats[k]`` for the COCO metrics (percent), ``'r'`` and
    ``'train_seconds'``; ``seeds`` the number of runs."""

    setting: Setting
    seeds: int
    stats: dict[str, Stat]


@dataclass(frozen=True)
class Ordering:
    """The paper has ``better`` above ``worse`` on ``metric`` by ``paper_gap`` (> 0); ours is
    ``gap`` ± ``se`` (NaN without runs); ``reproduced`` is None when a side has no runs."""

    metric: str
    better: str
    worse: str
    paper_gap: float
    gap: float
    se: float
    reproduced: bool | None
    clearly: bool


def _value(row: dict[str, str], key: str) -> float:
    try:
        v = float(row.get(key, "nan"))
    except ValueError:
        return math.nan
    if key in PERCENT:
        return 100.0 * v if v >= 0 else math.nan  # COCOeval's -1: no ground truth in that range
    return v


def summarize(study: Study, rows: Sequence[dict[str, str]]) -> list[SettingSummary]:
    """Per setting of ``study`` (in its order), the statistics of its rows."""
    out = []
    for s in study.settings:
        mine = [r for r in rows if r.get("setting") == s.name]
        stats = {k: Stat.of(_value(r, k) for r in mine) for k in METRICS}
        stats["r"] = Stat.of(_value(r, "score_iou_r") for r in mine)
        stats["train_seconds"] = Stat.of(_value(r, "train_seconds") for r in mine)
        out.append(SettingSummary(s, len(mine), stats))
    return out


def orderings(summaries: Sequence[SettingSummary], metric: str = "AP") -> list[Ordering]:
    """Every pair of settings whose paper ``metric`` differs, with our gap (see module doc)."""
    out = []
    for i, a in enumerate(summaries):
        for b in summaries[i + 1 :]:
            pa, pb = a.setting.paper.get(metric), b.setting.paper.get(metric)
            if pa is None or pb is None or abs(pa - pb) < 1e-9:
                continue
            hi, lo = (a, b) if pa > pb else (b, a)
            sh, sl = hi.stats[metric], lo.stats[metric]
            gap = sh.mean - sl.mean
            se = math.sqrt(sh.std**2 / sh.n + sl.std**2 / sl.n) if sh.n and sl.n else math.nan
            reproduced = None if not (sh.n and sl.n) else bool(gap > 0)
            out.append(
                Ordering(
                    metric,
                    hi.setting.name,
                    lo.setting.name,
                    abs(pa - pb),
                    gap,
                    se,
                    reproduced,
                    bool(reproduced and math.isfinite(se) and gap > 2 * se),
                )
            )
    return out


def ranks(values: dict[str, float]) -> dict[str, int]:
    """Competition ranks, 1 = highest (equal values share a rank: 1, 1, 3); settings without
    a finite value get none."""
    finite = [v for v in values.values() if math.isfinite(v)]
    return {k: 1 + sum(w > v for w in finite) for k, v in values.items() if math.isfinite(v)}


def _fmt(stat: Stat, digits: int = 1) -> str:
    if stat.n == 0:
        return "—"
    if stat.n == 1 or not math.isfinite(stat.std):
        return f"{stat.mean:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"


def _paper(s: Setting, key: str, digits: int = 1) -> str:
    v = s.paper.get(key)
    return "—" if v is None else f"{v:.{digits}f}"


def _verdict(o: Ordering) -> str:
    if o.reproduced is None:
        return "no runs yet"
    if not o.reproduced:
        return "**no**"
    if o.clearly:
        return "yes, clearly"
    return "yes (within noise)" if math.isfinite(o.se) else "yes (one seed: no error estimate)"


def _label(study: Study, name: str) -> str:
    return study.setting(name).label


def _ordering_lines(
    study: Study, ords: Sequence[Ordering], what: str, unit: str, digits: int
) -> list[str]:
    if not ords:
        return []
    known = [o for o in ords if o.reproduced is not None]
    yes = sum(bool(o.reproduced) for o in known)
    clear = sum(o.clearly for o in known)
    lines = [
        f"{what} orderings reproduced: **{yes} of {len(known)}** "
        f"({clear} clearly, i.e. by more than twice the gap's standard error)"
        + (f"; {len(ords) - len(known)} without runs yet" if len(known) < len(ords) else "")
        + ".",
        "",
        f"| paper: better | than | paper gap{unit} | our gap{unit} (± s.e.) | reproduced |",
        "|---|---|---:|---:|---|",
    ]
    for o in ords:
        ours = (
            "—"
            if o.reproduced is None
            else (f"{o.gap:+.{digits}f}" + (f" ± {o.se:.{digits}f}" if math.isfinite(o.se) else ""))
        )
        lines.append(
            f"| {_label(study, o.better)} | {_label(study, o.worse)} | "
            f"+{o.paper_gap:.{digits}f} | {ours} | {_verdict(o)} |"
        )
    return lines + [""]


def _conditions(rows: Sequence[dict[str, str]]) -> list[str]:
    def values(k: str) -> str:
        return ", ".join(sorted({r.get(k, "") for r in rows if r.get(k)})) or "—"

    return [
        f"- dataset: `{values('dataset')}`; budget: {values('budget')} "
        f"(`{values('budget_id')}`): {values('epochs')} epochs, {values('iterations')} "
        f"iterations, images ≤ {values('img_size')} px",
        f"- commit {values('commit')}; torch {values('torch')}; device {values('device')}",
    ]


def _command(study: str, rows: Sequence[dict[str, str]], seeds: int) -> str:
    """The command that re-makes (or resumes) this study's runs, from what the rows record."""
    budgets = sorted({r.get("budget", "").split(" ")[0] for r in rows if r.get("budget")})
    datasets = sorted({r.get("dataset", "") for r in rows if r.get("dataset")})
    cmd = f"python -m detector.ablation {study}"
    if len(budgets) == 1 and budgets[0] != "default":
        cmd += f" --budget {budgets[0]}"
    if len(datasets) == 1 and not datasets[0].startswith("embedded"):
        cmd += f" --data {datasets[0]}"
    if seeds and seeds != 3:
        cmd += f" --seeds {seeds}"
    return cmd


def render_markdown(
    study: Study,
    rows: Sequence[dict[str, str]],
    plot_file: str | None = None,
    csv_file: str | None = None,
    ignored: int = 0,
) -> str:
    """The study's markdown page from its CSV rows (those of one budget)."""
    sums = summarize(study, rows)
    ap_rank_paper = ranks({s.setting.name: s.setting.paper.get("AP", math.nan) for s in sums})
    ap_rank_ours = ranks({s.setting.name: s.stats["AP"].mean for s in sums})
    seeds = sorted({int(r["seed"]) for r in rows if r.get("seed", "").isdigit()})
    lines = [
        f"# Ablation `{study.name}`: {study.title}",
        "",
        f"Paper: {study.source} (COCO minival, ResNet-50, 1x; AP in %). "
        f"Ours: COCO AP in % on the validation split, mean ± std over "
        f"{len(seeds)} seed(s) {seeds}; r is the Pearson correlation between detection "
        "score and IoU.",
        "",
    ]
    lines += _conditions(rows) + [f"- made with: `{_command(study.name, rows, len(seeds))}`", ""]
    head = [
        "setting",
        "AP paper",
        "AP ours",
        "AP50 paper",
        "AP50 ours",
        "AP75 paper",
        "AP75 ours",
        "APs / APm / APl ours",
        "r paper",
        "r ours",
        "AP rank paper / ours",
        "runs",
        "train s / run",
    ]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in sums:
        st, name = s.stats, s.setting.name
        sml = " / ".join(_fmt(st[k]) for k in ("APs", "APm", "APl"))
        rank = f"{ap_rank_paper.get(name, '—')} / {ap_rank_ours.get(name, '—')}"
        lines.append(
            f"| {s.setting.label} | {_paper(s.setting, 'AP')} | {_fmt(st['AP'])} | "
            f"{_paper(s.setting, 'AP50')} | {_fmt(st['AP50'])} | {_paper(s.setting, 'AP75')} | "
            f"{_fmt(st['AP75'])} | {sml} | {_paper(s.setting, 'r', 2)} | {_fmt(st['r'], 3)} | "
            f"{rank} | {s.seeds} | {_fmt(st['train_seconds'], 0)} |"
        )
    lines.append("")
    lines += _ordering_lines(study, orderings(sums, "AP"), "AP", " (AP)", 1)
    lines += _ordering_lines(study, orderings(sums, "r"), "score–IoU r", " (r)", 3)
    if plot_file:
        lines += [f"![{study.name}]({plot_file})", ""]
    if study.note:
        lines += [f"Note: {study.note}", ""]
    if ignored:
        lines += [f"({ignored} row(s) of other budgets in the CSV are not shown.)", ""]
    if csv_file:
        lines += [f"One row per run: [{csv_file}]({csv_file}).", ""]
    return "\n".join(lines)
