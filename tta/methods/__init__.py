"""Built-in adaptation methods; importing this package registers them."""

from tta.methods import adabn, afn, context_norm, dsbn, source, tent  # noqa: F401
from tta.methods.base import AdaptedModel

__all__ = ["AdaptedModel"]
