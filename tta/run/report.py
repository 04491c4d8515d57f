"""Results: an append-as-you-go CSV (one row per method x model x corruption x severity), a terminal table, and
reports over many runs (markdown tables aggregated over seeds, PNG plots from ``tta.run.plots``)."""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tta.errors import ConfigError
from tta.io import write_text
from tta.run.resultfile import check_target, claim, complete, locked, read_rows
from tta.run.schema import BATCH_COLUMNS, COLUMNS, REQUIRED_COLUMNS, domain_keys

log = logging.getLogger(__name__)


def default_output(method: str, model: str, results_dir: str | Path = "results") -> Path:
    """``results/<method>_<model>_<UTC timestamp>.csv``."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{method}_{model}")
    return Path(results_dir) / f"{safe}_{stamp}.csv"


def check_output(out: str | Path) -> Path:
    """``out`` as a results path that can be written, checked before any work (``ConfigError`` otherwise).

    The run's configuration goes beside it (``<stem>.yaml``), so a ``.yaml`` results path is refused: the config
    would overwrite the results.
    """
    out = Path(out)
    if out.suffix.lower() in (".yaml", ".yml"):
        raise ConfigError(f"--out {out} would share its path with the run's YAML config; name the results file "
                          f"{out.with_suffix('.csv')} instead")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; pass the path of a CSV file to write")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    writable = parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    if not writable or (out.exists() and not os.access(out, os.W_OK)):
        raise ConfigError(f"cannot write {out} (no write permission in {parent}); choose another --out")
    check_target(out)  # an existing file that is not a results file is refused, untouched
    return out


class CsvWriter:
    """Appends rows to a CSV as they arrive and flushes each one, so an interrupted run loses no finished row.

    The header is ``columns`` (``COLUMNS``, or ``BATCH_COLUMNS`` for a per-batch file); other keys of a row are not
    written. Appending to an existing file requires the same header, so runs can share a results file. A last line
    cut short by a killed process is dropped on opening; ``replace_hash`` drops the earlier rows of that config hash
    (a run started again), rewriting the file atomically. Every read-check-append and rewrite holds the file's lock
    (``tta.run.resultfile.locked``), so concurrent writers neither interleave nor lose rows.
    """

    def __init__(self, path: str | Path, columns: Sequence[str] = COLUMNS, replace_hash: str | None = None) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self.claim: Any = None  # the run's claim on the file (``tta.run.resultfile.claim``), released with the writer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked(self.path):
            self._open(replace_hash)

    def _open(self, replace_hash: str | None) -> None:
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as f:
                header = next(csv.reader(f), [])
            if header != self.columns:
                raise ConfigError(f"{self.path} already holds results with other columns; choose another --out")
            _drop_partial_line(self.path)
            if replace_hash is not None:
                df = pd.read_csv(self.path, dtype={"config_hash": str})
                if (df.config_hash == replace_hash).any():
                    write_text(self.path, df[df.config_hash != replace_hash].to_csv(index=False))
        else:
            write_text(self.path, ",".join(self.columns) + "\n")

    def __call__(self, row: Mapping[str, Any]) -> None:
        self.write_rows([row])

    def write_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append ``rows`` in one write."""
        with locked(self.path), self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerows(rows)


def _drop_partial_line(path: Path) -> None:
    """Cut a last line without its newline (a row whose writing was killed); complete rows are kept."""
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1))
        if size == 0 or f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


def config_path(path: str | Path, config_hash: str) -> Path:
    """Where a run's configuration goes: ``<stem>.yaml``, or ``<stem>.<hash>.yaml`` when ``<stem>.yaml`` already
    describes another run writing to the same results file (so no run's configuration is ever overwritten)."""
    first = Path(path).with_suffix(".yaml")
    if first.is_file():
        try:
            other = (yaml.safe_load(first.read_text()) or {}).get("config_hash")
        except (yaml.YAMLError, AttributeError):
            other = None
        if other != config_hash:
            return first.with_suffix(f".{config_hash}.yaml")
    return first


def write_config(path: str | Path, resolved: Mapping[str, Any]) -> Path:
    """Write the resolved run configuration as YAML next to the CSV (see ``config_path``); returns its path."""
    out = config_path(path, str(resolved.get("config_hash")))
    write_text(out, yaml.safe_dump(dict(resolved), sort_keys=False))
    return out


