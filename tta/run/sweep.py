"""Benchmark grids: the cartesian product of ``tta adapt`` options, run resumably, locally or on a Ray cluster.

A grid file holds a ``base`` mapping (options shared by every run) and a ``grid`` mapping (option -> list of values
to combine); keys are ``tta adapt`` option names, with dashes or underscores (every option but those of one
invocation's files: ``out``, ``resume``, ``batches``, ``report``, ``progress``, which the sweep decides). ``set`` is
a mapping of method settings (``--set``); ``set.KEY`` sets one of them, so ``grid: {set.lr: [0.001, 0.0001]}`` is an
axis too. A grid axis with another name whose values are mappings sets several options together (options that only
make sense as pairs), e.g. ``network: [{checkpoint: r20.th, arch: resnet20}, {checkpoint: r32.th, arch:
resnet32}]``.

Every grid point is a ``RunSpec`` (``RunSpec.from_options``), run by ``tta.run`` (what ``tta adapt`` does) and
identified by ``spec.key``, a hash of its options and resolved method settings: changing either makes a new run. A
finished run is kept in ``OUT/runs/<hash>/`` (its rows, per-batch accuracies and configuration), which appears in
one ``os.replace`` of a complete temporary directory, so a sweep killed at any moment (SIGINT, SIGKILL) and started
again runs exactly the runs that have no such directory. ``OUT/results.csv`` (``tta.run.schema.COLUMNS``, one row
per run x corruption x severity) and ``OUT/batches.csv`` (``BATCH_COLUMNS``) are rebuilt from the run directories of
the current grid and replaced atomically after every run: never a duplicate nor a half-written row, and rows of runs
no longer in the grid are left out.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tta.config import load_yaml
from tta.errors import ConfigError, TTAError
from tta.run.schema import BATCH_COLUMNS, COLUMNS
from tta.run.spec import GRID_KEYS, INVOCATION_OPTIONS, RunSpec

BACKENDS: tuple[str, ...] = ("local", "ray")


OPTION_NAMES: tuple[str, ...] = GRID_KEYS


@dataclass(frozen=True)
class Run:
    """One point of the grid: its key (``spec.key``), the options that differ from the defaults, its ``RunSpec`` and
    its values on the grid axes (``label``, e.g. ``method=tent seed=2``)."""

    key: str
    options: dict[str, Any]
    spec: RunSpec
    label: str = ""


@dataclass
class SweepResult:
    """What a sweep left in ``out``: the merged rows, the runs done now and before, and the failed ones."""

    out: Path
    results: pd.DataFrame
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _is_option(name: str) -> bool:
    return name in OPTION_NAMES or name.startswith("set.")


def _normalise(mapping: Any, where: str, bundles: bool = False) -> dict[str, Any]:
    """Option names with underscores; with ``bundles``, a non-option key whose values are mappings is an axis
    setting several options together (its mappings are normalised too)."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where} must be a mapping of option: value, got {type(mapping).__name__}")
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = str(key).strip().replace("-", "_")
        if bundles and not _is_option(name) and isinstance(value, list) and value and all(
                isinstance(v, dict) for v in value):
            value = [_normalise(v, f"grid axis {key!r} of {where}") for v in value]
        elif name in INVOCATION_OPTIONS:
            raise ConfigError(f"option {key!r} in {where} is decided by tta sweep for every run (results go to "
                              f"--out/runs/<key>/); drop it from the grid file")
        elif not _is_option(name):
            raise ConfigError(f"unknown option {key!r} in {where}; valid options are: {', '.join(OPTION_NAMES)} "
                              f"(and set.KEY for a method setting)")
        if name in out:
            raise ConfigError(f"option {key!r} appears twice in {where} (dashes and underscores are the same)")
        out[name] = value
    return out


