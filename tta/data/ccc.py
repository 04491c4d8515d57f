"""CCC-style long streams (after Press et al., "RDumb", NeurIPS 2023): two corruptions per image whose severities
walk so that the source model's accuracy stays near a target, generated on the fly from any clean set.

The stream is a sequence of *transitions* of ``speed`` images each. In transition t the old corruption ``a`` fades
out and a new one ``b`` fades in: their severities walk, in steps of 0.25 between 0 and 5, from (a at the severity
it had, b at 0) to (a at 0, b at the severity at which b alone is nearest the target), along the monotone path
(one severity moves per step) that keeps the source model's accuracy nearest the target (``baseline``: 40 easy,
20 medium, 0 hard) on average over the path; the path's points share the transition's images evenly. The new
corruption is drawn (seeded) from the others. Inside the path every image carries both corruptions, applied in
the fixed order of ``corruptions``, at severities interpolated between the tabulated ones
(``tta.corruptions.interpolate``).

A transition ends on the new corruption alone, so only corruptions that can bring the source model within
``TOLERANCE`` (5) points of the target on their own take part (``CCCStream.corruptions_used``; when fewer than
``MIN_CORRUPTIONS`` can, the nearest ones: a hard target on a small model), and the source model's accuracy stays
near the target at the transitions' ends as well as along their paths.

The path needs the source model's accuracy for every corruption pair and severity pair. ``Calibration`` measures
it on a small clean subset (``CALIBRATION_IMAGES`` images) on a coarse grid of severities (0, 1.25, 2.5, 3.75, 5
for each corruption of a pair: 25 points, of which the single-corruption ones are shared by all pairs) and
interpolates bilinearly to the 0.25 grid; a pair is measured when a transition first needs it and the table is
cached in a JSON file named after the model's fingerprint, the clean subset and the calibration settings, so later
runs on the same model reuse it.

Clean images are taken in a seeded permutation of the clean set, a fresh permutation each time the set is used up.
Everything about image ``g`` (its clean image, its corruptions' severities, the random draws of the corruptions,
seeded by the position of its group of images) follows from (clean set, model calibration, seed, baseline, speed,
batch size), so the stream is a pure function of these: ``identity`` is their hash, carried by every result row.
Nothing grows with the length (the path of one transition, one permutation of the clean set, the calibrated
pairs), and ``iter_from`` starts at any batch without generating the ones before it.

Results come per window of ``window`` images (``Domain(name="ccc-medium", window=w)``): the accuracy over time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tta.corruptions.interpolate import corrupt_at
from tta.corruptions.names import BENCHMARK_CORRUPTIONS, check_selection
from tta.data.stream import Batch, Domain
from tta.data.writer import to_uint8
from tta.errors import ConfigError

BASELINES: dict[int, str] = {40: "easy", 20: "medium", 0: "hard"}
STEP = 0.25
LEVELS = 21  # severities 0, 0.25, ..., 5
CALIBRATION_LEVELS: tuple[float, ...] = (0.0, 1.25, 2.5, 3.75, 5.0)
CALIBRATION_IMAGES = 200
TOLERANCE = 5.0  # points: a corruption joins the stream when, alone at some severity, it is this near the target
MIN_CORRUPTIONS = 4  # when fewer are that near (a hard target), the stream uses the nearest this many
FORMAT = "ccc/v1"

log = logging.getLogger(__name__)


def check_ccc(baseline: int, speed: int, batch_size: int, window: int) -> None:
    """A ``ConfigError`` naming the fix for settings a CCC-style stream cannot have."""
    if baseline not in BASELINES:
        raise ConfigError(f"baseline must be one of {', '.join(map(str, BASELINES))} (easy, medium, hard), "
                          f"got {baseline!r}")
    if speed < 1 or speed % batch_size:
        raise ConfigError(f"speed ({speed} images per transition) must be a positive multiple of the batch size "
                          f"({batch_size}); e.g. speed {max(batch_size, speed // batch_size * batch_size)}")
    if window < 1 or window % batch_size:
        raise ConfigError(f"the accuracy window ({window} images) must be a positive multiple of the batch size "
                          f"({batch_size})")


def _seed(*parts: Any) -> int:
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.dtype, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def apply_corruptions(x: torch.Tensor, pairs: Sequence[tuple[str, float]], order: Sequence[str],
                      seed: int) -> torch.Tensor:
    """Float images corrupted by each (corruption, severity) of ``pairs`` in the order of ``order``; the draws of
    each corruption come from a CPU generator seeded by (``seed``, corruption)."""
    for name, severity in sorted(pairs, key=lambda p: order.index(p[0])):
        if severity > 0:
            x = corrupt_at(x, name, severity, torch.Generator().manual_seed(_seed(seed, name)))
    return x


class Calibration:
    """The source model's accuracy per corruption pair and severity pair (see the module doc)."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, corruptions: Sequence[str],
                 cache: str | Path | None = None, batch_size: int = 200) -> None:
        from tta.models.fingerprint import model_fingerprint

        self.model, self.corruptions, self.batch_size = model, list(corruptions), batch_size
        self.images, self.labels = images, labels.to(images.device)
        self.key = hashlib.sha256(f"{FORMAT}|{model_fingerprint(model)}|{_digest(images.cpu().numpy())}|"
                                  f"{CALIBRATION_LEVELS}".encode()).hexdigest()[:24]
        self.path = Path(cache) / f"ccc-calibration-{self.key}.json" if cache is not None else None
        self.table: dict[str, float] = {}
        if self.path is not None and self.path.is_file():
            self.table = json.loads(self.path.read_text())
        self._grids: dict[tuple[str, str], np.ndarray] = {}

    def _accuracy(self, pairs: list[tuple[str, float]]) -> float:
        key = "|".join(f"{n}@{s:g}" for n, s in sorted(pairs, key=lambda p: self.corruptions.index(p[0])) if s > 0)
        if key not in self.table:
            was_training = self.model.training
            self.model.eval()
            hits = 0
            with torch.no_grad():
                for start in range(0, len(self.images), self.batch_size):
                    x = self.images[start:start + self.batch_size].float().div(255)
                    x = apply_corruptions(x, pairs, self.corruptions, _seed("calibration", key, start))
                    hits += int((self.model(x).argmax(1) == self.labels[start:start + self.batch_size]).sum())
            self.model.train(was_training)
            self.table[key] = 100.0 * hits / len(self.images)
            self._save()
        return self.table[key]

    def _save(self) -> None:
        if self.path is None:
            return
        from tta.io import write_text

        write_text(self.path, json.dumps(self.table, indent=0, sort_keys=True))

    def single(self, name: str) -> np.ndarray:
        """Accuracy (LEVELS) of corruption ``name`` alone at severities 0 to 5."""
        coarse = [self._accuracy([(name, s)]) for s in CALIBRATION_LEVELS]
        return np.interp(np.arange(LEVELS) * STEP, CALIBRATION_LEVELS, coarse)

    def grid(self, a: str, b: str) -> np.ndarray:
        """Accuracy (LEVELS x LEVELS) of the pair: rows the severity of ``a``, columns that of ``b`` (0 to 5)."""
        if (a, b) not in self._grids:
            coarse = np.array([[self._accuracy([(a, sa), (b, sb)]) for sb in CALIBRATION_LEVELS]
                               for sa in CALIBRATION_LEVELS])
            fine = np.arange(LEVELS) * STEP
            rows = np.array([np.interp(fine, CALIBRATION_LEVELS, r) for r in coarse])
            self._grids[(a, b)] = np.array([np.interp(fine, CALIBRATION_LEVELS, c) for c in rows.T]).T
        return self._grids[(a, b)]


