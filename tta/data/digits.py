"""A benchmark that needs no download: scikit-learn's bundled handwritten digits, corrupted by ``tta.corruptions``.

The 1,797 8x8 images (16 grey levels) that ship inside scikit-learn are upscaled to 32x32 RGB (bilinear,
grey copied to three channels) and split, seeded and class-balanced, into 1,297 training images (for the demo
classifier, ``tta.models.digits``) and 500 test images (50 per class). The test images are corrupted on the fly
with the CIFAR-10-C corruptions (``tta.data.generated``), so ``tta adapt --corruption digits`` runs the whole
pipeline (model, corruptions, adaptation, per-severity table and CSV) on any machine, offline, in about a minute.

Its tensors are tiny (32x32 images, a 23k-parameter CNN), so on a CPU it runs on one intra-op thread, set while
the stream is being iterated (and while the demo model trains) and restored afterwards: with more threads than
free cores the threads spin against each other (on a loaded 2-core machine the first run took 4 minutes with two
threads and 48 s with one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from tta.data.generated import corrupted_stream
from tta.data.settings import SettingStream
from tta.data.stream import Batch
from tta.errors import TTAError

TEST_PER_CLASS = 50
SPLIT_SEED = 0
SIZE = 32


def load_digits_split(train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 (N, 32, 32, 3)) and labels of the training (1,297) or test (500) split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise TTAError("the digits benchmark needs scikit-learn; install it with `pip install scikit-learn`") \
            from None
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    images = torch.nn.functional.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), TEST_PER_CLASS, replace=False)
                                   for c in range(10)]))
    rows = np.setdiff1d(np.arange(len(y)), test) if train else test
    return np.ascontiguousarray(x[rows]), y[rows]


@contextmanager
def one_thread(active: bool = True) -> Iterator[None]:
    """Run the body on one intra-op thread (when ``active``), restoring the previous count afterwards."""
    threads = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class DigitsStream(SettingStream):
    """A ``SettingStream`` whose consumers run on one intra-op thread when ``on_cpu`` (see the module docs)."""

    on_cpu = True

    def __iter__(self) -> Iterator[Batch]:
        with one_thread(self.on_cpu):
            yield from super().__iter__()


def digits_stream(
    corruptions: Sequence[str],
    severities: Sequence[int],
    n_examples: int | None = None,
    batch_size: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
    setting: str = "per-domain",
    shuffle_seed: int = 0,
    dirichlet: float = 0.0,
) -> DigitsStream:
    """The digits test split corrupted on the fly (seed ``seed``), ordered as ``setting``; see the module docs."""
    images, labels = load_digits_split(train=False)
    stream = corrupted_stream(images, labels, corruptions, severities, n_examples, batch_size, seed=seed,
                              device=device, setting=setting, shuffle_seed=shuffle_seed, stream_cls=DigitsStream,
                              dirichlet=dirichlet)
    stream.on_cpu = torch.device(device).type == "cpu"
    return stream
