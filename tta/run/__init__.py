"""The run-and-report ring: a run's description (``spec``), its execution (``execute``), the batch loop
(``engine``) with its cost accounting (``cost``), online protocol (``online``) and long-run checkpoints
(``longrun``), the results files (``schema``, ``report``, ``plots``) and grids of runs (``sweep``).

The package itself is callable: ``tta.run(spec)`` is ``tta.run.execute.run(spec)``.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tta.run.execute import RunResult
    from tta.run.spec import RunSpec


class _CallablePackage(types.ModuleType):
    """``tta.run`` is both this package and the function that executes a spec."""

    def __call__(self, spec: RunSpec) -> RunResult:
        from tta.run.execute import run

        return run(spec)

    def __getattr__(self, name: str) -> Any:
        if name in ("run", "RunResult"):
            from tta.run import execute

            return getattr(execute, name)
        if name == "RunSpec":
            from tta.run.spec import RunSpec

            return RunSpec
        raise AttributeError(f"module 'tta.run' has no attribute {name!r}")


sys.modules[__name__].__class__ = _CallablePackage
