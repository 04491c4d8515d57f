"""The common interface of every adaptation method: declared state, requirements, a loss apart from the update.

An ``AdaptedModel`` wraps a copy of a pretrained model. The framework owns everything that is the same for every
method: input checks (before anything changes), the gradient context, the update (a plain gradient step, SAM's
two-step update, or none), rejecting updates that are not finite, the sliding window for single images,
thread safety, ``reset``, ``state_dict``/``load_state_dict`` and diagnostics. A method is a short file that
implements hooks:

- ``requires``: what it needs, checked before the first batch (norm layers, running statistics, batch size,
  clean source data, a classifier head), each with an error naming the fix;
- ``configure(model)``: set modes, swap layers, choose what requires grad; returns the model to adapt;
- ``setup()``: declare further state: extra models (``self.teacher = ...`` is enough: submodules are state),
  tensors (``add_state``) and anything else that must reset and save (``add_state`` with a non-tensor value);
- ``params()``: the parameters the optimizer updates; ``optimizer_config()`` its settings;
- ``loss(x, domain)``: forward, returning a ``StepOutput``: the prediction, the loss to minimise (or ``None``),
  how many samples were used and any diagnostics;
- ``after_step(x, domain, out)``: what follows an update (a teacher's EMA, a prediction with the updated model,
  a reset rule); returns the final ``StepOutput``.

Everything declared (the adapted model, extra models, buffers, ``add_state`` values, optimizer state) is snapshot
after ``setup`` and restored by ``reset()``; ``state_dict()`` holds all of it, so an adapted model saved and loaded
resumes exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from tta.core.requirements import Requirements, check_requirements
from tta.errors import ConfigError, InputError, ModelError
from tta.io import save_torch

if TYPE_CHECKING:
    from tta.monitor.guard import Guard
    from tta.source import SourceData

Update = Literal["gradient", "sam", "none"]
# Pixel values further than this outside [0, 1] are not images in [0, 1] (e.g. 0..255 or normalised inputs).
RANGE_TOLERANCE = 1e-2
MAX_DOMAIN_IDS = 4096  # distinct domain ids one adapted model keeps apart
SAVE_FORMAT = "tta.adapted-model"


@dataclass
class StepOutput:
    """What one step of a method produced: the prediction returned to the caller and what a monitor can read.

    ``loss`` is the scalar the update minimises (``None``: nothing to update on this batch); ``n_used`` how many
    samples contributed to it (``0`` skips the update); ``diagnostics`` per-batch values (tensors stay on the
    device: reading them is the reader's synchronisation, not the step's).
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    n_used: torch.Tensor | int | None = None
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Counters:
    """Running totals since the model was built (not state: ``reset()`` counts itself here)."""

    batches: int = 0
    updates: int = 0
    skipped: int = 0
    rejected: int = 0
    resets: int = 0
    rollbacks: int = 0  # by a guard (tta.monitor)
    fallbacks: int = 0  # batches a guard answered with the source model's prediction


