"""Turn the runs of benchmarks/long_streams.py into the small CSVs of docs/results, the tables of
docs/guides/long-streams.md (each table sits between ``<!-- table:NAME -->`` and ``<!-- /table -->``) and its two
figures (accuracy over time, from the same CSVs).

    python benchmarks/long_streams_tables.py --runs runs/long            # writes the CSVs, then the tables
    python benchmarks/long_streams_tables.py                             # only re-renders the tables from the CSVs
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd
from long_streams import CCC, ONLINE, RECURRING

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "guides" / "long-streams.md"


def _label(df: pd.DataFrame) -> pd.Series:
    return df["method"] + df["estimated_accuracy"].notna().map({True: "+guard", False: ""})


def _read(folder: Path) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in sorted(folder.glob("*.csv")) if not p.name.endswith(".batches.csv")]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def collect(runs: Path) -> None:
    """Write docs/results/long_recurring.csv, online_cifar10.csv and long_ccc.csv from the runs' rows."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    rec = _read(runs / "recurring")
    if len(rec):
        rec = rec.assign(run=_label(rec))
        per_visit = rec.groupby(["run", "visit"], sort=False).agg(
            error=("error", "mean"), source_error=("source_accuracy", lambda s: 100 - s.mean()),
            n=("n", "sum"), relative_cost=("relative_cost", "mean"),
            time_relative_cost=("time_relative_cost", "mean")).reset_index()
        per_visit.round(2).to_csv(RESULTS / "long_recurring.csv", index=False)
    online = _read(runs / "online")
    if len(online):
        online = online.assign(run=_label(online))
        keys = ["run", "setting", "protocol"]
        table = online.groupby(keys, sort=False).agg(
            error=("error", "mean"), batches=("batches", "sum"), adapted_batches=("adapted_batches", "sum"),
            relative_cost=("relative_cost", "mean"), time_relative_cost=("time_relative_cost", "mean"),
            images_per_second=("images_per_second", "mean")).reset_index()
        table.round(3).to_csv(RESULTS / "online_cifar10.csv", index=False)
    ccc = _read(runs / "ccc")
    if len(ccc):
        ccc = ccc.assign(run=_label(ccc))
        ccc[["run", "window", "n", "accuracy", "source_accuracy", "collapse", "relative_cost", "time_relative_cost",
             "stream_id"]].round(3).to_csv(RESULTS / "long_ccc.csv", index=False)


def _markdown(df: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "–" if pd.isna(v) else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.astype(object).to_numpy()]
    return "\n".join(lines)


def tables() -> dict[str, str]:
    """The page's tables, rendered from the CSVs in docs/results."""
    out = {}
    if (RESULTS / "long_recurring.csv").is_file():
        rec = pd.read_csv(RESULTS / "long_recurring.csv")
        wide = rec.pivot_table(index="run", columns="visit", values="error", sort=False)
        wide = wide.loc[[r for r in RECURRING if r in wide.index]]
        shown = [v for v in wide.columns if v in (1, 2, 5, 10, 15, 20)]
        table = wide[shown].rename(columns=lambda v: f"visit {v}")
        table["mean"] = wide.mean(axis=1)
        table["visits run"] = wide.notna().sum(axis=1)
        out["recurring"] = _markdown(table.reset_index())
    if (RESULTS / "online_cifar10.csv").is_file():
        on = pd.read_csv(RESULTS / "online_cifar10.csv")
        parts = []
        for setting, group in on.groupby("setting", sort=False):
            wide = group.pivot_table(index="run", columns="protocol", values="error", sort=False)
            cost = group[group["protocol"] == "offline"].set_index("run")
            online = group[group["protocol"] == "online"].set_index("run")
            table = pd.DataFrame({"setting": setting, "offline error": wide.get("offline"),
                                  "online error": wide.get("online"),
                                  "adapted (%)": 100 * online["adapted_batches"] / online["batches"],
                                  "counted cost": cost["relative_cost"], "timed cost": cost["time_relative_cost"]})
            parts.append(table.loc[[r for r in ONLINE if r in table.index]].reset_index())
        out["online"] = _markdown(pd.concat(parts, ignore_index=True))
    if (RESULTS / "long_ccc.csv").is_file():
        ccc = pd.read_csv(RESULTS / "long_ccc.csv")
        rows = []
        for run, group in ccc.groupby("run", sort=False):
            collapsed = group[group["collapse"].astype(str).str.lower() == "true"]
            rows.append({"run": run, "images": int(group["n"].sum()), "accuracy": group["accuracy"].mean(),
                         "source accuracy": group["source_accuracy"].mean(),
                         "windows below source": f"{len(collapsed)} / {len(group)}",
                         "first below source (images)": int(collapsed["window"].min() + 1) * int(group["n"].iloc[0])
                         if len(collapsed) else "never",
                         "last window": group["accuracy"].iloc[-1]})
        out["ccc"] = _markdown(pd.DataFrame(rows).set_index("run").loc[[r for r in CCC if r in set(ccc["run"])]]
                               .reset_index())
    if (RESULTS / "long_stream_speed.csv").is_file():
        speed = pd.read_csv(RESULTS / "long_stream_speed.csv")
        speed["ratio"] = speed["ratio"].map("{:.3f}".format)
        out["speed"] = _markdown(speed.rename(columns=lambda c: c.replace("_", " ")))
    return out


def figures() -> None:
    """docs/results/long_recurring.png and long_ccc.png: accuracy over time per run with the source model's on the
    same images and the collapse marks (``tta.run.plots.accuracy_over_time``)."""
    from tta.run.plots import accuracy_over_time

    if (RESULTS / "long_recurring.csv").is_file():
        rec = pd.read_csv(RESULTS / "long_recurring.csv")
        rows = rec.assign(label=rec["run"], config_hash=rec["run"], accuracy=100 - rec["error"],
                          source_accuracy=100 - rec["source_error"],
                          collapse=rec["error"] > rec["source_error"] + 1.0)
        accuracy_over_time(rows, RESULTS / "long_recurring.png")
    if (RESULTS / "long_ccc.csv").is_file():
        ccc = pd.read_csv(RESULTS / "long_ccc.csv")
        accuracy_over_time(ccc.assign(label=ccc["run"], config_hash=ccc["run"]), RESULTS / "long_ccc.png")


def render() -> None:
    """Replace each table of the page by the one rendered from the CSVs."""
    text = PAGE.read_text()
    for name, table in tables().items():
        pattern = rf"(<!-- table:{name} -->\n).*?(<!-- /table -->)"
        text = re.sub(pattern, lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text, flags=re.S)
    PAGE.write_text(text)


def main() -> None:
    """Collect (when ``--runs`` is given), then render."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path)
    args = parser.parse_args()
    if args.runs is not None:
        collect(args.runs)
    figures()
    render()


if __name__ == "__main__":
    main()
