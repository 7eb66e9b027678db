"""The training micro-batches, loaded ahead of the step that uses them.

Step ``k`` reads global samples ``[k*G, (k+1)*G)`` of the train split (``G`` the global batch),
each data-parallel rank its contiguous slice in micro-batches, so the order is the same under
every layout and a resumed run continues exactly. ``TrainBatches`` serves that stream from
``consumed_samples`` on through a ``torch.utils.data.DataLoader``: with ``data.num_workers``
worker processes it assembles the next micro-batches while the current step runs, in pinned
memory on a GPU, and copies each to the device without blocking. With no workers (the CPU
default) the samples and tensors are the ones the step would have built itself.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def collate(samples: list[dict]) -> dict:
    """A micro-batch: the samples' tensors stacked, for the keys the forward step reads."""
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS}


class RankSamples(Sampler):
    """This data-parallel rank's sample indices, step after step from ``first_sample``."""

    def __init__(self, dataset_size: int, first_sample: int, global_batch: int, offset: int,
                 count: int, steps: int):
        self.size, self.first, self.global_batch = dataset_size, first_sample, global_batch
        self.offset, self.count, self.steps = offset, count, steps

    def __iter__(self):
        for step in range(self.steps):
            start = self.first + step * self.global_batch + self.offset
            yield from (i % self.size for i in range(start, start + self.count))

    def __len__(self) -> int:
        return self.steps * self.count


class TrainBatches:
    """An iterator of this rank's micro-batches on ``device``, for ``steps`` steps."""

    def __init__(self, dataset, *, first_sample: int, global_batch: int, micro_batch: int,
                 offset: int, count: int, steps: int, device: torch.device, workers: int):
        sampler = RankSamples(len(dataset), first_sample, global_batch, offset, count, steps)
        self.device = device
        self.loader = DataLoader(dataset, batch_size=micro_batch, sampler=sampler,
                                 collate_fn=collate, num_workers=workers,
                                 pin_memory=device.type == "cuda",
                                 prefetch_factor=4 if workers else None)
        self._it = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def close(self) -> None:
        """Stop the workers (a new ``TrainBatches`` starts again from a sample)."""
        self._it = None