def load_grid(path: str | Path) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The ``base`` and ``grid`` mappings of a grid file, keys normalised (``data-dir`` -> ``data_dir``)."""
    data = load_yaml(path)
    unknown = sorted(set(data) - {"base", "grid"})
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(map(repr, unknown))} in grid file {str(path)!r}; a grid file "
                          f"holds a base mapping and a grid mapping")
    base = _normalise(data.get("base"), f"the base of {path}")
    axes = _normalise(data.get("grid"), f"the grid of {path}", bundles=True)
    grid = {k: v if isinstance(v, list) else [v] for k, v in axes.items()}
    seen = set(base)
    for key, values in grid.items():
        if not values:
            raise ConfigError(f"grid axis {key!r} in {path} has no values; give it a list of at least one value")
        names = {key} if _is_option(key) else {n for v in values for n in v}
        if names & seen:
            raise ConfigError(f"option(s) {', '.join(sorted(names & seen))} set twice in the base and grid of {path}; "
                              f"set each option in one place")
        seen |= names
    return base, grid


def resolve_run(values: Mapping[str, Any], where: str = "the grid") -> Run:
    """Check one run's options completely (without loading data or models) and turn them into a ``Run``."""
    spec = RunSpec.from_options(values, where)
    return Run(spec.key, spec.options(), spec)


def expand_grid(base: Mapping[str, Any], grid: Mapping[str, Sequence[Any]]) -> list[Run]:
    """Every combination of the grid values over ``base``, each checked; a ``ConfigError`` names the bad run."""
    runs: list[Run] = []

    def show(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}={show(x)}" for k, x in v.items()) + "}"
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, combo, strict=True))
        label = " ".join(f"{k}={show(v)}" for k, v in point.items())
        values = dict(base)
        for k, v in point.items():
            values.update({k: v} if _is_option(k) else v)
        run = resolve_run(values, f"the grid run {label}" if point else "the grid's base")
        runs.append(dataclasses.replace(run, label=label))
    unique = {r.key: r for r in runs}
    return list(unique.values())


def execute_run(spec: RunSpec, device: str | None = None, progress: bool = False,
                threads: int | None = None) -> dict[str, Any]:
    """Run one grid point through ``tta.run`` (what ``tta adapt`` does) in a temporary directory; returns its files'
    text.

    Runs in whatever process the backend chose (this one, a spawned worker, a Ray task): it returns the results,
    per-batch and config text (or ``error`` for a user error such as a missing data file), and the driver writes them.
    ``device`` replaces ``auto``; ``threads`` caps torch's CPU threads.
    """
    from tta.run.execute import run

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="tta-run-") as tmp:
        out = Path(tmp) / "results.csv"
        try:
            if device is not None and spec.evaluation.device == "auto":
                spec = spec.replace(evaluation={"device": device})
            run(spec.replace(output={"out": str(out), "batches": True, "progress": progress, "resume": False,
                                     "report": None}))
        except TTAError as err:
            return {"error": str(err)}
        return {"results": out.read_text(), "batches": (Path(tmp) / "results.batches.csv").read_text(),
                "config": (Path(tmp) / "results.yaml").read_text()}


