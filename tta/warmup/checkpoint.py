"""What a warm-up produces: the ``Warmup`` result, the checkpoint it writes, and reading an AFN one back.

``Warmup.save`` writes a self-describing checkpoint (``tta.models.saved``) that ``tta.load_model(checkpoint=FILE)``
and ``tta adapt --checkpoint FILE`` load without ``--arch``; an AFN one also still loads onto its base model with
``--afn-checkpoint`` (``apply_afn_checkpoint``). Nothing here trains: the ``afn`` method reads checkpoints without
importing the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta.errors import ConfigError, ModelError
from tta.io import save_torch
from tta.models.fingerprint import model_fingerprint
from tta.models.saved import FORMAT, VERSION

LEGACY_AFN_FORMAT = "tta.afn-warmup"  # AFN warm-ups written before the self-describing format; still readable


@dataclass
class Warmup:
    """A warmed-up converted model (eval mode, on the CPU) with what is needed to save and rebuild it.

    ``build`` says how to rebuild the base architecture (see ``tta.models.saved``); without it the checkpoint only
    loads onto its base model (``apply_afn_checkpoint``).
    """

    model: nn.Module
    method: str
    base_fingerprint: str
    settings: dict[str, Any]
    warmup: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    base: str = ""
    build: dict[str, Any] = field(default_factory=dict)

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint dict that ``save`` writes."""
        return {"format": FORMAT, "version": VERSION, "method": self.method, "build": dict(self.build),
                "settings": dict(self.settings), "base": self.base, "base_fingerprint": self.base_fingerprint,
                "warmup": dict(self.warmup), "history": list(self.history),
                "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically (``tta.io``); returns the path."""
        return save_torch(self.checkpoint(), path)


def load_afn_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an AFN warm-up checkpoint (written by ``Warmup.save``, or by earlier versions), checking that it is one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"AFN checkpoint {str(path)!r} does not exist; pass the file written by `tta warmup --out`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable files; all mean the same to the user
        raise ModelError(f"{str(path)!r} could not be read as a torch checkpoint ({type(err).__name__}); "
                         "pass the file written by `tta warmup --out`") from None
    legacy = isinstance(ckpt, dict) and ckpt.get("format") == LEGACY_AFN_FORMAT
    if not legacy and not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT and ckpt.get("method") == "afn"):
        raise ModelError(f"{str(path)!r} is not an AFN warm-up checkpoint; pass the file written by "
                         "`tta warmup --out` with --method afn")
    if ckpt.get("version") != VERSION:
        raise ModelError(f"{str(path)!r} has AFN checkpoint version {ckpt.get('version')}, this tta reads version "
                         f"{VERSION}; warm up again with this version")
    return ckpt


def apply_afn_checkpoint(
    model: nn.Module, path: str | Path, source_prior_n: float | None = None
) -> nn.Module:
    """Convert ``model`` (the pretrained base, in place) to AFN and load the warm-up in ``path`` into it.

    ``ModelError`` when ``model`` is not the base the checkpoint was warmed up on. ``source_prior_n`` is a
    test-time choice and is not stored in the checkpoint.
    """
    from tta.norm.afn import convert_to_afn

    ckpt = load_afn_checkpoint(path)
    if model_fingerprint(model) != ckpt["base_fingerprint"]:
        made_from = f" ({ckpt['base']})" if ckpt.get("base") else ""
        raise ModelError(f"AFN checkpoint {str(path)!r} was warmed up on a different model{made_from} than the one "
                         "given; load the same pretrained weights it was made from, or warm up again on this model")
    settings = ckpt["settings"]
    convert_to_afn(model, lambda_init=settings["lambda_init"], identity_init=settings["identity_init"],
                   source_prior_n=source_prior_n, p_drop=settings["p_drop"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model
