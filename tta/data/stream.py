"""Streams of test batches: what the engine iterates.

A ``Stream`` knows its ``domains`` (one per corruption x severity of a benchmark, one per folder of your own data)
and yields ``Batch``es whose samples each carry a domain id (an index into ``domains``), so mixed-domain streams
keep per-domain accounting. ``segment`` numbers
the stretches between which the ``domain`` reset policy resets the method.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True, order=True)
class Domain:
    """One test condition: a ``name`` and the attributes a stream has (``corruption``, ``severity``, ``visit``,
    ``window``, ``step``; None where it has none). Results are grouped by the attributes present.

    ``Domain("fog", 5)`` is a benchmark's domain (corruption fog at severity 5, named ``fog``); ``Domain(name="day")``
    a folder of your own images.
    """

    corruption: str | None = None
    severity: int | None = None
    name: str = ""
    visit: int | None = None
    window: int | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            if self.corruption is None:
                from tta.errors import ConfigError

                raise ConfigError("a Domain needs a name or a corruption; pass Domain(name=...)")
            object.__setattr__(self, "name", self.corruption)

    @property
    def attributes(self) -> dict[str, str | int]:
        """The attributes this domain has (those that are not None)."""
        values = {"corruption": self.corruption, "severity": self.severity, "visit": self.visit,
                  "window": self.window, "step": self.step}
        return {k: v for k, v in values.items() if v is not None}

    def __str__(self) -> str:
        extra = [f"s{self.severity}" if self.severity is not None else ""]
        extra += [f"{k} {v}" for k, v in self.attributes.items() if k in ("visit", "window", "step")]
        return " ".join([self.name, *(e for e in extra if e)])


@dataclass
class Batch:
    """A batch of images (uint8 or float (N, C, H, W)), labels (N,), per-sample domain ids (N,) and its segment."""

    x: torch.Tensor
    y: torch.Tensor
    domain: torch.Tensor
    segment: int

    def to(self, device: torch.device) -> Batch:
        """Move to ``device`` in one transfer per tensor (uint8 travels, then becomes float in [0, 1] there)."""
        non_blocking = device.type == "cuda"
        x = self.x.to(device, non_blocking=non_blocking)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return Batch(x, self.y.to(device, non_blocking=non_blocking),
                     self.domain.to(device, non_blocking=non_blocking), self.segment)


class DomainSource(Protocol):
    """Where the images of each domain come from (files on disk, or a generator)."""

    label: str

    def size(self, domain: Domain) -> int:
        """How many images the domain has."""
        ...

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (uint8 or float, (n, C, H, W)) and int64 labels of the given sample indices (ascending)."""
        ...


class Stream:
    """Batches over ``domains`` from ``source``: the first ``n_examples`` of each domain, one domain at a time.

    Subclasses (or the ``setting`` of ``tta.data.settings``) may order samples differently; they only have to
    yield ``Batch``es with the right domain ids and segments.
    """

    def __init__(
        self, source: DomainSource, domains: Sequence[Domain], n_examples: int | None = None, batch_size: int = 200
    ) -> None:
        from tta.errors import ConfigError

        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if n_examples is not None and n_examples < 1:
            raise ConfigError(f"n_examples must be >= 1, got {n_examples}")
        if not domains:
            raise ConfigError("the stream has no domains; select at least one corruption and severity")
        self.source, self.domains, self.batch_size = source, list(domains), batch_size
        self.sizes = [min(source.size(d), n_examples) if n_examples else source.size(d) for d in self.domains]

    @property
    def label(self) -> str:
        """Where the data comes from, for the report's ``data`` column (``files`` or ``generated:<seed>``)."""
        return self.source.label

    def __len__(self) -> int:
        return sum(-(-n // self.batch_size) for n in self.sizes)

    def __iter__(self) -> Iterator[Batch]:
        for d, (domain, n) in enumerate(zip(self.domains, self.sizes, strict=True)):
            for start in range(0, n, self.batch_size):
                index = np.arange(start, min(start + self.batch_size, n))
                x, y = self.source.load(domain, index)
                yield Batch(x, y, torch.full((len(index),), d, dtype=torch.long), segment=d)
