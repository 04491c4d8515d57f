"""Minimal hand-written versions of each method's computation, one file per method, for benchmarks/throughput.py.

A module ``<method>.py`` (dashes as underscores) defines ``make(model, device, source) -> step`` where ``step(x)``
takes a float batch in [0, 1] on the device and returns the logits the method predicts, adapting as the method
does, with nothing else: no input checks, no reset logic, no rollback, no accounting. ``model`` is a private copy
the loop may change; ``source`` is ``(images, labels)`` of clean source data for the methods that need it.
"""
