"""tta: test-time adaptation for PyTorch.

>>> import tta
>>> adapted = tta.adapt(model, method="tent")   # any nn.Module with norm layers, inputs in [0, 1]
>>> logits = adapted(x)                          # predicts and adapts
>>> adapted.reset()                              # back to the source model
>>> result = tta.run(tta.RunSpec())              # what `tta adapt` does, described by one value

Names are imported on first use, so ``import tta`` (and ``tta --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

_EXPORTS: dict[str, str] = {
    "adapt": "tta.api",
    "load_adapted": "tta.api",
    "run_benchmark": "tta.api",
    "run": "tta",
    "RunSpec": "tta.run.spec",
    "RunResult": "tta.run.execute",
    "warmup_afn": "tta.warmup",
    "AdaptedModel": "tta.core.base",
    "StepOutput": "tta.core.base",
    "Requirements": "tta.core.requirements",
    "SourceData": "tta.source",
    "evaluate": "tta.run.engine",
    "load_model": "tta.models",
    "cifar_c_stream": "tta.data.cifar_c",
    "corrupt": "tta.corruptions",
    "corrupt_dataset": "tta.data.writer",
    "generated_stream": "tta.data.generated",
    "array_stream": "tta.data.arrays",
    "npz_stream": "tta.data.arrays",
    "folder_stream": "tta.data.images",
    "imagenet_c_stream": "tta.data.imagenet_c",
    "load_clean": "tta.data.clean",
    "Domain": "tta.data.stream",
    "Batch": "tta.data.stream",
    "Stream": "tta.data.stream",
    "list_methods": "tta.methods",
    "TTAError": "tta.errors",
    "ConfigError": "tta.errors",
    "DataError": "tta.errors",
    "DownloadError": "tta.errors",
    "InputError": "tta.errors",
    "ModelError": "tta.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name == "run":  # the package tta.run, callable: tta.run(spec) executes a RunSpec
        value = importlib.import_module("tta.run")
        globals()[name] = value
        return value
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tta' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
