"""The training stream (moue.training.batches): each data-parallel rank's slice of each global
batch, in order from any sample, the same with worker processes as without."""

import pytest
import torch

from moue.training.batches import BATCH_KEYS, RankSamples, TrainBatches

pytestmark = pytest.mark.compat  # also run against megatron-core 0.19


class Samples:
    """A dataset whose sample i holds i in every field."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {k: torch.full((3,), i) for k in (*BATCH_KEYS, "attention_mask")}


def test_each_rank_reads_its_slice_of_every_global_batch():
    # Global batch 4 over 2 data-parallel ranks from sample 8: rank 1 reads 10, 11 -> 0, 1 (the
    # dataset wraps), then 14, 15 -> 4, 5.
    assert list(RankSamples(10, 8, 4, offset=2, count=2, steps=2)) == [0, 1, 4, 5]
    assert len(RankSamples(10, 0, 4, offset=0, count=2, steps=3)) == 6


def test_workers_load_the_same_micro_batches_as_the_step_itself():
    def stream(workers):
        batches = TrainBatches(Samples(), first_sample=4, global_batch=4, micro_batch=2,
                               offset=0, count=4, steps=2, device=torch.device("cpu"),
                               workers=workers)
        got = [next(batches) for _ in range(4)]
        batches.close()
        return got

    plain, loaded_ahead = stream(0), stream(2)
    assert [b["tokens"][:, 0].tolist() for b in plain] == [[4, 5], [6, 7], [8, 9], [0, 1]]
    for a, b in zip(plain, loaded_ahead, strict=True):
        assert set(a) == set(BATCH_KEYS)  # only what the forward step reads
        assert all(torch.equal(a[k], b[k]) for k in BATCH_KEYS)
