"""The guard's documentation tables, generated from the committed result files of its benchmarks.

Inputs (``docs/results``): ``guard_grid.csv``, ``guard_grid_learned.csv`` and ``guard_grid_small.csv``
(``benchmarks/guard_eval.py``, the second with ``--rule learned --leave-out``, the third with ``--batch-size 16``),
``guard_collapse_runs.csv`` (``benchmarks/guard_collapse.py``). Outputs: the summary tables ``guard_promise.csv``,
``guard_estimator.csv``, ``guard_learned.csv``, ``guard_promise_small.csv`` and ``guard_collapse_table.csv`` (each
with the ``# command:`` line that produced it), and every ``<!-- table: docs/results/guard_*.csv -->`` block of
``docs/guides/guards.md`` (the same block format as the rest of the documentation). ``guard_cost_ratio.csv`` is
written by ``benchmarks/guard_cost.py --out`` directly.

    python benchmarks/guard_tables.py            # rewrite the summaries and the page's blocks
    python benchmarks/guard_tables.py --check    # exit status 1 if anything is stale (tests/test_guard.py)
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "guides" / "guards.md"
COMMAND = "python benchmarks/guard_tables.py"
BLOCK = re.compile(r"(<!-- table: (?P<path>docs/results/guard_[^ >]*?\.csv) -->\n)(?P<body>.*?)(<!-- end table -->)",
                   re.DOTALL)
NUMBER = re.compile(r"[+\-]?\d[\d,.]*( ?%)?( ± [\d.]+)?")
FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}

Table = tuple[list[str], list[list[str]]]


def promise(grid: pd.DataFrame) -> Table:
    """Per model x method: mean accuracies, the domains where the guard's promise does not hold, and who answered."""
    header = ["model", "method", "domains", "source", "unguarded", "guarded", "unguarded < source - 1",
              "guarded < source - 1", "worst guarded - source", "gain kept < 90 %", "short by > 1 point",
              "batches answered by source", "batches answered by the average"]
    rows = []
    for (model, method), g in grid.groupby(["model", "method"], sort=False):
        gain = g["unguarded_acc"] - g["source_acc"]
        kept = g["guarded_acc"] - g["source_acc"]
        short = (gain > 0) & (kept < 0.9 * gain)
        rows.append([str(model), str(method), str(len(g)), f"{g['source_acc'].mean():.2f}",
                     f"{g['unguarded_acc'].mean():.2f}", f"{g['guarded_acc'].mean():.2f}",
                     str(int((gain < -1).sum())), str(int((kept < -1).sum())), f"{kept.min():+.1f}",
                     str(int(short.sum())), str(int((short & (0.9 * gain - kept > 1)).sum())),
                     str(int(g["fallbacks"].sum())), str(int(g["mixed"].sum()))])
    return header, rows


def learned(grid: pd.DataFrame, learned_grid: pd.DataFrame) -> Table:
    """Per model x method of the learned rule's grid: the promise columns of the fixed rule (``guard_grid.csv``)
    and of the learned rule (evaluated leave-corruption-out), with the estimate's mean absolute error."""
    header = ["model", "method", "rule", "guarded", "guarded < source - 1", "worst guarded - source",
              "gain kept < 90 %", "short by > 1 point", "estimate's mean abs. error", "batches answered by source",
              "batches answered by the average"]
    rows = []
    for (model, method), g in learned_grid.groupby(["model", "method"], sort=False):
        fixed = grid[(grid["model"] == model) & (grid["method"] == method)]
        for rule, part in (("fixed", fixed), ("learned", g)):
            gain = part["unguarded_acc"] - part["source_acc"]
            kept = part["guarded_acc"] - part["source_acc"]
            short = (gain > 0) & (kept < 0.9 * gain)
            error = (part["estimated_acc"] - part["guarded_acc"]).dropna().abs()
            rows.append([str(model), str(method), rule, f"{part['guarded_acc'].mean():.2f}",
                         str(int((kept < -1).sum())), f"{kept.min():+.1f}", str(int(short.sum())),
                         str(int((short & (0.9 * gain - kept > 1)).sum())), f"{error.mean():.1f}" if len(error)
                         else "", str(int(part["fallbacks"].sum())), str(int(part["mixed"].sum()))])
    return header, rows


