"""Online assignment of images to domain contexts from their style descriptors, calibrated on clean source data.

Descriptors (``tta.context.descriptors``) are whitened with the statistics of clean source images' descriptors: each
dimension standardised, then projected on the top ``RANK`` principal directions of the source cloud, each divided
by its standard deviation, so the source images form an isotropic cloud of unit spread around 0 and distances are
Mahalanobis distances under the source covariance (this separates the generated corruptions far better than
per-dimension scaling alone: nearest-centroid accuracy 82 % against 69 % on ResNet-20, docs/methods/contexts.md). Domain
centres lie closer together than the spread of single images, so single images are rarely outliers, and domains
are found as *groups*. Distances are mean squared z-scores, D(a, b) = mean_j
(a_j - b_j)^2. Every threshold comes from the source images (``calibrate``), never from test data:

- *content removed*: an image's style also says what it shows (deeper layers more), and contexts that group images
  by class normalise the class away. Before whitening, the directions along which the mean descriptors of the
  classes the source model predicts for the calibration images spread more than under random relabellings
  (parallel analysis: the i-th direction against the ``quantile`` of the i-th of ``CONTENT_DRAWS`` relabellings)
  are projected out (``content_directions``; 9 of 9 on the CIFAR-10 ResNets, few or none where the classes
  outnumber what the calibration images can tell apart);
- *assignment*: soft responsibilities over the live contexts, softmax_k(log pi_k - 0.5 dof D(z, c_k) / typical),
  the Gaussian log-likelihood with the source's spread (``typical``: the source images' mean distance to their
  centre; ``dof``: the effective degrees of freedom of that distance, from a scaled chi-square fit of its mean and
  variance), pi_k proportional to the context's count plus ``min_spawn`` (the source context counts the
  calibration images);
- *create* (split): the last ``BUFFER`` descriptors are kept; each live context's members among them (by nearest
  centre) are split in two by 2-means fitted on half of them (``held_out_split``), the separation measured on the
  other half; the half further from the context's centre becomes a new context when that separation exceeds what
  the same procedure finds by chance in a cloud of as many source images (``split``: the ``quantile`` of
  ``SPLIT_DRAWS`` source resamples per size in ``SPLIT_SIZES``, interpolated in log size) and both halves hold at
  least ``min_spawn`` images; the context that was split keeps the other half, and both halves start from its
  statistics with half its evidence each (a split never throws statistics away). A target context's cloud need not
  be shaped like the source's: a corruption that stretches it along some direction gives 2-means halves far apart
  although it is one cloud, and the halves then often differ in content (smooth against textured images) rather than
  in domain. So the split of a target context must also be bimodal: along the direction between the two fitted
  means, the best split of the held-out half explains a larger share of its variance (``split_share``) than the
  ``quantile`` of Gaussian clouds of the same size (``bimodal``, from ``BIMODAL_DRAWS`` draws per size), a test that
  does not depend on the cloud's spread.
  A split whose held-out side holds fewer than ``MIN_SIDE`` held-out images isolates outliers, not a domain: it
  counts as no split, in the test and in its null alike (otherwise such rare splits of heavy-tailed source clouds
  set the null's upper quantile and the test misses domains that lie closer together than single images spread);
- *create* (source group test): the source context's centre is known exactly, so its members are also tested as a
  group: when their mean lies further from the source centre than the ``quantile`` of the means of as many source
  images (``offset``, from ``OFFSET_DRAWS`` source resamples per size), they are not source images, and those of
  them nearer their mean than the source centre found a new context (at the mean of those). This finds mild shifts
  (severity 3 corruptions) whose images sit close to the source one by one;
- *merge*: two contexts whose centres are closer than the ``1 - quantile`` quantile of those chance separations
  (``merge``, at the largest size) are one: the larger absorbs the smaller, and a target context that close to the
  source context is absorbed by it (which also undoes a chance split of source images);
- *forget*: with ``max_contexts`` in use, a new context replaces the least recently used target context among those
  that no longer hold any of the buffered descriptors; while every context still does, nothing is created (a
  context in use is never dropped to make room, which would restart its statistics batch after batch). The source
  context (0) is never forgotten, never moves and keeps the source statistics.

An image's assignment depends only on the state before its batch and on the image itself: the batch's other images
update the state (centres, buffer, new contexts) for later batches only. Everything runs on the CPU in float64, on
(N, D) descriptors brought over once per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

RANK = 64  # principal directions of the source descriptors kept by the whitening (fewer with few source images)
BUFFER = 1024  # recent descriptors the create/split test looks at; also the cap on a context's centre count
SPLIT_DRAWS = 32  # source resamples the null distribution of 2-means separations is drawn from, per size
SPLIT_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # cloud sizes the null is drawn at (interpolated in log size)
MIN_SIDE = 4  # held-out images a side of a 2-means split needs to count as a split (half the default min_spawn)
CONTENT_DRAWS = 32  # random relabellings the null of the class-mean spread is drawn from
OFFSET_DRAWS = 1000  # source resamples the null of a group mean's distance from the source centre is drawn from
BIMODAL_DRAWS = 1000  # Gaussian samples the null of a split's share of variance is drawn from, per size


def two_means(z: torch.Tensor, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-means of ``z`` (n, D), deterministic and robust to outliers (started from the two sides of the
    principal direction): (mean of half a, mean of half b, mask of half b)."""
    centred = z - z.mean(0)
    v = centred[centred.square().sum(1).argmax()].clone()
    for _ in range(20):  # power iteration for the principal direction
        v = centred.t() @ (centred @ v)
        v = v / v.norm().clamp_min(1e-12)
    second = centred @ v > 0
    a, b = z.mean(0), z.mean(0)
    for _ in range(iters):
        if bool(second.all()) or not bool(second.any()):
            break
        a, b = z[~second].mean(0), z[second].mean(0)
        second = (z - b).square().sum(1) < (z - a).square().sum(1)
    return a, b, second


