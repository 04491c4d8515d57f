"""Which images a run adapts on: a named benchmark (``--benchmark``) or your own data (``--data``).

Benchmarks: ``cifar10c`` and ``cifar100c`` (the published ``.npy`` files), ``imagenetc`` and ``imagenet3dcc``
(JPEG folders, ``tta.data.imagenet_c``) and ``digits`` (scikit-learn's bundled digits corrupted on the fly,
offline, ``tta.data.digits``). ``--data`` replaces the benchmark's images with yours: ``folder:PATH`` (an image
folder, ``PATH/<class>/`` or ``PATH/<domain>/<class>/``), ``csv:PATH`` or ``folder:FILE.csv`` (rows
``path,label[,domain]``) or ``npz:PATH`` (arrays ``x`` uint8 NHWC, ``y``, optionally ``domain``); the benchmark
then only picks the model family (default model, input size, number of classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from tta.data.stream import Stream
from tta.errors import ConfigError, DataError

if TYPE_CHECKING:
    from tta.run.spec import DataSpec, StreamSpec

# benchmark -> (default model, number of classes)
BENCHMARKS: dict[str, tuple[str, int]] = {
    "cifar10c": ("Standard", 10),
    "cifar100c": ("Standard", 100),
    "imagenetc": ("resnet50", 1000),
    "imagenet3dcc": ("resnet50", 1000),
    "digits": ("digits-cnn", 10),
}
DATA_KINDS = ("folder", "csv", "npz")


def check_benchmark(name: str) -> str:
    """``name`` itself, or a ``ConfigError`` naming the benchmarks."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown corruption benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    return name


def default_model(benchmark: str) -> str:
    """The model a benchmark runs when none is named: robustbench's ``Standard`` WRN-28-10 for CIFAR, torchvision's
    ResNet-50 for ImageNet, the demo CNN for digits."""
    return BENCHMARKS[check_benchmark(benchmark)][0]


def default_corruptions(benchmark: str) -> tuple[str, ...]:
    """The corruptions a benchmark runs by default (the 15 of CIFAR-10-C/ImageNet-C, or 3DCC's 12)."""
    if benchmark == "imagenet3dcc":
        from tta.data.imagenet_c import CORRUPTIONS_3DCC

        return CORRUPTIONS_3DCC
    from tta.data.cifar_c import BENCHMARK_CORRUPTIONS

    return BENCHMARK_CORRUPTIONS


