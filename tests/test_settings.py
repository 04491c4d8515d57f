"""Stream settings: the sequence of (corruption, severity), segments and per-sample accounting of each setting."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from itertools import groupby
from pathlib import Path

import numpy as np
import pytest
import torch

from tta.data import SETTINGS, Domain, Stream, cifar_c_stream
from tta.data.settings import LONG_SETTINGS, SettingStream, gradual_severities
from tta.errors import ConfigError

CORRUPTIONS = ("gaussian_noise", "fog", "snow")


class CodedSource:
    """A domain source whose images spell out where they come from: channels (corruption, severity, index)."""

    label = "coded"

    def __init__(self, size: int = 10) -> None:
        self.n = size
        self.loads: list[tuple[Domain, list[int]]] = []

    def size(self, domain: Domain) -> int:
        return self.n

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        assert np.all(np.diff(index) > 0), "DomainSource.load is called with ascending indices"
        self.loads.append((domain, index.tolist()))
        x = torch.zeros(len(index), 3, 2, 2)
        x[:, 0] = CORRUPTIONS.index(domain.corruption)
        x[:, 1] = domain.severity
        x[:, 2] = torch.as_tensor(index, dtype=torch.float32)[:, None, None]
        return x, torch.as_tensor(index, dtype=torch.long) % 10


def samples(stream: Stream) -> list[tuple[Domain, int, int]]:
    """(domain, image index, segment) of every sample in stream order, checking that ids match the content."""
    out = []
    for batch in stream:
        for x, d, y in zip(batch.x, batch.domain, batch.y, strict=True):
            domain = stream.domains[int(d)]
            assert (CORRUPTIONS[int(x[0, 0, 0])], int(x[1, 0, 0])) == (domain.corruption, domain.severity)
            assert int(y) == int(x[2, 0, 0]) % 10
            out.append((domain, int(x[2, 0, 0]), batch.segment))
    return out


def runs_of(items: list[tuple[Domain, int, int]]) -> list[tuple[str, int]]:
    """The sequence of (corruption, severity) stretches in stream order."""
    return [(d.corruption, d.severity) for d, _ in groupby(items, key=lambda t: t[0])]


def make(setting: str, severities: tuple[int, ...] = (5, 3), size: int = 10, batch_size: int = 4,
         seed: int = 0) -> SettingStream:
    return SettingStream(CodedSource(size), CORRUPTIONS, severities, setting=setting, batch_size=batch_size, seed=seed)


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_image_is_predicted_exactly_once(setting: str) -> None:
    stream = make(setting)
    items = samples(stream)
    counts = Counter((d, i) for d, i, _ in items)
    assert set(counts.values()) == {1}
    assert set(counts) == {(d, i) for d in stream.domains for i in range(10)}
    assert len(list(stream)) == len(stream)


def test_per_domain_is_the_tent_protocol_and_matches_the_plain_stream() -> None:
    stream = make("per-domain")
    items = samples(stream)
    assert runs_of(items) == [(c, s) for s in (5, 3) for c in CORRUPTIONS]
    segments = [seg for _, _, seg in items]
    assert segments == [stream.domains.index(d) for d, _, _ in items]
    plain = Stream(CodedSource(10), stream.domains, batch_size=4)
    for a, b in zip(stream, plain, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.domain, b.domain) and a.segment == b.segment


def test_continual_runs_corruptions_back_to_back_without_reset_within_a_severity() -> None:
    items = samples(make("continual"))
    assert runs_of(items) == [(c, s) for s in (5, 3) for c in CORRUPTIONS]
    by_segment: dict[int, set[tuple[str, int]]] = {}
    for d, _, seg in items:
        by_segment.setdefault(seg, set()).add((d.corruption, d.severity))
    # One segment per severity, spanning every corruption: no reset between corruptions.
    assert by_segment == {0: {(c, 5) for c in CORRUPTIONS}, 1: {(c, 3) for c in CORRUPTIONS}}


def test_mixed_shuffles_all_corruptions_of_a_severity_into_each_batch() -> None:
    stream = make("mixed", size=20, batch_size=15)
    batches = list(stream)
    for batch in batches:
        severities = {stream.domains[int(d)].severity for d in batch.domain}
        assert len(severities) == 1  # batches never straddle two severities
        assert batch.segment == (0 if severities == {5} else 1)
    assert max(len(set(b.domain.tolist())) for b in batches) == len(CORRUPTIONS)
    # The first severity comes first, completely.
    items = samples(stream)
    assert [d.severity for d, _, _ in items] == [5] * 60 + [3] * 60


def test_mixed_is_seeded() -> None:
    def order(seed: int) -> list[tuple[Domain, int, int]]:
        return samples(make("mixed", seed=seed))

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_gradual_goes_up_and_down_per_corruption_on_disjoint_images() -> None:
    assert gradual_severities([5, 1, 3, 2, 4]) == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    stream = make("gradual", severities=(1, 2, 3, 4, 5), size=10, batch_size=3)
    items = samples(stream)
    expected = [(c, s) for c in CORRUPTIONS for s in (1, 2, 3, 4, 5, 4, 3, 2, 1)]
    assert runs_of(items) == expected
    for c_i, c in enumerate(CORRUPTIONS):
        assert {seg for d, _, seg in items if d.corruption == c} == {c_i}  # no reset within a corruption
    # Severity 2 is visited twice, each visit on its own half of the images; severity 5 once, on all of them.
    visits = [(k, [i for _, i, _ in g]) for k, g in groupby(items, key=lambda t: t[0])]
    sev2 = [idx for d, idx in visits if d == Domain("fog", 2)]
    assert sev2 == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [idx for d, idx in visits if d == Domain("fog", 5)] == [list(range(10))]


def test_batches_never_straddle_a_visit() -> None:
    stream = make("gradual", severities=(1, 2), size=5, batch_size=4)
    for batch in stream:
        assert len(set(batch.domain.tolist())) == 1


def test_unknown_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="per-domain, continual, mixed, gradual"):
        make("shuffled")


def test_cifar_c_stream_mixed_loads_the_right_images(fake_cifar_c: Callable[..., Path]) -> None:
    data = fake_cifar_c(("gaussian_noise", "fog"), per_severity=12)
    stream = cifar_c_stream(data_dir=data, corruptions=["gaussian_noise", "fog"], severities=[5, 2],
                            batch_size=8, download=False, setting="mixed", seed=3)
    arrays = {c: np.load(data / "CIFAR-10-C" / f"{c}.npy") for c in ("gaussian_noise", "fog")}
    labels = np.load(data / "CIFAR-10-C" / "labels.npy")
    seen: Counter[tuple[int, int]] = Counter()
    for batch in stream:
        for x, y, d in zip(batch.x, batch.y, batch.domain, strict=True):
            domain = stream.domains[int(d)]
            block = arrays[domain.corruption][(domain.severity - 1) * 12:domain.severity * 12]
            rows = np.flatnonzero((block == x.permute(1, 2, 0).numpy()).all(axis=(1, 2, 3)))
            assert len(rows) == 1 and labels[rows[0]] == int(y)
            seen[(int(d), int(rows[0]))] += 1
    assert len(seen) == 4 * 12 and set(seen.values()) == {1}


@pytest.mark.parametrize(("setting", "expected"), [
    ("per-domain", [0, 1, 2, 3, 4, 5]),
    ("continual", [0, 0, 0, 1, 1, 1]),
    ("mixed", [0, 0, 0, 1, 1, 1]),
    ("gradual", [0, 0, 1, 1, 2, 2]),  # domains are (corruption, severity) in corruption-major order here
])
def test_last_segments_tell_the_engine_when_a_domain_is_finished(setting: str, expected: list[int]) -> None:
    assert make(setting).last_segments == expected


# ----------------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def cli_args(tmp_path: Path, fake_cifar_c: Callable[..., Path]) -> list[str]:
    from tta.models import cifar_resnet

    data_dir = fake_cifar_c(("gaussian_noise", "fog"), per_severity=12)
    checkpoint = tmp_path / "r20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in cifar_resnet("resnet20").state_dict().items()}},
               checkpoint)
    return ["adapt", "--checkpoint", str(checkpoint), "--arch", "resnet20", "--data-dir", str(data_dir),
            "--corruptions", "gaussian_noise,fog", "--severities", "5,3", "--batch-size", "10", "--no-progress",
            "--device", "cpu"]


@pytest.mark.parametrize(("method", "setting", "contexts"), [
    ("context-norm", "mixed", "infer"), ("dsbn", "gradual", "oracle"), ("dsbn", "correlated", "infer"),
    ("context-norm", "continual", "infer"),
])
def test_cli_setting_and_contexts_reach_the_stream_and_method(
    cli_args: list[str], tmp_path: Path, method: str, setting: str, contexts: str | None
) -> None:
    import pandas as pd
    import yaml
    from click.testing import CliRunner

    from tta.cli import cli

    out = tmp_path / "r.csv"
    extra = ["--contexts", contexts] if contexts else []
    if contexts == "infer":  # inferred contexts calibrate on clean source images
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "src.npz", x=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, 16))
        extra += ["--source-data", f"npz:{tmp_path / 'src.npz'}"]
    result = CliRunner().invoke(cli, [*cli_args, "--method", method, "--setting", setting, *extra,
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out)
    # One row per (corruption, severity), every image predicted once (gradual visits 3, 5, 3: 6 + 6 images of 3).
    assert sorted(zip(df.corruption, df.severity, strict=True)) == [(c, s) for c in ("fog", "gaussian_noise")
                                                                    for s in (3, 5)]
    assert (df.n == 12).all() and (df.setting == setting).all()
    resolved = yaml.safe_load(out.with_suffix(".yaml").read_text())
    assert resolved["setting"] == setting
    if contexts:
        assert resolved["settings"]["contexts"] == contexts


def test_cli_contexts_is_refused_for_methods_without_contexts(cli_args: list[str], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tta.cli import adapt_command, cli

    result = CliRunner().invoke(cli, [*cli_args, "--method", "tent", "--contexts", "oracle",
                                      "--out", str(tmp_path / "r.csv")])
    assert result.exit_code != 0 and "--contexts only applies to methods that route samples by domain" in result.output
    choices = next(p for p in adapt_command.params if p.name == "setting").type.choices
    assert tuple(choices) == (*SETTINGS, *LONG_SETTINGS)  # the long streams are built around the others


def test_generated_mixed_stream_generates_each_domain_once_with_the_same_bytes(tmp_path: Path) -> None:
    from tta.data.generated import generated_stream

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "clean.npz", x=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
             y=rng.integers(0, 10, 20))
    kwargs = {"data_dir": tmp_path, "corruptions": ["contrast", "brightness"], "severities": [5, 2],
              "batch_size": 8, "source": f"npz:{tmp_path / 'clean.npz'}", "download": False}
    plain = {}
    for batch in generated_stream(**kwargs):
        d = int(batch.domain[0])
        plain[d] = torch.cat([plain[d], batch.x]) if d in plain else batch.x
    mixed = generated_stream(**kwargs, setting="mixed", shuffle_seed=4)
    inner = mixed.source.source
    calls: list[Domain] = []
    original = inner.load
    inner.load = lambda domain, index: calls.append(domain) or original(domain, index)
    seen: Counter[tuple[int, int]] = Counter()
    for batch in mixed:
        assert batch.x.dtype == torch.uint8
        for x, d in zip(batch.x, batch.domain, strict=True):
            rows = [i for i in range(20) if torch.equal(plain[int(d)][i], x)]
            assert rows  # the very bytes the per-domain stream gives
            seen[(int(d), rows[0])] += 1
    assert sum(seen.values()) == 4 * 20 and len(calls) == 4  # each domain generated once, whole


def test_correlated_is_continual_with_each_domain_sorted_by_label() -> None:
    stream = make("correlated", size=30, batch_size=7)
    items = samples(stream)
    assert runs_of(items) == [(c, s) for s in (5, 3) for c in CORRUPTIONS]
    for _, group in groupby(items, key=lambda t: t[0]):
        labels = [i % 10 for _, i, _ in group]
        assert labels == sorted(labels)  # dirichlet 0: the reference benchmark's default, sorted by class
    assert {seg for d, _, seg in items if d.severity == 5} == {0}  # no reset within a severity


def test_dirichlet_order_is_a_seeded_label_shifted_permutation() -> None:
    from tta.data.settings import correlated_order

    labels = np.random.default_rng(0).integers(0, 10, 2000)
    order = correlated_order(labels, 0.1, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(2000))
    assert np.array_equal(order, correlated_order(labels, 0.1, np.random.default_rng(1)))
    changes = int((np.diff(labels[order]) != 0).sum())
    shuffled = int((np.diff(labels) != 0).sum())
    assert changes < shuffled / 5  # long runs of one class, unlike an i.i.d. stream
    wide = correlated_order(labels, 1000.0, np.random.default_rng(1))
    assert int((np.diff(labels[wide]) != 0).sum()) > changes  # a flat Dirichlet mixes classes more


def test_mixed_correlated_mixes_domains_and_sorts_each_severity_by_label() -> None:
    stream = make("mixed-correlated", size=20, batch_size=6)
    items = samples(stream)
    for severity in (5, 3):
        part = [(d, i) for d, i, _ in items if d.severity == severity]
        labels = [i % 10 for _, i in part]
        assert labels == sorted(labels)
        assert len({d.corruption for d, _ in part[:20]}) > 1  # one class block holds several corruptions


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_bad_dirichlet_is_a_config_error(bad: float) -> None:
    with pytest.raises(ConfigError, match="dirichlet must be a finite number >= 0"):
        SettingStream(CodedSource(10), CORRUPTIONS, (5,), setting="correlated", dirichlet=bad)
