"""The speed scripts against other implementations (benchmarks/reference_speed.py, benchmarks/official_speed.py):
their user errors, the CSV they write and the export of a bare repository. Timing itself needs the other
implementations' code and is not tested here."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_reference_speed_names_what_to_fetch_when_the_reference_is_missing(tmp_path: Path) -> None:
    result = _run("benchmarks/reference_speed.py", "--md-dir", str(tmp_path), "--methods", "rmt")
    assert result.returncode == 2
    assert "mariodoebler/test-time-adaptation" in result.stderr and "Traceback" not in result.stderr


def test_reference_speed_rejects_an_unknown_method_and_knows_the_newer_ones(tmp_path: Path) -> None:
    result = _run("benchmarks/reference_speed.py", "--md-dir", str(tmp_path), "--methods", "tent,nosuch")
    assert result.returncode == 2 and "nosuch" in result.stderr and "Traceback" not in result.stderr
    names = _script("reference_speed").REFERENCE_NAMES
    assert {"rpl", "cmf", "santa", "rmt", "adacontrast", "ttaug"} <= set(names)


def test_official_speed_lists_every_missing_option() -> None:
    result = _run("benchmarks/official_speed.py", "--methods", "petta,foa")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for option in ("--petta", "--foa", "--data", "--checkpoint", "--vit-checkpoint", "--source-data"):
        assert option in result.stderr
    unknown = _run("benchmarks/official_speed.py", "--methods", "tent")
    assert unknown.returncode == 2 and "tent" in unknown.stderr


def test_reference_speed_csv_starts_with_its_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_tables
    finally:
        sys.path.remove(str(ROOT / "docs"))
    monkeypatch.setattr(sys, "argv", ["reference_speed.py", "--methods", "rpl", "--n-images", "1000"])
    _script("reference_speed").write_csv(tmp_path / "speed.csv", [["rpl", "1.0", "2.0", "2.000", "50.00", "50.00"]])
    command, header, rows = gen_tables.read_csv(tmp_path / "speed.csv")
    assert command == "python benchmarks/reference_speed.py --methods rpl --n-images 1000"
    assert header[3] == "tta/ref" and rows == [["rpl", "1.0", "2.0", "2.000", "50.00", "50.00"]]


def test_official_speed_exports_a_bare_repository_and_keeps_a_working_copy(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "code.py").write_text("x = 1\n")
    (work / "other.txt").write_text("elsewhere\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(work)]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "c"]):
        subprocess.run([*git, *args], check=True)
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    out = tmp_path / "out"
    out.mkdir()
    working_copy = _script("official_speed").working_copy
    root = working_copy(bare, "sub", out)
    assert root == out and (out / "sub" / "code.py").read_text() == "x = 1\n" and not (out / "other.txt").exists()
    assert working_copy(work, "sub", out) == work  # a working copy is used as it is


def test_recurring_summary_labels_rows_and_divides_the_last_visit_by_the_first(tmp_path: Path) -> None:
    own = _script("own_method")
    for name, errors in (("a", (40.0, 30.0)), ("b", (20.0, 25.0))):
        rows = [f"roid,{visit},{domain},{error},10" for visit, error in enumerate(errors, 1) for domain in "xy"]
        (tmp_path / f"{name}.csv").write_text("method,visit,corruption,error,n\n" + "\n".join(rows) + "\n")
    table = own.summarise_recurring([str(tmp_path / "a.csv"), f"roid (x=1)={tmp_path / 'b.csv'}"])
    assert [r["run"] for r in table] == ["roid", "roid (x=1)"]
    assert table[0]["last / first"] == 0.75 and table[1]["last / first"] == 1.25
    assert table[1]["visit 2"] == 25.0 and table[1]["images / visit"] == 20


def test_long_stream_tables_label_a_guarded_run_by_its_file_not_by_its_estimates(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the tables script imports the runs' names from long_streams
    try:
        tables = _script("long_streams_tables")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    header = "method,visit,error,n,estimated_accuracy\n"
    (tmp_path / "tent.csv").write_text(header + "tent,1,30.0,10,\n")
    (tmp_path / "tent+guard.csv").write_text(header + "tent,1,20.0,10,0.8\ntent,2,25.0,10,\n")
    runs = tables._read(tmp_path)
    assert sorted(zip(tables._label(runs), runs["error"], strict=True)) == [
        ("tent", 30.0), ("tent+guard", 20.0), ("tent+guard", 25.0)]
