"""AdaContrast: every parameter, BN in training mode, SGD 2e-4 (Nesterov 0.9, weight decay 1e-4); weak and two
strong views, k-NN refined pseudo-labels from a bank, MoCo contrast with an EMA key encoder (0.999) and a queue of
16384 keys, cross-entropy and diversity; predicts the updated model in eval mode."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hand_loops.santa import features_hook
from tta.methods.adacontrast import strong_view, weak_view


def make(model: nn.Module, device: torch.device, source: object = None):
    model.train()
    model.requires_grad_(True)
    key_model = copy.deepcopy(model).requires_grad_(False)
    seen, key_seen = features_hook(model), features_hook(key_model)
    optimizer = torch.optim.SGD(model.parameters(), lr=2e-4, momentum=0.9, nesterov=True, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    dim = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].in_features
    queue = F.normalize(torch.randn(dim, 16384, generator=gen), dim=0).to(device)
    queue_labels = torch.randint(0, 10, (16384,), generator=gen).to(device)
    state = {"queue_ptr": 0, "bank_ptr": 0, "seen": 0,
             "bank_f": torch.zeros(0, dim, device=device), "bank_p": torch.zeros(0, 10, device=device)}

    def step(x: torch.Tensor) -> torch.Tensor:
        x_w = weak_view(x, gen)
        x_q, x_k = strong_view(x, gen), strong_view(x, gen)
        with torch.enable_grad():
            logits_w = model(x_w)
            feats_w = seen["f"]
            with torch.no_grad():
                if state["seen"] >= 1024 and len(state["bank_f"]):
                    sim = F.normalize(feats_w, dim=1) @ F.normalize(state["bank_f"], dim=1).T
                    pseudo = state["bank_p"][(1 - sim).sort(dim=1).indices[:, :10]].mean(1).argmax(1)
                else:
                    pseudo = logits_w.argmax(1)
                    state["seen"] += len(x)
            logits_q = model(x_q)
            q = F.normalize(seen["f"], dim=1)
            with torch.no_grad():
                torch._foreach_mul_(list(key_model.parameters()), 0.999)
                torch._foreach_add_(list(key_model.parameters()), list(model.parameters()), alpha=0.001)
                key_model(x_k)
                keys = F.normalize(key_seen["f"], dim=1)
            logits_ins = torch.cat([(q * keys).sum(1, keepdim=True), q @ queue.clone()], dim=1) / 0.07
            with torch.no_grad():
                idx = (torch.arange(len(keys), device=device) + state["queue_ptr"]) % 16384
                queue[:, idx] = keys.T
                queue_labels[idx] = pseudo
                state["queue_ptr"] = (state["queue_ptr"] + len(keys)) % 16384
            mask = torch.ones_like(logits_ins, dtype=torch.bool)
            mask[:, 1:] = pseudo[:, None] != queue_labels[None, :]
            target = torch.zeros(len(x), dtype=torch.long, device=device)
            loss = F.cross_entropy(logits_ins.masked_fill(~mask, float("-inf")), target)
            loss = loss + F.cross_entropy(logits_q, pseudo)
            mean = logits_q.softmax(1).mean(0)
            loss = loss + (mean * torch.log(mean + 1e-8)).sum()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            logits = key_model(x_w)
            feats, probs = key_seen["f"], logits.softmax(1)
            if len(state["bank_f"]) < 16384:
                state["bank_f"] = torch.cat([state["bank_f"], feats])
                state["bank_p"] = torch.cat([state["bank_p"], probs])
            else:
                i = (torch.arange(len(feats), device=device) + state["bank_ptr"]) % len(state["bank_f"])
                state["bank_f"][i], state["bank_p"][i] = feats, probs
            state["bank_ptr"] = (state["bank_ptr"] + len(feats)) % len(state["bank_f"])
            model.eval()
            out = model(x)
            model.train()
        return out

    return step
