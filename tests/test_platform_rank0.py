"""rank0_call / every_rank_call: the result reaches every rank, and so does a failure (as one line naming the step,
the rank and the cause), so no rank waits in a later collective."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from luffy_megatron.platform import RankFailure, every_rank_call, rank0_call
from tests.dist_utils import run_distributed


def _outcome(fn) -> str:
    try:
        return f"ok {fn()!r}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def rank0_cases(rank: int, world: int) -> list[str]:
    def value():
        assert dist.get_rank() == 0, "ran on another rank"
        return {"from": dist.get_rank()}

    def broken():
        raise FileNotFoundError("data/train.parquet: no such file\n(second line)")

    out = [_outcome(lambda: rank0_call(value, "reading")), _outcome(lambda: rank0_call(broken, "setup", "stopped"))]
    out.append(_outcome(lambda: rank0_call(lambda: "after", "next")))  # the group is still usable
    return out


def test_rank0_call_shares_result_and_failure():
    rank0, rank1 = run_distributed(rank0_cases, 2, timeout_s=120)
    assert rank0[0] == rank1[0] == "ok {'from': 0}"
    assert rank0[1] == "FileNotFoundError: data/train.parquet: no such file\n(second line)"
    cause = "FileNotFoundError: data/train.parquet: no such file (second line)"
    assert rank1[1] == f"RankFailure: setup failed on rank 0 ({cause}); stopped"
    assert rank0[2] == rank1[2] == "ok 'after'"


def every_rank_cases(rank: int, world: int) -> list[str]:
    def fails_on_1_and_2():
        if dist.get_rank() in (1, 2):
            raise OSError(f"disk full on rank {dist.get_rank()}")
        return dist.get_rank()

    return [
        _outcome(lambda: every_rank_call(lambda: dist.get_rank() * 10, "a")),
        _outcome(lambda: every_rank_call(fails_on_1_and_2, "writing shards")),
    ]


def test_every_rank_call_raises_everywhere_naming_the_lowest_failing_rank():
    results = run_distributed(every_rank_cases, 3, timeout_s=120)
    assert [r[0] for r in results] == ["ok 0", "ok 10", "ok 20"]
    assert results[0][1] == "RankFailure: writing shards failed on rank 1 (OSError: disk full on rank 1)"
    assert results[1][1] == "OSError: disk full on rank 1"
    assert results[2][1] == "OSError: disk full on rank 2"


def test_without_a_process_group_both_are_plain_calls():
    assert rank0_call(lambda: 3, "x") == 3 and every_rank_call(lambda: 4, "y") == 4
    with pytest.raises(KeyError):
        rank0_call(lambda: {}["k"], "x")
    assert RankFailure("w", 2, "E: m").origin == 2
