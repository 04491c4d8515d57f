"""``run(spec)``: execute a ``RunSpec``. It builds the stream, the model and the adapted model, runs the engine,
and writes the rows (as they finish), the per-batch rows, the YAML beside the results (the resolved configuration
with the spec under ``spec:``, which ``tta adapt --spec`` re-runs) and, when asked for, a report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from tta.data.stream import Stream
    from tta.run.spec import RunSpec

DEFAULT_WINDOW = 64  # images in the sliding window when a run adapts one image at a time


@dataclass(frozen=True)
class RunResult:
    """What a run left: its rows (one per domain), the results CSV, the YAML beside it and the run's config hash
    (the ``config_hash`` column of its rows); ``report`` is the report's path when one was asked for."""

    results: pd.DataFrame
    out: Path
    config: Path
    config_hash: str
    report: Path | None = None


def provenance(data_dir: str | Path, checkpoint: str | Path | None) -> dict[str, Any]:
    """Where a run's inputs came from and which software ran it: part of the resolved config and its hash."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    from tta.data.download import file_checksum

    digest = None if checkpoint is None else file_checksum(checkpoint, "sha256")
    return {"data_dir": str(Path(data_dir).resolve()), "checkpoint_sha256": digest,
            "versions": {"tta": installed("tta-toolkit"), "torch": str(torch.__version__),
                         "robustbench": installed("robustbench")}}


def build_stream(spec: RunSpec, device: Any, model: Any = None) -> Stream:
    """The stream a spec describes: your own data, or the benchmark's (from files or generated on ``device``);
    ``recurring`` is the ``continual`` stream visited ``visits`` times, ``ccc`` a CCC-style stream generated from
    the clean set (its path calibrated on the source ``model``)."""
    from tta.data.sources import benchmark_stream, data_stream

    d, s = spec.data, spec.stream
    if s.setting == "ccc":
        from tta.data.ccc import ccc_stream
        from tta.data.generated import CLEAN_SOURCES

        clean = d.clean or (d.data if d.data is not None else CLEAN_SOURCES.get(d.benchmark, d.benchmark))
        return ccc_stream(clean, model, d.data_dir, download=d.download, length=s.length,  # type: ignore[return-value]
                          baseline=s.baseline, speed=s.speed, batch_size=s.batch_size, window=s.accuracy_window,
                          seed=d.data_seed, corruptions=d.corruptions or _corruptions(spec), device=device)
    if s.setting == "recurring":
        from tta.data.recurring import RecurringStream

        base = spec.replace(stream={"setting": "continual"})
        return RecurringStream(build_stream(base, device), s.visits)
    name = spec.model_name  # decides the image size: a local checkpoint reads 32x32, a timm:NAME its own size
    named = None if spec.model.checkpoint is not None and not str(name).startswith("timm:") else name
    if d.data is None:
        return benchmark_stream(d, s, model=named, device=device)
    return data_stream(d.data, d.benchmark, named, d.n_examples, s.batch_size, setting=s.setting, seed=s.seed,
                       dirichlet=s.dirichlet, order=s.order)


def window_of(spec: RunSpec) -> int:
    """The sliding window a run uses: the spec's, else 64 at batch size 1 for the methods that adapt, else 0."""
    from tta.methods import get_method

    if spec.method.window is not None:
        return spec.method.window
    name = spec.method.name
    slides = spec.stream.batch_size == 1 and name != "source" and get_method(name).sliding_window
    return DEFAULT_WINDOW if slides else 0


def resolved_config(spec: RunSpec, stream: Stream, window: int) -> dict[str, Any]:
    """The resolved configuration of a run whose hash identifies its rows (``config_hash``)."""
    from tta.config import to_dict

    d, s, m = spec.data, spec.stream, spec.method
    checkpoint = spec.model.checkpoint
    return {
        "method": m.name, "settings": to_dict(spec.settings), "model": _model_label(spec),
        "checkpoint": str(checkpoint or ""), "arch": spec.model.arch, "benchmark": d.benchmark, "data": stream.label,
        "clean_source": d.clean if d.generate else None,
        "frost_images": str(d.frost_images) if d.generate and d.frost_images else None,
        "corruptions": _corruptions(spec), "severities": _severities(spec), "n_examples": d.n_examples,
        "batch_size": s.batch_size, "seed": s.seed, "reset": spec.evaluation.reset, "setting": s.setting,
        "dirichlet": s.dirichlet, "source_data": spec.source.data, "window": window, "preset": m.preset,
        **_evaluation_config(spec),
        **provenance(d.data_dir, checkpoint),
        **({"user_data": d.data, "order": s.order} if d.data is not None else {}),
        **({"guard": m.guard} if m.guard is not None else {}),
    }