def batches_path(path: str | Path) -> Path:
    """The per-batch accuracy file beside a results CSV: ``<stem>.batches.csv``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.batches.csv")


def open_results(out: Path, config_hash: str, n_domains: int, *, resume: bool,
                 batches: bool) -> tuple[pd.DataFrame | None, CsvWriter | None, CsvWriter | None]:
    """Writers for one run into ``out`` (and its per-batch file when ``batches``), never duplicating its rows.

    Returns ``(rows, None, None)`` when ``resume`` and ``out`` already holds all ``n_domains`` of them (nothing left
    to do), else ``(None, writer, batch_writer)``. Otherwise ``resume`` drops the rows of an unfinished earlier
    attempt; without ``resume``, rows of this very run in ``out`` are a ``ConfigError`` (a rerun would duplicate
    them). A second process running the same configuration into ``out`` at the same time is a ``ConfigError``.
    """
    check_target(out)
    running = claim(out, config_hash)  # held by the writer until the run ends
    try:
        done, writer, batch_writer = _open_results(out, config_hash, n_domains, resume=resume, batches=batches)
    except BaseException:
        running.close()
        raise
    if writer is None:
        running.close()
    else:
        writer.claim = running
    return done, writer, batch_writer


def _open_results(out: Path, config_hash: str, n_domains: int, *, resume: bool,
                  batches: bool) -> tuple[pd.DataFrame | None, CsvWriter | None, CsvWriter | None]:
    done = None
    with locked(out):
        if out.is_file() and out.stat().st_size > 0:
            _drop_partial_line(out)
            try:
                done = pd.read_csv(out, dtype={"config_hash": str})
            except (pd.errors.ParserError, UnicodeDecodeError):
                raise ConfigError(f"{out} is not a results CSV; choose another --out") from None
            done = done[done.config_hash == config_hash] if "config_hash" in done else done.iloc[:0]
    if done is not None and len(done):
        if not resume:
            raise ConfigError(f"{out} already holds rows of this very run (config hash {config_hash}); pass --resume "
                              f"to finish it, or choose another --out")
        if complete(done.drop_duplicates(domain_keys(done), keep="last"), n_domains):
            return done.reset_index(drop=True), None, None
    replace = config_hash if resume else None
    writer = CsvWriter(out, replace_hash=replace)
    batch_writer = CsvWriter(batches_path(out), BATCH_COLUMNS, replace_hash=config_hash) if batches else None
    return None, writer, batch_writer


def accuracy_table(df: pd.DataFrame, value: str = "accuracy") -> pd.DataFrame:
    """Domains as rows (in run order), severities as columns (descending), with row and column means; one column
    for domains without severities."""
    if df["severity"].isna().all():  # domains without severities (your own data): one column
        table = df.groupby("corruption", sort=False)[[value]].mean()
        table.loc["mean"] = table.mean(axis=0)
        table.index.name = None
        return table
    table = df.pivot_table(index="corruption", columns="severity", values=value, aggfunc="mean", sort=False)
    table = table[sorted(table.columns, reverse=True)]
    table.columns = [f"sev {s:g}" for s in table.columns]
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


# --- reports over many runs: tables aggregated over seeds, and plots --------------------------------------------

STREAM_SETTINGS: tuple[str, ...] = ("continual", "mixed", "gradual")


def load_results(inputs: Sequence[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows (``COLUMNS``) and per-batch rows (``BATCH_COLUMNS``, maybe empty) of sweep directories (their
    ``results.csv``) and ``tta adapt`` CSVs; a row present in several inputs is kept once."""
    results, batches = [], []
    for item in map(Path, inputs):
        path = item / "results.csv" if item.is_dir() else item
        if not path.is_file():
            raise ConfigError(f"{item} holds no results.csv; pass a tta sweep directory or a results CSV")
        df, incomplete = read_rows(path, REQUIRED_COLUMNS)  # files written before the evaluation columns too
        if incomplete:
            log.warning("left out %d incomplete row(s) of %s (cut short by an interrupted writer)", incomplete, path)
        results.append(df.reindex(columns=COLUMNS))
        extra = item / "batches.csv" if item.is_dir() else batches_path(item)
        if extra.is_file():
            batches.append(pd.read_csv(extra, dtype={"config_hash": str})[BATCH_COLUMNS])
    rows = pd.concat(results, ignore_index=True)
    rows = rows.drop_duplicates(["config_hash", *domain_keys(rows)], keep="last")
    if rows.empty:
        raise ConfigError(f"no result rows in {', '.join(map(str, inputs))}; run tta adapt or tta sweep first")
    stream = (pd.concat(batches, ignore_index=True).drop_duplicates(["config_hash", "batch"], keep="last")
              if batches else pd.DataFrame(columns=BATCH_COLUMNS))
    return rows.reset_index(drop=True), stream.reset_index(drop=True)