def estimator(grid: pd.DataFrame) -> Table:
    """Per model x shift family: the estimate's error against the guarded run's real accuracy (points)."""
    header = ["model", "shifts", "domains", "estimated", "not estimated", "mean abs. error", "worst error",
              "mean error"]
    rows = []
    for model, g in grid.groupby("model", sort=False):
        for family, names in [*FAMILIES.items(), ("all", tuple(c for f in FAMILIES.values() for c in f))]:
            part = g[g["corruption"].isin(names)]
            error = (part["estimated_acc"] - part["guarded_acc"]).dropna()
            cells = [f"{error.abs().mean():.1f}", f"{error.abs().max():.1f}", f"{error.mean():+.1f}"] if len(
                error) else ["", "", ""]
            rows.append([str(model), family, str(len(part)), str(len(error)), str(len(part) - len(error)), *cells])
    return header, rows


def collapse(runs: pd.DataFrame) -> Table:
    """Accuracy per domain of the continual stream, one column per variant, then the mean and the worst domain."""
    variants = list(dict.fromkeys(runs["variant"]))
    wide = runs.pivot_table(index="corruption", columns="variant", values="accuracy", sort=False)[variants]
    header = ["domain (in stream order)", *variants]
    rows = [[str(domain), *(f"{wide.loc[domain, v]:.1f}" for v in variants)] for domain in wide.index]
    rows.append(["mean", *(f"{wide[v].mean():.2f}" for v in variants)])
    worst = wide.sub(wide["source"], axis=0)
    rows.append(["worst vs source", *(f"{worst[v].min():+.1f}" for v in variants)])
    return header, rows


def tables() -> dict[str, tuple[str, Table]]:
    """Each summary file's name, with the command line and the table it holds."""
    grid = pd.read_csv(RESULTS / "guard_grid.csv", comment="#")
    runs = pd.read_csv(RESULTS / "guard_collapse_runs.csv", comment="#")
    learned_grid = pd.read_csv(RESULTS / "guard_grid_learned.csv", comment="#")
    small = pd.read_csv(RESULTS / "guard_grid_small.csv", comment="#")
    from_grid, from_runs = f"{COMMAND} (from docs/results/guard_grid.csv)", \
        f"{COMMAND} (from docs/results/guard_collapse_runs.csv)"
    return {"guard_promise.csv": (from_grid, promise(grid)), "guard_estimator.csv": (from_grid, estimator(grid)),
            "guard_collapse_table.csv": (from_runs, collapse(runs)),
            "guard_promise_small.csv": (f"{COMMAND} (from docs/results/guard_grid_small.csv)", promise(small)),
            "guard_learned.csv": (f"{COMMAND} (from docs/results/guard_grid.csv and "
                                  "docs/results/guard_grid_learned.csv)", learned(grid, learned_grid))}


def csv_text(command: str, table: Table) -> str:
    """A summary file's text: the ``# command:`` line, the header and the rows."""
    lines = [f"# command: {command}"]
    header, rows = table
    for row in [header, *rows]:
        lines.append(",".join(f'"{c}"' if "," in c else c for c in row))
    return "\n".join(lines) + "\n"


def read_csv(path: Path) -> Table:
    """The header and rows of a summary file (comment lines skipped)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    rows = list(csv.reader(lines))
    return rows[0], rows[1:]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; columns whose every non-empty cell is a number are right-aligned."""
    def numeric(j: int) -> bool:
        values = [row[j] for row in rows if row[j]]
        return bool(values) and all(NUMBER.fullmatch(v) for v in values)

    align = ["--:" if numeric(j) else "---" for j in range(len(header))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows]) + "\n"


def page_text(text: str) -> str:
    """``text`` with every guard table block regenerated from its CSV."""
    return BLOCK.sub(lambda m: m.group(1) + markdown_table(*read_csv(ROOT / m.group("path"))) + m.group(4), text)


def stale() -> list[str]:
    """The summary files and the page blocks that differ from what the result files generate."""
    found = [name for name, (command, table) in tables().items()
             if not (RESULTS / name).is_file() or (RESULTS / name).read_text(encoding="utf-8") != csv_text(command,
                                                                                                          table)]
    text = PAGE.read_text(encoding="utf-8")
    if page_text(text) != text:
        found.append(str(PAGE.relative_to(ROOT)))
    return found


def main(argv: list[str] | None = None) -> int:
    """Rewrite the summaries and the page, or with ``--check`` report what is stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.check:
        found = stale()
        for item in found:
            print(f"stale: {item} (run `{COMMAND}`)")
        return 1 if found else 0
    for name, (command, table) in tables().items():
        (RESULTS / name).write_text(csv_text(command, table), encoding="utf-8")
    PAGE.write_text(page_text(PAGE.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
