"""The online protocol: a stream that does not wait for a slow method (Alfarra et al., ICML 2024).

Offline (the default) every batch is adapted on. Online, the stream delivers batches at ``stream_speed`` (ETA)
times the speed of plain inference: after a batch on which the method's step cost ``k`` times plain inference, the
next ``ceil(ETA * k) - 1`` batches arrive while it is still busy and are predicted by the current model without
adaptation (``AdaptedModel.infer``); they count in the accuracy like any other batch.

``k`` is, with ``cost="counted"`` (the default), the step's counted cost: forward passes plus twice the backward
passes per image (``tta.run.cost``; deterministic, the same on every machine), and with ``cost="timed"`` the
step's measured time over the source model's forward on the same batch (this machine's speeds). A method without
an adaptation step costs one forward pass, so under the counted cost it never skips a batch; under either cost its
skipped batches are predicted as its step would predict them, so ``source``, ``adabn`` and ``lame`` give exactly
their offline numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tta.errors import ConfigError

PROTOCOLS: tuple[str, ...] = ("offline", "online")
COSTS: tuple[str, ...] = ("counted", "timed")
_EPS = 1e-9  # counted costs are ratios of integers: keep ceil(3.0000000001) at 3


def check_protocol(protocol: str, stream_speed: float, cost: str) -> None:
    """A ``ConfigError`` naming the fix for an unknown protocol or cost, or a stream speed that is not > 0."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    if cost not in COSTS:
        raise ConfigError(f"unknown cost {cost!r}; choose counted (passes) or timed (measured time)")
    if isinstance(stream_speed, bool) or not isinstance(stream_speed, (int, float)) or not (
            math.isfinite(stream_speed) and stream_speed > 0):
        raise ConfigError(f"stream speed must be a number > 0 (1: as fast as plain inference), got {stream_speed!r}")


def skipped_after(cost: float, stream_speed: float) -> int:
    """How many batches pass unadapted after a step that cost ``cost`` times plain inference: ceil(ETA k) - 1."""
    if not math.isfinite(cost) or cost <= 0:
        return 0
    return max(math.ceil(stream_speed * cost - _EPS) - 1, 0)


@dataclass
class OnlineClock:
    """Which batches a method adapts on: all of them offline; online, Alfarra's rule (see the module doc).

    ``pending`` (batches still to pass unadapted) is the clock's whole state, saved with a long run's checkpoint.
    """

    protocol: str = "offline"
    stream_speed: float = 1.0
    pending: int = 0

    def adapts(self) -> bool:
        """Whether the next batch is adapted on (else it is predicted without adaptation)."""
        if self.pending > 0:
            self.pending -= 1
            return False
        return True

    def stepped(self, cost: float) -> None:
        """Record that a step cost ``cost`` times plain inference."""
        if self.protocol == "online":
            self.pending = skipped_after(cost, self.stream_speed)
