"""Load pretrained models that take [0, 1] images: input normalisation always lives inside the returned model.

Sources, tried in this order for ``name``: robustbench's corruption model zoo for the dataset (``Standard``,
``Hendrycks2020AugMix_WRN``, ...; weights fetched by ``tta.data.download``), torchvision's ImageNet classifiers,
timm's; ``timm:NAME`` goes to timm directly (with its pretrained configuration's mean/std, and weights from a local
file given as ``checkpoint``); ``digits-cnn`` is the offline demo model (``tta.models.digits``), trained at first
use. With ``checkpoint`` and ``arch``, a classic CIFAR ResNet from a local file (the akamaster/pytorch_resnet_cifar10
format). Downloads go under ``<data_dir>/models``; offline, a ``DownloadError`` says what to fetch and where to put it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta.errors import ConfigError, DownloadError, ModelError
from tta.models.normalize import Normalize, normalized  # noqa: F401  (re-exported)
from tta.models.preprocess import check_timm_name, timm_name
from tta.models.resnet_cifar import DEPTHS, cifar_resnet
from tta.models.saved import VERSION, convert, is_saved_model

# Mean/std the classic CIFAR ResNet checkpoints were trained with; ImageNet's for torchvision.
CIFAR_RESNET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ROBUSTBENCH_DATASETS = {"cifar10": "cifar10", "cifar10c": "cifar10", "cifar100": "cifar100", "cifar100c": "cifar100"}


def load_checkpoint(
    path: str | Path, arch: str | None = None, num_classes: int = 10, data_dir: str | Path = "data"
) -> nn.Module:
    """A model from ``path``: a self-describing checkpoint (``tta warmup``), or a CIFAR ResNet given ``arch``.

    A CIFAR ResNet file is a dict with ``state_dict`` (keys optionally prefixed ``module.``); ``num_classes`` is
    taken from its linear layer. A self-describing file says its own architecture; an ``arch`` given with it must
    match.
    """
    if arch is not None and arch not in DEPTHS:
        raise ConfigError(f"unknown architecture {arch!r} for --arch; choose one of: {', '.join(DEPTHS)}")
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {str(path)!r} does not exist; check the path passed to --checkpoint")
    try:
        ckpt: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file (pickle, zip, runtime): report them all
        raise ModelError(f"checkpoint {str(path)!r} could not be read ({type(err).__name__}: {err}); "
                         "pass a file saved with torch.save") from None
    if is_saved_model(ckpt):
        built = ckpt.get("build") or {}
        if arch is not None and built.get("arch") != arch:
            raise ConfigError(f"checkpoint {str(path)!r} holds a {built.get('arch') or built.get('name')} model, not "
                              f"--arch {arch}; drop --arch (the file says its architecture)")
        return build_saved_model(ckpt, path, data_dir)
    if arch is None:
        raise ConfigError(f"checkpoint {str(path)!r} holds plain weights; say their architecture with --arch "
                          f"({'|'.join(DEPTHS)})")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {str(path)!r} holds no state_dict; save a dict with a 'state_dict' entry")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "linear.weight" in state:
        num_classes = state["linear.weight"].shape[0]
    net = cifar_resnet(arch, num_classes)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"checkpoint {str(path)!r} does not fit --arch {arch} ({len(missing)} missing keys such as "
                         f"{missing[:2]}, {len(unexpected)} unexpected such as {unexpected[:2]}); pick the "
                         "architecture the checkpoint was trained with")
    return normalized(net, *CIFAR_RESNET_NORM).eval()


def robustbench_names(dataset: str) -> list[str]:
    """Names in robustbench's corruption model zoo for ``cifar10`` or ``cifar100``."""
    from tta.compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return list(model_dicts[BenchmarkDataset(dataset)][ThreatModel.corruptions])


