"""On-the-fly corruption streams: the clean set corrupted batch by batch on the device, no CIFAR-10-C files needed.

``GeneratedSource`` is a ``DomainSource`` whose images are exactly the bytes ``tta corrupt`` would write with the
same seed (the same index-aligned chunks, truncated to uint8 like the files), so a generated stream gives the same
batches as the file-based stream over files written with that seed. Its ``label`` is ``generated:<seed>``, which
the report's ``data`` column carries, so generated numbers are never mistaken for numbers on the published files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict, Unpack

import numpy as np
import torch

from tta.corruptions import CHUNK, corrupt_indexed
from tta.data.cifar_c import BENCHMARK_CORRUPTIONS, SEVERITIES, check_selection, dataset_info
from tta.data.settings import SettingStream, WholeDomainCache, check_setting
from tta.data.stream import Domain, DomainSource
from tta.data.writer import to_uint8


class Ordering(TypedDict, total=False):
    """How a generated stream orders its samples: the ``setting`` (``tta.data.settings``), the seed that shuffles
    the mixed settings (``shuffle_seed``, a run's ``seed``) and the label-shift ``dirichlet``."""

    setting: str
    shuffle_seed: int
    dirichlet: float


# the clean test set each benchmark corrupts
CLEAN_SOURCES: dict[str, str] = {"cifar10c": "cifar10", "cifar100c": "cifar100"}


class GeneratedSource:
    """Corrupts ``images`` (uint8 (N, H, W, 3)) on ``device`` as they are requested; uint8 NCHW on the device."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        seed: int = 0,
        device: str | torch.device = "cpu",
        frost_images: str | Path | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.clean = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.seed, self.frost_images = seed, frost_images
        self.label = f"generated:{seed}"
        self._cache: dict[tuple[Domain, int], torch.Tensor] = {}

    def size(self, domain: Domain) -> int:
        return len(self.clean)

    def _chunk(self, domain: Domain, k: int) -> torch.Tensor:
        """Chunk ``k`` of a domain, corrupted; the last two chunks used are kept, as batches may straddle chunks."""
        key = (domain, k)
        if key not in self._cache:
            x = self.clean[k * CHUNK:(k + 1) * CHUNK].float().div_(255)
            out = corrupt_indexed(x, k * CHUNK, domain.corruption, domain.severity, self.seed, self.frost_images)
            self._cache[key] = to_uint8(out)
            while len(self._cache) > 2:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[key]

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        first, last = int(index[0]) // CHUNK, int(index[-1]) // CHUNK
        chunks = torch.cat([self._chunk(domain, k) for k in range(first, last + 1)])
        local = torch.as_tensor(index - first * CHUNK, device=self.device)
        return chunks[local], self.labels[torch.as_tensor(index)]


def generated_stream(
    dataset: str = "cifar10c",
    data_dir: str | Path = "data",
    corruptions: Sequence[str] = BENCHMARK_CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    n_examples: int | None = None,
    batch_size: int = 200,
    seed: int = 0,
    device: str | torch.device = "cpu",
    source: str | None = None,
    frost_images: str | Path | None = None,
    download: bool = True,
    **ordering: Unpack[Ordering],
) -> SettingStream:
    """The stream ``cifar_c_stream`` would give, generated from the clean set on the fly (see the module docs).

    ``source`` is a ``load_clean`` spec; by default the benchmark's own clean test set (``cifar10`` for
    ``cifar10c``), which needs only the clean archive in ``data_dir`` (downloaded there unless ``download`` is off).
    ``seed`` is the corruptions' seed (a run's ``data_seed``); ``ordering`` (``Ordering``: ``setting``,
    ``shuffle_seed``, ``dirichlet``) orders the stream as ``tta.data.settings`` describes (``shuffle_seed``, a
    run's ``seed``, shuffles ``mixed``); the interleaved settings generate each domain whole, once, and keep one
    severity's worth of domains in memory.
    """
    from tta.data.clean import load_clean

    dataset_info(dataset)
    check_setting(ordering.get("setting", "per-domain"))
    check_selection(corruptions, severities)
    images, labels = load_clean(source or CLEAN_SOURCES[dataset], data_dir, download)
    return corrupted_stream(images, labels, corruptions, severities, n_examples, batch_size, seed=seed, device=device,
                            frost_images=frost_images, **ordering)


def corrupted_stream(
    images: np.ndarray,
    labels: np.ndarray,
    corruptions: Sequence[str] = BENCHMARK_CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    n_examples: int | None = None,
    batch_size: int = 200,
    seed: int = 0,
    device: str | torch.device = "cpu",
    frost_images: str | Path | None = None,
    stream_cls: type[SettingStream] = SettingStream,
    **ordering: Unpack[Ordering],
) -> SettingStream:
    """A stream of ``images`` (uint8 (N, H, W, 3)) corrupted on the fly, as ``generated_stream`` describes
    (``stream_cls``: a ``SettingStream`` subclass to build)."""
    setting = check_setting(ordering.get("setting", "per-domain"))
    check_selection(corruptions, severities)
    if n_examples is not None:  # only the first n_examples of each domain are requested: keep their whole chunks
        keep = -(-n_examples // CHUNK) * CHUNK
        images, labels = images[:keep], labels[:keep]
    gen: DomainSource = GeneratedSource(images, labels, seed=seed, device=device, frost_images=frost_images)
    if setting not in ("per-domain", "continual"):
        # Their batches jump between domains, which would regenerate chunks again and again.
        gen = WholeDomainCache(gen, capacity=max(len(corruptions), len(set(severities))))
    return stream_cls(gen, corruptions, severities, setting=setting, n_examples=n_examples, batch_size=batch_size,
                      seed=ordering.get("shuffle_seed", 0), dirichlet=ordering.get("dirichlet", 0.0))
