"""Turn the runs of benchmarks/long_streams.py into the CSVs of docs/results that docs/guides/long-streams.md shows
(``python docs/gen_tables.py`` renders its tables from them) and its two figures.

    python benchmarks/long_streams_tables.py --runs runs/long    # the CSVs and figures
    python docs/gen_tables.py                                    # the page's tables

Each CSV starts with the ``# command:`` that produced it; the figures are drawn from the CSVs alone, so
``python benchmarks/long_streams_tables.py`` without ``--runs`` redraws them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from long_streams import CCC, ONLINE, RECURRING

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
COMMAND = "OMP_NUM_THREADS=1 python benchmarks/long_streams.py --part {part} --out runs/long"
LARGER = "192 / corruption"  # the recurring-192 part's runs


def _label(df: pd.DataFrame) -> pd.Series:
    """The run's method, with ``+guard`` for a guarded run (named so by ``long_streams.py``); not read from the rows'
    estimates, which a guarded run leaves empty where it does not estimate."""
    return df["method"] + df["guarded"].map({True: "+guard", False: ""})


def _read(folder: Path) -> pd.DataFrame:
    frames = [pd.read_csv(p).assign(guarded="+guard" in p.stem) for p in sorted(folder.glob("*.csv"))
              if not p.name.endswith(".batches.csv")]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _write(table: pd.DataFrame, name: str, part: str) -> None:
    path = RESULTS / name
    text = table.to_csv(index=False, float_format="%.1f")
    path.write_text(f"# command: {COMMAND.format(part=part)}; python benchmarks/long_streams_tables.py "
                    f"--runs runs/long\n{text}")


def _order(index: pd.Index, order: list[str]) -> list[str]:
    return [r for r in order if r in index]


def collect(runs: Path) -> None:
    """Write the long_*.csv and online_cifar10.csv tables of docs/results from the runs' rows."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    rec = _read(runs / "recurring")
    more = _read(runs / "recurring-192")
    if len(rec) and len(more):  # Tent with 192 images per corruption, and the source model on the same images
        source = more.assign(error=100 - more["source_accuracy"], run=f"source ({LARGER})")
        rec = pd.concat([rec.assign(run=_label(rec)), more.assign(run=f"tent ({LARGER})"), source])
    elif len(rec):
        rec = rec.assign(run=_label(rec))
    if len(rec):
        wide = rec.pivot_table(index="run", columns="visit", values="error", aggfunc="mean")
        wide = wide.loc[_order(wide.index, [*RECURRING, f"tent ({LARGER})", f"source ({LARGER})"])]
        table = wide.rename(columns=lambda v: f"visit {int(v)}")
        table["mean"] = wide.mean(axis=1)
        table["visits run"] = wide.notna().sum(axis=1)
        table["images / visit"] = rec.groupby(["run", "visit"])["n"].sum().groupby("run").first()
        _write(table.reset_index(), "long_recurring.csv", "recurring and --part recurring-192")
    online = _read(runs / "online")
    if len(online):
        online = online.assign(run=_label(online))
        parts = []
        for setting, group in online.groupby("setting", sort=False):
            error = group.pivot_table(index="run", columns="protocol", values="error", aggfunc="mean")
            offline = group[group["protocol"] == "offline"].groupby("run")[["relative_cost", "time_relative_cost"]]
            on = group[group["protocol"] == "online"].groupby("run")[["adapted_batches", "batches"]].sum()
            table = pd.DataFrame({"setting": setting, "offline error": error.get("offline"),
                                  "online error": error.get("online"),
                                  "adapted online (%)": 100 * on["adapted_batches"] / on["batches"],
                                  "counted cost": offline.mean()["relative_cost"],
                                  "timed cost": offline.mean()["time_relative_cost"]})
            parts.append(table.loc[_order(table.index, ONLINE)].rename_axis("run").reset_index())
        _write(pd.concat(parts, ignore_index=True), "online_cifar10.csv", "online")
    ccc = _read(runs / "ccc")
    if len(ccc):
        _ccc_tables(ccc, "ccc", "long_ccc", block=1)
    baselines = _read(runs / "ccc-baselines")
    if len(baselines):
        per = baselines.groupby("corruption", sort=False)  # the domains are named ccc-easy, ccc-medium, ccc-hard
        table = pd.DataFrame({"images": per["n"].sum(), "source accuracy (%)": per["accuracy"].mean(),
                              "lowest window": per["accuracy"].min(), "highest window": per["accuracy"].max()})
        table.index = table.index.str.replace("ccc-", "")
        table.insert(0, "target (%)", table.index.map({"easy": 40, "medium": 20, "hard": 0}))
        table = table.rename_axis("difficulty").sort_values("target (%)", ascending=False).reset_index()
        _write(table, "long_ccc_baselines.csv", "ccc-baselines")
    longer = _read(runs / "ccc-long")
    if len(longer):
        _ccc_tables(longer, "ccc-long", "long_ccc_300k", block=10)


