"""The adaptation engine: run an adapted model over a stream and tally accuracy per domain.

A row's ``corruption`` column is the domain's name (the corruption of a benchmark's domain, the folder of your own
data's) and ``severity`` its severity (empty where the stream has none); domains with a ``visit``, ``window`` or
``step`` add those columns to the returned table.

Batches move to the device once; correct counts accumulate on the device and are read back once per segment
(when timing needs a synchronisation anyway), so the loop adds no per-batch host-device synchronisation of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from tta.data.stream import Stream
from tta.devices import resolve_device  # re-exported: tta.run.engine.resolve_device is public
from tta.errors import ConfigError
from tta.run.schema import BATCH_COLUMNS, COLUMNS

if TYPE_CHECKING:
    from tta.core.base import AdaptedModel

ResetPolicy = Literal["domain", "batch", "never"]
RESET_POLICIES: tuple[str, ...] = ("domain", "batch", "never")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    adapted: AdaptedModel,
    stream: Stream,
    reset: ResetPolicy = "domain",
    *,
    device: str | torch.device = "auto",
    model_name: str = "model",
    seed: int | None = None,
    progress: bool = False,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    metadata: Mapping[str, Any] | None = None,
    on_batches: Callable[[list[dict[str, Any]]], None] | None = None,
) -> pd.DataFrame:
    """Adapt over ``stream`` and return one row per (corruption, severity) with accuracy and throughput.

    ``reset``: ``domain`` resets the method at the start of every segment of the stream (one corruption x severity
    in the per-domain setting), ``batch`` before every batch (episodic), ``never`` not at all (continual).
    ``on_result`` receives each row as soon as its domain is finished, so an interrupted run keeps what it finished.
    Accuracy and error are in percent. ``on_batches``, when given, receives at the end of each segment one row per
    batch of it (``BATCH_COLUMNS``: the accuracy along the stream; ``corruption`` is ``mixed`` for a batch of
    several corruptions); the hits stay on the device and are read back once per segment, like the counts.
    """
    if reset not in RESET_POLICIES:
        raise ConfigError(f"unknown reset policy {reset!r}; choose one of: {', '.join(RESET_POLICIES)}")
    dev = resolve_device(device)
    if seed is not None:
        torch.manual_seed(seed)
    adapted.to(dev)
    n_domains = len(stream.domains)
    last_segment = getattr(stream, "last_segments", None) or list(range(n_domains))
    correct = torch.zeros(n_domains, dtype=torch.long, device=dev)
    counts = torch.zeros(n_domains, dtype=torch.long, device=dev)
    seconds = [0.0] * n_domains
    seen = [0] * n_domains  # counts read back at the end of each segment
    rows: dict[int, dict[str, Any]] = {}
    batch_hits: list[torch.Tensor] = []  # per batch of the current segment, on the device
    batch_info: list[tuple[int, int, list[Any], int]] = []  # (batch index, segment, its domains, size)
    from tta.monitor.tally import GuardTally  # --- guard columns

    tally = GuardTally(adapted, n_domains, dev)
    common = {"method": adapted.name, "model": model_name, "data": stream.label, "seed": seed,
              "batch_size": getattr(stream, "batch_size", None), "reset": reset,
              "setting": getattr(stream, "setting", "per-domain"), "device": str(dev),
              **(metadata or {})}

    def close_segment(segment: int | None, started: float, final: bool) -> None:
        _sync(dev)
        elapsed = time.perf_counter() - started
        if batch_hits and on_batches is not None:
            on_batches([_batch_row(common, info, hits) for info, hits in
                        zip(batch_info, torch.stack(batch_hits).tolist(), strict=True)])
            batch_hits.clear()
            batch_info.clear()
        now = counts.tolist()
        new = [now[d] - seen[d] for d in range(n_domains)]
        total_new = sum(new)
        for d in range(n_domains):
            if new[d]:
                seconds[d] += elapsed * new[d] / total_new
        seen[:] = now
        hits = None
        for d in range(n_domains):
            done = final or (segment is not None and last_segment[d] <= segment)
            if now[d] and d not in rows and done:
                hits = hits if hits is not None else correct.tolist()
                rows[d] = {**_row(common, stream.domains[d], now[d], hits[d], seconds[d]), **tally.row(d)}
                if on_result is not None:
                    on_result(rows[d])

    segment: int | None = None
    started = time.perf_counter()
    with tqdm(total=len(stream), desc=adapted.name, unit="batch", disable=not progress, leave=False) as bar:
        for index, batch in enumerate(stream):
            if batch.segment != segment:
                if segment is not None:
                    close_segment(segment, started, final=False)
                    started = time.perf_counter()
                segment = batch.segment
                if reset == "domain":
                    adapted.reset()
                if progress:
                    domain = stream.domains[int(batch.domain[0])]
                    bar.set_postfix_str(str(domain))
            if reset == "batch":
                adapted.reset()
            if on_batches is not None:  # batch.domain is still on the host here
                present = [stream.domains[d] for d in batch.domain.unique().tolist()]
                batch_info.append((index, batch.segment, present, len(batch.domain)))
            batch = batch.to(dev)
            tally.start()
            logits = adapted(batch.x, domain=batch.domain)
            tally.add(batch.domain)
            hit = (logits.argmax(1) == batch.y).long()
            if on_batches is not None:
                batch_hits.append(hit.sum())
            correct.index_add_(0, batch.domain, hit)
            counts.index_add_(0, batch.domain, torch.ones_like(hit))
            bar.update(1)
    close_segment(segment, started, final=True)
    extra = [k for k in ("visit", "window", "step") if any(k in row for row in rows.values())]
    columns = [*COLUMNS, *extra, *[k for k in common if k not in COLUMNS]]
    return pd.DataFrame([rows[d] for d in sorted(rows)], columns=columns)


def _row(common: Mapping[str, Any], domain: Any, n: int, hits: int, seconds: float) -> dict[str, Any]:
    accuracy = 100.0 * hits / n
    extra = {k: v for k, v in domain.attributes.items() if k in ("visit", "window", "step")}
    return {**common, "corruption": domain.name, "severity": domain.severity, **extra, "n": n,
            "accuracy": accuracy, "error": 100.0 - accuracy, "seconds": seconds,
            "images_per_second": n / seconds if seconds > 0 else float("nan")}


def _batch_row(common: Mapping[str, Any], info: tuple[int, int, list[Any], int], hits: int) -> dict[str, Any]:
    index, segment, domains, n = info
    corruptions, severities = {d.name for d in domains}, {d.severity for d in domains}
    row = {"batch": index, "segment": segment, "corruption": corruptions.pop() if len(corruptions) == 1 else "mixed",
           "severity": severities.pop() if len(severities) == 1 else None, "n": n, "accuracy": 100.0 * hits / n}
    return {k: row[k] if k in row else common.get(k) for k in BATCH_COLUMNS}
