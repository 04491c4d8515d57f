"""The columns of the results files: one neutral place that the engine, the writers and the report all read.

``COLUMNS``: one row per (run, domain), what ``tta adapt`` and ``tta sweep`` write; a domain is a corruption and
severity, plus a ``visit`` (recurring streams) or a ``window`` (long streams) where the stream has them.
``BATCH_COLUMNS``: one row per batch of a run, the accuracy along the stream (written when asked for).
"""

from __future__ import annotations

from typing import Any

_GUARD: list[str] = ["estimated_accuracy", "skipped", "rollbacks", "resets", "fallbacks"]  # tta.monitor.tally
# what files written before the evaluation columns hold; the report reads them with the newer columns empty
REQUIRED_COLUMNS: list[str] = [
    "method", "model", "corruption", "severity", "n", "accuracy", "error", "seconds", "images_per_second", "data",
    "seed", "batch_size", "reset", "setting", "device", "config_hash", *_GUARD,
]
COLUMNS: list[str] = [
    *REQUIRED_COLUMNS[:-len(_GUARD)],
    "visit", "window", "step",  # the domain's attributes where the stream has them
    # cost (tta.run.cost): counted passes per image and their cost relative to plain inference; timings
    "forward_passes", "backward_passes", "relative_cost", "reference_seconds", "time_relative_cost", "peak_memory_mb",
    # the protocol (tta.run.online) and the source model on the same images, in the same pass
    "protocol", "stream_speed", "cost", "batches", "adapted_batches", "source_accuracy", "collapse", "stream_id",
    *_GUARD,  # last, as before the evaluation columns
]
# the columns that are measurements of time or memory on this machine (they differ from run to run)
TIMED_COLUMNS: list[str] = ["seconds", "images_per_second", "reference_seconds", "time_relative_cost",
                            "peak_memory_mb"]
BATCH_COLUMNS: list[str] = [
    "method", "model", "setting", "seed", "data", "reset", "batch_size", "config_hash", "batch", "segment",
    "corruption", "severity", "n", "accuracy",
]


def domain_keys(df: Any) -> list[str]:
    """The columns of a results table that tell a run's rows apart: corruption and severity, and visit / window /
    step where the table has them."""
    return ["corruption", "severity", *(c for c in ("visit", "window", "step") if c in df and df[c].notna().any())]
