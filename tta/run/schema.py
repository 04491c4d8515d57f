"""The columns of the results files: one neutral place that the engine, the writers and the report all read.

``COLUMNS``: one row per (run, corruption, severity), what ``tta adapt`` and ``tta sweep`` write.
``BATCH_COLUMNS``: one row per batch of a run, the accuracy along the stream (written when asked for).
"""

from __future__ import annotations

COLUMNS: list[str] = [
    "method", "model", "corruption", "severity", "n", "accuracy", "error", "seconds", "images_per_second", "data",
    "seed", "batch_size", "reset", "setting", "device", "config_hash",
    "estimated_accuracy", "skipped", "rollbacks", "resets", "fallbacks",  # guard columns (tta.monitor.tally)
]
BATCH_COLUMNS: list[str] = [
    "method", "model", "setting", "seed", "data", "reset", "batch_size", "config_hash", "batch", "segment",
    "corruption", "severity", "n", "accuracy",
]