def walk(grid: np.ndarray, start: int, end: int, target: float) -> list[tuple[int, int]]:
    """The monotone path on ``grid`` from (start, 0) to (0, end), one index moving by one per step (the first
    down, the second up), that minimises the summed |accuracy - target| over its points (dynamic programming)."""
    cost = np.abs(grid - target)
    best = np.full((start + 1, end + 1), np.inf)
    came = np.zeros((start + 1, end + 1), dtype=np.int8)  # 0: from i + 1 (a moved down), 1: from j - 1 (b up)
    for i in range(start, -1, -1):
        for j in range(end + 1):
            if i == start and j == 0:
                best[i, j] = cost[i, j]
                continue
            down = best[i + 1, j] if i < start else np.inf
            up = best[i, j - 1] if j > 0 else np.inf
            came[i, j] = 0 if down <= up else 1
            best[i, j] = min(down, up) + cost[i, j]
    path, (i, j) = [], (0, end)
    while True:
        path.append((i, j))
        if (i, j) == (start, 0):
            return path[::-1]
        i, j = (i + 1, j) if came[i, j] == 0 else (i, j - 1)


class CCCStream:
    """A CCC-style stream of ``length`` images (see the module doc); iterate it like any ``Stream``."""

    setting = "ccc"
    resets_between_segments = False

    def __init__(self, images: np.ndarray, labels: np.ndarray, model: nn.Module, *, length: int = 300_000,
                 baseline: int = 20, speed: int = 2000, batch_size: int = 200, window: int = 1000, seed: int = 0,
                 corruptions: Sequence[str] = BENCHMARK_CORRUPTIONS, device: str | torch.device = "cpu",
                 cache: str | Path | None = None) -> None:
        check_ccc(baseline, speed, batch_size, window)
        check_selection(list(corruptions), [1])
        if len(corruptions) < 2:
            raise ConfigError("a CCC-style stream needs at least two corruptions; select more with --corruptions")
        if length < 1:
            raise ConfigError(f"the stream's length must be >= 1 image, got {length}")
        self.device = torch.device(device)
        self.clean = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.length, self.baseline, self.speed, self.batch_size = length, baseline, speed, batch_size
        self.window, self.seed, self.corruptions = window, seed, list(corruptions)
        subset = np.random.default_rng(_seed(seed, "calibration")).permutation(len(images))[:CALIBRATION_IMAGES]
        subset.sort()
        self.calibration = Calibration(model, self.clean[torch.as_tensor(subset, device=self.device)],
                                       self.labels[torch.as_tensor(subset)], self.corruptions, cache, batch_size)
        self.corruptions_used = self._usable()
        name = f"ccc-{BASELINES[baseline]}"
        self.domains = [Domain(name=name, window=w) for w in range(-(-length // window))]
        self.label = f"ccc:{seed}"
        self.identity = hashlib.sha256(
            f"{FORMAT}|{_digest(np.asarray(images), np.asarray(labels))}|{self.calibration.key}|{seed}|{baseline}|"
            f"{speed}|{batch_size}|{','.join(self.corruptions)}".encode()).hexdigest()[:16]
        self.source = self  # check_num_classes reads one image through ``source.load``
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return -(-self.length // self.batch_size)

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean images of the stream's first positions (for checks that read one image)."""
        return self.clean[torch.as_tensor(index, device=self.device)], self.labels[torch.as_tensor(index)]

    def _usable(self) -> list[str]:
        """The corruptions that can bring the source model near the target alone (see the module doc)."""
        gap = {c: float(np.min(np.abs(self.calibration.single(c) - self.baseline))) for c in self.corruptions}
        near = [c for c in self.corruptions if gap[c] <= TOLERANCE]
        if not near:
            lowest = min(float(np.min(self.calibration.single(c))) for c in self.corruptions)
            log.warning("no corruption brings this model's accuracy within %g points of the %s target (%d %%): "
                        "alone they reach no lower than %.1f %% (a hard target asks for less than chance on few "
                        "classes), so the stream stays near the nearest reachable accuracy; check each window's "
                        "source_accuracy", TOLERANCE, BASELINES[self.baseline], self.baseline, lowest)
        if len(near) < min(MIN_CORRUPTIONS, len(self.corruptions)):
            nearest = sorted(self.corruptions, key=lambda c: gap[c])[:MIN_CORRUPTIONS]
            near = [c for c in self.corruptions if c in nearest]
        return near

    def _next_corruption(self, t: int, current: str) -> str:
        others = [c for c in self.corruptions_used if c != current]
        return others[int(np.random.default_rng(_seed(self.seed, "corruption", t)).integers(len(others)))]

    def transitions(self) -> Iterator[tuple[str, str, list[tuple[int, int]]]]:
        """Each transition's old corruption, new corruption and path of severity indices (0.25 each)."""
        target = float(self.baseline)
        first = self.corruptions_used[int(np.random.default_rng(_seed(self.seed, "corruption", 0))
                                          .integers(len(self.corruptions_used)))]
        solo = self.calibration.single(first)
        level, current = int(np.argmin(np.abs(solo - target))), first
        for t in range(1, -(-self.length // self.speed) + 1):
            new = self._next_corruption(t, current)
            grid = self.calibration.grid(current, new)
            end = int(np.argmin(np.abs(grid[0, :] - target)))
            yield current, new, walk(grid, level, end, target)
            current, level = new, end

    def _clean(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.labels)
        index = np.empty(stop - start, dtype=np.int64)
        for pos in range(start, stop):
            epoch = pos // n
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, np.random.default_rng(_seed(self.seed, "order", epoch)).permutation(n))
            index[pos - start] = self._order[1][pos % n]
        return self.clean[torch.as_tensor(index, device=self.device)], self.labels[torch.as_tensor(index)]

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, position: int) -> Iterator[Batch]:
        """The batches from batch ``position`` on (earlier transitions' paths are replayed, not generated)."""
        per = self.speed // self.batch_size
        for t, (old, new, path) in enumerate(self.transitions()):
            if (t + 1) * per <= position:
                continue
            points = np.asarray(path)[np.arange(self.speed) * len(path) // self.speed]
            for b in range(max(position - t * per, 0), per):
                start = t * self.speed + b * self.batch_size
                if start >= self.length:
                    return
                stop = min(start + self.batch_size, self.length)
                x, y = self._clean(start, stop)
                x = x.float().div_(255)
                local = points[start - t * self.speed: stop - t * self.speed]
                out = torch.empty_like(x)
                for first in np.flatnonzero(np.r_[True, np.any(local[1:] != local[:-1], axis=1)]):
                    same = np.all(local == local[first], axis=1)
                    rows = torch.as_tensor(np.flatnonzero(same), device=x.device)
                    i, j = local[first]
                    out[rows] = apply_corruptions(x[rows], [(old, i * STEP), (new, j * STEP)], self.corruptions,
                                                  _seed(self.seed, "images", start + int(first)))
                window = start // self.window
                yield Batch(to_uint8(out), y, torch.full((stop - start,), window, dtype=torch.long), segment=window)


def ccc_stream(clean: str, model: nn.Module, data_dir: str | Path = "data", *, download: bool = True,
               **options: Any) -> CCCStream:
    """A ``CCCStream`` over the clean set ``clean`` (a ``load_clean`` spec: cifar10, npz:PATH, folder:PATH, ...);
    the calibration is cached in ``data_dir``. ``options``: ``CCCStream``'s keywords."""
    from tta.data.clean import load_clean

    images, labels = load_clean(clean, data_dir, download)
    return CCCStream(images, labels, model, cache=data_dir, **options)
