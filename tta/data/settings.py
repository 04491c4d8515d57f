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

- ``correlated``: as ``continual``, with each domain's samples in a label-shifted order (the reference benchmark's
  temporally correlated stream): sorted by class label when ``dirichlet`` is 0 (its default), else grouped into
  chunks whose class proportions are drawn from a Dirichlet(``dirichlet``) distribution (smaller = more skewed).
- ``mixed-correlated``: the mixed stream of each severity, then ordered by label as ``correlated``.

Batches never straddle two segments (nor two visits of ``gradual``); the last batch of a stretch may be smaller.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch

from tta.data.stream import Batch, Domain, DomainSource, Stream
from tta.errors import ConfigError

SETTINGS: tuple[str, ...] = ("per-domain", "continual", "mixed", "gradual", "correlated", "mixed-correlated")
# long streams, built around the settings above by the run (``tta.data.recurring``, ``tta.data.ccc``)
LONG_SETTINGS: tuple[str, ...] = ("recurring", "ccc")


def check_setting(setting: str) -> str:
    """``setting`` itself, or a ``ConfigError`` naming the valid settings."""
    if setting not in SETTINGS:
        raise ConfigError(f"unknown stream setting {setting!r}; choose one of: {', '.join(SETTINGS)}")
    return setting


class Ordering(TypedDict, total=False):
    """How a stream orders its samples: ``SettingStream``'s ``setting``, ``seed`` and ``dirichlet``."""

    setting: str
    seed: int
    dirichlet: float


@dataclass(frozen=True)
class Run:
    """A stretch of the stream batched on its own: per-sample domain ids and sample indices, in stream order."""

    segment: int
    domain: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


def _domain(corruption: str, severity: int | None) -> Domain:
    """A benchmark's domain, or (severity None) a domain of your own data named ``corruption``."""
    return Domain(corruption, severity) if severity is not None else Domain(name=corruption)


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
        dirichlet: float = 0.0,
    ) -> None:
        if not (isinstance(dirichlet, (int, float)) and math.isfinite(dirichlet) and dirichlet >= 0):
            raise ConfigError(f"dirichlet must be a finite number >= 0 (0 = sorted by label), got {dirichlet!r}")
        self.setting, self.seed, self.dirichlet = check_setting(setting), seed, float(dirichlet)
        if not corruptions or not severities:
            raise ConfigError("the stream has no domains; select at least one corruption and severity")
        if setting == "gradual":
            domains = [_domain(c, s) for c in corruptions for s in sorted(set(severities))]
        else:
            domains = [_domain(c, s) for s in severities for c in corruptions]
        super().__init__(source, domains, n_examples=n_examples, batch_size=batch_size)
        self.runs = self._plan(list(corruptions), list(severities))

    def _labels(self, d: int, index: np.ndarray) -> np.ndarray:
        """Labels of domain ``d``'s samples ``index`` (without reading images when the source can say)."""
        labels_of = getattr(self.source, "labels_of", None)
        if callable(labels_of):
            return np.asarray(labels_of(self.domains[d]))[index]
        return self.source.load(self.domains[d], index)[1].cpu().numpy()

    def _ids(self, domain: Domain) -> tuple[int, np.ndarray]:
        d = self.domains.index(domain)
        return d, np.arange(self.sizes[d])

    def _plan(self, corruptions: list[str], severities: list[int]) -> list[Run]:
        runs: list[Run] = []
        rng = np.random.default_rng(self.seed)
        if self.setting in ("per-domain", "continual", "correlated"):
            for d, n in enumerate(self.sizes):
                segment = d if self.setting == "per-domain" else d // len(corruptions)
                index = np.arange(n)
                if self.setting == "correlated":
                    index = index[correlated_order(self._labels(d, index), self.dirichlet, rng)]
                runs.append(Run(segment, np.full(n, d), index))
        elif self.setting in ("mixed", "mixed-correlated"):
            for s_i, s in enumerate(severities):
                pairs = [self._ids(_domain(c, s)) for c in corruptions]
                domain = np.concatenate([np.full(len(idx), d) for d, idx in pairs])
                index = np.concatenate([idx for _, idx in pairs])
                order = rng.permutation(len(index))
                domain, index = domain[order], index[order]
                if self.setting == "mixed-correlated":
                    labels = np.concatenate([self._labels(d, idx) for d, idx in pairs])[order]
                    order = correlated_order(labels, self.dirichlet, rng)
                    domain, index = domain[order], index[order]
                runs.append(Run(s_i, domain, index))
        else:  # gradual
            path = gradual_severities(severities)
            for c_i, c in enumerate(corruptions):
                seen: dict[int, int] = {}
                for s in path:
                    d, idx = self._ids(_domain(c, s))
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


def correlated_order(labels: np.ndarray, dirichlet: float, rng: np.random.Generator) -> np.ndarray:
    """A label-shifted order of ``labels`` (positions into it).

    ``dirichlet == 0``: sorted by label (stable). Otherwise, as the reference benchmark: the samples are dealt into
    as many chunks as there are classes, each class split across the chunks with proportions drawn from
    Dirichlet(``dirichlet``) (a chunk stops receiving once it holds its share N / chunks); draws are repeated until
    every chunk holds at least min(10, N // chunks) samples. The stream is then chunk after chunk, each chunk's
    classes in random order.
    """
    labels = np.asarray(labels)
    if dirichlet == 0 or len(labels) == 0:
        return np.argsort(labels, kind="stable")
    classes = np.unique(labels)
    chunks, n = len(classes), len(labels)
    need = min(10, n // chunks)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(chunks)]
        sizes = np.zeros(chunks, dtype=np.int64)
        for k in classes:
            idx = rng.permutation(np.flatnonzero(labels == k))
            p = rng.dirichlet(np.full(chunks, dirichlet)) * (sizes < n / chunks)
            p = p / p.sum() if p.sum() > 0 else np.full(chunks, 1 / chunks)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for j, piece in enumerate(np.split(idx, cuts)):
                parts[j].append(piece)
                sizes[j] += len(piece)
        if sizes.min() >= need:
            break
    else:
        raise ConfigError(f"could not draw a correlated order with dirichlet={dirichlet} for {n} samples; "
                          "use a larger value or 0 (sorted by label)")
    order = []
    for chunk in parts:
        for c in rng.permutation(len(chunk)):
            order.append(chunk[c])
    return np.concatenate(order)


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
