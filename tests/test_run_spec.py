"""``RunSpec`` and ``tta.run``: one description of a run, built from options, grid points and YAML, executed by one
function; the CLI and the grid accept the same options; a mixed grid runs and resumes."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

import tta
from tta.cli import adapt_command, cli
from tta.errors import ConfigError
from tta.run.schema import TIMED_COLUMNS
from tta.run.spec import ALIASES, GRID_KEYS, INVOCATION_OPTIONS, OPTIONS, SECTIONS, RunSpec, options_table
from tta.run.sweep import expand_grid, load_grid, run_sweep

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models on a small shared machine: more threads only add contention."""


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory whose digits model is trained for one epoch (the tests check wiring, not accuracy)."""
    from tta.models import digits as digits_model
    from tta.models import load_model

    root = tmp_path_factory.mktemp("digits")
    recipe = dict(digits_model.RECIPE)
    digits_model.RECIPE["epochs"] = 1
    try:
        load_model("digits-cnn", dataset="digits", data_dir=root)
    finally:
        digits_model.RECIPE.clear()
        digits_model.RECIPE.update(recipe)
    return root


def _tiny(digits_dir: Path, **options: Any) -> RunSpec:
    base = {"benchmark": "digits", "data_dir": str(digits_dir), "corruptions": "fog,gaussian_noise",
            "severities": 5, "n_examples": 30, "batch_size": 10, "device": "cpu", "method": "tent"}
    return RunSpec.from_options({**base, **options}, "the test")


def test_spec_round_trip_same_hash_same_results(tmp_path: Path, digits_dir: Path) -> None:
    spec = _tiny(digits_dir, **{"set.lr": 0.01, "out": str(tmp_path / "a.csv")})
    path = tmp_path / "run.yaml"
    spec.to_yaml(path)
    again = RunSpec.from_yaml(path)
    assert again == spec and again.key == spec.key
    assert RunSpec.from_dict(yaml.safe_load(path.read_text())) == spec

    first = tta.run(spec)
    second = tta.run(again.replace(output={"out": str(tmp_path / "b.csv")}))
    assert first.config_hash == second.config_hash
    pd.testing.assert_series_equal(first.results.accuracy, second.results.accuracy)

    # the YAML written beside the results is a spec: re-running it (tta adapt --spec) gives the same rows
    written = RunSpec.from_yaml(first.config)
    assert written.key == spec.key and written.output.out is None
    result = CliRunner().invoke(cli, ["adapt", "--spec", str(first.config), "--out", str(tmp_path / "c.csv"),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    rerun = pd.read_csv(tmp_path / "c.csv", dtype={"config_hash": str})
    assert rerun.config_hash.tolist() == [first.config_hash] * 2
    np.testing.assert_array_equal(rerun.accuracy.to_numpy(), first.results.accuracy.to_numpy())


def test_run_benchmark_is_a_thin_wrapper_with_the_same_rows(tmp_path: Path, digits_dir: Path) -> None:
    spec = _tiny(digits_dir, method="adabn", out=str(tmp_path / "spec.csv"))
    df, out = tta.run_benchmark("adabn", benchmark="digits", data_dir=digits_dir, corruptions=["fog", "gaussian_noise"],
                                severities=[5], n_examples=30, batch_size=10, device="cpu", out=tmp_path / "api.csv")
    assert out == tmp_path / "api.csv"
    result = tta.run(spec)
    assert df.config_hash.tolist() == result.results.config_hash.tolist()
    pd.testing.assert_series_equal(df.accuracy, result.results.accuracy)


def test_every_adapt_option_is_a_grid_key_and_every_grid_key_an_option() -> None:
    cli_options = {p.name for p in adapt_command.params if isinstance(p, click.Option)}
    per_invocation = {"spec", *INVOCATION_OPTIONS}
    assert cli_options - per_invocation == set(GRID_KEYS), "tta adapt's options and the grid keys differ"
    assert per_invocation <= cli_options
    assert set(OPTIONS) | set(ALIASES) | {"spec"} == cli_options
    for option, (section, name) in OPTIONS.items():  # every option sets a field of the spec
        assert hasattr(SECTIONS[section](), name), option


def test_every_grid_key_is_accepted_by_a_grid_file(tmp_path: Path) -> None:
    for key in GRID_KEYS:
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump({"base": {key.replace("_", "-"): None}}))
        base, _ = load_grid(path)
        assert key in base
    for key in INVOCATION_OPTIONS:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"base": {key: None}}))
        with pytest.raises(ConfigError, match="decided by tta sweep"):
            load_grid(tmp_path / "bad.yaml")


def test_every_benchmark_and_data_source_resolves_in_a_grid(tmp_path: Path) -> None:
    folder = tmp_path / "mine" / "0"
    folder.mkdir(parents=True)
    runs = expand_grid({"source_data": "cifar10"}, {
        "benchmark": ["cifar10c", "cifar100c", "imagenetc", "imagenet3dcc", "digits"],
        "method": ["eata"], "guard": [None, "default"], "window": [0], "preset": [None]})
    assert len(runs) == 10 and {r.spec.data.benchmark for r in runs} == {"cifar10c", "cifar100c", "imagenetc",
                                                                         "imagenet3dcc", "digits"}
    mine = expand_grid({}, {"data": [f"folder:{tmp_path / 'mine'}"], "dirichlet": [0.5], "order": ["file"],
                            "setting": ["correlated"]})
    assert mine[0].spec.data.data == f"folder:{tmp_path / 'mine'}" and mine[0].spec.stream.order == "file"


def test_aliases_fold_into_method_settings_and_old_spellings_warn() -> None:
    spec = RunSpec.from_options({"method": "dsbn", "contexts": "infer"})
    assert spec.method.settings == {"contexts": "infer"} and spec.settings.contexts == "infer"
    assert spec.key == RunSpec.from_options({"method": "dsbn", "set.contexts": "infer"}).key
    with pytest.raises(ConfigError, match="--contexts only applies to methods that route samples by domain"):
        RunSpec.from_options({"method": "tent", "contexts": "oracle"})
    with pytest.warns(FutureWarning) as record:
        old = RunSpec.from_options({"corruption": "cifar100c", "source": "cifar100", "generate": True})
    assert [str(w.message).split(" is ")[0] for w in record] == ["option 'corruption'", "option 'source'"]
    assert (old.data.benchmark, old.data.clean) == ("cifar100c", "cifar100")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RunSpec.from_options({"benchmark": "cifar100c", "clean": "cifar100"})  # the new spellings: no warning


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"stream": 1}, "unknown option 'stream'"),
    ({"order": "random"}, "order must be one of shuffle, file"),
    ({"guard": "loud"}, "guard must be one of default, monitor, fallback"),
    ({"set": {"lrr": 1}}, "unknown key(s) 'lrr'"),
    ({"severities": [6]}, "severities must be integers from 1 to 5"),
    ({"benchmark": "imagenet3dcc", "corruptions": "snow"}, "unknown imagenet3dcc corruption(s) 'snow'"),
    ({"source_data": "nope"}, "unknown clean source 'nope'"),
    ({"device": "gpu7"}, "evaluation.device 'gpu7' is not a device"),
    ({"checkpoint": "missing.th"}, "model.checkpoint (--checkpoint) 'missing.th' does not exist"),
    ({"benchmark": "cifar10c", "corruption": "digits"}, "corruption and benchmark in the test are the same option"),
])
def test_a_bad_spec_is_refused_when_built_naming_the_field(options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        RunSpec.from_options(options, "the test")
    assert message in str(err.value)


def test_nested_yaml_errors_name_the_part(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("stream: {seed: one}\n")
    with pytest.raises(ConfigError, match=r"seed='one' in the stream part of spec file .* expected int"):
        RunSpec.from_yaml(path)
    path.write_text("stream: {seed: 2}\nmethod: tent\n")
    with pytest.raises(ConfigError, match="mixes sections"):
        RunSpec.from_yaml(path)


def _digit_folder(root: Path, per_class: int = 2) -> Path:
    from PIL import Image

    from tta.data.digits import load_digits_split

    x, y = load_digits_split(train=False)
    for label in range(10):
        for k, i in enumerate(np.flatnonzero(y == label)[:per_class]):
            (root / "scans" / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(root / "scans" / str(label) / f"{k}.png")
    return root / "scans"


@pytest.mark.filterwarnings("ignore:the source model is 100.0 % accurate")  # calibrated on training digits
def test_a_grid_mixing_source_data_methods_a_guard_digits_and_a_folder_runs_and_resumes(
        tmp_path: Path, digits_dir: Path) -> None:
    from tta.data.digits import load_digits_split

    x, y = load_digits_split(train=True)
    np.savez(tmp_path / "clean.npz", x=x[:200], y=y[:200])
    folder = _digit_folder(tmp_path)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "base": {"benchmark": "digits", "data-dir": str(digits_dir), "severities": 5, "n-examples": 20,
                 "batch-size": 10, "device": "cpu", "source-data": f"npz:{tmp_path / 'clean.npz'}"},
        "grid": {"method": ["tent", "eata"], "guard": [None, "default"],
                 "input": [{"corruptions": "fog"}, {"data": f"folder:{folder}", "order": "file"}]}}))
    out = tmp_path / "out"
    first = run_sweep(grid, out, progress=False)
    assert not first.failed and len(first.ran) == 8
    df = pd.read_csv(out / "results.csv", dtype={"config_hash": str})
    assert len(df) == 8 and set(df.corruption) == {"fog", "scans"}
    assert df[df.corruption == "scans"].severity.isna().all() and (df[df.corruption == "fog"].severity == 5).all()
    assert df.groupby("method").size().to_dict() == {"eata": 4, "tent": 4}

    again = run_sweep(grid, out, progress=False)  # everything found done
    assert not again.ran and len(again.skipped) == 8
    lost = sorted((out / "runs").iterdir())[0]
    for file in lost.iterdir():
        file.unlink()
    lost.rmdir()
    resumed = run_sweep(grid, out, progress=False)  # only the missing run runs again, to the same rows
    assert resumed.ran == [lost.name] and len(resumed.skipped) == 7
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv", dtype={"config_hash": str})
                                  .drop(columns=TIMED_COLUMNS), df.drop(columns=TIMED_COLUMNS))
    report = CliRunner().invoke(cli, ["report", str(out), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## digits-cnn, per-domain, named domains" in text and "### Error per domain" in text
    assert "### Error per corruption at severity 5" in text and "| tent" in text


def test_bare_tta_says_what_to_run_first_and_adapt_help_is_grouped() -> None:
    bare = CliRunner().invoke(cli, [])
    assert bare.exit_code == 0 and "tta adapt --method tent --benchmark digits" in bare.output
    help_text = CliRunner().invoke(cli, ["adapt", "--help"]).output
    headings = ["Model:", "Data:", "Stream:", "Method:", "Evaluation and output:", "Examples:"]
    positions = [help_text.index(h) for h in headings]
    assert positions == sorted(positions)
    assert help_text.split("Examples:")[1].count("tta adapt") == 3
    assert "--corruption " not in help_text  # the deprecated spelling works but is not advertised


def test_the_user_guide_lists_every_option() -> None:
    page = (ROOT / "docs" / "guides" / "run-spec.md").read_text()
    assert options_table() in page, "docs/guides/run-spec.md's options table is out of date: paste options_table()"


def test_tta_run_is_the_package_and_the_function() -> None:
    import tta.run.execute

    assert callable(tta.run) and tta.run.RunSpec is RunSpec and tta.RunSpec is RunSpec
    assert tta.run.run is tta.run.execute.run


def test_a_method_with_its_own_random_state_repeats_for_a_seed_whatever_ran_before(tmp_path: Path,
                                                                                    digits_dir: Path) -> None:
    """ROID draws the generator of its augmented views when it is built, before the engine seeds the run: the run
    seeds it too, so the same spec gives the same rows whatever drew from torch's generator before."""
    results = []
    for before in (1, 2):
        torch.manual_seed(before)  # whatever the process did before the run
        out = str(tmp_path / f"{before}.csv")
        spec = _tiny(digits_dir, method="roid", n_examples=60, **{"set.lr": 0.05, "out": out})
        results.append(tta.run(spec).results.accuracy)
    pd.testing.assert_series_equal(*results)
