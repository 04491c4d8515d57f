"""Source replay: the stream of labelled source batches that RMT and GTTA step on."""

from __future__ import annotations

import torch

from tta.core.replay import replay_batch


def test_replayed_batches_cover_each_pass_once() -> None:
    images, labels = torch.zeros(49, 3, 2, 2, dtype=torch.uint8), torch.arange(49) % 10
    sizes = [len(replay_batch(images, labels, i, 16, 0, torch.float32)[1]) for i in range(3)]
    assert sizes == [16, 16, 17]  # a last single image joins the batch before it (BatchNorm needs two)
    drawn = torch.cat([replay_batch(images, labels, i, 16, 0, torch.float32)[1] for i in range(3)])
    assert sorted(drawn.tolist()) == sorted(labels.tolist())
    assert not torch.equal(replay_batch(images, labels, 3, 16, 0, torch.float32)[1],
                           replay_batch(images, labels, 0, 16, 0, torch.float32)[1])  # a new order each pass