def label_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``label`` (the method, plus what else tells runs of one model and setting apart) and ``replicate``.

    Runs that differ only in ``seed`` and ``data`` (the generation seed) are replicates, aggregated as mean and
    standard deviation; ``reset`` and ``batch_size`` join the label where they vary, and runs still left with the
    same label and replicate (other method settings differ) get their config hash in the label, so different
    configurations are never averaged together.
    """
    df = df.copy()
    df["label"] = df["method"].astype(str)
    for col in ("reset", "batch_size", "protocol"):
        if col in df and df.groupby(["model", "setting", "method"])[col].nunique(dropna=False).max() > 1:
            df["label"] += f" {col}=" + df[col].astype(str)
    df["replicate"] = df["seed"].astype(str) + "/" + df["data"].astype(str)
    clash = df.groupby(["model", "setting", "label", "replicate"])["config_hash"].transform("nunique") > 1
    df.loc[clash, "label"] += " [" + df.loc[clash, "config_hash"] + "]"
    return df


def _spread(values: pd.Series) -> str:
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def _by_replicate(df: pd.DataFrame, column: str, value: str) -> pd.DataFrame:
    """Per label: mean of ``value`` for each ``column`` entry and replicate (then spread over replicates)."""
    per = df.groupby(["label", column, "replicate"], sort=False)[value].mean().reset_index()
    table = per.groupby(["label", column], sort=False)[value].agg(_spread).unstack(column)
    means = df.groupby(["label", "replicate"], sort=False)[value].mean().groupby("label", sort=False).agg(_spread)
    table["mean"] = means
    return table.loc[df["label"].unique()]


def severity_table(df: pd.DataFrame, value: str = "error") -> pd.DataFrame:
    """Labels x severities (descending) and their mean, as ``mean ± std`` over replicates (``label_runs`` rows)."""
    table = _by_replicate(df, "severity", value)
    cols = sorted((c for c in table.columns if c != "mean"), reverse=True)
    table = table[[*cols, "mean"]]
    table.columns = [*(f"sev {c}" for c in cols), "mean"]
    return table


def corruption_table(df: pd.DataFrame, value: str = "error", severity: int | None = None) -> pd.DataFrame:
    """Labels x domains (in run order) at ``severity`` (default: 5, or the highest present; every row for domains
    without severities), with the mean."""
    if df["severity"].isna().all():
        return _by_replicate(df, "corruption", value)
    severity = severity if severity is not None else int(df["severity"].max())
    return _by_replicate(df[df["severity"] == severity], "corruption", value)


def seed_table(df: pd.DataFrame, value: str = "error") -> pd.DataFrame:
    """Per label: number of replicates and the mean, std, min and max over them of the mean ``value``."""
    per = df.groupby(["label", "replicate"], sort=False)[value].mean()
    table = per.groupby("label", sort=False).agg(["count", "mean", "std", "min", "max"])
    table.columns = ["seeds", f"mean {value}", "std", "min", "max"]
    return table


def markdown_table(table: pd.DataFrame, index: str = "method") -> str:
    """A DataFrame as a GitHub markdown table (floats with one decimal)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:.1f}"
        return str(v)

    head = [index, *map(str, table.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join([str(i), *map(cell, row)]) + " |"
              for i, row in zip(table.index, table.astype(object).to_numpy(), strict=True)]
    return "\n".join(lines)


COST_TABLE: dict[str, str] = {
    "forward_passes": "forward / image", "backward_passes": "backward / image", "relative_cost": "counted cost",
    "time_relative_cost": "timed cost", "images_per_second": "images / s", "peak_memory_mb": "peak memory (MiB)",
}


def cost_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per label: counted passes per image, counted and timed cost relative to plain inference, throughput and
    peak memory, averaged over the label's rows (weighted by their images)."""
    have = [c for c in COST_TABLE if c in df and df[c].notna().any()]
    weights = df["n"].astype(float)
    table = df.assign(**{c: df[c].astype(float) * weights for c in have}).groupby("label", sort=False)[have].sum()
    table = table.div(df.groupby("label", sort=False)["n"].sum(), axis=0)
    return table.rename(columns=COST_TABLE)


def online_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """Per method: error offline and online side by side, with the share of batches adapted online (None when the
    rows hold no method run under both protocols)."""
    if "protocol" not in df or df["protocol"].nunique() < 2:
        return None
    both = df.groupby("method")["protocol"].nunique()
    df = df[df["method"].isin(both[both > 1].index)]
    if df.empty:
        return None
    error = df.groupby(["method", "protocol"], sort=False)["error"].mean().unstack("protocol")
    online = df[df["protocol"] == "online"].groupby("method", sort=False)[["adapted_batches", "batches"]].sum()
    table = pd.DataFrame({"offline error": error.get("offline"), "online error": error.get("online")})
    table["online - offline"] = table["online error"] - table["offline error"]
    table["adapted batches (%)"] = 100.0 * online["adapted_batches"] / online["batches"]
    return table.loc[[m for m in df["method"].unique() if m in table.index]]


LONG_SETTINGS: tuple[str, ...] = ("recurring", "ccc")


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(map(str, parts)))


