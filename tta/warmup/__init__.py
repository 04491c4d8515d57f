"""Source warm-up of converted normalisation layers (see ``tta.warmup.train``)."""

from tta.warmup.train import (  # noqa: F401
    Warmup,
    _random_crop_flip,
    _write_resume,
    apply_afn_checkpoint,
    load_afn_checkpoint,
    load_source,
    model_fingerprint,
    run_warmup,
    warmup,
    warmup_afn,
)
