"""The summary's plots: speed-up against problem size, one PNG per device and operator.

matplotlib is optional: without it ``plot_op`` draws nothing and the summary has only tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.result_rows import _OP_TITLES, _f, _provider_rank


def plot_op(rows: Sequence[dict[str, str]], device: str, op: str, path: Path) -> Path | None:
    """Speed-up vs eager against problem size, one panel per (mode, dtype).

    Returns None (no plot) when matplotlib is not installed; the tables do not need it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    rows = [r for r in rows if r["op"] == op]
    modes = sorted({r["mode"] for r in rows}, key=lambda m: (m != "fwd+bwd", m))
    dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: (d != "float32", d))
    if not modes or not dtypes:
        return None
    fig, axes = plt.subplots(
        len(modes),
        len(dtypes),
        squeeze=False,
        sharex=True,
        figsize=(5.2 * len(dtypes), 3.8 * len(modes)),
    )
    providers = sorted(
        {r["provider"] for r in rows if r["provider"] != "eager"}, key=_provider_rank
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, mode in enumerate(modes):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            panel = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
            for k, prov in enumerate(providers):
                pts = sorted(
                    (
                        (
                            int(r["elements"]),
                            _f(r, "speedup_vs_eager"),
                            r["size"],
                            _f(r, "speedup_vs_compile"),
                        )
                        for r in panel
                        if r["provider"] == prov
                    ),
                    key=lambda p: p[0],
                )
                pts = [p for p in pts if p[1] == p[1]]
                if not pts:
                    continue
                color = colors[k % len(colors)]
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    "o-",
                    color=color,
                    label=f"{prov} / eager",
                    ms=4,
                )
                if prov.startswith("gfl_ops"):
                    vs_c = [p for p in pts if p[3] == p[3]]
                    ax.plot(
                        [p[0] for p in vs_c],
                        [p[3] for p in vs_c],
                        "s--",
                        color=color,
                        label=f"{prov} / compile",
                        ms=3,
                        alpha=0.7,
                    )
                    for x, y, size, _ in pts:
                        ax.annotate(
                            size, (x, y), fontsize=6, xytext=(2, 3), textcoords="offset points"
                        )
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{mode}, {dtype}", fontsize=10)
            ax.grid(True, which="both", alpha=0.25)
            if i == len(modes) - 1:
                ax.set_xlabel("elements (N x C, or M x (n+1))")
            if j == 0:
                ax.set_ylabel("speed-up (higher is better)")
            ax.legend(fontsize=7)
    fig.suptitle(f"{_OP_TITLES.get(op, op)} -- speed-up vs size\n{device}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
