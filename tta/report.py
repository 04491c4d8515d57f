"""Results: an append-as-you-go CSV (one row per method x model x corruption x severity) and a terminal table."""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tta.engine import COLUMNS


def default_output(method: str, model: str, results_dir: str | Path = "results") -> Path:
    """``results/<method>_<model>_<UTC timestamp>.csv``."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{method}_{model}")
    return Path(results_dir) / f"{safe}_{stamp}.csv"


class CsvWriter:
    """Appends rows to a CSV as they arrive and flushes each one, so an interrupted run loses no finished row.

    The header is ``COLUMNS``; other keys of a row are not written. Appending to an existing file requires the same
    header, so runs can share a results file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.columns = list(COLUMNS)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as f:
                header = next(csv.reader(f), [])
            if header != self.columns:
                from tta.errors import ConfigError

                raise ConfigError(f"{self.path} already holds results with other columns; choose another --out")
        else:
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)

    def __call__(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)


def write_config(path: str | Path, resolved: Mapping[str, Any]) -> Path:
    """Write the resolved run configuration as YAML next to the CSV (``<stem>.yaml``); returns its path."""
    out = Path(path).with_suffix(".yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(dict(resolved), sort_keys=False))
    return out


def accuracy_table(df: pd.DataFrame, value: str = "accuracy") -> pd.DataFrame:
    """Corruptions as rows (in run order), severities as columns (descending), with row and column means."""
    table = df.pivot_table(index="corruption", columns="severity", values=value, aggfunc="mean", sort=False)
    table = table[sorted(table.columns, reverse=True)]
    table.columns = [f"sev {s}" for s in table.columns]
    table["mean"] = table.mean(axis=1)
    table.loc["mean"] = table.mean(axis=0)
    table.index.name = None
    return table


def format_results(df: pd.DataFrame, value: str = "accuracy") -> str:
    """One compact table per method and model, e.g. for the terminal (values in percent)."""
    parts = []
    for (method, model), group in df.groupby(["method", "model"], sort=False):
        table = accuracy_table(group, value)
        parts.append(f"{method} on {model}: {value} (%)\n{table.to_string(float_format=lambda v: f'{v:.1f}')}")
    return "\n\n".join(parts)