class _Store:
    """``OUT/runs/<key>/`` per finished run, and the merged ``OUT/results.csv`` and ``OUT/batches.csv``."""

    def __init__(self, out: Path) -> None:
        self.out, self.runs = out, out / "runs"
        self.tables: dict[tuple[str, str], pd.DataFrame] = {}  # (run key, results|batches), read once

    def done(self, key: str) -> bool:
        return (self.runs / key / "results.csv").is_file()

    def clean(self) -> None:
        """Remove what killed sweeps left half-written (temporary run directories and files)."""
        for stale in [*self.runs.glob(".tmp-*"), *self.out.glob(".*.tmp")]:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    def save(self, run: Run, output: Mapping[str, str]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{run.key}-", dir=self.runs))
        (tmp / "options.yaml").write_text(yaml.safe_dump(run.options, sort_keys=False))
        for name, file in (("config", "config.yaml"), ("batches", "batches.csv"), ("results", "results.csv")):
            with (tmp / file).open("w") as f:
                f.write(output[name])
                f.flush()
                os.fsync(f.fileno())
        final = self.runs / run.key
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def merge(self, runs: Sequence[Run]) -> pd.DataFrame:
        from tta.io import write_text

        tables = {}
        for name, columns in (("results", COLUMNS), ("batches", BATCH_COLUMNS)):
            for r in runs:
                if (r.key, name) not in self.tables and self.done(r.key):
                    path = self.runs / r.key / f"{name}.csv"
                    self.tables[r.key, name] = pd.read_csv(path, dtype={"config_hash": str})
            parts = [self.tables[r.key, name] for r in runs if len(self.tables.get((r.key, name), ()))]
            tables[name] = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
            write_text(self.out / f"{name}.csv", tables[name][columns].to_csv(index=False))
        return tables["results"]


@dataclass
class _Lock:
    path: Path
    handle: Any = None

    def __enter__(self) -> _Lock:
        import fcntl

        self.handle = self.path.open("w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise ConfigError(f"another tta sweep is writing {self.path.parent}; wait for it to finish or choose "
                              f"another --out") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def run_sweep(
    grid_file: str | Path,
    out: str | Path,
    *,
    jobs: int = 1,
    backend: str = "local",
    address: str | None = None,
    gpus_per_run: float | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run every run of ``grid_file`` that ``out`` does not hold yet; see the module doc for the guarantees.

    ``jobs`` > 1 runs that many spawned worker processes (one per GPU, round robin, when there are several GPUs;
    CPU threads split between them otherwise). ``backend="ray"`` submits each run as a Ray task asking for
    ``gpus_per_run`` GPUs (default 1 when the cluster has GPUs, else 0) to the cluster at ``address`` (default: a
    local Ray instance started for this sweep). Every run is checked before the first one starts.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    base, grid = load_grid(grid_file)
    runs = expand_grid(base, grid)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; tta sweep writes a directory (results.csv, runs/, ...)")
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create --out {out} ({err.strerror}); choose another directory") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"cannot write in --out {out}; choose another directory")
    store = _Store(out)
    with _Lock(out / ".lock"):
        store.clean()
        todo = [r for r in runs if not store.done(r.key)]
        result = SweepResult(out, store.merge(runs), skipped=[r.key for r in runs if store.done(r.key)])
        if todo:
            from tqdm.auto import tqdm

            with tqdm(total=len(runs), initial=len(runs) - len(todo), desc="grid", unit="run",
                      disable=not progress) as bar:
                submit = _ray_outputs if backend == "ray" else _local_outputs
                for run, output in submit(todo, jobs=jobs, address=address, gpus_per_run=gpus_per_run,
                                          progress=progress):
                    if "error" in output:
                        result.failed[run.key] = f"{run.label}: {output['error']}"
                    else:
                        store.save(run, output)
                        result.ran.append(run.key)
                        result.results = store.merge(runs)
                    bar.update(1)
                    bar.set_postfix_str(run.label)
    return result


def _local_outputs(runs: Sequence[Run], *, jobs: int, progress: bool, **_: Any) -> Iterator[tuple[Run, dict]]:
    if jobs == 1:
        for run in runs:
            yield run, execute_run(run.spec, progress=progress)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    gpus = torch.cuda.device_count()
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for i in range(jobs):
        slots.put(i)
    threads = None if gpus else max(1, (os.cpu_count() or 1) // jobs)
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(slots, gpus, threads))
    try:
        futures = {pool.submit(_worker_run, run.spec): run for run in runs}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:  # interrupted: drop the queued runs instead of waiting for them
        pool.shutdown(wait=False, cancel_futures=True)


_WORKER: dict[str, Any] = {}  # in a spawned worker: its device and thread count


def _init_worker(slots: Any, gpus: int, threads: int | None) -> None:
    """Worker ``i`` of the pool takes GPU ``i`` (modulo the GPU count) for all its runs, or ``threads`` CPU threads."""
    slot = slots.get()
    _WORKER.update(device=f"cuda:{slot % gpus}" if gpus else None, threads=threads)


def _worker_run(spec: RunSpec) -> dict[str, Any]:
    return execute_run(spec, device=_WORKER["device"], threads=_WORKER["threads"])


def _ray_outputs(runs: Sequence[Run], *, address: str | None, gpus_per_run: float | None,
                 **_: Any) -> Iterator[tuple[Run, dict]]:
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray, which is not installed; pip install 'tta-toolkit[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        if gpus_per_run is None:
            gpus_per_run = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        task = ray.remote(num_cpus=1, num_gpus=gpus_per_run)(execute_run)
        pending = {task.remote(run.spec): run for run in runs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(ready[0]), ray.get(ready[0])
    finally:
        if started:
            ray.shutdown()
