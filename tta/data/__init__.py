"""Datasets and streams of test batches."""

from tta.data.cifar_c import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS, SEVERITIES, cifar_c_stream
from tta.data.stream import Batch, Domain, DomainSource, Stream

__all__ = ["ALL_CORRUPTIONS", "BENCHMARK_CORRUPTIONS", "SEVERITIES", "Batch", "Domain", "DomainSource", "Stream",
           "cifar_c_stream"]
