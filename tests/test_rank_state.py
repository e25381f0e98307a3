"""Per-rank checkpoint state: gathered in rank order, picked out by rank, a world-size change named."""

import pytest

from fovlm.rank_state import gather_by_rank, is_gathered, pick_rank


def test_one_process_gathers_and_picks_its_own_state():
    saved = gather_by_rank({"batches": 3})
    assert saved == {"world_size": 1, "by_rank": [{"batches": 3}]}
    assert is_gathered(saved) and not is_gathered({"batches": 3})
    assert pick_rank(saved, "data position") == {"batches": 3}


def test_a_different_number_of_ranks_is_a_clear_error():
    saved = {"world_size": 2, "by_rank": [{"batches": 3}, {"batches": 4}]}
    with pytest.raises(ValueError, match="data position was saved by 2 ranks, but this run has 1"):
        pick_rank(saved, "data position")