def split_share(t: torch.Tensor) -> float:
    """The share of the variance of the values ``t`` (n,) that their best split in two explains: about 2/pi for a
    large Gaussian sample, whatever its spread, and close to 1 for two well separated groups."""
    t = torch.sort(t.double()).values
    n = len(t)
    total = float((t - t.mean()).square().sum())
    if n < 4 or total <= 0:
        return 0.0
    left = torch.cumsum(t, 0)[:-1]  # sums of the i smallest values, i = 1 .. n-1
    i = torch.arange(1, n, dtype=t.dtype)
    between = (left - i * t.sum() / n).square() * n / (i * (n - i))
    return float(between.max()) / total


def held_out_split(z: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Split ``z`` (n, D) in two: 2-means fitted on the even rows, the separation (mean squared gap) measured
    between the means of the odd rows on either side, so that it is not inflated by fitting noise (a cloud of one
    domain gives a small gap, two domains their distance). Returns (separation, mask of the second side over all
    rows, the direction between the two fitted means); the separation is 0 when a side holds fewer than
    ``MIN_SIDE`` odd rows (outliers, not a domain)."""
    a, b, _ = two_means(z[0::2])
    second = (z - b).square().sum(1) < (z - a).square().sum(1)
    odd = second[1::2]
    if min(int(odd.sum()), int((~odd).sum())) < MIN_SIDE:
        return 0.0, second, b - a
    held = z[1::2]
    return float((held[odd].mean(0) - held[~odd].mean(0)).square().mean()), second, b - a


def held_out_bimodality(z: torch.Tensor, direction: torch.Tensor) -> float:
    """``split_share`` of the odd rows of ``z`` (the half ``held_out_split`` did not fit on) along ``direction``: a
    cloud stretched along it is split far apart, but only two groups make it bimodal."""
    return split_share(z[1::2] @ direction)


def _interpolate(sizes: torch.Tensor, values: torch.Tensor, n: float) -> float:
    """``values`` tabulated at ``sizes``, linearly interpolated in log size at ``n`` (clamped to the table)."""
    x = torch.tensor(math.log(max(n, 1e-12)), dtype=torch.float64).clamp(sizes[0].log(), sizes[-1].log())
    i = int(torch.searchsorted(sizes.log(), x).clamp(1, len(sizes) - 1))
    lo, hi = sizes[i - 1].log(), sizes[i].log()
    t = (x - lo) / (hi - lo) if hi > lo else torch.zeros((), dtype=torch.float64)
    return float(values[i - 1] + t * (values[i] - values[i - 1]))


@dataclass(frozen=True)
class Calibration:
    """What the source images' descriptors say about in-domain spread (all in standardised units)."""

    mean: torch.Tensor  # (D,) source descriptor mean
    std: torch.Tensor  # (D,) source descriptor standard deviation
    projection: torch.Tensor  # (D, r) whitening projection of standardised descriptors
    typical: float  # the mean distance of a source image to the source centre
    dof: float  # effective degrees of freedom of that distance (scaled chi-square fit)
    split: torch.Tensor  # (2, S): cloud sizes and the 2-means separation above which such a cloud is not one
    merge: float  # centres closer than this are one domain
    offset: torch.Tensor  # (2, S): group sizes and how far from the source centre a source group's mean falls
    bimodal: torch.Tensor  # (2, S): cloud sizes and the split share above which a Gaussian cloud is not one
    images: int = 0  # how many source images the calibration saw (the source context's count)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (what ``torch.load(weights_only=True)`` reads back)."""
        return {"mean": self.mean, "std": self.std, "projection": self.projection, "split": self.split,
                "offset": self.offset, "bimodal": self.bimodal,
                "values": torch.tensor([self.typical, self.dof, self.merge, self.images], dtype=torch.float64)}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> Calibration:
        """The inverse of ``to_dict``."""
        typical, dof, merge, images = d["values"].tolist()
        return cls(d["mean"], d["std"], d["projection"], typical, dof, d["split"], merge, d["offset"], d["bimodal"],
                   int(images))


def content_directions(z: torch.Tensor, content: torch.Tensor, quantile: float, gen: torch.Generator) -> torch.Tensor:
    """(r, D) orthonormal directions of the centred descriptors ``z`` (n, D) along which the means of the
    ``content`` groups (n,) (the classes the model predicts) spread more than the ``quantile`` of what
    ``CONTENT_DRAWS`` random relabellings give: what tells the classes apart, not the domains (r may be 0)."""
    def weighted_means(labels: torch.Tensor) -> torch.Tensor:  # rows sqrt(n_g / n) m_g: their Gram is the scatter
        groups = torch.unique(labels, return_inverse=True)[1]
        counts = torch.bincount(groups).to(z.dtype)[:, None]
        means = torch.zeros(len(counts), z.shape[1], dtype=z.dtype).index_add_(0, groups, z) / counts
        return means * (counts / len(z)).sqrt()

    # the weighted means of centred descriptors sum to 0; at least one direction is always kept
    rank = min(len(torch.unique(content)) - 1, z.shape[1] - 1)
    if rank < 1:
        return z.new_zeros(0, z.shape[1])

    def spectrum(labels: torch.Tensor) -> torch.Tensor:  # the scatter's eigenvalues, largest first
        means = weighted_means(labels)
        return torch.linalg.eigvalsh(means @ means.t()).flip(0)[:rank]

    # parallel analysis: the i-th direction is content when its spread beats the i-th largest of random labellings
    null = torch.stack([spectrum(content[torch.randperm(len(z), generator=gen)]) for _ in range(CONTENT_DRAWS)])
    _, sv, vectors = torch.linalg.svd(weighted_means(content), full_matrices=False)
    beats = sv[:rank].square() > torch.quantile(null, quantile, dim=0)
    return vectors[: int(beats.long().cumprod(0).sum())]


def calibrate(source: torch.Tensor, quantile: float = 0.99, seed: int = 0, content: torch.Tensor | None = None
              ) -> Calibration:
    """A ``Calibration`` from the descriptors of clean source images (n, D), n >= 2; ``content`` (n,), the class
    the model predicts for each, removes the directions that tell those classes apart (see ``content_directions``)."""
    source = source.detach().cpu().double()
    if content is not None and content.shape != (len(source),):
        raise ValueError(f"content must hold one class per source descriptor ({len(source)}), got shape "
                         f"{tuple(content.shape)}")
    mean, std = source.mean(0), source.std(0).clamp_min(1e-6)
    z = (source - mean) / std
    z = z - z.mean(0)
    gen = torch.Generator().manual_seed(seed)
    if content is not None:  # the whitening directions below are then orthogonal to the content directions
        removed = content_directions(z, content.detach().cpu().long(), quantile, gen)
        z = z - (z @ removed.t()) @ removed
    _, sv, vt = torch.linalg.svd(z, full_matrices=False)
    rank = max(1, min(RANK, len(z) - 1, int((sv > sv[0] * 1e-6).sum())))
    projection = vt[:rank].t() / (sv[:rank] / math.sqrt(max(len(z) - 1, 1)))
    z = z @ projection
    dist = z.square().mean(1)
    typical, spread = float(dist.mean()), float(dist.var())
    dof = min(2 * typical**2 / max(spread, 1e-12), float(z.shape[1]))
    sizes = [n for n in SPLIT_SIZES if n <= 4 * len(z)]
    split = []
    for n in sizes:  # 2-means on a source-like cloud of n images: how far apart its halves fall by chance
        seps = [held_out_split(z[torch.randint(len(z), (n,), generator=gen)])[0] for _ in range(SPLIT_DRAWS)]
        null = torch.tensor([v for v in seps if v > 0] or [0.0], dtype=torch.float64)
        split.append(float(torch.quantile(null, quantile)))
    merge = float(torch.quantile(null, 1 - quantile))  # closer than chance separates one cloud (largest size)
    table = torch.tensor([sizes, split], dtype=torch.float64)
    offsets = []
    for n in sizes:  # the mean of n source images: how far from the source centre it falls by chance
        idx = torch.randint(len(z), (OFFSET_DRAWS, n), generator=gen)
        offsets.append(float(torch.quantile(z[idx].mean(1).square().mean(1), quantile)))
    offset = torch.tensor([sizes, offsets], dtype=torch.float64)
    shares = []
    for n in sizes:  # a Gaussian cloud of n images split as above: what share of variance its held-out half's split
        draws = [split_share(torch.randn(n // 2, generator=gen, dtype=torch.float64)) for _ in range(BIMODAL_DRAWS)]
        shares.append(float(torch.quantile(torch.tensor(draws, dtype=torch.float64), quantile)))  # explains by chance
    bimodal = torch.tensor([sizes, shares], dtype=torch.float64)
    return Calibration(mean.float(), std.float(), projection.float(), typical, dof, table, merge, offset, bimodal,
                       len(z))


class ContextAssigner(nn.Module):
    """The contexts' descriptor centres and the recent-descriptor buffer; ``assign`` routes, ``observe`` learns."""

    def __init__(self, calibration: Calibration, min_spawn: int = 8, max_contexts: int = 16) -> None:
        super().__init__()
        dim = calibration.projection.shape[1]
        self.dim, self.min_spawn, self.max_contexts = dim, min_spawn, max_contexts
        self.register_buffer("mean", calibration.mean.double().clone())
        self.register_buffer("std", calibration.std.double().clone())
        self.register_buffer("projection", calibration.projection.double().clone())
        self.register_buffer("thresholds", torch.tensor([calibration.typical, calibration.dof, calibration.merge],
                                                         dtype=torch.float64))
        self.register_buffer("split_table", calibration.split.double().clone())
        self.register_buffer("offset_table", calibration.offset.double().clone())
        self.register_buffer("bimodal_table", calibration.bimodal.double().clone())
        # context 0: the source, centre 0 in standardised units, never updated
        self.register_buffer("centre", torch.zeros(1, dim, dtype=torch.float64))
        # the source context counts the calibration images (its weight in the responsibilities)
        self.register_buffer("count", torch.full((1,), float(calibration.images), dtype=torch.float64))
        self.register_buffer("last_used", torch.zeros(1, dtype=torch.float64))
        self.register_buffer("batches", torch.zeros((), dtype=torch.float64))
        self.register_buffer("buffer", torch.zeros(0, dim, dtype=torch.float64))

    # ------------------------------------------------------------------------------------------ state
    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        return self  # the bookkeeping stays on the CPU in float64 whatever device or dtype the model moves to

    @property
    def num_contexts(self) -> int:
        """Context slots in use, the source (0) included."""
        return self.count.shape[0]

    def resize(self, k: int) -> None:
        """Grow (new slots free) or shrink to ``k`` context slots."""
        for name in ("centre", "count", "last_used"):
            t = getattr(self, name)
            if k <= t.shape[0]:
                setattr(self, name, t[:k].clone())
            else:
                setattr(self, name, torch.cat([t, torch.zeros(k - t.shape[0], *t.shape[1:], dtype=t.dtype)]))

    def resize_buffer(self, n: int) -> None:
        """Make room for a saved buffer of ``n`` descriptors (used when loading a state dict)."""
        self.buffer = torch.zeros(n, self.dim, dtype=torch.float64)

    def _clear(self, k: int) -> None:
        self.centre[k] = 0.0
        self.count[k] = 0.0
        self.last_used[k] = 0.0

    def live(self) -> torch.Tensor:
        """(K,) which slots hold a context (the source always does)."""
        live = self.count > 0
        live[0] = True
        return live

    # -------------------------------------------------------------------------------------- routing
    def standardise(self, d: torch.Tensor) -> torch.Tensor:
        """Descriptors (N, D) whitened in source units (N, r) (float64, CPU)."""
        return ((d.detach().to("cpu", torch.float64) - self.mean) / self.std) @ self.projection

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """(N, K) mean squared distances of standardised descriptors to each centre (inf for free slots)."""
        d = torch.cdist(z, self.centre).square() / self.dim
        return d.masked_fill(~self.live()[None], math.inf)

    def assign(self, d: torch.Tensor) -> torch.Tensor:
        """(N, K) responsibilities of raw descriptors ``d`` over the live contexts; changes nothing."""
        typical, dof = float(self.thresholds[0]), float(self.thresholds[1])
        log_pi = torch.log(self.count + float(self.min_spawn))
        ll = log_pi[None] - 0.5 * dof * self.distances(self.standardise(d)) / typical
        return ll.softmax(1)

    def observe(self, d: torch.Tensor, weights: torch.Tensor) -> list[tuple[str, int, int]]:
        """Learn from a batch routed by ``assign``: move the target contexts' centres, keep the descriptors, then
        create (split), merge and forget contexts. Returns the structural operations done, in order, for the layers
        to mirror: ``("grow", k, -1)`` (k slots in use), ``("clear", k, -1)`` (slot k starts afresh),
        ``("split", new, k)`` (context k was split: ``new`` starts from its statistics, both with half its evidence),
        ``("merge", dst, src)`` (src's statistics join dst's, src is cleared)."""
        z = self.standardise(d)
        self.batches += 1
        w = weights.double().clone()
        w[:, 0] = 0.0  # the source context never moves
        used = w.sum(0)
        self.last_used[used >= 1.0] = float(self.batches)
        n_b = used[:, None]
        mean_b = (w.t() @ z) / n_b.clamp_min(1e-12)
        n_a = self.count.clamp_max(BUFFER)[:, None]  # a bounded memory: centres follow a drifting domain
        moved = (n_a * self.centre + n_b * mean_b) / (n_a + n_b).clamp_min(1e-12)
        self.centre = torch.where(n_b > 0, moved, self.centre)
        self.count = self.count + used
        self.buffer = torch.cat([self.buffer, z])[-BUFFER:]
        return self._split() + self._merge()

    def split_threshold(self, n: int) -> float:
        """The calibrated 2-means separation for a cloud of ``n`` images (log-linear between calibrated sizes)."""
        return _interpolate(self.split_table[0], self.split_table[1], n)

    def bimodal_threshold(self, n: int) -> float:
        """The share of variance the split of a Gaussian cloud of ``n`` images explains by chance (its calibrated
        quantile, interpolated in log size)."""
        return _interpolate(self.bimodal_table[0], self.bimodal_table[1], n)

    def offset_threshold(self, n: int) -> float:
        """How far from the source centre the mean of ``n`` source images falls by chance (its calibrated quantile;
        log-log between calibrated sizes, as the distance falls as 1/n)."""
        sizes, values = self.offset_table
        return math.exp(_interpolate(sizes, values.clamp_min(1e-300).log(), n))

    def _split(self) -> list[tuple[str, int, int]]:
        ops: list[tuple[str, int, int]] = []
        nearest = self.distances(self.buffer).argmin(1)
        for k in torch.nonzero(self.live()).flatten().tolist():
            members = self.buffer[nearest == k]
            if len(members) < 2 * self.min_spawn:
                continue
            separation, second, direction = held_out_split(members)  # second: the images that found a new context
            size = int(second.sum())
            # a target context's cloud need not be shaped like the source's: stretched, it splits far apart without
            # being two groups, so its split must also be more bimodal than a Gaussian cloud's (tested last: only
            # splits that pass the rest pay for it)
            if min(size, len(members) - size) >= self.min_spawn and separation > self.split_threshold(len(members)) \
                    and (k == 0 or held_out_bimodality(members, direction) > self.bimodal_threshold(len(members))):
                a, b = members[~second].mean(0), members[second].mean(0)
                if float((a - self.centre[k]).square().sum()) > float((b - self.centre[k]).square().sum()):
                    second = ~second  # the half further from the context's centre
            elif k == 0 and self._off_source(members):
                # the source context's members are, as a group, not source images: those nearer their mean than
                # the source centre found a context of their own (the far half, as a split would)
                second = (members - members.mean(0)).square().sum(1) < members.square().sum(1)
                if int(second.sum()) < self.min_spawn:
                    continue
            else:
                continue
            free = self._free_slot(exclude=k)
            if free is None:
                continue
            slot, op = free
            ops += op
            self.centre[slot], self.count[slot] = members[second].mean(0), float(second.sum())
            self.last_used[slot] = float(self.batches)
            if k > 0:
                self.centre[k] = members[~second].mean(0)
                self.count[k] = float((~second).sum())
                ops.append(("split", slot, k))  # both halves start from its statistics, with half its evidence
        return ops

    def one_domain(self, d: torch.Tensor) -> bool:
        """Whether the batch of raw descriptors ``d`` (N, D) is one cloud: its held-out 2-means split separates it no
        further than the calibrated chance separation of as many source images (a batch too small to split counts
        as not one domain)."""
        z = self.standardise(d)
        if len(z) < 2 * self.min_spawn:
            return False
        return held_out_split(z)[0] <= self.split_threshold(len(z))

    def _off_source(self, members: torch.Tensor) -> bool:
        """Whether the mean of ``members`` sits further from the source centre than chance puts the mean of as many
        source images."""
        return float(members.mean(0).square().mean()) > self.offset_threshold(len(members))

    def _free_slot(self, exclude: int) -> tuple[int, list[tuple[str, int, int]]] | None:
        free = torch.nonzero(~self.live()).flatten()
        if len(free):
            return int(free[0]), [("clear", int(free[0]), -1)]
        if self.num_contexts < self.max_contexts:
            k = self.num_contexts
            self.resize(k + 1)
            return k, [("grow", k + 1, -1)]
        age = self.last_used.clone()
        age[0] = age[exclude] = math.inf
        recent = torch.bincount(self.distances(self.buffer).argmin(1), minlength=self.num_contexts)
        age[(recent > 0) | (self.last_used >= self.batches)] = math.inf  # still in the recent stream: kept
        if math.isinf(float(age.min())):
            return None
        k = int(age.argmin())  # forget the least recently used target context
        self._clear(k)
        return k, [("clear", k, -1)]

    def _merge(self) -> list[tuple[str, int, int]]:
        merge = float(self.thresholds[2])
        ops: list[tuple[str, int, int]] = []
        while True:
            live = torch.nonzero(self.live()).flatten()
            if len(live) < 2:
                return ops
            d = torch.cdist(self.centre[live], self.centre[live]).square() / self.dim
            d.fill_diagonal_(math.inf)
            i, j = divmod(int(d.argmin()), len(live))
            if float(d[i, j]) >= merge:
                return ops
            a, b = int(live[i]), int(live[j])
            dst, src = (a, b) if a == 0 or (b != 0 and self.count[a] >= self.count[b]) else (b, a)
            if dst != 0:
                total = self.count[dst] + self.count[src]
                self.centre[dst] = (self.count[dst] * self.centre[dst] + self.count[src] * self.centre[src]) / total
                self.count[dst] = total
                self.last_used[dst] = max(float(self.last_used[dst]), float(self.last_used[src]))
            self._clear(src)
            ops.append(("merge", dst, src))
