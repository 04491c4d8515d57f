"""Generate every results table in README.md and docs/ from the CSV files in docs/results/.

A table lives between two markers, and everything between them is generated:

    <!-- table: docs/results/parity_resnet20.csv rows=tent,eta -->
    | method | ... |
    <!-- end table -->

Each CSV starts with ``# command: ...``, the command that produced its numbers. Options after the path:

- ``rows=a,b``: only the rows whose first column's first word is one of these (e.g. one method family's rows);
- ``format=adapt method=NAME``: the CSV is a ``tta adapt`` results file; the block is what ``tta adapt`` prints for
  the rows of that method (its table and its last line), so the README shows the command's real output;
- ``format=means``: the CSV is a ``tta adapt`` results file; a table of mean accuracy per method, over all rows and
  per severity.

``python docs/gen_tables.py`` rewrites the blocks; ``python docs/gen_tables.py --check`` lists the stale ones and
exits with status 1 (tests/test_docs.py runs the check).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end table -->)", re.DOTALL)
NUMBER = re.compile(r"[+\-]?\d[\d,.]*( ?%)?( ± [\d.]+)?")


def markdown_files(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def read_csv(path: Path) -> tuple[str, list[str], list[list[str]]]:
    """The command recorded in the file's ``# command:`` line, the header and the rows."""
    lines = path.read_text(encoding="utf-8").splitlines()
    comments = [line for line in lines if line.startswith("#")]
    command = next((c.split(":", 1)[1].strip() for c in comments if c.startswith("# command:")), "")
    rows = list(csv.reader(line for line in lines if not line.startswith("#")))
    return command, rows[0], rows[1:]


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``path key=value ...`` -> (path, options)."""
    path, *items = spec.split()
    return path, dict(item.split("=", 1) for item in items)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; columns whose every non-empty cell is a number are right-aligned."""
    def numeric(j: int) -> bool:
        values = [row[j] for row in rows if row[j]]
        return bool(values) and all(NUMBER.fullmatch(v) for v in values)

    align = ["--:" if numeric(j) else "---" for j in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def _results_frame(path: Path) -> pd.DataFrame:
    """A ``tta adapt`` results CSV (pandas is imported here: only these formats need it)."""
    import pandas

    return pandas.read_csv(path, comment="#")


def render(spec: str, root: Path = ROOT) -> str:
    """The generated text of one block."""
    path, options = parse_spec(spec)
    fmt = options.get("format", "table")
    if fmt == "adapt":
        from tta.run.report import format_results

        df = _results_frame(root / path)
        df = df[df["method"] == options["method"]]
        name = f"{options['method']}_{df['model'].iloc[0]}_<UTC time>"
        return (f"```text\n{format_results(df)}\n\nmean accuracy {df['accuracy'].mean():.2f}% over {len(df)} "
                f"domains; wrote results/{name}.csv (+ {name}.yaml)\n```\n")
    if fmt == "means":
        df = _results_frame(root / path)
        severities = sorted(df["severity"].unique(), reverse=True)
        header = ["method", f"mean of {df.groupby('method').size().iloc[0]}"] + [f"sev {s}" for s in severities]
        rows = []
        for method, group in df.groupby("method", sort=False):
            by_severity = group.groupby("severity")["accuracy"].mean()
            rows.append([method, f"{group['accuracy'].mean():.2f}"] + [f"{by_severity[s]:.1f}" for s in severities])
        return markdown_table(header, rows)
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r} in table marker {spec!r}")
    _, header, rows = read_csv(root / path)
    if "rows" in options:
        keep = set(options["rows"].split(","))
        rows = [row for row in rows if row[0].split(" ")[0] in keep]
    return markdown_table(header, rows)


def regenerate(text: str, root: Path = ROOT) -> str:
    """The text with every table block regenerated."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("spec"), root) + m.group(4), text)


def stale(root: Path = ROOT) -> list[str]:
    """The markers whose block differs from what its CSV generates, as ``file: marker``."""
    found = []
    for path in markdown_files(root):
        text = path.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            if m.group("body") != render(m.group("spec"), root):
                found.append(f"{path.relative_to(root)}: {m.group('spec')}")
    return found


def main(argv: list[str] | None = None) -> int:
    """Rewrite the blocks, or with ``--check`` report the stale ones."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale tables (exit status 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        found = stale()
        for item in found:
            print(f"stale table: {item} (run `python docs/gen_tables.py`)")
        return 1 if found else 0
    for path in markdown_files():
        text = path.read_text(encoding="utf-8")
        new = regenerate(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
