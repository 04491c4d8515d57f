"""No result is lost or silently wrong: --out checked before writing, concurrent writers serialised, a run store
trusted only when complete, foreign files never replaced, cut-short rows left out, sweep workers ending with
their driver."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import write_fake_cifar_c

from tta.cli import cli
from tta.errors import ConfigError
from tta.models import cifar_resnet
from tta.run.report import CsvWriter, load_results, open_results
from tta.run.resultfile import complete, read_rows
from tta.run.schema import COLUMNS, TIMED_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("assets")
    write_fake_cifar_c(root / "data", ("fog",), per_severity=8)
    checkpoint = root / "r20.th"
    torch.manual_seed(0)
    torch.save({"state_dict": cifar_resnet("resnet20").state_dict()}, checkpoint)
    return {"checkpoint": str(checkpoint), "arch": "resnet20", "data-dir": str(root / "data"),
            "corruptions": "fog", "batch-size": 8, "device": "cpu", "method": "source"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models on a small shared machine."""


def _adapt(assets: dict, *args: str) -> Any:
    options = [x for k, v in assets.items() for x in (f"--{k}", str(v))]
    return CliRunner().invoke(cli, ["adapt", *options, "--no-progress", *args])


def _row(i: int, key: str = "k") -> dict[str, Any]:
    return {"method": "m", "model": "x", "corruption": f"c{i}", "severity": 1, "n": 10, "accuracy": 50.0,
            "config_hash": key}


def test_out_naming_another_file_is_refused_untouched(tmp_path: Path, assets: dict) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, no newline at the end")
    result = _adapt(assets, "--out", str(notes))
    assert result.exit_code == 2 and "left untouched" in result.output and result.exc_info[0] is SystemExit
    assert notes.read_text() == "my notes, no newline at the end"
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    assert _adapt(assets, "--out", str(other)).exit_code == 2 and other.read_text() == "a,b\n1,2\n"


def _append(path: str, key: str, n: int) -> None:
    writer = CsvWriter(path)
    for i in range(n):
        writer(_row(i, key))


def _rewrite(path: str, n: int) -> None:
    for _ in range(n):
        CsvWriter(path, replace_hash="gone")


def test_concurrent_appends_and_resume_rewrites_lose_nothing(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    CsvWriter(out).write_rows([_row(i, "gone") for i in range(5)])
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append, args=(str(out), key, 150)) for key in ("a", "b")]
    workers.append(context.Process(target=_rewrite, args=(str(out), 60)))
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    df = pd.read_csv(out, dtype={"config_hash": str})
    assert sorted(df.config_hash.value_counts().items()) == [("a", 150), ("b", 150)]
    assert not df.duplicated(["config_hash", "corruption"]).any()


def test_one_configuration_runs_once_at_a_time_per_file(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    _, writer, _ = open_results(out, "h1", 2, resume=False, batches=False)
    with pytest.raises(ConfigError, match=r"same configuration .* is writing"):
        open_results(out, "h1", 2, resume=True, batches=False)
    _, other, _ = open_results(out, "h2", 2, resume=False, batches=False)  # another config may share the file
    assert writer is not None and other is not None
    del writer
    _, again, _ = open_results(out, "h1", 2, resume=True, batches=False)  # free once the first run ended
    assert again is not None


def test_cut_short_rows_are_left_out_of_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "r.csv"
    CsvWriter(out).write_rows([{**_row(i), **{c: 1 for c in COLUMNS if c not in _row(i)}} for i in range(3)])
    text = out.read_text()
    out.write_text(text + text.splitlines()[1][:25])  # a fourth row cut short
    rows, dropped = read_rows(out)
    assert len(rows) == 3 and dropped == 1
    assert len(load_results([out])[0]) == 3 and "left out 1 incomplete row" in caplog.text
    header_only = tmp_path / "h.csv"
    header_only.write_text(",".join(COLUMNS) + "\n")
    assert not complete(read_rows(header_only)[0], 1)
    assert not complete(pd.DataFrame([{**_row(0), "accuracy": float("nan")}]), 1)


def _grid(path: Path, assets: dict, **grid: Any) -> Path:
    base = {k: v for k, v in assets.items() if k not in grid}
    path.write_text(yaml.safe_dump({"base": {**base, "severities": "5,4"}, "grid": grid}))
    return path


def test_a_broken_run_store_is_run_again(tmp_path: Path, assets: dict) -> None:
    grid, out = _grid(tmp_path / "g.yaml", assets, seed=[1, 2]), tmp_path / "out"
    assert CliRunner().invoke(cli, ["sweep", str(grid), "--out", str(out), "--no-progress"]).exit_code == 0
    full = pd.read_csv(out / "results.csv")
    first, second = sorted((out / "runs").iterdir())
    header = (first / "results.csv").read_text().splitlines()[0]
    (first / "results.csv").write_text(header + "\n")  # header only
    lines = (second / "results.csv").read_text().splitlines(keepends=True)
    (second / "results.csv").write_text("".join(lines[:2]) + lines[2][:30])  # cut short
    result = CliRunner().invoke(cli, ["sweep", str(grid), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0 and "2 run(s) done now, 0 found done" in result.output
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv").drop(columns=TIMED_COLUMNS),
                                  full.drop(columns=TIMED_COLUMNS))


def test_a_sweep_never_replaces_a_file_it_did_not_write(tmp_path: Path, assets: dict) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("precious,rows\n1,2\n")
    grid = _grid(tmp_path / "g.yaml", assets, seed=[1])
    result = CliRunner().invoke(cli, ["sweep", str(grid), "--out", str(out), "--no-progress"])
    assert result.exit_code == 2 and "tta sweep did not write" in result.output
    assert (out / "results.csv").read_text() == "precious,rows\n1,2\n" and sorted(os.listdir(out)) == ["results.csv"]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc to find the workers")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_a_sweep_driver_stops_its_workers(tmp_path: Path, assets: dict, sig: signal.Signals) -> None:
    grid = _grid(tmp_path / "g.yaml", {**assets, "method": "tent", "severities": "5,4,3,2,1"}, seed=[1, 2, 3, 4])
    driver = subprocess.Popen([sys.executable, "-m", "tta.cli", "sweep", str(grid), "--out", str(tmp_path / "o"),
                               "--jobs", "2", "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    workers: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.2)
        workers = [p for p in _children(driver.pid) if "tta" in Path(f"/proc/{p}/cmdline").read_text()
                   or "multiprocessing" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(workers) >= 2, "the sweep did not start its workers"
    driver.send_signal(sig)
    driver.wait(30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)


def test_a_run_store_counts_its_rows_from_the_domains_its_config_records() -> None:
    from tta.run.resultfile import expected_rows

    assert expected_rows("domains: 3\ncorruptions: [fog]\nseverities: [5]\n") == 3
    # written before runs recorded their domains: a benchmark run's corruptions x severities, so old sweeps resume
    assert expected_rows("corruptions: [fog, snow]\nseverities: [5, 3, 5]\n") == 4
    assert expected_rows("corruptions: [scans]\nseverities: [5]\nuser_data: folder:x\n") is None  # unknowable
    for text in (None, "", ": not yaml: [", "domains: 0\n", "domains: true\n", "- a list\n"):
        assert expected_rows(text) is None
