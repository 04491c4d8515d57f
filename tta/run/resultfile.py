"""Results files that are never lost nor silently wrong: checked before writing, locked while written, read back
only when complete.

- ``check_target``: an existing ``--out`` must already be a results file (its first line the results header) or
  empty; anything else is refused before a byte is written, so a mistyped ``--out notes.txt`` never truncates it.
- ``locked``: an exclusive ``fcntl.flock`` on a sidecar ``.<name>.lock`` beside the file, held around every
  read-check-append and around the ``--resume`` rewrite, so concurrent writers neither interleave nor lose rows.
- ``claim``: a non-blocking lock per (file, run) held for a whole run, so a second run of the same configuration
  into the same file is refused instead of duplicating its rows.
- ``read_rows``: the complete rows of a results file; a last line without its newline (a writer killed mid-row) or
  rows missing required values are left out, and the caller is told how many.
- ``complete``: whether a run's rows are all there (one valid row per corruption x severity, accuracy a number).
- ``check_sweep_dir``: a sweep never rewrites a ``results.csv`` it did not write; ``exit_with_parent``: a sweep's
  workers end when its driver does.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import pandas as pd
import yaml

from tta.errors import ConfigError
from tta.run.schema import COLUMNS, domain_keys

# Every row has these; ``severity`` is empty for named domains (your own folders), so it is not among them.
REQUIRED = ("method", "model", "corruption", "n", "accuracy", "config_hash")


def lock_path(path: str | Path, suffix: str = "lock") -> Path:
    """The sidecar lock file of ``path``: ``.<name>.<suffix>`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.{suffix}")


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of results file ``path`` (waiting for other writers) for the ``with`` block."""
    import fcntl

    sidecar = lock_path(path)
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    with sidecar.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim(path: str | Path, key: str) -> IO[str]:
    """Claim run ``key`` of results file ``path`` for this process: an open handle whose lock lasts until it is
    closed (or the process ends); a ``ConfigError`` when another process runs the same configuration into it."""
    import fcntl

    sidecar = lock_path(path, f"{key}.lock")
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    handle = sidecar.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"another tta run with the same configuration (config hash {key}) is writing {path} now; "
                          "wait for it to finish, or choose another --out") from None
    return handle


def header(path: str | Path) -> list[str] | None:
    """The first CSV line of ``path`` (``None`` when the file is empty or not text)."""
    try:
        with Path(path).open(newline="") as f:
            first = f.readline(1 << 16)  # a results header is short; never read a big binary file whole
    except UnicodeDecodeError:
        return ["<binary>"]
    return next(csv.reader([first]), None) if first else None


def check_target(path: str | Path, columns: Sequence[str] = COLUMNS) -> None:
    """Refuse (``ConfigError``) an existing, non-empty ``path`` whose header is not ``columns``; reads only."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    first = header(path)
    if first != list(columns):
        kind = "results with other columns" if first and "config_hash" in first else "something other than results"
        raise ConfigError(f"{path} already exists and holds {kind}; choose another --out (it is left untouched)")


def read_rows(path: str | Path, columns: Sequence[str] = COLUMNS) -> tuple[pd.DataFrame, int]:
    """The complete rows of results file ``path`` and how many incomplete ones were left out (a last line without
    its newline, or a row missing a required value)."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a results CSV (not text); pass a file written by tta adapt or tta sweep") \
            from None
    dropped = 0
    if "\n" in text and not text.endswith("\n"):  # (a file of one line without newline is all header)
        text, dropped = text[:text.rfind("\n") + 1], 1
    try:
        df = pd.read_csv(io.StringIO(text), dtype={"config_hash": str}) if text.strip() else pd.DataFrame()
    except (pd.errors.ParserError, pd.errors.EmptyDataError):
        raise ConfigError(f"{path} is not a results CSV; pass a file written by tta adapt or tta sweep") from None
    if df.empty and not len(df.columns):
        df = pd.DataFrame(columns=list(columns))
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(f"{path} is not a results file (it lacks {len(missing)} of its columns, e.g. "
                          f"{', '.join(missing[:3])}); pass a file written by tta adapt or tta sweep")
    required = [c for c in REQUIRED if c in columns]
    ok = df[required].notna().all(axis=1)
    if "accuracy" in df:
        ok &= pd.to_numeric(df["accuracy"], errors="coerce").between(0, 100)
    return df[ok].reset_index(drop=True), dropped + int((~ok).sum())


def complete(df: pd.DataFrame, domains: int) -> bool:
    """Whether ``df`` holds exactly one valid row for each of its ``domains`` (corruption x severity pairs, named
    domains, visits of a recurring stream or windows of a long one: ``domain_keys``)."""
    if len(df) != domains or not set(REQUIRED) <= set(df.columns):
        return False
    if df[list(REQUIRED)].isna().any().any():
        return False
    accuracy = pd.to_numeric(df["accuracy"], errors="coerce")
    return bool(accuracy.between(0, 100).all()) and len(df[domain_keys(df)].drop_duplicates()) == domains



def complete_text(text: str, domains: int) -> bool:
    """Whether the results CSV ``text`` holds exactly one valid row per domain (``complete``)."""
    try:
        return complete(pd.read_csv(io.StringIO(text), dtype={"config_hash": str}), domains)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return False


def complete_file(path: Path, domains: int) -> bool:
    """Whether results file ``path`` exists and holds a complete run (a header-only or cut-short one does not)."""
    try:
        return path.is_file() and complete(read_rows(path)[0], domains)
    except ConfigError:
        return False


def expected_rows(config_text: str | None) -> int | None:
    """How many result rows (domains) a finished run has, as the configuration written beside its results records
    (``domains``; for files written before it did, a benchmark run's corruptions x severities); None when that file
    is missing, unreadable or does not say."""
    if config_text is None:
        return None
    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return None
    if not isinstance(config, dict):
        return None
    domains = config.get("domains")
    corruptions, severities = config.get("corruptions"), config.get("severities")
    if domains is None and "user_data" not in config and isinstance(corruptions, list) and \
            isinstance(severities, list):  # written before runs recorded their domains: a benchmark's grid
        domains = len(corruptions) * len(set(severities))
    return domains if isinstance(domains, int) and not isinstance(domains, bool) and domains > 0 else None


SWEEP_MARKER = ".tta-sweep"


def check_sweep_dir(out: Path) -> None:
    """Refuse (``ConfigError``) a sweep ``--out`` directory whose ``results.csv`` or ``batches.csv`` no sweep
    wrote: only a directory marked by ``mark_sweep_dir`` (or holding a sweep's ``runs/``) is ever rewritten."""
    if (out / SWEEP_MARKER).is_file() or (out / "runs").is_dir():
        return
    foreign = [name for name in ("results.csv", "batches.csv") if (out / name).exists()]
    if foreign:
        raise ConfigError(f"{out} holds {' and '.join(foreign)} that tta sweep did not write; choose another --out "
                          "(they are left untouched)")


def mark_sweep_dir(out: Path) -> None:
    """Mark ``out`` as a sweep's directory (its merged files are the sweep's to rewrite)."""
    marker = out / SWEEP_MARKER
    if not marker.is_file():
        marker.write_text("written by tta sweep: results.csv and batches.csv here are rebuilt from runs/\n")


def exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """In a worker process: end it (``os._exit``) as soon as its parent process ``parent`` (the pid the parent
    passed down, so a parent gone before this call counts too) is gone, e.g. a sweep driver stopped by SIGTERM or
    SIGKILL, instead of computing on for nobody. A daemon thread polls the parent pid, which changes (to a
    reaper's) when the parent dies."""
    import os
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="tta-exit-with-parent", daemon=True).start()
