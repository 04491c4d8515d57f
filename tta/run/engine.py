"""The adaptation engine: run an adapted model over a stream and tally accuracy per domain.

A row's ``corruption`` column is the domain's name (the corruption of a benchmark's domain, the folder of your own
data's) and ``severity`` its severity (empty where the stream has none); ``visit``, ``window`` and ``step`` are
filled where the stream's domains have them. Every row also carries its cost (``tta.run.cost``), its protocol
(``tta.run.online``) and, with a reference model, the source model's accuracy on the same images.

Batches move to the device once; correct counts accumulate on the device and are read back once per segment
(when timing needs a synchronisation anyway), so the loop adds no per-batch host-device synchronisation of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import torch
from torch import nn
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


@dataclass(frozen=True)
class Protocol:
    """How a run is evaluated beyond its reset policy (``tta.run.online``, ``tta.run.cost``).

    ``protocol``: ``offline`` (every batch adapted on) or ``online`` (Alfarra's rule at ``stream_speed``, with the
    step's ``cost`` counted or timed). ``reference``: the source model, run on every batch (no gradients) to time
    plain inference and to score the source model on the same images (``source_accuracy``, ``collapse``); None
    leaves those columns empty. ``checkpoint``: a file where a long run saves its state at the end of a segment,
    at most every ``checkpoint_every`` seconds, and from which it resumes (``tta.run.longrun``).
    """

    protocol: str = "offline"
    stream_speed: float = 1.0
    cost: str = "counted"
    reference: nn.Module | None = None
    checkpoint: Path | None = None
    checkpoint_every: float = 60.0


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
    protocol: Protocol | None = None,
) -> pd.DataFrame:
    """Adapt over ``stream`` and return one row per domain with accuracy, throughput and cost.

    ``reset``: ``domain`` resets the method at the start of every segment of the stream (one corruption x severity
    in the per-domain setting), ``batch`` before every batch (episodic), ``never`` not at all (continual; the long
    streams, ``recurring`` and ``ccc``, are never reset between segments).
    ``on_result`` receives each row as soon as its domain is finished, so an interrupted run keeps what it finished.
    Accuracy and error are in percent. ``on_batches``, when given, receives at the end of each segment one row per
    batch of it (``BATCH_COLUMNS``: the accuracy along the stream; ``corruption`` is ``mixed`` for a batch of
    several corruptions); the hits stay on the device and are read back once per segment, like the counts.
    ``protocol`` (``Protocol``): online evaluation, the source model as reference, a long run's checkpoint.
    ``seed`` seeds torch's generator before the first batch. A method's own random state is drawn when the method
    is built (the generator of ROID's, DeYO's and AdaContrast's views, a randomly initialised head): call
    ``torch.manual_seed`` before building it too for a repeatable run (``tta.run`` does both with the stream's seed).
    """
    from tta.run.cost import PassCounter, cost_row, counted_cost, reset_peak_memory
    from tta.run.online import OnlineClock, check_protocol

    if reset not in RESET_POLICIES:
        raise ConfigError(f"unknown reset policy {reset!r}; choose one of: {', '.join(RESET_POLICIES)}")
    p = protocol or Protocol()
    check_protocol(p.protocol, p.stream_speed, p.cost)
    if p.cost == "timed" and p.protocol == "online" and p.reference is None:
        raise ConfigError("the timed cost compares each step with the source model's forward; pass the source model "
                          "as Protocol(reference=...) or use cost='counted'")
    if reset == "domain" and not getattr(stream, "resets_between_segments", True):
        reset = "never"
    dev = resolve_device(device)
    if seed is not None:
        torch.manual_seed(seed)
    adapted.to(dev)
    reference = p.reference.to(dev).eval() if p.reference is not None else None
    reset_peak_memory(dev)
    n_domains = len(stream.domains)
    last_segment = getattr(stream, "last_segments", None) or list(range(n_domains))
    from tta.monitor.tally import GuardTally  # --- guard columns

    t = _Tallies(n_domains, dev, GuardTally(adapted, n_domains, dev))
    clock = OnlineClock(p.protocol, p.stream_speed)
    common = {"method": adapted.name, "model": model_name, "data": stream.label, "seed": seed,
              "batch_size": getattr(stream, "batch_size", None), "reset": reset,
              "setting": getattr(stream, "setting", "per-domain"), "device": str(dev),
              "protocol": p.protocol, "stream_speed": p.stream_speed if p.protocol == "online" else None,
              "cost": p.cost if p.protocol == "online" else None, "stream_id": getattr(stream, "identity", None),
              **(metadata or {})}
    saver = None
    if p.checkpoint is not None:
        from tta.run.longrun import Checkpointer

        saver = Checkpointer(p.checkpoint, p.checkpoint_every)
        if saver.restore(adapted, t, clock, on_result, on_batches) and reset == "domain":
            adapted.reset()  # the checkpoint was taken as a new segment began, before its reset
    counter = PassCounter()

    def close_segment(segment: int | None, started: float, final: bool) -> None:
        _sync(dev)
        elapsed = time.perf_counter() - started
        if t.batch_hits and on_batches is not None:
            batch_rows = [_batch_row(common, info, hits) for info, hits in
                          zip(t.batch_info, torch.stack(t.batch_hits).tolist(), strict=True)]
            on_batches(batch_rows)
            if saver is not None:
                saver.record_batches(batch_rows)
            t.batch_hits.clear()
            t.batch_info.clear()
        now = t.counts.tolist()
        new = [now[d] - t.seen[d] for d in range(n_domains)]
        total_new = sum(new)
        for d in range(n_domains):
            if new[d]:
                t.seconds[d] += (elapsed - t.reference_pending) * new[d] / total_new
        t.reference_pending = 0.0
        t.seen[:] = now
        hits = ref_hits = None
        for d in range(n_domains):
            done = final or (segment is not None and last_segment[d] <= segment)
            if now[d] and d not in t.rows and done:
                hits = hits if hits is not None else t.correct.tolist()
                ref_hits = ref_hits if ref_hits is not None else t.ref_correct.tolist()
                row = {**_row(common, stream.domains[d], now[d], hits[d], t.seconds[d]), **t.guard.row(d),
                       **cost_row(t.forward[d], t.backward[d], now[d], t.method_seconds[d], t.reference_seconds[d],
                                  dev),
                       "batches": t.batches[d], "adapted_batches": t.adapted[d]}
                source = 100.0 * ref_hits[d] / now[d] if reference is not None else float("nan")
                row.update(source_accuracy=source,
                           collapse=bool(row["accuracy"] < source - 1.0) if reference is not None else None)
                t.rows[d] = row
                if on_result is not None:
                    on_result(row)
        if saver is not None and not final and segment is not None:
            saver.maybe_save(adapted, t, clock)

    segment: int | None = t.segment
    started = time.perf_counter()
    batches = stream.iter_from(t.position) if t.position and hasattr(stream, "iter_from") else iter(stream)
    with tqdm(total=len(stream), initial=t.position, desc=adapted.name, unit="batch", disable=not progress,
              leave=False) as bar:
        for index, batch in enumerate(batches, start=t.position):
            if batch.segment != segment:
                if segment is not None:
                    t.position, t.segment = index, batch.segment
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
            ids, sizes = batch.domain.unique(return_counts=True)  # batch.domain is still on the host here
            present = ids.tolist()
            share = dict(zip(present, sizes.tolist(), strict=True))
            if on_batches is not None:
                t.batch_info.append((index, batch.segment, [stream.domains[d] for d in present], len(batch.domain)))
            batch = batch.to(dev)
            n = len(batch.y)
            if adapted.guard is not None and adapted.guard.stream_batch is None:
                adapted.guard.calibrate_for_batch(adapted, n)  # one-time setup: outside the batch's time and counts
            ref_spent = 0.0
            if reference is not None:
                began = time.perf_counter()
                with torch.no_grad():
                    ref_hit = (reference(batch.x).argmax(1) == batch.y).long()
                _sync(dev)
                spent = time.perf_counter() - began
                t.reference_pending += spent
                ref_spent = spent
                t.ref_correct.index_add_(0, batch.domain, ref_hit)
                t.spread(t.reference_seconds, share, n, spent)
            adapts = clock.adapts()
            before = (counter.forward, counter.backward)
            began = time.perf_counter()
            t.guard.start()
            with counter.attached(adapted, adapted.num_classes):
                logits = adapted(batch.x, domain=batch.domain) if adapts else adapted.infer(batch.x, batch.domain)
            t.guard.add(batch.domain)
            hit = (logits.argmax(1) == batch.y).long()
            if reference is not None or p.cost == "timed":
                _sync(dev)
            spent = time.perf_counter() - began
            fwd, bwd = counter.forward - before[0], counter.backward - before[1]
            t.spread(t.method_seconds, share, n, spent)
            t.spread(t.forward, share, n, fwd)
            t.spread(t.backward, share, n, bwd)
            for d in present:
                t.batches[d] += 1
                t.adapted[d] += int(adapts)
            if adapts:
                timed = spent / ref_spent if ref_spent > 0 else 1.0
                clock.stepped(timed if p.cost == "timed" else counted_cost(fwd, bwd, n))
            if on_batches is not None:
                t.batch_hits.append(hit.sum())
            t.correct.index_add_(0, batch.domain, hit)
            t.counts.index_add_(0, batch.domain, torch.ones_like(hit))
            bar.update(1)
    close_segment(segment, started, final=True)
    if saver is not None:
        saver.finish()
    columns = [*COLUMNS, *[k for k in common if k not in COLUMNS]]
    return pd.DataFrame([t.rows[d] for d in sorted(t.rows)], columns=columns)


class _Tallies:
    """What the engine accumulates over a stream, per domain (and what a long run's checkpoint saves)."""

    def __init__(self, n_domains: int, dev: torch.device, guard: Any) -> None:
        self.correct = torch.zeros(n_domains, dtype=torch.long, device=dev)
        self.counts = torch.zeros(n_domains, dtype=torch.long, device=dev)
        self.ref_correct = torch.zeros(n_domains, dtype=torch.long, device=dev)
        self.seconds = [0.0] * n_domains
        self.method_seconds = [0.0] * n_domains
        self.reference_seconds = [0.0] * n_domains
        self.forward = [0.0] * n_domains
        self.backward = [0.0] * n_domains
        self.batches = [0] * n_domains
        self.adapted = [0] * n_domains
        self.seen = [0] * n_domains  # counts read back at the end of each segment
        self.rows: dict[int, dict[str, Any]] = {}
        self.guard = guard
        self.batch_hits: list[torch.Tensor] = []  # per batch of the current segment, on the device
        self.batch_info: list[tuple[int, int, list[Any], int]] = []  # (batch index, segment, its domains, size)
        self.reference_pending = 0.0  # reference time of the open segment, taken out of its wall time
        self.position = 0  # the next batch to run (a resumed run starts there)
        self.segment: int | None = None

    @staticmethod
    def spread(into: list[Any], share: dict[int, int], n: int, value: float) -> None:
        """Credit ``value`` of a batch of ``n`` images to its domains in proportion to their images."""
        for d, k in share.items():
            into[d] += value * k / n

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
