"""The README and the documentation: tables equal their CSVs, the README's numbers are what its command prints."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
QUICKSTART = ROOT / "docs" / "results" / "quickstart_digits.csv"


def _gen_tables():  # type: ignore[no-untyped-def]  # loaded from its path: docs/ is not a package
    spec = importlib.util.spec_from_file_location("gen_tables", ROOT / "docs" / "gen_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_tables = _gen_tables()


def test_every_table_equals_its_csv() -> None:
    assert gen_tables.stale() == [], "run `python docs/gen_tables.py` and commit the result"


def test_an_edited_number_is_caught(tmp_path: Path) -> None:
    (tmp_path / "docs" / "results").mkdir(parents=True)
    shutil.copy(ROOT / "docs" / "results" / "afn_resnet20.csv", tmp_path / "docs" / "results")
    page = ROOT / "docs" / "methods" / "afn.md"
    text = page.read_text(encoding="utf-8")
    (tmp_path / "README.md").write_text("# empty\n", encoding="utf-8")
    (tmp_path / "docs" / "afn.md").write_text(text, encoding="utf-8")
    assert gen_tables.stale(tmp_path) == []
    row = next(line for line in text.splitlines() if line.startswith("| 5 |"))
    edited = row.replace(row.split(" | ")[-1], "99.9 |")
    (tmp_path / "docs" / "afn.md").write_text(text.replace(row, edited), encoding="utf-8")
    assert gen_tables.stale(tmp_path) == ["docs/afn.md: docs/results/afn_resnet20.csv"]
    assert gen_tables.regenerate((tmp_path / "docs" / "afn.md").read_text(encoding="utf-8"), tmp_path) == text


def test_every_results_csv_records_its_command_and_is_shown() -> None:
    shown = set()
    for path in gen_tables.markdown_files():
        shown |= {gen_tables.parse_spec(m.group("spec"))[0] for m in gen_tables.BLOCK.finditer(path.read_text())}
    for csv in sorted((ROOT / "docs" / "results").glob("*.csv")):
        command, header, rows = gen_tables.read_csv(csv)
        assert command, f"{csv.name} has no '# command:' line"
        assert header and rows, f"{csv.name} is empty"
        assert f"docs/results/{csv.name}" in shown, f"{csv.name} is in no table"


def test_readme_is_short_and_links_only_files_that_exist() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) < 12 * 1024
    for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which is not in the repository"


def test_no_docstring_or_page_cites_the_method_specification_file() -> None:
    # The method specifications the code was written from are not in the repository; the docs pages replace them.
    files = [*(ROOT / "tta").rglob("*.py"), *(ROOT / "configs").glob("*.yaml"), *(ROOT / "docs").rglob("*.md"), README]
    citing = [str(f.relative_to(ROOT)) for f in files if "METHODS" + ".md" in f.read_text(encoding="utf-8")]
    assert citing == []


def test_python_m_tta_runs_the_command_line() -> None:
    result = subprocess.run([sys.executable, "-m", "tta", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "adapt" in result.stdout and "Usage:" in result.stdout


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """The README's first command (and its source baseline) from a clean data directory, as a user runs them."""
    from tta.cli import cli

    work = tmp_path_factory.mktemp("quickstart")
    frames = []
    for method in ("source", "tent"):
        out = work / f"{method}.csv"
        result = CliRunner().invoke(cli, ["adapt", "--method", method, "--benchmark", "digits", "--data-dir",
                                          str(work / "data"), "--out", str(out), "--no-progress"])
        assert result.exit_code == 0, result.output
        frames.append(pd.read_csv(out))
    return work, pd.concat(frames, ignore_index=True)


@pytest.mark.slow
def test_readme_numbers_are_what_the_first_command_prints(digits_runs: tuple[Path, pd.DataFrame]) -> None:
    _, fresh = digits_runs
    committed = pd.read_csv(QUICKSTART, comment="#")
    key = ["method", "corruption", "severity"]
    merged = committed[[*key, "accuracy"]].merge(fresh[[*key, "accuracy"]], on=key, suffixes=("_doc", "_run"))
    assert len(merged) == len(committed) == 150
    assert (merged["accuracy_doc"] == merged["accuracy_run"]).all(), merged[merged.accuracy_doc != merged.accuracy_run]


@pytest.mark.slow
def test_readme_python_example_runs(digits_runs: tuple[Path, pd.DataFrame], monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    work, fresh = digits_runs
    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL).group(1)
    monkeypatch.chdir(work)  # its data/ holds the digits model the fixture trained
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    tent = fresh[(fresh.method == "tent") & (fresh.severity == 5)].set_index("corruption")["accuracy"]
    for corruption in ("fog", "contrast"):
        assert re.search(rf"{corruption}\s+5\s+.*{tent[corruption]}", printed), printed
