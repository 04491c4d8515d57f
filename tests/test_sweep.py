"""`tta sweep`, `tta adapt --resume` and `tta report` on a fake CIFAR-10-C: resumable after SIGKILL, exact rows."""

from __future__ import annotations

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
from tta.models import cifar_resnet
from tta.run.schema import BATCH_COLUMNS, COLUMNS
from tta.run.sweep import expand_grid, load_grid, run_sweep

ROOT = Path(__file__).resolve().parents[1]
CORRUPTIONS = ("gaussian_noise", "fog")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fake CIFAR-10-C (2 corruptions, 12 images per severity) and a tiny CIFAR ResNet checkpoint."""
    root = tmp_path_factory.mktemp("assets")
    write_fake_cifar_c(root / "data", CORRUPTIONS, per_severity=12)
    checkpoint = root / "r20.th"
    torch.manual_seed(0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in cifar_resnet("resnet20").state_dict().items()}},
               checkpoint)
    return {"checkpoint": str(checkpoint), "arch": "resnet20", "data-dir": str(root / "data"),
            "corruptions": ",".join(CORRUPTIONS), "batch-size": 8, "device": "cpu"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models on a small shared machine: more threads only add contention."""


def _grid(path: Path, base: dict[str, Any], grid: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"base": base, "grid": grid}))
    return path


def _sweep(*args: str) -> Any:
    result = CliRunner().invoke(cli, ["sweep", *args, "--no-progress"])
    assert result.exit_code == 0, result.output
    return result


def _check_exact(out: Path, n_runs: int, n_domains: int) -> pd.DataFrame:
    df = pd.read_csv(out / "results.csv", dtype={"config_hash": str})
    assert list(df.columns) == COLUMNS
    assert len(df) == n_runs * n_domains
    assert not df.duplicated(["config_hash", "corruption", "severity"]).any()
    assert df.config_hash.nunique() == n_runs and (df.groupby("config_hash").size() == n_domains).all()
    return df


@pytest.mark.slow
def test_sweep_killed_with_sigkill_resumes_to_exactly_the_expected_rows(tmp_path: Path, assets: dict) -> None:
    grid = _grid(tmp_path / "grid.yaml", {**assets, "severities": [5, 3]},
                 {"method": ["source", "adabn", "tent"], "seed": [1, 2]})
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tta.cli", "sweep", str(grid), "--out", str(out), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((out / "runs").glob("[0-9a-f]*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "runs").glob("[0-9a-f]*")))
    assert 1 <= finished < 6
    merged = pd.read_csv(out / "results.csv", dtype={"config_hash": str})  # as the kill left it: exact too
    assert merged.config_hash.nunique() <= finished
    _check_exact(out, merged.config_hash.nunique(), 4)

    result = _sweep(str(grid), "--out", str(out))
    assert f"{6 - finished} run(s) done now, {finished} found done" in result.output
    df = _check_exact(out, 6, 4)
    assert set(zip(df.method, df.seed, strict=True)) == {(m, s) for m in ("source", "adabn", "tent") for s in (1, 2)}
    assert not list((out / "runs").glob(".tmp-*"))
    batches = pd.read_csv(out / "batches.csv")
    assert list(batches.columns) == BATCH_COLUMNS and len(batches) == 6 * 4 * 2  # 12 images in batches of 8

    again = _sweep(str(grid), "--out", str(out))  # idempotent: nothing left to do, nothing changes
    assert "0 run(s) done now, 6 found done" in again.output
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv", dtype={"config_hash": str}), df)


def test_a_changed_config_is_a_new_run_never_mixed_with_the_old_rows(tmp_path: Path, assets: dict) -> None:
    out = tmp_path / "out"
    grid = _grid(tmp_path / "grid.yaml", {**assets, "severities": 5}, {"method": ["tent"]})
    _sweep(str(grid), "--out", str(out))
    first = _check_exact(out, 1, 2)
    _grid(grid, {**assets, "severities": 5, "set": {"lr": 0.01}}, {"method": ["tent"]})
    assert "1 run(s) done now, 0 found done" in _sweep(str(grid), "--out", str(out)).output
    second = _check_exact(out, 1, 2)
    assert set(first.config_hash).isdisjoint(second.config_hash)
    assert yaml.safe_load(next((out / "runs").glob("*/config.yaml")).read_text())["method"] == "tent"
    assert len(list((out / "runs").iterdir())) == 2  # the old run is kept on disk, out of the results file
    _grid(grid, {**assets, "severities": 5}, {"method": ["tent"]})  # back to the first config: found done
    assert "0 run(s) done now, 1 found done" in _sweep(str(grid), "--out", str(out)).output
    pd.testing.assert_frame_equal(_check_exact(out, 1, 2), first)


