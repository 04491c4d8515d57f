"""Domain-aware normalisation: DomainContextNorm / DSBN layers, the router's inference, and both methods."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tta.config import build_config, to_dict
from tta.context.model import ContextNormModel, convert_context_norm
from tta.core.base import AdaptedModel
from tta.data.settings import SETTINGS, SettingStream
from tta.errors import ConfigError, InputError, ModelError
from tta.methods import get_method
from tta.norm.context_norm import DomainContextNorm

ROOT = Path(__file__).resolve().parents[1]


def make(name: str, model: nn.Module, **overrides: object) -> AdaptedModel:
    cls = get_method(name)
    return cls(model, build_config(cls.Config, overrides))


def domain_batch(d: int, n: int, seed: int) -> torch.Tensor:
    """Images of synthetic domain ``d``: 0 low contrast, 1 noisy, 2 bright; distinct first-layer statistics."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 16, 16, generator=g)
    if d == 0:
        return 0.45 + 0.1 * base
    if d == 1:
        return (base + 0.8 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 1)
    return 0.6 + 0.4 * base


def mixed_batch(seed: int, sizes: tuple[int, ...] = (7, 9, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    xs = [domain_batch(d, n, seed * 10 + d) for d, n in enumerate(sizes)]
    ids = torch.cat([torch.full((n,), d) for d, n in enumerate(sizes)])
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return torch.cat(xs)[perm], ids[perm]


def layers(adapted: AdaptedModel) -> list[DomainContextNorm]:
    assert isinstance(adapted.model, ContextNormModel)
    return adapted.model.layers()


# ------------------------------------------------------------------------------ per-domain statistics on a mixed batch
@pytest.mark.parametrize(("name", "overrides", "adabn"), [
    ("context-norm", {"prior_n": 0.0}, {"mode": "cumulative"}),
    ("context-norm", {"prior_n": 16.0}, {"mode": "cumulative_prior", "prior_n": 16.0}),
    ("context-norm", {"stats_update": "ema"}, {"mode": "ema"}),
    ("dsbn", {}, {"mode": "cumulative"}),
    ("dsbn", {"stats_update": "ema", "stats_rate": 0.3}, {"mode": "ema", "stats_rate": 0.3}),
])
def test_one_context_equals_adabn(bn_model: nn.Module, name: str, overrides: dict, adabn: dict) -> None:
    ours, reference = make(name, bn_model, **overrides), make("adabn", bn_model, **adabn)
    for step in range(4):
        x = domain_batch(step % 3, 12, step)
        torch.testing.assert_close(ours(x, domain=5), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["context-norm", "dsbn"])
def test_per_sample_routing_is_invariant_to_batch_order(bn_model: nn.Module, name: str) -> None:
    a, b = make(name, bn_model), make(name, bn_model)
    for seed in range(3):
        x, ids = mixed_batch(seed)
        perm = torch.randperm(len(ids))
        out_a, out_b = a(x, domain=ids), b(x[perm], domain=ids[perm])
        torch.testing.assert_close(out_b, out_a[perm], atol=1e-5, rtol=1e-5)


def test_mixed_batch_equals_each_domain_adapted_alone(bn_model: nn.Module) -> None:
    mixed = make("context-norm", bn_model)
    alone = {d: make("context-norm", bn_model) for d in range(3)}
    for seed in range(3):
        x, ids = mixed_batch(seed)
        out = mixed(x, domain=ids)
        for d, adapted in alone.items():
            torch.testing.assert_close(out[ids == d], adapted(x[ids == d], domain=d), atol=1e-5, rtol=1e-5)


def test_mixing_domains_is_what_hurts_adabn(bn_model: nn.Module) -> None:
    # The point of the method: pooled statistics (adabn) differ from per-domain ones on a mixed batch.
    x, ids = mixed_batch(0)
    pooled = make("adabn", bn_model, mode="cumulative")(x)
    per_domain = make("context-norm", bn_model, prior_n=0.0)(x, domain=ids)
    assert (pooled - per_domain).abs().max() > 1e-2


# ------------------------------------------------------------------------------------- branches and reset
def test_branches_are_created_on_first_sight_from_the_source_bn(bn_model: nn.Module) -> None:
    adapted = make("dsbn", bn_model)
    source_bns = [m for m in bn_model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert all(layer.num_contexts == 1 for layer in layers(adapted))
    adapted(domain_batch(0, 6, 0), domain=3)  # the first id seen -> context 1, whatever its value
    adapted(domain_batch(1, 4, 1), domain=10**12)  # a huge id is just the next context: no memory for its value
    for layer, bn in zip(layers(adapted), source_bns, strict=True):
        assert layer.num_contexts == 3 and len(layer.ctx_weight) == 3
        for k in range(3):
            torch.testing.assert_close(layer.ctx_weight[k].data, bn.weight.data)
            torch.testing.assert_close(layer.ctx_bias[k].data, bn.bias.data)
        # the source context still holds the source statistics and no count
        torch.testing.assert_close(layer.ctx_mean[0].float(), bn.running_mean)
        torch.testing.assert_close(layer.ctx_var[0].float(), bn.running_var)
        assert float(layer.ctx_images[0]) == 0.0
        assert [float(layer.ctx_images[k]) for k in (1, 2)] == [6.0, 4.0]
        assert not torch.allclose(layer.ctx_mean[1].float(), bn.running_mean)


def test_declared_contexts_exist_up_front_and_survive_reset(bn_model: nn.Module) -> None:
    adapted = make("context-norm", bn_model, declared_contexts=2)
    before = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    assert all(layer.num_contexts == 3 for layer in layers(adapted))
    adapted(domain_batch(0, 8, 0), domain=torch.arange(8) % 5)
    assert all(layer.num_contexts == 6 for layer in layers(adapted))
    adapted.reset()
    assert all(layer.num_contexts == 3 for layer in layers(adapted))
    after = adapted.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_context_zero_is_the_source_model(bn_model: nn.Module) -> None:
    adapted = make("context-norm", bn_model, fallback="source")  # calls without ids: the source context
    for seed in range(3):
        x = domain_batch(seed % 3, 10, seed)
        torch.testing.assert_close(adapted(x), bn_model(x), atol=1e-5, rtol=1e-5)
    assert adapted.model.router.num_contexts == 1


def test_small_subsets_use_the_branch_running_statistics(bn_model: nn.Module) -> None:
    adapted = make("context-norm", bn_model, min_subset=2)
    x, ids = domain_batch(1, 9, 0), torch.tensor([0] * 8 + [1])
    out = adapted(x, domain=ids)
    # The lone sample of a fresh context is normalised with its (source-initialised) running statistics.
    torch.testing.assert_close(out[8:], bn_model(x[8:]), atol=1e-5, rtol=1e-5)
    assert all(float(layer.ctx_images[2]) == 0.0 for layer in layers(adapted))


def test_grown_state_dict_loads_into_a_fresh_adapted_model(bn_model: nn.Module) -> None:
    adapted = make("context-norm", bn_model)
    x, ids = mixed_batch(0)
    adapted(x, domain=ids)
    fresh = make("context-norm", bn_model)
    fresh.load_state_dict(adapted.state_dict())
    x2, ids2 = mixed_batch(1)
    torch.testing.assert_close(fresh(x2, domain=ids2), adapted(x2, domain=ids2))


# ------------------------------------------------------------------------------- contexts: oracle / infer
def source_images(n: int = 64, seed: int = 99) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean "source" images of the synthetic benchmark: uniform noise, unlike every test domain."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def infer(name: str, model: nn.Module, window: int = 0, **overrides: object) -> AdaptedModel:
    cls = get_method(name)
    return cls(model, build_config(cls.Config, {"contexts": "infer", "min_spawn": 8, **overrides}),
               source_data=source_images(), window=window)


def test_oracle_calls_without_ids_go_to_the_fallback(bn_model: nn.Module) -> None:
    x = domain_batch(0, 4, 0)
    torch.testing.assert_close(make("context-norm", bn_model, fallback="source")(x), bn_model(x), atol=1e-5, rtol=0)
    cls = get_method("context-norm")
    inferring = cls(bn_model, build_config(cls.Config, {"fallback": "infer", "min_spawn": 4}),
                    source_data=source_images())
    for seed in range(2):
        inferring(domain_batch(0, 8, seed))
    assert inferring.model.router.num_contexts == 2  # the source and one inferred context
    with pytest.raises(InputError, match="one id per image"):
        inferring(x, domain=torch.tensor([0, 1]))


@pytest.mark.parametrize("overrides", [{"contexts": "infer"}, {"fallback": "infer"}])
def test_inference_without_source_data_is_a_config_error(bn_model: nn.Module, overrides: dict) -> None:
    with pytest.raises(ConfigError, match="source data"):
        make("dsbn", bn_model, **overrides)


def test_infer_never_looks_at_the_ids(bn_model: nn.Module) -> None:
    a, b = infer("context-norm", bn_model), infer("context-norm", bn_model)
    for seed in range(3):
        x, ids = mixed_batch(seed)
        torch.testing.assert_close(a(x, domain=ids), b(x, domain=torch.zeros_like(ids)))


def _purity(assigned: torch.Tensor, ids: torch.Tensor) -> float:
    """Share of samples whose context's majority domain is their own domain."""
    return sum(int(ids[assigned == k].bincount().max()) for k in assigned.unique()) / len(ids)


def _routing(adapted: AdaptedModel, x: torch.Tensor) -> torch.Tensor:
    """The routing weights (N, K) the router used for ``x`` (recorded by the first layer's forward)."""
    seen: list[torch.Tensor] = []
    router = adapted.model.router
    handle = layers(adapted)[0].register_forward_hook(lambda m, i, o: seen.append(router.weights.clone()))
    adapted(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["context-norm", "dsbn"])
def test_infer_separates_distinct_domains(bn_model: nn.Module, name: str) -> None:
    adapted = infer(name, bn_model)
    purities, used = [], []
    for seed in range(6):
        x, ids = mixed_batch(seed, sizes=(12, 12, 12))
        weights = _routing(adapted, x)
        torch.testing.assert_close(weights.sum(1), torch.ones(len(x), dtype=weights.dtype))
        purities.append(_purity(weights.argmax(1), ids))
        used.append(len(weights.argmax(1).unique()))
    # The first batch meets no known context (all go to the source); contexts are split off batch after batch and
    # never mix the domains (a domain may be split in several contexts).
    assert used[0] == 1 and min(used[3:]) >= 3
    assert min(purities[3:]) >= 0.95
    router = adapted.model.router
    assert all(layer.num_contexts == router.num_contexts for layer in layers(adapted))


def test_an_images_context_does_not_depend_on_the_rest_of_its_batch(bn_model: nn.Module) -> None:
    a, b = infer("context-norm", bn_model), infer("context-norm", bn_model)
    for seed in range(3):  # the same history
        x, _ = mixed_batch(seed, sizes=(12, 12, 12))
        a(x)
        b(x)
    probe, _ = mixed_batch(10, sizes=(4, 4, 4))
    others_a = domain_batch(0, 20, 11)  # one batch full of low-contrast images ...
    others_b = torch.cat([domain_batch(1, 3, 12), domain_batch(2, 30, 13)])  # ... the other of the two others
    wa = _routing(a, torch.cat([probe, others_a]))[: len(probe)]
    wb = _routing(b, torch.cat([others_b, probe]))[-len(probe):]
    torch.testing.assert_close(wa, wb, atol=1e-9, rtol=0)


def test_infer_respects_min_spawn_and_max_contexts(bn_model: nn.Module) -> None:
    few = infer("context-norm", bn_model, min_spawn=40)
    for seed in range(3):
        x = domain_batch(1, 10, seed)
        torch.testing.assert_close(few(x), bn_model(x), atol=1e-5, rtol=1e-5)  # too few to found one: source
    assert few.model.router.num_contexts == 1
    capped = infer("context-norm", bn_model, max_contexts=2)
    for seed in range(4):
        capped(mixed_batch(seed, sizes=(12, 12, 12))[0])
    assert capped.model.router.num_contexts == 2
    assert all(layer.num_contexts == 2 for layer in layers(capped))


@pytest.mark.parametrize("name", ["context-norm", "dsbn"])
def test_inferred_contexts_work_on_single_images_through_the_window(bn_model: nn.Module, name: str) -> None:
    adapted = infer(name, bn_model, window=8)
    for seed in range(4):
        for i, x in enumerate(domain_batch(seed % 2, 8, seed)):
            out = adapted(x[None])
            assert out.shape == (1, 10) and bool(torch.isfinite(out).all())
            if i < 7:  # in-between predictions store nothing: the state is that of the last window update
                before = {k: v.clone() for k, v in adapted.model.state_dict().items()}
                adapted.predict(adapted._window_x, None)
                after = adapted.model.state_dict()
                assert all(torch.equal(before[k], after[k]) for k in before)
    assert adapted.model.router.num_contexts >= 2


class _SyntheticDomains:
    """The three synthetic domains as a stream source (24 images each; the severity changes nothing)."""

    label = "synthetic"
    names = ("contrast", "noise", "bright")

    def __init__(self) -> None:
        self.images = {c: domain_batch(d, 24, seed=d) for d, c in enumerate(self.names)}

    def size(self, domain: object) -> int:
        return 24

    def load(self, domain: object, index: object) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(index)
        return self.images[domain.corruption][idx], idx % 10  # type: ignore[attr-defined]


@pytest.mark.parametrize("setting", SETTINGS)
def test_inferred_contexts_run_in_every_setting_and_restart_at_each_reset(bn_model: nn.Module, setting: str) -> None:
    import tta

    source = _SyntheticDomains()
    stream = SettingStream(source, list(source.names), [3, 5], setting=setting, batch_size=8)
    adapted = infer("dsbn", bn_model)
    router = adapted.model.router
    routed: list[torch.Tensor] = []
    layers(adapted)[0].register_forward_hook(lambda m, i, o: routed.append(router.weights.clone()))
    df = tta.evaluate(adapted, stream, device="cpu", seed=0)
    assert df.n.sum() == 2 * 3 * 24  # every image predicted once
    batches = list(stream)
    assert len(routed) == len(batches)
    starts = [i for i, b in enumerate(batches) if i == 0 or b.segment != batches[i - 1].segment]
    for i in starts:  # the engine resets per segment: the first batch of each only knows the source context
        assert torch.equal(routed[i][:, 0], torch.ones(len(routed[i]), dtype=routed[i].dtype))
    assert any(float(w[:, 1:].sum()) > 0 for w in routed)  # and later batches go to inferred contexts


def test_inferred_state_round_trips_and_resets(bn_model: nn.Module) -> None:
    adapted = infer("dsbn", bn_model)
    for seed in range(3):
        adapted(mixed_batch(seed, sizes=(12, 12, 12))[0])
    fresh = infer("dsbn", bn_model)
    fresh.load_state_dict(adapted.state_dict())
    x, _ = mixed_batch(7, sizes=(12, 12, 12))
    torch.testing.assert_close(fresh(x), adapted(x), atol=0, rtol=0)
    adapted.reset()
    assert adapted.model.router.num_contexts == 1 and len(adapted.model.router.assigner.buffer) == 0
    torch.testing.assert_close(adapted(x), infer("dsbn", bn_model)(x), atol=0, rtol=0)


# ------------------------------------------------------------------------------------ training variants
def test_dsbn_branch_local_tent_trains_only_the_branches_in_use(bn_model: nn.Module) -> None:
    adapted = make("dsbn", bn_model, tent=True, lr=1e-2)
    x = domain_batch(0, 10, 0)
    first = adapted(x, domain=1)  # context 1
    torch.testing.assert_close(first, make("dsbn", bn_model)(x, domain=1))  # logits before the update
    trained = {id(p) for p in adapted.params()}
    assert {id(p) for g in adapted.optimizer.param_groups for p in g["params"]} == trained
    adapted.model(domain_batch(1, 6, 1), domain=torch.full((6,), 1))  # context 2 exists (no update: no gradient)
    bns = [m for m in bn_model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    for layer, bn in zip(layers(adapted), bns, strict=True):
        assert id(layer.ctx_weight[0]) not in trained and not layer.ctx_weight[0].requires_grad
        torch.testing.assert_close(layer.ctx_weight[0].data, bn.weight.data)  # the source branch never moves
        assert not torch.equal(layer.ctx_weight[1].data, bn.weight.data)
        torch.testing.assert_close(layer.ctx_weight[2].data, bn.weight.data)  # unused by any update: no gradient
    adapted.reset()
    assert all(layer.num_contexts == 1 for layer in layers(adapted))
    assert adapted.params() == [] and not adapted.optimizer.state


def test_learned_mode_starts_at_the_source_and_trains_mu_and_log_std(bn_model: nn.Module) -> None:
    adapted = make("context-norm", bn_model, learned=True, lr=1e-2)
    x = domain_batch(2, 10, 0)
    torch.testing.assert_close(adapted(x, domain=0), bn_model(x), atol=1e-5, rtol=1e-5)
    layer = layers(adapted)[0]
    moved = layer.ctx_mu[1].data - layer.source_mean
    assert moved.abs().max() > 0 and not layer.ctx_mu[0].requires_grad
    assert {id(p) for p in adapted.params()} == {id(p) for la in layers(adapted) for p in la.context_params()}
    assert all(float(la.ctx_images[1]) == 0 for la in layers(adapted))  # statistics are not estimated


# ----------------------------------------------------------------------------------------------- plumbing
@pytest.mark.parametrize("name", ["dsbn", "context-norm"])
def test_config_file_equals_the_dataclass(name: str) -> None:
    cls = get_method(name)
    assert yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()) == to_dict(cls.Config())


@pytest.mark.parametrize(("key", "value"), [("prior_n", -1.0), ("min_subset", 0), ("max_contexts", 1),
                                            ("fallback", "spawn"), ("contexts", "guess"), ("split_quantile", 1.0),
                                            ("descriptor", "deep"), ("calibration_images", 1)])
def test_bad_settings_are_config_errors(key: str, value: object) -> None:
    with pytest.raises(ConfigError):
        build_config(get_method("context-norm").Config, {key: value})


@pytest.mark.parametrize("name", ["dsbn", "context-norm"])
def test_models_without_batchnorm_are_refused(ln_model: nn.Module, name: str) -> None:
    with pytest.raises(ModelError, match="no BatchNorm"):
        make(name, ln_model)


def test_converter_handles_a_bare_batchnorm_and_leaves_the_original_alone() -> None:
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.fill_(0.5)
    original = copy.deepcopy(bn.state_dict())
    wrapped = convert_context_norm(copy.deepcopy(bn))
    x = torch.rand(4, 3, 5, 5)
    torch.testing.assert_close(wrapped(x), bn(x))  # no ids, fallback source: the source BN
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in original.items())


# ------------------------------------------------------------------------------------------------ real data
class _ShiftedSource:
    """Two simple, seeded shifts of real CIFAR-10 test images held in memory: low contrast and additive noise."""

    label = "shifted"

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = {"contrast": 0.5 + 0.2 * (x - 0.5),
                       "gaussian_noise": (x + 0.12 * torch.randn(x.shape, generator=g)).clamp(0, 1)}
        self.y = y

    def size(self, domain: object) -> int:
        return len(self.y)

    def load(self, domain: object, index: object) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(index)
        return self.images[domain.corruption][idx], self.y[idx]  # type: ignore[attr-defined]


@pytest.mark.realdata
@pytest.mark.slow
def test_domain_aware_methods_keep_per_domain_accuracy_on_a_mixed_real_stream(shared: Path) -> None:
    """ResNet-20 on 2 x 300 real test images, mixed: pooled statistics lose, per-domain statistics do not."""
    import numpy as np

    import tta
    from tta.data.settings import SettingStream

    with np.load(shared / "data" / "cifar10" / "test_exact_head.npz") as data:
        x = torch.from_numpy(data["x"][:300]).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(data["y"][:300]).long()
    model = tta.load_model(checkpoint=shared / "models" / "cifar10_resnet20.th", arch="resnet20")
    source = _ShiftedSource(x, y)

    def accuracy(setting: str, method: str, **overrides: object) -> float:
        stream = SettingStream(source, ["contrast", "gaussian_noise"], [5], setting=setting, batch_size=100)
        clean = f"npz:{shared / 'data' / 'cifar10' / 'train_jpeg_10k.npz'}" if "contexts" in overrides else None
        df = tta.evaluate(tta.adapt(model, method, source_data=clean, **overrides), stream, device="cpu", seed=1)
        return float(df.accuracy.mean())

    adabn_alone, adabn_mixed = accuracy("per-domain", "adabn"), accuracy("mixed", "adabn")
    oracle = accuracy("mixed", "context-norm")
    print(f"adabn per-domain {adabn_alone:.2f} mixed {adabn_mixed:.2f}; context-norm oracle mixed {oracle:.2f}")
    assert adabn_mixed < adabn_alone - 3.0
    assert oracle > adabn_mixed + 3.0
    assert accuracy("mixed", "dsbn") == pytest.approx(accuracy("per-domain", "dsbn"), abs=1.5)
    assert accuracy("mixed", "context-norm", contexts="infer") > adabn_mixed


@pytest.mark.parametrize("overrides", [{"tent": True}, {"learned": True}])
def test_trained_contexts_and_their_optimizer_state_round_trip(bn_model: nn.Module, overrides: dict) -> None:
    name = "dsbn" if "tent" in overrides else "context-norm"
    adapted = make(name, bn_model, lr=1e-2, **overrides)
    for seed in range(2):
        x, ids = mixed_batch(seed)
        adapted(x, domain=ids)
    adapted(domain_batch(0, 8, 5), domain=7)  # a context that appears later
    fresh = make(name, bn_model, lr=1e-2, **overrides)
    fresh.load_state_dict(adapted.state_dict())
    for seed in (3, 4):  # the second batch shows that the Adam moments were restored too
        x, ids = mixed_batch(seed)
        torch.testing.assert_close(fresh(x, domain=ids), adapted(x, domain=ids), atol=0, rtol=0)


# ------------------------------------------------------------------------------ descriptors and assignment
def test_descriptors_are_per_image_and_stop_at_the_deepest_layer_read(bn_model: nn.Module) -> None:
    from tta.context.descriptors import StyleProbe

    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    full, first = StyleProbe(bn_model, "all"), StyleProbe(bn_model, "first")
    assert full.dim == 2 * (8 + 16 + 16) and first.dim == 2 * 8
    together = full(x)
    torch.testing.assert_close(together[2:3], full(x[2:3]))  # an image's descriptor ignores the rest of the batch
    torch.testing.assert_close(first(x), together[:, :16])
    calls: list[int] = []
    head = first.net.head.register_forward_hook(lambda m, i, o: calls.append(1))
    first(x)
    head.remove()
    assert not calls  # the probe never ran the layers after the one it reads
    bn_model.train()
    torch.testing.assert_close(first.logits(x), copy.deepcopy(bn_model).eval()(x))  # the source model, in eval mode
    assert bn_model.training and first(x).shape == (6, 16)  # the model is untouched, the probe reads styles again


def _clusters(centres: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(len(centres)).repeat_interleave(n)
    return centres[ids] + torch.randn(len(ids), centres.shape[1], generator=g, dtype=torch.float64), ids


def test_assigner_splits_merges_and_forgets_with_source_calibrated_thresholds() -> None:
    from tta.context.assign import ContextAssigner, calibrate

    g = torch.Generator().manual_seed(0)
    source = torch.randn(800, 20, generator=g, dtype=torch.float64)
    cal = calibrate(source)
    assert cal.typical == pytest.approx(1.0, abs=0.05) and cal.dof > 10  # the source cloud is whitened
    shift = torch.zeros(3, 20, dtype=torch.float64)
    shift[0, :10], shift[1, 10:], shift[2, 0] = 2.0, -2.0, 0.1  # two distinct domains and one source-like
    assigner = ContextAssigner(cal, min_spawn=8, max_contexts=3)
    for seed in range(8):
        d, ids = _clusters(shift, 40, seed)
        assigner.observe(d, assigner.assign(d))
    d, ids = _clusters(shift, 40, 99)
    hard = assigner.assign(d).argmax(1)
    assert assigner.live().sum() == 3  # the source and one context per distinct domain, within the bound
    assert {int(hard[ids == k].mode().values) for k in range(3)} == {0, 1, 2}
    assert float((hard[ids == 2] == 0).double().mean()) > 0.9  # the source-like domain stays with the source
    # a third distinct domain under the bound: the least recently used context is forgotten, never the source
    new = torch.zeros(1, 20, dtype=torch.float64)
    new[0, ::2] = 3.0
    for seed in range(8):
        d, _ = _clusters(new, 60, 100 + seed)
        assigner.observe(d, assigner.assign(d))
    assert assigner.live().sum() == 3 and bool(assigner.live()[0])
    assert int(assigner.assign(_clusters(new, 10, 200)[0]).argmax(1).mode().values) != 0
    # two contexts with (nearly) the same centre merge into one
    twins = ContextAssigner(cal, min_spawn=8, max_contexts=4)
    twins.resize(3)
    centre = torch.full((twins.dim,), 1.5, dtype=torch.float64)
    twins.centre[1], twins.centre[2] = centre, centre + 1e-3
    twins.count[1], twins.count[2] = 50.0, 30.0
    few = torch.randn(4, 20, generator=g, dtype=torch.float64)  # too few to split anything
    assert twins.observe(few, twins.assign(few)) == [("merge", 1, 2)]
    assert twins.live().tolist() == [True, True, False] and float(twins.count[1]) >= 80.0


def test_split_share_measures_bimodality_whatever_the_spread() -> None:
    from tta.context.assign import split_share

    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(4000, generator=g, dtype=torch.float64)
    assert split_share(gaussian) == pytest.approx(2 / math.pi, abs=0.02)  # one cloud: its best split explains 2/pi
    assert split_share(25.0 * gaussian + 3.0) == pytest.approx(split_share(gaussian))  # spread and place: no matter
    two = torch.cat([gaussian[:2000] - 3.0, gaussian[2000:] + 3.0])
    assert split_share(two) > 0.85
    assert split_share(torch.ones(10, dtype=torch.float64)) == 0.0 and split_share(gaussian[:3]) == 0.0


def test_a_stretched_target_cloud_is_not_split_but_two_groups_are() -> None:
    from tta.context.assign import ContextAssigner, calibrate, held_out_bimodality, held_out_split

    g = torch.Generator().manual_seed(0)
    cal = calibrate(torch.randn(800, 20, generator=g, dtype=torch.float64))
    centre = torch.zeros(20, dtype=torch.float64)
    centre[:10] = 2.0

    def stretched(n: int) -> torch.Tensor:  # one domain whose images spread 3 times more along one direction
        d = centre + torch.randn(n, 20, generator=g, dtype=torch.float64)
        d[:, 15] *= 3.0
        return d

    one = ContextAssigner(cal, min_spawn=8, max_contexts=8)
    for _ in range(8):
        d = stretched(80)
        one.observe(d, one.assign(d))
    assert int(one.live().sum()) == 2  # the source and the one domain
    members = one.standardise(stretched(256))
    separation, _, direction = held_out_split(members)
    assert separation > one.split_threshold(256)  # its halves lie further apart than a source cloud's would...
    assert held_out_bimodality(members, direction) < one.bimodal_threshold(256)  # ...but it is one cloud
    other = centre.clone()
    other[10:] = -2.0  # a second domain, mixed with the first in every batch
    two = ContextAssigner(cal, min_spawn=8, max_contexts=8)
    for _ in range(8):
        d = torch.cat([stretched(40), other + torch.randn(40, 20, generator=g, dtype=torch.float64)])
        two.observe(d, two.assign(d))
    first = two.assign(stretched(100)).argmax(1).mode().values
    second = two.assign(other + torch.randn(100, 20, generator=g, dtype=torch.float64)).argmax(1).mode().values
    assert int(two.live().sum()) >= 3 and 0 != int(first) != int(second) != 0  # told apart, neither is the source


def test_calibration_removes_the_directions_that_tell_the_classes_apart_and_keeps_the_domains() -> None:
    from tta.context.assign import ContextAssigner, calibrate

    g = torch.Generator().manual_seed(0)
    classes = torch.arange(10).repeat(40)
    means = torch.zeros(10, 20, dtype=torch.float64)
    means[:, :3] = 2.0 * torch.randn(10, 3, generator=g, dtype=torch.float64)  # what the images show
    source = means[classes] + torch.randn(400, 20, generator=g, dtype=torch.float64)
    shift = torch.zeros(20, dtype=torch.float64)
    shift[10:] = 1.0  # a domain shift, unrelated to the classes

    def gaps(cal: object) -> tuple[float, float]:
        a = ContextAssigner(cal)  # type: ignore[arg-type]
        x = source[:100]
        other = x + means[(classes[:100] + 1) % 10] - means[classes[:100]]  # the same images, another class
        z, z_class, z_domain = a.standardise(x), a.standardise(other), a.standardise(x + shift)
        return float((z - z_class).square().mean()), float((z - z_domain).square().mean())

    plain = calibrate(source)
    class_gap, domain_gap = gaps(calibrate(source, content=classes))
    class_gap_kept, domain_gap_kept = gaps(plain)
    assert class_gap < 0.1 * class_gap_kept  # the classes are (all but) gone
    assert domain_gap > 0.9 * domain_gap_kept  # the domain is not
    # labels unrelated to the descriptors remove nothing: the same whitening as without them
    unrelated = calibrate(source, content=torch.randperm(400, generator=g) % 10)
    assert torch.allclose(unrelated.projection.abs(), plain.projection.abs(), atol=1e-4)
    with pytest.raises(ValueError, match="one class per source descriptor"):
        calibrate(source, content=classes[:10])


def test_a_shifted_group_hidden_in_the_source_context_gets_a_context_of_its_own() -> None:
    from tta.context.assign import ContextAssigner, calibrate

    g = torch.Generator().manual_seed(0)
    cal = calibrate(torch.randn(800, 20, generator=g, dtype=torch.float64))
    # one cloud shifted by half its spread: single images look like source images and 2-means finds no two clouds,
    # but as a group its mean sits far further from the source centre than chance puts the mean of source images
    shift = torch.full((1, 20), 0.5, dtype=torch.float64)
    shifted = ContextAssigner(cal, min_spawn=8, max_contexts=4)
    for seed in range(6):
        d, _ = _clusters(shift, 100, seed)
        shifted.observe(d, shifted.assign(d))
    assert int(shifted.live().sum()) >= 2
    hard = shifted.assign(_clusters(shift, 200, 50)[0]).argmax(1)
    assert float((hard != 0).double().mean()) > 0.5
    # source images keep the source context (a chance split of them is merged back at once)
    clean = ContextAssigner(cal, min_spawn=8, max_contexts=4)
    for seed in range(6):
        d = torch.randn(100, 20, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
        clean.observe(d, clean.assign(d))
        assert int(clean.live().sum()) == 1



def test_inferred_context_statistics_come_from_their_members_only(bn_model: nn.Module) -> None:
    wrapped = convert_context_norm(copy.deepcopy(bn_model), declared=2)
    router, first = wrapped.router, wrapped.layers()[0]
    x = domain_batch(0, 12, 0)
    router.begin(x, torch.zeros(12, dtype=torch.long), None)
    # soft responsibilities, as inferred contexts give: every image 0.6 with context 1, 0.4 with context 2
    router.routing.weights = torch.tensor([[0.0, 0.6, 0.4]], dtype=torch.float64).expand(12, -1)
    router.routing.members = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64).expand(12, -1)
    out = wrapped.net(x)
    router.end()
    assert first.ctx_images.tolist() == [0.0, 12.0, 0.0]  # each image counts once, in its most responsible context
    torch.testing.assert_close(first.ctx_mean[2], first.source_mean.double())
    assert bool(torch.isfinite(out).all())


def test_a_context_in_use_is_never_forgotten_to_make_room() -> None:
    from tta.context.assign import BUFFER, ContextAssigner, calibrate

    cal = calibrate(torch.randn(800, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    shift = torch.zeros(3, 20, dtype=torch.float64)
    shift[0, :10], shift[1, 10:], shift[2, ::2] = 2.0, -2.0, 3.0
    assigner = ContextAssigner(cal, min_spawn=8, max_contexts=3)  # room for two target contexts
    for seed in range(6):
        d, _ = _clusters(shift[:2], 60, seed)
        assigner.observe(d, assigner.assign(d))
    assert int(assigner.live().sum()) == 3
    # a third domain arrives while the first two still do: the bound holds, and no context in use is dropped
    for seed in range(6):
        d, _ = _clusters(shift, 60, 10 + seed)
        ops = assigner.observe(d, assigner.assign(d))
        assert not [op for op in ops if op[0] in ("clear", "grow")]
    hard = assigner.assign(_clusters(shift, 40, 50)[0]).argmax(1)
    assert {int(hard[:40].mode().values), int(hard[40:80].mode().values)} == {1, 2}
    # once the first two are gone from the recent stream, the third takes the place of one of them
    for seed in range(BUFFER // 120 + 2):
        d, _ = _clusters(shift[2:], 120, 100 + seed)
        assigner.observe(d, assigner.assign(d))
    assert int(assigner.assign(_clusters(shift[2:], 40, 200)[0]).argmax(1).mode().values) != 0


def test_a_split_context_passes_its_statistics_and_half_its_evidence_to_both_halves(bn_model: nn.Module) -> None:
    from tta.context.assign import ContextAssigner, calibrate
    from tta.context.router import OPS

    # the assigner: a target context that turns out to hold two domains is split, not restarted
    cal = calibrate(torch.randn(800, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    pair = torch.zeros(2, 20, dtype=torch.float64)
    pair[:, :10] = 3.0
    pair[1, 10:] = 2.0  # a second domain beside the first, further from the source than chance
    assigner = ContextAssigner(cal, min_spawn=8, max_contexts=4)
    ops: list[tuple[str, int, int]] = []
    for seed in range(4):  # the first domain alone: it leaves the source context
        d, _ = _clusters(pair[:1], 100, seed)
        ops += assigner.observe(d, assigner.assign(d))
    assert int(assigner.live().sum()) == 2 and not [op for op in ops if op[0] == "split"]
    for seed in range(4):  # both domains: the first's context is split
        d, _ = _clusters(pair, 100, 10 + seed)
        ops += assigner.observe(d, assigner.assign(d))
    splits = [op for op in ops if op[0] == "split"]
    assert splits and all(parent > 0 and new != parent for _, new, parent in splits)
    assert ("clear", splits[0][2], -1) not in ops
    # the layers: both halves normalise with the parent's statistics, each holding half its evidence
    wrapped = convert_context_norm(copy.deepcopy(bn_model), declared=2)
    x = domain_batch(1, 16, 0)
    wrapped(x, domain=torch.zeros(16, dtype=torch.long))  # context 1 learns from 16 noisy images
    before = [(layer.ctx_mean[1].clone(), layer.ctx_var[1].clone(), float(layer.ctx_images[1]))
              for layer in wrapped.layers()]
    wrapped.router.pending = torch.tensor([[OPS.index("split"), 2, 1]])
    wrapped.apply_pending()
    for layer, (mean, var, images) in zip(wrapped.layers(), before, strict=True):
        for k in (1, 2):
            torch.testing.assert_close(layer.ctx_mean[k], mean)
            torch.testing.assert_close(layer.ctx_var[k], var)
            assert float(layer.ctx_images[k]) == images / 2
    probe = domain_batch(1, 4, 1)
    torch.testing.assert_close(wrapped(probe, domain=torch.zeros(4, dtype=torch.long), store=False),
                               wrapped(probe, domain=torch.ones(4, dtype=torch.long), store=False))


def test_layers_read_the_routing_they_were_given_and_never_their_owner(bn_model: nn.Module) -> None:
    wrapped = convert_context_norm(copy.deepcopy(bn_model), declared=1)
    routing = wrapped.router.routing
    assert all(layer.routing is routing for layer in wrapped.layers())
    assert not any("router" in vars(layer) or "_router" in vars(layer) for layer in wrapped.layers())
    twin = copy.deepcopy(wrapped)  # a copy shares one routing of its own among its router and layers
    assert twin.router.routing is not routing and all(layer.routing is twin.router.routing for layer in twin.layers())
    # a layer alone, given a routing by hand, normalises each sample with its context
    layer = DomainContextNorm.from_bn(nn.BatchNorm2d(3).eval(), declared=1, prior_n=0.0)
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    source = layer(x)
    layer.routing.weights = torch.tensor([[0.0, 1.0]], dtype=torch.float64).expand(4, -1)
    adapted = layer(x)
    layer.routing.clear()
    assert not torch.allclose(adapted, source)
    torch.testing.assert_close(adapted.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)  # the batch's own stats


def test_a_forward_that_does_not_store_changes_no_statistics(bn_model: nn.Module) -> None:
    wrapped = convert_context_norm(copy.deepcopy(bn_model), declared=1)
    before = copy.deepcopy(wrapped.state_dict())
    wrapped(domain_batch(1, 8, 0), domain=torch.zeros(8, dtype=torch.long), store=False)
    after = wrapped.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    wrapped(domain_batch(1, 8, 0), domain=torch.zeros(8, dtype=torch.long))
    assert float(wrapped.layers()[0].ctx_images[1]) == 8.0