def _evaluation_config(spec: RunSpec) -> dict[str, Any]:
    """The protocol and long-stream settings of a run, where they differ from the defaults (so the config hashes
    of runs that use none of them stay as they were)."""
    e, s = spec.evaluation, spec.stream
    out: dict[str, Any] = {}
    if e.protocol != "offline":
        out.update(protocol=e.protocol, stream_speed=e.stream_speed, cost=e.cost)
    if s.setting == "recurring":
        out.update(visits=s.visits)
    if s.setting == "ccc":
        out.update(baseline=s.baseline, speed=s.speed, length=s.length, accuracy_window=s.accuracy_window)
    return out


def _model_label(spec: RunSpec) -> str:
    return Path(spec.model.checkpoint).stem if spec.model.checkpoint is not None else str(spec.model_name)


def _corruptions(spec: RunSpec) -> list[str]:
    from tta.data.sources import default_corruptions

    return list(spec.data.corruptions or default_corruptions(spec.data.benchmark))


def _severities(spec: RunSpec) -> list[int]:
    from tta.data.cifar_c import SEVERITIES

    return list(spec.data.severities or SEVERITIES)


def run(spec: RunSpec) -> RunResult:
    """Execute ``spec`` (see the module doc).

    The results CSV (``spec.output.out``, default ``results/<method>_<model>_<time>.csv``) never gets two copies of
    a run's rows: with ``output.resume``, a finished run is returned from it without running and an unfinished one
    runs again in place of its partial rows; without it, rows of the same run (config hash) are a ``ConfigError``.
    Everything (settings, selection, files, model) is checked before the first batch runs.
    """
    import torch

    from tta.config import config_hash
    from tta.data.sources import check_num_classes
    from tta.devices import resolve_device
    from tta.methods import get_method
    from tta.models import load_model
    from tta.run.engine import evaluate
    from tta.run.report import check_output, config_path, default_output, open_results, write_config, write_report

    d, o = spec.data, spec.output
    out = check_output(o.out if o.out is not None else default_output(spec.method.name, _model_label(spec)))
    window = window_of(spec)
    dev = resolve_device(spec.evaluation.device)
    net = load_model(spec.model_name, dataset=d.benchmark, checkpoint=spec.model.checkpoint, arch=spec.model.arch,
                     data_dir=d.data_dir)
    stream = build_stream(spec, dev, net.to(dev).eval())
    check_num_classes(stream, net, None if d.data is not None else d.benchmark)
    clean = _source_data(spec)
    # a method's own random state (the generator of its augmented views, a randomly initialised head) is drawn
    # when it is built, before the engine seeds the run: seeded here, it follows the run's seed too
    torch.manual_seed(spec.stream.seed)
    adapted = get_method(spec.method.name)(net, spec.settings, source_data=clean, window=window)
    if spec.method.guard is not None:  # --- guard (tta.monitor)
        from tta.monitor import attach_guard

        attach_guard(adapted, spec.method.guard, net, clean)

    resolved = resolved_config(spec, stream, window)
    digest = config_hash(resolved)
    batches = o.batches or o.report is not None
    done, writer, batch_writer = open_results(out, digest, len(stream.domains), resume=o.resume, batches=batches)
    from tta.run.engine import Protocol
    from tta.run.longrun import checkpoint_path

    e = spec.evaluation
    long = spec.stream.setting in ("recurring", "ccc")
    checkpoint = checkpoint_path(out, digest) if long else None
    if checkpoint is not None and not o.resume:
        checkpoint.unlink(missing_ok=True)  # a fresh run never continues an old attempt's checkpoint
    protocol = Protocol(e.protocol, e.stream_speed, e.cost, reference=net, checkpoint=checkpoint,
                        checkpoint_every=o.checkpoint_every)
    if done is not None:
        df = done
    else:
        saved = spec.replace(output={"out": None, "resume": False})
        write_config(out, {**resolved, "device": str(dev), "config_hash": digest, "domains": len(stream.domains),
                           "spec": saved.to_dict()})
        df = evaluate(adapted, stream, spec.evaluation.reset, device=dev,  # type: ignore[arg-type]
                      model_name=_model_label(spec), seed=spec.stream.seed, progress=o.progress, on_result=writer,
                      metadata={"config_hash": digest},
                      on_batches=batch_writer.write_rows if batch_writer is not None else None, protocol=protocol)
    report = write_report([out], o.report) if o.report is not None else None
    return RunResult(df, out, config_path(out, digest), digest, report)


def _source_data(spec: RunSpec) -> Any:
    if spec.source.data is None:
        return None
    from tta.source import SourceData

    return SourceData(spec.source.data, Path(spec.data.data_dir), spec.data.download)