def format_summary(df: pd.DataFrame) -> str:
    """Mean error per method over everything it ran, per model and setting, with the spread over seeds."""
    df = label_runs(df)
    parts = []
    for (model, setting), group in df.groupby(["model", "setting"], sort=False):
        table = seed_table(group)
        parts.append(f"{model}, {setting}: error (%) averaged over corruptions and severities\n"
                     f"{table.to_string(float_format=lambda v: f'{v:.1f}')}")
    return "\n\n".join(parts)


def write_report(inputs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots from sweep directories or results CSVs; returns the report path.

    Per model and setting: error and accuracy per method x severity and per corruption at severity 5 (the highest
    present), with the means and the spread over seeds; plots of error vs severity, a corruption x method heatmap
    and, for the continual, mixed and gradual settings, accuracy along the stream (from the per-batch rows).
    """
    from tta.run import plots

    rows, stream = load_results(inputs)
    rows = label_runs(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = rows.drop_duplicates("config_hash").set_index("config_hash")["label"]
    lines = ["# Results", "", f"{rows['config_hash'].nunique()} runs, {len(rows)} rows, from "
             f"{', '.join(map(str, inputs))}. Values in percent; `a ± b` is the mean and standard deviation over "
             f"seeds (replicates differing only in `seed` and `data`).", ""]
    graded = rows["severity"].notna()  # domains with severities (a benchmark's), or named ones (your own data)
    for (model, setting, has_severity), group in rows.groupby(["model", "setting", graded], sort=False):
        top = int(group["severity"].max()) if has_severity else None
        where = f"corruption at severity {top}" if has_severity else "domain"
        lines += [f"## {model}, {setting}{'' if has_severity else ', named domains'}", ""]
        for value in ("error", "accuracy"):
            title = value.capitalize()
            if has_severity:
                lines += [f"### {title} per method x severity", "", markdown_table(severity_table(group, value)), ""]
            lines += [f"### {title} per {where}", "", markdown_table(corruption_table(group, value, top)), ""]
        over = "corruptions and severities" if has_severity else "domains"
        lines += [f"### Spread over seeds (error averaged over {over})", "", markdown_table(seed_table(group)), ""]
        if group["visit"].notna().any():  # recurring streams: the error of every visit
            visits = group[group["visit"].notna()].assign(visit=lambda g: g["visit"].astype(int))
            lines += ["### Error per visit", "", markdown_table(_by_replicate(visits, "visit", "error")), ""]
        lines += ["### Cost (counted passes and cost relative to plain inference; timed columns from this machine)",
                  "", markdown_table(cost_table(group), index="run"), ""]
        online = online_table(group)
        if online is not None:
            lines += ["### Offline and online (error, %)", "", markdown_table(online), ""]
        name = _slug(model, setting) if has_severity else _slug(model, setting, "named")
        figures = [(f"error_vs_severity_{name}.png", "Error vs severity",
                    plots.error_vs_severity(group, out_dir / f"error_vs_severity_{name}.png"))] if has_severity else []
        figures.append((f"heatmap_{name}.png", f"Error per {where.replace('corruption', 'corruption x method')}",
                        plots.heatmap(corruption_table(group, "error", top), group, top,
                                      out_dir / f"heatmap_{name}.png")))
        batches = stream[stream["config_hash"].isin(group["config_hash"].unique())]
        if setting in STREAM_SETTINGS and len(batches):
            batches = batches.assign(label=batches["config_hash"].map(labels))
            figures.append((f"stream_{name}.png", "Accuracy along the stream",
                            plots.stream_accuracy(batches, out_dir / f"stream_{name}.png")))
        if setting in LONG_SETTINGS:
            figures.append((f"over_time_{name}.png", "Accuracy over time, the source model on the same images and "
                            "collapse marks", plots.accuracy_over_time(group, out_dir / f"over_time_{name}.png")))
        for file, title, _ in figures:
            lines += [f"![{title}]({file})", ""]
    report = out_dir / "report.md"
    write_text(report, "\n".join(lines))
    return report
