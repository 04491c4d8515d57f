"""Compatibility shim for robustbench 1.1.1, imported lazily (only when a zoo model or a download is needed).

robustbench 1.1.1 (the newest PyPI release) does ``from autoattack import AutoAttack`` in ``robustbench.eval``,
which its ``__init__`` imports, but its dependency ``pyautoattack`` installs that package under the name
``pyautoattack``. We register ``pyautoattack`` (and its submodules) under the name ``autoattack`` before importing
robustbench. We never use AutoAttack ourselves; the alias only lets robustbench import. robustbench also imports
``pkg_resources``, which is why the project pins ``setuptools<81``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from types import ModuleType

from tta.errors import TTAError


def alias_autoattack() -> None:
    """Make ``import autoattack`` resolve to ``pyautoattack`` when only the latter is installed."""
    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return
    if importlib.util.find_spec("pyautoattack") is None:
        raise TTAError("robustbench needs the autoattack package; install it with `pip install pyautoattack`")
    package = importlib.import_module("pyautoattack")
    sys.modules["autoattack"] = package
    for name in ("autoattack", "state", "autopgd_base", "fab_pt", "square", "checks", "other_utils"):
        try:
            sys.modules[f"autoattack.{name}"] = importlib.import_module(f"pyautoattack.{name}")
        except ImportError:  # a later pyautoattack may drop a submodule robustbench does not need
            continue


def import_robustbench() -> ModuleType:
    """Import robustbench with the shim applied; a ``TTAError`` with the fix if it is not installed."""
    alias_autoattack()
    try:
        with warnings.catch_warnings():
            # robustbench's own imports warn about pkg_resources and torch.jit; nothing a user can act on.
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return importlib.import_module("robustbench")
    except ImportError as err:
        raise TTAError(f"robustbench could not be imported ({err}); install it with "
                       "`pip install robustbench==1.1.1 'setuptools<81'`") from None
