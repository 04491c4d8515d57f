"""Inference of domain contexts, and the routing of samples to them.

- ``descriptors``: an image's style (its feature statistics at the first BatchNorms of the frozen source model);
- ``assign``: the source-calibrated online assignment of descriptors to contexts (create, split, merge, forget);
- ``router``: which contexts each sample of a batch belongs to (by domain id, or inferred), written into the
  ``Routing`` that the per-context norm layers (``tta.norm.context_norm``) read;
- ``model``: a BN model made domain-aware (``convert_context_norm``) and the calibration of inference on it.

Dependencies point one way: ``tta.context`` uses ``tta.norm``'s layers; no norm layer imports ``tta.context``.
"""
