"""Every row of the error table through the real CLI: one line naming the problem, exit status 2, no traceback;
and the table in the documentation is the one generated from the same list."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from error_cases import CASES, DOC, Case, updated

from tta.cli import cli


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_error_case(case: Case, tmp_path: Path, one_thread: None) -> None:
    if case.setup is not None:
        case.setup(tmp_path)
    before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file())
    result = CliRunner().invoke(cli, case.args.replace("{dir}", str(tmp_path)).split())
    last = result.output.strip().splitlines()[-1]
    if "Try 'tta" in last:  # click's usage errors end with a hint line
        last = result.output.strip().splitlines()[-2] if not result.output.strip().endswith("help.") else [
            line for line in result.output.splitlines() if line.startswith("Error:")][-1]
    assert isinstance(result.exception, SystemExit) and result.exit_code == case.status, result.output
    assert last.startswith("Error: " + case.message.replace("{dir}", str(tmp_path))), result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error:")]) == 1
    after = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file()
                   and not p.name.startswith("."))
    assert after == [b for b in before if not str(b[0]).startswith(".")]  # a refused input changes nothing


def test_the_documented_table_is_up_to_date() -> None:
    text = DOC.read_text()
    assert text == updated(text), "run `python tests/error_cases.py` to regenerate the table"
