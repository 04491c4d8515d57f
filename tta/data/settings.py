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

from collections import OrderedDict
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


class WholeDomainCache:
    """Wraps a ``DomainSource`` whose reads are costly (corruptions generated on the fly): each domain is loaded
    whole on first use and the last ``capacity`` domains are kept, so interleaved streams load every domain once."""

    def __init__(self, source: DomainSource, capacity: int) -> None:
        self.source, self.capacity, self.label = source, max(capacity, 1), source.label
        self._cache: OrderedDict[Domain, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def size(self, domain: Domain) -> int:
        return self.source.size(domain)

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if domain in self._cache:
            self._cache.move_to_end(domain)
        else:
            self._cache[domain] = self.source.load(domain, np.arange(self.source.size(domain)))
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        x, y = self._cache[domain]
        return x[torch.as_tensor(index, device=x.device)], y[torch.as_tensor(index, device=y.device)]


def gather(
    source: DomainSource, domains: Sequence[Domain], domain: np.ndarray, index: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the samples (domain[i], index[i]) in that order: one ``load`` per domain (ascending), then scatter."""
    parts = []
    for d in np.unique(domain):
        positions = np.flatnonzero(domain == d)
        positions = positions[np.argsort(index[positions], kind="stable")]
        parts.append((positions, *source.load(domains[int(d)], index[positions])))
    if len(parts) == 1 and np.array_equal(parts[0][0], np.arange(len(index))):
        return parts[0][1], parts[0][2]  # one domain, already in order (per-domain streams): no copy
    x0, y0 = parts[0][1], parts[0][2]
    x_out = torch.empty((len(index), *x0.shape[1:]), dtype=x0.dtype, device=x0.device)
    y_out = torch.empty(len(index), dtype=y0.dtype, device=y0.device)
    for positions, x, y in parts:
        x_out[torch.as_tensor(positions, device=x_out.device)] = x
        y_out[torch.as_tensor(positions, device=y_out.device)] = y
    return x_out, y_out