def parse_data(spec: str) -> tuple[str, Path]:
    """``(kind, path)`` of a ``--data`` spec; ``folder:`` of a ``.csv`` file is ``csv``."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in DATA_KINDS or not path:
        raise ConfigError(f"--data {spec!r} is not one of folder:PATH, csv:PATH or npz:PATH")
    if kind == "folder" and path.lower().endswith(".csv"):
        kind = "csv"
    if not Path(path).exists():
        raise DataError(f"{path} does not exist; check the path given to --data {kind}:PATH")
    return kind, Path(path)


def data_stream(spec: str, benchmark: str, model: str | None, n_examples: int | None = None, batch_size: int = 200,
                setting: str = "per-domain", seed: int = 0, dirichlet: float = 0.0) -> Stream:
    """A stream over your own data (see the module docs); images are resized to ``model``'s input (for a CIFAR
    benchmark or a local checkpoint, ``model`` None: 32x32)."""
    from tta.data.arrays import npz_stream
    from tta.data.images import folder_stream
    from tta.models.preprocess import preprocess_for

    kind, path = parse_data(spec)
    if kind == "npz":
        return npz_stream(path, batch_size=batch_size, n_examples=n_examples, setting=setting, seed=seed,
                          dirichlet=dirichlet)
    return folder_stream(path, preprocess_for(model, benchmark), batch_size=batch_size, n_examples=n_examples,
                         setting=setting, seed=seed, dirichlet=dirichlet)


def check_selection_for(benchmark: str, corruptions: Sequence[str] | None, severities: Sequence[int] | None) -> None:
    """``ConfigError`` for corruption names the benchmark does not have or severities outside 1..5 (None: the
    benchmark's defaults); loads nothing."""
    from tta.data.cifar_c import SEVERITIES

    names = list(corruptions or default_corruptions(benchmark))
    levels = list(severities or SEVERITIES)
    if benchmark.startswith("imagenet"):
        from tta.data.imagenet_c import _check

        _check(benchmark, names, levels)
    else:
        from tta.corruptions.names import check_selection

        check_selection(names, levels)


def benchmark_stream(data: DataSpec, stream: StreamSpec, model: str | None = None,
                     device: str | torch.device = "cpu") -> Stream:
    """The stream of a named benchmark (``data.benchmark``), files read from ``data.data_dir`` or, with
    ``data.generate``, corrupted on the fly on ``device`` from the clean set with seed ``data.data_seed``, ordered
    as ``stream`` says. ``model`` (None for a local checkpoint) sets ImageNet's preprocessing; ImageNet-C/3DCC read
    the 5,000-image subset unless ``n_examples`` asks for more than 5,000 images per domain; ``digits`` is always
    corrupted on the fly."""
    from tta.data.cifar_c import SEVERITIES

    benchmark = check_benchmark(data.benchmark)
    corruptions = list(data.corruptions or default_corruptions(benchmark))
    severities = list(data.severities or SEVERITIES)
    ordering = {"setting": stream.setting, "dirichlet": stream.dirichlet}
    sizes = (data.n_examples, stream.batch_size)
    if benchmark == "digits":
        from tta.data.digits import digits_stream

        return digits_stream(corruptions, severities, *sizes, seed=data.data_seed, device=device,
                             shuffle_seed=stream.seed, **ordering)
    if data.generate:
        from tta.data.generated import generated_stream

        return generated_stream(benchmark, data.data_dir, corruptions, severities, *sizes, seed=data.data_seed,
                                device=device, source=data.clean, frost_images=data.frost_images,
                                download=data.download, shuffle_seed=stream.seed, **ordering)
    if benchmark.startswith("imagenet"):
        from tta.data.imagenet_c import SUBSET_SIZE, imagenet_c_stream
        from tta.models.preprocess import preprocess_for

        return imagenet_c_stream(benchmark, data.data_dir, corruptions, severities, *sizes,
                                 subset=data.n_examples is None or data.n_examples <= SUBSET_SIZE,
                                 preprocess=preprocess_for(model, benchmark), download=data.download,
                                 seed=stream.seed, **ordering)
    from tta.data.cifar_c import cifar_c_stream

    return cifar_c_stream(benchmark, data.data_dir, corruptions, severities, *sizes, download=data.download,
                          seed=stream.seed, **ordering)


def check_num_classes(stream: Stream, model: nn.Module, benchmark: str | None = None) -> None:
    """Check the model's outputs (one forward pass on the stream's first image) against the labels.

    A stream over your own data (``num_labels``) needs at least as many outputs as it has labels (``DataError``);
    a named benchmark needs exactly its number of classes (``ConfigError``: a CIFAR-10 model on CIFAR-100-C would
    otherwise give 1 % accuracy without a word).
    """
    needed = getattr(stream, "num_labels", None)
    expected = BENCHMARKS[benchmark][1] if needed is None and benchmark in BENCHMARKS else None
    if needed is None and expected is None:
        return
    x, _ = stream.source.load(stream.domains[0], torch.zeros(1, dtype=torch.long).numpy())
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    with torch.no_grad():
        outputs = model.eval()(x.to(device)).shape[-1]
    model.train(was_training)
    if needed is not None and needed > outputs:
        raise DataError(f"the data has labels up to {needed - 1} ({needed} classes) but the model predicts "
                        f"{outputs} classes; use a model trained on these classes, or relabel the data (class "
                        "sub-folders map to labels in sorted order, ImageNet wnids to their ImageNet index)")
    if expected is not None and outputs != expected:
        raise ConfigError(f"the model predicts {outputs} classes but {benchmark} has {expected}; use a model "
                          f"trained on {benchmark.removesuffix('c')} (e.g. a CIFAR-10 model for cifar10c)")
