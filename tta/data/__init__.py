"""Datasets and streams of test batches."""

from tta.data.cifar_c import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS, SEVERITIES, cifar_c_stream
from tta.data.settings import SETTINGS, SettingStream
from tta.data.stream import Batch, Domain, DomainSource, Stream

__all__ = ["ALL_CORRUPTIONS", "BENCHMARK_CORRUPTIONS", "SETTINGS", "SEVERITIES", "Batch", "Domain", "DomainSource",
           "SettingStream", "Stream", "cifar_c_stream"]
