"""Checkpoints of long runs: a run killed at any moment resumes from its last checkpoint to exactly the rows of an
uninterrupted run (the timings aside).

A checkpoint is taken as a new segment of the stream begins (a window of a CCC-style stream, a visit of a
recurring one), at most every ``every`` seconds (0: at every segment). It holds the adapted model's whole state
(parameters, statistics, optimizer, declared state, counters, a guard's state), torch's random state, the engine's
tallies, the online protocol's clock and the position in the stream, and the rows (and per-batch rows) written so
far, which a resumed run writes again in place of whatever the killed run wrote after the checkpoint. It is written
atomically (a temporary file, then a rename), so a kill while writing leaves the previous one; a finished run
removes it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tta.io import save_torch

if TYPE_CHECKING:
    from tta.core.base import AdaptedModel
    from tta.run.online import OnlineClock

FORMAT = "tta.long-run-checkpoint"
_TALLY_TENSORS = ("correct", "counts", "ref_correct")
_TALLY_VALUES = ("seconds", "method_seconds", "reference_seconds", "forward", "backward", "batches", "adapted",
                 "seen", "rows", "position", "segment")


def checkpoint_path(out: str | Path, config_hash: str) -> Path:
    """Where a run writing ``out`` keeps its checkpoint: ``<stem>.<config hash>.ckpt``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{config_hash}.ckpt")


class Checkpointer:
    """Saves and restores a long run's state (see the module doc)."""

    def __init__(self, path: str | Path, every: float = 60.0) -> None:
        self.path = Path(path)
        self.every = every
        self.last = time.monotonic()
        self.batch_rows: list[dict[str, Any]] = []  # per-batch rows written so far, saved with the checkpoint

    def restore(self, adapted: AdaptedModel, tallies: Any, clock: OnlineClock,
                on_result: Callable[[dict[str, Any]], None] | None,
                on_batches: Callable[[list[dict[str, Any]]], None] | None) -> bool:
        """Load the checkpoint into the run (and write its rows again); False when there is none."""
        if not self.path.is_file():
            return False
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("format") != FORMAT:
            return False
        adapted.load_state_dict(state["model"])
        for name, value in state["counters"].items():
            setattr(adapted.counters, name, value)
        if adapted.guard is not None and state.get("guard") is not None:
            adapted.guard.load_state_dict(state["guard"])
        device = tallies.correct.device
        for name in _TALLY_TENSORS:
            getattr(tallies, name).copy_(state["tallies"][name].to(device))
        for name in _TALLY_VALUES:
            setattr(tallies, name, state["tallies"][name])
        guard = state["guard_tally"]
        tallies.guard.above.copy_(guard["above"].to(device))
        tallies.guard.estimated.copy_(guard["estimated"].to(device))
        tallies.guard.counts = guard["counts"]
        clock.pending = state["clock"]
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if on_result is not None:
            for d in sorted(tallies.rows):
                on_result(tallies.rows[d])
        self.batch_rows = state["batch_rows"]
        if on_batches is not None and self.batch_rows:
            on_batches(self.batch_rows)
        return True

    def record_batches(self, rows: list[dict[str, Any]]) -> None:
        """Keep the per-batch rows written, to write them again after a resume."""
        self.batch_rows.extend(rows)

    def maybe_save(self, adapted: AdaptedModel, tallies: Any, clock: OnlineClock) -> bool:
        """Save when ``every`` seconds have passed since the last save; returns whether it saved."""
        if time.monotonic() - self.last < self.every:
            return False
        self.save(adapted, tallies, clock)
        return True

    def save(self, adapted: AdaptedModel, tallies: Any, clock: OnlineClock) -> None:
        """Write the checkpoint atomically."""
        state = {
            "format": FORMAT, "model": adapted.state_dict(),
            "counters": dict(vars(adapted.counters)),
            "guard": adapted.guard.state_dict() if adapted.guard is not None else None,
            "tallies": {**{n: getattr(tallies, n).detach().cpu() for n in _TALLY_TENSORS},
                        **{n: copy.deepcopy(getattr(tallies, n)) for n in _TALLY_VALUES}},
            "guard_tally": {"above": tallies.guard.above.cpu(), "estimated": tallies.guard.estimated.cpu(),
                            "counts": copy.deepcopy(tallies.guard.counts)},
            "clock": clock.pending, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "batch_rows": self.batch_rows,
        }
        save_torch(state, self.path)
        self.last = time.monotonic()

    def finish(self) -> None:
        """The run is complete: its checkpoint is no longer needed."""
        self.path.unlink(missing_ok=True)
