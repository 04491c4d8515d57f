"""Stream settings: the order in which the samples of several domains reach the model.

Every setting yields ``Batch``es whose samples carry their own domain id (an index into ``stream.domains``), so
results stay per (corruption, severity) however the domains are interleaved. ``Batch.segment`` numbers the
stretches between which the engine's ``domain`` reset policy resets the method; what a segment is depends on the
setting:

- ``per-domain`` (default): one corruption x severity at a time, in test order; a segment is one domain (the Tent
  protocol: reset per corruption x severity).
- ``continual``: the corruptions back to back at each severity; a segment is one severity, so the method is never
  reset between corruptions (reset between severities; run one severity, or ``reset="never"``, for one long stream).
- ``mixed``: all selected corruptions of a severity shuffled together (seeded), so one batch holds samples of
  several domains; a segment is one severity.
- ``gradual``: per corruption, the severities up then down (1, 2, 3, 4, 5, 4, 3, 2, 1 for all five) without reset;
  a segment is one corruption. A severity visited twice gets disjoint halves of its images, so every image is
  predicted exactly once and the per-(corruption, severity) accounting covers each image once.

Batches never straddle two segments (nor two visits of ``gradual``); the last batch of a stretch may be smaller.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tta.data.stream import Batch, Domain, DomainSource, Stream
from tta.errors import ConfigError

SETTINGS: tuple[str, ...] = ("per-domain", "continual", "mixed", "gradual")


def check_setting(setting: str) -> str:
    """``setting`` itself, or a ``ConfigError`` naming the valid settings."""
    if setting not in SETTINGS:
        raise ConfigError(f"unknown stream setting {setting!r}; choose one of: {', '.join(SETTINGS)}")
    return setting


@dataclass(frozen=True)
class Run:
    """A stretch of the stream batched on its own: per-sample domain ids and sample indices, in stream order."""

    segment: int
    domain: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


def gradual_severities(severities: Sequence[int]) -> list[int]:
    """The selected severities up, then down again: [1, 2, 3, 4, 5] -> [1, 2, 3, 4, 5, 4, 3, 2, 1]."""
    up = sorted(set(severities))
    return up + up[-2::-1]


class SettingStream(Stream):
    """A stream over ``corruptions`` x ``severities`` of ``source`` ordered as ``setting`` (see the module doc)."""

    def __init__(
        self,
        source: DomainSource,
        corruptions: Sequence[str],
        severities: Sequence[int],
        setting: str = "per-domain",
        n_examples: int | None = None,
        batch_size: int = 200,
        seed: int = 0,
    ) -> None:
        self.setting, self.seed = check_setting(setting), seed
        if not corruptions or not severities:
            raise ConfigError("the stream has no domains; select at least one corruption and severity")
        if setting == "gradual":
            domains = [Domain(c, s) for c in corruptions for s in sorted(set(severities))]
        else:
            domains = [Domain(c, s) for s in severities for c in corruptions]
        super().__init__(source, domains, n_examples=n_examples, batch_size=batch_size)
        self.runs = self._plan(list(corruptions), list(severities))

    def _ids(self, domain: Domain) -> tuple[int, np.ndarray]:
        d = self.domains.index(domain)
        return d, np.arange(self.sizes[d])

    def _plan(self, corruptions: list[str], severities: list[int]) -> list[Run]:
        runs: list[Run] = []
        if self.setting in ("per-domain", "continual"):
            for d, n in enumerate(self.sizes):
                segment = d if self.setting == "per-domain" else d // len(corruptions)
                runs.append(Run(segment, np.full(n, d), np.arange(n)))
        elif self.setting == "mixed":
            rng = np.random.default_rng(self.seed)
            for s_i, s in enumerate(severities):
                pairs = [self._ids(Domain(c, s)) for c in corruptions]
                domain = np.concatenate([np.full(len(idx), d) for d, idx in pairs])
                index = np.concatenate([idx for _, idx in pairs])
                order = rng.permutation(len(index))
                runs.append(Run(s_i, domain[order], index[order]))
        else:  # gradual
            path = gradual_severities(severities)
            for c_i, c in enumerate(corruptions):
                seen: dict[int, int] = {}
                for s in path:
                    d, idx = self._ids(Domain(c, s))
                    chunks = np.array_split(idx, path.count(s))  # disjoint images for each visit
                    part = chunks[seen.get(s, 0)]
                    seen[s] = seen.get(s, 0) + 1
                    if len(part):
                        runs.append(Run(c_i, np.full(len(part), d), part))
        return runs

    @property
    def last_segments(self) -> list[int]:
        """Per domain, the last segment it appears in: the engine reports a domain once that segment is over."""
        last = [0] * len(self.domains)
        for run in self.runs:
            for d in np.unique(run.domain):
                last[int(d)] = max(last[int(d)], run.segment)
        return last

    def __len__(self) -> int:
        return sum(-(-len(run) // self.batch_size) for run in self.runs)

    def __iter__(self) -> Iterator[Batch]:
        for run in self.runs:
            for start in range(0, len(run), self.batch_size):
                stop = start + self.batch_size
                domain, index = run.domain[start:stop], run.index[start:stop]
                x, y = gather(self.source, self.domains, domain, index)
                yield Batch(x, y, torch.as_tensor(domain, dtype=torch.long), segment=run.segment)


def gather(
    source: DomainSource, domains: Sequence[Domain], domain: np.ndarray, index: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the samples (domain[i], index[i]) in that order: one ``load`` per domain (ascending), then scatter."""
    unique = np.unique(domain)
    if len(unique) == 1:
        order = np.argsort(index, kind="stable")
        x, y = source.load(domains[int(unique[0])], index[order])
        if np.array_equal(order, np.arange(len(order))):
            return x, y
        inverse = torch.as_tensor(np.argsort(order))
        return x[inverse], y[inverse]
    x_out: torch.Tensor | None = None
    y_out = torch.empty(len(index), dtype=torch.long)
    for d in unique:
        positions = np.flatnonzero(domain == d)
        positions = positions[np.argsort(index[positions], kind="stable")]
        x, y = source.load(domains[int(d)], index[positions])
        if x_out is None:
            x_out = torch.empty((len(index), *x.shape[1:]), dtype=x.dtype)
        pos = torch.as_tensor(positions)
        x_out[pos] = x
        y_out[pos] = y
    assert x_out is not None  # internal invariant: at least one domain was loaded
    return x_out, y_out