def gdrive_url(file_id: str) -> str:
    """The direct-download URL of a public Google Drive file (past the large-file confirmation page)."""
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` starts like a PyTorch checkpoint (a zip archive or a pickle), not like an HTML error page."""
    with path.open("rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def fetch_robustbench_weights(name: str, dataset: str, model_dir: Path, progress: bool = True) -> None:
    """Download the weight file(s) of a robustbench zoo model through ``tta.data.download`` to where robustbench
    looks for them. robustbench publishes no checksums, so a download is accepted only if it is a PyTorch
    checkpoint; anything else (e.g. a Drive quota page) is deleted and reported."""
    from tta.compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    from tta.data.download import RemoteFile, fetch

    gid = model_dicts[BenchmarkDataset(dataset)][ThreatModel.corruptions][name]["gdrive_id"]
    ids = gid if isinstance(gid, list) else [gid]
    directory = model_dir / dataset / "corruptions"
    for i, file_id in enumerate(ids):
        filename = f"{name}.pt" if len(ids) == 1 else f"{name}.pt_m{i}.pt"
        if (directory / filename).is_file():
            continue
        path = fetch(RemoteFile(filename, None, (gdrive_url(file_id),)), directory, progress)
        if not _is_checkpoint(path):
            path.unlink()
            raise DownloadError(f"the download of {filename} is not a PyTorch checkpoint (Google Drive may have "
                                "answered with a quota or error page)")


def _read_weights(path: Path) -> Any:
    """A weight file read with ``torch.load(weights_only=True)``: tensors and plain containers only, never code;
    a ``ModelError`` for a file that holds anything else (a pickled object would run code when unpickled)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelError(f"{str(path)!r} holds more than weights (objects whose unpickling could run code: "
                         f"{str(err).splitlines()[0][:120]}); it is refused, delete it and fetch the file again") \
            from None


def _strip(state: Any, prefixes: Sequence[str]) -> Any:
    if not isinstance(state, dict):
        raise ModelError("the checkpoint holds no state_dict; delete it and fetch the file again")
    for prefix in prefixes:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _robustbench_from_files(name: str, dataset: str, model_dir: Path) -> nn.Module:
    """Build robustbench's ``name`` and load its downloaded weights ourselves, with ``weights_only=True``.

    robustbench 1.1.1's own ``load_model`` unpickles the same files with a plain ``torch.load``, which on torch
    before 2.6 runs any code a tampered file carries; this follows its loading steps (the ``last`` entry of
    Kireev2021 checkpoints, the ``module.`` and ``model.`` prefixes, one file per member of an ensemble) on a safe read.
    """
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import _safe_load_state_dict

    bench = BenchmarkDataset(dataset)
    entry = model_dicts[bench][ThreatModel.corruptions][name]
    model = entry["model"]()
    path = model_dir / dataset / "corruptions" / f"{name}.pt"
    if not isinstance(entry["gdrive_id"], list):
        ckpt = _read_weights(path)
        if "Kireev2021Effectiveness" in name or name == "Andriushchenko2020Understanding":
            ckpt = ckpt["last"]
        state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
        return _safe_load_state_dict(model, name, _strip(state, ("module.", "model.")), bench).eval()
    for i in range(len(entry["gdrive_id"])):
        ckpt = _read_weights(Path(f"{path}_m{i}.pt"))
        state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
        model.models[i] = _safe_load_state_dict(model.models[i], name, _strip(state, ("module.",)), bench).eval()
    return model.eval()


def _load_robustbench(name: str, dataset: str, model_dir: Path) -> nn.Module:
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    path = model_dir / dataset / "corruptions" / f"{name}.pt"
    try:
        fetch_robustbench_weights(name, dataset, model_dir)
        return _robustbench_from_files(name, dataset, model_dir)
    except ModelError:
        raise
    except Exception as err:  # our DownloadError, or errors on a bad file: "fetch it yourself"
        gid = model_dicts[BenchmarkDataset(dataset)][ThreatModel.corruptions][name]["gdrive_id"]
        ids = gid if isinstance(gid, list) else [gid]
        where = ", ".join(f"https://drive.google.com/uc?id={i}" for i in ids)
        target = path if len(ids) == 1 else f"{path}_m0.pt ... _m{len(ids) - 1}.pt"
        raise DownloadError(f"could not load robustbench model {name!r} ({type(err).__name__}: {err}); download it "
                            f"from {where} and save it as {target}") from None


def _load_torchvision(name: str) -> nn.Module:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights="DEFAULT")
    except Exception as err:  # torch.hub download errors when offline
        raise DownloadError(f"could not fetch torchvision weights for {name!r} ({type(err).__name__}: {err}); "
                            "download them on a machine with internet into "
                            f"{torch.hub.get_dir()}/checkpoints") from None
    return normalized(model, *IMAGENET_NORM)


def _timm_weights(path: Path) -> dict[str, Any]:
    """The state dict in a local timm weight file: ``.safetensors`` or a ``torch.save`` file (read weights-only)."""
    if not path.is_file():
        raise ModelError(f"checkpoint {str(path)!r} does not exist; check the path passed to --checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise ModelError(f"{str(path)!r} is not a readable safetensors file ({err}); fetch it again") from None
    ckpt = _read_weights(path)
    state = ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else ckpt
    return _strip(state, ("module.",))


def _load_timm(name: str, pretrained: bool = True, checkpoint: str | Path | None = None,
               model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """timm's ``name`` with its pretrained configuration's mean/std inside, so that it takes [0, 1] images.

    Weights: timm's download (``pretrained``), a local file (``checkpoint``: the hub's ``model.safetensors`` or
    ``pytorch_model.bin``; the number of classes is read from its classifier), or none (random initialisation,
    ``pretrained=False``). ``model_kwargs`` go to ``timm.create_model`` (``num_classes``, ``img_size``, ...).
    """
    check_timm_name(name)
    import timm
    import timm.data

    kwargs = dict(model_kwargs or {})
    state = _timm_weights(Path(checkpoint)) if checkpoint is not None else None
    if state is not None:
        head = getattr(timm.models.get_pretrained_cfg(name), "classifier", None)
        if isinstance(head, str) and isinstance(state.get(f"{head}.weight"), torch.Tensor):
            kwargs.setdefault("num_classes", state[f"{head}.weight"].shape[0])  # a fine-tuned head keeps its size
    download = pretrained and state is None
    try:
        model = timm.create_model(name, pretrained=download, **kwargs)
    except TypeError as err:  # a keyword the architecture does not take
        raise ConfigError(f"timm cannot build {name!r} with model_kwargs {kwargs} ({err}); pass only keywords its "
                          "constructor takes") from None
    except Exception as err:  # hub download errors when offline, or a missing/old huggingface_hub
        if not download:
            raise
        cfg = timm.models.get_pretrained_cfg(name)
        hub = getattr(cfg, "hf_hub_id", None)
        where = f"https://huggingface.co/{hub} (model.safetensors)" if hub else getattr(cfg, "url", None) \
            or "their source (timm knows no download for them)"
        raise DownloadError(f"could not fetch timm weights for {name!r} ({type(err).__name__}: {str(err)[:200]}); "
                            f"download them from {where} on a machine with internet and pass the file with "
                            f"--model timm:{name} --checkpoint FILE") from None
    if state is not None:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # tensors of the wrong shape
            raise ModelError(f"checkpoint {str(checkpoint)!r} does not fit timm:{name} "
                             f"({str(err).splitlines()[-1].strip()[:160]}); pass the weights of this exact model") \
                from None
        if missing or unexpected:
            raise ModelError(f"checkpoint {str(checkpoint)!r} does not fit timm:{name} ({len(missing)} missing keys "
                             f"such as {missing[:2]}, {len(unexpected)} unexpected such as {unexpected[:2]}); pass "
                             "the weights of this exact model")
    config = timm.data.resolve_data_config({}, model=model)
    return normalized(model, config["mean"], config["std"])


def load_model(
    name: str | None = None,
    *,
    dataset: str = "cifar10",
    checkpoint: str | Path | None = None,
    arch: str | None = None,
    data_dir: str | Path = "data",
    pretrained: bool = True,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A pretrained model in eval mode that takes [0, 1] images.

    ``load_model(checkpoint="resnet20.th", arch="resnet20")`` reads a CIFAR ResNet checkpoint and
    ``load_model(checkpoint="warm.pt")`` a self-describing one written by ``tta warmup``; ``load_model("timm:NAME")``
    builds timm's ``NAME`` with the mean/std of its pretrained configuration (its input size, interpolation and crop
    set the resizing of images: ``tta.models.preprocess.preprocess_for``), its weights downloaded or, with
    ``checkpoint``, read from a local file. For ``timm:`` names only, ``pretrained=False`` leaves the weights
    randomly initialised (for tests) and ``model_kwargs`` go to ``timm.create_model``. Any other ``name`` is looked
    up in robustbench's corruption zoo for ``dataset`` (``cifar10``/``cifar100``), then torchvision, then timm.
    """
    timm_model = timm_name(name)
    if timm_model is not None:
        if arch is not None:
            raise ConfigError(f"--arch {arch} is for CIFAR ResNet checkpoints; drop it for --model {name}")
        return _load_timm(timm_model, pretrained, checkpoint, model_kwargs).eval()
    if not pretrained or model_kwargs:
        raise ConfigError("pretrained=False and model_kwargs apply to timm:NAME models only; name one as timm:NAME")
    if name == "digits-cnn" and checkpoint is None and arch is None:
        from tta.models.digits import load_digits_cnn

        return load_digits_cnn(data_dir)
    if checkpoint is not None or arch is not None:
        if checkpoint is None:
            raise ConfigError(f"--arch {arch} needs --checkpoint PATH, the CIFAR ResNet weights to load")
        return load_checkpoint(checkpoint, arch, num_classes=100 if "100" in dataset else 10, data_dir=data_dir)
    if not name:
        raise ConfigError("name a model (--model Standard) or give --checkpoint PATH --arch resnet20")
    rb_dataset = ROBUSTBENCH_DATASETS.get(dataset)
    if rb_dataset is not None and name in robustbench_names(rb_dataset):
        return _load_robustbench(name, rb_dataset, Path(data_dir) / "models").eval()
    import torchvision

    if name in torchvision.models.list_models(torchvision.models):
        return _load_torchvision(name).eval()
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name):
        return _load_timm(name).eval()
    zoo = ", ".join(robustbench_names(rb_dataset)) if rb_dataset else "(none for this dataset)"
    raise ConfigError(f"unknown model {name!r}: not in robustbench's {dataset} corruption zoo ({zoo}), torchvision "
                      "or timm; check the spelling, or pass --checkpoint PATH --arch resnet20 for a CIFAR ResNet")


def build_saved_model(ckpt: dict[str, Any], path: str | Path, data_dir: str | Path = "data") -> nn.Module:
    """Rebuild the converted model a self-describing checkpoint describes and load its weights (eval mode)."""
    if ckpt.get("version") != VERSION:
        raise ModelError(f"{str(path)!r} is a tta model checkpoint of version {ckpt.get('version')} and this tta "
                         f"reads version {VERSION}; warm up again with this version")
    build = ckpt.get("build") or {}
    if "arch" in build:
        base: nn.Module = normalized(cifar_resnet(build["arch"], build["num_classes"]), *CIFAR_RESNET_NORM)
    elif "name" in build:
        base = load_model(build["name"], dataset=build["dataset"], data_dir=data_dir,
                          pretrained=build.get("pretrained", True), model_kwargs=build.get("model_kwargs"))
    else:
        raise ModelError(f"{str(path)!r} does not say which architecture it holds; warm up again with this tta")
    # method None: a model trained as it is (e.g. benchmarks/train_small_vit.py's ViT), no conversion to apply
    model = base.eval() if ckpt.get("method") is None else convert(ckpt["method"], base.eval(), ckpt["settings"])
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise ModelError(f"the weights in {str(path)!r} do not fit the model it describes ({str(err)[:200]}); the "
                         "file is damaged or was edited, so warm up again") from None
    return model.eval()