def test_option_spellings_and_set_axes_expand_to_the_cartesian_product(tmp_path: Path, assets: dict) -> None:
    base = {k: v for k, v in assets.items() if k != "batch-size"}
    grid = _grid(tmp_path / "g.yaml", {**base, "severities": "5,3"},
                 {"set.lr": [0.001, 0.01], "seed": [1, 2], "batch-size": [8, 4]})
    runs = expand_grid(*load_grid(grid))
    assert len({r.key for r in runs}) == 8
    assert {(r.spec.method.settings["lr"], r.spec.stream.seed, r.spec.stream.batch_size) for r in runs} == {
        (lr, seed, b) for lr in (0.001, 0.01) for seed in (1, 2) for b in (8, 4)}
    assert all(r.spec.data.severities == (5, 3) and r.spec.data.data_dir == assets["data-dir"] for r in runs)


def test_a_mapping_axis_sets_options_together(tmp_path: Path, assets: dict) -> None:
    grid = _grid(tmp_path / "g.yaml", {**assets, "method": "source"},
                 {"replicate": [{"seed": 1, "data-seed": 0}, {"seed": 2, "data_seed": 1}], "severities": [5, 3]})
    runs = expand_grid(*load_grid(grid))
    assert [(r.spec.stream.seed, r.spec.data.data_seed, r.spec.data.severities) for r in runs] == [
        (1, 0, (5,)), (1, 0, (3,)), (2, 1, (5,)), (2, 1, (3,))]
    assert runs[0].label == "replicate={data_seed=0, seed=1} severities=5"  # as YAML wrote it (sorted)


