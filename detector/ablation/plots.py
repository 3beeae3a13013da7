"""A study's plot as PNG: bars with the gain over the first setting (``plot='bars'``), or AP
against the swept value (``plot='curve'``), ours beside the paper's."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from .report import SettingSummary
from .studies import Study

__all__ = ["plot_study"]


def _finite(v: float) -> bool:
    return v is not None and math.isfinite(v)


def _bars(study: Study, sums: Sequence[SettingSummary], fig) -> None:
    import numpy as np

    ax1, ax2 = fig.subplots(1, 2)
    names = [s.setting.name for s in sums]
    x = np.arange(len(sums))
    ours = [s.stats["AP"].mean for s in sums]
    err = [s.stats["AP"].std if _finite(s.stats["AP"].std) else 0.0 for s in sums]
    ax1.bar(x, [v if _finite(v) else 0.0 for v in ours], yerr=err, capsize=4, color="tab:blue")
    ticks = [
        f"{s.setting.name}\n(paper {s.setting.paper['AP']:.1f})"
        if "AP" in s.setting.paper
        else s.setting.name
        for s in sums
    ]
    ax1.set_xticks(x, ticks, fontsize=8)
    ax1.set_ylabel("AP (%), ours: mean ± std over seeds")
    ax1.set_title("ours")

    base = sums[0]
    b_ours, b_paper = base.stats["AP"], base.setting.paper.get("AP")
    w = 0.38
    gains_ours, gains_err, gains_paper = [], [], []
    for s in sums:
        st = s.stats["AP"]
        gains_ours.append(st.mean - b_ours.mean if st.n and b_ours.n else 0.0)
        se = (
            math.sqrt(
                (st.std**2 / st.n if st.n > 1 else 0)
                + (b_ours.std**2 / b_ours.n if b_ours.n > 1 else 0)
            )
            if st.n
            else 0.0
        )
        gains_err.append(0.0 if s is base else se)
        p = s.setting.paper.get("AP")
        gains_paper.append(p - b_paper if p is not None and b_paper is not None else 0.0)
    ax2.bar(x - w / 2, gains_paper, w, label="paper (COCO, R-50 1x)", color="tab:gray")
    ax2.bar(
        x + w / 2, gains_ours, w, yerr=gains_err, capsize=3, label="ours (± s.e.)", color="tab:blue"
    )
    ax2.axhline(0, color="black", lw=0.8)
    ax2.set_xticks(x, names, fontsize=8)
    ax2.set_ylabel(f"AP gain over '{base.setting.name}' (points)")
    ax2.set_title("gain over the first setting")
    ax2.legend(fontsize=8)


def _curve(study: Study, sums: Sequence[SettingSummary], fig) -> None:
    ax = fig.subplots(1, 1)
    pts = [(s.setting.x, s.stats["AP"]) for s in sums if s.stats["AP"].n]
    if pts:
        xs = [p[0] for p in pts]
        m = [p[1].mean for p in pts]
        sd = [p[1].std if _finite(p[1].std) else 0.0 for p in pts]
        ax.plot(xs, m, "o-", color="tab:blue", label="ours (mean ± std)")
        ax.fill_between(
            xs,
            [a - b for a, b in zip(m, sd)],
            [a + b for a, b in zip(m, sd)],
            color="tab:blue",
            alpha=0.2,
        )
        best = max(range(len(m)), key=lambda i: m[i])
        ax.plot([xs[best]], [m[best]], "*", ms=14, color="tab:blue")
    ax.set_xlabel(study.x_label)
    ax.set_ylabel("AP (%), ours", color="tab:blue")
    paper = [(s.setting.x, s.setting.paper["AP"]) for s in sums if "AP" in s.setting.paper]
    if paper:
        ax2 = ax.twinx()
        ax2.plot(
            [p[0] for p in paper],
            [p[1] for p in paper],
            "s--",
            color="tab:gray",
            label="paper (COCO, R-50 1x)",
        )
        best = max(paper, key=lambda p: p[1])
        ax2.plot([best[0]], [best[1]], "*", ms=14, color="tab:gray")
        ax2.set_ylabel("AP (%), paper", color="tab:gray")
        # at least 2 AP points tall: a 0.1-point paper difference must not look like a cliff
        lo, hi = min(p[1] for p in paper), max(p[1] for p in paper)
        half = max(1.0, 0.6 * (hi - lo))
        ax2.set_ylim((lo + hi) / 2 - half, (lo + hi) / 2 + half)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best", framealpha=0.8)
    ax.set_xticks([s.setting.x for s in sums])


def plot_study(study: Study, sums: Sequence[SettingSummary], path: str | os.PathLike) -> None:
    """Draw ``study``'s plot from its summaries into the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10, 4.2) if study.plot == "bars" else (6.5, 4.2), dpi=110)
    try:
        (_bars if study.plot == "bars" else _curve)(study, sums, fig)
        fig.suptitle(f"{study.name}: {study.title}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
