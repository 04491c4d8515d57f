"""The recurring setting: a continual stream visited again and again without reset (PeTTA's protocol, NeurIPS
2024: the 15 corruptions of CIFAR-10-C, one after the other, 20 times).

``RecurringStream(stream, visits)`` repeats any stream ``visits`` times. Its domains are the stream's domains once
per visit (``Domain.visit`` 1, 2, ...), so the results have one row per domain and visit: the error of visit 20
next to that of visit 1 is what the setting measures. The engine never resets it between segments (a segment is
one segment of the stream within one visit), whatever the reset policy asks for between domains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from tta.data.stream import Batch, Stream
from tta.errors import ConfigError

DEFAULT_VISITS = 20


class RecurringStream(Stream):
    """``stream`` repeated ``visits`` times (see the module doc); the images of every visit are the same."""

    setting = "recurring"
    resets_between_segments = False

    def __init__(self, stream: Stream, visits: int = DEFAULT_VISITS) -> None:
        if isinstance(visits, bool) or not isinstance(visits, int) or visits < 1:
            raise ConfigError(f"visits must be an integer >= 1, got {visits!r}")
        self.base, self.visits = stream, visits
        self.source, self.batch_size = stream.source, getattr(stream, "batch_size", None)
        self.domains = [dataclasses.replace(d, visit=v) for v in range(1, visits + 1) for d in stream.domains]
        last = getattr(stream, "last_segments", None) or list(range(len(stream.domains)))
        self._per_visit = max(last) + 1
        self.last_segments = [v * self._per_visit + s for v in range(visits) for s in last]
        self.sizes = list(stream.sizes) * visits

    @property
    def label(self) -> str:
        return self.base.label

    def __len__(self) -> int:
        return len(self.base) * self.visits

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, position: int) -> Iterator[Batch]:
        """The batches from batch ``position`` on (the batches of earlier visits are not loaded)."""
        per_visit, n = len(self.base), len(self.base.domains)
        for v in range(position // per_visit, self.visits):
            skip = position - v * per_visit if v == position // per_visit else 0
            for i, batch in enumerate(self.base):
                if i < skip:
                    continue
                yield Batch(batch.x, batch.y, batch.domain + v * n, v * self._per_visit + batch.segment)
