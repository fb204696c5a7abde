"""count_slots_per_expert: the sync-free replacement for torch.bincount in dispatch."""

import torch

from moealign.nn.experts import count_slots_per_expert


def test_counts_equal_bincount_and_ignore_out_of_range_ids():
    torch.manual_seed(0)
    ids = torch.randint(0, 6, (50, 3))
    expected = torch.bincount(ids.reshape(-1), minlength=8)
    assert torch.equal(count_slots_per_expert(ids, 8), expected)
    dropped = ids.masked_fill(torch.rand(50, 3) > 0.7, 8)  # id E marks a dropped slot
    kept = ids[dropped < 8]
    assert torch.equal(count_slots_per_expert(dropped, 8), torch.bincount(kept, minlength=8))
    assert count_slots_per_expert(dropped, 8).sum() == kept.numel()