def _ccc_tables(ccc: pd.DataFrame, part: str, name: str, block: int) -> None:
    """``NAME.csv``: each run's accuracy per ``block`` windows (a "↓ k" mark: k windows more than 1 point below
    the source model on the same images) beside the source model's; ``NAME_summary.csv``: one row per run."""
    ccc = ccc.assign(run=_label(ccc), block=ccc["window"] // block,
                     below=ccc["collapse"].astype(str).str.lower() == "true")
    runs_in = _order(pd.Index(ccc["run"].unique()), CCC)
    images = ccc.groupby("window")["n"].first().groupby(lambda w: w // block).sum().cumsum()
    windows = pd.DataFrame({"images": images,
                            "source (same images)": ccc.groupby("block")["source_accuracy"].mean()})
    for run in runs_in:
        group = ccc[ccc["run"] == run].groupby("block")
        accuracy, below = group["accuracy"].mean(), group["below"].sum()
        windows[run] = [f"{accuracy[b]:.1f}" + (" ↓" if block == 1 else f" ↓ {below[b]}") * bool(below.get(b))
                        if b in accuracy.index else "" for b in windows.index]
    _write(windows.rename_axis("block" if block > 1 else "window").reset_index(), f"{name}.csv", part)
    rows = []
    for run in runs_in:
        group = ccc[ccc["run"] == run]
        below = group[group["below"]]
        tenth = max(len(group) // 10, 1)
        rows.append({"run": run, "images": int(group["n"].sum()), "accuracy": group["accuracy"].mean(),
                     "first tenth": group["accuracy"].iloc[:tenth].mean(),
                     "last tenth": group["accuracy"].iloc[-tenth:].mean(),
                     "source accuracy": group["source_accuracy"].mean(),
                     "windows below source": f"{len(below)} / {len(group)}",
                     "first window below source": int(below["window"].min()) if len(below) else "never"})
    _write(pd.DataFrame(rows), f"{name}_summary.csv", part)


def figures() -> None:
    """docs/results/long_recurring.png and long_ccc.png: accuracy over time per run, with the source model's on the
    same images and the collapse marks (``tta.run.plots.accuracy_over_time``), drawn from the CSVs."""
    from tta.run.plots import accuracy_over_time

    if (RESULTS / "long_recurring.csv").is_file():
        wide = pd.read_csv(RESULTS / "long_recurring.csv", comment="#").set_index("run")
        visits = [c for c in wide.columns if c.startswith("visit ") and c != "visits run"]
        long = wide[visits].rename(columns=lambda c: int(c.split()[1])).stack().rename("error").reset_index()
        long.columns = ["run", "visit", "error"]
        source = long.set_index(["run", "visit"])["error"]
        rows = long[~long["run"].str.startswith("source (")]
        own = [source.get((f"source ({LARGER})" if LARGER in r else "source", v), float("nan"))
               for r, v in zip(rows["run"], rows["visit"], strict=True)]
        rows = rows.assign(source_error=own)
        rows = rows.assign(label=rows["run"], config_hash=rows["run"], n=1, accuracy=100 - rows["error"],
                           source_accuracy=100 - rows["source_error"],
                           collapse=rows["error"] > rows["source_error"] + 1.0)
        accuracy_over_time(rows, RESULTS / "long_recurring.png", xlabel="visit")
    for name in ("long_ccc", "long_ccc_300k"):
        if (RESULTS / f"{name}.csv").is_file():
            _ccc_figure(name)


def _ccc_figure(name: str) -> None:
    """docs/results/NAME.png from NAME.csv: each run's accuracy per row of the table, the source line, the marks."""
    from tta.run.plots import accuracy_over_time

    wide = pd.read_csv(RESULTS / f"{name}.csv", comment="#", dtype=str)
    runs = [c for c in wide.columns if c not in ("window", "block", "images", "source (same images)")]
    sizes = wide["images"].astype(int).diff().fillna(wide["images"].astype(int))
    parts = []
    for run in runs:
        cells = wide[run].fillna("")
        keep = cells != ""
        parts.append(pd.DataFrame({
            "label": run, "config_hash": run, "n": sizes[keep].astype(int),
            "accuracy": cells[keep].str.split(" ").str[0].astype(float),
            "source_accuracy": wide.loc[keep, "source (same images)"].astype(float),
            "collapse": cells[keep].str.contains("↓")}))
    accuracy_over_time(pd.concat(parts, ignore_index=True), RESULTS / f"{name}.png")


def main() -> None:
    """Collect (when ``--runs`` is given), then draw the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path)
    args = parser.parse_args()
    if args.runs is not None:
        collect(args.runs)
    figures()


if __name__ == "__main__":
    main()
