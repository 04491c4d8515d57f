"""The method core: the ``AdaptedModel`` framework, requirements, update rules, losses and parameter selection."""

from tta.core.base import AdaptedModel, Counters, StepOutput
from tta.core.requirements import Requirements

__all__ = ["AdaptedModel", "Counters", "Requirements", "StepOutput"]
