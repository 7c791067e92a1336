"""tests/mp_util.py itself: errors and hangs on one rank surface in the parent."""

import pytest

from mp_util import RankFailure, run_ranks

pytestmark = pytest.mark.multiprocess


def _raise_on_rank_one(rank, world):
    if rank == 1:
        raise KeyError("boom on one rank")
    return rank


def _hang_on_rank_one(rank, world):
    import time

    if rank == 1:
        time.sleep(600)
    return rank


def test_mp_util_reports_errors_and_hangs():
    with pytest.raises(RankFailure) as err:
        run_ranks(_raise_on_rank_one, 2, timeout=60)
    assert set(err.value.errors) == {1} and err.value.errors[1].type_name == "KeyError"
    assert "boom on one rank" in str(err.value) and "_raise_on_rank_one" in err.value.errors[1].traceback
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish"):
        run_ranks(_hang_on_rank_one, 2, timeout=5)


def _echo(rank, world, offset):
    import torch.distributed as dist

    return rank + offset, dist.get_world_size(), dist.get_backend()


def test_mp_util_returns_results_in_rank_order():
    assert run_ranks(_echo, 2, args=(10,), timeout=60) == [(10, 2, "gloo"), (11, 2, "gloo")]
