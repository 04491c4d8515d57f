"""The order in which your own images reach the model, and a check that it does not follow their labels.

Image folders come class by class and many CSV or ``.npz`` files are sorted by label; adapting on such a stream
(every batch of one class) drives entropy-minimising methods such as Tent to predict that class only. So the
domains of ``folder:``, ``csv:`` and ``npz:`` data are shuffled with the run's seed by default (``order="shuffle"``;
each domain's permutation depends only on the seed and the domain's name, so the same seed gives the same stream,
bit for bit), and ``n_examples`` then takes a seeded random subset instead of the first classes. ``order="file"``
keeps the order of the files, explicitly; the ``correlated`` settings order a stream by label on purpose.

Whatever the order, ``check_order`` tests the labels in stream order and logs one warning line when they follow
each other more than chance allows: two z-scores against a uniformly random order of the same labels, the count
of neighbouring images with the same label (runs of one class) and the correlation between position and label
(a drift through the classes). A z-score above ``THRESHOLD`` (8 standard deviations) essentially never happens in
a shuffled stream, and a class-sorted stream of even a few dozen images far exceeds it.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence

import numpy as np

from tta.errors import ConfigError

ORDERS: tuple[str, ...] = ("shuffle", "file")
THRESHOLD = 8.0
MIN_IMAGES = 20  # below this a stream's order says little; no check
INTENDED = ("correlated", "mixed-correlated")  # settings whose label order is the point
log = logging.getLogger(__name__)


def check_order(order: str) -> str:
    """``order`` itself, or a ``ConfigError`` naming the valid orders."""
    if order not in ORDERS:
        raise ConfigError(f"unknown order {order!r}; choose shuffle (seeded, the default) or file (the files' order)")
    return order


def domain_permutation(n: int, seed: int, domain: str) -> np.ndarray:
    """The seeded order of a domain's ``n`` images: a function of ``seed`` and the domain's name only."""
    entropy = [int(seed) % 2**64, zlib.crc32(domain.encode())]
    return np.random.default_rng(np.random.SeedSequence(entropy)).permutation(n)


def same_neighbour_z(labels: np.ndarray) -> float:
    """z-score of the number of neighbouring positions with equal labels against a random order of ``labels``.

    Exact mean and variance over the permutations of the multiset: with ``p`` the chance that two given positions
    hold the same label, ``q`` that three do and ``r`` that two disjoint pairs each do, ``S`` (over ``N - 1`` pairs)
    has mean ``(N - 1) p`` and variance ``(N-1) p (1-p) + 2 (N-2) (q - p^2) + (N-2) (N-3) (r - p^2)``. The
    standard deviation is taken as at least 1 pair: with a tiny class (two images side by side) the exact one is so
    small that chance alone gives huge scores, and a handful of pairs never makes a stream collapse anyway.
    """
    n = len(labels)
    if n < 4:
        return 0.0
    counts = np.unique(labels, return_counts=True)[1].astype(np.float64)
    f2, f3, f4 = (counts * (counts - 1)).sum(), (counts * (counts - 1) * (counts - 2)).sum(), \
        (counts * (counts - 1) * (counts - 2) * (counts - 3)).sum()
    p = f2 / (n * (n - 1))
    q = f3 / (n * (n - 1) * (n - 2))
    r = (f4 + f2 * f2 - (counts * (counts - 1)) @ (counts * (counts - 1))) / (n * (n - 1) * (n - 2) * (n - 3))
    variance = (n - 1) * p * (1 - p) + 2 * (n - 2) * (q - p * p) + (n - 2) * (n - 3) * (r - p * p)
    same = float(np.count_nonzero(labels[1:] == labels[:-1]))
    return (same - (n - 1) * p) / np.sqrt(max(variance, 1.0))


def trend_z(labels: np.ndarray) -> float:
    """z-score of the correlation between position and label: ``r * sqrt(N - 1)``, whose variance over random
    orders is exactly 1 for any fixed labels."""
    n = len(labels)
    values = labels.astype(np.float64) - labels.mean()
    if n < 3 or not values.any():
        return 0.0
    position = np.arange(n, dtype=np.float64) - (n - 1) / 2
    r = float(position @ values / np.sqrt((position @ position) * (values @ values)))
    return abs(r) * np.sqrt(n - 1)


def order_score(labels: Sequence[int] | np.ndarray) -> float:
    """The larger of the two z-scores (see the module docs) of ``labels`` in stream order."""
    labels = np.asarray(labels)
    return max(same_neighbour_z(labels), trend_z(labels)) if len(labels) >= MIN_IMAGES else 0.0


def check_stream_order(stream: object, what: str) -> float:
    """Log one warning line when the labels of a ``SettingStream`` (``runs``, ``domains``, ``source.labels_of``)
    follow each other in stream order; returns the highest score over its stretches (0 for an intended order)."""
    if getattr(stream, "setting", None) in INTENDED:
        return 0.0
    source, domains = stream.source, stream.domains  # type: ignore[attr-defined]
    labels_of = {d: np.asarray(source.labels_of(domain)) for d, domain in enumerate(domains)}
    worst, where = 0.0, ""
    for run in stream.runs:  # type: ignore[attr-defined]
        labels = np.empty(len(run), dtype=np.int64)
        for d in np.unique(run.domain):
            mask = run.domain == d
            labels[mask] = labels_of[int(d)][run.index[mask]]
        score = order_score(labels)
        if score > worst:
            worst, where = score, ", ".join(sorted({domains[int(d)].name for d in np.unique(run.domain)}))
    if worst > THRESHOLD:
        log.warning("the images of %s reach the model in an order that follows their labels (domain %s: %.0f standard "
                    "deviations from a random order), which can make adaptation collapse; shuffle them (order "
                    "shuffle, the default) or use a correlated setting if this order is intended", what, where, worst)
    return worst