@pytest.mark.parametrize(("base", "grid", "message"), [
    ({}, {"methd": ["tent"]}, "unknown option 'methd' in the grid of"),
    ({"sed": 1}, {}, "valid options are: method, benchmark"),
    ({}, {"method": ["source", "tnet"]}, "unknown method 'tnet'"),
    ({}, {"method": ["tent", "source"], "set.lr": [0.01]}, "unknown key(s) 'lr'"),
    ({"seed": "one"}, {}, "seed='one' in the grid's base has the wrong type; expected int"),
    ({"severities": [5, 7]}, {}, "severities must be integers from 1 to 5"),
    ({"setting": "paused"}, {}, "unknown stream setting 'paused'"),
    ({}, {"seed": []}, "grid axis 'seed'"),
    ({"seed": 1}, {"seed": [1, 2]}, "seed set twice in the base and grid"),
    ({}, {"pair": [{"seed": 1, "data_sed": 0}]}, "unknown option 'data_sed' in grid axis 'pair'"),
    ({"seed": 1}, {"pair": [{"seed": 2, "data_seed": 0}]}, "seed set twice"),
])
def test_bad_grids_fail_before_any_run_starts(tmp_path: Path, assets: dict, base: dict, grid: dict,
                                             message: str) -> None:
    path = _grid(tmp_path / "g.yaml", {**assets, **base}, grid)
    result = CliRunner().invoke(cli, ["sweep", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not list((tmp_path / "out").glob("runs/*"))


def test_a_run_failing_on_its_data_is_reported_and_the_others_finish(tmp_path: Path, assets: dict) -> None:
    base = {k: v for k, v in assets.items() if k != "corruptions"}
    grid = _grid(tmp_path / "g.yaml", {**base, "severities": 5, "method": "source", "download": False},
                 {"corruptions": ["fog", "snow"]})  # snow.npy is not in the fake data set
    result = CliRunner().invoke(cli, ["sweep", str(grid), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code != 0 and "corruptions=snow" in result.output and "1 failed" in result.output
    _check_exact(tmp_path / "out", 1, 1)


def _adapt(assets: dict, *args: str) -> Any:
    options = [x for k, v in assets.items() for x in (f"--{k}", str(v))]
    return CliRunner().invoke(cli, ["adapt", "--method", "adabn", *options, "--no-progress", *args])


def test_adapt_resume_never_duplicates_rows(tmp_path: Path, assets: dict) -> None:
    out = tmp_path / "r.csv"
    assert _adapt(assets, "--out", str(out)).exit_code == 0
    full = pd.read_csv(out)
    assert len(full) == 10
    again = _adapt(assets, "--out", str(out))
    assert again.exit_code != 0 and "pass --resume" in again.output and len(pd.read_csv(out)) == 10
    assert _adapt(assets, "--out", str(out), "--resume").exit_code == 0  # finished: kept as it is
    assert out.read_text().count("\n") == 11

    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:20])  # killed after 3 rows, in the middle of the 4th
    result = _adapt(assets, "--out", str(out), "--resume")
    assert result.exit_code == 0, result.output
    resumed = pd.read_csv(out)
    assert len(resumed) == 10 and not resumed.duplicated(["config_hash", "corruption", "severity"]).any()
    pd.testing.assert_series_equal(resumed.accuracy, full.accuracy)


def test_adapt_out_never_shares_its_path_with_the_config(tmp_path: Path, assets: dict) -> None:
    out = tmp_path / "results.yaml"
    result = _adapt(assets, "--out", str(out))
    assert result.exit_code != 0 and "would share its path with the run's YAML config" in result.output
    assert not out.exists()


def test_two_runs_into_one_file_keep_both_configs(tmp_path: Path, assets: dict) -> None:
    out = tmp_path / "r.csv"
    assert _adapt(assets, "--out", str(out), "--severities", "5").exit_code == 0
    assert _adapt(assets, "--out", str(out), "--severities", "3").exit_code == 0
    df = pd.read_csv(out, dtype={"config_hash": str})
    configs = {yaml.safe_load(p.read_text())["config_hash"]: p for p in tmp_path.glob("r*.yaml")}
    assert set(configs) == set(df.config_hash) and len(configs) == 2


def _png(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG"


def test_report_has_every_table_and_plot(tmp_path: Path, assets: dict) -> None:
    grid = _grid(tmp_path / "g.yaml", {**assets, "severities": [5, 3]},
                 {"method": ["source", "tent"], "setting": ["per-domain", "continual"], "seed": [1, 2]})
    _sweep(str(grid), "--out", str(tmp_path / "out"))
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "out"), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report" / "report.md").read_text()
    for setting in ("per-domain", "continual"):
        section = text.split(f"## r20, {setting}")[1].split("\n## ")[0]
        for value in ("Error", "Accuracy"):
            assert f"### {value} per method x severity\n\n| method | sev 5 | sev 3 | mean |" in section
            assert f"### {value} per corruption at severity 5\n\n| method | gaussian_noise | fog | mean |" in section
        assert "| method | seeds | mean error | std | min | max |" in section
        assert section.count("\n| source |") == 6 and section.count("\n| tent |") == 6  # 5 tables and the cost
        assert " ± " in section
        plots = [f"error_vs_severity_r20_{setting}.png", f"heatmap_r20_{setting}.png"]
        plots += [f"stream_r20_{setting}.png"] if setting == "continual" else []
        for plot in plots:
            assert f"]({plot})" in section and _png(tmp_path / "report" / plot)
    assert not (tmp_path / "report" / "stream_r20_per-domain.png").exists()
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    tent = df[(df.method == "tent") & (df.setting == "continual")]
    continual = text.split("## r20, continual")[1]
    assert f"| tent | 2 | {tent.error.mean():.1f} | " in continual
    sev3 = tent[tent.severity == 3].groupby("seed").accuracy.mean()
    assert f"| tent | {tent[tent.severity == 5].accuracy.mean():.1f} ± " in continual.split("### Accuracy per")[1]
    assert f" | {sev3.mean():.1f} ± {sev3.std():.1f} | " in continual.split("### Accuracy per")[1]


def test_adapt_report_writes_the_same_report_for_one_run(tmp_path: Path, assets: dict) -> None:
    result = _adapt(assets, "--out", str(tmp_path / "r.csv"), "--setting", "gradual", "--report",
                    str(tmp_path / "rep"))
    assert result.exit_code == 0, result.output
    assert "### Error per method x severity" in (tmp_path / "rep" / "report.md").read_text()
    assert _png(tmp_path / "rep" / "stream_r20_gradual.png")


@pytest.mark.slow
def test_parallel_jobs_give_the_same_rows_as_one_job(tmp_path: Path, assets: dict) -> None:
    grid = _grid(tmp_path / "g.yaml", {**assets, "severities": 5},
                 {"method": ["source", "adabn", "tent"]})
    one = run_sweep(grid, tmp_path / "one", progress=False).results
    two = run_sweep(grid, tmp_path / "two", jobs=2, progress=False).results
    key = ["config_hash", "corruption", "severity"]
    pd.testing.assert_frame_equal(one.sort_values(key)[[*key, "accuracy"]].reset_index(drop=True),
                                  two.sort_values(key)[[*key, "accuracy"]].reset_index(drop=True))


@pytest.mark.slow
def test_ray_backend_gives_the_same_accuracies_as_local(tmp_path: Path, assets: dict) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'tta-toolkit[ray]')")
    grid = _grid(tmp_path / "g.yaml", {**assets, "severities": 5}, {"method": ["source", "tent"], "seed": [1, 2]})
    local = run_sweep(grid, tmp_path / "local", progress=False).results
    ray = run_sweep(grid, tmp_path / "ray", backend="ray", progress=False).results
    key = ["config_hash", "corruption", "severity"]
    assert len(ray) == len(local) == 8
    pd.testing.assert_frame_equal(local.sort_values(key)[[*key, "accuracy"]].reset_index(drop=True),
                                  ray.sort_values(key)[[*key, "accuracy"]].reset_index(drop=True))


def test_ray_backend_without_ray_says_how_to_install_it(tmp_path: Path, assets: dict,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    grid = _grid(tmp_path / "g.yaml", {**assets, "severities": 5}, {"method": ["source"]})
    result = CliRunner().invoke(cli, ["sweep", str(grid), "--out", str(tmp_path / "o"), "--backend", "ray",
                                      "--no-progress"])
    assert result.exit_code != 0 and "pip install 'tta-toolkit[ray]'" in result.output
