"""PNG plots of results (matplotlib, Agg backend, so they render without a display).

Each function takes rows labelled by ``tta.run.report.label_runs`` (columns ``label`` and ``replicate``), writes one
PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")  # type: ignore[attr-defined]
    _pyplot().close(fig)
    return path


def title(rows: pd.DataFrame, what: str, severities: list[int] | None = None) -> str:
    """A plot's title: the model and setting of ``rows`` (every value present), what is plotted, and the severities
    (those of ``rows`` unless given), e.g. ``resnet20, mixed: error per corruption, severity 5``."""
    parts = [", ".join(map(str, rows[c].dropna().unique())) for c in ("model", "setting") if c in rows]
    levels = sorted({int(s) for s in (rows["severity"].dropna() if severities is None else severities)
                     if s is not None})
    if not levels:  # domains without severities (your own data)
        return f"{', '.join(p for p in parts if p)}: {what}"
    severity = f"severity {levels[0]}" if len(levels) == 1 else f"severities {', '.join(map(str, levels))}"
    return f"{', '.join(p for p in parts if p)}: {what}, {severity}"


def error_vs_severity(rows: pd.DataFrame, path: str | Path) -> Path:
    """Mean error over corruptions per severity, one line per label, error bars = std over replicates."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    per = rows.groupby(["label", "severity", "replicate"], sort=False)["error"].mean().reset_index()
    for label in rows["label"].unique():
        stats = per[per["label"] == label].groupby("severity")["error"].agg(["mean", "std"]).sort_index()
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=label)
    ax.set_title(title(rows, "mean error over corruptions"), fontsize=10)
    ax.set_xlabel("severity")
    ax.set_ylabel("error (%)")
    ax.set_xticks(sorted(rows["severity"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def heatmap(table: pd.DataFrame, rows: pd.DataFrame, severity: int | None, path: str | Path) -> Path:
    """Domains (rows) x labels (columns): mean error over replicates at ``severity`` (None: domains without
    severities, every row), annotated."""
    plt = _pyplot()
    at = rows[rows["severity"] == severity] if severity is not None else rows
    grid = at.groupby(["corruption", "label"], sort=False)["error"].mean().unstack("label")
    grid = grid.loc[[c for c in table.columns if c in grid.index], list(table.index)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * grid.shape[1], 1.0 + 0.45 * grid.shape[0]))
    image = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=45, ha="right")
    ax.set_yticks(range(grid.shape[0]), grid.index)
    values = grid.to_numpy(dtype=float)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            colour = "w" if v > np.nanmean(values) else "k"
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, label=f"error (%) at severity {severity}" if severity is not None else "error (%)")
    ax.set_title(title(rows, "error per corruption" if severity is not None else "error per domain", [severity]),
                 fontsize=10)
    return _save(fig, Path(path))


def stream_accuracy(batches: pd.DataFrame, path: str | Path, points: int = 60) -> Path:
    """Accuracy along the stream (x: images seen), one line per label, averaged over replicates and smoothed over
    windows of about ``len / points`` batches; dotted lines end the stream's segments, named on top."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    first = None
    for label in batches["label"].unique():
        runs = [g.sort_values("batch") for _, g in batches[batches["label"] == label].groupby("config_hash")]
        length = min(len(r) for r in runs)
        acc = np.mean([r["accuracy"].to_numpy()[:length] for r in runs], axis=0)
        seen = np.cumsum(runs[0]["n"].to_numpy()[:length])
        window = max(1, length // points)
        smooth = pd.Series(acc).rolling(window, min_periods=1).mean()
        ax.plot(seen, smooth, label=label)
        first = first if first is not None else runs[0].iloc[:length]
    if first is not None:
        ends = np.cumsum(first["n"].to_numpy())
        for _, part in first.assign(end=ends).groupby("segment", sort=False):
            ax.axvline(part["end"].iloc[-1], color="grey", linestyle=":", linewidth=0.8)
            corruptions, severities = part["corruption"].unique(), part["severity"].dropna().unique()
            name = f"sev {int(severities[0])}" if len(severities) == 1 else str(corruptions[0])
            middle = (part["end"].iloc[0] - part["n"].iloc[0] + part["end"].iloc[-1]) / 2
            ax.annotate(name, (middle, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                        fontsize=8, color="grey")
    ax.set_title(title(batches, "accuracy along the stream"), fontsize=10, pad=16)
    ax.set_xlabel("images seen")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def accuracy_over_time(rows: pd.DataFrame, path: str | Path, xlabel: str = "images seen") -> Path:
    """A long stream's accuracy over time (x: images seen; one point per row: a window of a CCC-style stream, a
    domain and visit of a recurring one), one line per label, the source model's accuracy on the same images as a
    black line, and the rows where a method stays more than 1 point below the source marked with a red cross.
    The x axis counts the rows' ``n`` (images); ``xlabel`` names it (rows of ``n=1``: one step per row)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    source = None
    for label in rows["label"].unique():
        run = rows[rows["label"] == label]
        run = run[run["config_hash"] == run["config_hash"].iloc[0]]  # one replicate
        seen = np.cumsum(run["n"].to_numpy())
        ax.plot(seen, run["accuracy"].to_numpy(), label=label, linewidth=1)
        collapse = run["collapse"].astype(str).str.lower().eq("true").to_numpy()
        if collapse.any():
            ax.plot(seen[collapse], run["accuracy"].to_numpy()[collapse], "x", color="red", markersize=4)
        if source is None and run["source_accuracy"].notna().any():
            source = (seen, run["source_accuracy"].to_numpy())
    if source is not None:
        ax.plot(*source, color="black", linewidth=1.5, label="source (same images)")
    ax.plot([], [], "x", color="red", label="collapse: > 1 point below source")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, Path(path))
