"""Guards and monitors for deployed adaptation: label-free signals, an accuracy estimate, and safe actions.

>>> adapted = tta.adapt(model, "tent", guard="default", source_data="npz:held_out_clean.npz")
>>> adapted(x); adapted.guard.signals        # this batch's entropy, confidence, agreement, estimated accuracy
"""

from tta.monitor.calibrate import SourceStats, atc_threshold, calibrate
from tta.monitor.guard import PRESETS, Guard, GuardConfig, attach_guard, make_guard
from tta.monitor.signals import SIGNALS, MovingAverage, batch_signals

__all__ = ["PRESETS", "SIGNALS", "Guard", "GuardConfig", "MovingAverage", "SourceStats", "atc_threshold",
           "attach_guard", "batch_signals", "calibrate", "make_guard"]