class AdaptedModel(nn.Module):
    """A model wrapped by a test-time adaptation method: call it on batches, ``reset()`` to return to the source."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    requires: ClassVar[Requirements] = Requirements()
    update: Update = "none"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    sliding_window: ClassVar[bool] = True  # whether single images are adapted on the sliding window by default

    def __init__(
        self,
        model: nn.Module,
        config: Any | None = None,
        *,
        source_data: SourceData | str | tuple[Any, Any] | None = None,
        window: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object itself")
        if not isinstance(window, int) or isinstance(window, bool) or window < 0 or window > 4096:
            raise ModelError(f"window must be an integer in [0, 4096] (0 = off), got {window!r}")
        from tta.source import as_source_data

        self.config = config if config is not None else self.Config()
        self.source_data = as_source_data(source_data)
        self.window = window
        model = copy.deepcopy(model)  # never modify the caller's model
        check_requirements(self.requires, model, self.name, self.source_data)
        self.check_model(model)
        # Without BatchNorm (e.g. a Proxy Normalization model) and with the default predict, an image's prediction
        # does not depend on its batch-mates: the sliding window then predicts each image alone, not with the window.
        self._predict_alone = type(self).predict is AdaptedModel.predict and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        self.num_classes = _num_classes(model)
        self.in_channels = _input_channels(model)
        self._extra: dict[str, Any] = {}
        self._dynamic: set[str] = set()
        self._pending_optimizer: dict[str, Any] | None = None
        self.model = self.configure(model)
        if any(isinstance(m, nn.BatchNorm1d) and (m.training or m.running_mean is None) for m in self.model.modules()):
            # Batch statistics of one value per channel do not exist: single images need the window.
            self.requires = dataclasses.replace(self.requires, min_batch=max(self.requires.min_batch, 2))
        self.add_state("_updates_since_reset", 0)
        self.add_state("_domain_keys", torch.zeros(0, dtype=torch.long), dynamic=True)
        self.add_state("_window_x", torch.zeros(0), dynamic=True)
        self.add_state("_window_ids", torch.zeros(0, dtype=torch.long), dynamic=True)
        self.add_state("_window_pointer", 0)
        self.setup()
        self.optimizer = self.make_optimizer()
        self.counters = Counters()
        self.last: StepOutput | None = None
        self.guard: Guard | None = None  # set by tta.monitor.attach_guard; consulted in step()
        self._lock = threading.RLock()
        self._snapshot = self._capture()

    # ----------------------------------------------------------------------------------------------- hooks
    def check_model(self, model: nn.Module) -> None:
        """Raise ``ModelError`` for what ``requires`` cannot express."""

    def configure(self, model: nn.Module) -> nn.Module:
        """Prepare ``model`` for adaptation; the default puts it in eval mode with every parameter frozen."""
        model.eval()
        model.requires_grad_(False)
        return model

    def setup(self) -> None:
        """Declare extra state (models, tensors, memory banks); runs after ``configure``, before the snapshot."""

    def params(self) -> list[nn.Parameter]:
        """Parameters updated at test time; none by default."""
        return []

    def optimizer_config(self) -> Any:
        """The ``OptimizerConfig`` of the update; by default the method's config itself."""
        return self.config

    def make_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer over ``params()``, or ``None`` for methods that take no gradient steps."""
        if self.update == "none":
            return None
        from tta.core.params import make_optimizer

        return make_optimizer(self.params(), self.optimizer_config())

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        """Forward ``x``: the prediction, and the loss the update minimises."""
        raise NotImplementedError

    def sam_loss(self, x: torch.Tensor, domain: torch.Tensor | None, first: StepOutput) -> torch.Tensor:
        """The loss at SAM's perturbed weights; by default the same loss recomputed."""
        loss = self.loss(x, domain).loss
        assert loss is not None  # the first pass had a loss, or SAM would not have perturbed
        return loss

    def after_step(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> StepOutput:
        """Runs after the update(s) of a batch; returns the final output (the default keeps ``out``)."""
        return out

    def predict(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        """A prediction without any update (the sliding window's in-between images)."""
        return self.model(x)

    # --------------------------------------------------------------------------------------- declared state
    def add_state(self, name: str, value: Any, *, dynamic: bool = False) -> None:
        """Declare state that ``reset()`` restores and ``state_dict()`` saves.

        A tensor becomes a buffer (``dynamic=True``: its shape may change, e.g. a memory bank that fills up); any
        other value (numbers, lists, dicts of tensors) is deep-copied into the state dict's extra state. Read and
        write it as ``self.<name>``.
        """
        if isinstance(value, torch.Tensor):
            self.register_buffer(name, value)
            if dynamic:
                self._dynamic.add(name)
        else:
            self._extra[name] = value

    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__.get("_extra")
        if extra is not None and name in extra:
            return extra[name]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        extra = self.__dict__.get("_extra")
        if extra is not None and name in extra:
            extra[name] = value
        else:
            super().__setattr__(name, value)

    def get_extra_state(self) -> dict[str, Any]:
        """Optimizer state and ``add_state`` values travel with ``state_dict()`` (deep copies: never shared)."""
        optimizer = None if self.optimizer is None else copy.deepcopy(self.optimizer.state_dict())
        return {"optimizer": optimizer, "extra": copy.deepcopy(self._extra)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Counterpart of ``get_extra_state``; the optimizer state is applied once every module has loaded."""
        if not isinstance(state, dict) or set(state) != {"optimizer", "extra"}:
            raise ModelError("the state dict's extra state was not written by this version of tta; save it again")
        if set(state["extra"]) != set(self._extra):
            raise ModelError(f"the saved state holds {sorted(state['extra'])} but {self.name} declares "
                             f"{sorted(self._extra)}; load a state saved by the same method")
        self._extra.update(copy.deepcopy(state["extra"]))
        self._pending_optimizer = state["optimizer"]

    def _capture(self) -> dict[str, Any]:
        return copy.deepcopy(self.state_dict())

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a saved adapted model; on any mismatch nothing changes and a ``ModelError`` says why."""
        with self._lock:
            backup = self._capture()
            try:
                return self._load(state_dict, strict, assign)
            except Exception as err:
                self._load(backup, True, False)
                if isinstance(err, ModelError):
                    raise
                detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ModelError(f"this state dict does not fit this {self.name or 'adapted'} model ({detail}); "
                                 "load a state saved by the same method, settings and model") from None

    def _load(self, state_dict: Mapping[str, Any], strict: bool, assign: bool) -> Any:
        for name in self._dynamic:  # buffers whose shape changes at test time take the saved shape
            saved = state_dict.get(name)
            if isinstance(saved, torch.Tensor):
                current = self._buffers[name]
                self._buffers[name] = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
        self._pending_optimizer = None
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.update != "none":
            self.optimizer = self.make_optimizer()  # over the parameters as loaded (contexts may have grown)
            if self._pending_optimizer is not None and self.optimizer is not None:
                self.optimizer.load_state_dict(self._pending_optimizer)
        self._pending_optimizer = None
        return result

    def reset(self) -> None:
        """Return to the state after ``setup``: every declared model, tensor and value, and the optimizer state."""
        with self._lock:
            for module in self.modules():
                reset_structure = getattr(module, "reset_structure", None)
                if module is not self and callable(reset_structure):
                    reset_structure()  # layers that grow at test time (per-domain contexts) drop what they grew
            self._load(self._snapshot, True, False)
            self.counters.resets += 1

    def snapshot_fingerprint(self) -> str:
        """SHA-256 of the state ``reset()`` returns to: identifies the source model and the method's settings."""
        digest = hashlib.sha256()
        for name, value in sorted(self._snapshot.items()):
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write the adapted model (method, settings, window, every declared state and the optimizer state) to
        ``path`` atomically: a temporary file in the same folder, flushed, then renamed. ``tta.load_adapted``
        restores it exactly onto the same source model."""
        from tta.config import to_dict

        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a directory; pass a file path such as {path / 'adapted.pt'}")
        if not path.parent.is_dir():
            raise ConfigError(f"the folder {path.parent} does not exist; create it first")
        with self._lock:
            payload = {"format": SAVE_FORMAT, "version": 1, "method": self.name, "settings": to_dict(self.config),
                       "window": self.window, "source": self.snapshot_fingerprint(), "state_dict": self.state_dict()}
            if self.guard is not None:  # tta.monitor: the guard's snapshot, counters and averages
                payload["guard"] = self.guard.state_dict()
        return save_torch(payload, path)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``.to()``, ``.double()``, ...: the optimizer's per-parameter moments follow their parameters."""
        self.__dict__.pop("_snapshot_cache", None)  # the snapshot buffers no longer match
        result = super()._apply(fn, recurse)
        optimizer = self.__dict__.get("optimizer")
        if optimizer is not None:
            for param, state in optimizer.state.items():
                for key, value in state.items():
                    if (isinstance(value, torch.Tensor) and value.shape == param.shape
                            and (value.device != param.device or value.dtype != param.dtype)):
                        state[key] = value.to(device=param.device, dtype=param.dtype)
        return result

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)  # locks cannot be copied or pickled; a copy gets its own
        state.pop("_snapshot_cache", None)  # rebuilt on the next batch
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------- framework
    def forward(self, x: torch.Tensor, domain: torch.Tensor | int | None = None) -> torch.Tensor:
        """Predict ``x`` (N, C, H, W) in [0, 1] and adapt; ``domain`` gives per-sample domain ids when known.

        Calls from several threads are serialised: the result equals some sequential order of the calls.
        """
        with self._lock:
            x, ids = self.check_input(x, domain)
            with _autograd_context(self.update != "none"):
                if x.is_inference():
                    x = x.clone()  # an inference-mode tensor cannot take part in a backward pass
                if self.window > 1 and x.shape[0] == 1:
                    return self._window_step(x, ids)
                min_batch = self.requires.min_batch
                if x.shape[0] < min_batch:
                    raise InputError(f"{self.name} needs at least {min_batch} images per batch, got {x.shape[0]}; "
                                     f"use a larger batch, or window={max(min_batch, 16)} (--window) to adapt on a "
                                     "sliding window of recent single images")
                return self.step(x, ids).logits

    def infer(self, x: torch.Tensor, domain: torch.Tensor | int | None = None) -> torch.Tensor:
        """Predict ``x`` with the model as it is now, without adapting (the method's ``predict``, no gradients):
        the batches the online protocol (``tta.run.online``) passes while a step is still running."""
        with self._lock:
            x, ids = self.check_input(x, domain)
            with torch.inference_mode(False), torch.no_grad():
                if x.is_inference():
                    x = x.clone()
                if self.window > 1 and x.shape[0] == 1 and self._window_x.numel() and not self._predict_alone:
                    # a single image is predicted with the sliding window's images as context, as between steps
                    context = torch.cat([self._window_x.to(x), x])
                    context_ids = None if ids is None else torch.cat([self._window_ids.to(ids.device), ids])
                    return self.predict(context, context_ids)[-1:]
                return self.predict(x, ids)

    def step(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        """One batch: loss, update(s), ``after_step``; the output is also left in ``self.last``.

        An update whose loss or gradients are not finite is not applied; a batch that leaves any parameter or
        statistic non-finite is rolled back entirely. Both are counted (``counters.rejected``). A ``guard``
        (``tta.monitor``) reads the batch's prediction before the update, may veto it (``counters.skipped``) and
        may replace the final output.
        """
        self.counters.batches += 1
        guard = self.guard
        with self._transaction() as committed:
            out = self.loss(x, domain)
            allowed = guard is None or guard.before_update(self, x, domain, out)  # a guard may veto the update
            if not allowed and self.update != "none":
                self.counters.skipped += 1
            if self.update != "none" and allowed:
                for i in range(getattr(self.config, "steps", 1)):
                    if i:
                        out = self.loss(x, domain)
                    self._update(x, domain, out)
            out = self.after_step(x, domain, out)
            if guard is not None:
                out = guard.after_batch(self, out)  # e.g. the source model's prediction on an unhealthy batch
            if out.loss is not None and out.loss.requires_grad:  # keep no graph alive (memory, deepcopy)
                out = dataclasses.replace(out, loss=out.loss.detach())
            self.last = out
            every = getattr(self.config, "reset_every", 0)
            if every and self._updates_since_reset >= every:
                self.reset()  # after the batch's steps and after_step: an episode's prediction uses its update
        if not committed:
            self.counters.rejected += 1
        return out

    def _update(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> None:
        if out.loss is None or (out.n_used is not None and int(out.n_used) == 0):
            self.counters.skipped += 1
            return
        assert self.optimizer is not None  # gradient and SAM methods build one
        self._sync_optimizer()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        out.loss.backward()
        if not _finite(out.loss, params):
            self.optimizer.zero_grad(set_to_none=True)
            self.counters.rejected += 1
            return
        if self.update == "sam":
            from tta.core.steps import sam_perturb, sam_restore

            rho = float(getattr(self.config, "rho", 0.05))
            originals = sam_perturb(params, rho)
            self.optimizer.zero_grad(set_to_none=True)
            self.sam_loss(x, domain, out).backward()
            sam_restore(params, originals)
            if not _finite(None, params):
                self.optimizer.zero_grad(set_to_none=True)
                self.counters.rejected += 1
                return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.counters.updates += 1
        self._updates_since_reset += 1

    def _sync_optimizer(self) -> None:
        """Give the optimizer parameters created since it was built (contexts grown during the forward).

        The group is replaced by ``params()`` (module order) rather than extended, so that a saved optimizer state
        lines up with a model rebuilt from the same state dict; Adam keeps its moments per parameter.
        """
        assert self.optimizer is not None
        if len(self.optimizer.param_groups) == 1:
            params = self.params()
            if len(params) != len(self.optimizer.param_groups[0]["params"]):
                self.optimizer.param_groups[0]["params"] = params

    @contextmanager
    def _transaction(self) -> Iterator[bool]:
        """Roll back every tensor of the state when the batch leaves one non-finite (one check per batch).

        The snapshot is taken with one fused copy into buffers kept from the previous batch while the state's
        structure (the list of its tensors) stays the same.
        """
        tensors = self._state_tensors()
        saved, floats = self._backup(tensors)
        committed = _Flag()
        yield committed  # type: ignore[misc]
        if _all_finite(floats):
            return
        after = self._state_tensors()
        if len(after) == len(tensors) and all(a is b for a, b in zip(after, tensors, strict=True)):
            with torch.no_grad():
                torch._foreach_copy_(tensors, saved)
            committed.value = False
        # A batch that changed the structure (new contexts, a memory bank reallocated) is not rolled back here:
        # its tensors are new objects, so there is nothing to compare them with.

    def _backup(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of ``tensors`` (reusing last batch's buffers when it had the same tensors) and the float ones."""
        cache = self.__dict__.get("_snapshot_cache")
        with torch.no_grad():
            if (cache is not None and len(cache[0]) == len(tensors)
                    and all(a is b for a, b in zip(cache[0], tensors, strict=True))):
                torch._foreach_copy_(cache[1], tensors)
            else:
                cache = (tensors, [t.detach().clone() for t in tensors],
                         [t for t in tensors if t.is_floating_point() and t.numel()])
                self.__dict__["_snapshot_cache"] = cache
        return cache[1], cache[2]

    def _state_tensors(self) -> list[torch.Tensor]:
        """Every parameter, buffer and optimizer-state tensor (the same objects from call to call)."""
        tensors = [*self.parameters(), *self.buffers()]
        if self.optimizer is not None:
            tensors += [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return tensors

    def _window_step(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        """Single-image adaptation on a sliding window of the last ``window`` images: an update on the whole window
        every ``window`` images; the images in between are predicted with the window as context."""
        buf, ids, pointer = self._window_x, self._window_ids, self._window_pointer
        if buf.numel() and buf.shape[1:] != x.shape[1:]:
            raise InputError(f"image shape {tuple(x.shape[1:])} differs from the window's {tuple(buf.shape[1:])}; "
                             "reset() before changing the image size")
        new_id = torch.zeros(1, dtype=torch.long, device=x.device) if domain is None else domain
        if buf.shape[0] < self.window:
            buf = torch.cat([buf.to(x), x.detach()]) if buf.numel() else x.detach().clone()
            ids = torch.cat([ids.to(x.device), new_id])
        else:
            buf, ids = buf.clone(), ids.clone()
            buf[pointer], ids[pointer] = x[0].detach(), new_id[0]
        self._window_x, self._window_ids = buf, ids
        window_ids = None if domain is None else ids
        if pointer == self.window - 1:
            logits = self.step(buf, window_ids).logits[pointer: pointer + 1]
        elif self._predict_alone:
            with torch.no_grad():
                logits = self.predict(x, None if domain is None else new_id)
        else:
            # Until the window holds min_batch images, it is padded with copies of itself (batch statistics of a
            # single value per channel do not exist).
            reps = -(-self.requires.min_batch // buf.shape[0])
            context = buf if reps == 1 else buf.repeat(reps, 1, 1, 1)
            context_ids = window_ids if window_ids is None or reps == 1 else window_ids.repeat(reps)
            with torch.no_grad():
                logits = self.predict(context, context_ids)[pointer: pointer + 1]
        self._window_pointer = (pointer + 1) % self.window
        return logits

    def check_input(
        self, x: torch.Tensor, domain: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate a batch before anything changes: the batch as the model's dtype, and dense domain ids."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a torch.Tensor batch, got {type(x).__name__}; convert it with torch.as_tensor")
        if x.ndim != 4:
            raise InputError(
                f"expected a batch of shape (N, C, H, W), got shape {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0) or reshape the input"
            )
        if not x.is_floating_point():
            raise InputError(f"expected float images in [0, 1], got dtype {x.dtype}; use x.float() / 255")
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            raise InputError(
                f"the model expects {self.in_channels} input channels but the batch has {x.shape[1]}; "
                "pass images as (N, C, H, W) with channels second"
            )
        if x.shape[0] == 0:
            raise InputError("the batch is empty; pass at least one image")
        dtype = _float_dtype(self.model)
        if x.dtype != dtype:
            x = x.to(dtype)
        device = _device(self)
        if device is not None and x.device != device:
            raise InputError(f"the batch is on {x.device} but the model is on {device}; move it with "
                             f"x.to({str(device)!r}) or the model with .to()")
        low, high = torch.stack(torch.aminmax(x)).tolist()  # one pass; NaN propagates, inf shows as a bound
        if math.isnan(low) or math.isnan(high) or math.isinf(low) or math.isinf(high):
            raise InputError("the batch contains NaN or inf values; clean or drop those images before adapting")
        if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            fix = ("divide by 255" if high > 1 + RANGE_TOLERANCE and high <= 255 + RANGE_TOLERANCE and low >= 0
                   else "pass unnormalised images in [0, 1]; normalisation belongs inside the model")
            raise InputError(f"pixel values range over [{low:.3g}, {high:.3g}] but images must lie in [0, 1]; {fix}")
        return x, self._domain_ids(x, domain)

    def _domain_ids(self, x: torch.Tensor, domain: torch.Tensor | int | None) -> torch.Tensor | None:
        """Per-sample domain ids as dense indices 0, 1, ... in order of first appearance.

        Memory never depends on an id's value: at most ``MAX_DOMAIN_IDS`` distinct ids are told apart.
        """
        if domain is None or not self.requires.domain_ids:
            if domain is not None:
                _as_ids(domain, x)  # checked all the same, so that bad ids never pass silently
            return None
        ids = _as_ids(domain, x)
        keys = self._domain_keys
        known = set(keys.tolist())
        new = [v for v in torch.unique(ids).tolist() if v not in known]
        if new:
            if keys.numel() + len(new) > MAX_DOMAIN_IDS:
                raise InputError(f"more than {MAX_DOMAIN_IDS} distinct domain ids; reuse ids or reset() between "
                                 "unrelated streams")
            keys = torch.cat([keys.to(ids.device), torch.tensor(new, dtype=torch.long, device=ids.device)])
            self._domain_keys = keys
        order = torch.argsort(keys)
        pos = torch.searchsorted(keys[order], ids)
        return order[pos]

    def extra_repr(self) -> str:
        return f"method={self.name!r}, config={self.config}"


class _Flag:
    def __init__(self) -> None:
        self.value = True

    def __bool__(self) -> bool:
        return self.value


def _as_ids(domain: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
    if isinstance(domain, bool) or not isinstance(domain, (int, torch.Tensor)):
        raise InputError(f"domain must be an int or a tensor of int ids, got {type(domain).__name__}")
    if isinstance(domain, torch.Tensor) and (domain.is_floating_point() or domain.is_complex()):
        raise InputError(f"domain ids must be integers, got dtype {domain.dtype}")
    try:
        ids = torch.as_tensor(domain, dtype=torch.long, device=x.device)
    except (RuntimeError, OverflowError, ValueError):  # torch reports a Python int past 64 bits as ValueError
        raise InputError("domain ids must be integers that fit in 64 bits") from None
    if ids.ndim == 0:
        ids = ids.expand(x.shape[0]).contiguous()
    if ids.shape != (x.shape[0],):
        raise InputError(f"domain must be one id or one id per image ({x.shape[0]}), got shape {tuple(ids.shape)}")
    if bool((ids < 0).any()):
        raise InputError("domain ids must be non-negative integers")
    return ids


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of every (floating-point, non-empty) tensor is finite: one fused kernel, one sync.

    The largest absolute value of each tensor is finite exactly when the tensor is (NaN propagates); unlike a
    2-norm it cannot overflow on large but finite values.
    """
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, ord=float("inf")))).all())


def _finite(loss: torch.Tensor | None, params: list[nn.Parameter]) -> bool:
    """Whether the loss and every gradient are finite."""
    grads = [p.grad for p in params if p.grad is not None and p.grad.numel()]
    return _all_finite(grads + ([] if loss is None else [loss.detach().reshape(1)]))


@contextmanager
def _autograd_context(grad: bool) -> Iterator[None]:
    """Gradients on for updating methods (even inside ``torch.no_grad()`` or ``torch.inference_mode()``)."""
    with torch.inference_mode(False), (torch.enable_grad() if grad else torch.no_grad()):
        yield


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _device(module: nn.Module) -> torch.device | None:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def _num_classes(model: nn.Module) -> int | None:
    """Outputs of the last linear layer (the classifier), if there is one."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return None if last is None else last.out_features


def _input_channels(model: nn.Module) -> int | None:
    """Channels of the first convolution, used to reject batches laid out the wrong way."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


__all__ = ["MAX_DOMAIN_IDS", "AdaptedModel", "Counters", "Requirements", "StepOutput", "Update"]
